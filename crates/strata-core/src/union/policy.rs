//! mergerfs policies: which branch(es) an operation acts on.
//!
//! Pure functions over a snapshot of the branches ([`Candidate`]); the union
//! filesystem gathers the snapshot (existence, free space, mtime) and applies
//! the result. Names, categories and defaults follow mergerfs 2.x.
//!
//! # How a selection is made (mergerfs 2.x, `src/policy_*.cpp`)
//!
//! 1. Every branch is passed through the filters of the category, in
//!    mergerfs's order; the first filter that fails gives the branch's
//!    rejection reason:
//!    - **create**: mode RO or NC → `EROFS`; the relevant path (the parent
//!      of the new name) missing → `ENOENT` (only for the `ep*`, `epall` and
//!      `newest` policies; `msp*` accept any existing ancestor, see below;
//!      the others only need the branch itself to be reachable,
//!      `missing_levels != None`); `avail < min_free` → `ENOSPC`.
//!    - **action**: mode RO → `EROFS` (NC is fine); path missing → `ENOENT`.
//!      Every policy, `ep` or not, acts only where the path exists: mergerfs
//!      maps `ff`→`epff`, `mfs`→`epmfs`, `all`→`epall`, `rand`→`epall` +
//!      shuffle, and so on, for actions and searches.
//!    - **search**: no filter but existence (`ENOENT`).
//! 2. The policy's ordering picks among the branches that passed: first
//!    found, least/most available, least used, least used percentage,
//!    newest mtime, weighted or uniform random, or all of them.
//! 3. If nothing passed, the error is the most relevant rejection reason,
//!    combined as mergerfs's `policy::calc_error` (`src/policy_error.hpp`,
//!    used by the `error_and_continue` macro in every policy): starting from
//!    `ENOENT`, an `ENOENT` is replaced by anything, `ENOSPC` only by
//!    `EROFS`, and `EROFS` by neither. So the result is order-independent:
//!    **`EROFS` if any branch was rejected for being read-only (or
//!    no-create, for creates), else `ENOSPC` if any was rejected by
//!    `min_free`, else `ENOENT`.** Note this means a read-only branch
//!    rejected *before* the existence check still yields `EROFS` even when
//!    the path exists nowhere (mergerfs checks the mode first).
//!
//! Ties are broken towards the branch that comes first (mergerfs itself is
//! not consistent here: its `lus`/`lup` keep the first of equal branches,
//! its `mfs`/`lfs`/`newest` the last).

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use crate::Errno;
use crate::source::BranchMode;

/// The 21 mergerfs policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    All,
    EpAll,
    EpFf,
    EpLfs,
    EpLus,
    EpMfs,
    EpPfrd,
    EpRand,
    Erofs,
    Ff,
    Lfs,
    Lup,
    Lus,
    Mfs,
    MspLfs,
    MspLus,
    MspMfs,
    MspPfrd,
    Newest,
    Pfrd,
    Rand,
}

/// Policy categories: which functions a policy governs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    Create,
    Action,
    Search,
}

/// Functions with a per-function policy (`func.NAME=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Func {
    Access,
    Chmod,
    Chown,
    Create,
    Getattr,
    Getxattr,
    Link,
    Listxattr,
    Mkdir,
    Mknod,
    Open,
    Readlink,
    Removexattr,
    Rename,
    Rmdir,
    Setxattr,
    Symlink,
    Truncate,
    Unlink,
    Utimens,
}

/// What a policy sees of one branch, in branch order.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub mode: BranchMode,
    /// Effective minimum free space for new files on this branch, in bytes.
    pub min_free: u64,
    /// Bytes available to unprivileged users (`f_bavail * f_frsize`).
    pub avail: u64,
    /// Bytes in use (`(f_blocks - f_bfree) * f_frsize`).
    pub used: u64,
    /// Total size (`f_blocks * f_frsize`).
    pub total: u64,
    /// How many trailing components had to be dropped from the relevant path
    /// before it exists on this branch: 0 means the path itself exists (for
    /// create: the parent directory of the new name; for action and search:
    /// the object). `None`: not even the root... i.e. nothing of it exists.
    pub missing_levels: Option<u32>,
    /// mtime of the relevant path on this branch, when it exists (`newest`).
    pub mtime: Option<SystemTime>,
}

