//! The same scenarios, in-process through `dyn Filesystem`, for every mode
//! the core serves: a single host directory, a union of three branches, an
//! overlay over a host directory, an overlay over an image, and an overlay
//! over three host lowers (a union of read-only branches under an upper),
//! an overlay over a tar archive, and one over a view of the seed. A
//! mode may store things differently (branches, upper, whiteouts); what a
//! caller sees through the protocol must be the same. No mount, no kernel:
//! each scenario also checks that lookup references given back by `forget`
//! bring the inode table back to where it started and that no handle is
//! left open.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use strata_core::overlay::{LowerSpec, Overlay, OverlayConfig};
use strata_core::single::{SingleDir, SingleDirConfig};
use strata_core::source::{Branch, BranchMode};
use strata_core::stack::Stack;
use strata_core::union::{Settings, Union, UnionConfig};
use strata_core::workspace::Workspace;
use strata_core::*;

const ROOT: Ctx = Ctx {
    uid: 0,
    gid: 0,
    pid: 0,
};

#[derive(Clone, Copy, Debug)]
enum Mode {
    Single,
    Union3,
    OverlayHost,
    OverlayImage,
    /// Three host lowers merged under an upper: a union of read-only
    /// branches as the lower of an overlay.
    OverlayOf3,
    /// A tar of the seed under an upper.
    OverlayArchive,
    /// A view whose one map shows the seed at the root, under an upper.
    OverlayView,
    /// A workspace branch: the seed in a frozen layer (the upper as it was
    /// at a snapshot), the branch made from that snapshot and switched to.
    Branch,
}

/// The tree every mode starts from: `d/{a,b}`, `top`, `sub/deep/f`, and
/// a `.strata` the control file hides.
fn seed(root: &Path, part: Option<usize>) {
    // In a union, spread over the branches: `d` on all of them.
    let on = |branch: usize| part.is_none_or(|p| p == branch);
    fs::create_dir_all(root.join("d")).unwrap();
    if on(0) {
        fs::write(root.join("d/a"), b"a\n").unwrap();
        fs::create_dir_all(root.join("sub/deep")).unwrap();
        fs::write(root.join("sub/deep/f"), b"deep\n").unwrap();
    }
    if on(2) {
        fs::write(root.join("d/b"), b"b\n").unwrap();
    }
    if on(1) {
        fs::write(root.join("top"), b"top file\n").unwrap();
        // A user's file by the control file's name: the mount shows neither.
        fs::write(root.join(".strata"), b"hidden\n").unwrap();
    }
}

/// A filesystem under test, with the lookup references the test holds.
struct Client {
    fs: Box<dyn Filesystem>,
    mode: Mode,
    refs: Mutex<HashMap<u64, u64>>,
    baseline: u64,
    _dir: tempfile::TempDir,
}

