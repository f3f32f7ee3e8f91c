//! The Supervisor: the whole monitoring policy as one state machine, without I/O.
//!
//! Shaped like quinn-proto's `Connection`: the runner (the daemon, `simulate`, a test)
//! feeds every event through [`Supervisor::handle`], asks [`Supervisor::poll_timeout`] for
//! the next deadline (and feeds [`Input::Timeout`] when it passes), and carries out what
//! [`Supervisor::poll_effect`] hands it, in order. The Supervisor owns the engine, the
//! session, its window of checks, the action policy (rollback, or escalation when there is
//! no previous worker or the hour's rollback budget is spent), pause, dry run, the grace
//! period and its confirmation, stalls of rollbackd itself, and what a restart resumes.
//!
//! It never reads a clock (time is in every input), never touches a file, a socket or a
//! database, and never fails: a bad sample is input. `tests/core_purity.rs` keeps it so.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use crate::core::baseline::{self, BaselineSettings, History, Observed};
use crate::core::check::{Baseline, CheckResult, Observation, ProbeOutcome, SnapshotOutcome};
use crate::core::engine::{
    Action, Decision, Engine, EngineConfig, NoDataPolicy, Rule, ValueClass, Verdict,
};
use crate::core::time::{self, Now};
use crate::storage::audit::{AuditRecord, DecisionRecord, Evidence, WorkerManagerRecord};
use crate::storage::events;
pub use crate::storage::states::{ActionKind, ActionTrigger, SessionState};

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

/// The configuration the policy reads (the rest is the adapters' and the runner's).
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub rules: EngineConfig,
    pub check_interval: Duration,
    pub degraded_check_interval: Duration,
    pub check_timeout: Duration,
    pub grace_period: Duration,
    pub max_rollbacks_per_hour: u32,
    /// `rollback.stability_period`: how long a verified rollback's restored version is
    /// watched (zero: not at all).
    pub stability_period: Duration,
    /// `[baseline]`: the automatic baseline.
    pub baseline: BaselineSettings,
    /// Summarised in evidence: `errorRate>…, breaches>=… of …, probeFailures>=…`.
    pub config_hash: String,
}

impl Settings {
    fn threshold_summary(&self) -> String {
        let rules = &self.rules;
        format!(
            "errorRate>{}, breaches>={} of {}, probeFailures>={}",
            rules.error_rate_threshold,
            rules.rollback_min_breaches,
            rules.window,
            rules.consecutive_failures
        )
    }
}

impl ActionKind {
    /// The engine's name for what this kind carries out.
    pub fn engine_action(self) -> Action {
        match self {
            ActionKind::Rollback => Action::Rollback,
            ActionKind::Escalation => Action::Escalate,
        }
    }
}

/// An action's id in `rollbackd.db` (the same type as `storage::store::ActionId`).
pub type ActionId = i64;

/// Names the operator waiting for a reply; the runner maps it to its channel.
pub type ReplyTo = u64;

/// An answer to an operator command.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Progress {
        message: String,
        detail: Value,
    },
    Done(Value),
    /// `exit`: the CLI exit status (1 failure, 2 bad request, 3 refused).
    Failed {
        message: String,
        exit: u8,
    },
}

fn refused(message: impl Into<String>) -> Answer {
    Answer::Failed {
        message: message.into(),
        exit: 3,
    }
}

/// A session as `rollbackd.db` holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub id: String,
    pub active: String,
    pub previous: Option<String>,
    pub promoted_at: SystemTime,
    pub state: SessionState,
    pub paused: bool,
    pub pause_reason: Option<String>,
    pub baseline: Option<Baseline>,
    pub operator: Option<String>,
    /// The watch of the restored version, once a rollback of this session was verified.
    pub stability: Option<Stability>,
}

/// The stability watch of a session's restored version (`sessions.stability_json`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Stability {
    /// When the rollback was verified and the watch began (Unix milliseconds).
    pub started_at_ms: i64,
    pub period_seconds: f64,
    /// The version rolled back to, the one watched.
    pub restored: String,
    /// The version rolled back from.
    pub from: String,
    /// The rollback that started the watch (its outcome is not carried out again after a
    /// restart).
    #[serde(default)]
    pub rollback_action: Option<ActionId>,
    /// The session's first check of the watch: the checks before it judged the canary.
    pub first_check: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<StabilityResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Stability {
    fn started_at(&self) -> SystemTime {
        time::from_ms(self.started_at_ms)
    }

    fn period(&self) -> Duration {
        Duration::try_from_secs_f64(self.period_seconds).unwrap_or_default()
    }
}

/// How a stability watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StabilityResult {
    /// The period passed (with a full window of checks) without a breach.
    Confirmed,
    /// The restored version breached: escalated.
    Failed,
    /// The session ended otherwise first (a promotion, an operator).
    Interrupted,
}

impl StabilityResult {
    pub fn as_str(self) -> &'static str {
        match self {
            StabilityResult::Confirmed => "confirmed",
            StabilityResult::Failed => "failed",
            StabilityResult::Interrupted => "interrupted",
        }
    }
}

/// A check as `rollbackd.db` holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckRecord {
    pub session_id: String,
    pub index: u64,
    pub taken_at: SystemTime,
    pub result: CheckResult,
    pub verdict: Verdict,
    /// The probe failed or the error rate was unusable (what `reset_quiet_period` counts).
    pub failed: bool,
}

/// An action to record (intent first) and carry out.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionPlan {
    pub kind: ActionKind,
    pub trigger: ActionTrigger,
    pub reason: String,
    pub operator: Option<String>,
    pub session_id: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub emergency: bool,
    pub evidence: Evidence,
    pub error_rate: Option<f64>,
    pub failure_count: u32,
    pub config_hash: String,
    pub started_at: SystemTime,
}

/// How an action ended, as the executor reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum ActionResult {
    RolledBack {
        from: String,
        to: String,
        artifact: String,
    },
    /// Every attempt failed: escalate next.
    RollbackFailed {
        reason: String,
        artifact: String,
    },
    Escalated {
        artifact: String,
    },
}

/// A state change for `rollbackd.db` (the runner retries it until it lands).
#[derive(Debug, Clone, PartialEq)]
pub enum StateChange {
    Session {
        id: String,
        state: SessionState,
        /// End time and reason, when it ended.
        ended: Option<(SystemTime, String)>,
    },
    Workers {
        active: String,
        previous: String,
    },
    Paused {
        id: String,
        paused: bool,
        reason: Option<String>,
    },
    /// An observation of the active version between sessions (for the next baseline);
    /// those older than `keep` before it may go.
    Observation {
        observed: Observed,
        keep: Duration,
    },
    /// The stats of `worker`'s session that was just confirmed healthy.
    HealthyBaseline {
        worker: String,
        baseline: Baseline,
    },
    /// The session's stability watch began or ended.
    Stability {
        id: String,
        stability: Stability,
    },
}

/// What the Supervisor asks its runner to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Between sessions: take a snapshot (no probe) of the active `worker`; report it as
    /// [`Input::IdleObserved`].
    ObserveIdle {
        worker: String,
    },
    /// Take a check of `worker` now; report it as [`Input::CheckDone`] with this index.
    StartCheck {
        session_id: String,
        index: u64,
        worker: String,
    },
    /// Record a check (before its audit line).
    RecordCheck(CheckRecord),
    /// A check was judged (for the metrics).
    Observed {
        verdict: Verdict,
        error_rate: Option<f64>,
        error_class: ValueClass,
    },
    /// Record a new session; answer with [`Input::SessionRecorded`].
    RecordSession(Box<SessionRecord>),
    /// A change of recorded state, retried until it lands.
    Persist(StateChange),
    Audit(AuditRecord),
    WorkerManager(WorkerManagerRecord),
    /// A decision artifact that no action writes (a dry run's).
    Artifact {
        name: String,
        record: Box<DecisionRecord>,
    },
    /// Record the intent, then carry the action out; answer with [`Input::ActionStarted`]
    /// once its id is known and [`Input::ActionDone`] when it ends. `reply` is told the
    /// progress and the end.
    StartAction {
        plan: Box<ActionPlan>,
        reply: Option<ReplyTo>,
    },
    /// Sessions past `[retention]` may go now (a session ended).
    PruneSessions,
    /// Write (again) the session's incident report, from what `rollbackd.db` holds now:
    /// its stability watch ended. (An action's end writes it itself, before its alert.)
    IncidentReport {
        session_id: String,
    },
    Reply {
        to: ReplyTo,
        answer: Answer,
    },
}

