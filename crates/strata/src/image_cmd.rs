//! `strata image build|ls|verify|rm` and `strata gc`: the command line of the
//! image store (`strata-image`).
//!
//! Reports go to stdout; progress (only when stderr is a terminal) and errors
//! to stderr. Bad input (invalid or unknown image name, SRC not a directory,
//! an existing image without `--replace`) exits 2, run-time failures exit 1.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use clap::{Args, Subcommand};
use strata_image::{BuildOptions, Digest, Error, Image, Kind, RemoveOutcome, Store};

use crate::commands::{Failure, failure, usage};
use crate::output::outln;

/// `--store DIR`, shared by every store subcommand.
#[derive(Args, Debug)]
pub struct StoreArg {
    /// Image store directory [default: $STRATA_STORE, else /var/lib/strata as
    /// root, else $XDG_DATA_HOME/strata or ~/.local/share/strata].
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
}

impl StoreArg {
    pub fn root(&self) -> PathBuf {
        self.store.clone().unwrap_or_else(Store::default_root)
    }
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Build image NAME from the directory SRC (contents deduplicated against
    /// the whole store).
    #[command(
        after_help = "Symlinks inside SRC are stored as symlinks, never followed; \
        hard links stay hard links.\nPrints one summary line: entries by type, content bytes, \
        bytes newly stored (compressed), dedup hits, time."
    )]
    Build {
        /// Directory to build the image from.
        src: PathBuf,
        /// Image name: 1-255 bytes, no '/', not starting with '.'.
        #[arg(long)]
        name: String,
        /// Replace an existing image of that name (mounts of the old one keep working).
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List images: name, entries, content size, creation time (UTC).
    #[command(visible_alias = "list")]
    Ls {
        /// Machine-readable output: a JSON array.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Re-hash every blob of image NAME; report corrupt or missing ones with
    /// the paths that use them (exit 1 if any).
    Verify {
        name: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Remove image NAME; its blobs are freed by the next `strata gc`.
    #[command(visible_alias = "remove")]
    Rm {
        name: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Upload image NAME to an S3-compatible bucket: only the blobs it
    /// lacks, then the manifest (an interrupted push resumes). Endpoint,
    /// region and credentials as the AWS tools take them (AWS_ENDPOINT_URL,
    /// AWS_REGION, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, ~/.aws).
    Push {
        name: String,
        /// s3://BUCKET[/PREFIX]
        remote: String,
        /// S3 endpoint URL (e.g. http://127.0.0.1:9000 for MinIO).
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Download image NAME from a bucket into the store: only the blobs the
    /// store lacks, each checked, the image visible once all are there.
    Pull {
        name: String,
        /// s3://BUCKET[/PREFIX]
        remote: String,
        /// Replace a local image of that name.
        #[arg(long)]
        replace: bool,
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        #[command(flatten)]
        store: StoreArg,
    },
}

pub fn run(cmd: ImageCommand) -> Result<(), Failure> {
    match cmd {
        ImageCommand::Build {
            src,
            name,
            replace,
            store,
        } => build(&src, &name, replace, &store.root()),
        ImageCommand::Ls { json, store } => ls(json, &store.root()),
        ImageCommand::Verify { name, store } => verify(&name, &store.root()),
        ImageCommand::Rm { name, store } => rm(&name, &store.root()),
        ImageCommand::Push {
            name,
            remote,
            endpoint,
            store,
        } => push(&name, &remote, endpoint.as_deref(), &store.root()),
        ImageCommand::Pull {
            name,
            remote,
            replace,
            endpoint,
            store,
        } => pull(&name, &remote, replace, endpoint.as_deref(), &store.root()),
    }
}

fn open_remote(url: &str, endpoint: Option<&str>) -> Result<strata_remote::Remote, Failure> {
    strata_remote::Location::parse(url).map_err(usage)?;
    strata_remote::Remote::open(url, endpoint).map_err(failure)
}

fn push(name: &str, url: &str, endpoint: Option<&str>, root: &Path) -> Result<(), Failure> {
    let store = Store::open(root).map_err(fail)?;
    // A missing image is bad input, said before any request.
    strata_image::Image::open(&store, name).map_err(fail)?;
    let remote = open_remote(url, endpoint)?;
    let start = Instant::now();
    let mut meter = Meter::new();
    let stats = strata_remote::push(&store, name, &remote, &mut |done, total| {
        meter.show(done == total, || {
            format!("{} {done}/{total} blobs", bar(done, total))
        })
    })
    .map_err(|e| failure(printable(&e)))?;
    meter.clear();
    outln!(
        "pushed {name} to {}: {} blobs, {} uploaded ({}); {}",
        remote.location(),
        stats.blobs,
        stats.uploaded,
        human(stats.bytes),
        elapsed(start.elapsed())
    )?;
    Ok(())
}

fn pull(
    name: &str,
    url: &str,
    replace: bool,
    endpoint: Option<&str>,
    root: &Path,
) -> Result<(), Failure> {
    let store = Store::open(root).map_err(fail)?;
    let remote = open_remote(url, endpoint)?;
    let start = Instant::now();
    let stats = strata_remote::pull(&store, name, &remote, replace).map_err(|e| match e {
        strata_remote::PullError::Store(e) => fail(e),
        strata_remote::PullError::NoImage(m) => usage(printable(&m)),
        strata_remote::PullError::Remote(m) => failure(printable(&m)),
    })?;
    outln!(
        "pulled {name} from {}: {} blobs fetched ({}), {} already here; {}",
        remote.location(),
        stats.fetched,
        human(stats.bytes),
        stats.present,
        elapsed(start.elapsed())
    )?;
    Ok(())
}

/// A store error as a one-line failure: naming problems are bad input.
fn fail(e: Error) -> Failure {
    match &e {
        Error::ImageExists(name) => usage(format!(
            "image {name:?} already exists (use --replace to replace it)"
        )),
        Error::InvalidName(_) | Error::NoSuchImage(_) => usage(printable(&e.to_string())),
        _ => failure(printable(&e.to_string())),
    }
}

/// Control characters (a newline in a file name) escaped, so every report
/// and error stays on one line.
fn printable(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// Opens the store at `root`; `None` when it does not exist and `create` is
/// false (reading commands leave no empty store behind).
fn open_store(root: &Path, create: bool) -> Result<Option<Store>, Failure> {
    match std::fs::metadata(root) {
        Ok(md) if !md.is_dir() => {
            return Err(usage(format!(
                "{}: store is not a directory",
                printable(&root.display().to_string())
            )));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(failure(format!("{}: {e}", root.display()))),
    }
    Store::open(root).map(Some).map_err(fail)
}

/// The store for commands that need an existing image.
fn store_with(root: &Path, name: &str) -> Result<Store, Failure> {
    open_store(root, false)?.ok_or_else(|| {
        usage(format!(
            "no image named {:?}: the store {} does not exist",
            printable(name),
            printable(&root.display().to_string())
        ))
    })
}

/// "1.5 MiB": binary units, one decimal from KiB on, exact bytes below.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn elapsed(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 60.0 {
        format!("{s:.2}s")
    } else {
        let s = d.as_secs();
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

/// ISO-8601 UTC, to the second: `2026-08-10T14:03:22Z`.
fn iso8601(t: SystemTime) -> String {
    let secs = match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
    };
    iso8601_secs(secs)
}

/// [`iso8601`] of seconds since the epoch.
pub fn iso8601_secs(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A progress line on stderr, redrawn in place at most ten times a second;
/// silent unless stderr is a terminal.
struct Meter {
    on: bool,
    last: Option<Instant>,
    drawn: bool,
}

impl Meter {
    fn new() -> Meter {
        Meter {
            on: std::io::stderr().is_terminal(),
            last: None,
            drawn: false,
        }
    }

    fn show(&mut self, force: bool, line: impl FnOnce() -> String) {
        if !self.on {
            return;
        }
        let now = Instant::now();
        if !force
            && self
                .last
                .is_some_and(|t| now - t < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(now);
        self.drawn = true;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[K{}", line());
        let _ = err.flush();
    }

    fn clear(&mut self) {
        if self.drawn {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.drawn = false;
        }
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.clear();
    }
}

fn bar(done: u64, total: u64) -> String {
    const W: u64 = 24;
    let filled = (done.min(total) * W).checked_div(total).unwrap_or(W);
    format!(
        "[{}{}] {:>3}%",
        "#".repeat(filled as usize),
        " ".repeat((W - filled) as usize),
        (done.min(total) * 100).checked_div(total).unwrap_or(100)
    )
}

pub fn build(src: &Path, name: &str, replace: bool, root: &Path) -> Result<(), Failure> {
    let shown = printable(&src.display().to_string());
    match std::fs::metadata(src) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => return Err(usage(format!("{shown}: not a directory"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(usage(format!("{shown}: no such directory")));
        }
        Err(e) => return Err(usage(format!("{shown}: {e}"))),
    }
    let store = open_store(root, true)?.expect("created");
    let mut meter = Meter::new();
    meter.show(true, || format!("scanning {shown} ..."));
    let start = Instant::now();
    let stats = strata_image::build(
        &store,
        src,
        name,
        BuildOptions { replace },
        &mut |p: &strata_image::Progress| {
            meter.show(p.files_done == p.files_total, || {
                let secs = start.elapsed().as_secs_f64().max(1e-3);
                format!(
                    "{} {}/{} files  {}/{}  {}/s",
                    bar(p.bytes_done, p.bytes_total),
                    p.files_done,
                    p.files_total,
                    human(p.bytes_done),
                    human(p.bytes_total),
                    human((p.bytes_done as f64 / secs) as u64)
                )
            })
        },
    )
    .map_err(fail)?;
    meter.clear();
    let mut files = count(stats.files, "file", "files");
    if stats.hardlinks > 0 {
        files += &format!(" ({})", count(stats.hardlinks, "hard link", "hard links"));
    }
    let others = if stats.others > 0 {
        format!(", {}", count(stats.others, "other", "others"))
    } else {
        String::new()
    };
    outln!(
        "built image {}: {files}, {}, {}{others}; {} content, {} stored, {}; {}",
        printable(name),
        count(stats.dirs, "dir", "dirs"),
        count(stats.symlinks, "symlink", "symlinks"),
        human(stats.bytes),
        human(stats.stored_bytes),
        count(stats.dedup_hits, "dedup hit", "dedup hits"),
        elapsed(stats.elapsed)
    )?;
    Ok(())
}

fn ls(json: bool, root: &Path) -> Result<(), Failure> {
    let images = match open_store(root, false)? {
        Some(store) => strata_image::list_images(&store).map_err(fail)?,
        None => Vec::new(),
    };
    if json {
        let rows: Vec<serde_json::Value> = images
            .iter()
            .map(|(name, info)| match info {
                Ok(i) => serde_json::json!({
                    "name": name,
                    "entries": i.entries,
                    "total_size": i.total_size,
                    "created": iso8601(i.created),
                    "created_unix_ns": i.created
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |d| d.as_nanos() as u64),
                    "manifest_bytes": i.manifest_bytes,
                }),
                Err(e) => serde_json::json!({ "name": name, "error": e.to_string() }),
            })
            .collect();
        outln!(
            "{}",
            serde_json::to_string_pretty(&rows).expect("serializable")
        )?;
        return Ok(());
    }
    if images.is_empty() {
        outln!("no images in {}", printable(&root.display().to_string()))?;
        return Ok(());
    }
    let width = images
        .iter()
        .map(|(n, _)| printable(n).chars().count())
        .max()
        .unwrap_or(0)
        .max(4);
    outln!(
        "{:<width$}  {:>9}  {:>10}  CREATED (UTC)",
        "NAME",
        "ENTRIES",
        "SIZE"
    )?;
    for (name, info) in &images {
        let name = printable(name);
        match info {
            Ok(i) => outln!(
                "{name:<width$}  {:>9}  {:>10}  {}",
                i.entries,
                human(i.total_size),
                iso8601(i.created)
            )?,
            Err(e) => outln!(
                "{name:<width$}  {:>9}  {:>10}  unreadable: {}",
                "-",
                "-",
                printable(&e.to_string())
            )?,
        }
    }
    Ok(())
}

/// Image paths (`/dir/file`) of the regular files whose blob is in `wanted`,
/// from one breadth-first walk of the manifest.
fn paths_of(img: &Image, wanted: &HashSet<Digest>) -> Result<HashMap<Digest, Vec<String>>, Error> {
    let mut out: HashMap<Digest, Vec<String>> = HashMap::new();
    let mut queue = VecDeque::from([(img.root()?, String::new())]);
    while let Some((dir, path)) = queue.pop_front() {
        for child in img.children(&dir) {
            let child = child?;
            let name = || format!("{path}/{}", String::from_utf8_lossy(img.entry_name(&child)));
            match child.kind {
                Kind::Dir => queue.push_back((child, name())),
                Kind::File => {
                    if let Some(d) = img.blob(&child).filter(|d| wanted.contains(d)) {
                        out.entry(d).or_default().push(name());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// At most this many paths are printed per failing blob.
const MAX_PATHS: usize = 20;

fn verify(name: &str, root: &Path) -> Result<(), Failure> {
    let store = store_with(root, name)?;
    let img = Image::open(&store, name).map_err(fail)?;
    let digests: Vec<Digest> = img.digests().collect();
    let mut meter = Meter::new();
    let mut failures = Vec::new();
    for (i, d) in digests.iter().enumerate() {
        meter.show(false, || {
            format!(
                "{} {i}/{} blobs",
                bar(i as u64, digests.len() as u64),
                digests.len()
            )
        });
        if let Err(e) = store.verify(d) {
            failures.push((*d, e));
        }
    }
    meter.clear();
    let shown = printable(name);
    if failures.is_empty() {
        outln!(
            "{shown}: {} OK",
            count(digests.len() as u64, "blob", "blobs")
        )?;
        return Ok(());
    }
    let wanted: HashSet<Digest> = failures.iter().map(|f| f.0).collect();
    let paths = paths_of(&img, &wanted).map_err(fail)?;
    for (d, e) in &failures {
        let reason = match e {
            Error::MissingBlob(_) => "missing".to_owned(),
            Error::CorruptBlob { reason, .. } => format!("corrupt ({reason})"),
            other => format!("unreadable ({other})"),
        };
        let used = paths.get(d).map(Vec::as_slice).unwrap_or_default();
        let mut list: Vec<String> = used.iter().take(MAX_PATHS).map(|p| printable(p)).collect();
        if used.len() > MAX_PATHS {
            list.push(format!("and {} more", used.len() - MAX_PATHS));
        }
        outln!("{d}: {}; used by {}", printable(&reason), list.join(", "))?;
    }
    Err(failure(format!(
        "{shown}: {} of {} corrupt or missing",
        failures.len(),
        count(digests.len() as u64, "blob", "blobs")
    )))
}

fn rm(name: &str, root: &Path) -> Result<(), Failure> {
    let store = store_with(root, name)?;
    let shown = printable(name);
    match strata_image::remove_image(&store, name).map_err(fail)? {
        RemoveOutcome::Removed => outln!("removed image {shown} (`strata gc` frees its blobs)")?,
        RemoveOutcome::Deferred => outln!(
            "image {shown} is in use (mounted): removed from the list now; \
             its blobs are kept until the last mount of it ends, then `strata gc` frees them"
        )?,
    }
    Ok(())
}

/// `strata gc`: frees what no image uses.
pub fn gc(store: &StoreArg) -> Result<(), Failure> {
    let root = store.root();
    let Some(store) = open_store(&root, false)? else {
        outln!(
            "no store at {}: nothing to collect",
            printable(&root.display().to_string())
        )?;
        return Ok(());
    };
    let st = strata_image::gc(&store).map_err(|e| {
        // An unreadable manifest stops gc before it deletes any blob.
        let what = if matches!(e, Error::BadManifest { .. }) {
            "gc stopped before deleting any blob"
        } else {
            "gc"
        };
        let mut f = fail(e);
        f.message = format!("{what}: {}", f.message);
        f
    })?;
    outln!(
        "blobs:     removed {} ({}), kept {}",
        st.blobs_removed,
        human(st.bytes_removed),
        st.blobs_kept
    )?;
    outln!(
        "manifests: removed {} retired, {} still pinned by a mount (their blobs kept)",
        st.manifests_removed,
        st.manifests_pinned
    )?;
    // Archive indexes kept for the next mount: those no mount read for a month.
    let month = std::time::Duration::from_secs(30 * 86_400);
    let dir = root.join("archive-index");
    let (n, bytes) = strata_archive::prune_kept_indexes(&dir, month)
        .map_err(|e| failure(format!("{}: {e}", dir.display())))?;
    outln!(
        "archive indexes: removed {n} ({}) unused for 30 days",
        human(bytes)
    )?;
    outln!(
        "cache:     removed {} ({}), kept {}",
        count(st.cache_removed, "file", "files"),
        human(st.cache_bytes_removed),
        st.cache_kept
    )?;
    outln!(
        "tmp:       removed {}",
        count(st.tmp_removed, "stale staging file", "stale staging files")
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso8601_dates() {
        let at = |s: u64| iso8601(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(4_102_444_799), "2099-12-31T23:59:59Z");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(5 << 30), "5.0 GiB");
    }

    #[test]
    fn printable_escapes_controls() {
        assert_eq!(printable("a\nb"), "a\\nb");
        assert_eq!(printable("plain é"), "plain é");
    }
}
