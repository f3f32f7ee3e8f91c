//! The audit trail under `state_dir/analytics/`: the only module that knows the on-disk
//! JSON formats of SPEC §5.
//!
//! Every serialized shape here is a promise to operators and their scripts, so each one is
//! its own type (never an engine type serialized directly) and has a test pinning its JSON.
//!
//! Two kinds of files are written:
//! - **JSON-lines logs** (`audit.log`, `kill_switch_audit.log`) through [`JsonLinesLog`]:
//!   one `write_all` per record followed by `sync_data`, and a failed write is cut back off,
//!   so **a log never keeps a torn line**. A torn tail left by a crash or power loss is
//!   repaired on open and saved verbatim next to the log, so nothing is lost.
//! - **Whole documents** (decision artifacts, `worker_manager.json`) through
//!   [`write_atomic`]: temp file, fsync, rename, fsync of the directory. Readers see the old
//!   file or the new one, never a half-written one. Re-writing the same name replaces it,
//!   which is how the daemon finishes an artifact after a crash without creating a second.
//!
//! Nothing here panics on I/O failure: every error is returned, and [`Analytics`] reopens
//! its logs on the next call, so the caller can keep the record (in the store's outbox) and
//! retry once the disk has room again.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// File name of the audit event log inside the analytics directory.
pub const AUDIT_LOG_FILE: &str = "audit.log";
/// File name of the kill switch log inside the analytics directory.
pub const KILL_SWITCH_LOG_FILE: &str = "kill_switch_audit.log";
/// File name of the active/previous worker mirror inside the analytics directory.
pub const WORKER_MANAGER_FILE: &str = "worker_manager.json";

/// Mode of the files this module creates: owner read/write, group read (on-call engineers
/// tail the audit log through the service's group).
const FILE_MODE: u32 = 0o640;

/// `2025-10-22T14:32:15.123Z`: RFC 3339 in UTC with milliseconds, the `timestamp` of
/// every record.
pub fn rfc3339_millis(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// `20251022T143215.123Z`: the compact UTC stamp used in artifact file names.
pub fn artifact_stamp(t: SystemTime) -> String {
    rfc3339_millis(t)
        .chars()
        .filter(|c| *c != '-' && *c != ':')
        .collect()
}

// ---------------------------------------------------------------------------------------
// JSON-lines log

/// A torn last line found (and cut off) when a log was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornLine {
    /// Length of the cut-off tail, in bytes.
    pub bytes: u64,
    /// Where the tail was saved, verbatim.
    pub saved_to: PathBuf,
}

/// An append-only JSON-lines file whose every line is a complete record.
#[derive(Debug)]
pub struct JsonLinesLog {
    path: PathBuf,
    file: File,
    /// Device and inode of the open file, to notice when `path` no longer names it
    /// (deleted, or renamed away by a log rotation).
    id: (u64, u64),
    /// The line being written, kept between appends (one allocation, not one per line).
    line: Vec<u8>,
}

/// Why an append did not count: the record reached a file that no name points to any
/// more (the log, or its directory, was deleted while open).
pub const UNLINKED_MESSAGE: &str = "was deleted while open; the record is kept and written again";

