//! Copy-on-write overlay: a writable upper host directory over read-only
//! lowers (images and host directories), with kernel-overlayfs semantics and
//! on-disk format.
//!
//! * A name resolves top-down: the upper, then each lower in order. A whiteout
//!   (0/0 character device) hides the name below it; a directory merges with
//!   the directories of the same name below it until one is opaque
//!   (`trusted.overlay.opaque=y`, or the `user.` variant); a non-directory
//!   ends the search.
//! * Changing a lower object first copies it up: its parents are created in
//!   the upper, then the object itself (data, owner, mode, times, xattrs)
//!   under a temporary name, renamed into place once complete.
//! * Removing a name that a lower provides leaves a whiteout; a directory made
//!   where a whiteout was is opaque; renaming a directory that lowers provide
//!   copies its whole tree up first (overlayfs without `redirect_dir` refuses
//!   with EXDEV instead).
//! * Node ids stay the same across copy-up: a copied-up object records its
//!   origin (`trusted.strata.origin`) and keeps the lower object's id.
//!
//! Without an upper the mount is read-only: one or more images served as is.

mod format;
mod freeze;
mod fs;
mod index;
mod layers;
#[cfg(test)]
mod tests;
mod upper;

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use rustix::fs::{AtFlags, Gid, Mode, OFlags, RenameFlags, Stat, Timespec, Timestamps, Uid};

use crate::fs::*;
use crate::host::files::OpenFiles;
use crate::host::watch::{self, CachePolicy, HostAliases, HostId, HostWatch, UNWATCHED_TTL};
use crate::host::{HostDir, HostNode, ops};
use crate::inode::InodeTable;
use crate::layer::{self, LObj, LStat, Layer};
use crate::listing::DirEnt;
use crate::{Errno, Result};
use format::{Listed, OPAQUE_XATTRS, host_opaque, host_whiteout};
pub use layers::LayerSet;

/// Where a lower layer comes from.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum LowerSpec {
    Host(PathBuf),
    Image {
        store: PathBuf,
        name: String,
    },
    /// A tar, tar.gz, tar.zst, tar.xz or zip file.
    Archive(PathBuf),
    /// A view spec (docs/VIEWS.md).
    View(PathBuf),
}

#[derive(Clone, Debug)]
pub struct OverlayConfig {
    /// Lower layers, topmost first.
    pub lowers: Vec<LowerSpec>,
    /// The writable upper directory; `None` serves the lowers read-only.
    pub upper: Option<PathBuf>,
    /// Kernel cache timeouts: unless set, an hour where strata owns every
    /// layer involved (images, the upper) or watches the host lowers
    /// involved, a second where an unwatched host lower is involved.
    pub cache: CachePolicy,
    pub fd_cache: usize,
    pub passthrough: bool,
    /// Watch host lowers for outside changes (root only), so their nodes can
    /// be cached as long as the rest.
    pub watch: bool,
    /// Where archive indexes are kept across mounts (`None`: not kept).
    pub index_dir: Option<PathBuf>,
    /// Where image blobs the store lacks come from (`-o remote=`).
    pub fetch: Option<Arc<dyn strata_image::Fetch>>,
}

impl OverlayConfig {
    /// `lowers` under `upper` with the defaults: the cache policy's
    /// timeouts, 64 cached descriptors, no kernel passthrough, no watch, no
    /// kept archive indexes, no remote.
    pub fn new(lowers: Vec<LowerSpec>, upper: Option<PathBuf>) -> OverlayConfig {
        OverlayConfig {
            lowers,
            upper,
            cache: CachePolicy::default(),
            fd_cache: 64,
            passthrough: false,
            watch: false,
            index_dir: None,
            fetch: None,
        }
    }
}

/// Identity of an overlay object, from which its node id derives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// An object only the upper has (or a directory the upper made opaque).
    Upper(u64, u64),
    /// A lower object (layer, identity in the layer); merged directories too.
    Lower(u32, u64, u64),
    /// An upper object copied up from that lower object.
    Origin(u32, u64, u64),
}

impl Key {
    /// The key of an upper copy of this lower object.
    fn copied_up(self) -> Key {
        match self {
            Key::Lower(l, a, b) => Key::Origin(l, a, b),
            k => k,
        }
    }
}

/// A lower object seen through one layer.
#[derive(Clone)]
struct LRef {
    layer: u32,
    obj: LObj,
}

/// (parent, name) pairs; boxed, since most nodes have none.
type Aliases = Option<Box<Vec<(u64, CString)>>>;

/// A node's lower objects: inline, since most nodes have one.
type Lowers = smallvec::SmallVec<[LRef; 1]>;

