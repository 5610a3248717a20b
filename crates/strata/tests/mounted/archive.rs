//! Archives as layers on real mounts: tar (plain, gzip, zstd, xz) and zip,
//! built by the system's own tools, mounted alone (read-only) or under an
//! upper; hostile archives never put a name outside the tree.

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn big() -> Vec<u8> {
    (0..3_000_000u32).map(|i| (i % 251) as u8).collect()
}

/// Files, directories, a symlink, a hard link, modes and times.
fn make_tree(src: &Path) {
    fs::create_dir_all(src.join("d/sub")).unwrap();
    fs::write(src.join("top.txt"), b"top\n").unwrap();
    fs::write(src.join("d/sub/deep.txt"), b"deep\n").unwrap();
    fs::write(src.join("d/big.bin"), big()).unwrap();
    std::os::unix::fs::symlink("../top.txt", src.join("d/link")).unwrap();
    fs::hard_link(src.join("top.txt"), src.join("d/hard")).unwrap();
    fs::set_permissions(src.join("top.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(src.join("d/sub"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::set_permissions(src, fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["top.txt", "d/sub/deep.txt", "d/big.bin", "d/link"] {
        set_mtime(&src.join(f), 1_600_000_000, 0);
    }
}

fn run_ok(cmd: &mut Command) {
    let out = output_with_timeout(cmd, Duration::from_secs(60)).expect("archiver timed out");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `src` archived as `kind` (tar, tar.gz, tar.zst, tar.xz, zip) into `out`.
fn archive(kind: &str, src: &Path, dir: &Path) -> PathBuf {
    let out = dir.join(format!("tree.{kind}"));
    let flag = match kind {
        "tar" => "-cf",
        "tar.gz" => "-czf",
        "tar.zst" => "--zstd",
        "tar.xz" => "-cJf",
        "zip" => {
            run_ok(
                Command::new("zip")
                    .arg("-qry")
                    .arg(&out)
                    .arg(".")
                    .current_dir(src),
            );
            return out;
        }
        _ => unreachable!(),
    };
    let mut cmd = Command::new("tar");
    cmd.arg("-C").arg(src);
    if kind == "tar.zst" {
        cmd.args([flag, "-cf"]);
    } else {
        cmd.arg(flag);
    }
    run_ok(cmd.arg(&out).arg("."));
    out
}

fn mount_archive(opts: &[&str], make: impl FnOnce(&Path) -> PathBuf) -> Mounted {
    Mounted::build_source(opts, &[], |dir| make(dir).display().to_string())
}

#[test]
fn every_archive_format_shows_the_tree_it_was_made_from() {
    for kind in ["tar", "tar.gz", "tar.zst", "tar.xz", "zip"] {
        let mut src = PathBuf::new();
        let m = mount_archive(&[], |dir| {
            src = dir.join("src");
            fs::create_dir(&src).unwrap();
            make_tree(&src);
            archive(kind, &src, dir)
        });
        // zip keeps DOS times and no hard links: compare those for tar only.
        let tar = kind != "zip";
        let detail = Detail {
            times: tar,
            xattrs: false,
            nlink: tar,
        };
        let (mut want, mut got) = (walk(&src, detail), walk(&m.mnt, detail));
        if !tar {
            want.links.clear();
            got.links.clear();
        }
        assert_same_tree(kind, &want, &got);
        // Random offsets of a member bigger than one read.
        let f = fs::File::open(m.m("d/big.bin")).unwrap();
        let data = big();
        for off in [0usize, 1, 131_071, 1 << 20, 2_999_990] {
            let mut buf = vec![0u8; 10];
            let n = f.read_at(&mut buf, off as u64).unwrap();
            assert_eq!(
                &buf[..n],
                &data[off..(off + 10).min(data.len())],
                "{kind} @{off}"
            );
        }
        // Read-only without an upper.
        assert_eq!(errno(fs::write(m.m("new"), b"x")), libc::EROFS, "{kind}");
        // Where a member comes from.
        let source = get_xattr(&m.m("d/sub/deep.txt"), "user.strata.source").unwrap();
        let want = format!("tree.{kind}:/d/sub/deep.txt");
        assert!(String::from_utf8_lossy(&source).ends_with(&want), "{kind}");
        let layers = get_xattr(&m.m(".strata"), "user.strata.layers").unwrap();
        assert!(String::from_utf8_lossy(&layers).contains(kind), "{kind}");
    }
}

#[test]
fn under_an_upper_an_archive_takes_writes_and_stays_unchanged() {
    let mut file = PathBuf::new();
    let m = Mounted::build_with(&[], &[], |dir| {
        let src = dir.join("src");
        fs::create_dir(&src).unwrap();
        make_tree(&src);
        file = archive("tar.gz", &src, dir);
        let upper = dir.join("upper");
        fs::create_dir(&upper).unwrap();
        (
            file.display().to_string(),
            vec![format!("upper={}", upper.display())],
        )
    });
    let before = fs::read(&file).unwrap();
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.m("top.txt"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"more\n").unwrap();
    drop(f);
    assert_eq!(fs::read(m.m("top.txt")).unwrap(), b"top\nmore\n");
    assert_eq!(fs::read(m.upper().join("top.txt")).unwrap(), b"top\nmore\n");
    fs::remove_file(m.m("d/sub/deep.txt")).unwrap();
    assert!(!m.m("d/sub/deep.txt").exists());
    fs::write(m.m("d/new"), b"new").unwrap();
    assert_eq!(names(&m.m("d")), ["big.bin", "hard", "link", "new", "sub"]);
    assert_eq!(fs::read(m.m("d/big.bin")).unwrap(), big());
    assert_eq!(
        fs::read(&file).unwrap(),
        before,
        "the archive is never written"
    );
}

/// Python's tarfile and zipfile store names as given.
fn python(script: &str) {
    run_ok(Command::new("python3").arg("-c").arg(script));
}

#[test]
fn hostile_archive_names_never_lead_out_of_the_tree() {
    for kind in ["tar", "zip"] {
        let mut dir_path = PathBuf::new();
        let m = mount_archive(&[], |dir| {
            dir_path = dir.to_path_buf();
            let out = dir.join(format!("evil.{kind}"));
            let script = if kind == "tar" {
                format!(
                    r#"
import io, tarfile
t = tarfile.open({out:?}, "w")
def add(name, data=b"x", kind=tarfile.REGTYPE, link=""):
    i = tarfile.TarInfo(name); i.size = len(data) if kind == tarfile.REGTYPE else 0
    i.type = kind; i.linkname = link
    t.addfile(i, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
add("ok", b"fine")
add("../escape")
add("a/../../escape2")
add("/abs/file", b"abs")
add("hl", kind=tarfile.LNKTYPE, link="../../etc/passwd")
add("sl", kind=tarfile.SYMTYPE, link="../../../etc/passwd")
t.close()
"#,
                    out = out.display().to_string()
                )
            } else {
                format!(
                    r#"
import zipfile
z = zipfile.ZipFile({out:?}, "w")
z.writestr("ok", b"fine")
z.writestr("../escape", b"x")
z.writestr("a/../../escape2", b"x")
z.writestr("/abs/file", b"abs")
z.close()
"#,
                    out = out.display().to_string()
                )
            };
            python(&script);
            out
        });
        let mut top = names(&m.mnt);
        top.sort();
        let want: &[&str] = if kind == "tar" {
            &["abs", "ok", "sl"]
        } else {
            &["abs", "ok"]
        };
        assert_eq!(top, want, "{kind}");
        assert_eq!(fs::read(m.m("ok")).unwrap(), b"fine");
        assert_eq!(fs::read(m.m("abs/file")).unwrap(), b"abs");
        for p in [
            dir_path.join("escape"),
            dir_path.parent().unwrap().join("escape2"),
        ] {
            assert!(!p.exists(), "{}", p.display());
        }
        // The link is shown as stored, never followed by the daemon.
        if kind == "tar" {
            assert_eq!(
                fs::read_link(m.m("sl")).unwrap(),
                Path::new("../../../etc/passwd")
            );
        }
        let log = m.log();
        assert!(log.contains("left out"), "{kind}: {log}");
    }
}

#[test]
fn a_file_that_is_no_archive_is_refused_by_name() {
    let dir = scratch_dir();
    let (file, mnt) = (dir.path().join("notes.txt"), dir.path().join("mnt"));
    fs::write(&file, b"just text").unwrap();
    fs::create_dir(&mnt).unwrap();
    let out = strata(
        &["mount", file.to_str().unwrap(), mnt.to_str().unwrap()],
        &dir.path().join("state"),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("notes.txt")
            && err.contains("not a directory")
            && err.contains("nor a known archive"),
        "{err}"
    );
    assert!(!is_mounted(&mnt));
}
