//! Operator commands: `promote`, `status`, `rollback`, `kill-switch`, `pause`, `resume`.
//!
//! Each goes through the daemon's control socket when the daemon runs, so the driver
//! stays the one owner of the session. When no daemon answers, the command acts on the
//! state directly, holding the state directory's lock so a daemon starting meanwhile
//! cannot act at the same time.

use std::borrow::Cow;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::cli::args::{Command, KillSwitchAction};
use crate::config::LoadedConfig;
use crate::control::status::StatusReport;
use crate::control::{self, CallError, Operator, Reply, Request};
use crate::daemon::{Driver, DriverInputs, SystemClock};
use crate::exit::{self, Refused};
use crate::storage::audit::rfc3339_millis;
use crate::text::Escaped;

/// Runs one operator command; returns the exit status.
pub async fn run(command: &Command, loaded: &LoadedConfig) -> anyhow::Result<u8> {
    let request = match command {
        Command::Promote {
            active,
            previous,
            baseline_error_rate,
            baseline_latency_p95_ms,
            force,
            reason,
        } => Request::Promote {
            active: active.clone(),
            previous: previous.clone(),
            baseline_error_rate: *baseline_error_rate,
            baseline_latency_p95_ms: *baseline_latency_p95_ms,
            force: *force,
            reason: reason.clone(),
        },
        Command::Status { .. } => Request::Status,
        Command::Rollback {
            reason,
            emergency,
            force,
            ..
        } => Request::Rollback {
            reason: reason.clone(),
            emergency: *emergency,
            force: *force,
        },
        Command::KillSwitch { action } => match action {
            KillSwitchAction::Set {
                reason,
                fleet: true,
            } => {
                let reason = reason.clone().unwrap_or_default();
                return crate::cli::fleet::kill_switch(loaded, "1", &reason, false).await;
            }
            KillSwitchAction::Reset {
                reason,
                fleet: true,
                force,
            } => {
                let reason = reason.clone().unwrap_or_default();
                return crate::cli::fleet::kill_switch(loaded, "0", &reason, *force).await;
            }
            KillSwitchAction::Set { reason, .. } => Request::KillSwitchSet {
                reason: reason.clone().unwrap_or_else(|| "manual".into()),
            },
            KillSwitchAction::Reset { reason, force, .. } => Request::KillSwitchReset {
                reason: reason.clone().unwrap_or_else(|| "manual reset".into()),
                force: *force,
            },
            KillSwitchAction::Status => Request::KillSwitchStatus,
        },
        Command::Pause { reason } => Request::Pause {
            reason: reason.clone(),
        },
        Command::Resume => Request::Resume,
        _ => unreachable!("not an operator command"),
    };
    // The CLI's parsers already check these; the same rules, once more, for every path.
    if let Err(problem) = request.validate() {
        eprintln!("rollbackd: {problem}");
        return Ok(exit::USAGE);
    }

    if let Command::Rollback {
        yes,
        emergency,
        reason,
        ..
    } = command
    {
        if !yes && std::io::stdin().is_terminal() {
            let (active, previous) = status_report(loaded).await?.workers();
            eprint!(
                "{} rollback from {} to {} (reason: {})? [y/N] ",
                if *emergency { "EMERGENCY" } else { "Manual" },
                Escaped(active.as_deref().unwrap_or("?")),
                Escaped(previous.as_deref().unwrap_or("?")),
                Escaped(reason),
            );
            let mut answer = String::new();
            std::io::stdin().lock().read_line(&mut answer)?;
            if !matches!(answer.trim(), "y" | "Y" | "yes") {
                return Err(Refused("rollback not confirmed".into()).into());
            }
        }
    }

    let socket = loaded.config.socket_path();
    let json_status = matches!(command, Command::Status { json: true });
    let limit = request_limit(&request, loaded);
    let result = call_within(&socket, &request, limit, |message, _detail| {
        eprintln!("  {} {}", short_time(SystemTime::now()), Escaped(message));
    })
    .await;
    let value = match result {
        Ok(value) => value,
        Err(err) if err.is_not_running() => {
            tracing::debug!(
                "no daemon answers on {}: acting on the state directly",
                socket.display()
            );
            match local(&request, loaded).await {
                Ok(value) => Some(value),
                Err(err) => {
                    if let Some(CallError::Failed { message, exit }) = err.downcast_ref() {
                        eprintln!("rollbackd: {}", Escaped(message));
                        return Ok(*exit);
                    }
                    return Err(err);
                }
            }
        }
        Err(CallError::Failed { message, exit }) => {
            eprintln!("rollbackd: {}", Escaped(&message));
            return Ok(exit);
        }
        Err(err) => return Err(err.into()),
    };
    let Some(value) = value else {
        eprintln!("rollbackd: {}", timed_out_message(&request, limit));
        return Ok(exit::FAILURE);
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match command {
        Command::Status { .. } if json_status => {
            writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        }
        Command::Status { .. } => {
            let report: StatusReport = serde_json::from_value(value)
                .map_err(|e| anyhow::anyhow!("the daemon's status is not readable: {e}"))?;
            report.render(&mut out)?;
        }
        Command::Promote { .. } => {
            let note = if value.get("recordedOnly").and_then(Value::as_bool) == Some(true) {
                " (no daemon running: recorded; monitoring starts when rollbackd starts)"
            } else {
                ""
            };
            writeln!(
                out,
                "monitoring session {} started: active {}, previous {}{note}",
                show(&value["sessionId"], "?"),
                show(&value["active"], "?"),
                show(&value["previous"], "?"),
            )?;
            writeln!(out, "baseline: {}", show(&value["baselineSummary"], "?"))?;
        }
        Command::Rollback { .. } => match value["outcome"].as_str() {
            Some("rolled-back") => writeln!(
                out,
                "rolled back {} → {}; artifact {}",
                show(&value["from"], "?"),
                show(&value["to"], "?"),
                show(&value["artifact"], "?")
            )?,
            Some("escalated") => {
                writeln!(
                    out,
                    "the rollback failed and rollbackd escalated (kill switch on); artifact {}",
                    show(&value["artifact"], "?")
                )?;
                return Ok(exit::FAILURE);
            }
            _ => writeln!(out, "{}", Escaped(&value.to_string()))?,
        },
        Command::KillSwitch {
            action: KillSwitchAction::Status,
        } => {
            let on = value["on"].as_bool().unwrap_or(false);
            writeln!(
                out,
                "{}={} ({})",
                show(&value["key"], "DISABLE_NEW"),
                show(&value["value"], "unset"),
                if on {
                    "ON: apps use their safe flag defaults"
                } else {
                    "off"
                }
            )?;
        }
        Command::KillSwitch { .. } => {
            writeln!(
                out,
                "{}={} (was {})",
                show(&value["key"], "?"),
                show(&value["value"], "?"),
                show(&value["previous"], "unset")
            )?;
            if value["session"].is_string() {
                writeln!(out, "{}", show(&value["session"], ""))?;
            }
        }
        Command::Pause { .. } | Command::Resume => writeln!(
            out,
            "automatic actions {}",
            if value["paused"].as_bool() == Some(true) {
                "paused (checks continue)"
            } else {
                "resumed"
            }
        )?,
        _ => {}
    }
    Ok(exit::SUCCESS)
}

/// A string field of a reply, escaped for the terminal (see [`crate::text`]).
fn show<'a>(value: &'a Value, default: &'a str) -> Cow<'a, str> {
    crate::text::escape(value.as_str().unwrap_or(default))
}

fn short_time(t: SystemTime) -> String {
    let text = rfc3339_millis(t);
    text.get(11..23).unwrap_or(&text).to_owned()
}

/// The most a request other than a rollback may take: they touch the database and the
/// kill-switch database, each bounded by its busy timeout, and nothing else.
pub const REQUEST_LIMIT: Duration = Duration::from_secs(60);
/// Added to a rollback's configured worst case for what is not bounded by a hook or a
/// verification timeout (hook kill grace, database writes, the alert).
pub const ROLLBACK_MARGIN: Duration = Duration::from_secs(60);

/// How long the CLI waits for the daemon's final answer to `request`: a rollback as long
/// as its configured worst case (every attempt, every hook to its timeout, the whole
/// verification) plus [`ROLLBACK_MARGIN`]; anything else [`REQUEST_LIMIT`].
pub fn request_limit(request: &Request, loaded: &LoadedConfig) -> Duration {
    match request {
        Request::Rollback { .. } => crate::config::rollback_worst_case(&loaded.config.rollback)
            .saturating_add(ROLLBACK_MARGIN),
        _ => REQUEST_LIMIT,
    }
}

/// [`control::call`] with a time limit: `Ok(None)` when no final answer came within `limit`.
pub async fn call_within(
    socket: &std::path::Path,
    request: &Request,
    limit: Duration,
    on_progress: impl FnMut(&str, &serde_json::Value),
) -> Result<Option<Value>, CallError> {
    match tokio::time::timeout(limit, control::call(socket, request, on_progress)).await {
        Ok(result) => result.map(Some),
        Err(_) => Ok(None),
    }
}

/// What the CLI says when the daemon gave no final answer in time.
pub fn timed_out_message(request: &Request, limit: Duration) -> String {
    let what = match request {
        Request::Rollback { .. } => format!(
            "the rollback did not finish within {} (the configured worst case of              rollback.hook_timeout, rollback.verify_timeout and rollback.max_attempts, plus {})",
            crate::config::show(limit),
            crate::config::show(ROLLBACK_MARGIN)
        ),
        _ => format!(
            "the daemon gave no answer within {}",
            crate::config::show(limit)
        ),
    };
    format!(
        "{what}; it may still be working on it. Check `rollbackd status` and \
         `rollbackd audit tail` for what it did, and the daemon's log (journalctl -u rollbackd) \
         for what it is waiting on"
    )
}

async fn status_report(loaded: &LoadedConfig) -> anyhow::Result<StatusReport> {
    let socket = loaded.config.socket_path();
    match call_within(&socket, &Request::Status, REQUEST_LIMIT, |_, _| {}).await {
        Ok(Some(value)) => serde_json::from_value(value)
            .map_err(|e| anyhow::anyhow!("the daemon's status is not readable: {e}")),
        Ok(None) => Err(anyhow::anyhow!(timed_out_message(
            &Request::Status,
            REQUEST_LIMIT
        ))),
        Err(err) if err.is_not_running() => offline_status(loaded).await,
        Err(err) => Err(err.into()),
    }
}

/// `status` without a daemon, read on the blocking pool (SQLite never runs on the
/// runtime's thread).
async fn offline_status(loaded: &LoadedConfig) -> anyhow::Result<StatusReport> {
    let loaded = loaded.clone();
    tokio::task::spawn_blocking(move || crate::daemon::status::offline(&loaded)).await?
}

/// The command carried out without a daemon.
async fn local(request: &Request, loaded: &LoadedConfig) -> anyhow::Result<Value> {
    if matches!(request, Request::Status) {
        return Ok(serde_json::to_value(offline_status(loaded).await?)?);
    }
    if let Request::KillSwitchStatus = request {
        let ks = loaded.config.kill_switch.clone();
        let state = {
            let ks = ks.clone();
            tokio::task::spawn_blocking(move || {
                crate::appdb::killswitch::KillSwitchState::read(
                    &ks.database,
                    &ks.key,
                    ks.create_database,
                )
            })
            .await?
        };
        if let crate::appdb::killswitch::KillSwitchState::Unknown(why) = &state {
            anyhow::bail!("the kill switch is UNKNOWN: {why}");
        }
        return Ok(state.to_json(&ks.key));
    }
    let state_dir = loaded.config.state_dir.clone();
    let _lock = crate::daemon::service::try_lock_state(&state_dir)?.ok_or_else(|| {
            anyhow::anyhow!(
                "the daemon holds {} but does not answer on {}; try again, or check `systemctl status rollbackd`",
                state_dir.display(),
                loaded.config.socket_path().display()
            )
        })?;
    if matches!(request, Request::Rollback { .. }) {
        // The switch and verify hooks are about to run: the same checks as `run`'s.
        crate::daemon::service::check_runnable(loaded)?;
    }
    // A version another host of the fleet rolled back is not promoted unless forced: the
    // daemon's gate, over what this command reads from etcd.
    let fleet = match (request, &loaded.config.fleet) {
        (Request::Promote { active, .. }, Some(fleet)) => {
            Some(crate::daemon::fleet::FleetInputs::Read(
                crate::cli::fleet::read_for_promotion(fleet, active).await,
            ))
        }
        _ => None,
    };
    one_shot(request, loaded, fleet).await
}

/// Runs one operator command through the daemon's own Supervisor and effect runner, in
/// this process (the caller holds the state lock): the same validation, records and
/// actions as with a daemon, and nothing checked. Progress goes to stderr as it arrives.
async fn one_shot(
    request: &Request,
    loaded: &LoadedConfig,
    fleet: Option<crate::daemon::fleet::FleetInputs>,
) -> anyhow::Result<Value> {
    let (commands_tx, commands_rx) = mpsc::channel(1);
    let (replies_tx, mut replies_rx) = mpsc::channel(16);
    commands_tx
        .send(control::Command {
            operator: Operator::current(),
            request: request.clone(),
            replies: replies_tx,
        })
        .await
        .map_err(|_| anyhow::anyhow!("the in-process runner is gone"))?;
    drop(commands_tx);
    let inputs = DriverInputs {
        fleet,
        one_shot: true,
        factory: crate::daemon::service::real_adapters(),
        clock: Arc::new(SystemClock),
        commands: commands_rx,
        flags: None,
        reload: None,
        shutdown: tokio_util::sync::CancellationToken::new(),
        on_status: None,
        watchdog: None,
        metrics: None,
    };
    let runner = tokio::spawn(Driver::run(loaded.clone(), inputs));
    let mut last = None;
    while let Some(reply) = replies_rx.recv().await {
        match reply {
            Reply::Progress { message, .. } => {
                eprintln!("  {} {}", short_time(SystemTime::now()), Escaped(&message));
            }
            end => last = Some(end),
        }
    }
    runner.await??;
    match last {
        Some(Reply::Done { result }) => Ok(result),
        Some(Reply::Failed { message, exit }) => Err(CallError::Failed { message, exit }.into()),
        _ => Err(anyhow::anyhow!("the command ended without an answer")),
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[tokio::test]
    async fn a_daemon_that_never_answers_is_given_up_on_with_what_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("rollbackd.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        // Accepts and holds the connection, never answering.
        let holder = tokio::spawn(async move {
            let (_stream, _) = listener.accept().await.unwrap();
            std::future::pending::<()>().await;
        });
        let started = std::time::Instant::now();
        let result = call_within(
            &socket,
            &Request::Status,
            Duration::from_millis(300),
            |_, _| {},
        )
        .await;
        assert!(matches!(result, Ok(None)), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(30));
        let message = timed_out_message(&Request::Status, REQUEST_LIMIT);
        assert!(
            message.contains("rollbackd status") && message.contains("1m"),
            "{message}"
        );
        holder.abort();
    }

    #[test]
    fn a_rollback_waits_its_configured_worst_case_plus_the_margin_and_no_more() {
        let loaded = crate::config::load_str(
            "[rollback]\nswitch_command = [\"/bin/true\", \"{to}\"]\nhook_timeout = \"7days\"\nverify_timeout = \"7days\"\nmax_attempts = 10\n",
            &Default::default(),
        )
        .unwrap();
        let rollback = Request::Rollback {
            reason: "r".into(),
            emergency: false,
            force: false,
        };
        assert_eq!(
            request_limit(&rollback, &loaded),
            // 10 attempts × (one hook + its 2.5 s kill grace + verify), the waits between
            // them (1 + 2 + 4 + 8 + 16 + 4 × 30 s of rollback.retry_backoff), plus the margin.
            Duration::from_secs(10 * 2 * 7 * 86_400 + 151)
                + Duration::from_millis(10 * 2_500)
                + ROLLBACK_MARGIN
        );
        assert_eq!(request_limit(&Request::Status, &loaded), REQUEST_LIMIT);
    }
}
