//! The blob store: `blobs/<2 hex>/<64 hex>`, each file a 16-byte header then
//! the content, raw or as one zstd frame. See docs/IMAGE-FORMAT.md.

use crate::{Digest, Error, IoContext, Result};
use rustix::fs::{FlockOperation, Timespec, Timestamps, UTIME_NOW};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

pub(crate) const BLOB_MAGIC: &[u8; 4] = b"STRB";
pub(crate) const BLOB_VERSION: u8 = 1;
pub(crate) const BLOB_HEADER_LEN: u64 = 16;
pub(crate) const ENC_RAW: u8 = 0;
pub(crate) const ENC_ZSTD: u8 = 1;
const ZSTD_LEVEL: i32 = 3;
/// Files up to this size are read into memory once; larger ones are streamed.
const SMALL_FILE: u64 = 1 << 20;
const CHUNK: usize = 256 << 10;

/// A blob store rooted at a directory. Cheap to clone; holds no open files.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
    /// Where blobs the store lacks come from (a remote store), if anywhere.
    fetch: Option<Arc<dyn Fetch>>,
    /// One fetch per blob at a time: concurrent readers wait for it.
    fetching: Arc<[std::sync::Mutex<()>; 16]>,
}

/// A source of blob files a store lacks (the remote store): the blob
/// file's bytes, as a store holds them; checked before they are kept.
pub trait Fetch: Send + Sync + std::fmt::Debug {
    fn fetch(&self, digest: &Digest) -> std::result::Result<Vec<u8>, String>;
}

/// The result of storing one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobRef {
    pub digest: Digest,
    /// Uncompressed size.
    pub size: u64,
    /// Bytes written to the store (header included); 0 when the blob existed.
    pub stored: u64,
    /// The blob was already in the store (deduplicated).
    pub existed: bool,
}

/// Blobs written to `tmp/` but not yet durable and renamed into `blobs/`
/// (see [`Store::commit`]); dropping an uncommitted batch deletes them.
#[derive(Default)]
pub(crate) struct Batch {
    pending: HashMap<Digest, PathBuf>,
}

