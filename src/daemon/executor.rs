//! Carries out actions: rollback (pause → drain → switch → verify → resume, with retries)
//! and escalation (kill switch on). Intent is recorded in `rollbackd.db` by the driver
//! before the first side effect; each phase is marked before it starts and after it ends,
//! so after a crash the daemon resumes the recorded action at the interrupted phase
//! instead of starting a second one. Hooks must therefore be safe to run twice.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::adapters::WorkerProbe;
use crate::config::LoadedConfig;
use crate::control::Reply;
use crate::core::check::ProbeOutcome;
use crate::daemon::db::Db;
use crate::daemon::recorder::{artifact_name, now_ms, Recorder};
use crate::daemon::{Clock, HookRunner};
use crate::storage::audit::{
    rfc3339_millis, ArtifactKind, AuditEvent, AuditRecord, DecisionRecord, DecisionStatus,
    Evidence, KillSwitchSource, Phases, Trigger, WorkerManagerRecord,
};
use crate::storage::events;
use crate::storage::store::{
    self, ActionId, ActionKind, ActionRow, ActionState, ActionTrigger, NewAction, Phase,
    SessionState,
};
use crate::sys::hooks::HookVars;

/// What the driver needs from an action's end.
#[derive(Debug, Clone, PartialEq)]
pub enum ActionOutcome {
    RolledBack {
        from: String,
        to: String,
        artifact: PathBuf,
    },
    /// Every attempt failed: the driver escalates next.
    RollbackFailed {
        reason: String,
        artifact: PathBuf,
    },
    Escalated {
        artifact: PathBuf,
    },
}

/// The kill-switch writes rollbackd has made or is making, so that the daemon's
/// LiveFlags does not audit them as changes made by hand. Each entry is consumed by
/// exactly one observed change to its value, and an entry whose write changed nothing
/// (the value was already there) is withdrawn as soon as the write lands: it has no
/// change to be consumed by, and left in place it would swallow the next real change
/// to that value made in the sqlite3 shell.
///
/// It also orders rollbackd's own writes: one at a time ([`ExpectedKillWrites::serialized`]),
/// so that the fleet mirror's decision to reset (made under the same lock) can never
/// land after an escalation's set that came later; and it remembers whether the kill
/// switch was turned on here (`local_hold`: an escalation, `kill-switch set`, a hand-made
/// edit) rather than by the fleet, which a fleet reset must not clear (`fleet::mirror`).
#[derive(Clone, Default, Debug)]
pub struct ExpectedKillWrites {
    entries: Arc<std::sync::Mutex<Vec<(u64, String)>>>,
    next_id: Arc<std::sync::atomic::AtomicU64>,
    write_lock: Arc<tokio::sync::Mutex<()>>,
    local_hold: Arc<std::sync::atomic::AtomicBool>,
}

impl ExpectedKillWrites {
    /// Waits for any other kill-switch write of rollbackd's to finish; hold the guard
    /// across the decision and the write.
    pub async fn serialized(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.write_lock.lock().await
    }

    /// Whether the kill switch was turned on on this host (not by the fleet).
    pub fn local_hold(&self) -> bool {
        self.local_hold.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn set_local_hold(&self, hold: bool) {
        self.local_hold
            .store(hold, std::sync::atomic::Ordering::SeqCst);
    }

    /// Registers a write of `value` about to be made; the id withdraws it.
    pub fn register(&self, value: &str) -> u64 {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().push((id, value.to_owned()));
        id
    }

    /// Removes the entry `id` if it is still there (its write changed nothing, or failed).
    pub fn withdraw(&self, id: u64) {
        self.lock().retain(|(entry, _)| *entry != id);
    }

    /// An observed change to `value`: true (and the oldest entry for it consumed) when
    /// rollbackd made it.
    pub fn consume(&self, value: &str) -> bool {
        let mut entries = self.lock();
        match entries.iter().position(|(_, v)| v == value) {
            Some(position) => {
                entries.remove(position);
                true
            }
            None => false,
        }
    }

    /// How many writes are still expected to show up (for tests).
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, String)>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Everything an action needs; cheap to clone.
#[derive(Clone)]
pub struct ActionContext {
    pub config: Arc<LoadedConfig>,
    pub db: Db,
    pub recorder: Recorder,
    pub probe: Arc<dyn WorkerProbe>,
    pub hooks: Arc<dyn HookRunner>,
    pub clock: Arc<dyn Clock>,
    /// Where phase progress goes (manual commands stream it to the operator).
    pub progress: Option<mpsc::Sender<Reply>>,
    /// rollbackd's own kill-switch writes, not to be audited as external.
    pub kill_writes: ExpectedKillWrites,
}

impl ActionContext {
    async fn say(&self, message: String, detail: Value) {
        tracing::info!("{message}");
        if let Some(progress) = &self.progress {
            let _ = progress.send(Reply::Progress { message, detail }).await;
        }
    }
}

/// The durable part of an action, kept in `actions.detail_json` and updated as phases end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActionDetail {
    pub evidence: Evidence,
    pub error_rate: Option<f64>,
    pub failure_count: u32,
    pub emergency: bool,
    /// Phase name → seconds, for phases that finished.
    pub phases: Vec<(Phase, f64)>,
    /// Phases finished in the current attempt.
    pub completed: Vec<Phase>,
    /// Hook results (argv, exit, output tails, `attempt`; the first switch hook of a
    /// retried attempt also `waitedSeconds`, the backoff before it), newest last.
    pub hooks: Vec<Value>,
    /// The waits before retried attempts (`rollback.retry_backoff`, doubling): `attempt`
    /// (the one waited for), `waitedSeconds`, `after` (why the previous one failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retries: Vec<Value>,
    /// How many times this action was resumed after a restart.
    pub resumed: u32,
    /// The restored worker answered its probe before the switch.
    pub target_healthy_before: Option<bool>,
    pub config_hash: String,
    /// Every side effect is done; only the records remain (a resume writes just those).
    pub work_done: bool,
}

