//! The daemon: the effect runner around the [`Supervisor`]. One driver task feeds it every
//! event — the next check's deadline, a finished check, a finished action, an operator
//! command, a reload — and carries out the effects it asks for through the adapters, the
//! store and the recorder; the policy (what a verdict becomes, grace, pause, dry run,
//! loop protection, resume) is the Supervisor's alone. It also watches the kill switch
//! (LiveFlags), the watchdog and shutdown. Checks and actions run in their own tasks and
//! report back, so a slow probe never stops the daemon from answering `status`.
//!
//! Here: the loop, the effects, restore and the actions. By concern, as more `impl
//! Driver` blocks: `checks` (taking one, off the loop), `killswitch` (start-up value,
//! hand-made changes, an operator's set/reset), `operator` (commands, reload, status).

pub mod alerts;
mod checks;
pub mod db;
pub mod executor;
pub mod fleet;
pub mod http;
pub mod incident;
mod killswitch;
pub mod metrics;
pub mod notify;
mod operator;
pub use operator::fixed_keys_changed;
pub mod recorder;
pub mod service;
pub mod status;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::adapters::{BoxFuture, ResourceSampler, SnapshotSource, SnapshotVars, WorkerProbe};
use crate::appdb::flags::FlagsSnapshot;
use crate::config::{ConfigError, LoadedConfig};
use crate::control::status::{ActionStatus, CheckLine, SessionStatus, StatusReport, Workers};
use crate::control::{Command, Operator, Reply, Request};
use crate::core::check::{Baseline, CheckResult, ProbeOutcome};
use crate::core::engine::Verdict;
use crate::core::supervisor::{
    ActionKind, ActionPlan, ActionResult, Answer, CheckRecord, Effect, Input, ReplyTo, Restored,
    SessionRecord, SessionState, StateChange, Supervisor,
};
use crate::core::time::{self, Now};
use crate::daemon::metrics::Metrics;
use crate::storage::audit::{rfc3339_millis, AuditEvent, AuditRecord, KillSwitchSource};
use crate::storage::events;
use crate::storage::store::{
    self, ActionId, ActionRow, ActionState, CheckRow, NewAction, ObservationRow, SessionRow,
    StoreError,
};
use crate::sys::hooks::{HookError, HookOutcome, HookVars};
use db::Db;
use executor::{ActionContext, ActionDetail, ActionOutcome};
use recorder::{now_ms, Recorder};

/// `meta` key: the kill-switch value the daemon last saw (JSON `null` for no row).
const KILL_SWITCH_SEEN: &str = "kill_switch_value";

/// Wall-clock time, an adapter like any other (tests make it follow tokio's paused clock).
pub trait Clock: Send + Sync {
    fn now(&self) -> SystemTime;
}

/// The real clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A wall clock that advances with tokio's clock, for paused-time tests.
pub struct TokioClock {
    base: SystemTime,
    start: Instant,
}

impl TokioClock {
    pub fn new(base: SystemTime) -> TokioClock {
        TokioClock {
            base,
            start: Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.base + self.start.elapsed()
    }
}

/// Runs rollback phase hooks (an adapter, so driver tests can count switches without
/// spawning processes under paused time).
pub trait HookRunner: Send + Sync {
    fn run<'a>(
        &'a self,
        argv_template: &'a [String],
        vars: &'a HookVars,
        limit: Duration,
        tracking: Option<crate::sys::hooks::Tracking>,
    ) -> BoxFuture<'a, Result<HookOutcome, HookError>>;
}

/// Hooks as real processes.
pub struct ProcessHooks;

impl HookRunner for ProcessHooks {
    fn run<'a>(
        &'a self,
        argv_template: &'a [String],
        vars: &'a HookVars,
        limit: Duration,
        tracking: Option<crate::sys::hooks::Tracking>,
    ) -> BoxFuture<'a, Result<HookOutcome, HookError>> {
        Box::pin(crate::sys::hooks::run_hook_tracked(
            argv_template,
            vars,
            limit,
            tracking,
        ))
    }
}

/// The I/O the driver checks and acts through.
#[derive(Clone)]
pub struct Adapters {
    pub probe: Arc<dyn WorkerProbe>,
    pub snapshot: Arc<dyn SnapshotSource>,
    pub resources: Arc<dyn ResourceSampler>,
    pub hooks: Arc<dyn HookRunner>,
}

/// Builds adapters for a configuration (again on reload).
pub type AdapterFactory = Arc<dyn Fn(&crate::config::Config) -> Adapters + Send + Sync>;
/// Loads the configuration again (SIGHUP).
pub type Reloader = Arc<dyn Fn() -> Result<LoadedConfig, ConfigError> + Send + Sync>;

/// Told the daemon's one-line status whenever it changes (systemd `STATUS=`).
pub type StatusSink = Box<dyn Fn(&str) + Send>;

