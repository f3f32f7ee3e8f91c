//! Webhook alerts for the events on-call must hear about: a rollback executed or failed,
//! an escalation, and any change of the kill switch.
//!
//! **An alert never delays an action.** [`Alerter::send`] only puts the alert in a
//! bounded in-memory queue (the oldest alert is dropped, with a warning, when it is full)
//! and returns; one task per [`Alerter`] takes alerts off the queue and POSTs them, each
//! try bounded by `alerts.timeout`, retried `alerts.max_retries` times with exponential
//! backoff. A 2xx answer is delivered; anything else is retried, and the final failure is
//! logged at error level. The audit trail, not the webhook, is the record of what happened.
//!
//! Body formats (`alerts.format`):
//! - `generic`: one JSON object, the audit record's fields plus `severity`, `summary`, `host`;
//! - `slack`: `{"text": "..."}`, one readable line;
//! - `alertmanager`: an Alertmanager v2 `POST /api/v2/alerts` array of one alert. The kill
//!   switch is one alert (`RollbackdKillSwitch`) that fires when it is set and is resolved
//!   (`endsAt`) when it is reset, so Alertmanager shows its current state.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::sync::Notify;

use crate::config::{AlertFormat, AlertsConfig};
use crate::storage::audit::{AuditEvent, AuditRecord};

/// Whether an audit event is sent as an alert.
pub fn is_alerted(event: AuditEvent) -> bool {
    matches!(
        event,
        AuditEvent::RollbackExecuted
            | AuditEvent::RollbackFailed
            | AuditEvent::EscalationTriggered
            | AuditEvent::KillSwitchActivated
            | AuditEvent::KillSwitchReset
            | AuditEvent::KillSwitchExternal
            | AuditEvent::StabilityFailed
            | AuditEvent::StabilityConfirmed
            | AuditEvent::CannotJudge
            | AuditEvent::JudgingAgain
    )
}

/// How urgent an alerted event is: `critical` when on-call must act (a failed rollback,
/// an escalation, the kill switch set), `warning` when rollbackd handled it (a rollback
/// executed), `info` when things return to normal (the kill switch reset).
pub fn severity(record: &AuditRecord) -> &'static str {
    match record.event {
        AuditEvent::RollbackFailed
        | AuditEvent::EscalationTriggered
        | AuditEvent::KillSwitchActivated
        | AuditEvent::StabilityFailed => "critical",
        AuditEvent::KillSwitchExternal if kill_switch_on(record) => "critical",
        AuditEvent::RollbackExecuted | AuditEvent::CannotJudge => "warning",
        _ => "info",
    }
}

fn kill_switch_on(record: &AuditRecord) -> bool {
    match record.event {
        AuditEvent::KillSwitchActivated => true,
        AuditEvent::KillSwitchReset => false,
        _ => record.fields.get("value").and_then(Value::as_str) == Some("1"),
    }
}

fn text<'a>(record: &'a AuditRecord, key: &str) -> Option<&'a str> {
    record.fields.get(key).and_then(Value::as_str)
}

/// One readable sentence about the event (no emoji, no markup).
pub fn summary(record: &AuditRecord) -> String {
    // An action's alert carries its incident report: the report's own sentence, and where
    // it is.
    if let (Some(summary), Some(path)) = (text(record, "incidentSummary"), text(record, "incident"))
    {
        return format!("{summary} Incident report: {path}");
    }
    let or_unknown = |key: &str| text(record, key).unwrap_or("?").to_owned();
    let reason = text(record, "reason")
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    match record.event {
        AuditEvent::RollbackExecuted => format!(
            "rolled back {} -> {} ({}){reason}",
            or_unknown("from"),
            or_unknown("to"),
            or_unknown("trigger")
        ),
        AuditEvent::RollbackFailed => format!(
            "rollback {} -> {} failed ({}){reason}",
            or_unknown("from"),
            or_unknown("to"),
            or_unknown("trigger")
        ),
        AuditEvent::EscalationTriggered => {
            format!("escalated on worker {}{reason}", or_unknown("worker"))
        }
        AuditEvent::KillSwitchActivated => format!(
            "kill switch {}=1 set ({}){reason}",
            or_unknown("key"),
            or_unknown("source")
        ),
        AuditEvent::KillSwitchReset => format!(
            "kill switch {} reset to 0 ({}){reason}",
            or_unknown("key"),
            or_unknown("source")
        ),
        AuditEvent::KillSwitchExternal => format!(
            "kill switch {} changed outside rollbackd to {}{reason}",
            or_unknown("key"),
            text(record, "value").unwrap_or("unset")
        ),
        AuditEvent::StabilityFailed => format!("stability watch failed, escalating{reason}"),
        AuditEvent::StabilityConfirmed => format!(
            "restored version {} stable through the stability watch",
            or_unknown("restored")
        ),
        other => format!(
            "{}{reason}",
            serde_json::to_value(other)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        ),
    }
}

