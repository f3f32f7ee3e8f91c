//! The decision engine: a sans-I/O state machine.
//!
//! Fed `(at, CheckResult)`, it classifies every value of the check, pushes the check into
//! a window of the last `window` checks, evaluates the verdict rules over that window and
//! returns a [`Decision`]. It does no I/O, never reads the clock (time is an input) and
//! cannot fail: a bad sample is input, not an error. The same config and the same checks
//! always give the same decisions, which is what `rollbackd simulate` relies on.
//!
//! **The verdict depends only on the checks in the window.** Every count (breaches, probe
//! failures, checks without data) is taken inside it; the configuration refuses limits
//! larger than the window.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::check::{Baseline, CheckResult, ProbeOutcome, Sample, SnapshotOutcome};
use crate::core::stats;

/// What the engine concluded from the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Healthy,
    Degraded,
    Escalate,
    Rollback,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Degraded => "degraded",
            Verdict::Escalate => "escalate",
            Verdict::Rollback => "rollback",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An automatic action the engine asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Rollback,
    Escalate,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Rollback => "rollback",
            Action::Escalate => "escalate",
        }
    }
}

/// How one value of a check was classified (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueClass {
    Ok,
    Breach,
    NoData,
    Invalid,
    ProviderError,
}

impl ValueClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ValueClass::Ok => "ok",
            ValueClass::Breach => "breach",
            ValueClass::NoData => "no-data",
            ValueClass::Invalid => "invalid",
            ValueClass::ProviderError => "provider-error",
        }
    }

    /// No usable value: counts towards `max_consecutive_no_data`, never as a breach.
    pub fn is_unusable(self) -> bool {
        matches!(
            self,
            ValueClass::NoData | ValueClass::Invalid | ValueClass::ProviderError
        )
    }
}

/// What to do after `max_consecutive_no_data` checks without a usable error rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoDataPolicy {
    /// Fail closed: escalate (the default).
    Escalate,
    /// Stay degraded, take no action.
    Ignore,
}

/// A verdict rule. Names are stable: they appear in evidence, `dry_run_rules` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// `rollback_min_breaches` checks in the window over `error_rate_threshold`.
    ErrorRate,
    /// That many checks whose errors exceed what the baseline predicts × multiplier (a
    /// binomial test at `baseline_alpha`, see `core::stats`), or whose p95 is over the
    /// baseline p95 × multiplier.
    Baseline,
    /// That many checks with p95 over `latency_p95_ms_threshold` or p99 over
    /// `latency_p99_ms_threshold` (both off unless set).
    Latency,
    /// That many checks with host memory over `memory_percent`.
    Memory,
    /// The last `consecutive_failures` worker probes failed.
    ProbeFailures,
    /// `max_consecutive_no_data` checks in a row without a usable error rate.
    NoData,
    /// The latest error rate is over `degraded_error_rate`.
    DegradedErrorRate,
    /// A probe failure, breach or check without data is still inside the window.
    RecentProblems,
}

impl Rule {
    pub const ALL: [Rule; 8] = [
        Rule::ErrorRate,
        Rule::Baseline,
        Rule::Latency,
        Rule::Memory,
        Rule::ProbeFailures,
        Rule::NoData,
        Rule::DegradedErrorRate,
        Rule::RecentProblems,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::ErrorRate => "error_rate",
            Rule::Baseline => "baseline",
            Rule::Latency => "latency",
            Rule::Memory => "memory",
            Rule::ProbeFailures => "probe_failures",
            Rule::NoData => "no_data",
            Rule::DegradedErrorRate => "degraded_error_rate",
            Rule::RecentProblems => "recent_problems",
        }
    }

    pub fn from_name(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|rule| rule.as_str() == name)
    }

    /// The verdict this rule argues for when it fires.
    pub fn verdict(self) -> Verdict {
        match self {
            Rule::ErrorRate | Rule::Baseline | Rule::Latency | Rule::Memory => Verdict::Rollback,
            Rule::ProbeFailures | Rule::NoData => Verdict::Escalate,
            Rule::DegradedErrorRate | Rule::RecentProblems => Verdict::Degraded,
        }
    }
}

