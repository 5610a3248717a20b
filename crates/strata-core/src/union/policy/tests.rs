//! The policies against hand-made branch sets: each policy's choice, its
//! filters (modes, minfreespace, existing paths) and mergerfs's error rules.

use super::*;
use std::time::{Duration, UNIX_EPOCH};

const GB: u64 = 1 << 30;

/// A fake random source: always answers the low or the high end of the
/// requested range, and records each `n` asked for.
struct FakeRng {
    high: bool,
    asked: Vec<u64>,
}

impl FakeRng {
    fn low() -> FakeRng {
        FakeRng {
            high: false,
            asked: Vec::new(),
        }
    }
    fn high() -> FakeRng {
        FakeRng {
            high: true,
            asked: Vec::new(),
        }
    }
}

impl Rng for FakeRng {
    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        self.asked.push(n);
        if self.high { n - 1 } else { 0 }
    }
}

/// Answers a fixed value (for hitting weight boundaries exactly).
struct Fixed(u64);

impl Rng for Fixed {
    fn below(&mut self, n: u64) -> u64 {
        assert!(self.0 < n, "fixed value {} out of 0..{n}", self.0);
        self.0
    }
}

/// A Rng that must not be consulted.
struct NoRng;

impl Rng for NoRng {
    fn below(&mut self, _: u64) -> u64 {
        panic!("deterministic policy asked for randomness")
    }
}

/// An RW branch where the path exists, with 100 GB free out of 200 GB.
fn br() -> Candidate {
    Candidate {
        mode: BranchMode::RW,
        min_free: 0,
        avail: 100 * GB,
        used: 100 * GB,
        total: 200 * GB,
        missing_levels: Some(0),
        mtime: Some(UNIX_EPOCH + Duration::from_secs(1_000)),
    }
}

fn avail(gb: u64) -> Candidate {
    Candidate {
        avail: gb * GB,
        ..br()
    }
}

fn used(gb: u64) -> Candidate {
    Candidate {
        used: gb * GB,
        ..br()
    }
}

fn mode(mode: BranchMode) -> Candidate {
    Candidate { mode, ..br() }
}

fn missing(levels: Option<u32>) -> Candidate {
    Candidate {
        missing_levels: levels,
        mtime: None,
        ..br()
    }
}

fn mtime(secs: Option<u64>) -> Candidate {
    Candidate {
        mtime: secs.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        ..br()
    }
}

fn full(c: Candidate) -> Candidate {
    Candidate {
        min_free: 4 * GB,
        avail: GB,
        ..c
    }
}

const SEARCH: Want = Want::Search;
const ACTION: Want = Want::Action;
const CREATE: Want = Want::Create { many: false };
const CREATE_MANY: Want = Want::Create { many: true };
const WANTS: [Want; 4] = [SEARCH, ACTION, CREATE, CREATE_MANY];

fn sel(p: Policy, want: Want, branches: &[Candidate]) -> Result<Vec<usize>, Errno> {
    p.select(want, branches, &mut FakeRng::low())
}

fn sel_high(p: Policy, want: Want, branches: &[Candidate]) -> Result<Vec<usize>, Errno> {
    p.select(want, branches, &mut FakeRng::high())
}

fn every_policy_but_erofs() -> impl Iterator<Item = Policy> {
    Policy::ALL.into_iter().filter(|&p| p != Policy::Erofs)
}

fn is_ep(p: Policy) -> bool {
    p.name().starts_with("ep") || p == Policy::Newest
}

fn is_msp(p: Policy) -> bool {
    p.name().starts_with("msp")
}

// ---- names, parsing, categories ----

const NAMES: [&str; 21] = [
    "all", "epall", "epff", "eplfs", "eplus", "epmfs", "eppfrd", "eprand", "erofs", "ff", "lfs",
    "lup", "lus", "mfs", "msplfs", "msplus", "mspmfs", "msppfrd", "newest", "pfrd", "rand",
];

#[test]
fn policy_names_are_mergerfs_names_in_order() {
    let names: Vec<&str> = Policy::ALL.iter().map(|p| p.name()).collect();
    assert_eq!(names, NAMES);
}

#[test]
fn policy_from_str_round_trips_all_21() {
    for p in Policy::ALL {
        assert_eq!(p.name().parse::<Policy>(), Ok(p));
        assert_eq!(p.to_string(), p.name());
        assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
    }
}

