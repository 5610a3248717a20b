//! The SOURCE argument: a mergerfs-style branch list, `PATH[=MODE][,MINFREE]`
//! joined by `:`, e.g. `/disk1:/disk2=NC:/archive=RO`.

use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BranchMode {
    /// Read-write: may receive new files.
    #[default]
    RW,
    /// Read-only: never written.
    RO,
    /// No-create: existing files may change, no new ones land here.
    NC,
}

impl fmt::Display for BranchMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BranchMode::RW => "RW",
            BranchMode::RO => "RO",
            BranchMode::NC => "NC",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Branch {
    pub path: PathBuf,
    pub mode: BranchMode,
    /// Per-branch `minfreespace` in bytes, if given.
    pub min_free: Option<u64>,
}

/// Parses a size such as `4G`, `512M`, `100K` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            // "lots" is no number with a unit 's': say what a size looks like.
            if s[..i].trim().parse::<u64>().is_err() {
                return Err(format!(
                    "bad size '{s}': expected a number with an optional K/M/G/T unit"
                ));
            }
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => {
                    return Err(format!(
                        "bad size '{s}': unknown unit '{c}' (use K, M, G or T)"
                    ));
                }
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size '{s}': expected a number with an optional K/M/G/T unit"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("bad size '{s}': too large"))
}

/// Whether `inner` is `outer` or lies beneath it, comparing whole
/// components (`/a/bc` is not inside `/a/b`).
pub fn is_within(inner: &Path, outer: &Path) -> bool {
    inner.starts_with(outer)
}

/// Refuses a layer directory (`what`: branch, lower, upper, store) that is,
/// holds or lies inside the mountpoint: the daemon would wait on its own
/// mount. `mountpoint` must already be canonical, since a running daemon
/// cannot resolve it without calling itself. `dir` is checked as spelt
/// first, so a path through the mountpoint is refused before anything looks
/// it up, then resolved (realpath); a `dir` that does not resolve is left to
/// the caller's own existence checks.
pub fn check_apart(mountpoint: &Path, what: &str, dir: &Path) -> Result<(), String> {
    if mountpoint.as_os_str().is_empty() {
        return Ok(());
    }
    let (mp, shown) = (mountpoint.display(), dir.display());
    let inside =
        || format!("{what} {shown} is inside the mountpoint {mp}: the mount would wait on itself");
    let itself =
        || format!("mountpoint {mp} is the {what} {shown} itself: the mount would wait on itself");
    let spelt = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    if spelt == mountpoint {
        return Err(itself());
    }
    if is_within(&spelt, mountpoint) {
        return Err(inside());
    }
    let Ok(real) = std::fs::canonicalize(&spelt) else {
        return Ok(());
    };
    if real == mountpoint {
        return Err(itself());
    }
    if is_within(&real, mountpoint) {
        return Err(inside());
    }
    if is_within(mountpoint, &real) {
        return Err(format!(
            "mountpoint {mp} is inside the {what} {shown}: the mount would wait on itself"
        ));
    }
    Ok(())
}

/// Parses a branch list. Paths are taken as given; existence is checked on mount.
pub fn parse_branches(spec: &str) -> Result<Vec<Branch>, String> {
    if spec.is_empty() {
        return Err("empty source: give a directory, or branches joined by ':'".into());
    }
    spec.split(':')
        .map(|part| {
            if part.is_empty() {
                return Err(format!("empty branch in source '{spec}'"));
            }
            let (path, opts) = match part.split_once('=') {
                Some((p, o)) => (p, Some(o)),
                None => (part, None),
            };
            if path.is_empty() {
                return Err(format!("branch '{part}' has no path"));
            }
            let mut branch = Branch {
                path: PathBuf::from(path),
                mode: BranchMode::RW,
                min_free: None,
            };
            if let Some(opts) = opts {
                let (mode, min_free) = match opts.split_once(',') {
                    Some((m, f)) => (m, Some(f)),
                    None => (opts, None),
                };
                branch.mode = match mode {
                    "RW" | "rw" => BranchMode::RW,
                    "RO" | "ro" => BranchMode::RO,
                    "NC" | "nc" => BranchMode::NC,
                    other => {
                        return Err(format!(
                            "branch '{path}': unknown mode '{other}' (expected RW, RO or NC)"
                        ));
                    }
                };
                if let Some(f) = min_free {
                    branch.min_free =
                        Some(parse_size(f).map_err(|e| format!("branch '{path}': {e}"))?);
                }
            }
            expand(branch)
        })
        .collect::<Result<Vec<Vec<Branch>>, String>>()
        .map(|v| v.into_iter().flatten().collect())
}

