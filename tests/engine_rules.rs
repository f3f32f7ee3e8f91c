//! Table-driven scenarios for every engine rule (SPEC §2), plus the window property.
//!
//! A scenario is a line of checks in a tiny notation and the verdict expected after each:
//!
//! ```text
//! check  := probe rate (":" modifier)*
//! probe  := "+" (ok) | "x" (failed)
//! rate   := a number | "nan" | "inf" | "str" (the string "0.5") | "none" (missing)
//!         | "down" (snapshot provider unavailable)
//! modifier := "r" requests | "p" p95-ms | "q" p99-ms | "m" host-memory-%
//! verdicts := H (healthy) | D (degraded) | E (escalate) | R (rollback)
//! ```

use std::time::Duration;

use proptest::prelude::*;
use rollbackd::core::check::{
    Baseline, CheckResult, ProbeOutcome, Resources, Sample, Snapshot, SnapshotOutcome,
};
use rollbackd::core::engine::{
    Action, Decision, Engine, EngineConfig, NoDataPolicy, Rule, ValueClass, Verdict,
};

fn check(token: &str) -> CheckResult {
    let (probe, rest) = token.split_at(1);
    let probe = match probe {
        "+" => ProbeOutcome::Ok,
        "x" => ProbeOutcome::failed("connection refused"),
        other => panic!("bad probe {other:?} in {token:?}"),
    };
    let mut parts = rest.split(':');
    let rate = parts.next().unwrap();
    let mut snapshot = Snapshot::default();
    let mut resources = None;
    let mut down = false;
    snapshot.error_rate = match rate {
        "down" => {
            down = true;
            Sample::Missing
        }
        "none" => Sample::Missing,
        "nan" => Sample::Number(f64::NAN),
        "inf" => Sample::Number(f64::INFINITY),
        "str" => Sample::Wrong("\"0.5\"".into()),
        number => Sample::Number(
            number
                .parse()
                .unwrap_or_else(|_| panic!("bad rate in {token:?}")),
        ),
    };
    for modifier in parts {
        let (kind, value) = modifier.split_at(1);
        let value: f64 = value.parse().unwrap();
        match kind {
            "r" => snapshot.requests = Sample::Number(value),
            "p" => snapshot.latency_p95_ms = Sample::Number(value),
            "q" => snapshot.latency_p99_ms = Sample::Number(value),
            "m" => {
                resources = Some(Resources {
                    host_memory_percent: Some(value),
                    ..Resources::default()
                })
            }
            other => panic!("bad modifier {other:?} in {token:?}"),
        }
    }
    CheckResult {
        probe,
        snapshot: if down {
            SnapshotOutcome::Unavailable {
                reason: "connection refused".into(),
            }
        } else {
            SnapshotOutcome::Values(snapshot)
        },
        resources,
    }
}

fn verdict_letter(verdict: Verdict) -> char {
    match verdict {
        Verdict::Healthy => 'H',
        Verdict::Degraded => 'D',
        Verdict::Escalate => 'E',
        Verdict::Rollback => 'R',
    }
}

/// Runs the checks (30 s apart) and returns every decision.
fn run(config: &EngineConfig, baseline: Option<Baseline>, checks: &str) -> Vec<Decision> {
    let mut engine = Engine::new(config.clone(), baseline);
    checks
        .split_whitespace()
        .enumerate()
        .map(|(i, token)| engine.observe(Duration::from_secs(30 * (i as u64 + 1)), &check(token)))
        .collect()
}

fn verdicts(decisions: &[Decision]) -> String {
    decisions
        .iter()
        .map(|d| verdict_letter(d.verdict))
        .collect::<Vec<_>>()
        .iter()
        .collect::<String>()
}

struct Scenario {
    name: &'static str,
    config: fn(&mut EngineConfig),
    baseline: Option<Baseline>,
    checks: &'static str,
    expect: &'static str,
}

fn defaults(_: &mut EngineConfig) {}
fn ignore_no_data(c: &mut EngineConfig) {
    c.no_data_policy = NoDataPolicy::Ignore;
}
fn min_requests_100(c: &mut EngineConfig) {
    c.min_requests = 100;
}

/// Nothing known: the base of the baselines below.
const EMPTY: Baseline = Baseline {
    error_rate: None,
    latency_p95_ms: None,
    latency_p99_ms: None,
    requests: None,
    errors: None,
    source: None,
    samples: None,
    window_seconds: None,
    dispersion: None,
    persistence: None,
    step_seconds: None,
    excluded: None,
    p95_spread: None,
    p99_spread: None,
};

