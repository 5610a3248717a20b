//! Per-process binding: which branch a request's caller sees.
//!
//! A bound process is known by its pid and start time (a reused pid is
//! another process). A request names a thread; its process, and the
//! processes above it, are read from `/proc` until a bound one is found.
//! A process started after its bound ancestor's binding inherits it; one
//! that already ran when its parent was bound keeps what it saw. Answers
//! are cached per thread for a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::state::Refusal;
use crate::Errno;

const CACHE_TTL: Duration = Duration::from_secs(1);
/// How far up the process tree a caller's binding is looked for.
const MAX_DEPTH: usize = 64;

#[derive(Clone, Copy, Debug)]
struct Bound {
    /// The process's start time (clock ticks since boot).
    start: u64,
    branch: u8,
    /// When it was bound, in the same clock.
    at: u64,
}

#[derive(Default)]
pub struct Bindings {
    any: AtomicBool,
    bound: Mutex<HashMap<u32, Bound>>,
    cache: Mutex<HashMap<u32, (Option<u8>, Instant)>>,
    /// When bindings of exited processes were last dropped: once the last
    /// one is gone, the mount caches its root again.
    pruned: Mutex<Option<Instant>>,
}

/// A process's parent and start time, from `/proc/PID/stat`.
pub fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold anything, ')' included: fields follow the last one.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // state(0) ppid(1) ... starttime is field 22 of the whole line, 19 here.
    Some((f.get(1)?.parse().ok()?, f.get(19)?.parse().ok()?))
}

/// The process a thread belongs to.
fn tgid_of(tid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Now, in the clock of `/proc/PID/stat`'s start times (USER_HZ ticks
/// since boot; `/proc/uptime` counts the same time, in centiseconds).
fn now_ticks() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            let secs = s.split_whitespace().next()?;
            let (whole, frac) = secs.split_once('.').unwrap_or((secs, "0"));
            let frac: u64 = format!("{frac:0<2}")[..2].parse().ok()?;
            Some(whole.parse::<u64>().ok()? * 100 + frac)
        })
        .unwrap_or(0)
}

/// Whether process `pid` is `ancestor` or runs below it.
pub fn is_within(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..MAX_DEPTH {
        if p == ancestor {
            return true;
        }
        match proc_stat(p) {
            Some((pp, _)) if pp > 0 && pp != p => p = pp,
            _ => return false,
        }
    }
    false
}

impl Bindings {
    /// Whether any process is bound: the root's names then differ by caller,
    /// so the kernel must ask for each.
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Binds process `pid` (a thread id names its process) to `branch`.
    pub fn bind(&self, pid: u32, branch: u8) -> Result<(), Refusal> {
        let pid = tgid_of(pid).unwrap_or(pid);
        let (_, start) = proc_stat(pid)
            .ok_or_else(|| Refusal::new(Errno::ESRCH, format!("no process {pid}")))?;
        let mut bound = self.bound.lock();
        bound.insert(
            pid,
            Bound {
                start,
                branch,
                at: now_ticks(),
            },
        );
        self.any.store(true, Ordering::Release);
        drop(bound);
        self.cache.lock().clear();
        Ok(())
    }

    /// Unbinds process `pid`; whether it was bound.
    pub fn unbind(&self, pid: u32) -> bool {
        let pid = tgid_of(pid).unwrap_or(pid);
        let mut bound = self.bound.lock();
        let was = bound.remove(&pid).is_some();
        if bound.is_empty() {
            self.any.store(false, Ordering::Release);
        }
        drop(bound);
        self.cache.lock().clear();
        was
    }

    /// The live processes bound to `branch`.
    pub fn users(&self, branch: u8) -> Vec<u32> {
        self.all()
            .into_iter()
            .filter(|(_, b)| *b == branch)
            .map(|(p, _)| p)
            .collect()
    }

