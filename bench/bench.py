#!/usr/bin/env python3
"""strata benchmark driver: run by bench/run, which builds strata, installs the
peer filesystems, mounts the scratch tmpfs and unmounts everything on exit.

Workloads are measured against several targets over the same source data:
  native          the source directory itself
  strata          `strata mount SRC MNT` (default options, plus --strata-opts);
                  bench/run turns on FUSE over io_uring, so requests take it
  strata-devfuse  the same with `-o uring=false`: requests through /dev/fuse
  mergerfs        single branch, cache.files=off,category.create=ff,minfreespace=0
  bindfs          `bindfs SRC MNT`
  fuse-overlayfs  lowerdir=SRC, a fresh upperdir/workdir (writes land in upper)
  strata-overlay  `strata mount SRC --upper UP MNT`, a fresh empty UP per mount
  strata-image    `strata mount image:SRC --upper UP MNT`: SRC built into an
                  image (store on the same filesystem), a fresh empty UP
  strata-union3   `strata mount B1:B2:B3 MNT -o category.create=ff,minfreespace=0`
  mergerfs-union3 mergerfs over the same 3 branches, options as mergerfs

The union branches hold the same files as SRC, dealt round-robin (every
directory exists on all three), so listings really merge; native stays the
baseline for them too. For the overlay targets native is also SRC: reads come
from the lower (SRC, or the image built from it), writes land in the upper on
the same filesystem, so a write compares with writing into SRC.

pyimport (disk only) imports big pure-Python packages from a venv built once
(and cached) under the disk root, served by each target (native: the venv
directory; strata-image: the venv built into an image). image (disk only)
measures `strata image build`, image mount time against `cp -a`, first and
later reads of an image file, and find/RSS over a ~1M-entry image.

workspace (tmpfs only) measures snapshots and branches on workspaces of its
own (`strata mount LOWER --upper UP MNT`, UP kept across mounts): snapshot and
branch create against the tree's size, stat/ls after 1 and after many
snapshots, dd and small files bound to a branch (`strata branch exec`) or
not, and the daemon's memory per branch served.

Runs are interleaved (A B C A B C ...); per (fs, workload, target) the median
is reported with its ratio to native's median from the same run (for IOPS,
where higher is better, native/target, so >1 always means slower than native).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import time

ALL_TARGETS = ["native", "strata", "strata-devfuse", "mergerfs", "bindfs", "fuse-overlayfs",
               "strata-overlay", "strata-image", "strata-union3", "mergerfs-union3"]
# Not selectable: the image mounted read-only (kernel passthrough for its
# files; under an upper they are read through the daemon), measured next to
# strata-image by pyimport and the image reads, for reference.
EXTRA_TARGETS = ["strata-image-ro"]
STRATA_TARGETS = {"strata", "strata-devfuse", "strata-overlay", "strata-image", "strata-union3", "strata-image-ro"}
# Targets with a fresh upper directory per mount (writes land there).
OVERLAY_TARGETS = {"fuse-overlayfs", "strata-overlay", "strata-image"}
# Targets that can serve the pyimport venv (everything but the unions).
PY_TARGETS = ["native", "strata", "strata-devfuse", "mergerfs", "bindfs", "fuse-overlayfs",
              "strata-overlay", "strata-image"]
# A union target -> the single-directory target it is compared with.
UNION_OF = {"strata-union3": "strata", "mergerfs-union3": "mergerfs"}
# `bench/run --baseline REV`: the strata targets again, run by a build of REV
# (the code a change replaces), named TARGET@base, interleaved with the rest
# of the same run: before and after on the same machine state.
BASE_OF = {f"{t}@base": t for t in ("strata", "strata-overlay", "strata-image", "strata-union3")}
STRATA_TARGETS |= set(BASE_OF)
OVERLAY_TARGETS |= {"strata-overlay@base", "strata-image@base"}
UNION_OF["strata-union3@base"] = "strata@base"


def kind(target):
    """The target a TARGET@base stands for (itself otherwise)."""
    return BASE_OF.get(target, target)
N_BRANCHES = 3
ALL_FS = ["tmpfs", "disk"]
# Workload groups accepted by --workloads, and the measurements they produce.
GROUPS = {
    "ls": ["ls-cold", "ls-warm"],
    "read": ["read-cold", "read-warm"],
    "write": ["write"],
    "dd": ["write", "read-cold", "read-warm"],
    "small": ["small-create", "small-stat", "small-read", "small-unlink"],
    "ls100k": ["ls100k-cold", "ls100k-warm"],
    "find": ["find"],
    "fio": ["fio-rand1", "fio-rand2"],
    "rss": ["rss"],
    "pyimport": ["pyimport-cold", "pyimport-warm", "pyimport-first"],
    "image": ["image-build", "image-rebuild", "image-mount-small", "image-mount-small-warm",
              "image-mount-big",
              "image-read-first", "image-read-cold", "image-read-warm",
              "image-find-big", "image-rss-big"],
}
# Snapshots and branches (tmpfs only): create times against the tree's size,
# lookups and listings under a deep chain of snapshots, the cost of binding,
# daemon memory per branch served.
WS_CREATE = ["ws-snapshot-fresh", "ws-snapshot", "ws-branch"]
WS_DEPTH = ["ws-stat-cold", "ws-ls-cold", "ws-stat-warm", "ws-ls-warm"]
WS_SMALL = ["ws-small-create", "ws-small-stat", "ws-small-read", "ws-small-unlink"]
WS_BOUND = ["ws-write", "ws-read-cold", "ws-read-warm", "ws-stat"] + WS_SMALL
GROUPS["workspace"] = WS_CREATE + WS_DEPTH + WS_BOUND + ["ws-rss"]
WS_WORKLOADS = GROUPS["workspace"]
WS_RSS_BRANCHES = 10
# What a workspace variant (the target of a ws-* sample) is compared with.
WS_REF_OF = {"depth-n": "depth-1", "bound": "unbound",
             f"branches-{WS_RSS_BRANCHES}": "branches-1"}
# The Mounter target of every workspace.
WS_T = "strata-overlay"
# Workloads over SRC (and the union branches), measured on every --fs.
SRC_WORKLOADS = ["ls-cold", "ls-warm", "ls100k-cold", "ls100k-warm", "find",
                 "write", "read-cold", "read-warm", "fio-rand1", "fio-rand2",
                 "small-create", "small-stat", "small-read", "small-unlink", "rss"]
# pyimport and image use data built once and cached on the disk: disk only.
PY_WORKLOADS = GROUPS["pyimport"]
IMAGE_WORKLOADS = GROUPS["image"]
ALL_WORKLOADS = SRC_WORKLOADS + PY_WORKLOADS + IMAGE_WORKLOADS + WS_WORKLOADS
# Workloads with tables of their own in the markdown.
OWN_TABLE = set(IMAGE_WORKLOADS) | set(WS_WORKLOADS)
GROUPS["all"] = list(ALL_WORKLOADS)
DEFAULT_WORKLOADS = "ls,dd,small"
# Units other than wall seconds; IOPS is the one where higher is better.
UNITS = {"fio-rand1": "IOPS", "fio-rand2": "IOPS", "rss": "MiB", "image-rss-big": "MiB",
         "ws-snapshot-fresh": "ms", "ws-snapshot": "ms", "ws-branch": "ms", "ws-rss": "MiB"}
HIGHER_BETTER = {"fio-rand1", "fio-rand2"}

# minfreespace=0: mergerfs 2.33's default of 4G is more than the 4G tmpfs ever
# has free, and its create policies then fail every create with ENOSPC.
MERGERFS_OPTS = "cache.files=off,category.create=ff,minfreespace=0"
# Union strata: first-found creates (deterministic, no free-space scan) and no
# free-space floor, for the same reason as mergerfs.
STRATA_UNION_OPTS = "category.create=ff,minfreespace=0"
MOUNT_TIMEOUT = 30          # `timeout 30` on every mount/umount command
WORKLOAD_TIMEOUT = 300      # a single measurement that takes longer is a hang

# tree: tree_top directories, each with tree_sub subdirectories, and
# tree_per_dir empty files in every one of them (full: 2,000 dirs, 50,000 files).
SIZES = {
    "full": {"ls_files": 3537, "file_kib": 1, "big_mib": 1024, "small_files": 5000,
             "ls100k_files": 100000, "tree_top": 50, "tree_sub": 39, "tree_per_dir": 25,
             "fio_secs": 10, "runs": 5,
             # image trees (top dirs, subdirs of each, files in each subdir):
             # 20*20*29 = 11,600 small files + 421 dirs = 12,021 entries;
             # 100*100*99 = 990,000 empty files + 10,101 dirs = 1,000,101 entries
             "img_small": (20, 20, 29), "img_big": (100, 100, 99), "img_file_mib": 100,
             # workspace: files in the lower and in the upper for snapshot and
             # branch create (the largest also for ws-rss); snapshots of the
             # deep workspace
             "ws_files": [1000, 10000, 100000], "ws_snapshots": 100},
    "quick": {"ls_files": 500, "file_kib": 1, "big_mib": 64, "small_files": 500,
              "ls100k_files": 10000, "tree_top": 10, "tree_sub": 19, "tree_per_dir": 25,
              "fio_secs": 3, "runs": 3,
              "img_small": (20, 20, 29), "img_big": (20, 25, 99), "img_file_mib": 16,
              "ws_files": [1000, 5000], "ws_snapshots": 10},
}
# The pyimport venv: packages pip installs from PyPI and the import that is timed.
PY_PACKAGES = ["sympy", "networkx"]
PY_MODULES = ["sympy", "networkx"]
# Without PyPI: the venv's own pip and setuptools (big enough to be measurable).
PY_FALLBACK_MODULES = ["pip._internal.cli.main", "setuptools"]
VENV_LAYOUT = 1     # bump when prepare_venv changes what it creates
IMG_LAYOUT = 1      # bump when prepare_images changes what it creates
SETUP_TIMEOUT = 3600  # one-off data/venv/image builds
# The big image's find/RSS is also measured on its source tree through these
# targets (when selected), for reference.
FIND_BIG_REFS = ["strata", "strata-overlay"]
# What the prepared data depends on (a change rebuilds it).
DATA_KEYS = ("ls_files", "file_kib", "big_mib", "ls100k_files", "tree_top", "tree_sub",
             "tree_per_dir")
DATA_LAYOUT = 2     # bump when prepare_data changes what it creates


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class TargetFailed(Exception):
    pass


# ---------------------------------------------------------------- mounts

def mountinfo():
    """Mountpoint -> fstype, from /proc/self/mountinfo."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            mp = parts[4].replace("\\040", " ")
            out[mp] = parts[sep + 1]
    return out


def is_mounted(path):
    return os.path.realpath(path) in mountinfo()


def run_cmd(cmd, timeout):
    """Run a command under `timeout`; returns (ok, combined output)."""
    try:
        p = subprocess.run(["timeout", str(timeout)] + cmd, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=timeout + 10, text=True)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout + 10}s"
    out = p.stdout.strip()
    if p.returncode == 124:
        out = f"timed out after {timeout}s. {out}"
    return p.returncode == 0, out


