//! Mount harness for the integration tests: every mount is undone on drop
//! (also when the test panics), and every wait has a deadline.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const STRATA: &str = env!("CARGO_BIN_EXE_strata");
const READY: Duration = Duration::from_secs(15);
const EXIT: Duration = Duration::from_secs(10);

pub fn is_mounted(mnt: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let needle = format!(" {} ", mnt.display());
    info.lines()
        .any(|l| l.contains(&needle) && l.contains(" - fuse.strata "))
}

/// Polls `cond` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

/// A foreground `strata mount -f` of a fresh source directory.
pub struct Mounted {
    pub dir: tempfile::TempDir,
    pub src: PathBuf,
    pub mnt: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Mounted {
    pub fn new(opts: &[&str]) -> Mounted {
        Self::with_env(opts, &[])
    }

    /// Mounts with extra environment for the daemon; `prepare` may fill the source first.
    pub fn with_env(opts: &[&str], env: &[(&str, &str)]) -> Mounted {
        Self::build(opts, env, |_| {})
    }

    pub fn with_source(opts: &[&str], prepare: impl FnOnce(&Path)) -> Mounted {
        Self::build(opts, &[], prepare)
    }

    fn build(opts: &[&str], env: &[(&str, &str)], prepare: impl FnOnce(&Path)) -> Mounted {
        Self::build_source(opts, env, |dir| {
            let src = dir.join("src");
            fs::create_dir(&src).unwrap();
            prepare(&src);
            src.display().to_string()
        })
    }

    /// Mounts the SOURCE `make_source` returns; it gets the test's scratch
    /// directory to make branches in (`src` is that directory's `src`).
    pub fn build_source(
        opts: &[&str],
        env: &[(&str, &str)],
        make_source: impl FnOnce(&Path) -> String,
    ) -> Mounted {
        let dir = tempfile::Builder::new()
            .prefix("strata-test")
            .tempdir_in("/tmp")
            .unwrap();
        let src = dir.path().join("src");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let source = make_source(dir.path());
        let log = dir.path().join("daemon.log");
        let mut cmd = Command::new(STRATA);
        cmd.arg("mount").arg("-f");
        for o in opts {
            cmd.arg("-o").arg(o);
        }
        cmd.arg(&source)
            .arg(&mnt)
            .env("STRATA_STATE_DIR", dir.path().join("state"))
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("start strata");
        let m = Mounted {
            dir,
            src,
            mnt,
            child: Some(child),
            log,
        };
        let mnt = m.mnt.clone();
        if !wait_until(READY, || is_mounted(&mnt)) {
            let log = fs::read_to_string(&m.log).unwrap_or_default();
            drop(m);
            panic!("mount did not become ready within {READY:?}; daemon log:\n{log}");
        }
        m
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Path inside the mount.
    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Path inside the source.
    pub fn s(&self, rel: &str) -> PathBuf {
        self.src.join(rel)
    }

    /// The daemon's counters, read through the stats xattr on the mount root.
    pub fn stats(&self) -> serde_json::Value {
        let mut buf = vec![0u8; 4096];
        let n = rustix::fs::getxattr(&self.mnt, "user.strata.stats", &mut buf[..])
            .expect("stats xattr");
        serde_json::from_slice(&buf[..n]).unwrap()
    }

    /// Waits for the foreground daemon to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.pid() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::DETACH);
        }
        if let Some(child) = self.child.take() {
            reap(child);
        }
    }
}

/// Waits for a daemon that was told to unmount; kills it after [`EXIT`].
fn reap(mut child: Child) {
    let deadline = Instant::now() + EXIT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            _ if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Runs the strata CLI with a private state dir.
pub fn strata(args: &[&str], state: &Path) -> Output {
    Command::new(STRATA)
        .args(args)
        .env("STRATA_STATE_DIR", state)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `sh -c script` as uid/gid 65534 (nobody/nogroup) with no supplementary groups.
pub fn as_nobody(script: &str) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ])
        .output()
        .unwrap()
}

