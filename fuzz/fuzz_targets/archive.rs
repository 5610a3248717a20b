//! The archive reader (tar, tar.gz/zst/xz, zip) on arbitrary bytes: opening
//! never panics, every name in the index is one path component, lookups
//! find what listings show, and extracting any member ends (with its data
//! or an error) without a panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use strata_archive::Archive;
use strata_image::entry_name_problem;

fn dir() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("temp dir"))
}

fuzz_target!(|data: &[u8]| {
    let path = dir().path().join("fuzz");
    std::fs::write(&path, data).expect("write archive");
    let Ok(a) = Archive::open(&path) else {
        return;
    };
    for i in 0..a.len() as u32 {
        let m = a.member(i).expect("every index below len is a member");
        if i > 0 {
            assert_eq!(entry_name_problem(&m.name), None, "member {i}: {:?}", m.name);
        }
        for &c in a.children(i) {
            let name = &a.member(c).expect("children are members").name;
            assert_eq!(a.lookup(i, name), Some(c));
        }
        if m.size <= 1 << 20 {
            let _ = a.extract(m.inode, &mut std::io::sink());
        }
    }
});
