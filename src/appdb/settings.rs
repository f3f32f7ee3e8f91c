//! The application's kill-switch store: the only code that speaks SQL to the
//! application's database (`kill_switch.database`).
//!
//! The application owns that database; rollbackd is a guest in it. So this module
//! **creates `settings(key TEXT PRIMARY KEY, value TEXT)` only when it is absent and
//! never alters an existing table** (extra columns and other column types are left
//! as they are), and it keeps every write as small as possible:
//!
//! - writes run in a `BEGIN IMMEDIATE` transaction, so the write lock is taken up front
//!   and a busy database shows up at `BEGIN`, not half-way through;
//! - the database's journal mode is the application's and is never changed (a
//!   rollback-journal database stays one: switching it to WAL would make every
//!   read-only reader that cannot create `-shm` fail); `synchronous=FULL` is set on
//!   rollbackd's own connection only, so a landed kill switch survives a power cut;
//! - the database file is created only when the caller says so ([`Create::IfMissing`],
//!   from `kill_switch.create_database`): a typo in the path must not create a database
//!   no application reads;
//! - `busy_timeout` is deliberately short ([`BUSY_TIMEOUT`]): the retry loop in
//!   [`SettingsStore::write_until_landed`], not SQLite, does the waiting, so the caller
//!   can report progress and decide how long to keep going. §7 of the spec: a busy
//!   database delays the kill switch, it never drops it;
//! - every value is read back after `COMMIT` and compared with what was written;
//! - a failure inside a transaction always rolls it back: no transaction is left open.
//!
//! A row is written with `UPDATE ... WHERE key = ?` and, when no row was updated,
//! `INSERT`. For the contract table this is exactly `INSERT OR REPLACE`; for an
//! application table with extra columns it keeps those columns' values instead of
//! resetting them (REPLACE deletes the old row first).
//!
//! Reads and writes compare keys the same way: `WHERE key = ?`, so the table's own
//! collation decides (a `key TEXT COLLATE NOCASE` column makes `DISABLE_NEW` and
//! `disable_new` the same row for the write *and* for every read, including
//! [`SettingsReader::read_all_for`], which files the row the kill key matches under the
//! kill key's configured spelling).
//!
//! [`SettingsReader`] is the read-only side used by `crate::appdb::flags` (LiveFlags): its own
//! read-only connection, `PRAGMA data_version` to notice other connections' commits, and
//! a whole-table read. Every statement is finished before returning, so a reader never
//! holds a read transaction between polls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

/// SQLite's own wait for a lock before it reports `SQLITE_BUSY`. Short on purpose: the
/// retry loops below do the waiting, with backoff and progress reports.
pub const BUSY_TIMEOUT: Duration = Duration::from_millis(10);

/// Read-only connections wait even less: a reader has nothing to report and simply
/// tries again at its next poll.
pub const READER_BUSY_TIMEOUT: Duration = Duration::from_millis(5);

/// First wait of the busy retry loop; doubles after every busy attempt.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(2);

/// Longest wait between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_millis(100);

const CREATE_TABLE_SQL: &str =
    "CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT)";
const SELECT_VALUE_SQL: &str = "SELECT value FROM settings WHERE key = ?1";
const SELECT_ALL_SQL: &str = "SELECT key, value FROM settings";
/// Every row, plus whether its key equals `?1` under the column's own collation.
const SELECT_ALL_MATCHING_SQL: &str = "SELECT key, value, key = ?1 FROM settings";
const UPDATE_VALUE_SQL: &str = "UPDATE settings SET value = ?2 WHERE key = ?1";
const INSERT_VALUE_SQL: &str = "INSERT INTO settings (key, value) VALUES (?1, ?2)";

/// Whether opening for writing may create the database file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Create {
    /// The file must exist ([`SettingsError::Missing`] otherwise): the default, since the
    /// database belongs to the application.
    Never,
    /// Create the file (and the table) when absent (`kill_switch.create_database = true`).
    IfMissing,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "the database {path} does not exist; rollbackd does not create the application's \
         database unless kill_switch.create_database = true (check kill_switch.database \
         for a typo, or create the database first)"
    )]
    Missing { path: PathBuf },
    #[error("database is busy (locked by another connection)")]
    Busy,
    #[error("gave up waiting for the database after {waited:?}")]
    GaveUp { waited: Duration },
    #[error("read back {found:?} after writing {expected:?}")]
    ReadBack {
        expected: String,
        found: Option<String>,
    },
    #[error("{context}: {source}")]
    Sqlite {
        context: &'static str,
        #[source]
        source: rusqlite::Error,
    },
}

