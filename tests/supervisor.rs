//! Table tests of the Supervisor: a sequence of inputs → the effects it asks for.
//!
//! The harness is the smallest honest runner: a virtual clock, checks answered from a
//! script (trace lines, SPEC §6 format), every recording answered "landed", actions given
//! ids in order. Nothing here sleeps or touches a file.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rollbackd::core::check::{Baseline, CheckResult};
use rollbackd::core::supervisor::{
    ActionKind, ActionResult, ActionTrigger, Answer, Effect, Input, PastRollback, Restored,
    SessionRecord, SessionState, Settings, StabilityResult, Supervisor,
};
use rollbackd::core::trace::{parse_line, TraceLine};
use rollbackd::core::Now;

const HEALTHY: &str = r#"{"at":0,"probe":"ok","snapshot":{"failureRate":0.01,"requests":1000}}"#;
const SPIKE: &str = r#"{"at":0,"probe":"ok","snapshot":{"failureRate":0.45,"requests":1000}}"#;
const DOWN: &str = r#"{"at":0,"probe":"failed","snapshot":null}"#;

fn check(line: &str) -> CheckResult {
    match parse_line(line).unwrap() {
        Some(TraceLine::Check { check, .. }) => check,
        other => panic!("not a check line: {other:?}"),
    }
}

fn settings(extra: &str) -> Settings {
    let text = format!(
        "[monitor]\ncheck_interval = \"30s\"\ndegraded_check_interval = \"15s\"\n\
         check_timeout = \"5s\"\ngrace_period = \"10m\"\nwindow = 5\n{extra}"
    );
    let loaded = rollbackd::config::load_str(&text, &BTreeMap::new()).expect("config");
    loaded.config.supervisor_settings("hash")
}

/// A summary of one effect, for the tables.
fn name(effect: &Effect) -> String {
    match effect {
        Effect::ObserveIdle { worker } => format!("observe-idle:{worker}"),
        Effect::StartCheck { index, .. } => format!("check#{index}"),
        Effect::RecordCheck(c) => format!("record#{}:{}", c.index, c.verdict.as_str()),
        Effect::Observed { .. } => "observed".into(),
        Effect::RecordSession(_) => "record-session".into(),
        Effect::Persist(change) => format!("persist:{change:?}")
            .split(['{', '('])
            .next()
            .unwrap()
            .trim()
            .to_owned(),
        Effect::Audit(record) => format!(
            "audit:{}",
            serde_json::to_value(record.event)
                .unwrap()
                .as_str()
                .unwrap()
        ),
        Effect::WorkerManager(_) => "worker-manager".into(),
        Effect::Artifact { name, .. } => format!("artifact:{}", name.split('_').next().unwrap()),
        Effect::StartAction { plan, .. } => {
            format!("start:{}:{}", plan.kind.as_str(), plan.trigger.as_str())
        }
        Effect::PruneSessions => "prune".into(),
        Effect::IncidentReport { .. } => "incident-report".into(),
        Effect::Reply { answer, .. } => match answer {
            Answer::Done(_) => "reply:done".into(),
            Answer::Progress { .. } => "reply:progress".into(),
            Answer::Failed { exit, .. } => format!("reply:failed:{exit}"),
        },
    }
}

struct Harness {
    sup: Supervisor,
    mono: Instant,
    wall: SystemTime,
    effects: Vec<Effect>,
    next_action: i64,
    /// Checks the worker will answer, in order; healthy once the script runs out.
    script: std::collections::VecDeque<CheckResult>,
    /// How long rollbackd "was stalled" during each scripted check (same order).
    stalls: std::collections::VecDeque<Duration>,
    /// What the active version's snapshot says between sessions.
    idle: CheckResult,
    check_took: Duration,
}

impl Harness {
    fn new(settings: Settings) -> Harness {
        Harness {
            sup: Supervisor::new(settings),
            mono: Instant::now(),
            wall: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            effects: Vec::new(),
            next_action: 1,
            script: Default::default(),
            stalls: Default::default(),
            idle: check(HEALTHY),
            check_took: Duration::from_millis(300),
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: self.mono,
            wall: self.wall,
        }
    }

    fn advance(&mut self, by: Duration) {
        self.mono += by;
        self.wall += by;
    }

    fn feed(&mut self, input: Input) {
        let now = self.now();
        self.sup.handle(now, input);
        self.drain();
    }

    /// Carries out effects; recordings land, actions get ids, checks are answered.
    fn drain(&mut self) {
        while let Some(effect) = self.sup.poll_effect() {
            let answer = match &effect {
                Effect::RecordSession(record) => Some(Input::SessionRecorded {
                    id: record.id.clone(),
                    error: None,
                }),
                Effect::StartAction { .. } => {
                    let id = self.next_action;
                    self.next_action += 1;
                    Some(Input::ActionStarted { id: Some(id) })
                }
                _ => None,
            };
            let wanted = match &effect {
                Effect::StartCheck {
                    session_id, index, ..
                } => Some((session_id.clone(), *index)),
                _ => None,
            };
            let idle = match &effect {
                Effect::ObserveIdle { worker } => Some(Input::IdleObserved {
                    worker: worker.clone(),
                    snapshot: self.idle.snapshot.clone(),
                }),
                _ => None,
            };
            self.effects.push(effect);
            if let Some(input) = answer.or(idle) {
                let now = self.now();
                self.sup.handle(now, input);
            }
            if let Some((session_id, index)) = wanted {
                let started = self.mono;
                let taken_at = self.wall;
                self.advance(self.check_took);
                let result = self.script.pop_front().unwrap_or_else(|| check(HEALTHY));
                let stalled = self.stalls.pop_front().unwrap_or_default();
                let now = self.now();
                self.sup.handle(
                    now,
                    Input::CheckDone {
                        session_id,
                        index,
                        started,
                        taken_at,
                        result,
                        stalled,
                    },
                );
            }
        }
    }

    /// Runs the timer until `until` has passed on the virtual clock or nothing is due.
    fn run_for(&mut self, span: Duration) {
        let end = self.mono + span;
        while let Some(due) = self.sup.poll_timeout() {
            if due > end {
                break;
            }
            if due > self.mono {
                let by = due - self.mono;
                self.advance(by);
            }
            self.feed(Input::Timeout {
                suspended: Duration::ZERO,
            });
        }
        if end > self.mono {
            let by = end - self.mono;
            self.advance(by);
        }
    }

    fn promote(&mut self, active: &str, previous: &str) {
        self.feed(Input::Promote {
            operator: "uid:0(root)".into(),
            active: active.into(),
            previous: previous.into(),
            baseline: None,
            prometheus: None,
            reply: 7,
        });
    }

    fn names(&self) -> Vec<String> {
        self.effects.iter().map(name).collect()
    }

    fn has(&self, wanted: &str) -> bool {
        self.names().iter().any(|n| n == wanted)
    }

    fn count(&self, wanted: &str) -> usize {
        self.names().iter().filter(|n| *n == wanted).count()
    }

    fn plans(&self) -> Vec<&rollbackd::core::supervisor::ActionPlan> {
        self.effects
            .iter()
            .filter_map(|e| match e {
                Effect::StartAction { plan, .. } => Some(&**plan),
                _ => None,
            })
            .collect()
    }

    fn ended(&self) -> Option<String> {
        self.effects.iter().find_map(|e| match e {
            Effect::Audit(r) if r.fields.get("state").is_some() => r.fields["state"]
                .as_str()
                .map(str::to_owned)
                .filter(|_| serde_json::to_value(r.event).unwrap() == "monitoring-stopped"),
            _ => None,
        })
    }
}

fn restored_session(h: &Harness, previous: Option<&str>, ago: Duration) -> SessionRecord {
    SessionRecord {
        id: "s1".into(),
        active: "v2".into(),
        previous: previous.map(str::to_owned),
        promoted_at: h.wall - ago,
        state: SessionState::Monitoring,
        paused: false,
        pause_reason: None,
        baseline: None,
        operator: None,
        stability: None,
    }
}

/// No stability watch: the session ends when the rollback is verified.
const NO_WATCH: &str = "[rollback]\nstability_period = \"0s\"\n";