struct ONode {
    kind: FileKind,
    /// Parent node and name: where a copy-up goes.
    place: Mutex<(u64, CString)>,
    upper: RwLock<Option<Arc<HostNode>>>,
    /// Non-directories: the lower object shown (at most one). Directories:
    /// every lower directory merged into this one, topmost first.
    lowers: RwLock<Lowers>,
    /// Other names a lower hard-linked file was looked up by: copy-up links
    /// them to the copy.
    aliases: Mutex<Aliases>,
    /// Directories under many frozen layers: which of those hold each name.
    frozen_index: Mutex<Option<Arc<index::FrozenIndex>>>,
}

impl ONode {
    fn new(
        kind: FileKind,
        place: (u64, CString),
        upper: Option<Arc<HostNode>>,
        lowers: Lowers,
    ) -> ONode {
        ONode {
            kind,
            place: Mutex::new(place),
            upper: RwLock::new(upper),
            lowers: RwLock::new(lowers),
            aliases: Mutex::new(None),
            frozen_index: Mutex::new(None),
        }
    }

    fn upper(&self) -> Option<Arc<HostNode>> {
        self.upper.read().clone()
    }

    fn lowers(&self) -> Lowers {
        self.lowers.read().clone()
    }

    fn place(&self) -> (u64, CString) {
        self.place.lock().clone()
    }

    /// Whether the node shows the host object `obj` (as its upper object,
    /// or as its top lower).
    fn shows(&self, obj: &HostNode) -> bool {
        if let Some(u) = self.upper() {
            return (u.dev, u.ino) == (obj.dev, obj.ino);
        }
        matches!(self.lowers.read().first(), Some(LRef { obj: LObj::Host(h), .. }) if (h.dev, h.ino) == (obj.dev, obj.ino))
    }

    /// Records another name of this (lower, hard-linked) object.
    fn remember_alias(&self, parent: u64, name: &CStr) {
        const MAX_ALIASES: usize = 64;
        let (pp, pn) = self.place();
        if pp == parent && pn.as_c_str() == name {
            return;
        }
        let mut aliases = self.aliases.lock();
        let aliases = aliases.get_or_insert_default();
        if aliases.len() < MAX_ALIASES
            && !aliases
                .iter()
                .any(|(p, n)| *p == parent && n.as_c_str() == name)
        {
            aliases.push((parent, name.to_owned()));
        }
    }
}

/// What a name resolves to, before it becomes a node.
struct Found {
    kind: FileKind,
    upper: Option<Stat>,
    lowers: Vec<(LRef, LStat)>,
}

