//! Writes the audit trail without ever holding up an action.
//!
//! Every record goes into an in-memory FIFO and is written to `analytics/` in order. A
//! write that fails (full disk, unwritable directory) is logged to the journal and the
//! record stays queued — also copied into the `outbox` table of `rollbackd.db` when that
//! is writable, so a restart does not lose it — and is retried on the next record or the
//! next [`Recorder::retry`]. Records are written in the order they were made.
//!
//! The recorder is also the one place alerts come from: with an [`Alerter`] attached,
//! every audit record whose event is alerted (rollback executed/failed, escalation,
//! kill-switch changes) is handed to it as it is recorded. Handing over never waits.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::daemon::alerts::Alerter;
use crate::daemon::db::Db;
use crate::storage::audit::{
    Analytics, ArtifactKind, AuditRecord, DecisionRecord, KillSwitchRecord, WorkerManagerRecord,
};

/// One record on its way to `analytics/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Pending {
    Audit(AuditRecord),
    KillSwitch(KillSwitchRecord),
    Artifact {
        name: String,
        record: Box<DecisionRecord>,
    },
    WorkerManager(WorkerManagerRecord),
    /// An incident report (`incident_<stamp>.md`), replaced whole under its name.
    Report {
        name: String,
        markdown: String,
    },
}

impl Pending {
    fn outbox_kind(&self) -> &'static str {
        match self {
            Pending::Audit(_) => crate::storage::store::OUTBOX_AUDIT,
            Pending::KillSwitch(_) => crate::storage::store::OUTBOX_KILL_SWITCH,
            Pending::Artifact { .. } => crate::storage::store::OUTBOX_ARTIFACT,
            Pending::WorkerManager(_) => crate::storage::store::OUTBOX_WORKER_MANAGER,
            Pending::Report { .. } => crate::storage::store::OUTBOX_REPORT,
        }
    }
}

struct Queued {
    record: Pending,
    outbox_id: Option<i64>,
}

struct Inner {
    analytics: Analytics,
    queue: VecDeque<Queued>,
}

#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Mutex<Inner>>,
    db: Option<Db>,
    dir: PathBuf,
    /// Shared by every clone, so a reload that replaces it reaches the executor too.
    alerts: Arc<Mutex<Option<Alerter>>>,
}

