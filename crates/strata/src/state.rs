//! What `strata status` and `strata umount` know about mounts: the kernel's
//! mount table (`/proc/self/mountinfo`) and one small JSON file per mount
//! written by its daemon (pid, source, start time).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The fstype strata mounts show in the mount table.
pub const FSTYPE: &str = "fuse.strata";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MountRecord {
    pub mountpoint: PathBuf,
    pub source: String,
    pub pid: u32,
    pub started: u64,
    pub log: PathBuf,
}

/// Per-user directory for mount records and daemon logs.
pub fn state_dir() -> PathBuf {
    state_dir_from(
        std::env::var_os("STRATA_STATE_DIR"),
        rustix::process::geteuid().is_root(),
        std::env::var_os("XDG_RUNTIME_DIR"),
    )
}

/// [`state_dir`] from its inputs. The result is always absolute: an empty
/// `STRATA_STATE_DIR` is unset and a relative one is taken from the current
/// directory (the daemon's records and logs must not depend on where a later
/// command runs); an empty or relative `XDG_RUNTIME_DIR` is ignored, as the
/// XDG base directory spec asks.
fn state_dir_from(
    strata: Option<std::ffi::OsString>,
    root: bool,
    xdg: Option<std::ffi::OsString>,
) -> PathBuf {
    if let Some(dir) = strata.filter(|d| !d.is_empty()) {
        return std::path::absolute(&dir).unwrap_or_else(|_| PathBuf::from(dir));
    }
    if root {
        return PathBuf::from("/run/strata");
    }
    match xdg.map(PathBuf::from).filter(|d| d.is_absolute()) {
        Some(d) => d.join("strata"),
        None => std::path::absolute(std::env::temp_dir())
            .unwrap_or_else(|_| PathBuf::from("/tmp"))
            .join(format!("strata-{}", rustix::process::geteuid().as_raw())),
    }
}

fn slug(mountpoint: &Path) -> String {
    let s = mountpoint.to_string_lossy();
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    // Keep distinct mountpoints distinct even when they map to the same slug.
    let hash = s.bytes().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    });
    out.push_str(&format!("-{:08x}", hash as u32));
    out
}

pub fn record_path(mountpoint: &Path) -> PathBuf {
    state_dir()
        .join("mounts")
        .join(format!("{}.json", slug(mountpoint)))
}

/// Logs kept per mountpoint: the running daemon's and a few of its
/// predecessors' (older ones are removed when a new daemon starts).
pub const LOGS_KEPT: usize = 5;

fn logs_dir() -> PathBuf {
    state_dir().join("logs")
}

/// A new log file name for one daemon of `mountpoint`: every mount attempt
/// gets its own, so a failed attempt never writes into the log of the mount
/// already there.
pub fn new_log_path(mountpoint: &Path) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    logs_dir().join(format!(
        "{}.{nanos}-{}.log",
        slug(mountpoint),
        std::process::id()
    ))
}

/// Removes the oldest logs of `mountpoint` so that at most `keep` remain.
pub fn prune_logs(mountpoint: &Path, keep: usize) {
    let prefix = format!("{}.", slug(mountpoint));
    let Ok(entries) = fs::read_dir(logs_dir()) else {
        return;
    };
    let mut logs: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".log")
        })
        .filter_map(|e| {
            let md = e.metadata().ok().filter(|m| m.is_file())?;
            Some((md.modified().unwrap_or(UNIX_EPOCH), e.path()))
        })
        .collect();
    logs.sort();
    let excess = logs.len().saturating_sub(keep);
    for (_, path) in logs.into_iter().take(excess) {
        let _ = fs::remove_file(path);
    }
}

/// An exclusive lock on the records directory, held until dropped: a
/// record is written, and removed by the daemon it names, under it, so a
/// daemon that exits cannot read its own record and then remove the one a
/// successor at the same mountpoint wrote in between.
fn lock_records(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = path.parent().expect("has parent");
    // Explicit modes: the daemon's umask is 0, and records must not be
    // anyone's to write.
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o644)
        .open(dir.join(".lock"))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(lock)
}

