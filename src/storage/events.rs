//! One struct per `audit.log` event: the fields each event carries, with their JSON names,
//! in one place. A record is made with [`AuditRecord::of`]; nothing else can add fields
//! to a line. The shapes are pinned by tests (here, in `audit`, and the system tests).
//!
//! `null` and absent are kept as the contract has them: a field that is always present
//! (`action` of a health check, `previous` of a kill-switch change) is an `Option`
//! serialised as `null`; a field that only some lines carry is skipped when `None`.

use serde::Serialize;
use serde_json::Value;

pub use super::audit::Event;
use super::audit::{AuditEvent, KillSwitchSource};
use super::states::{ActionTrigger, Phase, SessionState};

macro_rules! event {
    ($name:ident => $event:ident) => {
        impl Event for $name {
            fn event(&self) -> AuditEvent {
                AuditEvent::$event
            }
        }
    };
}

/// `monitoring-started`: a session began (or, recorded while no daemon ran, is picked up).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringStarted {
    pub active: String,
    pub previous: Option<String>,
    /// The operator's baseline (`null` when none was given).
    pub baseline: Value,
    pub grace_period_seconds: f64,
    pub config_hash: String,
    /// Always `false`: a restart that resumes a session writes no new start.
    pub resumed: bool,
}
event!(MonitoringStarted => MonitoringStarted);

/// `cannot-judge` / `judging-again`: a hold under `no_data_policy = "hold"` began or
/// ended.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Judgement {
    pub worker: String,
    pub check_index: u64,
    #[serde(skip)]
    pub judging: bool,
    pub reason: String,
}

impl Event for Judgement {
    fn event(&self) -> AuditEvent {
        if self.judging {
            AuditEvent::JudgingAgain
        } else {
            AuditEvent::CannotJudge
        }
    }
}

/// `health-check`: one check and what came of it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    pub check_index: u64,
    pub worker: String,
    pub verdict: String,
    /// The action this check started; `null` when none was (see `would_act`).
    pub action: Option<String>,
    pub error_rate: Option<f64>,
    pub error_class: String,
    /// `ok` or `failed`.
    pub probe: String,
    pub failure_pattern: String,
    pub rules: Vec<String>,
    /// The action the verdict asked for but that was not taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_act: Option<String>,
    /// Not taken because of a dry run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    /// Not taken for this reason (paused, an action in progress, escalated).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_taken: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paused: Option<bool>,
    /// The check before this one was void (rollbackd itself stalled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_void: Option<String>,
    /// A check of the restored version during the stability watch after a rollback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stability_watch: Option<bool>,
    /// For a check that was not healthy: why, and the raw check.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<Value>,
}
event!(HealthCheck => HealthCheck);

/// `rollback-started`: the intent is recorded; phases begin.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RollbackStarted {
    pub action_id: Option<i64>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub trigger: ActionTrigger,
    pub reason: String,
    /// Written by a restart that found the intent without its line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed: Option<bool>,
}
event!(RollbackStarted => RollbackStarted);

/// `rollback-executed`: switched back and verified.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RollbackExecuted {
    pub action_id: Option<i64>,
    pub from: String,
    pub to: String,
    pub trigger: ActionTrigger,
    pub reason: String,
    /// Phase name → seconds.
    pub phases: Value,
    pub rollback_duration_seconds: f64,
    pub artifact: String,
    /// How many restarts it was resumed through.
    pub resumed: u32,
    /// The incident report (`analytics/incident_<stamp>.md`) and its one-line summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident_summary: Option<String>,
}
event!(RollbackExecuted => RollbackExecuted);

/// `rollback-failed`: every attempt failed; an escalation follows.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RollbackFailed {
    pub action_id: Option<i64>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub trigger: ActionTrigger,
    pub reason: String,
    pub phases: Value,
    pub artifact: String,
    /// The incident report (`analytics/incident_<stamp>.md`) and its one-line summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident_summary: Option<String>,
}
event!(RollbackFailed => RollbackFailed);

/// `escalation-triggered`: the kill switch is set and a human is called.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EscalationTriggered {
    pub action_id: Option<i64>,
    pub reason: String,
    pub worker: Option<String>,
    pub artifact: String,
    /// The incident report (`analytics/incident_<stamp>.md`) and its one-line summary.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub incident_summary: Option<String>,
}
event!(EscalationTriggered => EscalationTriggered);

/// `kill-switch-activated`, `kill-switch-reset` or `kill-switch-external`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KillSwitchChanged {
    pub key: String,
    pub value: String,
    pub previous: Option<String>,
    pub source: KillSwitchSource,
    pub reason: String,
    /// The escalation that set it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action_id: Option<i64>,
}

impl Event for KillSwitchChanged {
    fn event(&self) -> AuditEvent {
        match (self.source, self.value == "1") {
            (KillSwitchSource::External, _) => AuditEvent::KillSwitchExternal,
            (_, true) => AuditEvent::KillSwitchActivated,
            (_, false) => AuditEvent::KillSwitchReset,
        }
    }
}

