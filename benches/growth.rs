//! How the daemon's cost grows with uptime: a day of operation, accelerated.
//!
//! The real driver (`Driver::run`) with its real `rollbackd.db`, recorder and audit files in
//! a temporary state directory, under a paused tokio clock with instant fake adapters, so a
//! day passes in minutes: a promotion every hour, each session checked every
//! `RBD_GROWTH_INTERVAL_MS` (500) for a 50-minute grace period, idle observations
//! between sessions, and the audit log rotated every six hours by rename as logrotate does
//! (`config/rollbackd.logrotate`; rollbackd reopens it by name). Every virtual hour it
//! prints the process's RSS (the driver and this harness, which reads the audit log
//! line by line), the size of `rollbackd.db` (with its `-wal`), the live
//! `audit.log`, and the rows kept. Retention as configured here: `[retention] sessions =
//! "1h"`, `max_sessions = 5`.
//!
//! Run: `cargo bench --bench growth` (`RBD_GROWTH_HOURS`, default 24).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rollbackd::adapters::{BoxFuture, ResourceSampler, SnapshotSource, SnapshotVars, WorkerProbe};
use rollbackd::control::{Command, Operator, Reply, Request};
use rollbackd::core::check::{ProbeOutcome, Resources, Sample, Snapshot, SnapshotOutcome};
use rollbackd::daemon::{Adapters, Driver, DriverInputs, HookRunner, TokioClock};
use rollbackd::sys::hooks::{HookError, HookOutcome, HookVars};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Default)]
struct Fake;

impl WorkerProbe for Fake {
    fn probe<'a>(&'a self, _worker: &'a str) -> BoxFuture<'a, ProbeOutcome> {
        Box::pin(async { ProbeOutcome::Ok })
    }
}

impl SnapshotSource for Fake {
    fn snapshot<'a>(&'a self, _vars: &'a SnapshotVars) -> BoxFuture<'a, SnapshotOutcome> {
        Box::pin(async {
            SnapshotOutcome::Values(Snapshot {
                error_rate: Sample::Number(0.002),
                requests: Sample::Number(5000.0),
                ..Snapshot::default()
            })
        })
    }
}

impl ResourceSampler for Fake {
    fn sample<'a>(&'a self, _worker: &'a str) -> BoxFuture<'a, Option<Resources>> {
        Box::pin(async { None })
    }
}

impl HookRunner for Fake {
    fn run<'a>(
        &'a self,
        argv: &'a [String],
        _vars: &'a HookVars,
        _limit: Duration,
        _tracking: Option<rollbackd::sys::hooks::Tracking>,
    ) -> BoxFuture<'a, Result<HookOutcome, HookError>> {
        Box::pin(async move {
            Ok(HookOutcome {
                argv: argv.to_vec(),
                exit_code: Some(0),
                signal: None,
                timed_out: false,
                duration_seconds: 0.0,
                stdout_tail: String::new(),
                stderr_tail: String::new(),
            })
        })
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn count(db: &Path, table: &str) -> i64 {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap_or(-1)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let hours = env_u64("RBD_GROWTH_HOURS", 24);
    let interval_ms = env_u64("RBD_GROWTH_INTERVAL_MS", 500);
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let text = format!(
        r#"
state_dir = {state:?}
[monitor]
check_interval = "{interval_ms}ms"
degraded_check_interval = "{interval_ms}ms"
check_timeout = "{interval_ms}ms"
grace_period = "50m"
[worker]
health_url = "http://127.0.0.1:1/{{worker}}/health"
[rollback]
switch_command = ["switch", "{{to}}"]
[kill_switch]
database = {db:?}
create_database = true
[retention]
sessions = "1h"
max_sessions = 5
"#,
        state = state.display().to_string(),
        db = dir.path().join("app.db").display().to_string(),
    );
    let loaded = rollbackd::config::load_str(&text, &BTreeMap::new()).expect("valid config");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    runtime.block_on(async move {
        let factory = Arc::new(|_: &rollbackd::config::Config| Adapters {
            probe: Arc::new(Fake),
            snapshot: Arc::new(Fake),
            resources: Arc::new(Fake),
            hooks: Arc::new(Fake),
        });
        let (commands, commands_rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let inputs = DriverInputs {
            fleet: None,
            one_shot: false,
            factory,
            clock: Arc::new(TokioClock::new(
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            )),
            commands: commands_rx,
            flags: None,
            reload: None,
            shutdown: shutdown.clone(),
            on_status: None,
            watchdog: None,
            metrics: None,
        };
        let driver = tokio::spawn(Driver::run(loaded, inputs));
        let db = state.join("rollbackd.db");
        let audit = state.join("analytics/audit.log");
        println!(
            "virtual hour | checks so far | RSS MB | rollbackd.db (+wal) KB | audit.log KB (before rotation) | sessions rows | checks rows | observations rows"
        );
        println!("--- | --- | --- | --- | --- | --- | --- | ---");
        let mut checks_rotated = 0usize;
        // Streamed, so the bench's own reading does not show in the RSS it reports.
        let health_checks = |path: &Path| {
            use std::io::BufRead;
            let Ok(file) = std::fs::File::open(path) else {
                return 0;
            };
            std::io::BufReader::new(file)
                .lines()
                .map_while(Result::ok)
                .filter(|l| l.contains(r#""event":"health-check""#))
                .count()
        };
        for hour in 1..=hours {
            let (tx, mut rx) = mpsc::channel(16);
            commands
                .send(Command {
                    operator: Operator {
                        uid: 0,
                        gid: 0,
                        pid: None,
                        name: "bench".into(),
                    },
                    request: Request::Promote {
                        active: format!("v{}", hour + 1),
                        previous: format!("v{hour}"),
                        baseline_error_rate: None,
                        baseline_latency_p95_ms: None,
                        force: false,
                        reason: None,
                    },
                    replies: tx,
                })
                .await
                .unwrap();
            while let Some(reply) = rx.recv().await {
                if !matches!(reply, Reply::Progress { .. }) {
                    assert!(matches!(reply, Reply::Done { .. }), "{reply:?}");
                    break;
                }
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
            let checks_total = checks_rotated + health_checks(&audit);
            let audit_kb = size(&audit) / 1024;
            if hour % 6 == 0 {
                // logrotate, rename style, keeping one old file.
                checks_rotated += health_checks(&audit);
                let _ = std::fs::rename(&audit, state.join("analytics/audit.log.1"));
            }
            let db_kb = (size(&db) + size(&state.join("rollbackd.db-wal"))) / 1024;
            println!(
                "{hour} | {checks_total} | {:.1} | {db_kb} | {} | {} | {} | {}",
                rss_kb() as f64 / 1024.0,
                audit_kb,
                count(&db, "sessions"),
                count(&db, "checks"),
                count(&db, "observations"),
            );
        }
        shutdown.cancel();
        driver.await.unwrap().unwrap();
    });
    println!(
        "{hours} virtual hours in {:.1} s of real time",
        started.elapsed().as_secs_f64()
    );
}