impl Candidate {
    pub fn exists(&self) -> bool {
        self.missing_levels == Some(0)
    }
}

/// What is being decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// A search: exactly one branch to read from.
    Search,
    /// An action on an existing object: every branch to apply it to.
    Action,
    /// Placing a new object. `many` is true for mkdir/mknod/symlink, where
    /// `all`/`epall` create on every eligible branch; false for create(2),
    /// which always lands on one branch.
    Create { many: bool },
}

/// A source of randomness for `rand`/`pfrd` policies, so tests can fix it.
pub trait Rng {
    /// A uniformly distributed value in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64;
}

impl Policy {
    pub const ALL: [Policy; 21] = [
        Policy::All,
        Policy::EpAll,
        Policy::EpFf,
        Policy::EpLfs,
        Policy::EpLus,
        Policy::EpMfs,
        Policy::EpPfrd,
        Policy::EpRand,
        Policy::Erofs,
        Policy::Ff,
        Policy::Lfs,
        Policy::Lup,
        Policy::Lus,
        Policy::Mfs,
        Policy::MspLfs,
        Policy::MspLus,
        Policy::MspMfs,
        Policy::MspPfrd,
        Policy::Newest,
        Policy::Pfrd,
        Policy::Rand,
    ];

    /// The mergerfs name, e.g. `epmfs`.
    pub fn name(self) -> &'static str {
        match self {
            Policy::All => "all",
            Policy::EpAll => "epall",
            Policy::EpFf => "epff",
            Policy::EpLfs => "eplfs",
            Policy::EpLus => "eplus",
            Policy::EpMfs => "epmfs",
            Policy::EpPfrd => "eppfrd",
            Policy::EpRand => "eprand",
            Policy::Erofs => "erofs",
            Policy::Ff => "ff",
            Policy::Lfs => "lfs",
            Policy::Lup => "lup",
            Policy::Lus => "lus",
            Policy::Mfs => "mfs",
            Policy::MspLfs => "msplfs",
            Policy::MspLus => "msplus",
            Policy::MspMfs => "mspmfs",
            Policy::MspPfrd => "msppfrd",
            Policy::Newest => "newest",
            Policy::Pfrd => "pfrd",
            Policy::Rand => "rand",
        }
    }

    /// Whether mergerfs calls this policy *path preserving*: the `ep*`
    /// policies (including `epall` and `eprand`) and the `msp*` ones. This is
    /// mergerfs's `path_preserving()` of the create policy, which decides how
    /// `rename` and `link` behave (unless `ignorepponrename`).
    ///
    /// It does not say that no cloning is needed: an `msp*` policy may pick a
    /// branch holding only an ancestor of the parent directory, and
    /// `newest`, which only considers branches where the path exists, is not
    /// path preserving in mergerfs. Whether to clone the parent onto the
    /// chosen branch follows from that candidate's `missing_levels`.
    pub fn preserves_paths(self) -> bool {
        matches!(
            self,
            Policy::EpAll
                | Policy::EpFf
                | Policy::EpLfs
                | Policy::EpLus
                | Policy::EpMfs
                | Policy::EpPfrd
                | Policy::EpRand
                | Policy::MspLfs
                | Policy::MspLus
                | Policy::MspMfs
                | Policy::MspPfrd
        )
    }

    /// Whether mergerfs accepts this policy in `category`.
    ///
    /// Always true: mergerfs 2.x registers every one of the 21 policies for
    /// each of the three categories (`src/policies.cpp`: the same list for
    /// `Policies::Action`, `::Create` and `::Search`), and its documentation
    /// says "any policy can be assigned to a function or category", though
    /// some (e.g. `rand` for `chmod`) are not useful everywhere.
    pub fn valid_for(self, category: Category) -> bool {
        let _ = category;
        true
    }

    /// Chooses branches (indexes into `branches`). Errors as mergerfs:
    /// `erofs` always fails with EROFS; otherwise, when no branch passes the
    /// filters, EROFS if any branch was rejected as read-only (RO, or NC for
    /// creates), else ENOSPC if any was rejected by `min_free`, else ENOENT
    /// (see the module documentation). A non-empty result is in branch
    /// order; it has more than one element only for `all`/`epall` with
    /// [`Want::Action`] or `Want::Create { many: true }`.
    pub fn select(
        self,
        want: Want,
        branches: &[Candidate],
        rng: &mut dyn Rng,
    ) -> Result<Vec<usize>, Errno> {
        if self == Policy::Erofs {
            return Err(Errno::EROFS);
        }
        let eligible = self.eligible(want, branches)?;
        self.pick(want, branches, eligible, rng)
    }

    /// Which branches a create may land on, for this policy.
    fn create_scope(self) -> CreateScope {
        match self {
            Policy::EpAll
            | Policy::EpFf
            | Policy::EpLfs
            | Policy::EpLus
            | Policy::EpMfs
            | Policy::EpPfrd
            | Policy::EpRand
            | Policy::Newest => CreateScope::Existing,
            Policy::MspLfs | Policy::MspLus | Policy::MspMfs | Policy::MspPfrd => {
                CreateScope::SharedPath
            }
            Policy::All
            | Policy::Erofs
            | Policy::Ff
            | Policy::Lfs
            | Policy::Lup
            | Policy::Lus
            | Policy::Mfs
            | Policy::Pfrd
            | Policy::Rand => CreateScope::Anywhere,
        }
    }

    /// How the policy orders the branches that passed the filters. The same
    /// in every category: mergerfs's non-`ep` policies delegate actions and
    /// searches to their `ep` counterpart, which orders the same way.
    fn order(self) -> Order {
        match self {
            Policy::All | Policy::EpAll => Order::All,
            Policy::EpFf | Policy::Ff | Policy::Erofs => Order::First,
            Policy::EpLfs | Policy::Lfs | Policy::MspLfs => Order::LeastAvail,
            Policy::EpLus | Policy::Lus | Policy::MspLus => Order::LeastUsed,
            Policy::EpMfs | Policy::Mfs | Policy::MspMfs => Order::MostAvail,
            Policy::EpPfrd | Policy::Pfrd | Policy::MspPfrd => Order::Weighted,
            Policy::EpRand | Policy::Rand => Order::Uniform,
            Policy::Lup => Order::LeastUsedPercent,
            Policy::Newest => Order::Newest,
        }
    }

    /// Why `c` may not be chosen for `want`, checked in mergerfs's order.
    fn reject(self, want: Want, c: &Candidate) -> Option<Reject> {
        match want {
            Want::Search => (!c.exists()).then_some(Reject::NoEnt),
            Want::Action => {
                if c.mode == BranchMode::RO {
                    Some(Reject::RoFs)
                } else if !c.exists() {
                    Some(Reject::NoEnt)
                } else {
                    None
                }
            }
            Want::Create { .. } => {
                if matches!(c.mode, BranchMode::RO | BranchMode::NC) {
                    return Some(Reject::RoFs);
                }
                let present = match self.create_scope() {
                    CreateScope::Existing => c.exists(),
                    // msp: some ancestor, at worst the branch root, exists
                    // (the walk up the path ends there). Anywhere: only the
                    // branch must be reachable. `None` is what mergerfs sees
                    // as `fs::info` failing on the branch: ENOENT.
                    CreateScope::SharedPath | CreateScope::Anywhere => c.missing_levels.is_some(),
                };
                if !present {
                    Some(Reject::NoEnt)
                } else if c.avail < c.min_free {
                    Some(Reject::NoSpc)
                } else {
                    None
                }
            }
        }
    }

    /// Indexes of the branches that pass the filters, in branch order, or the
    /// most relevant error when none does.
    fn eligible(self, want: Want, branches: &[Candidate]) -> Result<Vec<usize>, Errno> {
        let mut error = Reject::NoEnt;
        let mut eligible = Vec::with_capacity(branches.len());
        for (i, c) in branches.iter().enumerate() {
            match self.reject(want, c) {
                Some(why) => error = error.max(why),
                None => eligible.push(i),
            }
        }
        if eligible.is_empty() {
            return Err(error.errno());
        }
        if matches!(want, Want::Create { .. }) && self.create_scope() == CreateScope::SharedPath {
            // mergerfs walks up from the parent directory one level at a time
            // and stops at the first level where some branch passes the ep
            // filters. A branch has the path at level L iff its
            // missing_levels <= L, so the first such level is the smallest
            // missing_levels among the branches that pass the other filters,
            // and the branches found there are exactly those at that level.
            // (When every level fails, each branch's reason is its reason at
            // the root, which is what `reject` computed.)
            let level = |i: &usize| branches[*i].missing_levels.unwrap_or(u32::MAX);
            let shallowest = eligible.iter().map(level).min().unwrap_or(0);
            eligible.retain(|i| level(i) == shallowest);
        }
        Ok(eligible)
    }

    /// Applies the policy's ordering to the (non-empty) eligible branches.
    fn pick(
        self,
        want: Want,
        branches: &[Candidate],
        eligible: Vec<usize>,
        rng: &mut dyn Rng,
    ) -> Result<Vec<usize>, Errno> {
        let chosen = match self.order() {
            Order::All => match want {
                Want::Action | Want::Create { many: true } => return Ok(eligible),
                // Search: the first found; create(2): like ff/epff.
                Want::Search | Want::Create { many: false } => eligible[0],
            },
            Order::First => eligible[0],
            Order::LeastAvail => best(branches, &eligible, |a, b| a.avail < b.avail),
            Order::MostAvail => best(branches, &eligible, |a, b| a.avail > b.avail),
            Order::LeastUsed => best(branches, &eligible, |a, b| a.used < b.used),
            Order::LeastUsedPercent => best(branches, &eligible, |a, b| {
                let (au, at) = usage(a);
                let (bu, bt) = usage(b);
                au * bt < bu * at
            }),
            Order::Newest => best(branches, &eligible, |a, b| a.mtime > b.mtime),
            Order::Uniform => {
                let n = eligible.len() as u64;
                let k = rng.below(n).min(n - 1);
                eligible[k as usize]
            }
            Order::Weighted => match weighted(branches, &eligible, rng) {
                Some(i) => i,
                // Every eligible branch has zero bytes available (possible
                // only with min_free 0). mergerfs's current create code
                // answers ENOSPC; for actions and searches there is nothing
                // to weigh, so take the first found rather than fail on a
                // file that exists.
                None if matches!(want, Want::Create { .. }) => return Err(Errno::ENOSPC),
                None => eligible[0],
            },
        };
        Ok(vec![chosen])
    }
}

