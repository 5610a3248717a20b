//! Building an image from a host directory.

use crate::manifest::{ManifestBuilder, NO_XATTRS, RawEntry};
use crate::store::{Batch, TmpGuard};
use crate::{Error, IoContext, Result, Store, check_name};
use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Options for [`build`].
#[derive(Clone, Copy, Debug, Default)]
pub struct BuildOptions {
    /// Replace an existing image of the same name (the old manifest goes
    /// through [`crate::remove_image`], so mounts of it stay valid).
    pub replace: bool,
}

/// Counters passed to the progress callback after each stored file.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    /// Entries found so far by the walk (the walk finishes before content is stored).
    pub entries: u64,
    /// Regular-file inodes whose content is stored, of `files_total`.
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// What a build did.
#[derive(Clone, Copy, Debug, Default)]
pub struct BuildStats {
    /// Regular-file entries (hard links counted per name).
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Devices, FIFOs and sockets.
    pub others: u64,
    /// Entries that are additional names of an inode already in the image.
    pub hardlinks: u64,
    /// Uncompressed bytes of distinct regular-file inodes.
    pub bytes: u64,
    /// Bytes newly written to `blobs/` (compressed, headers included).
    pub stored_bytes: u64,
    /// Files whose blob already existed in the store.
    pub dedup_hits: u64,
    pub elapsed: Duration,
}

fn list_xattrs(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 1024];
    let n = loop {
        match rustix::fs::llistxattr(path, &mut names[..]) {
            Ok(n) => break n,
            Err(rustix::io::Errno::RANGE) => {
                let need = rustix::fs::llistxattr_query(path).ctx("listxattr", path)?;
                names.resize(need.max(names.len() * 2), 0);
            }
            Err(rustix::io::Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("listxattr", path, e)),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cname = std::ffi::OsStr::from_bytes(name);
        let mut val = vec![0u8; 256];
        let len = loop {
            match rustix::fs::lgetxattr(path, cname, &mut val[..]) {
                Ok(len) => break Some(len),
                Err(rustix::io::Errno::RANGE) => {
                    let need = rustix::fs::lgetxattr_query(path, cname).ctx("getxattr", path)?;
                    val.resize(need.max(val.len() * 2), 0);
                }
                Err(rustix::io::Errno::NODATA) => break None, // removed meanwhile
                Err(e) => return Err(Error::io("getxattr", path, e)),
            }
        };
        if let Some(len) = len {
            val.truncate(len);
            out.push((name.to_vec(), val));
        }
    }
    out.sort();
    Ok(out)
}

fn mtime(md: &fs::Metadata) -> (i64, u32) {
    (md.mtime(), md.mtime_nsec().clamp(0, 999_999_999) as u32)
}

fn raw_from(md: &fs::Metadata, parent: u32) -> RawEntry {
    let (s, ns) = mtime(md);
    RawEntry {
        parent,
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        mtime_sec: s,
        mtime_nsec: ns,
        nlink: 1,
        xattrs: NO_XATTRS,
        ..Default::default()
    }
}

