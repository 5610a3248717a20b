//! A workspace's state: its layers, snapshots and branches, in SQLite
//! (`UPPER/.strata/state.db`, WAL journal). Every change is one
//! transaction, so a crash leaves the state as it was before the change or
//! after it; a layer directory made for a change that never committed is
//! an orphan, removed when the workspace is next opened.
//!
//! Layer 0 is the upper directory itself: the live layer of branch `main`
//! until its first snapshot (an upper without snapshots is an ordinary
//! kernel-overlayfs upper). Layer N > 0 is `UPPER/.strata/layers/N`.
//! Layers form chains through their parents; a snapshot names a frozen
//! layer (and so its chain), a branch its live layer.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

use super::ids::MAX_BRANCH;
use crate::Errno;

/// The workspace's directory inside the upper (the name the control file
/// takes in the mount's root, so the mount never shows it).
pub const DIR: &str = crate::control::NAME;
/// The branch every workspace starts with.
pub const MAIN: &str = "main";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layer (
    id INTEGER PRIMARY KEY,
    parent INTEGER REFERENCES layer(id),
    frozen INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshot (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    layer INTEGER NOT NULL REFERENCES layer(id),
    branch TEXT NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS branch (
    name TEXT PRIMARY KEY,
    number INTEGER NOT NULL UNIQUE,
    layer INTEGER NOT NULL REFERENCES layer(id),
    from_snapshot INTEGER,
    created INTEGER NOT NULL
);
";

pub use crate::control::Refusal;

fn db_error(e: rusqlite::Error) -> Refusal {
    Refusal::new(Errno::EIO, format!("workspace state: {e}"))
}

pub type Result<T> = std::result::Result<T, Refusal>;

/// A branch's layers: its live layer and the frozen ones below, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub live: i64,
    pub frozen: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotInfo {
    pub id: i64,
    pub name: String,
    /// The branch it was taken of.
    pub branch: String,
    /// The snapshot below it in its chain, if any.
    pub parent: Option<String>,
    /// Seconds since the epoch.
    pub created: i64,
    #[serde(skip)]
    pub layer: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BranchInfo {
    pub name: String,
    pub number: u8,
    /// The snapshot it was made from (none for `main`).
    pub from: Option<String>,
    pub created: i64,
    #[serde(skip)]
    pub layer: i64,
}

/// A new snapshot, not yet committed.
pub struct NewSnapshot {
    pub id: i64,
    /// The layer frozen by it.
    pub frozen: i64,
    /// The branch's new live layer (its directory exists).
    pub live: i64,
}

pub struct State {
    conn: Connection,
    upper: PathBuf,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Names of snapshots and branches: one path-safe word, not a number (a
/// number names a snapshot by id).
pub fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && !name.bytes().all(|b| b.is_ascii_digit());
    match ok {
        true => Ok(()),
        false => Err(Refusal::new(
            Errno::EINVAL,
            format!(
                "{what} name {name:?}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit, not all digits"
            ),
        )),
    }
}

/// The path of layer `id` relative to the upper.
pub fn layer_rel(id: i64) -> PathBuf {
    match id {
        0 => PathBuf::new(),
        n => Path::new(DIR).join("layers").join(n.to_string()),
    }
}

impl State {
    /// The state file of the workspace in `upper`.
    pub fn path(upper: &Path) -> PathBuf {
        upper.join(DIR).join("state.db")
    }

    /// Opens the workspace state of `upper`: `None` when it has none yet
    /// (and `create` is false).
    pub fn open(upper: &Path, create: bool) -> std::result::Result<Option<State>, String> {
        let path = Self::path(upper);
        let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        match std::fs::symlink_metadata(&path) {
            Ok(m) if !m.is_file() => return Err(fail(&"not a regular file")),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dir = upper.join(DIR);
                if std::fs::symlink_metadata(&dir).is_ok_and(|m| !m.is_dir()) {
                    return Err(format!(
                        "{}: a file holds the name snapshots keep their state under; move it away",
                        dir.display()
                    ));
                }
                // Only the daemon (and its owner) reach the layers on the
                // host: the daemon's umask is 0.
                std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
                    .recursive(true)
                    .create(dir.join("layers"))
                    .map_err(|e| fail(&e))?;
            }
            Err(e) => return Err(fail(&e)),
        }
        let conn = Connection::open(&path).map_err(|e| fail(&e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| fail(&e))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| fail(&e))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| fail(&e))?;
        conn.execute_batch(SCHEMA).map_err(|e| fail(&e))?;
        let mut st = State {
            conn,
            upper: upper.to_path_buf(),
        };
        st.init().map_err(|e| fail(&e))?;
        Ok(Some(st))
    }

    /// Layer 0 and branch `main` on it, once.
    fn init(&mut self) -> Result<()> {
        let tx = self.begin()?;
        tx.execute(
            "INSERT OR IGNORE INTO layer (id, parent, frozen, created) VALUES (0, NULL, 0, ?1)",
            params![now()],
        )
        .map_err(db_error)?;
        tx.execute(
            "INSERT OR IGNORE INTO branch (name, number, layer, from_snapshot, created)
             VALUES (?1, 0, 0, NULL, ?2)",
            params![MAIN, now()],
        )
        .map_err(db_error)?;
        tx.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('current', ?1)",
            params![MAIN],
        )
        .map_err(db_error)?;
        tx.commit().map_err(db_error)
    }

    pub fn upper(&self) -> &Path {
        &self.upper
    }

    fn begin(&mut self) -> Result<Transaction<'_>> {
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db_error)
    }

    pub fn layer_dir(&self, id: i64) -> PathBuf {
        self.upper.join(layer_rel(id))
    }

    /// The branch unbound processes see.
    pub fn current(&self) -> Result<String> {
        self.meta("current")
            .map(|v| v.unwrap_or_else(|| MAIN.to_string()))
    }

    pub fn set_current(&mut self, branch: &str) -> Result<()> {
        self.branch(branch)?;
        self.set_meta("current", branch)
    }

    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db_error)
    }

    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            )
            .map_err(db_error)?;
        Ok(())
    }

    /// Records the lowers the workspace is served over (the mount's own
    /// layers), for commands that read a snapshot without the mount.
    pub fn set_lowers(&mut self, lowers: &[crate::overlay::LowerSpec]) -> Result<()> {
        let json = serde_json::to_string(lowers)
            .map_err(|e| Refusal::new(Errno::EIO, format!("workspace state: {e}")))?;
        self.set_meta("lowers", &json)
    }

    /// The lowers the workspace was last served over.
    pub fn lowers(&self) -> Result<Vec<crate::overlay::LowerSpec>> {
        let json = self.meta("lowers")?.unwrap_or_else(|| "[]".into());
        serde_json::from_str(&json)
            .map_err(|e| Refusal::new(Errno::EIO, format!("workspace state: lowers: {e}")))
    }

    /// Opens the state of `upper` for reading only (commands that list or
    /// compare; the daemon owns every change).
    pub fn open_read_only(upper: &Path) -> std::result::Result<State, String> {
        let path = Self::path(upper);
        let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
        if !path.is_file() {
            return Err(fail(&"no snapshots or branches yet"));
        }
        let conn = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| fail(&e))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| fail(&e))?;
        Ok(State {
            conn,
            upper: upper.to_path_buf(),
        })
    }

    pub fn branch(&self, name: &str) -> Result<BranchInfo> {
        self.branches()?
            .into_iter()
            .find(|b| b.name == name)
            .ok_or_else(|| Refusal::new(Errno::ENOENT, format!("no branch named {name:?}")))
    }

    pub fn branches(&self) -> Result<Vec<BranchInfo>> {
        let mut q = self
            .conn
            .prepare(
                "SELECT b.name, b.number, b.layer, s.name, b.created FROM branch b
                 LEFT JOIN snapshot s ON s.id = b.from_snapshot ORDER BY b.number",
            )
            .map_err(db_error)?;
        let rows = q
            .query_map([], |r| {
                Ok(BranchInfo {
                    name: r.get(0)?,
                    number: r.get(1)?,
                    layer: r.get(2)?,
                    from: r.get(3)?,
                    created: r.get(4)?,
                })
            })
            .map_err(db_error)?;
        rows.collect::<std::result::Result<_, _>>()
            .map_err(db_error)
    }

    /// A snapshot by name or id.
    pub fn snapshot(&self, which: &str) -> Result<SnapshotInfo> {
        self.snapshots()?
            .into_iter()
            .find(|s| s.name == which || s.id.to_string() == which)
            .ok_or_else(|| Refusal::new(Errno::ENOENT, format!("no snapshot {which:?}")))
    }

    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut q = self
            .conn
            .prepare("SELECT id, name, layer, branch, created FROM snapshot ORDER BY id")
            .map_err(db_error)?;
        let rows: Vec<SnapshotInfo> = q
            .query_map([], |r| {
                Ok(SnapshotInfo {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    layer: r.get(2)?,
                    branch: r.get(3)?,
                    created: r.get(4)?,
                    parent: None,
                })
            })
            .map_err(db_error)?
            .collect::<std::result::Result<_, _>>()
            .map_err(db_error)?;
        let mut out = rows.clone();
        for s in &mut out {
            let below = self.chain_from(s.layer)?;
            s.parent = below
                .iter()
                .skip(1)
                .find_map(|l| rows.iter().find(|o| o.layer == *l))
                .map(|o| o.name.clone());
        }
        Ok(out)
    }

    /// Layer `top` and its ancestors, top first.
    fn chain_from(&self, top: i64) -> Result<Vec<i64>> {
        let mut out = vec![top];
        let mut at = top;
        while let Some(p) = self
            .conn
            .query_row("SELECT parent FROM layer WHERE id = ?1", params![at], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map_err(db_error)?
        {
            if out.contains(&p) {
                return Err(Refusal::new(Errno::EIO, "workspace state: a layer cycle"));
            }
            out.push(p);
            at = p;
        }
        Ok(out)
    }

    /// The layers branch `name` shows.
    pub fn chain(&self, name: &str) -> Result<Chain> {
        let b = self.branch(name)?;
        let mut all = self.chain_from(b.layer)?;
        let live = all.remove(0);
        Ok(Chain { live, frozen: all })
    }

    /// The layers snapshot `which` shows, newest first.
    pub fn snapshot_chain(&self, which: &str) -> Result<Vec<i64>> {
        self.chain_from(self.snapshot(which)?.layer)
    }

    /// Starts a snapshot of `branch` named `name`: the branch's live layer
    /// is to be frozen, a new live layer (its directory made now) above it.
    /// Nothing is recorded until `commit` of the returned transaction.
    pub fn begin_snapshot(
        &mut self,
        branch: &str,
        name: &str,
    ) -> Result<(Transaction<'_>, NewSnapshot)> {
        check_name("snapshot", name)?;
        let b = self.branch(branch)?;
        if self.snapshot(name).is_ok() {
            return Err(Refusal::new(
                Errno::EEXIST,
                format!("a snapshot named {name:?} exists"),
            ));
        }
        let upper = self.upper.clone();
        let tx = self.begin()?;
        let t = now();
        tx.execute(
            "INSERT INTO layer (parent, frozen, created) VALUES (?1, 0, ?2)",
            params![b.layer, t],
        )
        .map_err(db_error)?;
        let live = tx.last_insert_rowid();
        tx.execute(
            "UPDATE layer SET frozen = 1 WHERE id = ?1",
            params![b.layer],
        )
        .map_err(db_error)?;
        tx.execute(
            "INSERT INTO snapshot (name, layer, branch, created) VALUES (?1, ?2, ?3, ?4)",
            params![name, b.layer, branch, t],
        )
        .map_err(db_error)?;
        let id = tx.last_insert_rowid();
        tx.execute(
            "UPDATE branch SET layer = ?1 WHERE name = ?2",
            params![live, branch],
        )
        .map_err(db_error)?;
        make_layer_dir(&upper, live, b.layer)?;
        Ok((
            tx,
            NewSnapshot {
                id,
                frozen: b.layer,
                live,
            },
        ))
    }

    /// A new branch `name` from snapshot `from` (name or id).
    pub fn create_branch(&mut self, name: &str, from: &str) -> Result<BranchInfo> {
        check_name("branch", name)?;
        let snap = self.snapshot(from)?;
        let branches = self.branches()?;
        if branches.iter().any(|b| b.name == name) {
            return Err(Refusal::new(
                Errno::EEXIST,
                format!("a branch named {name:?} exists"),
            ));
        }
        let number = (1..=MAX_BRANCH)
            .find(|n| branches.iter().all(|b| b.number != *n))
            .ok_or_else(|| {
                Refusal::new(
                    Errno::ENOSPC,
                    format!("a workspace has at most {} branches", MAX_BRANCH as u32 + 1),
                )
            })?;
        let upper = self.upper.clone();
        let tx = self.begin()?;
        let t = now();
        tx.execute(
            "INSERT INTO layer (parent, frozen, created) VALUES (?1, 0, ?2)",
            params![snap.layer, t],
        )
        .map_err(db_error)?;
        let live = tx.last_insert_rowid();
        tx.execute(
            "INSERT INTO branch (name, number, layer, from_snapshot, created)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, number, live, snap.id, t],
        )
        .map_err(db_error)?;
        make_layer_dir(&upper, live, snap.layer)?;
        tx.commit().map_err(db_error)?;
        self.branch(name)
    }

    /// Removes branch `name` (the caller checked it is not in use) and the
    /// layers only it needed.
    pub fn remove_branch(&mut self, name: &str) -> Result<()> {
        self.branch(name)?;
        if self.current()? == name {
            return Err(Refusal::new(
                Errno::EBUSY,
                format!("branch {name:?} is the current branch: switch to another first"),
            ));
        }
        let tx = self.begin()?;
        tx.execute("DELETE FROM branch WHERE name = ?1", params![name])
            .map_err(db_error)?;
        let gone = drop_unused_layers(&tx)?;
        tx.commit().map_err(db_error)?;
        remove_layer_dirs(&self.upper, &gone);
        Ok(())
    }

    /// Removes snapshot `which`, unless a branch was made from it; its
    /// layer stays while a chain uses it.
    pub fn remove_snapshot(&mut self, which: &str) -> Result<()> {
        let s = self.snapshot(which)?;
        if let Some(b) = self
            .branches()?
            .iter()
            .find(|b| b.from.as_deref() == Some(s.name.as_str()))
        {
            return Err(Refusal::new(
                Errno::EBUSY,
                format!(
                    "snapshot {:?}: branch {:?} was made from it",
                    s.name, b.name
                ),
            ));
        }
        let tx = self.begin()?;
        tx.execute("DELETE FROM snapshot WHERE id = ?1", params![s.id])
            .map_err(db_error)?;
        let gone = drop_unused_layers(&tx)?;
        tx.commit().map_err(db_error)?;
        remove_layer_dirs(&self.upper, &gone);
        Ok(())
    }

    /// Removes layer directories no row names: left by a change that never
    /// committed, or by a removal interrupted before its directories went.
    pub fn remove_orphans(&mut self) -> Result<()> {
        // Holding the write lock: no change is half-way meanwhile.
        let upper = self.upper.clone();
        let dir = upper.join(DIR).join("layers");
        let tx = self.begin()?;
        let known: Vec<i64> = {
            let mut q = tx.prepare("SELECT id FROM layer").map_err(db_error)?;
            q.query_map([], |r| r.get(0))
                .map_err(db_error)?
                .collect::<std::result::Result<_, _>>()
                .map_err(db_error)?
        };
        let mut orphans = Vec::new();
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name();
                match name.to_str().and_then(|n| n.parse::<i64>().ok()) {
                    Some(id) if id > 0 && !known.contains(&id) => orphans.push(id),
                    _ => {}
                }
            }
        }
        remove_layer_dirs(&upper, &orphans);
        drop(tx);
        Ok(())
    }
}