class Mounter:
    """Mounts targets over one source: SRC of a filesystem root (default), or
    another directory (src=, e.g. the pyimport venv) with the image built from
    it (image= in store=). Overlay targets get a fresh empty upper per mount
    under FS_ROOT/ovl/TAG/TARGET, or with keep_upper the one there (a
    workspace: its snapshots and branches live in it)."""

    def __init__(self, args, fs_root, fs_name, src=None, image=None, store=None, tag=None,
                 keep_upper=False):
        self.args = args
        self.keep_upper = keep_upper
        self.src = src or os.path.join(fs_root, "src")
        self.image = image
        self.store = store
        self.branches = branch_dirs(fs_root)
        self.fs_root = fs_root
        self.mnt_base = os.path.join(args.mnt_base, fs_name + (f"-{tag}" if tag else ""))
        self.ovl = os.path.join(fs_root, "ovl", tag or "src")
        self.active = {}   # target -> mountpoint

    def path(self, target):
        return self.src if target == "native" else os.path.join(self.mnt_base, target)

    def upper(self, target):
        return os.path.join(self.ovl, target, "upper")

    def fresh_upper(self, target):
        """Empty upper (and work) dir for target; returns (upper, work)."""
        up, wk = self.upper(target), os.path.join(self.ovl, target, "work")
        for d in (up, wk):
            shutil.rmtree(d, ignore_errors=True)
            os.makedirs(d)
        return up, wk

    def mount(self, target):
        if target == "native":
            return self.src
        mnt = self.path(target)
        os.makedirs(mnt, exist_ok=True)
        if is_mounted(mnt):
            self.umount(target, mnt)
        if target in STRATA_TARGETS:
            cmd = [self.args.baseline if target in BASE_OF else self.args.strata, "mount"]
            target_kind = kind(target)
            if target_kind == "strata-union3":
                cmd += ["-o", STRATA_UNION_OPTS]
            if target == "strata-devfuse":
                cmd += ["-o", "uring=false"]
            if target_kind in ("strata-image", "strata-image-ro"):
                if not self.image:
                    raise TargetFailed("no image was built for this source")
                cmd += ["-o", f"store={self.store}"]
            for o in self.args.strata_opts:
                cmd += ["-o", o]
            if target in OVERLAY_TARGETS:
                cmd += ["--upper", self.upper(target) if self.keep_upper
                        else self.fresh_upper(target)[0]]
            cmd += [{"strata": self.src, "strata-devfuse": self.src, "strata-overlay": self.src,
                     "strata-image": f"image:{self.image}",
                     "strata-image-ro": f"image:{self.image}",
                     "strata-union3": ":".join(self.branches)}[target_kind], mnt]
        elif target == "mergerfs":
            cmd = ["mergerfs", "-o", MERGERFS_OPTS, self.src, mnt]
        elif target == "mergerfs-union3":
            cmd = ["mergerfs", "-o", MERGERFS_OPTS, ":".join(self.branches), mnt]
        elif target == "bindfs":
            cmd = ["bindfs", self.src, mnt]
        elif target == "fuse-overlayfs":
            up, wk = self.fresh_upper(target)   # every mount starts from an empty upper
            cmd = ["fuse-overlayfs", "-o", f"lowerdir={self.src},upperdir={up},workdir={wk}", mnt]
        else:
            raise ValueError(target)
        # Timed from the command's start until it returned and the mountpoint
        # is in the mount table (strata returns once the mount is ready).
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, timeout=MOUNT_TIMEOUT, text=True)
            ok, out = p.returncode == 0, p.stdout.strip()
        except subprocess.TimeoutExpired:
            ok, out = False, f"timed out after {MOUNT_TIMEOUT}s"
        self.last_mount_secs = time.perf_counter() - t0
        self.last_mount_waited = False
        deadline = time.monotonic() + 10
        while ok and not is_mounted(mnt) and time.monotonic() < deadline:
            self.last_mount_waited = True
            time.sleep(0.001)
        if self.last_mount_waited:
            self.last_mount_secs = time.perf_counter() - t0
        if not ok or not is_mounted(mnt):
            raise TargetFailed(f"mount failed: `{' '.join(cmd)}`: {out or 'not in mountinfo'}")
        self.active[target] = mnt
        return mnt

    def umount(self, target, mnt=None):
        if target == "native":
            return
        mnt = mnt or self.path(target)
        self.active.pop(target, None)
        if not is_mounted(mnt):
            return
        tries = []
        if target in STRATA_TARGETS:
            tries.append([self.args.strata, "umount", mnt])
        tries += [["fusermount3", "-u", mnt], ["umount", "-l", mnt]]
        errors = []
        for cmd in tries:
            ok, out = run_cmd(cmd, MOUNT_TIMEOUT)
            if ok and not is_mounted(mnt):
                if errors:
                    log(f"{target}: unmount needed fallback `{' '.join(cmd)}` after: {errors}")
                return
            errors.append(f"`{' '.join(cmd)}`: {out}")
        raise TargetFailed(f"unmount of {mnt} failed: {errors}")

    def umount_all(self):
        for target in list(self.active):
            try:
                self.umount(target)
            except TargetFailed as e:
                log(f"cleanup: {e}")


def settle():
    """Untimed: flush what the previous measurement left dirty, so it is not
    billed to the next target."""
    subprocess.run(["timeout", "60", "sync"], check=False)


def drop_caches():
    subprocess.run(["timeout", "60", "sync"], check=False)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# ---------------------------------------------------------------- data

def branch_dirs(fs_root):
    return [os.path.join(fs_root, "union", f"b{i + 1}") for i in range(N_BRANCHES)]


def tree_dirs(sizes):
    """Relative paths of the find tree's directories, parents first."""
    out = []
    for t in range(sizes["tree_top"]):
        top = os.path.join("tree", f"d{t:03d}")
        out.append(top)
        out += [os.path.join(top, f"e{u:03d}") for u in range(sizes["tree_sub"])]
    return out


def ls_names(n):
    return [f"file-{i:05d}.dat" for i in range(n)]


def ls_payload(sizes):
    """The content of every file of the ls directory."""
    return (b"strata-bench-0123456789abcdef\n" * 64)[: sizes["file_kib"] * 1024]


def small_names(n):
    """The small-file workload's names (in a directory of their own)."""
    return [f"s{i:05d}" for i in range(n)]


