//! The incident report (`core::incident`): golden Markdown for a rollback, an escalation
//! and a manual emergency rollback on a fixed clock and time zone, and its figures
//! (severity, level, impact) checked against the facts fed in.
//!
//! The golden files are `tests/golden/incident_*.md`. After a deliberate change of the
//! report, `RBD_UPDATE_GOLDEN=1 cargo test --test incident` rewrites them; review the diff.

use std::time::Duration;

use rollbackd::core::check::CheckResult;
use rollbackd::core::incident::{ActionFacts, CheckFacts, Facts, Incident, SessionFacts};
use rollbackd::core::supervisor::{Stability, StabilityResult};
use rollbackd::core::trace::{parse_line, TraceLine};
use rollbackd::storage::states::{ActionKind, ActionState, ActionTrigger, SessionState};
use serde_json::json;

/// Unix milliseconds of 2025-10-22T14:MM:SS.mmmZ.
fn at(minute: i64, second: f64) -> i64 {
    1_761_141_600_000 + minute * 60_000 + (second * 1000.0).round() as i64
}

fn result(rate: Option<f64>, requests: u64, probe_ok: bool) -> CheckResult {
    let snapshot = match rate {
        Some(rate) => format!(r#"{{"failureRate":{rate},"requests":{requests}}}"#),
        None => "null".into(),
    };
    let probe = if probe_ok { "ok" } else { "failed" };
    match parse_line(&format!(
        r#"{{"at":0,"probe":"{probe}","snapshot":{snapshot}}}"#
    ))
    .unwrap()
    {
        Some(TraceLine::Check { check, .. }) => check,
        other => panic!("{other:?}"),
    }
}

fn check(index: u64, taken_at_ms: i64, rate: f64, verdict: &str) -> CheckFacts {
    CheckFacts {
        index,
        taken_at_ms,
        result: result(Some(rate), 1000, true),
        verdict: verdict.into(),
        failed: rate > 0.2,
    }
}

fn base_facts() -> Facts {
    Facts {
        session: None,
        checks: Vec::new(),
        actions: Vec::new(),
        kill_switch_key: "DISABLE_NEW".into(),
        kill_switch_value: Some("0".into()),
        kill_switch_known: true,
        reset_quiet_period: Duration::from_secs(300),
        check_interval: Duration::from_secs(30),
        analytics_dir: "/var/lib/rollbackd/analytics".into(),
        config_arg: None,
        generated_at_ms: at(47, 17.0),
        // Central European Time: the local column is an hour ahead of UTC.
        utc_offset_seconds: 3600,
    }
}

/// v2 promoted at 14:30, error rate climbing from 14:31, rolled back to v1 at 14:32:15,
/// v1 stable for the 15-minute watch.
fn automatic_rollback() -> Facts {
    let mut checks = vec![
        check(0, at(30, 30.0), 0.01, "healthy"),
        check(1, at(31, 0.0), 0.09, "degraded"),
        check(2, at(31, 30.0), 0.42, "degraded"),
        check(3, at(31, 45.0), 0.45, "degraded"),
        check(4, at(32, 0.0), 0.44, "degraded"),
        check(5, at(32, 15.0), 0.42, "rollback"),
    ];
    checks.push(check(6, at(32, 47.0), 0.01, "healthy"));
    checks.push(check(7, at(33, 17.0), 0.01, "healthy"));
    Facts {
        session: Some(SessionFacts {
            id: "20251022T143000.000Z-v2".into(),
            promoted: "v2".into(),
            previous: Some("v1".into()),
            promoted_at_ms: at(30, 0.0),
            state: SessionState::RolledBack,
            ended_at_ms: Some(at(47, 16.5)),
            end_reason: Some(
                "rolled back from v2 to v1; v1 was stable for the stability period of 15m".into(),
            ),
            baseline: None,
            stability: Some(Stability {
                started_at_ms: at(32, 16.5),
                period_seconds: 900.0,
                restored: "v1".into(),
                from: "v2".into(),
                rollback_action: Some(1),
                first_check: 6,
                result: Some(StabilityResult::Confirmed),
                ended_at_ms: Some(at(47, 16.5)),
                reason: Some("v1 was stable for the stability period of 15m".into()),
            }),
            operator: Some("uid:1000(deploy)".into()),
        }),
        checks,
        actions: vec![ActionFacts {
            id: Some(1),
            kind: ActionKind::Rollback,
            trigger: ActionTrigger::Automatic,
            state: ActionState::Done,
            from: Some("v2".into()),
            to: Some("v1".into()),
            reason: "High error rate (42.0%) with 4 failures: 4 of 5 checks over 20.0%".into(),
            operator: None,
            started_at_ms: at(32, 15.2),
            finished_at_ms: Some(at(32, 16.5)),
            artifact: Some("rollback_20251022T143215.200Z.json".into()),
            detail: json!({
                "phases": [["pause", 0.01], ["switch", 0.2], ["verify", 1.05]],
                "hooks": [{"phase": "switch", "argv": ["/usr/local/bin/switch-worker", "v1"],
                           "exitCode": 0, "timedOut": false,
                           "stdoutTail": "switched to v1\n", "stderrTail": ""}],
                "evidence": {"rulesFired": [
                    {"rule": "error_rate", "count": 4, "of": 5, "threshold": 0.2,
                     "observed": 0.42, "dryRun": false},
                    {"rule": "degraded_error_rate", "count": 1, "of": 5, "threshold": 0.05,
                     "observed": 0.42, "dryRun": false}
                ]}
            }),
        }],
        ..base_facts()
    }
}

/// v2 stopped answering; no previous worker was known, so the kill switch was set.
fn escalation() -> Facts {
    let mut facts = base_facts();
    facts.session = Some(SessionFacts {
        id: "20251022T143000.000Z-v2".into(),
        promoted: "v2".into(),
        previous: None,
        promoted_at_ms: at(30, 0.0),
        state: SessionState::Escalated,
        ended_at_ms: None,
        end_reason: None,
        baseline: None,
        stability: None,
        operator: Some("uid:1000(deploy)".into()),
    });
    facts.checks = (0..4)
        .map(|i| CheckFacts {
            index: i,
            taken_at_ms: at(31, 0.0) + i as i64 * 15_000,
            result: result(None, 0, i == 0),
            verdict: if i == 3 { "escalate" } else { "degraded" }.into(),
            failed: true,
        })
        .collect();
    facts.actions = vec![ActionFacts {
        id: Some(3),
        kind: ActionKind::Escalation,
        trigger: ActionTrigger::Automatic,
        state: ActionState::Done,
        from: Some("v2".into()),
        to: None,
        reason: "The last 3 probes failed; no previous worker is known, so escalating".into(),
        operator: None,
        started_at_ms: at(31, 45.1),
        finished_at_ms: Some(at(31, 45.3)),
        artifact: Some("escalation_20251022T143145.100Z.json".into()),
        detail: json!({
            "phases": [["kill-switch", 0.02]],
            "evidence": {"rulesFired": [
                {"rule": "probe_failures", "count": 3, "of": 4, "threshold": 3.0, "dryRun": false}
            ]}
        }),
    }];
    facts.kill_switch_value = Some("1".into());
    facts.config_arg = Some("/etc/rollbackd/rollbackd.toml".into());
    facts
}

/// An operator's emergency rollback with no monitoring session.
fn emergency_rollback() -> Facts {
    let mut facts = base_facts();
    facts.actions = vec![ActionFacts {
        id: Some(9),
        kind: ActionKind::Rollback,
        trigger: ActionTrigger::Emergency,
        state: ActionState::Done,
        from: Some("v7".into()),
        to: Some("v6".into()),
        reason: "checkout broken for EU customers".into(),
        operator: Some("uid:1001(alice)".into()),
        started_at_ms: at(40, 0.0),
        finished_at_ms: Some(at(40, 2.25)),
        artifact: Some("rollback_20251022T144000.000Z.json".into()),
        detail: json!({
            "phases": [["switch", 0.5], ["verify", 1.75]],
            "hooks": [{"phase": "switch", "argv": ["/usr/local/bin/switch-worker", "v6"],
                       "exitCode": 0, "timedOut": false, "stdoutTail": "",
                       "stderrTail": "warning: \u{1b}[31mslow drain\u{1b}[0m skipped\n"}],
            "emergency": true
        }),
    }];
    facts.kill_switch_value = None;
    facts
}

fn golden(name: &str, incident: &Incident) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("incident_{name}.md"));
    let markdown = incident.markdown();
    if std::env::var_os("RBD_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &markdown).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (RBD_UPDATE_GOLDEN=1 cargo test --test incident writes it)",
            path.display()
        )
    });
    assert_eq!(
        markdown,
        want,
        "{} differs (RBD_UPDATE_GOLDEN=1 rewrites it; review the diff)",
        path.display()
    );
}

