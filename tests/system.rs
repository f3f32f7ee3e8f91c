//! The real binary against real loopback HTTP servers and real SQLite files.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// Waits for the proof that a rollback's session is over: its `monitoring-stopped` line
/// says `rolled-back` and the driver itself answers `idle` (it has no session, so no check
/// and no second rollback can follow). Anything that was going to happen in that session
/// has happened by then.
fn wait_until_idle_after_rollback(setup: &Setup) {
    let idle = wait_for(Duration::from_secs(20), || {
        let ended = setup
            .events("monitoring-stopped")
            .last()
            .is_some_and(|line| line["state"] == "rolled-back");
        ended && {
            let out = setup.cli(&["status", "--json"]);
            serde_json::from_slice::<Value>(&out.stdout)
                .is_ok_and(|status| status["state"] == "idle")
        }
    });
    assert!(
        idle.is_some(),
        "the session did not end as rolled back; log:\n{}",
        setup.daemon_log()
    );
}

#[test]
fn an_error_spike_rolls_back_and_calls_the_switch_hook_once() {
    let setup = Setup::new("");
    let daemon = setup.start();
    setup.promote();
    setup.routes.error_rate(0.45);
    let waited = wait_for(Duration::from_secs(20), || {
        !setup.events("rollback-executed").is_empty()
    });
    assert!(
        waited.is_some(),
        "no rollback; daemon log:\n{}",
        setup.daemon_log()
    );
    // Nothing else may happen: wait until the daemon has moved on (the session ended as
    // rolled back and the driver answers idle), then look.
    wait_until_idle_after_rollback(&setup);
    assert_eq!(
        setup.switches(),
        ["v1"],
        "the switch hook ran exactly once, to v1"
    );
    let artifacts = setup.artifacts("rollback_");
    assert_eq!(artifacts.len(), 1);
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(&artifacts[0]).unwrap()).unwrap();
    assert_eq!(record["status"], "executed");
    assert!(record["errorRate"].as_f64().unwrap() > 0.2);
    assert!(record["phases"]["switch"].is_number() && record["phases"]["verify"].is_number());
    let status = setup.cli(&["status", "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["daemon"], "running");
    assert_eq!(status["state"], "idle");
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn probe_failures_set_the_kill_switch_where_the_sqlite3_shell_sees_it() {
    if !tool_available(
        sqlite3_available(),
        "probe_failures_set_the_kill_switch",
        "the sqlite3 shell",
    ) {
        return;
    }
    let setup = Setup::new("");
    let _daemon = setup.start();
    setup.promote();
    setup.routes.set("/v2/health", 503, r#"{"status":"down"}"#);
    let waited = wait_for(Duration::from_secs(20), || {
        !setup.events("kill-switch-activated").is_empty()
    });
    assert!(
        waited.is_some(),
        "no escalation; daemon log:\n{}",
        setup.daemon_log()
    );
    let out = std::process::Command::new("sqlite3")
        .arg(setup.path("app.db"))
        .arg("SELECT value FROM settings WHERE key = 'DISABLE_NEW'")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    assert_eq!(setup.artifacts("escalation_").len(), 1);
    let log =
        std::fs::read_to_string(setup.state().join("analytics/kill_switch_audit.log")).unwrap();
    let line: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(
        (line["action"].as_str(), line["source"].as_str()),
        (Some("activated"), Some("automatic"))
    );
}

#[test]
fn a_failing_switch_hook_is_reported_as_such_not_as_an_unhealthy_previous_version() {
    let setup = Setup::new("[rollback]\nmax_attempts = 2");
    // The switch hook fails with exit status 3 and says why on stderr.
    let hook = setup.path("switch.sh");
    std::fs::write(
        &hook,
        "#!/bin/sh\necho \"$1\" >> \"$(dirname \"$0\")/switches\"\necho 'load balancer refused the change' >&2\nexit 3\n",
    )
    .unwrap();
    let _daemon = setup.start();
    setup.promote();
    setup.routes.error_rate(0.6);
    let waited = wait_for(Duration::from_secs(20), || {
        !setup.events("escalation-triggered").is_empty()
    });
    assert!(
        waited.is_some(),
        "no escalation; daemon log:\n{}",
        setup.daemon_log()
    );
    assert_eq!(setup.switches(), ["v1", "v1"], "one switch per attempt");
    let failed = setup.events("rollback-failed");
    assert_eq!(failed.len(), 1);
    let reason = failed[0]["reason"].as_str().unwrap();
    assert!(
        !reason.contains("previous version also unhealthy"),
        "{reason}"
    );
    assert!(
        reason.contains("switch hook failed: exit status 3"),
        "{reason}"
    );
    assert!(
        reason.contains("load balancer refused the change"),
        "{reason}"
    );
    assert!(reason.contains("v1 was not verified"), "{reason}");
}

/// Issue 25 item 10: attempts of a rollback back off (`rollback.retry_backoff`, doubling)
/// instead of three tries in 70 ms, and the artifact and the incident report say which
/// attempt each hook ran in and how long was waited before it.
#[test]
fn a_failing_switch_is_retried_with_backoff_and_the_report_shows_the_attempts() {
    let setup = Setup::new("[rollback]\nmax_attempts = 3\nretry_backoff = \"300ms\"");
    let hook = setup.path("switch.sh");
    std::fs::write(
        &hook,
        "#!/bin/sh\ndate +%s.%N >> \"$(dirname \"$0\")/switch-times\"\necho 'upstream reload in progress' >&2\nexit 3\n",
    )
    .unwrap();
    let _daemon = setup.start();
    setup.promote();
    setup.routes.error_rate(0.6);
    let failed = wait_for(Duration::from_secs(30), || {
        !setup.events("rollback-failed").is_empty()
    });
    assert!(
        failed.is_some(),
        "no rollback-failed; log:\n{}",
        setup.daemon_log()
    );
    let times: Vec<f64> = std::fs::read_to_string(setup.path("switch-times"))
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(times.len(), 3, "{times:?}");
    // 300 ms before the second attempt, 600 ms before the third (less a hook's start-up).
    let gaps = [times[1] - times[0], times[2] - times[1]];
    assert!(gaps[0] >= 0.29 && gaps[0] < 2.0, "{gaps:?}");
    assert!(gaps[1] >= 0.59 && gaps[1] < 2.5, "{gaps:?}");

    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(&setup.artifacts("rollback_")[0]).unwrap())
            .unwrap();
    assert_eq!(record["attempts"], 3, "{record}");
    let hooks = record["incident"]["actions"][0]["hooks"]
        .as_array()
        .unwrap();
    let attempts: Vec<(u64, Option<f64>)> = hooks
        .iter()
        .map(|h| (h["attempt"].as_u64().unwrap(), h["waitedSeconds"].as_f64()))
        .collect();
    assert_eq!(
        attempts,
        [(1, None), (2, Some(0.3)), (3, Some(0.6))],
        "{record}"
    );
    let report = std::fs::read_to_string(setup.incident_reports().last().unwrap()).unwrap();
    assert!(
        report.contains("(switch, attempt 2, after waiting 0.30s): exit 3")
            && report.contains("(switch, attempt 3, after waiting 0.60s): exit 3"),
        "{report}"
    );
}

#[test]
fn an_unhealthy_previous_worker_escalates_after_max_attempts() {
    let setup = Setup::new(
        "[rollback]\nmax_attempts = 2\nverify_timeout = \"300ms\"\nverify_interval = \"100ms\"",
    );
    let _daemon = setup.start();
    setup.promote();
    setup.routes.set("/v1/health", 500, "broken too");
    setup.routes.error_rate(0.6);
    let waited = wait_for(Duration::from_secs(20), || {
        !setup.events("escalation-triggered").is_empty()
    });
    assert!(
        waited.is_some(),
        "no escalation; daemon log:\n{}",
        setup.daemon_log()
    );
    assert_eq!(setup.switches(), ["v1", "v1"], "one switch per attempt");
    let failed = setup.events("rollback-failed");
    assert_eq!(failed.len(), 1);
    assert!(failed[0]["reason"]
        .as_str()
        .unwrap()
        .contains("previous version also unhealthy"));
    let record: Value =
        serde_json::from_str(&std::fs::read_to_string(&setup.artifacts("rollback_")[0]).unwrap())
            .unwrap();
    assert_eq!(record["status"], "failed");
    assert_eq!(setup.artifacts("escalation_").len(), 1);
}

#[test]
fn kill_9_during_a_slow_switch_then_restart_gives_exactly_one_rollback() {
    let setup = Setup::new("");
    std::fs::write(setup.path("slow"), "3").unwrap();
    let daemon = setup.start();
    setup.promote();
    setup.routes.error_rate(0.5);
    let in_switch = wait_for(Duration::from_secs(20), || !setup.switches().is_empty());
    assert!(
        in_switch.is_some(),
        "switch never started; log:\n{}",
        setup.daemon_log()
    );
    daemon.kill9();
    std::fs::remove_file(setup.path("slow")).unwrap();
    let daemon = setup.start();
    let done = wait_for(Duration::from_secs(20), || {
        !setup.events("rollback-executed").is_empty()
    });
    assert!(
        done.is_some(),
        "resumed rollback did not finish; log:\n{}",
        setup.daemon_log()
    );
    wait_until_idle_after_rollback(&setup);
    assert_eq!(
        setup.artifacts("rollback_").len(),
        1,
        "exactly one artifact"
    );
    assert_eq!(
        setup.events("rollback-executed").len(),
        1,
        "one rollback-executed line"
    );
    assert_eq!(
        setup.events("rollback-started").len(),
        1,
        "the restart resumed, it did not start again"
    );
    // The interrupted switch phase ran again (safe to run twice), once.
    assert_eq!(setup.switches(), ["v1", "v1"]);
    let stopped = setup.events("monitoring-stopped");
    assert_eq!(stopped.last().unwrap()["state"], "rolled-back");
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn a_hand_made_kill_switch_change_is_audited_as_external() {
    if !tool_available(
        sqlite3_available(),
        "a_hand_made_kill_switch_change",
        "the sqlite3 shell",
    ) {
        return;
    }
    let setup = Setup::new("");
    let _daemon = setup.start();
    // Make sure the table exists, as the application would have it.
    // `.timeout`: the CREATE's commit wakes the daemon's LiveFlags reader, whose read can
    // hold the shared lock just when the INSERT commits; without a busy timeout the shell
    // then fails with "database is locked" (about one run in six).
    let out = std::process::Command::new("sqlite3")
        .arg("-cmd")
        .arg(".timeout 5000")
        .arg(setup.path("app.db"))
        .arg("CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT); INSERT OR REPLACE INTO settings (key, value) VALUES ('DISABLE_NEW','1');")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = wait_for(Duration::from_secs(10), || {
        !setup.events("kill-switch-external").is_empty()
    });
    assert!(
        seen.is_some(),
        "external change not audited; log:\n{}",
        setup.daemon_log()
    );
    let line = &setup.events("kill-switch-external")[0];
    assert_eq!(line["value"], "1");
    assert_eq!(line["source"], "external");
}

#[test]
fn promote_without_a_daemon_is_picked_up_at_start() {
    let setup = Setup::new("");
    setup.promote();
    let status = setup.cli(&["status", "--json"]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["daemon"], "not running");
    assert_eq!(status["session"]["active"], "v2");
    let _daemon = setup.start();
    let started = wait_for(Duration::from_secs(10), || {
        !setup.events("health-check").is_empty()
    });
    assert!(started.is_some(), "log:\n{}", setup.daemon_log());
    assert_eq!(setup.events("monitoring-started").len(), 1);
}

#[test]
fn a_kill_switch_changed_while_the_daemon_was_down_is_audited_at_start() {
    let setup = Setup::new("");
    let daemon = setup.start();
    assert_eq!(daemon.terminate().code(), Some(0));
    let mut store = rollbackd::appdb::settings::SettingsStore::open(&setup.path("app.db")).unwrap();
    store.write_once("DISABLE_NEW", "1").unwrap();
    let _daemon = setup.start();
    let seen = wait_for(Duration::from_secs(10), || {
        !setup.events("kill-switch-external").is_empty()
    });
    assert!(seen.is_some(), "log:\n{}", setup.daemon_log());
    let line = &setup.events("kill-switch-external")[0];
    assert!(
        line["reason"].as_str().unwrap().contains("not running"),
        "{line}"
    );
}

#[test]
fn sigterm_during_a_rollback_lets_it_finish_then_exits_0() {
    let setup = Setup::new("");
    std::fs::write(setup.path("slow"), "2").unwrap();
    let daemon = setup.start();
    setup.promote();
    setup.routes.error_rate(0.5);
    let in_switch = wait_for(Duration::from_secs(20), || !setup.switches().is_empty());
    assert!(
        in_switch.is_some(),
        "switch never started; log:\n{}",
        setup.daemon_log()
    );
    let status = daemon.terminate();
    assert_eq!(status.code(), Some(0), "log:\n{}", setup.daemon_log());
    assert_eq!(
        setup.events("rollback-executed").len(),
        1,
        "the rollback finished before exit"
    );
    assert_eq!(setup.switches(), ["v1"]);
    assert!(
        !setup.state().join("rollbackd.sock").exists(),
        "the socket is removed on exit"
    );
}

#[test]
fn systemd_notify_ready_status_watchdog_stopping() {
    let setup = Setup::new("");
    let socket_path = setup.path("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let daemon = setup.start_with_env(&[
        ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ]);
    let mut received: Vec<String> = Vec::new();
    let recv_one = |received: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        let n = socket
            .recv(&mut buf)
            .expect("a notification before the timeout");
        received.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    };
    let recv_until = |received: &mut Vec<String>, want: &str| {
        while !received.iter().any(|m| m.starts_with(want)) {
            recv_one(received);
        }
    };
    recv_until(&mut received, "READY=1");
    recv_until(&mut received, "STATUS=");
    recv_until(&mut received, "WATCHDOG=1");
    let ready_at = received
        .iter()
        .position(|m| m.starts_with("READY=1"))
        .unwrap();
    assert!(
        received.iter().any(|m| m.starts_with("STATUS=idle")),
        "{received:?}"
    );
    setup.promote();
    recv_until(&mut received, "STATUS=monitoring");
    // Watchdog beats keep coming at half of WATCHDOG_USEC.
    let beats_before = received
        .iter()
        .filter(|m| m.starts_with("WATCHDOG=1"))
        .count();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(900) {
        recv_one(&mut received);
    }
    let beats = received
        .iter()
        .filter(|m| m.starts_with("WATCHDOG=1"))
        .count()
        - beats_before;
    assert!(
        beats >= 3,
        "{beats} watchdog beats in 0.9 s at a 0.2 s period: {received:?}"
    );
    assert_eq!(daemon.terminate().code(), Some(0));
    recv_until(&mut received, "STOPPING=1");
    assert!(ready_at < received.len());
}

/// A webhook that reads each request and never answers; returns its port and the
/// request bodies it has seen.
fn silent_webhook() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let bodies = seen.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let bodies = bodies.clone();
            std::thread::spawn(move || {
                // Keep everything that arrives; never write a byte back.
                let mut request = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n) = stream.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    request.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&request).into_owned();
                    if let Some((_, body)) = text.split_once("\r\n\r\n") {
                        if !body.is_empty() {
                            bodies.lock().unwrap().push(body.to_owned());
                            request.clear();
                        }
                    }
                }
            });
        }
    });
    (port, seen)
}

