//! Inode numbers and hard links: stable `st_ino` across copy-up, rename,
//! dropped caches and remounts; links made through the mount and links the
//! lower had; an upper inode number the host reuses.

use std::collections::HashSet;

use super::*;

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
