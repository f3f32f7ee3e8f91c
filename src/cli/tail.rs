//! Reading `audit.log` for humans: one line per event (local time, event, workers,
//! verdict, reason). Used by `rollbackd audit tail` and the demo.
//!
//! `audit tail -f` follows the file by polling (no inotify: it works the same on every
//! filesystem and needs no dependency). Between polls the file may have grown (print the
//! new complete lines), shrunk below what was read (truncated: start again from 0), or been
//! replaced (rotated: another inode at the path; the old file is read to its end first,
//! then the new one from its start).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::text::escape;

/// Shown before a line that is not an audit record; the line itself follows, escaped.
pub const UNPARSED_MARKER: &str = "[unparsed]";

/// How `audit tail` shows each line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TailStyle {
    /// The raw JSON line, unchanged (for `jq`).
    pub json: bool,
    /// ANSI colours (only when stdout is a terminal).
    pub colour: bool,
}

/// One line of the log as `audit tail` prints it. Never fails: a line that is not an
/// audit record is shown after [`UNPARSED_MARKER`]. Every text from the log is escaped
/// ([`crate::text::escape`]): ids, reasons, probe and hook output cannot act on the
/// terminal. `json` lines stay raw (JSON already escapes control characters; a line that
/// is not JSON is escaped there too).
pub fn render_line(line: &str, style: TailStyle) -> String {
    if line.starts_with("[line too long: ") {
        return line.to_owned();
    }
    if style.json {
        return escape(line).into_owned();
    }
    format_line(line, style.colour).unwrap_or_else(|| format!("{UNPARSED_MARKER} {}", escape(line)))
}

/// The longest audit line shown (64 KiB); a longer one is shown as
/// `[line too long: N bytes]` and skipped. rollbackd's own lines are a few KiB at most.
pub const MAX_LINE: usize = 64 * 1024;

/// How much one poll of the follower reads at most; the rest comes at the next poll.
const MAX_READ_PER_POLL: u64 = 4 * 1024 * 1024;

/// What a line longer than [`MAX_LINE`] is shown as.
pub fn too_long(bytes: usize) -> String {
    format!("[line too long: {bytes} bytes]")
}

/// Opens `path` only if it is a regular file: not through a symlink (`O_NOFOLLOW`; the
/// log is rollbackd's own file in its state directory), without blocking on a FIFO
/// (`O_NONBLOCK`), and checked on the open descriptor. `/dev/zero` or a FIFO is refused.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|err| {
            if err.raw_os_error() == Some(libc::ELOOP) {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "is a symbolic link, not the regular file rollbackd writes; refusing to follow it",
                )
            } else {
                err
            }
        })?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "is not a regular file (a FIFO, a device or a directory?); refusing to read it",
        ));
    }
    Ok(file)
}

/// Splits complete bytes into lines, a line over [`MAX_LINE`] shown by [`too_long`].
fn split_lines(bytes: &[u8], lines: &mut Vec<String>) {
    for line in bytes.split(|&b| b == b'\n').filter(|line| !line.is_empty()) {
        if line.len() > MAX_LINE {
            lines.push(too_long(line.len()));
        } else {
            lines.push(String::from_utf8_lossy(line).into_owned());
        }
    }
}