fn detail_of(row: &ActionRow) -> ActionDetail {
    row.detail_json
        .as_deref()
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or_default()
}

async fn save(
    ctx: &ActionContext,
    id: Option<ActionId>,
    state: ActionState,
    phase: Option<Phase>,
    attempt: u32,
    detail: &ActionDetail,
) {
    // Not recorded (no id): nothing to save it to.
    let Some(id) = id else { return };
    let detail_json = serde_json::to_string(detail).unwrap_or_default();
    let now = now_ms(ctx.clock.now());
    // The store is local; if it fails, the action still goes on (it matters more than its
    // bookkeeping) and the failure is in the journal.
    let result = ctx
        .db
        .call(move |store| {
            store.update_action(id, state, phase, attempt, Some(&detail_json), None, now)
        })
        .await;
    if let Err(err) = result {
        tracing::error!(action = id, "cannot record action progress: {err}");
    }
}

/// Records an action's intent in `rollbackd.db` before its first side effect, and for a
/// rollback its `rollback-started` line. Never fails: when the state database cannot be
/// written (a full disk), the action goes ahead without crash protection (no id) and
/// the journal says so — not acting would be worse.
pub async fn record_intent(
    db: &Db,
    recorder: &Recorder,
    now: SystemTime,
    new: NewAction,
) -> ActionRow {
    let insert = new.clone();
    let result = db
        .call(move |store| {
            let id = store.insert_action(&insert)?;
            store.action(id)
        })
        .await;
    let row = match result {
        Ok(Some(row)) => row,
        failed => {
            let err = match failed {
                Err(err) => err.to_string(),
                _ => "the inserted action was not found".into(),
            };
            tracing::error!(
                "cannot record the action's intent ({err}); acting without crash protection"
            );
            ActionRow {
                id: None,
                session_id: new.session_id,
                kind: new.kind,
                trigger: new.trigger,
                state: new.state,
                phase: None,
                attempt: 1,
                from_worker: new.from_worker,
                to_worker: new.to_worker,
                reason: new.reason,
                operator: new.operator,
                started_at_ms: new.started_at_ms,
                updated_at_ms: new.started_at_ms,
                finished_at_ms: None,
                artifact_name: None,
                detail_json: new.detail_json,
            }
        }
    };
    if row.kind == ActionKind::Rollback {
        recorder.audit(rollback_started(now, &row, false)).await;
    }
    row
}

/// The `rollback-started` line of an action (`resumed`: written by a restart that found
/// the intent without it).
pub fn rollback_started(now: SystemTime, row: &ActionRow, resumed: bool) -> AuditRecord {
    let mut audit = AuditRecord::of(
        now,
        row.session_id.as_deref(),
        &events::RollbackStarted {
            action_id: row.id,
            from: row.from_worker.clone(),
            to: row.to_worker.clone(),
            trigger: row.trigger,
            reason: row.reason.clone(),
            resumed: resumed.then_some(true),
        },
    );
    if let Some(operator) = &row.operator {
        audit = audit.operator(operator.clone());
    }
    audit
}

