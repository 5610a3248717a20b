//! Snapshots and branches of an overlay's writable state, and per-process
//! binding: many isolated workspaces through one mount.
//!
//! A workspace is an overlay with an upper whose state (`state.rs`) records
//! layers, snapshots and branches. A snapshot freezes the branch's live
//! layer and gives it a new, empty one (`Overlay::snapshot`): O(1) in the
//! tree's size. A branch is a new live layer over a snapshot's layers.
//!
//! The `Workspace` rule serves each branch in use with an overlay of its
//! own (layers and open files shared), whose node ids carry the branch's
//! number (`ids`): every request names its branch by its node id, except
//! the root's, which go to the caller's branch (`pids`) or the mount's
//! current one. While any process is bound, the root's names are given to
//! the kernel without a cache timeout, so each path walk asks again; below
//! the root, caches stay as long as in any overlay, since a node belongs
//! to one branch.

pub mod diff;
pub mod ids;
pub mod pids;
pub mod state;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::control::{self, Refusal};
use crate::fs::*;
use crate::host::HostDir;
use crate::host::files::OpenFiles;
use crate::layer::HostLayer;
use crate::listing::DirEnt;
use crate::overlay::{LayerSet, Overlay, OverlayConfig, Parts};
use crate::stack::{New, Rule};
use crate::{Errno, Result};
use state::{State, layer_rel};

/// One branch being served.
struct Served {
    name: String,
    number: u8,
    overlay: Overlay,
}

pub struct Workspace {
    cfg: OverlayConfig,
    layers: Arc<LayerSet>,
    upper: Arc<HostDir>,
    upper_path: PathBuf,
    files: Arc<OpenFiles>,
    /// Branch number → its overlay, once a process uses the branch.
    served: RwLock<Vec<Option<Arc<Served>>>>,
    /// The branch processes that are not bound see.
    current: AtomicU8,
    /// `None` until the first snapshot or branch: an upper without them
    /// stays a plain kernel-overlayfs upper.
    state: Mutex<Option<State>>,
    /// Workspace layer id → its index in `layers`.
    frozen: Mutex<HashMap<i64, u32>>,
    bindings: pids::Bindings,
    invalidator: OnceLock<Arc<dyn Invalidator>>,
    /// Held while the workspace state exists: one daemon per workspace.
    lock: Mutex<Option<OwnedFd>>,
}

