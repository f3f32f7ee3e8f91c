//! End to end with a real Prometheus server (Debian's `prometheus` package; `.ci/run`
//! installs it): Prometheus scrapes a loopback test worker and rollbackd's own `/metrics`;
//! rollbackd takes its snapshots from Prometheus's query API and rolls back when the
//! worker's error rate rises; rollbackd's series arrive in Prometheus.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn prometheus_installed() -> bool {
    Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A Prometheus server, killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus on `port`, scraping `targets` (job name, address) every 200 ms,
    /// and waits until it is ready.
    fn start(dir: &std::path::Path, port: u16, targets: &[(&str, SocketAddr)]) -> Prometheus {
        let jobs: String = targets
            .iter()
            .map(|(job, addr)| {
                format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n")
            })
            .collect();
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 200ms\n  scrape_timeout: 200ms\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}"
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = dir.join("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let prometheus = Prometheus { child, addr, log };
        let ready = wait_for(Duration::from_secs(15), || {
            http_request("GET", addr, "/-/ready").is_ok_and(|r| r.status == 200)
        });
        assert!(
            ready.is_some(),
            "prometheus did not become ready; its log:\n{}",
            prometheus.log()
        );
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The instant vector of `query` (series with their values).
    fn query(&self, query: &str) -> Vec<(Value, f64)> {
        let mut encoded = String::new();
        for byte in query.bytes() {
            match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    encoded.push(byte as char)
                }
                _ => encoded.push_str(&format!("%{byte:02X}")),
            }
        }
        let response = http_get(self.addr, &format!("/api/v1/query?query={encoded}"));
        assert_eq!(response.status, 200, "{query}: {response:?}");
        let body: Value = serde_json::from_str(&response.body).unwrap();
        body["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|series| {
                let value = series["value"][1].as_str().unwrap().parse().unwrap();
                (series["metric"].clone(), value)
            })
            .collect()
    }
}

/// Points the daemon's snapshots at Prometheus on `port` (`test_error_rate`,
/// `test_requests`, the worker's gauges) instead of the test server's `/snapshot`.
fn snapshots_from_prometheus(setup: &Setup, port: u16) {
    setup.rewrite_config(|config| {
        let operations = config["operations"].as_table_mut().unwrap();
        operations.remove("snapshot_url");
        let mut prometheus = toml::Table::new();
        prometheus.insert("url".into(), format!("http://127.0.0.1:{port}").into());
        prometheus.insert("error_rate".into(), "test_error_rate".into());
        prometheus.insert("requests".into(), "test_requests".into());
        operations.insert("prometheus".into(), prometheus.into());
    });
}

fn worker_metrics(error_rate: f64, requests: u64) -> String {
    format!(
        "# TYPE test_error_rate gauge\ntest_error_rate {error_rate}\n# TYPE test_requests gauge\ntest_requests {requests}\n"
    )
}

