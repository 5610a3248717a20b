//! The control file `/.strata`: runtime settings as `user.strata.*` xattrs
//! (`user.mergerfs.*` accepted too, so mergerfs scripts keep working), and
//! the per-file keys `basepath`, `relpath`, `fullpath`, `allpaths`.

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime};

use rustix::fs::{Mode, OFlags};

use super::policy::Func;
use super::{CONTROL_ID, Settings, UnionFs};
use crate::fs::{Attr, AttrOut, Ctx, Entry, FileKind};
use crate::source::{self, Branch as BranchSpec};
use crate::{Errno, Result};

const PREFIXES: [&str; 2] = ["user.strata.", "user.mergerfs."];
/// Keys only read, never set.
const READ_ONLY: [&str; 2] = ["version", "pid"];

fn attr() -> Attr {
    Attr {
        ino: CONTROL_ID,
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        kind: FileKind::Regular,
        perm: 0o444,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
    }
}

pub(super) fn entry((entry_ttl, attr_ttl): (Duration, Duration)) -> Entry {
    Entry {
        attr: attr(),
        generation: 0,
        entry_ttl,
        attr_ttl,
    }
}

pub(super) fn attr_out((_, ttl): (Duration, Duration)) -> AttrOut {
    AttrOut { attr: attr(), ttl }
}

/// The control file has no content; opening it reads as empty.
pub(super) fn open() -> Result<OwnedFd> {
    Ok(rustix::fs::open(
        "/dev/null",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

fn key(name: &OsStr) -> Option<&str> {
    let name = std::str::from_utf8(name.as_bytes()).ok()?;
    PREFIXES.iter().find_map(|p| name.strip_prefix(p))
}

/// Every key the control file lists, as a listxattr buffer.
pub(super) fn list() -> Vec<u8> {
    let mut keys = vec!["branches".to_string()];
    keys.extend(Settings::keys());
    keys.extend(READ_ONLY.iter().map(|k| k.to_string()));
    let mut out = Vec::new();
    for k in keys {
        out.extend_from_slice(PREFIXES[0].as_bytes());
        out.extend_from_slice(k.as_bytes());
        out.push(0);
    }
    out
}

pub(super) fn get(fs: &UnionFs, name: &OsStr) -> Result<Vec<u8>> {
    let k = key(name).ok_or(Errno::ENODATA)?;
    let v = match k {
        "branches" | "srcmounts" => fs
            .branches()
            .iter()
            .map(|b| b.spec())
            .collect::<Vec<_>>()
            .join(":"),
        "version" => env!("CARGO_PKG_VERSION").to_string(),
        "pid" => std::process::id().to_string(),
        k => fs.settings.read().get(k).ok_or(Errno::ENODATA)?,
    };
    Ok(v.into_bytes())
}

pub(super) fn set(fs: &UnionFs, ctx: &Ctx, name: &OsStr, value: &[u8]) -> Result<()> {
    let k = key(name).ok_or(Errno::ENOTSUP)?;
    if ctx.uid != 0 {
        return Err(Errno::EPERM);
    }
    let value = std::str::from_utf8(value).map_err(|_| Errno::EINVAL)?;
    let refuse = |msg: String| {
        tracing::warn!("control: {k}={value}: {msg}");
        Errno::EINVAL
    };
    match k {
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
            let next = edit_branches(&current, value).map_err(refuse)?;
            fs.set_branches(&next).map_err(refuse)?;
            tracing::info!("branches now {}", get_str(fs, "branches"));
        }
        "cmd.invalidate-all-nodes" => fs.invalidate_all(),
        // Nodes are freed as soon as the kernel forgets them: nothing to collect.
        "cmd.gc" => {}
        k if READ_ONLY.contains(&k) => return Err(refuse("read-only".into())),
        k => {
            let mut s = fs.settings.write();
            if s.get(k).is_none() {
                return Err(Errno::ENODATA);
            }
            s.set(k, value).map_err(refuse)?;
        }
    }
    Ok(())
}

fn get_str(fs: &UnionFs, k: &str) -> String {
    let name = format!("{}{k}", PREFIXES[0]);
    String::from_utf8_lossy(&get(fs, OsStr::new(&name)).unwrap_or_default()).into_owned()
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
pub(super) fn file_key(fs: &UnionFs, ino: u64, name: &OsStr) -> Option<Result<Vec<u8>>> {
    let k = key(name)?;
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
