//! `trace::parse_line` returns `Ok` or `Err`, never panics; a parsed check serializes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rollbackd::trace::{parse_line, TraceLine};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Some(TraceLine::Check { check, .. })) = parse_line(line) {
        serde_json::to_string(&check).expect("a parsed check serializes");
    }
});
