//! The `simulate` trace format (SPEC §6, contract): JSON lines, one check per line, `at` in
//! seconds since promotion, an optional baseline as the first line.
//!
//! ```text
//! {"baseline": {"failureRate": 0.01, "latencyP95Ms": 180}}
//! {"at": 30, "probe": "ok", "snapshot": {"failureRate": 0.02, "requests": 1200}}
//! {"at": 60, "probe": "failed", "snapshot": null}
//! ```
//!
//! A negative `at` is an observation of the previous version before the promotion at
//! `at = 0` (same line format): it feeds the automatic baseline, never the engine.
//!
//! `probe` is `"ok"` or any other string, which is the failure reason (`"failed"`,
//! `"timeout"`, …). `snapshot` uses the operations snapshot format; `null` or absent means
//! the provider was down. An optional `resources` object takes `hostMemoryPercent`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::core::check::{
    Baseline, CheckResult, ProbeOutcome, Resources, SnapshotDoc, SnapshotOutcome,
};

/// One meaningful line of a trace.
#[derive(Debug, Clone, PartialEq)]
pub enum TraceLine {
    Baseline(Baseline),
    Check {
        at: Duration,
        check: CheckResult,
    },
    /// A negative `at`: the previous version observed `before` the promotion.
    Before {
        before: Duration,
        check: CheckResult,
    },
}

#[derive(Deserialize)]
struct RawLine {
    #[serde(default)]
    baseline: Option<Value>,
    #[serde(default)]
    at: Option<Value>,
    #[serde(default)]
    probe: Option<Value>,
    /// `null` or absent: the provider was down.
    #[serde(default)]
    snapshot: Option<SnapshotDoc>,
    #[serde(default)]
    resources: Option<RawResources>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawResources {
    #[serde(default)]
    host_memory_percent: Option<f64>,
    #[serde(default)]
    worker_rss_bytes: Option<u64>,
    #[serde(default)]
    worker_open_files: Option<u64>,
}

/// Parses one line; `Ok(None)` for a blank line. The error says what is wrong, without
/// the line number (the caller knows it).
pub fn parse_line(line: &str) -> Result<Option<TraceLine>, String> {
    let trimmed = line.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    // serde would read a JSON array positionally into the struct: refuse it first.
    if !trimmed.starts_with('{') {
        return Err("not a JSON object: each line is one {...} check".into());
    }
    let raw: RawLine =
        serde_json::from_str(trimmed).map_err(|err| format!("not a JSON object: {err}"))?;
    if let Some(baseline) = raw.baseline {
        if raw.at.is_some() || raw.probe.is_some() {
            return Err("a baseline line carries only \"baseline\"".into());
        }
        if !baseline.is_object() {
            return Err("\"baseline\" must be an object in the snapshot format".into());
        }
        return Ok(Some(TraceLine::Baseline(Baseline::from_json(&baseline))));
    }
    let at = match raw.at {
        Some(Value::Number(n)) => n.as_f64().filter(|s| s.is_finite()),
        Some(_) => None,
        None => return Err("missing \"at\" (seconds since promotion)".into()),
    }
    .ok_or("\"at\" must be a number of seconds since the promotion (negative: before it)")?;
    let before = at < 0.0;
    let at =
        Duration::try_from_secs_f64(at.abs()).map_err(|_| "\"at\" is out of range".to_owned())?;
    let probe = match raw.probe {
        Some(Value::String(text)) if text == "ok" => ProbeOutcome::Ok,
        Some(Value::String(reason)) => ProbeOutcome::Failed { reason },
        Some(other) => {
            return Err(format!(
                "\"probe\" must be \"ok\" or a failure reason string, got {other}"
            ))
        }
        None => {
            return Err("missing \"probe\" (\"ok\" or a failure reason such as \"failed\")".into())
        }
    };
    let snapshot = match raw.snapshot {
        None => SnapshotOutcome::Unavailable {
            reason: "provider down (snapshot null in trace)".into(),
        },
        Some(doc) => SnapshotOutcome::Values(doc.0),
    };
    let resources = raw.resources.map(|r| Resources {
        host_memory_percent: r.host_memory_percent,
        worker_rss_bytes: r.worker_rss_bytes,
        worker_open_files: r.worker_open_files,
    });
    let check = CheckResult {
        probe,
        snapshot,
        resources,
    };
    Ok(Some(if before {
        TraceLine::Before { before: at, check }
    } else {
        TraceLine::Check { at, check }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::check::Sample;

    #[test]
    fn a_negative_at_is_an_observation_before_the_promotion() {
        let Some(TraceLine::Before { before, check }) = parse_line(
            r#"{"at": -90.5, "probe": "ok", "snapshot": {"failureRate": 0.004, "requests": 800}}"#,
        )
        .unwrap() else {
            panic!("expected a pre-promotion line")
        };
        assert_eq!(before, Duration::from_secs_f64(90.5));
        assert!(matches!(check.snapshot, SnapshotOutcome::Values(_)));
        assert!(parse_line(r#"{"at": "-5", "probe": "ok"}"#).is_err());
    }

    #[test]
    fn parses_the_three_line_kinds() {
        let baseline =
            parse_line(r#"{"baseline": {"failureRate": 0.01, "latencyP95Ms": 180}}"#).unwrap();
        assert_eq!(
            baseline,
            Some(TraceLine::Baseline(Baseline {
                error_rate: Some(0.01),
                latency_p95_ms: Some(180.0),
                source: Some(crate::core::check::BaselineSource::Operator),
                ..Baseline::default()
            }))
        );
        let Some(TraceLine::Check { at, check }) = parse_line(
            r#"{"at": 30, "probe": "ok", "snapshot": {"failureRate": 0.02, "requests": 1200}}"#,
        )
        .unwrap() else {
            panic!("expected a check")
        };
        assert_eq!(at, Duration::from_secs(30));
        assert_eq!(check.probe, ProbeOutcome::Ok);
        let SnapshotOutcome::Values(snapshot) = check.snapshot else {
            panic!()
        };
        assert_eq!(snapshot.error_rate, Sample::Number(0.02));
        let Some(TraceLine::Check { check, .. }) =
            parse_line(r#"{"at": 60, "probe": "failed", "snapshot": null}"#).unwrap()
        else {
            panic!()
        };
        assert!(check.probe.is_failed());
        assert!(matches!(
            check.snapshot,
            SnapshotOutcome::Unavailable { .. }
        ));
    }

    #[test]
    fn blank_lines_are_skipped_and_bad_lines_explained() {
        assert_eq!(parse_line("   ").unwrap(), None);
        for (line, needle) in [
            ("{", "not a JSON object"),
            ("[1]", "not a JSON object"),
            (r#"{"probe":"ok"}"#, "missing \"at\""),
            (r#"{"at":"30","probe":"ok"}"#, "must be a number of seconds"),
            (r#"{"at":-1}"#, "missing \"probe\""),
            (r#"{"at":30}"#, "missing \"probe\""),
            (r#"{"at":30,"probe":true}"#, "\"probe\" must be"),
            (r#"{"baseline": 3}"#, "must be an object"),
        ] {
            let err = parse_line(line).unwrap_err();
            assert!(err.contains(needle), "{line}: {err}");
        }
    }
}
