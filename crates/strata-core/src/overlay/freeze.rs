//! Snapshots: the live upper layer becomes a frozen lower and a new, empty
//! directory the live layer. What the mount shows does not change, nor do
//! node ids, so the kernel's caches stay valid.
//!
//! A file open on the old live layer moves into the new one, and a copy of
//! it takes its place in the frozen layer: descriptors (and the kernel's
//! passthrough backing files, which bypass the daemon) keep writing the
//! live branch, never the snapshot.

use super::*;

/// A file open on the live layer, to be moved at a snapshot.
struct Moving {
    id: u64,
    node: Arc<ONode>,
    /// The file, and the live directory holding it (frozen after the snapshot).
    file: Arc<HostNode>,
    dir: Arc<OwnedFd>,
    name: CString,
    /// Its copy, under a temporary name in the same directory.
    copy: CString,
}

impl Overlay {
    /// Records a handle open on the node's upper file.
    pub(super) fn note_open_upper(&self, id: u64, node: &ONode, fh: u64) {
        if node.kind == FileKind::Regular && node.upper().is_some() {
            self.open_upper.lock().entry(id).or_default().push(fh);
        }
    }

    /// Handles open on the overlay's files (upper or lower).
    pub fn open_handles(&self) -> usize {
        let upper: usize = self.open_upper.lock().values().map(|v| v.len()).sum();
        let lower: usize = self.lower_readers.lock().values().map(|v| v.len()).sum();
        upper + lower
    }

    pub(super) fn drop_open_upper(&self, id: u64, fh: u64) {
        let mut open = self.open_upper.lock();
        if let Some(fhs) = open.get_mut(&id) {
            fhs.retain(|f| *f != fh);
            if fhs.is_empty() {
                open.remove(&id);
            }
        }
    }

    /// Takes a snapshot: the live layer is frozen (a lower from now on) and
    /// the empty directory `new_live` (relative to the upper) becomes the
    /// live layer; see [`Overlay::freeze`]. Returns the frozen layer's index.
    pub fn snapshot(
        &self,
        new_live: &std::path::Path,
        commit: impl FnOnce() -> std::result::Result<(), String>,
    ) -> std::result::Result<u32, String> {
        let h = self.upper.clone().ok_or("the mount has no upper")?;
        let live = h
            .dir_below(new_live)
            .map_err(|e| format!("{}: {e}", h.path().join(new_live).display()))?;
        let old = self
            .node(ROOT_ID)
            .ok()
            .and_then(|r| r.upper())
            .ok_or("the mount has no live layer")?;
        let frozen = self
            .layers
            .push(Box::new(crate::layer::HostLayer::within(h, old)))?;
        self.freeze(frozen, live, commit)?;
        Ok(frozen)
    }

    /// Freezes the live layer. `frozen` is the layer (already in the layer
    /// set) whose root is the live layer's root; `live` the root of the new
    /// live layer, an empty directory. `commit` makes the change durable;
    /// it runs once the copies of open files are made, and if it (or
    /// anything before it) fails, nothing changed. Requests that may change
    /// the upper wait meanwhile.
    fn freeze(
        &self,
        frozen: u32,
        live: Arc<HostNode>,
        commit: impl FnOnce() -> std::result::Result<(), String>,
    ) -> std::result::Result<(), String> {
        let _gate = self.gate.write();
        let _ns = self.ns_lock.lock();
        let h = self
            .upper_dir()
            .map_err(|_| "the mount has no upper".to_string())?;
        let root = self.node(ROOT_ID).map_err(|e| e.to_string())?;
        if root.upper().is_none() {
            return Err("the mount has no live layer".into());
        }
        let mut moving = Vec::new();
        for id in self.open_upper.lock().keys().copied().collect::<Vec<_>>() {
            match self.copy_open_file(h, frozen, id) {
                Ok(Some(m)) => moving.push(m),
                Ok(None) => {}
                Err(e) => {
                    discard_copies(&moving);
                    return Err(format!("copying open file (node {id}): {e}"));
                }
            }
        }
        if let Err(e) = commit() {
            discard_copies(&moving);
            return Err(e);
        }
        self.table.for_each(|node| {
            let Some(up) = node.upper.write().take() else {
                return;
            };
            let mut lowers = node.lowers.write();
            let top = LRef {
                layer: frozen,
                obj: LObj::Host(up),
            };
            match node.kind {
                FileKind::Directory => lowers.insert(0, top),
                _ => *lowers = std::iter::once(top).collect(),
            }
        });
        *root.upper.write() = Some(live);
        for m in &moving {
            if let Err(e) = self.move_open_file(h, frozen, m) {
                tracing::error!(
                    ino = m.id,
                    "snapshot: open file {:?} stays shared with the snapshot: {e}",
                    m.name
                );
            }
        }
        Ok(())
    }

