//! `link-exdev` and `rename-exdev`: when path preservation forbids a link or
//! rename across branches (EXDEV), mergerfs can leave a symlink to the file
//! instead. Applications that cannot handle EXDEV then see the new name work.

use std::ffi::{CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::fs::AtFlags;

use super::policy::Func;
use super::settings::{LinkExdev, RenameExdev};
use super::{Inst, Union};
use crate::fs::{Ctx, Entry, FileKind};
use crate::{Errno, Result};

/// Where `rename-exdev` parks renamed files on their branch (mergerfs's name,
/// so pools switched from mergerfs keep one such directory).
pub const RENAME_EXDEV_DIR: &str = ".mergerfs_rename_exdev";

/// The path from directory `from_dir` to `to`, both relative to the union's
/// root: `a/b` to `c/f` is `../../c/f`.
pub fn relative(from_dir: &[u8], to: &[u8]) -> Vec<u8> {
    let parts = |p: &[u8]| -> Vec<Vec<u8>> {
        p.split(|c| *c == b'/')
            .filter(|s| !s.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    };
    let (from, to) = (parts(from_dir), parts(to));
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut out: Vec<Vec<u8>> = vec![b"..".to_vec(); from.len() - common];
    out.extend(to[common..].iter().cloned());
    out.join(&b'/')
}

impl Union {
    fn pool_path(&self, rel: &[u8]) -> PathBuf {
        self.mountpoint.join(OsStr::from_bytes(rel))
    }

    /// Creates symlink `name` in `parent` (by the symlink create policy)
    /// pointing at `target`, without keeping a kernel reference to it.
    fn exdev_symlink(&self, ctx: &Ctx, parent: u64, name: &CStr, target: &[u8]) -> Result<()> {
        let target = OsStr::from_bytes(target);
        let entry = self.make_node(
            ctx,
            Func::Symlink,
            FileKind::Symlink,
            parent,
            name,
            |_, pfd, name| Ok(rustix::fs::symlinkat(target, pfd, name)?),
        )?;
        self.table.forget(entry.attr.ino, 1);
        // The kernel believes the new name is the file itself (link and
        // rename replies say so); once the request is over, make it look again.
        self.invalidate_later(Some((parent, name.to_owned())), &[]);
        Ok(())
    }

    /// `link-exdev`: `new_name` becomes a symlink to node `ino` (seen on
    /// instance `inst`). The reply names the file itself, as the kernel
    /// insists a link has its target's type.
    pub(super) fn link_as_symlink(
        &self,
        ctx: &Ctx,
        ino: u64,
        inst: &Inst,
        how: LinkExdev,
        new_parent: u64,
        new_name: &CStr,
    ) -> Result<Entry> {
        let old = self.rel_path(ino);
        let target = match how {
            LinkExdev::Passthrough => return Err(Errno::EXDEV),
            LinkExdev::RelSymlink => relative(&self.rel_path(new_parent), &old),
            LinkExdev::AbsBaseSymlink => inst
                .branch
                .path
                .join(OsStr::from_bytes(&old))
                .into_os_string()
                .into_encoded_bytes(),
            LinkExdev::AbsPoolSymlink => self.pool_path(&old).into_os_string().into_encoded_bytes(),
        };
        self.exdev_symlink(ctx, new_parent, new_name, &target)?;
        let (parent, name) = self.node(ino)?.loc.lock().clone();
        self.lookup_name(parent, &name)
    }

    /// `rename-exdev`: moves `name` in `parent` on each of `moved`'s branches
    /// to the same path under [`RENAME_EXDEV_DIR`] there, and makes
    /// `new_name` a symlink to it.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn rename_as_symlink(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &CStr,
        moved: &[Inst],
        how: RenameExdev,
        new_parent: u64,
        new_name: &CStr,
    ) -> Result<()> {
        let dir_rel = self.rel_path(parent);
        let mut parked = RENAME_EXDEV_DIR.as_bytes().to_vec();
        for part in dir_rel.split(|c| *c == b'/').filter(|p| !p.is_empty()) {
            parked.push(b'/');
            parked.extend_from_slice(part);
        }
        let mut done = false;
        for inst in moved {
            let b = &inst.branch;
            let Some(pdir) = self
                .instances(parent)?
                .into_iter()
                .find(|i| i.branch.id == b.id)
            else {
                continue;
            };
            // mkdir -p of the parking directory, never following a symlink.
            let dir = b.walk(&parked, true)?;
            rustix::fs::renameat(&*pdir.fd()?, name, &dir, name)?;
            done = true;
        }
        if !done {
            return Err(Errno::EXDEV);
        }
        parked.push(b'/');
        parked.extend_from_slice(name.to_bytes());
        let target = match how {
            RenameExdev::Passthrough => return Err(Errno::EXDEV),
            RenameExdev::RelSymlink => relative(&self.rel_path(new_parent), &parked),
            RenameExdev::AbsSymlink => self
                .pool_path(&parked)
                .into_os_string()
                .into_encoded_bytes(),
        };
        // rename(2) replaces the target name.
        if let Ok(found) = self.find(new_parent, new_name) {
            for (inst, pfd, st) in found {
                if inst.branch.mode != crate::source::BranchMode::RO && !super::is_dir(&st) {
                    let _ = rustix::fs::unlinkat(&*pfd, new_name, AtFlags::empty());
                }
            }
        }
        self.exdev_symlink(ctx, new_parent, new_name, &target)
    }
}
#[cfg(test)]
mod tests {
    use super::relative;

    #[test]
    fn relative_paths_climb_to_the_common_directory() {
        assert_eq!(relative(b"a/b", b"c/f"), b"../../c/f");
        assert_eq!(relative(b"", b"a/f"), b"a/f");
        assert_eq!(relative(b"a", b"a/b/f"), b"b/f");
        assert_eq!(relative(b"a/x", b"a/f"), b"../f");
    }
}
