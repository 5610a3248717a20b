use crate::manifest::{ManifestBuilder, NO_XATTRS, RawEntry};
use crate::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Instant;

fn store() -> (tempfile::TempDir, Store) {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(&d.path().join("store")).unwrap();
    (d, s)
}

fn noprog(_: &Progress) {}

/// Pseudo-random, incompressible bytes (xorshift).
fn random_bytes(n: usize, mut seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A source tree with every kind of entry the format covers.
fn make_tree(root: &Path) -> bool {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir(root.join("empty_dir")).unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    fs::write(root.join("small.txt"), b"hello strata\n").unwrap();
    fs::write(root.join("a/random.bin"), random_bytes(1 << 20, 42)).unwrap();
    fs::write(root.join("a/b/zeros"), vec![b'z'; 3 << 20]).unwrap();
    fs::write(root.join("a/b/c/deep"), b"deep file").unwrap();
    fs::write(root.join("a/b/c/dup_of_small"), b"hello strata\n").unwrap();
    std::os::unix::fs::symlink("../small.txt", root.join("a/link")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("dangling")).unwrap();
    fs::hard_link(root.join("small.txt"), root.join("a/b/hardlink")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("fifo"),
        rustix::fs::FileType::Fifo,
        0o640.into(),
        0,
    )
    .unwrap();
    if rustix::process::geteuid().is_root() {
        let dev = rustix::fs::makedev(1, 3);
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("null"),
            rustix::fs::FileType::CharacterDevice,
            0o666.into(),
            dev,
        )
        .unwrap();
    }
    fs::set_permissions(root.join("a/b/c/deep"), fs::Permissions::from_mode(0o4751)).unwrap();
    fs::set_permissions(root.join("a/b"), fs::Permissions::from_mode(0o1707)).unwrap();
    fs::set_permissions(root.join("small.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    let xattr_ok = rustix::fs::lsetxattr(
        root.join("small.txt"),
        "user.strata.test",
        b"value\0bin",
        rustix::fs::XattrFlags::empty(),
    )
    .is_ok()
        && rustix::fs::lsetxattr(
            root.join("a"),
            "user.dir",
            b"d",
            rustix::fs::XattrFlags::empty(),
        )
        .is_ok();
    // Fixed mtimes with nanoseconds (after all writes into the directories).
    for (p, ns) in [
        ("small.txt", 123_456_789),
        ("a/b/c", 1),
        ("a/b/zeros", 999_999_999),
    ] {
        let ts = rustix::fs::Timespec {
            tv_sec: 1_600_000_000,
            tv_nsec: ns,
        };
        let t = rustix::fs::Timestamps {
            last_access: ts,
            last_modification: ts,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            root.join(p),
            &t,
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
    }
    xattr_ok
}

fn host_xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap_or(0);
    let mut out: Vec<_> = names[..n]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| {
            let mut v = vec![0u8; 4096];
            let l = rustix::fs::lgetxattr(
                p,
                std::ffi::OsStr::new(std::str::from_utf8(n).unwrap()),
                &mut v[..],
            )
            .unwrap();
            v.truncate(l);
            (n.to_vec(), v)
        })
        .collect();
    out.sort();
    out
}

/// Compares an image entry (recursively) with the host tree.
fn compare(store: &Store, img: &Image, e: &Entry, host: &Path, count: &mut u32) {
    *count += 1;
    let md = fs::symlink_metadata(host).unwrap();
    assert_eq!(e.mode, md.mode(), "{host:?} mode");
    assert_eq!((e.uid, e.gid), (md.uid(), md.gid()), "{host:?} owner");
    assert_eq!(
        (e.mtime_sec, e.mtime_nsec as i64),
        (md.mtime(), md.mtime_nsec()),
        "{host:?} mtime"
    );
    let xs: Vec<(Vec<u8>, Vec<u8>)> = img
        .xattrs(e)
        .unwrap()
        .into_iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(xs, host_xattrs(host), "{host:?} xattrs");
    match e.kind {
        Kind::Dir => {
            let mut names: Vec<Vec<u8>> = fs::read_dir(host)
                .unwrap()
                .map(|d| d.unwrap().file_name().into_encoded_bytes())
                .collect();
            names.sort();
            let kids: Vec<Entry> = img.children(e).map(|c| c.unwrap()).collect();
            let knames: Vec<Vec<u8>> = kids.iter().map(|k| img.entry_name(k).to_vec()).collect();
            assert_eq!(knames, names, "{host:?} children");
            assert_eq!(e.nlink as u64, md.nlink(), "{host:?} dir nlink");
            for k in kids {
                let name = std::str::from_utf8(img.entry_name(&k)).unwrap().to_owned();
                assert_eq!(img.lookup(e, name.as_bytes()).unwrap(), Some(k));
                assert_eq!(k.parent, e.index);
                compare(store, img, &k, &host.join(&name), count);
            }
            assert_eq!(img.lookup(e, b"no-such-name").unwrap(), None);
        }
        Kind::File => {
            assert_eq!(e.size, md.len());
            let data = store.read_blob(&img.blob(e).unwrap()).unwrap();
            assert_eq!(data, fs::read(host).unwrap(), "{host:?} content");
            assert_eq!(e.nlink as u64, md.nlink(), "{host:?} nlink");
        }
        Kind::Symlink => {
            assert_eq!(
                img.symlink_target(e).unwrap(),
                fs::read_link(host).unwrap().as_os_str().as_encoded_bytes()
            );
            assert_eq!(img.blob(e), None);
        }
        Kind::CharDevice | Kind::BlockDevice => assert_eq!(e.rdev(), md.rdev()),
        Kind::Fifo | Kind::Socket => {}
    }
}

