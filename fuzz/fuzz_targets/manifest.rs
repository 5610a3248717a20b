//! The image manifest reader on arbitrary bytes, checksum sealed so the
//! fuzzer gets past it: opening never panics, and an image that opens only
//! ever hands out names that are one path component and walks that end.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use strata_image::{Image, Store, entry_name_problem, seal_manifest};

fn store() -> &'static (tempfile::TempDir, Store) {
    static STORE: OnceLock<(tempfile::TempDir, Store)> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        (dir, store)
    })
}

fuzz_target!(|data: &[u8]| {
    let (_, store) = store();
    let mut bytes = data.to_vec();
    seal_manifest(&mut bytes);
    let path = store.root().join("images/fuzz");
    std::fs::write(&path, &bytes).expect("write manifest");
    let Ok(img) = Image::open(store, "fuzz") else {
        return;
    };
    for i in 0..img.len() {
        let e = img.entry(i).expect("an opened image decodes every entry");
        let name = img.entry_name(&e);
        if i > 0 {
            assert_eq!(entry_name_problem(name), None, "entry {i}: {name:?}");
        }
        let _ = img.symlink_target(&e);
        let _ = img.blob(&e);
        img.xattrs(&e)
            .expect("an opened image decodes every xattr list");
        for c in img.children(&e) {
            let c = c.expect("children of an opened image decode");
            assert_eq!(img.lookup(&e, img.entry_name(&c)).unwrap(), Some(c));
        }
    }
});