/// Everything that happens to the Supervisor.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// What `rollbackd.db` held at start-up.
    Restore(Box<Restored>),
    /// A replay's check is due now, whatever the timer says (`simulate`: the trace's
    /// times are the schedule). A timer's lateness is not measured.
    CheckScheduled,
    /// [`Supervisor::poll_timeout`] passed. `suspended`: how long the machine has been
    /// suspended since boot (CLOCK_BOOTTIME − CLOCK_MONOTONIC), to notice a suspend.
    Timeout {
        suspended: Duration,
    },
    CheckDone {
        session_id: String,
        index: u64,
        /// When the check started (its next one is due an interval after this).
        started: Instant,
        taken_at: SystemTime,
        result: CheckResult,
        /// How long rollbackd itself was not running during the check.
        stalled: Duration,
    },
    SessionRecorded {
        id: String,
        error: Option<String>,
    },
    /// `id`: `None` when its intent could not be recorded (it is carried out all the same).
    ActionStarted {
        id: Option<ActionId>,
    },
    ActionDone {
        id: Option<ActionId>,
        result: ActionResult,
    },
    Promote {
        operator: String,
        active: String,
        previous: String,
        /// The operator's `--baseline-*`, if any.
        baseline: Option<Baseline>,
        /// What the Prometheus source said of the previous version over the baseline
        /// window ending now, when one is configured (the runner queried it).
        prometheus: Option<Baseline>,
        reply: ReplyTo,
    },
    /// The snapshot [`Effect::ObserveIdle`] asked for.
    IdleObserved {
        worker: String,
        snapshot: SnapshotOutcome,
    },
    Rollback {
        operator: String,
        reason: String,
        emergency: bool,
        /// `rollback --force`: go back even to a version rolled back.
        force: bool,
        /// Versions rolled back and not confirmed since (from rollbackd.db).
        rolled_back: Vec<String>,
        /// The workers `rollbackd.db` names when no session is running.
        known_workers: (Option<String>, Option<String>),
        reply: ReplyTo,
    },
    Pause {
        operator: String,
        paused: bool,
        reason: Option<String>,
        reply: ReplyTo,
    },
    /// An operator reset the kill switch: an escalated session is over.
    KillSwitchReset {
        operator: String,
    },
    /// Another host of the fleet recorded that it rolled `version` back
    /// (`fleet.follow_verdicts`). The runner feeds only verdicts of other hosts that are
    /// news to this session: written (by etcd's revision, never the writer's clock) after
    /// this host promoted the version, or after its stability watch began.
    FleetVerdict {
        version: String,
        host: String,
        reason: String,
    },
    /// A new configuration was accepted: the window is judged again under it.
    Reload(Box<Settings>),
}

/// What a restart found.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Restored {
    pub session: Option<SessionRecord>,
    /// The session's checks, oldest first (the last `engine::SESSION_CHECKS` are replayed:
    /// the accumulating rules look past the window).
    pub checks: Vec<(u64, SystemTime, CheckResult)>,
    /// The active worker `rollbackd.db` names (observed between sessions).
    pub active_worker: Option<String>,
    /// Observations kept for the next baseline, oldest first.
    pub observations: Vec<Observed>,
    /// Each version's last healthy-session stats, oldest first.
    pub healthy: Vec<(String, Baseline)>,
    /// An action that had not finished: the runner resumes it.
    pub in_flight: Option<(Option<ActionId>, ActionKind, ActionTrigger)>,
    /// The session's last action, finished just before the restart while the session
    /// still says `monitoring`: its outcome is carried out now.
    pub settled: Option<(Option<ActionId>, ActionKind, ActionTrigger, ActionResult)>,
    /// The automatic (and fleet) rollbacks of the last hour (loop protection).
    pub rollbacks: Vec<PastRollback>,
}

/// An automatic or fleet rollback, for loop protection: when it started and the version it
/// rolled back from. Manual rollbacks are not counted: an operator is already in the loop.
#[derive(Debug, Clone, PartialEq)]
pub struct PastRollback {
    pub at: SystemTime,
    pub from: String,
}

/// The running session.
#[derive(Debug, Clone)]
pub struct Session {
    pub record: SessionRecord,
    engine: Engine,
    /// The window's raw checks with their numbers, so a reload can judge them again.
    raw: VecDeque<(Duration, u64, CheckResult)>,
    pub next_index: u64,
    pub last_decision: Option<Decision>,
    dry_run_recorded: Vec<Action>,
    /// Checks recorded since the promotion, a restart or a stall: the promotion is
    /// confirmed only once they fill the window.
    pub checks_since_resume: usize,
    pub resumed_by: &'static str,
    voided_in_a_row: u32,
    void_note: Option<String>,
    waiting_logged: bool,
    /// `cannot_judge` fired on the latest check (an alert was recorded when it began).
    holding: bool,
    /// The "not confirming while holding" line was logged.
    hold_logged: bool,
    /// The action the latest checks would have taken and why it was not: recorded in
    /// the audit line only when it changes.
    last_held: Option<(Action, String)>,
    /// What the session's checks observed, for its stats if it is confirmed healthy.
    observed: Vec<Observation>,
    /// A fleet verdict for this session's version that came while monitoring was paused:
    /// followed on resume (through the same checks again), not forgotten. In memory only:
    /// after a restart etcd hands the verdicts over again.
    deferred_verdict: Option<DeferredVerdict>,
}

/// A fleet verdict kept for a resume ([`Session::deferred_verdict`]).
#[derive(Debug, Clone)]
struct DeferredVerdict {
    version: String,
    host: String,
    reason: String,
}

/// At most this many of a session's checks make its healthy-session stats.
const MAX_SESSION_OBSERVATIONS: usize = 2048;

impl Session {
    fn new(record: SessionRecord, rules: &EngineConfig, resumed_by: &'static str) -> Session {
        Session {
            engine: Engine::new(rules.clone(), record.baseline),
            record,
            raw: VecDeque::new(),
            next_index: 0,
            last_decision: None,
            dry_run_recorded: Vec::new(),
            checks_since_resume: 0,
            resumed_by,
            voided_in_a_row: 0,
            void_note: None,
            waiting_logged: false,
            holding: false,
            hold_logged: false,
            last_held: None,
            observed: Vec::new(),
            deferred_verdict: None,
        }
    }

    fn at(&self, taken_at: SystemTime) -> Duration {
        taken_at
            .duration_since(self.record.promoted_at)
            .unwrap_or_default()
    }

    fn observe(&mut self, at: Duration, index: u64, result: &CheckResult) -> Decision {
        // The whole session (bounded): the accumulating rules look past the window, and a
        // reload judges it all again.
        let window = crate::core::engine::SESSION_CHECKS;
        self.raw.push_back((at, index, result.clone()));
        while self.raw.len() > window {
            self.raw.pop_front();
        }
        let decision = self.engine.observe_numbered(at, index, result);
        self.last_decision = Some(decision.clone());
        decision
    }

    /// Nothing was checked for a while: the window has to fill again with checks taken
    /// from now on before the promotion may be confirmed.
    fn gap(&mut self, by: &'static str) {
        self.checks_since_resume = 0;
        self.resumed_by = by;
        self.waiting_logged = false;
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A new window for a new version under watch: nothing the canary's checks said
    /// counts against the restored version.
    fn restart_window(&mut self, rules: &EngineConfig, by: &'static str) {
        self.engine = Engine::new(rules.clone(), self.record.baseline);
        self.raw.clear();
        self.last_decision = None;
        self.dry_run_recorded.clear();
        self.voided_in_a_row = 0;
        self.void_note = None;
        self.observed.clear();
        self.gap(by);
    }

    /// The stability watch, while it runs.
    pub fn watching(&self) -> Option<&Stability> {
        self.record
            .stability
            .as_ref()
            .filter(|_| self.record.state == SessionState::StabilityWatch)
    }
}

/// The action in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct Running {
    /// `None` until the runner has recorded the intent.
    pub id: Option<ActionId>,
    pub kind: ActionKind,
    pub trigger: ActionTrigger,
    pub reply: Option<ReplyTo>,
}

/// A promotion waiting for `rollbackd.db` to take it.
#[derive(Debug, Clone)]
struct Pending {
    record: SessionRecord,
    reply: ReplyTo,
}

pub struct Supervisor {
    settings: Settings,
    session: Option<Session>,
    action: Option<Running>,
    check_in_flight: bool,
    next_check: Option<Instant>,
    suspended_seen: Duration,
    rollbacks: Vec<PastRollback>,
    pending: Option<Pending>,
    /// The workers of the last session that ended (for `status` between sessions).
    last_workers: Option<(String, Option<String>, SessionState)>,
    /// Observations and healthy-session stats the next baseline is chosen from.
    history: History,
    /// The active worker between sessions, observed every `baseline.observe_interval`.
    idle_worker: Option<String>,
    next_observe: Option<Instant>,
    observe_in_flight: bool,
    /// Run for one operator command while no daemon runs: nothing is checked in this
    /// process, so no timer is armed and a promotion is only recorded (the daemon says
    /// `monitoring-started` when it picks the session up).
    offline: bool,
    effects: VecDeque<Effect>,
}

impl Supervisor {
    pub fn new(settings: Settings) -> Supervisor {
        Supervisor {
            settings,
            session: None,
            action: None,
            check_in_flight: false,
            next_check: None,
            suspended_seen: Duration::ZERO,
            rollbacks: Vec::new(),
            pending: None,
            last_workers: None,
            history: History::default(),
            idle_worker: None,
            next_observe: None,
            observe_in_flight: false,
            offline: false,
            effects: VecDeque::new(),
        }
    }