#[test]
fn build_and_read_back_everything() {
    let (d, s) = store();
    let src = d.path().join("src");
    let xattr_ok = make_tree(&src);
    let mut calls = 0;
    let stats = build(
        &s,
        &src,
        "img",
        BuildOptions::default(),
        &mut |p: &Progress| {
            calls += 1;
            assert!(p.files_done <= p.files_total);
        },
    )
    .unwrap();
    assert_eq!(stats.files, 7); // empty small random zeros deep dup hardlink
    assert_eq!(stats.hardlinks, 1);
    assert_eq!(stats.symlinks, 2);
    assert_eq!(stats.dirs, 5);
    assert_eq!(calls, 6); // one per distinct inode
    assert_eq!(stats.dedup_hits, 1); // dup_of_small
    let img = Image::open(&s, "img").unwrap();
    let mut n = 0;
    compare(&s, &img, &img.root().unwrap(), &src, &mut n);
    assert_eq!(n, img.len());
    // Hard links share the inode index and the blob.
    let a = img.lookup_path("small.txt").unwrap().unwrap();
    let b = img.lookup_path("a/b/hardlink").unwrap().unwrap();
    assert_eq!(a.inode, b.inode);
    assert_eq!(img.blob(&a), img.blob(&b));
    assert_eq!(a.nlink, 2);
    // Symlink not followed.
    assert_eq!(
        img.lookup_path("a/link").unwrap().unwrap().kind,
        Kind::Symlink
    );
    assert_eq!(img.lookup_path("fifo").unwrap().unwrap().kind, Kind::Fifo);
    if xattr_ok {
        assert_eq!(
            img.xattrs(&a).unwrap(),
            vec![(&b"user.strata.test"[..], &b"value\0bin"[..])]
        );
    }
    // Compression: the zeros compress, the random data is stored raw.
    let zeros = img
        .blob(&img.lookup_path("a/b/zeros").unwrap().unwrap())
        .unwrap();
    assert!(fs::metadata(s.blob_path(&zeros)).unwrap().len() < 10_000);
    let rnd = img
        .blob(&img.lookup_path("a/random.bin").unwrap().unwrap())
        .unwrap();
    assert_eq!(
        fs::metadata(s.blob_path(&rnd)).unwrap().len(),
        (1 << 20) + 16
    );
    assert!(stats.stored_bytes < stats.bytes);
    // list
    let list = list_images(&s).unwrap();
    assert_eq!(list.len(), 1);
    let info = list[0].1.as_ref().unwrap();
    assert_eq!(
        (info.entries, info.total_size),
        (img.len() as u64, stats.bytes)
    );
    assert!(verify_image(&s, "img").unwrap().is_empty());
}

#[test]
fn large_file_streams_and_dedups_across_images() {
    let (d, s) = store();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    // Larger than the in-memory threshold: both streaming paths (zstd, raw).
    fs::write(src.join("big_random"), random_bytes(3 << 20, 7)).unwrap();
    let mut compressible = random_bytes(1 << 20, 9);
    compressible.extend(vec![0u8; 4 << 20]);
    fs::write(src.join("big_zeros"), &compressible).unwrap();
    fs::write(src.join("x"), b"x").unwrap();
    let s1 = build(&s, &src, "one", BuildOptions::default(), &mut noprog).unwrap();
    assert_eq!(s1.dedup_hits, 0);
    assert!(s1.stored_bytes > 0);
    let blobs_before = count_blobs(&s);
    let s2 = build(&s, &src, "two", BuildOptions::default(), &mut noprog).unwrap();
    assert_eq!(s2.stored_bytes, 0, "second build writes no blob");
    assert_eq!(s2.dedup_hits, 3);
    assert_eq!(count_blobs(&s), blobs_before);
    let img = Image::open(&s, "two").unwrap();
    for name in ["big_random", "big_zeros", "x"] {
        let e = img.lookup_path(name).unwrap().unwrap();
        assert_eq!(
            s.read_blob(&img.blob(&e).unwrap()).unwrap(),
            fs::read(src.join(name)).unwrap()
        );
    }
    let zr = img
        .blob(&img.lookup_path("big_random").unwrap().unwrap())
        .unwrap();
    assert_eq!(
        fs::metadata(s.blob_path(&zr)).unwrap().len(),
        (3 << 20) + 16
    );
    // Existing name refused, replace allowed.
    assert!(matches!(
        build(&s, &src, "one", BuildOptions::default(), &mut noprog),
        Err(Error::ImageExists(_))
    ));
    build(&s, &src, "one", BuildOptions { replace: true }, &mut noprog).unwrap();
    for bad in ["", ".hidden", "a/b"] {
        assert!(matches!(
            build(&s, &src, bad, BuildOptions::default(), &mut noprog),
            Err(Error::InvalidName(_))
        ));
    }
}

fn count_blobs(s: &Store) -> usize {
    fs::read_dir(s.root().join("blobs"))
        .unwrap()
        .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum()
}

#[test]
fn corrupt_and_missing_blobs_are_named() {
    let (d, s) = store();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("good"), b"good content").unwrap();
    fs::write(src.join("bad"), vec![b'q'; 100_000]).unwrap();
    fs::write(src.join("raw"), random_bytes(5000, 1)).unwrap();
    build(&s, &src, "img", BuildOptions::default(), &mut noprog).unwrap();
    let img = Image::open(&s, "img").unwrap();
    let dg = |n: &str| img.blob(&img.lookup_path(n).unwrap().unwrap()).unwrap();
    let flip = |digest: &Digest, at: u64| {
        let p = s.blob_path(digest);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let mut data = fs::read(&p).unwrap();
        let i = (at as usize).min(data.len() - 1);
        data[i] ^= 0x55;
        fs::write(&p, data).unwrap();
    };
    flip(&dg("bad"), 30);
    flip(&dg("raw"), 100);
    for name in ["bad", "raw"] {
        let digest = dg(name);
        let err = s.read_blob(&digest).unwrap_err();
        assert!(err.to_string().contains(&digest.to_hex()), "{err}");
        assert!(s.verify(&digest).is_err());
    }
    s.verify(&dg("good")).unwrap();
    let failures = verify_image(&s, "img").unwrap();
    let mut names: Vec<Digest> = failures.iter().map(|f| f.0).collect();
    names.sort();
    let mut want = vec![dg("bad"), dg("raw")];
    want.sort();
    assert_eq!(names, want);
    // Missing blob.
    fs::remove_file(s.blob_path(&dg("good"))).unwrap();
    let err = s.open_blob(&dg("good")).err().unwrap();
    assert!(matches!(err, Error::MissingBlob(_)));
    assert!(err.to_string().contains(&dg("good").to_hex()));
    // Truncated blob.
    let p = s.blob_path(&dg("raw"));
    fs::write(&p, &fs::read(&p).unwrap()[..100]).unwrap();
    assert!(
        s.verify(&dg("raw"))
            .unwrap_err()
            .to_string()
            .contains(&dg("raw").to_hex())
    );
}