/// Inputs of the driver besides the configuration.
pub struct DriverInputs {
    pub factory: AdapterFactory,
    pub clock: Arc<dyn Clock>,
    pub commands: mpsc::Receiver<Command>,
    pub flags: Option<watch::Receiver<Arc<FlagsSnapshot>>>,
    pub reload: Option<(mpsc::Receiver<()>, Reloader)>,
    pub shutdown: CancellationToken,
    /// Called with a one-line status whenever it changes (systemd STATUS=).
    pub on_status: Option<StatusSink>,
    /// Half the systemd watchdog period, and what to call on each beat.
    pub watchdog: Option<(Duration, Box<dyn Fn() + Send>)>,
    /// The daemon's Prometheus metrics, kept up to date when present.
    pub metrics: Option<Metrics>,
    /// One operator command without a daemon (`rollbackd promote|rollback|pause|resume|
    /// kill-switch set|reset` when none runs): the same Supervisor and runner, nothing
    /// checked; stops once the commands channel is closed and every command and action
    /// it started has ended.
    pub one_shot: bool,
    /// The fleet agent's channels, when `[fleet]` is configured (`rollbackd run` only).
    pub fleet: Option<fleet::FleetInputs>,
}

/// How often a check in flight looks at the clock, to notice that rollbackd itself was
/// not running (SIGSTOP, a VM pause, a cgroup freeze, a host too loaded to schedule it).
const STALL_TICK: Duration = Duration::from_millis(100);

pub use crate::core::supervisor::{stall_threshold, MAX_VOID_IN_A_ROW};

/// How long the machine has spent suspended since boot: CLOCK_BOOTTIME runs on during a
/// system suspend, CLOCK_MONOTONIC (tokio's clock) does not. Zero if either is unreadable.
pub fn suspended_since_boot() -> Duration {
    fn read(clock: libc::clockid_t) -> Option<Duration> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into the one we pass.
        (unsafe { libc::clock_gettime(clock, &mut ts) } == 0).then(|| {
            Duration::new(
                ts.tv_sec.max(0) as u64,
                ts.tv_nsec.clamp(0, 999_999_999) as u32,
            )
        })
    }
    match (read(libc::CLOCK_BOOTTIME), read(libc::CLOCK_MONOTONIC)) {
        (Some(boot), Some(mono)) => boot.saturating_sub(mono),
        _ => Duration::ZERO,
    }
}

/// Runs `work` while measuring how long rollbackd itself was not running: a heartbeat
/// timer every [`STALL_TICK`], and the largest lateness of it seen (including the one
/// still pending when `work` ends, which catches a stall that ended just as `work` did).
/// tokio's clock is CLOCK_MONOTONIC, which runs on while the process is stopped, so a
/// SIGSTOP or freeze shows as a late timer. A system suspend stops CLOCK_MONOTONIC, so it
/// is measured apart ([`suspended_since_boot`]) and added.
pub async fn watch_stalls<F: std::future::Future>(work: F) -> (F::Output, Duration) {
    let suspended = suspended_since_boot();
    let mut next = Instant::now() + STALL_TICK;
    let mut worst = Duration::ZERO;
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            out = &mut work => {
                worst = worst.max(Instant::now().saturating_duration_since(next));
                return (out, worst + suspended_since_boot().saturating_sub(suspended));
            }
            _ = tokio::time::sleep_until(next) => {
                let now = Instant::now();
                worst = worst.max(now.saturating_duration_since(next));
                next = now + STALL_TICK;
            }
        }
    }
}

struct CheckDone {
    session_id: String,
    index: u64,
    started: Instant,
    taken_at: SystemTime,
    result: CheckResult,
    probe_duration: Duration,
    /// How long rollbackd itself was not running during the check ([`watch_stalls`]).
    stalled: Duration,
}

/// A compact line for `status`.
#[derive(Clone)]
struct CheckSummary {
    at: SystemTime,
    index: u64,
    verdict: Verdict,
    probe: String,
    error_rate: Option<f64>,
    error_class: &'static str,
}

fn apply(change: &StateChange, store: &mut crate::storage::store::Store) -> Result<(), StoreError> {
    match change {
        StateChange::Session { id, state, ended } => store.update_session_state(
            id,
            *state,
            ended
                .as_ref()
                .map(|(at, reason)| (time::to_ms(*at), reason.as_str())),
        ),
        StateChange::Workers { active, previous } => {
            store.set_meta("active", active)?;
            store.set_meta("previous", previous)
        }
        StateChange::Paused { id, paused, reason } => {
            store.set_paused(id, *paused, reason.as_deref())
        }
        StateChange::Stability { id, stability } => {
            store.set_stability(id, &serde_json::to_string(stability).unwrap_or_default())
        }
        StateChange::Observation { observed, keep } => {
            let at = time::to_ms(observed.at);
            store.insert_observation(
                &ObservationRow {
                    taken_at_ms: at,
                    worker: observed.worker.clone(),
                    observation_json: serde_json::to_string(&observed.observation)
                        .unwrap_or_default(),
                },
                at.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX)),
                crate::core::baseline::MAX_OBSERVATIONS as u32,
            )
        }
        StateChange::HealthyBaseline { worker, baseline } => {
            let mut list = healthy_baselines(store.get_meta(store::META_HEALTHY_BASELINES)?);
            list.retain(|(w, _)| w != worker);
            list.push((worker.clone(), *baseline));
            let skip = list
                .len()
                .saturating_sub(crate::core::baseline::MAX_HEALTHY);
            let list: Vec<_> = list.into_iter().skip(skip).collect();
            store.set_meta(
                store::META_HEALTHY_BASELINES,
                &serde_json::to_string(&list).unwrap_or_else(|_| "[]".into()),
            )
        }
    }
}

