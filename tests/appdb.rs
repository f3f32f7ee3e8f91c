//! The application's database stays the application's (issue 8, items 4–8): the real
//! binary against real SQLite files the test creates as an application would.
//!
//! - `kill-switch set` never changes the journal mode, permissions or ownership, and a
//!   read-only reader running as another user still reads the value;
//! - a missing database is refused (never created) unless `kill_switch.create_database`;
//! - an unreadable database is "unknown" in `status`, never "off";
//! - a redundant write does not swallow the next change made by hand;
//! - a `COLLATE NOCASE` key column: writes and reads agree.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{tool_available, wait_for, Setup, BIN};
use rollbackd::flags::{LiveFlags, LiveFlagsOptions};
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

const NOBODY: u32 = 65534;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// An application's database as the application made it: rollback journal (SQLite's
/// default), the contract table, `rows` in it.
fn app_db(path: &Path, create_table: &str, rows: &[(&str, &str)]) {
    let connection = Connection::open(path).unwrap();
    connection.execute_batch(create_table).unwrap();
    for (key, value) in rows {
        connection
            .execute(
                "INSERT INTO settings (key, value) VALUES (?1, ?2)",
                (key, value),
            )
            .unwrap();
    }
    let mode: String = connection
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(
        mode, "delete",
        "the test's database starts in rollback-journal mode"
    );
}

const CONTRACT_TABLE: &str = "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT)";