/// Where a create may land, before `min_free` and the mode are considered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CreateScope {
    /// Only where the parent directory exists (`ep*`, `newest`).
    Existing,
    /// Where the longest existing prefix of the parent exists (`msp*`).
    SharedPath,
    /// Any reachable branch; the parent is cloned as needed.
    Anywhere,
}

/// How a policy picks among eligible branches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    All,
    First,
    LeastAvail,
    MostAvail,
    LeastUsed,
    LeastUsedPercent,
    Newest,
    Weighted,
    Uniform,
}

/// Why a branch was filtered out. Ordered by relevance, as mergerfs's
/// `policy::calc_error`: the maximum over all branches is reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Reject {
    NoEnt,
    NoSpc,
    RoFs,
}

impl Reject {
    fn errno(self) -> Errno {
        match self {
            Reject::NoEnt => Errno::ENOENT,
            Reject::NoSpc => Errno::ENOSPC,
            Reject::RoFs => Errno::EROFS,
        }
    }
}

/// The best eligible branch by `better` (a strict "is better than"); of
/// equally good branches, the first.
fn best(
    branches: &[Candidate],
    eligible: &[usize],
    better: impl Fn(&Candidate, &Candidate) -> bool,
) -> usize {
    let mut chosen = eligible[0];
    for &i in &eligible[1..] {
        if better(&branches[i], &branches[chosen]) {
            chosen = i;
        }
    }
    chosen
}