/// The stored list of each version's last healthy-session stats (unreadable: none).
fn healthy_baselines(text: Option<String>) -> Vec<(String, Baseline)> {
    text.and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

fn session_row(record: &SessionRecord) -> SessionRow {
    SessionRow {
        id: record.id.clone(),
        active: record.active.clone(),
        previous: record.previous.clone(),
        promoted_at_ms: time::to_ms(record.promoted_at),
        state: record.state,
        paused: record.paused,
        pause_reason: record.pause_reason.clone(),
        baseline_json: record.baseline.and_then(|b| serde_json::to_string(&b).ok()),
        operator: record.operator.clone(),
        ended_at_ms: None,
        end_reason: None,
        stability_json: record
            .stability
            .as_ref()
            .and_then(|w| serde_json::to_string(w).ok()),
    }
}

fn session_record(row: &SessionRow) -> SessionRecord {
    SessionRecord {
        id: row.id.clone(),
        active: row.active.clone(),
        previous: stored_worker_id("previous worker of the session", row.previous.clone()),
        promoted_at: time::from_ms(row.promoted_at_ms),
        // A state this build does not know was read as monitoring (storage::store).
        state: row.state,
        paused: row.paused,
        pause_reason: row.pause_reason.clone(),
        baseline: row
            .baseline_json
            .as_deref()
            .and_then(|text| serde_json::from_str::<Baseline>(text).ok()),
        operator: row.operator.clone(),
        // Unreadable: the Supervisor starts the watch again (`restore`).
        stability: row
            .stability_json
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok()),
    }
}

fn reply_of(answer: Answer) -> Reply {
    match answer {
        Answer::Progress { message, detail } => Reply::Progress { message, detail },
        Answer::Done(result) => Reply::Done { result },
        Answer::Failed { message, exit } => Reply::Failed { message, exit },
    }
}

/// The effect runner: feeds every event to the [`Supervisor`] and carries out what it asks
/// through the adapters, the store and the recorder. It decides nothing itself.
pub struct Driver {
    config: Arc<LoadedConfig>,
    adapters: Adapters,
    factory: AdapterFactory,
    clock: Arc<dyn Clock>,
    db: Db,
    recorder: Recorder,
    sup: Supervisor,
    /// Operators waiting for an answer, by the token the Supervisor answers to.
    replies: HashMap<ReplyTo, mpsc::Sender<Reply>>,
    next_reply: ReplyTo,
    /// The probe duration of the check being judged (for the metrics).
    probe_duration: Duration,
    /// When a check last looked whether `rollbackd.db` was deleted or replaced.
    state_db_seen: Option<Instant>,
    /// The check in flight (session, index, worker, start), and the last one recorded
    /// (session, worker, start): `{interval}` is the time since the last recorded check
    /// of the same worker in the same session (a void check is taken again over its span).
    check_started: Option<(String, u64, String, Instant)>,
    last_recorded: Option<(String, String, Instant)>,
    /// The last observation between sessions (worker, start), for its `{interval}`.
    last_observed: Option<(String, Instant)>,
    recent: VecDeque<CheckSummary>,
    kill_value: Option<Option<String>>,
    /// rollbackd's own kill-switch writes (shared with the actions that make them).
    kill_writes: executor::ExpectedKillWrites,
    checks_tx: mpsc::Sender<CheckDone>,
    observed_tx: mpsc::Sender<(String, crate::core::check::SnapshotOutcome)>,
    actions_tx: mpsc::Sender<(Option<ActionId>, ActionOutcome)>,
    status_line: String,
    started_at: SystemTime,
    /// Writes to `rollbackd.db` that failed (a full disk), retried on the record-retry
    /// tick so the state catches up once there is space again.
    pending_state: Vec<StateChange>,
    metrics: Option<Metrics>,
    /// When the state database was last found deleted or replaced and written back.
    db_restored: Option<Value>,
    /// Manual kill-switch writes in flight (awaited before a one-shot run returns).
    side_tasks: Vec<tokio::task::JoinHandle<()>>,
    /// The fleet as last reported by the fleet agent (`[fleet]` configured).
    fleet: Option<fleet::FleetState>,
    /// A command run without a daemon: the verdicts it read for a promotion.
    fleet_read: Option<fleet::FleetRead>,
}

