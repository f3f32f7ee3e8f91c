//! One command path: `promote`, `rollback`, `pause` behave the same with and without a
//! daemon, because both run the same Supervisor (issue 9 item 9: an offline
//! `promote --previous "   "` used to be accepted and the next rollback ran the switch
//! hook with a blank target).

mod common;

use common::Setup;

/// (args, exit status) of promotions every path must refuse.
const BAD_PROMOTIONS: &[(&[&str], i32)] = &[
    (&["--active", "v2", "--previous", "   "], 2),
    (&["--active", "   ", "--previous", "v1"], 2),
    (&["--active", "v2", "--previous", ""], 2),
    (&["--active", "v2", "--previous", "v 1"], 2),
    (&["--active", "v2", "--previous", "../etc"], 2),
    (&["--active", "v2", "--previous", "v2"], 3),
    (
        &[
            "--active",
            "v2",
            "--previous",
            "v1",
            "--baseline-error-rate",
            "2",
        ],
        2,
    ),
    (
        &[
            "--active",
            "v2",
            "--previous",
            "v1",
            "--baseline-error-rate",
            "-0.1",
        ],
        2,
    ),
    (
        &[
            "--active",
            "v2",
            "--previous",
            "v1",
            "--baseline-error-rate",
            "NaN",
        ],
        2,
    ),
    (
        &[
            "--active",
            "v2",
            "--previous",
            "v1",
            "--baseline-p95-ms",
            "0",
        ],
        2,
    ),
];

fn promote(setup: &Setup, args: &[&str]) -> (i32, String) {
    let mut all = vec!["promote"];
    all.extend_from_slice(args);
    let out = setup.cli(&all);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

fn no_session(setup: &Setup) -> bool {
    let out = setup.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    status["session"].is_null()
}

#[test]
fn a_bad_promotion_is_refused_alike_with_and_without_a_daemon_and_records_nothing() {
    let setup = Setup::new("");
    let mut offline = Vec::new();
    for (args, want) in BAD_PROMOTIONS {
        let (code, err) = promote(&setup, args);
        assert_eq!(code, *want, "offline promote {args:?}: {err}");
        assert!(
            no_session(&setup),
            "offline promote {args:?} recorded a session"
        );
        offline.push(err);
    }
    assert!(
        !setup.state().join("analytics/audit.log").exists()
            || setup.events("monitoring-started").is_empty()
    );
    let daemon = setup.start();
    for ((args, want), offline_err) in BAD_PROMOTIONS.iter().zip(&offline) {
        let (code, err) = promote(&setup, args);
        assert_eq!(code, *want, "promote {args:?} with a daemon: {err}");
        assert_eq!(
            &err, offline_err,
            "the same refusal either way for {args:?}"
        );
        assert!(no_session(&setup), "promote {args:?} recorded a session");
    }
    assert!(setup.events("monitoring-started").is_empty());
    assert!(setup.switches().is_empty());
    daemon.terminate();
}

#[test]
fn an_offline_promotion_is_announced_once_when_the_daemon_picks_it_up() {
    let setup = Setup::new("");
    let (code, err) = promote(&setup, &["--active", "v2", "--previous", "v1"]);
    assert_eq!(code, 0, "{err}");
    assert!(!no_session(&setup));
    assert!(
        setup.events("monitoring-started").is_empty(),
        "not monitored yet"
    );
    // Paused offline: the daemon's Supervisor records it the same way.
    let out = setup.cli(&["pause", "--reason", "before the daemon starts"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(setup.events("monitoring-paused").len(), 1);
    let daemon = setup.start();
    let started = setup.events("monitoring-started");
    assert_eq!(started.len(), 1, "{started:?}");
    assert_eq!(started[0]["active"], "v2");
    let out = setup.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["session"]["paused"], true);
    daemon.terminate();
}

#[test]
fn an_offline_rollback_ends_the_session_as_the_daemon_would() {
    let setup = Setup::new("");
    setup.promote();
    let out = setup.cli(&["rollback", "--reason", "bad deploy", "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(setup.switches(), ["v1"]);
    let stopped = setup.events("monitoring-stopped");
    assert_eq!(stopped.len(), 1, "{stopped:?}");
    assert_eq!(stopped[0]["state"], "rolled-back");
    assert!(no_session(&setup));
    assert_eq!(setup.events("rollback-executed").len(), 1);
    assert_eq!(setup.artifacts("rollback_").len(), 1);
}

#[test]
fn status_names_the_workers_after_the_session_ended() {
    let setup = Setup::new("");
    let daemon = setup.start();
    setup.promote();
    let out = setup.cli(&["rollback", "--reason", "bad deploy", "--yes"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = setup.cli(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status["session"].is_null(), "{status}");
    assert_eq!(status["workers"]["active"], "v1", "{status}");
    assert_eq!(status["workers"]["previous"], "v2", "{status}");
    assert_eq!(status["workers"]["lastSessionState"], "rolled-back");
    let out = setup.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("workers      active v1  previous v2"),
        "{text}"
    );
    daemon.terminate();
}
