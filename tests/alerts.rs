//! Webhook alerts against a loopback receiver: body shapes, retries, and that a webhook
//! that never answers never holds up the recorder (and so never an action).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rollbackd::config::{AlertFormat, AlertsConfig};
use rollbackd::daemon::alerts::{AlertOptions, AlertStats, Alerter};
use rollbackd::daemon::recorder::Recorder;
use rollbackd::storage::audit::{AuditEvent, AuditRecord, KillSwitchSource};
use rollbackd::storage::events;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
    /// Reads the request, then holds the connection open without a word.
    Never,
}

#[derive(Debug, Clone)]
struct Received {
    path: String,
    body: Value,
}

/// A loopback webhook receiver: raw HTTP/1.1 on a tokio `TcpListener`, one request per
/// connection. The n-th request gets `answers[n]`, later ones `then`.
#[derive(Clone)]
struct Receiver {
    port: u16,
    requests: Arc<Mutex<Vec<Received>>>,
    connections: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start(answers: Vec<Answer>, then: Answer) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Receiver {
            port: listener.local_addr().unwrap().port(),
            requests: Arc::default(),
            connections: Arc::default(),
        };
        let shared = receiver.clone();
        tokio::spawn(async move {
            let served = Arc::new(AtomicUsize::new(0));
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                shared.connections.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                let answers = answers.clone();
                let served = served.clone();
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut stream).await else {
                        return;
                    };
                    shared.requests.lock().unwrap().push(request);
                    let n = served.fetch_add(1, Ordering::SeqCst);
                    match answers.get(n).copied().unwrap_or(then) {
                        Answer::Status(status) => {
                            let _ = stream
                                .write_all(
                                    format!(
                                        "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                                    )
                                    .as_bytes(),
                                )
                                .await;
                        }
                        Answer::Never => {
                            // Hold the connection until the client gives up on it.
                            let mut sink = [0u8; 64];
                            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                        }
                    }
                });
            }
        });
        receiver
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn requests(&self) -> Vec<Received> {
        self.requests.lock().unwrap().clone()
    }
}

async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<Received> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let path = head.split_whitespace().nth(1)?.to_owned();
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buf[header_end..header_end + length]).ok()?;
    Some(Received { path, body })
}

fn config(url: String, format: AlertFormat, timeout: Duration, max_retries: u32) -> AlertsConfig {
    AlertsConfig {
        webhook_url: Some(url),
        format,
        timeout,
        max_retries,
    }
}

fn options() -> AlertOptions {
    AlertOptions {
        queue_capacity: 64,
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        host: "canary-host-1".into(),
    }
}

fn at() -> SystemTime {
    humantime::parse_rfc3339("2025-10-22T14:32:15Z").unwrap()
}

fn rollback_executed_numbered(action_id: i64) -> AuditRecord {
    AuditRecord::of(
        at(),
        Some("s-1"),
        &events::RollbackExecuted {
            action_id: Some(action_id),
            from: "v2".into(),
            to: "v1".into(),
            trigger: rollbackd::storage::states::ActionTrigger::Automatic,
            reason: "High error rate (42.5%) with 3 failures".into(),
            phases: serde_json::json!({}),
            rollback_duration_seconds: 1.71,
            artifact: "/state/analytics/rollback_x.json".into(),
            resumed: 0,
            incident: None,
            incident_summary: None,
        },
    )
}

fn rollback_executed() -> AuditRecord {
    rollback_executed_numbered(7)
}

/// A manual kill-switch change: `value` "1" is `kill-switch-activated`, else `-reset`.
fn kill_switch(value: &str) -> AuditRecord {
    AuditRecord::of(
        at(),
        Some("s-1"),
        &events::KillSwitchChanged {
            key: "DISABLE_NEW".into(),
            value: value.into(),
            previous: None,
            source: KillSwitchSource::Manual,
            reason: "incident 42".into(),
            action_id: None,
        },
    )
    .operator("uid 0 (root)")
}