pub struct Overlay {
    layers: Arc<LayerSet>,
    /// The upper's host directory. In a workspace (snapshots, branches) the
    /// live layer is a directory below it, the root node's upper object.
    upper: Option<Arc<HostDir>>,
    table: Arc<InodeTable<Key, ONode>>,
    /// Shared by every branch of a workspace: handle numbers are unique.
    files: Arc<OpenFiles>,
    /// Node ids of a branch other than the first carry its number
    /// (`crate::workspace::ids`); 0 leaves them as they always were.
    tag: u8,
    /// Node → its handles open on an upper file: a snapshot moves these
    /// files into the new live layer (see `freeze`).
    open_upper: Mutex<HashMap<u64, smallvec::SmallVec<[u64; 2]>>>,
    /// Held (shared) by every request that may change the upper or make a
    /// node from it (lookups), and exclusively by a snapshot while it
    /// freezes the live layer.
    gate: RwLock<()>,
    /// Node → its read-only handles open on a lower file. A copy-up moves
    /// them to the copy, so they read what writers wrote (kernel overlayfs
    /// does the same since 4.19); an mmap made before stays on the lower.
    lower_readers: Mutex<HashMap<u64, smallvec::SmallVec<[u64; 2]>>>,
    cfg: OverlayConfig,
    /// Serializes changes to the upper's namespace (copy-up, create, remove,
    /// rename): their whiteout and opaque bookkeeping spans several syscalls.
    ns_lock: Mutex<()>,
    /// Private xattr names written to the upper.
    origin_xattr: &'static CStr,
    opaque_xattr: &'static CStr,
    any_changing_lower: bool,
    /// Outside changes to host lowers, and times the kernel changes in the
    /// upper behind the mount's back, forwarded to the kernel.
    watch: Option<Arc<HostWatch>>,
    /// Host object → the node showing it, for the watch: only objects that
    /// are not their node's key (lower directories merged below the top,
    /// upper copies of lower objects).
    host_aliases: Arc<Mutex<HostAliases>>,
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A watch on the filesystems of the host lowers and the upper, when there
/// are any and it can be had (root, file handles); `None` leaves host lowers
/// on short timeouts. Only strata changes the upper, but with kernel
/// passthrough the kernel writes its files itself, and a store through a
/// mapping that outlives its descriptor only shows as the close of the
/// written file when the mapping goes.
fn watch_host_layers(layers: &LayerSet, upper: Option<&HostDir>) -> Option<Arc<HostWatch>> {
    let hosts: Vec<&HostDir> = layers
        .base()
        .filter_map(|(_, l)| l.host())
        .chain(upper)
        .collect();
    if hosts.is_empty() || !hosts.iter().all(|h| h.handles_usable()) {
        return None;
    }
    let w = match HostWatch::new() {
        Ok(w) => w,
        Err(e) => {
            tracing::info!(
                "host lowers are not watched ({e}); kernel caches of their files time out after {}s",
                UNWATCHED_TTL.as_secs()
            );
            return None;
        }
    };
    for h in hosts {
        let root = h.root();
        match h.fd(root) {
            Ok(fd) => {
                w.watch(root.dev, fd.as_fd());
            }
            Err(e) => tracing::warn!(path = %h.path().display(), "lower not watched: {e}"),
        }
    }
    Some(Arc::new(w))
}

/// Whether node `id` still shows the host object `obj` among its lowers.
fn shows_host_object(table: &InodeTable<Key, ONode>, id: u64, obj: HostId) -> bool {
    table.get(id).is_some_and(|n| {
        n.upper().is_some_and(|u| u.host_id() == obj)
            || n.lowers()
                .iter()
                .any(|r| matches!(&r.obj, LObj::Host(h) if h.host_id() == obj))
    })
}

/// The node keyed by host object `obj` of lower `layer` (before or after
/// its copy-up) if it still shows that object.
fn host_node_by_key(table: &InodeTable<Key, ONode>, layer: u32, obj: HostId) -> Option<u64> {
    let lower = Key::Lower(layer, obj.dev, obj.ino);
    [lower, lower.copied_up()].into_iter().find_map(|k| {
        let (id, _) = table.get_by_key(&k)?;
        shows_host_object(table, id, obj).then_some(id)
    })
}

/// A temporary name in an upper directory, for objects built before they
/// appear under their real name (or moved aside before they are deleted).
/// Marked with `layer::TMP_XATTR` while they exist, so a listing can tell
/// one left by a crash (hidden, removed with its directory) from a user's
/// file that happens to have such a name.
fn tmp_name() -> CString {
    CString::new(format!(
        "{TMP_PREFIX}{}.{}",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ))
    .expect("no NUL")
}

pub(crate) const TMP_PREFIX: &str = ".strata-tmp.";

/// xattr names the overlay keeps for itself: never shown, never settable.
/// Read on any node: where its content comes from (the upper's path, or
/// its top lower's account of it). Never listed, never copied up.
pub const SOURCE_XATTR: &str = "user.strata.source";

fn is_private_xattr(name: &[u8]) -> bool {
    [
        &b"trusted.overlay."[..],
        b"user.overlay.",
        b"trusted.strata.",
        b"user.strata.",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

fn timespec((sec, nsec): (i64, u32)) -> Timespec {
    Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    }
}

fn system_time((sec, nsec): (i64, u32)) -> std::time::SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn attr_of(st: &LStat, ino: u64) -> Attr {
    Attr {
        ino,
        size: st.size,
        blocks: st.blocks,
        atime: system_time(st.atime),
        mtime: system_time(st.mtime),
        ctime: system_time(st.ctime),
        kind: st.kind().unwrap_or(FileKind::Regular),
        perm: (st.mode & 0o7777) as u16,
        nlink: st.nlink,
        uid: st.uid,
        gid: st.gid,
        rdev: st.rdev as u32,
        blksize: 4096,
    }
}

/// What an overlay is assembled from when it serves one branch of a
/// workspace: the layers (shared by the workspace's branches), the upper
/// directory and the branch's live layer and frozen chain.
pub struct Parts {
    pub layers: Arc<LayerSet>,
    pub upper: Arc<HostDir>,
    /// Root of the branch's live layer (the upper's root outside a workspace).
    pub live: Arc<HostNode>,
    /// The branch's frozen layers in `layers`, newest first.
    pub frozen: Vec<u32>,
    pub tag: u8,
    pub files: Arc<OpenFiles>,
}

/// Opens the lowers a config names, topmost first, and checks each root is
/// a directory.
pub fn open_lowers(cfg: &OverlayConfig) -> std::result::Result<Vec<Box<dyn Layer>>, String> {
    if cfg.lowers.is_empty() {
        return Err("an overlay needs at least one lower layer".into());
    }
    let mut layers = Vec::new();
    for spec in &cfg.lowers {
        layers.push(match spec {
            LowerSpec::Host(p) => layer::open_host(p, cfg.fd_cache)?,
            LowerSpec::Image { store, name } => layer::open_image(store, name, cfg.fetch.clone())?,
            LowerSpec::Archive(p) => layer::open_archive(p, cfg.index_dir.as_deref())?,
            LowerSpec::View(p) => layer::open_view(p, cfg.fd_cache, cfg.index_dir.as_deref())?,
        });
    }
    for l in &layers {
        let root = l
            .stat(&l.root())
            .map_err(|e| format!("{}: {e}", l.describe()))?;
        if !root.is_dir() {
            return Err(format!("{}: root is not a directory", l.describe()));
        }
    }
    Ok(layers)
}

/// Opens an upper directory and checks strata can write it.
pub fn open_upper(path: &std::path::Path, fd_cache: usize) -> std::result::Result<HostDir, String> {
    let h = HostDir::open(path, fd_cache)?;
    check_upper(&h)?;
    Ok(h)
}

impl Overlay {
    pub fn new(cfg: OverlayConfig) -> std::result::Result<Self, String> {
        let layers = Arc::new(LayerSet::new(open_lowers(&cfg)?));
        match &cfg.upper {
            Some(p) => {
                let upper = Arc::new(open_upper(p, cfg.fd_cache)?);
                let live = upper.root().clone();
                Ok(Self::assemble(
                    cfg,
                    Parts {
                        layers,
                        upper,
                        live,
                        frozen: Vec::new(),
                        tag: 0,
                        files: Arc::default(),
                    },
                ))
            }
            None => Ok(Self::build(cfg, layers, None, 0, Arc::default())),
        }
    }

    /// An overlay serving one branch of a workspace.
    pub fn assemble(cfg: OverlayConfig, parts: Parts) -> Self {
        let Parts {
            layers,
            upper,
            live,
            frozen,
            tag,
            files,
        } = parts;
        Self::build(cfg, layers, Some((upper, live, frozen)), tag, files)
    }

    fn build(
        cfg: OverlayConfig,
        layers: Arc<LayerSet>,
        upper: Option<(Arc<HostDir>, Arc<HostNode>, Vec<u32>)>,
        tag: u8,
        files: Arc<OpenFiles>,
    ) -> Self {
        let frozen = upper.as_ref().map(|u| u.2.clone()).unwrap_or_default();
        let root_lowers: Lowers = frozen
            .iter()
            .copied()
            .chain(layers.base().map(|(i, _)| i))
            .map(|i| LRef {
                layer: i,
                obj: layers.get(i).root(),
            })
            .collect();
        let root_key = match &upper {
            Some((_, live, _)) => Key::Upper(live.dev, live.ino),
            None => Key::Lower(0, 0, 0),
        };
        let root = ONode::new(
            FileKind::Directory,
            (ROOT_ID, CString::default()),
            upper.as_ref().map(|(_, live, _)| live.clone()),
            root_lowers,
        );
        let upper = upper.map(|(h, _, _)| h);
        let root_user = rustix::process::geteuid().is_root();
        let watch = if cfg.watch {
            watch_host_layers(&layers, upper.as_deref())
        } else {
            None
        };
        let fallback = crate::workspace::ids::fallback_base(tag);
        let any_changing_lower = layers.base().any(|(_, l)| !l.unchanging());
        Overlay {
            any_changing_lower,
            layers,
            upper,
            watch,
            host_aliases: Arc::default(),
            table: Arc::new(
                InodeTable::with_derived_ids(
                    root_key,
                    Arc::new(root),
                    Box::new(move |k| Self::node_id(tag, k)),
                )
                .with_fallback_base(fallback),
            ),
            files,
            tag,
            open_upper: Mutex::default(),
            gate: RwLock::new(()),
            lower_readers: Mutex::default(),
            cfg,
            ns_lock: Mutex::new(()),
            origin_xattr: if root_user {
                c"trusted.strata.origin"
            } else {
                c"user.strata.origin"
            },
            opaque_xattr: OPAQUE_XATTRS[if root_user { 0 } else { 1 }],
        }
    }

    /// Where node `id`'s content comes from, for people.
    fn locate(&self, id: u64) -> Result<String> {
        let node = self.node(id)?;
        if let Some(up) = node.upper() {
            let h = self.upper_dir()?;
            let path = h.path_of(&up).unwrap_or_else(|| h.path().to_path_buf());
            return Ok(format!("{} (upper)", path.display()));
        }
        let top = node.lowers().first().cloned().ok_or(Errno::ESTALE)?;
        Ok(self.layer(&top).locate(&top.obj))
    }

    /// Which layers serve this mount, top first, for logs and status.
    pub fn describe(&self) -> String {
        let root = self.table.get(ROOT_ID).expect("the root is pinned");
        let mut parts: Vec<String> = root
            .lowers()
            .iter()
            .map(|r| self.layer(r).describe())
            .collect();
        if let (Some(h), Some(live)) = (&self.upper, root.upper()) {
            let path = h.path_of(&live).unwrap_or_else(|| h.path().to_path_buf());
            parts.insert(0, format!("upper {}", path.display()));
        }
        parts.join(" > ")
    }

    fn node(&self, id: u64) -> Result<Arc<ONode>> {
        self.table.get(id).ok_or(Errno::ESTALE)
    }

    fn upper_dir(&self) -> Result<&HostDir> {
        self.upper.as_deref().ok_or(Errno::EROFS)
    }

    fn layer(&self, r: &LRef) -> &dyn Layer {
        self.layers.get(r.layer)
    }

    /// Node id for a key: the upper's inode number for upper-only objects,
    /// a hash with bit 62 set for the rest (the table resolves collisions);
    /// in a branch other than the first, that id carrying the branch's
    /// number.
    fn node_id(branch: u8, key: &Key) -> u64 {
        let (tag, a, b) = match *key {
            Key::Upper(_, ino) if ino > 1 && ino < 1 << 62 => {
                return crate::workspace::ids::tagged(branch, ino);
            }
            Key::Upper(dev, ino) => (0u64, dev, ino),
            Key::Lower(l, a, b) | Key::Origin(l, a, b) => (l as u64 + 1, a, b),
        };
        let mut h = tag.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ a.rotate_left(23) ^ b;
        h = (h ^ (h >> 31)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h ^= h >> 29;
        crate::workspace::ids::tagged(branch, (h & ((1 << 62) - 1)) | (1 << 62))
    }

    /// Whether one of `lowers` is a host object outside the watch: its
    /// changes would not reach the kernel, so it is cached briefly.
    fn unwatched(&self, lowers: &[LRef]) -> bool {
        self.any_changing_lower
            && lowers.iter().any(|r| match &r.obj {
                // Frozen layers never change.
                LObj::Host(_) if self.layers.is_frozen(r.layer) => false,
                LObj::Host(h) => !self.watch.as_ref().is_some_and(|w| w.is_watched(h.dev)),
                // A view of host directories: the watch does not map its
                // objects back to nodes.
                _ => !self.layer(r).unchanging(),
            })
    }

    /// Records the host objects node `id` shows, for the watch.
    fn remember_host_objects(&self, id: u64, node: &ONode) {
        if self.watch.is_none() {
            return;
        }
        let lowers = node.lowers();
        let mut aliases = self.host_aliases.lock();
        // An upper object is its node's key only where nothing was copied up.
        if let Some(u) = node.upper()
            && self
                .table
                .get_by_key(&Key::Upper(u.dev, u.ino))
                .map(|(i, _)| i)
                != Some(id)
        {
            aliases.insert(u.host_id(), id, |id, obj| {
                shows_host_object(&self.table, id, obj)
            });
        }
        for r in lowers.iter() {
            if let LObj::Host(h) = &r.obj {
                let obj = h.host_id();
                // The watch finds a node by the key of its top lower first:
                // only the others (lower directories merged below) need an entry.
                if host_node_by_key(&self.table, r.layer, obj) == Some(id) {
                    continue;
                }
                aliases.insert(obj, id, |id, obj| shows_host_object(&self.table, id, obj));
            }
        }
    }

    /// Forwards outside changes of the host lowers to the kernel, on a
    /// thread of its own.
    fn start_watch(&self, inval: Arc<dyn Invalidator>) {
        let Some(w) = self.watch.clone() else { return };
        // (layer index, root) of each host lower.
        let roots: Vec<(u32, HostId)> = self
            .layers
            .base()
            .filter_map(|(l, layer)| match layer.root() {
                LObj::Host(h) => Some((l, h.host_id())),
                LObj::Entry(_) | LObj::Mapped(_) => None,
            })
            .collect();
        let (table, aliases) = (self.table.clone(), self.host_aliases.clone());
        let node_of = move |id: HostId| {
            // The live layer's root changes with each snapshot.
            let live_root = table
                .get(ROOT_ID)
                .and_then(|r| r.upper())
                .map(|u| u.host_id());
            if roots.iter().any(|(_, root)| *root == id) || live_root == Some(id) {
                return Some(ROOT_ID);
            }
            roots
                .iter()
                .find_map(|&(layer, _)| host_node_by_key(&table, layer, id))
                .or_else(|| {
                    let (node, _) = table.get_by_key(&Key::Upper(id.dev, id.ino))?;
                    shows_host_object(&table, node, id).then_some(node)
                })
                .or_else(|| {
                    let node = aliases.lock().get(id)?;
                    shows_host_object(&table, node, id).then_some(node)
                })
        };
        let all = self.table.clone();
        watch::spawn_forwarder(w, node_of, move || all.ids(), inval, "layer");
    }

    // ---- resolution ------------------------------------------------------

    /// Resolves `name` in the directory `dir` (upper first, then the merged
    /// lowers). `None`: no such name, or a whiteout hides it.
    fn resolve(&self, dir: &ONode, name: &CStr) -> Result<Option<Found>> {
        let mut upper = None;
        let mut search_lowers = true;
        if let Some(up) = dir.upper() {
            let h = self.upper_dir()?;
            let fd = h.fd(&up)?;
            match h.stat_child(fd.as_fd(), name) {
                Ok(st) if host_whiteout(fd.as_fd(), name, &st) => return Ok(None),
                Ok(st) => {
                    let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
                    search_lowers = is_dir && !self.upper_opaque(fd.as_fd(), name);
                    upper = Some(st);
                }
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(e),
            }
        }
        let mut lowers: Vec<(LRef, LStat)> = Vec::new();
        if search_lowers {
            let dir_lowers = dir.lowers();
            // With many frozen layers, only those that hold the name are asked.
            let skip = self
                .frozen_index(&dir.frozen_index, &dir_lowers)?
                .map(|ix| (ix.covered(), ix.positions(name)));
            for (i, r) in dir_lowers.iter().enumerate() {
                if let Some((covered, held)) = &skip
                    && i < *covered
                    && !held.contains(&(i as u16))
                {
                    continue;
                }
                let layer = self.layer(r);
                let Some((obj, st)) = layer.lookup(&r.obj, name)? else {
                    continue;
                };
                if format::lower_whiteout(layer, &obj, &st) {
                    break;
                }
                let have_dir = upper.is_some() || !lowers.is_empty();
                if have_dir && !st.is_dir() {
                    // A non-directory below a directory ends the merge.
                    break;
                }
                let is_dir = st.is_dir();
                let opaque = is_dir && format::lower_opaque(layer, &obj);
                lowers.push((
                    LRef {
                        layer: r.layer,
                        obj,
                    },
                    st,
                ));
                if !is_dir || opaque {
                    break;
                }
            }
        }
        let kind = match (&upper, lowers.first()) {
            (Some(st), _) => FileKind::from_mode(st.st_mode),
            (None, Some((_, st))) => st.kind(),
            (None, None) => return Ok(None),
        }
        .ok_or(Errno::EIO)?;
        Ok(Some(Found {
            kind,
            upper,
            lowers,
        }))
    }

    /// Whether a lower provides `name` in `dir` (so removing or moving the
    /// upper's copy must leave a whiteout).
    fn lower_has(&self, dir: &ONode, name: &CStr) -> Result<bool> {
        for r in dir.lowers().iter() {
            let layer = self.layer(r);
            if let Some((obj, st)) = layer.lookup(&r.obj, name)? {
                return Ok(!format::lower_whiteout(layer, &obj, &st));
            }
        }
        Ok(false)
    }

    fn upper_opaque(&self, parent: BorrowedFd<'_>, name: &CStr) -> bool {
        let h = self.upper.as_ref().expect("called with an upper");
        match rustix::fs::openat(
            parent,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => host_opaque(h, fd.as_fd()),
            Err(_) => false,
        }
    }

    /// The upper object's recorded origin, if it was copied up.
    fn origin(&self, fd: BorrowedFd<'_>) -> Option<Key> {
        let h = self.upper.as_ref()?;
        let path = h.proc_path(fd);
        let mut v = [0u8; 64];
        let n = rustix::fs::getxattr(path.as_c_str(), self.origin_xattr, &mut v[..]).ok()?;
        parse_origin(&v[..n], self.layers.base_len())
    }

    /// The key an object in the upper or a frozen layer is known by: its
    /// recorded origin (unless another node holds that key and shows
    /// something else: a forged or stale origin must not merge two
    /// objects), else its own inode.
    fn own_key(&self, obj: &Arc<HostNode>) -> Result<Key> {
        let ukey = Key::Upper(obj.dev, obj.ino);
        let h = self.upper_dir()?;
        let fd = h.fd(obj)?;
        Ok(match self.origin(fd.as_fd()) {
            Some(k) => match self.table.get_by_key(&k) {
                Some((_, n)) if !n.shows(obj) => ukey,
                _ => k,
            },
            None => ukey,
        })
    }

    /// Takes a lookup reference on what `name` in `parent` resolved to.
    fn register(&self, parent: u64, dir: &ONode, name: &CStr, found: Found) -> Result<Entry> {
        let node = self.build_node(parent, dir, name, &found)?;
        let upper_node = node.upper();
        let lower_key = |(r, st): &(LRef, LStat)| Key::Lower(r.layer, st.key.0, st.key.1);
        // An object with an upper copy is keyed by it (its origin when it
        // was copied up, as the node was rekeyed then), a directory too:
        // keying a merged directory by its top lower would give it another
        // node whenever the lowers it merges come or go (made opaque, a
        // whiteout gone), and the kernel refuses a directory with two
        // inodes (ESTALE).
        let key = match (&upper_node, found.lowers.first()) {
            (None, Some((r, _))) if self.layers.is_frozen(r.layer) => match &r.obj {
                LObj::Host(obj) => self.own_key(obj)?,
                _ => return Err(Errno::EIO),
            },
            (None, Some(top)) => lower_key(top),
            (Some(u), _) => self.own_key(u)?,
            (None, None) => return Err(Errno::ENOENT),
        };
        let unwatched = self.unwatched(&node.lowers());
        let attr_st = match &found.upper {
            Some(st) => LStat::from_stat(st),
            None => found.lowers[0].1,
        };
        let merged = found.kind == FileKind::Directory
            && !found.lowers.is_empty()
            && (found.upper.is_some() || found.lowers.len() > 1);
        // A known node is kept unless its upper object is gone and the host
        // gave its inode number to the object the name now holds.
        let (id, known) = self
            .table
            .lookup(key, Self::node_id(self.tag, &key), Some(node), |old, _| {
                old.kind != found.kind
                    || old
                        .upper()
                        .zip(upper_node.as_ref())
                        .is_some_and(|(o, f)| !o.same_object(f))
            })
            .expect("a fresh node was given");
        if attr_st.nlink > 1 && found.kind != FileKind::Directory && known.upper().is_none() {
            known.remember_alias(parent, name);
        }
        self.remember_host_objects(id, &known);
        let mut attr = attr_of(&attr_st, id);
        if merged {
            // Like overlayfs: a merged directory's link count is unknown.
            attr.nlink = 1;
        }
        Ok(Entry {
            attr,
            generation: 0,
            entry_ttl: self.cfg.cache.entry(!unwatched),
            attr_ttl: self.cfg.cache.attr(!unwatched),
        })
    }

    /// A node (not yet in the table) for what `name` in `dir` resolved to;
    /// `parent` is `dir`'s id, recorded as the node's place.
    fn build_node(&self, parent: u64, dir: &ONode, name: &CStr, found: &Found) -> Result<ONode> {
        let upper = match &found.upper {
            Some(st) => {
                let h = self.upper_dir()?;
                let pfd = h.fd(&dir.upper().ok_or(Errno::EIO)?)?;
                Some(Arc::new(h.make_node(pfd.as_fd(), name, st)?))
            }
            None => None,
        };
        Ok(ONode::new(
            found.kind,
            (parent, name.to_owned()),
            upper,
            found.lowers.iter().map(|(r, _)| r.clone()).collect(),
        ))
    }

    /// Marks a directory node's upper opaque: it no longer merges the lowers
    /// (it is fully copied up, or lands where a lower may hold another).
    fn make_opaque(&self, node: &ONode) -> Result<()> {
        let up = node.upper().ok_or(Errno::EIO)?;
        self.set_opaque(self.upper_dir()?.fd(&up)?.as_fd())?;
        *node.lowers.write() = Lowers::new();
        Ok(())
    }

    fn lookup_in(&self, parent: u64, name: &CStr) -> Result<Entry> {
        let dir = self.node(parent)?;
        match self.resolve(&dir, name)? {
            Some(found) => self.register(parent, &dir, name, found),
            None => Err(Errno::ENOENT),
        }
    }

    /// Attributes of a node: the upper object's, else the top lower's.
    fn attr(&self, id: u64, node: &ONode) -> Result<AttrOut> {
        let lowers = node.lowers();
        let unwatched = self.unwatched(&lowers);
        let (st, merged) = match node.upper() {
            Some(u) => {
                let h = self.upper_dir()?;
                (
                    LStat::from_stat(&h.stat_fd(h.fd(&u)?.as_fd())?),
                    !lowers.is_empty(),
                )
            }
            None => {
                let top = lowers.first().ok_or(Errno::ESTALE)?;
                (self.layer(top).stat(&top.obj)?, lowers.len() > 1)
            }
        };
        let mut attr = attr_of(&st, id);
        if merged && node.kind == FileKind::Directory {
            attr.nlink = 1;
        }
        Ok(AttrOut {
            attr,
            ttl: self.cfg.cache.attr(!unwatched),
        })
    }

    // ---- listings --------------------------------------------------------

    /// The merged listing of a directory: upper names first, then each
    /// lower's names not already seen, whiteouts hiding what lies below.
    fn load_dir(&self, id: u64, node: &ONode) -> Result<Vec<DirEnt>> {
        let parent = if id == ROOT_ID {
            ROOT_ID
        } else {
            node.place().0
        };
        let mut out = vec![
            DirEnt {
                name: c".".to_owned(),
                ino: id,
                kind: FileKind::Directory,
            },
            DirEnt {
                name: c"..".to_owned(),
                ino: parent,
                kind: FileKind::Directory,
            },
        ];
        let mut seen: HashSet<CString> = HashSet::new();
        let mut names = Vec::new();
        if let Some(up) = node.upper() {
            format::list_host_dir(self.upper_dir()?, &up, &mut names)?;
            self.merge_names(&mut names, &mut seen, &mut out, |(dev, ino)| {
                Key::Upper(dev, ino)
            });
        }
        let lowers = node.lowers();
        let mut from = 0;
        if let Some(ix) = self.frozen_index(&node.frozen_index, &lowers)? {
            // The frozen layers, from the index: the topmost entry of each name.
            for (name, held) in &ix.names {
                if seen.contains(name) {
                    continue;
                }
                let top = held[0];
                if !top.whiteout {
                    out.push(DirEnt {
                        name: name.clone(),
                        ino: Self::node_id(self.tag, &Key::Upper(top.key.0, top.key.1)),
                        kind: top.kind,
                    });
                }
                seen.insert(name.clone());
            }
            from = ix.covered();
        }
        for r in lowers[from..].iter() {
            format::list_layer(self.layer(r), &r.obj, &mut names)?;
            let frozen = self.layers.is_frozen(r.layer);
            self.merge_names(&mut names, &mut seen, &mut out, |(a, b)| match frozen {
                true => Key::Upper(a, b),
                false => Key::Lower(r.layer, a, b),
            });
        }
        Ok(out)
    }

    /// Moves `names` (one layer's) into the listing `out`: names already seen
    /// in a higher layer are skipped, whiteouts only recorded as seen. The
    /// ids are the ones the entries' own keys give (a plain readdir shows
    /// them; readdirplus replaces them with the looked-up ones, which differ
    /// for merged directories and copied-up files).
    fn merge_names(
        &self,
        names: &mut Vec<Listed>,
        seen: &mut HashSet<CString>,
        out: &mut Vec<DirEnt>,
        key_of: impl Fn((u64, u64)) -> Key,
    ) {
        for n in names.drain(..) {
            if seen.contains(&n.name) {
                continue;
            }
            if !n.whiteout {
                let ino = Self::node_id(self.tag, &key_of(n.key));
                out.push(DirEnt {
                    name: n.name.clone(),
                    ino,
                    kind: n.kind,
                });
            }
            seen.insert(n.name);
        }
    }

    /// Whether a directory shows no names (whiteouts and temporaries aside).
    fn is_empty_dir(&self, id: u64, node: &ONode) -> Result<bool> {
        Ok(self.load_dir(id, node)?.len() <= 2)
    }
}

/// An origin as recorded by a copy-up: `LAYER:A:B` for an object of one of
/// the mount's own lowers (`base` of them), `u:DEV:INO` for one of a
/// frozen layer that had no origin of its own.
fn parse_origin(v: &[u8], base: usize) -> Option<Key> {
    let s = std::str::from_utf8(v).ok()?;
    if let Some(rest) = s.strip_prefix("u:") {
        let mut it = rest.split(':').map(str::parse::<u64>);
        let (a, b) = (it.next()?.ok()?, it.next()?.ok()?);
        return it.next().is_none().then_some(Key::Upper(a, b));
    }
    let mut it = s.split(':').map(str::parse::<u64>);
    let (l, a, b) = (it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?);
    (l < base as u64).then_some(Key::Origin(l as u32, a, b))
}

/// The upper must be a directory strata can write.
fn check_upper(h: &HostDir) -> std::result::Result<(), String> {
    rustix::fs::access(h.path(), rustix::fs::Access::WRITE_OK)
        .map_err(|e| format!("{}: upper is not writable: {e}", h.path().display()))?;
    Ok(())
}
