//! Every mount option, in one table: the CLI's `-o` parser checks keys
//! against it and builds its help and error messages from it, and the
//! union's runtime [`Settings`](crate::union::Settings) accept and list
//! exactly its [`Scope::Runtime`] keys (the control file `/.strata` and
//! `strata ctl` with them). A new option is added here first; the tests of
//! both parsers then fail until they handle it.

use crate::union::policy::Func;
use Value::{Flag, Optional, Required};

/// When an option can be set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Only when mounting (`-o`).
    Mount,
    /// When mounting, and at runtime on a union through its control file.
    Runtime,
}

/// What follows the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value {
    /// Nothing: `nonempty`.
    Flag,
    /// Optional: `passthrough` means `passthrough=true`.
    Optional(&'static str),
    /// Required: `threads=N`.
    Required(&'static str),
}

/// One option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionSpec {
    /// The key; [`FUNC_KEY`] stands for one key per function.
    pub key: &'static str,
    /// The value's syntax, as help shows it.
    pub value: Value,
    /// A valid value, for tests ("" for a flag).
    pub sample: &'static str,
    /// One line of help, with the default.
    pub help: &'static str,
    pub scope: Scope,
}

/// The table entry for the per-function policy keys, `func.getattr=...`.
pub const FUNC_KEY: &str = "func.NAME";

const fn mount(
    key: &'static str,
    value: Value,
    sample: &'static str,
    help: &'static str,
) -> OptionSpec {
    OptionSpec {
        key,
        value,
        sample,
        help,
        scope: Scope::Mount,
    }
}

const fn runtime(
    key: &'static str,
    syntax: &'static str,
    sample: &'static str,
    help: &'static str,
) -> OptionSpec {
    OptionSpec {
        key,
        value: Value::Required(syntax),
        sample,
        help,
        scope: Scope::Runtime,
    }
}

const BOOL: &str = "true|false";