/// Runs (or resumes) the rollback recorded as `row`.
pub async fn rollback(ctx: ActionContext, row: ActionRow) -> ActionOutcome {
    let config = ctx.config.clone();
    let rb = &config.config.rollback;
    let mut detail = detail_of(&row);
    let resuming = row.state == ActionState::Running;
    if resuming {
        detail.resumed += 1;
        ctx.say(
            format!(
                "resuming rollback #{} at phase {} (attempt {})",
                row.id.unwrap_or_default(),
                row.phase.map_or("start", Phase::as_str),
                row.attempt
            ),
            json!({"phase": row.phase, "attempt": row.attempt}),
        )
        .await;
    }
    if resuming {
        settle_orphaned_hook(&ctx, &row, rb.hook_timeout).await;
    }
    let from = row.from_worker.clone().unwrap_or_default();
    let Some(to) = row.to_worker.clone().filter(|to| !to.is_empty()) else {
        return finish_failed(
            &ctx,
            &row,
            &mut detail,
            "no previous worker is known: nothing to roll back to".into(),
        )
        .await;
    };
    // Ids are checked where they come in; one read back from rollbackd.db is checked
    // again before it reaches a probe or a hook's argv.
    for (which, id) in [("previous", &to), ("active", &from)] {
        if let Err(problem) = crate::text::check_worker_id(id) {
            return finish_failed(
                &ctx,
                &row,
                &mut detail,
                format!("the recorded {which} worker is not usable: {problem}"),
            )
            .await;
        }
    }
    let vars = HookVars {
        from: from.clone(),
        to: to.clone(),
        reason: row.reason.clone(),
        operator: row.operator.clone().unwrap_or_else(|| "rollbackd".into()),
    };
    let started = Instant::now();
    let mut attempts = row.attempt.max(1);

    if !detail.work_done {
        // Probe the target first: never roll back into a dead worker without saying so.
        if detail.target_healthy_before.is_none() {
            let healthy = matches!(ctx.probe.probe(&to).await, ProbeOutcome::Ok);
            detail.target_healthy_before = Some(healthy);
            if !healthy {
                ctx.say(
                    format!("warning: the previous worker {to} does not answer its health probe; rolling back anyway (the canary is known bad)"),
                    json!({"target": to, "healthy": false}),
                )
                .await;
            }
        }

        let mut attempt = row.attempt.max(1);
        let mut phases_before_switch: Vec<(Phase, Option<&Vec<String>>)> =
            vec![(Phase::Pause, rb.pause_command.as_ref())];
        if !detail.emergency {
            phases_before_switch.push((Phase::Drain, rb.drain_command.as_ref()));
        }
        for (phase, hook) in phases_before_switch {
            if detail.completed.contains(&phase) {
                continue;
            }
            // Only a phase with a side effect needs its start marked for a resume.
            if hook.is_some() {
                save(
                    &ctx,
                    row.id,
                    ActionState::Running,
                    Some(phase),
                    attempt,
                    &detail,
                )
                .await;
            }
            let t = Instant::now();
            if let Some(template) = hook {
                let ok = run_phase_hook(
                    &ctx,
                    row.id,
                    phase,
                    template,
                    &vars,
                    rb.hook_timeout,
                    &mut detail,
                )
                .await
                .is_ok();
                mark_hook(&mut detail, attempt);
                if !ok {
                    ctx.say(
                        format!("{phase} hook failed; continuing the rollback"),
                        json!({"phase": phase}),
                    )
                    .await;
                }
            }
            let seconds = t.elapsed().as_secs_f64();
            push_phase(&mut detail, phase, seconds);
            ctx.say(
                format!("{phase}: done in {seconds:.3}s"),
                json!({"phase": phase, "seconds": seconds}),
            )
            .await;
        }

        let mut verified = false;
        let mut last_error = String::new();
        // Whether the last attempt failed in verification (the previous version answered
        // unhealthy) rather than in a hook.
        let mut verify_failed = false;
        while attempt <= rb.max_attempts {
            // switch
            if !detail.completed.contains(&Phase::Switch) {
                save(
                    &ctx,
                    row.id,
                    ActionState::Running,
                    Some(Phase::Switch),
                    attempt,
                    &detail,
                )
                .await;
                let t = Instant::now();
                let switched = match &rb.switch_command {
                    Some(template) => {
                        let ran = run_phase_hook(
                            &ctx,
                            row.id,
                            Phase::Switch,
                            template,
                            &vars,
                            rb.hook_timeout,
                            &mut detail,
                        )
                        .await;
                        mark_hook(&mut detail, attempt);
                        ran
                    }
                    None => Err("rollback.switch_command is not configured".into()),
                };
                let seconds = t.elapsed().as_secs_f64();
                push_phase(&mut detail, Phase::Switch, seconds);
                if let Err(why) = switched {
                    last_error = format!("{why} (attempt {attempt})");
                    verify_failed = false;
                    ctx.say(
                        format!("switch: failed on attempt {attempt} of {}", rb.max_attempts),
                        json!({"phase": "switch", "attempt": attempt, "ok": false}),
                    )
                    .await;
                    attempt += 1;
                    detail
                        .completed
                        .retain(|p| *p != Phase::Switch && *p != Phase::Verify);
                    back_off(&ctx, &row, &mut detail, attempt, &last_error).await;
                    continue;
                }
                ctx.say(
                    format!("switch: {from} → {to} in {seconds:.3}s"),
                    json!({"phase": "switch", "seconds": seconds}),
                )
                .await;
            }
            // verify
            save(
                &ctx,
                row.id,
                ActionState::Running,
                Some(Phase::Verify),
                attempt,
                &detail,
            )
            .await;
            let t = Instant::now();
            let outcome = verify(&ctx, &to, rb.verify_interval, rb.verify_timeout).await;
            let seconds = t.elapsed().as_secs_f64();
            push_phase(&mut detail, Phase::Verify, seconds);
            match outcome {
                Ok(()) => {
                    ctx.say(
                        format!("verify: {to} healthy after {seconds:.3}s"),
                        json!({"phase": "verify", "seconds": seconds}),
                    )
                    .await;
                    verified = true;
                    break;
                }
                Err(reason) => {
                    verify_failed = true;
                    last_error = format!(
                        "{to} not healthy after {}: {reason}",
                        crate::config::show(rb.verify_timeout)
                    );
                    ctx.say(
                        format!(
                            "verify: failed on attempt {attempt} of {}: {last_error}",
                            rb.max_attempts
                        ),
                        json!({"phase": "verify", "attempt": attempt, "ok": false}),
                    )
                    .await;
                    attempt += 1;
                    detail
                        .completed
                        .retain(|p| *p != Phase::Switch && *p != Phase::Verify);
                    back_off(&ctx, &row, &mut detail, attempt, &last_error).await;
                }
            }
        }
        if !verified {
            // "Previous version also unhealthy" only when the previous version was probed
            // and failed; a hook that failed or timed out says so, and that the previous
            // version was not judged.
            let reason = if verify_failed {
                format!("previous version also unhealthy: {last_error}")
            } else {
                format!("rollback could not be carried out: {last_error}; {to} was not verified")
            };
            return finish_failed(&ctx, &row, &mut detail, reason).await;
        }

        if !detail.completed.contains(&Phase::Resume) {
            if rb.resume_command.is_some() {
                save(
                    &ctx,
                    row.id,
                    ActionState::Running,
                    Some(Phase::Resume),
                    attempt,
                    &detail,
                )
                .await;
            }
            let t = Instant::now();
            if let Some(template) = &rb.resume_command {
                let resumed = run_phase_hook(
                    &ctx,
                    row.id,
                    Phase::Resume,
                    template,
                    &vars,
                    rb.hook_timeout,
                    &mut detail,
                )
                .await;
                mark_hook(&mut detail, attempt);
                if resumed.is_err() {
                    ctx.say(
                        "resume hook failed; the switch itself is verified".into(),
                        json!({"phase": "resume"}),
                    )
                    .await;
                }
            }
            let seconds = t.elapsed().as_secs_f64();
            push_phase(&mut detail, Phase::Resume, seconds);
            ctx.say(
                format!("resume: done in {seconds:.3}s"),
                json!({"phase": "resume", "seconds": seconds}),
            )
            .await;
        }

        // The workers swap places; the mirror follows.
        let (active, previous) = (to.clone(), from.clone());
        let result = ctx
            .db
            .call(move |store| {
                store.set_meta("active", &active)?;
                store.set_meta("previous", &previous)
            })
            .await;
        if let Err(err) = result {
            tracing::error!("cannot record the new active worker: {err}");
        }
        detail.work_done = true;
        // The attempt that succeeded: the artifact's `attempts` (a resume reads it back).
        save(
            &ctx,
            row.id,
            ActionState::Running,
            Some(Phase::Record),
            attempt,
            &detail,
        )
        .await;
        attempts = attempt;
    } else {
        ctx.say(
            "rollback finished before the restart; writing its records".into(),
            json!({}),
        )
        .await;
    }

    let now = ctx.clock.now();
    let name = artifact_name(ArtifactKind::Rollback, row.started_at_ms);
    let duration = (now_ms(now) - row.started_at_ms).max(0) as f64 / 1000.0;
    let mut record = decision_record(
        &ctx,
        &row,
        &detail,
        ArtifactKind::Rollback,
        DecisionStatus::Executed,
        Some(duration),
        None,
        attempts,
    );
    let report = incident_report(&ctx, &row, &detail, ActionState::Done, &name, now, None).await;
    record.incident = report.value();
    let artifact = ctx.recorder.artifact(name.clone(), record).await;
    let session_id = row.session_id.clone();
    ctx.recorder
        .worker_manager(WorkerManagerRecord {
            active: to.clone(),
            previous: Some(from.clone()),
            updated_at: rfc3339_millis(now),
            session_id: session_id.clone(),
            state: SessionState::RolledBack,
        })
        .await;
    let mut audit = AuditRecord::of(
        now,
        session_id.as_deref(),
        &events::RollbackExecuted {
            action_id: row.id,
            from: from.clone(),
            to: to.clone(),
            trigger: row.trigger,
            reason: row.reason.clone(),
            phases: phases_json(&detail),
            rollback_duration_seconds: duration,
            artifact: artifact.display().to_string(),
            resumed: detail.resumed,
            incident: report.path(),
            incident_summary: report.summary(),
        },
    );
    if let Some(operator) = &row.operator {
        audit = audit.operator(operator.clone());
    }
    if !(resuming
        && ctx
            .recorder
            .audit_has(row.id, AuditEvent::RollbackExecuted)
            .await)
    {
        ctx.recorder.audit(audit).await;
    }
    finish_row(&ctx, row.id, ActionState::Done, &name, &detail).await;
    let _ = started;
    ctx.say(
        format!(
            "rollback executed: {from} → {to}; artifact {}",
            artifact.display()
        ),
        json!({"artifact": artifact, "from": from, "to": to}),
    )
    .await;
    ActionOutcome::RolledBack { from, to, artifact }
}