/// Takes the workspace's lock (`.strata/lock`), refusing a second daemon.
fn lock_workspace(upper: &std::path::Path) -> std::result::Result<OwnedFd, String> {
    let path = upper.join(state::DIR).join("lock");
    let fd = rustix::fs::open(
        &path,
        rustix::fs::OFlags::CREATE
            | rustix::fs::OFlags::RDWR
            | rustix::fs::OFlags::CLOEXEC
            | rustix::fs::OFlags::NOFOLLOW,
        rustix::fs::Mode::from_raw_mode(0o600),
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    rustix::fs::flock(&fd, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|_| {
        format!(
            "upper {}: its workspace is in use by another strata daemon",
            upper.display()
        )
    })?;
    Ok(fd)
}

impl Workspace {
    /// Serves the overlay `cfg` describes (it must have an upper), showing
    /// `branch` (default: the workspace's current branch, `main` at first).
    pub fn open(cfg: OverlayConfig, branch: Option<&str>) -> std::result::Result<Self, String> {
        let upper_path = cfg
            .upper
            .clone()
            .ok_or("a workspace needs an upper directory")?;
        let layers = Arc::new(LayerSet::new(crate::overlay::open_lowers(&cfg)?));
        let upper = Arc::new(crate::overlay::open_upper(&upper_path, cfg.fd_cache)?);
        let mut st = State::open(&upper_path, false)?;
        let lock = match &mut st {
            Some(s) => {
                let lock = lock_workspace(&upper_path)?;
                s.remove_orphans().map_err(|e| e.why)?;
                s.set_lowers(&cfg.lowers).map_err(|e| e.why)?;
                Some(lock)
            }
            None => None,
        };
        let ws = Workspace {
            cfg,
            layers,
            upper,
            upper_path,
            files: Arc::default(),
            served: RwLock::new(vec![None; ids::MAX_BRANCH as usize + 1]),
            current: AtomicU8::new(0),
            state: Mutex::new(st),
            frozen: Mutex::default(),
            bindings: pids::Bindings::default(),
            invalidator: OnceLock::new(),
            lock: Mutex::new(lock),
        };
        let name = match (branch, ws.state.lock().as_ref()) {
            (Some(b), _) => b.to_string(),
            (None, Some(s)) => s.current().map_err(|e| e.why)?,
            (None, None) => state::MAIN.to_string(),
        };
        let served = ws
            .serve(&name)
            .map_err(|e| format!("-o branch={name}: {}", e.why))?;
        ws.current.store(served.number, Ordering::Release);
        Ok(ws)
    }

    /// What the mount serves, for logs.
    pub fn describe(&self) -> String {
        let s = self.current();
        format!("branch {}: {}", s.name, s.overlay.describe())
    }

    fn current(&self) -> Arc<Served> {
        let n = self.current.load(Ordering::Acquire);
        self.served.read()[n as usize]
            .clone()
            .expect("the current branch is served")
    }

    /// The overlay serving branch `name`, built on first use.
    fn serve(&self, name: &str) -> std::result::Result<Arc<Served>, Refusal> {
        let st = self.state.lock();
        let (number, chain) = match st.as_ref() {
            Some(s) => (s.branch(name)?.number, s.chain(name)?),
            None if name == state::MAIN => (
                0,
                state::Chain {
                    live: 0,
                    frozen: Vec::new(),
                },
            ),
            None => {
                return Err(Refusal::new(
                    Errno::ENOENT,
                    format!(
                        "no branch named {name:?} (the upper has no snapshots or branches yet)"
                    ),
                ));
            }
        };
        drop(st);
        if let Some(s) = &self.served.read()[number as usize]
            && s.name == name
        {
            return Ok(s.clone());
        }
        let io = |e: Errno, id: i64| {
            Refusal::new(
                Errno::EIO,
                format!(
                    "layer {}: {e}",
                    self.upper_path.join(layer_rel(id)).display()
                ),
            )
        };
        let live = self
            .upper
            .dir_below(&layer_rel(chain.live))
            .map_err(|e| io(e, chain.live))?;
        let mut frozen = Vec::new();
        for id in &chain.frozen {
            frozen.push(self.frozen_layer(*id).map_err(|e| io(e, *id))?);
        }
        let overlay = Overlay::assemble(
            self.cfg.clone(),
            Parts {
                layers: self.layers.clone(),
                upper: self.upper.clone(),
                live,
                frozen,
                tag: number,
                files: self.files.clone(),
            },
        );
        if let Some(inval) = self.invalidator.get() {
            overlay.attach(inval.clone());
        }
        let served = Arc::new(Served {
            name: name.to_string(),
            number,
            overlay,
        });
        let mut all = self.served.write();
        // Another request may have served it meanwhile: keep that one.
        match &all[number as usize] {
            Some(s) if s.name == name => Ok(s.clone()),
            _ => {
                all[number as usize] = Some(served.clone());
                Ok(served)
            }
        }
    }

    /// The index in `layers` of workspace layer `id`, frozen.
    fn frozen_layer(&self, id: i64) -> Result<u32> {
        let mut frozen = self.frozen.lock();
        if let Some(i) = frozen.get(&id) {
            return Ok(*i);
        }
        let root = self.upper.dir_below(&layer_rel(id))?;
        let i = self
            .layers
            .push(Box::new(HostLayer::within(self.upper.clone(), root)))
            .map_err(|e| {
                tracing::error!("{e}");
                Errno::ENOSPC
            })?;
        frozen.insert(id, i);
        Ok(i)
    }

    fn by_id(&self, ino: u64) -> Result<Arc<Served>> {
        self.served.read()[ids::branch_of(ino) as usize]
            .clone()
            .ok_or(Errno::ESTALE)
    }

    /// The branch the caller sees.
    fn for_caller(&self, ctx: &Ctx) -> Arc<Served> {
        if let Some(n) = self.bindings.branch_of(ctx.pid)
            && let Some(s) = self.served.read()[n as usize].clone()
        {
            return s;
        }
        self.current()
    }

    fn route(&self, ctx: &Ctx, ino: u64) -> Result<Arc<Served>> {
        match ino {
            ROOT_ID => Ok(self.for_caller(ctx)),
            _ => self.by_id(ino),
        }
    }

    /// The root's names and listing differ by caller while processes are
    /// bound: the kernel must not keep them.
    fn root_shared(&self, ino: u64) -> bool {
        ino != ROOT_ID || !self.bindings.any()
    }

    /// Makes the kernel ask again for the root's names and listing (the
    /// branch a caller sees there changed). Expired, not dropped: a name
    /// that resolves to the same node keeps what the kernel cached below it.
    fn forget_root(&self) {
        let Some(inval) = self.invalidator.get() else {
            return;
        };
        let served: Vec<Arc<Served>> = self.served.read().iter().flatten().cloned().collect();
        let mut names = std::collections::HashSet::new();
        for s in &served {
            if let Ok(list) = s.overlay.list(ROOT_ID, &()) {
                names.extend(list.into_iter().map(|e| e.name));
            }
        }
        for n in names
            .iter()
            .filter(|n| !matches!(n.to_bytes(), b"." | b".."))
        {
            inval.expire(ROOT_ID, OsStr::from_bytes(n.to_bytes()));
        }
        inval.inode(ROOT_ID, true);
    }

    /// The workspace state, made on first use.
    fn state(&self) -> std::result::Result<parking_lot::MutexGuard<'_, Option<State>>, Refusal> {
        let mut st = self.state.lock();
        if st.is_none() {
            let fail = |e: String| Refusal::new(Errno::EIO, e);
            let mut made = State::open(&self.upper_path, true).map_err(fail)?;
            *self.lock.lock() = Some(lock_workspace(&self.upper_path).map_err(fail)?);
            if let Some(m) = &mut made {
                m.set_lowers(&self.cfg.lowers)?;
            }
            *st = made;
        }
        Ok(st)
    }

    // ---- control operations -------------------------------------------

    fn snapshot_create(&self, ctx: &Ctx, name: &str) -> std::result::Result<(), Refusal> {
        let served = self.for_caller(ctx);
        let mut guard = self.state()?;
        let st = guard.as_mut().expect("made by state()");
        let (tx, new) = st.begin_snapshot(&served.name, name)?;
        let rel = layer_rel(new.live);
        let dir = self.upper_path.join(&rel);
        match served
            .overlay
            .snapshot(&rel, move || tx.commit().map_err(|e| e.to_string()))
        {
            Ok(i) => {
                self.frozen.lock().insert(new.frozen, i);
                tracing::info!(
                    snapshot = name,
                    id = new.id,
                    branch = served.name,
                    "snapshot taken"
                );
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(Refusal::new(Errno::EIO, format!("snapshot {name:?}: {e}")))
            }
        }
    }

    fn snapshot_rm(&self, name: &str) -> std::result::Result<(), Refusal> {
        let mut guard = self.state()?;
        guard.as_mut().expect("made").remove_snapshot(name)
    }

    fn branch_create(&self, spec: &str) -> std::result::Result<(), Refusal> {
        let (name, from) = spec
            .split_once(' ')
            .ok_or_else(|| Refusal::new(Errno::EINVAL, "branch.create takes \"NAME SNAPSHOT\""))?;
        let mut guard = self.state()?;
        guard.as_mut().expect("made").create_branch(name, from)?;
        Ok(())
    }

    fn branch_switch(&self, name: &str) -> std::result::Result<(), Refusal> {
        let served = self.serve(name)?;
        if let Some(st) = self.state.lock().as_mut() {
            st.set_current(name)?;
        }
        self.current.store(served.number, Ordering::Release);
        self.forget_root();
        Ok(())
    }

    fn branch_bind(&self, ctx: &Ctx, spec: &str) -> std::result::Result<(), Refusal> {
        let (name, pid) = spec
            .split_once(' ')
            .and_then(|(n, p)| Some((n, p.parse::<u32>().ok()?)))
            .ok_or_else(|| Refusal::new(Errno::EINVAL, "branch.bind takes \"NAME PID\""))?;
        let pid = if pid == 0 { ctx.pid } else { pid };
        self.may_bind(ctx, pid)?;
        let served = self.serve(name)?;
        self.bindings.bind(pid, served.number)?;
        self.forget_root();
        tracing::info!(pid, branch = name, "process bound");
        Ok(())
    }

    fn branch_unbind(&self, ctx: &Ctx, pid: &str) -> std::result::Result<(), Refusal> {
        let pid = pid
            .parse::<u32>()
            .map_err(|_| Refusal::new(Errno::EINVAL, "branch.unbind takes a pid"))?;
        let pid = if pid == 0 { ctx.pid } else { pid };
        self.may_bind(ctx, pid)?;
        if !self.bindings.unbind(pid) {
            return Err(Refusal::new(
                Errno::ENOENT,
                format!("process {pid} is not bound"),
            ));
        }
        self.forget_root();
        Ok(())
    }

    /// Root and the mount's owner bind any process; others their own
    /// processes and those below them.
    fn may_bind(&self, ctx: &Ctx, pid: u32) -> std::result::Result<(), Refusal> {
        if pids::proc_stat(pid).is_none() {
            return Err(Refusal::new(Errno::ESRCH, format!("no process {pid}")));
        }
        if control::privileged(ctx) || pids::is_within(pid, ctx.pid) {
            return Ok(());
        }
        Err(Refusal::new(
            Errno::EPERM,
            format!("process {pid} is not the caller's nor below it"),
        ))
    }

    fn branch_rm(&self, name: &str) -> std::result::Result<(), Refusal> {
        let mut guard = self.state()?;
        let st = guard.as_mut().expect("made");
        let b = st.branch(name)?;
        if b.number == self.current.load(Ordering::Acquire) {
            return Err(Refusal::new(
                Errno::EBUSY,
                format!("branch {name:?} is the one the mount shows: switch to another first"),
            ));
        }
        let users = self.bindings.users(b.number);
        if !users.is_empty() {
            return Err(Refusal::new(
                Errno::EBUSY,
                format!("branch {name:?} is in use by processes {users:?}"),
            ));
        }
        if let Some(s) = &self.served.read()[b.number as usize]
            && s.overlay.open_handles() > 0
        {
            return Err(Refusal::new(
                Errno::EBUSY,
                format!("branch {name:?} has open files"),
            ));
        }
        st.remove_branch(name)?;
        self.served.write()[b.number as usize] = None;
        drop(guard);
        self.forget_root();
        Ok(())
    }

    fn bindings_json(&self) -> String {
        let served = self.served.read();
        let list: Vec<serde_json::Value> = self
            .bindings
            .all()
            .into_iter()
            .map(|(pid, n)| {
                let name = served[n as usize].as_ref().map(|s| s.name.clone());
                serde_json::json!({ "pid": pid, "branch": name })
            })
            .collect();
        serde_json::Value::Array(list).to_string()
    }
}

