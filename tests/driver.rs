//! The driver under paused tokio time with fake adapters: exact numbers of checks to each
//! verdict, grace-period expiry, the degraded cadence, no catch-up burst, and that the
//! actions it starts reach the hooks and the kill switch. Minutes pass in milliseconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rollbackd::adapters::{BoxFuture, ResourceSampler, SnapshotSource, SnapshotVars, WorkerProbe};
use rollbackd::config::LoadedConfig;
use rollbackd::control::{Command, Operator, Reply, Request};
use rollbackd::core::check::{ProbeOutcome, Resources, Sample, Snapshot, SnapshotOutcome};
use rollbackd::daemon::{Adapters, Driver, DriverInputs, HookRunner, TokioClock};
use rollbackd::sys::hooks::{HookError, HookOutcome, HookVars};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the fake world looks like at a given moment; tests change it as time passes.
#[derive(Default)]
struct World {
    error_rate: Option<f64>,
    probe_fails: bool,
    /// How long each probe takes.
    probe_delay: Duration,
    /// Like an adapter's own time limit: a probe whose answer is seen later than this
    /// (by the tokio clock) fails with "timeout after ...".
    probe_limit: Option<Duration>,
    /// Told each time a probe of the active worker starts.
    probe_started: Arc<tokio::sync::Notify>,
    /// Tokio instants at which checks (probe calls for the active worker) started.
    probe_starts: Vec<tokio::time::Instant>,
    /// Workers the verify loop probed.
    probed: Vec<String>,
    switches: Vec<HookVars>,
    /// Every hook run, by program name, in order.
    hooks: Vec<String>,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<World>>);

impl Fake {
    fn set(&self, f: impl FnOnce(&mut World)) {
        f(&mut self.0.lock().unwrap());
    }
    fn get<R>(&self, f: impl FnOnce(&World) -> R) -> R {
        f(&self.0.lock().unwrap())
    }
}

impl WorkerProbe for Fake {
    fn probe<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, ProbeOutcome> {
        Box::pin(async move {
            let (delay, fails, limit) = self.get(|w| (w.probe_delay, w.probe_fails, w.probe_limit));
            let started = tokio::time::Instant::now();
            self.set(|w| {
                w.probed.push(worker.to_owned());
                if worker == "v2" {
                    w.probe_starts.push(started);
                    w.probe_started.notify_one();
                }
            });
            tokio::time::sleep(delay).await;
            if let Some(limit) = limit.filter(|limit| started.elapsed() > *limit) {
                return ProbeOutcome::failed(format!("timeout after {limit:?}"));
            }
            // The previous worker (v1) is always healthy in these tests.
            if fails && worker == "v2" {
                ProbeOutcome::failed("connection refused")
            } else {
                ProbeOutcome::Ok
            }
        })
    }
}