impl JsonLinesLog {
    /// Opens (creating it, and its parent directories, if needed) the log at `path`.
    ///
    /// If the file does not end in `\n`, the last write was torn (crash, power loss): the
    /// partial tail is saved to `<path>.torn-<stamp>` and cut off, and reported.
    pub fn open(path: &Path) -> io::Result<(JsonLinesLog, Option<TornLine>)> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            crate::storage::statedir::create_dir(parent)?;
        }
        // O_APPEND: every write lands at the current end, even after a truncation.
        // O_NOFOLLOW: a symlink planted in place of the log is an error (ELOOP), never
        // followed to a file someone else chose.
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let torn = repair_torn_tail(path, &mut file)?;
        let metadata = file.metadata()?;
        Ok((
            JsonLinesLog {
                path: path.to_path_buf(),
                file,
                id: (metadata.dev(), metadata.ino()),
                line: Vec::new(),
            },
            torn,
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` still names the open file. False when it was deleted (alone or with
    /// its directory), renamed away (`mv audit.log audit.log.1`) or replaced; then the log
    /// must be reopened, or records go to a file nobody reads.
    pub fn is_current(&self) -> bool {
        match fs::symlink_metadata(&self.path) {
            Ok(metadata) => (metadata.dev(), metadata.ino()) == self.id,
            Err(_) => false,
        }
    }

    /// Appends `record` as one line and syncs it to disk.
    ///
    /// On failure (a full disk can fail a write part-way) the file is cut back to its
    /// previous length, so no torn line remains and retrying the same record later gives
    /// exactly one copy of it.
    pub fn append<T: Serialize>(&mut self, record: &T) -> io::Result<()> {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        let result = serde_json::to_writer(&mut line, record)
            .map_err(io::Error::other)
            .and_then(|()| {
                // Compact serde_json never emits a raw newline, so the record is exactly
                // one line.
                line.push(b'\n');
                self.append_line_with(&line, |file, line| file.write_all(line))
            });
        // A rare huge record does not keep its buffer.
        if line.capacity() <= 64 * 1024 {
            self.line = line;
        }
        result
    }

    /// The append itself, with the write as a parameter so tests can make it fail
    /// part-way.
    fn append_line_with(
        &mut self,
        line: &[u8],
        write: impl FnOnce(&mut File, &[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let previous_len = self.file.metadata()?.len();
        let result = write(&mut self.file, line)
            .and_then(|()| self.file.sync_data())
            .and_then(|()| {
                // Deleted between the caller's check and the write: the line is in an
                // inode nobody can read, so it was not written. (Renamed away is fine: the
                // line is in the rotated file, where a reader finds it.)
                if self.file.metadata()?.nlink() == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{} {UNLINKED_MESSAGE}", self.path.display()),
                    ));
                }
                Ok(())
            });
        if let Err(error) = result {
            // Best effort: if even this fails, the torn tail is repaired on the next open.
            let _ = self
                .file
                .set_len(previous_len)
                .and_then(|()| self.file.sync_data());
            return Err(error);
        }
        Ok(())
    }
}

/// Cuts a partial last line off `file`, after saving it next to `path`.
fn repair_torn_tail(path: &Path, file: &mut File) -> io::Result<Option<TornLine>> {
    let len = file.metadata()?.len();
    if len == 0 || last_byte(file, len)? == b'\n' {
        return Ok(None);
    }
    let keep = match last_newline(file, len)? {
        Some(position) => position + 1,
        None => 0,
    };
    let mut tail = Vec::with_capacity((len - keep) as usize);
    file.seek(SeekFrom::Start(keep))?;
    Read::by_ref(file).take(len - keep).read_to_end(&mut tail)?;

    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let base = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let base = base.unwrap_or_default();
    let stamp = artifact_stamp(SystemTime::now());
    // Two repairs in the same millisecond must not overwrite each other's tail.
    let mut saved_name = format!("{base}.torn-{stamp}");
    let mut n = 1;
    while dir.join(&saved_name).exists() {
        saved_name = format!("{base}.torn-{stamp}-{n}");
        n += 1;
    }
    // Saved durably before the cut, so the bytes exist somewhere at every moment.
    let saved_to = write_atomic(dir, &saved_name, &tail)?;
    file.set_len(keep)?;
    file.sync_data()?;
    Ok(Some(TornLine {
        bytes: len - keep,
        saved_to,
    }))
}

fn last_byte(file: &mut File, len: u64) -> io::Result<u8> {
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut byte)?;
    Ok(byte[0])
}

/// Offset of the last `\n` in the first `len` bytes, reading backwards in blocks so a
/// large log is not read whole.
fn last_newline(file: &mut File, len: u64) -> io::Result<Option<u64>> {
    const BLOCK: u64 = 64 * 1024;
    let mut buf = vec![0u8; BLOCK as usize];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(BLOCK);
        let chunk = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(chunk)?;
        if let Some(i) = chunk.iter().rposition(|b| *b == b'\n') {
            return Ok(Some(start + i as u64));
        }
        end = start;
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------
// Atomic documents

/// Writes `bytes` to `dir/file_name` atomically: a temp file `.{file_name}.tmp-{pid}` in
/// the same directory, fsync, rename over the target, fsync of the directory.
///
/// An existing file of the same name is replaced.
pub fn write_atomic(dir: &Path, file_name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
    let final_path = dir.join(file_name);
    let temp_path = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        // O_NOFOLLOW: a symlink planted at the temp name is an error, never written through.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp_path)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&temp_path, &final_path)?;
        File::open(dir)?.sync_all()
    })();
    if let Err(error) = result {
        let _ = fs::remove_file(&temp_path);
        return Err(error);
    }
    Ok(final_path)
}

/// Which decision an artifact records; also the `decision` field of [`DecisionRecord`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArtifactKind {
    Rollback,
    Escalation,
}

impl ArtifactKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Rollback => "rollback",
            ArtifactKind::Escalation => "escalation",
        }
    }
}

/// `rollback_20251022T143215.123Z.json` / `escalation_20251022T143215.123Z.json`.
pub fn artifact_file_name(kind: ArtifactKind, at: SystemTime) -> String {
    format!("{}_{}.json", kind.as_str(), artifact_stamp(at))
}

// ---------------------------------------------------------------------------------------
// Records

/// The `event` of an audit line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuditEvent {
    MonitoringStarted,
    HealthCheck,
    RollbackStarted,
    RollbackExecuted,
    RollbackFailed,
    EscalationTriggered,
    KillSwitchActivated,
    KillSwitchReset,
    /// Someone changed the kill switch by hand (e.g. from the sqlite3 shell).
    KillSwitchExternal,
    MonitoringStopped,
    MonitoringPaused,
    MonitoringResumed,
    ConfigReloaded,
    /// After a restart, a hook the dead daemon had started was found still running.
    HookOrphaned,
    /// A verified rollback's restored version is watched for `rollback.stability_period`.
    StabilityWatchStarted,
    /// The watch ended without a breach.
    StabilityConfirmed,
    /// The restored version breached during the watch: an escalation follows.
    StabilityFailed,
    /// `no_data_policy = "hold"`: the release cannot be judged (no usable error rate for
    /// `max_consecutive_no_data` checks); nothing is done to it, on-call is told.
    CannotJudge,
    /// Usable data again after a hold: the release is judged again.
    JudgingAgain,
}

/// An `audit.log` event body: one struct per event, in `storage::events`.
pub trait Event: Serialize {
    /// The `event` of the line.
    fn event(&self) -> AuditEvent;
}

/// Keys of [`AuditRecord`] itself; extra fields may not reuse them.
const AUDIT_RESERVED_KEYS: [&str; 4] = ["timestamp", "event", "sessionId", "operator"];

/// One line of `audit.log`:
/// `{"timestamp": .., "event": .., "sessionId": ..|null, "operator": .., ...fields}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    pub timestamp: String,
    pub event: AuditEvent,
    /// Always present in the JSON; `null` outside a monitoring session.
    pub session_id: Option<String>,
    /// Who commanded it; omitted for the daemon's own actions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator: Option<String>,
    /// Event-specific fields (`verdict`, `errorRate`, ...), flattened into the line.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl AuditRecord {
    pub fn new(at: SystemTime, event: AuditEvent, session_id: Option<&str>) -> AuditRecord {
        AuditRecord {
            timestamp: rfc3339_millis(at),
            event,
            session_id: session_id.map(str::to_owned),
            operator: None,
            fields: Map::new(),
        }
    }

    pub fn operator(mut self, operator: impl Into<String>) -> AuditRecord {
        self.operator = Some(operator.into());
        self
    }

    /// The line for one typed event (the structs of `storage::events`): its `event` and
    /// its fields come from `body`, the only way fields get onto a line.
    pub fn of(at: SystemTime, session_id: Option<&str>, body: &impl Event) -> AuditRecord {
        let mut record = AuditRecord::new(at, body.event(), session_id);
        if let Ok(Value::Object(fields)) = serde_json::to_value(body) {
            for (key, value) in fields {
                record = record.field(&key, value);
            }
        }
        record
    }

    /// Adds an event-specific field. A key that collides with the record's own keys
    /// (`timestamp`, `event`, `sessionId`, `operator`) is stored with a `_` prefix, so a
    /// line never carries a duplicate key.
    fn field(mut self, key: &str, value: impl Into<Value>) -> AuditRecord {
        let key = if AUDIT_RESERVED_KEYS.contains(&key) {
            format!("_{key}")
        } else {
            key.to_owned()
        };
        self.fields.insert(key, value.into());
        self
    }
}

/// `action` of a kill switch record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KillSwitchAction {
    Activated,
    Reset,
}

