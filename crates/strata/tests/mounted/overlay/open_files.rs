//! Open descriptors across a copy-up: writers and readers opened before it,
//! during it and after it, and descriptors of names unlinked or renamed.

use super::*;

#[test]
fn open_files_across_copy_up_unlink_and_rename() {
    let m = overlay(|src| {
        write(&src.join("f"), b"lower");
        fs::create_dir(src.join("d")).unwrap();
        write(&src.join("d/inner"), b"inner");
        write(&src.join("doomed"), b"still readable");
    });
    // A writer opened before a rename of its lower directory keeps writing
    // the file the mount shows.
    let mut w = fs::OpenOptions::new()
        .append(true)
        .open(m.m("d/inner"))
        .unwrap();
    fs::rename(m.m("d"), m.m("d2")).unwrap();
    w.write_all(b"+after").unwrap();
    drop(w);
    assert_eq!(read(&m.m("d2/inner")), "inner+after");
    assert_eq!(read(&m.s("d/inner")), "inner");
    // New opens after a copy-up see the upper's data.
    append(&m.m("f"), b"+upper");
    assert_eq!(read(&m.m("f")), "lower+upper");
    let mut rw = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.m("f"))
        .unwrap();
    rw.write_all(b"LOW").unwrap();
    drop(rw);
    assert_eq!(read(&m.m("f")), "LOWer+upper");
    // An open lower file stays readable after its name is removed.
    let mut r = fs::File::open(m.m("doomed")).unwrap();
    fs::remove_file(m.m("doomed")).unwrap();
    let mut s = String::new();
    std::io::Read::read_to_string(&mut r, &mut s).unwrap();
    assert_eq!(s, "still readable");
    assert_eq!(errno(fs::symlink_metadata(m.m("doomed"))), libc::ENOENT);
}

