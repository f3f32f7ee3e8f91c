//! What an operator asks the running daemon: commands over the control socket, SIGHUP
//! reloads, and the status report.

use super::*;

impl Driver {
    /// The Prometheus source's baseline of `previous` over the baseline window ending now,
    /// when the snapshot source is Prometheus and the daemon's own observations of it do
    /// not make a baseline (they come first). Bounded by `check_timeout`; a failure is
    /// logged and the next source applies.
    pub(super) async fn prometheus_baseline(&self, previous: &str) -> Option<Baseline> {
        let config = &self.config.config;
        let Some(crate::config::SnapshotSpec::Prometheus(spec)) = &config.operations else {
            return None;
        };
        let now = self.now();
        let settings = &config.baseline;
        if self
            .sup
            .history()
            .observed(previous, now, settings)
            .is_some()
        {
            return None;
        }
        let step = if settings.observe_interval.is_zero() {
            config.monitor.check_interval
        } else {
            settings.observe_interval
        };
        // Each point counts the step before it (`range_observations`), so the first point
        // is one step into the window: together they cover it once.
        let start = crate::core::time::sub(now, settings.window.saturating_sub(step));
        // The baseline is the previous version's traffic: `{worker}` is that version.
        match crate::adapters::range_observations(
            spec,
            config.monitor.check_timeout,
            previous,
            start,
            now,
            step,
        )
        .await
        {
            Ok(observations) => {
                let baseline = Baseline::from_observations(
                    &observations,
                    crate::core::check::BaselineSource::Prometheus,
                    settings.min_samples,
                );
                if baseline.is_none() {
                    tracing::info!(
                        samples = observations.len(),
                        "the Prometheus source has too few samples over the baseline window"
                    );
                }
                baseline
            }
            Err(reason) => {
                tracing::warn!("the Prometheus baseline source failed: {reason}");
                None
            }
        }
    }

    pub(super) async fn reload(&mut self, reloader: &Reloader) {
        // logrotate's `postrotate` sends SIGHUP: reopen the logs by name whatever the
        // reload's outcome (each append checks the name too).
        self.recorder.reopen_logs();
        let reloader = reloader.clone();
        let result = tokio::task::spawn_blocking(move || reloader()).await;
        let now = self.now();
        // Keys a running daemon cannot take over (opened once at start): refused whole, so
        // a reload never half-applies.
        let result = result.map(|loaded| {
            loaded.and_then(|loaded| match fixed_keys_changed(&self.config.config, &loaded.config) {
                changed if changed.is_empty() => Ok(loaded),
                changed => Err(crate::config::ConfigError::Invalid(
                    changed
                        .into_iter()
                        .map(|key| crate::config::ConfigIssue {
                            key: key.to_owned(),
                            message: "cannot be changed by a reload (the daemon opened it at start); \
                                      restart rollbackd to apply it, or put the old value back"
                                .into(),
                        })
                        .collect(),
                )),
            })
        });
        match result {
            Ok(Ok(loaded)) => {
                let old_hash = self.config.hash.clone();
                self.adapters = (self.factory)(&loaded.config);
                if loaded.config.alerts != self.config.config.alerts {
                    // Alerts queued for the old webhook are still sent by its task.
                    self.recorder
                        .set_alerts(crate::daemon::alerts::Alerter::from_config(
                            &loaded.config.alerts,
                        ));
                }
                self.config = Arc::new(loaded);
                // The window is judged again under the new thresholds.
                let settings = self.config.config.supervisor_settings(&self.config.hash);
                self.feed(Input::Reload(Box::new(settings))).await;
                tracing::info!(old = %old_hash, new = %self.config.hash, "configuration reloaded");
                self.recorder
                    .audit(AuditRecord::of(
                        now,
                        self.sup.session().map(|s| s.record.id.as_str()),
                        &events::ConfigReloaded {
                            ok: true,
                            error: None,
                            config_hash: self.config.hash.clone(),
                            previous_config_hash: Some(old_hash.to_string()),
                        },
                    ))
                    .await;
            }
            Ok(Err(err)) => {
                tracing::error!(
                    "new configuration refused, keeping the old one ({}): {err}",
                    self.config.hash
                );
                self.recorder
                    .audit(AuditRecord::of(
                        now,
                        self.sup.session().map(|s| s.record.id.as_str()),
                        &events::ConfigReloaded {
                            ok: false,
                            error: Some(err.to_string()),
                            config_hash: self.config.hash.clone(),
                            previous_config_hash: None,
                        },
                    ))
                    .await;
            }
            Err(err) => tracing::error!("configuration reload panicked: {err}"),
        }
    }