/// `(used, total)` for comparing used fractions by cross-multiplication. A
/// zero total counts as empty, as mergerfs's `lup`.
fn usage(c: &Candidate) -> (u128, u128) {
    if c.total == 0 {
        (0, 1)
    } else {
        (u128::from(c.used), u128::from(c.total))
    }
}

/// Percentage free random distribution: branch `i` is chosen with
/// probability `avail_i / sum(avail)`. A threshold `t` uniform in `0..sum`
/// selects the first branch whose running total exceeds `t`, so a branch
/// with nothing available is never chosen. `None` when the sum is zero.
fn weighted(branches: &[Candidate], eligible: &[usize], rng: &mut dyn Rng) -> Option<usize> {
    let sum: u128 = eligible
        .iter()
        .map(|&i| u128::from(branches[i].avail))
        .sum();
    // Scale the weights down if their sum does not fit the Rng's u64.
    let shift = (128 - sum.leading_zeros()).saturating_sub(64);
    let weight = |i: usize| u128::from(branches[i].avail) >> shift;
    let sum: u128 = eligible.iter().map(|&i| weight(i)).sum();
    if sum == 0 {
        return None;
    }
    let sum = u64::try_from(sum).unwrap_or(u64::MAX);
    let threshold = u128::from(rng.below(sum).min(sum - 1));
    let mut running = 0u128;
    for &i in eligible {
        running += weight(i);
        if running > threshold {
            return Some(i);
        }
    }
    // Unreachable: the running total ends at sum > threshold.
    eligible.last().copied()
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let valid: Vec<&str> = Policy::ALL.iter().map(|p| p.name()).collect();
                format!("invalid policy {s:?}; valid policies: {}", valid.join(", "))
            })
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Category {
    pub fn name(self) -> &'static str {
        match self {
            Category::Create => "create",
            Category::Action => "action",
            Category::Search => "search",
        }
    }

    /// mergerfs defaults: create=pfrd, action=epall, search=ff.
    ///
    /// (pfrd is the create default since mergerfs 2.34; earlier releases,
    /// such as 2.33, used epmfs.)
    pub fn default_policy(self) -> Policy {
        match self {
            Category::Create => Policy::Pfrd,
            Category::Action => Policy::EpAll,
            Category::Search => Policy::Ff,
        }
    }
}