pub fn write_record(rec: &MountRecord) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = record_path(&rec.mountpoint);
    let _lock = lock_records(&path)?;
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(rec).expect("serializable"))?;
    fs::rename(tmp, path)
}

/// Removes the record of `mountpoint` if it is still this process's (a
/// successor mounted at the same place has a record of its own).
pub fn remove_own_record(mountpoint: &Path) {
    let Ok(_lock) = lock_records(&record_path(mountpoint)) else {
        return;
    };
    if read_record(mountpoint).is_some_and(|r| r.pid == std::process::id()) {
        remove_record(mountpoint);
    }
}

pub fn read_record(mountpoint: &Path) -> Option<MountRecord> {
    let data = fs::read(record_path(mountpoint)).ok()?;
    serde_json::from_slice(&data).ok()
}

pub fn remove_record(mountpoint: &Path) {
    let _ = fs::remove_file(record_path(mountpoint));
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A line of the kernel mount table.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelMount {
    /// `major:minor` of the mount's device (its bdi in /sys/class/bdi).
    pub device: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<KernelMount> {
    text.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mut pre = pre.split(' ');
            let device = pre.nth(2)?;
            let mountpoint = pre.nth(1)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let source = post.next().unwrap_or("");
            Some(KernelMount {
                device: device.to_string(),
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fstype: fstype.to_string(),
                source: unescape(source),
            })
        })
        .collect()
}

pub fn kernel_mounts() -> Vec<KernelMount> {
    fs::read_to_string("/proc/self/mountinfo").map_or_else(|_| Vec::new(), |t| parse_mountinfo(&t))
}

/// The kernel's mount at exactly `path`, if any (the last one wins when stacked).
pub fn mount_at(path: &Path) -> Option<KernelMount> {
    kernel_mounts()
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == path)
}

/// How long a probe of a mount (stat, the stats xattr) may take before the
/// mount counts as hung.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a probe of a mountpoint found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// FUSE mount whose daemon is gone (ENOTCONN).
    Stale,
    /// No answer within [`PROBE_TIMEOUT`] (daemon stopped or stuck).
    Hung,
}

/// A probe running in a child process (`strata probe-mount`). A syscall on
/// a mount whose daemon is stopped blocks its caller, and with FUSE over
/// io_uring uninterruptibly once the request is queued: a thread of ours
/// stuck there would keep this process from exiting. A child is killed and
/// left behind instead (init reaps it once the mount answers or goes).
pub struct Probe {
    child: Option<Child>,
    out: Receiver<String>,
}

impl Probe {
    /// Starts probing `path`: a stat, and with `stats` the daemon's counters
    /// (read while `hold`, a file of the mount, is open, when given).
    pub fn start(path: &Path, stats: bool, hold: Option<&Path>) -> Probe {
        let (tx, out) = std::sync::mpsc::channel();
        let child = std::env::current_exe().ok().and_then(|exe| {
            let mut cmd = Command::new(exe);
            cmd.arg("probe-mount");
            if stats {
                cmd.arg("--stats");
            }
            if let Some(h) = hold {
                cmd.arg("--hold").arg(h);
            }
            cmd.arg(path)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .ok()
        });
        let child = child.map(|mut c| {
            let mut pipe = c.stdout.take().expect("piped");
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = pipe.read_to_string(&mut text);
                let _ = tx.send(text);
            });
            c
        });
        Probe { child, out }
    }

    /// The result, waiting until `deadline` at most; a probe that cannot
    /// run at all reports `Ok` without counters.
    pub fn finish(mut self, deadline: Instant) -> (Health, Option<serde_json::Value>) {
        let Some(mut child) = self.child.take() else {
            return (Health::Ok, None);
        };
        match self
            .out
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            Ok(text) => {
                let _ = child.wait();
                let mut lines = text.lines();
                let health = match lines.next() {
                    Some("stale") => Health::Stale,
                    _ => Health::Ok,
                };
                (
                    health,
                    lines.next().and_then(|l| serde_json::from_str(l).ok()),
                )
            }
            Err(_) => {
                // Not waited for: it may stay blocked until the mount answers.
                let _ = child.kill();
                (Health::Hung, None)
            }
        }
    }
}

