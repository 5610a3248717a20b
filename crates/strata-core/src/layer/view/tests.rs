use std::fs;

use super::*;

struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    /// A ROM collection: `roms/Amstrad/CPC/{a.dsk,b.BIN,b2.BIN,c.ROM,c.BIN,.hidden,notes.txt}`
    /// and `roms/Amstrad/CPC/sub/d.dsk`.
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let cpc = dir.path().join("roms/Amstrad/CPC");
        fs::create_dir_all(cpc.join("sub")).unwrap();
        for (n, c) in [
            ("a.dsk", "A"),
            ("b.BIN", "B"),
            ("b2.BIN", "B2"),
            ("c.ROM", "C rom"),
            ("c.BIN", "C bin"),
            (".hidden", "H"),
            ("notes.txt", "N"),
            ("sub/d.dsk", "D"),
        ] {
            fs::write(cpc.join(n), c).unwrap();
        }
        Setup { dir }
    }

    fn spec(&self, text: &str) -> PathBuf {
        let p = self.dir.path().join("view.toml");
        fs::write(&p, text).unwrap();
        p
    }

    fn view(&self, text: &str) -> ViewLayer {
        ViewLayer::open(&self.spec(text), 64, None).unwrap()
    }
}

fn at(v: &ViewLayer, path: &str) -> Option<LObj> {
    let mut cur = v.root();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        cur = v.lookup(&cur, &CString::new(part).unwrap()).unwrap()?.0;
    }
    Some(cur)
}

fn names(v: &ViewLayer, path: &str) -> Vec<String> {
    let mut out = Vec::new();
    v.list(&at(v, path).unwrap(), &mut out).unwrap();
    out.into_iter()
        .map(|n| n.name.into_string().unwrap())
        .collect()
}

/// A file's content, read at offset 0 as the daemon does (descriptors of
/// one extracted member share their offset).
fn read(v: &ViewLayer, path: &str) -> String {
    let f = fs::File::from(v.open(&at(v, path).unwrap()).unwrap());
    let mut buf = vec![0u8; 1 << 16];
    let n = std::os::unix::fs::FileExt::read_at(&f, &mut buf, 0).unwrap();
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// `zip -qr ARCHIVE PATHS...` run in `dir`, by the system's zip.
fn zip(archive: &Path, dir: &Path, paths: &[&str]) {
    let st = std::process::Command::new("zip")
        .arg("-qr")
        .arg(archive)
        .args(paths)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "zip {}", archive.display());
}

const TWO_CLIENTS: &str = r#"
[sources]
roms = "roms"

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
"#;

#[test]
fn maps_place_source_directories_with_filters_and_renames() {
    let s = Setup::new();
    let v = s.view(TWO_CLIENTS);
    assert_eq!(names(&v, ""), ["MiSTer", "Native"]);
    // MiSTer: only the included kinds, no dotfiles, .BIN shown as .ROM
    // except where a .ROM of that name exists.
    let mut m = names(&v, "MiSTer/Amstrad");
    m.sort();
    assert_eq!(m, ["a.dsk", "b.ROM", "b2.ROM", "c.BIN", "c.ROM", "sub"]);
    assert_eq!(read(&v, "MiSTer/Amstrad/b.ROM"), "B");
    assert_eq!(read(&v, "MiSTer/Amstrad/c.ROM"), "C rom");
    assert_eq!(read(&v, "MiSTer/Amstrad/c.BIN"), "C bin");
    assert!(
        at(&v, "MiSTer/Amstrad/b.BIN").is_none(),
        "shown renamed only"
    );
    assert!(at(&v, "MiSTer/Amstrad/notes.txt").is_none());
    assert!(at(&v, "MiSTer/Amstrad/.hidden").is_none());
    assert_eq!(names(&v, "MiSTer/Amstrad/sub"), ["d.dsk"]);
    // Native: the same source, another layout and other rules.
    let mut n = names(&v, "Native/Amstrad/CPC/Software/Collections");
    n.sort();
    assert_eq!(
        n,
        [
            ".hidden", "a.dsk", "b.BIN", "b2.BIN", "c.BIN", "c.ROM", "sub"
        ]
    );
    // The same source directory under two maps is two objects.
    let a = v.stat(&at(&v, "MiSTer/Amstrad/sub").unwrap()).unwrap();
    let b = v
        .stat(&at(&v, "Native/Amstrad/CPC/Software/Collections/sub").unwrap())
        .unwrap();
    assert_ne!(a.key, b.key);
    // Listing keys are lookup keys.
    let mut listed = Vec::new();
    v.list(&at(&v, "MiSTer/Amstrad").unwrap(), &mut listed)
        .unwrap();
    for l in listed {
        let (_, st) = v
            .lookup(&at(&v, "MiSTer/Amstrad").unwrap(), &l.name)
            .unwrap()
            .unwrap();
        assert_eq!(st.key, l.key, "{:?}", l.name);
    }
}