/// The last `n` lines of `path` (fewer if the file is shorter) and the byte offset just
/// after the last complete line. Reads backwards from the end, so a long log costs no
/// more than the lines shown. A final line without its newline is left for the follower.
pub fn last_lines(path: &Path, n: usize) -> std::io::Result<(Vec<String>, u64)> {
    let mut file = open_regular(path)?;
    let len = file.metadata()?.len();
    const CHUNK: u64 = 64 * 1024;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = len;
    // The end of the last complete line: found first, scanning back from the end.
    let mut offset: Option<u64> = None;
    // Lines found so far, last first; the one being collected, its bytes reversed and
    // kept only up to MAX_LINE + 1 (a longer line is counted, not held).
    let mut found: Vec<String> = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    let mut current_len = 0usize;
    let finish = |current: &mut Vec<u8>, current_len: &mut usize, found: &mut Vec<String>| {
        if *current_len > MAX_LINE {
            found.push(too_long(*current_len));
        } else if *current_len > 0 {
            current.reverse();
            found.push(String::from_utf8_lossy(current).into_owned());
        }
        current.clear();
        *current_len = 0;
    };
    let mut done = false;
    while pos > 0 && !done {
        let start = pos.saturating_sub(CHUNK);
        let chunk = &mut buf[..(pos - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        for i in (0..chunk.len()).rev() {
            let byte = chunk[i];
            if byte == b'\n' {
                if offset.is_none() {
                    offset = Some(start + i as u64 + 1);
                } else {
                    finish(&mut current, &mut current_len, &mut found);
                }
                if offset.is_some() && found.len() >= n {
                    done = true;
                    break;
                }
            } else if offset.is_some() {
                if current.len() <= MAX_LINE {
                    current.push(byte);
                }
                current_len += 1;
            }
        }
        pos = start;
    }
    // At the start of the file: what was collected is its first line.
    if !done && found.len() < n {
        finish(&mut current, &mut current_len, &mut found);
    }
    found.reverse();
    Ok((found, offset.unwrap_or(0)))
}

/// Follows a file through appends, truncation and rotation.
pub struct Follower {
    path: PathBuf,
    file: Option<File>,
    inode: Option<(u64, u64)>,
    offset: u64,
    partial: Vec<u8>,
    /// Bytes of the current line dropped because it is longer than [`MAX_LINE`].
    overflow: usize,
}

impl Follower {
    /// Starts at `offset` of the file now at `path` (which may not exist yet).
    pub fn new(path: &Path, offset: u64) -> Follower {
        let file = open_regular(path).ok();
        let inode = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| (m.dev(), m.ino()));
        Follower {
            path: path.to_owned(),
            file,
            inode,
            offset: if inode.is_some() { offset } else { 0 },
            partial: Vec::new(),
            overflow: 0,
        }
    }

    /// The complete lines that arrived since the last poll.
    pub fn poll(&mut self) -> std::io::Result<Vec<String>> {
        let mut lines = Vec::new();
        let now_at_path = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| ((m.dev(), m.ino()), m.len()));
        match now_at_path {
            Some((inode, _)) if Some(inode) != self.inode => {
                // Rotated (or created): finish the old file, then read the new one from 0.
                if self.file.is_some() {
                    self.read_available(&mut lines)?;
                    self.flush_partial(&mut lines);
                }
                match open_regular(&self.path) {
                    Ok(file) => {
                        self.inode = file.metadata().ok().map(|m| (m.dev(), m.ino()));
                        self.file = Some(file);
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                        self.file = None;
                        self.inode = None;
                    }
                    Err(err) => return Err(err),
                }
                self.offset = 0;
                self.partial.clear();
                self.overflow = 0;
            }
            Some((_, len)) if len < self.offset => {
                // Truncated in place: everything now in it is new.
                self.offset = 0;
                self.partial.clear();
                self.overflow = 0;
            }
            Some(_) => {}
            // Removed and not yet re-created: the old file may still get its last lines.
            None => {}
        }
        if self.file.is_some() {
            self.read_available(&mut lines)?;
        }
        Ok(lines)
    }

    fn read_available(&mut self, lines: &mut Vec<String>) -> std::io::Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.take(MAX_READ_PER_POLL).read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        for piece in bytes.split_inclusive(|&b| b == b'\n') {
            let complete = piece.last() == Some(&b'\n');
            let body = if complete {
                &piece[..piece.len() - 1]
            } else {
                piece
            };
            if self.overflow > 0 || self.partial.len() + body.len() > MAX_LINE {
                self.overflow += self.partial.len() + body.len();
                self.partial.clear();
                if complete {
                    lines.push(too_long(self.overflow));
                    self.overflow = 0;
                }
                continue;
            }
            self.partial.extend_from_slice(body);
            if complete {
                split_lines(&std::mem::take(&mut self.partial), lines);
            }
        }
        Ok(())
    }

    /// A rotated-away file's last line without its newline is still a line.
    fn flush_partial(&mut self, lines: &mut Vec<String>) {
        if !self.partial.is_empty() {
            lines.push(String::from_utf8_lossy(&self.partial).into_owned());
            self.partial.clear();
        }
    }
}

