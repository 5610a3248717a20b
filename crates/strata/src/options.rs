//! `-o key=value,...` mount options, parsed like mount(8) and mergerfs.
//! Which keys there are, their syntax and their help come from the one
//! option table, [`strata_core::options::OPTIONS`]: mount-only keys are
//! handled here, runtime keys by the union's [`Settings`] (which also serve
//! the control file).

use std::fmt::Write;
use std::path::PathBuf;

use strata_core::host::watch::CachePolicy;
use strata_core::options::{OPTIONS, OptionSpec, Scope};
use strata_core::union::Settings;

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
    /// The union-only keys given (not the cache timeouts, which every mode
    /// takes), in the order given: they make one directory a union of one
    /// branch, and are refused on an overlay.
    pub union_keys: Vec<String>,
    /// Writable upper directory over the lowers (copy-on-write overlay).
    pub upper: Option<PathBuf>,
    /// The workspace branch to show (with an upper).
    pub branch: Option<String>,
    /// Where image layers come from when the store lacks them.
    pub remote: Option<String>,
    pub remote_endpoint: Option<String>,
    /// Image store for `image:NAME` layers (default: `$STRATA_STORE`, ...).
    pub store: Option<PathBuf>,
    /// mount(8)'s generic flags for the FUSE mount.
    pub flags: MountFlags,
}

/// mount(8)'s generic flags. FUSE mounts default to nodev and nosuid;
/// mount.fuse3 passes `dev,suid` for root.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MountFlags {
    pub dev: bool,
    pub suid: bool,
    pub noexec: bool,
    pub atime: strata_fuse::Atime,
    pub sync: bool,
    pub dirsync: bool,
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
            union_keys: Vec::new(),
            upper: None,
            branch: None,
            remote: None,
            remote_endpoint: None,
            store: None,
            flags: MountFlags::default(),
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

/// The one-line error for a key the table does not have.
fn unknown(key: &str) -> String {
    let known: Vec<&str> = OPTIONS.iter().map(|o| o.key).collect();
    format!(
        "unknown mount option '{key}' (known: {}; `strata mount --help` says what each takes)",
        known.join(", ")
    )
}

/// Help text columns: options, then their help from here on.
const HELP_COLUMN: usize = 34;
const HELP_WIDTH: usize = 80;

/// The `-o` part of `strata mount --help`, from the option table: one
/// entry per option, its usage and its help, grouped by scope.
pub fn help() -> String {
    let mut out = String::new();
    for (scope, title) in [
        (
            Scope::Mount,
            "MOUNT OPTIONS (-o, comma separated, may repeat):",
        ),
        (
            Scope::Runtime,
            "RUNTIME OPTIONS (as -o, and on a union at runtime through `strata ctl` or\n\
             the xattrs of MOUNTPOINT/.strata):",
        ),
    ] {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(title);
        out.push('\n');
        for o in OPTIONS.iter().filter(|o| o.scope == scope) {
            entry(&mut out, o);
        }
    }
    out
}

