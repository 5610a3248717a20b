//! Watching host filesystems for changes made behind the mount's back.
//!
//! The kernel caches names, attributes and directory listings of a FUSE mount
//! for as long as the daemon allows. A host directory can change under the
//! mount at any time, so without a watch those timeouts must stay short (a
//! second), and every `ls -l` pays a round trip per file to revalidate. With a
//! watch, strata hands out long timeouts and tells the kernel to drop exactly
//! what changed, as soon as it changed.
//!
//! One fanotify group marks each host filesystem the mount spans
//! (`FAN_MARK_FILESYSTEM`, which needs CAP_SYS_ADMIN) and reports events with
//! file handles: the directory and name of a directory-entry change, and the
//! object whose attributes or data changed.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rustix::fs::{Mode, OFlags};

use super::sys::{self, FileHandle};
use crate::fs::Invalidator;
use crate::{Errno, Result};

/// Cache timeout on a host filesystem whose changes are not watched: outside
/// changes show within this long.
pub const UNWATCHED_TTL: Duration = Duration::from_secs(1);
/// Cache timeout on a watched host filesystem: changes are pushed to the
/// kernel as they happen; the timeout only bounds the damage of a lost event.
pub const WATCHED_TTL: Duration = Duration::from_secs(3600);

/// The kernel cache timeouts of a mount, one policy for every mode: what the
/// user set (`cache.entry`, `cache.attr`, `cache.negative-entry`), else
/// chosen by whether what a reply covers is watched (or never changes
/// behind the mount): an hour then, a second otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachePolicy {
    pub entry: Option<Duration>,
    pub attr: Option<Duration>,
    pub negative: Option<Duration>,
}

impl CachePolicy {
    fn auto(watched: bool) -> Duration {
        if watched { WATCHED_TTL } else { UNWATCHED_TTL }
    }

    pub fn entry(&self, watched: bool) -> Duration {
        self.entry.unwrap_or(Self::auto(watched))
    }

    pub fn attr(&self, watched: bool) -> Duration {
        self.attr.unwrap_or(Self::auto(watched))
    }

    /// How long a missing name is remembered; `unwatched` is the default
    /// when it is not watched (a union, as mergerfs, caches none).
    pub fn negative(&self, watched: bool, unwatched: Duration) -> Duration {
        self.negative
            .unwrap_or(if watched { WATCHED_TTL } else { unwatched })
    }
}

/// Directory-entry events: the named child of a directory appeared or went.
pub const DIRENT: u64 =
    libc::FAN_CREATE | libc::FAN_DELETE | libc::FAN_MOVED_FROM | libc::FAN_MOVED_TO;
/// The object's attributes (mode, owner, times, link count) changed. A file
/// open for writing was closed: stores through a shared mapping of it
/// changed its times without a MODIFY event, and a mapping that outlived its
/// descriptor is only gone at this close (of the kernel's passthrough
/// file, by the process that unmapped it).
pub const ATTRIB: u64 =
    libc::FAN_ATTRIB | libc::FAN_DELETE_SELF | libc::FAN_MOVE_SELF | libc::FAN_CLOSE_WRITE;
/// The object's data changed.
pub const MODIFY: u64 = libc::FAN_MODIFY;

const MASK: u64 = DIRENT | ATTRIB | MODIFY | libc::FAN_ONDIR;
/// `sizeof(struct fanotify_event_metadata)`.
const METADATA_LEN: usize = 24;

/// A host object as fanotify names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fid {
    pub fsid: [i32; 2],
    pub handle: FileHandle,
}

/// One decoded event.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// The kernel dropped events: anything may have changed.
    Overflow,
    Event {
        mask: u64,
        /// The process that made the change.
        pid: i32,
        /// The directory an entry changed in, and the entry's name.
        dir: Option<(Fid, CString)>,
        /// The object itself.
        object: Option<Fid>,
    },
}

/// A resolved object: where it lives on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostId {
    pub dev: u64,
    pub ino: u64,
}