#[test]
fn a_map_inside_another_maps_directory_shows_on_top() {
    let s = Setup::new();
    fs::create_dir_all(s.dir.path().join("extra")).unwrap();
    fs::write(s.dir.path().join("extra/e.dsk"), "E").unwrap();
    let v = s.view(
        r#"
[sources]
roms = "roms"
extra = "extra"
[[map]]
path = "all"
from = "roms:Amstrad"
[[map]]
path = "all/CPC/sub"
from = "extra"
"#,
    );
    assert_eq!(names(&v, "all"), ["CPC"]);
    let mut cpc = names(&v, "all/CPC");
    cpc.sort();
    assert!(cpc.contains(&"a.dsk".to_string()) && cpc.contains(&"sub".to_string()));
    // `sub` shows the extra map first, then roms' own sub.
    assert_eq!(names(&v, "all/CPC/sub"), ["e.dsk", "d.dsk"]);
    assert_eq!(read(&v, "all/CPC/sub/d.dsk"), "D");
    assert_eq!(read(&v, "all/CPC/sub/e.dsk"), "E");
}

#[test]
fn an_archive_is_a_source_too() {
    let s = Setup::new();
    let tar = s.dir.path().join("cpc.tar");
    let st = std::process::Command::new("tar")
        .arg("-C")
        .arg(s.dir.path().join("roms/Amstrad/CPC"))
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let v = s.view(
        r#"
[sources]
cpc = "cpc.tar"
[[map]]
path = "from-tar"
from = "cpc:sub"
"#,
    );
    assert_eq!(names(&v, "from-tar"), ["d.dsk"]);
    assert_eq!(read(&v, "from-tar/d.dsk"), "D");
    assert!(v.unchanging());
}

#[test]
fn spec_errors_say_where() {
    let s = Setup::new();
    let check = |text: &str| -> String {
        Spec::parse(text, &s.dir.path().join("v.toml"))
            .expect_err("an error")
            .join("\n")
    };
    let e =
        check("[sources]\nroms = \"roms\"\n[[map]]\npath = \"x\"\nfrom = \"roms\"\ncolour = 1\n");
    assert!(e.contains("v.toml:6:") && e.contains("colour"), "{e}");
    let e = check("[sources]\nroms = \"roms\"\n[[map]]\npath = \"x\"\nfrom = \"nope:a\"\n");
    assert!(
        e.contains("v.toml:5:8") && e.contains("names no source"),
        "{e}"
    );
    let e = check("[sources]\nroms = \"missing-dir\"\n[[map]]\npath = \"x\"\nfrom = \"roms\"\n");
    assert!(e.contains("v.toml:2:") && e.contains("missing-dir"), "{e}");
    let e = check("[sources]\nroms = \"roms\"\n[[map]]\npath = \"../x\"\nfrom = \"roms\"\n");
    assert!(e.contains("v.toml:4:") && e.contains("dot entry"), "{e}");
    let e = check("[sources]\nroms = \"roms\"\n[[map]]\npath = \"x\"\nfrom = \"roms:a/../..\"\n");
    assert!(e.contains("dot entry"), "{e}");
    let e = check(
        "[sources]\nroms = \"roms\"\n[[map]]\npath = \"x\"\nfrom = \"roms\"\nrename = [\"BIN:ROM\", \"ROM:IMG\"]\n",
    );
    assert!(e.contains("collides"), "{e}");
    let e = check(
        "[sources]\nroms = \"roms\"\n[[map]]\npath = \"x\"\nfrom = \"roms\"\nrename = [\"BIN\"]\n",
    );
    assert!(e.contains("FROM:TO"), "{e}");
    let e = check(
        "[sources]\nroms = \"roms\"\n[[map]]\npath = \"x\"\nfrom = \"roms\"\ninclude = [\"[\"]\n",
    );
    assert!(e.contains("include"), "{e}");
    assert!(check("").contains("no [[map]]"));
    assert!(check("[[map]]\npath = ").contains("v.toml:2:"));
    // a map of a directory the source does not have: refused at open
    let p = s.spec("[sources]\nroms = \"roms\"\n[[map]]\npath = \"x\"\nfrom = \"roms:nope\"\n");
    let err = ViewLayer::open(&p, 64, None).err().unwrap();
    assert!(err.contains("map 1") && err.contains("nope"), "{err}");
}

