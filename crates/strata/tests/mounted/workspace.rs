//! Snapshots and branches on real mounts: the CLI an agent uses, processes
//! bound to different branches through one mount, writers open across a
//! snapshot (through the daemon, by kernel passthrough, by mmap), remounts,
//! a daemon killed mid-snapshot, and bad input.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::common::*;

/// A workspace: `src` (filled by `prepare`) under the upper `upper`.
fn workspace(opts: &[&str], prepare: impl FnOnce(&Path)) -> Mounted {
    Mounted::overlay(opts, prepare)
}

/// `strata ARGS` against `m`'s state, killed after a minute.
fn cli(m: &Mounted, args: &[&str]) -> Output {
    output_with_timeout(
        Command::new(STRATA)
            .args(args)
            .env("STRATA_STATE_DIR", m.dir.path().join("state")),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|| panic!("strata {args:?} did not finish within 60 s"))
}

/// `strata ARGS`, which must succeed; its stdout.
fn ok(m: &Mounted, args: &[&str]) -> String {
    let out = cli(m, args);
    assert!(
        out.status.success(),
        "strata {args:?}: {}\ndaemon log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        m.log()
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `strata ARGS`, which must fail with exit 2 and one line naming `what`.
fn refused(m: &Mounted, args: &[&str], what: &str) {
    let out = cli(m, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "strata {args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "strata {args:?}: {err}");
    assert!(err.contains(what), "strata {args:?}: {err}");
}

/// Runs `sh -c script` inside `branch` (`strata branch exec`); its stdout.
fn in_branch(m: &Mounted, branch: &str, script: &str) -> String {
    let mnt = m.mnt.to_str().unwrap();
    ok(
        m,
        &["branch", "exec", mnt, branch, "--", "sh", "-c", script],
    )
}

fn mnt(m: &Mounted) -> &str {
    m.mnt.to_str().unwrap()
}

#[test]
fn an_agent_tries_two_fixes_from_one_checkpoint_and_keeps_one() {
    let m = workspace(&[], |src| {
        fs::write(src.join("app.py"), "print('bug')\n").unwrap();
        fs::create_dir(src.join("tests")).unwrap();
        fs::write(src.join("tests/t.py"), "old test\n").unwrap();
    });
    let repo = mnt(&m);
    let id = ok(&m, &["snapshot", "create", repo, "--name", "before-fix"]);
    assert_eq!(id.trim(), "1");
    ok(
        &m,
        &[
            "branch",
            "create",
            repo,
            "--from",
            "before-fix",
            "--name",
            "try-a",
        ],
    );
    ok(
        &m,
        &[
            "branch",
            "create",
            repo,
            "--from",
            "before-fix",
            "--name",
            "try-b",
        ],
    );
    let app = m.m("app.py");
    let app = app.to_str().unwrap();
    in_branch(
        &m,
        "try-a",
        &format!("echo \"print('fix a')\" > {app}; rm {repo}/tests/t.py"),
    );
    in_branch(
        &m,
        "try-b",
        &format!("echo \"print('fix b')\" > {app}; echo new > {repo}/notes"),
    );
    // Each attempt sees its own change, the mount itself neither.
    assert_eq!(
        in_branch(&m, "try-a", &format!("cat {app}")),
        "print('fix a')\n"
    );
    assert_eq!(
        in_branch(&m, "try-b", &format!("cat {app}")),
        "print('fix b')\n"
    );
    assert_eq!(fs::read_to_string(m.m("app.py")).unwrap(), "print('bug')\n");
    assert!(!m.m("notes").exists());
    // What each changed, exactly.
    assert_eq!(
        ok(&m, &["snapshot", "diff", repo, "before-fix", "try-a"]),
        "M app.py\nD tests/t.py\n"
    );
    let json: serde_json::Value = serde_json::from_str(&ok(
        &m,
        &["snapshot", "diff", repo, "before-fix", "try-b", "--json"],
    ))
    .unwrap();
    assert_eq!(
        json,
        serde_json::json!([
            {"path": "app.py", "change": "modified"},
            {"path": "notes", "change": "added"},
        ])
    );
    // An attempt's snapshot becomes an image: its files, nothing else.
    let store = m.dir.path().join("export-store");
    let store = store.to_str().unwrap();
    ok(&m, &["branch", "switch", repo, "try-a"]);
    ok(&m, &["snapshot", "create", repo, "--name", "fix-a-final"]);
    ok(&m, &["branch", "switch", repo, "main"]);
    ok(
        &m,
        &[
            "snapshot",
            "export",
            repo,
            "fix-a-final",
            "--image",
            "fix-a",
            "--store",
            store,
        ],
    );
    let images = ok(&m, &["image", "ls", "--json", "--store", store]);
    assert!(images.contains("\"fix-a\""), "{images}");
    let listing: Vec<String> =
        serde_json::from_str::<serde_json::Value>(&images).unwrap()[0]["entries"]
            .as_u64()
            .map(|n| vec![n.to_string()])
            .unwrap_or_default();
    // app.py and the (now empty) tests directory, the root.
    assert_eq!(listing, ["3"], "{images}");
    // No scratch branch is left behind.
    assert!(!ok(&m, &["branch", "ls", repo]).contains("export-"));
    // Keep try-a: the mount shows it; try-b goes.
    ok(&m, &["branch", "switch", repo, "try-a"]);
    assert_eq!(
        fs::read_to_string(m.m("app.py")).unwrap(),
        "print('fix a')\n"
    );
    assert!(!m.m("tests/t.py").exists());
    ok(&m, &["branch", "rm", repo, "try-b"]);
    let branches: serde_json::Value =
        serde_json::from_str(&ok(&m, &["branch", "ls", repo, "--json"])).unwrap();
    let names: Vec<&str> = branches
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["main", "try-a"]);
    assert_eq!(branches[1]["current"], true);
    let snaps: serde_json::Value =
        serde_json::from_str(&ok(&m, &["snapshot", "ls", repo, "--json"])).unwrap();
    assert_eq!(snaps[0]["name"], "before-fix");
    assert_eq!(snaps[0]["id"], 1);
    // Nothing was written before it: its layer is empty.
    assert_eq!(snaps[0]["size"], 0);
    // The lower was never written.
    assert_eq!(fs::read_to_string(m.s("app.py")).unwrap(), "print('bug')\n");
}

/// A python loop that checks, `n` times, what this process sees at the
/// mount root, taking turns with another through two pipes.
const ALTERNATE: &str = r#"
import os, sys
root, want, n, rfd, wfd, first = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
names = {"a": ["f", "m", "only-a", "shared"], "b": ["f", "m", "only-b", "shared"]}[want]
for i in range(n):
    if not (first and i == 0):
        os.read(rfd, 1)
    with open(os.path.join(root, "f")) as f:
        got = f.read()
    assert got == "branch " + want, (i, got)
    st = os.stat(os.path.join(root, "m"))
    assert st.st_size == {"a": 1, "b": 22}[want], (i, st.st_size)
    assert oct(st.st_mode & 0o777) == {"a": "0o600", "b": "0o755"}[want], (i, oct(st.st_mode))
    other = {"a": "only-b", "b": "only-a"}[want]
    assert not os.path.exists(os.path.join(root, other)), (i, other)
    listed = sorted(n for n in os.listdir(root) if not n.startswith("."))
    assert listed == names, (i, listed)
    os.write(wfd, b"x")
print("ok", n)
"#;

#[test]
fn processes_bound_to_two_branches_each_see_only_their_own() {
    let m = workspace(&[], |src| {
        fs::write(src.join("f"), "lower").unwrap();
        fs::write(src.join("m"), "m").unwrap();
        fs::write(src.join("shared"), "shared").unwrap();
    });
    let repo = mnt(&m);
    ok(&m, &["snapshot", "create", repo, "--name", "s"]);
    ok(
        &m,
        &["branch", "create", repo, "--from", "s", "--name", "a"],
    );
    ok(
        &m,
        &["branch", "create", repo, "--from", "s", "--name", "b"],
    );
    in_branch(
        &m,
        "a",
        &format!("printf 'branch a' > {repo}/f; chmod 600 {repo}/m; touch {repo}/only-a"),
    );
    in_branch(
        &m,
        "b",
        &format!(
            "printf 'branch b' > {repo}/f; printf 'twenty-two bytes long' > {repo}/m; echo >> {repo}/m; chmod 755 {repo}/m; touch {repo}/only-b"
        ),
    );
    let script = m.dir.path().join("alternate.py");
    fs::write(&script, ALTERNATE).unwrap();
    let n = std::env::var("STRATA_ISOLATION_ROUNDS").unwrap_or_else(|_| "10000".into());
    // Two pipes: a → b and b → a; each side is handed the ends it uses.
    let (ab_r, ab_w) = rustix::pipe::pipe().unwrap();
    let (ba_r, ba_w) = rustix::pipe::pipe().unwrap();
    use std::os::fd::AsRawFd;
    let fd = |f: &std::os::fd::OwnedFd| f.as_raw_fd().to_string();
    let run = |branch: &str, rfd: String, wfd: String, first: &str| {
        let mut cmd = Command::new(STRATA);
        cmd.args(["branch", "exec", repo, branch, "--", "python3"])
            .arg(&script)
            .args([repo, branch, &n, &rfd, &wfd, first])
            .env("STRATA_STATE_DIR", m.dir.path().join("state"));
        cmd
    };
    let mut ca = run("a", fd(&ba_r), fd(&ab_w), "1");
    let mut cb = run("b", fd(&ab_r), fd(&ba_w), "0");
    let (ha, hb) = std::thread::scope(|s| {
        let ha = s.spawn(|| output_with_timeout(&mut ca, Duration::from_secs(120)));
        let hb = s.spawn(|| output_with_timeout(&mut cb, Duration::from_secs(120)));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    drop((ab_r, ab_w, ba_r, ba_w));
    for (name, out) in [("a", ha), ("b", hb)] {
        let out = out.unwrap_or_else(|| panic!("branch {name}: no end within 120 s"));
        assert!(
            out.status.success(),
            "branch {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("ok {n}")
        );
    }
    // And the mount itself still shows main.
    assert_eq!(fs::read_to_string(m.m("f")).unwrap(), "lower");
}

/// Writes `before` through an open descriptor, snapshots, writes `after`
/// through the same descriptor; the snapshot (the upper's root, frozen by
/// the first snapshot) must hold `before`, the mount `after`.
fn writer_across_a_snapshot(opts: &[&str]) {
    let m = workspace(opts, |src| {
        fs::write(src.join("lower-file"), "lower").unwrap()
    });
    let repo = mnt(&m);
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.m("log"))
        .unwrap();
    f.write_all(b"before").unwrap();
    // A lower file copied up by its open for writing.
    let mut g = fs::OpenOptions::new()
        .write(true)
        .open(m.m("lower-file"))
        .unwrap();
    g.write_all(b"LOWER").unwrap();
    // A shared writable mapping.
    fs::write(m.m("mapped"), vec![b'.'; 4096]).unwrap();
    let mut map = map_shared(&m.m("mapped"));
    map.store("mapped-before");

    ok(&m, &["snapshot", "create", repo, "--name", "s1"]);
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(b"after!").unwrap();
    g.write_all(b"-more").unwrap();
    map.store("mapped-after!");
    map.msync();
    drop((f, g, map));

    let up = m.upper();
    assert_eq!(fs::read_to_string(up.join("log")).unwrap(), "before");
    assert_eq!(fs::read_to_string(up.join("lower-file")).unwrap(), "LOWER");
    assert_eq!(
        &fs::read(up.join("mapped")).unwrap()[..13],
        b"mapped-before"
    );
    assert_eq!(fs::read_to_string(m.m("log")).unwrap(), "after!");
    assert_eq!(fs::read_to_string(m.m("lower-file")).unwrap(), "LOWER-more");
    assert_eq!(&fs::read(m.m("mapped")).unwrap()[..13], b"mapped-after!");
    // A branch of the snapshot sees the snapshot.
    ok(
        &m,
        &["branch", "create", repo, "--from", "s1", "--name", "old"],
    );
    assert_eq!(in_branch(&m, "old", &format!("cat {repo}/log")), "before");
}

/// A shared writable mapping of a file, made and written by a `python3`
/// child (which keeps its descriptor open, as a writer across a snapshot
/// does), so the test binary needs no `unsafe`.
struct Mapping {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::io::BufReader<std::process::ChildStdout>,
}

fn map_shared(path: &Path) -> Mapping {
    let script = r#"
import mmap, sys
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), 4096, mmap.MAP_SHARED)
for line in sys.stdin:
    cmd, _, arg = line.rstrip("\n").partition(" ")
    if cmd == "w":
        m[0:len(arg)] = arg.encode()
    elif cmd == "s":
        m.flush()
    print("done", flush=True)
"#;
    let mut child = Command::new("python3")
        .args(["-c", script])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    Mapping {
        child,
        stdin,
        stdout,
    }
}

impl Mapping {
    fn ask(&mut self, line: &str) {
        use std::io::BufRead;
        writeln!(self.stdin, "{line}").unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        assert_eq!(answer.trim(), "done", "mapping: {line}");
    }
    /// Stores `text` at the start of the mapping.
    fn store(&mut self, text: &str) {
        self.ask(&format!("w {text}"));
    }
    fn msync(&mut self) {
        self.ask("s");
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_snapshot_keeps_what_was_written_before_it_and_open_writers_go_on_in_the_branch() {
    writer_across_a_snapshot(&[]);
}

#[test]
fn open_writers_across_a_snapshot_without_kernel_passthrough() {
    writer_across_a_snapshot(&["passthrough=false"]);
}

#[test]
fn snapshots_branches_and_their_content_survive_a_remount() {
    let mut m = workspace(&[], |src| fs::write(src.join("f"), "lower").unwrap());
    let repo = mnt(&m).to_string();
    fs::write(m.m("f"), "one").unwrap();
    ok(&m, &["snapshot", "create", &repo, "--name", "s1"]);
    fs::write(m.m("f"), "two").unwrap();
    ok(&m, &["snapshot", "create", &repo, "--name", "s2"]);
    fs::write(m.m("f"), "three").unwrap();
    ok(
        &m,
        &["branch", "create", &repo, "--from", "s1", "--name", "b1"],
    );
    in_branch(&m, "b1", &format!("echo changed > {repo}/f"));
    m.unmount();
    let src = m.src.clone();
    let upper = m.upper();
    let m2 = Mounted::build_with(&[], &[], move |_| {
        (
            src.display().to_string(),
            vec![format!("upper={}", upper.display())],
        )
    });
    let repo2 = mnt(&m2).to_string();
    assert_eq!(fs::read_to_string(m2.m("f")).unwrap(), "three");
    let names: Vec<String> =
        serde_json::from_str::<serde_json::Value>(&ok(&m2, &["snapshot", "ls", &repo2, "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect();
    assert_eq!(names, ["s1", "s2"]);
    assert_eq!(in_branch(&m2, "b1", &format!("cat {repo2}/f")), "changed\n");
    assert_eq!(ok(&m2, &["snapshot", "diff", &repo2, "s1", "s2"]), "M f\n");
    drop(m);
}

#[test]
fn a_daemon_killed_during_any_change_leaves_a_consistent_workspace() {
    let mut m = workspace(&[], |src| fs::write(src.join("f"), "lower").unwrap());
    let src = m.src.clone();
    let upper = m.upper();
    fs::write(m.m("f"), "base").unwrap();
    ok(&m, &["snapshot", "create", mnt(&m), "--name", "base"]);
    // Killed mounts keep their scratch directories (the upper among them).
    let mut earlier = Vec::new();
    for round in 0..6u64 {
        let repo = mnt(&m).to_string();
        fs::write(m.m("f"), format!("round {round}")).unwrap();
        fs::write(m.m(&format!("file{round}")), "x").unwrap();
        // A change under way when the daemon dies (at a different point each
        // round): a snapshot with a file open for writing, a branch made, a
        // branch removed.
        let _open = fs::OpenOptions::new().append(true).open(m.m("f")).unwrap();
        let (b, prev) = (format!("b{round}"), format!("b{}", round.saturating_sub(1)));
        let args: Vec<&str> = match round % 3 {
            0 => vec!["snapshot", "create", &repo, "--name", &b],
            1 => vec!["branch", "create", &repo, "--from", "base", "--name", &b],
            _ => vec!["branch", "rm", &repo, &prev],
        };
        let mut change = Command::new(STRATA);
        change
            .args(&args)
            .env("STRATA_STATE_DIR", m.dir.path().join("state"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut child = change.spawn().unwrap();
        std::thread::sleep(Duration::from_millis(round * 5));
        // Killed, gone (its workspace lock with it), its mount stale.
        m.kill_and_wait_stale();
        let _ = child.kill();
        let _ = child.wait();
        drop(_open);
        let _ = rustix::mount::unmount(&m.mnt, rustix::mount::UnmountFlags::DETACH);
        let (s, u) = (src.clone(), upper.clone());
        let next = Mounted::build_with(&[], &[], move |_| {
            (
                s.display().to_string(),
                vec![format!("upper={}", u.display())],
            )
        });
        // Nothing written before the change was lost, whatever happened to it.
        assert_eq!(
            fs::read_to_string(next.m("f")).unwrap(),
            format!("round {round}")
        );
        for r in 0..=round {
            assert!(
                next.m(&format!("file{r}")).exists(),
                "round {round}: file{r}"
            );
        }
        // Every snapshot listed shows its own state, every branch listed works.
        let repo = mnt(&next).to_string();
        let snaps: serde_json::Value =
            serde_json::from_str(&ok(&next, &["snapshot", "ls", &repo, "--json"])).unwrap();
        for s in snaps.as_array().unwrap() {
            let name = s["name"].as_str().unwrap();
            let want = match name {
                "base" => "base".to_string(),
                n => format!("round {}", &n[1..]),
            };
            let b = format!("check-{name}-{round}");
            ok(
                &next,
                &["branch", "create", &repo, "--from", name, "--name", &b],
            );
            assert_eq!(in_branch(&next, &b, &format!("cat {repo}/f")), want);
            ok(&next, &["branch", "rm", &repo, &b]);
        }
        let branches: serde_json::Value =
            serde_json::from_str(&ok(&next, &["branch", "ls", &repo, "--json"])).unwrap();
        for b in branches.as_array().unwrap() {
            let name = b["name"].as_str().unwrap();
            if name != "main" {
                assert_eq!(in_branch(&next, name, &format!("cat {repo}/f")), "base");
            }
        }
        earlier.push(std::mem::replace(&mut m, next));
    }
}

#[test]
fn bad_input_to_every_command_is_one_line_and_changes_nothing() {
    let m = workspace(&[], |src| fs::write(src.join("f"), "lower").unwrap());
    let repo = mnt(&m);
    refused(
        &m,
        &["snapshot", "create", repo, "--name", "../up"],
        "snapshot name",
    );
    refused(
        &m,
        &["snapshot", "create", repo, "--name", "42"],
        "not all digits",
    );
    ok(&m, &["snapshot", "create", repo, "--name", "s"]);
    refused(&m, &["snapshot", "create", repo, "--name", "s"], "exists");
    refused(&m, &["snapshot", "rm", repo, "nope"], "no snapshot");
    refused(&m, &["snapshot", "diff", repo, "s", "nope"], "nope");
    refused(
        &m,
        &["branch", "create", repo, "--from", "nope", "--name", "b"],
        "no snapshot",
    );
    refused(
        &m,
        &["branch", "create", repo, "--from", "s", "--name", "a/b"],
        "branch name",
    );
    ok(
        &m,
        &["branch", "create", repo, "--from", "s", "--name", "b"],
    );
    refused(
        &m,
        &["branch", "create", repo, "--from", "s", "--name", "b"],
        "exists",
    );
    refused(
        &m,
        &["snapshot", "rm", repo, "s"],
        "branch \"b\" was made from it",
    );
    refused(
        &m,
        &["branch", "rm", repo, "main"],
        "switch to another first",
    );
    refused(&m, &["branch", "rm", repo, "nope"], "no branch");
    refused(&m, &["branch", "switch", repo, "nope"], "no branch");
    refused(
        &m,
        &["branch", "bind", repo, "b", "--pid", "999999999"],
        "no process",
    );
    refused(
        &m,
        &["branch", "exec", repo, "nope", "--", "true"],
        "no branch",
    );
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    ok(
        &m,
        &[
            "branch",
            "bind",
            repo,
            "b",
            "--pid",
            &sleeper.id().to_string(),
        ],
    );
    refused(&m, &["branch", "rm", repo, "b"], "in use by processes");
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    // Not a workspace, not a mount.
    let plain = Mounted::new(&[]);
    refused(&m, &["snapshot", "ls", mnt(&plain)], "not a workspace");
    refused(
        &m,
        &["branch", "ls", m.dir.path().to_str().unwrap()],
        "not a strata mount",
    );
    // Nothing changed: one snapshot, two branches, the mount shows main.
    let snaps: serde_json::Value =
        serde_json::from_str(&ok(&m, &["snapshot", "ls", repo, "--json"])).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    let branches: serde_json::Value =
        serde_json::from_str(&ok(&m, &["branch", "ls", repo, "--json"])).unwrap();
    assert_eq!(branches.as_array().unwrap().len(), 2);
    assert_eq!(branches[0]["current"], true);
    // A user who does not own the mount changes nothing.
    let out = as_nobody(&format!("{STRATA} snapshot create {repo} --name theirs"));
    assert!(!out.status.success());
    let snaps: serde_json::Value =
        serde_json::from_str(&ok(&m, &["snapshot", "ls", repo, "--json"])).unwrap();
    assert_eq!(snaps.as_array().unwrap().len(), 1);
}