async fn finish_failed(
    ctx: &ActionContext,
    row: &ActionRow,
    detail: &mut ActionDetail,
    reason: String,
) -> ActionOutcome {
    let now = ctx.clock.now();
    let name = artifact_name(ArtifactKind::Rollback, row.started_at_ms);
    let duration = (now_ms(now) - row.started_at_ms).max(0) as f64 / 1000.0;
    let max_attempts = ctx.config.config.rollback.max_attempts;
    let mut record = decision_record(
        ctx,
        row,
        detail,
        ArtifactKind::Rollback,
        DecisionStatus::Failed,
        Some(duration),
        Some(reason.clone()),
        max_attempts,
    );
    let report = incident_report(ctx, row, detail, ActionState::Failed, &name, now, None).await;
    record.incident = report.value();
    let artifact = ctx.recorder.artifact(name.clone(), record).await;
    let mut audit = AuditRecord::of(
        now,
        row.session_id.as_deref(),
        &events::RollbackFailed {
            action_id: row.id,
            from: row.from_worker.clone(),
            to: row.to_worker.clone(),
            trigger: row.trigger,
            reason: reason.clone(),
            phases: phases_json(detail),
            artifact: artifact.display().to_string(),
            incident: report.path(),
            incident_summary: report.summary(),
        },
    );
    if let Some(operator) = &row.operator {
        audit = audit.operator(operator.clone());
    }
    let resumed = row.state == ActionState::Running;
    if !(resumed
        && ctx
            .recorder
            .audit_has(row.id, AuditEvent::RollbackFailed)
            .await)
    {
        ctx.recorder.audit(audit).await;
    }
    detail.work_done = true;
    finish_row(ctx, row.id, ActionState::Failed, &name, detail).await;
    ctx.say(
        format!("rollback failed: {reason}"),
        json!({"artifact": artifact}),
    )
    .await;
    ActionOutcome::RollbackFailed { reason, artifact }
}

/// The incident report written at an action's end, if it could be.
struct Report(Option<(crate::core::incident::Incident, std::path::PathBuf)>);

impl Report {
    fn value(&self) -> Option<Value> {
        self.0
            .as_ref()
            .and_then(|(incident, _)| serde_json::to_value(incident).ok())
    }

    fn path(&self) -> Option<String> {
        self.0.as_ref().map(|(_, path)| path.display().to_string())
    }

    fn summary(&self) -> Option<String> {
        self.0
            .as_ref()
            .map(|(incident, _)| incident.summary.clone())
    }
}

/// Writes the incident report with this action as it is about to be recorded finished
/// (its row says so only after its audit lines, which carry the report's summary).
async fn incident_report(
    ctx: &ActionContext,
    row: &ActionRow,
    detail: &ActionDetail,
    state: ActionState,
    artifact_name: &str,
    now: SystemTime,
    kill_switch: Option<(bool, Option<String>)>,
) -> Report {
    let mut finished = row.clone();
    finished.state = state;
    finished.phase = None;
    finished.finished_at_ms = Some(now_ms(now));
    finished.artifact_name = Some(artifact_name.to_owned());
    finished.detail_json = serde_json::to_string(detail).ok();
    Report(
        crate::daemon::incident::write(
            &ctx.db,
            &ctx.recorder,
            &ctx.config,
            row.session_id.clone(),
            Some(finished),
            kill_switch,
            now,
        )
        .await,
    )
}