#[test]
fn a_rollback_report_matches_its_golden_file() {
    golden("rollback", &Incident::of(&automatic_rollback()));
}

#[test]
fn an_escalation_report_matches_its_golden_file() {
    golden("escalation", &Incident::of(&escalation()));
}

#[test]
fn a_manual_emergency_rollback_report_matches_its_golden_file() {
    golden("emergency", &Incident::of(&emergency_rollback()));
}

#[test]
fn impact_is_the_checks_own_counts_from_onset_to_recovery() {
    let incident = Incident::of(&automatic_rollback());
    let impact = &incident.impact;
    // The first check not healthy is #1 (14:31:00); its requests are those since #0
    // (14:30:30), where the onset is. Recovery: the rollback's end (14:32:16.5). Checks
    // #1..#5 are counted: 5 × 1000 requests, and 90 + 420 + 450 + 440 + 420 failed. Check
    // #0 (before) and the watch's #6, #7 (after) are not.
    assert_eq!(impact.checks, 5);
    assert_eq!(impact.checks_with_counts, 5);
    assert_eq!(impact.requests, 5000.0);
    assert_eq!(impact.failed_requests_estimated, 1820.0);
    let minutes = impact.minutes.unwrap();
    assert!((minutes - 106.5 / 60.0).abs() < 1e-9, "{minutes}");
    assert_eq!(impact.onset.as_deref(), Some("2025-10-22 14:30:30Z"));
    assert_eq!(impact.recovery.as_deref(), Some("2025-10-22 14:32:16Z"));
    // #5 (14:32:15) is the last check counted; the 1.5 s to the recovery no check counted.
    assert_eq!(
        impact.counted_until.as_deref(),
        Some("2025-10-22 14:32:15Z")
    );
    assert_eq!(impact.uncounted_seconds, Some(1.5));

    // Not recovered yet (the action still running): counted up to the report's making.
    let mut facts = automatic_rollback();
    facts.actions[0].finished_at_ms = None;
    facts.actions[0].state = ActionState::Running;
    let impact = Incident::of(&facts).impact;
    assert_eq!(impact.recovery, None);
    assert_eq!(impact.minutes, None);
    assert_eq!(impact.checks, 7, "#1..#7, up to the report's time");
}

