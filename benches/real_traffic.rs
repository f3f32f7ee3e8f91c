//! How often rollbackd acts on bad releases and on good ones, on realistic noise and on
//! real metric series, per kind of release, beside two reference judges run on the same
//! checks.
//!
//! Run: `cargo bench --bench real_traffic` (release build). Arguments after `--`:
//! `--releases N` (per corpus; default 4,000), `--seed S` (decimal or 0x…; default
//! 0x5EED2026), `--dump DIR` (writes every release's trace as
//! `DIR/<corpus>-<index>-<category>.jsonl`, for `rollbackd simulate --trace FILE`).
//! `ROLLBACKD_*` variables change rollbackd's configuration, as for the daemon.
//! Deterministic: the same seed and arguments give the same figures (a release's draws
//! depend only on the seed, its corpus and its index). Nothing here is asserted.
//!
//! # What a release is
//! A `simulate` trace: 20 observations of the previous version before the promotion
//! (`at` = -600, -570, … -30: the automatic baseline), then 20 checks of the new version
//! (`at` = 30 … 600, the 10-minute grace period). Every line carries `failureRate`
//! (errors / requests, exact), `requests`, `latencyP95Ms`, `latencyP99Ms` (0.1 ms) and
//! `resources.hostMemoryPercent` (0.1 point); `"snapshot": null` is a monitoring outage,
//! `"probe"` is `"ok"` or a failure reason. rollbackd "acted" when `simulate` reports a
//! first action (a rollback or an escalation); the delay is that check's `at`.
//!
//! # Corpus A: realistic synthetic
//! Per release: requests per check log-uniform 3 … 500,000 (3 … 40 for low traffic), times a
//! drift across the 40 checks (linear, ending at ±40% at most) and a uniform ±20% per check.
//! Base error rate log-uniform 0.05% … 5%. The true rate of a check = base × exp(e_t) ×
//! (the category's factor), where e_t is one AR(1) process over all 40 checks (persistence
//! ρ 0.3–0.8, marginal σ 0.1–0.6 on the log scale), so the noise runs across the promotion.
//! Errors ~ Binomial(requests, rate): exact Bernoulli draws up to 1,000 requests, else
//! Poisson when a tail count is < 40, else normal. Per-request latency lognormal, median
//! 30–200 ms, σ_log 0.4–0.9; a check's p95 and p99 are its OWN requests' quantiles
//! (nearest rank): drawn exactly up to 2,000 requests, above that the true quantile plus its
//! asymptotic sampling error (sd √(q(1−q)/n) / φ(z_q) on the normal scale), so quiet
//! checks have noisy quantiles. Host memory 40–70% ± 0.5 (normal) per check.
//! In 15% of the releases of every category a pre-promotion incident multiplies the rate by
//! 3–10 for 2–5 consecutive pre-promotion checks.
//!
//! # Corpus B: real metric series (Numenta Anomaly Benchmark, `benches/data/nab/`)
//! As corpus A, but three random 40-point stretches of real series (one stretch ↔ one check)
//! replace the synthetic noise: one drives the traffic (requests per check = the release's
//! level × value / the stretch's median, clamped to 0.05–20×), one the error-rate swing
//! (e_t = σ × the log series centred on the stretch's median and divided by the series' typical
//! within-40-point standard deviation, clamped to ±4; σ 0.1–0.6), one the latency (every
//! quantile × exp(σ_lat × the same normalised log series), σ_lat 0.05–0.3). Traffic from the
//! count-like series (ELB requests, EC2 network in, road occupancy, tweet volume); the swings
//! from any of the nine. Memory, sampling and categories as in corpus A.
//!
//! # Categories (one in 8 good / one in 10 bad, alternately good and bad)
//! Good (not worse than the previous version): steady (canary 0.8–1.15× the rate);
//! environment swing (after the promotion, ×2–4 for 2–4 consecutive checks: a dependency
//! incident both versions would see); drift (rate and traffic each drift linearly by up to
//! ±30% over the 40 checks); blip (one check ×10); outage (4–6 consecutive checks with
//! `snapshot: null`); low traffic (3–40 requests per check); slightly slower (+10% on every
//! latency quantile); memory sawtooth (GC: ±8 points, period 4–8 checks, no trend).
//! Bad: modest step (1.75–3× the rate from the start); big step (3–10×); intermittent
//! (every 4th check 5–14×, normal in between); flapping probe (probe fails every 2nd or 3rd
//! check, metrics normal); p95 latency (every quantile 1.6–3×); p99 only (p99 2–4×, p95
//! unchanged); memory leak (from 54–62%, +20–30 points linearly over the 10 minutes, plus
//! noise); late onset (3–10× from check 8–14); masked (a baseline incident ×5–10 for 3–5
//! pre-promotion checks AND the canary 3–6× worse); crash loop (probe failing, half the
//! requests erroring).
//!
//! # Judges (every one sees the same 40 lines)
//! 1. **rollbackd**: `rollbackd::cli::simulate::replay` with the default configuration.
//! 2. **Flagger/Argo-style thresholds**: act at the first check where, of the last 5 checks,
//!    3 have an error rate > 1%, or 3 have p95 > 1.5 × the median pre-promotion p95.
//!    No probe, memory or no-data rule.
//! 3. **Reference** (`reference_judge`): baseline = pooled pre-promotion counts p₀ = E/N
//!    (0.5/N when E = 0); dispersion φ = max(1, Pearson χ²/df) of the pre-promotion checks
//!    around p₀. Errors: of the last 6 checks, those with data, minus the one with the
//!    highest rate (≥ 3 left), pooled: x errors in n requests; z = (x − n p₀) /
//!    √(φ (n p₀(1−p₀) + n² p₀(1−p₀)/N)); act at z > 3.5 and (x/n)/p₀ > 1.5. Latency: the
//!    median of ln p95 (and of ln p99) over the last 5 checks with data (≥ 3) against the
//!    pre-promotion median: act above ln 1.5. Memory: Theil-Sen slope of the session's host
//!    memory > 60 points/hour with ≥ 6 checks. Probe: 3 failures among the last 6 checks.
//!    No no-data rule.
//!
//! # Output
//! Per corpus: one row per category with each judge's share of releases acted on and, for
//! bad categories, the median delay; the totals; rollbackd's actions by kind and by reason
//! (figures replaced by N); up to 10 bad releases rollbackd missed and 10 good ones it acted
//! on, spread over the categories, with their parameters (`file@row` names a NAB stretch),
//! so that `--dump` and `rollbackd simulate --trace` can replay them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

