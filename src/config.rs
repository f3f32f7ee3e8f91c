//! Configuration: TOML file, profiles, environment overrides, validation, provenance.
//!
//! Layers, weakest first: built-in defaults, the profile's presets, the file, the
//! environment (`ROLLBACKD_<SECTION>_<KEY>` and the four legacy `WVO_ROLLBACK_*` names).
//! Every key is declared once in [`KEYS`] with its type; each layer is type-checked against
//! that table, so an error names the key path and the layer it came from. A configuration
//! with any error is refused as a whole (the CLI exits 78).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use toml::Value;

use crate::core::engine::{EngineConfig, NoDataPolicy, Rule};

/// Where the file is looked for when neither `--config` nor `$ROLLBACKD_CONFIG` names one.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/rollbackd/rollbackd.toml";

/// Environment variable naming the configuration file.
pub const CONFIG_ENV: &str = "ROLLBACKD_CONFIG";

/// The type of a configuration key.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Duration,
    Float,
    Int,
    Bool,
    Str,
    StrList,
    Enum(&'static [&'static str]),
}

impl Kind {
    fn describe(self) -> String {
        match self {
            Kind::Duration => "a duration such as \"30s\" or \"10m\"".into(),
            Kind::Float => "a number".into(),
            Kind::Int => "a whole number".into(),
            Kind::Bool => "true or false".into(),
            Kind::Str => "a string".into(),
            Kind::StrList => "an array of strings".into(),
            Kind::Enum(names) => format!("one of {}", names.join(", ")),
        }
    }
}

const PROFILES: &[&str] = &["default", "production", "staging", "development"];

/// Every key the configuration accepts, with its type. `flags.defaults.*` is free-form.
const KEYS: &[(&str, Kind)] = &[
    ("state_dir", Kind::Str),
    ("profile", Kind::Enum(PROFILES)),
    ("monitor.check_interval", Kind::Duration),
    ("monitor.degraded_check_interval", Kind::Duration),
    ("monitor.check_timeout", Kind::Duration),
    ("monitor.grace_period", Kind::Duration),
    ("monitor.window", Kind::Int),
    ("monitor.warmup", Kind::Duration),
    ("rules.error_rate_threshold", Kind::Float),
    ("rules.degraded_error_rate", Kind::Float),
    ("rules.rollback_min_breaches", Kind::Int),
    ("rules.consecutive_failures", Kind::Int),
    ("rules.min_requests", Kind::Int),
    ("rules.max_consecutive_no_data", Kind::Int),
    (
        "rules.no_data_policy",
        Kind::Enum(&["hold", "escalate", "ignore"]),
    ),
    ("rules.baseline_error_multiplier", Kind::Float),
    ("rules.baseline_alpha", Kind::Float),
    ("rules.latency_p95_multiplier", Kind::Float),
    ("rules.latency_p95_ms_threshold", Kind::Float),
    ("rules.latency_p99_ms_threshold", Kind::Float),
    ("rules.memory_percent", Kind::Float),
    ("rules.latency_p99_multiplier", Kind::Float),
    ("rules.quantile_min_tail", Kind::Float),
    ("rules.evidence_alpha", Kind::Float),
    ("rules.evidence_min_ratio", Kind::Float),
    ("rules.evidence_min_excess", Kind::Float),
    ("rules.evidence_recent_checks", Kind::Int),
    ("rules.evidence_trim", Kind::Int),
    ("rules.noise_floor", Kind::Float),
    ("rules.memory_leak_per_hour", Kind::Float),
    ("rules.memory_leak_min_rise", Kind::Float),
    ("rules.memory_leak_min_checks", Kind::Int),
    ("rules.memory_leak_warmup", Kind::Duration),
    ("rules.probe_flap_failures", Kind::Int),
    ("rules.probe_flap_window", Kind::Int),
    ("rules.dry_run", Kind::Bool),
    ("rules.dry_run_rules", Kind::StrList),
    ("worker.health_url", Kind::Str),
    ("worker.health_command", Kind::StrList),
    ("worker.health_tcp", Kind::Str),
    ("worker.pid_file", Kind::Str),
    ("worker.active", Kind::Str),
    ("operations.snapshot_url", Kind::Str),
    ("operations.snapshot_command", Kind::StrList),
    ("operations.prometheus.url", Kind::Str),
    ("operations.prometheus.error_rate", Kind::Str),
    ("operations.prometheus.requests", Kind::Str),
    ("operations.prometheus.latency_p95_ms", Kind::Str),
    ("operations.prometheus.latency_p99_ms", Kind::Str),
    ("operations.prometheus.scrape_interval", Kind::Duration),
    ("rollback.switch_command", Kind::StrList),
    ("rollback.pause_command", Kind::StrList),
    ("rollback.drain_command", Kind::StrList),
    ("rollback.resume_command", Kind::StrList),
    ("rollback.hook_timeout", Kind::Duration),
    ("rollback.verify_timeout", Kind::Duration),
    ("rollback.verify_interval", Kind::Duration),
    ("rollback.max_attempts", Kind::Int),
    ("rollback.retry_backoff", Kind::Duration),
    ("rollback.max_rollbacks_per_hour", Kind::Int),
    ("rollback.stability_period", Kind::Duration),
    ("rollback.settle", Kind::Duration),
    ("kill_switch.database", Kind::Str),
    ("kill_switch.key", Kind::Str),
    ("kill_switch.reset_quiet_period", Kind::Duration),
    ("kill_switch.create_database", Kind::Bool),
    ("alerts.webhook_url", Kind::Str),
    (
        "alerts.format",
        Kind::Enum(&["generic", "slack", "alertmanager"]),
    ),
    ("alerts.timeout", Kind::Duration),
    ("alerts.max_retries", Kind::Int),
    ("http.listen", Kind::Str),
    ("baseline.window", Kind::Duration),
    ("baseline.observe_interval", Kind::Duration),
    ("baseline.min_samples", Kind::Int),
    ("retention.sessions", Kind::Duration),
    ("retention.max_sessions", Kind::Int),
    ("fleet.endpoints", Kind::StrList),
    ("fleet.host", Kind::Str),
    ("fleet.prefix", Kind::Str),
    ("fleet.follow_verdicts", Kind::Bool),
    ("fleet.lease_ttl", Kind::Duration),
    ("fleet.ca_file", Kind::Str),
    ("fleet.cert_file", Kind::Str),
    ("fleet.key_file", Kind::Str),
    ("fleet.username", Kind::Str),
    ("fleet.password_file", Kind::Str),
];

/// The largest value a duration key accepts. Every duration is bounded at load so that
/// deadlines computed from it (`Instant + Duration`, worst-case sums) stay far inside the
/// clock's range: an unbounded `hook_timeout` once panicked `check-config` and a rollback.
const DURATION_MAX: Duration = Duration::from_secs(7 * 86_400);
/// `retention.sessions` is the one duration measured in months, not minutes.
const RETENTION_MAX: Duration = Duration::from_secs(365 * 86_400);

/// The largest value the duration key `key` accepts (README's key table lists them).
pub fn duration_max(key: &str) -> Duration {
    match key {
        "retention.sessions" => RETENTION_MAX,
        _ => DURATION_MAX,
    }
}

/// Every declared key path, in declaration order (for listings that show unset keys too).
pub fn key_paths() -> impl Iterator<Item = &'static str> {
    KEYS.iter().map(|(key, _)| *key)
}

const FLAG_DEFAULTS_PREFIX: &str = "flags.defaults.";

/// The scrape interval assumed when `[operations.prometheus]` does not say.
pub const DEFAULT_SCRAPE_INTERVAL: Duration = Duration::from_secs(15);

/// The longest range selector (`[1m]`, `[90s]`; `[{interval}]` is the check interval) in
/// a PromQL expression.
pub fn longest_range(expression: &str, check_interval: Duration) -> Option<Duration> {
    let mut longest: Option<Duration> = None;
    let mut rest = expression;
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else { break };
        let inside = after[..close].split(':').next().unwrap_or("").trim();
        let range = if inside == "{interval}" {
            Some(check_interval)
        } else {
            parse_prometheus_duration(inside)
        };
        if let Some(range) = range {
            longest = Some(longest.map_or(range, |l| l.max(range)));
        }
        rest = &after[close + 1..];
    }
    longest
}

/// A Prometheus duration: `1m`, `90s`, `1h30m`, `500ms`.
pub fn parse_prometheus_duration(text: &str) -> Option<Duration> {
    if text.is_empty() {
        return None;
    }
    let mut total = Duration::ZERO;
    let mut number = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let value: u64 = number.parse().ok()?;
        number.clear();
        let unit = match (c, chars.peek()) {
            ('m', Some('s')) => {
                chars.next();
                Duration::from_millis(1)
            }
            ('s', _) => Duration::from_secs(1),
            ('m', _) => Duration::from_secs(60),
            ('h', _) => Duration::from_secs(3600),
            ('d', _) => Duration::from_secs(86_400),
            ('w', _) => Duration::from_secs(7 * 86_400),
            ('y', _) => Duration::from_secs(365 * 86_400),
            _ => return None,
        };
        total = total.checked_add(unit.checked_mul(u32::try_from(value).ok()?)?)?;
    }
    number.is_empty().then_some(total)
}

/// The warm-up and settle time a configuration implies: with `[operations.prometheus]`, two
/// scrapes plus the longest range its queries use (`rate()` needs two samples of the new
/// series, and the window must have moved past the old version's); otherwise zero.
fn derived_quiet(merged: &BTreeMap<String, (Value, Source)>) -> Duration {
    let text = |key: &str| match merged.get(key) {
        Some((Value::String(s), _)) => Some(s.clone()),
        _ => None,
    };
    if text("operations.prometheus.url").is_none() {
        return Duration::ZERO;
    }
    let interval = text("monitor.check_interval")
        .and_then(|t| humantime::parse_duration(&t).ok())
        .unwrap_or(Duration::from_secs(30));
    let scrape = text("operations.prometheus.scrape_interval")
        .and_then(|t| humantime::parse_duration(&t).ok())
        .unwrap_or(DEFAULT_SCRAPE_INTERVAL);
    let longest = [
        "operations.prometheus.error_rate",
        "operations.prometheus.requests",
        "operations.prometheus.latency_p95_ms",
        "operations.prometheus.latency_p99_ms",
    ]
    .iter()
    .filter_map(|key| text(key))
    .filter_map(|query| longest_range(&query, interval))
    .max()
    .unwrap_or(Duration::ZERO);
    scrape.saturating_mul(2).saturating_add(longest)
}

