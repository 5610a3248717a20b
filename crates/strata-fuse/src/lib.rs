//! Serves a [`strata_core::Filesystem`] to the kernel through `fuser`.
//!
//! This crate is the only one that knows `fuser`: it converts requests and
//! replies, negotiates kernel features (readdirplus, parallel dirops, kernel
//! passthrough), manages passthrough backing ids, and keeps the mount alive
//! when a handler panics (the request gets EIO and the panic is logged).

#![deny(unsafe_code)]

use std::ffi::OsStr;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, Config, CopyFileRangeFlags, FileHandle, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};
use parking_lot::Mutex;
use strata_core as core;
use strata_core::{FileKind, SetAttr, Xattr};

mod convert;
mod io_modes;

use convert::{
    DirPlusReply, DirReply, attr, ctx, errno, fopen_flags, passthrough_flags, reply_empty,
    reply_xattr, set_time,
};

pub use fuser::{Session, SessionUnmounter};
use io_modes::{IoMode, IoModes, OPEN_ATTEMPTS};

/// Name of the virtual xattr on the root that reports counters as JSON.
pub const STATS_XATTR: &str = "user.strata.stats";
/// Getting this xattr panics inside the handler when `MountConfig::panic_probe`
/// is set: the mounted tests use it to check a panic costs one EIO, not the mount.
pub const PANIC_XATTR: &str = "user.strata.debug.panic";

#[derive(Clone, Debug)]
pub struct MountConfig {
    pub fsname: String,
    pub allow_other: bool,
    pub read_only: bool,
    pub threads: usize,
    /// Try kernel passthrough for regular-file I/O (falls back per file).
    pub passthrough: bool,
    /// Take requests through per-CPU io_uring queues when the kernel offers
    /// them (Linux 6.14+, fuse module parameter `enable_uring`).
    pub uring: bool,
    pub panic_probe: bool,
    /// Device files work (FUSE's default: not).
    pub dev: bool,
    /// setuid/setgid bits take effect (FUSE's default: not).
    pub suid: bool,
    pub noexec: bool,
    pub atime: Atime,
    pub sync: bool,
    pub dirsync: bool,
}

/// The mount's access-time mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Atime {
    /// The kernel's default (relatime).
    #[default]
    Default,
    No,
    Relative,
    Strict,
}

/// The `fuser::Filesystem` that forwards to a core filesystem.
pub struct Adapter<F: core::Filesystem> {
    fs: Arc<F>,
    cfg: MountConfig,
    passthrough: AtomicBool,
    io_modes: Mutex<IoModes>,
    /// Open passthrough handles that can write, on all inodes: while there
    /// are none, replies need not look their inode up in `io_modes`.
    writers: AtomicUsize,
    /// Reverse notifications, once the session exists.
    notifier: Arc<OnceLock<fuser::Notifier>>,
}

/// Runs a handler; a panic is logged and the reply (dropped while unwinding)
/// goes out as EIO, so the worker thread and the mount survive.
fn guarded(op: &'static str, f: impl FnOnce()) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(f)) {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(op, "handler panicked, replied EIO: {msg}");
    }
}

impl<F: core::Filesystem> Adapter<F> {
    pub fn new(fs: Arc<F>, cfg: MountConfig) -> Self {
        Adapter {
            fs,
            passthrough: AtomicBool::new(cfg.passthrough),
            cfg,
            io_modes: Mutex::new(IoModes::default()),
            writers: AtomicUsize::new(0),
            notifier: Arc::new(OnceLock::new()),
        }
    }

    /// The attribute timeout for `ino`: none while a passthrough handle
    /// that can write is open on it. The kernel learns of write(2) and
    /// truncate through such a handle, but not of stores through a shared
    /// mapping of it, which change the host file's times behind its back.
    fn attr_ttl(&self, ino: u64, ttl: Duration) -> Duration {
        if self.writers.load(Ordering::Relaxed) > 0 && self.io_modes.lock().has_writer(ino) {
            Duration::ZERO
        } else {
            ttl
        }
    }