#[test]
fn verdicts_become_actions_as_the_policy_says() {
    struct Case {
        name: &'static str,
        extra: &'static str,
        previous: Option<&'static str>,
        /// Rollbacks already made in the last hour (loop protection).
        rollbacks_before: u32,
        paused: bool,
        script: &'static [&'static str],
        /// The action expected, or None for none at all.
        want: Option<(ActionKind, &'static str)>,
        want_dry_run_artifacts: usize,
    }
    let cases = [
        Case {
            name: "three breaches roll back to the previous worker",
            extra: "",
            previous: Some("v1"),
            rollbacks_before: 0,
            paused: false,
            script: &[SPIKE, SPIKE, SPIKE],
            want: Some((ActionKind::Rollback, "3 of 4 checks over 20.0%")),
            want_dry_run_artifacts: 0,
        },
        Case {
            name: "no previous worker: a rollback verdict escalates",
            extra: "",
            previous: None,
            rollbacks_before: 0,
            paused: false,
            script: &[SPIKE, SPIKE, SPIKE],
            want: Some((ActionKind::Escalation, "no previous worker is known")),
            want_dry_run_artifacts: 0,
        },
        Case {
            name: "the hour's rollback budget spent: escalates instead of looping",
            extra: "[rollback]\nmax_rollbacks_per_hour = 2\n",
            previous: Some("v1"),
            rollbacks_before: 2,
            paused: false,
            script: &[SPIKE, SPIKE, SPIKE],
            want: Some((ActionKind::Escalation, "max_rollbacks_per_hour = 2")),
            want_dry_run_artifacts: 0,
        },
        Case {
            name: "one rollback left in the budget: rolls back",
            extra: "[rollback]\nmax_rollbacks_per_hour = 2\n",
            previous: Some("v1"),
            rollbacks_before: 1,
            paused: false,
            script: &[SPIKE, SPIKE, SPIKE],
            want: Some((ActionKind::Rollback, "")),
            want_dry_run_artifacts: 0,
        },
        Case {
            name: "probe failures escalate (consecutive_failures = 2)",
            extra: "",
            previous: Some("v1"),
            rollbacks_before: 0,
            paused: false,
            script: &[DOWN, DOWN],
            want: Some((ActionKind::Escalation, "")),
            want_dry_run_artifacts: 0,
        },
        Case {
            name: "dry run: nothing started, one artifact however often it would act",
            extra: "[rules]\ndry_run = true\n",
            previous: Some("v1"),
            rollbacks_before: 0,
            paused: false,
            script: &[SPIKE, SPIKE, SPIKE, SPIKE, SPIKE],
            want: None,
            want_dry_run_artifacts: 1,
        },
        Case {
            name: "paused: checks go on, no action",
            extra: "",
            previous: Some("v1"),
            rollbacks_before: 0,
            paused: true,
            script: &[SPIKE, SPIKE, SPIKE, SPIKE],
            want: None,
            want_dry_run_artifacts: 0,
        },
        Case {
            name: "a healthy canary takes no action",
            extra: "",
            previous: Some("v1"),
            rollbacks_before: 0,
            paused: false,
            script: &[HEALTHY, HEALTHY, HEALTHY, HEALTHY],
            want: None,
            want_dry_run_artifacts: 0,
        },
    ];
    for case in cases {
        let mut h = Harness::new(settings(case.extra));
        let mut session = restored_session(&h, case.previous, Duration::from_secs(5));
        session.paused = case.paused;
        let rollbacks = (0..case.rollbacks_before)
            .map(|i| PastRollback {
                at: h.wall - Duration::from_secs(600 + u64::from(i)),
                from: "v2".into(),
            })
            .collect();
        h.script = case.script.iter().map(|l| check(l)).collect();
        h.feed(Input::Restore(Box::new(Restored {
            session: Some(session),
            checks: vec![(0, h.wall - Duration::from_secs(1), check(HEALTHY))],
            rollbacks,
            ..Restored::default()
        })));
        h.run_for(Duration::from_secs(120));
        let plans = h.plans();
        match case.want {
            None => assert!(plans.is_empty(), "{}: {:?}", case.name, h.names()),
            Some((kind, reason)) => {
                assert_eq!(plans.len(), 1, "{}: {:?}", case.name, h.names());
                assert_eq!(plans[0].kind, kind, "{}", case.name);
                assert_eq!(plans[0].trigger, ActionTrigger::Automatic, "{}", case.name);
                assert!(
                    plans[0].reason.contains(reason),
                    "{}: {}",
                    case.name,
                    plans[0].reason
                );
                if kind == ActionKind::Rollback {
                    assert_eq!(plans[0].from.as_deref(), Some("v2"), "{}", case.name);
                    assert_eq!(plans[0].to.as_deref(), Some("v1"), "{}", case.name);
                }
            }
        }
        assert_eq!(
            h.count("artifact:rollback") + h.count("artifact:escalation"),
            case.want_dry_run_artifacts,
            "{}: {:?}",
            case.name,
            h.names()
        );
    }
}

#[test]
fn a_rollback_stops_the_checks_until_it_ends_and_then_ends_the_session() {
    let mut h = Harness::new(settings(NO_WATCH));
    h.promote("v2", "v1");
    h.script = [SPIKE, SPIKE, SPIKE].iter().map(|l| check(l)).collect();
    h.run_for(Duration::from_secs(300));
    assert_eq!(h.count("start:rollback:automatic"), 1, "{:?}", h.names());
    // While the rollback runs nothing is due: the worker is being switched.
    assert_eq!(h.sup.poll_timeout(), None);
    let checks_before = h.names().iter().filter(|n| n.starts_with("check#")).count();
    assert_eq!(checks_before, 3);
    h.feed(Input::ActionDone {
        id: Some(1),
        result: ActionResult::RolledBack {
            from: "v2".into(),
            to: "v1".into(),
            artifact: "a.json".into(),
        },
    });
    assert_eq!(h.ended().as_deref(), Some("rolled-back"));
    assert!(h.sup.session().is_none());
    assert_eq!(
        h.sup.last_workers().map(|w| (w.0.as_str(), w.1.as_deref())),
        Some(("v1", Some("v2")))
    );
    assert!(h.has("persist:Workers"), "{:?}", h.names());
    // No more checks; what is due next is an observation of the restored version (for
    // the next promotion's baseline).
    h.effects.clear();
    h.run_for(Duration::from_secs(31));
    assert_eq!(
        h.names().first().map(String::as_str),
        Some("observe-idle:v1"),
        "{:?}",
        h.names()
    );
    assert!(!h.names().iter().any(|n| n.starts_with("check#")));
}

#[test]
fn a_failed_rollback_escalates_and_the_operator_hears_both() {
    let mut h = Harness::new(settings(""));
    h.promote("v2", "v1");
    h.feed(Input::Rollback {
        operator: "uid:1000(alice)".into(),
        reason: "bad deploy".into(),
        emergency: false,
        force: false,
        rolled_back: Vec::new(),
        known_workers: (None, None),
        reply: 9,
    });
    let plans = h.plans();
    assert_eq!(plans.len(), 1);
    assert_eq!(plans[0].trigger, ActionTrigger::Manual);
    assert_eq!(plans[0].operator.as_deref(), Some("uid:1000(alice)"));
    // A second one while the first runs is refused.
    h.feed(Input::Rollback {
        operator: "uid:1000(alice)".into(),
        reason: "again".into(),
        emergency: false,
        force: false,
        rolled_back: Vec::new(),
        known_workers: (None, None),
        reply: 10,
    });
    assert_eq!(h.names().last().unwrap(), "reply:failed:3");
    h.feed(Input::ActionDone {
        id: Some(1),
        result: ActionResult::RollbackFailed {
            reason: "switch hook failed: exit status 1".into(),
            artifact: "a.json".into(),
        },
    });
    let plans = h.plans();
    assert_eq!(plans.len(), 2);
    assert_eq!(plans[1].kind, ActionKind::Escalation);
    assert_eq!(plans[1].reason, "switch hook failed: exit status 1");
    h.feed(Input::ActionDone {
        id: Some(2),
        result: ActionResult::Escalated {
            artifact: "e.json".into(),
        },
    });
    assert_eq!(
        h.sup.session().unwrap().record.state,
        SessionState::Escalated
    );
    let replies: Vec<_> = h
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Reply { to: 9, answer } => Some(answer.clone()),
            _ => None,
        })
        .collect();
    assert!(matches!(replies.first(), Some(Answer::Progress { .. })));
    assert!(matches!(replies.last(), Some(Answer::Done(v)) if v["outcome"] == "escalated"));
    // An operator resetting the kill switch does not end the session: the switch failed,
    // v2 still serves, and it is watched again from a fresh window (issue 25, item 9).
    h.effects.clear();
    h.feed(Input::KillSwitchReset {
        operator: "uid:1000(alice)".into(),
    });
    assert_eq!(h.ended(), None, "{:?}", h.names());
    assert_eq!(
        h.sup.session().unwrap().record.state,
        SessionState::Monitoring
    );
    assert!(h.has("audit:monitoring-resumed"), "{:?}", h.names());
    h.run_for(Duration::from_secs(31));
    assert!(h.has("check#0"), "{:?}", h.names());
}