def prepare_data(fs_root, sizes):
    """Create src/{ls,ls100k,tree,big} and the same files spread over
    union/b1..b3 (every directory on all branches, files dealt round-robin, big
    on the last branch); skip if a marker says it is all there."""
    src = os.path.join(fs_root, "src")
    branches = branch_dirs(fs_root)
    marker = os.path.join(fs_root, "prepared.json")
    want = {k: sizes[k] for k in DATA_KEYS}
    want["layout"] = DATA_LAYOUT
    try:
        with open(marker) as f:
            if json.load(f) == want and all(os.path.isdir(d) for d in [src] + branches):
                log(f"data in {src} and {os.path.dirname(branches[0])} already prepared")
                return
    except (OSError, ValueError):
        pass
    log(f"preparing data in {src} and {os.path.dirname(branches[0])}")
    t0 = time.monotonic()
    try:
        os.unlink(marker)
    except FileNotFoundError:
        pass
    for d in ("src", "union", "ovl"):
        shutil.rmtree(os.path.join(fs_root, d), ignore_errors=True)
    roots = [src] + branches

    def mkdir(rel):
        for r in roots:
            os.makedirs(os.path.join(r, rel))

    count = [0]

    def mkfile(rel, data=b""):
        """Write rel in src and in the next branch (round-robin)."""
        b = branches[count[0] % N_BRANCHES]
        count[0] += 1
        for r in (src, b):
            fd = os.open(os.path.join(r, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            if data:
                os.write(fd, data)
            os.close(fd)

    for r in roots:
        os.makedirs(r)
    mkdir("ls")
    payload = ls_payload(sizes)
    for name in ls_names(sizes["ls_files"]):
        mkfile(os.path.join("ls", name), payload)
    mkdir("ls100k")
    for i in range(sizes["ls100k_files"]):
        mkfile(os.path.join("ls100k", f"f{i:06d}"))
    mkdir("tree")
    for d in tree_dirs(sizes):
        mkdir(d)
        for j in range(sizes["tree_per_dir"]):
            mkfile(os.path.join(d, f"f{j:03d}"))
    big = os.path.join(src, "big")
    subprocess.run(["dd", "if=/dev/urandom", f"of={big}", "bs=1M",
                    f"count={sizes['big_mib']}", "conv=fsync", "status=none"], check=True)
    # On the last branch: a union lookup of it misses on the first two.
    shutil.copyfile(big, os.path.join(branches[-1], "big"))
    os.makedirs(os.path.join(fs_root, "ovl"), exist_ok=True)
    subprocess.run(["sync"], check=True)
    with open(marker, "w") as f:
        json.dump(want, f)
    log(f"data prepared in {time.monotonic() - t0:.1f}s")


def prepared_key(fs_root):
    """What SRC's image depends on: the prepared marker and when it was written
    (regenerated data has new random content under the same sizes)."""
    marker = os.path.join(fs_root, "prepared.json")
    with open(marker) as f:
        return {"prepared": json.load(f), "mtime_ns": os.stat(marker).st_mtime_ns}


def image_names(args, store):
    if not os.path.isdir(store):
        return set()
    ok, out = run_cmd([args.strata, "image", "ls", "--json", "--store", store], MOUNT_TIMEOUT)
    if not ok:
        raise TargetFailed(f"`strata image ls --json --store {store}`: {out}")
    return {row["name"] for row in json.loads(out)}


def ensure_image(args, src, store, name, key, marker):
    """Build image NAME from src into store, unless marker records a build of
    the same key and the store still lists the image. Returns the marker's
    content: key, the build's summary line and seconds (of the build that
    made it, possibly in an earlier run)."""
    try:
        with open(marker) as f:
            info = json.load(f)
        if info.get("key") == key and name in image_names(args, store):
            log(f"image {name} in {store} already built ({info.get('summary')})")
            return info
    except (OSError, ValueError):
        pass
    log(f"building image {name} from {src} into {store}")
    cmd = [args.strata, "image", "build", src, "--name", name, "--replace", "--store", store]
    t0 = time.monotonic()
    ok, out = run_cmd(cmd, SETUP_TIMEOUT)
    secs = time.monotonic() - t0
    if not ok:
        raise TargetFailed(f"`{' '.join(cmd)}`: {out[-500:]}")
    info = {"key": key, "summary": out.splitlines()[-1] if out else "", "secs": round(secs, 2),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    subprocess.run(["sync"], check=False)
    with open(marker, "w") as f:
        json.dump(info, f)
    log(f"image {name}: {info['summary']} ({secs:.1f}s)")
    return info


def tree_stats(root):
    """(entries, regular files, bytes of regular files, each inode once)."""
    entries, files, size, seen = 1, 0, 0, set()
    for d, dirs, names in os.walk(root):
        entries += len(dirs) + len(names)
        for n in names:
            st = os.lstat(os.path.join(d, n))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                files += 1
                size += st.st_size
    return entries, files, size


def clean_env():
    """The environment for the venv's python: no PYTHON* or VIRTUAL_ENV
    settings from the caller."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}


def prepare_venv(root):
    """A venv under root/py with PY_PACKAGES from PyPI (fallback: nothing
    installed, the venv's own pip and setuptools are imported), every .py
    precompiled so no import writes a .pyc. Built once; a marker records the
    packages, the interpreter and the modules to import."""
    pydir = os.path.join(root, "py")
    venv = os.path.join(pydir, "venv")
    marker = os.path.join(pydir, "venv.json")
    want = {"packages": PY_PACKAGES, "python": os.path.realpath(sys.executable),
            "version": sys.version.split()[0], "layout": VENV_LAYOUT}
    try:
        with open(marker) as f:
            info = json.load(f)
        if info.get("want") == want and os.path.exists(os.path.join(venv, "bin", "python")):
            log(f"venv {venv} already prepared ({', '.join(info['modules'])})")
            return venv, info
    except (OSError, ValueError):
        pass
    log(f"creating venv {venv} with {' '.join(PY_PACKAGES)}")
    shutil.rmtree(pydir, ignore_errors=True)
    os.makedirs(pydir)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=SETUP_TIMEOUT,
                   env=clean_env())
    py = os.path.join(venv, "bin", "python")
    p = subprocess.run([py, "-m", "pip", "install", "--no-input", "--progress-bar", "off"]
                       + PY_PACKAGES, capture_output=True, text=True, timeout=SETUP_TIMEOUT,
                       env=clean_env())
    if p.returncode == 0:
        modules, fallback = PY_MODULES, None
    else:
        fallback = (f"pip install {' '.join(PY_PACKAGES)} failed (exit {p.returncode}): "
                    f"{(p.stderr or p.stdout).strip()[-400:]}")
        log(f"WARNING: {fallback}; importing the venv's own pip and setuptools instead")
        modules = PY_FALLBACK_MODULES
    # Precompile everything: imports then only read .pyc files, on every target.
    subprocess.run([py, "-m", "compileall", "-q", "-j0", venv], capture_output=True,
                   timeout=SETUP_TIMEOUT, env=clean_env())
    freeze = subprocess.run([py, "-m", "pip", "list", "--format=freeze"], capture_output=True,
                            text=True, timeout=600, env=clean_env()).stdout.split()
    subprocess.run(["sync"], check=False)
    info = {"want": want, "modules": modules, "fallback": fallback, "packages": freeze}
    with open(marker, "w") as f:
        json.dump(info, f)
    return venv, info


def make_tree(path, shape, content):
    """shape = (top, sub, files): top dirs, sub dirs in each, files in each
    sub dir. content: small distinct files (0..~3 KiB of text) or empty."""
    top, sub, per = shape
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    n = 0
    for t in range(top):
        for u in range(sub):
            d = os.path.join(path, f"d{t:03d}", f"e{u:03d}")
            os.makedirs(d)
            for j in range(per):
                fd = os.open(os.path.join(d, f"f{j:03d}.py"), os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o644)
                if content:
                    line = f"# {t}/{u}/{j} strata-bench image tree\n".encode()
                    os.write(fd, line * (n % 97))
                os.close(fd)
                n += 1


def ws_tree(path, n, prefix):
    """n empty files PREFIX000..PREFIX999 in directories d000, d001, ... of
    1,000 each: given other prefixes, a lower and an upper with the same
    directories, all merged."""
    for i in range(n):
        d = os.path.join(path, f"d{i // 1000:03d}")
        if i % 1000 == 0:
            os.makedirs(d)
        os.close(os.open(os.path.join(d, f"{prefix}{i % 1000:03d}"),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


def ws_tree_dirs(n):
    return -(-n // 1000)


def ws_lower(base, n):
    """BASE/lower-N, the lower of N files, made on first use."""
    path = os.path.join(base, f"lower-{n}")
    if not os.path.isdir(path):
        ws_tree(path, n, "l")
    return path


def ws_cli(args, *words):
    """`strata WORDS` (snapshot, branch); its output."""
    cmd = [args.strata, *words]
    ok, out = run_cmd(cmd, MOUNT_TIMEOUT)
    if not ok:
        raise TargetFailed(f"`{' '.join(cmd)}`: {out}")
    return out


def tree_entries(shape):
    top, sub, per = shape
    return 1 + top + top * sub * (1 + per)


def prepare_images(args, root, sizes):
    """Image-workload data under root/img (cached across runs, a marker per
    item): the small tree (distinct small files), the big tree (empty
    files), a directory with one compressible file; each built into its own
    store (so one image's cache can be emptied alone)."""
    base = os.path.join(root, "img")
    os.makedirs(base, exist_ok=True)
    out = {}
    items = [("small", sizes["img_small"]), ("big", sizes["img_big"]),
             ("file", sizes["img_file_mib"])]
    for kind, spec in items:
        name = f"tree-{tree_entries(spec)}" if kind != "file" else f"file-{spec}m"
        src = os.path.join(base, name)
        store = os.path.join(base, f"store-{kind}")
        marker = os.path.join(base, name + ".json")
        want = json.loads(json.dumps({"spec": spec, "layout": IMG_LAYOUT}))  # tuples as lists
        try:
            with open(marker) as f:
                ok = json.load(f) == want and os.path.isdir(src)
        except (OSError, ValueError):
            ok = False
        if not ok:
            log(f"creating {src}")
            t0 = time.monotonic()
            try:
                os.unlink(marker)
            except FileNotFoundError:
                pass
            if kind == "file":
                shutil.rmtree(src, ignore_errors=True)
                os.makedirs(src)
                import base64
                with open(os.path.join(src, "data"), "wb") as f:
                    left = spec << 20
                    while left:   # base64 text: zstd stores it in ~3/4 of the size
                        chunk = base64.b64encode(os.urandom(3 << 18))[:left]
                        f.write(chunk)
                        left -= len(chunk)
            else:
                make_tree(src, spec, content=kind == "small")
            subprocess.run(["sync"], check=False)
            with open(marker, "w") as f:
                json.dump(want, f)
            log(f"{src} created in {time.monotonic() - t0:.1f}s")
        key = dict(want, mtime_ns=os.stat(marker).st_mtime_ns)
        info = ensure_image(args, src, store, name, key, os.path.join(base, name + ".image.json"))
        entries, files, size = tree_stats(src) if kind != "big" else (tree_entries(spec), None, 0)
        out[kind] = {"src": src, "store": store, "image": name, "entries": entries,
                     "bytes": size, "build": info}
    return out


def clear_image_cache(store):
    """Delete the store's decompressed copies (safe with no mount of it: the
    next read writes them again); the directories stay."""
    n = 0
    for d, _, names in os.walk(os.path.join(store, "cache")):
        for name in names:
            os.unlink(os.path.join(d, name))
            n += 1
    return n


# ---------------------------------------------------------------- workloads

def timed(cmd, timeout=WORKLOAD_TIMEOUT, **kw):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout, **kw)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise TargetFailed(f"`{' '.join(cmd)}` exited {p.returncode}: "
                           f"{p.stderr.decode(errors='replace').strip()[:500]}")
    return dt


LS_ENV = dict(os.environ, LC_ALL="C")
# Listings write to this file (on the scratch tmpfs, set by main) instead of
# /dev/null so every timed listing is checked for completeness: a listing
# that comes back short (exit status 0) must fail, not look fast.
LISTING_OUT = None


def timed_listing(cmd, want_lines):
    with open(LISTING_OUT, "wb") as out:
        t0 = time.perf_counter()
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE,
                           timeout=WORKLOAD_TIMEOUT, env=LS_ENV)
        dt = time.perf_counter() - t0
    if p.returncode != 0:
        raise TargetFailed(f"`{' '.join(cmd)}` exited {p.returncode}: "
                           f"{p.stderr.decode(errors='replace').strip()[:500]}")
    with open(LISTING_OUT, "rb") as f:
        lines = f.read().count(b"\n")
    os.unlink(LISTING_OUT)
    if lines != want_lines:
        raise TargetFailed(f"`{' '.join(cmd)}` exited 0 but printed {lines} lines, "
                           f"want {want_lines} (incomplete listing)")
    return dt


def check_ls(mnt, sizes):
    p = subprocess.run(["ls", "-al", os.path.join(mnt, "ls")], capture_output=True,
                       timeout=WORKLOAD_TIMEOUT, env=LS_ENV, text=True)
    lines = p.stdout.splitlines()
    want = sizes["ls_files"] + 3   # "total", ".", ".."
    bad = [l for l in lines[3:] if f" {sizes['file_kib'] * 1024} " not in l]
    if p.returncode != 0 or len(lines) != want or bad:
        raise TargetFailed(f"ls -al {mnt}/ls: rc={p.returncode}, {len(lines)} lines "
                           f"(want {want}), {len(bad)} with wrong size; stderr: {p.stderr[:300]}")


def check_ls100k(mnt, sizes):
    d = os.path.join(mnt, "ls100k")
    p = subprocess.run(["ls", "-al", d], capture_output=True, timeout=WORKLOAD_TIMEOUT,
                       env=LS_ENV, text=True)
    lines = p.stdout.splitlines()
    want = sizes["ls100k_files"] + 3
    if p.returncode != 0 or len(lines) != want:
        raise TargetFailed(f"ls -al {d}: rc={p.returncode}, {len(lines)} lines (want {want}); "
                           f"stderr: {p.stderr[:300]}")


def check_find(mnt, sizes):
    d = os.path.join(mnt, "tree")
    p = subprocess.run(["find", d, "-ls"], capture_output=True, timeout=WORKLOAD_TIMEOUT,
                       env=LS_ENV, text=True)
    lines = p.stdout.splitlines()
    dirs = sum(1 for l in lines if len(l.split()) > 2 and l.split()[2].startswith("d"))
    want_dirs = sizes["tree_dirs"] + 1     # with tree itself
    want = want_dirs + sizes["tree_files"]
    if p.returncode != 0 or len(lines) != want or dirs != want_dirs:
        raise TargetFailed(f"find {d} -ls: rc={p.returncode}, {len(lines)} lines (want {want}), "
                           f"{dirs} directories (want {want_dirs}); stderr: {p.stderr[:300]}")


def check_big(mnt, sizes):
    st = os.stat(os.path.join(mnt, "big"))
    if st.st_size != sizes["big_mib"] << 20:
        raise TargetFailed(f"{mnt}/big has {st.st_size} bytes, want {sizes['big_mib'] << 20}")


def w_ls(mnt, sizes):
    return timed_listing(["ls", "-al", os.path.join(mnt, "ls")], sizes["ls_files"] + 3)


def w_ls100k(mnt, sizes):
    return timed_listing(["ls", "-al", os.path.join(mnt, "ls100k")], sizes["ls100k_files"] + 3)


def w_find(mnt, sizes):
    return timed_listing(["find", os.path.join(mnt, "tree"), "-ls"],
                         sizes["tree_dirs"] + 1 + sizes["tree_files"])


def w_fio(mnt, sizes, jobs):
    """Random 4 KiB reads of big for fio_secs; returns IOPS (all jobs summed).
    --invalidate=0: fio would otherwise drop the page cache of the file it
    opened, which on a FUSE mount is not the cache native reads come from."""
    cmd = ["fio", "--name=r", f"--filename={os.path.join(mnt, 'big')}", "--rw=randread",
           "--bs=4k", f"--size={sizes['big_mib']}M", f"--runtime={sizes['fio_secs']}",
           "--time_based", "--ioengine=psync", f"--numjobs={jobs}", "--group_reporting",
           "--readonly", "--invalidate=0", "--output-format=json"]
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=min(WORKLOAD_TIMEOUT, sizes["fio_secs"] + 120))
    try:
        res = json.loads(p.stdout[p.stdout.index("{"):])
        job = res["jobs"][0]
        iops = float(job["read"]["iops"])
    except (ValueError, KeyError, IndexError, TypeError):
        res, job, iops = None, {}, 0.0
    if p.returncode != 0 or job.get("error") or iops <= 0:
        raise TargetFailed(f"`{' '.join(cmd)}` exited {p.returncode}, "
                           f"error {job.get('error')}, iops {iops}: "
                           f"{(p.stderr or p.stdout).strip()[:500]}")
    return iops


def daemon_pid(args, target, mnt):
    """The FUSE daemon serving mnt: `strata status --json` for strata, else the
    process whose command line has mnt as an argument."""
    mnt = os.path.realpath(mnt)
    if target in STRATA_TARGETS:
        ok, out = run_cmd([args.strata, "status", "--json"], MOUNT_TIMEOUT)
        if ok:
            try:
                for row in json.loads(out):
                    if os.path.realpath(row.get("mountpoint") or "") == mnt and row.get("pid"):
                        return int(row["pid"])
            except (ValueError, TypeError, AttributeError):
                pass
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        if argv and mnt in argv[1:] and os.path.basename(argv[0]) not in ("timeout", "fusermount3"):
            return int(d)
    raise TargetFailed(f"no daemon process found for {mnt}")


def vm_hwm_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise TargetFailed(f"/proc/{pid}/status has no VmHWM")


def w_rss(mnt, sizes, pid):
    """Peak RSS of the daemon after `ls -al ls100k` and `find tree -ls` on a
    fresh mount (both untimed)."""
    w_ls100k(mnt, sizes)
    w_find(mnt, sizes)
    return vm_hwm_mib(pid)


def w_read(mnt, sizes):
    return timed(["dd", f"if={os.path.join(mnt, 'big')}", "of=/dev/null", "bs=1M"])


def w_write(mnt, sizes):
    path = os.path.join(mnt, "wbig")
    dt = timed(["dd", "if=/dev/zero", f"of={path}", "bs=1M",
                f"count={sizes['big_mib']}", "conv=fdatasync"])
    st = os.stat(path)
    os.unlink(path)
    if st.st_size != sizes["big_mib"] << 20:
        raise TargetFailed(f"write: {path} has {st.st_size} bytes after dd")
    return dt


def run_child(argv, prefix=()):
    """`bench.py ARGV` in a child process (killable on a hang), which times
    the work itself; prefix runs it under another command (`strata branch
    exec MNT B --`: in a branch, with the same code as without). Returns
    its JSON output."""
    cmd = list(prefix) + [sys.executable, os.path.abspath(__file__)] + argv
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=WORKLOAD_TIMEOUT)
    if p.returncode != 0:
        raise TargetFailed(f"`{' '.join(cmd)}` exited {p.returncode}: {p.stderr.strip()[-800:]}")
    return json.loads(p.stdout)


def w_small(mnt, sizes, tag, prefix=()):
    return run_child(["--small-child", os.path.join(mnt, f"small-{tag}"),
                      str(sizes["small_files"]), str(sizes["file_kib"] * 1024)], prefix)


def w_stat(d, kind, sizes, prefix=(), again=False):
    """stat of the ls files (kind "ls") or of the small files ("small") in
    d, in a child process; again: only its second pass over them is timed."""
    n = sizes["ls_files" if kind == "ls" else "small_files"]
    return run_child(["--stat-child", d, kind, str(n), str(sizes["file_kib"] * 1024),
                      str(int(again))], prefix)


def w_dd(kind, mnt, sizes, prefix=()):
    """w_write or w_read, run (and timed) in a child process."""
    return run_child(["--dd-child", kind, mnt, str(sizes["big_mib"])], prefix)


def small_child(d, n, size):
    payload = b"x" * size
    names = [os.path.join(d, name) for name in small_names(n)]
    os.mkdir(d)
    res = {}
    t0 = time.perf_counter()
    for p in names:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, payload)
        os.close(fd)
    res["small-create"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in names:
        if os.stat(p).st_size != size:
            raise SystemExit(f"{p}: wrong size after create")
    res["small-stat"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in names:
        fd = os.open(p, os.O_RDONLY)
        data = os.read(fd, size + 1)
        os.close(fd)
        if data != payload:
            raise SystemExit(f"{p}: read {len(data)} bytes, wrong content")
    res["small-read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in names:
        os.unlink(p)
    res["small-unlink"] = time.perf_counter() - t0
    left = os.listdir(d)
    os.rmdir(d)
    if left:
        raise SystemExit(f"{d}: {len(left)} entries left after unlink")
    print(json.dumps(res))


def stat_child(d, kind, n, size, again):
    names = [os.path.join(d, name) for name in {"ls": ls_names, "small": small_names}[kind](n)]
    for _ in range(1 + again):
        t0 = time.perf_counter()
        for p in names:
            if os.stat(p).st_size != size:
                raise SystemExit(f"{p}: wrong size")
    print(json.dumps(time.perf_counter() - t0))


# ---------------------------------------------------------------- driver

def unit(workload):
    return UNITS.get(workload, "s")


class Bench:
    def __init__(self, args, sizes):
        self.args = args
        self.sizes = sizes
        self.samples = []
        self.errors = []
        self.broken = set()          # (fs, target): skipped from then on
        self.skipped = set()         # (fs, target, workload): only that workload skipped
        self.capped_cells = set()
        self.image_info = {}         # fs -> how the SRC image was built
        self.extra = {}              # venv and image data descriptions, for meta

    def record(self, fs, workload, target, rnd, value, warmup=False):
        u = unit(workload)
        sample = {"fs": fs, "workload": workload, "target": target, "round": rnd,
                  "value": round(value, 6), "unit": u, "warmup": warmup}
        if u == "s":
            sample["seconds"] = sample["value"]
        self.samples.append(sample)

    def fail(self, fs, target, workload, err, mounter, only=None):
        """Report a failure and unmount the target. only: the workloads to skip
        for this target from now on; None (and any hang) skips the target."""
        msg = str(err)
        if isinstance(err, subprocess.TimeoutExpired):
            only = None
        log(f"ERROR {fs}/{target}/{workload}: {msg}"
            + (f" (skipping {','.join(only)} for {target})" if only else f" (skipping {target})"))
        self.errors.append({"fs": fs, "target": target, "workload": workload, "error": msg,
                            "skipped": list(only) if only else "all"})
        if target == "native":
            raise RuntimeError(f"native target failed; the benchmark itself is broken: {msg}")
        if only:
            self.skipped.update((fs, target, w) for w in only)
        else:
            self.broken.add((fs, target))
        try:
            if mounter:
                mounter.umount(target)
        except TargetFailed as e:
            self.broken.add((fs, target))
            self.errors.append({"fs": fs, "target": target, "workload": "umount", "error": str(e),
                                "skipped": "all"})

    def capped(self, fs, workloads, target):
        """After 3 runs, stop a cell whose median exceeds --slow-cap seconds
        (timed workloads only)."""
        total, n = 0.0, None
        for w in workloads:
            if unit(w) != "s":
                return False
            xs = [s["value"] for s in self.samples if s["fs"] == fs and s["workload"] == w
                  and s["target"] == target and not s["warmup"]]
            n = len(xs) if n is None else min(n, len(xs))
            total += statistics.median(xs) if xs else 0.0
        if self.args.slow_cap > 0 and n is not None and n >= 3 and total > self.args.slow_cap:
            if (fs, target, workloads[0]) not in self.capped_cells:
                self.capped_cells.add((fs, target, workloads[0]))
                log(f"{fs}/{target}/{workloads[0]}: median {total:.1f}s > {self.args.slow_cap}s, "
                    f"stopping at {n} runs")
            return True
        return False

    def targets(self, fs, only=None, workload=None):
        return [t for t in self.args.targets if (fs, t) not in self.broken
                and (fs, t, workload) not in self.skipped and (only is None or t in only)]

    def run_fs(self, fs, fs_root):
        wl = self.args.workloads
        if any(w in SRC_WORKLOADS for w in wl):
            self.run_src(fs, fs_root)
        other = [w for w in wl if w in PY_WORKLOADS or w in IMAGE_WORKLOADS]
        if other and fs != "disk":
            log(f"{fs}: pyimport and image run on the disk only (data cached there); "
                f"skipping {','.join(other)}")
        elif other:
            if any(w in PY_WORKLOADS for w in wl):
                self.run_pyimport(fs, fs_root)
            if any(w in IMAGE_WORKLOADS for w in wl):
                self.run_image(fs, fs_root)
        ws = [w for w in wl if w in WS_WORKLOADS]
        if ws and fs != "tmpfs":
            log(f"{fs}: workspace runs on the tmpfs only; skipping {','.join(ws)}")
        elif ws:
            self.run_workspace(fs, fs_root)

    def run_src(self, fs, fs_root):
        args, sizes = self.args, self.sizes
        prepare_data(fs_root, sizes)
        image = store = None
        if any(kind(t) == "strata-image" for t in self.targets(fs)):
            store = os.path.join(fs_root, "store")
            try:
                info = ensure_image(args, os.path.join(fs_root, "src"), store, "src",
                                    prepared_key(fs_root), os.path.join(fs_root, "src-image.json"))
                self.image_info[fs] = info
                image = "src"
            except (TargetFailed, OSError, ValueError) as e:
                self.fail(fs, "strata-image", "image build", e, None)
        m = Mounter(args, fs_root, fs, image=image, store=store)
        wl = args.workloads
        errs = (TargetFailed, subprocess.TimeoutExpired, OSError, ValueError)
        try:
            # Correctness check once per target before timing anything; the
            # big listings only when a workload uses them, each on a fresh
            # mount, and their failure only skips the workloads that need them.
            # On the image, big is read once here: its first read decompresses
            # it into the store's cache (measured by the image workloads), so
            # read-cold measures the cached copy.
            for t in self.targets(fs):
                try:
                    mnt = m.mount(t)
                    check_ls(mnt, sizes)
                    check_big(mnt, sizes)
                    if kind(t) == "strata-image":
                        timed(["cat", os.path.join(mnt, "big")], timeout=SETUP_TIMEOUT)
                    m.umount(t)
                except errs as e:
                    self.fail(fs, t, "check", e, m)
            for fn, needs in ((check_ls100k, ("ls100k-cold", "ls100k-warm", "rss")),
                              (check_find, ("find", "rss"))):
                needs = [w for w in needs if w in wl]
                for t in (self.targets(fs) if needs else []):
                    try:
                        fn(m.mount(t), sizes)
                        m.umount(t)
                    except errs as e:
                        self.fail(fs, t, "check-" + fn.__name__[6:], e, m, only=needs)

            # Cold: fresh mount + drop caches before every single measurement.
            # rss: the daemon's peak RSS after an untimed ls100k + find on
            # such a mount (strata targets only).
            cold = (("ls-cold", w_ls), ("ls100k-cold", w_ls100k), ("find", w_find),
                    ("read-cold", w_read), ("rss", None))
            for w, fn in cold:
                if w not in wl:
                    continue
                only = STRATA_TARGETS if w == "rss" else None
                for rnd in range(args.runs):
                    for t in self.targets(fs, only, w):
                        if self.capped(fs, [w], t):
                            continue
                        try:
                            mnt = m.mount(t)
                            drop_caches()
                            if w == "rss":
                                v = w_rss(mnt, sizes, daemon_pid(args, t, mnt))
                            else:
                                v = fn(mnt, sizes)
                            self.record(fs, w, t, rnd, v)
                            m.umount(t)
                        except errs as e:
                            self.fail(fs, t, w, e, m, only=[w])
                log(f"{fs} {w}: done")

            # Warm: one mount per target for the rest; round 0 is a warm-up for
            # listings and dd reads. fio reads a file first read untimed into
            # the page cache (both copies: src and the union's branch). A
            # target that fails one workload is remounted for the next.
            warm_fns = {"ls-warm": w_ls, "ls100k-warm": w_ls100k, "read-warm": w_read,
                        "fio-rand1": lambda mnt, sz: w_fio(mnt, sz, 1),
                        "fio-rand2": lambda mnt, sz: w_fio(mnt, sz, 2), "write": w_write}
            warm = [w for w in warm_fns if w in wl]
            small_wl = [w for w in wl if w.startswith("small-")]

            def ensure_mounted():
                for t in self.targets(fs):
                    if t != "native" and t not in m.active:
                        try:
                            m.mount(t)
                        except TargetFailed as e:
                            self.fail(fs, t, "mount", e, m)
            prewarmed = False
            for w in warm:
                ensure_mounted()
                fn = warm_fns[w]
                first = -1 if w in ("ls-warm", "ls100k-warm", "read-warm") else 0
                if w.startswith("fio-") and not prewarmed:
                    prewarmed = True
                    for f in (os.path.join(m.src, "big"), os.path.join(m.branches[-1], "big")):
                        subprocess.run(["timeout", str(WORKLOAD_TIMEOUT), "dd", f"if={f}",
                                        "of=/dev/null", "bs=1M", "status=none"], check=False)
                for rnd in range(first, args.runs):
                    for t in self.targets(fs, None, w):
                        if self.capped(fs, [w], t):
                            continue
                        try:
                            if w == "write":
                                settle()
                            self.record(fs, w, t, rnd, fn(m.path(t), sizes), warmup=rnd < 0)
                        except errs as e:
                            self.fail(fs, t, w, e, m, only=[w])
                log(f"{fs} {w}: done")
            if small_wl:
                ensure_mounted()
                for rnd in range(args.runs):
                    for t in self.targets(fs, None, small_wl[0]):
                        if self.capped(fs, small_wl, t):
                            continue
                        try:
                            settle()
                            res = w_small(m.path(t), sizes, f"{rnd}")
                            for k, v in res.items():
                                if k in wl:
                                    self.record(fs, k, t, rnd, v)
                        except errs as e:
                            self.fail(fs, t, "small", e, m, only=small_wl)
                log(f"{fs} small: done")
        finally:
            m.umount_all()

    def skips(self, fs, t, w):
        """Whether w is skipped for t (after a failure)."""
        return (fs, t) in self.broken or (fs, t, w) in self.skipped

    def attempt(self, fs, w, t, rnd, fn, mounter=None, warmup=False):
        """Record fn()'s value for (w, t); a failure skips w for t from then on."""
        if self.skips(fs, t, w):
            return None
        try:
            v = fn()
            self.record(fs, w, t, rnd, v, warmup=warmup)
            return v
        except (TargetFailed, subprocess.TimeoutExpired, OSError, ValueError) as e:
            self.fail(fs, t, w, e, mounter, only=[w])
            return None

    def run_pyimport(self, fs, fs_root):
        """Import PY_MODULES with the venv's python, the venv served by each
        target: cold (fresh mount, caches dropped), first (strata-image with
        its cache emptied: every file decompressed again; native cold) and
        warm."""
        args, sizes = self.args, self.sizes
        wl = [w for w in args.workloads if w in PY_WORKLOADS]
        try:
            venv, info = prepare_venv(fs_root)
        except (subprocess.SubprocessError, OSError) as e:
            log(f"ERROR: venv setup failed: {e}")
            self.errors.append({"fs": fs, "target": "native", "workload": "pyimport setup",
                                "error": str(e), "skipped": wl})
            return
        modules = info["modules"]
        sizes["py_modules"] = ", ".join(m for m in modules)
        entries, files, size = tree_stats(venv)
        self.extra["venv"] = {"path": venv, "entries": entries, "files": files, "bytes": size,
                              "modules": modules, "packages": info["packages"],
                              "fallback": info["fallback"],
                              "python": info["want"]["python"], "version": info["want"]["version"]}
        image = store = None
        if "strata-image" in self.targets(fs):
            store = os.path.join(fs_root, "py", "store")
            try:
                key = {"venv": info["want"],
                       "mtime_ns": os.stat(os.path.join(fs_root, "py", "venv.json")).st_mtime_ns}
                self.extra["venv"]["image"] = ensure_image(
                    args, venv, store, "venv", key, os.path.join(fs_root, "py", "venv-image.json"))
                image = "venv"
            except (TargetFailed, OSError, ValueError) as e:
                self.fail(fs, "strata-image", "pyimport image build", e, None, only=wl)
        m = Mounter(args, fs_root, fs, src=venv, image=image, store=store, tag="py")
        env = clean_env()
        stamp = os.path.join(fs_root, "py", "stamp")

        def py_cmd(mnt, extra=""):
            return [os.path.join(mnt, "bin", "python"), "-c", extra + "import " + ", ".join(modules)]

        def tgts(w):
            ts = self.targets(fs, PY_TARGETS, w)
            if "strata-image" in ts and (fs, "strata-image-ro", w) not in self.skipped \
                    and (fs, "strata-image-ro") not in self.broken:
                ts.append("strata-image-ro")
            return ts

        def check(t):
            """The venv at the mount is the one in use (sys.prefix) and the
            import writes nothing (no .pyc in the venv, nothing in an upper)."""
            mnt = m.mount(t)
            with open(stamp, "w"):
                pass
            t_stamp = os.stat(stamp).st_mtime_ns
            p = subprocess.run(py_cmd(mnt, "import sys; print(sys.prefix); "), capture_output=True,
                               text=True, timeout=WORKLOAD_TIMEOUT, env=env)
            if p.returncode != 0 or p.stdout.strip() != mnt:
                raise TargetFailed(f"`{' '.join(py_cmd(mnt))}` exited {p.returncode}, sys.prefix "
                                   f"{p.stdout.strip()!r} (want {mnt!r}): {p.stderr.strip()[-400:]}")
            if t in OVERLAY_TARGETS:
                written = [os.path.join(d, n) for d, ds, ns in os.walk(m.upper(t)) for n in ds + ns]
            else:
                written = [os.path.join(d, n) for d, _, ns in os.walk(venv) for n in ns
                           if n.endswith(".pyc") and os.lstat(os.path.join(d, n)).st_mtime_ns > t_stamp]
            if written:
                raise TargetFailed(f"the import wrote {len(written)} files (e.g. {written[0]}), "
                                   "so runs would not be comparable")
            m.umount(t)

        try:
            for t in tgts(wl[0]):
                try:
                    check(t)
                except (TargetFailed, subprocess.TimeoutExpired, OSError, ValueError) as e:
                    self.fail(fs, t, "pyimport check", e, m, only=wl)

            def cold(t):
                mnt = m.mount(t)
                drop_caches()
                v = timed(py_cmd(mnt), env=env)
                m.umount(t)
                return v

            if "pyimport-cold" in wl:
                for rnd in range(args.runs):
                    for t in tgts("pyimport-cold"):
                        self.attempt(fs, "pyimport-cold", t, rnd, lambda t=t: cold(t), m)
                log(f"{fs} pyimport-cold: done")

            if "pyimport-first" in wl:
                for rnd in range(args.runs):
                    for t in tgts("pyimport-first"):
                        if t not in ("native", "strata-image", "strata-image-ro"):
                            continue
                        def first(t=t):
                            if t != "native":
                                m.umount(t)
                                clear_image_cache(store)
                            return cold(t)
                        self.attempt(fs, "pyimport-first", t, rnd, first, m)
                log(f"{fs} pyimport-first: done")

            if "pyimport-warm" in wl:
                for t in tgts("pyimport-warm"):
                    try:
                        m.mount(t)
                    except TargetFailed as e:
                        self.fail(fs, t, "pyimport-warm", e, m, only=["pyimport-warm"])
                for rnd in range(-1, args.runs):
                    for t in tgts("pyimport-warm"):
                        self.attempt(fs, "pyimport-warm", t, rnd,
                                     lambda t=t: timed(py_cmd(m.path(t)), env=env), m,
                                     warmup=rnd < 0)
                log(f"{fs} pyimport-warm: done")
        finally:
            m.umount_all()

    def run_image(self, fs, fs_root):
        """strata image build vs cp -a of the venv; image mount time vs cp -a
        of a tree; first vs later reads of an image file; find and daemon RSS
        over the big image. Samples are recorded as native (the baseline of
        each row) and strata-image."""
        args, sizes = self.args, self.sizes
        wl = [w for w in args.workloads if w in IMAGE_WORKLOADS]
        N, T = "native", "strata-image"
        try:
            venv, vinfo = prepare_venv(fs_root)
            data = prepare_images(args, fs_root, sizes)
        except (TargetFailed, subprocess.SubprocessError, OSError, ValueError) as e:
            log(f"ERROR: image data setup failed: {e}")
            self.errors.append({"fs": fs, "target": T, "workload": "image setup",
                                "error": str(e), "skipped": wl})
            return
        v_entries, v_files, v_bytes = tree_stats(venv)
        sizes.update(venv_entries=v_entries, venv_files=v_files, venv_mib=v_bytes / 2**20,
                     small_entries=data["small"]["entries"], big_entries=data["big"]["entries"],
                     small_mib=data["small"]["bytes"] / 2**20, file_mib=sizes["img_file_mib"])
        self.extra["image"] = {"venv": {"entries": v_entries, "files": v_files, "bytes": v_bytes},
                               **{k: {kk: vv for kk, vv in d.items()} for k, d in data.items()}}
        base = os.path.join(fs_root, "img")
        copy = os.path.join(base, "copy")
        build_store = os.path.join(base, "store-build")
        ms = {k: Mounter(args, fs_root, fs, src=d["src"], image=d["image"], store=d["store"],
                         tag=f"img-{k}") for k, d in data.items()}

        def rm(path):
            if os.path.lexists(path):
                subprocess.run(["rm", "-rf", path], check=True, timeout=SETUP_TIMEOUT)

        def cp_tree(src, cold=True):
            rm(copy)
            settle()
            if cold:
                drop_caches()
            return timed(["cp", "-a", src, copy], timeout=SETUP_TIMEOUT)

        def cold_mount(k, cold=True):
            m = ms[k]
            m.umount(T)
            settle()
            if cold:
                drop_caches()
            m.mount(T)
            if m.last_mount_waited:
                log(f"warning: `strata mount` of image {data[k]['image']} returned before the "
                    "mount was in the mount table")
            return m.last_mount_secs

        try:
            # Checks: every image mounts and lists what its source holds.
            for k in ("small", "file"):
                try:
                    mnt = ms[k].mount(T)
                    got = tree_stats(mnt)
                    want = tree_stats(data[k]["src"])
                    ms[k].umount(T)
                    if got != want:
                        raise TargetFailed(f"image {data[k]['image']} mounted: (entries, files, "
                                           f"bytes) {got}, source {want}")
                except (TargetFailed, subprocess.TimeoutExpired, OSError) as e:
                    self.fail(fs, T, f"image check {k}", e, ms[k],
                              only=[w for w in wl if (k == "small" and w.startswith("image-mount-small"))
                                    or (k == "file" and w.startswith("image-read-"))]
                              or [f"image-check-{k}"])

            for rnd in range(args.runs):
                if "image-build" in wl or "image-rebuild" in wl:
                    def native_build():
                        v = cp_tree(venv)
                        v += timed(["sync", "-f", copy])
                        rm(copy)
                        return v

                    def strata_build():
                        rm(build_store)
                        settle()
                        drop_caches()
                        return timed([args.strata, "image", "build", venv, "--name", "venv",
                                      "--store", build_store], timeout=SETUP_TIMEOUT)

                    def strata_rebuild():
                        settle()
                        drop_caches()
                        return timed([args.strata, "image", "build", venv, "--name", "venv",
                                      "--replace", "--store", build_store], timeout=SETUP_TIMEOUT)
                    if "image-build" in wl:
                        self.attempt(fs, "image-build", N, rnd, native_build)
                        self.attempt(fs, "image-build", T, rnd, strata_build)
                    else:
                        strata_build()        # what the rebuild finds in the store
                    if "image-rebuild" in wl:
                        self.attempt(fs, "image-rebuild", T, rnd, strata_rebuild)
                    rm(build_store)

                for w, k, cold in (("image-mount-small", "small", True),
                                   ("image-mount-small-warm", "small", False),
                                   ("image-mount-big", "big", True)):
                    if w not in wl:
                        continue
                    def native_cp(k=k, cold=cold):
                        v = cp_tree(data[k]["src"], cold)
                        rm(copy)
                        return v
                    self.attempt(fs, w, N, rnd, native_cp)
                    self.attempt(fs, w, T, rnd, lambda k=k, cold=cold: cold_mount(k, cold), ms[k])
                    ms[k].umount(T)

                if any(w in wl for w in ("image-read-first", "image-read-cold", "image-read-warm")):
                    m = ms["file"]
                    path = os.path.join(data["file"]["src"], "data")
                    RO = "strata-image-ro"      # reference: the image without an upper

                    def native_cold():
                        settle()
                        drop_caches()
                        return timed(["cat", path])

                    def strata_first(t):
                        m.umount(t)
                        clear_image_cache(data["file"]["store"])
                        settle()
                        drop_caches()
                        m.mount(t)
                        v = timed(["cat", os.path.join(m.path(t), "data")])
                        m.umount(t)
                        return v

                    def strata_cold(t):
                        m.umount(t)
                        settle()
                        drop_caches()
                        m.mount(t)
                        v = timed(["cat", os.path.join(m.path(t), "data")])
                        m.umount(t)
                        return v

                    def strata_warm(t):
                        mpath = os.path.join(m.path(t), "data")
                        if t not in m.active:       # mount and read once, untimed
                            m.mount(t)
                            timed(["cat", mpath])
                        return timed(["cat", mpath])
                    if "image-read-first" in wl:
                        self.attempt(fs, "image-read-first", N, rnd, native_cold)
                        for t in (T, RO):
                            self.attempt(fs, "image-read-first", t, rnd, lambda t=t: strata_first(t), m)
                    if "image-read-cold" in wl:
                        self.attempt(fs, "image-read-cold", N, rnd, native_cold)
                        for t in (T, RO):
                            self.attempt(fs, "image-read-cold", t, rnd, lambda t=t: strata_cold(t), m)
                    if "image-read-warm" in wl:
                        timed(["cat", path])                      # warm-up, untimed
                        self.attempt(fs, "image-read-warm", N, rnd, lambda: timed(["cat", path]))
                        for t in (T, RO):
                            self.attempt(fs, "image-read-warm", t, rnd, lambda t=t: strata_warm(t), m)
                    m.umount_all()

                if "image-find-big" in wl or "image-rss-big" in wl:
                    m = ms["big"]
                    want = data["big"]["entries"]

                    def native_find():
                        settle()
                        drop_caches()
                        return timed_listing(["find", data["big"]["src"], "-ls"], want)

                    def strata_find(t):
                        """Timed find on a fresh cold mount, then the daemon's VmHWM."""
                        m.umount(t)
                        settle()
                        drop_caches()
                        mnt = m.mount(t)
                        v = timed_listing(["find", mnt, "-ls"], want)
                        hwm = vm_hwm_mib(daemon_pid(args, t, mnt))
                        m.umount(t)
                        return v, hwm
                    if "image-find-big" in wl:
                        self.attempt(fs, "image-find-big", N, rnd, native_find)
                    big_wl = [w for w in ("image-find-big", "image-rss-big") if w in wl]
                    # For reference: the same tree as a host directory, served by
                    # strata and by strata's overlay (empty upper).
                    for t in [T] + [t for t in FIND_BIG_REFS if t in args.targets]:
                        if (fs, t) in self.broken or (fs, t, big_wl[0]) in self.skipped:
                            continue
                        try:
                            v, hwm = strata_find(t)
                            if "image-find-big" in wl:
                                self.record(fs, "image-find-big", t, rnd, v)
                            if "image-rss-big" in wl:
                                self.record(fs, "image-rss-big", t, rnd, hwm)
                        except (TargetFailed, subprocess.TimeoutExpired, OSError, ValueError) as e:
                            self.fail(fs, t, big_wl[0], e, m, only=big_wl)
                log(f"{fs} image round {rnd + 1}/{args.runs}: done")
        finally:
            for m in ms.values():
                m.umount_all()
            rm(build_store)
            rm(copy)

    def run_workspace(self, fs, fs_root):
        """Snapshots and branches, on workspaces of their own over data made
        afresh under FS_ROOT/ws (bound vs unbound: over SRC). A sample's
        target is the variant measured (files-N, depth-1, unbound, ...). Each
        part runs whole when any of its workloads is selected: its setup is
        what takes the time."""
        wl = self.args.workloads
        if any(w in WS_BOUND for w in wl):
            prepare_data(fs_root, self.sizes)   # first: remaking the data empties FS_ROOT/ovl
        base = os.path.join(fs_root, "ws")
        shutil.rmtree(base, ignore_errors=True)
        os.makedirs(base)
        for part, ws in ((self.ws_create, WS_CREATE), (self.ws_depth, WS_DEPTH),
                         (self.ws_bound, WS_BOUND), (self.ws_rss, ["ws-rss"])):
            if any(w in wl for w in ws):
                part(fs, fs_root, base)
                log(f"{fs} {part.__name__}: done")

    def ws_mounter(self, fs, fs_root, src, tag):
        """A workspace over src (None: SRC): strata-overlay with an upper of
        its own, empty at first and kept across mounts."""
        m = Mounter(self.args, fs_root, fs, src=src, tag=tag, keep_upper=True)
        shutil.rmtree(m.upper(WS_T), ignore_errors=True)
        os.makedirs(m.upper(WS_T))
        return m

    def ws_create(self, fs, fs_root, base):
        """snapshot create on a fresh mount (the daemon knows no node) and
        after `find -ls` (it knows every node), then branch create from that
        snapshot; lower and upper hold N files each, and every mount starts
        from a copy of the N-file upper (a snapshot empties the live layer)."""
        args = self.args
        ms = {n: Mounter(args, fs_root, fs, src=ws_lower(base, n), tag=f"ws-files-{n}",
                         keep_upper=True) for n in self.sizes["ws_files"]}
        for n in ms:
            ws_tree(os.path.join(base, f"upper-{n}"), n, "u")

        def fresh(n):
            m = ms[n]
            m.umount(WS_T)
            shutil.rmtree(m.upper(WS_T), ignore_errors=True)
            os.makedirs(os.path.dirname(m.upper(WS_T)), exist_ok=True)
            cmd = ["cp", "-a", os.path.join(base, f"upper-{n}"), m.upper(WS_T)]
            ok, out = run_cmd(cmd, SETUP_TIMEOUT)
            if not ok:
                raise TargetFailed(f"`{' '.join(cmd)}`: {out}")
            return m.mount(WS_T)

        def ms_of(cmd):
            return timed([args.strata] + cmd) * 1000

        def snapshot_fresh(n):
            mnt = fresh(n)
            return ms_of(["snapshot", "create", mnt, "--name", "s"])

        try:
            for rnd in range(args.runs):
                for n in ms:
                    t = f"files-{n}"
                    self.attempt(fs, "ws-snapshot-fresh", t, rnd, lambda: snapshot_fresh(n))
                    if self.skips(fs, t, "ws-snapshot"):
                        continue
                    try:
                        mnt = fresh(n)
                        timed_listing(["find", mnt, "-ls"], 1 + ws_tree_dirs(n) + 2 * n)
                    except (TargetFailed, subprocess.TimeoutExpired, OSError) as e:
                        self.fail(fs, t, "ws-snapshot setup", e, None, only=WS_CREATE[1:])
                        continue
                    if self.attempt(fs, "ws-snapshot", t, rnd,
                                    lambda: ms_of(["snapshot", "create", mnt, "--name", "s"])):
                        self.attempt(fs, "ws-branch", t, rnd, lambda: ms_of(
                            ["branch", "create", mnt, "--from", "s", "--name", "b"]))
        finally:
            for m in ms.values():
                m.umount_all()

    def ws_depth(self, fs, fs_root, base):
        """stat of the small files and `ls -al` of the ls files through a
        workspace after 1 snapshot and after ws_snapshots of them, cold and
        warm; native: the lower."""
        args, sizes = self.args, self.sizes
        lower = os.path.join(base, "depth-lower")
        names = {"ls": ls_names(sizes["ls_files"]), "stat": small_names(sizes["small_files"])}
        payload = ls_payload(sizes)
        for d, ns in names.items():
            os.makedirs(os.path.join(lower, d))
            for name in ns:
                with open(os.path.join(lower, d, name), "wb") as f:
                    f.write(payload)
        ms = {t: self.ws_mounter(fs, fs_root, lower, f"ws-{t}") for t in ("depth-1", "depth-n")}
        k = sizes["ws_snapshots"]
        try:
            # Each step changes 3 files of each directory (so every frozen
            # layer holds both, and a lookup there probes them all); the
            # 1-snapshot workspace gets the same changes, snapshotted once.
            for t, m in ms.items():
                try:
                    mnt = m.mount(WS_T)
                    for i in range(k):
                        for d, ns in names.items():
                            for j in range(3):
                                with open(os.path.join(mnt, d, ns[(3 * i + j) % len(ns)]),
                                          "r+b") as f:
                                    f.write(b"#")
                        if t == "depth-n" or i == k - 1:
                            ws_cli(args, "snapshot", "create", mnt, "--name", f"s{i}")
                except (TargetFailed, OSError) as e:
                    self.fail(fs, t, "ws-depth setup", e, None, only=WS_DEPTH)

            def path(t):
                return lower if t == "native" else ms[t].path(WS_T)

            def cold(t, fn):
                if t != "native":
                    ms[t].umount(WS_T)
                    ms[t].mount(WS_T)
                drop_caches()
                return fn(path(t), sizes)

            def warm(t, fn):
                if t != "native" and WS_T not in ms[t].active:
                    ms[t].mount(WS_T)
                return fn(path(t), sizes)

            fns = {"stat": lambda p, sz: w_stat(os.path.join(p, "stat"), "small", sz),
                   "ls": w_ls}
            for rnd in range(args.runs):
                for kind, fn in fns.items():
                    for t in ["native"] + list(ms):
                        self.attempt(fs, f"ws-{kind}-cold", t, rnd, lambda t=t, fn=fn: cold(t, fn))
            for rnd in range(-1, args.runs):
                for kind, fn in fns.items():
                    for t in ["native"] + list(ms):
                        self.attempt(fs, f"ws-{kind}-warm", t, rnd, lambda t=t, fn=fn: warm(t, fn),
                                     warmup=rnd < 0)
        finally:
            for m in ms.values():
                m.umount_all()

    def ws_bound(self, fs, fs_root, base):
        """dd and small files through two workspaces over SRC made alike (a
        snapshot, branch b made from it): unbound, where no process is ever
        bound (the mount shows main), and bound, where every access comes
        from a process under `strata branch exec MNT b`; native: SRC. All
        three run the same child, which times the work. Not one mount for
        both: a root name looked up by a caller of the other branch replaces
        the kernel's dentry, and everything cached below it goes."""
        args, sizes = self.args, self.sizes
        ms = {t: self.ws_mounter(fs, fs_root, None, f"ws-{t}") for t in ("unbound", "bound")}
        targets = ("native",) + tuple(ms)
        path = {t: m.path(WS_T) for t, m in ms.items()}
        path["native"] = ms["unbound"].src
        prefix = {"native": (), "unbound": (),
                  "bound": (args.strata, "branch", "exec", path["bound"], "b", "--")}

        def mounted(t):
            if t != "native" and WS_T not in ms[t].active:
                ms[t].mount(WS_T)

        def read_cold(t):
            if t != "native":
                ms[t].umount(WS_T)
                ms[t].mount(WS_T)
            drop_caches()
            # The bound child starts with `strata branch exec`, which reads
            # the binary the daemon runs back into the page cache: the
            # others get it too, or their daemon pages its code in from
            # the disk while it serves the read.
            with open(args.strata, "rb") as f:
                while f.read(1 << 20):
                    pass
            return w_dd("read", path[t], sizes, prefix[t])

        def dd(t, kind):
            mounted(t)
            if kind == "write":
                settle()
            return w_dd(kind, path[t], sizes, prefix[t])

        def stat(t):
            """The second pass in the process is timed: binding it
            invalidated the root's names (docs/ARCHITECTURE.md), and with
            them the kernel dropped all it had cached below, so only the
            second pass shows what each path walk costs."""
            mounted(t)
            return w_stat(os.path.join(path[t], "ls"), "ls", sizes, prefix[t], again=True)

        try:
            for t, m in ms.items():
                try:
                    mnt = m.mount(WS_T)
                    ws_cli(args, "snapshot", "create", mnt, "--name", "base")
                    ws_cli(args, "branch", "create", mnt, "--from", "base", "--name", "b")
                except TargetFailed as e:
                    self.fail(fs, t, "ws-bound setup", e, None, only=WS_BOUND)
            for rnd in range(args.runs):
                for t in targets:
                    self.attempt(fs, "ws-read-cold", t, rnd, lambda t=t: read_cold(t))
            for w, fn, first in (("ws-read-warm", lambda t: dd(t, "read"), -1),
                                 ("ws-stat", stat, 0), ("ws-write", lambda t: dd(t, "write"), 0)):
                for rnd in range(first, args.runs):
                    for t in targets:
                        self.attempt(fs, w, t, rnd, lambda t=t: fn(t), warmup=rnd < 0)
            for rnd in range(args.runs):
                for t in targets:
                    if self.skips(fs, t, WS_SMALL[0]):
                        continue
                    try:
                        mounted(t)
                        settle()
                        for k, v in w_small(path[t], sizes, f"{rnd}", prefix[t]).items():
                            self.record(fs, f"ws-{k}", t, rnd, v)
                    except (TargetFailed, subprocess.TimeoutExpired, OSError, ValueError) as e:
                        self.fail(fs, t, "ws-small", e, None, only=WS_SMALL)
        finally:
            for m in ms.values():
                m.umount_all()

    def ws_rss(self, fs, fs_root, base):
        """The daemon's VmHWM after `find -ls` of the largest N-file lower
        through 1 branch and through WS_RSS_BRANCHES (each by a `branch exec`
        of its own), fresh mount, caches dropped."""
        args = self.args
        n = self.sizes["ws_files"][-1]
        m = self.ws_mounter(fs, fs_root, ws_lower(base, n), "ws-rss")
        mnt = m.path(WS_T)
        branches = [f"r{i}" for i in range(WS_RSS_BRANCHES)]

        def hwm(k):
            m.umount(WS_T)
            m.mount(WS_T)
            drop_caches()
            for b in branches[:k]:
                timed_listing([args.strata, "branch", "exec", mnt, b, "--", "find", mnt, "-ls"],
                              1 + ws_tree_dirs(n) + n)
            return vm_hwm_mib(daemon_pid(args, WS_T, mnt))

        try:
            try:
                m.mount(WS_T)
                ws_cli(args, "snapshot", "create", mnt, "--name", "base")
                for b in branches:
                    ws_cli(args, "branch", "create", mnt, "--from", "base", "--name", b)
            except TargetFailed as e:
                for k in (1, WS_RSS_BRANCHES):
                    self.fail(fs, f"branches-{k}", "ws-rss setup", e, None, only=["ws-rss"])
                return
            for rnd in range(args.runs):
                for k in (1, WS_RSS_BRANCHES):
                    self.attempt(fs, "ws-rss", f"branches-{k}", rnd, lambda k=k: hwm(k))
        finally:
            m.umount_all()

    def ws_ref(self, t):
        """The workspace variant t is compared with: the smallest tree for
        files-N, else WS_REF_OF's."""
        if t.startswith("files-"):
            return f"files-{self.sizes['ws_files'][0]}"
        return WS_REF_OF.get(t)

    def summary(self):
        """Per fs and workload: median/min/max/n per target; ratio = target /
        native (native / target for IOPS), so >1 means slower than native;
        vs_single = the same for a union target against its single-directory
        counterpart (strata-union3 / strata); vs_ref for a workspace variant
        against the one it is compared with (ws_ref)."""
        def slower(w, x, base):
            if not base or not x:
                return None
            return base / x if w in HIGHER_BETTER else x / base

        out = {}
        targets = ALL_TARGETS + list(BASE_OF) + EXTRA_TARGETS   # image rows also have strata-image
        targets += [t for t in dict.fromkeys(s["target"] for s in self.samples)
                    if t not in targets]                         # the workspace variants
        for fs in self.args.fs:
            out[fs] = {}
            for w in self.args.workloads:
                rows = {}
                for t in targets:
                    xs = [s["value"] for s in self.samples if s["fs"] == fs and
                          s["workload"] == w and s["target"] == t and not s["warmup"]]
                    if xs:
                        rows[t] = {"median": statistics.median(xs), "n": len(xs),
                                   "min": min(xs), "max": max(xs), "unit": unit(w)}
                nat = rows.get("native", {}).get("median")
                for t, r in rows.items():
                    r["ratio"] = slower(w, r["median"], nat)
                    if t in UNION_OF and UNION_OF[t] in rows:
                        r["vs_single"] = slower(w, r["median"], rows[UNION_OF[t]]["median"])
                    ref = self.ws_ref(t) if w in WS_WORKLOADS else None
                    if ref in rows and ref != t:
                        r["vs_ref"] = slower(w, r["median"], rows[ref]["median"])
                if rows:
                    out[fs][w] = rows
        return out


def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True,
                              timeout=30).stdout.strip()
    except subprocess.TimeoutExpired:
        return "?"


def machine(args, fs_roots):
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2").strip()
    fstypes = {fs: sh(f"findmnt -n -o FSTYPE,SOURCE,OPTIONS -T {root}") for fs, root in fs_roots.items()}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {
        "hostname": platform.node(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_gib": round(mem_kib / 1048576, 1),
        "kernel": platform.release(),
        "filesystems": fstypes,
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "strata_git": sh(f"git -C {repo} describe --always --dirty"),
        "versions": {
            "strata": sh(f"{args.strata} --version"),
            "mergerfs": sh("mergerfs --version 2>&1 | head -1"),
            "bindfs": sh("bindfs --version 2>&1 | head -1"),
            "fuse-overlayfs": sh("fuse-overlayfs --version 2>&1 | grep -m1 fuse-overlayfs"),
            "fusermount3": sh("fusermount3 --version 2>&1 | head -1"),
            "fio": sh("fio --version 2>&1 | head -1"),
        },
    }


LABELS = {
    "ls-cold": "`ls -al` {ls_files} files, cold (fresh mount, caches dropped)",
    "ls-warm": "`ls -al` {ls_files} files, warm",
    "write": "dd write {big_mib} MiB, `conv=fdatasync`",
    "read-cold": "dd read {big_mib} MiB, cold",
    "read-warm": "dd read {big_mib} MiB, warm",
    "small-create": "create {small_files} x {file_kib} KiB files",
    "small-stat": "stat {small_files} files",
    "small-read": "read {small_files} files",
    "small-unlink": "unlink {small_files} files",
    "ls100k-cold": "`ls -al` {ls100k_files} empty files, cold",
    "ls100k-warm": "`ls -al` {ls100k_files} empty files, warm",
    "find": "`find -ls` {tree_files} files in {tree_dirs} dirs, cold",
    "fio-rand1": "fio randread 4 KiB, 1 job, {fio_secs} s: **IOPS** (ratio native/target)",
    "fio-rand2": "fio randread 4 KiB, 2 jobs, {fio_secs} s: **IOPS** (ratio native/target)",
    "rss": "daemon peak RSS (VmHWM) after cold `ls -al` {ls100k_files} + `find` {tree_files}: **MiB**",
    "pyimport-cold": "`python -c 'import {py_modules}'` from the venv, cold (fresh mount, caches dropped)",
    "pyimport-warm": "`python -c 'import {py_modules}'` from the venv, warm",
    "pyimport-first": "`python -c 'import {py_modules}'`, first use of the image: its cache "
                      "emptied, cold (native: cold again)",
}
# image workloads: (what strata does, what the native baseline does)
IMAGE_LABELS = {
    "image-build": ("`strata image build` of the venv ({venv_entries} entries, {venv_files} files, "
                    "{venv_mib:.0f} MiB) into an empty store, cold; {build_rate}",
                    "`cp -a` of the venv + `sync -f`, cold"),
    "image-rebuild": ("`strata image build --replace` of the venv again, every blob already "
                      "stored, cold", None),
    "image-mount-small": ("`strata mount image:` of {small_entries} entries (small files, "
                          "{small_mib:.0f} MiB) `--upper` (empty), cold, until ready",
                          "`cp -a` of the tree, cold"),
    "image-mount-small-warm": ("the same, warm: the strata binary and the manifest in the page "
                               "cache (a cold start mostly loads the binary from the disk)",
                               "`cp -a` of the tree, warm"),
    "image-mount-big": ("`strata mount image:` of {big_entries:,} entries (empty files) "
                        "`--upper`, cold, until ready", "`cp -a` of the tree, cold"),
    "image-read-first": ("`cat` {file_mib} MiB file, first read: image cache emptied, fresh "
                         "mount, caches dropped (decompressed into the cache)", "`cat`, caches dropped"),
    "image-read-cold": ("`cat` {file_mib} MiB file, cached copy exists, fresh mount, caches dropped",
                        "`cat`, caches dropped"),
    "image-read-warm": ("`cat` {file_mib} MiB file again on the same mount", "`cat` again"),
    "image-find-big": ("`find -ls` of the {big_entries:,}-entry image, fresh mount, caches dropped",
                       "`find -ls` of the source tree, caches dropped"),
    "image-rss-big": ("daemon peak RSS (VmHWM) after that `find`: **MiB**", None),
}

WS_LABELS = {
    "ws-snapshot-fresh": "snapshot create, fresh mount",
    "ws-snapshot": "snapshot create after `find -ls`",
    "ws-branch": "branch create",
    "ws-stat-cold": "`stat` {small_files} files, cold (fresh mount, caches dropped)",
    "ws-stat-warm": "`stat` {small_files} files, warm",
    "ws-ls-cold": LABELS["ls-cold"],
    "ws-ls-warm": LABELS["ls-warm"],
    "ws-stat": "`stat` {ls_files} files (the ls directory) again, in the same process",
    **{w: LABELS[w[len("ws-"):]] for w in WS_BOUND if w != "ws-stat"},
    "ws-rss": "daemon VmHWM",
}


def fmt_secs(x):
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    if x >= 0.1:
        return f"{x:.3f}"
    return f"{x:.4f}"


def fmt_value(w, x):
    u = unit(w)
    if u == "ms":
        return f"{x:.1f}" if x >= 10 else f"{x:.2f}"
    if u == "IOPS":
        return f"{x:,.0f}"
    if u == "MiB":
        return f"{x:.1f}"
    return fmt_secs(x)


def markdown(meta, summary, errors, args, sizes, charts=()):
    L = []
    L.append("# strata benchmarks\n")
    L.append(f"Date: {meta['date']}  ")
    L.append(f"Command: `{meta['command']}`  ")
    L.append(f"Mode: {meta['mode']}, {args.runs} measured runs per (workload, target), "
             "interleaved; warm `ls`/`dd read` after one discarded warm-up round"
             + (f"; a cell whose median exceeds {args.slow_cap:g} s stops after 3 runs (n shown)"
                if args.slow_cap > 0 else "") + ".  ")
    L.append(f"strata: {meta['machine']['versions']['strata']} (git {meta['machine']['strata_git']})"
             + (f", options `{','.join(args.strata_opts)}`" if args.strata_opts else ", default options"))
    L.append("")
    mc = meta["machine"]
    L.append("## Machine\n")
    L.append(f"- {mc['nproc']} CPUs ({mc['cpu']}), {mc['mem_gib']} GiB RAM, kernel {mc['kernel']}")
    for fs, desc in mc["filesystems"].items():
        L.append(f"- {fs} data: `{desc}`")
    L.append(f"- load average at start {' '.join(mc['loadavg_start'])}, at end {' '.join(meta['loadavg_end'])}")
    v = mc["versions"]
    L.append(f"- peers: {v['mergerfs']}; {v['bindfs']}; {v['fuse-overlayfs']}; {v['fusermount3']}"
             + (f"; {v['fio']}" if v.get("fio") and any(w.startswith("fio-") for w in args.workloads) else ""))
    L.append("")
    L.append("## Targets\n")
    so = f" `-o {','.join(args.strata_opts)}`" if args.strata_opts else ""
    sopts = ",".join([STRATA_UNION_OPTS] + args.strata_opts)
    desc = {
        "native": "the source directory itself (for the overlay targets too: what they read "
                  "is SRC or an image of it, and a write into SRC is what a write into their "
                  "upper on the same filesystem compares with)",
        "strata": "`strata mount SRC MNT`" + so + " (every strata target takes requests "
                  "through per-CPU io_uring queues: bench/run sets the fuse module's "
                  "`enable_uring` for the run)",
        "strata-devfuse": "`strata mount -o uring=false SRC MNT`" + so + ": requests through "
                          "/dev/fuse, as before FUSE over io_uring",
        "mergerfs": f"`mergerfs -o {MERGERFS_OPTS} SRC MNT` (minfreespace=0: the default 4G is "
                    "more than the tmpfs ever has free, so every create would fail with ENOSPC)",
        "bindfs": "`bindfs SRC MNT`",
        "fuse-overlayfs": "`fuse-overlayfs -o lowerdir=SRC,upperdir=UP,workdir=WK MNT`, a fresh "
                          "empty UP per mount (reads come from the lower dir, writes land in the "
                          "upper dir on the same filesystem)",
        "strata-overlay": "`strata mount SRC --upper UP MNT`" + so + ", a fresh empty UP per "
                          "mount on the same filesystem (as fuse-overlayfs)",
        "strata-image": "`strata mount image:NAME --upper UP -o store=STORE MNT`" + so + ": SRC "
                        "built into an image (`strata image build SRC --name NAME`, store on the "
                        "same filesystem, untimed, once per data set), a fresh empty UP per "
                        "mount; the image's `big` is read once untimed before timing, so its "
                        "first-read decompression (measured by the image workloads) is not "
                        "in the dd reads",
        "strata-union3": f"`strata mount B1:B2:B3 MNT -o {sopts}`; B1..B3 hold the files of SRC "
                         "dealt round-robin, every directory on all three, `big` on B3; native "
                         "(SRC) stays the baseline. strata watches every branch, so unions get "
                         "the same hour-long timeouts as a single directory (mergerfs: 1 s)",
        "mergerfs-union3": f"`mergerfs -o {MERGERFS_OPTS} B1:B2:B3 MNT`",
        "strata-image-ro": "`strata mount image:NAME -o store=STORE MNT` (read-only, no upper: "
                           "image files by kernel passthrough to their cache copy); not a "
                           "selectable target, measured next to strata-image by pyimport and "
                           "the image reads, for reference",
    }
    shown = list(args.targets)
    if "strata-image" in args.targets and any(
            w in PY_WORKLOADS or w.startswith("image-read-") for w in args.workloads):
        shown += EXTRA_TARGETS
    for t in shown:
        if t in BASE_OF:
            L.append(f"- {t}: as {BASE_OF[t]}, run by a build of {args.baseline_rev} "
                     "(the code before the change measured here)")
        else:
            L.append(f"- {t}: {desc[t]}")
    if any(w in PY_WORKLOADS for w in args.workloads):
        vx = meta.get("data", {}).get("venv", {})
        L.append(f"- pyimport (disk only): SRC is a venv (`python3 -m venv`, "
                 + (f"`pip install {' '.join(PY_PACKAGES)}` from PyPI"
                    if not vx.get("fallback") else
                    f"**pip could not install {' '.join(PY_PACKAGES)}: only the venv's own pip "
                    f"and setuptools**")
                 + f"; {vx.get('entries', '?')} entries, {vx.get('files', '?')} files, "
                 f"{vx.get('bytes', 0) / 2**20:.0f} MiB; python {vx.get('version', '?')}), every "
                 "module precompiled (`python -m compileall`) before the image is built, and each "
                 "target is checked once to import from the mount (`sys.prefix`) without writing "
                 "a `.pyc` (nothing in the venv, nothing in an upper); strata-image mounts the "
                 "venv built into an image; packages: "
                 + ", ".join(vx.get("packages", [])))
    L.append("")
    L.append("Cells: median wall seconds, and the ratio to native's median from the same run. "
             "`ls`, `find` and `dd` times include spawning the process (~1 ms); listings are "
             "written to a file on the scratch tmpfs and a listing with missing lines fails; "
             "small-file phases are timed "
             "inside one Python process. Cold = fresh mount and `echo 3 > /proc/sys/vm/drop_caches` "
             "before each measurement (on tmpfs the data itself cannot be dropped). Warm = same mount, "
             "after a warm-up pass; measurements of one target are seconds apart, so the 1 s "
             "entry/attr timeouts of mergerfs (and of strata when it cannot watch the source) have "
             "expired and names are revalidated; strata, run as root, watches the source (every "
             "branch of a union) and uses hour-long timeouts."
             + (" fio: random 4 KiB `psync` reads of the big file, time-based, file already in the "
                "page cache (`--invalidate=0`); cells are median IOPS, **higher is better**, and the "
                "ratio is native/target so that >1 still means slower than native."
                if any(w.startswith("fio-") for w in args.workloads) else "")
             + (" rss: VmHWM of the daemon (`/proc/PID/status`) on a fresh mount after `ls -al` of "
                "the ls100k directory and `find -ls` of the tree (untimed), in MiB; strata targets "
                "only (n/a elsewhere; native has no daemon, so no ratio)."
                if "rss" in args.workloads else "")
             + (" pyimport: wall time of the venv's python from exec to exit (interpreter start "
                "included; the interpreter itself and the standard library are outside the venv, "
                "the same files for every target); cold drops the caches of those too."
                if any(w in PY_WORKLOADS for w in args.workloads) else "") + "\n")
    for fs in args.fs:
        if fs not in summary or not any(w in summary[fs] for w in args.workloads
                                        if w not in OWN_TABLE):
            L += image_table(fs, summary.get(fs, {}), errors, args, sizes)
            L += workspace_table(fs, summary.get(fs, {}), errors, args, sizes)
            L += chart_link(fs, charts)
            continue
        cols = args.targets + [t for t in EXTRA_TARGETS if any(
            t in summary[fs].get(w, {}) for w in args.workloads if w not in OWN_TABLE)]
        L.append(f"## {fs}\n")
        L.append("| workload | " + " | ".join(cols) + " |")
        L.append("|---|" + "---:|" * len(cols))
        for w in args.workloads:
            if w in OWN_TABLE:
                continue
            rows = summary[fs].get(w)
            if not rows:
                continue
            cells = []
            for t in cols:
                r = rows.get(t)
                if not r:
                    if (w == "rss" and t not in STRATA_TARGETS) or \
                            (w == "pyimport-first" and not t.startswith("strata-image")) or \
                            (w in SRC_WORKLOADS and t in EXTRA_TARGETS):
                        cells.append("n/a")
                    else:
                        cells.append("failed" if any(
                            e["fs"] == fs and e["target"] == t and
                            (e.get("skipped") == "all" or w in e.get("skipped", []))
                            for e in errors) else "-")
                elif t == "native":
                    cells.append(fmt_value(w, r["median"]))
                else:
                    ratio = f" ({r['ratio']:.2f}x)" if r["ratio"] else ""
                    nn = f" n={r['n']}" if r["n"] < args.runs else ""
                    failed = any(e["fs"] == fs and e["target"] == t and
                                 (e.get("skipped") == "all" or w in e.get("skipped", []))
                                 for e in errors)
                    cells.append(fmt_value(w, r["median"]) + ratio + nn
                                 + (", then failed" if failed else ""))
            L.append(f"| {LABELS[w].format(**sizes)} | " + " | ".join(cells) + " |")
        L.append("")
        L += chart_link(fs, charts)
        L += union_table(fs, summary[fs], args, sizes)
        L += image_table(fs, summary[fs], errors, args, sizes)
        L += workspace_table(fs, summary[fs], errors, args, sizes)
    if errors:
        L.append("## Errors\n")
        for e in errors:
            sk = e.get("skipped", "all")
            scope = (f"{e['target']} skipped from then on" if sk == "all"
                     else f"skipped {', '.join(sk)} for {e['target']}")
            L.append(f"- {e['fs']}/{e['target']}/{e['workload']} ({scope}): {e['error']}")
        L.append("")
    return "\n".join(L)


def chart_link(fs, charts):
    """The fs's chart, drawn next to the markdown by make_charts."""
    return [f"![{fs} ratios](benchmarks-{fs}.svg)", ""] if fs in charts else []


def make_charts(chart_bin, json_path, out_dir):
    """Draws out_dir/benchmarks-<fs>.svg from the results with
    strata-bench-chart; returns the fs that got one. Optional: a missing or
    failing binary is a warning, the tables are the results."""
    if not chart_bin or not os.access(chart_bin, os.X_OK):
        log(f"warning: no chart: {chart_bin or 'strata-bench-chart'} not built")
        return set()
    try:
        p = subprocess.run([chart_bin, json_path, out_dir], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        log(f"warning: no chart: {e}")
        return set()
    if p.returncode != 0:
        log(f"warning: no chart: {p.stderr.strip() or f'exit status {p.returncode}'}")
        return set()
    # It prints the path of each SVG it wrote: benchmarks-<fs>.svg.
    names = [os.path.basename(line) for line in p.stdout.splitlines()]
    return {n[len("benchmarks-"):-len(".svg")] for n in names
            if n.startswith("benchmarks-") and n.endswith(".svg")}


def image_table(fs, rows_by_w, errors, args, sizes):
    """Image workloads: strata (image build, image mount, reads of an image
    file, find over the big image) against the native operation named in the
    baseline column, measured in the same rounds."""
    ws = [w for w in args.workloads if w in IMAGE_WORKLOADS and w in rows_by_w]
    if not ws:
        return []
    L = [f"## {fs}: images\n",
         "Each row: strata's operation, the native baseline in the same rounds, their medians "
         "and strata / native (>1: strata slower). Cold = `echo 3 > /proc/sys/vm/drop_caches` "
         "first (and, for a mount, a fresh one). Image mounts have an empty `--upper`.\n",
         "| workload (strata) | native baseline | native | strata | strata / native |",
         "|---|---|---:|---:|---:|"]
    for w in ws:
        rows = rows_by_w[w]
        nat, st = rows.get("native"), rows.get("strata-image")
        fmt = dict(sizes)
        fmt["build_rate"] = ""
        if w == "image-build" and st:
            fmt["build_rate"] = (f"{sizes['venv_files'] / st['median']:,.0f} files/s, "
                                 f"{sizes['venv_mib'] / st['median']:.1f} MiB/s")
        label, base = IMAGE_LABELS[w]
        failed = any(e["fs"] == fs and e["target"] == "strata-image" and
                     (e.get("skipped") == "all" or w in e.get("skipped", [])) for e in errors)

        def cell(r):
            if not r:
                return "failed" if failed else "-"
            return fmt_value(w, r["median"]) + (f" n={r['n']}" if r["n"] < args.runs else "")
        ratio = (f"{st['median'] / nat['median']:.2f}x" if st and nat and nat["median"] else "")
        L.append(f"| {label.format(**fmt)} | {base or 'n/a'} | {cell(nat) if base else 'n/a'} | "
                 f"{cell(st)} | {ratio} |")
    L.append("")
    refs = []
    parts = []
    for w in ("image-read-first", "image-read-cold", "image-read-warm"):
        r = rows_by_w.get(w, {}).get("strata-image-ro")
        nat = rows_by_w.get(w, {}).get("native")
        if r:
            parts.append(f"{w[len('image-read-'):]} {fmt_value(w, r['median'])} s"
                         + (f" ({r['median'] / nat['median']:.2f}x native)" if nat else "")
                         + (f" n={r['n']}" if r["n"] < args.runs else ""))
    if parts:
        L += ["The same reads on a read-only mount of the image (`strata mount image:NAME MNT`, "
              "no upper: kernel passthrough to the cache copy), same rounds: "
              + ", ".join(parts) + ".", ""]
    for t in FIND_BIG_REFS:
        parts = []
        for w in ("image-find-big", "image-rss-big"):
            r = rows_by_w.get(w, {}).get(t)
            if r:
                nat = rows_by_w[w].get("native")
                parts.append(("`find -ls` " if w == "image-find-big" else "VmHWM ")
                             + f"{fmt_value(w, r['median'])} {'s' if unit(w) == 's' else 'MiB'}"
                             + (f" ({r['median'] / nat['median']:.2f}x native)" if nat else "")
                             + (f" n={r['n']}" if r["n"] < args.runs else ""))
        if parts:
            how = "`strata mount TREE MNT`" if t == "strata" else "`strata mount TREE --upper EMPTY MNT`"
            refs.append(f"- {t} ({how}): {', '.join(parts)}")
    if refs:
        L += [f"The big tree as a host directory instead of an image (same rounds, fresh mount, "
              "caches dropped):\n"] + refs + [""]
    return L


def workspace_table(fs, rows_by_w, errors, args, sizes):
    """Snapshots and branches: a table per measurement (create times against
    the tree's size, depth, bound vs unbound, memory per branch served)."""
    ws = [w for w in args.workloads if w in WS_WORKLOADS and w in rows_by_w]
    if not ws:
        return []

    def cell(w, t):
        r = rows_by_w.get(w, {}).get(t)
        if not r:
            return "failed" if any(e["fs"] == fs and e["target"] == t and
                                   (e.get("skipped") == "all" or w in e.get("skipped", []))
                                   for e in errors) else "-"
        ratio = f" ({r['ratio']:.2f}x)" if r["ratio"] and t != "native" else ""
        return fmt_value(w, r["median"]) + ratio + (f" n={r['n']}" if r["n"] < args.runs else "")

    def vs(w, t):
        x = rows_by_w.get(w, {}).get(t, {}).get("vs_ref")
        return f"{x:.2f}x" if x else "-"

    def table(head, targets, part):
        return ([head, "|---|" + "---:|" * (len(targets) + 1)]
                + [f"| {WS_LABELS[w].format(**sizes)} | " + " | ".join(cell(w, t) for t in targets)
                   + f" | {vs(w, targets[-1])} |" for w in part if w in ws] + [""])

    L = [f"## {fs}: workspaces (snapshots and branches)\n"]
    create = [w for w in WS_CREATE if w in ws]
    if create:
        first, last = sizes["ws_files"][0], sizes["ws_files"][-1]
        L += ["`strata snapshot create` and `strata branch create`: wall time of the command, "
              "**ms**, on a workspace whose lower and upper each hold N empty files (1,000 per "
              "directory, every directory in both), mounted afresh over a copy of that upper: a "
              "snapshot on the fresh mount (the daemon knows no node), and one after `find -ls` "
              "of the tree (it knows all of them), then a branch made from that snapshot. O(1) "
              f"is flat across N; the last row is N = {last:,} against N = {first:,}.\n",
              "| N (lower + upper) | " + " | ".join(WS_LABELS[w] for w in create) + " |",
              "|---:|" + "---:|" * len(create)]
        L += [f"| {n:,} + {n:,} | " + " | ".join(cell(w, f"files-{n}") for w in create) + " |"
              for n in sizes["ws_files"]]
        L += [f"| {last:,} / {first:,} | " + " | ".join(vs(w, f"files-{last}") for w in create)
              + " |", ""]
    if any(w in ws for w in WS_DEPTH):
        L += [f"Depth: a workspace over a lower holding the `ls` directory ({sizes['ls_files']} x "
              f"{sizes['file_kib']} KiB) and a `stat` directory ({sizes['small_files']} x "
              f"{sizes['file_kib']} KiB); {sizes['ws_snapshots']} times, 3 files in each "
              "directory changed (a byte written: copied up), then `strata snapshot create`; "
              "the 1-snapshot workspace had the same changes and one snapshot at the end. "
              "native: the lower. In parentheses: against native; last column: the deep "
              "workspace against the 1-snapshot one.\n"]
        k = sizes["ws_snapshots"]
        L += table(f"| workload | native | 1 snapshot | {k} snapshots | {k} / 1 |",
                   ["native", "depth-1", "depth-n"], WS_DEPTH)
    if any(w in ws for w in WS_BOUND):
        L += ["Bound vs unbound: two workspaces over SRC made alike (a snapshot, branch `b` "
              "made from it). unbound: no process is ever bound on the one (it shows main); "
              "bound: every access to the other comes from the same child process run under "
              "`strata branch exec MNT b --` (while a process is bound, the kernel caches "
              "neither the root's attributes nor its names: every absolute path walk asks the "
              "daemon for both, which the second `stat` pass shows; and each `branch exec` "
              "binds anew, which invalidates the root's names, and with them the kernel drops "
              "all it cached below: a warm read in a new bound process reads through the "
              "daemon again); native: SRC. The child (`bench.py --dd-child` / `--stat-child` / "
              "`--small-child`) times the work itself, so starting it is not in the time. In "
              "parentheses: against native; last column: bound / unbound.\n"]
        L += table("| workload | native | unbound | bound | bound / unbound |",
                   ["native", "unbound", "bound"], WS_BOUND)
    if "ws-rss" in ws:
        n = sizes["ws_files"][-1]
        L += [f"Daemon peak RSS (VmHWM), **MiB**, after `find -ls` of {n:,} files in "
              f"{ws_tree_dirs(n):,} directories (the lower of the N = {n:,} workspace, an empty "
              f"upper) through 1 branch and through {WS_RSS_BRANCHES}, each by a `strata branch "
              "exec` of its own (branches made from one snapshot), fresh mount, caches dropped.\n"]
        L += table(f"| | 1 branch | {WS_RSS_BRANCHES} branches | {WS_RSS_BRANCHES} / 1 |",
                   ["branches-1", f"branches-{WS_RSS_BRANCHES}"], ["ws-rss"])
    return L


def union_table(fs, rows_by_w, args, sizes):
    """Union vs single directory: the issue's criterion is strata-union3
    within 1.3x of strata."""
    pairs = [(u, b) for u, b in UNION_OF.items() if u in args.targets and b in args.targets]
    lines = []
    for w in args.workloads:
        rows = rows_by_w.get(w, {})
        cells = []
        for u, b in pairs:
            r, base = rows.get(u), rows.get(b)
            if r and base and r.get("vs_single"):
                x = r["vs_single"]
                mark = " ✗" if u == "strata-union3" and x > 1.3 else ""
                cells += [fmt_value(w, base["median"]), fmt_value(w, r["median"]), f"{x:.2f}x{mark}"]
            else:
                cells += ["-", "-", "-"]
        if any(c != "-" for c in cells):
            lines.append(f"| {LABELS[w].format(**sizes)} | " + " | ".join(cells) + " |")
    if not lines:
        return []
    head = "| workload | " + " | ".join(f"{b} | {u} | {u} / {b}" for u, b in pairs) + " |"
    return ([f"### {fs}: 3-branch union vs single directory\n",
             "Ratio = union / single directory (single / union for IOPS), so >1 means the union "
             "is slower; the target is strata-union3 within 1.3x of strata (✗ marks a miss).\n",
             head, "|---|" + "---:|" * (3 * len(pairs))] + lines + [""])


def parse_list(s, allowed, what, groups=None):
    out = []
    for item in s.split(","):
        item = item.strip()
        if not item:
            continue
        names = (groups or {}).get(item, [item])
        for n in names:
            if n not in allowed:
                raise SystemExit(f"unknown {what} '{item}' (choose from {', '.join(allowed + list(groups or {}))})")
            if n not in out:
                out.append(n)
    return out


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "--small-child":
        small_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    if len(sys.argv) == 7 and sys.argv[1] == "--stat-child":
        stat_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
        return 0
    if len(sys.argv) == 5 and sys.argv[1] == "--dd-child":
        fn = {"write": w_write, "read": w_read}[sys.argv[2]]
        print(json.dumps(fn(sys.argv[3], {"big_mib": int(sys.argv[4])})))
        return 0
    env = os.environ.get
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", default=env("BENCH_QUICK", "") not in ("", "0"),
                    help="smoke test: 3 runs, 500 ls files, 64 MiB dd, 500 small files, "
                    "10,000 files for ls100k, 5,000 files in 200 dirs for find, 3 s fio "
                    "(env BENCH_QUICK=1)")
    ap.add_argument("--runs", type=int, default=int(env("BENCH_RUNS", "0")),
                    help="measured runs per (workload, target); default 5, quick 3 (env BENCH_RUNS)")
    ap.add_argument("--targets", default=env("BENCH_TARGETS", ",".join(ALL_TARGETS)),
                    help="comma list of " + ",".join(ALL_TARGETS) + " (env BENCH_TARGETS)")
    ap.add_argument("--workloads", default=env("BENCH_WORKLOADS", DEFAULT_WORKLOADS),
                    help="comma list of groups " + ",".join(GROUPS) + " or names " +
                    ",".join(ALL_WORKLOADS) + f"; default {DEFAULT_WORKLOADS} "
                    "(env BENCH_WORKLOADS)")
    ap.add_argument("--fs", default=env("BENCH_FS", ",".join(ALL_FS)),
                    help="comma list of tmpfs,disk (env BENCH_FS)")
    ap.add_argument("--strata-opts", default=env("BENCH_STRATA_OPTS", ""),
                    help="extra -o options for strata and strata-union3, e.g. threads=4 "
                    "(env BENCH_STRATA_OPTS)")
    ap.add_argument("--slow-cap", type=float, default=float(env("BENCH_SLOW_CAP", "0")),
                    help="stop a (workload, target) after 3 runs when its median exceeds this "
                    "many seconds, to keep slow peers (bindfs writes: ~20 s each) from dominating "
                    "the runtime; 0 = off, the default (env BENCH_SLOW_CAP)")
    ap.add_argument("--ws-files", default=env("BENCH_WS_FILES", ""),
                    help="workspace: comma list of N, the files in both the lower and the upper "
                    "of the workspaces timing snapshot and branch create (the largest is also "
                    "the tree of ws-rss); default 1000,10000,100000, quick 1000,5000 "
                    "(env BENCH_WS_FILES)")
    ap.add_argument("--ws-snapshots", type=int, default=int(env("BENCH_WS_SNAPSHOTS", "0")),
                    help="workspace: snapshots of the deep workspace (depth-n); default 100, "
                    "quick 10 (env BENCH_WS_SNAPSHOTS)")
    ap.add_argument("--strata", required=True, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", default="", help=argparse.SUPPRESS)   # built by bench/run
    ap.add_argument("--baseline-rev", default="", help=argparse.SUPPRESS)
    ap.add_argument("--tmpfs-root", required=True, help=argparse.SUPPRESS)
    ap.add_argument("--disk-root", required=True, help=argparse.SUPPRESS)
    ap.add_argument("--mnt-base", required=True, help=argparse.SUPPRESS)
    ap.add_argument("--out", required=True, help=argparse.SUPPRESS)
    ap.add_argument("--chart", default="", help=argparse.SUPPRESS)   # strata-bench-chart
    args = ap.parse_args()

    mode = "quick" if args.quick else "full"
    sizes = dict(SIZES[mode])
    args.runs = args.runs or sizes["runs"]
    sizes["runs"] = args.runs
    sizes["tree_dirs"] = sizes["tree_top"] * (1 + sizes["tree_sub"])
    sizes["tree_files"] = sizes["tree_dirs"] * sizes["tree_per_dir"]
    if args.ws_files:
        sizes["ws_files"] = sorted({int(n) for n in args.ws_files.split(",")})
    sizes["ws_snapshots"] = args.ws_snapshots or sizes["ws_snapshots"]
    args.targets = parse_list(args.targets,
                              ALL_TARGETS + (list(BASE_OF) if args.baseline else []), "target")
    if "native" not in args.targets:
        args.targets.insert(0, "native")    # ratios need it
    args.workloads = [w for w in ALL_WORKLOADS
                      if w in parse_list(args.workloads, ALL_WORKLOADS, "workload", GROUPS)]
    args.fs = parse_list(args.fs, ALL_FS, "fs")
    args.strata_opts = [o for o in args.strata_opts.split(",") if o]

    # SIGINT/SIGTERM -> KeyboardInterrupt so the finally blocks unmount (SIGINT
    # explicitly, as it is inherited as ignored when started in the background).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    def on_term(*_):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_term)

    fs_roots = {"tmpfs": args.tmpfs_root, "disk": args.disk_root}
    global LISTING_OUT
    LISTING_OUT = os.path.join(args.tmpfs_root, "listing.out")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"results-{stamp}.json")
    md_path = os.path.join(args.out, "BENCHMARKS.md")
    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": env("BENCH_CMDLINE", "bench/run"), "mode": mode, "sizes": sizes,
            "targets": args.targets, "workloads": args.workloads, "fs": args.fs,
            "strata_opts": args.strata_opts,
            "machine": machine(args, {fs: fs_roots[fs] for fs in args.fs})}
    log(f"mode {mode}: runs={args.runs} targets={','.join(args.targets)} "
        f"workloads={','.join(args.workloads)} fs={','.join(args.fs)}")
    bench = Bench(args, sizes)
    t_start = time.monotonic()
    status = 0

    def save(final, last=False):
        meta["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        meta["elapsed_secs"] = round(time.monotonic() - t_start, 1)
        meta["complete"] = final
        summary = bench.summary()
        meta["data"] = bench.extra
        meta["src_images"] = bench.image_info
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "summary": summary, "errors": bench.errors,
                       "samples": bench.samples}, f, indent=1)
        # Charts once, from the last save: the partial saves only keep the tables current.
        charts = make_charts(args.chart, json_path, args.out) if last else set()
        with open(md_path, "w") as f:
            f.write(markdown(meta, summary, bench.errors, args, sizes, charts))
        return summary

    try:
        for fs in args.fs:
            os.makedirs(fs_roots[fs], exist_ok=True)
            bench.run_fs(fs, fs_roots[fs])
            save(False)
    except KeyboardInterrupt:
        log("interrupted; partial results saved")
        status = 130
    finally:
        save(status == 0, last=True)
    log(f"results: {json_path}")
    log(f"markdown: {md_path} ({meta['elapsed_secs']} s)")
    if status == 0:
        print(open(md_path).read())
    if bench.errors:
        log(f"{len(bench.errors)} error(s); see the Errors section")
        status = status or 3
    return status


if __name__ == "__main__":
    sys.exit(main())