    /// A Supervisor for one operator command without a daemon (see the `offline` field).
    pub fn offline(settings: Settings) -> Supervisor {
        Supervisor {
            offline: true,
            ..Supervisor::new(settings)
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn session(&self) -> Option<&Session> {
        self.session.as_ref()
    }

    pub fn action(&self) -> Option<&Running> {
        self.action.as_ref()
    }

    /// Active, previous and end state of the last session that ended.
    pub fn last_workers(&self) -> Option<&(String, Option<String>, SessionState)> {
        self.last_workers.as_ref()
    }

    /// The next thing to do, in order.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// Takes the next effect only if it is an audit line (a check's line follows its
    /// [`Effect::RecordCheck`], so the driver can write both in one go).
    pub fn poll_audit(&mut self) -> Option<AuditRecord> {
        match self.effects.front() {
            Some(Effect::Audit(_)) => match self.effects.pop_front() {
                Some(Effect::Audit(record)) => Some(record),
                _ => None,
            },
            _ => None,
        }
    }

    /// When to feed [`Input::Timeout`] next: the next check, or the end of the grace
    /// period's wait for one. `None`: nothing is due (no session, a check or a rollback
    /// in flight).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.offline {
            return None;
        }
        if self.session.is_none() {
            return self.next_observe.filter(|_| self.observes_idle());
        }
        if self.check_in_flight || !self.checks_may_run() {
            return None;
        }
        self.next_check
    }

    /// Between sessions the active version is observed (for the next baseline) when its
    /// id is known, the cadence is not zero, and nothing is running.
    fn observes_idle(&self) -> bool {
        !self.offline
            && self.session.is_none()
            && self.action.is_none()
            && !self.observe_in_flight
            && self.idle_worker.is_some()
            && !self.settings.baseline.observe_interval.is_zero()
    }

    /// The history the next baseline is chosen from.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The baseline a promotion of a version after `previous` would use now.
    pub fn baseline_for(&self, now: SystemTime, previous: &str) -> Option<Baseline> {
        self.chosen_baseline(now, previous, None, None)
    }

    /// SPEC §2a's precedence over what this Supervisor knows and what the runner brought.
    fn chosen_baseline(
        &self,
        now: SystemTime,
        previous: &str,
        operator: Option<Baseline>,
        prometheus: Option<Baseline>,
    ) -> Option<Baseline> {
        baseline::choose(
            operator,
            self.history
                .observed(previous, now, &self.settings.baseline),
            prometheus,
            self.history.healthy(previous),
        )
    }

    /// A rollback pauses checking (the active worker is being switched under it); an
    /// escalation does not: it may wait for a locked application database for as long as
    /// it takes, and the checks go on meanwhile as evidence.
    fn checks_may_run(&self) -> bool {
        self.action
            .as_ref()
            .is_none_or(|a| a.kind == ActionKind::Escalation)
    }

    fn push(&mut self, effect: Effect) {
        self.effects.push_back(effect);
    }

    fn reply(&mut self, to: ReplyTo, answer: Answer) {
        self.push(Effect::Reply { to, answer });
    }

    fn audit(&mut self, record: AuditRecord) {
        self.push(Effect::Audit(record));
    }

    pub fn handle(&mut self, now: Now, input: Input) {
        match input {
            Input::Restore(restored) => self.restore(now, *restored),
            Input::Timeout { suspended } if self.session.is_none() => {
                self.suspended_seen = suspended;
                self.observe_timeout(now);
            }
            Input::Timeout { suspended } => self.timeout(now, suspended),
            Input::IdleObserved { worker, snapshot } => self.idle_observed(now, worker, snapshot),
            Input::CheckScheduled => {
                if self.session.is_some() && !self.check_in_flight && self.checks_may_run() {
                    self.next_check = Some(now.mono);
                    let suspended = self.suspended_seen;
                    self.timeout(now, suspended);
                }
            }
            Input::CheckDone {
                session_id,
                index,
                started,
                taken_at,
                result,
                stalled,
            } => self.check_done(now, &session_id, index, started, taken_at, result, stalled),
            Input::SessionRecorded { id, error } => self.session_recorded(now, &id, error),
            Input::ActionStarted { id } => {
                if let Some(action) = &mut self.action {
                    action.id = action.id.or(id);
                }
            }
            Input::ActionDone { id, result } => self.action_done(now, id, result),
            Input::Promote {
                operator,
                active,
                previous,
                baseline,
                prometheus,
                reply,
            } => {
                let baseline = self.chosen_baseline(now.wall, &previous, baseline, prometheus);
                self.promote(now, operator, active, previous, baseline, reply)
            }
            Input::Rollback {
                operator,
                reason,
                emergency,
                force,
                rolled_back,
                known_workers,
                reply,
            } => self.manual_rollback(
                now,
                operator,
                reason,
                (emergency, force),
                &rolled_back,
                known_workers,
                reply,
            ),
            Input::Pause {
                operator,
                paused,
                reason,
                reply,
            } => self.pause(now, operator, paused, reason, reply),
            Input::KillSwitchReset { operator } => self.kill_switch_reset(now, operator),
            Input::FleetVerdict {
                version,
                host,
                reason,
            } => self.fleet_verdict(now, version, host, reason),
            Input::Reload(settings) => self.reload(*settings),
        }
    }

    /// A verdict of another host about `version`: roll back too when this session runs it,
    /// through the same policy as the host's own verdicts — nothing while paused, in a
    /// dry run, during another action or in an escalated session; an escalation when no
    /// previous worker is known or the hour's rollback budget is spent. Which verdicts are
    /// news (written after the promotion, or after the watch began) is the runner's to
    /// say, by etcd revision; every verdict not followed here is logged with why.
    fn fleet_verdict(&mut self, now: Now, version: String, host: String, reason: String) {
        let why = format!("fleet: {version} was rolled back on {host}: {reason}");
        let Some(session) = self.session.as_ref() else {
            tracing::warn!("{why}; not following it: no monitoring session runs here");
            return;
        };
        let watch = session.watching().cloned();
        let watched = session.record.state == SessionState::StabilityWatch && watch.is_some();
        if session.record.active != version {
            tracing::warn!(
                "{why}; not following it: this host's session runs {}",
                session.record.active
            );
            return;
        }
        if !(session.record.state == SessionState::Monitoring || watched) {
            tracing::warn!(
                "{why}; not following it: the session is {}",
                session.record.state.as_str()
            );
            return;
        }
        let not_taken = if let Some(action) = &self.action {
            Some(format!("a {} is in progress", action.kind.as_str()))
        } else if session.record.paused {
            Some("monitoring is paused".to_owned())
        } else if self.settings.rules.dry_run {
            Some("dry run".to_owned())
        } else {
            None
        };
        if let Some(not_taken) = not_taken {
            let paused = self.action.is_none() && session.record.paused;
            tracing::warn!(
                %version,
                %host,
                "{why}; not following it: {not_taken}{}",
                if paused { " (it is followed on resume)" } else { "" }
            );
            if paused {
                if let Some(session) = self.session.as_mut() {
                    session.deferred_verdict = Some(DeferredVerdict {
                        version,
                        host,
                        reason,
                    });
                }
            }
            return;
        }
        let decision = session.last_decision.clone();
        if let Some(watch) = watch {
            // The version this host was restored to is bad elsewhere too: the watch fails
            // as on its own breach, and a human is called — never a second rollback.
            let reason = format!("restored version {} unstable: {why}", watch.restored);
            tracing::error!("{reason}: escalating (never a second automatic rollback)");
            self.end_watch(
                now,
                StabilityResult::Failed,
                &reason,
                vec!["fleet".to_owned()],
            );
            let plan = self.plan(
                now,
                ActionKind::Escalation,
                ActionTrigger::Fleet,
                reason,
                Some(host),
                decision.as_ref(),
            );
            self.start_action(plan, None);
            return;
        }
        let (kind, reason) = if session.record.previous.is_none() {
            (
                ActionKind::Escalation,
                format!("{why}; no previous worker is known, so escalating"),
            )
        } else {
            let active = session.record.active.clone();
            let recent = self.rollbacks_in_the_last_hour(now.wall, &active);
            let limit = self.settings.max_rollbacks_per_hour;
            if recent >= limit {
                (
                    ActionKind::Escalation,
                    loop_held(&why, recent, limit, &active),
                )
            } else {
                (ActionKind::Rollback, why)
            }
        };
        let plan = self.plan(
            now,
            kind,
            ActionTrigger::Fleet,
            reason,
            Some(host),
            decision.as_ref(),
        );
        self.start_action(plan, None);
    }

    // -- restart -------------------------------------------------------------------------

