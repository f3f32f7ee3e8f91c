//! `status` without a daemon: what `rollbackd.db` and the application's settings table
//! say, as the same [`StatusReport`] a running daemon answers with.

use std::time::SystemTime;

use crate::config::LoadedConfig;
use crate::control::status::{CheckLine, SessionStatus, StatusReport, Workers};
use crate::daemon::stored_worker_id;
use crate::storage::audit::rfc3339_millis;
use crate::storage::store::{SessionState, Store, StoreError};

/// Reads the state read-only (no migration, no lock: a daemon may start meanwhile).
pub fn offline(loaded: &LoadedConfig) -> anyhow::Result<StatusReport> {
    let config = &loaded.config;
    let ks = &config.kill_switch;
    let kill =
        crate::appdb::killswitch::KillSwitchState::read(&ks.database, &ks.key, ks.create_database);
    let now = SystemTime::now();
    let (session, recent, active, previous) = match Store::open_read_only(&config.rollbackd_db()) {
        Ok(store) => {
            let session = store.current_session()?;
            let recent = match &session {
                Some(s) => store.recent_checks(&s.id, 10)?,
                None => Vec::new(),
            };
            (
                session,
                recent,
                stored_worker_id("active worker", store.get_meta("active")?),
                stored_worker_id("previous worker", store.get_meta("previous")?),
            )
        }
        Err(StoreError::NotFound(_)) => (None, Vec::new(), None, None),
        Err(err) => return Err(err.into()),
    };
    // A fresh host: the version `worker.active` declares is the one observed.
    let active = active.or_else(|| config.worker.active.clone());
    let session_status = session.as_ref().map(|s| {
        let promoted = crate::core::time::from_ms(s.promoted_at_ms);
        let age = now.duration_since(promoted).unwrap_or_default();
        // After a verified rollback (a stability record, whatever its result) the
        // restored version is the one serving, as the daemon has it.
        let watch: Option<crate::core::supervisor::Stability> = s
            .stability_json
            .as_deref()
            .and_then(|text| serde_json::from_str(text).ok());
        let (active, previous) = match &watch {
            Some(w) => (
                Some(w.restored.clone()),
                Some(w.from.clone()).filter(|f| !f.is_empty()),
            ),
            None => (Some(s.active.clone()), s.previous.clone()),
        };
        SessionStatus {
            id: s.id.clone(),
            state: s.state.as_str().into(),
            active: stored_worker_id("active worker of the session", active),
            previous: stored_worker_id("previous worker of the session", previous),
            promoted_at: rfc3339_millis(promoted),
            age_seconds: age.as_secs(),
            grace_left_seconds: (s.state == SessionState::Monitoring)
                .then(|| config.monitor.grace_period.saturating_sub(age).as_secs()),
            paused: s.paused,
            pause_reason: s.pause_reason.clone(),
            checks: None,
            verdict: recent.last().map(|c| c.verdict.clone()),
            reason: None,
            baseline: Some(crate::core::supervisor::baseline_summary(
                s.baseline_json
                    .as_deref()
                    .and_then(|text| serde_json::from_str(text).ok())
                    .as_ref(),
            )),
            stability: s
                .stability_json
                .as_deref()
                .and_then(|text| serde_json::from_str(text).ok())
                .map(|w| crate::daemon::incident::stability_status(&w, now)),
        }
    });
    let recent_checks = recent
        .iter()
        .map(|c| {
            let check: serde_json::Value =
                serde_json::from_str(&c.check_json).unwrap_or(serde_json::Value::Null);
            let probe = match check["probe"]["outcome"].as_str() {
                Some("failed") => format!(
                    "failed: {}",
                    check["probe"]["reason"].as_str().unwrap_or("")
                ),
                Some(other) => other.to_owned(),
                None => "?".into(),
            };
            CheckLine {
                at: rfc3339_millis(crate::core::time::from_ms(c.taken_at_ms)),
                index: u64::try_from(c.check_index).unwrap_or(0),
                verdict: c.verdict.clone(),
                probe,
                // Rows written before the records were all camelCase say `error_rate`.
                error_rate: check["snapshot"]["errorRate"]["value"]
                    .as_f64()
                    .or_else(|| check["snapshot"]["error_rate"]["value"].as_f64()),
                error_class: None,
            }
        })
        .collect();
    Ok(StatusReport {
        daemon: "not running".into(),
        state: session
            .as_ref()
            .map(|s| s.state.as_str().to_owned())
            .unwrap_or_else(|| "idle".into()),
        session: session_status,
        workers: Workers {
            active,
            previous,
            last_session_state: None,
        },
        kill_switch: kill.to_json(&ks.key),
        recent_checks,
        config_hash: loaded.hash.clone(),
        latest_incident: crate::daemon::incident::latest(&config.state_dir.join("analytics")),
        ..StatusReport::default()
    })
}