async fn finish_row(
    ctx: &ActionContext,
    id: Option<ActionId>,
    state: ActionState,
    name: &str,
    detail: &ActionDetail,
) {
    let Some(id) = id else { return };
    let detail_json = serde_json::to_string(detail).unwrap_or_default();
    let name = name.to_owned();
    let now = now_ms(ctx.clock.now());
    let result = ctx
        .db
        .call(move |store| {
            store.update_action(id, state, None, 0, Some(&detail_json), Some(&name), now)
        })
        .await;
    if let Err(err) = result {
        tracing::error!(action = id, "cannot mark the action finished: {err}");
    }
}

/// Marks the hook just run with the attempt it belonged to, and a retried attempt's switch
/// hook with the backoff waited before it.
fn mark_hook(detail: &mut ActionDetail, attempt: u32) {
    let waited = detail
        .retries
        .iter()
        .rev()
        .find(|r| r.get("attempt").and_then(Value::as_u64) == Some(u64::from(attempt)))
        .and_then(|r| r.get("waitedSeconds").cloned());
    if let Some(Value::Object(hook)) = detail.hooks.last_mut() {
        hook.insert("attempt".into(), json!(attempt));
        if hook.get("phase").and_then(Value::as_str) == Some(Phase::Switch.as_str()) {
            if let Some(waited) = waited {
                hook.insert("waitedSeconds".into(), waited);
            }
        }
    }
}

/// Before attempt `next` of a rollback (when there is one): waits
/// [`crate::config::retry_wait`] (`rollback.retry_backoff`, doubling, capped) and records
/// the wait in the action's detail, so the artifact and the incident report show it. A
/// switch that failed at once (a load balancer refusing a change mid-reload) gets time to
/// settle instead of three tries in 70 ms.
async fn back_off(
    ctx: &ActionContext,
    row: &ActionRow,
    detail: &mut ActionDetail,
    next: u32,
    after: &str,
) {
    let rb = &ctx.config.config.rollback;
    if next > rb.max_attempts {
        return;
    }
    let wait = crate::config::retry_wait(rb, next);
    let seconds = (wait.as_secs_f64() * 1000.0).round() / 1000.0;
    detail.retries.push(json!({
        "attempt": next,
        "waitedSeconds": seconds,
        "after": crate::core::check::truncate_raw(after),
    }));
    // Kept before the wait: a restart during it resumes at this attempt and keeps the record.
    save(
        ctx,
        row.id,
        ActionState::Running,
        Some(Phase::Switch),
        next,
        detail,
    )
    .await;
    ctx.say(
        format!(
            "retrying: attempt {next} of {} in {}",
            rb.max_attempts,
            crate::config::show(wait)
        ),
        json!({"attempt": next, "waitSeconds": seconds}),
    )
    .await;
    tokio::time::sleep(wait).await;
}

fn push_phase(detail: &mut ActionDetail, phase: Phase, seconds: f64) {
    let seconds = (seconds * 1000.0).round() / 1000.0;
    match detail.phases.iter_mut().find(|(p, _)| *p == phase) {
        Some(entry) => entry.1 = seconds,
        None => detail.phases.push((phase, seconds)),
    }
    if !detail.completed.contains(&phase) {
        detail.completed.push(phase);
    }
}

fn phases_json(detail: &ActionDetail) -> Value {
    let mut map = serde_json::Map::new();
    for (phase, seconds) in &detail.phases {
        map.insert(phase.as_str().to_owned(), json!(seconds));
    }
    Value::Object(map)
}

/// Runs a phase's hook; `Err` says what went wrong in words on-call can act on: the hook
/// failed (exit status or signal) or timed out, with the end of its stderr, or could not
/// be started.
async fn run_phase_hook(
    ctx: &ActionContext,
    action_id: Option<ActionId>,
    phase: Phase,
    template: &[String],
    vars: &HookVars,
    limit: Duration,
    detail: &mut ActionDetail,
) -> Result<(), String> {
    let outcome = run_tracked(ctx, action_id, phase, template, vars, limit).await;
    match outcome {
        Ok(outcome) => {
            let ok = outcome.succeeded();
            let mut value = serde_json::to_value(&outcome).unwrap_or(Value::Null);
            if let Value::Object(map) = &mut value {
                map.insert("phase".into(), json!(phase));
            }
            detail.hooks.push(value);
            if ok {
                return Ok(());
            }
            tracing::warn!(phase = %phase, exit = ?outcome.exit_code, timed_out = outcome.timed_out, stderr = %outcome.stderr_tail, "hook failed");
            let what = if outcome.timed_out {
                format!(
                    "{phase} hook timed out after {} and was killed",
                    crate::config::show(limit)
                )
            } else if let Some(code) = outcome.exit_code {
                format!("{phase} hook failed: exit status {code}")
            } else if let Some(signal) = outcome.signal {
                format!("{phase} hook failed: killed by signal {signal}")
            } else {
                format!("{phase} hook failed")
            };
            let tail = outcome.stderr_tail.trim();
            let tail: String = tail
                .chars()
                .rev()
                .take(300)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(if tail.is_empty() {
                what
            } else {
                format!("{what}; stderr: {tail}")
            })
        }
        Err(err) => {
            tracing::error!(phase = %phase, "hook could not run: {err}");
            detail
                .hooks
                .push(json!({"phase": phase, "error": err.to_string()}));
            Err(format!("{phase} hook could not run: {err}"))
        }
    }
}

