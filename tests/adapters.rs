//! The adapters against real loopback servers and real processes (SPEC §3, §7): every
//! hostile body or hanging endpoint must become data (a failed probe, an unavailable
//! snapshot, an invalid value) within the check timeout, never a hang, a panic or a
//! gigabyte of memory.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rollbackd::adapters::{
    resource_sampler, snapshot_source, substitute_worker, worker_probe, BoxFuture, SnapshotVars,
    WorkerProbe, MAX_BODY,
};
use rollbackd::config::{ProbeSpec, PrometheusSpec, SnapshotSpec};
use rollbackd::core::check::{ProbeOutcome, Sample, Snapshot, SnapshotOutcome};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TIMEOUT: Duration = Duration::from_secs(1);

/// A check of v2 (previous v1) a minute after the last one.
fn vars() -> SnapshotVars {
    SnapshotVars {
        worker: "v2".into(),
        previous: Some("v1".into()),
        interval: Duration::from_secs(60),
    }
}
/// Slack allowed over a timeout before a test calls it a hang.
const SLACK: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------
// A raw HTTP/1.1 server: reads the request head, records the request line, then hands the
// socket to a handler that writes whatever bytes it likes (hostile cases included).

struct RawServer {
    address: SocketAddr,
    request_lines: Arc<Mutex<Vec<String>>>,
}

impl RawServer {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn requests(&self) -> Vec<String> {
        self.request_lines.lock().unwrap().clone()
    }
}

async fn read_request_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

async fn raw_server<F, Fut>(handler: F) -> RawServer
where
    F: Fn(String, TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let request_lines = Arc::new(Mutex::new(Vec::new()));
    let lines = Arc::clone(&request_lines);
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let handler = Arc::clone(&handler);
            let lines = Arc::clone(&lines);
            tokio::spawn(async move {
                let head = read_request_head(&mut stream).await;
                let request_line = head.lines().next().unwrap_or_default().to_owned();
                lines.lock().unwrap().push(request_line.clone());
                handler(request_line, stream).await;
            });
        }
    });
    RawServer {
        address,
        request_lines,
    }
}

async fn write_response(stream: &mut TcpStream, status: &str, body: &[u8]) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body).await;
    let _ = stream.shutdown().await;
}

/// Answers every request with `status` and `body`.
async fn fixed_server(status: &'static str, body: impl Into<Vec<u8>>) -> RawServer {
    let body = Arc::new(body.into());
    raw_server(move |_, mut stream| {
        let body = Arc::clone(&body);
        async move { write_response(&mut stream, status, &body).await }
    })
    .await
}

/// A loopback address nothing listens on.
async fn refused_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

fn failed_reason(outcome: &ProbeOutcome) -> &str {
    match outcome {
        ProbeOutcome::Failed { reason } => reason,
        ProbeOutcome::Ok => panic!("expected a failed probe, got Ok"),
    }
}

fn values(outcome: SnapshotOutcome) -> Snapshot {
    match outcome {
        SnapshotOutcome::Values(snapshot) => snapshot,
        SnapshotOutcome::Unavailable { reason } => {
            panic!("expected values, got unavailable: {reason}")
        }
    }
}

fn unavailable(outcome: SnapshotOutcome) -> String {
    match outcome {
        SnapshotOutcome::Unavailable { reason } => reason,
        SnapshotOutcome::Values(snapshot) => panic!("expected unavailable, got {snapshot:?}"),
    }
}

fn assert_within(started: Instant, limit: Duration) {
    let elapsed = started.elapsed();
    assert!(elapsed < limit, "took {elapsed:?}, limit {limit:?}");
}

// ---------------------------------------------------------------------------------------
// Worker probe

async fn http_probe(url: String) -> ProbeOutcome {
    worker_probe(&ProbeSpec::Http(url), TIMEOUT)
        .probe("v2")
        .await
}