/// Built-in defaults (profile `default`). `monitor.degraded_check_interval` is derived
/// (half the check interval) unless a layer sets it.
const DEFAULTS_TOML: &str = r#"
state_dir = "state"
profile = "default"

[monitor]
check_interval = "30s"
check_timeout = "5s"
grace_period = "10m"
window = 5

[rules]
error_rate_threshold = 0.20
degraded_error_rate = 0.05
rollback_min_breaches = 3
consecutive_failures = 2
min_requests = 0
max_consecutive_no_data = 4
no_data_policy = "hold"
baseline_error_multiplier = 2.0
baseline_alpha = 0.05
latency_p95_multiplier = 1.5
latency_p99_multiplier = 1.5
quantile_min_tail = 5.0
evidence_alpha = 0.01
evidence_min_ratio = 1.5
evidence_min_excess = 0.0005
evidence_recent_checks = 8
evidence_trim = 2
noise_floor = 0.3
memory_percent = 90.0
memory_leak_per_hour = 60.0
memory_leak_min_rise = 8.0
memory_leak_min_checks = 8
memory_leak_warmup = "2m"
probe_flap_failures = 4
probe_flap_window = 10
dry_run = false
dry_run_rules = []

[rollback]
hook_timeout = "30s"
verify_timeout = "2m"
verify_interval = "5s"
max_attempts = 3
retry_backoff = "1s"
max_rollbacks_per_hour = 3
stability_period = "15m"

[kill_switch]
database = "state/orchestrator.db"
key = "DISABLE_NEW"
reset_quiet_period = "15m"
create_database = false

[alerts]
format = "generic"
timeout = "5s"
max_retries = 3

[http]
listen = "127.0.0.1:9187"

[baseline]
window = "10m"
observe_interval = "30s"
min_samples = 3

[retention]
sessions = "90d"
max_sessions = 5000

[fleet]
endpoints = []
prefix = "/rollbackd/"
follow_verdicts = false
lease_ttl = "10s"
ca_file = ""
cert_file = ""
key_file = ""
username = ""
password_file = ""
"#;

/// The presets of each profile (SPEC §2, contract).
fn profile_presets(profile: &str) -> [(&'static str, Value); 3] {
    let (threshold, grace, failures) = match profile {
        "production" => (0.15, "15m", 1),
        "staging" => (0.25, "5m", 2),
        "development" => (0.50, "2m", 3),
        _ => (0.20, "10m", 2),
    };
    [
        ("rules.error_rate_threshold", Value::Float(threshold)),
        ("monitor.grace_period", Value::String(grace.into())),
        ("rules.consecutive_failures", Value::Integer(failures)),
    ]
}

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    Derived,
    Profile(String),
    File(PathBuf),
    Env(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Derived => f.write_str("derived"),
            Source::Profile(name) => write!(f, "profile {name}"),
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Env(name) => write!(f, "environment {name}"),
        }
    }
}

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The key path (`rules.error_rate_threshold`), or the file for file-level problems.
    pub key: String,
    pub message: String,
}

/// The configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration ({} problem{}):\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" }, format_issues(.0))]
    Invalid(Vec<ConfigIssue>),
}

fn format_issues(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(|issue| format!("  {}: {}", issue.key, issue.message))
        .collect::<Vec<_>>()
        .join("\n")
}

/// How the worker is probed.
#[derive(Debug, Clone, PartialEq)]
pub enum ProbeSpec {
    Http(String),
    Command(Vec<String>),
    Tcp(String),
}

/// Prometheus queries for the snapshot. Each may hold `{worker}` (the checked version),
/// `{previous}` (the version before it, empty when none) and `{interval}` (the time since
/// the previous check as a Prometheus duration, at least two scrape intervals): see
/// [`PrometheusSpec::requests_window`] and `adapters::SnapshotVars`.
#[derive(Debug, Clone, PartialEq)]
pub struct PrometheusSpec {
    pub url: String,
    pub error_rate: String,
    pub requests: Option<String>,
    pub latency_p95_ms: Option<String>,
    pub latency_p99_ms: Option<String>,
    /// How often Prometheus scrapes the service (`scrape_interval`, default 15s): a
    /// `rate()`/`increase()` window needs two samples, so `{interval}` is never shorter
    /// than two of these, and shorter fixed ranges are warned about.
    pub scrape_interval: Duration,
}

/// A range selector (`[...]`) found in a PromQL expression.
#[derive(Debug, Clone, PartialEq)]
pub enum PromRange {
    /// `[{interval}]`.
    Interval,
    /// A fixed duration such as `[1m]`.
    Fixed(Duration),
    /// Anything else: a subquery (`[5m:1m]`), another template, a typo. As written.
    Other(String),
}

/// What the `requests` query's window is, so its count can cover each request once.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestsWindow {
    /// No range selector: the value is taken as the count since the previous check.
    NoRange,
    /// `[{interval}]` only: the window is the time since the previous check.
    Interval,
    /// One fixed range (`[1m]`, possibly repeated): a check every `interval` shorter than
    /// it sees the same requests again, so the value is scaled by interval / range.
    Fixed(Duration),
    /// Several different ranges or a subquery: not scaled.
    Mixed(Vec<String>),
}

impl PrometheusSpec {
    /// The configured queries by key (`operations.prometheus.error_rate`, ...).
    pub fn queries(&self) -> Vec<(&'static str, &str)> {
        let mut queries = vec![("operations.prometheus.error_rate", self.error_rate.as_str())];
        for (key, query) in [
            ("operations.prometheus.requests", &self.requests),
            ("operations.prometheus.latency_p95_ms", &self.latency_p95_ms),
            ("operations.prometheus.latency_p99_ms", &self.latency_p99_ms),
        ] {
            if let Some(query) = query {
                queries.push((key, query.as_str()));
            }
        }
        queries
    }

    /// The window of the `requests` query (`None` without one).
    pub fn requests_window(&self) -> Option<RequestsWindow> {
        let query = self.requests.as_deref()?;
        let ranges = promql_ranges(query);
        let Some(first) = ranges.first() else {
            return Some(RequestsWindow::NoRange);
        };
        if ranges.iter().any(|r| r != first) || matches!(first, PromRange::Other(_)) {
            let mut shown: Vec<String> = ranges.iter().map(show_range).collect();
            shown.dedup();
            return Some(RequestsWindow::Mixed(shown));
        }
        Some(match first {
            PromRange::Interval => RequestsWindow::Interval,
            PromRange::Fixed(range) => RequestsWindow::Fixed(*range),
            PromRange::Other(_) => unreachable!("handled above"),
        })
    }

    /// What `{interval}` stands for when `elapsed` passed since the previous check: that
    /// time, but at least two scrape intervals (a window `rate()` can answer for).
    pub fn interval_window(&self, elapsed: Duration) -> Duration {
        elapsed.max(self.scrape_interval.saturating_mul(2))
    }

    /// By how much a `requests` value is multiplied so that checks `elapsed` apart count
    /// each request once: interval / range when the query's range is longer than the
    /// time since the previous check (the windows overlap), else 1.
    pub fn requests_scale(&self, elapsed: Duration) -> f64 {
        let range = match self.requests_window() {
            Some(RequestsWindow::Interval) => self.interval_window(elapsed),
            Some(RequestsWindow::Fixed(range)) => range,
            _ => return 1.0,
        };
        if range > elapsed && !range.is_zero() {
            elapsed.as_secs_f64() / range.as_secs_f64()
        } else {
            1.0
        }
    }
}

fn show_range(range: &PromRange) -> String {
    match range {
        PromRange::Interval => "[{interval}]".into(),
        PromRange::Fixed(d) => format!("[{}]", show(*d)),
        PromRange::Other(text) => format!("[{text}]"),
    }
}

/// The range selectors of a PromQL expression, in order. String literals (`"5[0-9]{2}"`,
/// single-quoted, backquoted) and `#` comments are skipped.
pub fn promql_ranges(expression: &str) -> Vec<PromRange> {
    let mut ranges = Vec::new();
    let mut chars = expression.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                let mut escaped = false;
                for inner in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if inner == '\\' && c != '`' {
                        escaped = true;
                    } else if inner == c {
                        break;
                    }
                }
            }
            '#' => {
                for inner in chars.by_ref() {
                    if inner == '\n' {
                        break;
                    }
                }
            }
            '[' => {
                let inside: String = chars.by_ref().take_while(|c| *c != ']').collect();
                let inside = inside.trim();
                ranges.push(if inside == "{interval}" {
                    PromRange::Interval
                } else if let Some(d) = parse_prometheus_duration(inside) {
                    PromRange::Fixed(d)
                } else {
                    PromRange::Other(inside.to_owned())
                });
            }
            _ => {}
        }
    }
    ranges
}

