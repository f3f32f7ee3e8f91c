//! The daemon's own SQLite state, `state_dir/rollbackd.db`: monitoring sessions, the checks
//! taken in them, the actions (rollbacks, escalations) with the phase
//! each one reached, an outbox of audit records waiting for a writable disk, and a small
//! key/value table. **This is the only code that speaks SQL to it.**
//!
//! Why it exists: the daemon restarts (crash, `kill -9`, reboot) into the same session
//! and window, and resumes an action in flight instead of starting a second one. So an
//! action's intent is written here before its first side effect, and every phase it
//! completes is written before the next one starts.
//!
//! The API is blocking (rusqlite); callers run it on a dedicated or blocking thread. The
//! database is in WAL mode with `synchronous=FULL` (a committed row survives power loss),
//! writes take the lock up front with `BEGIN IMMEDIATE` (no deadlock-prone lock upgrade
//! between the daemon and a CLI), and a busy database is waited on for up to
//! [`BUSY_TIMEOUT`]. The schema evolves through the numbered [`MIGRATIONS`], tracked in
//! `PRAGMA user_version`, each applied in its own transaction.
//!
//! States, kinds and phases are the enums of `core::states`, stored as their names
//! (`ToSql`/`FromSql` below); no caller compares strings.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Row, ToSql, Transaction, TransactionBehavior,
};

pub use crate::storage::states::{ActionKind, ActionState, ActionTrigger, Phase, SessionState};

/// How long a statement waits for another connection's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations; `MIGRATIONS[i]` moves `user_version` from `i` to `i + 1`. Append
/// only: never edit an entry once it has shipped.
pub const MIGRATIONS: &[&str] = &[
    // v1
    "CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        active TEXT NOT NULL,
        previous TEXT,
        promoted_at_ms INTEGER NOT NULL,
        state TEXT NOT NULL,
        paused INTEGER NOT NULL DEFAULT 0,
        pause_reason TEXT,
        baseline_json TEXT,
        operator TEXT,
        ended_at_ms INTEGER,
        end_reason TEXT
    );
    CREATE INDEX sessions_open ON sessions(promoted_at_ms) WHERE ended_at_ms IS NULL;
    CREATE TABLE checks (
        session_id TEXT NOT NULL,
        check_index INTEGER NOT NULL,
        taken_at_ms INTEGER NOT NULL,
        check_json TEXT NOT NULL,
        verdict TEXT NOT NULL,
        failed INTEGER NOT NULL,
        PRIMARY KEY (session_id, check_index)
    );
    CREATE INDEX checks_failed_at ON checks(taken_at_ms) WHERE failed = 1;
    CREATE TABLE actions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session_id TEXT,
        kind TEXT NOT NULL,
        trigger TEXT NOT NULL,
        state TEXT NOT NULL,
        phase TEXT,
        attempt INTEGER NOT NULL DEFAULT 1,
        from_worker TEXT,
        to_worker TEXT,
        reason TEXT NOT NULL,
        operator TEXT,
        started_at_ms INTEGER NOT NULL,
        updated_at_ms INTEGER NOT NULL,
        finished_at_ms INTEGER,
        artifact_name TEXT,
        detail_json TEXT
    );
    CREATE INDEX actions_kind_started ON actions(kind, started_at_ms);
    CREATE INDEX actions_session ON actions(session_id);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        name TEXT,
        payload TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL
    );
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );",
    // v2: the hook an action is running, recorded before it starts (token) and right
    // after (process group, its leader's start time, the boot it ran in), so a restart
    // after kill -9 can find an orphaned hook and wait for or stop it before running the
    // phase again. One row per action: an action runs one hook at a time.
    "CREATE TABLE hook_runs (
        action_id INTEGER PRIMARY KEY,
        phase TEXT NOT NULL,
        token TEXT NOT NULL,
        started_at_ms INTEGER NOT NULL,
        boot_id TEXT,
        pgid INTEGER,
        leader_start_ticks INTEGER
    );",
    // v3: observations of the active version between sessions, for the next promotion's
    // automatic baseline (SPEC §2a). Bounded on insert (by age and by count).
    "CREATE TABLE observations (
        id INTEGER PRIMARY KEY,
        taken_at_ms INTEGER NOT NULL,
        worker TEXT NOT NULL,
        observation_json TEXT NOT NULL
    );
    CREATE INDEX observations_by_time ON observations (taken_at_ms);",
    // v4: the stability watch after a verified rollback (issue 13): when it began, what it
    // watches, how it ended (`core::supervisor::Stability` as JSON; NULL: no watch).
    "ALTER TABLE sessions ADD COLUMN stability_json TEXT;",
];

/// The stored names are the pure enums of `core::states`; this is how they are spelt in
/// SQL. A name this build does not know fails to convert (the schema version guards
/// against newer writers, so that is a hand-edited or damaged row), except a session's
/// state, which [`session_from_row`] reads leniently.
macro_rules! stored_as_text {
    ($($name:ident),+) => {$(
        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                let text = value.as_str()?;
                $name::parse(text).ok_or_else(|| {
                    FromSqlError::Other(
                        format!(concat!("unknown ", stringify!($name), " {:?} in rollbackd.db"), text)
                            .into(),
                    )
                })
            }
        }
    )+};
}

stored_as_text!(SessionState, ActionKind, ActionTrigger, ActionState, Phase);

/// Outbox kinds (`outbox.kind`).
pub const OUTBOX_AUDIT: &str = "audit";
pub const OUTBOX_KILL_SWITCH: &str = "kill-switch";
pub const OUTBOX_ARTIFACT: &str = "artifact";
pub const OUTBOX_WORKER_MANAGER: &str = "worker-manager";
pub const OUTBOX_REPORT: &str = "incident-report";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {} does not exist", .0.display())]
    NotFound(PathBuf),
    #[error("cannot create the directory of the state database {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state database schema version {found} is newer than this rollbackd understands ({known})"
    )]
    SchemaTooNew { found: i64, known: usize },
    #[error("state database schema version {found} is older than {known}; start the daemon once to migrate it")]
    SchemaTooOld { found: i64, known: usize },
    #[error("no {table} row with id {id}")]
    NoSuchRow { table: &'static str, id: String },
    #[error("state database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing the state database {}: {reason}. It holds the monitoring session, so rollbackd will not start fresh over it. If you accept that the session is lost (check `rollbackd audit tail` and the canary by hand first), move it aside with its -wal and -shm files (mv {}* /some/where/) and start again", .path.display(), .path.display())]
    Unusable { path: PathBuf, reason: String },
    #[error("refusing the state database: {} is a symlink; rollbackd never follows links in its state directory (remove it after finding out who put it there)", .0.display())]
    Symlink(PathBuf),
}

/// The database and its `-wal`, `-shm` and `-journal` files must not be symlinks: SQLite
/// opens the side files by name, and `SQLITE_OPEN_NOFOLLOW` covers only the main file.
fn refuse_symlinks(path: &Path) -> Result<(), StoreError> {
    let name = path.as_os_str().to_owned();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut candidate = name.clone();
        candidate.push(suffix);
        let candidate = PathBuf::from(candidate);
        if std::fs::symlink_metadata(&candidate).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(StoreError::Symlink(candidate));
        }
    }
    Ok(())
}

/// One monitoring session (one promotion).
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub id: String,
    pub active: String,
    pub previous: Option<String>,
    /// Unix time in milliseconds.
    pub promoted_at_ms: i64,
    pub state: SessionState,
    pub paused: bool,
    pub pause_reason: Option<String>,
    pub baseline_json: Option<String>,
    pub operator: Option<String>,
    pub ended_at_ms: Option<i64>,
    pub end_reason: Option<String>,
    /// The stability watch (`core::supervisor::Stability`), once one began.
    pub stability_json: Option<String>,
}

/// One check taken in a session.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckRow {
    pub session_id: String,
    pub check_index: i64,
    pub taken_at_ms: i64,
    pub check_json: String,
    pub verdict: String,
    /// The check had a problem: the probe failed, or the error rate was not ok.
    pub failed: bool,
}

/// An action about to start; `updated_at_ms` starts equal to `started_at_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAction {
    pub session_id: Option<String>,
    pub kind: ActionKind,
    pub trigger: ActionTrigger,
    pub state: ActionState,
    pub phase: Option<Phase>,
    pub attempt: u32,
    pub from_worker: Option<String>,
    pub to_worker: Option<String>,
    pub reason: String,
    pub operator: Option<String>,
    pub started_at_ms: i64,
    pub detail_json: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActionRow {
    /// Its row id; always set for an action read from `rollbackd.db`. `None` only for an
    /// action carried out although its intent could not be recorded (a full disk): then
    /// nothing of it is saved, and a restart cannot resume it.
    pub id: Option<ActionId>,
    pub session_id: Option<String>,
    pub kind: ActionKind,
    pub trigger: ActionTrigger,
    pub state: ActionState,
    pub phase: Option<Phase>,
    pub attempt: u32,
    pub from_worker: Option<String>,
    pub to_worker: Option<String>,
    pub reason: String,
    pub operator: Option<String>,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub artifact_name: Option<String>,
    pub detail_json: Option<String>,
}