/// How often `audit tail -f` looks at the file.
pub const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);

/// `rollbackd audit tail`: the last `n` lines of `path`; with `follow`, then every line
/// appended until `stop` resolves.
pub async fn audit_tail(
    path: &Path,
    n: usize,
    follow: bool,
    style: TailStyle,
    out: &mut impl Write,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use anyhow::Context;
    let offset = match last_lines(path, n) {
        Ok((lines, offset)) => {
            for line in lines {
                writeln!(out, "{}", render_line(&line, style))?;
            }
            out.flush()?;
            offset
        }
        Err(err) if follow && err.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "rollbackd: no audit log at {} yet; waiting for it",
                path.display()
            );
            0
        }
        Err(err) => {
            return Err(err).with_context(|| format!("cannot read {}", path.display()));
        }
    };
    if !follow {
        return Ok(());
    }
    let mut follower = Follower::new(path, offset);
    tokio::pin!(stop);
    let mut interval = tokio::time::interval(FOLLOW_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = interval.tick() => {
                let lines = follower
                    .poll()
                    .with_context(|| format!("cannot read {}", path.display()))?;
                for line in &lines {
                    writeln!(out, "{}", render_line(line, style))?;
                }
                if !lines.is_empty() {
                    out.flush()?;
                }
            }
        }
    }
}