/// Every option, in the order help lists them.
pub const OPTIONS: &[OptionSpec] = &[
    mount(
        "allow_other",
        Optional(BOOL),
        "false",
        "let other users in (default: on when run as root)",
    ),
    mount("ro", Flag, "", "read-only mount"),
    mount("rw", Flag, "", "read-write mount (the default)"),
    mount(
        "fsname",
        Required("NAME"),
        "pool",
        "source name shown in the mount table (default: SOURCE)",
    ),
    mount(
        "threads",
        Required("N"),
        "4",
        "request worker threads (default: cores, at least 2)",
    ),
    mount(
        "watch",
        Required(BOOL),
        "false",
        "watch the source for changes made outside the mount and drop the \
         kernel's stale entries at once (fanotify; needs root; default true)",
    ),
    mount(
        "passthrough",
        Optional(BOOL),
        "false",
        "kernel passthrough for file I/O (default true)",
    ),
    mount(
        "uring",
        Optional(BOOL),
        "false",
        "per-CPU io_uring request queues when the kernel offers them \
         (Linux 6.14+, fuse enable_uring=Y; default true)",
    ),
    mount(
        "cache.fds",
        Required("N"),
        "1024",
        "bound on cached O_PATH descriptors (default 8192)",
    ),
    mount(
        "readahead",
        Required("KIB"),
        "0",
        "kernel readahead for reads served by the daemon (default 1024; \
         0 keeps the kernel's 128; needs root)",
    ),
    mount(
        "upper",
        Required("DIR"),
        "/var/tmp/up",
        "writable upper directory over the layers (as --upper)",
    ),
    mount(
        "branch",
        Required("NAME"),
        "main",
        "with an upper: the workspace branch the mount shows (default: the \
         workspace's current branch; `strata branch`)",
    ),
    mount(
        "remote",
        Required("URL"),
        "s3://envs/team",
        "image:NAME layers from this S3-compatible bucket: the manifest is \
         fetched at mount if the store lacks it, each blob when first read",
    ),
    mount(
        "remote.endpoint",
        Required("URL"),
        "http://127.0.0.1:9000",
        "S3 endpoint for remote= (default: AWS_ENDPOINT_URL, else AWS's)",
    ),
    mount(
        "store",
        Required("DIR"),
        "/var/tmp/store",
        "image store for image:NAME layers (default: $STRATA_STORE, else \
         /var/lib/strata for root)",
    ),
    mount("nonempty", Flag, "", "allow a non-empty mountpoint"),
    mount(
        "default_permissions",
        Flag,
        "",
        "accepted; permission checks are always the kernel's",
    ),
    // mount(8)'s generic flags, as mount.fuse3 and fstab pass them.
    mount(
        "dev",
        Flag,
        "",
        "device files work (mount.fuse3 passes it for root)",
    ),
    mount("nodev", Flag, "", "device files do not open (the default)"),
    mount(
        "suid",
        Flag,
        "",
        "setuid/setgid bits take effect (mount.fuse3 passes it for root)",
    ),
    mount(
        "nosuid",
        Flag,
        "",
        "setuid/setgid bits are ignored (the default)",
    ),
    mount("exec", Flag, "", "programs run (the default)"),
    mount("noexec", Flag, "", "programs do not run"),
    mount(
        "atime",
        Flag,
        "",
        "the kernel's default access-time mode (relatime)",
    ),
    mount(
        "noatime",
        Flag,
        "",
        "no access times: not on the mount, and files the daemon serves leave \
         the host's untouched (kernel passthrough reads follow the host \
         mount's atime mode)",
    ),
    mount(
        "relatime",
        Flag,
        "",
        "access times updated when older than the modification",
    ),
    mount(
        "strictatime",
        Flag,
        "",
        "access times updated on every access",
    ),
    mount("sync", Flag, "", "writes are synchronous"),
    mount("async", Flag, "", "writes are asynchronous (the default)"),
    mount("dirsync", Flag, "", "directory changes are synchronous"),
    mount("defaults", Flag, "", "fstab: accepted, nothing to do"),
    mount("auto", Flag, "", "fstab: ignored (mount -a's business)"),
    mount("noauto", Flag, "", "fstab: ignored (mount -a's business)"),
    mount("user", Flag, "", "fstab: ignored"),
    mount("nouser", Flag, "", "fstab: ignored"),
    mount("users", Flag, "", "fstab: ignored"),
    mount("nofail", Flag, "", "fstab: ignored (mount(8)'s business)"),
    mount("_netdev", Flag, "", "fstab: ignored (systemd's business)"),
    runtime(
        "cache.entry",
        "SECS|auto",
        "2.5",
        "kernel name cache timeout (default auto: 3600 on a watched host \
         filesystem, 1 otherwise)",
    ),
    runtime(
        "cache.attr",
        "SECS|auto",
        "0",
        "kernel attribute cache timeout (default auto, as cache.entry)",
    ),
    runtime(
        "cache.negative-entry",
        "SECS|auto",
        "0",
        "kernel cache timeout for missing names (default auto: as \
         cache.entry, but none in an unwatched union)",
    ),
    runtime(
        "category.create",
        "POLICY",
        "mfs",
        "union policy that places new names (default pfrd)",
    ),
    runtime(
        "category.action",
        "POLICY",
        "all",
        "union policy for changes to existing names: unlink, chmod, \
         rename, ... (default epall)",
    ),
    runtime(
        "category.search",
        "POLICY",
        "newest",
        "union policy that finds names: getattr, open, readlink, ... \
         (default ff)",
    ),
    runtime(
        FUNC_KEY,
        "POLICY",
        "ff",
        "one function's policy over its category's (NAME: getattr, mkdir, \
         ...; `strata ctl MOUNTPOINT list` shows them)",
    ),
    runtime(
        "minfreespace",
        "SIZE",
        "10G",
        "free space a branch needs to take new files (default 4G; per \
         branch: PATH=RW,SIZE)",
    ),
    runtime(
        "inodecalc",
        "passthrough|path-hash[32]|devino-hash[32]|hybrid-hash[32]",
        "path-hash32",
        "how inode numbers are made; 32: a 32-bit hash (default hybrid-hash)",
    ),
    runtime(
        "statfs",
        "base|full",
        "full",
        "statfs sums every branch, or with full only those holding the path \
         (default base)",
    ),
    runtime(
        "statfs-ignore",
        "none|ro|nc",
        "ro",
        "branches left out of statfs sums (default none)",
    ),
    runtime(
        "xattr",
        "passthrough|noattr|nosys",
        "noattr",
        "extended attributes: passed through, none, or unsupported so the \
         kernel stops asking (default passthrough)",
    ),
    runtime(
        "moveonenospc",
        "true|false|POLICY",
        "mfs",
        "a write that finds its branch full moves the file to a branch the \
         policy picks and retries (true: mfs; default false)",
    ),
    runtime(
        "link-cow",
        BOOL,
        "true",
        "opening a hard-linked file for writing first gives the name its \
         own copy (default false)",
    ),
    runtime(
        "symlinkify",
        BOOL,
        "true",
        "files nobody can write, unchanged for symlinkify-timeout, show as \
         symlinks to their branch path (default false)",
    ),
    runtime(
        "symlinkify-timeout",
        "SECS",
        "60",
        "see symlinkify (default 3600)",
    ),
    runtime(
        "nullrw",
        BOOL,
        "true",
        "reads and writes succeed without touching data, to measure \
         overhead (default false)",
    ),
    runtime(
        "dropcacheonclose",
        BOOL,
        "true",
        "drop a file's host page cache when it is closed (default false)",
    ),
    runtime(
        "follow-symlinks",
        "never|directory|regular|all",
        "directory",
        "symlinks that show as what they point to, inside their branch \
         (default never)",
    ),
    runtime(
        "link-exdev",
        "passthrough|rel-symlink|abs-base-symlink|abs-pool-symlink",
        "rel-symlink",
        "a link that path preservation refuses (EXDEV) leaves a symlink \
         instead (default passthrough)",
    ),
    runtime(
        "rename-exdev",
        "passthrough|rel-symlink|abs-symlink",
        "abs-symlink",
        "such a rename parks the file under .mergerfs_rename_exdev/ and \
         leaves a symlink to it (default passthrough)",
    ),
];

