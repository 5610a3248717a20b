//! Conversions between the core's types and fuser's, and the sinks that
//! turn readdir entries into reply buffers.

use std::ffi::OsStr;
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileType, FopenFlags, Generation, INodeNo, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyXattr, Request, TimeOrNow,
};
use strata_core::{self as core, Ctx, DirPlusSink, DirSink, FileKind, Opened, SetTime, Xattr};

pub(crate) fn errno(e: core::Errno) -> Errno {
    Errno::from_i32(e.raw())
}

pub(crate) fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

pub(crate) fn attr(a: &core::Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.atime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.ctime,
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

pub(crate) fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

pub(crate) fn set_time(t: Option<TimeOrNow>) -> Option<SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(t) => SetTime::At(t),
    })
}

pub(crate) fn fopen_flags(o: &Opened) -> FopenFlags {
    let mut f = FopenFlags::empty();
    if o.keep_cache {
        f |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if o.direct_io {
        f |= FopenFlags::FOPEN_DIRECT_IO;
    }
    if o.cache_dir {
        f |= FopenFlags::FOPEN_CACHE_DIR;
    }
    if o.noflush {
        f |= FopenFlags::FOPEN_NOFLUSH;
    }
    f
}

/// Open flags for a passthrough handle: the kernel fails its reads with EIO
/// when FOPEN_KEEP_CACHE comes with FOPEN_PASSTHROUGH (and the page cache is
/// the backing file's anyway).
pub(crate) fn passthrough_flags(o: &Opened) -> FopenFlags {
    fopen_flags(o) - FopenFlags::FOPEN_KEEP_CACHE
}

pub(crate) struct DirReply<'a>(pub(crate) &'a mut ReplyDirectory);
impl DirSink for DirReply<'_> {
    fn add(&mut self, ino: u64, next_offset: u64, k: FileKind, name: &OsStr) -> bool {
        !self.0.add(INodeNo(ino), next_offset, kind(k), name)
    }
}

/// The entries and the one timeout READDIRPLUS gives each for its name and
/// attributes: none for a file open for writing (`Adapter::attr_ttl`).
pub(crate) struct DirPlusReply<'a>(
    pub(crate) &'a mut ReplyDirectoryPlus,
    pub(crate) &'a dyn Fn(u64, Duration) -> Duration,
);
impl DirPlusSink for DirPlusReply<'_> {
    fn add(&mut self, next_offset: u64, name: &OsStr, e: &core::Entry) -> bool {
        let a = attr(&e.attr);
        !self.0.add(
            a.ino,
            next_offset,
            name,
            &(self.1)(e.attr.ino, e.entry_ttl),
            &a,
            Generation(e.generation),
        )
    }
}

pub(crate) fn reply_xattr(res: core::Result<Xattr>, reply: ReplyXattr) {
    match res {
        Ok(Xattr::Size(n)) => reply.size(n),
        Ok(Xattr::Data(d)) => reply.data(&d),
        Err(e) => reply.error(errno(e)),
    }
}

pub(crate) fn reply_empty(res: core::Result<()>, reply: ReplyEmpty) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}
