//! The one way rollbackd runs a program: an argv (never a shell) in its **own process
//! group**, stdin from `/dev/null`, stdout and stderr drained concurrently into bounded
//! buffers, and a time limit after which the whole group is stopped. Hooks and exec
//! probes/snapshots differ only in the [`Policy`] they pass:
//!
//! - at the limit: SIGTERM to the group, [`Policy::term_grace`] for it to go, then
//!   SIGKILL to the group (a zero grace is SIGKILL at once, for probes that must not
//!   overrun a check);
//! - after the program exits: its output pipes are read for [`Policy::pipe_grace`]
//!   longer (a process it left behind may still hold them); then, with
//!   [`Policy::kill_stragglers`], whatever still holds them is SIGKILLed;
//! - if the future is dropped before the program is finished with (the caller was
//!   cancelled), a guard SIGKILLs the group.
//!
//! Reaping after SIGKILL is bounded by [`REAP_AFTER_KILL`]; a child stuck in the kernel
//! beyond that is left to tokio's orphan reaper (`kill_on_drop`).

use std::future::Future;
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// How long reaping a SIGKILLed child may take before it is left to tokio's reaper.
pub const REAP_AFTER_KILL: Duration = Duration::from_millis(200);

/// How a run is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The time limit, from spawn.
    pub limit: Duration,
    /// At the limit: SIGTERM, this long, then SIGKILL. Zero: SIGKILL at once.
    pub term_grace: Duration,
    /// After the program exited: how long to keep reading its pipes. `None`: until the
    /// limit.
    pub pipe_grace: Option<Duration>,
    /// SIGKILL the group when something still holds the pipes after `pipe_grace`.
    /// Otherwise leftovers are logged and left alone (a hook may start a service).
    pub kill_stragglers: bool,
    /// How many of stdout's first bytes to keep.
    pub stdout_head: usize,
    /// How many of the last bytes of each of stdout and stderr to keep.
    pub tail: usize,
}

/// Marks a run so it can be found again after a restart (see [`crate::sys::procs`]):
/// `token` goes into the environment as `ROLLBACKD_HOOK_RUN`, and the process group is
/// sent to `spawned` as soon as the program has started.
pub struct Tracking {
    pub token: String,
    pub spawned: tokio::sync::oneshot::Sender<Spawned>,
}

/// A program that has just started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spawned {
    /// Its process group: the program's own pid.
    pub pgid: i32,
    /// The leader's start time (`/proc/PID/stat`), if it could be read.
    pub leader_start_ticks: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the command is empty")]
    Empty,
}

/// What a run did.
#[derive(Debug)]
pub struct Run {
    /// `None` when it could not be waited for (or was not reaped after SIGKILL).
    pub status: Option<ExitStatus>,
    /// The limit was reached and the group stopped.
    pub timed_out: bool,
    pub duration: Duration,
    pub stdout: Output,
    pub stderr: Output,
}

/// What was read from one pipe: its first and its last bytes.
#[derive(Debug, Default)]
pub struct Output {
    head_limit: usize,
    tail_limit: usize,
    /// The first bytes, up to the head limit.
    pub head: Vec<u8>,
    /// More than the head limit was written.
    pub head_cut: bool,
    tail: Vec<u8>,
    tail_cut: bool,
}

impl Output {
    fn new(head_limit: usize, tail_limit: usize) -> Output {
        Output {
            head_limit,
            tail_limit,
            ..Output::default()
        }
    }

    fn push(&mut self, data: &[u8]) {
        let room = self.head_limit - self.head.len();
        if data.len() > room {
            self.head_cut = true;
        }
        self.head.extend_from_slice(&data[..data.len().min(room)]);
        if data.len() >= self.tail_limit {
            self.tail_cut |= !self.tail.is_empty() || data.len() > self.tail_limit;
            self.tail.clear();
            self.tail
                .extend_from_slice(&data[data.len() - self.tail_limit..]);
            return;
        }
        self.tail.extend_from_slice(data);
        if self.tail.len() > self.tail_limit {
            let excess = self.tail.len() - self.tail_limit;
            self.tail.drain(..excess);
            self.tail_cut = true;
        }
    }

