//! A union of host branches with mergerfs semantics.
//!
//! A node is a name in the union: its parent and name (the path policies and
//! path cloning need) and its instances, the host objects with that path on
//! each branch, in branch order, refreshed at every lookup. Policies
//! ([`policy`]) pick the instances an operation uses; the runtime options live
//! in [`Settings`] and are read and changed through the control file.

pub mod control;
mod exdev;
mod files;
mod fs;
pub mod policy;
pub mod settings;

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use rustix::fs::{AtFlags, Mode, OFlags, Stat};

use crate::fs::*;
use crate::host::files::OpenFiles;
use crate::host::watch::{self, HostAliases, HostId, HostWatch, UNWATCHED_TTL};
use crate::host::{HostDir, HostNode, attr_from_stat, dirent_kind};
use crate::inode::InodeTable;
use crate::listing::DirEnt;
use crate::source::{self, BranchMode};
use crate::{Errno, Result};
use policy::{Candidate, Func, Policy, Want};
pub use settings::Settings;
use settings::{FollowSymlinks, InodeCalc, StatfsIgnore, StatfsMode, XattrMode};

/// One host directory of the union.
pub struct Branch {
    pub id: u64,
    pub path: PathBuf,
    pub mode: BranchMode,
    /// Per-branch `minfreespace`; the global setting applies when unset.
    pub min_free: Option<u64>,
    dir: HostDir,
}

impl Branch {
    /// A directory by its union path (`a/b`, empty: the branch root) on this
    /// branch, walked one component at a time and never through a symlink;
    /// with `mkdir`, missing components are created (mode 0755).
    fn walk(&self, rel: &[u8], mkdir: bool) -> Result<OwnedFd> {
        let mut dir = rustix::fs::openat(
            &*self.dir.fd(self.dir.root())?,
            c".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        for part in rel.split(|c| *c == b'/').filter(|p| !p.is_empty()) {
            let part = OsStr::from_bytes(part);
            if mkdir {
                match rustix::fs::mkdirat(&dir, part, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            dir = rustix::fs::openat(
                &dir,
                part,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
        }
        Ok(dir)
    }

    /// The branch as written in a branch list: `PATH=MODE[,MINFREE]`.
    pub fn spec(&self) -> String {
        match self.min_free {
            Some(m) => format!("{}={},{m}", self.path.display(), self.mode),
            None => format!("{}={}", self.path.display(), self.mode),
        }
    }
}

/// A host object holding a union node's path on one branch.
#[derive(Clone)]
struct Inst {
    branch: Arc<Branch>,
    node: Arc<HostNode>,
}

impl Inst {
    fn fd(&self) -> Result<Arc<OwnedFd>> {
        self.branch.dir.fd(&self.node)
    }
}

struct UNode {
    kind: FileKind,
    /// Parent node id and name: where the node was last seen.
    loc: Mutex<(u64, CString)>,
    inst: RwLock<Vec<Inst>>,
}

/// What the union keeps about an open file besides its descriptor.
#[derive(Clone, Copy)]
struct UFile {
    ino: u64,
    /// The branch the file is open on (it changes when `moveonenospc` moves it).
    branch: u64,
    flags: i32,
    /// `nullrw` when opened: reads and writes touch nothing.
    null: bool,
    /// Served by the kernel (passthrough): the daemon never sees its I/O.
    passthrough: bool,
}

/// A node's key in the table.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// A non-directory: the (dev, ino) of the instance it was first found
    /// by, so hard links share a node.
    Obj(u64, u64),
    /// A directory: its place (parent id, name), as the kernel's dentry. The
    /// kernel holds one dentry per directory inode, so a directory must be
    /// one node per place whatever its copies do: a copy left behind by a
    /// rename that failed on some branch, or one reached through a node
    /// whose copies moved, is never the node the kernel moved (which it
    /// would refuse there: ESTALE, or ELOOP), and a copy cloned onto an
    /// earlier branch does not make a second node (two kernel inodes, two
    /// locks: creates in the directory would no longer be serialised).
    Place(u64, CString),
}

/// A name on one branch: the parent's instance there, its fd, the name's stat.
type Found = (Inst, Arc<OwnedFd>, Stat);

pub struct UnionConfig {
    pub branches: Vec<source::Branch>,
    pub settings: Settings,
    /// Watch the branches for outside changes (and so cache for long).
    pub watch: bool,
    /// Where the union is mounted (`link-exdev`/`rename-exdev` symlinks may point there).
    pub mountpoint: PathBuf,
    pub fd_cache: usize,
    pub passthrough: bool,
}

type BranchList = RwLock<Arc<Vec<Arc<Branch>>>>;

pub struct Union {
    branches: Arc<BranchList>,
    next_branch: AtomicU64,
    settings: RwLock<Settings>,
    table: Arc<InodeTable<Key, UNode>>,
    /// The instances that are not their node's table key (the key is the
    /// first instance), by host object: how a host change event on another
    /// branch finds the node. Entries of forgotten nodes are checked on use
    /// and pruned in bulk.
    aliases: Arc<Mutex<HostAliases>>,
    watch: Option<Arc<HostWatch>>,
    mountpoint: PathBuf,
    /// `mountpoint` resolved before mounting (empty if it did not resolve):
    /// branches added at runtime must keep apart from it, and resolving it
    /// then would go through this very mount.
    real_mountpoint: PathBuf,
    files: OpenFiles,
    open: Mutex<HashMap<u64, UFile>>,
    /// Serialises `moveonenospc` moves.
    moving: Mutex<()>,
    fd_cache: usize,
    /// Branches at mount, to share `fd_cache` among (runtime additions get
    /// the same share; the bound is not exact, only never far off).
    branch_count: usize,
    passthrough: bool,
    rng: Mutex<XorShift>,
    invalidator: RwLock<Option<Arc<dyn Invalidator>>>,
}

/// xorshift64*: plenty for spreading files over branches.
struct XorShift(u64);

impl policy::Rng for XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1)
    }
}

