//! The kill switch as the daemon sees it: its value at start-up, changes made by hand in
//! the application's database (audited as `source: external`), and an operator's
//! `kill-switch set|reset` through the control socket.

use super::*;

impl Driver {
    /// The kill switch as the daemon finds it at start; a value different from the last
    /// one it saw was changed while nobody watched, and is audited as external.
    pub(super) async fn kill_switch_at_start(&mut self, snapshot: &FlagsSnapshot) {
        let value = snapshot
            .rows
            .get(&self.config.config.kill_switch.key)
            .cloned();
        self.kill_value = Some(value.clone());
        self.kill_switch_metric(snapshot);
        let last_seen = self
            .db
            .call(|store| store.get_meta(KILL_SWITCH_SEEN))
            .await
            .ok()
            .flatten()
            .and_then(|text| serde_json::from_str::<Option<String>>(&text).ok());
        match last_seen {
            Some(before) if before != value && snapshot.error.is_none() => {
                self.audit_external_kill_switch(
                    before,
                    value.clone(),
                    "changed while rollbackd was not running",
                )
                .await;
            }
            _ => {}
        }
        self.remember_kill_switch(value).await;
    }

    pub(super) async fn remember_kill_switch(&self, value: Option<String>) {
        let text = serde_json::to_string(&value).unwrap_or_default();
        if let Err(err) = self
            .db
            .call(move |store| store.set_meta(KILL_SWITCH_SEEN, &text))
            .await
        {
            tracing::warn!("cannot remember the kill switch value: {err}");
        }
    }

    /// `rollbackd_kill_switch`: 1 on, 0 off, -1 when the database cannot be read (a
    /// database not there yet that rollbackd may create is "off").
    pub(super) fn kill_switch_metric(&self, snapshot: &FlagsSnapshot) {
        let Some(metrics) = &self.metrics else { return };
        let ks = &self.config.config.kill_switch;
        let on = match &snapshot.error {
            None => Some(snapshot.killed(&ks.key)),
            Some(_) if ks.create_database && !ks.database.exists() => Some(false),
            Some(_) => None,
        };
        metrics.kill_switch(on);
    }

    pub(super) async fn flags_changed(&mut self, snapshot: &FlagsSnapshot) {
        self.kill_switch_metric(snapshot);
        if snapshot.error.is_some() {
            return; // unreadable for now: rows are the last good read, nothing changed
        }
        let key = self.config.config.kill_switch.key.clone();
        let value = snapshot.rows.get(&key).cloned();
        let before = self.kill_value.replace(value.clone());
        let Some(before) = before else { return };
        if before == value {
            return;
        }
        self.remember_kill_switch(value.clone()).await;
        if value
            .as_deref()
            .is_some_and(|v| self.kill_writes.consume(v))
        {
            self.fleet_kill_switch_seen(value.as_deref(), false).await;
            return;
        }
        self.fleet_kill_switch_seen(value.as_deref(), true).await;
        self.audit_external_kill_switch(
            before,
            value,
            "changed outside rollbackd (e.g. by hand in the sqlite3 shell)",
        )
        .await;
    }

    pub(super) async fn audit_external_kill_switch(
        &mut self,
        before: Option<String>,
        value: Option<String>,
        reason: &str,
    ) {
        let key = self.config.config.kill_switch.key.clone();
        let now = self.now();
        let session_id = self.sup.session().map(|s| s.record.id.clone());
        let shown = value.clone().unwrap_or_else(|| "(no row)".into());
        tracing::warn!(key = %key, value = %shown, "the kill switch was changed outside rollbackd");
        let (kill_record, audit) = crate::appdb::killswitch::records(
            now,
            &key,
            &shown,
            before.as_deref(),
            KillSwitchSource::External,
            None,
            reason,
            session_id.as_deref(),
            None,
        );
        self.recorder.kill_switch(kill_record).await;
        self.recorder.audit(audit).await;
    }

    pub(super) async fn manual_kill_switch(
        &mut self,
        operator: &Operator,
        value: &str,
        reason: String,
        replies: mpsc::Sender<Reply>,
    ) {
        let ctx = self.context(Some(replies.clone()));
        let config = self.config.clone();
        let session_id = self.sup.session().map(|s| s.record.id.clone());
        let operator_name = operator.name.clone();
        let value = value.to_owned();
        let clock = self.clock.clone();
        // A reset of an escalated session: the canary is watched again (a failed stability
        // watch ends). What became of the session goes back with the reply.
        if value == "0" {
            self.feed(Input::KillSwitchReset {
                operator: operator.name.clone(),
            })
            .await;
        }
        let session_note = match self.sup.session() {
            Some(s) => format!(
                "session {}: {} {}",
                s.record.id,
                s.record.state.as_str(),
                match s.record.state {
                    crate::core::supervisor::SessionState::Monitoring => {
                        format!("{} (checks continue; a full window must be judged before it is confirmed)", s.record.active)
                    }
                    _ => s.record.active.clone(),
                }
            ),
            None => "no monitoring session".to_owned(),
        };
        self.side_tasks.retain(|task| !task.is_finished());
        self.side_tasks.push(tokio::spawn(async move {
            let ks = &config.config.kill_switch;
            let previous = match executor::set_kill_switch(
                &ctx,
                ks,
                &value,
                executor::Patience::FailOnMissing,
            )
            .await
            {
                Ok(previous) => previous,
                Err(err) => {
                    let _ = replies
                        .send(Reply::Failed {
                            message: format!("the kill switch was not written: {err}"),
                            exit: 1,
                        })
                        .await;
                    return;
                }
            };
            let (kill_record, audit) = crate::appdb::killswitch::records(
                clock.now(),
                &ks.key,
                &value,
                previous.as_deref(),
                KillSwitchSource::Manual,
                Some(&operator_name),
                &reason,
                session_id.as_deref(),
                None,
            );
            ctx.recorder.kill_switch(kill_record).await;
            ctx.recorder.audit(audit).await;
            let _ = replies
                .send(Reply::Done {
                    result: json!({"key": ks.key, "value": value, "previous": previous, "session": session_note}),
                })
                .await;
        }));
    }
}
