//! Bodies of `rollbackd flags get KEY` and `rollbackd flags watch [--db PATH] [--json]`.
//!
//! Plain functions over a writer, so the CLI wiring (clap, config resolution, exit
//! statuses) stays in `main` and these can be tested against a buffer. Both only read
//! the application's database, through [`crate::appdb::flags`].
//!
//! `flags watch` prints the initial state, then exactly one line per changed key, each
//! flushed at once so `| grep` and `| jq` see it immediately. When the database cannot
//! be read, one line says so and one more says when it can be read again.

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use crate::appdb::flags::{
    changes, read_once, FlagChange, FlagsSnapshot, LiveFlags, LiveFlagsOptions,
};
use crate::text::Escaped;

/// Where the effective value of a flag comes from (`flags get --json`'s `source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// The row's value.
    Row,
    /// The safe default: there is no row.
    Default,
    /// The safe default because the kill switch is on (whatever the row says).
    KillSwitch,
    /// No value at all: no row and no safe default (or kill switch on, no default).
    None,
}

/// `flags get --json`: `{"key","value","source","row","killSwitch"}`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GetLine<'a> {
    key: &'a str,
    value: Option<&'a str>,
    source: Source,
    row: Option<&'a str>,
    kill_switch: bool,
}

/// How `flags get` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GetFormat {
    /// One JSON object on `out` instead of the value alone.
    pub json: bool,
    /// The sentence saying why (safe default, kill switch) on `err`.
    pub explain: bool,
}

/// `flags get KEY`: the effective value alone on `out` (for scripts: `$(rollbackd flags
/// get KEY)`), or one JSON object with `format.json`. The sentence saying why goes to
/// `err` with `format.explain`, and always when there is no value (so a human sees why
/// nothing was printed). Returns whether the flag has a value: the CLI exits 1 when it
/// has none, and 1 too (with the reason) when the database cannot be read.
pub fn flags_get(
    db: &Path,
    key: &str,
    options: &LiveFlagsOptions,
    format: GetFormat,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> anyhow::Result<bool> {
    let rows = read_once(db, &options.kill_key)
        .with_context(|| format!("reading flags from {}", db.display()))?;
    let snapshot = FlagsSnapshot {
        rows,
        version: 0,
        error: None,
    };
    let effective = snapshot.effective(key, options);
    let row = snapshot.rows.get(key).map(String::as_str);
    let killed = snapshot.killed(&options.kill_key);
    let source = match (&effective, row) {
        (None, _) => Source::None,
        (Some(_), _) if key != options.kill_key && killed => Source::KillSwitch,
        (Some(_), Some(_)) => Source::Row,
        (Some(_), None) => Source::Default,
    };
    if format.json {
        let line = GetLine {
            key,
            value: effective.as_deref(),
            source,
            row,
            kill_switch: killed,
        };
        writeln!(out, "{}", serde_json::to_string(&line)?)?;
    } else if let Some(value) = &effective {
        writeln!(out, "{value}")?;
    }
    out.flush()?;
    if format.explain || effective.is_none() {
        writeln!(err, "{}", describe_effective(&snapshot, key, options))?;
        err.flush()?;
    }
    Ok(effective.is_some())
}

/// `KEY=value (why)` for `flags get --explain`.
fn describe_effective(snapshot: &FlagsSnapshot, key: &str, options: &LiveFlagsOptions) -> String {
    let kill_key = &options.kill_key;
    let row = snapshot.rows.get(key);
    let effective = snapshot.effective(key, options);
    let shown = match &effective {
        Some(value) => format!("{key}={value}"),
        None => format!("{key} unset"),
    };
    let row_text = match row {
        Some(value) => format!("row value {value:?}"),
        None => "no row".to_string(),
    };
    if key != kill_key && snapshot.killed(kill_key) {
        return match effective {
            Some(_) => format!("{shown} (safe default: kill switch {kill_key}=1 is ON; {row_text})"),
            None => format!("{shown} (kill switch {kill_key}=1 is ON and {key} has no safe default; {row_text})"),
        };
    }
    match (row, effective) {
        (Some(_), _) => shown,
        (None, Some(_)) => format!("{shown} (safe default: no row in settings)"),
        (None, None) => format!("{shown} (no row in settings and no safe default)"),
    }
}

/// Watches the database until `stop` resolves: the initial state, then one line per
/// changed key (human or JSON lines).
pub async fn flags_watch(
    db: &Path,
    options: LiveFlagsOptions,
    json: bool,
    out: &mut (dyn Write + Send),
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let db_for_start = db.to_path_buf();
    // LiveFlags::start reads the table once: file I/O, so off the async threads.
    let flags = tokio::task::spawn_blocking(move || LiveFlags::start(db_for_start, options))
        .await
        .context("starting LiveFlags")?;
    let options = flags.options().clone();
    let mut snapshots = flags.subscribe();
    let mut last: Arc<FlagsSnapshot> = snapshots.borrow_and_update().clone();
    let printer = LinePrinter {
        json,
        options: &options,
    };
    printer.initial(out, db, &last)?;

    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    anyhow::bail!("LiveFlags stopped unexpectedly");
                }
                let new = snapshots.borrow_and_update().clone();
                printer.transition(out, &last, &new)?;
                last = new;
            }
        }
    }
    // Joining the poller thread may wait for its current poll: off the async threads.
    tokio::task::spawn_blocking(move || drop(flags))
        .await
        .context("stopping LiveFlags")?;
    Ok(())
}