const PRE: usize = 20;
const POST: usize = 20;
const CHECKS: usize = PRE + POST;
const INTERVAL_S: u64 = 30;
/// The share of releases with a pre-promotion incident (besides `masked`, which always has one).
const PRE_INCIDENT_SHARE: f64 = 0.15;

/// splitmix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    /// A release's own stream: the same seed, corpus and index give the same release.
    fn for_release(seed: u64, corpus: u64, index: usize) -> Rng {
        let mut rng = Rng(seed ^ corpus.wrapping_mul(0xA076_1D64_78BD_642F));
        rng.0 ^= rng.next() ^ (index as u64).wrapping_mul(0xE703_7ED1_A0B4_28DB);
        rng.next();
        rng
    }
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
    /// Uniform in lo..=hi.
    fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit(); // (0, 1]
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos()
    }
    /// Poisson(λ) by multiplication (λ < 40 here).
    fn poisson(&mut self, lambda: f64) -> u64 {
        let limit = (-lambda).exp();
        let mut k = 0;
        let mut product = self.unit();
        while product > limit {
            k += 1;
            product *= self.unit();
        }
        k
    }
    /// Binomial(n, p): exact up to 1,000 trials, else Poisson for a small tail, else normal.
    fn binomial(&mut self, n: u64, p: f64) -> u64 {
        if p <= 0.0 {
            return 0;
        }
        if p >= 1.0 {
            return n;
        }
        if n <= 1000 {
            return (0..n).filter(|_| self.unit() < p).count() as u64;
        }
        let mean = n as f64 * p;
        let complement = n as f64 * (1.0 - p);
        if mean < 40.0 {
            self.poisson(mean).min(n)
        } else if complement < 40.0 {
            n - self.poisson(complement).min(n)
        } else {
            let sd = (mean * (1.0 - p)).sqrt();
            (mean + sd * self.normal()).round().clamp(0.0, n as f64) as u64
        }
    }
    /// A check's p95 and p99 from its own `n` requests, lognormal(median, sigma).
    fn quantiles(&mut self, n: u64, median: f64, sigma: f64) -> (f64, f64) {
        const Z95: f64 = 1.644_853_626_951_472_2;
        const Z99: f64 = 2.326_347_874_040_841;
        let (z95, z99) = if n <= 2000 {
            let n = n.max(1) as usize;
            let mut z: Vec<f64> = (0..n).map(|_| self.normal()).collect();
            z.sort_by(f64::total_cmp);
            let rank = |q: f64| ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            (z[rank(0.95)], z[rank(0.99)])
        } else {
            // The sample quantile's asymptotic error on the standard normal scale.
            let density = |z: f64| (-z * z / 2.0).exp() / (std::f64::consts::TAU).sqrt();
            let se = |q: f64, z: f64| (q * (1.0 - q) / n as f64).sqrt() / density(z);
            (
                Z95 + se(0.95, Z95) * self.normal(),
                Z99 + se(0.99, Z99) * self.normal(),
            )
        };
        let p95 = median * (sigma * z95).exp();
        let p99 = median * (sigma * z99).exp();
        (p95, p99.max(p95))
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Category {
    Steady,
    EnvSwing,
    Drift,
    Blip,
    Outage,
    LowTraffic,
    SlightlySlower,
    MemorySawtooth,
    ModestStep,
    BigStep,
    Intermittent,
    FlappingProbe,
    P95Latency,
    P99Only,
    MemoryLeak,
    LateOnset,
    Masked,
    CrashLoop,
}

const GOOD: [Category; 8] = [
    Category::Steady,
    Category::EnvSwing,
    Category::Drift,
    Category::Blip,
    Category::Outage,
    Category::LowTraffic,
    Category::SlightlySlower,
    Category::MemorySawtooth,
];

const BAD: [Category; 10] = [
    Category::ModestStep,
    Category::BigStep,
    Category::Intermittent,
    Category::FlappingProbe,
    Category::P95Latency,
    Category::P99Only,
    Category::MemoryLeak,
    Category::LateOnset,
    Category::Masked,
    Category::CrashLoop,
];

impl Category {
    fn bad(self) -> bool {
        BAD.contains(&self)
    }
    fn name(self) -> &'static str {
        match self {
            Category::Steady => "steady",
            Category::EnvSwing => "env-swing",
            Category::Drift => "drift",
            Category::Blip => "blip",
            Category::Outage => "outage",
            Category::LowTraffic => "low-traffic",
            Category::SlightlySlower => "slightly-slower",
            Category::MemorySawtooth => "memory-sawtooth",
            Category::ModestStep => "modest-step",
            Category::BigStep => "big-step",
            Category::Intermittent => "intermittent",
            Category::FlappingProbe => "flapping-probe",
            Category::P95Latency => "p95-latency",
            Category::P99Only => "p99-only",
            Category::MemoryLeak => "memory-leak",
            Category::LateOnset => "late-onset",
            Category::Masked => "masked",
            Category::CrashLoop => "crash-loop",
        }
    }
}

