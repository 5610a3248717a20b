use std::io::Write;
use std::path::Path;

use super::*;

/// A tar header for `name` (written into the header as is: no checks, so
/// hostile names can be made), of type `kind`, with `data`.
fn raw_entry(out: &mut Vec<u8>, name: &[u8], kind: tar::EntryType, link: &[u8], data: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(0o640);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    h.set_uid(1000);
    h.set_gid(100);
    {
        let old = h.as_old_mut();
        old.name.fill(0);
        old.name[..name.len()].copy_from_slice(name);
        old.linkname.fill(0);
        old.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
}

fn end(mut tar: Vec<u8>) -> Vec<u8> {
    tar.extend_from_slice(&[0u8; 1024]);
    tar
}

/// A tar with a bit of everything a well-behaved archive has.
fn sample_tar() -> Vec<u8> {
    use tar::EntryType as T;
    let mut t = Vec::new();
    raw_entry(&mut t, b"./", T::Directory, b"", b"");
    raw_entry(&mut t, b"./top.txt", T::Regular, b"", b"top\n");
    // `d` is implied by its file
    raw_entry(&mut t, b"d/sub/deep.txt", T::Regular, b"", b"deep\n");
    raw_entry(&mut t, b"d/link", T::Symlink, b"../top.txt", b"");
    raw_entry(&mut t, b"d/hard", T::Link, b"top.txt", b"");
    raw_entry(&mut t, b"/abs.txt", T::Regular, b"", b"leading slash\n");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    raw_entry(&mut t, b"big.bin", T::Regular, b"", &big);
    end(t)
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn content(a: &Archive, path: &str) -> Vec<u8> {
    let i = at(a, path).unwrap_or_else(|| panic!("{path} missing"));
    let mut out = Vec::new();
    a.extract(a.member(i).unwrap().inode, &mut out).unwrap();
    out
}

fn at(a: &Archive, path: &str) -> Option<u32> {
    let mut cur = 0;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        cur = a.lookup(cur, part.as_bytes())?;
    }
    Some(cur)
}

fn names(a: &Archive, dir: u32) -> Vec<String> {
    a.children(dir)
        .iter()
        .map(|&c| String::from_utf8(a.member(c).unwrap().name.clone()).unwrap())
        .collect()
}

fn check_sample(a: &Archive) {
    assert_eq!(names(a, 0), ["abs.txt", "big.bin", "d", "top.txt"]);
    assert_eq!(names(a, at(a, "d").unwrap()), ["hard", "link", "sub"]);
    assert_eq!(content(a, "top.txt"), b"top\n");
    assert_eq!(content(a, "d/sub/deep.txt"), b"deep\n");
    assert_eq!(content(a, "abs.txt"), b"leading slash\n");
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(content(a, "big.bin"), big);
    let link = a.member(at(a, "d/link").unwrap()).unwrap();
    assert_eq!(
        (link.kind, link.target.as_slice()),
        (Kind::Symlink, &b"../top.txt"[..])
    );
    let (top, hard) = (at(a, "top.txt").unwrap(), at(a, "d/hard").unwrap());
    let (t, h) = (a.member(top).unwrap(), a.member(hard).unwrap());
    assert_eq!(t.inode, h.inode, "hard links share their data");
    assert_eq!((t.nlink, h.nlink), (2, 2));
    assert_eq!(a.other_names(top), [hard]);
    assert_eq!(
        (t.perm, t.uid, t.gid, t.mtime),
        (0o640, 1000, 100, 1_700_000_000)
    );
    let d = a.member(at(a, "d").unwrap()).unwrap();
    assert_eq!((d.kind, d.perm, d.nlink), (Kind::Dir, 0o755, 3));
    assert_eq!(a.skipped(), 0);
    // The descriptor a layer serves reads the same bytes.
    let fd = a.open_member(top).unwrap();
    let mut f = File::from(fd);
    let mut s = Vec::new();
    f.read_to_end(&mut s).unwrap();
    assert_eq!(s, b"top\n");
}

#[test]
fn a_tar_is_indexed_with_implied_dirs_links_and_hard_links() {
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open(&write(dir.path(), "x.tar", &sample_tar())).unwrap();
    assert_eq!(a.format(), Format::Tar);
    check_sample(&a);
}

#[test]
fn compressed_tars_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let tar = sample_tar();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let gz = gz.finish().unwrap();
    let zst = zstd::stream::encode_all(&tar[..], 3).unwrap();
    let mut xz = liblzma::write::XzEncoder::new(Vec::new(), 1);
    xz.write_all(&tar).unwrap();
    let xz = xz.finish().unwrap();
    for (name, bytes, format) in [
        ("x.tar.gz", gz, Format::TarGz),
        ("x.tar.zst", zst, Format::TarZst),
        ("x.txz", xz, Format::TarXz),
    ] {
        let a = Archive::open(&write(dir.path(), name, &bytes)).unwrap();
        assert_eq!(a.format(), format, "{name}");
        check_sample(&a);
    }
}

