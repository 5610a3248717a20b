//! `strata image build|ls|verify|rm` and `strata gc`, run as the built binary
//! against a store in a temporary directory (no mounting).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use strata_image::{Digest, Image, Store};

use crate::common::ImageScratch as Scratch;
use crate::common::STRATA;

/// The command failed with `code` and exactly one `strata: ` line on stderr
/// (no panic); returns that line.
fn one_line_failure(out: &Output, code: i32) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got {err:?}");
    assert!(lines[0].starts_with("strata: "), "{err}");
    lines[0].to_owned()
}

const SAME: &[u8] = b"same content\n";
const UNIQUE: &[u8] = b"unique\n";

/// A small tree: two files with equal content, a hard link, a symlink, an
/// empty file, a subdirectory with a nested empty directory.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    fs::write(root.join("a.txt"), SAME).unwrap();
    fs::write(root.join("sub/b.txt"), SAME).unwrap();
    fs::write(root.join("sub/unique"), UNIQUE).unwrap();
    fs::hard_link(root.join("sub/unique"), root.join("hard")).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
}

/// Lets gc see blobs as older than its start (it keeps fresher ones).
fn settle() {
    std::thread::sleep(Duration::from_millis(50));
}

#[test]
fn build_ls_verify() {
    let s = Scratch::new();
    let src = s.path("src");
    make_tree(&src);
    let src = src.to_str().unwrap();
    let out = s.ok(&["image", "build", src, "--name", "t1"]);
    // 5 file names (one a second name of an inode), 3 directories with the
    // root; content counts each inode once (13 + 13 + 7 + 0); new blobs are
    // the three distinct contents with 16-byte headers (29 + 23 + 16); b.txt
    // deduplicates against a.txt.
    assert!(
        out.starts_with(
            "built image t1: 5 files (1 hard link), 3 dirs, 1 symlink; \
             33 B content, 68 B stored, 1 dedup hit; "
        ),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.trim_end().ends_with('s'), "{out}");

    // The same content again: everything deduplicated, nothing stored.
    let out = s.ok(&["image", "build", src, "--name", "t2"]);
    assert!(
        out.contains("33 B content, 0 B stored, 4 dedup hits"),
        "{out}"
    );

    let ls = s.ok(&["image", "ls"]);
    let lines: Vec<&str> = ls.lines().collect();
    assert_eq!(lines.len(), 3, "{ls}");
    assert!(lines[0].starts_with("NAME"), "{ls}");
    for (line, name) in lines[1..].iter().zip(["t1", "t2"]) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // name, entries (root + 5 + 3), size "33 B", created
        assert_eq!(&cols[..4], &[name, "9", "33", "B"], "{ls}");
        assert!(cols[4].ends_with('Z') && cols[4].len() == 20, "{ls}");
    }
    let json: serde_json::Value = serde_json::from_str(&s.ok(&["image", "ls", "--json"])).unwrap();
    let rows = json.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["name"], "t1");
    assert_eq!(rows[0]["entries"], 9);
    assert_eq!(rows[0]["total_size"], 33);
    assert!(rows[0]["created"].as_str().unwrap().ends_with('Z'));
    assert!(rows[0]["created_unix_ns"].as_u64().unwrap() > 0);

    // A second build under a taken name is bad input unless --replace.
    let out = s.run(&["image", "build", src, "--name", "t1"]);
    let line = one_line_failure(&out, 2);
    assert!(
        line.contains("\"t1\" already exists") && line.contains("--replace"),
        "{line}"
    );
    fs::write(s.path("src/new"), b"new file").unwrap();
    let out = s.ok(&["image", "build", src, "--name", "t1", "--replace"]);
    assert!(out.starts_with("built image t1: 6 files"), "{out}");

    assert_eq!(s.ok(&["image", "verify", "t1"]), "t1: 4 blobs OK\n");
    // --store wins over $STRATA_STORE.
    let other = s.path("other");
    let out = Command::new(STRATA)
        .args(["image", "ls", "--store", other.to_str().unwrap()])
        .env("STRATA_STORE", s.store())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("no images in "),
        "{out:?}"
    );
    assert!(!other.exists(), "ls created a store");
}