/// A snapshot as written in the trace (the judges read these values).
#[derive(Clone, Copy)]
struct Snap {
    errors: u64,
    requests: u64,
    /// Rounded to 0.1 ms, as written.
    p95: f64,
    p99: f64,
}

impl Snap {
    fn rate(&self) -> f64 {
        self.errors as f64 / self.requests as f64
    }
}

#[derive(Clone)]
struct Check {
    /// `None`: "ok"; otherwise the failure reason.
    probe_failure: Option<&'static str>,
    /// `None`: the monitoring was down (`"snapshot": null`).
    snapshot: Option<Snap>,
    /// Rounded to 0.1 point, as written.
    memory: f64,
}

struct Release {
    corpus: &'static str,
    index: usize,
    category: Category,
    /// The release's key parameters, for the lists of misses.
    params: String,
    /// PRE observations of the previous version, then POST checks of the new one.
    checks: Vec<Check>,
}

/// `at` of check `t` of a release (0-based over all 40).
fn at(t: usize) -> i64 {
    (t as i64 - PRE as i64 + i64::from(t >= PRE)) * INTERVAL_S as i64
}

impl Release {
    fn trace(&self) -> String {
        let mut text = String::with_capacity(CHECKS * 180);
        for (t, check) in self.checks.iter().enumerate() {
            let probe = check.probe_failure.unwrap_or("ok");
            write!(text, "{{\"at\": {}, \"probe\": \"{probe}\", ", at(t)).unwrap();
            match &check.snapshot {
                None => text.push_str("\"snapshot\": null"),
                Some(s) => write!(
                    text,
                    "\"snapshot\": {{\"failureRate\": {}, \"requests\": {}, \"latencyP95Ms\": {:.1}, \"latencyP99Ms\": {:.1}}}",
                    s.rate(),
                    s.requests,
                    s.p95,
                    s.p99
                )
                .unwrap(),
            }
            writeln!(
                text,
                ", \"resources\": {{\"hostMemoryPercent\": {:.1}}}}}",
                check.memory
            )
            .unwrap();
        }
        text
    }
}

/// The noise a release's checks are drawn around, one value per check (all 40).
struct Drivers {
    /// Expected requests per check.
    traffic: Vec<f64>,
    /// Log-scale error-rate swing.
    swing: Vec<f64>,
    /// Log-scale latency shift (every quantile).
    latency: Vec<f64>,
    /// What drew them, for the lists of misses.
    describe: String,
}

/// Corpus A's noise: traffic drift and jitter, an AR(1) error-rate swing, no latency shift.
fn synthetic_drivers(rng: &mut Rng, level: f64) -> Drivers {
    let drift = rng.range(-0.4, 0.4);
    let traffic = (0..CHECKS)
        .map(|t| level * (1.0 + drift * t as f64 / (CHECKS - 1) as f64) * rng.range(0.8, 1.2))
        .collect();
    let rho = rng.range(0.3, 0.8);
    let sigma = rng.range(0.1, 0.6);
    let innovation = sigma * (1.0 - rho * rho).sqrt();
    let mut e = sigma * rng.normal();
    let mut swing = Vec::with_capacity(CHECKS);
    for _ in 0..CHECKS {
        swing.push(e);
        e = rho * e + innovation * rng.normal();
    }
    Drivers {
        traffic,
        swing,
        latency: vec![0.0; CHECKS],
        describe: format!("AR σ {sigma:.2} ρ {rho:.2}, traffic drift {drift:+.2}"),
    }
}

/// A vendored NAB series.
struct Series {
    name: &'static str,
    values: Vec<f64>,
    /// Added before taking logs (1% of the median: a few series have zeros).
    eps: f64,
    /// The typical standard deviation of ln(value + eps) within 40 consecutive points.
    log_scale: f64,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

impl Series {
    fn parse(name: &'static str, csv: &str) -> Series {
        let values: Vec<f64> = csv
            .lines()
            .skip(1)
            .filter_map(|line| line.rsplit(',').next()?.trim().parse().ok())
            .collect();
        assert!(values.len() >= 200, "{name}: too short");
        let eps = 0.01 * median(&mut values.clone()) + 1e-9;
        let logs: Vec<f64> = values.iter().map(|v| (v + eps).ln()).collect();
        let mut variances = Vec::new();
        for start in (0..=logs.len() - CHECKS).step_by(5) {
            let w = &logs[start..start + CHECKS];
            let mean = w.iter().sum::<f64>() / CHECKS as f64;
            variances.push(w.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / CHECKS as f64);
        }
        let log_scale = (variances.iter().sum::<f64>() / variances.len() as f64)
            .sqrt()
            .max(1e-9);
        Series {
            name,
            values,
            eps,
            log_scale,
        }
    }
    fn stretch(&self, rng: &mut Rng) -> (usize, &[f64]) {
        let start = rng.int(0, self.values.len() - CHECKS);
        (start, &self.values[start..start + CHECKS])
    }
    /// ln(value) centred on the stretch's median, in typical within-window deviations.
    fn normalised(&self, stretch: &[f64]) -> Vec<f64> {
        let logs: Vec<f64> = stretch.iter().map(|v| (v + self.eps).ln()).collect();
        let centre = median(&mut logs.clone());
        logs.iter()
            .map(|l| ((l - centre) / self.log_scale).clamp(-4.0, 4.0))
            .collect()
    }
}

/// The vendored series (benches/data/nab/README.md) and which can drive traffic.
fn nab_series() -> Vec<(Series, bool)> {
    macro_rules! series {
        ($path:literal, $traffic:expr) => {
            (
                Series::parse(
                    $path,
                    include_str!(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/benches/data/nab/",
                        $path,
                        ".csv"
                    )),
                ),
                $traffic,
            )
        };
    }
    vec![
        series!("realAWSCloudwatch/elb_request_count_8c0756", true),
        series!("realAWSCloudwatch/ec2_network_in_257a54", true),
        series!("realTraffic/occupancy_6005", true),
        series!("realTweets/Twitter_volume_GOOG", true),
        series!("realAWSCloudwatch/ec2_cpu_utilization_5f5533", false),
        series!("realAWSCloudwatch/rds_cpu_utilization_cc0c53", false),
        series!("realKnownCause/machine_temperature_system_failure", false),
        series!("realKnownCause/cpu_utilization_asg_misconfiguration", false),
        series!("realTraffic/TravelTime_387", false),
    ]
}

