//! Directory listings as every layer serves them: a snapshot read at offset 0
//! (so rewinddir sees new names), offsets that index into it, and readdirplus
//! entries that take lookup references only for what reaches the kernel.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

use crate::fs::{Attr, DirPlusSink, DirSink, Entry, FileKind, Opened};
use crate::{Errno, Result};

/// A layer's open directory handles: handle number → the layer's state for
/// that open directory (typically holding a snapshot).
pub struct OpenDirs<T> {
    dirs: Mutex<HashMap<u64, Arc<T>>>,
    next: AtomicU64,
}

impl<T> Default for OpenDirs<T> {
    fn default() -> Self {
        OpenDirs {
            dirs: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }
}

impl<T> OpenDirs<T> {
    /// Registers an open directory. `cache`: the kernel may keep its listing
    /// (FOPEN_CACHE_DIR + FOPEN_KEEP_CACHE) until told it changed.
    pub fn insert(&self, dir: T, cache: bool) -> Opened {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.dirs.lock().insert(fh, Arc::new(dir));
        Opened {
            fh,
            cache_dir: cache,
            keep_cache: cache,
            ..Opened::default()
        }
    }

    pub fn get(&self, fh: u64) -> Result<Arc<T>> {
        self.dirs.lock().get(&fh).cloned().ok_or(Errno::EBADF)
    }

    pub fn remove(&self, fh: u64) {
        self.dirs.lock().remove(&fh);
    }

    pub fn len(&self) -> usize {
        self.dirs.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One name of a listing snapshot.
pub struct DirEnt {
    pub name: CString,
    pub ino: u64,
    pub kind: FileKind,
}

/// The snapshot an open directory serves from `offset`: a fresh one at
/// offset 0 (rewinddir sees new names) and whenever the handle has none yet,
/// since the kernel may finish on the daemon a listing it began from its own
/// cache (dropped midway), on a handle that never asked for offset 0. A
/// loaded snapshot is never empty: it holds `.` and `..`.
pub fn snapshot(
    cached: &Mutex<Arc<Vec<DirEnt>>>,
    offset: u64,
    load: impl FnOnce() -> Result<Arc<Vec<DirEnt>>>,
) -> Result<Arc<Vec<DirEnt>>> {
    if offset != 0 {
        let have = cached.lock().clone();
        if !have.is_empty() {
            return Ok(have);
        }
    }
    load()
}

/// Sends `entries` from `offset` until the reply is full.
pub fn fill(entries: &[DirEnt], offset: u64, sink: &mut dyn DirSink) {
    for (i, e) in entries.iter().enumerate().skip(offset as usize) {
        let name = OsStr::from_bytes(e.name.to_bytes());
        if !sink.add(e.ino, i as u64 + 1, e.kind, name) {
            break;
        }
    }
}

/// Sends `entries` from `offset` with their attributes. `.` and `..` carry
/// the directory's own attributes (`dir_attr`, read at most once) and take no
/// reference; other names go through `lookup`, which takes one, given back
/// with `forget` when the reply is full. Names gone since the snapshot are
/// skipped.
pub fn fill_plus(
    entries: &[DirEnt],
    offset: u64,
    sink: &mut dyn DirPlusSink,
    dir_attr: impl FnOnce() -> Result<Attr>,
    mut lookup: impl FnMut(&DirEnt) -> Result<Entry>,
    mut forget: impl FnMut(u64),
) -> Result<()> {
    let mut dir_attr = Some(dir_attr);
    let mut cached: Option<Attr> = None;
    for (i, e) in entries.iter().enumerate().skip(offset as usize) {
        let name = OsStr::from_bytes(e.name.to_bytes());
        let next = i as u64 + 1;
        if name == "." || name == ".." {
            let base = match (cached, dir_attr.take()) {
                (Some(a), _) => a,
                (None, Some(read)) => *cached.insert(read()?),
                (None, None) => unreachable!("the attributes are cached once read"),
            };
            let entry = Entry {
                attr: Attr {
                    ino: e.ino,
                    kind: FileKind::Directory,
                    ..base
                },
                generation: 0,
                entry_ttl: Duration::ZERO,
                attr_ttl: Duration::ZERO,
            };
            if !sink.add(next, name, &entry) {
                break;
            }
            continue;
        }
        let entry = match lookup(e) {
            Ok(entry) => entry,
            Err(Errno::ENOENT) => continue,
            Err(err) => return Err(err),
        };
        if !sink.add(next, name, &entry) {
            forget(entry.attr.ino);
            break;
        }
    }
    Ok(())
}