/// Runs a hook with its run recorded in `rollbackd.db` (token before it starts, process
/// group right after, cleared when it is finished with), so that a restart after kill -9
/// can find it: see [`settle_orphaned_hook`]. Without crash protection (no `action_id`)
/// the hook just runs.
async fn run_tracked(
    ctx: &ActionContext,
    action_id: Option<ActionId>,
    phase: Phase,
    template: &[String],
    vars: &HookVars,
    limit: Duration,
) -> Result<crate::sys::hooks::HookOutcome, crate::sys::hooks::HookError> {
    let Some(action_id) = action_id else {
        return ctx.hooks.run(template, vars, limit, None).await;
    };
    let now = now_ms(ctx.clock.now());
    let run = store::HookRunRow {
        action_id,
        phase: phase.to_owned(),
        token: format!("{action_id}-{phase}-{now}-{}", std::process::id()),
        started_at_ms: now,
        boot_id: crate::sys::procs::boot_id(),
        pgid: None,
        leader_start_ticks: None,
    };
    let token = run.token.clone();
    let recorded = ctx.db.call(move |store| store.begin_hook_run(&run)).await;
    if let Err(err) = &recorded {
        // Not recorded: the hook runs all the same (a rollback matters more than its
        // bookkeeping); a restart would not find it.
        tracing::error!(
            action = action_id,
            phase = %phase,
            "cannot record the hook run: {err}"
        );
    }
    let (spawned_to, spawned) = tokio::sync::oneshot::channel();
    let tracking = crate::sys::hooks::Tracking {
        token,
        spawned: spawned_to,
    };
    let record_group = async {
        let Ok(spawned) = spawned.await else { return };
        if recorded.is_err() {
            return;
        }
        let result = ctx
            .db
            .call(move |store| {
                store.hook_spawned(action_id, spawned.pgid, spawned.leader_start_ticks)
            })
            .await;
        if let Err(err) = result {
            tracing::error!(
                action = action_id,
                "cannot record the hook's process group: {err}"
            );
        }
    };
    let (outcome, ()) = tokio::join!(
        ctx.hooks.run(template, vars, limit, Some(tracking)),
        record_group
    );
    if recorded.is_ok() {
        if let Err(err) = ctx
            .db
            .call(move |store| store.end_hook_run(action_id))
            .await
        {
            tracing::error!(action = action_id, "cannot clear the hook run: {err}");
        }
    }
    outcome
}

/// After a restart: if the action was running a hook when the daemon died, and any of its
/// processes still run, waits for them until the hook's own time limit (counted from when
/// it started) runs out, then stops them (SIGTERM, the kill grace, SIGKILL), and audits
/// what it found (`hook-orphaned`). Only then may the phase run again: two switch hooks at
/// once can leave the traffic nowhere.
async fn settle_orphaned_hook(ctx: &ActionContext, row: &ActionRow, limit: Duration) {
    use crate::sys::procs;
    use tokio::time::Instant;
    let Some(action_id) = row.id else { return };
    let run = match ctx.db.call(move |store| store.hook_run(action_id)).await {
        Ok(Some(run)) => run,
        Ok(None) => return,
        Err(err) => {
            tracing::error!(action = action_id, "cannot read the hook run: {err}");
            return;
        }
    };
    let same_boot = run.boot_id.is_some() && run.boot_id == procs::boot_id();
    let group = match (same_boot, run.pgid, run.leader_start_ticks) {
        (true, Some(pgid), Some(leader_start_ticks)) => Some(procs::Group {
            pgid,
            leader_start_ticks,
        }),
        _ => None,
    };
    let scan = {
        let token = run.token.clone();
        move || {
            let token = token.clone();
            async move {
                tokio::task::spawn_blocking(move || procs::hook_processes(&token, group))
                    .await
                    .unwrap_or_default()
            }
        }
    };
    let found = scan().await;
    if !found.is_empty() {
        let pids: Vec<i32> = found.iter().map(|proc| proc.pid).collect();
        let ran_for = Duration::from_millis(
            u64::try_from(now_ms(ctx.clock.now()) - run.started_at_ms).unwrap_or(0),
        );
        let left = limit.saturating_sub(ran_for);
        ctx.say(
            format!(
                "the {} hook started before the restart is still running (pids {pids:?}); \
                 waiting up to {} for it before running the phase again",
                run.phase,
                crate::config::show(left)
            ),
            json!({"phase": run.phase, "pids": pids}),
        )
        .await;
        let waited = Instant::now();
        let deadline = crate::sys::clock::deadline_tokio(waited, left);
        let mut remaining = found;
        while !remaining.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(ORPHAN_POLL).await;
            remaining = scan().await;
        }
        let mut outcome = "exited";
        if !remaining.is_empty() {
            outcome = "killed";
            for proc in &remaining {
                procs::signal(*proc, libc::SIGTERM);
            }
            let term_deadline = Instant::now() + crate::config::HOOK_TERM_GRACE;
            while !remaining.is_empty() && Instant::now() < term_deadline {
                tokio::time::sleep(ORPHAN_POLL).await;
                remaining = scan().await;
            }
            for proc in &remaining {
                procs::signal(*proc, libc::SIGKILL);
            }
            let kill_deadline = Instant::now() + ORPHAN_KILL_WAIT;
            while !remaining.is_empty() && Instant::now() < kill_deadline {
                tokio::time::sleep(ORPHAN_POLL).await;
                remaining = scan().await;
            }
            if !remaining.is_empty() {
                // Unkillable (uninterruptible sleep): going on is still better than a
                // rollback that never ends; on-call sees it in the record.
                outcome = "still-running";
            }
        }
        let seconds = waited.elapsed().as_secs_f64();
        tracing::warn!(action = action_id, phase = %run.phase, ?pids, outcome, "orphaned hook dealt with");
        let audit = AuditRecord::of(
            ctx.clock.now(),
            row.session_id.as_deref(),
            &events::HookOrphaned {
                action_id,
                phase: run.phase,
                pids,
                outcome: outcome.to_owned(),
                waited_seconds: (seconds * 1000.0).round() / 1000.0,
                known: match outcome {
                    "exited" => "the hook ended on its own; its exit status cannot be known (it was the dead daemon's child, not this one's), so whether it did its work is unknown: the phase runs again",
                    "killed" => "the hook outlived its time limit and was stopped (SIGTERM, then SIGKILL); it did not finish: the phase runs again",
                    _ => "the hook could not be stopped (uninterruptible); the phase runs again beside it",
                }
                .to_owned(),
            },
        );
        ctx.recorder.audit(audit).await;
        ctx.say(
            format!(
                "the orphaned {} hook {outcome} after {seconds:.1}s",
                run.phase
            ),
            json!({"phase": run.phase, "outcome": outcome}),
        )
        .await;
    }
    if let Err(err) = ctx
        .db
        .call(move |store| store.end_hook_run(action_id))
        .await
    {
        tracing::error!(action = action_id, "cannot clear the hook run: {err}");
    }
}