#[test]
fn a_webhook_that_never_answers_does_not_delay_the_rollback() {
    let (port, seen) = silent_webhook();
    let setup = Setup::new(&format!(
        "[alerts]\nwebhook_url = \"http://127.0.0.1:{port}/hook\"\ntimeout = \"10s\"\nmax_retries = 3"
    ));
    let _daemon = setup.start();
    setup.promote();
    setup.routes.error_rate(0.45);
    let waited = wait_for(Duration::from_secs(20), || {
        !setup.events("rollback-executed").is_empty()
    });
    assert!(
        waited.is_some(),
        "no rollback; daemon log:\n{}",
        setup.daemon_log()
    );
    // Well inside one webhook timeout (10 s): nothing waited for the webhook.
    assert!(
        waited.unwrap() < Duration::from_secs(8),
        "rollback took {waited:?}"
    );
    assert_eq!(setup.switches(), ["v1"]);
    // The alert went out (and hangs there, unanswered) while the rollback finished.
    let alerted = wait_for(Duration::from_secs(5), || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|body| body.contains("\"rollback-executed\""))
    });
    assert!(
        alerted.is_some(),
        "the webhook saw no rollback alert: {:?}; daemon log:\n{}",
        seen.lock().unwrap(),
        setup.daemon_log()
    );
}

