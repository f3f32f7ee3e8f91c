//! Running an argv (never through a shell) under a deadline: the exec probe and the
//! command snapshot source.
//!
//! Commands run through [`crate::sys::child`], the same runner as the rollback hooks, with
//! the probes' policy: in its own process group, SIGKILL to the whole group at the timeout
//! (no grace: a probe must not overrun its check) or when the probe is abandoned; stdout
//! and stderr read concurrently with the wait, keeping the first [`MAX_BODY`] bytes of
//! stdout (when asked) and the last [`OUTPUT_TAIL_BYTES`] of each, so a chatty command
//! never blocks on a full pipe.

use std::process::ExitStatus;
use std::time::Duration;

use crate::sys::child::{Output, Policy, RunError};

use super::{
    substitute_worker, timeout_reason, BoxFuture, SnapshotSource, SnapshotVars, WorkerProbe,
    MAX_BODY, OUTPUT_TAIL_BYTES,
};
use crate::core::check::{ProbeOutcome, Snapshot, SnapshotOutcome};

/// How the command ended.
#[derive(Debug)]
pub(super) enum RunEnd {
    Exited(ExitStatus),
    /// Cut at the deadline; its process group was killed.
    TimedOut,
    /// It could not be started or waited for.
    Failed(String),
}

#[derive(Debug)]
pub(super) struct CommandRun {
    pub end: RunEnd,
    pub stdout: Output,
    pub stderr: Output,
}

impl CommandRun {
    fn failed(reason: String) -> Self {
        CommandRun {
            end: RunEnd::Failed(reason),
            stdout: Output::default(),
            stderr: Output::default(),
        }
    }

    /// `": <tail>"` of stderr, else of stdout, else nothing.
    pub fn output_tail_suffix(&self) -> String {
        let stderr = tail_text(&self.stderr);
        let tail = if stderr.is_empty() {
            tail_text(&self.stdout)
        } else {
            stderr
        };
        if tail.is_empty() {
            String::new()
        } else {
            format!(": {tail}")
        }
    }
}

/// The last [`OUTPUT_TAIL_BYTES`] written, trimmed.
fn tail_text(output: &Output) -> String {
    output.tail_text().trim().to_owned()
}

/// Runs `argv` through [`crate::sys::child`] with the probes' policy: bounded by
/// `timeout` in total (SIGKILL to the group at the limit, no grace: a probe must not
/// overrun its check), the first `stdout_head_limit` bytes of stdout kept, and whatever
/// still holds the pipes at the limit killed. Never panics.
pub(super) async fn run_command(
    argv: &[String],
    timeout: Duration,
    stdout_head_limit: usize,
) -> CommandRun {
    let policy = Policy {
        limit: timeout,
        term_grace: Duration::ZERO,
        pipe_grace: None,
        kill_stragglers: true,
        stdout_head: stdout_head_limit,
        tail: OUTPUT_TAIL_BYTES,
    };
    let run = match crate::sys::child::run(argv, &policy, None).await {
        Ok(run) => run,
        Err(RunError::Empty) => return CommandRun::failed("the command is empty".into()),
        Err(RunError::Spawn { program, source }) => {
            return CommandRun::failed(format!("cannot run {program:?}: {source}"))
        }
    };
    let end = match (run.timed_out, run.status) {
        (true, _) => RunEnd::TimedOut,
        (false, Some(status)) => RunEnd::Exited(status),
        (false, None) => RunEnd::Failed(format!("waiting for {:?} failed", argv[0])),
    };
    CommandRun {
        end,
        stdout: run.stdout,
        stderr: run.stderr,
    }
}

/// Exec probe: healthy iff the command exits 0 within the timeout.
pub(super) struct CommandProbe {
    argv_template: Vec<String>,
    timeout: Duration,
}

impl CommandProbe {
    pub(super) fn new(argv_template: Vec<String>, timeout: Duration) -> Self {
        CommandProbe {
            argv_template,
            timeout,
        }
    }
}

impl WorkerProbe for CommandProbe {
    fn probe<'a>(&'a self, worker: &'a str) -> BoxFuture<'a, ProbeOutcome> {
        Box::pin(async move {
            let argv: Vec<String> = self
                .argv_template
                .iter()
                .map(|arg| substitute_worker(arg, worker))
                .collect();
            let run = run_command(&argv, self.timeout, 0).await;
            match &run.end {
                RunEnd::Exited(status) if status.success() => ProbeOutcome::Ok,
                RunEnd::Exited(status) => {
                    ProbeOutcome::failed(format!("{status}{}", run.output_tail_suffix()))
                }
                RunEnd::TimedOut => ProbeOutcome::failed(format!(
                    "{}{}",
                    timeout_reason(self.timeout),
                    run.output_tail_suffix()
                )),
                RunEnd::Failed(reason) => ProbeOutcome::failed(reason.clone()),
            }
        })
    }
}

/// Command snapshot: stdout (up to [`MAX_BODY`]) parsed like the HTTP body when the
/// command exits 0; otherwise `Unavailable` with the output tail. `{worker}`,
/// `{previous}` and `{interval}` are substituted inside each argv element.
pub(super) struct CommandSnapshotSource {
    argv: Vec<String>,
    timeout: Duration,
}

impl CommandSnapshotSource {
    pub(super) fn new(argv: Vec<String>, timeout: Duration) -> Self {
        CommandSnapshotSource { argv, timeout }
    }
}

impl SnapshotSource for CommandSnapshotSource {
    fn snapshot<'a>(&'a self, vars: &'a SnapshotVars) -> BoxFuture<'a, SnapshotOutcome> {
        Box::pin(async move {
            let argv: Vec<String> = self.argv.iter().map(|a| vars.substitute_arg(a)).collect();
            let run = run_command(&argv, self.timeout, MAX_BODY).await;
            let reason = match &run.end {
                RunEnd::Exited(status) if status.success() => {
                    if run.stdout.head_cut {
                        tracing::debug!(command = ?self.argv, "snapshot output cut at {MAX_BODY} bytes");
                    }
                    return SnapshotOutcome::Values(Snapshot::from_body(&run.stdout.head));
                }
                RunEnd::Exited(status) => {
                    let stderr = tail_text(&run.stderr);
                    if stderr.is_empty() {
                        format!("{status}")
                    } else {
                        format!("{status}: {stderr}")
                    }
                }
                RunEnd::TimedOut => timeout_reason(self.timeout),
                RunEnd::Failed(reason) => reason.clone(),
            };
            SnapshotOutcome::Unavailable { reason }
        })
    }
}