fn make(mode: Mode) -> Client {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let fs: Box<dyn Filesystem> = match mode {
        Mode::Single => {
            seed(&p("src"), None);
            Box::new(Stack::new(
                SingleDir::new(
                    &p("src"),
                    SingleDirConfig {
                        watch: false,
                        passthrough: false,
                        ..Default::default()
                    },
                )
                .unwrap(),
            ))
        }
        Mode::Union3 => {
            let branches = (0..3)
                .map(|i| {
                    let b = p(&format!("b{i}"));
                    fs::create_dir(&b).unwrap();
                    seed(&b, Some(i));
                    Branch {
                        path: b,
                        mode: BranchMode::RW,
                        min_free: None,
                    }
                })
                .collect();
            let settings = Settings {
                min_free: 0,
                ..Default::default()
            };
            Box::new(Stack::new(
                Union::new(UnionConfig {
                    branches,
                    settings,
                    watch: false,
                    mountpoint: p("mnt"),
                    fd_cache: 64,
                    passthrough: false,
                })
                .unwrap(),
            ))
        }
        Mode::OverlayOf3 => {
            let lowers = (0..3)
                .map(|i| {
                    let l = p(&format!("l{i}"));
                    fs::create_dir(&l).unwrap();
                    seed(&l, Some(i));
                    LowerSpec::Host(l)
                })
                .collect();
            overlay(lowers, p("upper"))
        }
        Mode::Branch => {
            fs::create_dir(p("lower")).unwrap();
            fs::create_dir(p("upper")).unwrap();
            seed(&p("upper"), None);
            // The workspace keeps its state there (a file of that name
            // would be refused): the user's file sits in the lower.
            fs::rename(p("upper/.strata"), p("lower/.strata")).unwrap();
            let fs = Stack::new(
                Workspace::open(
                    OverlayConfig::new(vec![LowerSpec::Host(p("lower"))], Some(p("upper"))),
                    None,
                )
                .unwrap(),
            );
            for (k, v) in [
                ("snapshot.create", "s1"),
                ("branch.create", "b s1"),
                ("branch.switch", "b"),
            ] {
                let key = format!("user.strata.{k}");
                fs.setxattr(&ROOT, CONTROL_ID, os(&key), v.as_bytes(), 0)
                    .unwrap();
            }
            Box::new(fs)
        }
        Mode::OverlayHost | Mode::OverlayImage | Mode::OverlayArchive | Mode::OverlayView => {
            seed(&p("lower"), None);
            let lower = match mode {
                Mode::OverlayView => {
                    let spec = p("view.toml");
                    let text =
                        "[sources]\nseed = \"lower\"\n[[map]]\npath = \"\"\nfrom = \"seed\"\n";
                    fs::write(&spec, text).unwrap();
                    LowerSpec::View(spec)
                }
                Mode::OverlayArchive => {
                    let tar = std::process::Command::new("tar")
                        .arg("-C")
                        .arg(p("lower"))
                        .arg("-cf")
                        .arg(p("seed.tar"))
                        .arg(".")
                        .status()
                        .unwrap();
                    assert!(tar.success());
                    LowerSpec::Archive(p("seed.tar"))
                }
                Mode::OverlayImage => {
                    let store = strata_image::Store::open(&p("store")).unwrap();
                    let opts = strata_image::BuildOptions::default();
                    strata_image::build(&store, &p("lower"), "seed", opts, &mut |_| {}).unwrap();
                    LowerSpec::Image {
                        store: p("store"),
                        name: "seed".into(),
                    }
                }
                _ => LowerSpec::Host(p("lower")),
            };
            overlay(vec![lower], p("upper"))
        }
    };
    let baseline = fs.stats().inodes;
    Client {
        fs,
        mode,
        refs: Mutex::default(),
        baseline,
        _dir: dir,
    }
}

/// An overlay of `lowers` under a new upper directory `upper`, as every
/// overlay mode serves it.
fn overlay(lowers: Vec<LowerSpec>, upper: std::path::PathBuf) -> Box<dyn Filesystem> {
    fs::create_dir(&upper).unwrap();
    Box::new(Stack::new(
        Overlay::new(OverlayConfig::new(lowers, Some(upper))).unwrap(),
    ))
}

fn os(s: &str) -> &OsStr {
    OsStr::new(s)
}

struct Names(Vec<(OsString, u64, FileKind)>);
impl DirSink for Names {
    fn add(&mut self, ino: u64, _next: u64, kind: FileKind, name: &OsStr) -> bool {
        self.0.push((name.to_owned(), ino, kind));
        true
    }
}

struct Plus<'a>(&'a Client, Vec<(String, u64)>);
impl DirPlusSink for Plus<'_> {
    fn add(&mut self, _next: u64, name: &OsStr, e: &Entry) -> bool {
        let name = name.to_string_lossy().into_owned();
        if name != "." && name != ".." {
            self.0.took(e);
        }
        self.1.push((name, e.attr.ino));
        true
    }
}

impl Client {
    fn took(&self, e: &Entry) {
        *self.refs.lock().entry(e.attr.ino).or_default() += 1;
    }

    fn entry(&self, r: Result<Entry>) -> Result<Entry> {
        if let Ok(e) = &r {
            self.took(e);
        }
        r
    }

    fn lookup(&self, parent: u64, name: &str) -> Result<Entry> {
        self.entry(
            self.fs
                .lookup(&ROOT, parent, os(name))
                .and_then(Lookup::entry),
        )
    }

    /// The node at `path` (components joined by `/`; "" is the root).
    fn at(&self, path: &str) -> Result<u64> {
        let mut id = ROOT_ID;
        for c in path.split('/').filter(|c| !c.is_empty()) {
            id = self.lookup(id, c)?.attr.ino;
        }
        Ok(id)
    }

