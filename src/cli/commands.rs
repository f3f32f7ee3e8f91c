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

use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::audit::rfc3339_millis;
use crate::cli::args::{Command, KillSwitchAction};
use crate::config::LoadedConfig;
use crate::control::{self, CallError, Operator, Reply, Request};
use crate::daemon::{stored_worker_id, Driver, DriverInputs, SystemClock};
use crate::exit::{self, Refused};
use crate::store::{self, Store, StoreError};
use crate::text::Escaped;

/// Runs one operator command; returns the exit status.
pub async fn run(command: &Command, loaded: &LoadedConfig) -> anyhow::Result<u8> {
    let request = match command {
        Command::Promote {
            active,
            previous,
            baseline_error_rate,
            baseline_latency_p95_ms,
        } => Request::Promote {
            active: active.clone(),
            previous: previous.clone(),
            baseline_error_rate: *baseline_error_rate,
            baseline_latency_p95_ms: *baseline_latency_p95_ms,
        },
        Command::Status { .. } => Request::Status,
        Command::Rollback {
            reason, emergency, ..
        } => Request::Rollback {
            reason: reason.clone(),
            emergency: *emergency,
        },
        Command::KillSwitch { action } => match action {
            KillSwitchAction::Set { reason } => Request::KillSwitchSet {
                reason: reason.clone(),
            },
            KillSwitchAction::Reset { reason, force } => Request::KillSwitchReset {
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
    } = command
    {
        if !yes && std::io::stdin().is_terminal() {
            let status = status_value(loaded).await?;
            let (active, previous) = workers_of(&status);
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
        Command::Status { .. } => print_status(&value, &mut out)?,
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
        Command::KillSwitch { .. } => writeln!(
            out,
            "{}={} (was {})",
            show(&value["key"], "?"),
            show(&value["value"], "?"),
            show(&value["previous"], "unset")
        )?,
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

fn workers_of(status: &Value) -> (Option<String>, Option<String>) {
    let session = &status["session"];
    let active = session["active"]
        .as_str()
        .or(status["workers"]["active"].as_str());
    let previous = session["previous"]
        .as_str()
        .or(status["workers"]["previous"].as_str());
    (active.map(str::to_owned), previous.map(str::to_owned))
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

async fn status_value(loaded: &LoadedConfig) -> anyhow::Result<Value> {
    let socket = loaded.config.socket_path();
    match call_within(&socket, &Request::Status, REQUEST_LIMIT, |_, _| {}).await {
        Ok(Some(value)) => Ok(value),
        Ok(None) => Err(anyhow::anyhow!(timed_out_message(
            &Request::Status,
            REQUEST_LIMIT
        ))),
        Err(err) if err.is_not_running() => local_status(loaded).await,
        Err(err) => Err(err.into()),
    }
}

/// The command carried out without a daemon.
async fn local(request: &Request, loaded: &LoadedConfig) -> anyhow::Result<Value> {
    if matches!(request, Request::Status) {
        return local_status(loaded).await;
    }
    if let Request::KillSwitchStatus = request {
        let ks = &loaded.config.kill_switch;
        let state =
            crate::killswitch::KillSwitchState::read(&ks.database, &ks.key, ks.create_database);
        if let crate::killswitch::KillSwitchState::Unknown(why) = &state {
            anyhow::bail!("the kill switch is UNKNOWN: {why}");
        }
        return Ok(state.to_json(&ks.key));
    }
    let state_dir = loaded.config.state_dir.clone();
    let _lock = crate::service::try_lock_state(&state_dir)?.ok_or_else(|| {
            anyhow::anyhow!(
                "the daemon holds {} but does not answer on {}; try again, or check `systemctl status rollbackd`",
                state_dir.display(),
                loaded.config.socket_path().display()
            )
        })?;
    if matches!(request, Request::Rollback { .. }) {
        // The switch and verify hooks are about to run: the same checks as `run`'s.
        crate::service::check_runnable(loaded)?;
    }
    one_shot(request, loaded).await
}

/// Runs one operator command through the daemon's own Supervisor and effect runner, in
/// this process (the caller holds the state lock): the same validation, records and
/// actions as with a daemon, and nothing checked. Progress goes to stderr as it arrives.
async fn one_shot(request: &Request, loaded: &LoadedConfig) -> anyhow::Result<Value> {
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
        one_shot: true,
        factory: crate::service::real_adapters(),
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

/// `status` without a daemon: what `rollbackd.db` and the settings table say.
async fn local_status(loaded: &LoadedConfig) -> anyhow::Result<Value> {
    let config = &loaded.config;
    let ks = &config.kill_switch;
    let kill = crate::killswitch::KillSwitchState::read(&ks.database, &ks.key, ks.create_database);
    let now = SystemTime::now();
    let (session, recent, active, previous) = match Store::open_read_only(&config.rollbackd_db()) {
        Ok(store) => {
            let session = store.current_session()?;
            let recent = match &session {
                Some(s) => store.recent_checks(&s.id, 10)?,
                None => Vec::new(),
            };
            (
                session,
                recent,
                stored_worker_id("active worker", store.get_meta("active")?),
                stored_worker_id("previous worker", store.get_meta("previous")?),
            )
        }
        Err(StoreError::NotFound(_)) => (None, Vec::new(), None, None),
        Err(err) => return Err(err.into()),
    };
    let session_value = session.as_ref().map(|s| {
        let active = stored_worker_id("active worker of the session", Some(s.active.clone()));
        let previous = stored_worker_id("previous worker of the session", s.previous.clone());
        let promoted = crate::core::time::from_ms(s.promoted_at_ms);
        let age = now.duration_since(promoted).unwrap_or_default();
        json!({
            "id": s.id, "state": s.state, "active": active, "previous": previous,
            "promotedAt": rfc3339_millis(promoted), "ageSeconds": age.as_secs(),
            "graceLeftSeconds": (s.state == store::SESSION_MONITORING).then(|| config.monitor.grace_period.saturating_sub(age).as_secs()),
            "paused": s.paused, "pauseReason": s.pause_reason,
            "verdict": recent.last().map(|c| c.verdict.clone()),
        })
    });
    let recent: Vec<Value> = recent
        .iter()
        .map(|c| {
            let check: Value = serde_json::from_str(&c.check_json).unwrap_or(Value::Null);
            let probe = match check["probe"]["outcome"].as_str() {
                Some("failed") => format!(
                    "failed: {}",
                    check["probe"]["reason"].as_str().unwrap_or("")
                ),
                Some(other) => other.to_owned(),
                None => "?".into(),
            };
            let rate = check["snapshot"]["error_rate"]["value"].as_f64();
            json!({"at": rfc3339_millis(crate::core::time::from_ms(c.taken_at_ms)),
                   "index": c.check_index, "verdict": c.verdict, "probe": probe, "errorRate": rate})
        })
        .collect();
    Ok(json!({
        "daemon": "not running",
        "state": session.as_ref().map(|s| s.state.as_str()).unwrap_or("idle"),
        "session": session_value,
        "workers": {"active": active, "previous": previous},
        "killSwitch": kill.to_json(&ks.key),
        "recentChecks": recent,
        "configHash": loaded.hash,
    }))
}

fn print_status(status: &Value, out: &mut impl Write) -> std::io::Result<()> {
    let daemon = show(&status["daemon"], "?");
    match status["pid"].as_u64() {
        Some(pid) => writeln!(
            out,
            "rollbackd    {daemon} (pid {pid}, since {})",
            show(&status["since"], "?")
        )?,
        None => writeln!(out, "rollbackd    {daemon}")?,
    }
    let session = &status["session"];
    if session.is_object() {
        let age = session["ageSeconds"].as_u64().unwrap_or(0);
        writeln!(
            out,
            "session      {}  {}",
            show(&session["id"], "?"),
            show(&session["state"], "?")
        )?;
        writeln!(
            out,
            "workers      active {}  previous {}",
            show(&session["active"], "?"),
            show(&session["previous"], "-")
        )?;
        let grace = match session["graceLeftSeconds"].as_u64() {
            Some(left) => format!(
                ", grace period left {}",
                crate::config::show(Duration::from_secs(left))
            ),
            None => String::new(),
        };
        writeln!(
            out,
            "age          {}{grace}",
            crate::config::show(Duration::from_secs(age))
        )?;
        if session["paused"].as_bool() == Some(true) {
            writeln!(
                out,
                "paused       yes ({})",
                show(&session["pauseReason"], "no reason given")
            )?;
        }
        if let Some(verdict) = session["verdict"].as_str() {
            let verdict = Escaped(verdict);
            match session["reason"].as_str() {
                Some(reason) => writeln!(out, "verdict      {verdict} — {}", Escaped(reason))?,
                None => writeln!(out, "verdict      {verdict}")?,
            }
        }
    } else {
        writeln!(out, "session      none (waiting for `rollbackd promote`)")?;
        let workers = &status["workers"];
        if workers["active"].is_string() {
            writeln!(
                out,
                "workers      active {}  previous {}",
                show(&workers["active"], "?"),
                show(&workers["previous"], "-")
            )?;
        }
    }
    if let Some(action) = status["action"].as_object() {
        writeln!(
            out,
            "action       {} #{} in progress",
            show(&action["kind"], "?"),
            action["id"]
        )?;
    }
    let kill = &status["killSwitch"];
    let kill_key = show(&kill["key"], "DISABLE_NEW");
    if kill["state"] == "unknown" {
        // Loud on purpose: an unreadable DISABLE_NEW=1 is still on for the application.
        writeln!(
            out,
            "kill switch  {kill_key}: UNKNOWN ({})",
            show(&kill["error"], "cannot read the database")
        )?;
    } else {
        writeln!(
            out,
            "kill switch  {kill_key}={} ({})",
            show(&kill["value"], "unset"),
            if kill["on"].as_bool() == Some(true) {
                "ON: apps use safe defaults"
            } else {
                "off"
            }
        )?;
    }
    if let Some(checks) = status["recentChecks"].as_array().filter(|c| !c.is_empty()) {
        writeln!(out, "recent checks")?;
        writeln!(
            out,
            "  {:<24} {:>5}  {:<9} {:>7}  probe",
            "time", "#", "verdict", "error"
        )?;
        for check in checks.iter().rev().take(10).rev() {
            let rate = check["errorRate"]
                .as_f64()
                .map(|r| format!("{:.1}%", r * 100.0))
                .unwrap_or_else(|| show(&check["errorClass"], "-").into_owned());
            writeln!(
                out,
                "  {:<24} {:>5}  {:<9} {:>7}  {}",
                show(&check["at"], "?"),
                check["index"],
                show(&check["verdict"], "?"),
                rate,
                show(&check["probe"], "?")
            )?;
        }
    }
    Ok(())
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
        };
        assert_eq!(
            request_limit(&rollback, &loaded),
            // 10 attempts × (one hook + its 2.5 s kill grace + verify), plus the margin.
            Duration::from_secs(10 * 2 * 7 * 86_400)
                + Duration::from_millis(10 * 2_500)
                + ROLLBACK_MARGIN
        );
        assert_eq!(request_limit(&Request::Status, &loaded), REQUEST_LIMIT);
    }
}
