//! Rollback phase hooks (SPEC §4): `pause`, `drain`, `switch`, `resume` commands given in
//! the config as **argv templates, never a shell**.
//!
//! [`render`] substitutes `{from}`, `{to}`, `{reason}` and `{operator}` inside each argv
//! element and does nothing else: no splitting, no globbing, no quoting rules. A reason such
//! as `oops; rm -rf /` stays one literal argument, and a substituted value is never scanned
//! again (a reason containing `{to}` stays `{to}`).
//!
//! [`run_hook`] runs the rendered argv with a time limit and reports what happened as data
//! ([`HookOutcome`]): a hook that fails or times out is a fact for the caller to record and
//! act on, not an error. Only "could not start it at all" is a [`HookError`].
//!
//! Hooks run through [`crate::sys::child`], the runner exec probes use too, with the
//! hooks' policy. Process hygiene, because hooks are arbitrary programs run by a daemon
//! that must keep running for weeks:
//! - each hook leads its **own process group**, so a timeout can stop everything it started
//!   (a `sh -c 'sleep 30 & sleep 30'` leaves no survivor): SIGTERM to the group, up to
//!   [`TERM_GRACE`] for it to go, then SIGKILL to the group;
//! - stdout and stderr are drained concurrently and only their last [`TAIL_BYTES`] are
//!   kept, so a chatty hook can neither exhaust memory nor block on a full pipe;
//! - if the `run_hook` future is dropped before the hook finishes (the caller was
//!   cancelled), a drop guard SIGKILLs the group;
//! - a hook that exits normally but leaves background processes behind in its group is
//!   logged and those processes are left alone (they may be intended, e.g. a started
//!   service); a background process that keeps the output pipes open does not hold the
//!   hook up for more than [`PIPE_GRACE`] after it exits.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use serde::Serialize;

use crate::sys::child::{Policy, RunError};

/// How much of each of stdout and stderr is kept (the end of it).
pub const TAIL_BYTES: usize = 4096;

/// After SIGTERM to a timed-out hook's group, how long before SIGKILL.
pub const TERM_GRACE: Duration = crate::config::HOOK_TERM_GRACE;

/// After the hook process has exited, how long to keep reading output that is still
/// arriving (from processes it left running) before giving up on the pipes.
pub const PIPE_GRACE: Duration = crate::config::HOOK_PIPE_GRACE;

/// Values substituted into a hook's argv template.
#[derive(Debug, Clone, Default)]
pub struct HookVars {
    /// `{from}`: the worker being left.
    pub from: String,
    /// `{to}`: the worker being restored.
    pub to: String,
    /// `{reason}`: why (free text from the engine or the operator).
    pub reason: String,
    /// `{operator}`: who (e.g. `uid:1000(alice)` or `automatic`).
    pub operator: String,
}

/// Replaces `{from}`, `{to}`, `{reason}` and `{operator}` inside each element of the
/// template. Anything else, including unknown `{names}`, is copied verbatim; the result has
/// exactly as many elements as the template.
pub fn render(argv_template: &[String], vars: &HookVars) -> Vec<String> {
    argv_template
        .iter()
        .map(|element| render_one(element, vars))
        .collect()
}

/// One left-to-right pass, so substituted text is never itself substituted.
fn render_one(template: &str, vars: &HookVars) -> String {
    let placeholders: [(&str, &str); 4] = [
        ("{from}", &vars.from),
        ("{to}", &vars.to),
        ("{reason}", &vars.reason),
        ("{operator}", &vars.operator),
    ];
    let mut rendered = String::with_capacity(template.len());
    let mut rest = template;
    'scan: while let Some(brace_idx) = rest.find('{') {
        rendered.push_str(&rest[..brace_idx]);
        let candidate = &rest[brace_idx..];
        for (placeholder, value) in placeholders {
            if let Some(after) = candidate.strip_prefix(placeholder) {
                rendered.push_str(value);
                rest = after;
                continue 'scan;
            }
        }
        rendered.push('{');
        rest = &candidate[1..];
    }
    rendered.push_str(rest);
    rendered
}