/// Corpus B's noise: three stretches of real series.
fn nab_drivers(rng: &mut Rng, level: f64, series: &[(Series, bool)]) -> Drivers {
    let short = |s: &Series| s.name.rsplit('/').next().unwrap_or(s.name).to_owned();
    let counts: Vec<&Series> = series.iter().filter(|(_, t)| *t).map(|(s, _)| s).collect();
    let traffic_series = counts[rng.int(0, counts.len() - 1)];
    let (traffic_at, stretch) = traffic_series.stretch(rng);
    let centre = median(
        &mut stretch
            .iter()
            .map(|v| v + traffic_series.eps)
            .collect::<Vec<_>>(),
    );
    let traffic = stretch
        .iter()
        .map(|v| level * ((v + traffic_series.eps) / centre).clamp(0.05, 20.0))
        .collect();
    let swing_series = &series[rng.int(0, series.len() - 1)].0;
    let (swing_at, stretch) = swing_series.stretch(rng);
    let sigma = rng.range(0.1, 0.6);
    let swing = swing_series
        .normalised(stretch)
        .iter()
        .map(|z| sigma * z)
        .collect();
    let latency_series = &series[rng.int(0, series.len() - 1)].0;
    let (latency_at, stretch) = latency_series.stretch(rng);
    let sigma_latency = rng.range(0.05, 0.3);
    let latency = latency_series
        .normalised(stretch)
        .iter()
        .map(|z| sigma_latency * z)
        .collect();
    Drivers {
        traffic,
        swing,
        latency,
        describe: format!(
            "traffic {}@{traffic_at}, errors {}@{swing_at} σ {sigma:.2}, latency {}@{latency_at} σ {sigma_latency:.2}",
            short(traffic_series),
            short(swing_series),
            short(latency_series)
        ),
    }
}

