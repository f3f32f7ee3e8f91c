//! The Prometheus source against a fake query API on loopback: what it asks (version-scoped
//! templates, `{interval}`), what it counts (each request once), what it keeps (only
//! points inside the window asked for). The same source against a real Prometheus is
//! tests/prometheus.rs.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::fake_prometheus::*;
use rollbackd::config::PrometheusSpec;

const TIMEOUT: Duration = Duration::from_secs(2);

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn spec(server: &FakePrometheus, requests: Option<&str>) -> PrometheusSpec {
    PrometheusSpec {
        url: server.url(),
        error_rate: "error_rate_query".into(),
        requests: requests.map(str::to_owned),
        latency_p95_ms: None,
        latency_p99_ms: None,
    }
}

/// Issue 24 item 4: points outside [start, end] — here 1970 timestamps a hostile or buggy
/// server adds, with a 90% error rate — never reach the baseline.
#[tokio::test]
async fn range_points_outside_the_window_are_dropped_from_the_baseline() {
    let server = FakePrometheus::start(|request| {
        let (start, end, step) = (
            request.param_f64("start"),
            request.param_f64("end"),
            request.param_f64("step").max(1.0),
        );
        let value = if request.query() == "error_rate_query" {
            "0.01"
        } else {
            "100"
        };
        let mut points = vec![(1.0, "0.9".to_owned()), (60.0, "0.9".to_owned())];
        points.extend(steps(start, end, step, |_| value.to_owned()));
        // And one just past the end.
        points.push((end + 30.0, "0.9".to_owned()));
        matrix(&points)
    });
    let end = SystemTime::now();
    let start = end - Duration::from_secs(120);
    let observations = rollbackd::adapters::range_observations(
        &spec(&server, Some("requests_query")),
        TIMEOUT,
        start,
        end,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(observations.len(), 5, "{:?}", observations.first());
    for observation in &observations {
        assert!(
            observation.at_seconds >= unix(start) - 0.001
                && observation.at_seconds <= unix(end) + 0.001,
            "{observation:?}"
        );
        assert_eq!(observation.error_rate, Some(0.01), "{observation:?}");
    }
}
