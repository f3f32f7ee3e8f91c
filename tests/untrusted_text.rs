//! Untrusted text (issue 8, item 3): worker ids are validated at every entry point, and
//! whatever came from outside (health bodies, ids and reasons read back from disk) is
//! escaped in every human output. The real binary, a loopback worker, real state files.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{wait_for, Setup};
use serde_json::Value;

/// The worker's health body from the issue: retitles the window (OSC 0 … BEL), clears the
/// screen and prints a fake red line.
const HOSTILE_BODY: &str = "oops \x1b]0;PWNED\x07\x1b[2J\x1b[31mFAKE: rollback-executed";
/// The same, as `rollbackd` shows it.
const HOSTILE_SHOWN: &str = r"oops \u{1b}]0;PWNED\u{7}\u{1b}[2J\u{1b}[31mFAKE: rollback-executed";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_no_terminal_controls(what: &str, bytes: &[u8]) {
    assert!(
        !bytes.contains(&0x1b) && !bytes.contains(&0x07),
        "{what} carries ESC or BEL to the terminal:\n{}",
        text(bytes)
    );
}

/// Ids that must never be accepted: a path and query, forged lines and colours, an
/// option for a hook, and a 130,000-character id (under Linux's 128 KiB per-argument
/// limit, so it reaches rollbackd).
fn bad_ids() -> Vec<(String, &'static str)> {
    vec![
        ("../../snapshot?".to_owned(), "'/' is not allowed"),
        (
            "v2\n2025-10-22 14:32:15  rollback-executed      v2 → v1".to_owned(),
            "U+000A",
        ),
        ("v2\x1b[31m".to_owned(), "U+001B"),
        (
            "--delete-everything".to_owned(),
            "must start with a letter or digit",
        ),
        ("y".repeat(130_000), "130000 characters long"),
    ]
}

/// `status --json` says no session was recorded and no worker is known.
fn assert_nothing_recorded(setup: &Setup) {
    let out = setup.cli(&["status", "--json"]);
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        status["session"].is_null(),
        "a session was recorded: {status}"
    );
    assert!(
        status["workers"]["active"].is_null() || status["workers"].is_null(),
        "a worker was recorded: {status}"
    );
    assert!(
        setup.events("monitoring-started").is_empty(),
        "{:?}",
        setup.audit()
    );
}

fn assert_refused_with_usage(out: &std::process::Output, says: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit status; stderr: {stderr}");
    assert!(stderr.contains("invalid worker id"), "{stderr}");
    assert!(stderr.contains(says), "expected {says:?} in: {stderr}");
    assert!(
        stderr.contains("1-64 characters of A-Z a-z 0-9 . _ + -"),
        "the rule is stated: {stderr}"
    );
    assert!(
        stderr.len() < 2000,
        "the id is not echoed whole: {} bytes",
        stderr.len()
    );
    assert_no_terminal_controls("the refusal", &out.stderr);
}

#[test]
fn promote_refuses_bad_worker_ids_without_a_daemon_and_records_nothing() {
    let setup = Setup::new("");
    for (id, says) in bad_ids() {
        let as_active = setup.cli(&["promote", &format!("--active={id}"), "--previous", "v1"]);
        assert_refused_with_usage(&as_active, says);
        let as_previous = setup.cli(&["promote", "--active", "v2", &format!("--previous={id}")]);
        assert_refused_with_usage(&as_previous, says);
    }
    assert_nothing_recorded(&setup);
    assert!(
        !setup.state().join("rollbackd.db").exists()
            || setup.cli(&["status", "--json"]).status.success()
    );
}

#[test]
fn promote_refuses_bad_worker_ids_with_a_daemon_and_nothing_reaches_probe_or_hook() {
    let setup = Setup::new("");
    let daemon = setup.start();
    for (id, says) in bad_ids() {
        let as_active = setup.cli(&["promote", &format!("--active={id}"), "--previous", "v1"]);
        assert_refused_with_usage(&as_active, says);
        let as_previous = setup.cli(&["promote", "--active", "v2", &format!("--previous={id}")]);
        assert_refused_with_usage(&as_previous, says);
    }
    assert_nothing_recorded(&setup);
    assert!(setup.switches().is_empty());
    // A valid promotion still works, and is the first thing recorded.
    setup.promote();
    assert_eq!(setup.events("monitoring-started").len(), 1);
    daemon.terminate();
}

