//! Images as overlay lowers on real mounts: a Python venv built into an image
//! and run from the mount, corrupt blobs, gc while mounted, read-only and
//! concurrent mounts, and stacks of images and host directories.

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::ImageScratch as Scratch;
use crate::common::*;
use rustix::fs::{CWD, FileType, Mode};
use strata_image::Digest;

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Deterministic, file-specific content.
fn content(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The extra objects added to an image source: xattrs, a hard link pair,
/// symlinks, an empty file, setuid and private modes, a fifo, a foreign
/// owner, a nanosecond mtime.
fn add_extras(root: &Path) {
    let x = root.join("extras");
    fs::create_dir(&x).unwrap();
    fs::write(x.join("xattrs"), b"with xattrs\n").unwrap();
    set_xattr(&x.join("xattrs"), "user.mime_type", b"text/plain");
    set_xattr(&x.join("xattrs"), "user.binary", &[0, 1, 2, 255]);
    fs::write(x.join("hard_a"), b"linked\n").unwrap();
    fs::hard_link(x.join("hard_a"), x.join("hard_b")).unwrap();
    std::os::unix::fs::symlink("xattrs", x.join("link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", x.join("dangling")).unwrap();
    fs::write(x.join("empty"), b"").unwrap();
    fs::write(x.join("suid"), b"#!/bin/sh\necho suid\n").unwrap();
    fs::set_permissions(x.join("suid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(x.join("private"), b"secret\n").unwrap();
    fs::set_permissions(x.join("private"), fs::Permissions::from_mode(0o600)).unwrap();
    rustix::fs::mknodat(
        CWD,
        x.join("fifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    fs::write(x.join("owned"), b"someone else's\n").unwrap();
    std::os::unix::fs::chown(x.join("owned"), Some(1234), Some(5678)).unwrap();
    fs::create_dir(x.join("closed")).unwrap();
    fs::set_permissions(x.join("closed"), fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(x.join("closed"), Some(42), Some(43)).unwrap();
    fs::write(x.join("old"), b"old\n").unwrap();
    set_mtime(&x.join("old"), 1_000_000_000, 123_456_789);
}

fn python3() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys, venv, ensurepip; print(sys.executable)"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A venv (with pip, from the bundled wheel) plus [`add_extras`], built into
/// image "venv". Compiled bytecode is removed first, so running the
/// interpreter from the mount has to write it. `None` (test skipped) without
/// python3.
fn venv_image(s: &Scratch) -> Option<PathBuf> {
    let Some(py) = python3() else {
        eprintln!("SKIPPED: python3 with venv and ensurepip is not installed");
        return None;
    };
    let src = s.path("venv");
    let out = output_with_timeout(
        Command::new(&py).args(["-m", "venv"]).arg(&src),
        Duration::from_secs(120),
    )
    .expect("python3 -m venv timed out");
    assert!(
        out.status.success(),
        "python3 -m venv: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = Command::new("find")
        .arg(src.join("lib"))
        .args([
            "-name",
            "__pycache__",
            "-prune",
            "-exec",
            "rm",
            "-rf",
            "{}",
            "+",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    add_extras(&src);
    s.build(&src, "venv");
    Some(src)
}

fn diff_r(a: &Path, b: &Path) -> Output {
    output_with_timeout(
        Command::new("diff")
            .args(["-r", "--no-dereference", "-x", "fifo"])
            .arg(a)
            .arg(b),
        Duration::from_secs(60),
    )
    .expect("diff timed out")
}

#[test]
fn a_venv_image_mounted_with_an_upper_matches_its_source() {
    let s = Scratch::new();
    let Some(src) = venv_image(&s) else { return };
    let m = s.mount("image:venv", true, &[]);
    let out = diff_r(&src, &m.mnt);
    assert!(
        out.status.success(),
        "diff -r: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Types, modes, owners, sizes, contents, symlink targets, mtimes,
    // xattrs and hard links.
    assert_same_tree(
        "source vs mount",
        &snapshot(&src, true),
        &snapshot(&m.mnt, true),
    );
    let (a, b) = (
        fs::metadata(m.m("extras/hard_a")).unwrap(),
        fs::metadata(m.m("extras/hard_b")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!((a.nlink(), b.nlink()), (2, 2));
    assert_eq!(
        fs::read_link(m.m("extras/dangling")).unwrap(),
        Path::new("/nonexistent/target")
    );
    assert_eq!(
        fs::symlink_metadata(m.m("extras/suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    // Nothing was copied up by reading.
    assert!(names(&m.upper()).is_empty(), "{:?}", names(&m.upper()));
}

#[test]
fn the_venv_interpreter_runs_from_the_mount_and_writes_only_the_upper() {
    let s = Scratch::new();
    let Some(src) = venv_image(&s) else { return };
    let src_before = snapshot(&src, true);
    let store_before = s.store_listing();
    let m = s.mount("image:venv", true, &[]);
    let python = m.m("bin/python");
    let run = |args: &[&str]| {
        let out = output_with_timeout(
            Command::new(&python)
                .args(args)
                .env_remove("PYTHONDONTWRITEBYTECODE")
                .env_remove("PYTHONPYCACHEPREFIX")
                .env_remove("PYTHONHOME")
                .env_remove("PYTHONPATH")
                .env_remove("VIRTUAL_ENV"),
            Duration::from_secs(60),
        )
        .unwrap_or_else(|| panic!("{} {args:?} timed out", python.display()));
        assert!(
            out.status.success(),
            "{} {args:?}: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let prefix = run(&[
        "-c",
        "import pip._internal, json, email, sqlite3, sys; print(sys.prefix)",
    ]);
    assert_eq!(prefix.trim(), m.mnt.to_str().unwrap(), "venv prefix");
    let version = run(&["-m", "pip", "--version"]);
    assert!(
        version.contains(m.mnt.to_str().unwrap()),
        "pip runs from elsewhere: {version}"
    );

    // The bytecode went to the upper, below pip's own directories.
    let up = snapshot(&m.upper(), false);
    let pycs: Vec<&String> = up.objs.keys().filter(|p| p.ends_with(".pyc")).collect();
    assert!(
        pycs.iter()
            .any(|p| p.contains("site-packages/pip/_internal/__pycache__/")),
        "no pip bytecode in the upper: {pycs:?}"
    );
    for (p, o) in &up.objs {
        assert!(
            o.kind == 'd' || p.ends_with(".pyc"),
            "unexpected object in the upper: {p} {o:?}"
        );
        assert!(!p.contains(".strata-tmp"), "temporary left: {p}");
    }
    // Once written, the bytecode is used: a second run writes nothing new.
    run(&["-c", "import pip._internal"]);
    let again = snapshot(&m.upper(), false);
    assert_eq!(
        again.objs.keys().collect::<Vec<_>>(),
        up.objs.keys().collect::<Vec<_>>()
    );
    // The source and the store are untouched.
    assert_same_tree("venv source", &src_before, &snapshot(&src, true));
    assert_eq!(s.store_listing(), store_before, "the store changed");
    // Without an upper the interpreter runs too (its bytecode not written).
    let ro = s.mount("image:venv", false, &[]);
    let (ok, out, err) = venv_python(&ro, &["-c", "import pip._internal, json; print('ok')"]);
    assert!(ok && out.trim() == "ok", "read-only venv: {out}{err}");
}

#[test]
fn a_corrupt_blob_fails_only_its_file_and_verify_names_it() {
    let s = Scratch::new();
    let src = s.path("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    let bad = content(1, 300_000);
    let good = content(2, 300_000);
    fs::write(src.join("sub/corrupt-me"), &bad).unwrap();
    fs::write(src.join("intact"), &good).unwrap();
    fs::write(src.join("small"), b"small\n").unwrap();
    s.build(&src, "img");
    let blob = s.blob(&bad);
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
    let mut data = fs::read(&blob).unwrap();
    let mid = data.len() / 2;
    for b in &mut data[mid..mid + 64] {
        *b = !*b;
    }
    fs::write(&blob, data).unwrap();

    let m = s.mount("image:img", true, &[]);
    assert_eq!(errno(fs::read(m.m("sub/corrupt-me"))), libc::EIO);
    assert_eq!(read(&m.m("intact")), good);
    assert_eq!(read(&m.m("small")), b"small\n");
    // Not cached as good by the failed read; metadata still served.
    assert_eq!(errno(fs::read(m.m("sub/corrupt-me"))), libc::EIO);
    assert_eq!(
        fs::metadata(m.m("sub/corrupt-me")).unwrap().len(),
        bad.len() as u64
    );
    // A copy-up cannot read it either, and leaves nothing half-made.
    assert_eq!(
        errno(
            fs::OpenOptions::new()
                .append(true)
                .open(m.m("sub/corrupt-me"))
        ),
        libc::EIO
    );
    let up = snapshot(&m.upper(), false);
    assert!(
        !up.objs
            .keys()
            .any(|p| p.ends_with("corrupt-me") || p.contains(".strata-tmp")),
        "{:?}",
        up.objs.keys()
    );
    assert!(is_mounted(&m.mnt));
    assert!(
        m.log().contains("sub/corrupt-me"),
        "the daemon log does not name the file: {}",
        m.log()
    );

    let out = s.run(&["image", "verify", "img"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&Digest::of(&bad).to_hex()) && stdout.contains("/sub/corrupt-me"),
        "{stdout}"
    );
    assert!(!stdout.contains("/intact"), "{stdout}");

    // The user can still replace it.
    fs::remove_file(m.m("sub/corrupt-me")).unwrap();
    fs::write(m.m("sub/corrupt-me"), b"replaced").unwrap();
    assert_eq!(read(&m.m("sub/corrupt-me")), b"replaced");
    assert_eq!(read(&m.m("intact")), good);
}

#[test]
fn gc_while_mounted_keeps_the_image_readable_and_frees_it_after() {
    let s = Scratch::new();
    let src = s.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    let files: Vec<(String, Vec<u8>)> = (0..40)
        .map(|i| {
            (
                format!("d/f{i:02}"),
                content(100 + i, 1000 + 997 * i as usize),
            )
        })
        .collect();
    for (p, c) in &files {
        fs::write(src.join(p), c).unwrap();
    }
    s.build(&src, "doomed");
    let mut m = s.mount("image:doomed", true, &[]);
    for (p, c) in &files[..5] {
        assert_eq!(read(&m.m(p)), *c);
    }
    s.ok(&["image", "rm", "doomed"]);
    std::thread::sleep(Duration::from_millis(50)); // gc spares blobs newer than its start
    s.ok(&["gc"]);
    // Every file, also those never read before, and the listing.
    for (p, c) in &files {
        assert_eq!(read(&m.m(p)), *c, "{p} after gc");
    }
    assert_eq!(names(&m.m("d")).len(), files.len());
    assert!(!s.ok(&["image", "ls"]).contains("doomed"));
    m.unmount();

    std::thread::sleep(Duration::from_millis(50));
    s.ok(&["gc"]);
    let blobs = snapshot(&s.store().join("blobs"), false);
    let left: Vec<&String> = blobs
        .objs
        .iter()
        .filter(|(_, o)| o.kind == 'f')
        .map(|(p, _)| p)
        .collect();
    assert!(left.is_empty(), "blobs left after gc: {left:?}");
    assert!(names(&s.store().join("images/.removed")).is_empty());
}

#[test]
fn read_only_image_mounts_refuse_writes_and_can_be_mounted_twice() {
    let s = Scratch::new();
    let src = s.path("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::write(src.join("file"), b"file\n").unwrap();
    fs::write(src.join("dir/inner"), b"inner\n").unwrap();
    std::os::unix::fs::symlink("file", src.join("link")).unwrap();
    s.build(&src, "ro");
    let m1 = s.mount("image:ro", false, &[]);
    let m2 = s.mount("image:ro", false, &[]);
    let p = |m: &Mounted, r: &str| m.m(r);
    for m in [&m1, &m2] {
        assert_eq!(read(&p(m, "file")), b"file\n");
        assert_eq!(read(&p(m, "dir/inner")), b"inner\n");
        assert_eq!(read(&p(m, "link")), b"file\n");
        assert_eq!(names(&m.mnt), ["dir", "file", "link"]);
    }
    let erofs = |what: &str, r: std::io::Result<()>| {
        assert_eq!(
            r.map_err(|e| e.raw_os_error()),
            Err(Some(libc::EROFS)),
            "{what}"
        );
    };
    erofs("mkdir", fs::create_dir(m1.m("new")));
    erofs("create", fs::write(m1.m("new"), b"x"));
    erofs(
        "open for writing",
        fs::OpenOptions::new()
            .write(true)
            .open(m1.m("file"))
            .map(drop),
    );
    erofs("unlink", fs::remove_file(m1.m("file")));
    erofs("rmdir", fs::remove_dir(m1.m("dir")));
    erofs("rename", fs::rename(m1.m("file"), m1.m("renamed")));
    erofs("symlink", std::os::unix::fs::symlink("x", m1.m("sl")));
    erofs("link", fs::hard_link(m1.m("file"), m1.m("hl")));
    erofs(
        "chmod",
        fs::set_permissions(m1.m("file"), fs::Permissions::from_mode(0o600)),
    );
    erofs(
        "setxattr",
        rustix::fs::setxattr(
            m1.m("file"),
            "user.x",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .map_err(Into::into),
    );
    erofs(
        "mknod",
        rustix::fs::mknodat(
            CWD,
            m1.m("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .map_err(Into::into),
    );
    // Still both readable, the first unmounted: the second goes on.
    assert_eq!(read(&m2.m("dir/inner")), b"inner\n");
    drop(m1);
    assert_eq!(read(&m2.m("file")), b"file\n");
    assert!(is_mounted(&m2.mnt));
}

#[test]
fn stacked_images_and_host_directories_resolve_top_first() {
    let s = Scratch::new();
    let (a, b, host) = (s.path("a"), s.path("b"), s.path("host"));
    for (root, tag) in [(&a, "a"), (&b, "b"), (&host, "host")] {
        fs::create_dir_all(root.join("dir")).unwrap();
        fs::write(root.join("common"), format!("from {tag}\n")).unwrap();
        fs::write(root.join(format!("only_{tag}")), format!("{tag} only\n")).unwrap();
        fs::write(
            root.join(format!("dir/{tag}_file")),
            format!("{tag} in dir\n"),
        )
        .unwrap();
    }
    s.build(&a, "a");
    s.build(&b, "b");

    let m = s.mount("image:a:image:b", false, &[]);
    assert_eq!(read(&m.m("common")), b"from a\n");
    assert_eq!(names(&m.mnt), ["common", "dir", "only_a", "only_b"]);
    assert_eq!(names(&m.m("dir")), ["a_file", "b_file"]);
    assert_eq!(read(&m.m("only_b")), b"b only\n");
    assert_eq!(read(&m.m("dir/b_file")), b"b in dir\n");
    drop(m);

    let host_before = snapshot(&host, true);
    let src = format!("image:a:{}", host.display());
    let m = s.mount(&src, true, &[]);
    assert_eq!(read(&m.m("common")), b"from a\n");
    assert_eq!(names(&m.mnt), ["common", "dir", "only_a", "only_host"]);
    assert_eq!(names(&m.m("dir")), ["a_file", "host_file"]);
    // Changes to either lower land in the upper.
    fs::write(m.m("only_host"), b"changed host\n").unwrap();
    fs::write(m.m("dir/a_file"), b"changed a\n").unwrap();
    fs::remove_file(m.m("dir/host_file")).unwrap();
    assert_eq!(read(&m.m("only_host")), b"changed host\n");
    assert_eq!(read(&m.m("dir/a_file")), b"changed a\n");
    assert_eq!(names(&m.m("dir")), ["a_file"]);
    assert_eq!(read(&m.upper().join("only_host")), b"changed host\n");
    assert_eq!(read(&m.upper().join("dir/a_file")), b"changed a\n");
    assert_same_tree("host lower", &host_before, &snapshot(&host, true));
}

/// Lower layers that carry overlayfs markers: whiteouts (0/0 character
/// devices) and opaque directories, as a former upper has.
fn layer_with_markers(top: &Path, bottom: &Path) {
    for d in ["keep", "opaque", "gone_dir", "merged"] {
        fs::create_dir_all(bottom.join(d)).unwrap();
    }
    fs::write(bottom.join("keep/b"), b"b").unwrap();
    fs::write(bottom.join("opaque/hidden"), b"hidden").unwrap();
    fs::write(bottom.join("gone_dir/x"), b"x").unwrap();
    fs::write(bottom.join("gone_file"), b"gone").unwrap();
    fs::write(bottom.join("merged/bottom"), b"bottom").unwrap();
    fs::write(bottom.join("replaced"), b"bottom version").unwrap();

    for d in ["opaque", "merged"] {
        fs::create_dir_all(top.join(d)).unwrap();
    }
    set_xattr(&top.join("opaque"), "trusted.overlay.opaque", b"y");
    fs::write(top.join("opaque/shown"), b"shown").unwrap();
    fs::write(top.join("merged/top"), b"top").unwrap();
    for w in ["gone_dir", "gone_file", "merged/nothing_below"] {
        rustix::fs::mknodat(
            CWD,
            top.join(w),
            FileType::CharacterDevice,
            Mode::empty(),
            0,
        )
        .unwrap();
    }
    fs::write(top.join("replaced"), b"top version").unwrap();
}

#[test]
fn image_layers_with_whiteouts_and_opaque_dirs_match_kernel_overlayfs() {
    let s = Scratch::new();
    let (top, bottom) = (s.path("top"), s.path("bottom"));
    layer_with_markers(&top, &bottom);
    s.build(&top, "top");
    s.build(&bottom, "bottom");

    let kmnt = s.path("kernel");
    fs::create_dir(&kmnt).unwrap();
    let lowers = format!("{}:{}", top.display(), bottom.display());
    let k = KernelOverlay::mount_lowers(&lowers, &kmnt);
    let kernel = snapshot(&k.mnt, true);
    drop(k);

    for source in [
        "image:top:image:bottom".to_owned(),
        format!("image:top:{}", bottom.display()),
    ] {
        let m = s.mount(&source, false, &[]);
        assert_same_tree(
            &format!("strata {source} (first) vs kernel overlayfs (second)"),
            &snapshot(&m.mnt, true),
            &kernel,
        );
    }
    assert_eq!(
        names(&s.mount("image:top:image:bottom", false, &[]).mnt),
        ["keep", "merged", "opaque", "replaced"]
    );
}

#[test]
fn image_files_read_the_same_with_and_without_kernel_passthrough() {
    let s = Scratch::new();
    let src = s.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"image content\n").unwrap();
    s.build(&src, "pt");
    let mut failures = Vec::new();
    for opts in [&[][..], &["passthrough=false"][..]] {
        for with_upper in [false, true] {
            let m = s.mount("image:pt", with_upper, opts);
            match fs::read(m.m("f")) {
                Ok(data) if data == b"image content\n" => {}
                other => failures.push(format!(
                    "options {opts:?}, upper {with_upper}: read gave {other:?}"
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn image_hard_links_stay_linked_across_copy_up_drop_caches_and_remount() {
    let s = Scratch::new();
    let src = s.path("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::create_dir_all(src.join("other")).unwrap();
    fs::write(src.join("dir/h1"), b"linked\n").unwrap();
    fs::hard_link(src.join("dir/h1"), src.join("other/h2")).unwrap();
    fs::hard_link(src.join("dir/h1"), src.join("h3")).unwrap();
    s.build(&src, "links");
    let names3 = ["dir/h1", "other/h2", "h3"];
    let view = |m: &Mounted| -> Vec<(Vec<u8>, u64, u64)> {
        names3
            .iter()
            .map(|n| {
                let md = fs::symlink_metadata(m.m(n)).unwrap();
                (read(&m.m(n)), md.ino(), md.nlink())
            })
            .collect()
    };
    let mut m = s.mount("image:links", true, &[]);
    let before = view(&m);
    assert!(
        before
            .iter()
            .all(|(c, ino, n)| c == b"linked\n" && *ino == before[0].1 && *n == 3),
        "{before:?}"
    );
    // A write through one name: every name shows it (kernel overlayfs with
    // index=on), with the same inode number as before.
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.m("dir/h1"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"more\n").unwrap();
    drop(f);
    let expect: Vec<(Vec<u8>, u64, u64)> = names3
        .iter()
        .map(|_| (b"linked\nmore\n".to_vec(), before[0].1, 3))
        .collect();
    assert_eq!(view(&m), expect, "after copy-up");
    let up_inos: Vec<u64> = names3
        .iter()
        .map(|n| fs::symlink_metadata(m.upper().join(n)).unwrap().ino())
        .collect();
    assert!(
        up_inos.iter().all(|i| *i == up_inos[0]),
        "upper copies are not linked"
    );
    drop_caches();
    assert_eq!(view(&m), expect, "after drop_caches");
    m.unmount();
    let up = m.upper();
    let store = format!("store={}", s.store().display());
    let m2 = Mounted::build_with(&[], &[], move |_| {
        (
            "image:links".to_owned(),
            vec![store, format!("upper={}", up.display())],
        )
    });
    assert_eq!(view(&m2), expect, "after remount");
    // Removing one name: the others stay, one link fewer.
    fs::remove_file(m2.m("other/h2")).unwrap();
    for n in ["dir/h1", "h3"] {
        assert_eq!(fs::symlink_metadata(m2.m(n)).unwrap().nlink(), 2, "{n}");
    }
}

/// As for host lowers: an image file open for reading (its cache file the
/// passthrough backing) must not make the opens of its copy fail.
#[test]
fn a_reader_holding_an_image_file_open_does_not_break_writers_or_later_opens() {
    let s = Scratch::new();
    let src = s.path("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"image\n").unwrap();
    s.build(&src, "held");
    let m = s.mount("image:held", true, &[]);
    let reader = fs::File::open(m.m("f")).unwrap();
    let mut failures = Vec::new();
    match fs::OpenOptions::new().append(true).open(m.m("f")) {
        Ok(mut w) => std::io::Write::write_all(&mut w, b"appended\n").unwrap(),
        Err(e) => failures.push(format!("open for append while a reader has it open: {e}")),
    }
    match fs::read(m.m("f")) {
        Ok(d) if d == b"image\nappended\n" => {}
        other => failures.push(format!("a new open after the copy-up read {other:?}")),
    }
    drop(reader);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn replacing_an_image_while_mounted_keeps_the_mount_on_the_old_content() {
    let s = Scratch::new();
    let (v1, v2) = (s.path("v1"), s.path("v2"));
    for (root, tag) in [(&v1, 1u32), (&v2, 2)] {
        fs::create_dir_all(root.join("d")).unwrap();
        for i in 0..20 {
            fs::write(
                root.join(format!("d/f{i:02}")),
                content(tag * 1000 + i, 5000),
            )
            .unwrap();
        }
        fs::write(root.join(format!("only_v{tag}")), b"x").unwrap();
    }
    s.build(&v1, "app");
    let old = s.mount("image:app", false, &[]);
    assert_eq!(read(&old.m("d/f00")), content(1000, 5000));
    let out = s.run(&[
        "image",
        "build",
        v2.to_str().unwrap(),
        "--name",
        "app",
        "--replace",
    ]);
    assert!(out.status.success(), "{out:?}");
    std::thread::sleep(Duration::from_millis(50));
    s.ok(&["gc"]);
    // The old mount: old names and content, also files not read before.
    assert_eq!(names(&old.mnt), ["d", "only_v1"]);
    for i in 0..20 {
        assert_eq!(
            read(&old.m(&format!("d/f{i:02}"))),
            content(1000 + i, 5000),
            "f{i:02}"
        );
    }
    // A new mount: the new image.
    let new = s.mount("image:app", false, &[]);
    assert_eq!(names(&new.mnt), ["d", "only_v2"]);
    assert_eq!(read(&new.m("d/f05")), content(2005, 5000));
    assert_eq!(read(&old.m("d/f05")), content(1005, 5000));
}

#[test]
fn the_store_stays_writable_by_root_only_after_mounts_read_from_it() {
    let s = Scratch::new();
    let src = s.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), b"content\n").unwrap();
    s.build(&src, "perm");
    let m = s.mount("image:perm", true, &[]);
    assert_eq!(read(&m.m("d/f")), b"content\n");
    fs::write(m.m("d/f"), b"changed\n").unwrap();
    drop(m);
    let tree = snapshot(&s.store(), false);
    let writable: Vec<String> = tree
        .objs
        .iter()
        .filter(|(_, o)| o.mode & 0o002 != 0 && o.kind != 'l')
        .map(|(p, o)| format!("{p} {:o}", o.mode))
        .collect();
    assert!(
        writable.is_empty(),
        "world-writable in the store: {writable:?}"
    );
    // The cache holds the verified, read-only content.
    let cached: Vec<(&String, &Obj)> = tree
        .objs
        .iter()
        .filter(|(p, o)| p.starts_with("cache/") && o.kind == 'f')
        .collect();
    assert!(!cached.is_empty(), "nothing cached");
    for (p, o) in cached {
        assert_eq!(o.mode & 0o222, 0, "cache file {p} is writable");
    }
}

/// Renaming an image directory copies its whole tree up; what the mount
/// showed moves unchanged, hard links included.
#[test]
fn renaming_an_image_directory_moves_its_whole_tree_unchanged() {
    let s = Scratch::new();
    let src = s.path("src");
    fs::create_dir_all(src.join("top/nested/deeper")).unwrap();
    add_extras(&src.join("top/nested"));
    fs::write(src.join("top/nested/deeper/leaf"), content(9, 70_000)).unwrap();
    fs::write(src.join("top/a"), b"a").unwrap();
    fs::hard_link(src.join("top/a"), src.join("top/nested/deeper/a_link")).unwrap();
    s.build(&src, "tree");
    let m = s.mount("image:tree", true, &[]);
    let before = snapshot(&m.m("top"), true);
    fs::rename(m.m("top"), m.m("moved")).unwrap();
    assert_eq!(names(&m.mnt), ["moved"]);
    assert_same_tree(
        "renamed image directory",
        &before,
        &snapshot(&m.m("moved"), true),
    );
    // Still linked: a write through one name shows through the other.
    fs::write(m.m("moved/a"), b"changed").unwrap();
    assert_eq!(read(&m.m("moved/nested/deeper/a_link")), b"changed");
    assert_eq!(read(&m.m("moved/nested/extras/hard_b")), b"linked\n");
}

/// Runs the mount's `bin/python ARGS`; returns (success, stdout, stderr).
fn venv_python(m: &Mounted, args: &[&str]) -> (bool, String, String) {
    let python = m.m("bin/python");
    let out = output_with_timeout(
        Command::new(&python)
            .args(args)
            .env_remove("PYTHONDONTWRITEBYTECODE")
            .env_remove("PYTHONPYCACHEPREFIX")
            .env_remove("PYTHONHOME")
            .env_remove("PYTHONPATH")
            .env_remove("VIRTUAL_ENV")
            .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
            .env("PIP_NO_INPUT", "1"),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|| panic!("{} {args:?} timed out", python.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// pip removing and reinstalling whole packages inside the image: deep
/// trees removed (whiteouts), made again over the whiteouts, uninstalled.
#[test]
fn pip_reinstalls_and_uninstalls_packages_in_the_mounted_venv() {
    let s = Scratch::new();
    let Some(src) = venv_image(&s) else { return };
    let bundled = Command::new("python3")
        .args([
            "-c",
            "import ensurepip, os, glob; print(glob.glob(os.path.join(os.path.dirname(ensurepip.__file__), '_bundled', 'pip-*.whl'))[0])",
        ])
        .output()
        .unwrap();
    let wheel = String::from_utf8(bundled.stdout).unwrap().trim().to_owned();
    assert!(
        Path::new(&wheel).is_file(),
        "no bundled pip wheel: {wheel:?}"
    );
    let src_before = snapshot(&src, true);
    let m = s.mount("image:venv", true, &[]);
    let ok = |args: &[&str]| {
        let (ok, out, err) = venv_python(&m, args);
        assert!(ok, "python {args:?}: {out}{err}");
        out
    };
    ok(&[
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--force-reinstall",
        &wheel,
    ]);
    let version = ok(&["-m", "pip", "--version"]);
    assert!(version.contains(m.mnt.to_str().unwrap()), "{version}");
    ok(&["-c", "import pip._internal.cli.main"]);
    ok(&["-m", "pip", "uninstall", "-y", "setuptools"]);
    let (gone, _, err) = venv_python(&m, &["-c", "import setuptools"]);
    assert!(
        !gone && err.contains("ModuleNotFoundError"),
        "setuptools still importable: {err}"
    );
    let site = fs::read_dir(m.m("lib"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("site-packages");
    let left: Vec<String> = names(&site)
        .into_iter()
        .filter(|n| n.starts_with("setuptools"))
        .collect();
    assert!(
        left.is_empty(),
        "uninstalled package still listed: {left:?}"
    );
    let listed = ok(&["-m", "pip", "list", "--format=freeze"]);
    assert!(
        listed.contains("pip==") && !listed.contains("setuptools=="),
        "{listed}"
    );
    assert_same_tree("venv source", &src_before, &snapshot(&src, true));
    assert_eq!(s.ok(&["image", "verify", "venv"]).lines().count(), 1);
}

/// A 0/0 character device strata marked as a device (trusted.strata.device)
/// in a former upper stays a device when that upper becomes an image layer.
#[test]
fn a_marked_zero_device_in_an_image_is_a_device_not_a_whiteout() {
    use std::os::unix::fs::FileTypeExt;
    let s = Scratch::new();
    let (top, bottom) = (s.path("top"), s.path("bottom"));
    fs::create_dir_all(&top).unwrap();
    fs::create_dir_all(&bottom).unwrap();
    fs::write(bottom.join("dev"), b"bottom file").unwrap();
    rustix::fs::mknodat(
        CWD,
        top.join("dev"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    set_xattr(&top.join("dev"), "trusted.strata.device", b"y");
    s.build(&top, "top");
    s.build(&bottom, "bottom");
    let m = s.mount("image:top:image:bottom", false, &[]);
    let md = fs::symlink_metadata(m.m("dev")).unwrap();
    assert!(md.file_type().is_char_device(), "{:?}", md.file_type());
    assert_eq!((md.rdev(), md.mode() & 0o7777), (0, 0o640));
    assert_eq!(names(&m.mnt), ["dev"]);
    assert_eq!(
        get_xattr(&m.m("dev"), "trusted.strata.device"),
        None,
        "private xattr shown"
    );
}

/// Replaces every occurrence of `from` by `to` (same length) in image
/// `name`'s manifest and recomputes its checksum, as someone who can write
/// the store could.
fn tamper_manifest(s: &Scratch, name: &str, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let path = s.store().join("images").join(name);
    let mut bytes = fs::read(&path).unwrap();
    // Only the string table (header fields at 56 and 64: its offset, length).
    let field = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
    let (start, len) = (field(56), field(64));
    let mut hits = 0;
    for i in start..=start + len - from.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            hits += 1;
        }
    }
    assert!(hits > 0, "{from:?} not in the manifest");
    strata_image::seal_manifest(&mut bytes);
    let mut perm = fs::metadata(&path).unwrap().permissions();
    perm.set_mode(0o644);
    fs::set_permissions(&path, perm).unwrap();
    fs::write(&path, bytes).unwrap();
}

/// A manifest whose names lead out of the upper (`../..` paths, absolute
/// names, dot entries, a hard link named `../../ESC`, a NUL in a symlink
/// target), with a valid checksum: `strata mount image:X --upper` refuses it
/// with one line naming the entry, and nothing is created outside the upper.
#[test]
fn a_manifest_with_names_leading_out_of_the_upper_is_refused() {
    let s = Scratch::new();
    let outside = s.path("outside");
    fs::create_dir_all(&outside).unwrap();
    let escape = format!("{}/ESC", outside.display());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "traversal",
            b"../../../../../../../../../../../../ESC".to_vec(),
        ),
        ("absolute", escape.as_bytes().to_vec()),
        ("dot-dot", b"..".to_vec()),
        ("dot", b".".to_vec()),
        ("hard link", b"../../ESC".to_vec()),
        ("symlink target with NUL", b"t\0rget".to_vec()),
    ];
    for (i, (what, hostile)) in cases.into_iter().enumerate() {
        // Placeholders as long as the hostile bytes, unique in the manifest.
        let placeholder: Vec<u8> = (0..hostile.len()).map(|k| b"QWXYZJ"[k % 6]).collect();
        let src = s.path(&format!("src{i}"));
        fs::create_dir_all(src.join("dir/sub")).unwrap();
        fs::write(src.join("dir/file"), b"content").unwrap();
        let p = std::ffi::OsStr::from_bytes(&placeholder);
        match what {
            "hard link" => {
                fs::hard_link(src.join("dir/file"), src.join("dir/sub").join(p)).unwrap()
            }
            "symlink target with NUL" => {
                std::os::unix::fs::symlink(p, src.join("dir/link")).unwrap()
            }
            "dot-dot" | "dot" => fs::create_dir(src.join("dir").join(p)).unwrap(),
            _ => fs::write(src.join("dir/sub").join(p), b"escape").unwrap(),
        }
        let name = format!("evil{i}");
        s.build(&src, &name);
        tamper_manifest(&s, &name, &placeholder, &hostile);
        let work = s.path(&format!("work{i}"));
        let (up, mnt) = (work.join("upper"), work.join("mnt"));
        fs::create_dir_all(&up).unwrap();
        fs::create_dir_all(&mnt).unwrap();
        let out = output_with_timeout(
            Command::new(STRATA)
                .arg("mount")
                .arg("-o")
                .arg(format!("store={}", s.store().display()))
                .arg(format!("image:{name}"))
                .arg("--upper")
                .arg(&up)
                .arg(&mnt)
                .env("STRATA_STATE_DIR", work.join("state"))
                .env_remove("RUST_LOG"),
            Duration::from_secs(60),
        )
        .expect("strata mount timed out");
        let err = String::from_utf8_lossy(&out.stderr);
        if is_mounted(&mnt) {
            let _ = Command::new("umount").arg("-l").arg(&mnt).status();
            panic!("{what}: a hostile manifest was mounted ({err})");
        }
        assert!(!out.status.success(), "{what}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err}");
        assert!(
            err.contains(&name) && err.contains("entry "),
            "{what}: {err}"
        );
        assert!(
            !outside.join("ESC").exists() && !s.path("ESC").exists(),
            "{what}"
        );
        assert_eq!(
            fs::read_dir(&up).unwrap().count(),
            0,
            "{what}: upper written"
        );
    }
}

/// Symlink targets that point out of the mount are data, not paths: a copy
/// of the tree holding them (a directory rename) puts symlinks with the same
/// targets in the upper and writes nothing where they point.
#[test]
fn symlinks_pointing_out_of_an_image_are_copied_up_as_symlinks() {
    let s = Scratch::new();
    let src = s.path("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    let target = s.path("target-outside");
    let targets = [
        "../../../../../../../../../../ESC".to_owned(),
        target.display().to_string(),
    ];
    for (i, t) in targets.iter().enumerate() {
        std::os::unix::fs::symlink(t, src.join(format!("dir/l{i}"))).unwrap();
    }
    s.build(&src, "links");
    let m = s.mount("image:links", true, &[]);
    fs::rename(m.m("dir"), m.m("moved")).unwrap();
    fs::write(m.m("moved/new"), b"x").unwrap();
    for (i, t) in targets.iter().enumerate() {
        let l = m.upper().join(format!("moved/l{i}"));
        assert_eq!(fs::read_link(&l).unwrap().to_str().unwrap(), t);
        assert_eq!(
            fs::read_link(m.m(&format!("moved/l{i}")))
                .unwrap()
                .to_str()
                .unwrap(),
            t
        );
    }
    assert!(!target.exists() && !Path::new("/ESC").exists());
}