/// Thresholds the engine runs on (the `[rules]` section plus `monitor.window`). Its
/// defaults live in one place, the configuration's built-in layer
/// (`config::default_rules`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineConfig {
    pub window: usize,
    pub error_rate_threshold: f64,
    pub degraded_error_rate: f64,
    pub rollback_min_breaches: usize,
    pub consecutive_failures: usize,
    pub min_requests: u64,
    pub max_consecutive_no_data: usize,
    pub no_data_policy: NoDataPolicy,
    pub baseline_error_multiplier: f64,
    /// A check's errors breach the baseline when the test's p-value is below this.
    pub baseline_alpha: f64,
    pub latency_p95_multiplier: f64,
    /// Absolute latency bounds in milliseconds; `None`: off.
    pub latency_p95_ms_threshold: Option<f64>,
    pub latency_p99_ms_threshold: Option<f64>,
    pub memory_percent: f64,
    pub dry_run: bool,
    /// Rules whose firing is recorded but never acted on (per-rule shadow mode).
    pub dry_run_rules: Vec<Rule>,
}

/// One check as the window keeps it: classified, with the values the rules look at.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WindowEntry {
    /// Time since promotion.
    #[serde(serialize_with = "serialize_seconds")]
    pub at: Duration,
    /// Index of the check in the session, from 0.
    pub check_index: u64,
    pub probe_failed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe_reason: Option<Box<str>>,
    /// Class of the error rate against `error_rate_threshold`.
    pub error_class: ValueClass,
    /// The error rate when it was usable.
    pub error_rate: Option<f64>,
    /// The requests it was measured over, when the snapshot said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requests: Option<f64>,
    pub baseline_breach: bool,
    /// The baseline test on this check's counts: its p-value and the errors the baseline
    /// predicts for its requests (`core::stats`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_p_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_expected_errors: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_p99_ms: Option<f64>,
    /// Over an absolute latency threshold.
    pub latency_breach: bool,
    pub memory_breach: bool,
    pub memory_percent: Option<f64>,
}

impl WindowEntry {
    /// A probe failure or any kind of breach: what the failure pattern is made of.
    pub fn is_failure(&self) -> bool {
        self.probe_failed
            || self.error_class == ValueClass::Breach
            || self.baseline_breach
            || self.latency_breach
            || self.memory_breach
    }

    /// Anything that keeps the window from being healthy.
    fn is_problem(&self) -> bool {
        self.is_failure() || self.error_class != ValueClass::Ok
    }
}

fn serialize_seconds<S: serde::Serializer>(at: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(at.as_secs_f64())
}

/// A rule that fired, with the figures that made it fire.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Firing {
    pub rule: Rule,
    /// How many checks of the window matched (1 for the degraded error-rate rule).
    pub count: usize,
    /// How many checks the window held.
    pub of: usize,
    /// The threshold the rule compares with (a rate, a count or a percentage).
    pub threshold: f64,
    /// The latest value the rule looked at, when it has one.
    pub observed: Option<f64>,
    /// Recorded but not acted on: global or per-rule dry run.
    pub dry_run: bool,
    /// For the baseline rule: the smallest p-value among its breaching checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
}

/// Shape of the failures inside the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePattern {
    /// No probe failure or breach in the window.
    None,
    /// A full window of failures.
    Sustained,
    /// The latest two or more checks failed in a row.
    ConsecutiveFailures,
    /// Failures separated by good checks, or a single one.
    Intermittent,
}

impl FailurePattern {
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePattern::None => "none",
            FailurePattern::Sustained => "sustained",
            FailurePattern::ConsecutiveFailures => "consecutive_failures",
            FailurePattern::Intermittent => "intermittent",
        }
    }
}

/// The engine's answer to one check.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub at: Duration,
    pub check_index: u64,
    /// The verdict of every rule that fired, dry-run or not.
    pub verdict: Verdict,
    /// The action to take: the verdict of the enforced (not dry-run) rules, if it is one.
    pub action: Option<Action>,
    /// Every rule that fired, strongest verdict first.
    pub fired: Vec<Firing>,
    pub failure_pattern: FailurePattern,
    /// Failures (probe failures or breaches) inside the window.
    pub failure_count: usize,
    /// Checks in the window.
    pub window_len: usize,
    /// The latest check's error rate when usable, and its class.
    pub error_rate: Option<f64>,
    pub error_class: ValueClass,
    /// The latest probe failure's reason, if the latest probe failed.
    pub probe_reason: Option<Box<str>>,
}

impl Decision {
    /// The action the verdict would have caused, when dry run held it back.
    pub fn would_act(&self) -> Option<Action> {
        let would = verdict_action(self.verdict);
        if would.is_some() && would != self.action {
            would
        } else {
            None
        }
    }

    pub fn fired(&self, rule: Rule) -> Option<&Firing> {
        self.fired.iter().find(|firing| firing.rule == rule)
    }