impl SettingsError {
    /// True for a database that is busy or locked by another connection: worth retrying.
    pub fn is_busy(&self) -> bool {
        matches!(self, SettingsError::Busy)
    }

    /// Maps SQLite's busy and locked codes to [`SettingsError::Busy`], everything else
    /// to [`SettingsError::Sqlite`] with `context`.
    fn from_sqlite(context: &'static str, source: rusqlite::Error) -> SettingsError {
        match source.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => SettingsError::Busy,
            _ => SettingsError::Sqlite { context, source },
        }
    }
}

/// What a landed write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReport {
    pub key: String,
    /// The value before this write (`None`: no row, or a NULL value).
    pub previous: Option<String>,
    pub value: String,
    /// Attempts made, including the one that landed (1 when nothing was in the way).
    pub attempts: u32,
    /// Time lost to a busy database before the attempt that landed started.
    pub waited: Duration,
    /// Wall-clock time right after `COMMIT` returned (before the read-back), for audits
    /// and propagation measurements.
    pub committed_at: SystemTime,
}

/// The read-write connection to the application's database.
pub struct SettingsStore {
    path: PathBuf,
    connection: Connection,
    journal_mode: String,
}

impl std::fmt::Debug for SettingsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettingsStore")
            .field("path", &self.path)
            .field("journal_mode", &self.journal_mode)
            .finish_non_exhaustive()
    }
}

impl SettingsStore {
    /// Opens read-write, creating the file and the table if absent (the library's
    /// convenience for applications and tests; the daemon uses [`Self::open_with_patience`]
    /// with [`Create::Never`] unless configured otherwise). The journal mode is left as it
    /// is; `synchronous=FULL` on this connection. A busy database while creating the table
    /// is retried (forever, with a warning in the log every few seconds), not failed.
    pub fn open(path: &Path) -> Result<SettingsStore, SettingsError> {
        let mut next_warning = Duration::from_secs(5);
        Self::open_with_patience(path, Create::IfMissing, |error, waited| {
            if waited >= next_warning {
                tracing::warn!(path = %path.display(), ?waited, %error, "still waiting to open the settings database");
                next_warning += Duration::from_secs(5);
            }
            true
        })
    }