const INSERT_CHECK: &str = concat!(
    "INSERT OR IGNORE INTO checks (",
    "session_id, check_index, taken_at_ms, check_json, verdict, failed",
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
);

/// At most this many of a session's checks (the newest) go into its incident report.
pub const INCIDENT_MAX_CHECKS: usize = 20_000;

/// What [`Store::incident_facts`] found: the rows an incident report is made from
/// (`daemon::incident` turns them into `core::incident::Facts`).
#[derive(Debug, Clone, PartialEq)]
pub struct IncidentRows {
    pub session: Option<SessionRow>,
    pub checks: Vec<CheckRow>,
    pub actions: Vec<ActionRow>,
}

/// An action's row id in `rollbackd.db`.
pub type ActionId = i64;

/// The hook an action was running (`hook_runs`); see [`MIGRATIONS`] v2.
#[derive(Debug, Clone, PartialEq)]
pub struct HookRunRow {
    pub action_id: i64,
    pub phase: Phase,
    /// Put in the hook's environment as `ROLLBACKD_HOOK_RUN`.
    pub token: String,
    pub started_at_ms: i64,
    pub boot_id: Option<String>,
    /// Set once the hook was spawned: its process group (the leader's pid).
    pub pgid: Option<i32>,
    /// The leader's start time in clock ticks since boot (`/proc/PID/stat` field 22).
    pub leader_start_ticks: Option<u64>,
}

/// A record waiting to be written to `analytics/`.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub kind: String,
    pub name: Option<String>,
    pub payload: String,
    pub created_at_ms: i64,
}

const SESSION_COLUMNS: &str = "id, active, previous, promoted_at_ms, state, paused, pause_reason, \
     baseline_json, operator, ended_at_ms, end_reason, stability_json";

const CHECK_COLUMNS: &str = "session_id, check_index, taken_at_ms, check_json, verdict, failed";

const ACTION_COLUMNS: &str = "id, session_id, kind, trigger, state, phase, attempt, from_worker, \
     to_worker, reason, operator, started_at_ms, updated_at_ms, finished_at_ms, artifact_name, \
     detail_json";

fn session_from_row(row: &Row) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        id: row.get(0)?,
        active: row.get(1)?,
        previous: row.get(2)?,
        promoted_at_ms: row.get(3)?,
        state: {
            // A state this build does not know is resumed as monitoring: checks go on.
            let text: String = row.get(4)?;
            SessionState::parse(&text).unwrap_or_else(|| {
                tracing::warn!(state = %text, "unknown session state in rollbackd.db; treating it as monitoring");
                SessionState::Monitoring
            })
        },
        paused: row.get(5)?,
        pause_reason: row.get(6)?,
        baseline_json: row.get(7)?,
        operator: row.get(8)?,
        ended_at_ms: row.get(9)?,
        end_reason: row.get(10)?,
        stability_json: row.get(11)?,
    })
}

fn check_from_row(row: &Row) -> rusqlite::Result<CheckRow> {
    Ok(CheckRow {
        session_id: row.get(0)?,
        check_index: row.get(1)?,
        taken_at_ms: row.get(2)?,
        check_json: row.get(3)?,
        verdict: row.get(4)?,
        failed: row.get(5)?,
    })
}

fn action_from_row(row: &Row) -> rusqlite::Result<ActionRow> {
    Ok(ActionRow {
        id: Some(row.get(0)?),
        session_id: row.get(1)?,
        kind: row.get(2)?,
        trigger: row.get(3)?,
        state: row.get(4)?,
        phase: row.get(5)?,
        attempt: row.get(6)?,
        from_worker: row.get(7)?,
        to_worker: row.get(8)?,
        reason: row.get(9)?,
        operator: row.get(10)?,
        started_at_ms: row.get(11)?,
        updated_at_ms: row.get(12)?,
        finished_at_ms: row.get(13)?,
        artifact_name: row.get(14)?,
        detail_json: row.get(15)?,
    })
}

fn outbox_from_row(row: &Row) -> rusqlite::Result<OutboxRow> {
    Ok(OutboxRow {
        id: row.get(0)?,
        kind: row.get(1)?,
        name: row.get(2)?,
        payload: row.get(3)?,
        created_at_ms: row.get(4)?,
    })
}

/// Which ended sessions [`Store::prune_sessions`] deletes (times in ms since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneRule {
    /// Sessions that ended before this go (now − `retention.sessions`).
    pub ended_before_ms: i64,
    /// Of the ended sessions, at most this many of the newest are kept.
    pub keep_newest: usize,
    /// Sessions that ended at or after this always stay, whatever the count (now − what
    /// loop protection and the kill-switch reset still read).
    pub never_after_ms: i64,
}

/// What one prune deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub sessions: usize,
    pub checks: usize,
    pub actions: usize,
}

/// A connection to `rollbackd.db`.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    /// The path opened, and the device and inode it named then: a database deleted or
    /// replaced under a running daemon is noticed ([`Store::replaced`]) and restored.
    path: PathBuf,
    id: Option<(u64, u64)>,
    /// The connection is at `synchronous=NORMAL`: a check was its last write. Every other
    /// write puts `FULL` back before it begins ([`Store::write`]), so checks in a row
    /// switch nothing (each switch re-prepares a `PRAGMA`, which showed in the profile).
    sync_normal: bool,
}

/// Device and inode of `path` itself (never followed).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A fresh database is created only where none exists. An existing empty file (what a
/// `kill -9` or a full disk can leave) or a file without our schema next to a `-wal`, or a
/// `-wal` without its database, is someone's lost session, not a fresh start.
fn refuse_unusable(path: &Path) -> Result<(), StoreError> {
    let unusable = |reason: String| StoreError::Unusable {
        path: path.to_path_buf(),
        reason,
    };
    let wal = side_file(path, "-wal");
    let wal_exists = std::fs::symlink_metadata(&wal).is_ok();
    match std::fs::symlink_metadata(path) {
        Err(_) if wal_exists => Err(unusable(format!(
            "it is missing but {} exists (the database was deleted or moved)",
            wal.display()
        ))),
        Err(_) => Ok(()),
        Ok(metadata) if metadata.len() == 0 => Err(unusable(
            "the file is empty (0 bytes), as a crash or a full disk can leave it".to_string(),
        )),
        Ok(_) => Ok(()),
    }
}

