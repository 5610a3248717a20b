//! Layers: the read side of one source of names and data, behind one small
//! interface (look a name up, stat, list, read a link, read xattrs, open the
//! data, the object's identity). Composition rules (the overlay today; the
//! union, snapshots' frozen uppers, views and archives next) resolve names
//! across a stack of them and interpret what they find: a layer knows
//! nothing of whiteouts, opaque directories or branches.
//!
//! Implementations: a host directory ([`HostLayer`], descriptors and `*at()`
//! calls, see `crate::host`), an image ([`ImageLayer`], a verified
//! manifest and content-addressed blobs) and an archive ([`ArchiveLayer`],
//! tar or zip, indexed when opened) and a view ([`ViewLayer`], directories
//! of other layers placed, filtered and renamed by a spec). Every name a layer hands out is
//! one path component ([`layer_name`]), whatever its source claims.

mod archive;
mod host;
mod image;
pub mod view;

use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use rustix::fs::Stat;

use crate::fs::FileKind;
use crate::host::{HostDir, HostNode};
use crate::{Errno, Result};

pub use archive::ArchiveLayer;
pub(crate) use host::host_xattr;
pub use host::{HostLayer, host_xattrs, list_host};
pub use image::ImageLayer;
pub use view::ViewLayer;

/// An object in a layer.
#[derive(Clone)]
pub enum LObj {
    /// A host object (descriptor cache and file handle in [`HostNode`]).
    Host(Arc<HostNode>),
    /// An entry of a manifest-backed layer (image, archive), or a view's
    /// own directory, by index.
    Entry(u32),
    /// An object of another layer as a view's map shows it.
    Mapped(Arc<Mapped>),
}

/// An object seen through one of a view's maps.
pub struct Mapped {
    /// The map (index in the view's spec).
    pub map: u32,
    /// The object, in the layer `within` says.
    pub obj: LObj,
    pub within: Within,
}

/// Where a [`Mapped`] object lives.
#[derive(Clone)]
pub enum Within {
    /// In the map's source.
    Source,
    /// `obj` is an archive file of the source, shown as a directory.
    ArchiveRoot,
    /// In an archive shown as a directory (`key`: the archive file's
    /// identity in the source).
    Archive(Arc<ArchiveLayer>, (u64, u64)),
}

/// An object's metadata as a layer reports it.
#[derive(Clone, Copy, Debug)]
pub struct LStat {
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
    /// Identity within the layer, equal for hard links: (dev, ino) for
    /// hosts, (0, inode index) for images.
    pub key: (u64, u64),
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
        }
    }
}

/// A name in a layer's directory listing.
pub struct LName {
    pub name: CString,
    pub kind: FileKind,
    /// Identity, as in [`LStat::key`] (from the directory entry: no stat).
    pub key: (u64, u64),
}

/// The read side of one source.
pub trait Layer: Send + Sync {
    /// The layer as users name it: a path, `image:NAME`.
    fn describe(&self) -> String;
    fn root(&self) -> LObj;
    fn stat(&self, obj: &LObj) -> Result<LStat>;
    /// `name` in the directory `dir`, if there.
    fn lookup(&self, dir: &LObj, name: &CStr) -> Result<Option<(LObj, LStat)>>;
    /// The names in a directory, without `.` and `..`.
    fn list(&self, dir: &LObj, out: &mut Vec<LName>) -> Result<()>;
    fn readlink(&self, obj: &LObj) -> Result<Vec<u8>>;
    /// All extended attributes (name, value).
    fn xattrs(&self, obj: &LObj) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// One extended attribute, `None` when absent or unreadable.
    fn xattr(&self, obj: &LObj, name: &CStr) -> Option<Vec<u8>>;
    /// A read-only descriptor of a regular file's content.
    fn open(&self, obj: &LObj) -> Result<OwnedFd>;
    /// The other names (paths from the root, as components) of a multiply
    /// linked file, where the layer knows them.
    fn other_names(&self, _obj: &LObj) -> Vec<Vec<Vec<u8>>> {
        Vec::new()
    }
    /// Host descriptors the layer keeps open.
    fn cached_fds(&self) -> usize {
        0
    }
    /// Where `obj` comes from, for people (the `user.strata.source` xattr,
    /// `strata view explain`): a host path, an archive member, a view's map.
    fn locate(&self, _obj: &LObj) -> String {
        self.describe()
    }
    /// Whether the layer's content never changes while mounted (images,
    /// archives): the kernel may cache it for as long as it likes.
    fn unchanging(&self) -> bool {
        false
    }
    /// A path on the layer's filesystem, for statfs.
    fn statfs_path(&self) -> &Path;
    /// The host directory the layer is, if it is one: it may change behind
    /// the mount's back (and can be watched).
    fn host(&self) -> Option<&HostDir> {
        None
    }
}

/// A name from a layer as a `*at()` argument. Image manifests are checked
/// when opened, but no name from any layer reaches a syscall unchecked: one
/// that is not a single component (`..`, `a/b`, `/x`, empty) would lead the
/// copy-up, link or whiteout it names out of the upper.
pub fn layer_name(layer: &str, name: &[u8]) -> Result<CString> {
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

/// Opens a host directory as a layer.
pub fn open_host(path: &Path, fd_cache: usize) -> std::result::Result<Box<dyn Layer>, String> {
    Ok(Box::new(HostLayer::new(HostDir::open(path, fd_cache)?)))
}

/// Opens the view a spec file declares as a layer (archive indexes kept
/// below `index_dir`).
pub fn open_view(
    spec: &Path,
    fd_cache: usize,
    index_dir: Option<&Path>,
) -> std::result::Result<Box<dyn Layer>, String> {
    Ok(Box::new(ViewLayer::open(spec, fd_cache, index_dir)?))
}

/// Opens an archive file as a layer (its index kept below `index_dir`).
pub fn open_archive(
    path: &Path,
    index_dir: Option<&Path>,
) -> std::result::Result<Box<dyn Layer>, String> {
    Ok(Box::new(ArchiveLayer::open(path, index_dir)?))
}

/// Opens image `name` of the store at `store_root` as a layer.
pub fn open_image(
    store_root: &Path,
    name: &str,
    fetch: Option<std::sync::Arc<dyn strata_image::Fetch>>,
) -> std::result::Result<Box<dyn Layer>, String> {
    Ok(Box::new(ImageLayer::open(store_root, name, fetch)?))
}
