//! How often rollbackd acts on bad releases and leaves good ones alone, on a generated
//! corpus of realistic releases, for each way of getting a baseline.
//!
//! Run: `cargo bench --bench baseline_corpus` (release build; `-- --releases N` for a
//! bigger corpus, default 2,000; `ROLLBACKD_*` variables change the configuration). Deterministic: the same seed gives the same figures.
//! The figures are recorded in docs/DECISIONS.md; nothing here is asserted (the tests that
//! pin the method's behaviour are in tests/engine_rules.rs and tests/supervisor.rs).
//!
//! Every release is replayed through `rollbackd simulate` (the Supervisor, as the daemon
//! runs it) as a trace with the default configuration:
//! - **none**: no baseline (the seed: only the absolute 20% rule and the others);
//! - **typed rate**: an operator's `--baseline-error-rate` set to the previous version's
//!   true rate, judged by ratio (the seed's rule: checks carry no request counts);
//! - **automatic**: 10 minutes of pre-promotion observations of the previous version
//!   (negative `at` lines), judged on counts (this release's rule).
//!
//! The corpus (half good, half bad; 30 s checks for the 10 min grace period):
//! - traffic per check log-uniform in 40–5,000 requests, base error rate log-uniform in
//!   0.1%–4%, base p95 80–300 ms; errors are binomial, p95 has ±5% noise;
//! - good: steady at 0.8–1.2× the base rate (the "+20% noise"), one blip check (10× or
//!   5%), a 2-check snapshot outage, or +10% latency;
//! - bad: errors 3–10× from the start, a ramp to 5× over 10 checks, p95 1.6–3×, or a
//!   crash loop (probe failing, half the requests erroring).

use std::io::Write;
use std::time::Instant;