#[test]
fn policy_from_str_rejects_others() {
    let err = "bogus".parse::<Policy>().unwrap_err();
    assert!(err.contains("\"bogus\""), "{err}");
    assert!(!err.contains('\n'), "{err}");
    for name in NAMES {
        assert!(err.contains(name), "{err} lacks {name}");
    }
    for bad in [
        "", "EPMFS", "Ff", " ff", "ff ", "eplup", "msprand", "epnewest",
    ] {
        assert!(bad.parse::<Policy>().is_err(), "{bad:?} accepted");
    }
}

#[test]
fn func_names_round_trip_all_20() {
    let names = [
        "access",
        "chmod",
        "chown",
        "create",
        "getattr",
        "getxattr",
        "link",
        "listxattr",
        "mkdir",
        "mknod",
        "open",
        "readlink",
        "removexattr",
        "rename",
        "rmdir",
        "setxattr",
        "symlink",
        "truncate",
        "unlink",
        "utimens",
    ];
    let got: Vec<&str> = Func::ALL.iter().map(|f| f.name()).collect();
    assert_eq!(got, names);
    for f in Func::ALL {
        assert_eq!(Func::from_name(f.name()), Some(f));
    }
    for bad in [
        "", "bogus", "ioctl", "readdir", "statfs", "Getattr", "write",
    ] {
        assert_eq!(Func::from_name(bad), None, "{bad:?}");
    }
}

#[test]
fn func_categories_follow_mergerfs() {
    let of = |names: &[&str]| -> Vec<Func> {
        names.iter().map(|n| Func::from_name(n).unwrap()).collect()
    };
    let action = of(&[
        "chmod",
        "chown",
        "link",
        "removexattr",
        "rename",
        "rmdir",
        "setxattr",
        "truncate",
        "unlink",
        "utimens",
    ]);
    let create = of(&["create", "mkdir", "mknod", "symlink"]);
    let search = of(&[
        "access",
        "getattr",
        "getxattr",
        "listxattr",
        "open",
        "readlink",
    ]);
    assert_eq!(action.len() + create.len() + search.len(), 20);
    for f in action {
        assert_eq!(f.category(), Category::Action, "{}", f.name());
    }
    for f in create {
        assert_eq!(f.category(), Category::Create, "{}", f.name());
    }
    for f in search {
        assert_eq!(f.category(), Category::Search, "{}", f.name());
    }
}

#[test]
fn default_policies() {
    assert_eq!(Category::Create.default_policy(), Policy::Pfrd);
    assert_eq!(Category::Action.default_policy(), Policy::EpAll);
    assert_eq!(Category::Search.default_policy(), Policy::Ff);
    assert_eq!(Category::Create.name(), "create");
}

#[test]
fn every_policy_is_valid_in_every_category() {
    for p in Policy::ALL {
        for c in [Category::Create, Category::Action, Category::Search] {
            assert!(p.valid_for(c), "{p} {}", c.name());
        }
    }
}

#[test]
fn path_preserving_policies_are_ep_and_msp() {
    let preserving: Vec<&str> = Policy::ALL
        .iter()
        .filter(|p| p.preserves_paths())
        .map(|p| p.name())
        .collect();
    assert_eq!(
        preserving,
        [
            "epall", "epff", "eplfs", "eplus", "epmfs", "eppfrd", "eprand", "msplfs", "msplus",
            "mspmfs", "msppfrd"
        ]
    );
}

// ---- erofs and generic errors ----

#[test]
fn erofs_always_fails_with_erofs() {
    for want in WANTS {
        assert_eq!(sel(Policy::Erofs, want, &[br(), br()]), Err(Errno::EROFS));
        assert_eq!(sel(Policy::Erofs, want, &[]), Err(Errno::EROFS));
    }
}

#[test]
fn no_branches_is_enoent() {
    for p in every_policy_but_erofs() {
        for want in WANTS {
            assert_eq!(sel(p, want, &[]), Err(Errno::ENOENT), "{p} {want:?}");
        }
    }
}

