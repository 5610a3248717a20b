//! The read-only layers below an overlay's upper: host directories and
//! images, behind one small interface (look a name up, stat, list, read a
//! link, read xattrs, open the data).
//!
//! Whiteouts (0/0 character devices) and opaque markers are interpreted in
//! every layer, so a former upper can serve as a lower.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{AtFlags, Mode, OFlags, Stat};
use strata_image::{Image, Kind, Store};

use crate::fs::FileKind;
use crate::host::{HostDir, HostNode, dirent_kind};
use crate::{Errno, Result};

/// Opaque-directory markers, as kernel overlayfs reads them (trusted.* when
/// mounted by root, user.* with `userxattr`).
pub(crate) const OPAQUE_XATTRS: [&CStr; 2] = [c"trusted.overlay.opaque", c"user.overlay.opaque"];

/// One lower layer.
pub(crate) enum Layer {
    Host(HostDir),
    Image(ImageLayer),
}

pub(crate) struct ImageLayer {
    pub(crate) store: Store,
    pub(crate) image: Image,
}

/// An object in a lower layer.
#[derive(Clone)]
pub(crate) enum LObj {
    Host(Arc<HostNode>),
    /// Entry index in the image manifest.
    Image(u32),
}

/// A lower object's metadata, the parts the overlay needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LStat {
    /// Full `st_mode`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub blocks: u64,
    pub nlink: u32,
    pub rdev: u64,
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    /// Identity within the layer: (dev, ino) for hosts, (0, inode index) for images.
    pub key: (u64, u64),
    /// A whiteout: hides the name in the layers below.
    pub whiteout: bool,
}

impl LStat {
    pub fn kind(&self) -> Option<FileKind> {
        FileKind::from_mode(self.mode)
    }

    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    pub fn from_stat(st: &Stat) -> LStat {
        LStat {
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            nlink: st.st_nlink as u32,
            rdev: st.st_rdev,
            atime: (st.st_atime, st.st_atime_nsec as u32),
            mtime: (st.st_mtime, st.st_mtime_nsec as u32),
            ctime: (st.st_ctime, st.st_ctime_nsec as u32),
            key: (st.st_dev, st.st_ino),
            whiteout: is_whiteout(st.st_mode, st.st_rdev),
        }
    }
}

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

/// A name in a lower directory listing.
pub(crate) struct LName {
    pub name: CString,
    pub kind: FileKind,
    pub whiteout: bool,
    /// Identity in the layer, as in `LStat::key` (from the directory entry:
    /// no stat needed).
    pub key: (u64, u64),
}

/// A name from a layer as a `*at()` argument. Image manifests are checked
/// when opened, but no name from any layer reaches a syscall unchecked: one
/// that is not a single component (`..`, `a/b`, `/x`, empty) would lead the
/// copy-up, link or whiteout it names out of the upper.
pub(crate) fn layer_name(layer: &str, name: &[u8]) -> Result<CString> {
    if let Some(why) = strata_image::entry_name_problem(name) {
        tracing::error!(
            layer,
            "refusing name {:?}: {why}",
            String::from_utf8_lossy(name)
        );
        return Err(Errno::EIO);
    }
    CString::new(name).map_err(|_| Errno::EIO)
}

fn image_error(layer: &ImageLayer, what: &str, e: strata_image::Error) -> Errno {
    tracing::error!(image = layer.image.name(), "{what}: {e}");
    Errno::EIO
}

impl ImageLayer {
    fn entry(&self, index: u32) -> Result<strata_image::Entry> {
        self.image
            .entry(index)
            .map_err(|e| image_error(self, "manifest", e))
    }

    /// An entry's path from the image root, as components.
    fn path_of(&self, e: strata_image::Entry) -> Vec<Vec<u8>> {
        let mut path = Vec::new();
        let mut cur = e;
        while cur.index != 0 {
            path.push(self.image.entry_name(&cur).to_vec());
            match self.image.entry(cur.parent) {
                Ok(p) => cur = p,
                Err(_) => break,
            }
        }
        path.reverse();
        path
    }

    fn is_whiteout(&self, e: &strata_image::Entry) -> bool {
        is_whiteout(e.mode, e.rdev())
            && !self
                .image
                .xattrs(e)
                .is_ok_and(|xs| xs.iter().any(|(n, _)| *n == DEVICE_XATTR.to_bytes()))
    }

    fn stat(&self, e: &strata_image::Entry) -> LStat {
        let t = (e.mtime_sec, e.mtime_nsec);
        LStat {
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            size: e.size,
            blocks: e.size.div_ceil(512),
            nlink: e.nlink,
            rdev: e.rdev(),
            atime: t,
            mtime: t,
            ctime: t,
            key: (0, e.inode as u64),
            whiteout: self.is_whiteout(e),
        }
    }
}

fn kind_of(kind: Kind) -> FileKind {
    match kind {
        Kind::File => FileKind::Regular,
        Kind::Dir => FileKind::Directory,
        Kind::Symlink => FileKind::Symlink,
        Kind::CharDevice => FileKind::CharDevice,
        Kind::BlockDevice => FileKind::BlockDevice,
        Kind::Fifo => FileKind::Fifo,
        Kind::Socket => FileKind::Socket,
    }
}

