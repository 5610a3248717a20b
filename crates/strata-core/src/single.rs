//! The single-directory rule: one host directory is the whole namespace.
//!
//! The base composition: one [`HostDir`], node ids derived from host inode
//! numbers, every operation forwarded through descriptors. Permission
//! checks are the kernel's (`default_permissions`); ownership of new objects is
//! the caller's.

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::{AtFlags, RenameFlags, Stat};

use crate::fs::*;
use crate::host::files::{OpenFiles, sync_fd};
use crate::host::watch::{self, CachePolicy, HostWatch};
use crate::host::{HostDir, HostNode, attr_from_stat, dirent_kind, ops};
use crate::inode::InodeTable;
use crate::listing::DirEnt;
use crate::stack::{New, Rule};
use crate::{Errno, Result};

/// Kernel cache settings and behaviour switches.
#[derive(Clone, Debug)]
pub struct SingleDirConfig {
    /// Kernel cache timeouts.
    pub cache: CachePolicy,
    /// Watch the host for outside changes (fanotify) and invalidate the
    /// kernel's caches, so timeouts can be long.
    pub watch: bool,
    /// Bound on cached O_PATH descriptors.
    pub fd_cache: usize,
    /// Offer backing files for kernel passthrough of regular-file I/O.
    pub passthrough: bool,
}

impl Default for SingleDirConfig {
    fn default() -> Self {
        SingleDirConfig {
            cache: CachePolicy::default(),
            watch: true,
            fd_cache: crate::host::DEFAULT_FD_CACHE,
            passthrough: true,
        }
    }
}

pub use crate::host::watch::{UNWATCHED_TTL, WATCHED_TTL};

type Key = (u64, u64);

/// An open directory: its descriptor, read for listings.
pub struct DirFd {
    fd: OwnedFd,
    dev: u64,
    is_root: bool,
}

pub struct SingleDir {
    host: HostDir,
    table: Arc<InodeTable<Key, HostNode>>,
    files: OpenFiles,
    cfg: SingleDirConfig,
    root_key: Key,
    watch: Option<Arc<HostWatch>>,
}

/// Node id for a host object: its inode number on the source's device (with
/// the root's number swapped for 1), a hash elsewhere. Stable while mounted.
fn node_id((root_dev, root_ino): Key, dev: u64, ino: u64) -> u64 {
    if dev == root_dev {
        if ino == root_ino {
            ROOT_ID
        } else if ino == ROOT_ID {
            root_ino
        } else {
            ino
        }
    } else {
        // Other filesystems mounted below the source: mix the device in and
        // keep the top bit set so the ids cannot meet the source's own.
        let mut h = dev.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ino;
        h ^= h >> 29;
        (h | (1 << 63)) & !(0x4000_0000_0000_0000)
    }
}

impl SingleDir {
    pub fn new(source: &Path, cfg: SingleDirConfig) -> std::result::Result<Self, String> {
        let host = HostDir::open(source, cfg.fd_cache)?;
        let root = host.root().clone();
        let root_key = (root.dev, root.ino);
        let table = Arc::new(InodeTable::with_derived_ids(
            root_key,
            root.clone(),
            Box::new(move |&(dev, ino)| node_id(root_key, dev, ino)),
        ));
        let watch = if cfg.watch && host.handles_usable() {
            match HostWatch::new() {
                Ok(w) => {
                    let fd = host
                        .fd(&root)
                        .map_err(|e| format!("{}: {e}", source.display()))?;
                    w.watch(root.dev, fd.as_fd());
                    Some(Arc::new(w))
                }
                Err(e) => {
                    tracing::info!(
                        "host changes are not watched ({e}); kernel caches time out after {}s",
                        UNWATCHED_TTL.as_secs()
                    );
                    None
                }
            }
        } else {
            None
        };
        Ok(SingleDir {
            watch,
            host,
            table,
            files: OpenFiles::default(),
            cfg,
            root_key,
        })
    }

