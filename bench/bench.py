#!/usr/bin/env python3
"""strata benchmark driver: run by bench/run, which builds strata, installs the
peer filesystems, mounts the scratch tmpfs and unmounts everything on exit.

Workloads are measured against several targets over the same source data:
  native          the source directory itself
  strata          `strata mount SRC MNT` (default options, plus --strata-opts)
  mergerfs        single branch, cache.files=off,category.create=ff,minfreespace=0
  bindfs          `bindfs SRC MNT`
  fuse-overlayfs  lowerdir=SRC, a fresh upperdir/workdir (writes land in upper)
  strata-union3   `strata mount B1:B2:B3 MNT -o category.create=ff,minfreespace=0`
  mergerfs-union3 mergerfs over the same 3 branches, options as mergerfs

The union branches hold the same files as SRC, dealt round-robin (every
directory exists on all three), so listings really merge; native stays the
baseline for them too.

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
import statistics
import subprocess
import sys
import time

ALL_TARGETS = ["native", "strata", "mergerfs", "bindfs", "fuse-overlayfs",
               "strata-union3", "mergerfs-union3"]
STRATA_TARGETS = {"strata", "strata-union3"}
# A union target -> the single-directory target it is compared with.
UNION_OF = {"strata-union3": "strata", "mergerfs-union3": "mergerfs"}
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
}
ALL_WORKLOADS = ["ls-cold", "ls-warm", "ls100k-cold", "ls100k-warm", "find",
                 "write", "read-cold", "read-warm", "fio-rand1", "fio-rand2",
                 "small-create", "small-stat", "small-read", "small-unlink", "rss"]
GROUPS["all"] = list(ALL_WORKLOADS)
DEFAULT_WORKLOADS = "ls,dd,small"
# Units other than wall seconds; IOPS is the one where higher is better.
UNITS = {"fio-rand1": "IOPS", "fio-rand2": "IOPS", "rss": "MiB"}
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
             "fio_secs": 10, "runs": 5},
    "quick": {"ls_files": 500, "file_kib": 1, "big_mib": 64, "small_files": 500,
              "ls100k_files": 10000, "tree_top": 10, "tree_sub": 19, "tree_per_dir": 25,
              "fio_secs": 3, "runs": 3},
}
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
    def __init__(self, args, fs_root, fs_name):
        self.args = args
        self.src = os.path.join(fs_root, "src")
        self.branches = branch_dirs(fs_root)
        self.fs_root = fs_root
        self.mnt_base = os.path.join(args.mnt_base, fs_name)
        self.active = {}   # target -> mountpoint

    def path(self, target):
        return self.src if target == "native" else os.path.join(self.mnt_base, target)

    def mount(self, target):
        if target == "native":
            return self.src
        mnt = self.path(target)
        os.makedirs(mnt, exist_ok=True)
        if is_mounted(mnt):
            self.umount(target, mnt)
        if target in STRATA_TARGETS:
            cmd = [self.args.strata, "mount"]
            if target == "strata-union3":
                cmd += ["-o", STRATA_UNION_OPTS]
            for o in self.args.strata_opts:
                cmd += ["-o", o]
            cmd += [self.src if target == "strata" else ":".join(self.branches), mnt]
        elif target == "mergerfs":
            cmd = ["mergerfs", "-o", MERGERFS_OPTS, self.src, mnt]
        elif target == "mergerfs-union3":
            cmd = ["mergerfs", "-o", MERGERFS_OPTS, ":".join(self.branches), mnt]
        elif target == "bindfs":
            cmd = ["bindfs", self.src, mnt]
        elif target == "fuse-overlayfs":
            up = os.path.join(self.fs_root, "ovl", "upper")
            wk = os.path.join(self.fs_root, "ovl", "work")
            for d in (up, wk):   # start every mount from an empty upper layer
                shutil.rmtree(d, ignore_errors=True)
                os.makedirs(d)
            cmd = ["fuse-overlayfs", "-o", f"lowerdir={self.src},upperdir={up},workdir={wk}", mnt]
        else:
            raise ValueError(target)
        ok, out = run_cmd(cmd, MOUNT_TIMEOUT)
        deadline = time.monotonic() + 10
        while ok and not is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.02)
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
    payload = (b"strata-bench-0123456789abcdef\n" * 64)[: sizes["file_kib"] * 1024]
    for i in range(sizes["ls_files"]):
        mkfile(os.path.join("ls", f"file-{i:05d}.dat"), payload)
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


# ---------------------------------------------------------------- workloads

def timed(cmd, **kw):
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=WORKLOAD_TIMEOUT, **kw)
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


def w_small(mnt, sizes, tag):
    """Runs in a child process (killable on a hang); timing is inside it."""
    d = os.path.join(mnt, f"small-{tag}")
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--small-child", d,
                        str(sizes["small_files"]), str(sizes["file_kib"] * 1024)],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=WORKLOAD_TIMEOUT)
    if p.returncode != 0:
        raise TargetFailed(f"small files in {d}: {p.stderr.strip()[-800:]}")
    return json.loads(p.stdout)


def small_child(d, n, size):
    payload = b"x" * size
    names = [os.path.join(d, f"s{i:05d}") for i in range(n)]
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
        args, sizes = self.args, self.sizes
        prepare_data(fs_root, sizes)
        m = Mounter(args, fs_root, fs)
        wl = args.workloads
        errs = (TargetFailed, subprocess.TimeoutExpired, OSError, ValueError)
        try:
            # Correctness check once per target before timing anything; the
            # big listings only when a workload uses them, each on a fresh
            # mount, and their failure only skips the workloads that need them.
            for t in self.targets(fs):
                try:
                    mnt = m.mount(t)
                    check_ls(mnt, sizes)
                    check_big(mnt, sizes)
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

    def summary(self):
        """Per fs and workload: median/min/max/n per target; ratio = target /
        native (native / target for IOPS), so >1 means slower than native;
        vs_single = the same for a union target against its single-directory
        counterpart (strata-union3 / strata)."""
        def slower(w, x, base):
            if not base or not x:
                return None
            return base / x if w in HIGHER_BETTER else x / base

        out = {}
        for fs in self.args.fs:
            out[fs] = {}
            for w in self.args.workloads:
                rows = {}
                for t in self.args.targets:
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
    if u == "IOPS":
        return f"{x:,.0f}"
    if u == "MiB":
        return f"{x:.1f}"
    return fmt_secs(x)


def markdown(meta, summary, errors, args, sizes):
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
    L.append("- native: the source directory itself")
    L.append("- strata: `strata mount SRC MNT`" + (f" `-o {','.join(args.strata_opts)}`" if args.strata_opts else ""))
    L.append(f"- mergerfs: `mergerfs -o {MERGERFS_OPTS} SRC MNT` (minfreespace=0: the "
             "default 4G is more than the 4G tmpfs ever has free, so every create would fail with ENOSPC)")
    L.append("- bindfs: `bindfs SRC MNT`")
    L.append("- fuse-overlayfs: `fuse-overlayfs -o lowerdir=SRC,upperdir=UP,workdir=WK MNT` "
             "(reads come from the lower dir, writes land in the upper dir on the same filesystem)")
    sopts = ",".join([STRATA_UNION_OPTS] + args.strata_opts)
    L.append(f"- strata-union3: `strata mount B1:B2:B3 MNT -o {sopts}`; B1..B3 hold the files of SRC "
             "dealt round-robin, every directory on all three, `big` on B3; native (SRC) stays the "
             "baseline. strata watches every branch, so unions get the same hour-long timeouts as a "
             "single directory (mergerfs: 1 s)")
    L.append(f"- mergerfs-union3: `mergerfs -o {MERGERFS_OPTS} B1:B2:B3 MNT`")
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
                if "rss" in args.workloads else "") + "\n")
    for fs in args.fs:
        if fs not in summary:
            continue
        L.append(f"## {fs}\n")
        L.append("| workload | " + " | ".join(args.targets) + " |")
        L.append("|---|" + "---:|" * len(args.targets))
        for w in args.workloads:
            rows = summary[fs].get(w)
            if not rows:
                continue
            cells = []
            for t in args.targets:
                r = rows.get(t)
                if not r:
                    if w == "rss" and t not in STRATA_TARGETS:
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
        L += union_table(fs, summary[fs], args, sizes)
    if errors:
        L.append("## Errors\n")
        for e in errors:
            sk = e.get("skipped", "all")
            scope = (f"{e['target']} skipped from then on" if sk == "all"
                     else f"skipped {', '.join(sk)} for {e['target']}")
            L.append(f"- {e['fs']}/{e['target']}/{e['workload']} ({scope}): {e['error']}")
        L.append("")
    return "\n".join(L)


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
    ap.add_argument("--strata", required=True, help=argparse.SUPPRESS)
    ap.add_argument("--tmpfs-root", required=True, help=argparse.SUPPRESS)
    ap.add_argument("--disk-root", required=True, help=argparse.SUPPRESS)
    ap.add_argument("--mnt-base", required=True, help=argparse.SUPPRESS)
    ap.add_argument("--out", required=True, help=argparse.SUPPRESS)
    args = ap.parse_args()

    mode = "quick" if args.quick else "full"
    sizes = dict(SIZES[mode])
    args.runs = args.runs or sizes["runs"]
    sizes["runs"] = args.runs
    sizes["tree_dirs"] = sizes["tree_top"] * (1 + sizes["tree_sub"])
    sizes["tree_files"] = sizes["tree_dirs"] * sizes["tree_per_dir"]
    args.targets = parse_list(args.targets, ALL_TARGETS, "target")
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

    def save(final):
        meta["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        meta["elapsed_secs"] = round(time.monotonic() - t_start, 1)
        meta["complete"] = final
        summary = bench.summary()
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "summary": summary, "errors": bench.errors,
                       "samples": bench.samples}, f, indent=1)
        with open(md_path, "w") as f:
            f.write(markdown(meta, summary, bench.errors, args, sizes))
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
        save(status == 0)
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