/// Control keys of a workspace (`user.strata.KEY` on `/.strata`).
const KEYS: [&str; 10] = [
    "workspace",
    "branch",
    "bindings",
    "snapshot.create",
    "snapshot.rm",
    "branch.create",
    "branch.rm",
    "branch.switch",
    "branch.bind",
    "branch.unbind",
];

impl Rule for Workspace {
    type Dir = (u8, ());

    fn describe(&self) -> String {
        Workspace::describe(self)
    }

    fn lookup(&self, ctx: &Ctx, parent: u64, name: &CStr) -> Result<Entry> {
        let mut e = self.route(ctx, parent)?.overlay.lookup(ctx, parent, name)?;
        if !self.root_shared(parent) {
            e.entry_ttl = Duration::ZERO;
        }
        Ok(e)
    }

    fn negative_ttl(&self, ctx: &Ctx, parent: u64) -> Duration {
        match (self.root_shared(parent), self.route(ctx, parent)) {
            (true, Ok(s)) => s.overlay.negative_ttl(ctx, parent),
            _ => Duration::ZERO,
        }
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        if let Ok(s) = self.by_id(ino) {
            s.overlay.forget(ino, nlookup);
        }
    }

    fn inodes(&self) -> usize {
        let served = self.served.read();
        let mut n: usize = served.iter().flatten().map(|s| s.overlay.inodes()).sum();
        // Every branch pins a root; the kernel knows one.
        n -= served.iter().flatten().count().saturating_sub(1);
        n
    }

