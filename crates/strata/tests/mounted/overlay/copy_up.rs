//! Copy-up: what a change to a lower object puts in the upper (the data,
//! owner, mode, times and xattrs; the changed object and its parents, nothing
//! else), with truncating and exclusive opens, concurrent writers, and an
//! upper on another filesystem than the lower.

use std::collections::{BTreeSet, HashSet};

use super::*;

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
