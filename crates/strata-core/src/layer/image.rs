//! An image as a layer: a verified manifest (every name one component) and
//! content-addressed blobs, decompressed into the store's cache on first use.

use std::ffi::CStr;
use std::os::fd::OwnedFd;
use std::path::Path;

use strata_image::{Image, Kind, Store};

use super::{LName, LObj, LStat, Layer, layer_name};
use crate::fs::FileKind;
use crate::{Errno, Result};

pub struct ImageLayer {
    store: Store,
    image: Image,
}

impl ImageLayer {
    /// Image `name` of the store at `store_root`; with `fetch`, blobs the
    /// store lacks are fetched from there when first read.
    pub fn open(
        store_root: &Path,
        name: &str,
        fetch: Option<std::sync::Arc<dyn strata_image::Fetch>>,
    ) -> std::result::Result<ImageLayer, String> {
        let mut store = Store::open(store_root).map_err(|e| e.to_string())?;
        if let Some(f) = fetch {
            store = store.with_fetch(f);
        }
        let image = Image::open(&store, name).map_err(|e| format!("image:{name}: {e}"))?;
        Ok(ImageLayer { store, image })
    }

    fn error(&self, what: &str, e: strata_image::Error) -> Errno {
        tracing::error!(image = self.image.name(), "{what}: {e}");
        Errno::EIO
    }

    fn entry(&self, obj: &LObj) -> Result<strata_image::Entry> {
        match obj {
            LObj::Entry(index) => self
                .image
                .entry(*index)
                .map_err(|e| self.error("manifest", e)),
            _ => Err(Errno::EIO),
        }
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

    fn stat_of(e: &strata_image::Entry) -> LStat {
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
        }
    }
}

pub(super) fn kind_of(kind: Kind) -> FileKind {
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

impl Layer for ImageLayer {
    fn describe(&self) -> String {
        format!("image:{}", self.image.name())
    }

    fn root(&self) -> LObj {
        LObj::Entry(0)
    }

    fn locate(&self, obj: &LObj) -> String {
        match self.entry(obj) {
            Ok(e) => format!(
                "{}:/{}",
                self.describe(),
                String::from_utf8_lossy(&self.path_of(e).join(&b'/'))
            ),
            Err(_) => self.describe(),
        }
    }

    fn stat(&self, obj: &LObj) -> Result<LStat> {
        Ok(Self::stat_of(&self.entry(obj)?))
    }

    fn lookup(&self, dir: &LObj, name: &CStr) -> Result<Option<(LObj, LStat)>> {
        let dir = self.entry(dir)?;
        let found = self
            .image
            .lookup(&dir, name.to_bytes())
            .map_err(|e| self.error("manifest", e))?;
        Ok(found.map(|e| (LObj::Entry(e.index), Self::stat_of(&e))))
    }

    fn list(&self, dir: &LObj, out: &mut Vec<LName>) -> Result<()> {
        let dir = self.entry(dir)?;
        for child in self.image.children(&dir) {
            let e = child.map_err(|e| self.error("manifest", e))?;
            out.push(LName {
                name: layer_name(self.image.name(), self.image.entry_name(&e))?,
                kind: kind_of(e.kind),
                key: (0, e.inode as u64),
            });
        }
        Ok(())
    }

    fn readlink(&self, obj: &LObj) -> Result<Vec<u8>> {
        let e = self.entry(obj)?;
        self.image
            .symlink_target(&e)
            .map(<[u8]>::to_vec)
            .ok_or(Errno::EINVAL)
    }

    fn xattrs(&self, obj: &LObj) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let e = self.entry(obj)?;
        Ok(self
            .image
            .xattrs(&e)
            .map_err(|err| self.error("manifest", err))?
            .into_iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect())
    }

    fn xattr(&self, obj: &LObj, name: &CStr) -> Option<Vec<u8>> {
        let e = self.entry(obj).ok()?;
        let xs = self.image.xattrs(&e).ok()?;
        xs.into_iter()
            .find(|(n, _)| *n == name.to_bytes())
            .map(|(_, v)| v.to_vec())
    }

    /// The content, decompressed (and verified) into the store's cache on
    /// first use; a missing or corrupt blob is EIO for this file only.
    fn open(&self, obj: &LObj) -> Result<OwnedFd> {
        let e = self.entry(obj)?;
        let digest = self.image.blob(&e).ok_or(Errno::EINVAL)?;
        match self.store.materialize(&digest) {
            Ok(f) => Ok(f.into()),
            Err(err) => {
                tracing::error!(
                    image = self.image.name(),
                    path = %String::from_utf8_lossy(&self.path_of(e).join(&b'/')),
                    %digest,
                    "cannot read file content: {err}"
                );
                Err(Errno::EIO)
            }
        }
    }

    /// Found by a scan of the manifest, which lists every name.
    fn other_names(&self, obj: &LObj) -> Vec<Vec<Vec<u8>>> {
        let Ok(me) = self.entry(obj) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for n in 1..self.image.len() {
            let Ok(e) = self.image.entry(n) else { continue };
            if e.index == me.index || e.inode != me.inode || e.is_dir() {
                continue;
            }
            out.push(self.path_of(e));
        }
        out
    }

    fn unchanging(&self) -> bool {
        true
    }

    fn statfs_path(&self) -> &Path {
        self.store.root()
    }
}
