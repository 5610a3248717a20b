//! The overlay driven through the `Filesystem` trait, without mounting.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::*;
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
    store: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    let upper = dir.path().join("upper");
    fs::create_dir_all(lower.join("d/sub")).unwrap();
    fs::create_dir(&upper).unwrap();
    fs::write(lower.join("f"), b"lower f").unwrap();
    fs::write(lower.join("d/a"), b"lower a").unwrap();
    fs::write(lower.join("d/sub/b"), b"lower b").unwrap();
    Setup {
        lower,
        upper,
        store: dir.path().join("store"),
        _dir: dir,
    }
}

fn overlay(lowers: Vec<LowerSpec>, upper: Option<&Path>) -> Stack<Overlay> {
    Stack::new(Overlay::new(OverlayConfig::new(lowers, upper.map(Path::to_path_buf))).unwrap())
}

fn host_overlay(s: &Setup) -> Stack<Overlay> {
    overlay(vec![LowerSpec::Host(s.lower.clone())], Some(&s.upper))
}

fn image_of(s: &Setup, name: &str) -> LowerSpec {
    let store = strata_image::Store::open(&s.store).unwrap();
    strata_image::build(
        &store,
        &s.lower,
        name,
        strata_image::BuildOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    LowerSpec::Image {
        store: s.store.clone(),
        name: name.into(),
    }
}

fn lookup(fs: &Stack<Overlay>, parent: u64, name: &str) -> Result<Entry> {
    fs.lookup(&ROOT, parent, OsStr::new(name))
        .and_then(Lookup::entry)
}

fn path(fs: &Stack<Overlay>, p: &str) -> Result<u64> {
    let mut id = ROOT_ID;
    for c in p.split('/') {
        id = lookup(fs, id, c)?.attr.ino;
    }
    Ok(id)
}

fn read_all(fs: &Stack<Overlay>, ino: u64) -> Vec<u8> {
    let o = fs.open(&ROOT, ino, libc::O_RDONLY).unwrap();
    let data = fs.read(&ROOT, ino, o.fh, 0, 1 << 20).unwrap();
    fs.release(&ROOT, ino, o.fh).unwrap();
    data
}

struct Names(Vec<OsString>);
impl DirSink for Names {
    fn add(&mut self, _ino: u64, _next: u64, _kind: FileKind, name: &OsStr) -> bool {
        self.0.push(name.to_owned());
        true
    }
}

fn list(fs: &Stack<Overlay>, ino: u64) -> Vec<String> {
    let o = fs.opendir(&ROOT, ino, 0).unwrap();
    let mut names = Names(Vec::new());
    fs.readdir(&ROOT, ino, o.fh, 0, &mut names).unwrap();
    fs.releasedir(&ROOT, ino, o.fh).unwrap();
    let mut v: Vec<String> = names
        .0
        .into_iter()
        .map(|n| n.into_string().unwrap())
        .filter(|n| n != "." && n != "..")
        .collect();
    v.sort();
    v
}

fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

#[test]
fn writing_a_lower_file_copies_it_up_and_keeps_its_inode_number() {
    let s = setup();
    let fs = host_overlay(&s);
    let f = path(&fs, "f").unwrap();
    let o = fs.open(&ROOT, f, libc::O_WRONLY | libc::O_APPEND).unwrap();
    fs.write(&ROOT, f, o.fh, 7, b" + upper").unwrap();
    fs.release(&ROOT, f, o.fh).unwrap();
    assert_eq!(read_all(&fs, f), b"lower f + upper");
    assert_eq!(fs::read(s.upper.join("f")).unwrap(), b"lower f + upper");
    assert_eq!(fs::read(s.lower.join("f")).unwrap(), b"lower f");
    // Forgotten and looked up again: the same id, through the origin record.
    fs.forget(f, 1);
    assert_eq!(fs.stats().inodes, 1);
    assert_eq!(path(&fs, "f").unwrap(), f);
}

#[test]
fn unlink_of_a_lower_file_leaves_a_whiteout_and_a_new_file_replaces_it() {
    let s = setup();
    let fs = host_overlay(&s);
    fs.unlink(&ROOT, ROOT_ID, OsStr::new("f")).unwrap();
    assert_eq!(lookup(&fs, ROOT_ID, "f").unwrap_err(), Errno::ENOENT);
    assert!(is_whiteout(&s.upper.join("f")));
    assert!(!list(&fs, ROOT_ID).contains(&"f".to_string()));
    assert!(s.lower.join("f").exists());
    let (e, o) = fs
        .create(&ROOT, ROOT_ID, OsStr::new("f"), 0o100644, 0, libc::O_RDWR)
        .unwrap();
    fs.write(&ROOT, e.attr.ino, o.fh, 0, b"new").unwrap();
    fs.release(&ROOT, e.attr.ino, o.fh).unwrap();
    assert!(fs::symlink_metadata(s.upper.join("f")).unwrap().is_file());
    assert_eq!(read_all(&fs, path(&fs, "f").unwrap()), b"new");
}

#[test]
fn rmdir_then_mkdir_of_a_lower_directory_gives_an_empty_opaque_directory() {
    let s = setup();
    let fs = host_overlay(&s);
    let d = path(&fs, "d").unwrap();
    assert_eq!(
        fs.rmdir(&ROOT, ROOT_ID, OsStr::new("d")).unwrap_err(),
        Errno::ENOTEMPTY
    );
    fs.unlink(&ROOT, d, OsStr::new("a")).unwrap();
    let sub = path(&fs, "d/sub").unwrap();
    fs.unlink(&ROOT, sub, OsStr::new("b")).unwrap();
    fs.rmdir(&ROOT, d, OsStr::new("sub")).unwrap();
    // Only whiteouts remain in the upper copy: the directory counts as empty.
    assert_eq!(list(&fs, d), Vec::<String>::new());
    fs.rmdir(&ROOT, ROOT_ID, OsStr::new("d")).unwrap();
    assert!(is_whiteout(&s.upper.join("d")));
    let e = fs.mkdir(&ROOT, ROOT_ID, OsStr::new("d"), 0o755, 0).unwrap();
    assert_eq!(list(&fs, e.attr.ino), Vec::<String>::new());
    let opaque = rustix::fs::getxattr(
        s.upper.join("d"),
        c"trusted.overlay.opaque",
        &mut [0u8; 4][..],
    );
    assert_eq!(opaque.ok(), Some(1));
    assert!(s.lower.join("d/sub/b").exists());
}

#[test]
fn renaming_a_lower_directory_moves_its_whole_tree() {
    let s = setup();
    let fs = host_overlay(&s);
    fs.rename(&ROOT, ROOT_ID, OsStr::new("d"), ROOT_ID, OsStr::new("e"), 0)
        .unwrap();
    assert_eq!(lookup(&fs, ROOT_ID, "d").unwrap_err(), Errno::ENOENT);
    assert_eq!(read_all(&fs, path(&fs, "e/sub/b").unwrap()), b"lower b");
    assert_eq!(list(&fs, path(&fs, "e").unwrap()), ["a", "sub"]);
    assert!(is_whiteout(&s.upper.join("d")));
    assert!(s.lower.join("d/sub/b").exists());
}

#[test]
fn listings_merge_layers_and_hide_whiteouts() {
    let s = setup();
    fs::create_dir_all(s.upper.join("d")).unwrap();
    fs::write(s.upper.join("d/mine"), b"").unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        s.upper.join("d/a"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::empty(),
        0,
    )
    .unwrap();
    let fs = host_overlay(&s);
    assert_eq!(list(&fs, path(&fs, "d").unwrap()), ["mine", "sub"]);
}

#[test]
fn an_image_lower_serves_content_and_copies_up_on_chmod() {
    let s = setup();
    let img = image_of(&s, "img");
    let fs = overlay(vec![img], Some(&s.upper));
    let f = path(&fs, "d/a").unwrap();
    assert_eq!(read_all(&fs, f), b"lower a");
    let set = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    assert_eq!(fs.setattr(&ROOT, f, None, &set).unwrap().attr.perm, 0o600);
    let m = fs::metadata(s.upper.join("d/a")).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600);
    assert_eq!(fs::read(s.upper.join("d/a")).unwrap(), b"lower a");
}

