//! The HTTP endpoint (`/metrics`, `/status`, `/healthz`): the real binary on loopback, and
//! the server on its own against a driver that does not answer.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn metrics(addr: std::net::SocketAddr) -> String {
    let response = http_get(addr, "/metrics");
    assert_eq!(response.status, 200, "{response:?}");
    response.body
}

/// Polls `/metrics` until every `(series, value)` holds at once (one scrape is not a
/// transaction: the driver updates counters and gauges at separate points of an event).
fn wait_metrics(setup: &Setup, addr: std::net::SocketAddr, expected: &[(&str, f64)]) -> String {
    wait_metric_where(setup, addr, &format!("{expected:?}"), |text| {
        expected
            .iter()
            .all(|(series, value)| metric_value(text, series) == Some(*value))
    })
}

/// Polls `/metrics` until `condition` holds; fails with the last exposition.
fn wait_metric_where(
    setup: &Setup,
    addr: std::net::SocketAddr,
    what: &str,
    condition: impl Fn(&str) -> bool,
) -> String {
    let mut last = String::new();
    let seen = wait_for(Duration::from_secs(15), || {
        last = metrics(addr);
        condition(&last)
    });
    assert!(
        seen.is_some(),
        "/metrics never showed {what}; last /metrics:\n{last}\ndaemon log:\n{}",
        setup.daemon_log()
    );
    last
}

