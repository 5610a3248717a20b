//! The overlay as a [`Rule`]: each request resolved against the upper and
//! the lowers, copy-up before any change to a lower object.

use std::ffi::{CStr, OsStr};
use std::os::fd::AsFd;

use std::sync::Arc;
use std::time::Duration;

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};

use super::{Overlay, is_private_xattr, tmp_name};
use crate::fs::*;
use crate::host::files::{OpenFiles, sync_fd};
use crate::host::ops;
use crate::layer::host_xattrs;
use crate::listing::DirEnt;
use crate::stack::{New, Rule};
use crate::{Errno, Result};

impl Overlay {
    /// Shared head of mknod/mkdir/symlink/create: the name must not show
    /// yet; returns the parent's upper descriptor. Caller holds `ns_lock`.
    fn new_name_dir(&self, parent: u64, name: &CStr) -> Result<Arc<std::os::fd::OwnedFd>> {
        let h = self.upper_dir()?;
        let dir = self.node(parent)?;
        if dir.kind != FileKind::Directory {
            return Err(Errno::ENOTDIR);
        }
        if self.resolve(&dir, name)?.is_some() {
            return Err(Errno::EEXIST);
        }
        let pup = self.copy_up(parent)?;
        h.fd(&pup)
    }

    fn make_entry(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &CStr,
        is_dir: bool,
        make: impl FnOnce(std::os::fd::BorrowedFd<'_>, &CStr) -> Result<()>,
    ) -> Result<Entry> {
        let _ns = self.ns_lock.lock();
        let pfd = self.new_name_dir(parent, name)?;
        self.place_new(Some(ctx), pfd.as_fd(), name, is_dir, |n| {
            make(pfd.as_fd(), n)
        })?;
        self.lookup_in(parent, name)
    }

    /// Removes `name` (unlink or rmdir): the upper's object goes, and a
    /// whiteout stays where a lower provides the name.
    fn remove_name(&self, parent: u64, name: &CStr, dir_wanted: bool) -> Result<()> {
        let _ns = self.ns_lock.lock();
        let h = self.upper_dir()?;
        let dir = self.node(parent)?;
        let found = self.resolve(&dir, name)?.ok_or(Errno::ENOENT)?;
        let is_dir = found.kind == FileKind::Directory;
        match (dir_wanted, is_dir) {
            (true, false) => return Err(Errno::ENOTDIR),
            (false, true) => return Err(Errno::EISDIR),
            _ => {}
        }
        if is_dir && !self.is_empty_dir(0, &self.build_node(0, &dir, name, &found)?)? {
            return Err(Errno::ENOTEMPTY);
        }
        let whiteout = self.lower_has(&dir, name)?;
        let pup = self.copy_up(parent)?;
        let pfd = h.fd(&pup)?;
        if found.upper.is_none() {
            return Self::make_whiteout(pfd.as_fd(), name);
        }
        if !whiteout && !is_dir {
            rustix::fs::unlinkat(&*pfd, name, AtFlags::empty())?;
            return Ok(());
        }
        // Move it aside (leaving the whiteout in one step), then delete it.
        let tmp = tmp_name();
        Self::rename_upper(
            pfd.as_fd(),
            name,
            pfd.as_fd(),
            &tmp,
            RenameFlags::NOREPLACE,
            whiteout,
        )?;
        super::format::mark_tmp(pfd.as_fd(), &tmp);
        if is_dir {
            let dfd = rustix::fs::openat(
                &*pfd,
                tmp.as_c_str(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            Self::clear_whiteouts(dfd.as_fd())?;
            rustix::fs::unlinkat(&*pfd, tmp.as_c_str(), AtFlags::REMOVEDIR)?;
        } else {
            rustix::fs::unlinkat(&*pfd, tmp.as_c_str(), AtFlags::empty())?;
        }
        Ok(())
    }

    /// The node behind a visible name, with a lookup reference held until
    /// the returned guard drops (the node must outlive the operation even if
    /// the kernel forgets it meanwhile).
    fn hold(&self, parent: u64, name: &CStr) -> Result<Held<'_>> {
        let id = self.lookup_in(parent, name)?.attr.ino;
        Ok(Held { fs: self, id })
    }

    /// Copies a node up for a rename: a directory that lowers provide moves
    /// with its whole tree.
    fn copy_up_for_move(&self, id: u64) -> Result<()> {
        let node = self.node(id)?;
        if node.kind == FileKind::Directory && !node.lowers().is_empty() {
            self.copy_up_tree(id)
        } else {
            self.copy_up(id).map(drop)
        }
    }

    fn exchange(&self, parent: u64, name: &CStr, new_parent: u64, new_name: &CStr) -> Result<()> {
        let h = self.upper_dir()?;
        let held_a = self.hold(parent, name)?;
        let held_b = self.hold(new_parent, new_name)?;
        let (a, b) = (held_a.id, held_b.id);
        self.copy_up_for_move(a)?;
        self.copy_up_for_move(b)?;
        let pfd = h.fd(&self.copy_up(parent)?)?;
        let npfd = h.fd(&self.copy_up(new_parent)?)?;
        // Each directory lands where a lower may hold another: stop merging.
        for id in [a, b] {
            let node = self.node(id)?;
            if node.kind == FileKind::Directory {
                self.make_opaque(&node)?;
            }
        }
        rustix::fs::renameat_with(&*pfd, name, &*npfd, new_name, RenameFlags::EXCHANGE)?;
        let (na, nb) = (self.node(a)?, self.node(b)?);
        let pa = na.place();
        *na.place.lock() = nb.place();
        *nb.place.lock() = pa;
        Ok(())
    }
}

/// A lookup reference taken by the daemon itself, given back on drop.
struct Held<'a> {
    fs: &'a Overlay,
    id: u64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.fs.table.forget(self.id, 1);
    }
}

