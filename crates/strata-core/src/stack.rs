//! The one [`Filesystem`]: the protocol, written once, over a composition
//! rule.
//!
//! A [`Rule`] decides how names resolve across its layers, where new names
//! go, how an object becomes writable and how removal works: [`SingleDir`]
//! (one host directory), [`Union`] (mergerfs-style branches) and
//! [`Overlay`] (an upper over read-only lowers). [`Stack`] does everything
//! that does not depend on that choice: the check that a name is one
//! component, negative lookups, the control file `/.strata`, open-directory
//! handles and their listing snapshots, readdirplus references, the
//! operations that only touch an open file, and the counters.
//!
//! [`SingleDir`]: crate::single::SingleDir
//! [`Union`]: crate::union::Union
//! [`Overlay`]: crate::overlay::Overlay

use std::ffi::{CStr, OsStr};
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustix::fs::Mode;

use crate::control;
use crate::fs::*;
use crate::host::files::OpenFiles;
use crate::host::{HostDir, component, lookup_component, ops};
use crate::listing::{self, DirEnt, OpenDirs};
use crate::{Errno, Result};

/// What mknod, mkdir and symlink make.
#[derive(Clone, Copy, Debug)]
pub enum New<'a> {
    Node { mode: u32, umask: u32, rdev: u32 },
    Dir { mode: u32, umask: u32 },
    Symlink(&'a Path),
}

impl New<'_> {
    /// The kind of object made.
    pub fn kind(&self) -> FileKind {
        match *self {
            New::Node { mode, .. } => FileKind::from_mode(mode).unwrap_or(FileKind::Regular),
            New::Dir { .. } => FileKind::Directory,
            New::Symlink(_) => FileKind::Symlink,
        }
    }

    /// Makes the object as `name` in the host directory `pfd` of `host`,
    /// with the permission bits the kernel asked for.
    pub fn make_at(&self, host: &HostDir, pfd: BorrowedFd<'_>, name: &CStr) -> Result<()> {
        match *self {
            New::Node { mode, umask, rdev } => {
                let perm = ops::create_perm(host, pfd, mode, umask);
                rustix::fs::mknodat(
                    pfd,
                    name,
                    rustix::fs::FileType::from_raw_mode(mode),
                    Mode::from_raw_mode(perm),
                    rdev as u64,
                )?;
            }
            New::Dir { mode, umask } => {
                let perm = ops::create_perm(host, pfd, mode, umask);
                rustix::fs::mkdirat(pfd, name, Mode::from_raw_mode(perm))?;
            }
            New::Symlink(target) => rustix::fs::symlinkat(target, pfd, name)?,
        }
        Ok(())
    }
}

