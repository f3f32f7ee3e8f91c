//! `status` as one type: what the daemon answers on the control socket and on `/status`,
//! what the CLI builds from `rollbackd.db` when no daemon runs, and how both are shown.
//! The JSON names are the contract (`status --json`, `/status`); tests pin them.

use std::io::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::text::{escape, Escaped};

/// The whole status. Fields only a running daemon knows are left out without one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StatusReport {
    /// `running` or `not running`.
    pub daemon: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// When the daemon started (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The session's state, or `idle`.
    pub state: String,
    pub session: Option<SessionStatus>,
    pub workers: Workers,
    /// The action in progress (a running daemon only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<ActionStatus>,
    /// `KillSwitchState::to_json`: `key`, `state`, `value`, `on`, or `error`.
    pub kill_switch: Value,
    pub recent_checks: Vec<CheckLine>,
    pub config_hash: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records_pending: Option<usize>,
    /// Between sessions (a running daemon only): the baseline a promotion would get now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_baseline: Option<String>,
    /// When and why the daemon wrote `rollbackd.db` back after it was deleted or replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_db_restored: Option<Value>,
    /// The newest incident report: `{"path": .., "summary": ..}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_incident: Option<Value>,
    /// `[fleet]` (a running daemon only): the link to etcd, the fleet kill switch as last
    /// seen and mirrored, the verdicts seen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SessionStatus {
    pub id: String,
    pub state: String,
    pub active: Option<String>,
    pub previous: Option<String>,
    pub promoted_at: String,
    pub age_seconds: u64,
    /// While monitoring: how much of the grace period is left.
    pub grace_left_seconds: Option<u64>,
    pub paused: bool,
    pub pause_reason: Option<String>,
    /// Checks taken in the session (a running daemon only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks: Option<u64>,
    pub verdict: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The session's baseline and where it came from, or that it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<String>,
    /// The stability watch after a rollback (`core::supervisor::Stability`), with
    /// `leftSeconds` while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stability: Option<Value>,
}

/// The workers, also between sessions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Workers {
    pub active: Option<String>,
    pub previous: Option<String>,
    /// How the last session ended, when the workers are that session's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_session_state: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ActionStatus {
    /// `None` when its intent could not be recorded.
    pub id: Option<i64>,
    pub kind: String,
}

/// One recent check.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct CheckLine {
    pub at: String,
    pub index: u64,
    pub verdict: String,
    pub probe: String,
    pub error_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
}

impl StatusReport {
    /// The active and previous worker: the session's, else the last known.
    pub fn workers(&self) -> (Option<String>, Option<String>) {
        let session = self.session.as_ref();
        (
            session
                .and_then(|s| s.active.clone())
                .or_else(|| self.workers.active.clone()),
            session
                .and_then(|s| s.previous.clone())
                .or_else(|| self.workers.previous.clone()),
        )
    }

