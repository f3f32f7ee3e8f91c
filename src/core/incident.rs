//! The incident report: what on-call hands on after a rollback or an escalation.
//!
//! Pure: [`Facts`] are what `rollbackd.db` holds about one session (or one action made
//! without a session) plus the kill switch's value now; [`Incident::of`] derives the
//! report (severity, level, summary, timeline, triggers, actions, impact, next steps) and
//! [`Incident::markdown`] renders it for `cat` on a host without tools. The daemon writes
//! it as `analytics/incident_<UTC>.md` (and its JSON into the decision records); `rollbackd
//! report` prints it for any session on record. The same facts always give the same
//! report: nothing here reads a clock or a file.
//!
//! Severity and level (docs/RUNBOOK.md "The incident report"):
//! - **level** 1: kill switch only; 2: code rollback; 3: full restore (a rollback and the
//!   kill switch: the rollback failed, or the restored version was unstable too).
//! - **severity** SEV1: level 3, or the worker stopped answering its probe
//!   (`probe_failures` fired); SEV2: any other automatic action or an emergency rollback;
//!   SEV3: a manual rollback without a rule firing (an operator's precaution).

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::core::check::{Baseline, CheckResult, ProbeOutcome, SnapshotOutcome};
use crate::core::supervisor::{Stability, StabilityResult};
use crate::storage::states::{ActionKind, ActionState, ActionTrigger, SessionState};

/// At most this many problem checks are listed one by one in the timeline.
pub const MAX_TIMELINE_CHECKS: usize = 12;

/// The session as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionFacts {
    pub id: String,
    /// The canary (the version promoted), and the version before it.
    pub promoted: String,
    pub previous: Option<String>,
    pub promoted_at_ms: i64,
    pub state: SessionState,
    pub ended_at_ms: Option<i64>,
    pub end_reason: Option<String>,
    pub baseline: Option<Baseline>,
    pub stability: Option<Stability>,
    pub operator: Option<String>,
}

/// One check as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckFacts {
    pub index: u64,
    pub taken_at_ms: i64,
    pub result: CheckResult,
    /// The stored verdict (`healthy`, `degraded`, `escalate`, `rollback`).
    pub verdict: String,
    pub failed: bool,
}

/// One action as recorded; `detail` is its `actions.detail_json` (phases, hooks,
/// evidence), read leniently.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionFacts {
    pub id: Option<i64>,
    pub kind: ActionKind,
    pub trigger: ActionTrigger,
    pub state: ActionState,
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: String,
    pub operator: Option<String>,
    pub started_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub artifact: Option<String>,
    pub detail: Value,
}

/// Everything the report is made from.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    pub session: Option<SessionFacts>,
    /// The session's checks, oldest first.
    pub checks: Vec<CheckFacts>,
    /// Its actions, oldest first.
    pub actions: Vec<ActionFacts>,
    /// `kill_switch.key` and its value now (`None`: unset or unreadable).
    pub kill_switch_key: String,
    pub kill_switch_value: Option<String>,
    /// Whether the value could be read at all.
    pub kill_switch_known: bool,
    pub reset_quiet_period: Duration,
    /// `monitor.check_interval`. A check's `requests` are those since the check before it,
    /// or over one check interval when none was taken before it in the same run of the
    /// daemon (a session's first check, the first after a restart): where the impact's
    /// counts begin. (A check after rollbackd itself stalled counts the whole time since
    /// the check before it; the onset is then put one check interval before it.)
    pub check_interval: Duration,
    /// Where the artifacts are (`state_dir/analytics`).
    pub analytics_dir: String,
    /// `--config PATH` for the commands in the next steps, when not the default.
    pub config_arg: Option<String>,
    /// When the report is made, and the local time's offset from UTC then.
    pub generated_at_ms: i64,
    pub utc_offset_seconds: i32,
}

/// One moment of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Moment {
    pub utc: String,
    pub local: String,
    pub event: String,
}

/// A rule that fired, observed against its threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    pub rule: String,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub of: Option<u64>,
}

/// One hook an action ran.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HookRun {
    pub phase: String,
    pub argv: Vec<String>,
    /// `exit 0`, `exit 3`, `signal 9`, `timed out`.
    pub status: String,
    pub stdout_tail: String,
    pub stderr_tail: String,
    /// The rollback attempt it ran in (recorded since retries back off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u64>,
    /// The backoff waited before it (a retried attempt's switch hook), in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waited_seconds: Option<f64>,
}

/// One action taken.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ActionTaken {
    pub id: Option<i64>,
    pub kind: ActionKind,
    pub trigger: ActionTrigger,
    pub state: ActionState,
    pub from: Option<String>,
    pub to: Option<String>,
    pub operator: Option<String>,
    pub reason: String,
    pub started: String,
    pub finished: Option<String>,
    /// Phase → seconds, in the order they ran.
    pub phases: Vec<(String, f64)>,
    pub hooks: Vec<HookRun>,
    pub artifact: Option<String>,
}

