//! `rollbackd simulate`: replays a trace through the Supervisor exactly as the daemon's
//! monitoring session would — the same engine, action policy (escalation instead of a
//! rollback when no previous worker is known or `max_rollbacks_per_hour` is spent), dry
//! run and grace period. Checks after the grace period are not evaluated, and the replay
//! stops at the first check whose action is not null — unless `--stability-watch`: then a
//! rollback is taken as verified at its check, the trace's later lines are checks of the
//! restored version during `rollback.stability_period`, and the replay ends with the
//! watch (confirmed, or failed with its escalation).

use std::io::{BufRead, Write};
use std::time::Duration;

use serde::Serialize;

use crate::config::{show, Config};
use crate::core::check::{Baseline, CheckResult};
use crate::core::engine::{Action, Decision, Firing, Verdict};
use crate::core::supervisor::{Effect, Input, Restored, Supervisor};
use crate::core::trace::{parse_line, TraceLine};
use crate::core::Now;

/// What the replayed session knows besides the trace: the daemon's other inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// A previous worker is known (a rollback has somewhere to go).
    pub previous_known: bool,
    /// Automatic rollbacks of the promoted version already made in the hour before the
    /// promotion (loop protection).
    pub recent_rollbacks: u32,
    /// Replay past a rollback into its stability watch.
    pub stability_watch: bool,
}

impl Default for Scenario {
    fn default() -> Scenario {
        Scenario {
            previous_known: true,
            recent_rollbacks: 0,
            stability_watch: false,
        }
    }
}

/// The Supervisor in a virtual clock: promoted at the trace's `at = 0`, each trace line a
/// check taken at its `at`.
struct Replay {
    supervisor: Supervisor,
    mono: std::time::Instant,
    wall: std::time::SystemTime,
    /// The promotion's instant on the monotonic clock.
    promoted_mono: std::time::Instant,
    promoted_wall: std::time::SystemTime,
}

/// A replayed check's outcome.
enum Step {
    /// Judged; the action the daemon would start (with its reason), if any.
    Judged(Box<Decision>, Option<(Action, String)>),
    /// The session ended before the check (the promotion was confirmed).
    Ended,
}

/// The replayed promotion's wall time (fixed, so the same trace gives the same output).
fn promoted_wall() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

/// What `simulate` prints about the session's baseline.
fn baseline_line(baseline: Option<&Baseline>) -> String {
    match baseline {
        Some(baseline) => format!("baseline: {}", baseline.describe()),
        None => "baseline: none (no baseline line, and too few observations before the promotion): only the absolute rules apply".into(),
    }
}

impl Replay {
    /// The previous worker's name in a replay.
    const PREVIOUS: &'static str = "previous";

    fn start(config: &Config, baseline: Option<Baseline>, scenario: &Scenario) -> Replay {
        let supervisor = Supervisor::new(config.supervisor_settings("simulate"));
        // Fixed wall times, so the same trace gives the same output; the monotonic clock
        // is read once, as the promotion's instant (only differences of it are used).
        let mono = std::time::Instant::now();
        let wall = promoted_wall();
        let mut replay = Replay {
            supervisor,
            mono,
            wall,
            promoted_mono: mono,
            promoted_wall: wall,
        };
        let now = replay.now();
        let session = crate::core::supervisor::SessionRecord {
            id: "simulate".into(),
            active: "canary".into(),
            previous: scenario.previous_known.then(|| Replay::PREVIOUS.to_owned()),
            promoted_at: wall,
            state: crate::core::supervisor::SessionState::Monitoring,
            paused: false,
            pause_reason: None,
            baseline,
            operator: None,
            stability: None,
        };
        let rollbacks = (0..scenario.recent_rollbacks)
            .map(|i| crate::core::supervisor::PastRollback {
                at: wall - Duration::from_secs(60 + u64::from(i)),
                from: session.active.clone(),
            })
            .collect();
        replay.supervisor.handle(
            now,
            Input::Restore(Box::new(Restored {
                session: Some(session),
                rollbacks,
                ..Restored::default()
            })),
        );
        while replay.supervisor.poll_effect().is_some() {}
        replay
    }

    fn now(&self) -> Now {
        Now {
            mono: self.mono,
            wall: self.wall,
        }
    }

    /// The rollback just started is verified now: the Supervisor begins the stability
    /// watch (as the daemon's does when its executor reports the rollback done).
    fn rollback_verified(&mut self) -> bool {
        let now = self.now();
        self.supervisor
            .handle(now, Input::ActionStarted { id: Some(1) });
        self.supervisor.handle(
            now,
            Input::ActionDone {
                id: Some(1),
                result: crate::core::supervisor::ActionResult::RolledBack {
                    from: "canary".into(),
                    to: Replay::PREVIOUS.into(),
                    artifact: String::new(),
                },
            },
        );
        while self.supervisor.poll_effect().is_some() {}
        self.supervisor
            .session()
            .is_some_and(|s| s.watching().is_some())
    }