#[test]
fn rollbackd_rolls_back_on_prometheus_data_and_prometheus_scrapes_rollbackd() {
    if !tool_available(
        prometheus_installed(),
        "rollbackd_rolls_back_on_prometheus_data_and_prometheus_scrapes_rollbackd",
        "prometheus",
    ) {
        return;
    }
    let started = Instant::now();
    let setup = Setup::new("[http]\nlisten = \"127.0.0.1:0\"");
    // The worker's own metrics, on the same loopback server as its health endpoints.
    setup
        .routes
        .set("/metrics", 200, &worker_metrics(0.01, 1000));
    let worker: SocketAddr = format!("127.0.0.1:{}", setup.port).parse().unwrap();

    // rollbackd must know Prometheus's address before it starts, and Prometheus
    // rollbackd's (which it picks itself): reserve Prometheus's port first.
    let prometheus_port = free_port();
    snapshots_from_prometheus(&setup, prometheus_port);
    let daemon = setup.start();
    let rollbackd = setup.http_addr();

    let prometheus = Prometheus::start(
        &setup.path("prometheus"),
        prometheus_port,
        &[("worker", worker), ("rollbackd", rollbackd)],
    );
    // Prometheus has scraped the worker once: from now on rollbackd's queries get data.
    let scraped = wait_for(Duration::from_secs(10), || {
        !prometheus.query("test_error_rate").is_empty()
    });
    assert!(
        scraped.is_some(),
        "prometheus never scraped the worker; its log:\n{}",
        prometheus.log()
    );

    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    assert!(out.status.success());
    // Healthy checks first, with the error rate read from Prometheus.
    let healthy = wait_for(Duration::from_secs(10), || {
        setup
            .events("health-check")
            .iter()
            .any(|c| c["verdict"] == "healthy" && c["errorRate"] == 0.01)
    });
    assert!(
        healthy.is_some(),
        "no healthy check on Prometheus data; daemon log:\n{}",
        setup.daemon_log()
    );

    setup
        .routes
        .set("/metrics", 200, &worker_metrics(0.45, 1000));
    let rolled_back = wait_for(Duration::from_secs(15), || {
        !setup.events("rollback-executed").is_empty()
    });
    assert!(
        rolled_back.is_some(),
        "no rollback; daemon log:\n{}\nprometheus log:\n{}",
        setup.daemon_log(),
        prometheus.log()
    );
    assert_eq!(setup.switches(), ["v1"], "the switch hook ran once, to v1");
    let artifact: Value =
        serde_json::from_str(&std::fs::read_to_string(&setup.artifacts("rollback_")[0]).unwrap())
            .unwrap();
    assert_eq!(artifact["status"], "executed");
    assert_eq!(artifact["errorRate"], 0.45);
    // Every check had Prometheus's answer: no provider errors, no missing data.
    for check in setup.events("health-check") {
        assert!(
            check["errorClass"] == "ok" || check["errorClass"] == "breach",
            "{check}"
        );
    }

    // rollbackd's own series arrive in Prometheus, the rollback included.
    let mut last = Vec::new();
    let arrived = wait_for(Duration::from_secs(10), || {
        last = prometheus.query(
            r#"rollbackd_rollbacks_total{job="rollbackd",trigger="automatic",outcome="executed"}"#,
        );
        last.first().is_some_and(|(_, v)| *v == 1.0)
    });
    assert!(
        arrived.is_some(),
        "rollbackd_rollbacks_total never reached Prometheus ({last:?}); prometheus log:\n{}",
        prometheus.log()
    );
    let checks = prometheus.query("sum(rollbackd_checks_total)");
    assert!(checks.first().is_some_and(|(_, v)| *v >= 3.0), "{checks:?}");
    let up = prometheus.query(r#"up{job="rollbackd"}"#);
    assert_eq!(up.first().map(|(_, v)| *v), Some(1.0), "{up:?}");

    assert_eq!(daemon.terminate().code(), Some(0));
    drop(prometheus);
    eprintln!(
        "prometheus end-to-end: rollback {:.1} s after the error rate rose; whole test {:.1} s",
        rolled_back.unwrap().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// SPEC §2a: with no observations of its own (observe_interval = 0, as on a freshly
/// installed host), a promotion's baseline comes from Prometheus over the window ending at
/// the promotion (a range query), and a regression far below the absolute 20% is rolled
/// back on it.
#[test]
fn the_baseline_comes_from_a_prometheus_range_query_when_rollbackd_has_not_observed() {
    if !tool_available(
        prometheus_installed(),
        "the_baseline_comes_from_a_prometheus_range_query_when_rollbackd_has_not_observed",
        "prometheus",
    ) {
        return;
    }
    let setup =
        Setup::new("[baseline]\nobserve_interval = \"0s\"\nwindow = \"1m\"\nmin_samples = 3\n");
    let metrics = |rate: f64| worker_metrics(rate, 5000);
    setup.routes.set("/metrics", 200, &metrics(0.003));
    let worker: SocketAddr = format!("127.0.0.1:{}", setup.port).parse().unwrap();
    let prometheus_port = free_port();
    snapshots_from_prometheus(&setup, prometheus_port);
    let daemon = setup.start();
    let prometheus = Prometheus::start(
        &setup.path("prometheus"),
        prometheus_port,
        &[("worker", worker)],
    );
    // Enough history for the 1 s steps of the range query: 5 points.
    let history = wait_for(Duration::from_secs(20), || {
        let end = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let path = format!(
            "/api/v1/query_range?query=test_error_rate&start={:.3}&end={end:.3}&step=1s",
            end - 60.0
        );
        let response = http_get(prometheus.addr, &path);
        let body: Value = serde_json::from_str(&response.body).unwrap_or_default();
        body["data"]["result"][0]["values"]
            .as_array()
            .is_some_and(|values| values.len() >= 5)
    });
    assert!(
        history.is_some(),
        "no history in prometheus; its log:\n{}",
        prometheus.log()
    );

    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("baseline: error rate 0.30% (") && stdout.contains("[prometheus, "),
        "{stdout}\ndaemon log:\n{}",
        setup.daemon_log()
    );

    // 1.2%: a quarter of the absolute threshold, four times the baseline.
    setup.routes.set("/metrics", 200, &metrics(0.012));
    let rolled_back = wait_for(Duration::from_secs(20), || {
        !setup.events("rollback-executed").is_empty()
    });
    assert!(
        rolled_back.is_some(),
        "no rollback; daemon log:\n{}",
        setup.daemon_log()
    );
    let artifact: Value =
        serde_json::from_str(&std::fs::read_to_string(&setup.artifacts("rollback_")[0]).unwrap())
            .unwrap();
    assert_eq!(
        artifact["evidence"]["baseline"]["source"], "prometheus",
        "{artifact}"
    );
    let fired = artifact["evidence"]["rulesFired"].as_array().unwrap();
    assert!(
        fired
            .iter()
            .any(|r| r["rule"] == "baseline" && r["pValue"].as_f64().is_some()),
        "{artifact}"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
}
