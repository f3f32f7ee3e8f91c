//! The daemon's fleet agent: its own task, so nothing the daemon does to guard its host
//! ever waits on etcd. While connected it holds the host's lease (renewed every third of
//! `fleet.lease_ttl`, which is also how a silent partition is noticed), keeps
//! `hosts/<host>` up to date, watches the fleet kill switch and the verdicts, and writes
//! the verdicts the daemon hands it. Cut off, it says so, keeps every verdict it has to
//! write, and tries again with backoff (100 ms doubling to 5 s, with jitter); on
//! reconnecting it reads the current values again, so nothing that changed meanwhile is
//! missed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::store::{Claim, FleetError, FleetStore, Kv, LeaseId, WatchEvent};
use super::{FleetKillSwitch, HostRecord, Keys, Verdict, VerdictEntry};
use crate::config::FleetConfig;

/// Whether the agent reaches etcd.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub connected: bool,
    /// Since when it is (or is not) connected.
    pub since: SystemTime,
    /// Why not, when not.
    pub error: Option<String>,
    /// Connection attempts that failed since the last success.
    pub failures: u32,
    /// Not connected because this host's own fleet credentials cannot be used (a TLS or
    /// password file): what fails a promotion's verdict check closed.
    pub credentials: bool,
}

/// What the agent tells the daemon.
#[derive(Debug, Clone, PartialEq)]
pub enum FleetEvent {
    Link(Link),
    /// The fleet kill switch (`None`: no key, which is off) as of `revision`.
    KillSwitch {
        record: Option<FleetKillSwitch>,
        revision: i64,
    },
    /// The keys under `verdicts/`. With `snapshot` (on connecting), every key there as
    /// of `revision`: a key not in it is gone. Otherwise the changes a watch saw, through
    /// `revision`: keys written (`entries`) and deleted.
    Verdicts {
        snapshot: bool,
        revision: i64,
        entries: Vec<VerdictEntry>,
        deleted: Vec<String>,
    },
    /// A verdict the daemon asked for is in etcd.
    VerdictWritten {
        version: String,
    },
}

/// The daemon's side of the agent.
pub struct AgentHandle {
    pub events: mpsc::Receiver<FleetEvent>,
    /// The host's registration: the agent registers only once the daemon has sent the
    /// first one (the daemon knows the version the host runs, also after a restart).
    pub host: watch::Sender<Option<HostRecord>>,
    pub verdicts: mpsc::UnboundedSender<Verdict>,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the agent for `config` on `store`; it runs until `shutdown` (then revokes its
/// lease, best effort, so the host leaves the fleet view at once).
pub fn start(
    config: FleetConfig,
    store: Arc<dyn FleetStore>,
    shutdown: CancellationToken,
) -> AgentHandle {
    let (events_tx, events) = mpsc::channel(64);
    let (host, host_rx) = watch::channel(None);
    let (verdicts, verdicts_rx) = mpsc::unbounded_channel();
    let agent = Agent {
        keys: Keys::new(&config.prefix),
        config,
        store,
        events: events_tx,
        host: host_rx,
        verdicts: verdicts_rx,
        pending: VecDeque::new(),
        shutdown,
    };
    let task = tokio::spawn(agent.run());
    AgentHandle {
        events,
        host,
        verdicts,
        task,
    }
}

struct Agent {
    config: FleetConfig,
    keys: Keys,
    store: Arc<dyn FleetStore>,
    events: mpsc::Sender<FleetEvent>,
    host: watch::Receiver<Option<HostRecord>>,
    verdicts: mpsc::UnboundedReceiver<Verdict>,
    /// Verdicts not yet in etcd, oldest first.
    pending: VecDeque<Verdict>,
    shutdown: CancellationToken,
}

/// The longest wait between two connection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How often the lease is renewed (and the link proved): a third of its TTL.
pub fn heartbeat(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(500))
}

/// The wait before attempt `failures + 1`: 100 ms doubling to [`MAX_BACKOFF`], with up to
/// a quarter of jitter so that a fleet cut off together does not come back in step.
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let base = Duration::from_millis(100)
        .saturating_mul(1u32 << failures.min(10))
        .min(MAX_BACKOFF);
    base.mul_f64(1.0 + 0.25 * jitter.clamp(0.0, 1.0))
}

fn jitter() -> f64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