/// Slack's escaping (its "mrkdwn" control characters): `&`, `<`, `>` as entities.
pub fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn event_name(event: AuditEvent) -> String {
    serde_json::to_value(event)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The webhook body for `record` in `format`, as JSON.
pub fn render(format: AlertFormat, record: &AuditRecord, host: &str) -> Value {
    match format {
        AlertFormat::Generic => {
            let mut object = match serde_json::to_value(record) {
                Ok(Value::Object(object)) => object,
                _ => Map::new(),
            };
            object.insert("severity".into(), severity(record).into());
            object.insert("summary".into(), summary(record).into());
            object.insert("host".into(), host.into());
            Value::Object(object)
        }
        AlertFormat::Slack => {
            let mut line = format!(
                "rollbackd on {host}: {} [{}",
                summary(record),
                severity(record)
            );
            if let Some(session) = &record.session_id {
                line.push_str(&format!(", session {session}"));
            }
            if let Some(operator) = &record.operator {
                line.push_str(&format!(", by {operator}"));
            }
            line.push(']');
            // Slack reads `<…>` as links and mentions (`<!channel>`, `<https://x|label>`)
            // and `&` as the start of an entity: worker text must reach it as text.
            json!({ "text": slack_escape(&line) })
        }
        AlertFormat::Alertmanager => Value::Array(vec![alertmanager_alert(record, host)]),
    }
}

fn alertmanager_alert(record: &AuditRecord, host: &str) -> Value {
    let is_kill_switch = matches!(
        record.event,
        AuditEvent::KillSwitchActivated
            | AuditEvent::KillSwitchReset
            | AuditEvent::KillSwitchExternal
    );
    let mut labels = Map::new();
    if is_kill_switch {
        // The same label set whether it is set or reset, so the reset resolves the alert.
        labels.insert("alertname".into(), "RollbackdKillSwitch".into());
        labels.insert("severity".into(), "critical".into());
        labels.insert("instance".into(), host.into());
        labels.insert("service".into(), "rollbackd".into());
        labels.insert("key".into(), text(record, "key").unwrap_or("?").into());
    } else {
        let alertname = match record.event {
            AuditEvent::RollbackFailed => "RollbackdRollbackFailed",
            AuditEvent::EscalationTriggered => "RollbackdEscalation",
            _ => "RollbackdRollback",
        };
        labels.insert("alertname".into(), alertname.into());
        labels.insert("severity".into(), severity(record).into());
        labels.insert("instance".into(), host.into());
        labels.insert("service".into(), "rollbackd".into());
        labels.insert("event".into(), event_name(record.event).into());
        if let Some(session) = &record.session_id {
            labels.insert("session".into(), session.clone().into());
        }
    }
    let mut description = vec![summary(record)];
    let details = [
        ("session", record.session_id.as_deref()),
        ("operator", record.operator.as_deref()),
        ("source", text(record, "source")),
        ("artifact", text(record, "artifact")),
    ];
    for (label, value) in details {
        if let Some(value) = value {
            description.push(format!("{label}: {value}"));
        }
    }
    let mut alert = Map::new();
    alert.insert("labels".into(), Value::Object(labels));
    alert.insert(
        "annotations".into(),
        json!({ "summary": summary(record), "description": description.join("; ") }),
    );
    alert.insert("startsAt".into(), record.timestamp.clone().into());
    if is_kill_switch && !kill_switch_on(record) {
        alert.insert("endsAt".into(), record.timestamp.clone().into());
    }
    Value::Object(alert)
}

/// This host's name (the `host` of an alert, Alertmanager's `instance`).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into the buffer we own.
    let result = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if result != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// Tuning that is not in the configuration (tests shorten it).
#[derive(Debug, Clone)]
pub struct AlertOptions {
    /// Alerts waiting to be sent; past it the oldest is dropped.
    pub queue_capacity: usize,
    /// Wait before the first retry; doubled for each further one.
    pub first_backoff: Duration,
    /// Ceiling of the wait between retries.
    pub max_backoff: Duration,
    /// `host` in the bodies.
    pub host: String,
}

impl Default for AlertOptions {
    fn default() -> AlertOptions {
        AlertOptions {
            queue_capacity: 64,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            host: hostname(),
        }
    }
}

/// Counters of what the alert task did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlertStats {
    /// Alerts a webhook answered with 2xx.
    pub delivered: u64,
    /// Alerts given up on after every retry.
    pub failed: u64,
    /// Alerts dropped because the queue was full.
    pub dropped: u64,
    /// POSTs made, retries included.
    pub attempts: u64,
}