/// Issue 25's end-to-end test (tests/real_deploy.rs): a report said "601 requests in that
/// time" of a span starting at the first unhealthy check, 03:20:41, when those requests
/// were served from the promotion at 03:20:39 on — each check counts the requests since the
/// check before it. The impact begins where the first unhealthy check's counts begin, and
/// says which time at the end no check counted.
#[test]
fn the_impact_starts_where_the_first_unhealthy_checks_counts_start() {
    let check_at = |index: u64, ms: i64, rate: f64, verdict: &str| {
        let mut c = check(index, ms, rate, verdict);
        c.failed = verdict != "healthy";
        c
    };
    let base = automatic_rollback();
    let promoted = base.session.as_ref().unwrap().promoted_at_ms;
    let interval_ms = 30_000;
    let recovery = base.actions[0].finished_at_ms.unwrap();
    let onset_of = |checks: Vec<CheckFacts>| {
        let mut facts = automatic_rollback();
        facts.checks = checks;
        let impact = Incident::of(&facts).impact;
        (impact, facts)
    };

    // Degraded checks 10 s apart: the onset is the healthy check before the first bad one.
    let (impact, _) = onset_of(vec![
        check_at(0, promoted + interval_ms, 0.01, "healthy"),
        check_at(1, promoted + interval_ms + 10_000, 0.4, "degraded"),
        check_at(2, promoted + interval_ms + 20_000, 0.4, "rollback"),
    ]);
    assert_eq!(impact.onset.as_deref(), Some("2025-10-22 14:30:30Z"));
    assert_eq!(
        impact.checks, 2,
        "the check before the onset is not counted"
    );
    assert_eq!(impact.requests, 2000.0);
    assert_eq!(
        impact.counted_until.as_deref(),
        Some("2025-10-22 14:30:50Z")
    );

    // The session's first check bad: its counts start one check interval before it,
    // here at the promotion.
    let (impact, _) = onset_of(vec![check_at(0, promoted + interval_ms, 0.4, "rollback")]);
    assert_eq!(impact.onset.as_deref(), Some("2025-10-22 14:30:00Z"));
    // ... and never before the promotion (a first check taken sooner than one interval).
    let (impact, _) = onset_of(vec![check_at(0, promoted + 5_000, 0.4, "rollback")]);
    assert_eq!(impact.onset.as_deref(), Some("2025-10-22 14:30:00Z"));

    // The first check after a restart counts one check interval, not the time since the
    // check before the restart.
    let (impact, _) = onset_of(vec![
        check_at(0, promoted + interval_ms, 0.01, "healthy"),
        check_at(1, promoted + 90_000, 0.4, "rollback"),
    ]);
    assert_eq!(impact.onset.as_deref(), Some("2025-10-22 14:31:00Z"));

    // The report says which span the counts cover.
    let (impact, facts) = onset_of(vec![
        check_at(0, promoted + interval_ms, 0.01, "healthy"),
        check_at(1, promoted + 60_000, 0.4, "degraded"),
        check_at(2, recovery - 2_250, 0.4, "rollback"),
    ]);
    assert_eq!(impact.uncounted_seconds, Some(2.25));
    let markdown = Incident::of(&facts).markdown();
    assert!(
        markdown.contains("- From the start of what the first check that was not healthy counted, 2025-10-22 14:30:30Z, to recovery, 2025-10-22 14:32:16Z:"),
        "{markdown}"
    );
    assert!(
        markdown.contains("; the 2.25s from the last check counted, 2025-10-22 14:32:14Z, to the recovery are not counted."),
        "{markdown}"
    );
}

