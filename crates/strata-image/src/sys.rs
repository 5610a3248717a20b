//! The crate's only `unsafe`: mapping manifests into memory.

use std::fs::File;

/// Maps a manifest read-only.
///
/// SAFETY: memmap2 requires that the file is not modified or truncated while
/// mapped. Manifests are never written in place: they are created in `tmp/`,
/// fsynced and renamed into `images/` (and later renamed to `.removed/` and
/// unlinked), so a mapped manifest's content never changes. A foreign process
/// truncating the file could still cause SIGBUS; that is outside the contract.
pub fn map_manifest(file: &File) -> std::io::Result<memmap2::Mmap> {
    unsafe { memmap2::Mmap::map(file) }
}