    /// Takes the check the trace has at `at`.
    fn check(&mut self, at: Duration, check: &CheckResult) -> Step {
        self.mono = crate::core::time::deadline(self.promoted_mono, at);
        self.wall = crate::core::time::add(self.promoted_wall, at);
        let now = self.now();
        self.supervisor.handle(now, Input::CheckScheduled);
        let mut started = None;
        while let Some(effect) = self.supervisor.poll_effect() {
            if let Effect::StartCheck {
                session_id, index, ..
            } = effect
            {
                started = Some((session_id, index));
            }
        }
        let Some((session_id, index)) = started else {
            return Step::Ended;
        };
        self.supervisor.handle(
            now,
            Input::CheckDone {
                session_id,
                index,
                started: now.mono,
                taken_at: now.wall,
                result: check.clone(),
                stalled: Duration::ZERO,
            },
        );
        let mut action = None;
        while let Some(effect) = self.supervisor.poll_effect() {
            if let Effect::StartAction { plan, .. } = effect {
                action = Some((plan.kind.engine_action(), plan.reason));
            }
        }
        match self
            .supervisor
            .session()
            .and_then(|s| s.last_decision.clone())
        {
            Some(decision) => Step::Judged(Box::new(decision), action),
            None => Step::Ended,
        }
    }
}

