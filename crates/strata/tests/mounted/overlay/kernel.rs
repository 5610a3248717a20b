//! Kernel overlayfs mounting the layers strata wrote shows the same tree
//! strata showed: the on-disk format (whiteouts, opaque directories, copied-up
//! metadata) is the kernel's.

use super::*;
use rustix::fs::{FileType, Mode};

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
    let lower = m.src.display().to_string();
    let k = kernel_overlay(&mut m, &lower);
    let seen_by_kernel = snapshot(&k.mnt, true);
    assert_same_tree(
        "strata (first) vs kernel overlayfs (second)",
        &seen_by_strata,
        &seen_by_kernel,
    );
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
    let d = m.dir.path();
    let lowers = format!("{}:{}", d.join("l1").display(), d.join("l2").display());
    let k = kernel_overlay(&mut m, &lowers);
    assert_same_tree(
        "strata (first) vs kernel overlayfs (second)",
        &strata,
        &snapshot(&k.mnt, true),
    );
}