    fn getattr(&self, ctx: &Ctx, ino: u64, fh: Option<u64>) -> Result<AttrOut> {
        let mut a = self.route(ctx, ino)?.overlay.getattr(ctx, ino, fh)?;
        if !self.root_shared(ino) {
            a.ttl = Duration::ZERO;
        }
        Ok(a)
    }

    fn setattr(&self, ctx: &Ctx, ino: u64, fh: Option<u64>, set: &SetAttr) -> Result<AttrOut> {
        self.route(ctx, ino)?.overlay.setattr(ctx, ino, fh, set)
    }

    fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        self.by_id(ino)?.overlay.readlink(ino)
    }

    fn make(&self, ctx: &Ctx, parent: u64, name: &CStr, new: New<'_>) -> Result<Entry> {
        self.route(ctx, parent)?
            .overlay
            .make(ctx, parent, name, new)
    }

    fn remove(&self, ctx: &Ctx, parent: u64, name: &CStr, dir: bool) -> Result<()> {
        self.route(ctx, parent)?
            .overlay
            .remove(ctx, parent, name, dir)
    }

    fn rename(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &CStr,
        new_parent: u64,
        new_name: &CStr,
        flags: u32,
    ) -> Result<()> {
        let s = self.route(ctx, parent)?;
        if self.route(ctx, new_parent)?.number != s.number {
            return Err(Errno::EXDEV);
        }
        s.overlay
            .rename(ctx, parent, name, new_parent, new_name, flags)
    }

    fn link(&self, ctx: &Ctx, ino: u64, new_parent: u64, new_name: &CStr) -> Result<Entry> {
        let s = self.by_id(ino)?;
        if self.route(ctx, new_parent)?.number != s.number {
            return Err(Errno::EXDEV);
        }
        s.overlay.link(ctx, ino, new_parent, new_name)
    }

    fn files(&self) -> &OpenFiles {
        &self.files
    }

    fn open(&self, ino: u64, flags: i32) -> Result<Opened> {
        self.by_id(ino)?.overlay.open(ino, flags)
    }

    fn create(
        &self,
        ctx: &Ctx,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
        flags: i32,
    ) -> Result<(Entry, Opened)> {
        self.route(ctx, parent)?
            .overlay
            .create(ctx, parent, name, mode, umask, flags)
    }

    fn release(&self, ino: u64, fh: u64) {
        match self.by_id(ino) {
            Ok(s) => s.overlay.release(ino, fh),
            Err(_) => {
                self.files.release(fh);
            }
        }
    }

    fn opendir(&self, ctx: &Ctx, ino: u64) -> Result<(Self::Dir, bool)> {
        let s = self.route(ctx, ino)?;
        let (dir, cache) = s.overlay.opendir(ctx, ino)?;
        Ok(((s.number, dir), cache && self.root_shared(ino)))
    }

    fn list(&self, ino: u64, dir: &Self::Dir) -> Result<Vec<DirEnt>> {
        self.branch(dir.0)?.overlay.list(ino, &dir.1)
    }

    fn dir_attr(&self, ino: u64, dir: &Self::Dir) -> Result<Attr> {
        self.branch(dir.0)?.overlay.dir_attr(ino, &dir.1)
    }

    fn list_lookup(&self, ctx: &Ctx, ino: u64, dir: &Self::Dir, name: &CStr) -> Result<Entry> {
        let mut e = self
            .branch(dir.0)?
            .overlay
            .list_lookup(ctx, ino, &dir.1, name)?;
        if !self.root_shared(ino) {
            e.entry_ttl = Duration::ZERO;
        }
        Ok(e)
    }

    fn fsyncdir(&self, ino: u64, dir: &Self::Dir, datasync: bool) -> Result<()> {
        self.branch(dir.0)?.overlay.fsyncdir(ino, &dir.1, datasync)
    }

    fn statfs(&self, ctx: &Ctx, ino: u64) -> Result<StatFs> {
        self.route(ctx, ino)?.overlay.statfs(ctx, ino)
    }

    fn setxattr(&self, ctx: &Ctx, ino: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        self.route(ctx, ino)?
            .overlay
            .setxattr(ctx, ino, name, value, flags)
    }

    fn getxattr(&self, ctx: &Ctx, ino: u64, name: &OsStr, size: u32) -> Result<Xattr> {
        self.route(ctx, ino)?.overlay.getxattr(ctx, ino, name, size)
    }

    fn listxattr(&self, ctx: &Ctx, ino: u64, size: u32) -> Result<Xattr> {
        self.route(ctx, ino)?.overlay.listxattr(ctx, ino, size)
    }

    fn removexattr(&self, ctx: &Ctx, ino: u64, name: &OsStr) -> Result<()> {
        self.route(ctx, ino)?.overlay.removexattr(ctx, ino, name)
    }

    fn access(&self, ctx: &Ctx, ino: u64, mask: i32) -> Result<()> {
        self.route(ctx, ino)?.overlay.access(ctx, ino, mask)
    }

    fn cached_fds(&self) -> usize {
        self.upper.cached_fds() + self.layers.all().map(|l| l.cached_fds()).sum::<usize>()
    }

    fn attach(&self, invalidator: Arc<dyn Invalidator>) {
        let _ = self.invalidator.set(invalidator.clone());
        for s in self.served.read().iter().flatten() {
            s.overlay.attach(invalidator.clone());
        }
    }

    fn control_keys(&self) -> Vec<String> {
        KEYS.iter().map(|k| k.to_string()).collect()
    }

    fn control_get(&self, ctx: &Ctx, key: &str) -> Option<String> {
        Some(match key {
            "workspace" => self.upper_path.display().to_string(),
            "branch" => self.for_caller(ctx).name.clone(),
            "bindings" => self.bindings_json(),
            k if KEYS.contains(&k) => String::new(),
            _ => return None,
        })
    }

    fn control_set(
        &self,
        ctx: &Ctx,
        key: &str,
        value: &str,
    ) -> Option<std::result::Result<(), Refusal>> {
        Some(match key {
            "snapshot.create" => self.snapshot_create(ctx, value),
            "snapshot.rm" => self.snapshot_rm(value),
            "branch.create" => self.branch_create(value),
            "branch.rm" => self.branch_rm(value),
            "branch.switch" => self.branch_switch(value),
            "branch.bind" => self.branch_bind(ctx, value),
            "branch.unbind" => self.branch_unbind(ctx, value),
            "workspace" | "branch" | "bindings" => {
                Err(Refusal::new(Errno::EINVAL, format!("{key} is read-only")))
            }
            _ => return None,
        })
    }

    fn control_open(&self, key: &str) -> bool {
        matches!(key, "branch.bind" | "branch.unbind")
    }
}

impl Workspace {
    fn branch(&self, n: u8) -> Result<Arc<Served>> {
        self.served.read()[n as usize].clone().ok_or(Errno::ESTALE)
    }
}