/// A trace that could not be replayed.
/// The longest trace line `simulate` reads (1 MiB); a longer one is an error.
pub const MAX_TRACE_LINE: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("{name}:{line}: {message}")]
    Malformed {
        name: String,
        line: usize,
        message: String,
    },
    #[error("reading {name}: {source}")]
    Read {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing output: {0}")]
    Write(#[source] std::io::Error),
}

/// How a replay ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub checks_evaluated: u64,
    pub first_action: Option<(Duration, Action, String)>,
    /// The grace period ended before the trace did: the promotion would be confirmed.
    pub grace_expired_at: Option<Duration>,
    pub last_verdict: Option<Verdict>,
    /// With `--stability-watch`: how the watch after the rollback ended (`confirmed`,
    /// `failed`, or `unfinished` when the trace ended first), at which check, and the
    /// escalation's reason when it failed.
    pub stability: Option<(&'static str, Duration, Option<String>)>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonDecision<'a> {
    #[serde(serialize_with = "serialize_at")]
    at: Duration,
    verdict: Verdict,
    action: Option<Action>,
    #[serde(skip_serializing_if = "Option::is_none")]
    would_act: Option<Action>,
    error_rate: Option<f64>,
    error_class: &'static str,
    probe: &'static str,
    failure_pattern: &'static str,
    failures: usize,
    rules: &'a [Firing],
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// A check of the restored version during the stability watch (`--stability-watch`).
    #[serde(skip_serializing_if = "Option::is_none")]
    stability_watch: Option<bool>,
}

/// Replays `trace` through a fresh Supervisor built from `config`, writing one line per
/// evaluated check (`json`: the contract JSON object; otherwise a human timeline).
pub fn replay(
    config: &Config,
    trace: impl BufRead,
    name: &str,
    json: bool,
    out: &mut impl Write,
) -> Result<Summary, SimulateError> {
    replay_scenario(config, &Scenario::default(), trace, name, json, out)
}

/// [`replay`] with the daemon's other inputs given.
pub fn replay_scenario(
    config: &Config,
    scenario: &Scenario,
    trace: impl BufRead,
    name: &str,
    json: bool,
    out: &mut impl Write,
) -> Result<Summary, SimulateError> {
    let mut lines = trace;
    let mut buffer = String::new();
    let mut line_number = 0usize;
    let mut session: Option<Replay> = None;
    let mut last_at = Duration::ZERO;
    // Before the first check: the trace's baseline line and its pre-promotion lines.
    let mut explicit: Option<Baseline> = None;
    let mut history = crate::core::baseline::History::default();
    let mut last_before: Option<Duration> = None;
    let mut summary = Summary {
        checks_evaluated: 0,
        first_action: None,
        grace_expired_at: None,
        last_verdict: None,
        stability: None,
    };
    let mut watching = false;
    let malformed = |line: usize, message: String| SimulateError::Malformed {
        name: name.to_owned(),
        line,
        message,
    };
    let write_err = SimulateError::Write;

    if !json {
        writeln!(
            out,
            "replaying {name}: profile {}, window {}, rollback at {} of {} checks over {:.1}%, grace period {}",
            config.profile,
            config.rules.window,
            config.rules.rollback_min_breaches,
            config.rules.window,
            config.rules.error_rate_threshold * 100.0,
            show(config.monitor.grace_period)
        )
        .map_err(write_err)?;
    }

    loop {
        buffer.clear();
        // Bounded: an endless line (`< /dev/zero`) is an error, not a 2 GiB allocation.
        let read = std::io::Read::take(&mut lines, MAX_TRACE_LINE as u64 + 1)
            .read_line(&mut buffer)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::InvalidData {
                    malformed(line_number + 1, "not valid UTF-8".into())
                } else {
                    SimulateError::Read {
                        name: name.to_owned(),
                        source,
                    }
                }
            })?;
        if read == 0 {
            break;
        }
        line_number += 1;
        if buffer.len() > MAX_TRACE_LINE && !buffer.ends_with('\n') {
            return Err(malformed(
                line_number,
                format!(
                    "line longer than {MAX_TRACE_LINE} bytes (1 MiB); a trace line is one \
                     check, a few hundred bytes: is this the right file?"
                ),
            ));
        }
        let parsed = parse_line(&buffer).map_err(|message| malformed(line_number, message))?;
        let (at, check) = match parsed {
            None => continue,
            Some(TraceLine::Baseline(baseline)) => {
                if session.is_some() {
                    return Err(malformed(
                        line_number,
                        "a baseline line must come before the first check".into(),
                    ));
                }
                explicit = Some(baseline);
                continue;
            }
            Some(TraceLine::Before { before, check }) => {
                if session.is_some() {
                    return Err(malformed(
                        line_number,
                        "a line before the promotion (negative \"at\") must come before the first check".into(),
                    ));
                }
                if last_before.is_some_and(|last| before > last) {
                    return Err(malformed(
                        line_number,
                        format!("\"at\" goes back in time (-{})", before.as_secs_f64()),
                    ));
                }
                last_before = Some(before);
                // Observed as the daemon observes the active version between sessions.
                let at = crate::core::time::sub(promoted_wall(), before);
                if let Some(observation) = crate::core::check::Observation::of(
                    crate::core::baseline::seconds(at),
                    &check.snapshot,
                ) {
                    history.observe(
                        crate::core::baseline::Observed {
                            at,
                            worker: Replay::PREVIOUS.into(),
                            observation,
                        },
                        config.baseline.window,
                    );
                }
                continue;
            }
            Some(TraceLine::Check { at, check }) => (at, check),
        };
        if at < last_at {
            return Err(malformed(
                line_number,
                format!(
                    "\"at\" goes back in time ({} after {})",
                    at.as_secs_f64(),
                    last_at.as_secs_f64()
                ),
            ));
        }
        last_at = at;
        if at > config.monitor.grace_period && !watching {
            summary.grace_expired_at = Some(config.monitor.grace_period);
            break;
        }
        if session.is_none() {
            // The promotion: its baseline is chosen as the daemon chooses it.
            let baseline = crate::core::baseline::choose(
                explicit,
                history.observed(Replay::PREVIOUS, promoted_wall(), &config.baseline),
                None,
                None,
            );
            if !json {
                writeln!(out, "{}", baseline_line(baseline.as_ref())).map_err(write_err)?;
            }
            session = Some(Replay::start(config, baseline, scenario));
        }
        let session = session.as_mut().expect("started above");
        let (decision, action) = match session.check(at, &check) {
            Step::Judged(decision, action) => (decision, action),
            Step::Ended if watching => {
                summary.stability = Some(("confirmed", at, None));
                break;
            }
            Step::Ended => {
                summary.grace_expired_at = Some(config.monitor.grace_period);
                break;
            }
        };
        summary.checks_evaluated += 1;
        summary.last_verdict = Some(decision.verdict);
        let shown = action.as_ref().map(|(kind, _)| *kind);
        if json {
            let reason = action.as_ref().map(|(_, reason)| reason.as_str());
            write_json(
                out,
                &decision,
                shown,
                reason,
                check.probe.is_failed(),
                watching,
            )
            .map_err(write_err)?;
        } else {
            write_human(out, &decision, shown).map_err(write_err)?;
        }
        if let Some((kind, reason)) = action {
            if watching {
                summary.stability = Some(("failed", at, Some(reason)));
                break;
            }
            summary.first_action = Some((at, kind, reason));
            if scenario.stability_watch && kind == Action::Rollback && session.rollback_verified() {
                watching = true;
                if !json {
                    writeln!(
                        out,
                        "rollback verified at +{}s: watching the restored version for {} (rollback.stability_period)",
                        seconds(at),
                        show(config.rollback.stability_period)
                    )
                    .map_err(write_err)?;
                }
                continue;
            }
            break;
        }
    }
    if watching && summary.stability.is_none() {
        summary.stability = Some(("unfinished", last_at, None));
    }

    if !json {
        match (&summary.first_action, summary.grace_expired_at) {
            (Some((at, action, reason)), _) => writeln!(
                out,
                "first action: {} at +{}s — {}",
                action.as_str(),
                seconds(*at),
                crate::text::Escaped(reason)
            ),
            (None, Some(grace)) => writeln!(
                out,
                "no action: grace period {} ended after {} checks; the promotion would be confirmed",
                show(grace),
                summary.checks_evaluated
            ),
            (None, None) => writeln!(
                out,
                "no action in {} checks; last verdict {}",
                summary.checks_evaluated,
                summary.last_verdict.map(Verdict::as_str).unwrap_or("none")
            ),
        }
        .map_err(write_err)?;
        if let Some((result, at, reason)) = &summary.stability {
            match *result {
                "confirmed" => writeln!(
                    out,
                    "stability confirmed at +{}s: the restored version held for {}",
                    seconds(*at),
                    show(config.rollback.stability_period)
                ),
                "failed" => writeln!(
                    out,
                    "stability FAILED at +{}s: escalate (never a second rollback) — {}",
                    seconds(*at),
                    crate::text::Escaped(reason.as_deref().unwrap_or_default())
                ),
                _ => writeln!(
                    out,
                    "the trace ended at +{}s during the stability watch",
                    seconds(*at)
                ),
            }
            .map_err(write_err)?;
        }
    }
    out.flush().map_err(write_err)?;
    Ok(summary)
}

