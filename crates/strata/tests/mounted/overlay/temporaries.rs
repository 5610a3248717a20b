//! strata's temporaries in the upper: one a crash left behind does not keep
//! its directory from going, and user files named like them are files.

use super::*;

/// A daemon killed in the middle of a copy-up leaves its temporary in the
/// upper. The next mount must not let it make a directory unremovable (an
/// empty listing, and rmdir saying ENOTEMPTY).
#[test]
fn a_temporary_left_by_a_crash_does_not_make_its_directory_unremovable() {
    let m = Mounted::build_with(&[], &[], |dir| {
        let (src, upper) = (dir.join("src"), dir.join("upper"));
        fs::create_dir_all(src.join("d")).unwrap();
        write(&src.join("d/f"), b"f");
        fs::create_dir_all(upper.join("d")).unwrap();
        fs::create_dir_all(upper.join("upper_only")).unwrap();
        for d in ["d", "upper_only"] {
            // What a crash mid-copy-up leaves: a temporary strata marked as its own.
            let tmp = upper.join(d).join(".strata-tmp.4242.7");
            write(&tmp, b"half a copy");
            rustix::fs::setxattr(
                &tmp,
                "trusted.strata.tmp",
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .unwrap();
        }
        (
            src.display().to_string(),
            vec![format!("upper={}", upper.display())],
        )
    });
    assert_eq!(names(&m.m("d")), ["f"]);
    assert!(names(&m.m("upper_only")).is_empty());
    let rm = run(Command::new("rm")
        .arg("-rf")
        .arg(m.m("d"))
        .arg(m.m("upper_only")));
    assert!(
        rm.status.success(),
        "rm -rf of directories holding a stale temporary: {}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert!(names(&m.mnt).is_empty());
}

#[test]
fn odd_names_copy_up_and_list() {
    use std::os::unix::ffi::OsStrExt;
    let odd: Vec<&std::ffi::OsStr> = vec![
        std::ffi::OsStr::from_bytes(b"new\nline"),
        std::ffi::OsStr::from_bytes(b"latin1 \xe9t\xe9"),
        std::ffi::OsStr::from_bytes(b" leading space"),
        std::ffi::OsStr::from_bytes(b".strata-tmp-lookalike"),
        std::ffi::OsStr::from_bytes(b".strata-tmp.1.2"),
        std::ffi::OsStr::from_bytes(&[b'x'; 255]),
    ];
    let names_in = odd.clone();
    let m = overlay(move |src| {
        for n in &names_in {
            fs::write(src.join(n), n.as_bytes()).unwrap();
        }
    });
    for n in &odd {
        let p = m.mnt.join(n);
        let mut f = fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"+").unwrap();
        drop(f);
        let mut want = n.as_bytes().to_vec();
        want.push(b'+');
        assert_eq!(fs::read(&p).unwrap(), want, "{n:?}");
    }
    // Also one made through the mount.
    fs::write(m.m(".strata-tmp.mine"), b"mine").unwrap();
    let mut listed: Vec<String> = fs::read_dir(&m.mnt)
        .unwrap()
        .map(|e| String::from_utf8_lossy(e.unwrap().file_name().as_bytes()).into_owned())
        .collect();
    listed.sort();
    let mut want: Vec<String> = odd
        .iter()
        .map(|n| String::from_utf8_lossy(n.as_bytes()).into_owned())
        .chain([".strata-tmp.mine".to_owned()])
        .collect();
    want.sort();
    assert_eq!(
        listed, want,
        "user files whose names look like strata's temporaries must be listed"
    );
}