/// One release of `category`; `drivers` makes the noise given the traffic level.
fn release(
    rng: &mut Rng,
    corpus: &'static str,
    index: usize,
    category: Category,
    drivers: impl FnOnce(&mut Rng, f64) -> Drivers,
) -> Release {
    let level = if category == Category::LowTraffic {
        rng.log_range(3.0, 40.0)
    } else {
        rng.log_range(3.0, 500_000.0)
    };
    let base_rate = rng.log_range(0.0005, 0.05);
    let latency_median = rng.range(30.0, 200.0);
    let latency_sigma = rng.range(0.4, 0.9);
    let mut memory_level = rng.range(40.0, 70.0);
    let mut drivers = drivers(rng, level);
    let mut params = format!(
        "~{level:.0} req/check, base {:.3}%, p50 {latency_median:.0} ms σ {latency_sigma:.2}, {}",
        base_rate * 100.0,
        drivers.describe
    );

    // Per check: the category's factor on the rate, on every latency quantile, on p99.
    let mut rate = [1.0f64; CHECKS];
    let mut slower = [1.0f64; CHECKS];
    let mut tail = [1.0f64; CHECKS];
    let mut probe: [Option<&'static str>; CHECKS] = [None; CHECKS];
    let mut outage = [false; CHECKS];
    let mut memory_shape = [0.0f64; CHECKS];
    let mut crash = false;

    let incident =
        |rng: &mut Rng, rate: &mut [f64; CHECKS], lo: f64, hi: f64, min: usize, max: usize| {
            let factor = rng.range(lo, hi);
            let len = rng.int(min, max);
            let start = rng.int(0, PRE - len);
            for r in &mut rate[start..start + len] {
                *r *= factor;
            }
            format!(
                "pre-promotion incident ×{factor:.1} at checks {start}..{}",
                start + len
            )
        };
    if category == Category::Masked {
        let what = incident(rng, &mut rate, 5.0, 10.0, 3, 5);
        params.push_str(&format!(", {what}"));
    } else if rng.chance(PRE_INCIDENT_SHARE) {
        let what = incident(rng, &mut rate, 3.0, 10.0, 2, 5);
        params.push_str(&format!(", {what}"));
    }
    let post = PRE..CHECKS;
    let mut effect = String::new();
    match category {
        Category::Steady => {
            let k = rng.range(0.8, 1.15);
            rate[post].iter_mut().for_each(|r| *r *= k);
            effect = format!("canary ×{k:.2}");
        }
        Category::EnvSwing => {
            let f = rng.range(2.0, 4.0);
            let len = rng.int(2, 4);
            let start = rng.int(0, POST - len);
            rate[PRE + start..PRE + start + len]
                .iter_mut()
                .for_each(|r| *r *= f);
            effect = format!("×{f:.1} at checks {}..={}", start + 1, start + len);
        }
        Category::Drift => {
            let rate_drift = rng.range(-0.3, 0.3);
            let traffic_drift = rng.range(-0.3, 0.3);
            for (t, (r, n)) in rate.iter_mut().zip(&mut drivers.traffic).enumerate() {
                let x = t as f64 / (CHECKS - 1) as f64;
                *r *= 1.0 + rate_drift * x;
                *n *= 1.0 + traffic_drift * x;
            }
            effect = format!("rate drift {rate_drift:+.2}, traffic drift {traffic_drift:+.2}");
        }
        Category::Blip => {
            let i = rng.int(0, POST - 1);
            rate[PRE + i] *= 10.0;
            effect = format!("×10 at check {}", i + 1);
        }
        Category::Outage => {
            let len = rng.int(4, 6);
            let start = rng.int(0, POST - len);
            outage[PRE + start..PRE + start + len].fill(true);
            effect = format!("no snapshot at checks {}..={}", start + 1, start + len);
        }
        Category::LowTraffic => {}
        Category::SlightlySlower => {
            slower[post].fill(1.1);
            effect = "latency ×1.1".into();
        }
        Category::MemorySawtooth => {
            let period = rng.int(4, 8) as f64;
            let phase = rng.unit();
            for (t, m) in memory_shape.iter_mut().enumerate() {
                let x = (t as f64 / period + phase).fract();
                *m = 8.0 * (2.0 * x - 1.0);
            }
            effect = format!("GC sawtooth ±8, period {period} checks");
        }
        Category::ModestStep | Category::BigStep => {
            let (lo, hi) = if category == Category::ModestStep {
                (1.75, 3.0)
            } else {
                (3.0, 10.0)
            };
            let f = rng.range(lo, hi);
            rate[post].iter_mut().for_each(|r| *r *= f);
            effect = format!("canary ×{f:.2}");
        }
        Category::Intermittent => {
            let f = rng.range(5.0, 14.0);
            let phase = rng.int(0, 3);
            for i in (phase..POST).step_by(4) {
                rate[PRE + i] *= f;
            }
            effect = format!("×{f:.1} every 4th check from check {}", phase + 1);
        }
        Category::FlappingProbe => {
            let every = rng.int(2, 3);
            let phase = rng.int(0, every - 1);
            for i in (phase..POST).step_by(every) {
                probe[PRE + i] = Some("timeout");
            }
            effect = format!("probe fails every {every} checks from check {}", phase + 1);
        }
        Category::P95Latency => {
            let f = rng.range(1.6, 3.0);
            slower[post].fill(f);
            effect = format!("latency ×{f:.2}");
        }
        Category::P99Only => {
            let f = rng.range(2.0, 4.0);
            tail[post].fill(f);
            effect = format!("p99 ×{f:.2}");
        }
        Category::MemoryLeak => {
            memory_level = rng.range(54.0, 62.0);
            let rise = rng.range(20.0, 30.0);
            for i in 0..POST {
                memory_shape[PRE + i] = rise * (i + 1) as f64 / POST as f64;
            }
            effect = format!("memory from {memory_level:.0}% +{rise:.0} points");
        }
        Category::LateOnset => {
            let f = rng.range(3.0, 10.0);
            let from = rng.int(8, 14);
            rate[PRE + from - 1..].iter_mut().for_each(|r| *r *= f);
            effect = format!("×{f:.1} from check {from}");
        }
        Category::Masked => {
            let f = rng.range(3.0, 6.0);
            rate[post].iter_mut().for_each(|r| *r *= f);
            effect = format!("canary ×{f:.2}");
        }
        Category::CrashLoop => {
            probe[post].fill(Some("connection refused"));
            crash = true;
            effect = "probe refused, 50% errors".into();
        }
    }
    if !effect.is_empty() {
        params = format!("{effect}; {params}");
    }

    let checks = (0..CHECKS)
        .map(|t| {
            let memory = ((memory_level + memory_shape[t] + 0.5 * rng.normal()).clamp(0.0, 100.0)
                * 10.0)
                .round()
                / 10.0;
            if outage[t] {
                return Check {
                    probe_failure: probe[t],
                    snapshot: None,
                    memory,
                };
            }
            let requests = drivers.traffic[t].round().max(1.0) as u64;
            let true_rate = if crash && t >= PRE {
                0.5
            } else {
                (base_rate * drivers.swing[t].exp() * rate[t]).min(1.0)
            };
            let errors = rng.binomial(requests, true_rate);
            let typical = latency_median * drivers.latency[t].exp() * slower[t];
            let (p95, p99) = rng.quantiles(requests, typical, latency_sigma);
            let round = |ms: f64| (ms * 10.0).round() / 10.0;
            let p95 = round(p95);
            let p99 = round(p99 * tail[t]).max(p95);
            Check {
                probe_failure: probe[t],
                snapshot: Some(Snap {
                    errors,
                    requests,
                    p95,
                    p99,
                }),
                memory,
            }
        })
        .collect();
    Release {
        corpus,
        index,
        category,
        params,
        checks,
    }
}

/// The category of release `index`: good and bad alternately, cycling through each list.
fn category_of(index: usize) -> Category {
    if index % 2 == 0 {
        GOOD[(index / 2) % GOOD.len()]
    } else {
        BAD[(index / 2) % BAD.len()]
    }
}

// ---------------------------------------------------------------------------------------
// The two reference judges. Each returns the post-promotion check (0-based) it acts at.

/// Flagger/Argo-style analysis: fixed thresholds, 3 failing metric checks of the last 5.
fn flagger_judge(checks: &[Check]) -> Option<usize> {
    let mut pre_p95: Vec<f64> = checks[..PRE]
        .iter()
        .filter_map(|c| c.snapshot.map(|s| s.p95))
        .collect();
    let base_p95 = (!pre_p95.is_empty()).then(|| median(&mut pre_p95));
    let post = &checks[PRE..];
    (0..POST).find(|&i| {
        let window = &post[i.saturating_sub(4)..=i];
        let errors = window
            .iter()
            .filter(|c| c.snapshot.is_some_and(|s| s.rate() > 0.01))
            .count();
        let slow = window
            .iter()
            .filter(|c| {
                c.snapshot
                    .zip(base_p95)
                    .is_some_and(|(s, base)| s.p95 > 1.5 * base)
            })
            .count();
        errors >= 3 || slow >= 3
    })
}

/// Theil-Sen slope: the median of the pairwise slopes.
fn theil_sen(points: &[(f64, f64)]) -> f64 {
    let mut slopes = Vec::with_capacity(points.len() * points.len() / 2);
    for (i, (x1, y1)) in points.iter().enumerate() {
        for (x2, y2) in &points[i + 1..] {
            if x2 != x1 {
                slopes.push((y2 - y1) / (x2 - x1));
            }
        }
    }
    median(&mut slopes)
}

/// The reference judge: pooled, dispersion-aware counts on a trimmed window; quantile
/// medians; a robust memory slope; probe failures.
fn reference_judge(checks: &[Check]) -> Option<usize> {
    const Z: f64 = 3.5;
    const RATIO: f64 = 1.5;
    const SLOPE_PER_HOUR: f64 = 60.0;
    let pre: Vec<Snap> = checks[..PRE].iter().filter_map(|c| c.snapshot).collect();
    // The baseline's rate and its dispersion (Pearson χ² / df around the pooled rate).
    let (big_e, big_n) = pre
        .iter()
        .fold((0u64, 0u64), |(e, n), s| (e + s.errors, n + s.requests));
    let counts = (big_n > 0).then(|| {
        let p0 = if big_e == 0 {
            0.5 / big_n as f64
        } else {
            big_e as f64 / big_n as f64
        };
        let chi2: f64 = pre
            .iter()
            .map(|s| {
                let expected = s.requests as f64 * p0;
                (s.errors as f64 - expected).powi(2) / (expected * (1.0 - p0))
            })
            .sum();
        let phi = if pre.len() > 1 {
            (chi2 / (pre.len() - 1) as f64).max(1.0)
        } else {
            1.0
        };
        (p0, phi, big_n as f64)
    });
    let base_log = |f: fn(&Snap) -> f64| {
        let mut logs: Vec<f64> = pre.iter().map(|s| f(s).max(0.1).ln()).collect();
        (!logs.is_empty()).then(|| median(&mut logs))
    };
    let base_p95 = base_log(|s| s.p95);
    let base_p99 = base_log(|s| s.p99);
    let post = &checks[PRE..];
    (0..POST).find(|&i| {
        let data: Vec<Snap> = post[i.saturating_sub(5)..=i]
            .iter()
            .filter_map(|c| c.snapshot)
            .collect();
        // Errors: pooled over the last 6 checks minus the worst one.
        if let Some((p0, phi, big_n)) = counts {
            if data.len() >= 4 {
                let worst = (0..data.len())
                    .max_by(|&a, &b| data[a].rate().total_cmp(&data[b].rate()))
                    .unwrap_or(0);
                let (x, n) = data
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != worst)
                    .fold((0.0, 0.0), |(x, n), (_, s)| {
                        (x + s.errors as f64, n + s.requests as f64)
                    });
                let expected = n * p0;
                let variance = phi * (n * p0 * (1.0 - p0) + n * n * p0 * (1.0 - p0) / big_n);
                let z = (x - expected) / variance.sqrt();
                if z > Z && x / n > RATIO * p0 {
                    return true;
                }
            }
        }
        // Latency: the median of the last 5 checks' log quantiles against the baseline's.
        let recent: Vec<&Snap> = data.iter().skip(data.len().saturating_sub(5)).collect();
        if recent.len() >= 3 {
            for (base, f) in [
                (base_p95, (|s: &Snap| s.p95) as fn(&Snap) -> f64),
                (base_p99, |s: &Snap| s.p99),
            ] {
                let mut logs: Vec<f64> = recent.iter().map(|s| f(s).max(0.1).ln()).collect();
                if base.is_some_and(|b| median(&mut logs) - b > RATIO.ln()) {
                    return true;
                }
            }
        }
        // Memory: a robust slope over the session so far.
        let memory: Vec<(f64, f64)> = post[..=i]
            .iter()
            .enumerate()
            .map(|(j, c)| ((j + 1) as f64 * INTERVAL_S as f64 / 3600.0, c.memory))
            .collect();
        if memory.len() >= 6 && theil_sen(&memory) > SLOPE_PER_HOUR {
            return true;
        }
        // Probe: 3 failures among the last 6 checks.
        post[i.saturating_sub(5)..=i]
            .iter()
            .filter(|c| c.probe_failure.is_some())
            .count()
            >= 3
    })
}

