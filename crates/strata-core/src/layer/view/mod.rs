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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use spec::{ArchiveMode, Map, Source, Spec};

use parking_lot::Mutex;

use super::{ArchiveLayer, LName, LObj, LStat, Layer, Mapped, Within, layer_name};
use crate::fs::FileKind;
use crate::{Errno, Result};

/// An archive file of a view's source: (source, the file's identity there).
type ArchiveId = (usize, (u64, u64));
/// What tells an archive file's content changed: its (size, mtime).
type ArchiveVersion = (u64, (i64, u32));

/// How long what `flatten`/`auto` archives put into a directory is reused.
const FLAT_FOR: std::time::Duration = std::time::Duration::from_secs(1);
/// Past this many directories, expired ones are dropped (each holds its
/// archives open).
const FLAT_KEPT: usize = 256;

/// What the archives of a directory put into it (`flatten`, `auto`).
#[derive(Default)]
struct Flat {
    /// Archive files not shown themselves.
    absorbed: HashSet<Vec<u8>>,
    members: Vec<FlatMember>,
}

/// An archive member shown in the archive's directory.
struct FlatMember {
    name: Vec<u8>,
    obj: LObj,
    stat: LStat,
    archive: Arc<ArchiveLayer>,
    /// The archive file's identity.
    file: (u64, u64),
}

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
    /// Each map's place and rules, as `strata view check` shows them.
    rules: Vec<String>,
    /// Where archive indexes are kept across mounts.
    index_dir: Option<PathBuf>,
    /// Archives shown as directories, by (source, file identity), with the
    /// (size, mtime) they were indexed at; indexed on first use.
    archives: Mutex<HashMap<ArchiveId, (ArchiveVersion, Arc<ArchiveLayer>)>>,
    /// What archives put into directories, by (map, directory identity),
    /// with when it was read and the directory's mtime then.
    flat: Mutex<FlatCache>,
}

type FlatCache = HashMap<(u32, (u64, u64)), (std::time::Instant, (i64, u32), Arc<Flat>)>;

