//! `strata doctor`: what this machine gives strata, one line per check —
//! `ok`, `warn` (strata works, slower or with less) or `fail` (mounts will
//! not work) — with the command that fixes each problem. Ends with a real
//! mount of a scratch directory that shows whether kernel passthrough and
//! FUSE over io_uring are in use. Exit status 1 when a check fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::commands::{Failure, failure};
use crate::output::outln;

/// Where mount(8) looks for helpers (and so for `strata`).
const MOUNT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const URING_PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Ok,
    Warn,
    Fail,
}

struct Report {
    failed: bool,
}

impl Report {
    fn line(&mut self, level: Level, what: &str, detail: &str) -> Result<(), Failure> {
        let tag = match level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => {
                self.failed = true;
                "fail"
            }
        };
        outln!("{tag} {what}: {detail}")
    }
}

pub fn run() -> Result<(), Failure> {
    let mut r = Report { failed: false };
    let root = rustix::process::geteuid().is_root();
    if root {
        r.line(Level::Ok, "user", "root")?;
    } else {
        r.line(
            Level::Warn,
            "user",
            "not root: no kernel passthrough, no host watch (short cache timeouts), \
             allow_other only with user_allow_other in /etc/fuse.conf; fix: run as root",
        )?;
    }
    let uname = rustix::system::uname();
    r.line(Level::Ok, "kernel", &uname.release().to_string_lossy())?;
    match rustix::fs::access(
        "/dev/fuse",
        rustix::fs::Access::READ_OK | rustix::fs::Access::WRITE_OK,
    ) {
        Ok(()) => r.line(Level::Ok, "/dev/fuse", "read-write")?,
        Err(rustix::io::Errno::NOENT) => {
            r.line(Level::Fail, "/dev/fuse", "missing; fix: modprobe fuse")?
        }
        Err(e) => r.line(
            Level::Fail,
            "/dev/fuse",
            &format!("{e}; fix: run as root, or give this user read-write access"),
        )?,
    }
    if !root {
        match which("fusermount3", &std::env::var("PATH").unwrap_or_default()) {
            Some(p) => r.line(Level::Ok, "fusermount3", &p.display().to_string())?,
            None => r.line(
                Level::Fail,
                "fusermount3",
                "missing (mounts as a user need it); fix: apt-get install fuse3",
            )?,
        }
    }
    let uring = std::fs::read_to_string(URING_PARAM).map(|v| v.trim().to_string());
    match uring.as_deref() {
        Ok("Y") => r.line(Level::Ok, "FUSE over io_uring", "enable_uring is on")?,
        Ok(_) => r.line(
            Level::Warn,
            "FUSE over io_uring",
            &format!(
                "enable_uring is off (requests go through /dev/fuse, slower on small files); \
                 fix: echo Y > {URING_PARAM}, and options fuse enable_uring=1 in \
                 /etc/modprobe.d/fuse.conf to keep it"
            ),
        )?,
        Err(_) => r.line(
            Level::Warn,
            "FUSE over io_uring",
            "this kernel has none (Linux 6.14+ with CONFIG_FUSE_IO_URING)",
        )?,
    }
    match strata_core::host::watch::HostWatch::new() {
        Ok(_) => r.line(Level::Ok, "fanotify", "host changes can be watched")?,
        Err(e) => r.line(
            Level::Warn,
            "fanotify",
            &format!("{e}: host changes are not watched, caches time out after 1 s"),
        )?,
    }
    let helper = Path::new("/sbin/mount.fuse3").exists();
    match (helper, which("strata", MOUNT_PATH)) {
        (true, Some(p)) => r.line(
            Level::Ok,
            "mount(8)",
            &format!("mount.fuse3 runs {}", p.display()),
        )?,
        (false, _) => r.line(
            Level::Warn,
            "mount(8)",
            "no /sbin/mount.fuse3: fstab and mount -t fuse.strata will not work; \
             fix: apt-get install fuse3",
        )?,
        (true, None) => r.line(
            Level::Warn,
            "mount(8)",
            "strata is not where mount(8) looks; fix: ./scripts/install.sh",
        )?,
    }
    probe_mount(&mut r)?;
    if r.failed {
        return Err(Failure {
            code: 1,
            message: String::new(),
        });
    }
    Ok(())
}

/// The first `name` in the `:`-separated `path`.
fn which(name: &str, path: &str) -> Option<PathBuf> {
    path.split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Mounts a scratch directory with this binary, opens a file through it and
/// reads the daemon's counters: what the kernel really gives.
fn probe_mount(r: &mut Report) -> Result<(), Failure> {
    let dir = std::env::temp_dir().join(format!("strata-doctor.{}", std::process::id()));
    let (src, mnt, state) = (dir.join("src"), dir.join("mnt"), dir.join("state"));
    for d in [&src, &mnt] {
        std::fs::create_dir_all(d).map_err(|e| failure(format!("{}: {e}", d.display())))?;
    }
    let _ = std::fs::write(src.join("f"), b"probe");
    let exe = std::env::current_exe().map_err(|e| failure(e.to_string()))?;
    let strata = |args: &[&std::ffi::OsStr]| -> bool {
        let child = Command::new(&exe)
            .args(args)
            .env("STRATA_STATE_DIR", &state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = child else { return false };
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if start.elapsed() < Duration::from_secs(20) => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return false;
                }
            }
        }
    };
    let mounted = strata(&["mount".as_ref(), src.as_os_str(), mnt.as_os_str()]);
    if !mounted {
        r.line(
            Level::Fail,
            "probe mount",
            &format!("strata mount {} failed", src.display()),
        )?;
    } else {
        // In a probe child (see state::Probe): a hung mount costs a timeout.
        let deadline = Instant::now() + Duration::from_secs(5);
        let (health, stats) =
            crate::state::Probe::start(&mnt, true, Some(&mnt.join("f"))).finish(deadline);
        let count = |key: &str| -> u64 {
            stats
                .as_ref()
                .and_then(|s| s.get(key))
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        };
        if health != crate::state::Health::Ok || stats.is_none() {
            r.line(
                Level::Fail,
                "probe mount",
                &format!("{:?}: no counters from the mount", health),
            )?;
        } else {
            if count("passthrough_inodes") > 0 {
                r.line(
                    Level::Ok,
                    "kernel passthrough",
                    "in use (reads and writes bypass the daemon)",
                )?;
            } else {
                r.line(
                    Level::Warn,
                    "kernel passthrough",
                    "not in use: the daemon serves file data (needs root and Linux 6.9+ \
                     with CONFIG_FUSE_PASSTHROUGH)",
                )?;
            }
            let via = if count("io_uring_requests") > 0 {
                "io_uring"
            } else {
                "/dev/fuse"
            };
            r.line(
                Level::Ok,
                "probe mount",
                &format!("requests came through {via}"),
            )?;
        }
        strata(&["umount".as_ref(), mnt.as_os_str()]);
    }
    // Never through a mount that did not go (it could hang, or reach the source).
    if crate::state::mount_at(&mnt).is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