    fn node_id(&self, dev: u64, ino: u64) -> u64 {
        node_id(self.root_key, dev, ino)
    }

    fn node(&self, ino: u64) -> Result<Arc<HostNode>> {
        self.table.get(ino).ok_or(Errno::ESTALE)
    }

    fn node_fd(&self, ino: u64) -> Result<Arc<OwnedFd>> {
        let node = self.node(ino)?;
        self.host.fd(&node)
    }

    fn watched(&self, dev: u64) -> bool {
        self.watch.as_ref().is_some_and(|w| w.is_watched(dev))
    }

    fn attr_ttl(&self, dev: u64) -> Duration {
        self.cfg.cache.attr(self.watched(dev))
    }

    fn entry(&self, st: &Stat, id: u64) -> Entry {
        Entry {
            attr: attr_from_stat(st, id),
            generation: 0,
            entry_ttl: self.cfg.cache.entry(self.watched(st.st_dev)),
            attr_ttl: self.attr_ttl(st.st_dev),
        }
    }

    /// Watches the filesystem of a directory first seen on a new device (a
    /// mount below the source).
    fn watch_new_dev(&self, node: &Arc<HostNode>) {
        if let Some(w) = &self.watch
            && node.kind == FileKind::Directory
            && !w.knows(node.dev)
            && let Ok(fd) = self.host.fd(node)
        {
            w.watch(node.dev, fd.as_fd());
        }
    }

    /// Resolves `name` in the directory `parent_fd` and takes a lookup reference.
    fn lookup_at(&self, parent_fd: BorrowedFd<'_>, name: &CStr) -> Result<Entry> {
        let st = self.host.stat_child(parent_fd, name)?;
        self.register(parent_fd, name, &st)
    }

    /// Takes a lookup reference on the object `name` in `parent_fd` whose stat is `st`.
    fn register(&self, parent_fd: BorrowedFd<'_>, name: &CStr, st: &Stat) -> Result<Entry> {
        let key = (st.st_dev, st.st_ino);
        let kind = FileKind::from_mode(st.st_mode).ok_or(Errno::EIO)?;
        let id = self.node_id(key.0, key.1);
        // A known node of the same kind is reused (no syscall while it holds
        // its fd), unless its inode number now belongs to a new file;
        // anything else gets a node built from the host object.
        let mut fresh = match self.table.get_by_key(&key) {
            Some((_, node))
                if node.kind == kind && self.host.still_names(&node, parent_fd, name) =>
            {
                None
            }
            _ => Some(self.host.make_node(parent_fd, name, st)?),
        };
        loop {
            if let Some((id, node)) = self.table.lookup(key, id, fresh.take(), |old, new| {
                old.kind != new.kind || !old.same_object(new)
            }) {
                if key.0 != self.root_key.0 {
                    self.watch_new_dev(&node);
                }
                return Ok(self.entry(st, id));
            }
            // Forgotten between our check and the insert: build it after all.
            fresh = Some(self.host.make_node(parent_fd, name, st)?);
        }
    }

    fn stat_attr(&self, ino: u64, fd: BorrowedFd<'_>) -> Result<AttrOut> {
        let st = self.host.stat_fd(fd)?;
        Ok(AttrOut {
            attr: attr_from_stat(&st, ino),
            ttl: self.attr_ttl(st.st_dev),
        })
    }

    pub fn source(&self) -> &Path {
        self.host.path()
    }
}

impl Rule for SingleDir {
    type Dir = DirFd;

    fn describe(&self) -> String {
        self.host.path().display().to_string()
    }

    fn lookup(&self, _ctx: &Ctx, parent: u64, name: &CStr) -> Result<Entry> {
        let pfd = self.node_fd(parent)?;
        self.lookup_at(pfd.as_fd(), name)
    }

    fn negative_ttl(&self, _ctx: &Ctx, parent: u64) -> Duration {
        let dev = self.table.get(parent).map_or(self.root_key.0, |n| n.dev);
        self.cfg.cache.negative(self.watched(dev), UNWATCHED_TTL)
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        self.table.forget(ino, nlookup);
    }