    /// (parent node, last component) of `path`.
    fn parent_of<'p>(&self, path: &'p str) -> (u64, &'p str) {
        match path.rsplit_once('/') {
            Some((dir, name)) => (self.at(dir).unwrap(), name),
            None => (ROOT_ID, path),
        }
    }

    fn attr(&self, path: &str) -> Result<Attr> {
        let id = self.at(path)?;
        Ok(self.fs.getattr(&ROOT, id, None)?.attr)
    }

    fn write(&self, path: &str, data: &[u8]) {
        let (parent, name) = self.parent_of(path);
        let (e, o) = self
            .fs
            .create(&ROOT, parent, os(name), 0o100644, 0, libc::O_WRONLY)
            .unwrap_or_else(|e| panic!("{:?}: create {path}: {e:?}", self.mode));
        self.took(&e);
        assert_eq!(
            self.fs.write(&ROOT, e.attr.ino, o.fh, 0, data).unwrap() as usize,
            data.len()
        );
        self.fs.release(&ROOT, e.attr.ino, o.fh).unwrap();
    }

    fn write_at(&self, path: &str, offset: u64, data: &[u8]) {
        let id = self.at(path).unwrap();
        let o = self.fs.open(&ROOT, id, libc::O_WRONLY).unwrap();
        self.fs.write(&ROOT, id, o.fh, offset, data).unwrap();
        self.fs.release(&ROOT, id, o.fh).unwrap();
    }

    fn read(&self, path: &str) -> Result<Vec<u8>> {
        let id = self.at(path)?;
        let o = self.fs.open(&ROOT, id, libc::O_RDONLY)?;
        let mut out = Vec::new();
        loop {
            let chunk = self.fs.read(&ROOT, id, o.fh, out.len() as u64, 4096)?;
            if chunk.is_empty() {
                break;
            }
            out.extend_from_slice(&chunk);
        }
        self.fs.release(&ROOT, id, o.fh)?;
        Ok(out)
    }

    /// Names in a directory (without `.`/`..`), sorted, by readdir.
    fn list(&self, path: &str) -> Vec<String> {
        let id = self.at(path).unwrap();
        let o = self.fs.opendir(&ROOT, id, 0).unwrap();
        let mut names = Names(Vec::new());
        self.fs.readdir(&ROOT, id, o.fh, 0, &mut names).unwrap();
        self.fs.releasedir(&ROOT, id, o.fh).unwrap();
        let mut v: Vec<String> = names
            .0
            .into_iter()
            .map(|(n, _, _)| n.into_string().unwrap())
            .filter(|n| n != "." && n != "..")
            .collect();
        v.sort();
        v
    }

    /// (name, node id) by readdirplus, which takes a reference per entry.
    fn list_plus(&self, path: &str) -> Vec<(String, u64)> {
        let id = self.at(path).unwrap();
        let o = self.fs.opendir(&ROOT, id, 0).unwrap();
        let mut plus = Plus(self, Vec::new());
        self.fs.readdirplus(&ROOT, id, o.fh, 0, &mut plus).unwrap();
        self.fs.releasedir(&ROOT, id, o.fh).unwrap();
        let mut v: Vec<_> = plus
            .1
            .into_iter()
            .filter(|(n, _)| n != "." && n != "..")
            .collect();
        v.sort();
        v
    }

    /// Gives every lookup reference back, as the kernel does on unmount or
    /// under memory pressure.
    fn forget_all(&self) {
        for (ino, n) in self.refs.lock().drain() {
            self.fs.forget(ino, n);
        }
    }

    /// The end of every scenario: no handle open, and the table back at
    /// its start once the references are given back.
    fn finish(self) {
        let stats = self.fs.stats();
        assert_eq!(
            (stats.open_files, stats.open_dirs),
            (0, 0),
            "{:?}: handles left open",
            self.mode
        );
        self.forget_all();
        assert_eq!(
            self.fs.stats().inodes,
            self.baseline,
            "{:?}: nodes left after forgetting",
            self.mode
        );
    }
}

fn err<T: std::fmt::Debug>(r: Result<T>) -> Errno {
    r.expect_err("an error")
}

// ---- scenarios -----------------------------------------------------------

