//! The boundary between the core and whatever serves it to the kernel.
//!
//! [`Filesystem`] is strata's own low-level filesystem trait: node ids, plain
//! data in and out, `Result<_, Errno>` everywhere. The FUSE adapter maps it onto
//! `fuser`; swapping the FUSE library means rewriting only that adapter.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::Result;

/// Node id of the mount's root, fixed by the kernel protocol.
pub const ROOT_ID: u64 = 1;
/// Node id of the control file `/.strata` (see [`crate::control`]).
pub const CONTROL_ID: u64 = u64::MAX - 1;

/// Who is asking: taken from the request header.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    BlockDevice,
    CharDevice,
    Fifo,
    Socket,
}

impl FileKind {
    /// From the `S_IFMT` bits of a mode.
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::Regular,
            libc::S_IFDIR => FileKind::Directory,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFBLK => FileKind::BlockDevice,
            libc::S_IFCHR => FileKind::CharDevice,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFSOCK => FileKind::Socket,
            _ => return None,
        })
    }

    /// From a `d_type` value of a directory entry.
    pub fn from_dtype(dtype: u8) -> Option<FileKind> {
        Some(match dtype {
            libc::DT_REG => FileKind::Regular,
            libc::DT_DIR => FileKind::Directory,
            libc::DT_LNK => FileKind::Symlink,
            libc::DT_BLK => FileKind::BlockDevice,
            libc::DT_CHR => FileKind::CharDevice,
            libc::DT_FIFO => FileKind::Fifo,
            libc::DT_SOCK => FileKind::Socket,
            _ => return None,
        })
    }
}

/// File attributes as presented to the kernel (`ino` is the node id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky (no file type bits).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
}

/// What `lookup` found: an entry (the kernel takes one lookup reference), or
/// no such name, which the kernel may remember for `ttl` (zero: not at all).
#[derive(Clone, Copy, Debug)]
pub enum Lookup {
    Found(Entry),
    Missing { ttl: Duration },
}

impl Lookup {
    /// `res` as a lookup's answer: ENOENT is a miss remembered for `ttl()`.
    pub fn of(res: Result<Entry>, ttl: impl FnOnce() -> Duration) -> Result<Lookup> {
        match res {
            Ok(e) => Ok(Lookup::Found(e)),
            Err(crate::Errno::ENOENT) => Ok(Lookup::Missing { ttl: ttl() }),
            Err(e) => Err(e),
        }
    }

    /// The entry found; a miss is ENOENT.
    pub fn entry(self) -> Result<Entry> {
        match self {
            Lookup::Found(e) => Ok(e),
            Lookup::Missing { .. } => Err(crate::Errno::ENOENT),
        }
    }
}

/// A successful name resolution: the kernel takes one lookup reference on `attr.ino`.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub attr: Attr,
    pub generation: u64,
    pub entry_ttl: Duration,
    pub attr_ttl: Duration,
}

#[derive(Clone, Copy, Debug)]
pub struct AttrOut {
    pub attr: Attr,
    pub ttl: Duration,
}

/// A time to set in `setattr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(SystemTime),
}

/// The fields a `setattr` changes; `None` leaves a field alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
    /// This caller, without CAP_FSETID, wrote to or truncated the file: clear
    /// set-user-ID and set-group-ID as the kernel would (the daemon's own
    /// writes, as root, do not).
    pub kill_suidgid: Option<Ctx>,
}

impl Ctx {
    /// Whether the caller is in group `gid`: its fsgid, or one of its
    /// supplementary groups (read from /proc, so only on rare paths).
    pub fn in_group(&self, gid: u32) -> bool {
        if self.gid == gid {
            return true;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return false;
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("Groups:"))
            .is_some_and(|g| g.split_whitespace().any(|g| g.parse() == Ok(gid)))
    }
}

/// An open file or directory handle and how the kernel should treat it.
#[derive(Debug, Default)]
pub struct Opened {
    pub fh: u64,
    /// Keep the page cache across opens (the data did not change behind our back).
    pub keep_cache: bool,
    /// Bypass the page cache.
    pub direct_io: bool,
    /// Let the kernel cache directory listings.
    pub cache_dir: bool,
    /// No FLUSH request on close: nothing to do there.
    pub noflush: bool,
    /// Backing file for kernel passthrough of reads and writes, if the adapter
    /// supports it. All opens of one node must offer the same backing file.
    pub passthrough: Option<Arc<OwnedFd>>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// Answer to getxattr/listxattr: the size asked for (`size == 0` in the request) or the data.
#[derive(Debug, PartialEq, Eq)]
pub enum Xattr {
    Size(u32),
    Data(Vec<u8>),
}

impl Xattr {
    /// Shapes a value for a request that allows `size` bytes (0 asks only for the length).
    pub fn reply(value: Vec<u8>, size: u32) -> Result<Xattr> {
        if size == 0 {
            Ok(Xattr::Size(value.len() as u32))
        } else if value.len() > size as usize {
            Err(crate::Errno::ERANGE)
        } else {
            Ok(Xattr::Data(value))
        }
    }
}

/// Receives `readdir` entries; `add` returns `false` once the reply buffer is full.
pub trait DirSink {
    fn add(&mut self, ino: u64, next_offset: u64, kind: FileKind, name: &OsStr) -> bool;
}

/// Receives `readdirplus` entries; `add` returns `false` once the reply buffer is full,
/// in which case the entry was not sent and no lookup reference was taken.
pub trait DirPlusSink {
    fn add(&mut self, next_offset: u64, name: &OsStr, entry: &Entry) -> bool;
}

/// Counters exposed through `strata status --json` and the stats xattr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub inodes: u64,
    pub open_files: u64,
    pub open_dirs: u64,
    pub cached_fds: u64,
}