fn remove_layer_dirs(upper: &Path, ids: &[i64]) {
    for id in ids.iter().filter(|id| **id > 0) {
        let dir = upper.join(layer_rel(*id));
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %dir.display(), "workspace: layer not removed: {e}");
        }
    }
}

/// Makes layer `id`'s directory, the root the branch shows from now on: it
/// takes the owner, mode and times of the root of layer `like`, the one the
/// branch showed so far.
fn make_layer_dir(upper: &Path, id: i64, like: i64) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = upper.join(layer_rel(id));
    let model = upper.join(layer_rel(like));
    let fail = |p: &Path, e: &dyn std::fmt::Display| {
        Refusal::new(Errno::EIO, format!("{}: {e}", p.display()))
    };
    let md = std::fs::metadata(&model).map_err(|e| fail(&model, &e))?;
    // Left by a change that never committed: start empty.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| fail(&dir, &e))?;
    match rustix::fs::chown(
        &dir,
        Some(rustix::fs::Uid::from_raw(md.uid())),
        Some(rustix::fs::Gid::from_raw(md.gid())),
    ) {
        // Not root: the directory is the daemon's, as the upper is.
        Ok(()) | Err(rustix::io::Errno::PERM) => {}
        Err(e) => return Err(fail(&dir, &e)),
    }
    rustix::fs::chmod(&dir, rustix::fs::Mode::from_raw_mode(md.mode() & 0o7777))
        .map_err(|e| fail(&dir, &e))?;
    let ts = |s: i64, ns: i64| rustix::fs::Timespec {
        tv_sec: s,
        tv_nsec: ns as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        &dir,
        &rustix::fs::Timestamps {
            last_access: ts(md.atime(), md.atime_nsec()),
            last_modification: ts(md.mtime(), md.mtime_nsec()),
        },
        rustix::fs::AtFlags::empty(),
    )
    .map_err(|e| fail(&dir, &e))
}

/// Deletes the rows of layers nothing needs any more (no snapshot, branch
/// or layer above names them); their ids, for their directories to go once
/// the change is committed.
fn drop_unused_layers(tx: &Transaction<'_>) -> Result<Vec<i64>> {
    let mut gone = Vec::new();
    loop {
        let unused: Vec<i64> = {
            let mut q = tx
                .prepare(
                    "SELECT id FROM layer l WHERE id <> 0
                     AND NOT EXISTS (SELECT 1 FROM snapshot s WHERE s.layer = l.id)
                     AND NOT EXISTS (SELECT 1 FROM branch b WHERE b.layer = l.id)
                     AND NOT EXISTS (SELECT 1 FROM layer c WHERE c.parent = l.id)",
                )
                .map_err(db_error)?;
            q.query_map([], |r| r.get(0))
                .map_err(db_error)?
                .collect::<std::result::Result<_, _>>()
                .map_err(db_error)?
        };
        if unused.is_empty() {
            return Ok(gone);
        }
        for id in &unused {
            tx.execute("DELETE FROM layer WHERE id = ?1", params![id])
                .map_err(db_error)?;
        }
        gone.extend(unused);
    }
}