fn seed_is_visible(c: &Client) {
    assert_eq!(c.list(""), ["d", "sub", "top"]);
    assert_eq!(c.list("d"), ["a", "b"]);
    assert_eq!(c.read("d/a").unwrap(), b"a\n");
    assert_eq!(c.read("d/b").unwrap(), b"b\n");
    assert_eq!(c.read("sub/deep/f").unwrap(), b"deep\n");
    let a = c.attr("top").unwrap();
    assert_eq!((a.kind, a.size), (FileKind::Regular, 9));
    assert_eq!(c.attr("d").unwrap().kind, FileKind::Directory);
    assert_eq!(err(c.lookup(ROOT_ID, "missing")), Errno::ENOENT);
    assert_eq!(err(c.lookup(c.at("d").unwrap(), "missing")), Errno::ENOENT);
    // A miss comes with how long the kernel may remember it: unwatched host
    // sources a second, a union none (as mergerfs), an image an hour.
    let Lookup::Missing { ttl } = c.fs.lookup(&ROOT, ROOT_ID, os("missing")).unwrap() else {
        panic!("{:?}: a missing name was found", c.mode)
    };
    let want = match c.mode {
        Mode::Union3 => 0,
        Mode::OverlayImage | Mode::OverlayArchive => 3600,
        Mode::Single | Mode::OverlayHost | Mode::OverlayOf3 | Mode::OverlayView | Mode::Branch => 1,
    };
    assert_eq!(ttl, Duration::from_secs(want), "{:?}", c.mode);
}

fn create_write_read(c: &Client) {
    c.write("new", b"hello");
    assert_eq!(c.read("new").unwrap(), b"hello");
    c.write_at("new", 5, b" world");
    assert_eq!(c.read("new").unwrap(), b"hello world");
    assert_eq!(c.attr("new").unwrap().size, 11);
    // Writing a file that came with the source (copy-up in an overlay).
    c.write_at("d/a", 2, b"more\n");
    assert_eq!(c.read("d/a").unwrap(), b"a\nmore\n");
    c.write("sub/deep/g", b"g");
    assert_eq!(c.list("sub/deep"), ["f", "g"]);
    // O_NOFOLLOW names the last component, which the kernel has resolved:
    // a regular file opens (image builders and rsync ask for it).
    for flags in [libc::O_RDONLY, libc::O_RDWR] {
        let id = c.at("d/b").unwrap();
        let o = c.fs.open(&ROOT, id, flags | libc::O_NOFOLLOW).unwrap();
        assert_eq!(c.fs.read(&ROOT, id, o.fh, 0, 16).unwrap(), b"b\n");
        c.fs.release(&ROOT, id, o.fh).unwrap();
    }
}

fn mkdir_and_rmdir(c: &Client) {
    let e = c
        .entry(c.fs.mkdir(&ROOT, ROOT_ID, os("x"), 0o755, 0))
        .unwrap();
    assert_eq!(e.attr.kind, FileKind::Directory);
    c.write("x/f", b"f");
    assert_eq!(err(c.fs.rmdir(&ROOT, ROOT_ID, os("x"))), Errno::ENOTEMPTY);
    c.fs.unlink(&ROOT, c.at("x").unwrap(), os("f")).unwrap();
    c.fs.rmdir(&ROOT, ROOT_ID, os("x")).unwrap();
    assert_eq!(err(c.lookup(ROOT_ID, "x")), Errno::ENOENT);
    // A directory of the source, emptied, then removed.
    assert_eq!(err(c.fs.rmdir(&ROOT, ROOT_ID, os("d"))), Errno::ENOTEMPTY);
    let d = c.at("d").unwrap();
    c.fs.unlink(&ROOT, d, os("a")).unwrap();
    c.fs.unlink(&ROOT, d, os("b")).unwrap();
    assert!(c.list("d").is_empty());
    c.fs.rmdir(&ROOT, ROOT_ID, os("d")).unwrap();
    assert_eq!(c.list(""), ["sub", "top"]);
    // And made again: empty, nothing of the old one shows through.
    c.entry(c.fs.mkdir(&ROOT, ROOT_ID, os("d"), 0o755, 0))
        .unwrap();
    assert!(c.list("d").is_empty());
}

