//! Snapshot from Prometheus instant queries (`GET {url}/api/v1/query?query=...`).
//!
//! The configured queries run concurrently, each bounded by one shared deadline (the
//! check timeout), so a slow optional query cannot cost the error rate its answer.
//!
//! Mapping to samples:
//! - a vector result takes the **first series** when there are several (a query meant for
//!   a snapshot should aggregate to one series; which one comes first is Prometheus's
//!   choice, and nothing records that there were more); a scalar result is used as is;
//! - an empty vector is `Missing` (no data);
//! - the value string is parsed as Prometheus writes it, so `NaN` and `+Inf` become
//!   `Number(NaN)` / `Number(inf)` for the engine to classify as invalid; a value string
//!   that is not a number at all is `Wrong(raw)`;
//! - a failed request, a non-2xx status, `"status":"error"` or a response that is not the
//!   query API's shape is a provider failure: `Unavailable` for the error-rate query,
//!   `Wrong(reason)` for an optional one.
//!
//! Templates ([`SnapshotVars`]): `{worker}` and `{previous}` are put into the queries as
//! they are (worker ids cannot break out of a label matcher's string; see
//! `SnapshotVars::substitute_promql`), `{interval}` as the time since the previous check,
//! widened to two scrape intervals at least. The `requests` value is scaled so that
//! successive checks count each request once ([`PrometheusSpec::requests_scale`]): by
//! interval / range when the query's range is longer than the time since the previous
//! check. The baseline's range query does the same with its step.

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::http::{build_client, read_capped};
use super::{
    error_chain, excerpt, timeout_reason, BoxFuture, SnapshotSource, SnapshotVars, MAX_BODY,
};
use crate::config::PrometheusSpec;
use crate::core::check::{truncate_raw, Sample, Snapshot, SnapshotOutcome};

pub(super) struct PrometheusSnapshotSource {
    client: Result<reqwest::Client, String>,
    /// `{url}/api/v1/query`, or why it is not a URL.
    endpoint: Result<reqwest::Url, String>,
    spec: PrometheusSpec,
    timeout: Duration,
}

impl PrometheusSnapshotSource {
    pub(super) fn new(spec: PrometheusSpec, timeout: Duration) -> Self {
        let endpoint_text = format!("{}/api/v1/query", spec.url.trim_end_matches('/'));
        let endpoint = reqwest::Url::parse(&endpoint_text)
            .map_err(|error| format!("{endpoint_text:?} is not a URL: {error}"));
        PrometheusSnapshotSource {
            client: build_client(),
            endpoint,
            spec,
            timeout,
        }
    }

    /// One instant query; `Err` is a provider failure.
    async fn query(&self, expression: &str, deadline: Instant) -> Result<Sample, String> {
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let mut url = self.endpoint.clone()?;
        url.query_pairs_mut().append_pair("query", expression);
        match tokio::time::timeout_at(deadline, query_untimed(client, url)).await {
            Ok(result) => result,
            Err(_) => Err(timeout_reason(self.timeout)),
        }
    }

    async fn optional_query(
        &self,
        expression: Option<Result<String, String>>,
        deadline: Instant,
    ) -> Sample {
        match expression {
            None => Sample::Missing,
            Some(Err(reason)) => Sample::Wrong(truncate_raw(&reason)),
            Some(Ok(expression)) => self
                .query(&expression, deadline)
                .await
                .unwrap_or_else(|reason| Sample::Wrong(truncate_raw(&reason))),
        }
    }
}

async fn query_untimed(client: &reqwest::Client, url: reqwest::Url) -> Result<Sample, String> {
    parse_query_response(&get_api_body(client, url).await?)
}

