//! The decision engine: a sans-I/O state machine.
//!
//! Fed `(at, CheckResult)`, it classifies every value of the check, pushes the check into
//! a window of the last `window` checks, evaluates the verdict rules over that window and
//! returns a [`Decision`]. It does no I/O, never reads the clock (time is an input) and
//! cannot fail: a bad sample is input, not an error. The same config and the same checks
//! always give the same decisions, which is what `rollbackd simulate` relies on.
//!
//! **Two kinds of rule** (SPEC §2, §2b):
//! - the *windowed* rules count inside the window of the last `window` checks (breaches,
//!   probe failures, checks without data); the configuration refuses limits larger than
//!   the window;
//! - the *accumulating* rules look at the session since promotion (bounded to
//!   [`SESSION_CHECKS`]): pooled errors since promotion and over a recent span against
//!   the baseline's noise ([`stats::span_test`]), probe failures k of n, the memory slope.
//!   They fire only on a rollback verdict's evidence and each can be turned off.

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
    /// The default: the release cannot be judged — say so (an alert), keep the session
    /// open (a grace period never ends in a confirmation it could not see), no action on
    /// the release. A monitoring outage is not evidence against a release.
    Hold,
    /// Fail closed: escalate.
    Escalate,
    /// Stay degraded, take no action.
    Ignore,
}

impl NoDataPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            NoDataPolicy::Hold => "hold",
            NoDataPolicy::Escalate => "escalate",
            NoDataPolicy::Ignore => "ignore",
        }
    }
}

/// A verdict rule. Names are stable: they appear in evidence, `dry_run_rules` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// `rollback_min_breaches` checks in the window over `error_rate_threshold`.
    ErrorRate,
    /// That many checks whose errors exceed what the baseline predicts × multiplier (at
    /// `baseline_alpha`: a gamma-Poisson test with the baseline's swings, or the exact
    /// binomial one when they are unknown; see `core::stats`).
    Baseline,
    /// That many checks with enough requests behind their quantiles whose p95 or p99 is
    /// over the baseline's × its multiplier (widened by the baseline's own spread).
    BaselineLatency,
    /// The errors since promotion, pooled (the most extreme checks left out), are more
    /// than the baseline predicts beyond its noise, by more than the practical margin.
    SessionErrors,
    /// The same over the last `evidence_recent_checks` checks, against the multiplier: a
    /// late onset is not diluted by a good start.
    RecentErrors,
    /// That many checks with p95 over `latency_p95_ms_threshold` or p99 over
    /// `latency_p99_ms_threshold` (both off unless set).
    Latency,
    /// That many checks with host memory over `memory_percent`.
    Memory,
    /// Host memory climbing steadily (a leak): its slope after a warm-up.
    MemoryTrend,
    /// The worker probe failed in `probe_flap_failures` of the last `probe_flap_window`
    /// checks, not necessarily in a row.
    ProbeFlapping,
    /// The last `consecutive_failures` worker probes failed.
    ProbeFailures,
    /// `max_consecutive_no_data` checks in a row without a usable error rate.
    NoData,
    /// The latest error rate is over `degraded_error_rate`.
    DegradedErrorRate,
    /// `max_consecutive_no_data` checks in a row without a usable error rate under
    /// `no_data_policy = "hold"`: the release cannot be judged (an alert, no action).
    CannotJudge,
    /// A probe failure, breach or check without data is still inside the window.
    RecentProblems,
}