    /// Makes the frozen copy of open node `id`'s file, unless it is not a
    /// plain file at its place (unlinked, or hard-linked: its other names
    /// would stay shared).
    fn copy_open_file(&self, h: &HostDir, frozen: u32, id: u64) -> Result<Option<Moving>> {
        let Some(node) = self.table.get(id) else {
            return Ok(None);
        };
        let Some(file) = node.upper() else {
            return Ok(None);
        };
        let (pid, name) = node.place();
        let Some(dir) = self.table.get(pid).and_then(|p| p.upper()) else {
            return Ok(None);
        };
        let dir = h.fd(&dir)?;
        match h.stat_child(dir.as_fd(), &name) {
            Ok(st) if (st.st_dev, st.st_ino) == (file.dev, file.ino) && st.st_nlink == 1 => {}
            Ok(st) if (st.st_dev, st.st_ino) == (file.dev, file.ino) => {
                tracing::warn!(
                    ino = id,
                    "snapshot: open file {name:?} has other names; it stays shared with the snapshot"
                );
                return Ok(None);
            }
            _ => return Ok(None),
        }
        let src = LRef {
            layer: frozen,
            obj: LObj::Host(file.clone()),
        };
        let lst = self.layer(&src).stat(&src.obj)?;
        let copy = tmp_name();
        if let Err(e) = self.build_copy(dir.as_fd(), &copy, &src, &lst) {
            let _ = rustix::fs::unlinkat(&*dir, copy.as_c_str(), AtFlags::empty());
            return Err(e);
        }
        format::mark_tmp(dir.as_fd(), &copy);
        Ok(Some(Moving {
            id,
            node,
            file,
            dir,
            name,
            copy,
        }))
    }

    /// Moves an open file into the new live layer (its parents copied up
    /// first) and puts its copy in its place in the frozen layer.
    fn move_open_file(&self, h: &HostDir, frozen: u32, m: &Moving) -> Result<()> {
        let (pid, _) = m.node.place();
        let new_dir = h.fd(&self.copy_up(pid)?)?;
        rustix::fs::renameat(&*m.dir, m.name.as_c_str(), &*new_dir, m.name.as_c_str())?;
        rustix::fs::renameat(&*m.dir, m.copy.as_c_str(), &*m.dir, m.name.as_c_str())?;
        format::unmark_tmp(m.dir.as_fd(), &m.name);
        let st = h.stat_child(m.dir.as_fd(), &m.name)?;
        let copy = Arc::new(h.make_node(m.dir.as_fd(), &m.name, &st)?);
        *m.node.upper.write() = Some(m.file.clone());
        *m.node.lowers.write() = std::iter::once(LRef {
            layer: frozen,
            obj: LObj::Host(copy),
        })
        .collect();
        Ok(())
    }
}

fn discard_copies(moving: &[Moving]) {
    for m in moving {
        let _ = rustix::fs::unlinkat(&*m.dir, m.copy.as_c_str(), AtFlags::empty());
    }
}