/// `source` of a kill switch record: the daemon itself, an operator through the daemon,
/// a hand-made change the daemon noticed, or the fleet kill switch (etcd) mirrored here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KillSwitchSource {
    Automatic,
    Manual,
    External,
    Fleet,
}

/// One line of `kill_switch_audit.log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KillSwitchRecord {
    pub timestamp: String,
    pub action: KillSwitchAction,
    /// The value written (or seen): `"1"` or `"0"`.
    pub value: String,
    pub source: KillSwitchSource,
    /// `null` for automatic and external changes.
    pub operator: Option<String>,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

/// `status` of a decision artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DecisionStatus {
    Executed,
    Failed,
    /// Shadow mode: the decision was made and recorded, no action was taken.
    DryRun,
}

/// `trigger` of a decision artifact: what started the action, as the state database
/// spells it.
pub use crate::storage::states::ActionTrigger as Trigger;

/// `evidence` of a decision artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    pub recent_checks: Vec<Value>,
    /// e.g. `consecutive_failures`.
    pub failure_pattern: String,
    /// Human summary of the thresholds, e.g. `errorRate>0.2, failures>2`.
    pub threshold: String,
    pub rules_fired: Vec<Value>,
    /// The session's baseline: its values, `source`, `samples` and `windowSeconds` (null:
    /// none, only the absolute rules applied). The statistic that fired is in
    /// `rulesFired` (`pValue`) and each check's `baselinePValue`.
    #[serde(default)]
    pub baseline: Value,
}

/// Phase name → duration in seconds, serialized as a JSON object in the order the phases
/// ran (`{"pause": 0.01, "switch": 0.2, "verify": 1.5}`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Phases(pub Vec<(String, f64)>);

impl Phases {
    pub fn new() -> Phases {
        Phases::default()
    }

    /// Records a phase; a phase run again (a retried attempt) replaces its earlier time
    /// in place, so the object never has duplicate keys.
    pub fn push(&mut self, name: impl Into<String>, seconds: f64) {
        let name = name.into();
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => entry.1 = seconds,
            None => self.0.push((name, seconds)),
        }
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, s)| *s)
    }

    pub fn total_seconds(&self) -> f64 {
        self.0.iter().map(|(_, s)| s).sum()
    }
}

impl Serialize for Phases {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, seconds) in &self.0 {
            map.serialize_entry(name, seconds)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Phases {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Phases, D::Error> {
        struct PhasesVisitor;
        impl<'de> Visitor<'de> for PhasesVisitor {
            type Value = Phases;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of phase name to seconds")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Phases, A::Error> {
                let mut phases = Phases::new();
                while let Some((name, seconds)) = access.next_entry::<String, f64>()? {
                    phases.push(name, seconds);
                }
                Ok(phases)
            }
        }
        deserializer.deserialize_map(PhasesVisitor)
    }
}

