//! Mounting, unmounting, status, bad input, stale mounts and robustness.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A bad-input failure: exit code 2, one line naming `what`, nothing mounted.
fn assert_usage_error(out: &std::process::Output, what: &str, mnt: &Path) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "exit code for: {err}");
    assert_eq!(err.lines().count(), 1, "one line expected: {err:?}");
    assert!(err.starts_with("strata: "), "{err}");
    assert!(err.contains(what), "{err:?} should mention {what:?}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!is_mounted(mnt), "no mount may be left behind");
}

/// A scratch directory with empty `src` and `mnt`, and where `state` goes.
fn scratch() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = scratch_dir();
    let p = |n: &str| dir.path().join(n);
    let (src, mnt, state) = (p("src"), p("mnt"), p("state"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    (dir, src, mnt, state)
}

/// The `strata status --json` row of the mount at `mnt`.
fn status_row(state: &Path, mnt: &Path) -> serde_json::Value {
    let out = strata(&["status", "--json"], state);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["mountpoint"] == mnt.to_str().unwrap());
    row.unwrap_or_else(|| panic!("{} not in {rows}", mnt.display()))
        .clone()
}

#[test]
fn background_mount_status_and_umount() {
    let (_dir, src, mnt, state) = scratch();
    fs::write(src.join("hello"), b"hi").unwrap();
    let out = strata(
        &["mount", src.to_str().unwrap(), mnt.to_str().unwrap()],
        &state,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // ready when the command returns
    assert!(is_mounted(&mnt));
    assert_eq!(fs::read(mnt.join("hello")).unwrap(), b"hi");

    let out = strata(&["status"], &state);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(mnt.to_str().unwrap()) && text.contains(" ok"),
        "{text}"
    );
    let row = status_row(&state, &mnt);
    let pid = row["pid"].as_u64().expect("pid");
    assert!(row["stats"]["inodes"].as_u64().unwrap() >= 1);
    assert_eq!(row["state"], "ok");

    let out = strata(&["umount", mnt.to_str().unwrap()], &state);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!is_mounted(&mnt));
    assert!(
        wait_until(Duration::from_secs(5), || !Path::new(&format!(
            "/proc/{pid}"
        ))
        .exists()),
        "daemon exits"
    );
    let out = strata(&["umount", mnt.to_str().unwrap()], &state);
    assert_usage_error(&out, "not mounted", &mnt);
}

#[test]
fn sigterm_and_sigint_unmount_cleanly() {
    for sig in [rustix::process::Signal::TERM, rustix::process::Signal::INT] {
        let mut m = Mounted::new(&[]);
        fs::write(m.m("f"), b"kept").unwrap();
        m.signal(sig);
        m.assert_exits_cleanly();
        assert!(!is_mounted(&m.mnt));
        assert_eq!(fs::read(m.s("f")).unwrap(), b"kept");
    }
}

/// The pid in the mount record for `mnt` (what `strata status` shows; read
/// directly, since `status` probes every strata mount on the machine).
fn record_pid(state: &Path, mnt: &Path) -> Option<u64> {
    fs::read_dir(state.join("mounts"))
        .ok()?
        .filter_map(|e| serde_json::from_slice(&fs::read(e.ok()?.path()).ok()?).ok())
        .find(|r: &serde_json::Value| r["mountpoint"] == mnt.to_str().unwrap())
        .and_then(|r| r["pid"].as_u64())
}

/// B is mounted at its mountpoint, serves, and its mount record is there.
fn assert_serving(b: &mut Mounted, state: &Path) {
    assert!(is_mounted(&b.mnt), "the successor's mount is gone");
    assert_eq!(fs::read(b.m("b")).unwrap(), b"B");
    assert_eq!(b.wait_exit(Duration::ZERO), None, "the successor exited");
    // The record follows the mount by moments (`strata mount` returns
    // after both; this harness only waits for the mount): a removed one
    // never comes back.
    let pid = Some(b.pid() as u64);
    wait_until(Duration::from_secs(5), || record_pid(state, &b.mnt) == pid);
    assert_eq!(record_pid(state, &b.mnt), pid);
}

