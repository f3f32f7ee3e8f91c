//! `Snapshot::from_body` never panics, and whatever it returns serializes (it goes into
//! `rollbackd.db` and the audit log) and keeps its raw text short.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rollbackd::check::{Sample, Snapshot};

fuzz_target!(|body: &[u8]| {
    let snapshot = Snapshot::from_body(body);
    let text = serde_json::to_string(&snapshot).expect("a snapshot serializes");
    let back: Snapshot = serde_json::from_str(&text).expect("a snapshot reads back");
    let _ = back;
    for sample in [
        &snapshot.error_rate,
        &snapshot.requests,
        &snapshot.latency_p95_ms,
        &snapshot.latency_p99_ms,
        &snapshot.memory_percent,
        &snapshot.db_connection_errors,
    ] {
        if let Sample::Wrong(raw) = sample {
            assert!(
                raw.len() <= 1024,
                "raw text kept unbounded: {} bytes",
                raw.len()
            );
        }
    }
});
