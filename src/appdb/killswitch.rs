//! The kill switch as an operation: write `'1'`/`'0'` under `kill_switch.key` until it
//! lands, check the reset precondition, and build the records that say who did it.
//! Shared by the daemon (automatic escalation, commands over the socket) and the CLI
//! (when no daemon runs).

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::appdb::settings::{Create, SettingsError, SettingsReader, SettingsStore, WriteReport};
use crate::storage::audit::{AuditRecord, KillSwitchAction, KillSwitchRecord, KillSwitchSource};
use crate::storage::store::{Store, StoreError};

/// Writes `value` under `key`, waiting out a busy or locked database for as long as it
/// takes. `on_wait(waited)` is called about every two seconds while waiting, so callers
/// can tell an operator or the journal. A missing database is
/// [`SettingsError::Missing`] unless `create` is [`Create::IfMissing`]
/// (`kill_switch.create_database`). Blocking: call it off the async runtime.
pub fn write(
    db: &Path,
    key: &str,
    value: &str,
    create: Create,
    mut on_wait: impl FnMut(Duration),
) -> Result<WriteReport, SettingsError> {
    let mut next_report = Duration::from_secs(2);
    let mut patience = |_: &SettingsError, waited: Duration| {
        if waited >= next_report {
            on_wait(waited);
            next_report = waited + Duration::from_secs(2);
        }
        true
    };
    let mut store = SettingsStore::open_with_patience(db, create, &mut patience)?;
    store.write_until_landed(key, value, &mut patience)
}

/// Reads the current value of `key` (`None`: no row, or no database yet), matching the
/// key as the writer does (`WHERE key = ?`, the table's collation).
pub fn read(db: &Path, key: &str) -> Result<Option<String>, SettingsError> {
    if !db.exists() {
        return Ok(None);
    }
    SettingsReader::open(db)?.read(key)
}

/// The kill switch as `status` shows it. A database that cannot be read is
/// [`KillSwitchState::Unknown`], never "off": an unreadable `DISABLE_NEW=1` is still on
/// for the application that can read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillSwitchState {
    /// Read: the row's value (`None`: no row, or no database yet when rollbackd may
    /// create it).
    Read(Option<String>),
    /// Could not be read; why.
    Unknown(String),
}

impl KillSwitchState {
    /// Reads the kill switch. A missing database is "no row" only when rollbackd may
    /// create it (`create_database`); otherwise it is unknown, since the application's
    /// database is supposed to be there.
    pub fn read(db: &Path, key: &str, create_database: bool) -> KillSwitchState {
        match std::fs::metadata(db) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return if create_database {
                    KillSwitchState::Read(None)
                } else {
                    KillSwitchState::Unknown(
                        SettingsError::Missing {
                            path: db.to_path_buf(),
                        }
                        .to_string(),
                    )
                };
            }
            Err(e) => {
                return KillSwitchState::Unknown(format!("cannot read {}: {e}", db.display()))
            }
            Ok(_) => {}
        }
        match read(db, key) {
            Ok(value) => KillSwitchState::Read(value),
            Err(e) => KillSwitchState::Unknown(format!("cannot read {}: {e}", db.display())),
        }
    }

    /// `Some(true)` on, `Some(false)` off, `None` unknown.
    pub fn on(&self) -> Option<bool> {
        match self {
            KillSwitchState::Read(value) => Some(value.as_deref() == Some("1")),
            KillSwitchState::Unknown(_) => None,
        }
    }

    /// The `killSwitch` object of `status --json` and `/status`:
    /// `{"key", "value", "on", "state": "on|off|unknown"}` plus `"error"` when unknown
    /// (then `value` and `on` are null: not known, not off).
    pub fn to_json(&self, key: &str) -> serde_json::Value {
        match self {
            KillSwitchState::Read(value) => {
                let on = value.as_deref() == Some("1");
                serde_json::json!({"key": key, "value": value, "on": on,
                                   "state": if on { "on" } else { "off" }})
            }
            KillSwitchState::Unknown(error) => serde_json::json!({
                "key": key, "value": null, "on": null, "state": "unknown", "error": error
            }),
        }
    }
}

/// Why a reset must be refused now, or `None` when it may go ahead: a check failed within
/// `quiet_period` according to the daemon's own database.
pub fn reset_refusal(
    rollbackd_db: &Path,
    quiet_period: Duration,
    now: SystemTime,
) -> Result<Option<String>, StoreError> {
    let store = match Store::open_read_only(rollbackd_db) {
        Ok(store) => store,
        Err(StoreError::NotFound(_)) => return Ok(None),
        Err(err) => return Err(err),
    };
    let Some(last_failed_ms) = store.last_failed_check_at()? else {
        return Ok(None);
    };
    let last_failed = crate::core::time::from_ms(last_failed_ms);
    let since = now.duration_since(last_failed).unwrap_or_default();
    if since >= quiet_period {
        return Ok(None);
    }
    let left = quiet_period - since;
    Ok(Some(format!(
        "a check failed {} ago ({}), inside the reset quiet period of {}; the kill switch stays on \
         for another {} unless you pass --force with a --reason",
        crate::config::show(Duration::from_secs(since.as_secs())),
        crate::storage::audit::rfc3339_millis(last_failed),
        crate::config::show(quiet_period),
        crate::config::show(Duration::from_secs(left.as_secs().max(1)))
    )))
}

/// The kill-switch log line and the audit line for one change.
#[allow(clippy::too_many_arguments)]
pub fn records(
    at: SystemTime,
    key: &str,
    value: &str,
    previous: Option<&str>,
    source: KillSwitchSource,
    operator: Option<&str>,
    reason: &str,
    session_id: Option<&str>,
    action_id: Option<i64>,
) -> (KillSwitchRecord, AuditRecord) {
    let action = if value == "1" {
        KillSwitchAction::Activated
    } else {
        KillSwitchAction::Reset
    };
    let kill_record = KillSwitchRecord {
        timestamp: crate::storage::audit::rfc3339_millis(at),
        action,
        value: value.to_owned(),
        source,
        operator: operator.map(str::to_owned),
        reason: reason.to_owned(),
        session_id: session_id.map(str::to_owned),
    };
    let mut audit = AuditRecord::of(
        at,
        session_id,
        &crate::storage::events::KillSwitchChanged {
            key: key.to_owned(),
            value: value.to_owned(),
            previous: previous.map(str::to_owned),
            source,
            reason: reason.to_owned(),
            action_id,
        },
    );
    if let Some(operator) = operator {
        audit = audit.operator(operator);
    }
    (kill_record, audit)
}
