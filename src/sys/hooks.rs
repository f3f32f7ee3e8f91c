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
//! Process hygiene, because hooks are arbitrary programs run by a daemon that must keep
//! running for weeks:
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

use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

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

/// Marks a hook run so it can be found again after a restart (see [`crate::sys::procs`]):
/// `token` goes into the hook's environment as `ROLLBACKD_HOOK_RUN`, and the process
/// group is sent to `spawned` as soon as the hook has started.
pub struct Tracking {
    pub token: String,
    pub spawned: tokio::sync::oneshot::Sender<Spawned>,
}

/// A hook that has just started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawned {
    /// Its process group: the hook's own pid.
    pub pgid: i32,
    /// The leader's start time (`/proc/PID/stat`), if it could be read.
    pub leader_start_ticks: Option<u64>,
}

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
    let (program, args) = argv.split_first().ok_or(HookError::Empty)?;

    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        // Belt and braces with the group guard: tokio also reaps a dropped child.
        .kill_on_drop(true);
    let spawned_to = tracking.map(|tracking| {
        command.env(crate::sys::procs::HOOK_RUN_ENV, &tracking.token);
        tracking.spawned
    });

    let started = Instant::now();
    let mut child = command.spawn().map_err(|source| HookError::Spawn {
        program: program.clone(),
        source,
    })?;
    // `process_group(0)` makes the child the leader of a new group whose id is its pid.
    let pgid = child.id().and_then(|pid| i32::try_from(pid).ok());
    let mut group_guard = ProcessGroupGuard { pgid };
    if let (Some(spawned_to), Some(pgid)) = (spawned_to, pgid) {
        let leader_start_ticks = crate::sys::procs::stat(pgid).map(|proc| proc.start_ticks);
        let _ = spawned_to.send(Spawned {
            pgid,
            leader_start_ticks,
        });
    }

    let mut stdout_tail = TailBuffer::default();
    let mut stderr_tail = TailBuffer::default();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();

    let (status, timed_out) = {
        let mut drains = pin!(async {
            tokio::join!(
                drain_into(stdout, &mut stdout_tail),
                drain_into(stderr, &mut stderr_tail)
            )
        });
        let mut drained = false;

        let deadline = crate::sys::clock::deadline_tokio(started, limit);
        let mut timed_out = false;
        let mut status = wait_while_draining(&mut child, &mut drains, &mut drained, deadline).await;

        if status.is_none() {
            timed_out = true;
            tracing::warn!(?argv, ?limit, "hook timed out; stopping its process group");
            signal_group(pgid, libc::SIGTERM);
            let term_deadline = Instant::now() + TERM_GRACE;
            status =
                wait_while_draining(&mut child, &mut drains, &mut drained, term_deadline).await;
            // Whether or not the leader went, anything left in the group gets SIGKILL.
            signal_group(pgid, libc::SIGKILL);
            if status.is_none() {
                status = Some(child.wait().await);
            }
        }

        // The hook has exited. Output may still be in flight (or a leftover process may
        // hold the pipes open): read for a little longer, then stop.
        if !drained {
            let _ = tokio::time::timeout(PIPE_GRACE, &mut drains).await;
        }
        (status, timed_out)
    };
    let duration_seconds = started.elapsed().as_secs_f64();
    let status = match status {
        Some(Ok(status)) => Some(status),
        Some(Err(error)) => {
            tracing::warn!(?argv, %error, "cannot wait for hook process");
            None
        }
        None => None,
    };

    if !timed_out && group_has_members(pgid) {
        tracing::warn!(
            ?argv,
            pgid,
            "hook exited but left processes running in its process group; leaving them"
        );
    }
    // Finished normally (or already SIGKILLed): nothing for the guard to do.
    group_guard.disarm();

    let (exit_code, signal) = split_status(status);
    Ok(HookOutcome {
        argv,
        exit_code,
        signal,
        timed_out,
        duration_seconds,
        stdout_tail: stdout_tail.into_string(),
        stderr_tail: stderr_tail.into_string(),
    })
}