/// A rate-only baseline, as `promote --baseline-error-rate` gives it.
const BASELINE: Option<Baseline> = Some(Baseline {
    error_rate: Some(0.02),
    latency_p95_ms: Some(200.0),
    latency_p99_ms: None,
    requests: None,
    errors: None,
    source: None,
    ..EMPTY
});

fn p95_over_200ms(c: &mut EngineConfig) {
    c.latency_p95_ms_threshold = Some(200.0);
}
fn p99_over_100ms(c: &mut EngineConfig) {
    c.latency_p99_ms_threshold = Some(100.0);
}

/// A baseline with counts: `errors` in `requests`, as the automatic sources give it.
const fn counted(errors: u64, requests: u64) -> Option<Baseline> {
    Some(Baseline {
        error_rate: Some(errors as f64 / requests as f64),
        latency_p95_ms: None,
        latency_p99_ms: None,
        requests: Some(requests),
        errors: Some(errors as f64),
        ..EMPTY
    })
}
/// 0.5% over 60,000 requests; 0.3% over 60,000; nothing in 400.
const COUNTED_05: Option<Baseline> = counted(300, 60_000);
const COUNTED_03: Option<Baseline> = counted(180, 60_000);
const ZERO_IN_400: Option<Baseline> = counted(0, 400);
/// A rate-only 0.5% (an operator's `--baseline-error-rate 0.005`).
const RATE_05: Option<Baseline> = Some(Baseline {
    error_rate: Some(0.005),
    latency_p95_ms: None,
    latency_p99_ms: None,
    requests: None,
    errors: None,
    source: None,
    ..EMPTY
});

/// 1% over 100,000 requests in 20 observations whose rate swings ±30% between checks,
/// the swings lasting (persistence 0.5 at 30 s), p95 180 ms / p99 400 ms: what an
/// automatic baseline of real traffic looks like (SPEC §2b).
const NOISY_1PCT: Option<Baseline> = Some(Baseline {
    error_rate: Some(0.01),
    latency_p95_ms: Some(180.0),
    latency_p99_ms: Some(400.0),
    requests: Some(100_000),
    errors: Some(1000.0),
    samples: Some(20),
    window_seconds: Some(570.0),
    dispersion: Some(0.09),
    persistence: Some(0.5),
    step_seconds: Some(30.0),
    ..EMPTY
});
/// The same counts with no noise known: the exact binomial test judges.
const CALM_1PCT: Option<Baseline> = counted(1000, 100_000);

fn escalate_after_a_90s_warmup(c: &mut EngineConfig) {
    c.no_data_policy = NoDataPolicy::Escalate;
    c.warmup = std::time::Duration::from_secs(90);
}
fn hold(c: &mut EngineConfig) {
    c.no_data_policy = NoDataPolicy::Hold;
}
fn escalate_no_data(c: &mut EngineConfig) {
    c.no_data_policy = NoDataPolicy::Escalate;
}

