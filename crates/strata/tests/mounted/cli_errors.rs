//! What the command line says when it cannot do what it is asked: one line
//! naming the path or option, the right exit code, no mount left behind, no
//! panic (also when nobody reads the output).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::common::*;

const LIMIT: Duration = Duration::from_secs(30);

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the CLI with a private state dir, killed after [`LIMIT`].
fn run(args: &[&str], state: &Path) -> Output {
    output_with_timeout(
        Command::new(STRATA)
            .args(args)
            .env("STRATA_STATE_DIR", state)
            .env_remove("RUST_LOG"),
        LIMIT,
    )
    .unwrap_or_else(|| panic!("strata {args:?} did not finish within {LIMIT:?}"))
}

/// A failure with exit code `code`: one line naming every one of `what`,
/// nothing mounted at `mnt`.
fn assert_error(out: &Output, code: i32, what: &[&str], mnt: &Path) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "exit code for: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(err.starts_with("strata: "), "{err}");
    for w in what {
        assert!(err.contains(w), "{err:?} should mention {w:?}");
    }
    assert!(!err.contains("panicked"), "{err}");
    assert!(!is_mounted(mnt), "no mount may be left behind");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Aborts the FUSE connection of the mount at `mnt` (fusectl) and detaches it.
fn abort_mount(mnt: &Path) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let needle = format!(" {} ", mnt.display());
    let minor = info
        .lines()
        .filter(|l| l.contains(&needle) && l.contains(" - fuse.strata "))
        .filter_map(|l| l.split(' ').nth(2)?.split(':').nth(1).map(str::to_owned))
        .next_back();
    if let Some(minor) = minor {
        let conns = Path::new("/sys/fs/fuse/connections");
        if fs::read_dir(conns).is_ok_and(|mut d| d.next().is_none()) {
            let _ = Command::new("mount")
                .args(["-t", "fusectl", "none"])
                .arg(conns)
                .status();
        }
        let _ = fs::write(conns.join(minor).join("abort"), "1");
    }
    let _ = rustix::mount::unmount(mnt, rustix::mount::UnmountFlags::DETACH);
}

#[test]
fn a_mountpoint_inside_a_layer_or_a_layer_inside_it_is_refused() {
    let dir = scratch_dir();
    let d = dir.path();
    let state = d.join("state");
    for sub in ["l/sub", "u/sub", "b2", "mnt/inside", "apart", "lx"] {
        fs::create_dir_all(d.join(sub)).unwrap();
    }
    let (l, u, b2, mnt) = (d.join("l"), d.join("u"), d.join("b2"), d.join("mnt"));
    let (lsub, usub, inside) = (l.join("sub"), u.join("sub"), mnt.join("inside"));
    let (union_b2, union_inside) = (
        format!("{}:{}", s(&l), s(&b2)),
        format!("{}:{}", s(&b2), s(&inside)),
    );
    let cases: Vec<(Vec<&str>, &Path, [&Path; 2])> = vec![
        // mountpoint inside the one directory served
        (vec!["mount", s(&l), s(&lsub)], &lsub, [&lsub, &l]),
        // inside an overlay lower, and inside the upper
        (
            vec!["mount", s(&l), "--upper", s(&u), s(&lsub)],
            &lsub,
            [&lsub, &l],
        ),
        (
            vec!["mount", s(&l), "--upper", s(&u), s(&usub)],
            &usub,
            [&usub, &u],
        ),
        // the mountpoint is a union branch
        (vec!["mount", &union_b2, s(&b2)], &b2, [&b2, &b2]),
        // a branch, a lower, an upper inside the mountpoint (-o nonempty lets
        // the mountpoint hold them)
        (
            vec!["mount", &union_inside, s(&mnt), "-o", "nonempty"],
            &mnt,
            [&inside, &mnt],
        ),
        (
            vec!["mount", s(&inside), s(&mnt), "-o", "nonempty"],
            &mnt,
            [&inside, &mnt],
        ),
        (
            vec![
                "mount",
                s(&l),
                "--upper",
                s(&inside),
                s(&mnt),
                "-o",
                "nonempty",
            ],
            &mnt,
            [&inside, &mnt],
        ),
    ];
    for (args, mp, [a, b]) in cases {
        let out = run(&args, &state);
        if is_mounted(mp) {
            // Such a mount deadlocks whatever walks into it (the scratch
            // dir's removal too): cut it off before failing.
            abort_mount(mp);
            panic!("strata {args:?} mounted: {}", stderr(&out));
        }
        assert_error(&out, 2, &[s(a), s(b)], mp);
        assert!(stderr(&out).contains("inside") || stderr(&out).contains("itself"));
    }
    // Component-wise: `lx` is not inside `l`.
    let lx = d.join("lx");
    let out = run(&["mount", s(&l), s(&lx)], &state);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["umount", s(&lx)], &state);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_branch_added_at_runtime_inside_the_mountpoint_is_refused() {
    let m = Mounted::build_source(&[], &[], |d| {
        for b in ["b0", "b1", "b2"] {
            fs::create_dir(d.join(b)).unwrap();
        }
        fs::create_dir(d.join("b0/sub")).unwrap();
        format!("{0}/b0:{0}/b1", d.display())
    });
    let state = m.dir.path().join("state");
    let control = m.m(".strata");
    let set = |v: &str| {
        rustix::fs::setxattr(
            &control,
            "user.strata.branches",
            v.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
    };
    // Through the mount (it would serve itself), and a branch holding the mountpoint.
    let through = m.m("sub");
    for bad in [through.clone(), m.dir.path().to_path_buf()] {
        assert_eq!(
            set(&format!("+>{}", bad.display())),
            Err(rustix::io::Errno::INVAL),
            "{}",
            bad.display()
        );
        // `strata ctl` says why, naming both paths.
        let out = run(
            &[
                "ctl",
                s(&m.mnt),
                "set",
                &format!("branches=+>{}", bad.display()),
            ],
            &state,
        );
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(s(&bad)) && err.contains(s(&m.mnt)), "{err}");
    }
    // The log says why too; a branch apart from the mountpoint is fine.
    assert!(m.log().contains("would wait on itself"), "{}", m.log());
    let b2 = m.dir.path().join("b2");
    set(&format!("+>{}", b2.display())).unwrap();
    let out = run(&["ctl", s(&m.mnt), "get", "branches"], &state);
    assert!(String::from_utf8_lossy(&out.stdout).contains(s(&b2)));
}

