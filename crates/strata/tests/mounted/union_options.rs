//! The union's mergerfs behaviour options on real mounts: moveonenospc,
//! link-cow, nullrw, dropcacheonclose, symlinkify, follow-symlinks,
//! link-exdev, rename-exdev and branch globs; and which mode a SOURCE with
//! such options gets.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// Mounts a union of plain directories `b0`, `b1`, ... (on the disk) made by
/// `prepare`, with `opts`. Returns the mount and the branch paths.
fn union_of_dirs(
    n: usize,
    opts: &[&str],
    prepare: impl FnOnce(&[PathBuf]),
) -> (Mounted, Vec<PathBuf>) {
    let mut paths = Vec::new();
    let m = Mounted::build_source(opts, &[], |dir| {
        paths = (0..n).map(|i| dir.join(format!("b{i}"))).collect();
        for p in &paths {
            fs::create_dir(p).unwrap();
        }
        prepare(&paths);
        paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":")
    });
    (m, paths)
}

fn small_and_large_branches(opts: &[&str]) -> (TmpfsBranches, Mounted, Vec<PathBuf>) {
    let b = TmpfsBranches::new(&[4, 64]);
    let spec = b.spec(&[]);
    let m = Mounted::build_source(opts, &[], |_| spec);
    let paths = vec![b.path(0), b.path(1)];
    (b, m, paths)
}

/// Writes 12 MiB in 1 MiB pieces to `path`, created with mode 0640.
fn write_big(path: &Path) -> std::io::Result<Vec<u8>> {
    let data: Vec<u8> = (0..12u32 << 20).map(|i| (i % 251) as u8).collect();
    let mut f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o640)
        .open(path)?;
    for chunk in data.chunks(1 << 20) {
        f.write_all(chunk)?;
    }
    f.sync_all()?;
    Ok(data)
}

#[test]
fn moveonenospc_moves_a_growing_file_to_a_branch_with_room() {
    // ff puts the file on the 4 MiB branch; 12 MiB cannot fit there.
    let opts = ["category.create=ff,minfreespace=1M,moveonenospc=true"];
    let (_tmpfs, m, b) = small_and_large_branches(&opts);
    let data = write_big(&m.m("big")).unwrap_or_else(|e| panic!("write: {e}\n{}", m.log()));
    assert!(
        !b[0].join("big").exists(),
        "the original is gone from the full branch"
    );
    assert_eq!(
        fs::read(b[1].join("big")).unwrap(),
        data,
        "the copy holds every byte"
    );
    let mode = fs::metadata(b[1].join("big")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640, "metadata moved along");
    assert_eq!(fs::read(m.m("big")).unwrap(), data);
}

/// The contrast that shows the test above measures the option.
#[test]
fn without_moveonenospc_a_full_branch_fails_the_write() {
    let opts = ["category.create=ff,minfreespace=1M"];
    let (_tmpfs, m, _b) = small_and_large_branches(&opts);
    let err = write_big(&m.m("big")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
}

#[test]
fn link_cow_gives_a_hard_link_written_through_the_union_its_own_copy() {
    let (m, b) = union_of_dirs(2, &["link-cow=true"], |b| {
        fs::write(b[0].join("orig"), b"shared").unwrap();
        fs::hard_link(b[0].join("orig"), b[0].join("twin")).unwrap();
    });
    fs::write(m.m("twin"), b"changed").unwrap();
    assert_eq!(fs::read(m.m("twin")).unwrap(), b"changed");
    assert_eq!(
        fs::read(b[0].join("orig")).unwrap(),
        b"shared",
        "the other name keeps its data"
    );
    assert_eq!(fs::read(m.m("orig")).unwrap(), b"shared");
    // Read-only opens leave links alone.
    fs::hard_link(b[0].join("orig"), b[0].join("third")).unwrap();
    assert_eq!(fs::read(m.m("third")).unwrap(), b"shared");
    assert_eq!(
        fs::metadata(b[0].join("orig"))
            .map(|md| std::os::unix::fs::MetadataExt::nlink(&md))
            .unwrap(),
        2
    );
}

#[test]
fn nullrw_turns_reads_and_writes_into_no_ops() {
    let (m, b) = union_of_dirs(2, &["nullrw=true"], |b| {
        fs::write(b[0].join("f"), b"hello").unwrap();
    });
    assert_eq!(fs::read(m.m("f")).unwrap(), b"\0\0\0\0\0");
    let mut f = fs::OpenOptions::new().write(true).open(m.m("f")).unwrap();
    f.write_all(b"XXXXX").unwrap();
    drop(f);
    assert_eq!(fs::read(b[0].join("f")).unwrap(), b"hello");
}

/// Pages of `path` in the page cache, by fincore(1).
fn cached_pages(path: &Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--noheadings", "--bytes", "--output", "PAGES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux)");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("fincore: {out:?}"))
}

