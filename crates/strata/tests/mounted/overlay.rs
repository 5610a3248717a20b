//! The copy-on-write overlay on real mounts: a host directory as the lower
//! (the scratch directory's `src`) under a writable upper (`upper`), checked
//! against the semantics and on-disk format of kernel overlayfs (the cases of
//! unionmount-testsuite: copy-up, whiteouts, opaque directories, renames,
//! hard links, special files, listings), and against the kernel itself.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirEntryExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;
use rustix::fs::{CWD, FileType, Mode, RenameFlags};

/// An old, exact timestamp (seconds, nanoseconds) for lower objects.
const T0: (i64, i64) = (1_000_000_000, 123_456_789);
const T1: (i64, i64) = (1_100_000_000, 987_654_321);

/// Mounts the host directory `src` (filled by `prepare`) with the upper
/// `upper`, both in the scratch directory.
fn overlay(prepare: impl FnOnce(&Path)) -> Mounted {
    Mounted::overlay(&[], prepare)
}

/// Mounts the lower and upper of an earlier (unmounted) overlay again.
fn remount(first: &Mounted) -> Mounted {
    let src = first.src.clone();
    let upper = first.upper();
    Mounted::build_with(&[], &[], move |_| {
        (
            src.display().to_string(),
            vec![format!("upper={}", upper.display())],
        )
    })
}

/// Path inside the upper.
fn up(m: &Mounted, rel: &str) -> PathBuf {
    m.upper().join(rel)
}

/// Whether `p` is an overlayfs whiteout: a 0/0 character device (and not
/// one strata marked as a real device).
fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|md| {
        md.file_type().is_char_device()
            && md.rdev() == 0
            && get_xattr(p, "trusted.strata.device").is_none()
    })
}

fn opaque(p: &Path) -> Option<Vec<u8>> {
    get_xattr(p, "trusted.overlay.opaque")
}

fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

fn write(p: &Path, data: &[u8]) {
    fs::write(p, data).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn append(p: &Path, data: &[u8]) {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {} for append: {e}", p.display()));
    f.write_all(data).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn mtime(md: &fs::Metadata) -> (i64, i64) {
    (md.mtime(), md.mtime_nsec())
}

fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn ino(p: &Path) -> u64 {
    lstat(p).ino()
}

/// No temporary names left anywhere in the upper.
fn assert_no_temporaries(m: &Mounted) {
    let tree = walk(&m.upper(), Detail::default());
    let tmp: Vec<&String> = tree
        .objs
        .keys()
        .filter(|p| p.rsplit('/').next().unwrap().starts_with(".strata-tmp"))
        .collect();
    assert!(tmp.is_empty(), "temporary names left in the upper: {tmp:?}");
}

fn renameat2(from: &Path, to: &Path, flags: RenameFlags) -> Result<(), i32> {
    rustix::fs::renameat_with(CWD, from, CWD, to, flags).map_err(|e| e.raw_os_error())
}

/// `sh -c SCRIPT` as nobody (65534), killed after 30 s.
fn nobody(script: &str) -> std::process::Output {
    output_with_timeout(
        Command::new("setpriv").args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sh",
            "-c",
            script,
        ]),
        Duration::from_secs(30),
    )
    .unwrap_or_else(|| panic!("as nobody: {script}: timed out"))
}

