#!/usr/bin/env python3
"""strata benchmark driver: run by bench/run, which builds strata, installs the
peer filesystems, mounts the scratch tmpfs and unmounts everything on exit.

Workloads are measured against several targets over the same source data:
  native          the source directory itself
  strata          `strata mount SRC MNT` (default options, plus --strata-opts)
  mergerfs        single branch, cache.files=off,category.create=ff,minfreespace=0
  bindfs          `bindfs SRC MNT`
  fuse-overlayfs  lowerdir=SRC, a fresh upperdir/workdir (writes land in upper)

Runs are interleaved (A B C A B C ...); per (fs, workload, target) the median
wall time is reported with its ratio to native's median from the same run.
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

ALL_TARGETS = ["native", "strata", "mergerfs", "bindfs", "fuse-overlayfs"]
ALL_FS = ["tmpfs", "disk"]
# Workload groups accepted by --workloads, and the measurements they produce.
GROUPS = {
    "ls": ["ls-cold", "ls-warm"],
    "read": ["read-cold", "read-warm"],
    "write": ["write"],
    "dd": ["write", "read-cold", "read-warm"],
    "small": ["small-create", "small-stat", "small-read", "small-unlink"],
}
ALL_WORKLOADS = ["ls-cold", "ls-warm", "write", "read-cold", "read-warm",
                 "small-create", "small-stat", "small-read", "small-unlink"]

# minfreespace=0: mergerfs 2.33's default of 4G exceeds the 3G tmpfs, and its
# create policies then fail every create with ENOSPC.
MERGERFS_OPTS = "cache.files=off,category.create=ff,minfreespace=0"
MOUNT_TIMEOUT = 30          # `timeout 30` on every mount/umount command
WORKLOAD_TIMEOUT = 300      # a single measurement that takes longer is a hang

SIZES = {
    "full": {"ls_files": 3537, "file_kib": 1, "big_mib": 1024, "small_files": 5000, "runs": 5},
    "quick": {"ls_files": 500, "file_kib": 1, "big_mib": 64, "small_files": 500, "runs": 3},
}


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
        if target == "strata":
            cmd = [self.args.strata, "mount"]
            for o in self.args.strata_opts:
                cmd += ["-o", o]
            cmd += [self.src, mnt]
        elif target == "mergerfs":
            cmd = ["mergerfs", "-o", MERGERFS_OPTS, self.src, mnt]
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
        if target == "strata":
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

def prepare_data(fs_root, sizes):
    """Create src/ls (N files), src/big; skip if a marker says it is there."""
    src = os.path.join(fs_root, "src")
    marker = os.path.join(fs_root, "prepared.json")
    want = {k: sizes[k] for k in ("ls_files", "file_kib", "big_mib")}
    try:
        with open(marker) as f:
            if json.load(f) == want and os.path.isdir(src):
                log(f"data in {src} already prepared")
                return
    except (OSError, ValueError):
        pass
    log(f"preparing data in {src}")
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(os.path.join(fs_root, "ovl"), ignore_errors=True)
    lsdir = os.path.join(src, "ls")
    os.makedirs(lsdir)
    payload = (b"strata-bench-0123456789abcdef\n" * 64)[: sizes["file_kib"] * 1024]
    for i in range(sizes["ls_files"]):
        with open(os.path.join(lsdir, f"file-{i:05d}.dat"), "wb") as f:
            f.write(payload)
    subprocess.run(["dd", "if=/dev/urandom", f"of={os.path.join(src, 'big')}", "bs=1M",
                    f"count={sizes['big_mib']}", "conv=fsync", "status=none"], check=True)
    os.makedirs(os.path.join(fs_root, "ovl"), exist_ok=True)
    subprocess.run(["sync"], check=True)
    with open(marker, "w") as f:
        json.dump(want, f)


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


def check_ls(mnt, sizes):
    p = subprocess.run(["ls", "-al", os.path.join(mnt, "ls")], capture_output=True,
                       timeout=WORKLOAD_TIMEOUT, env=LS_ENV, text=True)
    lines = p.stdout.splitlines()
    want = sizes["ls_files"] + 3   # "total", ".", ".."
    bad = [l for l in lines[3:] if f" {sizes['file_kib'] * 1024} " not in l]
    if p.returncode != 0 or len(lines) != want or bad:
        raise TargetFailed(f"ls -al {mnt}/ls: rc={p.returncode}, {len(lines)} lines "
                           f"(want {want}), {len(bad)} with wrong size; stderr: {p.stderr[:300]}")


def w_ls(mnt, sizes):
    return timed(["ls", "-al", os.path.join(mnt, "ls")], env=LS_ENV)


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

class Bench:
    def __init__(self, args, sizes):
        self.args = args
        self.sizes = sizes
        self.samples = []
        self.errors = []
        self.broken = set()          # (fs, target)
        self.capped_cells = set()

    def record(self, fs, workload, target, rnd, seconds, warmup=False):
        self.samples.append({"fs": fs, "workload": workload, "target": target,
                             "round": rnd, "seconds": round(seconds, 6), "warmup": warmup})

    def fail(self, fs, target, workload, err, mounter):
        msg = str(err)
        log(f"ERROR {fs}/{target}/{workload}: {msg}")
        self.errors.append({"fs": fs, "target": target, "workload": workload, "error": msg})
        if target == "native":
            raise RuntimeError(f"native target failed; the benchmark itself is broken: {msg}")
        self.broken.add((fs, target))
        try:
            mounter.umount(target)
        except TargetFailed as e:
            self.errors.append({"fs": fs, "target": target, "workload": "umount", "error": str(e)})

    def capped(self, fs, workloads, target):
        """After 3 runs, stop a cell whose median exceeds --slow-cap seconds."""
        total, n = 0.0, None
        for w in workloads:
            xs = [s["seconds"] for s in self.samples if s["fs"] == fs and s["workload"] == w
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

    def targets(self, fs):
        return [t for t in self.args.targets if (fs, t) not in self.broken]

    def run_fs(self, fs, fs_root):
        args, sizes = self.args, self.sizes
        prepare_data(fs_root, sizes)
        m = Mounter(args, fs_root, fs)
        wl = args.workloads
        try:
            # Correctness check once per target before timing anything.
            for t in self.targets(fs):
                try:
                    check_ls(m.mount(t), sizes)
                    m.umount(t)
                except (TargetFailed, subprocess.TimeoutExpired) as e:
                    self.fail(fs, t, "check", e, m)

            # Cold: fresh mount + drop caches before every single measurement.
            for w, fn in (("ls-cold", w_ls), ("read-cold", w_read)):
                if w not in wl:
                    continue
                for rnd in range(args.runs):
                    for t in self.targets(fs):
                        if self.capped(fs, [w], t):
                            continue
                        try:
                            mnt = m.mount(t)
                            drop_caches()
                            self.record(fs, w, t, rnd, fn(mnt, sizes))
                            m.umount(t)
                        except (TargetFailed, subprocess.TimeoutExpired) as e:
                            self.fail(fs, t, w, e, m)
                log(f"{fs} {w}: done")

            # Warm: one mount per target for the rest; round 0 is a warm-up.
            warm = [w for w in ("ls-warm", "read-warm", "write") if w in wl]
            small = any(w.startswith("small-") for w in wl)
            if warm or small:
                for t in self.targets(fs):
                    try:
                        m.mount(t)
                    except TargetFailed as e:
                        self.fail(fs, t, "mount", e, m)
            for w in warm:
                fn = {"ls-warm": w_ls, "read-warm": w_read, "write": w_write}[w]
                first = 0 if w == "write" else -1     # writes need no warm-up round
                for rnd in range(first, args.runs):
                    for t in self.targets(fs):
                        if self.capped(fs, [w], t):
                            continue
                        try:
                            if w == "write":
                                settle()
                            self.record(fs, w, t, rnd, fn(m.path(t), sizes), warmup=rnd < 0)
                        except (TargetFailed, subprocess.TimeoutExpired, OSError) as e:
                            self.fail(fs, t, w, e, m)
                log(f"{fs} {w}: done")
            if small:
                for rnd in range(args.runs):
                    for t in self.targets(fs):
                        if self.capped(fs, [w for w in wl if w.startswith("small-")], t):
                            continue
                        try:
                            settle()
                            res = w_small(m.path(t), sizes, f"{rnd}")
                            for k, v in res.items():
                                if k in wl:
                                    self.record(fs, k, t, rnd, v)
                        except (TargetFailed, subprocess.TimeoutExpired, ValueError) as e:
                            self.fail(fs, t, "small", e, m)
                log(f"{fs} small: done")
        finally:
            m.umount_all()

    def summary(self):
        out = {}
        for fs in self.args.fs:
            out[fs] = {}
            for w in self.args.workloads:
                rows = {}
                for t in self.args.targets:
                    xs = [s["seconds"] for s in self.samples if s["fs"] == fs and
                          s["workload"] == w and s["target"] == t and not s["warmup"]]
                    if xs:
                        rows[t] = {"median": statistics.median(xs), "n": len(xs),
                                   "min": min(xs), "max": max(xs)}
                nat = rows.get("native", {}).get("median")
                for t, r in rows.items():
                    r["ratio"] = (r["median"] / nat) if nat else None
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
}


def fmt_secs(x):
    if x >= 10:
        return f"{x:.1f}"
    if x >= 1:
        return f"{x:.2f}"
    if x >= 0.1:
        return f"{x:.3f}"
    return f"{x:.4f}"


def markdown(meta, summary, errors, args, sizes):
    L = []
    L.append("# strata benchmarks\n")
    L.append(f"Date: {meta['date']}  ")
    L.append(f"Command: `{meta['command']}`  ")
    L.append(f"Mode: {meta['mode']}, {args.runs} measured runs per (workload, target), "
             "interleaved; `ls`/`dd read` warm after one discarded warm-up round"
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
    L.append(f"- peers: {v['mergerfs']}; {v['bindfs']}; {v['fuse-overlayfs']}; {v['fusermount3']}")
    L.append("")
    L.append("## Targets\n")
    L.append("- native: the source directory itself")
    L.append("- strata: `strata mount SRC MNT`" + (f" `-o {','.join(args.strata_opts)}`" if args.strata_opts else ""))
    L.append(f"- mergerfs: `mergerfs -o {MERGERFS_OPTS} SRC MNT` (minfreespace=0: the "
             "default 4G is more than the 3G tmpfs, so every create would fail with ENOSPC)")
    L.append("- bindfs: `bindfs SRC MNT`")
    L.append("- fuse-overlayfs: `fuse-overlayfs -o lowerdir=SRC,upperdir=UP,workdir=WK MNT` "
             "(reads come from the lower dir, writes land in the upper dir on the same filesystem)")
    L.append("")
    L.append("Cells: median wall seconds, and the ratio to native's median from the same run. "
             "`ls` and `dd` times include spawning the process (~1 ms); small-file phases are timed "
             "inside one Python process. Cold = fresh mount and `echo 3 > /proc/sys/vm/drop_caches` "
             "before each measurement (on tmpfs the data itself cannot be dropped). Warm = same mount, "
             "after a warm-up pass; measurements of one target are seconds apart, so the 1 s "
             "entry/attr timeouts of mergerfs (and of strata when it cannot watch the source) have "
             "expired and names are revalidated; strata, run as root, watches the source and uses "
             "hour-long timeouts.\n")
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
                    cells.append("failed" if any(e["fs"] == fs and e["target"] == t for e in errors) else "-")
                elif t == "native":
                    cells.append(fmt_secs(r["median"]))
                else:
                    ratio = f" ({r['ratio']:.2f}x)" if r["ratio"] else ""
                    nn = f" n={r['n']}" if r["n"] < args.runs else ""
                    cells.append(fmt_secs(r["median"]) + ratio + nn)
            L.append(f"| {LABELS[w].format(**sizes)} | " + " | ".join(cells) + " |")
        L.append("")
    if errors:
        L.append("## Errors\n")
        for e in errors:
            L.append(f"- {e['fs']}/{e['target']}/{e['workload']}: {e['error']}")
        L.append("")
    return "\n".join(L)


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
                    help="smoke test: 3 runs, 500 ls files, 64 MiB dd, 500 small files (env BENCH_QUICK=1)")
    ap.add_argument("--runs", type=int, default=int(env("BENCH_RUNS", "0")),
                    help="measured runs per (workload, target); default 5, quick 3 (env BENCH_RUNS)")
    ap.add_argument("--targets", default=env("BENCH_TARGETS", ",".join(ALL_TARGETS)),
                    help="comma list of " + ",".join(ALL_TARGETS) + " (env BENCH_TARGETS)")
    ap.add_argument("--workloads", default=env("BENCH_WORKLOADS", "ls,dd,small"),
                    help="comma list of groups " + ",".join(GROUPS) + " or names " +
                    ",".join(ALL_WORKLOADS) + " (env BENCH_WORKLOADS)")
    ap.add_argument("--fs", default=env("BENCH_FS", ",".join(ALL_FS)),
                    help="comma list of tmpfs,disk (env BENCH_FS)")
    ap.add_argument("--strata-opts", default=env("BENCH_STRATA_OPTS", ""),
                    help="extra -o options for strata, e.g. threads=4 (env BENCH_STRATA_OPTS)")
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