/// `monitoring-stopped`: the session ended.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringStopped {
    pub state: SessionState,
    pub reason: String,
    pub active: String,
    pub previous: Option<String>,
    pub checks: u64,
}
event!(MonitoringStopped => MonitoringStopped);

/// `stability-watch-started`: a verified rollback's restored version is now watched.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StabilityWatchStarted {
    /// The version rolled back to, now watched.
    pub restored: String,
    /// The version rolled back from.
    pub from: String,
    pub period_seconds: f64,
    /// The baseline the watch judges against (`null`: only the absolute rules).
    pub baseline: Value,
}
event!(StabilityWatchStarted => StabilityWatchStarted);

/// `stability-confirmed` / `stability-failed`: how the watch ended.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StabilityEnded {
    #[serde(skip)]
    pub confirmed: bool,
    pub restored: String,
    pub from: String,
    pub period_seconds: f64,
    /// Seconds from the start of the watch to its end.
    pub watched_seconds: f64,
    pub checks: u64,
    /// Why: the period passed, or the breach (the engine's reason).
    pub reason: String,
    /// The rules that fired (failed only).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
}

impl Event for StabilityEnded {
    fn event(&self) -> AuditEvent {
        if self.confirmed {
            AuditEvent::StabilityConfirmed
        } else {
            AuditEvent::StabilityFailed
        }
    }
}

/// `monitoring-paused` / `monitoring-resumed`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PauseChanged {
    #[serde(skip)]
    pub paused: bool,
    pub reason: Option<String>,
}

impl Event for PauseChanged {
    fn event(&self) -> AuditEvent {
        if self.paused {
            AuditEvent::MonitoringPaused
        } else {
            AuditEvent::MonitoringResumed
        }
    }
}

/// `config-reloaded`: a SIGHUP, applied whole (`ok`) or refused whole.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigReloaded {
    pub ok: bool,
    /// Why it was refused (names the key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The configuration in force after the reload.
    pub config_hash: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_config_hash: Option<String>,
}
event!(ConfigReloaded => ConfigReloaded);

/// `hook-orphaned`: after a restart, the dead daemon's hook was still running.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HookOrphaned {
    pub action_id: i64,
    pub phase: Phase,
    pub pids: Vec<i32>,
    /// `exited`, `killed` or `still-running`.
    pub outcome: String,
    pub waited_seconds: f64,
    /// What is known, and what is not: a hook of a dead daemon is not this daemon's child,
    /// so its exit status (whether it did its work) cannot be known; the phase runs again.
    pub known: String,
}
event!(HookOrphaned => HookOrphaned);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::audit::AuditRecord;
    use serde_json::json;

    fn line(record: &AuditRecord) -> Value {
        let mut value = serde_json::to_value(record).unwrap();
        value.as_object_mut().unwrap().remove("timestamp");
        value
    }

    #[test]
    fn a_healthy_check_keeps_action_null_and_leaves_the_rest_out() {
        let check = HealthCheck {
            check_index: 3,
            worker: "v2".into(),
            verdict: "healthy".into(),
            action: None,
            error_rate: Some(0.01),
            error_class: "ok".into(),
            probe: "ok".into(),
            failure_pattern: "none".into(),
            rules: vec![],
            would_act: None,
            dry_run: None,
            not_taken: None,
            paused: None,
            after_void: None,
            stability_watch: None,
            reason: None,
            check: None,
        };
        let record = AuditRecord::of(std::time::SystemTime::UNIX_EPOCH, Some("s"), &check);
        assert_eq!(
            line(&record),
            json!({"event": "health-check", "sessionId": "s", "checkIndex": 3, "worker": "v2",
                   "verdict": "healthy", "action": null, "errorRate": 0.01, "errorClass": "ok",
                   "probe": "ok", "failurePattern": "none", "rules": []})
        );
    }

    #[test]
    fn a_kill_switch_change_names_its_event_from_source_and_value() {
        let change = |value: &str, source| KillSwitchChanged {
            key: "DISABLE_NEW".into(),
            value: value.into(),
            previous: None,
            source,
            reason: "r".into(),
            action_id: None,
        };
        assert_eq!(
            change("1", KillSwitchSource::Automatic).event(),
            AuditEvent::KillSwitchActivated
        );
        assert_eq!(
            change("0", KillSwitchSource::Manual).event(),
            AuditEvent::KillSwitchReset
        );
        assert_eq!(
            change("1", KillSwitchSource::External).event(),
            AuditEvent::KillSwitchExternal
        );
        let record = AuditRecord::of(
            std::time::SystemTime::UNIX_EPOCH,
            None,
            &change("1", KillSwitchSource::Manual),
        );
        assert_eq!(
            line(&record),
            json!({"event": "kill-switch-activated", "sessionId": null, "key": "DISABLE_NEW",
                   "value": "1", "previous": null, "source": "manual", "reason": "r"})
        );
    }
}