#[test]
fn nothing_exists_is_enoent() {
    let branches = [missing(Some(1)), missing(None), missing(Some(3))];
    for p in every_policy_but_erofs() {
        assert_eq!(sel(p, SEARCH, &branches), Err(Errno::ENOENT), "{p}");
        assert_eq!(sel(p, ACTION, &branches), Err(Errno::ENOENT), "{p}");
        if is_ep(p) {
            for want in [CREATE, CREATE_MANY] {
                assert_eq!(sel(p, want, &branches), Err(Errno::ENOENT), "{p}");
            }
        } else {
            // Non-ep and msp creates land where the parent can be cloned.
            assert!(sel(p, CREATE, &branches).is_ok(), "{p}");
        }
    }
    // Unreachable branches (None) are out for every create.
    let gone = [missing(None), missing(None)];
    for p in every_policy_but_erofs() {
        assert_eq!(sel(p, CREATE, &gone), Err(Errno::ENOENT), "{p}");
    }
}

#[test]
fn all_read_only_is_erofs_for_create_and_action() {
    let branches = [mode(BranchMode::RO), mode(BranchMode::RO)];
    for p in every_policy_but_erofs() {
        for want in [ACTION, CREATE, CREATE_MANY] {
            assert_eq!(sel(p, want, &branches), Err(Errno::EROFS), "{p} {want:?}");
        }
        // Searches do not filter on mode.
        assert_eq!(sel(p, SEARCH, &branches), Ok(vec![0]), "{p}");
    }
}

#[test]
fn no_create_is_erofs_for_create_but_fine_for_action() {
    let branches = [mode(BranchMode::NC), mode(BranchMode::NC)];
    for p in every_policy_but_erofs() {
        for want in [CREATE, CREATE_MANY] {
            assert_eq!(sel(p, want, &branches), Err(Errno::EROFS), "{p}");
        }
        let got = sel(p, ACTION, &branches).unwrap();
        assert!(!got.is_empty(), "{p}");
        assert_eq!(sel(p, SEARCH, &branches), Ok(vec![0]), "{p}");
    }
    assert_eq!(sel(Policy::EpAll, ACTION, &branches), Ok(vec![0, 1]));
}

#[test]
fn min_free_is_enospc_for_create_only() {
    let branches = [full(br()), full(br())];
    for p in every_policy_but_erofs() {
        for want in [CREATE, CREATE_MANY] {
            assert_eq!(sel(p, want, &branches), Err(Errno::ENOSPC), "{p}");
        }
        assert!(sel(p, ACTION, &branches).is_ok(), "{p}");
        assert!(sel(p, SEARCH, &branches).is_ok(), "{p}");
    }
    // avail == min_free is enough.
    let exact = [Candidate {
        min_free: GB,
        avail: GB,
        ..br()
    }];
    for p in every_policy_but_erofs() {
        assert_eq!(sel(p, CREATE, &exact), Ok(vec![0]), "{p}");
    }
}

#[test]
fn create_skips_ro_nc_and_full_branches() {
    // Only the last branch may receive the new file; it has the least
    // space, so even mfs must pick it.
    let branches = [
        Candidate {
            avail: 900 * GB,
            ..mode(BranchMode::RO)
        },
        Candidate {
            avail: 800 * GB,
            ..mode(BranchMode::NC)
        },
        full(br()),
        Candidate {
            min_free: 4 * GB,
            avail: 10 * GB,
            used: 900 * GB,
            ..br()
        },
    ];
    for p in every_policy_but_erofs() {
        for want in [CREATE, CREATE_MANY] {
            assert_eq!(sel(p, want, &branches), Ok(vec![3]), "{p} {want:?}");
            assert_eq!(sel_high(p, want, &branches), Ok(vec![3]), "{p} {want:?}");
        }
    }
}

#[test]
fn action_skips_ro_but_not_nc() {
    let branches = [
        Candidate {
            avail: 900 * GB,
            used: 0,
            mtime: Some(UNIX_EPOCH + Duration::from_secs(9_999)),
            ..mode(BranchMode::RO)
        },
        mode(BranchMode::NC),
    ];
    for p in every_policy_but_erofs() {
        assert_eq!(sel(p, ACTION, &branches), Ok(vec![1]), "{p}");
        assert_eq!(sel_high(p, ACTION, &branches), Ok(vec![1]), "{p}");
    }
}