/// How often a restart looks whether an orphaned hook is gone.
const ORPHAN_POLL: Duration = Duration::from_millis(100);
/// How long after SIGKILL a restart waits for an orphaned hook's processes to go.
const ORPHAN_KILL_WAIT: Duration = Duration::from_secs(1);

/// Probes `worker` every `interval` until it is healthy or `timeout` has passed.
async fn verify(
    ctx: &ActionContext,
    worker: &str,
    interval: Duration,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = crate::sys::clock::deadline_tokio(tokio::time::Instant::now(), timeout);
    let mut last = String::from("no probe finished");
    loop {
        let attempt_started = tokio::time::Instant::now();
        match tokio::time::timeout_at(deadline, ctx.probe.probe(worker)).await {
            Ok(ProbeOutcome::Ok) => return Ok(()),
            Ok(ProbeOutcome::Failed { reason }) => last = reason,
            Err(_) => return Err(last),
        }
        let next = crate::sys::clock::deadline_tokio(attempt_started, interval);
        if next >= deadline {
            return Err(last);
        }
        tokio::time::sleep_until(next).await;
    }
}

#[allow(clippy::too_many_arguments)]
fn decision_record(
    ctx: &ActionContext,
    row: &ActionRow,
    detail: &ActionDetail,
    kind: ArtifactKind,
    status: DecisionStatus,
    duration: Option<f64>,
    error: Option<String>,
    attempts: u32,
) -> DecisionRecord {
    let trigger = row.trigger;
    let recommended = match (kind, status) {
        (ArtifactKind::Rollback, DecisionStatus::Failed) => "escalate: kill switch on, page on-call".to_owned(),
        (ArtifactKind::Rollback, _) => match trigger {
            Trigger::Automatic => "automatic rollback to previous worker".to_owned(),
            Trigger::Manual => "manual rollback to previous worker".to_owned(),
            Trigger::Emergency => "emergency rollback to previous worker (drain skipped)".to_owned(),
            Trigger::Fleet => "rollback to previous worker: another host of the fleet rolled this version back".to_owned(),
        },
        (ArtifactKind::Escalation, _) => {
            "kill switch on: apps use safe flag defaults; on-call investigates, then `rollbackd kill-switch reset`".to_owned()
        }
    };
    let mut phases = Phases::new();
    for (phase, seconds) in &detail.phases {
        phases.push(phase.as_str(), *seconds);
    }
    DecisionRecord {
        timestamp: rfc3339_millis(crate::core::time::from_ms(row.started_at_ms)),
        decision: kind,
        reason: row.reason.clone(),
        status,
        error_rate: detail.error_rate,
        failure_count: detail.failure_count,
        recommended_action: recommended,
        evidence: detail.evidence.clone(),
        from: row.from_worker.clone(),
        to: row.to_worker.clone(),
        trigger,
        operator: row.operator.clone(),
        phases,
        rollback_duration_seconds: duration,
        config_hash: if detail.config_hash.is_empty() {
            ctx.config.hash.clone()
        } else {
            detail.config_hash.clone()
        },
        session_id: row.session_id.clone(),
        attempts,
        error,
        incident: None,
    }
}

/// Runs (or resumes) the escalation recorded as `row`: kill switch on (waiting out a
/// locked database for as long as it takes), then the records.
pub async fn escalate(ctx: ActionContext, row: ActionRow) -> ActionOutcome {
    let mut detail = detail_of(&row);
    let config = ctx.config.clone();
    let ks = &config.config.kill_switch;
    if row.state == ActionState::Running {
        detail.resumed += 1;
    }
    save(
        &ctx,
        row.id,
        ActionState::Running,
        Some(Phase::KillSwitch),
        1,
        &detail,
    )
    .await;
    let t = Instant::now();
    // Never gives up (a missing database is retried too: the kill switch is delayed,
    // never dropped), so the result is always Ok.
    let previous = set_kill_switch(&ctx, ks, "1", Patience::Forever)
        .await
        .unwrap_or(None);
    push_phase(&mut detail, Phase::KillSwitch, t.elapsed().as_secs_f64());
    let now = ctx.clock.now();
    let name = artifact_name(ArtifactKind::Escalation, row.started_at_ms);
    let mut record = decision_record(
        &ctx,
        &row,
        &detail,
        ArtifactKind::Escalation,
        DecisionStatus::Executed,
        None,
        None,
        1,
    );
    let report = incident_report(
        &ctx,
        &row,
        &detail,
        ActionState::Done,
        &name,
        now,
        Some((true, Some("1".to_owned()))),
    )
    .await;
    record.incident = report.value();
    let artifact = ctx.recorder.artifact(name.clone(), record).await;
    let session_id = row.session_id.as_deref();
    let (kill_record, kill_audit) = crate::appdb::killswitch::records(
        now,
        &ks.key,
        "1",
        previous.as_deref(),
        if row.trigger == ActionTrigger::Automatic {
            KillSwitchSource::Automatic
        } else {
            KillSwitchSource::Manual
        },
        row.operator.as_deref(),
        &row.reason,
        session_id,
        row.id,
    );
    let mut escalation = AuditRecord::of(
        now,
        session_id,
        &events::EscalationTriggered {
            action_id: row.id,
            reason: row.reason.clone(),
            worker: row.from_worker.clone(),
            artifact: artifact.display().to_string(),
            incident: report.path(),
            incident_summary: report.summary(),
        },
    );
    if let Some(operator) = &row.operator {
        escalation = escalation.operator(operator.clone());
    }
    let resumed_and_recorded = row.state == ActionState::Running
        && ctx
            .recorder
            .audit_has(row.id, AuditEvent::EscalationTriggered)
            .await;
    if !resumed_and_recorded {
        ctx.recorder.audit(escalation).await;
        ctx.recorder.kill_switch(kill_record).await;
        ctx.recorder.audit(kill_audit).await;
    }
    detail.work_done = true;
    finish_row(&ctx, row.id, ActionState::Done, &name, &detail).await;
    ctx.say(
        format!(
            "escalated: {}=1 set; artifact {}",
            ks.key,
            artifact.display()
        ),
        json!({"artifact": artifact}),
    )
    .await;
    ActionOutcome::Escalated { artifact }
}

