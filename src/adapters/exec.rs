//! Running an argv (never through a shell) under a deadline: the exec probe and the
//! command snapshot source.
//!
//! The command runs in its own process group so that on timeout the whole group (the
//! command and anything it started) is killed with SIGKILL, not just the direct child.
//! Its stdout and stderr are read concurrently with the wait, keeping the first
//! [`MAX_BODY`] bytes of stdout (when asked) and the last [`OUTPUT_TAIL_BYTES`] of each;
//! the rest is read and discarded so a chatty command never blocks on a full pipe.

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

use super::{
    substitute_worker, timeout_reason, BoxFuture, SnapshotSource, WorkerProbe, MAX_BODY,
    OUTPUT_TAIL_BYTES,
};
use crate::core::check::{ProbeOutcome, Snapshot, SnapshotOutcome};

/// How long output readers get to drain the pipes after the command's group was killed.
const DRAIN_AFTER_KILL: Duration = Duration::from_millis(200);
/// How long reaping a SIGKILLed child may take before it is left to tokio's orphan
/// reaper (`kill_on_drop`). Together with [`DRAIN_AFTER_KILL`] this bounds how far past
/// the check timeout a timed-out command can keep the caller: 400 ms at worst, a few
/// milliseconds in practice.
const REAP_AFTER_KILL: Duration = Duration::from_millis(200);

/// What was read from one pipe.
#[derive(Debug, Default)]
pub(super) struct Captured {
    /// The first bytes, up to the head limit given to [`run_command`].
    pub head: Vec<u8>,
    /// More than the head limit was written.
    pub head_cut: bool,
    /// The last bytes (at most 2 × [`OUTPUT_TAIL_BYTES`]; see [`Captured::tail_text`]).
    tail: Vec<u8>,
}

impl Captured {
    fn push(&mut self, bytes: &[u8], head_limit: usize) {
        let room = head_limit - self.head.len();
        if bytes.len() > room {
            self.head_cut = true;
        }
        self.head.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.tail.extend_from_slice(bytes);
        if self.tail.len() > 2 * OUTPUT_TAIL_BYTES {
            let excess = self.tail.len() - OUTPUT_TAIL_BYTES;
            self.tail.drain(..excess);
        }
    }

    /// The last [`OUTPUT_TAIL_BYTES`] written, lossy UTF-8, trimmed.
    pub fn tail_text(&self) -> String {
        let start = self.tail.len().saturating_sub(OUTPUT_TAIL_BYTES);
        String::from_utf8_lossy(&self.tail[start..])
            .trim()
            .to_owned()
    }
}

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
    pub stdout: Captured,
    pub stderr: Captured,
}

impl CommandRun {
    fn failed(reason: String) -> Self {
        CommandRun {
            end: RunEnd::Failed(reason),
            stdout: Captured::default(),
            stderr: Captured::default(),
        }
    }