fn renames(c: &Client) {
    c.fs.rename(&ROOT, ROOT_ID, os("top"), ROOT_ID, os("top2"), 0)
        .unwrap();
    assert_eq!(err(c.lookup(ROOT_ID, "top")), Errno::ENOENT);
    assert_eq!(c.read("top2").unwrap(), b"top file\n");
    // A whole directory of the source.
    c.fs.rename(&ROOT, ROOT_ID, os("d"), ROOT_ID, os("d2"), 0)
        .unwrap();
    assert_eq!(c.list("d2"), ["a", "b"]);
    assert_eq!(c.read("d2/b").unwrap(), b"b\n");
    assert_eq!(err(c.lookup(ROOT_ID, "d")), Errno::ENOENT);
    // Into another directory.
    let (sub, d2) = (c.at("sub").unwrap(), c.at("d2").unwrap());
    c.fs.rename(&ROOT, d2, os("a"), sub, os("a"), 0).unwrap();
    assert_eq!(c.list("sub"), ["a", "deep"]);
    // NOREPLACE and EXCHANGE.
    let noreplace = c.fs.rename(
        &ROOT,
        ROOT_ID,
        os("top2"),
        sub,
        os("a"),
        libc::RENAME_NOREPLACE,
    );
    assert_eq!(err(noreplace), Errno::EEXIST);
    // A union cannot swap names that live on different branches atomically
    // (here `top2` on the second, `sub/a` on the first): EXDEV, as for any
    // rename it cannot do in one host call; callers fall back.
    let exchange = || {
        c.fs.rename(
            &ROOT,
            ROOT_ID,
            os("top2"),
            sub,
            os("a"),
            libc::RENAME_EXCHANGE,
        )
    };
    match exchange() {
        Err(Errno::EXDEV) if matches!(c.mode, Mode::Union3) => {}
        r => {
            r.unwrap();
            assert_eq!(c.read("top2").unwrap(), b"a\n");
            assert_eq!(c.read("sub/a").unwrap(), b"top file\n");
            exchange().unwrap();
        }
    }
    // Over an existing file.
    c.fs.rename(&ROOT, ROOT_ID, os("top2"), sub, os("a"), 0)
        .unwrap();
    assert_eq!(c.read("sub/a").unwrap(), b"top file\n");
    assert_eq!(c.list(""), ["d2", "sub"]);
}

fn hard_links(c: &Client) {
    let a = c.at("d/a").unwrap();
    let e = c.entry(c.fs.link(&ROOT, a, ROOT_ID, os("a2"))).unwrap();
    assert_eq!(e.attr.ino, c.at("d/a").unwrap(), "both names, one node");
    assert_eq!(e.attr.nlink, 2);
    assert_eq!(c.attr("d/a").unwrap().nlink, 2);
    c.write_at("a2", 0, b"A");
    assert_eq!(c.read("d/a").unwrap(), b"A\n");
    c.fs.unlink(&ROOT, c.at("d").unwrap(), os("a")).unwrap();
    assert_eq!(c.read("a2").unwrap(), b"A\n");
    assert_eq!(c.attr("a2").unwrap().nlink, 1);
    assert_eq!(
        err(c.entry(c.fs.link(&ROOT, c.at("d").unwrap(), ROOT_ID, os("dl")))),
        Errno::EPERM
    );
}

fn symlinks(c: &Client) {
    let e = c
        .entry(c.fs.symlink(&ROOT, ROOT_ID, os("s"), Path::new("../outside/x")))
        .unwrap();
    assert_eq!(e.attr.kind, FileKind::Symlink);
    assert_eq!(c.fs.readlink(&ROOT, e.attr.ino).unwrap(), b"../outside/x");
    assert_eq!(c.attr("s").unwrap().size, 12);
    c.fs.rename(&ROOT, ROOT_ID, os("s"), c.at("d").unwrap(), os("s"), 0)
        .unwrap();
    assert_eq!(
        c.fs.readlink(&ROOT, c.at("d/s").unwrap()).unwrap(),
        b"../outside/x"
    );
}

fn xattrs(c: &Client) {
    let top = c.at("top").unwrap();
    c.fs.setxattr(&ROOT, top, os("user.k"), b"v1", 0).unwrap();
    assert_eq!(
        c.fs.getxattr(&ROOT, top, os("user.k"), 64).unwrap(),
        Xattr::Data(b"v1".to_vec())
    );
    assert_eq!(
        c.fs.getxattr(&ROOT, top, os("user.k"), 0).unwrap(),
        Xattr::Size(2)
    );
    assert_eq!(
        err(c.fs.getxattr(&ROOT, top, os("user.k"), 1)),
        Errno::ERANGE
    );
    let Xattr::Data(list) = c.fs.listxattr(&ROOT, top, 4096).unwrap() else {
        panic!("listxattr gave a size")
    };
    assert!(list.split(|b| *b == 0).any(|n| n == b"user.k"), "{list:?}");
    let create =
        c.fs.setxattr(&ROOT, top, os("user.k"), b"v2", libc::XATTR_CREATE);
    assert_eq!(err(create), Errno::EEXIST);
    c.fs.removexattr(&ROOT, top, os("user.k")).unwrap();
    assert_eq!(
        err(c.fs.getxattr(&ROOT, top, os("user.k"), 64)),
        Errno::ENODATA
    );
    assert_eq!(c.read("top").unwrap(), b"top file\n", "content kept");
}