#[test]
fn without_an_upper_an_image_is_read_only() {
    let s = setup();
    let img = image_of(&s, "img");
    let fs = overlay(vec![img], None);
    assert_eq!(read_all(&fs, path(&fs, "f").unwrap()), b"lower f");
    assert_eq!(
        fs.mkdir(&ROOT, ROOT_ID, OsStr::new("x"), 0o755, 0)
            .unwrap_err(),
        Errno::EROFS
    );
    let f = path(&fs, "f").unwrap();
    assert_eq!(fs.open(&ROOT, f, libc::O_RDWR).unwrap_err(), Errno::EROFS);
}

#[test]
fn the_first_lower_wins() {
    let s = setup();
    let other = s._dir.path().join("other");
    fs::create_dir(&other).unwrap();
    fs::write(other.join("f"), b"other f").unwrap();
    fs::write(other.join("only"), b"").unwrap();
    let fs = overlay(
        vec![
            LowerSpec::Host(other.clone()),
            LowerSpec::Host(s.lower.clone()),
        ],
        Some(&s.upper),
    );
    assert_eq!(read_all(&fs, path(&fs, "f").unwrap()), b"other f");
    assert_eq!(list(&fs, ROOT_ID), ["d", "f", "only"]);
}

/// The second line of defence behind the manifest check: a layer's name
/// that is not one component never becomes a `*at()` argument.
#[test]
fn layer_names_that_are_not_one_component_never_reach_a_syscall() {
    for bad in [
        &b".."[..],
        b".",
        b"",
        b"../../x",
        b"/etc/x",
        b"a/b",
        b"a\0b",
    ] {
        assert_eq!(
            crate::layer::layer_name("test", bad),
            Err(Errno::EIO),
            "{bad:?}"
        );
    }
    for good in [&b"..."[..], b"a b", b"\xff\n"] {
        assert_eq!(
            crate::layer::layer_name("test", good).unwrap().as_bytes(),
            good
        );
    }
}

