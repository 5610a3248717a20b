//! Workspaces driven through the `Filesystem` trait, without mounting.

use std::ffi::OsStr;
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command};

use super::*;
use crate::overlay::LowerSpec;
use crate::stack::Stack;

const ROOT: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};

struct Setup {
    _dir: tempfile::TempDir,
    lower: PathBuf,
    upper: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    let upper = dir.path().join("upper");
    fs::create_dir_all(lower.join("d")).unwrap();
    fs::create_dir(&upper).unwrap();
    fs::write(lower.join("f"), b"lower").unwrap();
    fs::write(lower.join("d/a"), b"a").unwrap();
    Setup {
        lower,
        upper,
        _dir: dir,
    }
}

fn open(s: &Setup, branch: Option<&str>) -> std::result::Result<Stack<Workspace>, String> {
    Workspace::open(
        OverlayConfig::new(
            vec![LowerSpec::Host(s.lower.clone())],
            Some(s.upper.clone()),
        ),
        branch,
    )
    .map(Stack::new)
}

/// A process to bind: requests carrying its pid see its branch.
struct Proc(Child);
impl Proc {
    fn start() -> Proc {
        Proc(Command::new("sleep").arg("30").spawn().unwrap())
    }
    fn ctx(&self) -> Ctx {
        Ctx {
            uid: 0,
            gid: 0,
            pid: self.0.id(),
        }
    }
}
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctl(fs: &Stack<Workspace>, ctx: &Ctx, key: &str, value: &str) -> Result<()> {
    fs.setxattr(
        ctx,
        CONTROL_ID,
        OsStr::new(&format!("user.strata.{key}")),
        value.as_bytes(),
        0,
    )
}

fn get(fs: &Stack<Workspace>, ctx: &Ctx, key: &str) -> String {
    let x = fs
        .getxattr(
            ctx,
            CONTROL_ID,
            OsStr::new(&format!("user.strata.{key}")),
            4096,
        )
        .unwrap();
    match x {
        Xattr::Data(v) => String::from_utf8(v).unwrap(),
        Xattr::Size(_) => panic!("asked with a size"),
    }
}

fn ino(fs: &Stack<Workspace>, ctx: &Ctx, p: &str) -> Result<u64> {
    let mut id = ROOT_ID;
    for c in p.split('/') {
        id = fs.lookup(ctx, id, OsStr::new(c))?.entry()?.attr.ino;
    }
    Ok(id)
}

fn read(fs: &Stack<Workspace>, ctx: &Ctx, p: &str) -> Result<Vec<u8>> {
    let i = ino(fs, ctx, p)?;
    let o = fs.open(ctx, i, libc::O_RDONLY)?;
    let data = fs.read(ctx, i, o.fh, 0, 1 << 20);
    fs.release(ctx, i, o.fh)?;
    data
}

fn write(fs: &Stack<Workspace>, ctx: &Ctx, p: &str, data: &[u8]) {
    let (dir, name) = p
        .rsplit_once('/')
        .map_or((ROOT_ID, p), |(d, n)| (ino(fs, ctx, d).unwrap(), n));
    let (i, fh) = match fs.lookup(ctx, dir, OsStr::new(name)).unwrap().entry() {
        Ok(e) => {
            let o = fs
                .open(ctx, e.attr.ino, libc::O_WRONLY | libc::O_TRUNC)
                .unwrap();
            (e.attr.ino, o.fh)
        }
        Err(_) => {
            let (e, o) = fs
                .create(ctx, dir, OsStr::new(name), 0o100644, 0, libc::O_WRONLY)
                .unwrap();
            (e.attr.ino, o.fh)
        }
    };
    fs.write(ctx, i, fh, 0, data).unwrap();
    fs.release(ctx, i, fh).unwrap();
}

