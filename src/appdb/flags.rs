//! LiveFlags: an application's view of the `settings` table, kept current on a thread
//! of its own, with the kill switch applied.
//!
//! The effective value of a flag is its safe default when the kill key's row is exactly
//! `'1'`, else the row's value, else the safe default (SPEC §4). Applications call
//! [`LiveFlags::get`] on their hot path; that is a lock-free-ish `watch` borrow, no SQL.
//!
//! How commits of other processes are noticed: the kernel wakes the thread when the
//! database, its `-wal` or its `-journal` is written, created, deleted or renamed
//! (inotify on their directory, [`crate::appdb::wakeup`]); the thread then asks `PRAGMA
//! data_version` on its read-only connection ([`SettingsReader`]). That pragma reads no
//! table and changes whenever another connection has committed, so the table is re-read
//! only after a commit. A WAL commit's last file write comes just before the commit is
//! published in the shared memory index (which sends no event; a `synchronous=FULL` fsync
//! sits in between), so after an event the version is asked again every 0.1 ms for 10 ms,
//! every millisecond until 50 ms, then every 5 ms, for up to 250 ms, until it moves. The version is asked without
//! waiting on a busy database (a busy answer is asked again at the next step): SQLite's
//! busy handler would sleep a millisecond, right when the commit lands. With no event
//! the database is still checked every `poll_interval` (default 1 s: the backstop for
//! filesystems that send no events), and the whole table re-read every
//! `full_reread_interval` (5 s). Without inotify it polls every 20 ms, as before. The seed
//! design re-read the whole table every 500 ms: slower to notice and more work. Every statement is finished before
//! the thread sleeps, so **the reader never holds a transaction between polls** and, in
//! WAL mode, never delays a writer.
//!
//! Faults are data, not panics: a missing or unreadable database is retried (reopened)
//! at every poll and reported in [`FlagsSnapshot::error`]. While there is an error the
//! last rows read are kept: a flapping read error neither clears the kill switch nor
//! floods watchers with one change per key. The file is also re-identified (device and
//! inode) at every poll, so a database replaced by rename is reopened at once.

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::appdb::settings::{SettingsError, SettingsReader};
use crate::appdb::wakeup::{Wake, Wakeup};

/// After a file event, how long the version is asked for again until it moves, and how
/// often ([`settle_step`]): a commit's fsync usually ends within a few milliseconds, a
/// slow disk's within this.
const SETTLE: Duration = Duration::from_millis(250);

/// How long to wait before asking again, `since` the file event: 0.1 ms for the first
/// 10 ms, 1 ms until 50 ms, then 5 ms.
fn settle_step(since: Duration) -> Duration {
    if since < Duration::from_millis(10) {
        Duration::from_micros(100)
    } else if since < Duration::from_millis(50) {
        Duration::from_millis(1)
    } else {
        Duration::from_millis(5)
    }
}
/// The poll period when the kernel cannot wake the thread (no inotify).
const FALLBACK_POLL: Duration = Duration::from_millis(20);

/// The kill key of the spec: `DISABLE_NEW = '1'` reverts every flag to its safe default.
pub const DEFAULT_KILL_KEY: &str = "DISABLE_NEW";

/// How long a busy database may keep a poll from reading before the snapshot reports it.
const BUSY_REPORT_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveFlagsOptions {
    /// How often `PRAGMA data_version` is asked when no file event came (the backstop;
    /// a missing database is looked for at the same pace).
    pub poll_interval: Duration,
    /// Be woken by the kernel (inotify) on writes to the database's files. `false`: poll
    /// every `poll_interval` only.
    pub watch_files: bool,
    /// How often the whole table is re-read even when no commit was noticed.
    pub full_reread_interval: Duration,
    /// The kill switch key; its row value exactly `'1'` means "use safe defaults".
    pub kill_key: String,
    /// Safe default of each flag.
    pub defaults: BTreeMap<String, String>,
}

impl Default for LiveFlagsOptions {
    fn default() -> Self {
        LiveFlagsOptions {
            poll_interval: Duration::from_secs(1),
            watch_files: true,
            full_reread_interval: Duration::from_secs(5),
            kill_key: DEFAULT_KILL_KEY.to_string(),
            defaults: BTreeMap::new(),
        }
    }
}