fn sample_zip(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("x.zip");
    let mut z = zip::ZipWriter::new(File::create(&p).unwrap());
    let stored = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .unix_permissions(0o600);
    let deflated = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    z.add_directory("d/", deflated).unwrap();
    z.start_file("d/a.txt", stored).unwrap();
    z.write_all(b"stored a\n").unwrap();
    z.start_file("d/sub/b.txt", deflated).unwrap();
    z.write_all(&b"deflated b\n".repeat(1000)).unwrap();
    z.add_symlink("d/l", "a.txt", deflated).unwrap();
    z.finish().unwrap();
    p
}

#[test]
fn a_zip_is_indexed_with_modes_symlinks_and_both_methods() {
    let dir = tempfile::tempdir().unwrap();
    let a = Archive::open(&sample_zip(dir.path())).unwrap();
    assert_eq!(a.format(), Format::Zip);
    assert_eq!(names(&a, 0), ["d"]);
    assert_eq!(names(&a, at(&a, "d").unwrap()), ["a.txt", "l", "sub"]);
    assert_eq!(content(&a, "d/a.txt"), b"stored a\n");
    assert_eq!(content(&a, "d/sub/b.txt"), b"deflated b\n".repeat(1000));
    let f = a.member(at(&a, "d/a.txt").unwrap()).unwrap();
    assert_eq!((f.kind, f.perm, f.size), (Kind::File, 0o600, 9));
    let l = a.member(at(&a, "d/l").unwrap()).unwrap();
    assert_eq!(
        (l.kind, l.target.as_slice()),
        (Kind::Symlink, &b"a.txt"[..])
    );
}

/// Hostile and malformed members: each is left out (counted), the rest
/// of the archive is served, nothing outside the tree is ever named.
#[test]
fn hostile_tar_members_are_left_out() {
    use tar::EntryType as T;
    let dir = tempfile::tempdir().unwrap();
    let mut t = Vec::new();
    raw_entry(&mut t, b"ok", T::Regular, b"", b"fine");
    raw_entry(&mut t, b"../escape", T::Regular, b"", b"x"); // skipped
    raw_entry(&mut t, b"a/../../escape2", T::Regular, b"", b"x"); // skipped
    raw_entry(&mut t, b"ok/child", T::Regular, b"", b"x"); // skipped: parent is a file
    raw_entry(&mut t, b"ok", T::Directory, b"", b""); // skipped: a file has the name
    raw_entry(&mut t, b"dir", T::Directory, b"", b"");
    raw_entry(&mut t, b"dir", T::Regular, b"", b"x"); // skipped: a dir has the name
    raw_entry(&mut t, b"nolink", T::Symlink, b"", b""); // skipped: empty target
    raw_entry(&mut t, b"h1", T::Link, b"missing", b""); // skipped
    raw_entry(&mut t, b"h2", T::Link, b"dir", b""); // skipped: a directory
    raw_entry(&mut t, b"h3", T::Link, b"../../etc/passwd", b""); // skipped
    raw_entry(&mut t, b"dup", T::Regular, b"", b"first");
    raw_entry(&mut t, b"dup", T::Regular, b"", b"second"); // replaces
    raw_entry(&mut t, b"abs", T::Symlink, b"/etc/passwd", b""); // a link, only stored
    let a = Archive::open(&write(dir.path(), "evil.tar", &end(t))).unwrap();
    assert_eq!(names(&a, 0), ["abs", "dir", "dup", "ok"]);
    assert_eq!(a.skipped(), 9);
    assert_eq!(content(&a, "ok"), b"fine");
    assert_eq!(content(&a, "dup"), b"second");
    assert_eq!(a.member(at(&a, "dir").unwrap()).unwrap().kind, Kind::Dir);
    for i in 0..a.len() as u32 {
        let m = a.member(i).unwrap();
        if i != 0 {
            assert!(
                strata_image::entry_name_problem(&m.name).is_none(),
                "{:?}",
                m.name
            );
        }
    }
}

#[test]
fn a_component_longer_than_255_bytes_is_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let long = "n".repeat(256);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, format!("d/{long}"), &b"x"[..])
        .unwrap();
    b.append_data(&mut h, "fine", &b"y"[..]).unwrap();
    let a = Archive::open(&write(dir.path(), "long.tar", &b.into_inner().unwrap())).unwrap();
    assert_eq!(a.skipped(), 1);
    assert_eq!(content(&a, "fine"), b"y");
}