// ---------------------------------------------------------------------------------------

/// What the three judges did with one release.
struct Outcome {
    /// rollbackd: seconds after the promotion, the action, its reason.
    rollbackd: Option<(u64, &'static str, String)>,
    rollbackd_last_verdict: Option<&'static str>,
    /// The reference judges: seconds after the promotion.
    flagger: Option<u64>,
    reference: Option<u64>,
}

fn judge(config: &rollbackd::config::Config, release: &Release) -> Outcome {
    let text = release.trace();
    let summary = rollbackd::cli::simulate::replay(
        config,
        text.as_bytes(),
        "corpus",
        true,
        &mut std::io::sink(),
    )
    .expect("a generated trace is well-formed");
    let delay = |i: usize| (i as u64 + 1) * INTERVAL_S;
    Outcome {
        rollbackd: summary
            .first_action
            .map(|(at, action, reason)| (at.as_secs(), action.as_str(), reason)),
        rollbackd_last_verdict: summary.last_verdict.map(|v| v.as_str()),
        flagger: flagger_judge(&release.checks).map(delay),
        reference: reference_judge(&release.checks).map(delay),
    }
}

/// `f` over `items` on `threads` threads; the results in the items' order.
fn parallel<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let chunk = items.len().div_ceil(threads.max(1)).max(1);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a worker thread panicked"))
            .collect()
    })
}