impl Driver {
    /// Opens the state, resumes the recorded session and any action in flight, and runs
    /// until `shutdown` (after an action in flight has finished).
    pub async fn run(config: LoadedConfig, mut inputs: DriverInputs) -> anyhow::Result<()> {
        let config = Arc::new(config);
        let db_path = config.config.rollbackd_db();
        let db = tokio::task::spawn_blocking(move || Db::open(&db_path)).await??;
        let recorder = Recorder::new(config.config.analytics_dir(), Some(db.clone())).await;
        recorder.set_alerts(crate::daemon::alerts::Alerter::from_config(
            &config.config.alerts,
        ));
        let adapters = (inputs.factory)(&config.config);
        let (checks_tx, mut checks_rx) = mpsc::channel(4);
        let (observed_tx, mut observed_rx) = mpsc::channel(2);
        let (actions_tx, mut actions_rx) = mpsc::channel(4);
        let clock = inputs.clock.clone();
        let settings = config.config.supervisor_settings(&config.hash);
        let sup = if inputs.one_shot {
            Supervisor::offline(settings)
        } else {
            Supervisor::new(settings)
        };
        let mut driver = Driver {
            config,
            adapters,
            factory: inputs.factory.clone(),
            clock: clock.clone(),
            db,
            recorder,
            sup,
            replies: HashMap::new(),
            next_reply: 0,
            probe_duration: Duration::ZERO,
            state_db_seen: None,
            check_started: None,
            last_recorded: None,
            last_observed: None,
            recent: VecDeque::new(),
            kill_value: None,
            kill_writes: Default::default(),
            checks_tx,
            observed_tx,
            actions_tx,
            status_line: String::new(),
            started_at: clock.now(),
            pending_state: Vec::new(),
            metrics: inputs.metrics.take(),
            db_restored: None,
            side_tasks: Vec::new(),
            fleet: None,
            fleet_read: None,
        };
        driver.restore().await?;
        driver.prune_sessions().await;
        driver.publish_status(&inputs.on_status);

        let mut watchdog = inputs.watchdog.as_ref().map(|(period, _)| {
            let mut interval = tokio::time::interval(*period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            interval
        });
        let mut retry_records = tokio::time::interval(Duration::from_secs(5));
        retry_records.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut stopping = false;
        let mut commands_open = true;
        let mut flags = inputs.flags.take();
        if let Some(rx) = &flags {
            let snapshot = rx.borrow().clone();
            driver.kill_switch_at_start(&snapshot).await;
        }
        let (mut fleet_events, mut fleet_mirrored) =
            match driver.fleet_start(inputs.fleet.take()).await {
                Some((events, mirrored)) => (Some(events), Some(mirrored)),
                None => (None, None),
            };
        let (mut reload_rx, reloader) = match inputs.reload.take() {
            Some((rx, reloader)) => (Some(rx), Some(reloader)),
            None => (None, None),
        };

        loop {
            if stopping && driver.sup.action().is_none() {
                break;
            }
            if inputs.one_shot
                && !commands_open
                && driver.sup.action().is_none()
                && driver.replies.is_empty()
            {
                break;
            }
            let next_check = if stopping {
                None
            } else {
                driver.sup.poll_timeout().map(Instant::from_std)
            };
            tokio::select! {
                biased;
                _ = inputs.shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    if let Some(action) = driver.sup.action() {
                        tracing::info!(action = ?action.id, "shutting down after the {} in flight finishes", action.kind.as_str());
                    }
                }
                Some((id, outcome)) = actions_rx.recv() => {
                    driver.action_finished(id, outcome).await;
                    driver.fleet_track_session().await;
                    driver.publish_status(&inputs.on_status);
                }
                Some(done) = checks_rx.recv() => {
                    driver.check_finished(done).await;
                    driver.publish_status(&inputs.on_status);
                }
                Some((worker, snapshot)) = observed_rx.recv() => {
                    driver.feed(Input::IdleObserved { worker, snapshot }).await;
                }
                command = inputs.commands.recv(), if commands_open => {
                    let Some(command) = command else {
                        commands_open = false;
                        continue;
                    };
                    if stopping {
                        let _ = command.replies.send(Reply::Failed { message: "rollbackd is shutting down".into(), exit: 1 }).await;
                    } else {
                        driver.command(command).await;
                        driver.publish_status(&inputs.on_status);
                    }
                }
                changed = async { flags.as_mut().expect("guarded").changed().await }, if flags.is_some() => {
                    match changed {
                        Ok(()) => {
                            let snapshot = flags.as_mut().expect("guarded").borrow_and_update().clone();
                            driver.flags_changed(&snapshot).await;
                            driver.publish_status(&inputs.on_status);
                        }
                        Err(_) => flags = None,
                    }
                }
                event = async { fleet_events.as_mut().expect("guarded").recv().await }, if fleet_events.is_some() => {
                    match event {
                        Some(event) => {
                            driver.fleet_event(event).await;
                            driver.publish_status(&inputs.on_status);
                        }
                        None => fleet_events = None,
                    }
                }
                done = async { fleet_mirrored.as_mut().expect("guarded").recv().await }, if fleet_mirrored.is_some() => {
                    match done {
                        Some(done) => driver.fleet_mirrored(done).await,
                        None => fleet_mirrored = None,
                    }
                }
                Some(()) = async { reload_rx.as_mut().expect("guarded").recv().await }, if reload_rx.is_some() => {
                    if let Some(reloader) = &reloader {
                        driver.reload(reloader).await;
                    }
                }
                _ = async { tokio::time::sleep_until(next_check.expect("guarded")).await }, if next_check.is_some() => {
                    driver.tick().await;
                    driver.publish_status(&inputs.on_status);
                }
                _ = async { watchdog.as_mut().expect("guarded").tick().await }, if watchdog.is_some() => {
                    if let Some((_, beat)) = &inputs.watchdog {
                        beat();
                    }
                }
                _ = retry_records.tick() => {
                    driver.check_state_db().await;
                    if driver.recorder.backlog() > 0 {
                        driver.recorder.retry().await;
                    }
                    if !driver.pending_state.is_empty() {
                        driver.retry_state().await;
                    }
                    driver.fleet_save_hold().await;
                    driver.fleet_release_waiting(true).await;
                    driver.fleet_retry_quiet();
                    driver.publish_status(&inputs.on_status);
                }
            }
        }
        driver.fleet_drop_waiting().await;
        for task in std::mem::take(&mut driver.side_tasks) {
            let _ = task.await;
        }
        driver.recorder.retry().await;
        // Alerts still queued get one POST timeout's worth of time before the process exits.
        if !driver
            .recorder
            .flush_alerts(driver.config.config.alerts.timeout)
            .await
        {
            tracing::warn!("stopping with alerts not yet delivered");
        }
        tracing::info!("driver stopped");
        Ok(())
    }

    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    /// Both clocks, read once for one event.
    fn time(&self) -> Now {
        Now {
            mono: Instant::now().into_std(),
            wall: self.clock.now(),
        }
    }

