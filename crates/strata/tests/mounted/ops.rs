//! Every operation, checked from a user's side through a real mount.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::common::*;

#[test]
fn files_are_read_written_and_appear_in_the_source() {
    let m = Mounted::new(&[]);
    fs::write(m.m("a.txt"), b"hello").unwrap();
    assert_eq!(fs::read(m.s("a.txt")).unwrap(), b"hello");
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(m.m("a.txt"))
        .unwrap();
    f.write_all(b" world").unwrap();
    drop(f);
    assert_eq!(fs::read_to_string(m.m("a.txt")).unwrap(), "hello world");
    // pread at an offset, and overwrite in the middle
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(m.m("a.txt"))
        .unwrap();
    f.seek(SeekFrom::Start(6)).unwrap();
    f.write_all(b"WORLD").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello WORLD");
    f.sync_all().unwrap();
    f.sync_data().unwrap();
    // changes made on the host show through
    fs::write(m.s("host.txt"), b"from host").unwrap();
    assert_eq!(fs::read(m.m("host.txt")).unwrap(), b"from host");
}

#[test]
fn large_file_roundtrip_is_byte_exact() {
    let m = Mounted::new(&[]);
    let data: Vec<u8> = (0..(3 << 20) + 12345)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(m.m("big"), &data).unwrap();
    assert_eq!(fs::read(m.s("big")).unwrap(), data);
    drop_caches();
    assert_eq!(fs::read(m.m("big")).unwrap(), data);
}