/// The decision artifact `rollback_<stamp>.json` / `escalation_<stamp>.json` (SPEC §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionRecord {
    pub timestamp: String,
    pub decision: ArtifactKind,
    pub reason: String,
    pub status: DecisionStatus,
    /// `null` when no usable error rate was seen.
    pub error_rate: Option<f64>,
    pub failure_count: u32,
    pub recommended_action: String,
    pub evidence: Evidence,
    pub from: Option<String>,
    pub to: Option<String>,
    pub trigger: Trigger,
    pub operator: Option<String>,
    pub phases: Phases,
    pub rollback_duration_seconds: Option<f64>,
    pub config_hash: String,
    pub session_id: Option<String>,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The incident report's facts (`core::incident::Incident`), as in
    /// `incident_<stamp>.md`; rewritten when the stability watch ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<serde_json::Value>,
}

/// `worker_manager.json`: the active/previous worker mirror for humans and scripts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerManagerRecord {
    pub active: String,
    pub previous: Option<String>,
    pub updated_at: String,
    pub session_id: Option<String>,
    /// The session state, e.g. `monitoring`, `rolled-back`.
    pub state: crate::storage::states::SessionState,
}

// ---------------------------------------------------------------------------------------
// The analytics directory

/// The `state_dir/analytics` directory: both logs, the artifacts and the worker mirror.
///
/// Logs are opened on first use and dropped after a failed append, so a full disk or an
/// unwritable directory is an error for that call only; the next call tries again (and
/// repairs whatever the failure left behind).
#[derive(Debug)]
pub struct Analytics {
    dir: PathBuf,
    audit_log: Option<JsonLinesLog>,
    kill_switch_log: Option<JsonLinesLog>,
}

impl Analytics {
    /// Creates the directory if needed. Fails only if it cannot be created; use
    /// [`Analytics::new`] to defer even that to the first write.
    pub fn open(dir: &Path) -> io::Result<Analytics> {
        crate::storage::statedir::create_dir(dir)?;
        Ok(Analytics::new(dir))
    }