impl Rule for Overlay {
    type Dir = ();

    fn describe(&self) -> String {
        Overlay::describe(self)
    }

    fn lookup(&self, _ctx: &Ctx, parent: u64, name: &CStr) -> Result<Entry> {
        // A node made from what the live layer held before a snapshot, but
        // registered after it, would keep writing the frozen layer.
        let _gate = self.gate.read();
        self.lookup_in(parent, name)
    }

    fn negative_ttl(&self, _ctx: &Ctx, parent: u64) -> Duration {
        let host = self
            .table
            .get(parent)
            .is_some_and(|n| self.unwatched(&n.lowers()));
        self.cfg
            .cache
            .negative(!host, crate::host::watch::UNWATCHED_TTL)
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        self.table.forget(ino, nlookup);
    }

    fn inodes(&self) -> usize {
        self.table.len()
    }

    fn getattr(&self, _ctx: &Ctx, ino: u64, _fh: Option<u64>) -> Result<AttrOut> {
        self.attr(ino, &*self.node(ino)?)
    }

    fn setattr(&self, _ctx: &Ctx, ino: u64, _fh: Option<u64>, set: &SetAttr) -> Result<AttrOut> {
        let _gate = self.gate.read();
        let h = self.upper_dir()?;
        let up = {
            let _ns = self.ns_lock.lock();
            self.copy_up(ino)?
        };
        // Never the open descriptor: for a lower file it is the lower's.
        ops::set_attr(h, h.fd(&up)?.as_fd(), None, set)?;
        self.attr(ino, &*self.node(ino)?)
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let node = self.node(ino)?;
        match node.upper() {
            Some(up) => ops::readlink(self.upper_dir()?.fd(&up)?.as_fd()),
            None => {
                let top = node.lowers().first().cloned().ok_or(Errno::ESTALE)?;
                self.layer(&top).readlink(&top.obj)
            }
        }
    }

