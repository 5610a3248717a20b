//! Mount harness for the integration tests: every mount is undone on drop
//! (also when the test panics), and every wait has a deadline.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use strata_image::{Digest, Store};

pub const STRATA: &str = env!("CARGO_BIN_EXE_strata");
const READY: Duration = Duration::from_secs(15);
const EXIT: Duration = Duration::from_secs(10);

pub fn is_mounted(mnt: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let needle = format!(" {} ", mnt.display());
    info.lines()
        .any(|l| l.contains(&needle) && l.contains(" - fuse.strata "))
}

/// A fresh scratch directory `/tmp/strata-test*`, removed on drop. Every
/// test directory is one of these, so what a failed run leaves is easy to
/// find (scripts/test.sh looks for mounts under that name).
pub fn scratch_dir() -> tempfile::TempDir {
    scratch_dir_for("")
}

/// [`scratch_dir`] named `/tmp/strata-test-KIND*`.
pub fn scratch_dir_for(kind: &str) -> tempfile::TempDir {
    let prefix = if kind.is_empty() {
        "strata-test".to_owned()
    } else {
        format!("strata-test-{kind}")
    };
    tempfile::Builder::new()
        .prefix(&prefix)
        .tempdir_in("/tmp")
        .unwrap()
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
        Self::build_with(opts, env, |dir| (make_source(dir), Vec::new()))
    }

    /// Mounts the SOURCE `make` returns, with the extra `-o` options it
    /// returns (for paths inside the scratch directory, such as
    /// `upper=DIR` or `store=DIR`).
    pub fn build_with(
        opts: &[&str],
        env: &[(&str, &str)],
        make: impl FnOnce(&Path) -> (String, Vec<String>),
    ) -> Mounted {
        Self::spawn(opts, env, None, make)
    }

    /// A second daemon serving a fresh source of its own at `first`'s
    /// mountpoint, with `first`'s state dir (for tests of a mount that
    /// takes the place of another); `prepare` fills the source.
    pub fn successor_of(first: &Mounted, prepare: impl FnOnce(&Path)) -> Mounted {
        let at = (first.mnt.clone(), first.dir.path().join("state"));
        Self::spawn(&[], &[], Some(at), |dir| {
            let src = dir.join("src");
            fs::create_dir(&src).unwrap();
            prepare(&src);
            (src.display().to_string(), Vec::new())
        })
    }

    /// An overlay: the scratch directory's `src` (filled by `prepare`) as
    /// the lower, its `upper` as the upper.
    pub fn overlay(opts: &[&str], prepare: impl FnOnce(&Path)) -> Mounted {
        Self::build_with(opts, &[], |dir| {
            let src = dir.join("src");
            fs::create_dir(&src).unwrap();
            prepare(&src);
            let upper = dir.join("upper");
            fs::create_dir(&upper).unwrap();
            (
                src.display().to_string(),
                vec![format!("upper={}", upper.display())],
            )
        })
    }

    /// `at`: the mountpoint and state dir, when not the scratch directory's.
    fn spawn(
        opts: &[&str],
        env: &[(&str, &str)],
        at: Option<(PathBuf, PathBuf)>,
        make: impl FnOnce(&Path) -> (String, Vec<String>),
    ) -> Mounted {
        let dir = scratch_dir();
        let src = dir.path().join("src");
        let (mnt, state) = at.unwrap_or_else(|| {
            let mnt = dir.path().join("mnt");
            fs::create_dir(&mnt).unwrap();
            (mnt, dir.path().join("state"))
        });
        let (source, extra) = make(dir.path());
        let log = dir.path().join("daemon.log");
        let mut cmd = Command::new(STRATA);
        cmd.arg("mount").arg("-f");
        for o in opts {
            cmd.arg("-o").arg(o);
        }
        for o in &extra {
            cmd.arg("-o").arg(o);
        }
        cmd.arg(&source)
            .arg(&mnt)
            .env("STRATA_STATE_DIR", state)
            // Archive indexes and the like land in the scratch dir, not the
            // machine's store.
            .env("STRATA_STORE", dir.path().join("store"))
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
        let mut m = m;
        let mnt = m.mnt.clone();
        // A daemon that gave up ends the wait at once.
        let exited = |m: &mut Mounted| {
            m.child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
        };
        wait_until(READY, || is_mounted(&mnt) || exited(&mut m));
        if !is_mounted(&mnt) {
            let log = fs::read_to_string(&m.log).unwrap_or_default();
            let why = if exited(&mut m) {
                "the daemon exited".to_string()
            } else {
                format!("not ready within {READY:?}")
            };
            drop(m);
            panic!("mount failed: {why}; daemon log:\n{log}");
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

    /// The scratch directory's `upper`: the upper of [`Mounted::overlay`]
    /// and of [`ImageScratch::mount`].
    pub fn upper(&self) -> PathBuf {
        self.dir.path().join("upper")
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

    /// Waits (10 s at most) for the daemon to exit with status 0; panics
    /// with its log otherwise.
    pub fn assert_exits_cleanly(&mut self) {
        let code = self.wait_exit(Duration::from_secs(10));
        assert_eq!(code, Some(0), "daemon log: {}", self.log());
    }

    /// Kills the daemon (SIGKILL) and waits until the mount answers
    /// ENOTCONN: a stale mount, as a crash leaves it.
    pub fn kill_and_wait_stale(&mut self) {
        self.signal(rustix::process::Signal::KILL);
        self.wait_exit(Duration::from_secs(10));
        // statfs always asks the daemon; a stat may be answered from the
        // kernel's cache of the root's attributes.
        let stale = || {
            matches!(
                rustix::fs::statfs(&self.mnt),
                Err(rustix::io::Errno::NOTCONN)
            )
        };
        assert!(
            wait_until(Duration::from_secs(5), stale),
            "the mount did not go stale"
        );
    }

    /// Unmounts now (not lazily: nothing may still use the mount) and waits
    /// for the daemon to exit cleanly; panics with the daemon's log if
    /// either fails. Afterwards the scratch directory is still there.
    pub fn unmount(&mut self) {
        let deadline = Instant::now() + EXIT;
        loop {
            match rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::empty()) {
                Ok(()) => break,
                Err(rustix::io::Errno::BUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!(
                    "unmount {}: {e}; daemon log:\n{}",
                    self.mnt.display(),
                    self.log()
                ),
            }
        }
        let code = self.wait_exit(EXIT);
        assert_eq!(
            code,
            Some(0),
            "daemon did not exit cleanly after unmount; log:\n{}",
            self.log()
        );
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

/// Runs `sh -c script` as uid/gid 65534 (nobody/nogroup) with no
/// supplementary groups; killed (and the test failed) after 30 s.
pub fn as_nobody(script: &str) -> Output {
    output_with_timeout(
        Command::new("setpriv").args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ]),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|| panic!("as nobody: {script}: timed out"))
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
        let dir = scratch_dir_for("mergerfs");
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
        let dir = scratch_dir_for("tmpfs");
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

/// Runs `cmd` with its output captured, killing it after `limit`; `None` on
/// timeout.
pub fn output_with_timeout(cmd: &mut Command, limit: Duration) -> Option<Output> {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start command");
    // Drained as it comes, so a chatty command never blocks on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped")));
    let err = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    // A daemon the command started may hold the pipes open: do not wait
    // for their end longer than the command ran.
    let join = |h: std::thread::JoinHandle<Vec<u8>>| {
        let until = Instant::now() + Duration::from_secs(2);
        while !h.is_finished() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        if h.is_finished() {
            h.join().unwrap_or_default()
        } else {
            Vec::new()
        }
    };
    Some(Output {
        status,
        stdout: join(out),
        stderr: join(err),
    })
}

/// The mount's fstype at `mnt` in the mount table, if something is mounted there.
pub fn fstype_at(mnt: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let needle = format!(" {} ", mnt.display());
    info.lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split(" - ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .next_back()
        .map(str::to_owned)
}

/// A kernel overlayfs mount, detached on drop.
pub struct KernelOverlay {
    pub mnt: PathBuf,
}

impl KernelOverlay {
    /// `mount -t overlay overlay -o lowerdir=LOWER,upperdir=UPPER,workdir=WORK MNT`
    /// (`lower` may list several directories joined by ':'). Panics when the
    /// kernel refuses, with its message.
    pub fn mount(lower: &str, upper: &Path, work: &Path, mnt: &Path) -> KernelOverlay {
        let opts = format!(
            "lowerdir={lower},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        Self::mount_opts(&opts, mnt)
    }

    /// A read-only overlay of lowers only (at least two, joined by ':').
    pub fn mount_lowers(lower: &str, mnt: &Path) -> KernelOverlay {
        Self::mount_opts(&format!("lowerdir={lower}"), mnt)
    }

    fn mount_opts(opts: &str, mnt: &Path) -> KernelOverlay {
        let out = output_with_timeout(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", opts])
                .arg(mnt),
            EXIT,
        )
        .expect("mount -t overlay timed out");
        let k = KernelOverlay {
            mnt: mnt.to_path_buf(),
        };
        assert!(
            out.status.success(),
            "mount -t overlay -o {opts} {}: {}",
            mnt.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        k
    }
}

impl Drop for KernelOverlay {
    fn drop(&mut self) {
        if fstype_at(&self.mnt).as_deref() == Some("overlay") {
            let _ = rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// One object of a [`Tree`]: what a user can see of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Obj {
    /// `f` file, `d` directory, `l` symlink, `p` fifo, `c`/`b` devices, `s` socket.
    pub kind: char,
    /// Permission bits (07777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// A regular file's content: itself when it is short text, else its
    /// length and hash (see [`describe_content`]).
    pub content: Option<String>,
    pub target: Option<PathBuf>,
    pub rdev: u64,
    /// The link count, where [`Detail::nlink`] asks for it.
    pub nlink: Option<u64>,
    /// Modification time of non-directories (directories change with their
    /// entries), where [`Detail::times`] asks for it.
    pub mtime: Option<(i64, i64)>,
    /// Extended attributes, `trusted.*` aside (private to each
    /// implementation), where [`Detail::xattrs`] asks for them.
    pub xattrs: Option<Vec<(String, Vec<u8>)>>,
}

/// A directory tree as seen through `stat`, `readlink`, `read` and xattrs:
/// path (relative, "" for the root) → object, plus the groups of paths that
/// share an inode (hard links).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tree {
    pub objs: std::collections::BTreeMap<String, Obj>,
    pub links: std::collections::BTreeSet<Vec<String>>,
}

/// What [`walk`] records of each object besides its type, permission bits,
/// owner, size, device number, content and symlink target.
#[derive(Clone, Copy, Debug, Default)]
pub struct Detail {
    /// Modification times of non-directories.
    pub times: bool,
    /// Extended attributes (`trusted.*` aside).
    pub xattrs: bool,
    /// Link counts.
    pub nlink: bool,
}

/// Short UTF-8 content (64 bytes at most) as a quoted string, anything
/// else as its length and hash.
pub fn describe_content(data: &[u8]) -> String {
    use std::hash::{DefaultHasher, Hash, Hasher};
    match std::str::from_utf8(data) {
        Ok(s) if data.len() <= 64 => format!("{s:?}"),
        _ => {
            let mut h = DefaultHasher::new();
            data.hash(&mut h);
            format!("{} bytes, hash {:016x}", data.len(), h.finish())
        }
    }
}

pub fn xattrs_of(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec![0u8; 65536];
    let n = match rustix::fs::llistxattr(path, &mut names[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => 0,
        Err(e) => panic!("llistxattr {}: {e}", path.display()),
    };
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).into_owned();
        if name.starts_with("trusted.") {
            continue;
        }
        let mut v = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(path, name.as_str(), &mut v[..])
            .unwrap_or_else(|e| panic!("lgetxattr {} {name}: {e}", path.display()));
        v.truncate(len);
        out.push((name, v));
    }
    out.sort();
    out
}

/// The tests' one tree walker: every object under `root` (`root` itself as
/// ""), found without following symlinks, with every regular file read;
/// `detail` says what more to record. Hides no name.
pub fn walk(root: &Path, detail: Detail) -> Tree {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let mut tree = Tree::default();
    let mut inodes: std::collections::HashMap<u64, Vec<String>> = Default::default();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let path = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let md =
            fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_symlink() {
            'l'
        } else if ft.is_fifo() {
            'p'
        } else if ft.is_char_device() {
            'c'
        } else if ft.is_block_device() {
            'b'
        } else {
            's'
        };
        let content = (kind == 'f').then(|| {
            let data = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            describe_content(&data)
        });
        let obj = Obj {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: if kind == 'd' { 0 } else { md.size() },
            content,
            target: (kind == 'l').then(|| fs::read_link(&path).unwrap()),
            rdev: md.rdev(),
            nlink: detail.nlink.then(|| md.nlink()),
            mtime: (detail.times && kind != 'd').then(|| (md.mtime(), md.mtime_nsec())),
            xattrs: detail.xattrs.then(|| xattrs_of(&path)),
        };
        if kind != 'd' {
            inodes.entry(md.ino()).or_default().push(rel.clone());
        }
        if kind == 'd' {
            for de in fs::read_dir(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())) {
                let name = de.unwrap().file_name().into_string().unwrap();
                stack.push(if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                });
            }
        }
        tree.objs.insert(rel, obj);
    }
    for (_, mut group) in inodes {
        if group.len() > 1 {
            group.sort();
            tree.links.insert(group);
        }
    }
    tree
}

/// What a user can see of the tree under `root` ([`walk`] with xattrs);
/// `times`: with the mtimes of non-directories.
pub fn snapshot(root: &Path, times: bool) -> Tree {
    walk(
        root,
        Detail {
            times,
            xattrs: true,
            nlink: false,
        },
    )
}

/// The differences between two trees, one line each (empty when equal).
pub fn tree_diff(a: &Tree, b: &Tree) -> Vec<String> {
    let mut out = Vec::new();
    for (p, oa) in &a.objs {
        match b.objs.get(p) {
            None => out.push(format!("/{p}: only in the first")),
            Some(ob) if ob != oa => out.push(format!("/{p}: {oa:?} != {ob:?}")),
            Some(_) => {}
        }
    }
    for p in b.objs.keys().filter(|p| !a.objs.contains_key(*p)) {
        out.push(format!("/{p}: only in the second"));
    }
    if a.links != b.links {
        out.push(format!("hard links: {:?} != {:?}", a.links, b.links));
    }
    out
}

/// Asserts two trees are equal, listing every difference.
pub fn assert_same_tree(what: &str, a: &Tree, b: &Tree) {
    let d = tree_diff(a, b);
    assert!(
        d.is_empty(),
        "{what}: {} differences:\n{}",
        d.len(),
        d.join("\n")
    );
}

/// The errno of a failed I/O result; panics if it succeeded.
pub fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => e.raw_os_error().unwrap_or_else(|| panic!("no errno: {e}")),
    }
}

/// `strata image build SRC --name NAME --store STORE`, which must succeed.
pub fn build_image(src: &Path, store: &Path, name: &str) {
    let out = output_with_timeout(
        Command::new(STRATA)
            .args(["image", "build"])
            .arg(src)
            .args(["--name", name, "--store"])
            .arg(store),
        Duration::from_secs(60),
    )
    .expect("image build timed out");
    assert!(
        out.status.success(),
        "image build {name} from {}: {}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sets a path's access and modification time (not following symlinks).
pub fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let t = rustix::fs::Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", path.display()));
}

pub fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    rustix::fs::lsetxattr(path, name, value, rustix::fs::XattrFlags::empty())
        .unwrap_or_else(|e| panic!("setxattr {} {name}: {e}", path.display()));
}

/// An xattr's value, `None` if absent.
pub fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut v = vec![0u8; 65536];
    match rustix::fs::lgetxattr(path, name, &mut v[..]) {
        Ok(n) => {
            v.truncate(n);
            Some(v)
        }
        Err(rustix::io::Errno::NODATA) => None,
        Err(e) => panic!("getxattr {} {name}: {e}", path.display()),
    }
}