/// A duration as PromQL writes it: whole seconds (`30s`), else milliseconds (`1500ms`).
pub fn show_promql_duration(d: Duration) -> String {
    let ms = d.as_millis().max(1);
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// What `check-config` says about the Prometheus source: how `requests` is made to count
/// each request once (`{interval}`, scaled, or neither), and what `{worker}` stands for.
pub fn prometheus_notes(config: &Config) -> Vec<String> {
    let Some(SnapshotSpec::Prometheus(spec)) = &config.operations else {
        return Vec::new();
    };
    let interval = config.monitor.check_interval;
    let mut notes = vec![format!(
        "{{worker}} = the checked version, {{previous}} = the one before it, {{interval}} = the time since the previous check (first check: monitor.check_interval {}), at least 2 × scrape_interval = {}; the baseline at a promotion runs the queries over the previous version ({{worker}} = it) with {{interval}} = the range query's step",
        show(interval),
        show(spec.scrape_interval.saturating_mul(2))
    )];
    notes.push(match spec.requests_window() {
        None => "requests: no requests query; the baseline rules judge rates only".into(),
        Some(RequestsWindow::Interval) => {
            let floor = spec.scrape_interval.saturating_mul(2);
            if config.monitor.degraded_check_interval < floor {
                format!(
                    "requests: counted once per check via {{interval}}; checks closer together than {} (2 scrapes) widen the window to it and scale the count by interval/{}",
                    show(floor),
                    show(floor)
                )
            } else {
                "requests: counted once per check via {interval}".into()
            }
        }
        Some(RequestsWindow::Fixed(range)) => {
            if range > config.monitor.degraded_check_interval {
                format!(
                    "requests: [{}] window scaled by interval/{} (each request counted once; at a {} check interval a check counts {:.0}% of the window)",
                    show(range),
                    show(range),
                    show(interval),
                    100.0 * spec.requests_scale(interval)
                )
            } else {
                format!(
                    "requests: [{}] window, no longer than the check interval: counted as is",
                    show(range)
                )
            }
        }
        Some(RequestsWindow::NoRange) => {
            "requests: no range selector: the value is taken as the requests since the previous check".into()
        }
        Some(RequestsWindow::Mixed(ranges)) => format!(
            "requests: ranges {} differ (or are a subquery): NOT scaled, so checks closer together than the window count requests more than once; use [{{interval}}]",
            ranges.join(", ")
        ),
    });
    notes
}

/// Warnings about the Prometheus queries' ranges: one shorter than two scrape intervals
/// leaves `rate()`/`increase()` with a single sample (no data); a `requests` range shorter
/// than the check interval misses the requests in between.
fn prometheus_warnings(spec: &PrometheusSpec, monitor: &MonitorConfig) -> Vec<String> {
    let two_scrapes = spec.scrape_interval.saturating_mul(2);
    let mut warnings = Vec::new();
    for (key, query) in spec.queries() {
        let mut seen = Vec::new();
        for range in promql_ranges(query) {
            if seen.contains(&range) {
                continue;
            }
            seen.push(range.clone());
            match range {
                PromRange::Fixed(d) if d < two_scrapes => warnings.push(format!(
                    "{key}: range [{}] is shorter than two scrape intervals (2 × operations.prometheus.scrape_interval {} = {}): rate() and increase() need two samples in the window, so checks will often have no data",
                    show(d),
                    show(spec.scrape_interval),
                    show(two_scrapes)
                )),
                PromRange::Fixed(d)
                    if key == "operations.prometheus.requests" && d < monitor.check_interval =>
                {
                    warnings.push(format!(
                        "{key}: range [{}] is shorter than monitor.check_interval {}: requests between the windows are not counted (use [{{interval}}])",
                        show(d),
                        show(monitor.check_interval)
                    ))
                }
                PromRange::Interval if monitor.degraded_check_interval < two_scrapes => {
                    let (which, every) = if monitor.check_interval < two_scrapes {
                        ("check_interval", monitor.check_interval)
                    } else {
                        ("degraded_check_interval", monitor.degraded_check_interval)
                    };
                    warnings.push(format!(
                        "{key}: checks come every {} (monitor.{which}), less than two scrape intervals (2 × operations.prometheus.scrape_interval {} = {}): {{interval}} is widened to {} so rate() has two samples; the error rate is then averaged over {}, and requests are scaled by interval/{} to count each once",
                        show(every),
                        show(spec.scrape_interval),
                        show(two_scrapes),
                        show(two_scrapes),
                        show(two_scrapes),
                        show(two_scrapes)
                    ))
                }
                _ => {}
            }
        }
    }
    warnings
}

/// Where the operations snapshot comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum SnapshotSpec {
    Http(String),
    Command(Vec<String>),
    Prometheus(PrometheusSpec),
}

#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    pub check_interval: Duration,
    pub degraded_check_interval: Duration,
    pub check_timeout: Duration,
    pub grace_period: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkerConfig {
    pub probe: Option<ProbeSpec>,
    /// Path template; `{worker}` is the active worker's id.
    pub pid_file: Option<String>,
    /// The version serving on a fresh host, before any promotion: observed between
    /// sessions so that the first promotion has a baseline. A promotion (recorded in
    /// rollbackd.db) supersedes it.
    pub active: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RollbackConfig {
    pub switch_command: Option<Vec<String>>,
    pub pause_command: Option<Vec<String>>,
    pub drain_command: Option<Vec<String>>,
    pub resume_command: Option<Vec<String>>,
    /// Time limit of each hook.
    pub hook_timeout: Duration,
    pub verify_timeout: Duration,
    pub verify_interval: Duration,
    pub max_attempts: u32,
    /// The wait before the second attempt of a rollback; doubled before each next one, at
    /// most [`RETRY_BACKOFF_CAP`] (or this, if longer). 0: no wait.
    pub retry_backoff: Duration,
    pub max_rollbacks_per_hour: u32,
    /// After a verified rollback, how long the restored version is watched (0: not).
    pub stability_period: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KillSwitchConfig {
    pub database: PathBuf,
    pub key: String,
    pub reset_quiet_period: Duration,
    /// rollbackd may create `database` (and its `settings` table) when the file is
    /// absent. Off by default: a typo in the path must not create a database no
    /// application reads.
    pub create_database: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertFormat {
    Generic,
    Slack,
    Alertmanager,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AlertsConfig {
    pub webhook_url: Option<String>,
    pub format: AlertFormat,
    pub timeout: Duration,
    pub max_retries: u32,
}

/// How long `rollbackd.db` keeps ended sessions (with their checks and actions).
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionConfig {
    /// Sessions that ended longer ago than this are deleted.
    pub sessions: Duration,
    /// At most this many ended sessions are kept (the newest).
    pub max_sessions: u32,
}

/// How long an ended session is kept whatever the retention says: loop protection counts
/// the rollbacks of the last hour, and a kill-switch reset looks for failed checks within
/// the quiet period, so pruning must not take those rows.
pub fn retention_floor(reset_quiet_period: Duration) -> Duration {
    Duration::from_secs(3600).max(reset_quiet_period)
}

/// The validated, typed configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub state_dir: PathBuf,
    pub profile: String,
    pub monitor: MonitorConfig,
    pub rules: EngineConfig,
    pub worker: WorkerConfig,
    pub operations: Option<SnapshotSpec>,
    pub rollback: RollbackConfig,
    pub kill_switch: KillSwitchConfig,
    /// Safe defaults LiveFlags falls back to when the kill switch is on.
    pub flag_defaults: BTreeMap<String, String>,
    pub alerts: AlertsConfig,
    /// `None` when `http.listen` is empty (endpoint disabled).
    pub http_listen: Option<SocketAddr>,
    pub retention: RetentionConfig,
    /// `[baseline]`: the automatic baseline (SPEC §2a).
    pub baseline: crate::core::baseline::BaselineSettings,
    /// `[fleet]` (SPEC §8): `None` when `fleet.endpoints` is empty (no fleet).
    pub fleet: Option<FleetConfig>,
}

/// `[fleet]`: the etcd v3 cluster the hosts share (SPEC §8).
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// etcd client URLs (`http://` or `https://`), tried in turn.
    pub endpoints: Vec<String>,
    /// This host's name in the fleet (default: the hostname).
    pub host: String,
    /// Every key rollbackd writes starts with it; ends with `/`.
    pub prefix: String,
    /// Roll back when another host records a rollback verdict for the active version.
    pub follow_verdicts: bool,
    /// The host's registration lease: a host that stops renewing it disappears after it.
    pub lease_ttl: Duration,
    /// TLS to etcd (`https://` endpoints): the CA and this host's client certificate.
    pub tls: FleetTls,
    /// etcd user authentication, when `username` is set.
    pub auth: Option<FleetAuth>,
}

/// `fleet.username` and `fleet.password_file`: an etcd user (its auth enabled); the
/// password is read from the file (one line) at each authentication, never kept in the
/// configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetAuth {
    pub username: String,
    pub password_file: PathBuf,
}

/// `fleet.ca_file`, `fleet.cert_file`, `fleet.key_file`: PEM files, read when the fleet
/// client is built and again when they change (a rotation) or while they are unusable —
/// not at load: a host whose fleet files are broken still guards itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FleetTls {
    /// The CA that signed etcd's server certificate; set, it is the only one trusted.
    pub ca_file: Option<PathBuf>,
    /// This host's client certificate (etcd `--client-cert-auth`), with `key_file`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl FleetTls {
    pub fn is_set(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some()
    }
}

impl Config {
    pub fn rollbackd_db(&self) -> PathBuf {
        self.state_dir.join("rollbackd.db")
    }

    pub fn socket_path(&self) -> PathBuf {
        self.state_dir.join("rollbackd.sock")
    }

    pub fn analytics_dir(&self) -> PathBuf {
        self.state_dir.join("analytics")
    }
}

/// Where the file came from, for `check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileOrigin {
    /// Named by `--config` or `$ROLLBACKD_CONFIG`.
    Named(PathBuf),
    /// Found at the default path.
    DefaultPath(PathBuf),
    /// No file at the default path: built-in defaults only.
    NoFile(PathBuf),
    /// Given as text (tests, the demo).
    Inline,
}

/// A configuration with the provenance of each value.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: Config,
    pub origin: FileOrigin,
    /// Every effective key, its value as TOML text, and where it came from.
    pub values: Vec<(String, String, Source)>,
    /// Things worth saying that do not make the configuration invalid.
    pub warnings: Vec<String>,
    /// Short hash of the effective configuration, recorded in every artifact.
    pub hash: String,
}