impl ViewLayer {
    /// Opens the view a spec file declares, with its sources.
    pub fn open(
        spec_path: &Path,
        fd_cache: usize,
        index_dir: Option<&Path>,
    ) -> std::result::Result<ViewLayer, String> {
        let spec = Spec::load(spec_path).map_err(|e| e.join("\n"))?;
        let mut sources: Vec<Box<dyn Layer>> = Vec::new();
        for s in &spec.sources {
            let layer = if s.path.is_dir() {
                super::open_host(&s.path, fd_cache)?
            } else {
                super::open_archive(&s.path, index_dir)?
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
        let rules = spec.describe();
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
            rules,
            index_dir: index_dir.map(Path::to_path_buf),
            archives: Mutex::default(),
            flat: Mutex::default(),
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

    /// The layer objects of `within` live in, for map `m`.
    fn layer_in<'a>(&'a self, m: u32, within: &'a Within) -> &'a dyn Layer {
        match within {
            Within::Archive(a, _) => &**a,
            Within::Source | Within::ArchiveRoot => self.source(m),
        }
    }

    /// Whether a source file of map `m` called `name` shows as a directory
    /// (its archive's content). Told by the name: listing a directory of
    /// archives opens none of them.
    fn shows_as_dir(&self, m: u32, within: &Within, name: &[u8], kind: FileKind) -> bool {
        // (`auto` archives that hold one file are absorbed before this.)
        matches!(
            self.maps[m as usize].archives,
            ArchiveMode::Dir | ArchiveMode::Auto
        ) && self.is_archive(within, name, kind)
    }

    /// Whether a source file is an archive, by its name.
    fn is_archive(&self, within: &Within, name: &[u8], kind: FileKind) -> bool {
        matches!(within, Within::Source)
            && kind == FileKind::Regular
            && ARCHIVE_SUFFIXES.iter().any(|s| {
                name.len() > s.len() && name[name.len() - s.len()..].eq_ignore_ascii_case(s)
            })
    }

    /// What the archives of source directory `dir` of map `m` put into it
    /// under `flatten` and `auto` (cached a second per directory: a listing
    /// and the lookups of its names that follow read each archive once).
    fn flattened(&self, m: u32, dir: &LObj) -> Result<Arc<Flat>> {
        let mode = self.maps[m as usize].archives;
        if !matches!(mode, ArchiveMode::Flatten | ArchiveMode::Auto) {
            return Ok(Arc::default());
        }
        let src = self.source(m);
        let dst = src.stat(dir)?;
        let id = (m, dst.key);
        if let Some((at, mtime, flat)) = self.flat.lock().get(&id)
            && *mtime == dst.mtime
            && at.elapsed() < FLAT_FOR
        {
            return Ok(flat.clone());
        }
        let mut names = Vec::new();
        src.list(dir, &mut names)?;
        let mut flat = Flat::default();
        let mut taken: HashSet<Vec<u8>> =
            names.iter().map(|n| n.name.to_bytes().to_vec()).collect();
        for n in &names {
            let name = n.name.to_bytes();
            if !self.is_archive(&Within::Source, name, n.kind) || !self.visible(m, name, true) {
                continue;
            }
            let Some((file, _)) = src.lookup(dir, &n.name)? else {
                continue;
            };
            let Ok((a, fk)) = self.archive(m, &file) else {
                continue; // shown as the file (flatten) or a directory (auto)
            };
            let mut members = Vec::new();
            if mode == ArchiveMode::Flatten {
                let mut top = Vec::new();
                a.list(&a.root(), &mut top)?;
                for t in top {
                    let is_dir = t.kind == FileKind::Directory;
                    if let Some((o, st)) = a.lookup(&a.root(), &t.name)?
                        && self.visible(m, t.name.to_bytes(), is_dir)
                    {
                        members.push((t.name.to_bytes().to_vec(), o, st));
                    }
                }
            } else {
                let files = self.files_of(m, &a, a.root(), 2)?;
                if files.len() != 1 {
                    continue; // a directory
                }
                members = files;
            }
            flat.absorbed.insert(name.to_vec());
            for (member, o, st) in members {
                let shown = if st.is_dir() {
                    member
                } else {
                    self.shown_name(m, &member, |c| taken.contains(c))
                };
                if taken.insert(shown.clone()) {
                    flat.members.push(FlatMember {
                        name: shown,
                        obj: o,
                        stat: st,
                        archive: a.clone(),
                        file: fk,
                    });
                }
            }
        }
        let flat = Arc::new(flat);
        let mut cache = self.flat.lock();
        if cache.len() >= FLAT_KEPT {
            cache.retain(|_, (at, _, _)| at.elapsed() < FLAT_FOR);
        }
        cache.insert(id, (std::time::Instant::now(), dst.mtime, flat.clone()));
        Ok(flat)
    }

    /// The files of archive `a` below `dir` that map `m` shows, with their
    /// names: at most `limit` (enough to tell one from more).
    fn files_of(
        &self,
        m: u32,
        a: &ArchiveLayer,
        dir: LObj,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, LObj, LStat)>> {
        let mut out = Vec::new();
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let mut names = Vec::new();
            a.list(&d, &mut names)?;
            for n in names {
                let is_dir = n.kind == FileKind::Directory;
                if !self.visible(m, n.name.to_bytes(), is_dir) {
                    continue;
                }
                let Some((o, st)) = a.lookup(&d, &n.name)? else {
                    continue;
                };
                if is_dir {
                    stack.push(o);
                } else {
                    out.push((n.name.to_bytes().to_vec(), o, st));
                    if out.len() >= limit {
                        return Ok(out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// `obj` (found by `name` with stat `st` in a directory of `within`) as
    /// map `m` shows it.
    fn mapped(
        &self,
        m: u32,
        within: &Within,
        name: &[u8],
        obj: LObj,
        mut st: LStat,
    ) -> (LObj, LStat) {
        let kind = st.kind().unwrap_or(FileKind::Regular);
        let within = if self.shows_as_dir(m, within, name, kind) {
            st = archive_dir_stat(&st);
            Within::ArchiveRoot
        } else {
            st.key = match within {
                Within::Archive(_, file) => archive_key(*file, st.key.1),
                _ => st.key,
            };
            within.clone()
        };
        st.key = mix(m, st.key);
        let x = Mapped {
            map: m,
            obj,
            within,
        };
        (LObj::Mapped(Arc::new(x)), st)
    }

    /// The archive a source file of map `m` holds, indexed on first use.
    fn archive(&self, m: u32, file: &LObj) -> Result<(Arc<ArchiveLayer>, (u64, u64))> {
        let src = self.source(m);
        let st = src.stat(file)?;
        let (key, version) = (st.key, (st.size, st.mtime));
        let id = (self.maps[m as usize].source, key);
        if let Some((v, a)) = self.archives.lock().get(&id)
            && *v == version
        {
            return Ok((a.clone(), key));
        }
        // New, or changed since it was indexed (the next lookups see the
        // new content; objects handed out before keep the old index).
        // Named by where it is (the source says), for logs and explain.
        let label = PathBuf::from(src.locate(file));
        let fd = src.open(file)?;
        let a = ArchiveLayer::from_file(std::fs::File::from(fd), &label, self.index_dir.as_deref())
            .map_err(|e| {
                tracing::error!(view = %self.label, "{e}");
                Errno::EIO
            })?;
        let a = Arc::new(a);
        self.archives.lock().insert(id, (version, a.clone()));
        Ok((a, key))
    }

    /// The directory `x` stands for: its layer's object and where it lives
    /// (an archive shown as a directory stands for the archive's root).
    fn dir_of(&self, x: &Mapped) -> Result<(Within, LObj)> {
        match &x.within {
            Within::ArchiveRoot => {
                let (a, key) = self.archive(x.map, &x.obj)?;
                let root = a.root();
                Ok((Within::Archive(a, key), root))
            }
            w => Ok((w.clone(), x.obj.clone())),
        }
    }

    /// `name` as shown in directory `dir` (of `within`) of map `m`.
    fn find(
        &self,
        m: u32,
        within: &Within,
        dir: &LObj,
        name: &CStr,
    ) -> Result<Option<(LObj, LStat)>> {
        let src = self.layer_in(m, within);
        let bytes = name.to_bytes();
        let has = |n: &[u8]| -> bool {
            CString::new(n)
                .ok()
                .and_then(|c| src.lookup(dir, &c).ok().flatten())
                .is_some()
        };
        let flat = match within {
            Within::Source => self.flattened(m, dir)?,
            _ => Arc::default(),
        };
        if let Some(f) = flat.members.iter().find(|f| f.name == bytes) {
            let within = Within::Archive(f.archive.clone(), f.file);
            return Ok(Some(self.mapped(m, &within, bytes, f.obj.clone(), f.stat)));
        }
        if flat.absorbed.contains(bytes) {
            return Ok(None);
        }
        if let Some((o, st)) = src.lookup(dir, name)? {
            let kind = st.kind().unwrap_or(FileKind::Regular);
            let is_dir = st.is_dir() || self.shows_as_dir(m, within, bytes, kind);
            // A file shown under its renamed name is not there by its own.
            let shown_here = is_dir || self.shown_name(m, bytes, has) == bytes;
            if shown_here && self.visible(m, bytes, is_dir) {
                return Ok(Some(self.mapped(m, within, bytes, o, st)));
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
                return Ok(Some(self.mapped(m, within, original.to_bytes(), o, st)));
            }
        }
        Ok(None)
    }

    /// Appends what map `m` shows of its directory `dir` (of `within`) to
    /// `out`, skipping names in `seen`.
    fn list_map(
        &self,
        m: u32,
        within: &Within,
        dir: &LObj,
        out: &mut Vec<LName>,
        seen: &mut HashSet<Vec<u8>>,
    ) -> Result<()> {
        let mut names = Vec::new();
        self.layer_in(m, within).list(dir, &mut names)?;
        let flat = match within {
            Within::Source => self.flattened(m, dir)?,
            _ => Arc::default(),
        };
        let present: HashSet<&[u8]> = names.iter().map(|n| n.name.to_bytes()).collect();
        for n in &names {
            let name = n.name.to_bytes();
            if flat.absorbed.contains(name) {
                continue;
            }
            let as_dir = self.shows_as_dir(m, within, name, n.kind);
            let is_dir = n.kind == FileKind::Directory;
            if !self.visible(m, name, is_dir || as_dir) {
                continue;
            }
            let (shown, kind, key) = if as_dir {
                (name.to_vec(), FileKind::Directory, archive_key(n.key, 0))
            } else if is_dir {
                (name.to_vec(), n.kind, self.inner_key(within, n.key))
            } else {
                let shown = self.shown_name(m, name, |c| present.contains(c));
                (shown, n.kind, self.inner_key(within, n.key))
            };
            if seen.insert(shown.clone()) {
                out.push(LName {
                    name: layer_name(&self.label, &shown)?,
                    kind,
                    key: mix(m, key),
                });
            }
        }
        for f in &flat.members {
            if seen.insert(f.name.clone()) {
                out.push(LName {
                    name: layer_name(&self.label, &f.name)?,
                    kind: f.stat.kind().unwrap_or(FileKind::Regular),
                    key: mix(m, archive_key(f.file, f.stat.key.1)),
                });
            }
        }
        Ok(())
    }

    /// The identity of an object of `within` before the map is mixed in.
    fn inner_key(&self, within: &Within, key: (u64, u64)) -> (u64, u64) {
        match within {
            Within::Archive(_, file) => archive_key(*file, key.1),
            _ => key,
        }
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

/// Name endings of the files `archives = "dir"` shows as directories.
const ARCHIVE_SUFFIXES: [&[u8]; 8] = [
    b".zip",
    b".tar",
    b".tar.gz",
    b".tgz",
    b".tar.zst",
    b".tzst",
    b".tar.xz",
    b".txz",
];

/// The identity of member `inode` of the archive whose file is `file`.
fn archive_key(file: (u64, u64), inode: u64) -> (u64, u64) {
    (
        0x4152_0000_0000_0000 ^ file.0.rotate_left(29) ^ file.1,
        inode,
    )
}

/// An archive file shown as a directory, before its index is read: its
/// own times and owner, directory permissions (search where it can be
/// read).
fn archive_dir_stat(file: &LStat) -> LStat {
    let perm = file.mode & 0o777;
    LStat {
        mode: libc::S_IFDIR | perm | ((perm & 0o444) >> 2),
        size: 0,
        blocks: 0,
        nlink: 2,
        rdev: 0,
        key: archive_key(file.key, 0),
        ..*file
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

    fn locate(&self, obj: &LObj) -> String {
        match obj {
            LObj::Mapped(x) => {
                let inner = self.layer_in(x.map, &x.within).locate(&x.obj);
                let shown = match x.within {
                    Within::ArchiveRoot => " (an archive shown as a directory)",
                    _ => "",
                };
                format!(
                    "{inner}{shown}, by map {} of {}: {}",
                    x.map + 1,
                    self.label,
                    self.rules[x.map as usize]
                )
            }
            _ => format!("a directory of {}", self.label),
        }
    }

    fn stat(&self, obj: &LObj) -> Result<LStat> {
        match obj {
            LObj::Entry(v) if (*v as usize) < self.vdirs.len() => Ok(self.virtual_stat(*v)),
            LObj::Mapped(x) => {
                let mut st = self.layer_in(x.map, &x.within).stat(&x.obj)?;
                st = match &x.within {
                    Within::ArchiveRoot => archive_dir_stat(&st),
                    w => LStat {
                        key: self.inner_key(w, st.key),
                        ..st
                    },
                };
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
                        && let Some(found) = self.find(*m, &Within::Source, &d, name)?
                    {
                        return Ok(Some(found));
                    }
                }
                Ok(None)
            }
            LObj::Mapped(x) => {
                let (within, d) = self.dir_of(x)?;
                self.find(x.map, &within, &d, name)
            }
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
                        self.list_map(*m, &Within::Source, &d, out, &mut seen)?;
                    }
                }
                Ok(())
            }
            LObj::Mapped(x) => {
                let (within, d) = self.dir_of(x)?;
                self.list_map(x.map, &within, &d, out, &mut seen)
            }
            LObj::Host(_) => Err(Errno::EIO),
        }
    }

    fn readlink(&self, obj: &LObj) -> Result<Vec<u8>> {
        match obj {
            LObj::Mapped(x) if !matches!(x.within, Within::ArchiveRoot) => {
                self.layer_in(x.map, &x.within).readlink(&x.obj)
            }
            _ => Err(Errno::EINVAL),
        }
    }

    fn xattrs(&self, obj: &LObj) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        match obj {
            LObj::Mapped(x) if !matches!(x.within, Within::ArchiveRoot) => {
                self.layer_in(x.map, &x.within).xattrs(&x.obj)
            }
            _ => Ok(Vec::new()),
        }
    }

    fn xattr(&self, obj: &LObj, name: &CStr) -> Option<Vec<u8>> {
        match obj {
            LObj::Mapped(x) if !matches!(x.within, Within::ArchiveRoot) => {
                self.layer_in(x.map, &x.within).xattr(&x.obj, name)
            }
            _ => None,
        }
    }

    fn open(&self, obj: &LObj) -> Result<OwnedFd> {
        match obj {
            LObj::Mapped(x) if !matches!(x.within, Within::ArchiveRoot) => {
                self.layer_in(x.map, &x.within).open(&x.obj)
            }
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
