//! The remote image store: an S3-compatible bucket (AWS S3, MinIO, Ceph
//! RGW, Garage, R2) holding images in the local store's own formats
//! (docs/IMAGE-FORMAT.md). Knows nothing of FUSE. Under `s3://BUCKET/PREFIX/`:
//!
//! ```text
//! blobs/ab/ab12…ef   blob files, as in a local store (named by the BLAKE3 of their content)
//! images/NAME        manifests
//! ```
//!
//! A push uploads the blobs the bucket lacks, then the manifest, so a
//! manifest in the bucket only ever names blobs that are there, and an
//! interrupted push resumes where it stopped. A pull checks everything it
//! receives before the image appears in the local store.
//!
//! Endpoint, region and credentials follow the AWS conventions
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID` /
//! `AWS_SECRET_ACCESS_KEY`, `~/.aws/config` and `credentials`); an explicit
//! endpoint overrides them. With an endpoint, buckets are addressed by path
//! (what MinIO, Ceph RGW, Garage and test servers expect).

#![deny(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use strata_image::{Digest, ImportStats, Store};

/// Requests in flight at once during a push.
const PARALLEL: usize = 8;
/// No request waits longer than this for a connection, or in all.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

pub type Result<T> = std::result::Result<T, String>;

/// Why a pull failed, as its caller tells bad input from failures.
#[derive(Debug)]
pub enum PullError {
    /// The remote has no image of that name.
    NoImage(String),
    /// The local store refused it (a name taken, a corrupt blob or manifest).
    Store(strata_image::Error),
    /// The remote could not be asked.
    Remote(String),
}

impl std::fmt::Display for PullError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PullError::NoImage(m) | PullError::Remote(m) => f.write_str(m),
            PullError::Store(e) => write!(f, "{e}"),
        }
    }
}

impl Remote {
    /// The manifest of image `name`.
    fn manifest(&self, name: &str) -> std::result::Result<Vec<u8>, PullError> {
        self.get(&image_key(name))
            .map_err(PullError::Remote)?
            .ok_or_else(|| PullError::NoImage(format!("{}: no image named {name:?}", self.at)))
    }
}

/// A place in a bucket, from `s3://BUCKET[/PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub bucket: String,
    /// Without leading or trailing '/'; empty for the bucket's root.
    pub prefix: String,
}

impl Location {
    pub fn parse(url: &str) -> Result<Location> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url}: a remote is s3://BUCKET[/PREFIX]"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
        if !bucket_ok {
            return Err(format!(
                "{url}: bucket {bucket:?} is not a valid name (3-63 of a-z, 0-9, '-', '.')"
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|c| c == "." || c == "..") || prefix.contains("//") {
            return Err(format!("{url}: the prefix must be plain path components"));
        }
        Ok(Location {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
        })
    }

    fn key(&self, rel: &str) -> String {
        match self.prefix.as_str() {
            "" => rel.to_string(),
            p => format!("{p}/{rel}"),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.prefix.as_str() {
            "" => write!(f, "s3://{}", self.bucket),
            p => write!(f, "s3://{}/{p}", self.bucket),
        }
    }
}

fn blob_key(d: &Digest) -> String {
    let hex = d.to_hex();
    format!("blobs/{}/{hex}", &hex[..2])
}

fn image_key(name: &str) -> String {
    format!("images/{name}")
}

/// A connection to one remote store. Blocking: each call runs on the
/// remote's own small runtime.
pub struct Remote {
    at: Location,
    client: aws_sdk_s3::Client,
    rt: tokio::runtime::Runtime,
}

/// The first line of an SDK error and what lies under it (the SDK's own
/// `Display` says only "service error").
fn why(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        parts.push(s.to_string());
        src = s.source();
    }
    parts.dedup();
    parts.join(": ")
}

