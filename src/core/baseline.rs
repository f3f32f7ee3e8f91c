//! Where a session's baseline comes from (SPEC §2a), without I/O: the history of
//! observations of each version before a promotion, the stats of each version's last
//! healthy session, and the order of precedence between the sources.
//!
//! The Supervisor owns one [`History`]; the runner persists what it asks (idle
//! observations, healthy-session stats) and hands it back at a restart.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use crate::core::check::{Baseline, BaselineSource, Observation};
use crate::core::time;

/// `[baseline]`: how the automatic baseline is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaselineSettings {
    /// The span before a promotion whose observations make the baseline.
    pub window: Duration,
    /// How often the active version is observed between sessions (a snapshot only, no
    /// probe); zero: never (the baseline then comes from the other sources).
    pub observe_interval: Duration,
    /// Fewer usable observations than this in the window: no observed baseline.
    pub min_samples: usize,
}

impl Default for BaselineSettings {
    fn default() -> BaselineSettings {
        BaselineSettings {
            window: Duration::from_secs(600),
            observe_interval: Duration::from_secs(30),
            min_samples: 3,
        }
    }
}

/// At most this many observations are kept, whatever the window and cadence say.
pub const MAX_OBSERVATIONS: usize = 4096;
/// At most this many versions' healthy-session stats are kept.
pub const MAX_HEALTHY: usize = 16;

/// One observation of `worker` taken at `at`.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub at: SystemTime,
    pub worker: String,
    pub observation: Observation,
}

/// The observations and healthy-session stats a baseline is chosen from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    observations: VecDeque<Observed>,
    healthy: VecDeque<(String, Baseline)>,
}

impl History {
    /// Adds an observation; those older than `window` before the newest, and the oldest
    /// beyond [`MAX_OBSERVATIONS`], are dropped.
    pub fn observe(&mut self, observed: Observed, window: Duration) {
        let newest = self
            .observations
            .back()
            .map(|o| o.at.max(observed.at))
            .unwrap_or(observed.at);
        self.observations.push_back(observed);
        let cutoff = newest.checked_sub(window).unwrap_or(SystemTime::UNIX_EPOCH);
        self.observations.retain(|o| o.at >= cutoff);
        while self.observations.len() > MAX_OBSERVATIONS {
            self.observations.pop_front();
        }
    }

    pub fn observations(&self) -> impl Iterator<Item = &Observed> + '_ {
        self.observations.iter()
    }

    /// The baseline `worker`'s observations in the `window` ending at `until` make.
    pub fn observed(
        &self,
        worker: &str,
        until: SystemTime,
        settings: &BaselineSettings,
    ) -> Option<Baseline> {
        let from = until
            .checked_sub(settings.window)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let observations: Vec<Observation> = self
            .observations
            .iter()
            .filter(|o| o.worker == worker && o.at >= from && o.at <= until)
            .map(|o| o.observation)
            .collect();
        Baseline::from_observations(
            &observations,
            BaselineSource::Observed,
            settings.min_samples,
        )
    }

    /// Remembers the stats of `worker`'s session that completed healthy (the newest per
    /// worker; at most [`MAX_HEALTHY`] workers).
    pub fn remember_healthy(&mut self, worker: &str, baseline: Baseline) {
        self.healthy.retain(|(w, _)| w != worker);
        self.healthy.push_back((worker.to_owned(), baseline));
        while self.healthy.len() > MAX_HEALTHY {
            self.healthy.pop_front();
        }
    }

    pub fn healthy(&self, worker: &str) -> Option<Baseline> {
        self.healthy
            .iter()
            .rev()
            .find(|(w, _)| w == worker)
            .map(|(_, b)| *b)
    }

    pub fn healthy_all(&self) -> impl Iterator<Item = &(String, Baseline)> + '_ {
        self.healthy.iter()
    }
}

/// The baseline a promotion uses: the first source that has one (SPEC §2a).
pub fn choose(
    operator: Option<Baseline>,
    observed: Option<Baseline>,
    prometheus: Option<Baseline>,
    previous_session: Option<Baseline>,
) -> Option<Baseline> {
    operator.or(observed).or(prometheus).or(previous_session)
}