#[test]
fn error_precedence_erofs_over_enospc_over_enoent() {
    // EROFS beats ENOSPC, in either order.
    for branches in [
        [mode(BranchMode::RO), full(br())],
        [full(br()), mode(BranchMode::NC)],
    ] {
        for p in every_policy_but_erofs() {
            assert_eq!(sel(p, CREATE, &branches), Err(Errno::EROFS), "{p}");
        }
    }
    // ENOSPC beats ENOENT, in either order (ep: one branch lacks the
    // parent, the other has it but is full).
    for branches in [
        [missing(Some(1)), full(br())],
        [full(br()), missing(Some(1))],
    ] {
        for p in [Policy::EpMfs, Policy::EpFf, Policy::EpAll, Policy::Newest] {
            assert_eq!(sel(p, CREATE, &branches), Err(Errno::ENOSPC), "{p}");
        }
    }
    // mergerfs checks the mode before existence: an RO branch that lacks
    // the path still makes the answer EROFS.
    let branches = [mode(BranchMode::RO), missing(Some(1))];
    assert_eq!(sel(Policy::EpMfs, CREATE, &branches), Err(Errno::EROFS));
    assert_eq!(sel(Policy::EpAll, ACTION, &branches), Err(Errno::EROFS));
    // ...but searches never report EROFS.
    let branches = [
        Candidate {
            missing_levels: Some(1),
            ..mode(BranchMode::RO)
        },
        missing(Some(1)),
    ];
    assert_eq!(sel(Policy::Ff, SEARCH, &branches), Err(Errno::ENOENT));
    assert_eq!(sel(Policy::EpAll, ACTION, &branches), Err(Errno::EROFS));
    // min_free never matters for actions: ENOENT, not ENOSPC.
    let branches = [full(missing(Some(1))), missing(None)];
    assert_eq!(sel(Policy::EpAll, ACTION, &branches), Err(Errno::ENOENT));
}

// ---- first found ----

#[test]
fn ff_create_takes_first_reachable_even_without_parent() {
    let branches = [missing(None), missing(Some(2)), br()];
    assert_eq!(
        Policy::Ff.select(CREATE, &branches, &mut NoRng),
        Ok(vec![1])
    );
    assert_eq!(
        Policy::Ff.select(CREATE_MANY, &branches, &mut NoRng),
        Ok(vec![1])
    );
}

#[test]
fn epff_create_takes_first_with_parent() {
    let branches = [missing(None), missing(Some(2)), full(br()), br(), br()];
    assert_eq!(
        Policy::EpFf.select(CREATE, &branches, &mut NoRng),
        Ok(vec![3])
    );
}

#[test]
fn ff_and_epff_search_and_action_need_the_path() {
    let branches = [missing(Some(1)), mode(BranchMode::RO), br()];
    for p in [Policy::Ff, Policy::EpFf] {
        assert_eq!(p.select(SEARCH, &branches, &mut NoRng), Ok(vec![1]));
        assert_eq!(p.select(ACTION, &branches, &mut NoRng), Ok(vec![2]));
    }
}

// ---- all / epall ----

#[test]
fn all_and_epall_action_return_every_eligible_branch_in_order() {
    let branches = [
        br(),
        mode(BranchMode::RO),
        missing(Some(1)),
        mode(BranchMode::NC),
        full(br()),
    ];
    for p in [Policy::All, Policy::EpAll] {
        assert_eq!(p.select(ACTION, &branches, &mut NoRng), Ok(vec![0, 3, 4]));
        assert_eq!(p.select(SEARCH, &branches, &mut NoRng), Ok(vec![0]));
    }
}

#[test]
fn all_and_epall_search_take_the_first_found() {
    let branches = [missing(Some(1)), mode(BranchMode::RO), br()];
    for p in [Policy::All, Policy::EpAll] {
        assert_eq!(p.select(SEARCH, &branches, &mut NoRng), Ok(vec![1]));
    }
}

#[test]
fn all_create_many_uses_every_writable_branch() {
    let branches = [
        missing(Some(1)),
        mode(BranchMode::RO),
        br(),
        mode(BranchMode::NC),
        full(br()),
        missing(None),
        missing(Some(4)),
    ];
    assert_eq!(
        Policy::All.select(CREATE_MANY, &branches, &mut NoRng),
        Ok(vec![0, 2, 6])
    );
    // create(2) with `all` is ff.
    assert_eq!(
        Policy::All.select(CREATE, &branches, &mut NoRng),
        Ok(vec![0])
    );
    // epall additionally needs the parent.
    assert_eq!(
        Policy::EpAll.select(CREATE_MANY, &branches, &mut NoRng),
        Ok(vec![2])
    );
    assert_eq!(
        Policy::EpAll.select(CREATE, &branches, &mut NoRng),
        Ok(vec![2])
    );
    let two = [missing(Some(1)), br(), br()];
    assert_eq!(
        Policy::EpAll.select(CREATE_MANY, &two, &mut NoRng),
        Ok(vec![1, 2])
    );
    assert_eq!(Policy::EpAll.select(CREATE, &two, &mut NoRng), Ok(vec![1]));
}