#[test]
fn bad_manifests_give_clean_errors() {
    let (d, s) = store();
    let src = d.path().join("src");
    make_tree(&src);
    build(&s, &src, "img", BuildOptions::default(), &mut noprog).unwrap();
    let good = fs::read(s.root().join("images/img")).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        (
            "garbage",
            b"this is not a manifest at all, not even close".repeat(10),
        ),
        ("truncated", good[..good.len() - 7].to_vec()),
        ("header only", good[..160].to_vec()),
        ("bad version", {
            let mut v = good.clone();
            v[8] = 9;
            v
        }),
        ("entry count beyond the file, sealed", {
            let mut v = good.clone();
            v[24..32].copy_from_slice(&(u32::MAX as u64).to_le_bytes());
            seal_manifest(&mut v);
            v
        }),
        ("string region beyond the file, sealed", {
            let mut v = good.clone();
            v[64..72].copy_from_slice(&(1u64 << 40).to_le_bytes());
            seal_manifest(&mut v);
            v
        }),
        ("region offsets that overflow, sealed", {
            let mut v = good.clone();
            v[72..80].copy_from_slice(&u64::MAX.to_le_bytes());
            v[80..88].copy_from_slice(&16u64.to_le_bytes());
            seal_manifest(&mut v);
            v
        }),
        ("flipped body byte", {
            let mut v = good.clone();
            let n = v.len();
            v[n / 2] ^= 1;
            v
        }),
    ];
    for (what, bytes) in cases {
        fs::write(s.root().join("images/x"), &bytes).unwrap();
        let err = Image::open(&s, "x").unwrap_err();
        assert!(matches!(err, Error::BadManifest { .. }), "{what}: {err}");
        assert!(!err.to_string().contains('\n'));
        eprintln!("{what}: {err}");
    }
    // gc refuses to run with an unreadable manifest rather than deleting blobs.
    assert!(gc(&s).is_err());
    fs::write(s.root().join("images/x"), b"garbage").unwrap();
    let listed = list_images(&s).unwrap();
    assert!(listed.iter().any(|(n, r)| n == "x" && r.is_err()));
    assert!(matches!(
        Image::open(&s, "nope"),
        Err(Error::NoSuchImage(_))
    ));
}

/// Garbage records with a valid checksum: opening refuses them or every
/// accessor returns in-bounds data; never a panic, and an image that opens
/// only ever yields names that are one path component.
#[test]
fn fuzzed_entries_never_panic() {
    let mut opened = 0;
    for round in 0..300u64 {
        let mut m = synthetic(50, 3);
        let junk = random_bytes(64, round * 7919 + 1);
        let victim = 1 + (round as usize % 49);
        let mut e = m.entries[victim];
        let field = round as usize % 8;
        let v = u32::from_le_bytes(junk[..4].try_into().unwrap());
        match field {
            0 => e.name_off = v % 256,
            1 => e.name_len = v % 16,
            2 => e.parent = v,
            3 => e.mode = v,
            4 => e.a = v,
            5 => e.b = v,
            6 => e.xattrs = v % 64,
            _ => e.inode = v,
        }
        m.entries[victim] = e;
        let (d, s) = store();
        crate::build::write_manifest(&s, "f", &m.finish(0), false).unwrap();
        if let Ok(img) = Image::open(&s, "f") {
            opened += 1;
            walk_all(&img);
        }
        drop(d);
    }
    // Mutations that keep the tree valid (e.g. another mode bit) still open.
    assert!(opened > 0);
}

type Tamper = Box<dyn Fn(&mut Tiny)>;

/// The tree `root { d/ { a, b, s -> TARGET }, z }` with names and links
/// open to tampering, for the malicious-manifest corpus.
struct Tiny {
    names: [Vec<u8>; 5], // d, z, a, b, s
    target: Vec<u8>,
    b_links_to: Option<u32>,
    z_parent: u32,
    root_name: Vec<u8>,
    xattr_name: Vec<u8>,
}

