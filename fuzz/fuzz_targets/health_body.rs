//! `health_body_verdict` never panics and its reason stays short.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    if let Some(reason) = rollbackd::check::health_body_verdict(body) {
        assert!(
            reason.len() <= 1024,
            "reason unbounded: {} bytes",
            reason.len()
        );
    }
});
