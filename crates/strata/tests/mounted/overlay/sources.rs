//! What an overlay mounts: stacks without an upper (read-only), layers and
//! uppers refused with one line, a directory named `image`, and the mount's
//! readahead.

use super::*;

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
    // tests/mounted/cli_errors.rs.
}

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
            // `strata umount` waits for the daemon: one still exiting after
            // the scratch directory went would write its record again.
            let _ = output_with_timeout(
                Command::new(STRATA)
                    .arg("umount")
                    .arg(&mnt)
                    .env("STRATA_STATE_DIR", d.join("state")),
                Duration::from_secs(30),
            );
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