impl Tiny {
    fn new() -> Tiny {
        Tiny {
            names: [b"d", b"z", b"a", b"b", b"s"].map(|n| n.to_vec()),
            target: b"a".to_vec(),
            b_links_to: None,
            z_parent: 0,
            root_name: Vec::new(),
            xattr_name: b"user.k".to_vec(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut m = ManifestBuilder::default();
        let blob = m.digest(Digest::of(b"content")).unwrap();
        let xa = m
            .xattrs(&[(self.xattr_name.clone(), b"v".to_vec())])
            .unwrap();
        let (roff, rlen) = m.string(&self.root_name).unwrap();
        let dir = |a, b, off, len, parent, inode| RawEntry {
            name_off: off,
            name_len: len,
            parent,
            mode: 0o040755,
            nlink: 2,
            inode,
            a,
            b,
            xattrs: NO_XATTRS,
            ..Default::default()
        };
        let file = |off, len, parent, inode, xattrs| RawEntry {
            name_off: off,
            name_len: len,
            parent,
            mode: 0o100644,
            size: 7,
            nlink: 1,
            inode,
            a: blob,
            xattrs,
            ..Default::default()
        };
        let n: Vec<(u32, u32)> = self.names.iter().map(|n| m.string(n).unwrap()).collect();
        let (toff, tlen) = m.string(&self.target).unwrap();
        m.entries.push(dir(1, 2, roff, rlen, 0, 0));
        m.entries.push(dir(3, 3, n[0].0, n[0].1, 0, 1));
        m.entries
            .push(file(n[1].0, n[1].1, self.z_parent, 2, NO_XATTRS));
        m.entries.push(file(n[2].0, n[2].1, 1, 3, xa));
        let mut b = file(n[3].0, n[3].1, 1, 4, NO_XATTRS);
        if let Some(first) = self.b_links_to {
            b.inode = first;
            b.nlink = 2;
            if m.entries[first as usize].mode == b.mode {
                (b.a, b.b) = (m.entries[first as usize].a, m.entries[first as usize].b);
            }
        }
        m.entries.push(b);
        m.entries.push(RawEntry {
            name_off: n[4].0,
            name_len: n[4].1,
            parent: 1,
            mode: 0o120777,
            size: self.target.len() as u64,
            nlink: 1,
            inode: 5,
            a: toff,
            b: tlen,
            xattrs: NO_XATTRS,
            ..Default::default()
        });
        m.finish(0)
    }
}

/// Hostile manifests with valid checksums: names that are not one path
/// component (in the root, in directories, as directories, on hard links),
/// bad symlink targets, duplicate names, entries claimed by another
/// directory, links to directories. Each is refused at open with one line
/// naming the entry and the reason, so no mount ever sees them.
#[test]
fn malicious_manifests_are_refused_naming_the_entry() {
    let long = vec![b'a'; 256];
    let cases: Vec<(&str, Tamper, &str)> = vec![
        (
            "dot-dot file in the root",
            Box::new(|t| t.names[1] = b"..".to_vec()),
            "entry 2: name \"..\" is a dot entry",
        ),
        (
            "dot as a directory",
            Box::new(|t| t.names[0] = b".".to_vec()),
            "entry 1: name \".\" is a dot entry",
        ),
        (
            "traversal in a directory",
            Box::new(|t| t.names[2] = b"../../../../x".to_vec()),
            "entry 3: name \"../../../../x\" contains '/'",
        ),
        (
            "absolute name",
            Box::new(|t| t.names[2] = b"/tmp/x".to_vec()),
            "contains '/'",
        ),
        (
            "traversal as a directory",
            Box::new(|t| t.names[0] = b"../../up".to_vec()),
            "entry 1: name \"../../up\" contains '/'",
        ),
        (
            "empty name",
            Box::new(|t| t.names[3] = Vec::new()),
            "entry 4: name \"\" is empty",
        ),
        (
            "NUL in a name",
            Box::new(|t| t.names[4] = b"s\0x".to_vec()),
            "entry 5: name \"s\\0x\" contains NUL",
        ),
        (
            "name over 255 bytes",
            Box::new(move |t| t.names[1] = long.clone()),
            "longer than 255",
        ),
        (
            "hard link named ../../ESC",
            Box::new(|t| {
                t.names[3] = b"../../ESC".to_vec();
                t.b_links_to = Some(3);
            }),
            "entry 4: name \"../../ESC\" contains '/'",
        ),
        (
            "hard link to a directory",
            Box::new(|t| t.b_links_to = Some(1)),
            "entry 4 \"d/b\": hard link to entry 1",
        ),
        (
            "empty symlink target",
            Box::new(|t| t.target = Vec::new()),
            "entry 5 \"d/s\": symlink target is empty",
        ),
        (
            "NUL in a symlink target",
            Box::new(|t| t.target = b"a\0/etc".to_vec()),
            "symlink target contains NUL",
        ),
        (
            "duplicate names",
            Box::new(|t| t.names[2] = b"b".to_vec()),
            "entry 4 \"d/b\": names not strictly sorted",
        ),
        (
            "unsorted names",
            Box::new(|t| t.names[2] = b"c".to_vec()),
            "names not strictly sorted",
        ),
        (
            "entry claimed by another directory",
            Box::new(|t| t.z_parent = 1),
            "entry 2 listed under directory 0 but its parent is 1",
        ),
        (
            "named root",
            Box::new(|t| t.root_name = b"x".to_vec()),
            "entry 0: the root has a name",
        ),
        (
            "empty xattr name",
            Box::new(|t| t.xattr_name = Vec::new()),
            "bad xattr name",
        ),
    ];
    let (_d, s) = store();
    crate::build::write_manifest(&s, "ok", &Tiny::new().bytes(), false).unwrap();
    walk_all(&Image::open(&s, "ok").expect("the untampered tree opens"));
    for (what, tamper, want) in cases {
        let mut t = Tiny::new();
        tamper(&mut t);
        let name = format!("bad{}", what.len());
        crate::build::write_manifest(&s, &name, &t.bytes(), true).unwrap();
        let err = Image::open(&s, &name).expect_err(what);
        let msg = err.to_string();
        assert!(matches!(err, Error::BadManifest { .. }), "{what}: {msg}");
        assert!(msg.contains(want), "{what}: {msg:?} lacks {want:?}");
        assert!(!msg.contains('\n'), "{what}: {msg}");
        // gc refuses to run over a manifest it cannot read, rather than freeing its blobs.
        assert!(gc(&s).is_err(), "{what}");
        remove_image(&s, &name).unwrap();
    }
}

/// Names that look odd but are single components, and symlink targets that
/// point anywhere (the daemon stores them, never follows them), are kept.
#[test]
fn odd_but_valid_names_and_targets_open() {
    let (_d, s) = store();
    let cases: Vec<Tamper> = vec![
        Box::new(|t| t.names[2] = b"...".to_vec()),
        Box::new(|t| t.names[1] = b"z\n\\x".to_vec()),
        Box::new(|t| t.names[1] = vec![b'z'; 255]),
        Box::new(|t| t.names[1] = vec![b'z', 0xff, 0xfe]),
        Box::new(|t| t.target = b"../../../../etc/passwd".to_vec()),
        Box::new(|t| t.target = b"/etc/shadow".to_vec()),
        Box::new(|t| t.b_links_to = Some(3)),
    ];
    for (i, tamper) in cases.iter().enumerate() {
        let mut t = Tiny::new();
        tamper(&mut t);
        let name = format!("odd{i}");
        crate::build::write_manifest(&s, &name, &t.bytes(), false).unwrap();
        let img = Image::open(&s, &name).unwrap_or_else(|e| panic!("case {i}: {e}"));
        walk_all(&img);
    }
}

fn walk_all(img: &Image) {
    for i in 0..img.len() + 2 {
        if let Ok(e) = img.entry(i) {
            let name = img.entry_name(&e);
            if i > 0 {
                assert_eq!(entry_name_problem(name), None, "entry {i}: {name:?}");
            }
            let _ = img.symlink_target(&e);
            let _ = img.blob(&e);
            let _ = img.xattrs(&e);
            for c in img.children(&e) {
                let _ = c;
            }
            let _ = img.lookup(&e, b"f1");
        }
    }
}

/// A flat synthetic manifest: root with `dirs` directories holding the rest
/// of `n` entries as files.
fn synthetic(n: u32, dirs: u32) -> ManifestBuilder {
    let mut m = ManifestBuilder::default();
    let d0 = m.digest(Digest::of(b"content")).unwrap();
    let xa = m.xattrs(&[(b"user.k".to_vec(), b"v".to_vec())]).unwrap();
    m.entries.push(RawEntry {
        mode: 0o040755,
        nlink: 2 + dirs,
        a: 1,
        b: dirs,
        xattrs: NO_XATTRS,
        ..Default::default()
    });
    let files = n - 1 - dirs;
    let per = files.div_ceil(dirs);
    let mut next = 1 + dirs;
    for d in 0..dirs {
        let (off, len) = m.string(format!("d{d:04}").as_bytes()).unwrap();
        let cnt = per.min(1 + dirs + files - next);
        m.entries.push(RawEntry {
            name_off: off,
            name_len: len,
            mode: 0o040755,
            nlink: 2,
            inode: 1 + d,
            a: next,
            b: cnt,
            xattrs: NO_XATTRS,
            ..Default::default()
        });
        next += cnt;
    }
    let mut idx = 1 + dirs;
    for d in 0..dirs {
        let cnt = m.entries[1 + d as usize].b;
        for f in 0..cnt {
            let (off, len) = m.string(format!("f{f:07}").as_bytes()).unwrap();
            m.entries.push(RawEntry {
                name_off: off,
                name_len: len,
                parent: 1 + d,
                mode: 0o100644,
                size: 7,
                nlink: 1,
                inode: idx,
                a: d0,
                xattrs: if f == 0 { xa } else { NO_XATTRS },
                ..Default::default()
            });
            idx += 1;
        }
    }
    assert_eq!(m.entries.len() as u32, n);
    m
}

/// Open checks every entry once: an entry corrupted behind a valid
/// checksum is reported at open, naming it, so a mount never starts on it.
#[test]
fn open_refuses_a_corrupt_entry_naming_it() {
    let (_d, s) = store();
    let mut m = synthetic(12_000, 12);
    crate::build::write_manifest(&s, "fine", &m.finish(0), false).unwrap();
    let img = Image::open(&s, "fine").unwrap();
    assert_eq!(img.len(), 12_000);
    assert_eq!(img.lookup_path("d0003/f0000042").unwrap().unwrap().size, 7);
    m.entries[9000].name_off = u32::MAX - 3;
    crate::build::write_manifest(&s, "corrupt", &m.finish(0), false).unwrap();
    let err = Image::open(&s, "corrupt").unwrap_err();
    assert!(
        err.to_string().contains("entry 9000: name out of bounds"),
        "{err}"
    );
}

/// Prints open times (not asserted): `cargo test -p strata-image --release -- --ignored --nocapture open_time`
#[test]
#[ignore]
fn open_time() {
    let (_d, s) = store();
    for (n, dirs) in [(12_000u32, 200u32), (1_000_000, 2_000)] {
        let bytes = synthetic(n, dirs).finish(0);
        let name = format!("s{n}");
        crate::build::write_manifest(&s, &name, &bytes, false).unwrap();
        drop(Image::open(&s, &name).unwrap()); // warm the page cache
        let t = Instant::now();
        let img = Image::open(&s, &name).unwrap();
        let e = img.lookup_path("d0001/f0000003").unwrap().unwrap();
        let el = t.elapsed();
        assert_eq!(e.size, 7);
        eprintln!("open+lookup {n} entries ({} bytes): {el:?}", bytes.len());
    }
}

#[test]
fn gc_keeps_referenced_and_pinned_blobs() {
    let (d, s) = store();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("shared"), b"shared by both").unwrap();
    fs::write(src.join("only_a"), b"only in a").unwrap();
    build(&s, &src, "a", BuildOptions::default(), &mut noprog).unwrap();
    fs::remove_file(src.join("only_a")).unwrap();
    fs::write(src.join("only_b"), b"only in b").unwrap();
    build(&s, &src, "b", BuildOptions::default(), &mut noprog).unwrap();
    let orphan = s.put_bytes(b"referenced by nobody").unwrap().digest;
    std::thread::sleep(std::time::Duration::from_millis(20));

    let st = gc(&s).unwrap();
    assert_eq!((st.blobs_removed, st.blobs_kept), (1, 3));
    assert!(!s.has_blob(&orphan));

    let shared = Digest::of(b"shared by both");
    let only_a = Digest::of(b"only in a");
    let only_b = Digest::of(b"only in b");

    // Pin "a" as a mount would, remove it: deferred, blobs kept.
    let pinned = Image::open(&s, "a").unwrap();
    assert_eq!(remove_image(&s, "a").unwrap(), RemoveOutcome::Deferred);
    assert!(list_images(&s).unwrap().iter().all(|(n, _)| n != "a"));
    assert!(matches!(Image::open(&s, "a"), Err(Error::NoSuchImage(_))));
    let st = gc(&s).unwrap();
    assert_eq!((st.blobs_removed, st.manifests_pinned), (0, 1));
    assert!(s.has_blob(&only_a));
    // The pinned image still reads.
    let e = pinned.lookup_path("only_a").unwrap().unwrap();
    assert_eq!(
        s.read_blob(&pinned.blob(&e).unwrap()).unwrap(),
        b"only in a"
    );
    drop(pinned);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let st = gc(&s).unwrap();
    assert_eq!(
        (st.blobs_removed, st.manifests_removed, st.manifests_pinned),
        (1, 1, 0)
    );
    assert!(!s.has_blob(&only_a) && s.has_blob(&shared) && s.has_blob(&only_b));

    // Unpinned removal is immediate.
    assert_eq!(remove_image(&s, "b").unwrap(), RemoveOutcome::Removed);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(gc(&s).unwrap().blobs_removed, 2);
    assert_eq!(count_blobs(&s), 0);
    assert!(matches!(remove_image(&s, "b"), Err(Error::NoSuchImage(_))));
}

#[test]
fn fresh_blobs_survive_gc() {
    let (_d, s) = store();
    // A blob whose mtime is not older than the gc start (as written by a
    // concurrent build whose manifest does not exist yet) is kept.
    let p = s.put_bytes(b"in flight").unwrap().digest;
    let future = rustix::fs::Timespec {
        tv_sec: i64::MAX / 4,
        tv_nsec: 0,
    };
    let t = rustix::fs::Timestamps {
        last_access: future,
        last_modification: future,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        s.blob_path(&p),
        &t,
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();
    assert_eq!(gc(&s).unwrap().blobs_removed, 0);
    assert!(s.has_blob(&p));
}

#[test]
fn digest_hex_roundtrip_and_default_root() {
    let d = Digest::of(b"abc");
    assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
    assert_eq!(Digest::from_hex("zz"), None);
    assert!(Store::default_root().is_absolute() || std::env::var_os("STRATA_STORE").is_some());
}

/// Builds an image of `$STRATA_IMAGE_SRC` and prints the stats (not asserted):
/// `STRATA_IMAGE_SRC=/usr/lib/python3 cargo test -p strata-image --release -- --ignored --nocapture real_tree`
#[test]
#[ignore]
fn real_tree() {
    let Some(src) = std::env::var_os("STRATA_IMAGE_SRC") else {
        return;
    };
    let (_d, s) = store();
    let st = build(
        &s,
        Path::new(&src),
        "real",
        BuildOptions::default(),
        &mut noprog,
    )
    .unwrap();
    eprintln!("first build: {st:?}");
    let st = build(
        &s,
        Path::new(&src),
        "again",
        BuildOptions::default(),
        &mut noprog,
    )
    .unwrap();
    eprintln!("second build: {st:?}");
    let t = Instant::now();
    let img = Image::open(&s, "real").unwrap();
    eprintln!("open {} entries: {:?}", img.len(), t.elapsed());
    let t = Instant::now();
    assert!(verify_image(&s, "real").unwrap().is_empty());
    eprintln!("verify: {:?}", t.elapsed());
}

/// Staging files (`.`-names) left in this boot's cache shards.
fn cache_staging(s: &Store) -> Vec<std::path::PathBuf> {
    let dir = s.boot_cache_dir();
    let Ok(shards) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    shards
        .flat_map(|sh| fs::read_dir(sh.unwrap().path()).unwrap())
        .map(|d| d.unwrap().path())
        .filter(|p| p.file_name().unwrap().as_encoded_bytes().starts_with(b"."))
        .collect()
}

#[test]
fn materialize_gives_content_once() {
    let (d, s) = store();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    let mut big = random_bytes(1 << 20, 3);
    big.extend(vec![7u8; 2 << 20]); // streamed, zstd
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("small", b"small content".to_vec()),
        ("raw", random_bytes(200_000, 5)),
        ("zeros", vec![0u8; 500_000]),
        ("big", big),
    ];
    for (n, c) in &files {
        fs::write(src.join(n), c).unwrap();
    }
    build(&s, &src, "img", BuildOptions::default(), &mut noprog).unwrap();
    let img = Image::open(&s, "img").unwrap();
    for (n, want) in &files {
        let e = img.lookup_path(n).unwrap().unwrap();
        // Empty files have a blob too (the digest of no bytes).
        let digest = img.blob(&e).unwrap();
        assert_eq!(digest, Digest::of(want), "{n}");
        assert!(!s.cache_path(&digest).exists());
        let mut f = s.materialize(&digest).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut got).unwrap();
        assert!(got == *want, "{n}: content");
        // Read-only descriptor, mode 0444, under this boot's cache dir.
        assert!(
            std::io::Write::write(&mut f, b"x").is_err(),
            "{n}: writable"
        );
        let md = f.metadata().unwrap();
        assert_eq!(md.mode() & 0o7777, 0o444, "{n}: mode");
        let cached = fs::metadata(s.cache_path(&digest)).unwrap();
        assert_eq!((cached.ino(), cached.len()), (md.ino(), want.len() as u64));
        let hex = digest.to_hex();
        let boot = fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|b| b.trim().replace('-', ""))
            .unwrap_or_else(|_| "noboot".into());
        assert_eq!(
            s.cache_path(&digest),
            s.root().join("cache").join(boot).join(&hex[..2]).join(&hex)
        );
        // A second call opens the cached file: no rewrite, same inode.
        let again = s.materialize(&digest).unwrap();
        assert_eq!(again.metadata().unwrap().ino(), md.ino(), "{n}: rewritten");
    }
    assert!(cache_staging(&s).is_empty());
}