    /// `": <tail>"` of stderr, else of stdout, else nothing.
    pub fn output_tail_suffix(&self) -> String {
        let stderr = self.stderr.tail_text();
        let tail = if stderr.is_empty() {
            self.stdout.tail_text()
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

/// Sends SIGKILL to the process group `pgid` (the command was its leader).
fn kill_group(pgid: Option<u32>) {
    if let Some(pgid) = pgid
        .and_then(|pid| i32::try_from(pid).ok())
        .filter(|p| *p > 0)
    {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory involved.
        // ESRCH (the group is already gone) is the expected failure and is ignored.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

fn spawn_reader<R>(
    pipe: Option<R>,
    head_limit: usize,
) -> (Arc<Mutex<Captured>>, tokio::task::JoinHandle<()>)
where
    R: AsyncRead + Unpin + Send + 'static,
{
    // The capture lives outside the task so that whatever was read survives an abort.
    let captured = Arc::new(Mutex::new(Captured::default()));
    let sink = Arc::clone(&captured);
    let handle = tokio::spawn(async move {
        let Some(mut pipe) = pipe else { return };
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match pipe.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Ok(mut captured) = sink.lock() {
                        captured.push(&buffer[..n], head_limit);
                    }
                }
            }
        }
    });
    (captured, handle)
}

/// Waits for a reader until `deadline`; aborts it then. Returns whether it finished.
async fn join_reader_until(handle: &mut tokio::task::JoinHandle<()>, deadline: Instant) -> bool {
    if tokio::time::timeout_at(deadline, &mut *handle)
        .await
        .is_ok()
    {
        return true;
    }
    handle.abort();
    false
}

fn take_captured(captured: &Arc<Mutex<Captured>>) -> Captured {
    captured
        .lock()
        .map(|mut guard| std::mem::take(&mut *guard))
        .unwrap_or_default()
}

/// Runs `argv` with stdin from /dev/null, bounded by `timeout` in total. Keeps the first
/// `stdout_head_limit` bytes of stdout. Never panics; a command that cannot be started is
/// `RunEnd::Failed`.
pub(super) async fn run_command(
    argv: &[String],
    timeout: Duration,
    stdout_head_limit: usize,
) -> CommandRun {
    let deadline = crate::sys::clock::deadline_tokio(Instant::now(), timeout);
    let Some((program, args)) = argv.split_first() else {
        return CommandRun::failed("the command is empty".into());
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return CommandRun::failed(format!("cannot run {program:?}: {error}")),
    };
    // The child leads its own group, so the group id is its pid. Taken now: `id()` is
    // None once the child has been reaped.
    let pgid = child.id();
    let (stdout, mut stdout_task) = spawn_reader(child.stdout.take(), stdout_head_limit);
    let (stderr, mut stderr_task) = spawn_reader(child.stderr.take(), 0);

    let end = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(Ok(status)) => RunEnd::Exited(status),
        Ok(Err(error)) => {
            kill_group(pgid);
            RunEnd::Failed(format!("waiting for {program:?} failed: {error}"))
        }
        Err(_) => {
            // Not reaped yet, so the group id cannot have been reused.
            kill_group(pgid);
            let _ = child.start_kill();
            let _ = tokio::time::timeout(REAP_AFTER_KILL, child.wait()).await;
            RunEnd::TimedOut
        }
    };

    // After a normal exit the pipes close at once unless something the command started
    // still holds them: give the readers the rest of the deadline, then kill the group
    // (the stragglers holding the pipes keep the group id alive) and stop reading.
    let drain_deadline = match end {
        RunEnd::Exited(_) => deadline.max(Instant::now()),
        _ => Instant::now() + DRAIN_AFTER_KILL,
    };
    let stdout_done = join_reader_until(&mut stdout_task, drain_deadline).await;
    let stderr_done = join_reader_until(&mut stderr_task, drain_deadline).await;
    if !(stdout_done && stderr_done) && matches!(end, RunEnd::Exited(_)) {
        kill_group(pgid);
    }
    CommandRun {
        end,
        stdout: take_captured(&stdout),
        stderr: take_captured(&stderr),
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
/// command exits 0; otherwise `Unavailable` with the output tail.
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
    fn snapshot(&self) -> BoxFuture<'_, SnapshotOutcome> {
        Box::pin(async move {
            let run = run_command(&self.argv, self.timeout, MAX_BODY).await;
            let reason = match &run.end {
                RunEnd::Exited(status) if status.success() => {
                    if run.stdout.head_cut {
                        tracing::debug!(command = ?self.argv, "snapshot output cut at {MAX_BODY} bytes");
                    }
                    return SnapshotOutcome::Values(Snapshot::from_body(&run.stdout.head));
                }
                RunEnd::Exited(status) => {
                    let stderr = run.stderr.tail_text();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_head_and_bounded_tail() {
        let mut captured = Captured::default();
        for i in 0..100u8 {
            captured.push(&[b'a' + i % 26; 100], 250);
        }
        assert_eq!(captured.head.len(), 250);
        assert!(captured.head_cut);
        assert!(captured.tail.len() <= 2 * OUTPUT_TAIL_BYTES);
        assert_eq!(captured.tail_text().len(), OUTPUT_TAIL_BYTES);
        // The very last byte written is the tail's last byte.
        assert!(captured.tail_text().ends_with(char::from(b'a' + 99 % 26)));
    }

    #[test]
    fn capture_with_zero_head_keeps_only_tail() {
        let mut captured = Captured::default();
        captured.push(b"hello", 0);
        assert!(captured.head.is_empty());
        assert_eq!(captured.tail_text(), "hello");
    }
}