#[test]
fn archives_show_as_directories_without_being_opened_to_list_them() {
    let s = Setup::new();
    let games = s.dir.path().join("games");
    let zsrc = s.dir.path().join("zsrc");
    fs::create_dir_all(&games).unwrap();
    fs::create_dir_all(zsrc.join("disk")).unwrap();
    fs::write(zsrc.join("disk/x.dsk"), "X").unwrap();
    fs::write(zsrc.join("readme.txt"), "R").unwrap();
    zip(&games.join("a.zip"), &zsrc, &["disk", "readme.txt"]);
    fs::write(games.join("broken.ZIP"), "not a zip").unwrap();
    fs::write(games.join("plain.dsk"), "P").unwrap();
    let v = s.view(
        r#"
[sources]
games = "games"
[[map]]
path = "g"
from = "games"
include = ["*.dsk"]
archives = "dir"
"#,
    );
    let mut top = Vec::new();
    v.list(&at(&v, "g").unwrap(), &mut top).unwrap();
    let mut shown: Vec<(String, FileKind)> = top
        .iter()
        .map(|n| (n.name.to_str().unwrap().to_owned(), n.kind))
        .collect();
    shown.sort_by(|a, b| a.0.cmp(&b.0));
    // The broken archive lists as a directory too: listing opens nothing.
    assert_eq!(
        shown,
        [
            ("a.zip".to_owned(), FileKind::Directory),
            ("broken.ZIP".to_owned(), FileKind::Directory),
            ("plain.dsk".to_owned(), FileKind::Regular),
        ]
    );
    let a = at(&v, "g/a.zip").unwrap();
    let st = v.stat(&a).unwrap();
    assert!(st.is_dir());
    // Listing key and lookup key agree before and after the archive is read.
    let listed = top.iter().find(|n| n.name.to_bytes() == b"a.zip").unwrap();
    assert_eq!(listed.key, st.key);
    // Members, with the map's filters: readme.txt is not a .dsk.
    assert_eq!(names(&v, "g/a.zip"), ["disk"]);
    assert_eq!(names(&v, "g/a.zip/disk"), ["x.dsk"]);
    assert_eq!(read(&v, "g/a.zip/disk/x.dsk"), "X");
    assert!(at(&v, "g/a.zip/readme.txt").is_none());
    assert_eq!(v.stat(&a).unwrap().key, st.key);
    // The archive rewritten (another size and time): the next look inside
    // sees the new content.
    // Rewritten in place: the same inode, so the same identity.
    fs::write(zsrc.join("disk/y.dsk"), "Y").unwrap();
    zip(&s.dir.path().join("new.zip"), &zsrc, &["disk"]);
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
    let before = ino(&games.join("a.zip"));
    fs::write(
        games.join("a.zip"),
        fs::read(s.dir.path().join("new.zip")).unwrap(),
    )
    .unwrap();
    assert_eq!(ino(&games.join("a.zip")), before);
    assert_eq!(names(&v, "g/a.zip/disk"), ["x.dsk", "y.dsk"]);
    // A file that is no archive: EIO when its content is asked for.
    let broken = at(&v, "g/broken.ZIP").unwrap();
    let mut out = Vec::new();
    assert_eq!(v.list(&broken, &mut out).unwrap_err(), Errno::EIO);
}