#[tokio::test]
async fn http_probe_200_ok_is_healthy() {
    let server = fixed_server("200 OK", r#"{"status":"ok"}"#).await;
    assert_eq!(http_probe(server.url("/health")).await, ProbeOutcome::Ok);
}

#[tokio::test]
async fn http_probe_200_without_status_field_or_json_is_healthy() {
    let plain = fixed_server("200 OK", "OK").await;
    assert_eq!(http_probe(plain.url("/health")).await, ProbeOutcome::Ok);
    let other = fixed_server("204 No Content", "").await;
    assert_eq!(http_probe(other.url("/health")).await, ProbeOutcome::Ok);
}

#[tokio::test]
async fn http_probe_200_degraded_body_fails() {
    let server = fixed_server("200 OK", r#"{"status":"degraded"}"#).await;
    let outcome = http_probe(server.url("/health")).await;
    assert!(failed_reason(&outcome).contains("degraded"), "{outcome:?}");
}

#[tokio::test]
async fn http_probe_500_fails_with_status_and_body_excerpt() {
    let server = fixed_server("500 Internal Server Error", "database on fire").await;
    let outcome = http_probe(server.url("/health")).await;
    let reason = failed_reason(&outcome);
    assert!(reason.contains("500"), "{reason}");
    assert!(reason.contains("database on fire"), "{reason}");
}

#[tokio::test]
async fn http_probe_redirect_is_not_followed() {
    let server = fixed_server("302 Found\r\nLocation: http://127.0.0.1:1/", "").await;
    let outcome = http_probe(server.url("/health")).await;
    assert!(failed_reason(&outcome).contains("302"), "{outcome:?}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn http_probe_refused_fails() {
    let address = refused_address().await;
    let started = Instant::now();
    let outcome = http_probe(format!("http://{address}/health")).await;
    assert!(!failed_reason(&outcome).is_empty());
    assert_within(started, TIMEOUT + SLACK);
}

#[tokio::test]
async fn http_probe_substitutes_worker_in_url() {
    let server = fixed_server("200 OK", r#"{"status":"ok"}"#).await;
    let probe = worker_probe(
        &ProbeSpec::Http(server.url("/workers/{worker}/health")),
        TIMEOUT,
    );
    assert_eq!(probe.probe("v7").await, ProbeOutcome::Ok);
    assert_eq!(server.requests(), vec!["GET /workers/v7/health HTTP/1.1"]);
}

#[tokio::test]
async fn http_probe_endless_body_times_out() {
    let server = raw_server(|_, mut stream| async move {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        while stream.write_all(b"1\r\nx\r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let started = Instant::now();
    let outcome = http_probe(server.url("/health")).await;
    assert_eq!(failed_reason(&outcome), "timeout after 1s");
    assert_within(started, TIMEOUT + SLACK);
}

#[tokio::test]
async fn tcp_probe_up_and_down() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    let probe = worker_probe(&ProbeSpec::Tcp(up.to_string()), TIMEOUT);
    assert_eq!(probe.probe("v1").await, ProbeOutcome::Ok);

    let down = refused_address().await;
    let probe = worker_probe(&ProbeSpec::Tcp(down.to_string()), TIMEOUT);
    let outcome = probe.probe("v1").await;
    assert!(
        failed_reason(&outcome).contains(&down.to_string()),
        "{outcome:?}"
    );

    let probe = worker_probe(&ProbeSpec::Tcp("not an address".into()), TIMEOUT);
    assert!(probe.probe("v1").await.is_failed());
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

#[tokio::test]
async fn exec_probe_true_and_false() {
    let ok = worker_probe(&ProbeSpec::Command(argv(&["true"])), TIMEOUT);
    assert_eq!(ok.probe("v1").await, ProbeOutcome::Ok);
    let bad = worker_probe(&ProbeSpec::Command(argv(&["false"])), TIMEOUT);
    assert!(bad.probe("v1").await.is_failed());
}

#[tokio::test]
async fn exec_probe_failure_carries_exit_status_and_output_tail() {
    let script = "head -c 5000 /dev/zero | tr '\\0' a >&2; echo boom >&2; exit 3";
    let probe = worker_probe(&ProbeSpec::Command(argv(&["sh", "-c", script])), TIMEOUT);
    let outcome = probe.probe("v1").await;
    let reason = failed_reason(&outcome);
    assert!(reason.contains('3'), "{reason}");
    assert!(reason.ends_with("boom"), "{reason}");
    assert!(
        reason.len() < 1200,
        "tail is bounded: {} bytes",
        reason.len()
    );
}

#[tokio::test]
async fn exec_probe_substitutes_worker_and_never_uses_a_shell() {
    // `{worker}` lands in argv as one argument; shell metacharacters stay literal.
    let probe = worker_probe(
        &ProbeSpec::Command(argv(&[
            "sh",
            "-c",
            "test \"$0\" = 'v2; rm -rf x'",
            "{worker}",
        ])),
        TIMEOUT,
    );
    assert_eq!(probe.probe("v2; rm -rf x").await, ProbeOutcome::Ok);
    assert!(probe.probe("v1").await.is_failed());

    let missing = worker_probe(
        &ProbeSpec::Command(argv(&["/nonexistent/health-check"])),
        TIMEOUT,
    );
    let outcome = missing.probe("v1").await;
    assert!(
        failed_reason(&outcome).contains("/nonexistent/health-check"),
        "{outcome:?}"
    );
}

fn process_gone(pid: u32) -> bool {
    // Gone, or a zombie waiting for whoever inherited it: either way not running.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

#[tokio::test]
async fn exec_probe_sleep_is_cut_at_timeout_and_its_process_group_killed() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    // The shell starts a grandchild and waits: both must die at the timeout.
    let script = "sleep 10 & echo $$ $! > \"$0\"; wait";
    let probe = worker_probe(
        &ProbeSpec::Command(argv(&["sh", "-c", script, pids.to_str().unwrap()])),
        Duration::from_millis(500),
    );
    let started = Instant::now();
    let outcome = probe.probe("v1").await;
    assert_eq!(failed_reason(&outcome), "timeout after 500ms");
    assert_within(started, Duration::from_millis(500) + SLACK);

    let text = std::fs::read_to_string(&pids).unwrap();
    let pids: Vec<u32> = text
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2, "{text}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while !pids.iter().all(|pid| process_gone(*pid)) {
        assert!(
            Instant::now() < deadline,
            "processes {pids:?} survived the timeout"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Exec probes run through the same child runner as hooks: a probe abandoned mid-run (the
/// check cancelled at shutdown) takes its whole process group with it, not only the shell
/// (before, `kill_on_drop` reached the direct child and the grandchild lived on).
#[tokio::test]
async fn an_abandoned_exec_probe_kills_its_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let script = "sleep 30 & echo $$ $! > \"$0\"; wait";
    let probe = worker_probe(
        &ProbeSpec::Command(argv(&["sh", "-c", script, pids.to_str().unwrap()])),
        Duration::from_secs(60),
    );
    let task = tokio::spawn(async move { probe.probe("v1").await });
    let deadline = Instant::now() + Duration::from_secs(5);
    let pids: Vec<u32> = loop {
        let found: Vec<u32> = std::fs::read_to_string(&pids)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if found.len() == 2 {
            break found;
        }
        assert!(Instant::now() < deadline, "the probe never wrote its pids");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    task.abort();
    let _ = task.await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while !pids.iter().all(|pid| process_gone(*pid)) {
        assert!(
            Instant::now() < deadline,
            "processes {pids:?} survived the abandoned probe"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn probes_are_object_safe_and_swappable() {
    struct AlwaysFailed;
    impl WorkerProbe for AlwaysFailed {
        fn probe<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, ProbeOutcome> {
            Box::pin(async move { ProbeOutcome::failed(format!("{worker} is fake")) })
        }
    }
    let probes: Vec<Arc<dyn WorkerProbe>> = vec![
        Arc::new(AlwaysFailed),
        worker_probe(&ProbeSpec::Command(argv(&["true"])), TIMEOUT),
    ];
    assert_eq!(
        probes[0].probe("v9").await,
        ProbeOutcome::failed("v9 is fake")
    );
    assert_eq!(probes[1].probe("v9").await, ProbeOutcome::Ok);
    assert_eq!(substitute_worker("{worker}.pid", "v9"), "v9.pid");
}

// ---------------------------------------------------------------------------------------
// HTTP snapshot: hostile bodies

async fn http_snapshot(url: String) -> SnapshotOutcome {
    snapshot_source(Some(&SnapshotSpec::Http(url)), TIMEOUT)
        .snapshot(&vars())
        .await
}

async fn snapshot_of_body(body: impl Into<Vec<u8>>) -> Snapshot {
    let server = fixed_server("200 OK", body).await;
    values(http_snapshot(server.url("/snapshot")).await)
}

#[tokio::test]
async fn snapshot_well_formed() {
    let snapshot = snapshot_of_body(
        r#"{"validation":{"failureRate":0.02},"requests":1200,"latencyP95Ms":180,"extra":[1]}"#,
    )
    .await;
    assert_eq!(snapshot.error_rate, Sample::Number(0.02));
    assert_eq!(snapshot.requests, Sample::Number(1200.0));
    assert_eq!(snapshot.latency_p95_ms, Sample::Number(180.0));
    assert_eq!(snapshot.latency_p99_ms, Sample::Missing);
}

#[tokio::test]
async fn snapshot_garbage_text_is_wrong() {
    let snapshot = snapshot_of_body("<html>502 Bad Gateway</html>").await;
    assert!(
        matches!(&snapshot.error_rate, Sample::Wrong(raw) if raw.contains("Bad Gateway")),
        "{snapshot:?}"
    );
}

#[tokio::test]
async fn snapshot_non_utf8_is_wrong() {
    let snapshot = snapshot_of_body(b"\xff\xfe\x00\x9f{\"failureRate\":0.1}".to_vec()).await;
    assert!(
        matches!(snapshot.error_rate, Sample::Wrong(_)),
        "{snapshot:?}"
    );
}

#[tokio::test]
async fn snapshot_nan_literal_is_invalid_json_so_wrong() {
    let snapshot = snapshot_of_body(r#"{"failureRate": NaN}"#).await;
    assert!(
        matches!(snapshot.error_rate, Sample::Wrong(_)),
        "{snapshot:?}"
    );
}

#[tokio::test]
async fn snapshot_out_of_range_numbers_are_kept_for_the_engine() {
    assert_eq!(
        snapshot_of_body(r#"{"failureRate": -1}"#).await.error_rate,
        Sample::Number(-1.0)
    );
    assert_eq!(
        snapshot_of_body(r#"{"failureRate": 7}"#).await.error_rate,
        Sample::Number(7.0)
    );
    assert_eq!(
        snapshot_of_body(r#"{"failureRate": 1e308}"#)
            .await
            .error_rate,
        Sample::Number(1e308)
    );
    // Beyond f64: serde_json refuses the document, so the whole body is invalid.
    assert!(matches!(
        snapshot_of_body(r#"{"failureRate": 1e400}"#)
            .await
            .error_rate,
        Sample::Wrong(_)
    ));
}

#[tokio::test]
async fn snapshot_string_rate_is_wrong() {
    assert_eq!(
        snapshot_of_body(r#"{"failureRate": "0.5"}"#)
            .await
            .error_rate,
        Sample::Wrong("\"0.5\"".into())
    );
}

#[tokio::test]
async fn snapshot_deeply_nested_does_not_overflow_the_stack() {
    let deep = "[".repeat(100_000);
    assert!(matches!(
        snapshot_of_body(deep).await.error_rate,
        Sample::Wrong(_)
    ));
    let deep_field = format!(r#"{{"failureRate":{}"#, "[".repeat(100_000));
    assert!(matches!(
        snapshot_of_body(deep_field).await.error_rate,
        Sample::Wrong(_)
    ));
}

#[tokio::test]
async fn snapshot_body_over_limit_is_cut_and_invalid() {
    // Valid JSON, but 2 MiB long: the first MiB is truncated JSON, so invalid.
    let body = format!(
        r#"{{"failureRate":0.1,"pad":"{}"}}"#,
        "x".repeat(2 * MAX_BODY)
    );
    let snapshot = snapshot_of_body(body).await;
    assert!(
        matches!(&snapshot.error_rate, Sample::Wrong(raw) if raw.starts_with("{\"failureRate\"")),
        "{snapshot:?}"
    );
}

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test]
async fn snapshot_one_gibibyte_body_is_cut_without_reading_it() {
    let written = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&written);
    let server_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::clone(&server_done);
    let server = raw_server(move |_, mut stream| {
        let counter = Arc::clone(&counter);
        let done = Arc::clone(&done);
        async move {
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1073741824\r\n\r\n")
                .await;
            let chunk = vec![b'x'; 64 * 1024];
            while counter.load(Ordering::Relaxed) < 1 << 30 {
                if stream.write_all(&chunk).await.is_err() {
                    break;
                }
                counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            done.store(true, Ordering::Relaxed);
        }
    })
    .await;
    let started = Instant::now();
    let snapshot = values(http_snapshot(server.url("/snapshot")).await);
    assert_within(started, TIMEOUT + SLACK);
    assert!(
        matches!(&snapshot.error_rate, Sample::Wrong(raw) if raw.starts_with("xxxx")),
        "{snapshot:?}"
    );
    // The client stopped reading at the cut and hung up: the server's writes fail and its
    // loop ends (wait for that, so the count below is final). Only the cut plus socket
    // buffers left the server, nowhere near the declared gibibyte, and memory stayed small.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server_done.load(Ordering::Relaxed) {
        assert!(
            Instant::now() < deadline,
            "the client kept the connection open: {} bytes sent",
            written.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = written.load(Ordering::Relaxed);
    assert!(sent < 64 << 20, "server managed to send {sent} bytes");
    assert!(
        peak_rss_bytes() < 512 << 20,
        "peak RSS {}",
        peak_rss_bytes()
    );
}

#[tokio::test]
async fn snapshot_never_ending_slow_body_times_out() {
    let server = raw_server(|_, mut stream| async move {
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
            .await;
        while stream.write_all(b"1\r\n \r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let started = Instant::now();
    let reason = unavailable(http_snapshot(server.url("/snapshot")).await);
    assert_eq!(reason, "timeout after 1s");
    assert_within(started, TIMEOUT + SLACK);
}

#[tokio::test]
async fn snapshot_headers_dribbled_byte_by_byte_time_out() {
    let server = raw_server(|_, mut stream| async move {
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 19\r\n\r\n{\"failureRate\":0.1}" {
            if stream.write_all(&[*byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let started = Instant::now();
    let reason = unavailable(http_snapshot(server.url("/snapshot")).await);
    assert!(reason.contains("timeout"), "{reason}");
    assert_within(started, Duration::from_millis(1500) + SLACK / 2);
}

#[tokio::test]
async fn snapshot_non_2xx_refused_and_redirect_are_unavailable() {
    let server = fixed_server("503 Service Unavailable", "try later").await;
    let reason = unavailable(http_snapshot(server.url("/snapshot")).await);
    assert!(
        reason.contains("503") && reason.contains("try later"),
        "{reason}"
    );

    let redirect = fixed_server("301 Moved Permanently\r\nLocation: /elsewhere", "").await;
    let reason = unavailable(http_snapshot(redirect.url("/snapshot")).await);
    assert!(reason.contains("301"), "{reason}");

    let address = refused_address().await;
    unavailable(http_snapshot(format!("http://{address}/snapshot")).await);
}

#[tokio::test]
async fn no_snapshot_source_is_unavailable() {
    let reason = unavailable(snapshot_source(None, TIMEOUT).snapshot(&vars()).await);
    assert_eq!(reason, "no snapshot source configured");
}

// ---------------------------------------------------------------------------------------
// Command snapshot

async fn command_snapshot(script: &str) -> SnapshotOutcome {
    snapshot_source(
        Some(&SnapshotSpec::Command(argv(&["sh", "-c", script]))),
        TIMEOUT,
    )
    .snapshot(&vars())
    .await
}

#[tokio::test]
async fn command_snapshot_parses_stdout() {
    let snapshot = values(command_snapshot(r#"echo '{"failureRate":0.3,"requests":10}'"#).await);
    assert_eq!(snapshot.error_rate, Sample::Number(0.3));
    assert_eq!(snapshot.requests, Sample::Number(10.0));
    let garbage = values(command_snapshot("echo not json").await);
    assert!(matches!(garbage.error_rate, Sample::Wrong(_)));
}

/// Issue 25 item 1: the snapshot names the version it is of. `{worker}`, `{previous}` and
/// `{interval}` in `snapshot_url` (ids percent-encoded) and in each `snapshot_command`
/// argv element (as they are, within the element).
#[tokio::test]
async fn snapshot_url_and_command_take_the_worker_previous_and_interval() {
    let server = fixed_server("200 OK", r#"{"failureRate":0.01}"#).await;
    let vars = SnapshotVars {
        worker: "v1.2.3+build.5".into(),
        previous: Some("v1".into()),
        interval: Duration::from_millis(2500),
    };
    let url = server.url("/snapshot/{worker}?previous={previous}&interval={interval}");
    let outcome = snapshot_source(Some(&SnapshotSpec::Http(url)), TIMEOUT)
        .snapshot(&vars)
        .await;
    values(outcome);
    assert_eq!(
        server.requests(),
        ["GET /snapshot/v1.2.3%2Bbuild.5?previous=v1&interval=2500ms HTTP/1.1"]
    );

    let argv = argv(&[
        "sh",
        "-c",
        r#"[ "$1" = v2 ] && [ "$2" = --previous= ] && [ "$3" = 30s ] && echo '{"failureRate":0.02}'"#,
        "sh",
        "{worker}",
        "--previous={previous}",
        "{interval}",
    ]);
    let source = snapshot_source(Some(&SnapshotSpec::Command(argv)), TIMEOUT);
    let none_before = SnapshotVars {
        worker: "v2".into(),
        previous: None,
        interval: Duration::from_secs(30),
    };
    let snapshot = values(source.snapshot(&none_before).await);
    assert_eq!(snapshot.error_rate, Sample::Number(0.02));
}

#[tokio::test]
async fn command_snapshot_failure_and_timeout_are_unavailable() {
    let reason = unavailable(command_snapshot("echo 'metrics db down' >&2; exit 2").await);
    assert!(
        reason.contains("metrics db down") && reason.contains('2'),
        "{reason}"
    );

    let started = Instant::now();
    let reason = unavailable(command_snapshot("sleep 10").await);
    assert_eq!(reason, "timeout after 1s");
    assert_within(started, TIMEOUT + SLACK);

    // Endless output is drained (not buffered) until the timeout.
    let started = Instant::now();
    let reason = unavailable(command_snapshot("yes").await);
    assert_eq!(reason, "timeout after 1s");
    assert_within(started, TIMEOUT + SLACK);
}

#[tokio::test]
async fn command_snapshot_output_over_limit_is_cut_and_invalid() {
    let snapshot = values(
        command_snapshot("printf '{\"failureRate\":0.1,\"pad\":\"'; head -c 3000000 /dev/zero | tr '\\0' x; echo '\"}'")
            .await,
    );
    assert!(
        matches!(snapshot.error_rate, Sample::Wrong(_)),
        "{snapshot:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Prometheus

const ERROR_RATE_QUERY: &str =
    r#"sum(rate(http_requests_total{code=~"5.."}[1m])) / sum(rate(http_requests_total[1m]))"#;
const REQUESTS_QUERY: &str = "sum(increase(http_requests_total[1m]))";
const P95_QUERY: &str =
    "histogram_quantile(0.95, sum by (le) (rate(http_request_duration_seconds_bucket[1m]))) * 1000";
const P99_QUERY: &str = "max(p99_ms) + 0 # & ? = %";

enum Reply {
    Respond(&'static str, String),
    Hang,
}

fn vector(value: &str) -> Reply {
    Reply::Respond(
        "200 OK",
        format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[1700000000.5,"{value}"]}}]}}}}"#
        ),
    )
}

fn empty_vector() -> Reply {
    Reply::Respond(
        "200 OK",
        r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#.into(),
    )
}

/// The decoded `query` parameter of a request line `GET /path?query=... HTTP/1.1`.
fn query_of(request_line: &str) -> String {
    let target = request_line.split(' ').nth(1).unwrap_or_default();
    let url = reqwest::Url::parse(&format!("http://fake{target}")).unwrap();
    url.query_pairs()
        .find(|(key, _)| key == "query")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default()
}

async fn fake_prometheus(answer: fn(&str) -> Reply) -> RawServer {
    raw_server(move |request_line, mut stream| async move {
        match answer(&query_of(&request_line)) {
            Reply::Respond(status, body) => {
                write_response(&mut stream, status, body.as_bytes()).await
            }
            Reply::Hang => tokio::time::sleep(Duration::from_secs(30)).await,
        }
    })
    .await
}

fn spec(server: &RawServer, all_queries: bool) -> PrometheusSpec {
    PrometheusSpec {
        url: server.url("/prom/"),
        error_rate: ERROR_RATE_QUERY.into(),
        requests: all_queries.then(|| REQUESTS_QUERY.into()),
        latency_p95_ms: all_queries.then(|| P95_QUERY.into()),
        latency_p99_ms: all_queries.then(|| P99_QUERY.into()),
        scrape_interval: Duration::from_secs(15),
    }
}

async fn prometheus_snapshot(spec: PrometheusSpec) -> SnapshotOutcome {
    snapshot_source(Some(&SnapshotSpec::Prometheus(spec)), TIMEOUT)
        .snapshot(&vars())
        .await
}

#[tokio::test]
async fn prometheus_success_empty_nan_and_scalar() {
    let server = fake_prometheus(|query| match query {
        ERROR_RATE_QUERY => vector("0.25"),
        REQUESTS_QUERY => Reply::Respond(
            "200 OK",
            r#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"1200"]}}"#
                .into(),
        ),
        P95_QUERY => empty_vector(),
        P99_QUERY => vector("NaN"),
        _ => Reply::Respond("400 Bad Request", "unexpected query".into()),
    })
    .await;
    let snapshot = values(prometheus_snapshot(spec(&server, true)).await);
    assert_eq!(snapshot.error_rate, Sample::Number(0.25));
    assert_eq!(snapshot.requests, Sample::Number(1200.0));
    assert_eq!(snapshot.latency_p95_ms, Sample::Missing);
    assert!(matches!(snapshot.latency_p99_ms, Sample::Number(v) if v.is_nan()));
    assert_eq!(snapshot.memory_percent, Sample::Missing);

    // Every configured expression arrived intact (URL-decoded), at {url}/api/v1/query.
    let requests = server.requests();
    let mut received: Vec<String> = requests.iter().map(|line| query_of(line)).collect();
    received.sort();
    let mut expected = vec![ERROR_RATE_QUERY, REQUESTS_QUERY, P95_QUERY, P99_QUERY];
    expected.sort();
    assert_eq!(received, expected);
    assert!(
        requests
            .iter()
            .all(|line| line.starts_with("GET /prom/api/v1/query?query=")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn prometheus_empty_error_rate_is_missing_and_infinity_is_kept() {
    let empty = fake_prometheus(|_| empty_vector()).await;
    let snapshot = values(prometheus_snapshot(spec(&empty, false)).await);
    assert_eq!(snapshot.error_rate, Sample::Missing);
    assert_eq!(
        empty.requests().len(),
        1,
        "only the configured query is asked"
    );

    let infinite = fake_prometheus(|_| vector("+Inf")).await;
    let snapshot = values(prometheus_snapshot(spec(&infinite, false)).await);
    assert_eq!(snapshot.error_rate, Sample::Number(f64::INFINITY));
}

#[tokio::test]
async fn prometheus_error_rate_failures_are_unavailable() {
    let error_status = fake_prometheus(|_| {
        Reply::Respond(
            "400 Bad Request",
            r#"{"status":"error","errorType":"bad_data","error":"1:5: parse error"}"#.into(),
        )
    })
    .await;
    let reason = unavailable(prometheus_snapshot(spec(&error_status, false)).await);
    assert!(
        reason.contains("bad_data") && reason.contains("parse error"),
        "{reason}"
    );

    let error_in_200 = fake_prometheus(|_| {
        Reply::Respond(
            "200 OK",
            r#"{"status":"error","errorType":"timeout","error":"query timed out"}"#.into(),
        )
    })
    .await;
    let reason = unavailable(prometheus_snapshot(spec(&error_in_200, false)).await);
    assert!(reason.contains("query timed out"), "{reason}");

    let server_error =
        fake_prometheus(|_| Reply::Respond("500 Internal Server Error", "oops".into())).await;
    let reason = unavailable(prometheus_snapshot(spec(&server_error, false)).await);
    assert!(reason.contains("500"), "{reason}");

    let garbage = fake_prometheus(|_| Reply::Respond("200 OK", "<html>proxy</html>".into())).await;
    let reason = unavailable(prometheus_snapshot(spec(&garbage, false)).await);
    assert!(reason.contains("unparsable"), "{reason}");

    let hanging = fake_prometheus(|_| Reply::Hang).await;
    let started = Instant::now();
    let reason = unavailable(prometheus_snapshot(spec(&hanging, false)).await);
    assert!(reason.contains("timeout after 1s"), "{reason}");
    assert_within(started, TIMEOUT + SLACK);

    let address = refused_address().await;
    let mut refused = spec(&hanging, false);
    refused.url = format!("http://{address}");
    unavailable(prometheus_snapshot(refused).await);
}

#[tokio::test]
async fn prometheus_optional_query_failure_is_just_that_sample_wrong() {
    let server = fake_prometheus(|query| match query {
        ERROR_RATE_QUERY => vector("0.01"),
        REQUESTS_QUERY => Reply::Respond("500 Internal Server Error", "oops".into()),
        P95_QUERY => Reply::Hang,
        _ => vector("250"),
    })
    .await;
    let started = Instant::now();
    let snapshot = values(prometheus_snapshot(spec(&server, true)).await);
    assert_within(started, TIMEOUT + SLACK);
    assert_eq!(snapshot.error_rate, Sample::Number(0.01));
    assert!(
        matches!(&snapshot.requests, Sample::Wrong(reason) if reason.contains("500")),
        "{snapshot:?}"
    );
    assert!(
        matches!(&snapshot.latency_p95_ms, Sample::Wrong(reason) if reason.contains("timeout")),
        "{snapshot:?}"
    );
    assert_eq!(snapshot.latency_p99_ms, Sample::Number(250.0));
}

// ---------------------------------------------------------------------------------------
// Resources from the real /proc

#[tokio::test]
async fn resources_of_this_process() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("me.pid"),
        format!("{}\n", std::process::id()),
    )
    .unwrap();
    std::fs::write(dir.path().join("garbage.pid"), "not a pid").unwrap();
    let template = format!("{}/{{worker}}.pid", dir.path().display());
    let sampler = resource_sampler(Some(&template));

    let me = sampler.sample("me").await.expect("a sample");
    let memory = me.host_memory_percent.expect("host memory");
    assert!((0.0..=100.0).contains(&memory), "{memory}");
    assert!(me.worker_rss_bytes.expect("rss") > 1 << 20);
    assert!(me.worker_open_files.expect("fds") >= 3);

    for worker in ["garbage", "absent"] {
        let sample = sampler
            .sample(worker)
            .await
            .expect("host memory still sampled");
        assert!(sample.host_memory_percent.is_some());
        assert_eq!(sample.worker_rss_bytes, None);
        assert_eq!(sample.worker_open_files, None);
    }

    let host_only = resource_sampler(None).sample("me").await.expect("a sample");
    assert!(host_only.host_memory_percent.is_some());
    assert_eq!(host_only.worker_rss_bytes, None);
}