/// What a hook run did. Serialized into decision artifacts, so the JSON shape is pinned by
/// a test.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HookOutcome {
    /// The argv actually run (after substitution).
    pub argv: Vec<String>,
    /// Exit status, if the hook exited (rather than being killed by a signal).
    pub exit_code: Option<i32>,
    /// The signal that ended the hook, if one did.
    pub signal: Option<i32>,
    /// The hook ran past its limit and its process group was stopped.
    pub timed_out: bool,
    /// From spawn until the hook process was reaped.
    pub duration_seconds: f64,
    /// The last [`TAIL_BYTES`] of stdout, lossily decoded as UTF-8.
    pub stdout_tail: String,
    /// The last [`TAIL_BYTES`] of stderr, lossily decoded as UTF-8.
    pub stderr_tail: String,
}

impl HookOutcome {
    /// Exit status 0 within the time limit.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hook argv is empty")]
    Empty,
}

pub use crate::sys::child::{Spawned, Tracking};

/// Renders the template and runs it, giving it `limit` to finish (see the module docs for
/// what happens at the limit and on cancellation).
pub async fn run_hook(
    argv_template: &[String],
    vars: &HookVars,
    limit: Duration,
) -> Result<HookOutcome, HookError> {
    run_hook_tracked(argv_template, vars, limit, None).await
}

/// [`run_hook`], telling `tracking` where the hook runs.
pub async fn run_hook_tracked(
    argv_template: &[String],
    vars: &HookVars,
    limit: Duration,
    tracking: Option<Tracking>,
) -> Result<HookOutcome, HookError> {
    let argv = render(argv_template, vars);
    let policy = Policy {
        limit,
        term_grace: TERM_GRACE,
        pipe_grace: Some(PIPE_GRACE),
        // Processes a hook leaves behind may be intended (a started service).
        kill_stragglers: false,
        stdout_head: 0,
        tail: TAIL_BYTES,
    };
    let run = crate::sys::child::run(&argv, &policy, tracking)
        .await
        .map_err(|error| match error {
            RunError::Empty => HookError::Empty,
            RunError::Spawn { program, source } => HookError::Spawn { program, source },
        })?;
    let (exit_code, signal) = split_status(run.status);
    Ok(HookOutcome {
        argv,
        exit_code,
        signal,
        timed_out: run.timed_out,
        duration_seconds: run.duration.as_secs_f64(),
        stdout_tail: run.stdout.tail_text(),
        stderr_tail: run.stderr.tail_text(),
    })
}

fn split_status(status: Option<ExitStatus>) -> (Option<i32>, Option<i32>) {
    match status {
        Some(status) => (status.code(), status.signal()),
        None => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| item.to_string()).collect()
    }

    #[test]
    fn render_substitutes_every_placeholder_in_place() {
        let vars = HookVars {
            from: "v2".into(),
            to: "v1".into(),
            reason: "high error rate; rm -rf / $(id) `id` *".into(),
            operator: "uid:1000(alice)".into(),
        };
        let argv = render(
            &strings(&[
                "/bin/switch",
                "--to={to}",
                "{from}->{to}",
                "{reason}",
                "by {operator}",
                "{unknown} {to",
            ]),
            &vars,
        );
        assert_eq!(
            argv,
            strings(&[
                "/bin/switch",
                "--to=v1",
                "v2->v1",
                "high error rate; rm -rf / $(id) `id` *",
                "by uid:1000(alice)",
                "{unknown} {to",
            ])
        );
    }

    #[test]
    fn render_never_substitutes_inside_substituted_text() {
        let vars = HookVars {
            to: "v1".into(),
            reason: "{to}{operator}".into(),
            ..HookVars::default()
        };
        assert_eq!(
            render(&strings(&["{reason}"]), &vars),
            strings(&["{to}{operator}"])
        );
    }

    #[test]
    fn outcome_json_shape_is_pinned() {
        let outcome = HookOutcome {
            argv: strings(&["/bin/true"]),
            exit_code: Some(0),
            signal: None,
            timed_out: false,
            duration_seconds: 0.5,
            stdout_tail: "out".into(),
            stderr_tail: String::new(),
        };
        assert_eq!(
            serde_json::to_value(&outcome).unwrap(),
            serde_json::json!({
                "argv": ["/bin/true"], "exitCode": 0, "signal": null, "timedOut": false,
                "durationSeconds": 0.5, "stdoutTail": "out", "stderrTail": ""
            })
        );
        assert!(outcome.succeeded());
    }
}
