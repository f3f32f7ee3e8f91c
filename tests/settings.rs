//! `SettingsStore` against real SQLite files in a temp dir: the kill-switch contract of
//! SPEC §4 (table created only when absent, never altered; BEGIN IMMEDIATE; busy retried
//! until the write lands; read back).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use rollbackd::appdb::settings::{Create, SettingsError, SettingsStore};
use rusqlite::Connection;

fn table_sql(path: &Path) -> Option<String> {
    let connection = Connection::open(path).unwrap();
    connection
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'settings'",
            [],
            |row| row.get(0),
        )
        .ok()
}

#[test]
fn creates_the_table_when_absent_and_leaves_the_journal_mode_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let store = SettingsStore::open(&path).unwrap();
    assert_eq!(store.path(), path);
    // SQLite's default; rollbackd never switches a database to WAL (SPEC §4).
    assert_eq!(store.journal_mode(), "delete");
    assert_eq!(
        table_sql(&path).as_deref(),
        Some("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT)")
    );
    assert!(store.read_all().unwrap().is_empty());
    assert_eq!(store.read("DISABLE_NEW").unwrap(), None);
}

#[test]
fn an_existing_table_with_other_columns_and_types_is_left_as_it_was_and_still_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let create = "CREATE TABLE settings (\n  key VARCHAR(64) NOT NULL PRIMARY KEY,\n  value INTEGER,\n  note TEXT DEFAULT 'from the app',\n  updated_at TEXT\n)";
    {
        let connection = Connection::open(&path).unwrap();
        connection.execute_batch(create).unwrap();
        connection
            .execute(
                "INSERT INTO settings (key, value, note) VALUES ('DISABLE_NEW', 0, 'kept')",
                [],
            )
            .unwrap();
    }
    let before = table_sql(&path).unwrap();

    let mut store = SettingsStore::open(&path).unwrap();
    let report = store.write_once("DISABLE_NEW", "1").unwrap();
    assert_eq!(report.previous.as_deref(), Some("0"));
    let report = store.write_once("NEW_CHECKOUT", "0").unwrap();
    assert_eq!(report.previous, None);
    drop(store);

    assert_eq!(table_sql(&path).unwrap(), before);
    let connection = Connection::open(&path).unwrap();
    // The other columns of an updated row keep their values.
    let note: String = connection
        .query_row(
            "SELECT note FROM settings WHERE key = 'DISABLE_NEW'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(note, "kept");
    let value: i64 = connection
        .query_row(
            "SELECT value FROM settings WHERE key = 'DISABLE_NEW'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(value, 1);
}

#[test]
fn write_then_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let mut store = SettingsStore::open(&path).unwrap();
    let report = store
        .write_until_landed("DISABLE_NEW", "1", |_, _| true)
        .unwrap();
    assert_eq!(report.key, "DISABLE_NEW");
    assert_eq!(report.previous, None);
    assert_eq!(report.value, "1");
    assert_eq!(report.attempts, 1);
    let report = store.write_once("DISABLE_NEW", "0").unwrap();
    assert_eq!(report.previous.as_deref(), Some("1"));
    assert_eq!(store.read("DISABLE_NEW").unwrap().as_deref(), Some("0"));

    // A fresh connection sees it: it was committed, not just cached.
    drop(store);
    let reopened = SettingsStore::open(&path).unwrap();
    assert_eq!(
        reopened.read_all().unwrap(),
        [("DISABLE_NEW".to_string(), "0".to_string())].into()
    );
}

/// Holds `BEGIN IMMEDIATE` on a second connection for `hold`, on another thread; returns
/// once the lock is held.
fn hold_write_lock(path: &Path, hold: Duration) -> std::thread::JoinHandle<()> {
    let path = path.to_path_buf();
    let locked = Arc::new(Barrier::new(2));
    let locked_in_thread = locked.clone();
    let holder = std::thread::spawn(move || {
        let connection = Connection::open(&path).unwrap();
        connection.execute_batch("BEGIN IMMEDIATE").unwrap();
        connection
            .execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES ('HOLDER', 'x')",
                [],
            )
            .unwrap();
        locked_in_thread.wait();
        std::thread::sleep(hold);
        connection.execute_batch("COMMIT").unwrap();
    });
    locked.wait();
    holder
}

#[test]
fn a_write_blocked_by_another_connection_lands_after_release() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let mut store = SettingsStore::open(&path).unwrap();
    let holder = hold_write_lock(&path, Duration::from_millis(300));

    let started = Instant::now();
    let mut n_busy_reports = 0;
    let report = store
        .write_until_landed("DISABLE_NEW", "1", |error, _waited| {
            assert!(error.is_busy(), "{error}");
            n_busy_reports += 1;
            true
        })
        .unwrap();
    holder.join().unwrap();
    assert!(report.attempts > 1, "{report:?}");
    assert_eq!(n_busy_reports, report.attempts - 1);
    assert!(report.waited >= Duration::from_millis(250), "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(store.read("DISABLE_NEW").unwrap().as_deref(), Some("1"));
    assert_eq!(store.read("HOLDER").unwrap().as_deref(), Some("x"));
}

