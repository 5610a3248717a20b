//! `-o key=value,...` mount options, parsed like mount(8) and mergerfs.

use std::path::PathBuf;
use std::time::Duration;

use strata_core::host::watch::CachePolicy;
use strata_core::union::Settings;

/// Union options, handed to the union's own settings (which also serve the
/// control file). The cache timeouts are common options, handled here.
fn is_union_key(key: &str) -> bool {
    Settings::is_key(key) && !key.starts_with("cache.")
}

#[derive(Clone, Debug, PartialEq)]
pub struct MountOptions {
    pub allow_other: Option<bool>,
    pub read_only: bool,
    pub fsname: Option<String>,
    pub threads: usize,
    /// Kernel cache timeouts; unset: long on watched hosts, 1 s otherwise.
    pub cache: CachePolicy,
    pub watch: bool,
    pub nonempty: bool,
    pub passthrough: bool,
    /// FUSE over io_uring when the kernel offers it.
    pub uring: bool,
    pub fd_cache: usize,
    /// Kernel readahead for the mount, KiB (0: the kernel's default).
    pub readahead_kib: u64,
    /// Union settings (policies, minfreespace, ...); used with several branches.
    pub union: Settings,
    /// Writable upper directory over the lowers (copy-on-write overlay).
    pub upper: Option<PathBuf>,
    /// Image store for `image:NAME` layers (default: `$STRATA_STORE`, ...).
    pub store: Option<PathBuf>,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: None,
            read_only: false,
            fsname: None,
            threads: default_threads(),
            cache: CachePolicy::default(),
            watch: true,
            nonempty: false,
            passthrough: true,
            uring: true,
            fd_cache: strata_core::host::DEFAULT_FD_CACHE,
            readahead_kib: DEFAULT_READAHEAD_KIB,
            union: Settings::default(),
            upper: None,
            store: None,
        }
    }
}

/// Readahead where reads go through the daemon (overlay lowers, images
/// under an upper, `passthrough=false`): one maximal (1 MiB) READ request
/// instead of eight of the kernel's default 128 KiB. Passthrough files use
/// their backing file's own readahead.
pub const DEFAULT_READAHEAD_KIB: u64 = 1024;

/// One worker per core, at least two so a slow request never stalls the mount.
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(2, 16)
}

/// The option names `-o` accepts, for help and error messages.
pub const KNOWN: &[&str] = &[
    "allow_other",
    "ro",
    "rw",
    "fsname=NAME",
    "threads=N",
    "cache.entry=SECS",
    "cache.attr=SECS",
    "cache.negative-entry=SECS",
    "watch=true|false",
    "nonempty",
    "default_permissions",
    "passthrough=true|false",
    "uring=true|false",
    "cache.fds=N",
    "readahead=KIB",
    "upper=DIR",
    "store=DIR",
    "category.create|action|search=POLICY",
    "func.FUNCTION=POLICY",
    "minfreespace=SIZE",
    "inodecalc=MODE",
    "statfs=base|full",
    "statfs-ignore=none|ro|nc",
    "xattr=passthrough|noattr|nosys",
    "moveonenospc=true|false|POLICY",
    "link-cow=BOOL",
    "symlinkify=BOOL",
    "symlinkify-timeout=SECS",
    "nullrw=BOOL",
    "dropcacheonclose=BOOL",
    "follow-symlinks=never|directory|regular|all",
    "link-exdev=passthrough|rel-symlink|abs-base-symlink|abs-pool-symlink",
    "rename-exdev=passthrough|rel-symlink|abs-symlink",
];

fn seconds(key: &str, v: &str) -> Result<Duration, String> {
    strata_core::union::settings::seconds(v).map_err(|e| format!("option '{key}': {e}"))
}

fn boolean(key: &str, v: &str) -> Result<bool, String> {
    strata_core::union::settings::boolean(v).map_err(|e| format!("option '{key}': {e}"))
}

fn number(key: &str, v: &str, min: usize, max: usize) -> Result<usize, String> {
    let n: usize = v
        .parse()
        .map_err(|_| format!("option '{key}': '{v}' is not a whole number"))?;
    if n < min || n > max {
        return Err(format!("option '{key}': {n} is outside {min}..={max}"));
    }
    Ok(n)
}