    fn inodes(&self) -> usize {
        self.table.len()
    }

    fn getattr(&self, _ctx: &Ctx, ino: u64, fh: Option<u64>) -> Result<AttrOut> {
        if let Some(file) = fh.and_then(|fh| self.files.get(fh).ok()) {
            return self.stat_attr(ino, file.as_fd());
        }
        let fd = self.node_fd(ino)?;
        self.stat_attr(ino, fd.as_fd())
    }

    fn setattr(&self, _ctx: &Ctx, ino: u64, fh: Option<u64>, set: &SetAttr) -> Result<AttrOut> {
        let fd = self.node_fd(ino)?;
        let file = fh.and_then(|fh| self.files.get(fh).ok());
        ops::set_attr(
            &self.host,
            fd.as_fd(),
            file.as_deref().map(|f| f.as_fd()),
            set,
        )?;
        self.stat_attr(ino, fd.as_fd())
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        ops::readlink(self.node_fd(ino)?.as_fd())
    }

    fn make(&self, ctx: &Ctx, parent: u64, name: &CStr, new: New<'_>) -> Result<Entry> {
        let pfd = self.node_fd(parent)?;
        new.make_at(&self.host, pfd.as_fd(), name)?;
        ops::finish_new(&self.host, ctx, pfd.as_fd(), name)?;
        self.lookup_at(pfd.as_fd(), name)
    }

    fn remove(&self, _ctx: &Ctx, parent: u64, name: &CStr, dir: bool) -> Result<()> {
        let pfd = self.node_fd(parent)?;
        let how = if dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rustix::fs::unlinkat(&*pfd, name, how)?;
        Ok(())
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
        let pfd = self.node_fd(parent)?;
        let npfd = self.node_fd(new_parent)?;
        rustix::fs::renameat_with(
            &*pfd,
            name,
            &*npfd,
            new_name,
            RenameFlags::from_bits_retain(flags),
        )?;
        Ok(())
    }

    fn link(&self, _ctx: &Ctx, ino: u64, new_parent: u64, new_name: &CStr) -> Result<Entry> {
        let fd = self.node_fd(ino)?;
        let npfd = self.node_fd(new_parent)?;
        ops::link_fd(&self.host, fd.as_fd(), npfd.as_fd(), new_name)?;
        self.lookup_at(npfd.as_fd(), new_name)
    }

    fn files(&self) -> &OpenFiles {
        &self.files
    }

    fn open(&self, ino: u64, flags: i32) -> Result<Opened> {
        let fd = self.node_fd(ino)?;
        let file = self.host.reopen(fd.as_fd(), ops::open_flags(flags))?;
        Ok(self.files.insert(file, self.cfg.passthrough))
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
        let pfd = self.node_fd(parent)?;
        let (entry, fd) = ops::create_file(
            &self.host,
            ctx,
            pfd.as_fd(),
            name,
            mode,
            umask,
            flags,
            || self.lookup_at(pfd.as_fd(), name),
        )?;
        Ok((entry, self.files.insert(fd, self.cfg.passthrough)))
    }

    fn opendir(&self, _ctx: &Ctx, ino: u64) -> Result<(DirFd, bool)> {
        let fd = crate::host::open_dir(self.node_fd(ino)?.as_fd())?;
        let dev = rustix::fs::fstat(&fd)?.st_dev;
        Ok((
            DirFd {
                fd,
                dev,
                is_root: ino == ROOT_ID,
            },
            true,
        ))
    }

    fn list(&self, _ino: u64, dir: &DirFd) -> Result<Vec<DirEnt>> {
        let mut out = Vec::new();
        let mut reader = rustix::fs::Dir::read_from(&dir.fd)?;
        for ent in &mut reader {
            let ent = ent?;
            let name = ent.file_name();
            let bytes = name.to_bytes();
            // `..` of the root points outside the source: show the root instead.
            let ino = if dir.is_root && (bytes == b"." || bytes == b"..") {
                ROOT_ID
            } else {
                self.node_id(dir.dev, ent.ino())
            };
            let Some(kind) = dirent_kind(dir.fd.as_fd(), &ent) else {
                continue;
            };
            out.push(DirEnt {
                name: name.to_owned(),
                ino,
                kind,
            });
        }
        Ok(out)
    }