/// An observation's time on the scale `Baseline::from_observations` measures spans in.
pub fn seconds(at: SystemTime) -> f64 {
    time::to_ms(at) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    fn obs(s: u64, worker: &str, rate: f64, requests: f64) -> Observed {
        Observed {
            at: at(s),
            worker: worker.into(),
            observation: Observation {
                at_seconds: seconds(at(s)),
                error_rate: Some(rate),
                requests: Some(requests),
                latency_p95_ms: Some(100.0 + s as f64),
                latency_p99_ms: None,
            },
        }
    }

    #[test]
    fn the_observed_baseline_sums_counts_of_that_worker_inside_the_window() {
        let settings = BaselineSettings::default();
        let mut history = History::default();
        // An old one (outside the 10 min window before the promotion at 1200 s).
        history.observe(obs(0, "v1", 0.5, 100.0), Duration::from_secs(3600));
        for s in [700, 800, 900, 1000] {
            history.observe(obs(s, "v1", 0.01, 1000.0), Duration::from_secs(3600));
        }
        history.observe(obs(1100, "v0", 0.3, 1000.0), Duration::from_secs(3600));
        let baseline = history.observed("v1", at(1200), &settings).unwrap();
        assert_eq!(baseline.requests, Some(4000));
        assert_eq!(baseline.errors, Some(40.0));
        assert_eq!(baseline.samples, Some(4));
        assert_eq!(baseline.window_seconds, Some(300.0));
        assert_eq!(baseline.source, Some(BaselineSource::Observed));
        // Median of 800, 900, 1000, 1100 ms… (100 + s): (900 + 1000) / 2 → 950.
        assert_eq!(baseline.latency_p95_ms, Some(950.0));
        // Too few samples: none.
        let strict = BaselineSettings {
            min_samples: 5,
            ..settings
        };
        assert_eq!(history.observed("v1", at(1200), &strict), None);
        assert_eq!(history.observed("v9", at(1200), &settings), None);
    }

    #[test]
    fn history_is_bounded_by_the_window_and_a_count() {
        let mut history = History::default();
        for s in 0..10_000 {
            history.observe(obs(s, "v1", 0.01, 10.0), Duration::from_secs(600));
        }
        let kept: Vec<_> = history.observations().collect();
        assert_eq!(kept.len(), 601);
        assert_eq!(kept[0].at, at(10_000 - 601));
        for s in 0..(MAX_OBSERVATIONS as u64 + 10) {
            history.observe(
                obs(20_000 + s, "v1", 0.01, 10.0),
                Duration::from_secs(86_400),
            );
        }
        assert_eq!(history.observations().count(), MAX_OBSERVATIONS);
        for i in 0..40 {
            history.remember_healthy(&format!("v{i}"), Baseline::default());
        }
        assert_eq!(history.healthy_all().count(), MAX_HEALTHY);
        assert!(history.healthy("v39").is_some() && history.healthy("v0").is_none());
    }

    /// A hostile snapshot's request count (1e30 saturates to u64::MAX) must not overflow
    /// the sums or the test: the baseline is still made, and a check judged against it.
    #[test]
    fn absurd_request_counts_do_not_overflow() {
        let settings = BaselineSettings::default();
        let mut history = History::default();
        for s in [700, 800, 900] {
            history.observe(obs(s, "v1", 0.5, 1e30), Duration::from_secs(3600));
        }
        let baseline = history.observed("v1", at(1000), &settings).unwrap();
        assert_eq!(baseline.requests, Some(u64::MAX));
        let test = crate::core::stats::excess_over_counts(
            u64::MAX,
            u64::MAX,
            baseline.errors.unwrap() as u64,
            baseline.requests.unwrap(),
            2.0,
        )
        .unwrap();
        assert!((0.0..=1.0).contains(&test.p_value), "{test:?}");
    }

    #[test]
    fn precedence_is_operator_observed_prometheus_previous_session() {
        let of = |source| {
            Some(Baseline {
                source: Some(source),
                ..Baseline::default()
            })
        };
        let sources = [
            BaselineSource::Operator,
            BaselineSource::Observed,
            BaselineSource::Prometheus,
            BaselineSource::PreviousSession,
        ];
        for first in 0..4 {
            let mut given = [None; 4];
            for (i, slot) in given.iter_mut().enumerate().skip(first) {
                *slot = of(sources[i]);
            }
            let chosen = choose(given[0], given[1], given[2], given[3]).unwrap();
            assert_eq!(chosen.source, Some(sources[first]));
        }
        assert_eq!(choose(None, None, None, None), None);
    }
}