    /// Feeds one event and carries out what it leads to.
    async fn feed(&mut self, input: Input) {
        let now = self.time();
        self.sup.handle(now, input);
        self.run_effects().await;
    }

    fn expect_reply(&mut self, replies: mpsc::Sender<Reply>) -> ReplyTo {
        self.next_reply += 1;
        self.replies.insert(self.next_reply, replies);
        self.next_reply
    }

    /// Carries out the Supervisor's effects, in order, until it has none left.
    async fn run_effects(&mut self) {
        while let Some(effect) = self.sup.poll_effect() {
            match effect {
                Effect::StartCheck {
                    session_id,
                    index,
                    worker,
                } => self.start_check(session_id, index, worker),
                Effect::ObserveIdle { worker } => self.observe_idle(worker),
                Effect::RecordCheck(check) => {
                    let line = self.sup.poll_audit();
                    self.record_check(check, line).await
                }
                Effect::Observed {
                    verdict,
                    error_rate,
                    error_class,
                } => {
                    if let Some(metrics) = &self.metrics {
                        metrics.check_observed(
                            verdict,
                            error_rate,
                            error_class,
                            self.probe_duration,
                        );
                    }
                }
                Effect::RecordSession(record) => {
                    let row = session_row(&record);
                    let (active, previous) =
                        (row.active.clone(), row.previous.clone().unwrap_or_default());
                    let result = self
                        .db
                        .call(move |store| {
                            store.insert_session(&row)?;
                            store.set_meta("active", &active)?;
                            store.set_meta("previous", &previous)
                        })
                        .await;
                    if result.is_ok() {
                        self.recent.clear();
                    }
                    let now = self.time();
                    self.sup.handle(
                        now,
                        Input::SessionRecorded {
                            id: record.id,
                            error: result.err().map(|e| e.to_string()),
                        },
                    );
                }
                Effect::Persist(change) => self.write_state(change).await,
                Effect::Audit(record) => {
                    if let Some(metrics) = &self.metrics {
                        match record.event {
                            AuditEvent::StabilityConfirmed => metrics.stability_ended(true),
                            AuditEvent::StabilityFailed => metrics.stability_ended(false),
                            _ => {}
                        }
                    }
                    self.recorder.audit(record).await
                }
                Effect::WorkerManager(record) => self.recorder.worker_manager(record).await,
                Effect::Artifact { name, record } => {
                    let path = self.recorder.artifact(name, *record).await;
                    tracing::warn!(artifact = %path.display(), "dry run artifact written");
                }
                Effect::StartAction { plan, reply } => self.start_action(*plan, reply).await,
                Effect::PruneSessions => self.prune_sessions().await,
                Effect::IncidentReport { session_id } => {
                    // Not awaited here: a report never holds up the checks. A side task, so
                    // a shutdown right after the watch ends still writes the final report.
                    let (db, recorder, config) =
                        (self.db.clone(), self.recorder.clone(), self.config.clone());
                    let now = self.now();
                    self.side_tasks.retain(|task| !task.is_finished());
                    self.side_tasks.push(tokio::spawn(async move {
                        incident::rewrite(&db, &recorder, &config, session_id, now).await;
                    }));
                }
                Effect::Reply { to, answer } => {
                    let last = !matches!(answer, Answer::Progress { .. });
                    let sender = if last {
                        self.replies.remove(&to)
                    } else {
                        self.replies.get(&to).cloned()
                    };
                    if let Some(sender) = sender {
                        let _ = sender.send(reply_of(answer)).await;
                    }
                }
            }
        }
    }