#[test]
fn overlay_and_option_errors_name_the_option_and_path() {
    let dir = scratch_dir();
    let d = dir.path();
    let state = d.join("state");
    for sub in ["l", "u", "mnt"] {
        fs::create_dir(d.join(sub)).unwrap();
    }
    let (l, u, mnt) = (d.join("l"), d.join("u"), d.join("mnt"));
    let missing = d.join("missing");
    // a missing --upper
    assert_error(
        &run(&["mount", s(&l), "--upper", s(&missing), s(&mnt)], &state),
        2,
        &["--upper", s(&missing), "no such directory"],
        &mnt,
    );
    // a store that does not exist
    let nostore = d.join("nostore");
    assert_error(
        &run(
            &[
                "mount",
                "image:base",
                s(&mnt),
                "-o",
                &format!("store={}", s(&nostore)),
            ],
            &state,
        ),
        2,
        &[s(&nostore), "does not exist"],
        &mnt,
    );
    // `strata image verify` in a missing store says so too
    let out = run(&["image", "verify", "base", "--store", s(&nostore)], &state);
    assert_error(&out, 2, &[s(&nostore), "does not exist"], &mnt);
    // a size that is no size
    assert_error(
        &run(
            &["mount", s(&l), s(&mnt), "-o", "minfreespace=lots"],
            &state,
        ),
        2,
        &["minfreespace", "'lots'"],
        &mnt,
    );
    assert!(
        !stderr(&run(
            &["mount", s(&l), s(&mnt), "-o", "minfreespace=lots"],
            &state
        ))
        .contains("unit 's'")
    );
    // a union option on an overlay would be ignored: refused, named
    assert_error(
        &run(
            &[
                "mount",
                s(&l),
                "--upper",
                s(&u),
                s(&mnt),
                "-o",
                "cache.entry=5,category.create=mfs",
            ],
            &state,
        ),
        2,
        &["'category.create'", "union option", "overlay"],
        &mnt,
    );
    // read-only with an upper contradicts itself
    for args in [
        vec!["mount", s(&l), "--upper", s(&u), s(&mnt), "-o", "ro"],
        vec![
            "mount",
            s(&l),
            s(&mnt),
            "-o",
            &format!("ro,upper={}", s(&u)),
        ],
    ] {
        assert_error(
            &run(&args, &state),
            2,
            &["'ro'", "upper", "contradict"],
            &mnt,
        );
    }
}

