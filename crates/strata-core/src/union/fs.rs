//! The union as a [`Rule`]: each operation picks instances by its policy
//! and runs the same host operations as the single directory on them.

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::{AtFlags, RenameFlags};

use super::files::write_flags;
use super::policy::{Func, Want};
use super::settings::{LinkExdev, RenameExdev, XattrMode};
use super::{Branch, BranchMode, Inst, Key, Union, control};
use crate::fs::*;
use crate::host::files::{OpenFiles, sync_fd};
use crate::host::{attr_from_stat, ops};
use crate::listing::DirEnt;
use crate::stack::{New, Rule};
use crate::{Errno, Result};

/// The function whose policy governs a setattr: the first thing it changes.
fn setattr_func(set: &SetAttr) -> Func {
    if set.size.is_some() {
        Func::Truncate
    } else if set.mode.is_some() || set.kill_suidgid.is_some() {
        Func::Chmod
    } else if set.uid.is_some() || set.gid.is_some() {
        Func::Chown
    } else {
        Func::Utimens
    }
}

impl Rule for Union {
    type Dir = ();

    fn describe(&self) -> String {
        let branches: Vec<String> = self.branches().iter().map(|b| b.spec()).collect();
        format!("union {}", branches.join(":"))
    }

    fn lookup(&self, _ctx: &Ctx, parent: u64, name: &CStr) -> Result<Entry> {
        self.lookup_name(parent, name)
    }

    fn negative_ttl(&self, _ctx: &Ctx, parent: u64) -> Duration {
        let watched = self.instances(parent).is_ok_and(|i| self.watched(&i));
        // mergerfs caches no negative entries; with the watch they are safe.
        self.settings.read().cache.negative(watched, Duration::ZERO)
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        self.table.forget(ino, nlookup);
    }

    fn inodes(&self) -> usize {
        self.table.len()
    }

    fn getattr(&self, _ctx: &Ctx, ino: u64, fh: Option<u64>) -> Result<AttrOut> {
        if let Some(file) = fh.and_then(|fh| self.files.get(fh).ok()) {
            let st = rustix::fs::fstat(&*file)?;
            // Open files outlive their names: no instances is no error here.
            return Ok(self.attr_out(ino, &st, &self.instances(ino).unwrap_or_default()));
        }
        let inst = self.instances(ino)?;
        let st = self.getattr_stat(&inst)?;
        Ok(self.attr_out(ino, &st, &inst))
    }

    fn setattr(&self, _ctx: &Ctx, ino: u64, fh: Option<u64>, set: &SetAttr) -> Result<AttrOut> {
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
        Rule::getattr(self, _ctx, ino, fh)
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let inst = self.search(Func::Readlink, ino)?;
        let fd = inst.fd()?;
        if inst.node.kind != FileKind::Symlink {
            // `symlinkify`: the file shows as a link to itself on its branch.
            let st = inst.branch.dir.stat_fd(fd.as_fd())?;
            if self.symlinkified(&st) {
                let path = inst
                    .branch
                    .path
                    .join(OsStr::from_bytes(&self.rel_path(ino)));
                return Ok(path.into_os_string().into_vec());
            }
            return Err(Errno::EINVAL);
        }
        ops::readlink(fd.as_fd())
    }

    fn make(&self, ctx: &Ctx, parent: u64, name: &CStr, new: New<'_>) -> Result<Entry> {
        let func = match new {
            New::Node { .. } => Func::Mknod,
            New::Dir { .. } => Func::Mkdir,
            New::Symlink(_) => Func::Symlink,
        };
        self.make_node(ctx, func, new.kind(), parent, name, |b, pfd, name| {
            new.make_at(&b.dir, pfd, name)
        })
    }

    fn remove(&self, _ctx: &Ctx, parent: u64, name: &CStr, dir: bool) -> Result<()> {
        if dir {
            self.remove_name(parent, name, Func::Rmdir, AtFlags::REMOVEDIR)
        } else {
            self.remove_name(parent, name, Func::Unlink, AtFlags::empty())
        }
    }