    fn restore(&mut self, now: Now, restored: Restored) {
        let Restored {
            session,
            checks,
            active_worker,
            observations,
            healthy,
            in_flight,
            settled,
            rollbacks,
        } = restored;
        self.rollbacks = rollbacks;
        self.idle_worker = active_worker.filter(|w| crate::text::is_valid_worker_id(w));
        for observed in observations {
            self.history
                .observe(observed, self.settings.baseline.window);
        }
        for (worker, stats) in healthy {
            self.history.remember_healthy(&worker, stats);
        }
        self.next_observe = Some(now.mono);
        if let Some(mut record) = session {
            record.previous = record
                .previous
                .filter(|p| crate::text::is_valid_worker_id(p));
            if let Err(problem) = crate::text::check_worker_id(&record.active) {
                // Never probe, sample or hand to a hook an id that breaks the rule.
                tracing::error!(
                    session = %record.id,
                    "rollbackd.db: the recorded session's active worker is not a valid id, so the session is not resumed (run `rollbackd promote` again): {problem}"
                );
                self.push(Effect::Persist(StateChange::Session {
                    id: record.id.clone(),
                    state: SessionState::Stopped,
                    ended: Some((
                        now.wall,
                        "not resumed: the recorded active worker is not a valid id".into(),
                    )),
                }));
            } else {
                let fresh = checks.is_empty()
                    && time::add(record.promoted_at, Duration::from_secs(1)) > now.wall;
                let mut session = Session::new(
                    record,
                    &self.settings.rules,
                    if fresh { "the start" } else { "the restart" },
                );
                let window = self.settings.rules.window;
                let next_index = checks.last().map(|(i, _, _)| i + 1).unwrap_or(0);
                if session.record.state == SessionState::StabilityWatch
                    && session.record.stability.is_none()
                {
                    tracing::warn!(
                        session = %session.record.id,
                        "rollbackd.db: the session is under a stability watch but its record is unreadable; watching {} again from now",
                        session.record.active
                    );
                    session.record.stability = Some(Stability {
                        started_at_ms: time::to_ms(now.wall),
                        period_seconds: self.settings.stability_period.as_secs_f64(),
                        restored: session.record.active.clone(),
                        from: session.record.previous.clone().unwrap_or_default(),
                        rollback_action: None,
                        first_check: next_index,
                        result: None,
                        ended_at_ms: None,
                        reason: None,
                    });
                }
                // The row keeps the promotion's workers; once a rollback was verified (a
                // stability record exists: the watch running, or ended — confirmed, or
                // failed and escalated) the restored version is the active one.
                if let Some(watch) = session.record.stability.clone() {
                    session.record.active = watch.restored;
                    session.record.previous = Some(watch.from).filter(|p| !p.is_empty());
                }
                // Under a stability watch only the restored version's checks are its window,
                // the first of them inside the settle time.
                let first = session.watching().map_or(0, |w| w.first_check);
                if let Some(watch) = session.watching() {
                    let started = time::from_ms(watch.started_at_ms);
                    let at = session.at(started);
                    session.engine.settle_from(at);
                }
                let judged: Vec<_> = checks.iter().filter(|(i, _, _)| *i >= first).collect();
                // The whole session (bounded), so the accumulating evidence survives a restart.
                let _ = window;
                for (index, taken_at, result) in judged
                    .into_iter()
                    .rev()
                    .take(crate::core::engine::SESSION_CHECKS)
                    .rev()
                {
                    let at = session.at(*taken_at);
                    session.observe(at, *index, result);
                }
                session.next_index = next_index;
                tracing::info!(
                    session = %session.record.id,
                    active = %session.record.active,
                    checks = checks.len(),
                    state = %session.record.state.as_str(),
                    "{} monitoring session",
                    if fresh { "starting recorded" } else { "resuming" }
                );
                if checks.is_empty() && !self.offline {
                    // Recorded by `rollbackd promote` while no daemon ran: this is its start.
                    let record = &session.record;
                    let started = self.monitoring_started(record);
                    self.audit(AuditRecord::of(now.wall, Some(&record.id), &started));
                }
                self.session = Some(session);
                // Nothing was checked while no daemon ran: check now, and the checks from
                // now on have to fill the window before the promotion may be confirmed.
                self.next_check = Some(now.mono);
            }
        }
        if let Some((id, kind, trigger)) = in_flight {
            self.action = Some(Running {
                id,
                kind,
                trigger,
                reply: None,
            });
        } else if let Some((id, kind, trigger, result)) = settled {
            // The rollback that started a stability watch was carried out already.
            let carried_out = |s: &Session| {
                s.watching()
                    .is_some_and(|w| w.rollback_action.is_some() && w.rollback_action == id)
            };
            if self.session.as_ref().is_some_and(|s| {
                s.record.state == SessionState::Monitoring
                    || (s.record.state == SessionState::StabilityWatch && !carried_out(s))
            }) {
                // A kill after an action finished but before its outcome was carried out:
                // resuming the checks would act a second time. Carry it out now.
                tracing::warn!(
                    action = ?id,
                    kind = kind.as_str(),
                    "the last action finished just before a restart; carrying out its outcome"
                );
                self.action = Some(Running {
                    id,
                    kind,
                    trigger,
                    reply: None,
                });
                self.action_done(now, id, result);
            }
        }
    }

    // -- checks --------------------------------------------------------------------------

    fn timeout(&mut self, now: Now, suspended: Duration) {
        let Some(due) = self.next_check else {
            return;
        };
        if now.mono < due {
            return;
        }
        let interval = self.settings.check_interval;
        let window = self.settings.rules.window;
        let grace = self.settings.grace_period;
        let no_action = self.action.is_none();
        let slept = suspended.saturating_sub(self.suspended_seen);
        self.suspended_seen = suspended;
        let Some(session) = self.session.as_mut() else {
            self.next_check = None;
            return;
        };
        // A timer that fires far later than it was set for means rollbackd was not
        // running (SIGSTOP, VM pause, freeze): nothing was checked meanwhile.
        if slept > stall_threshold(interval) {
            tracing::warn!(
                session = %session.record.id,
                "the machine was suspended for {:.1}s: the checks from now on must fill the window before the promotion is confirmed",
                slept.as_secs_f64()
            );
            session.gap("the suspend");
        }
        let late = now.mono.saturating_duration_since(due);
        if late > stall_threshold(interval) {
            tracing::warn!(
                session = %session.record.id,
                "rollbackd was stalled for {:.1}s (the next check was due {:.1}s ago): the checks from now on must fill the window before the promotion is confirmed",
                late.as_secs_f64(),
                late.as_secs_f64()
            );
            session.gap("the stall");
        }
        // Strictly after the grace period (SPEC §6: checks *after* it are not evaluated; a
        // check due exactly at its end is still taken). A stability watch ends the same
        // way, its period counted from the verified rollback.
        let (period_start, period, what) = match session.watching() {
            Some(watch) => (watch.started_at(), watch.period(), "stability period"),
            None => (session.record.promoted_at, grace, "grace period"),
        };
        let grace_over = matches!(
            session.record.state,
            SessionState::Monitoring | SessionState::StabilityWatch
        ) && no_action
            && now.wall.duration_since(period_start).unwrap_or_default() > period;
        if grace_over && session.checks_since_resume < window && !session.waiting_logged {
            session.waiting_logged = true;
            tracing::info!(
                session = %session.record.id,
                "{what} over, but only {} of monitor.window = {window} checks since {}: confirming once a full window of checks took no action",
                session.checks_since_resume,
                session.resumed_by
            );
        }
        // Under `no_data_policy = "hold"` a period never ends in a confirmation it could not
        // see: the window must be judged (every check with a usable error rate).
        let unjudged = self.settings.rules.no_data_policy == NoDataPolicy::Hold
            && !session.engine.window_judged();
        // A paused session never confirms while its checks fail: the pause held an action
        // back, it did not make the release good. It stays paused until resumed.
        let paused_failing =
            session.record.paused && session.engine.window().any(|e| e.is_failure());
        let holds = unjudged || paused_failing;
        if grace_over && session.checks_since_resume >= window && holds {
            if !session.hold_logged {
                session.hold_logged = true;
                if paused_failing {
                    tracing::warn!(
                        session = %session.record.id,
                        "{what} over, but monitoring is paused while checks of the window fail: not confirming; resume (`rollbackd resume`) or roll back by hand"
                    );
                } else {
                    tracing::warn!(
                        session = %session.record.id,
                        "{what} over, but the last {window} checks were not all judged (no usable error rate): not confirming until a full window is (no_data_policy = \"hold\")"
                    );
                }
            }
        } else if grace_over
            && session.checks_since_resume >= window
            && session.watching().is_some()
        {
            self.stability_confirmed(now);
            return;
        }
        if grace_over && session.checks_since_resume >= window && !holds {
            self.end_session(
                now,
                SessionState::Confirmed,
                &format!(
                    "grace period of {} ended without an action: promotion confirmed",
                    crate::core::time::show(grace)
                ),
                None,
            );
            return;
        }
        self.check_in_flight = true;
        let effect = Effect::StartCheck {
            session_id: session.record.id.clone(),
            index: session.next_index,
            worker: session.record.active.clone(),
        };
        self.push(effect);
    }