    /// Touches nothing: the directory and the logs are created on first write.
    pub fn new(dir: &Path) -> Analytics {
        Analytics {
            dir: dir.to_path_buf(),
            audit_log: None,
            kill_switch_log: None,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn audit_log_path(&self) -> PathBuf {
        self.dir.join(AUDIT_LOG_FILE)
    }

    pub fn kill_switch_log_path(&self) -> PathBuf {
        self.dir.join(KILL_SWITCH_LOG_FILE)
    }

    pub fn worker_manager_path(&self) -> PathBuf {
        self.dir.join(WORKER_MANAGER_FILE)
    }

    pub fn artifact_path(&self, kind: ArtifactKind, at: SystemTime) -> PathBuf {
        self.dir.join(artifact_file_name(kind, at))
    }

    /// Closes both logs, so the next record reopens them by name (SIGHUP, as logrotate's
    /// `postrotate` expects). Each append also checks the name itself, so this is only
    /// the belt to those braces.
    pub fn reopen(&mut self) {
        self.audit_log = None;
        self.kill_switch_log = None;
    }

    /// Appends a line to `audit.log`.
    pub fn audit(&mut self, record: &AuditRecord) -> io::Result<()> {
        let path = self.audit_log_path();
        append_reopening(&mut self.audit_log, &path, record)
    }

    /// Appends a line to `kill_switch_audit.log`.
    pub fn kill_switch(&mut self, record: &KillSwitchRecord) -> io::Result<()> {
        let path = self.kill_switch_log_path();
        append_reopening(&mut self.kill_switch_log, &path, record)
    }

    /// Writes the decision artifact named for `kind` and `at`, replacing one of the same
    /// name (a re-write after a crash, not a second artifact).
    pub fn write_artifact(
        &self,
        kind: ArtifactKind,
        at: SystemTime,
        record: &DecisionRecord,
    ) -> io::Result<PathBuf> {
        self.write_document(&artifact_file_name(kind, at), record)
    }

    /// Writes `worker_manager.json`.
    pub fn write_worker_manager(&self, record: &WorkerManagerRecord) -> io::Result<PathBuf> {
        self.write_document(WORKER_MANAGER_FILE, record)
    }

    fn write_document<T: Serialize>(&self, file_name: &str, record: &T) -> io::Result<PathBuf> {
        let mut bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        bytes.push(b'\n');
        crate::storage::statedir::create_dir(&self.dir)?;
        write_atomic(&self.dir, file_name, &bytes)
    }
}

fn append_reopening<T: Serialize>(
    slot: &mut Option<JsonLinesLog>,
    path: &Path,
    record: &T,
) -> io::Result<()> {
    if let Some(log) = slot.as_ref() {
        // One stat per record: cheap, and it catches a rotation or a deletion before the
        // record goes to a file nobody reads.
        if !log.is_current() {
            tracing::warn!(
                log = %path.display(),
                "the log was moved or deleted while open; reopening it by name"
            );
            *slot = None;
        }
    }
    if slot.is_none() {
        let (log, torn) = JsonLinesLog::open(path)?;
        if let Some(torn) = torn {
            tracing::warn!(
                log = %path.display(),
                bytes = torn.bytes,
                saved_to = %torn.saved_to.display(),
                "cut a torn last line off the log and saved it"
            );
        }
        *slot = Some(log);
    }
    let log = slot.as_mut().expect("opened above");
    let result = log.append(record);
    if result.is_err() {
        // Reopen next time: that repairs a tail the failed append could not cut back.
        *slot = None;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::Duration;

    /// 2025-10-22T14:32:15.123Z
    fn at() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_761_143_535_123)
    }

    fn to_json<T: Serialize>(value: &T) -> Value {
        serde_json::to_value(value).unwrap()
    }

    #[test]
    fn timestamps_are_utc_with_millis() {
        assert_eq!(rfc3339_millis(at()), "2025-10-22T14:32:15.123Z");
        assert_eq!(artifact_stamp(at()), "20251022T143215.123Z");
        assert_eq!(
            artifact_file_name(ArtifactKind::Rollback, at()),
            "rollback_20251022T143215.123Z.json"
        );
        assert_eq!(
            artifact_file_name(ArtifactKind::Escalation, at()),
            "escalation_20251022T143215.123Z.json"
        );
    }

    #[test]
    fn audit_record_shape() {
        let record = AuditRecord::new(at(), AuditEvent::HealthCheck, Some("s-1"))
            .field("verdict", "degraded")
            .field("errorRate", 0.07);
        assert_eq!(
            to_json(&record),
            json!({
                "timestamp": "2025-10-22T14:32:15.123Z",
                "event": "health-check",
                "sessionId": "s-1",
                "verdict": "degraded",
                "errorRate": 0.07,
            })
        );

        let record = AuditRecord::new(at(), AuditEvent::KillSwitchReset, None).operator("alice");
        assert_eq!(
            to_json(&record),
            json!({
                "timestamp": "2025-10-22T14:32:15.123Z",
                "event": "kill-switch-reset",
                "sessionId": null,
                "operator": "alice",
            })
        );
        let line = serde_json::to_string(&record).unwrap();
        assert_eq!(
            serde_json::from_str::<AuditRecord>(&line).unwrap(),
            record,
            "an audit line reads back"
        );
    }

    #[test]
    fn audit_fields_never_duplicate_record_keys() {
        let record = AuditRecord::new(at(), AuditEvent::HealthCheck, None).field("event", "x");
        let line = serde_json::to_string(&record).unwrap();
        assert_eq!(line.matches("\"event\"").count(), 1, "{line}");
        assert_eq!(to_json(&record)["_event"], json!("x"));
    }

    #[test]
    fn audit_event_names() {
        let names: Vec<Value> = [
            AuditEvent::MonitoringStarted,
            AuditEvent::HealthCheck,
            AuditEvent::RollbackStarted,
            AuditEvent::RollbackExecuted,
            AuditEvent::RollbackFailed,
            AuditEvent::EscalationTriggered,
            AuditEvent::KillSwitchActivated,
            AuditEvent::KillSwitchReset,
            AuditEvent::KillSwitchExternal,
            AuditEvent::MonitoringStopped,
            AuditEvent::MonitoringPaused,
            AuditEvent::MonitoringResumed,
            AuditEvent::ConfigReloaded,
        ]
        .iter()
        .map(to_json)
        .collect();
        assert_eq!(
            Value::Array(names),
            json!([
                "monitoring-started",
                "health-check",
                "rollback-started",
                "rollback-executed",
                "rollback-failed",
                "escalation-triggered",
                "kill-switch-activated",
                "kill-switch-reset",
                "kill-switch-external",
                "monitoring-stopped",
                "monitoring-paused",
                "monitoring-resumed",
                "config-reloaded",
            ])
        );
    }

    #[test]
    fn kill_switch_record_shape() {
        let mut record = KillSwitchRecord {
            timestamp: rfc3339_millis(at()),
            action: KillSwitchAction::Activated,
            value: "1".into(),
            source: KillSwitchSource::Automatic,
            operator: None,
            reason: "2 consecutive probe failures".into(),
            session_id: Some("s-1".into()),
        };
        assert_eq!(
            to_json(&record),
            json!({
                "timestamp": "2025-10-22T14:32:15.123Z",
                "action": "activated",
                "value": "1",
                "source": "automatic",
                "operator": null,
                "reason": "2 consecutive probe failures",
                "sessionId": "s-1",
            })
        );
        record.action = KillSwitchAction::Reset;
        record.value = "0".into();
        record.source = KillSwitchSource::External;
        record.session_id = None;
        assert_eq!(
            to_json(&record),
            json!({
                "timestamp": "2025-10-22T14:32:15.123Z",
                "action": "reset",
                "value": "0",
                "source": "external",
                "operator": null,
                "reason": "2 consecutive probe failures",
            })
        );
        record.source = KillSwitchSource::Manual;
        assert_eq!(to_json(&record)["source"], json!("manual"));
    }

    fn decision_record() -> DecisionRecord {
        let mut phases = Phases::new();
        phases.push("pause", 0.01);
        phases.push("switch", 0.2);
        phases.push("verify", 1.5);
        DecisionRecord {
            timestamp: rfc3339_millis(at()),
            decision: ArtifactKind::Rollback,
            reason: "High error rate (42.5%) with 5 failures".into(),
            status: DecisionStatus::Executed,
            error_rate: Some(0.425),
            failure_count: 5,
            recommended_action: "automatic rollback to previous worker".into(),
            evidence: Evidence {
                recent_checks: vec![json!({"at": 30, "errorRate": 0.425})],
                failure_pattern: "consecutive_failures".into(),
                threshold: "errorRate>0.2, failures>2".into(),
                rules_fired: vec![json!("error-rate")],
                baseline: Value::Null,
            },
            from: Some("v2".into()),
            to: Some("v1".into()),
            trigger: Trigger::Automatic,
            operator: None,
            phases,
            rollback_duration_seconds: Some(1.71),
            config_hash: "abc123".into(),
            session_id: Some("s-1".into()),
            attempts: 1,
            error: None,
            incident: None,
        }
    }

    #[test]
    fn decision_record_shape() {
        let record = decision_record();
        assert_eq!(
            to_json(&record),
            json!({
                "timestamp": "2025-10-22T14:32:15.123Z",
                "decision": "rollback",
                "reason": "High error rate (42.5%) with 5 failures",
                "status": "executed",
                "errorRate": 0.425,
                "failureCount": 5,
                "recommendedAction": "automatic rollback to previous worker",
                "evidence": {
                    "recentChecks": [{"at": 30, "errorRate": 0.425}],
                    "failurePattern": "consecutive_failures",
                    "threshold": "errorRate>0.2, failures>2",
                    "rulesFired": ["error-rate"],
                    "baseline": null,
                },
                "from": "v2",
                "to": "v1",
                "trigger": "automatic",
                "operator": null,
                "phases": {"pause": 0.01, "switch": 0.2, "verify": 1.5},
                "rollbackDurationSeconds": 1.71,
                "configHash": "abc123",
                "sessionId": "s-1",
                "attempts": 1,
            })
        );
        // Phases keep the order they ran in, not alphabetical order.
        let text = serde_json::to_string(&record).unwrap();
        assert!(
            text.contains(r#""phases":{"pause":0.01,"switch":0.2,"verify":1.5}"#),
            "{text}"
        );
        assert_eq!(
            serde_json::from_str::<DecisionRecord>(&text).unwrap(),
            record
        );
    }

    #[test]
    fn decision_record_failure_and_dry_run_shape() {
        let mut record = decision_record();
        record.decision = ArtifactKind::Escalation;
        record.status = DecisionStatus::Failed;
        record.error_rate = None;
        record.trigger = Trigger::Emergency;
        record.operator = Some("bob".into());
        record.rollback_duration_seconds = None;
        record.to = None;
        record.error = Some("previous version also unhealthy".into());
        let value = to_json(&record);
        assert_eq!(value["decision"], json!("escalation"));
        assert_eq!(value["status"], json!("failed"));
        assert_eq!(value["errorRate"], Value::Null);
        assert_eq!(value["trigger"], json!("emergency"));
        assert_eq!(value["operator"], json!("bob"));
        assert_eq!(value["rollbackDurationSeconds"], Value::Null);
        assert_eq!(value["to"], Value::Null);
        assert_eq!(value["error"], json!("previous version also unhealthy"));
        record.status = DecisionStatus::DryRun;
        record.trigger = Trigger::Manual;
        assert_eq!(to_json(&record)["status"], json!("dry-run"));
        assert_eq!(to_json(&record)["trigger"], json!("manual"));
    }

    #[test]
    fn phases_rerun_replaces_in_place() {
        let mut phases = Phases::new();
        phases.push("switch", 0.2);
        phases.push("verify", 1.0);
        phases.push("switch", 0.3);
        assert_eq!(to_json(&phases), json!({"switch": 0.3, "verify": 1.0}));
        assert_eq!(phases.get("switch"), Some(0.3));
        assert!((phases.total_seconds() - 1.3).abs() < 1e-9);
    }

    #[test]
    fn worker_manager_shape() {
        let record = WorkerManagerRecord {
            active: "v1".into(),
            previous: Some("v2".into()),
            updated_at: rfc3339_millis(at()),
            session_id: None,
            state: crate::storage::states::SessionState::RolledBack,
        };
        assert_eq!(
            to_json(&record),
            json!({
                "active": "v1",
                "previous": "v2",
                "updatedAt": "2025-10-22T14:32:15.123Z",
                "sessionId": null,
                "state": "rolled-back",
            })
        );
    }

    fn lines(path: &Path) -> Vec<Value> {
        let text = fs::read_to_string(path).unwrap();
        assert!(text.is_empty() || text.ends_with('\n'), "torn: {text:?}");
        text.lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    #[test]
    fn log_is_created_with_parents_and_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/audit.log");
        let (_log, torn) = JsonLinesLog::open(&path).unwrap();
        assert_eq!(torn, None);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o640, 0, "mode {mode:o}");
    }

    #[test]
    fn every_line_parses_after_many_appends_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        for round in 0..3 {
            let (mut log, torn) = JsonLinesLog::open(&path).unwrap();
            assert_eq!(torn, None);
            for i in 0..100 {
                let record = AuditRecord::new(at(), AuditEvent::HealthCheck, Some("s"))
                    .field("round", round)
                    .field("i", i)
                    .field("text", "line\nbreak \"quoted\"");
                log.append(&record).unwrap();
            }
        }
        let lines = lines(&path);
        assert_eq!(lines.len(), 300);
        assert_eq!(lines[299]["round"], json!(2));
        assert_eq!(lines[299]["i"], json!(99));
    }