/// Requests and failures between the onset and the recovery.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Impact {
    /// Where the counts of the first check that was not healthy begin: the check before it
    /// (its requests are those since then), or one check interval before it when none was
    /// taken before it in the same run — never before the promotion. Without an unhealthy
    /// check, the first action's start.
    pub onset: Option<String>,
    /// Which of the two the onset is.
    pub onset_from: String,
    /// When the last action finished (`None`: not recovered yet).
    pub recovery: Option<String>,
    pub minutes: Option<f64>,
    /// The last check counted: the counts cover the onset to it; the time from it to the
    /// recovery (`uncounted_seconds`) no check counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub counted_until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncounted_seconds: Option<f64>,
    /// Checks counted — from the first that was not healthy (or the action's start) to
    /// the recovery — and how many had request counts.
    pub checks: u64,
    pub checks_with_counts: u64,
    /// The sum of the checks' own request counts.
    pub requests: f64,
    /// Σ requests × error rate over those checks.
    pub failed_requests_estimated: f64,
    /// Of those, the errors beyond what the baseline's rate predicts for the same
    /// requests (`None` without a baseline rate): what the release cost, not the errors
    /// the previous version would have made too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub excess_failed_estimated: Option<f64>,
}

/// The stability watch's outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StabilityOutcome {
    pub restored: String,
    pub period_seconds: f64,
    /// `watching`, `confirmed`, `failed`, `interrupted`.
    pub result: String,
    pub reason: Option<String>,
}

/// The report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Incident {
    pub session_id: Option<String>,
    /// `SEV1`, `SEV2`, `SEV3`.
    pub severity: String,
    pub level: u8,
    pub level_name: String,
    pub summary: String,
    pub status: String,
    pub timeline: Vec<Moment>,
    pub triggers: Vec<Trigger>,
    pub actions: Vec<ActionTaken>,
    pub stability: Option<StabilityOutcome>,
    pub impact: Impact,
    pub kill_switch: String,
    pub next_steps: Vec<String>,
    pub generated: String,
    /// `incident_<UTC>.md`, fixed by the incident's first action.
    pub file_name: String,
}

/// Untrusted text (a worker's probe reason, a hook's output, an operator's reason) as
/// inert Markdown: HTML's `&`, `<`, `>` as entities; backslash, backtick, `*`, `[`, `]`
/// and `|` backslash-escaped (no link, image, code span, emphasis or table cell can
/// start); one line. `<img src=…>` and `[docs](javascript:…)` show as text in any
/// renderer, and `cat` still reads them (parentheses and intraword `_` stay as they are).
pub fn markdown_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\n' | '\r' => out.push(' '),
            '\\' | '`' | '*' | '[' | ']' | '|' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// [`markdown_text`] undone: the text as it was, for a terminal (`status` shows the
/// report's first line; the terminal escaping comes after).
pub fn markdown_plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(next) = chars.next() {
                out.push(next);
            }
            continue;
        }
        out.push(c);
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// `incident_20251022T143215.123Z.md`: named by the first action's start, so a rewrite
/// (after the stability watch) replaces it.
pub fn file_name(first_action_started_ms: i64) -> String {
    format!(
        "incident_{}.md",
        crate::storage::audit::artifact_stamp(crate::core::time::from_ms(first_action_started_ms))
    )
}

fn utc(ms: i64) -> String {
    let text = crate::storage::audit::rfc3339_millis(crate::core::time::from_ms(ms));
    // 2025-10-22T14:32:15.123Z → 2025-10-22 14:32:15Z
    let (date, rest) = text.split_once('T').unwrap_or((&text, ""));
    format!("{date} {}Z", rest.get(..8).unwrap_or(rest))
}

fn local(ms: i64, offset_seconds: i32) -> String {
    let shifted = ms.saturating_add(i64::from(offset_seconds) * 1000);
    let text = utc(shifted);
    let sign = if offset_seconds < 0 { '-' } else { '+' };
    let abs = offset_seconds.unsigned_abs();
    format!(
        "{} {sign}{:02}:{:02}",
        text.trim_end_matches('Z'),
        abs / 3600,
        (abs % 3600) / 60
    )
}

fn percent(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
}

fn seconds(s: f64) -> String {
    if s < 10.0 {
        format!("{s:.2}s")
    } else {
        crate::core::time::show(Duration::from_secs(s.round().max(0.0) as u64))
    }
}

fn error_rate(result: &CheckResult) -> Option<f64> {
    match &result.snapshot {
        SnapshotOutcome::Values(s) => s.error_rate.finite_non_negative().filter(|r| *r <= 1.0),
        SnapshotOutcome::Unavailable { .. } => None,
    }
}

fn requests(result: &CheckResult) -> Option<f64> {
    match &result.snapshot {
        SnapshotOutcome::Values(s) => s.requests.finite_non_negative(),
        SnapshotOutcome::Unavailable { .. } => None,
    }
}

/// One check in words: `probe failed (connection refused)`, `error rate 42.0% of 1200
/// requests`.
fn describe_check(check: &CheckFacts) -> String {
    let mut parts = Vec::new();
    if let ProbeOutcome::Failed { reason } = &check.result.probe {
        parts.push(format!(
            "probe failed ({})",
            crate::text::one_line(reason, 120)
        ));
    }
    match (&check.result.snapshot, error_rate(&check.result)) {
        (SnapshotOutcome::Unavailable { reason }, _) => parts.push(format!(
            "no snapshot ({})",
            crate::text::one_line(reason, 120)
        )),
        (_, Some(rate)) => match requests(&check.result) {
            Some(n) => parts.push(format!("error rate {} of {n:.0} requests", percent(rate))),
            None => parts.push(format!("error rate {}", percent(rate))),
        },
        (_, None) => parts.push("no usable error rate".into()),
    }
    if let SnapshotOutcome::Values(s) = &check.result.snapshot {
        for (name, value) in [("p95", &s.latency_p95_ms), ("p99", &s.latency_p99_ms)] {
            if let Some(ms) = value.finite_non_negative() {
                parts.push(format!("{name} {ms:.0} ms"));
            }
        }
    }
    parts.join(", ")
}