    #[allow(clippy::too_many_arguments)]
    fn check_done(
        &mut self,
        now: Now,
        session_id: &str,
        index: u64,
        started: Instant,
        taken_at: SystemTime,
        result: CheckResult,
        stalled: Duration,
    ) {
        self.check_in_flight = false;
        let settings = self.settings.clone();
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if session.record.id != session_id || index != session.next_index {
            return; // a check of a session that ended meanwhile
        }
        if stalled > stall_threshold(settings.check_timeout) {
            // rollbackd itself was not running during the check: a deadline that passed
            // meanwhile says nothing about the worker.
            session.gap("the stall");
            let failure = match (&result.probe, &result.snapshot) {
                (ProbeOutcome::Failed { reason }, _) => Some(format!("probe: {reason}")),
                (_, SnapshotOutcome::Unavailable { reason }) => Some(format!("snapshot: {reason}")),
                _ => None,
            };
            if let Some(failure) = failure {
                if session.voided_in_a_row < MAX_VOID_IN_A_ROW {
                    session.voided_in_a_row += 1;
                    let note = format!(
                        "check void: rollbackd was stalled for {:.1}s during check #{index} ({failure}); retried",
                        stalled.as_secs_f64(),
                    );
                    tracing::warn!(session = %session.record.id, "{note}");
                    session.void_note = Some(note);
                    // Not a failure, not a breach, not missing data: taken again now.
                    self.next_check = Some(now.mono);
                    return;
                }
                tracing::warn!(
                    session = %session.record.id,
                    "rollbackd was stalled during {MAX_VOID_IN_A_ROW} checks in a row; recording check #{index} as it is ({failure})"
                );
            }
        } else {
            session.checks_since_resume += 1;
        }
        session.voided_in_a_row = 0;
        session.next_index += 1;
        let at = session.at(taken_at);
        let decision = session.observe(at, index, &result);
        // The canary's own checks are observations of it too, but they join the history
        // a baseline is made from only once it is confirmed (`end_session`): a rolled-back
        // canary must never become the next promotion's baseline.
        if let Some(observation) = Observation::of(baseline::seconds(taken_at), &result.snapshot) {
            if session.observed.len() < MAX_SESSION_OBSERVATIONS {
                session.observed.push(observation);
            }
        }
        let held = decision.fired(Rule::CannotJudge).is_some();
        if held != session.holding {
            session.holding = held;
            let event = events::Judgement {
                worker: session.record.active.clone(),
                check_index: index,
                judging: !held,
                reason: if held {
                    decision.reason()
                } else {
                    "usable data again: judging the release again".to_owned()
                },
            };
            let audit = AuditRecord::of(now.wall, Some(session_id), &event);
            self.audit(audit);
        }
        let Some(session) = self.session.as_mut() else {
            return;
        };
        // What the kill switch's quiet period counts as a failed check: a failed probe,
        // any breach (absolute or against the baseline), or missing data that was not
        // expected — a deploy-time gap inside the warm-up is not a failure users saw.
        let failed = result.probe.is_failed()
            || session
                .engine
                .window()
                .last()
                .is_some_and(|e| e.is_failure() || e.is_missing_data())
            || decision.error_class == ValueClass::Breach;
        let paused = session.record.paused;
        let escalated = session.record.state == SessionState::Escalated;
        let record = CheckRecord {
            session_id: session.record.id.clone(),
            index,
            taken_at,
            result: result.clone(),
            verdict: decision.verdict,
            failed,
        };
        let in_flight = self.action.as_ref().map(|a| match a.id {
            Some(id) => format!("{} #{id} is in progress", a.kind.as_str()),
            None => format!("a {} is in progress", a.kind.as_str()),
        });
        // What the verdict becomes: an action started, or why none was.
        let mut plan = None;
        let mut not_taken = None;
        if let Some(action) = decision.action {
            if let Some(busy) = in_flight {
                not_taken = Some(busy);
            } else if escalated {
                not_taken = Some("the session is escalated".to_owned());
            } else if paused {
                tracing::warn!(verdict = %decision.verdict, "monitoring is paused: not acting on {}", action.as_str());
                not_taken = Some("monitoring is paused".to_owned());
            } else if let Some(watch) = session.watching().cloned() {
                // Never a second automatic rollback: a restored version that breaches
                // needs a human, and the kill switch meanwhile.
                let reason = format!(
                    "restored version {} unstable: {}",
                    watch.restored,
                    decision.reason()
                );
                self.stability_failed(now, &decision, &reason);
                plan = Some(self.plan(
                    now,
                    ActionKind::Escalation,
                    ActionTrigger::Automatic,
                    reason,
                    None,
                    Some(&decision),
                ));
            } else {
                let (kind, reason) = self.policy(now, action, &decision);
                plan = Some(self.plan(
                    now,
                    kind,
                    ActionTrigger::Automatic,
                    reason,
                    None,
                    Some(&decision),
                ));
            }
        }
        let session = self.session.as_mut().expect("checked above");
        let acted = plan.as_ref().map(|p| p.kind.engine_action());
        let mut check = events::HealthCheck {
            check_index: index,
            worker: session.record.active.clone(),
            verdict: decision.verdict.as_str().to_owned(),
            action: acted.map(|a| a.as_str().to_owned()),
            error_rate: decision.error_rate,
            error_class: decision.error_class.as_str().to_owned(),
            probe: if result.probe.is_failed() {
                "failed"
            } else {
                "ok"
            }
            .to_owned(),
            failure_pattern: decision.failure_pattern.as_str().to_owned(),
            rules: decision
                .fired
                .iter()
                .map(|f| f.rule.as_str().to_owned())
                .collect(),
            would_act: None,
            dry_run: None,
            not_taken: None,
            paused: paused.then_some(true),
            after_void: session.void_note.take(),
            stability_watch: session.watching().is_some().then_some(true),
            reason: None,
            check: None,
        };
        if let Some(would) = decision.would_act() {
            check.would_act = Some(would.as_str().to_owned());
            check.dry_run = Some(true);
        } else if let (Some(would), Some(why)) = (decision.action, &not_taken) {
            // Said once per change: in an escalated session every check would say "would
            // roll back, not taken" and scroll the escalation out of `audit tail`.
            let held = (would, why.clone());
            if session.last_held.as_ref() != Some(&held) {
                check.would_act = Some(would.as_str().to_owned());
                check.not_taken = Some(why.clone());
                session.last_held = Some(held);
            }
        } else {
            session.last_held = None;
        }
        if decision.verdict != Verdict::Healthy {
            check.reason = Some(decision.reason());
            check.check = Some(serde_json::to_value(&result).unwrap_or(Value::Null));
        }
        let audit = AuditRecord::of(now.wall, Some(session_id), &check);
        self.push(Effect::Observed {
            verdict: decision.verdict,
            error_rate: decision.error_rate,
            error_class: decision.error_class,
        });
        self.push(Effect::RecordCheck(record));
        self.audit(audit);

        // Next check: from the start of this one, so a slow check causes no catch-up burst.
        let interval = if decision.verdict == Verdict::Healthy {
            settings.check_interval
        } else {
            settings.degraded_check_interval
        };
        self.next_check = Some(time::deadline(started, interval).max(now.mono));

        if escalated || self.action.is_some() {
            return;
        }
        if let Some(would) = decision.would_act() {
            self.dry_run(now, &decision, would);
        }
        if let Some(plan) = plan {
            self.start_action(plan, None);
        }
    }

    /// What a verdict's action becomes: a rollback the engine asks for becomes an
    /// escalation when it cannot help — no previous worker, or the hour's rollback budget
    /// is spent (a loop).
    fn policy(&mut self, now: Now, action: Action, decision: &Decision) -> (ActionKind, String) {
        let previous = self
            .session
            .as_ref()
            .and_then(|s| s.record.previous.clone());
        match action {
            Action::Escalate => (ActionKind::Escalation, decision.reason()),
            Action::Rollback if previous.is_none() => (
                ActionKind::Escalation,
                format!(
                    "{}; no previous worker is known, so escalating",
                    decision.reason()
                ),
            ),
            Action::Rollback => {
                let active = self
                    .session
                    .as_ref()
                    .map(|s| s.record.active.clone())
                    .unwrap_or_default();
                let recent = self.rollbacks_in_the_last_hour(now.wall, &active);
                let limit = self.settings.max_rollbacks_per_hour;
                if recent >= limit {
                    (
                        ActionKind::Escalation,
                        loop_held(&decision.reason(), recent, limit, &active),
                    )
                } else {
                    (ActionKind::Rollback, decision.reason())
                }
            }
        }
    }

    /// Automatic and fleet rollbacks of `version` in the last hour: a loop is the same
    /// version promoted and rolled back again and again, not a busy hour of different
    /// releases.
    fn rollbacks_in_the_last_hour(&mut self, now: SystemTime, version: &str) -> u32 {
        let hour_ago = time::sub(now, Duration::from_secs(3600));
        self.rollbacks.retain(|r| r.at >= hour_ago);
        self.rollbacks.iter().filter(|r| r.from == version).count() as u32
    }