/// `  usage   help`, the help wrapped at [`HELP_WIDTH`] in its column; a
/// usage too wide for its column puts the help on the next line.
fn entry(out: &mut String, o: &OptionSpec) {
    let usage = o.usage();
    let _ = write!(out, "  {usage}");
    let mut col = 2 + usage.len();
    if col + 1 >= HELP_COLUMN {
        out.push('\n');
        col = 0;
    }
    let mut line_start = true;
    for word in o.help.split_whitespace() {
        if !line_start && col + 1 + word.len() > HELP_WIDTH {
            out.push('\n');
            col = 0;
            line_start = true;
        }
        if line_start {
            out.push_str(&" ".repeat(HELP_COLUMN - col));
            col = HELP_COLUMN;
            line_start = false;
        } else {
            out.push(' ');
            col += 1;
        }
        out.push_str(word);
        col += word.len();
    }
    out.push('\n');
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
                // fstab's own keys (systemd's x-*, comments) are not ours.
                if key.starts_with("x-") || key == "comment" {
                    continue;
                }
                let spec = strata_core::options::find(key).ok_or_else(|| unknown(key))?;
                let need = || {
                    value.ok_or_else(|| format!("option '{key}' needs a value: {}", spec.usage()))
                };
                match key {
                    "allow_other" => {
                        o.allow_other = Some(value.map_or(Ok(true), |v| boolean(key, v))?)
                    }
                    "ro" => o.read_only = true,
                    "rw" => o.read_only = false,
                    "fsname" => o.fsname = Some(need()?.to_string()),
                    "threads" => o.threads = number(key, need()?, 1, 256)?,
                    "watch" => o.watch = boolean(key, need()?)?,
                    "nonempty" => o.nonempty = true,
                    // Permission checks are always the kernel's.
                    "default_permissions" => {}
                    "passthrough" => o.passthrough = value.map_or(Ok(true), |v| boolean(key, v))?,
                    "uring" => o.uring = value.map_or(Ok(true), |v| boolean(key, v))?,
                    "cache.fds" => o.fd_cache = number(key, need()?, 16, 1 << 24)?,
                    "readahead" => o.readahead_kib = number(key, need()?, 0, 1 << 20)? as u64,
                    "dev" | "nodev" => o.flags.dev = key == "dev",
                    "suid" | "nosuid" => o.flags.suid = key == "suid",
                    "exec" | "noexec" => o.flags.noexec = key == "noexec",
                    "atime" => o.flags.atime = strata_fuse::Atime::Default,
                    "noatime" => o.flags.atime = strata_fuse::Atime::No,
                    "relatime" => o.flags.atime = strata_fuse::Atime::Relative,
                    "strictatime" => o.flags.atime = strata_fuse::Atime::Strict,
                    "sync" | "async" => o.flags.sync = key == "sync",
                    "dirsync" => o.flags.dirsync = true,
                    "defaults" | "auto" | "noauto" | "user" | "nouser" | "users" | "nofail"
                    | "_netdev" => {}
                    "upper" => o.upper = Some(PathBuf::from(need()?)),
                    "branch" => o.branch = Some(need()?.to_string()),
                    "remote" => o.remote = Some(need()?.to_string()),
                    "remote.endpoint" => o.remote_endpoint = Some(need()?.to_string()),
                    "store" => o.store = Some(PathBuf::from(need()?)),
                    // The union's settings, the cache timeouts among them.
                    _ if spec.scope == Scope::Runtime => {
                        o.union
                            .set(key, need()?)
                            .map_err(|e| format!("option '{key}': {e}"))?;
                        if !key.starts_with("cache.") {
                            o.union_keys.push(key.to_string());
                        }
                    }
                    _ => return Err(format!("mount option '{key}' is not handled (a bug)")),
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
        // The cache timeouts are the union's settings, and every mode's.
        o.cache = o.union.cache;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use strata_core::options::Value;

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

    /// The option table and this parser cannot drift apart: every key of
    /// the table takes its sample value (a flag: no value), and a runtime
    /// key lands in the union's settings.
    #[test]
    fn every_key_of_the_table_is_accepted() {
        for o in OPTIONS {
            for k in o.keys() {
                let items = match o.value {
                    Value::Flag => vec![k.clone()],
                    Value::Optional(_) => vec![k.clone(), format!("{k}={}", o.sample)],
                    Value::Required(_) => vec![format!("{k}={}", o.sample)],
                };
                for item in items {
                    let parsed =
                        MountOptions::parse([item.as_str()]).unwrap_or_else(|e| panic!("{e}"));
                    if o.scope == Scope::Runtime {
                        let mut want = Settings::default();
                        want.set(&k, o.sample).unwrap();
                        assert_eq!(parsed.union.get(&k), want.get(&k), "{item}");
                    }
                }
                if let Value::Required(_) = o.value {
                    let err = MountOptions::parse([k.as_str()]).unwrap_err();
                    assert!(err.contains(&o.usage()), "{err}");
                }
            }
        }
        // Both spellings of a runtime key, and the timeouts' `auto`.
        let o = MountOptions::parse(["cache.negative_entry=2,cache.entry=auto"]).unwrap();
        assert_eq!(o.cache.negative, Some(Duration::from_secs(2)));
        assert_eq!(o.cache.entry, None);
    }

    #[test]
    fn an_unknown_key_is_one_line_naming_it_and_the_known_ones() {
        for item in ["bogus", "bogus=1", "func.nothing=ff", "allow-other"] {
            let key = item.split('=').next().unwrap();
            let err = MountOptions::parse(["ro", item]).unwrap_err();
            assert!(
                err.starts_with(&format!(
                    "unknown mount option '{key}' (known: allow_other, ro,"
                )),
                "{err}"
            );
            assert!(!err.contains('\n'), "{err}");
            assert!(OPTIONS.iter().all(|o| err.contains(o.key)), "{err}");
        }
    }

    #[test]
    fn help_lists_every_option_within_80_columns() {
        let help = help();
        let runtime = help.find("RUNTIME OPTIONS").unwrap();
        for o in OPTIONS {
            let at = help
                .find(&format!("  {} ", o.usage()))
                .or_else(|| help.find(&format!("  {}\n", o.usage())))
                .unwrap_or_else(|| panic!("{} missing:\n{help}", o.key));
            assert_eq!(at > runtime, o.scope == Scope::Runtime, "{}", o.key);
            let words: Vec<&str> = o.help.split_whitespace().collect();
            assert!(help[at..].contains(words[words.len() - 1]), "{}", o.key);
        }
        assert!(help.lines().all(|l| l.len() <= HELP_WIDTH), "{help}");
        // The defaults the help names are the code's.
        let help_of = |k| strata_core::options::find(k).unwrap().help;
        let fds = strata_core::host::DEFAULT_FD_CACHE.to_string();
        assert!(help_of("cache.fds").contains(&format!("default {fds}")));
        let readahead = format!("default {DEFAULT_READAHEAD_KIB}");
        assert!(help_of("readahead").contains(&readahead));
    }
}
