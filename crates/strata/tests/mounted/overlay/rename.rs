//! Renames of lower files and directories: onto empty, whited-out and
//! occupied names, NOREPLACE and EXCHANGE, away and back, after changes
//! inside, and while readers and writers are busy in the directory.

use super::*;

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
    let lower = m.src.display().to_string();
    let k = kernel_overlay(&mut m, &lower);
    assert_same_tree(
        "strata vs kernel overlayfs",
        &strata,
        &snapshot(&k.mnt, true),
    );
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