/// One raw request line to the daemon's socket; the reply lines.
fn raw_request(setup: &Setup, line: &str) -> Vec<Value> {
    let mut stream = UnixStream::connect(setup.state().join("rollbackd.sock")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(line.as_bytes()).unwrap();
    stream.write_all(b"\n").unwrap();
    BufReader::new(stream)
        .lines()
        .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
        .collect()
}

#[test]
fn a_raw_control_socket_request_with_a_bad_id_or_reason_is_refused() {
    let setup = Setup::new("");
    let daemon = setup.start();
    // A 130,000-character request line is refused for its length alone (the socket takes
    // 64 KiB); 1,000 characters get through to the id check.
    let mut ids = bad_ids();
    ids.retain(|(id, _)| id.len() < 1000);
    ids.push(("y".repeat(1000), "1000 characters long"));
    for (id, says) in ids {
        for request in [
            serde_json::json!({"command": "promote", "active": id, "previous": "v1"}),
            serde_json::json!({"command": "promote", "active": "v2", "previous": id}),
        ] {
            let replies = raw_request(&setup, &request.to_string());
            match replies.as_slice() {
                [reply] => {
                    assert_eq!(reply["type"], "failed", "{reply}");
                    assert_eq!(reply["exit"], 2, "{reply}");
                    let message = reply["message"].as_str().unwrap();
                    assert!(message.contains("invalid worker id"), "{message}");
                    assert!(message.contains(says), "{message}");
                }
                other => panic!("expected one failed reply, got {other:?}"),
            }
        }
    }
    // An operator's reason is one line of plain text: checked before anything else (with
    // no session, a valid pause would be refused with exit 3 instead).
    let replies = raw_request(
        &setup,
        r#"{"command":"pause","reason":"x\u001b[2J\nFAKE line"}"#,
    );
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0]["exit"], 2, "{replies:?}");
    assert!(
        replies[0]["message"]
            .as_str()
            .unwrap()
            .contains("control and invisible formatting characters are not allowed"),
        "{replies:?}"
    );
    assert_nothing_recorded(&setup);
    assert_no_terminal_controls("the journal", setup.daemon_log().as_bytes());
    daemon.terminate();
}