#[test]
fn only_all_and_epall_ever_return_more_than_one() {
    let branches = [br(), avail(50), used(10), mtime(Some(5)), br()];
    for p in every_policy_but_erofs() {
        for want in WANTS {
            for high in [false, true] {
                let got = if high {
                    sel_high(p, want, &branches)
                } else {
                    sel(p, want, &branches)
                }
                .unwrap();
                let many = matches!(p, Policy::All | Policy::EpAll)
                    && matches!(want, Want::Action | Want::Create { many: true });
                if many {
                    assert_eq!(got, [0, 1, 2, 3, 4], "{p} {want:?}");
                } else {
                    assert_eq!(got.len(), 1, "{p} {want:?}");
                }
            }
        }
    }
}

// ---- space-based orderings ----

#[test]
fn mfs_picks_most_available() {
    let branches = [avail(10), avail(300), avail(50), avail(300)];
    for p in [Policy::Mfs, Policy::EpMfs, Policy::MspMfs] {
        for want in WANTS {
            // Ties: the first of the equal branches.
            assert_eq!(p.select(want, &branches, &mut NoRng), Ok(vec![1]), "{p}");
        }
    }
}

#[test]
fn lfs_picks_least_available() {
    let branches = [avail(300), avail(10), avail(50), avail(10)];
    for p in [Policy::Lfs, Policy::EpLfs, Policy::MspLfs] {
        for want in WANTS {
            assert_eq!(p.select(want, &branches, &mut NoRng), Ok(vec![1]), "{p}");
        }
    }
}

#[test]
fn lus_picks_least_used() {
    let branches = [used(300), used(50), used(10), used(10)];
    for p in [Policy::Lus, Policy::EpLus, Policy::MspLus] {
        for want in WANTS {
            assert_eq!(p.select(want, &branches, &mut NoRng), Ok(vec![2]), "{p}");
        }
    }
}

#[test]
fn lup_picks_least_used_fraction() {
    let pct = |used, total| Candidate {
        used,
        total,
        ..br()
    };
    // 50%, 10% (of a small disk), 20% (least used bytes), 10% again.
    let branches = [
        pct(500 * GB, 1000 * GB),
        pct(10 * GB, 100 * GB),
        pct(2 * GB, 10 * GB),
        pct(100 * GB, 1000 * GB),
    ];
    for want in WANTS {
        assert_eq!(
            Policy::Lup.select(want, &branches, &mut NoRng),
            Ok(vec![1]),
            "{want:?}"
        );
    }
    // lus would have chosen differently.
    assert_eq!(sel(Policy::Lus, CREATE, &branches), Ok(vec![2]));
    // A zero-size filesystem counts as empty, as mergerfs.
    let zero = [pct(GB, 100 * GB), pct(0, 0)];
    assert_eq!(sel(Policy::Lup, CREATE, &zero), Ok(vec![1]));
    // Huge values do not overflow.
    let huge = [pct(u64::MAX - 1, u64::MAX), pct(u64::MAX / 2, u64::MAX)];
    assert_eq!(sel(Policy::Lup, CREATE, &huge), Ok(vec![1]));
}

#[test]
fn non_ep_create_considers_branches_without_the_parent() {
    let branches = [avail(10), missing(Some(1)), avail(50)];
    // missing(Some(1)) has 100 GB: the most.
    assert_eq!(sel(Policy::Mfs, CREATE, &branches), Ok(vec![1]));
    assert_eq!(sel(Policy::EpMfs, CREATE, &branches), Ok(vec![2]));
    // ...but actions and searches never go where the path is missing.
    assert_eq!(sel(Policy::Mfs, ACTION, &branches), Ok(vec![2]));
    assert_eq!(sel(Policy::Mfs, SEARCH, &branches), Ok(vec![2]));
    let branches = [avail(300), missing(Some(2)), avail(50)];
    assert_eq!(sel(Policy::Lfs, CREATE, &branches), Ok(vec![2]));
    let branches = [
        avail(300),
        Candidate {
            avail: GB,
            ..missing(Some(2))
        },
    ];
    assert_eq!(sel(Policy::Lfs, CREATE, &branches), Ok(vec![1]));
    assert_eq!(sel(Policy::EpLfs, CREATE, &branches), Ok(vec![0]));
    assert_eq!(sel(Policy::Lfs, ACTION, &branches), Ok(vec![0]));
}