impl OptionSpec {
    /// How help shows the option: `nonempty`, `uring[=true|false]`,
    /// `threads=N`.
    pub fn usage(&self) -> String {
        match self.value {
            Flag => self.key.to_string(),
            Optional(s) => format!("{}[={s}]", self.key),
            Required(s) => format!("{}={s}", self.key),
        }
    }

    /// The keys this entry stands for: its own, or for [`FUNC_KEY`] one
    /// per function (`func.access`, `func.chmod`, ...).
    pub fn keys(&self) -> Vec<String> {
        if self.key == FUNC_KEY {
            Func::ALL
                .iter()
                .map(|f| format!("func.{}", f.name()))
                .collect()
        } else {
            vec![self.key.to_string()]
        }
    }
}

/// The entry for `key`. Runtime keys are spelled as mergerfs does, with `-`
/// or `_` alike (`cache.negative_entry`); mount-only keys exactly.
pub fn find(key: &str) -> Option<&'static OptionSpec> {
    let dashed = key.replace('_', "-");
    let runtime = |o: &&OptionSpec| o.scope == Scope::Runtime;
    if let Some(name) = dashed.strip_prefix("func.") {
        return Func::from_name(name)
            .and(OPTIONS.iter().find(|o| o.key == FUNC_KEY))
            .filter(runtime);
    }
    OPTIONS
        .iter()
        .find(|o| o.key == key)
        .or_else(|| OPTIONS.iter().filter(runtime).find(|o| o.key == dashed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_samples_match_values() {
        let mut seen = std::collections::BTreeSet::new();
        for o in OPTIONS {
            assert!(seen.insert(o.key), "{} listed twice", o.key);
            assert_eq!(o.value == Flag, o.sample.is_empty(), "{}", o.key);
            assert!(!o.help.is_empty() && !o.help.contains('\n'), "{}", o.key);
            for k in o.keys() {
                assert_eq!(find(&k).map(|f| f.key), Some(o.key));
            }
        }
    }

    #[test]
    fn find_spellings() {
        assert_eq!(
            find("cache.negative_entry").unwrap().key,
            "cache.negative-entry"
        );
        assert_eq!(find("statfs_ignore").unwrap().key, "statfs-ignore");
        assert_eq!(find("func.getattr").unwrap().key, FUNC_KEY);
        assert_eq!(find("allow_other").unwrap().key, "allow_other");
        // Mount-only keys have one spelling, and func.NAME is no key itself.
        assert!(find("allow-other").is_none());
        assert!(find("func.nothing").is_none());
        assert!(find(FUNC_KEY).is_none());
        assert!(find("bogus").is_none());
    }

    #[test]
    fn usage_shows_the_value() {
        let usage = |k| find(k).unwrap().usage();
        assert_eq!(usage("nonempty"), "nonempty");
        assert_eq!(usage("uring"), "uring[=true|false]");
        assert_eq!(usage("threads"), "threads=N");
        assert_eq!(usage("func.open"), "func.NAME=POLICY");
    }
}