/// One GET of the query API: the body of a 2xx answer (capped at `MAX_BODY`), else the
/// API's own explanation of the failure.
async fn get_api_body(client: &reqwest::Client, url: reqwest::Url) -> Result<Vec<u8>, String> {
    // The error names the server, not the whole URL: the percent-encoded query would crowd
    // out why it failed (and the query is named by its key anyway).
    let server = url.origin().ascii_serialization();
    let response = client
        .get(url)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|error| {
            format!(
                "cannot reach {server}: {}",
                error_chain(&error.without_url())
            )
        })?;
    let status = response.status();
    let body = read_capped(response, MAX_BODY).await.map_err(|error| {
        format!(
            "HTTP {status}: reading the body failed: {}",
            error_chain(&error)
        )
    })?;
    if !status.is_success() {
        // Prometheus explains 4xx/5xx in the error envelope; fall back to the raw body.
        let detail = api_error(&body.bytes).unwrap_or_else(|| excerpt(&body.bytes));
        return Err(format!("HTTP {status}: {detail}"));
    }
    Ok(body.bytes)
}

/// `errorType: error` from an API error envelope, if the body is one.
fn api_error(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let error = value.get("error")?.as_str()?;
    let error_type = value
        .get("errorType")
        .and_then(Value::as_str)
        .unwrap_or("error");
    Some(truncate_raw(&format!("{error_type}: {error}")))
}

/// Reads an instant-query response body. `Err` is a provider failure.
pub(super) fn parse_query_response(body: &[u8]) -> Result<Sample, String> {
    let value = api_data(body)?;
    let data = &value;
    let result = data.get("result");
    match data.get("resultType").and_then(Value::as_str) {
        Some("vector") => {
            let series = result
                .and_then(Value::as_array)
                .ok_or_else(|| format!("vector result is not an array: {}", excerpt(body)))?;
            match series.first() {
                None => Ok(Sample::Missing),
                Some(first) => sample_from_pair(first.get("value"), body),
            }
        }
        Some("scalar") => sample_from_pair(result, body),
        Some(other) => Err(format!(
            "result type {} is not a vector or scalar",
            truncate_raw(other)
        )),
        None => Err(format!("response has no resultType: {}", excerpt(body))),
    }
}

/// The `data` of a successful query API response. `Err` is a provider failure.
fn api_data(body: &[u8]) -> Result<Value, String> {
    let mut value: Value = serde_json::from_slice(body)
        .map_err(|error| format!("unparsable response ({error}): {}", excerpt(body)))?;
    match value.get("status").and_then(Value::as_str) {
        Some("success") => {}
        Some("error") => return Err(api_error(body).unwrap_or_else(|| "query failed".into())),
        _ => return Err(format!("not a query API response: {}", excerpt(body))),
    }
    value
        .get_mut("data")
        .map(Value::take)
        .ok_or_else(|| format!("response has no data: {}", excerpt(body)))
}

/// `[timestamp, "value"]` to a sample.
fn sample_from_pair(pair: Option<&Value>, body: &[u8]) -> Result<Sample, String> {
    let value = pair
        .and_then(Value::as_array)
        .filter(|pair| pair.len() == 2)
        .map(|pair| &pair[1])
        .ok_or_else(|| format!("sample is not [timestamp, value]: {}", excerpt(body)))?;
    Ok(match value {
        // Rust's float parser accepts Prometheus's spellings: NaN, +Inf, -Inf, 1e+308.
        Value::String(text) => match text.trim().parse::<f64>() {
            Ok(number) => Sample::Number(number),
            Err(_) => Sample::Wrong(truncate_raw(&value.to_string())),
        },
        Value::Number(number) => match number.as_f64() {
            Some(number) => Sample::Number(number),
            None => Sample::Wrong(truncate_raw(&number.to_string())),
        },
        other => Sample::Wrong(truncate_raw(&other.to_string())),
    })
}

/// One configured query as `check-config --for run` ran it.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryCheck {
    /// `operations.prometheus.error_rate`, ...
    pub key: &'static str,
    /// The expression sent, templates substituted.
    pub expression: String,
    /// Its value (`Missing`: an empty result), or why Prometheus could not answer it
    /// (unreachable, `bad_data` for a PromQL error, a response not of the query API).
    pub result: Result<Sample, String>,
}

