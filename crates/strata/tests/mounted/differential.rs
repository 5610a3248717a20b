//! Differential tests: the same scripted scenario runs against the installed
//! `mergerfs` and against `strata` in union mode, each on its own fresh copy
//! of identical branch trees (small tmpfs mounts, so free-space policies are
//! deterministic). Every step's result (success and what it read, or the
//! errno) must match, and after every step the branches must hold the same
//! tree: relative paths, file types, contents, modes, link counts and
//! symlink targets (not inode numbers or times). At the end the merged views
//! of both mounts must match too.
//!
//! Where strata differs from mergerfs on purpose, the step says so with
//! [`Op::Deliberate`] (strata's expected result and why); the test checks that
//! the difference is still there, so the table never goes stale. Differences
//! that look like strata bugs are small separate tests marked `#[ignore =
//! "strata bug: ..."]`: `--run-ignored all` shows them failing until fixed.
//! `STRATA_DIFF_LOG=1` (with `--no-capture`) prints every step's results.
//!
//! The reference is Debian's mergerfs 2.33.5: its default create policy is
//! epmfs (strata's is pfrd, like newer mergerfs) and it has no `lup`, so every
//! scenario names its create policy. Its `minfreespace` defaults to 4G, so
//! both mounts get 1M. Do not feed it an unknown policy name at runtime
//! (`category.create=bogus`): 2.33.5 accepts it and then crashes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::common::*;

