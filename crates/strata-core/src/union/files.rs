//! Open files of the union: the mergerfs behaviours that act on them —
//! `nullrw`, `dropcacheonclose`, `link-cow` on open, and `moveonenospc`, which
//! moves a file that filled its branch to another one under its writers.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use rustix::fs::{AtFlags, OFlags};

use super::policy::Policy;
use super::{Branch, Inst, UFile, Union};
use crate::fs::{FileKind, Opened};
use crate::host::ops;
use crate::{Errno, Result};

/// Whether open flags may change the file.
pub(super) fn write_flags(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

impl Union {
    /// Registers file `ino` opened on branch `branch` with `flags`, choosing
    /// whether the kernel may serve its I/O directly.
    pub(super) fn register_open(&self, ino: u64, branch: u64, flags: i32, fd: OwnedFd) -> Opened {
        let (null, moves) = {
            let s = self.settings.read();
            (s.nullrw, s.move_on_enospc.is_some())
        };
        // The daemon must see the I/O to fake it, or to move the file when a
        // write finds its branch full.
        let passthrough = self.passthrough && !null && !(moves && write_flags(flags));
        let opened = self.files.insert(fd, passthrough);
        self.open.lock().insert(
            opened.fh,
            UFile {
                ino,
                branch,
                flags,
                null,
                passthrough,
            },
        );
        opened
    }

    fn open_file(&self, fh: u64) -> Result<UFile> {
        self.open.lock().get(&fh).copied().ok_or(Errno::EBADF)
    }

    /// Reads file `fh` (the control file is open without a [`UFile`]).
    pub(super) fn read_file(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        if self.open_file(fh).is_ok_and(|f| f.null) {
            return Ok(vec![0; size as usize]);
        }
        self.files.read(fh, offset, size)
    }

    pub(super) fn write_file(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        let Ok(file) = self.open_file(fh) else {
            return self.files.write(fh, offset, data);
        };
        if file.null {
            return Ok(data.len() as u32);
        }
        match self.files.write(fh, offset, data) {
            Err(e) if e == Errno::ENOSPC || e == Errno(libc::EDQUOT) => {
                let Some(policy) = self.settings.read().move_on_enospc else {
                    return Err(e);
                };
                if let Err(why) = self.move_open_file(fh, policy) {
                    tracing::warn!(
                        ino = file.ino,
                        "moveonenospc: cannot move the file off its full branch: {why}"
                    );
                    return Err(e);
                }
                self.files.write(fh, offset, data)
            }
            other => other,
        }
    }

    pub(super) fn release_file(&self, fh: u64) {
        let file = self.open.lock().remove(&fh);
        let fd = self.files.release(fh);
        if let (Some(fd), Some(_)) = (fd, file)
            && self.settings.read().drop_cache_on_close
        {
            // Our descriptor may be the last: the kernel drops clean pages now.
            let _ = rustix::fs::fadvise(&*fd, 0, None, rustix::fs::Advice::DontNeed);
        }
    }

    /// `link-cow`: before a hard-linked regular file is opened for writing,
    /// give this name its own copy so the other names keep the old content.
    pub(super) fn break_link(&self, ino: u64, inst: &Inst) -> Result<Inst> {
        let fd = inst.fd()?;
        let st = inst.branch.dir.stat_fd(fd.as_fd())?;
        if inst.node.kind != FileKind::Regular || st.st_nlink < 2 {
            return Ok(inst.clone());
        }
        let (parent, name) = self.node(ino)?.loc.lock().clone();
        let pfd = self.dir_on(parent, &inst.branch)?;
        ops::copy_file(&inst.branch.dir, fd.as_fd(), pfd.as_fd(), &name)?;
        self.replace_instance(ino, inst, &inst.branch, pfd.as_fd(), &name)
    }

    /// `moveonenospc`: copies the file open as `fh` to a branch `policy`
    /// picks (not its own), replaces the original with it, and points every
    /// writer of the original that the daemon serves at the copy.
    fn move_open_file(&self, fh: u64, policy: Policy) -> Result<()> {
        let _one_at_a_time = self.moving.lock();
        let file = self.open_file(fh)?;
        let inst = self
            .instances(file.ino)?
            .into_iter()
            .find(|i| i.branch.id == file.branch);
        let Some(inst) = inst else {
            // Moved by a writer that got here first.
            return Ok(());
        };
        let (parent, name) = self.node(file.ino)?.loc.lock().clone();
        let target = self
            .place_by(policy, parent, false, Some(inst.branch.id))?
            .into_iter()
            .next()
            .ok_or(Errno::ENOSPC)?;
        let tdir = self.dir_on(parent, &target)?;
        ops::copy_file(&inst.branch.dir, inst.fd()?.as_fd(), tdir.as_fd(), &name)?;
        let moved = self.replace_instance(file.ino, &inst, &target, tdir.as_fd(), &name)?;
        // The copy is durable: now the original may go (if the name still is it).
        if let Some(old_dir) = self
            .instances(parent)?
            .into_iter()
            .find(|i| i.branch.id == inst.branch.id)
        {
            let old_dir = old_dir.fd()?;
            let here = inst.branch.dir.stat_child(old_dir.as_fd(), &name);
            if here.is_ok_and(|st| (st.st_dev, st.st_ino) == (inst.node.dev, inst.node.ino)) {
                rustix::fs::unlinkat(&*old_dir, &name, AtFlags::empty())?;
            }
        }
        let writers: Vec<(u64, UFile)> = self
            .open
            .lock()
            .iter()
            .filter(|(_, f)| f.ino == file.ino && f.branch == file.branch && !f.passthrough)
            .map(|(fh, f)| (*fh, *f))
            .collect();
        let mfd = moved.fd()?;
        for (fh, f) in writers {
            let flags = ops::open_flags(f.flags) & !OFlags::TRUNC;
            let fd = target.dir.reopen(mfd.as_fd(), flags)?;
            self.files.replace(fh, fd);
            if let Some(slot) = self.open.lock().get_mut(&fh) {
                slot.branch = target.id;
            }
        }
        tracing::info!(
            from = %inst.branch.path.display(),
            to = %target.path.display(),
            "moveonenospc: moved {:?} off a full branch",
            String::from_utf8_lossy(&self.rel_path(file.ino))
        );
        Ok(())
    }

    /// Swaps node `ino`'s instance `old` for the object now at `name` in
    /// `dir` on `branch` (a copy that took its place).
    fn replace_instance(
        &self,
        ino: u64,
        old: &Inst,
        branch: &Arc<Branch>,
        dir: BorrowedFd<'_>,
        name: &CStr,
    ) -> Result<Inst> {
        let st = branch.dir.stat_child(dir, name)?;
        let new = Inst {
            branch: branch.clone(),
            node: Arc::new(branch.dir.make_node(dir, name, &st)?),
        };
        self.add_instance(ino, new.clone(), Some(old.branch.id))?;
        Ok(new)
    }
}
