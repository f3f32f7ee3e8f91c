//! LiveFlags against real SQLite files: commits of other connections and of the
//! `sqlite3` shell are noticed quickly, a database that appears later is picked up, and
//! the reader never makes a writer busy.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rollbackd::appdb::settings::SettingsStore;
use rollbackd::flags::{FlagsSnapshot, LiveFlags, LiveFlagsOptions};
use tokio::sync::watch;

const SQLITE3_SHELL: &str = "/usr/bin/sqlite3";

fn options() -> LiveFlagsOptions {
    LiveFlagsOptions {
        defaults: BTreeMap::from([("NEW_CHECKOUT".to_string(), "0".to_string())]),
        ..LiveFlagsOptions::default()
    }
}

/// Waits (at most `limit`) for a published snapshot satisfying `done`.
async fn wait_for(
    receiver: &mut watch::Receiver<Arc<FlagsSnapshot>>,
    limit: Duration,
    mut done: impl FnMut(&FlagsSnapshot) -> bool,
) -> Result<Arc<FlagsSnapshot>, String> {
    let waiting = async {
        loop {
            let snapshot = receiver.borrow_and_update().clone();
            if done(&snapshot) {
                return Ok(snapshot);
            }
            if receiver.changed().await.is_err() {
                return Err("liveflags stopped".to_string());
            }
        }
    };
    match tokio::time::timeout(limit, waiting).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "not seen within {limit:?}; last snapshot {:?}",
            receiver.borrow()
        )),
    }
}

fn store_with(path: &Path, rows: &[(&str, &str)]) -> SettingsStore {
    let mut store = SettingsStore::open(path).unwrap();
    for (key, value) in rows {
        store.write_once(key, value).unwrap();
    }
    store
}

#[tokio::test]
async fn a_write_from_another_connection_is_seen_within_200_ms() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let mut store = store_with(&path, &[("NEW_CHECKOUT", "1")]);
    let flags = LiveFlags::start(&path, options());
    assert_eq!(flags.get("NEW_CHECKOUT").as_deref(), Some("1"));
    assert!(!flags.killed());
    let mut receiver = flags.subscribe();

    for round in 0..5 {
        let value = format!("v{round}");
        store.write_once("NEW_CHECKOUT", &value).unwrap();
        wait_for(&mut receiver, Duration::from_millis(200), |snapshot| {
            snapshot.rows.get("NEW_CHECKOUT") == Some(&value)
        })
        .await
        .unwrap();
        assert_eq!(flags.get("NEW_CHECKOUT"), Some(value));
    }
    assert_eq!(flags.snapshot().error, None);
}

#[tokio::test]
async fn a_kill_switch_set_from_the_sqlite3_shell_is_seen_and_reverts_flags_to_defaults() {
    if !Path::new(SQLITE3_SHELL).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{SQLITE3_SHELL} is required in CI (.ci/run installs it)"
        );
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIP a_kill_switch_set_from_the_sqlite3_shell: {SQLITE3_SHELL} is not installed"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let _store = store_with(&path, &[("NEW_CHECKOUT", "1"), ("DISABLE_NEW", "0")]);
    let flags = LiveFlags::start(&path, options());
    assert_eq!(flags.get("NEW_CHECKOUT").as_deref(), Some("1"));
    let mut receiver = flags.subscribe();

    let output = std::process::Command::new(SQLITE3_SHELL)
        .arg(&path)
        .arg(".timeout 2000")
        .arg("INSERT OR REPLACE INTO settings (key, value) VALUES ('DISABLE_NEW','1')")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");

    wait_for(&mut receiver, Duration::from_millis(500), |snapshot| {
        snapshot.killed("DISABLE_NEW")
    })
    .await
    .unwrap();
    assert!(flags.killed());
    assert_eq!(flags.get("NEW_CHECKOUT").as_deref(), Some("0"));
    assert_eq!(flags.get("DISABLE_NEW").as_deref(), Some("1"));
    assert_eq!(flags.get("NO_DEFAULT"), None);
    assert_eq!(
        flags
            .snapshot()
            .rows
            .get("NEW_CHECKOUT")
            .map(String::as_str),
        Some("1"),
        "the row itself is untouched"
    );
}