#[test]
fn materialize_refuses_corrupt_and_missing_blobs() {
    let (_d, s) = store();
    let good = vec![b'g'; 100_000];
    let bad = s.put_bytes(&vec![b'b'; 100_000]).unwrap().digest;
    let raw = s.put_bytes(&random_bytes(5000, 11)).unwrap().digest;
    let short = s.put_bytes(&random_bytes(5000, 12)).unwrap().digest;
    let g = s.put_bytes(&good).unwrap().digest;
    let rewrite = |digest: &Digest, f: &dyn Fn(&mut Vec<u8>)| {
        let p = s.blob_path(digest);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let mut data = fs::read(&p).unwrap();
        f(&mut data);
        fs::write(&p, data).unwrap();
    };
    rewrite(&bad, &|d| {
        let n = d.len();
        d[16 + (n - 16) / 2] ^= 0x55 // inside the zstd frame
    });
    rewrite(&raw, &|d| d[2000] ^= 1); // raw content
    rewrite(&short, &|d| d.truncate(3000)); // shorter than its header says
    for digest in [bad, raw, short] {
        let err = s.materialize(&digest).unwrap_err();
        match &err {
            Error::CorruptBlob { digest: d, .. } => assert_eq!(*d, digest),
            other => panic!("expected CorruptBlob, got {other}"),
        }
        // The digest is named once, not twice.
        assert_eq!(
            err.to_string().matches(&digest.to_hex()).count(),
            1,
            "{err}"
        );
        assert!(!s.cache_path(&digest).exists(), "{err}");
    }
    assert!(cache_staging(&s).is_empty());
    let missing = Digest::of(b"never stored");
    assert!(matches!(
        s.materialize(&missing),
        Err(Error::MissingBlob(d)) if d == missing
    ));
    assert!(!s.cache_path(&missing).exists());
    // The intact blob still materializes; repairing is not our business.
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut s.materialize(&g).unwrap(), &mut got).unwrap();
    assert!(got == good);
}