    fn evidence(&self, decision: Option<&Decision>) -> (Evidence, Option<f64>, u32) {
        let Some(decision) = decision else {
            return (Evidence::default(), None, 0);
        };
        let baseline = self
            .session
            .as_ref()
            .and_then(|s| s.record.baseline)
            .map(|b| serde_json::to_value(b).unwrap_or(Value::Null))
            .unwrap_or(Value::Null);
        let recent_checks = self
            .session
            .as_ref()
            .map(|s| {
                s.engine
                    .window()
                    .map(|e| serde_json::to_value(e).unwrap_or(Value::Null))
                    .collect()
            })
            .unwrap_or_default();
        (
            Evidence {
                recent_checks,
                failure_pattern: decision.failure_pattern.as_str().into(),
                threshold: self.settings.threshold_summary(),
                rules_fired: decision
                    .fired
                    .iter()
                    .map(|f| serde_json::to_value(f).unwrap_or(Value::Null))
                    .collect(),
                baseline,
            },
            decision.error_rate,
            decision.failure_count as u32,
        )
    }

    fn plan(
        &self,
        now: Now,
        kind: ActionKind,
        trigger: ActionTrigger,
        reason: String,
        operator: Option<String>,
        decision: Option<&Decision>,
    ) -> ActionPlan {
        let (evidence, error_rate, failure_count) = self.evidence(decision);
        let session = self.session.as_ref();
        ActionPlan {
            kind,
            trigger,
            reason,
            operator,
            session_id: session.map(|s| s.record.id.clone()),
            from: session.map(|s| s.record.active.clone()),
            to: session.and_then(|s| s.record.previous.clone()),
            emergency: trigger == ActionTrigger::Emergency,
            evidence,
            error_rate,
            failure_count,
            config_hash: self.settings.config_hash.clone(),
            started_at: now.wall,
        }
    }

    fn start_action(&mut self, plan: ActionPlan, reply: Option<ReplyTo>) {
        if plan.kind == ActionKind::Rollback && plan.trigger != ActionTrigger::Manual {
            if let Some(from) = &plan.from {
                self.rollbacks.push(PastRollback {
                    at: plan.started_at,
                    from: from.clone(),
                });
            }
        }
        self.action = Some(Running {
            id: None,
            kind: plan.kind,
            trigger: plan.trigger,
            reply,
        });
        self.push(Effect::StartAction {
            plan: Box::new(plan),
            reply,
        });
    }