#[test]
fn keep_waiting_returning_false_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let mut store = SettingsStore::open(&path).unwrap();
    let holder = hold_write_lock(&path, Duration::from_millis(300));

    let result = store.write_until_landed("DISABLE_NEW", "1", |_, waited| {
        waited < Duration::from_millis(50)
    });
    match result {
        Err(SettingsError::GaveUp { waited }) => {
            assert!(waited >= Duration::from_millis(50), "{waited:?}")
        }
        other => panic!("expected GaveUp, got {other:?}"),
    }
    holder.join().unwrap();
    // Nothing was left half-done: no transaction open, the write simply did not happen.
    assert_eq!(store.read("DISABLE_NEW").unwrap(), None);
    store.write_once("DISABLE_NEW", "1").unwrap();
}

#[test]
fn write_once_reports_busy_without_waiting_long() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let mut store = SettingsStore::open(&path).unwrap();
    let holder = hold_write_lock(&path, Duration::from_millis(200));
    let started = Instant::now();
    let error = store.write_once("DISABLE_NEW", "1").unwrap_err();
    assert!(error.is_busy(), "{error}");
    assert!(started.elapsed() < Duration::from_millis(150));
    holder.join().unwrap();
    store.write_once("DISABLE_NEW", "1").unwrap();
}

#[test]
fn open_waits_for_an_exclusive_lock_instead_of_failing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    // A rollback-journal database whose writer holds an exclusive lock: creating the
    // table is busy until it lets go.
    let connection = Connection::open(&path).unwrap();
    connection
        .execute_batch("CREATE TABLE other (x); BEGIN EXCLUSIVE; INSERT INTO other VALUES (1);")
        .unwrap();
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        connection.execute_batch("COMMIT").unwrap();
    });
    let started = Instant::now();
    let mut n_busy = 0;
    let store = SettingsStore::open_with_patience(&path, Create::IfMissing, |error, _| {
        assert!(error.is_busy(), "{error}");
        n_busy += 1;
        true
    })
    .unwrap();
    releaser.join().unwrap();
    assert!(n_busy > 0);
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(
        store.journal_mode(),
        "delete",
        "the journal mode is left as it was"
    );
    assert!(table_sql(&path).is_some());
}

#[test]
fn a_thousand_writes_racing_an_external_writer_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    // An application that chose WAL (rollbackd never chooses it for them): the racing
    // writer then never waits on our read-backs, only on our writes.
    Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA journal_mode = WAL", [], |row| {
            row.get::<_, String>(0)
        })
        .unwrap();
    let mut store = SettingsStore::open(&path).unwrap();
    assert_eq!(store.journal_mode(), "wal");

    let stop = Arc::new(AtomicBool::new(false));
    let external_running = Arc::new(Barrier::new(2));
    // Commits the external writer has made so far: our loop waits for it to make
    // progress every 50 writes, so the two really interleave whatever the scheduler does.
    let external_progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let external = {
        let path = path.clone();
        let stop = stop.clone();
        let external_running = external_running.clone();
        let external_progress = external_progress.clone();
        std::thread::spawn(move || {
            let connection = Connection::open(&path).unwrap();
            connection.busy_timeout(Duration::from_secs(5)).unwrap();
            let mut n_commits = 0u64;
            while !stop.load(Ordering::Relaxed) {
                connection.execute_batch("BEGIN IMMEDIATE").unwrap();
                connection
                    .execute(
                        "INSERT OR REPLACE INTO settings (key, value) VALUES (?1, ?2)",
                        (
                            format!("EXTERNAL_{}", n_commits % 50),
                            n_commits.to_string(),
                        ),
                    )
                    .unwrap();
                connection.execute_batch("COMMIT").unwrap();
                if n_commits == 0 {
                    external_running.wait();
                }
                n_commits += 1;
                external_progress.store(n_commits, Ordering::Relaxed);
            }
            n_commits
        })
    };

    external_running.wait();
    let mut n_contended = 0;
    let mut seen_progress = 0;
    for write_idx in 0..1000 {
        if write_idx % 50 == 0 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while external_progress.load(Ordering::Relaxed) == seen_progress
                && Instant::now() < deadline
            {
                std::thread::yield_now();
            }
            seen_progress = external_progress.load(Ordering::Relaxed);
        }
        let report = store
            .write_until_landed(
                &format!("OURS_{write_idx}"),
                &format!("value-{write_idx}"),
                // SQLite's lock is not fair: on a loaded 2-core machine the tight-loop
                // writer can starve us for seconds. The product waits forever; the test
                // gives it a minute.
                |_, waited| waited < Duration::from_secs(60),
            )
            .unwrap();
        if report.attempts > 1 {
            n_contended += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let n_external_commits = external.join().unwrap();
    eprintln!("external commits: {n_external_commits}, our contended writes: {n_contended}");

    let rows = store.read_all().unwrap();
    for write_idx in 0..1000 {
        assert_eq!(
            rows.get(&format!("OURS_{write_idx}")).map(String::as_str),
            Some(format!("value-{write_idx}").as_str()),
            "write {write_idx} lost"
        );
    }
    assert!(
        n_external_commits >= 20,
        "the external writer hardly ran: {n_external_commits}"
    );
}