impl Rule {
    pub const ALL: [Rule; 14] = [
        Rule::ErrorRate,
        Rule::Baseline,
        Rule::BaselineLatency,
        Rule::SessionErrors,
        Rule::RecentErrors,
        Rule::Latency,
        Rule::Memory,
        Rule::MemoryTrend,
        Rule::ProbeFlapping,
        Rule::ProbeFailures,
        Rule::NoData,
        Rule::DegradedErrorRate,
        Rule::CannotJudge,
        Rule::RecentProblems,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::ErrorRate => "error_rate",
            Rule::Baseline => "baseline",
            Rule::BaselineLatency => "baseline_latency",
            Rule::SessionErrors => "session_errors",
            Rule::RecentErrors => "recent_errors",
            Rule::Latency => "latency",
            Rule::Memory => "memory",
            Rule::MemoryTrend => "memory_trend",
            Rule::ProbeFlapping => "probe_flapping",
            Rule::ProbeFailures => "probe_failures",
            Rule::NoData => "no_data",
            Rule::DegradedErrorRate => "degraded_error_rate",
            Rule::CannotJudge => "cannot_judge",
            Rule::RecentProblems => "recent_problems",
        }
    }

    pub fn from_name(name: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|rule| rule.as_str() == name)
    }

    /// The verdict this rule argues for when it fires.
    pub fn verdict(self) -> Verdict {
        match self {
            Rule::ErrorRate
            | Rule::Baseline
            | Rule::BaselineLatency
            | Rule::SessionErrors
            | Rule::RecentErrors
            | Rule::Latency
            | Rule::Memory
            | Rule::MemoryTrend
            | Rule::ProbeFlapping => Verdict::Rollback,
            Rule::ProbeFailures | Rule::NoData => Verdict::Escalate,
            Rule::DegradedErrorRate | Rule::CannotJudge | Rule::RecentProblems => Verdict::Degraded,
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
    /// p99 against the baseline's p99 × this (SPEC §2b: both quantiles are compared).
    pub latency_p99_multiplier: f64,
    /// A check's quantile is judged only when at least this many of its requests lie
    /// beyond it (p95: 5 → 100 requests; p99: 5 → 500). Unknown traffic: judged (the
    /// seed's checks carry no counts).
    pub quantile_min_tail: f64,
    /// The accumulating error statistics (`session_errors`, `recent_errors`): the chance
    /// each allows of ever firing on a release no worse than the baseline, spent over the
    /// looks (`stats::spent_alpha`); 0 turns both off.
    pub evidence_alpha: f64,
    /// Practical margin of `session_errors`: the pooled errors must be at least this
    /// many times what the baseline predicts…
    pub evidence_min_ratio: f64,
    /// …and above it by at least this absolute error rate (0.0005: 0.05 points).
    pub evidence_min_excess: f64,
    /// The looks `evidence_alpha` is planned for: the grace period's checks (derived:
    /// `grace_period / check_interval`).
    pub evidence_looks: u64,
    /// The span of `recent_errors`, in checks.
    pub evidence_recent_checks: usize,
    /// The most extreme checks left out of each span (one or two spikes never fire it).
    pub evidence_trim: usize,
    /// The least between-check swing of the error rate assumed (a relative standard
    /// deviation: 0.1 is ±10 %), whatever calm the baseline showed.
    pub noise_floor: f64,
    /// `memory_trend`: host memory rising at least this many points per hour…
    pub memory_leak_per_hour: f64,
    /// …by at least this many points over the fit, after the warm-up, over at least
    /// `memory_leak_min_checks` checks. `memory_leak_per_hour = 0` turns it off.
    pub memory_leak_min_rise: f64,
    pub memory_leak_min_checks: usize,
    #[serde(serialize_with = "serialize_seconds")]
    pub memory_leak_warmup: Duration,
    /// `probe_flapping`: this many probe failures among the last `probe_flap_window`
    /// checks; 0 turns it off.
    pub probe_flap_failures: usize,
    pub probe_flap_window: usize,
    /// After a promotion, checks without a usable error rate are expected for this long
    /// (a new version has no series until it is scraped and `rate()` has two samples):
    /// they count neither as no-data nor as problems (`monitor.warmup`).
    #[serde(serialize_with = "serialize_seconds")]
    pub warmup: Duration,
    /// After a rollback, the restored version's metrics still cover the bad version's
    /// window for this long: its checks are not judged on them (`rollback.settle`).
    #[serde(serialize_with = "serialize_seconds")]
    pub settle: Duration,
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
    /// Why the snapshot had no values, when it had none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_reason: Option<Box<str>>,
    /// Taken inside the warm-up after a promotion or the settle time after a rollback:
    /// its missing error rate was expected (and, settling, its metrics are not judged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quiet: Option<Quiet>,
    /// Errors over the baseline (the `baseline` rule).
    pub baseline_breach: bool,
    /// p95 or p99 over the baseline's (the `baseline_latency` rule).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub latency_baseline_breach: bool,
    /// The check's p95 / p99 over the baseline's, when judged; "not enough samples" when
    /// a quantile had too few requests behind it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p95_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_note: Option<&'static str>,
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
            || self.latency_baseline_breach
            || self.latency_breach
            || self.memory_breach
    }

    /// Anything that keeps the window from being healthy.
    fn is_problem(&self) -> bool {
        self.is_failure() || (self.error_class != ValueClass::Ok && !self.expected_no_data())
    }

    /// No usable error rate, and none was expected: what `max_consecutive_no_data` counts.
    pub fn is_missing_data(&self) -> bool {
        self.error_class.is_unusable() && !self.expected_no_data()
    }

    /// No usable error rate inside the warm-up or the settle time.
    pub fn expected_no_data(&self) -> bool {
        self.quiet.is_some() && self.error_class.is_unusable()
    }
}