/// The file path to read: `--config`, else `$ROLLBACKD_CONFIG`, else the default path.
pub fn resolve_path(explicit: Option<&Path>, env: &BTreeMap<String, String>) -> (PathBuf, bool) {
    if let Some(path) = explicit {
        return (path.to_path_buf(), true);
    }
    if let Some(path) = env.get(CONFIG_ENV).filter(|p| !p.is_empty()) {
        return (PathBuf::from(path), true);
    }
    (PathBuf::from(DEFAULT_CONFIG_PATH), false)
}

/// The process environment as UTF-8 pairs; a non-UTF-8 `ROLLBACKD_*` variable is reported
/// by [`load`] through its lossy name so it is not silently ignored.
pub fn process_env() -> BTreeMap<String, String> {
    std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// Loads the configuration the CLI would: file by the path rules, then the environment.
pub fn load(
    explicit: Option<&Path>,
    env: &BTreeMap<String, String>,
) -> Result<LoadedConfig, ConfigError> {
    let (path, named) = resolve_path(explicit, env);
    match read_regular_file(&path) {
        Ok(text) => {
            let origin = if named {
                FileOrigin::Named(path.clone())
            } else {
                FileOrigin::DefaultPath(path.clone())
            };
            load_layers(Some((&text, &path)), origin, env)
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound && !named => {
            load_layers(None, FileOrigin::NoFile(path), env)
        }
        Err(source) => Err(ConfigError::Read { path, source }),
    }
}

/// The largest value any whole-number key accepts (each key has its own, smaller range
/// check too); keeps every integer within the u32 it is stored in.
const MAX_INT: i64 = 1_000_000_000;
/// The largest configuration file read (1 MiB; a real one is a few KiB).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Reads the configuration file, refusing anything but a regular file (after symlinks: a
/// packaged config is often one): a FIFO would block the read — and `run`, or a SIGHUP
/// reload — forever, waiting for a writer; a device could be endless. Opened non-blocking
/// and checked on the open descriptor (no race with a swap), and at most
/// [`MAX_CONFIG_BYTES`] are read.
fn read_regular_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let metadata = file.metadata()?;
    if !metadata.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            if metadata.is_dir() {
                "is a directory, not a regular file"
            } else {
                "not a regular file"
            },
        ));
    }
    let too_big = || {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "larger than {MAX_CONFIG_BYTES} bytes (1 MiB), the most a configuration file may be; is this the right file?"
            ),
        )
    };
    if metadata.len() > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    String::from_utf8(bytes)
        .map_err(|err| std::io::Error::new(std::io::ErrorKind::InvalidData, err))
}

/// Loads from TOML text and an environment (tests and the demo).
/// The engine's thresholds as the built-in defaults set them (profile `default`): the one
/// source of the seed's defaults (SPEC §2); the engine has none of its own.
pub fn default_rules() -> EngineConfig {
    load_str("", &BTreeMap::new())
        .expect("the built-in defaults are a valid configuration")
        .config
        .rules
}

pub fn load_str(text: &str, env: &BTreeMap<String, String>) -> Result<LoadedConfig, ConfigError> {
    load_layers(Some((text, Path::new("<inline>"))), FileOrigin::Inline, env)
}

fn load_layers(
    file: Option<(&str, &Path)>,
    origin: FileOrigin,
    env: &BTreeMap<String, String>,
) -> Result<LoadedConfig, ConfigError> {
    let mut issues = Vec::new();
    let mut warnings = Vec::new();

    let file_values = match file {
        Some((text, path)) => {
            let table: toml::Table =
                text.parse()
                    .map_err(|err: toml::de::Error| ConfigError::Parse {
                        path: path.to_path_buf(),
                        message: err.to_string().trim().replace('\n', " "),
                    })?;
            let mut leaves = Vec::new();
            flatten("", &table, &mut leaves);
            let source = Source::File(path.to_path_buf());
            leaves
                .into_iter()
                .filter_map(|(key, value)| match check_leaf(&key, &value) {
                    Ok(()) => Some((key, value, source.clone())),
                    Err(message) => {
                        issues.push(ConfigIssue { key, message });
                        None
                    }
                })
                .collect::<Vec<_>>()
        }
        None => Vec::new(),
    };
    let env_values = env_layer(env, &mut issues, &mut warnings);

    // The profile is chosen first: it decides the presets layer under the file.
    let profile = env_values
        .iter()
        .chain(file_values.iter())
        .find(|(key, _, _)| key == "profile")
        .and_then(|(_, value, _)| value.as_str().map(str::to_owned))
        .unwrap_or_else(|| "default".to_owned());

    let defaults: toml::Table = DEFAULTS_TOML.parse().expect("built-in defaults parse");
    let mut default_leaves = Vec::new();
    flatten("", &defaults, &mut default_leaves);

    let mut merged: BTreeMap<String, (Value, Source)> = BTreeMap::new();
    for (key, value) in default_leaves {
        merged.insert(key, (value, Source::Default));
    }
    if profile != "default" {
        for (key, value) in profile_presets(&profile) {
            merged.insert(key.to_owned(), (value, Source::Profile(profile.clone())));
        }
    }
    for (key, value, source) in file_values.into_iter().chain(env_values) {
        merged.insert(key, (value, source));
    }
    if !merged.contains_key("monitor.degraded_check_interval") {
        if let Some((Value::String(interval), _)) = merged.get("monitor.check_interval") {
            if let Ok(interval) = humantime::parse_duration(interval) {
                let half = humantime::format_duration(interval / 2).to_string();
                merged.insert(
                    "monitor.degraded_check_interval".into(),
                    (Value::String(half), Source::Derived),
                );
            }
        }
    }

    // The warm-up after a promotion and the settle time after a rollback: how long the
    // metrics need to describe the version now serving (derived from the Prometheus
    // queries' ranges and the scrape interval; zero for other sources).
    let quiet = derived_quiet(&merged);
    for key in ["monitor.warmup", "rollback.settle"] {
        if !merged.contains_key(key) {
            merged.insert(
                key.into(),
                (
                    Value::String(humantime::format_duration(quiet).to_string()),
                    Source::Derived,
                ),
            );
        }
    }

    // `[operations.prometheus] scrape_interval` has a default only when the section is
    // used (a default in DEFAULTS_TOML would make every configuration a Prometheus one).
    if merged
        .keys()
        .any(|k| k.starts_with("operations.prometheus."))
        && !merged.contains_key("operations.prometheus.scrape_interval")
    {
        merged.insert(
            "operations.prometheus.scrape_interval".into(),
            (
                Value::String(show(DEFAULT_SCRAPE_INTERVAL)),
                Source::Default,
            ),
        );
    }

    if !merged.contains_key("fleet.host") {
        merged.insert(
            "fleet.host".into(),
            (Value::String(hostname()), Source::Derived),
        );
    }

    let config = build(&merged, &mut issues, &mut warnings);
    if !issues.is_empty() {
        return Err(ConfigError::Invalid(issues));
    }
    let config = config.expect("no issues means a config was built");

    let values: Vec<(String, String, Source)> = merged
        .into_iter()
        .map(|(key, (value, source))| (key, value.to_string(), source))
        .collect();
    let mut hasher = Sha256::new();
    for (key, value, source) in &values {
        // The derived host name differs on every host of a fleet that shares one file.
        if key == "fleet.host" && *source == Source::Derived {
            continue;
        }
        hasher.update(key.as_bytes());
        hasher.update(b"=");
        hasher.update(value.as_bytes());
        hasher.update(b"\n");
    }
    let digest = hasher.finalize();
    let hash = digest[..6].iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    });

    Ok(LoadedConfig {
        config,
        origin,
        values,
        warnings,
        hash,
    })
}

fn flatten(prefix: &str, table: &toml::Table, out: &mut Vec<(String, Value)>) {
    for (key, value) in table {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            // A table is a section unless the key itself is a leaf (none are tables).
            Value::Table(inner) => flatten(&path, inner, out),
            other => out.push((path, other.clone())),
        }
    }
}

fn kind_of(key: &str) -> Option<Kind> {
    if let Some(flag) = key.strip_prefix(FLAG_DEFAULTS_PREFIX) {
        return (!flag.is_empty() && !flag.contains('.')).then_some(Kind::Str);
    }
    KEYS.iter().find(|(k, _)| *k == key).map(|(_, kind)| *kind)
}

/// Checks one leaf's key is known and its value has the key's type.
fn check_leaf(key: &str, value: &Value) -> Result<(), String> {
    let Some(kind) = kind_of(key) else {
        return Err(unknown_key_message(key));
    };
    let ok = match (kind, value) {
        (Kind::Duration, Value::String(text)) => {
            let parsed = humantime::parse_duration(text).map_err(|err| {
                format!(
                    "{text:?} is not a duration ({err}); expected {}",
                    kind.describe()
                )
            })?;
            let max = duration_max(key);
            return if parsed > max {
                Err(format!(
                    "{text:?} is longer than the largest value this key accepts, {}",
                    show(max)
                ))
            } else {
                Ok(())
            };
        }
        (Kind::Float, Value::Float(_) | Value::Integer(_)) => true,
        (Kind::Int, Value::Integer(n)) => {
            // Bounded so that every integer key fits the u32/usize it is stored in: a value
            // past 2^32 must be refused, never wrap (4294967297 would become 1).
            return if *n < 0 {
                Err(format!("{n} is negative; expected {}", kind.describe()))
            } else if *n > MAX_INT {
                Err(format!(
                    "{n} is larger than the largest whole number a key accepts, {MAX_INT}"
                ))
            } else {
                Ok(())
            };
        }
        (Kind::Bool, Value::Boolean(_)) => true,
        (Kind::Str, Value::String(_)) => true,
        (Kind::StrList, Value::Array(items)) => items.iter().all(Value::is_str),
        (Kind::Enum(names), Value::String(text)) => names.contains(&text.as_str()),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{value} is not {}", kind.describe()))
    }
}

fn unknown_key_message(key: &str) -> String {
    let leaf = key.rsplit('.').next().unwrap_or(key);
    let suggestion = KEYS
        .iter()
        .map(|(k, _)| *k)
        .find(|k| k.rsplit('.').next() == Some(leaf) && *k != key);
    match suggestion {
        Some(known) => format!("unknown key (did you mean {known}?)"),
        None => "unknown key".to_owned(),
    }
}