#[test]
fn space_orderings_ignore_min_free_for_actions() {
    // The full branch is the least free: lfs acts on it.
    let branches = [avail(300), full(br())];
    assert_eq!(sel(Policy::Lfs, ACTION, &branches), Ok(vec![1]));
    assert_eq!(sel(Policy::Lfs, SEARCH, &branches), Ok(vec![1]));
    assert_eq!(sel(Policy::Lfs, CREATE, &branches), Ok(vec![0]));
}

// ---- newest ----

#[test]
fn newest_picks_largest_mtime_where_the_path_exists() {
    let branches = [
        mtime(Some(10)),
        Candidate {
            missing_levels: Some(1),
            ..mtime(Some(99))
        },
        mtime(Some(50)),
        mtime(Some(20)),
        mtime(Some(50)),
    ];
    for want in [SEARCH, ACTION, CREATE, CREATE_MANY] {
        assert_eq!(
            Policy::Newest.select(want, &branches, &mut NoRng),
            Ok(vec![2]),
            "{want:?}"
        );
    }
}

#[test]
fn newest_filters_like_ep() {
    let branches = [
        Candidate {
            mode: BranchMode::RO,
            ..mtime(Some(90))
        },
        Candidate {
            mode: BranchMode::NC,
            ..mtime(Some(80))
        },
        full(mtime(Some(70))),
        mtime(Some(10)),
    ];
    assert_eq!(sel(Policy::Newest, SEARCH, &branches), Ok(vec![0]));
    assert_eq!(sel(Policy::Newest, ACTION, &branches), Ok(vec![1]));
    assert_eq!(
        sel(Policy::Newest, ACTION, &branches[..1]),
        Err(Errno::EROFS)
    );
    assert_eq!(sel(Policy::Newest, CREATE, &branches), Ok(vec![3]));
    assert_eq!(
        sel(Policy::Newest, CREATE, &branches[..3]),
        Err(Errno::EROFS)
    );
    assert_eq!(
        sel(Policy::Newest, CREATE, &branches[2..3]),
        Err(Errno::ENOSPC)
    );
}

#[test]
fn newest_without_mtime_counts_as_oldest() {
    let branches = [mtime(None), mtime(Some(0)), mtime(None)];
    assert_eq!(sel(Policy::Newest, SEARCH, &branches), Ok(vec![1]));
    let branches = [mtime(None), mtime(None)];
    assert_eq!(sel(Policy::Newest, SEARCH, &branches), Ok(vec![0]));
}

// ---- most shared path ----

#[test]
fn msp_create_walks_up_to_the_most_shared_level() {
    // Nobody has the parent; branches 1 and 3 have its parent.
    let branches = [
        Candidate {
            avail: 900 * GB,
            ..missing(Some(2))
        },
        Candidate {
            avail: 20 * GB,
            used: 5 * GB,
            ..missing(Some(1))
        },
        missing(None),
        Candidate {
            avail: 40 * GB,
            used: 50 * GB,
            ..missing(Some(1))
        },
        Candidate {
            avail: 800 * GB,
            ..missing(Some(3))
        },
    ];
    assert_eq!(sel(Policy::MspMfs, CREATE, &branches), Ok(vec![3]));
    assert_eq!(sel(Policy::MspLfs, CREATE, &branches), Ok(vec![1]));
    assert_eq!(sel(Policy::MspLus, CREATE, &branches), Ok(vec![1]));
    assert_eq!(sel(Policy::MspPfrd, CREATE, &branches), Ok(vec![1]));
    assert_eq!(sel_high(Policy::MspPfrd, CREATE, &branches), Ok(vec![3]));
    let mut rng = FakeRng::low();
    Policy::MspPfrd.select(CREATE, &branches, &mut rng).unwrap();
    assert_eq!(rng.asked, [60 * GB]);
    // Plain ep policies give up at the first level.
    assert_eq!(sel(Policy::EpMfs, CREATE, &branches), Err(Errno::ENOENT));
    // At level 0 the msp policies are the ep ones.
    let mut with_parent = branches.clone();
    with_parent[4].missing_levels = Some(0);
    for p in [
        Policy::MspMfs,
        Policy::MspLfs,
        Policy::MspLus,
        Policy::MspPfrd,
    ] {
        assert_eq!(sel(p, CREATE, &with_parent), Ok(vec![4]), "{p}");
    }
}