    /// Tells systemd (`STATUS=`) and the metrics what the daemon is doing now; called
    /// after every event that may have changed it.
    fn publish_status(&mut self, on_status: &Option<StatusSink>) {
        let session = self.sup.session();
        if let Some(metrics) = &self.metrics {
            metrics.session(
                session.map(|s| s.record.state.as_str()),
                session
                    .and_then(|s| s.last_decision.as_ref())
                    .map(|d| d.verdict),
            );
            metrics.records_pending(self.recorder.backlog());
        }
        self.fleet_publish_host();
        let line = match (session, self.sup.action()) {
            (_, Some(action)) => match action.id {
                Some(id) => format!("{} #{id} in progress", action.kind.as_str()),
                None => format!("{} in progress", action.kind.as_str()),
            },
            (Some(session), None) => format!(
                "{} {} (previous {}), {}{}",
                session.record.state.as_str(),
                session.record.active,
                session.record.previous.as_deref().unwrap_or("-"),
                session
                    .last_decision
                    .as_ref()
                    .map(|d| d.verdict.as_str())
                    .unwrap_or("no checks yet"),
                if session.record.paused {
                    ", paused"
                } else {
                    ""
                }
            ),
            (None, None) => "idle: waiting for a promotion".to_owned(),
        };
        if line != self.status_line {
            self.status_line = line;
            if let Some(on_status) = on_status {
                on_status(&self.status_line);
            }
        }
    }

    /// Picks up the recorded session, its window and any action in flight.
    async fn restore(&mut self) -> anyhow::Result<()> {
        let hour_ago = time::to_ms(self.now()).saturating_sub(3_600_000);
        let window = self.config.config.baseline.window;
        let observed_since = time::to_ms(time::sub(self.now(), window));
        let history = self
            .db
            .call(move |store| {
                Ok((
                    store.get_meta("active")?,
                    store.observations_since(observed_since)?,
                    store.get_meta(store::META_HEALTHY_BASELINES)?,
                ))
            })
            .await;
        let (active_worker, observations, healthy) = match history {
            Ok((active, rows, healthy)) => {
                let observations = rows
                    .into_iter()
                    .filter_map(|row| {
                        Some(crate::core::baseline::Observed {
                            at: time::from_ms(row.taken_at_ms),
                            worker: row.worker,
                            observation: serde_json::from_str(&row.observation_json).ok()?,
                        })
                    })
                    .collect();
                (
                    // A fresh host knows no active version until a promotion records one;
                    // `worker.active` declares the one serving so that it is observed for
                    // the first promotion's baseline.
                    stored_worker_id("active worker", active)
                        .or_else(|| self.config.config.worker.active.clone()),
                    observations,
                    healthy_baselines(healthy),
                )
            }
            Err(err) => {
                // The baseline history helps; it is never worth not guarding the host.
                tracing::error!("cannot read the baseline history from rollbackd.db: {err}");
                (None, Vec::new(), Vec::new())
            }
        };
        let found = self
            .db
            .call(move |store| {
                let session = store.current_session()?;
                let (checks, actions_of_session) = match &session {
                    Some(s) => (
                        store.recent_checks(&s.id, 1000)?,
                        store.actions_for_session(&s.id)?,
                    ),
                    None => (Vec::new(), Vec::new()),
                };
                let unfinished = store.unfinished_actions()?;
                let rollbacks = store.rollback_starts_since(hour_ago)?;
                Ok((session, checks, actions_of_session, unfinished, rollbacks))
            })
            .await?;
        let (session, checks, actions_of_session, unfinished, rollbacks) = found;
        let checks = checks
            .into_iter()
            .filter_map(|c| {
                let result = serde_json::from_str::<CheckResult>(&c.check_json).ok()?;
                Some((
                    c.check_index.max(0) as u64,
                    time::from_ms(c.taken_at_ms),
                    result,
                ))
            })
            .collect();
        let mut unfinished = unfinished.into_iter();
        let resume = unfinished.next();
        for extra in unfinished {
            tracing::error!(
                action = extra.id,
                "more than one unfinished action recorded; resuming only the first"
            );
        }
        let settled = match &resume {
            Some(_) => None,
            None => actions_of_session.into_iter().next_back().map(|last| {
                let artifact = self
                    .recorder
                    .artifact_path(last.artifact_name.as_deref().unwrap_or_default())
                    .display()
                    .to_string();
                let result = match (last.kind, last.state) {
                    (ActionKind::Rollback, ActionState::Done) => ActionResult::RolledBack {
                        from: last.from_worker.clone().unwrap_or_default(),
                        to: last.to_worker.clone().unwrap_or_default(),
                        artifact,
                    },
                    (ActionKind::Rollback, _) => ActionResult::RollbackFailed {
                        reason: format!(
                            "rollback #{} failed before the restart",
                            last.id.unwrap_or_default()
                        ),
                        artifact,
                    },
                    _ => ActionResult::Escalated { artifact },
                };
                (last.id, last.kind, last.trigger, result)
            }),
        };
        let restored = Restored {
            session: session.as_ref().map(session_record),
            checks,
            active_worker,
            observations,
            healthy,
            in_flight: resume.as_ref().map(|row| (row.id, row.kind, row.trigger)),
            settled,
            rollbacks: rollbacks
                .into_iter()
                .map(|(at, from)| crate::core::supervisor::PastRollback {
                    at: time::from_ms(at),
                    from,
                })
                .collect(),
        };
        self.feed(Input::Restore(Box::new(restored))).await;
        if let Some(action) = resume {
            tracing::warn!(action = ?action.id, kind = %action.kind, phase = ?action.phase, "resuming an action interrupted by a restart");
            // A kill between recording the intent and writing its first audit line leaves
            // a rollback nobody was told about: say it started, once.
            if action.kind == ActionKind::Rollback
                && !self
                    .recorder
                    .audit_has(action.id, AuditEvent::RollbackStarted)
                    .await
            {
                self.recorder
                    .audit(executor::rollback_started(self.now(), &action, true))
                    .await;
            }
            self.spawn_action(action, None);
        }
        Ok(())
    }

