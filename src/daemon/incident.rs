//! Writes the incident report (`core::incident`) of a session from what `rollbackd.db`
//! holds: after every rollback or escalation (by the executor, before its alert, so the
//! alert carries the summary and path) and again when the stability watch ends (by the
//! driver). The Markdown goes through the recorder like every record (atomic, retried on a
//! full disk); a failure to gather the facts is logged and never delays an action.

use std::path::PathBuf;
use std::time::SystemTime;

use crate::appdb::killswitch::KillSwitchState;
use crate::config::{FileOrigin, LoadedConfig};
use crate::core::incident::{ActionFacts, CheckFacts, Facts, Incident, SessionFacts};
use crate::daemon::db::Db;
use crate::daemon::recorder::Recorder;
use crate::storage::store::{ActionRow, CheckRow, IncidentRows, SessionRow, Store, StoreError};

/// `--config PATH` for the commands a report prints, when the configuration was named.
pub fn config_arg(config: &LoadedConfig) -> Option<String> {
    match &config.origin {
        FileOrigin::Named(path) => Some(path.display().to_string()),
        _ => None,
    }
}

/// The kill switch's value now, read from the application's database.
pub fn kill_switch_now(config: &LoadedConfig) -> (bool, Option<String>) {
    let ks = &config.config.kill_switch;
    match KillSwitchState::read(&ks.database, &ks.key, ks.create_database) {
        KillSwitchState::Read(value) => (true, value),
        KillSwitchState::Unknown(_) => (false, None),
    }
}

/// The facts of one incident from `store`: the session's, or (no session) one action's.
/// `patch` replaces the stored row of the same action (the executor's own, finished in
/// memory before its row is).
pub fn gather(
    store: &Store,
    session_id: Option<&str>,
    action_id: Option<i64>,
    patch: Option<&ActionRow>,
) -> Result<Option<IncidentRows>, StoreError> {
    let mut rows = match store.incident_facts(session_id, action_id)? {
        Some(rows) => rows,
        None => match patch {
            Some(_) => IncidentRows {
                session: None,
                checks: Vec::new(),
                actions: Vec::new(),
            },
            None => return Ok(None),
        },
    };
    if let Some(patch) = patch {
        match rows
            .actions
            .iter_mut()
            .find(|a| a.id.is_some() && a.id == patch.id)
        {
            Some(stored) => *stored = patch.clone(),
            None => rows.actions.push(patch.clone()),
        }
    }
    Ok(Some(rows))
}

/// A session row as the incident report reads it.
fn session_facts(s: SessionRow) -> SessionFacts {
    SessionFacts {
        baseline: s
            .baseline_json
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok()),
        stability: s
            .stability_json
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok()),
        id: s.id,
        promoted: s.active,
        previous: s.previous,
        promoted_at_ms: s.promoted_at_ms,
        state: s.state,
        ended_at_ms: s.ended_at_ms,
        end_reason: s.end_reason,
        operator: s.operator,
    }
}

/// A check row as the incident report reads it; `None` when its JSON does not parse.
fn check_facts(c: CheckRow) -> Option<CheckFacts> {
    Some(CheckFacts {
        index: c.check_index.max(0) as u64,
        taken_at_ms: c.taken_at_ms,
        result: serde_json::from_str(&c.check_json).ok()?,
        verdict: c.verdict,
        failed: c.failed,
    })
}

/// An action row as the incident report reads it.
fn action_facts(a: ActionRow) -> ActionFacts {
    ActionFacts {
        id: a.id,
        kind: a.kind,
        trigger: a.trigger,
        state: a.state,
        from: a.from_worker,
        to: a.to_worker,
        reason: a.reason,
        operator: a.operator,
        started_at_ms: a.started_at_ms,
        finished_at_ms: a.finished_at_ms,
        artifact: a.artifact_name,
        detail: a
            .detail_json
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or(serde_json::Value::Null),
    }
}

/// The report from gathered rows, made at `now`.
pub fn build(
    config: &LoadedConfig,
    analytics_dir: &std::path::Path,
    rows: IncidentRows,
    kill_switch: (bool, Option<String>),
    now: SystemTime,
) -> Incident {
    let ks = &config.config.kill_switch;
    let facts = Facts {
        session: rows.session.map(session_facts),
        checks: rows.checks.into_iter().filter_map(check_facts).collect(),
        actions: rows.actions.into_iter().map(action_facts).collect(),
        kill_switch_key: ks.key.clone(),
        kill_switch_known: kill_switch.0,
        kill_switch_value: kill_switch.1,
        reset_quiet_period: ks.reset_quiet_period,
        check_interval: config.config.monitor.check_interval,
        analytics_dir: analytics_dir.display().to_string(),
        config_arg: config_arg(config),
        generated_at_ms: crate::core::time::to_ms(now),
        utc_offset_seconds: crate::sys::clock::utc_offset_seconds(now),
    };
    Incident::of(&facts)
}

