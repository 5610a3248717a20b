//! Moving an image between stores: what a push sends (the manifest's bytes
//! and its blob files, as they are) and what a pull receives, checked before
//! anything becomes visible: the manifest whole (checksum and tree, as a
//! mount checks it), each blob's header, size and digest. The manifest is
//! written last, so an image never names a blob the store lacks.

use std::collections::BTreeSet;

use crate::build::write_manifest;
use crate::check_name;
use crate::manifest::Image;
use crate::store::{Batch, TmpGuard};
use crate::{Digest, Error, IoContext, Result, Store};

/// An image as a push sends it.
pub struct Exported {
    pub manifest: Vec<u8>,
    /// Every blob it uses, once each.
    pub blobs: Vec<Digest>,
}

/// Image `name` of `store`, to be sent elsewhere.
pub fn export(store: &Store, name: &str) -> Result<Exported> {
    let img = Image::open(store, name)?;
    let path = store.images_dir().join(name);
    let manifest = std::fs::read(&path).ctx("read manifest", &path)?;
    let blobs: BTreeSet<Digest> = img.digests().collect();
    Ok(Exported {
        manifest,
        blobs: blobs.into_iter().collect(),
    })
}

/// Fetches one blob file's bytes, by digest.
pub type FetchBlob<'a> = &'a mut dyn FnMut(&Digest) -> std::result::Result<Vec<u8>, String>;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImportStats {
    /// Blobs fetched, and their bytes (as stored).
    pub fetched: u64,
    pub bytes: u64,
    /// Blobs the store had already.
    pub present: u64,
}

/// The blobs a manifest received from elsewhere uses that `store` lacks, in
/// the order [`import`] asks for them (so a caller can fetch ahead). The
/// manifest is checked whole first.
pub fn missing_blobs(store: &Store, manifest: &[u8]) -> Result<Vec<Digest>> {
    let digests = manifest_blobs(store, manifest)?;
    Ok(digests.into_iter().filter(|d| !store.has_blob(d)).collect())
}

/// Every blob `manifest` uses, sorted, after checking it as a mount does.
fn manifest_blobs(store: &Store, manifest: &[u8]) -> Result<BTreeSet<Digest>> {
    let (mut f, tmp) = store.create_tmp(0o444)?;
    let _guard = TmpGuard(&tmp);
    std::io::Write::write_all(&mut f, manifest).ctx("write manifest", &tmp)?;
    drop(f);
    Ok(Image::open_path(&tmp, true)?.digests().collect())
}

/// Makes image `name` in `store` from `manifest` (bytes received from
/// elsewhere), fetching with `fetch` each blob the store lacks (the blob
/// file's bytes). Nothing is visible until every blob is checked and
/// durable; a bad manifest or blob leaves no image. Without `fetch`, only
/// the manifest is kept: the blobs come when first read, from a store made
/// [`Store::with_fetch`].
pub fn import(
    store: &Store,
    name: &str,
    manifest: &[u8],
    replace: bool,
    mut fetch: Option<FetchBlob<'_>>,
) -> Result<ImportStats> {
    check_name(name)?;
    let _gc = store.lock_gc(false)?;
    let digests = manifest_blobs(store, manifest)?;
    let mut batch = Batch::default();
    let mut stats = ImportStats::default();
    for d in &digests {
        if store.touch_existing(d)? {
            stats.present += 1;
            continue;
        }
        let Some(fetch) = fetch.as_mut() else {
            continue;
        };
        let bytes = fetch(d).map_err(|reason| Error::Fetch { digest: *d, reason })?;
        store.put_blob_file(d, &bytes, &mut batch)?;
        stats.fetched += 1;
        stats.bytes += bytes.len() as u64;
    }
    store.commit(batch)?;
    write_manifest(store, name, manifest, replace)?;
    Ok(stats)
}