/// splitmix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    fn log_range(&mut self, lo: f64, hi: f64) -> f64 {
        (lo.ln() + (hi.ln() - lo.ln()) * self.unit()).exp()
    }
    fn pick(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Binomial(n, p) by summing Bernoulli draws (n ≤ a few thousand here).
    fn binomial(&mut self, n: u64, p: f64) -> u64 {
        (0..n).filter(|_| self.unit() < p).count() as u64
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Steady,
    Blip,
    Outage,
    SlowerALittle,
    ErrorStep,
    Ramp,
    Latency,
    CrashLoop,
}

impl Kind {
    fn bad(self) -> bool {
        matches!(
            self,
            Kind::ErrorStep | Kind::Ramp | Kind::Latency | Kind::CrashLoop
        )
    }
}

struct Release {
    kind: Kind,
    requests: u64,
    base_rate: f64,
    /// Pre-promotion observations and the checks after it, as trace lines without `at`.
    before: Vec<String>,
    after: Vec<(String, bool)>,
}

fn line(probe: &str, snapshot: Option<(f64, u64, f64)>, with_requests: bool) -> String {
    match snapshot {
        None => format!(r#""probe": "{probe}", "snapshot": null"#),
        Some((rate, requests, p95)) if with_requests => format!(
            r#""probe": "{probe}", "snapshot": {{"failureRate": {rate}, "requests": {requests}, "latencyP95Ms": {p95:.1}}}"#
        ),
        Some((rate, _, p95)) => format!(
            r#""probe": "{probe}", "snapshot": {{"failureRate": {rate}, "latencyP95Ms": {p95:.1}}}"#
        ),
    }
}

fn release(rng: &mut Rng, bad: bool) -> Release {
    let requests = rng.log_range(40.0, 5000.0).round() as u64;
    let base_rate = rng.log_range(0.001, 0.04);
    let base_p95 = rng.range(80.0, 300.0);
    let kind = if bad {
        [Kind::ErrorStep, Kind::Ramp, Kind::Latency, Kind::CrashLoop][rng.pick(4) as usize]
    } else {
        [Kind::Steady, Kind::Blip, Kind::Outage, Kind::SlowerALittle][rng.pick(4) as usize]
    };
    let sample = |rng: &mut Rng, rate: f64, p95: f64| {
        let errors = rng.binomial(requests, rate.min(1.0));
        let p95 = p95 * rng.range(0.95, 1.05);
        (errors as f64 / requests as f64, requests, p95)
    };
    let mut before = Vec::new();
    for _ in 0..20 {
        let (rate, n, p95) = sample(rng, base_rate, base_p95);
        before.push(line("ok", Some((rate, n, p95)), true));
    }
    let factor = rng.range(3.0, 10.0);
    let slow = rng.range(1.6, 3.0);
    let noise = rng.range(0.8, 1.2);
    let blip_at = rng.pick(18) + 1;
    let outage_at = rng.pick(17) + 1;
    let mut after = Vec::new();
    for i in 0..20u64 {
        let (probe, rate, p95) = match kind {
            Kind::Steady => ("ok", base_rate * noise, base_p95),
            Kind::Blip if i == blip_at => ("ok", (base_rate * 10.0).max(0.05), base_p95),
            Kind::Blip => ("ok", base_rate, base_p95),
            Kind::Outage if i == outage_at || i == outage_at + 1 => {
                after.push((line("ok", None, true), false));
                continue;
            }
            Kind::Outage => ("ok", base_rate, base_p95),
            Kind::SlowerALittle => ("ok", base_rate, base_p95 * 1.1),
            Kind::ErrorStep => ("ok", base_rate * factor, base_p95),
            Kind::Ramp => (
                "ok",
                base_rate * (1.0 + 4.0 * (i as f64 / 10.0).min(1.0)),
                base_p95,
            ),
            Kind::Latency => ("ok", base_rate, base_p95 * slow),
            Kind::CrashLoop => ("connection refused", 0.5, base_p95),
        };
        let snapshot = sample(rng, rate, p95);
        after.push((line(probe, Some(snapshot), true), true));
    }
    Release {
        kind,
        requests,
        base_rate,
        before,
        after,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Strategy {
    None,
    TypedRate,
    Automatic,
}

impl Strategy {
    fn name(self) -> &'static str {
        match self {
            Strategy::None => "none (seed)",
            Strategy::TypedRate => "typed rate, ratio rule (seed)",
            Strategy::Automatic => "automatic, counts (this release)",
        }
    }
}

fn trace(release: &Release, strategy: Strategy) -> String {
    let mut text = String::new();
    match strategy {
        Strategy::None => {}
        Strategy::TypedRate => text.push_str(&format!(
            "{{\"baseline\": {{\"failureRate\": {}}}}}\n",
            release.base_rate
        )),
        Strategy::Automatic => {
            for (i, body) in release.before.iter().enumerate() {
                let at = -(600 - 30 * i as i64);
                text.push_str(&format!("{{\"at\": {at}, {body}}}\n"));
            }
        }
    }
    for (i, (body, _)) in release.after.iter().enumerate() {
        let body = if strategy == Strategy::TypedRate {
            // The seed's checks: rates without counts (the ratio rule judges them).
            body.replace(&format!(r#", "requests": {}"#, release.requests), "")
        } else {
            body.clone()
        };
        text.push_str(&format!("{{\"at\": {}, {body}}}\n", 30 * (i + 1)));
    }
    text
}

#[derive(Default, Clone, Copy)]
struct Tally {
    bad: u32,
    caught: u32,
    good: u32,
    false_actions: u32,
    detect_seconds: u64,
}

fn main() {
    let releases: usize = std::env::args()
        .skip_while(|a| a != "--releases")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000);
    // ROLLBACKD_* variables override the defaults, as for the daemon (to try parameters:
    // `ROLLBACKD_RULES_BASELINE_ALPHA=0.05 cargo bench --bench baseline_corpus`).
    let env: std::collections::BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("ROLLBACKD_"))
        .collect();
    let loaded = rollbackd::config::load_str("", &env).expect("configuration");
    let config = loaded.config;
    let mut rng = Rng(0x5EED_2026);
    let corpus: Vec<Release> = (0..releases)
        .map(|i| release(&mut rng, i % 2 == 1))
        .collect();
    let strategies = [Strategy::None, Strategy::TypedRate, Strategy::Automatic];
    // [strategy][traffic band: 0 = < 200 requests per check, 1 = ≥ 200]
    let mut tallies = [[Tally::default(); 2]; 3];
    let mut by_kind: Vec<(Kind, [u32; 3], u32)> = Vec::new();
    let started = Instant::now();
    for release in &corpus {
        let band = usize::from(release.requests >= 200);
        let entry = match by_kind.iter().position(|(k, _, _)| *k == release.kind) {
            Some(i) => i,
            None => {
                by_kind.push((release.kind, [0; 3], 0));
                by_kind.len() - 1
            }
        };
        by_kind[entry].2 += 1;
        for (s, strategy) in strategies.iter().enumerate() {
            let text = trace(release, *strategy);
            let summary = rollbackd::cli::simulate::replay(
                &config,
                text.as_bytes(),
                "corpus",
                true,
                &mut std::io::sink(),
            )
            .expect("a generated trace is well-formed");
            let acted = summary.first_action.is_some();
            let tally = &mut tallies[s][band];
            if release.kind.bad() {
                tally.bad += 1;
                if acted {
                    tally.caught += 1;
                    tally.detect_seconds += summary.first_action.as_ref().unwrap().0.as_secs();
                }
            } else {
                tally.good += 1;
                if acted {
                    tally.false_actions += 1;
                }
            }
            if acted {
                by_kind[entry].1[s] += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    let pct = |a: u32, b: u32| {
        if b == 0 {
            "-".to_owned()
        } else {
            format!("{:.1}%", 100.0 * a as f64 / b as f64)
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{releases} releases ({} bad), 20 checks each, default configuration; replayed in {:.1}s\n",
        releases / 2,
        elapsed.as_secs_f64()
    )
    .unwrap();
    writeln!(out, "| baseline | bad releases acted on | good releases acted on (false) | of which < 200 req/check: caught / false | mean time to act on a bad one |").unwrap();
    writeln!(out, "| --- | --- | --- | --- | --- |").unwrap();
    for (s, strategy) in strategies.iter().enumerate() {
        let [low, high] = tallies[s];
        let caught = low.caught + high.caught;
        let bad = low.bad + high.bad;
        let false_actions = low.false_actions + high.false_actions;
        let good = low.good + high.good;
        let mean = if caught > 0 {
            format!(
                "{:.0} s",
                (low.detect_seconds + high.detect_seconds) as f64 / caught as f64
            )
        } else {
            "-".into()
        };
        writeln!(
            out,
            "| {} | {} | {} | {} / {} | {} |",
            strategy.name(),
            pct(caught, bad),
            pct(false_actions, good),
            pct(low.caught, low.bad),
            pct(low.false_actions, low.good),
            mean
        )
        .unwrap();
    }
    writeln!(
        out,
        "\nacted on, by kind of release (none / typed rate / automatic):"
    )
    .unwrap();
    for (kind, acted, count) in &by_kind {
        writeln!(
            out,
            "  {:<14} {:>5} releases: {} / {} / {}",
            format!("{kind:?}{}", if kind.bad() { " (bad)" } else { "" }),
            count,
            pct(acted[0], *count),
            pct(acted[1], *count),
            pct(acted[2], *count)
        )
        .unwrap();
    }
}