#[test]
fn a_plain_upper_gets_its_state_only_at_the_first_snapshot() {
    let s = setup();
    let fs = open(&s, None).unwrap();
    write(&fs, &ROOT, "f", b"v1");
    assert!(!s.upper.join(state::DIR).exists());
    assert_eq!(get(&fs, &ROOT, "branch"), "main");
    ctl(&fs, &ROOT, "snapshot.create", "s1").unwrap();
    assert!(State::path(&s.upper).is_file());
    // The upper's root is now the frozen layer 0; main writes on in layer 1.
    write(&fs, &ROOT, "f", b"v2");
    assert_eq!(fs::read(s.upper.join("f")).unwrap(), b"v1");
    assert_eq!(fs::read(s.upper.join(".strata/layers/1/f")).unwrap(), b"v2");
    // The mount never shows the workspace's directory.
    assert_eq!(
        fs.lookup(&ROOT, ROOT_ID, OsStr::new(".strata"))
            .unwrap()
            .entry()
            .unwrap()
            .attr
            .ino,
        CONTROL_ID
    );
}

#[test]
fn branches_diverge_and_each_bound_process_sees_its_own() {
    let s = setup();
    let fs = open(&s, None).unwrap();
    write(&fs, &ROOT, "f", b"base");
    ctl(&fs, &ROOT, "snapshot.create", "cp").unwrap();
    ctl(&fs, &ROOT, "branch.create", "try-a cp").unwrap();
    ctl(&fs, &ROOT, "branch.create", "try-b cp").unwrap();
    let (a, b) = (Proc::start(), Proc::start());
    ctl(&fs, &ROOT, "branch.bind", &format!("try-a {}", a.0.id())).unwrap();
    ctl(&fs, &ROOT, "branch.bind", &format!("try-b {}", b.0.id())).unwrap();
    assert_eq!(get(&fs, &a.ctx(), "branch"), "try-a");
    assert_eq!(get(&fs, &b.ctx(), "branch"), "try-b");

    write(&fs, &a.ctx(), "f", b"fix A");
    write(&fs, &a.ctx(), "only-a", b"a");
    write(&fs, &b.ctx(), "f", b"fix B, longer");
    fs.unlink(&b.ctx(), ino(&fs, &b.ctx(), "d").unwrap(), OsStr::new("a"))
        .unwrap();
    write(&fs, &ROOT, "f", b"main moved on");

    for _ in 0..3 {
        assert_eq!(read(&fs, &a.ctx(), "f").unwrap(), b"fix A");
        assert_eq!(read(&fs, &b.ctx(), "f").unwrap(), b"fix B, longer");
        assert_eq!(read(&fs, &ROOT, "f").unwrap(), b"main moved on");
        assert_eq!(read(&fs, &a.ctx(), "only-a").unwrap(), b"a");
        assert_eq!(read(&fs, &b.ctx(), "only-a").unwrap_err(), Errno::ENOENT);
        assert_eq!(read(&fs, &a.ctx(), "d/a").unwrap(), b"a");
        assert_eq!(read(&fs, &b.ctx(), "d/a").unwrap_err(), Errno::ENOENT);
    }
    // A node belongs to one branch: ids differ, root names are not cached.
    let ia = ino(&fs, &a.ctx(), "f").unwrap();
    let ib = ino(&fs, &b.ctx(), "f").unwrap();
    assert_ne!(ia, ib);
    let e = fs
        .lookup(&a.ctx(), ROOT_ID, OsStr::new("f"))
        .unwrap()
        .entry()
        .unwrap();
    assert_eq!(e.entry_ttl, Duration::ZERO);
    let e = fs.lookup(&a.ctx(), ino(&fs, &a.ctx(), "d").unwrap(), OsStr::new("a"));
    assert!(e.unwrap().entry().unwrap().entry_ttl > Duration::ZERO);
    // A rename across branches is refused.
    let da = ino(&fs, &a.ctx(), "d").unwrap();
    let db = ino(&fs, &b.ctx(), "d").unwrap();
    assert_eq!(
        fs.rename(&ROOT, da, OsStr::new("a"), db, OsStr::new("x"), 0)
            .unwrap_err(),
        Errno::EXDEV
    );
}