/// Like [`as_nobody`], and the script must succeed.
pub fn as_nobody_ok(script: &str) {
    let out = as_nobody(script);
    assert!(
        out.status.success(),
        "as nobody: {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn drop_caches() {
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// Runs `cmd` to completion, killing it after `limit`; `None` on timeout or
/// when it cannot start.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Option<std::process::ExitStatus> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Whether a FUSE filesystem of type `fuse.FSTYPE` is mounted at `mnt`.
pub fn is_fuse_mounted(mnt: &Path, fstype: &str) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let needle = format!(" {} ", mnt.display());
    let kind = format!(" - fuse.{fstype} ");
    info.lines()
        .any(|l| l.contains(&needle) && l.contains(&kind))
}

/// The installed `mergerfs`. Panics when it is missing: tests comparing
/// strata with mergerfs must fail, not pass vacuously (CI installs it with
/// scripts/install-deps.sh).
pub fn mergerfs_bin() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("mergerfs"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "mergerfs is not installed: this test compares strata with it; \
                 run scripts/install-deps.sh (or apt-get install mergerfs)"
            )
        })
}

/// A foreground `mergerfs -f` of `branches` (mergerfs syntax) on a fresh
/// mountpoint; unmounted (fusermount3 -u, then a lazy unmount) on drop, and
/// the daemon killed if it does not exit in time.
pub struct MergerfsMount {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl MergerfsMount {
    pub fn new(branches: &str, opts: &[&str]) -> MergerfsMount {
        let bin = mergerfs_bin();
        let dir = tempfile::Builder::new()
            .prefix("strata-test-mergerfs")
            .tempdir_in("/tmp")
            .unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let log = dir.path().join("mergerfs.log");
        let out = fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-f");
        for o in opts {
            cmd.arg("-o").arg(o);
        }
        cmd.arg(branches)
            .arg(&mnt)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd.spawn().expect("start mergerfs");
        let m = MergerfsMount {
            dir,
            mnt,
            child: Some(child),
            log,
        };
        let mnt = m.mnt.clone();
        if !wait_until(READY, || is_fuse_mounted(&mnt, "mergerfs")) {
            let log = m.log();
            drop(m);
            panic!("mergerfs did not mount within {READY:?}; its output:\n{log}");
        }
        m
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Path inside the mount.
    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for MergerfsMount {
    fn drop(&mut self) {
        if is_fuse_mounted(&self.mnt, "mergerfs") {
            run_with_timeout(Command::new("fusermount3").arg("-u").arg(&self.mnt), EXIT);
        }
        if is_fuse_mounted(&self.mnt, "mergerfs") {
            let _ = rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::DETACH);
        }
        if let Some(child) = self.child.take() {
            reap(child);
        }
    }
}

/// Branch directories `b0`, `b1`, ... each a tmpfs of a given size (so
/// free-space policies are deterministic), unmounted on drop. Declare it
/// before the mounts that use it so they go first.
pub struct TmpfsBranches {
    pub dir: tempfile::TempDir,
    n: usize,
}

impl TmpfsBranches {
    pub fn new(sizes_mib: &[u64]) -> TmpfsBranches {
        let dir = tempfile::Builder::new()
            .prefix("strata-test-tmpfs")
            .tempdir_in("/tmp")
            .unwrap();
        let b = TmpfsBranches {
            dir,
            n: sizes_mib.len(),
        };
        for (i, size) in sizes_mib.iter().enumerate() {
            let p = b.path(i);
            fs::create_dir(&p).unwrap();
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}m"), "tmpfs"])
                .arg(&p)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "mount tmpfs on {}: {out:?}",
                p.display()
            );
        }
        b
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("b{i}"))
    }

    /// `b0=MODE0:b1=MODE1:...`, RW where `modes` has no entry.
    pub fn spec(&self, modes: &[&str]) -> String {
        (0..self.n)
            .map(|i| {
                let m = modes.get(i).copied().unwrap_or("RW");
                format!("{}={m}", self.path(i).display())
            })
            .collect::<Vec<_>>()
            .join(":")
    }
}

impl Drop for TmpfsBranches {
    fn drop(&mut self) {
        for i in 0..self.n {
            let _ = rustix::mount::unmount(self.path(i), rustix::mount::UnmountFlags::DETACH);
        }
    }
}