impl SnapshotSource for Fake {
    fn snapshot<'a>(&'a self, _vars: &'a SnapshotVars) -> BoxFuture<'a, SnapshotOutcome> {
        Box::pin(async move {
            match self.get(|w| w.error_rate) {
                Some(rate) => SnapshotOutcome::Values(Snapshot {
                    error_rate: Sample::Number(rate),
                    requests: Sample::Number(1000.0),
                    ..Snapshot::default()
                }),
                None => SnapshotOutcome::Unavailable {
                    reason: "down".into(),
                },
            }
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
        vars: &'a HookVars,
        _limit: Duration,
        _tracking: Option<rollbackd::sys::hooks::Tracking>,
    ) -> BoxFuture<'a, Result<HookOutcome, HookError>> {
        Box::pin(async move {
            self.set(|w| w.hooks.push(argv.first().cloned().unwrap_or_default()));
            if argv.first().map(String::as_str) == Some("switch") {
                self.set(|w| w.switches.push(vars.clone()));
            }
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

struct Harness {
    fake: Fake,
    dir: tempfile::TempDir,
    commands: mpsc::Sender<Command>,
    shutdown: CancellationToken,
    driver: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn config(dir: &Path, extra: &str) -> LoadedConfig {
    let text = format!(
        r#"
state_dir = {state:?}
[worker]
health_url = "http://127.0.0.1:1/{{worker}}/health"
[rollback]
switch_command = ["switch", "{{to}}"]
verify_interval = "1s"
verify_timeout = "10s"
# The session ends at the verified rollback unless a test sets a stability period.
stability_period = "0s"
[kill_switch]
database = {db:?}
create_database = true
"#,
        state = dir.display().to_string(),
        db = dir.join("app.db").display().to_string(),
    );
    // Sections of `extra` are merged key by key into the base.
    let mut table: toml::Table = text.parse().unwrap();
    for (key, value) in extra.parse::<toml::Table>().unwrap() {
        match (table.get_mut(&key), value) {
            (Some(toml::Value::Table(existing)), toml::Value::Table(new)) => existing.extend(new),
            (_, value) => {
                table.insert(key, value);
            }
        }
    }
    rollbackd::config::load_str(&toml::to_string(&table).unwrap(), &BTreeMap::new())
        .expect("test config is valid")
}

fn start(extra: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let loaded = config(dir.path(), extra);
    let fake = Fake::default();
    fake.set(|w| w.error_rate = Some(0.01));
    let adapters = {
        let fake = fake.clone();
        Arc::new(move |_: &rollbackd::config::Config| Adapters {
            probe: Arc::new(fake.clone()),
            snapshot: Arc::new(fake.clone()),
            resources: Arc::new(fake.clone()),
            hooks: Arc::new(fake.clone()),
        })
    };
    let (commands, commands_rx) = mpsc::channel(8);
    let shutdown = CancellationToken::new();
    let inputs = DriverInputs {
        fleet: None,
        one_shot: false,
        factory: adapters,
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
    Harness {
        fake,
        dir,
        commands,
        shutdown,
        driver,
    }
}

fn operator() -> Operator {
    Operator {
        uid: 1000,
        gid: 1000,
        pid: Some(42),
        name: "uid:1000(alice)".into(),
    }
}

impl Harness {
    async fn send(&self, request: Request) -> Vec<Reply> {
        let (tx, mut rx) = mpsc::channel(16);
        self.commands
            .send(Command {
                operator: operator(),
                request,
                replies: tx,
            })
            .await
            .unwrap();
        let mut replies = Vec::new();
        while let Some(reply) = rx.recv().await {
            let last = !matches!(reply, Reply::Progress { .. });
            replies.push(reply);
            if last {
                break;
            }
        }
        replies
    }

    async fn promote(&self) {
        let replies = self
            .send(Request::Promote {
                active: "v2".into(),
                previous: "v1".into(),
                baseline_error_rate: None,
                baseline_latency_p95_ms: None,
                force: false,
                reason: None,
            })
            .await;
        assert!(
            matches!(replies.last(), Some(Reply::Done { .. })),
            "{replies:?}"
        );
    }

    async fn stop(self) -> (Fake, tempfile::TempDir) {
        self.shutdown.cancel();
        self.driver.await.unwrap().unwrap();
        (self.fake, self.dir)
    }
}

fn audit(dir: &Path) -> Vec<Value> {
    let path: PathBuf = dir.join("analytics/audit.log");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("every audit line parses"))
        .collect()
}

fn events(dir: &Path, event: &str) -> Vec<Value> {
    audit(dir)
        .into_iter()
        .filter(|v| v["event"] == event)
        .collect()
}

fn seconds_between(starts: &[tokio::time::Instant]) -> Vec<u64> {
    starts.windows(2).map(|w| (w[1] - w[0]).as_secs()).collect()
}

#[tokio::test(start_paused = true)]
async fn rollback_on_the_third_breaching_check_and_the_switch_runs_once() {
    let h = start("");
    h.fake.set(|w| w.error_rate = Some(0.5));
    let promoted = tokio::time::Instant::now();
    h.promote().await;
    tokio::time::sleep(Duration::from_secs(300)).await;
    let (fake, dir) = h.stop().await;

    let checks = events(dir.path(), "health-check");
    let verdicts: Vec<&str> = checks
        .iter()
        .map(|c| c["verdict"].as_str().unwrap())
        .collect();
    assert_eq!(verdicts, ["degraded", "degraded", "rollback"]);
    // First check one interval after promotion, then the degraded cadence (15 s).
    let starts = fake.get(|w| w.probe_starts.clone());
    assert_eq!((starts[0] - promoted).as_secs(), 30);
    assert_eq!(seconds_between(&starts), [15, 15]);
    let switches = fake.get(|w| w.switches.clone());
    assert_eq!(switches.len(), 1, "exactly one switch");
    assert_eq!(
        (switches[0].from.as_str(), switches[0].to.as_str()),
        ("v2", "v1")
    );
    let executed = events(dir.path(), "rollback-executed");
    assert_eq!(executed.len(), 1);
    let artifact = executed[0]["artifact"].as_str().unwrap();
    let record: Value = serde_json::from_str(&std::fs::read_to_string(artifact).unwrap()).unwrap();
    assert_eq!(record["decision"], "rollback");
    assert_eq!(record["status"], "executed");
    assert_eq!(record["trigger"], "automatic");
    assert_eq!(
        (record["from"].as_str(), record["to"].as_str()),
        (Some("v2"), Some("v1"))
    );
    assert_eq!(
        record["evidence"]["recentChecks"].as_array().unwrap().len(),
        3
    );
    let stopped = events(dir.path(), "monitoring-stopped");
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0]["state"], "rolled-back");
    // No more checks after the session ended.
    assert_eq!(starts.len(), 3);
    let manager: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("analytics/worker_manager.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (manager["active"].as_str(), manager["previous"].as_str()),
        (Some("v1"), Some("v2"))
    );
}

#[tokio::test(start_paused = true)]
async fn grace_period_expiry_confirms_the_promotion() {
    let h = start("[monitor]\ngrace_period = \"5m\"");
    h.promote().await;
    tokio::time::sleep(Duration::from_secs(400)).await;
    let (fake, dir) = h.stop().await;
    // Checks at 30, 60, ..., 300 s (one due exactly at the grace period's end is still
    // taken, as `simulate` evaluates it: SPEC §6 skips only checks *after* it); the tick
    // at 330 s finds the grace period over.
    assert_eq!(fake.get(|w| w.probe_starts.len()), 10);
    assert!(seconds_between(&fake.get(|w| w.probe_starts.clone()))
        .iter()
        .all(|s| *s == 30));
    let stopped = events(dir.path(), "monitoring-stopped");
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0]["state"], "confirmed");
    assert!(fake.get(|w| w.switches.is_empty()));
}

#[tokio::test(start_paused = true)]
async fn degraded_checks_come_at_the_degraded_interval_then_return_to_normal() {
    let h = start("[monitor]\ncheck_interval = \"20s\"\ndegraded_check_interval = \"5s\"");
    h.promote().await;
    tokio::time::sleep(Duration::from_secs(41)).await; // healthy checks at 20, 40
    h.fake.set(|w| w.error_rate = Some(0.10)); // degraded, never a breach
    tokio::time::sleep(Duration::from_secs(39)).await; // until t=80
    h.fake.set(|w| w.error_rate = Some(0.01));
    tokio::time::sleep(Duration::from_secs(80)).await;
    let (fake, dir) = h.stop().await;
    let gaps = seconds_between(&fake.get(|w| w.probe_starts.clone()));
    // 20→40 healthy; 60 degraded (first seen), then every 5 s while degraded; once the
    // window is clean again (5 good checks) back to 20 s.
    assert_eq!(gaps[0], 20);
    assert!(gaps.contains(&5), "{gaps:?}");
    assert_eq!(*gaps.last().unwrap(), 20, "{gaps:?}");
    assert!(events(dir.path(), "rollback-executed").is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_slow_check_causes_no_burst_of_catch_up_checks() {
    let h = start("[monitor]\ncheck_interval = \"30s\"\ncheck_timeout = \"30s\"");
    h.fake.set(|w| w.probe_delay = Duration::from_secs(50)); // slower than the interval
    h.promote().await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    h.fake.set(|w| w.probe_delay = Duration::ZERO);
    tokio::time::sleep(Duration::from_secs(150)).await;
    let (fake, _dir) = h.stop().await;
    let gaps = seconds_between(&fake.get(|w| w.probe_starts.clone()));
    // The slow check started at 30 s and ended at 80 s; the next starts at once (80 s),
    // then the cadence resumes — never several checks back to back.
    assert_eq!(gaps[0], 50, "{gaps:?}");
    assert!(gaps[1..].iter().all(|g| *g >= 30), "{gaps:?}");
}

#[tokio::test(start_paused = true)]
async fn two_probe_failures_escalate_and_set_the_kill_switch() {
    let h = start("");
    h.fake.set(|w| w.probe_fails = true);
    h.promote().await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    let (fake, dir) = h.stop().await;
    let verdicts: Vec<String> = events(dir.path(), "health-check")
        .iter()
        .map(|c| c["verdict"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(&verdicts[..2], ["degraded", "escalate"]);
    // Escalated sessions keep checking, without further actions.
    assert!(verdicts.len() > 2);
    assert_eq!(events(dir.path(), "escalation-triggered").len(), 1);
    assert_eq!(events(dir.path(), "kill-switch-activated").len(), 1);
    assert!(fake.get(|w| w.switches.is_empty()));
    let rows = rollbackd::flags::read_once(&dir.path().join("app.db"), "DISABLE_NEW").unwrap();
    assert_eq!(rows.get("DISABLE_NEW").map(String::as_str), Some("1"));
}

#[tokio::test(start_paused = true)]
async fn paused_sessions_check_but_do_not_act() {
    let h = start("");
    h.fake.set(|w| w.error_rate = Some(0.5));
    h.promote().await;
    let replies = h
        .send(Request::Pause {
            reason: Some("investigating".into()),
        })
        .await;
    assert!(matches!(replies.last(), Some(Reply::Done { .. })));
    tokio::time::sleep(Duration::from_secs(120)).await;
    let replies = h.send(Request::Resume).await;
    assert!(matches!(replies.last(), Some(Reply::Done { .. })));
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (fake, dir) = h.stop().await;
    let paused = events(dir.path(), "monitoring-paused");
    assert_eq!(paused[0]["operator"], "uid:1000(alice)");
    // Rollback verdicts while paused took no action; after resume, the next one did.
    assert_eq!(fake.get(|w| w.switches.len()), 1);
    let checks = events(dir.path(), "health-check");
    assert!(
        checks
            .iter()
            .filter(|c| c["paused"] == true && c["verdict"] == "rollback")
            .count()
            >= 2
    );
}

#[tokio::test(start_paused = true)]
async fn manual_rollback_streams_phases_and_names_the_operator() {
    let h = start("");
    h.promote().await;
    tokio::time::sleep(Duration::from_secs(31)).await;
    let replies = h
        .send(Request::Rollback {
            reason: "bad deploy".into(),
            emergency: false,
            force: false,
        })
        .await;
    let progress = replies
        .iter()
        .filter(|r| matches!(r, Reply::Progress { .. }))
        .count();
    assert!(progress >= 3, "{replies:?}");
    let Some(Reply::Done { result }) = replies.last() else {
        panic!("{replies:?}")
    };
    assert_eq!(result["outcome"], "rolled-back");
    let (_fake, dir) = h.stop().await;
    let executed = events(dir.path(), "rollback-executed");
    assert_eq!(executed[0]["operator"], "uid:1000(alice)");
    assert_eq!(executed[0]["trigger"], "manual");
}

#[tokio::test(start_paused = true)]
async fn past_max_rollbacks_per_hour_the_driver_escalates_instead() {
    let h = start("[rollback]\nmax_rollbacks_per_hour = 1");
    h.fake.set(|w| w.error_rate = Some(0.5));
    h.promote().await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(h.fake.get(|w| w.switches.len()), 1);
    // The same bad canary is promoted again within the hour: no second rollback.
    h.promote().await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    let (fake, dir) = h.stop().await;
    assert_eq!(
        fake.get(|w| w.switches.len()),
        1,
        "loop protection: no second switch"
    );
    let escalations = events(dir.path(), "escalation-triggered");
    assert_eq!(escalations.len(), 1);
    assert!(
        escalations[0]["reason"]
            .as_str()
            .unwrap()
            .contains("max_rollbacks_per_hour = 1"),
        "{}",
        escalations[0]
    );
}

#[tokio::test(start_paused = true)]
async fn an_emergency_rollback_skips_the_drain_phase() {
    let extra = "[rollback]\npause_command = [\"pause\"]\ndrain_command = [\"drain\"]\nresume_command = [\"resume\"]";
    for (emergency, expected) in [
        (false, ["pause", "drain", "switch", "resume"].as_slice()),
        (true, ["pause", "switch", "resume"].as_slice()),
    ] {
        let h = start(extra);
        h.promote().await;
        let replies = h
            .send(Request::Rollback {
                reason: "test".into(),
                emergency,
                force: false,
            })
            .await;
        assert!(
            matches!(replies.last(), Some(Reply::Done { .. })),
            "{replies:?}"
        );
        let (fake, dir) = h.stop().await;
        assert_eq!(
            fake.get(|w| w.hooks.clone()),
            expected,
            "emergency = {emergency}"
        );
        let artifact = events(dir.path(), "rollback-executed")[0]["artifact"]
            .as_str()
            .unwrap()
            .to_owned();
        let text = std::fs::read_to_string(artifact).unwrap();
        let record: Value = serde_json::from_str(&text).unwrap();
        let mut want: Vec<&str> = expected.to_vec();
        want.insert(want.len() - 1, "verify");
        let mut keys: Vec<&str> = record["phases"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        // serde_json's map is sorted: read the order from the file's text instead.
        let phases_text = &text[text.find("\"phases\"").unwrap()..];
        keys.sort_by_key(|k| phases_text.find(&format!("\"{k}\"")).unwrap());
        assert_eq!(keys, want, "phases are timed in the order they ran");
        assert_eq!(
            record["trigger"],
            if emergency { "emergency" } else { "manual" }
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_rollback_in_flight_refuses_a_second_one_and_shutdown_waits_for_it() {
    let h = start("[rollback]\nverify_timeout = \"60s\"");
    // The restored worker answers only after 20 s, so verify keeps the rollback in flight.
    h.fake.set(|w| w.probe_delay = Duration::from_secs(20));
    h.promote().await;
    let commands = h.commands.clone();
    let first = tokio::spawn(async move {
        let (tx, mut rx) = mpsc::channel(16);
        commands
            .send(Command {
                operator: operator(),
                request: Request::Rollback {
                    reason: "one".into(),
                    emergency: true,
                    force: false,
                },
                replies: tx,
            })
            .await
            .unwrap();
        let mut last = None;
        while let Some(reply) = rx.recv().await {
            last = Some(reply);
        }
        last
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let second = h
        .send(Request::Rollback {
            reason: "two".into(),
            emergency: true,
            force: false,
        })
        .await;
    match second.last() {
        Some(Reply::Failed { exit: 3, message }) => {
            assert!(message.contains("in progress"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Shutdown now: the rollback in flight finishes first.
    let (fake, dir) = h.stop().await;
    assert!(matches!(first.await.unwrap(), Some(Reply::Done { .. })));
    assert_eq!(fake.get(|w| w.switches.len()), 1);
    assert_eq!(events(dir.path(), "rollback-executed").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stall_of_the_daemon_during_a_check_voids_it_instead_of_failing_it() {
    let h = start("[monitor]\ncheck_timeout = \"500ms\"\n[rules]\nconsecutive_failures = 1");
    h.fake.set(|w| {
        w.probe_delay = Duration::from_millis(300);
        w.probe_limit = Some(Duration::from_millis(500));
    });
    let started = h.fake.get(|w| w.probe_started.clone());
    h.promote().await;
    started.notified().await;
    // The first check's probe is in flight: the whole process stops for 3 s (tokio's
    // clock jumps; every timer then fires late), so the probe's answer is seen late.
    tokio::time::advance(Duration::from_secs(3)).await;
    tokio::time::sleep(Duration::from_secs(100)).await;
    let (fake, dir) = h.stop().await;

    let checks = events(dir.path(), "health-check");
    assert!(
        checks
            .iter()
            .all(|c| c["probe"] == "ok" && c["verdict"] == "healthy"),
        "the stalled check is not recorded as a failure: {checks:#?}"
    );
    let note = checks[0]["afterVoid"].as_str().unwrap();
    let stalled: f64 = note
        .strip_prefix("check void: rollbackd was stalled for ")
        .and_then(|rest| rest.split('s').next())
        .and_then(|secs| secs.parse().ok())
        .unwrap_or_else(|| panic!("{note}"));
    assert!((2.8..=3.0).contains(&stalled), "{note}");
    assert!(note.contains("probe: timeout after"), "{note}");
    assert_eq!(checks[0]["checkIndex"], 0, "a void check has no number");
    // The void check was taken again at once, then the cadence went on.
    let starts = fake.get(|w| w.probe_starts.clone());
    assert!((starts[1] - starts[0]).as_millis() <= 3_100, "{starts:?}");
    assert!(checks.len() >= 3);
    assert!(fake.get(|w| w.switches.is_empty()));
    assert!(events(dir.path(), "escalation-triggered").is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_grace_period_passed_while_stalled_is_not_a_confirmation() {
    let h = start("[monitor]\ngrace_period = \"5m\"");
    h.promote().await;
    tokio::time::sleep(Duration::from_secs(61)).await; // healthy checks at 30, 60 s
                                                       // The daemon stops for 5 minutes; meanwhile the canary goes bad.
    h.fake.set(|w| w.error_rate = Some(0.5));
    tokio::time::advance(Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_secs(300)).await;
    let (fake, dir) = h.stop().await;
    let stopped = events(dir.path(), "monitoring-stopped");
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0]["state"], "rolled-back", "{stopped:#?}");
    let verdicts: Vec<String> = events(dir.path(), "health-check")
        .iter()
        .map(|c| c["verdict"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        verdicts,
        ["healthy", "healthy", "degraded", "degraded", "rollback"]
    );
    assert_eq!(fake.get(|w| w.switches.len()), 1);
}

#[tokio::test(start_paused = true)]
async fn after_a_stall_past_the_grace_period_a_full_window_is_checked_before_confirming() {
    let h = start("[monitor]\ngrace_period = \"5m\"\nwindow = 4");
    h.promote().await;
    tokio::time::sleep(Duration::from_secs(61)).await; // checks at 30, 60 s
    tokio::time::advance(Duration::from_secs(300)).await;
    let resumed = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(600)).await;
    let (fake, dir) = h.stop().await;
    let stopped = events(dir.path(), "monitoring-stopped");
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0]["state"], "confirmed");
    let after = fake.get(|w| w.probe_starts.iter().filter(|s| **s >= resumed).count());
    assert_eq!(after, 4, "exactly monitor.window checks after the resume");
}