impl Batch {
    fn has(&self, digest: &Digest) -> bool {
        self.pending.contains_key(digest)
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        for tmp in self.pending.values() {
            let _ = fs::remove_file(tmp);
        }
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Store {
    /// Opens (creating if needed) a store at `root` with its `blobs/`, `images/`,
    /// `images/.removed/` and `tmp/` directories.
    pub fn open(root: &Path) -> Result<Store> {
        for sub in ["", "blobs", "images", "images/.removed", "tmp"] {
            let p = root.join(sub);
            make_dirs(&p).ctx("create store directory", &p)?;
        }
        Ok(Store {
            root: root.to_owned(),
            fetch: None,
            fetching: Arc::new(Default::default()),
        })
    }

    /// The same store, fetching the blobs it lacks from `fetch` when they
    /// are first read (each checked, then kept in the store).
    pub fn with_fetch(mut self, fetch: Arc<dyn Fetch>) -> Store {
        self.fetch = Some(fetch);
        self
    }

    /// Fetches the missing blob `digest`, if the store has a source.
    fn fetch_missing(&self, digest: &Digest) -> Result<bool> {
        let Some(fetch) = &self.fetch else {
            return Ok(false);
        };
        let _one = self.fetching[digest.0[0] as usize % 16]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.has_blob(digest) {
            return Ok(true);
        }
        let _gc = self.lock_gc(false)?;
        let bytes = fetch.fetch(digest).map_err(|reason| Error::Fetch {
            digest: *digest,
            reason,
        })?;
        let mut batch = Batch::default();
        self.put_blob_file(digest, &bytes, &mut batch)?;
        self.commit(batch)?;
        tracing::debug!(%digest, bytes = bytes.len(), "blob fetched");
        Ok(true)
    }

    /// `$STRATA_STORE`, else `/var/lib/strata` for root, else
    /// `$XDG_DATA_HOME/strata`, else `~/.local/share/strata`.
    pub fn default_root() -> PathBuf {
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(p) = env("STRATA_STORE") {
            return p;
        }
        if rustix::process::geteuid().is_root() {
            return PathBuf::from("/var/lib/strata");
        }
        if let Some(p) = env("XDG_DATA_HOME") {
            return p.join("strata");
        }
        env("HOME")
            .unwrap_or_else(|| PathBuf::from("/"))
            .join(".local/share/strata")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    pub(crate) fn removed_dir(&self) -> PathBuf {
        self.root.join("images/.removed")
    }

    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// `cache/`: one directory per boot, see [`Store::materialize`].
    pub(crate) fn cache_root(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// `cache/<boot-id>/`: the only cache directory this boot trusts.
    pub(crate) fn boot_cache_dir(&self) -> PathBuf {
        self.cache_root().join(boot_id())
    }

    /// Path of a blob's uncompressed copy in this boot's cache (which may not
    /// exist): `cache/<boot-id>/ab/<64 hex>`.
    pub fn cache_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.boot_cache_dir().join(&hex[..2]).join(hex)
    }

    /// Path of a blob file (which may not exist).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.root.join("blobs").join(&hex[..2]).join(hex)
    }

    /// Whether the blob file exists (its content is not checked).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).exists()
    }

    /// Creates a new, exclusive staging file in `tmp/`.
    pub(crate) fn create_tmp(&self, mode: u32) -> Result<(File, PathBuf)> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = self
            .tmp_dir()
            .join(format!("{}-{n}-{nanos}", std::process::id()));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&p)
            .ctx("create", &p)?;
        Ok((f, p))
    }

    /// The store's gc lock: builds and removals hold it shared, [`crate::gc`]
    /// exclusive, so gc never sees a half-written image or a manifest in flight
    /// between `images/` and `images/.removed/`.
    pub(crate) fn lock_gc(&self, exclusive: bool) -> Result<File> {
        let p = self.root.join("gc.lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&p)
            .ctx("open", &p)?;
        let op = if exclusive {
            FlockOperation::LockExclusive
        } else {
            FlockOperation::LockShared
        };
        rustix::fs::flock(&f, op).ctx("lock", &p)?;
        Ok(f)
    }

    /// Stores a file's content, streaming large files (hash pass, then a
    /// compress pass that re-hashes to detect a file changing underneath).
    /// When the blob already exists nothing is written (its mtime is refreshed,
    /// which keeps a concurrent gc from collecting it). Durable on return.
    pub fn put_file(&self, path: &Path) -> Result<BlobRef> {
        let mut batch = Batch::default();
        let r = self.put_file_batched(path, &mut batch)?;
        self.commit(batch)?;
        Ok(r)
    }

    /// Stores bytes from memory (used for small files and by tests).
    pub fn put_bytes(&self, data: &[u8]) -> Result<BlobRef> {
        let mut batch = Batch::default();
        let r = self.put_bytes_batched(data, &mut batch)?;
        self.commit(batch)?;
        Ok(r)
    }

    /// Makes a batch's blobs durable and visible: `syncfs` (their data reaches
    /// the disk while they are still in `tmp/`), rename each into
    /// `blobs/xx/`, `syncfs` again (the renames). A crash leaves either no
    /// blob or a complete one under its name; never a torn blob that a later
    /// build would trust for dedup. Two `syncfs` per batch instead of one
    /// `fsync` per blob keeps builds of many small files fast.
    pub(crate) fn commit(&self, mut batch: Batch) -> Result<()> {
        if batch.pending.is_empty() {
            return Ok(());
        }
        let sync = || {
            let d = File::open(&self.root).ctx("open", &self.root)?;
            rustix::fs::syncfs(&d).ctx("syncfs", &self.root)
        };
        sync()?;
        for (digest, tmp) in std::mem::take(&mut batch.pending) {
            let dest = self.blob_path(&digest);
            let shard = dest.parent().expect("blob path has a parent");
            make_dirs(shard).ctx("create directory", shard)?;
            let r = fs::rename(&tmp, &dest).ctx("rename into store", &dest);
            if r.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            r?;
        }
        sync()
    }

    /// Refreshes a blob's mtime; returns false when it does not exist.
    pub(crate) fn touch_existing(&self, digest: &Digest) -> Result<bool> {
        let p = self.blob_path(digest);
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: UTIME_NOW,
        };
        let ts = Timestamps {
            last_access: now,
            last_modification: now,
        };
        match rustix::fs::utimensat(rustix::fs::CWD, &p, &ts, rustix::fs::AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(Error::io("touch blob", &p, e)),
        }
    }

    pub(crate) fn put_bytes_batched(&self, data: &[u8], batch: &mut Batch) -> Result<BlobRef> {
        let digest = Digest::of(data);
        let size = data.len() as u64;
        if batch.has(&digest) || self.touch_existing(&digest)? {
            return Ok(BlobRef {
                digest,
                size,
                stored: 0,
                existed: true,
            });
        }
        let (mut f, tmp) = self.create_tmp(0o444)?;
        let guard = TmpGuard(&tmp);
        let compressed = zstd::bulk::compress(data, ZSTD_LEVEL).ctx("compress", &tmp)?;
        let (enc, body) = if pays(compressed.len() as u64, size) {
            (ENC_ZSTD, &compressed[..])
        } else {
            (ENC_RAW, data)
        };
        f.write_all(&blob_header(enc, size))
            .and_then(|_| f.write_all(body))
            .ctx("write", &tmp)?;
        let stored = BLOB_HEADER_LEN + body.len() as u64;
        Ok(stage(guard, f, digest, size, stored, batch))
    }

    pub(crate) fn put_file_batched(&self, path: &Path, batch: &mut Batch) -> Result<BlobRef> {
        let open = || {
            OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(path)
                .ctx("open", path)
        };
        let mut src = open()?;
        let len = src.metadata().ctx("stat", path)?.len();
        if len <= SMALL_FILE {
            let mut data = Vec::with_capacity(len as usize);
            src.read_to_end(&mut data).ctx("read", path)?;
            return self.put_bytes_batched(&data, batch);
        }
        // Pass 1: hash only, so an existing blob costs no writes.
        let (digest, size) = hash_reader(&mut src).ctx("read", path)?;
        if batch.has(&digest) || self.touch_existing(&digest)? {
            return Ok(BlobRef {
                digest,
                size,
                stored: 0,
                existed: true,
            });
        }
        // Pass 2: compress into tmp/, hashing again.
        let (f, tmp) = self.create_tmp(0o444)?;
        let guard = TmpGuard(&tmp);
        src.seek(SeekFrom::Start(0)).ctx("seek", path)?;
        let mut w = io::BufWriter::with_capacity(CHUNK, &f);
        w.write_all(&blob_header(ENC_ZSTD, size))
            .ctx("write", &tmp)?;
        let mut enc = zstd::stream::write::Encoder::new(w, ZSTD_LEVEL).ctx("compress", &tmp)?;
        let mut h = HashingReader::new(&mut src);
        io::copy(&mut h, &mut enc).ctx("compress", path)?;
        let (d2, s2) = h.finish();
        enc.finish()
            .and_then(|mut w| w.flush())
            .ctx("write", &tmp)?;
        let changed = || Error::Source {
            path: path.to_owned(),
            reason: "file changed while it was being stored".into(),
        };
        if d2 != digest || s2 != size {
            return Err(changed());
        }
        let mut stored = f.metadata().ctx("stat", &tmp)?.len();
        if !pays(stored - BLOB_HEADER_LEN, size) {
            // Pass 3 (incompressible data): rewrite raw.
            f.set_len(0).ctx("truncate", &tmp)?;
            let mut w = io::BufWriter::with_capacity(CHUNK, &f);
            w.seek(SeekFrom::Start(0)).ctx("seek", &tmp)?;
            w.write_all(&blob_header(ENC_RAW, size))
                .ctx("write", &tmp)?;
            src.seek(SeekFrom::Start(0)).ctx("seek", path)?;
            let mut h = HashingReader::new(&mut src);
            io::copy(&mut h, &mut w).ctx("copy", path)?;
            w.flush().ctx("write", &tmp)?;
            drop(w);
            if h.finish() != (digest, size) {
                return Err(changed());
            }
            stored = BLOB_HEADER_LEN + size;
        }
        Ok(stage(guard, f, digest, size, stored, batch))
    }

    /// Opens a blob for reading its uncompressed content. The reader verifies
    /// size and digest as it reaches the end and fails with an error naming the
    /// digest on a mismatch; read it to EOF before trusting the data.
    pub fn open_blob(&self, digest: &Digest) -> Result<BlobReader> {
        match open_blob_file(&self.blob_path(digest), digest) {
            Err(Error::MissingBlob(_)) if self.fetch_missing(digest)? => {
                open_blob_file(&self.blob_path(digest), digest)
            }
            r => r,
        }
    }

    /// Stages blob file bytes received from elsewhere (a pull) after reading
    /// them through as the store would: a blob whose header, size or digest
    /// is wrong is refused before it gets a name.
    pub(crate) fn put_blob_file(
        &self,
        digest: &Digest,
        bytes: &[u8],
        batch: &mut Batch,
    ) -> Result<()> {
        let (mut f, tmp) = self.create_tmp(0o444)?;
        let guard = TmpGuard(&tmp);
        f.write_all(bytes).ctx("write", &tmp)?;
        let mut r = open_blob_file(&tmp, digest).map_err(|e| match e {
            Error::MissingBlob(_) => Error::io("open", &tmp, io::ErrorKind::NotFound),
            e => e,
        })?;
        io::copy(&mut r, &mut io::sink()).map_err(|e| blob_read_error(digest, e))?;
        let size = r.size();
        stage(guard, f, *digest, size, bytes.len() as u64, batch);
        Ok(())
    }
}

