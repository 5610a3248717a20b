//! How requests reach the daemon: per-CPU io_uring queues when the kernel
//! offers them (Linux 6.14+, fuse `enable_uring=Y`; `scripts/test.sh` turns
//! it on), /dev/fuse otherwise or with `uring=false`. Whichever it is, every
//! caller must get its own reply, and large payloads must cross intact.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;

use crate::common::Mounted;

fn kernel_offers_uring() -> bool {
    fs::read_to_string("/sys/module/fuse/parameters/enable_uring").is_ok_and(|v| v.trim() == "Y")
}

fn ring_requests(m: &Mounted) -> u64 {
    m.stats()["io_uring_requests"]
        .as_u64()
        .expect("io_uring_requests counter")
}

/// Creates, stats, reads, renames and unlinks `n` files, checking each step.
fn exercise(m: &Mounted, tag: &str, n: usize) {
    let dir = m.m(tag);
    fs::create_dir(&dir).unwrap();
    for i in 0..n {
        let body = format!("{tag} file {i}\n").repeat(i % 7 + 1);
        let path = dir.join(format!("f{i}"));
        fs::write(&path, &body).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().size(), body.len() as u64);
        assert_eq!(fs::read_to_string(&path).unwrap(), body);
        let moved = dir.join(format!("g{i}"));
        fs::rename(&path, &moved).unwrap();
        assert!(!path.exists());
        fs::remove_file(&moved).unwrap();
    }
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    fs::remove_dir(&dir).unwrap();
}

#[test]
fn requests_take_the_io_uring_queues_when_the_kernel_offers_them() {
    if !kernel_offers_uring() {
        eprintln!("skipped: the kernel does not offer FUSE over io_uring (enable_uring is not Y)");
        return;
    }
    let mut m = Mounted::new(&[]);
    let before = ring_requests(&m);
    exercise(&m, "ring", 200);
    let served = ring_requests(&m) - before;
    // At least a LOOKUP, CREATE, OPEN, RENAME and UNLINK per file.
    assert!(
        served >= 5 * 200,
        "only {served} requests came through the rings; daemon log:\n{}",
        m.log()
    );
    // The ring workers end with the connection: the daemon exits cleanly.
    m.unmount();
}

#[test]
fn uring_false_keeps_requests_on_dev_fuse() {
    let mut m = Mounted::new(&["uring=false"]);
    exercise(&m, "classic", 50);
    assert_eq!(ring_requests(&m), 0);
    m.unmount();
}

#[test]
fn concurrent_callers_each_get_their_own_replies() {
    let m = Mounted::new(&[]);
    std::thread::scope(|s| {
        for t in 0..8 {
            let m = &m;
            s.spawn(move || exercise(m, &format!("t{t}"), 150));
        }
    });
}

/// With `passthrough=false`, file data travels in READ and WRITE requests
/// of up to 1 MiB: the largest payloads a queue entry carries.
#[test]
fn large_reads_and_writes_through_the_daemon_arrive_intact() {
    let m = Mounted::new(&["passthrough=false"]);
    let pattern = |seed: u64, len: usize| -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect()
    };
    let len = 8 << 20;
    // Written outside: the first read through the mount must come from the daemon.
    let outside = pattern(1, len);
    fs::write(m.s("big"), &outside).unwrap();
    let mut read = Vec::new();
    fs::File::open(m.m("big"))
        .unwrap()
        .read_to_end(&mut read)
        .unwrap();
    assert!(
        read == outside,
        "8 MiB read through the mount differs from the source"
    );

    let inside = pattern(2, len);
    let mut f = fs::OpenOptions::new().write(true).open(m.m("big")).unwrap();
    f.write_all(&inside).unwrap();
    f.sync_all().unwrap();
    assert!(
        fs::read(m.s("big")).unwrap() == inside,
        "8 MiB written through the mount differs"
    );

    // A read at an odd offset spanning requests.
    let mut f = fs::File::open(m.m("big")).unwrap();
    f.seek(SeekFrom::Start(3 << 20 | 12345)).unwrap();
    let mut part = vec![0u8; 2 << 20];
    f.read_exact(&mut part).unwrap();
    let at = (3 << 20) | 12345;
    assert!(part[..] == inside[at..at + (2 << 20)]);
}

/// A stopped and continued daemon (job control, a debugger attaching) sees
/// its waits for requests interrupted. Its workers must keep their queue
/// entries: a queue left without one would hold its CPU's callers forever.
#[test]
fn a_daemon_stopped_and_continued_keeps_serving() {
    use rustix::process::Signal;
    let m = Mounted::new(&[]);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mnt = m.mnt.clone();
    let worker = std::thread::spawn(move || {
        let dir = mnt.join("busy");
        fs::create_dir(&dir).unwrap();
        for i in 0..2000 {
            let path = dir.join(format!("f{i}"));
            fs::write(&path, b"x").unwrap();
            fs::remove_file(&path).unwrap();
        }
        done_tx.send(()).unwrap();
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut stops = 0;
    loop {
        match done_rx.try_recv() {
            Ok(()) => break,
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                worker.join().unwrap();
                unreachable!("the worker failed without panicking");
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "file operations hung after {stops} stops; daemon log:\n{}",
            m.log()
        );
        m.signal(Signal::STOP);
        std::thread::sleep(std::time::Duration::from_millis(1));
        m.signal(Signal::CONT);
        stops += 1;
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    worker.join().unwrap();
    assert!(
        stops > 10,
        "only {stops} stops happened during the operations"
    );
    // Every CPU's queue still answers.
    for cpu in 0..std::thread::available_parallelism().unwrap().get() {
        let mnt = m.mnt.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut set = rustix::thread::CpuSet::new();
            set.set(cpu);
            rustix::thread::sched_setaffinity(None, &set).unwrap();
            let probe = mnt.join(format!("probe{cpu}"));
            tx.send(fs::write(&probe, b"x").and_then(|()| fs::remove_file(&probe)))
                .unwrap();
        });
        let listed = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert!(
            matches!(listed, Ok(Ok(()))),
            "a create and unlink on CPU {cpu} got {listed:?}; daemon log:\n{}",
            m.log()
        );
    }
}
