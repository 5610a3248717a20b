//! Merged listings: upper and lower names once each, types and inode numbers
//! as `stat` gives them, while names are created and copied up, and in large
//! directories.

use std::collections::{BTreeSet, HashSet};
use std::os::unix::fs::DirEntryExt;

use super::*;
use rustix::fs::Mode;

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