#[test]
fn the_grace_period_confirms_only_after_a_full_window_of_checks() {
    struct Case {
        name: &'static str,
        /// How long before the restart the session was promoted (None: promoted now).
        promoted_ago: Option<Duration>,
        /// The check that confirms is at least this far into the run.
        min_checks: usize,
    }
    let cases = [
        Case {
            name: "a promotion: confirmed at the grace period's end",
            promoted_ago: None,
            min_checks: 5,
        },
        Case {
            name: "a restart long after the grace period: a window of checks first",
            promoted_ago: Some(Duration::from_secs(3600)),
            min_checks: 5,
        },
    ];
    for case in cases {
        let mut h = Harness::new(settings(""));
        match case.promoted_ago {
            None => h.promote("v2", "v1"),
            Some(ago) => {
                let session = restored_session(&h, Some("v1"), ago);
                h.feed(Input::Restore(Box::new(Restored {
                    session: Some(session),
                    checks: (0..20)
                        .map(|i| {
                            (
                                i,
                                h.wall - ago + Duration::from_secs(30 * (i + 1)),
                                check(HEALTHY),
                            )
                        })
                        .collect(),
                    ..Restored::default()
                })));
            }
        }
        h.run_for(Duration::from_secs(2 * 3600));
        assert_eq!(h.ended().as_deref(), Some("confirmed"), "{}", case.name);
        let checks = h.names().iter().filter(|n| n.starts_with("check#")).count();
        assert!(
            checks >= case.min_checks,
            "{}: confirmed after {checks} checks",
            case.name
        );
        if case.promoted_ago.is_none() {
            // 10 min grace at 30 s: about 20 checks, not a window's 5.
            assert!((19..=21).contains(&checks), "{}: {checks}", case.name);
        } else {
            assert_eq!(checks, 5, "{}", case.name);
        }
        // Confirmed: no more checks, only observations of the (now) active version.
        h.effects.clear();
        h.run_for(Duration::from_secs(60));
        assert!(
            !h.names().iter().any(|n| n.starts_with("check#")),
            "{}",
            case.name
        );
        assert!(h.has("observe-idle:v2"), "{}: {:?}", case.name, h.names());
    }
}

#[test]
fn a_check_failed_while_rollbackd_was_stalled_is_void_and_taken_again() {
    // consecutive_failures = 1: one counted failure would escalate.
    let mut h = Harness::new(settings("[rules]\nconsecutive_failures = 1\n"));
    h.promote("v2", "v1");
    h.script = [DOWN, DOWN, DOWN, DOWN].iter().map(|l| check(l)).collect();
    h.stalls = [3, 3, 3, 3]
        .iter()
        .map(|s| Duration::from_secs(*s))
        .collect();
    h.run_for(Duration::from_secs(31));
    // Three voided in a row and retried at once; the fourth is recorded as it is.
    let names = h.names();
    assert_eq!(
        names.iter().filter(|n| n.starts_with("check#0")).count(),
        4,
        "{names:?}"
    );
    assert_eq!(names.iter().filter(|n| n.starts_with("record#")).count(), 1);
    assert_eq!(
        h.plans().len(),
        1,
        "recorded after MAX_VOID_IN_A_ROW: {names:?}"
    );

    // Stalled but healthy: recorded, not void.
    let mut h = Harness::new(settings("[rules]\nconsecutive_failures = 1\n"));
    h.promote("v2", "v1");
    h.stalls = [Duration::from_secs(3)].into_iter().collect();
    h.run_for(Duration::from_secs(31));
    assert_eq!(h.count("record#0:healthy"), 1, "{:?}", h.names());
    assert!(h.plans().is_empty());

    // One stall, then a healthy answer: void, retried, no action.
    let mut h = Harness::new(settings("[rules]\nconsecutive_failures = 1\n"));
    h.promote("v2", "v1");
    h.script = [DOWN].iter().map(|l| check(l)).collect();
    h.stalls = [Duration::from_secs(3)].into_iter().collect();
    h.run_for(Duration::from_secs(31));
    assert!(h.plans().is_empty(), "{:?}", h.names());
    assert_eq!(h.count("record#0:healthy"), 1, "{:?}", h.names());
}

#[test]
fn promotions_are_validated_once_for_every_path() {
    let cases: [(&str, &str, Option<Baseline>, Option<u8>); 7] = [
        ("v2", "v1", None, None),
        ("   ", "v1", None, Some(2)),
        ("v2", "", None, Some(2)),
        ("v2", "v 1", None, Some(2)),
        ("v2", "v2", None, Some(3)),
        (
            "v2",
            "v1",
            Some(Baseline {
                error_rate: Some(2.0),
                latency_p95_ms: None,
                ..Baseline::default()
            }),
            Some(2),
        ),
        (
            "v2",
            "v1",
            Some(Baseline {
                error_rate: Some(f64::NAN),
                latency_p95_ms: None,
                ..Baseline::default()
            }),
            Some(2),
        ),
    ];
    for (active, previous, baseline, want_exit) in cases {
        let mut h = Harness::new(settings(""));
        h.feed(Input::Promote {
            operator: "uid:0".into(),
            active: active.into(),
            previous: previous.into(),
            baseline,
            prometheus: None,
            reply: 1,
        });
        let got = h.effects.iter().find_map(|e| match e {
            Effect::Reply { answer, .. } => Some(answer.clone()),
            _ => None,
        });
        match want_exit {
            None => {
                assert!(
                    matches!(got, Some(Answer::Done(_))),
                    "{active:?}/{previous:?}: {got:?}"
                );
                assert!(h.has("record-session"));
                assert!(h.sup.session().is_some());
            }
            Some(exit) => {
                assert!(
                    matches!(&got, Some(Answer::Failed { exit: e, .. }) if *e == exit),
                    "{active:?}/{previous:?}/{baseline:?}: {got:?}"
                );
                assert!(!h.has("record-session"), "nothing recorded");
                assert!(h.sup.session().is_none());
            }
        }
    }
}

#[test]
fn a_session_that_cannot_be_recorded_is_not_started() {
    let mut h = Harness::new(settings(""));
    let now = h.now();
    h.sup.handle(
        now,
        Input::Promote {
            operator: "uid:0".into(),
            active: "v2".into(),
            previous: "v1".into(),
            baseline: None,
            prometheus: None,
            reply: 1,
        },
    );
    let Some(Effect::RecordSession(record)) = h.sup.poll_effect() else {
        panic!("expected the session to be recorded first");
    };
    h.sup.handle(
        now,
        Input::SessionRecorded {
            id: record.id,
            error: Some("disk full".into()),
        },
    );
    h.drain();
    assert!(h.sup.session().is_none());
    assert!(matches!(
        h.effects.last(),
        Some(Effect::Reply { answer: Answer::Failed { exit: 1, message }, .. }) if message.contains("disk full")
    ));
}

#[test]
fn a_restart_resumes_the_action_in_flight_or_carries_out_a_finished_one() {
    // In flight: no check is due until it ends.
    let mut h = Harness::new(settings(""));
    let session = restored_session(&h, Some("v1"), Duration::from_secs(60));
    h.feed(Input::Restore(Box::new(Restored {
        session: Some(session.clone()),
        checks: vec![(0, h.wall, check(SPIKE))],
        in_flight: Some((Some(4), ActionKind::Rollback, ActionTrigger::Automatic)),
        ..Restored::default()
    })));
    assert!(h.plans().is_empty(), "resumed, never started again");
    assert_eq!(h.sup.poll_timeout(), None);
    assert_eq!(h.sup.action().and_then(|a| a.id), Some(4));

    // Finished just before the kill while the session still says monitoring: its outcome
    // now, and no second rollback.
    let mut h = Harness::new(settings(NO_WATCH));
    h.feed(Input::Restore(Box::new(Restored {
        session: Some(session),
        checks: vec![(0, h.wall, check(SPIKE))],
        settled: Some((
            Some(4),
            ActionKind::Rollback,
            ActionTrigger::Automatic,
            ActionResult::RolledBack {
                from: "v2".into(),
                to: "v1".into(),
                artifact: "a.json".into(),
            },
        )),
        ..Restored::default()
    })));
    assert_eq!(h.ended().as_deref(), Some("rolled-back"));
    h.run_for(Duration::from_secs(120));
    assert!(h.plans().is_empty());
    assert!(!h.names().iter().any(|n| n.starts_with("check#")));
}

#[test]
fn a_reload_judges_the_window_again_under_the_new_thresholds() {
    let mut h = Harness::new(settings(""));
    h.promote("v2", "v1");
    let mild = r#"{"at":0,"probe":"ok","snapshot":{"failureRate":0.10,"requests":1000}}"#;
    h.script = [mild, mild].iter().map(|l| check(l)).collect();
    h.run_for(Duration::from_secs(61));
    assert!(h.plans().is_empty(), "10% is under the 20% threshold");
    h.feed(Input::Reload(Box::new(settings(
        "[rules]\nerror_rate_threshold = 0.05\n",
    ))));
    h.script = [mild].iter().map(|l| check(l)).collect();
    h.run_for(Duration::from_secs(31));
    let plans = h.plans();
    assert_eq!(plans.len(), 1, "{:?}", h.names());
    assert_eq!(plans[0].kind, ActionKind::Rollback);
}