    fn context(&self, progress: Option<mpsc::Sender<Reply>>) -> ActionContext {
        ActionContext {
            config: self.config.clone(),
            db: self.db.clone(),
            recorder: self.recorder.clone(),
            probe: self.adapters.probe.clone(),
            hooks: self.adapters.hooks.clone(),
            clock: self.clock.clone(),
            progress,
            kill_writes: self.kill_writes.clone(),
        }
    }

    fn spawn_action(&mut self, row: ActionRow, replies: Option<mpsc::Sender<Reply>>) {
        let ctx = self.context(replies);
        let tx = self.actions_tx.clone();
        let id = row.id;
        tokio::spawn(async move {
            let outcome = match row.kind {
                ActionKind::Escalation => executor::escalate(ctx, row).await,
                ActionKind::Rollback => executor::rollback(ctx, row).await,
            };
            let _ = tx.send((id, outcome)).await;
        });
    }

    /// Records the intent of an action (before any side effect) and starts it.
    async fn start_action(&mut self, plan: ActionPlan, reply: Option<ReplyTo>) {
        let detail = ActionDetail {
            evidence: plan.evidence,
            error_rate: plan.error_rate,
            failure_count: plan.failure_count,
            emergency: plan.emergency,
            config_hash: plan.config_hash,
            ..ActionDetail::default()
        };
        let new = NewAction {
            session_id: plan.session_id,
            kind: plan.kind,
            trigger: plan.trigger,
            state: ActionState::Pending,
            phase: None,
            attempt: 1,
            from_worker: plan.from,
            to_worker: plan.to,
            reason: plan.reason,
            operator: plan.operator,
            started_at_ms: time::to_ms(plan.started_at),
            detail_json: serde_json::to_string(&detail).ok(),
        };
        let row = executor::record_intent(&self.db, &self.recorder, self.now(), new).await;
        let id = row.id;
        let replies = reply.and_then(|to| self.replies.get(&to).cloned());
        self.spawn_action(row, replies);
        let now = self.time();
        self.sup.handle(now, Input::ActionStarted { id });
    }

    /// Notices a `rollbackd.db` deleted or replaced while running and puts the daemon's
    /// own state back under the path, so a restart still finds the session. Loud: an
    /// error in the journal and `stateDbRestored` in `status --json`.
    async fn check_state_db(&mut self) {
        if !self
            .db
            .call(|store| Ok(store.replaced()))
            .await
            .unwrap_or(false)
        {
            return;
        }
        let path = self.config.config.rollbackd_db();
        tracing::error!(
            db = %path.display(),
            "the state database was deleted or replaced while rollbackd runs; writing the \
             current state back to it so a restart keeps the session"
        );
        let at = rfc3339_millis(self.now());
        match self.db.call(|store| store.restore()).await {
            Ok(moved) => {
                if let Some(moved) = &moved {
                    tracing::error!(
                        db = %path.display(),
                        moved_to = %moved.display(),
                        "the file found in place of the state database was moved aside"
                    );
                }
                tracing::warn!(db = %path.display(), "state database restored");
                self.db_restored = Some(json!({
                    "at": at,
                    "path": path.display().to_string(),
                    "replacementMovedTo": moved.map(|m| m.display().to_string()),
                }));
            }
            Err(err) => tracing::error!(
                db = %path.display(),
                "cannot restore the state database ({err}); the session lives only in this \
                 process until it can: do not restart rollbackd"
            ),
        }
    }

