//! What changed between two states of a workspace (snapshots or branches),
//! without the mount: each side is served read-only in-process, and only
//! the paths the layers the two sides do not share touch are compared (or,
//! below a directory one side replaced or made opaque, the whole subtree).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::state::{State, layer_rel};
use crate::fs::*;
use crate::overlay::{LowerSpec, Overlay, OverlayConfig};
use crate::stack::Stack;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Modified,
    Deleted,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct Changed {
    pub path: String,
    pub change: Change,
}

const ROOT: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};

/// A side's layers, newest first: a snapshot's, or a branch's (its live
/// layer included).
fn chain(st: &State, which: &str) -> Result<Vec<i64>, String> {
    match st.snapshot_chain(which) {
        Ok(c) => Ok(c),
        Err(_) => match st.chain(which) {
            Ok(c) => Ok(std::iter::once(c.live).chain(c.frozen).collect()),
            Err(_) => Err(format!("no snapshot or branch named {which:?}")),
        },
    }
}

struct Side {
    fs: Stack<Overlay>,
}

impl Side {
    fn open(upper: &Path, layers: &[i64], base: &[LowerSpec]) -> Result<Side, String> {
        let lowers = layers
            .iter()
            .map(|id| LowerSpec::Host(upper.join(layer_rel(*id))))
            .chain(base.iter().cloned())
            .collect();
        let overlay = Overlay::new(OverlayConfig {
            fd_cache: 256,
            ..OverlayConfig::new(lowers, None)
        })?;
        Ok(Side {
            fs: Stack::new(overlay),
        })
    }

    fn at(&self, path: &str) -> Option<Attr> {
        let mut id = ROOT_ID;
        let mut attr = None;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            let e = self
                .fs
                .lookup(&ROOT, id, OsStr::new(c))
                .ok()?
                .entry()
                .ok()?;
            id = e.attr.ino;
            attr = Some(e.attr);
        }
        attr
    }

    fn read(&self, ino: u64) -> Option<Vec<u8>> {
        let o = self.fs.open(&ROOT, ino, libc::O_RDONLY).ok()?;
        let mut out = Vec::new();
        loop {
            let chunk = self
                .fs
                .read(&ROOT, ino, o.fh, out.len() as u64, 1 << 20)
                .ok()?;
            if chunk.is_empty() {
                break;
            }
            out.extend_from_slice(&chunk);
        }
        let _ = self.fs.release(&ROOT, ino, o.fh);
        Some(out)
    }

    /// Every path below directory `path` on this side.
    fn subtree(&self, path: &str, out: &mut Vec<String>) {
        let Some(a) = self.at(path) else { return };
        let Ok(o) = self.fs.opendir(&ROOT, a.ino, 0) else {
            return;
        };
        let mut names = Names(Vec::new());
        let _ = self.fs.readdir(&ROOT, a.ino, o.fh, 0, &mut names);
        let _ = self.fs.releasedir(&ROOT, a.ino, o.fh);
        for (name, kind) in names.0 {
            let child = join(path, &name);
            if kind == FileKind::Directory {
                self.subtree(&child, out);
            }
            out.push(child);
        }
    }
}

struct Names(Vec<(String, FileKind)>);
impl DirSink for Names {
    fn add(&mut self, _ino: u64, _next: u64, kind: FileKind, name: &OsStr) -> bool {
        if name != "." && name != ".." {
            self.0.push((name.to_string_lossy().into_owned(), kind));
        }
        true
    }
}

fn join(dir: &str, name: &str) -> String {
    match dir {
        "" => name.to_string(),
        d => format!("{d}/{name}"),
    }
}

