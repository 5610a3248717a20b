//! Kernel caching and its correctness: long cache timeouts are safe because
//! changes made directly in the source are pushed to the kernel at once, and
//! host ACLs are enforced for every caller.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use crate::common::*;

/// How long an outside change may take to show through the mount. The
/// kernel's own timeouts are an hour here, so only the watch can meet this.
const PROPAGATION: Duration = Duration::from_secs(3);

/// Fills the kernel's caches for the names the test will change behind its back.
fn warm(m: &Mounted) {
    assert_eq!(fs::read(m.m("grow")).unwrap(), b"a");
    assert_eq!(fs::metadata(m.m("mode")).unwrap().mode() & 0o777, 0o644);
    assert!(fs::metadata(m.m("later")).is_err(), "not created yet");
    assert!(fs::metadata(m.m("doomed")).is_ok());
    assert!(fs::metadata(m.m("old")).is_ok());
    assert_eq!(fs::read_dir(m.m("d")).unwrap().count(), 0);
}

fn change_source(m: &Mounted) {
    fs::write(m.s("later"), b"new").unwrap();
    fs::write(m.s("grow"), b"abc").unwrap();
    fs::set_permissions(m.s("mode"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(m.s("doomed")).unwrap();
    fs::rename(m.s("old"), m.s("new")).unwrap();
    fs::write(m.s("d/inside"), b"").unwrap();
}

fn prepare(src: &std::path::Path) {
    for name in ["grow", "mode", "doomed", "old"] {
        fs::write(src.join(name), b"a").unwrap();
    }
    fs::set_permissions(src.join("mode"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(src.join("d")).unwrap();
}

type Check<'a> = Box<dyn Fn() -> bool + 'a>;

#[test]
fn changes_made_in_the_source_show_through_the_mount_at_once() {
    let m = Mounted::with_source(
        &["cache.entry=3600,cache.attr=3600,cache.negative-entry=3600"],
        prepare,
    );
    warm(&m);
    change_source(&m);
    let checks: [(&str, Check); 6] = [
        (
            "a new file appears (negative entry dropped)",
            Box::new(|| fs::read(m.m("later")).is_ok_and(|d| d == b"new")),
        ),
        (
            "a rewritten file shows its new size and data",
            Box::new(|| fs::read(m.m("grow")).is_ok_and(|d| d == b"abc")),
        ),
        (
            "a chmod shows",
            Box::new(|| fs::metadata(m.m("mode")).is_ok_and(|md| md.mode() & 0o777 == 0o600)),
        ),
        (
            "a deleted file is gone",
            Box::new(|| fs::metadata(m.m("doomed")).is_err()),
        ),
        (
            "a renamed file moves",
            Box::new(|| fs::metadata(m.m("old")).is_err() && fs::metadata(m.m("new")).is_ok()),
        ),
        (
            "a cached directory listing is refreshed",
            Box::new(|| {
                fs::read_dir(m.m("d"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name())
                    .eq(["inside"])
            }),
        ),
    ];
    for (what, check) in &checks {
        assert!(
            wait_until(PROPAGATION, check),
            "{what}: not visible through the mount after {PROPAGATION:?}\ndaemon log:\n{}",
            m.log()
        );
    }
}

/// The contrast that proves the test above measures the watch: with it off,
/// the same hour-long timeouts keep serving what the kernel cached.
#[test]
fn without_the_watch_long_timeouts_serve_stale_names() {
    let m = Mounted::with_source(
        &["watch=false,cache.entry=3600,cache.attr=3600,cache.negative-entry=3600"],
        prepare,
    );
    warm(&m);
    change_source(&m);
    std::thread::sleep(PROPAGATION);
    assert!(
        fs::metadata(m.m("later")).is_err(),
        "negative entry still cached"
    );
    assert_eq!(
        fs::metadata(m.m("mode")).unwrap().mode() & 0o777,
        0o644,
        "attributes still cached"
    );
}

/// `system.posix_acl_access` for a 0644 file with one named-user entry
/// giving `uid` no permissions (Linux xattr ACL format, version 2).
fn acl_denying(uid: u32) -> Vec<u8> {
    const UNDEFINED_ID: u32 = u32::MAX;
    let entries: [(u16, u16, u32); 5] = [
        (0x01, 6, UNDEFINED_ID), // ACL_USER_OBJ rw-
        (0x02, 0, uid),          // ACL_USER     ---
        (0x04, 4, UNDEFINED_ID), // ACL_GROUP_OBJ r--
        (0x10, 4, UNDEFINED_ID), // ACL_MASK     r--
        (0x20, 4, UNDEFINED_ID), // ACL_OTHER    r--
    ];
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend(tag.to_le_bytes());
        v.extend(perm.to_le_bytes());
        v.extend(id.to_le_bytes());
    }
    v
}

#[test]
fn host_acls_are_enforced_for_other_users() {
    let m = Mounted::with_source(&[], |src| {
        fs::write(src.join("open"), b"for everyone").unwrap();
        fs::write(src.join("denied"), b"not for nobody").unwrap();
        for f in ["open", "denied"] {
            fs::set_permissions(src.join(f), fs::Permissions::from_mode(0o644)).unwrap();
        }
        rustix::fs::setxattr(
            src.join("denied").as_path(),
            "system.posix_acl_access",
            &acl_denying(65534),
            rustix::fs::XattrFlags::empty(),
        )
        .expect("the test filesystem supports POSIX ACLs");
    });
    as_nobody_ok(&format!("cat {}", m.m("open").display()));
    let out = as_nobody(&format!("cat {}", m.m("denied").display()));
    assert!(
        !out.status.success(),
        "the ACL denies nobody, whatever the mode bits say"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The ACL is visible through the mount as it is on the host.
    let mut buf = [0u8; 256];
    let n =
        rustix::fs::getxattr(m.m("denied").as_path(), "system.posix_acl_access", &mut buf).unwrap();
    assert_eq!(&buf[..n], acl_denying(65534).as_slice());
}

#[test]
fn a_missing_selinux_label_reads_as_unsupported_and_stored_ones_pass_through() {
    let m = Mounted::with_source(&[], |src| {
        fs::write(src.join("plain"), b"").unwrap();
        fs::write(src.join("labelled"), b"").unwrap();
        rustix::fs::setxattr(
            src.join("labelled").as_path(),
            "security.selinux",
            b"system_u:object_r:etc_t:s0\0",
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
    });
    let mut buf = [0u8; 256];
    // ls -l stops asking for labels on a device once it hears "not supported".
    assert_eq!(
        rustix::fs::lgetxattr(m.m("plain").as_path(), "security.selinux", &mut buf),
        Err(rustix::io::Errno::OPNOTSUPP)
    );
    let n = rustix::fs::lgetxattr(m.m("labelled").as_path(), "security.selinux", &mut buf).unwrap();
    assert_eq!(&buf[..n], b"system_u:object_r:etc_t:s0\0");
    // Other missing attributes stay "no such attribute".
    assert_eq!(
        rustix::fs::lgetxattr(m.m("plain").as_path(), "user.none", &mut buf),
        Err(rustix::io::Errno::NODATA)
    );
}

#[test]
fn a_new_file_in_a_directory_with_a_default_acl_inherits_it() {
    let m = Mounted::with_source(&[], |src| fs::create_dir(src.join("shared")).unwrap());
    // setfacl -d -m u:nobody:rwx shared: default ACL entries, mask rwx.
    let mut default = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (0x01u16, 7u16, u32::MAX),
        (0x02, 7, 65534),
        (0x04, 5, u32::MAX),
        (0x10, 7, u32::MAX),
        (0x20, 5, u32::MAX),
    ] {
        default.extend(tag.to_le_bytes());
        default.extend(perm.to_le_bytes());
        default.extend(id.to_le_bytes());
    }
    rustix::fs::setxattr(
        m.s("shared").as_path(),
        "system.posix_acl_default",
        &default,
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::write(m.m("shared/f"), b"x").unwrap();
    let mut buf = [0u8; 256];
    let n = rustix::fs::getxattr(
        m.s("shared/f").as_path(),
        "system.posix_acl_access",
        &mut buf,
    )
    .expect("the new file got an access ACL from the default ACL");
    assert!(n > 4);
    // The umask is not applied over a default ACL: nobody's rw- survives (mask rw-).
    as_nobody_ok(&format!("echo more >> {}", m.m("shared/f").display()));
    assert_eq!(fs::metadata(m.s("shared/f")).unwrap().mode() & 0o070, 0o060);
}

/// A listing the kernel began from its directory cache and must finish by
/// asking the daemon (here: the cache is dropped midway because the source
/// changed) still returns every name, on every layer.
#[test]
fn a_listing_resumed_after_the_kernel_cache_is_dropped_is_complete() {
    const N: usize = 5000;
    let fill = |dir: &std::path::Path| {
        for i in 0..N {
            fs::write(dir.join(format!("f{i:05}")), b"").unwrap();
        }
    };
    let single = Mounted::with_source(&[], fill);
    let union = Mounted::build_source(&[], &[], |dir| {
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        fill(&a);
        format!("{}:{}", a.display(), b.display())
    });
    for (m, src) in [
        (&single, single.src.clone()),
        (&union, union.dir.path().join("a")),
    ] {
        // A full listing fills the kernel's cache of the directory.
        assert_eq!(fs::read_dir(&m.mnt).unwrap().count(), N);
        // A second handle starts from that cache (the daemon never sees offset 0)...
        let mut it = fs::read_dir(&m.mnt).unwrap();
        let mut seen = 1;
        it.next().unwrap().unwrap();
        // ...until an outside change drops the cache and the kernel asks the daemon.
        fs::write(src.join("outside"), b"").unwrap();
        std::thread::sleep(Duration::from_millis(300));
        seen += it.count();
        assert!(
            seen >= N,
            "the listing stopped after {seen} of {N} names\n{}",
            m.log()
        );
    }
}

/// A file deleted behind the mount's back (the watch off, so the kernel
/// keeps its node) whose inode number the host then gives to a new file:
/// the mount serves the new file as a new object, not through the old
/// file's handle, and under an id of its own while the kernel holds the old
/// one (the kernel would take the new file for the dead one).
#[test]
fn a_reused_inode_number_is_a_new_object() {
    let m = Mounted::with_source(&["watch=false"], |src| {
        fs::write(src.join("old"), b"old").unwrap();
    });
    let old_ino = fs::metadata(m.s("old")).unwrap().ino();
    assert_eq!(fs::metadata(m.m("old")).unwrap().ino(), old_ino);
    fs::remove_file(m.s("old")).unwrap();
    // ext4 and xfs soon hand a freed number out again: find the file that got it.
    let reused = (0..1000).find_map(|i| {
        let name = format!("new{i}");
        fs::write(m.s(&name), b"new").unwrap();
        (fs::metadata(m.s(&name)).unwrap().ino() == old_ino).then_some(name)
    });
    let Some(name) = reused else {
        eprintln!("the scratch filesystem did not reuse the inode number: nothing to check");
        return;
    };
    let via = m.m(&name);
    // (Its st_ino is a fresh one while the kernel holds the old file, the
    // host's once the kernel forgot it, as after a drop_caches.)
    fs::metadata(&via).unwrap();
    fs::set_permissions(&via, fs::Permissions::from_mode(0o600))
        .unwrap_or_else(|e| panic!("chmod of the new file through the mount: {e}"));
    assert_eq!(fs::metadata(m.s(&name)).unwrap().mode() & 0o777, 0o600);
    assert_eq!(fs::read(&via).unwrap(), b"new");
}

/// (mtime, ctime, size) of `p` by stat(2), as `make` and `ls -l` ask.
/// (`fs::metadata` asks statx for the birth time too, which the kernel
/// never has cached for a FUSE file: it always reaches the daemon.)
fn times(p: &std::path::Path) -> (i64, i64, i64, i64, i64) {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: a NUL-terminated path and a stat buffer to fill.
    let rc = unsafe { libc::stat(path.as_ptr(), st.as_mut_ptr()) };
    assert_eq!(
        rc,
        0,
        "stat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: stat succeeded and filled the buffer.
    let st = unsafe { st.assume_init() };
    (
        st.st_mtime,
        st.st_mtime_nsec,
        st.st_ctime,
        st.st_ctime_nsec,
        st.st_size,
    )
}

/// Writes through a passthrough handle of `name` (created through the
/// mount) in each way the kernel does not report to the daemon, and checks
/// that `stat` through the mount shows the host's new times and size within
/// a second, while the file is open and after it is closed. `host` finds the
/// file on the host. `watched`: the host watch covers the file, which a
/// mapping that outlives its descriptor needs.
fn check_times_after_passthrough_writes(
    m: &Mounted,
    watched: bool,
    host: impl Fn(&str) -> std::path::PathBuf,
) {
    use std::os::unix::fs::FileExt;
    const SHOWS: Duration = Duration::from_secs(1);
    let mapped_write = |f: &fs::File| {
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared mapping of 8 KiB of an 8 KiB file, written
        // and unmapped here.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
            p
        }
    };
    let store_sync_unmap = |p: *mut libc::c_void| {
        // SAFETY: `p` is the live 8 KiB mapping made by `mapped_write`.
        unsafe {
            *(p as *mut u8).add(100) = b'm';
            assert_eq!(libc::msync(p, 8192, libc::MS_SYNC), 0);
            assert_eq!(libc::munmap(p, 8192), 0);
        }
    };
    let ways: &[&str] = if watched {
        &["write", "mmap", "mmap-after-close", "ftruncate"]
    } else {
        &["write", "mmap", "ftruncate"]
    };
    for &how in ways {
        fs::write(m.m(how), vec![b'a'; 8192]).unwrap();
    }
    // Let the watch deliver what it saw of these writes: a late
    // invalidation would hide stale times.
    std::thread::sleep(Duration::from_millis(300));
    for &how in ways {
        let p = m.m(how);
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        assert!(
            m.stats()["passthrough_inodes"].as_u64().unwrap() >= 1,
            "{how}: not a passthrough handle: {}",
            m.stats()
        );
        // Mapped before the times are looked at (mapping marks the atime
        // stale, which would make the next stat ask the daemon).
        let map = how.starts_with("mmap").then(|| mapped_write(&f));
        let f = (how != "mmap-after-close").then_some(f);
        let before = times(&p);
        // Past the host clock's granularity, so the times differ.
        std::thread::sleep(Duration::from_millis(20));
        match (how, &f, map) {
            (_, _, Some(map)) => store_sync_unmap(map),
            ("write", Some(f), _) => f.write_all_at(b"w", 10).unwrap(),
            (_, Some(f), _) => f.set_len(100).unwrap(),
            _ => unreachable!(),
        }
        let h = host(how);
        assert_ne!(times(&h), before, "{how}: the host file did not change");
        let check = |when: &str| {
            let fresh = wait_until(SHOWS, || times(&p) == times(&h));
            assert!(
                fresh,
                "{how} ({when}): the mount shows {:?}, the host {:?}",
                times(&p),
                times(&h)
            );
        };
        if f.is_some() {
            check("file still open");
        }
        drop(f);
        check("file closed");
    }
}

#[test]
fn times_follow_writes_through_passthrough_handles() {
    let m = Mounted::new(&[]);
    check_times_after_passthrough_writes(&m, true, |name| m.s(name));
}

/// An overlay whose lower holds `lower_files`.
fn overlay_with(lower_files: &[&str]) -> Mounted {
    Mounted::overlay(&[], |src| {
        for name in lower_files {
            fs::write(src.join(name), b"lower").unwrap();
        }
    })
}

#[test]
fn times_follow_writes_through_passthrough_handles_in_the_overlay() {
    let m = overlay_with(&[]);
    let upper = m.upper();
    check_times_after_passthrough_writes(&m, true, |name| upper.join(name));
}

/// The same for files copied up from the lower (their node is keyed by
/// the lower object, not by the upper one the kernel writes).
#[test]
fn times_follow_writes_through_passthrough_handles_of_copied_up_files() {
    let m = overlay_with(&["write", "mmap", "mmap-after-close", "ftruncate"]);
    for name in ["write", "mmap", "mmap-after-close", "ftruncate"] {
        assert_eq!(fs::read(m.m(name)).unwrap(), b"lower");
    }
    let upper = m.upper();
    check_times_after_passthrough_writes(&m, true, |name| upper.join(name));
}

#[test]
fn times_follow_writes_through_passthrough_handles_in_a_union() {
    let m = Mounted::build_source(&[], &[], |dir| {
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        format!("{}:{}", a.display(), b.display())
    });
    let dir = m.dir.path().to_path_buf();
    check_times_after_passthrough_writes(&m, true, |name| {
        let a = dir.join("a").join(name);
        if a.exists() {
            a
        } else {
            dir.join("b").join(name)
        }
    });
}