#[test]
fn mounting_over_a_stale_mount_says_stale_and_how_to_clear_it() {
    let mut m = Mounted::new(&[]);
    m.kill_and_wait_stale();
    let state = m.dir.path().join("state");
    let upper = m.dir.path().join("upper");
    fs::create_dir(&upper).unwrap();
    let mp = s(&m.mnt).to_string();
    let hint = format!("strata umount {mp}");
    for args in [
        vec!["mount", s(&m.src), &mp],
        vec!["mount", "-f", s(&m.src), &mp],
        vec!["mount", s(&m.src), "--upper", s(&upper), &mp],
    ] {
        let out = run(&args, &state);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("stale") && err.contains(&hint), "{err}");
        assert!(!err.contains("already mounted"), "{err}");
    }
    let out = run(&["umount", &mp], &state);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Without access to /dev/fuse (and no setuid fusermount3 to fall back on),
/// the error names /dev/fuse.
#[test]
fn no_access_to_dev_fuse_names_it() {
    let mode = fs::metadata("/dev/fuse").unwrap().permissions().mode();
    let helper = [
        "/usr/bin/fusermount3",
        "/bin/fusermount3",
        "/usr/local/bin/fusermount3",
    ]
    .iter()
    .any(|p| Path::new(p).exists());
    if mode & 0o006 == 0o006 || helper {
        eprintln!(
            "skipped: user nobody can mount here (/dev/fuse mode {mode:o}, fusermount3 {helper})"
        );
        return;
    }
    let dir = scratch_dir();
    let d = dir.path();
    fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap();
    for sub in ["src", "mnt", "state"] {
        fs::create_dir(d.join(sub)).unwrap();
        fs::set_permissions(d.join(sub), fs::Permissions::from_mode(0o777)).unwrap();
    }
    let (src, mnt) = (d.join("src"), d.join("mnt"));
    for fg in [true, false] {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            STRATA,
            "mount",
        ]);
        if fg {
            cmd.arg("-f");
        }
        cmd.args([s(&src), s(&mnt)])
            .env("STRATA_STATE_DIR", d.join("state"))
            .env_remove("RUST_LOG");
        let out = output_with_timeout(&mut cmd, LIMIT).expect("mount as nobody finishes");
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("/dev/fuse") && err.contains(s(&mnt)), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!is_mounted(&mnt));
    }
}

/// `strata ... | true`: stdout is a pipe nobody reads. The command ends
/// quietly with status 0 (see README), never with a panic.
#[test]
fn a_closed_stdout_ends_commands_quietly() {
    let m = Mounted::build_source(&[], &[], |d| {
        for b in ["b0", "b1"] {
            fs::create_dir(d.join(b)).unwrap();
        }
        format!("{0}/b0:{0}/b1", d.display())
    });
    let state = m.dir.path().join("state");
    let store = m.dir.path().join("store");
    let img = m.dir.path().join("img");
    fs::create_dir(&img).unwrap();
    fs::write(img.join("f"), b"x").unwrap();
    build_image(&img, &store, "base");
    let mp = s(&m.mnt);
    let cases: Vec<Vec<&str>> = vec![
        vec!["status"],
        vec!["status", "--json"],
        vec!["image", "ls", "--store", s(&store)],
        vec!["image", "ls", "--json", "--store", s(&store)],
        vec!["image", "verify", "base", "--store", s(&store)],
        vec!["ctl", mp, "list"],
        vec!["ctl", mp, "get", "category.create"],
    ];
    for args in cases {
        let (read, write) = rustix::pipe::pipe().unwrap();
        drop(read);
        let mut cmd = Command::new(STRATA);
        cmd.args(&args)
            .env("STRATA_STATE_DIR", &state)
            .stdin(Stdio::null())
            .stdout(Stdio::from(write))
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        assert!(
            wait_until(LIMIT, || child.try_wait().unwrap().is_some()),
            "strata {args:?} did not finish"
        );
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert!(!err.contains("panicked"), "strata {args:?}: {err}");
        assert_eq!(err, "", "strata {args:?}");
        assert_eq!(out.status.code(), Some(0), "strata {args:?}: {err}");
    }
}
