//! The protocol operations of the union: each picks instances by its policy
//! and runs the same host operations as the passthrough layer on them.

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::{AtFlags, Mode, RenameFlags};

use super::control;
use super::policy::{Func, Want};
use super::settings::XattrMode;
use super::{Branch, CONTROL_ID, CONTROL_NAME, Inst, UDir, UnionFs};
use crate::fs::*;
use crate::host::files::{open_file_methods, sync_fd};
use crate::host::{attr_from_stat, component, ops};
use crate::listing;
use crate::{Errno, Result};

fn write_flags(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

/// The function whose policy governs a setattr: the first thing it changes.
fn setattr_func(set: &SetAttr) -> Func {
    if set.size.is_some() {
        Func::Truncate
    } else if set.mode.is_some() {
        Func::Chmod
    } else if set.uid.is_some() || set.gid.is_some() {
        Func::Chown
    } else {
        Func::Utimens
    }
}

impl Filesystem for UnionFs {
    fn lookup(&self, _ctx: &Ctx, parent: u64, name: &OsStr) -> Result<Entry> {
        if parent == ROOT_ID && name == CONTROL_NAME {
            return Ok(control::entry(self.ttl()));
        }
        let name =
            component(name).map_err(|e| if e == Errno::EINVAL { Errno::ENOENT } else { e })?;
        self.lookup_name(parent, &name)
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        if ino != CONTROL_ID {
            self.table.forget(ino, nlookup);
        }
    }

    fn getattr(&self, _ctx: &Ctx, ino: u64, fh: Option<u64>) -> Result<AttrOut> {
        if ino == CONTROL_ID {
            return Ok(control::attr_out(self.ttl()));
        }
        if let Some(file) = fh.and_then(|fh| self.files.get(fh).ok()) {
            let st = rustix::fs::fstat(&*file)?;
            return Ok(self.attr_out(ino, &st));
        }
        let st = self.getattr_stat(&self.instances(ino)?)?;
        Ok(self.attr_out(ino, &st))
    }

    fn setattr(&self, _ctx: &Ctx, ino: u64, fh: Option<u64>, set: &SetAttr) -> Result<AttrOut> {
        if ino == CONTROL_ID {
            return Err(Errno::EPERM);
        }
        let file = fh.and_then(|fh| self.files.get(fh).ok());
        if let (Some(f), Some(size)) = (&file, set.size) {
            // ftruncate: the open file only, wherever it lives.
            rustix::fs::ftruncate(&**f, size)?;
        }
        let rest = SetAttr {
            size: if file.is_some() { None } else { set.size },
            ..*set
        };
        let chosen = self.action(setattr_func(set), ino)?;
        Self::apply(&chosen, |i| {
            ops::set_attr(&i.branch.dir, i.fd()?.as_fd(), None, &rest)
        })?;
        self.getattr(_ctx, ino, fh)
    }

    fn readlink(&self, _ctx: &Ctx, ino: u64) -> Result<Vec<u8>> {
        ops::readlink(self.search(Func::Readlink, ino)?.fd()?.as_fd())
    }

    fn mknod(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<Entry> {
        let kind = rustix::fs::FileType::from_raw_mode(mode);
        self.make_node(ctx, Func::Mknod, parent, name, |b, pfd, name| {
            let perm = ops::create_perm(&b.dir, pfd, mode, umask);
            Ok(rustix::fs::mknodat(
                pfd,
                name,
                kind,
                Mode::from_raw_mode(perm),
                rdev as u64,
            )?)
        })
    }

    fn mkdir(&self, ctx: &Ctx, parent: u64, name: &OsStr, mode: u32, umask: u32) -> Result<Entry> {
        self.make_node(ctx, Func::Mkdir, parent, name, |b, pfd, name| {
            let perm = ops::create_perm(&b.dir, pfd, mode, umask);
            Ok(rustix::fs::mkdirat(pfd, name, Mode::from_raw_mode(perm))?)
        })
    }

    fn unlink(&self, _ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(parent, name, Func::Unlink, AtFlags::empty())
    }

    fn rmdir(&self, _ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()> {
        self.remove(parent, name, Func::Rmdir, AtFlags::REMOVEDIR)
    }

    fn symlink(&self, ctx: &Ctx, parent: u64, name: &OsStr, target: &Path) -> Result<Entry> {
        self.make_node(ctx, Func::Symlink, parent, name, |_, pfd, name| {
            Ok(rustix::fs::symlinkat(target, pfd, name)?)
        })
    }

    fn rename(
        &self,
        _ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let name = component(name)?;
        let new_name = component(new_name)?;
        let flags = RenameFlags::from_bits_retain(flags);
        let source = self.find(parent, &name)?;
        let target = self.find(new_parent, &new_name).ok();
        if flags.contains(RenameFlags::NOREPLACE) && target.is_some() {
            return Err(Errno::EEXIST);
        }
        let src_inst: Vec<Inst> = source.iter().map(|(i, _, _)| i.clone()).collect();
        let chosen = self.pick(Func::Rename, Want::Action, &src_inst)?;
        if flags.contains(RenameFlags::EXCHANGE) {
            // Both names must sit on exactly the same single branch.
            let tgt = target.as_ref().ok_or(Errno::ENOENT)?;
            if chosen.len() != 1 || tgt.len() != 1 || tgt[0].0.branch.id != chosen[0].branch.id {
                return Err(Errno::EXDEV);
            }
        }
        let preserve = self.settings.read().policy(Func::Create).preserves_paths();
        let mut renamed = Vec::new();
        let mut first_err = None;
        for (inst, pfd, _) in &source {
            if !chosen.iter().any(|c| c.branch.id == inst.branch.id) {
                continue;
            }
            let b = &inst.branch;
            let npfd = match self
                .instances(new_parent)?
                .iter()
                .find(|i| i.branch.id == b.id)
            {
                Some(i) => i.fd(),
                // mergerfs: path-preserving policies do not invent directories.
                None if preserve => Err(Errno::EXDEV),
                None => self.dir_on(new_parent, b),
            };
            let res = npfd.and_then(|npfd| {
                Ok(rustix::fs::renameat_with(
                    &**pfd,
                    &name,
                    &*npfd,
                    &new_name,
                    flags & (RenameFlags::EXCHANGE | RenameFlags::NOREPLACE),
                )?)
            });
            match res {
                Ok(()) => renamed.push(b.id),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if renamed.is_empty() {
            return Err(first_err.unwrap_or(Errno::EROFS));
        }
        // The target on other branches would shadow the renamed file: remove it.
        if !flags.contains(RenameFlags::EXCHANGE)
            && let Some(tgt) = target
        {
            for (inst, pfd, st) in tgt {
                if renamed.contains(&inst.branch.id) || inst.branch.mode == super::BranchMode::RO {
                    continue;
                }
                let how = if super::is_dir(&st) {
                    AtFlags::REMOVEDIR
                } else {
                    AtFlags::empty()
                };
                let _ = rustix::fs::unlinkat(&*pfd, &new_name, how);
            }
        }
        Ok(())
    }

    fn link(&self, _ctx: &Ctx, ino: u64, new_parent: u64, new_name: &OsStr) -> Result<Entry> {
        let new_name = component(new_name)?;
        let chosen = self.action(Func::Link, ino)?;
        let preserve = self.settings.read().policy(Func::Create).preserves_paths();
        Self::apply(&chosen, |i| {
            let b = &i.branch;
            let npfd = match self
                .instances(new_parent)?
                .iter()
                .find(|p| p.branch.id == b.id)
            {
                Some(p) => p.fd()?,
                None if preserve => return Err(Errno::EXDEV),
                None => self.dir_on(new_parent, b)?,
            };
            ops::link_fd(&b.dir, i.fd()?.as_fd(), npfd.as_fd(), &new_name)
        })?;
        self.lookup_name(new_parent, &new_name)
    }

    fn open(&self, _ctx: &Ctx, ino: u64, flags: i32) -> Result<Opened> {
        if ino == CONTROL_ID {
            return Ok(self.files.insert(control::open()?, false));
        }
        let inst = self.search(Func::Open, ino)?;
        if write_flags(flags) {
            Self::read_only_err(&inst)?;
        }
        let file = inst
            .branch
            .dir
            .reopen(inst.fd()?.as_fd(), ops::open_flags(flags))?;
        Ok(self.files.insert(file, self.passthrough))
    }

    fn opendir(&self, _ctx: &Ctx, ino: u64, _flags: i32) -> Result<Opened> {
        self.instances(ino)?;
        let fh = self
            .next_dh
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.dirs.lock().insert(
            fh,
            Arc::new(UDir {
                ino,
                entries: parking_lot::Mutex::new(Arc::new(Vec::new())),
            }),
        );
        Ok(Opened {
            fh,
            ..Opened::default()
        })
    }

    fn readdir(
        &self,
        _ctx: &Ctx,
        _ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut dyn DirSink,
    ) -> Result<()> {
        listing::fill(&self.dir_entries(fh, offset)?, offset, sink);
        Ok(())
    }

    fn readdirplus(
        &self,
        _ctx: &Ctx,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut dyn DirPlusSink,
    ) -> Result<()> {
        listing::fill_plus(
            &self.dir_entries(fh, offset)?,
            offset,
            sink,
            || {
                Ok(attr_from_stat(
                    &self.getattr_stat(&self.instances(ino)?)?,
                    ino,
                ))
            },
            |e| self.lookup_name(ino, &e.name),
            |id| {
                self.table.forget(id, 1);
            },
        )
    }

    fn releasedir(&self, _ctx: &Ctx, _ino: u64, fh: u64) -> Result<()> {
        self.dirs.lock().remove(&fh);
        Ok(())
    }

    fn fsyncdir(&self, _ctx: &Ctx, ino: u64, _fh: u64, datasync: bool) -> Result<()> {
        for i in self.instances(ino)? {
            let fd = i.fd()?;
            let dfd = i.branch.dir.reopen(
                fd.as_fd(),
                rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            )?;
            sync_fd(dfd.as_fd(), datasync)?;
        }
        Ok(())
    }

    fn statfs(&self, _ctx: &Ctx, ino: u64) -> Result<StatFs> {
        let inst = if ino == CONTROL_ID || ino == ROOT_ID {
            None
        } else {
            self.instances(ino).ok()
        };
        self.statfs_sum(inst.as_deref())
    }

    fn setxattr(&self, ctx: &Ctx, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        if ino == CONTROL_ID {
            return control::set(self, ctx, name, value);
        }
        self.xattr_writes()?;
        let chosen = self.action(Func::Setxattr, ino)?;
        Self::apply(&chosen, |i| {
            ops::setxattr(&i.branch.dir, i.fd()?.as_fd(), name, value, flags)
        })
    }

    fn getxattr(&self, _ctx: &Ctx, ino: u64, name: &OsStr, size: u32) -> Result<Xattr> {
        if ino == CONTROL_ID {
            return Xattr::reply(control::get(self, name)?, size);
        }
        if let Some(v) = control::file_key(self, ino, name) {
            return Xattr::reply(v?, size);
        }
        match self.xattr_mode() {
            XattrMode::NoSys => return Err(Errno::ENOSYS),
            XattrMode::NoAttr => return Err(Errno::ENODATA),
            XattrMode::Passthrough => {}
        }
        let i = self.search(Func::Getxattr, ino)?;
        ops::getxattr(&i.branch.dir, i.fd()?.as_fd(), name, size)
    }

    fn listxattr(&self, _ctx: &Ctx, ino: u64, size: u32) -> Result<Xattr> {
        if ino == CONTROL_ID {
            return Xattr::reply(control::list(), size);
        }
        match self.xattr_mode() {
            XattrMode::NoSys => return Err(Errno::ENOSYS),
            XattrMode::NoAttr => return Xattr::reply(Vec::new(), size),
            XattrMode::Passthrough => {}
        }
        let i = self.search(Func::Listxattr, ino)?;
        ops::listxattr(&i.branch.dir, i.fd()?.as_fd(), size)
    }

    fn removexattr(&self, _ctx: &Ctx, ino: u64, name: &OsStr) -> Result<()> {
        if ino == CONTROL_ID {
            return Err(Errno::ENOTSUP);
        }
        self.xattr_writes()?;
        let chosen = self.action(Func::Removexattr, ino)?;
        Self::apply(&chosen, |i| {
            ops::removexattr(&i.branch.dir, i.fd()?.as_fd(), name)
        })
    }

    fn access(&self, ctx: &Ctx, ino: u64, mask: i32) -> Result<()> {
        if ino == CONTROL_ID {
            return Ok(());
        }
        let i = self.search(Func::Access, ino)?;
        ops::access(&i.branch.dir, ctx, i.fd()?.as_fd(), mask)
    }

    fn create(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(Entry, Opened)> {
        let name = component(name)?;
        let b = self
            .place(Func::Create, parent, false)?
            .into_iter()
            .next()
            .ok_or(Errno::EROFS)?;
        let pfd = self.dir_on(parent, &b)?;
        let (entry, fd) =
            ops::create_file(&b.dir, ctx, pfd.as_fd(), &name, mode, umask, flags, || {
                self.lookup_name(parent, &name)
            })?;
        Ok((entry, self.files.insert(fd, self.passthrough)))
    }

    open_file_methods!(files);

    fn stats(&self) -> Stats {
        Stats {
            inodes: self.table.len() as u64,
            open_files: self.files.len() as u64,
            open_dirs: self.dirs.lock().len() as u64,
            cached_fds: self
                .branches()
                .iter()
                .map(|b| b.dir.cached_fds() as u64)
                .sum(),
        }
    }

    fn negative_ttl(&self, _parent: u64) -> Duration {
        self.settings.read().negative_ttl
    }

    fn attach(&self, invalidator: Arc<dyn Invalidator>) {
        *self.invalidator.write() = Some(invalidator);
    }
}

impl UnionFs {
    /// Whether xattr changes reach the branches under the `xattr=` mode.
    fn xattr_writes(&self) -> Result<()> {
        match self.xattr_mode() {
            XattrMode::NoSys => Err(Errno::ENOSYS),
            XattrMode::NoAttr => Err(Errno::ENOTSUP),
            XattrMode::Passthrough => Ok(()),
        }
    }

    /// mkdir/mknod/symlink: `make` creates `name` in the parent's directory
    /// on each branch the create policy picks (all of them for `all`/`epall`);
    /// the caller owns what was made.
    fn make_node(
        &self,
        ctx: &Ctx,
        func: Func,
        parent: u64,
        name: &OsStr,
        make: impl Fn(&Branch, BorrowedFd<'_>, &CStr) -> Result<()>,
    ) -> Result<Entry> {
        let name = component(name)?;
        let targets = self.place(func, parent, true)?;
        Self::apply(&targets, |b| {
            let pfd = self.dir_on(parent, b)?;
            make(b, pfd.as_fd(), &name)?;
            ops::finish_new(&b.dir, ctx, pfd.as_fd(), &name)
        })?;
        self.lookup_name(parent, &name)
    }

    /// unlink/rmdir: on every instance the action policy picks.
    fn remove(&self, parent: u64, name: &OsStr, func: Func, how: AtFlags) -> Result<()> {
        let name = component(name)?;
        let found = self.find(parent, &name)?;
        let inst: Vec<Inst> = found.iter().map(|(i, _, _)| i.clone()).collect();
        let chosen = self.pick(func, Want::Action, &inst)?;
        let targets: Vec<_> = found
            .iter()
            .filter(|(i, _, _)| chosen.iter().any(|c| c.branch.id == i.branch.id))
            .collect();
        Self::apply(&targets, |(_, pfd, _)| {
            Ok(rustix::fs::unlinkat(&**pfd, &name, how)?)
        })
    }
}