/// How names resolve across a stack of layers, and how it changes. Names
/// handed to a rule are single components (checked by [`Stack`]); node ids
/// and lookup references follow the protocol as in [`Filesystem`].
#[allow(clippy::too_many_arguments)]
pub trait Rule: Send + Sync + 'static {
    /// What an open directory keeps besides its listing snapshot.
    type Dir: Send + Sync;

    /// What the mount serves, for logs and the control file.
    fn describe(&self) -> String;

    // ---- names ---------------------------------------------------------

    /// Resolves `name` in `parent` and takes a lookup reference.
    fn lookup(&self, ctx: &Ctx, parent: u64, name: &CStr) -> Result<Entry>;
    /// How long the kernel may remember that `parent` has no such name.
    fn negative_ttl(&self, ctx: &Ctx, parent: u64) -> Duration;
    fn forget(&self, ino: u64, nlookup: u64);
    /// Nodes the kernel holds.
    fn inodes(&self) -> usize;

    fn getattr(&self, ctx: &Ctx, ino: u64, fh: Option<u64>) -> Result<AttrOut>;
    fn setattr(&self, ctx: &Ctx, ino: u64, fh: Option<u64>, set: &SetAttr) -> Result<AttrOut>;
    fn readlink(&self, ino: u64) -> Result<Vec<u8>>;
    /// mknod, mkdir, symlink: `new` as `name` in `parent`, owned by the caller.
    fn make(&self, ctx: &Ctx, parent: u64, name: &CStr, new: New<'_>) -> Result<Entry>;
    /// unlink (`dir` false) or rmdir.
    fn remove(&self, ctx: &Ctx, parent: u64, name: &CStr, dir: bool) -> Result<()>;
    fn rename(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &CStr,
        new_parent: u64,
        new_name: &CStr,
        flags: u32,
    ) -> Result<()>;
    fn link(&self, ctx: &Ctx, ino: u64, new_parent: u64, new_name: &CStr) -> Result<Entry>;

    // ---- files ---------------------------------------------------------

    /// The rule's open files ([`Rule::open`] and [`Rule::create`] register there).
    fn files(&self) -> &OpenFiles;
    fn open(&self, ino: u64, flags: i32) -> Result<Opened>;
    fn create(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(Entry, Opened)>;
    fn read(&self, _ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        self.files().read(fh, offset, size)
    }
    fn write(&self, _ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.files().write(fh, offset, data)
    }
    fn release(&self, _ino: u64, fh: u64) {
        self.files().release(fh);
    }

    // ---- directories ---------------------------------------------------

    /// Opens directory `ino`; `true`: the kernel may keep its listing until
    /// told it changed.
    fn opendir(&self, ctx: &Ctx, ino: u64) -> Result<(Self::Dir, bool)>;
    /// The names of directory `ino`, `.` and `..` first.
    fn list(&self, ino: u64, dir: &Self::Dir) -> Result<Vec<DirEnt>>;
    /// The directory's own attributes (for `.` and `..` in readdirplus).
    fn dir_attr(&self, ino: u64, dir: &Self::Dir) -> Result<Attr>;
    /// A listed name resolved for readdirplus (takes a lookup reference).
    fn list_lookup(&self, ctx: &Ctx, ino: u64, _dir: &Self::Dir, name: &CStr) -> Result<Entry> {
        self.lookup(ctx, ino, name)
    }
    fn fsyncdir(&self, ino: u64, dir: &Self::Dir, datasync: bool) -> Result<()>;

    // ---- the rest ------------------------------------------------------

    fn statfs(&self, ctx: &Ctx, ino: u64) -> Result<StatFs>;
    fn setxattr(&self, ctx: &Ctx, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()>;
    fn getxattr(&self, ctx: &Ctx, ino: u64, name: &OsStr, size: u32) -> Result<Xattr>;
    fn listxattr(&self, ctx: &Ctx, ino: u64, size: u32) -> Result<Xattr>;
    fn removexattr(&self, ctx: &Ctx, ino: u64, name: &OsStr) -> Result<()>;
    fn access(&self, ctx: &Ctx, ino: u64, mask: i32) -> Result<()>;
    /// O_PATH descriptors the rule's host layers keep open.
    fn cached_fds(&self) -> usize;
    /// The mount is up: start forwarding outside changes to the kernel.
    fn attach(&self, invalidator: Arc<dyn Invalidator>);

    // ---- runtime control (`/.strata`) ---------------------------------

    /// The rule's own control keys (without the `user.strata.` prefix).
    fn control_keys(&self) -> Vec<String> {
        Vec::new()
    }
    /// The value of one of the rule's keys; `None`: not a key of the rule.
    fn control_get(&self, _ctx: &Ctx, _key: &str) -> Option<String> {
        None
    }
    /// Changes one of the rule's keys; `None`: not a key of the rule,
    /// `Some(Err(why))`: refused.
    fn control_set(
        &self,
        _ctx: &Ctx,
        _key: &str,
        _value: &str,
    ) -> Option<std::result::Result<(), control::Refusal>> {
        None
    }
    /// Whether a caller other than root and the mount's owner may set
    /// `key` (the rule then checks what it allows).
    fn control_open(&self, _key: &str) -> bool {
        false
    }
}

/// An open directory: the rule's state and the listing snapshot served.
pub struct OpenDir<D> {
    state: D,
    entries: Mutex<Arc<Vec<DirEnt>>>,
}

/// The filesystem a mount serves: the protocol over rule `R`.
pub struct Stack<R: Rule> {
    rule: R,
    dirs: OpenDirs<OpenDir<R::Dir>>,
    refusals: control::Refusals,
}

impl<R: Rule> Stack<R> {
    pub fn new(rule: R) -> Stack<R> {
        Stack {
            rule,
            dirs: OpenDirs::default(),
            refusals: control::Refusals::default(),
        }
    }

    pub fn rule(&self) -> &R {
        &self.rule
    }

    /// A name for a new object, checked: `/.strata` is taken.
    fn new_name(parent: u64, name: &OsStr) -> Result<std::ffi::CString> {
        if parent == ROOT_ID && name == control::NAME {
            return Err(Errno::EEXIST);
        }
        component(name)
    }

    /// A name to remove or move away, checked: `/.strata` stays.
    fn old_name(parent: u64, name: &OsStr) -> Result<std::ffi::CString> {
        if parent == ROOT_ID && name == control::NAME {
            return Err(Errno::EPERM);
        }
        component(name)
    }

    /// The snapshot directory handle `fh` serves from `offset`.
    fn entries(&self, ino: u64, dir: &OpenDir<R::Dir>, offset: u64) -> Result<Arc<Vec<DirEnt>>> {
        listing::snapshot(&dir.entries, offset, || {
            let mut names = self.rule.list(ino, &dir.state)?;
            if ino == ROOT_ID {
                // The control file's name is the control file's.
                names.retain(|e| e.name.to_bytes() != control::NAME.as_bytes());
            }
            let names = Arc::new(names);
            *dir.entries.lock() = names.clone();
            Ok(names)
        })
    }
}

impl<R: Rule> Filesystem for Stack<R> {
    fn lookup(&self, ctx: &Ctx, parent: u64, name: &OsStr) -> Result<Lookup> {
        if parent == ROOT_ID && name == control::NAME {
            return Ok(Lookup::Found(control::entry()));
        }
        let found = lookup_component(name).and_then(|name| self.rule.lookup(ctx, parent, &name));
        Lookup::of(found, || self.rule.negative_ttl(ctx, parent))
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        if ino != CONTROL_ID {
            self.rule.forget(ino, nlookup);
        }
    }

    fn getattr(&self, ctx: &Ctx, ino: u64, fh: Option<u64>) -> Result<AttrOut> {
        if ino == CONTROL_ID {
            return Ok(control::attr_out());
        }
        self.rule.getattr(ctx, ino, fh)
    }

    fn setattr(&self, ctx: &Ctx, ino: u64, fh: Option<u64>, set: &SetAttr) -> Result<AttrOut> {
        if ino == CONTROL_ID {
            return Err(Errno::EPERM);
        }
        self.rule.setattr(ctx, ino, fh, set)
    }

    fn readlink(&self, _ctx: &Ctx, ino: u64) -> Result<Vec<u8>> {
        if ino == CONTROL_ID {
            return Err(Errno::EINVAL);
        }
        self.rule.readlink(ino)
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
        let new = New::Node { mode, umask, rdev };
        self.rule
            .make(ctx, parent, &Self::new_name(parent, name)?, new)
    }

    fn mkdir(&self, ctx: &Ctx, parent: u64, name: &OsStr, mode: u32, umask: u32) -> Result<Entry> {
        let new = New::Dir { mode, umask };
        self.rule
            .make(ctx, parent, &Self::new_name(parent, name)?, new)
    }

    fn unlink(&self, ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()> {
        self.rule
            .remove(ctx, parent, &Self::old_name(parent, name)?, false)
    }

    fn rmdir(&self, ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()> {
        self.rule
            .remove(ctx, parent, &Self::old_name(parent, name)?, true)
    }

    fn symlink(&self, ctx: &Ctx, parent: u64, name: &OsStr, target: &Path) -> Result<Entry> {
        self.rule.make(
            ctx,
            parent,
            &Self::new_name(parent, name)?,
            New::Symlink(target),
        )
    }

    fn rename(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> Result<()> {
        let name = Self::old_name(parent, name)?;
        let new_name = Self::old_name(new_parent, new_name)?;
        self.rule
            .rename(ctx, parent, &name, new_parent, &new_name, flags)
    }

    fn link(&self, ctx: &Ctx, ino: u64, new_parent: u64, new_name: &OsStr) -> Result<Entry> {
        if ino == CONTROL_ID {
            return Err(Errno::EPERM);
        }
        let new_name = Self::new_name(new_parent, new_name)?;
        self.rule.link(ctx, ino, new_parent, &new_name)
    }

    fn open(&self, _ctx: &Ctx, ino: u64, flags: i32) -> Result<Opened> {
        if ino == CONTROL_ID {
            return Ok(self.rule.files().insert(control::open()?, false));
        }
        self.rule.open(ino, flags)
    }

    fn read(&self, _ctx: &Ctx, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        if ino == CONTROL_ID {
            return self.rule.files().read(fh, offset, size);
        }
        self.rule.read(ino, fh, offset, size)
    }

    fn write(&self, _ctx: &Ctx, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.rule.write(ino, fh, offset, data)
    }

    fn flush(&self, _ctx: &Ctx, _ino: u64, fh: u64) -> Result<()> {
        self.rule.files().flush(fh)
    }

    fn release(&self, _ctx: &Ctx, ino: u64, fh: u64) -> Result<()> {
        if ino == CONTROL_ID {
            self.rule.files().release(fh);
        } else {
            self.rule.release(ino, fh);
        }
        Ok(())
    }

    fn fsync(&self, _ctx: &Ctx, _ino: u64, fh: u64, datasync: bool) -> Result<()> {
        self.rule.files().fsync(fh, datasync)
    }

    fn opendir(&self, ctx: &Ctx, ino: u64, _flags: i32) -> Result<Opened> {
        let (state, cache) = self.rule.opendir(ctx, ino)?;
        let dir = OpenDir {
            state,
            entries: Mutex::new(Arc::new(Vec::new())),
        };
        Ok(self.dirs.insert(dir, cache))
    }

    fn readdir(
        &self,
        _ctx: &Ctx,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut dyn DirSink,
    ) -> Result<()> {
        let dir = self.dirs.get(fh)?;
        listing::fill(&self.entries(ino, &dir, offset)?, offset, sink);
        Ok(())
    }

    fn readdirplus(
        &self,
        ctx: &Ctx,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut dyn DirPlusSink,
    ) -> Result<()> {
        let dir = self.dirs.get(fh)?;
        listing::fill_plus(
            &self.entries(ino, &dir, offset)?,
            offset,
            sink,
            || self.rule.dir_attr(ino, &dir.state),
            |e| self.rule.list_lookup(ctx, ino, &dir.state, &e.name),
            |id| self.rule.forget(id, 1),
        )
    }

    fn releasedir(&self, _ctx: &Ctx, _ino: u64, fh: u64) -> Result<()> {
        self.dirs.remove(fh);
        Ok(())
    }

    fn fsyncdir(&self, _ctx: &Ctx, ino: u64, fh: u64, datasync: bool) -> Result<()> {
        self.rule.fsyncdir(ino, &self.dirs.get(fh)?.state, datasync)
    }

    fn statfs(&self, ctx: &Ctx, ino: u64) -> Result<StatFs> {
        self.rule
            .statfs(ctx, if ino == CONTROL_ID { ROOT_ID } else { ino })
    }

    fn setxattr(&self, ctx: &Ctx, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        if ino == CONTROL_ID {
            return control::set(&self.rule, &self.refusals, ctx, name, value);
        }
        self.rule.setxattr(ctx, ino, name, value, flags)
    }

    fn getxattr(&self, ctx: &Ctx, ino: u64, name: &OsStr, size: u32) -> Result<Xattr> {
        if ino == CONTROL_ID {
            return Xattr::reply(control::get(&self.rule, &self.refusals, ctx, name)?, size);
        }
        self.rule.getxattr(ctx, ino, name, size)
    }

    fn listxattr(&self, ctx: &Ctx, ino: u64, size: u32) -> Result<Xattr> {
        if ino == CONTROL_ID {
            return Xattr::reply(control::list(&self.rule), size);
        }
        self.rule.listxattr(ctx, ino, size)
    }

    fn removexattr(&self, ctx: &Ctx, ino: u64, name: &OsStr) -> Result<()> {
        if ino == CONTROL_ID {
            return Err(Errno::ENOTSUP);
        }
        self.rule.removexattr(ctx, ino, name)
    }

    fn access(&self, ctx: &Ctx, ino: u64, mask: i32) -> Result<()> {
        if ino == CONTROL_ID {
            return Ok(());
        }
        self.rule.access(ctx, ino, mask)
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
        let name = Self::new_name(parent, name)?;
        self.rule.create(ctx, parent, &name, mode, umask, flags)
    }

    fn fallocate(
        &self,
        _ctx: &Ctx,
        _ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<()> {
        self.rule.files().fallocate(fh, offset, length, mode)
    }

    fn lseek(&self, _ctx: &Ctx, _ino: u64, fh: u64, offset: i64, whence: i32) -> Result<i64> {
        self.rule.files().lseek(fh, offset, whence)
    }

    fn copy_file_range(
        &self,
        _ctx: &Ctx,
        _ino_in: u64,
        fh_in: u64,
        offset_in: u64,
        _ino_out: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
        _flags: u32,
    ) -> Result<u32> {
        self.rule
            .files()
            .copy_file_range(fh_in, offset_in, fh_out, offset_out, len)
    }

    fn stats(&self) -> Stats {
        Stats {
            inodes: self.rule.inodes() as u64,
            open_files: self.rule.files().len() as u64,
            open_dirs: self.dirs.len() as u64,
            cached_fds: self.rule.cached_fds() as u64,
        }
    }

    fn attach(&self, invalidator: Arc<dyn Invalidator>) {
        self.rule.attach(invalidator);
    }
}
