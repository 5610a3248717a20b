//! What `strata status` and `strata umount` know about mounts: the kernel's
//! mount table (`/proc/self/mountinfo`) and one small JSON file per mount
//! written by its daemon (pid, source, start time).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

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
    if let Some(dir) = std::env::var_os("STRATA_STATE_DIR") {
        return PathBuf::from(dir);
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/run/strata");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("strata"),
        None => {
            std::env::temp_dir().join(format!("strata-{}", rustix::process::geteuid().as_raw()))
        }
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

pub fn log_path(mountpoint: &Path) -> PathBuf {
    state_dir()
        .join("logs")
        .join(format!("{}.log", slug(mountpoint)))
}

pub fn write_record(rec: &MountRecord) -> io::Result<()> {
    let path = record_path(&rec.mountpoint);
    fs::create_dir_all(path.parent().expect("has parent"))?;
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(rec).expect("serializable"))?;
    fs::rename(tmp, path)
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

/// Whether `path` is a FUSE mount whose daemon is gone (ENOTCONN).
pub fn is_stale(path: &Path) -> bool {
    matches!(fs::metadata(path), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
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
    fn slugs_differ_for_similar_paths() {
        assert_ne!(slug(Path::new("/mnt/a b")), slug(Path::new("/mnt/a_b")));
    }
}
