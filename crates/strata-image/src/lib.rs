//! strata's content-addressed blob store and read-only image manifests.
//!
//! * [`Store`]: a directory holding `blobs/` (file contents keyed by the
//!   BLAKE3 digest of the uncompressed bytes, zstd-compressed when that pays),
//!   `images/` (one manifest file per image) and `tmp/` (staging for atomic
//!   writes). [`Store::materialize`] gives a blob's uncompressed content as a
//!   plain file (cached per boot in `cache/`), as kernel passthrough needs.
//! * [`build`]: walks a host directory (never following symlinks) and writes
//!   its contents as blobs and its tree as a manifest.
//! * [`Image`]: a manifest opened for reading. Opening maps the file and checks
//!   the header and the body checksum; entries are decoded only on access, and
//!   every offset is bounds-checked, so a corrupt manifest gives an [`Error`],
//!   never a panic.
//! * [`list_images`], [`remove_image`], [`gc`]: housekeeping; an open [`Image`]
//!   pins its blobs against `remove_image` + `gc`.
//!
//! The on-disk format is documented in `docs/IMAGE-FORMAT.md`. This crate knows
//! nothing of FUSE.

#![deny(unsafe_code)]

mod build;
mod gc;
mod manifest;
mod store;
// The crate's only unsafe code: mapping the manifest.
#[allow(unsafe_code)]
mod sys;
#[cfg(test)]
mod tests;
mod transfer;

pub use build::{BuildOptions, BuildStats, Progress, build};
pub use gc::{GcStats, ImageInfo, RemoveOutcome, gc, list_images, remove_image, verify_image};
pub use manifest::{Children, Entry, Image, Kind, entry_name_problem, seal_manifest};
pub use store::{BlobReader, BlobRef, Fetch, Store};
pub use transfer::{Exported, FetchBlob, ImportStats, export, import, missing_blobs};

use std::fmt;
use std::path::{Path, PathBuf};

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error names what it was about (path, digest or image) on one line.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("blob {0} is missing from the store")]
    MissingBlob(Digest),
    #[error("blob {digest} is corrupt: {reason}")]
    CorruptBlob { digest: Digest, reason: String },
    #[error("manifest {}: {reason}", path.display())]
    BadManifest { path: PathBuf, reason: String },
    #[error(
        "invalid image name {0:?}: must be non-empty, at most 255 bytes, without '/' or NUL, and not start with '.'"
    )]
    InvalidName(String),
    #[error("image {0:?} already exists (use replace to overwrite it)")]
    ImageExists(String),
    #[error("no image named {0:?}")]
    NoSuchImage(String),
    #[error("{}: {reason}", path.display())]
    Source { path: PathBuf, reason: String },
    #[error("blob {digest}: {reason}")]
    Fetch { digest: Digest, reason: String },
}

impl Error {
    pub(crate) fn io(op: &'static str, path: &Path, source: impl Into<std::io::Error>) -> Error {
        Error::Io {
            op,
            path: path.to_owned(),
            source: source.into(),
        }
    }
}

/// Shorthand: attach an operation name and a path to an I/O result.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T, E: Into<std::io::Error>> IoContext<T> for std::result::Result<T, E> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}

/// BLAKE3 digest of a blob's uncompressed content; displayed as 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }

    /// Parses 64 lowercase or uppercase hex digits.
    pub fn from_hex(s: &str) -> Option<Digest> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            let hi = (b[2 * i] as char).to_digit(16)?;
            let lo = (b[2 * i + 1] as char).to_digit(16)?;
            *o = (hi * 16 + lo) as u8;
        }
        Some(Digest(out))
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        use fmt::Write;
        let mut s = String::with_capacity(64);
        for b in self.0 {
            let _ = write!(s, "{b:02x}");
        }
        s
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// Opens a store file (manifest, blob, cached blob) for reading without ever
/// blocking or following a symlink: a FIFO or device planted in the store
/// would otherwise hang whoever lists or mounts it. Anything but a regular
/// file is an error.
pub(crate) fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let file = std::fs::File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Image names: non-empty, ≤ 255 bytes, no '/', no NUL, not starting with '.'
/// (dot names are reserved for the store's own entries such as `.removed`).
pub(crate) fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 255 || name.starts_with('.') || name.contains(['/', '\0']) {
        return Err(Error::InvalidName(name.to_owned()));
    }
    Ok(())
}
