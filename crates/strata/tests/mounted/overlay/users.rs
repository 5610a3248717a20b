//! Other users: changes to lower files as their permissions allow (and no
//! copy-up for a refused one), and setuid/setgid cleared by their writes.

use super::*;

#[test]
fn another_user_changes_lower_files_as_their_permissions_allow() {
    let m = overlay(|src| {
        fs::create_dir_all(src.join("root_dir/users")).unwrap();
        chmod(&src.join("root_dir"), 0o755);
        std::os::unix::fs::chown(src.join("root_dir/users"), Some(65534), Some(65534)).unwrap();
        write(&src.join("root_dir/users/theirs"), b"theirs");
        std::os::unix::fs::chown(src.join("root_dir/users/theirs"), Some(65534), Some(65534))
            .unwrap();
        write(&src.join("root_dir/roots"), b"root's");
        chmod(&src.join("root_dir/roots"), 0o644);
    });
    let d = m.m("root_dir");
    as_nobody_ok(&format!("echo more >> {}/users/theirs", d.display()));
    as_nobody_ok(&format!("echo new > {}/users/new", d.display()));
    as_nobody_ok(&format!(
        "rm {}/users/theirs.none 2>/dev/null; true",
        d.display()
    ));
    assert_eq!(read(&m.m("root_dir/users/theirs")), "theirsmore\n");
    let u = lstat(&up(&m, "root_dir/users/theirs"));
    assert_eq!((u.uid(), u.gid()), (65534, 65534));
    let n = lstat(&up(&m, "root_dir/users/new"));
    assert_eq!((n.uid(), n.gid()), (65534, 65534));
    let ud = lstat(&up(&m, "root_dir"));
    assert_eq!((ud.uid(), ud.mode() & 0o7777), (0, 0o755));
    // Refused by permissions: no copy-up happens.
    let out = as_nobody(&format!("echo no >> {}/roots", d.display()));
    assert!(!out.status.success());
    let out = as_nobody(&format!("rm -f {}/roots", d.display()));
    assert!(!out.status.success());
    let out = as_nobody(&format!("chmod 777 {}/roots", d.display()));
    assert!(!out.status.success());
    assert!(
        !exists(&up(&m, "root_dir/roots")),
        "a refused change copied the file up"
    );
    assert_eq!(read(&m.m("root_dir/roots")), "root's");
    // Unlinking their own lower file in their directory works.
    as_nobody_ok(&format!("rm {}/users/theirs", d.display()));
    assert!(is_whiteout(&up(&m, "root_dir/users/theirs")));
}

#[test]
fn writes_by_other_users_clear_setuid_and_setgid_on_the_copy() {
    let m = overlay(|_| {});
    let modes = modes_after_unprivileged_writes(&m.mnt, |n| up(&m, n), 0o6777);
    assert_eq!(modes, [0o777, 0o777, 0o777, 0o6777]);
    // lower files: the copy-up keeps the bits, the write clears them
    let m = overlay(|src| {
        for n in ["su-write", "su-trunc", "su-otrunc"] {
            fs::write(src.join(n), b"data").unwrap();
            fs::set_permissions(src.join(n), fs::Permissions::from_mode(0o6777)).unwrap();
        }
    });
    as_nobody_ok(&format!(
        "echo more >> {0}/su-write && truncate -s 1 {0}/su-trunc && echo new > {0}/su-otrunc",
        m.mnt.display()
    ));
    for n in ["su-write", "su-trunc", "su-otrunc"] {
        assert_eq!(
            fs::metadata(up(&m, n)).unwrap().mode() & 0o7777,
            0o777,
            "{n}"
        );
        assert_eq!(
            fs::metadata(m.s(n)).unwrap().mode() & 0o7777,
            0o6777,
            "{n}: lower untouched"
        );
    }
}