impl Layer {
    pub fn open_host(path: &Path, fd_cache: usize) -> std::result::Result<Layer, String> {
        Ok(Layer::Host(HostDir::open(path, fd_cache)?))
    }

    pub fn open_image(store_root: &Path, name: &str) -> std::result::Result<Layer, String> {
        let store = Store::open(store_root).map_err(|e| e.to_string())?;
        let image = Image::open(&store, name).map_err(|e| format!("image:{name}: {e}"))?;
        Ok(Layer::Image(ImageLayer { store, image }))
    }

    /// Whether the layer may change behind the mount's back (kernel caches
    /// then time out quickly).
    pub fn is_host(&self) -> bool {
        matches!(self, Layer::Host(_))
    }

    pub fn root(&self) -> LObj {
        match self {
            Layer::Host(h) => LObj::Host(h.root().clone()),
            Layer::Image(_) => LObj::Image(0),
        }
    }

    pub fn stat(&self, obj: &LObj) -> Result<LStat> {
        match (self, obj) {
            (Layer::Host(h), LObj::Host(n)) => Ok(LStat::from_stat(&h.stat_fd(h.fd(n)?.as_fd())?)),
            (Layer::Image(i), LObj::Image(idx)) => Ok(i.stat(&i.entry(*idx)?)),
            _ => Err(Errno::EIO),
        }
    }

    /// Looks `name` up in the directory `dir`; whiteouts are returned (the
    /// caller decides what they hide).
    pub fn lookup(&self, dir: &LObj, name: &CStr) -> Result<Option<(LObj, LStat)>> {
        match (self, dir) {
            (Layer::Host(h), LObj::Host(d)) => {
                let fd = h.fd(d)?;
                let st = match h.stat_child(fd.as_fd(), name) {
                    Ok(st) => st,
                    Err(Errno::ENOENT) => return Ok(None),
                    Err(e) => return Err(e),
                };
                let node = h.make_node(fd.as_fd(), name, &st)?;
                let mut lst = LStat::from_stat(&st);
                lst.whiteout = host_whiteout(fd.as_fd(), name, &st);
                Ok(Some((LObj::Host(Arc::new(node)), lst)))
            }
            (Layer::Image(i), LObj::Image(idx)) => {
                let dir = i.entry(*idx)?;
                let found = i
                    .image
                    .lookup(&dir, name.to_bytes())
                    .map_err(|e| image_error(i, "manifest", e))?;
                Ok(found.map(|e| (LObj::Image(e.index), i.stat(&e))))
            }
            _ => Err(Errno::EIO),
        }
    }

    /// Whether a directory is marked opaque (hides what lies below it).
    pub fn is_opaque(&self, dir: &LObj) -> bool {
        match (self, dir) {
            (Layer::Host(h), LObj::Host(d)) => h.fd(d).is_ok_and(|fd| host_opaque(h, fd.as_fd())),
            (Layer::Image(i), LObj::Image(idx)) => i
                .entry(*idx)
                .and_then(|e| {
                    i.image
                        .xattrs(&e)
                        .map_err(|err| image_error(i, "manifest", err))
                        .map(|xs| {
                            xs.iter().any(|(n, v)| {
                                OPAQUE_XATTRS.iter().any(|o| o.to_bytes() == *n) && *v == b"y"
                            })
                        })
                })
                .unwrap_or(false),
            _ => false,
        }
    }

    /// The names in a directory (without `.` and `..`), whiteouts flagged.
    pub fn list(&self, dir: &LObj, out: &mut Vec<LName>) -> Result<()> {
        match (self, dir) {
            (Layer::Host(h), LObj::Host(d)) => list_host(h, d, out),
            (Layer::Image(i), LObj::Image(idx)) => {
                let dir = i.entry(*idx)?;
                for child in i.image.children(&dir) {
                    let e = child.map_err(|e| image_error(i, "manifest", e))?;
                    out.push(LName {
                        name: layer_name(i.image.name(), i.image.entry_name(&e))?,
                        kind: kind_of(e.kind),
                        whiteout: i.is_whiteout(&e),
                        key: (0, e.inode as u64),
                    });
                }
                Ok(())
            }
            _ => Err(Errno::EIO),
        }
    }

    pub fn readlink(&self, obj: &LObj) -> Result<Vec<u8>> {
        match (self, obj) {
            (Layer::Host(h), LObj::Host(n)) => crate::host::ops::readlink(h.fd(n)?.as_fd()),
            (Layer::Image(i), LObj::Image(idx)) => {
                let e = i.entry(*idx)?;
                i.image
                    .symlink_target(&e)
                    .map(<[u8]>::to_vec)
                    .ok_or(Errno::EINVAL)
            }
            _ => Err(Errno::EIO),
        }
    }