/// Whole seconds as an integer (`"at": 60`, as in the trace), fractions as a float.
fn serialize_at<S: serde::Serializer>(at: &Duration, s: S) -> Result<S::Ok, S::Error> {
    if at.subsec_nanos() == 0 {
        s.serialize_u64(at.as_secs())
    } else {
        s.serialize_f64(at.as_secs_f64())
    }
}

fn seconds(at: Duration) -> String {
    let secs = at.as_secs_f64();
    if secs.fract() == 0.0 {
        format!("{secs:.0}")
    } else {
        format!("{secs:.3}")
    }
}

/// `action`: what the daemon would start (the policy's, not only the engine's verdict),
/// and `action_reason` why (it says so when the policy turned a rollback into an escalation).
fn write_json(
    out: &mut impl Write,
    decision: &Decision,
    action: Option<Action>,
    action_reason: Option<&str>,
    probe_failed: bool,
    stability_watch: bool,
) -> std::io::Result<()> {
    let record = JsonDecision {
        stability_watch: stability_watch.then_some(true),
        at: decision.at,
        verdict: decision.verdict,
        action,
        would_act: decision.would_act(),
        error_rate: decision.error_rate,
        error_class: decision.error_class.as_str(),
        probe: if probe_failed { "failed" } else { "ok" },
        failure_pattern: decision.failure_pattern.as_str(),
        failures: decision.failure_count,
        rules: &decision.fired,
        reason: match action_reason {
            Some(reason) => Some(reason.to_owned()),
            None => (decision.verdict != Verdict::Healthy).then(|| decision.reason()),
        },
    };
    serde_json::to_writer(&mut *out, &record)?;
    out.write_all(b"\n")
}

fn write_human(
    out: &mut impl Write,
    decision: &Decision,
    action: Option<Action>,
) -> std::io::Result<()> {
    let error = match decision.error_rate {
        Some(rate) => format!("{:>5.1}% {}", rate * 100.0, decision.error_class.as_str()),
        None => format!("   -   {}", decision.error_class.as_str()),
    };
    let probe = if decision.probe_reason.is_some() {
        "failed"
    } else {
        "ok"
    };
    let rules: Vec<String> = decision
        .fired
        .iter()
        .map(|f| {
            format!(
                "{}{}",
                f.rule.as_str(),
                if f.dry_run { "(dry-run)" } else { "" }
            )
        })
        .collect();
    let action = match (action, decision.would_act()) {
        (Some(action), _) => format!("  → {}", action.as_str().to_uppercase()),
        (None, Some(would)) => format!("  (would {} — dry run)", would.as_str()),
        _ => String::new(),
    };
    writeln!(
        out,
        "  {:>9}  {:<8}  probe {:<6}  error {:<22} {}{}",
        format!("+{}s", seconds(decision.at)),
        decision.verdict.as_str(),
        probe,
        error,
        rules.join(","),
        action
    )
}