impl Recorder {
    /// A recorder for `dir` (`state_dir/analytics`). Records left in the outbox by an
    /// earlier run are queued first.
    pub async fn new(dir: PathBuf, db: Option<Db>) -> Recorder {
        let recorder = Recorder {
            inner: Arc::new(Mutex::new(Inner {
                analytics: Analytics::new(&dir),
                queue: VecDeque::new(),
            })),
            db,
            dir,
            alerts: Arc::new(Mutex::new(None)),
        };
        if let Some(db) = &recorder.db {
            match db.call(|store| store.outbox(10_000)).await {
                Ok(rows) => {
                    let mut inner = recorder.lock();
                    for row in rows {
                        match serde_json::from_str::<Pending>(&row.payload) {
                            Ok(record) => inner.queue.push_back(Queued {
                                record,
                                outbox_id: Some(row.id),
                            }),
                            Err(err) => tracing::error!(
                                outbox_id = row.id,
                                "dropping an unreadable outbox record: {err}"
                            ),
                        }
                    }
                    if !inner.queue.is_empty() {
                        tracing::info!(
                            records = inner.queue.len(),
                            "records from an earlier run are waiting to be written"
                        );
                    }
                }
                Err(err) => tracing::warn!("cannot read the outbox: {err}"),
            }
        }
        recorder
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn dir(&self) -> &PathBuf {
        &self.dir
    }

    pub fn artifact_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Attaches an alerter: alerted audit records are handed to it from now on.
    pub fn with_alerts(self, alerter: Alerter) -> Recorder {
        self.set_alerts(Some(alerter));
        self
    }

    /// Replaces (or removes) the alerter, for every clone of this recorder.
    pub fn set_alerts(&self, alerter: Option<Alerter>) {
        *self.alerts.lock().unwrap_or_else(|p| p.into_inner()) = alerter;
    }

    /// The attached alerter, if any.
    pub fn alerter(&self) -> Option<Alerter> {
        self.alerts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits up to `within` for queued alerts to be delivered or given up on (before the
    /// process exits). True when none is left.
    pub async fn flush_alerts(&self, within: std::time::Duration) -> bool {
        match self.alerter() {
            Some(alerter) => alerter.flush(within).await,
            None => true,
        }
    }

    /// Records an audit line. An alerted event is first handed to the alerter (queued,
    /// never awaited), so a failing disk does not hold the alert back either.
    pub async fn audit(&self, record: AuditRecord) {
        if let Some(alerter) = self.alerter() {
            alerter.send(&record);
        }
        self.push(Pending::Audit(record)).await;
    }

    pub async fn kill_switch(&self, record: KillSwitchRecord) {
        self.push(Pending::KillSwitch(record)).await;
    }

    /// Queues an artifact under a name fixed by the caller (derived from the action's
    /// start time, so a re-write after a crash replaces rather than duplicates it).
    pub async fn artifact(&self, name: String, record: DecisionRecord) -> PathBuf {
        let path = self.artifact_path(&name);
        self.push(Pending::Artifact {
            name,
            record: Box::new(record),
        })
        .await;
        path
    }

    /// Queues an incident report under its name (a later one of the same incident
    /// replaces it).
    pub async fn report(&self, name: String, markdown: String) -> PathBuf {
        let path = self.artifact_path(&name);
        self.push(Pending::Report { name, markdown }).await;
        path
    }

    pub async fn worker_manager(&self, record: WorkerManagerRecord) {
        self.push(Pending::WorkerManager(record)).await;
    }

    /// Whether an audit line for `event` about action `action_id` exists already, written or
    /// queued: a resumed action uses it so its audit lines are written exactly once.
    pub async fn audit_has(
        &self,
        action_id: Option<i64>,
        event: crate::storage::audit::AuditEvent,
    ) -> bool {
        // An action without an id was never recorded, so nothing can say it was written.
        let Some(action_id) = action_id else {
            return false;
        };
        let matches = move |record: &AuditRecord| {
            record.event == event
                && record
                    .fields
                    .get("actionId")
                    .and_then(serde_json::Value::as_i64)
                    == Some(action_id)
        };
        if self
            .lock()
            .queue
            .iter()
            .any(|q| matches!(&q.record, Pending::Audit(r) if matches(r)))
        {
            return true;
        }
        let path = self.dir.join(crate::storage::audit::AUDIT_LOG_FILE);
        tokio::task::spawn_blocking(move || {
            let Ok(text) = std::fs::read_to_string(&path) else {
                return false;
            };
            text.lines()
                .filter_map(|line| serde_json::from_str::<AuditRecord>(line).ok())
                .any(|record| matches(&record))
        })
        .await
        .unwrap_or(false)
    }

    /// Closes the open logs so the next record reopens them by name (SIGHUP).
    pub fn reopen_logs(&self) {
        self.lock().analytics.reopen();
    }

    /// Number of records not yet written.
    pub fn backlog(&self) -> usize {
        self.lock().queue.len()
    }

    /// Records an audit line after running `before` on the same blocking-pool thread, in
    /// one hop: a check's database row, then its fsynced line. `before` runs first whatever
    /// happens to the line.
    pub async fn audit_after(&self, record: AuditRecord, before: impl FnOnce() + Send + 'static) {
        if let Some(alerter) = self.alerter() {
            alerter.send(&record);
        }
        self.lock().queue.push_back(Queued {
            record: Pending::Audit(record),
            outbox_id: None,
        });
        self.write_queue(Some(Box::new(before))).await;
    }

    async fn push(&self, record: Pending) {
        self.lock().queue.push_back(Queued {
            record,
            outbox_id: None,
        });
        self.retry().await;
    }

    /// Writes whatever is queued, in order, stopping at the first failure.
    pub async fn retry(&self) {
        self.write_queue(None).await;
    }

    async fn write_queue(&self, before: Option<Box<dyn FnOnce() + Send>>) {
        let inner = self.inner.clone();
        let written = tokio::task::spawn_blocking(move || {
            if let Some(before) = before {
                before();
            }
            let mut guard = inner.lock().unwrap_or_else(|p| p.into_inner());
            let inner = &mut *guard;
            let mut written = Vec::new();
            while let Some(front) = inner.queue.front() {
                // Written from where it is queued: no copy of the record per write.
                let result = write(&mut inner.analytics, &front.record);
                match result {
                    Ok(()) => {
                        let done = inner.queue.pop_front().expect("front exists");
                        if let Some(id) = done.outbox_id {
                            written.push(id);
                        }
                    }
                    Err(err) => {
                        tracing::error!(
                            backlog = inner.queue.len(),
                            "cannot write to the analytics directory ({err}); records are kept and retried"
                        );
                        break;
                    }
                }
            }
            let unsaved: Vec<(usize, Pending)> = inner
                .queue
                .iter()
                .enumerate()
                .filter(|(_, q)| q.outbox_id.is_none())
                .map(|(i, q)| (i, q.record.clone()))
                .collect();
            (written, unsaved)
        })
        .await
        .expect("recorder write panicked");
        let (written, unsaved) = written;
        let Some(db) = &self.db else { return };
        if !written.is_empty() {
            let result = db
                .call(move |store| {
                    for id in written {
                        store.remove_outbox(id)?;
                    }
                    Ok(())
                })
                .await;
            if let Err(err) = result {
                tracing::warn!("cannot clear written records from the outbox: {err}");
            }
        }
        // Records that could not be written are copied to the outbox so a restart keeps them.
        for (_, record) in unsaved {
            let payload = match serde_json::to_string(&record) {
                Ok(payload) => payload,
                Err(_) => continue,
            };
            let kind = record.outbox_kind();
            let now = now_ms(SystemTime::now());
            let saved = db
                .call(move |store| store.push_outbox(kind, None, &payload, now))
                .await;
            match saved {
                Ok(id) => {
                    let mut inner = self.lock();
                    if let Some(q) = inner
                        .queue
                        .iter_mut()
                        .find(|q| q.outbox_id.is_none() && same(&q.record, &record))
                    {
                        q.outbox_id = Some(id);
                    }
                }
                Err(err) => {
                    tracing::error!(
                        "cannot keep an unwritten record in rollbackd.db either: {err}"
                    );
                    break;
                }
            }
        }
    }
}

fn same(a: &Pending, b: &Pending) -> bool {
    serde_json::to_string(a).ok() == serde_json::to_string(b).ok()
}

fn write(analytics: &mut Analytics, record: &Pending) -> std::io::Result<()> {
    match record {
        Pending::Audit(record) => analytics.audit(record),
        Pending::KillSwitch(record) => analytics.kill_switch(record),
        Pending::Artifact { name, record } => {
            let kind = record.decision;
            let _ = kind;
            write_named_artifact(analytics, name, record)
        }
        Pending::WorkerManager(record) => analytics.write_worker_manager(record).map(|_| ()),
        Pending::Report { name, markdown } => {
            crate::storage::statedir::create_dir(analytics.dir())?;
            crate::storage::audit::write_atomic(analytics.dir(), name, markdown.as_bytes())
                .map(|_| ())
        }
    }
}

fn write_named_artifact(
    analytics: &Analytics,
    name: &str,
    record: &DecisionRecord,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    crate::storage::statedir::create_dir(analytics.dir())?;
    crate::storage::audit::write_atomic(analytics.dir(), name, &bytes).map(|_| ())
}

/// Unix milliseconds.
pub fn now_ms(t: SystemTime) -> i64 {
    crate::core::time::to_ms(t)
}

/// The artifact name of an action, fixed by its start time.
pub fn artifact_name(kind: ArtifactKind, started_at_ms: i64) -> String {
    crate::storage::audit::artifact_file_name(kind, crate::core::time::from_ms(started_at_ms))
}