/// How [`set_kill_switch`] treats a database that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// Retry everything (escalation: the kill switch is delayed, never dropped).
    Forever,
    /// A missing database is returned at once (an operator's command: they get exit 1
    /// and the reason instead of a command that never ends).
    FailOnMissing,
}

/// Writes the kill switch until it lands; returns the previous value. Other errors than
/// busy (an unreadable file, a full disk) are retried too, with backoff, and logged: the
/// kill switch is delayed, never dropped. The write is registered in
/// [`ActionContext::kill_writes`] before it is made, and withdrawn when it changed nothing.
///
/// This is the host's own kill switch (escalation, `kill-switch set|reset`): a set holds
/// it on here, so that a fleet reset leaves it on; a reset that lands releases it. The
/// fleet mirror uses [`write_kill_switch`] under [`ExpectedKillWrites::serialized`].
pub async fn set_kill_switch(
    ctx: &ActionContext,
    ks: &crate::config::KillSwitchConfig,
    value: &str,
    patience: Patience,
) -> Result<Option<String>, crate::appdb::settings::SettingsError> {
    // Before waiting for the lock: a fleet reset deciding meanwhile already sees it.
    if value == "1" {
        ctx.kill_writes.set_local_hold(true);
    }
    let _serialized = ctx.kill_writes.serialized().await;
    let result = write_kill_switch(ctx, ks, value, patience).await;
    if value != "1" && result.is_ok() {
        ctx.kill_writes.set_local_hold(false);
    }
    result
}

/// [`set_kill_switch`] without the lock and the hold: the caller holds
/// [`ExpectedKillWrites::serialized`].
pub async fn write_kill_switch(
    ctx: &ActionContext,
    ks: &crate::config::KillSwitchConfig,
    value: &str,
    patience: Patience,
) -> Result<Option<String>, crate::appdb::settings::SettingsError> {
    let create = if ks.create_database {
        crate::appdb::settings::Create::IfMissing
    } else {
        crate::appdb::settings::Create::Never
    };
    let (db, key) = (ks.database.as_path(), ks.key.as_str());
    let expected = ctx.kill_writes.register(value);
    let mut backoff = Duration::from_millis(200);
    let mut failed_before = false;
    loop {
        let (db_path, key_owned, value_owned) =
            (db.to_path_buf(), key.to_owned(), value.to_owned());
        let progress = ctx.progress.clone();
        let result = tokio::task::spawn_blocking(move || {
            crate::appdb::killswitch::write(&db_path, &key_owned, &value_owned, create, |waited| {
                tracing::warn!(waited = ?waited, db = %db_path.display(), "kill switch: database busy, still waiting");
                // The operator waiting on `kill-switch set` hears it too (never blocks).
                if let Some(progress) = &progress {
                    let _ = progress.try_send(Reply::Progress {
                        message: format!(
                            "the database is busy; still waiting after {}",
                            crate::config::show(Duration::from_secs(waited.as_secs()))
                        ),
                        detail: json!({}),
                    });
                }
            })
        })
        .await
        .expect("kill switch write panicked");
        match result {
            Ok(report) => {
                tracing::info!(key, value, attempts = report.attempts, waited = ?report.waited, "kill switch written and read back");
                // A write that found the value already there changed nothing: no change
                // will be seen for it. (After a failed attempt an earlier commit may have
                // made the change, so the entry stays.)
                if !failed_before && report.previous.as_deref() == Some(value) {
                    ctx.kill_writes.withdraw(expected);
                }
                return Ok(report.previous);
            }
            Err(err @ crate::appdb::settings::SettingsError::Missing { .. })
                if patience == Patience::FailOnMissing =>
            {
                ctx.kill_writes.withdraw(expected);
                return Err(err);
            }
            Err(err) => {
                // A missing database committed nothing; other failures (a read-back
                // after COMMIT) may have made the change already.
                failed_before |=
                    !matches!(err, crate::appdb::settings::SettingsError::Missing { .. });
                tracing::error!(db = %db.display(), "kill switch write failed, retrying in {backoff:?}: {err}");
                ctx.say(
                    format!("kill switch write failed ({err}); retrying"),
                    json!({}),
                )
                .await;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ExpectedKillWrites;

    #[test]
    fn an_expected_write_is_consumed_once_and_a_withdrawn_one_swallows_nothing() {
        let expected = ExpectedKillWrites::default();
        let redundant = expected.register("1");
        // The write found '1' already there: withdrawn, so a later '1' is not ours.
        expected.withdraw(redundant);
        let reset = expected.register("0");
        assert!(expected.consume("0"), "the reset's own change");
        assert!(!expected.consume("0"), "consumed once");
        assert!(!expected.consume("1"), "a hand-made '1' is not rollbackd's");
        assert_eq!(expected.pending(), 0);
        expected.withdraw(reset); // already consumed: nothing happens
        let a = expected.register("1");
        let _b = expected.register("1");
        expected.withdraw(a);
        assert_eq!(expected.pending(), 1);
        assert!(expected.consume("1"));
    }
}