/// FNV-1a: a stable hash for `inodecalc`.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in *p {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn is_dir(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn kind_of(st: &Stat) -> FileKind {
    FileKind::from_mode(st.st_mode).unwrap_or(FileKind::Regular)
}

/// Whether node `id` still has an instance that is host object `obj`.
fn node_has(table: &InodeTable<Key, UNode>, id: u64, obj: HostId) -> bool {
    table
        .get(id)
        .is_some_and(|n| n.inst.read().iter().any(|i| i.node.host_id() == obj))
}

/// Whether `old` is the object `new` stands for under `key`: for a file,
/// it holds `new`'s keyed instance; for a directory, any of its copies
/// (not a new directory made at the place since, nor an inode number reused).
fn same_object(old: &UNode, new: &UNode, key: &Key) -> bool {
    let new = new.inst.read();
    let same = |o: &Inst, n: &Inst| {
        o.branch.id == n.branch.id && (Arc::ptr_eq(&o.node, &n.node) || o.node.same_object(&n.node))
    };
    let old = old.inst.read();
    match key {
        Key::Obj(dev, ino) => new
            .iter()
            .find(|n| (n.node.dev, n.node.ino) == (*dev & !FOLLOWED, *ino))
            .is_some_and(|n| old.iter().any(|o| same(o, n))),
        Key::Place(..) => new.iter().any(|n| old.iter().any(|o| same(o, n))),
    }
}

/// The node keyed by host object `obj`, if it still has that instance.
fn node_by_key(table: &InodeTable<Key, UNode>, obj: HostId) -> Option<u64> {
    let (id, _) = table.get_by_key(&Key::Obj(obj.dev, obj.ino))?;
    node_has(table, id, obj).then_some(id)
}

fn devino_hash(dev: u64, ino: u64) -> u64 {
    fnv(&[&dev.to_ne_bytes(), &ino.to_ne_bytes()])
}

/// Keeps an id clear of the root, the control file and the table's fallback range.
fn clear_of_reserved(h: u64) -> u64 {
    let h = h & !(1 << 63);
    if h <= ROOT_ID { h + 2 } else { h }
}

/// The id the table looks for a key at first: what `inodecalc=hybrid-hash`
/// (the default) and `devino-hash` give a non-directory. Nodes that got
/// another id (directories, other `inodecalc` modes) are found through the
/// table's key map instead (a place "derives" the root's id, which no
/// place key ever holds).
fn derived_id(key: &Key) -> u64 {
    match key {
        Key::Obj(dev, ino) => clear_of_reserved(devino_hash(dev & !FOLLOWED, *ino)),
        Key::Place(..) => ROOT_ID,
    }
}

/// Set in a key's device for a symlink followed to its target
/// (`follow-symlinks`), so the target's own node stays apart.
const FOLLOWED: u64 = 1 << 63;

/// Whether `e` only means "not on this branch".
fn absent(e: Errno) -> bool {
    e == Errno::ENOENT || e == Errno::ENOTDIR
}