fn env_name(key: &str) -> String {
    format!("ROLLBACKD_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Reads `ROLLBACKD_*` and the legacy `WVO_ROLLBACK_*` variables into typed leaves.
fn env_layer(
    env: &BTreeMap<String, String>,
    issues: &mut Vec<ConfigIssue>,
    warnings: &mut Vec<String>,
) -> Vec<(String, Value, Source)> {
    let mut out: Vec<(String, Value, Source)> = Vec::new();

    type ParseLegacy = fn(&str) -> Result<Value, String>;
    let legacy: [(&str, &str, ParseLegacy); 4] = [
        (
            "WVO_ROLLBACK_ERROR_THRESHOLD",
            "rules.error_rate_threshold",
            |v| {
                v.trim()
                    .parse::<f64>()
                    .map(Value::Float)
                    .map_err(|e| e.to_string())
            },
        ),
        (
            "WVO_ROLLBACK_GRACE_PERIOD_MS",
            "monitor.grace_period",
            millis_value,
        ),
        (
            "WVO_ROLLBACK_CHECK_INTERVAL_MS",
            "monitor.check_interval",
            millis_value,
        ),
        (
            "WVO_ROLLBACK_FAILURE_THRESHOLD",
            "rules.consecutive_failures",
            |v| {
                v.trim()
                    .parse::<i64>()
                    .map(Value::Integer)
                    .map_err(|e| e.to_string())
            },
        ),
    ];
    for (name, key, parse) in legacy {
        if let Some(raw) = env.get(name) {
            match parse(raw) {
                Ok(value) => match check_leaf(key, &value) {
                    Ok(()) => out.push((key.to_owned(), value, Source::Env(name.to_owned()))),
                    Err(message) => issues.push(ConfigIssue {
                        key: format!("{key} (from {name})"),
                        message,
                    }),
                },
                Err(err) => issues.push(ConfigIssue {
                    key: format!("{key} (from {name})"),
                    message: format!("{raw:?} is not valid: {err}"),
                }),
            }
        }
    }

    // ROLLBACKD_ names come after the legacy ones so they win when both are set.
    for (name, raw) in env {
        let Some(rest) = name.strip_prefix("ROLLBACKD_") else {
            continue;
        };
        if name == CONFIG_ENV {
            continue;
        }
        let key = if let Some(flag) = rest.strip_prefix("FLAGS_DEFAULTS_") {
            format!("{FLAG_DEFAULTS_PREFIX}{flag}")
        } else if let Some((key, _)) = KEYS.iter().find(|(k, _)| env_name(k) == *name) {
            (*key).to_owned()
        } else {
            issues.push(ConfigIssue {
                key: name.clone(),
                message: "unknown environment override (ROLLBACKD_<SECTION>_<KEY>)".into(),
            });
            continue;
        };
        let kind = kind_of(&key).unwrap_or(Kind::Str);
        let value = match env_value(kind, raw) {
            Ok(value) => value,
            Err(message) => {
                issues.push(ConfigIssue {
                    key: format!("{key} (from {name})"),
                    message,
                });
                continue;
            }
        };
        if let Err(message) = check_leaf(&key, &value) {
            issues.push(ConfigIssue {
                key: format!("{key} (from {name})"),
                message,
            });
            continue;
        }
        if let Some(previous) = out.iter().position(|(k, _, _)| *k == key) {
            if let Source::Env(legacy_name) = &out[previous].2 {
                warnings.push(format!("{name} overrides {legacy_name} for {key}"));
            }
            out.remove(previous);
        }
        out.push((key, value, Source::Env(name.clone())));
    }
    out
}

fn millis_value(raw: &str) -> Result<Value, String> {
    let ms: u64 = raw.trim().parse().map_err(|e| format!("{e}"))?;
    Ok(Value::String(
        humantime::format_duration(Duration::from_millis(ms)).to_string(),
    ))
}

fn env_value(kind: Kind, raw: &str) -> Result<Value, String> {
    let raw_trimmed = raw.trim();
    match kind {
        Kind::Duration | Kind::Str | Kind::Enum(_) => Ok(Value::String(raw.to_owned())),
        Kind::Float => raw_trimmed
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| format!("{raw:?} is not {}", kind.describe())),
        Kind::Int => raw_trimmed
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| format!("{raw:?} is not {}", kind.describe())),
        Kind::Bool => match raw_trimmed {
            "true" | "1" | "yes" => Ok(Value::Boolean(true)),
            "false" | "0" | "no" => Ok(Value::Boolean(false)),
            _ => Err(format!("{raw:?} is not {}", kind.describe())),
        },
        Kind::StrList => {
            let parsed: Result<toml::Table, _> = format!("v = {raw_trimmed}").parse();
            match parsed.ok().and_then(|mut t| t.remove("v")) {
                Some(value @ Value::Array(_)) => Ok(value),
                _ => Err(format!(
                    "{raw:?} is not a TOML array of strings such as [\"/bin/switch\", \"{{to}}\"]"
                )),
            }
        }
    }
}