    pub(super) async fn command(&mut self, command: Command) {
        if let Request::Promote { .. } = command.request {
            // The fleet's verdicts are read once the agent has said something: a
            // promotion right after the daemon started waits for it (a few seconds).
            if self.fleet_promotion_waits() {
                self.fleet_wait(command);
            } else {
                self.promote(command).await;
            }
            return;
        }
        let Command {
            operator,
            request,
            replies,
        } = command;
        let reply = match request {
            Request::Status => Reply::Done {
                result: serde_json::to_value(self.status_report().await).unwrap_or_default(),
            },
            Request::Promote { .. } => unreachable!("handled above"),
            Request::Rollback {
                reason,
                emergency,
                force,
            } => {
                let rolled_back = self
                    .db
                    .call(|store| store.rolled_back_versions(32))
                    .await
                    .unwrap_or_else(|err| {
                        tracing::warn!("cannot read which versions were rolled back: {err}");
                        Vec::new()
                    });
                let known_workers = if self.sup.session().is_none() {
                    self.db
                        .call(|store| Ok((store.get_meta("active")?, store.get_meta("previous")?)))
                        .await
                        .map(|(active, previous)| {
                            (
                                stored_worker_id("active worker", active),
                                stored_worker_id("previous worker", previous),
                            )
                        })
                        .unwrap_or((None, None))
                } else {
                    (None, None)
                };
                let reply = self.expect_reply(replies);
                self.feed(Input::Rollback {
                    operator: operator.name,
                    reason,
                    emergency,
                    force,
                    rolled_back,
                    known_workers,
                    reply,
                })
                .await;
                return;
            }
            Request::KillSwitchSet { reason } => {
                self.manual_kill_switch(&operator, "1", reason, replies)
                    .await;
                return;
            }
            Request::KillSwitchReset { reason, force } => {
                let quiet = self.config.config.kill_switch.reset_quiet_period;
                let db_path = self.config.config.rollbackd_db();
                let now = self.now();
                let refusal = tokio::task::spawn_blocking(move || {
                    crate::appdb::killswitch::reset_refusal(&db_path, quiet, now)
                })
                .await
                .expect("reset check panicked");
                let fleet_refusal = self.fleet_refuses_reset();
                match refusal {
                    Ok(Some(why)) if !force => Reply::Failed {
                        message: format!("refused: {why}"),
                        exit: 3,
                    },
                    Ok(_) if fleet_refusal.is_some() && !force => Reply::Failed {
                        message: format!("refused: {}", fleet_refusal.unwrap_or_default()),
                        exit: 3,
                    },
                    Err(err) => Reply::Failed {
                        message: format!("cannot check the reset precondition: {err}"),
                        exit: 1,
                    },
                    _ => {
                        if force {
                            tracing::warn!(operator = %operator.name, "kill switch reset forced past the quiet period");
                        }
                        self.manual_kill_switch(&operator, "0", reason, replies)
                            .await;
                        return;
                    }
                }
            }
            Request::KillSwitchStatus => {
                let ks = self.config.config.kill_switch.clone();
                let state = tokio::task::spawn_blocking(move || {
                    crate::appdb::killswitch::KillSwitchState::read(
                        &ks.database,
                        &ks.key,
                        ks.create_database,
                    )
                })
                .await
                .expect("read panicked");
                match state {
                    crate::appdb::killswitch::KillSwitchState::Unknown(why) => Reply::Failed {
                        message: format!("the kill switch is UNKNOWN: {why}"),
                        exit: 1,
                    },
                    state => Reply::Done {
                        result: state.to_json(&self.config.config.kill_switch.key),
                    },
                }
            }
            Request::Pause { reason } => {
                let reply = self.expect_reply(replies);
                self.feed(Input::Pause {
                    operator: operator.name,
                    paused: true,
                    reason,
                    reply,
                })
                .await;
                return;
            }
            Request::Resume => {
                let reply = self.expect_reply(replies);
                self.feed(Input::Pause {
                    operator: operator.name,
                    paused: false,
                    reason: None,
                    reply,
                })
                .await;
                return;
            }
        };
        let _ = replies.send(reply).await;
    }