#[test]
fn msp_create_skips_levels_whose_branches_are_filtered() {
    // The only branch with the parent is full, and the next one is
    // read-only: go up to the branch with the grandparent.
    let branches = [
        full(br()),
        Candidate {
            missing_levels: Some(1),
            ..mode(BranchMode::RO)
        },
        missing(Some(2)),
        missing(Some(3)),
    ];
    for p in [
        Policy::MspMfs,
        Policy::MspLfs,
        Policy::MspLus,
        Policy::MspPfrd,
    ] {
        assert_eq!(sel(p, CREATE, &branches), Ok(vec![2]), "{p}");
    }
    // All filtered: the most relevant error over every branch.
    assert_eq!(
        sel(Policy::MspMfs, CREATE, &branches[..2]),
        Err(Errno::EROFS)
    );
    assert_eq!(
        sel(Policy::MspMfs, CREATE, &branches[..1]),
        Err(Errno::ENOSPC)
    );
    assert_eq!(
        sel(Policy::MspMfs, CREATE, &[missing(None), missing(None)]),
        Err(Errno::ENOENT)
    );
    // The root is shared by every reachable branch.
    let roots = [
        missing(Some(5)),
        Candidate {
            avail: 200 * GB,
            ..missing(Some(5))
        },
    ];
    assert_eq!(sel(Policy::MspMfs, CREATE, &roots), Ok(vec![1]));
}

#[test]
fn msp_action_and_search_are_ep() {
    let branches = [missing(Some(1)), avail(10), avail(50)];
    assert_eq!(sel(Policy::MspMfs, ACTION, &branches), Ok(vec![2]));
    assert_eq!(sel(Policy::MspLfs, SEARCH, &branches), Ok(vec![1]));
    let none = [missing(Some(1)), missing(Some(2))];
    for p in [
        Policy::MspMfs,
        Policy::MspLfs,
        Policy::MspLus,
        Policy::MspPfrd,
    ] {
        assert_eq!(sel(p, ACTION, &none), Err(Errno::ENOENT), "{p}");
        assert_eq!(sel(p, SEARCH, &none), Err(Errno::ENOENT), "{p}");
    }
}

// ---- random policies ----

#[test]
fn pfrd_weights_by_available_space() {
    let branches = [
        avail(0),
        avail(30),
        Candidate {
            avail: 500 * GB,
            ..mode(BranchMode::RO)
        },
        avail(10),
        avail(0),
    ];
    for p in [Policy::Pfrd, Policy::EpPfrd, Policy::MspPfrd] {
        for want in WANTS {
            if want != SEARCH {
                let mut rng = FakeRng::low();
                assert_eq!(p.select(want, &branches, &mut rng), Ok(vec![1]), "{p}");
                assert_eq!(rng.asked, [40 * GB], "{p}");
                assert_eq!(sel_high(p, want, &branches), Ok(vec![3]), "{p}");
            }
            // Exact boundaries: 0..30G is branch 1, 30G..40G branch 3.
            let exact = |t| p.select(ACTION, &branches, &mut Fixed(t));
            assert_eq!(exact(30 * GB - 1), Ok(vec![1]));
            assert_eq!(exact(30 * GB), Ok(vec![3]));
        }
        // Searches see the RO branch too.
        let mut rng = FakeRng::high();
        assert_eq!(p.select(SEARCH, &branches, &mut rng), Ok(vec![3]), "{p}");
        assert_eq!(rng.asked, [540 * GB]);
        assert_eq!(sel(p, SEARCH, &branches), Ok(vec![1]), "{p}");
        assert_eq!(
            p.select(SEARCH, &branches, &mut Fixed(30 * GB)),
            Ok(vec![2]),
            "{p}"
        );
    }
}

#[test]
fn pfrd_create_ignores_missing_parent_eppfrd_does_not() {
    let branches = [missing(Some(1)), avail(10)];
    assert_eq!(sel(Policy::Pfrd, CREATE, &branches), Ok(vec![0]));
    assert_eq!(sel_high(Policy::Pfrd, CREATE, &branches), Ok(vec![1]));
    assert_eq!(sel(Policy::EpPfrd, CREATE, &branches), Ok(vec![1]));
    assert_eq!(sel(Policy::Pfrd, ACTION, &branches), Ok(vec![1]));
}

