//! The daemon's own Prometheus metrics, served on `/metrics` by [`crate::daemon::http`].
//!
//! The driver updates them at the points where it learns something (a check finished, an
//! action finished, the kill switch changed, its status changed); the HTTP endpoint only
//! encodes them. Everything is an atomic behind an `Arc`, so updating never waits for a
//! scrape and a clone is cheap. Names are a promise to dashboards and alert rules:
//! change them only with the README's table.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::core::engine::{ValueClass, Verdict};

/// Every verdict, so each series exists (at 0) before the first check.
const VERDICTS: [Verdict; 4] = [
    Verdict::Healthy,
    Verdict::Degraded,
    Verdict::Escalate,
    Verdict::Rollback,
];

/// Session states the daemon can be in while it runs; an ended session is `idle`.
const SESSION_STATES: [&str; 4] = ["idle", "monitoring", "stability-watch", "escalated"];

/// The content type of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RollbackLabels {
    trigger: String,
    outcome: &'static str,
}

/// The metrics; clones share them.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    checks: Family<VerdictLabel, Counter>,
    verdict: Family<VerdictLabel, Gauge>,
    session_state: Family<StateLabel, Gauge>,
    last_error_rate: Gauge<f64, AtomicU64>,
    probe_duration: Histogram,
    rollbacks: Family<RollbackLabels, Counter>,
    escalations: Counter,
    stability_watches: Family<ResultLabel, Counter>,
    kill_switch: Gauge,
    provider_errors: Counter,
    invalid_data: Counter,
    records_pending: Gauge,
    fleet_connected: Gauge,
    fleet_kill_switch: Gauge,
    fleet_reconnects: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("rollbackd");
        let checks = Family::<VerdictLabel, Counter>::default();
        let verdict = Family::<VerdictLabel, Gauge>::default();
        for v in VERDICTS {
            let label = VerdictLabel {
                verdict: v.as_str(),
            };
            // Creating the series is the point; the guard is dropped at once.
            drop(checks.get_or_create(&label));
            drop(verdict.get_or_create(&label));
        }
        let session_state = Family::<StateLabel, Gauge>::default();
        for state in SESSION_STATES {
            session_state
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(i64::from(state == "idle"));
        }
        let last_error_rate = Gauge::<f64, AtomicU64>::default();
        last_error_rate.set(f64::NAN);
        // 1 ms .. ~16 s: a loopback probe and one cut at a long check_timeout both fit.
        let probe_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let rollbacks = Family::<RollbackLabels, Counter>::default();
        let escalations = Counter::default();
        let stability_watches = Family::<ResultLabel, Counter>::default();
        for result in ["confirmed", "failed"] {
            let _ = stability_watches.get_or_create(&ResultLabel { result });
        }
        let kill_switch = Gauge::default();
        let provider_errors = Counter::default();
        let invalid_data = Counter::default();
        let records_pending = Gauge::default();
        let fleet_connected = Gauge::default();
        fleet_connected.set(-1);
        let fleet_kill_switch = Gauge::default();
        fleet_kill_switch.set(-1);
        let fleet_reconnects = Counter::default();

        registry.register(
            "checks",
            "Checks evaluated, by the verdict they produced",
            checks.clone(),
        );
        registry.register(
            "verdict",
            "The latest verdict of the current session (1 for the current one; all 0 when there is none)",
            verdict.clone(),
        );
        registry.register(
            "session_state",
            "The monitoring session's state (1 for the current one; idle when there is no session)",
            session_state.clone(),
        );
        registry.register(
            "last_error_rate",
            "Error rate of the latest check (fraction; NaN when it had no usable error rate)",
            last_error_rate.clone(),
        );
        registry.register(
            "probe_duration_seconds",
            "How long the worker health probe of each check took",
            probe_duration.clone(),
        );
        registry.register(
            "rollbacks",
            "Rollbacks that finished, by trigger (automatic, manual, emergency, fleet) and outcome (executed, failed)",
            rollbacks.clone(),
        );
        registry.register(
            "escalations",
            "Escalations carried out (kill switch set, on-call alerted)",
            escalations.clone(),
        );
        registry.register(
            "stability_watches",
            "Stability watches of a restored version that ended, by result (confirmed: stable for rollback.stability_period; failed: it breached and was escalated)",
            stability_watches.clone(),
        );
        registry.register(
            "kill_switch",
            "The kill switch as last seen in the application's database (1 on, 0 off, -1 unknown: the database cannot be read)",
            kill_switch.clone(),
        );
        registry.register(
            "provider_errors",
            "Checks whose error rate could not be had because the snapshot source failed",
            provider_errors.clone(),
        );
        registry.register(
            "invalid_data",
            "Checks whose error rate was invalid (NaN, infinite, negative, above 1, wrong type)",
            invalid_data.clone(),
        );
        registry.register(
            "audit_records_pending",
            "Audit records and artifacts not yet written to analytics/ (retried in order)",
            records_pending.clone(),
        );
        registry.register(
            "fleet_connected",
            "Whether the fleet agent reaches etcd (1 connected, 0 cut off: the host keeps the last fleet values it saw; -1 no fleet configured)",
            fleet_connected.clone(),
        );
        registry.register(
            "fleet_kill_switch",
            "The fleet kill switch as last seen in etcd (1 on, 0 off, -1 not seen yet or no fleet)",
            fleet_kill_switch.clone(),
        );
        registry.register(
            "fleet_disconnects",
            "Times the fleet agent lost etcd (or failed to reach it) since the daemon started",
            fleet_reconnects.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                checks,
                verdict,
                session_state,
                last_error_rate,
                probe_duration,
                rollbacks,
                escalations,
                stability_watches,
                kill_switch,
                provider_errors,
                invalid_data,
                records_pending,
                fleet_connected,
                fleet_kill_switch,
                fleet_reconnects,
            }),
        }
    }

    /// A check was evaluated (its verdict is now the session's latest).
    pub fn check_observed(
        &self,
        verdict: Verdict,
        error_rate: Option<f64>,
        error_class: ValueClass,
        probe_duration: std::time::Duration,
    ) {
        let inner = &self.inner;
        inner
            .checks
            .get_or_create(&VerdictLabel {
                verdict: verdict.as_str(),
            })
            .inc();
        self.set_verdict(Some(verdict));
        inner.last_error_rate.set(error_rate.unwrap_or(f64::NAN));
        inner.probe_duration.observe(probe_duration.as_secs_f64());
        match error_class {
            ValueClass::ProviderError => {
                inner.provider_errors.inc();
            }
            ValueClass::Invalid => {
                inner.invalid_data.inc();
            }
            ValueClass::Ok | ValueClass::Breach | ValueClass::NoData => {}
        }
    }

    /// The session's state (`None`: no session, idle) and latest verdict.
    pub fn session(&self, state: Option<&str>, verdict: Option<Verdict>) {
        let state = state.unwrap_or("idle");
        let family = &self.inner.session_state;
        family
            .get_or_create(&StateLabel {
                state: state.to_owned(),
            })
            .set(1);
        for known in SESSION_STATES {
            if known != state {
                family
                    .get_or_create(&StateLabel {
                        state: known.into(),
                    })
                    .set(0);
            }
        }
        self.set_verdict(verdict);
    }

    fn set_verdict(&self, verdict: Option<Verdict>) {
        for v in VERDICTS {
            self.inner
                .verdict
                .get_or_create(&VerdictLabel {
                    verdict: v.as_str(),
                })
                .set(i64::from(Some(v) == verdict));
        }
    }

    /// A rollback finished; `executed` false when it could not be verified.
    pub fn rollback_finished(&self, trigger: &str, executed: bool) {
        self.inner
            .rollbacks
            .get_or_create(&RollbackLabels {
                trigger: trigger.to_owned(),
                outcome: if executed { "executed" } else { "failed" },
            })
            .inc();
    }

    pub fn escalation_finished(&self) {
        self.inner.escalations.inc();
    }

    /// A stability watch ended (`confirmed` or `failed`).
    pub fn stability_ended(&self, confirmed: bool) {
        self.inner
            .stability_watches
            .get_or_create(&ResultLabel {
                result: if confirmed { "confirmed" } else { "failed" },
            })
            .inc();
    }

    /// `Some(on)` as read; `None` when the database cannot be read: -1, never 0 ("off").
    pub fn kill_switch(&self, on: Option<bool>) {
        self.inner.kill_switch.set(match on {
            Some(on) => i64::from(on),
            None => -1,
        });
    }

    /// The fleet link: connected or cut off (each cut counted).
    pub fn fleet_link(&self, connected: bool) {
        if !connected {
            self.inner.fleet_reconnects.inc();
        }
        self.inner.fleet_connected.set(i64::from(connected));
    }

    /// The fleet kill switch as last seen in etcd.
    pub fn fleet_kill_switch(&self, on: bool) {
        self.inner.fleet_kill_switch.set(i64::from(on));
    }

    pub fn records_pending(&self, backlog: usize) {
        self.inner
            .records_pending
            .set(i64::try_from(backlog).unwrap_or(i64::MAX));
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.inner.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn exposition_names_and_values() {
        let metrics = Metrics::new();
        let text = metrics.encode();
        assert!(text.contains("rollbackd_checks_total{verdict=\"rollback\"} 0\n"));
        assert!(text.contains("rollbackd_session_state{state=\"idle\"} 1\n"));
        assert!(text.contains("rollbackd_last_error_rate NaN\n"), "{text}");
        assert!(text.ends_with("# EOF\n"));
        assert!(
            text.contains("rollbackd_stability_watches_total{result=\"failed\"} 0\n"),
            "{text}"
        );
        metrics.stability_ended(true);
        metrics.session(Some("stability-watch"), None);
        let text = metrics.encode();
        assert!(
            text.contains("rollbackd_stability_watches_total{result=\"confirmed\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("rollbackd_session_state{state=\"stability-watch\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("rollbackd_session_state{state=\"idle\"} 0\n"),
            "{text}"
        );

        metrics.check_observed(
            Verdict::Degraded,
            Some(0.125),
            ValueClass::Ok,
            Duration::from_millis(3),
        );
        metrics.check_observed(
            Verdict::Degraded,
            None,
            ValueClass::ProviderError,
            Duration::from_millis(3),
        );
        metrics.session(Some("monitoring"), Some(Verdict::Degraded));
        metrics.rollback_finished("manual", true);
        metrics.kill_switch(Some(true));
        metrics.records_pending(2);
        let text = metrics.encode();
        for line in [
            "rollbackd_checks_total{verdict=\"degraded\"} 2\n",
            "rollbackd_verdict{verdict=\"degraded\"} 1\n",
            "rollbackd_verdict{verdict=\"healthy\"} 0\n",
            "rollbackd_session_state{state=\"monitoring\"} 1\n",
            "rollbackd_session_state{state=\"idle\"} 0\n",
            "rollbackd_provider_errors_total 1\n",
            "rollbackd_invalid_data_total 0\n",
            "rollbackd_rollbacks_total{trigger=\"manual\",outcome=\"executed\"} 1\n",
            "rollbackd_kill_switch 1\n",
            "rollbackd_audit_records_pending 2\n",
            "rollbackd_probe_duration_seconds_count 2\n",
            "rollbackd_probe_duration_seconds_bucket{le=\"0.004\"} 2\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // The last check had no error rate: NaN, not the previous value.
        assert!(text.contains("rollbackd_last_error_rate NaN\n"));
    }
}