#[test]
fn directories_links_symlinks_and_renames() {
    let m = Mounted::new(&[]);
    fs::create_dir_all(m.m("d1/d2")).unwrap();
    assert!(m.s("d1/d2").is_dir());
    fs::write(m.m("d1/f"), b"x").unwrap();
    // hard link: same inode, link count 2
    fs::hard_link(m.m("d1/f"), m.m("d1/g")).unwrap();
    let (a, b) = (
        fs::metadata(m.m("d1/f")).unwrap(),
        fs::metadata(m.m("d1/g")).unwrap(),
    );
    assert_eq!(a.ino(), b.ino());
    assert_eq!(a.nlink(), 2);
    // symlink and readlink
    std::os::unix::fs::symlink("d1/f", m.m("sl")).unwrap();
    assert_eq!(fs::read_link(m.m("sl")).unwrap().to_str(), Some("d1/f"));
    assert!(
        fs::symlink_metadata(m.s("sl"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(fs::read(m.m("sl")).unwrap(), b"x");
    // rename file across directories, rename a directory
    fs::rename(m.m("d1/g"), m.m("d1/d2/g2")).unwrap();
    assert!(m.s("d1/d2/g2").exists() && !m.s("d1/g").exists());
    fs::rename(m.m("d1/d2"), m.m("d3")).unwrap();
    assert!(m.s("d3/g2").exists());
    // listing
    let mut names: Vec<_> = fs::read_dir(m.m("d1"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["f"]);
    // removal
    assert_eq!(
        fs::remove_dir(m.m("d1")).unwrap_err().raw_os_error(),
        Some(libc::ENOTEMPTY)
    );
    fs::remove_file(m.m("d1/f")).unwrap();
    fs::remove_dir(m.m("d1")).unwrap();
    assert!(!m.s("d1").exists());
}

#[test]
fn rename_noreplace_and_exchange() {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    let m = Mounted::new(&[]);
    fs::write(m.m("a"), b"A").unwrap();
    fs::write(m.m("b"), b"B").unwrap();
    let err = renameat_with(CWD, m.m("a"), CWD, m.m("b"), RenameFlags::NOREPLACE).unwrap_err();
    assert_eq!(err, rustix::io::Errno::EXIST);
    renameat_with(CWD, m.m("a"), CWD, m.m("b"), RenameFlags::EXCHANGE).unwrap();
    assert_eq!(fs::read(m.m("a")).unwrap(), b"B");
    assert_eq!(fs::read(m.s("b")).unwrap(), b"A");
}

#[test]
fn setattr_mode_size_owner_and_times() {
    let m = Mounted::new(&[]);
    fs::write(m.m("f"), b"0123456789").unwrap();
    fs::set_permissions(m.m("f"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(m.s("f")).unwrap().mode() & 0o7777, 0o640);
    fs::OpenOptions::new()
        .write(true)
        .open(m.m("f"))
        .unwrap()
        .set_len(4)
        .unwrap();
    assert_eq!(fs::read(m.s("f")).unwrap(), b"0123");
    rustix::fs::chown(
        m.m("f"),
        Some(rustix::fs::Uid::from_raw(65534)),
        Some(rustix::fs::Gid::from_raw(65534)),
    )
    .unwrap();
    let md = fs::metadata(m.s("f")).unwrap();
    assert_eq!((md.uid(), md.gid()), (65534, 65534));
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    let f = fs::File::options().write(true).open(m.m("f")).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(t)).unwrap();
    assert_eq!(fs::metadata(m.s("f")).unwrap().mtime(), 1_000_000_000);
    // UTIME_OMIT for atime kept the old atime; UTIME_NOW works through utimensat
    let ts = rustix::fs::Timestamps {
        last_access: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        last_modification: rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
    };
    rustix::fs::utimensat(rustix::fs::CWD, m.m("f"), &ts, rustix::fs::AtFlags::empty()).unwrap();
    let md = fs::metadata(m.s("f")).unwrap();
    assert_eq!(md.mtime(), 1_000_000_000);
    assert!(md.atime() > 1_600_000_000);
}

#[test]
fn special_files_and_xattrs() {
    let m = Mounted::new(&[]);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        m.m("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    assert!(fs::metadata(m.s("fifo")).unwrap().file_type().is_fifo());
    rustix::fs::mknodat(
        rustix::fs::CWD,
        m.m("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    let md = fs::metadata(m.m("null")).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(md.rdev(), rustix::fs::makedev(1, 3));
    let sock = std::os::unix::net::UnixListener::bind(m.m("sock")).unwrap();
    assert!(fs::metadata(m.s("sock")).unwrap().file_type().is_socket());
    drop(sock);

    fs::write(m.m("x"), b"").unwrap();
    rustix::fs::setxattr(
        m.m("x"),
        "user.color",
        b"blue",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let n = rustix::fs::getxattr(m.s("x"), "user.color", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"blue");
    let n = rustix::fs::listxattr(m.m("x"), &mut buf[..]).unwrap();
    assert!(buf[..n].split(|&b| b == 0).any(|k| k == b"user.color"));
    assert_eq!(
        rustix::fs::getxattr_query(m.m("x"), "user.color").unwrap(),
        4
    );
    let mut small = [0u8; 2];
    assert_eq!(
        rustix::fs::getxattr(m.m("x"), "user.color", &mut small[..]).unwrap_err(),
        rustix::io::Errno::RANGE
    );
    rustix::fs::removexattr(m.m("x"), "user.color").unwrap();
    assert_eq!(
        rustix::fs::getxattr(m.m("x"), "user.color", &mut buf[..]).unwrap_err(),
        rustix::io::Errno::NODATA
    );
}

#[test]
fn fallocate_seek_data_hole_and_copy_file_range() {
    let m = Mounted::new(&[]);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.m("sparse"))
        .unwrap();
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, 8192).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 8192);
    rustix::io::pwrite(&f, &[7u8; 4096], 0).unwrap();
    f.set_len(1 << 20).unwrap();
    rustix::io::pwrite(&f, b"data", 512 << 10).unwrap();
    f.sync_all().unwrap();
    let data = rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(16384)).unwrap();
    assert!((16384..=512 << 10).contains(&data), "SEEK_DATA gave {data}");
    let hole = rustix::fs::seek(&f, rustix::fs::SeekFrom::Hole(0)).unwrap();
    assert!((4096..512 << 10).contains(&hole), "SEEK_HOLE gave {hole}");

    fs::write(m.m("from"), b"copy me please").unwrap();
    let src = fs::File::open(m.m("from")).unwrap();
    let dst = fs::File::create(m.m("to")).unwrap();
    let (mut i, mut o) = (5u64, 0u64);
    let n = rustix::fs::copy_file_range(&src, Some(&mut i), &dst, Some(&mut o), 9).unwrap();
    assert_eq!(n, 9);
    assert_eq!(fs::read(m.s("to")).unwrap(), b"me please");
}

#[test]
fn mmap_shared_writes_reach_the_file() {
    let m = Mounted::new(&[]);
    fs::write(m.m("mm"), vec![0u8; 8192]).unwrap();
    let script = format!(
        "import mmap\nf=open('{}','r+b')\nmm=mmap.mmap(f.fileno(),8192)\nmm[100:105]=b'mmap!'\nmm.flush()\nmm.close()\nf.close()\n",
        m.m("mm").display()
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(&fs::read(m.s("mm")).unwrap()[100..105], b"mmap!");
}

#[test]
fn locks_conflict_between_processes() {
    let m = Mounted::new(&[]);
    fs::write(m.m("lock"), b"").unwrap();
    let f = fs::File::open(m.m("lock")).unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let p = m.m("lock");
    let out = Command::new("flock")
        .args(["-n", p.to_str().unwrap(), "true"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "second flock must fail while the first holds it"
    );
    rustix::fs::flock(&f, rustix::fs::FlockOperation::Unlock).unwrap();
    let out = Command::new("flock")
        .args(["-n", p.to_str().unwrap(), "true"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[test]
fn statfs_reports_the_source_filesystem() {
    let m = Mounted::new(&[]);
    let a = rustix::fs::statvfs(&m.mnt).unwrap();
    let b = rustix::fs::statvfs(&m.src).unwrap();
    assert_eq!(a.f_blocks, b.f_blocks);
    assert_eq!(a.f_bsize, b.f_bsize);
}

#[test]
fn inode_numbers_are_the_hosts_and_stable() {
    let m = Mounted::new(&[]);
    fs::create_dir(m.s("d")).unwrap();
    fs::write(m.s("d/f"), b"x").unwrap();
    let host = fs::metadata(m.s("d/f")).unwrap().ino();
    let first = fs::metadata(m.m("d/f")).unwrap().ino();
    assert_eq!(first, host);
    drop_caches();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(fs::metadata(m.m("d/f")).unwrap().ino(), first);
    // readdir reports the same numbers as stat
    let e = fs::read_dir(m.m("d")).unwrap().next().unwrap().unwrap();
    assert_eq!(std::os::unix::fs::DirEntryExt::ino(&e), first);
    assert_eq!(fs::metadata(&m.mnt).unwrap().ino(), 1);
}

#[test]
fn permissions_are_enforced_for_other_users_and_new_files_are_theirs() {
    let m = Mounted::new(&[]);
    fs::write(m.m("root-only"), b"secret").unwrap();
    fs::set_permissions(m.m("root-only"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::create_dir(m.m("open")).unwrap();
    fs::set_permissions(m.m("open"), fs::Permissions::from_mode(0o777)).unwrap();
    fs::create_dir(m.m("closed")).unwrap();
    fs::set_permissions(m.m("closed"), fs::Permissions::from_mode(0o755)).unwrap();

    let out = as_nobody(&format!("cat {}", m.m("root-only").display()));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    let out = as_nobody(&format!("touch {}/x", m.m("closed").display()));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    assert!(!m.s("closed/x").exists());

    as_nobody_ok(&format!(
        "mkdir {0}/sub && echo hi > {0}/sub/mine && ln -s mine {0}/sub/ln",
        m.m("open").display()
    ));
    for p in ["open/sub", "open/sub/mine", "open/sub/ln"] {
        let md = fs::symlink_metadata(m.s(p)).unwrap();
        assert_eq!(
            (md.uid(), md.gid()),
            (65534, 65534),
            "{p} must belong to its creator"
        );
    }
    // a non-owner cannot chmod or chown
    let out = as_nobody(&format!("chmod 777 {}", m.m("root-only").display()));
    assert!(!out.status.success());
    let out = as_nobody(&format!("chown 65534 {}", m.m("closed").display()));
    assert!(!out.status.success());
    assert_eq!(fs::metadata(m.s("closed")).unwrap().uid(), 0);
}

#[test]
fn setgid_directories_pass_their_group_on() {
    let m = Mounted::new(&[]);
    fs::create_dir(m.m("shared")).unwrap();
    rustix::fs::chown(m.m("shared"), None, Some(rustix::fs::Gid::from_raw(4242))).unwrap();
    fs::set_permissions(m.m("shared"), fs::Permissions::from_mode(0o2777)).unwrap();
    as_nobody_ok(&format!(
        "touch {0}/f && mkdir {0}/d",
        m.m("shared").display()
    ));
    assert_eq!(fs::metadata(m.s("shared/f")).unwrap().gid(), 4242);
    let d = fs::metadata(m.s("shared/d")).unwrap();
    assert_eq!((d.uid(), d.gid()), (65534, 4242));
    assert!(d.mode() & 0o2000 != 0, "subdirectory keeps setgid");
}

#[test]
fn operations_on_symlinks_never_touch_their_targets() {
    let outside = scratch_dir();
    fs::write(outside.path().join("target"), b"outside").unwrap();
    let target = outside.path().join("target");
    let m = Mounted::with_source(&[], |src| {
        std::os::unix::fs::symlink(&target, src.join("esc")).unwrap();
        std::os::unix::fs::symlink("..", src.join("up")).unwrap();
    });
    // lchown, rename, hard link and unlink act on the link itself
    rustix::fs::chownat(
        rustix::fs::CWD,
        m.m("esc"),
        Some(rustix::fs::Uid::from_raw(65534)),
        None,
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
    assert_eq!(fs::metadata(&target).unwrap().uid(), 0);
    assert_eq!(fs::symlink_metadata(m.s("esc")).unwrap().uid(), 65534);
    fs::rename(m.m("esc"), m.m("esc2")).unwrap();
    fs::hard_link(m.m("esc2"), m.m("esc3")).unwrap();
    assert!(
        fs::symlink_metadata(m.s("esc3"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    fs::remove_file(m.m("esc2")).unwrap();
    fs::remove_file(m.m("esc3")).unwrap();
    assert_eq!(fs::read(&target).unwrap(), b"outside");
    // a `..` symlink at the root resolves like on the host: the kernel follows it
    // from the mountpoint, so it names the mount's parent, never the source's.
    let up = fs::canonicalize(m.m("up")).unwrap();
    assert_eq!(up, m.mnt.parent().unwrap());
}

#[test]
fn writes_by_other_users_clear_setuid_and_setgid_as_the_kernel_does() {
    for opts in [&[][..], &["passthrough=false"][..]] {
        let m = Mounted::new(opts);
        // group-executable: both bits go; root (CAP_FSETID) keeps them
        let modes = modes_after_unprivileged_writes(&m.mnt, |n| m.s(n), 0o6777);
        assert_eq!(modes, [0o777, 0o777, 0o777, 0o6777], "{opts:?}");
        // not group-executable, and nobody is not in the file's group: both go
        let modes = modes_after_unprivileged_writes(&m.mnt, |n| m.s(n), 0o6766);
        assert_eq!(modes, [0o766, 0o766, 0o766, 0o6766], "{opts:?}");
    }
}

/// A user swapping a directory of the source for a symlink (RENAME_EXCHANGE,
/// thousands of times) while root creates, makes directories, links,
/// renames and symlinks inside it through the mount: every syscall of the
/// daemon is `*at()` on a descriptor of the directory as it was looked up,
/// with no symlink followed, so nothing is ever made where the link points
/// from the source. The link is relative and the source sits one level
/// deeper than the mountpoint: followed by the caller's kernel (as on the
/// host) it leads to `SCRATCH/out`, followed by the daemon it would lead to
/// `SCRATCH/a/out`, which must stay empty. A single directory and a union.
#[test]
fn swapping_a_directory_for_a_symlink_never_leads_writes_outside() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let source = |dir: &std::path::Path, second: bool| {
        let src = dir.join("a/src");
        fs::create_dir_all(src.join("d")).unwrap();
        fs::create_dir_all(dir.join("a/out")).unwrap();
        fs::create_dir_all(dir.join("out")).unwrap();
        std::os::unix::fs::symlink("../out", src.join("swap")).unwrap();
        if !second {
            return src.display().to_string();
        }
        let b = dir.join("b");
        fs::create_dir(&b).unwrap();
        format!("{}:{}", src.display(), b.display())
    };
    let single = Mounted::build_source(&[], &[], |dir| source(dir, false));
    let union = Mounted::build_source(&[], &[], |dir| source(dir, true));
    for m in [&single, &union] {
        let src = m.dir.path().join("a/src");
        let stop = AtomicBool::new(false);
        let swaps = std::thread::scope(|s| {
            let swapper = s.spawn(|| {
                let mut n = 0u64;
                let deadline = std::time::Instant::now() + Duration::from_secs(2);
                while std::time::Instant::now() < deadline {
                    rustix::fs::renameat_with(
                        rustix::fs::CWD,
                        src.join("d"),
                        rustix::fs::CWD,
                        src.join("swap"),
                        rustix::fs::RenameFlags::EXCHANGE,
                    )
                    .unwrap();
                    n += 1;
                }
                stop.store(true, Ordering::Relaxed);
                n
            });
            for t in 0..2 {
                let (m, stop) = (m, &stop);
                s.spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let f = m.m(&format!("d/f{t}-{i}"));
                        let _ = fs::write(&f, b"x");
                        let _ = fs::create_dir(m.m(&format!("d/dir{t}-{i}")));
                        let _ = fs::hard_link(&f, m.m(&format!("d/l{t}-{i}")));
                        let _ = fs::rename(&f, m.m(&format!("d/r{t}-{i}")));
                        let _ = std::os::unix::fs::symlink("t", m.m(&format!("d/s{t}-{i}")));
                        i += 1;
                    }
                });
            }
            swapper.join().unwrap()
        });
        assert!(swaps > 1000, "only {swaps} swaps");
        let leaked: Vec<_> = fs::read_dir(m.dir.path().join("a/out"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(leaked.is_empty(), "{swaps} swaps, made outside: {leaked:?}");
        // The creates did happen, in the directory wherever it was.
        let made = fs::read_dir(src.join("d")).unwrap().count()
            + fs::read_dir(src.join("swap")).unwrap().count();
        assert!(made > 10, "only {made} objects made");
    }
}
