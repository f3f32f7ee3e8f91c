//! `rollbackd demo`: the real daemon against built-in loopback workers.
//!
//! One loopback HTTP server plays both workers and the operations manager: `v1` is
//! healthy; `v2` answers its health probe but its error rate climbs a few seconds after
//! promotion. The switch hook is this binary (`rollbackd demo-hook`), which records the
//! new active worker in the state directory, where the server reads it. The daemon runs
//! with fast intervals in a fresh state directory that is kept afterwards.

use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use tokio_util::sync::CancellationToken;

use crate::control::{self, Request as ControlRequest};

const ACTIVE_FILE: &str = "demo-active";

struct Workers {
    state_dir: PathBuf,
    promoted_at: std::sync::Mutex<Option<Instant>>,
}

impl Workers {
    fn active(&self) -> String {
        std::fs::read_to_string(self.state_dir.join(ACTIVE_FILE))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "v1".into())
    }

    /// v2's error rate: fine for 3 s after promotion, then degraded, then bad.
    fn error_rate(&self, worker: &str) -> f64 {
        if worker != "v2" {
            return 0.012;
        }
        let since = self
            .promoted_at
            .lock()
            .unwrap()
            .map(|t| t.elapsed())
            .unwrap_or_default();
        match since.as_millis() {
            0..=2999 => 0.014,
            3000..=4499 => 0.09,
            _ => 0.38,
        }
    }

    fn respond(&self, path: &str) -> (u16, String) {
        match path {
            "/v1/health" | "/v2/health" => (200, r#"{"status":"ok"}"#.into()),
            "/snapshot" => {
                let active = self.active();
                let rate = self.error_rate(&active);
                (
                    200,
                    format!(
                        r#"{{"failureRate": {rate}, "requests": 1200, "latencyP95Ms": {}}}"#,
                        if rate > 0.1 { 640 } else { 180 }
                    ),
                )
            }
            _ => (404, "not found".into()),
        }
    }
}

async fn serve_workers(workers: Arc<Workers>, shutdown: CancellationToken) -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.cancelled() => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            let workers = workers.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let (status, body) = workers.respond(request.uri().path());
                        async move {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .expect("static response"),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(port)
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// The demo's configuration: fast intervals, loopback workers, this binary as the hook.
fn demo_config(state_dir: &Path, port: u16, exe: &Path) -> String {
    let dir = state_dir.display().to_string();
    format!(
        r#"# Written by `rollbackd demo`; use it with `rollbackd --config {config} status`.
state_dir = {state}
profile = "default"

[monitor]
check_interval = "1s"
degraded_check_interval = "500ms"
check_timeout = "500ms"
grace_period = "2m"
window = 5

[worker]
health_url = "http://127.0.0.1:{port}/{{worker}}/health"

[operations]
snapshot_url = "http://127.0.0.1:{port}/snapshot"

[rollback]
switch_command = [{exe}, "demo-hook", "--state-dir", {state}, "--to", "{{to}}"]
hook_timeout = "5s"
verify_interval = "200ms"
verify_timeout = "5s"
stability_period = "8s"

[kill_switch]
database = {db}

[http]
listen = ""
"#,
        config = state_dir.join("demo.toml").display(),
        state = toml_string(&dir),
        exe = toml_string(&exe.display().to_string()),
        db = toml_string(&state_dir.join(DEMO_DB).display().to_string()),
    )
}

/// `rollbackd demo-hook --state-dir DIR --to WORKER`: the demo's switch hook.
pub fn hook(state_dir: &Path, to: &str) -> anyhow::Result<()> {
    let path = state_dir.join(ACTIVE_FILE);
    crate::storage::audit::write_atomic(state_dir, ACTIVE_FILE, to.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("switched traffic to {to}");
    Ok(())
}

/// The demo application's database (the kill switch's `settings` table).
const DEMO_DB: &str = "orchestrator.db";

/// Creates the demo application's database (an empty `settings` table) as the
/// application would, before the daemon starts: rollbackd never creates it unless
/// configured to (`kill_switch.create_database`), and its LiveFlags then finds a
/// readable table from the first poll instead of warning about a missing file.
async fn create_application_db(path: &Path) -> anyhow::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        crate::appdb::settings::SettingsStore::open(&path)
            .map(drop)
            .with_context(|| format!("cannot create the demo database {}", path.display()))
    })
    .await?
}