    /// `promote`, from any client of the control socket or a command run without a
    /// daemon: the fleet's verdicts first (one gate for every path), then the Supervisor.
    pub(super) async fn promote(&mut self, command: Command) {
        let Command {
            operator,
            request:
                Request::Promote {
                    active,
                    previous,
                    baseline_error_rate,
                    baseline_latency_p95_ms,
                    force,
                    reason,
                },
            replies,
        } = command
        else {
            return;
        };
        let reference = match self.fleet_gate(&active, force, reason.as_deref()) {
            None => None,
            Some(Err(message)) => {
                tracing::warn!(%operator.name, "promotion of {active} refused: {message}");
                let _ = replies
                    .send(Reply::Failed {
                        message,
                        exit: crate::exit::REFUSED,
                    })
                    .await;
                return;
            }
            Some(Ok((passed, reference))) => {
                for warning in &passed.warnings {
                    tracing::warn!("promotion of {active}: {warning}");
                    let _ = replies
                        .send(Reply::Progress {
                            message: format!("warning: {warning}"),
                            detail: Value::Null,
                        })
                        .await;
                }
                if passed.forced {
                    tracing::warn!(
                        version = %active,
                        reason = reason.as_deref().unwrap_or(""),
                        operator = %operator.name,
                        "promotion forced past the fleet's rollback verdicts"
                    );
                }
                reference
            }
        };
        let baseline = (baseline_error_rate.is_some() || baseline_latency_p95_ms.is_some())
            .then_some(Baseline {
                error_rate: baseline_error_rate,
                latency_p95_ms: baseline_latency_p95_ms,
                source: Some(crate::core::check::BaselineSource::Operator),
                ..Baseline::default()
            });
        let reply = self.expect_reply(replies);
        // An operator's baseline comes first: nothing to ask Prometheus then.
        let prometheus = match baseline {
            Some(_) => None,
            None => self.prometheus_baseline(&previous).await,
        };
        let before = self.sup.session().map(|s| s.record.id.clone());
        self.feed(Input::Promote {
            operator: operator.name,
            active,
            previous,
            baseline,
            prometheus,
            reply,
        })
        .await;
        self.fleet_promoted(before, reference).await;
    }