    fn rename(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &CStr,
        new_parent: u64,
        new_name: &CStr,
        flags: u32,
    ) -> Result<()> {
        let flags = RenameFlags::from_bits_retain(flags);
        let source = self.find(parent, name)?;
        let target = self.find(new_parent, new_name).ok();
        // A directory the rename replaces is dead to the kernel from now on.
        let replaced = target
            .as_ref()
            .filter(|t| is_dir_found(t))
            .and_then(|t| self.known_node(new_parent, new_name, t))
            .map(|(id, _, _)| id);
        if flags.contains(RenameFlags::NOREPLACE) && target.is_some() {
            return Err(Errno::EEXIST);
        }
        let chosen = self.pick_found(Func::Rename, Want::Action, &source)?;
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
                    name,
                    &*npfd,
                    new_name,
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
            let how = self.settings.read().rename_exdev;
            if first_err == Some(Errno::EXDEV) && how != RenameExdev::Passthrough {
                let moved: Vec<Inst> = source
                    .iter()
                    .filter(|(i, _, _)| chosen.iter().any(|c| c.branch.id == i.branch.id))
                    .map(|(i, _, _)| i.clone())
                    .collect();
                return self
                    .rename_as_symlink(ctx, parent, name, &moved, how, new_parent, new_name);
            }
            return Err(first_err.unwrap_or(Errno::EROFS));
        }
        if !flags.contains(RenameFlags::EXCHANGE) {
            // mergerfs: the source goes from branches where its rename failed,
            // or the old name would live on there.
            for (inst, pfd, st) in &source {
                let tried = chosen.iter().any(|c| c.branch.id == inst.branch.id);
                if tried && !renamed.contains(&inst.branch.id) && inst.branch.mode != BranchMode::RO
                {
                    let _ = rustix::fs::unlinkat(&**pfd, name, remove_flags(st));
                }
            }
            if let Some(id) = replaced {
                self.table.detach(id);
            }
            self.moved(parent, name, &source, &renamed, new_parent, new_name);
            // The kernel moved whatever it held at the old name: a directory
            // node still keyed there (the name had become a file on the
            // branches meanwhile) is one it holds elsewhere now.
            if let Some((id, _)) = self.table.get_by_key(&Key::Place(parent, name.to_owned())) {
                self.table.detach(id);
            }
        }
        // The target on other branches would shadow the renamed file: remove it.
        if !flags.contains(RenameFlags::EXCHANGE)
            && let Some(tgt) = target
        {
            for (inst, pfd, st) in tgt {
                if renamed.contains(&inst.branch.id) || inst.branch.mode == BranchMode::RO {
                    continue;
                }
                let _ = rustix::fs::unlinkat(&*pfd, new_name, remove_flags(&st));
            }
        }
        Ok(())
    }

    fn link(&self, ctx: &Ctx, ino: u64, new_parent: u64, new_name: &CStr) -> Result<Entry> {
        let chosen = self.action(Func::Link, ino)?;
        let preserve = self.settings.read().policy(Func::Create).preserves_paths();
        let linked = Self::apply(&chosen, |i| {
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
            ops::link_fd(&b.dir, i.fd()?.as_fd(), npfd.as_fd(), new_name)
        });
        let how = self.settings.read().link_exdev;
        match linked {
            Err(e) if e == Errno::EXDEV && how != LinkExdev::Passthrough => {
                self.link_as_symlink(ctx, ino, &chosen[0], how, new_parent, new_name)
            }
            Err(e) => Err(e),
            Ok(()) => self.lookup_name(new_parent, new_name),
        }
    }

    fn files(&self) -> &OpenFiles {
        &self.files
    }

    fn open(&self, ino: u64, flags: i32) -> Result<Opened> {
        let mut inst = self.search(Func::Open, ino)?;
        if write_flags(flags) {
            Self::read_only_err(&inst)?;
            if self.settings.read().link_cow {
                inst = self.break_link(ino, &inst)?;
            }
        }
        let file = inst
            .branch
            .dir
            .reopen(inst.fd()?.as_fd(), ops::open_flags(flags))?;
        Ok(self.register_open(ino, inst.branch.id, flags, file))
    }

    fn opendir(&self, _ctx: &Ctx, ino: u64) -> Result<((), bool)> {
        // Listings stay valid until the watch says otherwise.
        Ok(((), self.watched(&self.instances(ino)?)))
    }

    fn list(&self, ino: u64, _dir: &()) -> Result<Vec<DirEnt>> {
        self.load_dir(ino)
    }

    fn dir_attr(&self, ino: u64, _dir: &()) -> Result<Attr> {
        Ok(attr_from_stat(
            &self.getattr_stat(&self.instances(ino)?)?,
            ino,
        ))
    }

    fn fsyncdir(&self, ino: u64, _dir: &(), datasync: bool) -> Result<()> {
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
        let inst = if ino == ROOT_ID {
            None
        } else {
            self.instances(ino).ok()
        };
        self.statfs_sum(inst.as_deref())
    }

    fn setxattr(&self, _ctx: &Ctx, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        self.xattr_writes()?;
        let chosen = self.action(Func::Setxattr, ino)?;
        Self::apply(&chosen, |i| {
            ops::setxattr(&i.branch.dir, i.fd()?.as_fd(), name, value, flags)
        })
    }

    fn getxattr(&self, _ctx: &Ctx, ino: u64, name: &OsStr, size: u32) -> Result<Xattr> {
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
        match self.xattr_mode() {
            XattrMode::NoSys => return Err(Errno::ENOSYS),
            XattrMode::NoAttr => return Xattr::reply(Vec::new(), size),
            XattrMode::Passthrough => {}
        }
        let i = self.search(Func::Listxattr, ino)?;
        ops::listxattr(&i.branch.dir, i.fd()?.as_fd(), size)
    }

    fn removexattr(&self, _ctx: &Ctx, ino: u64, name: &OsStr) -> Result<()> {
        self.xattr_writes()?;
        let chosen = self.action(Func::Removexattr, ino)?;
        Self::apply(&chosen, |i| {
            ops::removexattr(&i.branch.dir, i.fd()?.as_fd(), name)
        })
    }

    fn access(&self, ctx: &Ctx, ino: u64, mask: i32) -> Result<()> {
        let i = self.search(Func::Access, ino)?;
        ops::access(&i.branch.dir, ctx, i.fd()?.as_fd(), mask)
    }

    fn create(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(Entry, Opened)> {
        let b = self
            .place(Func::Create, parent, false)?
            .into_iter()
            .next()
            .ok_or(Errno::EROFS)?;
        let pfd = self.dir_on(parent, &b)?;
        let (entry, fd) =
            ops::create_file(&b.dir, ctx, pfd.as_fd(), name, mode, umask, flags, || {
                let entry = self.lookup_name(parent, name)?;
                if entry.attr.kind != FileKind::Regular {
                    // Another branch shows a directory (say) by that name
                    // first: the name is not the file just made, and the
                    // kernel refuses a create answered with a directory.
                    self.table.forget(entry.attr.ino, 1);
                    return Err(Errno::EISDIR);
                }
                Ok(entry)
            })?;
        let opened = self.register_open(entry.attr.ino, b.id, flags, fd);
        Ok((entry, opened))
    }

    fn read(&self, _ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        self.read_file(fh, offset, size)
    }

    fn write(&self, _ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.write_file(fh, offset, data)
    }

    fn release(&self, _ino: u64, fh: u64) {
        self.release_file(fh);
    }

    fn cached_fds(&self) -> usize {
        self.branches().iter().map(|b| b.dir.cached_fds()).sum()
    }

    fn attach(&self, invalidator: Arc<dyn Invalidator>) {
        *self.invalidator.write() = Some(invalidator.clone());
        self.start_watch(invalidator);
    }

    fn control_keys(&self) -> Vec<String> {
        control::keys()
    }

    fn control_get(&self, _ctx: &Ctx, key: &str) -> Option<String> {
        control::get(self, key)
    }

    fn control_set(
        &self,
        _ctx: &Ctx,
        key: &str,
        value: &str,
    ) -> Option<std::result::Result<(), crate::control::Refusal>> {
        control::set(self, key, value)
            .map(|r| r.map_err(|why| crate::control::Refusal::new(crate::Errno::EINVAL, why)))
    }
}