    fn dir_attr(&self, ino: u64, dir: &DirFd) -> Result<Attr> {
        Ok(self.stat_attr(ino, dir.fd.as_fd())?.attr)
    }

    fn list_lookup(&self, _ctx: &Ctx, _ino: u64, dir: &DirFd, name: &CStr) -> Result<Entry> {
        self.lookup_at(dir.fd.as_fd(), name)
    }

    fn fsyncdir(&self, _ino: u64, dir: &DirFd, datasync: bool) -> Result<()> {
        sync_fd(dir.fd.as_fd(), datasync)
    }

    fn statfs(&self, _ctx: &Ctx, ino: u64) -> Result<StatFs> {
        let fd = self.node_fd(ino)?;
        let s = rustix::fs::fstatvfs(&*fd)?;
        Ok(crate::host::statfs_from(&s))
    }

    fn setxattr(&self, _ctx: &Ctx, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        ops::setxattr(&self.host, self.node_fd(ino)?.as_fd(), name, value, flags)
    }

    fn getxattr(&self, _ctx: &Ctx, ino: u64, name: &OsStr, size: u32) -> Result<Xattr> {
        ops::getxattr(&self.host, self.node_fd(ino)?.as_fd(), name, size)
    }

    fn listxattr(&self, _ctx: &Ctx, ino: u64, size: u32) -> Result<Xattr> {
        ops::listxattr(&self.host, self.node_fd(ino)?.as_fd(), size)
    }

    fn removexattr(&self, _ctx: &Ctx, ino: u64, name: &OsStr) -> Result<()> {
        ops::removexattr(&self.host, self.node_fd(ino)?.as_fd(), name)
    }

    fn access(&self, ctx: &Ctx, ino: u64, mask: i32) -> Result<()> {
        ops::access(&self.host, ctx, self.node_fd(ino)?.as_fd(), mask)
    }

    fn cached_fds(&self) -> usize {
        self.host.cached_fds()
    }