/// The probe child's work: prints `ok` or `stale`, then with `stats` the
/// counters as one JSON line (`null` if there are none).
pub fn probe_mount(path: &Path, stats: bool, hold: Option<&Path>) {
    let stale = matches!(fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN));
    let _held = hold.and_then(|h| {
        let mut f = fs::File::open(h).ok()?;
        let _ = f.read_to_end(&mut Vec::new());
        Some(f)
    });
    let mut out = String::from(if stale { "stale\n" } else { "ok\n" });
    if stats && !stale {
        let mut buf = vec![0u8; 4096];
        match rustix::fs::getxattr(path, strata_fuse::STATS_XATTR, &mut buf[..]) {
            Ok(n) => out.push_str(&String::from_utf8_lossy(&buf[..n]).replace('\n', " ")),
            Err(_) => out.push_str("null"),
        }
        out.push('\n');
    }
    let _ = std::io::stdout().write_all(out.as_bytes());
}

/// Stats `path` with a timeout (in a child, see [`Probe`]).
pub fn health(path: &Path) -> Health {
    Probe::start(path, false, None)
        .finish(Instant::now() + PROBE_TIMEOUT)
        .0
}

/// Whether process `pid` still runs: a zombie (killed, not yet reaped by its
/// parent) holds nothing and counts as gone.
pub fn pid_alive(pid: u32) -> bool {
    !matches!(pid_state(pid), None | Some('Z' | 'X'))
}

/// Whether process `pid` is stopped (SIGSTOP, or a debugger): it cannot
/// exit before someone continues it.
pub fn pid_stopped(pid: u32) -> bool {
    matches!(pid_state(pid), Some('T' | 't'))
}

/// The state letter of process `pid` (`/proc/PID/stat`).
fn pid_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the command name, which may itself hold ") ".
    stat.rfind(") ").and_then(|i| stat[i + 2..].chars().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes() {
        let text = "36 35 98:0 / /mnt/my\\040data rw,noatime master:1 - fuse.strata /srv/a:/srv/b=RO rw,user_id=0\n\
                    37 35 98:0 / /proc rw - proc proc rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].device, "98:0");
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/my data"));
        assert_eq!(m[0].fstype, FSTYPE);
        assert_eq!(m[0].source, "/srv/a:/srv/b=RO");
        assert_eq!(m[1].fstype, "proc");
    }

    #[test]
    fn state_dir_is_absolute() {
        let os = |s: &str| Some(std::ffi::OsString::from(s));
        let user = |xdg| state_dir_from(None, false, xdg);
        assert_eq!(user(os("/run/user/7")), PathBuf::from("/run/user/7/strata"));
        for xdg in [os(""), os("relative/dir"), None] {
            let d = user(xdg.clone());
            assert!(d.is_absolute(), "{xdg:?} gave {}", d.display());
            assert!(!d.starts_with("relative"), "{}", d.display());
        }
        assert_eq!(
            state_dir_from(os(""), true, None),
            PathBuf::from("/run/strata")
        );
        assert!(state_dir_from(os("rel"), true, None).is_absolute());
    }

    #[test]
    fn zombies_and_missing_processes_are_not_alive() {
        assert!(pid_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie once it has exited.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!pid_alive(pid), "zombie {pid} counts as alive");
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "not reaped yet"
        );
        child.wait().unwrap();
    }

    #[test]
    fn slugs_differ_for_similar_paths() {
        assert_ne!(slug(Path::new("/mnt/a b")), slug(Path::new("/mnt/a_b")));
    }
}