pub struct HostWatch {
    group: OwnedFd,
    /// Every filesystem asked about, by device: whether it is watched.
    devs: RwLock<HashMap<u64, bool>>,
    /// A directory fd on each watched filesystem, by fsid, to open handles with.
    mount_fds: RwLock<HashMap<[i32; 2], Arc<OwnedFd>>>,
}

impl HostWatch {
    /// A new watch, or why the host cannot be watched (EPERM without
    /// CAP_SYS_ADMIN, ENOSYS without fanotify).
    pub fn new() -> Result<HostWatch> {
        let group = sys::fanotify_init(
            libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC | libc::FAN_REPORT_DFID_NAME_TARGET,
            (libc::O_RDONLY | libc::O_CLOEXEC) as u32,
        )?;
        Ok(HostWatch {
            group,
            devs: RwLock::new(HashMap::new()),
            mount_fds: RwLock::new(HashMap::new()),
        })
    }

    /// Whether changes on device `dev` are reported. Unknown devices are not.
    pub fn is_watched(&self, dev: u64) -> bool {
        self.devs.read().get(&dev).copied().unwrap_or(false)
    }

    /// Whether `dev` has been tried already (watched or not).
    pub fn knows(&self, dev: u64) -> bool {
        self.devs.read().contains_key(&dev)
    }

    /// Remembers `dev` as not watched (its changes cannot be mapped back).
    pub fn skip(&self, dev: u64) {
        self.devs.write().entry(dev).or_insert(false);
    }

    /// Starts watching the filesystem holding the directory `dir` (an O_PATH
    /// fd on device `dev`). Returns whether that filesystem is now watched; a
    /// filesystem that cannot be watched (no file handles, no fsid) is
    /// remembered as unwatched and gets short cache timeouts.
    pub fn watch(&self, dev: u64, dir: BorrowedFd<'_>) -> bool {
        if let Some(&known) = self.devs.read().get(&dev) {
            return known;
        }
        let res = self.mark(dir);
        if let Err(e) = &res {
            tracing::info!(dev, "host changes on this filesystem are not watched: {e}");
        }
        let ok = res.is_ok();
        self.devs.write().insert(dev, ok);
        ok
    }

