//! The fleet as the daemon sees it (SPEC §8): what the fleet agent (`crate::fleet::agent`,
//! its own task) reports, mirrored into the host. The fleet kill switch goes into the
//! application's `settings` table through the same write path as the host's own (BEGIN
//! IMMEDIATE, synchronous=FULL, retried while busy, read back) and is audited with
//! `source: fleet`; the effective value is local OR fleet (`fleet::mirror`). The host's
//! registration follows the driver's state. Nothing here waits on etcd.

use std::collections::{BTreeMap, HashSet};

use super::*;
use crate::fleet::agent::{FleetEvent, Link};
use crate::fleet::{FleetKillSwitch, HostRecord, Known, Mirror, Passed, Verdict, VerdictEntry};

/// `meta` key: the fleet kill switch as last mirrored, `{"revision": N, "on": bool}`.
const FLEET_APPLIED: &str = "fleet_kill_switch_applied";
/// `meta` key: whether the host's kill switch was turned on here, not by the fleet.
const LOCAL_HOLD: &str = "kill_switch_local_hold";
/// `meta` key: the rollback verdicts not yet in etcd (JSON list), so that a restart while
/// cut off loses none.
const VERDICTS_PENDING: &str = "fleet_verdicts_pending";

/// `meta` key: the highest action id whose verdict is queued (in `VERDICTS_PENDING` or
/// already in etcd). A rollback above it was carried out but its verdict not yet queued (a
/// kill -9 between the two): queued again at start.
const VERDICTS_THROUGH: &str = "fleet_verdicts_through";

/// `meta` key: the etcd revisions this host's current session is ordered against
/// ([`SessionRevisions`]), so a restart does not follow a verdict a promotion went past.
const SESSION_REVISIONS: &str = "fleet_session_revisions";

/// The most verdicts (and unusable keys) `status` lists in full; it counts the rest.
const STATUS_VERDICTS: usize = 20;

/// How long a promotion that came before the fleet agent said anything waits for it (the
/// verdicts read, or the link's failure) before it goes through the gate with what is
/// known; checked on the 5 s tick.
const FIRST_VIEW_WAIT: Duration = Duration::from_secs(5);

/// What the fleet gives the driver.
pub enum FleetInputs {
    /// `rollbackd run`: the fleet agent's channels.
    Agent {
        events: mpsc::Receiver<FleetEvent>,
        host: watch::Sender<Option<HostRecord>>,
        verdicts: mpsc::UnboundedSender<Verdict>,
    },
    /// A `promote` run without a daemon: the verdicts of the version, read from etcd by
    /// the command (`cli::fleet::read_for_promotion`), for the same gate.
    Read(FleetRead),
}

/// The verdict keys of one version as a command read them, and how complete that is.
pub struct FleetRead {
    pub entries: Vec<VerdictEntry>,
    pub revision: i64,
    pub known: Known,
}

/// The etcd revisions the current session's verdicts are ordered against: a verdict
/// written at a revision above the one this host had seen when it promoted the version
/// (or when its stability watch began) is news and may be followed; one at or below it
/// was there to see (refused, or forced past). `None`: not known (a session restored
/// without one, a promotion forced while cut off, a watch begun while cut off): the next
/// complete read of the verdicts sets it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(super) struct SessionRevisions {
    session: String,
    promoted: Option<i64>,
    /// The session's stability watch began (`watch`: the revision seen then, if known).
    #[serde(default)]
    watching: bool,
    watch: Option<i64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Applied {
    revision: i64,
    on: bool,
}

/// A mirror task's result.
pub(super) struct MirrorDone {
    revision: i64,
    on: bool,
    decision: Mirror,
}

pub(super) struct FleetState {
    config: crate::config::FleetConfig,
    host: watch::Sender<Option<HostRecord>>,
    verdicts_tx: mpsc::UnboundedSender<Verdict>,
    link: Option<Link>,
    /// The fleet kill switch as last seen, and its revision.
    kill: Option<(Option<FleetKillSwitch>, i64)>,
    applied: Applied,
    mirror_busy: bool,
    mirror_again: bool,
    done_tx: mpsc::Sender<MirrorDone>,
    /// Every key under `verdicts/`, by its etcd key (the key decides what it is about).
    verdicts: BTreeMap<String, VerdictEntry>,
    /// The verdicts are known completely through this revision (while `live`), or as of
    /// it (cut off since).
    seen: i64,
    /// The agent read every verdict and its watch has not failed since.
    live: bool,
    /// What the current session's verdicts are ordered against.
    revisions: Option<SessionRevisions>,
    /// Promotions that came before the agent said anything, and since when.
    waiting: Vec<(Command, std::time::Instant)>,
    /// The versions this host ran when the daemon started, from `rollbackd.db` (its
    /// registration's when no session has run since).
    known_workers: (Option<String>, Option<String>),
    /// `local_hold` as last written to `rollbackd.db`.
    hold_saved: Option<bool>,
    /// A fleet reset this host has not mirrored yet: a check failed within its
    /// `reset_quiet_period` (why).
    quiet_held: Option<String>,
    /// The fleet revision whose held reset was logged.
    quiet_logged: Option<i64>,
}