/// `[retention]` through the real daemon: a session that ended long ago is pruned from
/// rollbackd.db at start-up, and one that appears while it runs is pruned when the
/// current session ends. The unfinished and the recent stay.
#[test]
fn sessions_past_retention_are_pruned_at_start_and_when_a_session_ends() {
    use rollbackd::storage::store::{SessionRow, SessionState, Store};
    let setup = Setup::new("[retention]\nsessions = \"30d\"");
    let db = setup.state().join("rollbackd.db");
    let day_ms = 24 * 3600 * 1000;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let insert = |id: &str, ended_days_ago: i64| {
        let mut store = Store::open(&db).unwrap();
        let at = now_ms - ended_days_ago * day_ms;
        store
            .insert_session(&SessionRow {
                id: id.into(),
                active: "v0".into(),
                previous: Some("v-1".into()),
                promoted_at_ms: at - 600_000,
                state: SessionState::Confirmed,
                paused: false,
                pause_reason: None,
                baseline_json: None,
                operator: None,
                ended_at_ms: Some(at),
                end_reason: Some("grace period ended".into()),
                stability_json: None,
            })
            .unwrap();
    };
    let exists = |id: &str| {
        Store::open_read_only(&db)
            .unwrap()
            .session(id)
            .unwrap()
            .is_some()
    };
    insert("ended-100-days-ago", 100);
    insert("ended-2-days-ago", 2);

    let daemon = setup.start();
    let pruned = wait_for(Duration::from_secs(20), || !exists("ended-100-days-ago"));
    assert!(
        pruned.is_some(),
        "not pruned at start; log:\n{}",
        setup.daemon_log()
    );
    assert!(
        exists("ended-2-days-ago"),
        "a session inside the retention was pruned"
    );

    // One more old session while the daemon runs: pruned when the current session ends.
    setup.promote();
    insert("ended-40-days-ago", 40);
    setup.routes.error_rate(0.45);
    wait_until_idle_after_rollback(&setup);
    let pruned = wait_for(Duration::from_secs(20), || !exists("ended-40-days-ago"));
    assert!(
        pruned.is_some(),
        "not pruned after the session ended; log:\n{}",
        setup.daemon_log()
    );
    assert!(exists("ended-2-days-ago"));
    let store = Store::open_read_only(&db).unwrap();
    assert!(store.current_session().unwrap().is_none());
    assert!(
        setup
            .daemon_log()
            .contains("pruned rollbackd.db past retention.sessions = 30d"),
        "{}",
        setup.daemon_log()
    );
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// SPEC §2a end to end: the daemon observes the active version between sessions, keeps
/// the observations across a kill -9, and the next promotion is judged against them: a
/// release at 3% errors (below the absolute 20% and even the degraded 5%) is rolled back
/// because the version it replaced ran at 0.3%.
#[test]
fn the_daemon_observes_between_sessions_and_judges_the_next_release_against_it() {
    let setup =
        Setup::new("[baseline]\nobserve_interval = \"1s\"\nwindow = \"1m\"\nmin_samples = 3\n");
    setup.rewrite_config(|config| {
        config["monitor"]
            .as_table_mut()
            .unwrap()
            .insert("grace_period".into(), "2s".into());
    });
    setup.routes.error_rate(0.003);
    let daemon = setup.start();
    // v1 is promoted and confirmed: from then on it is the active version, observed.
    let out = setup.cli(&["promote", "--active", "v1", "--previous", "v0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let confirmed = wait_for(Duration::from_secs(20), || {
        setup
            .events("monitoring-stopped")
            .iter()
            .any(|line| line["state"] == "confirmed")
    });
    assert!(
        confirmed.is_some(),
        "v1 not confirmed; log:\n{}",
        setup.daemon_log()
    );
    // Three observations of v1 have reached rollbackd.db.
    let db = setup.path("state/rollbackd.db");
    let observed = wait_for(Duration::from_secs(20), || {
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|conn| {
                conn.query_row(
                    "SELECT COUNT(*) FROM observations WHERE worker = 'v1'",
                    [],
                    |row| row.get::<_, i64>(0),
                )
            })
            .is_ok_and(|n| n >= 3)
    });
    assert!(
        observed.is_some(),
        "no observations recorded; log:\n{}",
        setup.daemon_log()
    );
    let status: Value = serde_json::from_slice(&setup.cli(&["status", "--json"]).stdout).unwrap();
    assert!(
        status["nextBaseline"]
            .as_str()
            .is_some_and(|b| b.contains("observed")),
        "{status}"
    );

    // A crash loses nothing: the restarted daemon has the observations from rollbackd.db.
    daemon.kill9();
    let daemon = setup.start();
    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("baseline: error rate 0.30% (") && stdout.contains("[observed, "),
        "{stdout}"
    );
    setup.routes.error_rate(0.03);
    let rolled_back = wait_for(Duration::from_secs(20), || {
        !setup.events("rollback-executed").is_empty()
    });
    assert!(
        rolled_back.is_some(),
        "no rollback; log:\n{}",
        setup.daemon_log()
    );
    let artifact: Value =
        serde_json::from_str(&std::fs::read_to_string(&setup.artifacts("rollback_")[0]).unwrap())
            .unwrap();
    assert_eq!(
        artifact["evidence"]["baseline"]["source"], "observed",
        "{artifact}"
    );
    // One spelling in every record (issue 25 item 12): the RUNBOOK's
    // `evidence.baseline.windowSeconds`, never `window_seconds`.
    assert!(
        artifact["evidence"]["baseline"]["windowSeconds"].is_number(),
        "{artifact}"
    );
    assert_eq!(
        snake_case_keys(&artifact),
        Vec::<String>::new(),
        "{artifact}"
    );
    for line in setup.audit() {
        assert_eq!(snake_case_keys(&line), Vec::<String>::new(), "{line}");
    }
    assert!(
        artifact["reason"]
            .as_str()
            .is_some_and(|r| r.contains("gamma-Poisson test")),
        "{artifact}"
    );
    assert_eq!(setup.switches(), ["v1"]);
    assert_eq!(daemon.terminate().code(), Some(0));
}