/// Runs each configured query once (an instant query, as a check would with `vars`), one
/// after the other, each bounded by `timeout`.
pub async fn check_queries(
    spec: &PrometheusSpec,
    vars: &SnapshotVars,
    timeout: Duration,
) -> Vec<QueryCheck> {
    let source = PrometheusSnapshotSource::new(spec.clone(), timeout);
    let window = spec.interval_window(vars.interval);
    let mut checks = Vec::new();
    for (key, query) in spec.queries() {
        let (expression, result) = match vars.substitute_promql(query, window) {
            Ok(expression) => {
                let deadline = crate::sys::clock::deadline_tokio(Instant::now(), timeout);
                let result = source.query(&expression, deadline).await;
                (expression, result)
            }
            Err(reason) => (query.to_owned(), Err(reason)),
        };
        checks.push(QueryCheck {
            key,
            expression,
            result,
        });
    }
    checks
}

/// The baseline source (SPEC §2a): each configured expression evaluated over `start..=end`
/// every `step` (`GET {url}/api/v1/query_range`), the same values the snapshots would
/// have given at those instants, joined by timestamp into observations. The error-rate
/// query must answer; the others may be missing. Bounded by `timeout` in all.
///
/// The baseline is the previous version's traffic, so `{worker}` is `worker` (that
/// version) and `{previous}` is empty; `{interval}` is the step (at least two scrape
/// intervals). The `requests` points are scaled by step / range when the range is longer
/// than the step, so that their sum counts each request in the window once.
pub async fn range_observations(
    spec: &PrometheusSpec,
    timeout: Duration,
    worker: &str,
    start: std::time::SystemTime,
    end: std::time::SystemTime,
    step: Duration,
) -> Result<Vec<crate::core::check::Observation>, String> {
    use std::collections::BTreeMap;
    let client = build_client()?;
    let endpoint_text = format!("{}/api/v1/query_range", spec.url.trim_end_matches('/'));
    let endpoint = reqwest::Url::parse(&endpoint_text)
        .map_err(|error| format!("{endpoint_text:?} is not a URL: {error}"))?;
    let seconds = |t: std::time::SystemTime| millis(t) as f64 / 1000.0;
    let step = Duration::from_secs(step.as_secs().max(1));
    let vars = SnapshotVars {
        worker: worker.to_owned(),
        previous: None,
        interval: step,
    };
    let window = spec.interval_window(step);
    let range = |expression: &str| {
        let expression = vars.substitute_promql(expression, window);
        let mut url = endpoint.clone();
        let client = client.clone();
        async move {
            url.query_pairs_mut()
                .append_pair("query", &expression?)
                .append_pair("start", &format!("{:.3}", seconds(start)))
                .append_pair("end", &format!("{:.3}", seconds(end)))
                .append_pair("step", &format!("{}s", step.as_secs()));
            parse_range_response(&get_api_body(&client, url).await?)
        }
    };
    let optional = |expression: &Option<String>| {
        let query = expression.as_deref().map(range);
        async move {
            match query {
                None => BTreeMap::new(),
                Some(query) => query.await.unwrap_or_default(),
            }
        }
    };
    let all = async {
        tokio::join!(
            range(&spec.error_rate),
            optional(&spec.requests),
            optional(&spec.latency_p95_ms),
            optional(&spec.latency_p99_ms)
        )
    };
    let (rates, requests, p95, p99) = tokio::time::timeout(timeout, all)
        .await
        .map_err(|_| timeout_reason(timeout))?;
    let rates = rates.map_err(|reason| format!("prometheus error_rate range query: {reason}"))?;
    // Only points inside the window asked for: a buggy or hostile server's 1970 points (or
    // any outside start..=end) are not the previous version's recent traffic.
    let window = millis(start)..=millis(end);
    let inside = |points: BTreeMap<i64, f64>| -> BTreeMap<i64, f64> {
        points
            .into_iter()
            .filter(|(at_ms, _)| window.contains(at_ms))
            .collect()
    };
    let answered = rates.len();
    let (rates, requests, p95, p99) = (inside(rates), inside(requests), inside(p95), inside(p99));
    if rates.len() < answered {
        tracing::warn!(
            dropped = answered - rates.len(),
            "the Prometheus baseline query returned points outside the window asked for; they are left out"
        );
    }
    let usable = |v: Option<&f64>| v.copied().filter(|v| v.is_finite() && *v >= 0.0);
    let scale = spec.requests_scale(step);
    Ok(rates
        .iter()
        .map(|(at_ms, rate)| crate::core::check::Observation {
            at_seconds: *at_ms as f64 / 1000.0,
            error_rate: Some(*rate).filter(|r| r.is_finite() && (0.0..=1.0).contains(r)),
            requests: usable(requests.get(at_ms)).map(|n| n * scale),
            latency_p95_ms: usable(p95.get(at_ms)),
            latency_p99_ms: usable(p99.get(at_ms)),
        })
        .collect())
}

