//! Taking a check: the probe, the snapshot and the resources in parallel within
//! `check_timeout`, off the loop, and recording it once the Supervisor has judged it.

use super::*;

impl Driver {
    /// The next check is due.
    pub(super) async fn tick(&mut self) {
        // Read the clocks before anything else, so the timer's lateness (the stall
        // measure) is not inflated by our own work.
        let now = self.time();
        // Whether rollbackd.db was deleted or replaced: before a check, at most once a
        // second (it costs a hop to the blocking pool, ten a second at a 100 ms interval).
        // Rows written meanwhile go to the open, unlinked database and are in the copy
        // put back.
        let due = self
            .state_db_seen
            .is_none_or(|seen| seen.elapsed() >= Duration::from_secs(1));
        if due {
            self.state_db_seen = Some(Instant::now());
            self.check_state_db().await;
        }
        self.sup.handle(
            now,
            Input::Timeout {
                suspended: suspended_since_boot(),
            },
        );
        self.run_effects().await;
    }

    pub(super) fn start_check(&mut self, session_id: String, index: u64, worker: String) {
        let adapters = self.adapters.clone();
        let tx = self.checks_tx.clone();
        let clock = self.clock.clone();
        let limit = self.config.config.monitor.check_timeout;
        let now = Instant::now();
        let interval = match &self.last_recorded {
            Some((session, checked, at)) if *session == session_id && *checked == worker => {
                now.saturating_duration_since(*at)
            }
            _ => self.config.config.monitor.check_interval,
        };
        let previous = self
            .sup
            .session()
            .and_then(|s| s.record.previous.clone())
            .filter(|previous| *previous != worker && !previous.is_empty());
        let vars = SnapshotVars {
            worker: worker.clone(),
            previous,
            interval,
        };
        self.check_started = Some((session_id.clone(), index, worker, now));
        tokio::spawn(async move {
            let started = Instant::now();
            let taken_at = clock.now();
            let ((result, probe_duration), stalled) =
                watch_stalls(take_check(&adapters, &vars, limit)).await;
            let _ = tx
                .send(CheckDone {
                    session_id,
                    index,
                    started,
                    taken_at,
                    result,
                    probe_duration,
                    stalled,
                })
                .await;
        });
    }

    /// Between sessions: one snapshot of the active version (no probe, no resources),
    /// for the next promotion's baseline.
    pub(super) fn observe_idle(&mut self, worker: String) {
        let adapters = self.adapters.clone();
        let tx = self.observed_tx.clone();
        let limit = self.config.config.monitor.check_timeout;
        let now = Instant::now();
        let interval = match &self.last_observed {
            Some((observed, at)) if *observed == worker => now.saturating_duration_since(*at),
            _ => self.config.config.baseline.observe_interval,
        };
        self.last_observed = Some((worker.clone(), now));
        let previous = self
            .sup
            .last_workers()
            .filter(|(active, _, _)| *active == worker)
            .and_then(|(_, previous, _)| previous.clone())
            .filter(|previous| *previous != worker && !previous.is_empty());
        let vars = SnapshotVars {
            worker: worker.clone(),
            previous,
            interval,
        };
        tokio::spawn(async move {
            let net = limit
                .saturating_mul(2)
                .saturating_add(Duration::from_secs(1));
            let snapshot = tokio::time::timeout(net, adapters.snapshot.snapshot(&vars))
                .await
                .unwrap_or_else(|_| crate::core::check::SnapshotOutcome::Unavailable {
                    reason: "snapshot did not finish in time".into(),
                });
            let _ = tx.send((worker, snapshot)).await;
        });
    }

    pub(super) async fn check_finished(&mut self, done: CheckDone) {
        self.probe_duration = done.probe_duration;
        self.feed(Input::CheckDone {
            session_id: done.session_id,
            index: done.index,
            started: done.started.into_std(),
            taken_at: done.taken_at,
            result: done.result,
            stalled: done.stalled,
        })
        .await;
    }

    /// The check's row in `rollbackd.db` and, when given, its audit line: both on one
    /// blocking-pool thread in one hop, the row first.
    pub(super) async fn record_check(&mut self, check: CheckRecord, line: Option<AuditRecord>) {
        // The next check's `{interval}` runs from this one's start.
        if let Some((session, index, worker, started)) = &self.check_started {
            if *session == check.session_id && *index == check.index {
                self.last_recorded = Some((session.clone(), worker.clone(), *started));
            }
        }
        let probe = match &check.result.probe {
            ProbeOutcome::Ok => "ok".to_owned(),
            ProbeOutcome::Failed { reason } => format!("failed: {reason}"),
        };
        let decision = self.sup.session().and_then(|s| s.last_decision.clone());
        self.recent.push_back(CheckSummary {
            at: check.taken_at,
            index: check.index,
            verdict: check.verdict,
            probe,
            error_rate: decision.as_ref().and_then(|d| d.error_rate),
            error_class: decision
                .as_ref()
                .map(|d| d.error_class.as_str())
                .unwrap_or("missing"),
        });
        while self.recent.len() > 20 {
            self.recent.pop_front();
        }
        let row = CheckRow {
            session_id: check.session_id,
            check_index: check.index as i64,
            taken_at_ms: time::to_ms(check.taken_at),
            check_json: serde_json::to_string(&check.result).unwrap_or_default(),
            verdict: check.verdict.as_str().into(),
            failed: check.failed,
        };
        let insert = move |store: &mut crate::storage::store::Store| store.insert_check(&row);
        let report = |err: crate::storage::store::StoreError| {
            tracing::error!("cannot record the check in rollbackd.db: {err}");
        };
        match line {
            Some(line) => {
                let db = self.db.clone();
                self.recorder
                    .audit_after(line, move || {
                        if let Err(err) = db.call_here(insert) {
                            report(err);
                        }
                    })
                    .await;
            }
            None => {
                if let Err(err) = self.db.call(insert).await {
                    report(err);
                }
            }
        }
    }
}

/// One check of `vars.worker`: probe, snapshot and resources at once, each bounded by
/// `limit` in its adapter; a safety net here cuts an adapter that ignores its limit. Also
/// returns how long the worker probe took (for the probe-duration metric).
pub async fn take_check(
    adapters: &Adapters,
    vars: &SnapshotVars,
    limit: Duration,
) -> (CheckResult, Duration) {
    let worker = vars.worker.as_str();
    let net = limit
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(1));
    let probe = async {
        let started = Instant::now();
        let outcome = tokio::time::timeout(net, adapters.probe.probe(worker))
            .await
            .unwrap_or_else(|_| {
                ProbeOutcome::failed(format!(
                    "probe did not finish within {}",
                    crate::config::show(net)
                ))
            });
        (outcome, started.elapsed())
    };
    let snapshot = async {
        tokio::time::timeout(net, adapters.snapshot.snapshot(vars))
            .await
            .unwrap_or_else(|_| crate::core::check::SnapshotOutcome::Unavailable {
                reason: format!(
                    "snapshot did not finish within {}",
                    crate::config::show(net)
                ),
            })
    };
    let resources = async {
        tokio::time::timeout(net, adapters.resources.sample(worker))
            .await
            .ok()
            .flatten()
    };
    let ((probe, probe_duration), snapshot, resources) = tokio::join!(probe, snapshot, resources);
    let result = CheckResult {
        probe,
        snapshot,
        resources,
    };
    (result, probe_duration)
}