impl MountOptions {
    /// Parses the comma-separated lists given with `-o` (several `-o` add up).
    pub fn parse<'a>(lists: impl IntoIterator<Item = &'a str>) -> Result<MountOptions, String> {
        let mut o = MountOptions::default();
        for list in lists {
            for item in list.split(',').filter(|s| !s.is_empty()) {
                let (key, value) = match item.split_once('=') {
                    Some((k, v)) => (k, Some(v)),
                    None => (item, None),
                };
                let need =
                    || value.ok_or_else(|| format!("option '{key}' needs a value: {key}=..."));
                match key {
                    "allow_other" => {
                        o.allow_other = Some(value.map_or(Ok(true), |v| boolean(key, v))?)
                    }
                    "ro" => o.read_only = true,
                    "rw" => o.read_only = false,
                    "fsname" => o.fsname = Some(need()?.to_string()),
                    "threads" => o.threads = number(key, need()?, 1, 256)?,
                    "cache.entry" => o.cache.entry = Some(seconds(key, need()?)?),
                    "cache.attr" => o.cache.attr = Some(seconds(key, need()?)?),
                    "cache.negative-entry" | "cache.negative_entry" => {
                        o.cache.negative = Some(seconds(key, need()?)?)
                    }
                    "watch" => o.watch = boolean(key, need()?)?,
                    "nonempty" => o.nonempty = true,
                    // Permission checks are always the kernel's.
                    "default_permissions" => {}
                    "passthrough" => o.passthrough = value.map_or(Ok(true), |v| boolean(key, v))?,
                    "uring" => o.uring = value.map_or(Ok(true), |v| boolean(key, v))?,
                    "cache.fds" => o.fd_cache = number(key, need()?, 16, 1 << 24)?,
                    "readahead" => o.readahead_kib = number(key, need()?, 0, 1 << 20)? as u64,
                    "upper" => o.upper = Some(PathBuf::from(need()?)),
                    "store" => o.store = Some(PathBuf::from(need()?)),
                    k if is_union_key(k) => o
                        .union
                        .set(k, need()?)
                        .map_err(|e| format!("option '{key}': {e}"))?,
                    _ => {
                        return Err(format!(
                            "unknown mount option '{item}' (known: {})",
                            KNOWN.join(", ")
                        ));
                    }
                }
            }
        }
        if o.read_only
            && let Some(up) = &o.upper
        {
            return Err(format!(
                "options 'ro' and 'upper={}' contradict: an upper only takes writes; drop one",
                up.display()
            ));
        }
        // The cache timeouts apply to the union too.
        o.union.cache = o.cache;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let o = MountOptions::parse([]).unwrap();
        assert_eq!(o, MountOptions::default());
        assert!(o.threads >= 2);
    }

    #[test]
    fn values_are_parsed() {
        let o = MountOptions::parse([
            "allow_other,ro,fsname=pool",
            "threads=8,cache.entry=2.5,cache.attr=0,cache.negative-entry=0",
        ])
        .unwrap();
        assert_eq!(o.allow_other, Some(true));
        assert!(o.read_only);
        assert_eq!(o.fsname.as_deref(), Some("pool"));
        assert_eq!(o.threads, 8);
        assert_eq!(o.cache.entry, Some(Duration::from_millis(2500)));
        assert_eq!(o.cache.attr, Some(Duration::ZERO));
        assert_eq!(o.cache.negative, Some(Duration::ZERO));
        assert_eq!(o.union.cache, o.cache);
    }

    #[test]
    fn errors_name_the_option() {
        assert!(
            MountOptions::parse(["bogus"])
                .unwrap_err()
                .contains("unknown mount option 'bogus'")
        );
        assert!(
            MountOptions::parse(["threads=x"])
                .unwrap_err()
                .contains("'threads'")
        );
        assert!(
            MountOptions::parse(["threads=0"])
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            MountOptions::parse(["cache.entry"])
                .unwrap_err()
                .contains("needs a value")
        );
        assert!(
            MountOptions::parse(["ro", "upper=/u"])
                .unwrap_err()
                .contains("'ro' and 'upper=/u' contradict")
        );
        assert!(MountOptions::parse(["ro,rw", "upper=/u"]).is_ok());
        assert!(
            MountOptions::parse(["minfreespace=lots"])
                .unwrap_err()
                .contains("option 'minfreespace': bad size 'lots'")
        );
        assert!(
            MountOptions::parse(["passthrough=maybe"])
                .unwrap_err()
                .contains("true or false")
        );
    }
}