#[test]
fn materialize_concurrently() {
    let (_d, s) = store();
    let mut data = random_bytes(1 << 20, 21);
    data.extend(vec![1u8; 3 << 20]);
    let digest = s.put_bytes(&data).unwrap().digest;
    let inodes: Vec<u64> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..8)
            .map(|_| {
                sc.spawn(|| {
                    let mut f = s.materialize(&digest).unwrap();
                    let mut got = Vec::new();
                    std::io::Read::read_to_end(&mut f, &mut got).unwrap();
                    assert!(got == data);
                    f.metadata().unwrap().ino()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(cache_staging(&s).is_empty());
    let shard = s.cache_path(&digest).parent().unwrap().to_owned();
    assert_eq!(fs::read_dir(&shard).unwrap().count(), 1);
    let cached = fs::metadata(s.cache_path(&digest)).unwrap().ino();
    // With RENAME_NOREPLACE (ext4, tmpfs, xfs, btrfs) everyone shares the
    // first writer's file; losers open it.
    if inodes.iter().any(|&i| i != cached) {
        eprintln!(
            "note: concurrent writers got different inodes {inodes:?} (no RENAME_NOREPLACE?)"
        );
    }
}

#[test]
fn gc_cleans_the_cache() {
    let (d, s) = store();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("shared"), b"shared by both").unwrap();
    fs::write(src.join("only_a"), b"only in a").unwrap();
    build(&s, &src, "a", BuildOptions::default(), &mut noprog).unwrap();
    fs::remove_file(src.join("only_a")).unwrap();
    fs::write(src.join("only_b"), b"only in b").unwrap();
    build(&s, &src, "b", BuildOptions::default(), &mut noprog).unwrap();
    let shared = Digest::of(b"shared by both");
    let only_a = Digest::of(b"only in a");
    let only_b = Digest::of(b"only in b");
    for dg in [shared, only_a, only_b] {
        s.materialize(&dg).unwrap();
    }
    // Another boot's cache (possibly torn files) and a stray file in cache/.
    let other = s.root().join("cache/0123456789abcdef0123456789abcdef");
    let hex = shared.to_hex();
    fs::create_dir_all(other.join(&hex[..2])).unwrap();
    fs::write(other.join(&hex[..2]).join(&hex), b"torn").unwrap();
    fs::write(s.root().join("cache/stray"), b"xy").unwrap();
    // Staging files in this boot's cache: a crashed writer's, an active one's.
    let shard = s.cache_path(&shared).parent().unwrap().to_owned();
    let crashed = shard.join(format!(".{hex}.1-0-0"));
    let active = shard.join(format!(".{hex}.2-0-0"));
    fs::write(&crashed, b"crashed").unwrap();
    fs::write(&active, b"active").unwrap();
    let two_hours_ago = rustix::fs::Timespec {
        tv_sec: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            - 7200,
        tv_nsec: 0,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        &crashed,
        &rustix::fs::Timestamps {
            last_access: two_hours_ago,
            last_modification: two_hours_ago,
        },
        rustix::fs::AtFlags::empty(),
    )
    .unwrap();

    // Everything referenced: only other boots, the stray file and the
    // crashed staging file go.
    let st = gc(&s).unwrap();
    assert_eq!((st.cache_removed, st.cache_kept), (3, 3), "{st:?}");
    assert_eq!(st.cache_bytes_removed, 4 + 2 + 7);
    assert!(!other.exists() && !crashed.exists() && active.exists());
    assert_eq!(st.blobs_removed, 0);

    // b removed while pinned: its cached copy stays with its blob.
    let pinned = Image::open(&s, "b").unwrap();
    assert_eq!(remove_image(&s, "b").unwrap(), RemoveOutcome::Deferred);
    let st = gc(&s).unwrap();
    assert_eq!((st.cache_removed, st.cache_kept), (0, 3), "{st:?}");
    drop(pinned);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let st = gc(&s).unwrap();
    assert_eq!(
        (st.blobs_removed, st.cache_removed, st.cache_kept),
        (1, 1, 2)
    );
    assert!(!s.cache_path(&only_b).exists());
    assert!(s.cache_path(&shared).exists() && s.cache_path(&only_a).exists());
    // A descriptor taken before gc removed the copy keeps working, and the
    // next materialize writes it again from the blob.
    let f = s.materialize(&only_a).unwrap();
    assert_eq!(remove_image(&s, "a").unwrap(), RemoveOutcome::Removed);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let st = gc(&s).unwrap();
    assert_eq!((st.cache_removed, st.cache_kept), (2, 0), "{st:?}"); // shared too
    assert!(active.exists());
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut &f, &mut got).unwrap();
    assert_eq!(got, b"only in a");
}

#[test]
fn store_directories_are_not_writable_by_others_whatever_the_umask() {
    // The mount daemon runs with umask 0; cached files are trusted as is.
    rustix::process::umask(rustix::fs::Mode::empty());
    let (d, s) = store();
    let src = d.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("f"), b"content").unwrap();
    build(&s, &src, "img", BuildOptions::default(), &mut noprog).unwrap();
    let img = Image::open(&s, "img").unwrap();
    let digest = img.blob(&img.lookup_path("f").unwrap().unwrap()).unwrap();
    s.materialize(&digest).unwrap();
    let cached = s.cache_path(&digest);
    let mut dirs = vec![
        s.root().to_path_buf(),
        s.blob_path(&digest).parent().unwrap().to_path_buf(),
    ];
    dirs.extend(cached.ancestors().skip(1).take(3).map(Path::to_path_buf));
    for dir in dirs {
        let mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o022, 0, "{} is mode {mode:o}", dir.display());
    }
}