/// What LiveFlags last read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FlagsSnapshot {
    /// Every row of `settings` with a non-NULL value (the last ones read, if `error`).
    pub rows: BTreeMap<String, String>,
    /// Bumps on each observed change of `rows` or `error`; 0 is the state found at start
    /// when the table is empty or absent and readable.
    pub version: u64,
    /// Why the latest poll could not read the table, if it could not.
    pub error: Option<String>,
}

impl FlagsSnapshot {
    /// The kill key's row value is exactly `'1'`.
    pub fn killed(&self, kill_key: &str) -> bool {
        self.rows.get(kill_key).map(String::as_str) == Some("1")
    }

    /// Effective value of `key`: its safe default when the kill switch is on, else the
    /// row's value, else the safe default. The kill key itself always reads its row.
    pub fn effective(&self, key: &str, options: &LiveFlagsOptions) -> Option<String> {
        let row = self.rows.get(key);
        let default = options.defaults.get(key);
        if key == options.kill_key {
            return row.or(default).cloned();
        }
        if self.killed(&options.kill_key) {
            return default.cloned();
        }
        row.or(default).cloned()
    }
}

/// One key whose row changed between two snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagChange {
    pub key: String,
    /// `None`: there was no row.
    pub previous: Option<String>,
    /// `None`: the row is gone.
    pub value: Option<String>,
}

/// Per-key differences between two snapshots, in key order, for "one line per change".
pub fn changes(old: &FlagsSnapshot, new: &FlagsSnapshot) -> Vec<FlagChange> {
    let mut keys: Vec<&String> = old.rows.keys().chain(new.rows.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|key| {
            let previous = old.rows.get(key);
            let value = new.rows.get(key);
            (previous != value).then(|| FlagChange {
                key: key.clone(),
                previous: previous.cloned(),
                value: value.cloned(),
            })
        })
        .collect()
}

/// Reads the whole table once over a read-only connection (for `flags get`), with the
/// row `kill_key` matches under the table's collation filed under `kill_key` (see
/// [`SettingsReader::read_all_for`]).
pub fn read_once(path: &Path, kill_key: &str) -> Result<BTreeMap<String, String>, SettingsError> {
    SettingsReader::open(path)?.read_all_for(kill_key)
}

/// Live view of the `settings` table. Dropping it stops and joins the poller thread.
pub struct LiveFlags {
    options: LiveFlagsOptions,
    snapshots: watch::Receiver<Arc<FlagsSnapshot>>,
    /// Dropped (disconnected) to stop the poller.
    /// Dropped (closed) to stop the thread.
    stop: Option<UnixStream>,
    poller: Option<JoinHandle<()>>,
    /// Polls so far that could not read the table (shared with the poller thread).
    failed_polls: Arc<AtomicU64>,
}

impl std::fmt::Debug for LiveFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveFlags")
            .field("options", &self.options)
            .field("snapshot", &*self.snapshots.borrow())
            .finish_non_exhaustive()
    }
}

impl LiveFlags {
    /// Reads the table once on the caller's thread (so the first snapshot is real), then
    /// starts the poller thread. Never fails: a missing or unreadable database is in the
    /// snapshot's `error` and retried at every poll.
    pub fn start(path: impl Into<PathBuf>, options: LiveFlagsOptions) -> LiveFlags {
        let mut poller = Poller::new(path.into(), options.clone());
        let failed_polls = Arc::clone(&poller.failed_polls);
        let (stop, stop_requests) =
            UnixStream::pair().expect("a socket pair to stop the liveflags thread");
        let poll_interval = options.poll_interval;
        let watch_files = options.watch_files;
        // Watching before the first read: a change made after it is never missed.
        let mut wakeup = if watch_files {
            Wakeup::new(&poller.path, stop_requests)
        } else {
            Wakeup::polling(stop_requests)
        };
        poller.poll();
        let (sender, snapshots) = watch::channel(poller.current.clone());
        let poller = std::thread::Builder::new()
            .name("liveflags".to_string())
            .spawn(move || {
                // After a file event: poll at `settle_step` until the version moves, for
                // at most SETTLE.
                let mut settle_until: Option<Instant> = None;
                loop {
                    let now = Instant::now();
                    let timeout = match settle_until {
                        Some(until) if until > now => {
                            settle_step(SETTLE.saturating_sub(until - now))
                        }
                        _ if watch_files && !wakeup.is_event_driven() => {
                            poll_interval.min(FALLBACK_POLL)
                        }
                        _ => poll_interval,
                    };
                    match wakeup.wait(timeout) {
                        Wake::Stop => return,
                        Wake::Changed => {
                            settle_until = Some(Instant::now() + SETTLE);
                        }
                        Wake::Timeout => {}
                    }
                    let changed = poller.poll_changed();
                    if let Some(snapshot) = changed.snapshot {
                        sender.send_replace(snapshot);
                    }
                    if changed.version_moved
                        || settle_until.is_some_and(|until| Instant::now() >= until)
                    {
                        settle_until = None;
                    }
                }
            })
            .expect("spawning the liveflags thread");
        LiveFlags {
            options,
            snapshots,
            stop: Some(stop),
            poller: Some(poller),
            failed_polls,
        }
    }