struct Shared {
    queue: Mutex<VecDeque<AuditRecord>>,
    /// Wakes the task: an alert was queued, or the last handle went away.
    wake: Notify,
    /// Told whenever an alert is finished with (delivered or given up), for `flush`.
    settled: Notify,
    /// Queued plus in flight.
    pending: AtomicUsize,
    closed: AtomicBool,
    delivered: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    attempts: AtomicU64,
}

/// Closes the queue when the last [`Alerter`] clone goes away: the task sends what is
/// queued, then ends.
struct Handle {
    shared: Arc<Shared>,
    capacity: usize,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

/// Sends alerts to one webhook from its own task. Cheap to clone; the task ends after the
/// last clone is dropped and the queue is empty.
#[derive(Clone)]
pub struct Alerter {
    handle: Arc<Handle>,
    config: AlertsConfig,
}

impl std::fmt::Debug for Alerter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerter")
            .field(
                "webhook_url",
                &self
                    .config
                    .webhook_url
                    .as_deref()
                    .map(crate::text::redact_url),
            )
            .field("format", &self.config.format)
            .finish()
    }
}

impl Alerter {
    /// An alerter for the configuration, or `None` when no `webhook_url` is set.
    /// Must be called inside a tokio runtime (it spawns the sending task).
    pub fn from_config(config: &AlertsConfig) -> Option<Alerter> {
        Alerter::start(config, AlertOptions::default())
    }