#[test]
fn an_image_moves_between_stores_checked_and_only_the_missing_blobs() {
    let (_a, from) = store();
    let (_b, to) = store();
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("one"), b"one").unwrap();
    fs::write(src.path().join("big"), random_bytes(300_000, 7)).unwrap();
    fs::create_dir(src.path().join("d")).unwrap();
    fs::write(src.path().join("d/two"), b"two").unwrap();
    build(
        &from,
        src.path(),
        "img",
        BuildOptions::default(),
        &mut noprog,
    )
    .unwrap();
    let sent = export(&from, "img").unwrap();
    assert_eq!(sent.blobs.len(), 3);
    let mut asked = Vec::new();
    let mut fetch = |d: &Digest| {
        asked.push(*d);
        fs::read(from.blob_path(d)).map_err(|e| e.to_string())
    };
    let stats = import(&to, "img", &sent.manifest, false, Some(&mut fetch)).unwrap();
    assert_eq!((stats.fetched, stats.present), (3, 0));
    let img = Image::open(&to, "img").unwrap();
    let e = img.lookup_path("d/two").unwrap().unwrap();
    assert_eq!(to.read_blob(&img.blob(&e).unwrap()).unwrap(), b"two");
    // Again under another name: nothing to fetch.
    let stats = import(
        &to,
        "again",
        &sent.manifest,
        false,
        Some(&mut |_| Err("asked".into())),
    )
    .unwrap();
    assert_eq!((stats.fetched, stats.present), (0, 3));
    // A blob that is not what its name says is refused, and no image appears.
    let (_c, fresh) = store();
    let mut lying = |d: &Digest| {
        let mut b = fs::read(from.blob_path(d)).map_err(|e| e.to_string())?;
        let last = b.len() - 1;
        b[last] ^= 0xff;
        Ok(b)
    };
    let err = import(&fresh, "img", &sent.manifest, false, Some(&mut lying)).unwrap_err();
    assert!(matches!(err, Error::CorruptBlob { .. }), "{err}");
    assert!(matches!(
        Image::open(&fresh, "img"),
        Err(Error::NoSuchImage(_))
    ));
    assert_eq!(count_blobs(&fresh), 0);
    // A manifest changed on the way is refused before any blob is asked for.
    let mut bad = sent.manifest.clone();
    let n = bad.len() - 1;
    bad[n] ^= 1;
    let err = import(
        &fresh,
        "img",
        &bad,
        false,
        Some(&mut |_| Err("asked".into())),
    )
    .unwrap_err();
    assert!(matches!(err, Error::BadManifest { .. }), "{err}");
    // A fetch that fails names the blob.
    let err = import(
        &fresh,
        "img",
        &sent.manifest,
        false,
        Some(&mut |_| Err("gone".into())),
    )
    .unwrap_err();
    assert!(err.to_string().contains("gone"), "{err}");
    assert!(matches!(
        Image::open(&fresh, "img"),
        Err(Error::NoSuchImage(_))
    ));
}