#[test]
fn reasons_with_control_characters_or_over_1024_characters_are_refused() {
    let setup = Setup::new("");
    for args in [
        vec!["rollback", "--yes", "--reason", "bad\x1b]0;PWNED\x07"],
        vec!["kill-switch", "set", "--reason", "line\nforged"],
        vec!["pause", "--reason", "tab\there"],
    ] {
        let out = setup.cli(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--reason"), "{stderr}");
        assert_no_terminal_controls("the refusal", &out.stderr);
    }
    let long = "r".repeat(1025);
    let out = setup.cli(&["kill-switch", "set", "--reason", &long]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("at most 1024"));
    assert!(setup.audit().is_empty(), "{:?}", setup.audit());
}

#[test]
fn a_hostile_health_body_is_escaped_in_audit_tail_status_and_the_journal() {
    // Dry run: the failing probes are recorded and shown, and nothing else happens.
    let setup = Setup::new("[rules]\ndry_run = true\n");
    setup.routes.set("/v2/health", 500, HOSTILE_BODY);
    let daemon = setup.start();
    setup.promote();
    wait_for(Duration::from_secs(30), || {
        setup.events("health-check").iter().any(|check| {
            check["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains("PWNED"))
        })
    })
    .expect("a check's reason quotes the health body");
    // The JSON audit line keeps the body faithfully (JSON escapes it on its own).
    let raw_log = std::fs::read(setup.state().join("analytics/audit.log")).unwrap();
    assert!(
        text(&raw_log).contains(r"oops \u001b]0;PWNED\u0007"),
        "{}",
        text(&raw_log)
    );
    assert_no_terminal_controls("audit.log", &raw_log);

    let tail = setup.cli(&["audit", "tail", "-n", "100"]);
    assert!(tail.status.success(), "{}", text(&tail.stderr));
    assert_no_terminal_controls("audit tail", &tail.stdout);
    assert!(
        text(&tail.stdout).contains(HOSTILE_SHOWN),
        "{}",
        text(&tail.stdout)
    );

    let status = setup.cli(&["status"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert_no_terminal_controls("status", &status.stdout);
    assert!(
        text(&status.stdout).contains(HOSTILE_SHOWN),
        "{}",
        text(&status.stdout)
    );

    daemon.terminate();
    let journal = setup.daemon_log();
    assert_no_terminal_controls("the journal", journal.as_bytes());

    // Without a daemon `status` reads rollbackd.db itself: escaped too.
    let offline = setup.cli(&["status"]);
    assert!(offline.status.success(), "{}", text(&offline.stderr));
    assert!(
        text(&offline.stdout).contains("not running"),
        "{}",
        text(&offline.stdout)
    );
    assert_no_terminal_controls("status without a daemon", &offline.stdout);
    assert!(
        text(&offline.stdout).contains(HOSTILE_SHOWN),
        "{}",
        text(&offline.stdout)
    );
}

#[test]
fn a_line_of_audit_log_that_is_not_json_is_escaped_by_audit_tail() {
    let setup = Setup::new("");
    let analytics = setup.state().join("analytics");
    std::fs::create_dir_all(&analytics).unwrap();
    std::fs::write(
        analytics.join("audit.log"),
        format!("{HOSTILE_BODY}\n{{\"timestamp\":\"2025-10-22T14:32:15Z\",\"event\":\"rollback-executed\",\"from\":\"v2\\u001b[2J\",\"to\":\"v1\",\"reason\":\"{}\"}}\n",
            r"line\nforged \u001b]0;x\u0007"),
    )
    .unwrap();
    for args in [&["audit", "tail"][..], &["audit", "tail", "--json"][..]] {
        let out = setup.cli(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert_no_terminal_controls("audit tail", &out.stdout);
        assert_eq!(
            text(&out.stdout).lines().count(),
            2,
            "{}",
            text(&out.stdout)
        );
    }
    let shown = text(&setup.cli(&["audit", "tail"]).stdout);
    assert!(
        shown.contains(&format!("[unparsed] {HOSTILE_SHOWN}")),
        "{shown}"
    );
    assert!(shown.contains(r"v2\u{1b}[2J → v1"), "{shown}");
    assert!(shown.contains(r"— line\nforged \u{1b}]0;x\u{7}"), "{shown}");
}

#[test]
fn invalid_ids_stored_in_rollbackd_db_are_treated_as_unknown() {
    let setup = Setup::new("");
    setup.promote(); // no daemon: recorded in rollbackd.db
    let db = rusqlite::Connection::open(setup.state().join("rollbackd.db")).unwrap();
    db.execute(
        "UPDATE sessions SET active = ?1, previous = ?2",
        ["v2\x1b[2J/../../snapshot?", "--delete-everything"],
    )
    .unwrap();
    db.execute(
        "UPDATE meta SET value = '--delete-everything' WHERE key IN ('active', 'previous')",
        [],
    )
    .unwrap();
    drop(db);

    // Without a daemon: status shows no such worker, and says why.
    let status = setup.cli(&["status", "--json"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let value: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(value["session"]["active"].is_null(), "{value}");
    assert!(value["session"]["previous"].is_null(), "{value}");
    assert!(value["workers"]["active"].is_null(), "{value}");
    assert!(
        text(&status.stderr).contains("treated as unknown"),
        "{}",
        text(&status.stderr)
    );
    assert_no_terminal_controls("status", &status.stderr);

    // The daemon starts, does not resume the session, and says so.
    let daemon = setup.start();
    let journal_says = wait_for(Duration::from_secs(10), || {
        setup
            .daemon_log()
            .contains("the recorded session's active worker is not a valid id")
    });
    assert!(journal_says.is_some(), "{}", setup.daemon_log());
    let status: Value = serde_json::from_slice(&setup.cli(&["status", "--json"]).stdout).unwrap();
    assert!(status["session"].is_null(), "{status}");
    // Nothing to roll back to: refused, and no hook ran with the stored id.
    let rollback = setup.cli(&["rollback", "--yes", "--reason", "test"]);
    assert_eq!(
        rollback.status.code(),
        Some(3),
        "{}",
        text(&rollback.stderr)
    );
    assert!(setup.switches().is_empty(), "{:?}", setup.switches());
    assert!(
        setup.events("health-check").is_empty(),
        "the stored id was probed: {:?}",
        setup.audit()
    );
    daemon.terminate();
    assert_no_terminal_controls("the journal", setup.daemon_log().as_bytes());
}

#[test]
fn a_hostile_value_written_into_the_settings_table_is_escaped_in_the_journal_status_and_tail() {
    let setup = Setup::new("");
    let app_db = rusqlite::Connection::open(setup.path("app.db")).unwrap();
    app_db
        .execute_batch("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT);")
        .unwrap();
    let daemon = setup.start();
    // A hand-made change, as from the sqlite3 shell: noticed, audited, logged.
    app_db
        .execute(
            "INSERT OR REPLACE INTO settings (key, value) VALUES ('DISABLE_NEW', ?1)",
            [HOSTILE_BODY],
        )
        .unwrap();
    wait_for(Duration::from_secs(20), || {
        !setup.events("kill-switch-external").is_empty()
    })
    .expect("the external change is audited");
    let journal_has_it = wait_for(Duration::from_secs(10), || {
        setup.daemon_log().contains("changed outside rollbackd")
    });
    assert!(journal_has_it.is_some(), "{}", setup.daemon_log());
    let journal = setup.daemon_log();
    assert_no_terminal_controls("the journal", journal.as_bytes());
    assert!(
        journal.contains(&format!("value={HOSTILE_SHOWN}")),
        "the journal shows the value escaped:\n{journal}"
    );

    let status = setup.cli(&["status"]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    assert_no_terminal_controls("status", &status.stdout);
    assert!(
        text(&status.stdout).contains(&format!("DISABLE_NEW={HOSTILE_SHOWN}")),
        "{}",
        text(&status.stdout)
    );
    let ks = setup.cli(&["kill-switch", "status"]);
    assert_no_terminal_controls("kill-switch status", &ks.stdout);
    assert!(
        text(&ks.stdout).contains(HOSTILE_SHOWN),
        "{}",
        text(&ks.stdout)
    );

    let tail = setup.cli(&["audit", "tail"]);
    assert_no_terminal_controls("audit tail", &tail.stdout);
    assert!(
        text(&tail.stdout).contains(&format!("DISABLE_NEW={HOSTILE_SHOWN}")),
        "{}",
        text(&tail.stdout)
    );
    daemon.terminate();
}

#[test]
fn simulate_escapes_a_probe_reason_from_the_trace() {
    let setup = Setup::new("");
    let trace = setup.path("trace.jsonl");
    let line = |at: u32| {
        serde_json::json!({"at": at, "probe": HOSTILE_BODY,
                           "snapshot": {"failureRate": 0.01, "requests": 1000}})
        .to_string()
    };
    std::fs::write(
        &trace,
        format!("{}\n{}\n{}\n", line(30), line(60), line(90)),
    )
    .unwrap();
    let out = setup.cli(&["simulate", "--trace", trace.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_no_terminal_controls("simulate", &out.stdout);
    let shown = text(&out.stdout);
    assert!(shown.contains("first action: escalate"), "{shown}");
    assert!(shown.contains(HOSTILE_SHOWN), "{shown}");
}