#[test]
fn dropcacheonclose_drops_the_branch_file_from_the_page_cache_on_close() {
    let data = vec![7u8; 4 << 20];
    // (The nextest config runs this apart from tests that drop all caches.)
    for (opt, expect_cached) in [
        ("dropcacheonclose=true", false),
        ("dropcacheonclose=false", true),
    ] {
        let (m, b) = union_of_dirs(2, &[opt], |b| {
            fs::write(b[0].join("f"), &data).unwrap();
        });
        rustix::fs::fsync(fs::File::open(b[0].join("f")).unwrap()).unwrap();
        drop_caches();
        assert_eq!(fs::read(m.m("f")).unwrap().len(), data.len());
        // The release reaches the daemon just after close returns.
        let dropped = wait_until(std::time::Duration::from_secs(3), || {
            cached_pages(&b[0].join("f")) == 0
        });
        assert_eq!(!dropped, expect_cached, "{opt}");
    }
}

#[test]
fn symlinkify_shows_old_read_only_files_as_links_to_their_branch() {
    let (m, b) = union_of_dirs(2, &["symlinkify=true,symlinkify-timeout=0"], |b| {
        fs::write(b[1].join("frozen"), b"data").unwrap();
        fs::set_permissions(b[1].join("frozen"), fs::Permissions::from_mode(0o444)).unwrap();
        fs::write(b[1].join("live"), b"data").unwrap();
    });
    // "Older than the timeout" needs the clock to move past ctime.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let md = fs::symlink_metadata(m.m("frozen")).unwrap();
    assert!(md.file_type().is_symlink(), "{md:?}");
    assert_eq!(fs::read_link(m.m("frozen")).unwrap(), b[1].join("frozen"));
    assert_eq!(
        fs::read(m.m("frozen")).unwrap(),
        b"data",
        "readers follow it to the branch"
    );
    assert!(
        fs::symlink_metadata(m.m("live")).unwrap().is_file(),
        "writable files stay files"
    );
}