/// Opens the blob file `p` (holding `digest`) for reading its content; see
/// [`Store::open_blob`].
fn open_blob_file(p: &Path, digest: &Digest) -> Result<BlobReader> {
    let f = match crate::open_regular(p) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::MissingBlob(*digest));
        }
        Err(e) => return Err(Error::io("open blob", p, e)),
    };
    let corrupt = |reason: &str| Error::CorruptBlob {
        digest: *digest,
        reason: reason.to_owned(),
    };
    let mut hdr = [0u8; BLOB_HEADER_LEN as usize];
    f.read_exact_at(&mut hdr, 0)
        .map_err(|_| corrupt("truncated header"))?;
    if &hdr[..4] != BLOB_MAGIC {
        return Err(corrupt("bad magic"));
    }
    if hdr[4] != BLOB_VERSION {
        return Err(corrupt(&format!("unsupported blob version {}", hdr[4])));
    }
    let size = u64::from_le_bytes(hdr[8..16].try_into().unwrap());
    let mut f = f;
    f.seek(SeekFrom::Start(BLOB_HEADER_LEN)).ctx("seek", p)?;
    let inner: Box<dyn Read + Send> = match hdr[5] {
        ENC_RAW => Box::new(BufReader::with_capacity(CHUNK, f)),
        ENC_ZSTD => Box::new(zstd::stream::read::Decoder::new(f).ctx("decompress", p)?),
        e => return Err(corrupt(&format!("unknown encoding {e}"))),
    };
    Ok(BlobReader {
        digest: *digest,
        size,
        inner: inner.take(size + 1),
        hasher: blake3::Hasher::new(),
        read: 0,
        done: false,
    })
}

