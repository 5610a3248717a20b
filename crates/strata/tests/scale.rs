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