    /// Like [`Alerter::from_config`], with explicit options.
    pub fn start(config: &AlertsConfig, options: AlertOptions) -> Option<Alerter> {
        let url = config.webhook_url.clone()?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            settled: Notify::new(),
            pending: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
        });
        let client = match reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.timeout)
            .user_agent(concat!("rollbackd/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(client) => client,
            Err(err) => {
                tracing::error!("alerts are disabled: cannot build the HTTP client: {err}");
                return None;
            }
        };
        let task = Sender {
            shared: shared.clone(),
            client,
            url,
            format: config.format,
            timeout: config.timeout,
            max_retries: config.max_retries,
            options: options.clone(),
        };
        tokio::spawn(task.run());
        Some(Alerter {
            handle: Arc::new(Handle {
                shared,
                capacity: options.queue_capacity.max(1),
            }),
            config: config.clone(),
        })
    }

    /// The configuration this alerter was started with.
    pub fn config(&self) -> &AlertsConfig {
        &self.config
    }

    /// Queues `record` if its event is alerted; never waits. When the queue is full the
    /// oldest alert is dropped with a warning.
    pub fn send(&self, record: &AuditRecord) {
        if !is_alerted(record.event) {
            return;
        }
        let shared = &self.handle.shared;
        let dropped = {
            let mut queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            let dropped = if queue.len() >= self.handle.capacity {
                queue.pop_front()
            } else {
                None
            };
            queue.push_back(record.clone());
            dropped
        };
        match dropped {
            Some(old) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    event = %event_name(old.event),
                    timestamp = %old.timestamp,
                    capacity = self.handle.capacity,
                    "alert queue full: dropped the oldest alert"
                );
            }
            None => {
                shared.pending.fetch_add(1, Ordering::SeqCst);
            }
        }
        shared.wake.notify_one();
    }

    /// What the task has done so far.
    pub fn stats(&self) -> AlertStats {
        let shared = &self.handle.shared;
        AlertStats {
            delivered: shared.delivered.load(Ordering::Relaxed),
            failed: shared.failed.load(Ordering::Relaxed),
            dropped: shared.dropped.load(Ordering::Relaxed),
            attempts: shared.attempts.load(Ordering::Relaxed),
        }
    }

    /// Alerts queued or being sent.
    pub fn pending(&self) -> usize {
        self.handle.shared.pending.load(Ordering::SeqCst)
    }

    /// Waits until every queued alert is delivered or given up on, or `within` passes
    /// (for a process about to exit). True when nothing is left.
    pub async fn flush(&self, within: Duration) -> bool {
        let shared = &self.handle.shared;
        let deadline = crate::sys::clock::deadline_tokio(tokio::time::Instant::now(), within);
        loop {
            let settled = shared.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if shared.pending.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return shared.pending.load(Ordering::SeqCst) == 0;
            }
        }
    }
}

/// The sending task.
struct Sender {
    shared: Arc<Shared>,
    client: reqwest::Client,
    url: String,
    format: AlertFormat,
    timeout: Duration,
    max_retries: u32,
    options: AlertOptions,
}

impl Sender {
    async fn run(self) {
        loop {
            let next = self
                .shared
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            match next {
                Some(record) => {
                    self.deliver(&record).await;
                    self.shared.pending.fetch_sub(1, Ordering::SeqCst);
                    self.shared.settled.notify_waiters();
                }
                None if self.shared.closed.load(Ordering::SeqCst) => return,
                None => self.shared.wake.notified().await,
            }
        }
    }

    async fn deliver(&self, record: &AuditRecord) {
        let body = match serde_json::to_vec(&render(self.format, record, &self.options.host)) {
            Ok(body) => body,
            Err(err) => {
                tracing::error!("cannot encode an alert: {err}");
                self.shared.failed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let event = event_name(record.event);
        let mut backoff = self.options.first_backoff;
        let tries = self.max_retries.saturating_add(1);
        let mut last_error = String::new();
        for attempt in 1..=tries {
            if attempt > 1 {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(self.options.max_backoff);
            }
            self.shared.attempts.fetch_add(1, Ordering::Relaxed);
            let request = self
                .client
                .post(&self.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send();
            let error = match tokio::time::timeout(self.timeout, request).await {
                Ok(Ok(response)) if response.status().is_success() => {
                    self.shared.delivered.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%event, attempt, "alert delivered");
                    return;
                }
                Ok(Ok(response)) => format!("the webhook answered {}", response.status()),
                // reqwest's errors carry the URL, and with it the webhook's secrets.
                Ok(Err(err)) => format!("request failed: {}", error_chain(&err.without_url())),
                Err(_) => format!(
                    "no answer within {}",
                    humantime::format_duration(self.timeout)
                ),
            };
            if attempt < tries {
                tracing::warn!(%event, attempt, "alert not delivered, retrying: {error}");
            }
            last_error = error;
        }
        self.shared.failed.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            %event,
            attempts = tries,
            url = %crate::text::redact_url(&self.url),
            "alert given up after every retry: {last_error}"
        );
    }
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