/// Builds image `name` from `src` (a directory; a symlink to one is followed
/// for the root only). Nothing below the root is followed: symlinks are stored
/// as symlinks. Hard links inside the tree share an inode index and a blob.
/// Blobs are stored (deduplicated) first, then the manifest is written
/// atomically as `images/<name>`.
pub fn build(
    store: &Store,
    src: &Path,
    name: &str,
    opts: BuildOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<BuildStats> {
    let start = Instant::now();
    check_name(name)?;
    let dest = store.images_dir().join(name);
    if !opts.replace && dest.exists() {
        return Err(Error::ImageExists(name.to_owned()));
    }
    let _gc_lock = store.lock_gc(false)?;
    let mut stats = BuildStats::default();
    let mut prog = Progress::default();
    let mut m = ManifestBuilder::default();

    // Walk breadth-first so each directory's children form one sorted run.
    let root_md = fs::metadata(src).ctx("stat", src)?;
    if !root_md.is_dir() {
        return Err(Error::Source {
            path: src.to_owned(),
            reason: "not a directory".into(),
        });
    }
    let mut root = raw_from(&root_md, 0);
    root.xattrs = m.xattrs(&list_xattrs(src)?)?;
    m.entries.push(root);
    stats.dirs += 1;
    let mut paths: Vec<Option<PathBuf>> = vec![None]; // path per regular-file entry
    let mut queue = VecDeque::from([(0u32, src.to_owned())]);
    let mut inodes: HashMap<(u64, u64), u32> = HashMap::new();
    while let Some((dir_idx, dir_path)) = queue.pop_front() {
        let mut names: Vec<std::ffi::OsString> = Vec::new();
        for de in fs::read_dir(&dir_path).ctx("read directory", &dir_path)? {
            names.push(de.ctx("read directory", &dir_path)?.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let first = u32::try_from(m.entries.len()).map_err(|_| Error::Source {
            path: src.to_owned(),
            reason: "too many entries".into(),
        })?;
        let mut subdirs = 0;
        for n in &names {
            let p = dir_path.join(n);
            let md = fs::symlink_metadata(&p).ctx("stat", &p)?;
            let idx = m.entries.len() as u32;
            let mut e = raw_from(&md, dir_idx);
            (e.name_off, e.name_len) = m.string(n.as_bytes())?;
            e.inode = idx;
            e.xattrs = m.xattrs(&list_xattrs(&p)?)?;
            let ft = md.file_type();
            let mut file_path = None;
            if ft.is_dir() {
                stats.dirs += 1;
                subdirs += 1;
                queue.push_back((idx, p));
            } else {
                if md.nlink() > 1 {
                    let key = (md.dev(), md.ino());
                    if let Some(&first_link) = inodes.get(&key) {
                        e.inode = first_link;
                        stats.hardlinks += 1;
                    } else {
                        inodes.insert(key, idx);
                    }
                }
                if ft.is_symlink() {
                    let t = fs::read_link(&p).ctx("readlink", &p)?;
                    (e.a, e.b) = m.string(t.as_os_str().as_bytes())?;
                    e.size = t.as_os_str().len() as u64;
                    stats.symlinks += 1;
                } else if ft.is_file() {
                    stats.files += 1;
                    if e.inode == idx {
                        file_path = Some(p);
                        prog.files_total += 1;
                        prog.bytes_total += md.len();
                    }
                } else {
                    stats.others += 1;
                    let rdev = md.rdev();
                    (e.a, e.b) = (rdev as u32, (rdev >> 32) as u32);
                }
            }
            m.entries.push(e);
            paths.push(file_path);
        }
        let d = &mut m.entries[dir_idx as usize];
        (d.a, d.b) = (first, names.len() as u32);
        d.nlink = 2 + subdirs;
        prog.entries = m.entries.len() as u64;
    }

    // Link counts within the image for non-directories.
    let mut links: HashMap<u32, u32> = HashMap::new();
    for e in &m.entries {
        if e.mode & 0o170000 != 0o040000 && e.inode != 0 {
            *links.entry(e.inode).or_default() += 1;
        }
    }

    // Store contents (first link of each inode), then copy into the other links.
    let mut batch = Batch::default();
    for (idx, p) in paths.iter().enumerate() {
        let Some(p) = p else { continue };
        let r = store.put_file_batched(p, &mut batch)?;
        let di = m.digest(r.digest)?;
        let e = &mut m.entries[idx];
        e.a = di;
        e.size = r.size;
        stats.bytes += r.size;
        stats.stored_bytes += r.stored;
        stats.dedup_hits += r.existed as u64;
        prog.files_done += 1;
        prog.bytes_done += r.size;
        progress(&prog);
    }
    for i in 0..m.entries.len() {
        let e = m.entries[i];
        if e.mode & 0o170000 != 0o040000 && i as u32 != 0 {
            let canon = m.entries[e.inode as usize];
            let n = links.get(&e.inode).copied().unwrap_or(1);
            let ent = &mut m.entries[i];
            ent.nlink = n;
            if e.inode != i as u32 {
                // Hard link: same attributes and content as the first link.
                (ent.a, ent.b, ent.size) = (canon.a, canon.b, canon.size);
            }
        }
    }
    store.commit(batch)?;
    m.total_size = stats.bytes;

    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    write_manifest(store, name, &m.finish(created), opts.replace)?;
    stats.elapsed = start.elapsed();
    Ok(stats)
}

/// Writes manifest bytes atomically as `images/<name>`: tmp file, fsync,
/// `link` (fails if the name exists, unless `replace`, which first retires the
/// old manifest through `remove_image`), fsync `images/`. Callers hold the gc
/// lock shared.
pub(crate) fn write_manifest(store: &Store, name: &str, bytes: &[u8], replace: bool) -> Result<()> {
    let (mut f, tmp) = store.create_tmp(0o444)?;
    let _guard = TmpGuard(&tmp);
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .ctx("write manifest", &tmp)?;
    drop(f);
    let dest = store.images_dir().join(name);
    if replace && dest.exists() {
        crate::gc::retire_manifest(store, name)?;
    }
    match fs::hard_link(&tmp, &dest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(Error::ImageExists(name.to_owned()));
        }
        Err(e) => return Err(Error::io("link manifest", &dest, e)),
    }
    let d = store.images_dir();
    File::open(&d)
        .and_then(|f| f.sync_all())
        .ctx("fsync directory", &d)?;
    Ok(())
}