/// A daemon stopped while its mount was taken away from outside, and then a
/// new daemon mounted there: when the old one goes on and exits (on its own
/// and on SIGTERM) it leaves the new mount alone, and its mount record too.
#[test]
fn an_exiting_daemon_leaves_its_successors_mount_alone() {
    use rustix::process::Signal;
    let mut a = Mounted::new(&[]);
    let state = a.dir.path().join("state");
    a.signal(Signal::STOP);
    rustix::mount::unmount(&a.mnt, rustix::mount::UnmountFlags::DETACH).unwrap();
    let mut b = Mounted::successor_of(&a, |src| fs::write(src.join("b"), b"B").unwrap());
    a.signal(Signal::CONT);
    a.signal(Signal::TERM);
    a.assert_exits_cleanly();
    assert_serving(&mut b, &state);
    b.unmount();
}

/// A daemon whose mount was detached while busy keeps serving the open
/// files; SIGTERM then must not unmount the mount that took its place.
#[test]
fn a_signalled_daemon_of_a_detached_mount_leaves_its_successors_mount_alone() {
    use std::io::Read;
    let mut a = Mounted::with_source(&[], |src| fs::write(src.join("a"), b"A").unwrap());
    let state = a.dir.path().join("state");
    let mut held = fs::File::open(a.m("a")).unwrap();
    rustix::mount::unmount(&a.mnt, rustix::mount::UnmountFlags::DETACH).unwrap();
    let mut b = Mounted::successor_of(&a, |src| fs::write(src.join("b"), b"B").unwrap());
    a.signal(rustix::process::Signal::TERM);
    wait_until(Duration::from_secs(5), || {
        !is_mounted(&b.mnt) || a.log().contains("not unmounting")
    });
    assert_serving(&mut b, &state);
    // The detached mount still serves its open file, and its daemon exits
    // once that is closed.
    let mut data = Vec::new();
    held.read_to_end(&mut data).unwrap();
    assert_eq!(data, b"A");
    drop(held);
    a.assert_exits_cleanly();
    assert_serving(&mut b, &state);
    b.unmount();
}

#[test]
fn bad_input_gets_one_line_and_exit_code_2() {
    let dir = scratch_dir();
    let d = dir.path();
    let state = d.join("state");
    let (src, mnt) = (d.join("src"), d.join("mnt"));
    fs::create_dir(&src).unwrap();
    fs::create_dir(&mnt).unwrap();
    fs::write(d.join("file"), b"").unwrap();
    let (s, m) = (src.to_str().unwrap(), mnt.to_str().unwrap());
    let missing = d.join("missing");
    let file = d.join("file");
    let (missing, file) = (missing.to_str().unwrap(), file.to_str().unwrap());

    assert_usage_error(&strata(&["mount", missing, m], &state), missing, &mnt);
    assert_usage_error(
        &strata(&["mount", file, m], &state),
        "not a directory",
        &mnt,
    );
    assert_usage_error(
        &strata(&["mount", s, missing], &state),
        "does not exist",
        Path::new(missing),
    );
    assert_usage_error(
        &strata(&["mount", s, m, "-o", "frobnicate=1"], &state),
        "frobnicate",
        &mnt,
    );
    assert_usage_error(
        &strata(&["mount", s, m, "-o", "threads=lots"], &state),
        "threads",
        &mnt,
    );
    assert_usage_error(
        &strata(&["mount", &format!("{s}=XX"), m], &state),
        "unknown mode 'XX'",
        &mnt,
    );
    let full = d.join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("x"), b"").unwrap();
    assert_usage_error(
        &strata(&["mount", s, full.to_str().unwrap()], &state),
        "not empty",
        &full,
    );
    // -o nonempty allows it
    let out = strata(
        &["mount", s, full.to_str().unwrap(), "-o", "nonempty"],
        &state,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(is_mounted(&full));
    // already mounted
    let out = strata(
        &["mount", s, full.to_str().unwrap(), "-o", "nonempty"],
        &state,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("already mounted"), "{}", stderr(&out));
    assert!(
        strata(&["umount", full.to_str().unwrap()], &state)
            .status
            .success()
    );
    // usage errors from the argument parser also exit 2
    let out = strata(&["mount", s], &state);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn stale_mount_is_reported_and_cleared_by_umount() {
    let mut m = Mounted::new(&[]);
    m.kill_and_wait_stale();
    let state = m.dir.path().join("state");
    let mp = m.mnt.to_str().unwrap().to_string();
    let out = strata(&["mount", m.src.to_str().unwrap(), &mp], &state);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("stale") && err.contains("strata umount"),
        "{err}"
    );
    let out = strata(&["status"], &state);
    assert!(String::from_utf8_lossy(&out.stdout).contains("stale"));
    let out = strata(&["umount", &mp], &state);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!is_mounted(&m.mnt));
    assert!(fs::metadata(&m.mnt).is_ok());
}

