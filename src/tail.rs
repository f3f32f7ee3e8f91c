//! Reading `audit.log` for humans: one line per event (local time, event, workers,
//! verdict, reason). Used by `rollbackd audit tail` and the demo.

use serde_json::Value;

/// Formats one audit record as a readable line; `None` if the line is not a JSON object.
pub fn format_line(line: &str, colour: bool) -> Option<String> {
    let value: Value = serde_json::from_str(line).ok()?;
    let object = value.as_object()?;
    let text = |key: &str| object.get(key).and_then(Value::as_str).map(str::to_owned);
    let event = text("event").unwrap_or_else(|| "?".into());
    let time = text("timestamp")
        .and_then(|t| humantime::parse_rfc3339_weak(&t).ok())
        .map(local_time)
        .unwrap_or_else(|| "????-??-?? ??:??:??".into());
    let mut parts: Vec<String> = Vec::new();
    match event.as_str() {
        "health-check" => {
            let verdict = text("verdict").unwrap_or_default();
            let rate = object
                .get("errorRate")
                .and_then(Value::as_f64)
                .map(|r| format!("{:.1}%", r * 100.0))
                .unwrap_or_else(|| text("errorClass").unwrap_or_else(|| "-".into()));
            parts.push(format!(
                "{} #{} verdict={} error={} probe={}",
                text("worker").unwrap_or_default(),
                object
                    .get("checkIndex")
                    .and_then(Value::as_i64)
                    .unwrap_or(-1),
                verdict,
                rate,
                text("probe").unwrap_or_default()
            ));
            if let Some(action) = text("action") {
                parts.push(format!("action={action}"));
            }
            if let Some(would) = text("wouldAct") {
                parts.push(format!("(dry run: would {would})"));
            }
        }
        "monitoring-started" | "monitoring-stopped" => {
            parts.push(format!(
                "active={} previous={}",
                text("active").unwrap_or_default(),
                text("previous").unwrap_or_else(|| "-".into())
            ));
            if let Some(state) = text("state") {
                parts.push(format!("state={state}"));
            }
        }
        "rollback-started" | "rollback-executed" | "rollback-failed" => {
            parts.push(format!(
                "{} → {} trigger={}",
                text("from").unwrap_or_default(),
                text("to").unwrap_or_default(),
                text("trigger").unwrap_or_default()
            ));
            if let Some(seconds) = object
                .get("rollbackDurationSeconds")
                .and_then(Value::as_f64)
            {
                parts.push(format!("in {seconds:.2}s"));
            }
        }
        "kill-switch-activated" | "kill-switch-reset" | "kill-switch-external" => {
            parts.push(format!(
                "{}={} (was {}) source={}",
                text("key").unwrap_or_default(),
                text("value").unwrap_or_default(),
                text("previous").unwrap_or_else(|| "unset".into()),
                text("source").unwrap_or_default()
            ));
        }
        _ => {}
    }
    if let Some(reason) = text("reason") {
        parts.push(format!("— {reason}"));
    }
    if let Some(artifact) = text("artifact") {
        parts.push(format!("[{artifact}]"));
    }
    if let Some(operator) = text("operator") {
        parts.push(format!("by {operator}"));
    }
    let event_shown = if colour {
        let code = match event.as_str() {
            "rollback-executed" | "escalation-triggered" | "kill-switch-activated" => "1;31",
            "rollback-failed" => "1;35",
            "rollback-started" | "kill-switch-external" => "33",
            "health-check" => match text("verdict").as_deref() {
                Some("healthy") => "32",
                Some("degraded") => "33",
                _ => "31",
            },
            _ => "36",
        };
        format!("\x1b[{code}m{event:<22}\x1b[0m")
    } else {
        format!("{event:<22}")
    };
    Some(format!("{time}  {event_shown} {}", parts.join(" ")))
}

/// Local time `YYYY-MM-DD HH:MM:SS` (from the TZ the C library knows).
fn local_time(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r writes into the tm we own; a zeroed tm is a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&secs, &mut tm).is_null() };
    if !ok {
        return humantime::format_rfc3339_seconds(t).to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_events_readably() {
        let line = r#"{"timestamp":"2025-10-22T14:32:15.123Z","event":"rollback-executed","sessionId":"s","from":"v2","to":"v1","trigger":"automatic","rollbackDurationSeconds":1.71,"reason":"High error rate","artifact":"/x/rollback_1.json"}"#;
        let text = format_line(line, false).unwrap();
        assert!(text.contains("rollback-executed"), "{text}");
        assert!(
            text.contains(
                "v2 → v1 trigger=automatic in 1.71s — High error rate [/x/rollback_1.json]"
            ),
            "{text}"
        );
        assert!(!text.contains('\x1b'));
        assert!(format_line(line, true).unwrap().contains("\x1b[1;31m"));
        assert_eq!(format_line("not json", false), None);
    }
}
