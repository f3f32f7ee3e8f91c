//! The daemon: the effect runner around the [`Supervisor`]. One driver task feeds it every
//! event — the next check's deadline, a finished check, a finished action, an operator
//! command, a reload — and carries out the effects it asks for through the adapters, the
//! store and the recorder; the policy (what a verdict becomes, grace, pause, dry run,
//! loop protection, resume) is the Supervisor's alone. It also watches the kill switch
//! (LiveFlags), the watchdog and shutdown. Checks and actions run in their own tasks and
//! report back, so a slow probe never stops the daemon from answering `status`.

pub mod alerts;
pub mod db;
pub mod executor;
pub mod http;
pub mod metrics;
pub mod notify;
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

use crate::adapters::{BoxFuture, ResourceSampler, SnapshotSource, WorkerProbe};
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
    self, ActionId, ActionRow, ActionState, CheckRow, NewAction, SessionRow, StoreError,
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
    }
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
    recent: VecDeque<CheckSummary>,
    kill_value: Option<Option<String>>,
    /// rollbackd's own kill-switch writes (shared with the actions that make them).
    kill_writes: executor::ExpectedKillWrites,
    checks_tx: mpsc::Sender<CheckDone>,
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
            recent: VecDeque::new(),
            kill_value: None,
            kill_writes: Default::default(),
            checks_tx,
            actions_tx,
            status_line: String::new(),
            started_at: clock.now(),
            pending_state: Vec::new(),
            metrics: inputs.metrics.take(),
            db_restored: None,
            side_tasks: Vec::new(),
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
                    driver.publish_status(&inputs.on_status);
                }
                Some(done) = checks_rx.recv() => {
                    driver.check_finished(done).await;
                    driver.publish_status(&inputs.on_status);
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
                    driver.publish_status(&inputs.on_status);
                }
            }
        }
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
                Effect::RecordCheck(check) => self.record_check(check).await,
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
                Effect::Audit(record) => self.recorder.audit(record).await,
                Effect::WorkerManager(record) => self.recorder.worker_manager(record).await,
                Effect::Artifact { name, record } => {
                    let path = self.recorder.artifact(name, *record).await;
                    tracing::warn!(artifact = %path.display(), "dry run artifact written");
                }
                Effect::StartAction { plan, reply } => self.start_action(*plan, reply).await,
                Effect::PruneSessions => self.prune_sessions().await,
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
            in_flight: resume.as_ref().map(|row| (row.id, row.kind, row.trigger)),
            settled,
            rollbacks: rollbacks.into_iter().map(time::from_ms).collect(),
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

    /// The next check is due.
    async fn tick(&mut self) {
        // Read the clocks before anything else, so the timer's lateness (the stall
        // measure) is not inflated by our own work.
        let now = self.time();
        self.check_state_db().await;
        self.sup.handle(
            now,
            Input::Timeout {
                suspended: suspended_since_boot(),
            },
        );
        self.run_effects().await;
    }

    fn start_check(&mut self, session_id: String, index: u64, worker: String) {
        let adapters = self.adapters.clone();
        let tx = self.checks_tx.clone();
        let clock = self.clock.clone();
        let limit = self.config.config.monitor.check_timeout;
        tokio::spawn(async move {
            let started = Instant::now();
            let taken_at = clock.now();
            let ((result, probe_duration), stalled) =
                watch_stalls(take_check(&adapters, &worker, limit)).await;
            let _ = tx
                .send(CheckDone {
                    session_id,
                    index,
                    started,
                    taken_at,
                    result,
                    probe_duration,
                    stalled,
                })
                .await;
        });
    }

    async fn check_finished(&mut self, done: CheckDone) {
        self.probe_duration = done.probe_duration;
        self.feed(Input::CheckDone {
            session_id: done.session_id,
            index: done.index,
            started: done.started.into_std(),
            taken_at: done.taken_at,
            result: done.result,
            stalled: done.stalled,
        })
        .await;
    }

    async fn record_check(&mut self, check: CheckRecord) {
        let probe = match &check.result.probe {
            ProbeOutcome::Ok => "ok".to_owned(),
            ProbeOutcome::Failed { reason } => format!("failed: {reason}"),
        };
        let decision = self.sup.session().and_then(|s| s.last_decision.clone());
        self.recent.push_back(CheckSummary {
            at: check.taken_at,
            index: check.index,
            verdict: check.verdict,
            probe,
            error_rate: decision.as_ref().and_then(|d| d.error_rate),
            error_class: decision
                .as_ref()
                .map(|d| d.error_class.as_str())
                .unwrap_or("missing"),
        });
        while self.recent.len() > 20 {
            self.recent.pop_front();
        }
        let row = CheckRow {
            session_id: check.session_id,
            check_index: check.index as i64,
            taken_at_ms: time::to_ms(check.taken_at),
            check_json: serde_json::to_string(&check.result).unwrap_or_default(),
            verdict: check.verdict.as_str().into(),
            failed: check.failed,
        };
        if let Err(err) = self.db.call(move |store| store.insert_check(&row)).await {
            tracing::error!("cannot record the check in rollbackd.db: {err}");
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

    /// The kill switch as the daemon finds it at start; a value different from the last
    /// one it saw was changed while nobody watched, and is audited as external.
    async fn kill_switch_at_start(&mut self, snapshot: &FlagsSnapshot) {
        let value = snapshot
            .rows
            .get(&self.config.config.kill_switch.key)
            .cloned();
        self.kill_value = Some(value.clone());
        self.kill_switch_metric(snapshot);
        let last_seen = self
            .db
            .call(|store| store.get_meta(KILL_SWITCH_SEEN))
            .await
            .ok()
            .flatten()
            .and_then(|text| serde_json::from_str::<Option<String>>(&text).ok());
        match last_seen {
            Some(before) if before != value && snapshot.error.is_none() => {
                self.audit_external_kill_switch(
                    before,
                    value.clone(),
                    "changed while rollbackd was not running",
                )
                .await;
            }
            _ => {}
        }
        self.remember_kill_switch(value).await;
    }

    async fn remember_kill_switch(&self, value: Option<String>) {
        let text = serde_json::to_string(&value).unwrap_or_default();
        if let Err(err) = self
            .db
            .call(move |store| store.set_meta(KILL_SWITCH_SEEN, &text))
            .await
        {
            tracing::warn!("cannot remember the kill switch value: {err}");
        }
    }

    /// `rollbackd_kill_switch`: 1 on, 0 off, -1 when the database cannot be read (a
    /// database not there yet that rollbackd may create is "off").
    fn kill_switch_metric(&self, snapshot: &FlagsSnapshot) {
        let Some(metrics) = &self.metrics else { return };
        let ks = &self.config.config.kill_switch;
        let on = match &snapshot.error {
            None => Some(snapshot.killed(&ks.key)),
            Some(_) if ks.create_database && !ks.database.exists() => Some(false),
            Some(_) => None,
        };
        metrics.kill_switch(on);
    }

    async fn flags_changed(&mut self, snapshot: &FlagsSnapshot) {
        self.kill_switch_metric(snapshot);
        if snapshot.error.is_some() {
            return; // unreadable for now: rows are the last good read, nothing changed
        }
        let key = self.config.config.kill_switch.key.clone();
        let value = snapshot.rows.get(&key).cloned();
        let before = self.kill_value.replace(value.clone());
        let Some(before) = before else { return };
        if before == value {
            return;
        }
        self.remember_kill_switch(value.clone()).await;
        if value
            .as_deref()
            .is_some_and(|v| self.kill_writes.consume(v))
        {
            return;
        }
        self.audit_external_kill_switch(
            before,
            value,
            "changed outside rollbackd (e.g. by hand in the sqlite3 shell)",
        )
        .await;
    }

    async fn audit_external_kill_switch(
        &mut self,
        before: Option<String>,
        value: Option<String>,
        reason: &str,
    ) {
        let key = self.config.config.kill_switch.key.clone();
        let now = self.now();
        let session_id = self.sup.session().map(|s| s.record.id.clone());
        let shown = value.clone().unwrap_or_else(|| "(no row)".into());
        tracing::warn!(key = %key, value = %shown, "the kill switch was changed outside rollbackd");
        let (kill_record, audit) = crate::appdb::killswitch::records(
            now,
            &key,
            &shown,
            before.as_deref(),
            KillSwitchSource::External,
            None,
            reason,
            session_id.as_deref(),
            None,
        );
        self.recorder.kill_switch(kill_record).await;
        self.recorder.audit(audit).await;
    }

    async fn reload(&mut self, reloader: &Reloader) {
        // logrotate's `postrotate` sends SIGHUP: reopen the logs by name whatever the
        // reload's outcome (each append checks the name too).
        self.recorder.reopen_logs();
        let reloader = reloader.clone();
        let result = tokio::task::spawn_blocking(move || reloader()).await;
        let now = self.now();
        // Keys a running daemon cannot take over (opened once at start): refused whole, so
        // a reload never half-applies.
        let result = result.map(|loaded| {
            loaded.and_then(|loaded| match fixed_keys_changed(&self.config.config, &loaded.config) {
                changed if changed.is_empty() => Ok(loaded),
                changed => Err(crate::config::ConfigError::Invalid(
                    changed
                        .into_iter()
                        .map(|key| crate::config::ConfigIssue {
                            key: key.to_owned(),
                            message: "cannot be changed by a reload (the daemon opened it at start); \
                                      restart rollbackd to apply it, or put the old value back"
                                .into(),
                        })
                        .collect(),
                )),
            })
        });
        match result {
            Ok(Ok(loaded)) => {
                let old_hash = self.config.hash.clone();
                self.adapters = (self.factory)(&loaded.config);
                if loaded.config.alerts != self.config.config.alerts {
                    // Alerts queued for the old webhook are still sent by its task.
                    self.recorder
                        .set_alerts(crate::daemon::alerts::Alerter::from_config(
                            &loaded.config.alerts,
                        ));
                }
                self.config = Arc::new(loaded);
                // The window is judged again under the new thresholds.
                let settings = self.config.config.supervisor_settings(&self.config.hash);
                self.feed(Input::Reload(Box::new(settings))).await;
                tracing::info!(old = %old_hash, new = %self.config.hash, "configuration reloaded");
                self.recorder
                    .audit(AuditRecord::of(
                        now,
                        self.sup.session().map(|s| s.record.id.as_str()),
                        &events::ConfigReloaded {
                            ok: true,
                            error: None,
                            config_hash: self.config.hash.clone(),
                            previous_config_hash: Some(old_hash.to_string()),
                        },
                    ))
                    .await;
            }
            Ok(Err(err)) => {
                tracing::error!(
                    "new configuration refused, keeping the old one ({}): {err}",
                    self.config.hash
                );
                self.recorder
                    .audit(AuditRecord::of(
                        now,
                        self.sup.session().map(|s| s.record.id.as_str()),
                        &events::ConfigReloaded {
                            ok: false,
                            error: Some(err.to_string()),
                            config_hash: self.config.hash.clone(),
                            previous_config_hash: None,
                        },
                    ))
                    .await;
            }
            Err(err) => tracing::error!("configuration reload panicked: {err}"),
        }
    }

    async fn command(&mut self, command: Command) {
        let Command {
            operator,
            request,
            replies,
        } = command;
        let reply = match request {
            Request::Status => Reply::Done {
                result: serde_json::to_value(self.status_report().await).unwrap_or_default(),
            },
            Request::Promote {
                active,
                previous,
                baseline_error_rate,
                baseline_latency_p95_ms,
            } => {
                let baseline = (baseline_error_rate.is_some() || baseline_latency_p95_ms.is_some())
                    .then_some(Baseline {
                        error_rate: baseline_error_rate,
                        latency_p95_ms: baseline_latency_p95_ms,
                    });
                let reply = self.expect_reply(replies);
                self.feed(Input::Promote {
                    operator: operator.name,
                    active,
                    previous,
                    baseline,
                    reply,
                })
                .await;
                return;
            }
            Request::Rollback { reason, emergency } => {
                let known_workers = if self.sup.session().is_none() {
                    self.db
                        .call(|store| Ok((store.get_meta("active")?, store.get_meta("previous")?)))
                        .await
                        .map(|(active, previous)| {
                            (
                                stored_worker_id("active worker", active),
                                stored_worker_id("previous worker", previous),
                            )
                        })
                        .unwrap_or((None, None))
                } else {
                    (None, None)
                };
                let reply = self.expect_reply(replies);
                self.feed(Input::Rollback {
                    operator: operator.name,
                    reason,
                    emergency,
                    known_workers,
                    reply,
                })
                .await;
                return;
            }
            Request::KillSwitchSet { reason } => {
                self.manual_kill_switch(&operator, "1", reason, replies)
                    .await;
                return;
            }
            Request::KillSwitchReset { reason, force } => {
                let quiet = self.config.config.kill_switch.reset_quiet_period;
                let db_path = self.config.config.rollbackd_db();
                let now = self.now();
                let refusal = tokio::task::spawn_blocking(move || {
                    crate::appdb::killswitch::reset_refusal(&db_path, quiet, now)
                })
                .await
                .expect("reset check panicked");
                match refusal {
                    Ok(Some(why)) if !force => Reply::Failed {
                        message: format!("refused: {why}"),
                        exit: 3,
                    },
                    Err(err) => Reply::Failed {
                        message: format!("cannot check the reset precondition: {err}"),
                        exit: 1,
                    },
                    _ => {
                        if force {
                            tracing::warn!(operator = %operator.name, "kill switch reset forced past the quiet period");
                        }
                        self.manual_kill_switch(&operator, "0", reason, replies)
                            .await;
                        return;
                    }
                }
            }
            Request::KillSwitchStatus => {
                let ks = self.config.config.kill_switch.clone();
                let state = tokio::task::spawn_blocking(move || {
                    crate::appdb::killswitch::KillSwitchState::read(
                        &ks.database,
                        &ks.key,
                        ks.create_database,
                    )
                })
                .await
                .expect("read panicked");
                match state {
                    crate::appdb::killswitch::KillSwitchState::Unknown(why) => Reply::Failed {
                        message: format!("the kill switch is UNKNOWN: {why}"),
                        exit: 1,
                    },
                    state => Reply::Done {
                        result: state.to_json(&self.config.config.kill_switch.key),
                    },
                }
            }
            Request::Pause { reason } => {
                let reply = self.expect_reply(replies);
                self.feed(Input::Pause {
                    operator: operator.name,
                    paused: true,
                    reason,
                    reply,
                })
                .await;
                return;
            }
            Request::Resume => {
                let reply = self.expect_reply(replies);
                self.feed(Input::Pause {
                    operator: operator.name,
                    paused: false,
                    reason: None,
                    reply,
                })
                .await;
                return;
            }
        };
        let _ = replies.send(reply).await;
    }

    async fn manual_kill_switch(
        &mut self,
        operator: &Operator,
        value: &str,
        reason: String,
        replies: mpsc::Sender<Reply>,
    ) {
        let ctx = self.context(Some(replies.clone()));
        let config = self.config.clone();
        let session_id = self.sup.session().map(|s| s.record.id.clone());
        let operator_name = operator.name.clone();
        let value = value.to_owned();
        let clock = self.clock.clone();
        // A reset ends an escalated session: a human has decided it is over.
        if value == "0" {
            self.feed(Input::KillSwitchReset {
                operator: operator.name.clone(),
            })
            .await;
        }
        self.side_tasks.retain(|task| !task.is_finished());
        self.side_tasks.push(tokio::spawn(async move {
            let ks = &config.config.kill_switch;
            let previous = match executor::set_kill_switch(
                &ctx,
                ks,
                &value,
                executor::Patience::FailOnMissing,
            )
            .await
            {
                Ok(previous) => previous,
                Err(err) => {
                    let _ = replies
                        .send(Reply::Failed {
                            message: format!("the kill switch was not written: {err}"),
                            exit: 1,
                        })
                        .await;
                    return;
                }
            };
            let (kill_record, audit) = crate::appdb::killswitch::records(
                clock.now(),
                &ks.key,
                &value,
                previous.as_deref(),
                KillSwitchSource::Manual,
                Some(&operator_name),
                &reason,
                session_id.as_deref(),
                None,
            );
            ctx.recorder.kill_switch(kill_record).await;
            ctx.recorder.audit(audit).await;
            let _ = replies
                .send(Reply::Done {
                    result: json!({"key": ks.key, "value": value, "previous": previous}),
                })
                .await;
        }));
    }

    async fn status_report(&self) -> StatusReport {
        let now = self.now();
        let config = &self.config.config;
        let ks = config.kill_switch.clone();
        let key = ks.key.clone();
        let kill = tokio::task::spawn_blocking(move || {
            crate::appdb::killswitch::KillSwitchState::read(
                &ks.database,
                &ks.key,
                ks.create_database,
            )
        })
        .await
        .unwrap_or_else(|e| {
            crate::appdb::killswitch::KillSwitchState::Unknown(format!("reading it failed: {e}"))
        });
        let session = self.sup.session().map(|s| {
            let promoted = s.record.promoted_at;
            let age = now.duration_since(promoted).unwrap_or_default();
            let grace_left = config.monitor.grace_period.saturating_sub(age);
            let monitoring = s.record.state == SessionState::Monitoring;
            SessionStatus {
                id: s.record.id.clone(),
                state: s.record.state.as_str().to_owned(),
                active: Some(s.record.active.clone()),
                previous: s.record.previous.clone(),
                promoted_at: rfc3339_millis(promoted),
                age_seconds: age.as_secs(),
                grace_left_seconds: monitoring.then_some(grace_left.as_secs()),
                paused: s.record.paused,
                pause_reason: s.record.pause_reason.clone(),
                checks: Some(s.next_index),
                verdict: s
                    .last_decision
                    .as_ref()
                    .map(|d| d.verdict.as_str().to_owned()),
                reason: s.last_decision.as_ref().map(|d| d.reason()),
            }
        });
        // The workers, also between sessions: the current session's, else the last ended
        // one's, else what rollbackd.db remembers (the same key the offline status has).
        let workers = match (self.sup.session(), self.sup.last_workers()) {
            (Some(s), _) => Workers {
                active: Some(s.record.active.clone()),
                previous: s.record.previous.clone(),
                last_session_state: None,
            },
            (None, Some((active, previous, state))) => Workers {
                active: Some(active.clone()),
                previous: previous.clone(),
                last_session_state: Some(state.as_str().to_owned()),
            },
            (None, None) => {
                let (active, previous) = self
                    .db
                    .call(|store| Ok((store.get_meta("active")?, store.get_meta("previous")?)))
                    .await
                    .unwrap_or((None, None));
                Workers {
                    active: stored_worker_id("active worker", active),
                    previous: stored_worker_id("previous worker", previous),
                    last_session_state: None,
                }
            }
        };
        let recent_checks = self
            .recent
            .iter()
            .map(|c| CheckLine {
                at: rfc3339_millis(c.at),
                index: c.index,
                verdict: c.verdict.as_str().to_owned(),
                probe: c.probe.clone(),
                error_rate: c.error_rate,
                error_class: Some(c.error_class.to_owned()),
            })
            .collect();
        StatusReport {
            daemon: "running".into(),
            pid: Some(std::process::id()),
            since: Some(rfc3339_millis(self.started_at)),
            state: self
                .sup
                .session()
                .map(|s| s.record.state.as_str())
                .unwrap_or("idle")
                .to_owned(),
            session,
            workers,
            action: self.sup.action().map(|a| ActionStatus {
                id: a.id,
                kind: a.kind.as_str().to_owned(),
            }),
            kill_switch: kill.to_json(&key),
            recent_checks,
            config_hash: self.config.hash.clone(),
            records_pending: Some(self.recorder.backlog()),
            state_db_restored: self.db_restored.clone(),
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
    }
}

/// The keys whose new value a reload cannot apply and that differ between `old` and `new`:
/// the state directory (database, lock, socket, audit log), the HTTP listener and the
/// kill-switch database LiveFlags watches are all opened once at start.
pub fn fixed_keys_changed(
    old: &crate::config::Config,
    new: &crate::config::Config,
) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.state_dir != new.state_dir {
        changed.push("state_dir");
    }
    if old.http_listen != new.http_listen {
        changed.push("http.listen");
    }
    if old.kill_switch.database != new.kill_switch.database {
        changed.push("kill_switch.database");
    }
    changed
}

/// One check: probe, snapshot and resources at once, each bounded by `limit` in its
/// adapter; a safety net here cuts an adapter that ignores its limit. Also returns how
/// long the worker probe took (for the probe-duration metric).
pub async fn take_check(
    adapters: &Adapters,
    worker: &str,
    limit: Duration,
) -> (CheckResult, Duration) {
    let net = limit
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(1));
    let probe = async {
        let started = Instant::now();
        let outcome = tokio::time::timeout(net, adapters.probe.probe(worker))
            .await
            .unwrap_or_else(|_| {
                ProbeOutcome::failed(format!(
                    "probe did not finish within {}",
                    crate::config::show(net)
                ))
            });
        (outcome, started.elapsed())
    };
    let snapshot = async {
        tokio::time::timeout(net, adapters.snapshot.snapshot())
            .await
            .unwrap_or_else(|_| crate::core::check::SnapshotOutcome::Unavailable {
                reason: format!(
                    "snapshot did not finish within {}",
                    crate::config::show(net)
                ),
            })
    };
    let resources = async {
        tokio::time::timeout(net, adapters.resources.sample(worker))
            .await
            .ok()
            .flatten()
    };
    let ((probe, probe_duration), snapshot, resources) = tokio::join!(probe, snapshot, resources);
    let result = CheckResult {
        probe,
        snapshot,
        resources,
    };
    (result, probe_duration)
}