/// Patches the 4-byte little-endian field at `at` of every record that
/// starts with `sig`.
fn patch(bytes: &mut [u8], sig: &[u8; 4], at: usize, value: u32) {
    let starts: Vec<usize> = bytes
        .windows(4)
        .enumerate()
        .filter(|(_, w)| w == sig)
        .map(|(i, _)| i)
        .collect();
    for s in starts {
        bytes[s + at..s + at + 4].copy_from_slice(&value.to_le_bytes());
    }
}

fn one_file_zip(data: &[u8], method: zip::CompressionMethod) -> Vec<u8> {
    let mut z = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let o = zip::write::SimpleFileOptions::default().compression_method(method);
    z.start_file("f", o).unwrap();
    z.write_all(data).unwrap();
    z.finish().unwrap().into_inner()
}

#[test]
fn a_zip_member_declaring_far_more_than_it_holds_is_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = one_file_zip(&[0u8; 4096], zip::CompressionMethod::Deflated);
    // 1 GiB declared for a few bytes of deflate: in the central directory
    // (uncompressed size at 24) and the local header (at 22).
    patch(&mut bytes, b"PK\x01\x02", 24, 1 << 30);
    patch(&mut bytes, b"PK\x03\x04", 22, 1 << 30);
    let a = Archive::open(&write(dir.path(), "bomb.zip", &bytes)).unwrap();
    assert_eq!((a.skipped(), names(&a, 0).len()), (1, 0));
}

#[test]
fn a_member_with_less_or_more_data_than_declared_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    // zip: declared 2000 bytes, holds 4096 (the reader stops at the
    // declared size, the CRC then fails, or the size check does).
    let mut bytes = one_file_zip(&[7u8; 4096], zip::CompressionMethod::Deflated);
    patch(&mut bytes, b"PK\x01\x02", 24, 2000);
    patch(&mut bytes, b"PK\x03\x04", 22, 2000);
    if let Ok(a) = Archive::open(&write(dir.path(), "short.zip", &bytes))
        && let Some(i) = a.lookup(0, b"f")
    {
        assert!(a.extract(i, &mut Vec::new()).is_err());
        assert!(a.open_member(i).is_err());
    }
    // tar cut off in the middle of a member's data
    let tar = sample_tar();
    let cut = &tar[..tar.len() - 1024 - 100_000];
    let a = Archive::open(&write(dir.path(), "cut.tar", cut)).unwrap();
    let big = at(&a, "big.bin").unwrap();
    assert!(a.extract(big, &mut Vec::new()).is_err());
    assert_eq!(content(&a, "top.txt"), b"top\n");
}

#[test]
fn a_truncated_or_garbage_archive_is_an_error_or_what_was_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&sample_tar()).unwrap();
    let gz = gz.finish().unwrap();
    let half = &gz[..gz.len() / 2];
    let a = Archive::open(&write(dir.path(), "half.tar.gz", half)).unwrap();
    assert!(
        a.lookup(0, b"top.txt").is_some(),
        "members before the break stay"
    );
    let err = Archive::open(&write(dir.path(), "junk.bin", b"just some text"))
        .err()
        .unwrap();
    assert!(
        err.0.contains("junk.bin") && err.0.contains("not a known archive"),
        "{err}"
    );
    let zip = Archive::open(&write(dir.path(), "bad.zip", b"PK\x03\x04 nothing else"));
    assert!(zip.err().unwrap().0.contains("bad.zip"));
}

#[test]
fn components_drop_dots_and_refuse_dotdot() {
    assert_eq!(index::components(b"./a//b/").unwrap(), [&b"a"[..], b"b"]);
    assert_eq!(index::components(b"/").unwrap(), Vec::<&[u8]>::new());
    assert!(index::components(b"a/../b").is_err());
    assert!(index::components(b"a/b\0c").is_err());
}

fn kept(path: &Path, dir: &Path) -> Archive {
    Archive::from_file_kept(File::open(path).unwrap(), path, Some(dir)).unwrap()
}

#[test]
fn the_index_is_kept_and_read_back_the_next_time() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("kept");
    let tar = write(dir.path(), "x.tar", &sample_tar());
    let first = kept(&tar, &keep);
    assert!(!first.from_kept_index());
    check_sample(&first);
    let second = kept(&tar, &keep);
    assert!(
        second.from_kept_index(),
        "the second open reads the kept index"
    );
    check_sample(&second);
    // zip too, whose data is read through its own directory.
    let zip = sample_zip(dir.path());
    assert!(!kept(&zip, &keep).from_kept_index());
    let z = kept(&zip, &keep);
    assert!(z.from_kept_index());
    assert_eq!(content(&z, "d/sub/b.txt"), b"deflated b\n".repeat(1000));
    // A changed archive (another mtime) is indexed again.
    let f = File::options().write(true).open(&tar).unwrap();
    f.set_modified(std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(7))
        .unwrap();
    assert!(!kept(&tar, &keep).from_kept_index());
}

