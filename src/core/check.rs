//! What one check observed, as plain data, and the parsers that turn raw provider bodies
//! into it.
//!
//! Parsing never fails: a hostile or malformed body becomes a value the engine classifies
//! as `invalid` (with the raw text kept, truncated, for the audit trail). Only a provider
//! that could not be reached at all is `SnapshotOutcome::Unavailable`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest raw text kept from a malformed value or body, in bytes.
pub const RAW_KEEP_BYTES: usize = 256;

/// Outcome of the worker health probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum ProbeOutcome {
    Ok,
    Failed { reason: String },
}

impl ProbeOutcome {
    pub fn failed(reason: impl Into<String>) -> Self {
        ProbeOutcome::Failed {
            reason: reason.into(),
        }
    }

    pub fn is_failed(&self) -> bool {
        matches!(self, ProbeOutcome::Failed { .. })
    }
}

/// One metric value as the provider sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", content = "value", rename_all = "kebab-case")]
pub enum Sample {
    /// The field was absent (or `null`).
    #[default]
    Missing,
    /// A number; may still be NaN, infinite or out of range (the engine decides).
    Number(f64),
    /// Present but not a number; the raw JSON text, truncated to [`RAW_KEEP_BYTES`].
    Wrong(String),
}

impl Sample {
    /// The value if it is a finite, non-negative number.
    pub fn finite_non_negative(&self) -> Option<f64> {
        match *self {
            Sample::Number(v) if v.is_finite() && v >= 0.0 => Some(v),
            _ => None,
        }
    }

    fn from_json(value: Option<&Value>) -> Sample {
        match value {
            None | Some(Value::Null) => Sample::Missing,
            Some(Value::Number(n)) => match n.as_f64() {
                Some(v) => Sample::Number(v),
                None => Sample::Wrong(truncate_raw(&n.to_string())),
            },
            Some(other) => Sample::Wrong(truncate_raw(&other.to_string())),
        }
    }
}

/// The operations-manager snapshot of one check (SPEC §3 snapshot format).
///
/// Written camelCase like every other record (`errorRate`, `latencyP95Ms`); rows written
/// before that spelled it snake_case, and the aliases still read them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    #[serde(alias = "error_rate")]
    pub error_rate: Sample,
    pub requests: Sample,
    #[serde(alias = "latency_p95_ms")]
    pub latency_p95_ms: Sample,
    #[serde(alias = "latency_p99_ms")]
    pub latency_p99_ms: Sample,
    #[serde(alias = "memory_percent")]
    pub memory_percent: Sample,
    #[serde(alias = "db_connection_errors")]
    pub db_connection_errors: Sample,
}

impl Snapshot {
    /// Reads the snapshot JSON format: `failureRate` or `validation.failureRate`, optional
    /// `requests`, `latencyP95Ms`, `latencyP99Ms`, `memoryPercent`, `dbConnectionErrors`.
    /// A body that is not a JSON object yields an `error_rate` of `Wrong(raw)`.
    pub fn from_json(value: &Value) -> Snapshot {
        let Some(object) = value.as_object() else {
            return Snapshot {
                error_rate: Sample::Wrong(truncate_raw(&value.to_string())),
                ..Snapshot::default()
            };
        };
        let error_rate = match object.get("failureRate") {
            Some(v) if !v.is_null() => Some(v),
            _ => object
                .get("validation")
                .and_then(|validation| validation.get("failureRate")),
        };
        Snapshot {
            error_rate: Sample::from_json(error_rate),
            requests: Sample::from_json(object.get("requests")),
            latency_p95_ms: Sample::from_json(object.get("latencyP95Ms")),
            latency_p99_ms: Sample::from_json(object.get("latencyP99Ms")),
            memory_percent: Sample::from_json(object.get("memoryPercent")),
            db_connection_errors: Sample::from_json(object.get("dbConnectionErrors")),
        }
    }

    /// Parses a raw body (HTTP or command output). Never fails: a body that is not JSON
    /// becomes an invalid error rate carrying the body's first bytes.
    pub fn from_body(body: &[u8]) -> Snapshot {
        match serde_json::from_slice::<SnapshotDoc>(body) {
            Ok(doc) => doc.0,
            Err(_) => Snapshot {
                error_rate: Sample::Wrong(truncate_raw(&String::from_utf8_lossy(
                    &body[..body.len().min(RAW_KEEP_BYTES * 4)],
                ))),
                ..Snapshot::default()
            },
        }
    }
}

