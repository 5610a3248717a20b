//! Removing lower objects: whiteouts for unlinked names, opaque directories
//! made where a lower one was removed, and rmdir of merged directories.

use super::*;

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