    fn attach(&self, invalidator: Arc<dyn Invalidator>) {
        let Some(watch) = self.watch.clone() else {
            return;
        };
        let (table, all) = (self.table.clone(), self.table.clone());
        watch::spawn_forwarder(
            watch,
            move |id| table.get_by_key(&(id.dev, id.ino)).map(|(id, _)| id),
            move || all.ids(),
            invalidator,
            "host",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::Stack;
    use std::ffi::OsString;

    const ROOT: Ctx = Ctx {
        uid: 0,
        gid: 0,
        pid: 0,
    };

    fn fs_with(cfg: SingleDirConfig) -> (tempfile::TempDir, Stack<SingleDir>) {
        let dir = tempfile::tempdir().unwrap();
        let fs = Stack::new(SingleDir::new(dir.path(), cfg).unwrap());
        (dir, fs)
    }

    fn fs() -> (tempfile::TempDir, Stack<SingleDir>) {
        fs_with(SingleDirConfig::default())
    }

    struct Collect(Vec<(OsString, u64)>, usize);
    impl DirPlusSink for Collect {
        fn add(&mut self, _next: u64, name: &OsStr, e: &Entry) -> bool {
            if self.0.len() == self.1 {
                return false;
            }
            self.0.push((name.to_owned(), e.attr.ino));
            true
        }
    }

    #[test]
    fn create_write_read_and_lookup_counts() {
        let (dir, fs) = fs();
        let (e, o) = fs
            .create(
                &ROOT,
                ROOT_ID,
                OsStr::new("f"),
                0o100644,
                0o022,
                libc::O_RDWR,
            )
            .unwrap();
        assert_eq!(fs.write(&ROOT, e.attr.ino, o.fh, 0, b"hello").unwrap(), 5);
        assert_eq!(fs.read(&ROOT, e.attr.ino, o.fh, 1, 10).unwrap(), b"ello");
        fs.release(&ROOT, e.attr.ino, o.fh).unwrap();
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"hello");
        assert_eq!(e.attr.perm, 0o644);
        // create took one reference, lookup another; two forgets drop the node
        let again = fs
            .lookup(&ROOT, ROOT_ID, OsStr::new("f"))
            .and_then(Lookup::entry)
            .unwrap();
        assert_eq!(again.attr.ino, e.attr.ino);
        assert_eq!(fs.stats().inodes, 2);
        fs.forget(e.attr.ino, 1);
        assert_eq!(fs.stats().inodes, 2);
        fs.forget(e.attr.ino, 1);
        assert_eq!(fs.stats().inodes, 1);
        assert_eq!(fs.stats().open_files, 0);
    }

    #[test]
    fn node_ids_are_host_inode_numbers_and_survive_forget() {
        let (dir, fs) = fs();
        std::fs::write(dir.path().join("a"), b"").unwrap();
        let host =
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(dir.path().join("a")).unwrap());
        let e = fs
            .lookup(&ROOT, ROOT_ID, OsStr::new("a"))
            .and_then(Lookup::entry)
            .unwrap();
        assert_eq!(e.attr.ino, host);
        fs.forget(e.attr.ino, 1);
        assert_eq!(
            fs.lookup(&ROOT, ROOT_ID, OsStr::new("a"))
                .and_then(Lookup::entry)
                .unwrap()
                .attr
                .ino,
            host
        );
    }

    #[test]
    fn names_that_are_not_one_component_are_refused() {
        let (_dir, fs) = fs();
        for bad in ["..", ".", "a/b", "/etc", ""] {
            assert_eq!(
                fs.lookup(&ROOT, ROOT_ID, OsStr::new(bad))
                    .and_then(Lookup::entry)
                    .unwrap_err(),
                Errno::ENOENT,
                "{bad:?}"
            );
            assert!(
                fs.mkdir(&ROOT, ROOT_ID, OsStr::new(bad), 0o755, 0).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(fs.stats().inodes, 1);
    }

    #[test]
    fn a_symlink_is_never_followed_as_a_directory() {
        let (dir, fs) = fs();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("esc")).unwrap();
        let e = fs
            .lookup(&ROOT, ROOT_ID, OsStr::new("esc"))
            .and_then(Lookup::entry)
            .unwrap();
        assert_eq!(e.attr.kind, FileKind::Symlink);
        // using the link as a parent must not reach the directory it points to
        assert!(
            fs.mkdir(&ROOT, e.attr.ino, OsStr::new("x"), 0o755, 0)
                .is_err()
        );
        assert!(
            fs.create(
                &ROOT,
                e.attr.ino,
                OsStr::new("y"),
                0o100644,
                0,
                libc::O_RDWR
            )
            .is_err()
        );
        assert!(
            fs.lookup(&ROOT, e.attr.ino, OsStr::new("anything"))
                .and_then(Lookup::entry)
                .is_err()
        );
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert_eq!(
            fs.readlink(&ROOT, e.attr.ino).unwrap(),
            outside.path().as_os_str().as_encoded_bytes()
        );
    }

    #[test]
    fn readdirplus_gives_back_references_it_could_not_send() {
        let (dir, fs) = fs();
        for i in 0..10 {
            std::fs::write(dir.path().join(format!("f{i}")), b"").unwrap();
        }
        let o = fs.opendir(&ROOT, ROOT_ID, 0).unwrap();
        // room for `.`, `..` and three files
        let mut sink = Collect(Vec::new(), 5);
        fs.readdirplus(&ROOT, ROOT_ID, o.fh, 0, &mut sink).unwrap();
        assert_eq!(sink.0.len(), 5);
        let files = sink.0.iter().filter(|(n, _)| n != "." && n != "..").count();
        assert_eq!(fs.stats().inodes, 1 + files as u64);
        // continuing from the last offset lists the rest, once each
        let mut rest = Collect(Vec::new(), 100);
        fs.readdirplus(&ROOT, ROOT_ID, o.fh, 5, &mut rest).unwrap();
        let mut all: Vec<_> = sink
            .0
            .iter()
            .chain(rest.0.iter())
            .map(|(n, _)| n.clone())
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 12);
        fs.releasedir(&ROOT, ROOT_ID, o.fh).unwrap();
    }

