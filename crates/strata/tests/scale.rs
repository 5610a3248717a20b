//! Lookup counting and descriptor bounds at scale.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

fn daemon_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[test]
fn inode_table_returns_to_baseline_after_100k_creates_and_deletes() {
    let m = Mounted::new(&[]);
    let baseline = m.stats()["inodes"].as_u64().unwrap();
    fs::create_dir(m.m("churn")).unwrap();
    for i in 0..100_000 {
        let p = m.m(&format!("churn/f{i}"));
        fs::write(&p, b"x").unwrap();
        fs::remove_file(&p).unwrap();
    }
    fs::remove_dir(m.m("churn")).unwrap();
    drop_caches();
    let settled = wait_until(Duration::from_secs(10), || {
        m.stats()["inodes"].as_u64().unwrap() <= baseline
    });
    let stats = m.stats();
    assert!(
        settled,
        "inodes {} after churn, baseline {baseline}",
        stats["inodes"]
    );
    assert_eq!(stats["open_files"], 0);
}

/// When the kernel forgets the inodes (drop_caches), the daemon drops its
/// nodes and their descriptors: `cached_fds` must count what is still open,
/// not the slots its cache once filled.
#[test]
fn cached_fds_counts_open_descriptors_after_drop_caches() {
    let m = Mounted::with_source(&["cache.fds=1000"], |src| {
        fs::create_dir(src.join("d")).unwrap();
        for i in 0..1500 {
            fs::write(src.join(format!("d/f{i}")), b"").unwrap();
        }
    });
    let baseline = m.stats()["inodes"].as_u64().unwrap();
    // Opening needs each node's descriptor (a stat is answered from the
    // attributes READDIRPLUS brought).
    for e in fs::read_dir(m.m("d")).unwrap() {
        fs::File::open(e.unwrap().path()).unwrap();
    }
    let before = m.stats()["cached_fds"].as_u64().unwrap();
    assert!(
        before >= 900,
        "{before} descriptors cached after 1500 opens"
    );
    assert!(before as usize <= daemon_fds(m.pid()));
    drop_caches();
    let forgotten = wait_until(Duration::from_secs(10), || {
        m.stats()["inodes"].as_u64().unwrap() <= baseline
    });
    assert!(forgotten, "nodes not forgotten: {}", m.stats());
    let cached = m.stats()["cached_fds"].as_u64().unwrap() as usize;
    let open = daemon_fds(m.pid());
    assert!(
        cached <= open,
        "cached_fds {cached} while the daemon has {open} descriptors open"
    );
}

#[test]
fn listing_100k_files_stays_within_the_fd_bound() {
    let m = Mounted::with_source(&["cache.fds=64"], |src| {
        fs::create_dir(src.join("big")).unwrap();
        for i in 0..100_000 {
            fs::write(src.join(format!("big/file-{i:06}")), b"").unwrap();
        }
    });
    let mut n = 0;
    for e in fs::read_dir(m.m("big")).unwrap() {
        let e = e.unwrap();
        // stat every entry, as `ls -l` does
        fs::symlink_metadata(e.path()).unwrap();
        n += 1;
    }
    assert_eq!(n, 100_000);
    let stats = m.stats();
    assert!(
        stats["inodes"].as_u64().unwrap() > 1000,
        "the kernel holds many inodes: {stats}"
    );
    assert!(stats["cached_fds"].as_u64().unwrap() <= 64, "{stats}");
    let fds = daemon_fds(m.pid());
    assert!(fds < 1024, "daemon holds {fds} fds with 100k known inodes");
}