#[test]
fn severity_and_level_follow_the_rules_and_the_actions() {
    struct Case {
        name: &'static str,
        facts: Facts,
        severity: &'static str,
        level: u8,
    }
    let mut level3 = automatic_rollback();
    let mut escalated = escalation().actions.remove(0);
    escalated.from = Some("v1".into());
    escalated.detail = json!({"evidence": {"rulesFired": [
        {"rule": "error_rate", "count": 3, "of": 5, "threshold": 0.2, "observed": 0.3, "dryRun": false}
    ]}});
    level3.actions.push(escalated);
    if let Some(session) = &mut level3.session {
        session.state = SessionState::Escalated;
        let watch = session.stability.as_mut().unwrap();
        watch.result = Some(StabilityResult::Failed);
        watch.reason = Some("restored version v1 unstable: High error rate".into());
    }
    level3.kill_switch_value = Some("1".into());
    let mut manual = emergency_rollback();
    manual.actions[0].trigger = ActionTrigger::Manual;
    let mut dry_rule_only = automatic_rollback();
    dry_rule_only.actions[0].detail = json!({"evidence": {"rulesFired": [
        {"rule": "latency", "count": 3, "of": 5, "threshold": 500.0, "observed": 900.0, "dryRun": true}
    ]}});
    dry_rule_only.actions[0].trigger = ActionTrigger::Manual;
    let cases = [
        Case {
            name: "automatic rollback on error rate",
            facts: automatic_rollback(),
            severity: "SEV2",
            level: 2,
        },
        Case {
            name: "kill switch after probe failures",
            facts: escalation(),
            severity: "SEV1",
            level: 1,
        },
        Case {
            name: "rollback then kill switch: full restore",
            facts: level3,
            severity: "SEV1",
            level: 3,
        },
        Case {
            name: "emergency rollback",
            facts: emergency_rollback(),
            severity: "SEV2",
            level: 2,
        },
        Case {
            name: "manual rollback, no rule",
            facts: manual,
            severity: "SEV3",
            level: 2,
        },
        Case {
            name: "a dry-run rule is not a trigger",
            facts: dry_rule_only,
            severity: "SEV3",
            level: 2,
        },
    ];
    for case in cases {
        let incident = Incident::of(&case.facts);
        assert_eq!(
            incident.severity, case.severity,
            "{}: {}",
            case.name, incident.summary
        );
        assert_eq!(incident.level, case.level, "{}", case.name);
        assert!(
            incident
                .summary
                .starts_with(&format!("{} level {}:", case.severity, case.level)),
            "{}: {}",
            case.name,
            incident.summary
        );
        if case.level == 3 {
            assert!(
                incident.summary.contains("unstable too"),
                "{}",
                incident.summary
            );
            assert!(incident
                .next_steps
                .iter()
                .any(|s| s.contains("call the owning team")));
            assert!(incident
                .next_steps
                .iter()
                .any(|s| s.contains("kill-switch reset")));
            assert_eq!(incident.stability.as_ref().unwrap().result, "failed");
        }
    }
}