    /// [`Self::open`] with the same busy retry contract as [`Self::write_until_landed`]:
    /// `keep_waiting(&err, waited_so_far)` is asked before every wait, and `false` stops
    /// with [`SettingsError::GaveUp`]. With [`Create::Never`] a missing file is
    /// [`SettingsError::Missing`] and nothing is created.
    pub fn open_with_patience(
        path: &Path,
        create: Create,
        keep_waiting: impl FnMut(&SettingsError, Duration) -> bool,
    ) -> Result<SettingsStore, SettingsError> {
        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        match create {
            Create::IfMissing => flags |= OpenFlags::SQLITE_OPEN_CREATE,
            Create::Never => {
                // Without SQLITE_OPEN_CREATE SQLite cannot create the file either; this
                // check only gives the clear error.
                if matches!(std::fs::metadata(path), Err(e) if e.kind() == std::io::ErrorKind::NotFound)
                {
                    return Err(SettingsError::Missing {
                        path: path.to_path_buf(),
                    });
                }
            }
        }
        let connection =
            Connection::open_with_flags(path, flags).map_err(|source| SettingsError::Sqlite {
                context: "opening the database read-write",
                source,
            })?;
        connection
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(|source| SettingsError::Sqlite {
                context: "setting busy_timeout",
                source,
            })?;
        let (journal_mode, _report) = retry_while_busy(keep_waiting, || {
            // Only asked, never set: the journal mode is the application's.
            let journal_mode: String = connection
                .query_row("PRAGMA journal_mode", [], |row| row.get(0))
                .map_err(|e| SettingsError::from_sqlite("reading journal_mode", e))?;
            connection
                .execute_batch("PRAGMA synchronous = FULL")
                .map_err(|e| SettingsError::from_sqlite("setting synchronous=FULL", e))?;
            if !table_exists(&connection)? {
                connection
                    .execute_batch(CREATE_TABLE_SQL)
                    .map_err(|e| SettingsError::from_sqlite("creating the settings table", e))?;
            }
            Ok(journal_mode)
        })?;
        Ok(SettingsStore {
            path: path.to_path_buf(),
            connection,
            journal_mode,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database's journal mode as found (`delete`, `wal`, ...); rollbackd never changes it.
    pub fn journal_mode(&self) -> &str {
        &self.journal_mode
    }

    /// `PRAGMA synchronous` of this connection (2: FULL).
    pub fn pragma_synchronous(&self) -> Result<i64, SettingsError> {
        self.connection
            .query_row("PRAGMA synchronous", [], |row| row.get(0))
            .map_err(|e| SettingsError::from_sqlite("reading PRAGMA synchronous", e))
    }

    /// The value under `key`; `None` when there is no row or its value is NULL.
    pub fn read(&self, key: &str) -> Result<Option<String>, SettingsError> {
        read_value(&self.connection, key)
    }

    /// Every row with a non-NULL value.
    pub fn read_all(&self) -> Result<BTreeMap<String, String>, SettingsError> {
        read_all_rows(&self.connection)
    }

    /// One attempt: BEGIN IMMEDIATE, read previous, write, COMMIT, read back.
    /// A busy database gives [`SettingsError::Busy`] with nothing changed.
    pub fn write_once(&mut self, key: &str, value: &str) -> Result<WriteReport, SettingsError> {
        let (previous, committed_at) = self.write_transaction(key, value)?;
        self.verify(key, value)?;
        Ok(WriteReport {
            key: key.to_string(),
            previous,
            value: value.to_string(),
            attempts: 1,
            waited: Duration::ZERO,
            committed_at,
        })
    }

    /// Retries busy/locked with backoff (starting at [`FIRST_BACKOFF`], doubling, capped
    /// at [`MAX_BACKOFF`]). Before each wait calls `keep_waiting(&err, waited_so_far)`;
    /// returning false stops with [`SettingsError::GaveUp`]. Non-busy errors return at once.
    ///
    /// Only the transaction is retried; once it has committed, a busy read-back is
    /// retried on its own (never by writing again), under the same `keep_waiting`.
    pub fn write_until_landed(
        &mut self,
        key: &str,
        value: &str,
        mut keep_waiting: impl FnMut(&SettingsError, Duration) -> bool,
    ) -> Result<WriteReport, SettingsError> {
        let ((previous, committed_at), retries) =
            retry_while_busy(&mut keep_waiting, || self.write_transaction(key, value))?;
        retry_while_busy(&mut keep_waiting, || self.verify(key, value))?;
        Ok(WriteReport {
            key: key.to_string(),
            previous,
            value: value.to_string(),
            attempts: retries.attempts,
            waited: retries.waited,
            committed_at,
        })
    }

    /// Reads `key` back after a commit; anything but `value` is [`SettingsError::ReadBack`].
    fn verify(&self, key: &str, value: &str) -> Result<(), SettingsError> {
        let found = self.read(key)?;
        if found.as_deref() != Some(value) {
            return Err(SettingsError::ReadBack {
                expected: value.to_string(),
                found,
            });
        }
        Ok(())
    }

    /// The transaction of [`Self::write_once`]; rolls back on any failure inside it.
    fn write_transaction(
        &mut self,
        key: &str,
        value: &str,
    ) -> Result<(Option<String>, SystemTime), SettingsError> {
        self.connection
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| SettingsError::from_sqlite("beginning the write transaction", e))?;
        let result = (|| {
            let previous = read_value(&self.connection, key)?;
            let n_updated = self
                .connection
                .prepare_cached(UPDATE_VALUE_SQL)
                .and_then(|mut statement| statement.execute((key, value)))
                .map_err(|e| SettingsError::from_sqlite("updating the setting", e))?;
            if n_updated == 0 {
                self.connection
                    .prepare_cached(INSERT_VALUE_SQL)
                    .and_then(|mut statement| statement.execute((key, value)))
                    .map_err(|e| SettingsError::from_sqlite("inserting the setting", e))?;
            }
            self.connection
                .execute_batch("COMMIT")
                .map_err(|e| SettingsError::from_sqlite("committing the write", e))?;
            Ok((previous, SystemTime::now()))
        })();
        if result.is_err() && !self.connection.is_autocommit() {
            // A failed COMMIT (e.g. busy) leaves the transaction open: never leave it so.
            if let Err(error) = self.connection.execute_batch("ROLLBACK") {
                tracing::warn!(path = %self.path.display(), %error, "rolling back a failed settings write failed");
            }
        }
        result
    }
}

/// A read-only connection to the application's database, for LiveFlags and
/// `flags get`. Never writes, never creates the file, never holds a transaction
/// between calls.
pub struct SettingsReader {
    path: PathBuf,
    connection: Connection,
}

impl std::fmt::Debug for SettingsReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SettingsReader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SettingsReader {
    /// Opens `path` read-only (`SQLITE_OPEN_READ_ONLY`); fails when the file is absent.
    pub fn open(path: &Path) -> Result<SettingsReader, SettingsError> {
        let connection = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY
                | OpenFlags::SQLITE_OPEN_URI
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| SettingsError::Sqlite {
            context: "opening the database read-only",
            source,
        })?;
        connection
            .busy_timeout(READER_BUSY_TIMEOUT)
            .map_err(|source| SettingsError::Sqlite {
                context: "setting busy_timeout",
                source,
            })?;
        Ok(SettingsReader {
            path: path.to_path_buf(),
            connection,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `PRAGMA data_version`: changes whenever another connection has committed since
    /// the previous call on this connection. Cheap (no table is read).
    pub fn data_version(&self) -> Result<i64, SettingsError> {
        let version = self
            .connection
            .prepare_cached("PRAGMA data_version")
            .and_then(|mut statement| statement.query_row([], |row| row.get(0)))
            .map_err(|e| SettingsError::from_sqlite("reading PRAGMA data_version", e));
        debug_assert!(self.connection.is_autocommit());
        version
    }

    /// [`SettingsReader::data_version`] without waiting on a busy database: a busy error
    /// at once rather than SQLite's busy handler sleeping a millisecond or more. LiveFlags
    /// asks right when a commit's writes wake it, which is exactly when a reader can find
    /// the WAL index busy for a few microseconds; it asks again shortly instead.
    pub fn data_version_now(&self) -> Result<i64, SettingsError> {
        let set = |timeout| {
            self.connection
                .busy_timeout(timeout)
                .map_err(|e| SettingsError::from_sqlite("setting busy_timeout", e))
        };
        set(Duration::ZERO)?;
        let version = self.data_version();
        set(READER_BUSY_TIMEOUT)?;
        version
    }

    /// Every row with a non-NULL value.
    pub fn read_all(&self) -> Result<BTreeMap<String, String>, SettingsError> {
        let rows = read_all_rows(&self.connection);
        debug_assert!(self.connection.is_autocommit());
        rows
    }

    /// Every row with a non-NULL value, the row that `key` matches under the table's
    /// collation (what `WHERE key = ?` and therefore the writer find) filed under `key`
    /// as spelled by the caller. For a `COLLATE NOCASE` key column a row `disable_new`
    /// is returned as `DISABLE_NEW` when `key` is `DISABLE_NEW`.
    pub fn read_all_for(&self, key: &str) -> Result<BTreeMap<String, String>, SettingsError> {
        let rows = read_all_rows_for(&self.connection, key);
        debug_assert!(self.connection.is_autocommit());
        rows
    }

    /// The value under `key` (`WHERE key = ?`, as the writer matches it); `None` when
    /// there is no row or its value is NULL.
    pub fn read(&self, key: &str) -> Result<Option<String>, SettingsError> {
        let value = read_value(&self.connection, key);
        debug_assert!(self.connection.is_autocommit());
        value
    }
}

/// How many attempts a retry loop made and how long it waited before the last one.
#[derive(Debug, Clone, Copy)]
struct Retries {
    attempts: u32,
    waited: Duration,
}

/// Runs `attempt` until it returns anything but [`SettingsError::Busy`], with backoff.
fn retry_while_busy<T>(
    mut keep_waiting: impl FnMut(&SettingsError, Duration) -> bool,
    mut attempt: impl FnMut() -> Result<T, SettingsError>,
) -> Result<(T, Retries), SettingsError> {
    let started = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0u32;
    loop {
        let waited = started.elapsed();
        attempts += 1;
        match attempt() {
            Ok(value) => return Ok((value, Retries { attempts, waited })),
            Err(error) if error.is_busy() => {
                let waited = started.elapsed();
                if !keep_waiting(&error, waited) {
                    return Err(SettingsError::GaveUp { waited });
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(error) => return Err(error),
        }
    }
}

fn read_value(connection: &Connection, key: &str) -> Result<Option<String>, SettingsError> {
    let mut statement = connection
        .prepare_cached(SELECT_VALUE_SQL)
        .map_err(|e| SettingsError::from_sqlite("preparing the settings read", e))?;
    let value = statement
        .query_row([key], |row| Ok(value_as_text(row.get_ref(0)?)))
        .optional()
        .map_err(|e| SettingsError::from_sqlite("reading the setting", e))?;
    Ok(value.flatten())
}

fn table_exists(connection: &Connection) -> Result<bool, SettingsError> {
    connection
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'settings'",
            [],
            |_| Ok(()),
        )
        .optional()
        .map(|found| found.is_some())
        .map_err(|e| SettingsError::from_sqlite("looking for the settings table", e))
}

fn read_all_rows_for(
    connection: &Connection,
    key: &str,
) -> Result<BTreeMap<String, String>, SettingsError> {
    let mut statement = connection
        .prepare_cached(SELECT_ALL_MATCHING_SQL)
        .map_err(|e| SettingsError::from_sqlite("preparing the settings read", e))?;
    let mut rows = statement
        .query([key])
        .map_err(|e| SettingsError::from_sqlite("reading the settings table", e))?;
    let mut settings = BTreeMap::new();
    // The value of the first row `key` matches, preferring the exact spelling.
    let mut matched: Option<(bool, Option<String>)> = None;
    while let Some(row) = rows
        .next()
        .map_err(|e| SettingsError::from_sqlite("reading the settings table", e))?
    {
        let row_key = row
            .get_ref(0)
            .map_err(|e| SettingsError::from_sqlite("reading a settings key", e))?;
        let value = row
            .get_ref(1)
            .map_err(|e| SettingsError::from_sqlite("reading a settings value", e))?;
        let is_match = row
            .get::<_, Option<bool>>(2)
            .map_err(|e| SettingsError::from_sqlite("comparing a settings key", e))?
            .unwrap_or(false);
        let (Some(row_key), value) = (value_as_text(row_key), value_as_text(value)) else {
            continue;
        };
        if is_match {
            let exact = row_key == key;
            if matched
                .as_ref()
                .is_none_or(|(was_exact, _)| exact && !was_exact)
            {
                matched = Some((exact, value));
            }
            continue;
        }
        if let Some(value) = value {
            settings.insert(row_key, value);
        }
    }
    if let Some((_, Some(value))) = matched {
        settings.insert(key.to_owned(), value);
    }
    Ok(settings)
}

fn read_all_rows(connection: &Connection) -> Result<BTreeMap<String, String>, SettingsError> {
    let mut statement = connection
        .prepare_cached(SELECT_ALL_SQL)
        .map_err(|e| SettingsError::from_sqlite("preparing the settings read", e))?;
    let mut rows = statement
        .query([])
        .map_err(|e| SettingsError::from_sqlite("reading the settings table", e))?;
    let mut settings = BTreeMap::new();
    while let Some(row) = rows
        .next()
        .map_err(|e| SettingsError::from_sqlite("reading the settings table", e))?
    {
        let key = row
            .get_ref(0)
            .map_err(|e| SettingsError::from_sqlite("reading a settings key", e))?;
        let value = row
            .get_ref(1)
            .map_err(|e| SettingsError::from_sqlite("reading a settings value", e))?;
        if let (Some(key), Some(value)) = (value_as_text(key), value_as_text(value)) {
            settings.insert(key, value);
        }
    }
    Ok(settings)
}

/// The text of a value whatever the column's declared type (an application table may
/// declare `value INTEGER`, which stores `'1'` as the integer 1). NULL is no value.
fn value_as_text(value: ValueRef<'_>) -> Option<String> {
    match value {
        ValueRef::Null => None,
        ValueRef::Integer(integer) => Some(integer.to_string()),
        ValueRef::Real(real) => Some(real.to_string()),
        ValueRef::Text(text) | ValueRef::Blob(text) => {
            Some(String::from_utf8_lossy(text).into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_and_locked_codes_are_busy() {
        for code in [rusqlite::ffi::SQLITE_BUSY, rusqlite::ffi::SQLITE_LOCKED] {
            let error = SettingsError::from_sqlite(
                "test",
                rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None),
            );
            assert!(error.is_busy(), "{code}: {error}");
        }
        let error = SettingsError::from_sqlite(
            "test",
            rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                None,
            ),
        );
        assert!(!error.is_busy());
    }

    #[test]
    fn values_of_any_storage_class_read_as_text() {
        assert_eq!(value_as_text(ValueRef::Null), None);
        assert_eq!(value_as_text(ValueRef::Integer(1)).as_deref(), Some("1"));
        assert_eq!(value_as_text(ValueRef::Real(0.5)).as_deref(), Some("0.5"));
        assert_eq!(value_as_text(ValueRef::Text(b"on")).as_deref(), Some("on"));
        assert_eq!(value_as_text(ValueRef::Blob(b"1")).as_deref(), Some("1"));
    }

    #[test]
    fn backoff_gives_up_when_told() {
        let mut asked = 0;
        let result: Result<((), Retries), _> = retry_while_busy(
            |error, _| {
                assert!(error.is_busy());
                asked += 1;
                asked < 3
            },
            || Err(SettingsError::Busy),
        );
        assert!(matches!(result, Err(SettingsError::GaveUp { .. })));
        assert_eq!(asked, 3);
    }
}