#[test]
fn metrics_status_and_healthz_follow_a_session_to_its_rollback() {
    let setup = Setup::new("[http]\nlisten = \"127.0.0.1:0\"");
    let daemon = setup.start();
    let addr = setup.http_addr();

    let health = http_get(addr, "/healthz");
    assert_eq!((health.status, health.body.trim()), (200, "ok"));

    // /status is the driver's own answer: the same document as `status --json`.
    let status = http_get(addr, "/status");
    assert_eq!(status.status, 200);
    assert_eq!(status.header("content-type"), Some("application/json"));
    let over_http: Value = serde_json::from_str(&status.body).unwrap();
    let cli = setup.cli(&["status", "--json"]);
    let over_socket: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(over_http["daemon"], "running");
    assert_eq!(over_http["state"], "idle");
    for key in ["pid", "since", "configHash", "state", "killSwitch"] {
        assert_eq!(over_http[key], over_socket[key], "{key}");
    }
    assert_eq!(http_request("POST", addr, "/status").unwrap().status, 405);
    // As documented (README, example config): HEAD answers like GET, without a body.
    let head = http_request("HEAD", addr, "/healthz").unwrap();
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty(), "{}", head.body);
    assert_eq!(
        http_request("DELETE", addr, "/metrics").unwrap().status,
        405
    );
    assert_eq!(http_get(addr, "/nothing-here").status, 404);

    let response = http_get(addr, "/metrics");
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{response:?}"
    );
    let idle = response.body;
    assert_eq!(
        metric_value(&idle, "rollbackd_session_state{state=\"idle\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric_value(&idle, "rollbackd_checks_total{verdict=\"healthy\"}"),
        Some(0.0)
    );
    assert_eq!(metric_value(&idle, "rollbackd_kill_switch"), Some(0.0));

    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert!(out.status.success());
    wait_metric_where(&setup, addr, "a healthy check", |text| {
        metric_value(text, "rollbackd_checks_total{verdict=\"healthy\"}").is_some_and(|n| n >= 1.0)
    });
    wait_metrics(
        &setup,
        addr,
        &[
            ("rollbackd_session_state{state=\"monitoring\"}", 1.0),
            ("rollbackd_session_state{state=\"idle\"}", 0.0),
            ("rollbackd_verdict{verdict=\"healthy\"}", 1.0),
            ("rollbackd_last_error_rate", 0.01),
        ],
    );
    let status: Value = serde_json::from_str(&http_get(addr, "/status").body).unwrap();
    assert_eq!(status["state"], "monitoring");
    assert_eq!(status["session"]["active"], "v2");

    // Bad data from the operations manager is counted by kind: an out-of-range rate is
    // invalid, an HTTP 500 is a provider error (one of each, well under the no-data limit).
    setup
        .routes
        .set("/snapshot", 200, r#"{"failureRate": 1.5}"#);
    wait_metric_where(&setup, addr, "an invalid check", |text| {
        metric_value(text, "rollbackd_invalid_data_total").is_some_and(|n| n >= 1.0)
    });
    setup.routes.set("/snapshot", 500, "upstream down");
    let text = wait_metric_where(&setup, addr, "a provider error", |text| {
        metric_value(text, "rollbackd_provider_errors_total").is_some_and(|n| n >= 1.0)
    });
    assert!(
        metric_value(&text, "rollbackd_last_error_rate").is_some_and(f64::is_nan),
        "a check without a usable error rate shows NaN"
    );

    setup.routes.error_rate(0.45);
    let text = wait_metrics(
        &setup,
        addr,
        &[
            (
                "rollbackd_rollbacks_total{trigger=\"automatic\",outcome=\"executed\"}",
                1.0,
            ),
            ("rollbackd_session_state{state=\"idle\"}", 1.0),
            ("rollbackd_session_state{state=\"monitoring\"}", 0.0),
        ],
    );
    assert_eq!(setup.switches(), ["v1"]);
    assert!(
        metric_value(&text, "rollbackd_checks_total{verdict=\"rollback\"}").unwrap() >= 1.0,
        "{text}"
    );
    assert_eq!(metric_value(&text, "rollbackd_last_error_rate"), Some(0.45));
    assert_eq!(
        metric_value(&text, "rollbackd_escalations_total"),
        Some(0.0)
    );
    // Every evaluated check observed its probe's duration.
    let checks: f64 = ["healthy", "degraded", "escalate", "rollback"]
        .iter()
        .map(|v| {
            metric_value(&text, &format!("rollbackd_checks_total{{verdict=\"{v}\"}}")).unwrap()
        })
        .sum();
    assert_eq!(
        metric_value(&text, "rollbackd_probe_duration_seconds_count"),
        Some(checks)
    );
    assert_eq!(
        metric_value(&text, "rollbackd_audit_records_pending"),
        Some(0.0)
    );

    // The kill switch gauge follows the application's database.
    let out = setup.cli(&["kill-switch", "set", "--reason", "metrics test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_metrics(&setup, addr, &[("rollbackd_kill_switch", 1.0)]);

    assert_eq!(daemon.terminate().code(), Some(0));
    assert!(
        http_request("GET", addr, "/healthz").is_err(),
        "the endpoint stops with the daemon"
    );
}

#[test]
fn an_escalation_shows_in_the_metrics() {
    let setup = Setup::new("[http]\nlisten = \"127.0.0.1:0\"");
    let _daemon = setup.start();
    let addr = setup.http_addr();
    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert!(out.status.success());
    setup.routes.set("/v2/health", 503, r#"{"status":"down"}"#);
    wait_metrics(
        &setup,
        addr,
        &[
            ("rollbackd_escalations_total", 1.0),
            ("rollbackd_session_state{state=\"escalated\"}", 1.0),
            ("rollbackd_session_state{state=\"monitoring\"}", 0.0),
            ("rollbackd_kill_switch", 1.0),
        ],
    );
    assert_eq!(setup.events("escalation-triggered").len(), 1);
    let status: Value = serde_json::from_str(&http_get(addr, "/status").body).unwrap();
    assert_eq!(status["state"], "escalated");
    assert_eq!(status["killSwitch"]["on"], true);
}

#[test]
fn the_endpoint_is_off_when_listen_is_empty() {
    let setup = Setup::new(""); // the test configuration has listen = ""
    let _daemon = setup.start();
    assert!(
        !setup.daemon_log().contains("http endpoint listening"),
        "{}",
        setup.daemon_log()
    );
}

/// `/healthz` is a liveness test of the driver loop: a driver that takes commands but
/// does not answer, or has stopped, is unhealthy; `/metrics` does not depend on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_when_the_driver_does_not_answer() {
    use rollbackd::daemon::http::HttpServer;
    use rollbackd::daemon::metrics::Metrics;
    use tokio_util::sync::CancellationToken;

    let (commands_tx, mut commands_rx) = tokio::sync::mpsc::channel(4);
    let server = HttpServer::bind("127.0.0.1:0".parse().unwrap(), Metrics::new(), commands_tx)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.serve(shutdown.clone()));
    // A stuck driver: it takes each command and never replies.
    let stuck = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(command) = commands_rx.recv().await {
            held.push(command);
        }
    });

    let get = |path: &'static str| tokio::task::spawn_blocking(move || http_get(addr, path));
    let started = std::time::Instant::now();
    let health = get("/healthz").await.unwrap();
    assert_eq!(health.status, 503, "{health:?}");
    assert!(health.body.contains("did not answer"), "{health:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "gave up after about a second"
    );
    let metrics = get("/metrics").await.unwrap();
    assert_eq!(metrics.status, 200);

    // A driver that has stopped.
    stuck.abort();
    let _ = stuck.await;
    let health = get("/healthz").await.unwrap();
    assert_eq!(health.status, 503, "{health:?}");
    shutdown.cancel();
}