    fn mark(&self, dir: BorrowedFd<'_>) -> Result<()> {
        let path = CString::new(format!("/proc/self/fd/{}", dir.as_raw_fd())).expect("no NUL");
        let fsid = fsid_of(dir)?;
        let mount_fd = rustix::fs::open(
            path.as_c_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        sys::fanotify_mark(
            self.group.as_fd(),
            libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
            MASK,
            &path,
        )?;
        self.mount_fds
            .write()
            .entry(fsid)
            .or_insert_with(|| Arc::new(mount_fd));
        Ok(())
    }

    /// Blocks until events arrive and decodes them into `out`.
    pub fn read(&self, buf: &mut [u8], out: &mut Vec<Change>) -> Result<()> {
        let n = loop {
            match rustix::io::read(&self.group, &mut *buf) {
                Ok(n) => break n,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        decode(&buf[..n], out);
        Ok(())
    }

    /// Where the object named by `fid` lives, if it still exists.
    pub fn resolve(&self, fid: &Fid) -> Option<HostId> {
        let mount_fd = self.mount_fds.read().get(&fid.fsid).cloned()?;
        let fd = sys::open_by_handle_at(mount_fd.as_fd(), &fid.handle, libc::O_PATH).ok()?;
        let st = rustix::fs::fstat(&fd).ok()?;
        Some(HostId {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }
}

/// Turns host change events into kernel cache invalidations, for as long as
/// the process lives. `node_of` maps a host object to the node id the kernel
/// knows it by (if it knows it); `all_nodes` lists every node, for when events
/// were lost. Changes made by this daemon are skipped: the kernel learnt of
/// them from the replies.
pub fn forward_changes(
    watch: &HostWatch,
    node_of: impl Fn(HostId) -> Option<u64>,
    all_nodes: impl Fn() -> Vec<u64>,
    inval: &dyn Invalidator,
) {
    let own_pid = std::process::id() as i32;
    let mut buf = vec![0u8; 64 * 1024];
    let mut changes = Vec::new();
    let mut resolved: HashMap<Fid, Option<u64>> = HashMap::new();
    loop {
        changes.clear();
        if let Err(e) = watch.read(&mut buf, &mut changes) {
            tracing::error!(
                "host watch stopped ({e}); outside changes now show only after cache timeouts"
            );
            return;
        }
        // Each object resolved once per batch: a file written and closed
        // comes as a MODIFY and a CLOSE_WRITE.
        resolved.clear();
        let mut known = |fid: &Fid| {
            if let Some(&id) = resolved.get(fid) {
                return id;
            }
            let id = watch.resolve(fid).and_then(&node_of);
            resolved.insert(fid.clone(), id);
            id
        };
        // One invalidation per name and per node for the whole batch.
        let mut entries: HashSet<(u64, CString)> = HashSet::new();
        let mut inodes: HashMap<u64, bool> = HashMap::new();
        for change in changes.drain(..) {
            let Change::Event {
                mask,
                pid,
                dir,
                object,
            } = change
            else {
                tracing::warn!("host change events were lost; invalidating every cached node");
                for id in all_nodes() {
                    inodes.insert(id, true);
                }
                continue;
            };
            if pid == own_pid {
                continue;
            }
            if mask & DIRENT != 0
                && let Some((dfid, name)) = dir
                && let Some(parent) = known(&dfid)
            {
                entries.insert((parent, name));
                // Its mtime, link count and cached listing changed too.
                inodes.insert(parent, true);
            }
            if let Some(id) = object.as_ref().and_then(&mut known) {
                *inodes.entry(id).or_default() |= mask & MODIFY != 0;
            }
        }
        for (parent, name) in &entries {
            inval.entry(*parent, OsStr::from_bytes(name.to_bytes()));
        }
        for (id, data) in inodes {
            inval.inode(id, data);
        }
        // Let events gather: during a burst (the mount's own creates and
        // writes also queue events, only to be skipped here) one wake-up per
        // pause instead of one per event, which took 10-40% off small-file
        // creates on 2 cores. Outside changes reach the kernel that much later.
        std::thread::sleep(GATHER);
    }
}

/// Runs [`forward_changes`] on a thread of its own; `what` names the
/// watched thing in the error if the thread cannot start.
pub fn spawn_forwarder(
    watch: Arc<HostWatch>,
    node_of: impl Fn(HostId) -> Option<u64> + Send + 'static,
    all_nodes: impl Fn() -> Vec<u64> + Send + 'static,
    inval: Arc<dyn Invalidator>,
    what: &str,
) {
    let spawned = std::thread::Builder::new()
        .name("strata-watch".into())
        .spawn(move || forward_changes(&watch, node_of, all_nodes, &*inval));
    if let Err(e) = spawned {
        tracing::error!("cannot start the {what} watch thread: {e}");
    }
}

/// Host object → the node showing it, for turning watch events into nodes.
/// Entries of forgotten nodes are pruned once the map has doubled since the
/// last prune, so pruning costs amortized O(1) per insert however many host
/// objects a node shows (a directory on every branch of a union).
#[derive(Default)]
pub struct HostAliases {
    map: HashMap<HostId, u64>,
    /// Entries left by the last prune.
    kept: usize,
}

impl HostAliases {
    /// Below this many entries the map is never pruned.
    const SLACK: usize = 4096;

    /// Records that node `id` shows `obj`; may first drop the entries for
    /// which `shows(id, obj)` no longer holds.
    pub fn insert(&mut self, obj: HostId, id: u64, shows: impl Fn(u64, HostId) -> bool) {
        if self.map.len() >= 2 * self.kept + Self::SLACK {
            self.map.retain(|obj, id| shows(*id, *obj));
            self.kept = self.map.len();
        }
        self.map.insert(obj, id);
    }

    pub fn get(&self, obj: HostId) -> Option<u64> {
        self.map.get(&obj).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// How long the watch lets events gather after each batch.
const GATHER: Duration = Duration::from_millis(2);

fn fsid_of(fd: BorrowedFd<'_>) -> Result<[i32; 2]> {
    // statvfs packs statfs's two fsid ints low word first, as fanotify reports them.
    let packed = rustix::fs::fstatvfs(fd)?.f_fsid;
    if packed == 0 {
        // Without an fsid, events cannot be told apart from other filesystems'.
        return Err(Errno::ENOTSUP);
    }
    Ok([packed as u32 as i32, (packed >> 32) as u32 as i32])
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Decodes a buffer of fanotify events (`struct fanotify_event_metadata`
/// followed by info records). Malformed tails are dropped, never trusted.
pub fn decode(mut buf: &[u8], out: &mut Vec<Change>) {
    while buf.len() >= METADATA_LEN {
        let Some(event_len) = u32_at(buf, 0).map(|n| n as usize) else {
            return;
        };
        let metadata_len = u16_at(buf, 6).unwrap_or(0) as usize;
        if event_len < METADATA_LEN || event_len > buf.len() || metadata_len > event_len {
            return;
        }
        let event = &buf[..event_len];
        buf = &buf[event_len..];
        let mask = u64_at(event, 8).unwrap_or(0);
        let pid = i32_at(event, 20).unwrap_or(0);
        if mask & libc::FAN_Q_OVERFLOW != 0 {
            out.push(Change::Overflow);
            continue;
        }
        let mut dir = None;
        let mut object = None;
        let mut info = &event[metadata_len..];
        while info.len() >= 4 {
            let kind = info[0];
            let len = u16_at(info, 2).unwrap_or(0) as usize;
            if len < 4 || len > info.len() {
                break;
            }
            let record = &info[4..len];
            info = &info[len..];
            match kind {
                libc::FAN_EVENT_INFO_TYPE_FID => object = parse_fid(record).map(|(f, _)| f),
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME => {
                    dir = parse_fid(record).and_then(|(f, rest)| {
                        let name = CStr::from_bytes_until_nul(rest).ok()?;
                        Some((f, name.to_owned()))
                    })
                }
                _ => {}
            }
        }
        out.push(Change::Event {
            mask,
            pid,
            dir,
            object,
        });
    }
}

/// `__kernel_fsid_t` then `struct file_handle`; returns the rest (the name).
fn parse_fid(b: &[u8]) -> Option<(Fid, &[u8])> {
    let fsid = [i32_at(b, 0)?, i32_at(b, 4)?];
    let bytes = u32_at(b, 8)? as usize;
    let handle_type = i32_at(b, 12)?;
    let data = b.get(16..16 + bytes)?;
    Some((
        Fid {
            fsid,
            handle: FileHandle::new(handle_type, data),
        },
        &b[16 + bytes..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_aliases_prune_forgotten_nodes_in_amortized_linear_time() {
        use std::cell::Cell;
        // Every node shows three host objects (a directory on three
        // branches); nodes below `live_from` have been forgotten.
        let checks = Cell::new(0usize);
        let live_from = Cell::new(0u64);
        let shows = |id: u64, _: HostId| {
            checks.set(checks.get() + 1);
            id >= live_from.get()
        };
        let mut aliases = HostAliases::default();
        const NODES: u64 = 100_000;
        for id in 0..NODES {
            for branch in 0..3 {
                aliases.insert(
                    HostId {
                        dev: branch,
                        ino: id,
                    },
                    id,
                    shows,
                );
            }
        }
        // All alive: nothing dropped, and the checks stay linear in the inserts.
        assert_eq!(aliases.len(), 3 * NODES as usize);
        assert!(
            checks.get() <= 2 * 3 * NODES as usize,
            "{} checks",
            checks.get()
        );
        // The kernel forgets most nodes: the next prune drops their entries.
        live_from.set(NODES - 1000);
        let before = aliases.len();
        let mut id = NODES;
        while aliases.len() >= before {
            aliases.insert(HostId { dev: 9, ino: id }, id, shows);
            id += 1;
        }
        assert!(aliases.len() < 3000 + (id - NODES) as usize + 1);
        assert_eq!(
            aliases.get(HostId {
                dev: 0,
                ino: NODES - 1
            }),
            Some(NODES - 1)
        );
        assert_eq!(aliases.get(HostId { dev: 0, ino: 0 }), None);
    }

    fn record(kind: u8, fsid: [i32; 2], handle: &[u8], name: Option<&str>) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend(fsid[0].to_ne_bytes());
        body.extend(fsid[1].to_ne_bytes());
        body.extend((handle.len() as u32).to_ne_bytes());
        body.extend(1i32.to_ne_bytes());
        body.extend(handle);
        if let Some(n) = name {
            body.extend(n.as_bytes());
            body.push(0);
        }
        while (body.len() + 4) % 4 != 0 {
            body.push(0);
        }
        let mut r = vec![kind, 0];
        r.extend(((body.len() + 4) as u16).to_ne_bytes());
        r.extend(body);
        r
    }

    fn event(mask: u64, pid: i32, records: &[Vec<u8>]) -> Vec<u8> {
        let len = METADATA_LEN + records.iter().map(Vec::len).sum::<usize>();
        let mut e = Vec::new();
        e.extend((len as u32).to_ne_bytes());
        e.push(3); // version
        e.push(0);
        e.extend((METADATA_LEN as u16).to_ne_bytes());
        e.extend(mask.to_ne_bytes());
        e.extend((-1i32).to_ne_bytes()); // fd: FAN_NOFD with FID reporting
        e.extend(pid.to_ne_bytes());
        for r in records {
            e.extend(r);
        }
        e
    }

    #[test]
    fn decodes_directory_and_object_records() {
        let mut buf = event(
            libc::FAN_CREATE,
            42,
            &[
                record(
                    libc::FAN_EVENT_INFO_TYPE_DFID_NAME,
                    [7, 8],
                    b"dirhandl",
                    Some("new.txt"),
                ),
                record(libc::FAN_EVENT_INFO_TYPE_FID, [7, 8], b"objhandl", None),
            ],
        );
        buf.extend(event(libc::FAN_Q_OVERFLOW, 0, &[]));
        let mut out = Vec::new();
        decode(&buf, &mut out);
        assert_eq!(out.len(), 2);
        let Change::Event {
            mask,
            pid,
            dir,
            object,
        } = &out[0]
        else {
            panic!("expected an event, got {:?}", out[0]);
        };
        assert_eq!((*mask, *pid), (libc::FAN_CREATE, 42));
        let (dfid, name) = dir.as_ref().unwrap();
        assert_eq!(dfid.fsid, [7, 8]);
        assert_eq!(dfid.handle, FileHandle::new(1, b"dirhandl"));
        assert_eq!(name.as_bytes(), b"new.txt");
        assert_eq!(
            object.as_ref().unwrap().handle,
            FileHandle::new(1, b"objhandl")
        );
        assert_eq!(out[1], Change::Overflow);
    }

    #[test]
    fn truncated_or_lying_lengths_are_dropped() {
        let good = event(
            libc::FAN_ATTRIB,
            1,
            &[record(libc::FAN_EVENT_INFO_TYPE_FID, [1, 2], b"h", None)],
        );
        let mut out = Vec::new();
        decode(&good[..good.len() - 3], &mut out);
        assert!(out.is_empty(), "a cut event is not decoded");

        let mut lying = good.clone();
        // A record claiming to be longer than the event.
        lying[METADATA_LEN + 2..METADATA_LEN + 4].copy_from_slice(&500u16.to_ne_bytes());
        decode(&lying, &mut out);
        assert_eq!(out.len(), 1);
        assert!(matches!(
            &out[0],
            Change::Event {
                object: None,
                dir: None,
                ..
            }
        ));
    }
}
