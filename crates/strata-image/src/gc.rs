//! Listing, removing and verifying images; garbage collection of blobs.
//!
//! Pinning: an open [`Image`] holds a shared `flock` on its manifest file.
//! `remove_image` never unlinks a manifest directly: it renames it into
//! `images/.removed/` and unlinks it only if it can take an exclusive lock
//! without waiting; otherwise it stays there, and `gc` keeps its blobs, until a
//! later `remove_image`/`gc` finds it unlocked.

use crate::manifest::{HEADER_LEN, Header};
use crate::{Digest, Error, Image, IoContext, Result, Store, check_name, open_regular};
use rustix::fs::FlockOperation;
use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// Summary of one image, from its header only.
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub name: String,
    pub entries: u64,
    /// Sum of regular-file sizes (distinct inodes).
    pub total_size: u64,
    pub created: SystemTime,
    /// Size of the manifest file.
    pub manifest_bytes: u64,
}

fn read_info(path: &Path, name: &str) -> Result<ImageInfo> {
    let mut f = open_regular(path).ctx("open", path)?;
    let len = f.metadata().ctx("stat", path)?.len();
    let mut h = vec![0u8; HEADER_LEN];
    let n = f.read(&mut h).ctx("read", path)?;
    h.truncate(n);
    let hdr = Header::parse(&h, len).map_err(|reason| Error::BadManifest {
        path: path.to_owned(),
        reason,
    })?;
    let created = if hdr.created_ns >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(hdr.created_ns as u64)
    } else {
        SystemTime::UNIX_EPOCH
    };
    Ok(ImageInfo {
        name: name.to_owned(),
        entries: hdr.entry_count as u64,
        total_size: hdr.total_size,
        created,
        manifest_bytes: len,
    })
}

/// All images, sorted by name. A manifest whose header is unreadable is listed
/// with its error (the body checksum is not verified here).
pub fn list_images(store: &Store) -> Result<Vec<(String, Result<ImageInfo>)>> {
    let dir = store.images_dir();
    let mut out = Vec::new();
    for de in fs::read_dir(&dir).ctx("read directory", &dir)? {
        let de = de.ctx("read directory", &dir)?;
        let Some(name) = de.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if check_name(&name).is_err() {
            continue;
        }
        let info = read_info(&de.path(), &name);
        out.push((name, info));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// What [`remove_image`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoveOutcome {
    /// The manifest is gone; gc may now collect its blobs.
    Removed,
    /// The image is in use (pinned by an open [`Image`]): its manifest waits in
    /// `images/.removed/` and gc keeps its blobs until it is released.
    Deferred,
}

/// Moves `images/<name>` into `images/.removed/` (caller holds the gc lock).
pub(crate) fn retire_manifest(store: &Store, name: &str) -> Result<std::path::PathBuf> {
    let src = store.images_dir().join(name);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dest = store
        .removed_dir()
        .join(format!("{name}.{nanos}.{}", std::process::id()));
    match fs::rename(&src, &dest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NoSuchImage(name.to_owned()));
        }
        Err(e) => return Err(Error::io("rename", &src, e)),
    }
    for d in [store.images_dir(), store.removed_dir()] {
        File::open(&d)
            .and_then(|f| f.sync_all())
            .ctx("fsync directory", &d)?;
    }
    Ok(dest)
}

/// Unlinks a retired manifest unless an [`Image`] still holds it. Returns
/// whether it was removed.
fn reap(path: &Path) -> Result<bool> {
    let f = match open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    match rustix::fs::flock(&f, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {
            fs::remove_file(path).ctx("remove", path)?;
            Ok(true)
        }
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(Error::io("lock", path, e)),
    }
}

/// Removes an image. Blobs are left to [`gc`].
pub fn remove_image(store: &Store, name: &str) -> Result<RemoveOutcome> {
    check_name(name)?;
    let _lock = store.lock_gc(false)?;
    let retired = retire_manifest(store, name)?;
    Ok(if reap(&retired)? {
        RemoveOutcome::Removed
    } else {
        RemoveOutcome::Deferred
    })
}

/// Re-hashes every blob of an image; returns the failures (digest and error),
/// empty when all blobs are intact.
pub fn verify_image(store: &Store, name: &str) -> Result<Vec<(Digest, Error)>> {
    let img = Image::open(store, name)?;
    Ok(img
        .digests()
        .filter_map(|d| store.verify(&d).err().map(|e| (d, e)))
        .collect())
}

/// What [`gc`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub blobs_kept: u64,
    pub blobs_removed: u64,
    /// On-disk bytes freed by removed blobs.
    pub bytes_removed: u64,
    /// Retired manifests deleted (no longer in use).
    pub manifests_removed: u64,
    /// Retired manifests still pinned by a mount (their blobs were kept).
    pub manifests_pinned: u64,
    /// Stale staging files removed from `tmp/`.
    pub tmp_removed: u64,
    /// Files removed from `cache/`: every file of other boots' directories,
    /// this boot's cached copies of blobs no live manifest references, and
    /// stale staging files.
    pub cache_removed: u64,
    /// Bytes freed by `cache_removed`.
    pub cache_bytes_removed: u64,
    /// Cached copies kept (their blob is live).
    pub cache_kept: u64,
}

