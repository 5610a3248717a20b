//! The view spec parser on arbitrary text: it never panics, and a spec it
//! accepts has only single-component names in every map's place and source
//! directory, and sources that exist.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use strata_core::layer::view::Spec;
use strata_image::entry_name_problem;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Relative sources resolve against /tmp: what exists there may be named.
    let Ok(spec) = Spec::parse(text, Path::new("/tmp/fuzz.toml")) else {
        return;
    };
    for m in &spec.maps {
        for part in m.path.iter().chain(&m.sub) {
            assert_eq!(entry_name_problem(part), None, "{part:?}");
        }
        assert!(m.source < spec.sources.len());
        for (from, to) in &m.renames {
            assert!(from.len() > 1 && to.len() > 1 && from != to);
        }
    }
    for s in &spec.sources {
        assert!(s.path.exists(), "{}", s.path.display());
    }
    let _ = spec.describe();
});