    /// Every binding of a live process: (pid, branch number). Bindings of
    /// processes that exited go.
    pub fn all(&self) -> Vec<(u32, u8)> {
        let mut bound = self.bound.lock();
        bound.retain(|pid, b| proc_stat(*pid).is_some_and(|(_, start)| start == b.start));
        if bound.is_empty() {
            self.any.store(false, Ordering::Release);
        }
        let mut v: Vec<(u32, u8)> = bound.iter().map(|(p, b)| (*p, b.branch)).collect();
        v.sort_unstable();
        v
    }

    /// The branch the thread `tid` sees; `None`: the mount's current one.
    pub fn branch_of(&self, tid: u32) -> Option<u8> {
        if !self.any() {
            return None;
        }
        self.prune_now_and_then();
        if tid == 0 || !self.any() {
            return None;
        }
        if let Some((b, at)) = self.cache.lock().get(&tid)
            && at.elapsed() < CACHE_TTL
        {
            return *b;
        }
        let b = self.resolve(tid);
        let mut cache = self.cache.lock();
        if cache.len() > 4096 {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
        }
        cache.insert(tid, (b, Instant::now()));
        b
    }

    /// Drops bindings of exited processes, at most once per [`CACHE_TTL`].
    fn prune_now_and_then(&self) {
        {
            let mut last = self.pruned.lock();
            if last.is_some_and(|t| t.elapsed() < CACHE_TTL) {
                return;
            }
            *last = Some(Instant::now());
        }
        self.all();
    }

    fn resolve(&self, tid: u32) -> Option<u8> {
        let mut pid = tgid_of(tid)?;
        // Start time of the process one step below `pid` on the way up.
        let mut below: Option<u64> = None;
        for _ in 0..MAX_DEPTH {
            let (ppid, start) = proc_stat(pid)?;
            if let Some(b) = self.bound.lock().get(&pid).copied()
                && b.start == start
            {
                // The bound process itself, or a child started after the binding.
                return match below {
                    None => Some(b.branch),
                    Some(child_start) if child_start >= b.at => Some(b.branch),
                    Some(_) => None,
                };
            }
            if ppid == 0 || ppid == pid {
                return None;
            }
            below = Some(start);
            pid = ppid;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_process_and_children_started_later_see_its_branch() {
        let b = Bindings::default();
        let me = std::process::id();
        assert_eq!(b.branch_of(me), None);
        b.bind(me, 3).unwrap();
        assert!(b.any());
        assert_eq!(b.branch_of(me), Some(3));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(b.branch_of(child.id()), Some(3));
        assert_eq!(b.users(3), vec![me]);
        assert!(b.unbind(me));
        assert!(!b.any());
        assert_eq!(b.branch_of(child.id()), None);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_child_that_ran_before_its_parent_was_bound_keeps_its_view() {
        let b = Bindings::default();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        // Start times count in 10 ms ticks: let one pass.
        std::thread::sleep(Duration::from_millis(30));
        b.bind(std::process::id(), 2).unwrap();
        assert_eq!(b.branch_of(child.id()), None);
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_binding_ends_with_its_process() {
        let b = Bindings::default();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        b.bind(child.id(), 1).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // Noticed within a second by whoever asks next, bound or not.
        let deadline = Instant::now() + Duration::from_secs(3);
        while b.any() && Instant::now() < deadline {
            b.branch_of(std::process::id());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!b.any());
    }

    #[test]
    fn binding_a_missing_process_is_refused() {
        let b = Bindings::default();
        assert_eq!(b.bind(u32::MAX - 7, 1).unwrap_err().errno, Errno::ESRCH);
        assert!(!b.any());
    }

    #[test]
    fn proc_stat_reads_odd_command_names() {
        let (ppid, start) = proc_stat(std::process::id()).unwrap();
        assert!(ppid > 0 && start > 0);
        assert!(is_within(std::process::id(), ppid));
        assert!(!is_within(ppid, std::process::id()));
    }
}
