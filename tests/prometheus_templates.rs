//! The Prometheus source against a fake query API on loopback: what it asks (version-scoped
//! templates, `{interval}`), what it counts (each request once), what it keeps (only
//! points inside the window asked for). The same source against a real Prometheus is
//! tests/prometheus.rs.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::fake_prometheus::*;
use rollbackd::adapters::{snapshot_source, SnapshotVars};
use rollbackd::config::{PrometheusSpec, SnapshotSpec};
use rollbackd::core::check::{Sample, Snapshot, SnapshotOutcome};

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
        scrape_interval: Duration::from_secs(15),
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
        "v1",
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

// ---------------------------------------------------------------------------------------
// Version-scoped queries and counts that count each request once (issue 25 items 1, 2)

const ERROR_RATE: &str = r#"sum(rate(http_requests_total{version="{worker}",code=~"5.."}[{interval}])) / sum(rate(http_requests_total{version="{worker}"}[{interval}]))"#;
const REQUESTS: &str =
    r#"sum(increase(http_requests_total{version="{worker}"}[{interval}])) or vector(0)"#;

fn scoped_spec(server: &FakePrometheus, requests: &str, scrape: Duration) -> PrometheusSpec {
    PrometheusSpec {
        url: server.url(),
        error_rate: ERROR_RATE.into(),
        requests: Some(requests.into()),
        latency_p95_ms: Some(r#"p95_ms{version="{worker}",previous="{previous}"}"#.into()),
        latency_p99_ms: None,
        scrape_interval: scrape,
    }
}

fn vars(worker: &str, previous: Option<&str>, interval: Duration) -> SnapshotVars {
    SnapshotVars {
        worker: worker.into(),
        previous: previous.map(str::to_owned),
        interval,
    }
}

/// A counter served at `rps` requests a second: what `increase(...[RANGE])` and `rate()`
/// answer, from the range in the query.
fn served(rps: f64) -> impl Fn(&PromRequest) -> Answer + Send + Sync {
    move |request| {
        let query = request.query();
        let range = query
            .split('[')
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .and_then(rollbackd::config::parse_prometheus_duration)
            .map(|d| d.as_secs_f64())
            .unwrap_or(f64::NAN);
        let value = if query.contains("increase(") {
            rps * range
        } else if query.starts_with("p95_ms") {
            180.0
        } else {
            0.01
        };
        if request.is_range() {
            let (start, end, step) = (
                request.param_f64("start"),
                request.param_f64("end"),
                request.param_f64("step"),
            );
            matrix(&steps(start, end, step, |_| value.to_string()))
        } else {
            vector(&value.to_string())
        }
    }
}

async fn snapshot(spec: &PrometheusSpec, vars: &SnapshotVars) -> Snapshot {
    match snapshot_source(Some(&SnapshotSpec::Prometheus(spec.clone())), TIMEOUT)
        .snapshot(vars)
        .await
    {
        SnapshotOutcome::Values(snapshot) => snapshot,
        other => panic!("no values: {other:?}"),
    }
}

#[tokio::test]
async fn worker_previous_and_interval_are_substituted_into_every_query() {
    let server = FakePrometheus::start(served(200.0));
    let spec = scoped_spec(&server, REQUESTS, Duration::from_secs(15));
    let snap = snapshot(&spec, &vars("v2", Some("v1"), Duration::from_secs(30))).await;
    let mut queries = server.instant_queries();
    queries.sort();
    assert_eq!(
        queries,
        [
            r#"p95_ms{version="v2",previous="v1"}"#,
            r#"sum(increase(http_requests_total{version="v2"}[30s])) or vector(0)"#,
            r#"sum(rate(http_requests_total{version="v2",code=~"5.."}[30s])) / sum(rate(http_requests_total{version="v2"}[30s]))"#,
        ]
    );
    assert_eq!(snap.error_rate, Sample::Number(0.01));
    // The window is the time since the previous check: 30 s at 200/s, counted once.
    assert_eq!(snap.requests, Sample::Number(6000.0));
    assert_eq!(snap.latency_p95_ms, Sample::Number(180.0));

    // No previous version known: `{previous}` is empty; a first check's `{interval}` in
    // milliseconds when it is not whole seconds.
    let server = FakePrometheus::start(served(200.0));
    let spec = scoped_spec(&server, REQUESTS, Duration::from_millis(100));
    snapshot(
        &spec,
        &vars("v1.2.3+build.5", None, Duration::from_millis(2500)),
    )
    .await;
    let queries = server.instant_queries();
    assert!(
        queries.contains(&r#"p95_ms{version="v1.2.3+build.5",previous=""}"#.to_owned()),
        "{queries:?}"
    );
    assert!(
        queries.iter().any(|q| q.contains("[2500ms]")),
        "{queries:?}"
    );
}

#[tokio::test]
async fn an_id_that_breaks_the_worker_id_rule_never_reaches_a_query() {
    let server = FakePrometheus::start(served(200.0));
    let spec = scoped_spec(&server, REQUESTS, Duration::from_secs(15));
    let outcome = snapshot_source(Some(&SnapshotSpec::Prometheus(spec)), TIMEOUT)
        .snapshot(&vars(
            r#"v2"} or vector(1) or x{a=""#,
            None,
            Duration::from_secs(30),
        ))
        .await;
    match outcome {
        SnapshotOutcome::Unavailable { reason } => {
            assert!(reason.contains("invalid worker id"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}

/// `{interval}` is never shorter than two scrapes (else `rate()` has one sample and
/// answers nothing); the requests of the wider window are scaled back to the interval.
#[tokio::test]
async fn a_check_interval_shorter_than_two_scrapes_widens_the_window_and_scales_the_count() {
    let server = FakePrometheus::start(served(200.0));
    let spec = scoped_spec(&server, REQUESTS, Duration::from_secs(2));
    let snap = snapshot(&spec, &vars("v2", Some("v1"), Duration::from_secs(3))).await;
    assert!(
        server
            .instant_queries()
            .iter()
            .all(|q| !q.contains('[') || q.contains("[4s]")),
        "{:?}",
        server.instant_queries()
    );
    // 4 s of requests (800) scaled by 3/4: the 600 served since the previous check.
    assert_eq!(snap.requests, Sample::Number(600.0));
}

/// The issue's `increase(...[1m])` every 3 s counted each request 20 times; scaled by
/// interval / range it counts them once.
#[tokio::test]
async fn a_fixed_range_longer_than_the_interval_is_scaled_to_count_each_request_once() {
    let server = FakePrometheus::start(served(200.0));
    let fixed = r#"sum(increase(http_requests_total{version="{worker}"}[1m]))"#;
    let spec = scoped_spec(&server, fixed, Duration::from_secs(2));
    let snap = snapshot(&spec, &vars("v2", Some("v1"), Duration::from_secs(3))).await;
    assert_eq!(snap.requests, Sample::Number(600.0));
    // Over a longer gap than the range, nothing is scaled up.
    let snap = snapshot(&spec, &vars("v2", Some("v1"), Duration::from_secs(90))).await;
    assert_eq!(snap.requests, Sample::Number(12000.0));
}

/// The baseline's range query runs over the previous version (`{worker}` = it), with
/// `{interval}` = its step; a `[1m]` window at a 30 s step is scaled so that each point
/// counts the 30 s before it: the points' sum is what was served.
#[tokio::test]
async fn the_baseline_range_query_is_of_the_previous_version_and_counts_each_request_once() {
    let server = FakePrometheus::start(served(200.0));
    let fixed = r#"sum(increase(http_requests_total{version="{worker}"}[1m]))"#;
    let spec = scoped_spec(&server, fixed, Duration::from_secs(15));
    let end = SystemTime::now();
    let step = Duration::from_secs(30);
    let observations = rollbackd::adapters::range_observations(
        &spec,
        TIMEOUT,
        "v1",
        end - Duration::from_secs(120),
        end,
        step,
    )
    .await
    .unwrap();
    let ranges: Vec<PromRequest> = server
        .requests()
        .into_iter()
        .filter(|r| r.is_range())
        .collect();
    assert!(!ranges.is_empty());
    for request in &ranges {
        assert!(request.query().contains(r#"version="v1""#), "{request:?}");
        assert!(!request.query().contains("{worker}"), "{request:?}");
        assert!(!request.query().contains("{interval}"), "{request:?}");
        assert_eq!(request.params["step"], "30s");
    }
    assert!(ranges
        .iter()
        .any(|r| r.query().contains("[30s]") && r.query().starts_with("sum(rate")));
    assert_eq!(observations.len(), 5);
    for observation in &observations {
        assert_eq!(observation.requests, Some(6000.0), "{observation:?}");
    }
}

// ---------------------------------------------------------------------------------------
// The daemon passes the versions (issue 25 item 1)

/// The operations source of a [`common::Setup`] swapped for `[operations.prometheus]` at
/// `url` with the version-scoped queries.
fn prometheus_config(setup: &common::Setup, url: &str, scrape: &str) {
    setup.rewrite_config(|config| {
        let operations = config["operations"].as_table_mut().unwrap();
        operations.remove("snapshot_url");
        let mut prometheus = toml::Table::new();
        prometheus.insert("url".into(), url.into());
        prometheus.insert("error_rate".into(), ERROR_RATE.into());
        prometheus.insert("requests".into(), REQUESTS.into());
        prometheus.insert("scrape_interval".into(), scrape.into());
        operations.insert("prometheus".into(), prometheus.into());
    });
}

/// With version-scoped queries, the canary's errors are judged on the canary alone, the
/// baseline on the previous version, and after the rollback the stability watch judges
/// the restored version on its own traffic: the bad version's errors still in the window
/// do not fail it (the issue's false SEV1).
#[test]
fn the_daemon_scopes_each_query_to_the_version_it_judges() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let bad = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&bad);
    let server = FakePrometheus::start(move |request| {
        let query = request.query();
        let v2 = query.contains(r#"version="v2""#);
        // v2 goes bad when told; v1 stays at 0.2% throughout.
        let rate = if v2 && flag.load(Ordering::SeqCst) {
            0.5
        } else {
            0.002
        };
        let value = if query.contains("increase(") {
            1000.0
        } else {
            rate
        };
        if request.is_range() {
            let (start, end, step) = (
                request.param_f64("start"),
                request.param_f64("end"),
                request.param_f64("step"),
            );
            matrix(&steps(start, end, step, |_| value.to_string()))
        } else {
            vector(&value.to_string())
        }
    });
    let setup = common::Setup::new(
        "[baseline]\nobserve_interval = \"0s\"\nwindow = \"1m\"\n[rollback]\nstability_period = \"2s\"",
    );
    prometheus_config(&setup, &server.url(), "50ms");
    let daemon = setup.start();
    setup.promote();
    let checked = common::wait_for(Duration::from_secs(10), || {
        setup.events("health-check").len() >= 3
    });
    assert!(checked.is_some(), "{}", setup.daemon_log());
    bad.store(true, Ordering::SeqCst);
    let confirmed = common::wait_for(Duration::from_secs(30), || {
        !setup.events("stability-confirmed").is_empty()
    });
    assert!(
        confirmed.is_some(),
        "the restored v1 was not confirmed stable; audit: {:#?}\nlog:\n{}",
        setup.audit(),
        setup.daemon_log()
    );
    assert!(setup.events("stability-failed").is_empty());
    assert!(setup.events("escalation-triggered").is_empty());
    assert_eq!(setup.switches(), ["v1"]);

    let requests = server.requests();
    // The baseline: the previous version over the window, every query.
    let ranges: Vec<&PromRequest> = requests.iter().filter(|r| r.is_range()).collect();
    assert!(!ranges.is_empty(), "no baseline range query");
    assert!(
        ranges.iter().all(|r| r.query().contains(r#"version="v1""#)),
        "{ranges:?}"
    );
    // The checks: v2 until the rollback, then v1 (the watch); nothing left unsubstituted.
    let instant: Vec<&str> = requests
        .iter()
        .filter(|r| !r.is_range())
        .map(|r| r.query())
        .collect();
    assert!(instant
        .iter()
        .all(|q| !q.contains('{') || q.contains("version=")));
    assert!(instant
        .iter()
        .all(|q| !q.contains("{worker}") && !q.contains("{interval}")));
    let first_v1 = instant
        .iter()
        .position(|q| q.contains(r#"version="v1""#))
        .expect("the watch queried v1");
    assert!(instant[..first_v1]
        .iter()
        .all(|q| q.contains(r#"version="v2""#)));
    assert!(instant[first_v1..]
        .iter()
        .all(|q| q.contains(r#"version="v1""#)));
    // `{interval}`: the first check of each version is the check interval (300ms), the
    // others the time since the previous check (about 150-300 ms here, never 0, never
    // the whole session).
    let windows: Vec<Duration> = instant
        .iter()
        .filter(|q| q.starts_with("sum(rate"))
        .map(|q| {
            let inside = q.split('[').nth(1).unwrap().split(']').next().unwrap();
            rollbackd::config::parse_prometheus_duration(inside).unwrap()
        })
        .collect();
    assert_eq!(windows[0], Duration::from_millis(300), "{windows:?}");
    let first_watch = instant[..first_v1]
        .iter()
        .filter(|q| q.starts_with("sum(rate"))
        .count();
    assert_eq!(
        windows[first_watch],
        Duration::from_millis(300),
        "{windows:?}"
    );
    assert!(
        windows
            .iter()
            .all(|w| *w >= Duration::from_millis(100) && *w <= Duration::from_secs(2)),
        "{windows:?}"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// check-config (issue 25 items 2, 3)

fn check_config_text(toml: &str) -> (String, Vec<String>) {
    let loaded = rollbackd::config::load_str(toml, &Default::default()).unwrap();
    let mut out = Vec::new();
    rollbackd::cli::print_check_config(&loaded, &mut out).unwrap();
    (String::from_utf8(out).unwrap(), loaded.warnings)
}

fn prometheus_toml(
    check_interval: &str,
    requests: &str,
    error_rate: &str,
    scrape: Option<&str>,
) -> String {
    format!(
        "[monitor]\ncheck_interval = {check_interval:?}\n[operations.prometheus]\nurl = \"http://127.0.0.1:9090\"\nerror_rate = '{error_rate}'\nrequests = '{requests}'\n{}",
        scrape
            .map(|s| format!("scrape_interval = {s:?}\n"))
            .unwrap_or_default()
    )
}

#[test]
fn check_config_says_how_requests_are_counted_once() {
    let (text, warnings) = check_config_text(&prometheus_toml("30s", REQUESTS, ERROR_RATE, None));
    assert!(
        text.contains("requests: counted once per check via {interval}"),
        "{text}"
    );
    // The default scrape interval is shown with the rest, and 15 s degraded checks are
    // shorter than two 15 s scrapes: said, with what is done about it.
    assert!(
        text.contains("operations.prometheus.scrape_interval"),
        "{text}"
    );
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("{interval} is widened to 30s")),
        "{warnings:?}"
    );

    let fixed = r#"sum(increase(http_requests_total{code=~"5[0-9][0-9]"}[1m]))"#;
    let (text, _) = check_config_text(&prometheus_toml("10s", fixed, "x", None));
    assert!(
        text.contains("requests: [1m] window scaled by interval/1m"),
        "{text}"
    );

    let (text, _) = check_config_text(&prometheus_toml("30s", "test_requests", "x", None));
    assert!(text.contains("requests: no range selector"), "{text}");

    let mixed = "sum(increase(a[1m])) + sum(increase(b[5m]))";
    let (text, _) = check_config_text(&prometheus_toml("30s", mixed, "x", None));
    assert!(
        text.contains("requests: ranges [1m], [5m] differ"),
        "{text}"
    );
}

#[test]
fn check_config_warns_about_ranges_shorter_than_two_scrapes() {
    let short = "sum(rate(errors[20s])) / sum(rate(requests[20s]))";
    let (_, warnings) = check_config_text(&prometheus_toml("30s", "x", short, None));
    assert!(
        warnings.iter().any(|w| w.starts_with(
            "operations.prometheus.error_rate: range [20s] is shorter than two scrape intervals"
        )),
        "{warnings:?}"
    );
    // The same with a 5 s scrape is fine.
    let (_, warnings) = check_config_text(&prometheus_toml("30s", "x", short, Some("5s")));
    assert!(
        !warnings.iter().any(|w| w.contains("[20s]")),
        "{warnings:?}"
    );

    // `{interval}` at a check interval shorter than two scrapes.
    let (_, warnings) =
        check_config_text(&prometheus_toml("10s", REQUESTS, ERROR_RATE, Some("15s")));
    assert!(
        warnings.iter().any(|w| w.contains(
            "checks come every 10s (monitor.check_interval), less than two scrape intervals"
        )),
        "{warnings:?}"
    );
    // A bracket inside a string literal is not a range.
    let quoted = r#"sum(rate(x{code=~"5[0-9]{2}"}[1m]))"#;
    let (_, warnings) = check_config_text(&prometheus_toml("30s", "x", quoted, None));
    assert!(
        warnings.iter().all(|w| !w.contains("[0-9]")),
        "{warnings:?}"
    );

    let invalid = rollbackd::config::load_str(
        "[operations.prometheus]\nurl = \"http://x:9090\"\nerror_rate = \"x\"\nscrape_interval = \"0s\"\n",
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        invalid.contains("operations.prometheus.scrape_interval"),
        "{invalid}"
    );
}

fn check_config_for_run(setup: &common::Setup) -> (i32, String, String) {
    let out = setup.cli(&["check-config", "--for", "run"]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_for_run_refuses_an_unreachable_prometheus_naming_the_key() {
    let setup = common::Setup::new("");
    prometheus_config(&setup, "http://127.0.0.1:1", "15s");
    let (code, stdout, stderr) = check_config_for_run(&setup);
    assert_eq!(code, 78, "{stdout}{stderr}");
    assert!(!stdout.contains("ready for"), "{stdout}");
    assert!(
        stderr.contains(
            "operations.prometheus.error_rate: the query failed: cannot reach http://127.0.0.1:1: "
        ),
        "{stderr}"
    );
    assert!(
        stderr.to_lowercase().contains("connection refused"),
        "{stderr}"
    );
    // The reason is not crowded out by the URL-encoded query.
    assert!(!stderr.contains("query="), "{stderr}");
}

#[test]
fn check_config_for_run_refuses_a_promql_error_and_warns_about_an_empty_result() {
    let server = FakePrometheus::start(|request| {
        if request.query().contains("increase(") {
            bad_data("1:35: parse error: unexpected <by>")
        } else if request.query().starts_with("p95") {
            empty_vector()
        } else {
            vector("0.0125")
        }
    });
    let setup = common::Setup::new("");
    prometheus_config(&setup, &server.url(), "15s");
    let (code, stdout, stderr) = check_config_for_run(&setup);
    assert_eq!(code, 78, "{stdout}{stderr}");
    assert!(
        stderr.contains("operations.prometheus.requests: the query failed: HTTP 400")
            && stderr.contains("HTTP 400")
            && stderr.contains("bad_data: 1:35: parse error"),
        "{stderr}"
    );
    // Each query ran once, the others' values printed.
    assert!(stdout.contains("0.0125"), "{stdout}");
    assert_eq!(
        server.instant_queries().len(),
        2,
        "{:?}",
        server.instant_queries()
    );

    // Fixed, and an empty p95: a warning, not a failure.
    let fixed = FakePrometheus::start(|request| {
        if request.query().starts_with("p95") {
            empty_vector()
        } else {
            vector("0.0125")
        }
    });
    prometheus_config(&setup, &fixed.url(), "15s");
    setup.rewrite_config(|config| {
        config["operations"]["prometheus"]
            .as_table_mut()
            .unwrap()
            .insert("latency_p95_ms".into(), r#"p95{version="{worker}"}"#.into());
    });
    let (code, stdout, stderr) = check_config_for_run(&setup);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("ready for `rollbackd run`"), "{stdout}");
    assert!(
        stdout.contains(
            "warning: operations.prometheus.latency_p95_ms: the query returned no series"
        ),
        "{stdout}"
    );
    // Before any promotion no worker is on record: `{worker}` is empty, and said so.
    assert!(
        stdout.contains(r#"{worker} = "" (none on record)"#),
        "{stdout}"
    );
    assert!(fixed
        .instant_queries()
        .iter()
        .any(|q| q == r#"p95{version=""}"#));
}
