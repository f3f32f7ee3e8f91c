//! The daemon: one driver task owns the engine and the monitoring session, and selects
//! over a closed set of events — the next check's deadline, a finished check, a finished
//! action, an operator command, a kill-switch change seen by LiveFlags, a reload, the
//! watchdog, shutdown. Checks and actions run in their own tasks and report back, so a
//! slow probe never stops the daemon from answering `status`.

pub mod db;
pub mod executor;
pub mod recorder;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::adapters::{BoxFuture, ResourceSampler, SnapshotSource, WorkerProbe};
use crate::audit::{
    rfc3339_millis, AuditEvent, AuditRecord, Evidence, KillSwitchSource, WorkerManagerRecord,
};
use crate::check::{Baseline, CheckResult, ProbeOutcome};
use crate::config::{ConfigError, LoadedConfig};
use crate::control::{Command, Operator, Reply, Request};
use crate::engine::{Action, Decision, Engine, Verdict};
use crate::flags::FlagsSnapshot;
use crate::hooks::{HookError, HookOutcome, HookVars};
use crate::metrics::Metrics;
use crate::store::{self, ActionRow, CheckRow, NewAction, SessionRow};
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
    ) -> BoxFuture<'a, Result<HookOutcome, HookError>> {
        Box::pin(crate::hooks::run_hook(argv_template, vars, limit))
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
}

struct Session {
    row: SessionRow,
    engine: Engine,
    next_check_index: i64,
    last_decision: Option<Decision>,
    dry_run_recorded: Vec<Action>,
    /// Checks recorded since the session started, rollbackd restarted or was found to
    /// have been stalled: the promotion is confirmed only once they fill the window.
    checks_since_resume: usize,
    /// What `checks_since_resume` counts from, for the journal.
    resumed_by: &'static str,
    /// Checks voided in a row because rollbackd itself was stalled (see [`MAX_VOID_IN_A_ROW`]).
    voided_in_a_row: u32,
    /// The note of the last voided check, carried by the next recorded one.
    void_note: Option<String>,
    /// The grace period is over but the checks do not fill the window yet (logged once).
    waiting_logged: bool,
}

impl Session {
    fn new(
        row: SessionRow,
        engine: Engine,
        next_check_index: i64,
        last_decision: Option<Decision>,
        resumed_by: &'static str,
    ) -> Session {
        Session {
            row,
            engine,
            next_check_index,
            last_decision,
            dry_run_recorded: Vec::new(),
            checks_since_resume: 0,
            resumed_by,
            voided_in_a_row: 0,
            void_note: None,
            waiting_logged: false,
        }
    }

    /// Nothing was checked for a while (a stall of rollbackd itself): the window has to
    /// fill again with checks taken from now on before the promotion may be confirmed.
    fn gap(&mut self, by: &'static str) {
        self.checks_since_resume = 0;
        self.resumed_by = by;
        self.waiting_logged = false;
    }
}

/// How often a check in flight looks at the clock, to notice that rollbackd itself was
/// not running (SIGSTOP, a VM pause, a cgroup freeze, a host too loaded to schedule it).
const STALL_TICK: Duration = Duration::from_millis(100);

/// At most this many checks in a row are voided because rollbackd was stalled; the next
/// one is recorded whatever happened, so a host that stalls the daemon during every check
/// still gets judged rather than never checked.
pub const MAX_VOID_IN_A_ROW: u32 = 3;

/// How late a timer may fire before rollbackd counts itself as having been stalled: a
/// timer for `period` that fires more than max(250 ms, period / 2) after its deadline
/// means the process was not running in between.
pub fn stall_threshold(period: Duration) -> Duration {
    (period / 2).max(Duration::from_millis(250))
}

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

struct RunningAction {
    id: i64,
    kind: &'static str,
    trigger: String,
    replies: Option<mpsc::Sender<Reply>>,
}

struct CheckDone {
    session_id: String,
    check_index: i64,
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
    index: i64,
    verdict: Verdict,
    probe: String,
    error_rate: Option<f64>,
    error_class: &'static str,
}

/// A state change the driver could not write to `rollbackd.db` yet.
#[derive(Debug, Clone)]
enum StateWrite {
    /// A session's state; `ended` is its end time and reason when it ended.
    Session {
        id: String,
        state: String,
        ended: Option<(i64, String)>,
    },
    Workers {
        active: String,
        previous: String,
    },
}

impl StateWrite {
    fn apply(&self, store: &mut crate::store::Store) -> Result<(), crate::store::StoreError> {
        match self {
            StateWrite::Session { id, state, ended } => store.update_session_state(
                id,
                state,
                ended.as_ref().map(|(at, reason)| (*at, reason.as_str())),
            ),
            StateWrite::Workers { active, previous } => {
                store.set_meta("active", active)?;
                store.set_meta("previous", previous)
            }
        }
    }
}

pub struct Driver {
    config: Arc<LoadedConfig>,
    adapters: Adapters,
    factory: AdapterFactory,
    clock: Arc<dyn Clock>,
    db: Db,
    recorder: Recorder,
    session: Option<Session>,
    action: Option<RunningAction>,
    check_in_flight: bool,
    next_check: Option<Instant>,
    recent: VecDeque<CheckSummary>,
    kill_value: Option<Option<String>>,
    /// rollbackd's own kill-switch writes (shared with the actions that make them).
    kill_writes: executor::ExpectedKillWrites,
    checks_tx: mpsc::Sender<CheckDone>,
    actions_tx: mpsc::Sender<(i64, ActionOutcome)>,
    status_line: String,
    started_at: SystemTime,
    /// Writes to `rollbackd.db` that failed (a full disk), retried on the record-retry
    /// tick so the state catches up once there is space again.
    pending_state: Vec<StateWrite>,
    metrics: Option<Metrics>,
    /// [`suspended_since_boot`] at the last tick, to notice a system suspend between checks.
    suspended_seen: Duration,
    /// When the state database was last found deleted or replaced and written back.
    db_restored: Option<Value>,
}

