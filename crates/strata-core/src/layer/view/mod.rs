//! A view: a layer that shows directories of other layers (host
//! directories, archives) at places of its own, declared in a spec
//! ([`Spec`], docs/VIEWS.md), with filters and extension renames.
//!
//! The view's own directories (every map's place and the directories
//! leading there) are virtual: `LObj::Entry(index)`. Below a map, an object
//! is its source's object tagged with the map (`LObj::Mapped`), so the
//! same source directory shown by two maps is two objects (the kernel must
//! not see one directory under two parents). A virtual directory shows its
//! virtual children first, then what its maps show there, in spec order,
//! first name wins; a map whose place lies inside another map's directory
//! shows on top of that directory's own entry of the same name.

mod spec;

use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use spec::{Map, Source, Spec};

use super::{LName, LObj, LStat, Layer, Mapped, layer_name};
use crate::fs::FileKind;
use crate::{Errno, Result};

/// Key device of the view's virtual directories.
const VIRTUAL: u64 = u64::MAX;

struct VDir {
    children: BTreeMap<Vec<u8>, u32>,
    /// What shows here besides the virtual children: (map, directory below
    /// the map's source directory), in order.
    maps: Vec<(u32, Vec<Vec<u8>>)>,
}

pub struct ViewLayer {
    label: String,
    spec_path: PathBuf,
    sources: Vec<Box<dyn Layer>>,
    maps: Vec<Map>,
    /// Each map's source directory.
    roots: Vec<LObj>,
    vdirs: Vec<VDir>,
    mtime: (i64, u32),
}