#[test]
fn pause_and_resume_are_recorded_and_refused_without_a_session() {
    let mut h = Harness::new(settings(""));
    h.feed(Input::Pause {
        operator: "uid:0".into(),
        paused: true,
        reason: None,
        reply: 1,
    });
    assert_eq!(h.names(), ["reply:failed:3"]);
    h.promote("v2", "v1");
    h.feed(Input::Pause {
        operator: "uid:0".into(),
        paused: true,
        reason: Some("investigating".into()),
        reply: 2,
    });
    assert!(h.has("persist:Paused"));
    assert!(h.has("audit:monitoring-paused"));
    assert!(h.sup.session().unwrap().record.paused);
}

fn health_checks(h: &Harness) -> Vec<serde_json::Value> {
    h.effects
        .iter()
        .filter_map(|e| match e {
            Effect::Audit(r) if serde_json::to_value(r.event).unwrap() == "health-check" => {
                Some(serde_json::to_value(r).unwrap())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn each_health_check_record_says_what_was_done() {
    // (case, previous, paused, the last line's action, wouldAct, notTaken)
    let cases = [
        ("acted", Some("v1"), false, Some("rollback"), None, None),
        (
            "escalated instead",
            None,
            false,
            Some("escalate"),
            None,
            None,
        ),
        (
            "paused",
            Some("v1"),
            true,
            None,
            Some("rollback"),
            Some("monitoring is paused"),
        ),
    ];
    for (name, previous, paused, action, would, not_taken) in cases {
        let mut h = Harness::new(settings(""));
        let mut session = restored_session(&h, previous, Duration::from_secs(5));
        session.paused = paused;
        h.script = [SPIKE, SPIKE, SPIKE].iter().map(|l| check(l)).collect();
        h.feed(Input::Restore(Box::new(Restored {
            session: Some(session),
            checks: vec![(0, h.wall, check(HEALTHY))],
            ..Restored::default()
        })));
        h.run_for(Duration::from_secs(60));
        let lines = health_checks(&h);
        // The first check whose verdict asked for an action (checks go on during an
        // escalation, and say an action is in progress).
        let last = lines.iter().find(|l| l["verdict"] == "rollback").unwrap();
        assert_eq!(last["verdict"], "rollback", "{name}");
        assert_eq!(last["action"].as_str(), action, "{name}: {last}");
        assert_eq!(last["wouldAct"].as_str(), would, "{name}: {last}");
        assert_eq!(last["notTaken"].as_str(), not_taken, "{name}: {last}");
    }
}

#[test]
fn evidence_numbers_checks_as_the_audit_lines_do_after_a_restart_and_a_reload() {
    let mut h = Harness::new(settings(""));
    let session = restored_session(&h, Some("v1"), Duration::from_secs(120));
    // Checks #0..#7 were taken before the restart (more than the window of 5 is replayed).
    let earlier = (0..8)
        .map(|i| {
            (
                i,
                h.wall - Duration::from_secs(100 - 10 * i),
                check(HEALTHY),
            )
        })
        .collect();
    h.feed(Input::Restore(Box::new(Restored {
        session: Some(session),
        checks: earlier,
        ..Restored::default()
    })));
    h.script = [SPIKE].iter().map(|l| check(l)).collect();
    h.run_for(Duration::from_secs(1));
    h.feed(Input::Reload(Box::new(settings(""))));
    h.script = [SPIKE, SPIKE].iter().map(|l| check(l)).collect();
    h.run_for(Duration::from_secs(60));
    let plans = h.plans();
    assert_eq!(plans.len(), 1, "{:?}", h.names());
    let numbered: Vec<u64> = plans[0]
        .evidence
        .recent_checks
        .iter()
        .map(|c| c["checkIndex"].as_u64().unwrap())
        .collect();
    let audited: Vec<u64> = health_checks(&h)
        .iter()
        .map(|l| l["checkIndex"].as_u64().unwrap())
        .collect();
    assert_eq!(audited, [8, 9, 10]);
    // The window: #6, #7 from before the restart, then #8..#10 as audited.
    assert_eq!(numbered, [6, 7, 8, 9, 10]);
}

// -- automatic baselines (SPEC §2a) ------------------------------------------------------

const BASE_03: &str =
    r#"{"at":0,"probe":"ok","snapshot":{"failureRate":0.003,"requests":5000,"latencyP95Ms":120}}"#;
const BAD_12: &str = r#"{"at":0,"probe":"ok","snapshot":{"failureRate":0.012,"requests":5000}}"#;

/// A daemon that has known `v1` as the active version, idle.
fn idle_on_v1(extra: &str) -> Harness {
    let mut h = Harness::new(settings(extra));
    h.idle = check(BASE_03);
    h.feed(Input::Restore(Box::new(Restored {
        active_worker: Some("v1".into()),
        ..Restored::default()
    })));
    h
}

fn session_baseline(h: &Harness) -> Option<Baseline> {
    h.sup.session().and_then(|s| s.record.baseline)
}

#[test]
fn the_active_version_is_observed_between_sessions_and_becomes_the_baseline() {
    let mut h = idle_on_v1("");
    h.run_for(Duration::from_secs(600));
    let observed = h.names().iter().filter(|n| *n == "observe-idle:v1").count();
    // Every 30 s, from the start: 0, 30, …, 600.
    assert_eq!(observed, 21, "{:?}", h.names());
    assert!(h.has("persist:Observation"), "{:?}", h.names());

    h.promote("v2", "v1");
    let baseline = session_baseline(&h).expect("an automatic baseline");
    assert_eq!(
        baseline.source,
        Some(rollbackd::core::check::BaselineSource::Observed)
    );
    // The window is 10 minutes ending at the promotion: 21 samples of 15 errors in 5,000.
    assert_eq!(baseline.samples, Some(21));
    assert_eq!(
        (baseline.errors, baseline.requests),
        (Some(315.0), Some(105_000))
    );
    assert_eq!(baseline.latency_p95_ms, Some(120.0));
    // Nothing is observed while the session runs.
    h.effects.clear();
    for _ in 0..3 {
        h.script.push_back(check(BAD_12));
    }
    h.run_for(Duration::from_secs(100));
    assert!(!h.names().iter().any(|n| n.starts_with("observe-idle")));
    // 1.2% is far below the absolute 20%, but 4× the version it replaced: rolled back.
    assert!(h.has("start:rollback:automatic"), "{:?}", h.names());
}

#[test]
fn without_a_baseline_the_same_release_is_not_caught() {
    let mut h = idle_on_v1("[baseline]\nobserve_interval = \"0s\"\n");
    h.run_for(Duration::from_secs(600));
    assert!(!h.names().iter().any(|n| n.starts_with("observe-idle")));
    h.promote("v2", "v1");
    assert_eq!(session_baseline(&h), None);
    for _ in 0..5 {
        h.script.push_back(check(BAD_12));
    }
    h.run_for(Duration::from_secs(150));
    assert!(!h.has("start:rollback:automatic"), "{:?}", h.names());
}

#[test]
fn an_operator_baseline_wins_over_the_observed_one() {
    let mut h = idle_on_v1("");
    h.run_for(Duration::from_secs(300));
    h.feed(Input::Promote {
        operator: "uid:0".into(),
        active: "v2".into(),
        previous: "v1".into(),
        baseline: Some(Baseline {
            error_rate: Some(0.05),
            source: Some(rollbackd::core::check::BaselineSource::Operator),
            ..Baseline::default()
        }),
        prometheus: None,
        reply: 1,
    });
    let baseline = session_baseline(&h).unwrap();
    assert_eq!(baseline.error_rate, Some(0.05));
    assert_eq!(
        baseline.source,
        Some(rollbackd::core::check::BaselineSource::Operator)
    );
}

#[test]
fn too_few_observations_fall_back_to_the_previous_healthy_session() {
    // v2's session is confirmed healthy; its checks' stats are remembered (and persisted).
    let mut h = idle_on_v1("[baseline]\nobserve_interval = \"0s\"\n");
    h.promote("v2", "v1");
    for _ in 0..40 {
        h.script.push_back(check(BASE_03));
    }
    h.run_for(Duration::from_secs(11 * 60));
    assert!(h.sup.session().is_none(), "confirmed: {:?}", h.names());
    assert!(h.has("persist:HealthyBaseline"), "{:?}", h.names());
    // Much later (the observations of v2 are older than the window), v3 replaces v2.
    h.advance(Duration::from_secs(3600));
    h.promote("v3", "v2");
    let baseline = session_baseline(&h).expect("the previous session's stats");
    assert_eq!(
        baseline.source,
        Some(rollbackd::core::check::BaselineSource::PreviousSession)
    );
    assert_eq!(baseline.error_rate, Some(0.003));
}

#[test]
fn observations_survive_a_restart() {
    let mut h = idle_on_v1("");
    h.run_for(Duration::from_secs(300));
    let persisted: Vec<_> = h
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Persist(rollbackd::core::supervisor::StateChange::Observation {
                observed,
                ..
            }) => Some(observed.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(persisted.len(), 11);
    // A new process, handed what was persisted.
    let wall = h.wall;
    let mut h = Harness::new(settings("[baseline]\nobserve_interval = \"0s\"\n"));
    h.wall = wall;
    h.feed(Input::Restore(Box::new(Restored {
        active_worker: Some("v1".into()),
        observations: persisted,
        ..Restored::default()
    })));
    h.promote("v2", "v1");
    let baseline = session_baseline(&h).unwrap();
    assert_eq!(baseline.samples, Some(11));
    assert_eq!(
        baseline.source,
        Some(rollbackd::core::check::BaselineSource::Observed)
    );
}

// -- the stability watch (issue 13) ------------------------------------------------------

const WATCH_5M: &str = "[rollback]\nstability_period = \"5m\"\n";

/// Promotes v2 over v1, lets three spikes roll it back, and reports the rollback verified.
fn rolled_back(extra: &str) -> Harness {
    let mut h = Harness::new(settings(extra));
    h.promote("v2", "v1");
    h.script = [SPIKE, SPIKE, SPIKE].iter().map(|l| check(l)).collect();
    h.run_for(Duration::from_secs(300));
    assert_eq!(h.count("start:rollback:automatic"), 1, "{:?}", h.names());
    h.feed(Input::ActionDone {
        id: Some(1),
        result: ActionResult::RolledBack {
            from: "v2".into(),
            to: "v1".into(),
            artifact: "a.json".into(),
        },
    });
    h
}

#[test]
fn the_restored_version_is_watched_and_a_breach_escalates_but_never_rolls_back_again() {
    struct Case {
        name: &'static str,
        config: &'static str,
        /// What the restored version answers during the watch.
        script: &'static [&'static str],
        run: Duration,
        watch_started: bool,
        /// The stability event written (at most one).
        ended_by: Option<&'static str>,
        escalations: usize,
        /// How the session ended (`None`: it goes on).
        session_end: Option<&'static str>,
    }
    let cases = [
        Case {
            name: "healthy through the period: confirmed, the session ends rolled back",
            config: WATCH_5M,
            script: &[],
            run: Duration::from_secs(400),
            watch_started: true,
            ended_by: Some("audit:stability-confirmed"),
            escalations: 0,
            session_end: Some("rolled-back"),
        },
        Case {
            name: "error spikes on the restored version: escalated, not rolled back",
            config: WATCH_5M,
            script: &[HEALTHY, SPIKE, SPIKE, SPIKE],
            run: Duration::from_secs(400),
            watch_started: true,
            ended_by: Some("audit:stability-failed"),
            escalations: 1,
            session_end: None,
        },
        Case {
            name: "the restored version stops answering: escalated",
            config: WATCH_5M,
            script: &[DOWN, DOWN, DOWN, DOWN],
            run: Duration::from_secs(400),
            watch_started: true,
            ended_by: Some("audit:stability-failed"),
            escalations: 1,
            session_end: None,
        },
        Case {
            name: "a breach after the period is not the watch's: confirmed before it",
            config: WATCH_5M,
            script: &[
                HEALTHY, HEALTHY, HEALTHY, HEALTHY, HEALTHY, HEALTHY, HEALTHY, HEALTHY, HEALTHY,
                HEALTHY, HEALTHY, SPIKE, SPIKE, SPIKE,
            ],
            run: Duration::from_secs(400),
            watch_started: true,
            ended_by: Some("audit:stability-confirmed"),
            escalations: 0,
            session_end: Some("rolled-back"),
        },
        Case {
            name: "stability_period = 0: no watch, the session ends at the rollback",
            config: NO_WATCH,
            script: &[SPIKE, SPIKE, SPIKE],
            run: Duration::from_secs(400),
            watch_started: false,
            ended_by: None,
            escalations: 0,
            session_end: Some("rolled-back"),
        },
    ];
    for case in cases {
        let mut h = rolled_back(case.config);
        h.script = case.script.iter().map(|l| check(l)).collect();
        h.run_for(case.run);
        if case.escalations > 0 {
            // The escalation ends (the kill switch is set): the session stays escalated.
            h.feed(Input::ActionDone {
                id: Some(2),
                result: ActionResult::Escalated {
                    artifact: "e.json".into(),
                },
            });
            h.run_for(Duration::from_secs(120));
        }
        let names = h.names();
        assert_eq!(
            h.has("audit:stability-watch-started"),
            case.watch_started,
            "{}: {names:?}",
            case.name
        );
        let stability_events = names
            .iter()
            .filter(|n| {
                n.starts_with("audit:stability-confirmed")
                    || n.starts_with("audit:stability-failed")
            })
            .cloned()
            .collect::<Vec<_>>();
        assert_eq!(
            stability_events,
            case.ended_by
                .map(str::to_owned)
                .into_iter()
                .collect::<Vec<_>>(),
            "{}: {names:?}",
            case.name
        );
        assert_eq!(
            h.count("start:rollback:automatic"),
            1,
            "{}: never a second rollback",
            case.name
        );
        assert_eq!(
            h.count("start:escalation:automatic"),
            case.escalations,
            "{}: {names:?}",
            case.name
        );
        assert_eq!(
            h.ended().as_deref(),
            case.session_end,
            "{}: {names:?}",
            case.name
        );
        if case.escalations > 0 {
            let plan = h.plans()[1];
            assert!(
                plan.reason.starts_with("restored version v1 unstable: "),
                "{}: {}",
                case.name,
                plan.reason
            );
            assert_eq!(
                plan.from.as_deref(),
                Some("v1"),
                "the restored version is the one escalated on"
            );
            let session = h.sup.session().expect("an escalated session goes on");
            assert_eq!(session.record.state, SessionState::Escalated);
            assert_eq!(
                session.record.stability.as_ref().and_then(|w| w.result),
                Some(StabilityResult::Failed)
            );
        }
        if case.session_end == Some("rolled-back") && case.watch_started {
            assert!(
                h.has("incident-report"),
                "{}: the report is rewritten at the end",
                case.name
            );
        }
    }
}

#[test]
fn the_watch_judges_only_the_restored_versions_checks() {
    let mut h = rolled_back(WATCH_5M);
    let session = h.sup.session().expect("the session goes on");
    assert_eq!(session.record.state, SessionState::StabilityWatch);
    assert_eq!(session.record.active, "v1");
    assert_eq!(session.record.previous.as_deref(), Some("v2"));
    let watch = session.record.stability.clone().expect("watch recorded");
    assert_eq!(
        watch.first_check, 3,
        "the canary's three checks are not the watch's"
    );
    assert_eq!(watch.restored, "v1");
    assert_eq!(watch.rollback_action, Some(1));
    assert!(session.last_decision.is_none(), "a fresh window");
    assert!(h.has("persist:Stability"), "{:?}", h.names());
    // Two spikes in the canary's window would make one more spike a breach of 3 of 5; in
    // a fresh window one spike is only degraded.
    h.effects.clear();
    h.script = [SPIKE].iter().map(|l| check(l)).collect();
    h.run_for(Duration::from_secs(31));
    assert!(h.plans().is_empty(), "{:?}", h.names());
    let session = h.sup.session().unwrap();
    assert_eq!(session.engine().window().count(), 1);
}

#[test]
fn a_restart_during_the_watch_resumes_it_without_carrying_out_the_rollback_again() {
    let mut first = rolled_back(WATCH_5M);
    // As rollbackd.db holds it: the row keeps the promotion's workers, the watch says
    // which version is being watched.
    let mut record = first.sup.session().unwrap().record.clone();
    record.active = "v2".into();
    record.previous = Some("v1".into());
    first.run_for(Duration::from_secs(60));
    let checks_in_watch = first.sup.session().unwrap().next_index;
    assert!(checks_in_watch > 3);

    let mut h = Harness::new(settings(WATCH_5M));
    h.wall = first.wall;
    // The canary's spikes are on record before the watch's healthy checks.
    let mut checks: Vec<_> = (0..3)
        .map(|i| (i, h.wall - Duration::from_secs(200), check(SPIKE)))
        .collect();
    checks.extend(
        (3..checks_in_watch).map(|i| (i, h.wall - Duration::from_secs(30), check(HEALTHY))),
    );
    h.feed(Input::Restore(Box::new(Restored {
        session: Some(record),
        checks,
        settled: Some((
            Some(1),
            ActionKind::Rollback,
            ActionTrigger::Automatic,
            ActionResult::RolledBack {
                from: "v2".into(),
                to: "v1".into(),
                artifact: "a.json".into(),
            },
        )),
        ..Restored::default()
    })));
    assert!(
        !h.has("audit:stability-watch-started"),
        "the watch is resumed, not begun again: {:?}",
        h.names()
    );
    let session = h.sup.session().expect("resumed");
    assert_eq!(session.record.state, SessionState::StabilityWatch);
    assert_eq!(
        session.record.active, "v1",
        "the restored version is the one checked"
    );
    assert_eq!(session.record.previous.as_deref(), Some("v2"));
    assert_eq!(
        session.engine().window().count() as u64,
        (checks_in_watch - 3).min(5),
        "only the watch's checks are replayed"
    );
    // One spike now is one breach in a window of healthy checks: nothing happens.
    h.script = [SPIKE].iter().map(|l| check(l)).collect();
    h.run_for(Duration::from_secs(400));
    assert!(h.plans().is_empty(), "{:?}", h.names());
    assert_eq!(h.count("audit:stability-confirmed"), 1, "{:?}", h.names());
    assert!(h
        .effects
        .iter()
        .all(|e| !matches!(e, Effect::StartCheck { worker, .. } if worker != "v1")));
}

#[test]
fn a_promotion_during_the_watch_interrupts_it() {
    let mut h = rolled_back(WATCH_5M);
    h.run_for(Duration::from_secs(60));
    h.effects.clear();
    h.promote("v3", "v1");
    assert_eq!(h.ended().as_deref(), Some("stopped"));
    assert!(
        h.has("persist:Stability"),
        "the interrupted watch is recorded: {:?}",
        h.names()
    );
    assert!(!h.has("audit:stability-confirmed") && !h.has("audit:stability-failed"));
    assert_eq!(h.sup.session().unwrap().record.active, "v3");
}

#[test]
fn a_fleet_verdict_becomes_a_rollback_through_the_same_policy() {
    struct Case {
        name: &'static str,
        extra: &'static str,
        previous: Option<&'static str>,
        rollbacks_before: u32,
        paused: bool,
        version: &'static str,
        want: Option<(ActionKind, &'static str)>,
    }
    // Which verdicts are news to the session (written after the promotion, by etcd
    // revision) is the runner's to say: tests/fleet.rs.
    let cases = [
        Case {
            name: "another host rolled back the active version: roll back, trigger fleet",
            extra: "",
            previous: Some("v1"),
            rollbacks_before: 0,
            paused: false,
            version: "v2",
            want: Some((
                ActionKind::Rollback,
                "v2 was rolled back on web-9: high error rate",
            )),
        },
        Case {
            name: "a verdict about another version: nothing",
            extra: "",
            previous: Some("v1"),
            rollbacks_before: 0,
            paused: false,
            version: "v3",
            want: None,
        },
        Case {
            name: "paused: nothing",
            extra: "",
            previous: Some("v1"),
            rollbacks_before: 0,
            paused: true,
            version: "v2",
            want: None,
        },
        Case {
            name: "dry run: nothing",
            extra: "[rules]\ndry_run = true\n",
            previous: Some("v1"),
            rollbacks_before: 0,
            paused: false,
            version: "v2",
            want: None,
        },
        Case {
            name: "no previous worker: escalates",
            extra: "",
            previous: None,
            rollbacks_before: 0,
            paused: false,
            version: "v2",
            want: Some((ActionKind::Escalation, "no previous worker is known")),
        },
        Case {
            name: "the hour's rollback budget spent: escalates instead of looping",
            extra: "[rollback]\nmax_rollbacks_per_hour = 2\n",
            previous: Some("v1"),
            rollbacks_before: 2,
            paused: false,
            version: "v2",
            want: Some((ActionKind::Escalation, "max_rollbacks_per_hour = 2")),
        },
    ];
    for case in cases {
        let mut h = Harness::new(settings(case.extra));
        let mut session = restored_session(&h, case.previous, Duration::from_secs(5));
        session.paused = case.paused;
        let rollbacks = (0..case.rollbacks_before)
            .map(|i| PastRollback {
                at: h.wall - Duration::from_secs(600 + u64::from(i)),
                from: "v2".into(),
            })
            .collect();
        h.feed(Input::Restore(Box::new(Restored {
            session: Some(session),
            checks: vec![(0, h.wall - Duration::from_secs(1), check(HEALTHY))],
            rollbacks,
            ..Restored::default()
        })));
        h.feed(Input::FleetVerdict {
            version: case.version.into(),
            host: "web-9".into(),
            reason: "high error rate".into(),
        });
        let plans = h.plans();
        match case.want {
            None => assert!(plans.is_empty(), "{}: {:?}", case.name, h.names()),
            Some((kind, reason)) => {
                assert_eq!(plans.len(), 1, "{}: {:?}", case.name, h.names());
                assert_eq!(plans[0].kind, kind, "{}", case.name);
                assert_eq!(plans[0].trigger, ActionTrigger::Fleet, "{}", case.name);
                assert_eq!(plans[0].operator.as_deref(), Some("web-9"), "{}", case.name);
                assert!(
                    plans[0].reason.contains(reason),
                    "{}: {}",
                    case.name,
                    plans[0].reason
                );
            }
        }
    }
}

/// A harness with a restored session of v2 (previous v1), paused, that has just been
/// told `web-9` rolled back each of `versions`.
fn paused_with_verdicts(versions: &[&str]) -> Harness {
    let mut h = Harness::new(settings(""));
    let mut session = restored_session(&h, Some("v1"), Duration::from_secs(5));
    session.paused = true;
    h.feed(Input::Restore(Box::new(Restored {
        session: Some(session),
        checks: vec![(0, h.wall - Duration::from_secs(1), check(HEALTHY))],
        ..Restored::default()
    })));
    for version in versions {
        h.feed(Input::FleetVerdict {
            version: (*version).into(),
            host: "web-9".into(),
            reason: "high error rate".into(),
        });
    }
    assert!(h.plans().is_empty(), "paused: {:?}", h.names());
    h
}

fn set_paused(h: &mut Harness, paused: bool, reply: u64) {
    h.feed(Input::Pause {
        operator: "uid:0".into(),
        paused,
        reason: None,
        reply,
    });
}

#[test]
fn a_fleet_verdict_that_came_while_paused_is_followed_on_resume() {
    // A verdict for the active version while paused: nothing then, a rollback (trigger
    // fleet) on resume; one about another version, or resuming twice, adds nothing.
    let mut h = paused_with_verdicts(&["v3", "v2"]);
    set_paused(&mut h, false, 7);
    set_paused(&mut h, false, 8);
    let plans = h.plans();
    assert_eq!(plans.len(), 1, "{:?}", h.names());
    assert_eq!(plans[0].kind, ActionKind::Rollback);
    assert_eq!(plans[0].trigger, ActionTrigger::Fleet);
    assert_eq!(plans[0].operator.as_deref(), Some("web-9"));
    assert!(
        plans[0]
            .reason
            .contains("v2 was rolled back on web-9: high error rate"),
        "{}",
        plans[0].reason
    );
    assert!(h.has("audit:monitoring-resumed"), "{:?}", h.names());
}

#[test]
fn a_fleet_verdict_while_paused_is_not_followed_on_resume_once_a_new_version_is_promoted() {
    let mut h = paused_with_verdicts(&["v2"]);
    h.promote("v3", "v1");
    set_paused(&mut h, true, 7);
    set_paused(&mut h, false, 8);
    assert!(h.plans().is_empty(), "{:?}", h.names());
}

#[test]
fn a_fleet_verdict_while_the_host_is_mid_rollback_starts_nothing_more() {
    let mut h = Harness::new(settings(""));
    let session = restored_session(&h, Some("v1"), Duration::from_secs(5));
    h.script = [SPIKE, SPIKE, SPIKE].iter().map(|l| check(l)).collect();
    h.feed(Input::Restore(Box::new(Restored {
        session: Some(session),
        checks: vec![(0, h.wall - Duration::from_secs(1), check(HEALTHY))],
        ..Restored::default()
    })));
    h.run_for(Duration::from_secs(120));
    assert_eq!(h.plans().len(), 1, "{:?}", h.names());
    for _ in 0..2 {
        h.feed(Input::FleetVerdict {
            version: "v2".into(),
            host: "web-9".into(),
            reason: "high error rate".into(),
        });
    }
    assert_eq!(h.plans().len(), 1, "{:?}", h.names());
    assert_eq!(h.plans()[0].trigger, ActionTrigger::Automatic);
    // Once the host's own rollback is done (the session watches the restored v1), still
    // nothing.
    h.feed(Input::ActionDone {
        id: Some(1),
        result: ActionResult::RolledBack {
            from: "v2".into(),
            to: "v1".into(),
            artifact: "a".into(),
        },
    });
    h.feed(Input::FleetVerdict {
        version: "v2".into(),
        host: "web-9".into(),
        reason: "high error rate".into(),
    });
    assert_eq!(h.plans().len(), 1, "{:?}", h.names());
}

#[test]
fn a_fleet_verdict_for_the_restored_version_fails_the_watch_and_escalates_once() {
    struct Case {
        name: &'static str,
        version: &'static str,
        // A verdict fed is one written after the watch began (by etcd revision: the
        // runner's to say, tests/fleet.rs).
        escalations: usize,
        failed: bool,
    }
    let cases = [
        Case {
            name: "the restored v1 rolled back elsewhere: the watch fails, one escalation",
            version: "v1",
            escalations: 1,
            failed: true,
        },
        Case {
            name: "another host's verdict for v2, the version rolled back here: nothing more",
            version: "v2",
            escalations: 0,
            failed: false,
        },
    ];
    for case in cases {
        let mut h = rolled_back(WATCH_5M);
        h.run_for(Duration::from_secs(20));
        for _ in 0..2 {
            h.feed(Input::FleetVerdict {
                version: case.version.into(),
                host: "web-9".into(),
                reason: "high error rate".into(),
            });
        }
        let plans = h.plans();
        let escalations: Vec<_> = plans
            .iter()
            .filter(|p| p.kind == ActionKind::Escalation)
            .collect();
        assert_eq!(
            escalations.len(),
            case.escalations,
            "{}: {:?}",
            case.name,
            h.names()
        );
        assert_eq!(
            plans
                .iter()
                .filter(|p| p.kind == ActionKind::Rollback)
                .count(),
            1,
            "{}: never a second rollback",
            case.name
        );
        assert_eq!(
            h.has("audit:stability-failed"),
            case.failed,
            "{}",
            case.name
        );
        if let Some(escalation) = escalations.first() {
            assert_eq!(escalation.trigger, ActionTrigger::Fleet, "{}", case.name);
            assert!(
                escalation.reason.starts_with(
                    "restored version v1 unstable: fleet: v1 was rolled back on web-9"
                ),
                "{}: {}",
                case.name,
                escalation.reason
            );
        }
    }
}

/// SPEC §2b: only a confirmed version's checks feed a baseline. v2 is rolled back after
/// its checks were taken at 12%; a promotion of v3 over v2 right after must not use
/// v2's canary checks as its baseline (an equally bad v3 would then look "no worse").
#[test]
fn a_rolled_back_canarys_checks_never_become_the_next_baseline() {
    let mut h = idle_on_v1(NO_WATCH);
    h.run_for(Duration::from_secs(600));
    h.promote("v2", "v1");
    for _ in 0..5 {
        h.script.push_back(check(BAD_12));
    }
    h.run_for(Duration::from_secs(120));
    assert!(h.has("start:rollback:automatic"), "{:?}", h.names());
    h.feed(Input::ActionDone {
        id: Some(1),
        result: ActionResult::RolledBack {
            from: "v2".into(),
            to: "v1".into(),
            artifact: "rollback_x.json".into(),
        },
    });
    assert!(h.sup.session().is_none(), "{:?}", h.names());
    // Straight away, someone promotes v3 over v2 (as if v2 were still the previous one).
    h.promote("v3", "v2");
    let baseline = session_baseline(&h);
    assert!(
        baseline.is_none_or(|b| b.source != Some(rollbackd::core::check::BaselineSource::Observed)),
        "v2's rolled-back canary checks became a baseline: {baseline:?}"
    );
}

/// …while a confirmed canary's checks do: after v2 is confirmed, a promotion of v3 over
/// v2 is judged against v2's checks at once (no 10 minutes of idle observation needed).
#[test]
fn a_confirmed_canarys_checks_feed_the_next_baseline() {
    let mut h = idle_on_v1("");
    h.promote("v2", "v1");
    for _ in 0..40 {
        h.script.push_back(check(BASE_03));
    }
    h.run_for(Duration::from_secs(11 * 60));
    assert_eq!(h.ended().as_deref(), Some("confirmed"), "{:?}", h.names());
    h.promote("v3", "v2");
    let baseline = session_baseline(&h).expect("a baseline from v2's checks");
    assert_eq!(
        baseline.source,
        Some(rollbackd::core::check::BaselineSource::Observed)
    );
    assert!((baseline.error_rate.unwrap() - 0.003).abs() < 1e-9);
}

/// SPEC §2 (`no_data_policy = "hold"`, the default): a monitoring outage over the end of
/// the grace period is not a confirmation. The session stays open, says once that it
/// cannot judge (an alerted audit event, no action), and confirms only after a full
/// window of judged checks.
#[test]
fn a_grace_period_never_ends_in_a_confirmation_it_could_not_see() {
    let mut h = idle_on_v1(NO_WATCH);
    h.promote("v2", "v1");
    const NO_SNAPSHOT: &str = r#"{"at":0,"probe":"ok","snapshot":null}"#;
    for _ in 0..17 {
        h.script.push_back(check(BASE_03));
    }
    // From 8.5 minutes on, the metrics are unreachable for 4 minutes (checks every 15 s
    // once the window is degraded).
    for _ in 0..16 {
        h.script.push_back(check(NO_SNAPSHOT));
    }
    h.run_for(Duration::from_secs(11 * 60));
    assert!(
        h.sup.session().is_some(),
        "confirmed blind: {:?}",
        h.names()
    );
    assert_eq!(h.count("audit:cannot-judge"), 1, "{:?}", h.names());
    assert!(
        !h.names().iter().any(|n| n.starts_with("start:")),
        "{:?}",
        h.names()
    );
    // Data comes back: judged again (said once), and a full window later, confirmed.
    h.run_for(Duration::from_secs(5 * 60));
    assert_eq!(h.count("audit:judging-again"), 1, "{:?}", h.names());
    assert_eq!(h.ended().as_deref(), Some("confirmed"), "{:?}", h.names());
}

/// The accumulating evidence survives a restart: the session's checks are replayed, not
/// only the window's, so a slow regression found at check 9 is found at check 9 after a
/// restart at check 7 too.
#[test]
fn the_accumulated_evidence_survives_a_restart() {
    use rollbackd::core::engine::Engine;
    let settings = settings("");
    let baseline = Baseline {
        error_rate: Some(0.01),
        errors: Some(1000.0),
        requests: Some(100_000),
        samples: Some(20),
        dispersion: Some(0.09),
        persistence: Some(0.5),
        step_seconds: Some(30.0),
        ..Baseline::default()
    };
    const TWICE: &str = r#"{"at":0,"probe":"ok","snapshot":{"failureRate":0.02,"requests":20000}}"#;
    let mut straight = Engine::new(settings.rules.clone(), Some(baseline));
    let first = (0..12u64)
        .map(|i| straight.observe_numbered(Duration::from_secs(30 * (i + 1)), i, &check(TWICE)))
        .position(|d| d.action.is_some())
        .expect("a steady 2x regression is caught within 12 checks");

    let mut h = Harness::new(settings);
    // The replayed checks end 30 s ago, as they would have without the restart.
    let ago = Duration::from_secs(30 * (first as u64 + 1));
    let mut record = restored_session(&h, Some("v1"), ago);
    record.baseline = Some(baseline);
    let checks: Vec<(u64, SystemTime, CheckResult)> = (0..first as u64)
        .map(|i| {
            (
                i,
                record.promoted_at + Duration::from_secs(30 * (i + 1)),
                check(TWICE),
            )
        })
        .collect();
    h.feed(Input::Restore(Box::new(Restored {
        session: Some(record),
        checks,
        active_worker: Some("v2".into()),
        ..Restored::default()
    })));
    h.script.push_back(check(TWICE));
    h.run_for(Duration::from_secs(1));
    assert!(h.has("start:rollback:automatic"), "{:?}", h.names());
}

/// Issue 25, item 5: right after a rollback the restored version's metrics still cover the
/// bad version's window. Inside `rollback.settle` its checks are not judged on them (a
/// spike then is the old version's), a failing probe still is; after it they are.
#[test]
fn the_watch_judges_the_restored_version_only_after_the_settle_time() {
    let mut h = rolled_back("[rollback]\nstability_period = \"5m\"\nsettle = \"100s\"\n");
    assert!(h.has("audit:stability-watch-started"), "{:?}", h.names());
    h.effects.clear();
    // Three checks inside the settle time (30, 60, 90 s) still see v2's errors: three
    // breaches, which without the settle time would fail the watch.
    h.script = [SPIKE, SPIKE, SPIKE].iter().map(|l| check(l)).collect();
    h.run_for(Duration::from_secs(95));
    assert_eq!(h.count("audit:health-check"), 3, "{:?}", h.names());
    assert!(
        !h.names().iter().any(|n| n.starts_with("start:")),
        "{:?}",
        h.names()
    );
    assert!(!h.has("audit:stability-failed"), "{:?}", h.names());
    // After it, three breaching checks of v1 are v1's: the watch fails and escalates.
    h.script = [SPIKE, SPIKE, SPIKE].iter().map(|l| check(l)).collect();
    h.run_for(Duration::from_secs(120));
    assert!(h.has("audit:stability-failed"), "{:?}", h.names());
    assert_eq!(h.count("start:escalation:automatic"), 1, "{:?}", h.names());
}

/// The same settle time does not hide a probe that fails: the restored worker down is
/// known at once.
#[test]
fn a_failing_probe_inside_the_settle_time_still_escalates() {
    let mut h = rolled_back("[rollback]\nstability_period = \"5m\"\nsettle = \"5m\"\n");
    h.effects.clear();
    h.script = [DOWN, DOWN].iter().map(|l| check(l)).collect();
    h.run_for(Duration::from_secs(90));
    assert_eq!(h.count("start:escalation:automatic"), 1, "{:?}", h.names());
}

/// Issue 25, item 7: loop protection counts automatic rollbacks of the *same* version. A
/// busy hour of different bad releases (and a manual rollback) must not leave the fourth
/// one serving with only the kill switch; when it does hold back, the reason says the
/// version still serves and to roll it back by hand.
#[test]
fn loop_protection_counts_rollbacks_of_the_same_version() {
    let run = |rollbacks: Vec<PastRollback>| {
        let mut h = Harness::new(settings("[rollback]\nmax_rollbacks_per_hour = 2\n"));
        let session = restored_session(&h, Some("v1"), Duration::from_secs(30));
        h.script = [SPIKE, SPIKE, SPIKE].iter().map(|l| check(l)).collect();
        h.feed(Input::Restore(Box::new(Restored {
            session: Some(session),
            rollbacks,
            ..Restored::default()
        })));
        h.run_for(Duration::from_secs(120));
        let plan = h.plans()[0].clone();
        (plan.kind, plan.reason)
    };
    let past = |from: &str, ago: u64| PastRollback {
        at: UNIX_EPOCH + Duration::from_secs(1_800_000_000 - ago),
        from: from.into(),
    };
    // Three other releases rolled back this hour: v2 is still rolled back.
    let (kind, _) = run(vec![past("v5", 600), past("v6", 500), past("v7", 400)]);
    assert_eq!(kind, ActionKind::Rollback);
    // v2 itself twice: a loop; escalation, and the reason says what to do.
    let (kind, reason) = run(vec![past("v2", 600), past("v2", 300)]);
    assert_eq!(kind, ActionKind::Escalation);
    assert!(
        reason.contains("still serving v2: roll back by hand"),
        "{reason}"
    );
    // Rollbacks of v2 more than an hour ago do not count.
    let (kind, _) = run(vec![past("v2", 4000), past("v2", 3700)]);
    assert_eq!(kind, ActionKind::Rollback);
}

/// Issue 26, item 1: a pause holds actions back; it must not turn a failing release into
/// a confirmed one at the end of the grace period, nor a failing restored version into
/// a confirmed watch. The session stays open and paused until someone resumes it.
#[test]
fn a_paused_session_never_confirms_while_its_checks_fail() {
    // The grace period.
    let mut h = Harness::new(settings(NO_WATCH));
    h.promote("v3", "v2");
    set_paused(&mut h, true, 11);
    h.script = std::iter::repeat_n(check(SPIKE), 80).collect();
    h.run_for(Duration::from_secs(12 * 60));
    assert_eq!(
        h.ended(),
        None,
        "confirmed while paused and failing: {:?}",
        h.names()
    );
    assert!(
        !h.names().iter().any(|n| n.starts_with("start:")),
        "{:?}",
        h.names()
    );
    let session = h.sup.session().expect("still open");
    assert!(session.record.paused);
    // Healthy again (the checks that failed age out of the window): then it confirms.
    h.script.clear();
    h.run_for(Duration::from_secs(5 * 60));
    assert_eq!(h.ended().as_deref(), Some("confirmed"), "{:?}", h.names());

    // The stability watch.
    let mut h = rolled_back("[rollback]\nstability_period = \"2m\"\n");
    set_paused(&mut h, true, 12);
    h.effects.clear();
    h.script = std::iter::repeat_n(check(SPIKE), 40).collect();
    h.run_for(Duration::from_secs(5 * 60));
    assert!(!h.has("audit:stability-confirmed"), "{:?}", h.names());
    assert!(h.sup.session().is_some_and(|s| s.record.paused));
}

/// Issue 26, item 22: v2 rolled back to v1, v1 failed its watch, the session escalated.
/// A restart then must resume on v1 (the version serving), not on the rolled-back v2.
#[test]
fn a_restart_after_a_failed_watch_resumes_on_the_restored_version() {
    let mut h = Harness::new(settings(WATCH_5M));
    let mut record = restored_session(&h, Some("v1"), Duration::from_secs(300));
    record.state = SessionState::Escalated;
    record.stability = Some(rollbackd::core::supervisor::Stability {
        started_at_ms: rollbackd::core::time::to_ms(h.wall - Duration::from_secs(200)),
        period_seconds: 300.0,
        restored: "v1".into(),
        from: "v2".into(),
        rollback_action: Some(1),
        first_check: 3,
        result: Some(StabilityResult::Failed),
        ended_at_ms: Some(rollbackd::core::time::to_ms(
            h.wall - Duration::from_secs(100),
        )),
        reason: Some("restored version v1 unstable".into()),
    });
    h.feed(Input::Restore(Box::new(Restored {
        session: Some(record),
        active_worker: Some("v1".into()),
        ..Restored::default()
    })));
    let session = h.sup.session().expect("resumed");
    assert_eq!(
        session.record.active, "v1",
        "resumed on the rolled-back canary"
    );
    assert_eq!(session.record.previous.as_deref(), Some("v2"));
    h.run_for(Duration::from_secs(60));
    assert!(
        h.effects
            .iter()
            .any(|e| matches!(e, Effect::StartCheck { worker, .. } if worker == "v1")),
        "{:?}",
        h.names()
    );
    assert!(h
        .effects
        .iter()
        .all(|e| !matches!(e, Effect::StartCheck { worker, .. } if worker == "v2")));
}

/// Issue 26, item 23: after an automatic rollback v2 → v1, "roll back" would mean v1 → v2:
/// re-deploying the release rollbackd took out. Refused (exit 3, naming why) unless forced.
#[test]
fn a_manual_rollback_to_a_version_rolled_back_is_refused_unless_forced() {
    let mut h = rolled_back(WATCH_5M);
    let session = h.sup.session().unwrap();
    assert_eq!(
        (
            session.record.active.as_str(),
            session.record.previous.as_deref()
        ),
        ("v1", Some("v2"))
    );
    let rollback = |force: bool| Input::Rollback {
        operator: "uid:1000(alice)".into(),
        reason: "checkout looks slow".into(),
        emergency: false,
        force,
        rolled_back: vec!["v2".into()],
        known_workers: (None, None),
        reply: 21,
    };
    h.effects.clear();
    h.feed(rollback(false));
    assert_eq!(h.names(), ["reply:failed:3"]);
    let Some(Effect::Reply {
        answer: Answer::Failed { message, .. },
        ..
    }) = h.effects.last()
    else {
        unreachable!()
    };
    assert!(
        message.contains("v2, is one rollbackd rolled back"),
        "{message}"
    );
    assert!(message.contains("--force"), "{message}");
    h.feed(rollback(true));
    let plans = h.plans();
    assert_eq!(plans.len(), 1, "{:?}", h.names());
    assert_eq!(plans[0].to.as_deref(), Some("v2"));
}

/// Issue 26, item 27: in an escalated session every check would say "would roll back, not
/// taken"; the held-back verdict is recorded once per change, so the escalation stays in
/// sight in `audit tail`.
#[test]
fn a_held_back_verdict_is_recorded_once_per_change() {
    let mut h = Harness::new(settings(""));
    h.promote("v2", "v1");
    h.script = [SPIKE, SPIKE, SPIKE].iter().map(|l| check(l)).collect();
    h.run_for(Duration::from_secs(100));
    assert_eq!(h.count("start:rollback:automatic"), 1, "{:?}", h.names());
    h.feed(Input::ActionDone {
        id: Some(1),
        result: ActionResult::RollbackFailed {
            reason: "switch hook failed".into(),
            artifact: "a.json".into(),
        },
    });
    h.feed(Input::ActionDone {
        id: Some(2),
        result: ActionResult::Escalated {
            artifact: "e.json".into(),
        },
    });
    assert_eq!(
        h.sup.session().unwrap().record.state,
        SessionState::Escalated
    );
    h.effects.clear();
    h.script = std::iter::repeat_n(check(SPIKE), 20).collect();
    h.run_for(Duration::from_secs(300));
    let checks = health_checks(&h);
    assert!(checks.len() >= 10, "{:?}", h.names());
    let held: Vec<_> = checks
        .iter()
        .filter(|c| c.get("notTaken").is_some())
        .collect();
    assert_eq!(held.len(), 1, "{checks:?}");
    assert_eq!(held[0]["notTaken"], "the session is escalated");
}
