//! `config::load_str` with an empty environment accepts or refuses, never panics; an
//! accepted configuration can report its worst-case detection times.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let env = BTreeMap::new();
    if let Ok(loaded) = rollbackd::config::load_str(text, &env) {
        let _ = rollbackd::config::worst_case_times(&loaded.config);
    }
});