/// Sorted names in a directory.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

/// Writes and truncates by a user (nobody) to files of mode `mode` named
/// su-write, su-trunc, su-otrunc, and a write by root to su-root; returns
/// the modes the files end with, read from `host` (the directory holding
/// them on the host) after `mnt` saw the changes.
pub fn modes_after_unprivileged_writes(
    mnt: &Path,
    host: impl Fn(&str) -> PathBuf,
    mode: u32,
) -> Vec<u32> {
    let names = ["su-write", "su-trunc", "su-otrunc", "su-root"];
    for n in names {
        fs::write(mnt.join(n), b"data").unwrap();
        fs::set_permissions(
            mnt.join(n),
            std::os::unix::fs::PermissionsExt::from_mode(mode),
        )
        .unwrap();
    }
    as_nobody_ok(&format!(
        "echo more >> {0}/su-write && truncate -s 1 {0}/su-trunc && echo new > {0}/su-otrunc",
        mnt.display()
    ));
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(mnt.join("su-root"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"root").unwrap();
    drop(f);
    names
        .iter()
        .map(|n| std::os::unix::fs::MetadataExt::mode(&fs::metadata(host(n)).unwrap()) & 0o7777)
        .collect()
}

/// A scratch directory holding an image store and the trees images are
/// built from (the image tests' one scratch type).
pub struct ImageScratch {
    pub dir: tempfile::TempDir,
}

impl ImageScratch {
    pub fn new() -> ImageScratch {
        ImageScratch {
            dir: scratch_dir_for("img"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn store(&self) -> PathBuf {
        self.path("store")
    }

    /// Builds image `name` from `src`.
    pub fn build(&self, src: &Path, name: &str) {
        build_image(src, &self.store(), name);
    }

    /// Runs `strata ARGS` with `$STRATA_STORE` at this store, within 60 s.
    pub fn run(&self, args: &[&str]) -> Output {
        output_with_timeout(
            Command::new(STRATA)
                .args(args)
                .env("STRATA_STORE", self.store())
                .env_remove("RUST_LOG"),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|| panic!("strata {args:?} timed out"))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "strata {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Mounts SOURCE (image:NAME... joined by ':') from this store; with
    /// `upper`, the mount's own scratch directory gets an `upper`.
    pub fn mount(&self, source: &str, upper: bool, opts: &[&str]) -> Mounted {
        let store = format!("store={}", self.store().display());
        let source = source.to_owned();
        Mounted::build_with(opts, &[], move |dir| {
            let mut extra = vec![store];
            if upper {
                let up = dir.join("upper");
                fs::create_dir(&up).unwrap();
                extra.push(format!("upper={}", up.display()));
            }
            (source, extra)
        })
    }

    pub fn blob(&self, content: &[u8]) -> PathBuf {
        Store::open(&self.store())
            .unwrap()
            .blob_path(&Digest::of(content))
    }

    /// Relative path → (size, mtime) of every file under `blobs/` and
    /// `images/` of the store.
    pub fn store_listing(&self) -> BTreeMap<String, (u64, i64, i64)> {
        let mut out = BTreeMap::new();
        for top in ["blobs", "images"] {
            let t = snapshot(&self.store().join(top), true);
            for (p, o) in t.objs {
                let (s, ns) = o.mtime.unwrap_or((0, 0));
                out.insert(format!("{top}/{p}"), (o.size, s, ns));
            }
        }
        out
    }
}