#[test]
fn a_panicking_handler_costs_one_eio_not_the_mount() {
    let m = Mounted::with_env(&[], &[("STRATA_PANIC_PROBE", "1")]);
    fs::write(m.m("f"), b"still here").unwrap();
    let mut buf = [0u8; 16];
    let err = rustix::fs::getxattr(&m.mnt, "user.strata.debug.panic", &mut buf[..]).unwrap_err();
    assert_eq!(err, rustix::io::Errno::IO);
    // every worker keeps serving, over and over
    for _ in 0..8 {
        assert!(rustix::fs::getxattr(&m.mnt, "user.strata.debug.panic", &mut buf[..]).is_err());
    }
    assert_eq!(fs::read(m.m("f")).unwrap(), b"still here");
    fs::write(m.m("g"), b"new").unwrap();
    assert!(
        m.log().contains("handler panicked"),
        "panic is logged: {}",
        m.log()
    );
}

/// Sends SIGCONT to a stopped daemon when dropped (also when the test fails),
/// and from a watchdog after `limit`, so that even a status that waits on the
/// mount forever (the bug) ends and the test reports it instead of hanging.
struct Resume(i32);

impl Resume {
    fn new(pid: u32, limit: Duration) -> Resume {
        let pid = pid as i32;
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            cont(pid);
        });
        Resume(pid)
    }
}

fn cont(pid: i32) {
    if let Some(p) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::CONT);
    }
}

impl Drop for Resume {
    fn drop(&mut self) {
        cont(self.0);
    }
}

#[test]
fn status_shows_a_stopped_daemon_as_hung_and_returns() {
    let m = Mounted::new(&[]);
    let state = m.dir.path().join("state");
    let _resume = Resume::new(m.pid(), Duration::from_secs(20));
    m.signal(rustix::process::Signal::STOP);
    let mp = m.mnt.to_str().unwrap();
    for args in [&["status"][..], &["status", "--json"][..]] {
        let start = std::time::Instant::now();
        let out = output_with_timeout(
            std::process::Command::new(STRATA)
                .args(args)
                .env("STRATA_STATE_DIR", &state),
            Duration::from_secs(60),
        )
        .expect("status returns");
        let took = start.elapsed();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            took < Duration::from_secs(8),
            "strata {args:?} took {took:?}"
        );
        let text = String::from_utf8_lossy(&out.stdout);
        if args.len() == 1 {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("{mp} ")))
                .unwrap_or_else(|| panic!("{mp} not listed: {text}"));
            assert!(line.split_whitespace().any(|w| w == "hung"), "{line}");
        } else {
            let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
            let row = rows
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["mountpoint"] == mp)
                .unwrap_or_else(|| panic!("{mp} not listed: {text}"));
            assert_eq!(row["state"], "hung", "{row}");
        }
    }
}

#[test]
fn umount_of_a_killed_daemon_returns_without_waiting_for_its_zombie() {
    // A foreground daemon is this test's child: killed, it stays a zombie
    // until the harness reaps it when `m` drops.
    let m = Mounted::new(&[]);
    let state = m.dir.path().join("state");
    let pid = m.pid();
    m.signal(rustix::process::Signal::KILL);
    let zombie = || {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
    };
    assert!(
        wait_until(Duration::from_secs(10), zombie),
        "daemon is a zombie"
    );
    assert!(wait_until(
        Duration::from_secs(10),
        || matches!(fs::metadata(&m.mnt), Err(e) if e.raw_os_error() == Some(libc::ENOTCONN))
    ));
    let start = std::time::Instant::now();
    let out = output_with_timeout(
        std::process::Command::new(STRATA)
            .args(["umount", m.mnt.to_str().unwrap()])
            .env("STRATA_STATE_DIR", &state),
        Duration::from_secs(60),
    )
    .expect("umount returns");
    let took = start.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!is_mounted(&m.mnt));
    // It used to poll /proc until the zombie went (10 s here, as nobody reaps it).
    assert!(took < Duration::from_secs(3), "umount took {took:?}");
    assert!(zombie(), "still a zombie: nothing waited for it");
}