#[derive(Debug)]
struct FromStore(Store, std::sync::atomic::AtomicU64);

impl Fetch for FromStore {
    fn fetch(&self, d: &Digest) -> std::result::Result<Vec<u8>, String> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        fs::read(self.0.blob_path(d)).map_err(|e| e.to_string())
    }
}

#[test]
fn a_store_with_a_source_fetches_a_blob_when_it_is_first_read_once() {
    let (_a, from) = store();
    let (_b, to) = store();
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("one"), b"one").unwrap();
    fs::write(src.path().join("two"), b"two").unwrap();
    build(
        &from,
        src.path(),
        "img",
        BuildOptions::default(),
        &mut noprog,
    )
    .unwrap();
    let sent = export(&from, "img").unwrap();
    // The manifest only: the image exists, its blobs do not yet.
    let stats = import(&to, "img", &sent.manifest, false, None).unwrap();
    assert_eq!(stats.fetched, 0);
    assert_eq!(count_blobs(&to), 0);
    assert!(matches!(
        to.read_blob(&Digest::of(b"one")),
        Err(Error::MissingBlob(_))
    ));
    let source = std::sync::Arc::new(FromStore(from.clone(), Default::default()));
    let lazy = to.clone().with_fetch(source.clone());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let s = lazy.clone();
            std::thread::spawn(move || s.materialize(&Digest::of(b"one")).map(|_| ()))
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    assert_eq!(source.1.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(lazy.read_blob(&Digest::of(b"one")).unwrap(), b"one");
    assert_eq!(count_blobs(&to), 1);
    // A source that sends something else: refused, nothing kept.
    #[derive(Debug)]
    struct Liar;
    impl Fetch for Liar {
        fn fetch(&self, _: &Digest) -> std::result::Result<Vec<u8>, String> {
            Ok(b"STRB garbage".to_vec())
        }
    }
    let liar = to.clone().with_fetch(std::sync::Arc::new(Liar));
    assert!(matches!(
        liar.read_blob(&Digest::of(b"two")),
        Err(Error::CorruptBlob { .. })
    ));
    assert_eq!(count_blobs(&to), 1);
}