    /// How many polls so far could not read the table (missing, unreadable, busy). The
    /// snapshot changes only when what is read changes; this counts every failed poll, so
    /// a caller can see that LiveFlags kept retrying.
    pub fn failed_polls(&self) -> u64 {
        self.failed_polls.load(Ordering::Relaxed)
    }

    pub fn options(&self) -> &LiveFlagsOptions {
        &self.options
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Arc<FlagsSnapshot> {
        self.snapshots.borrow().clone()
    }

    /// Effective value of `key` (see [`FlagsSnapshot::effective`]).
    pub fn get(&self, key: &str) -> Option<String> {
        self.snapshots.borrow().effective(key, &self.options)
    }

    /// The kill switch is on: flags use their safe defaults.
    pub fn killed(&self) -> bool {
        self.snapshots.borrow().killed(&self.options.kill_key)
    }

    /// Every published snapshot (only when rows or error changed). `borrow()` on the
    /// receiver gives the current one; `changed()` resolves on the next.
    pub fn subscribe(&self) -> watch::Receiver<Arc<FlagsSnapshot>> {
        let mut receiver = self.snapshots.clone();
        receiver.mark_unchanged();
        receiver
    }
}

impl Drop for LiveFlags {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(poller) = self.poller.take() {
            if poller.join().is_err() {
                tracing::error!("the liveflags thread panicked");
            }
        }
    }
}

struct Polled {
    snapshot: Option<Arc<FlagsSnapshot>>,
    version_moved: bool,
}

/// The poller thread's state: one read-only connection (reopened after errors), the last
/// `data_version` seen and the snapshot last published.
struct Poller {
    path: PathBuf,
    options: LiveFlagsOptions,
    reader: Option<SettingsReader>,
    /// (device, inode) of the file `reader` has open.
    file_identity: Option<(u64, u64)>,
    data_version: Option<i64>,
    last_full_read: Option<Instant>,
    busy_since: Option<Instant>,
    /// The last poll found no database file.
    missing: bool,
    /// The last poll read a new version (or failed).
    moved: bool,
    current: Arc<FlagsSnapshot>,
    failed_polls: Arc<AtomicU64>,
}

impl Poller {
    fn new(path: PathBuf, options: LiveFlagsOptions) -> Poller {
        Poller {
            path,
            options,
            reader: None,
            file_identity: None,
            data_version: None,
            last_full_read: None,
            busy_since: None,
            missing: false,
            moved: false,
            current: Arc::new(FlagsSnapshot::default()),
            failed_polls: Arc::new(AtomicU64::new(0)),
        }
    }

    /// [`Poller::poll`], and whether it saw anything move (a new version read, or an
    /// error): the end of a settle after a file event.
    fn poll_changed(&mut self) -> Polled {
        let snapshot = self.poll();
        Polled {
            snapshot,
            version_moved: self.moved,
        }
    }