/// Paths a layer directory holds (whiteouts included), and the
/// directories it makes opaque.
fn layer_paths(
    root: &Path,
    at_root: bool,
    paths: &mut BTreeSet<String>,
    opaque: &mut BTreeSet<String>,
) {
    fn walk(
        dir: &Path,
        rel: &str,
        top: bool,
        paths: &mut BTreeSet<String>,
        opaque: &mut BTreeSet<String>,
    ) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let bytes = name.as_bytes();
            // The workspace's own directory, and strata's temporaries.
            if (top && bytes == crate::control::NAME.as_bytes())
                || bytes.starts_with(crate::overlay::TMP_PREFIX.as_bytes())
            {
                continue;
            }
            let name = name.to_string_lossy().into_owned();
            let path = join(rel, &name);
            let full = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if is_opaque(&full) {
                    opaque.insert(path.clone());
                }
                walk(&full, &path, false, paths, opaque);
            }
            paths.insert(path);
        }
    }
    walk(root, "", at_root, paths, opaque);
}

fn is_opaque(dir: &Path) -> bool {
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|n| {
            let mut v = [0u8; 4];
            rustix::fs::lgetxattr(dir, *n, &mut v).is_ok_and(|len| &v[..len] == b"y")
        })
}

/// The changes from `from` to `to` (snapshot names or ids, or branch
/// names) in the workspace of `upper`, sorted by path.
pub fn diff(upper: &Path, from: &str, to: &str) -> Result<Vec<Changed>, String> {
    let st = State::open_read_only(upper)?;
    let base = st.lowers().map_err(|e| e.why)?;
    let (a, b) = (chain(&st, from)?, chain(&st, to)?);
    let differing: Vec<i64> = a
        .iter()
        .filter(|l| !b.contains(l))
        .chain(b.iter().filter(|l| !a.contains(l)))
        .copied()
        .collect();
    let (mut paths, mut opaque) = (BTreeSet::new(), BTreeSet::new());
    for l in &differing {
        let dir: PathBuf = upper.join(layer_rel(*l));
        layer_paths(&dir, *l == 0, &mut paths, &mut opaque);
    }
    let (sa, sb) = (Side::open(upper, &a, &base)?, Side::open(upper, &b, &base)?);
    // Below an opaque directory, everything either side has may differ.
    for d in &opaque {
        let mut more = Vec::new();
        sa.subtree(d, &mut more);
        sb.subtree(d, &mut more);
        paths.extend(more);
    }
    let mut out = BTreeSet::new();
    let mut todo: Vec<String> = paths.into_iter().collect();
    while let Some(p) = todo.pop() {
        let (x, y) = (sa.at(&p), sb.at(&p));
        let change = match (&x, &y) {
            (None, None) => continue,
            (None, Some(_)) => Change::Added,
            (Some(_), None) => Change::Deleted,
            (Some(x), Some(y)) if differs(&sa, x, &sb, y) => Change::Modified,
            _ => continue,
        };
        // A directory on one side only: so is everything below it.
        let (side, dir) = match (&x, &y) {
            (Some(x), None) => (&sa, x),
            (None, Some(y)) => (&sb, y),
            (Some(x), Some(y)) if x.kind != y.kind => match x.kind {
                FileKind::Directory => (&sa, x),
                _ => (&sb, y),
            },
            _ => (&sa, x.as_ref().expect("both")),
        };
        if dir.kind == FileKind::Directory && change != Change::Modified {
            let mut below = Vec::new();
            side.subtree(&p, &mut below);
            todo.extend(below);
        }
        out.insert(Changed { path: p, change });
    }
    Ok(out.into_iter().collect())
}

/// Whether one path's objects on the two sides differ: type, owner, mode,
/// content (or link target). Times alone do not make a change, as in git.
fn differs(sa: &Side, x: &Attr, sb: &Side, y: &Attr) -> bool {
    if (x.kind, x.perm, x.uid, x.gid) != (y.kind, y.perm, y.uid, y.gid) {
        return true;
    }
    match x.kind {
        FileKind::Directory => false,
        FileKind::Symlink => sa.fs.readlink(&ROOT, x.ino).ok() != sb.fs.readlink(&ROOT, y.ino).ok(),
        FileKind::Regular => x.size != y.size || sa.read(x.ino) != sb.read(y.ino),
        _ => x.rdev != y.rdev,
    }
}