#[test]
fn snapshots_and_branches_survive_a_remount() {
    let s = setup();
    {
        let fs = open(&s, None).unwrap();
        write(&fs, &ROOT, "f", b"one");
        ctl(&fs, &ROOT, "snapshot.create", "s1").unwrap();
        write(&fs, &ROOT, "f", b"two");
        ctl(&fs, &ROOT, "snapshot.create", "s2").unwrap();
        write(&fs, &ROOT, "f", b"three");
        ctl(&fs, &ROOT, "branch.create", "old s1").unwrap();
        // One daemon per workspace.
        let second = open(&s, None).err().expect("a second daemon is refused");
        assert!(second.contains("in use"), "{second}");
    }
    let fs = open(&s, None).unwrap();
    assert_eq!(read(&fs, &ROOT, "f").unwrap(), b"three");
    let st = State::open(&s.upper, false).unwrap().unwrap();
    let names: Vec<String> = st
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["s1", "s2"]);
    assert_eq!(st.snapshot("s2").unwrap().parent.as_deref(), Some("s1"));
    drop(fs);
    let fs = open(&s, Some("old")).unwrap();
    assert_eq!(read(&fs, &ROOT, "f").unwrap(), b"one");
    assert_eq!(get(&fs, &ROOT, "branch"), "old");
}

#[test]
fn switch_changes_what_unbound_callers_see() {
    let s = setup();
    let fs = open(&s, None).unwrap();
    ctl(&fs, &ROOT, "snapshot.create", "s1").unwrap();
    ctl(&fs, &ROOT, "branch.create", "alt s1").unwrap();
    write(&fs, &ROOT, "f", b"main");
    ctl(&fs, &ROOT, "branch.switch", "alt").unwrap();
    assert_eq!(read(&fs, &ROOT, "f").unwrap(), b"lower");
    assert_eq!(get(&fs, &ROOT, "branch"), "alt");
    drop(fs);
    // The switch is remembered.
    let fs = open(&s, None).unwrap();
    assert_eq!(get(&fs, &ROOT, "branch"), "alt");
}