/// Item 4 of issue 8: the journal mode is the application's, whichever it is, and a
/// missing database is created only when asked.
#[test]
fn the_journal_mode_is_never_changed_and_a_missing_file_is_created_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    // Only WAL is persistent; the rollback-journal modes are per connection.
    for mode in ["delete", "wal"] {
        let path = dir.path().join(format!("{mode}.db"));
        {
            let connection = Connection::open(&path).unwrap();
            let set: String = connection
                .query_row(&format!("PRAGMA journal_mode = {mode}"), [], |row| {
                    row.get(0)
                })
                .unwrap();
            assert_eq!(set, mode);
            connection
                .execute_batch("CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT)")
                .unwrap();
        }
        let mut store =
            SettingsStore::open_with_patience(&path, Create::Never, |_, _| true).unwrap();
        assert_eq!(store.journal_mode(), mode);
        store.write_once("DISABLE_NEW", "1").unwrap();
        let synchronous: i64 = store_synchronous(&store);
        assert_eq!(
            synchronous, 2,
            "synchronous=FULL on the writer's own connection"
        );
        drop(store);
        let found: String = Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(found, mode, "{mode} database after a write");
    }
    let missing = dir.path().join("typo.db");
    match SettingsStore::open_with_patience(&missing, Create::Never, |_, _| true) {
        Err(error @ SettingsError::Missing { .. }) => {
            let message = error.to_string();
            assert!(message.contains("typo.db"), "{message}");
            assert!(message.contains("kill_switch.create_database"), "{message}");
        }
        other => panic!("expected Missing, got {other:?}"),
    }
    assert!(!missing.exists(), "Create::Never created the file");
    SettingsStore::open_with_patience(&missing, Create::IfMissing, |_, _| true).unwrap();
    assert!(missing.exists());
}

fn store_synchronous(store: &SettingsStore) -> i64 {
    store.pragma_synchronous().unwrap()
}

#[test]
fn a_value_the_table_does_not_keep_as_written_is_a_read_back_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    {
        let connection = Connection::open(&path).unwrap();
        // An application table whose REAL column turns the text '1.50' into 1.5.
        connection
            .execute_batch("CREATE TABLE settings (key TEXT PRIMARY KEY, value REAL)")
            .unwrap();
    }
    let mut store = SettingsStore::open(&path).unwrap();
    match store.write_until_landed("RATIO", "1.50", |_, _| true) {
        Err(SettingsError::ReadBack { expected, found }) => {
            assert_eq!(expected, "1.50");
            assert_eq!(found.as_deref(), Some("1.5"));
        }
        other => panic!("expected ReadBack, got {other:?}"),
    }
    // Values the column keeps as written read back fine (the kill switch's '1' and '0').
    store.write_once("DISABLE_NEW", "1").unwrap();
}

/// Issue 8 item 8: reads match the kill key as the write does (the column's collation),
/// whatever the table declares.
#[test]
fn reads_match_keys_with_the_tables_collation_like_the_write() {
    use rollbackd::appdb::settings::SettingsReader;
    let dir = tempfile::tempdir().unwrap();
    for (collation, matches) in [("COLLATE NOCASE", true), ("", false)] {
        let path = dir.path().join(format!("{}.db", matches));
        {
            let connection = Connection::open(&path).unwrap();
            connection
                .execute_batch(&format!(
                    "CREATE TABLE settings (key TEXT {collation} PRIMARY KEY, value TEXT);
                     INSERT INTO settings VALUES ('disable_new', '0'), ('Other', 'x');"
                ))
                .unwrap();
        }
        let mut store = SettingsStore::open(&path).unwrap();
        let report = store.write_once("DISABLE_NEW", "1").unwrap();
        let reader = SettingsReader::open(&path).unwrap();
        let rows = reader.read_all_for("DISABLE_NEW").unwrap();
        assert_eq!(reader.read("DISABLE_NEW").unwrap().as_deref(), Some("1"));
        assert_eq!(rows.get("DISABLE_NEW").map(String::as_str), Some("1"));
        assert_eq!(rows.get("Other").map(String::as_str), Some("x"));
        let n_rows: i64 = Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM settings", [], |row| row.get(0))
            .unwrap();
        if matches {
            // One row, the application's, updated in place; filed under our spelling.
            assert_eq!(report.previous.as_deref(), Some("0"), "{collation}");
            assert_eq!(n_rows, 2);
            assert!(!rows.contains_key("disable_new"), "{rows:?}");
        } else {
            // BINARY: a different key, as for the write.
            assert_eq!(report.previous, None);
            assert_eq!(n_rows, 3);
            assert_eq!(rows.get("disable_new").map(String::as_str), Some("0"));
        }
    }
}