fn write_at(fs: &Stack<Overlay>, ino: u64, fh: u64, data: &[u8]) {
    fs.write(&ROOT, ino, fh, 0, data).unwrap();
}

fn rewrite(fs: &Stack<Overlay>, p: &str, data: &[u8]) {
    let ino = path(fs, p).unwrap();
    let o = fs.open(&ROOT, ino, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    write_at(fs, ino, o.fh, data);
    fs.release(&ROOT, ino, o.fh).unwrap();
}

/// Freezes the live layer of `fs` and continues in `upper/rel`.
fn snapshot(fs: &Stack<Overlay>, upper: &Path, rel: &str) {
    fs::create_dir_all(upper.join(rel)).unwrap();
    fs.rule().snapshot(Path::new(rel), || Ok(())).unwrap();
}

#[test]
fn a_snapshot_freezes_the_live_layer_and_the_mount_shows_the_same_objects() {
    let s = setup();
    let fs = host_overlay(&s);
    rewrite(&fs, "f", b"v1");
    let (e, o) = fs
        .create(&ROOT, ROOT_ID, OsStr::new("new"), 0o100644, 0, libc::O_RDWR)
        .unwrap();
    write_at(&fs, e.attr.ino, o.fh, b"n1");
    fs.release(&ROOT, e.attr.ino, o.fh).unwrap();
    fs.unlink(&ROOT, path(&fs, "d").unwrap(), OsStr::new("a"))
        .unwrap();
    let ids: Vec<u64> = ["f", "new", "d", "d/sub/b"]
        .iter()
        .map(|p| path(&fs, p).unwrap())
        .collect();
    let before = list(&fs, ROOT_ID);

    snapshot(&fs, &s.upper, ".strata/layers/1");
    // Nothing the mount shows changed, ids included.
    assert_eq!(list(&fs, ROOT_ID), before);
    assert_eq!(read_all(&fs, ids[0]), b"v1");
    assert_eq!(read_all(&fs, ids[1]), b"n1");
    assert_eq!(lookup(&fs, ids[2], "a").unwrap_err(), Errno::ENOENT);
    for (p, id) in ["f", "new", "d", "d/sub/b"].iter().zip(&ids) {
        assert_eq!(path(&fs, p).unwrap(), *id, "{p}");
    }

    // Later changes land in the new live layer; the frozen one keeps its state.
    rewrite(&fs, "f", b"v2");
    fs.unlink(&ROOT, ROOT_ID, OsStr::new("new")).unwrap();
    fs.mkdir(
        &ROOT,
        path(&fs, "d").unwrap(),
        OsStr::new("later"),
        0o755,
        0,
    )
    .unwrap();
    assert_eq!(read_all(&fs, path(&fs, "f").unwrap()), b"v2");
    assert_eq!(lookup(&fs, ROOT_ID, "new").unwrap_err(), Errno::ENOENT);
    assert_eq!(fs::read(s.upper.join("f")).unwrap(), b"v1");
    assert_eq!(fs::read(s.upper.join("new")).unwrap(), b"n1");
    assert!(!s.upper.join("d/later").exists());
    assert_eq!(fs::read(s.upper.join(".strata/layers/1/f")).unwrap(), b"v2");
    assert!(is_whiteout(&s.upper.join(".strata/layers/1/new")));
    assert!(s.upper.join(".strata/layers/1/d/later").is_dir());
    // The copy of a frozen file keeps its node id, across a forget too.
    fs.forget(ids[0], 10);
    assert_eq!(path(&fs, "f").unwrap(), ids[0]);

    // A second snapshot stacks on the first.
    snapshot(&fs, &s.upper, ".strata/layers/2");
    rewrite(&fs, "f", b"v3");
    assert_eq!(fs::read(s.upper.join(".strata/layers/1/f")).unwrap(), b"v2");
    assert_eq!(fs::read(s.upper.join(".strata/layers/2/f")).unwrap(), b"v3");
    assert_eq!(read_all(&fs, path(&fs, "f").unwrap()), b"v3");
    assert_eq!(read_all(&fs, path(&fs, "d/sub/b").unwrap()), b"lower b");
}

#[test]
fn a_file_open_across_a_snapshot_keeps_writing_the_live_layer() {
    let s = setup();
    let fs = host_overlay(&s);
    let (e, o) = fs
        .create(&ROOT, ROOT_ID, OsStr::new("log"), 0o100644, 0, libc::O_RDWR)
        .unwrap();
    write_at(&fs, e.attr.ino, o.fh, b"before");
    let f = path(&fs, "f").unwrap();
    let of = fs.open(&ROOT, f, libc::O_RDWR | libc::O_TRUNC).unwrap();
    write_at(&fs, f, of.fh, b"BEFORE");

    snapshot(&fs, &s.upper, ".strata/layers/1");
    write_at(&fs, e.attr.ino, o.fh, b"after!");
    write_at(&fs, f, of.fh, b"AFTER!");
    // The snapshot has what was written before it, the live layer the rest.
    assert_eq!(fs::read(s.upper.join("log")).unwrap(), b"before");
    assert_eq!(fs::read(s.upper.join("f")).unwrap(), b"BEFORE");
    assert_eq!(
        fs::read(s.upper.join(".strata/layers/1/log")).unwrap(),
        b"after!"
    );
    assert_eq!(
        fs::read(s.upper.join(".strata/layers/1/f")).unwrap(),
        b"AFTER!"
    );
    assert_eq!(read_all(&fs, e.attr.ino), b"after!");
    fs.release(&ROOT, e.attr.ino, o.fh).unwrap();
    fs.release(&ROOT, f, of.fh).unwrap();
    // No temporary is left in the frozen layer's listing.
    let names: Vec<String> = fs::read_dir(&s.upper)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(TMP_PREFIX))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn a_directory_under_many_frozen_layers_resolves_and_lists_as_the_layers_say() {
    let s = setup();
    let fs = host_overlay(&s);
    let d = path(&fs, "d").unwrap();
    let mk = |name: &str, data: &[u8]| {
        let (e, o) = fs
            .create(&ROOT, d, OsStr::new(name), 0o100644, 0, libc::O_RDWR)
            .unwrap();
        write_at(&fs, e.attr.ino, o.fh, data);
        fs.release(&ROOT, e.attr.ino, o.fh).unwrap();
    };
    let rm = |name: &str| fs.unlink(&ROOT, d, OsStr::new(name)).unwrap();
    let steps: Vec<Box<dyn Fn()>> = vec![
        Box::new(|| mk("a1", b"1")),
        Box::new(|| rm("a")),
        Box::new(|| mk("a", b"again")),
        Box::new(|| mk("keep", b"k")),
        Box::new(|| rm("a1")),
        Box::new(|| rewrite(&fs, "d/keep", b"k2")),
    ];
    for (i, step) in steps.iter().enumerate() {
        step();
        snapshot(&fs, &s.upper, &format!(".strata/layers/{}", i + 1));
    }
    // Forgotten, so the next lookups build fresh nodes (and the index).
    fs.forget(d, 100);
    let d = path(&fs, "d").unwrap();
    assert_eq!(list(&fs, d), ["a", "keep", "sub"]);
    assert_eq!(read_all(&fs, path(&fs, "d/a").unwrap()), b"again");
    assert_eq!(read_all(&fs, path(&fs, "d/keep").unwrap()), b"k2");
    assert_eq!(lookup(&fs, d, "a1").unwrap_err(), Errno::ENOENT);
    assert_eq!(read_all(&fs, path(&fs, "d/sub/b").unwrap()), b"lower b");
    // The live layer still comes first, and the index follows new snapshots.
    fs.unlink(&ROOT, d, OsStr::new("keep")).unwrap();
    assert_eq!(list(&fs, d), ["a", "sub"]);
    snapshot(&fs, &s.upper, ".strata/layers/7");
    fs.mkdir(&ROOT, d, OsStr::new("keep"), 0o755, 0).unwrap();
    assert_eq!(list(&fs, d), ["a", "keep", "sub"]);
    assert_eq!(
        lookup(&fs, d, "keep").unwrap().attr.kind,
        FileKind::Directory
    );
}

#[test]
fn lookups_and_writes_racing_snapshots_never_change_a_frozen_layer() {
    let s = setup();
    let fs = std::sync::Arc::new(host_overlay(&s));
    for i in 0..40 {
        let (e, o) = fs
            .create(
                &ROOT,
                ROOT_ID,
                OsStr::new(&format!("f{i}")),
                0o100644,
                0,
                libc::O_RDWR,
            )
            .unwrap();
        write_at(&fs, e.attr.ino, o.fh, b"start");
        fs.release(&ROOT, e.attr.ino, o.fh).unwrap();
        fs.forget(e.attr.ino, 1);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (fs, stop) = (fs.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for i in 0..40 {
                    let e = lookup(&fs, ROOT_ID, &format!("f{i}")).unwrap();
                    let o = fs
                        .open(&ROOT, e.attr.ino, libc::O_WRONLY | libc::O_TRUNC)
                        .unwrap();
                    write_at(&fs, e.attr.ino, o.fh, format!("w{round}").as_bytes());
                    fs.release(&ROOT, e.attr.ino, o.fh).unwrap();
                    fs.forget(e.attr.ino, 1);
                }
                round += 1;
            }
        })
    };
    let frozen_files = |dir: &Path| -> Vec<Vec<u8>> {
        (0..40)
            .map(|i| fs::read(dir.join(format!("f{i}"))).unwrap_or_default())
            .collect()
    };
    for n in 1..=8 {
        let frozen = match n {
            1 => s.upper.clone(),
            n => s.upper.join(format!(".strata/layers/{}", n - 1)),
        };
        snapshot(&fs, &s.upper, &format!(".strata/layers/{n}"));
        let at_snapshot = frozen_files(&frozen);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(frozen_files(&frozen), at_snapshot, "snapshot {n} changed");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
}