/// Whether a name found on the branches is a directory (its first copy).
fn is_dir_found(found: &[super::Found]) -> bool {
    found
        .first()
        .is_some_and(|(_, _, st)| st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

/// unlinkat flags that remove an object with stat `st`.
fn remove_flags(st: &rustix::fs::Stat) -> AtFlags {
    if super::is_dir(st) {
        AtFlags::REMOVEDIR
    } else {
        AtFlags::empty()
    }
}

impl Union {
    /// After a rename: the node found as `source` (parent instances and the
    /// name's stats) now lives at `new_name` in
    /// `new_parent`, on the branches in `renamed` only. The kernel moved its
    /// name without asking, so the node must know where it is now (paths of
    /// its children, path cloning) and read from where it went.
    fn moved(
        &self,
        parent: u64,
        name: &CStr,
        source: &[super::Found],
        renamed: &[u64],
        new_parent: u64,
        new_name: &CStr,
    ) {
        let Some((id, node, key)) = self.known_node(parent, name, source) else {
            return;
        };
        // Its host objects moved with it (same inodes), those left behind are gone.
        let left = {
            let mut inst = node.inst.write();
            let before = inst.len();
            inst.retain(|i| renamed.contains(&i.branch.id));
            inst.len() != before
        };
        *node.loc.lock() = (new_parent, new_name.to_owned());
        if let Key::Place(..) = key {
            self.table
                .rekey(id, Key::Place(new_parent, new_name.to_owned()));
        } else {
            self.rekey_node(id, &node, &key);
        }
        if left && node.kind == FileKind::Directory {
            self.prune_below(id, renamed);
        }
    }

    /// After directory `top` moved on the branches `kept` only: the nodes
    /// below it drop their instances on the other branches, which stayed
    /// behind with the old path (the kernel moved its names along, and
    /// would otherwise reach the copies left there through them). Walks the
    /// table: only for renames that failed on some branch.
    fn prune_below(&self, top: u64, kept: &[u64]) {
        for id in self.table.ids() {
            if id == top || id == ROOT_ID || !self.ancestors(id).contains(&top) {
                continue;
            }
            let (Some(node), Some(key)) = (self.table.get(id), self.table.key_of(id)) else {
                continue;
            };
            let changed = {
                let mut inst = node.inst.write();
                let before = inst.len();
                inst.retain(|i| kept.contains(&i.branch.id));
                inst.len() != before
            };
            if changed {
                self.rekey_node(id, &node, &key);
            }
        }
    }

    /// Whether xattr changes reach the branches under the `xattr=` mode.
    fn xattr_writes(&self) -> Result<()> {
        match self.xattr_mode() {
            XattrMode::NoSys => Err(Errno::ENOSYS),
            XattrMode::NoAttr => Err(Errno::ENOTSUP),
            XattrMode::Passthrough => Ok(()),
        }
    }

    /// mkdir/mknod/symlink: `make` creates `name` (a `kind`) in the parent's
    /// directory on each branch the create policy picks (all of them for
    /// `all`/`epall`); the caller owns what was made.
    pub(super) fn make_node(
        &self,
        ctx: &Ctx,
        func: Func,
        kind: FileKind,
        parent: u64,
        name: &CStr,
        make: impl Fn(&Branch, BorrowedFd<'_>, &CStr) -> Result<()>,
    ) -> Result<Entry> {
        let targets = self.place(func, parent, true)?;
        Self::apply(&targets, |b| {
            let pfd = self.dir_on(parent, b)?;
            make(b, pfd.as_fd(), name)?;
            ops::finish_new(&b.dir, ctx, pfd.as_fd(), name)
        })?;
        let entry = self.lookup_name(parent, name)?;
        // (`symlinkify` may show a new read-only file as a link at once.)
        let shown_as_link = kind == FileKind::Regular
            && entry.attr.kind == FileKind::Symlink
            && self.settings.read().symlinkify;
        if entry.attr.kind != kind && !shown_as_link {
            // A racing caller made the name on an earlier branch (another
            // type shows first): it exists, and the kernel refuses a reply
            // of another type than it asked for (EIO).
            self.table.forget(entry.attr.ino, 1);
            return Err(Errno::EEXIST);
        }
        Ok(entry)
    }

    /// unlink/rmdir: on every instance the action policy picks.
    fn remove_name(&self, parent: u64, name: &CStr, func: Func, how: AtFlags) -> Result<()> {
        let found = self.find(parent, name)?;
        let chosen = self.pick_found(func, Want::Action, &found)?;
        let targets: Vec<_> = found
            .iter()
            .filter(|(i, _, _)| chosen.iter().any(|c| c.branch.id == i.branch.id))
            .collect();
        // Every picked instance is tried; as mergerfs, the first error is the
        // answer even when others went (an rmdir that left the name showing
        // on another branch must not report success).
        let mut first_err = None;
        let mut removed = Vec::new();
        // The kernel's node for the name: keyed by its first instance.
        let shown = self.known_node(parent, name, &found);
        for (inst, pfd, st) in targets {
            // rmdir of a directory shown through `follow-symlinks` removes the link.
            let how = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                AtFlags::empty()
            } else {
                how
            };
            match rustix::fs::unlinkat(&**pfd, name, how) {
                Ok(()) => removed.push(inst.branch.id),
                Err(e) => {
                    first_err.get_or_insert(Errno::from(e));
                }
            }
        }
        match first_err {
            None => {
                if how.contains(AtFlags::REMOVEDIR)
                    && let Some((id, _, _)) = shown
                {
                    // The kernel holds the directory as removed: copies that
                    // show the name again (an RO branch's) are a new node.
                    self.table.detach(id);
                }
                Ok(())
            }
            Some(e) => {
                if !removed.is_empty() {
                    // The error reply tells the kernel nothing changed, yet
                    // some copies went: the node it holds drops them now (it
                    // may be used before the invalidation lands), and the
                    // kernel is made to look again.
                    let node = shown.map(|(id, node, key)| {
                        node.inst
                            .write()
                            .retain(|i| !removed.contains(&i.branch.id));
                        self.rekey_node(id, &node, &key);
                        id
                    });
                    // Attributes now (no lock of the kernel's needed: the
                    // next stat must see the parent's new link count), the
                    // name once this request has let go of the directory.
                    self.invalidate_attrs(std::iter::once(parent).chain(node));
                    self.invalidate_later(Some((parent, name.to_owned())), &[]);
                }
                Err(e)
            }
        }
    }
}