    async fn action_finished(&mut self, id: Option<ActionId>, outcome: ActionOutcome) {
        if let Some(metrics) = &self.metrics {
            let trigger = self
                .sup
                .action()
                .map(|a| a.trigger.as_str())
                .unwrap_or("automatic");
            match &outcome {
                ActionOutcome::RolledBack { .. } => metrics.rollback_finished(trigger, true),
                ActionOutcome::RollbackFailed { .. } => metrics.rollback_finished(trigger, false),
                ActionOutcome::Escalated { .. } => metrics.escalation_finished(),
            }
        }
        if let ActionOutcome::RolledBack { from, to, artifact } = &outcome {
            self.fleet_rolled_back(id, from, to, artifact).await;
        }
        let shown = |path: &std::path::Path| path.display().to_string();
        let result = match outcome {
            ActionOutcome::RolledBack { from, to, artifact } => ActionResult::RolledBack {
                from,
                to,
                artifact: shown(&artifact),
            },
            ActionOutcome::RollbackFailed { reason, artifact } => ActionResult::RollbackFailed {
                reason,
                artifact: shown(&artifact),
            },
            ActionOutcome::Escalated { artifact } => ActionResult::Escalated {
                artifact: shown(&artifact),
            },
        };
        self.feed(Input::ActionDone { id, result }).await;
    }

    /// Writes a state change, or keeps it for [`Self::retry_state`] when the database
    /// cannot take it now.
    async fn write_state(&mut self, change: StateChange) {
        if !self.pending_state.is_empty() {
            // Keep the order: earlier writes are still waiting.
            self.pending_state.push(change);
            self.retry_state().await;
            return;
        }
        let attempt = change.clone();
        if let Err(err) = self.db.call(move |store| apply(&attempt, store)).await {
            tracing::error!(
                ?change,
                "cannot record a state change in rollbackd.db, will retry: {err}"
            );
            self.pending_state.push(change);
        }
    }

    /// Writes the state changes that failed before, in order, stopping at the first failure.
    async fn retry_state(&mut self) {
        while let Some(change) = self.pending_state.first().cloned() {
            match self.db.call(move |store| apply(&change, store)).await {
                Ok(()) => {
                    self.pending_state.remove(0);
                }
                Err(err) => {
                    tracing::warn!(
                        pending = self.pending_state.len(),
                        "rollbackd.db still cannot take state changes: {err}"
                    );
                    return;
                }
            }
        }
    }

    /// Deletes the sessions `[retention]` no longer keeps (at start-up and after each
    /// session ends). A failure is logged and tried again next time: it never stops
    /// monitoring.
    async fn prune_sessions(&mut self) {
        let retention = self.config.config.retention.clone();
        let now = time::to_ms(self.now());
        let floor =
            crate::config::retention_floor(self.config.config.kill_switch.reset_quiet_period);
        let rule = store::PruneRule {
            ended_before_ms: now.saturating_sub(retention.sessions.as_millis() as i64),
            keep_newest: retention.max_sessions as usize,
            never_after_ms: now.saturating_sub(floor.as_millis() as i64),
        };
        match self.db.call(move |store| store.prune_sessions(&rule)).await {
            Ok(pruned) if pruned.sessions > 0 || pruned.actions > 0 => tracing::info!(
                sessions = pruned.sessions,
                checks = pruned.checks,
                actions = pruned.actions,
                "pruned rollbackd.db past retention.sessions = {} / retention.max_sessions = {}",
                crate::config::show(retention.sessions),
                retention.max_sessions
            ),
            Ok(_) => {}
            Err(err) => tracing::warn!("cannot prune old sessions from rollbackd.db: {err}"),
        }
    }
}

/// A worker id read back from `rollbackd.db` (or any other file): the id, or `None`
/// (unknown, with a warning naming `what`) when it breaks the id rule of
/// [`crate::text::check_worker_id`], so a bad stored id is never probed, shown raw or
/// handed to a hook, and never crashes anything.
pub fn stored_worker_id(what: &str, id: Option<String>) -> Option<String> {
    let id = id?;
    match crate::text::check_worker_id(&id) {
        Ok(()) => Some(id),
        Err(problem) => {
            tracing::warn!("rollbackd.db: the recorded {what} is treated as unknown: {problem}");
            None
        }
    }
}

/// A new monitoring session row (also used by `rollbackd promote` without a daemon).
pub fn new_session_row(
    now: SystemTime,
    active: &str,
    previous: &str,
    baseline: Option<Baseline>,
    operator: Option<String>,
) -> SessionRow {
    SessionRow {
        id: crate::core::supervisor::session_id_for(now, active),
        active: active.to_owned(),
        previous: Some(previous.to_owned()),
        promoted_at_ms: now_ms(now),
        state: SessionState::Monitoring,
        paused: false,
        pause_reason: None,
        baseline_json: baseline.and_then(|b| serde_json::to_string(&b).ok()),
        operator,
        ended_at_ms: None,
        end_reason: None,
        stability_json: None,
    }
}