/// Waits for the child until `deadline`, draining its pipes meanwhile. `None` on deadline.
async fn wait_while_draining(
    child: &mut tokio::process::Child,
    drains: &mut (impl Future + Unpin),
    drained: &mut bool,
    deadline: Instant,
) -> Option<std::io::Result<ExitStatus>> {
    let sleep = tokio::time::sleep_until(deadline);
    let mut sleep = pin!(sleep);
    loop {
        tokio::select! {
            // `Child::wait` is cancel safe, so losing a round of the select is harmless.
            status = child.wait() => return Some(status),
            () = &mut sleep => return None,
            _ = &mut *drains, if !*drained => *drained = true,
        }
    }
}

fn split_status(status: Option<ExitStatus>) -> (Option<i32>, Option<i32>) {
    match status {
        Some(status) => (status.code(), status.signal()),
        None => (None, None),
    }
}

/// Reads a pipe to its end, keeping only the tail. Read errors end the drain quietly: the
/// output is diagnostic, the exit status is what matters.
async fn drain_into(pipe: Option<impl AsyncRead + Unpin>, tail: &mut TailBuffer) {
    let Some(mut pipe) = pipe else { return };
    let mut chunk = vec![0u8; 8192];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n_read) => tail.push(&chunk[..n_read]),
        }
    }
}

/// The last [`TAIL_BYTES`] bytes written to it.
#[derive(Default)]
struct TailBuffer {
    bytes: Vec<u8>,
    truncated: bool,
}

impl TailBuffer {
    fn push(&mut self, data: &[u8]) {
        if data.len() >= TAIL_BYTES {
            self.truncated |= !self.bytes.is_empty() || data.len() > TAIL_BYTES;
            self.bytes.clear();
            self.bytes
                .extend_from_slice(&data[data.len() - TAIL_BYTES..]);
            return;
        }
        self.bytes.extend_from_slice(data);
        if self.bytes.len() > TAIL_BYTES {
            let excess = self.bytes.len() - TAIL_BYTES;
            self.bytes.drain(..excess);
            self.truncated = true;
        }
    }

    fn into_string(self) -> String {
        let mut bytes = &self.bytes[..];
        if self.truncated {
            // The cut may have split a UTF-8 sequence: drop its orphaned continuation
            // bytes rather than showing a replacement character. At most 3 bytes.
            let n_continuation = bytes
                .iter()
                .take(3)
                .take_while(|byte| (**byte & 0b1100_0000) == 0b1000_0000)
                .count();
            bytes = &bytes[n_continuation..];
        }
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// SIGKILLs the hook's process group if the run is abandoned (future dropped) before the
/// hook is finished with.
struct ProcessGroupGuard {
    pgid: Option<i32>,
}

impl ProcessGroupGuard {
    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for ProcessGroupGuard {
    fn drop(&mut self) {
        if self.pgid.is_some() {
            tracing::warn!(pgid = ?self.pgid, "hook abandoned before it finished; killing its process group");
            signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

fn signal_group(pgid: Option<i32>, signal: libc::c_int) {
    // Never signal group 0 (our own) or a negative id (-1 would mean "every process").
    let Some(pgid) = pgid.filter(|pgid| *pgid > 1) else {
        return;
    };
    // SAFETY: killpg has no memory-safety preconditions.
    let rc = unsafe { libc::killpg(pgid, signal) };
    if rc != 0 {
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ESRCH) {
            tracing::warn!(pgid, signal, %error, "cannot signal hook process group");
        }
    }
}

fn group_has_members(pgid: Option<i32>) -> bool {
    let Some(pgid) = pgid.filter(|pgid| *pgid > 1) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::killpg(pgid, 0) == 0 }
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
    fn tail_buffer_keeps_the_last_bytes_and_a_whole_first_character() {
        let mut tail = TailBuffer::default();
        tail.push(b"x");
        // "é" is two bytes; make the cut fall inside one.
        let text = "é".repeat(TAIL_BYTES);
        for chunk in text.as_bytes().chunks(1000) {
            tail.push(chunk);
        }
        let kept = tail.into_string();
        assert!(!kept.contains('\u{fffd}'));
        assert_eq!(kept.len(), TAIL_BYTES);
        assert!(kept.chars().all(|c| c == 'é'));
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