/// Formats one audit record as a readable line; `None` if the line is not a JSON object.
pub fn format_line(line: &str, colour: bool) -> Option<String> {
    let value: Value = serde_json::from_str(line).ok()?;
    let object = value.as_object()?;
    let raw = |key: &str| object.get(key).and_then(Value::as_str);
    // Everything shown is escaped; `raw` is only for matching.
    let text = |key: &str| raw(key).map(|t| escape(t).into_owned());
    let event = text("event").unwrap_or_else(|| "?".into());
    let time = raw("timestamp")
        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
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
            match (text("wouldAct"), text("notTaken")) {
                (Some(would), Some(why)) => {
                    parts.push(format!("(would {would}, not taken: {why})"))
                }
                (Some(would), None) => parts.push(format!("(dry run: would {would})")),
                _ => {}
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
        "config-reloaded" => match object.get("ok").and_then(Value::as_bool) {
            Some(false) => parts.push(format!(
                "REFUSED, still running {}: {}",
                text("configHash").unwrap_or_else(|| "?".into()),
                text("error").unwrap_or_default()
            )),
            _ => parts.push(format!(
                "applied {} (was {})",
                text("configHash").unwrap_or_else(|| "?".into()),
                text("previousConfigHash").unwrap_or_else(|| "?".into())
            )),
        },
        "hook-orphaned" => {
            let seconds = object
                .get("waitedSeconds")
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            parts.push(format!(
                "{} hook of action #{} left running by the last daemon: {} after {seconds:.1}s",
                text("phase").unwrap_or_default(),
                object
                    .get("actionId")
                    .map(Value::to_string)
                    .unwrap_or_default(),
                text("outcome").unwrap_or_default()
            ));
        }
        "stability-watch-started" => {
            let period = object
                .get("periodSeconds")
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            parts.push(format!(
                "watching {} (rolled back from {}) for {}",
                text("restored").unwrap_or_default(),
                text("from").unwrap_or_default(),
                crate::core::time::show(Duration::try_from_secs_f64(period).unwrap_or_default())
            ));
        }
        "stability-confirmed" | "stability-failed" => {
            parts.push(format!(
                "{} after {} checks",
                text("restored").unwrap_or_default(),
                object.get("checks").and_then(Value::as_u64).unwrap_or(0)
            ));
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
            "health-check" => match raw("verdict") {
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
    fn last_lines_reads_across_chunks_and_leaves_an_unfinished_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let mut text = String::new();
        for i in 0..3000 {
            text.push_str(&format!(
                "{{\"line\": {i}, \"pad\": \"{}\"}}\n",
                "x".repeat(90)
            ));
        }
        let complete = text.len() as u64;
        text.push_str("{\"unfinished");
        std::fs::write(&path, &text).unwrap();
        let (lines, offset) = last_lines(&path, 2500).unwrap();
        assert_eq!(lines.len(), 2500);
        assert!(lines[0].starts_with("{\"line\": 500,"), "{}", lines[0]);
        assert!(lines[2499].starts_with("{\"line\": 2999,"));
        assert_eq!(
            offset, complete,
            "the unfinished line is left for the follower"
        );
        let (all, _) = last_lines(&path, 10_000).unwrap();
        assert_eq!(all.len(), 3000);
        assert_eq!(last_lines(&path, 0).unwrap().0, Vec::<String>::new());
    }

    #[test]
    fn the_follower_holds_at_most_one_bounded_line_of_an_endless_one() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "").unwrap();
        let mut follower = Follower::new(&path, 0);
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let chunk = vec![b'z'; 1024 * 1024];
        for _ in 0..3 {
            log.write_all(&chunk).unwrap();
            assert!(follower.poll().unwrap().is_empty());
            assert!(
                follower.partial.len() <= MAX_LINE,
                "held {}",
                follower.partial.len()
            );
        }
        log.write_all(b"\n{\"event\":\"next\"}\n").unwrap();
        assert_eq!(
            follower.poll().unwrap(),
            [
                too_long(3 * 1024 * 1024),
                "{\"event\":\"next\"}".to_string()
            ]
        );
    }

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

    #[test]
    fn a_refused_reload_and_an_action_not_taken_read_as_what_happened() {
        let orphan = r#"{"timestamp":"2025-10-22T14:32:15.123Z","event":"hook-orphaned","sessionId":"s1","actionId":3,"phase":"switch","pids":[41,42],"outcome":"killed","waitedSeconds":2.5}"#;
        let line = format_line(orphan, false).unwrap();
        assert!(
            line.contains(
                "switch hook of action #3 left running by the last daemon: killed after 2.5s"
            ),
            "{line}"
        );
        let refused = r#"{"timestamp":"2025-10-22T14:32:15.123Z","event":"config-reloaded","sessionId":null,"ok":false,"error":"state_dir: cannot be changed by a reload","configHash":"abc"}"#;
        let applied = r#"{"timestamp":"2025-10-22T14:32:15.123Z","event":"config-reloaded","sessionId":null,"ok":true,"configHash":"def","previousConfigHash":"abc"}"#;
        let refused = format_line(refused, false).unwrap();
        let applied = format_line(applied, false).unwrap();
        assert!(
            refused.contains("REFUSED, still running abc: state_dir: cannot be changed"),
            "{refused}"
        );
        assert!(applied.contains("applied def (was abc)"), "{applied}");
        let paused = r#"{"timestamp":"2025-10-22T14:32:15.123Z","event":"health-check","sessionId":"s","checkIndex":7,"worker":"v2","verdict":"rollback","action":null,"wouldAct":"rollback","notTaken":"monitoring is paused","paused":true,"errorRate":0.4,"probe":"ok"}"#;
        let paused = format_line(paused, false).unwrap();
        assert!(!paused.contains("action="), "{paused}");
        assert!(
            paused.contains("(would rollback, not taken: monitoring is paused)"),
            "{paused}"
        );
    }
}