/// Reads typed values out of the merged layers and checks ranges and contradictions.
fn build(
    merged: &BTreeMap<String, (Value, Source)>,
    issues: &mut Vec<ConfigIssue>,
    warnings: &mut Vec<String>,
) -> Option<Config> {
    let get = |key: &str| merged.get(key).map(|(value, _)| value);
    let mut problem = |key: &str, message: String| {
        issues.push(ConfigIssue {
            key: key.to_owned(),
            message,
        })
    };
    let duration = |key: &str| -> Duration {
        get(key)
            .and_then(Value::as_str)
            .and_then(|text| humantime::parse_duration(text).ok())
            .unwrap_or_default()
    };
    let float = |key: &str| -> f64 {
        match get(key) {
            Some(Value::Float(f)) => *f,
            Some(Value::Integer(i)) => *i as f64,
            _ => f64::NAN,
        }
    };
    let int = |key: &str| -> u64 { get(key).and_then(Value::as_integer).unwrap_or(0) as u64 };
    let string =
        |key: &str| -> Option<String> { get(key).and_then(Value::as_str).map(str::to_owned) };
    let list = |key: &str| -> Option<Vec<String>> {
        get(key).and_then(Value::as_array).map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
    };

    // [monitor]
    let monitor = MonitorConfig {
        check_interval: duration("monitor.check_interval"),
        degraded_check_interval: duration("monitor.degraded_check_interval"),
        check_timeout: duration("monitor.check_timeout"),
        grace_period: duration("monitor.grace_period"),
    };
    let min_interval = Duration::from_millis(10);
    for (key, value) in [
        ("monitor.check_interval", monitor.check_interval),
        (
            "monitor.degraded_check_interval",
            monitor.degraded_check_interval,
        ),
        ("monitor.check_timeout", monitor.check_timeout),
        ("monitor.grace_period", monitor.grace_period),
    ] {
        if value < min_interval {
            problem(key, format!("must be at least 10ms, got {}", show(value)));
        }
    }
    if monitor.degraded_check_interval > monitor.check_interval {
        problem(
            "monitor.degraded_check_interval",
            format!(
                "{} is longer than monitor.check_interval {}: degraded checks must come at least as often",
                show(monitor.degraded_check_interval),
                show(monitor.check_interval)
            ),
        );
    }
    if monitor.check_timeout > monitor.check_interval {
        problem(
            "monitor.check_timeout",
            format!(
                "{} is longer than monitor.check_interval {}",
                show(monitor.check_timeout),
                show(monitor.check_interval)
            ),
        );
    }
    if monitor.grace_period < monitor.check_interval {
        problem(
            "monitor.grace_period",
            format!(
                "{} is shorter than monitor.check_interval {}: no check would run",
                show(monitor.grace_period),
                show(monitor.check_interval)
            ),
        );
    }

    // [rules]
    let window = int("monitor.window") as usize;
    if !(1..=1000).contains(&window) {
        problem(
            "monitor.window",
            format!("must be between 1 and 1000, got {window}"),
        );
    }
    let mut dry_run_rules = Vec::new();
    for name in list("rules.dry_run_rules").unwrap_or_default() {
        match Rule::from_name(&name) {
            Some(rule) => dry_run_rules.push(rule),
            None => problem(
                "rules.dry_run_rules",
                format!(
                    "unknown rule {name:?}; rules are {}",
                    Rule::ALL.map(Rule::as_str).join(", ")
                ),
            ),
        }
    }
    let rules = EngineConfig {
        window,
        error_rate_threshold: float("rules.error_rate_threshold"),
        degraded_error_rate: float("rules.degraded_error_rate"),
        rollback_min_breaches: int("rules.rollback_min_breaches") as usize,
        consecutive_failures: int("rules.consecutive_failures") as usize,
        min_requests: int("rules.min_requests"),
        max_consecutive_no_data: int("rules.max_consecutive_no_data") as usize,
        no_data_policy: match string("rules.no_data_policy").as_deref() {
            Some("ignore") => NoDataPolicy::Ignore,
            Some("escalate") => NoDataPolicy::Escalate,
            _ => NoDataPolicy::Hold,
        },
        baseline_error_multiplier: float("rules.baseline_error_multiplier"),
        baseline_alpha: float("rules.baseline_alpha"),
        latency_p95_multiplier: float("rules.latency_p95_multiplier"),
        latency_p95_ms_threshold: get("rules.latency_p95_ms_threshold")
            .map(|_| float("rules.latency_p95_ms_threshold")),
        latency_p99_ms_threshold: get("rules.latency_p99_ms_threshold")
            .map(|_| float("rules.latency_p99_ms_threshold")),
        memory_percent: float("rules.memory_percent"),
        latency_p99_multiplier: float("rules.latency_p99_multiplier"),
        quantile_min_tail: float("rules.quantile_min_tail"),
        evidence_alpha: float("rules.evidence_alpha"),
        evidence_min_ratio: float("rules.evidence_min_ratio"),
        evidence_min_excess: float("rules.evidence_min_excess"),
        evidence_looks: {
            let interval = duration("monitor.check_interval").as_secs_f64();
            let grace = duration("monitor.grace_period").as_secs_f64();
            if interval > 0.0 {
                ((grace / interval).ceil() as u64).clamp(1, 100_000)
            } else {
                1
            }
        },
        evidence_recent_checks: int("rules.evidence_recent_checks") as usize,
        evidence_trim: int("rules.evidence_trim") as usize,
        noise_floor: float("rules.noise_floor"),
        memory_leak_per_hour: float("rules.memory_leak_per_hour"),
        memory_leak_min_rise: float("rules.memory_leak_min_rise"),
        memory_leak_min_checks: int("rules.memory_leak_min_checks") as usize,
        memory_leak_warmup: duration("rules.memory_leak_warmup"),
        probe_flap_failures: int("rules.probe_flap_failures") as usize,
        probe_flap_window: int("rules.probe_flap_window") as usize,
        warmup: duration("monitor.warmup"),
        settle: duration("rollback.settle"),
        dry_run: get("rules.dry_run")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        dry_run_rules,
    };
    let fraction = |v: f64| v.is_finite() && v > 0.0 && v <= 1.0;
    if !fraction(rules.error_rate_threshold) {
        problem(
            "rules.error_rate_threshold",
            format!(
                "must be a fraction in (0, 1], got {}",
                rules.error_rate_threshold
            ),
        );
    }
    if !(rules.degraded_error_rate.is_finite() && (0.0..=1.0).contains(&rules.degraded_error_rate))
    {
        problem(
            "rules.degraded_error_rate",
            format!(
                "must be a fraction in [0, 1], got {}",
                rules.degraded_error_rate
            ),
        );
    } else if rules.degraded_error_rate > rules.error_rate_threshold {
        problem(
            "rules.degraded_error_rate",
            format!(
                "{} is above rules.error_rate_threshold {}: degraded must come before rollback",
                rules.degraded_error_rate, rules.error_rate_threshold
            ),
        );
    }
    for (key, value) in [
        ("rules.rollback_min_breaches", rules.rollback_min_breaches),
        ("rules.consecutive_failures", rules.consecutive_failures),
        (
            "rules.max_consecutive_no_data",
            rules.max_consecutive_no_data,
        ),
    ] {
        if value == 0 {
            problem(key, "must be at least 1".into());
        } else if window >= 1 && value > window {
            problem(
                key,
                format!("{value} is larger than monitor.window {window}: it is counted inside the window and could never be reached"),
            );
        }
    }
    for key in [
        "rules.baseline_error_multiplier",
        "rules.latency_p95_multiplier",
        "rules.latency_p99_multiplier",
        "rules.evidence_min_ratio",
    ] {
        let value = float(key);
        if !(value.is_finite() && value >= 1.0) {
            problem(
                key,
                format!("must be a number of at least 1.0, got {value}"),
            );
        }
    }
    if !(rules.baseline_alpha.is_finite()
        && rules.baseline_alpha > 0.0
        && rules.baseline_alpha < 0.5)
    {
        problem(
            "rules.baseline_alpha",
            format!(
                "must be a probability in (0, 0.5), got {} (0.05: a check breaches the baseline when its errors would happen by chance 1 time in 20)",
                rules.baseline_alpha
            ),
        );
    }
    if !(rules.evidence_alpha.is_finite() && (0.0..0.5).contains(&rules.evidence_alpha)) {
        problem(
            "rules.evidence_alpha",
            format!(
                "must be a probability in [0, 0.5), got {} (0 turns session_errors and recent_errors off)",
                rules.evidence_alpha
            ),
        );
    }
    for (key, value, what) in [
        (
            "rules.evidence_min_excess",
            rules.evidence_min_excess,
            "an error rate in [0, 1)",
        ),
        (
            "rules.noise_floor",
            rules.noise_floor,
            "a relative standard deviation in [0, 1) (0.1: ±10 %)",
        ),
    ] {
        if !(value.is_finite() && (0.0..1.0).contains(&value)) {
            problem(key, format!("must be {what}, got {value}"));
        }
    }
    for (key, value) in [
        ("rules.quantile_min_tail", rules.quantile_min_tail),
        ("rules.memory_leak_per_hour", rules.memory_leak_per_hour),
        ("rules.memory_leak_min_rise", rules.memory_leak_min_rise),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            problem(key, format!("must be a number of at least 0, got {value}"));
        }
    }
    if rules.memory_leak_per_hour > 0.0 && rules.memory_leak_min_checks < 3 {
        problem(
            "rules.memory_leak_min_checks",
            format!(
                "must be at least 3 (a slope needs points), got {}",
                rules.memory_leak_min_checks
            ),
        );
    }
    if rules.probe_flap_failures > 0 && rules.probe_flap_window < rules.probe_flap_failures {
        problem(
            "rules.probe_flap_window",
            format!(
                "{} is smaller than rules.probe_flap_failures {}: it could never be reached",
                rules.probe_flap_window, rules.probe_flap_failures
            ),
        );
    }
    for key in [
        "rules.latency_p95_ms_threshold",
        "rules.latency_p99_ms_threshold",
    ] {
        if get(key).is_some() {
            let value = float(key);
            if !(value.is_finite() && value > 0.0) {
                problem(
                    key,
                    format!("must be a positive number of milliseconds, got {value}"),
                );
            }
        }
    }
    if !(rules.memory_percent.is_finite()
        && rules.memory_percent > 0.0
        && rules.memory_percent <= 100.0)
    {
        problem(
            "rules.memory_percent",
            format!(
                "must be a percentage in (0, 100], got {}",
                rules.memory_percent
            ),
        );
    }

    // [worker]
    let probes: Vec<ProbeSpec> = [
        string("worker.health_url").map(ProbeSpec::Http),
        list("worker.health_command").map(ProbeSpec::Command),
        string("worker.health_tcp").map(ProbeSpec::Tcp),
    ]
    .into_iter()
    .flatten()
    .collect();
    if probes.len() > 1 {
        problem(
            "worker",
            "set only one of health_url, health_command, health_tcp".into(),
        );
    }
    let probe = probes.into_iter().next();
    match &probe {
        Some(ProbeSpec::Http(url)) => check_http_url("worker.health_url", url, &mut problem),
        Some(ProbeSpec::Command(argv)) => check_argv("worker.health_command", argv, &mut problem),
        Some(ProbeSpec::Tcp(addr)) => {
            if addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                problem("worker.health_tcp", format!("{addr:?} is not host:port"));
            }
        }
        None => warnings
            .push("worker: no health_url, health_command or health_tcp; `run` needs one".into()),
    }
    if let Some(active) = string("worker.active").filter(|w| !w.is_empty()) {
        if let Err(why) = crate::text::check_worker_id(&active) {
            problem("worker.active", why);
        }
    }
    let worker = WorkerConfig {
        probe,
        pid_file: string("worker.pid_file").filter(|p| !p.is_empty()),
        active: string("worker.active").filter(|w| !w.is_empty()),
    };

    // [operations]
    let prometheus_url = string("operations.prometheus.url");
    let mut sources = Vec::new();
    if let Some(url) = string("operations.snapshot_url") {
        check_http_url("operations.snapshot_url", &url, &mut problem);
        sources.push(SnapshotSpec::Http(url));
    }
    if let Some(argv) = list("operations.snapshot_command") {
        check_argv("operations.snapshot_command", &argv, &mut problem);
        sources.push(SnapshotSpec::Command(argv));
    }
    let prometheus_keys_set = merged
        .keys()
        .any(|k| k.starts_with("operations.prometheus."));
    if prometheus_keys_set {
        match (prometheus_url, string("operations.prometheus.error_rate")) {
            (Some(url), Some(error_rate)) => {
                check_http_url("operations.prometheus.url", &url, &mut problem);
                let scrape_interval = duration("operations.prometheus.scrape_interval");
                if scrape_interval < min_interval {
                    problem(
                        "operations.prometheus.scrape_interval",
                        format!(
                            "must be at least 10ms (Prometheus's scrape_interval for this service), got {}",
                            show(scrape_interval)
                        ),
                    );
                }
                let spec = PrometheusSpec {
                    url,
                    error_rate,
                    requests: string("operations.prometheus.requests"),
                    latency_p95_ms: string("operations.prometheus.latency_p95_ms"),
                    latency_p99_ms: string("operations.prometheus.latency_p99_ms"),
                    scrape_interval,
                };
                if scrape_interval >= min_interval {
                    warnings.extend(prometheus_warnings(&spec, &monitor));
                }
                sources.push(SnapshotSpec::Prometheus(spec))
            }
            (None, _) => problem(
                "operations.prometheus.url",
                "is required with [operations.prometheus]".into(),
            ),
            (_, None) => problem(
                "operations.prometheus.error_rate",
                "is required with [operations.prometheus]".into(),
            ),
        }
    }
    if sources.len() > 1 {
        problem(
            "operations",
            "set only one of snapshot_url, snapshot_command, [operations.prometheus]".into(),
        );
    }
    let operations = sources.into_iter().next();
    if operations.is_none() {
        warnings.push(
            "operations: no snapshot source; every check will have no error rate (no-data)".into(),
        );
    }

    // [rollback]
    let rollback = RollbackConfig {
        switch_command: list("rollback.switch_command"),
        pause_command: list("rollback.pause_command"),
        drain_command: list("rollback.drain_command"),
        resume_command: list("rollback.resume_command"),
        hook_timeout: duration("rollback.hook_timeout"),
        verify_timeout: duration("rollback.verify_timeout"),
        verify_interval: duration("rollback.verify_interval"),
        max_attempts: int("rollback.max_attempts") as u32,
        retry_backoff: duration("rollback.retry_backoff"),
        max_rollbacks_per_hour: int("rollback.max_rollbacks_per_hour") as u32,
        stability_period: duration("rollback.stability_period"),
    };
    for (key, argv) in [
        ("rollback.switch_command", &rollback.switch_command),
        ("rollback.pause_command", &rollback.pause_command),
        ("rollback.drain_command", &rollback.drain_command),
        ("rollback.resume_command", &rollback.resume_command),
    ] {
        if let Some(argv) = argv {
            check_argv(key, argv, &mut problem);
        }
    }
    if rollback.switch_command.is_none() {
        warnings.push("rollback.switch_command is not set; `run` needs it to roll back".into());
    }
    for (key, value) in [
        ("rollback.hook_timeout", rollback.hook_timeout),
        ("rollback.verify_timeout", rollback.verify_timeout),
        ("rollback.verify_interval", rollback.verify_interval),
    ] {
        if value < min_interval {
            problem(key, format!("must be at least 10ms, got {}", show(value)));
        }
    }
    if rollback.verify_interval > rollback.verify_timeout {
        problem(
            "rollback.verify_interval",
            format!(
                "{} is longer than rollback.verify_timeout {}",
                show(rollback.verify_interval),
                show(rollback.verify_timeout)
            ),
        );
    }
    if !(1..=10).contains(&rollback.max_attempts) {
        problem(
            "rollback.max_attempts",
            format!("must be between 1 and 10, got {}", rollback.max_attempts),
        );
    }
    if rollback.retry_backoff > RETRY_BACKOFF_MAX {
        problem(
            "rollback.retry_backoff",
            format!(
                "must be at most {} (it is waited between the attempts of a rollback while the bad version serves), got {}",
                show(RETRY_BACKOFF_MAX),
                show(rollback.retry_backoff)
            ),
        );
    }
    if !(1..=60).contains(&rollback.max_rollbacks_per_hour) {
        problem(
            "rollback.max_rollbacks_per_hour",
            format!(
                "must be between 1 and 60, got {}",
                rollback.max_rollbacks_per_hour
            ),
        );
    }

    // [kill_switch]
    let kill_switch = KillSwitchConfig {
        database: PathBuf::from(string("kill_switch.database").unwrap_or_default()),
        key: string("kill_switch.key").unwrap_or_default(),
        reset_quiet_period: duration("kill_switch.reset_quiet_period"),
        create_database: get("kill_switch.create_database")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    };
    if kill_switch.database.as_os_str().is_empty() {
        problem("kill_switch.database", "must not be empty".into());
    }
    if kill_switch.key.trim().is_empty() {
        problem("kill_switch.key", "must not be empty".into());
    }

    let flag_defaults: BTreeMap<String, String> = merged
        .iter()
        .filter_map(|(key, (value, _))| {
            let flag = key.strip_prefix(FLAG_DEFAULTS_PREFIX)?;
            Some((flag.to_owned(), value.as_str()?.to_owned()))
        })
        .collect();

    // [alerts]
    let alerts = AlertsConfig {
        webhook_url: string("alerts.webhook_url").filter(|u| !u.is_empty()),
        format: match string("alerts.format").as_deref() {
            Some("slack") => AlertFormat::Slack,
            Some("alertmanager") => AlertFormat::Alertmanager,
            _ => AlertFormat::Generic,
        },
        timeout: duration("alerts.timeout"),
        max_retries: int("alerts.max_retries") as u32,
    };
    if let Some(url) = &alerts.webhook_url {
        check_http_url("alerts.webhook_url", url, &mut problem);
    }
    if alerts.timeout < min_interval {
        problem(
            "alerts.timeout",
            format!("must be at least 10ms, got {}", show(alerts.timeout)),
        );
    }
    if alerts.max_retries > 10 {
        problem(
            "alerts.max_retries",
            format!("must be at most 10, got {}", alerts.max_retries),
        );
    }

    // [http]
    let listen = string("http.listen").unwrap_or_default();
    let http_listen = if listen.trim().is_empty() {
        None
    } else {
        match listen.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                problem(
                    "http.listen",
                    format!("{listen:?} is not an address such as \"127.0.0.1:9187\" (or \"\" to disable)"),
                );
                None
            }
        }
    };

    // [baseline]
    let baseline = crate::core::baseline::BaselineSettings {
        window: duration("baseline.window"),
        observe_interval: duration("baseline.observe_interval"),
        min_samples: int("baseline.min_samples").min(100_000) as usize,
    };
    if baseline.window < Duration::from_secs(60) {
        problem(
            "baseline.window",
            format!(
                "must be at least 1m (a baseline is a span of traffic), got {}",
                show(baseline.window)
            ),
        );
    }
    if !baseline.observe_interval.is_zero() && baseline.observe_interval < Duration::from_secs(1) {
        problem(
            "baseline.observe_interval",
            format!(
                "must be at least 1s, or \"0s\" to observe nothing between sessions, got {}",
                show(baseline.observe_interval)
            ),
        );
    }
    if baseline.min_samples < 1 {
        problem("baseline.min_samples", "must be at least 1".into());
    }

    // [retention]
    let retention = RetentionConfig {
        sessions: duration("retention.sessions"),
        max_sessions: int("retention.max_sessions").min(u32::MAX as u64) as u32,
    };
    let keep_at_least = retention_floor(kill_switch.reset_quiet_period);
    if retention.sessions < keep_at_least {
        problem(
            "retention.sessions",
            format!(
                "must be at least {} (1h, and no less than kill_switch.reset_quiet_period), got {}",
                show(keep_at_least),
                show(retention.sessions)
            ),
        );
    }
    if retention.max_sessions < 1 {
        problem(
            "retention.max_sessions",
            format!("must be at least 1, got {}", int("retention.max_sessions")),
        );
    }

    // [fleet]
    let endpoints = list("fleet.endpoints").unwrap_or_default();
    let fleet = if endpoints.is_empty() {
        None
    } else {
        for url in &endpoints {
            check_http_url("fleet.endpoints", url, &mut problem);
        }
        let host = string("fleet.host").unwrap_or_default();
        if let Err(why) = crate::text::check_worker_id(&host) {
            problem(
                "fleet.host",
                format!("{host:?} is not a usable host name in the fleet: {why}"),
            );
        }
        let prefix = string("fleet.prefix").unwrap_or_default();
        if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() < 2 {
            problem(
                "fleet.prefix",
                format!("{prefix:?} must start and end with \"/\", such as \"/rollbackd/\""),
            );
        }
        let file = |key: &str| string(key).filter(|v| !v.is_empty()).map(PathBuf::from);
        let tls = FleetTls {
            ca_file: file("fleet.ca_file"),
            cert_file: file("fleet.cert_file"),
            key_file: file("fleet.key_file"),
        };
        if tls.cert_file.is_some() != tls.key_file.is_some() {
            let (set, unset) = if tls.cert_file.is_some() {
                ("fleet.cert_file", "fleet.key_file")
            } else {
                ("fleet.key_file", "fleet.cert_file")
            };
            problem(
                unset,
                format!(
                    "{set} is set, so {unset} must be too (the client certificate and its key)"
                ),
            );
        }
        if tls.is_set() || tls.key_file.is_some() {
            for url in endpoints.iter().filter(|u| !u.starts_with("https://")) {
                problem(
                    "fleet.endpoints",
                    format!(
                        "{url:?} is not https://, but fleet.ca_file/cert_file are set: the \
                         certificates would never be used (write https:// for every endpoint)"
                    ),
                );
            }
        }
        let username = string("fleet.username").unwrap_or_default();
        let password_file = file("fleet.password_file");
        let auth = match (username.is_empty(), password_file) {
            (true, None) => None,
            (false, Some(password_file)) => Some(FleetAuth {
                username,
                password_file,
            }),
            (false, None) => {
                problem(
                    "fleet.password_file",
                    "fleet.username is set, so the file with its password must be named too".into(),
                );
                None
            }
            (true, Some(_)) => {
                problem(
                    "fleet.username",
                    "fleet.password_file is set, so the etcd user must be named too".into(),
                );
                None
            }
        };
        if auth.is_some() {
            for url in endpoints.iter().filter(|u| !u.starts_with("https://")) {
                problem(
                    "fleet.endpoints",
                    format!(
                        "{url:?} is not https://, but fleet.username is set: the password \
                         and the token would travel in clear text (write https:// for every \
                         endpoint)"
                    ),
                );
            }
        }
        let lease_ttl = duration("fleet.lease_ttl");
        if lease_ttl < Duration::from_secs(2) || lease_ttl > Duration::from_secs(600) {
            problem(
                "fleet.lease_ttl",
                format!("must be between 2s and 10m, got {}", show(lease_ttl)),
            );
        }
        Some(FleetConfig {
            endpoints: endpoints
                .iter()
                .map(|u| u.trim_end_matches('/').to_owned())
                .collect(),
            host,
            prefix,
            follow_verdicts: get("fleet.follow_verdicts")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            lease_ttl,
            tls,
            auth,
        })
    };

    let state_dir = PathBuf::from(string("state_dir").unwrap_or_default());
    if state_dir.as_os_str().is_empty() {
        problem("state_dir", "must not be empty".into());
    }

    Some(Config {
        state_dir,
        profile: string("profile").unwrap_or_else(|| "default".into()),
        monitor,
        rules,
        worker,
        operations,
        rollback,
        kill_switch,
        flag_defaults,
        alerts,
        http_listen,
        retention,
        baseline,
        fleet,
    })
}