#[test]
fn untrusted_text_cannot_reach_the_terminal_raw() {
    let markdown = Incident::of(&emergency_rollback()).markdown();
    assert!(
        !markdown.contains('\u{1b}'),
        "an escape from a hook's output reached the report"
    );
    assert!(markdown.contains("\\u{1b}[31mslow drain"), "{markdown}");
    let mut facts = automatic_rollback();
    facts.actions[0].reason = "line one\nline two | pipe".into();
    let markdown = Incident::of(&facts).markdown();
    assert!(
        // one_line's `\n` is shown as such: its backslash escaped for Markdown.
        markdown.contains("line one\\\\nline two \\| pipe"),
        "{markdown}"
    );
}

#[test]
fn the_file_is_named_by_the_first_action_so_a_rewrite_replaces_it() {
    let incident = Incident::of(&automatic_rollback());
    assert_eq!(incident.file_name, "incident_20251022T143215.200Z.md");
    let mut later = automatic_rollback();
    later.generated_at_ms += 3_600_000;
    assert_eq!(Incident::of(&later).file_name, incident.file_name);
}

/// Issue 25, item 11: the report tells the truth about what happened.
#[test]
fn the_report_says_which_failure_it_was_and_what_it_cost_beyond_the_baseline() {
    // A latency-only incident: the trigger names the quantile, the timeline shows p95,
    // and the errors beyond the baseline's rate are ~0 while the raw estimate is not.
    let mut facts = automatic_rollback();
    for check in &mut facts.checks {
        check.result = parse_check(
            r#"{"at": 1, "probe": "ok", "snapshot": {"failureRate": 0.01, "requests": 1000, "latencyP95Ms": 900, "latencyP99Ms": 1500}}"#,
        );
        check.failed = check.verdict != "healthy";
    }
    facts.session.as_mut().unwrap().baseline = Some(rollbackd::core::check::Baseline {
        error_rate: Some(0.01),
        latency_p95_ms: Some(200.0),
        ..Default::default()
    });
    facts.actions[0].reason =
        "p95 latency 900 ms over the baseline's 200 ms × 1.50 in 3 of 5 checks".into();
    facts.actions[0].detail["evidence"] = json!({"rulesFired": [
        {"rule": "baseline_latency", "count": 3, "of": 5, "threshold": 1.5, "observed": 900.0, "dryRun": false,
         "detail": {"kind": "quantile", "quantile": "p95", "observedMs": 900.0, "baselineMs": 200.0, "limitRatio": 1.5}}
    ]});
    let incident = Incident::of(&facts);
    assert_eq!(incident.triggers[0].rule, "baseline_latency");
    assert!(
        incident.triggers[0]
            .text
            .starts_with("p95 latency 900 ms over the baseline's 200 ms"),
        "{:?}",
        incident.triggers
    );
    assert!(
        !incident.summary.contains("Errors above"),
        "{}",
        incident.summary
    );
    assert!(
        incident
            .timeline
            .iter()
            .any(|m| m.event.contains("p95 900 ms, p99 1500 ms")),
        "{:?}",
        incident.timeline
    );
    assert_eq!(incident.impact.failed_requests_estimated, 50.0);
    assert_eq!(incident.impact.excess_failed_estimated, Some(0.0));
    assert!(incident
        .markdown()
        .contains("about 0 more than the previous version's error rate would have made"));

    // The switch failed: v2 still serves and v1 was never probed. That is not "the version
    // rolled back to is unhealthy too".
    let mut failed = automatic_rollback();
    failed.session.as_mut().unwrap().stability = None;
    failed.actions[0].state = ActionState::Failed;
    let mut escalation = escalation().actions.remove(0);
    escalation.id = Some(2);
    escalation.from = Some("v2".into());
    failed.actions.push(escalation);
    let steps = Incident::of(&failed).next_steps.join("\n");
    assert!(
        steps.contains(
            "The rollback did not complete: v2 is still serving and v1 was never switched to"
        ),
        "{steps}"
    );
    assert!(!steps.contains("unhealthy too"), "{steps}");

    // Loop protection held a rollback back: say the version still serves and what to do.
    let mut held = escalation_facts_with_reason(
        "Errors …; but v2 was already rolled back automatically 3 times in the last hour (max_rollbacks_per_hour = 3): escalating instead of looping — still serving v2: roll back by hand",
    );
    held.session.as_mut().unwrap().previous = Some("v1".into());
    let steps = Incident::of(&held).next_steps.join("\n");
    assert!(
        steps.contains("Loop protection held the rollback back: v2 is still serving"),
        "{steps}"
    );
}