    /// Drops the kernel's attributes of `ino` (not its pages).
    fn inval_attrs(&self, ino: u64) {
        if let Some(n) = self.notifier.get()
            && let Err(e) = n.inval_inode(INodeNo(ino), -1, 0)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!(ino, "attribute invalidation failed: {e}");
        }
    }

    fn reply_entry(&self, res: core::Result<core::Entry>, reply: ReplyEntry) {
        match res {
            Ok(e) => reply.entry_with_ttls(
                &self.attr_ttl(e.attr.ino, e.attr_ttl),
                &e.entry_ttl,
                &attr(&e.attr),
                Generation(e.generation),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn stats_json(&self) -> Vec<u8> {
        let s = self.fs.stats();
        format!(
            "{{\"inodes\":{},\"open_files\":{},\"open_dirs\":{},\"cached_fds\":{},\"passthrough_inodes\":{},\"io_uring_requests\":{}}}",
            s.inodes,
            s.open_files,
            s.open_dirs,
            s.cached_fds,
            self.io_modes.lock().backed_inodes(),
            fuser::io_uring_requests()
        )
        .into_bytes()
    }
}

impl<F: core::Filesystem> fuser::Filesystem for Adapter<F> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        let wanted = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_MAX_PAGES
            // The kernel enforces host ACLs and caches them with the attributes,
            // so `ls -l` does not ask for system.posix_acl_* per file.
            | InitFlags::FUSE_POSIX_ACL
            // The umask is ours to apply: not under a default ACL.
            | InitFlags::FUSE_DONT_MASK
            // We clear setuid/setgid on writes and truncates (see `setattr`),
            // so the kernel asks for security.capability once per open
            // instead of on every write (it marks inodes S_NOSEC).
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
        let have = config.capabilities();
        if let Err(missing) = config.add_capabilities(wanted & have) {
            tracing::warn!("kernel lacks {missing:?}");
        }
        let _ = config.set_max_write(1 << 20);
        if self.cfg.uring {
            if have.contains(InitFlags::FUSE_OVER_IO_URING) {
                // A request is served on its caller's CPU: no cross-CPU
                // wake-up, which is most of a round trip's cost on a VM.
                if config
                    .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                    .is_ok()
                {
                    tracing::info!("requests through per-CPU io_uring queues");
                }
            } else {
                tracing::info!(
                    "kernel offers no FUSE over io_uring (Linux 6.14+ with \
                     /sys/module/fuse/parameters/enable_uring = Y); requests through /dev/fuse"
                );
            }
        }
        if self.cfg.passthrough && have.contains(InitFlags::FUSE_PASSTHROUGH) {
            // Depth 1: backing files on ordinary filesystems, and this mount can
            // still be a lower layer of kernel overlayfs.
            if config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok()
            {
                tracing::info!("kernel passthrough enabled");
            } else {
                self.passthrough.store(false, Ordering::Relaxed);
            }
        } else {
            if self.cfg.passthrough {
                tracing::info!("kernel has no FUSE passthrough; serving I/O through the daemon");
            }
            self.passthrough.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guarded("lookup", || {
            match self.fs.lookup(&ctx(req), parent.0, name) {
                Ok(core::Lookup::Missing { ttl }) if !ttl.is_zero() => {
                    // Node id 0 with a timeout: the kernel caches the miss.
                    let mut a = attr(&core::Attr {
                        ino: 0,
                        size: 0,
                        blocks: 0,
                        atime: SystemTime::UNIX_EPOCH,
                        mtime: SystemTime::UNIX_EPOCH,
                        ctime: SystemTime::UNIX_EPOCH,
                        kind: FileKind::Regular,
                        perm: 0,
                        nlink: 0,
                        uid: 0,
                        gid: 0,
                        rdev: 0,
                        blksize: 0,
                    });
                    a.ino = INodeNo(0);
                    reply.entry_with_ttls(&Duration::ZERO, &ttl, &a, Generation(0));
                }
                res => self.reply_entry(res.and_then(core::Lookup::entry), reply),
            }
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        guarded("forget", || self.fs.forget(ino.0, nlookup))
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        guarded("getattr", || {
            match self.fs.getattr(&ctx(req), ino.0, fh.map(|f| f.0)) {
                Ok(a) => reply.attr(&self.attr_ttl(ino.0, a.ttl), &attr(&a.attr)),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        guarded("setattr", || {
            let mut set = SetAttr {
                mode,
                uid,
                gid,
                size,
                atime: set_time(atime),
                mtime: set_time(mtime),
                kill_suidgid: None,
            };
            // FUSE_HANDLE_KILLPRIV_V2: the kernel leaves clearing setuid/setgid
            // to us and flags it with FATTR_KILL_SUIDGID, which fuser does not
            // pass on. It sends a setattr with nothing in it on a write that
            // must kill privileges, and a size on a truncate; we take a caller
            // other than root as lacking CAP_FSETID. (File capabilities the
            // host kernel drops itself when the daemon writes or truncates.)
            let nothing_else = set.mode.is_none()
                && set.uid.is_none()
                && set.gid.is_none()
                && set.size.is_none()
                && set.atime.is_none()
                && set.mtime.is_none();
            if req.uid() != 0 && (nothing_else || size.is_some()) {
                set.kill_suidgid = Some(ctx(req));
            }
            match self.fs.setattr(&ctx(req), ino.0, fh.map(|f| f.0), &set) {
                Ok(a) => reply.attr(&self.attr_ttl(ino.0, a.ttl), &attr(&a.attr)),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        guarded("readlink", || match self.fs.readlink(&ctx(req), ino.0) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        guarded("mknod", || {
            self.reply_entry(
                self.fs.mknod(&ctx(req), parent.0, name, mode, umask, rdev),
                reply,
            )
        })
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        guarded("mkdir", || {
            self.reply_entry(self.fs.mkdir(&ctx(req), parent.0, name, mode, umask), reply)
        })
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("unlink", || {
            reply_empty(self.fs.unlink(&ctx(req), parent.0, name), reply)
        })
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("rmdir", || {
            reply_empty(self.fs.rmdir(&ctx(req), parent.0, name), reply)
        })
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        guarded("symlink", || {
            self.reply_entry(
                self.fs.symlink(&ctx(req), parent.0, link_name, target),
                reply,
            )
        })
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        guarded("rename", || {
            reply_empty(
                self.fs.rename(
                    &ctx(req),
                    parent.0,
                    name,
                    newparent.0,
                    newname,
                    flags.bits(),
                ),
                reply,
            )
        })
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        guarded("link", || {
            self.reply_entry(self.fs.link(&ctx(req), ino.0, newparent.0, newname), reply)
        })
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guarded("open", || {
            let ctx = ctx(req);
            // Opening again must not repeat a side effect (truncation).
            let retry = flags.0 & libc::O_ACCMODE == libc::O_RDONLY && flags.0 & libc::O_TRUNC == 0;
            let mut attempt = 1;
            loop {
                let mut o = match self.fs.open(&ctx, ino.0, flags.0) {
                    Ok(o) => o,
                    Err(e) => return reply.error(errno(e)),
                };
                let writer = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
                match self.io_mode(ino.0, o.fh, &o, writer, |fd| reply.open_backing(fd)) {
                    IoMode::Backed(id) => {
                        if writer {
                            // What the kernel has cached may be from before;
                            // from now on it caches nothing (`attr_ttl`).
                            self.inval_attrs(ino.0);
                        }
                        return reply.opened_passthrough(
                            FileHandle(o.fh),
                            passthrough_flags(&o),
                            &id,
                        );
                    }
                    IoMode::Daemon => return reply.opened(FileHandle(o.fh), fopen_flags(&o)),
                    IoMode::Conflict if retry && attempt < OPEN_ATTEMPTS => {
                        if let Err(e) = self.fs.release(&ctx, ino.0, o.fh) {
                            tracing::debug!(ino = ino.0, "release of a superseded open: {e}");
                        }
                        attempt += 1;
                    }
                    IoMode::Conflict => {
                        Self::conflicting(ino.0, o.fh, &mut o);
                        return reply.opened(FileHandle(o.fh), fopen_flags(&o));
                    }
                }
            }
        })
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        guarded("read", || {
            match self.fs.read(&ctx(req), ino.0, fh.0, offset, size) {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        guarded("write", || {
            let ctx = ctx(req);
            let res = self
                .fs
                .write(&ctx, ino.0, fh.0, offset, data)
                .and_then(|n| {
                    if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                        let kill = SetAttr {
                            kill_suidgid: Some(ctx),
                            ..SetAttr::default()
                        };
                        self.fs.setattr(&ctx, ino.0, Some(fh.0), &kill)?;
                    }
                    Ok(n)
                });
            match res {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        guarded("flush", || {
            reply_empty(self.fs.flush(&ctx(req), ino.0, fh.0), reply)
        })
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        guarded("release", || {
            self.release_backing(fh.0);
            reply_empty(self.fs.release(&ctx(req), ino.0, fh.0), reply)
        })
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded("fsync", || {
            reply_empty(self.fs.fsync(&ctx(req), ino.0, fh.0, datasync), reply)
        })
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guarded("opendir", || {
            match self.fs.opendir(&ctx(req), ino.0, flags.0) {
                Ok(o) => reply.opened(FileHandle(o.fh), fopen_flags(&o)),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        guarded("readdir", || {
            match self
                .fs
                .readdir(&ctx(req), ino.0, fh.0, offset, &mut DirReply(&mut reply))
            {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        guarded("readdirplus", || {
            match self.fs.readdirplus(
                &ctx(req),
                ino.0,
                fh.0,
                offset,
                &mut DirPlusReply(&mut reply, &|ino, ttl| self.attr_ttl(ino, ttl)),
            ) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn releasedir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        guarded("releasedir", || {
            reply_empty(self.fs.releasedir(&ctx(req), ino.0, fh.0), reply)
        })
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        guarded("fsyncdir", || {
            reply_empty(self.fs.fsyncdir(&ctx(req), ino.0, fh.0, datasync), reply)
        })
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        guarded("statfs", || match self.fs.statfs(&ctx(req), ino.0) {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
            ),
            Err(e) => reply.error(errno(e)),
        })
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        guarded("setxattr", || {
            reply_empty(
                self.fs.setxattr(&ctx(req), ino.0, name, value, flags),
                reply,
            )
        })
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guarded("getxattr", || {
            if ino.0 == core::ROOT_ID && name == STATS_XATTR {
                return reply_xattr(Xattr::reply(self.stats_json(), size), reply);
            }
            if self.cfg.panic_probe && name == PANIC_XATTR {
                panic!("panic requested through {PANIC_XATTR}");
            }
            reply_xattr(self.fs.getxattr(&ctx(req), ino.0, name, size), reply)
        })
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guarded("listxattr", || {
            reply_xattr(self.fs.listxattr(&ctx(req), ino.0, size), reply)
        })
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        guarded("removexattr", || {
            reply_empty(self.fs.removexattr(&ctx(req), ino.0, name), reply)
        })
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        guarded("access", || {
            reply_empty(self.fs.access(&ctx(req), ino.0, mask.bits()), reply)
        })
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        guarded("create", || {
            match self
                .fs
                .create(&ctx(req), parent.0, name, mode, umask, flags)
            {
                Ok((e, mut o)) => {
                    let a = attr(&e.attr);
                    let generation = Generation(e.generation);
                    let writer = flags & libc::O_ACCMODE != libc::O_RDONLY;
                    let mode = match self
                        .io_mode(e.attr.ino, o.fh, &o, writer, |fd| reply.open_backing(fd))
                    {
                        IoMode::Conflict => {
                            Self::conflicting(e.attr.ino, o.fh, &mut o);
                            IoMode::Daemon
                        }
                        mode => mode,
                    };
                    // The attributes keep their timeout here, unlike in every
                    // other reply while the file is open for writing: they are
                    // fresh, and a file must grow (write, truncate, fallocate:
                    // each drops them) before a mapping can store into it. With
                    // default_permissions the kernel checks the new inode's
                    // permissions right after CREATE; expired attributes cost a
                    // GETATTR there, on every create.
                    match mode {
                        IoMode::Backed(id) => reply.created_passthrough(
                            &e.entry_ttl,
                            &a,
                            generation,
                            FileHandle(o.fh),
                            passthrough_flags(&o),
                            &id,
                        ),
                        _ => reply.created(
                            &e.entry_ttl,
                            &a,
                            generation,
                            FileHandle(o.fh),
                            fopen_flags(&o),
                        ),
                    }
                }
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        guarded("fallocate", || {
            reply_empty(
                self.fs
                    .fallocate(&ctx(req), ino.0, fh.0, offset, length, mode),
                reply,
            )
        })
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        guarded("lseek", || {
            match self.fs.lseek(&ctx(req), ino.0, fh.0, offset, whence) {
                Ok(o) => reply.offset(o),
                Err(e) => reply.error(errno(e)),
            }
        })
    }

    fn copy_file_range(
        &self,
        req: &Request,
        ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        guarded("copy_file_range", || {
            match self.fs.copy_file_range(
                &ctx(req),
                ino_in.0,
                fh_in.0,
                offset_in,
                ino_out.0,
                fh_out.0,
                offset_out,
                len,
                flags.bits() as u32,
            ) {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(e)),
            }
        })
    }
}

/// Mounts `fs` on `mountpoint`; returns once the kernel has completed INIT,
/// i.e. the mount is ready. Run the returned session to serve requests.
pub fn mount<F: core::Filesystem>(
    fs: Arc<F>,
    mountpoint: &Path,
    cfg: &MountConfig,
) -> io::Result<Session<Adapter<F>>> {
    let mut options = vec![
        MountOption::FSName(cfg.fsname.clone()),
        // A kernel parameter, so the mount table says `fuse.strata` (fuser only passes
        // `Subtype` to fusermount).
        MountOption::CUSTOM("subtype=strata".into()),
        MountOption::DefaultPermissions,
        MountOption::CUSTOM("max_read=1048576".into()),
    ];
    if cfg.read_only {
        options.push(MountOption::RO);
    }
    let flags = [
        (cfg.dev, MountOption::Dev),
        (cfg.suid, MountOption::Suid),
        (cfg.noexec, MountOption::NoExec),
        (cfg.sync, MountOption::Sync),
        (cfg.dirsync, MountOption::DirSync),
        (cfg.atime == Atime::No, MountOption::NoAtime),
        (cfg.atime == Atime::Relative, MountOption::RelAtime),
        (cfg.atime == Atime::Strict, MountOption::StrictAtime),
    ];
    options.extend(flags.into_iter().filter(|(on, _)| *on).map(|(_, o)| o));
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = if cfg.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(cfg.threads.max(1));
    config.clone_fd = true;
    // Two per CPU: one pinned there for requests one at a time, one free to
    // run elsewhere for those that overlap (readahead, a handler waiting on
    // the disk).
    config.io_uring_workers_per_cpu = 2;
    let adapter = Adapter::new(fs.clone(), cfg.clone());
    let notifier = adapter.notifier.clone();
    let session = Session::new(adapter, mountpoint, &config)?;
    let _ = notifier.set(session.notifier());
    fs.attach(Arc::new(KernelInvalidator(session.notifier())));
    Ok(session)
}

/// Reverse notifications to the kernel. A name or node the kernel does not
/// cache answers ENOENT, which is fine: there was nothing to drop.
struct KernelInvalidator(fuser::Notifier);

impl core::Invalidator for KernelInvalidator {
    fn entry(&self, parent: u64, name: &OsStr) {
        if let Err(e) = self.0.inval_entry(INodeNo(parent), name)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!(parent, ?name, "entry invalidation failed: {e}");
        }
    }

    fn expire(&self, parent: u64, name: &OsStr) {
        match self.0.expire_entry(INodeNo(parent), name) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            // A kernel before 6.2: drop the entry instead.
            Err(_) => self.entry(parent, name),
        }
    }

    fn inode(&self, ino: u64, data: bool) {
        // Offset -1: attributes only; 0 with length 0: attributes and all pages.
        let offset = if data { 0 } else { -1 };
        if let Err(e) = self.0.inval_inode(INodeNo(ino), offset, 0)
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            tracing::debug!(ino, "inode invalidation failed: {e}");
        }
    }
}
