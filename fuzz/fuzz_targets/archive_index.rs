//! A kept archive index (what a hostile store could hold) on arbitrary
//! bytes, checksum sealed: reading it never panics, and one it accepts has
//! single-component names and walks that end.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = strata_archive::check_kept_index(data);
});