/// A file some process has open for reading (with kernel passthrough, the
/// lower file is its backing file) must not make opens of the copy fail.
#[test]
fn a_reader_holding_a_lower_file_open_does_not_break_writers_or_later_opens() {
    let m = overlay(|src| {
        write(&src.join("f"), b"lower\n");
        write(&src.join("g"), b"g\n");
    });
    let mut failures = Vec::new();
    // A metadata change copies up as well: later opens must still work.
    let g_reader = fs::File::open(m.m("g")).unwrap();
    chmod(&m.m("g"), 0o600);
    if let Err(e) = fs::read(m.m("g")) {
        failures.push(format!(
            "an open after a chmod while a reader has it open: {e}"
        ));
    }
    drop(g_reader);
    let mut reader = fs::File::open(m.m("f")).unwrap();
    match fs::OpenOptions::new().append(true).open(m.m("f")) {
        Ok(mut w) => w.write_all(b"appended\n").unwrap(),
        Err(e) => failures.push(format!("open for append while a reader has it open: {e}")),
    }
    match fs::read_to_string(m.m("f")) {
        Ok(s) if s == "lower\nappended\n" => {}
        other => failures.push(format!("a new open after the copy-up read {other:?}")),
    }
    // The early reader goes on reading (the lower's data, as in overlayfs).
    let mut s = String::new();
    if let Err(e) = std::io::Read::read_to_string(&mut reader, &mut s) {
        failures.push(format!("the early reader: {e}"));
    }
    drop(reader);
    match fs::read_to_string(m.m("f")) {
        Ok(s) if s == "lower\nappended\n" => {}
        other => failures.push(format!("an open after the reader closed read {other:?}")),
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A read-only open racing the copy-up that a writer's open starts: the
/// reader gets the file (lower or copied-up content), never an error, even
/// when the writer's handle has already made the copy the inode's
/// passthrough file.
#[test]
fn reading_a_lower_file_while_a_writer_copies_it_up_never_fails() {
    const FILES: usize = 300;
    let m = overlay(|src| {
        for i in 0..FILES {
            write(
                &src.join(format!("f{i:03}")),
                format!("file {i:03}\n").as_bytes(),
            );
        }
    });
    let next = std::sync::atomic::AtomicUsize::new(0);
    let problems = std::sync::Mutex::new(Vec::<String>::new());
    std::thread::scope(|s| {
        // Readers open the file the writer is about to open, and the next.
        for t in 0..2 {
            let (m, next, problems) = (&m, &next, &problems);
            s.spawn(move || {
                loop {
                    let n = next.load(std::sync::atomic::Ordering::Relaxed) + t;
                    if n >= FILES {
                        break;
                    }
                    match fs::read_to_string(m.m(&format!("f{n:03}"))) {
                        Ok(c) if c.starts_with(&format!("file {n:03}\n")) => {}
                        other => problems.lock().unwrap().push(format!("f{n:03}: {other:?}")),
                    }
                }
            });
        }
        let mut handles = Vec::new();
        for i in 0..FILES {
            next.store(i, std::sync::atomic::Ordering::Relaxed);
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(m.m(&format!("f{i:03}")))
                .unwrap_or_else(|e| panic!("open f{i:03} for append: {e}"));
            f.write_all(b"more\n").unwrap();
            handles.push(f);
        }
        next.store(FILES, std::sync::atomic::Ordering::Relaxed);
    });
    let problems = problems.into_inner().unwrap();
    assert!(
        problems.is_empty(),
        "{} failed reads, first: {}\ndaemon log:\n{}",
        problems.len(),
        problems[..problems.len().min(10)].join("\n"),
        m.log()
    );
    for i in 0..FILES {
        assert_eq!(
            read(&m.m(&format!("f{i:03}"))),
            format!("file {i:03}\nmore\n")
        );
    }
}

/// What a descriptor opened read-only before a copy-up reads afterwards:
/// kernel overlayfs (since 4.19) gives it the upper's data, so must we. The
/// reader has read (and cached) the start before the writer changes the
/// start, appends past it, and truncates a second file.
fn readers_follow_the_copy_up(m: &Mounted) {
    use std::os::unix::fs::FileExt;
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let reader = fs::File::open(m.m("big")).unwrap();
    let mut head = vec![0u8; 4096];
    reader.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, big[..4096]);
    let short = fs::File::open(m.m("short")).unwrap();
    let mut buf = [0u8; 5];
    short.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"lower");

    let writer = fs::OpenOptions::new().write(true).open(m.m("big")).unwrap();
    writer.write_all_at(b"NEW START", 0).unwrap();
    writer.write_all_at(b"appended", big.len() as u64).unwrap();
    writer.write_all_at(b"middle", 200_000).unwrap();
    drop(writer);
    fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.m("short"))
        .unwrap()
        .write_all(b"upper!")
        .unwrap();

    let mut want = big.clone();
    want[..9].copy_from_slice(b"NEW START");
    want[200_000..200_006].copy_from_slice(b"middle");
    want.extend_from_slice(b"appended");
    let mut got = vec![0u8; want.len() + 100];
    let n = reader.read_at(&mut got, 0).unwrap();
    let mut total = n;
    while total < got.len() {
        match reader.read_at(&mut got[total..], total as u64).unwrap() {
            0 => break,
            k => total += k,
        }
    }
    got.truncate(total);
    assert_eq!(got.len(), want.len(), "the reader sees the old size");
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "the reader sees the lower's old data");
    let mut again = [0u8; 16];
    let n = short.read_at(&mut again, 0).unwrap();
    assert_eq!(&again[..n], b"upper!");
}

fn copy_up_sources(src: &Path) {
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    fs::write(src.join("big"), big).unwrap();
    fs::write(src.join("short"), b"lower file").unwrap();
}

#[test]
fn a_descriptor_opened_before_a_copy_up_reads_the_copy() {
    let m = overlay(copy_up_sources);
    readers_follow_the_copy_up(&m);
}

#[test]
fn a_descriptor_opened_before_a_copy_up_reads_the_copy_from_an_image() {
    let m = Mounted::build_with(&[], &[], |dir| {
        let src = dir.join("imgsrc");
        fs::create_dir(&src).unwrap();
        copy_up_sources(&src);
        let store = dir.join("store");
        build_image(&src, &store, "cu");
        let upper = dir.join("upper");
        fs::create_dir(&upper).unwrap();
        (
            "image:cu".to_owned(),
            vec![
                format!("upper={}", upper.display()),
                format!("store={}", store.display()),
            ],
        )
    });
    readers_follow_the_copy_up(&m);
}