#[test]
fn verify_names_corrupt_and_missing_blobs() {
    let s = Scratch::new();
    let src = s.path("src");
    make_tree(&src);
    s.ok(&["image", "build", src.to_str().unwrap(), "--name", "img"]);
    // Overwrite bytes in the middle of the blob shared by a.txt and sub/b.txt.
    let p = s.blob(SAME);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
    let mut data = fs::read(&p).unwrap();
    let mid = 16 + (data.len() - 16) / 2; // in the content, past the header
    data[mid..mid + 3].copy_from_slice(b"XYZ");
    fs::write(&p, data).unwrap();

    let out = s.run(&["image", "verify", "img"]);
    let line = one_line_failure(&out, 1);
    assert_eq!(line, "strata: img: 1 of 3 blobs corrupt or missing");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let hex = Digest::of(SAME).to_hex();
    assert_eq!(
        stdout,
        format!("{hex}: corrupt (content does not match its digest); used by /a.txt, /sub/b.txt\n")
    );

    // A missing blob is named with both names of its (hard-linked) inode.
    fs::remove_file(s.blob(UNIQUE)).unwrap();
    let out = s.run(&["image", "verify", "img"]);
    one_line_failure(&out, 1);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let unique = Digest::of(UNIQUE).to_hex();
    assert!(
        stdout.contains(&format!("{unique}: missing; used by /hard, /sub/unique\n")),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
}

#[test]
fn rm_and_gc() {
    let s = Scratch::new();
    let src = s.path("src");
    make_tree(&src);
    s.ok(&["image", "build", src.to_str().unwrap(), "--name", "t1"]);
    // t2 shares SAME with t1.
    let src2 = s.path("src2");
    fs::create_dir(&src2).unwrap();
    fs::write(src2.join("shared"), SAME).unwrap();
    fs::write(src2.join("own"), b"only in t2").unwrap();
    s.ok(&["image", "build", src2.to_str().unwrap(), "--name", "t2"]);

    // Cached copies of t1's blobs, and a cache left by another boot.
    let store = Store::open(&s.store()).unwrap();
    for c in [SAME, UNIQUE] {
        store.materialize(&Digest::of(c)).unwrap();
    }
    let old_boot = s.store().join("cache/00000000000000000000000000000000");
    fs::create_dir_all(old_boot.join("ab")).unwrap();
    fs::write(old_boot.join("ab/torn"), b"torn").unwrap();

    assert_eq!(
        s.ok(&["image", "rm", "t1"]),
        "removed image t1 (`strata gc` frees its blobs)\n"
    );
    assert_eq!(s.ok(&["image", "ls"]).lines().count(), 2); // header + t2
    settle();
    let out = s.ok(&["gc"]);
    // t1's own blobs (UNIQUE and the empty content) go; SAME stays for t2.
    assert!(
        out.contains("blobs:     removed 2 (39 B), kept 2\n"),
        "{out}"
    );
    // The other boot's file and the copy of UNIQUE go; SAME's stays.
    assert!(
        out.contains("cache:     removed 2 files (11 B), kept 1\n"),
        "{out}"
    );
    assert!(
        out.contains("archive indexes: removed 0 (0 B) unused for 30 days\n"),
        "{out}"
    );
    assert_eq!(out.lines().count(), 5, "{out}");
    assert!(!s.blob(UNIQUE).exists() && !s.blob(b"").exists());
    assert!(s.blob(SAME).exists() && !old_boot.exists());
    assert_eq!(s.ok(&["image", "verify", "t2"]), "t2: 2 blobs OK\n");

    // Removing an image that is in use (pinned as a mount pins it) is deferred.
    let pinned = Image::open(&store, "t2").unwrap();
    let out = s.ok(&["image", "rm", "t2"]);
    assert!(out.starts_with("image t2 is in use (mounted)"), "{out}");
    assert_eq!(out.lines().count(), 1);
    settle();
    let out = s.ok(&["gc"]);
    assert!(
        out.contains("blobs:     removed 0 (0 B), kept 2\n"),
        "{out}"
    );
    assert!(out.contains("0 retired, 1 still pinned"), "{out}");
    drop(pinned);
    let out = s.ok(&["gc"]);
    assert!(out.contains("blobs:     removed 2 ("), "{out}");
    assert!(
        out.contains("manifests: removed 1 retired, 0 still pinned"),
        "{out}"
    );
    assert!(out.contains("cache:     removed 1 file ("), "{out}");
    assert_eq!(
        s.ok(&["image", "ls"]),
        format!("no images in {}\n", s.store().display())
    );
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let s = Scratch::new();
    let src = s.path("src");
    make_tree(&src);
    let src = src.to_str().unwrap();
    let missing = s.path("nope");
    let missing = missing.to_str().unwrap();
    let file = s.path("src/a.txt");
    let file = file.to_str().unwrap();

    // Reading commands on a store that does not exist yet.
    let line = one_line_failure(&s.run(&["image", "verify", "ghost"]), 2);
    assert_eq!(
        line,
        format!(
            "strata: no image named \"ghost\": the store {} does not exist",
            s.store().display()
        )
    );
    one_line_failure(&s.run(&["image", "rm", "ghost"]), 2);
    assert!(s.ok(&["image", "ls"]).starts_with("no images in "));
    assert!(s.ok(&["gc"]).starts_with("no store at "));
    assert!(!s.store().exists(), "a reading command created the store");

    let line = one_line_failure(&s.run(&["image", "build", missing, "--name", "x"]), 2);
    assert_eq!(line, format!("strata: {missing}: no such directory"));
    let line = one_line_failure(&s.run(&["image", "build", file, "--name", "x"]), 2);
    assert_eq!(line, format!("strata: {file}: not a directory"));
    for bad in ["a/b", ".x", ""] {
        let line = one_line_failure(&s.run(&["image", "build", src, "--name", bad]), 2);
        assert!(line.contains("invalid image name"), "{bad:?}: {line}");
    }
    s.ok(&["image", "build", src, "--name", "real"]);
    for args in [
        &["image", "verify", "ghost"][..],
        &["image", "rm", "ghost"],
        &["image", "verify", "a/b"],
        &["image", "rm", ".x"],
    ] {
        one_line_failure(&s.run(args), 2);
    }
    // A store path that is a file.
    let line = one_line_failure(&s.run(&["image", "ls", "--store", file]), 2);
    assert!(line.ends_with("store is not a directory"), "{line}");
    one_line_failure(&s.run(&["gc", "--store", file]), 2);
    // clap's own errors exit 2 too.
    let out = s.run(&["image", "build", src]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    // Nothing was broken along the way.
    assert_eq!(s.ok(&["image", "verify", "real"]), "real: 3 blobs OK\n");
}

#[test]
fn broken_manifest_is_reported_not_fatal() {
    let s = Scratch::new();
    let src = s.path("src");
    make_tree(&src);
    s.ok(&["image", "build", src.to_str().unwrap(), "--name", "good"]);
    fs::write(s.store().join("images/broken"), b"not a manifest").unwrap();

    let ls = s.ok(&["image", "ls"]);
    let row = ls.lines().find(|l| l.starts_with("broken")).unwrap();
    assert!(row.contains("unreadable: manifest "), "{ls}");
    assert!(ls.lines().any(|l| l.starts_with("good ")), "{ls}");
    let json: serde_json::Value = serde_json::from_str(&s.ok(&["image", "ls", "--json"])).unwrap();
    assert!(json[0]["error"].as_str().unwrap().contains("manifest"));
    assert_eq!(json[1]["name"], "good");

    let line = one_line_failure(&s.run(&["image", "verify", "broken"]), 1);
    assert!(line.contains("images/broken"), "{line}");
    // gc refuses to guess what the broken image used: nothing is deleted.
    settle();
    let line = one_line_failure(&s.run(&["gc"]), 1);
    assert!(
        line.starts_with("strata: gc stopped before deleting any blob: manifest "),
        "{line}"
    );
    assert!(s.blob(SAME).exists());
    s.ok(&["image", "rm", "broken"]);
    assert!(
        s.ok(&["gc"])
            .contains("blobs:     removed 0 (0 B), kept 3\n")
    );
    assert_eq!(s.ok(&["image", "verify", "good"]), "good: 3 blobs OK\n");
}

/// A FIFO (or a symlink) in `images/` is listed as unreadable, never opened
/// for reading: `ls` and `gc` return at once.
#[test]
fn a_fifo_in_images_does_not_hang_ls_or_gc() {
    let sc = Scratch::new();
    fs::create_dir(sc.path("src")).unwrap();
    fs::write(sc.path("src/f"), b"x").unwrap();
    sc.ok(&[
        "image",
        "build",
        sc.path("src").to_str().unwrap(),
        "--name",
        "base",
    ]);
    let fifo = sc.store().join("images/pipe");
    let st = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(st.success());
    std::os::unix::fs::symlink("/dev/zero", sc.store().join("images/zero")).unwrap();
    for args in [&["image", "ls"][..], &["image", "ls", "--json"], &["gc"]] {
        let mut child = Command::new(STRATA)
            .args(args)
            .env("STRATA_STORE", sc.store())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("strata {args:?} hangs on a FIFO in images/");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        if args[0] == "gc" {
            // gc stops before deleting anything, naming the entry.
            assert!(
                stderr.contains("pipe") || stderr.contains("zero"),
                "{stderr}"
            );
        } else {
            assert!(out.status.success(), "{stderr}");
            assert!(stdout.contains("base"), "{stdout}");
            assert!(stdout.contains("not a regular file"), "{stdout}");
        }
    }
}