/// This machine's host name (`gethostname`), or `"localhost"` when it has none usable.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_owned();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

fn check_http_url(key: &str, url: &str, problem: &mut impl FnMut(&str, String)) {
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() <= "http://".len()
    {
        problem(key, format!("{url:?} is not an http:// or https:// URL"));
    }
}

fn check_argv(key: &str, argv: &[String], problem: &mut impl FnMut(&str, String)) {
    match argv.first() {
        None => problem(key, "must name a program: the array is empty".into()),
        Some(program) if program.trim().is_empty() => {
            problem(key, "the program (first element) is empty".into())
        }
        Some(_) => {}
    }
}

/// A duration the way operators write it ("30s", "1m 30s", "250ms").
pub use crate::core::time::show;

impl Config {
    /// What the Supervisor needs of this configuration.
    pub fn supervisor_settings(&self, config_hash: &str) -> crate::core::Settings {
        crate::core::Settings {
            rules: self.rules.clone(),
            check_interval: self.monitor.check_interval,
            degraded_check_interval: self.monitor.degraded_check_interval,
            check_timeout: self.monitor.check_timeout,
            grace_period: self.monitor.grace_period,
            max_rollbacks_per_hour: self.rollback.max_rollbacks_per_hour,
            stability_period: self.rollback.stability_period,
            baseline: self.baseline,
            config_hash: config_hash.to_owned(),
        }
    }
}