/// Why a check's missing data was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Quiet {
    /// Inside `monitor.warmup` after the promotion.
    WarmUp,
    /// Inside `rollback.settle` after a rollback: the metrics still cover the version
    /// rolled back from.
    Settle,
}

impl WindowEntry {}

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
    /// The figures of an accumulating or latency rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Detail>,
}

/// What an accumulating or latency rule measured (SPEC §2b: the reason names the rule
/// that fired, with its numbers).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Detail {
    /// `session_errors`, `recent_errors`.
    #[serde(rename_all = "camelCase")]
    Errors {
        errors: f64,
        expected: f64,
        requests: f64,
        checks: usize,
        trimmed: usize,
        ratio: f64,
        excess_rate: f64,
        /// The significance required at this look.
        alpha: f64,
        /// The baseline's between-check swing used (relative standard deviation).
        swing: f64,
    },
    /// `baseline_latency`: the quantile, the latest judged value and the baseline's, the
    /// ratio it had to exceed.
    #[serde(rename_all = "camelCase")]
    Quantile {
        quantile: &'static str,
        observed_ms: f64,
        baseline_ms: f64,
        limit_ratio: f64,
    },
    /// `memory_trend`.
    #[serde(rename_all = "camelCase")]
    Slope {
        per_hour: f64,
        from_percent: f64,
        to_percent: f64,
        seconds: f64,
        checks: usize,
    },
    /// `probe_flapping`.
    #[serde(rename_all = "camelCase")]
    Flapping { failures: usize, checks: usize },
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
    /// Why the latest snapshot had no values, when it had none.
    pub snapshot_reason: Option<Box<str>>,
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
            Rule::Baseline => match (top.p_value, top.detail) {
                (Some(p), Some(Detail::Errors { swing, .. })) => format!(
                    "Errors above what the baseline predicts × {} in {window} (gamma-Poisson test with the baseline's swings of ±{:.0}%, p = {p:.2e})",
                    top.threshold,
                    swing * 100.0
                ),
                (Some(p), _) => format!(
                    "Errors above what the baseline predicts × {} (binomial test, p = {p:.2e}) in {window}",
                    top.threshold
                ),
                (None, _) => format!(
                    "Error rate over the baseline rate × {} in {window}",
                    top.threshold
                ),
            },
            Rule::BaselineLatency => match top.detail {
                Some(Detail::Quantile {
                    quantile,
                    observed_ms,
                    baseline_ms,
                    limit_ratio,
                }) => format!(
                    "{quantile} latency {observed_ms:.0} ms over the baseline's {baseline_ms:.0} ms × {limit_ratio:.2} in {window}"
                ),
                _ => format!("Latency over the baseline × {} in {window}", top.threshold),
            },
            Rule::SessionErrors | Rule::RecentErrors => {
                let span = if top.rule == Rule::SessionErrors {
                    "since promotion"
                } else {
                    "in the recent checks"
                };
                match top.detail {
                    Some(Detail::Errors {
                        errors,
                        expected,
                        checks,
                        trimmed,
                        ratio,
                        excess_rate,
                        alpha,
                        swing,
                        ..
                    }) => format!(
                        "Errors {span} {ratio:.2}× what the baseline predicts (+{:.2} points; {errors:.0} errors where {expected:.1} were expected over {checks} checks{}; p = {:.1e} < {alpha:.1e} with the baseline's swings of ±{:.0}%; margin {}×)",
                        excess_rate * 100.0,
                        if trimmed > 0 {
                            format!(", the {trimmed} most extreme left out")
                        } else {
                            String::new()
                        },
                        top.p_value.unwrap_or(f64::NAN),
                        swing * 100.0,
                        top.threshold
                    ),
                    _ => format!("Errors {span} above the baseline"),
                }
            }
            Rule::Latency => format!(
                "Latency over its threshold ({} ms) in {window}",
                top.observed.map(|ms| format!("{ms:.0}")).unwrap_or_else(|| "n/a".into())
            ),
            Rule::Memory => format!("Host memory over {}% in {window}", top.threshold),
            Rule::MemoryTrend => match top.detail {
                Some(Detail::Slope {
                    per_hour,
                    from_percent,
                    to_percent,
                    seconds,
                    ..
                }) => format!(
                    "Host memory climbing {per_hour:.0} points per hour ({from_percent:.1}% → {to_percent:.1}% over {:.0} s; a leak)",
                    seconds
                ),
                _ => "Host memory climbing (a leak)".to_owned(),
            },
            Rule::ProbeFlapping => match top.detail {
                Some(Detail::Flapping { failures, checks }) => format!(
                    "Worker probe failed in {failures} of the last {checks} checks{}",
                    self.probe_reason
                        .as_deref()
                        .map(|reason| format!(": {reason}"))
                        .unwrap_or_default()
                ),
                _ => "Worker probe failing intermittently".to_owned(),
            },
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
            Rule::CannotJudge => format!(
                "Cannot judge the release: no usable error rate for {} consecutive checks (latest: {}{}); holding, no action",
                top.count,
                self.error_class.as_str(),
                self.snapshot_reason
                    .as_deref()
                    .map(|reason| format!(": {reason}"))
                    .unwrap_or_default()
            ),
            Rule::DegradedErrorRate => format!(
                "Error rate {} above degraded threshold {}",
                top.observed.map(percent).unwrap_or_default(),
                percent(top.threshold)
            ),
            Rule::RecentProblems => format!(
                "{} problem check{} in the last {}",
                top.count,
                if top.count == 1 { "" } else { "s" },
                top.of
            ),
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