/// Polls `condition` every 10 ms until it holds or `limit` passes.
async fn until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    condition()
}

async fn deliver_one(format: AlertFormat, record: AuditRecord) -> Received {
    let receiver = Receiver::start(vec![], Answer::Status(200)).await;
    let alerter = Alerter::start(
        &config(
            receiver.url("/api/v2/alerts"),
            format,
            Duration::from_secs(5),
            0,
        ),
        options(),
    )
    .unwrap();
    alerter.send(&record);
    assert!(alerter.flush(Duration::from_secs(10)).await);
    assert_eq!(alerter.stats().delivered, 1, "{:?}", alerter.stats());
    let requests = receiver.requests();
    assert_eq!(requests.len(), 1);
    requests[0].clone()
}

#[tokio::test]
async fn generic_body_is_the_audit_record_plus_severity_summary_and_host() {
    let received = deliver_one(AlertFormat::Generic, rollback_executed()).await;
    let body = received.body;
    assert_eq!(body["event"], "rollback-executed");
    assert_eq!(body["severity"], "warning");
    assert_eq!(body["host"], "canary-host-1");
    assert_eq!(body["sessionId"], "s-1");
    assert_eq!(body["timestamp"], "2025-10-22T14:32:15.000Z");
    assert_eq!(
        body["summary"],
        "rolled back v2 -> v1 (automatic): High error rate (42.5%) with 3 failures"
    );
    // The audit record's own fields come along unchanged.
    assert_eq!(body["from"], "v2");
    assert_eq!(body["to"], "v1");
    assert_eq!(body["actionId"], 7);
    assert_eq!(body["rollbackDurationSeconds"], 1.71);
    assert_eq!(body["artifact"], "/state/analytics/rollback_x.json");
}

#[tokio::test]
async fn slack_body_is_one_readable_text_line() {
    let received = deliver_one(AlertFormat::Slack, rollback_executed()).await;
    let object = received.body.as_object().unwrap();
    assert_eq!(object.len(), 1, "only text: {object:?}");
    let text = object["text"].as_str().unwrap();
    assert_eq!(
        text,
        // Slack shows `&gt;` as `>`: its control characters are always escaped.
        "rollbackd on canary-host-1: rolled back v2 -&gt; v1 (automatic): High error rate (42.5%) with 3 failures [warning, session s-1]"
    );
    assert!(!text.contains('\n'));
    assert!(text.is_ascii(), "no emoji: {text}");
}