impl Driver {
    /// Takes the fleet agent's channels (when `[fleet]` is configured); the receivers go
    /// into the driver's loop.
    pub(super) async fn fleet_start(
        &mut self,
        inputs: Option<FleetInputs>,
    ) -> Option<(mpsc::Receiver<FleetEvent>, mpsc::Receiver<MirrorDone>)> {
        let (events, host, verdicts_tx) = match inputs? {
            FleetInputs::Agent {
                events,
                host,
                verdicts,
            } => (events, host, verdicts),
            FleetInputs::Read(read) => {
                self.fleet_read = Some(read);
                return None;
            }
        };
        let config = self.config.config.fleet.clone()?;
        let (done_tx, done_rx) = mpsc::channel(4);
        let (applied, hold, revisions, active, previous) = self
            .db
            .call(|store| {
                Ok((
                    store.get_meta(FLEET_APPLIED)?,
                    store.get_meta(LOCAL_HOLD)?,
                    store.get_meta(SESSION_REVISIONS)?,
                    store.get_meta("active")?,
                    store.get_meta("previous")?,
                ))
            })
            .await
            .unwrap_or((None, None, None, None, None));
        let revisions: Option<SessionRevisions> =
            revisions.and_then(|text| serde_json::from_str(&text).ok());
        let known_workers = (
            stored_worker_id("active worker", active)
                .or_else(|| self.config.config.worker.active.clone()),
            stored_worker_id("previous worker", previous),
        );
        let applied: Applied = applied
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        // Never recorded (a host that joins a fleet): a kill switch already on was set
        // here, so a fleet reset must not clear it.
        let hold = hold.map(|text| text == "true").unwrap_or_else(|| {
            self.kill_value
                .as_ref()
                .is_some_and(|v| v.as_deref() == Some("1"))
        });
        self.kill_writes.set_local_hold(hold);
        self.fleet = Some(FleetState {
            config,
            host,
            verdicts_tx,
            link: None,
            kill: None,
            applied,
            mirror_busy: false,
            mirror_again: false,
            done_tx,
            verdicts: BTreeMap::new(),
            seen: 0,
            live: false,
            revisions,
            waiting: Vec::new(),
            known_workers,
            hold_saved: None,
            quiet_held: None,
            quiet_logged: None,
        });
        self.fleet_save_hold().await;
        self.fleet_track_session().await;
        self.fleet_publish_host();
        self.fleet_queue_missed_verdicts().await;
        // Verdicts a previous run could not write yet.
        for verdict in self.fleet_pending_verdicts().await {
            self.fleet_verdict(verdict);
        }
        Some((events, done_rx))
    }