/// At most this many of a session's checks are kept for the accumulating rules (6 h at a
/// 10 s cadence); older ones are forgotten.
pub const SESSION_CHECKS: usize = 2048;

/// At most this many memory samples (the newest) make the leak rule's slope.
pub const MEMORY_TREND_POINTS: usize = 60;

/// What the accumulating rules keep of each check.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Kept {
    at: f64,
    counts: Option<stats::Counts>,
    memory: Option<f64>,
    probe_failed: bool,
}

/// The windowed decision engine, with the session's evidence.
#[derive(Debug, Clone)]
pub struct Engine {
    config: EngineConfig,
    baseline: Option<Baseline>,
    /// What the accumulating rules compare with: the baseline's rate and noise.
    reference: Option<stats::Reference>,
    window: VecDeque<WindowEntry>,
    session: VecDeque<Kept>,
    /// Checks before this (time since promotion) are in a warm-up or a settle time.
    quiet_until: Duration,
    quiet: Quiet,
    /// Checks with counts the accumulating error statistics have looked at.
    looks: u64,
    next_check_index: u64,
}

impl Engine {
    pub fn new(config: EngineConfig, baseline: Option<Baseline>) -> Engine {
        let window = VecDeque::with_capacity(config.window.max(1));
        let reference = baseline.and_then(|b| reference_of(&b, config.noise_floor));
        Engine {
            quiet_until: config.warmup,
            quiet: Quiet::WarmUp,
            config,
            baseline,
            reference,
            window,
            session: VecDeque::new(),
            looks: 0,
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

    /// A rollback was verified at `at` (time since promotion): the restored version's
    /// checks until `at + settle` are not judged on their metrics.
    pub fn settle_from(&mut self, at: Duration) {
        self.quiet = Quiet::Settle;
        self.quiet_until = at.saturating_add(self.config.settle);
    }

    /// The quiet span in force (kind, until) — carried over when the engine is rebuilt.
    pub fn quiet(&self) -> (Quiet, Duration) {
        (self.quiet, self.quiet_until)
    }

    pub fn set_quiet(&mut self, (quiet, until): (Quiet, Duration)) {
        self.quiet = quiet;
        self.quiet_until = until;
    }

    /// Whether every check of a full window had a usable error rate: what a confirmation
    /// under `no_data_policy = "hold"` needs (it never confirms what it could not see).
    pub fn window_judged(&self) -> bool {
        self.window.len() >= self.config.window.max(1)
            && self.window.iter().all(|e| !e.error_class.is_unusable())
    }

    /// Feeds one check taken at `at` (time since promotion) and returns the decision.
    pub fn observe(&mut self, at: Duration, check: &CheckResult) -> Decision {
        let entry = self.classify(at, check);
        if self.window.len() == self.config.window.max(1) {
            self.window.pop_front();
        }
        let counts = match (entry.error_rate, entry.requests) {
            (Some(rate), Some(requests))
                if requests > 0.0 && requests <= stats::MAX_REQUESTS_PER_CHECK =>
            {
                Some(stats::Counts {
                    at: at.as_secs_f64(),
                    errors: rate * requests,
                    requests,
                })
            }
            _ => None,
        };
        if counts.is_some() {
            self.looks += 1;
        }
        if self.session.len() == SESSION_CHECKS {
            self.session.pop_front();
        }
        self.session.push_back(Kept {
            at: at.as_secs_f64(),
            counts,
            memory: entry.memory_percent,
            probe_failed: entry.probe_failed,
        });
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

        let (snapshot, snapshot_reason) = match &check.snapshot {
            SnapshotOutcome::Values(snapshot) => (Some(snapshot), None),
            SnapshotOutcome::Unavailable { reason } => (None, Some(reason.as_str().into())),
        };

        let quiet = (at < self.quiet_until).then_some(self.quiet);
        let (error_class, error_rate) = match snapshot {
            None => (ValueClass::ProviderError, None),
            // Settling: the restored version's metrics still cover the version rolled
            // back from; they say nothing about it yet.
            Some(_) if quiet == Some(Quiet::Settle) => (ValueClass::NoData, None),
            Some(snapshot) => classify_error_rate(config, snapshot),
        };
        let settling = quiet == Some(Quiet::Settle);

        let judged = snapshot.filter(|_| !settling);
        let latency_p95_ms = judged.and_then(|s| s.latency_p95_ms.finite_non_negative());
        let latency_p99_ms = judged.and_then(|s| s.latency_p99_ms.finite_non_negative());
        let requests = judged.and_then(|s| s.requests.finite_non_negative());
        let latency_breach = matches!((latency_p95_ms, config.latency_p95_ms_threshold), (Some(v), Some(t)) if v > t)
            || matches!((latency_p99_ms, config.latency_p99_ms_threshold), (Some(v), Some(t)) if v > t);
        let mut baseline_p_value = None;
        let mut baseline_expected_errors = None;
        let mut p95_ratio = None;
        let mut p99_ratio = None;
        let mut latency_note = None;
        let mut latency_baseline_breach = false;
        let baseline_breach = match self.baseline {
            None => false,
            Some(baseline) => {
                // Judged only on a usable rate (min_requests already applied to it).
                match error_rate {
                    None => false,
                    Some(rate) => {
                        let k = config.baseline_error_multiplier;
                        // A count no check can have (a hostile or broken snapshot) is not
                        // tested: the exact tests would saturate it into "every request
                        // failed" and roll back on nothing.
                        let test = requests
                            .filter(|n| *n <= stats::MAX_REQUESTS_PER_CHECK)
                            .and_then(|n| {
                                match (
                                    self.reference.filter(|_| baseline.dispersion.is_some()),
                                    baseline.errors,
                                    baseline.requests,
                                    baseline.error_rate,
                                ) {
                                    // The baseline's swings are known: they are the noise.
                                    (Some(reference), _, _, _) => {
                                        stats::excess_with_noise(rate * n, n, &reference, k)
                                    }
                                    (None, Some(e), Some(big_n), _) => stats::excess_over_counts(
                                        stats::errors_of(rate, n),
                                        n.round() as u64,
                                        e.round().max(0.0) as u64,
                                        big_n,
                                        k,
                                    ),
                                    (None, _, _, Some(base)) => stats::excess_over_rate(
                                        stats::errors_of(rate, n),
                                        n.round() as u64,
                                        base,
                                        k,
                                    ),
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
                }
            }
        };
        if let Some(baseline) = self.baseline {
            // Quantiles need samples (SPEC §2b): a p95 over 20 requests is noise. The
            // requests beyond the quantile are counted over the window this check would
            // join (the rule is "rollback_min_breaches of the window"); unknown traffic is
            // judged, as the seed's checks carry no counts.
            let window_requests: f64 = self
                .window
                .iter()
                .rev()
                .take(config.window.max(1).saturating_sub(1))
                .filter_map(|e| e.requests)
                .sum();
            let enough = |share: f64| {
                requests.is_none_or(|n| (n + window_requests) * share >= config.quantile_min_tail)
            };
            for (quantile, value, base, multiplier, spread, share, ratio_slot) in [
                (
                    "p95",
                    latency_p95_ms,
                    baseline.latency_p95_ms,
                    config.latency_p95_multiplier,
                    baseline.p95_spread,
                    0.05,
                    &mut p95_ratio,
                ),
                (
                    "p99",
                    latency_p99_ms,
                    baseline.latency_p99_ms,
                    config.latency_p99_multiplier,
                    baseline.p99_spread,
                    0.01,
                    &mut p99_ratio,
                ),
            ] {
                let (Some(value), Some(base)) = (value, base) else {
                    continue;
                };
                if base <= 0.0 {
                    continue;
                }
                if !enough(share) {
                    latency_note = Some("not enough samples");
                    let _ = quantile;
                    continue;
                }
                let ratio = value / base;
                *ratio_slot = Some(ratio);
                if ratio > latency_limit(multiplier, spread) {
                    latency_baseline_breach = true;
                }
            }
        }

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
            snapshot_reason,
            quiet: quiet.filter(|q| *q == Quiet::Settle || error_class.is_unusable()),
            baseline_breach,
            latency_baseline_breach,
            p95_ratio,
            p99_ratio,
            latency_note,
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
                        of: usize,
                        threshold: f64,
                        observed: Option<f64>,
                        p_value: Option<f64>,
                        detail: Option<Detail>| {
            fired.push(Firing {
                rule,
                count,
                of,
                threshold,
                observed,
                dry_run: config.dry_run || config.dry_run_rules.contains(&rule),
                p_value,
                detail,
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
                window_len,
                config.error_rate_threshold,
                latest.error_rate,
                None,
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
            let detail = self
                .reference
                .filter(|_| self.baseline.is_some_and(|b| b.dispersion.is_some()))
                .map(|reference| Detail::Errors {
                    errors: 0.0,
                    expected: 0.0,
                    requests: 0.0,
                    checks: baseline_breaches,
                    trimmed: 0,
                    ratio: 0.0,
                    excess_rate: 0.0,
                    alpha: config.baseline_alpha,
                    swing: reference.noise.sigma2.sqrt(),
                });
            fire(
                Rule::Baseline,
                baseline_breaches,
                window_len,
                config.baseline_error_multiplier,
                latest.error_rate,
                p_value,
                detail,
            );
        }
        let latency_baseline = self
            .window
            .iter()
            .filter(|e| e.latency_baseline_breach)
            .count();
        if latency_baseline >= config.rollback_min_breaches {
            if let Some(baseline) = self.baseline {
                let entry = self
                    .window
                    .iter()
                    .rev()
                    .find(|e| e.latency_baseline_breach)
                    .expect("counted above");
                let p95_over = entry.p95_ratio.is_some_and(|r| {
                    r > latency_limit(config.latency_p95_multiplier, baseline.p95_spread)
                });
                let (quantile, observed, base, multiplier, spread) = if p95_over {
                    (
                        "p95",
                        entry.latency_p95_ms,
                        baseline.latency_p95_ms,
                        config.latency_p95_multiplier,
                        baseline.p95_spread,
                    )
                } else {
                    (
                        "p99",
                        entry.latency_p99_ms,
                        baseline.latency_p99_ms,
                        config.latency_p99_multiplier,
                        baseline.p99_spread,
                    )
                };
                fire(
                    Rule::BaselineLatency,
                    latency_baseline,
                    window_len,
                    multiplier,
                    observed,
                    None,
                    Some(Detail::Quantile {
                        quantile,
                        observed_ms: observed.unwrap_or_default(),
                        baseline_ms: base.unwrap_or_default(),
                        limit_ratio: latency_limit(multiplier, spread),
                    }),
                );
            }
        }
        // The accumulating error statistics (SPEC §2b).
        if let Some(reference) = self.reference {
            if config.evidence_alpha > 0.0 && latest.error_rate.is_some() {
                let counts: Vec<stats::Counts> =
                    self.session.iter().filter_map(|k| k.counts).collect();
                let alpha =
                    stats::spent_alpha(config.evidence_alpha, self.looks, config.evidence_looks);
                let swing = reference.noise.sigma2.sqrt();
                // Never on fewer checks than the windowed rules need, beyond the ones
                // left out: a blip (or two) is never a bad release.
                let least = config.evidence_trim + config.rollback_min_breaches.max(1);
                let judge = |span: &[stats::Counts], min_ratio: f64, how: stats::Trim| {
                    if span.len() < least {
                        return None;
                    }
                    let test = stats::span_test(span, &reference, config.evidence_trim, how)?;
                    let fires = test.p_value < alpha
                        && test.ratio > min_ratio
                        && test.excess_rate >= config.evidence_min_excess;
                    fires.then_some(test)
                };
                let detail = |test: stats::SpanTest| Detail::Errors {
                    errors: test.errors,
                    expected: test.expected,
                    requests: test.requests,
                    checks: test.checks,
                    trimmed: test.trimmed,
                    ratio: test.ratio,
                    excess_rate: test.excess_rate,
                    alpha,
                    swing,
                };
                if let Some(test) = judge(&counts, config.evidence_min_ratio, stats::Trim::Outliers)
                {
                    fire(
                        Rule::SessionErrors,
                        test.checks,
                        test.checks + test.trimmed,
                        config.evidence_min_ratio,
                        Some(test.ratio),
                        Some(test.p_value),
                        Some(detail(test)),
                    );
                }
                let recent = config.evidence_recent_checks;
                if recent >= least && counts.len() > recent {
                    let span = &counts[counts.len() - recent..];
                    if let Some(test) =
                        judge(span, config.baseline_error_multiplier, stats::Trim::Always)
                    {
                        fire(
                            Rule::RecentErrors,
                            test.checks,
                            test.checks + test.trimmed,
                            config.baseline_error_multiplier,
                            Some(test.ratio),
                            Some(test.p_value),
                            Some(detail(test)),
                        );
                    }
                }
            }
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
                window_len,
                threshold,
                latest
                    .latency_p99_ms
                    .filter(|_| config.latency_p99_ms_threshold == Some(threshold))
                    .or(latest.latency_p95_ms),
                None,
                None,
            );
        }
        let memory_breaches = self.window.iter().filter(|e| e.memory_breach).count();
        if memory_breaches >= config.rollback_min_breaches {
            fire(
                Rule::Memory,
                memory_breaches,
                window_len,
                config.memory_percent,
                latest.memory_percent,
                None,
                None,
            );
        }
        if let Some(slope) = self.memory_trend() {
            fire(
                Rule::MemoryTrend,
                slope.1,
                slope.1,
                config.memory_leak_per_hour,
                latest.memory_percent,
                None,
                Some(slope.0),
            );
        }
        if config.probe_flap_failures > 0 {
            let span = config.probe_flap_window.max(config.probe_flap_failures);
            let checks = self.session.len().min(span);
            let failures = self
                .session
                .iter()
                .rev()
                .take(span)
                .filter(|k| k.probe_failed)
                .count();
            if failures >= config.probe_flap_failures {
                fire(
                    Rule::ProbeFlapping,
                    failures,
                    checks,
                    config.probe_flap_failures as f64,
                    None,
                    None,
                    Some(Detail::Flapping { failures, checks }),
                );
            }
        }

        // Escalate rules: trailing streaks inside the window.
        let probe_streak = trailing(&self.window, |e| e.probe_failed);
        if probe_streak >= config.consecutive_failures {
            fire(
                Rule::ProbeFailures,
                probe_streak,
                window_len,
                config.consecutive_failures as f64,
                None,
                None,
                None,
            );
        }
        let no_data_streak = trailing(&self.window, WindowEntry::is_missing_data);
        if no_data_streak >= config.max_consecutive_no_data {
            match config.no_data_policy {
                NoDataPolicy::Escalate => fire(
                    Rule::NoData,
                    no_data_streak,
                    window_len,
                    config.max_consecutive_no_data as f64,
                    None,
                    None,
                    None,
                ),
                NoDataPolicy::Hold => fire(
                    Rule::CannotJudge,
                    no_data_streak,
                    window_len,
                    config.max_consecutive_no_data as f64,
                    None,
                    None,
                    None,
                ),
                NoDataPolicy::Ignore => {}
            }
        }

        // Degraded rules.
        if let Some(rate) = latest.error_rate {
            if rate > config.degraded_error_rate {
                fire(
                    Rule::DegradedErrorRate,
                    1,
                    window_len,
                    config.degraded_error_rate,
                    Some(rate),
                    None,
                    None,
                );
            }
        }
        let problems = self.window.iter().filter(|e| e.is_problem()).count();
        if problems > 0 {
            fire(
                Rule::RecentProblems,
                problems,
                window_len,
                0.0,
                None,
                None,
                None,
            );
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
            snapshot_reason: latest.snapshot_reason.clone(),
        }
    }

    /// The memory leak rule: a Theil–Sen slope over the session's host memory after the
    /// warm-up, with its detail and the number of checks it was fitted on.
    fn memory_trend(&self) -> Option<(Detail, usize)> {
        let config = &self.config;
        if config.memory_leak_per_hour.is_nan() || config.memory_leak_per_hour <= 0.0 {
            return None;
        }
        // No sample now: nothing to judge (and no scan of the session for one).
        if self.session.back().is_none_or(|k| k.memory.is_none()) {
            return None;
        }
        let warmup = config.memory_leak_warmup.as_secs_f64();
        // The last MEMORY_TREND_POINTS samples after the warm-up: Theil–Sen is quadratic
        // in its points, and a leak worth a rollback shows within them.
        let mut points: Vec<(f64, f64)> = self
            .session
            .iter()
            .rev()
            .filter(|k| k.at >= warmup)
            .filter_map(|k| k.memory.map(|m| (k.at, m)))
            .take(MEMORY_TREND_POINTS)
            .collect();
        points.reverse();
        if points.len() < config.memory_leak_min_checks.max(3) {
            return None;
        }
        let slope = stats::theil_sen(&points)?;
        let per_hour = slope * 3600.0;
        let seconds = points.last()?.0 - points.first()?.0;
        let rise = slope * seconds;
        // What the memory actually did, not only the fit: the median of the last three
        // against the median of the first three.
        let ends = |p: &[(f64, f64)]| stats::median_of(&p.iter().map(|x| x.1).collect::<Vec<_>>());
        let from = ends(&points[..3])?;
        let to = ends(&points[points.len() - 3..])?;
        // A leak only climbs: a garbage collector's sawtooth falls back by more than the
        // noise every period. The deepest fall below the running maximum must stay under
        // half the rise asked for.
        let mut peak = f64::NEG_INFINITY;
        let mut drawdown: f64 = 0.0;
        for (_, m) in &points {
            peak = peak.max(*m);
            drawdown = drawdown.max(peak - m);
        }
        let fires = per_hour >= config.memory_leak_per_hour
            && rise >= config.memory_leak_min_rise
            && to - from >= config.memory_leak_min_rise * 0.75
            && drawdown <= config.memory_leak_min_rise * 0.5;
        fires.then_some((
            Detail::Slope {
                per_hour,
                from_percent: from,
                to_percent: to,
                seconds,
                checks: points.len(),
            },
            points.len(),
        ))
    }
}

/// The ratio a quantile must exceed: the multiplier, or two of the baseline's own
/// between-check spreads (of ln p95 / ln p99) when those are wider. The rule counts
/// `rollback_min_breaches` of the window — for 3 of 5, the window's median — and the
/// median of five has about half a single check's spread: two spreads are then about
/// four of the median's, which noise alone crosses about once in ten thousand looks.
fn latency_limit(multiplier: f64, spread: Option<f64>) -> f64 {
    match spread {
        Some(spread) if spread.is_finite() && spread > 0.0 => multiplier.max((2.0 * spread).exp()),
        _ => multiplier,
    }
}

/// The reference the accumulating statistics use: the baseline's counts (or rate) with
/// its noise, never calmer than `noise_floor`.
fn reference_of(baseline: &Baseline, noise_floor: f64) -> Option<stats::Reference> {
    let noise = stats::Noise {
        sigma2: baseline.dispersion.unwrap_or(0.0),
        rho: baseline
            .persistence
            .unwrap_or(0.0)
            .max(stats::PERSISTENCE_FLOOR),
        step_seconds: baseline.step_seconds.unwrap_or(30.0),
    };
    let checks = f64::from(baseline.samples.unwrap_or(1).max(1));
    match (baseline.errors, baseline.requests) {
        (Some(errors), Some(requests)) if requests > 0 => {
            stats::Reference::new(errors, requests as f64, noise, checks, noise_floor)
        }
        _ => {
            // A rate only (an operator's): taken as known.
            let rate = baseline.error_rate.filter(|r| *r > 0.0 && *r <= 1.0)?;
            let sigma2 = noise.sigma2.max(noise_floor * noise_floor);
            Some(stats::Reference {
                rate,
                rate_relvar: 0.0,
                noise: stats::Noise { sigma2, ..noise },
            })
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