impl ViewLayer {
    /// Opens the view a spec file declares, with its sources.
    pub fn open(spec_path: &Path, fd_cache: usize) -> std::result::Result<ViewLayer, String> {
        let spec = Spec::load(spec_path).map_err(|e| e.join("\n"))?;
        let mut sources: Vec<Box<dyn Layer>> = Vec::new();
        for s in &spec.sources {
            let layer = if s.path.is_dir() {
                super::open_host(&s.path, fd_cache)?
            } else {
                super::open_archive(&s.path)?
            };
            sources.push(layer);
        }
        let mut roots = Vec::new();
        for (i, m) in spec.maps.iter().enumerate() {
            let src = &sources[m.source];
            let mut cur = src.root();
            for part in &m.sub {
                let name = CString::new(part.clone()).map_err(|_| "NUL in a name".to_string())?;
                cur = match src.lookup(&cur, &name) {
                    Ok(Some((o, st))) if st.is_dir() => o,
                    _ => {
                        return Err(format!(
                            "{}: map {}: {} has no directory {}",
                            spec_path.display(),
                            i + 1,
                            src.describe(),
                            String::from_utf8_lossy(&m.sub.join(&b'/'))
                        ));
                    }
                };
            }
            roots.push(cur);
        }
        let mtime = std::fs::metadata(spec_path)
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                (m.mtime(), m.mtime_nsec() as u32)
            })
            .unwrap_or((0, 0));
        let mut view = ViewLayer {
            label: format!("view:{}", spec_path.display()),
            spec_path: spec_path.to_path_buf(),
            sources,
            maps: spec.maps,
            roots,
            vdirs: vec![VDir {
                children: BTreeMap::new(),
                maps: Vec::new(),
            }],
            mtime,
        };
        view.place_maps();
        Ok(view)
    }

    /// Builds the virtual directories: each map's place, and the
    /// directories leading there, which also show what the maps of the
    /// directory above have by that name.
    fn place_maps(&mut self) {
        for (m, map) in self.maps.iter().enumerate() {
            let mut cur = 0u32;
            for part in &map.path {
                cur = match self.vdirs[cur as usize].children.get(part) {
                    Some(&c) => c,
                    None => {
                        let c = self.vdirs.len() as u32;
                        self.vdirs.push(VDir {
                            children: BTreeMap::new(),
                            maps: Vec::new(),
                        });
                        self.vdirs[cur as usize].children.insert(part.clone(), c);
                        c
                    }
                };
            }
            self.vdirs[cur as usize].maps.push((m as u32, Vec::new()));
        }
        // Parents come before their children: inherit top-down.
        for v in 0..self.vdirs.len() {
            let inherited = self.vdirs[v].maps.clone();
            let children: Vec<(Vec<u8>, u32)> = self.vdirs[v]
                .children
                .iter()
                .map(|(n, &c)| (n.clone(), c))
                .collect();
            for (name, c) in children {
                for (m, sub) in &inherited {
                    let mut deeper = sub.clone();
                    deeper.push(name.clone());
                    self.vdirs[c as usize].maps.push((*m, deeper));
                }
            }
        }
    }

    fn source(&self, m: u32) -> &dyn Layer {
        &*self.sources[self.maps[m as usize].source]
    }

    /// The directory `sub` below map `m`'s source directory, if there.
    fn map_dir(&self, m: u32, sub: &[Vec<u8>]) -> Result<Option<LObj>> {
        let src = self.source(m);
        let mut cur = self.roots[m as usize].clone();
        for part in sub {
            let name = CString::new(part.clone()).map_err(|_| Errno::EIO)?;
            match src.lookup(&cur, &name)? {
                Some((o, st)) if st.is_dir() => cur = o,
                _ => return Ok(None),
            }
        }
        Ok(Some(cur))
    }

    fn visible(&self, m: u32, name: &[u8], is_dir: bool) -> bool {
        let map = &self.maps[m as usize];
        if !map.hidden && name.first() == Some(&b'.') {
            return false;
        }
        let text = String::from_utf8_lossy(name);
        if map.exclude.iter().any(|p| p.matches(&text)) {
            return false;
        }
        is_dir || map.include.is_empty() || map.include.iter().any(|p| p.matches(&text))
    }

    /// The name a non-directory `name` shows as, given the names its
    /// directory has (a rename never takes a name the directory uses).
    fn shown_name(&self, m: u32, name: &[u8], has: impl Fn(&[u8]) -> bool) -> Vec<u8> {
        for (from, to) in &self.maps[m as usize].renames {
            if let Some(stem) = name.strip_suffix(from.as_slice())
                && !stem.is_empty()
            {
                let renamed = [stem, to].concat();
                if !has(&renamed) {
                    return renamed;
                }
            }
        }
        name.to_vec()
    }

    fn mapped(&self, m: u32, obj: LObj, mut st: LStat) -> (LObj, LStat) {
        st.key = mix(m, st.key);
        (LObj::Mapped(Arc::new(Mapped { map: m, obj })), st)
    }

    /// `name` as shown in directory `dir` of map `m`.
    fn find(&self, m: u32, dir: &LObj, name: &CStr) -> Result<Option<(LObj, LStat)>> {
        let src = self.source(m);
        let bytes = name.to_bytes();
        let has = |n: &[u8]| -> bool {
            CString::new(n)
                .ok()
                .and_then(|c| src.lookup(dir, &c).ok().flatten())
                .is_some()
        };
        if let Some((o, st)) = src.lookup(dir, name)? {
            let is_dir = st.is_dir();
            // A file shown under its renamed name is not there by its own.
            let shown_here = is_dir || self.shown_name(m, bytes, has) == bytes;
            if shown_here && self.visible(m, bytes, is_dir) {
                return Ok(Some(self.mapped(m, o, st)));
            }
            return Ok(None);
        }
        for (from, to) in &self.maps[m as usize].renames {
            let Some(stem) = bytes.strip_suffix(to.as_slice()) else {
                continue;
            };
            if stem.is_empty() {
                continue;
            }
            let original = CString::new([stem, from].concat()).map_err(|_| Errno::EIO)?;
            if let Some((o, st)) = src.lookup(dir, &original)?
                && !st.is_dir()
                && self.visible(m, original.to_bytes(), false)
            {
                return Ok(Some(self.mapped(m, o, st)));
            }
        }
        Ok(None)
    }

    /// Appends what map `m` shows of its directory `dir` to `out`, skipping
    /// names in `seen`.
    fn list_map(
        &self,
        m: u32,
        dir: &LObj,
        out: &mut Vec<LName>,
        seen: &mut HashSet<Vec<u8>>,
    ) -> Result<()> {
        let mut names = Vec::new();
        self.source(m).list(dir, &mut names)?;
        let present: HashSet<&[u8]> = names.iter().map(|n| n.name.to_bytes()).collect();
        for n in &names {
            let name = n.name.to_bytes();
            let is_dir = n.kind == FileKind::Directory;
            if !self.visible(m, name, is_dir) {
                continue;
            }
            let shown = if is_dir {
                name.to_vec()
            } else {
                self.shown_name(m, name, |c| present.contains(c))
            };
            if seen.insert(shown.clone()) {
                out.push(LName {
                    name: layer_name(&self.label, &shown)?,
                    kind: n.kind,
                    key: mix(m, n.key),
                });
            }
        }
        Ok(())
    }

    fn virtual_stat(&self, v: u32) -> LStat {
        LStat {
            mode: libc::S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
            size: 0,
            blocks: 0,
            nlink: 2,
            rdev: 0,
            atime: self.mtime,
            mtime: self.mtime,
            ctime: self.mtime,
            key: (VIRTUAL, v as u64),
        }
    }
}