/// Deletes blobs referenced by no manifest in `images/` or `images/.removed/`.
///
/// Safety rules: gc holds the store's gc lock exclusively (builds and removals
/// hold it shared, so none is half-done); a corrupt manifest aborts gc before
/// anything is deleted; retired manifests still locked by a mount keep their
/// blobs; and only blobs whose mtime is older than the start of gc are
/// deleted (a build refreshes the mtime of blobs it deduplicates against).
///
/// It also cleans the uncompressed cache of [`Store::materialize`]: other
/// boots' directories entirely, and in this boot's the copies of blobs that
/// are not live.
pub fn gc(store: &Store) -> Result<GcStats> {
    let start = SystemTime::now();
    let _lock = store.lock_gc(true)?;
    let mut stats = GcStats::default();
    let mut live: HashSet<Digest> = HashSet::new();

    let removed = store.removed_dir();
    for de in fs::read_dir(&removed).ctx("read directory", &removed)? {
        let p = de.ctx("read directory", &removed)?.path();
        if reap(&p)? {
            stats.manifests_removed += 1;
        } else {
            stats.manifests_pinned += 1;
            live.extend(Image::open_path(&p, true)?.digests());
        }
    }
    let images = store.images_dir();
    for de in fs::read_dir(&images).ctx("read directory", &images)? {
        let de = de.ctx("read directory", &images)?;
        if de.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        live.extend(Image::open_path(&de.path(), true)?.digests());
    }

    let blobs = store.blobs_dir();
    for shard in fs::read_dir(&blobs).ctx("read directory", &blobs)? {
        let shard = shard.ctx("read directory", &blobs)?.path();
        if !shard.is_dir() {
            continue;
        }
        for de in fs::read_dir(&shard).ctx("read directory", &shard)? {
            let de = de.ctx("read directory", &shard)?;
            let p = de.path();
            let digest = de.file_name().to_str().and_then(Digest::from_hex);
            if digest.is_some_and(|d| live.contains(&d)) {
                stats.blobs_kept += 1;
                continue;
            }
            let md = fs::symlink_metadata(&p).ctx("stat", &p)?;
            if md.modified().ctx("stat", &p)? >= start {
                stats.blobs_kept += 1;
                continue;
            }
            fs::remove_file(&p).ctx("remove", &p)?;
            stats.blobs_removed += 1;
            stats.bytes_removed += md.len();
        }
    }

    clean_cache(store, &live, start, &mut stats)?;

    // Staging files: no build runs now (we hold the lock exclusively), but
    // plain put_file callers do not take it, so only old files go.
    let tmp = store.tmp_dir();
    let stale = start - Duration::from_secs(3600);
    for de in fs::read_dir(&tmp).ctx("read directory", &tmp)? {
        let p = de.ctx("read directory", &tmp)?.path();
        if fs::symlink_metadata(&p)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < stale)
        {
            fs::remove_file(&p).ctx("remove", &p)?;
            stats.tmp_removed += 1;
        }
    }
    Ok(stats)
}

/// Cleans `cache/`: other boots' directories go whole (their files were never
/// fsynced and may be torn); in this boot's, copies of blobs that are not live
/// go, and so do staging files (`.`-names) older than an hour. Shard
/// directories of this boot stay: a concurrent `materialize` may be about to
/// rename into one (it takes no lock, so that a mount's reads never wait for
/// gc). Deleting a cached file is always safe: an open descriptor keeps
/// working, and the next `materialize` writes it again.
fn clean_cache(
    store: &Store,
    live: &HashSet<Digest>,
    start: SystemTime,
    stats: &mut GcStats,
) -> Result<()> {
    let root = store.cache_root();
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("read directory", &root, e)),
    };
    let boot = crate::store::boot_id();
    for de in entries {
        let de = de.ctx("read directory", &root)?;
        if de.file_name() != boot {
            remove_tree(&de.path(), stats)?;
        }
    }
    let dir = store.boot_cache_dir();
    let shards = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("read directory", &dir, e)),
    };
    let stale = start - Duration::from_secs(3600);
    for shard in shards {
        let shard = shard.ctx("read directory", &dir)?;
        let sp = shard.path();
        if !shard.file_type().ctx("stat", &sp)?.is_dir() {
            remove_counted(&sp, stats)?;
            continue;
        }
        for de in fs::read_dir(&sp).ctx("read directory", &sp)? {
            let de = de.ctx("read directory", &sp)?;
            let name = de.file_name();
            let p = de.path();
            let staging = name.as_encoded_bytes().starts_with(b".");
            let digest = name.to_str().and_then(Digest::from_hex);
            if digest.is_some_and(|d| live.contains(&d)) {
                stats.cache_kept += 1;
                continue;
            }
            if staging {
                // Possibly being written right now.
                let old = fs::symlink_metadata(&p)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t < stale);
                if !old {
                    continue;
                }
            }
            remove_counted(&p, stats)?;
        }
    }
    Ok(())
}

/// Removes a file (counting it in the cache stats); gone already is fine.
fn remove_counted(p: &Path, stats: &mut GcStats) -> Result<()> {
    let len = match fs::symlink_metadata(p) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", p, e)),
    };
    match fs::remove_file(p) {
        Ok(()) => {
            stats.cache_removed += 1;
            stats.cache_bytes_removed += len;
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", p, e)),
    }
}

/// Removes a file or a whole directory tree (never following symlinks),
/// counting the files.
fn remove_tree(p: &Path, stats: &mut GcStats) -> Result<()> {
    let md = match fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", p, e)),
    };
    if !md.is_dir() {
        return remove_counted(p, stats);
    }
    for de in fs::read_dir(p).ctx("read directory", p)? {
        remove_tree(&de.ctx("read directory", p)?.path(), stats)?;
    }
    match fs::remove_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove directory", p, e)),
    }
}