    /// The last bytes, lossily decoded; a UTF-8 sequence split by the cut is dropped
    /// rather than shown as a replacement character.
    pub fn tail_text(&self) -> String {
        let mut bytes = &self.tail[..];
        if self.tail_cut {
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

/// Runs `argv` under `policy`.
pub async fn run(
    argv: &[String],
    policy: &Policy,
    tracking: Option<Tracking>,
) -> Result<Run, RunError> {
    let (program, args) = argv.split_first().ok_or(RunError::Empty)?;
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
    let deadline = crate::sys::clock::deadline_tokio(started, policy.limit);
    let mut child = command.spawn().map_err(|source| RunError::Spawn {
        program: program.clone(),
        source,
    })?;
    // `process_group(0)` makes the child the leader of a new group whose id is its pid.
    // Taken now: `id()` is None once the child has been reaped.
    let pgid = child.id().and_then(|pid| i32::try_from(pid).ok());
    let mut group_guard = GroupGuard { pgid };
    if let (Some(spawned_to), Some(pgid)) = (spawned_to, pgid) {
        let leader_start_ticks = crate::sys::procs::stat(pgid).map(|proc| proc.start_ticks);
        let _ = spawned_to.send(Spawned {
            pgid,
            leader_start_ticks,
        });
    }

    let mut stdout = Output::new(policy.stdout_head, policy.tail);
    let mut stderr = Output::new(0, policy.tail);
    let stdout_pipe = child.stdout.take();
    let stderr_pipe = child.stderr.take();

    let (status, timed_out, drained) = {
        let mut drains = pin!(async {
            tokio::join!(
                drain_into(stdout_pipe, &mut stdout),
                drain_into(stderr_pipe, &mut stderr)
            )
        });
        let mut drained = false;
        let mut timed_out = false;
        let mut status = wait_while_draining(&mut child, &mut drains, &mut drained, deadline).await;

        if status.is_none() {
            timed_out = true;
            tracing::warn!(?argv, limit = ?policy.limit, "command timed out; stopping its process group");
            if !policy.term_grace.is_zero() {
                signal_group(pgid, libc::SIGTERM);
                let term_deadline = Instant::now() + policy.term_grace;
                status =
                    wait_while_draining(&mut child, &mut drains, &mut drained, term_deadline).await;
            }
            // Whether or not the leader went, anything left in the group gets SIGKILL.
            signal_group(pgid, libc::SIGKILL);
            if status.is_none() {
                let _ = child.start_kill();
                let reap_deadline = Instant::now() + REAP_AFTER_KILL;
                status =
                    wait_while_draining(&mut child, &mut drains, &mut drained, reap_deadline).await;
            }
        }

        // The program has exited. Output may still be in flight (or a leftover process
        // may hold the pipes open): read for a little longer, then stop.
        if !drained {
            let grace = if timed_out {
                REAP_AFTER_KILL
            } else {
                match policy.pipe_grace {
                    Some(grace) => grace,
                    None => deadline.saturating_duration_since(Instant::now()),
                }
            };
            drained = tokio::time::timeout(grace, &mut drains).await.is_ok();
        }
        (status, timed_out, drained)
    };
    let duration = started.elapsed();
    let status = match status {
        Some(Ok(status)) => Some(status),
        Some(Err(error)) => {
            tracing::warn!(?argv, %error, "cannot wait for the command");
            signal_group(pgid, libc::SIGKILL);
            None
        }
        None => None,
    };

    if !timed_out && group_has_members(pgid) {
        if policy.kill_stragglers && !drained {
            // They hold the pipes: the group id is still theirs, never reused.
            signal_group(pgid, libc::SIGKILL);
        } else {
            tracing::warn!(
                ?argv,
                pgid,
                "the command exited but left processes running in its process group; leaving them"
            );
        }
    }
    // Finished with (or already SIGKILLed): nothing for the guard to do.
    group_guard.disarm();
    Ok(Run {
        status,
        timed_out,
        duration,
        stdout,
        stderr,
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

/// Reads a pipe to its end, keeping only what `output` keeps. Read errors end the drain
/// quietly: the output is diagnostic, the exit status is what matters.
async fn drain_into(pipe: Option<impl AsyncRead + Unpin>, output: &mut Output) {
    let Some(mut pipe) = pipe else { return };
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n_read) => output.push(&chunk[..n_read]),
        }
    }
}

/// SIGKILLs the process group if the run is abandoned (future dropped) before the program
/// is finished with.
struct GroupGuard {
    pgid: Option<i32>,
}

impl GroupGuard {
    fn disarm(&mut self) {
        self.pgid = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.pgid.is_some() {
            tracing::warn!(pgid = ?self.pgid, "command abandoned before it finished; killing its process group");
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
            tracing::warn!(pgid, signal, %error, "cannot signal a process group");
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

    #[test]
    fn output_keeps_the_head_and_the_last_bytes_with_a_whole_first_character() {
        let mut output = Output::new(5, 4);
        output.push(b"abc");
        output.push(b"defgh");
        assert_eq!(output.head, b"abcde");
        assert!(output.head_cut);
        assert_eq!(output.tail_text(), "efgh");
        // "é" is two bytes; a cut in its middle drops the orphaned continuation byte.
        let mut output = Output::new(0, 3);
        output.push("xé".as_bytes());
        output.push("ab".as_bytes());
        assert_eq!(output.tail_text(), "ab");
        let mut output = Output::new(0, 8);
        output.push(b"hello");
        assert!(output.head.is_empty());
        assert_eq!(output.tail_text(), "hello");
    }
}