/// A reason without its figures ("Worker probe failed N consecutive times"), to count them.
fn reason_kind(reason: &str) -> String {
    let head = reason.split(['(', ':']).next().unwrap_or(reason).trim();
    let mut kind = String::new();
    let mut in_number = false;
    for c in head.chars() {
        if c.is_ascii_digit() || (in_number && c == '.') {
            if !in_number {
                kind.push('N');
            }
            in_number = true;
        } else {
            in_number = false;
            kind.push(c);
        }
    }
    kind
}

#[derive(Default)]
struct Tally {
    releases: usize,
    acted: [usize; 3],
    delays: [Vec<u64>; 3],
}

impl Tally {
    fn add(&mut self, outcome: &Outcome) {
        self.releases += 1;
        let delays = [
            outcome.rollbackd.as_ref().map(|(at, _, _)| *at),
            outcome.flagger,
            outcome.reference,
        ];
        for (j, delay) in delays.into_iter().enumerate() {
            if let Some(delay) = delay {
                self.acted[j] += 1;
                self.delays[j].push(delay);
            }
        }
    }
    fn percent(&self, judge: usize) -> String {
        if self.releases == 0 {
            "-".into()
        } else {
            format!(
                "{:.1}%",
                100.0 * self.acted[judge] as f64 / self.releases as f64
            )
        }
    }
    fn share(&self, judge: usize) -> String {
        format!(
            "{}/{} ({})",
            self.acted[judge],
            self.releases,
            self.percent(judge)
        )
    }
    fn median_delay(&self, judge: usize) -> String {
        let mut delays: Vec<f64> = self.delays[judge].iter().map(|&d| d as f64).collect();
        if delays.is_empty() {
            "-".into()
        } else {
            format!("{:.0}", median(&mut delays))
        }
    }
}

