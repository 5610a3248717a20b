//! Symlinks, FIFOs and devices: copied up as what they are, and a 0/0
//! character device made through the mount kept apart from a whiteout.

use super::*;
use rustix::fs::{FileType, Mode};

#[test]
fn symlinks_fifos_and_devices() {
    let mut m = overlay(|src| {
        write(&src.join("target"), b"T");
        std::os::unix::fs::symlink("target", src.join("lowlink")).unwrap();
        std::os::unix::fs::lchown(src.join("lowlink"), Some(7), Some(8)).unwrap();
        rustix::fs::mknodat(
            CWD,
            src.join("lowfifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o640),
            0,
        )
        .unwrap();
        rustix::fs::mknodat(
            CWD,
            src.join("lownull"),
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .unwrap();
    });
    // Lower symlink.
    assert_eq!(fs::read_link(m.m("lowlink")).unwrap(), Path::new("target"));
    assert_eq!(read(&m.m("lowlink")), "T");
    let l = lstat(&m.m("lowlink"));
    assert!(l.file_type().is_symlink());
    assert_eq!((l.uid(), l.gid()), (7, 8));
    // Copy-up of a symlink (by chown) keeps it a symlink with its target.
    std::os::unix::fs::lchown(m.m("lowlink"), Some(9), Some(10)).unwrap();
    assert_eq!(
        fs::read_link(up(&m, "lowlink")).unwrap(),
        Path::new("target")
    );
    assert_eq!(
        (
            lstat(&up(&m, "lowlink")).uid(),
            lstat(&up(&m, "lowlink")).gid()
        ),
        (9, 10)
    );
    assert_eq!(fs::read_link(m.m("lowlink")).unwrap(), Path::new("target"));
    // New symlink.
    std::os::unix::fs::symlink("../elsewhere/x", m.m("newlink")).unwrap();
    assert_eq!(
        fs::read_link(m.m("newlink")).unwrap(),
        Path::new("../elsewhere/x")
    );
    assert_eq!(
        fs::read_link(up(&m, "newlink")).unwrap(),
        Path::new("../elsewhere/x")
    );
    assert_eq!(errno(fs::metadata(m.m("newlink"))), libc::ENOENT);

    // FIFOs.
    assert!(lstat(&m.m("lowfifo")).file_type().is_fifo());
    chmod(&m.m("lowfifo"), 0o600);
    let u = lstat(&up(&m, "lowfifo"));
    assert!(
        u.file_type().is_fifo(),
        "copy-up of a fifo is {:?}",
        u.file_type()
    );
    assert_eq!(u.mode() & 0o7777, 0o600);
    rustix::fs::mknodat(
        CWD,
        m.m("newfifo"),
        FileType::Fifo,
        Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    assert!(lstat(&m.m("newfifo")).file_type().is_fifo());
    assert!(lstat(&up(&m, "newfifo")).file_type().is_fifo());

    // Devices.
    let d = lstat(&m.m("lownull"));
    assert!(d.file_type().is_char_device());
    assert_eq!(d.rdev(), rustix::fs::makedev(1, 3));
    rustix::fs::mknodat(
        CWD,
        m.m("null2"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o644),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    let d = lstat(&m.m("null2"));
    assert!(d.file_type().is_char_device());
    assert_eq!(d.rdev(), rustix::fs::makedev(1, 3));
    assert_eq!(lstat(&up(&m, "null2")).rdev(), rustix::fs::makedev(1, 3));
    std::os::unix::fs::chown(m.m("lownull"), Some(5), Some(5)).unwrap();
    let u = lstat(&up(&m, "lownull"));
    assert!(u.file_type().is_char_device());
    assert_eq!((u.rdev(), u.uid()), (rustix::fs::makedev(1, 3), 5));

    // A 0/0 character device made through the mount is a device, not a
    // whiteout: it shows, in listings too, and can be removed.
    rustix::fs::mknodat(
        CWD,
        m.m("zero"),
        FileType::CharacterDevice,
        Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let z = lstat(&m.m("zero"));
    assert!(z.file_type().is_char_device());
    assert_eq!((z.rdev(), z.mode() & 0o7777), (0, 0o600));
    assert!(names(&m.mnt).contains(&"zero".to_owned()));
    assert!(exists(&up(&m, "zero")));
    // Still a device for a new daemon.
    m.unmount();
    let m2 = remount(&m);
    let z = lstat(&m2.m("zero"));
    assert!(
        z.file_type().is_char_device(),
        "0/0 device after remount: {:?}",
        z.file_type()
    );
    assert_eq!(z.rdev(), 0);
    fs::remove_file(m2.m("zero")).unwrap();
    assert_eq!(errno(fs::symlink_metadata(m2.m("zero"))), libc::ENOENT);
    assert!(
        !exists(&up(&m, "zero")),
        "removing an upper-only device left {:?}",
        lstat(&up(&m, "zero")).file_type()
    );

    assert_eq!(
        names(&m2.mnt),
        [
            "lowfifo", "lowlink", "lownull", "newfifo", "newlink", "null2", "target"
        ]
    );
    assert_no_temporaries(&m);
}