    /// One sentence for humans, in the spirit of the seed ("High error rate (42.5%) with
    /// 5 failures"), naming the strongest rule that fired.
    pub fn reason(&self) -> String {
        let Some(top) = self.fired.first() else {
            return match self.error_rate {
                Some(rate) => format!("healthy: error rate {}", percent(rate)),
                None => "healthy".to_owned(),
            };
        };
        let window = format!("{} of {} checks", top.count, top.of);
        match top.rule {
            Rule::ErrorRate => format!(
                "High error rate ({}) with {} failures: {} over {}",
                self.error_rate
                    .or(top.observed)
                    .map(percent)
                    .unwrap_or_else(|| "n/a".into()),
                self.failure_count,
                window,
                percent(top.threshold)
            ),
            Rule::Baseline => match top.p_value {
                Some(p) => format!(
                    "Errors above what the baseline predicts × {} (binomial test, p = {p:.2e}) in {window}",
                    top.threshold
                ),
                None => format!(
                    "Error rate or p95 latency over the baseline × {} in {window}",
                    top.threshold
                ),
            },
            Rule::Latency => format!(
                "Latency over its threshold ({} ms) in {window}",
                top.observed.map(|ms| format!("{ms:.0}")).unwrap_or_else(|| "n/a".into())
            ),
            Rule::Memory => format!("Host memory over {}% in {window}", top.threshold),
            Rule::ProbeFailures => format!(
                "Worker probe failed {} consecutive times{}",
                top.count,
                self.probe_reason
                    .as_deref()
                    .map(|reason| format!(": {reason}"))
                    .unwrap_or_default()
            ),
            Rule::NoData => format!(
                "No usable error rate for {} consecutive checks (latest: {})",
                top.count,
                self.error_class.as_str()
            ),
            Rule::DegradedErrorRate => format!(
                "Error rate {} above degraded threshold {}",
                top.observed.map(percent).unwrap_or_default(),
                percent(top.threshold)
            ),
            Rule::RecentProblems => format!("{} problem checks in the last {}", top.count, top.of),
        }
    }
}

fn percent(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
}

fn verdict_action(verdict: Verdict) -> Option<Action> {
    match verdict {
        Verdict::Rollback => Some(Action::Rollback),
        Verdict::Escalate => Some(Action::Escalate),
        Verdict::Healthy | Verdict::Degraded => None,
    }
}

/// The windowed decision engine.
#[derive(Debug, Clone)]
pub struct Engine {
    config: EngineConfig,
    baseline: Option<Baseline>,
    window: VecDeque<WindowEntry>,
    next_check_index: u64,
}