impl Union {
    pub fn new(cfg: UnionConfig) -> std::result::Result<Union, String> {
        if cfg.branches.is_empty() {
            return Err("no branches".into());
        }
        let watch = if cfg.watch {
            match HostWatch::new() {
                Ok(w) => Some(Arc::new(w)),
                Err(e) => {
                    tracing::info!(
                        "branch changes are not watched ({e}); kernel caches time out after {}s",
                        UNWATCHED_TTL.as_secs()
                    );
                    None
                }
            }
        } else {
            None
        };
        let mut fs = Union {
            branch_count: 1,
            branches: Arc::new(RwLock::new(Arc::new(Vec::new()))),
            next_branch: AtomicU64::new(1),
            settings: RwLock::new(cfg.settings),
            aliases: Arc::default(),
            watch,
            real_mountpoint: std::fs::canonicalize(&cfg.mountpoint).unwrap_or_default(),
            mountpoint: cfg.mountpoint,
            table: Arc::new(InodeTable::with_derived_ids(
                Key::Obj(0, 0),
                Arc::new(UNode {
                    kind: FileKind::Directory,
                    loc: Mutex::new((ROOT_ID, CString::default())),
                    inst: RwLock::new(Vec::new()),
                }),
                Box::new(derived_id),
            )),
            files: OpenFiles::default(),
            open: Mutex::new(HashMap::new()),
            moving: Mutex::new(()),
            fd_cache: cfg.fd_cache,
            passthrough: cfg.passthrough,
            rng: Mutex::new(XorShift(
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0x1234_5678, |d| d.as_nanos() as u64)
                    | 1,
            )),
            invalidator: RwLock::new(None),
        };
        fs.branch_count = cfg.branches.len();
        let branches = cfg
            .branches
            .iter()
            .map(|b| fs.open_branch(b))
            .collect::<std::result::Result<Vec<_>, String>>()?;
        *fs.branches.write() = Arc::new(branches);
        Ok(fs)
    }

    fn open_branch(&self, b: &source::Branch) -> std::result::Result<Arc<Branch>, String> {
        source::check_apart(&self.real_mountpoint, "branch", &b.path)?;
        let dir = HostDir::open(&b.path, self.fd_cache_per_branch())?;
        self.watch_dir(&dir, dir.root());
        Ok(Arc::new(Branch {
            id: self.next_branch.fetch_add(1, Ordering::Relaxed),
            path: b.path.clone(),
            mode: b.mode,
            min_free: b.min_free,
            dir,
        }))
    }

    /// `cache.fds` bounds the whole union: each branch gets a share, so
    /// many branches never run the daemon out of descriptors.
    fn fd_cache_per_branch(&self) -> usize {
        (self.fd_cache / self.branch_count.max(1)).max(64)
    }

    pub fn branches(&self) -> Arc<Vec<Arc<Branch>>> {
        self.branches.read().clone()
    }

    pub fn settings(&self) -> Settings {
        self.settings.read().clone()
    }

    fn node(&self, ino: u64) -> Result<Arc<UNode>> {
        self.table.get(ino).ok_or(Errno::ESTALE)
    }

    /// The node's instances on branches still in the union, in branch order.
    /// The root is on every branch.
    fn instances(&self, ino: u64) -> Result<Vec<Inst>> {
        let branches = self.branches();
        if ino == ROOT_ID {
            return Ok(branches
                .iter()
                .map(|b| Inst {
                    branch: b.clone(),
                    node: b.dir.root().clone(),
                })
                .collect());
        }
        let node = self.node(ino)?;
        let inst: Vec<Inst> = node
            .inst
            .read()
            .iter()
            .filter(|i| branches.iter().any(|b| b.id == i.branch.id))
            .cloned()
            .collect();
        if inst.is_empty() {
            return Err(Errno::ENOENT);
        }
        Ok(inst)
    }

    /// The node's path in the union, without a leading `/` (empty: the root).
    fn rel_path(&self, ino: u64) -> Vec<u8> {
        let mut parts: Vec<CString> = Vec::new();
        let mut id = ino;
        while id != ROOT_ID && parts.len() < 4096 {
            let Some(node) = self.table.get(id) else {
                break;
            };
            let (parent, name) = node.loc.lock().clone();
            parts.push(name);
            id = parent;
        }
        let mut out = Vec::new();
        for (i, p) in parts.iter().rev().enumerate() {
            if i > 0 {
                out.push(b'/');
            }
            out.extend_from_slice(p.to_bytes());
        }
        out
    }

    fn ancestors(&self, ino: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut id = ino;
        while id != ROOT_ID && out.len() < 4096 {
            let Some(node) = self.table.get(id) else {
                break;
            };
            id = node.loc.lock().0;
            out.push(id);
        }
        out
    }

    /// The node id `inodecalc` asks for.
    fn calc_id(&self, path: &[u8], dir: bool, dev: u64, ino: u64) -> u64 {
        let calc = self.settings.read().inodecalc;
        let path_hash = || fnv(&[path]);
        let devino_hash = || devino_hash(dev, ino);
        let h = match calc {
            InodeCalc::Passthrough => ino,
            InodeCalc::PathHash => path_hash(),
            InodeCalc::PathHash32 => path_hash() & 0xFFFF_FFFF,
            InodeCalc::DevinoHash => devino_hash(),
            InodeCalc::DevinoHash32 => devino_hash() & 0xFFFF_FFFF,
            InodeCalc::HybridHash if dir => path_hash(),
            InodeCalc::HybridHash => devino_hash(),
            InodeCalc::HybridHash32 if dir => path_hash() & 0xFFFF_FFFF,
            InodeCalc::HybridHash32 => devino_hash() & 0xFFFF_FFFF,
        };
        clear_of_reserved(h)
    }

    /// Starts watching the filesystem of directory `node` if it is new to
    /// the watch (a branch, or a mount below one).
    fn watch_dir(&self, dir: &HostDir, node: &Arc<HostNode>) {
        if let Some(w) = &self.watch
            && node.kind == FileKind::Directory
            && !w.knows(node.dev)
        {
            if !dir.handles_usable() {
                // Events could not be mapped back to nodes.
                tracing::info!(path = %dir.path().display(), "no file handles: changes there are not watched");
                w.skip(node.dev);
                return;
            }
            if let Ok(fd) = dir.fd(node) {
                w.watch(node.dev, fd.as_fd());
            }
        }
    }

    /// Whether outside changes to all of `inst` reach the kernel as they
    /// happen (and its caches may keep them long).
    fn watched(&self, inst: &[Inst]) -> bool {
        let Some(w) = &self.watch else { return false };
        inst.iter().all(|i| {
            if !w.knows(i.node.dev) {
                self.watch_dir(&i.branch.dir, &i.node);
            }
            w.is_watched(i.node.dev)
        }) && self
            .branches()
            .iter()
            .all(|b| w.is_watched(b.dir.root().dev))
    }

    /// Entry and attribute timeouts for a node with instances `inst`.
    fn ttl(&self, inst: &[Inst]) -> (Duration, Duration) {
        let watched = self.watched(inst);
        let cache = self.settings.read().cache;
        (cache.entry(watched), cache.attr(watched))
    }

    /// Records where the instances of node `id` live, for the host watch.
    fn remember(&self, id: u64, inst: &[Inst]) {
        if self.watch.is_none() {
            return;
        }
        let mut aliases = self.aliases.lock();
        for i in inst {
            let obj = i.node.host_id();
            // The watch finds a node by its key (its first instance) first:
            // only the other instances need an entry.
            if node_by_key(&self.table, obj) == Some(id) {
                continue;
            }
            aliases.insert(obj, id, |id, obj| node_has(&self.table, id, obj));
        }
    }

    /// Forwards outside changes on the branches to the kernel, on a thread of its own.
    fn start_watch(&self, inval: Arc<dyn Invalidator>) {
        let Some(w) = self.watch.clone() else { return };
        let (table, aliases, branches) = (
            self.table.clone(),
            self.aliases.clone(),
            self.branches.clone(),
        );
        let node_of = move |id: HostId| {
            let key = (id.dev, id.ino);
            let is_root = branches
                .read()
                .iter()
                .any(|b| (b.dir.root().dev, b.dir.root().ino) == key);
            if is_root {
                return Some(ROOT_ID);
            }
            node_by_key(&table, id).or_else(|| {
                let node = aliases.lock().get(id)?;
                node_has(&table, node, id).then_some(node)
            })
        };
        let all = self.table.clone();
        watch::spawn_forwarder(w, node_of, move || all.ids(), inval, "branch");
    }

    /// Policy view of all branches; `present` holds those where the path
    /// exists, with its mtime when the policy is `newest`.
    fn candidates(
        &self,
        policy: Policy,
        present: &HashMap<u64, Option<SystemTime>>,
    ) -> (Vec<Arc<Branch>>, Vec<Candidate>) {
        let branches = self.branches();
        let cands = branches
            .iter()
            .map(|b| {
                let here = present.get(&b.id);
                self.candidate(policy, false, b, here.map(|_| 0), here.copied().flatten())
            })
            .collect();
        (branches.to_vec(), cands)
    }

    /// Policy view of branch `b`. Free space is read when the policy ranks by
    /// it, and always for creates (`minfreespace` filters every create policy).
    fn candidate(
        &self,
        policy: Policy,
        creating: bool,
        b: &Branch,
        missing_levels: Option<u32>,
        mtime: Option<SystemTime>,
    ) -> Candidate {
        let needs_space = creating
            || !matches!(
                policy,
                Policy::Ff
                    | Policy::EpFf
                    | Policy::All
                    | Policy::EpAll
                    | Policy::Newest
                    | Policy::Erofs
                    | Policy::Rand
                    | Policy::EpRand
            );
        let (avail, used, total) = if needs_space {
            match b
                .dir
                .fd(b.dir.root())
                .and_then(|fd| Ok(rustix::fs::fstatvfs(&*fd)?))
            {
                Ok(s) => (
                    s.f_bavail * s.f_frsize,
                    s.f_blocks.saturating_sub(s.f_bavail) * s.f_frsize,
                    s.f_blocks * s.f_frsize,
                ),
                Err(_) => (0, 0, 0),
            }
        } else {
            (u64::MAX / 4, 0, u64::MAX / 4)
        };
        Candidate {
            mode: b.mode,
            min_free: b.min_free.unwrap_or(self.settings.read().min_free),
            avail,
            used,
            total,
            missing_levels,
            mtime,
        }
    }

    /// Branch ids the policy of `func` chooses among `present` (see [`Self::candidates`]).
    fn choose(
        &self,
        func: Func,
        want: Want,
        present: &HashMap<u64, Option<SystemTime>>,
    ) -> Result<Vec<u64>> {
        let policy = self.settings.read().policy(func);
        let (branches, cands) = self.candidates(policy, present);
        let chosen = policy.select(want, &cands, &mut *self.rng.lock())?;
        Ok(chosen.into_iter().map(|i| branches[i].id).collect())
    }

    /// Instances of a node chosen by the policy of `func`.
    fn pick(&self, func: Func, want: Want, inst: &[Inst]) -> Result<Vec<Inst>> {
        let newest = self.settings.read().policy(func) == Policy::Newest;
        let present = inst
            .iter()
            .map(|i| {
                let mtime = newest
                    .then(|| i.fd().ok())
                    .flatten()
                    .and_then(|fd| i.branch.dir.stat_fd(fd.as_fd()).ok())
                    .map(|st| attr_from_stat(&st, 0).mtime);
                (i.branch.id, mtime)
            })
            .collect();
        let chosen = self.choose(func, want, &present)?;
        Ok(chosen
            .iter()
            .filter_map(|id| inst.iter().find(|x| x.branch.id == *id).cloned())
            .collect())
    }

    /// Like [`Self::pick`] for a name as [`Self::find`] returns it: the
    /// chosen entries' parent instances, ranked by the name's own stats.
    fn pick_found(&self, func: Func, want: Want, found: &[Found]) -> Result<Vec<Inst>> {
        let present = found
            .iter()
            .map(|(i, _, st)| (i.branch.id, Some(attr_from_stat(st, 0).mtime)))
            .collect();
        let chosen = self.choose(func, want, &present)?;
        Ok(chosen
            .iter()
            .filter_map(|id| found.iter().find(|(x, _, _)| x.branch.id == *id))
            .map(|(i, _, _)| i.clone())
            .collect())
    }

    fn search(&self, func: Func, ino: u64) -> Result<Inst> {
        let inst = self.instances(ino)?;
        self.pick(func, Want::Search, &inst)?
            .into_iter()
            .next()
            .ok_or(Errno::ENOENT)
    }

    fn action(&self, func: Func, ino: u64) -> Result<Vec<Inst>> {
        let inst = self.instances(ino)?;
        self.pick(func, Want::Action, &inst)
    }

    /// Branches to create `parent/<new>` on, by the create policy of `func`.
    fn place(&self, func: Func, parent: u64, many: bool) -> Result<Vec<Arc<Branch>>> {
        let policy = self.settings.read().policy(func);
        self.place_by(policy, parent, many, None)
    }

    /// Branches `policy` picks for a new name in `parent`, never `exclude`.
    fn place_by(
        &self,
        policy: Policy,
        parent: u64,
        many: bool,
        exclude: Option<u64>,
    ) -> Result<Vec<Arc<Branch>>> {
        let pinst = self.instances(parent)?;
        let ancestors = self.ancestors(parent);
        let branches = self.branches();
        let cands: Vec<Candidate> = branches
            .iter()
            .map(|b| {
                let has = |ino: u64| {
                    ino == ROOT_ID
                        || self
                            .table
                            .get(ino)
                            .is_some_and(|n| n.inst.read().iter().any(|i| i.branch.id == b.id))
                };
                let level = if pinst.iter().any(|i| i.branch.id == b.id) {
                    Some(0)
                } else {
                    ancestors.iter().position(|a| has(*a)).map(|p| p as u32 + 1)
                };
                let mut c = self.candidate(policy, true, b, level, None);
                if exclude == Some(b.id) {
                    // Policies never create on read-only branches.
                    c.mode = BranchMode::RO;
                }
                c
            })
            .collect();
        let chosen = policy.select(Want::Create { many }, &cands, &mut *self.rng.lock())?;
        Ok(chosen.into_iter().map(|i| branches[i].clone()).collect())
    }

    /// The fd of directory `ino` on `branch`, cloning its path there (mode,
    /// owner and times copied from the first branch holding it) if missing.
    fn dir_on(&self, ino: u64, branch: &Arc<Branch>) -> Result<Arc<OwnedFd>> {
        let inst = self.instances(ino)?;
        if let Some(i) = inst.iter().find(|i| i.branch.id == branch.id) {
            return i.fd();
        }
        let node = self.node(ino)?;
        let (parent, name) = node.loc.lock().clone();
        let pfd = self.dir_on(parent, branch)?;
        let from = inst.first().ok_or(Errno::ENOENT)?;
        let st = from.branch.dir.stat_fd(from.fd()?.as_fd())?;
        match rustix::fs::mkdirat(&*pfd, &name, Mode::from_raw_mode(st.st_mode & 0o7777)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let _ = rustix::fs::chownat(
            &*pfd,
            &name,
            Some(rustix::fs::Uid::from_raw(st.st_uid)),
            Some(rustix::fs::Gid::from_raw(st.st_gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        );
        // chown may clear setgid; restate the mode exactly.
        let _ = rustix::fs::chmodat(
            &*pfd,
            &name,
            Mode::from_raw_mode(st.st_mode & 0o7777),
            AtFlags::empty(),
        );
        let nst = branch.dir.stat_child(pfd.as_fd(), &name)?;
        if !is_dir(&nst) {
            return Err(Errno::ENOTDIR);
        }
        let hn = Arc::new(branch.dir.make_node(pfd.as_fd(), &name, &nst)?);
        let fd = branch.dir.fd(&hn)?;
        self.add_instance(
            ino,
            Inst {
                branch: branch.clone(),
                node: hn,
            },
            None,
        )?;
        Ok(fd)
    }

    /// Adds `new` to node `ino`'s instances in branch order, in place of any
    /// it had on the same branch or on branch `drop`.
    fn add_instance(&self, ino: u64, new: Inst, drop: Option<u64>) -> Result<()> {
        let node = self.node(ino)?;
        let order: HashMap<u64, usize> = self
            .branches()
            .iter()
            .enumerate()
            .map(|(i, b)| (b.id, i))
            .collect();
        self.remember(ino, std::slice::from_ref(&new));
        let mut list = node.inst.write();
        list.retain(|i| i.branch.id != new.branch.id && Some(i.branch.id) != drop);
        list.push(new);
        list.sort_by_key(|i| order.get(&i.branch.id).copied().unwrap_or(usize::MAX));
        Ok(())
    }

    /// `name` in each instance of `parent`: the branch, the parent's fd there, the stat.
    fn find(&self, parent: u64, name: &CStr) -> Result<Vec<Found>> {
        let mut found = Vec::new();
        let mut err = None;
        for pi in self.instances(parent)? {
            let pfd = pi.fd()?;
            match pi.branch.dir.stat_child(pfd.as_fd(), name) {
                Ok(st) => found.push((pi, pfd, st)),
                Err(e) if absent(e) => {}
                Err(e) => err = Some(e),
            }
        }
        if found.is_empty() {
            return Err(err.unwrap_or(Errno::ENOENT));
        }
        // The first found decides what the name is; same-typed instances join it.
        let dir = is_dir(&found[0].2);
        found.retain(|(_, _, st)| is_dir(st) == dir);
        Ok(found)
    }

    /// `follow-symlinks`: the target of symlink `name` in `parent` on
    /// `inst`'s branch, if the setting follows its kind. Targets resolve
    /// inside the branch (an absolute one from the branch's root), so a link
    /// never leads out of its branch nor back into the mount.
    fn follow(&self, parent: u64, name: &CStr, inst: &Inst, st: &Stat) -> Option<(OwnedFd, Stat)> {
        let mode = self.settings.read().follow_symlinks;
        if mode == FollowSymlinks::Never || st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            return None;
        }
        let mut path = self.rel_path(parent);
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name.to_bytes());
        let root = inst.branch.dir.fd(inst.branch.dir.root()).ok()?;
        let fd = rustix::fs::openat2(
            &*root,
            OsStr::from_bytes(&path),
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            rustix::fs::ResolveFlags::IN_ROOT,
        )
        .ok()?;
        let tst = inst.branch.dir.stat_fd(fd.as_fd()).ok()?;
        let wanted = match mode {
            FollowSymlinks::Never => false,
            FollowSymlinks::Directory => is_dir(&tst),
            FollowSymlinks::Regular => tst.st_mode & libc::S_IFMT == libc::S_IFREG,
            FollowSymlinks::All => true,
        };
        wanted.then_some((fd, tst))
    }

    /// The key of the node the kernel knows for `name` in `parent`, found
    /// as `found`: a directory's place; for a file, the first found object
    /// that keys a node holding it (a node is keyed by the instance found
    /// first when it was made, which a copy on an earlier branch does not
    /// change).
    fn shown_key(&self, parent: u64, name: &CStr, found: &[Found]) -> Option<Key> {
        if found.first().is_some_and(|(_, _, st)| is_dir(st)) {
            return Some(Key::Place(parent, name.to_owned()));
        }
        found.iter().find_map(|(pi, _, st)| {
            let key = Key::Obj(st.st_dev, st.st_ino);
            let (_, node) = self.table.get_by_key(&key)?;
            let holds = node.kind == kind_of(st)
                && node.inst.read().iter().any(|i| {
                    i.branch.id == pi.branch.id
                        && (i.node.dev, i.node.ino) == (st.st_dev, st.st_ino)
                });
            holds.then_some(key)
        })
    }

    /// The node the kernel knows for `name` in `parent` found as `found`, and its key.
    fn known_node(
        &self,
        parent: u64,
        name: &CStr,
        found: &[Found],
    ) -> Option<(u64, Arc<UNode>, Key)> {
        let key = self.shown_key(parent, name, found)?;
        let (id, node) = self.table.get_by_key(&key)?;
        Some((id, node, key))
    }

    /// Keys file node `id` (keyed `key`) anew after its instances changed:
    /// by its key object while it still holds it, else by its first
    /// remaining instance. A node whose key object went (removed, or left
    /// behind on one branch) would otherwise not be found again, and the
    /// next lookup would make the kernel a second node for it. Directories
    /// are keyed by place, which their copies do not change.
    fn rekey_node(&self, id: u64, node: &UNode, key: &Key) {
        let Key::Obj(dev, ino) = *key else { return };
        if dev & FOLLOWED != 0 {
            return;
        }
        let inst = node.inst.read();
        if inst.iter().any(|i| (i.node.dev, i.node.ino) == (dev, ino)) {
            return;
        }
        if let Some(first) = inst.first() {
            self.table
                .rekey(id, Key::Obj(first.node.dev, first.node.ino));
        }
    }

    fn lookup_name(&self, parent: u64, name: &CStr) -> Result<Entry> {
        let mut found = self.find(parent, name)?;
        // Followed symlinks stand for their targets; each keeps its own fd.
        let mut targets: Vec<Option<OwnedFd>> = Vec::with_capacity(found.len());
        for (inst, _, st) in found.iter_mut() {
            let t = self.follow(parent, name, inst, st);
            targets.push(t.map(|(fd, tst)| {
                *st = tst;
                fd
            }));
        }
        let followed = targets[0].is_some();
        let first_dir = is_dir(&found[0].2);
        // The first found decides what the name is; same-typed instances join it.
        let (found, mut kept_targets): (Vec<_>, Vec<_>) = found
            .into_iter()
            .zip(targets)
            .filter(|((_, _, st), _)| is_dir(st) == first_dir)
            .unzip();
        let first = &found[0].2;
        // A followed link is its own node, never an alias of the target's
        // (a directory reachable by two names would confuse the kernel).
        let key = match self.shown_key(parent, name, &found) {
            Some(key) if !followed || matches!(key, Key::Place(..)) => key,
            _ => Key::Obj(
                first.st_dev | if followed { FOLLOWED } else { 0 },
                first.st_ino,
            ),
        };
        let kind = kind_of(first);
        let mut path = self.rel_path(parent);
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(name.to_bytes());
        let want_id = self.calc_id(&path, is_dir(first), first.st_dev, first.st_ino);
        loop {
            let existing = self.table.get_by_key(&key).filter(|(_, n)| n.kind == kind);
            let old: Vec<Inst> = existing
                .as_ref()
                .map(|(_, n)| n.inst.read().clone())
                .unwrap_or_default();
            let mut inst = Vec::with_capacity(found.len());
            for ((pi, pfd, st), target) in found.iter().zip(kept_targets.iter_mut()) {
                let reuse = old.iter().find(|o| {
                    o.branch.id == pi.branch.id
                        && o.node.dev == st.st_dev
                        && o.node.ino == st.st_ino
                        && pi.branch.dir.still_names(&o.node, pfd.as_fd(), name)
                });
                let node = match (reuse, target.take()) {
                    (Some(o), _) => o.node.clone(),
                    (None, Some(fd)) => Arc::new(pi.branch.dir.node_from_fd(fd, st)?),
                    (None, None) => Arc::new(pi.branch.dir.make_node(pfd.as_fd(), name, st)?),
                };
                inst.push(Inst {
                    branch: pi.branch.clone(),
                    node,
                });
            }
            // Attributes of the instance the getattr policy picks, from the
            // stats just taken (`inst` follows `found` one to one), and before
            // the reference is taken so no error can leak it.
            let branch = self
                .pick(Func::Getattr, Want::Search, &inst)?
                .first()
                .ok_or(Errno::ENOENT)?
                .branch
                .id;
            let st = found
                .iter()
                .find(|(i, _, _)| i.branch.id == branch)
                .map(|(_, _, st)| *st)
                .ok_or(Errno::ENOENT)?;
            let fresh = UNode {
                kind,
                loc: Mutex::new((parent, name.to_owned())),
                inst: RwLock::new(inst.clone()),
            };
            // The known node stays only if it still is the object found
            // (not a new one at its place, nor its inode number reused).
            let kept = std::cell::Cell::new(false);
            let taken = self
                .table
                .lookup(key.clone(), want_id, Some(fresh), |old, new| {
                    let same = old.kind == new.kind && same_object(old, new, &key);
                    kept.set(same);
                    !same
                });
            if let Some((id, node)) = taken {
                self.remember(id, &inst);
                let (entry_ttl, attr_ttl) = self.ttl(&inst);
                if kept.get() {
                    *node.inst.write() = inst;
                    *node.loc.lock() = (parent, name.to_owned());
                }
                return Ok(Entry {
                    attr: self.shown(&st, id),
                    generation: 0,
                    entry_ttl,
                    attr_ttl,
                });
            }
            // Forgotten between our check and the insert: go again.
        }
    }

    /// Attributes by the getattr policy among `inst`.
    fn getattr_stat(&self, inst: &[Inst]) -> Result<Stat> {
        let chosen = self
            .pick(Func::Getattr, Want::Search, inst)?
            .into_iter()
            .next()
            .ok_or(Errno::ENOENT)?;
        chosen.branch.dir.stat_fd(chosen.fd()?.as_fd())
    }

    /// `symlinkify`: a file nobody can write whose data and metadata have not
    /// changed for the timeout shows as a symlink to its host path, so
    /// readers go straight to the branch.
    fn symlinkified(&self, st: &Stat) -> bool {
        let s = self.settings.read();
        if !s.symlinkify {
            return false;
        }
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFDIR || kind == libc::S_IFLNK || st.st_mode & 0o222 != 0 {
            return false;
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let limit = s.symlinkify_timeout.as_secs() as i64;
        now - st.st_mtime > limit && now - st.st_ctime > limit
    }

    /// Attributes as the union shows them.
    fn shown(&self, st: &Stat, ino: u64) -> crate::fs::Attr {
        let mut attr = attr_from_stat(st, ino);
        if self.symlinkified(st) {
            attr.kind = FileKind::Symlink;
        }
        attr
    }

    fn attr_out(&self, ino: u64, st: &Stat, inst: &[Inst]) -> AttrOut {
        AttrOut {
            attr: self.shown(st, ino),
            ttl: self.ttl(inst).1,
        }
    }

    /// Runs `op` on every chosen instance; succeeds if any did, else the first error.
    fn apply<T>(items: &[T], mut op: impl FnMut(&T) -> Result<()>) -> Result<()> {
        let mut first_err = None;
        let mut any = false;
        for it in items {
            match op(it) {
                Ok(()) => any = true,
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if !any => Err(e),
            _ => Ok(()),
        }
    }

    /// Drops the kernel's `entry` and the attributes of `inodes` once the
    /// current request is done: invalidating from inside a request waits
    /// for the directory lock that very request holds.
    fn invalidate_later(&self, entry: Option<(u64, CString)>, inodes: &[u64]) {
        let Some(inval) = self.invalidator.read().clone() else {
            return;
        };
        let inodes = inodes.to_vec();
        let spawned = std::thread::Builder::new()
            .name("strata-inval".into())
            .spawn(move || {
                if let Some((parent, name)) = entry {
                    inval.entry(parent, OsStr::from_bytes(name.to_bytes()));
                }
                for ino in inodes {
                    inval.inode(ino, true);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot schedule a cache invalidation: {e}");
        }
    }

    /// Drops the kernel's attributes of `nodes` right away; safe inside a
    /// request (attribute invalidation takes no inode lock).
    pub(crate) fn invalidate_attrs(&self, nodes: impl IntoIterator<Item = u64>) {
        if let Some(inval) = self.invalidator.read().clone() {
            for id in nodes {
                inval.inode(id, false);
            }
        }
    }

    /// Drops every node's kernel cache (`cmd.invalidate-all-nodes`).
    pub fn invalidate_all(&self) {
        if let Some(inval) = self.invalidator.read().clone() {
            for id in self.table.ids() {
                inval.inode(id, true);
            }
        }
    }

    /// Replaces the branch list (runtime edits from the control file).
    pub fn set_branches(&self, specs: &[source::Branch]) -> std::result::Result<(), String> {
        if specs.is_empty() {
            return Err("a union needs at least one branch".into());
        }
        let current = self.branches();
        let mut next = Vec::new();
        for s in specs {
            let same = current.iter().find(|b| b.path == s.path);
            next.push(match same {
                Some(b) if b.mode == s.mode && b.min_free == s.min_free => b.clone(),
                Some(b) => Arc::new(Branch {
                    id: b.id,
                    path: b.path.clone(),
                    mode: s.mode,
                    min_free: s.min_free,
                    dir: HostDir::open(&s.path, self.fd_cache_per_branch())?,
                }),
                None => self.open_branch(s)?,
            });
        }
        let changed: Vec<Arc<Branch>> = next
            .iter()
            .filter(|n| !current.iter().any(|c| c.id == n.id))
            .chain(
                current
                    .iter()
                    .filter(|c| !next.iter().any(|n| n.id == c.id)),
            )
            .cloned()
            .collect();
        *self.branches.write() = Arc::new(next);
        self.invalidate_all();
        for b in changed {
            self.drop_names_on(&b);
        }
        Ok(())
    }

    /// Drops the kernel's names (negative ones included) that branch `b`
    /// holds in every directory the kernel knows: they appear or vanish as
    /// the branch joins or leaves the union.
    fn drop_names_on(&self, b: &Branch) {
        let Some(inval) = self.invalidator.read().clone() else {
            return;
        };
        for id in self.table.ids() {
            if self
                .table
                .get(id)
                .is_none_or(|n| n.kind != FileKind::Directory)
            {
                continue;
            }
            let Ok(dir) = b.walk(&self.rel_path(id), false) else {
                continue;
            };
            let Ok(reader) = rustix::fs::Dir::read_from(&dir) else {
                continue;
            };
            for ent in reader.flatten() {
                let name = ent.file_name().to_bytes();
                if name != b"." && name != b".." {
                    inval.entry(id, OsStr::from_bytes(name));
                }
            }
        }
    }

    fn read_only_err(inst: &Inst) -> Result<()> {
        if inst.branch.mode == BranchMode::RO {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    fn load_dir(&self, ino: u64) -> Result<Vec<DirEnt>> {
        let parent = if ino == ROOT_ID {
            ROOT_ID
        } else {
            self.node(ino)?.loc.lock().0
        };
        let mut out = vec![
            DirEnt {
                name: c".".to_owned(),
                ino,
                kind: FileKind::Directory,
            },
            DirEnt {
                name: c"..".to_owned(),
                ino: parent,
                kind: FileKind::Directory,
            },
        ];
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let base = self.rel_path(ino);
        for inst in self.instances(ino)? {
            // Gone from this branch since the lookup: nothing to list there.
            let Ok(fd) = inst.fd() else { continue };
            let Ok(dfd) = crate::host::open_dir(fd.as_fd()) else {
                continue;
            };
            let dev = inst.node.dev;
            let mut reader = rustix::fs::Dir::read_from(&dfd)?;
            for ent in &mut reader {
                let Ok(ent) = ent else { break };
                let name = ent.file_name();
                let bytes = name.to_bytes();
                if bytes == b"." || bytes == b".." {
                    continue;
                }
                if seen.contains(bytes) {
                    continue;
                }
                let Some(kind) = dirent_kind(dfd.as_fd(), &ent) else {
                    continue;
                };
                seen.insert(bytes.to_vec());
                // What lookup will most likely answer (d_ino is advisory).
                let mut path = base.clone();
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(bytes);
                out.push(DirEnt {
                    name: name.to_owned(),
                    ino: self.calc_id(&path, kind == FileKind::Directory, dev, ent.ino()),
                    kind,
                });
            }
        }
        Ok(out)
    }

    /// Statfs over the branches the settings count, each filesystem once.
    fn statfs_sum(&self, only: Option<&[Inst]>) -> Result<StatFs> {
        let (mode, ignore) = {
            let s = self.settings.read();
            (s.statfs, s.statfs_ignore)
        };
        let branches: Vec<Arc<Branch>> = match (mode, only) {
            (StatfsMode::Full, Some(inst)) => inst.iter().map(|i| i.branch.clone()).collect(),
            _ => self.branches().to_vec(),
        };
        let mut seen = HashSet::new();
        let mut out: Option<StatFs> = None;
        for b in branches {
            let skip = match ignore {
                StatfsIgnore::None => false,
                StatfsIgnore::Ro => b.mode == BranchMode::RO,
                StatfsIgnore::Nc => b.mode != BranchMode::RW,
            };
            if skip {
                continue;
            }
            let root = b.dir.fd(b.dir.root())?;
            let st = b.dir.stat_fd(root.as_fd())?;
            if !seen.insert(st.st_dev) {
                continue;
            }
            let s = rustix::fs::fstatvfs(&*root)?;
            let o = out.get_or_insert(StatFs {
                blocks: 0,
                bfree: 0,
                bavail: 0,
                files: 0,
                ffree: 0,
                bsize: s.f_bsize as u32,
                namelen: s.f_namemax as u32,
                frsize: s.f_frsize as u32,
            });
            // Express every branch in the first one's fragment size.
            let scale = |n: u64| n.saturating_mul(s.f_frsize) / (o.frsize.max(1) as u64);
            o.blocks += scale(s.f_blocks);
            o.bfree += scale(s.f_bfree);
            o.bavail += scale(s.f_bavail);
            o.files += s.f_files;
            o.ffree += s.f_ffree;
        }
        out.ok_or(Errno::ENOENT)
    }

    fn xattr_mode(&self) -> XattrMode {
        self.settings.read().xattr
    }

    /// Full host paths of the node on every branch holding it.
    pub fn all_paths(&self, ino: u64) -> Result<Vec<PathBuf>> {
        let rel = self.rel_path(ino);
        Ok(self
            .instances(ino)?
            .iter()
            .map(|i| i.branch.path.join(OsStr::from_bytes(&rel)))
            .collect())
    }
}