/// `t` in Unix milliseconds, as the range query sends it (`start`, `end` to the
/// millisecond) and as its points are keyed.
fn millis(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Reads a range-query response: the first series' `[timestamp, "value"]` pairs by
/// timestamp in milliseconds (unparsable values left out). `Err` is a provider failure.
pub(super) fn parse_range_response(
    body: &[u8],
) -> Result<std::collections::BTreeMap<i64, f64>, String> {
    let data = api_data(body)?;
    if data.get("resultType").and_then(Value::as_str) != Some("matrix") {
        return Err(format!("range result is not a matrix: {}", excerpt(body)));
    }
    let mut out = std::collections::BTreeMap::new();
    let Some(first) = data
        .get("result")
        .and_then(Value::as_array)
        .and_then(|s| s.first())
    else {
        return Ok(out);
    };
    for pair in first
        .get("values")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some([at, value]) = pair
            .as_array()
            .map(Vec::as_slice)
            .and_then(|p| <&[Value; 2]>::try_from(p).ok())
        else {
            continue;
        };
        let (Some(at), Some(value)) = (
            at.as_f64(),
            value.as_str().and_then(|t| t.trim().parse::<f64>().ok()),
        ) else {
            continue;
        };
        out.insert((at * 1000.0).round() as i64, value);
    }
    Ok(out)
}

impl SnapshotSource for PrometheusSnapshotSource {
    fn snapshot<'a>(&'a self, vars: &'a SnapshotVars) -> BoxFuture<'a, SnapshotOutcome> {
        Box::pin(async move {
            let deadline = crate::sys::clock::deadline_tokio(Instant::now(), self.timeout);
            let spec = &self.spec;
            let window = spec.interval_window(vars.interval);
            let expand = |query: &str| vars.substitute_promql(query, window);
            let expand_optional = |query: Option<&String>| query.map(|q| expand(q));
            let error_rate_query = match expand(&spec.error_rate) {
                Ok(query) => query,
                Err(reason) => {
                    return SnapshotOutcome::Unavailable {
                        reason: format!("prometheus error_rate query: {reason}"),
                    }
                }
            };
            let (requests, p95, p99) = (
                expand_optional(spec.requests.as_ref()),
                expand_optional(spec.latency_p95_ms.as_ref()),
                expand_optional(spec.latency_p99_ms.as_ref()),
            );
            let (error_rate, requests, latency_p95_ms, latency_p99_ms) = tokio::join!(
                self.query(&error_rate_query, deadline),
                self.optional_query(requests, deadline),
                self.optional_query(p95, deadline),
                self.optional_query(p99, deadline),
            );
            // Each request once: a window longer than the time since the previous check
            // would count the requests the previous check counted again.
            let requests = match requests {
                Sample::Number(n) => Sample::Number(n * spec.requests_scale(vars.interval)),
                other => other,
            };
            match error_rate {
                Ok(error_rate) => SnapshotOutcome::Values(Snapshot {
                    error_rate,
                    requests,
                    latency_p95_ms,
                    latency_p99_ms,
                    ..Snapshot::default()
                }),
                Err(reason) => SnapshotOutcome::Unavailable {
                    reason: format!("prometheus error_rate query: {reason}"),
                },
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(values: &[&str]) -> Vec<u8> {
        let series: Vec<String> = values
            .iter()
            .map(|v| format!(r#"{{"metric":{{}},"value":[1700000000.123,"{v}"]}}"#))
            .collect();
        format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{}]}}}}"#,
            series.join(",")
        )
        .into_bytes()
    }