fn report(
    out: &mut impl std::io::Write,
    title: &str,
    releases: &[Release],
    outcomes: &[Outcome],
    elapsed: f64,
) -> std::io::Result<()> {
    let mut by_category: BTreeMap<Category, Tally> = BTreeMap::new();
    let (mut bad, mut good) = (Tally::default(), Tally::default());
    // rollbackd's actions by kind: [bad, good] × (rollback, escalate).
    let mut kinds: BTreeMap<(bool, &'static str), usize> = BTreeMap::new();
    for (release, outcome) in releases.iter().zip(outcomes) {
        by_category
            .entry(release.category)
            .or_default()
            .add(outcome);
        if release.category.bad() {
            bad.add(outcome);
        } else {
            good.add(outcome);
        }
        if let Some((_, action, _)) = &outcome.rollbackd {
            *kinds.entry((release.category.bad(), action)).or_default() += 1;
        }
    }
    writeln!(
        out,
        "\n## {title}: {} releases ({} bad, {} good), judged in {elapsed:.1} s\n",
        releases.len(),
        bad.releases,
        good.releases
    )?;
    writeln!(
        out,
        "| category | | releases | rollbackd acted | delay s | Flagger-style acted | delay s | reference acted | delay s |"
    )?;
    writeln!(
        out,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for (category, tally) in by_category
        .iter()
        .filter(|(c, _)| !c.bad())
        .chain(by_category.iter().filter(|(c, _)| c.bad()))
    {
        let delay = |j| {
            if category.bad() {
                tally.median_delay(j)
            } else {
                "-".into()
            }
        };
        writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            category.name(),
            if category.bad() { "bad" } else { "good" },
            tally.releases,
            tally.percent(0),
            delay(0),
            tally.percent(1),
            delay(1),
            tally.percent(2),
            delay(2)
        )?;
    }
    writeln!(
        out,
        "| **bad acted on** | | {} | {} | {} | {} | {} | {} | {} |",
        bad.releases,
        bad.share(0),
        bad.median_delay(0),
        bad.share(1),
        bad.median_delay(1),
        bad.share(2),
        bad.median_delay(2)
    )?;
    writeln!(
        out,
        "| **good acted on** | | {} | {} | | {} | | {} | |",
        good.releases,
        good.share(0),
        good.share(1),
        good.share(2)
    )?;
    let kind = |bad: bool, action| kinds.get(&(bad, action)).copied().unwrap_or(0);
    writeln!(
        out,
        "\nrollbackd's actions: on bad releases {} rollback, {} escalate; on good releases {} rollback, {} escalate.",
        kind(true, "rollback"),
        kind(true, "escalate"),
        kind(false, "rollback"),
        kind(false, "escalate")
    )?;

    for bad_ones in [true, false] {
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        for (r, o) in releases.iter().zip(outcomes) {
            if let (true, Some((_, action, reason))) = (r.category.bad() == bad_ones, &o.rollbackd)
            {
                *reasons
                    .entry(format!("{action}: {}", reason_kind(reason)))
                    .or_default() += 1;
            }
        }
        let mut reasons: Vec<(String, usize)> = reasons.into_iter().collect();
        reasons.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        writeln!(
            out,
            "rollbackd's reasons on {} releases: {}",
            if bad_ones { "bad" } else { "good" },
            if reasons.is_empty() {
                "none".to_owned()
            } else {
                reasons
                    .iter()
                    .map(|(reason, count)| format!("{count} × \"{reason}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )?;
    }

    // Up to 10 of each, spread over the categories (round robin, in index order).
    let pick = |wanted: &dyn Fn(&Release, &Outcome) -> bool| {
        let mut queues: BTreeMap<Category, Vec<usize>> = BTreeMap::new();
        for (i, (r, o)) in releases.iter().zip(outcomes).enumerate() {
            if wanted(r, o) {
                queues.entry(r.category).or_default().push(i);
            }
        }
        let total: usize = queues.values().map(Vec::len).sum();
        let mut picked = Vec::new();
        let mut round = 0;
        while picked.len() < 10.min(total) {
            for queue in queues.values() {
                if let Some(&i) = queue.get(round) {
                    if picked.len() < 10 {
                        picked.push(i);
                    }
                }
            }
            round += 1;
        }
        (picked, total)
    };
    let (missed, total) = pick(&|r, o| r.category.bad() && o.rollbackd.is_none());
    writeln!(
        out,
        "\nrollbackd: bad releases not acted on ({total}; up to 10 shown, `--dump DIR` writes their traces):"
    )?;
    for i in missed {
        let (r, o) = (&releases[i], &outcomes[i]);
        writeln!(
            out,
            "- {}-{} {}: {} — no action, last verdict {}",
            r.corpus,
            r.index,
            r.category.name(),
            r.params,
            o.rollbackd_last_verdict.unwrap_or("none")
        )?;
    }
    let (falsely, total) = pick(&|r, o| !r.category.bad() && o.rollbackd.is_some());
    writeln!(
        out,
        "\nrollbackd: good releases acted on ({total}; up to 10 shown):"
    )?;
    for i in falsely {
        let (r, o) = (&releases[i], &outcomes[i]);
        let (at, action, reason) = o.rollbackd.as_ref().expect("acted on");
        writeln!(
            out,
            "- {}-{} {}: {} — {action} at +{at}s: {reason}",
            r.corpus,
            r.index,
            r.category.name(),
            r.params
        )?;
    }
    Ok(())
}

fn argument(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn main() {
    let releases: usize = argument("--releases")
        .map(|n| n.parse().expect("--releases takes a number"))
        .unwrap_or(4000);
    let seed: u64 = argument("--seed")
        .map(|s| match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).expect("--seed: a hex number"),
            None => s.parse().expect("--seed: a number"),
        })
        .unwrap_or(0x5EED_2026);
    let dump = argument("--dump").map(PathBuf::from);
    let env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("ROLLBACKD_"))
        .collect();
    let config = rollbackd::config::load_str("", &env)
        .expect("configuration")
        .config;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();

    let series = nab_series();
    let indices: Vec<usize> = (0..releases).collect();
    let synthetic: Vec<Release> = parallel(&indices, threads, |&i| {
        let mut rng = Rng::for_release(seed, 1, i);
        release(&mut rng, "synthetic", i, category_of(i), synthetic_drivers)
    });
    let nab: Vec<Release> = parallel(&indices, threads, |&i| {
        let mut rng = Rng::for_release(seed, 2, i);
        release(&mut rng, "nab", i, category_of(i), |rng, level| {
            nab_drivers(rng, level, &series)
        })
    });
    if let Some(dir) = &dump {
        std::fs::create_dir_all(dir).expect("--dump: creating the directory");
        for r in synthetic.iter().chain(&nab) {
            let path = dir.join(format!(
                "{}-{}-{}.jsonl",
                r.corpus,
                r.index,
                r.category.name()
            ));
            std::fs::write(&path, r.trace()).expect("--dump: writing a trace");
        }
    }
    let generated = started.elapsed().as_secs_f64();

    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# real_traffic: seed {seed:#x}, default configuration{} ({} ROLLBACKD_* variables), {threads} threads; corpora generated in {generated:.1} s{}",
        if env.is_empty() { "" } else { " with overrides" },
        env.len(),
        dump.as_ref()
            .map(|d| format!(", traces written to {}", d.display()))
            .unwrap_or_default()
    )
    .unwrap();
    for (title, corpus) in [
        ("Corpus A: realistic synthetic", &synthetic),
        ("Corpus B: NAB real metric series", &nab),
    ] {
        let t = Instant::now();
        let outcomes = parallel(corpus, threads, |r| judge(&config, r));
        report(
            &mut out,
            title,
            corpus,
            &outcomes,
            t.elapsed().as_secs_f64(),
        )
        .unwrap();
    }
    writeln!(out, "\ntotal {:.1} s", started.elapsed().as_secs_f64()).unwrap();
}