fn hook_count(rb: &RollbackConfig) -> u32 {
    [
        &rb.pause_command,
        &rb.drain_command,
        &rb.switch_command,
        &rb.resume_command,
    ]
    .iter()
    .filter(|hook| hook.is_some())
    .count() as u32
}

/// After SIGTERM to a timed-out hook's process group, how long before SIGKILL (`hooks`).
pub const HOOK_TERM_GRACE: Duration = Duration::from_secs(2);
/// After a hook exited, how long its pipes are still read (`hooks`).
pub const HOOK_PIPE_GRACE: Duration = Duration::from_millis(500);

/// The longest one hook can hold a rollback: its timeout, then the kill grace after it
/// (SIGTERM, [`HOOK_TERM_GRACE`], SIGKILL) and the last read of its pipes.
pub fn hook_worst_case(rb: &RollbackConfig) -> Duration {
    rb.hook_timeout
        .saturating_add(HOOK_TERM_GRACE)
        .saturating_add(HOOK_PIPE_GRACE)
}

/// The longest one rollback attempt can take: every configured hook to its timeout and
/// kill grace, then the verification to its timeout. Saturating: never panics, whatever
/// was configured.
pub fn rollback_attempt_worst_case(rb: &RollbackConfig) -> Duration {
    hook_worst_case(rb)
        .saturating_mul(hook_count(rb))
        .saturating_add(rb.verify_timeout)
}

/// The doubling of `rollback.retry_backoff` stops here (unless `retry_backoff` itself is
/// longer): 1s, 2s, 4s, ... 30s.
pub const RETRY_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// The largest `rollback.retry_backoff` accepted.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The wait before attempt `attempt` (2, 3, ...) of a rollback: `retry_backoff`, doubled
/// for each attempt after the second, at most [`RETRY_BACKOFF_CAP`] (or `retry_backoff`
/// when that is longer). Nothing before the first.
pub fn retry_wait(rb: &RollbackConfig, attempt: u32) -> Duration {
    if attempt < 2 {
        return Duration::ZERO;
    }
    let doublings = (attempt - 2).min(16);
    rb.retry_backoff
        .saturating_mul(1 << doublings)
        .min(RETRY_BACKOFF_CAP.max(rb.retry_backoff))
}

/// All the waits between the attempts of one rollback.
pub fn retry_waits_total(rb: &RollbackConfig) -> Duration {
    (2..=rb.max_attempts.max(1)).fold(Duration::ZERO, |sum, attempt| {
        sum.saturating_add(retry_wait(rb, attempt))
    })
}

/// The longest a whole rollback can take (every attempt to its worst case, and the
/// waits between them).
pub fn rollback_worst_case(rb: &RollbackConfig) -> Duration {
    rollback_attempt_worst_case(rb)
        .saturating_mul(rb.max_attempts.max(1))
        .saturating_add(retry_waits_total(rb))
}

/// Worst-case times from the onset of a problem to each action, derived from the config.
///
/// A problem that starts just after a check is seen at the next check (one
/// `check_interval`, plus up to `check_timeout` for that check to finish); from then on
/// the window is degraded, so the remaining checks come every `degraded_check_interval`.
pub fn worst_case_times(config: &Config) -> Vec<String> {
    let m = &config.monitor;
    let r = &config.rules;
    // Checks are scheduled from the start of the previous one, so a check slower than the
    // degraded interval (up to check_timeout) pushes the next one back.
    let step = m.degraded_check_interval.max(m.check_timeout);
    let to_detect = |checks: usize| -> Duration {
        m.check_interval
            .saturating_add(step.saturating_mul(checks.saturating_sub(1) as u32))
            .saturating_add(m.check_timeout)
    };
    let describe = |checks: usize| -> String {
        let step_name = if m.check_timeout > m.degraded_check_interval {
            "check timeout (longer than the degraded interval)"
        } else {
            "degraded interval"
        };
        format!(
            "at most {} (1 × {} interval + {} × {} {step_name} + {} check timeout)",
            show(to_detect(checks)),
            show(m.check_interval),
            checks.saturating_sub(1),
            show(step),
            show(m.check_timeout)
        )
    };
    let mut lines = vec![
        format!(
            "rollback after {} breaching checks (of the last {}): {}",
            r.rollback_min_breaches,
            r.window,
            describe(r.rollback_min_breaches)
        ),
        format!(
            "escalate after {} consecutive probe failures: {}",
            r.consecutive_failures,
            describe(r.consecutive_failures)
        ),
    ];
    lines.push(match r.no_data_policy {
        NoDataPolicy::Escalate => format!(
            "escalate after {} checks without a usable error rate: {}",
            r.max_consecutive_no_data,
            describe(r.max_consecutive_no_data)
        ),
        NoDataPolicy::Ignore => {
            "checks without a usable error rate: never escalate (no_data_policy = \"ignore\")"
                .into()
        }
        NoDataPolicy::Hold => format!(
            "after {} checks without a usable error rate: alert that the release cannot be judged, no action, and no confirmation until a full window is judged again (no_data_policy = \"hold\"): {}",
            r.max_consecutive_no_data,
            describe(r.max_consecutive_no_data)
        ),
    });
    let rb = &config.rollback;
    let hooks = hook_count(rb);
    let one_attempt = rollback_attempt_worst_case(rb);
    let waits: Vec<String> = (2..=rb.max_attempts.max(1))
        .map(|attempt| show(retry_wait(rb, attempt)))
        .collect();
    lines.push(format!(
        "a rollback takes at most {} per attempt ({} hooks × ({} hook timeout + {} kill grace) + {} verify), {} attempts at most{}: {}",
        show(one_attempt),
        hooks,
        show(rb.hook_timeout),
        show(HOOK_TERM_GRACE.saturating_add(HOOK_PIPE_GRACE)),
        show(rb.verify_timeout),
        rb.max_attempts,
        if waits.is_empty() {
            String::new()
        } else {
            format!(", waiting {} between them", waits.join(", "))
        },
        show(rollback_worst_case(rb))
    ));
    lines.push(format!(
        "monitoring ends (promotion confirmed) {} after promotion",
        show(m.grace_period)
    ));
    let b = &config.baseline;
    lines.push(if b.observe_interval.is_zero() {
        "baseline: not observed between sessions (baseline.observe_interval = \"0s\"); a promotion uses `--baseline-*`, else the previous version's last healthy session, else none (only the absolute rules)".to_owned()
    } else {
        format!(
            "baseline: the previous version observed every {} between sessions, its last {} before a promotion (at least {} samples);{} else its last healthy session; else none (only the absolute rules). `--baseline-*` overrides",
            show(b.observe_interval),
            show(b.window),
            b.min_samples,
            if matches!(config.operations, Some(SnapshotSpec::Prometheus(_))) {
                " else the same queries over that window from Prometheus;"
            } else {
                ""
            }
        )
    });
    lines.push(format!(
        "baseline rule: a check breaches when its errors exceed {}× what the baseline predicts for its requests at p < {} (gamma-Poisson test with the baseline's own swings, never calmer than ±{:.0}%; exact binomial for a typed baseline); rollback after {} such checks of the last {}",
        r.baseline_error_multiplier, r.baseline_alpha, r.noise_floor * 100.0, r.rollback_min_breaches, r.window
    ));
    if r.evidence_alpha > 0.0 {
        lines.push(format!(
            "accumulated evidence: rollback when the errors since promotion (or over the last {} checks, against {}×) exceed the baseline by more than {}× and {:.2} points beyond its noise, the {} most extreme checks left out, at a significance spent over the looks (α = {} in all)",
            r.evidence_recent_checks,
            r.baseline_error_multiplier,
            r.evidence_min_ratio,
            r.evidence_min_excess * 100.0,
            r.evidence_trim,
            r.evidence_alpha
        ));
    }
    lines.push(format!(
        "latency against the baseline: rollback after {} of the last {} checks with p95 over {}× or p99 over {}× the baseline's (wider when the baseline itself swings more), judged only with {} requests beyond the quantile ({} for p95, {} for p99)",
        r.rollback_min_breaches,
        r.window,
        r.latency_p95_multiplier,
        r.latency_p99_multiplier,
        r.quantile_min_tail,
        (r.quantile_min_tail / 0.05).ceil(),
        (r.quantile_min_tail / 0.01).ceil()
    ));
    if r.memory_leak_per_hour > 0.0 {
        lines.push(format!(
            "memory leak: rollback when host memory climbs at least {} points per hour and {} points over at least {} checks after the first {}",
            r.memory_leak_per_hour,
            r.memory_leak_min_rise,
            r.memory_leak_min_checks,
            show(r.memory_leak_warmup)
        ));
    }
    if r.probe_flap_failures > 0 {
        lines.push(format!(
            "flapping probe: rollback after {} probe failures in the last {} checks, in a row or not",
            r.probe_flap_failures, r.probe_flap_window
        ));
    }
    for (name, threshold) in [
        ("p95", r.latency_p95_ms_threshold),
        ("p99", r.latency_p99_ms_threshold),
    ] {
        if let Some(ms) = threshold {
            lines.push(format!(
                "rollback after {} checks with {name} latency over {ms} ms (of the last {}): {}",
                r.rollback_min_breaches,
                r.window,
                describe(r.rollback_min_breaches)
            ));
        }
    }
    if r.dry_run {
        lines.push("dry_run = true: actions are recorded, never taken".into());
    } else if !r.dry_run_rules.is_empty() {
        lines.push(format!(
            "dry-run rules (recorded, never acted on): {}",
            r.dry_run_rules
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    lines
}
