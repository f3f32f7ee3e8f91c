//! One spelling for field names (issue 25 item 12): the records rollbackd writes are
//! camelCase, and what earlier versions wrote into rollbackd.db in snake_case (a session's
//! baseline, the healthy-session stats in `meta`, each check's `check_json`) still reads.

use rollbackd::core::check::{
    Baseline, BaselineSource, CheckResult, ProbeOutcome, Resources, Sample, Snapshot,
    SnapshotOutcome,
};
use serde_json::{json, Value};

fn keys(value: &Value) -> Vec<String> {
    value
        .as_object()
        .map(|map| map.keys().cloned().collect())
        .unwrap_or_default()
}

fn baseline() -> Baseline {
    Baseline {
        error_rate: Some(0.004),
        latency_p95_ms: Some(180.0),
        latency_p99_ms: Some(400.0),
        requests: Some(3000),
        errors: Some(12.0),
        source: Some(BaselineSource::Observed),
        samples: Some(20),
        window_seconds: Some(600.0),
        step_seconds: Some(30.0),
        p95_spread: Some(0.1),
        ..Baseline::default()
    }
}

#[test]
fn a_baseline_is_written_camel_case() {
    let value = serde_json::to_value(baseline()).unwrap();
    assert_eq!(
        value,
        json!({"errorRate": 0.004, "latencyP95Ms": 180.0, "latencyP99Ms": 400.0,
               "requests": 3000, "errors": 12.0, "source": "observed", "samples": 20,
               "windowSeconds": 600.0, "stepSeconds": 30.0, "p95Spread": 0.1})
    );
}

#[test]
fn a_baseline_stored_snake_case_by_an_earlier_version_still_reads() {
    let old = r#"{"error_rate":0.004,"latency_p95_ms":180.0,"latency_p99_ms":400.0,"requests":3000,"errors":12,"source":"observed","samples":20,"window_seconds":600.0,"step_seconds":30.0,"p95_spread":0.1}"#;
    assert_eq!(serde_json::from_str::<Baseline>(old).unwrap(), baseline());
    let now = serde_json::to_string(&baseline()).unwrap();
    assert_eq!(serde_json::from_str::<Baseline>(&now).unwrap(), baseline());
}

fn check() -> CheckResult {
    CheckResult {
        probe: ProbeOutcome::Ok,
        snapshot: SnapshotOutcome::Values(Snapshot {
            error_rate: Sample::Number(0.01),
            requests: Sample::Number(1000.0),
            latency_p95_ms: Sample::Number(120.0),
            latency_p99_ms: Sample::Missing,
            memory_percent: Sample::Wrong("\"x\"".into()),
            db_connection_errors: Sample::Number(0.0),
        }),
        resources: Some(Resources {
            host_memory_percent: Some(41.5),
            worker_rss_bytes: Some(1 << 20),
            worker_open_files: Some(12),
        }),
    }
}

#[test]
fn a_check_is_written_camel_case_and_old_rows_still_read() {
    let value = serde_json::to_value(check()).unwrap();
    assert_eq!(
        keys(&value["snapshot"]),
        [
            "dbConnectionErrors",
            "errorRate",
            "latencyP95Ms",
            "latencyP99Ms",
            "memoryPercent",
            "outcome",
            "requests"
        ]
    );
    assert_eq!(
        keys(&value["resources"]),
        ["hostMemoryPercent", "workerOpenFiles", "workerRssBytes"]
    );
    let old = r#"{"probe":{"outcome":"ok"},"snapshot":{"outcome":"values","error_rate":{"kind":"number","value":0.01},"requests":{"kind":"number","value":1000.0},"latency_p95_ms":{"kind":"number","value":120.0},"latency_p99_ms":{"kind":"missing"},"memory_percent":{"kind":"wrong","value":"\"x\""},"db_connection_errors":{"kind":"number","value":0.0}},"resources":{"host_memory_percent":41.5,"worker_rss_bytes":1048576,"worker_open_files":12}}"#;
    assert_eq!(serde_json::from_str::<CheckResult>(old).unwrap(), check());
}