/// Runs the demo; returns the exit status.
pub async fn run(out: &mut (dyn Write + Send)) -> anyhow::Result<u8> {
    let started = Instant::now();
    let state_dir = std::env::temp_dir().join(format!(
        "rollbackd-demo-{}",
        crate::storage::audit::artifact_stamp(std::time::SystemTime::now()).replace('.', "")
    ));
    // Created here, 0700, and never an existing one: the name is predictable, and a
    // directory someone else made in /tmp beforehand is not ours to trust.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&state_dir)
            .with_context(|| {
                format!(
                    "cannot create the demo's state directory {}",
                    state_dir.display()
                )
            })?;
    }
    let state_dir = state_dir.canonicalize()?;
    std::fs::write(state_dir.join(ACTIVE_FILE), "v1")?;
    create_application_db(&state_dir.join(DEMO_DB)).await?;
    let workers = Arc::new(Workers {
        state_dir: state_dir.clone(),
        promoted_at: std::sync::Mutex::new(None),
    });
    let shutdown = CancellationToken::new();
    let port = serve_workers(workers.clone(), shutdown.clone()).await?;
    let exe =
        std::env::current_exe().context("cannot find this program's path for the switch hook")?;
    let config_text = demo_config(&state_dir, port, &exe);
    let config_path = state_dir.join("demo.toml");
    std::fs::write(&config_path, &config_text)?;
    let loaded = crate::config::load_str(&config_text, &Default::default())?;

    writeln!(out, "rollbackd demo")?;
    writeln!(out, "  state directory : {}", state_dir.display())?;
    writeln!(out, "  workers         : v1 (healthy) and v2 (fails a few seconds after promotion) on 127.0.0.1:{port}")?;
    writeln!(out, "  checks          : every 1s, every 0.5s while degraded; rollback on 3 of 5 checks over 20% errors")?;
    writeln!(out)?;

    let reload_path = config_path.clone();
    let reloader: crate::daemon::Reloader = Arc::new(move || {
        let text = std::fs::read_to_string(&reload_path).map_err(|source| {
            crate::config::ConfigError::Read {
                path: reload_path.clone(),
                source,
            }
        })?;
        crate::config::load_str(&text, &Default::default())
    });
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let daemon_shutdown = shutdown.child_token();
    let daemon = tokio::spawn(crate::daemon::service::run(
        loaded,
        reloader,
        crate::daemon::service::real_adapters(),
        daemon_shutdown.clone(),
        Some(ready_tx),
    ));
    let socket = ready_rx.await.context("the daemon did not start")?.socket;

    // The deploy pipeline's step: v2 is now active, tell rollbackd.
    std::fs::write(state_dir.join(ACTIVE_FILE), "v2")?;
    *workers.promoted_at.lock().unwrap() = Some(Instant::now());
    let promoted = control::call(
        &socket,
        &ControlRequest::Promote {
            active: "v2".into(),
            previous: "v1".into(),
            baseline_error_rate: None,
            baseline_latency_p95_ms: None,
            force: false,
            reason: None,
        },
        |_, _| {},
    )
    .await
    .context("promote over the control socket")?;
    writeln!(
        out,
        "promoted v2 (previous v1): session {}",
        crate::text::Escaped(
            promoted
                .get("sessionId")
                .and_then(|v| v.as_str())
                .unwrap_or("?")
        )
    )?;

    // Follow the audit log until the session ends.
    let audit_path = state_dir
        .join("analytics")
        .join(crate::storage::audit::AUDIT_LOG_FILE);
    let mut printed = 0usize;
    let mut outcome: Option<String> = None;
    let mut rolled_back_after: Option<Duration> = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcome.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = std::fs::read_to_string(&audit_path).unwrap_or_default();
        for line in text.lines().skip(printed) {
            printed += 1;
            if let Some(shown) = crate::cli::tail::format_line(line, false) {
                writeln!(out, "  {shown}")?;
            }
            let value: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            if value["event"] == "rollback-executed" && rolled_back_after.is_none() {
                rolled_back_after = Some(started.elapsed());
            }
            if value["event"] == "monitoring-stopped" {
                outcome = value["state"].as_str().map(str::to_owned);
            }
            if value["event"] == "escalation-triggered" {
                outcome = Some("escalated".into());
            }
        }
        out.flush()?;
    }
    // The report is written again when the stability watch ends: wait for that one.
    let incident = wait_for_incident(&state_dir.join("analytics"), outcome.is_some()).await;
    daemon_shutdown.cancel();
    let result = daemon.await.context("daemon task")?;
    shutdown.cancel();
    result?;

    writeln!(out)?;
    let mut artifacts: Vec<PathBuf> = std::fs::read_dir(state_dir.join("analytics"))
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    artifacts.sort();
    let code = match outcome.as_deref() {
        Some("rolled-back") => {
            writeln!(
                out,
                "rolled back: v2 → v1, verified healthy, in {:.1}s from promotion; v1 then stable through the stability watch.",
                rolled_back_after.unwrap_or_default().as_secs_f64()
            )?;
            0
        }
        Some(other) => {
            writeln!(
                out,
                "the session ended as {}, not with a rollback",
                crate::text::Escaped(other)
            )?;
            1
        }
        None => {
            writeln!(out, "no rollback within 60 s: something is wrong")?;
            1
        }
    };
    if let Some((path, text)) = &incident {
        writeln!(out)?;
        writeln!(out, "incident report ({}):", path.display())?;
        writeln!(out)?;
        for line in text.lines() {
            writeln!(out, "  {line}")?;
        }
        writeln!(out)?;
    }
    writeln!(out, "artifacts:")?;
    for path in &artifacts {
        writeln!(out, "  {}", path.display())?;
    }
    writeln!(out, "explore:")?;
    writeln!(
        out,
        "  {} --config {} audit tail -n 50",
        exe.display(),
        config_path.display()
    )?;
    writeln!(
        out,
        "  {} --config {} status",
        exe.display(),
        config_path.display()
    )?;
    writeln!(
        out,
        "  {} --config {} report latest",
        exe.display(),
        config_path.display()
    )?;
    writeln!(
        out,
        "  jq . {}/analytics/rollback_*.json",
        state_dir.display()
    )?;
    out.flush()?;
    Ok(code)
}

/// The incident report once it has its final form (the stability watch's result in it),
/// waiting up to 10 s for the rewrite; `None` without one.
async fn wait_for_incident(analytics: &Path, ended: bool) -> Option<(PathBuf, String)> {
    let deadline = Instant::now() + Duration::from_secs(if ended { 10 } else { 1 });
    let mut last = None;
    loop {
        let newest = std::fs::read_dir(analytics)
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("incident_") && n.ends_with(".md"))
            })
            .max();
        if let Some(path) = newest {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let done = !text.contains("stability watch is running")
                && !text.contains("| Stability watch | watching");
            last = Some((path, text));
            if done {
                return last;
            }
        }
        if Instant::now() >= deadline {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