#[rustfmt::skip]
const SCENARIOS: &[Scenario] = &[
    // Real traffic (SPEC §2b): noise from the data.
    Scenario { name: "a 2.2x swing for three checks at 50,000 requests is the baseline's own noise", config: defaults, baseline: NOISY_1PCT,
        checks: "+0.022:r50000 +0.022:r50000 +0.022:r50000 +0.01:r50000 +0.01:r50000 +0.01:r50000", expect: "HHHHHH" },
    Scenario { name: "the same swing against a baseline whose noise is unknown is three binomial breaches", config: defaults, baseline: CALM_1PCT,
        checks: "+0.022:r50000 +0.022:r50000 +0.022:r50000", expect: "DDR" },
    Scenario { name: "4x at 50,000 requests is beyond the noise: three checks roll back", config: defaults, baseline: NOISY_1PCT,
        checks: "+0.04:r50000 +0.04:r50000 +0.04:r50000", expect: "DDR" },
    // Evidence that accumulates.
    Scenario { name: "a steady 2x regression no single check shows accumulates to a rollback", config: defaults, baseline: NOISY_1PCT,
        checks: "+0.02:r20000 +0.02:r20000 +0.02:r20000 +0.02:r20000 +0.02:r20000 +0.02:r20000 +0.02:r20000 +0.02:r20000 +0.02:r20000 +0.02:r20000", expect: "HHHHHRRRRR" },
    Scenario { name: "a release 1.2x the baseline for 20 checks is within the practical margin", config: defaults, baseline: NOISY_1PCT,
        checks: "+0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000 +0.012:r20000", expect: "HHHHHHHHHHHHHHHHHHHH" },
    Scenario { name: "every 4th check at 10x rolls back once enough spikes are left after the two worst", config: defaults, baseline: NOISY_1PCT,
        checks: "+0.01:r5000 +0.01:r5000 +0.01:r5000 +0.1:r5000 +0.01:r5000 +0.01:r5000 +0.01:r5000 +0.1:r5000 +0.01:r5000 +0.01:r5000 +0.01:r5000 +0.1:r5000 +0.01:r5000 +0.01:r5000 +0.01:r5000 +0.1:r5000", expect: "HHHDDDDDDDDRRDDR" },
    Scenario { name: "two spikes alone are never a bad release", config: defaults, baseline: NOISY_1PCT,
        checks: "+0.3:r5000 +0.01:r5000 +0.01:r5000 +0.3:r5000 +0.01:r5000 +0.01:r5000 +0.01:r5000 +0.01:r5000 +0.01:r5000 +0.01:r5000 +0.01:r5000 +0.01:r5000", expect: "DDDDDDDDHHHH" },
    Scenario { name: "a late onset is not diluted by a good start", config: defaults, baseline: NOISY_1PCT,
        checks: "+0.01:r2000 +0.01:r2000 +0.01:r2000 +0.01:r2000 +0.01:r2000 +0.01:r2000 +0.01:r2000 +0.01:r2000 +0.01:r2000 +0.01:r2000 +0.035:r2000 +0.035:r2000 +0.035:r2000 +0.035:r2000 +0.035:r2000 +0.035:r2000", expect: "HHHHHHHHHHDDRRRR" },
    Scenario { name: "probe failing every 2nd check rolls back at the 4th failure of 10", config: defaults, baseline: None,
        checks: "x0.01 +0.01 x0.01 +0.01 x0.01 +0.01 x0.01", expect: "DDDDDDR" },
    Scenario { name: "probe failing every 3rd check rolls back at the 4th failure of 10", config: defaults, baseline: None,
        checks: "x0.01 +0.01 +0.01 x0.01 +0.01 +0.01 x0.01 +0.01 +0.01 x0.01", expect: "DDDDDDDDDR" },
    // Quantiles need samples; both are compared.
    Scenario { name: "p95 over 20 requests is not judged: not enough samples", config: defaults, baseline: NOISY_1PCT,
        checks: "+0.01:r20:p900 +0.01:r20:p900 +0.01:r20:p900 +0.01:r20:p900", expect: "HHHH" },
    Scenario { name: "p95 3x over 2,000 requests rolls back", config: defaults, baseline: NOISY_1PCT,
        checks: "+0.01:r2000:p540 +0.01:r2000:p540 +0.01:r2000:p540", expect: "DDR" },
    Scenario { name: "p99 2.5x with p95 unchanged rolls back", config: defaults, baseline: NOISY_1PCT,
        checks: "+0.01:r2000:p180:q1000 +0.01:r2000:p180:q1000 +0.01:r2000:p180:q1000", expect: "DDR" },
    Scenario { name: "p99 over 200 requests a check is judged once the window holds 500 requests", config: defaults, baseline: NOISY_1PCT,
        checks: "+0.01:r200:p180:q1000 +0.01:r200:p180:q1000 +0.01:r200:p180:q1000 +0.01:r200:p180:q1000 +0.01:r200:p180:q1000", expect: "HHDDR" },
    // Trends.
    Scenario { name: "host memory climbing 58% to 80% in ten minutes is a leak", config: defaults, baseline: None,
        checks: "+0.01:m58 +0.01:m59 +0.01:m60 +0.01:m61 +0.01:m62 +0.01:m63 +0.01:m64 +0.01:m65 +0.01:m66 +0.01:m67 +0.01:m68 +0.01:m69 +0.01:m70 +0.01:m71 +0.01:m72", expect: "HHHHHHHHHHHRRRR" },
    Scenario { name: "a GC sawtooth of 16 points is not a leak", config: defaults, baseline: None,
        checks: "+0.01:m52 +0.01:m60 +0.01:m68 +0.01:m52 +0.01:m60 +0.01:m68 +0.01:m52 +0.01:m60 +0.01:m68 +0.01:m52 +0.01:m60 +0.01:m68 +0.01:m52 +0.01:m60 +0.01:m68", expect: "HHHHHHHHHHHHHHH" },
    // Warm-up (issue 25): a new version has no series yet; no-data then is expected.
    Scenario { name: "no data inside a 90 s warm-up is expected and not counted", config: escalate_after_a_90s_warmup, baseline: None,
        checks: "+down +down +down +down +down +down", expect: "HHDDDE" },
    Scenario { name: "data inside the warm-up is judged", config: escalate_after_a_90s_warmup, baseline: None,
        checks: "+0.5 +0.5 +0.5", expect: "DDR" },
    Scenario { name: "a failing probe inside the warm-up is judged", config: escalate_after_a_90s_warmup, baseline: None,
        checks: "xdown xdown", expect: "DE" },
    // No data holds by default (SPEC §2): an outage of the monitoring is not a bad release.
    Scenario { name: "provider outage of 4 checks holds under the default policy", config: hold, baseline: None,
        checks: "+0.01 +down +down +down +down +down", expect: "HDDDDD" },

    // The baseline rule on counts (SPEC §2a, core::stats).
    Scenario { name: "1 error in 40 requests against a 0.5% rate is not a breach", config: defaults, baseline: RATE_05,
        checks: "+0.025:r40 +0.025:r40 +0.025:r40 +0.025:r40 +0.025:r40", expect: "HHHHH" },
    Scenario { name: "1 error in 40 requests against 300 in 60,000 is not a breach", config: defaults, baseline: COUNTED_05,
        checks: "+0.025:r40 +0.025:r40 +0.025:r40 +0.025:r40 +0.025:r40", expect: "HHHHH" },
    Scenario { name: "60 errors in 5,000 against 0.3% breach; three such checks roll back", config: defaults, baseline: COUNTED_03,
        checks: "+0.012:r5000 +0.012:r5000 +0.012:r5000", expect: "DDR" },
    Scenario { name: "the same against a rate-only 0.3% baseline", config: defaults, baseline: Some(Baseline { error_rate: Some(0.003), ..RATE_05.unwrap() }),
        checks: "+0.012:r5000 +0.012:r5000 +0.012:r5000", expect: "DDR" },
    Scenario { name: "one bad interval is not a bad release", config: defaults, baseline: COUNTED_03,
        checks: "+0.003:r5000 +0.04:r5000 +0.003:r5000 +0.003:r5000 +0.003:r5000 +0.003:r5000 +0.003:r5000", expect: "HDDDDDH" },
    Scenario { name: "two bad intervals are not either; three are", config: defaults, baseline: COUNTED_03,
        checks: "+0.04:r5000 +0.003:r5000 +0.04:r5000 +0.003:r5000 +0.04:r5000", expect: "DDDDR" },
    Scenario { name: "a canary at 1.5x the baseline is within the margin", config: defaults, baseline: COUNTED_05,
        checks: "+0.0075:r5000 +0.0075:r5000 +0.0075:r5000 +0.0075:r5000 +0.0075:r5000", expect: "HHHHH" },
    Scenario { name: "0 errors in 400 is not a 0% rate: 1 error in 40 is fine", config: defaults, baseline: ZERO_IN_400,
        checks: "+0.025:r40 +0.025:r40 +0.025:r40 +0.025:r40", expect: "HHHH" },
    Scenario { name: "0 errors in 400, then 6 in 40 three times rolls back", config: defaults, baseline: ZERO_IN_400,
        checks: "+0.15:r40 +0.15:r40 +0.15:r40", expect: "DDR" },
    Scenario { name: "without a request count the seed's ratio rule judges", config: defaults, baseline: COUNTED_05,
        checks: "+0.011 +0.011 +0.011", expect: "DDR" },
    // Absolute latency rules (off by default).
    Scenario { name: "p99 over 100 ms in 3 checks rolls back", config: p99_over_100ms, baseline: None,
        checks: "+0.01:q150 +0.01:q150 +0.01:q150", expect: "DDR" },
    Scenario { name: "p99 at exactly 100 ms is fine", config: p99_over_100ms, baseline: None,
        checks: "+0.01:q100 +0.01:q100 +0.01:q100", expect: "HHH" },
    Scenario { name: "p95 over 200 ms in 3 checks rolls back", config: p95_over_200ms, baseline: None,
        checks: "+0.01:p250 +0.01:p250 +0.01:p250", expect: "DDR" },
    Scenario { name: "latency rules are off by default", config: defaults, baseline: None,
        checks: "+0.01:p5000:q9000 +0.01:p5000:q9000 +0.01:p5000:q9000", expect: "HHH" },
    Scenario { name: "healthy at 1%", config: defaults, baseline: None,
        checks: "+0.01 +0.01 +0.01 +0.01 +0.01 +0.01", expect: "HHHHHH" },
    Scenario { name: "degraded at 10%", config: defaults, baseline: None,
        checks: "+0.01 +0.10 +0.10 +0.01", expect: "HDDH" },
    Scenario { name: "degraded threshold is strict (exactly 5% is healthy)", config: defaults, baseline: None,
        checks: "+0.05", expect: "H" },
    Scenario { name: "rollback on the 3rd breaching check, not the 2nd", config: defaults, baseline: None,
        checks: "+0.01 +0.30 +0.30 +0.30", expect: "HDDR" },
    Scenario { name: "three breaches spread inside the window roll back", config: defaults, baseline: None,
        checks: "+0.30 +0.01 +0.30 +0.01 +0.30", expect: "DDDDR" },
    Scenario { name: "exactly the threshold is not a breach", config: defaults, baseline: None,
        checks: "+0.20 +0.20 +0.20 +0.20", expect: "DDDD" },
    Scenario { name: "breaches that aged out of the window stop counting", config: defaults, baseline: None,
        checks: "+0.30 +0.30 +0.01 +0.01 +0.01 +0.30", expect: "DDDDDD" },
    Scenario { name: "the same three breaches inside one window do roll back", config: defaults, baseline: None,
        checks: "+0.30 +0.30 +0.01 +0.01 +0.30", expect: "DDDDR" },
    Scenario { name: "window clears to healthy once problems age out", config: defaults, baseline: None,
        checks: "+0.30 +0.01 +0.01 +0.01 +0.01 +0.01", expect: "DDDDDH" },
    Scenario { name: "escalate after 2 consecutive probe failures", config: defaults, baseline: None,
        checks: "+0.01 x0.01 x0.01", expect: "HDE" },
    Scenario { name: "failure-ok-failure does not escalate", config: defaults, baseline: None,
        checks: "x0.01 +0.01 x0.01 +0.01 x0.01", expect: "DDDDD" },
    Scenario { name: "NaN error rates never breach (ignore policy)", config: ignore_no_data, baseline: None,
        checks: "+nan +nan +nan +nan +nan", expect: "DDDDD" },
    Scenario { name: "infinite error rates never breach", config: ignore_no_data, baseline: None,
        checks: "+inf +inf +inf +inf", expect: "DDDD" },
    Scenario { name: "negative error rates never breach", config: ignore_no_data, baseline: None,
        checks: "+-0.5 +-0.5 +-0.5 +-0.5", expect: "DDDD" },
    Scenario { name: "error rates above 1 never breach", config: ignore_no_data, baseline: None,
        checks: "+7 +7 +7 +7 +1e308", expect: "DDDDD" },
    Scenario { name: "string error rates never breach", config: ignore_no_data, baseline: None,
        checks: "+str +str +str +str", expect: "DDDD" },
    Scenario { name: "missing error rates never breach", config: ignore_no_data, baseline: None,
        checks: "+none +none +none +none", expect: "DDDD" },
    Scenario { name: "invalid values count as no-data and escalate under escalate", config: escalate_no_data, baseline: None,
        checks: "+nan +-1 +str +7", expect: "DDDE" },
    Scenario { name: "provider outage of 4 checks escalates under escalate", config: escalate_no_data, baseline: None,
        checks: "+0.01 +down +down +down +down", expect: "HDDDE" },
    Scenario { name: "provider outage of 4 checks does nothing under ignore", config: ignore_no_data, baseline: None,
        checks: "+0.01 +down +down +down +down +down", expect: "HDDDDD" },
    Scenario { name: "an outage interrupted by data restarts the no-data count", config: escalate_no_data, baseline: None,
        checks: "+down +down +down +0.01 +down +down +down", expect: "DDDDDDD" },
    Scenario { name: "traffic below min_requests is no-data, not a breach", config: min_requests_100, baseline: None,
        checks: "+0.5:r10 +0.5:r10 +0.5:r10", expect: "DDD" },
    Scenario { name: "traffic at min_requests counts", config: min_requests_100, baseline: None,
        checks: "+0.5:r100 +0.5:r100 +0.5:r100", expect: "DDR" },
    Scenario { name: "unknown traffic with min_requests is no-data", config: min_requests_100, baseline: None,
        checks: "+0.5 +0.5 +0.5", expect: "DDD" },
    Scenario { name: "rollback wins over escalate on the same check", config: defaults, baseline: None,
        checks: "x0.30 x0.30 x0.30", expect: "DER" },
    Scenario { name: "baseline x2 error rule rolls back below the absolute threshold", config: defaults, baseline: BASELINE,
        checks: "+0.05 +0.05 +0.05", expect: "DDR" },
    Scenario { name: "baseline x2 is strict: exactly twice the baseline is fine", config: defaults, baseline: BASELINE,
        checks: "+0.04 +0.04 +0.04", expect: "HHH" },
    Scenario { name: "baseline x1.5 p95 rule rolls back", config: defaults, baseline: BASELINE,
        checks: "+0.01:p301 +0.01:p301 +0.01:p301", expect: "DDR" },
    Scenario { name: "p95 at exactly 1.5x baseline is fine", config: defaults, baseline: BASELINE,
        checks: "+0.01:p300 +0.01:p300 +0.01:p300", expect: "HHH" },
    Scenario { name: "baseline rules are off without a baseline", config: defaults, baseline: None,
        checks: "+0.05:p900 +0.05:p900 +0.05:p900", expect: "HHH" },
    Scenario { name: "host memory over 90% in 3 checks rolls back", config: defaults, baseline: None,
        checks: "+0.01:m95 +0.01:m95 +0.01:m95", expect: "DDR" },
    Scenario { name: "host memory at 90% is fine", config: defaults, baseline: None,
        checks: "+0.01:m90 +0.01:m90 +0.01:m90", expect: "HHH" },
];