    async fn fleet_pending_verdicts(&self) -> Vec<Verdict> {
        self.db
            .call(|store| store.get_meta(VERDICTS_PENDING))
            .await
            .ok()
            .flatten()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// Saves the verdicts still to write and, with `through`, raises
    /// `fleet_verdicts_through` to that action id: one hop, the queue first.
    async fn fleet_save_pending(&self, verdicts: Vec<Verdict>, through: Option<ActionId>) {
        let text = serde_json::to_string(&verdicts).unwrap_or_else(|_| "[]".into());
        if let Err(err) = self
            .db
            .call(move |store| {
                store.set_meta(VERDICTS_PENDING, &text)?;
                let Some(id) = through else { return Ok(()) };
                let saved = store
                    .get_meta(VERDICTS_THROUGH)?
                    .and_then(|t| t.parse::<ActionId>().ok())
                    .unwrap_or(0);
                if id > saved {
                    store.set_meta(VERDICTS_THROUGH, &id.to_string())?;
                }
                Ok(())
            })
            .await
        {
            tracing::warn!("fleet: cannot remember the verdicts still to write: {err}");
        }
    }

    /// A rollback of `from` was executed: its verdict goes to the fleet (kept in
    /// `rollbackd.db` until the agent says it is in etcd).
    pub(super) async fn fleet_rolled_back(
        &mut self,
        id: Option<ActionId>,
        from: &str,
        to: &str,
        artifact: &std::path::Path,
    ) {
        let Some(host) = self.fleet_host().map(str::to_owned) else {
            return;
        };
        let row = match id {
            Some(id) => self
                .db
                .call(move |store| store.action(id))
                .await
                .ok()
                .flatten(),
            None => None,
        };
        let artifact = artifact
            .file_name()
            .map(|name| name.to_string_lossy().into_owned());
        let verdict = verdict_of(row.as_ref(), host, from, to, artifact, self.now());
        let mut pending = self.fleet_pending_verdicts().await;
        pending.retain(|v| !(v.version == verdict.version && v.host == verdict.host));
        pending.push(verdict.clone());
        self.fleet_save_pending(pending, id).await;
        self.fleet_verdict(verdict);
    }

    /// At start: rollbacks carried out whose verdict was never queued (the daemon died
    /// between the rollback's end and the queueing) are queued now. A host that joins a
    /// fleet starts from its newest action: its past is not sent.
    async fn fleet_queue_missed_verdicts(&mut self) {
        let Some(host) = self.fleet_host().map(str::to_owned) else {
            return;
        };
        let found = self
            .db
            .call(|store| {
                let through = store
                    .get_meta(VERDICTS_THROUGH)?
                    .and_then(|t| t.parse::<ActionId>().ok());
                match through {
                    Some(through) => store.rollbacks_done_after(through),
                    None => {
                        let max = store.max_action_id()?;
                        store.set_meta(VERDICTS_THROUGH, &max.to_string())?;
                        Ok(Vec::new())
                    }
                }
            })
            .await;
        let rows = match found {
            Ok(rows) => rows,
            Err(err) => {
                tracing::warn!(
                    "fleet: cannot look for rollbacks whose verdict was not queued: {err}"
                );
                return;
            }
        };
        if rows.is_empty() {
            return;
        }
        let mut pending = self.fleet_pending_verdicts().await;
        let mut through = 0;
        for row in &rows {
            through = through.max(row.id.unwrap_or(0));
            let (Some(from), Some(to)) = (row.from_worker.as_deref(), row.to_worker.as_deref())
            else {
                continue;
            };
            if pending.iter().any(|v| v.version == from && v.host == host) {
                continue;
            }
            let at = row
                .finished_at_ms
                .map_or_else(|| self.now(), crate::core::time::from_ms);
            tracing::warn!(version = %from, action = ?row.id, "fleet: a rollback's verdict was never queued (rollbackd stopped in between); queueing it now");
            pending.push(verdict_of(
                Some(row),
                host.clone(),
                from,
                to,
                row.artifact_name.clone(),
                at,
            ));
        }
        self.fleet_save_pending(pending, Some(through)).await;
    }

    pub(super) async fn fleet_event(&mut self, event: FleetEvent) {
        let Some(fleet) = &mut self.fleet else { return };
        match event {
            FleetEvent::Link(link) => {
                if let Some(metrics) = &self.metrics {
                    metrics.fleet_link(link.connected);
                }
                if !link.connected {
                    fleet.live = false;
                }
                fleet.link = Some(link);
                self.fleet_release_waiting(false).await;
            }
            FleetEvent::KillSwitch { record, revision } => {
                if let Some(metrics) = &self.metrics {
                    metrics.fleet_kill_switch(record.as_ref().is_some_and(|r| r.on()));
                }
                fleet.kill = Some((record, revision));
                self.fleet_mirror();
            }
            FleetEvent::Verdicts {
                snapshot,
                revision,
                entries,
                deleted,
            } => {
                let mut gone = deleted;
                if snapshot {
                    // Every key there now: any other was deleted while this host was away.
                    let present: HashSet<&str> = entries.iter().map(|e| e.key.as_str()).collect();
                    gone.extend(
                        fleet
                            .verdicts
                            .keys()
                            .filter(|key| !present.contains(key.as_str()))
                            .cloned(),
                    );
                    fleet.live = true;
                    fleet.seen = revision;
                } else {
                    fleet.seen = fleet.seen.max(revision);
                }
                for key in gone {
                    if fleet.verdicts.remove(&key).is_some() {
                        tracing::info!(
                            "fleet: the verdict at {} was deleted; it no longer refuses a promotion",
                            crate::text::escape(&key)
                        );
                    }
                }
                let mut news = Vec::new();
                for entry in entries {
                    let new = fleet
                        .verdicts
                        .get(&entry.key)
                        .is_none_or(|known| known.mod_revision != entry.mod_revision);
                    if new {
                        news.push(entry.clone());
                    }
                    fleet.verdicts.insert(entry.key.clone(), entry);
                }
                if snapshot {
                    // A reference not known yet is this read: what it holds was there to
                    // see before this host could order it.
                    self.fleet_set_unknown_revisions(revision).await;
                }
                for entry in news {
                    self.fleet_consider(entry).await;
                }
                if snapshot {
                    self.fleet_release_waiting(false).await;
                }
            }
            FleetEvent::VerdictWritten { version } => {
                tracing::info!(%version, "fleet: the rollback verdict is in etcd");
                let mut pending = self.fleet_pending_verdicts().await;
                let before = pending.len();
                pending.retain(|v| v.version != version);
                if pending.len() != before {
                    self.fleet_save_pending(pending, None).await;
                }
            }
        }
    }

    /// Whether a promotion must wait for the fleet agent's first word (it has said nothing
    /// since the daemon started: no verdicts read, no link failure).
    pub(super) fn fleet_promotion_waits(&self) -> bool {
        self.fleet
            .as_ref()
            .is_some_and(|f| f.link.is_none() && !f.live)
    }

    /// Keeps a promotion until the fleet agent's first word (or [`FIRST_VIEW_WAIT`]).
    pub(super) fn fleet_wait(&mut self, command: Command) {
        if let Some(fleet) = &mut self.fleet {
            tracing::info!("promotion waiting for the fleet agent's first read of the verdicts");
            fleet.waiting.push((command, std::time::Instant::now()));
        }
    }

    /// Hands the promotions kept by [`Driver::fleet_wait`] to the gate: all of them once
    /// the agent said something, or (`tick`) those that waited [`FIRST_VIEW_WAIT`].
    pub(super) async fn fleet_release_waiting(&mut self, tick: bool) {
        let Some(fleet) = &mut self.fleet else { return };
        if fleet.waiting.is_empty() {
            return;
        }
        let ready = fleet.link.is_some() || fleet.live;
        let waiting = std::mem::take(&mut fleet.waiting);
        let (go, keep): (Vec<_>, Vec<_>) = waiting
            .into_iter()
            .partition(|(_, since)| ready || (tick && since.elapsed() >= FIRST_VIEW_WAIT));
        fleet.waiting = keep;
        for (command, _) in go {
            self.promote(command).await;
        }
    }

    /// Answers the promotions still kept when the daemon stops.
    pub(super) async fn fleet_drop_waiting(&mut self) {
        let Some(fleet) = &mut self.fleet else { return };
        for (command, _) in std::mem::take(&mut fleet.waiting) {
            let _ = command
                .replies
                .send(Reply::Failed {
                    message: "rollbackd is shutting down".into(),
                    exit: 1,
                })
                .await;
        }
    }

    /// The fleet's gate for a promotion of `version` ([`crate::fleet::promotion_gate`])
    /// over what this daemon knows of the verdicts (the agent's, or a command's read
    /// without a daemon); with the revision the new session is to be ordered against.
    /// `None`: no fleet.
    pub(super) fn fleet_gate(
        &self,
        version: &str,
        force: bool,
        reason: Option<&str>,
    ) -> Option<Result<(Passed, Option<i64>), String>> {
        self.config.config.fleet.as_ref()?;
        let (entries, known, seen): (Vec<&VerdictEntry>, Known, i64) =
            match (&self.fleet, &self.fleet_read) {
                (Some(fleet), _) => {
                    let known = if fleet.live {
                        Known::Complete
                    } else {
                        match &fleet.link {
                            Some(link) if link.credentials => {
                                Known::Credentials(link.error.clone().unwrap_or_default())
                            }
                            Some(link) => Known::Stale(format!(
                                "cut off from etcd since {}: {}",
                                rfc3339_millis(link.since),
                                link.error.as_deref().unwrap_or("no reason")
                            )),
                            None => Known::Stale("etcd has not answered yet".into()),
                        }
                    };
                    (
                        fleet
                            .verdicts
                            .values()
                            .filter(|e| e.version == version)
                            .collect(),
                        known,
                        fleet.seen,
                    )
                }
                (None, Some(read)) => (
                    read.entries
                        .iter()
                        .filter(|e| e.version == version)
                        .collect(),
                    read.known.clone(),
                    read.revision,
                ),
                (None, None) => (
                    Vec::new(),
                    Known::Stale("the fleet agent is not running".into()),
                    0,
                ),
            };
        let complete = known == Known::Complete;
        Some(
            crate::fleet::promotion_gate(version, &entries, &known, force, reason).map(|passed| {
                // Forced past what could not be read: what is there when it can be read
                // was forced past too. Not forced: anything not seen yet is news.
                let reference = (complete || !passed.forced).then_some(seen);
                (passed, reference)
            }),
        )
    }

    /// After a promotion went through the gate: the new session's verdicts are ordered
    /// against `reference` (kept in `rollbackd.db` for a restart).
    pub(super) async fn fleet_promoted(&mut self, before: Option<String>, reference: Option<i64>) {
        if self.config.config.fleet.is_none() {
            return;
        }
        let Some(session) = self.sup.session() else {
            return;
        };
        if before.as_deref() == Some(session.record.id.as_str()) {
            return;
        }
        let revisions = SessionRevisions {
            session: session.record.id.clone(),
            promoted: reference,
            watching: false,
            watch: None,
        };
        self.fleet_save_revisions(revisions).await;
    }

    async fn fleet_save_revisions(&mut self, revisions: SessionRevisions) {
        if let Some(fleet) = &mut self.fleet {
            if fleet.revisions.as_ref() == Some(&revisions) {
                return;
            }
            fleet.revisions = Some(revisions.clone());
        }
        let text = serde_json::to_string(&revisions).unwrap_or_default();
        if let Err(err) = self
            .db
            .call(move |store| store.set_meta(SESSION_REVISIONS, &text))
            .await
        {
            // After a restart the session's reference is then the first read: a verdict
            // written meanwhile is not followed (never one the promotion went past).
            tracing::warn!("fleet: cannot remember the etcd revision of this promotion: {err}");
        }
    }

    /// Follows the current session: a session this host has no reference for (restored
    /// from a build that kept none) is ordered against the next complete read; a
    /// stability watch that began is ordered against what was seen then.
    pub(super) async fn fleet_track_session(&mut self) {
        let Some(fleet) = &self.fleet else { return };
        let Some(session) = self.sup.session() else {
            return;
        };
        let current = fleet
            .revisions
            .clone()
            .filter(|r| r.session == session.record.id);
        let revisions = match current {
            None => {
                tracing::info!(
                    session = %session.record.id,
                    "fleet: no etcd revision is recorded for this session's promotion; \
                     verdicts already in etcd when it is next read are taken as seen"
                );
                SessionRevisions {
                    session: session.record.id.clone(),
                    promoted: None,
                    watching: false,
                    watch: None,
                }
            }
            Some(mut revisions) => {
                if session.record.state == SessionState::StabilityWatch && !revisions.watching {
                    // Cut off when it began: what is there when the link heals was there
                    // to see (never an escalation for a verdict that may predate it).
                    revisions.watching = true;
                    revisions.watch = fleet.live.then_some(fleet.seen);
                }
                revisions
            }
        };
        self.fleet_save_revisions(revisions).await;
    }

    /// A complete read of the verdicts at `revision`: a reference not known yet is it.
    async fn fleet_set_unknown_revisions(&mut self, revision: i64) {
        self.fleet_track_session().await;
        let Some(fleet) = &self.fleet else { return };
        let Some(mut revisions) = fleet.revisions.clone() else {
            return;
        };
        if revisions.promoted.is_none() {
            revisions.promoted = Some(revision);
        }
        if revisions.watching && revisions.watch.is_none() {
            revisions.watch = Some(revision);
        }
        self.fleet_save_revisions(revisions).await;
    }

    /// The versions this host runs: its session's, else the last session's, else what
    /// `rollbackd.db` said at start (or `worker.active`).
    fn fleet_workers(&self) -> (Option<String>, Option<String>) {
        match (self.sup.session(), self.sup.last_workers()) {
            (Some(s), _) => (Some(s.record.active.clone()), s.record.previous.clone()),
            (None, Some((active, previous, _))) => (Some(active.clone()), previous.clone()),
            (None, None) => self
                .fleet
                .as_ref()
                .map(|f| f.known_workers.clone())
                .unwrap_or_default(),
        }
    }

    /// A verdict key written (new, or rewritten) while this host watches: followed when it
    /// is news to this session, else logged with why not.
    async fn fleet_consider(&mut self, entry: VerdictEntry) {
        let Some(fleet) = &self.fleet else { return };
        let verdict = match &entry.body {
            Ok(verdict) => verdict,
            Err(_) => {
                tracing::warn!(
                    "fleet: {}; it is not followed, and a promotion of {} is refused until it is \
                     deleted or forced past",
                    entry.unusable().unwrap_or_default(),
                    crate::text::escape(&entry.version)
                );
                return;
            }
        };
        if verdict.host == fleet.config.host {
            return;
        }
        let why = format!(
            "fleet: {} was rolled back on {}: {}",
            verdict.version, verdict.host, verdict.reason
        );
        let (active, _) = self.fleet_workers();
        if active.as_deref() != Some(verdict.version.as_str()) {
            tracing::debug!(
                "{why} (this host runs {})",
                active.as_deref().unwrap_or("-")
            );
            return;
        }
        if !fleet.config.follow_verdicts {
            tracing::warn!(
                "{why}; not following it: fleet.follow_verdicts is off (this host runs it)"
            );
            return;
        }
        let Some(session) = self.sup.session() else {
            tracing::warn!(
                "{why}; not following it: no monitoring session runs here (its last one \
                 ended); roll back by hand if this host must not run it"
            );
            return;
        };
        let watching = session.record.state == SessionState::StabilityWatch;
        let reference = fleet
            .revisions
            .as_ref()
            .filter(|r| r.session == session.record.id)
            .and_then(|r| if watching { r.watch } else { r.promoted });
        let since = if watching {
            "its stability watch began"
        } else {
            "this host promoted it"
        };
        match reference {
            Some(seen) if entry.mod_revision <= seen => tracing::warn!(
                "{why}; not following it: written at etcd revision {}, before {since} (this host \
                 had seen revision {seen} then: the verdict was there to see, and a promotion was \
                 refused or forced past it)",
                entry.mod_revision
            ),
            None => tracing::warn!(
                "{why}; not following it: written at etcd revision {}, and the revision this \
                 host had seen when {since} is not known (taken as seen)",
                entry.mod_revision
            ),
            Some(_) => {
                let (version, host, reason) = (
                    verdict.version.clone(),
                    verdict.host.clone(),
                    verdict.reason.clone(),
                );
                self.feed(Input::FleetVerdict {
                    version,
                    host,
                    reason,
                })
                .await;
            }
        }
    }

    /// Starts mirroring the fleet kill switch last seen, unless it is already mirrored or
    /// a mirror is running (then once more after it, with the latest value).
    fn fleet_mirror(&mut self) {
        let Some(fleet) = &mut self.fleet else { return };
        let Some((record, revision)) = fleet.kill.clone() else {
            return;
        };
        let on = record.as_ref().is_some_and(FleetKillSwitch::on);
        let new = match &record {
            Some(_) => revision > fleet.applied.revision,
            // No key: off; news only when the last value mirrored was on.
            None => fleet.applied.on && revision > fleet.applied.revision,
        };
        if !new {
            return;
        }
        if fleet.mirror_busy {
            fleet.mirror_again = true;
            return;
        }
        fleet.mirror_busy = true;
        let done = fleet.done_tx.clone();
        let ctx = self.context(None);
        let session_id = self.sup.session().map(|s| s.record.id.clone());
        self.side_tasks.retain(|task| !task.is_finished());
        self.side_tasks.push(tokio::spawn(async move {
            let ks = ctx.config.config.kill_switch.clone();
            let serialized = ctx.kill_writes.serialized().await;
            let (db, key) = (ks.database.clone(), ks.key.clone());
            let local =
                tokio::task::spawn_blocking(move || crate::appdb::killswitch::read(&db, &key))
                    .await
                    .expect("kill switch read panicked");
            let local = match local {
                Ok(value) => value,
                // Unreadable: a set is written anyway (the write waits the database out);
                // a reset is not, since what holds the switch on cannot be known.
                Err(err) if on => {
                    tracing::warn!("fleet: cannot read the kill switch before mirroring a set: {err}");
                    None
                }
                Err(err) => {
                    tracing::error!("fleet: cannot read the kill switch; the fleet reset is not mirrored: {err}");
                    drop(serialized);
                    let _ = done
                        .send(MirrorDone {
                            revision,
                            on,
                            decision: Mirror::KeepLocal,
                        })
                        .await;
                    return;
                }
            };
            // A fleet reset waits out this host's quiet period, as a local reset must,
            // unless it was forced.
            let hold = ctx.kill_writes.local_hold();
            let forced = record.as_ref().is_some_and(|r| r.force);
            let quiet = if !on && !hold && !forced && local.as_deref() == Some("1") {
                let (db, period, now) = (
                    ctx.config.config.rollbackd_db(),
                    ks.reset_quiet_period,
                    ctx.clock.now(),
                );
                match tokio::task::spawn_blocking(move || {
                    crate::appdb::killswitch::reset_refusal(&db, period, now)
                })
                .await
                .expect("reset check panicked")
                {
                    Ok(why) => why,
                    Err(err) => Some(format!(
                        "the reset quiet period cannot be checked here ({err}); treated as inside \
                         the reset quiet period"
                    )),
                }
            } else {
                None
            };
            let decision = crate::fleet::mirror(on, local.as_deref(), hold, quiet.as_deref());
            if let Mirror::Write(value) = decision {
                let previous = executor::write_kill_switch(&ctx, &ks, value, executor::Patience::Forever)
                    .await
                    .unwrap_or(None);
                drop(serialized);
                let (operator, reason) = match &record {
                    Some(r) => (
                        r.operator.clone(),
                        format!(
                            "fleet kill switch: {} (by {} at {}{}{})",
                            r.reason,
                            r.operator,
                            r.at,
                            r.from_host
                                .as_deref()
                                .map(|h| format!(" on {h}"))
                                .unwrap_or_default(),
                            if r.force && value == "0" {
                                "; forced past the reset quiet period"
                            } else {
                                ""
                            }
                        ),
                    ),
                    None => ("unknown".to_owned(), "fleet kill switch key deleted".to_owned()),
                };
                tracing::warn!(value, %reason, "fleet: kill switch mirrored into the application's database");
                let (kill_record, audit) = crate::appdb::killswitch::records(
                    ctx.clock.now(),
                    &ks.key,
                    value,
                    previous.as_deref(),
                    KillSwitchSource::Fleet,
                    Some(&operator),
                    &reason,
                    session_id.as_deref(),
                    None,
                );
                ctx.recorder.kill_switch(kill_record).await;
                ctx.recorder.audit(audit).await;
            } else {
                drop(serialized);
            }
            let _ = done
                .send(MirrorDone {
                    revision,
                    on,
                    decision,
                })
                .await;
        }));
    }

    pub(super) async fn fleet_mirrored(&mut self, done: MirrorDone) {
        let Some(fleet) = &mut self.fleet else { return };
        fleet.mirror_busy = false;
        if let Mirror::Quiet(why) = &done.decision {
            // Not mirrored yet: tried again on the 5 s tick, until the period ends.
            if fleet.quiet_logged != Some(done.revision) {
                fleet.quiet_logged = Some(done.revision);
                tracing::warn!(
                    "fleet: the fleet kill switch was reset, but this host keeps its kill switch \
                     on until its own quiet period ends, as a local reset would: {why}. It is \
                     reset with the fleet then; `rollbackd kill-switch reset --fleet --force \
                     --reason ..` resets every host now"
                );
            }
            fleet.quiet_held = Some(why.clone());
            if std::mem::take(&mut fleet.mirror_again) {
                self.fleet_mirror();
            }
            self.fleet_publish_host();
            return;
        }
        fleet.quiet_held = None;
        if done.decision == Mirror::KeepLocal {
            tracing::warn!(
                "fleet: the fleet kill switch was reset, but this host's kill switch stays on: \
                 it was set here (escalation, kill-switch set or by hand); reset it here with \
                 `rollbackd kill-switch reset`"
            );
        }
        fleet.applied = Applied {
            revision: done.revision,
            on: done.on,
        };
        let text = serde_json::to_string(&fleet.applied).unwrap_or_default();
        let again = std::mem::take(&mut fleet.mirror_again);
        if let Err(err) = self
            .db
            .call(move |store| store.set_meta(FLEET_APPLIED, &text))
            .await
        {
            // Mirrored again after a restart: the same value again, harmless.
            tracing::warn!("fleet: cannot remember the fleet revision mirrored: {err}");
        }
        self.fleet_save_hold().await;
        if again {
            self.fleet_mirror();
        }
        self.fleet_publish_host();
    }

    /// A fleet reset held by this host's quiet period is tried again (on the 5 s tick).
    pub(super) fn fleet_retry_quiet(&mut self) {
        if self.fleet.as_ref().is_some_and(|f| f.quiet_held.is_some()) {
            self.fleet_mirror();
        }
    }

    /// Remembers `local_hold` in `rollbackd.db` when it changed (after every kill-switch
    /// change seen and on the record-retry tick).
    pub(super) async fn fleet_save_hold(&mut self) {
        let hold = self.kill_writes.local_hold();
        let Some(fleet) = &mut self.fleet else { return };
        if fleet.hold_saved == Some(hold) {
            return;
        }
        let text = if hold { "true" } else { "false" };
        match self
            .db
            .call(move |store| store.set_meta(LOCAL_HOLD, text))
            .await
        {
            Ok(()) => fleet.hold_saved = Some(hold),
            Err(err) => tracing::warn!("fleet: cannot remember the local kill-switch hold: {err}"),
        }
    }

    /// A change of the host's kill switch seen in its database: one made outside
    /// rollbackd sets (or clears) the local hold like `kill-switch set|reset` would.
    pub(super) async fn fleet_kill_switch_seen(&mut self, value: Option<&str>, external: bool) {
        if self.fleet.is_none() {
            return;
        }
        if external {
            self.kill_writes.set_local_hold(value == Some("1"));
        }
        self.fleet_save_hold().await;
        self.fleet_publish_host();
    }

    /// The fleet kill switch is on (as last seen): a local reset would be undone by
    /// nothing and contradict the fleet, so it is refused unless forced.
    pub(super) fn fleet_refuses_reset(&self) -> Option<String> {
        let fleet = self.fleet.as_ref()?;
        let (Some(record), _) = fleet.kill.as_ref()? else {
            return None;
        };
        record.on().then(|| {
            format!(
                "the fleet kill switch is on (set by {} at {}: {}) and this host mirrors it; \
                 reset it for the fleet with `rollbackd kill-switch reset --fleet --reason ..`, \
                 or pass --force with a --reason to turn it off on this host only",
                crate::text::escape(&record.operator),
                crate::text::escape(&record.at),
                crate::text::escape(&record.reason)
            )
        })
    }

    /// Hands the agent a rollback verdict for the version rolled back.
    pub(super) fn fleet_verdict(&self, verdict: Verdict) {
        if let Some(fleet) = &self.fleet {
            let _ = fleet.verdicts_tx.send(verdict);
        }
    }

    pub(super) fn fleet_host(&self) -> Option<&str> {
        self.fleet.as_ref().map(|f| f.config.host.as_str())
    }

    /// Tells the agent the host's registration when it changed.
    pub(super) fn fleet_publish_host(&self) {
        let Some(fleet) = &self.fleet else { return };
        let session = self.sup.session();
        let (active, previous) = self.fleet_workers();
        let record = HostRecord {
            host: fleet.config.host.clone(),
            active,
            previous,
            state: session
                .map(|s| s.record.state.as_str())
                .unwrap_or("idle")
                .to_owned(),
            kill_switch: match &self.kill_value {
                Some(value) => value.clone(),
                None => Some("?".into()),
            },
            fleet_revision: fleet.applied.revision,
            rollbackd: env!("CARGO_PKG_VERSION").to_owned(),
            updated_at: String::new(),
        };
        fleet.host.send_if_modified(|current| {
            if current.as_ref() == Some(&record) {
                false
            } else {
                *current = Some(record);
                true
            }
        });
    }

    /// The `fleet` object of `status`.
    pub(super) fn fleet_status(&self) -> Option<Value> {
        let fleet = self.fleet.as_ref()?;
        let (active, previous) = self.fleet_workers();
        let mine: Vec<&VerdictEntry> = fleet
            .verdicts
            .values()
            .filter(|e| {
                Some(e.version.as_str()) == active.as_deref()
                    || Some(e.version.as_str()) == previous.as_deref()
            })
            .collect();
        let link = fleet.link.as_ref();
        let (kill, revision) = match &fleet.kill {
            Some((record, revision)) => (record.clone(), Some(*revision)),
            None => (None, None),
        };
        Some(json!({
            "host": fleet.config.host,
            "endpoints": fleet.config.endpoints,
            "link": match link {
                None => "connecting",
                Some(l) if l.connected => "connected",
                Some(_) => "partitioned",
            },
            "linkSince": link.map(|l| rfc3339_millis(l.since)),
            "linkError": link.and_then(|l| l.error.clone()),
            "failures": link.map_or(0, |l| l.failures),
            "killSwitch": kill.as_ref().map(|r| json!({
                "value": r.value, "on": r.on(), "operator": r.operator, "reason": r.reason,
                "at": r.at, "fromHost": r.from_host,
            })),
            "killSwitchRevision": revision,
            "mirroredRevision": fleet.applied.revision,
            "localHold": self.kill_writes.local_hold(),
            "resetHeld": fleet.quiet_held,
            "followVerdicts": fleet.config.follow_verdicts,
            // A summary: the fleet may hold thousands of verdicts (`fleet status` lists
            // them all); in full only those about the versions this host runs.
            "verdictCount": fleet.verdicts.values().filter(|e| e.body.is_ok()).count(),
            "verdictVersions": fleet.verdicts.values().filter(|e| e.body.is_ok()).map(|e| e.version.as_str()).collect::<HashSet<_>>().len(),
            "verdicts": mine.iter().filter_map(|e| e.verdict()).take(STATUS_VERDICTS).collect::<Vec<_>>(),
            "unusableCount": fleet.verdicts.values().filter(|e| e.body.is_err()).count(),
            "unusableVerdicts": fleet.verdicts.values().filter_map(|e| e.body.as_ref().err().map(|why| json!({
                "key": e.key, "version": e.version, "host": e.host, "error": why,
            }))).take(STATUS_VERDICTS).collect::<Vec<_>>(),
        }))
    }
}

/// The verdict of a rollback of `from` to `to` on `host`, from its action row when there is
/// one.
fn verdict_of(
    row: Option<&ActionRow>,
    host: String,
    from: &str,
    to: &str,
    artifact: Option<String>,
    at: SystemTime,
) -> Verdict {
    let detail: Option<executor::ActionDetail> = row
        .and_then(|r| r.detail_json.as_deref())
        .and_then(|text| serde_json::from_str(text).ok());
    Verdict {
        version: from.to_owned(),
        host,
        decision: "rollback".into(),
        reason: row
            .map(|r| r.reason.clone())
            .unwrap_or_else(|| "rolled back".into()),
        to: Some(to.to_owned()),
        trigger: row
            .map(|r| r.trigger.as_str())
            .unwrap_or("automatic")
            .to_owned(),
        artifact,
        error_rate: detail.as_ref().and_then(|d| d.error_rate),
        failure_count: detail.as_ref().map(|d| d.failure_count),
        session_id: row.and_then(|r| r.session_id.clone()),
        at: rfc3339_millis(at),
    }
}