fn rule_text(rule: &str, firing: &Value) -> String {
    let num = |key: &str| firing.get(key).and_then(Value::as_f64);
    let count = num("count").unwrap_or(0.0);
    let of = num("of").unwrap_or(0.0);
    let observed = num("observed");
    let threshold = num("threshold");
    match rule {
        "error_rate" => format!(
            "error rate {} > threshold {} in {count:.0} of {of:.0} checks",
            observed.map(percent).unwrap_or_else(|| "?".into()),
            threshold.map(percent).unwrap_or_else(|| "?".into())
        ),
        "baseline" => format!(
            "errors above {}× the baseline's prediction in {count:.0} of {of:.0} checks{}",
            threshold.map(|t| format!("{t}")).unwrap_or_else(|| "?".into()),
            num("pValue")
                .map(|p| format!(" (smallest p-value {p:.2e})"))
                .unwrap_or_default()
        ),
        "baseline_latency" => {
            let detail = firing.get("detail");
            let field = |key: &str| detail.and_then(|d| d.get(key)).and_then(Value::as_f64);
            let quantile = detail
                .and_then(|d| d.get("quantile"))
                .and_then(Value::as_str)
                .unwrap_or("p95/p99");
            format!(
                "{quantile} latency {} over the baseline's {} × {} in {count:.0} of {of:.0} checks",
                field("observedMs")
                    .map(|v| format!("{v:.0} ms"))
                    .unwrap_or_else(|| "?".into()),
                field("baselineMs")
                    .map(|v| format!("{v:.0} ms"))
                    .unwrap_or_else(|| "?".into()),
                field("limitRatio")
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "?".into()),
            )
        }
        "session_errors" | "recent_errors" => {
            let detail = firing.get("detail");
            let field = |key: &str| detail.and_then(|d| d.get(key)).and_then(Value::as_f64);
            format!(
                "errors {} {}× what the baseline predicts ({} where {} were expected over {} checks, +{} points; p = {})",
                if rule == "session_errors" {
                    "since promotion"
                } else {
                    "in the recent checks"
                },
                field("ratio")
                    .map(|v| format!("{v:.2}"))
                    .unwrap_or_else(|| "?".into()),
                field("errors")
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or_else(|| "?".into()),
                field("expected")
                    .map(|v| format!("{v:.1}"))
                    .unwrap_or_else(|| "?".into()),
                field("checks")
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or_else(|| "?".into()),
                field("excessRate")
                    .map(|v| format!("{:.2}", v * 100.0))
                    .unwrap_or_else(|| "?".into()),
                num("pValue")
                    .map(|p| format!("{p:.1e}"))
                    .unwrap_or_else(|| "?".into()),
            )
        }
        "memory_trend" => {
            let detail = firing.get("detail");
            let field = |key: &str| detail.and_then(|d| d.get(key)).and_then(Value::as_f64);
            format!(
                "host memory climbing {} points per hour ({} → {})",
                field("perHour")
                    .map(|v| format!("{v:.0}"))
                    .unwrap_or_else(|| "?".into()),
                field("fromPercent")
                    .map(|v| format!("{v:.1}%"))
                    .unwrap_or_else(|| "?".into()),
                field("toPercent")
                    .map(|v| format!("{v:.1}%"))
                    .unwrap_or_else(|| "?".into()),
            )
        }
        "probe_flapping" => format!("the worker probe failed in {count:.0} of the last {of:.0} checks"),
        "cannot_judge" => format!(
            "{count:.0} checks in a row without a usable error rate: the release could not be judged"
        ),
        "latency" => format!(
            "p95/p99 latency over its threshold in {count:.0} of {of:.0} checks (latest {})",
            observed
                .map(|v| format!("{v:.0} ms"))
                .unwrap_or_else(|| "?".into())
        ),
        "memory" => format!(
            "host memory over {}% in {count:.0} of {of:.0} checks (latest {})",
            threshold.map(|t| format!("{t:.0}")).unwrap_or_default(),
            observed
                .map(|v| format!("{v:.1}%"))
                .unwrap_or_else(|| "?".into())
        ),
        "probe_failures" => format!("the last {count:.0} worker probes failed"),
        "no_data" => format!("{count:.0} checks in a row without a usable error rate"),
        other => format!("{other}: {count:.0} of {of:.0} checks"),
    }
}

