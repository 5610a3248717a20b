//! fd-based access to a host directory, as libfuse's `passthrough_hp` does it.
//!
//! Every operation starts from an O_PATH descriptor of a node and a single name
//! component (`openat`, `fstatat`, `renameat2`, ...). No path string is ever
//! joined onto the source root, and names are never followed as symlinks, so
//! neither `..` nor a symlink can lead out of the source.
//!
//! Descriptors are not kept for every node: a node remembers a kernel file
//! handle (`name_to_handle_at`) and its O_PATH fd lives in a bounded cache,
//! reopened with `open_by_handle_at` after eviction. Where handles are not
//! available (not root, or a filesystem without export support) the node pins
//! its fd instead.

pub mod files;
pub mod ops;
// The core's only unsafe code: the raw syscalls rustix lacks.
#[allow(unsafe_code)]
pub mod sys;
pub mod watch;

use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use rustix::fs::{AtFlags, Mode, OFlags, Stat};

use crate::fs::{Attr, FileKind};
use crate::{Errno, Result};
use sys::FileHandle;

/// Default bound on cached O_PATH descriptors.
pub const DEFAULT_FD_CACHE: usize = 8192;

/// A host object the kernel knows about.
pub struct HostNode {
    pub dev: u64,
    pub ino: u64,
    pub kind: FileKind,
    /// Kernel handle and mount id to reopen the node; `None` means the fd is pinned.
    handle: Option<(FileHandle, i32)>,
    fd: Mutex<Option<Arc<OwnedFd>>>,
}

impl HostNode {
    /// Whether the node's fd can be evicted and reopened.
    pub fn has_handle(&self) -> bool {
        self.handle.is_some()
    }

    /// The host object, as the watch names it.
    pub fn host_id(&self) -> watch::HostId {
        watch::HostId {
            dev: self.dev,
            ino: self.ino,
        }
    }

    /// Whether `other` is the same host object: same device and inode
    /// number and, where both have one, the same handle (a reused number
    /// comes with another generation).
    pub fn same_object(&self, other: &HostNode) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
            && match (&self.handle, &other.handle) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

/// One host directory, accessed through descriptors.
pub struct HostDir {
    root_path: PathBuf,
    root: Arc<HostNode>,
    /// `/proc/self/fd`, to reopen O_PATH descriptors with real open flags.
    proc_fd: OwnedFd,
    /// An fd on each mount we have handles for, as `open_by_handle_at` needs one.
    mounts: RwLock<HashMap<i32, Arc<OwnedFd>>>,
    handles_usable: bool,
    fd_cache: Mutex<VecDeque<Weak<HostNode>>>,
    fd_cache_cap: usize,
}

fn check_name(name: &OsStr) -> Result<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(Errno::EINVAL);
    }
    if bytes.len() > 255 {
        return Err(Errno::ENAMETOOLONG);
    }
    CString::new(bytes).map_err(|_| Errno::EINVAL)
}

/// Validates a directory entry name coming from the kernel: one component, never `.`/`..`.
pub fn component(name: &OsStr) -> Result<CString> {
    check_name(name)
}

/// A name to look up: one that cannot be a component names nothing (ENOENT).
pub fn lookup_component(name: &OsStr) -> Result<CString> {
    check_name(name).map_err(|e| if e == Errno::EINVAL { Errno::ENOENT } else { e })
}

fn system_time(sec: i64, nsec: u64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec)
    }
}