/// One step of a scenario, applied through the mount with std::fs calls.
/// Paths are relative to the mount root; `{bN}` in control values stands for
/// branch N's path (each mount has its own branches).
#[derive(Debug, Clone, Copy)]
enum Op {
    /// `fs::write`: create or truncate, then write.
    Write(&'static str, &'static str),
    /// Open with O_APPEND and write.
    Append(&'static str, &'static str),
    /// truncate(2) on the path: an action function, every copy.
    Truncate(&'static str, u64),
    /// ftruncate(2) on a descriptor opened for writing: the opened copy.
    FTruncate(&'static str, u64),
    Mkdir(&'static str),
    /// `mkdir -p`.
    MkdirAll(&'static str),
    Rename(&'static str, &'static str),
    /// Hard link: existing path, new path.
    Link(&'static str, &'static str),
    /// Symlink: target, new path.
    Symlink(&'static str, &'static str),
    Unlink(&'static str),
    Rmdir(&'static str),
    Chmod(&'static str, u32),
    /// Reads the whole file (the result is its content).
    Read(&'static str),
    Readlink(&'static str),
    /// lstat: type, permission bits, size of regular files, link count.
    Stat(&'static str),
    /// The sorted names of a directory.
    List(&'static str),
    /// Sets `user.mergerfs.KEY` on the control file.
    Set(&'static str, &'static str),
    /// Reads `user.mergerfs.KEY` from the control file.
    Get(&'static str),
    /// Which branches hold the path (looked at directly, as `b0 b2`).
    Where(&'static str),
    /// strata gives the second field where mergerfs does not, on purpose
    /// (the last field says why). Both the difference and strata's result
    /// are checked; [`Trees`] says whether the branches still match.
    Deliberate(&'static Op, Result<&'static str, i32>, Trees, &'static str),
}
use Op::*;

/// What a [`Op::Deliberate`] step does to the branch comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trees {
    /// Only the step's result differs; the branches must still match.
    Same,
    /// mergerfs changed what strata deliberately leaves alone: the paths the
    /// step names are left out of the branch and view comparisons from then on.
    Differ,
}

impl Op {
    /// The mount-relative paths the step names.
    fn paths(&self) -> Vec<&'static str> {
        match *self {
            Write(p, _) | Append(p, _) | Truncate(p, _) | FTruncate(p, _) => vec![p],
            Mkdir(p) | MkdirAll(p) | Unlink(p) | Rmdir(p) | Chmod(p, _) => vec![p],
            Read(p) | Readlink(p) | Stat(p) | List(p) | Where(p) => vec![p],
            Rename(a, b) | Link(a, b) => vec![a, b],
            Symlink(_, p) => vec![p],
            Set(..) | Get(..) => vec![],
            Deliberate(op, ..) => op.paths(),
        }
    }
}

/// Something put on a branch before mounting.
#[derive(Debug, Clone, Copy)]
enum Seed {
    /// Branch, path, permission bits (parents are created as needed).
    Dir(usize, &'static str, u32),
    /// Branch, path, content, permission bits.
    File(usize, &'static str, &'static str, u32),
    /// Branch, path, target.
    Symlink(usize, &'static str, &'static str),
}

struct Scenario {
    /// tmpfs size of each branch in MiB: decides mfs/lfs and friends.
    sizes: &'static [u64],
    /// Branch modes (RW, RO, NC); RW where missing.
    modes: &'static [&'static str],
    /// The create policy at mount time ("": the default).
    create: &'static str,
    /// More `-o` options for both, given before `category.create`.
    opts: &'static str,
    seed: &'static [Seed],
    steps: &'static [Op],
}

/// Success with what the step read (empty for steps that read nothing), or an errno.
type Outcome = Result<String, i32>;

/// One mount under test.
struct Side {
    mnt: PathBuf,
    control: PathBuf,
    branches: Vec<PathBuf>,
}

impl Side {
    fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.mnt.clone()
        } else {
            self.mnt.join(rel)
        }
    }

    /// `{bN}` → branch N's path.
    fn expand(&self, value: &str) -> String {
        let mut v = value.to_string();
        for (i, b) in self.branches.iter().enumerate().rev() {
            v = v.replace(&format!("{{b{i}}}"), &b.display().to_string());
        }
        v
    }

    /// Branch paths → `{bN}`, so values compare across the two mounts.
    fn abstract_paths(&self, value: &str) -> String {
        let mut v = value.to_string();
        for (i, b) in self.branches.iter().enumerate().rev() {
            v = v.replace(&b.display().to_string(), &format!("{{b{i}}}"));
        }
        v
    }

    fn apply(&self, op: &Op) -> Outcome {
        let io = |r: std::io::Result<()>| r.map(|()| String::new()).map_err(errno);
        match *op {
            Write(p, data) => io(fs::write(self.p(p), data)),
            Append(p, data) => io(fs::OpenOptions::new()
                .append(true)
                .open(self.p(p))
                .and_then(|mut f| f.write_all(data.as_bytes()))),
            Truncate(p, len) => {
                let c = std::ffi::CString::new(self.p(p).into_os_string().into_encoded_bytes())
                    .unwrap();
                // SAFETY: a valid NUL-terminated path.
                if unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) } == 0 {
                    Ok(String::new())
                } else {
                    Err(errno(std::io::Error::last_os_error()))
                }
            }
            FTruncate(p, len) => io(fs::OpenOptions::new()
                .write(true)
                .open(self.p(p))
                .and_then(|f| f.set_len(len))),
            Mkdir(p) => io(fs::create_dir(self.p(p))),
            MkdirAll(p) => io(fs::create_dir_all(self.p(p))),
            Rename(a, b) => io(fs::rename(self.p(a), self.p(b))),
            Link(a, b) => io(fs::hard_link(self.p(a), self.p(b))),
            Symlink(target, p) => io(std::os::unix::fs::symlink(target, self.p(p))),
            Unlink(p) => io(fs::remove_file(self.p(p))),
            Rmdir(p) => io(fs::remove_dir(self.p(p))),
            Chmod(p, mode) => io(fs::set_permissions(
                self.p(p),
                fs::Permissions::from_mode(mode),
            )),
            Read(p) => fs::read(self.p(p))
                .map(|d| String::from_utf8_lossy(&d).into_owned())
                .map_err(errno),
            Readlink(p) => fs::read_link(self.p(p))
                .map(|t| t.display().to_string())
                .map_err(errno),
            Stat(p) => fs::symlink_metadata(self.p(p))
                .map(|m| Entry::of(&m).to_string())
                .map_err(errno),
            List(p) => fs::read_dir(self.p(p))
                .and_then(|rd| {
                    let mut names = rd
                        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                        .collect::<std::io::Result<Vec<_>>>()?;
                    names.sort();
                    Ok(names.join(" "))
                })
                .map_err(errno),
            Set(key, value) => rustix::fs::setxattr(
                &self.control,
                format!("user.mergerfs.{key}").as_str(),
                self.expand(value).as_bytes(),
                rustix::fs::XattrFlags::empty(),
            )
            .map(|()| String::new())
            .map_err(|e| e.raw_os_error()),
            Get(key) => {
                let mut buf = vec![0u8; 4096];
                rustix::fs::getxattr(
                    &self.control,
                    format!("user.mergerfs.{key}").as_str(),
                    &mut buf,
                )
                .map(|n| self.abstract_paths(&String::from_utf8_lossy(&buf[..n])))
                .map_err(|e| e.raw_os_error())
            }
            Where(p) => Ok(self
                .branches
                .iter()
                .enumerate()
                .filter(|(_, b)| fs::symlink_metadata(b.join(p)).is_ok())
                .map(|(i, _)| format!("b{i}"))
                .collect::<Vec<_>>()
                .join(" ")),
            Deliberate(inner, ..) => self.apply(inner),
        }
    }
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("not an OS error: {e}"))
}

fn errname(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ENODATA => "ENODATA",
        libc::ENOTSUP => "ENOTSUP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ECONNABORTED => "ECONNABORTED",
        _ => return format!("errno {e}"),
    };
    name.to_string()
}

fn show(o: &Outcome) -> String {
    match o {
        Ok(s) if s.is_empty() => "ok".to_string(),
        Ok(s) => format!("ok {s:?}"),
        Err(e) => errname(*e),
    }
}

/// What the comparison sees of one object.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    nlink: u64,
    /// File content (or its length and hash when long), symlink target, or
    /// (for [`Op::Stat`]) a file's size.
    detail: String,
}

fn kind_name(kind: char) -> &'static str {
    match kind {
        'd' => "dir",
        'f' => "file",
        'l' => "symlink",
        _ => "other",
    }
}

impl Entry {
    /// What [`Op::Stat`] shows: a regular file's size, not its content.
    fn of(m: &fs::Metadata) -> Entry {
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            'd'
        } else if ft.is_file() {
            'f'
        } else if ft.is_symlink() {
            'l'
        } else {
            '?'
        };
        Entry {
            kind: kind_name(kind),
            mode: m.mode() & 0o7777,
            nlink: m.nlink(),
            detail: if ft.is_file() {
                format!("size {}", m.len())
            } else {
                String::new()
            },
        }
    }

    /// An object of a [`walk`] with link counts.
    fn of_obj(o: &Obj) -> Entry {
        let detail = match (&o.content, &o.target) {
            (Some(content), _) => content.clone(),
            (None, Some(target)) => format!("-> {}", target.display()),
            (None, None) => String::new(),
        };
        Entry {
            kind: kind_name(o.kind),
            mode: o.mode,
            nlink: o.nlink.expect("walked with link counts"),
            detail,
        }
    }
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:04o} nlink {}", self.kind, self.mode, self.nlink)?;
        if !self.detail.is_empty() {
            write!(f, " {}", self.detail)?;
        }
        Ok(())
    }
}

/// Every object under `root` (itself as "."), by relative path: types,
/// modes, link counts, contents and symlink targets (no owners, times or
/// xattrs).
fn entries(root: &Path) -> BTreeMap<String, Entry> {
    let detail = Detail {
        nlink: true,
        ..Detail::default()
    };
    walk(root, detail)
        .objs
        .iter()
        .map(|(p, o)| {
            let p = if p.is_empty() { "." } else { p.as_str() };
            (p.to_owned(), Entry::of_obj(o))
        })
        .collect()
}

/// Lines describing how `a` (mergerfs) and `b` (strata) differ.
fn tree_diff(label: &str, a: &BTreeMap<String, Entry>, b: &BTreeMap<String, Entry>) -> String {
    let mut out = String::new();
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let (x, y) = (a.get(k), b.get(k));
        if x != y {
            let s = |e: Option<&Entry>| e.map_or("(absent)".to_string(), |e| e.to_string());
            let _ = writeln!(out, "    {label}{k}: mergerfs {} | strata {}", s(x), s(y));
        }
    }
    out
}

