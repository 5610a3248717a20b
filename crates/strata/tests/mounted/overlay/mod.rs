//! The copy-on-write overlay on real mounts: a host directory as the lower
//! (the scratch directory's `src`) under a writable upper (`upper`), checked
//! against the semantics and on-disk format of kernel overlayfs (the cases of
//! unionmount-testsuite: copy-up, whiteouts, opaque directories, renames,
//! hard links, special files, listings), and against the kernel itself. A
//! module per concern; the helpers they share are here.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use rustix::fs::{CWD, RenameFlags};

mod copy_up;
mod inodes;
mod kernel;
mod listings;
mod open_files;
mod rename;
mod sources;
mod special_files;
mod temporaries;
mod users;
mod watch;
mod whiteouts;

/// An old, exact timestamp (seconds, nanoseconds) for lower objects.
const T0: (i64, i64) = (1_000_000_000, 123_456_789);
const T1: (i64, i64) = (1_100_000_000, 987_654_321);

/// Mounts the host directory `src` (filled by `prepare`) with the upper
/// `upper`, both in the scratch directory.
fn overlay(prepare: impl FnOnce(&Path)) -> Mounted {
    Mounted::overlay(&[], prepare)
}

/// Mounts the lower and upper of an earlier (unmounted) overlay again.
fn remount(first: &Mounted) -> Mounted {
    let src = first.src.clone();
    let upper = first.upper();
    Mounted::build_with(&[], &[], move |_| {
        (
            src.display().to_string(),
            vec![format!("upper={}", upper.display())],
        )
    })
}

/// Path inside the upper.
fn up(m: &Mounted, rel: &str) -> PathBuf {
    m.upper().join(rel)
}

/// Whether `p` is an overlayfs whiteout: a 0/0 character device (and not
/// one strata marked as a real device).
fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|md| {
        md.file_type().is_char_device()
            && md.rdev() == 0
            && get_xattr(p, "trusted.strata.device").is_none()
    })
}

fn opaque(p: &Path) -> Option<Vec<u8>> {
    get_xattr(p, "trusted.overlay.opaque")
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

fn write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn append(p: &Path, data: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {} for append: {e}", p.display()));
    f.write_all(data).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn mtime(md: &fs::Metadata) -> (i64, i64) {
    (md.mtime(), md.mtime_nsec())
}

fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn ino(p: &Path) -> u64 {
    lstat(p).ino()
}

/// No temporary names left anywhere in the upper.
fn assert_no_temporaries(m: &Mounted) {
    let tree = walk(&m.upper(), Detail::default());
    let tmp: Vec<&String> = tree
        .objs
        .keys()
        .filter(|p| p.rsplit('/').next().unwrap().starts_with(".strata-tmp"))
        .collect();
    assert!(tmp.is_empty(), "temporary names left in the upper: {tmp:?}");
}

fn renameat2(from: &Path, to: &Path, flags: RenameFlags) -> Result<(), i32> {
    rustix::fs::renameat_with(CWD, from, CWD, to, flags).map_err(|e| e.raw_os_error())
}

/// Runs a command on the mount, killed after 30 s.
fn run(cmd: &mut Command) -> std::process::Output {
    output_with_timeout(cmd, Duration::from_secs(30)).unwrap_or_else(|| panic!("{cmd:?} timed out"))
}

/// A lower tree `tree` to move: nested directories, an empty one, files
/// with old mtimes, an xattr, a relative symlink, a mode of its own.
fn rename_tree(src: &Path) {
    fs::create_dir_all(src.join("tree/sub/deeper")).unwrap();
    fs::create_dir_all(src.join("tree/emptydir")).unwrap();
    write(&src.join("tree/x"), b"x");
    write(&src.join("tree/sub/y"), b"y");
    write(&src.join("tree/sub/deeper/z"), b"z");
    std::os::unix::fs::symlink("../x", src.join("tree/sub/link")).unwrap();
    set_xattr(&src.join("tree/sub/y"), "user.tag", b"t");
    chmod(&src.join("tree/sub"), 0o711);
    for p in ["tree/x", "tree/sub/y", "tree/sub/deeper/z"] {
        set_mtime(&src.join(p), T0.0, T0.1);
    }
}

/// Unmounts `m` and mounts its layers (`lowers`, joined by ':', under the
/// scratch directory's `upper`) with kernel overlayfs instead, at the
/// scratch directory's `kernel`.
fn kernel_overlay(m: &mut Mounted, lowers: &str) -> KernelOverlay {
    m.unmount();
    let d = m.dir.path();
    let (work, kmnt) = (d.join("work"), d.join("kernel"));
    fs::create_dir(&work).unwrap();
    fs::create_dir(&kmnt).unwrap();
    KernelOverlay::mount(lowers, &m.upper(), &work, &kmnt)
}