impl Agent {
    async fn run(mut self) {
        let mut failures = 0u32;
        let mut lease = None;
        let shutdown = self.shutdown.clone();
        loop {
            let result = tokio::select! {
                result = self.session(&mut lease, &mut failures) => result,
                _ = shutdown.cancelled() => break,
            };
            let Err(err) = result else { break };
            failures = failures.saturating_add(1);
            if let FleetError::NameTaken(_) = &err {
                // The lease holds no key of ours: end it now rather than at its TTL.
                if let Some(lease) = lease {
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.store.revoke(lease))
                        .await;
                }
                tracing::error!(
                    failures,
                    "fleet: not joining: {err}; the host's own guard is unaffected"
                );
            } else {
                tracing::warn!(
                    failures,
                    "fleet: cut off from etcd ({err}); the host's own guard is unaffected"
                );
            }
            lease = None;
            self.tell(FleetEvent::Link(Link {
                connected: false,
                since: SystemTime::now(),
                error: Some(err.to_string()),
                failures,
                credentials: matches!(err, FleetError::Credentials(_)),
            }))
            .await;
            let wait = backoff(failures - 1, jitter());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        if let Some(lease) = lease {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.store.revoke(lease)).await;
        }
    }

    async fn tell(&self, event: FleetEvent) {
        let _ = self.events.send(event).await;
    }

    fn host_value(&self) -> Vec<u8> {
        let mut record = self.host.borrow().clone().unwrap_or_default();
        record.updated_at = crate::storage::audit::rfc3339_millis(SystemTime::now());
        serde_json::to_vec(&record).unwrap_or_default()
    }

    fn verdict_entry(&self, kv: &Kv) -> VerdictEntry {
        VerdictEntry::read(&self.keys, &kv.key, &kv.value, kv.mod_revision)
    }

    /// Writes the host's registration under `lease` unless another lease holds its key:
    /// `Ok(true)` written, `Ok(false)` held by another lease (left alone: a previous run on
    /// this host whose lease has not ended yet, or another host with this name).
    async fn register(&mut self, lease: LeaseId, first: bool) -> Result<bool, FleetError> {
        let key = self.keys.host(&self.config.host);
        self.host.mark_unchanged();
        match self
            .store
            .claim(&key, self.host_value(), lease, first)
            .await?
        {
            Claim::Written(_) => Ok(true),
            Claim::Held(_) if first => Ok(false),
            Claim::Held(holder) => Err(self.name_taken(&holder)),
            Claim::Lost => Err(FleetError::LeaseExpired(lease)),
        }
    }

    /// The refusal to join under a name another live instance holds: which, and the fix.
    fn name_taken(&self, holder: &Kv) -> FleetError {
        let record: Option<HostRecord> = serde_json::from_slice(&holder.value).ok();
        let what = match &record {
            Some(r) => format!(
                "it runs {} ({}), rollbackd {}, updated {}",
                crate::text::escape(r.active.as_deref().unwrap_or("-")),
                crate::text::escape(&r.state),
                crate::text::escape(&r.rollbackd),
                crate::text::escape(&r.updated_at)
            ),
            None => "its record is not readable".to_owned(),
        };
        FleetError::NameTaken(format!(
            "fleet.host {:?} is already registered by another running rollbackd (etcd lease \
             {}; {what}): two hosts share this name — fleet.host defaults to the hostname, \
             which cloned images share. Set a unique host under [fleet] (or \
             ROLLBACKD_FLEET_HOST) on one of them and restart it; until then this host stays \
             out of the fleet and guards itself",
            self.config.host, holder.lease
        ))
    }

    /// The host is registered: says so, and writes the verdicts waiting.
    async fn joined(&mut self, failures: &mut u32) -> Result<(), FleetError> {
        *failures = 0;
        self.tell(FleetEvent::Link(Link {
            connected: true,
            since: SystemTime::now(),
            error: None,
            failures: 0,
            credentials: false,
        }))
        .await;
        tracing::info!(host = %self.config.host, "fleet: connected to etcd");
        self.flush_verdicts().await
    }

    /// One connected session: returns when the link fails (never `Ok` unless the verdict
    /// channel closed, which means the daemon is stopping).
    async fn session(
        &mut self,
        lease_slot: &mut Option<LeaseId>,
        failures: &mut u32,
    ) -> Result<(), FleetError> {
        let store = self.store.clone();
        let ttl = self.config.lease_ttl;
        let lease = store.grant(ttl).await?;
        *lease_slot = Some(lease);

        // What the fleet says first (the kill switch, the verdicts), so that a host that
        // cannot register yet still knows it; then the registration.
        let kill_key = self.keys.kill_switch();
        let (kv, revision) = store.get(&kill_key).await?;
        let (verdict_kvs, verdict_revision) = store.list(&self.keys.verdicts()).await?;
        let mut kill_watch = store.watch(&kill_key, false, revision + 1).await?;
        let mut verdict_watch = store
            .watch(&self.keys.verdicts(), true, verdict_revision + 1)
            .await?;
        self.tell(FleetEvent::KillSwitch {
            revision: kv.as_ref().map_or(revision, |kv| kv.mod_revision),
            record: kv.map(|kv| FleetKillSwitch::parse(&kv.value)),
        })
        .await;
        let entries = verdict_kvs
            .iter()
            .map(|kv| self.verdict_entry(kv))
            .collect();
        self.tell(FleetEvent::Verdicts {
            snapshot: true,
            revision: verdict_revision,
            entries,
            deleted: Vec::new(),
        })
        .await;

        // The daemon's first record names the version the host runs.
        if self.host.wait_for(Option::is_some).await.is_err() {
            return Ok(());
        }
        let mut registered = self.register(lease, true).await?;
        let held_since = Instant::now();
        if registered {
            self.joined(failures).await?;
        } else {
            tracing::info!(
                host = %self.config.host,
                "fleet: this host's name is registered under another etcd lease (a previous \
                 run that did not stop cleanly, whose lease ends within fleet.lease_ttl, or \
                 another host with the same name); waiting for it to end before joining"
            );
        }

        let beat = heartbeat(ttl);
        let mut renew = tokio::time::interval(beat);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        loop {
            tokio::select! {
                events = kill_watch.next() => {
                    for event in events? {
                        let update = match event {
                            WatchEvent::Put(kv) => FleetEvent::KillSwitch {
                                record: Some(FleetKillSwitch::parse(&kv.value)),
                                revision: kv.mod_revision,
                            },
                            WatchEvent::Delete { revision, .. } => FleetEvent::KillSwitch { record: None, revision },
                        };
                        self.tell(update).await;
                    }
                }
                events = verdict_watch.next() => {
                    let mut entries = Vec::new();
                    let mut deleted = Vec::new();
                    let mut revision = 0;
                    for event in events? {
                        match event {
                            WatchEvent::Put(kv) => {
                                revision = revision.max(kv.mod_revision);
                                entries.push(self.verdict_entry(&kv));
                            }
                            WatchEvent::Delete { key, revision: at } => {
                                revision = revision.max(at);
                                deleted.push(key);
                            }
                        }
                    }
                    self.tell(FleetEvent::Verdicts { snapshot: false, revision, entries, deleted }).await;
                }
                changed = self.host.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    // Not registered yet: the next attempt writes the latest record.
                    if registered {
                        self.register(lease, false).await?;
                    }
                }
                verdict = self.verdicts.recv() => {
                    let Some(verdict) = verdict else { return Ok(()) };
                    self.pending.push_back(verdict);
                    if registered {
                        self.flush_verdicts().await?;
                    }
                }
                _ = renew.tick() => {
                    // Expired (the host was away longer than its TTL): the registration is
                    // gone; the next session registers again.
                    store.keep_alive(lease).await?;
                    if !registered {
                        registered = self.register(lease, true).await?;
                        if registered {
                            self.joined(failures).await?;
                        } else if held_since.elapsed() > ttl + 2 * beat {
                            // Renewed all along: another live instance holds the name.
                            let (holder, _) = store.get(&self.keys.host(&self.config.host)).await?;
                            if let Some(holder) = holder {
                                return Err(self.name_taken(&holder));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Writes the pending verdicts in order; one that fails stays at the front.
    async fn flush_verdicts(&mut self) -> Result<(), FleetError> {
        while let Some(verdict) = self.pending.front() {
            let key = self.keys.verdict(&verdict.version, &verdict.host);
            let value = serde_json::to_vec(verdict).unwrap_or_default();
            self.store.put(&key, value, None).await?;
            let version = verdict.version.clone();
            self.pending.pop_front();
            tracing::info!(%version, "fleet: rollback verdict recorded");
            self.tell(FleetEvent::VerdictWritten { version }).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_with_bounded_jitter() {
        let cases = [
            (0, 0.0, 100),
            (1, 0.0, 200),
            (2, 0.0, 400),
            (5, 0.0, 3200),
            (6, 0.0, 5000),
            (40, 0.0, 5000),
            (0, 1.0, 125),
            (40, 1.0, 6250),
            (40, 7.0, 6250),
        ];
        for (failures, jitter, ms) in cases {
            assert_eq!(
                backoff(failures, jitter),
                Duration::from_millis(ms),
                "{failures} {jitter}"
            );
        }
    }

    #[test]
    fn the_lease_is_renewed_three_times_per_ttl() {
        assert_eq!(heartbeat(Duration::from_secs(9)), Duration::from_secs(3));
        assert_eq!(
            heartbeat(Duration::from_secs(1)),
            Duration::from_millis(500)
        );
    }
}
