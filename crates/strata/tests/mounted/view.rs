//! Views on real mounts: two clients' layouts of one collection, renames
//! both ways, filters, an archive source, writes under an upper, and
//! `strata view check`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

/// `roms/Amstrad/CPC` with disks, BIN files (one with a ROM twin), a
/// dotfile and notes; `cpc.zip` holding `disks/z.dsk`.
fn collection(dir: &Path) {
    let cpc = dir.join("roms/Amstrad/CPC");
    fs::create_dir_all(cpc.join("sub")).unwrap();
    for (n, c) in [
        ("a.dsk", "A"),
        ("b.BIN", "B"),
        ("c.ROM", "C rom"),
        ("c.BIN", "C bin"),
        (".hidden", "H"),
        ("notes.txt", "N"),
        ("sub/d.dsk", "D"),
    ] {
        fs::write(cpc.join(n), c).unwrap();
    }
    let zsrc = dir.join("zsrc/disks");
    fs::create_dir_all(&zsrc).unwrap();
    fs::write(zsrc.join("z.dsk"), "Z").unwrap();
    let out = output_with_timeout(
        Command::new("zip")
            .arg("-qr")
            .arg(dir.join("cpc.zip"))
            .arg("disks")
            .current_dir(dir.join("zsrc")),
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(out.status.success());
    fs::create_dir(dir.join("games")).unwrap();
    fs::copy(dir.join("cpc.zip"), dir.join("games/g.zip")).unwrap();
    fs::write(dir.join("games/notes.txt"), "n").unwrap();
}

const SPEC: &str = r#"
[sources]
roms = "roms"
cpc = "cpc.zip"
games = "games"

[[map]]
path = "MiSTer/Amstrad"
from = "roms:Amstrad/CPC"
include = ["*.dsk", "*.BIN", "*.ROM"]
hidden = false
rename = ["BIN:ROM"]

[[map]]
path = "Native/Amstrad/CPC/Software/Collections"
from = "roms:Amstrad/CPC"
exclude = ["*.txt"]

[[map]]
path = "Native/Amstrad/CPC/Software/Collections/extras"
from = "cpc:disks"

[[map]]
path = "Zipped"
from = "games"
archives = "dir"

[[map]]
path = "Auto"
from = "games"
include = ["*.dsk"]
archives = "auto"
"#;

fn mount_view(upper: bool) -> Mounted {
    Mounted::build_with(&[], &[], |dir| {
        collection(dir);
        let spec = dir.join("retro.toml");
        fs::write(&spec, SPEC).unwrap();
        let mut opts = Vec::new();
        if upper {
            let up = dir.join("upper");
            fs::create_dir(&up).unwrap();
            opts.push(format!("upper={}", up.display()));
        }
        (format!("view:{}", spec.display()), opts)
    })
}

fn sorted(dir: &Path) -> Vec<String> {
    let mut v = names(dir);
    v.sort();
    v
}

#[test]
fn two_clients_see_their_own_layout_of_one_collection() {
    let m = mount_view(false);
    assert_eq!(sorted(&m.mnt), ["Auto", "MiSTer", "Native", "Zipped"]);
    let mister = m.m("MiSTer/Amstrad");
    assert_eq!(sorted(&mister), ["a.dsk", "b.ROM", "c.BIN", "c.ROM", "sub"]);
    assert_eq!(fs::read_to_string(mister.join("b.ROM")).unwrap(), "B");
    assert_eq!(fs::read_to_string(mister.join("c.ROM")).unwrap(), "C rom");
    assert!(!mister.join("b.BIN").exists(), "shown only renamed");
    assert!(!mister.join(".hidden").exists() && !mister.join("notes.txt").exists());
    let native = m.m("Native/Amstrad/CPC/Software/Collections");
    assert_eq!(
        sorted(&native),
        [
            ".hidden", "a.dsk", "b.BIN", "c.BIN", "c.ROM", "extras", "sub"
        ]
    );
    assert_eq!(
        fs::read_to_string(native.join("extras/z.dsk")).unwrap(),
        "Z"
    );
    assert_eq!(fs::read_to_string(native.join("sub/d.dsk")).unwrap(), "D");
    // One source directory, two places: two directories to the kernel.
    use std::os::unix::fs::MetadataExt;
    let a = fs::metadata(mister.join("sub")).unwrap().ino();
    let b = fs::metadata(native.join("sub")).unwrap().ino();
    assert_ne!(a, b);
    // Read-only without an upper.
    assert_eq!(errno(fs::write(mister.join("new.dsk"), b"x")), libc::EROFS);
    // `ls -l` agrees with lookups (readdirplus).
    let out = output_with_timeout(
        Command::new("ls").arg("-la").arg(&mister),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("b.ROM"));
    // Where a name comes from: the source file and the rule that renamed it.
    let explain = |p: &Path| {
        let out = strata(
            &["view", "explain", p.to_str().unwrap()],
            &m.dir.path().join("state"),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let why = explain(&mister.join("b.ROM"));
    assert!(
        why.contains("roms/Amstrad/CPC/b.BIN, by map 1 of view:")
            && why.contains("rename *.BIN->*.ROM"),
        "{why}"
    );
    let why = explain(&m.m("Zipped/g.zip/disks/z.dsk"));
    assert!(
        why.contains("games/g.zip:/disks/z.dsk, by map 4 of view:"),
        "{why}"
    );
    assert!(explain(&m.m("Native")).starts_with("a directory of view:"));
    // A zip shown as a directory of its members.
    assert_eq!(sorted(&m.m("Zipped")), ["g.zip", "notes.txt"]);
    assert!(fs::metadata(m.m("Zipped/g.zip")).unwrap().is_dir());
    assert_eq!(sorted(&m.m("Zipped/g.zip")), ["disks"]);
    assert_eq!(
        fs::read_to_string(m.m("Zipped/g.zip/disks/z.dsk")).unwrap(),
        "Z"
    );
    // auto: g.zip holds one .dsk, which shows in its place.
    assert_eq!(sorted(&m.m("Auto")), ["z.dsk"]);
    assert_eq!(fs::read_to_string(m.m("Auto/z.dsk")).unwrap(), "Z");
}

#[test]
fn under_an_upper_a_view_takes_writes_and_its_sources_stay_unchanged() {
    let m = mount_view(true);
    let mister = m.m("MiSTer/Amstrad");
    fs::write(mister.join("b.ROM"), b"patched").unwrap();
    assert_eq!(fs::read_to_string(mister.join("b.ROM")).unwrap(), "patched");
    let src = m.dir.path().join("roms/Amstrad/CPC");
    assert_eq!(fs::read_to_string(src.join("b.BIN")).unwrap(), "B");
    assert_eq!(
        fs::read_to_string(m.upper().join("MiSTer/Amstrad/b.ROM")).unwrap(),
        "patched"
    );
    let out = strata(
        &["view", "explain", mister.join("b.ROM").to_str().unwrap()],
        &m.dir.path().join("state"),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("(upper)"));
    fs::remove_file(mister.join("a.dsk")).unwrap();
    assert!(!mister.join("a.dsk").exists());
    assert!(src.join("a.dsk").exists());
    fs::create_dir(m.m("mine")).unwrap();
    fs::write(m.m("mine/f"), b"f").unwrap();
    assert_eq!(
        sorted(&m.mnt),
        ["Auto", "MiSTer", "Native", "Zipped", "mine"]
    );
}

fn check(spec_text: &str) -> (Option<i32>, String, String) {
    let dir = scratch_dir();
    collection(dir.path());
    let spec = dir.path().join("v.toml");
    fs::write(&spec, spec_text).unwrap();
    let out = strata(
        &["view", "check", spec.to_str().unwrap()],
        &dir.path().join("state"),
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn view_check_explains_a_good_spec_and_locates_errors() {
    let (code, out, err) = check(SPEC);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(
        lines[4].ends_with("games include *.dsk archives-auto"),
        "{out}"
    );
    assert!(
        lines[3].starts_with("/Zipped <- ") && lines[3].ends_with("games archives-as-dirs"),
        "{out}"
    );
    assert!(
        lines[0].starts_with("/MiSTer/Amstrad <- ")
            && lines[0].ends_with(
                "roms/Amstrad/CPC include *.dsk,*.BIN,*.ROM no-hidden rename *.BIN->*.ROM"
            ),
        "{out}"
    );
    let bad =
        "[sources]\nroms = \"roms\"\n[[map]]\npath = \"x\"\nfrom = \"rom:a\"\nflatten = true\n";
    let (code, out, err) = check(bad);
    assert_eq!(code, Some(2));
    assert!(out.is_empty());
    // serde stops at the first unknown key: one error, with its place.
    assert!(
        err.contains("v.toml:6:") && err.contains("flatten"),
        "{err}"
    );
    let bad = "[sources]\nroms = \"roms\"\nmissing = \"nowhere\"\n[[map]]\npath = \"x/../..\"\nfrom = \"rom:a\"\n";
    let (code, _, err) = check(bad);
    assert_eq!(code, Some(2));
    let errs: Vec<&str> = err.lines().collect();
    assert_eq!(errs.len(), 3, "{err}");
    assert!(
        errs.iter()
            .any(|l| l.contains("v.toml:3:") && l.contains("nowhere")),
        "{err}"
    );
    assert!(
        errs.iter()
            .any(|l| l.contains("v.toml:5:") && l.contains("dot entry")),
        "{err}"
    );
    assert!(
        errs.iter()
            .any(|l| l.contains("v.toml:6:") && l.contains("names no source")),
        "{err}"
    );
}

#[test]
fn a_view_of_a_missing_directory_is_refused_at_mount() {
    let dir = scratch_dir();
    collection(dir.path());
    let spec = dir.path().join("v.toml");
    fs::write(
        &spec,
        "[sources]\nroms = \"roms\"\n[[map]]\npath = \"x\"\nfrom = \"roms:nope\"\n",
    )
    .unwrap();
    let mnt: PathBuf = dir.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let out = strata(
        &[
            "mount",
            &format!("view:{}", spec.display()),
            mnt.to_str().unwrap(),
        ],
        &dir.path().join("state"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("map 1") && err.contains("nope"), "{err}");
    assert!(!is_mounted(&mnt));
}