/// The tree of every branch, without the paths in `skip`.
fn branch_trees(side: &Side, skip: &BTreeSet<String>) -> Vec<BTreeMap<String, Entry>> {
    side.branches
        .iter()
        .map(|b| without(entries(b), skip))
        .collect()
}

fn without(mut tree: BTreeMap<String, Entry>, skip: &BTreeSet<String>) -> BTreeMap<String, Entry> {
    tree.retain(|k, _| !skip.contains(k));
    tree
}

fn seed(branches: &TmpfsBranches, seeds: &[Seed]) {
    for s in seeds {
        match *s {
            Seed::Dir(i, p, mode) => {
                let path = branches.path(i).join(p);
                fs::create_dir_all(&path).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            }
            Seed::File(i, p, content, mode) => {
                let path = branches.path(i).join(p);
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                fs::write(&path, content).unwrap();
                fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            }
            Seed::Symlink(i, p, target) => {
                let path = branches.path(i).join(p);
                fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::os::unix::fs::symlink(target, &path).unwrap();
            }
        }
    }
}

/// Runs `sc` against both and panics with every difference found.
fn run(sc: &Scenario) {
    mergerfs_bin();
    // Branches first: they must outlive the mounts on them.
    let mb = TmpfsBranches::new(sc.sizes);
    let sb = TmpfsBranches::new(sc.sizes);
    seed(&mb, sc.seed);
    seed(&sb, sc.seed);
    let create = match sc.create {
        "" => String::new(),
        p => format!("category.create={p},"),
    };
    let shared = format!("{}{create}minfreespace=1M", sc.opts);
    // The reference without kernel caches (no page cache, no attribute or
    // name cache), so what it shows is what its branches hold: with
    // mergerfs's per-path node ids a chmod through one hard link would
    // otherwise leave the other link's cached mode stale for a second.
    let merger = MergerfsMount::new(
        &mb.spec(sc.modes),
        &[&shared, "cache.files=off,cache.attr=0,cache.entry=0"],
    );
    let strata_spec = sb.spec(sc.modes);
    let strata = Mounted::build_source(&[&shared], &[], |_| strata_spec);
    let sides = [
        Side {
            mnt: merger.mnt.clone(),
            control: merger.m(".mergerfs"),
            branches: (0..mb.len()).map(|i| mb.path(i)).collect(),
        },
        Side {
            mnt: strata.mnt.clone(),
            control: strata.m(".strata"),
            branches: (0..sb.len()).map(|i| sb.path(i)).collect(),
        },
    ];
    let [m, s] = &sides;
    let mut skip = BTreeSet::new();
    assert_eq!(
        branch_trees(m, &skip),
        branch_trees(s, &skip),
        "seeded branches differ"
    );

    let mut failures = String::new();
    let mut log = String::new();
    let mut trees_diverged = false;
    for (n, op) in sc.steps.iter().enumerate() {
        let mo = m.apply(op);
        let so = s.apply(op);
        let _ = writeln!(
            log,
            "  {n:>3} {op:?}: mergerfs {} | strata {}",
            show(&mo),
            show(&so)
        );
        match op {
            Deliberate(_, expected, trees, why) => {
                let expected = expected.map(str::to_string);
                if so != expected {
                    let _ = writeln!(
                        failures,
                        "step {n} {op:?}: strata gave {}, the deliberate difference ({why}) says {}",
                        show(&so),
                        show(&expected)
                    );
                }
                if mo == so {
                    let _ = writeln!(
                        failures,
                        "step {n} {op:?}: both gave {}: not a difference any more, make it a plain step",
                        show(&so)
                    );
                }
                if *trees == Trees::Differ {
                    skip.extend(op.paths().into_iter().map(str::to_string));
                }
            }
            _ if mo != so => {
                let _ = writeln!(
                    failures,
                    "step {n} {op:?}: mergerfs {} | strata {}",
                    show(&mo),
                    show(&so)
                );
            }
            _ => {}
        }
        if !trees_diverged {
            let (mt, st) = (branch_trees(m, &skip), branch_trees(s, &skip));
            if mt != st {
                trees_diverged = true;
                let mut diff = String::new();
                for (i, (a, b)) in mt.iter().zip(&st).enumerate() {
                    diff += &tree_diff(&format!("b{i}/"), a, b);
                }
                let _ = write!(
                    failures,
                    "branches differ after step {n} {op:?} (later steps not compared):\n{diff}"
                );
            }
        }
    }
    let (mv, sv) = (
        without(entries(&m.mnt), &skip),
        without(entries(&s.mnt), &skip),
    );
    if mv != sv {
        let _ = write!(
            failures,
            "merged views differ at the end:\n{}",
            tree_diff("mnt/", &mv, &sv)
        );
    }
    if !failures.is_empty() {
        panic!(
            "strata differs from mergerfs (create={}, modes {:?}):\n{failures}\nall steps:\n{log}\nmergerfs output:\n{}\nstrata log:\n{}",
            sc.create,
            sc.modes,
            merger.log(),
            strata.log()
        );
    }
    if std::env::var_os("STRATA_DIFF_LOG").is_some() {
        eprintln!("create={} modes {:?}:\n{log}", sc.create, sc.modes);
    }
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// Free space b0 24 MiB, b1 32 MiB, b2 16 MiB: ff picks b0, mfs b1, lfs b2.
const SIZES: &[u64] = &[24, 32, 16];

/// Directories on some branches only, a file on two, a symlink, an empty dir.
const SEED: &[Seed] = &[
    Seed::File(0, "root0", "zero", 0o644),
    Seed::File(0, "shared", "s0", 0o644),
    Seed::File(1, "shared", "s1-longer", 0o640),
    Seed::Dir(0, "d01", 0o755),
    Seed::Dir(1, "d01", 0o755),
    Seed::File(1, "d01/f1", "f1 content", 0o644),
    Seed::Dir(0, "d0", 0o750),
    Seed::File(0, "d0/keep", "k", 0o600),
    Seed::Dir(1, "d1", 0o700),
    Seed::Dir(1, "d12", 0o755),
    Seed::Dir(2, "d12", 0o755),
    Seed::File(2, "d12/f2", "f2 content", 0o644),
    Seed::Dir(2, "d2", 0o750),
    Seed::Dir(2, "d2/sub", 0o755),
    Seed::File(2, "d2/sub/deep", "deep", 0o644),
    Seed::Symlink(2, "ln", "root0"),
    Seed::Dir(2, "empty2", 0o755),
    Seed::File(1, "rsrc", "src", 0o644),
    Seed::File(0, "rdst", "dst0", 0o644),
    Seed::File(2, "rdst", "dst2", 0o644),
];

/// The per-policy script: creates, mkdir -p, renames, links, symlinks,
/// metadata and size changes, writes, removals, and the usual errors.
const STEPS: &[Op] = &[
    // Creates: the root exists everywhere; d0 on b0, d1 on b1, d12 on
    // b1+b2, d2/sub on b2 only (path preservation vs path cloning).
    Write("new", "n"),
    Write("d0/a", "a"),
    Write("d1/a", "a"),
    Write("d12/a", "a"),
    Write("d2/sub/a", "a"),
    Write("d01/a", "a"),
    MkdirAll("a/b/c"),
    MkdirAll("d1/x/y"),
    MkdirAll("d2/sub/p/q"),
    Mkdir("d12/m"),
    Write("a/b/c/f", "f"),
    Where("new"),
    Where("d0/a"),
    Where("d1/a"),
    Where("d12/a"),
    Where("d2/sub/a"),
    Where("a/b/c"),
    Where("d12/m"),
    Symlink("../root0", "d0/sym"),
    Symlink("dangling", "d12/sym"),
    Readlink("d12/sym"),
    Stat("d0/sym"),
    // Renames: same directory, into a directory on another branch only,
    // between directories on disjoint branches, a file on two branches,
    // directories, over an existing file, and a missing source.
    Rename("new", "new2"),
    Rename("new2", "d1/new"),
    Rename("d0/a", "d12/from-d0"),
    Rename("d12/a", "d0/from-d12"),
    Rename("shared", "shared2"),
    Rename("d2/sub", "d0/sub"),
    Rename("d01", "d01-renamed"),
    Rename("d1/a", "root0-over"),
    Rename("root0-over", "root0"),
    Rename("missing", "x"),
    Rename("d12", "d12/inside"),
    // (A name on two branches into a directory on one of them:
    // `rename_into_a_directory_on_fewer_branches_*`.)
    // The target is removed from branches the source is not on.
    Rename("rsrc", "rdst"),
    Read("rdst"),
    // Hard links: same directory, into a directory on another branch, a
    // symlink, a missing source, over an existing name.
    Link("d01-renamed/f1", "d01-renamed/f1-link"),
    Link("d12/f2", "d1/f2-link"),
    Link("d12/f2", "d0/f2-link"),
    Link("ln", "ln-link"),
    Link("missing", "y"),
    Link("d12/f2", "shared2"),
    // Metadata and sizes.
    Chmod("shared2", 0o600),
    Chmod("d12", 0o711),
    Chmod("ln", 0o600),
    Truncate("shared2", 1),
    FTruncate("d12/f2", 2),
    Append("root0", "+more"),
    Write("d01-renamed/f1-link", "rewritten"),
    Read("root0"),
    Read("shared2"),
    Read("d01-renamed/f1"),
    Read("d12/f2"),
    Read("d1/f2-link"),
    Read("ln"),
    Stat("shared2"),
    Stat("d12"),
    Stat("d12/f2"),
    Stat("ln"),
    List(""),
    List("d0"),
    List("d12"),
    List("d01-renamed"),
    // Removals and the usual errors.
    Unlink("shared2"),
    Unlink("missing"),
    Unlink("d12"),
    Rmdir("a/b/c"),
    Rmdir("a/b"),
    Unlink("a/b/c/f"),
    Rmdir("a/b/c"),
    Rmdir("empty2"),
    // A directory on several branches, emptied first: gone from all. (One
    // that is empty on some branches only is `rmdir_partly_empty_directory`.)
    Unlink("d01-renamed/a"),
    Unlink("d01-renamed/f1"),
    Unlink("d01-renamed/f1-link"),
    Rmdir("d01-renamed"),
    Rmdir("root0"),
    Rmdir("missing"),
    Mkdir("d12"),
    Mkdir("missing/x"),
    Write("d12", "x"),
    Write("missing/x", "x"),
    Unlink("ln"),
    Unlink("ln-link"),
    Read("ln"),
    // (A file on one branch and a directory of that name on another:
    // `unlink_of_a_file_shadowing_a_directory`.)
    List(""),
];

fn policy_scenario(create: &'static str) -> Scenario {
    Scenario {
        sizes: SIZES,
        modes: &[],
        create,
        opts: "",
        seed: SEED,
        steps: STEPS,
    }
}

#[test]
fn ff() {
    run(&policy_scenario("ff"));
}

#[test]
fn epff() {
    run(&policy_scenario("epff"));
}

#[test]
fn mfs() {
    run(&policy_scenario("mfs"));
}

#[test]
fn epmfs() {
    run(&policy_scenario("epmfs"));
}

#[test]
fn lfs() {
    run(&policy_scenario("lfs"));
}

#[test]
fn eplfs() {
    run(&policy_scenario("eplfs"));
}

/// b0 RW (small), b1 NC and b2 RO (both big, so mfs would pick them).
const MODES_SEED: &[Seed] = &[
    Seed::File(0, "both", "rw", 0o644),
    Seed::File(2, "both", "ro", 0o644),
    Seed::File(1, "on-nc", "nc", 0o644),
    Seed::Dir(1, "ncdir", 0o755),
    Seed::File(1, "ncdir/f", "ncf", 0o644),
    Seed::File(2, "on-ro", "ro", 0o644),
    Seed::Dir(2, "rodir", 0o750),
    Seed::File(2, "rodir/f", "rof", 0o644),
    Seed::Dir(2, "roempty", 0o755),
    Seed::Dir(2, "roempty2", 0o755),
];

const MODES_STEPS: &[Op] = &[
    // New names go to the RW branch only.
    Write("new", "x"),
    Mkdir("newdir"),
    Symlink("new", "newlink"),
    // Existing files on NC stay writable, renamable, linkable.
    Write("on-nc", "changed"),
    Append("ncdir/f", "+"),
    Rename("on-nc", "nc-renamed"),
    Link("nc-renamed", "nc-link"),
    Chmod("nc-renamed", 0o600),
    // RO is never changed.
    Read("on-ro"),
    Unlink("on-ro"),
    Chmod("on-ro", 0o600),
    Rename("on-ro", "ro-renamed"),
    Truncate("on-ro", 0),
    Link("on-ro", "ro-link"),
    Rmdir("roempty2"),
    // A name on RW and RO: actions reach the RW copy only, and the RO copy
    // shows through afterwards.
    Chmod("both", 0o640),
    Unlink("both"),
    Read("both"),
    Stat("both"),
    // Directories only on RO get cloned onto RW for new names (mfs).
    Write("rodir/new", "x"),
    MkdirAll("roempty/sub/deeper"),
    Rmdir("roempty"),
    Write("ncdir/new", "x"),
    // Path-preserving: a directory only on NC/RO has no eligible branch.
    Set("category.create", "epmfs"),
    Write("rodir/ep", "x"),
    Write("ncdir/ep", "x"),
    Mkdir("ncdir/epdir"),
    Write("roempty2/ep", "x"),
    Set("category.create", "ff"),
    Write("roempty2/ff", "x"),
    List(""),
    List("rodir"),
    List("ncdir"),
    // Existing files on RO: mergerfs 2.33.5 opens them with the search
    // policy, which ignores branch modes, so it writes them.
    Deliberate(
        &Write("on-ro", "no"),
        Err(libc::EROFS),
        Trees::Differ,
        "README: an RO branch is never written, opening for writing gives EROFS",
    ),
    Deliberate(
        &Append("rodir/f", "+"),
        Err(libc::EROFS),
        Trees::Differ,
        "README: an RO branch is never written",
    ),
    Deliberate(
        &FTruncate("both", 0),
        Err(libc::EROFS),
        Trees::Differ,
        "README: an RO branch is never written",
    ),
    Deliberate(
        &Read("on-ro"),
        Ok("ro"),
        Trees::Differ,
        "strata kept the RO file as it was",
    ),
];

#[test]
fn branch_modes_rw_nc_ro() {
    run(&Scenario {
        sizes: &[16, 64, 64],
        modes: &["RW", "NC", "RO"],
        create: "mfs",
        opts: "",
        seed: MODES_SEED,
        steps: MODES_STEPS,
    });
}

/// Policies, func overrides, minfreespace and branches changed at runtime
/// through the control file.
const RUNTIME_STEPS: &[Op] = &[
    Get("category.create"),
    Get("func.create"),
    Get("func.mkdir"),
    Write("p-ff", "x"),
    Set("category.create", "mfs"),
    Get("func.symlink"),
    Write("p-mfs", "x"),
    Set("category.create", "lfs"),
    Write("p-lfs", "x"),
    Set("category.create", "epff"),
    Write("d1/p-epff", "x"),
    Write("d12/p-epff", "x"),
    Set("category.create", "eplfs"),
    Write("d12/p-eplfs", "x"),
    Set("category.create", "epmfs"),
    Write("d12/p-epmfs", "x"),
    Write("d2/sub/p-epmfs", "x"),
    // minfreespace takes small branches out of the running.
    Set("minfreespace", "20M"),
    Get("minfreespace"),
    Set("category.create", "lfs"),
    Write("p-lfs20", "x"),
    Set("minfreespace", "1G"),
    Write("p-nospace", "x"),
    Mkdir("nospace"),
    Set("minfreespace", "lots"),
    Set("minfreespace", "1M"),
    Set("category.create", "erofs"),
    Write("erofs", "x"),
    Mkdir("erofs"),
    Symlink("t", "erofs"),
    // func.* overrides one function of a category. (Setting the category
    // afterwards resets them in mergerfs: `category_resets_func_overrides`.)
    Set("category.create", "ff"),
    Set("func.mkdir", "mfs"),
    Get("func.mkdir"),
    Get("func.create"),
    Mkdir("fm"),
    Write("fm/f", "x"),
    Set("func.mkdir", "epall"),
    Mkdir("d12/epall"),
    Set("func.mkdir", "all"),
    Mkdir("d1/all"),
    Set("func.symlink", "epall"),
    Symlink("t", "d12/sl"),
    // Action policies.
    Set("category.action", "epff"),
    Get("func.unlink"),
    Unlink("shared"),
    Read("shared"),
    Set("func.unlink", "epall"),
    Unlink("shared"),
    Read("shared"),
    // Unknown keys.
    Get("no.such.key"),
    Set("no.such.key", "1"),
    // Branch edits: drop b2, add it back read-only at the end.
    Set("branches", "-{b2}"),
    Get("branches"),
    List(""),
    Read("d12/f2"),
    Set("branches", "+>{b2}=RO"),
    Get("branches"),
    Read("d12/f2"),
    Unlink("d12/f2"),
    Set("branches", "={b0}:{b1}:{b2}"),
    Unlink("d12/f2"),
    List(""),
];

#[test]
fn runtime_policy_switches() {
    run(&Scenario {
        sizes: SIZES,
        modes: &[],
        create: "ff",
        opts: "",
        seed: SEED,
        steps: RUNTIME_STEPS,
    });
}

/// A name on b0 and b1 renamed into a directory that only b1 has. mergerfs:
/// non-path-preserving policies clone the directory onto b0 and rename both;
/// path-preserving ones rename on b1 and remove the copy that could not move
/// ("remove the source from all drives which failed to rename").
fn rename_into_a_directory_on_fewer_branches(create: &'static str) -> Scenario {
    Scenario {
        sizes: &[16, 16],
        modes: &[],
        create,
        opts: "",
        seed: &[
            Seed::File(0, "pair", "pair0", 0o644),
            Seed::File(1, "pair", "pair1", 0o644),
            Seed::Dir(1, "d1", 0o755),
        ],
        steps: &[
            Rename("pair", "d1/pair"),
            Read("d1/pair"),
            Stat("pair"),
            List(""),
            List("d1"),
        ],
    }
}

#[test]
fn rename_into_a_directory_on_fewer_branches_ff() {
    run(&rename_into_a_directory_on_fewer_branches("ff"));
}

#[test]
fn rename_into_a_directory_on_fewer_branches_epff() {
    run(&rename_into_a_directory_on_fewer_branches("epff"));
}

/// rmdir of a directory that is empty on b0 but not on b1: mergerfs removes
/// the empty copy and returns the first error, ENOTEMPTY ("unlink, rmdir:
/// return first error"); the directory is still there.
#[test]
fn rmdir_partly_empty_directory() {
    run(&Scenario {
        sizes: &[16, 16],
        modes: &[],
        create: "ff",
        opts: "",
        seed: &[
            Seed::Dir(0, "d", 0o755),
            Seed::Dir(1, "d", 0o755),
            Seed::File(1, "d/f", "f", 0o644),
        ],
        steps: &[Rmdir("d"), Stat("d"), List("d")],
    });
}

/// In mergerfs `category.X=P` sets every function of the category to P, so
/// an earlier `func.NAME=` is gone (on the command line too: options apply in
/// order).
#[test]
fn category_resets_func_overrides() {
    run(&Scenario {
        sizes: SIZES,
        modes: &[],
        create: "ff",
        opts: "func.mkdir=mfs,",
        seed: &[],
        steps: &[
            Get("func.mkdir"),
            Mkdir("at-mount"),
            Set("func.mkdir", "mfs"),
            Set("category.create", "lfs"),
            Get("func.mkdir"),
            Mkdir("after-set"),
        ],
    });
}

/// unlink of a name that is a file on b0 and a directory on b1. mergerfs
/// (action policy epall: every branch with the path) unlinks the file, gets
/// EISDIR from b1 and returns it ("unlink: return first error"). In strata
/// a name has one type, the first found's; the directory on b1 is another
/// object that the file hid, so the unlink succeeds and the directory then
/// shows through. The branches end up the same.
#[test]
fn unlink_of_a_file_shadowing_a_directory() {
    run(&Scenario {
        sizes: &[16, 16],
        modes: &[],
        create: "ff",
        opts: "",
        seed: &[
            Seed::File(0, "mixed", "file on b0", 0o644),
            Seed::Dir(1, "mixed", 0o755),
        ],
        steps: &[
            Stat("mixed"),
            Deliberate(
                &Unlink("mixed"),
                Ok(""),
                Trees::Same,
                "a strata name has one type: the file is unlinked, the directory it hid is not its copy",
            ),
            Stat("mixed"),
            List(""),
        ],
    });
}

/// Defaults and the control file itself, with no create policy given.
#[test]
fn defaults_and_control_file() {
    run(&Scenario {
        sizes: SIZES,
        modes: &[],
        create: "",
        opts: "",
        seed: &[],
        steps: &[
            Deliberate(
                &Get("category.create"),
                Ok("pfrd"),
                Trees::Same,
                "strata's default create policy is pfrd, like newer mergerfs; \
                 Debian's 2.33.5 still has epmfs",
            ),
            Get("category.action"),
            Get("category.search"),
            Get("func.getattr"),
            Get("func.rename"),
            Get("minfreespace"),
            // The control file is hidden from listings in both, under its
            // own name in each.
            List(""),
            Deliberate(
                &Stat(".strata"),
                Ok("file 0444 nlink 1 size 0"),
                Trees::Same,
                "strata's control file is /.strata (it takes the user.mergerfs.* names too)",
            ),
            Deliberate(
                &Stat(".mergerfs"),
                Err(libc::ENOENT),
                Trees::Same,
                "strata's control file is /.strata, not /.mergerfs",
            ),
        ],
    });
}