impl Func {
    pub const ALL: [Func; 20] = [
        Func::Access,
        Func::Chmod,
        Func::Chown,
        Func::Create,
        Func::Getattr,
        Func::Getxattr,
        Func::Link,
        Func::Listxattr,
        Func::Mkdir,
        Func::Mknod,
        Func::Open,
        Func::Readlink,
        Func::Removexattr,
        Func::Rename,
        Func::Rmdir,
        Func::Setxattr,
        Func::Symlink,
        Func::Truncate,
        Func::Unlink,
        Func::Utimens,
    ];

    /// The mergerfs name, e.g. `getattr`.
    pub fn name(self) -> &'static str {
        match self {
            Func::Access => "access",
            Func::Chmod => "chmod",
            Func::Chown => "chown",
            Func::Create => "create",
            Func::Getattr => "getattr",
            Func::Getxattr => "getxattr",
            Func::Link => "link",
            Func::Listxattr => "listxattr",
            Func::Mkdir => "mkdir",
            Func::Mknod => "mknod",
            Func::Open => "open",
            Func::Readlink => "readlink",
            Func::Removexattr => "removexattr",
            Func::Rename => "rename",
            Func::Rmdir => "rmdir",
            Func::Setxattr => "setxattr",
            Func::Symlink => "symlink",
            Func::Truncate => "truncate",
            Func::Unlink => "unlink",
            Func::Utimens => "utimens",
        }
    }

    /// The function called `s` (exact, lower-case mergerfs name).
    pub fn from_name(s: &str) -> Option<Func> {
        Func::ALL.into_iter().find(|f| f.name() == s)
    }

    /// The category mergerfs puts this function in.
    pub fn category(self) -> Category {
        match self {
            Func::Chmod
            | Func::Chown
            | Func::Link
            | Func::Removexattr
            | Func::Rename
            | Func::Rmdir
            | Func::Setxattr
            | Func::Truncate
            | Func::Unlink
            | Func::Utimens => Category::Action,
            Func::Create | Func::Mkdir | Func::Mknod | Func::Symlink => Category::Create,
            Func::Access
            | Func::Getattr
            | Func::Getxattr
            | Func::Listxattr
            | Func::Open
            | Func::Readlink => Category::Search,
        }
    }
}

#[cfg(test)]
mod tests;