/// Gathers, builds and queues the report; `kill_switch`: the value when the caller knows
/// it (an escalation that just set it), else it is read. Returns the report and its path.
pub async fn write(
    db: &Db,
    recorder: &Recorder,
    config: &std::sync::Arc<LoadedConfig>,
    session_id: Option<String>,
    patch: Option<ActionRow>,
    kill_switch: Option<(bool, Option<String>)>,
    now: SystemTime,
) -> Option<(Incident, PathBuf)> {
    let action_id = patch.as_ref().and_then(|p| p.id);
    let sid = session_id.clone();
    let gathered = db
        .call(move |store| gather(store, sid.as_deref(), action_id, patch.as_ref()))
        .await;
    let rows = match gathered {
        Ok(Some(rows)) => rows,
        Ok(None) => return None,
        Err(err) => {
            tracing::error!(
                session = ?session_id,
                "cannot gather the incident report's facts from rollbackd.db: {err}"
            );
            return None;
        }
    };
    let kill_switch = match kill_switch {
        Some(known) => known,
        None => {
            let config = config.clone();
            tokio::task::spawn_blocking(move || kill_switch_now(&config))
                .await
                .unwrap_or((false, None))
        }
    };
    let incident = build(config, recorder.dir(), rows, kill_switch, now);
    let path = recorder
        .report(incident.file_name.clone(), incident.markdown())
        .await;
    tracing::info!(report = %path.display(), "incident report: {}", incident.summary);
    Some((incident, path))
}

/// After the stability watch: the report again, and its facts into each of the session's
/// decision records (read back from `analytics/`, rewritten atomically under their name).
pub async fn rewrite(
    db: &Db,
    recorder: &Recorder,
    config: &std::sync::Arc<LoadedConfig>,
    session_id: String,
    now: SystemTime,
) {
    let Some((incident, _)) = write(db, recorder, config, Some(session_id), None, None, now).await
    else {
        return;
    };
    let value = serde_json::to_value(&incident).unwrap_or_default();
    let names: Vec<String> = incident
        .actions
        .iter()
        .filter_map(|a| a.artifact.as_deref())
        .filter_map(|path| path.rsplit('/').next().map(str::to_owned))
        .collect();
    for name in names {
        let path = recorder.artifact_path(&name);
        let read = tokio::task::spawn_blocking(move || std::fs::read(&path)).await;
        let record = match read {
            Ok(Ok(bytes)) => {
                serde_json::from_slice::<crate::storage::audit::DecisionRecord>(&bytes)
            }
            _ => {
                tracing::warn!(artifact = %name, "cannot read the decision record to add the incident report to it");
                continue;
            }
        };
        match record {
            Ok(mut record) => {
                record.incident = Some(value.clone());
                recorder.artifact(name, record).await;
            }
            Err(err) => {
                tracing::warn!(artifact = %name, "the decision record is not readable ({err}); left as it is")
            }
        }
    }
}

/// The newest `incident_*.md` in `analytics_dir`, as `status` shows it:
/// `{"path": .., "summary": ..}` (the summary is the report's title line).
pub fn latest(analytics_dir: &std::path::Path) -> Option<serde_json::Value> {
    let newest = std::fs::read_dir(analytics_dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with("incident_") && name.ends_with(".md"))
        .max()?;
    let path = analytics_dir.join(&newest);
    let mut title = String::new();
    if let Ok(file) = std::fs::File::open(&path) {
        use std::io::{BufRead, Read};
        let _ = std::io::BufReader::new(file.take(4096)).read_line(&mut title);
    }
    let summary = crate::core::incident::markdown_plain(
        title
            .trim()
            .trim_start_matches("# Incident:")
            .trim_start_matches("# Incident")
            .trim(),
    );
    Some(serde_json::json!({"path": path.display().to_string(), "summary": summary}))
}

/// The watch for `status`: its record, and how long it has left while it runs.
pub fn stability_status(
    stability: &crate::core::supervisor::Stability,
    now: SystemTime,
) -> serde_json::Value {
    let mut value = serde_json::to_value(stability).unwrap_or_default();
    if stability.result.is_none() {
        let end = stability
            .started_at_ms
            .saturating_add((stability.period_seconds * 1000.0) as i64);
        let left = (end - crate::core::time::to_ms(now)).max(0) / 1000;
        value["leftSeconds"] = serde_json::json!(left);
    }
    value
}