/// The `rollback-started` audit line of an action; `resumed` when it is written by a
/// restart that found the intent but not the line.
fn session_id_for(at: SystemTime, active: &str) -> String {
    format!("{}-{}", crate::audit::artifact_stamp(at), active)
}

impl Driver {
    /// Opens the state, resumes the recorded session and any action in flight, and runs
    /// until `shutdown` (after an action in flight has finished).
    pub async fn run(config: LoadedConfig, mut inputs: DriverInputs) -> anyhow::Result<()> {
        let config = Arc::new(config);
        let db_path = config.config.rollbackd_db();
        let db = tokio::task::spawn_blocking(move || Db::open(&db_path)).await??;
        let recorder = Recorder::new(config.config.analytics_dir(), Some(db.clone())).await;
        recorder.set_alerts(crate::alerts::Alerter::from_config(&config.config.alerts));
        let adapters = (inputs.factory)(&config.config);
        let (checks_tx, mut checks_rx) = mpsc::channel(4);
        let (actions_tx, mut actions_rx) = mpsc::channel(4);
        let clock = inputs.clock.clone();
        let mut driver = Driver {
            config,
            adapters,
            factory: inputs.factory.clone(),
            clock: clock.clone(),
            db,
            recorder,
            session: None,
            action: None,
            check_in_flight: false,
            next_check: None,
            recent: VecDeque::new(),
            kill_value: None,
            kill_writes: Default::default(),
            checks_tx,
            actions_tx,
            status_line: String::new(),
            started_at: clock.now(),
            pending_state: Vec::new(),
            metrics: inputs.metrics.take(),
            suspended_seen: suspended_since_boot(),
            db_restored: None,
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
            if stopping && driver.action.is_none() {
                break;
            }
            let next_check = if stopping || driver.check_in_flight || !driver.checks_may_run() {
                None
            } else {
                driver.next_check
            };
            tokio::select! {
                biased;
                _ = inputs.shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    if let Some(action) = &driver.action {
                        tracing::info!(action = action.id, "shutting down after the {} in flight finishes", action.kind);
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
                Some(command) = inputs.commands.recv() => {
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
                    driver.tick(next_check.expect("guarded")).await;
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

    /// Whether the next check may start. A rollback pauses checking (the active worker is
    /// being switched under it); an escalation does not: it may wait for a locked
    /// application database for as long as it takes, and the checks go on meanwhile as
    /// evidence (they take no action while an action is in flight).
    fn checks_may_run(&self) -> bool {
        self.action
            .as_ref()
            .is_none_or(|action| action.kind == "escalation")
    }

    /// Tells systemd (`STATUS=`) and the metrics what the daemon is doing now; called
    /// after every event that may have changed it.
    fn publish_status(&mut self, on_status: &Option<StatusSink>) {
        if let Some(metrics) = &self.metrics {
            metrics.session(
                self.session.as_ref().map(|s| s.row.state.as_str()),
                self.session
                    .as_ref()
                    .and_then(|s| s.last_decision.as_ref())
                    .map(|d| d.verdict),
            );
            metrics.records_pending(self.recorder.backlog());
        }
        let line = match (&self.session, &self.action) {
            (_, Some(action)) => format!("{} #{} in progress", action.kind, action.id),
            (Some(session), None) => format!(
                "{} {} (previous {}), {}{}",
                session.row.state,
                session.row.active,
                session.row.previous.as_deref().unwrap_or("-"),
                session
                    .last_decision
                    .as_ref()
                    .map(|d| d.verdict.as_str())
                    .unwrap_or("no checks yet"),
                if session.row.paused { ", paused" } else { "" }
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
        let found = self
            .db
            .call(|store| {
                let session = store.current_session()?;
                let checks = match &session {
                    Some(s) => store.recent_checks(&s.id, 1000)?,
                    None => Vec::new(),
                };
                let actions = store.unfinished_actions()?;
                Ok((session, checks, actions))
            })
            .await?;
        let (mut session, checks, actions) = found;
        if let Some(row) = &mut session {
            row.previous = stored_worker_id("previous worker of the session", row.previous.take());
        }
        if let Some(row) = session.take_if(|row| !crate::text::is_valid_worker_id(&row.active)) {
            // Never probe, sample or hand to a hook an id that breaks the rule: end it.
            let problem = crate::text::check_worker_id(&row.active).unwrap_err();
            tracing::error!(
                session = %row.id,
                "rollbackd.db: the recorded session's active worker is not a valid id, so the session is not resumed (run `rollbackd promote` again): {problem}"
            );
            self.write_state(StateWrite::Session {
                id: row.id.clone(),
                state: store::SESSION_STOPPED.to_owned(),
                ended: Some((
                    now_ms(self.now()),
                    "not resumed: the recorded active worker is not a valid id".to_owned(),
                )),
            })
            .await;
        }
        if let Some(row) = session {
            let baseline = row
                .baseline_json
                .as_deref()
                .and_then(|text| serde_json::from_str::<Baseline>(text).ok());
            let mut engine = Engine::new(self.config.config.rules.clone(), baseline);
            let window = self.config.config.rules.window;
            let mut last = None;
            let mut next_index = 0;
            for check in checks.iter().rev().take(window).rev() {
                if let Ok(result) = serde_json::from_str::<CheckResult>(&check.check_json) {
                    let at = Duration::from_millis(
                        (check.taken_at_ms - row.promoted_at_ms).max(0) as u64
                    );
                    last = Some(engine.observe(at, &result));
                }
            }
            if let Some(check) = checks.last() {
                next_index = check.check_index + 1;
            }
            let fresh = row.promoted_at_ms > now_ms(self.now()) - 1000 && checks.is_empty();
            tracing::info!(
                session = %row.id,
                active = %row.active,
                checks = checks.len(),
                state = %row.state,
                "{} monitoring session",
                if fresh { "starting recorded" } else { "resuming" }
            );
            if checks.is_empty() {
                // Recorded by `rollbackd promote` while no daemon ran: this is its start.
                self.recorder
                    .audit(
                        AuditRecord::new(self.now(), AuditEvent::MonitoringStarted, Some(&row.id))
                            .field("active", row.active.clone())
                            .field("previous", row.previous.clone())
                            .field("resumed", false),
                    )
                    .await;
            }
            // Nothing was checked while no daemon ran: the checks from now on have to
            // fill the window before the promotion may be confirmed.
            self.session = Some(Session::new(
                row,
                engine,
                next_index,
                last,
                if fresh { "the start" } else { "the restart" },
            ));
            self.next_check = Some(Instant::now());
        }
        if actions.is_empty() {
            self.settle_finished_action().await;
        }
        for action in actions {
            if self.action.is_some() {
                tracing::error!(
                    action = action.id,
                    "more than one unfinished action recorded; resuming only the first"
                );
                continue;
            }
            tracing::warn!(action = action.id, kind = %action.kind, phase = ?action.phase, "resuming an action interrupted by a restart");
            // A kill between recording the intent and writing its first audit line leaves
            // a rollback nobody was told about: say it started, once.
            if action.kind == store::KIND_ROLLBACK
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

    /// A kill after an action finished but before the driver acted on its outcome leaves
    /// a session still `monitoring` beside a finished rollback or escalation. Resuming
    /// the checks would act a second time (a second rollback of a worker that is no
    /// longer active); instead the outcome is carried out now, as it would have been.
    async fn settle_finished_action(&mut self) {
        let Some(session) = &self.session else {
            return;
        };
        if session.row.state != store::SESSION_MONITORING {
            return;
        }
        let id = session.row.id.clone();
        let actions = match self
            .db
            .call(move |store| store.actions_for_session(&id))
            .await
        {
            Ok(actions) => actions,
            Err(err) => {
                tracing::error!("cannot read the session's actions: {err}");
                return;
            }
        };
        let Some(last) = actions
            .into_iter()
            .rfind(|a| a.kind == store::KIND_ROLLBACK || a.kind == store::KIND_ESCALATION)
        else {
            return;
        };
        tracing::warn!(
            action = last.id,
            kind = %last.kind,
            state = %last.state,
            "the last action finished just before a restart; carrying out its outcome"
        );
        let artifact = self
            .recorder
            .artifact_path(last.artifact_name.as_deref().unwrap_or_default());
        let outcome = match (last.kind.as_str(), last.state.as_str()) {
            (store::KIND_ROLLBACK, store::ACTION_DONE) => ActionOutcome::RolledBack {
                from: last.from_worker.clone().unwrap_or_default(),
                to: last.to_worker.clone().unwrap_or_default(),
                artifact,
            },
            (store::KIND_ROLLBACK, _) => ActionOutcome::RollbackFailed {
                reason: format!("rollback #{} failed before the restart", last.id),
                artifact,
            },
            _ => ActionOutcome::Escalated { artifact },
        };
        // As if the action had just reported back (no operator is waiting for it).
        self.action = Some(RunningAction {
            id: last.id,
            kind: if last.kind == store::KIND_ROLLBACK {
                "rollback"
            } else {
                "escalation"
            },
            trigger: last.trigger.clone(),
            replies: None,
        });
        self.action_finished(last.id, outcome).await;
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
        let kind: &'static str = if row.kind == store::KIND_ESCALATION {
            "escalation"
        } else {
            "rollback"
        };
        self.action = Some(RunningAction {
            id: row.id,
            kind,
            trigger: row.trigger.clone(),
            replies: replies.clone(),
        });
        let ctx = self.context(replies);
        let tx = self.actions_tx.clone();
        let id = row.id;
        tokio::spawn(async move {
            let outcome = if kind == "escalation" {
                executor::escalate(ctx, row).await
            } else {
                executor::rollback(ctx, row).await
            };
            let _ = tx.send((id, outcome)).await;
        });
    }

    /// Records the intent of an action (before any side effect) and starts it.
    #[allow(clippy::too_many_arguments)]
    async fn start_action(
        &mut self,
        kind: &'static str,
        trigger: &str,
        reason: String,
        operator: Option<String>,
        from: Option<String>,
        to: Option<String>,
        detail: ActionDetail,
        replies: Option<mpsc::Sender<Reply>>,
    ) {
        let new = NewAction {
            session_id: self.session.as_ref().map(|s| s.row.id.clone()),
            kind: kind.to_owned(),
            trigger: trigger.to_owned(),
            state: store::ACTION_PENDING.into(),
            phase: None,
            attempt: 1,
            from_worker: from,
            to_worker: to,
            reason,
            operator,
            started_at_ms: now_ms(self.now()),
            detail_json: serde_json::to_string(&detail).ok(),
        };
        let row = executor::record_intent(&self.db, &self.recorder, self.now(), new).await;
        self.spawn_action(row, replies);
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

    /// The next check is due (its timer was set for `due`).
    async fn tick(&mut self, due: Instant) {
        // Read the clock before anything else, so the timer's lateness (the stall measure)
        // is not inflated by our own work.
        let now = self.now();
        self.check_state_db().await;
        let Some(session) = self.session.as_mut() else {
            self.next_check = None;
            return;
        };
        let monitor = &self.config.config.monitor;
        // A timer that fires far later than it was set for means rollbackd was not running
        // (SIGSTOP, VM pause, freeze): nothing was checked meanwhile.
        let suspended = suspended_since_boot();
        let slept = suspended.saturating_sub(self.suspended_seen);
        self.suspended_seen = suspended;
        if slept > stall_threshold(monitor.check_interval) {
            tracing::warn!(
                session = %session.row.id,
                "the machine was suspended for {:.1}s: the checks from now on must fill the window before the promotion is confirmed",
                slept.as_secs_f64()
            );
            session.gap("the suspend");
        }
        let late = Instant::now().saturating_duration_since(due);
        if late > stall_threshold(monitor.check_interval) {
            tracing::warn!(
                session = %session.row.id,
                "rollbackd was stalled for {:.1}s (the next check was due {:.1}s ago): the checks from now on must fill the window before the promotion is confirmed",
                late.as_secs_f64(),
                late.as_secs_f64()
            );
            session.gap("the stall");
        }
        let grace = monitor.grace_period;
        let window = self.config.config.rules.window;
        let promoted = SystemTime::UNIX_EPOCH
            + Duration::from_millis(session.row.promoted_at_ms.max(0) as u64);
        let grace_over = session.row.state == store::SESSION_MONITORING
            && self.action.is_none()
            && now.duration_since(promoted).unwrap_or_default() >= grace;
        if grace_over && session.checks_since_resume < window && !session.waiting_logged {
            session.waiting_logged = true;
            tracing::info!(
                session = %session.row.id,
                "grace period over, but only {} of monitor.window = {window} checks since {}: confirming once a full window of checks took no action",
                session.checks_since_resume,
                session.resumed_by
            );
        }
        if grace_over && session.checks_since_resume >= window {
            self.end_session(
                store::SESSION_CONFIRMED,
                &format!(
                    "grace period of {} ended without an action: promotion confirmed",
                    crate::config::show(grace)
                ),
                None,
            )
            .await;
            return;
        }
        let Some(session) = self.session.as_ref() else {
            return;
        };
        self.check_in_flight = true;
        let adapters = self.adapters.clone();
        let worker = session.row.active.clone();
        let session_id = session.row.id.clone();
        let check_index = session.next_check_index;
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
                    check_index,
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
        self.check_in_flight = false;
        let config = self.config.clone();
        let now = self.now();
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if session.row.id != done.session_id || done.check_index != session.next_check_index {
            return; // a check of a session that ended meanwhile
        }
        if done.stalled > stall_threshold(config.config.monitor.check_timeout) {
            // rollbackd itself was not running during the check: a deadline that passed
            // meanwhile says nothing about the worker. Whatever the check saw, the stall
            // was a time nothing was watched.
            session.gap("the stall");
            let failure = match (&done.result.probe, &done.result.snapshot) {
                (ProbeOutcome::Failed { reason }, _) => Some(format!("probe: {reason}")),
                (_, crate::check::SnapshotOutcome::Unavailable { reason }) => {
                    Some(format!("snapshot: {reason}"))
                }
                _ => None,
            };
            if let Some(failure) = failure {
                if session.voided_in_a_row < MAX_VOID_IN_A_ROW {
                    session.voided_in_a_row += 1;
                    let note = format!(
                        "check void: rollbackd was stalled for {:.1}s during check #{} ({failure}); retried",
                        done.stalled.as_secs_f64(),
                        done.check_index
                    );
                    tracing::warn!(session = %session.row.id, "{note}");
                    session.void_note = Some(note);
                    // Not a failure, not a breach, not missing data: taken again now.
                    self.next_check = Some(Instant::now());
                    return;
                }
                tracing::warn!(
                    session = %session.row.id,
                    "rollbackd was stalled during {MAX_VOID_IN_A_ROW} checks in a row; recording check #{} as it is ({failure})",
                    done.check_index
                );
            }
        } else {
            session.checks_since_resume += 1;
        }
        session.voided_in_a_row = 0;
        session.next_check_index += 1;
        let at = Duration::from_millis(
            (now_ms(done.taken_at) - session.row.promoted_at_ms).max(0) as u64
        );
        let decision = session.engine.observe(at, &done.result);
        if let Some(metrics) = &self.metrics {
            metrics.check_observed(
                decision.verdict,
                decision.error_rate,
                decision.error_class,
                done.probe_duration,
            );
        }
        let failed =
            done.result.probe.is_failed() || decision.error_class != crate::engine::ValueClass::Ok;
        let row = CheckRow {
            session_id: session.row.id.clone(),
            check_index: done.check_index,
            taken_at_ms: now_ms(done.taken_at),
            check_json: serde_json::to_string(&done.result).unwrap_or_default(),
            verdict: decision.verdict.as_str().into(),
            failed,
        };
        let probe_text = match &done.result.probe {
            ProbeOutcome::Ok => "ok".to_owned(),
            ProbeOutcome::Failed { reason } => format!("failed: {reason}"),
        };
        self.recent.push_back(CheckSummary {
            at: done.taken_at,
            index: done.check_index,
            verdict: decision.verdict,
            probe: probe_text,
            error_rate: decision.error_rate,
            error_class: decision.error_class.as_str(),
        });
        while self.recent.len() > 20 {
            self.recent.pop_front();
        }
        if let Err(err) = self.db.call(move |store| store.insert_check(&row)).await {
            tracing::error!("cannot record the check in rollbackd.db: {err}");
        }

        let session = self.session.as_mut().expect("checked above");
        let paused = session.row.paused;
        let escalated = session.row.state == store::SESSION_ESCALATED;
        let mut audit = AuditRecord::new(now, AuditEvent::HealthCheck, Some(&session.row.id))
            .field("checkIndex", done.check_index)
            .field("worker", session.row.active.clone())
            .field("verdict", decision.verdict.as_str())
            .field("action", decision.action.map(|a| a.as_str()))
            .field("errorRate", decision.error_rate)
            .field("errorClass", decision.error_class.as_str())
            .field(
                "probe",
                if done.result.probe.is_failed() {
                    "failed"
                } else {
                    "ok"
                },
            )
            .field("failurePattern", decision.failure_pattern.as_str())
            .field(
                "rules",
                decision
                    .fired
                    .iter()
                    .map(|f| f.rule.as_str())
                    .collect::<Vec<_>>(),
            );
        if let Some(would) = decision.would_act() {
            audit = audit
                .field("wouldAct", would.as_str())
                .field("dryRun", true);
        }
        if paused {
            audit = audit.field("paused", true);
        }
        if let Some(note) = session.void_note.take() {
            audit = audit.field("afterVoid", note);
        }
        if decision.verdict != Verdict::Healthy {
            audit = audit.field("reason", decision.reason());
            // Raw inputs of a check that was not clean, for the 3 a.m. reader.
            audit = audit.field(
                "check",
                serde_json::to_value(&done.result).unwrap_or(Value::Null),
            );
        }
        session.last_decision = Some(decision.clone());
        self.recorder.audit(audit).await;

        // Next check: from the start of this one, so a slow check causes no catch-up burst.
        let interval = if decision.verdict == Verdict::Healthy {
            config.config.monitor.check_interval
        } else {
            config.config.monitor.degraded_check_interval
        };
        self.next_check =
            Some(crate::clock::deadline_tokio(done.started, interval).max(Instant::now()));

        if escalated || self.action.is_some() {
            return;
        }
        if let Some(would) = decision.would_act() {
            self.record_dry_run(&decision, would).await;
        }
        let Some(action) = decision.action else {
            return;
        };
        if paused {
            tracing::warn!(verdict = %decision.verdict, "monitoring is paused: not acting on {}", action.as_str());
            return;
        }
        let detail = self.detail_for(&decision);
        let session = self.session.as_ref().expect("checked above");
        let (active, previous) = (session.row.active.clone(), session.row.previous.clone());
        // A rollback the engine asks for becomes an escalation when it cannot help: no
        // previous worker, or the hour's rollback budget is spent (a loop).
        let (kind, reason) = match action {
            Action::Escalate => (store::KIND_ESCALATION, decision.reason()),
            Action::Rollback if previous.is_none() => (
                store::KIND_ESCALATION,
                format!(
                    "{}; no previous worker is known, so escalating",
                    decision.reason()
                ),
            ),
            Action::Rollback => {
                let hour_ago = now_ms(now) - 3_600_000;
                let recent = self
                    .db
                    .call(move |store| store.rollbacks_since(hour_ago))
                    .await
                    .unwrap_or(0);
                let limit = config.config.rollback.max_rollbacks_per_hour;
                if recent >= limit {
                    (
                        store::KIND_ESCALATION,
                        format!(
                            "{}; but {recent} rollbacks in the last hour reached max_rollbacks_per_hour = {limit}: escalating instead of looping",
                            decision.reason()
                        ),
                    )
                } else {
                    (store::KIND_ROLLBACK, decision.reason())
                }
            }
        };
        self.start_action(
            kind,
            "automatic",
            reason,
            None,
            Some(active),
            previous,
            detail,
            None,
        )
        .await;
    }

    fn detail_for(&self, decision: &Decision) -> ActionDetail {
        let session = self.session.as_ref();
        let recent_checks: Vec<Value> = session
            .map(|s| {
                s.engine
                    .window()
                    .map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
                    .collect()
            })
            .unwrap_or_default();
        let rules = &self.config.config.rules;
        ActionDetail {
            evidence: Evidence {
                recent_checks,
                failure_pattern: decision.failure_pattern.as_str().into(),
                threshold: format!(
                    "errorRate>{}, breaches>={} of {}, probeFailures>={}",
                    rules.error_rate_threshold,
                    rules.rollback_min_breaches,
                    rules.window,
                    rules.consecutive_failures
                ),
                rules_fired: decision
                    .fired
                    .iter()
                    .map(|f| serde_json::to_value(f).unwrap_or(Value::Null))
                    .collect(),
            },
            error_rate: decision.error_rate,
            failure_count: decision.failure_count as u32,
            config_hash: self.config.hash.clone(),
            ..ActionDetail::default()
        }
    }

    async fn record_dry_run(&mut self, decision: &Decision, would: Action) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if session.dry_run_recorded.contains(&would) {
            return;
        }
        session.dry_run_recorded.push(would);
        let now = self.clock.now();
        let detail = self.detail_for(decision);
        let session = self.session.as_ref().expect("present");
        let kind = match would {
            Action::Rollback => crate::audit::ArtifactKind::Rollback,
            Action::Escalate => crate::audit::ArtifactKind::Escalation,
        };
        let record = crate::audit::DecisionRecord {
            timestamp: rfc3339_millis(now),
            decision: kind,
            reason: format!(
                "dry run: would have {}: {}",
                if would == Action::Rollback {
                    "rolled back"
                } else {
                    "escalated"
                },
                decision.reason()
            ),
            status: crate::audit::DecisionStatus::DryRun,
            error_rate: decision.error_rate,
            failure_count: decision.failure_count as u32,
            recommended_action: "none taken (dry run); review the evidence".into(),
            evidence: detail.evidence,
            from: Some(session.row.active.clone()),
            to: session.row.previous.clone(),
            trigger: crate::audit::Trigger::Automatic,
            operator: None,
            phases: crate::audit::Phases::new(),
            rollback_duration_seconds: None,
            config_hash: self.config.hash.clone(),
            session_id: Some(session.row.id.clone()),
            attempts: 0,
            error: None,
        };
        let name = crate::audit::artifact_file_name(kind, now);
        let path = self.recorder.artifact(name, record).await;
        tracing::warn!(artifact = %path.display(), "dry run: would have acted ({})", would.as_str());
    }

    async fn action_finished(&mut self, id: i64, outcome: ActionOutcome) {
        let Some(action) = self.action.take() else {
            return;
        };
        if action.id != id {
            tracing::error!(
                expected = action.id,
                got = id,
                "an unexpected action finished"
            );
        }
        let replies = action.replies;
        if let Some(metrics) = &self.metrics {
            match &outcome {
                ActionOutcome::RolledBack { .. } => {
                    metrics.rollback_finished(&action.trigger, true)
                }
                ActionOutcome::RollbackFailed { .. } => {
                    metrics.rollback_finished(&action.trigger, false)
                }
                ActionOutcome::Escalated { .. } => metrics.escalation_finished(),
            }
        }
        match &outcome {
            ActionOutcome::RolledBack { from, to, artifact } => {
                // The operator's answer first: the rollback is done and recorded; the
                // session's end is bookkeeping.
                if let Some(replies) = replies {
                    let _ = replies
                        .send(Reply::Done { result: json!({"outcome": "rolled-back", "from": from, "to": to, "artifact": artifact}) })
                        .await;
                }
                if let Some(session) = &mut self.session {
                    session.row.active = to.clone();
                    session.row.previous = Some(from.clone());
                }
                self.end_session(
                    store::SESSION_ROLLED_BACK,
                    &format!("rolled back from {from} to {to}"),
                    None,
                )
                .await;
                // The executor wrote this too; again here so that, if the disk was full
                // then, it is retried until it lands.
                self.write_state(StateWrite::Workers {
                    active: to.clone(),
                    previous: from.clone(),
                })
                .await;
            }
            ActionOutcome::RollbackFailed { reason, artifact } => {
                if let Some(replies) = &replies {
                    let _ = replies
                        .send(Reply::Progress {
                            message: format!("rollback failed ({reason}); escalating"),
                            detail: json!({"artifact": artifact}),
                        })
                        .await;
                }
                let (active, previous) = self
                    .session
                    .as_ref()
                    .map(|s| (Some(s.row.active.clone()), s.row.previous.clone()))
                    .unwrap_or((None, None));
                let detail = ActionDetail {
                    config_hash: self.config.hash.clone(),
                    ..ActionDetail::default()
                };
                self.start_action(
                    store::KIND_ESCALATION,
                    "automatic",
                    reason.clone(),
                    None,
                    active,
                    previous,
                    detail,
                    replies,
                )
                .await;
            }
            ActionOutcome::Escalated { artifact } => {
                if let Some(session) = &mut self.session {
                    session.row.state = store::SESSION_ESCALATED.into();
                    let id = session.row.id.clone();
                    self.write_state(StateWrite::Session {
                        id,
                        state: store::SESSION_ESCALATED.into(),
                        ended: None,
                    })
                    .await;
                }
                if let Some(replies) = replies {
                    let _ = replies
                        .send(Reply::Done {
                            result: json!({"outcome": "escalated", "artifact": artifact}),
                        })
                        .await;
                }
            }
        }
    }

    /// Writes a state change, or keeps it for [`Self::retry_state`] when the database
    /// cannot take it now.
    async fn write_state(&mut self, write: StateWrite) {
        if !self.pending_state.is_empty() {
            // Keep the order: earlier writes are still waiting.
            self.pending_state.push(write);
            self.retry_state().await;
            return;
        }
        let attempt = write.clone();
        if let Err(err) = self.db.call(move |store| attempt.apply(store)).await {
            tracing::error!(
                ?write,
                "cannot record a state change in rollbackd.db, will retry: {err}"
            );
            self.pending_state.push(write);
        }
    }

    /// Writes the state changes that failed before, in order, stopping at the first failure.
    async fn retry_state(&mut self) {
        while let Some(write) = self.pending_state.first().cloned() {
            match self.db.call(move |store| write.apply(store)).await {
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

    async fn end_session(&mut self, state: &str, reason: &str, operator: Option<&Operator>) {
        let Some(session) = self.session.take() else {
            return;
        };
        self.next_check = None;
        let now = self.now();
        self.write_state(StateWrite::Session {
            id: session.row.id.clone(),
            state: state.to_owned(),
            ended: Some((now_ms(now), reason.to_owned())),
        })
        .await;
        let mut audit = AuditRecord::new(now, AuditEvent::MonitoringStopped, Some(&session.row.id))
            .field("state", state)
            .field("reason", reason)
            .field("active", session.row.active.clone())
            .field("previous", session.row.previous.clone())
            .field("checks", session.next_check_index);
        if let Some(operator) = operator {
            audit = audit.operator(operator.name.clone());
        }
        self.recorder.audit(audit).await;
        // After a rollback the executor has written the mirror already.
        if state != store::SESSION_ROLLED_BACK {
            self.recorder
                .worker_manager(WorkerManagerRecord {
                    active: session.row.active.clone(),
                    previous: session.row.previous.clone(),
                    updated_at: rfc3339_millis(now),
                    session_id: Some(session.row.id.clone()),
                    state: state.to_owned(),
                })
                .await;
        }
        tracing::info!(session = %session.row.id, state, "monitoring stopped: {reason}");
        self.prune_sessions().await;
    }

    /// Deletes the sessions `[retention]` no longer keeps (at start-up and after each
    /// session ends). A failure is logged and tried again next time: it never stops
    /// monitoring.
    async fn prune_sessions(&mut self) {
        let retention = self.config.config.retention.clone();
        let now = now_ms(self.now());
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
        let session_id = self.session.as_ref().map(|s| s.row.id.clone());
        let shown = value.clone().unwrap_or_else(|| "(no row)".into());
        tracing::warn!(key = %key, value = %shown, "the kill switch was changed outside rollbackd");
        let (kill_record, audit) = crate::killswitch::records(
            now,
            &key,
            &shown,
            before.as_deref(),
            KillSwitchSource::External,
            None,
            reason,
            session_id.as_deref(),
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
                        .set_alerts(crate::alerts::Alerter::from_config(&loaded.config.alerts));
                }
                self.config = Arc::new(loaded);
                if let Some(session) = &mut self.session {
                    // The window is replayed under the new thresholds.
                    let id = session.row.id.clone();
                    let window = self.config.config.rules.window;
                    let checks = self
                        .db
                        .call(move |store| store.recent_checks(&id, window))
                        .await
                        .unwrap_or_default();
                    let mut engine =
                        Engine::new(self.config.config.rules.clone(), session.engine.baseline());
                    for check in &checks {
                        if let Ok(result) = serde_json::from_str::<CheckResult>(&check.check_json) {
                            let at = Duration::from_millis(
                                (check.taken_at_ms - session.row.promoted_at_ms).max(0) as u64,
                            );
                            engine.observe(at, &result);
                        }
                    }
                    session.engine = engine;
                }
                tracing::info!(old = %old_hash, new = %self.config.hash, "configuration reloaded");
                self.recorder
                    .audit(
                        AuditRecord::new(
                            now,
                            AuditEvent::ConfigReloaded,
                            self.session.as_ref().map(|s| s.row.id.as_str()),
                        )
                        .field("ok", true)
                        .field("configHash", self.config.hash.clone())
                        .field("previousConfigHash", old_hash),
                    )
                    .await;
            }
            Ok(Err(err)) => {
                tracing::error!(
                    "new configuration refused, keeping the old one ({}): {err}",
                    self.config.hash
                );
                self.recorder
                    .audit(
                        AuditRecord::new(
                            now,
                            AuditEvent::ConfigReloaded,
                            self.session.as_ref().map(|s| s.row.id.as_str()),
                        )
                        .field("ok", false)
                        .field("error", err.to_string())
                        .field("configHash", self.config.hash.clone()),
                    )
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
                result: self.status_json().await,
            },
            Request::Promote {
                active,
                previous,
                baseline_error_rate,
                baseline_latency_p95_ms,
            } => {
                self.promote(
                    &operator,
                    active,
                    previous,
                    baseline_error_rate,
                    baseline_latency_p95_ms,
                )
                .await
            }
            Request::Rollback { reason, emergency } => {
                match self
                    .manual_rollback(&operator, reason, emergency, replies.clone())
                    .await
                {
                    Some(reply) => reply,
                    None => return, // the action replies when it ends
                }
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
                    crate::killswitch::reset_refusal(&db_path, quiet, now)
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
                    crate::killswitch::KillSwitchState::read(
                        &ks.database,
                        &ks.key,
                        ks.create_database,
                    )
                })
                .await
                .expect("read panicked");
                match state {
                    crate::killswitch::KillSwitchState::Unknown(why) => Reply::Failed {
                        message: format!("the kill switch is UNKNOWN: {why}"),
                        exit: 1,
                    },
                    state => Reply::Done {
                        result: state.to_json(&self.config.config.kill_switch.key),
                    },
                }
            }
            Request::Pause { reason } => self.set_paused(&operator, true, reason).await,
            Request::Resume => self.set_paused(&operator, false, None).await,
        };
        let _ = replies.send(reply).await;
    }

    async fn promote(
        &mut self,
        operator: &Operator,
        active: String,
        previous: String,
        baseline_error_rate: Option<f64>,
        baseline_latency_p95_ms: Option<f64>,
    ) -> Reply {
        if let Some(action) = &self.action {
            return Reply::Failed {
                message: format!("refused: {} #{} is in progress", action.kind, action.id),
                exit: 3,
            };
        }
        // The control socket checks these already; the driver checks again for every other
        // way a promotion arrives (the demo, tests).
        let checked = crate::text::check_worker_id(&active)
            .map_err(|e| format!("active: {e}"))
            .and_then(|()| {
                crate::text::check_worker_id(&previous).map_err(|e| format!("previous: {e}"))
            });
        if let Err(problem) = checked {
            return Reply::Failed {
                message: format!("invalid request: {problem}"),
                exit: 2,
            };
        }
        if active == previous {
            return Reply::Failed {
                message: "refused: --active and --previous must be two different worker ids".into(),
                exit: 3,
            };
        }
        if self.session.is_some() {
            self.end_session(
                store::SESSION_STOPPED,
                &format!("superseded by the promotion of {active}"),
                Some(operator),
            )
            .await;
        }
        let now = self.now();
        let baseline = (baseline_error_rate.is_some() || baseline_latency_p95_ms.is_some())
            .then_some(Baseline {
                error_rate: baseline_error_rate,
                latency_p95_ms: baseline_latency_p95_ms,
            });
        let row = new_session_row(
            now,
            &active,
            &previous,
            baseline,
            Some(operator.name.clone()),
        );
        let insert = row.clone();
        let (a, p) = (active.clone(), previous.clone());
        if let Err(err) = self
            .db
            .call(move |store| {
                store.insert_session(&insert)?;
                store.set_meta("active", &a)?;
                store.set_meta("previous", &p)
            })
            .await
        {
            return Reply::Failed {
                message: format!("cannot record the session: {err}"),
                exit: 1,
            };
        }
        self.start_session(row, operator).await
    }

    async fn start_session(&mut self, row: SessionRow, operator: &Operator) -> Reply {
        let now = self.now();
        let baseline = row
            .baseline_json
            .as_deref()
            .and_then(|t| serde_json::from_str::<Baseline>(t).ok());
        self.recorder
            .audit(
                AuditRecord::new(now, AuditEvent::MonitoringStarted, Some(&row.id))
                    .operator(operator.name.clone())
                    .field("active", row.active.clone())
                    .field("previous", row.previous.clone())
                    .field(
                        "baseline",
                        serde_json::to_value(baseline).unwrap_or(Value::Null),
                    )
                    .field(
                        "gracePeriodSeconds",
                        self.config.config.monitor.grace_period.as_secs_f64(),
                    )
                    .field("configHash", self.config.hash.clone()),
            )
            .await;
        self.recorder
            .worker_manager(WorkerManagerRecord {
                active: row.active.clone(),
                previous: row.previous.clone(),
                updated_at: rfc3339_millis(now),
                session_id: Some(row.id.clone()),
                state: row.state.clone(),
            })
            .await;
        let result = json!({"sessionId": row.id, "active": row.active, "previous": row.previous});
        self.recent.clear();
        self.session = Some(Session::new(
            row,
            Engine::new(self.config.config.rules.clone(), baseline),
            0,
            None,
            "the promotion",
        ));
        // The first check comes one interval after promotion: the canary gets that long
        // to warm up before it is judged.
        self.next_check = Some(crate::clock::deadline_tokio(
            Instant::now(),
            self.config.config.monitor.check_interval,
        ));
        Reply::Done { result }
    }

    async fn manual_rollback(
        &mut self,
        operator: &Operator,
        reason: String,
        emergency: bool,
        replies: mpsc::Sender<Reply>,
    ) -> Option<Reply> {
        if let Some(action) = &self.action {
            return Some(Reply::Failed {
                message: format!(
                    "refused: {} #{} is already in progress",
                    action.kind, action.id
                ),
                exit: 3,
            });
        }
        let (active, previous) = match &self.session {
            Some(session) => (
                Some(session.row.active.clone()),
                session.row.previous.clone(),
            ),
            None => {
                let (active, previous) = self
                    .db
                    .call(|store| Ok((store.get_meta("active")?, store.get_meta("previous")?)))
                    .await
                    .unwrap_or((None, None));
                (
                    stored_worker_id("active worker", active),
                    stored_worker_id("previous worker", previous),
                )
            }
        };
        let (Some(active), Some(previous)) = (active, previous) else {
            return Some(Reply::Failed {
                message:
                    "refused: no active/previous worker is known (run `rollbackd promote` first)"
                        .into(),
                exit: 3,
            });
        };
        let mut detail = match &self.session.as_ref().and_then(|s| s.last_decision.clone()) {
            Some(decision) => self.detail_for(decision),
            None => ActionDetail {
                config_hash: self.config.hash.clone(),
                ..ActionDetail::default()
            },
        };
        detail.emergency = emergency;
        let trigger = if emergency { "emergency" } else { "manual" };
        let _ = replies
            .send(Reply::Progress {
                message: format!("{trigger} rollback {active} → {previous} recorded; starting"),
                detail: json!({}),
            })
            .await;
        self.start_action(
            store::KIND_ROLLBACK,
            trigger,
            reason,
            Some(operator.name.clone()),
            Some(active),
            Some(previous),
            detail,
            Some(replies),
        )
        .await;
        None
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
        let session_id = self.session.as_ref().map(|s| s.row.id.clone());
        let operator_name = operator.name.clone();
        let value = value.to_owned();
        let clock = self.clock.clone();
        // A reset ends an escalated session: a human has decided it is over.
        if value == "0"
            && self
                .session
                .as_ref()
                .is_some_and(|s| s.row.state == store::SESSION_ESCALATED)
        {
            self.end_session(
                store::SESSION_STOPPED,
                "kill switch reset by an operator",
                Some(operator),
            )
            .await;
        }
        tokio::spawn(async move {
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
            let (kill_record, audit) = crate::killswitch::records(
                clock.now(),
                &ks.key,
                &value,
                previous.as_deref(),
                KillSwitchSource::Manual,
                Some(&operator_name),
                &reason,
                session_id.as_deref(),
            );
            ctx.recorder.kill_switch(kill_record).await;
            ctx.recorder.audit(audit).await;
            let _ = replies
                .send(Reply::Done {
                    result: json!({"key": ks.key, "value": value, "previous": previous}),
                })
                .await;
        });
    }

    async fn set_paused(
        &mut self,
        operator: &Operator,
        paused: bool,
        reason: Option<String>,
    ) -> Reply {
        let now = self.now();
        let Some(session) = self.session.as_mut() else {
            return Reply::Failed {
                message: "refused: no monitoring session".into(),
                exit: 3,
            };
        };
        if session.row.paused == paused {
            return Reply::Done {
                result: json!({"paused": paused, "changed": false}),
            };
        }
        session.row.paused = paused;
        session.row.pause_reason = reason.clone();
        let id = session.row.id.clone();
        let reason2 = reason.clone();
        if let Err(err) = self
            .db
            .call(move |store| store.set_paused(&id, paused, reason2.as_deref()))
            .await
        {
            tracing::error!("cannot record pause state: {err}");
        }
        let session = self.session.as_ref().expect("present");
        let event = if paused {
            AuditEvent::MonitoringPaused
        } else {
            AuditEvent::MonitoringResumed
        };
        self.recorder
            .audit(
                AuditRecord::new(now, event, Some(&session.row.id))
                    .operator(operator.name.clone())
                    .field("reason", reason),
            )
            .await;
        Reply::Done {
            result: json!({"paused": paused, "changed": true}),
        }
    }

    async fn status_json(&self) -> Value {
        let now = self.now();
        let config = &self.config.config;
        let ks = config.kill_switch.clone();
        let key = ks.key.clone();
        let kill = tokio::task::spawn_blocking(move || {
            crate::killswitch::KillSwitchState::read(&ks.database, &ks.key, ks.create_database)
        })
        .await
        .unwrap_or_else(|e| {
            crate::killswitch::KillSwitchState::Unknown(format!("reading it failed: {e}"))
        });
        let session = self.session.as_ref().map(|s| {
            let promoted = SystemTime::UNIX_EPOCH + Duration::from_millis(s.row.promoted_at_ms.max(0) as u64);
            let age = now.duration_since(promoted).unwrap_or_default();
            let grace_left = config.monitor.grace_period.saturating_sub(age);
            json!({
                "id": s.row.id,
                "state": s.row.state,
                "active": s.row.active,
                "previous": s.row.previous,
                "promotedAt": rfc3339_millis(promoted),
                "ageSeconds": age.as_secs(),
                "graceLeftSeconds": if s.row.state == store::SESSION_MONITORING { Some(grace_left.as_secs()) } else { None },
                "paused": s.row.paused,
                "pauseReason": s.row.pause_reason,
                "checks": s.next_check_index,
                "verdict": s.last_decision.as_ref().map(|d| d.verdict.as_str()),
                "reason": s.last_decision.as_ref().map(|d| d.reason()),
            })
        });
        let recent: Vec<Value> = self
            .recent
            .iter()
            .map(|c| {
                json!({"at": rfc3339_millis(c.at), "index": c.index, "verdict": c.verdict.as_str(), "probe": c.probe,
                       "errorRate": c.error_rate, "errorClass": c.error_class})
            })
            .collect();
        json!({
            "daemon": "running",
            "pid": std::process::id(),
            "since": rfc3339_millis(self.started_at),
            "state": self.session.as_ref().map(|s| s.row.state.as_str()).unwrap_or("idle"),
            "session": session,
            "action": self.action.as_ref().map(|a| json!({"id": a.id, "kind": a.kind})),
            "killSwitch": kill.to_json(&key),
            "recentChecks": recent,
            "configHash": self.config.hash,
            "recordsPending": self.recorder.backlog(),
            "stateDbRestored": self.db_restored,
        })
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
        id: session_id_for(now, active),
        active: active.to_owned(),
        previous: Some(previous.to_owned()),
        promoted_at_ms: now_ms(now),
        state: store::SESSION_MONITORING.into(),
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
            .unwrap_or_else(|_| crate::check::SnapshotOutcome::Unavailable {
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