#[tokio::test]
async fn started_before_the_database_exists_it_picks_it_up_once_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("later.db");
    let flags = LiveFlags::start(&path, options());
    let first = flags.snapshot();
    assert!(first.error.is_some(), "{first:?}");
    assert!(first.rows.is_empty());
    assert_eq!(flags.get("NEW_CHECKOUT").as_deref(), Some("0"));
    assert!(!path.exists(), "LiveFlags must not create the database");
    let mut receiver = flags.subscribe();

    // Let it fail a few polls first, and see that it did: the database is still missing
    // and LiveFlags kept retrying it.
    let failed_before = flags.failed_polls();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while flags.failed_polls() < failed_before + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "LiveFlags stopped polling a missing database: {} failed polls",
            flags.failed_polls()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(flags.snapshot().error.is_some(), "{:?}", flags.snapshot());
    assert!(!path.exists(), "LiveFlags must not create the database");
    let path_for_writer = path.clone();
    tokio::task::spawn_blocking(move || {
        store_with(&path_for_writer, &[("NEW_CHECKOUT", "1")]);
    })
    .await
    .unwrap();

    let seen = wait_for(&mut receiver, Duration::from_millis(500), |snapshot| {
        snapshot.error.is_none()
            && snapshot.rows.get("NEW_CHECKOUT").map(String::as_str) == Some("1")
    })
    .await
    .unwrap();
    assert!(seen.version > first.version);
    assert_eq!(flags.get("NEW_CHECKOUT").as_deref(), Some("1"));
}

#[tokio::test]
async fn a_replaced_database_file_is_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    drop(store_with(&path, &[("NEW_CHECKOUT", "1")]));
    let flags = LiveFlags::start(&path, options());
    let mut receiver = flags.subscribe();

    let replacement = dir.path().join("replacement.db");
    drop(store_with(&replacement, &[("NEW_CHECKOUT", "2")]));
    // A WAL database is only complete with its -wal file; the store checkpointed and
    // removed it on close, so the main file alone is the whole database.
    std::fs::rename(&replacement, &path).unwrap();

    wait_for(&mut receiver, Duration::from_millis(500), |snapshot| {
        snapshot.rows.get("NEW_CHECKOUT").map(String::as_str) == Some("2")
    })
    .await
    .unwrap();
}

#[test]
fn a_reader_polling_every_millisecond_never_makes_a_writer_busy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let mut store = store_with(&path, &[("NEW_CHECKOUT", "1")]);
    let flags = LiveFlags::start(
        &path,
        LiveFlagsOptions {
            poll_interval: Duration::from_millis(1),
            full_reread_interval: Duration::from_millis(1),
            ..options()
        },
    );
    for write_idx in 0..200 {
        if let Err(error) = store.write_once("NEW_CHECKOUT", &write_idx.to_string()) {
            panic!("write {write_idx} failed while LiveFlags polled: {error}");
        }
    }
    // And the reader kept up.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while flags.get("NEW_CHECKOUT").as_deref() != Some("199") {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            flags.snapshot()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(flags.snapshot().version > 1);
}

#[test]
fn dropping_live_flags_stops_its_thread_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let _store = store_with(&path, &[]);
    let flags = LiveFlags::start(
        &path,
        LiveFlagsOptions {
            poll_interval: Duration::from_secs(60),
            ..options()
        },
    );
    let receiver = flags.subscribe();
    let started = std::time::Instant::now();
    drop(flags);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        receiver.has_changed().is_err(),
        "the sender is gone with the thread"
    );
}

/// With the backstop poll an hour away, only the kernel can wake the reader: every change
/// below is seen because a file event woke it (issue: event-driven LiveFlags).
fn woken_only() -> LiveFlagsOptions {
    LiveFlagsOptions {
        poll_interval: Duration::from_secs(3600),
        full_reread_interval: Duration::from_secs(3600),
        ..options()
    }
}