fn hook_runs(detail: &Value) -> Vec<HookRun> {
    let Some(hooks) = detail.get("hooks").and_then(Value::as_array) else {
        return Vec::new();
    };
    hooks
        .iter()
        .map(|hook| {
            let text = |key: &str| {
                hook.get(key)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let status = if hook.get("timedOut").and_then(Value::as_bool) == Some(true) {
                "timed out".to_owned()
            } else if let Some(code) = hook.get("exitCode").and_then(Value::as_i64) {
                format!("exit {code}")
            } else if let Some(signal) = hook.get("signal").and_then(Value::as_i64) {
                format!("signal {signal}")
            } else {
                "unknown".to_owned()
            };
            HookRun {
                phase: text("phase"),
                argv: hook
                    .get("argv")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default(),
                status,
                stdout_tail: text("stdoutTail"),
                stderr_tail: text("stderrTail"),
                attempt: hook.get("attempt").and_then(Value::as_u64),
                waited_seconds: hook.get("waitedSeconds").and_then(Value::as_f64),
            }
        })
        .collect()
}

fn phases(detail: &Value) -> Vec<(String, f64)> {
    detail
        .get("phases")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|pair| {
                    let pair = pair.as_array()?;
                    Some((pair.first()?.as_str()?.to_owned(), pair.get(1)?.as_f64()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn fired(detail: &Value) -> Vec<(String, Value)> {
    detail
        .pointer("/evidence/rulesFired")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter(|f| f.get("dryRun").and_then(Value::as_bool) != Some(true))
                .filter_map(|f| Some((f.get("rule")?.as_str()?.to_owned(), f.clone())))
                .collect()
        })
        .unwrap_or_default()
}

impl Incident {
    pub fn of(facts: &Facts) -> Incident {
        let offset = facts.utc_offset_seconds;
        let at = |ms: i64| Moment {
            utc: utc(ms),
            local: local(ms, offset),
            event: String::new(),
        };
        let moment = |ms: i64, event: String| Moment { event, ..at(ms) };
        let session = facts.session.as_ref();
        let watch = session.and_then(|s| s.stability.as_ref());
        let first_watch_check = watch.map_or(u64::MAX, |w| w.first_check);

        // Level and severity.
        let rolled_back = facts.actions.iter().any(|a| a.kind == ActionKind::Rollback);
        let escalated = facts
            .actions
            .iter()
            .any(|a| a.kind == ActionKind::Escalation);
        let (level, level_name) = match (rolled_back, escalated) {
            (true, true) => (3, "full restore (code rollback and kill switch)"),
            (true, false) => (2, "code rollback"),
            _ => (1, "kill switch"),
        };
        let mut triggers = Vec::new();
        for action in &facts.actions {
            for (rule, firing) in fired(&action.detail) {
                if triggers.iter().any(|t: &Trigger| t.rule == rule) {
                    continue;
                }
                let num = |key: &str| firing.get(key).and_then(Value::as_f64);
                triggers.push(Trigger {
                    text: rule_text(&rule, &firing),
                    observed: num("observed"),
                    threshold: num("threshold"),
                    count: num("count").map(|c| c as u64),
                    of: num("of").map(|c| c as u64),
                    rule,
                });
            }
        }
        // The rules that argue for an action; the degraded ones only when no other fired.
        let acting = |t: &Trigger| {
            crate::core::engine::Rule::from_name(&t.rule).is_some_and(|r| {
                matches!(
                    r.verdict(),
                    crate::core::engine::Verdict::Rollback | crate::core::engine::Verdict::Escalate
                )
            })
        };
        if triggers.iter().any(acting) {
            triggers.retain(acting);
        }
        let probe_down = triggers.iter().any(|t| t.rule == "probe_failures");
        let first = facts.actions.first();
        let automatic = facts
            .actions
            .iter()
            .any(|a| a.trigger == ActionTrigger::Automatic);
        let emergency = facts
            .actions
            .iter()
            .any(|a| a.trigger == ActionTrigger::Emergency);
        let severity = if level == 3 || probe_down {
            "SEV1"
        } else if automatic || emergency || !triggers.is_empty() {
            "SEV2"
        } else {
            "SEV3"
        };

        // Who, what, when.
        let bad = first
            .and_then(|a| a.from.clone())
            .or_else(|| session.map(|s| s.promoted.clone()))
            .unwrap_or_else(|| "?".into());
        let restored = facts
            .actions
            .iter()
            .rev()
            .find(|a| a.kind == ActionKind::Rollback && a.state == ActionState::Done)
            .and_then(|a| a.to.clone());
        let kill_on = facts.kill_switch_value.as_deref() == Some("1");
        let cause = triggers.first().map(|t| t.text.clone());
        let operator_reason = first.map(|a| {
            format!(
                "{}: {}",
                a.operator
                    .as_deref()
                    .map(|o| format!(" by {o}"))
                    .unwrap_or_default(),
                crate::text::one_line(&a.reason, 160)
            )
        });
        let how = match first.map(|a| a.trigger) {
            Some(ActionTrigger::Manual) => "manual ",
            Some(ActionTrigger::Emergency) => "emergency ",
            _ => "",
        };
        let watch_failed = watch.is_some_and(|w| w.result == Some(StabilityResult::Failed));
        let rollback_failed = facts
            .actions
            .iter()
            .any(|a| a.kind == ActionKind::Rollback && a.state == ActionState::Failed);
        let what = match (&restored, escalated) {
            (Some(to), true) if watch_failed => format!(
                "{how}rollback of {bad} to {to}, then the kill switch when {to} was unstable too"
            ),
            (Some(to), false) => format!("{how}rollback of {bad} to {to}"),
            (Some(to), true) => format!("{how}rollback of {bad} to {to} and the kill switch"),
            (None, true) if rollback_failed => {
                format!("{how}rollback of {bad} failed; kill switch set")
            }
            (None, true) => format!("kill switch set on {bad}"),
            (None, false) => format!("{how}rollback of {bad} (not finished)"),
        };
        let summary = match (cause, operator_reason) {
            (Some(cause), _) => format!("{severity} level {level}: {what} after {cause}."),
            (None, Some(why)) => format!("{severity} level {level}: {what}{why}."),
            (None, None) => format!("{severity} level {level}: {what}."),
        };

        // Impact: from the first check users would have noticed — a failure (a breach, a
        // failed probe, missing data nobody expected) or a degraded verdict on a measured
        // error rate; not a deploy-time gap in the warm-up — to the last action's end. It
        // begins where that check's counts begin (its requests are those since the check
        // before it), so that the span stated is the one the counts cover: the moment the
        // check was taken is one check interval after the first requests it counted.
        let first_unhealthy = facts.checks.iter().position(|c| {
            c.failed
                || c.verdict == "rollback"
                || c.verdict == "escalate"
                || (c.verdict == "degraded" && error_rate(&c.result).is_some())
        });
        let counts_from = |position: usize| {
            let taken = facts.checks[position].taken_at_ms;
            let interval = i64::try_from(facts.check_interval.as_millis()).unwrap_or(i64::MAX);
            let mut from = taken.saturating_sub(interval);
            if let Some(before) = position.checked_sub(1) {
                from = from.max(facts.checks[before].taken_at_ms);
            }
            if let Some(s) = session {
                from = from.max(s.promoted_at_ms);
            }
            from.min(taken)
        };
        let first_unhealthy_ms = first_unhealthy.map(|p| facts.checks[p].taken_at_ms);
        let onset_ms = first_unhealthy
            .map(counts_from)
            .or(first.map(|a| a.started_at_ms));
        let unfinished = facts.actions.iter().any(|a| a.finished_at_ms.is_none());
        let recovery_ms = if unfinished {
            None
        } else {
            facts.actions.iter().filter_map(|a| a.finished_at_ms).max()
        };
        let mut impact = Impact {
            onset_from: if first_unhealthy.is_some() {
                "the start of what the first check that was not healthy counted"
            } else {
                "the action's start (no check was unhealthy)"
            }
            .to_owned(),
            onset: onset_ms.map(utc),
            recovery: recovery_ms.map(utc),
            minutes: match (onset_ms, recovery_ms) {
                (Some(a), Some(b)) => Some(((b - a).max(0) as f64) / 60_000.0),
                _ => None,
            },
            counted_until: None,
            uncounted_seconds: None,
            checks: 0,
            checks_with_counts: 0,
            requests: 0.0,
            failed_requests_estimated: 0.0,
            excess_failed_estimated: None,
        };
        let base_rate = session
            .and_then(|s| s.baseline.as_ref())
            .and_then(|b| b.error_rate)
            .filter(|r| r.is_finite() && (0.0..=1.0).contains(r));
        // The checks counted: from the first unhealthy one (the check before it counted
        // requests before the onset) or the action's start, to the recovery.
        if let Some(counted_from) = first_unhealthy_ms.or(onset_ms) {
            let end = recovery_ms.unwrap_or(facts.generated_at_ms);
            let mut excess = 0.0;
            let mut last_counted = None;
            for check in facts
                .checks
                .iter()
                .filter(|c| c.taken_at_ms >= counted_from && c.taken_at_ms <= end)
            {
                last_counted = Some(check.taken_at_ms);
                impact.checks += 1;
                if let Some(n) = requests(&check.result) {
                    impact.checks_with_counts += 1;
                    impact.requests += n;
                    let rate = error_rate(&check.result).unwrap_or(0.0);
                    impact.failed_requests_estimated += n * rate;
                    if let Some(base) = base_rate {
                        excess += n * (rate - base).max(0.0);
                    }
                }
            }
            impact.failed_requests_estimated = impact.failed_requests_estimated.round();
            if base_rate.is_some() && impact.checks_with_counts > 0 {
                impact.excess_failed_estimated = Some(excess.round());
            }
            impact.counted_until = last_counted.map(utc);
            impact.uncounted_seconds = match (last_counted, recovery_ms) {
                (Some(last), Some(recovery)) => Some((recovery - last).max(0) as f64 / 1000.0),
                _ => None,
            };
        }

        // Timeline.
        let mut timeline = Vec::new();
        if let Some(s) = session {
            timeline.push(moment(
                s.promoted_at_ms,
                format!(
                    "promotion of {} (previous {}){}",
                    s.promoted,
                    s.previous.as_deref().unwrap_or("none"),
                    s.operator
                        .as_deref()
                        .map(|o| format!(" by {o}"))
                        .unwrap_or_default()
                ),
            ));
        }
        let problems: Vec<&CheckFacts> = facts
            .checks
            .iter()
            .filter(|c| c.verdict != "healthy")
            .collect();
        let mut first_degraded_seen = false;
        let mut first_watch_problem_seen = false;
        for (n, check) in problems.iter().enumerate() {
            let in_watch = check.index >= first_watch_check;
            let label = if !first_degraded_seen {
                first_degraded_seen = true;
                "first check not healthy"
            } else if in_watch && !first_watch_problem_seen {
                "restored version not healthy"
            } else {
                "check"
            };
            if in_watch {
                first_watch_problem_seen = true;
            }
            if n >= MAX_TIMELINE_CHECKS && label == "check" {
                continue;
            }
            timeline.push(moment(
                check.taken_at_ms,
                format!(
                    "{label} #{}: {} — {}",
                    check.index,
                    check.verdict,
                    describe_check(check)
                ),
            ));
        }
        if problems.len() > MAX_TIMELINE_CHECKS {
            timeline.push(moment(
                problems.last().map_or(0, |c| c.taken_at_ms),
                format!(
                    "({} more checks not healthy, not listed: `rollbackd audit tail` has each)",
                    problems.len() - MAX_TIMELINE_CHECKS
                ),
            ));
        }
        let mut actions = Vec::new();
        for action in &facts.actions {
            let by = action
                .operator
                .as_deref()
                .map(|o| format!(" by {o}"))
                .unwrap_or_default();
            timeline.push(moment(
                action.started_at_ms,
                format!(
                    "decision: {} {} ({}{by}): {}",
                    action.trigger.as_str(),
                    action.kind.as_str(),
                    match (&action.from, &action.to) {
                        (Some(f), Some(t)) if action.kind == ActionKind::Rollback =>
                            format!("{f} → {t}"),
                        (Some(f), _) => f.clone(),
                        _ => "-".into(),
                    },
                    crate::text::one_line(&action.reason, 200)
                ),
            ));
            let phases = phases(&action.detail);
            if let Some(done) = action.finished_at_ms {
                let steps = phases
                    .iter()
                    .map(|(p, s)| format!("{p} {}", seconds(*s)))
                    .collect::<Vec<_>>()
                    .join(" → ");
                let event = match (action.kind, action.state) {
                    (ActionKind::Rollback, ActionState::Done) => format!(
                        "rollback executed and {} verified healthy ({steps}; {} in all)",
                        action.to.as_deref().unwrap_or("?"),
                        seconds(((done - action.started_at_ms).max(0) as f64) / 1000.0)
                    ),
                    (ActionKind::Rollback, _) => format!("rollback failed ({steps}); escalating"),
                    (ActionKind::Escalation, ActionState::Done) => format!(
                        "kill switch {}=1 set (escalation done)",
                        facts.kill_switch_key
                    ),
                    (ActionKind::Escalation, _) => "escalation failed".to_owned(),
                };
                timeline.push(moment(done, event));
            }
            actions.push(ActionTaken {
                id: action.id,
                kind: action.kind,
                trigger: action.trigger,
                state: action.state,
                from: action.from.clone(),
                to: action.to.clone(),
                operator: action.operator.clone(),
                reason: action.reason.clone(),
                started: utc(action.started_at_ms),
                finished: action.finished_at_ms.map(utc),
                phases,
                hooks: hook_runs(&action.detail),
                artifact: action
                    .artifact
                    .as_ref()
                    .map(|name| format!("{}/{name}", facts.analytics_dir)),
            });
        }
        let stability = watch.map(|w| {
            timeline.push(moment(
                w.started_at_ms,
                format!(
                    "stability watch of {} began ({})",
                    w.restored,
                    crate::core::time::show(
                        Duration::try_from_secs_f64(w.period_seconds).unwrap_or_default()
                    )
                ),
            ));
            if let (Some(result), Some(end)) = (w.result, w.ended_at_ms) {
                timeline.push(moment(
                    end,
                    format!(
                        "stability {}: {}",
                        result.as_str(),
                        w.reason.as_deref().unwrap_or_default()
                    ),
                ));
            }
            StabilityOutcome {
                restored: w.restored.clone(),
                period_seconds: w.period_seconds,
                result: w
                    .result
                    .map_or("watching", StabilityResult::as_str)
                    .to_owned(),
                reason: w.reason.clone(),
            }
        });
        if let Some(s) = session {
            if let Some(end) = s.ended_at_ms {
                timeline.push(moment(
                    end,
                    format!(
                        "session ended: {}",
                        s.end_reason.as_deref().unwrap_or(s.state.as_str())
                    ),
                ));
            }
        }
        // Stable order: by time, then as pushed.
        let mut keyed: Vec<(String, usize, Moment)> = timeline
            .into_iter()
            .enumerate()
            .map(|(i, m)| (m.utc.clone(), i, m))
            .collect();
        keyed.sort_by(|a, b| (a.0.as_str(), a.1).cmp(&(b.0.as_str(), b.1)));
        let timeline = keyed.into_iter().map(|(_, _, m)| m).collect();

        // Status now.
        // The report is written when an action ends, before the session's row says what
        // came of it: an escalation that is done means the session is escalated, whatever
        // the row says yet; a watch with a result is over.
        let escalation_done = facts
            .actions
            .iter()
            .any(|a| a.kind == ActionKind::Escalation && a.state == ActionState::Done);
        let state_now = session.map(|s| match s.state {
            SessionState::Monitoring | SessionState::StabilityWatch if escalation_done => {
                SessionState::Escalated
            }
            SessionState::StabilityWatch if watch.is_some_and(|w| w.result.is_some()) => {
                SessionState::Monitoring
            }
            state => state,
        });
        let status = match (state_now, watch.and_then(|w| w.result)) {
            (Some(SessionState::Escalated), Some(StabilityResult::Failed)) => format!(
                "escalated: {} failed its stability watch too; {} is on; automatic actions stopped until an operator resets it",
                restored.as_deref().unwrap_or("the restored version"),
                facts.kill_switch_key
            ),
            (Some(SessionState::StabilityWatch), _) => format!(
                "rolled back to {}; the stability watch is running",
                restored.as_deref().unwrap_or("?")
            ),
            (Some(SessionState::Escalated), _) => format!(
                "escalated: {} is on; automatic actions stopped until an operator resets it",
                facts.kill_switch_key
            ),
            (_, Some(StabilityResult::Confirmed)) => format!(
                "rolled back to {} and stable for the whole watch",
                restored.as_deref().unwrap_or("?")
            ),
            (Some(SessionState::Monitoring), _) if unfinished => {
                "an action is in progress".to_owned()
            }
            (Some(state), _) => format!("session {}", state.as_str()),
            (None, _) if unfinished => "an action is in progress".to_owned(),
            (None, _) => match &restored {
                Some(to) => format!("rolled back to {to} (no monitoring session)"),
                None => "no monitoring session".to_owned(),
            },
        };
        let kill_switch = if !facts.kill_switch_known {
            format!("{}: could not be read", facts.kill_switch_key)
        } else {
            match facts.kill_switch_value.as_deref() {
                Some("1") => format!(
                    "{}=1: ON, every application runs its safe flag defaults",
                    facts.kill_switch_key
                ),
                Some(value) => format!("{}={value}: off", facts.kill_switch_key),
                None => format!("{}: unset (off)", facts.kill_switch_key),
            }
        };

        // Next steps.
        let rbd = match &facts.config_arg {
            Some(path) => format!("rollbackd --config {path}"),
            None => "rollbackd".to_owned(),
        };
        let mut next_steps = Vec::new();
        if watch.is_some_and(|w| w.result.is_none()) {
            next_steps.push(format!(
                "Wait for the stability watch of {} to end (`{rbd} status`); this report is rewritten then.",
                restored.as_deref().unwrap_or("?")
            ));
        }
        if level == 3 && watch_failed {
            next_steps.push(
                "The version rolled back to is unhealthy too: call the owning team now. Do not promote or roll back again until the cause (a migration the old code cannot read, a shared dependency) is known.".to_owned()
            );
        } else if rollback_failed && restored.is_none() {
            let to = facts
                .actions
                .iter()
                .find(|a| a.kind == ActionKind::Rollback && a.state == ActionState::Failed)
                .and_then(|a| a.to.clone())
                .unwrap_or_else(|| "the previous version".into());
            next_steps.push(format!(
                "The rollback did not complete: {bad} is still serving and {to} was never switched to or verified (the hooks' output is under Actions taken). Fix the switch path, then `{rbd} rollback --reason \"...\"`."
            ));
        } else if level == 3 {
            next_steps.push(
                "Both a rollback and the kill switch were needed: call the owning team now."
                    .to_owned(),
            );
        }
        if let Some(held) = facts
            .actions
            .iter()
            .find(|a| a.kind == ActionKind::Escalation && a.reason.contains("still serving"))
        {
            let version = held.from.clone().unwrap_or_else(|| bad.clone());
            next_steps.push(format!(
                "Loop protection held the rollback back: {version} is still serving. Roll it back by hand once the cause of the loop is understood: `{rbd} rollback --reason \"...\"`."
            ));
        }
        if kill_on {
            next_steps.push(format!(
                "Reset the kill switch once the cause is fixed: `{rbd} kill-switch reset --reason \"...\"` (refused while any check failed within {}; `--force --reason` overrides).",
                crate::core::time::show(facts.reset_quiet_period)
            ));
        }
        if let Some(to) = &restored {
            next_steps.push(format!(
                "Fix {bad} before it is promoted again; then `{rbd} promote --active <fixed version> --previous {to}`."
            ));
        } else if bad != "?" {
            next_steps.push(format!(
                "Find out why {bad} failed before promoting anything: the triggers and checks above, and the artifacts."
            ));
        }
        next_steps.push(format!(
            "Read the decision records: {}.",
            actions
                .iter()
                .filter_map(|a| a.artifact.clone())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        next_steps.push(format!(
            "This report again: `{rbd} report {}`; the audit trail: `{rbd} audit tail -n 50`.",
            session.map_or("latest", |s| s.id.as_str())
        ));

        Incident {
            session_id: session.map(|s| s.id.clone()),
            severity: severity.to_owned(),
            level,
            level_name: level_name.to_owned(),
            summary,
            status,
            timeline,
            triggers,
            actions,
            stability,
            impact,
            kill_switch,
            next_steps,
            generated: utc(facts.generated_at_ms),
            file_name: file_name(first.map_or(facts.generated_at_ms, |a| a.started_at_ms)),
        }
    }

    /// The report as Markdown, readable with `cat`.
    pub fn markdown(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let cell = |text: &str| markdown_text(text);
        let _ = writeln!(out, "# Incident: {}", cell(&self.summary));
        let _ = writeln!(out);
        let _ = writeln!(out, "| | |");
        let _ = writeln!(out, "| --- | --- |");
        let _ = writeln!(out, "| Severity | {} |", self.severity);
        let _ = writeln!(out, "| Level | {} ({}) |", self.level, self.level_name);
        let _ = writeln!(out, "| Status now | {} |", cell(&self.status));
        let _ = writeln!(out, "| Kill switch | {} |", cell(&self.kill_switch));
        if let Some(s) = &self.stability {
            let _ = writeln!(
                out,
                "| Stability watch | {} of {} ({}){} |",
                s.result,
                cell(&s.restored),
                crate::core::time::show(
                    Duration::try_from_secs_f64(s.period_seconds).unwrap_or_default()
                ),
                s.reason
                    .as_deref()
                    .map(|r| format!(": {}", cell(r)))
                    .unwrap_or_default()
            );
        }
        let _ = writeln!(
            out,
            "| Session | {} |",
            self.session_id
                .as_deref()
                .unwrap_or("none (no monitoring session)")
        );
        let _ = writeln!(out, "| Report made | {} |", self.generated);
        let _ = writeln!(out);

        let _ = writeln!(out, "## Impact");
        let _ = writeln!(out);
        let i = &self.impact;
        match (&i.onset, &i.recovery, i.minutes) {
            (Some(onset), Some(recovery), Some(minutes)) => {
                let minutes = if minutes < 1.0 {
                    "under a minute".to_owned()
                } else {
                    format!("{minutes:.1} minutes")
                };
                let _ = writeln!(
                    out,
                    "- From {}, {onset}, to recovery, {recovery}: {} ({minutes}).",
                    i.onset_from,
                    seconds(i.minutes.unwrap_or_default() * 60.0)
                );
            }
            (Some(onset), _, _) => {
                let _ = writeln!(out, "- Since {onset}; not recovered yet.");
            }
            _ => {
                let _ = writeln!(out, "- No check was unhealthy; no onset to measure from.");
            }
        }
        if self.session_id.is_none() {
            let _ = writeln!(
                out,
                "- No monitoring session: no checks to count requests from."
            );
        } else if i.checks_with_counts > 0 {
            let _ = writeln!(
                out,
                "- {:.0} requests in that time by the checks' own counts ({} of {} checks had counts), about {:.0} of them failed{}{}.",
                i.requests,
                i.checks_with_counts,
                i.checks,
                i.failed_requests_estimated,
                match i.excess_failed_estimated {
                    Some(excess) => format!(
                        "; about {excess:.0} more than the previous version's error rate would have made"
                    ),
                    None => String::new(),
                },
                match (&i.counted_until, i.uncounted_seconds) {
                    (Some(last), Some(gap)) if gap >= 0.005 => format!(
                        "; the {} from the last check counted, {last}, to the recovery are not counted",
                        seconds(gap)
                    ),
                    _ => String::new(),
                }
            );
        } else {
            let _ = writeln!(
                out,
                "- {} checks in that time; none had request counts, so failed requests cannot be estimated.",
                i.checks
            );
        }
        let _ = writeln!(out);

        let _ = writeln!(out, "## Triggers");
        let _ = writeln!(out);
        if self.triggers.is_empty() {
            let _ = writeln!(out, "- No rule fired: the action was an operator's.");
        }
        for t in &self.triggers {
            let _ = writeln!(out, "- `{}`: {}", t.rule, cell(&t.text));
        }
        let _ = writeln!(out);

        let _ = writeln!(out, "## Timeline");
        let _ = writeln!(out);
        let _ = writeln!(out, "| Local | UTC | What happened |");
        let _ = writeln!(out, "| --- | --- | --- |");
        for m in &self.timeline {
            let _ = writeln!(out, "| {} | {} | {} |", m.local, m.utc, cell(&m.event));
        }
        let _ = writeln!(out);

        let _ = writeln!(out, "## Actions taken");
        let _ = writeln!(out);
        for a in &self.actions {
            let _ = writeln!(
                out,
                "### {} {} #{} ({}){}",
                a.trigger.as_str(),
                a.kind.as_str(),
                a.id.map_or("-".to_owned(), |id| id.to_string()),
                a.state.as_str(),
                a.operator
                    .as_deref()
                    .map(|o| format!(" by {o}"))
                    .unwrap_or_default()
            );
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "- Reason: {}",
                cell(&crate::text::one_line(&a.reason, 400))
            );
            match (a.kind, &a.from, &a.to) {
                (ActionKind::Rollback, Some(from), Some(to)) => {
                    let _ = writeln!(out, "- From {from} to {to}");
                }
                (ActionKind::Escalation, Some(on), _) => {
                    let _ = writeln!(out, "- While {on} was serving");
                }
                _ => {}
            }
            let _ = writeln!(
                out,
                "- Started {}, finished {}",
                a.started,
                a.finished.as_deref().unwrap_or("(not yet)")
            );
            if !a.phases.is_empty() {
                let steps = a
                    .phases
                    .iter()
                    .map(|(p, s)| format!("{p} {}", seconds(*s)))
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = writeln!(out, "- Phases: {steps}");
            }
            let retried = a.hooks.iter().any(|h| h.attempt.is_some_and(|n| n > 1));
            for h in &a.hooks {
                let mut when = h.phase.clone();
                if let (true, Some(attempt)) = (retried, h.attempt) {
                    let _ = write!(when, ", attempt {attempt}");
                }
                if let Some(waited) = h.waited_seconds {
                    let _ = write!(when, ", after waiting {}", seconds(waited));
                }
                let _ = writeln!(
                    out,
                    "- Hook {} ({when}): {}",
                    cell(&crate::text::one_line(&h.argv.join(" "), 200)),
                    h.status
                );
                for (name, tail) in [("stdout", &h.stdout_tail), ("stderr", &h.stderr_tail)] {
                    let tail = tail.trim_end();
                    if !tail.is_empty() {
                        let _ = writeln!(out, "  - {name} (end):");
                        let _ = writeln!(out);
                        let lines: Vec<&str> = tail.lines().rev().take(5).collect();
                        for line in lines.into_iter().rev() {
                            let _ = writeln!(out, "        {}", crate::text::one_line(line, 200));
                        }
                        let _ = writeln!(out);
                    }
                }
            }
            if let Some(artifact) = &a.artifact {
                let _ = writeln!(out, "- Decision record: {artifact}");
            }
            let _ = writeln!(out);
        }

        let _ = writeln!(out, "## Next steps");
        let _ = writeln!(out);
        for (n, step) in self.next_steps.iter().enumerate() {
            let _ = writeln!(out, "{}. {step}", n + 1);
        }
        out
    }
}