#[test]
fn refusals_name_the_reason_and_change_nothing() {
    let s = setup();
    let fs = open(&s, None).unwrap();
    let user = Ctx {
        uid: 4242,
        gid: 4242,
        pid: 0,
    };
    assert_eq!(
        ctl(&fs, &user, "snapshot.create", "x").unwrap_err(),
        Errno::EPERM
    );
    assert_eq!(
        ctl(&fs, &ROOT, "snapshot.create", "../evil").unwrap_err(),
        Errno::EINVAL
    );
    assert_eq!(
        ctl(&fs, &ROOT, "snapshot.create", "123").unwrap_err(),
        Errno::EINVAL
    );
    ctl(&fs, &ROOT, "snapshot.create", "s1").unwrap();
    assert_eq!(
        ctl(&fs, &ROOT, "snapshot.create", "s1").unwrap_err(),
        Errno::EEXIST
    );
    assert_eq!(
        ctl(&fs, &ROOT, "branch.create", "b nope").unwrap_err(),
        Errno::ENOENT
    );
    ctl(&fs, &ROOT, "branch.create", "b s1").unwrap();
    assert_eq!(
        ctl(&fs, &ROOT, "snapshot.rm", "s1").unwrap_err(),
        Errno::EBUSY
    );
    assert_eq!(
        ctl(&fs, &ROOT, "branch.rm", "main").unwrap_err(),
        Errno::EBUSY
    );
    let p = Proc::start();
    ctl(&fs, &ROOT, "branch.bind", &format!("b {}", p.0.id())).unwrap();
    assert_eq!(ctl(&fs, &ROOT, "branch.rm", "b").unwrap_err(), Errno::EBUSY);
    // An unprivileged caller binds only its own processes.
    let other = Ctx {
        uid: 4242,
        gid: 4242,
        pid: std::process::id(),
    };
    ctl(
        &fs,
        &other,
        "branch.bind",
        &format!("b {}", std::process::id()),
    )
    .unwrap();
    let stranger = Ctx {
        uid: 4242,
        gid: 4242,
        pid: p.0.id(),
    };
    assert_eq!(
        ctl(
            &fs,
            &stranger,
            "branch.bind",
            &format!("b {}", std::process::id())
        )
        .unwrap_err(),
        Errno::EPERM
    );
    drop(p);
    // Once its process is gone, the branch can go; the snapshot then too.
    ctl(&fs, &ROOT, "branch.unbind", &std::process::id().to_string()).unwrap();
    ctl(&fs, &ROOT, "branch.rm", "b").unwrap();
    ctl(&fs, &ROOT, "snapshot.rm", "s1").unwrap();
    let st = State::open(&s.upper, false).unwrap().unwrap();
    assert!(st.snapshots().unwrap().is_empty());
    assert_eq!(st.branches().unwrap().len(), 1);
    // Only main's layers are left on disk.
    let layers: Vec<_> = fs::read_dir(s.upper.join(".strata/layers"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(layers.len(), 1, "{layers:?}");
}

#[test]
fn a_layer_directory_left_by_an_interrupted_change_is_removed_at_open() {
    let s = setup();
    {
        let fs = open(&s, None).unwrap();
        ctl(&fs, &ROOT, "snapshot.create", "s1").unwrap();
    }
    let orphan = s.upper.join(".strata/layers/99");
    fs::create_dir_all(orphan.join("sub")).unwrap();
    let _fs = open(&s, None).unwrap();
    assert!(!orphan.exists());
    assert!(s.upper.join(".strata/layers/1").is_dir());
}

#[test]
fn diff_lists_exactly_what_a_branch_changed() {
    use diff::{Change, Changed};
    let s = setup();
    fs::create_dir_all(s.lower.join("gone/deep")).unwrap();
    fs::write(s.lower.join("gone/deep/x"), b"x").unwrap();
    fs::write(s.lower.join("d/b"), b"b").unwrap();
    fs::write(s.lower.join("same"), b"same").unwrap();
    let fs = open(&s, None).unwrap();
    write(&fs, &ROOT, "same", b"same");
    ctl(&fs, &ROOT, "snapshot.create", "cp").unwrap();
    ctl(&fs, &ROOT, "branch.create", "try cp").unwrap();
    let p = Proc::start();
    ctl(&fs, &ROOT, "branch.bind", &format!("try {}", p.0.id())).unwrap();
    let c = p.ctx();
    write(&fs, &c, "f", b"changed");
    write(&fs, &c, "new", b"new");
    fs.mkdir(&c, ROOT_ID, OsStr::new("nd"), 0o755, 0).unwrap();
    write(&fs, &c, "nd/inside", b"i");
    fs.unlink(&c, ino(&fs, &c, "d").unwrap(), OsStr::new("a"))
        .unwrap();
    let set = SetAttr {
        mode: Some(0o600),
        ..Default::default()
    };
    fs.setattr(&c, ino(&fs, &c, "d/b").unwrap(), None, &set)
        .unwrap();
    for d in ["gone/deep/x", "gone/deep", "gone"] {
        let (dir, name) = d.rsplit_once('/').unwrap_or(("", d));
        let parent = if dir.is_empty() {
            ROOT_ID
        } else {
            ino(&fs, &c, dir).unwrap()
        };
        match d.ends_with('x') {
            true => fs.unlink(&c, parent, OsStr::new(name)).unwrap(),
            false => fs.rmdir(&c, parent, OsStr::new(name)).unwrap(),
        }
    }
    // Written again with the same bytes: not a change.
    write(&fs, &c, "same", b"same");
    let changes = diff::diff(&s.upper, "cp", "try").unwrap();
    let want = |p: &str, change| Changed {
        path: p.into(),
        change,
    };
    assert_eq!(
        changes,
        vec![
            want("d/a", Change::Deleted),
            want("d/b", Change::Modified),
            want("f", Change::Modified),
            want("gone", Change::Deleted),
            want("gone/deep", Change::Deleted),
            want("gone/deep/x", Change::Deleted),
            want("nd", Change::Added),
            want("nd/inside", Change::Added),
            want("new", Change::Added),
        ]
    );
    // The other way round, additions and deletions swap.
    let back = diff::diff(&s.upper, "try", "cp").unwrap();
    assert_eq!(back.len(), changes.len());
    assert!(
        back.iter()
            .any(|c| c.path == "new" && c.change == Change::Deleted)
    );
    assert!(
        diff::diff(&s.upper, "cp", "nope")
            .unwrap_err()
            .contains("nope")
    );
}

#[test]
fn a_branch_of_a_branch_snapshot_sees_that_branch_as_it_was() {
    let s = setup();
    let fs = open(&s, None).unwrap();
    ctl(&fs, &ROOT, "snapshot.create", "s1").unwrap();
    ctl(&fs, &ROOT, "branch.create", "a s1").unwrap();
    let p = Proc::start();
    ctl(&fs, &ROOT, "branch.bind", &format!("a {}", p.0.id())).unwrap();
    write(&fs, &p.ctx(), "f", b"a1");
    // A snapshot taken by a process bound to `a` is a snapshot of `a`.
    ctl(&fs, &p.ctx(), "snapshot.create", "a-s1").unwrap();
    write(&fs, &p.ctx(), "f", b"a2");
    ctl(&fs, &ROOT, "branch.create", "aa a-s1").unwrap();
    let q = Proc::start();
    ctl(&fs, &ROOT, "branch.bind", &format!("aa {}", q.0.id())).unwrap();
    assert_eq!(read(&fs, &q.ctx(), "f").unwrap(), b"a1");
    assert_eq!(read(&fs, &p.ctx(), "f").unwrap(), b"a2");
    assert_eq!(read(&fs, &ROOT, "f").unwrap(), b"lower");
    let st = State::open_read_only(&s.upper).unwrap();
    let snap = st.snapshot("a-s1").unwrap();
    assert_eq!(
        (snap.branch.as_str(), snap.parent.as_deref()),
        ("a", Some("s1"))
    );
    assert_eq!(st.branch("aa").unwrap().from.as_deref(), Some("a-s1"));
}

#[test]
fn workspace_directories_are_private_and_a_branch_root_looks_like_the_one_it_came_from() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    // The daemon's umask.
    rustix::process::umask(rustix::fs::Mode::empty());
    let s = setup();
    fs::set_permissions(&s.upper, fs::Permissions::from_mode(0o751)).unwrap();
    let fs = open(&s, None).unwrap();
    ctl(&fs, &ROOT, "snapshot.create", "s1").unwrap();
    ctl(&fs, &ROOT, "branch.create", "b s1").unwrap();
    let mode = |p: PathBuf| fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(s.upper.join(".strata")), 0o700);
    assert_eq!(mode(s.upper.join(".strata/layers")), 0o700);
    for layer in [1, 2] {
        assert_eq!(mode(s.upper.join(format!(".strata/layers/{layer}"))), 0o751);
    }
    let p = Proc::start();
    ctl(&fs, &ROOT, "branch.bind", &format!("b {}", p.0.id())).unwrap();
    for ctx in [ROOT, p.ctx()] {
        let a = fs.getattr(&ctx, ROOT_ID, None).unwrap().attr;
        assert_eq!(a.perm, 0o751);
    }
    assert!(
        fs::metadata(s.upper.join(".strata/state.db"))
            .unwrap()
            .mode()
            & 0o002
            == 0
    );
}