    /// One poll; returns the new snapshot when rows or error changed.
    fn poll(&mut self) -> Option<Arc<FlagsSnapshot>> {
        let read = self.read_if_changed();
        // Busy is not a move: the commit is still landing, ask again.
        self.moved = match &read {
            Ok(rows) => rows.is_some(),
            Err(error) => !error.is_busy(),
        };
        if read.is_err() {
            self.failed_polls.fetch_add(1, Ordering::Relaxed);
        }
        match read {
            Ok(None) => {
                self.busy_since = None;
                None
            }
            Ok(Some(rows)) => {
                self.busy_since = None;
                self.missing = false;
                self.publish(rows, None)
            }
            Err(error) if error.is_busy() => {
                // Transient (another connection is recovering the WAL, or the database
                // is in rollback-journal mode mid-commit): keep the connection, try at
                // the next poll, and only report it if it lasts.
                let busy_since = *self.busy_since.get_or_insert_with(Instant::now);
                if busy_since.elapsed() >= BUSY_REPORT_AFTER {
                    let rows = self.current.rows.clone();
                    let error = format!(
                        "cannot read {}: busy for {:?}",
                        self.path.display(),
                        busy_since.elapsed()
                    );
                    return self.publish(rows, Some(error));
                }
                None
            }
            // Still missing, as at the last poll: nothing new to say, and saying it again
            // (formatting the error) was most of an idle daemon's CPU.
            Err(PollError::File(error))
                if error.kind() == std::io::ErrorKind::NotFound && self.missing =>
            {
                None
            }
            Err(error) => {
                self.missing = matches!(&error, PollError::File(e) if e.kind() == std::io::ErrorKind::NotFound);
                self.busy_since = None;
                self.close();
                let rows = self.current.rows.clone();
                self.publish(
                    rows,
                    Some(format!("cannot read {}: {error}", self.path.display())),
                )
            }
        }
    }

    /// Reads the table when a commit was noticed, the backstop interval passed, or the
    /// connection is new. `Ok(None)`: nothing to read.
    fn read_if_changed(&mut self) -> Result<Option<BTreeMap<String, String>>, PollError> {
        let identity = file_identity(&self.path).map_err(PollError::File)?;
        if self.reader.is_some() && self.file_identity != Some(identity) {
            tracing::info!(path = %self.path.display(), "settings database replaced; reopening");
            self.close();
        }
        if self.reader.is_none() {
            self.reader = Some(SettingsReader::open(&self.path)?);
            self.file_identity = Some(identity);
        }
        let reader = self.reader.as_ref().expect("opened above");
        let data_version = reader.data_version_now()?;
        let backstop_due = self
            .last_full_read
            .is_none_or(|at| at.elapsed() >= self.options.full_reread_interval);
        if self.data_version == Some(data_version) && !backstop_due {
            return Ok(None);
        }
        // The kill key is matched as the writer matches it (the table's collation).
        let rows = reader.read_all_for(&self.options.kill_key)?;
        // Only remember the version once the rows of that version were read.
        self.data_version = Some(data_version);
        self.last_full_read = Some(Instant::now());
        Ok(Some(rows))
    }

    fn close(&mut self) {
        self.reader = None;
        self.file_identity = None;
        self.data_version = None;
        self.last_full_read = None;
    }

    fn publish(
        &mut self,
        rows: BTreeMap<String, String>,
        error: Option<String>,
    ) -> Option<Arc<FlagsSnapshot>> {
        if rows == self.current.rows && error == self.current.error {
            return None;
        }
        if let Some(error) = &error {
            if self.current.error.as_ref() != Some(error) {
                tracing::warn!(%error, "liveflags cannot read the settings table");
            }
        }
        self.current = Arc::new(FlagsSnapshot {
            rows,
            version: self.current.version + 1,
            error,
        });
        Some(self.current.clone())
    }
}

#[derive(Debug, thiserror::Error)]
enum PollError {
    #[error("{0}")]
    File(std::io::Error),
    #[error(transparent)]
    Settings(#[from] SettingsError),
}

impl PollError {
    fn is_busy(&self) -> bool {
        matches!(self, PollError::Settings(error) if error.is_busy())
    }
}

#[cfg(unix)]
fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path)?;
    Ok((metadata.dev(), metadata.ino()))
}