/// A branch whose path is a glob (`/mnt/disk*`) becomes one branch per
/// matching directory, in name order, each with the pattern's mode and
/// minimum free space. A pattern that matches no directory is an error.
fn expand(branch: Branch) -> Result<Vec<Branch>, String> {
    let pattern = branch.path.to_string_lossy().into_owned();
    if !pattern.contains(['*', '?', '[']) {
        return Ok(vec![branch]);
    }
    let paths = glob::glob(&pattern).map_err(|e| format!("branch pattern '{pattern}': {e}"))?;
    let found: Vec<Branch> = paths
        .filter_map(|p| p.ok())
        .filter(|p| p.is_dir())
        .map(|path| Branch {
            path,
            ..branch.clone()
        })
        .collect();
    if found.is_empty() {
        return Err(format!("branch pattern '{pattern}' matches no directory"));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_expand_to_matching_directories_in_order() {
        let dir = tempfile::tempdir().unwrap();
        for d in ["disk2", "disk1", "other"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        std::fs::write(dir.path().join("disk3"), b"a file, not a branch").unwrap();
        let spec = format!("{0}/disk*=NC,1G:{0}/other", dir.path().display());
        let b = parse_branches(&spec).unwrap();
        let names: Vec<_> = b.iter().map(|b| b.path.file_name().unwrap()).collect();
        assert_eq!(names, ["disk1", "disk2", "other"]);
        assert_eq!(b[1].mode, BranchMode::NC);
        assert_eq!(b[1].min_free, Some(1 << 30));
        assert_eq!(b[2].mode, BranchMode::RW);
        let none = format!("{}/nothing*", dir.path().display());
        assert!(
            parse_branches(&none)
                .unwrap_err()
                .contains("matches no directory")
        );
    }

    #[test]
    fn single_directory() {
        let b = parse_branches("/srv/data").unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].path, PathBuf::from("/srv/data"));
        assert_eq!(b[0].mode, BranchMode::RW);
    }

    #[test]
    fn modes_and_minfree() {
        let b = parse_branches("/a:/b=RO:/c=NC,4G").unwrap();
        assert_eq!(
            b.iter().map(|b| b.mode).collect::<Vec<_>>(),
            [BranchMode::RW, BranchMode::RO, BranchMode::NC]
        );
        assert_eq!(b[2].min_free, Some(4 << 30));
    }

    #[test]
    fn bad_input_is_explained() {
        assert!(parse_branches("").unwrap_err().contains("empty source"));
        assert!(
            parse_branches("/a::/b")
                .unwrap_err()
                .contains("empty branch")
        );
        assert!(
            parse_branches("/a=XX")
                .unwrap_err()
                .contains("unknown mode 'XX'")
        );
        assert!(
            parse_branches("/a=RW,12Q")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(parse_branches("=RO").unwrap_err().contains("no path"));
    }

    #[test]
    fn within_compares_whole_components() {
        assert!(is_within(Path::new("/a/b/c"), Path::new("/a/b")));
        assert!(is_within(Path::new("/a/b"), Path::new("/a/b")));
        assert!(!is_within(Path::new("/a/bc"), Path::new("/a/b")));
        assert!(!is_within(Path::new("/a"), Path::new("/a/b")));
    }

    #[test]
    fn layers_apart_from_the_mountpoint() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        for d in ["l/sub", "mnt", "b", "bc"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::os::unix::fs::symlink(root.join("mnt"), root.join("link")).unwrap();
        let err = |mp: &str, d: &str| check_apart(&root.join(mp), "branch", &root.join(d));
        // mountpoint inside or equal to a branch
        assert!(
            err("l/sub", "l")
                .unwrap_err()
                .contains("is inside the branch")
        );
        assert!(err("mnt", "mnt").unwrap_err().contains("itself"));
        // a branch inside the mountpoint, as spelt (never looked up) or by a symlink
        assert!(
            err("mnt", "mnt/x/y")
                .unwrap_err()
                .contains("inside the mountpoint")
        );
        assert!(err("mnt", "link").unwrap_err().contains("itself"));
        // names sharing a prefix are apart
        assert!(err("bc", "b").is_ok());
        assert!(err("b", "bc").is_ok());
        let e = err("l/sub", "l").unwrap_err();
        assert!(
            e.contains(&root.join("l").display().to_string()) && e.contains("l/sub"),
            "{e}"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100").unwrap(), 100);
        assert_eq!(parse_size("1K").unwrap(), 1024);
        assert_eq!(parse_size("2m").unwrap(), 2 << 20);
        assert!(parse_size("x").is_err());
        let e = parse_size("lots").unwrap_err();
        assert!(e.contains("'lots'") && !e.contains("unit 's'"), "{e}");
    }
}