impl Engine {
    pub fn new(config: EngineConfig, baseline: Option<Baseline>) -> Engine {
        let window = VecDeque::with_capacity(config.window.max(1));
        Engine {
            config,
            baseline,
            window,
            next_check_index: 0,
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn baseline(&self) -> Option<Baseline> {
        self.baseline
    }

    /// The checks the verdict is computed from, oldest first.
    pub fn window(&self) -> impl ExactSizeIterator<Item = &WindowEntry> + '_ {
        self.window.iter()
    }

    /// Number of checks observed since the engine was made.
    pub fn checks_seen(&self) -> u64 {
        self.next_check_index
    }

    /// Feeds one check taken at `at` (time since promotion) and returns the decision.
    pub fn observe(&mut self, at: Duration, check: &CheckResult) -> Decision {
        let entry = self.classify(at, check);
        if self.window.len() == self.config.window.max(1) {
            self.window.pop_front();
        }
        self.window.push_back(entry);
        self.next_check_index += 1;
        self.evaluate()
    }

    /// [`Engine::observe`] for the session's check number `index` (what the audit line's
    /// `#N` and `checkIndex` say), so the evidence numbers the checks the same way after a
    /// reload or a restart rebuilt the engine.
    pub fn observe_numbered(&mut self, at: Duration, index: u64, check: &CheckResult) -> Decision {
        self.next_check_index = index;
        self.observe(at, check)
    }

    /// Classifies every value of one check against the thresholds.
    pub fn classify(&self, at: Duration, check: &CheckResult) -> WindowEntry {
        let config = &self.config;
        let (probe_failed, probe_reason) = match &check.probe {
            ProbeOutcome::Ok => (false, None),
            ProbeOutcome::Failed { reason } => (true, Some(reason.as_str().into())),
        };

        let snapshot = match &check.snapshot {
            SnapshotOutcome::Values(snapshot) => Some(snapshot),
            SnapshotOutcome::Unavailable { .. } => None,
        };

        let (error_class, error_rate) = match snapshot {
            None => (ValueClass::ProviderError, None),
            Some(snapshot) => classify_error_rate(config, snapshot),
        };

        let latency_p95_ms = snapshot.and_then(|s| s.latency_p95_ms.finite_non_negative());
        let latency_p99_ms = snapshot.and_then(|s| s.latency_p99_ms.finite_non_negative());
        let requests = snapshot.and_then(|s| s.requests.finite_non_negative());
        let latency_breach = matches!((latency_p95_ms, config.latency_p95_ms_threshold), (Some(v), Some(t)) if v > t)
            || matches!((latency_p99_ms, config.latency_p99_ms_threshold), (Some(v), Some(t)) if v > t);
        let mut baseline_p_value = None;
        let mut baseline_expected_errors = None;
        let baseline_breach = match self.baseline {
            None => false,
            Some(baseline) => {
                // Judged only on a usable rate (min_requests already applied to it).
                let error_over = match error_rate {
                    None => false,
                    Some(rate) => {
                        let k = config.baseline_error_multiplier;
                        let test = requests.and_then(|n| {
                            let errors = stats::errors_of(rate, n);
                            let n = n.round() as u64;
                            match (baseline.errors, baseline.requests, baseline.error_rate) {
                                (Some(e), Some(big_n), _) => {
                                    stats::excess_over_counts(errors, n, e, big_n, k)
                                }
                                (_, _, Some(base)) => stats::excess_over_rate(errors, n, base, k),
                                _ => None,
                            }
                        });
                        match test {
                            Some(test) => {
                                baseline_p_value = Some(test.p_value);
                                baseline_expected_errors = Some(test.expected);
                                test.p_value < config.baseline_alpha
                            }
                            // No request count: the seed's ratio rule.
                            None => match baseline.error_rate {
                                Some(base) if base > 0.0 && requests.is_none() => rate > base * k,
                                _ => false,
                            },
                        }
                    }
                };
                let latency_over = match (latency_p95_ms, baseline.latency_p95_ms) {
                    (Some(p95), Some(base)) if base > 0.0 => {
                        p95 > base * config.latency_p95_multiplier
                    }
                    _ => false,
                };
                error_over || latency_over
            }
        };

        // The host sample from /proc is preferred; the snapshot's memoryPercent stands in
        // when resources were not sampled.
        let memory_percent = check
            .resources
            .as_ref()
            .and_then(|r| r.host_memory_percent)
            .filter(|m| m.is_finite() && (0.0..=100.0).contains(m))
            .or_else(|| {
                snapshot
                    .and_then(|s| s.memory_percent.finite_non_negative())
                    .filter(|m| *m <= 100.0)
            });
        let memory_breach = memory_percent.is_some_and(|m| m > config.memory_percent);

        WindowEntry {
            at,
            check_index: self.next_check_index,
            probe_failed,
            probe_reason,
            error_class,
            error_rate,
            requests,
            baseline_breach,
            baseline_p_value,
            baseline_expected_errors,
            latency_p95_ms,
            latency_p99_ms,
            latency_breach,
            memory_breach,
            memory_percent,
        }
    }

    fn evaluate(&self) -> Decision {
        let config = &self.config;
        let latest = self.window.back().expect("observe pushed a check");
        let window_len = self.window.len();
        let mut fired = Vec::new();
        let mut fire = |rule: Rule,
                        count: usize,
                        threshold: f64,
                        observed: Option<f64>,
                        p_value: Option<f64>| {
            fired.push(Firing {
                rule,
                count,
                of: window_len,
                threshold,
                observed,
                dry_run: config.dry_run || config.dry_run_rules.contains(&rule),
                p_value,
            });
        };

        // Rollback rules: counts of breaching checks inside the window.
        let breaches = self
            .window
            .iter()
            .filter(|e| e.error_class == ValueClass::Breach)
            .count();
        if breaches >= config.rollback_min_breaches {
            fire(
                Rule::ErrorRate,
                breaches,
                config.error_rate_threshold,
                latest.error_rate,
                None,
            );
        }
        let baseline_breaches = self.window.iter().filter(|e| e.baseline_breach).count();
        if baseline_breaches >= config.rollback_min_breaches {
            let p_value = self
                .window
                .iter()
                .filter(|e| e.baseline_breach)
                .filter_map(|e| e.baseline_p_value)
                .min_by(f64::total_cmp);
            fire(
                Rule::Baseline,
                baseline_breaches,
                config.baseline_error_multiplier,
                latest.error_rate,
                p_value,
            );
        }
        let latency_breaches = self.window.iter().filter(|e| e.latency_breach).count();
        if latency_breaches >= config.rollback_min_breaches {
            let threshold = config
                .latency_p99_ms_threshold
                .filter(|t| latest.latency_p99_ms.is_some_and(|v| v > *t))
                .or(config.latency_p95_ms_threshold)
                .unwrap_or_default();
            fire(
                Rule::Latency,
                latency_breaches,
                threshold,
                latest
                    .latency_p99_ms
                    .filter(|_| config.latency_p99_ms_threshold == Some(threshold))
                    .or(latest.latency_p95_ms),
                None,
            );
        }
        let memory_breaches = self.window.iter().filter(|e| e.memory_breach).count();
        if memory_breaches >= config.rollback_min_breaches {
            fire(
                Rule::Memory,
                memory_breaches,
                config.memory_percent,
                latest.memory_percent,
                None,
            );
        }

        // Escalate rules: trailing streaks inside the window.
        let probe_streak = trailing(&self.window, |e| e.probe_failed);
        if probe_streak >= config.consecutive_failures {
            fire(
                Rule::ProbeFailures,
                probe_streak,
                config.consecutive_failures as f64,
                None,
                None,
            );
        }
        let no_data_streak = trailing(&self.window, |e| e.error_class.is_unusable());
        if no_data_streak >= config.max_consecutive_no_data
            && config.no_data_policy == NoDataPolicy::Escalate
        {
            fire(
                Rule::NoData,
                no_data_streak,
                config.max_consecutive_no_data as f64,
                None,
                None,
            );
        }

        // Degraded rules.
        if let Some(rate) = latest.error_rate {
            if rate > config.degraded_error_rate {
                fire(
                    Rule::DegradedErrorRate,
                    1,
                    config.degraded_error_rate,
                    Some(rate),
                    None,
                );
            }
        }
        let problems = self.window.iter().filter(|e| e.is_problem()).count();
        if problems > 0 {
            fire(Rule::RecentProblems, problems, 0.0, None, None);
        }

        let strongest = |only_enforced: bool| {
            fired
                .iter()
                .filter(|f| !(only_enforced && f.dry_run))
                .map(|f| f.rule.verdict())
                .max()
                .unwrap_or(Verdict::Healthy)
        };
        let verdict = strongest(false);
        let action = verdict_action(strongest(true));
        // Strongest verdict first, rules in declaration order within a verdict.
        fired.sort_by(|a, b| {
            b.rule
                .verdict()
                .cmp(&a.rule.verdict())
                .then(a.rule.cmp(&b.rule))
        });

        let failure_count = self.window.iter().filter(|e| e.is_failure()).count();
        let failure_pattern = failure_pattern(&self.window, config.window, failure_count);

        Decision {
            at: latest.at,
            check_index: latest.check_index,
            verdict,
            action,
            fired,
            failure_pattern,
            failure_count,
            window_len,
            error_rate: latest.error_rate,
            error_class: latest.error_class,
            probe_reason: latest.probe_reason.clone(),
        }
    }
}

fn classify_error_rate(
    config: &EngineConfig,
    snapshot: &crate::core::check::Snapshot,
) -> (ValueClass, Option<f64>) {
    let rate = match snapshot.error_rate {
        Sample::Missing => return (ValueClass::NoData, None),
        Sample::Wrong(_) => return (ValueClass::Invalid, None),
        Sample::Number(rate) => rate,
    };
    if !rate.is_finite() || !(0.0..=1.0).contains(&rate) {
        return (ValueClass::Invalid, None);
    }
    if config.min_requests > 0 {
        // Unknown traffic is treated like too little traffic: no verdict either way.
        match snapshot.requests.finite_non_negative() {
            Some(requests) if requests >= config.min_requests as f64 => {}
            _ => return (ValueClass::NoData, None),
        }
    }
    if rate > config.error_rate_threshold {
        (ValueClass::Breach, Some(rate))
    } else {
        (ValueClass::Ok, Some(rate))
    }
}

fn trailing(window: &VecDeque<WindowEntry>, pred: impl Fn(&WindowEntry) -> bool) -> usize {
    window.iter().rev().take_while(|e| pred(e)).count()
}

fn failure_pattern(
    window: &VecDeque<WindowEntry>,
    window_size: usize,
    failure_count: usize,
) -> FailurePattern {
    if failure_count == 0 {
        FailurePattern::None
    } else if failure_count == window.len() && window.len() == window_size {
        FailurePattern::Sustained
    } else if trailing(window, WindowEntry::is_failure) >= 2 {
        FailurePattern::ConsecutiveFailures
    } else {
        FailurePattern::Intermittent
    }
}