#[test]
fn a_kept_index_that_is_corrupt_or_hostile_is_not_used() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("kept");
    let tar = write(dir.path(), "x.tar", &sample_tar());
    kept(&tar, &keep);
    let file = std::fs::read_dir(&keep)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // A flipped byte: the checksum fails, the archive is read again.
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[40] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    let a = kept(&tar, &keep);
    assert!(!a.from_kept_index());
    check_sample(&a);
    // Sealed but hostile: a name with `..`, a child listed by a stranger,
    // an unsorted directory, a hard link to a directory, a cycle of parents.
    let good = Archive::open(&tar).unwrap();
    let base = good.members.clone();
    let top = good.lookup(0, b"top.txt").unwrap() as usize;
    let d = good.lookup(0, b"d").unwrap() as usize;
    let mut cases: Vec<Vec<Member>> = Vec::new();
    let mut m = base.clone();
    m[top].name = b"..".to_vec();
    cases.push(m);
    let mut m = base.clone();
    m[d].children.push(top as u32);
    cases.push(m);
    let mut m = base.clone();
    m[0].children.reverse();
    cases.push(m);
    let mut m = base.clone();
    m[top].inode = d as u32;
    cases.push(m);
    let mut m = base.clone();
    m[0].children.insert(0, 0);
    cases.push(m);
    let mut m = base.clone();
    m[d].children.push(1 << 20);
    cases.push(m);
    for (i, members) in cases.into_iter().enumerate() {
        std::fs::write(&file, persist::encode(Format::Tar, &members, 0)).unwrap();
        let a = kept(&tar, &keep);
        assert!(!a.from_kept_index(), "case {i} was used");
        check_sample(&a);
    }
}

#[test]
fn the_fuzz_seed_of_the_kept_index_is_one_the_reader_accepts() {
    // The same bytes scripts/fuzz.sh writes: a root and one file.
    let mut body = b"STRATAIX".to_vec();
    body.extend_from_slice(&1u32.to_le_bytes());
    body.push(1);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    let member =
        |name: &[u8], kind: u8, perm: u32, inode: u32, nlink: u32, tag: u8, children: &[u32]| {
            let mut b = (name.len() as u32).to_le_bytes().to_vec();
            b.extend_from_slice(name);
            b.extend_from_slice(&0u32.to_le_bytes());
            b.push(kind);
            for v in [perm, 0, 0] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(&0i64.to_le_bytes());
            b.extend_from_slice(&5u64.to_le_bytes());
            b.extend_from_slice(&[0u8; 8]);
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&inode.to_le_bytes());
            b.extend_from_slice(&nlink.to_le_bytes());
            b.push(tag);
            b.extend_from_slice(&(if tag == 1 { 512u64 } else { 0 }).to_le_bytes());
            b.extend_from_slice(&(children.len() as u32).to_le_bytes());
            for c in children {
                b.extend_from_slice(&c.to_le_bytes());
            }
            b
        };
    let root = member(b"", 2, 0o755, 0, 2, 0, &[1]);
    let good = [
        body.clone(),
        root.clone(),
        member(b"file", 1, 0o644, 1, 1, 1, &[]),
    ]
    .concat();
    assert_eq!(check_kept_index(&good), Some(2));
    // The same with a name that is not one component is refused.
    let bad = [body, root, member(b"..", 1, 0o644, 1, 1, 1, &[])].concat();
    assert_eq!(check_kept_index(&bad), None);
}

#[test]
fn kept_indexes_unused_for_a_while_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let keep = dir.path().join("kept");
    let mut one = Vec::new();
    raw_entry(&mut one, b"one", tar::EntryType::Regular, b"", b"1");
    let (a, b) = (
        write(dir.path(), "a.tar", &sample_tar()),
        write(dir.path(), "b.tar", &end(one)),
    );
    kept(&a, &keep);
    kept(&b, &keep);
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(40 * 86_400);
    for e in std::fs::read_dir(&keep).unwrap() {
        let f = File::options().write(true).open(e.unwrap().path()).unwrap();
        f.set_modified(old).unwrap();
    }
    // Using a's index marks it used again.
    assert!(kept(&a, &keep).from_kept_index());
    let month = std::time::Duration::from_secs(30 * 86_400);
    let (n, _) = prune_kept_indexes(&keep, month).unwrap();
    assert_eq!(n, 1, "b's index, unused for 40 days, goes");
    assert!(kept(&a, &keep).from_kept_index(), "a's stays");
    assert!(!kept(&b, &keep).from_kept_index());
    assert_eq!(
        prune_kept_indexes(&dir.path().join("none"), month).unwrap(),
        (0, 0)
    );
}
