//! What the command line says when it cannot do what it is asked: one line
//! naming the path or option, the right exit code, no mount left behind, no
//! panic (also when nobody reads the output).

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

const LIMIT: Duration = Duration::from_secs(30);

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
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