    /// The human form of `rollbackd status`. Every text that came from outside is escaped
    /// (see [`crate::text`]).
    pub fn render(&self, out: &mut impl Write) -> std::io::Result<()> {
        let daemon = escape(&self.daemon);
        match self.pid {
            Some(pid) => writeln!(
                out,
                "rollbackd    {daemon} (pid {pid}, since {})",
                shown(&self.since, "?")
            )?,
            None => writeln!(out, "rollbackd    {daemon}")?,
        }
        if let Some(session) = &self.session {
            writeln!(
                out,
                "session      {}  {}",
                escape(&session.id),
                escape(&session.state)
            )?;
            writeln!(
                out,
                "workers      active {}  previous {}",
                shown(&session.active, "?"),
                shown(&session.previous, "-")
            )?;
            let grace = match session.grace_left_seconds {
                Some(left) => format!(
                    ", grace period left {}",
                    crate::core::time::show(Duration::from_secs(left))
                ),
                None => String::new(),
            };
            writeln!(
                out,
                "age          {}{grace}",
                crate::core::time::show(Duration::from_secs(session.age_seconds))
            )?;
            if session.paused {
                writeln!(
                    out,
                    "paused       yes ({})",
                    shown(&session.pause_reason, "no reason given")
                )?;
            }
            if let Some(baseline) = &session.baseline {
                writeln!(out, "baseline     {}", Escaped(baseline))?;
            }
            if let Some(watch) = &session.stability {
                let restored = escape(watch["restored"].as_str().unwrap_or("?")).into_owned();
                let line = match (watch["result"].as_str(), watch["leftSeconds"].as_u64()) {
                    (Some(result), _) => format!("{restored}: {}", escape(result)),
                    (None, Some(left)) => format!(
                        "watching {restored}, {} left",
                        crate::core::time::show(Duration::from_secs(left))
                    ),
                    (None, None) => format!("watching {restored}"),
                };
                writeln!(out, "stability    {line}")?;
            }
            if let Some(verdict) = &session.verdict {
                let verdict = Escaped(verdict);
                match &session.reason {
                    Some(reason) => writeln!(out, "verdict      {verdict} — {}", Escaped(reason))?,
                    None => writeln!(out, "verdict      {verdict}")?,
                }
            }
        } else {
            writeln!(out, "session      none (waiting for `rollbackd promote`)")?;
            if self.workers.active.is_some() {
                writeln!(
                    out,
                    "workers      active {}  previous {}",
                    shown(&self.workers.active, "?"),
                    shown(&self.workers.previous, "-")
                )?;
            }
            match &self.workers.active {
                Some(_) => writeln!(
                    out,
                    "observing    {} between sessions, for the next promotion's baseline",
                    shown(&self.workers.active, "?")
                )?,
                None => writeln!(
                    out,
                    "observing    nothing: no active version is known yet (declare it with [worker] active = \"ID\", or promote one)"
                )?,
            }
            if let Some(baseline) = &self.next_baseline {
                writeln!(out, "next baseline {}", Escaped(baseline))?;
            }
        }
        if let Some(action) = &self.action {
            let id = action.id.map(|id| format!(" #{id}")).unwrap_or_default();
            writeln!(out, "action       {}{id} in progress", escape(&action.kind))?;
        }
        let kill = &self.kill_switch;
        let text = |value: &Value, default: &'static str| -> String {
            escape(value.as_str().unwrap_or(default)).into_owned()
        };
        let kill_key = text(&kill["key"], "DISABLE_NEW");
        if kill["state"] == "unknown" {
            // Loud on purpose: an unreadable DISABLE_NEW=1 is still on for the application.
            writeln!(
                out,
                "kill switch  {kill_key}: UNKNOWN ({})",
                text(&kill["error"], "cannot read the database")
            )?;
        } else {
            writeln!(
                out,
                "kill switch  {kill_key}={} ({})",
                text(&kill["value"], "unset"),
                if kill["on"].as_bool() == Some(true) {
                    "ON: apps use safe defaults"
                } else {
                    "off"
                }
            )?;
        }
        if let Some(incident) = &self.latest_incident {
            writeln!(
                out,
                "incident     {}",
                escape(incident["summary"].as_str().unwrap_or(""))
            )?;
            writeln!(
                out,
                "             {} (`rollbackd report latest`)",
                escape(incident["path"].as_str().unwrap_or("?"))
            )?;
        }
        if let Some(fleet) = &self.fleet {
            render_fleet(fleet, out)?;
        }
        if !self.recent_checks.is_empty() {
            writeln!(out, "recent checks")?;
            writeln!(
                out,
                "  {:<24} {:>5}  {:<9} {:>7}  probe",
                "time", "#", "verdict", "error"
            )?;
            let skip = self.recent_checks.len().saturating_sub(10);
            for check in &self.recent_checks[skip..] {
                let rate = check
                    .error_rate
                    .map(|r| format!("{:.1}%", r * 100.0))
                    .unwrap_or_else(|| shown(&check.error_class, "-"));
                writeln!(
                    out,
                    "  {:<24} {:>5}  {:<9} {:>7}  {}",
                    escape(&check.at),
                    check.index,
                    escape(&check.verdict),
                    rate,
                    escape(&check.probe)
                )?;
            }
        }
        Ok(())
    }
}