/// A source object's identity as map `m` shows it: the same object under
/// two maps is two objects of the view.
fn mix(m: u32, (dev, ino): (u64, u64)) -> (u64, u64) {
    (dev.wrapping_add((m as u64 + 1) << 48), ino)
}

impl Layer for ViewLayer {
    fn describe(&self) -> String {
        self.label.clone()
    }

    fn root(&self) -> LObj {
        LObj::Entry(0)
    }

    fn stat(&self, obj: &LObj) -> Result<LStat> {
        match obj {
            LObj::Entry(v) if (*v as usize) < self.vdirs.len() => Ok(self.virtual_stat(*v)),
            LObj::Mapped(x) => {
                let mut st = self.source(x.map).stat(&x.obj)?;
                st.key = mix(x.map, st.key);
                Ok(st)
            }
            _ => Err(Errno::EIO),
        }
    }

    fn lookup(&self, dir: &LObj, name: &CStr) -> Result<Option<(LObj, LStat)>> {
        match dir {
            LObj::Entry(v) => {
                let vd = self.vdirs.get(*v as usize).ok_or(Errno::EIO)?;
                if let Some(&c) = vd.children.get(name.to_bytes()) {
                    return Ok(Some((LObj::Entry(c), self.virtual_stat(c))));
                }
                for (m, sub) in &vd.maps {
                    if let Some(d) = self.map_dir(*m, sub)?
                        && let Some(found) = self.find(*m, &d, name)?
                    {
                        return Ok(Some(found));
                    }
                }
                Ok(None)
            }
            LObj::Mapped(x) => self.find(x.map, &x.obj, name),
            LObj::Host(_) => Err(Errno::EIO),
        }
    }

    fn list(&self, dir: &LObj, out: &mut Vec<LName>) -> Result<()> {
        let mut seen = HashSet::new();
        match dir {
            LObj::Entry(v) => {
                let vd = self.vdirs.get(*v as usize).ok_or(Errno::EIO)?;
                for (name, &c) in &vd.children {
                    seen.insert(name.clone());
                    out.push(LName {
                        name: layer_name(&self.label, name)?,
                        kind: FileKind::Directory,
                        key: (VIRTUAL, c as u64),
                    });
                }
                for (m, sub) in &vd.maps {
                    if let Some(d) = self.map_dir(*m, sub)? {
                        self.list_map(*m, &d, out, &mut seen)?;
                    }
                }
                Ok(())
            }
            LObj::Mapped(x) => self.list_map(x.map, &x.obj, out, &mut seen),
            LObj::Host(_) => Err(Errno::EIO),
        }
    }

    fn readlink(&self, obj: &LObj) -> Result<Vec<u8>> {
        match obj {
            LObj::Mapped(x) => self.source(x.map).readlink(&x.obj),
            _ => Err(Errno::EINVAL),
        }
    }

    fn xattrs(&self, obj: &LObj) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        match obj {
            LObj::Mapped(x) => self.source(x.map).xattrs(&x.obj),
            _ => Ok(Vec::new()),
        }
    }

    fn xattr(&self, obj: &LObj, name: &CStr) -> Option<Vec<u8>> {
        match obj {
            LObj::Mapped(x) => self.source(x.map).xattr(&x.obj, name),
            _ => None,
        }
    }

    fn open(&self, obj: &LObj) -> Result<OwnedFd> {
        match obj {
            LObj::Mapped(x) => self.source(x.map).open(&x.obj),
            _ => Err(Errno::EISDIR),
        }
    }

    fn cached_fds(&self) -> usize {
        self.sources.iter().map(|s| s.cached_fds()).sum()
    }

    fn unchanging(&self) -> bool {
        self.sources.iter().all(|s| s.unchanging())
    }

    fn statfs_path(&self) -> &Path {
        &self.spec_path
    }
}

#[cfg(test)]
mod tests;