#[test]
fn every_scenario_gives_the_expected_verdicts() {
    let mut failures = Vec::new();
    for scenario in SCENARIOS {
        let mut config = rollbackd::config::default_rules();
        (scenario.config)(&mut config);
        let got = verdicts(&run(&config, scenario.baseline, scenario.checks));
        if got != scenario.expect {
            failures.push(format!(
                "{}: checks {:?} expected {} got {}",
                scenario.name, scenario.checks, scenario.expect, got
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn invalid_values_are_classified_not_breached() {
    let config = EngineConfig {
        no_data_policy: NoDataPolicy::Ignore,
        ..rollbackd::config::default_rules()
    };
    for (token, class) in [
        ("+nan", ValueClass::Invalid),
        ("+-0.1", ValueClass::Invalid),
        ("+1.5", ValueClass::Invalid),
        ("+str", ValueClass::Invalid),
        ("+none", ValueClass::NoData),
        ("+down", ValueClass::ProviderError),
        ("+0.3", ValueClass::Breach),
        ("+0.01", ValueClass::Ok),
    ] {
        let decision = &run(&config, None, token)[0];
        assert_eq!(decision.error_class, class, "{token}");
    }
}

#[test]
fn rollback_evidence_lists_every_rule_that_fired() {
    let decisions = run(
        &rollbackd::config::default_rules(),
        BASELINE,
        "x0.30:m95 x0.30:m95 x0.30:m95",
    );
    let last = decisions.last().unwrap();
    assert_eq!(last.verdict, Verdict::Rollback);
    assert_eq!(last.action, Some(Action::Rollback));
    let rules: Vec<Rule> = last.fired.iter().map(|f| f.rule).collect();
    assert_eq!(
        rules,
        vec![
            Rule::ErrorRate,
            Rule::Baseline,
            Rule::Memory,
            Rule::ProbeFailures,
            Rule::DegradedErrorRate,
            Rule::RecentProblems
        ]
    );
    let error_rate = last.fired(Rule::ErrorRate).unwrap();
    assert_eq!((error_rate.count, error_rate.of), (3, 3));
    // Three failures in a window of five that is not yet full: a streak, not "sustained".
    assert_eq!(last.failure_pattern.as_str(), "consecutive_failures");
    assert!(
        last.reason()
            .starts_with("High error rate (30.0%) with 3 failures"),
        "{}",
        last.reason()
    );
}

#[test]
fn failure_patterns() {
    let config = rollbackd::config::default_rules();
    let pattern = |checks: &str| {
        run(&config, None, checks)
            .last()
            .unwrap()
            .failure_pattern
            .as_str()
    };
    assert_eq!(pattern("+0.01 +0.01"), "none");
    assert_eq!(pattern("+0.30 +0.01 +0.30"), "intermittent");
    assert_eq!(pattern("+0.01 +0.30 x0.01"), "consecutive_failures");
    assert_eq!(pattern("+0.30 +0.30 +0.30 +0.30 +0.30"), "sustained");
    // Provider errors are not failures of the canary: no pattern from them alone.
    assert_eq!(pattern("+down +down"), "none");
}

#[test]
fn escalation_evidence_names_the_probe_reason() {
    let last = run(&rollbackd::config::default_rules(), None, "x0.01 x0.01")
        .pop()
        .unwrap();
    assert_eq!(last.action, Some(Action::Escalate));
    assert_eq!(
        last.reason(),
        "Worker probe failed 2 consecutive times: connection refused"
    );
}

#[test]
fn global_dry_run_records_but_never_acts() {
    let config = EngineConfig {
        dry_run: true,
        ..rollbackd::config::default_rules()
    };
    let decisions = run(&config, None, "+0.30 +0.30 +0.30 x0.30 x0.30");
    assert!(decisions.iter().all(|d| d.action.is_none()));
    assert_eq!(decisions[2].verdict, Verdict::Rollback);
    assert_eq!(decisions[2].would_act(), Some(Action::Rollback));
    assert!(decisions[2].fired.iter().all(|f| f.dry_run));
}

#[test]
fn per_rule_dry_run_lets_other_rules_act() {
    let config = EngineConfig {
        dry_run_rules: vec![Rule::Memory],
        ..rollbackd::config::default_rules()
    };
    // Memory alone: recorded, no action.
    let memory = run(&config, None, "+0.01:m95 +0.01:m95 +0.01:m95")
        .pop()
        .unwrap();
    assert_eq!(memory.verdict, Verdict::Rollback);
    assert_eq!(memory.action, None);
    assert_eq!(memory.would_act(), Some(Action::Rollback));
    // Memory (dry run) with probe failures (enforced): the escalation still happens.
    let both = run(&config, None, "x0.01:m95 x0.01:m95 x0.01:m95")
        .pop()
        .unwrap();
    assert_eq!(both.verdict, Verdict::Rollback);
    assert_eq!(both.action, Some(Action::Escalate));
}

#[test]
fn profile_thresholds_drive_the_engine() {
    use std::collections::BTreeMap;
    for (profile, threshold, failures, grace) in [
        ("default", 0.20, 2, 600),
        ("production", 0.15, 1, 900),
        ("staging", 0.25, 2, 300),
        ("development", 0.50, 3, 120),
    ] {
        let loaded =
            rollbackd::config::load_str(&format!("profile = \"{profile}\""), &BTreeMap::new())
                .unwrap();
        let c = &loaded.config;
        assert_eq!(c.rules.error_rate_threshold, threshold, "{profile}");
        assert_eq!(c.rules.consecutive_failures, failures, "{profile}");
        assert_eq!(
            c.monitor.grace_period,
            Duration::from_secs(grace),
            "{profile}"
        );
        // Just above the threshold rolls back on the third check; just below never does.
        let above = format!("+{0} +{0} +{0}", threshold + 0.01);
        let below = format!("+{0} +{0} +{0} +{0} +{0}", threshold - 0.01);
        assert_eq!(
            verdicts(&run(&c.rules, None, &above)).chars().last(),
            Some('R'),
            "{profile}"
        );
        assert!(
            !verdicts(&run(&c.rules, None, &below)).contains('R'),
            "{profile}"
        );
        // Exactly `failures` probe failures escalate; one fewer does not.
        let probes = vec!["x0.01"; failures].join(" ");
        assert_eq!(
            verdicts(&run(&c.rules, None, &probes)).chars().last(),
            Some('E'),
            "{profile}"
        );
        if failures > 1 {
            let fewer = vec!["x0.01"; failures - 1].join(" ");
            assert!(
                !verdicts(&run(&c.rules, None, &fewer)).contains('E'),
                "{profile}"
            );
        }
    }
}

fn arbitrary_check() -> impl Strategy<Value = String> {
    let probe = prop_oneof![4 => Just("+"), 1 => Just("x")];
    let rate = prop_oneof![
        6 => (0u32..=100).prop_map(|r| format!("{}", r as f64 / 100.0)),
        1 => Just("nan".to_owned()),
        1 => Just("down".to_owned()),
        1 => Just("none".to_owned()),
        1 => Just("str".to_owned()),
    ];
    let memory =
        prop_oneof![3 => Just(String::new()), 1 => (80u32..100).prop_map(|m| format!(":m{m}"))];
    (probe, rate, memory).prop_map(|(p, r, m)| format!("{p}{r}{m}"))
}

proptest! {
    /// The windowed rules never depend on checks older than the window: any history
    /// followed by the same `window` checks gives the same decision as those checks alone
    /// (with the accumulating rules — session/recent errors, memory trend, flapping
    /// probe — turned off: looking past the window is what they are for).
    #[test]
    fn windowed_verdict_never_depends_on_checks_older_than_the_window(
        window in 1usize..8,
        history in proptest::collection::vec(arbitrary_check(), 0..20),
        recent in proptest::collection::vec(arbitrary_check(), 8),
    ) {
        let config = EngineConfig {
            window,
            rollback_min_breaches: 3.min(window),
            consecutive_failures: 2.min(window),
            max_consecutive_no_data: 4.min(window),
            evidence_alpha: 0.0,
            memory_leak_per_hour: 0.0,
            probe_flap_failures: 0,
            ..rollbackd::config::default_rules()
        };
        let recent = &recent[..window];
        let with_history = format!("{} {}", history.join(" "), recent.join(" "));
        let alone = recent.join(" ");
        let a = run(&config, BASELINE, &with_history).pop().unwrap();
        let b = run(&config, BASELINE, &alone).pop().unwrap();
        prop_assert_eq!(a.verdict, b.verdict);
        prop_assert_eq!(a.action, b.action);
        prop_assert_eq!(a.fired, b.fired);
        prop_assert_eq!(a.failure_pattern, b.failure_pattern);
        prop_assert_eq!(a.failure_count, b.failure_count);
    }

    /// Same checks, same decisions: the engine is deterministic.
    #[test]
    fn engine_is_deterministic(checks in proptest::collection::vec(arbitrary_check(), 1..30)) {
        let config = rollbackd::config::default_rules();
        let line = checks.join(" ");
        prop_assert_eq!(run(&config, BASELINE, &line), run(&config, BASELINE, &line));
    }
}

/// The artifact's evidence says which statistic fired: the baseline firing carries the
/// smallest p-value of its breaching checks, each check its p-value and the errors the
/// baseline predicted, and the reason names the test.
#[test]
fn the_baseline_rule_records_the_statistic_that_fired() {
    let config = rollbackd::config::default_rules();
    let decisions = run(
        &config,
        COUNTED_03,
        "+0.012:r5000 +0.012:r5000 +0.012:r5000",
    );
    let last = decisions.last().unwrap();
    assert_eq!(last.action, Some(Action::Rollback));
    let firing = last.fired(Rule::Baseline).expect("the baseline rule fired");
    let p = firing.p_value.expect("a p-value");
    assert!(p > 0.0 && p < 1e-4, "{p}");
    assert!(last.reason().contains("binomial test"), "{}", last.reason());
    let mut engine = Engine::new(config, COUNTED_03);
    engine.observe(Duration::from_secs(30), &check("+0.012:r5000"));
    let entry = engine.window().next().unwrap();
    assert_eq!(entry.baseline_expected_errors, Some(15.0));
    assert!(entry.baseline_p_value.unwrap() < 1e-4);
    let evidence = serde_json::to_value(entry).unwrap();
    assert!(evidence["baselinePValue"].as_f64().is_some(), "{evidence}");
}

/// Hostile snapshots against a baseline with noise: absurd request counts (1e30, 1e300,
/// f64::MAX) and a zero-error baseline must neither panic nor hang nor fire the
/// statistics on nothing; the engine answers every check.
#[test]
fn absurd_counts_against_a_noisy_baseline_neither_panic_nor_act_on_nothing() {
    let config = rollbackd::config::default_rules();
    for requests in ["1e30", "1e300", "1.7976931348623157e308", "0", "3"] {
        let line = std::iter::repeat_n(format!("+0.001:r{requests}"), 30)
            .collect::<Vec<_>>()
            .join(" ");
        for baseline in [NOISY_1PCT, counted(0, 400), CALM_1PCT] {
            let decisions = run(&config, baseline, &line);
            assert_eq!(decisions.len(), 30);
            assert!(
                decisions.iter().all(|d| d.action.is_none()),
                "{requests} requests at 0.1% against {baseline:?}: {:?}",
                decisions.iter().find(|d| d.action.is_some())
            );
        }
    }
}