fn nobody_ok(script: &str) {
    let out = nobody(script);
    assert!(
        out.status.success(),
        "as nobody: {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command on the mount, killed after 30 s.
fn run(cmd: &mut Command) -> std::process::Output {
    output_with_timeout(cmd, Duration::from_secs(30)).unwrap_or_else(|| panic!("{cmd:?} timed out"))
}

// ---- 1. copy-up on write ------------------------------------------------

#[test]
fn appending_to_a_lower_file_copies_it_up_whole_with_its_metadata() {
    let m = overlay(|src| {
        fs::create_dir(src.join("dir")).unwrap();
        let f = src.join("dir/file");
        write(&f, b"original\n");
        chmod(&f, 0o640);
        std::os::unix::fs::chown(&f, Some(1234), Some(2345)).unwrap();
        set_xattr(&f, "user.color", b"blue");
        set_xattr(&f, "user.empty", b"");
        set_mtime(&f, T0.0, T0.1);
        chmod(&src.join("dir"), 0o750);
        std::os::unix::fs::chown(src.join("dir"), Some(1234), Some(2345)).unwrap();
        set_mtime(&src.join("dir"), T1.0, T1.1);
    });
    let lower_before = snapshot(&m.src, true);
    let file = m.m("dir/file");
    let before = lstat(&file);
    assert_eq!(
        (before.mode() & 0o7777, before.uid(), before.gid()),
        (0o640, 1234, 2345)
    );
    assert_eq!(mtime(&before), T0);
    let dir_before = lstat(&m.m("dir"));
    assert_eq!(mtime(&dir_before), T1);

    // Opening for writing copies up before a byte is written: the copy has
    // the lower's data, owner, mode, times and xattrs.
    drop(fs::OpenOptions::new().write(true).open(&file).unwrap());
    let u = lstat(&up(&m, "dir/file"));
    assert!(u.is_file());
    assert_eq!(fs::read(up(&m, "dir/file")).unwrap(), b"original\n");
    assert_eq!((u.mode() & 0o7777, u.uid(), u.gid()), (0o640, 1234, 2345));
    assert_eq!(mtime(&u), T0, "copy-up must keep the lower mtime");
    assert_eq!(
        xattrs_of(&up(&m, "dir/file")),
        vec![
            ("user.color".to_owned(), b"blue".to_vec()),
            ("user.empty".to_owned(), b"".to_vec())
        ]
    );
    let ud = lstat(&up(&m, "dir"));
    assert_eq!(
        (ud.mode() & 0o7777, ud.uid(), ud.gid()),
        (0o750, 1234, 2345),
        "parent directory copied up with its metadata"
    );

    append(&file, b"appended\n");
    assert_eq!(read(&file), "original\nappended\n");
    assert_eq!(read(&up(&m, "dir/file")), "original\nappended\n");
    assert_eq!(read(&m.s("dir/file")), "original\n");
    assert_same_tree(
        "lower after copy-up",
        &lower_before,
        &snapshot(&m.src, true),
    );

    let after = lstat(&file);
    assert_eq!(after.ino(), before.ino(), "st_ino changed by copy-up");
    assert_eq!(
        (after.mode() & 0o7777, after.uid(), after.gid()),
        (0o640, 1234, 2345)
    );
    assert_eq!(after.len(), 18);
    assert!(mtime(&after) > T0, "the write did not update mtime");
    // Writing to a file is no change of its directory.
    assert_eq!(
        mtime(&lstat(&m.m("dir"))),
        T1,
        "copy-up changed the parent directory's mtime (as seen through the mount)"
    );
    // xattrs through the mount: the user's, none of the overlay's own.
    assert_eq!(
        get_xattr(&file, "user.color").as_deref(),
        Some(&b"blue"[..])
    );
    let mut list = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(&file, &mut list[..]).unwrap();
    let listed: BTreeSet<&[u8]> = list[..n]
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .collect();
    assert_eq!(
        listed,
        BTreeSet::from([&b"user.color"[..], b"user.empty"]),
        "private xattrs must stay hidden"
    );
    assert_eq!(
        errno(
            rustix::fs::lgetxattr(&file, "trusted.strata.origin", &mut [0u8; 64][..])
                .map_err(std::io::Error::from)
        ),
        libc::ENODATA
    );
    assert_no_temporaries(&m);
}

// ---- 2. metadata changes ------------------------------------------------

#[test]
fn metadata_changes_copy_up_with_the_same_content() {
    const FILES: [&str; 6] = [
        "chmod", "chown", "utimes", "setxattr", "rmxattr", "truncate",
    ];
    let m = overlay(|src| {
        for name in FILES {
            let f = src.join(name);
            write(&f, format!("content of {name}\n").as_bytes());
            chmod(&f, 0o644);
            std::os::unix::fs::chown(&f, Some(100), Some(200)).unwrap();
            set_xattr(&f, "user.keep", b"1");
            set_mtime(&f, T0.0, T0.1);
        }
    });
    let lower_before = snapshot(&m.src, true);

    chmod(&m.m("chmod"), 0o4711);
    std::os::unix::fs::chown(m.m("chown"), Some(4321), Some(8765)).unwrap();
    set_mtime(&m.m("utimes"), T1.0, T1.1);
    set_xattr(&m.m("setxattr"), "user.new", b"value");
    rustix::fs::removexattr(m.m("rmxattr"), "user.keep").unwrap();
    let path =
        std::ffi::CString::new(m.m("truncate").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(
        unsafe { libc::truncate(path.as_ptr(), 3) },
        0,
        "truncate(2)"
    );

    assert_same_tree(
        "lower after metadata changes",
        &lower_before,
        &snapshot(&m.src, true),
    );
    for name in FILES {
        let u = up(&m, name);
        let md = fs::symlink_metadata(&u).unwrap_or_else(|e| panic!("{name} not copied up: {e}"));
        assert!(md.is_file(), "{name}");
        let content = fs::read(&u).unwrap();
        let full = format!("content of {name}\n");
        let expect = if name == "truncate" {
            &full.as_bytes()[..3]
        } else {
            full.as_bytes()
        };
        assert_eq!(content, expect, "{name}: content of the copy");
        let (mode, uid, gid) = match name {
            "chmod" => (0o4711, 100, 200),
            "chown" => (0o644, 4321, 8765),
            _ => (0o644, 100, 200),
        };
        assert_eq!(
            (md.mode() & 0o7777, md.uid(), md.gid()),
            (mode, uid, gid),
            "{name}"
        );
        let t = match name {
            "utimes" => T1,
            _ => T0,
        };
        if name != "truncate" {
            assert_eq!(mtime(&md), t, "{name}: mtime of the copy");
        }
        let mut xattrs = vec![("user.keep".to_owned(), b"1".to_vec())];
        match name {
            "setxattr" => xattrs.push(("user.new".to_owned(), b"value".to_vec())),
            "rmxattr" => xattrs.clear(),
            _ => {}
        }
        assert_eq!(xattrs_of(&u), xattrs, "{name}: xattrs of the copy");
        // The mount shows the upper's copy.
        let seen = lstat(&m.m(name));
        assert_eq!(
            (
                seen.mode(),
                seen.uid(),
                seen.gid(),
                seen.len(),
                mtime(&seen)
            ),
            (md.mode(), md.uid(), md.gid(), md.len(), mtime(&md)),
            "{name}: the mount shows the upper copy"
        );
        assert_eq!(
            xattrs_of(&m.m(name)),
            xattrs,
            "{name}: xattrs through the mount"
        );
        assert_eq!(fs::read(m.m(name)).unwrap(), expect, "{name}");
    }
    // Removing an xattr that is not there copies nothing up.
    write(&m.s("untouched"), b"u");
    assert_eq!(
        errno(rustix::fs::removexattr(m.m("untouched"), "user.nope").map_err(std::io::Error::from)),
        libc::ENODATA
    );
    assert!(!exists(&up(&m, "untouched")));
    assert_no_temporaries(&m);
}

// ---- 3. inode numbers ---------------------------------------------------

#[test]
fn st_ino_is_stable_across_copy_up_rename_drop_caches_and_remount() {
    let mut m = overlay(|src| {
        fs::create_dir_all(src.join("dir")).unwrap();
        fs::create_dir_all(src.join("tree/sub")).unwrap();
        write(&src.join("file"), b"f");
        write(&src.join("dir/inner"), b"i");
        write(&src.join("tree/sub/leaf"), b"l");
        write(&src.join("moved"), b"m");
    });
    let names = [
        "file",
        "dir",
        "dir/inner",
        "tree",
        "tree/sub",
        "tree/sub/leaf",
        "moved",
    ];
    let before: Vec<u64> = names.iter().map(|n| ino(&m.m(n))).collect();
    let distinct: HashSet<u64> = before.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        names.len(),
        "inode numbers must differ: {before:?}"
    );

    append(&m.m("file"), b"+");
    write(&m.m("dir/new"), b"n"); // copies dir up
    chmod(&m.m("dir/inner"), 0o600);
    fs::rename(m.m("tree"), m.m("tree2")).unwrap();
    fs::rename(m.m("moved"), m.m("dir/moved")).unwrap();
    let now = [
        "file",
        "dir",
        "dir/inner",
        "tree2",
        "tree2/sub",
        "tree2/sub/leaf",
        "dir/moved",
    ];

    let mut bad = Vec::new();
    let mut check = |when: &str, m: &Mounted| {
        for ((old, new), ino_before) in names.iter().zip(now).zip(&before) {
            let got = ino(&m.m(new));
            if got != *ino_before {
                bad.push(format!("{when}: {old} was {ino_before}, {new} is {got}"));
            }
        }
    };
    check("after copy-up", &m);
    drop_caches();
    check("after drop_caches", &m);
    m.unmount();
    let m2 = remount(&m);
    check("after remount", &m2);
    assert!(bad.is_empty(), "st_ino changed:\n{}", bad.join("\n"));
}

// ---- 4. unlink ----------------------------------------------------------

#[test]
fn unlinking_a_lower_file_leaves_a_whiteout_and_the_name_can_be_made_again() {
    let m = overlay(|src| {
        write(&src.join("victim"), b"lower content");
        write(&src.join("other"), b"o");
        fs::create_dir(src.join("d")).unwrap();
        write(&src.join("d/deep"), b"deep");
    });
    fs::remove_file(m.m("victim")).unwrap();
    fs::remove_file(m.m("d/deep")).unwrap();
    assert_eq!(errno(fs::symlink_metadata(m.m("victim"))), libc::ENOENT);
    assert_eq!(errno(fs::read(m.m("d/deep"))), libc::ENOENT);
    assert_eq!(names(&m.mnt), ["d", "other"]);
    assert!(names(&m.m("d")).is_empty());
    assert!(is_whiteout(&up(&m, "victim")), "no whiteout in the upper");
    assert!(is_whiteout(&up(&m, "d/deep")), "no whiteout in the upper");
    assert_eq!(read(&m.s("victim")), "lower content");
    assert_eq!(read(&m.s("d/deep")), "deep");
    assert_eq!(errno(fs::remove_file(m.m("victim"))), libc::ENOENT);

    // The name again: a new regular file, in place of the whiteout.
    write(&m.m("victim"), b"new content");
    assert_eq!(read(&m.m("victim")), "new content");
    let u = lstat(&up(&m, "victim"));
    assert!(u.is_file(), "upper victim is {:?}", u.file_type());
    assert_eq!(read(&up(&m, "victim")), "new content");
    assert_eq!(get_xattr(&up(&m, "victim"), "trusted.strata.origin"), None);
    assert_eq!(names(&m.mnt), ["d", "other", "victim"]);
    assert_eq!(read(&m.s("victim")), "lower content");

    // Removed again: whiteout again, since the lower still has the name.
    fs::remove_file(m.m("victim")).unwrap();
    assert!(is_whiteout(&up(&m, "victim")));
    assert_eq!(names(&m.mnt), ["d", "other"]);
    // A name only the upper has leaves nothing behind.
    write(&m.m("fresh"), b"x");
    fs::remove_file(m.m("fresh")).unwrap();
    assert!(!exists(&up(&m, "fresh")), "upper-only file left a trace");
    // Whiteouts are no user-visible objects.
    assert_eq!(errno(fs::symlink_metadata(m.m("d/deep"))), libc::ENOENT);
    assert_no_temporaries(&m);
}

// ---- 5. rmdir and opaque directories -------------------------------------

#[test]
fn a_directory_made_where_a_lower_one_was_removed_is_opaque() {
    let m = overlay(|src| {
        fs::create_dir_all(src.join("d/sub")).unwrap();
        write(&src.join("d/f1"), b"1");
        write(&src.join("d/sub/f2"), b"2");
    });
    let lower_before = snapshot(&m.src, true);
    fs::remove_file(m.m("d/sub/f2")).unwrap();
    fs::remove_dir(m.m("d/sub")).unwrap();
    fs::remove_file(m.m("d/f1")).unwrap();
    fs::remove_dir(m.m("d")).unwrap();
    assert_eq!(errno(fs::symlink_metadata(m.m("d"))), libc::ENOENT);
    assert!(names(&m.mnt).is_empty());
    assert!(is_whiteout(&up(&m, "d")), "upper d is not a whiteout");

    fs::create_dir(m.m("d")).unwrap();
    assert!(lstat(&m.m("d")).is_dir());
    assert!(
        names(&m.m("d")).is_empty(),
        "lower children show through: {:?}",
        names(&m.m("d"))
    );
    assert_eq!(errno(fs::symlink_metadata(m.m("d/f1"))), libc::ENOENT);
    assert_eq!(errno(fs::symlink_metadata(m.m("d/sub"))), libc::ENOENT);
    assert!(lstat(&up(&m, "d")).is_dir());
    assert_eq!(
        opaque(&up(&m, "d")).as_deref(),
        Some(&b"y"[..]),
        "upper d not opaque"
    );
    // The opaque marker is not shown to users.
    assert_eq!(get_xattr(&m.m("d"), "trusted.overlay.opaque"), None);
    write(&m.m("d/f1"), b"new");
    assert_eq!(names(&m.m("d")), ["f1"]);
    assert_eq!(get_xattr(&up(&m, "d/f1"), "trusted.strata.origin"), None);
    assert_same_tree("lower", &lower_before, &snapshot(&m.src, true));
    assert_no_temporaries(&m);
}

// ---- 6. rmdir of non-empty directories ---------------------------------

#[test]
fn rmdir_refuses_non_empty_merged_directories_and_accepts_whited_out_ones() {
    let m = overlay(|src| {
        fs::create_dir_all(src.join("full")).unwrap();
        write(&src.join("full/f"), b"f");
        fs::create_dir_all(src.join("emptylower")).unwrap();
        fs::create_dir_all(src.join("gone/sub")).unwrap();
        write(&src.join("gone/a"), b"a");
        write(&src.join("gone/b"), b"b");
        fs::create_dir_all(src.join("mixed")).unwrap();
        write(&src.join("mixed/l"), b"l");
    });
    // Lower content.
    assert_eq!(errno(fs::remove_dir(m.m("full"))), libc::ENOTEMPTY);
    // Upper content in a lower directory.
    write(&m.m("emptylower/new"), b"n");
    assert_eq!(errno(fs::remove_dir(m.m("emptylower"))), libc::ENOTEMPTY);
    // Everything whited out: empty.
    fs::remove_file(m.m("gone/a")).unwrap();
    fs::remove_file(m.m("gone/b")).unwrap();
    assert_eq!(
        errno(fs::remove_dir(m.m("gone"))),
        libc::ENOTEMPTY,
        "gone/sub is still there"
    );
    fs::remove_dir(m.m("gone/sub")).unwrap();
    assert!(names(&m.m("gone")).is_empty());
    fs::remove_dir(m.m("gone")).unwrap();
    assert!(is_whiteout(&up(&m, "gone")));
    assert!(m.s("gone/a").exists() && m.s("gone/sub").is_dir());
    // Whiteouts plus an upper file: not empty until the upper file goes.
    fs::remove_file(m.m("mixed/l")).unwrap();
    write(&m.m("mixed/u"), b"u");
    assert_eq!(errno(fs::remove_dir(m.m("mixed"))), libc::ENOTEMPTY);
    fs::remove_file(m.m("mixed/u")).unwrap();
    fs::remove_dir(m.m("mixed")).unwrap();
    assert!(is_whiteout(&up(&m, "mixed")));
    // Still not empty, still there.
    assert_eq!(read(&m.m("full/f")), "f");
    assert_eq!(names(&m.mnt), ["emptylower", "full"]);
    // rmdir of a file, unlink of a directory.
    assert_eq!(errno(fs::remove_dir(m.m("full/f"))), libc::ENOTDIR);
    assert_eq!(errno(fs::remove_file(m.m("full"))), libc::EISDIR);
    assert_no_temporaries(&m);
}

// ---- 7. renames ---------------------------------------------------------

fn rename_tree(src: &Path) {
    fs::create_dir_all(src.join("tree/sub/deeper")).unwrap();
    fs::create_dir_all(src.join("tree/emptydir")).unwrap();
    write(&src.join("tree/x"), b"x");
    write(&src.join("tree/sub/y"), b"y");
    write(&src.join("tree/sub/deeper/z"), b"z");
    std::os::unix::fs::symlink("../x", src.join("tree/sub/link")).unwrap();
    set_xattr(&src.join("tree/sub/y"), "user.tag", b"t");
    chmod(&src.join("tree/sub"), 0o711);
    for p in ["tree/x", "tree/sub/y", "tree/sub/deeper/z"] {
        set_mtime(&src.join(p), T0.0, T0.1);
    }
}

#[test]
fn renaming_lower_files_and_directories() {
    let m = overlay(|src| {
        rename_tree(src);
        write(&src.join("a"), b"file a");
        write(&src.join("s"), b"source s");
        write(&src.join("t"), b"target t");
        fs::create_dir(src.join("other")).unwrap();
        write(&src.join("other/far"), b"far");
    });
    let lower_before = snapshot(&m.src, true);
    let tree_before = snapshot(&m.m("tree"), true);

    // A lower file.
    fs::rename(m.m("a"), m.m("b")).unwrap();
    assert_eq!(read(&m.m("b")), "file a");
    assert_eq!(errno(fs::symlink_metadata(m.m("a"))), libc::ENOENT);
    assert!(is_whiteout(&up(&m, "a")));
    assert!(lstat(&up(&m, "b")).is_file());

    // A lower directory with nested content moves whole.
    fs::rename(m.m("tree"), m.m("moved")).unwrap();
    assert_eq!(errno(fs::symlink_metadata(m.m("tree"))), libc::ENOENT);
    assert_same_tree("moved tree", &tree_before, &snapshot(&m.m("moved"), true));
    assert_eq!(read(&m.m("moved/sub/link")), "x");
    // It stays whole when the old name is made again, and changes inside
    // do not reach the lower.
    fs::create_dir(m.m("tree")).unwrap();
    assert!(names(&m.m("tree")).is_empty(), "{:?}", names(&m.m("tree")));
    write(&m.m("moved/sub/y"), b"changed");
    assert_eq!(read(&m.m("moved/sub/y")), "changed");

    // Over an existing lower file.
    fs::rename(m.m("s"), m.m("t")).unwrap();
    assert_eq!(read(&m.m("t")), "source s");
    assert_eq!(errno(fs::symlink_metadata(m.m("s"))), libc::ENOENT);
    assert!(is_whiteout(&up(&m, "s")));

    // Across directories.
    fs::rename(m.m("other/far"), m.m("near")).unwrap();
    assert_eq!(read(&m.m("near")), "far");
    assert!(names(&m.m("other")).is_empty());

    assert_eq!(names(&m.mnt), ["b", "moved", "near", "other", "t", "tree"]);
    assert_same_tree(
        "lower after renames",
        &lower_before,
        &snapshot(&m.src, true),
    );
    assert_no_temporaries(&m);
}

#[test]
fn renaming_a_directory_onto_an_empty_or_whited_out_directory() {
    let m = overlay(|src| {
        rename_tree(src);
        fs::create_dir(src.join("emptydst")).unwrap();
        fs::create_dir(src.join("cleared")).unwrap();
        write(&src.join("cleared/old1"), b"1");
        write(&src.join("cleared/old2"), b"2");
        fs::create_dir(src.join("nonempty")).unwrap();
        write(&src.join("nonempty/keep"), b"k");
        fs::create_dir(src.join("src2")).unwrap();
        write(&src.join("src2/inside"), b"in");
    });
    let lower_before = snapshot(&m.src, true);
    let tree_before = snapshot(&m.m("tree"), true);

    fs::rename(m.m("tree"), m.m("emptydst")).unwrap();
    assert_same_tree(
        "tree onto an empty lower dir",
        &tree_before,
        &snapshot(&m.m("emptydst"), true),
    );
    assert_eq!(errno(fs::symlink_metadata(m.m("tree"))), libc::ENOENT);

    // A directory whose lower entries are all whited out is empty, and what
    // replaces it must not show them again.
    fs::remove_file(m.m("cleared/old1")).unwrap();
    fs::remove_file(m.m("cleared/old2")).unwrap();
    fs::rename(m.m("src2"), m.m("cleared")).unwrap();
    assert_eq!(names(&m.m("cleared")), ["inside"]);
    assert_eq!(
        errno(fs::symlink_metadata(m.m("cleared/old1"))),
        libc::ENOENT
    );

    // Not empty: refused, nothing changed.
    fs::create_dir(m.m("newdir")).unwrap();
    assert_eq!(
        errno(fs::rename(m.m("newdir"), m.m("nonempty"))),
        libc::ENOTEMPTY
    );
    assert_eq!(names(&m.m("nonempty")), ["keep"]);
    // Type mismatches.
    assert_eq!(
        errno(fs::rename(m.m("newdir"), m.m("nonempty/keep"))),
        libc::ENOTDIR
    );
    assert_eq!(
        errno(fs::rename(m.m("nonempty/keep"), m.m("newdir"))),
        libc::EISDIR
    );

    assert_eq!(names(&m.mnt), ["cleared", "emptydst", "newdir", "nonempty"]);
    assert_same_tree("lower", &lower_before, &snapshot(&m.src, true));
    assert_no_temporaries(&m);
}

#[test]
fn renaming_to_a_whited_out_name() {
    let m = overlay(|src| {
        write(&src.join("w"), b"old w");
        write(&src.join("s"), b"new w");
        fs::create_dir_all(src.join("wd/oldsub")).unwrap();
        write(&src.join("wd/oldfile"), b"old");
        fs::create_dir(src.join("nd")).unwrap();
        write(&src.join("nd/newfile"), b"new");
    });
    fs::remove_file(m.m("w")).unwrap();
    fs::rename(m.m("s"), m.m("w")).unwrap();
    assert_eq!(read(&m.m("w")), "new w");
    assert!(lstat(&up(&m, "w")).is_file());
    assert!(is_whiteout(&up(&m, "s")));

    // A lower directory removed, another moved to its name: only the moved
    // one's content shows.
    fs::remove_dir(m.m("wd/oldsub")).unwrap();
    fs::remove_file(m.m("wd/oldfile")).unwrap();
    fs::remove_dir(m.m("wd")).unwrap();
    fs::rename(m.m("nd"), m.m("wd")).unwrap();
    assert_eq!(names(&m.m("wd")), ["newfile"]);
    assert_eq!(read(&m.m("wd/newfile")), "new");
    assert_eq!(names(&m.mnt), ["w", "wd"]);
    // An upper-only directory moved onto a whiteout.
    fs::create_dir(m.m("fresh")).unwrap();
    write(&m.m("fresh/f"), b"f");
    fs::remove_file(m.m("w")).unwrap();
    fs::rename(m.m("fresh"), m.m("w")).unwrap();
    assert_eq!(names(&m.m("w")), ["f"]);
    assert_eq!(names(&m.mnt), ["w", "wd"]);
    assert_eq!(read(&m.s("w")), "old w");
    assert!(m.s("wd/oldsub").is_dir());
    assert_no_temporaries(&m);
}

#[test]
fn rename_noreplace_and_exchange() {
    let m = overlay(|src| {
        write(&src.join("a"), b"A");
        write(&src.join("b"), b"B");
        fs::create_dir(src.join("d")).unwrap();
        write(&src.join("d/inner"), b"I");
    });
    let lower_before = snapshot(&m.src, true);
    assert_eq!(
        renameat2(&m.m("a"), &m.m("b"), RenameFlags::NOREPLACE),
        Err(libc::EEXIST)
    );
    assert_eq!(read(&m.m("a")), "A");
    assert_eq!(read(&m.m("b")), "B");
    renameat2(&m.m("a"), &m.m("c"), RenameFlags::NOREPLACE).unwrap();
    assert_eq!(read(&m.m("c")), "A");
    assert_eq!(errno(fs::symlink_metadata(m.m("a"))), libc::ENOENT);

    // Two lower files.
    renameat2(&m.m("b"), &m.m("c"), RenameFlags::EXCHANGE).unwrap();
    assert_eq!(read(&m.m("b")), "A");
    assert_eq!(read(&m.m("c")), "B");
    // A lower file and a lower directory.
    renameat2(&m.m("b"), &m.m("d"), RenameFlags::EXCHANGE).unwrap();
    assert_eq!(read(&m.m("d")), "A");
    assert!(lstat(&m.m("b")).is_dir());
    assert_eq!(names(&m.m("b")), ["inner"]);
    assert_eq!(read(&m.m("b/inner")), "I");
    // With a name that does not exist.
    assert_eq!(
        renameat2(&m.m("b"), &m.m("nothere"), RenameFlags::EXCHANGE),
        Err(libc::ENOENT)
    );
    assert_eq!(names(&m.mnt), ["b", "c", "d"]);
    assert_same_tree("lower", &lower_before, &snapshot(&m.src, true));
    assert_no_temporaries(&m);
}

// ---- 8. hard links ------------------------------------------------------

#[test]
fn linking_a_lower_file_makes_upper_hard_links() {
    let m = overlay(|src| {
        write(&src.join("f"), b"lower");
        fs::create_dir(src.join("d")).unwrap();
    });
    fs::hard_link(m.m("f"), m.m("d/g")).unwrap();
    let (f, g) = (lstat(&m.m("f")), lstat(&m.m("d/g")));
    assert_eq!(f.ino(), g.ino());
    assert_eq!((f.nlink(), g.nlink()), (2, 2));
    let (uf, ug) = (lstat(&up(&m, "f")), lstat(&up(&m, "d/g")));
    assert_eq!(uf.ino(), ug.ino(), "upper copies are not hard links");
    assert_eq!(uf.nlink(), 2);
    assert_eq!(lstat(&m.s("f")).nlink(), 1);
    assert!(!exists(&m.s("d/g")));
    append(&m.m("d/g"), b"+g");
    assert_eq!(read(&m.m("f")), "lower+g");
    assert_eq!(read(&m.s("f")), "lower");
    fs::remove_file(m.m("f")).unwrap();
    assert_eq!(lstat(&m.m("d/g")).nlink(), 1);
    assert_eq!(read(&m.m("d/g")), "lower+g");
    assert!(is_whiteout(&up(&m, "f")));
    // Linking onto a whited-out name.
    fs::hard_link(m.m("d/g"), m.m("f")).unwrap();
    assert_eq!(read(&m.m("f")), "lower+g");
    assert_eq!(ino(&m.m("f")), ino(&m.m("d/g")));
    assert_eq!(errno(fs::hard_link(m.m("d/g"), m.m("f"))), libc::EEXIST);
    assert_no_temporaries(&m);
}

#[test]
fn lower_hard_links_share_st_ino_and_stay_consistent_after_copy_up_and_drop_caches() {
    let m = overlay(|src| {
        write(&src.join("h1"), b"shared");
        fs::hard_link(src.join("h1"), src.join("h2")).unwrap();
    });
    let (a, b) = (lstat(&m.m("h1")), lstat(&m.m("h2")));
    assert_eq!(
        a.ino(),
        b.ino(),
        "a lower hard-linked pair must share st_ino"
    );
    assert_eq!((a.nlink(), b.nlink()), (2, 2));

    // A write through one name. Kernel overlayfs without index breaks the
    // link (the other name keeps the old content); with index it keeps it.
    // Either way, what each name shows must not depend on the kernel's cache.
    append(&m.m("h1"), b"+1");
    assert_eq!(read(&m.m("h1")), "shared+1");
    let h2_cached = read(&m.m("h2"));
    let st_cached = (lstat(&m.m("h1")), lstat(&m.m("h2")));
    drop_caches();
    let h2_fresh = read(&m.m("h2"));
    let st_fresh = (lstat(&m.m("h1")), lstat(&m.m("h2")));
    assert_eq!(read(&m.m("h1")), "shared+1");
    assert_eq!(read(&m.s("h1")), "shared");
    let show = |s: &(fs::Metadata, fs::Metadata)| (s.0.ino(), s.0.nlink(), s.1.ino(), s.1.nlink());
    assert_eq!(
        (h2_cached.as_str(), show(&st_cached)),
        (h2_fresh.as_str(), show(&st_fresh)),
        "h2 (content, then h1 ino/nlink, h2 ino/nlink) differ before and after drop_caches"
    );
}

// ---- 9. symlinks and special files --------------------------------------

#[test]
fn symlinks_fifos_and_devices() {
    let mut m = overlay(|src| {
        write(&src.join("target"), b"T");
        std::os::unix::fs::symlink("target", src.join("lowlink")).unwrap();
        std::os::unix::fs::lchown(src.join("lowlink"), Some(7), Some(8)).unwrap();
        rustix::fs::mknodat(
            CWD,
            src.join("lowfifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o640),
            0,
        )
        .unwrap();
        rustix::fs::mknodat(
            CWD,
            src.join("lownull"),
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
    });
    // Lower symlink.
    assert_eq!(fs::read_link(m.m("lowlink")).unwrap(), Path::new("target"));
    assert_eq!(read(&m.m("lowlink")), "T");
    let l = lstat(&m.m("lowlink"));
    assert!(l.file_type().is_symlink());
    assert_eq!((l.uid(), l.gid()), (7, 8));
    // Copy-up of a symlink (by chown) keeps it a symlink with its target.
    std::os::unix::fs::lchown(m.m("lowlink"), Some(9), Some(10)).unwrap();
    assert_eq!(
        fs::read_link(up(&m, "lowlink")).unwrap(),
        Path::new("target")
    );
    assert_eq!(
        (
            lstat(&up(&m, "lowlink")).uid(),
            lstat(&up(&m, "lowlink")).gid()
        ),
        (9, 10)
    );
    assert_eq!(fs::read_link(m.m("lowlink")).unwrap(), Path::new("target"));
    // New symlink.
    std::os::unix::fs::symlink("../elsewhere/x", m.m("newlink")).unwrap();
    assert_eq!(
        fs::read_link(m.m("newlink")).unwrap(),
        Path::new("../elsewhere/x")
    );
    assert_eq!(
        fs::read_link(up(&m, "newlink")).unwrap(),
        Path::new("../elsewhere/x")
    );
    assert_eq!(errno(fs::metadata(m.m("newlink"))), libc::ENOENT);

    // FIFOs.
    assert!(lstat(&m.m("lowfifo")).file_type().is_fifo());
    chmod(&m.m("lowfifo"), 0o600);
    let u = lstat(&up(&m, "lowfifo"));
    assert!(
        u.file_type().is_fifo(),
        "copy-up of a fifo is {:?}",
        u.file_type()
    );
    assert_eq!(u.mode() & 0o7777, 0o600);
    rustix::fs::mknodat(
        CWD,
        m.m("newfifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    assert!(lstat(&m.m("newfifo")).file_type().is_fifo());
    assert!(lstat(&up(&m, "newfifo")).file_type().is_fifo());

    // Devices.
    let d = lstat(&m.m("lownull"));
    assert!(d.file_type().is_char_device());
    assert_eq!(d.rdev(), rustix::fs::makedev(1, 3));
    rustix::fs::mknodat(
        CWD,
        m.m("null2"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o644),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    let d = lstat(&m.m("null2"));
    assert!(d.file_type().is_char_device());
    assert_eq!(d.rdev(), rustix::fs::makedev(1, 3));
    assert_eq!(lstat(&up(&m, "null2")).rdev(), rustix::fs::makedev(1, 3));
    std::os::unix::fs::chown(m.m("lownull"), Some(5), Some(5)).unwrap();
    let u = lstat(&up(&m, "lownull"));
    assert!(u.file_type().is_char_device());
    assert_eq!((u.rdev(), u.uid()), (rustix::fs::makedev(1, 3), 5));

    // A 0/0 character device made through the mount is a device, not a
    // whiteout: it shows, in listings too, and can be removed.
    rustix::fs::mknodat(
        CWD,
        m.m("zero"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let z = lstat(&m.m("zero"));
    assert!(z.file_type().is_char_device());
    assert_eq!((z.rdev(), z.mode() & 0o7777), (0, 0o600));
    assert!(names(&m.mnt).contains(&"zero".to_owned()));
    assert!(exists(&up(&m, "zero")));
    // Still a device for a new daemon.
    m.unmount();
    let m2 = remount(&m);
    let z = lstat(&m2.m("zero"));
    assert!(
        z.file_type().is_char_device(),
        "0/0 device after remount: {:?}",
        z.file_type()
    );
    assert_eq!(z.rdev(), 0);
    fs::remove_file(m2.m("zero")).unwrap();
    assert_eq!(errno(fs::symlink_metadata(m2.m("zero"))), libc::ENOENT);
    assert!(
        !exists(&up(&m, "zero")),
        "removing an upper-only device left {:?}",
        lstat(&up(&m, "zero")).file_type()
    );

    assert_eq!(
        names(&m2.mnt),
        [
            "lowfifo", "lowlink", "lownull", "newfifo", "newlink", "null2", "target"
        ]
    );
    assert_no_temporaries(&m);
}

// ---- 10. listings -------------------------------------------------------

#[test]
fn listings_merge_upper_and_lower_without_duplicates_or_temporaries() {
    let m = overlay(|src| {
        for n in ["a", "b", "c", "keep"] {
            write(&src.join(n), n.as_bytes());
        }
        fs::create_dir_all(src.join("dir/sub")).unwrap();
        write(&src.join("dir/l1"), b"1");
        write(&src.join("dir/l2"), b"2");
    });
    write(&m.m("d"), b"d");
    fs::remove_file(m.m("b")).unwrap();
    fs::rename(m.m("c"), m.m("e")).unwrap();
    append(&m.m("a"), b"+"); // in both layers now
    write(&m.m("dir/u1"), b"u");
    fs::remove_file(m.m("dir/l1")).unwrap();
    assert_eq!(names(&m.mnt), ["a", "d", "dir", "e", "keep"]);
    assert_eq!(names(&m.m("dir")), ["l2", "sub", "u1"]);

    // Types and inode numbers from readdir agree with stat.
    for de in fs::read_dir(&m.mnt).unwrap() {
        let de = de.unwrap();
        let md = lstat(&de.path());
        assert_eq!(
            de.file_type().unwrap(),
            md.file_type(),
            "{:?}",
            de.file_name()
        );
        assert_eq!(
            de.ino(),
            md.ino(),
            "d_ino of {:?} differs from st_ino",
            de.file_name()
        );
    }
    let raw = raw_listing(&m.m("dir"));
    assert_eq!(raw, [".", "..", "l2", "sub", "u1"], "raw getdents listing");
}

/// Every name getdents64 returns, `.` and `..` included, sorted.
fn raw_listing(dir: &Path) -> Vec<String> {
    let fd = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
        Mode::empty(),
    )
    .unwrap();
    let mut out: Vec<String> = rustix::fs::Dir::read_from(&fd)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

#[test]
fn listing_while_creating_and_copying_up_shows_each_name_once() {
    const LOWER: usize = 150;
    const NEW: usize = 300;
    let m = overlay(|src| {
        fs::create_dir(src.join("busy")).unwrap();
        for i in 0..LOWER {
            write(&src.join(format!("busy/lower{i:03}")), b"lower");
        }
    });
    let lower: BTreeSet<String> = (0..LOWER).map(|i| format!("lower{i:03}")).collect();
    let dir = m.m("busy");
    let done = std::sync::atomic::AtomicBool::new(false);
    let problems = std::thread::scope(|s| {
        let creator = s.spawn(|| {
            for i in 0..NEW {
                write(&dir.join(format!("new{i:03}")), b"new");
                if i < LOWER {
                    // Copy-up: built under a temporary name in the upper.
                    append(&dir.join(format!("lower{i:03}")), b"+");
                }
            }
        });
        let mut problems = Vec::new();
        let mut rounds = 0;
        while !done.load(std::sync::atomic::Ordering::Relaxed) || rounds < 3 {
            let mut seen = HashSet::new();
            for n in raw_listing(&dir) {
                if n.starts_with(".strata") {
                    problems.push(format!("temporary name listed: {n}"));
                }
                if !seen.insert(n.clone()) {
                    problems.push(format!("listed twice: {n}"));
                }
            }
            for n in &lower {
                if !seen.contains(n) {
                    problems.push(format!("lower name missing from a listing: {n}"));
                }
            }
            rounds += 1;
            if creator.is_finished() {
                done.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if problems.len() > 20 {
                break;
            }
        }
        creator.join().unwrap();
        problems
    });
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    let mut expect: Vec<String> = lower.into_iter().collect();
    expect.extend((0..NEW).map(|i| format!("new{i:03}")));
    expect.sort();
    assert_eq!(names(&dir), expect);
    for i in 0..LOWER {
        assert_eq!(read(&dir.join(format!("lower{i:03}"))), "lower+");
    }
    assert_no_temporaries(&m);
}

// ---- 11. kernel overlayfs reads what strata wrote -----------------------

#[test]
fn kernel_overlayfs_shows_the_same_tree_from_the_same_layers() {
    let mut m = overlay(|src| {
        rename_tree(src);
        for n in ["keep", "append", "chmod", "gone", "renamed_from", "xattr"] {
            write(&src.join(n), format!("{n}\n").as_bytes());
            set_mtime(&src.join(n), T0.0, T0.1);
        }
        fs::create_dir_all(src.join("dir_rm/b")).unwrap();
        write(&src.join("dir_rm/a"), b"a");
        write(&src.join("dir_rm/b/c"), b"c");
        fs::create_dir(src.join("merged")).unwrap();
        write(&src.join("merged/l1"), b"l1");
        write(&src.join("merged/l2"), b"l2");
        std::os::unix::fs::symlink("keep", src.join("lowlink")).unwrap();
    });
    append(&m.m("append"), b"more\n");
    chmod(&m.m("chmod"), 0o600);
    fs::remove_file(m.m("gone")).unwrap();
    fs::rename(m.m("renamed_from"), m.m("renamed_to")).unwrap();
    set_xattr(&m.m("xattr"), "user.added", b"yes");
    fs::remove_dir_all(m.m("dir_rm")).unwrap();
    fs::create_dir(m.m("dir_rm")).unwrap();
    write(&m.m("dir_rm/new"), b"new");
    fs::rename(m.m("tree"), m.m("tree_moved")).unwrap();
    write(&m.m("merged/u1"), b"u1");
    fs::remove_file(m.m("merged/l1")).unwrap();
    std::os::unix::fs::symlink("append", m.m("newlink")).unwrap();
    rustix::fs::mknodat(
        CWD,
        m.m("merged/fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    fs::hard_link(m.m("append"), m.m("append_link")).unwrap();
    fs::create_dir_all(m.m("newdir/deep")).unwrap();
    write(&m.m("newdir/deep/f"), b"deep");
    fs::rename(m.m("merged/l2"), m.m("newdir/l2")).unwrap();

    let seen_by_strata = snapshot(&m.mnt, true);
    m.unmount();
    let work = m.dir.path().join("work");
    let kmnt = m.dir.path().join("kernel");
    fs::create_dir(&work).unwrap();
    fs::create_dir(&kmnt).unwrap();
    let k = KernelOverlay::mount(
        m.src.to_str().unwrap(),
        &m.dir.path().join("upper"),
        &work,
        &kmnt,
    );
    let seen_by_kernel = snapshot(&k.mnt, true);
    assert_same_tree(
        "strata (first) vs kernel overlayfs (second)",
        &seen_by_strata,
        &seen_by_kernel,
    );
}

// ---- 12. read-only --------------------------------------------------------

#[test]
fn without_an_upper_or_with_ro_nothing_can_be_written() {
    // A host lower and an image, no upper: read-only.
    let scratch = ImageScratch::new();
    let img_src = scratch.path("imgsrc");
    fs::create_dir(&img_src).unwrap();
    write(&img_src.join("from_image"), b"image");
    scratch.build(&img_src, "ro");
    let host = scratch.path("host");
    fs::create_dir(&host).unwrap();
    write(&host.join("from_host"), b"host");
    let m = scratch.mount(&format!("image:ro:{}", host.display()), false, &[]);
    let host_before = snapshot(&host, true);
    for (what, res) in [
        ("mkdir", fs::create_dir(m.m("newdir"))),
        ("create", fs::write(m.m("newfile"), b"x")),
        (
            "write",
            fs::OpenOptions::new()
                .write(true)
                .open(m.m("from_host"))
                .map(drop),
        ),
        ("unlink", fs::remove_file(m.m("from_host"))),
        (
            "chmod",
            fs::set_permissions(m.m("from_host"), fs::Permissions::from_mode(0o600)),
        ),
        ("rename", fs::rename(m.m("from_host"), m.m("other"))),
    ] {
        assert_eq!(
            res.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EROFS)),
            "{what}"
        );
    }
    assert_same_tree("host lower", &host_before, &snapshot(&host, true));
    assert_eq!(read(&m.m("from_host")), "host");
    assert_eq!(read(&m.m("from_image")), "image");

    // `-o ro` with an upper contradicts itself and is refused: see
    // tests/cli_errors.rs.
}

// ---- 13. bad input --------------------------------------------------------

#[test]
fn bad_layers_and_uppers_exit_2_with_one_line_and_mount_nothing() {
    let scratch = ImageScratch::new();
    let d = scratch.dir.path();
    let store = scratch.store();
    let img_src = d.join("imgsrc");
    fs::create_dir(&img_src).unwrap();
    write(&img_src.join("f"), b"f");
    scratch.build(&img_src, "real");
    let lower = d.join("lower");
    fs::create_dir(&lower).unwrap();
    write(&d.join("a_file"), b"not a directory");
    let mnt = d.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let s = |p: &Path| p.display().to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![s(&lower), "--upper".into(), s(&d.join("a_file"))],
            "a_file",
        ),
        (
            vec![s(&lower), "--upper".into(), s(&d.join("missing"))],
            "missing",
        ),
        (vec!["image:".into()], "image"),
        (vec!["image:nosuch".into()], "nosuch"),
        (
            vec!["image:nosuch".into(), "--upper".into(), s(&lower)],
            "nosuch",
        ),
        (
            vec![format!("image:real:{}", s(&d.join("nolower")))],
            "nolower",
        ),
        (
            vec![s(&d.join("nolower")), "--upper".into(), s(&lower)],
            "nolower",
        ),
    ];
    let mut failures = Vec::new();
    for (args, needle) in &cases {
        let mut cmd = Command::new(STRATA);
        cmd.arg("mount")
            .args(args)
            .arg(&mnt)
            .env("STRATA_STATE_DIR", d.join("state"))
            .env("STRATA_STORE", &store)
            .env_remove("RUST_LOG");
        let out = output_with_timeout(&mut cmd, Duration::from_secs(30));
        let mounted = fstype_at(&mnt);
        if mounted.is_some() {
            let _ = rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::DETACH);
        }
        let Some(out) = out else {
            failures.push(format!("{args:?}: timed out"));
            continue;
        };
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        let ok = out.status.code() == Some(2)
            && lines.len() == 1
            && lines[0].starts_with("strata: ")
            && lines[0].contains(needle)
            && mounted.is_none();
        if !ok {
            failures.push(format!(
                "{args:?}: exit {:?}, mounted {mounted:?}, stderr {err:?} (expected exit 2, one line naming {needle:?})",
                out.status.code()
            ));
        }
    }
    assert!(names(&mnt).is_empty());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_upper_inside_the_lower_is_refused() {
    // Kernel overlayfs refuses overlapping layers: copy-ups would change the
    // lower while it is served, and the upper would show up inside itself.
    let scratch = scratch_dir();
    let d = scratch.path();
    let lower = d.join("lower");
    fs::create_dir_all(lower.join("up")).unwrap();
    let mnt = d.join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mut failures = Vec::new();
    for upper in [lower.clone(), lower.join("up")] {
        let mut cmd = Command::new(STRATA);
        cmd.arg("mount")
            .arg(&lower)
            .arg("--upper")
            .arg(&upper)
            .arg(&mnt)
            .env("STRATA_STATE_DIR", d.join("state"))
            .env_remove("RUST_LOG");
        let out = output_with_timeout(&mut cmd, Duration::from_secs(30)).expect("mount timed out");
        let mounted = fstype_at(&mnt);
        if mounted.is_some() {
            let _ = rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::DETACH);
        }
        if out.status.code() != Some(2) || mounted.is_some() {
            failures.push(format!(
                "upper {} over lower {}: exit {:?}, mounted {mounted:?}, stderr {:?}",
                upper.display(),
                lower.display(),
                out.status.code(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---- more: directories, opens, users, concurrency, layers ----------------

#[test]
fn changing_a_lower_directory_copies_only_it_up_and_keeps_it_merged() {
    let m = overlay(|src| {
        fs::create_dir_all(src.join("d/sub")).unwrap();
        write(&src.join("d/f"), b"f");
        write(&src.join("d/sub/g"), b"g");
        chmod(&src.join("d"), 0o755);
        set_xattr(&src.join("d"), "user.dir", b"yes");
        set_mtime(&src.join("d"), T0.0, T0.1);
    });
    chmod(&m.m("d"), 0o700);
    std::os::unix::fs::chown(m.m("d"), Some(11), Some(12)).unwrap();
    let u = lstat(&up(&m, "d"));
    assert!(u.is_dir());
    assert_eq!((u.mode() & 0o7777, u.uid(), u.gid()), (0o700, 11, 12));
    assert_eq!(mtime(&u), T0, "directory copy-up keeps its mtime");
    assert_eq!(
        xattrs_of(&up(&m, "d")),
        vec![("user.dir".to_owned(), b"yes".to_vec())]
    );
    assert_eq!(
        opaque(&up(&m, "d")),
        None,
        "a copied-up directory must not be opaque"
    );
    assert!(
        names(&up(&m, "d")).is_empty(),
        "children copied up: {:?}",
        names(&up(&m, "d"))
    );
    assert_eq!(names(&m.m("d")), ["f", "sub"]);
    assert_eq!(read(&m.m("d/sub/g")), "g");
    assert_eq!(mtime(&lstat(&m.m("d"))), T0);
    // Creating in a lower directory copies the chain up, nothing else.
    fs::create_dir_all(m.m("d/sub/new/deeper")).unwrap();
    assert_eq!(names(&up(&m, "d")), ["sub"]);
    assert_eq!(names(&up(&m, "d/sub")), ["new"]);
    assert_eq!(names(&m.m("d/sub")), ["g", "new"]);
    assert_eq!(opaque(&up(&m, "d/sub")), None);
    assert_eq!(opaque(&up(&m, "d/sub/new")), None);
}

#[test]
fn truncating_opens_and_exclusive_creates() {
    let m = overlay(|src| {
        write(&src.join("trunc"), b"long lower content");
        write(&src.join("excl"), b"lower");
        write(&src.join("big"), &vec![7u8; 3 << 20]);
    });
    // O_TRUNC on a lower file.
    fs::write(m.m("trunc"), b"short").unwrap();
    assert_eq!(read(&m.m("trunc")), "short");
    assert_eq!(read(&up(&m, "trunc")), "short");
    assert_eq!(read(&m.s("trunc")), "long lower content");
    // O_EXCL on a shown lower name fails; on a whited-out one it works.
    assert_eq!(
        errno(
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(m.m("excl"))
        ),
        libc::EEXIST
    );
    fs::remove_file(m.m("excl")).unwrap();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(m.m("excl"))
        .unwrap();
    f.write_all(b"exclusive").unwrap();
    drop(f);
    assert_eq!(read(&m.m("excl")), "exclusive");
    // A larger file, written in the middle: copied whole, changed in place.
    let f = fs::OpenOptions::new().write(true).open(m.m("big")).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"MIDDLE", 1 << 20).unwrap();
    drop(f);
    let mut expect = vec![7u8; 3 << 20];
    expect[1 << 20..(1 << 20) + 6].copy_from_slice(b"MIDDLE");
    assert!(
        fs::read(m.m("big")).unwrap() == expect,
        "big file through the mount"
    );
    assert!(
        fs::read(up(&m, "big")).unwrap() == expect,
        "big file in the upper"
    );
    assert!(
        fs::read(m.s("big")).unwrap() == vec![7u8; 3 << 20],
        "lower changed"
    );
    // A sparse lower file stays the same size and content.
    let sparse = m.s("sparse");
    let f = fs::File::create(&sparse).unwrap();
    f.set_len(64 << 20).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"end", (64 << 20) - 3).unwrap();
    drop(f);
    append(&m.m("sparse"), b"+");
    let md = lstat(&up(&m, "sparse"));
    assert_eq!(md.len(), (64 << 20) + 1);
    let data = fs::read(m.m("sparse")).unwrap();
    assert!(data[..(64 << 20) - 3].iter().all(|b| *b == 0));
    assert_eq!(&data[(64 << 20) - 3..], b"end+");
}

#[test]
fn open_files_across_copy_up_unlink_and_rename() {
    let m = overlay(|src| {
        write(&src.join("f"), b"lower");
        fs::create_dir(src.join("d")).unwrap();
        write(&src.join("d/inner"), b"inner");
        write(&src.join("doomed"), b"still readable");
    });
    // A writer opened before a rename of its lower directory keeps writing
    // the file the mount shows.
    let mut w = fs::OpenOptions::new()
        .append(true)
        .open(m.m("d/inner"))
        .unwrap();
    fs::rename(m.m("d"), m.m("d2")).unwrap();
    w.write_all(b"+after").unwrap();
    drop(w);
    assert_eq!(read(&m.m("d2/inner")), "inner+after");
    assert_eq!(read(&m.s("d/inner")), "inner");
    // New opens after a copy-up see the upper's data.
    append(&m.m("f"), b"+upper");
    assert_eq!(read(&m.m("f")), "lower+upper");
    let mut rw = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.m("f"))
        .unwrap();
    rw.write_all(b"LOW").unwrap();
    drop(rw);
    assert_eq!(read(&m.m("f")), "LOWer+upper");
    // An open lower file stays readable after its name is removed.
    let mut r = fs::File::open(m.m("doomed")).unwrap();
    fs::remove_file(m.m("doomed")).unwrap();
    let mut s = String::new();
    std::io::Read::read_to_string(&mut r, &mut s).unwrap();
    assert_eq!(s, "still readable");
    assert_eq!(errno(fs::symlink_metadata(m.m("doomed"))), libc::ENOENT);
}

#[test]
fn another_user_changes_lower_files_as_their_permissions_allow() {
    let m = overlay(|src| {
        fs::create_dir_all(src.join("root_dir/users")).unwrap();
        chmod(&src.join("root_dir"), 0o755);
        std::os::unix::fs::chown(src.join("root_dir/users"), Some(65534), Some(65534)).unwrap();
        write(&src.join("root_dir/users/theirs"), b"theirs");
        std::os::unix::fs::chown(src.join("root_dir/users/theirs"), Some(65534), Some(65534))
            .unwrap();
        write(&src.join("root_dir/roots"), b"root's");
        chmod(&src.join("root_dir/roots"), 0o644);
    });
    let d = m.m("root_dir");
    nobody_ok(&format!("echo more >> {}/users/theirs", d.display()));
    nobody_ok(&format!("echo new > {}/users/new", d.display()));
    nobody_ok(&format!(
        "rm {}/users/theirs.none 2>/dev/null; true",
        d.display()
    ));
    assert_eq!(read(&m.m("root_dir/users/theirs")), "theirsmore\n");
    let u = lstat(&up(&m, "root_dir/users/theirs"));
    assert_eq!((u.uid(), u.gid()), (65534, 65534));
    let n = lstat(&up(&m, "root_dir/users/new"));
    assert_eq!((n.uid(), n.gid()), (65534, 65534));
    let ud = lstat(&up(&m, "root_dir"));
    assert_eq!((ud.uid(), ud.mode() & 0o7777), (0, 0o755));
    // Refused by permissions: no copy-up happens.
    let out = nobody(&format!("echo no >> {}/roots", d.display()));
    assert!(!out.status.success());
    let out = nobody(&format!("rm -f {}/roots", d.display()));
    assert!(!out.status.success());
    let out = nobody(&format!("chmod 777 {}/roots", d.display()));
    assert!(!out.status.success());
    assert!(
        !exists(&up(&m, "root_dir/roots")),
        "a refused change copied the file up"
    );
    assert_eq!(read(&m.m("root_dir/roots")), "root's");
    // Unlinking their own lower file in their directory works.
    nobody_ok(&format!("rm {}/users/theirs", d.display()));
    assert!(is_whiteout(&up(&m, "root_dir/users/theirs")));
}

#[test]
fn concurrent_writers_copy_a_lower_file_up_once() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 50;
    let m = overlay(|src| {
        fs::create_dir_all(src.join("a/b/c")).unwrap();
        write(&src.join("a/b/c/shared"), b"");
        for i in 0..THREADS {
            write(&src.join(format!("a/b/c/own{i}")), b"");
        }
    });
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let m = &m;
            s.spawn(move || {
                for r in 0..ROUNDS {
                    append(&m.m("a/b/c/shared"), format!("{t}:{r}\n").as_bytes());
                    append(&m.m(&format!("a/b/c/own{t}")), b"x");
                }
            });
        }
    });
    let shared = read(&m.m("a/b/c/shared"));
    let lines: HashSet<&str> = shared.lines().collect();
    assert_eq!(
        lines.len(),
        THREADS * ROUNDS,
        "appends lost in copy-up races"
    );
    for t in 0..THREADS {
        assert_eq!(read(&m.m(&format!("a/b/c/own{t}"))), "x".repeat(ROUNDS));
    }
    assert_eq!(read(&up(&m, "a/b/c/shared")), shared);
    assert_no_temporaries(&m);
}

#[test]
fn a_directory_renamed_away_and_back_is_whole() {
    let m = overlay(rename_tree);
    let before = snapshot(&m.m("tree"), true);
    fs::rename(m.m("tree"), m.m("away")).unwrap();
    fs::rename(m.m("away"), m.m("tree")).unwrap();
    assert_eq!(names(&m.mnt), ["tree"]);
    assert_same_tree(
        "tree after away and back",
        &before,
        &snapshot(&m.m("tree"), true),
    );
    assert!(
        !exists(&up(&m, "away")),
        "a trace of the intermediate name is left"
    );
    // And the exchange of two lower directories.
    fs::create_dir_all(m.s("p/pp")).unwrap();
    write(&m.s("p/pf"), b"p");
    fs::create_dir_all(m.s("q")).unwrap();
    write(&m.s("q/qf"), b"q");
    let (p, q) = (snapshot(&m.s("p"), true), snapshot(&m.s("q"), true));
    renameat2(&m.m("p"), &m.m("q"), RenameFlags::EXCHANGE).unwrap();
    assert_same_tree("q after exchange", &p, &snapshot(&m.m("q"), true));
    assert_same_tree("p after exchange", &q, &snapshot(&m.m("p"), true));
    assert_no_temporaries(&m);
}

/// Two host lowers (`l1` over `l2`) with whiteouts and opaque directories,
/// and an upper: what strata shows after changes, the kernel shows too.
#[test]
fn several_host_lowers_with_markers_match_kernel_overlayfs() {
    let mut m = Mounted::build_with(&[], &[], |dir| {
        let (l1, l2, upper) = (dir.join("l1"), dir.join("l2"), dir.join("upper"));
        for d in [&l1, &l2, &upper] {
            fs::create_dir(d).unwrap();
        }
        for d in ["keep", "opaque", "gone_dir", "merged", "deep/er"] {
            fs::create_dir_all(l2.join(d)).unwrap();
        }
        write(&l2.join("keep/b"), b"b");
        write(&l2.join("opaque/hidden"), b"hidden");
        write(&l2.join("gone_dir/x"), b"x");
        write(&l2.join("gone_file"), b"gone");
        write(&l2.join("merged/bottom"), b"bottom");
        write(&l2.join("replaced"), b"bottom version");
        write(&l2.join("deep/er/leaf"), b"leaf");
        for d in ["opaque", "merged", "deep"] {
            fs::create_dir_all(l1.join(d)).unwrap();
        }
        set_xattr(&l1.join("opaque"), "trusted.overlay.opaque", b"y");
        write(&l1.join("opaque/shown"), b"shown");
        write(&l1.join("merged/top"), b"top");
        write(&l1.join("deep/top_leaf"), b"top leaf");
        for w in ["gone_dir", "gone_file", "merged/nothing_below"] {
            rustix::fs::mknodat(CWD, l1.join(w), FileType::CharacterDevice, Mode::empty(), 0)
                .unwrap();
        }
        write(&l1.join("replaced"), b"top version");
        (
            format!("{}:{}", l1.display(), l2.display()),
            vec![format!("upper={}", upper.display())],
        )
    });
    assert_eq!(
        names(&m.mnt),
        ["deep", "keep", "merged", "opaque", "replaced"]
    );
    assert_eq!(names(&m.m("opaque")), ["shown"]);
    assert_eq!(names(&m.m("merged")), ["bottom", "top"]);
    assert_eq!(read(&m.m("replaced")), "top version");
    // The opaque lower directory has nothing below it: it can go.
    fs::remove_file(m.m("opaque/shown")).unwrap();
    fs::remove_dir(m.m("opaque")).unwrap();
    // Changes on both lowers' objects.
    append(&m.m("deep/er/leaf"), b"+");
    append(&m.m("deep/top_leaf"), b"+");
    fs::remove_file(m.m("merged/bottom")).unwrap();
    write(&m.m("merged/nothing_below"), b"now something");
    fs::rename(m.m("deep"), m.m("deep_moved")).unwrap();
    fs::create_dir(m.m("gone_dir")).unwrap();
    write(&m.m("gone_dir/y"), b"y");
    assert_eq!(names(&m.m("gone_dir")), ["y"]);

    let strata = snapshot(&m.mnt, true);
    m.unmount();
    let d = m.dir.path();
    let (work, kmnt) = (d.join("work"), d.join("kernel"));
    fs::create_dir(&work).unwrap();
    fs::create_dir(&kmnt).unwrap();
    let lowers = format!("{}:{}", d.join("l1").display(), d.join("l2").display());
    let k = KernelOverlay::mount(&lowers, &d.join("upper"), &work, &kmnt);
    assert_same_tree(
        "strata (first) vs kernel overlayfs (second)",
        &strata,
        &snapshot(&k.mnt, true),
    );
}

/// A file some process has open for reading (with kernel passthrough, the
/// lower file is its backing file) must not make opens of the copy fail.
#[test]
fn a_reader_holding_a_lower_file_open_does_not_break_writers_or_later_opens() {
    let m = overlay(|src| {
        write(&src.join("f"), b"lower\n");
        write(&src.join("g"), b"g\n");
    });
    let mut failures = Vec::new();
    // A metadata change copies up as well: later opens must still work.
    let g_reader = fs::File::open(m.m("g")).unwrap();
    chmod(&m.m("g"), 0o600);
    if let Err(e) = fs::read(m.m("g")) {
        failures.push(format!(
            "an open after a chmod while a reader has it open: {e}"
        ));
    }
    drop(g_reader);
    let mut reader = fs::File::open(m.m("f")).unwrap();
    match fs::OpenOptions::new().append(true).open(m.m("f")) {
        Ok(mut w) => w.write_all(b"appended\n").unwrap(),
        Err(e) => failures.push(format!("open for append while a reader has it open: {e}")),
    }
    match fs::read_to_string(m.m("f")) {
        Ok(s) if s == "lower\nappended\n" => {}
        other => failures.push(format!("a new open after the copy-up read {other:?}")),
    }
    // The early reader goes on reading (the lower's data, as in overlayfs).
    let mut s = String::new();
    if let Err(e) = std::io::Read::read_to_string(&mut reader, &mut s) {
        failures.push(format!("the early reader: {e}"));
    }
    drop(reader);
    match fs::read_to_string(m.m("f")) {
        Ok(s) if s == "lower\nappended\n" => {}
        other => failures.push(format!("an open after the reader closed read {other:?}")),
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn renaming_a_partly_changed_lower_directory_moves_what_the_mount_showed() {
    let mut m = overlay(|src| {
        rename_tree(src);
        fs::create_dir_all(src.join("tree/cleared/sub")).unwrap();
        write(&src.join("tree/cleared/sub/old"), b"old");
        write(&src.join("tree/cleared/old"), b"old");
        fs::create_dir_all(src.join("tree/mixed")).unwrap();
        write(&src.join("tree/mixed/lower"), b"lower");
        write(&src.join("tree/gone"), b"gone");
        write(&src.join("tree/was"), b"was");
    });
    // Change the tree in every way before moving it.
    fs::remove_file(m.m("tree/gone")).unwrap();
    fs::rename(m.m("tree/was"), m.m("tree/now")).unwrap();
    fs::remove_dir_all(m.m("tree/cleared")).unwrap();
    fs::create_dir(m.m("tree/cleared")).unwrap(); // opaque, empty
    write(&m.m("tree/mixed/upper"), b"upper");
    append(&m.m("tree/sub/y"), b"+");
    fs::remove_dir(m.m("tree/emptydir")).unwrap();
    let shown = snapshot(&m.m("tree"), true);
    assert_eq!(
        names(&m.m("tree")),
        ["cleared", "mixed", "now", "sub", "x"],
        "before the move"
    );

    fs::rename(m.m("tree"), m.m("moved")).unwrap();
    assert_same_tree("moved", &shown, &snapshot(&m.m("moved"), true));
    // Deeper still: into a lower directory chain.
    fs::create_dir_all(m.s("a/b/c")).unwrap();
    fs::rename(m.m("moved"), m.m("a/b/c/tree")).unwrap();
    assert_same_tree("moved deeper", &shown, &snapshot(&m.m("a/b/c/tree"), true));
    let strata = snapshot(&m.mnt, true);
    m.unmount();
    let d = m.dir.path();
    let (work, kmnt) = (d.join("work"), d.join("kernel"));
    fs::create_dir(&work).unwrap();
    fs::create_dir(&kmnt).unwrap();
    let k = KernelOverlay::mount(m.src.to_str().unwrap(), &d.join("upper"), &work, &kmnt);
    assert_same_tree(
        "strata vs kernel overlayfs",
        &strata,
        &snapshot(&k.mnt, true),
    );
}

#[test]
fn touch_chown_of_setuid_and_mmap_writes_on_lower_files() {
    let m = overlay(|src| {
        for n in ["atime", "suid", "mapped"] {
            write(&src.join(n), format!("{n} content").as_bytes());
            set_mtime(&src.join(n), T0.0, T0.1);
        }
        chmod(&src.join("suid"), 0o4755);
    });
    // touch -a: only the access time changes; the copy keeps the mtime.
    let out = run(Command::new("touch").arg("-a").arg(m.m("atime")));
    assert!(out.status.success(), "{out:?}");
    assert_eq!(mtime(&lstat(&m.m("atime"))), T0);
    assert_eq!(mtime(&lstat(&up(&m, "atime"))), T0);
    // chown of a setuid file clears setuid, as on any Linux filesystem.
    std::os::unix::fs::chown(m.m("suid"), Some(5), Some(5)).unwrap();
    let md = lstat(&m.m("suid"));
    assert_eq!((md.uid(), md.mode() & 0o7777), (5, 0o755));
    assert_eq!(read(&up(&m, "suid")), "suid content");
    // A shared writable mapping of a lower file writes the upper copy.
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.m("mapped"))
        .unwrap();
    let len = 14;
    // SAFETY: a fresh shared mapping of `len` bytes of an open file, unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        std::ptr::copy_nonoverlapping(b"MAPPED".as_ptr(), p as *mut u8, 6);
        assert_eq!(libc::msync(p, len, libc::MS_SYNC), 0);
        libc::munmap(p, len);
    }
    drop(f);
    assert_eq!(read(&m.m("mapped")), "MAPPED content");
    assert_eq!(read(&up(&m, "mapped")), "MAPPED content");
    assert_eq!(read(&m.s("mapped")), "mapped content");
}

#[test]
fn large_merged_listings_show_every_name_once() {
    const N: usize = 3000;
    let m = overlay(|src| {
        fs::create_dir(src.join("big")).unwrap();
        for i in 0..N {
            write(&src.join(format!("big/name-with-some-length-{i:05}")), b"l");
        }
    });
    let dir = m.m("big");
    // A third of the names get an upper copy, a third are removed, and as
    // many new names come.
    for i in (0..N).step_by(3) {
        append(&dir.join(format!("name-with-some-length-{i:05}")), b"+");
    }
    for i in (1..N).step_by(3) {
        fs::remove_file(dir.join(format!("name-with-some-length-{i:05}"))).unwrap();
    }
    for i in N..N + N / 3 {
        write(&dir.join(format!("name-with-some-length-{i:05}")), b"n");
    }
    let mut expect: Vec<String> = (0..N + N / 3)
        .filter(|i| *i >= N || i % 3 != 1)
        .map(|i| format!("name-with-some-length-{i:05}"))
        .collect();
    expect.sort();
    let mut raw = raw_listing(&dir);
    assert_eq!(raw.drain(..2).collect::<Vec<_>>(), [".", ".."]);
    let dups = raw.windows(2).filter(|w| w[0] == w[1]).count();
    assert_eq!(dups, 0, "duplicate names");
    assert_eq!(raw, expect);
}

/// The upper on another filesystem (tmpfs) than the lower.
fn overlay_on_tmpfs(t: &TmpfsBranches, prepare: impl FnOnce(&Path)) -> Mounted {
    let upper = t.path(0);
    Mounted::build_with(&[], &[], move |dir| {
        let src = dir.join("src");
        fs::create_dir(&src).unwrap();
        prepare(&src);
        (
            src.display().to_string(),
            vec![format!("upper={}", upper.display())],
        )
    })
}

#[test]
fn an_upper_on_tmpfs_works_and_a_full_upper_fails_copy_up_cleanly() {
    let t = TmpfsBranches::new(&[2]);
    let m = overlay_on_tmpfs(&t, |src| {
        fs::create_dir_all(src.join("tree/sub")).unwrap();
        write(&src.join("tree/sub/f"), b"f");
        write(&src.join("small"), b"small");
        write(&src.join("big"), &vec![1u8; 4 << 20]);
        write(&src.join("gone"), b"gone");
        set_xattr(&src.join("small"), "user.k", b"v");
    });
    let upper = t.path(0);
    append(&m.m("small"), b"+");
    assert_eq!(read(&upper.join("small")), "small+");
    assert_eq!(
        get_xattr(&upper.join("small"), "user.k").as_deref(),
        Some(&b"v"[..])
    );
    fs::remove_file(m.m("gone")).unwrap();
    assert!(is_whiteout(&upper.join("gone")));
    fs::rename(m.m("tree"), m.m("tree2")).unwrap();
    assert_eq!(read(&m.m("tree2/sub/f")), "f");

    // 4 MiB do not fit in 2 MiB: the write fails with ENOSPC, the file still
    // shows the lower content, and nothing is left in the upper.
    let r = fs::OpenOptions::new().append(true).open(m.m("big"));
    assert_eq!(errno(r), libc::ENOSPC);
    assert!(fs::read(m.m("big")).unwrap() == vec![1u8; 4 << 20]);
    assert!(!exists(&upper.join("big")));
    let left: Vec<String> = names(&upper)
        .into_iter()
        .filter(|n| n.starts_with(".strata"))
        .collect();
    assert!(left.is_empty(), "temporaries left: {left:?}");
    // And the mount goes on working.
    write(&m.m("after"), b"ok");
    assert_eq!(read(&m.m("after")), "ok");
}

#[test]
fn odd_names_copy_up_and_list() {
    use std::os::unix::ffi::OsStrExt;
    let odd: Vec<&std::ffi::OsStr> = vec![
        std::ffi::OsStr::from_bytes(b"new\nline"),
        std::ffi::OsStr::from_bytes(b"latin1 \xe9t\xe9"),
        std::ffi::OsStr::from_bytes(b" leading space"),
        std::ffi::OsStr::from_bytes(b".strata-tmp-lookalike"),
        std::ffi::OsStr::from_bytes(b".strata-tmp.1.2"),
        std::ffi::OsStr::from_bytes(&[b'x'; 255]),
    ];
    let names_in = odd.clone();
    let m = overlay(move |src| {
        for n in &names_in {
            fs::write(src.join(n), n.as_bytes()).unwrap();
        }
    });
    for n in &odd {
        let p = m.mnt.join(n);
        let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"+").unwrap();
        drop(f);
        let mut want = n.as_bytes().to_vec();
        want.push(b'+');
        assert_eq!(fs::read(&p).unwrap(), want, "{n:?}");
    }
    // Also one made through the mount.
    fs::write(m.m(".strata-tmp.mine"), b"mine").unwrap();
    let mut listed: Vec<String> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| String::from_utf8_lossy(e.unwrap().file_name().as_bytes()).into_owned())
        .collect();
    listed.sort();
    let mut want: Vec<String> = odd
        .iter()
        .map(|n| String::from_utf8_lossy(n.as_bytes()).into_owned())
        .chain([".strata-tmp.mine".to_owned()])
        .collect();
    want.sort();
    assert_eq!(
        listed, want,
        "user files whose names look like strata's temporaries must be listed"
    );
}

/// A daemon killed in the middle of a copy-up leaves its temporary in the
/// upper. The next mount must not let it make a directory unremovable (an
/// empty listing, and rmdir saying ENOTEMPTY).
#[test]
fn a_temporary_left_by_a_crash_does_not_make_its_directory_unremovable() {
    let m = Mounted::build_with(&[], &[], |dir| {
        let (src, upper) = (dir.join("src"), dir.join("upper"));
        fs::create_dir_all(src.join("d")).unwrap();
        write(&src.join("d/f"), b"f");
        fs::create_dir_all(upper.join("d")).unwrap();
        fs::create_dir_all(upper.join("upper_only")).unwrap();
        for d in ["d", "upper_only"] {
            // What a crash mid-copy-up leaves: a temporary strata marked as its own.
            let tmp = upper.join(d).join(".strata-tmp.4242.7");
            write(&tmp, b"half a copy");
            rustix::fs::setxattr(
                &tmp,
                "trusted.strata.tmp",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .unwrap();
        }
        (
            src.display().to_string(),
            vec![format!("upper={}", upper.display())],
        )
    });
    assert_eq!(names(&m.m("d")), ["f"]);
    assert!(names(&m.m("upper_only")).is_empty());
    let rm = run(Command::new("rm")
        .arg("-rf")
        .arg(m.m("d"))
        .arg(m.m("upper_only")));
    assert!(
        rm.status.success(),
        "rm -rf of directories holding a stale temporary: {}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert!(names(&m.mnt).is_empty());
}

/// Renaming a lower directory copies its tree up: hard links inside it must
/// stay hard links (before the move the mount showed them as one inode).
#[test]
fn renaming_a_lower_directory_keeps_hard_links_inside_it() {
    let m = overlay(|src| {
        fs::create_dir_all(src.join("d/sub")).unwrap();
        write(&src.join("d/h1"), b"linked");
        fs::hard_link(src.join("d/h1"), src.join("d/sub/h2")).unwrap();
    });
    let (a, b) = (lstat(&m.m("d/h1")), lstat(&m.m("d/sub/h2")));
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "before the move");
    fs::rename(m.m("d"), m.m("e")).unwrap();
    let (a, b) = (lstat(&m.m("e/h1")), lstat(&m.m("e/sub/h2")));
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), 2),
        "after the move: e/h1 and e/sub/h2 are no longer one file"
    );
    let (ua, ub) = (lstat(&up(&m, "e/h1")), lstat(&up(&m, "e/sub/h2")));
    assert_eq!(ua.ino(), ub.ino(), "the upper copies are not linked");
    write(&m.m("e/h1"), b"changed");
    assert_eq!(read(&m.m("e/sub/h2")), "changed");
}

/// SOURCE `image` alone (no name after it) is a directory called `image`,
/// as `data` would be: it must not be taken for an image layer.
#[test]
fn a_directory_named_image_is_still_a_directory() {
    let scratch = scratch_dir();
    let d = scratch.path();
    fs::create_dir_all(d.join("image")).unwrap();
    fs::create_dir_all(d.join("other")).unwrap();
    write(&d.join("image/f"), b"in a directory called image");
    let mut failures = Vec::new();
    for source in ["image", "other:image"] {
        let mnt = d.join(format!("mnt-{}", source.replace(':', "-")));
        fs::create_dir(&mnt).unwrap();
        let out = output_with_timeout(
            Command::new(STRATA)
                .current_dir(d)
                .args(["mount", source])
                .arg(&mnt)
                .env("STRATA_STATE_DIR", d.join("state"))
                .env_remove("RUST_LOG"),
            Duration::from_secs(30),
        )
        .expect("mount timed out");
        let mounted = fstype_at(&mnt).is_some();
        let content = fs::read(mnt.join("f")).ok();
        if mounted {
            let _ = rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::DETACH);
        }
        if !out.status.success() || content.as_deref() != Some(&b"in a directory called image"[..])
        {
            failures.push(format!(
                "strata mount {source} (cwd with a directory 'image'): exit {:?}, stderr {:?}, f read {content:?}",
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A read-only open racing the copy-up that a writer's open starts: the
/// reader gets the file (lower or copied-up content), never an error, even
/// when the writer's handle has already made the copy the inode's
/// passthrough file.
#[test]
fn reading_a_lower_file_while_a_writer_copies_it_up_never_fails() {
    const FILES: usize = 300;
    let m = overlay(|src| {
        for i in 0..FILES {
            write(
                &src.join(format!("f{i:03}")),
                format!("file {i:03}\n").as_bytes(),
            );
        }
    });
    let next = std::sync::atomic::AtomicUsize::new(0);
    let problems = std::sync::Mutex::new(Vec::<String>::new());
    std::thread::scope(|s| {
        // Readers open the file the writer is about to open, and the next.
        for t in 0..2 {
            let (m, next, problems) = (&m, &next, &problems);
            s.spawn(move || {
                loop {
                    let n = next.load(std::sync::atomic::Ordering::Relaxed) + t;
                    if n >= FILES {
                        break;
                    }
                    match fs::read_to_string(m.m(&format!("f{n:03}"))) {
                        Ok(c) if c.starts_with(&format!("file {n:03}\n")) => {}
                        other => problems.lock().unwrap().push(format!("f{n:03}: {other:?}")),
                    }
                }
            });
        }
        let mut handles = Vec::new();
        for i in 0..FILES {
            next.store(i, std::sync::atomic::Ordering::Relaxed);
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(m.m(&format!("f{i:03}")))
                .unwrap_or_else(|e| panic!("open f{i:03} for append: {e}"));
            f.write_all(b"more\n").unwrap();
            handles.push(f);
        }
        next.store(FILES, std::sync::atomic::Ordering::Relaxed);
    });
    let problems = problems.into_inner().unwrap();
    assert!(
        problems.is_empty(),
        "{} failed reads, first: {}\ndaemon log:\n{}",
        problems.len(),
        problems[..problems.len().min(10)].join("\n"),
        m.log()
    );
    for i in 0..FILES {
        assert_eq!(
            read(&m.m(&format!("f{i:03}"))),
            format!("file {i:03}\nmore\n")
        );
    }
}

/// Readers and writers busy in a lower directory while it is renamed back
/// and forth: a reader sees a file's content or ENOENT, never other data or
/// an error; no write is lost.
#[test]
fn renaming_a_busy_lower_directory_loses_nothing() {
    const FILES: usize = 60;
    let m = overlay(|src| {
        fs::create_dir(src.join("a")).unwrap();
        for i in 0..FILES {
            write(
                &src.join(format!("a/f{i:02}")),
                format!("file {i:02}\n").as_bytes(),
            );
        }
    });
    let stop = std::sync::atomic::AtomicBool::new(false);
    let problems = std::sync::Mutex::new(Vec::<String>::new());
    std::thread::scope(|s| {
        // Readers: whichever name the directory has now.
        for t in 0..3 {
            let (m, stop, problems) = (&m, &stop, &problems);
            s.spawn(move || {
                let mut i = t;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = i % FILES;
                    for dir in ["a", "b"] {
                        match fs::read_to_string(m.m(&format!("{dir}/f{n:02}"))) {
                            Ok(c) if c.starts_with(&format!("file {n:02}\n")) => {}
                            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                            other => problems
                                .lock()
                                .unwrap()
                                .push(format!("{dir}/f{n:02}: {other:?}")),
                        }
                    }
                    i += 1;
                }
            });
        }
        // The readers stop when this scope's body ends, also by a panic.
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        // A writer appending to every file through open descriptors taken
        // before the renames start.
        let mut handles: Vec<fs::File> = (0..FILES)
            .map(|i| {
                fs::OpenOptions::new()
                    .append(true)
                    .open(m.m(&format!("a/f{i:02}")))
                    .unwrap()
            })
            .collect();
        for round in 0..10 {
            let (from, to) = if round % 2 == 0 {
                ("a", "b")
            } else {
                ("b", "a")
            };
            fs::rename(m.m(from), m.m(to))
                .unwrap_or_else(|e| panic!("round {round}: rename {from} {to}: {e}"));
            for (i, f) in handles.iter_mut().enumerate() {
                f.write_all(format!("round {round} {i:02}\n").as_bytes())
                    .unwrap_or_else(|e| panic!("round {round}: write f{i:02}: {e}"));
            }
        }
    });
    let problems = problems.into_inner().unwrap();
    assert!(
        problems.is_empty(),
        "{}\ndaemon log:\n{}",
        problems[..problems.len().min(20)].join("\n"),
        m.log()
    );
    assert_eq!(names(&m.mnt), ["a"]);
    for i in 0..FILES {
        let mut want = format!("file {i:02}\n");
        for round in 0..10 {
            want.push_str(&format!("round {round} {i:02}\n"));
        }
        assert_eq!(read(&m.m(&format!("a/f{i:02}"))), want, "a/f{i:02}");
    }
    assert_no_temporaries(&m);
}

#[test]
fn writes_by_other_users_clear_setuid_and_setgid_on_the_copy() {
    let m = overlay(|_| {});
    let modes = modes_after_unprivileged_writes(&m.mnt, |n| up(&m, n), 0o6777);
    assert_eq!(modes, [0o777, 0o777, 0o777, 0o6777]);
    // lower files: the copy-up keeps the bits, the write clears them
    let m = overlay(|src| {
        for n in ["su-write", "su-trunc", "su-otrunc"] {
            fs::write(src.join(n), b"data").unwrap();
            fs::set_permissions(src.join(n), fs::Permissions::from_mode(0o6777)).unwrap();
        }
    });
    as_nobody_ok(&format!(
        "echo more >> {0}/su-write && truncate -s 1 {0}/su-trunc && echo new > {0}/su-otrunc",
        m.mnt.display()
    ));
    for n in ["su-write", "su-trunc", "su-otrunc"] {
        assert_eq!(
            fs::metadata(up(&m, n)).unwrap().mode() & 0o7777,
            0o777,
            "{n}"
        );
        assert_eq!(
            fs::metadata(m.s(n)).unwrap().mode() & 0o7777,
            0o6777,
            "{n}: lower untouched"
        );
    }
}

/// Host lowers are watched, so the kernel caches their names, attributes,
/// listings and data as long as an image's; what changes outside the mount
/// must still show (an unwatched lower would stay stale for an hour).
#[test]
fn outside_changes_to_a_host_lower_show_through_the_long_caches() {
    let m = overlay(|src| {
        fs::create_dir(src.join("d")).unwrap();
        fs::write(src.join("d/a"), b"one").unwrap();
        fs::write(src.join("d/gone"), b"x").unwrap();
    });
    // warm every cache: listing, entries, attributes, data
    assert_eq!(names(&m.m("d")), ["a", "gone"]);
    assert_eq!(fs::read(m.m("d/a")).unwrap(), b"one");
    assert_eq!(fs::metadata(m.m("d/gone")).unwrap().len(), 1);

    fs::write(m.s("d/new"), b"n").unwrap();
    fs::remove_file(m.s("d/gone")).unwrap();
    fs::write(m.s("d/a"), b"two!").unwrap(); // same inode, new data
    let limit = Duration::from_secs(5);
    assert!(
        wait_until(limit, || names(&m.m("d")) == ["a", "new"]),
        "listing: {:?}",
        names(&m.m("d"))
    );
    assert!(wait_until(limit, || !m.m("d/gone").exists()));
    assert!(wait_until(limit, || fs::read(m.m("d/a")).unwrap() == b"two!"));
    assert_eq!(fs::metadata(m.m("d/a")).unwrap().len(), 4);
    // a copied-up file no longer follows its lower
    fs::write(m.m("d/new"), b"mine").unwrap();
    fs::write(m.s("d/new"), b"theirs").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fs::read(m.m("d/new")).unwrap(), b"mine");
}

/// A directory merged from two host lowers: a change in the lower one shows
/// as well as a change in the top one (the watch maps both host directories
/// to the one node).
#[test]
fn outside_changes_in_either_merged_lower_directory_show() {
    let m = Mounted::build_with(&[], &[], |dir| {
        let (l1, l2, upper) = (dir.join("l1"), dir.join("l2"), dir.join("upper"));
        for d in [&l1, &l2] {
            fs::create_dir_all(d.join("d")).unwrap();
        }
        fs::write(l1.join("d/top"), b"").unwrap();
        fs::write(l2.join("d/below"), b"").unwrap();
        fs::create_dir(&upper).unwrap();
        (
            format!("{}:{}", l1.display(), l2.display()),
            vec![format!("upper={}", upper.display())],
        )
    });
    let l = |rel: &str| m.dir.path().join(rel);
    assert_eq!(names(&m.m("d")), ["below", "top"]);
    fs::write(l("l2/d/new-below"), b"").unwrap();
    let limit = Duration::from_secs(5);
    assert!(
        wait_until(limit, || names(&m.m("d")) == ["below", "new-below", "top"]),
        "after a create in the lower directory: {:?}",
        names(&m.m("d"))
    );
    fs::write(l("l1/d/new-top"), b"").unwrap();
    assert!(
        wait_until(limit, || names(&m.m("d"))
            == ["below", "new-below", "new-top", "top"]),
        "after a create in the top directory: {:?}",
        names(&m.m("d"))
    );
}

/// An upper file removed behind the mount's back whose inode number the host
/// then gives to a new upper file: the mount serves the new file as a new
/// object, not through the old file's handle.
#[test]
fn a_reused_upper_inode_number_is_a_new_object() {
    let m = Mounted::overlay(&["cache.fds=16"], |_| {});
    fs::write(up(&m, "old"), b"old").unwrap();
    let old_ino = fs::metadata(up(&m, "old")).unwrap().ino();
    assert!(fs::metadata(m.m("old")).is_ok());
    // Push the node's descriptor (which pins the inode) out of the cache.
    for i in 0..64 {
        fs::write(up(&m, &format!("other{i}")), b"").unwrap();
        assert!(fs::metadata(m.m(&format!("other{i}"))).is_ok());
    }
    fs::remove_file(up(&m, "old")).unwrap();
    // ext4 and xfs soon hand a freed number out again: find the file that got it.
    let reused = (0..1000).find_map(|i| {
        let name = format!("new{i}");
        fs::write(up(&m, &name), b"new").unwrap();
        (fs::metadata(up(&m, &name)).unwrap().ino() == old_ino).then_some(name)
    });
    let Some(name) = reused else {
        eprintln!("the scratch filesystem did not reuse the inode number: nothing to check");
        return;
    };
    let via = m.m(&name);
    fs::set_permissions(&via, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod of the new file through the mount: {e}"));
    assert_eq!(fs::metadata(up(&m, &name)).unwrap().mode() & 0o777, 0o600);
    assert_eq!(fs::read(&via).unwrap(), b"new");
}

/// Lower files are read through the daemon: the mount's readahead asks for
/// whole 1 MiB requests (or what `readahead=` says) instead of 128 KiB.
#[test]
fn the_mount_reads_ahead_a_whole_request() {
    let readahead = |m: &Mounted| {
        let dev = fs::metadata(&m.mnt).unwrap().dev();
        let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
        fs::read_to_string(format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb"))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(readahead(&overlay(|_| {})), "1024");
    assert_eq!(
        readahead(&Mounted::overlay(&["readahead=256"], |_| {})),
        "256"
    );
}

/// What a descriptor opened read-only before a copy-up reads afterwards:
/// kernel overlayfs (since 4.19) gives it the upper's data, so must we. The
/// reader has read (and cached) the start before the writer changes the
/// start, appends past it, and truncates a second file.
fn readers_follow_the_copy_up(m: &Mounted) {
    use std::os::unix::fs::FileExt;
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let reader = fs::File::open(m.m("big")).unwrap();
    let mut head = vec![0u8; 4096];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, big[..4096]);
    let short = fs::File::open(m.m("short")).unwrap();
    let mut buf = [0u8; 5];
    short.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"lower");

    let writer = fs::OpenOptions::new().write(true).open(m.m("big")).unwrap();
    writer.write_all_at(b"NEW START", 0).unwrap();
    writer.write_all_at(b"appended", big.len() as u64).unwrap();
    writer.write_all_at(b"middle", 200_000).unwrap();
    drop(writer);
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.m("short"))
        .unwrap()
        .write_all(b"upper!")
        .unwrap();

    let mut want = big.clone();
    want[..9].copy_from_slice(b"NEW START");
    want[200_000..200_006].copy_from_slice(b"middle");
    want.extend_from_slice(b"appended");
    let mut got = vec![0u8; want.len() + 100];
    let n = reader.read_at(&mut got, 0).unwrap();
    let mut total = n;
    while total < got.len() {
        match reader.read_at(&mut got[total..], total as u64).unwrap() {
            0 => break,
            k => total += k,
        }
    }
    got.truncate(total);
    assert_eq!(got.len(), want.len(), "the reader sees the old size");
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "the reader sees the lower's old data");
    let mut again = [0u8; 16];
    let n = short.read_at(&mut again, 0).unwrap();
    assert_eq!(&again[..n], b"upper!");
}

fn copy_up_sources(src: &Path) {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(src.join("big"), big).unwrap();
    fs::write(src.join("short"), b"lower file").unwrap();
}

#[test]
fn a_descriptor_opened_before_a_copy_up_reads_the_copy() {
    let m = overlay(copy_up_sources);
    readers_follow_the_copy_up(&m);
}

#[test]
fn a_descriptor_opened_before_a_copy_up_reads_the_copy_from_an_image() {
    let m = Mounted::build_with(&[], &[], |dir| {
        let src = dir.join("imgsrc");
        fs::create_dir(&src).unwrap();
        copy_up_sources(&src);
        let store = dir.join("store");
        build_image(&src, &store, "cu");
        let upper = dir.join("upper");
        fs::create_dir(&upper).unwrap();
        (
            "image:cu".to_owned(),
            vec![
                format!("upper={}", upper.display()),
                format!("store={}", store.display()),
            ],
        )
    });
    readers_follow_the_copy_up(&m);
}