impl Store {
    /// Reads a blob to the end, checking header, size and digest.
    pub fn verify(&self, digest: &Digest) -> Result<()> {
        let mut r = self.open_blob(digest)?;
        io::copy(&mut r, &mut io::sink()).map_err(|e| blob_read_error(digest, e))?;
        Ok(())
    }

    /// A read-only `File` holding the uncompressed content of `digest`.
    /// The first call decompresses the blob (verifying size and BLAKE3 digest
    /// while it writes) into the cache; later calls just open the cached file.
    ///
    /// The cache lives in `cache/<boot-id>/ab/<64 hex>`. Its files are never
    /// fsynced (a first read must not wait for the disk), so a crash could
    /// leave one torn under its name: that is why each boot has its own
    /// directory and trusts no other boot's (gc deletes them). Within a boot a
    /// name only ever appears by `rename` of a fully written, verified staging
    /// file, so it is complete. Concurrent calls for one digest (threads or
    /// processes) each write their own staging file; the first rename wins and
    /// the others open the winner's file, so all share one inode (and its page
    /// cache). A missing blob is [`Error::MissingBlob`], a corrupt one
    /// [`Error::CorruptBlob`], and neither leaves a cache file.
    pub fn materialize(&self, digest: &Digest) -> Result<File> {
        let dest = self.cache_path(digest);
        match crate::open_regular(&dest) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("open cached blob", &dest, e)),
        }
        // Open the blob first: a missing blob creates nothing.
        let mut src = self.open_blob(digest)?;
        let shard = dest.parent().expect("cache path has a parent");
        make_dirs(shard).ctx("create cache directory", shard)?;
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let staging = shard.join(format!(
            ".{}.{}-{n}-{nanos}",
            digest.to_hex(),
            std::process::id()
        ));
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&staging)
            .ctx("create", &staging)?;
        let guard = TmpGuard(&staging);
        let mut buf = vec![0u8; CHUNK];
        loop {
            let k = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(blob_read_error(digest, e)),
            };
            out.write_all(&buf[..k]).ctx("write", &staging)?;
        }
        drop(out);
        // A read-only descriptor of the verified file, taken before it is
        // published (gc may delete the published name at any time).
        let ro = File::open(&staging).ctx("open", &staging)?;
        match rustix::fs::renameat_with(
            rustix::fs::CWD,
            &staging,
            rustix::fs::CWD,
            &dest,
            rustix::fs::RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {
                std::mem::forget(guard);
                Ok(ro)
            }
            // Another writer won: its file has the same (verified) content.
            Err(rustix::io::Errno::EXIST) => Ok(crate::open_regular(&dest).unwrap_or(ro)),
            // No RENAME_NOREPLACE on this filesystem: a plain rename replaces
            // an identical file, which is just as correct.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                fs::rename(&staging, &dest).ctx("rename into cache", &dest)?;
                std::mem::forget(guard);
                Ok(ro)
            }
            Err(e) => Err(Error::io("rename into cache", &dest, e)),
        }
    }

    /// Reads a whole blob into memory (verified).
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>> {
        let mut r = self.open_blob(digest)?;
        let mut v = Vec::with_capacity(r.size().min(1 << 30) as usize);
        r.read_to_end(&mut v)
            .map_err(|e| blob_read_error(digest, e))?;
        Ok(v)
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id` without hyphens), or
/// `noboot` when it cannot be read. Names the cache directory of this boot.
pub(crate) fn boot_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().replace('-', ""))
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric()))
            .unwrap_or_else(|| "noboot".to_owned())
    })
}

/// Converts an error from [`BlobReader`] into a crate error naming the digest.
pub(crate) fn blob_read_error(digest: &Digest, e: io::Error) -> Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<BlobMismatch>()) {
        // The mismatch names the digest for bare `BlobReader` users; the
        // error names it already.
        Some(m) => Error::CorruptBlob {
            digest: *digest,
            reason: m
                .0
                .strip_prefix(&format!("blob {digest}: "))
                .unwrap_or(&m.0)
                .to_owned(),
        },
        None => Error::CorruptBlob {
            digest: *digest,
            reason: format!("read failed: {e}"),
        },
    }
}

#[derive(Debug)]
struct BlobMismatch(String);
impl std::fmt::Display for BlobMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for BlobMismatch {}

/// Streaming reader over a blob's uncompressed content that verifies its size
/// and BLAKE3 digest; the final `read` returns an `InvalidData` error naming the
/// digest instead of `Ok(0)` when they do not match.
pub struct BlobReader {
    digest: Digest,
    size: u64,
    inner: io::Take<Box<dyn Read + Send>>,
    hasher: blake3::Hasher,
    read: u64,
    done: bool,
}

impl BlobReader {
    /// Uncompressed size announced by the blob header.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn digest(&self) -> Digest {
        self.digest
    }

    fn fail(&self, reason: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            BlobMismatch(format!("blob {}: {reason}", self.digest)),
        )
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        let n = self
            .inner
            .read(buf)
            .map_err(|e| self.fail(format!("decompression failed: {e}")))?;
        if n > 0 {
            self.read += n as u64;
            if self.read > self.size {
                return Err(self.fail(format!(
                    "content longer than the {} bytes in its header",
                    self.size
                )));
            }
            self.hasher.update(&buf[..n]);
            return Ok(n);
        }
        if self.read != self.size {
            return Err(self.fail(format!(
                "content is {} bytes, header says {}",
                self.read, self.size
            )));
        }
        if *self.hasher.finalize().as_bytes() != self.digest.0 {
            return Err(self.fail("content does not match its digest".into()));
        }
        self.done = true;
        Ok(0)
    }
}

/// Creates a directory and its missing parents with mode 0755 whatever the
/// umask (the mount daemon runs with umask 0): nobody else may plant files
/// in the store, least of all in the cache, whose files are trusted as is.
fn make_dirs(p: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new().recursive(true).mode(0o755).create(p)
}

/// Compression pays when it saves at least 1/16 (and at least 64 bytes).
fn pays(compressed: u64, size: u64) -> bool {
    compressed + 64 <= size && compressed <= size - size / 16
}

fn blob_header(enc: u8, size: u64) -> [u8; BLOB_HEADER_LEN as usize] {
    let mut h = [0u8; BLOB_HEADER_LEN as usize];
    h[..4].copy_from_slice(BLOB_MAGIC);
    h[4] = BLOB_VERSION;
    h[5] = enc;
    h[8..].copy_from_slice(&size.to_le_bytes());
    h
}

fn hash_reader(r: &mut impl Read) -> io::Result<(Digest, u64)> {
    let mut h = HashingReader::new(r);
    io::copy(&mut h, &mut io::sink())?;
    Ok(h.finish())
}

struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
    n: u64,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: blake3::Hasher::new(),
            n: 0,
        }
    }
    fn finish(&self) -> (Digest, u64) {
        (Digest(*self.hasher.finalize().as_bytes()), self.n)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

/// Removes a staging file on early return.
pub(crate) struct TmpGuard<'a>(pub(crate) &'a Path);
impl Drop for TmpGuard<'_> {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.0);
    }
}

/// Queues a fully written staging file for [`Store::commit`] (it is no longer
/// removed on drop) and describes the new blob.
fn stage(
    guard: TmpGuard<'_>,
    f: File,
    digest: Digest,
    size: u64,
    stored: u64,
    batch: &mut Batch,
) -> BlobRef {
    drop(f);
    batch.pending.insert(digest, guard.0.to_owned());
    std::mem::forget(guard);
    BlobRef {
        digest,
        size,
        stored,
        existed: false,
    }
}