#[test]
fn pfrd_with_nothing_available() {
    let branches = [avail(0), avail(0)];
    for p in [Policy::Pfrd, Policy::EpPfrd, Policy::MspPfrd] {
        assert_eq!(p.select(CREATE, &branches, &mut NoRng), Err(Errno::ENOSPC));
        assert_eq!(p.select(SEARCH, &branches, &mut NoRng), Ok(vec![0]));
        assert_eq!(p.select(ACTION, &branches, &mut NoRng), Ok(vec![0]));
    }
}

#[test]
fn pfrd_handles_sums_beyond_u64() {
    let branches = [
        Candidate {
            avail: u64::MAX,
            ..br()
        },
        Candidate {
            avail: u64::MAX,
            ..br()
        },
    ];
    let mut rng = FakeRng::low();
    assert_eq!(
        Policy::Pfrd.select(CREATE, &branches, &mut rng),
        Ok(vec![0])
    );
    assert_eq!(rng.asked, [u64::MAX - 1]);
    assert_eq!(sel_high(Policy::Pfrd, CREATE, &branches), Ok(vec![1]));
}

#[test]
fn rand_is_uniform_among_eligible() {
    let branches = [
        mode(BranchMode::RO),
        missing(Some(1)),
        br(),
        mode(BranchMode::NC),
        br(),
        missing(None),
    ];
    let cases = [
        // (policy, want, eligible)
        (Policy::Rand, CREATE, vec![1, 2, 4]),
        (Policy::Rand, CREATE_MANY, vec![1, 2, 4]),
        (Policy::Rand, ACTION, vec![2, 3, 4]),
        (Policy::Rand, SEARCH, vec![0, 2, 3, 4]),
        (Policy::EpRand, CREATE, vec![2, 4]),
        (Policy::EpRand, CREATE_MANY, vec![2, 4]),
        (Policy::EpRand, ACTION, vec![2, 3, 4]),
        (Policy::EpRand, SEARCH, vec![0, 2, 3, 4]),
    ];
    for (p, want, eligible) in cases {
        let mut rng = FakeRng::low();
        assert_eq!(p.select(want, &branches, &mut rng), Ok(vec![eligible[0]]));
        assert_eq!(rng.asked, [eligible.len() as u64], "{p} {want:?}");
        let last = *eligible.last().unwrap();
        assert_eq!(sel_high(p, want, &branches), Ok(vec![last]), "{p} {want:?}");
        for (k, &i) in eligible.iter().enumerate() {
            assert_eq!(p.select(want, &branches, &mut Fixed(k as u64)), Ok(vec![i]));
        }
    }
}

#[test]
fn deterministic_policies_never_consult_the_rng() {
    let branches = [avail(10), used(10), mtime(Some(1)), missing(Some(1)), br()];
    for p in every_policy_but_erofs() {
        if matches!(
            p,
            Policy::Rand | Policy::EpRand | Policy::Pfrd | Policy::EpPfrd | Policy::MspPfrd
        ) {
            continue;
        }
        for want in WANTS {
            assert!(p.select(want, &branches, &mut NoRng).is_ok(), "{p}");
        }
    }
}

#[test]
fn results_are_valid_indexes_for_every_policy() {
    let branches = [
        mode(BranchMode::RO),
        full(br()),
        missing(Some(2)),
        avail(7),
        used(3),
        mtime(Some(4)),
        mode(BranchMode::NC),
        missing(None),
    ];
    for p in every_policy_but_erofs() {
        for want in WANTS {
            for high in [false, true] {
                let got = if high {
                    sel_high(p, want, &branches)
                } else {
                    sel(p, want, &branches)
                }
                .unwrap();
                assert!(got.windows(2).all(|w| w[0] < w[1]), "{p} {got:?}");
                for i in got {
                    let c = &branches[i];
                    match want {
                        Want::Search => assert!(c.exists()),
                        Want::Action => {
                            assert!(c.exists() && c.mode != BranchMode::RO)
                        }
                        Want::Create { .. } => {
                            assert_eq!(c.mode, BranchMode::RW, "{p}");
                            assert!(c.avail >= c.min_free, "{p}");
                            assert!(c.missing_levels.is_some(), "{p}");
                            if is_ep(p) {
                                assert!(c.exists(), "{p}");
                            }
                            if is_msp(p) {
                                assert!(c.exists(), "{p}");
                            }
                        }
                    }
                }
            }
        }
    }
}
