//! Union options that can change at runtime: one parser shared by the `-o`
//! mount options and the control file's `user.strata.*` xattrs, so both
//! accept and reject exactly the same things. Which keys there are is the
//! [`Scope::Runtime`] part of the option table, [`crate::options::OPTIONS`].

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::policy::{Category, Func, Policy};
use crate::host::watch::CachePolicy;
use crate::options::{OPTIONS, Scope};
use crate::source::parse_size;

/// How node ids (and so `st_ino`) are computed, as mergerfs's `inodecalc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InodeCalc {
    Passthrough,
    PathHash,
    PathHash32,
    DevinoHash,
    DevinoHash32,
    HybridHash,
    HybridHash32,
}

/// `statfs=`: sum the branches' filesystems, or only those holding the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatfsMode {
    Base,
    Full,
}

/// `statfs-ignore=`: branches left out of statfs sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatfsIgnore {
    None,
    Ro,
    Nc,
}

/// `xattr=`: pass extended attributes through, report none, or tell the
/// kernel they are unsupported (it then stops asking: no round trips).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrMode {
    Passthrough,
    NoAttr,
    NoSys,
}

macro_rules! names {
    ($ty:ident { $($v:ident => $s:literal),* $(,)? }) => {
        impl $ty {
            const NAMES: &'static [($ty, &'static str)] = &[$(($ty::$v, $s)),*];
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let name = $ty::NAMES.iter().find(|(v, _)| v == self).map(|(_, s)| *s);
                f.write_str(name.unwrap_or("?"))
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<$ty, String> {
                $ty::NAMES.iter().find(|(_, n)| *n == s).map(|(v, _)| *v).ok_or_else(|| {
                    let valid: Vec<&str> = $ty::NAMES.iter().map(|(_, n)| *n).collect();
                    format!("'{s}' is not one of {}", valid.join(", "))
                })
            }
        }
    };
}

/// `follow-symlinks=`: which symlinks the union shows as what they point to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FollowSymlinks {
    Never,
    Directory,
    Regular,
    All,
}

/// `link-exdev=`: what a link that would cross branches makes instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkExdev {
    Passthrough,
    RelSymlink,
    AbsBaseSymlink,
    AbsPoolSymlink,
}

/// `rename-exdev=`: what a rename that would cross branches does instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenameExdev {
    Passthrough,
    RelSymlink,
    AbsSymlink,
}

names!(InodeCalc {
    Passthrough => "passthrough",
    PathHash => "path-hash",
    PathHash32 => "path-hash32",
    DevinoHash => "devino-hash",
    DevinoHash32 => "devino-hash32",
    HybridHash => "hybrid-hash",
    HybridHash32 => "hybrid-hash32",
});
names!(StatfsMode { Base => "base", Full => "full" });
names!(StatfsIgnore { None => "none", Ro => "ro", Nc => "nc" });
names!(XattrMode { Passthrough => "passthrough", NoAttr => "noattr", NoSys => "nosys" });
names!(FollowSymlinks { Never => "never", Directory => "directory", Regular => "regular", All => "all" });
names!(LinkExdev {
    Passthrough => "passthrough",
    RelSymlink => "rel-symlink",
    AbsBaseSymlink => "abs-base-symlink",
    AbsPoolSymlink => "abs-pool-symlink",
});
names!(RenameExdev {
    Passthrough => "passthrough",
    RelSymlink => "rel-symlink",
    AbsSymlink => "abs-symlink",
});

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub create: Policy,
    pub action: Policy,
    pub search: Policy,
    /// `func.NAME=` overrides of the category policy.
    pub func: BTreeMap<&'static str, Policy>,
    /// Default minimum free space for new files on a branch (mergerfs: 4G).
    pub min_free: u64,
    pub inodecalc: InodeCalc,
    pub statfs: StatfsMode,
    pub statfs_ignore: StatfsIgnore,
    pub xattr: XattrMode,
    /// `moveonenospc`: where a file that hit ENOSPC/EDQUOT on write moves to.
    pub move_on_enospc: Option<Policy>,
    /// `link-cow`: opening a hard-linked file for writing breaks the link first.
    pub link_cow: bool,
    /// `symlinkify`: old read-only files show as symlinks to their host path.
    pub symlinkify: bool,
    pub symlinkify_timeout: Duration,
    /// `nullrw`: reads and writes succeed without touching the data.
    pub nullrw: bool,
    /// `dropcacheonclose`: drop a file's host page cache when it is closed.
    pub drop_cache_on_close: bool,
    pub follow_symlinks: FollowSymlinks,
    pub link_exdev: LinkExdev,
    pub rename_exdev: RenameExdev,
    /// Kernel cache timeouts; unset ("auto"): long while every branch is
    /// watched for outside changes, mergerfs's defaults otherwise.
    pub cache: CachePolicy,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            create: Category::Create.default_policy(),
            action: Category::Action.default_policy(),
            search: Category::Search.default_policy(),
            func: BTreeMap::new(),
            min_free: 4 << 30,
            inodecalc: InodeCalc::HybridHash,
            statfs: StatfsMode::Base,
            statfs_ignore: StatfsIgnore::None,
            xattr: XattrMode::Passthrough,
            move_on_enospc: None,
            link_cow: false,
            symlinkify: false,
            symlinkify_timeout: Duration::from_secs(3600),
            nullrw: false,
            drop_cache_on_close: false,
            follow_symlinks: FollowSymlinks::Never,
            link_exdev: LinkExdev::Passthrough,
            rename_exdev: RenameExdev::Passthrough,
            cache: CachePolicy::default(),
        }
    }
}