/// A snapshot document read straight from JSON text, without building a map of the
/// object first (the trace replay reads a million of these a second). Same meaning as
/// [`Snapshot::from_json`]; a value that is not an object is an invalid error rate.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotDoc(pub Snapshot);

enum SnapshotKey {
    FailureRate,
    Validation,
    Requests,
    LatencyP95,
    LatencyP99,
    Memory,
    DbConnectionErrors,
    Other,
}

impl<'de> Deserialize<'de> for SnapshotKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = SnapshotKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<SnapshotKey, E> {
                Ok(match key {
                    "failureRate" => SnapshotKey::FailureRate,
                    "validation" => SnapshotKey::Validation,
                    "requests" => SnapshotKey::Requests,
                    "latencyP95Ms" => SnapshotKey::LatencyP95,
                    "latencyP99Ms" => SnapshotKey::LatencyP99,
                    "memoryPercent" => SnapshotKey::Memory,
                    "dbConnectionErrors" => SnapshotKey::DbConnectionErrors,
                    _ => SnapshotKey::Other,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// `validation.failureRate`, if `validation` is an object that has one.
struct NestedRate(Option<Value>);

impl<'de> Deserialize<'de> for NestedRate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NestedVisitor;
        impl<'de> serde::de::Visitor<'de> for NestedVisitor {
            type Value = NestedRate;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<NestedRate, A::Error> {
                let mut rate = None;
                while let Some(key) = map.next_key::<SnapshotKey>()? {
                    match key {
                        SnapshotKey::FailureRate => rate = Some(map.next_value::<Value>()?),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(NestedRate(rate))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<NestedRate, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(NestedRate(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<NestedRate, E> {
                Ok(NestedRate(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<NestedRate, E> {
                Ok(NestedRate(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<NestedRate, E> {
                Ok(NestedRate(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<NestedRate, E> {
                Ok(NestedRate(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<NestedRate, E> {
                Ok(NestedRate(None))
            }
            fn visit_unit<E>(self) -> Result<NestedRate, E> {
                Ok(NestedRate(None))
            }
        }
        deserializer.deserialize_any(NestedVisitor)
    }
}

impl<'de> Deserialize<'de> for SnapshotDoc {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DocVisitor;
        fn wrong(value: Value) -> SnapshotDoc {
            SnapshotDoc(Snapshot {
                error_rate: Sample::Wrong(truncate_raw(&value.to_string())),
                ..Snapshot::default()
            })
        }
        impl<'de> serde::de::Visitor<'de> for DocVisitor {
            type Value = SnapshotDoc;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a snapshot object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<SnapshotDoc, A::Error> {
                let mut snapshot = Snapshot::default();
                let mut top = None;
                let mut nested = None;
                while let Some(key) = map.next_key::<SnapshotKey>()? {
                    let field = match key {
                        SnapshotKey::FailureRate => {
                            top = Some(map.next_value::<Value>()?);
                            continue;
                        }
                        SnapshotKey::Validation => {
                            nested = map.next_value::<NestedRate>()?.0;
                            continue;
                        }
                        SnapshotKey::Other => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                        SnapshotKey::Requests => &mut snapshot.requests,
                        SnapshotKey::LatencyP95 => &mut snapshot.latency_p95_ms,
                        SnapshotKey::LatencyP99 => &mut snapshot.latency_p99_ms,
                        SnapshotKey::Memory => &mut snapshot.memory_percent,
                        SnapshotKey::DbConnectionErrors => &mut snapshot.db_connection_errors,
                    };
                    *field = Sample::from_json(Some(&map.next_value::<Value>()?));
                }
                // As in `from_json`: a present, non-null top-level rate wins.
                let rate = match top {
                    Some(value) if !value.is_null() => Some(value),
                    _ => nested,
                };
                snapshot.error_rate = Sample::from_json(rate.as_ref());
                Ok(SnapshotDoc(snapshot))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<SnapshotDoc, A::Error> {
                let value = Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
                Ok(wrong(value))
            }
            fn visit_bool<E>(self, v: bool) -> Result<SnapshotDoc, E> {
                Ok(wrong(Value::from(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<SnapshotDoc, E> {
                Ok(wrong(Value::from(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<SnapshotDoc, E> {
                Ok(wrong(Value::from(v)))
            }
            fn visit_f64<E>(self, v: f64) -> Result<SnapshotDoc, E> {
                Ok(wrong(Value::from(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<SnapshotDoc, E> {
                Ok(wrong(Value::from(v)))
            }
            fn visit_unit<E>(self) -> Result<SnapshotDoc, E> {
                Ok(wrong(Value::Null))
            }
        }
        deserializer.deserialize_any(DocVisitor)
    }
}

/// The snapshot part of a check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum SnapshotOutcome {
    Values(Snapshot),
    /// The source could not be asked: refused, timed out, non-2xx, command failed.
    Unavailable {
        reason: String,
    },
}

/// Resources sampled from `/proc`; every field is optional because each can fail alone.
/// Written camelCase; the snake_case aliases read rows written before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    #[serde(default, alias = "host_memory_percent")]
    pub host_memory_percent: Option<f64>,
    #[serde(default, alias = "worker_rss_bytes")]
    pub worker_rss_bytes: Option<u64>,
    #[serde(default, alias = "worker_open_files")]
    pub worker_open_files: Option<u64>,
}

/// Everything one check observed. The time it was taken is passed to the engine beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    pub probe: ProbeOutcome,
    pub snapshot: SnapshotOutcome,
    #[serde(default)]
    pub resources: Option<Resources>,
}

/// Where a baseline came from (SPEC §2a), strongest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BaselineSource {
    /// `promote --baseline-*`, or a trace's `baseline` line.
    Operator,
    /// The daemon's own observations of the previous version before the promotion (in
    /// a trace: its negative-`at` lines).
    Observed,
    /// The Prometheus source, over the window ending at the promotion.
    Prometheus,
    /// The checks of the previous version's last session that completed healthy.
    PreviousSession,
}

impl BaselineSource {
    pub fn as_str(self) -> &'static str {
        match self {
            BaselineSource::Operator => "operator",
            BaselineSource::Observed => "observed",
            BaselineSource::Prometheus => "prometheus",
            BaselineSource::PreviousSession => "previous-session",
        }
    }
}

/// Pre-promotion reference values for the baseline-relative rules. With `errors` and
/// `requests` the error rule is a test on counts; with a rate only, the rate is taken as
/// known (see `core::stats`). Written camelCase (`latencyP95Ms`, `windowSeconds`), as the
/// artifacts' `evidence.baseline`; rollbackd.db rows written before spelled it snake_case,
/// and the aliases still read them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Baseline {
    #[serde(default, alias = "error_rate")]
    pub error_rate: Option<f64>,
    #[serde(default, alias = "latency_p95_ms")]
    pub latency_p95_ms: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "latency_p99_ms"
    )]
    pub latency_p99_ms: Option<f64>,
    /// Requests the rate was measured over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<u64>,
    /// Errors among them: rate × requests summed over the observations, unrounded (a
    /// 10% rate over 4 requests is 0.4 errors, not 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errors: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<BaselineSource>,
    /// How many observations (checks, samples) it was made of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<u32>,
    /// The span they covered, in seconds.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "window_seconds"
    )]
    pub window_seconds: Option<f64>,
    /// How much the error rate swings between checks (SPEC §2b): the relative variance
    /// beyond Poisson noise (0.09: about ±30 %), estimated from the observations.
    /// `None`: unknown (an operator's figures, too few observations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispersion: Option<f64>,
    /// How long the swings last: the correlation of two observations one
    /// `step_seconds` apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        alias = "step_seconds"
    )]
    pub step_seconds: Option<f64>,
    /// Observations left out as incidents (their errors far above the others').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excluded: Option<u32>,
    /// How much ln p95 / ln p99 move between observations (a robust standard deviation).
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "p95_spread")]
    pub p95_spread: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", alias = "p99_spread")]
    pub p99_spread: Option<f64>,
}

impl Baseline {
    /// Reads a baseline from the snapshot format (`failureRate`, `requests`,
    /// `latencyP95Ms`, `latencyP99Ms`). Unusable values are dropped, so the rule they
    /// would drive stays off. Given by an operator.
    pub fn from_json(value: &Value) -> Baseline {
        let snapshot = Snapshot::from_json(value);
        let error_rate = snapshot
            .error_rate
            .finite_non_negative()
            .filter(|v| *v <= 1.0);
        let requests = snapshot
            .requests
            .finite_non_negative()
            .filter(|n| *n >= 1.0)
            .map(|n| n.round() as u64);
        Baseline {
            error_rate,
            latency_p95_ms: snapshot.latency_p95_ms.finite_non_negative(),
            latency_p99_ms: snapshot.latency_p99_ms.finite_non_negative(),
            requests: requests.filter(|_| error_rate.is_some()),
            errors: error_rate.zip(requests).map(|(rate, n)| rate * n as f64),
            source: Some(BaselineSource::Operator),
            ..Baseline::default()
        }
    }

    /// The baseline a series of observations of the previous version makes: their errors
    /// and requests summed (so a busy minute weighs more than a quiet one), the median of
    /// their latency quantiles. `None` when fewer than `min_samples` observations carry a
    /// usable error rate.
    pub fn from_observations(
        observations: &[Observation],
        source: BaselineSource,
        min_samples: usize,
    ) -> Option<Baseline> {
        let usable: Vec<&Observation> = observations
            .iter()
            .filter(|o| {
                o.error_rate
                    .is_some_and(|r| r.is_finite() && (0.0..=1.0).contains(&r))
            })
            .collect();
        if usable.is_empty() || usable.len() < min_samples.max(1) {
            return None;
        }
        // Time order: the noise's persistence is between neighbours.
        let mut usable = usable;
        usable.sort_by(|a, b| a.at_seconds.total_cmp(&b.at_seconds));
        let counted: Vec<crate::core::stats::Counts> = usable
            .iter()
            .filter_map(|o| {
                let requests = o.requests.filter(|n| n.is_finite() && *n >= 0.0)?;
                let rate = o.error_rate?;
                // Unrounded: 10% over 4 requests is 0.4 errors.
                Some(crate::core::stats::Counts {
                    at: o.at_seconds,
                    errors: rate * requests,
                    requests,
                })
            })
            .collect();
        // Counts only when every usable observation had them: a mix would weigh the
        // uncounted ones as zero traffic.
        let mut excluded: Vec<usize> = Vec::new();
        let mut noise = None;
        let (errors, requests, error_rate) = if counted.len() == usable.len() {
            match crate::core::stats::robust_rate(&counted) {
                Some(robust) if robust.requests > 0.0 => {
                    excluded = robust.excluded.clone();
                    noise = robust.noise;
                    // A hostile snapshot may claim any count (1e30 requests): saturate.
                    let requests = robust.requests.min(u64::MAX as f64);
                    (
                        Some(robust.errors),
                        Some(requests.round() as u64),
                        Some(robust.errors / robust.requests),
                    )
                }
                _ => (None, None, None),
            }
        } else {
            let sum: f64 = usable.iter().filter_map(|o| o.error_rate).sum();
            (None, None, Some(sum / usable.len() as f64))
        };
        error_rate?;
        let kept: Vec<&Observation> = usable
            .iter()
            .enumerate()
            .filter(|(i, _)| !excluded.contains(i))
            .map(|(_, o)| *o)
            .collect();
        let positive = |values: Vec<f64>| -> Vec<f64> {
            values
                .into_iter()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .collect()
        };
        let p95s = positive(kept.iter().filter_map(|o| o.latency_p95_ms).collect());
        let p99s = positive(kept.iter().filter_map(|o| o.latency_p99_ms).collect());
        let spread = |values: &[f64]| -> Option<f64> {
            if values.len() < crate::core::stats::MIN_NOISE_CHECKS {
                return None;
            }
            let logs: Vec<f64> = values
                .iter()
                .filter(|v| **v > 0.0)
                .map(|v| v.ln())
                .collect();
            crate::core::stats::robust_sd(&logs)
        };
        let first = usable
            .iter()
            .map(|o| o.at_seconds)
            .fold(f64::INFINITY, f64::min);
        let last = usable
            .iter()
            .map(|o| o.at_seconds)
            .fold(f64::NEG_INFINITY, f64::max);
        Some(Baseline {
            error_rate,
            latency_p95_ms: crate::core::stats::median_of(&p95s),
            latency_p99_ms: crate::core::stats::median_of(&p99s),
            requests,
            errors,
            source: Some(source),
            samples: Some(usable.len() as u32),
            window_seconds: Some((last - first).max(0.0)),
            dispersion: noise.map(|n| n.sigma2),
            persistence: noise.map(|n| n.rho),
            step_seconds: noise.map(|n| n.step_seconds),
            excluded: (!excluded.is_empty()).then_some(excluded.len() as u32),
            p95_spread: spread(&p95s),
            p99_spread: spread(&p99s),
        })
    }

    /// One line for humans: `0.40% (12 errors in 3,000 requests, 20 samples over 10m,
    /// observed), p95 180 ms`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        match (self.error_rate, self.errors, self.requests) {
            (Some(rate), Some(errors), Some(requests)) => parts.push(format!(
                "error rate {:.2}% ({errors:.0} errors in {requests} requests)",
                rate * 100.0
            )),
            (Some(rate), _, _) => parts.push(format!(
                "error rate {:.2}% (a rate, no counts)",
                rate * 100.0
            )),
            _ => {}
        }
        if let Some(p95) = self.latency_p95_ms {
            parts.push(format!("p95 {p95:.0} ms"));
        }
        if let Some(p99) = self.latency_p99_ms {
            parts.push(format!("p99 {p99:.0} ms"));
        }
        if parts.is_empty() {
            parts.push("no usable values".into());
        }
        let mut from = Vec::new();
        if let Some(source) = self.source {
            from.push(source.as_str().to_owned());
        }
        if let Some(samples) = self.samples {
            from.push(format!("{samples} samples"));
        }
        if let Some(window) = self.window_seconds {
            from.push(format!("over {:.0}s", window));
        }
        if let Some(excluded) = self.excluded {
            from.push(format!(
                "{excluded} incident sample{} left out",
                if excluded == 1 { "" } else { "s" }
            ));
        }
        if let Some(dispersion) = self.dispersion {
            from.push(format!(
                "swings ±{:.0}%{}",
                dispersion.sqrt() * 100.0,
                match self.persistence {
                    Some(rho) => format!(" (persistence {rho:.2})"),
                    None => String::new(),
                }
            ));
        }
        if from.is_empty() {
            parts.join(", ")
        } else {
            format!("{} [{}]", parts.join(", "), from.join(", "))
        }
    }
}

/// One observation of a version's traffic, for a baseline: a snapshot's usable values
/// and when it was taken (seconds, on any one clock).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Observation {
    pub at_seconds: f64,
    pub error_rate: Option<f64>,
    pub requests: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
}

impl Observation {
    /// The usable values of a snapshot (a failed snapshot observes nothing).
    pub fn of(at_seconds: f64, snapshot: &SnapshotOutcome) -> Option<Observation> {
        let SnapshotOutcome::Values(s) = snapshot else {
            return None;
        };
        Some(Observation {
            at_seconds,
            error_rate: s.error_rate.finite_non_negative().filter(|r| *r <= 1.0),
            requests: s.requests.finite_non_negative(),
            latency_p95_ms: s.latency_p95_ms.finite_non_negative(),
            latency_p99_ms: s.latency_p99_ms.finite_non_negative(),
        })
    }
}

/// Health-probe body rule (SPEC §3): a 2xx is healthy unless the body is a JSON object
/// whose `status` field is something other than `ok`, `healthy` or `pass`.
/// Returns `None` when healthy, or the reason it is not.
pub fn health_body_verdict(body: &[u8]) -> Option<String> {
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    match object.get("status") {
        None => None,
        Some(Value::String(status))
            if ["ok", "healthy", "pass"]
                .iter()
                .any(|good| status.eq_ignore_ascii_case(good)) =>
        {
            None
        }
        Some(other) => Some(format!(
            "body says status {}",
            truncate_raw(&other.to_string())
        )),
    }
}

/// Cuts `text` to at most [`RAW_KEEP_BYTES`] bytes on a character boundary, marking the cut.
pub fn truncate_raw(text: &str) -> String {
    if text.len() <= RAW_KEEP_BYTES {
        return text.to_owned();
    }
    let mut end = RAW_KEEP_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn snapshot_reads_top_level_and_nested_failure_rate() {
        let top = Snapshot::from_json(&json!({"failureRate": 0.25, "requests": 100}));
        assert_eq!(top.error_rate, Sample::Number(0.25));
        assert_eq!(top.requests, Sample::Number(100.0));
        let nested = Snapshot::from_json(&json!({"validation": {"failureRate": 0.5}}));
        assert_eq!(nested.error_rate, Sample::Number(0.5));
        let both =
            Snapshot::from_json(&json!({"failureRate": 0.1, "validation": {"failureRate": 0.9}}));
        assert_eq!(both.error_rate, Sample::Number(0.1));
    }

    #[test]
    fn snapshot_keeps_wrong_types_raw() {
        let s = Snapshot::from_json(&json!({"failureRate": "0.5", "latencyP95Ms": [1]}));
        assert_eq!(s.error_rate, Sample::Wrong("\"0.5\"".into()));
        assert_eq!(s.latency_p95_ms, Sample::Wrong("[1]".into()));
        assert_eq!(s.requests, Sample::Missing);
    }

    #[test]
    fn snapshot_from_garbage_body_is_wrong_not_panic() {
        let s = Snapshot::from_body(b"\xff\xfe<html>oops");
        assert!(matches!(s.error_rate, Sample::Wrong(_)));
        let array = Snapshot::from_body(b"[0.5]");
        assert_eq!(array.error_rate, Sample::Wrong("[0.5]".into()));
        let deep = "[".repeat(100_000);
        assert!(matches!(
            Snapshot::from_body(deep.as_bytes()).error_rate,
            Sample::Wrong(_)
        ));
    }

    #[test]
    fn the_streaming_parser_agrees_with_the_value_parser() {
        for body in [
            r#"{"failureRate": 0.25, "requests": 100, "extra": {"deep": [1, 2]}}"#,
            r#"{"validation": {"failureRate": 0.5, "other": 1}, "latencyP95Ms": 180}"#,
            r#"{"failureRate": null, "validation": {"failureRate": 0.3}}"#,
            r#"{"failureRate": 0.1, "validation": {"failureRate": 0.9}}"#,
            r#"{"failureRate": "0.5", "memoryPercent": [1], "dbConnectionErrors": -3}"#,
            r#"{"validation": 7, "requests": 1e308}"#,
            r#"{"failureRate": 1, "failureRate": 0.2}"#,
            r#"[0.5, {"a": 1}]"#,
            r#""text""#,
            "3",
            "true",
            "null",
            "{}",
        ] {
            let value: Value = serde_json::from_str(body).unwrap();
            assert_eq!(
                Snapshot::from_body(body.as_bytes()),
                Snapshot::from_json(&value),
                "{body}"
            );
        }
    }

    #[test]
    fn a_deeply_nested_unknown_field_does_not_hide_the_known_ones() {
        let depth = 100_000;
        let body = format!(
            r#"{{"failureRate": 0.3, "extra": {}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert_eq!(
            Snapshot::from_body(body.as_bytes()).error_rate,
            Sample::Number(0.3)
        );
        // Deep nesting in a field that is read is still refused as invalid, without overflow.
        let deep_rate = format!(
            r#"{{"failureRate": {}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        assert!(matches!(
            Snapshot::from_body(deep_rate.as_bytes()).error_rate,
            Sample::Wrong(_)
        ));
    }

    #[test]
    fn raw_text_is_truncated_on_char_boundary() {
        let long = "é".repeat(1000);
        let cut = truncate_raw(&long);
        assert!(cut.len() <= RAW_KEEP_BYTES + "…".len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn health_body_rules() {
        assert_eq!(health_body_verdict(b""), None);
        assert_eq!(health_body_verdict(b"OK"), None);
        assert_eq!(health_body_verdict(br#"{"status":"ok"}"#), None);
        assert_eq!(health_body_verdict(br#"{"status":"PASS"}"#), None);
        assert_eq!(health_body_verdict(br#"{"uptime":3}"#), None);
        assert!(health_body_verdict(br#"{"status":"degraded"}"#).is_some());
        assert!(health_body_verdict(br#"{"status":false}"#).is_some());
    }
}