    #[test]
    fn torn_tail_is_cut_and_saved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        fs::write(&path, "{\"a\":1}\n{\"b\":2}\n{\"c\":").unwrap();
        let (mut log, torn) = JsonLinesLog::open(&path).unwrap();
        let torn = torn.expect("torn tail reported");
        assert_eq!(torn.bytes, 5);
        assert_eq!(fs::read(&torn.saved_to).unwrap(), b"{\"c\":");
        let saved_name = torn.saved_to.file_name().unwrap().to_str().unwrap();
        assert!(saved_name.starts_with("audit.log.torn-"), "{saved_name}");
        assert_eq!(torn.saved_to.parent(), Some(dir.path()));

        log.append(&json!({"d": 4})).unwrap();
        assert_eq!(
            lines(&path),
            vec![json!({"a": 1}), json!({"b": 2}), json!({"d": 4})]
        );
    }

    #[test]
    fn torn_file_without_any_newline_is_cut_to_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        // Longer than one read block, so the backwards scan crosses blocks.
        let garbage = "x".repeat(200_000);
        fs::write(&path, &garbage).unwrap();
        let (_log, torn) = JsonLinesLog::open(&path).unwrap();
        let torn = torn.unwrap();
        assert_eq!(torn.bytes, 200_000);
        assert_eq!(fs::read_to_string(&torn.saved_to).unwrap(), garbage);
        assert_eq!(fs::metadata(&path).unwrap().len(), 0);

        // A second repair in the same millisecond does not overwrite the first tail.
        fs::write(&path, "{}\nyy").unwrap();
        let (_log, torn2) = JsonLinesLog::open(&path).unwrap();
        let torn2 = torn2.unwrap();
        assert_ne!(torn2.saved_to, torn.saved_to);
        assert_eq!(fs::read_to_string(&torn2.saved_to).unwrap(), "yy");
        assert_eq!(fs::read_to_string(&path).unwrap(), "{}\n");
    }

    #[test]
    fn failed_write_part_way_leaves_no_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (mut log, _) = JsonLinesLog::open(&path).unwrap();
        log.append(&json!({"n": 1})).unwrap();

        // A full disk: half the line gets written, then ENOSPC.
        let line = b"{\"n\":2,\"padding\":\"xxxxxxxxxxxxxxxx\"}\n";
        let error = log
            .append_line_with(line, |file, line| {
                file.write_all(&line[..line.len() / 2])?;
                Err(io::Error::from_raw_os_error(libc::ENOSPC))
            })
            .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(lines(&path), vec![json!({"n": 1})]);

        // Retrying later gives exactly one copy.
        log.append(&json!({"n": 2})).unwrap();
        assert_eq!(lines(&path), vec![json!({"n": 1}), json!({"n": 2})]);
    }

    const FSIZE_CHILD_ENV: &str = "ROLLBACKD_TEST_FSIZE_LOG";

    /// Runs only in the child spawned by `real_short_write_leaves_no_torn_line`: caps the
    /// process's file size so the kernel itself cuts a write short, then appends until the
    /// log refuses.
    #[test]
    #[ignore = "helper: run by real_short_write_leaves_no_torn_line in a child process"]
    fn fsize_limited_child() {
        let Some(path) = std::env::var_os(FSIZE_CHILD_ENV) else {
            return;
        };
        let (mut log, _) = JsonLinesLog::open(Path::new(&path)).unwrap();
        // SAFETY: plain syscalls on this (child) process; SIGXFSZ ignored so the write
        // returns EFBIG instead of killing the process.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 1000,
                rlim_max: libc::RLIM_INFINITY,
            };
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
        }
        let padding = "p".repeat(150);
        let mut appended = 0;
        let error = loop {
            match log.append(&json!({"n": appended, "padding": padding})) {
                Ok(()) => appended += 1,
                Err(error) => break error,
            }
        };
        assert_eq!(error.raw_os_error(), Some(libc::EFBIG), "{error}");
        println!("appended={appended}");
    }

    #[test]
    fn real_short_write_leaves_no_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "storage::audit::tests::fsize_limited_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(FSIZE_CHILD_ENV, &path)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let appended: usize = stdout
            .split("appended=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("child reported its count");
        // Each line is ~170 bytes, so the 1000-byte cap cut a write part-way.
        assert!(appended > 0);
        let lines = lines(&path);
        assert_eq!(lines.len(), appended);
        assert!(fs::metadata(&path).unwrap().len() < 1000);
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_atomic(dir.path(), "rollback_x.json", b"first").unwrap();
        assert_eq!(path, dir.path().join("rollback_x.json"));
        let path2 = write_atomic(dir.path(), "rollback_x.json", b"second, longer").unwrap();
        assert_eq!(path2, path);
        assert_eq!(fs::read(&path).unwrap(), b"second, longer");
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["rollback_x.json".to_string()]);
    }

    #[test]
    fn opening_a_log_that_is_a_symlink_fails_and_leaves_its_target_alone() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        // No trailing newline: following the link would "repair" (truncate) it.
        fs::write(&victim, "secret\nlast line").unwrap();
        let path = dir.path().join("audit.log");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let error = JsonLinesLog::open(&path).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ELOOP), "{error}");
        let mut analytics = Analytics::new(dir.path());
        let record = AuditRecord::new(at(), AuditEvent::MonitoringStarted, Some("s"));
        assert!(analytics.audit(&record).is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"secret\nlast line");
    }

    #[test]
    fn write_atomic_does_not_write_through_a_symlink_at_its_temp_name() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "secret").unwrap();
        let temp = dir
            .path()
            .join(format!(".worker_manager.json.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &temp).unwrap();
        let error = write_atomic(dir.path(), "worker_manager.json", b"{}").unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::ELOOP), "{error}");
        assert_eq!(fs::read(&victim).unwrap(), b"secret");
        assert!(!dir.path().join("worker_manager.json").exists());
    }

    #[test]
    fn a_rotated_log_is_reopened_and_later_records_go_to_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut analytics = Analytics::new(dir.path());
        let one = AuditRecord::new(at(), AuditEvent::MonitoringStarted, Some("s-1"));
        let two = AuditRecord::new(at(), AuditEvent::HealthCheck, Some("s-1"));
        analytics.audit(&one).unwrap();
        let log = analytics.audit_log_path();
        let rotated = dir.path().join("audit.log.1");
        fs::rename(&log, &rotated).unwrap();
        analytics.audit(&two).unwrap();
        assert_eq!(lines(&rotated), vec![to_json(&one)]);
        assert_eq!(lines(&log), vec![to_json(&two)]);
        // Same for the kill switch log.
        let kill = KillSwitchRecord {
            timestamp: rfc3339_millis(at()),
            action: KillSwitchAction::Activated,
            value: "1".into(),
            source: KillSwitchSource::Manual,
            operator: None,
            reason: "test".into(),
            session_id: None,
        };
        analytics.kill_switch(&kill).unwrap();
        let kill_log = analytics.kill_switch_log_path();
        fs::rename(&kill_log, dir.path().join("kill_switch_audit.log.1")).unwrap();
        analytics.kill_switch(&kill).unwrap();
        assert_eq!(lines(&kill_log), vec![to_json(&kill)]);
    }

    #[test]
    fn a_deleted_analytics_dir_is_recreated_and_the_record_lands_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let analytics_dir = dir.path().join("analytics");
        let mut analytics = Analytics::open(&analytics_dir).unwrap();
        let one = AuditRecord::new(at(), AuditEvent::MonitoringStarted, Some("s-1"));
        analytics.audit(&one).unwrap();
        fs::remove_dir_all(&analytics_dir).unwrap();
        let two = AuditRecord::new(at(), AuditEvent::RollbackExecuted, Some("s-1"));
        analytics.audit(&two).unwrap();
        assert_eq!(lines(&analytics.audit_log_path()), vec![to_json(&two)]);
        let mode = fs::metadata(&analytics_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o750);
    }

    #[test]
    fn a_line_written_to_a_log_deleted_mid_write_does_not_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (mut log, _) = JsonLinesLog::open(&path).unwrap();
        assert!(log.is_current());
        let error = log
            .append_line_with(b"{}\n", |file, line| {
                fs::remove_file(dir.path().join("audit.log"))?;
                file.write_all(line)
            })
            .unwrap_err();
        assert!(error.to_string().contains("deleted while open"), "{error}");
        assert!(!log.is_current());
    }

    #[test]
    fn write_atomic_into_missing_dir_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(write_atomic(&missing, "a.json", b"x").is_err());
        assert!(!missing.exists());
    }

    #[test]
    fn analytics_writes_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let analytics_dir = dir.path().join("state/analytics");
        let mut analytics = Analytics::open(&analytics_dir).unwrap();
        assert_eq!(analytics.dir(), analytics_dir);

        let record = AuditRecord::new(at(), AuditEvent::MonitoringStarted, Some("s-1"));
        analytics.audit(&record).unwrap();
        analytics.audit(&record).unwrap();
        let kill = KillSwitchRecord {
            timestamp: rfc3339_millis(at()),
            action: KillSwitchAction::Activated,
            value: "1".into(),
            source: KillSwitchSource::Manual,
            operator: Some("alice".into()),
            reason: "test".into(),
            session_id: None,
        };
        analytics.kill_switch(&kill).unwrap();
        assert_eq!(lines(&analytics.audit_log_path()).len(), 2);
        assert_eq!(
            lines(&analytics.kill_switch_log_path()),
            vec![to_json(&kill)]
        );

        let decision = decision_record();
        let path = analytics
            .write_artifact(ArtifactKind::Rollback, at(), &decision)
            .unwrap();
        assert_eq!(path, analytics.artifact_path(ArtifactKind::Rollback, at()));
        assert_eq!(
            path,
            analytics_dir.join("rollback_20251022T143215.123Z.json")
        );
        let read: DecisionRecord = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(read, decision);

        let workers = WorkerManagerRecord {
            active: "v1".into(),
            previous: Some("v2".into()),
            updated_at: rfc3339_millis(at()),
            session_id: Some("s-1".into()),
            state: crate::storage::states::SessionState::RolledBack,
        };
        let path = analytics.write_worker_manager(&workers).unwrap();
        assert_eq!(path, analytics.worker_manager_path());
        let read: WorkerManagerRecord = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(read, workers);
    }

    #[test]
    fn unwritable_analytics_dir_is_an_error_then_recovers() {
        // Running as root defeats permission bits, so block the directory with a file.
        let dir = tempfile::tempdir().unwrap();
        let analytics_dir = dir.path().join("analytics");
        fs::write(&analytics_dir, b"in the way").unwrap();
        assert!(Analytics::open(&analytics_dir).is_err());

        let mut analytics = Analytics::new(&analytics_dir);
        let record = AuditRecord::new(at(), AuditEvent::HealthCheck, None);
        assert!(analytics.audit(&record).is_err());
        assert!(analytics
            .write_artifact(ArtifactKind::Escalation, at(), &decision_record())
            .is_err());

        // Once the obstacle is gone the same value works: callers just retry.
        fs::remove_file(&analytics_dir).unwrap();
        analytics.audit(&record).unwrap();
        assert_eq!(lines(&analytics.audit_log_path()).len(), 1);
    }
}
