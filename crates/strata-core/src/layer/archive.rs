//! An archive (tar, tar.gz, tar.zst, tar.xz, zip) as a layer: its index
//! (every name one component, see `strata_archive`) answers names and
//! metadata without touching the archive; a member's data is extracted on
//! first open.

use std::ffi::CStr;
use std::os::fd::OwnedFd;
use std::path::Path;

use strata_archive::{Archive, Kind, Member};

use super::image::kind_of;
use super::{LName, LObj, LStat, Layer, layer_name};
use crate::{Errno, Result};

pub struct ArchiveLayer {
    archive: Archive,
    label: String,
}

impl ArchiveLayer {
    /// The archive at `path`; its index is kept below `index_dir` for the
    /// next mount, when given.
    pub fn open(
        path: &Path,
        index_dir: Option<&Path>,
    ) -> std::result::Result<ArchiveLayer, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        ArchiveLayer::from_file(file, path, index_dir)
    }

    /// The archive open as `file` (a member of another layer, say); `path`
    /// names it in messages.
    pub fn from_file(
        file: std::fs::File,
        path: &Path,
        index_dir: Option<&Path>,
    ) -> std::result::Result<ArchiveLayer, String> {
        let archive = Archive::from_file_kept(file, path, index_dir).map_err(|e| e.to_string())?;
        tracing::info!(
            archive = %path.display(),
            format = archive.format().name(),
            members = archive.len() - 1,
            kept = archive.from_kept_index(),
            "archive indexed"
        );
        Ok(ArchiveLayer {
            label: path.display().to_string(),
            archive,
        })
    }

    fn member(&self, obj: &LObj) -> Result<(u32, &Member)> {
        match obj {
            LObj::Entry(i) => Ok((*i, self.archive.member(*i).ok_or(Errno::EIO)?)),
            _ => Err(Errno::EIO),
        }
    }

    fn stat_of(m: &Member) -> LStat {
        let t = (m.mtime, 0);
        let ty = match m.kind {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::CharDevice => libc::S_IFCHR,
            Kind::BlockDevice => libc::S_IFBLK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
        };
        let size = match m.kind {
            Kind::Symlink => m.target.len() as u64,
            _ => m.size,
        };
        LStat {
            mode: ty | m.perm,
            uid: m.uid,
            gid: m.gid,
            size,
            blocks: size.div_ceil(512),
            nlink: m.nlink,
            rdev: libc::makedev(m.rdev.0, m.rdev.1),
            atime: t,
            mtime: t,
            ctime: t,
            key: (0, m.inode as u64),
        }
    }
}

impl Layer for ArchiveLayer {
    fn describe(&self) -> String {
        format!("{} ({})", self.label, self.archive.format().name())
    }

    fn root(&self) -> LObj {
        LObj::Entry(0)
    }

    fn locate(&self, obj: &LObj) -> String {
        match self.member(obj) {
            Ok((i, _)) => format!(
                "{}:/{}",
                self.label,
                String::from_utf8_lossy(&self.archive.path_of(i).join(&b'/'))
            ),
            Err(_) => self.describe(),
        }
    }

    fn stat(&self, obj: &LObj) -> Result<LStat> {
        Ok(Self::stat_of(self.member(obj)?.1))
    }

    fn lookup(&self, dir: &LObj, name: &CStr) -> Result<Option<(LObj, LStat)>> {
        let (dir, _) = self.member(dir)?;
        Ok(self.archive.lookup(dir, name.to_bytes()).and_then(|i| {
            let m = self.archive.member(i)?;
            Some((LObj::Entry(i), Self::stat_of(m)))
        }))
    }

    fn list(&self, dir: &LObj, out: &mut Vec<LName>) -> Result<()> {
        let (dir, _) = self.member(dir)?;
        for &c in self.archive.children(dir) {
            let m = self.archive.member(c).ok_or(Errno::EIO)?;
            out.push(LName {
                name: layer_name(&self.label, &m.name)?,
                kind: kind_of(m.kind),
                key: (0, m.inode as u64),
            });
        }
        Ok(())
    }

    fn readlink(&self, obj: &LObj) -> Result<Vec<u8>> {
        let (_, m) = self.member(obj)?;
        if m.kind != Kind::Symlink {
            return Err(Errno::EINVAL);
        }
        Ok(m.target.clone())
    }

    fn xattrs(&self, _obj: &LObj) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(Vec::new())
    }

    fn xattr(&self, _obj: &LObj, _name: &CStr) -> Option<Vec<u8>> {
        None
    }

    /// The member's data, extracted on first use; a member the archive
    /// cannot give whole (truncated, corrupt, bigger than declared) is EIO
    /// for that member only.
    fn open(&self, obj: &LObj) -> Result<OwnedFd> {
        let (i, _) = self.member(obj)?;
        self.archive.open_member(i).map_err(|e| {
            tracing::error!(
                archive = %self.label,
                member = %String::from_utf8_lossy(&self.archive.path_of(i).join(&b'/')),
                "cannot read member: {e}"
            );
            Errno::EIO
        })
    }

    fn other_names(&self, obj: &LObj) -> Vec<Vec<Vec<u8>>> {
        let Ok((i, _)) = self.member(obj) else {
            return Vec::new();
        };
        self.archive
            .other_names(i)
            .into_iter()
            .map(|o| {
                self.archive
                    .path_of(o)
                    .into_iter()
                    .map(<[u8]>::to_vec)
                    .collect()
            })
            .collect()
    }

    fn unchanging(&self) -> bool {
        true
    }

    fn statfs_path(&self) -> &Path {
        self.archive.path()
    }
}