/// Issue 26, item 13: a worker's text (here its health body, in the reason) must reach
/// Slack as text — no `<!channel>` ping, no `<url|label>` phishing link.
#[tokio::test]
async fn slack_gets_worker_text_as_text() {
    let mut record = rollback_executed();
    record.fields.insert(
        "reason".into(),
        "Worker probe failed: body says status \"<!channel> <https://evil.example/login|Re-authenticate> & co\"".into(),
    );
    let received = deliver_one(AlertFormat::Slack, record).await;
    let text = received.body["text"].as_str().unwrap();
    assert!(!text.contains('<') && !text.contains('>'), "{text}");
    assert!(
        text.contains(
            "&lt;!channel&gt; &lt;https://evil.example/login|Re-authenticate&gt; &amp; co"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn alertmanager_body_is_a_v2_alerts_array() {
    let received = deliver_one(AlertFormat::Alertmanager, rollback_executed()).await;
    assert_eq!(received.path, "/api/v2/alerts", "the URL is used as given");
    let alerts = received.body.as_array().expect("an array of alerts");
    assert_eq!(alerts.len(), 1);
    let alert = &alerts[0];
    assert_eq!(alert["labels"]["alertname"], "RollbackdRollback");
    assert_eq!(alert["labels"]["severity"], "warning");
    assert_eq!(alert["labels"]["instance"], "canary-host-1");
    assert_eq!(alert["labels"]["event"], "rollback-executed");
    assert!(
        alert["labels"]
            .as_object()
            .unwrap()
            .values()
            .all(Value::is_string),
        "Alertmanager labels are strings: {alert}"
    );
    assert_eq!(
        alert["annotations"]["summary"],
        "rolled back v2 -> v1 (automatic): High error rate (42.5%) with 3 failures"
    );
    let description = alert["annotations"]["description"].as_str().unwrap();
    assert!(description.contains("session: s-1"), "{description}");
    assert!(
        description.contains("artifact: /state/analytics/rollback_x.json"),
        "{description}"
    );
    let starts = alert["startsAt"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(starts).is_ok(), "{starts}");
    assert!(alert.get("generatorURL").is_none());
    assert!(
        alert.get("endsAt").is_none(),
        "an event alert is not resolved"
    );
}

#[tokio::test]
async fn alertmanager_kill_switch_reset_resolves_the_activation_alert() {
    let set = deliver_one(AlertFormat::Alertmanager, kill_switch("1"))
        .await
        .body;
    let reset = deliver_one(AlertFormat::Alertmanager, kill_switch("0"))
        .await
        .body;
    assert_eq!(set[0]["labels"]["alertname"], "RollbackdKillSwitch");
    assert_eq!(set[0]["labels"]["key"], "DISABLE_NEW");
    assert_eq!(
        set[0]["labels"], reset[0]["labels"],
        "same labels, so Alertmanager treats the reset as the resolution"
    );
    assert!(set[0].get("endsAt").is_none());
    assert_eq!(reset[0]["endsAt"], "2025-10-22T14:32:15.000Z");
    assert!(reset[0]["annotations"]["summary"]
        .as_str()
        .unwrap()
        .contains("reset to 0"));
}

#[tokio::test]
async fn retries_after_server_errors_until_delivered() {
    let receiver = Receiver::start(
        vec![Answer::Status(500), Answer::Status(503)],
        Answer::Status(204),
    )
    .await;
    let alerter = Alerter::start(
        &config(
            receiver.url("/hook"),
            AlertFormat::Generic,
            Duration::from_secs(5),
            3,
        ),
        options(),
    )
    .unwrap();
    alerter.send(&kill_switch("1"));
    assert!(alerter.flush(Duration::from_secs(10)).await);
    assert_eq!(
        alerter.stats(),
        AlertStats {
            delivered: 1,
            failed: 0,
            dropped: 0,
            attempts: 3
        }
    );
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3, "two 5xx answers, then a 2xx");
    assert!(requests.iter().all(|r| r.body == requests[0].body));
    assert_eq!(requests[0].body["event"], "kill-switch-activated");
    assert_eq!(requests[0].body["severity"], "critical");
}

#[tokio::test]
async fn gives_up_after_max_retries() {
    let receiver = Receiver::start(vec![], Answer::Status(500)).await;
    let alerter = Alerter::start(
        &config(
            receiver.url("/hook"),
            AlertFormat::Slack,
            Duration::from_secs(5),
            2,
        ),
        options(),
    )
    .unwrap();
    alerter.send(&rollback_executed());
    assert!(alerter.flush(Duration::from_secs(10)).await);
    let stats = alerter.stats();
    assert_eq!((stats.delivered, stats.failed, stats.attempts), (0, 1, 3));
    assert_eq!(
        receiver.requests().len(),
        3,
        "the first try and two retries"
    );
}

#[tokio::test]
async fn a_webhook_that_never_answers_does_not_hold_up_the_recorder() {
    let receiver = Receiver::start(vec![], Answer::Never).await;
    let dir = tempfile::tempdir().unwrap();
    let alerter = Alerter::start(
        &config(
            receiver.url("/hook"),
            AlertFormat::Generic,
            // Long enough that waiting for one POST cannot be mistaken for two fsynced
            // appends on a loaded machine (those took 0.54 s once in CI).
            Duration::from_secs(5),
            1,
        ),
        options(),
    )
    .unwrap();
    let recorder = Recorder::new(dir.path().join("analytics"), None)
        .await
        .with_alerts(alerter.clone());

    let started = Instant::now();
    recorder.audit(rollback_executed()).await;
    recorder
        .audit(AuditRecord::new(
            SystemTime::now(),
            AuditEvent::HealthCheck,
            Some("s-1"),
        ))
        .await;
    let took = started.elapsed();
    assert!(
        // Waiting for even one POST would take the whole 5 s timeout.
        took < Duration::from_secs(4),
        "audit waited for the webhook: {took:?}"
    );
    let log = std::fs::read_to_string(dir.path().join("analytics/audit.log")).unwrap();
    assert_eq!(log.lines().count(), 2, "both records written: {log}");

    // The alert task tries, times out, retries once, and gives up.
    assert!(
        recorder.flush_alerts(Duration::from_secs(30)).await,
        "the alert task gave up within its bounds"
    );
    let stats = alerter.stats();
    assert_eq!((stats.delivered, stats.failed, stats.attempts), (0, 1, 2));
    assert_eq!(receiver.connections.load(Ordering::SeqCst), 2);
    let requests = receiver.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.body["event"] == "rollback-executed"),
        "health checks are not alerted: {requests:?}"
    );
}