/// The `fleet` lines of `status`: loud when cut off from etcd.
fn render_fleet(fleet: &Value, out: &mut impl Write) -> std::io::Result<()> {
    let text = |value: &Value, default: &'static str| -> String {
        escape(value.as_str().unwrap_or(default)).into_owned()
    };
    let host = text(&fleet["host"], "?");
    match fleet["link"].as_str() {
        Some("connected") => writeln!(
            out,
            "fleet        host {host}: connected to etcd since {}",
            text(&fleet["linkSince"], "?")
        )?,
        Some("partitioned") => writeln!(
            out,
            "fleet        host {host}: CUT OFF from etcd since {} ({}; {} attempts); keeping the last fleet values seen, the local guard is unaffected",
            text(&fleet["linkSince"], "?"),
            text(&fleet["linkError"], "no reason"),
            fleet["failures"].as_u64().unwrap_or(0)
        )?,
        _ => writeln!(out, "fleet        host {host}: connecting to etcd")?,
    }
    let kill = &fleet["killSwitch"];
    if kill.is_object() {
        writeln!(
            out,
            "fleet kill   {} (by {} at {}: {}){}",
            if kill["on"].as_bool() == Some(true) {
                "ON"
            } else {
                "off"
            },
            text(&kill["operator"], "?"),
            text(&kill["at"], "?"),
            text(&kill["reason"], ""),
            if fleet["localHold"].as_bool() == Some(true) {
                "; this host's kill switch was set here and stays on until reset here"
            } else {
                ""
            }
        )?;
    } else if fleet["link"] == "connected" {
        writeln!(out, "fleet kill   off (never set)")?;
    }
    if let Some(why) = fleet["resetHeld"].as_str() {
        writeln!(
            out,
            "fleet reset  held here until this host's reset quiet period ends: {}",
            escape(why)
        )?;
    }
    let count = fleet["verdictCount"].as_u64().unwrap_or(0);
    if count > 0 {
        writeln!(
            out,
            "verdicts     {count} in etcd for {} versions (`rollbackd fleet status` lists them){}",
            fleet["verdictVersions"].as_u64().unwrap_or(0),
            if fleet["verdicts"].as_array().is_some_and(|v| !v.is_empty()) {
                "; about the versions this host runs:"
            } else {
                "; none about the versions this host runs"
            }
        )?;
    }
    if let Some(verdicts) = fleet["verdicts"].as_array() {
        for verdict in verdicts {
            writeln!(
                out,
                "verdict      {} rolled back on {}: {}",
                text(&verdict["version"], "?"),
                text(&verdict["host"], "?"),
                text(&verdict["reason"], "")
            )?;
        }
    }
    let unusable_count = fleet["unusableCount"].as_u64().unwrap_or(0);
    let unusable_listed = fleet["unusableVerdicts"].as_array().map_or(0, Vec::len) as u64;
    if unusable_count > unusable_listed {
        writeln!(
            out,
            "verdict      UNUSABLE: {unusable_count} keys under verdicts/ cannot be used (the first {unusable_listed} below; `rollbackd fleet status` lists them all)"
        )?;
    }
    if let Some(unusable) = fleet["unusableVerdicts"].as_array() {
        for entry in unusable {
            writeln!(
                out,
                "verdict      UNUSABLE at {}: {} (refuses a promotion of {})",
                text(&entry["key"], "?"),
                text(&entry["error"], "?"),
                text(&entry["version"], "?")
            )?;
        }
    }
    Ok(())
}

fn shown(value: &Option<String>, default: &str) -> String {
    escape(value.as_deref().unwrap_or(default)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_json_names_are_pinned_and_offline_fields_are_left_out() {
        let report = StatusReport {
            daemon: "not running".into(),
            state: "monitoring".into(),
            session: Some(SessionStatus {
                id: "s1".into(),
                state: "monitoring".into(),
                active: Some("v2".into()),
                previous: Some("v1".into()),
                promoted_at: "2026-12-03T10:00:00.000Z".into(),
                age_seconds: 30,
                grace_left_seconds: Some(90),
                verdict: Some("healthy".into()),
                ..SessionStatus::default()
            }),
            workers: Workers {
                active: Some("v2".into()),
                previous: Some("v1".into()),
                last_session_state: None,
            },
            kill_switch: json!({"key": "DISABLE_NEW", "state": "set", "value": "0", "on": false}),
            recent_checks: vec![CheckLine {
                at: "2026-12-03T10:00:30.000Z".into(),
                index: 1,
                verdict: "healthy".into(),
                probe: "ok".into(),
                error_rate: Some(0.01),
                error_class: None,
            }],
            config_hash: "abc".into(),
            ..StatusReport::default()
        };
        let value = serde_json::to_value(&report).unwrap();
        assert_eq!(
            value,
            json!({
                "daemon": "not running", "state": "monitoring",
                "session": {"id": "s1", "state": "monitoring", "active": "v2", "previous": "v1",
                    "promotedAt": "2026-12-03T10:00:00.000Z", "ageSeconds": 30,
                    "graceLeftSeconds": 90, "paused": false, "pauseReason": null,
                    "verdict": "healthy"},
                "workers": {"active": "v2", "previous": "v1"},
                "killSwitch": {"key": "DISABLE_NEW", "state": "set", "value": "0", "on": false},
                "recentChecks": [{"at": "2026-12-03T10:00:30.000Z", "index": 1,
                    "verdict": "healthy", "probe": "ok", "errorRate": 0.01}],
                "configHash": "abc"
            })
        );
        let back: StatusReport = serde_json::from_value(value).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn rendering_escapes_what_came_from_outside() {
        let report = StatusReport {
            daemon: "running".into(),
            pid: Some(42),
            since: Some("2026-12-03T10:00:00.000Z".into()),
            state: "idle".into(),
            action: Some(ActionStatus {
                id: None,
                kind: "rollback".into(),
            }),
            kill_switch: json!({"key": "DISABLE_NEW", "state": "unknown", "error": "locked\u{1b}[2J"}),
            recent_checks: vec![CheckLine {
                probe: "failed: \u{1b}]0;PWNED\u{7}".into(),
                ..CheckLine::default()
            }],
            ..StatusReport::default()
        };
        let mut out = Vec::new();
        report.render(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("rollbackd    running (pid 42, since 2026-12-03T10:00:00.000Z)"));
        assert!(text.contains("action       rollback in progress"), "{text}");
        assert!(text.contains("DISABLE_NEW: UNKNOWN (locked"), "{text}");
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{text}"
        );
    }
}
