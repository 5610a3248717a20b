//! The control file `/.strata`, in every mode: runtime keys as
//! `user.strata.*` xattrs (`user.mergerfs.*` accepted too, so mergerfs
//! scripts keep working). Every mount answers `version`, `pid` and
//! `layers`; a rule adds its own keys (the union's policies and branches).

use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::time::SystemTime;

use rustix::fs::{Mode, OFlags};

use crate::fs::{Attr, AttrOut, CONTROL_ID, Ctx, Entry, FileKind};
use crate::host::watch::WATCHED_TTL;
use crate::stack::Rule;
use crate::{Errno, Result};

/// Name of the control file in the root.
pub const NAME: &str = ".strata";

const PREFIXES: [&str; 2] = ["user.strata.", "user.mergerfs."];
/// Keys every mount answers, never set.
const READ_ONLY: [&str; 4] = ["version", "pid", "layers", "error"];

/// The last refusals of control changes, by caller: `error` reads the
/// caller's own, so a command can say why its change was refused.
#[derive(Default)]
pub struct Refusals(parking_lot::Mutex<std::collections::VecDeque<(u32, String)>>);

impl Refusals {
    const KEPT: usize = 64;

    fn record(&self, pid: u32, why: String) {
        let mut q = self.0.lock();
        q.retain(|(p, _)| *p != pid);
        if q.len() == Self::KEPT {
            q.pop_front();
        }
        q.push_back((pid, why));
    }

    fn last(&self, pid: u32) -> String {
        let q = self.0.lock();
        q.iter()
            .rev()
            .find(|(p, _)| *p == pid)
            .map(|(_, w)| w.clone())
            .unwrap_or_default()
    }
}

fn attr() -> Attr {
    Attr {
        ino: CONTROL_ID,
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        kind: FileKind::Regular,
        perm: 0o444,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
    }
}

/// The control file never changes: the kernel may keep it as long as it likes.
pub(crate) fn entry() -> Entry {
    Entry {
        attr: attr(),
        generation: 0,
        entry_ttl: WATCHED_TTL,
        attr_ttl: WATCHED_TTL,
    }
}

pub(crate) fn attr_out() -> AttrOut {
    AttrOut {
        attr: attr(),
        ttl: WATCHED_TTL,
    }
}

/// The control file has no content; opening it reads as empty.
pub(crate) fn open() -> Result<OwnedFd> {
    Ok(rustix::fs::open(
        "/dev/null",
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The key an xattr name asks for, without its prefix.
pub fn key(name: &OsStr) -> Option<&str> {
    let name = std::str::from_utf8(name.as_bytes()).ok()?;
    PREFIXES.iter().find_map(|p| name.strip_prefix(p))
}

/// Every key the control file lists, as a listxattr buffer.
pub(crate) fn list(rule: &impl Rule) -> Vec<u8> {
    let mut keys = rule.control_keys();
    keys.extend(READ_ONLY.iter().map(|k| k.to_string()));
    let mut out = Vec::new();
    for k in keys {
        out.extend_from_slice(PREFIXES[0].as_bytes());
        out.extend_from_slice(k.as_bytes());
        out.push(0);
    }
    out
}

/// Why a control change was refused: the errno the setxattr answers, and a
/// line for the log (and for the CLI, which checks first where it can).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub errno: Errno,
    pub why: String,
}

impl Refusal {
    pub fn new(errno: Errno, why: impl Into<String>) -> Refusal {
        Refusal {
            errno,
            why: why.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// Whether the caller may change the mount: root or the mount's owner.
pub fn privileged(ctx: &Ctx) -> bool {
    ctx.uid == 0 || ctx.uid == rustix::process::geteuid().as_raw()
}

pub(crate) fn get(
    rule: &impl Rule,
    refusals: &Refusals,
    ctx: &Ctx,
    name: &OsStr,
) -> Result<Vec<u8>> {
    let k = key(name).ok_or(Errno::ENODATA)?;
    let v = match k {
        "version" => env!("CARGO_PKG_VERSION").to_string(),
        "pid" => std::process::id().to_string(),
        "layers" => rule.describe(),
        "error" => refusals.last(ctx.pid),
        k => rule.control_get(ctx, k).ok_or(Errno::ENODATA)?,
    };
    Ok(v.into_bytes())
}

pub(crate) fn set(
    rule: &impl Rule,
    refusals: &Refusals,
    ctx: &Ctx,
    name: &OsStr,
    value: &[u8],
) -> Result<()> {
    let k = key(name).ok_or(Errno::ENOTSUP)?;
    let refuse = |r: Refusal| {
        tracing::warn!(pid = ctx.pid, uid = ctx.uid, "control: {k}: {}", r.why);
        refusals.record(ctx.pid, r.why);
        r.errno
    };
    if !privileged(ctx) && !rule.control_open(k) {
        return Err(refuse(Refusal::new(
            Errno::EPERM,
            format!("{k}: only root or the mount's owner may change it"),
        )));
    }
    let value = std::str::from_utf8(value).map_err(|_| {
        refuse(Refusal::new(
            Errno::EINVAL,
            format!("{k}: value is not UTF-8"),
        ))
    })?;
    if READ_ONLY.contains(&k) {
        return Err(refuse(Refusal::new(
            Errno::EINVAL,
            format!("{k} is read-only"),
        )));
    }
    match rule.control_set(ctx, k, value) {
        None => Err(Errno::ENODATA),
        Some(Err(r)) => Err(refuse(Refusal::new(
            r.errno,
            format!("{k}={value}: {}", r.why),
        ))),
        Some(Ok(())) => Ok(()),
    }
}