#[tokio::test]
async fn a_full_queue_drops_the_oldest_alert() {
    let receiver = Receiver::start(vec![], Answer::Never).await;
    let alerter = Alerter::start(
        &config(
            receiver.url("/hook"),
            AlertFormat::Generic,
            Duration::from_millis(300),
            0,
        ),
        AlertOptions {
            queue_capacity: 2,
            ..options()
        },
    )
    .unwrap();
    let numbered = rollback_executed_numbered;
    alerter.send(&numbered(1));
    assert!(
        until(Duration::from_secs(5), || receiver.requests().len() == 1).await,
        "the first alert is in flight"
    );
    // The task is stuck on alert 1: 2, 3, 4 queue up behind it and 2 is dropped.
    for n in 2..=4 {
        alerter.send(&numbered(n));
    }
    assert_eq!(alerter.stats().dropped, 1);
    assert!(alerter.flush(Duration::from_secs(10)).await);
    let ids: Vec<i64> = receiver
        .requests()
        .iter()
        .map(|r| r.body["actionId"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [1, 3, 4]);
    assert_eq!(alerter.stats().failed, 3);
}

#[tokio::test]
async fn no_webhook_url_means_no_alerter() {
    let config = AlertsConfig {
        webhook_url: None,
        format: AlertFormat::Generic,
        timeout: Duration::from_secs(5),
        max_retries: 3,
    };
    assert!(Alerter::from_config(&config).is_none());
}

/// An action's alert carries its incident report: the report's sentence and its path, in
/// every format.
#[test]
fn an_alert_carries_the_incident_reports_summary_and_path() {
    let record = AuditRecord::of(
        at(),
        Some("s-1"),
        &events::RollbackExecuted {
            action_id: Some(7),
            from: "v2".into(),
            to: "v1".into(),
            trigger: rollbackd::storage::states::ActionTrigger::Automatic,
            reason: "High error rate (42.5%) with 3 failures".into(),
            phases: serde_json::json!({}),
            rollback_duration_seconds: 1.71,
            artifact: "/state/analytics/rollback_x.json".into(),
            resumed: 0,
            incident: Some("/state/analytics/incident_x.md".into()),
            incident_summary: Some(
                "SEV2 level 2: rollback of v2 to v1 after error rate 42.5% > threshold 20.0%."
                    .into(),
            ),
        },
    );
    let summary = rollbackd::daemon::alerts::summary(&record);
    assert_eq!(
        summary,
        "SEV2 level 2: rollback of v2 to v1 after error rate 42.5% > threshold 20.0%. Incident report: /state/analytics/incident_x.md"
    );
    for format in [
        AlertFormat::Generic,
        AlertFormat::Slack,
        AlertFormat::Alertmanager,
    ] {
        let body = rollbackd::daemon::alerts::render(format, &record, "host-1").to_string();
        assert!(body.contains("incident_x.md"), "{format:?}: {body}");
    }
}