fn escalation_facts_with_reason(reason: &str) -> Facts {
    let mut facts = escalation();
    facts.actions[0].reason = reason.into();
    facts
}

fn parse_check(line: &str) -> CheckResult {
    match parse_line(line).unwrap() {
        Some(TraceLine::Check { check, .. }) => check,
        other => panic!("{other:?}"),
    }
}

/// Issue 26, item 15: worker text in the report is inert Markdown — no HTML, no link, no
/// image, no table cell broken.
#[test]
fn worker_text_in_the_report_is_inert_markdown() {
    let mut facts = escalation();
    facts.checks[1].result = parse_check(
        r#"{"at": 1, "probe": "<img src=x onerror=alert(1)> [docs](javascript:alert(1)) | `code`", "snapshot": null}"#,
    );
    facts.actions[0].reason = "body says <script>alert(1)</script> ![x](http://evil/x.png)".into();
    let markdown = Incident::of(&facts).markdown();
    assert!(
        !markdown.contains("<img") && !markdown.contains("<script>"),
        "{markdown}"
    );
    assert!(
        markdown.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{markdown}"
    );
    assert!(
        markdown.contains("\\[docs\\](javascript:alert(1))"),
        "{markdown}"
    );
    assert!(
        markdown.contains("!\\[x\\](http://evil/x.png)"),
        "{markdown}"
    );
    assert!(markdown.contains("\\| \\`code\\`"), "{markdown}");
}

/// Issue 26, item 16: the file is written when an action ends, before the session's row
/// says what came of it; its "Status now" must say what `report` says later.
#[test]
fn the_status_in_the_file_is_what_the_actions_say_not_a_stale_row() {
    let mut facts = escalation();
    facts.session.as_mut().unwrap().state = SessionState::Monitoring;
    let status = Incident::of(&facts).status;
    assert!(
        status.starts_with("escalated: DISABLE_NEW is on"),
        "{status}"
    );

    // A failed watch and its escalation, the row still saying stability-watch.
    let mut failed = automatic_rollback();
    let session = failed.session.as_mut().unwrap();
    session.state = SessionState::StabilityWatch;
    let watch = session.stability.as_mut().unwrap();
    watch.result = Some(StabilityResult::Failed);
    let mut escalated = escalation().actions.remove(0);
    escalated.from = Some("v1".into());
    failed.actions.push(escalated);
    let status = Incident::of(&failed).status;
    assert!(
        status.starts_with("escalated: v1 failed its stability watch too"),
        "{status}"
    );
    assert!(!status.contains("is running"), "{status}");
}

/// What the report escapes for Markdown comes back as it was for a terminal (`status`).
#[test]
fn markdown_text_round_trips_through_markdown_plain() {
    use rollbackd::core::incident::{markdown_plain, markdown_text};
    for text in [
        "error rate 42.0% > threshold 20.0% in 4 of 5 checks",
        "<img src=x> [docs](javascript:alert(1)) | `code` \\ *bold* & co",
    ] {
        assert_eq!(markdown_plain(&markdown_text(text)), text);
    }
}