/// A cache timeout in (fractional) seconds, 0 to 1e9.
pub fn seconds(v: &str) -> Result<Duration, String> {
    let secs: f64 = v
        .parse()
        .map_err(|_| format!("'{v}' is not a number of seconds"))?;
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("{v} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `auto` or a number of seconds.
fn timeout(v: &str) -> Result<Option<Duration>, String> {
    if v == "auto" {
        Ok(None)
    } else {
        seconds(v).map(Some)
    }
}

fn show_timeout(t: Option<Duration>) -> String {
    t.map_or("auto".into(), |d| d.as_secs_f64().to_string())
}

/// mergerfs's booleans.
pub fn boolean(v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("'{v}' is not true or false")),
    }
}

fn policy_for(category: Category, v: &str) -> Result<Policy, String> {
    let p: Policy = v.parse()?;
    if !p.valid_for(category) {
        return Err(format!(
            "policy '{p}' is not valid for the {} category",
            category.name()
        ));
    }
    Ok(p)
}

impl Settings {
    /// The policy for function `f`: its override, else its category's.
    pub fn policy(&self, f: Func) -> Policy {
        self.func
            .get(f.name())
            .copied()
            .unwrap_or(match f.category() {
                Category::Create => self.create,
                Category::Action => self.action,
                Category::Search => self.search,
            })
    }