    /// All extended attributes (name, value).
    pub fn xattrs(&self, obj: &LObj) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        match (self, obj) {
            (Layer::Host(h), LObj::Host(n)) => host_xattrs(h, h.fd(n)?.as_fd()),
            (Layer::Image(i), LObj::Image(idx)) => {
                let e = i.entry(*idx)?;
                Ok(i.image
                    .xattrs(&e)
                    .map_err(|err| image_error(i, "manifest", err))?
                    .into_iter()
                    .map(|(n, v)| (n.to_vec(), v.to_vec()))
                    .collect())
            }
            _ => Err(Errno::EIO),
        }
    }

    /// A read-only descriptor of a regular file's content. For images the
    /// content is decompressed (and verified) into the store's cache on first
    /// use; a missing or corrupt blob is EIO for this file only.
    pub fn open(&self, obj: &LObj) -> Result<OwnedFd> {
        match (self, obj) {
            (Layer::Host(h), LObj::Host(n)) => h.reopen(h.fd(n)?.as_fd(), OFlags::RDONLY),
            (Layer::Image(i), LObj::Image(idx)) => {
                let e = i.entry(*idx)?;
                let digest = i.image.blob(&e).ok_or(Errno::EINVAL)?;
                let path = || String::from_utf8_lossy(&i.path_of(e).join(&b'/')).into_owned();
                match i.store.materialize(&digest) {
                    Ok(f) => Ok(f.into()),
                    Err(err) => {
                        tracing::error!(
                            image = i.image.name(),
                            path = %path(),
                            %digest,
                            "cannot read file content: {err}"
                        );
                        Err(Errno::EIO)
                    }
                }
            }
            _ => Err(Errno::EIO),
        }
    }

    /// The other names (paths from the root, as components) of a multiply
    /// linked file: found for images by a scan of the manifest; unknown for
    /// host directories.
    pub fn other_names(&self, obj: &LObj) -> Vec<Vec<Vec<u8>>> {
        let (Layer::Image(i), LObj::Image(idx)) = (self, obj) else {
            return Vec::new();
        };
        let Ok(me) = i.entry(*idx) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for n in 1..i.image.len() {
            let Ok(e) = i.image.entry(n) else { continue };
            if e.index == me.index || e.inode != me.inode || e.is_dir() {
                continue;
            }
            out.push(i.path_of(e));
        }
        out
    }

    /// Host descriptors cached by this layer (0 for images).
    pub fn cached_fds(&self) -> usize {
        match self {
            Layer::Host(h) => h.cached_fds(),
            Layer::Image(_) => 0,
        }
    }

    /// A host path on the layer's filesystem (for statfs).
    pub fn path(&self) -> &Path {
        match self {
            Layer::Host(h) => h.path(),
            Layer::Image(i) => i.store.root(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Layer::Host(h) => h.path().display().to_string(),
            Layer::Image(i) => format!("image:{}", i.image.name()),
        }
    }
}

pub(crate) fn host_opaque(h: &HostDir, fd: BorrowedFd<'_>) -> bool {
    let path = h.proc_path(fd);
    let mut v = [0u8; 2];
    OPAQUE_XATTRS.iter().any(|name| {
        matches!(rustix::fs::getxattr(path.as_c_str(), *name, &mut v[..]), Ok(1) if v[0] == b'y')
    })
}

pub(crate) fn host_xattrs(
    h: &HostDir,
    fd: std::os::fd::BorrowedFd<'_>,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let path = h.proc_path(fd);
    let n = match rustix::fs::listxattr_query(path.as_c_str()) {
        Ok(n) => n,
        Err(rustix::io::Errno::OPNOTSUPP) => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut names = vec![0u8; n];
    let n = rustix::fs::listxattr(path.as_c_str(), &mut names[..])?;
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cname = CString::new(name).expect("split at NUL");
        let Ok(len) = rustix::fs::getxattr_query(path.as_c_str(), cname.as_c_str()) else {
            continue;
        };
        let mut value = vec![0u8; len];
        if let Ok(len) = rustix::fs::getxattr(path.as_c_str(), cname.as_c_str(), &mut value[..]) {
            value.truncate(len);
            out.push((name.to_vec(), value));
        }
    }
    Ok(out)
}

/// Lists a host directory; character devices are stat'ed to tell whiteouts.
pub(crate) fn list_host(h: &HostDir, dir: &Arc<HostNode>, out: &mut Vec<LName>) -> Result<()> {
    let fd = h.fd(dir)?;
    let dfd = rustix::fs::openat(
        &*fd,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut reader = rustix::fs::Dir::read_from(&dfd)?;
    for ent in &mut reader {
        let ent = ent?;
        let name = ent.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        let Some(kind) = dirent_kind(dfd.as_fd(), &ent) else {
            continue;
        };
        if is_strata_tmp(dfd.as_fd(), name) {
            continue;
        }
        let whiteout = kind == FileKind::CharDevice
            && rustix::fs::statat(&dfd, name, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|st| host_whiteout(dfd.as_fd(), name, &st));
        out.push(LName {
            name: name.to_owned(),
            kind,
            whiteout,
            key: (dir.dev, ent.ino()),
        });
    }
    Ok(())
}