/// `flatten` puts an archive's top-level members into its directory;
/// `auto` does that only for an archive holding one file (after the
/// filters) and shows the others as directories.
#[test]
fn flatten_and_auto_put_archive_members_into_the_directory() {
    let s = Setup::new();
    let games = s.dir.path().join("games");
    fs::create_dir_all(&games).unwrap();
    let zip_of = |name: &str, files: &[(&str, &str)]| {
        let src = s.dir.path().join(format!("src-{name}"));
        for (f, c) in files {
            let p = src.join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, c).unwrap();
        }
        let names: Vec<&str> = files.iter().map(|(f, _)| *f).collect();
        zip(&games.join(name), &src, &names);
    };
    zip_of("one.zip", &[("disks/x.dsk", "X"), ("readme.txt", "R")]);
    zip_of("two.zip", &[("a.dsk", "A-zip"), ("b.dsk", "B")]);
    fs::write(games.join("bad.zip"), "not a zip").unwrap();
    fs::write(games.join("a.dsk"), "A-real").unwrap();
    let v = s.view(
        r#"
[sources]
games = "games"
[[map]]
path = "auto"
from = "games"
include = ["*.dsk"]
archives = "auto"
[[map]]
path = "flat"
from = "games"
include = ["*.dsk"]
archives = "flatten"
"#,
    );
    let sorted = |p: &str| {
        let mut n = names(&v, p);
        n.sort();
        n
    };
    // auto: one.zip holds one .dsk (readme.txt is filtered out): x.dsk
    // shows in its place; two.zip holds two: a directory; bad.zip does not
    // open: a directory too (EIO inside).
    assert_eq!(sorted("auto"), ["a.dsk", "bad.zip", "two.zip", "x.dsk"]);
    assert_eq!(read(&v, "auto/x.dsk"), "X");
    assert_eq!(
        read(&v, "auto/a.dsk"),
        "A-real",
        "a real file keeps its name"
    );
    assert!(v.stat(&at(&v, "auto/two.zip").unwrap()).unwrap().is_dir());
    assert_eq!(sorted("auto/two.zip"), ["a.dsk", "b.dsk"]);
    assert!(
        at(&v, "auto/one.zip").is_none(),
        "an absorbed archive is not shown"
    );
    // flatten: every archive's top level in the directory; the real a.dsk
    // wins over two.zip's; bad.zip stays a file (and the filter hides it).
    assert_eq!(sorted("flat"), ["a.dsk", "b.dsk", "disks"]);
    assert_eq!(read(&v, "flat/a.dsk"), "A-real");
    assert_eq!(read(&v, "flat/b.dsk"), "B");
    assert_eq!(names(&v, "flat/disks"), ["x.dsk"]);
    assert_eq!(read(&v, "flat/disks/x.dsk"), "X");
    // Listing keys are lookup keys for flattened members too.
    let mut listed = Vec::new();
    v.list(&at(&v, "flat").unwrap(), &mut listed).unwrap();
    for l in listed {
        let (_, st) = v
            .lookup(&at(&v, "flat").unwrap(), &l.name)
            .unwrap()
            .unwrap();
        assert_eq!(st.key, l.key, "{:?}", l.name);
    }
}

/// A view walked through many directories does not keep what their
/// archives put into them once that expired.
#[test]
fn the_flattened_directories_cache_drops_expired_entries() {
    let s = Setup::new();
    let games = s.dir.path().join("games");
    let n = FLAT_KEPT + 20;
    for i in 0..n {
        fs::create_dir_all(games.join(format!("d{i}"))).unwrap();
    }
    let v = s.view(
        r#"
[sources]
games = "games"
[[map]]
path = ""
from = "games"
archives = "flatten"
"#,
    );
    for i in 0..n {
        names(&v, &format!("d{i}"));
    }
    assert!(v.flat.lock().len() >= FLAT_KEPT);
    std::thread::sleep(FLAT_FOR + std::time::Duration::from_millis(100));
    names(&v, "d0");
    assert!(v.flat.lock().len() < 10, "{}", v.flat.lock().len());
}