/// At its connection limit the endpoint does not accept: further connections wait in the
/// kernel's backlog (costing the daemon no descriptor) and are served once a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_its_connection_limit_the_endpoint_leaves_connections_in_the_backlog() {
    use rollbackd::daemon::http::HttpServer;
    use rollbackd::daemon::metrics::Metrics;
    use std::io::{Read, Write};
    use tokio_util::sync::CancellationToken;

    let (commands_tx, _commands_rx) = tokio::sync::mpsc::channel(4);
    let server = HttpServer::bind("127.0.0.1:0".parse().unwrap(), Metrics::new(), commands_tx)
        .await
        .unwrap()
        .with_max_connections(2);
    let addr = server.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(server.serve(shutdown.clone()));

    tokio::task::spawn_blocking(move || {
        // Two idle connections take both slots: once connect() returns a connection is in
        // the accept queue, so an empty queue means the server has accepted both.
        let first = std::net::TcpStream::connect(addr).unwrap();
        let mut second = std::net::TcpStream::connect(addr).unwrap();
        let accepted = wait_for(Duration::from_secs(30), || {
            accept_queue(addr.port()) == Some(0)
        });
        assert!(
            accepted.is_some(),
            "the server accepts the first two connections"
        );
        let mut third = std::net::TcpStream::connect(addr).unwrap();
        write!(
            third,
            "GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        // The server is busy serving meanwhile (a request on the second connection is
        // answered), yet the third is not taken from the backlog.
        let metrics = keep_alive_get(&mut second, addr, "/metrics");
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert_eq!(
            accept_queue(addr.port()),
            Some(1),
            "the third connection waits in the backlog"
        );
        // A slot frees: the third is accepted and answered.
        drop(first);
        third
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut answer = String::new();
        third.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    })
    .await
    .unwrap();
    shutdown.cancel();
}

/// One GET on a keep-alive connection; returns the response head and its
/// content-length-framed body.
fn keep_alive_get(
    stream: &mut std::net::TcpStream,
    addr: std::net::SocketAddr,
    path: &str,
) -> String {
    use std::io::{Read, Write};
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .expect("a content-length");
            if body.len() >= length {
                return text;
            }
        }
        let n = stream.read(&mut buf).expect("the response arrives");
        assert!(n > 0, "the connection stays open for the response");
        raw.extend_from_slice(&buf[..n]);
    }
}