/// Tells the kernel that something it caches changed behind its back. The
/// FUSE adapter implements it with reverse notifications.
pub trait Invalidator: Send + Sync {
    /// Drops the kernel's name `name` in directory `parent`, positive or negative.
    fn entry(&self, parent: u64, name: &OsStr);
    /// Makes the kernel ask for `name` in `parent` again at its next use,
    /// keeping its entry (and what is cached below it) if the answer is the
    /// same node.
    fn expire(&self, parent: u64, name: &OsStr) {
        self.entry(parent, name);
    }
    /// Drops the kernel's attributes of `ino` and, when `data`, its cached
    /// contents (file pages or directory listing).
    fn inode(&self, ino: u64, data: bool);
}

/// strata's low-level filesystem interface. Node ids follow the kernel protocol:
/// every `Entry` returned by lookup/create/mknod/mkdir/symlink/link/readdirplus
/// adds one lookup reference, `forget` removes them, and a node is dropped at zero.
#[allow(clippy::too_many_arguments)]
pub trait Filesystem: Send + Sync + 'static {
    /// A missing name is `Lookup::Missing`, with how long the kernel may
    /// remember it, not an error.
    fn lookup(&self, ctx: &Ctx, parent: u64, name: &OsStr) -> Result<Lookup>;
    fn forget(&self, ino: u64, nlookup: u64);
    fn getattr(&self, ctx: &Ctx, ino: u64, fh: Option<u64>) -> Result<AttrOut>;
    fn setattr(&self, ctx: &Ctx, ino: u64, fh: Option<u64>, set: &SetAttr) -> Result<AttrOut>;
    fn readlink(&self, ctx: &Ctx, ino: u64) -> Result<Vec<u8>>;
    fn mknod(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    ) -> Result<Entry>;
    fn mkdir(&self, ctx: &Ctx, parent: u64, name: &OsStr, mode: u32, umask: u32) -> Result<Entry>;
    fn unlink(&self, ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()>;
    fn rmdir(&self, ctx: &Ctx, parent: u64, name: &OsStr) -> Result<()>;
    fn symlink(&self, ctx: &Ctx, parent: u64, name: &OsStr, target: &Path) -> Result<Entry>;
    /// `flags` are `RENAME_NOREPLACE` / `RENAME_EXCHANGE` / `RENAME_WHITEOUT` bits.
    fn rename(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        flags: u32,
    ) -> Result<()>;
    fn link(&self, ctx: &Ctx, ino: u64, new_parent: u64, new_name: &OsStr) -> Result<Entry>;
    /// `flags` are the open(2) flags.
    fn open(&self, ctx: &Ctx, ino: u64, flags: i32) -> Result<Opened>;
    fn read(&self, ctx: &Ctx, ino: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>>;
    fn write(&self, ctx: &Ctx, ino: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32>;
    fn flush(&self, ctx: &Ctx, ino: u64, fh: u64) -> Result<()>;
    fn release(&self, ctx: &Ctx, ino: u64, fh: u64) -> Result<()>;
    fn fsync(&self, ctx: &Ctx, ino: u64, fh: u64, datasync: bool) -> Result<()>;
    fn opendir(&self, ctx: &Ctx, ino: u64, flags: i32) -> Result<Opened>;
    fn readdir(
        &self,
        ctx: &Ctx,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut dyn DirSink,
    ) -> Result<()>;
    fn readdirplus(
        &self,
        ctx: &Ctx,
        ino: u64,
        fh: u64,
        offset: u64,
        sink: &mut dyn DirPlusSink,
    ) -> Result<()>;
    fn releasedir(&self, ctx: &Ctx, ino: u64, fh: u64) -> Result<()>;
    fn fsyncdir(&self, ctx: &Ctx, ino: u64, fh: u64, datasync: bool) -> Result<()>;
    fn statfs(&self, ctx: &Ctx, ino: u64) -> Result<StatFs>;
    fn setxattr(&self, ctx: &Ctx, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()>;
    fn getxattr(&self, ctx: &Ctx, ino: u64, name: &OsStr, size: u32) -> Result<Xattr>;
    fn listxattr(&self, ctx: &Ctx, ino: u64, size: u32) -> Result<Xattr>;
    fn removexattr(&self, ctx: &Ctx, ino: u64, name: &OsStr) -> Result<()>;
    /// `mask` is the access(2) mask (`F_OK`, `R_OK`, ...).
    fn access(&self, ctx: &Ctx, ino: u64, mask: i32) -> Result<()>;
    fn create(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(Entry, Opened)>;
    fn fallocate(
        &self,
        ctx: &Ctx,
        ino: u64,
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<()>;
    fn lseek(&self, ctx: &Ctx, ino: u64, fh: u64, offset: i64, whence: i32) -> Result<i64>;
    fn copy_file_range(
        &self,
        ctx: &Ctx,
        ino_in: u64,
        fh_in: u64,
        offset_in: u64,
        ino_out: u64,
        fh_out: u64,
        offset_out: u64,
        len: u64,
        flags: u32,
    ) -> Result<u32>;
    fn stats(&self) -> Stats;

    /// Called once the mount is up, with the way to invalidate kernel caches.
    fn attach(&self, _invalidator: Arc<dyn Invalidator>) {}
}
