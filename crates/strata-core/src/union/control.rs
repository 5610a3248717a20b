//! The union's keys of the control file `/.strata` (see [`crate::control`]):
//! its settings, `branches` (edited with mergerfs's syntax), the
//! `cmd.*` actions, and the per-file keys `basepath`, `relpath`,
//! `fullpath`, `allpaths`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use super::policy::Func;
use super::{Settings, Union};
use crate::Result;
use crate::source::{self, Branch as BranchSpec};

/// The union's keys besides the settings.
const KEYS: [&str; 1] = ["branches"];

pub(super) fn keys() -> Vec<String> {
    let mut keys: Vec<String> = KEYS.iter().map(|k| k.to_string()).collect();
    keys.extend(Settings::keys());
    keys
}

pub(super) fn get(fs: &Union, k: &str) -> Option<String> {
    match k {
        "branches" | "srcmounts" => Some(
            fs.branches()
                .iter()
                .map(|b| b.spec())
                .collect::<Vec<_>>()
                .join(":"),
        ),
        k => fs.settings.read().get(k),
    }
}

pub(super) fn set(fs: &Union, k: &str, value: &str) -> Option<std::result::Result<(), String>> {
    Some(match k {
        "branches" | "srcmounts" => {
            let current: Vec<BranchSpec> = fs
                .branches()
                .iter()
                .map(|b| BranchSpec {
                    path: b.path.clone(),
                    mode: b.mode,
                    min_free: b.min_free,
                })
                .collect();
            edit_branches(&current, value)
                .and_then(|next| fs.set_branches(&next))
                .map(|()| {
                    let now = get(fs, "branches").unwrap_or_default();
                    tracing::info!("branches now {now}");
                })
        }
        "cmd.invalidate-all-nodes" => {
            fs.invalidate_all();
            Ok(())
        }
        // Nodes are freed as soon as the kernel forgets them: nothing to collect.
        "cmd.gc" => Ok(()),
        k => {
            let mut s = fs.settings.write();
            s.get(k)?;
            s.set(k, value)
        }
    })
}

/// Applies a mergerfs branch edit: `+<LIST` prepend, `+>LIST` or `+LIST`
/// append, `-LIST` remove those paths, `-<` remove the first, `->` remove
/// the last, `=LIST` or `LIST` replace.
pub fn edit_branches(
    current: &[BranchSpec],
    edit: &str,
) -> std::result::Result<Vec<BranchSpec>, String> {
    let mut out = current.to_vec();
    if let Some(list) = edit.strip_prefix("+<") {
        let mut new = source::parse_branches(list)?;
        new.append(&mut out);
        out = new;
    } else if let Some(list) = edit.strip_prefix("+>").or_else(|| edit.strip_prefix('+')) {
        out.extend(source::parse_branches(list)?);
    } else if edit == "-<" {
        if out.is_empty() {
            return Err("no branch to remove".into());
        }
        out.remove(0);
    } else if edit == "->" {
        out.pop().ok_or("no branch to remove")?;
    } else if let Some(list) = edit.strip_prefix('-') {
        for gone in source::parse_branches(list)? {
            let before = out.len();
            out.retain(|b| b.path != gone.path);
            if out.len() == before {
                return Err(format!("{} is not a branch", gone.path.display()));
            }
        }
    } else {
        out = source::parse_branches(edit.strip_prefix('=').unwrap_or(edit))?;
    }
    for (i, b) in out.iter().enumerate() {
        if out[..i].iter().any(|o| o.path == b.path) {
            return Err(format!("{} is listed twice", b.path.display()));
        }
    }
    if out.is_empty() {
        return Err("a union needs at least one branch".into());
    }
    Ok(out)
}

/// Per-file keys, readable on any node: `None` when `name` is not one.
pub(super) fn file_key(fs: &Union, ino: u64, name: &OsStr) -> Option<Result<Vec<u8>>> {
    let k = crate::control::key(name)?;
    if !matches!(k, "basepath" | "relpath" | "fullpath" | "allpaths") {
        return None;
    }
    Some((|| {
        let rel = fs.rel_path(ino);
        let mut relpath = b"/".to_vec();
        relpath.extend_from_slice(&rel);
        Ok(match k {
            "relpath" => relpath,
            "allpaths" => {
                let mut out = Vec::new();
                for p in fs.all_paths(ino)? {
                    if !out.is_empty() {
                        out.push(0);
                    }
                    out.extend_from_slice(p.as_os_str().as_bytes());
                }
                out
            }
            _ => {
                let inst = fs.search(Func::Getxattr, ino)?;
                let base = inst.branch.path.as_os_str().as_bytes().to_vec();
                if k == "basepath" {
                    base
                } else {
                    let mut full = base;
                    if !rel.is_empty() {
                        full.push(b'/');
                        full.extend_from_slice(&rel);
                    }
                    full
                }
            }
        })
    })())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::BranchMode;

    fn paths(b: &[BranchSpec]) -> Vec<String> {
        b.iter().map(|b| b.path.display().to_string()).collect()
    }

    #[test]
    fn branch_edits_follow_mergerfs_syntax() {
        let cur = source::parse_branches("/a:/b=NC").unwrap();
        assert_eq!(
            paths(&edit_branches(&cur, "+</z").unwrap()),
            ["/z", "/a", "/b"]
        );
        assert_eq!(
            paths(&edit_branches(&cur, "+>/z=RO").unwrap()),
            ["/a", "/b", "/z"]
        );
        assert_eq!(
            edit_branches(&cur, "+>/z=RO").unwrap()[2].mode,
            BranchMode::RO
        );
        assert_eq!(paths(&edit_branches(&cur, "-/a").unwrap()), ["/b"]);
        assert_eq!(paths(&edit_branches(&cur, "-<").unwrap()), ["/b"]);
        assert_eq!(paths(&edit_branches(&cur, "->").unwrap()), ["/a"]);
        assert_eq!(paths(&edit_branches(&cur, "=/x:/y").unwrap()), ["/x", "/y"]);
        assert_eq!(paths(&edit_branches(&cur, "/x").unwrap()), ["/x"]);
    }

    #[test]
    fn bad_branch_edits_are_refused() {
        let cur = source::parse_branches("/a").unwrap();
        assert!(edit_branches(&cur, "-/nope").unwrap_err().contains("/nope"));
        assert!(
            edit_branches(&cur, "->")
                .unwrap_err()
                .contains("at least one")
        );
        assert!(edit_branches(&cur, "+>/a").unwrap_err().contains("twice"));
        assert!(edit_branches(&cur, "+>/q=XX").unwrap_err().contains("XX"));
    }
}