#[tokio::test]
async fn a_commit_wakes_the_reader_without_a_poll() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let mut store = store_with(&path, &[("NEW_CHECKOUT", "1")]);
    let flags = LiveFlags::start(&path, woken_only());
    let mut receiver = flags.subscribe();
    for value in ["2", "3", "4"] {
        store.write_once("NEW_CHECKOUT", value).unwrap();
        wait_for(&mut receiver, Duration::from_secs(5), |s| {
            s.rows.get("NEW_CHECKOUT").map(String::as_str) == Some(value)
        })
        .await
        .unwrap();
    }
    // The sqlite3 shell, as an on-call engineer would write it.
    if Path::new(SQLITE3_SHELL).exists() {
        let output = std::process::Command::new(SQLITE3_SHELL)
            .arg(&path)
            .arg(".timeout 2000")
            .arg("INSERT OR REPLACE INTO settings (key, value) VALUES ('DISABLE_NEW', '1');")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        wait_for(&mut receiver, Duration::from_secs(5), |s| {
            s.killed("DISABLE_NEW")
        })
        .await
        .unwrap();
    } else {
        eprintln!("skipped the sqlite3-shell part: {SQLITE3_SHELL} is not installed");
    }
}

#[tokio::test]
async fn a_rollback_journal_database_wakes_the_reader_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
        conn.execute_batch(
            "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT);
             INSERT INTO settings VALUES ('NEW_CHECKOUT', '1');",
        )
        .unwrap();
    }
    let flags = LiveFlags::start(&path, woken_only());
    let mut receiver = flags.subscribe();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "UPDATE settings SET value = '7' WHERE key = 'NEW_CHECKOUT'",
        [],
    )
    .unwrap();
    wait_for(&mut receiver, Duration::from_secs(5), |s| {
        s.rows.get("NEW_CHECKOUT").map(String::as_str) == Some("7")
    })
    .await
    .unwrap();
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |row| row.get(0))
        .unwrap();
    assert_eq!(
        mode, "delete",
        "LiveFlags never changes the application's journal mode"
    );
}

#[tokio::test]
async fn a_database_deleted_and_created_again_or_replaced_is_followed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    drop(store_with(&path, &[("NEW_CHECKOUT", "1")]));
    let flags = LiveFlags::start(&path, woken_only());
    let mut receiver = flags.subscribe();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    wait_for(&mut receiver, Duration::from_secs(5), |s| s.error.is_some())
        .await
        .unwrap();
    drop(store_with(&path, &[("NEW_CHECKOUT", "2")]));
    wait_for(&mut receiver, Duration::from_secs(5), |s| {
        s.error.is_none() && s.rows.get("NEW_CHECKOUT").map(String::as_str) == Some("2")
    })
    .await
    .unwrap();
    // Replaced by rename (a deploy tool writing the file aside first).
    let aside = dir.path().join("app.db.new");
    drop(store_with(&aside, &[("NEW_CHECKOUT", "3")]));
    {
        // Fold the WAL into the file so the rename carries the rows.
        let conn = rusqlite::Connection::open(&aside).unwrap();
        conn.pragma_update(None, "journal_mode", "DELETE").unwrap();
    }
    std::fs::rename(&aside, &path).unwrap();
    wait_for(&mut receiver, Duration::from_secs(5), |s| {
        s.rows.get("NEW_CHECKOUT").map(String::as_str) == Some("3")
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn after_thousands_of_rapid_commits_the_last_value_is_seen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let mut store = store_with(&path, &[("NEW_CHECKOUT", "0")]);
    let flags = LiveFlags::start(&path, woken_only());
    let mut receiver = flags.subscribe();
    for i in 1..=2000 {
        store.write_once("NEW_CHECKOUT", &i.to_string()).unwrap();
    }
    wait_for(&mut receiver, Duration::from_secs(10), |s| {
        s.rows.get("NEW_CHECKOUT").map(String::as_str) == Some("2000")
    })
    .await
    .unwrap();
}