fn setattr(c: &Client) {
    let top = c.at("top").unwrap();
    let when = UNIX_EPOCH + Duration::new(1_234_567_890, 5000);
    let set = SetAttr {
        mode: Some(0o600),
        size: Some(3),
        mtime: Some(SetTime::At(when)),
        ..Default::default()
    };
    let a = c.fs.setattr(&ROOT, top, None, &set).unwrap().attr;
    assert_eq!((a.perm, a.size, a.mtime), (0o600, 3, when));
    let a = c.attr("top").unwrap();
    assert_eq!((a.perm, a.size, a.mtime), (0o600, 3, when));
    assert_eq!(c.read("top").unwrap(), b"top");
    let set = SetAttr {
        uid: Some(65534),
        gid: Some(65534),
        ..Default::default()
    };
    let a =
        c.fs.setattr(&ROOT, c.at("d").unwrap(), None, &set)
            .unwrap()
            .attr;
    assert_eq!((a.uid, a.gid), (65534, 65534));
    assert_eq!(
        c.list("d"),
        ["a", "b"],
        "a directory's metadata change keeps its contents"
    );
    assert!(c.attr("d").unwrap().ctime > SystemTime::UNIX_EPOCH);
}

fn unlink_and_recreate(c: &Client) {
    c.fs.unlink(&ROOT, ROOT_ID, os("top")).unwrap();
    assert_eq!(err(c.lookup(ROOT_ID, "top")), Errno::ENOENT);
    assert_eq!(err(c.fs.unlink(&ROOT, ROOT_ID, os("top"))), Errno::ENOENT);
    assert_eq!(c.list(""), ["d", "sub"]);
    c.write("top", b"again");
    assert_eq!(c.read("top").unwrap(), b"again");
    assert_eq!(err(c.fs.unlink(&ROOT, ROOT_ID, os("d"))), Errno::EISDIR);
}

fn stable_ids_and_lookup_counts(c: &Client) {
    let ids_of = || -> Vec<u64> {
        ["d", "d/a", "d/b", "top", "sub/deep/f"]
            .iter()
            .map(|p| c.at(p).unwrap())
            .collect()
    };
    let ids = ids_of();
    let plus = c.list_plus("d");
    assert_eq!(plus, [("a".to_owned(), ids[1]), ("b".to_owned(), ids[2])]);
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "distinct objects, distinct ids");
    // Forgotten and looked up again: the same ids.
    c.forget_all();
    let again = ids_of();
    assert_eq!(again, ids);
    // After a write (a copy-up in an overlay) and a rename, still the same.
    c.write_at("d/a", 0, b"x");
    c.fs.rename(&ROOT, ids[0], os("a"), ROOT_ID, os("a-moved"), 0)
        .unwrap();
    assert_eq!(c.at("a-moved").unwrap(), ids[1]);
    assert_eq!(c.attr("a-moved").unwrap().ino, ids[1]);
}

fn open_handles_are_counted(c: &Client) {
    let top = c.at("top").unwrap();
    let handles: Vec<u64> = (0..3)
        .map(|_| c.fs.open(&ROOT, top, libc::O_RDONLY).unwrap().fh)
        .collect();
    let d = c.fs.opendir(&ROOT, ROOT_ID, 0).unwrap();
    let s = c.fs.stats();
    assert_eq!((s.open_files, s.open_dirs), (3, 1));
    for fh in handles {
        c.fs.release(&ROOT, top, fh).unwrap();
    }
    c.fs.releasedir(&ROOT, ROOT_ID, d.fh).unwrap();
}