    #[test]
    fn vector_values() {
        assert_eq!(
            parse_query_response(&vector(&["0.25"])),
            Ok(Sample::Number(0.25))
        );
        assert_eq!(parse_query_response(&vector(&[])), Ok(Sample::Missing));
        assert_eq!(
            parse_query_response(&vector(&["0.1", "0.9"])),
            Ok(Sample::Number(0.1)),
            "first series wins"
        );
        assert!(matches!(
            parse_query_response(&vector(&["NaN"])),
            Ok(Sample::Number(v)) if v.is_nan()
        ));
        assert_eq!(
            parse_query_response(&vector(&["+Inf"])),
            Ok(Sample::Number(f64::INFINITY))
        );
        assert_eq!(
            parse_query_response(&vector(&["-Inf"])),
            Ok(Sample::Number(f64::NEG_INFINITY))
        );
        assert_eq!(
            parse_query_response(&vector(&["1e+308"])),
            Ok(Sample::Number(1e308))
        );
        assert_eq!(
            parse_query_response(&vector(&["abc"])),
            Ok(Sample::Wrong("\"abc\"".into()))
        );
    }

    #[test]
    fn range_values_by_timestamp() {
        let body = br#"{"status":"success","data":{"resultType":"matrix","result":[{"metric":{},"values":[[1700000000,"0.01"],[1700000030.5,"NaN"],[1700000060,"x"],[1700000090,"0.02"]]},{"metric":{},"values":[[1,"9"]]}]}}"#;
        let values = parse_range_response(body).unwrap();
        assert_eq!(values.get(&1_700_000_000_000), Some(&0.01));
        assert!(values.get(&1_700_000_030_500).unwrap().is_nan());
        assert_eq!(values.get(&1_700_000_060_000), None);
        assert_eq!(values.len(), 3);
        let empty = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse_range_response(empty).unwrap().is_empty());
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert!(parse_range_response(vector).is_err());
        let error = br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert!(parse_range_response(error)
            .unwrap_err()
            .contains("parse error"));
    }

    #[test]
    fn scalar_value() {
        let body = br#"{"status":"success","data":{"resultType":"scalar","result":[1.5,"42"]}}"#;
        assert_eq!(parse_query_response(body), Ok(Sample::Number(42.0)));
    }

    #[test]
    fn provider_failures() {
        let error = br#"{"status":"error","errorType":"bad_data","error":"parse error at char 3"}"#;
        let reason = parse_query_response(error).unwrap_err();
        assert!(
            reason.contains("bad_data") && reason.contains("parse error"),
            "{reason}"
        );
        assert!(parse_query_response(b"<html>").is_err());
        assert!(parse_query_response(b"{}").is_err());
        assert!(parse_query_response(
            br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#
        )
        .is_err());
        assert!(parse_query_response(
            br#"{"status":"success","data":{"resultType":"vector","result":[{"value":7}]}}"#
        )
        .is_err());
        assert!(parse_query_response("[".repeat(100_000).as_bytes()).is_err());
    }
}