    /// Sets `key` (mergerfs spelling; `_` and `-` both accepted) from text.
    /// Errors name what is wrong with the value.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let key = key.replace('_', "-");
        let v = value.trim();
        // Only the table's keys (a func key's name is checked below).
        if !key.starts_with("func.") && !Self::is_key(&key) {
            return Err(format!("unknown option '{key}'"));
        }
        match key.as_str() {
            // As mergerfs: a category setting overrides its functions' own.
            "category.create" => {
                self.create = policy_for(Category::Create, v)?;
                self.clear_funcs(Category::Create);
            }
            "category.action" => {
                self.action = policy_for(Category::Action, v)?;
                self.clear_funcs(Category::Action);
            }
            "category.search" => {
                self.search = policy_for(Category::Search, v)?;
                self.clear_funcs(Category::Search);
            }
            "minfreespace" => self.min_free = parse_size(v)?,
            "inodecalc" => self.inodecalc = v.parse()?,
            "statfs" => self.statfs = v.parse()?,
            "statfs-ignore" => self.statfs_ignore = v.parse()?,
            "xattr" => self.xattr = v.parse()?,
            // mergerfs: `true` picks mfs.
            "moveonenospc" => {
                self.move_on_enospc = match boolean(v) {
                    Ok(on) => on.then_some(Policy::Mfs),
                    Err(_) => Some(policy_for(Category::Create, v)?),
                }
            }
            "link-cow" => self.link_cow = boolean(v)?,
            "symlinkify" => self.symlinkify = boolean(v)?,
            "symlinkify-timeout" => self.symlinkify_timeout = seconds(v)?,
            "nullrw" => self.nullrw = boolean(v)?,
            "dropcacheonclose" => self.drop_cache_on_close = boolean(v)?,
            "follow-symlinks" => self.follow_symlinks = v.parse()?,
            "link-exdev" => self.link_exdev = v.parse()?,
            "rename-exdev" => self.rename_exdev = v.parse()?,
            "cache.entry" => self.cache.entry = timeout(v)?,
            "cache.attr" => self.cache.attr = timeout(v)?,
            "cache.negative-entry" => self.cache.negative = timeout(v)?,
            k => {
                let Some(name) = k.strip_prefix("func.") else {
                    return Err(format!("unknown option '{k}'"));
                };
                let f =
                    Func::from_name(name).ok_or_else(|| format!("unknown function '{name}'"))?;
                let p = policy_for(f.category(), v)?;
                self.func.insert(f.name(), p);
            }
        }
        Ok(())
    }

    /// The value of `key` as text, `None` for an unknown key.
    pub fn get(&self, key: &str) -> Option<String> {
        if !Self::is_key(key) {
            return None;
        }
        let key = key.replace('_', "-");
        Some(match key.as_str() {
            "category.create" => self.create.to_string(),
            "category.action" => self.action.to_string(),
            "category.search" => self.search.to_string(),
            "minfreespace" => self.min_free.to_string(),
            "inodecalc" => self.inodecalc.to_string(),
            "statfs" => self.statfs.to_string(),
            "statfs-ignore" => self.statfs_ignore.to_string(),
            "xattr" => self.xattr.to_string(),
            "moveonenospc" => self
                .move_on_enospc
                .map_or("false".into(), |p| p.to_string()),
            "link-cow" => self.link_cow.to_string(),
            "symlinkify" => self.symlinkify.to_string(),
            "symlinkify-timeout" => self.symlinkify_timeout.as_secs_f64().to_string(),
            "nullrw" => self.nullrw.to_string(),
            "dropcacheonclose" => self.drop_cache_on_close.to_string(),
            "follow-symlinks" => self.follow_symlinks.to_string(),
            "link-exdev" => self.link_exdev.to_string(),
            "rename-exdev" => self.rename_exdev.to_string(),
            "cache.entry" => show_timeout(self.cache.entry),
            "cache.attr" => show_timeout(self.cache.attr),
            "cache.negative-entry" => show_timeout(self.cache.negative),
            k => {
                let f = Func::from_name(k.strip_prefix("func.")?)?;
                self.policy(f).to_string()
            }
        })
    }

    fn clear_funcs(&mut self, category: Category) {
        self.func
            .retain(|name, _| Func::from_name(name).is_none_or(|f| f.category() != category));
    }

    /// Whether `key` is one of the settings: a runtime key of the option
    /// table, `_` and `-` alike.
    pub fn is_key(key: &str) -> bool {
        crate::options::find(key).is_some_and(|o| o.scope == Scope::Runtime)
    }

    /// Every key [`get`](Self::get) answers, in the option table's order
    /// (`func.NAME` as one key per function).
    pub fn keys() -> Vec<String> {
        OPTIONS
            .iter()
            .filter(|o| o.scope == Scope::Runtime)
            .flat_map(|o| o.keys())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_mergerfs_defaults() {
        let s = Settings::default();
        assert_eq!(s.get("category.create").unwrap(), "pfrd");
        assert_eq!(s.get("category.action").unwrap(), "epall");
        assert_eq!(s.get("category.search").unwrap(), "ff");
        assert_eq!(s.get("func.getattr").unwrap(), "ff");
        assert_eq!(s.get("func.unlink").unwrap(), "epall");
        assert_eq!(s.get("minfreespace").unwrap(), (4u64 << 30).to_string());
        assert_eq!(s.get("inodecalc").unwrap(), "hybrid-hash");
        assert_eq!(s.get("moveonenospc").unwrap(), "false");
        // Long while the branches are watched, mergerfs's otherwise.
        assert_eq!(s.get("cache.entry").unwrap(), "auto");
    }

    #[test]
    fn func_overrides_beat_the_category() {
        let mut s = Settings::default();
        s.set("category.search", "newest").unwrap();
        s.set("func.getattr", "ff").unwrap();
        assert_eq!(s.policy(Func::Getattr), Policy::Ff);
        assert_eq!(s.policy(Func::Open), Policy::Newest);
        s.set("category.create", "epmfs").unwrap();
        assert_eq!(s.policy(Func::Mkdir), Policy::EpMfs);
        // Setting a category again resets its functions (mergerfs does).
        s.set("category.search", "ff").unwrap();
        assert_eq!(s.policy(Func::Getattr), Policy::Ff);
        s.set("func.getattr", "newest").unwrap();
        s.set("category.search", "ff").unwrap();
        assert_eq!(s.policy(Func::Getattr), Policy::Ff);
        // mergerfs spells some keys with `_`.
        s.set("statfs_ignore", "ro").unwrap();
        assert_eq!(s.get("statfs-ignore").unwrap(), "ro");
    }

    #[test]
    fn bad_values_are_refused_with_the_reason_and_nothing_changes() {
        let mut s = Settings::default();
        let before = s.clone();
        assert!(
            s.set("category.create", "bogus")
                .unwrap_err()
                .contains("bogus")
        );
        assert!(s.set("func.nothing", "ff").unwrap_err().contains("nothing"));
        assert!(s.set("minfreespace", "12Q").unwrap_err().contains("12Q"));
        assert!(
            s.set("inodecalc", "md5")
                .unwrap_err()
                .contains("hybrid-hash")
        );
        assert!(
            s.set("no.such.key", "1")
                .unwrap_err()
                .contains("no.such.key")
        );
        assert_eq!(s, before);
        assert_eq!(s.get("no.such.key"), None);
    }

    /// The option table and this parser cannot drift apart: every runtime
    /// key of the table is listed and takes its sample value; no other key is.
    #[test]
    fn every_runtime_key_of_the_table_is_a_setting() {
        let keys = Settings::keys();
        for o in OPTIONS {
            for k in o.keys() {
                let mut s = Settings::default();
                match o.scope {
                    Scope::Runtime => {
                        assert!(keys.contains(&k), "{k} not listed");
                        s.set(&k, o.sample)
                            .unwrap_or_else(|e| panic!("{k}={}: {e}", o.sample));
                        assert!(s.get(&k).is_some(), "{k} has no value");
                    }
                    Scope::Mount => {
                        assert!(!keys.contains(&k), "{k} listed");
                        assert!(s.set(&k, o.sample).is_err(), "{k} accepted");
                        assert_eq!(s.get(&k), None);
                    }
                }
            }
        }
        assert_eq!(
            keys.iter().filter(|k| k.starts_with("func.")).count(),
            Func::ALL.len()
        );
        assert!(keys.iter().all(|k| Settings::is_key(k)));
        // Both spellings, as mergerfs.
        assert!(Settings::is_key("cache.negative_entry"));
        assert!(!Settings::is_key("threads"));
    }

    #[test]
    fn every_listed_key_reads_back_what_was_set() {
        let mut s = Settings::default();
        for k in Settings::keys() {
            let v = s.get(&k).unwrap_or_else(|| panic!("{k} has no value"));
            s.set(&k, &v).unwrap_or_else(|e| panic!("{k}={v}: {e}"));
        }
        assert_eq!(s, Settings::default().clone_with_funcs(&s));
    }

    impl Settings {
        /// Default settings with `other`'s explicit func overrides (setting a
        /// func key to its current value makes it explicit).
        fn clone_with_funcs(&self, other: &Settings) -> Settings {
            Settings {
                func: other.func.clone(),
                ..self.clone()
            }
        }
    }
}