fn journal_mode(path: &Path) -> String {
    let connection = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    connection
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether commands can be run as `nobody` here (root and setpriv); in CI a missing
/// tool fails the test rather than skipping it.
fn can_run_as_nobody(test: &str) -> bool {
    tool_available(is_root(), test, "root (to switch to nobody)")
        && tool_available(
            Path::new("/usr/bin/setpriv").exists(),
            test,
            "setpriv (util-linux)",
        )
}

/// `rollbackd --config CONFIG ARGS` as `nobody`.
fn cli_as_nobody(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new("/usr/bin/setpriv")
        .arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("ROLLBACKD_CONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn status_json(setup: &Setup) -> Value {
    let out = setup.cli(&["status", "--json"]);
    assert!(out.status.success(), "status --json: {}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Item 4: the kill switch turned the application's database into WAL for good, after
/// which a read-only reader that cannot create `-shm` failed ("attempt to write a
/// readonly database").
#[test]
fn kill_switch_set_keeps_the_journal_mode_permissions_and_owner() {
    let setup = Setup::new("");
    let db = setup.path("app.db");
    app_db(&db, CONTRACT_TABLE, &[("DISABLE_NEW", "0")]);
    // The application's own user owns its database; only root may write the directory.
    if is_root() {
        std::os::unix::fs::chown(&db, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::fs::set_permissions(setup.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let before = std::fs::metadata(&db).unwrap();

    let out = setup.cli(&["kill-switch", "set", "--reason", "item 4"]);
    assert!(
        out.status.success(),
        "kill-switch set: {}",
        text(&out.stderr)
    );

    assert_eq!(
        journal_mode(&db),
        "delete",
        "the journal mode is the application's"
    );
    let after = std::fs::metadata(&db).unwrap();
    assert_eq!(after.mode() & 0o7777, 0o640, "permissions unchanged");
    assert_eq!(
        (after.uid(), after.gid()),
        (before.uid(), before.gid()),
        "owner unchanged"
    );
    for leftover in ["app.db-wal", "app.db-shm", "app.db-journal"] {
        assert!(!setup.path(leftover).exists(), "{leftover} left behind");
    }
    // A read-only reader in this process (LiveFlags) sees it...
    let flags = LiveFlags::start(&db, LiveFlagsOptions::default());
    assert!(flags.killed(), "LiveFlags reads DISABLE_NEW=1");
    drop(flags);

    // ...and so does one running as the database's owner, who cannot write the directory
    // (so could not create a -shm file had the database been turned into WAL).
    if !can_run_as_nobody("kill_switch_set_keeps_the_journal_mode_permissions_and_owner") {
        return;
    }
    let db_arg = db.display().to_string();
    let out = cli_as_nobody(
        &setup.config,
        &["flags", "get", "DISABLE_NEW", "--db", &db_arg],
    );
    assert!(
        out.status.success(),
        "flags get as nobody: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "1\n");
}

/// Item 5: a typo in `kill_switch.database` silently created a new database and
/// `kill-switch set` reported success.
#[test]
fn a_missing_database_is_refused_and_never_created() {
    let setup = Setup::new("[kill_switch]\ncreate_database = false");
    let db = setup.path("app.db");
    let db_text = db.display().to_string();

    let out = setup.cli(&["kill-switch", "set", "--reason", "typo"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "kill-switch set: {stderr}");
    assert!(stderr.contains(&db_text), "names the path: {stderr}");
    assert!(
        stderr.contains("kill_switch.create_database"),
        "names the key: {stderr}"
    );
    assert!(!db.exists(), "kill-switch set created {db_text}");
    let out = setup.cli(&["kill-switch", "reset", "--reason", "typo"]);
    assert_eq!(out.status.code(), Some(1), "reset: {}", text(&out.stderr));
    assert!(!db.exists(), "kill-switch reset created {db_text}");

    // The daemon refuses to start: caught at start-up, not at 3 a.m.
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&setup.config)
        .arg("run")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "run: {stderr}");
    assert!(stderr.contains("kill_switch.database"), "{stderr}");
    assert!(stderr.contains(&db_text), "{stderr}");
    assert!(!db.exists());

    // The key is in the configuration listing, with where its value came from.
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&setup.config)
        .arg("check-config")
        .env("ROLLBACKD_KILL_SWITCH_CREATE_DATABASE", "true")
        .output()
        .unwrap();
    let listing = text(&out.stdout);
    let line = listing
        .lines()
        .find(|line| line.contains("kill_switch.create_database"))
        .unwrap_or_else(|| panic!("check-config lists the key: {listing}"));
    assert!(line.contains("true"), "{line}");
    assert!(
        line.contains("ROLLBACKD_KILL_SWITCH_CREATE_DATABASE"),
        "provenance: {line}"
    );

    // Explicitly allowed: created.
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&setup.config)
        .args(["kill-switch", "set", "--reason", "allowed"])
        .env("ROLLBACKD_KILL_SWITCH_CREATE_DATABASE", "true")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        rollbackd::appdb::killswitch::read(&db, "DISABLE_NEW")
            .unwrap()
            .as_deref(),
        Some("1")
    );
}

/// Item 5 through a running daemon: the database disappears after start-up; an
/// operator's `kill-switch set` fails with exit 1 and the reason instead of creating it.
#[test]
fn the_daemon_does_not_create_a_database_that_went_away() {
    let setup = Setup::new("[kill_switch]\ncreate_database = false");
    let db = setup.path("app.db");
    app_db(&db, CONTRACT_TABLE, &[]);
    let _daemon = setup.start();
    std::fs::remove_file(&db).unwrap();
    let out = setup.cli(&["kill-switch", "set", "--reason", "gone"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("kill_switch.create_database"), "{stderr}");
    assert!(!db.exists(), "the daemon created the database");
    // And status says unknown, not off.
    let status = status_json(&setup);
    assert_eq!(status["killSwitch"]["state"], "unknown", "{status}");
}

/// Item 6: `status` said "off" when the database could not be read.
#[test]
fn an_unreadable_database_is_unknown_never_off() {
    let setup = Setup::new("[http]\nlisten = \"127.0.0.1:0\"");
    let db = setup.path("app.db");
    std::fs::write(
        &db,
        "this is not an SQLite database, and it is certainly not off\n",
    )
    .unwrap();
    let db_text = db.display().to_string();

    let check = |status: &Value, how: &str| {
        let kill = &status["killSwitch"];
        assert_eq!(kill["state"], "unknown", "{how}: {status}");
        assert_eq!(kill["key"], "DISABLE_NEW", "{how}");
        assert!(kill["on"].is_null(), "{how}: not known is not off: {kill}");
        assert!(
            kill["error"].as_str().unwrap_or("").contains(&db_text),
            "{how}: the reason names the file: {kill}"
        );
    };
    let check_human = |setup: &Setup, how: &str| {
        let out = setup.cli(&["status"]);
        assert!(out.status.success(), "{how}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let line = stdout
            .lines()
            .find(|line| line.starts_with("kill switch"))
            .unwrap_or_else(|| panic!("{how}: no kill switch line: {stdout}"));
        assert!(line.contains("UNKNOWN"), "{how}: {line}");
        assert!(line.contains(&db_text), "{how}: {line}");
        assert!(!line.contains("off"), "{how}: {line}");
    };

    // Without a daemon.
    check(&status_json(&setup), "local status --json");
    check_human(&setup, "local status");
    let out = setup.cli(&["kill-switch", "status"]);
    assert_eq!(out.status.code(), Some(1), "kill-switch status");
    assert!(
        text(&out.stderr).contains("UNKNOWN"),
        "{}",
        text(&out.stderr)
    );

    // With one: the socket, /status and the metric.
    let _daemon = setup.start();
    check(&status_json(&setup), "daemon status --json");
    check_human(&setup, "daemon status");
    let addr = setup.http_addr();
    let response = common::http_get(addr, "/status");
    let body: Value = serde_json::from_str(&response.body).unwrap();
    check(&body, "/status");
    let mut metric = None;
    wait_for(Duration::from_secs(10), || {
        metric = common::metric_value(
            &common::http_get(addr, "/metrics").body,
            "rollbackd_kill_switch",
        );
        metric == Some(-1.0)
    });
    assert_eq!(
        metric,
        Some(-1.0),
        "rollbackd_kill_switch is -1 while unknown"
    );
}

/// Item 6 as the issue found it: another user's WAL database (0644, in a directory they
/// cannot write) holding DISABLE_NEW=1; their read-only open fails on `-shm`.
#[test]
fn another_users_wal_database_is_unknown_in_status_not_off() {
    if !can_run_as_nobody("another_users_wal_database_is_unknown_in_status_not_off") {
        return;
    }
    let setup = Setup::new("");
    let db = setup.path("app.db");
    app_db(&db, CONTRACT_TABLE, &[("DISABLE_NEW", "1")]);
    {
        let connection = Connection::open(&db).unwrap();
        let mode: String = connection
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }
    assert!(!setup.path("app.db-shm").exists());
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(setup.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = cli_as_nobody(&setup.config, &["status", "--json"]);
    assert!(
        out.status.success(),
        "status as nobody: {}",
        text(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["killSwitch"]["state"], "unknown", "{status}");
    let out = cli_as_nobody(&setup.config, &["status"]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("UNKNOWN"), "{stdout}");
    assert!(!stdout.contains("off)"), "{stdout}");
}

/// Item 7: `kill-switch set` while already 1, reset, then a hand-made `UPDATE ... '1'`
/// was not audited: the redundant write's expected-write entry swallowed it.
#[test]
fn a_hand_made_change_after_a_redundant_write_is_audited_as_external() {
    let setup = Setup::new("[http]\nlisten = \"127.0.0.1:0\"");
    let db = setup.path("app.db");
    app_db(&db, CONTRACT_TABLE, &[("DISABLE_NEW", "1")]);
    let _daemon = setup.start();
    let addr = setup.http_addr();
    let kill_metric = || {
        common::metric_value(
            &common::http_get(addr, "/metrics").body,
            "rollbackd_kill_switch",
        )
    };
    wait_for(Duration::from_secs(10), || kill_metric() == Some(1.0))
        .expect("the daemon sees DISABLE_NEW=1");

    let out = setup.cli(&["kill-switch", "set", "--reason", "already on"]);
    assert!(out.status.success(), "set: {}", text(&out.stderr));
    let out = setup.cli(&["kill-switch", "reset", "--reason", "done"]);
    assert!(out.status.success(), "reset: {}", text(&out.stderr));
    // Wait until the daemon's LiveFlags has seen the reset (the metric follows it), so
    // the hand-made change below is a change it sees on its own.
    wait_for(Duration::from_secs(10), || kill_metric() == Some(0.0))
        .expect("the daemon sees the reset");
    assert!(
        setup.events("kill-switch-external").is_empty(),
        "rollbackd's own writes are not external"
    );

    // On-call sets it by hand.
    let sql = "UPDATE settings SET value = '1' WHERE key = 'DISABLE_NEW';";
    if common::sqlite3_available() {
        let out = Command::new("sqlite3").arg(&db).arg(sql).output().unwrap();
        assert!(out.status.success(), "sqlite3: {}", text(&out.stderr));
    } else {
        Connection::open(&db).unwrap().execute_batch(sql).unwrap();
    }
    let found = wait_for(Duration::from_secs(20), || {
        !setup.events("kill-switch-external").is_empty()
    });
    assert!(
        found.is_some(),
        "no kill-switch-external line for the hand-made change; audit: {:?}\nlog:\n{}",
        setup.audit(),
        setup.daemon_log()
    );
    let external = setup.events("kill-switch-external");
    assert_eq!(external.len(), 1, "{external:?}");
    assert_eq!(external[0]["value"], "1");
    assert_eq!(external[0]["previous"], "0");
    assert_eq!(external[0]["source"], "external");
}

/// Item 8: a `settings` table whose key column is `COLLATE NOCASE`: `set` updated row
/// `disable_new` but `status` read `unset`.
#[test]
fn a_nocase_key_column_reads_what_was_written() {
    let setup = Setup::new("");
    let db = setup.path("app.db");
    app_db(
        &db,
        "CREATE TABLE settings (key TEXT COLLATE NOCASE PRIMARY KEY, value TEXT)",
        &[("disable_new", "0"), ("NEW_CHECKOUT", "1")],
    );
    let out = setup.cli(&["kill-switch", "set", "--reason", "nocase"]);
    assert!(out.status.success(), "set: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("(was 0)"),
        "the write found the row: {stdout}"
    );

    let kill = status_json(&setup)["killSwitch"].clone();
    assert_eq!(kill["value"], "1", "{kill}");
    assert_eq!(kill["on"], true, "{kill}");
    let out = setup.cli(&["kill-switch", "status"]);
    assert!(
        text(&out.stdout).starts_with("DISABLE_NEW=1 (ON"),
        "{}",
        text(&out.stdout)
    );

    let flags = LiveFlags::start(
        &db,
        LiveFlagsOptions {
            defaults: [("NEW_CHECKOUT".to_string(), "0".to_string())].into(),
            ..LiveFlagsOptions::default()
        },
    );
    assert!(flags.killed(), "LiveFlags sees the kill switch");
    assert_eq!(flags.get("NEW_CHECKOUT").as_deref(), Some("0"));
    drop(flags);

    let connection = Connection::open(&db).unwrap();
    let rows: Vec<(String, String)> = connection
        .prepare("SELECT key, value FROM settings WHERE key = 'DISABLE_NEW' COLLATE NOCASE")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        rows,
        vec![("disable_new".to_string(), "1".to_string())],
        "one row, the application's, updated in place"
    );
}

/// Item 5 for SIGHUP: a reload whose kill_switch.database does not exist is refused
/// like a start-up would be, and the old configuration stays.
#[test]
fn a_reload_naming_a_missing_database_is_refused() {
    let setup = Setup::new("[kill_switch]\ncreate_database = false");
    app_db(&setup.path("app.db"), CONTRACT_TABLE, &[]);
    let daemon = setup.start();
    let typo = setup.path("app.bd");
    setup.rewrite_config(|table| {
        table["kill_switch"]["database"] = toml::Value::String(typo.display().to_string());
    });
    // SAFETY: signalling the child we started.
    assert_eq!(unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) }, 0);
    wait_for(Duration::from_secs(10), || {
        !setup.events("config-reloaded").is_empty()
    })
    .unwrap_or_else(|| panic!("no config-reloaded line; log:\n{}", setup.daemon_log()));
    let reload = &setup.events("config-reloaded")[0];
    assert_eq!(reload["ok"], false, "{reload}");
    let error = reload["error"].as_str().unwrap_or("");
    assert!(error.contains("kill_switch.database"), "{reload}");
    assert!(!typo.exists(), "the reload created the typo's database");
    let out = setup.cli(&["kill-switch", "set", "--reason", "old config"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!typo.exists());
}