#[test]
fn daemon_logs_are_plain_text_and_one_per_mount() {
    // A foreground daemon's stderr (a file here) has no colour escapes.
    let mut m = Mounted::with_env(&[], &[("RUST_LOG", "info")]);
    m.unmount();
    assert!(m.log().contains("mounted"), "{}", m.log());
    assert!(!m.log().contains('\x1b'), "escapes in {:?}", m.log());

    let (_dir, src, mnt, state) = scratch();
    let (s, mp) = (src.to_str().unwrap(), mnt.to_str().unwrap());
    let logs = || {
        let mut v: Vec<_> = fs::read_dir(state.join("logs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    };
    let out = strata(&["mount", s, mp], &state);
    assert!(out.status.success(), "{}", stderr(&out));
    let row = status_row(&state, &mnt);
    let log = std::path::PathBuf::from(row["log"].as_str().expect("log in the record"));
    assert!(log.starts_with(state.join("logs")), "{}", log.display());
    // A failed attempt at the same mountpoint writes nowhere near that log,
    // and its own log goes once its error is reported.
    let out = strata(&["mount", s, mp], &state);
    assert!(stderr(&out).contains("already mounted"), "{}", stderr(&out));
    let text = fs::read_to_string(&log).unwrap();
    assert!(text.contains("mounted"), "{text}");
    assert!(!text.contains("already mounted"), "{text}");
    assert!(!text.contains('\x1b'), "escapes in {text:?}");
    assert_eq!(logs(), vec![log.clone()]);
    let out = strata(&["status"], &state);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(log.to_str().unwrap()),
        "status shows the log"
    );
    assert!(strata(&["umount", mp], &state).status.success());
    // Old logs do not pile up: a few are kept.
    for _ in 0..7 {
        let out = strata(&["mount", s, mp], &state);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(strata(&["umount", mp], &state).status.success());
    }
    let kept = logs();
    assert!((2..=5).contains(&kept.len()), "{kept:?}");
    assert!(!kept.contains(&log), "the oldest log went");
}

#[test]
fn an_empty_xdg_runtime_dir_keeps_state_out_of_the_cwd() {
    let dir = scratch_dir();
    let d = dir.path();
    for sub in ["", "cwd", "tmp"] {
        let p = d.join(sub);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    }
    // A bad option fails in the daemon, after the CLI made its log.
    let out = as_nobody(&format!(
        "cd {0}/cwd && env -u STRATA_STATE_DIR XDG_RUNTIME_DIR= TMPDIR={0}/tmp \
         {STRATA} mount -o frobnicate=1 {0}/cwd {0}/cwd",
        d.display()
    ));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("frobnicate"), "{}", stderr(&out));
    assert!(!d.join("cwd/strata").exists(), "state dir made in the cwd");
    assert!(d.join("tmp/strata-65534/logs").is_dir());
}

#[test]
fn umount_of_a_stopped_daemon_returns_at_once() {
    let m = Mounted::new(&[]);
    let state = m.dir.path().join("state");
    m.signal(rustix::process::Signal::STOP);
    let _resume = Resume::new(m.pid(), Duration::from_secs(30));
    let start = std::time::Instant::now();
    let out = strata(&["umount", m.mnt.to_str().unwrap()], &state);
    assert!(out.status.success(), "{}", stderr(&out));
    // Not the 10 s a running daemon gets to finish: a stopped one cannot.
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    assert!(!is_mounted(&m.mnt));
}

#[test]
fn commands_that_ask_a_hung_mount_give_up_with_one_line() {
    let m = Mounted::with_source(&[], |src| fs::write(src.join("f"), b"x").unwrap());
    let state = m.dir.path().join("state");
    m.signal(rustix::process::Signal::STOP);
    let _resume = Resume::new(m.pid(), Duration::from_secs(60));
    let mnt = m.mnt.to_str().unwrap().to_owned();
    let file = m.m("f").to_str().unwrap().to_owned();
    for args in [
        vec!["ctl", mnt.as_str(), "list"],
        vec!["ctl", mnt.as_str(), "get", "version"],
        vec!["view", "explain", file.as_str()],
        vec!["snapshot", "create", mnt.as_str(), "--name", "s"],
        vec!["snapshot", "ls", mnt.as_str()],
        vec!["snapshot", "diff", mnt.as_str(), "a", "b"],
        vec!["branch", "ls", mnt.as_str()],
        vec!["branch", "exec", mnt.as_str(), "b", "--", "true"],
    ] {
        let start = std::time::Instant::now();
        let out = strata(&args, &state);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains("no answer within 5s"), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(start.elapsed() < Duration::from_secs(15), "{args:?}");
    }
}

/// systemd's `Type=notify`: READY=1 (with the daemon's pid) once the mount
/// serves, STOPPING=1 when a signal unmounts it. A fake NOTIFY_SOCKET.
#[test]
fn systemd_hears_ready_and_stopping() {
    let dir = scratch_dir();
    let path = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut m = Mounted::with_env(&[], &[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("READY=1 within 15 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    assert!(
        msg.lines().any(|l| l == format!("MAINPID={}", m.pid())),
        "{msg}"
    );
    assert!(msg.contains(&m.mnt.display().to_string()), "{msg}");
    m.signal(rustix::process::Signal::TERM);
    let n = sock.recv(&mut buf).expect("STOPPING=1 within 15 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg}");
    assert_eq!(m.wait_exit(Duration::from_secs(10)), Some(0));
}

/// `strata man DIR` writes a page per visible command, from the same
/// definitions as `--help`: the mount page lists every option of the table.
#[test]
fn man_pages_come_from_the_same_definitions_as_help() {
    let dir = scratch_dir();
    let man = dir.path().join("man1");
    let out = strata(&["man", man.to_str().unwrap()], &dir.path().join("state"));
    assert!(out.status.success(), "{}", stderr(&out));
    let pages = names(&man);
    for want in [
        "strata.1",
        "strata-mount.1",
        "strata-view-explain.1",
        "strata-ctl.1",
    ] {
        assert!(pages.iter().any(|p| p == want), "{want}: {pages:?}");
    }
    assert!(
        !pages
            .iter()
            .any(|p| p.contains("probe") || p == "strata-man.1"),
        "hidden commands get no page: {pages:?}"
    );
    let mount = fs::read_to_string(man.join("strata-mount.1")).unwrap();
    for o in strata_core::options::OPTIONS {
        // roff escapes '-'.
        let key = o.key.replace('-', "\\-");
        assert!(
            mount.contains(&key),
            "{} missing from strata-mount.1",
            o.key
        );
    }
}

/// `strata doctor`: one tagged line per check, the io_uring line true to
/// the module parameter, and a probe mount that leaves nothing behind.
#[test]
fn doctor_reports_each_check_with_its_fix() {
    let dir = scratch_dir();
    let out = strata(&["doctor"], &dir.path().join("state"));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}{}", stderr(&out));
    for line in text.lines() {
        assert!(
            ["ok   ", "warn ", "fail "]
                .iter()
                .any(|t| line.starts_with(t)),
            "{line}"
        );
    }
    assert!(text.contains("ok   /dev/fuse: read-write"), "{text}");
    match fs::read_to_string("/sys/module/fuse/parameters/enable_uring").as_deref() {
        Ok("Y\n") => assert!(text.contains("ok   FUSE over io_uring"), "{text}"),
        Ok(_) => assert!(
            text.contains("warn FUSE over io_uring: enable_uring is off")
                && text.contains("fix: echo Y > /sys/module/fuse/parameters/enable_uring"),
            "{text}"
        ),
        Err(_) => assert!(text.contains("warn FUSE over io_uring: this kernel has none")),
    }
    assert!(text.contains("kernel passthrough: "), "{text}");
    assert!(
        text.contains("ok   probe mount: requests came through"),
        "{text}"
    );
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!info.contains("strata-doctor"), "the probe mount stayed");
}

/// The daemon runs with umask 0: what it writes in the state directory
/// gets explicit modes, so no other user can plant or change a record.
#[test]
fn mount_records_are_not_writable_by_others() {
    use std::os::unix::fs::MetadataExt;
    let m = Mounted::new(&[]);
    let mounts = m.dir.path().join("state/mounts");
    assert!(wait_until(Duration::from_secs(5), || {
        fs::read_dir(&mounts).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "json"))
        })
    }));
    let mut checked = 0;
    for p in std::iter::once(mounts.clone())
        .chain(fs::read_dir(&mounts).unwrap().flatten().map(|e| e.path()))
    {
        let mode = fs::metadata(&p).unwrap().mode();
        assert_eq!(mode & 0o022, 0, "{}: {:o}", p.display(), mode & 0o7777);
        checked += 1;
    }
    assert!(checked >= 3, "the directory, its lock and a record");
}