    pub(super) async fn status_report(&self) -> StatusReport {
        let now = self.now();
        let config = &self.config.config;
        let ks = config.kill_switch.clone();
        let key = ks.key.clone();
        let kill = tokio::task::spawn_blocking(move || {
            crate::appdb::killswitch::KillSwitchState::read(
                &ks.database,
                &ks.key,
                ks.create_database,
            )
        })
        .await
        .unwrap_or_else(|e| {
            crate::appdb::killswitch::KillSwitchState::Unknown(format!("reading it failed: {e}"))
        });
        let session = self.sup.session().map(|s| {
            let promoted = s.record.promoted_at;
            let age = now.duration_since(promoted).unwrap_or_default();
            let grace_left = config.monitor.grace_period.saturating_sub(age);
            let monitoring = s.record.state == SessionState::Monitoring;
            SessionStatus {
                id: s.record.id.clone(),
                state: s.record.state.as_str().to_owned(),
                active: Some(s.record.active.clone()),
                previous: s.record.previous.clone(),
                promoted_at: rfc3339_millis(promoted),
                age_seconds: age.as_secs(),
                grace_left_seconds: monitoring.then_some(grace_left.as_secs()),
                paused: s.record.paused,
                pause_reason: s.record.pause_reason.clone(),
                checks: Some(s.next_index),
                verdict: s
                    .last_decision
                    .as_ref()
                    .map(|d| d.verdict.as_str().to_owned()),
                reason: s.last_decision.as_ref().map(|d| d.reason()),
                baseline: Some(crate::core::supervisor::baseline_summary(
                    s.record.baseline.as_ref(),
                )),
                stability: s
                    .record
                    .stability
                    .as_ref()
                    .map(|w| crate::daemon::incident::stability_status(w, now)),
            }
        });
        // The workers, also between sessions: the current session's, else the last ended
        // one's, else what rollbackd.db remembers (the same key the offline status has).
        let workers = match (self.sup.session(), self.sup.last_workers()) {
            (Some(s), _) => Workers {
                active: Some(s.record.active.clone()),
                previous: s.record.previous.clone(),
                last_session_state: None,
            },
            (None, Some((active, previous, state))) => Workers {
                active: Some(active.clone()),
                previous: previous.clone(),
                last_session_state: Some(state.as_str().to_owned()),
            },
            (None, None) => {
                let (active, previous) = self
                    .db
                    .call(|store| Ok((store.get_meta("active")?, store.get_meta("previous")?)))
                    .await
                    .unwrap_or((None, None));
                Workers {
                    active: stored_worker_id("active worker", active)
                        .or_else(|| config.worker.active.clone()),
                    previous: stored_worker_id("previous worker", previous),
                    last_session_state: None,
                }
            }
        };
        let recent_checks = self
            .recent
            .iter()
            .map(|c| CheckLine {
                at: rfc3339_millis(c.at),
                index: c.index,
                verdict: c.verdict.as_str().to_owned(),
                probe: c.probe.clone(),
                error_rate: c.error_rate,
                error_class: Some(c.error_class.to_owned()),
            })
            .collect();
        let workers_active = workers.active.clone();
        StatusReport {
            daemon: "running".into(),
            pid: Some(std::process::id()),
            since: Some(rfc3339_millis(self.started_at)),
            state: self
                .sup
                .session()
                .map(|s| s.record.state.as_str())
                .unwrap_or("idle")
                .to_owned(),
            session,
            workers,
            action: self.sup.action().map(|a| ActionStatus {
                id: a.id,
                kind: a.kind.as_str().to_owned(),
            }),
            kill_switch: kill.to_json(&key),
            recent_checks,
            config_hash: self.config.hash.clone(),
            records_pending: Some(self.recorder.backlog()),
            next_baseline: match (self.sup.session(), &workers_active) {
                (None, Some(active)) => Some(crate::core::supervisor::baseline_summary(
                    self.sup.baseline_for(now, active).as_ref(),
                )),
                _ => None,
            },
            state_db_restored: self.db_restored.clone(),
            latest_incident: {
                let dir = self.recorder.dir().clone();
                tokio::task::spawn_blocking(move || crate::daemon::incident::latest(&dir))
                    .await
                    .ok()
                    .flatten()
            },
            fleet: self.fleet_status(),
        }
    }
}

/// The keys whose new value a reload cannot apply and that differ between `old` and `new`:
/// the state directory (database, lock, socket, audit log), the HTTP listener and the
/// kill-switch database LiveFlags watches are all opened once at start, and so is the fleet
/// agent (`[fleet]`).
pub fn fixed_keys_changed(
    old: &crate::config::Config,
    new: &crate::config::Config,
) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.state_dir != new.state_dir {
        changed.push("state_dir");
    }
    if old.http_listen != new.http_listen {
        changed.push("http.listen");
    }
    if old.kill_switch.database != new.kill_switch.database {
        changed.push("kill_switch.database");
    }
    // The fleet agent is started once, with its endpoints, name, prefix and lease.
    if old.fleet != new.fleet {
        changed.push("fleet");
    }
    changed
}