/// Rolls v2 back to v1 with v1 healthy when the watch begins: the error rate drops as the
/// (slowed) switch hook runs, so the watch's first check already sees v1.
fn roll_back_into_a_healthy_v1(setup: &Setup) {
    std::fs::write(setup.path("slow"), "1").unwrap();
    setup.promote();
    setup.routes.error_rate(0.45);
    let started = wait_for(Duration::from_secs(20), || {
        !setup.events("rollback-started").is_empty()
    });
    assert!(
        started.is_some(),
        "no rollback; log:\n{}",
        setup.daemon_log()
    );
    setup.routes.error_rate(0.01);
    let watching = wait_for(Duration::from_secs(20), || {
        !setup.events("stability-watch-started").is_empty()
    });
    assert!(watching.is_some(), "no watch; log:\n{}", setup.daemon_log());
}

#[test]
fn the_restored_version_is_watched_and_its_breach_escalates_once_without_a_second_rollback() {
    let setup = Setup::new("[rollback]\nstability_period = \"1m\"");
    let daemon = setup.start();
    roll_back_into_a_healthy_v1(&setup);
    // v1 is judged on its own checks first...
    let judged = wait_for(Duration::from_secs(20), || {
        setup
            .events("health-check")
            .iter()
            .filter(|c| c["stabilityWatch"] == true && c["worker"] == "v1")
            .count()
            >= 2
    });
    assert!(
        judged.is_some(),
        "no checks of v1; log:\n{}",
        setup.daemon_log()
    );
    let status: Value = serde_json::from_slice(&setup.cli(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["state"], "stability-watch");
    assert_eq!(status["session"]["stability"]["restored"], "v1");
    assert!(
        status["session"]["stability"]["leftSeconds"]
            .as_u64()
            .unwrap()
            <= 60
    );
    // ...then goes bad: a migration the old code cannot read, say.
    setup.routes.error_rate(0.45);
    let escalated = wait_for(Duration::from_secs(20), || {
        !setup.events("kill-switch-activated").is_empty()
    });
    assert!(
        escalated.is_some(),
        "no escalation; log:\n{}",
        setup.daemon_log()
    );
    // The proof nothing else follows: the session is escalated (no automatic action
    // after that), and the report says so.
    let settled = wait_for(Duration::from_secs(20), || {
        let status: Value =
            serde_json::from_slice(&setup.cli(&["status", "--json"]).stdout).unwrap_or_default();
        status["state"] == "escalated"
            && status["latestIncident"]["summary"]
                .as_str()
                // The report's title as plain text: no Markdown heading, no entities.
                .is_some_and(|s| {
                    s.contains("level 3") && s.starts_with("SEV") && !s.contains("&gt;")
                })
    });
    assert!(settled.is_some(), "log:\n{}", setup.daemon_log());
    assert_eq!(
        setup.switches(),
        ["v1"],
        "one switch: never a second rollback"
    );
    assert_eq!(setup.events("rollback-executed").len(), 1);
    assert_eq!(setup.events("stability-failed").len(), 1);
    assert_eq!(setup.events("escalation-triggered").len(), 1);
    assert!(setup.events("stability-confirmed").is_empty());
    let failed = &setup.events("stability-failed")[0];
    assert_eq!(failed["restored"], "v1");
    assert!(failed["reason"]
        .as_str()
        .unwrap()
        .starts_with("restored version v1 unstable: "));
    let escalation = &setup.events("escalation-triggered")[0];
    assert_eq!(escalation["worker"], "v1");
    assert!(escalation["incidentSummary"]
        .as_str()
        .unwrap()
        .starts_with("SEV1 level 3: "));
    let report = setup.incident_reports();
    assert_eq!(report.len(), 1, "one incident, one report");
    let markdown = std::fs::read_to_string(&report[0]).unwrap();
    assert!(
        markdown.contains("| Stability watch | failed of v1"),
        "{markdown}"
    );
    assert!(markdown.contains("kill-switch reset"), "{markdown}");
    let out = setup.cli(&["report", "latest", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["level"], 3);
    assert_eq!(json["severity"], "SEV1");
    assert_eq!(json["stability"]["result"], "failed");
    assert_eq!(json["actions"].as_array().unwrap().len(), 2);
    assert_eq!(daemon.terminate().code(), Some(0));
}

#[test]
fn a_stable_restored_version_ends_the_session_and_the_report_says_so() {
    let setup = Setup::new("[rollback]\nstability_period = \"2s\"");
    let daemon = setup.start();
    roll_back_into_a_healthy_v1(&setup);
    wait_until_idle_after_rollback(&setup);
    assert_eq!(setup.events("stability-confirmed").len(), 1);
    assert!(setup.events("stability-failed").is_empty());
    assert_eq!(setup.switches(), ["v1"]);
    // The report and the decision record are rewritten with the watch's result.
    let rewritten = wait_for(Duration::from_secs(10), || {
        setup.artifacts("rollback_").first().is_some_and(|path| {
            serde_json::from_str::<Value>(&std::fs::read_to_string(path).unwrap_or_default())
                .is_ok_and(|r| r["incident"]["stability"]["result"] == "confirmed")
        })
    });
    assert!(rewritten.is_some(), "log:\n{}", setup.daemon_log());
    let report = setup.incident_reports();
    assert_eq!(report.len(), 1);
    let markdown = std::fs::read_to_string(&report[0]).unwrap();
    assert!(
        markdown.starts_with("# Incident: SEV2 level 2: rollback of v2 to v1"),
        "{markdown}"
    );
    assert!(
        markdown.contains("| Stability watch | confirmed of v1"),
        "{markdown}"
    );
    // `report` works with the daemon stopped, for any past session.
    assert_eq!(daemon.terminate().code(), Some(0));
    let out = setup.cli(&["report"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    assert!(
        printed.contains("| Stability watch | confirmed of v1"),
        "{printed}"
    );
    let session = setup.events("monitoring-started")[0]["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = setup.cli(&["report", &session[..10]]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a unique prefix names the session"
    );
    let out = setup.cli(&["report", "no-such-session"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no session"));
}

/// Issue 25, item 13: a fresh daemon knows no active version, so nothing is observed
/// before the first promotion and that promotion has no baseline. `[worker] active`
/// declares the version serving: it is observed at once, `status` says what is observed,
/// and the first promotion is judged against it.
#[test]
fn a_declared_active_version_is_observed_before_the_first_promotion() {
    let setup =
        Setup::new("[baseline]\nobserve_interval = \"1s\"\nwindow = \"1m\"\nmin_samples = 3\n");
    // Without the declaration (offline status of the fresh state directory): nothing.
    let before = String::from_utf8_lossy(&setup.cli(&["status"]).stdout).into_owned();
    assert!(
        before.contains("observing    nothing: no active version is known yet"),
        "{before}"
    );
    setup.rewrite_config(|config| {
        config["worker"]
            .as_table_mut()
            .unwrap()
            .insert("active".into(), "v1".into());
    });
    setup.routes.error_rate(0.003);
    let _daemon = setup.start();
    let db = setup.path("state/rollbackd.db");
    let observed = wait_for(Duration::from_secs(20), || {
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .and_then(|conn| {
                conn.query_row(
                    "SELECT COUNT(*) FROM observations WHERE worker = 'v1'",
                    [],
                    |row| row.get::<_, i64>(0),
                )
            })
            .is_ok_and(|n| n >= 3)
    });
    assert!(
        observed.is_some(),
        "v1 was not observed; log:\n{}",
        setup.daemon_log()
    );
    let status = String::from_utf8_lossy(&setup.cli(&["status"]).stdout).into_owned();
    assert!(
        status.contains("observing    v1 between sessions"),
        "{status}"
    );
    let out = setup.cli(&["promote", "--active", "v2", "--previous", "v1"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("[observed, "), "{stdout}");
}

/// Every object key in `value` spelled with an underscore (the records are camelCase),
/// with its path. Keys of `phases` are phase names and `incident` holds only camelCase
/// too, so nothing is exempt.
fn snake_case_keys(value: &Value) -> Vec<String> {
    fn walk(value: &Value, path: &str, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, inner) in map {
                    let here = format!("{path}.{key}");
                    if key.contains('_') {
                        out.push(here.clone());
                    }
                    walk(inner, &here, out);
                }
            }
            Value::Array(items) => {
                for (i, inner) in items.iter().enumerate() {
                    walk(inner, &format!("{path}[{i}]"), out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(value, "", &mut out);
    out
}
