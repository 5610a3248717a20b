//! A host directory as a layer: descriptors and `*at()` calls on single
//! components (see `crate::host`), nothing followed.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use rustix::fs::OFlags;

use super::{LName, LObj, LStat, Layer};
use crate::host::{HostDir, HostNode, each_entry, open_dir};
use crate::{Errno, Result};

pub struct HostLayer {
    dir: Arc<HostDir>,
    /// The layer's root: the directory's own, or one below it (a frozen
    /// layer of a workspace, served through the upper's `HostDir`).
    root: Arc<HostNode>,
    /// Whether the directory is this layer's alone (its descriptors are
    /// counted, and watched, here).
    own_dir: bool,
}

impl HostLayer {
    pub fn new(dir: HostDir) -> HostLayer {
        let root = dir.root().clone();
        HostLayer {
            dir: Arc::new(dir),
            root,
            own_dir: true,
        }
    }

    /// The directory `root` inside `dir` as a read-only layer sharing
    /// `dir`'s descriptors.
    pub fn within(dir: Arc<HostDir>, root: Arc<HostNode>) -> HostLayer {
        HostLayer {
            dir,
            root,
            own_dir: false,
        }
    }

    fn node<'a>(&self, obj: &'a LObj) -> Result<&'a Arc<HostNode>> {
        match obj {
            LObj::Host(n) => Ok(n),
            _ => Err(Errno::EIO),
        }
    }
}

impl Layer for HostLayer {
    fn describe(&self) -> String {
        match self.own_dir {
            true => self.dir.path().display().to_string(),
            false => self
                .dir
                .path_of(&self.root)
                .unwrap_or_else(|| self.dir.path().to_path_buf())
                .display()
                .to_string(),
        }
    }

    fn locate(&self, obj: &LObj) -> String {
        match obj {
            LObj::Host(n) => self
                .dir
                .path_of(n)
                .map_or_else(|| self.describe(), |p| p.display().to_string()),
            _ => self.describe(),
        }
    }

    fn root(&self) -> LObj {
        LObj::Host(self.root.clone())
    }

    fn stat(&self, obj: &LObj) -> Result<LStat> {
        let fd = self.dir.fd(self.node(obj)?)?;
        Ok(LStat::from_stat(&self.dir.stat_fd(fd.as_fd())?))
    }

    fn lookup(&self, dir: &LObj, name: &CStr) -> Result<Option<(LObj, LStat)>> {
        let fd = self.dir.fd(self.node(dir)?)?;
        let st = match self.dir.stat_child(fd.as_fd(), name) {
            Ok(st) => st,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        let node = self.dir.make_node(fd.as_fd(), name, &st)?;
        Ok(Some((LObj::Host(Arc::new(node)), LStat::from_stat(&st))))
    }

    fn list(&self, dir: &LObj, out: &mut Vec<LName>) -> Result<()> {
        list_host(&self.dir, self.node(dir)?, out)
    }

    fn readlink(&self, obj: &LObj) -> Result<Vec<u8>> {
        crate::host::ops::readlink(self.dir.fd(self.node(obj)?)?.as_fd())
    }

    fn xattrs(&self, obj: &LObj) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        host_xattrs(&self.dir, self.dir.fd(self.node(obj)?)?.as_fd())
    }

    fn xattr(&self, obj: &LObj, name: &CStr) -> Option<Vec<u8>> {
        let fd = self.dir.fd(self.node(obj).ok()?).ok()?;
        host_xattr(&self.dir, fd.as_fd(), name)
    }

    fn open(&self, obj: &LObj) -> Result<OwnedFd> {
        self.dir
            .reopen(self.dir.fd(self.node(obj)?)?.as_fd(), OFlags::RDONLY)
    }

    fn cached_fds(&self) -> usize {
        if self.own_dir {
            self.dir.cached_fds()
        } else {
            0
        }
    }

    fn unchanging(&self) -> bool {
        // A frozen layer: nothing writes it any more.
        !self.own_dir
    }

    fn statfs_path(&self) -> &Path {
        self.dir.path()
    }

    fn host(&self) -> Option<&HostDir> {
        Some(&self.dir)
    }
}

/// One extended attribute of the object `fd` holds. Markers are short: a
/// stack buffer serves them without asking the size first.
pub(crate) fn host_xattr(h: &HostDir, fd: BorrowedFd<'_>, name: &CStr) -> Option<Vec<u8>> {
    let path = h.proc_path(fd);
    let mut small = [0u8; 64];
    match rustix::fs::getxattr(path.as_c_str(), name, &mut small[..]) {
        Ok(n) => Some(small[..n].to_vec()),
        Err(rustix::io::Errno::RANGE) => {
            let len = rustix::fs::getxattr_query(path.as_c_str(), name).ok()?;
            let mut v = vec![0u8; len];
            let n = rustix::fs::getxattr(path.as_c_str(), name, &mut v[..]).ok()?;
            v.truncate(n);
            Some(v)
        }
        Err(_) => None,
    }
}

/// All extended attributes of the object `fd` holds.
pub fn host_xattrs(h: &HostDir, fd: BorrowedFd<'_>) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
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

/// Lists the host directory `dir` (names from getdents: one component each).
pub fn list_host(h: &HostDir, dir: &Arc<HostNode>, out: &mut Vec<LName>) -> Result<()> {
    let dfd = open_dir(h.fd(dir)?.as_fd())?;
    each_entry(&dfd, |name, kind, ino| {
        out.push(LName {
            name: name.to_owned(),
            kind,
            key: (dir.dev, ino),
        });
        Ok(())
    })
}