/// Whether the daemon's reads leave host access times alone (`-o noatime`).
static NO_ATIME: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set once at mount from `-o noatime`: host files and directories are then
/// opened with `O_NOATIME`, so reading through the mount does not change
/// their access times (the mount has one process, one mount).
pub fn set_no_atime(on: bool) {
    NO_ATIME.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// `openat` for I/O, with `O_NOATIME` under `-o noatime` where the kernel
/// allows it (the owner or CAP_FOWNER; others open as asked).
fn open_io(dir: BorrowedFd<'_>, name: &CStr, flags: OFlags) -> Result<OwnedFd> {
    if NO_ATIME.load(std::sync::atomic::Ordering::Relaxed) {
        match rustix::fs::openat(dir, name, flags | OFlags::NOATIME, Mode::empty()) {
            Err(rustix::io::Errno::PERM) => {}
            r => return Ok(r?),
        }
    }
    Ok(rustix::fs::openat(dir, name, flags, Mode::empty())?)
}

/// A readable descriptor of the directory `fd` (an O_PATH one) holds, for
/// getdents.
pub fn open_dir(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    open_io(
        fd,
        c".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
    )
}

/// Calls `f` with each entry of the directory `dfd` (from [`open_dir`])
/// but `.` and `..`: its name (one component), type and inode number.
pub fn each_entry(
    dfd: &OwnedFd,
    mut f: impl FnMut(&CStr, FileKind, u64) -> Result<()>,
) -> Result<()> {
    let mut reader = rustix::fs::Dir::read_from(dfd)?;
    for ent in &mut reader {
        let ent = ent?;
        let name = ent.file_name();
        if matches!(name.to_bytes(), b"." | b"..") {
            continue;
        }
        if let Some(kind) = dirent_kind(dfd.as_fd(), &ent) {
            f(name, kind, ent.ino())?;
        }
    }
    Ok(())
}

/// The type of a directory entry; filesystems that leave `d_type` unknown
/// are asked with `fstatat`. `None`: the entry is gone.
pub fn dirent_kind(dir: BorrowedFd<'_>, ent: &rustix::fs::DirEntry) -> Option<FileKind> {
    use rustix::fs::FileType as T;
    Some(match ent.file_type() {
        T::RegularFile => FileKind::Regular,
        T::Directory => FileKind::Directory,
        T::Symlink => FileKind::Symlink,
        T::Fifo => FileKind::Fifo,
        T::Socket => FileKind::Socket,
        T::CharacterDevice => FileKind::CharDevice,
        T::BlockDevice => FileKind::BlockDevice,
        _ => {
            let st = rustix::fs::statat(dir, ent.file_name(), AtFlags::SYMLINK_NOFOLLOW).ok()?;
            FileKind::from_mode(st.st_mode).unwrap_or(FileKind::Regular)
        }
    })
}

/// A host `statvfs` as the kernel wants it.
pub fn statfs_from(s: &rustix::fs::StatVfs) -> crate::fs::StatFs {
    crate::fs::StatFs {
        blocks: s.f_blocks,
        bfree: s.f_bfree,
        bavail: s.f_bavail,
        files: s.f_files,
        ffree: s.f_ffree,
        bsize: s.f_bsize as u32,
        namelen: s.f_namemax as u32,
        frsize: s.f_frsize as u32,
    }
}

/// Converts a host `stat` into attributes with node id `ino`.
pub fn attr_from_stat(st: &Stat, ino: u64) -> Attr {
    Attr {
        ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        kind: FileKind::from_mode(st.st_mode).unwrap_or(FileKind::Regular),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
    }
}

const EMPTY: &CStr = c"";

/// A descriptor `open_by_handle_at` accepts as mount fd: it ignores O_PATH
/// descriptors, so open the directory for reading.
fn open_mount_fd(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd> {
    let name = if name.is_empty() { c"." } else { name };
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

impl HostDir {
    /// Opens `path` as a source. Fails with a message naming the path.
    pub fn open(path: &Path, fd_cache_cap: usize) -> std::result::Result<HostDir, String> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            rustix::io::Errno::NOTDIR => format!("{}: not a directory", path.display()),
            rustix::io::Errno::NOENT => format!("{}: no such directory", path.display()),
            e => format!("{}: {}", path.display(), std::io::Error::from(e)),
        })?;
        let st = rustix::fs::fstat(&fd).map_err(|e| format!("{}: stat: {e}", path.display()))?;
        let proc_fd = rustix::fs::open(
            "/proc/self/fd",
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("/proc/self/fd: {e} (is /proc mounted?)"))?;
        let fd = Arc::new(fd);
        // Handles are usable if we can make one for the root and open it again
        // (open_by_handle_at needs CAP_DAC_READ_SEARCH, and a mount fd that is not O_PATH).
        let mut mounts = HashMap::new();
        let handle = match sys::name_to_handle_at(fd.as_fd(), EMPTY, libc::AT_EMPTY_PATH)
            .and_then(|(h, mnt)| Ok((h, mnt, open_mount_fd(fd.as_fd(), EMPTY)?)))
        {
            Ok((h, mnt, mount_fd)) => {
                match sys::open_by_handle_at(mount_fd.as_fd(), &h, libc::O_PATH) {
                    Ok(_) => {
                        mounts.insert(mnt, Arc::new(mount_fd));
                        Some((h, mnt))
                    }
                    Err(e) => {
                        tracing::info!(source = %path.display(), "file handles not usable ({e}); pinning one fd per known inode");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::info!(source = %path.display(), "no file handle support ({e}); pinning one fd per known inode");
                None
            }
        };
        let handles_usable = handle.is_some();
        let root = Arc::new(HostNode {
            dev: st.st_dev,
            ino: st.st_ino,
            kind: FileKind::Directory,
            handle: None, // the root's fd is pinned for the life of the mount
            fd: Mutex::new(Some(fd)),
        });
        Ok(HostDir {
            root_path: path.to_path_buf(),
            root,
            proc_fd,
            mounts: RwLock::new(mounts),
            handles_usable,
            fd_cache: Mutex::new(VecDeque::new()),
            fd_cache_cap: fd_cache_cap.max(16),
        })
    }

    pub fn path(&self) -> &Path {
        &self.root_path
    }

    pub fn root(&self) -> &Arc<HostNode> {
        &self.root
    }

    pub fn handles_usable(&self) -> bool {
        self.handles_usable
    }

    /// O_PATH fds the bounded cache holds open now. The queue also keeps
    /// entries of nodes the kernel has forgotten (their fds closed with the
    /// node) until they reach its front: those are not counted.
    pub fn cached_fds(&self) -> usize {
        self.fd_cache
            .lock()
            .iter()
            .filter(|w| w.upgrade().is_some_and(|n| n.fd.lock().is_some()))
            .count()
    }

    /// The O_PATH fd of a node, reopened from its handle if it was evicted.
    pub fn fd(&self, node: &Arc<HostNode>) -> Result<Arc<OwnedFd>> {
        if let Some(fd) = node.fd.lock().as_ref() {
            return Ok(fd.clone());
        }
        let (handle, mnt) = node.handle.as_ref().ok_or(Errno::ESTALE)?;
        let mount_fd = self.mounts.read().get(mnt).cloned().ok_or(Errno::ESTALE)?;
        let fd = Arc::new(
            sys::open_by_handle_at(mount_fd.as_fd(), handle, libc::O_PATH).map_err(|e| {
                tracing::debug!(
                    dev = node.dev,
                    ino = node.ino,
                    "reopen by handle failed: {e}"
                );
                // The object was removed (by a racing caller, typically):
                // gone, as the host says of a removed name.
                if e == Errno::ESTALE { Errno::ENOENT } else { e }
            })?,
        );
        {
            let mut slot = node.fd.lock();
            if let Some(existing) = slot.as_ref() {
                return Ok(existing.clone());
            }
            *slot = Some(fd.clone());
        }
        self.remember(node);
        Ok(fd)
    }

    /// Whether `node` still is the object `name` in `parent` (whose device
    /// and inode number it has): a node holding its fd pins its inode, so the
    /// number cannot have gone to a new file; one whose fd was evicted is
    /// compared by file handle, which carries the inode's generation.
    pub fn still_names(&self, node: &HostNode, parent: BorrowedFd<'_>, name: &CStr) -> bool {
        if node.fd.lock().is_some() {
            return true;
        }
        match &node.handle {
            Some((handle, mnt)) => {
                matches!(sys::name_to_handle_at(parent, name, 0), Ok((h, m)) if h == *handle && m == *mnt)
            }
            None => true,
        }
    }

    /// Records a freshly cached fd and evicts the oldest ones beyond the bound.
    fn remember(&self, node: &Arc<HostNode>) {
        let mut evict = Vec::new();
        {
            let mut q = self.fd_cache.lock();
            q.push_back(Arc::downgrade(node));
            while q.len() > self.fd_cache_cap {
                if let Some(old) = q.pop_front().and_then(|w| w.upgrade()) {
                    evict.push(old);
                }
            }
        }
        // Close outside the queue lock; the node reopens its fd on next use.
        for old in evict {
            old.fd.lock().take();
        }
    }

    /// `fstatat(parent, name, AT_SYMLINK_NOFOLLOW)`.
    pub fn stat_child(&self, parent: BorrowedFd<'_>, name: &CStr) -> Result<Stat> {
        Ok(rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW)?)
    }

    /// `fstat` of an O_PATH fd.
    pub fn stat_fd(&self, fd: BorrowedFd<'_>) -> Result<Stat> {
        Ok(rustix::fs::statat(
            fd,
            EMPTY,
            AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
        )?)
    }

    /// The directory `rel` below the root: plain components, each opened
    /// without following links.
    pub fn dir_below(&self, rel: &Path) -> Result<Arc<HostNode>> {
        let mut node = self.root().clone();
        for c in rel.components() {
            let std::path::Component::Normal(name) = c else {
                return Err(Errno::EINVAL);
            };
            let name = CString::new(name.as_bytes()).map_err(|_| Errno::EINVAL)?;
            let fd = self.fd(&node)?;
            let st = self.stat_child(fd.as_fd(), &name)?;
            if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
                return Err(Errno::ENOTDIR);
            }
            node = Arc::new(self.make_node(fd.as_fd(), &name, &st)?);
        }
        Ok(node)
    }

    /// Builds a node for `name` in `parent` whose stat is `st`.
    pub fn make_node(&self, parent: BorrowedFd<'_>, name: &CStr, st: &Stat) -> Result<HostNode> {
        let kind = FileKind::from_mode(st.st_mode).ok_or(Errno::EIO)?;
        if self.handles_usable {
            match sys::name_to_handle_at(parent, name, 0) {
                Ok((handle, mnt))
                    if self.mounts.read().contains_key(&mnt) || kind == FileKind::Directory =>
                {
                    if !self.mounts.read().contains_key(&mnt) {
                        // First directory seen on this mount: it serves as the mount fd.
                        let fd = open_mount_fd(parent, name)?;
                        self.mounts
                            .write()
                            .entry(mnt)
                            .or_insert_with(|| Arc::new(fd));
                    }
                    return Ok(HostNode {
                        dev: st.st_dev,
                        ino: st.st_ino,
                        kind,
                        handle: Some((handle, mnt)),
                        fd: Mutex::new(None),
                    });
                }
                // A non-directory first seen on an unknown mount pins its fd.
                Ok(_) => {}
                Err(e) if e == Errno::ENOTSUP || e == Errno(libc::EOVERFLOW) => {}
                Err(e) => return Err(e),
            }
        }
        let fd = self.open_path(parent, name)?;
        let fst = self.stat_fd(fd.as_fd())?;
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) {
            // Replaced between stat and open: let the kernel retry.
            return Err(Errno::ESTALE);
        }
        Ok(HostNode {
            dev: st.st_dev,
            ino: st.st_ino,
            kind,
            handle: None,
            fd: Mutex::new(Some(Arc::new(fd))),
        })
    }

    /// A node for an object reached other than by its name in a directory
    /// (a followed symlink's target): its fd stays open for the node's life.
    pub fn node_from_fd(&self, fd: OwnedFd, st: &Stat) -> Result<HostNode> {
        Ok(HostNode {
            dev: st.st_dev,
            ino: st.st_ino,
            kind: FileKind::from_mode(st.st_mode).ok_or(Errno::EIO)?,
            handle: None,
            fd: Mutex::new(Some(Arc::new(fd))),
        })
    }

    fn open_path(&self, parent: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd> {
        Ok(rustix::fs::openat(
            parent,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?)
    }

    /// Opens the object behind an O_PATH fd for I/O, through `/proc/self/fd`.
    pub fn reopen(&self, fd: BorrowedFd<'_>, flags: OFlags) -> Result<OwnedFd> {
        let name = CString::new(fd.as_raw_fd().to_string()).expect("digits");
        open_io(self.proc_fd.as_fd(), &name, flags | OFlags::CLOEXEC)
    }

    /// `/proc/self/fd/N` for an O_PATH fd: the only way to reach xattrs and
    /// chmod of an O_PATH fd (passthrough_hp does the same).
    pub fn proc_path(&self, fd: BorrowedFd<'_>) -> CString {
        CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
    }

    /// Where a node is on the host now, for people (the kernel's name for
    /// its descriptor; `None` if it has none any more).
    pub fn path_of(&self, node: &Arc<HostNode>) -> Option<PathBuf> {
        let fd = self.fd(node).ok()?;
        let name = fd.as_raw_fd().to_string();
        let target = rustix::fs::readlinkat(&self.proc_fd, name.as_str(), Vec::new()).ok()?;
        Some(PathBuf::from(
            <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(target.into_bytes()),
        ))
    }

    /// `fchmodat` on an O_PATH fd via its `/proc/self/fd` entry.
    pub fn chmod_fd(&self, fd: BorrowedFd<'_>, mode: u32) -> Result<()> {
        let name = fd.as_raw_fd().to_string();
        rustix::fs::chmodat(
            &self.proc_fd,
            name.as_str(),
            Mode::from_raw_mode(mode & 0o7777),
            AtFlags::empty(),
        )?;
        Ok(())
    }
}
