//! The kernel overlayfs format, as the overlay reads and writes it in its
//! layers: whiteouts (0/0 character devices, unless marked a real device),
//! opaque directories (an xattr), and strata's own temporaries in the upper.
//! Interpreted in every layer, so a former upper can serve as a lower; the
//! layers themselves (`crate::layer`) know nothing of it.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, Stat};

use crate::fs::FileKind;
use crate::host::{HostDir, HostNode, each_entry, open_dir};
use crate::layer::{LObj, LStat, Layer, host_xattr};
use crate::{Errno, Result};

/// Opaque-directory markers, as kernel overlayfs reads them (trusted.* when
/// mounted by root, user.* with `userxattr`).
pub(crate) const OPAQUE_XATTRS: [&CStr; 2] = [c"trusted.overlay.opaque", c"user.overlay.opaque"];

fn is_whiteout(mode: u32, rdev: u64) -> bool {
    mode & libc::S_IFMT == libc::S_IFCHR && rdev == 0
}

/// Marks a 0/0 character device that is a real device, not a whiteout.
/// Kernel overlayfs cannot store one (its mknod refuses with EPERM); strata
/// can, so POSIX programs that make one work. Kernel overlayfs would take it
/// for a whiteout.
pub(crate) const DEVICE_XATTR: &CStr = c"trusted.strata.device";

/// Whether `name` in the host directory `dir`, whose stat is `st`, is a
/// whiteout.
pub(crate) fn host_whiteout(dir: BorrowedFd<'_>, name: &CStr, st: &Stat) -> bool {
    is_whiteout(st.st_mode, st.st_rdev) && !has_device_marker(dir, name)
}

/// Marks strata's temporary objects in an upper (see `tmp_name`).
pub(crate) const TMP_XATTR: &CStr = c"trusted.strata.tmp";

pub(crate) fn mark_tmp(dir: BorrowedFd<'_>, name: &CStr) {
    // Best effort: unmarked, a leftover would show as a user's file.
    let _ = rustix::fs::lsetxattr(
        child_path(dir, name).as_c_str(),
        TMP_XATTR,
        b"y",
        rustix::fs::XattrFlags::empty(),
    );
}

pub(crate) fn unmark_tmp(dir: BorrowedFd<'_>, name: &CStr) {
    let _ = rustix::fs::lremovexattr(child_path(dir, name).as_c_str(), TMP_XATTR);
}

/// A temporary of strata's: named by this daemon (a live one, possibly not
/// marked yet) or marked by any (one a crash left). Listings skip them;
/// removing a directory removes them, which is safe because every operation
/// that makes one holds the namespace lock.
pub(crate) fn is_strata_tmp(dir: BorrowedFd<'_>, name: &CStr) -> bool {
    let n = name.to_bytes();
    let Some(rest) = n.strip_prefix(super::TMP_PREFIX.as_bytes()) else {
        return false;
    };
    let own = format!("{}.", std::process::id());
    rest.starts_with(own.as_bytes())
        || rustix::fs::lgetxattr(
            child_path(dir, name).as_c_str(),
            TMP_XATTR,
            &mut [0u8; 1][..],
        )
        .is_ok()
}

/// `/proc/self/fd/DIR/NAME`: reaches `name` without following it, for the
/// `l*xattr` calls.
fn child_path(dir: BorrowedFd<'_>, name: &CStr) -> CString {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.to_bytes());
    CString::new(path).expect("a CStr has no NUL")
}

fn has_device_marker(dir: BorrowedFd<'_>, name: &CStr) -> bool {
    rustix::fs::lgetxattr(
        child_path(dir, name).as_c_str(),
        DEVICE_XATTR,
        &mut [0u8; 1][..],
    )
    .is_ok()
}

/// Creates the 0/0 character device `name` in the upper directory `dir`,
/// marked as a device so it is not read as a whiteout. Only root can mark it
/// (trusted.*); others get EPERM, as from kernel overlayfs.
pub(crate) fn make_zero_device(dir: BorrowedFd<'_>, name: &CStr, perm: u32) -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        return Err(Errno::EPERM);
    }
    rustix::fs::mknodat(
        dir,
        name,
        rustix::fs::FileType::CharacterDevice,
        Mode::from_raw_mode(perm),
        0,
    )?;
    let marked = rustix::fs::lsetxattr(
        child_path(dir, name).as_c_str(),
        DEVICE_XATTR,
        b"y",
        rustix::fs::XattrFlags::empty(),
    );
    if let Err(e) = marked {
        let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
        return Err(e.into());
    }
    Ok(())
}

pub(crate) fn host_opaque(h: &HostDir, fd: BorrowedFd<'_>) -> bool {
    OPAQUE_XATTRS
        .iter()
        .any(|n| host_xattr(h, fd, n).is_some_and(|v| v == b"y"))
}

/// A name in a layer's listing, read in overlay format.
pub(crate) struct Listed {
    pub name: CString,
    pub kind: FileKind,
    /// Identity in the layer, as in `LStat::key`.
    pub key: (u64, u64),
    /// A whiteout: hides the name in the layers below.
    pub whiteout: bool,
}

/// Whether the object `obj` of `layer`, whose stat is `st`, is a whiteout.
pub(crate) fn lower_whiteout(layer: &dyn Layer, obj: &LObj, st: &LStat) -> bool {
    is_whiteout(st.mode, st.rdev) && layer.xattr(obj, DEVICE_XATTR).is_none()
}

/// Whether the directory `dir` of `layer` is opaque (hides what lies below).
pub(crate) fn lower_opaque(layer: &dyn Layer, dir: &LObj) -> bool {
    OPAQUE_XATTRS
        .iter()
        .any(|n| layer.xattr(dir, n).is_some_and(|v| v == b"y"))
}

/// The names of the directory `dir` of `layer`, whiteouts flagged, strata's
/// temporaries left out.
pub(crate) fn list_layer(layer: &dyn Layer, dir: &LObj, out: &mut Vec<Listed>) -> Result<()> {
    if let (Some(h), LObj::Host(node)) = (layer.host(), dir) {
        return list_host_dir(h, node, out);
    }
    let mut names = Vec::new();
    layer.list(dir, &mut names)?;
    for n in names {
        let whiteout = n.kind == FileKind::CharDevice
            && layer
                .lookup(dir, &n.name)?
                .is_some_and(|(obj, st)| lower_whiteout(layer, &obj, &st));
        out.push(Listed {
            name: n.name,
            kind: n.kind,
            key: n.key,
            whiteout,
        });
    }
    Ok(())
}

/// Lists a host directory (a host lower or the upper); character devices
/// are stat'ed to tell whiteouts.
pub(crate) fn list_host_dir(h: &HostDir, dir: &Arc<HostNode>, out: &mut Vec<Listed>) -> Result<()> {
    let dfd = open_dir(h.fd(dir)?.as_fd())?;
    each_entry(&dfd, |name, kind, ino| {
        if is_strata_tmp(dfd.as_fd(), name) {
            return Ok(());
        }
        let whiteout = kind == FileKind::CharDevice
            && rustix::fs::statat(&dfd, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| host_whiteout(dfd.as_fd(), name, &st));
        out.push(Listed {
            name: name.to_owned(),
            kind,
            key: (dir.dev, ino),
            whiteout,
        });
        Ok(())
    })
}