impl Remote {
    /// Connects to `url` (`s3://BUCKET[/PREFIX]`); `endpoint` overrides the
    /// configured one.
    pub fn open(url: &str, endpoint: Option<&str>) -> Result<Remote> {
        let at = Location::parse(url)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the S3 client: {e}"))?;
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .operation_timeout(REQUEST_TIMEOUT)
            .build();
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).timeout_config(timeouts);
        if let Some(e) = endpoint {
            loader = loader.endpoint_url(e);
        }
        let sdk = rt.block_on(loader.load());
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk);
        if sdk.region().is_none() {
            // S3-compatible servers take any region; AWS itself redirects.
            conf = conf.region(aws_sdk_s3::config::Region::new("us-east-1"));
        }
        if sdk.endpoint_url().is_some() {
            conf = conf.force_path_style(true);
        }
        Ok(Remote {
            at,
            client: aws_sdk_s3::Client::from_conf(conf.build()),
            rt,
        })
    }

    pub fn location(&self) -> &Location {
        &self.at
    }

    /// The blobs the remote holds.
    pub fn blobs(&self) -> Result<HashSet<Digest>> {
        let prefix = self.at.key("blobs/");
        self.rt.block_on(async {
            let mut out = HashSet::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.at.bucket)
                .prefix(&prefix)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| format!("{}: listing blobs: {}", self.at, why(&e)))?;
                for o in page.contents() {
                    let name = o.key().and_then(|k| k.rsplit('/').next());
                    if let Some(d) = name.and_then(Digest::from_hex) {
                        out.insert(d);
                    }
                }
            }
            Ok(out)
        })
    }

    /// The object at `rel` (below the prefix); `None` if there is none.
    fn get(&self, rel: &str) -> Result<Option<Vec<u8>>> {
        self.rt
            .block_on(Self::get_with(&self.client, &self.at, rel))
    }

    /// A GET from a task of its own (the client and location cloned in).
    async fn get_with(
        client: &aws_sdk_s3::Client,
        at: &Location,
        rel: &str,
    ) -> Result<Option<Vec<u8>>> {
        let r = client
            .get_object()
            .bucket(&at.bucket)
            .key(at.key(rel))
            .send()
            .await;
        match r {
            Ok(o) => {
                let body = o
                    .body
                    .collect()
                    .await
                    .map_err(|e| format!("{at}/{rel}: {}", why(&e)))?;
                Ok(Some(body.into_bytes().to_vec()))
            }
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            Err(e) => Err(format!("{at}/{rel}: {}", why(&e))),
        }
    }

    async fn put(&self, rel: String, body: Vec<u8>) -> Result<()> {
        Self::put_with(&self.client, &self.at, rel, body).await
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushStats {
    /// Blobs the image uses, blobs uploaded (and their bytes, as stored).
    pub blobs: u64,
    pub uploaded: u64,
    pub bytes: u64,
}

/// Uploads image `name` of `store`: the blobs the remote lacks, `PARALLEL`
/// at a time, then the manifest. `progress(done, total)` after each blob.
pub fn push(
    store: &Store,
    name: &str,
    remote: &Remote,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<PushStats> {
    let img = strata_image::export(store, name).map_err(|e| e.to_string())?;
    let have = remote.blobs()?;
    let missing: Vec<Digest> = img
        .blobs
        .iter()
        .filter(|d| !have.contains(d))
        .copied()
        .collect();
    let total = missing.len() as u64;
    let mut stats = PushStats {
        blobs: img.blobs.len() as u64,
        ..Default::default()
    };
    progress(0, total);
    remote.rt.block_on(async {
        let mut running = tokio::task::JoinSet::new();
        let mut queue = missing.into_iter();
        loop {
            while running.len() < PARALLEL {
                let Some(d) = queue.next() else { break };
                let path = store.blob_path(&d);
                let body = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let (client, at) = (remote.client.clone(), remote.at.clone());
                let len = body.len() as u64;
                running.spawn(async move {
                    let r = Remote::put_with(&client, &at, blob_key(&d), body).await;
                    r.map(|()| len)
                });
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            let len = done.map_err(|e| format!("upload: {e}"))??;
            stats.uploaded += 1;
            stats.bytes += len;
            progress(stats.uploaded, total);
        }
        // Last: the manifest names only blobs that are there now.
        remote.put(image_key(name), img.manifest).await
    })?;
    Ok(stats)
}

impl Remote {
    /// A PUT from a task of its own (the client and location cloned in).
    async fn put_with(
        client: &aws_sdk_s3::Client,
        at: &Location,
        rel: String,
        body: Vec<u8>,
    ) -> Result<()> {
        client
            .put_object()
            .bucket(&at.bucket)
            .key(at.key(&rel))
            .body(ByteStream::from(body))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| format!("{at}/{rel}: {}", why(&e)))
    }
}

/// Downloads image `name` into `store` (`replace`: over an image of that
/// name); the blobs the store has are not fetched.
pub fn pull(
    store: &Store,
    name: &str,
    remote: &Remote,
    replace: bool,
) -> std::result::Result<ImportStats, PullError> {
    let manifest = remote.manifest(name)?;
    let wanted = strata_image::missing_blobs(store, &manifest).map_err(PullError::Store)?;
    // Import asks for blobs one at a time, in `wanted`'s order: keep
    // `PARALLEL` GETs ahead of it.
    let mut ahead = wanted.iter().copied();
    let mut running: HashMap<Digest, Download> = HashMap::new();
    let mut fetch = |d: &Digest| {
        while running.len() < PARALLEL {
            let Some(next) = ahead.next() else { break };
            let (client, at) = (remote.client.clone(), remote.at.clone());
            let task = async move { Remote::get_with(&client, &at, &blob_key(&next)).await };
            running.insert(next, remote.rt.spawn(task));
        }
        let got = match running.remove(d) {
            Some(task) => remote
                .rt
                .block_on(task)
                .map_err(|e| format!("download: {e}"))??,
            None => remote.get(&blob_key(d))?,
        };
        got.ok_or_else(|| format!("missing from {}", remote.at))
    };
    let stats = strata_image::import(store, name, &manifest, replace, Some(&mut fetch));
    // Fetched ahead and never asked for (the import failed): dropped.
    for task in running.into_values() {
        task.abort();
    }
    stats.map_err(PullError::Store)
}

/// A blob being downloaded ahead of the import.
type Download = tokio::task::JoinHandle<Result<Option<Vec<u8>>>>;

/// Makes image `name` of the remote known to `store` without its blobs
/// (they come when first read, through [`Remote`] as the store's
/// [`strata_image::Fetch`]); nothing happens if the store has the image.
pub fn pull_manifest(
    store: &Store,
    name: &str,
    remote: &Remote,
) -> std::result::Result<(), PullError> {
    match strata_image::Image::open(store, name) {
        Ok(_) => return Ok(()),
        Err(strata_image::Error::NoSuchImage(_)) => {}
        Err(e) => return Err(PullError::Store(e)),
    }
    let manifest = remote.manifest(name)?;
    match strata_image::import(store, name, &manifest, false, None) {
        // Another mount made it meanwhile.
        Ok(_) | Err(strata_image::Error::ImageExists(_)) => Ok(()),
        Err(e) => Err(PullError::Store(e)),
    }
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.at)
    }
}

impl strata_image::Fetch for Remote {
    fn fetch(&self, digest: &Digest) -> Result<Vec<u8>> {
        self.get(&blob_key(digest))?
            .ok_or_else(|| format!("missing from {}", self.at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_urls_are_checked() {
        let l = Location::parse("s3://envs/team/a/").unwrap();
        assert_eq!((l.bucket.as_str(), l.prefix.as_str()), ("envs", "team/a"));
        assert_eq!(l.key("images/x"), "team/a/images/x");
        assert_eq!(l.to_string(), "s3://envs/team/a");
        let root = Location::parse("s3://envs").unwrap();
        assert_eq!(root.key("blobs/ab/x"), "blobs/ab/x");
        for bad in [
            "envs/team",
            "s3://",
            "s3://E",
            "s3://ok-bucket/a/../b",
            "http://x/y",
        ] {
            assert!(Location::parse(bad).is_err(), "{bad}");
        }
    }
}
