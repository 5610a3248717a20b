//! strata run the way mount(8) runs it: `mount -t fuse.strata` and fstab
//! lines go through /sbin/mount.fuse3, which calls `strata SOURCE MOUNTPOINT
//! -o OPTIONS` (adding `dev,suid` for root, keeping `x-*`, dropping `nofail`
//! and `_netdev`). mount(8) looks the program up in a fixed PATH; these
//! tests call mount.fuse3 directly, with this build first in PATH.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

const MOUNT_FUSE3: &str = "/sbin/mount.fuse3";

/// A mount made through mount.fuse3, detached on drop if a test fails.
struct HelperMount {
    dir: tempfile::TempDir,
    mnt: PathBuf,
}

impl HelperMount {
    /// Mounts the source `make` makes in the scratch dir, with `opts` and
    /// the options `make` adds (paths in the scratch dir).
    fn new(opts: &str, make: impl FnOnce(&Path) -> (String, String)) -> Option<HelperMount> {
        if !Path::new(MOUNT_FUSE3).exists() {
            eprintln!("skipped: {MOUNT_FUSE3} is not installed (Debian package fuse3)");
            return None;
        }
        let dir = scratch_dir();
        let bin = dir.path().join("bin");
        fs::create_dir(&bin).unwrap();
        std::os::unix::fs::symlink(STRATA, bin.join("strata")).unwrap();
        let (source, extra) = make(dir.path());
        let opts = if extra.is_empty() {
            opts.to_string()
        } else {
            format!("{opts},{extra}")
        };
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = output_with_timeout(
            Command::new(MOUNT_FUSE3)
                .arg(&source)
                .arg(&mnt)
                .args(["-t", "fuse.strata", "-o", &opts])
                .env("PATH", path)
                .env("STRATA_STATE_DIR", dir.path().join("state"))
                .env("STRATA_STORE", dir.path().join("store")),
            Duration::from_secs(30),
        )
        .expect("mount.fuse3 timed out");
        let m = HelperMount { dir, mnt };
        assert!(
            out.status.success(),
            "mount.fuse3 {source} -o {opts}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(fstype_at(&m.mnt).as_deref(), Some("fuse.strata"));
        Some(m)
    }

    /// The mount's options in the mount table (`rw,nosuid,...`).
    fn flags(&self) -> Vec<String> {
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let needle = format!(" {} ", self.mnt.display());
        let line = info.lines().rfind(|l| l.contains(&needle)).unwrap();
        line.split_whitespace()
            .nth(5)
            .unwrap()
            .split(',')
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for HelperMount {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = run_with_timeout(
                Command::new(STRATA).arg("umount").arg(&self.mnt),
                Duration::from_secs(20),
            );
        }
        if is_mounted(&self.mnt) {
            let _ = rustix::mount::unmount(&self.mnt, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

#[test]
fn mount_fuse3_mounts_with_the_generic_flags_it_is_given() {
    let Some(m) = HelperMount::new(
        "rw,noexec,noatime,nofail,x-systemd.automount,category.create=mfs",
        |d| {
            for b in ["a", "b"] {
                fs::create_dir(d.join(b)).unwrap();
            }
            fs::write(d.join("a/f"), b"union").unwrap();
            let source = format!("{}:{}", d.join("a").display(), d.join("b").display());
            (source, String::new())
        },
    ) else {
        return;
    };
    let flags = m.flags();
    // dev and suid as mount.fuse3 passes them for root; the rest as asked.
    for want in ["noexec", "noatime"] {
        assert!(flags.iter().any(|f| f == want), "{want} missing: {flags:?}");
    }
    for unwanted in ["nosuid", "nodev"] {
        assert!(
            !flags.iter().any(|f| f == unwanted),
            "{unwanted}: {flags:?}"
        );
    }
    assert_eq!(fs::read(m.mnt.join("f")).unwrap(), b"union");
    // The union's own option reached it.
    let policy = get_xattr(&m.mnt.join(".strata"), "user.strata.category.create").unwrap();
    assert_eq!(policy, b"mfs");
    // umount(8) ends the daemon and its record.
    let out =
        output_with_timeout(Command::new("umount").arg(&m.mnt), Duration::from_secs(20)).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state = m.dir.path().join("state");
    let gone = wait_until(Duration::from_secs(10), || {
        let out = strata(&["status", "--json"], &state);
        !String::from_utf8_lossy(&out.stdout).contains(&m.mnt.display().to_string())
    });
    assert!(gone, "the daemon's record outlived umount");
}

#[test]
fn an_image_with_an_upper_and_strictatime_through_the_helper() {
    let Some(m) = HelperMount::new("strictatime,nosuid,nodev", |d| {
        let src = d.join("tree");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), b"image").unwrap();
        build_image(&src, &d.join("store"), "base");
        fs::create_dir(d.join("up")).unwrap();
        let extra = format!(
            "upper={},store={}",
            d.join("up").display(),
            d.join("store").display()
        );
        ("image:base".to_string(), extra)
    }) else {
        return;
    };
    let flags = m.flags();
    // Asked for nosuid and nodev: mount.fuse3 then adds no dev,suid.
    for want in ["nosuid", "nodev"] {
        assert!(flags.iter().any(|f| f == want), "{want} missing: {flags:?}");
    }
    // strictatime: neither relatime nor noatime in the table.
    assert!(
        !flags.iter().any(|f| f == "relatime" || f == "noatime"),
        "{flags:?}"
    );
    assert_eq!(fs::read(m.mnt.join("f")).unwrap(), b"image");
    fs::write(m.mnt.join("f"), b"changed").unwrap();
    assert_eq!(fs::read(m.dir.path().join("up/f")).unwrap(), b"changed");
}

/// The access time of `path`, seconds.
fn atime(path: &Path) -> i64 {
    fs::metadata(path).unwrap().atime()
}

#[test]
fn noatime_leaves_the_hosts_access_times_alone() {
    let make = |d: &Path| {
        let src = d.join("src");
        fs::create_dir(&src).unwrap();
        fs::write(src.join("f"), b"data").unwrap();
        // atime older than mtime: relatime on the host updates it on read.
        set_atime_mtime(&src.join("f"), 1_000, 2_000);
        (src.display().to_string(), String::new())
    };
    let Some(plain) = HelperMount::new("passthrough=false", make) else {
        return;
    };
    let host = plain.dir.path().join("src/f");
    fs::read(plain.mnt.join("f")).unwrap();
    if atime(&host) == 1_000 {
        eprintln!("skipped: the host's own mount does not update access times");
        return;
    }
    // Files the daemon serves only: under kernel passthrough the kernel
    // opens the host file itself, with the reader's flags, and the host
    // mount's own atime mode applies (docs: README, mount options).
    let m = HelperMount::new("noatime,passthrough=false", make).unwrap();
    let host = m.dir.path().join("src/f");
    assert_eq!(fs::read(m.mnt.join("f")).unwrap(), b"data");
    assert_eq!(atime(&host), 1_000, "the read touched the host's atime");
}

fn set_atime_mtime(path: &Path, atime: i64, mtime: i64) {
    let t = |s| rustix::fs::Timespec {
        tv_sec: s,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        path,
        &rustix::fs::Timestamps {
            last_access: t(atime),
            last_modification: t(mtime),
        },
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
}