#[cfg(not(unix))]
fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    std::fs::metadata(path).map(|_| (0, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(rows: &[(&str, &str)]) -> FlagsSnapshot {
        FlagsSnapshot {
            rows: rows
                .iter()
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect(),
            version: 0,
            error: None,
        }
    }

    fn options_with_defaults() -> LiveFlagsOptions {
        LiveFlagsOptions {
            defaults: [("NEW_CHECKOUT".to_string(), "0".to_string())].into(),
            ..LiveFlagsOptions::default()
        }
    }

    #[test]
    fn defaults_match_the_spec() {
        let options = LiveFlagsOptions::default();
        // Woken by the kernel; the poll is the backstop. Without inotify: SPEC §4's 20 ms.
        assert!(options.watch_files);
        assert_eq!(options.poll_interval, Duration::from_secs(1));
        assert_eq!(FALLBACK_POLL, Duration::from_millis(20));
        assert_eq!(settle_step(Duration::ZERO), Duration::from_micros(100));
        assert_eq!(
            settle_step(Duration::from_millis(20)),
            Duration::from_millis(1)
        );
        assert_eq!(
            settle_step(Duration::from_millis(100)),
            Duration::from_millis(5)
        );
        assert_eq!(options.full_reread_interval, Duration::from_secs(5));
        assert_eq!(options.kill_key, "DISABLE_NEW");
        assert!(options.defaults.is_empty());
    }

    #[test]
    fn effective_value_table() {
        let options = options_with_defaults();
        /// (rows, key, expected effective value)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, Option<&'a str>);
        let cases: &[Case] = &[
            (&[], "NEW_CHECKOUT", Some("0")),
            (&[("NEW_CHECKOUT", "1")], "NEW_CHECKOUT", Some("1")),
            (
                &[("NEW_CHECKOUT", "1"), ("DISABLE_NEW", "1")],
                "NEW_CHECKOUT",
                Some("0"),
            ),
            (
                &[("NEW_CHECKOUT", "1"), ("DISABLE_NEW", "0")],
                "NEW_CHECKOUT",
                Some("1"),
            ),
            // Only exactly '1' kills.
            (
                &[("NEW_CHECKOUT", "1"), ("DISABLE_NEW", "true")],
                "NEW_CHECKOUT",
                Some("1"),
            ),
            (
                &[("NEW_CHECKOUT", "1"), ("DISABLE_NEW", " 1")],
                "NEW_CHECKOUT",
                Some("1"),
            ),
            // A flag without a safe default has no value while killed.
            (&[("OTHER", "x"), ("DISABLE_NEW", "1")], "OTHER", None),
            (&[("OTHER", "x")], "OTHER", Some("x")),
            (&[], "OTHER", None),
            // The kill key reads its own row.
            (&[("DISABLE_NEW", "1")], "DISABLE_NEW", Some("1")),
        ];
        for (rows, key, expected) in cases {
            let snapshot = snapshot(rows);
            assert_eq!(
                snapshot.effective(key, &options).as_deref(),
                *expected,
                "{rows:?} {key}"
            );
        }
        assert!(snapshot(&[("DISABLE_NEW", "1")]).killed("DISABLE_NEW"));
        assert!(!snapshot(&[("DISABLE_NEW", "1")]).killed("OTHER_KILL"));
    }

    #[test]
    fn changes_lists_added_changed_and_removed_keys_in_order() {
        let old = snapshot(&[("A", "1"), ("B", "x"), ("C", "same")]);
        let new = snapshot(&[("B", "y"), ("C", "same"), ("D", "new")]);
        let found = changes(&old, &new);
        let expected = vec![
            FlagChange {
                key: "A".into(),
                previous: Some("1".into()),
                value: None,
            },
            FlagChange {
                key: "B".into(),
                previous: Some("x".into()),
                value: Some("y".into()),
            },
            FlagChange {
                key: "D".into(),
                previous: None,
                value: Some("new".into()),
            },
        ];
        assert_eq!(found, expected);
        assert!(changes(&new, &new).is_empty());
    }

    #[test]
    fn a_missing_database_is_an_error_in_the_snapshot_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.db");
        let mut poller = Poller::new(path.clone(), LiveFlagsOptions::default());
        let snapshot = poller.poll().expect("the error is a change");
        assert_eq!(snapshot.version, 1);
        assert!(snapshot.error.as_deref().unwrap().contains("absent.db"));
        // The same error again is not a new snapshot.
        assert!(poller.poll().is_none());
        assert!(!path.exists(), "a reader must never create the database");
    }
}