    #[test]
    fn evicted_descriptors_are_reopened_from_handles() {
        let (dir, fs) = fs_with(SingleDirConfig {
            fd_cache: 16,
            ..SingleDirConfig::default()
        });
        let mut ids = Vec::new();
        for i in 0..100 {
            std::fs::write(dir.path().join(format!("f{i}")), format!("{i}")).unwrap();
            ids.push(
                fs.lookup(&ROOT, ROOT_ID, OsStr::new(&format!("f{i}")))
                    .and_then(Lookup::entry)
                    .unwrap()
                    .attr
                    .ino,
            );
        }
        for (i, &ino) in ids.iter().enumerate() {
            assert_eq!(
                fs.getattr(&ROOT, ino, None).unwrap().attr.size,
                format!("{i}").len() as u64
            );
        }
        if fs.rule().host.handles_usable() {
            assert!(fs.stats().cached_fds <= 16, "{:?}", fs.stats());
        }
        // still usable after eviction
        let o = fs.open(&ROOT, ids[0], libc::O_RDONLY).unwrap();
        assert_eq!(fs.read(&ROOT, ids[0], o.fh, 0, 10).unwrap(), b"0");
    }

    #[test]
    fn forgotten_nodes_leave_no_cached_descriptors_counted() {
        let (dir, fs) = fs_with(SingleDirConfig {
            fd_cache: 64,
            ..SingleDirConfig::default()
        });
        if !fs.rule().host.handles_usable() {
            return; // every fd is pinned, none cached
        }
        let mut ids = Vec::new();
        for i in 0..32 {
            std::fs::write(dir.path().join(format!("f{i}")), b"").unwrap();
            let ino = fs
                .lookup(&ROOT, ROOT_ID, OsStr::new(&format!("f{i}")))
                .and_then(Lookup::entry)
                .unwrap()
                .attr
                .ino;
            fs.getattr(&ROOT, ino, None).unwrap();
            ids.push(ino);
        }
        assert_eq!(fs.stats().cached_fds, 32, "{:?}", fs.stats());
        for &ino in &ids[..24] {
            fs.forget(ino, 1);
        }
        assert_eq!(fs.stats().cached_fds, 8, "{:?}", fs.stats());
    }

    #[test]
    fn setattr_changes_what_it_is_asked_to() {
        let (dir, fs) = fs();
        std::fs::write(dir.path().join("f"), b"0123456789").unwrap();
        let e = fs
            .lookup(&ROOT, ROOT_ID, OsStr::new("f"))
            .and_then(Lookup::entry)
            .unwrap();
        let set = SetAttr {
            mode: Some(0o600),
            size: Some(3),
            mtime: Some(SetTime::At(std::time::UNIX_EPOCH + Duration::from_secs(42))),
            ..SetAttr::default()
        };
        let a = fs.setattr(&ROOT, e.attr.ino, None, &set).unwrap().attr;
        assert_eq!((a.perm, a.size), (0o600, 3));
        assert_eq!(a.mtime, std::time::UNIX_EPOCH + Duration::from_secs(42));
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"012");
    }

    #[test]
    fn missing_source_is_a_clear_error() {
        let err = SingleDir::new(Path::new("/nonexistent/strata"), SingleDirConfig::default())
            .err()
            .unwrap();
        assert!(
            err.contains("/nonexistent/strata") && err.contains("no such directory"),
            "{err}"
        );
    }
}