/// `/.strata` in every mode: the common keys, refusals, and its name taken.
fn control_file(c: &Client) {
    let e = c.lookup(ROOT_ID, ".strata").unwrap();
    assert_eq!((e.attr.ino, e.attr.kind), (CONTROL_ID, FileKind::Regular));
    assert_eq!(e.attr.perm, 0o444);
    let get = |key: &str| match c.fs.getxattr(&ROOT, CONTROL_ID, os(key), 4096) {
        Ok(Xattr::Data(v)) => Ok(String::from_utf8(v).unwrap()),
        Ok(Xattr::Size(_)) => unreachable!("asked with a buffer"),
        Err(e) => Err(e),
    };
    assert_eq!(
        get("user.strata.version").unwrap(),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        get("user.mergerfs.pid").unwrap(),
        std::process::id().to_string()
    );
    assert!(!get("user.strata.layers").unwrap().is_empty());
    assert_eq!(get("user.strata.no-such-key"), Err(Errno::ENODATA));
    let Xattr::Data(list) = c.fs.listxattr(&ROOT, CONTROL_ID, 64 * 1024).unwrap() else {
        unreachable!("asked with a buffer")
    };
    let keys: Vec<&[u8]> = list.split(|b| *b == 0).collect();
    for k in ["version", "pid", "layers"] {
        assert!(keys.contains(&format!("user.strata.{k}").as_bytes()), "{k}");
    }
    assert_eq!(
        err(c
            .fs
            .setxattr(&ROOT, CONTROL_ID, os("user.strata.version"), b"9", 0)),
        Errno::EINVAL
    );
    let user = Ctx { uid: 1000, ..ROOT };
    assert_eq!(
        err(c
            .fs
            .setxattr(&user, CONTROL_ID, os("user.strata.pid"), b"1", 0)),
        Errno::EPERM
    );
    let o = c.fs.open(&ROOT, CONTROL_ID, libc::O_RDONLY).unwrap();
    assert_eq!(c.fs.read(&ROOT, CONTROL_ID, o.fh, 0, 100).unwrap(), b"");
    c.fs.release(&ROOT, CONTROL_ID, o.fh).unwrap();
    // Its name is taken: nothing is made, removed or moved there.
    let mode = 0o100644;
    assert_eq!(
        err(c.fs.create(&ROOT, ROOT_ID, os(".strata"), mode, 0, 0)),
        Errno::EEXIST
    );
    assert_eq!(
        err(c.fs.mkdir(&ROOT, ROOT_ID, os(".strata"), 0o755, 0)),
        Errno::EEXIST
    );
    assert_eq!(
        err(c.fs.unlink(&ROOT, ROOT_ID, os(".strata"))),
        Errno::EPERM
    );
    assert_eq!(
        err(c
            .fs
            .rename(&ROOT, ROOT_ID, os("top"), ROOT_ID, os(".strata"), 0)),
        Errno::EPERM
    );
    assert_eq!(c.read("top").unwrap(), b"top file\n");
    assert_eq!(c.list(""), ["d", "sub", "top"]);
    // The kernel forgets it like any node; the table never held it.
    c.fs.forget(CONTROL_ID, 1);
    c.refs.lock().remove(&CONTROL_ID);
}

fn run(mode: Mode, scenario: fn(&Client)) {
    let c = make(mode);
    scenario(&c);
    c.finish();
}

/// One test per (scenario, mode), named `scenario::mode`.
macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;
            #[test]
            fn single() { run(Mode::Single, super::$scenario) }
            #[test]
            fn union3() { run(Mode::Union3, super::$scenario) }
            #[test]
            fn overlay_host() { run(Mode::OverlayHost, super::$scenario) }
            #[test]
            fn overlay_image() { run(Mode::OverlayImage, super::$scenario) }
            #[test]
            fn overlay_of_3() { run(Mode::OverlayOf3, super::$scenario) }
            #[test]
            fn overlay_archive() { run(Mode::OverlayArchive, super::$scenario) }
            #[test]
            fn overlay_view() { run(Mode::OverlayView, super::$scenario) }
            #[test]
            fn branch() { run(Mode::Branch, super::$scenario) }
        }
    )*};
}

conformance!(
    seed_is_visible,
    create_write_read,
    mkdir_and_rmdir,
    renames,
    hard_links,
    symlinks,
    xattrs,
    setattr,
    unlink_and_recreate,
    stable_ids_and_lookup_counts,
    open_handles_are_counted,
    control_file,
);