#[test]
fn follow_symlinks_shows_directory_links_as_directories_inside_their_branch() {
    let (m, b) = union_of_dirs(2, &["follow-symlinks=directory"], |b| {
        fs::create_dir(b[0].join("real")).unwrap();
        fs::write(b[0].join("real/inside"), b"x").unwrap();
        std::os::unix::fs::symlink("real", b[0].join("rel")).unwrap();
        // Absolute targets resolve from the branch's root, never the host's.
        std::os::unix::fs::symlink("/real", b[0].join("abs")).unwrap();
        std::os::unix::fs::symlink("/etc", b[0].join("host")).unwrap();
        std::os::unix::fs::symlink("real/inside", b[0].join("file-link")).unwrap();
    });
    for name in ["rel", "abs"] {
        let md = fs::symlink_metadata(m.m(name)).unwrap();
        assert!(md.is_dir(), "{name}: {md:?}");
        let names: Vec<_> = fs::read_dir(m.m(name))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["inside"], "{name}");
    }
    assert!(
        fs::symlink_metadata(m.m("host"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "a link out of the branch stays a link"
    );
    assert!(
        fs::symlink_metadata(m.m("file-link"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "only directories are followed"
    );
    // Removing the followed name removes the link, not its target.
    fs::remove_dir(m.m("rel")).unwrap();
    assert!(fs::symlink_metadata(b[0].join("rel")).is_err());
    assert!(b[0].join("real/inside").exists());
}

#[test]
fn link_and_rename_exdev_leave_symlinks_where_paths_are_preserved() {
    let prepare = |b: &[PathBuf]| {
        fs::create_dir(b[0].join("a")).unwrap();
        fs::write(b[0].join("a/f"), b"linked").unwrap();
        fs::write(b[0].join("a/g"), b"renamed").unwrap();
        fs::create_dir(b[1].join("b")).unwrap();
    };
    // The default: EXDEV, as mergerfs.
    let (m, _) = union_of_dirs(2, &["category.create=epff"], prepare);
    let err = fs::hard_link(m.m("a/f"), m.m("b/f")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EXDEV));
    drop(m);

    let opts = ["category.create=epff,link-exdev=rel-symlink,rename-exdev=abs-symlink"];
    let (m, b) = union_of_dirs(2, &opts, prepare);
    fs::hard_link(m.m("a/f"), m.m("b/f")).unwrap();
    assert_eq!(
        fs::read_link(b[1].join("b/f")).unwrap(),
        Path::new("../a/f")
    );
    assert_eq!(fs::read(m.m("b/f")).unwrap(), b"linked");

    fs::rename(m.m("a/g"), m.m("b/g")).unwrap();
    let parked = b[0].join(".mergerfs_rename_exdev/a/g");
    assert_eq!(fs::read(&parked).unwrap(), b"renamed");
    assert_eq!(
        fs::read_link(b[1].join("b/g")).unwrap(),
        m.mnt.join(".mergerfs_rename_exdev/a/g")
    );
    assert!(!b[0].join("a/g").exists());
    let shown = wait_until(std::time::Duration::from_secs(3), || {
        fs::symlink_metadata(m.m("b/g")).is_ok_and(|md| md.file_type().is_symlink())
    });
    assert!(shown, "the kernel learns the new name is a symlink");
    assert_eq!(fs::read(m.m("b/g")).unwrap(), b"renamed");
}

#[test]
fn branch_globs_expand_to_every_matching_directory() {
    let mut root = PathBuf::new();
    let m = Mounted::build_source(&[], &[], |dir| {
        root = dir.to_path_buf();
        for (d, f) in [("disk1", "one"), ("disk2", "two"), ("other", "no")] {
            fs::create_dir(dir.join(d)).unwrap();
            fs::write(dir.join(d).join(f), b"").unwrap();
        }
        format!("{}/disk*", dir.display())
    });
    let mut names: Vec<_> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["one", "two"]);
    let out = strata(
        &["ctl", m.mnt.to_str().unwrap(), "get", "branches"],
        &root.join("state"),
    );
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.contains("disk1") && list.contains("disk2") && !list.contains("other"),
        "{list}"
    );
}

fn layers_key(m: &Mounted) -> String {
    String::from_utf8(get_xattr(&m.m(".strata"), "user.strata.layers").unwrap()).unwrap()
}

/// mergerfs applies its options to one branch too: one directory with a
/// union option, or one NC branch, is a union of one branch; a plain one
/// is served directly. Every mode answers the control file's common keys.
#[test]
fn one_directory_with_union_options_is_a_union_of_one_branch() {
    let plain = Mounted::new(&[]);
    assert_eq!(layers_key(&plain), plain.src.display().to_string());
    assert_eq!(
        get_xattr(&plain.m(".strata"), "user.strata.version").unwrap(),
        env!("CARGO_PKG_VERSION").as_bytes()
    );
    // The cache timeouts are every mode's, not a union's.
    let timed = Mounted::new(&["cache.entry=5"]);
    assert_eq!(layers_key(&timed), timed.src.display().to_string());

    let (nullrw, _) = union_of_dirs(1, &["nullrw=true"], |b| {
        fs::write(b[0].join("f"), b"data").unwrap();
    });
    assert!(
        layers_key(&nullrw).starts_with("union "),
        "{}",
        layers_key(&nullrw)
    );
    // nullrw: reads give zeros, as mergerfs does with one branch
    assert_eq!(fs::read(nullrw.m("f")).unwrap(), [0u8; 4]);

    let mut nc_path = PathBuf::new();
    let nc = Mounted::build_source(&[], &[], |dir| {
        nc_path = dir.join("b0");
        fs::create_dir(&nc_path).unwrap();
        format!("{}=NC", nc_path.display())
    });
    assert!(layers_key(&nc).starts_with("union "), "{}", layers_key(&nc));
    // no create on an NC branch
    assert!(fs::write(nc.m("new"), b"x").is_err());
    assert!(!nc_path.join("new").exists());
}