/// One `flags watch --json` line about a key, fields in this order:
/// `{"timestamp","key","value","previous","effective","killSwitch"}`; the lines of the
/// initial state add `"initial": true`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct KeyLine<'a> {
    timestamp: &'a str,
    key: &'a str,
    value: Option<&'a str>,
    previous: Option<&'a str>,
    effective: Option<String>,
    kill_switch: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    initial: bool,
}

impl KeyLine<'_> {
    fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a KeyLine always serializes")
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

struct LinePrinter<'a> {
    json: bool,
    options: &'a LiveFlagsOptions,
}

impl LinePrinter<'_> {
    fn initial(
        &self,
        out: &mut dyn Write,
        db: &Path,
        snapshot: &FlagsSnapshot,
    ) -> anyhow::Result<()> {
        let timestamp = now_rfc3339();
        let killed = snapshot.killed(&self.options.kill_key);
        if self.json {
            for (key, value) in &snapshot.rows {
                let line = KeyLine {
                    timestamp: &timestamp,
                    key,
                    value: Some(value),
                    previous: None,
                    effective: snapshot.effective(key, self.options),
                    kill_switch: killed,
                    initial: true,
                };
                writeln!(out, "{}", line.to_json())?;
            }
            if let Some(error) = &snapshot.error {
                writeln!(out, "{}", json!({"timestamp": timestamp, "error": error}))?;
            }
        } else {
            let kill_state = if snapshot.error.is_some() {
                // Never "off" for a database that could not be read.
                "UNKNOWN: the database cannot be read"
            } else if killed {
                "ON: flags use safe defaults"
            } else {
                "off"
            };
            writeln!(
                out,
                "{timestamp} watching {} ({} rows; kill switch {} {kill_state})",
                db.display(),
                snapshot.rows.len(),
                self.options.kill_key,
            )?;
            for (key, value) in &snapshot.rows {
                let effective = snapshot.effective(key, self.options);
                // Rows are the application's: shown escaped (see crate::text).
                let (key, value_shown) = (Escaped(key), Escaped(value));
                if effective.as_ref() == Some(value) {
                    writeln!(out, "{timestamp} {key}={value_shown}")?;
                } else {
                    let effective = Escaped(effective.as_deref().unwrap_or("unset"));
                    writeln!(
                        out,
                        "{timestamp} {key}={value_shown} (effective: {effective})"
                    )?;
                }
            }
            if let Some(error) = &snapshot.error {
                writeln!(out, "{timestamp} error: {error}")?;
            }
        }
        out.flush()?;
        Ok(())
    }

    fn transition(
        &self,
        out: &mut dyn Write,
        old: &FlagsSnapshot,
        new: &FlagsSnapshot,
    ) -> anyhow::Result<()> {
        for change in changes(old, new) {
            let line = self.change_line(&change, new);
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        if old.error != new.error {
            let timestamp = now_rfc3339();
            let line = match (&new.error, self.json) {
                (Some(error), true) => json!({"timestamp": timestamp, "error": error}).to_string(),
                (None, true) => json!({"timestamp": timestamp, "error": null}).to_string(),
                (Some(error), false) => format!("{timestamp} error: {error}"),
                (None, false) => format!("{timestamp} readable again"),
            };
            writeln!(out, "{line}")?;
            out.flush()?;
        }
        Ok(())
    }

    fn change_line(&self, change: &FlagChange, new: &FlagsSnapshot) -> String {
        let timestamp = now_rfc3339();
        let kill_key = &self.options.kill_key;
        let killed = new.killed(kill_key);
        if self.json {
            return KeyLine {
                timestamp: &timestamp,
                key: &change.key,
                value: change.value.as_deref(),
                previous: change.previous.as_deref(),
                effective: new.effective(&change.key, self.options),
                kill_switch: killed,
                initial: false,
            }
            .to_json();
        }
        let key = &change.key;
        let assignment = match &change.value {
            Some(value) => format!("{}={}", Escaped(key), Escaped(value)),
            None => format!("{} unset", Escaped(key)),
        };
        let previous = Escaped(change.previous.as_deref().unwrap_or("unset"));
        let mut line = format!("{timestamp} {assignment} (was {previous})");
        if key == kill_key {
            let was_killed = change.previous.as_deref() == Some("1");
            if killed && !was_killed {
                line.push_str(" — kill switch ON: flags use safe defaults");
            } else if !killed && was_killed {
                line.push_str(" — kill switch OFF: flags use their rows");
            }
        } else if killed {
            let effective = new.effective(key, self.options);
            line.push_str(&format!(
                " — kill switch ON: effective {}",
                Escaped(effective.as_deref().unwrap_or("unset"))
            ));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> LiveFlagsOptions {
        LiveFlagsOptions {
            defaults: [("NEW_CHECKOUT".to_string(), "0".to_string())].into(),
            ..LiveFlagsOptions::default()
        }
    }

    fn snapshot(rows: &[(&str, &str)]) -> FlagsSnapshot {
        FlagsSnapshot {
            rows: rows
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            version: 0,
            error: None,
        }
    }

    #[test]
    fn get_explains_defaults() {
        let options = options();
        let cases = [
            (snapshot(&[("NEW_CHECKOUT", "1")]), "NEW_CHECKOUT", "NEW_CHECKOUT=1"),
            (
                snapshot(&[("NEW_CHECKOUT", "1"), ("DISABLE_NEW", "1")]),
                "NEW_CHECKOUT",
                "NEW_CHECKOUT=0 (safe default: kill switch DISABLE_NEW=1 is ON; row value \"1\")",
            ),
            (
                snapshot(&[("DISABLE_NEW", "1")]),
                "OTHER",
                "OTHER unset (kill switch DISABLE_NEW=1 is ON and OTHER has no safe default; no row)",
            ),
            (
                snapshot(&[]),
                "NEW_CHECKOUT",
                "NEW_CHECKOUT=0 (safe default: no row in settings)",
            ),
            (
                snapshot(&[]),
                "OTHER",
                "OTHER unset (no row in settings and no safe default)",
            ),
            (snapshot(&[("DISABLE_NEW", "1")]), "DISABLE_NEW", "DISABLE_NEW=1"),
        ];
        for (snapshot, key, expected) in cases {
            assert_eq!(describe_effective(&snapshot, key, &options), expected);
        }
    }

    #[test]
    fn human_change_lines() {
        let options = options();
        let printer = LinePrinter {
            json: false,
            options: &options,
        };
        let old = snapshot(&[("NEW_CHECKOUT", "1")]);
        let new = snapshot(&[("NEW_CHECKOUT", "1"), ("DISABLE_NEW", "1")]);
        let mut out = Vec::new();
        printer.transition(&mut out, &old, &new).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        let (timestamp, rest) = lines[0].split_once(' ').unwrap();
        assert!(humantime::parse_rfc3339(timestamp).is_ok(), "{timestamp}");
        assert!(
            timestamp.ends_with('Z') && timestamp.len() == 24,
            "{timestamp}"
        );
        assert_eq!(
            rest,
            "DISABLE_NEW=1 (was unset) — kill switch ON: flags use safe defaults"
        );
    }

    #[test]
    fn watch_lines_escape_what_the_application_wrote() {
        let options = options();
        let printer = LinePrinter {
            json: false,
            options: &options,
        };
        let old = snapshot(&[("NEW_CHECKOUT", "1\x1b[2J")]);
        let new = snapshot(&[("NEW_CHECKOUT", "2\nFAKE"), ("X\x07", "\x1b]0;t\x07")]);
        let mut out = Vec::new();
        printer
            .initial(&mut out, Path::new("app.db"), &new)
            .unwrap();
        printer.transition(&mut out, &old, &new).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains(['\x1b', '\x07']), "{text:?}");
        assert!(
            text.contains(r"NEW_CHECKOUT=2\nFAKE (was 1\u{1b}[2J)"),
            "{text}"
        );
        assert!(text.contains(r"X\u{7}=\u{1b}]0;t\u{7}"), "{text}");
        for line in text.lines() {
            let (timestamp, _) = line.split_once(' ').unwrap();
            assert!(
                humantime::parse_rfc3339(timestamp).is_ok(),
                "forged line: {line:?}"
            );
        }
    }

    #[test]
    fn json_change_lines_have_the_documented_shape() {
        let options = options();
        let printer = LinePrinter {
            json: true,
            options: &options,
        };
        let old = snapshot(&[("NEW_CHECKOUT", "1"), ("DISABLE_NEW", "0")]);
        let new = snapshot(&[("NEW_CHECKOUT", "2"), ("DISABLE_NEW", "1")]);
        let mut out = Vec::new();
        printer.transition(&mut out, &old, &new).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        for (raw, line) in text.lines().zip(&lines) {
            let timestamp = line["timestamp"].as_str().unwrap();
            assert!(humantime::parse_rfc3339(timestamp).is_ok());
            // Pinned: field names and order are a promise to scripts.
            let expected = format!(
                r#"{{"timestamp":"{timestamp}","key":{},"value":{},"previous":{},"effective":{},"killSwitch":{}}}"#,
                line["key"], line["value"], line["previous"], line["effective"], line["killSwitch"]
            );
            assert_eq!(raw, expected);
        }
        assert_eq!(lines[0]["key"], "DISABLE_NEW");
        assert_eq!(lines[0]["value"], "1");
        assert_eq!(lines[0]["previous"], "0");
        assert_eq!(lines[0]["effective"], "1");
        assert_eq!(lines[0]["killSwitch"], true);
        assert_eq!(lines[1]["key"], "NEW_CHECKOUT");
        assert_eq!(lines[1]["value"], "2");
        assert_eq!(lines[1]["effective"], "0");
    }
}