impl Store {
    /// Opens (creating it and its directory if needed) and migrates the database.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::storage::statedir::create_dir(parent).map_err(|source| {
                StoreError::CreateDir {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        }
        refuse_symlinks(path)?;
        refuse_unusable(path)?;
        if std::fs::symlink_metadata(path).is_err() {
            create_fresh(path)?;
        }
        // Checked again: it may have been created since, by us or by a concurrent opener.
        refuse_symlinks(path)?;
        refuse_unusable(path)?;
        let existed = true;
        let conn = open_read_write(path)?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
            id: file_id(path),
            sync_normal: false,
        };
        if existed && store.schema_version()? == 0 && side_file(path, "-wal").exists() {
            return Err(StoreError::Unusable {
                path: path.to_path_buf(),
                reason: "it has no rollbackd schema although a -wal file exists next to it"
                    .to_string(),
            });
        }
        store.migrate()?;
        Ok(store)
    }

    /// Whether the path opened no longer names the open database: deleted (`rm`) or
    /// replaced (another file moved over it) while the daemon runs. One `lstat`.
    pub fn replaced(&self) -> bool {
        self.id.is_some() && file_id(&self.path) != self.id
    }

    /// Puts the open database's contents back under its path after [`Store::replaced`]:
    /// a consistent copy (`VACUUM INTO`) is written next to it, whatever now stands at the
    /// path is moved aside to `<name>.replaced-<unix ms>` (with its `-wal`/`-shm`), the copy
    /// is renamed into place and reopened. Returns where a replacement went, if any.
    pub fn restore(&mut self) -> Result<Option<PathBuf>, StoreError> {
        let temp = side_file(&self.path, &format!(".restore-{}", std::process::id()));
        let _ = std::fs::remove_file(&temp);
        self.set_synchronous_normal(false)?;
        self.conn
            .execute("VACUUM INTO ?1", [temp.to_string_lossy().into_owned()])?;
        // Close the old connection first: it checkpoints and removes its own -wal by
        // name, and a new connection must never meet the old database's WAL.
        let old = std::mem::replace(&mut self.conn, Connection::open_in_memory()?);
        drop(old);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let mut moved = None;
        for suffix in ["", "-wal", "-shm"] {
            let from = side_file(&self.path, suffix);
            if std::fs::symlink_metadata(&from).is_ok() {
                let to = side_file(&self.path, &format!(".replaced-{stamp}{suffix}"));
                std::fs::rename(&from, &to).map_err(|source| StoreError::Io {
                    path: from.clone(),
                    source,
                })?;
                if suffix.is_empty() {
                    moved = Some(to);
                }
            }
        }
        std::fs::rename(&temp, &self.path).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })?;
        if let Some(dir) = self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        self.conn = open_read_write(&self.path)?;
        self.sync_normal = false;
        self.id = file_id(&self.path);
        Ok(moved)
    }

    /// Opens an existing database read-only, for CLI queries: no migration, nothing
    /// created. A missing file is [`StoreError::NotFound`].
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        refuse_symlinks(path)?;
        if !path.is_file() {
            return Err(StoreError::NotFound(path.to_path_buf()));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let conn = Connection::open_with_flags(path, flags)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
        let conn_path = path.to_path_buf();
        let known = MIGRATIONS.len();
        if found < known as i64 {
            return Err(StoreError::SchemaTooOld { found, known });
        }
        if found > known as i64 {
            return Err(StoreError::SchemaTooNew { found, known });
        }
        Ok(Store {
            conn,
            id: file_id(&conn_path),
            path: conn_path,
            sync_normal: false,
        })
    }

    /// The schema version recorded in the database.
    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |row| row.get(0))?)
    }

    fn migrate(&mut self) -> Result<(), StoreError> {
        let known = MIGRATIONS.len();
        loop {
            let tx = self.write()?;
            // Read inside the write lock: a second process migrating at the same moment
            // waits here, then sees the new version and applies nothing twice.
            let found: i64 = tx.pragma_query_value(None, "user_version", |row| row.get(0))?;
            if found > known as i64 {
                return Err(StoreError::SchemaTooNew { found, known });
            }
            let Some(migration) = MIGRATIONS.get(found as usize) else {
                return Ok(());
            };
            tx.execute_batch(migration)?;
            tx.pragma_update(None, "user_version", found + 1)?;
            tx.commit()?;
        }
    }

    /// A write transaction holding the write lock from its start.
    /// Begins a write transaction at `synchronous=FULL` (sessions, actions, the outbox:
    /// everything but a check).
    fn write(&mut self) -> Result<Transaction<'_>, StoreError> {
        self.set_synchronous_normal(false)?;
        Ok(self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?)
    }

    /// Runs one statement in a write transaction; `Ok(false)` when it changed no row.
    fn write_one(&mut self, sql: &str, params: impl rusqlite::Params) -> Result<bool, StoreError> {
        let tx = self.write()?;
        // Cached: the same few statements run every check; parsing them each time showed
        // in the daemon's CPU profile.
        let changed = tx.prepare_cached(sql)?.execute(params)?;
        tx.commit()?;
        Ok(changed > 0)
    }

    /// Puts the connection at `synchronous=NORMAL` (`true`) or `FULL`, unless it is there
    /// already. Only between transactions.
    fn set_synchronous_normal(&mut self, normal: bool) -> Result<(), StoreError> {
        if self.sync_normal == normal {
            return Ok(());
        }
        let sql = if normal {
            "PRAGMA synchronous = NORMAL"
        } else {
            "PRAGMA synchronous = FULL"
        };
        self.conn.execute_batch(sql)?;
        self.sync_normal = normal;
        Ok(())
    }

    // --- sessions ------------------------------------------------------------------------

    pub fn insert_session(&mut self, s: &SessionRow) -> Result<(), StoreError> {
        self.write_one(
            &format!(
                "INSERT INTO sessions ({SESSION_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"
            ),
            params![
                s.id,
                s.active,
                s.previous,
                s.promoted_at_ms,
                s.state,
                s.paused,
                s.pause_reason,
                s.baseline_json,
                s.operator,
                s.ended_at_ms,
                s.end_reason,
                s.stability_json,
            ],
        )?;
        Ok(())
    }

    /// The newest session that has not ended.
    pub fn current_session(&self) -> Result<Option<SessionRow>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions WHERE ended_at_ms IS NULL \
                     ORDER BY promoted_at_ms DESC, rowid DESC LIMIT 1"
                ),
                [],
                session_from_row,
            )
            .optional()?)
    }

    pub fn session(&self, id: &str) -> Result<Option<SessionRow>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"),
                [id],
                session_from_row,
            )
            .optional()?)
    }

    /// Sets the session's state; with `ended = Some((at_ms, reason))` also ends it.
    pub fn update_session_state(
        &mut self,
        id: &str,
        state: SessionState,
        ended: Option<(i64, &str)>,
    ) -> Result<(), StoreError> {
        let changed = match ended {
            None => self.write_one(
                "UPDATE sessions SET state = ?2 WHERE id = ?1",
                params![id, state],
            )?,
            Some((at_ms, reason)) => self.write_one(
                "UPDATE sessions SET state = ?2, ended_at_ms = ?3, end_reason = ?4 WHERE id = ?1",
                params![id, state, at_ms, reason],
            )?,
        };
        require_row(changed, "sessions", id)
    }

    /// Records the session's stability watch (as it began, then as it ended).
    pub fn set_stability(&mut self, id: &str, stability_json: &str) -> Result<(), StoreError> {
        let changed = self.write_one(
            "UPDATE sessions SET stability_json = ?2 WHERE id = ?1",
            params![id, stability_json],
        )?;
        require_row(changed, "sessions", id)
    }

    /// Pauses or resumes automatic actions for the session.
    pub fn set_paused(
        &mut self,
        id: &str,
        paused: bool,
        reason: Option<&str>,
    ) -> Result<(), StoreError> {
        let changed = self.write_one(
            "UPDATE sessions SET paused = ?2, pause_reason = ?3 WHERE id = ?1",
            params![id, paused, reason],
        )?;
        require_row(changed, "sessions", id)
    }

    // --- checks --------------------------------------------------------------------------

    /// Records a check. Idempotent: a check already recorded under the same
    /// `(session_id, check_index)` is kept as it is (first write wins).
    ///
    /// Checks are committed with `synchronous=NORMAL`: in WAL mode that survives a crash
    /// or kill -9 of the daemon, and only a power loss can take the last few checks (the
    /// next `FULL` commit — any session or action write — syncs them too). Checks are
    /// evidence, rewritten every interval; actions and sessions keep `FULL`. This halves
    /// the fsyncs of a check.
    pub fn insert_check(&mut self, c: &CheckRow) -> Result<(), StoreError> {
        self.set_synchronous_normal(true)?;
        // BEGIN and COMMIT as cached statements: rusqlite's `Transaction` parses both
        // again on every call, which was a tenth of the daemon's CPU at a 100 ms interval.
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let result = self
            .conn
            .prepare_cached(INSERT_CHECK)
            .and_then(|mut insert| {
                insert.execute(params![
                    c.session_id,
                    c.check_index,
                    c.taken_at_ms,
                    c.check_json,
                    c.verdict,
                    c.failed
                ])
            })
            .and_then(|_| self.conn.prepare_cached("COMMIT")?.execute([]));
        if let Err(err) = result {
            // As `Transaction`'s drop does: nothing of a failed check stays pending.
            if !self.conn.is_autocommit() {
                let _ = self.conn.execute_batch("ROLLBACK");
            }
            return Err(err.into());
        }
        Ok(())
    }

    /// The last `limit` checks of the session, oldest first.
    pub fn recent_checks(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<CheckRow>, StoreError> {
        let mut statement = self.conn.prepare_cached(&format!(
            "SELECT {CHECK_COLUMNS} FROM checks WHERE session_id = ?1 \
             ORDER BY check_index DESC LIMIT ?2"
        ))?;
        let mut checks = statement
            .query_map(params![session_id, clamp_limit(limit)], check_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        checks.reverse();
        Ok(checks)
    }

    /// When the newest failed check (of any session) was taken; the kill switch reset
    /// precondition.
    pub fn last_failed_check_at(&self) -> Result<Option<i64>, StoreError> {
        Ok(self.conn.query_row(
            "SELECT MAX(taken_at_ms) FROM checks WHERE failed = 1",
            [],
            |row| row.get(0),
        )?)
    }

    // --- actions -------------------------------------------------------------------------

    /// Records an action's intent; returns its id.
    pub fn insert_action(&mut self, a: &NewAction) -> Result<i64, StoreError> {
        let tx = self.write()?;
        tx.execute(
            "INSERT INTO actions (session_id, kind, trigger, state, phase, attempt, from_worker, \
             to_worker, reason, operator, started_at_ms, updated_at_ms, detail_json) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?12)",
            params![
                a.session_id,
                a.kind,
                a.trigger,
                a.state,
                a.phase,
                a.attempt,
                a.from_worker,
                a.to_worker,
                a.reason,
                a.operator,
                a.started_at_ms,
                a.detail_json,
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    /// Moves an action on. `phase`, `detail_json` and `artifact_name` are left as they
    /// were when `None`. Reaching `done` or `failed` sets `finished_at_ms` (once).
    #[allow(clippy::too_many_arguments)]
    pub fn update_action(
        &mut self,
        id: i64,
        state: ActionState,
        phase: Option<Phase>,
        attempt: u32,
        detail_json: Option<&str>,
        artifact_name: Option<&str>,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let changed = self.write_one(
            "UPDATE actions SET state = ?2, phase = COALESCE(?3, phase), attempt = ?4, \
             detail_json = COALESCE(?5, detail_json), \
             artifact_name = COALESCE(?6, artifact_name), updated_at_ms = ?7, \
             finished_at_ms = CASE WHEN ?2 IN ('done', 'failed') \
                 THEN COALESCE(finished_at_ms, ?7) ELSE NULL END \
             WHERE id = ?1",
            params![
                id,
                state,
                phase,
                attempt,
                detail_json,
                artifact_name,
                now_ms
            ],
        )?;
        require_row(changed, "actions", &id.to_string())
    }

    // --- hook runs -----------------------------------------------------------------------

    /// Records that `action_id` is about to run a hook (replacing any earlier record).
    pub fn begin_hook_run(&mut self, run: &HookRunRow) -> Result<(), StoreError> {
        let tx = self.write()?;
        tx.execute(
            "INSERT OR REPLACE INTO hook_runs \
             (action_id, phase, token, started_at_ms, boot_id, pgid, leader_start_ticks) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                run.action_id,
                run.phase,
                run.token,
                run.started_at_ms,
                run.boot_id,
                run.pgid,
                run.leader_start_ticks.map(|ticks| ticks as i64),
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records the process group of the hook `action_id` has just started.
    pub fn hook_spawned(
        &mut self,
        action_id: i64,
        pgid: i32,
        leader_start_ticks: Option<u64>,
    ) -> Result<(), StoreError> {
        let changed = self.write_one(
            "UPDATE hook_runs SET pgid = ?2, leader_start_ticks = ?3 WHERE action_id = ?1",
            params![
                action_id,
                pgid,
                leader_start_ticks.map(|ticks| ticks as i64)
            ],
        )?;
        require_row(changed, "hook_runs", &action_id.to_string())
    }

    /// The hook `action_id` was running when it was last recorded, if any.
    pub fn hook_run(&self, action_id: i64) -> Result<Option<HookRunRow>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT action_id, phase, token, started_at_ms, boot_id, pgid, \
                 leader_start_ticks FROM hook_runs WHERE action_id = ?1",
                [action_id],
                |row| {
                    Ok(HookRunRow {
                        action_id: row.get(0)?,
                        phase: row.get(1)?,
                        token: row.get(2)?,
                        started_at_ms: row.get(3)?,
                        boot_id: row.get(4)?,
                        pgid: row.get(5)?,
                        leader_start_ticks: row
                            .get::<_, Option<i64>>(6)?
                            .and_then(|ticks| u64::try_from(ticks).ok()),
                    })
                },
            )
            .optional()?)
    }

    /// The hook of `action_id` is finished with (it ended, or an orphan was dealt with).
    pub fn end_hook_run(&mut self, action_id: i64) -> Result<(), StoreError> {
        self.write_one("DELETE FROM hook_runs WHERE action_id = ?1", [action_id])?;
        Ok(())
    }

    /// Actions that were pending or running: after a restart these are resumed.
    pub fn unfinished_actions(&self) -> Result<Vec<ActionRow>, StoreError> {
        self.actions_where(
            "state IN (?1, ?2)",
            [ActionState::Pending, ActionState::Running],
        )
    }

    pub fn action(&self, id: i64) -> Result<Option<ActionRow>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {ACTION_COLUMNS} FROM actions WHERE id = ?1"),
                [id],
                action_from_row,
            )
            .optional()?)
    }

    /// How many rollbacks started at or after `since_ms` (loop protection).
    pub fn rollbacks_since(&self, since_ms: i64) -> Result<u32, StoreError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM actions WHERE kind = ?2 AND started_at_ms >= ?1",
            params![since_ms, ActionKind::Rollback],
            |row| row.get(0),
        )?)
    }

    /// When each rollback that started at or after `since_ms` started, oldest first (loop
    /// protection after a restart).
    /// The automatic and fleet rollbacks started at or after `since_ms`, with the version
    /// each rolled back from (loop protection counts them per version; manual ones are
    /// an operator's decision and not counted).
    pub fn rollback_starts_since(&self, since_ms: i64) -> Result<Vec<(i64, String)>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT started_at_ms, COALESCE(from_worker, '') FROM actions \
             WHERE kind = ?2 AND trigger != ?3 AND started_at_ms >= ?1 ORDER BY started_at_ms",
        )?;
        let rows = statement
            .query_map(
                params![since_ms, ActionKind::Rollback, ActionTrigger::Manual],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )?
            .collect::<Result<Vec<(i64, String)>, _>>()?;
        Ok(rows)
    }

    /// Versions rolled back (a rollback from them carried out) and not promoted and
    /// confirmed since, newest first, at most `limit`: a manual rollback to one of them
    /// would re-deploy a release rollbackd took out.
    pub fn rolled_back_versions(&self, limit: u32) -> Result<Vec<String>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT a.from_worker FROM actions a \
             WHERE a.kind = ?1 AND a.state = ?2 AND a.from_worker IS NOT NULL \
             AND NOT EXISTS (SELECT 1 FROM sessions s WHERE s.active = a.from_worker \
                 AND s.state = ?3 AND s.promoted_at_ms > a.started_at_ms) \
             GROUP BY a.from_worker ORDER BY MAX(a.started_at_ms) DESC LIMIT ?4",
        )?;
        let rows = statement
            .query_map(
                params![
                    ActionKind::Rollback,
                    ActionState::Done,
                    SessionState::Confirmed,
                    limit
                ],
                |row| row.get(0),
            )?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(rows)
    }

    /// The newest action (what `rollbackd report latest` reports on).
    /// The rollbacks carried out (state `done`) whose row id is above `after_id`, oldest
    /// first: those the fleet may not have been told of yet.
    pub fn rollbacks_done_after(&self, after_id: ActionId) -> Result<Vec<ActionRow>, StoreError> {
        self.actions_where(
            "kind = 'rollback' AND state = 'done' AND id > ?1",
            [after_id],
        )
    }

    /// The highest action row id (0 with none).
    pub fn max_action_id(&self) -> Result<ActionId, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(id), 0) FROM actions", [], |row| {
                row.get(0)
            })?)
    }

    pub fn latest_action(&self) -> Result<Option<ActionRow>, StoreError> {
        let mut statement = self.conn.prepare_cached(&format!(
            "SELECT {ACTION_COLUMNS} FROM actions ORDER BY started_at_ms DESC, id DESC LIMIT 1"
        ))?;
        Ok(statement.query_row([], action_from_row).optional()?)
    }

    /// How many sessions' ids start with `prefix`.
    pub fn count_sessions_like(&self, prefix: &str) -> Result<u64, StoreError> {
        let mut statement = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM sessions WHERE substr(id, 1, length(?1)) = ?1")?;
        Ok(statement
            .query_row([prefix], |row| row.get::<_, i64>(0))?
            .max(0) as u64)
    }

    /// The newest sessions (at most 10), ended or not, whose id starts with `prefix`
    /// (`report SESSION` takes a unique prefix too).
    pub fn sessions_like(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT id FROM sessions WHERE substr(id, 1, length(?1)) = ?1              ORDER BY promoted_at_ms DESC LIMIT 10",
        )?;
        let rows = statement
            .query_map([prefix], |row| row.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(rows)
    }

    /// What the incident report of a session (or of one action made without a session)
    /// is made from: the session, its newest [`INCIDENT_MAX_CHECKS`] checks and its
    /// actions, oldest first. `None` when neither is on record.
    pub fn incident_facts(
        &self,
        session_id: Option<&str>,
        action_id: Option<i64>,
    ) -> Result<Option<IncidentRows>, StoreError> {
        let session = match session_id {
            Some(id) => self.session(id)?,
            None => None,
        };
        let actions = match (&session, action_id) {
            (Some(s), _) => self.actions_for_session(&s.id)?,
            (None, Some(id)) => self.action(id)?.into_iter().collect(),
            (None, None) => Vec::new(),
        };
        if session.is_none() && actions.is_empty() {
            return Ok(None);
        }
        let checks = match &session {
            Some(s) => self.recent_checks(&s.id, INCIDENT_MAX_CHECKS)?,
            None => Vec::new(),
        };
        Ok(Some(IncidentRows {
            session,
            checks,
            actions,
        }))
    }

    /// The session's actions, oldest first.
    pub fn actions_for_session(&self, session_id: &str) -> Result<Vec<ActionRow>, StoreError> {
        self.actions_where("session_id = ?1", [session_id])
    }

    fn actions_where(
        &self,
        condition: &str,
        params: impl rusqlite::Params,
    ) -> Result<Vec<ActionRow>, StoreError> {
        let mut statement = self.conn.prepare_cached(&format!(
            "SELECT {ACTION_COLUMNS} FROM actions WHERE {condition} ORDER BY id"
        ))?;
        let rows = statement
            .query_map(params, action_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    // --- retention -----------------------------------------------------------------------

    /// Deletes ended sessions, with their checks and actions, that the retention no longer
    /// keeps: those that ended before `rule.ended_before_ms`, and those beyond the newest
    /// `rule.keep_newest` ended ones. Never a session that has not ended (the current
    /// one), never one that ended at or after `rule.never_after_ms`, never one with an
    /// action that is not finished (pending or running: it will be resumed). Finished
    /// actions of no session (a manual escalation with no session) go by `ended_before_ms` too.
    /// The outbox is not touched: its rows are records not yet delivered.
    ///
    /// One transaction. Freed pages are left in the file for new rows to reuse (no
    /// VACUUM: it would rewrite the whole file under the write lock), so the file stays at
    /// its high-water mark.
    pub fn prune_sessions(&mut self, rule: &PruneRule) -> Result<Pruned, StoreError> {
        let tx = self.write()?;
        let doomed: Vec<String> = {
            let mut statement = tx.prepare_cached(
                "SELECT s.id FROM sessions s \
                 WHERE s.ended_at_ms IS NOT NULL AND s.ended_at_ms < ?3 \
                   AND (s.ended_at_ms < ?1 OR s.id NOT IN ( \
                        SELECT id FROM sessions WHERE ended_at_ms IS NOT NULL \
                        ORDER BY ended_at_ms DESC, rowid DESC LIMIT ?2)) \
                   AND NOT EXISTS (SELECT 1 FROM actions a WHERE a.session_id = s.id \
                        AND a.state NOT IN ('done', 'failed'))",
            )?;
            let ids = statement
                .query_map(
                    params![
                        rule.ended_before_ms,
                        clamp_limit(rule.keep_newest),
                        rule.never_after_ms
                    ],
                    |row| row.get(0),
                )?
                .collect::<Result<Vec<_>, _>>()?;
            ids
        };
        let mut pruned = Pruned::default();
        for id in &doomed {
            pruned.checks += tx
                .prepare_cached("DELETE FROM checks WHERE session_id = ?1")?
                .execute([id])?;
            pruned.actions += tx
                .prepare_cached("DELETE FROM actions WHERE session_id = ?1")?
                .execute([id])?;
            pruned.sessions += tx
                .prepare_cached("DELETE FROM sessions WHERE id = ?1")?
                .execute([id])?;
        }
        pruned.actions += tx
            .prepare_cached(
                "DELETE FROM actions WHERE session_id IS NULL \
                 AND state IN ('done', 'failed') AND finished_at_ms < ?1 AND finished_at_ms < ?2",
            )?
            .execute(params![rule.ended_before_ms, rule.never_after_ms])?;
        tx.commit()?;
        Ok(pruned)
    }

    // --- outbox --------------------------------------------------------------------------

    /// Keeps a record that could not be written to `analytics/`; returns its id.
    pub fn push_outbox(
        &mut self,
        kind: &str,
        name: Option<&str>,
        payload: &str,
        now_ms: i64,
    ) -> Result<i64, StoreError> {
        let tx = self.write()?;
        tx.execute(
            "INSERT INTO outbox (kind, name, payload, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![kind, name, payload, now_ms],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    /// The oldest `limit` waiting records, oldest first (retry in this order so the log
    /// keeps the order of events).
    pub fn outbox(&self, limit: usize) -> Result<Vec<OutboxRow>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT id, kind, name, payload, created_at_ms FROM outbox ORDER BY id LIMIT ?1",
        )?;
        let rows = statement
            .query_map([clamp_limit(limit)], outbox_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Drops a record once it has been written. Removing an absent id is not an error
    /// (a retry after a crash may remove it twice).
    pub fn remove_outbox(&mut self, id: i64) -> Result<(), StoreError> {
        self.write_one("DELETE FROM outbox WHERE id = ?1", [id])?;
        Ok(())
    }

    // --- meta ----------------------------------------------------------------------------

    pub fn get_meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
                row.get(0)
            })
            .optional()?)
    }

    pub fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.write_one(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) \
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    // --- observations (v3) -----------------------------------------------------------------

    /// Records an observation and, in the same transaction, drops those taken before
    /// `keep_after_ms` and the oldest beyond `max_rows`: the table never grows with uptime.
    pub fn insert_observation(
        &mut self,
        row: &ObservationRow,
        keep_after_ms: i64,
        max_rows: u32,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        tx.execute(
            "INSERT INTO observations (taken_at_ms, worker, observation_json) VALUES (?1, ?2, ?3)",
            params![row.taken_at_ms, row.worker, row.observation_json],
        )?;
        tx.execute(
            "DELETE FROM observations WHERE taken_at_ms < ?1",
            [keep_after_ms],
        )?;
        tx.execute(
            "DELETE FROM observations WHERE id <= \
             (SELECT id FROM observations ORDER BY id DESC LIMIT 1 OFFSET ?1)",
            [max_rows],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Observations taken at or after `since_ms`, oldest first.
    pub fn observations_since(&self, since_ms: i64) -> Result<Vec<ObservationRow>, StoreError> {
        let mut statement = self.conn.prepare_cached(
            "SELECT taken_at_ms, worker, observation_json FROM observations \
             WHERE taken_at_ms >= ?1 ORDER BY taken_at_ms, id",
        )?;
        let rows = statement
            .query_map([since_ms], |row| {
                Ok(ObservationRow {
                    taken_at_ms: row.get(0)?,
                    worker: row.get(1)?,
                    observation_json: row.get(2)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }
}

/// One observation of a version between sessions (`observations`, v3).
#[derive(Debug, Clone, PartialEq)]
pub struct ObservationRow {
    pub taken_at_ms: i64,
    pub worker: String,
    pub observation_json: String,
}

/// The `meta` key holding each version's last healthy-session stats (a JSON list).
pub const META_HEALTHY_BASELINES: &str = "healthy-baselines";

/// Switches the database to WAL (persistent: a no-op once done). SQLite answers a journal
/// mode change that races another connection with `SQLITE_BUSY` at once, without calling
/// the busy handler, so this retries until [`BUSY_TIMEOUT`] itself.
/// Creates a migrated database at `path` without ever showing an empty file there:
/// built under a temporary name, closed (which folds its WAL in) and hard-linked into
/// place. Losing a race with another opener is fine: its database is used. So an empty
/// `rollbackd.db` is never ours mid-creation, and can be refused as damage.
fn create_fresh(path: &Path) -> Result<(), StoreError> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = side_file(path, &format!(".new-{}-{n}", std::process::id()));
    let result = (|| {
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(side_file(&temp, suffix));
        }
        let mut store = Store {
            conn: open_read_write(&temp)?,
            path: temp.clone(),
            id: None,
            sync_normal: false,
        };
        store.migrate()?;
        drop(store);
        match std::fs::hard_link(&temp, path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    })();
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let _ = std::fs::remove_file(side_file(&temp, suffix));
    }
    result
}

/// A read-write connection in WAL mode with `synchronous=FULL`.
fn open_read_write(path: &Path) -> Result<Connection, StoreError> {
    // SQLITE_OPEN_NOFOLLOW: SQLite itself refuses a database path that is a symlink.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    enable_wal(&conn)?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

fn enable_wal(conn: &Connection) -> Result<(), StoreError> {
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    loop {
        match conn
            .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get::<_, String>(0))
        {
            Ok(mode) => {
                if !mode.eq_ignore_ascii_case("wal") {
                    tracing::warn!(%mode, "state database could not switch to WAL");
                }
                return Ok(());
            }
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn require_row(changed: bool, table: &'static str, id: &str) -> Result<(), StoreError> {
    if changed {
        Ok(())
    } else {
        Err(StoreError::NoSuchRow {
            table,
            id: id.to_owned(),
        })
    }
}

/// SQLite takes a signed limit; anything beyond `i64::MAX` means "all".
fn clamp_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state/rollbackd.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn a_symlinked_database_or_wal_is_refused_and_its_target_untouched() {
        use std::fs;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "secret").unwrap();
        let db = dir.path().join("rollbackd.db");
        std::os::unix::fs::symlink(&victim, &db).unwrap();
        assert!(matches!(Store::open(&db), Err(StoreError::Symlink(p)) if p == db));
        assert!(matches!(
            Store::open_read_only(&db),
            Err(StoreError::Symlink(_))
        ));
        fs::remove_file(&db).unwrap();
        let wal = dir.path().join("rollbackd.db-wal");
        std::os::unix::fs::symlink(&victim, &wal).unwrap();
        assert!(matches!(Store::open(&db), Err(StoreError::Symlink(p)) if p == wal));
        assert_eq!(fs::read(&victim).unwrap(), b"secret");
    }

    #[test]
    fn an_empty_database_file_is_refused_naming_it_and_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("rollbackd.db");
        std::fs::write(&db, b"").unwrap();
        let error = Store::open(&db).unwrap_err();
        let text = error.to_string();
        assert!(matches!(error, StoreError::Unusable { .. }), "{text}");
        assert!(text.contains(&db.display().to_string()), "{text}");
        assert!(text.contains("empty"), "{text}");
        assert!(text.contains("move it aside"), "{text}");
        // Untouched: still empty, nothing created as if fresh.
        assert_eq!(std::fs::metadata(&db).unwrap().len(), 0);
    }

    #[test]
    fn a_wal_without_its_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("rollbackd.db");
        std::fs::write(dir.path().join("rollbackd.db-wal"), b"x").unwrap();
        let error = Store::open(&db).unwrap_err();
        assert!(error.to_string().contains("-wal exists"), "{error}");
        assert!(!db.exists());
    }

    #[test]
    fn a_deleted_database_is_noticed_and_restored_with_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("rollbackd.db");
        let mut store = Store::open(&db).unwrap();
        store.set_meta("active", "v2").unwrap();
        assert!(!store.replaced());
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(side_file(&db, suffix));
        }
        assert!(store.replaced());
        store.set_meta("written", "while deleted").unwrap();
        assert_eq!(store.restore().unwrap(), None);
        assert!(!store.replaced());
        store.set_meta("after", "restore").unwrap();
        drop(store);
        let store = Store::open(&db).unwrap();
        assert_eq!(store.get_meta("active").unwrap().as_deref(), Some("v2"));
        assert_eq!(
            store.get_meta("written").unwrap().as_deref(),
            Some("while deleted")
        );
        assert_eq!(store.get_meta("after").unwrap().as_deref(), Some("restore"));
    }

    #[test]
    fn a_replaced_database_is_moved_aside_and_ours_put_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("rollbackd.db");
        let mut store = Store::open(&db).unwrap();
        store.set_meta("active", "v2").unwrap();
        let other = dir.path().join("other.db");
        Store::open(&other)
            .unwrap()
            .set_meta("active", "other")
            .unwrap();
        std::fs::rename(&other, &db).unwrap();
        assert!(store.replaced());
        let moved = store
            .restore()
            .unwrap()
            .expect("the replacement was moved aside");
        assert!(moved.exists());
        drop(store);
        let store = Store::open(&db).unwrap();
        assert_eq!(store.get_meta("active").unwrap().as_deref(), Some("v2"));
    }

    fn session(id: &str, promoted_at_ms: i64) -> SessionRow {
        SessionRow {
            id: id.into(),
            active: "v2".into(),
            previous: Some("v1".into()),
            promoted_at_ms,
            state: SessionState::Monitoring,
            paused: false,
            pause_reason: None,
            baseline_json: Some(r#"{"failureRate":0.01}"#.into()),
            operator: Some("uid:1000".into()),
            ended_at_ms: None,
            end_reason: None,
            stability_json: None,
        }
    }

    fn check(session_id: &str, check_index: i64, taken_at_ms: i64, failed: bool) -> CheckRow {
        CheckRow {
            session_id: session_id.into(),
            check_index,
            taken_at_ms,
            check_json: format!(r#"{{"i":{check_index}}}"#),
            verdict: if failed { "degraded" } else { "healthy" }.into(),
            failed,
        }
    }

    fn rollback(session_id: Option<&str>, started_at_ms: i64) -> NewAction {
        NewAction {
            session_id: session_id.map(str::to_owned),
            kind: ActionKind::Rollback,
            trigger: ActionTrigger::Automatic,
            state: ActionState::Pending,
            phase: None,
            attempt: 1,
            from_worker: Some("v2".into()),
            to_worker: Some("v1".into()),
            reason: "error rate".into(),
            operator: None,
            started_at_ms,
            detail_json: None,
        }
    }

    /// The enums are stored as their names, and a name this build does not know is a
    /// clear error naming it, except a session's state: that session goes on being
    /// monitored rather than being unreadable.
    #[test]
    fn names_are_stored_as_text_and_unknown_ones_are_caught() {
        let (_dir, mut store) = temp_store();
        store.insert_session(&session("s-1", 1_000)).unwrap();
        let id = store.insert_action(&rollback(Some("s-1"), 2_000)).unwrap();
        store
            .update_action(
                id,
                ActionState::Running,
                Some(Phase::Verify),
                1,
                None,
                None,
                2_500,
            )
            .unwrap();
        let stored: (String, String, String, String) = store
            .conn
            .query_row(
                "SELECT kind, trigger, state, phase FROM actions WHERE id = ?1",
                [id],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .unwrap();
        assert_eq!(
            stored,
            (
                "rollback".into(),
                "automatic".into(),
                "running".into(),
                "verify".into()
            )
        );
        assert_eq!(store.unfinished_actions().unwrap().len(), 1);

        store
            .conn
            .execute(
                "UPDATE sessions SET state = 'from-the-future' WHERE id = 's-1'",
                [],
            )
            .unwrap();
        let current = store.current_session().unwrap().unwrap();
        assert_eq!(current.state, SessionState::Monitoring);

        store
            .conn
            .execute("UPDATE actions SET kind = 'reboot' WHERE id = ?1", [id])
            .unwrap();
        let err = store.action(id).unwrap_err().to_string();
        assert!(err.contains("unknown ActionKind \"reboot\""), "{err}");
    }

    /// The observations table keeps what is inside the age bound and at most the count.
    #[test]
    fn observations_are_bounded_by_age_and_count() {
        let (_dir, mut store) = temp_store();
        let row = |at: i64| ObservationRow {
            taken_at_ms: at,
            worker: "v1".into(),
            observation_json: format!(r#"{{"at":{at}}}"#),
        };
        for at in 0..50 {
            store
                .insert_observation(&row(at * 1000), at * 1000 - 20_000, 1000)
                .unwrap();
        }
        let kept = store.observations_since(0).unwrap();
        assert_eq!(kept.first().unwrap().taken_at_ms, 29_000);
        assert_eq!(kept.len(), 21);
        for at in 50..80 {
            store.insert_observation(&row(at * 1000), 0, 10).unwrap();
        }
        let kept = store.observations_since(0).unwrap();
        assert_eq!(kept.len(), 10);
        assert_eq!(kept.last().unwrap().taken_at_ms, 79_000);
        assert_eq!(store.observations_since(75_000).unwrap().len(), 5);
    }

    const HOUR: i64 = 3_600_000;

    /// A session promoted at `at`, with `n_checks` checks, ended after 10 min unless
    /// `ended` is false; returns its id.
    fn old_session(store: &mut Store, id: &str, at: i64, n_checks: i64, ended: bool) -> String {
        store.insert_session(&session(id, at)).unwrap();
        for i in 0..n_checks {
            store
                .insert_check(&check(id, i, at + i * 30_000, i % 7 == 0))
                .unwrap();
        }
        if ended {
            store
                .update_session_state(
                    id,
                    SessionState::Confirmed,
                    Some((at + 600_000, "confirmed")),
                )
                .unwrap();
        }
        id.to_owned()
    }

    fn finish(store: &mut Store, action: i64, at: i64) {
        store
            .update_action(
                action,
                ActionState::Done,
                Some(Phase::Verify),
                1,
                None,
                None,
                at,
            )
            .unwrap();
    }

    fn count(store: &Store, sql: &str) -> i64 {
        store.conn.query_row(sql, [], |row| row.get(0)).unwrap()
    }

    fn rule(now: i64) -> PruneRule {
        PruneRule {
            ended_before_ms: now - 90 * 24 * HOUR,
            keep_newest: 5000,
            never_after_ms: now - HOUR,
        }
    }

    #[test]
    fn pruning_deletes_only_ended_sessions_past_retention_with_their_rows() {
        let (_dir, mut store) = temp_store();
        let now = 1_000 * 24 * HOUR;
        let long_ago = now - 200 * 24 * HOUR;
        // Old and ended, with a finished rollback: goes, with its checks and actions.
        let gone = old_session(&mut store, "old-ended", long_ago, 20, true);
        let action = store
            .insert_action(&rollback(Some(&gone), long_ago + 60_000))
            .unwrap();
        finish(&mut store, action, long_ago + 90_000);
        // Old but never ended (a session a crash left open): stays.
        let unended = old_session(&mut store, "old-unended", long_ago + HOUR, 5, false);
        // Old and ended but its action is still running (to be resumed): stays.
        let running = old_session(&mut store, "old-running", long_ago + 2 * HOUR, 5, true);
        let running_action = store
            .insert_action(&rollback(Some(&running), long_ago + 2 * HOUR + 60_000))
            .unwrap();
        store
            .update_action(
                running_action,
                ActionState::Running,
                Some(Phase::Switch),
                1,
                None,
                None,
                0,
            )
            .unwrap();
        // Ended inside the retention: stays.
        let recent = old_session(&mut store, "recent", now - 10 * 24 * HOUR, 5, true);
        // The current session: stays.
        let current = old_session(&mut store, "current", now - 60_000, 2, false);
        // A manual escalation long ago (no session) and one not finished.
        let mut manual = rollback(None, long_ago);
        manual.kind = ActionKind::Escalation;
        let manual_done = store.insert_action(&manual).unwrap();
        finish(&mut store, manual_done, long_ago + 1000);
        let manual_pending = store.insert_action(&manual).unwrap();
        // An undelivered record.
        store
            .push_outbox(OUTBOX_AUDIT, None, "{}", long_ago)
            .unwrap();

        let pruned = store.prune_sessions(&rule(now)).unwrap();
        assert_eq!(
            pruned,
            Pruned {
                sessions: 1,
                checks: 20,
                actions: 2
            }
        );
        assert!(store.session(&gone).unwrap().is_none());
        for kept in [&unended, &running, &recent, &current] {
            assert!(store.session(kept).unwrap().is_some(), "{kept} was pruned");
            assert!(
                !store.recent_checks(kept, 100).unwrap().is_empty(),
                "{kept}'s checks"
            );
        }
        assert!(store.recent_checks(&gone, 100).unwrap().is_empty());
        assert!(store.actions_for_session(&gone).unwrap().is_empty());
        assert!(store.action(running_action).unwrap().is_some());
        assert!(store.action(manual_done).unwrap().is_none());
        assert!(store.action(manual_pending).unwrap().is_some());
        assert_eq!(
            store.outbox(10).unwrap().len(),
            1,
            "the outbox is not touched"
        );
        assert_eq!(store.current_session().unwrap().unwrap().id, current);
        // Nothing more to do: a second prune deletes nothing.
        assert_eq!(store.prune_sessions(&rule(now)).unwrap(), Pruned::default());
    }

    #[test]
    fn pruning_keeps_at_most_the_newest_sessions_but_never_recent_ones() {
        let (_dir, mut store) = temp_store();
        let now = 1_000 * 24 * HOUR;
        for i in 0..10 {
            old_session(&mut store, &format!("s{i}"), now - (20 - i) * HOUR, 3, true);
        }
        // Two that ended within the last hour are kept whatever the count.
        old_session(&mut store, "fresh-1", now - 40 * 60_000, 3, true);
        old_session(&mut store, "fresh-2", now - 20 * 60_000, 3, true);
        let pruned = store
            .prune_sessions(&PruneRule {
                keep_newest: 1,
                ..rule(now)
            })
            .unwrap();
        assert_eq!(pruned.sessions, 10);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM sessions"), 2);
        assert!(store.session("fresh-1").unwrap().is_some());
        let pruned = store
            .prune_sessions(&PruneRule {
                keep_newest: 3,
                ..rule(now)
            })
            .unwrap();
        assert_eq!(pruned, Pruned::default());
    }

    /// A host that promotes every hour: with pruning after each session the file stops
    /// growing once the retention is full (freed pages are reused).
    #[test]
    fn a_thousand_hourly_sessions_keep_the_file_bounded() {
        let (dir, mut store) = temp_store();
        let path = dir.path().join("state/rollbackd.db");
        let start = 1_000 * 24 * HOUR;
        let retention = 48 * HOUR;
        let mut size_at = Vec::new();
        for i in 0..1000 {
            let at = start + i * HOUR;
            let id = old_session(&mut store, &format!("s-{i:04}"), at, 20, true);
            let action = store
                .insert_action(&rollback(Some(&id), at + 60_000))
                .unwrap();
            finish(&mut store, action, at + 90_000);
            let now = at + 600_000;
            store
                .prune_sessions(&PruneRule {
                    ended_before_ms: now - retention,
                    keep_newest: 5000,
                    never_after_ms: now - HOUR,
                })
                .unwrap();
            if i % 100 == 99 {
                store
                    .conn
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                    .unwrap();
                size_at.push(std::fs::metadata(&path).unwrap().len());
            }
        }
        // After the first hundred sessions (the retention is full after 48) the file does
        // not grow: within a few pages of its size then.
        let first = size_at[0];
        let last = *size_at.last().unwrap();
        assert!(
            last <= first + 8 * 4096,
            "the file grew from {first} to {last} bytes: {size_at:?}"
        );
        let sessions = count(&store, "SELECT COUNT(*) FROM sessions");
        assert!((48..=50).contains(&sessions), "{sessions} sessions kept");
        assert_eq!(count(&store, "SELECT COUNT(*) FROM checks"), sessions * 20);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM actions"), sessions);
    }

    #[test]
    fn a_hook_run_is_recorded_before_and_after_its_spawn_and_cleared() {
        let (_dir, mut store) = temp_store();
        assert_eq!(store.hook_run(7).unwrap(), None);
        let mut run = HookRunRow {
            action_id: 7,
            phase: Phase::Switch,
            token: "7-switch-1".into(),
            started_at_ms: 1_000,
            boot_id: Some("b".into()),
            pgid: None,
            leader_start_ticks: None,
        };
        store.begin_hook_run(&run).unwrap();
        assert_eq!(store.hook_run(7).unwrap().as_ref(), Some(&run));
        store.hook_spawned(7, 4242, Some(u64::MAX >> 1)).unwrap();
        run.pgid = Some(4242);
        run.leader_start_ticks = Some(u64::MAX >> 1);
        assert_eq!(store.hook_run(7).unwrap().as_ref(), Some(&run));
        // A new run of the action replaces the old record.
        run.phase = Phase::Resume;
        run.pgid = None;
        run.leader_start_ticks = None;
        store.begin_hook_run(&run).unwrap();
        assert_eq!(store.hook_run(7).unwrap().as_ref(), Some(&run));
        store.end_hook_run(7).unwrap();
        assert_eq!(store.hook_run(7).unwrap(), None);
        assert!(store.hook_spawned(7, 1, None).is_err(), "no run to update");
    }

    #[test]
    fn checks_commit_at_normal_and_every_other_write_at_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollbackd.db");
        let mut store = Store::open(&path).unwrap();
        assert!(INSERT_CHECK.contains(CHECK_COLUMNS));
        let synchronous = |store: &Store| -> i64 {
            store
                .conn
                .pragma_query_value(None, "synchronous", |row| row.get(0))
                .unwrap()
        };
        store.insert_session(&session("s-1", 1_000)).unwrap();
        assert_eq!(synchronous(&store), 2, "FULL");
        store.insert_check(&check("s-1", 0, 2_000, false)).unwrap();
        store.insert_check(&check("s-1", 1, 3_000, true)).unwrap();
        // A repeated check is ignored, and leaves no transaction open.
        store.insert_check(&check("s-1", 1, 9_000, false)).unwrap();
        assert!(store.conn.is_autocommit());
        assert_eq!(synchronous(&store), 1, "NORMAL after a check");
        store.set_meta("active", "v2").unwrap();
        assert_eq!(synchronous(&store), 2, "FULL again for any other write");
        let checks = store.recent_checks("s-1", 10).unwrap();
        assert_eq!(checks.len(), 2);
        assert_eq!(checks[1].taken_at_ms, 3_000, "first write wins");
        assert!(checks[1].failed);
    }

    #[test]
    fn migrations_are_idempotent_and_tracked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollbackd.db");
        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        store.set_meta("active", "v1").unwrap();
        drop(store);

        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len() as i64);
        assert_eq!(store.get_meta("active").unwrap().as_deref(), Some("v1"));
        let journal: String = store
            .conn
            .pragma_query_value(None, "journal_mode", |row| row.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
        // synchronous: 2 = FULL
        let synchronous: i64 = store
            .conn
            .pragma_query_value(None, "synchronous", |row| row.get(0))
            .unwrap();
        assert_eq!(synchronous, 2);
    }

    #[test]
    fn concurrent_first_opens_migrate_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollbackd.db");
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || Store::open(&path).map(|s| s.schema_version().unwrap()))
            })
            .collect();
        for handle in handles {
            assert_eq!(handle.join().unwrap().unwrap(), MIGRATIONS.len() as i64);
        }
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollbackd.db");
        let store = Store::open(&path).unwrap();
        store
            .conn
            .pragma_update(None, "user_version", MIGRATIONS.len() as i64 + 1)
            .unwrap();
        drop(store);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::SchemaTooNew { .. })
        ));
        assert!(matches!(
            Store::open_read_only(&path),
            Err(StoreError::SchemaTooNew { .. })
        ));
    }

    #[test]
    fn session_round_trip_and_current() {
        let (_dir, mut store) = temp_store();
        assert_eq!(store.current_session().unwrap(), None);
        let first = session("s-1", 1_000);
        store.insert_session(&first).unwrap();
        assert_eq!(store.session("s-1").unwrap(), Some(first.clone()));
        assert_eq!(store.current_session().unwrap(), Some(first.clone()));
        assert!(store.insert_session(&first).is_err(), "ids are unique");

        let second = session("s-2", 2_000);
        store.insert_session(&second).unwrap();
        assert_eq!(store.current_session().unwrap().unwrap().id, "s-2");

        store.set_paused("s-2", true, Some("deploy")).unwrap();
        let paused = store.session("s-2").unwrap().unwrap();
        assert!(paused.paused);
        assert_eq!(paused.pause_reason.as_deref(), Some("deploy"));
        store.set_paused("s-2", false, None).unwrap();
        assert!(!store.session("s-2").unwrap().unwrap().paused);

        store
            .update_session_state("s-2", SessionState::Escalated, None)
            .unwrap();
        assert_eq!(
            store.current_session().unwrap().unwrap().state,
            SessionState::Escalated
        );
        store
            .update_session_state(
                "s-2",
                SessionState::RolledBack,
                Some((3_000, "rolled back")),
            )
            .unwrap();
        let ended = store.session("s-2").unwrap().unwrap();
        assert_eq!(ended.ended_at_ms, Some(3_000));
        assert_eq!(ended.end_reason.as_deref(), Some("rolled back"));
        // The older, still open session is current again.
        assert_eq!(store.current_session().unwrap().unwrap().id, "s-1");

        assert!(matches!(
            store.update_session_state("nope", SessionState::Stopped, None),
            Err(StoreError::NoSuchRow { .. })
        ));
        assert!(matches!(
            store.set_paused("nope", true, None),
            Err(StoreError::NoSuchRow { .. })
        ));
        assert_eq!(store.session("nope").unwrap(), None);
    }

    #[test]
    fn checks_round_trip_idempotent_oldest_first() {
        let (_dir, mut store) = temp_store();
        for i in 0..10 {
            store
                .insert_check(&check("s-1", i, 1_000 * i, false))
                .unwrap();
        }
        // The same key again (a retry after a crash) changes nothing.
        let mut duplicate = check("s-1", 9, 99_999, true);
        duplicate.check_json = "{}".into();
        store.insert_check(&duplicate).unwrap();
        store.insert_check(&check("s-2", 0, 50, true)).unwrap();

        let recent = store.recent_checks("s-1", 3).unwrap();
        assert_eq!(
            recent,
            vec![
                check("s-1", 7, 7_000, false),
                check("s-1", 8, 8_000, false),
                check("s-1", 9, 9_000, false),
            ]
        );
        assert_eq!(store.recent_checks("s-1", usize::MAX).unwrap().len(), 10);
        assert_eq!(store.recent_checks("s-3", 5).unwrap(), vec![]);
    }

    #[test]
    fn last_failed_check_is_the_newest_failed_one() {
        let (_dir, mut store) = temp_store();
        assert_eq!(store.last_failed_check_at().unwrap(), None);
        store.insert_check(&check("s-1", 0, 1_000, true)).unwrap();
        store.insert_check(&check("s-1", 1, 2_000, false)).unwrap();
        store.insert_check(&check("s-2", 0, 5_000, true)).unwrap();
        store.insert_check(&check("s-2", 1, 9_000, false)).unwrap();
        store.insert_check(&check("s-1", 2, 4_000, true)).unwrap();
        assert_eq!(store.last_failed_check_at().unwrap(), Some(5_000));
    }

    #[test]
    fn action_round_trip_and_updates() {
        let (_dir, mut store) = temp_store();
        let id = store.insert_action(&rollback(Some("s-1"), 1_000)).unwrap();
        let row = store.action(id).unwrap().unwrap();
        assert_eq!(
            row,
            ActionRow {
                id: Some(id),
                session_id: Some("s-1".into()),
                kind: ActionKind::Rollback,
                trigger: ActionTrigger::Automatic,
                state: ActionState::Pending,
                phase: None,
                attempt: 1,
                from_worker: Some("v2".into()),
                to_worker: Some("v1".into()),
                reason: "error rate".into(),
                operator: None,
                started_at_ms: 1_000,
                updated_at_ms: 1_000,
                finished_at_ms: None,
                artifact_name: None,
                detail_json: None,
            }
        );
        assert_eq!(store.unfinished_actions().unwrap(), vec![row]);

        store
            .update_action(
                id,
                ActionState::Running,
                Some(Phase::Switch),
                1,
                Some(r#"{"pause":0.01}"#),
                None,
                1_500,
            )
            .unwrap();
        // None leaves phase and detail as they were.
        store
            .update_action(id, ActionState::Running, None, 2, None, None, 1_600)
            .unwrap();
        let running = store.action(id).unwrap().unwrap();
        assert_eq!(running.phase, Some(Phase::Switch));
        assert_eq!(running.attempt, 2);
        assert_eq!(running.detail_json.as_deref(), Some(r#"{"pause":0.01}"#));
        assert_eq!(running.updated_at_ms, 1_600);
        assert_eq!(running.finished_at_ms, None);

        store
            .update_action(
                id,
                ActionState::Done,
                Some(Phase::Resume),
                2,
                None,
                Some("rollback_x.json"),
                2_000,
            )
            .unwrap();
        let done = store.action(id).unwrap().unwrap();
        assert_eq!(done.state, ActionState::Done);
        assert_eq!(done.finished_at_ms, Some(2_000));
        assert_eq!(done.artifact_name.as_deref(), Some("rollback_x.json"));
        assert_eq!(store.unfinished_actions().unwrap(), vec![]);

        let other = store.insert_action(&rollback(Some("s-2"), 3_000)).unwrap();
        let mut kill = rollback(Some("s-1"), 4_000);
        kill.kind = ActionKind::Escalation;
        kill.state = ActionState::Running;
        let kill_id = store.insert_action(&kill).unwrap();
        let ids = |rows: Vec<ActionRow>| rows.into_iter().filter_map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.actions_for_session("s-1").unwrap()),
            vec![id, kill_id]
        );
        assert_eq!(
            ids(store.unfinished_actions().unwrap()),
            vec![other, kill_id]
        );

        assert_eq!(store.action(9_999).unwrap(), None);
        assert!(matches!(
            store.update_action(9_999, ActionState::Done, None, 1, None, None, 0),
            Err(StoreError::NoSuchRow { .. })
        ));
    }

    #[test]
    fn rollbacks_since_counts_only_rollbacks_in_range() {
        let (_dir, mut store) = temp_store();
        for started in [1_000, 2_000, 3_000] {
            store.insert_action(&rollback(None, started)).unwrap();
        }
        let mut escalation = rollback(None, 2_500);
        escalation.kind = ActionKind::Escalation;
        store.insert_action(&escalation).unwrap();
        assert_eq!(store.rollbacks_since(0).unwrap(), 3);
        assert_eq!(store.rollbacks_since(2_000).unwrap(), 2);
        assert_eq!(store.rollbacks_since(3_001).unwrap(), 0);
        // A manual rollback (an operator's decision) is not what loop protection counts.
        let mut manual = rollback(None, 2_600);
        manual.trigger = ActionTrigger::Manual;
        manual.from_worker = Some("v7".into());
        store.insert_action(&manual).unwrap();
        assert_eq!(
            store.rollback_starts_since(2_000).unwrap(),
            [(2_000, "v2".to_owned()), (3_000, "v2".to_owned())]
        );
        assert!(store.rollback_starts_since(3_001).unwrap().is_empty());
    }

    /// Issue 26, item 20: the count of a prefix is the true count, not the page's.
    #[test]
    fn sessions_like_pages_and_counts() {
        let (_dir, mut store) = temp_store();
        for i in 0..14 {
            store
                .insert_session(&session(&format!("2026-{i:02}"), 1_000 + i))
                .unwrap();
        }
        assert_eq!(store.sessions_like("2026").unwrap().len(), 10);
        assert_eq!(store.count_sessions_like("2026").unwrap(), 14);
        assert_eq!(store.count_sessions_like("2026-1").unwrap(), 4);
    }

    /// A version a rollback took out is "rolled back" until a promotion of it is
    /// confirmed; the newest first.
    #[test]
    fn rolled_back_versions_are_those_not_confirmed_since() {
        let (_dir, mut store) = temp_store();
        let mut done = |from: &str, started: i64| {
            let mut action = rollback(None, started);
            action.from_worker = Some(from.into());
            action.state = ActionState::Done;
            store.insert_action(&action).unwrap();
        };
        done("v2", 1_000);
        done("v3", 2_000);
        let mut failed = rollback(None, 2_500);
        failed.from_worker = Some("v4".into());
        failed.state = ActionState::Failed;
        store.insert_action(&failed).unwrap();
        assert_eq!(store.rolled_back_versions(10).unwrap(), ["v3", "v2"]);
        // v2 promoted again later and confirmed: no longer a rolled-back version.
        let mut again = session("s-2", 5_000);
        again.active = "v2".into();
        again.state = SessionState::Confirmed;
        store.insert_session(&again).unwrap();
        assert_eq!(store.rolled_back_versions(10).unwrap(), ["v3"]);
    }

    #[test]
    fn outbox_is_fifo() {
        let (_dir, mut store) = temp_store();
        let a = store.push_outbox(OUTBOX_AUDIT, None, "a", 30).unwrap();
        let b = store
            .push_outbox(OUTBOX_ARTIFACT, Some("rollback_x.json"), "b", 10)
            .unwrap();
        let c = store.push_outbox(OUTBOX_AUDIT, None, "c", 20).unwrap();
        let payloads = |store: &Store| {
            store
                .outbox(10)
                .unwrap()
                .into_iter()
                .map(|r| r.payload)
                .collect::<Vec<_>>()
        };
        assert_eq!(payloads(&store), vec!["a", "b", "c"]);
        assert_eq!(
            store.outbox(1).unwrap(),
            vec![OutboxRow {
                id: a,
                kind: OUTBOX_AUDIT.into(),
                name: None,
                payload: "a".into(),
                created_at_ms: 30,
            }]
        );
        store.remove_outbox(a).unwrap();
        store.remove_outbox(a).unwrap();
        assert_eq!(store.outbox(10).unwrap()[0].id, b);
        assert_eq!(
            store.outbox(10).unwrap()[0].name.as_deref(),
            Some("rollback_x.json")
        );
        store.remove_outbox(c).unwrap();
        assert_eq!(payloads(&store), vec!["b"]);
    }

    #[test]
    fn meta_set_overwrites() {
        let (_dir, mut store) = temp_store();
        assert_eq!(store.get_meta("active").unwrap(), None);
        store.set_meta("active", "v2").unwrap();
        store.set_meta("active", "v1").unwrap();
        assert_eq!(store.get_meta("active").unwrap().as_deref(), Some("v1"));
    }

    #[test]
    fn read_only_open_of_missing_file_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/rollbackd.db");
        assert!(matches!(
            Store::open_read_only(&path),
            Err(StoreError::NotFound(p)) if p == path
        ));
        assert!(!path.exists());
        assert!(!dir.path().join("state").exists());
    }

    #[test]
    fn read_only_store_reads_what_the_daemon_wrote_while_it_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollbackd.db");
        let mut daemon = Store::open(&path).unwrap();
        daemon.insert_session(&session("s-1", 1_000)).unwrap();
        let cli = Store::open_read_only(&path).unwrap();
        assert_eq!(cli.current_session().unwrap().unwrap().id, "s-1");
        daemon.insert_check(&check("s-1", 0, 1_000, true)).unwrap();
        assert_eq!(cli.last_failed_check_at().unwrap(), Some(1_000));
    }

    #[test]
    fn read_only_open_of_unmigrated_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollbackd.db");
        Connection::open(&path).unwrap();
        assert!(matches!(
            Store::open_read_only(&path),
            Err(StoreError::SchemaTooOld { found: 0, .. })
        ));
    }
}