    /// A dry run records what it would have done, once per kind of action per session.
    fn dry_run(&mut self, now: Now, decision: &Decision, would: Action) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if session.dry_run_recorded.contains(&would) {
            return;
        }
        session.dry_run_recorded.push(would);
        let (evidence, error_rate, failure_count) = self.evidence(Some(decision));
        let session = self.session.as_ref().expect("present");
        let kind = match would {
            Action::Rollback => crate::storage::audit::ArtifactKind::Rollback,
            Action::Escalate => crate::storage::audit::ArtifactKind::Escalation,
        };
        let record = DecisionRecord {
            timestamp: crate::storage::audit::rfc3339_millis(now.wall),
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
            status: crate::storage::audit::DecisionStatus::DryRun,
            error_rate,
            failure_count,
            recommended_action: "none taken (dry run); review the evidence".into(),
            evidence,
            from: Some(session.record.active.clone()),
            to: session.record.previous.clone(),
            trigger: ActionTrigger::Automatic,
            operator: None,
            phases: crate::storage::audit::Phases::new(),
            rollback_duration_seconds: None,
            config_hash: self.settings.config_hash.clone(),
            session_id: Some(session.record.id.clone()),
            attempts: 0,
            error: None,
            incident: None,
        };
        let name = crate::storage::audit::artifact_file_name(kind, now.wall);
        tracing::warn!(artifact = %name, "dry run: would have acted ({})", would.as_str());
        self.push(Effect::Artifact {
            name,
            record: Box::new(record),
        });
    }

    // -- actions -------------------------------------------------------------------------

    fn action_done(&mut self, now: Now, id: Option<ActionId>, result: ActionResult) {
        let Some(action) = self.action.take() else {
            return;
        };
        if action.id.is_some_and(|known| Some(known) != id) {
            tracing::error!(expected = ?action.id, got = ?id, "an unexpected action finished");
        }
        match result {
            ActionResult::RolledBack { from, to, artifact } => {
                // The operator's answer first: the rollback is done and recorded; the
                // session's end is bookkeeping.
                if let Some(reply) = action.reply {
                    self.reply(
                        reply,
                        Answer::Done(json!({"outcome": "rolled-back", "from": from, "to": to, "artifact": artifact})),
                    );
                }
                if let Some(session) = &mut self.session {
                    session.record.active = to.clone();
                    session.record.previous = Some(from.clone());
                }
                // The executor wrote this too; again here so that, if the disk was full
                // then, it is retried until it lands.
                self.push(Effect::Persist(StateChange::Workers {
                    active: to.clone(),
                    previous: from.clone(),
                }));
                if self.session.is_some() && !self.settings.stability_period.is_zero() {
                    self.start_watch(now, id.or(action.id), from, to);
                } else {
                    self.end_session(
                        now,
                        SessionState::RolledBack,
                        &format!("rolled back from {from} to {to}"),
                        None,
                    );
                }
            }
            ActionResult::RollbackFailed { reason, artifact } => {
                if let Some(reply) = action.reply {
                    self.reply(
                        reply,
                        Answer::Progress {
                            message: format!("rollback failed ({reason}); escalating"),
                            detail: json!({ "artifact": artifact }),
                        },
                    );
                }
                let plan = self.plan(
                    now,
                    ActionKind::Escalation,
                    ActionTrigger::Automatic,
                    reason,
                    None,
                    None,
                );
                self.start_action(plan, action.reply);
            }
            ActionResult::Escalated { artifact } => {
                if let Some(session) = &mut self.session {
                    session.record.state = SessionState::Escalated;
                    let id = session.record.id.clone();
                    self.push(Effect::Persist(StateChange::Session {
                        id,
                        state: SessionState::Escalated,
                        ended: None,
                    }));
                }
                if let Some(reply) = action.reply {
                    self.reply(
                        reply,
                        Answer::Done(json!({"outcome": "escalated", "artifact": artifact})),
                    );
                }
            }
        }
    }

    /// An operator reset the kill switch. An escalated canary session is *not* over: the
    /// canary still serves, so it is watched again from a fresh window (its grace period
    /// goes on; the checks from now on must fill the window before it is confirmed). An
    /// escalation of a failed stability watch ends the session: the restored version is
    /// the operator's now.
    fn kill_switch_reset(&mut self, now: Now, operator: String) {
        let rules = self.settings.rules.clone();
        let Some(session) = self.session.as_mut() else {
            return;
        };
        if session.record.state != SessionState::Escalated {
            return;
        }
        if session.record.stability.is_some() {
            self.end_session(
                now,
                SessionState::Stopped,
                "kill switch reset by an operator after the restored version failed its stability watch: the session ends",
                Some(&operator),
            );
            return;
        }
        session.record.state = SessionState::Monitoring;
        session.restart_window(&rules, "the kill switch reset");
        let id = session.record.id.clone();
        let active = session.record.active.clone();
        self.push(Effect::Persist(StateChange::Session {
            id: id.clone(),
            state: SessionState::Monitoring,
            ended: None,
        }));
        let mut record = AuditRecord::of(
            now.wall,
            Some(&id),
            &events::PauseChanged {
                paused: false,
                reason: Some(format!(
                    "kill switch reset by {operator}: {active} is still serving and is monitored again; the checks from now on must fill the window before the promotion is confirmed"
                )),
            },
        );
        record.operator = Some(operator);
        self.audit(record);
        tracing::info!(session = %id, "kill switch reset: monitoring {active} again");
        self.next_check = Some(now.mono);
    }

    // -- the stability watch -------------------------------------------------------------

    /// A verified rollback: the session goes on, watching the restored version with a
    /// fresh window for `rollback.stability_period`.
    fn start_watch(&mut self, now: Now, rollback: Option<ActionId>, from: String, to: String) {
        let rules = self.settings.rules.clone();
        let period = self.settings.stability_period;
        let interval = self.settings.check_interval;
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let watch = Stability {
            started_at_ms: time::to_ms(now.wall),
            period_seconds: period.as_secs_f64(),
            restored: to.clone(),
            from: from.clone(),
            rollback_action: rollback,
            first_check: session.next_index,
            result: None,
            ended_at_ms: None,
            reason: None,
        };
        session.record.state = SessionState::StabilityWatch;
        session.record.stability = Some(watch.clone());
        session.restart_window(&rules, "the rollback");
        // The restored version's metrics still cover the bad version's window for a while.
        let at = session.at(now.wall);
        session.engine.settle_from(at);
        let id = session.record.id.clone();
        let baseline = session.record.baseline;
        let record = session.record.clone();
        self.push(Effect::Persist(StateChange::Stability {
            id: id.clone(),
            stability: watch,
        }));
        self.push(Effect::Persist(StateChange::Session {
            id: id.clone(),
            state: SessionState::StabilityWatch,
            ended: None,
        }));
        self.audit(AuditRecord::of(
            now.wall,
            Some(&id),
            &events::StabilityWatchStarted {
                restored: to.clone(),
                from,
                period_seconds: period.as_secs_f64(),
                baseline: serde_json::to_value(baseline).unwrap_or(Value::Null),
            },
        ));
        self.push(Effect::WorkerManager(WorkerManagerRecord {
            active: record.active.clone(),
            previous: record.previous.clone(),
            updated_at: crate::storage::audit::rfc3339_millis(now.wall),
            session_id: Some(id),
            state: SessionState::StabilityWatch,
        }));
        tracing::info!(
            restored = %to,
            "rollback verified; watching {to} for the stability period of {}",
            time::show(period)
        );
        self.next_check = Some(time::deadline(now.mono, interval));
        // The report the rollback wrote says what it knew then; now it says the watch runs.
        self.push(Effect::IncidentReport {
            session_id: record.id,
        });
    }

    /// Ends the watch in `result`: persisted, and audited unless interrupted.
    fn end_watch(&mut self, now: Now, result: StabilityResult, reason: &str, rules: Vec<String>) {
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let Some(watch) = session.record.stability.as_mut() else {
            return;
        };
        if watch.result.is_some() {
            return;
        }
        watch.result = Some(result);
        watch.ended_at_ms = Some(time::to_ms(now.wall));
        watch.reason = Some(reason.to_owned());
        let watch = watch.clone();
        let id = session.record.id.clone();
        let checks = session.next_index.saturating_sub(watch.first_check);
        self.push(Effect::Persist(StateChange::Stability {
            id: id.clone(),
            stability: watch.clone(),
        }));
        if result == StabilityResult::Interrupted {
            return;
        }
        let watched = now
            .wall
            .duration_since(watch.started_at())
            .unwrap_or_default();
        self.audit(AuditRecord::of(
            now.wall,
            Some(&id),
            &events::StabilityEnded {
                confirmed: result == StabilityResult::Confirmed,
                restored: watch.restored,
                from: watch.from,
                period_seconds: watch.period_seconds,
                watched_seconds: (watched.as_secs_f64() * 1000.0).round() / 1000.0,
                checks,
                reason: reason.to_owned(),
                rules,
            },
        ));
    }

    fn stability_confirmed(&mut self, now: Now) {
        let Some(watch) = self.session.as_ref().and_then(|s| s.watching().cloned()) else {
            return;
        };
        let id = self.session.as_ref().map(|s| s.record.id.clone());
        let reason = format!(
            "{} was stable for the stability period of {}",
            watch.restored,
            time::show(watch.period())
        );
        self.end_watch(now, StabilityResult::Confirmed, &reason, Vec::new());
        self.end_session(
            now,
            SessionState::RolledBack,
            &format!(
                "rolled back from {} to {}; {reason}",
                watch.from, watch.restored
            ),
            None,
        );
        if let Some(session_id) = id {
            self.push(Effect::IncidentReport { session_id });
        }
    }

    fn stability_failed(&mut self, now: Now, decision: &Decision, reason: &str) {
        let rules = decision
            .fired
            .iter()
            .filter(|f| !f.dry_run)
            .map(|f| f.rule.as_str().to_owned())
            .collect();
        tracing::error!("{reason}: escalating (never a second automatic rollback)");
        self.end_watch(now, StabilityResult::Failed, reason, rules);
    }

    fn end_session(&mut self, now: Now, state: SessionState, reason: &str, operator: Option<&str>) {
        if self
            .session
            .as_ref()
            .is_some_and(|s| s.watching().is_some())
        {
            // A promotion or an operator ended the session before the watch did.
            self.end_watch(now, StabilityResult::Interrupted, reason, Vec::new());
        }
        let Some(session) = self.session.take() else {
            return;
        };
        self.next_check = None;
        if state == SessionState::Confirmed {
            // A confirmed canary's checks are observations of the version now active:
            // part of the baseline of the promotion after it.
            let keep = self.settings.baseline.window;
            for observation in &session.observed {
                let at = std::time::UNIX_EPOCH
                    + Duration::from_secs_f64(observation.at_seconds.max(0.0));
                let observed = Observed {
                    at,
                    worker: session.record.active.clone(),
                    observation: *observation,
                };
                if now.wall.duration_since(at).unwrap_or_default() <= keep {
                    self.history.observe(observed.clone(), keep);
                    self.push(Effect::Persist(StateChange::Observation { observed, keep }));
                }
            }
            if let Some(stats) = Baseline::from_observations(
                &session.observed,
                crate::core::check::BaselineSource::PreviousSession,
                self.settings.baseline.min_samples,
            ) {
                self.history.remember_healthy(&session.record.active, stats);
                self.push(Effect::Persist(StateChange::HealthyBaseline {
                    worker: session.record.active.clone(),
                    baseline: stats,
                }));
            }
        }
        self.idle_worker = Some(session.record.active.clone());
        self.next_observe = Some(time::deadline(
            now.mono,
            self.settings.baseline.observe_interval,
        ));
        let record = session.record;
        self.push(Effect::Persist(StateChange::Session {
            id: record.id.clone(),
            state,
            ended: Some((now.wall, reason.to_owned())),
        }));
        let mut audit = AuditRecord::of(
            now.wall,
            Some(&record.id),
            &events::MonitoringStopped {
                state,
                reason: reason.to_owned(),
                active: record.active.clone(),
                previous: record.previous.clone(),
                checks: session.next_index,
            },
        );
        if let Some(operator) = operator {
            audit = audit.operator(operator);
        }
        self.audit(audit);
        // After a rollback the executor has written the mirror already (unless a watch
        // wrote `stability-watch` over it since).
        if state != SessionState::RolledBack || record.stability.is_some() {
            self.push(Effect::WorkerManager(WorkerManagerRecord {
                active: record.active.clone(),
                previous: record.previous.clone(),
                updated_at: crate::storage::audit::rfc3339_millis(now.wall),
                session_id: Some(record.id.clone()),
                state,
            }));
        }
        tracing::info!(session = %record.id, state = state.as_str(), "monitoring stopped: {reason}");
        self.last_workers = Some((record.active, record.previous, state));
        self.push(Effect::PruneSessions);
    }

    // -- operator commands ---------------------------------------------------------------

    /// The one validation of a promotion, for every way one arrives.
    pub fn check_promotion(
        active: &str,
        previous: &str,
        baseline: Option<&Baseline>,
    ) -> Result<(), Answer> {
        let invalid = |problem: String| Answer::Failed {
            message: format!("invalid request: {problem}"),
            exit: 2,
        };
        crate::text::check_worker_id(active).map_err(|e| invalid(format!("active: {e}")))?;
        crate::text::check_worker_id(previous).map_err(|e| invalid(format!("previous: {e}")))?;
        if let Some(baseline) = baseline {
            if let Some(rate) = baseline.error_rate {
                if !(rate.is_finite() && (0.0..=1.0).contains(&rate)) {
                    return Err(invalid(format!(
                        "baseline error rate {rate} is not a fraction between 0 and 1 (0.02 is 2%)"
                    )));
                }
            }
            if let Some(p95) = baseline.latency_p95_ms {
                if !(p95.is_finite() && p95 > 0.0) {
                    return Err(invalid(format!(
                        "baseline p95 {p95} ms is not a positive number of milliseconds"
                    )));
                }
            }
        }
        if active == previous {
            return Err(refused(
                "refused: --active and --previous must be two different worker ids",
            ));
        }
        Ok(())
    }

    fn promote(
        &mut self,
        now: Now,
        operator: String,
        active: String,
        previous: String,
        baseline: Option<Baseline>,
        reply: ReplyTo,
    ) {
        if let Some(action) = &self.action {
            let message = format!(
                "refused: {} {} is in progress",
                action.kind.as_str(),
                action.id.map(|id| format!("#{id}")).unwrap_or_default()
            );
            self.reply(reply, refused(message.replace("  ", " ")));
            return;
        }
        if self.pending.is_some() {
            self.reply(
                reply,
                refused("refused: another promotion is being recorded"),
            );
            return;
        }
        if let Err(answer) = Supervisor::check_promotion(&active, &previous, baseline.as_ref()) {
            self.reply(reply, answer);
            return;
        }
        if self.session.is_some() {
            self.end_session(
                now,
                SessionState::Stopped,
                &format!("superseded by the promotion of {active}"),
                Some(&operator),
            );
        }
        let record = SessionRecord {
            id: session_id_for(now.wall, &active),
            active,
            previous: Some(previous),
            promoted_at: now.wall,
            state: SessionState::Monitoring,
            paused: false,
            pause_reason: None,
            baseline,
            operator: Some(operator),
            stability: None,
        };
        self.pending = Some(Pending {
            record: record.clone(),
            reply,
        });
        self.push(Effect::RecordSession(Box::new(record)));
    }

    fn session_recorded(&mut self, now: Now, id: &str, error: Option<String>) {
        let Some(pending) = self.pending.take_if(|p| p.record.id == id) else {
            return;
        };
        if let Some(error) = error {
            self.reply(
                pending.reply,
                Answer::Failed {
                    message: format!("cannot record the session: {error}"),
                    exit: 1,
                },
            );
            return;
        }
        let record = pending.record;
        let operator = record.operator.clone().unwrap_or_default();
        let result = json!({
            "sessionId": record.id,
            "active": record.active,
            "previous": record.previous,
            "recordedOnly": self.offline,
            "baseline": record.baseline,
            "baselineSummary": baseline_summary(record.baseline.as_ref()),
        });
        if self.offline {
            // Monitoring starts when the daemon picks the session up, and says so then.
            self.session = Some(Session::new(record, &self.settings.rules, "the promotion"));
            self.reply(pending.reply, Answer::Done(result));
            return;
        }
        let started = self.monitoring_started(&record);
        self.audit(AuditRecord::of(now.wall, Some(&record.id), &started).operator(operator));
        self.push(Effect::WorkerManager(WorkerManagerRecord {
            active: record.active.clone(),
            previous: record.previous.clone(),
            updated_at: crate::storage::audit::rfc3339_millis(now.wall),
            session_id: Some(record.id.clone()),
            state: record.state,
        }));
        let result = json!({
            "sessionId": record.id,
            "active": record.active,
            "previous": record.previous,
            "baseline": record.baseline,
            "baselineSummary": baseline_summary(record.baseline.as_ref()),
        });
        self.session = Some(Session::new(record, &self.settings.rules, "the promotion"));
        // The first check comes one interval after promotion: the canary gets that long
        // to warm up before it is judged.
        self.next_check = Some(time::deadline(now.mono, self.settings.check_interval));
        self.reply(pending.reply, Answer::Done(result));
    }

    #[allow(clippy::too_many_arguments)]
    fn manual_rollback(
        &mut self,
        now: Now,
        operator: String,
        reason: String,
        (emergency, force): (bool, bool),
        rolled_back: &[String],
        known_workers: (Option<String>, Option<String>),
        reply: ReplyTo,
    ) {
        if let Some(action) = &self.action {
            let message = match action.id {
                Some(id) => format!(
                    "refused: {} #{id} is already in progress",
                    action.kind.as_str()
                ),
                None => format!("refused: a {} is already in progress", action.kind.as_str()),
            };
            self.reply(reply, refused(message));
            return;
        }
        let valid = |id: Option<String>| id.filter(|id| crate::text::is_valid_worker_id(id));
        let (active, previous) = match &self.session {
            Some(session) => (
                Some(session.record.active.clone()),
                session.record.previous.clone(),
            ),
            None => (valid(known_workers.0), valid(known_workers.1)),
        };
        let (Some(active), Some(previous)) = (active, previous) else {
            self.reply(
                reply,
                refused(
                    "refused: no active/previous worker is known (run `rollbackd promote` first)",
                ),
            );
            return;
        };
        // Going back to a version rollbackd took out (and nobody confirmed since) would
        // re-deploy a bad release: after an automatic rollback v2 → v1, "roll back" means
        // v1 → v2. Refused unless forced.
        if rolled_back.contains(&previous) && !force {
            self.reply(
                reply,
                refused(format!(
                    "refused: the version to roll back to, {previous}, is one rollbackd rolled back (no promotion of it was confirmed since): this would re-deploy it over {active}. If that is what you want: `rollbackd rollback --force --reason ...`"
                )),
            );
            return;
        }
        let trigger = if emergency {
            ActionTrigger::Emergency
        } else {
            ActionTrigger::Manual
        };
        let decision = self.session.as_ref().and_then(|s| s.last_decision.clone());
        let mut plan = self.plan(
            now,
            ActionKind::Rollback,
            trigger,
            reason,
            Some(operator),
            decision.as_ref(),
        );
        plan.from = Some(active.clone());
        plan.to = Some(previous.clone());
        self.reply(
            reply,
            Answer::Progress {
                message: format!(
                    "{} rollback {active} → {previous} recorded; starting",
                    trigger.as_str()
                ),
                detail: json!({}),
            },
        );
        self.start_action(plan, Some(reply));
    }

    fn pause(
        &mut self,
        now: Now,
        operator: String,
        paused: bool,
        reason: Option<String>,
        reply: ReplyTo,
    ) {
        let Some(session) = self.session.as_mut() else {
            self.reply(reply, refused("refused: no monitoring session"));
            return;
        };
        if session.record.paused == paused {
            self.reply(
                reply,
                Answer::Done(json!({"paused": paused, "changed": false})),
            );
            return;
        }
        session.record.paused = paused;
        session.record.pause_reason = reason.clone();
        let id = session.record.id.clone();
        self.push(Effect::Persist(StateChange::Paused {
            id: id.clone(),
            paused,
            reason: reason.clone(),
        }));
        self.audit(
            AuditRecord::of(
                now.wall,
                Some(&id),
                &events::PauseChanged {
                    paused,
                    reason: reason.clone(),
                },
            )
            .operator(operator),
        );
        self.reply(
            reply,
            Answer::Done(json!({"paused": paused, "changed": true})),
        );
        if !paused {
            let deferred = self
                .session
                .as_mut()
                .and_then(|s| s.deferred_verdict.take());
            if let Some(DeferredVerdict {
                version,
                host,
                reason,
            }) = deferred
            {
                tracing::warn!(%version, %host, "resumed: the fleet verdict that came while monitoring was paused is followed now");
                self.fleet_verdict(now, version, host, reason);
            }
        }
    }

    /// The `monitoring-started` line of `record`: one shape, whether the promotion came
    /// to a running daemon or was recorded while none ran.
    fn observe_timeout(&mut self, now: Now) {
        let Some(due) = self.next_observe else {
            return;
        };
        if now.mono < due || !self.observes_idle() {
            return;
        }
        let Some(worker) = self.idle_worker.clone() else {
            return;
        };
        self.observe_in_flight = true;
        self.push(Effect::ObserveIdle { worker });
    }

    fn idle_observed(&mut self, now: Now, worker: String, snapshot: SnapshotOutcome) {
        self.observe_in_flight = false;
        self.next_observe = Some(time::deadline(
            now.mono,
            self.settings.baseline.observe_interval,
        ));
        if self.session.is_some() || self.idle_worker.as_deref() != Some(worker.as_str()) {
            return; // a promotion or a rollback came in meanwhile
        }
        let Some(observation) = Observation::of(baseline::seconds(now.wall), &snapshot) else {
            return;
        };
        let observed = Observed {
            at: now.wall,
            worker,
            observation,
        };
        self.history
            .observe(observed.clone(), self.settings.baseline.window);
        let keep = self.settings.baseline.window;
        self.push(Effect::Persist(StateChange::Observation { observed, keep }));
    }

    fn monitoring_started(&self, record: &SessionRecord) -> events::MonitoringStarted {
        events::MonitoringStarted {
            active: record.active.clone(),
            previous: record.previous.clone(),
            baseline: serde_json::to_value(record.baseline).unwrap_or(Value::Null),
            grace_period_seconds: self.settings.grace_period.as_secs_f64(),
            config_hash: self.settings.config_hash.clone(),
            resumed: false,
        }
    }

    fn reload(&mut self, settings: Settings) {
        self.settings = settings;
        if let Some(session) = &mut self.session {
            // The window is judged again under the new thresholds.
            let mut engine = Engine::new(self.settings.rules.clone(), session.engine.baseline());
            let (quiet, until) = session.engine.quiet();
            // The same span, measured with the new configuration's warm-up or settle time.
            let until = match quiet {
                crate::core::engine::Quiet::WarmUp => self.settings.rules.warmup,
                crate::core::engine::Quiet::Settle => until
                    .saturating_sub(session.engine.config().settle)
                    .saturating_add(self.settings.rules.settle),
            };
            engine.set_quiet((quiet, until));
            let raw: Vec<_> = session.raw.drain(..).collect();
            for (at, index, result) in &raw {
                engine.observe_numbered(*at, *index, result);
            }
            session.raw = raw.into_iter().collect();
            session.engine = engine;
        }
    }
}

/// The reason of an escalation loop protection made instead of a rollback: says that the
/// version still serves and what to do.
fn loop_held(why: &str, recent: u32, limit: u32, version: &str) -> String {
    format!(
        "{why}; but {version} was already rolled back automatically {recent} time{} in the last hour (max_rollbacks_per_hour = {limit}): escalating instead of looping — still serving {version}: roll back by hand (`rollbackd rollback --reason ...`) once the cause of the loop is understood",
        if recent == 1 { "" } else { "s" }
    )
}

/// One line on a session's baseline for operators (`promote`, `status`, `check-config`).
pub fn baseline_summary(baseline: Option<&Baseline>) -> String {
    match baseline {
        Some(baseline) => baseline.describe(),
        None => "none: only the absolute rules apply (no operator baseline, no observations of the previous version in the baseline window, no healthy session of it on record)".into(),
    }
}

/// A session's id: its promotion time and active worker.
pub fn session_id_for(at: SystemTime, active: &str) -> String {
    format!("{}-{}", crate::storage::audit::artifact_stamp(at), active)
}