    fn make(&self, ctx: &Ctx, parent: u64, name: &CStr, new: New<'_>) -> Result<Entry> {
        let _gate = self.gate.read();
        let h = self.upper_dir()?;
        let is_dir = matches!(new, New::Dir { .. });
        self.make_entry(ctx, parent, name, is_dir, |pfd, n| match new {
            // In the upper a 0/0 character device is a whiteout: the
            // overlay format keeps a user's one apart.
            New::Node {
                mode,
                umask,
                rdev: 0,
            } if rustix::fs::FileType::from_raw_mode(mode)
                == rustix::fs::FileType::CharacterDevice =>
            {
                let perm = ops::create_perm(h, pfd, mode, umask);
                super::format::make_zero_device(pfd, n, perm)
            }
            new => new.make_at(h, pfd, n),
        })
    }

    fn remove(&self, _ctx: &Ctx, parent: u64, name: &CStr, dir: bool) -> Result<()> {
        let _gate = self.gate.read();
        self.remove_name(parent, name, dir)
    }

    fn rename(
        &self,
        _ctx: &Ctx,
        parent: u64,
        name: &CStr,
        new_parent: u64,
        new_name: &CStr,
        flags: u32,
    ) -> Result<()> {
        let flags = RenameFlags::from_bits(flags).ok_or(Errno::EINVAL)?;
        if flags.contains(RenameFlags::WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let _gate = self.gate.read();
        let h = self.upper_dir()?;
        let _ns = self.ns_lock.lock();
        if flags.contains(RenameFlags::EXCHANGE) {
            return self.exchange(parent, name, new_parent, new_name);
        }
        let src_dir = self.node(parent)?;
        let dst_dir = self.node(new_parent)?;
        let held = self.hold(parent, name)?;
        let sid = held.id;
        if parent == new_parent && name == new_name {
            return Ok(());
        }
        let src = self.node(sid)?;
        let src_is_dir = src.kind == FileKind::Directory;
        let dst = self.resolve(&dst_dir, new_name)?;
        let mut opaque = false;
        if let Some(d) = &dst {
            if flags.contains(RenameFlags::NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (src_is_dir, d.kind == FileKind::Directory) {
                (false, true) => return Err(Errno::EISDIR),
                (true, false) => return Err(Errno::ENOTDIR),
                (true, true) => {
                    if !self.is_empty_dir(0, &self.build_node(0, &dst_dir, new_name, d)?)? {
                        return Err(Errno::ENOTEMPTY);
                    }
                    opaque = !d.lowers.is_empty();
                }
                (false, false) => {}
            }
        }
        self.copy_up_for_move(sid)?;
        let pfd = h.fd(&self.copy_up(parent)?)?;
        let npfd = h.fd(&self.copy_up(new_parent)?)?;
        let over_whiteout = dst.is_none()
            && h.stat_child(npfd.as_fd(), new_name)
                .is_ok_and(|st| super::host_whiteout(npfd.as_fd(), new_name, &st));
        if let Some(d) = &dst
            && d.kind == FileKind::Directory
            && d.upper.is_some()
        {
            let dfd = rustix::fs::openat(
                &*npfd,
                new_name,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            Self::clear_whiteouts(dfd.as_fd())?;
        }
        if src_is_dir && (opaque || over_whiteout) {
            self.make_opaque(&src)?;
        }
        let whiteout = self.lower_has(&src_dir, name)?;
        if src_is_dir && over_whiteout {
            // A directory cannot replace the whiteout (a device): swap them,
            // which leaves the whiteout at the old name.
            rustix::fs::renameat_with(&*pfd, name, &*npfd, new_name, RenameFlags::EXCHANGE)?;
            if !whiteout {
                rustix::fs::unlinkat(&*pfd, name, AtFlags::empty())?;
            }
        } else {
            Self::rename_upper(
                pfd.as_fd(),
                name,
                npfd.as_fd(),
                new_name,
                RenameFlags::empty(),
                whiteout,
            )?;
        }
        *src.place.lock() = (new_parent, new_name.to_owned());
        Ok(())
    }

    fn link(&self, _ctx: &Ctx, ino: u64, new_parent: u64, new_name: &CStr) -> Result<Entry> {
        let _gate = self.gate.read();
        let h = self.upper_dir()?;
        let _ns = self.ns_lock.lock();
        let up = self.copy_up(ino)?;
        let npfd = self.new_name_dir(new_parent, new_name)?;
        let fd = h.fd(&up)?;
        self.place_new(None, npfd.as_fd(), new_name, false, |n| {
            ops::link_fd(h, fd.as_fd(), npfd.as_fd(), n)
        })?;
        self.lookup_in(new_parent, new_name)
    }

    fn files(&self) -> &OpenFiles {
        &self.files
    }

    fn open(&self, ino: u64, flags: i32) -> Result<Opened> {
        let _gate = self.gate.read();
        let node = self.node(ino)?;
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        let upper = if writes {
            let _ns = self.ns_lock.lock();
            Some(self.copy_up(ino)?)
        } else {
            node.upper()
        };
        if let Some(up) = upper {
            let h = self.upper_dir()?;
            let file = h.reopen(h.fd(&up)?.as_fd(), ops::open_flags(flags))?;
            let opened = self.files.insert(file, self.cfg.passthrough);
            self.note_open_upper(ino, &node, opened.fh);
            return Ok(opened);
        }
        let top = node.lowers().first().cloned().ok_or(Errno::ESTALE)?;
        let layer = self.layer(&top);
        let file = layer.open(&top.obj)?;
        // With an upper, a copy-up may later give this inode another file;
        // the kernel refuses an open with a different backing file while a
        // passthrough one is active, but lets page-cache handles mix. So lower
        // files are served through the daemon (the page cache answers repeated
        // reads) unless the mount is read-only.
        let mut opened = self
            .files
            .insert(file, self.cfg.passthrough && self.upper.is_none());
        // An image never changes, and a watched host lower's changes drop the
        // page cache: it stays valid across opens.
        opened.keep_cache = !self.unwatched(std::slice::from_ref(&top));
        if self.upper.is_some() {
            self.add_lower_reader(ino, &node, opened.fh);
        }
        Ok(opened)
    }

    fn release(&self, ino: u64, fh: u64) {
        self.drop_lower_reader(ino, fh);
        self.drop_open_upper(ino, fh);
        self.files.release(fh);
    }

    fn opendir(&self, _ctx: &Ctx, ino: u64) -> Result<((), bool)> {
        let node = self.node(ino)?;
        if node.kind != FileKind::Directory {
            return Err(Errno::ENOTDIR);
        }
        // The kernel keeps the listing until told it changed: not where an
        // unwatched host lower could change it unseen.
        Ok(((), !self.unwatched(&node.lowers())))
    }

    fn list(&self, ino: u64, _dir: &()) -> Result<Vec<DirEnt>> {
        self.load_dir(ino, &*self.node(ino)?)
    }

    fn dir_attr(&self, ino: u64, _dir: &()) -> Result<Attr> {
        Ok(self.attr(ino, &*self.node(ino)?)?.attr)
    }

    fn fsyncdir(&self, ino: u64, _dir: &(), datasync: bool) -> Result<()> {
        match self.node(ino)?.upper() {
            Some(up) => sync_fd(self.upper_dir()?.fd(&up)?.as_fd(), datasync),
            None => Ok(()),
        }
    }

    fn statfs(&self, _ctx: &Ctx, _ino: u64) -> Result<StatFs> {
        let s = match &self.upper {
            Some(h) => rustix::fs::fstatvfs(&*h.fd(h.root())?)?,
            None => rustix::fs::statvfs(self.layers.get(0).statfs_path())?,
        };
        Ok(crate::host::statfs_from(&s))
    }

    fn setxattr(&self, _ctx: &Ctx, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        if is_private_xattr(name.as_encoded_bytes()) {
            return Err(Errno::EPERM);
        }
        let _gate = self.gate.read();
        let h = self.upper_dir()?;
        let up = {
            let _ns = self.ns_lock.lock();
            self.copy_up(ino)?
        };
        ops::setxattr(h, h.fd(&up)?.as_fd(), name, value, flags)
    }

    fn getxattr(&self, _ctx: &Ctx, ino: u64, name: &OsStr, size: u32) -> Result<Xattr> {
        if name == super::SOURCE_XATTR {
            return Xattr::reply(self.locate(ino)?.into_bytes(), size);
        }
        if is_private_xattr(name.as_encoded_bytes()) {
            return Err(Errno::ENODATA);
        }
        let node = self.node(ino)?;
        if let Some(up) = node.upper() {
            let h = self.upper_dir()?;
            return ops::getxattr(h, h.fd(&up)?.as_fd(), name, size);
        }
        let top = node.lowers().first().cloned().ok_or(Errno::ESTALE)?;
        let value = self
            .layer(&top)
            .xattrs(&top.obj)?
            .into_iter()
            .find(|(n, _)| n.as_slice() == name.as_encoded_bytes())
            .map(|(_, v)| v)
            .ok_or_else(|| crate::xattr::absent(name, Errno::ENODATA))?;
        Xattr::reply(value, size)
    }

    fn listxattr(&self, _ctx: &Ctx, ino: u64, size: u32) -> Result<Xattr> {
        let node = self.node(ino)?;
        let all = match node.upper() {
            Some(up) => {
                let h = self.upper_dir()?;
                host_xattrs(h, h.fd(&up)?.as_fd())?
            }
            None => {
                let top = node.lowers().first().cloned().ok_or(Errno::ESTALE)?;
                self.layer(&top).xattrs(&top.obj)?
            }
        };
        let mut list = Vec::new();
        for (n, _) in all.iter().filter(|(n, _)| !is_private_xattr(n)) {
            list.extend_from_slice(n);
            list.push(0);
        }
        Xattr::reply(list, size)
    }

    fn removexattr(&self, _ctx: &Ctx, ino: u64, name: &OsStr) -> Result<()> {
        if is_private_xattr(name.as_encoded_bytes()) {
            return Err(Errno::EPERM);
        }
        // Nothing to remove: no copy-up for that.
        Rule::getxattr(self, _ctx, ino, name, 0)?;
        let _gate = self.gate.read();
        let h = self.upper_dir()?;
        let up = {
            let _ns = self.ns_lock.lock();
            self.copy_up(ino)?
        };
        ops::removexattr(h, h.fd(&up)?.as_fd(), name)
    }

    fn access(&self, ctx: &Ctx, ino: u64, mask: i32) -> Result<()> {
        let a = self.attr(ino, &*self.node(ino)?)?.attr;
        let kind = match a.kind {
            FileKind::Directory => libc::S_IFDIR,
            _ => libc::S_IFREG,
        };
        ops::check_access(ctx, kind | a.perm as u32, a.uid, a.gid, mask)
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
        let _gate = self.gate.read();
        let h = self.upper_dir()?;
        let _ns = self.ns_lock.lock();
        let pfd = self.new_name_dir(parent, name)?;
        let perm = ops::create_perm(h, pfd.as_fd(), mode, umask);
        let file = self.place_new(Some(ctx), pfd.as_fd(), name, false, |n| {
            Ok(rustix::fs::openat(
                &*pfd,
                n,
                ops::open_flags(flags) | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::from_raw_mode(perm),
            )?)
        })?;
        let entry = self.lookup_in(parent, name).inspect_err(|_| {
            let _ = rustix::fs::unlinkat(&*pfd, name, AtFlags::empty());
        })?;
        let opened = self.files.insert(file, self.cfg.passthrough);
        self.note_open_upper(entry.attr.ino, &*self.node(entry.attr.ino)?, opened.fh);
        Ok((entry, opened))
    }

    fn cached_fds(&self) -> usize {
        self.upper.as_ref().map_or(0, |h| h.cached_fds())
            + self.layers.all().map(|l| l.cached_fds()).sum::<usize>()
    }

    fn attach(&self, invalidator: Arc<dyn Invalidator>) {
        self.start_watch(invalidator);
    }
}
