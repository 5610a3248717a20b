//! Changes made to host lowers outside the mount show through the long
//! caches the watch allows.

use super::*;

/// Host lowers are watched, so the kernel caches their names, attributes,
/// listings and data as long as an image's; what changes outside the mount
/// must still show (an unwatched lower would stay stale for an hour).
#[test]
fn outside_changes_to_a_host_lower_show_through_the_long_caches() {
    let m = overlay(|src| {
        fs::create_dir(src.join("d")).unwrap();
        fs::write(src.join("d/a"), b"one").unwrap();
        fs::write(src.join("d/gone"), b"x").unwrap();
    });
    // warm every cache: listing, entries, attributes, data
    assert_eq!(names(&m.m("d")), ["a", "gone"]);
    assert_eq!(fs::read(m.m("d/a")).unwrap(), b"one");
    assert_eq!(fs::metadata(m.m("d/gone")).unwrap().len(), 1);

    fs::write(m.s("d/new"), b"n").unwrap();
    fs::remove_file(m.s("d/gone")).unwrap();
    fs::write(m.s("d/a"), b"two!").unwrap(); // same inode, new data
    let limit = Duration::from_secs(5);
    assert!(
        wait_until(limit, || names(&m.m("d")) == ["a", "new"]),
        "listing: {:?}",
        names(&m.m("d"))
    );
    assert!(wait_until(limit, || !m.m("d/gone").exists()));
    assert!(wait_until(limit, || fs::read(m.m("d/a")).unwrap() == b"two!"));
    assert_eq!(fs::metadata(m.m("d/a")).unwrap().len(), 4);
    // a copied-up file no longer follows its lower
    fs::write(m.m("d/new"), b"mine").unwrap();
    fs::write(m.s("d/new"), b"theirs").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(fs::read(m.m("d/new")).unwrap(), b"mine");
}

/// A directory merged from two host lowers: a change in the lower one shows
/// as well as a change in the top one (the watch maps both host directories
/// to the one node).
#[test]
fn outside_changes_in_either_merged_lower_directory_show() {
    let m = Mounted::build_with(&[], &[], |dir| {
        let (l1, l2, upper) = (dir.join("l1"), dir.join("l2"), dir.join("upper"));
        for d in [&l1, &l2] {
            fs::create_dir_all(d.join("d")).unwrap();
        }
        fs::write(l1.join("d/top"), b"").unwrap();
        fs::write(l2.join("d/below"), b"").unwrap();
        fs::create_dir(&upper).unwrap();
        (
            format!("{}:{}", l1.display(), l2.display()),
            vec![format!("upper={}", upper.display())],
        )
    });
    let l = |rel: &str| m.dir.path().join(rel);
    assert_eq!(names(&m.m("d")), ["below", "top"]);
    fs::write(l("l2/d/new-below"), b"").unwrap();
    let limit = Duration::from_secs(5);
    assert!(
        wait_until(limit, || names(&m.m("d")) == ["below", "new-below", "top"]),
        "after a create in the lower directory: {:?}",
        names(&m.m("d"))
    );
    fs::write(l("l1/d/new-top"), b"").unwrap();
    assert!(
        wait_until(limit, || names(&m.m("d"))
            == ["below", "new-below", "new-top", "top"]),
        "after a create in the top directory: {:?}",
        names(&m.m("d"))
    );
}
