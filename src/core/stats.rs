//! The statistics behind the baseline rule (SPEC §2a; the reasoning is in
//! `docs/DECISIONS.md`): does a check's error *count* exceed what the baseline predicts
//! for its request count, by more than the allowed margin, beyond chance?
//!
//! - With the baseline's counts (errors E in N requests) the test is the exact
//!   conditional test of two Poisson rates: given the check's x errors in n requests,
//!   under "the canary's rate is at most `margin` × the baseline's" the share of all
//!   x + E errors that fall in the check is at most θ₀ = margin·n / (margin·n + N), so the
//!   p-value is P(Bin(x + E, θ₀) ≥ x). It carries the baseline's own uncertainty: 0
//!   errors in 400 requests is not a 0% rate.
//! - With a rate only (an operator's `--baseline-error-rate`), it is the one-sample test
//!   P(Bin(n, margin·rate) ≥ x): the rate is taken as known.
//!
//! Pure functions of numbers; no I/O.

use statrs::distribution::{Binomial, DiscreteCDF};

/// P(X ≥ x) for X ~ Binomial(n, p). Exact (through the regularized incomplete beta
/// function), also for millions of trials.
pub fn binomial_at_least(x: u64, n: u64, p: f64) -> f64 {
    if x == 0 {
        return 1.0;
    }
    if x > n {
        return 0.0;
    }
    let p = p.clamp(0.0, 1.0);
    if p == 0.0 {
        return 0.0;
    }
    if p == 1.0 {
        return 1.0;
    }
    match Binomial::new(p, n) {
        // sf(k) = P(X > k)
        Ok(binomial) => binomial.sf(x - 1).clamp(0.0, 1.0),
        Err(_) => 1.0,
    }
}

/// The result of one baseline test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExcessErrors {
    /// How surprising the check's errors are if the canary were no worse than `margin` ×
    /// the baseline: small means "worse".
    pub p_value: f64,
    /// Errors the baseline predicts for the check's requests (before the margin).
    pub expected: f64,
}

/// Two-sample test: `errors` in `requests` against the baseline's `base_errors` in
/// `base_requests`. `None` when there is nothing to judge (no requests on either side).
pub fn excess_over_counts(
    errors: u64,
    requests: u64,
    base_errors: u64,
    base_requests: u64,
    margin: f64,
) -> Option<ExcessErrors> {
    if requests == 0 || base_requests == 0 || !(margin.is_finite() && margin > 0.0) {
        return None;
    }
    let errors = errors.min(requests);
    let base_errors = base_errors.min(base_requests);
    let weighted = margin * requests as f64;
    let theta = weighted / (weighted + base_requests as f64);
    Some(ExcessErrors {
        p_value: binomial_at_least(errors, errors.saturating_add(base_errors), theta),
        expected: requests as f64 * base_errors as f64 / base_requests as f64,
    })
}

/// One-sample test against a known `base_rate`.
pub fn excess_over_rate(
    errors: u64,
    requests: u64,
    base_rate: f64,
    margin: f64,
) -> Option<ExcessErrors> {
    if requests == 0 || !(base_rate.is_finite() && (0.0..=1.0).contains(&base_rate)) {
        return None;
    }
    if !(margin.is_finite() && margin > 0.0) {
        return None;
    }
    let errors = errors.min(requests);
    Some(ExcessErrors {
        p_value: binomial_at_least(errors, requests, (margin * base_rate).min(1.0)),
        expected: requests as f64 * base_rate,
    })
}

/// More requests than any one check can carry (a trillion): the count tests do not judge
/// such a check (the exact ones would saturate their integers).
pub const MAX_REQUESTS_PER_CHECK: f64 = 1e12;

/// A count from a rate and a number of requests, as the snapshot gives them (the rate is
/// errors / requests, rounded by whoever computed it).
pub fn errors_of(rate: f64, requests: f64) -> u64 {
    (rate * requests).round().max(0.0) as u64
}

// ---------------------------------------------------------------------------------------
// Real traffic (SPEC §2b): the between-check noise of a version's error rate, and tests
// that use it.
// ---------------------------------------------------------------------------------------

/// One check's counts, as the noise model sees it: `errors` (unrounded: rate × requests)
/// in `requests`, taken at `at` seconds (any one clock).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Counts {
    pub at: f64,
    pub errors: f64,
    pub requests: f64,
}

/// How a version's true error rate moves between checks, estimated from its checks
/// (gamma-Poisson: a check's errors are Poisson around `requests × rate × g`, `g` a
/// multiplicative swing with relative variance `sigma2` whose lag-one correlation between
/// checks `step_seconds` apart is `rho`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Noise {
    pub sigma2: f64,
    pub rho: f64,
    pub step_seconds: f64,
}

impl Noise {
    /// Correlation of the swings of two checks `dt` seconds apart.
    pub fn correlation(&self, dt: f64) -> f64 {
        if self.rho <= 0.0 || self.step_seconds <= 0.0 {
            return if dt.abs() < 1e-9 { 1.0 } else { 0.0 };
        }
        self.rho.powf(dt.abs() / self.step_seconds)
    }

    /// How many independent checks `m` consecutive ones are worth (AR(1)).
    pub fn effective(&self, m: f64) -> f64 {
        let rho = self.rho.clamp(0.0, 0.95);
        (m * (1.0 - rho) / (1.0 + rho)).max(1.0).min(m.max(1.0))
    }
}

/// A baseline made robustly from a version's checks.
#[derive(Debug, Clone, PartialEq)]
pub struct RobustRate {
    /// Errors (unrounded) and requests of the kept checks.
    pub errors: f64,
    pub requests: f64,
    /// Indices (into the input) of the checks left out as incidents.
    pub excluded: Vec<usize>,
    /// `None` with fewer than [`MIN_NOISE_CHECKS`] kept checks.
    pub noise: Option<Noise>,
}

/// The least persistence assumed for the swings between checks one baseline step apart:
/// twenty observations cannot tell a persistence of 0.5 from none at low counts, and real
/// error-rate swings last (SPEC §2b; the NAB series measured 0.4–0.9 at 30 s). Assuming
/// none where there is some makes a short span look more certain than it is.
pub const PERSISTENCE_FLOOR: f64 = 0.5;

/// Fewer kept checks than this: no dispersion estimate.
pub const MIN_NOISE_CHECKS: usize = 5;
/// Incident rule: a check is an incident when its errors exceed what the others predict
/// by this many standard deviations of their own noise, and at least double it.
const INCIDENT_Z: f64 = 4.0;
const INCIDENT_RATIO: f64 = 2.0;

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// A robust between-check relative variance: the spread of the checks' log rate ratios
/// (median absolute deviation, so incidents do not widen it), less the Poisson part.
/// `None` with too few checks that have errors to speak of.
fn robust_sigma2(checks: &[Counts], rate: f64) -> Option<f64> {
    let mut logs = Vec::new();
    let mut poisson = Vec::new();
    for c in checks {
        let mu = c.requests * rate;
        if mu >= 3.0 {
            logs.push(((c.errors + 0.5) / (mu + 0.5)).ln());
            poisson.push(1.0 / mu);
        }
    }
    if logs.len() < MIN_NOISE_CHECKS {
        return None;
    }
    let center = median(&mut logs.clone())?;
    let mut deviations: Vec<f64> = logs.iter().map(|l| (l - center).abs()).collect();
    let mad = median(&mut deviations)? * 1.4826;
    let poisson = median(&mut poisson)?;
    Some((mad * mad - poisson).max(0.0))
}

/// Method-of-moments noise of `checks` around `rate`: relative variance beyond Poisson,
/// and the lag-one correlation of the excesses.
fn moment_noise(checks: &[Counts], rate: f64) -> Option<Noise> {
    if checks.len() < MIN_NOISE_CHECKS || rate <= 0.0 {
        return None;
    }
    let mut num = 0.0;
    let mut den = 0.0;
    for c in checks {
        let mu = c.requests * rate;
        num += (c.errors - mu).powi(2) - mu;
        den += mu * mu;
    }
    if den <= 0.0 {
        return None;
    }
    let sigma2 = (num / den).clamp(0.0, 4.0);
    let mut cov = 0.0;
    let mut pairs = 0.0;
    let mut steps = Vec::new();
    for pair in checks.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let (mu_a, mu_b) = (a.requests * rate, b.requests * rate);
        cov += (a.errors - mu_a) * (b.errors - mu_b);
        pairs += mu_a * mu_b;
        steps.push(b.at - a.at);
    }
    let rho = if sigma2 > 1e-9 && pairs > 0.0 {
        (cov / pairs / sigma2).clamp(0.0, 0.95)
    } else {
        0.0
    };
    let step_seconds = median(&mut steps).unwrap_or(30.0).max(1.0);
    // Persistent swings around the sample's own mean understate their variance: over n
    // checks with lag-one correlation ρ, E[s²] ≈ σ² (1 − (1 + ρ) / ((1 − ρ) n)). Undo it
    // (bounded: at most a doubling).
    let n = checks.len() as f64;
    let shrink = 1.0 - (1.0 + rho) / ((1.0 - rho).max(0.05) * n);
    let sigma2 = (sigma2 / shrink.max(0.5)).min(4.0);
    Some(Noise {
        sigma2,
        rho,
        step_seconds,
    })
}

/// The checks whose `kept` flag is set.
fn kept_of(checks: &[Counts], kept: &[bool]) -> Vec<Counts> {
    checks
        .iter()
        .zip(kept)
        .filter(|(_, k)| **k)
        .map(|(c, _)| *c)
        .collect()
}

/// Errors and requests summed.
fn pooled(checks: &[Counts]) -> (f64, f64) {
    checks
        .iter()
        .fold((0.0, 0.0), |(e, n), c| (e + c.errors, n + c.requests))
}

/// The baseline a version's checks make (SPEC §2b, "robust baselines"): incidents left
/// out — checks whose errors exceed what the other checks predict by [`INCIDENT_Z`]
/// standard deviations of their noise and at least [`INCIDENT_RATIO`]×, at most a third of
/// the checks — and the rest summed unrounded, with their noise. `checks` in time order.
pub fn robust_rate(checks: &[Counts]) -> Option<RobustRate> {
    let total: f64 = checks.iter().map(|c| c.requests).sum();
    if checks.is_empty() || total <= 0.0 {
        return None;
    }
    let mut kept: Vec<bool> = vec![true; checks.len()];
    let max_excluded = checks.len() / 3;
    for _ in 0..3 {
        let kept_checks = kept_of(checks, &kept);
        let (e, n) = pooled(&kept_checks);
        let excluded_now = kept.iter().filter(|k| !**k).count();
        if n <= 0.0 || excluded_now >= max_excluded {
            break;
        }
        let rate = (e + 0.5) / n;
        let sigma2 = robust_sigma2(&kept_checks, rate)
            .or_else(|| moment_noise(&kept_checks, rate).map(|n| n.sigma2))
            .unwrap_or(0.0);
        // Incidents come in runs: every check of this pass that qualifies is left out, up
        // to the cap, worst first.
        let mut incidents: Vec<(usize, f64)> = checks
            .iter()
            .enumerate()
            .filter(|(i, _)| kept[*i])
            .filter_map(|(i, c)| {
                let mu = c.requests * rate;
                let z = (c.errors - mu) / (mu + mu * mu * sigma2).sqrt().max(1e-12);
                (z > INCIDENT_Z && c.errors / mu.max(1e-12) >= INCIDENT_RATIO).then_some((i, z))
            })
            .collect();
        if incidents.is_empty() {
            break;
        }
        incidents.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (i, _) in incidents.into_iter().take(max_excluded - excluded_now) {
            kept[i] = false;
        }
    }
    let kept_checks = kept_of(checks, &kept);
    let (errors, requests) = pooled(&kept_checks);
    if requests <= 0.0 {
        return None;
    }
    let rate = (errors + 0.5) / requests;
    let noise = moment_noise(&kept_checks, rate).map(|mut noise| {
        // The robust spread guards against a calm-looking sum of squares hiding nothing,
        // and the moments against a MAD of zero on quantised low counts: the larger.
        if let Some(robust) = robust_sigma2(&kept_checks, rate) {
            noise.sigma2 = noise.sigma2.max(robust);
        }
        noise
    });
    Some(RobustRate {
        errors,
        requests,
        excluded: kept
            .iter()
            .enumerate()
            .filter(|(_, k)| !**k)
            .map(|(i, _)| i)
            .collect(),
        noise,
    })
}

/// What the canary is compared with: the baseline's rate and how well it is known, and the
/// noise of checks around it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reference {
    /// Errors per request (never 0: half an error is added to the baseline's count).
    pub rate: f64,
    /// Relative variance of the rate's estimate (Poisson and the swings over the
    /// baseline's span).
    pub rate_relvar: f64,
    pub noise: Noise,
}

impl Reference {
    /// From the baseline's counts and noise; `sigma_floor` is the least swing assumed.
    pub fn new(
        errors: f64,
        requests: f64,
        noise: Noise,
        baseline_checks: f64,
        sigma_floor: f64,
    ) -> Option<Reference> {
        if !(requests > 0.0 && errors >= 0.0 && errors.is_finite() && requests.is_finite()) {
            return None;
        }
        let sigma2 = noise.sigma2.max(sigma_floor * sigma_floor);
        let noise = Noise { sigma2, ..noise };
        let effective = noise.effective(baseline_checks.max(1.0));
        Some(Reference {
            rate: (errors + 0.5) / requests,
            rate_relvar: 1.0 / (errors + 0.5) + sigma2 / effective,
            noise,
        })
    }
}

/// P(X ≥ x) for X negative-binomial (gamma-Poisson) with mean `mean` and variance
/// `mean + relvar × mean²`; `x` may be fractional (the regularized incomplete beta takes
/// real arguments).
pub fn gamma_poisson_at_least(x: f64, mean: f64, relvar: f64) -> f64 {
    if x.is_nan() || x <= 0.0 {
        return 1.0;
    }
    if mean.is_nan() || mean <= 0.0 || !mean.is_finite() {
        return 0.0;
    }
    let relvar = relvar.max(1e-8);
    let r = 1.0 / relvar;
    // P(X ≥ x) = I_{mean/(r+mean)}(x, r)
    let q = mean / (r + mean);
    statrs::function::beta::checked_beta_reg(x, r, q)
        .unwrap_or(1.0)
        .clamp(0.0, 1.0)
}

/// One check against `margin` × the reference, its swings and the reference's own
/// uncertainty counted: the p-value of its errors under "no worse than margin × baseline".
pub fn excess_with_noise(
    errors: f64,
    requests: f64,
    reference: &Reference,
    margin: f64,
) -> Option<ExcessErrors> {
    if requests.is_nan() || requests <= 0.0 || !(margin.is_finite() && margin > 0.0) {
        return None;
    }
    let expected = requests * reference.rate;
    let relvar = reference.noise.sigma2 + reference.rate_relvar;
    Some(ExcessErrors {
        p_value: gamma_poisson_at_least(errors.min(requests), margin * expected, relvar),
        expected,
    })
}

/// Which of a span's most extreme checks [`span_test`] leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trim {
    /// Only those that stand out against the span's own rate (the session: a steady
    /// excess at low counts keeps all its evidence).
    Outliers,
    /// The `trim` highest whatever they are (a short recent span: a dependency's bad
    /// two minutes must not fire it).
    Always,
}

/// How far above the span's own pooled rate (in standard deviations of the noise) a check
/// must be to be left out as one of its extremes.
const OUTLIER_Z: f64 = 2.5;

/// A span of checks judged together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpanTest {
    /// Errors seen and errors the baseline predicts, over the checks kept.
    pub errors: f64,
    pub expected: f64,
    pub requests: f64,
    /// Checks kept, and left out as the span's most extreme.
    pub checks: usize,
    pub trimmed: usize,
    /// errors / expected.
    pub ratio: f64,
    /// (errors − expected) / requests: the absolute excess error rate.
    pub excess_rate: f64,
    /// P(errors at least this | the canary is no worse than the baseline), with the
    /// baseline's swings, their persistence and its own uncertainty.
    pub p_value: f64,
}

/// Pools `checks` (time order) after leaving out the `trim` with the largest standardised
/// excess (`None` when nothing would be left), and tests the pooled errors against the reference (no margin: the practical
/// margin is applied to the estimate by the caller).
pub fn span_test(
    checks: &[Counts],
    reference: &Reference,
    trim: usize,
    how: Trim,
) -> Option<SpanTest> {
    let usable: Vec<Counts> = checks
        .iter()
        .copied()
        .filter(|c| c.requests > 0.0 && c.errors.is_finite())
        .collect();
    if usable.is_empty() {
        return None;
    }
    let sigma2 = reference.noise.sigma2;
    if usable.len() <= trim {
        return None;
    }
    // Up to `trim` checks are left out, the most extreme first — with `Trim::Outliers`
    // only those that are extreme against the span itself (its own pooled rate and the noise): a spike or two
    // never fires the statistic, while a steady excess at low counts, where no check
    // stands out, keeps all its evidence.
    let mut keep = vec![true; usable.len()];
    for _ in 0..trim {
        let (e, n) = pooled(&kept_of(&usable, &keep));
        if n <= 0.0 {
            break;
        }
        let own = (e + 0.5) / n;
        let worst = usable
            .iter()
            .enumerate()
            .filter(|(i, _)| keep[*i])
            .map(|(i, c)| {
                let mu = c.requests * own;
                (
                    i,
                    (c.errors - mu) / (mu + mu * mu * sigma2).sqrt().max(1e-12),
                )
            })
            .max_by(|a, b| a.1.total_cmp(&b.1));
        match worst {
            Some((i, z)) if how == Trim::Always || z > OUTLIER_Z => keep[i] = false,
            _ => break,
        }
    }
    let kept = kept_of(&usable, &keep);
    let errors: f64 = kept.iter().map(|c| c.errors.min(c.requests)).sum();
    let requests: f64 = kept.iter().map(|c| c.requests).sum();
    let expected = requests * reference.rate;
    // Var = Σμ + σ² ΣΣ μ_i μ_j ρ(t_i − t_j) + relvar(rate) (Σμ)²
    let mut swing = 0.0;
    for (i, a) in kept.iter().enumerate() {
        let mu_a = a.requests * reference.rate;
        swing += mu_a * mu_a;
        for b in kept.iter().skip(i + 1) {
            let correlation = reference.noise.correlation(b.at - a.at);
            // The checks are in time order and the correlation only decays: past this
            // it adds nothing (and a session of 2,048 checks stays linear, not quadratic).
            if correlation < 1e-9 {
                break;
            }
            let mu_b = b.requests * reference.rate;
            swing += 2.0 * mu_a * mu_b * correlation;
        }
    }
    let variance = expected + sigma2 * swing + reference.rate_relvar * expected * expected;
    let relvar = if expected > 0.0 {
        ((variance - expected) / (expected * expected)).max(0.0)
    } else {
        0.0
    };
    Some(SpanTest {
        errors,
        expected,
        requests,
        checks: kept.len(),
        trimmed: usable.len() - kept.len(),
        ratio: if expected > 0.0 {
            errors / expected
        } else {
            0.0
        },
        excess_rate: if requests > 0.0 {
            (errors - expected) / requests
        } else {
            0.0
        },
        p_value: gamma_poisson_at_least(errors, expected, relvar),
    })
}

/// The significance a statistic must reach at its `look`-th look (from 1) so that the
/// chance of ever crossing by luck, over unlimited looks, is at most `alpha` (a union
/// bound: valid whatever the dependence between looks). Half of α is spent evenly over
/// the `planned` looks (the grace period's checks), α / (2 × planned) each; the other half
/// over the looks after them, (α / 2) × planned / (t (t + 1)), which sums to less than α / 2.
pub fn spent_alpha(alpha: f64, look: u64, planned: u64) -> f64 {
    let t = look.max(1) as f64;
    let h = planned.max(1) as f64;
    if t <= h {
        alpha / (2.0 * h)
    } else {
        alpha / 2.0 * h / (t * (t + 1.0))
    }
}

/// Theil–Sen slope of `(x, y)` points: the median of the pairwise slopes (robust to a
/// third of the points being wild). `None` with fewer than two distinct x.
pub fn theil_sen(points: &[(f64, f64)]) -> Option<f64> {
    let mut slopes = Vec::with_capacity(points.len() * points.len() / 2);
    for (i, a) in points.iter().enumerate() {
        for b in &points[i + 1..] {
            let dx = b.0 - a.0;
            if dx.abs() > 1e-9 {
                slopes.push((b.1 - a.1) / dx);
            }
        }
    }
    median(&mut slopes)
}

/// Robust standard deviation (MAD × 1.4826) of `values`.
pub fn robust_sd(values: &[f64]) -> Option<f64> {
    let mut values: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    let center = median(&mut values)?;
    let mut deviations: Vec<f64> = values.iter().map(|v| (v - center).abs()).collect();
    Some(median(&mut deviations)? * 1.4826)
}

/// The median of `values` (finite ones).
pub fn median_of(values: &[f64]) -> Option<f64> {
    let mut values: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    median(&mut values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1e-300)
    }

    #[test]
    fn binomial_tail_matches_closed_forms() {
        // P(X ≥ 1) = 1 − (1 − p)^n
        assert!(close(
            binomial_at_least(1, 40, 0.01),
            1.0 - 0.99f64.powi(40),
            1e-9
        ));
        // P(X ≥ n) = p^n
        assert!(close(binomial_at_least(5, 5, 0.3), 0.3f64.powi(5), 1e-9));
        assert_eq!(binomial_at_least(0, 10, 0.5), 1.0);
        assert_eq!(binomial_at_least(11, 10, 0.5), 0.0);
        assert_eq!(binomial_at_least(3, 10, 0.0), 0.0);
        // Symmetry: P(X ≥ 6 | n = 10, p = ½) = 386/1024
        assert!(close(binomial_at_least(6, 10, 0.5), 386.0 / 1024.0, 1e-9));
        // Large n stays finite and monotone.
        let a = binomial_at_least(60, 5_000, 0.006);
        let b = binomial_at_least(61, 5_000, 0.006);
        assert!(a > b && b > 0.0 && a < 1e-5, "{a} {b}");
    }

    /// The examples SPEC §2a gives.
    #[test]
    fn spec_examples() {
        // 1 error in 40 requests against a 0.5% baseline is not a breach...
        let blip = excess_over_rate(1, 40, 0.005, 2.0).unwrap();
        assert!(blip.p_value > 0.3, "{blip:?}");
        // ...while 60 errors in 5,000 against 0.3% is.
        let bad = excess_over_rate(60, 5_000, 0.003, 2.0).unwrap();
        assert!(bad.p_value < 1e-6, "{bad:?}");
        assert!(close(bad.expected, 15.0, 1e-9));
    }

    /// 0 errors in 400 baseline requests is not a 0% rate: 1 error in 40 canary requests
    /// is unremarkable, 6 are not.
    #[test]
    fn the_baseline_uncertainty_counts() {
        let one = excess_over_counts(1, 40, 0, 400, 2.0).unwrap();
        assert!(one.p_value > 0.1, "{one:?}");
        let six = excess_over_counts(6, 40, 0, 400, 2.0).unwrap();
        assert!(six.p_value < 0.001, "{six:?}");
        // The same 6 errors against a rate-only 0% baseline would be "impossible"; with
        // counts the p-value is finite and honest.
        assert!(six.p_value > 0.0);
    }

    #[test]
    fn a_canary_no_worse_than_the_baseline_is_not_flagged() {
        // 1% baseline over 20,000 requests; the canary at 1% over 1,000.
        let same = excess_over_counts(10, 1_000, 200, 20_000, 2.0).unwrap();
        assert!(same.p_value > 0.9, "{same:?}");
        // At 3% it is.
        let worse = excess_over_counts(30, 1_000, 200, 20_000, 2.0).unwrap();
        assert!(worse.p_value < 0.05, "{worse:?}");
    }

    #[test]
    fn nothing_to_judge_is_none() {
        assert_eq!(excess_over_counts(0, 0, 1, 100, 2.0), None);
        assert_eq!(excess_over_counts(1, 10, 0, 0, 2.0), None);
        assert_eq!(excess_over_rate(1, 0, 0.01, 2.0), None);
        assert_eq!(excess_over_rate(1, 10, f64::NAN, 2.0), None);
        assert_eq!(errors_of(0.025, 40.0), 1);
    }

    fn counts(rates: &[f64], requests: f64) -> Vec<Counts> {
        rates
            .iter()
            .enumerate()
            .map(|(i, r)| Counts {
                at: 30.0 * i as f64,
                errors: r * requests,
                requests,
            })
            .collect()
    }

    /// The gamma-Poisson tail is the Poisson tail when the swing is negligible, and its
    /// closed form P(X ≥ 1) = 1 − (r / (r + μ))^r otherwise.
    #[test]
    fn the_gamma_poisson_tail_matches_closed_forms() {
        // Poisson(2): P(X ≥ 1) = 1 − e^-2, P(X ≥ 3) = 1 − e^-2 (1 + 2 + 2)
        let e2 = (-2.0f64).exp();
        assert!(close(
            gamma_poisson_at_least(1.0, 2.0, 1e-9),
            1.0 - e2,
            1e-6
        ));
        assert!(close(
            gamma_poisson_at_least(3.0, 2.0, 1e-9),
            1.0 - e2 * 5.0,
            1e-6
        ));
        // relvar 0.5 (r = 2), mean 4: P(X ≥ 1) = 1 − (2/6)^2
        assert!(close(
            gamma_poisson_at_least(1.0, 4.0, 0.5),
            1.0 - (1.0f64 / 3.0).powi(2),
            1e-9
        ));
        assert_eq!(gamma_poisson_at_least(0.0, 4.0, 0.5), 1.0);
        assert_eq!(gamma_poisson_at_least(f64::NAN, 4.0, 0.5), 1.0);
        assert_eq!(gamma_poisson_at_least(3.0, 0.0, 0.5), 0.0);
        // Fractional counts lie between their neighbours.
        let (a, b, c) = (
            gamma_poisson_at_least(3.0, 2.0, 0.1),
            gamma_poisson_at_least(3.4, 2.0, 0.1),
            gamma_poisson_at_least(4.0, 2.0, 0.1),
        );
        assert!(a > b && b > c, "{a} {b} {c}");
    }

    /// SPEC §2b: at 50,000 requests a check at 2.2× a 1% baseline breaches "× 2" under the
    /// binomial model (p < 0.05); with the baseline's ±30% swings it is unremarkable, while
    /// 6× is not.
    #[test]
    fn large_counts_do_not_turn_wobbles_into_certainty() {
        let reference = Reference::new(
            1000.0,
            100_000.0,
            Noise {
                sigma2: 0.09,
                rho: 0.5,
                step_seconds: 30.0,
            },
            20.0,
            0.1,
        )
        .unwrap();
        let binomial = excess_over_counts(1100, 50_000, 1000, 100_000, 2.0).unwrap();
        assert!(binomial.p_value < 0.05, "{binomial:?}");
        let noisy = excess_with_noise(1100.0, 50_000.0, &reference, 2.0).unwrap();
        assert!(noisy.p_value > 0.2, "{noisy:?}");
        let bad = excess_with_noise(3000.0, 50_000.0, &reference, 2.0).unwrap();
        assert!(bad.p_value < 0.01, "{bad:?}");
    }

    /// The baseline's incidents are left out (and its errors summed unrounded); its noise
    /// and persistence come from the rest.
    #[test]
    fn a_robust_baseline_leaves_out_an_incident_and_keeps_fractional_errors() {
        let mut rates = vec![0.01, 0.012, 0.009, 0.011, 0.0105, 0.0095, 0.01, 0.0115];
        rates.extend([0.08, 0.09, 0.085]); // a dependency's bad minute and a half
        rates.extend([0.01, 0.0098, 0.0102, 0.011, 0.009]);
        let robust = robust_rate(&counts(&rates, 2000.0)).unwrap();
        assert_eq!(robust.excluded, vec![8, 9, 10]);
        let rate = robust.errors / robust.requests;
        assert!((rate - 0.0102).abs() < 0.0005, "{rate}");
        let noise = robust.noise.unwrap();
        assert!(noise.sigma2 < 0.05, "{noise:?}");
        // Without exclusion the incident would have tripled the rate.
        let naive: f64 = rates.iter().sum::<f64>() / rates.len() as f64;
        assert!(naive > 0.02);

        // 10% at 4 requests per observation is 0.4 errors each, not 0.
        let tiny = robust_rate(&counts(&[0.1; 10], 4.0)).unwrap();
        assert!(close(tiny.errors, 4.0, 1e-9), "{tiny:?}");
        assert!(tiny.excluded.is_empty());
    }

    /// A version whose rate swings and whose swings last gets a large dispersion and a
    /// persistence near what made it.
    #[test]
    fn the_noise_is_estimated_from_the_checks() {
        // Slow swings: ln rate = ln 1% + 0.3 sin(2πi/12) at high counts — a relative
        // variance of about 0.05, lag-one correlation cos(2π/12) ≈ 0.87.
        let rates: Vec<f64> = (0..24)
            .map(|i| 0.01 * (0.3 * (std::f64::consts::TAU * i as f64 / 12.0).sin()).exp())
            .collect();
        let robust = robust_rate(&counts(&rates, 100_000.0)).unwrap();
        let noise = robust.noise.unwrap();
        assert!(noise.sigma2 > 0.03 && noise.sigma2 < 0.15, "{noise:?}");
        assert!(noise.rho > 0.6, "{noise:?}");
        assert!(close(noise.step_seconds, 30.0, 1e-9));
        // Calm binomial-looking checks: no swing beyond Poisson.
        let calm = robust_rate(&counts(&[0.01; 12], 10_000.0)).unwrap();
        assert!(calm.noise.unwrap().sigma2 < 1e-6, "{calm:?}");
    }

    /// A span's extremes are left out; the variance counts the swings' persistence (more
    /// correlated checks are worth fewer independent ones).
    #[test]
    fn span_tests_trim_and_count_persistence() {
        let noise = |rho| Noise {
            sigma2: 0.09,
            rho,
            step_seconds: 30.0,
        };
        let reference = |rho| Reference::new(1000.0, 100_000.0, noise(rho), 20.0, 0.1).unwrap();
        // Two spikes among eight normal checks: trimmed away entirely.
        let mut rates = vec![0.01; 8];
        rates[2] = 0.2;
        rates[6] = 0.3;
        let spiky = span_test(&counts(&rates, 5000.0), &reference(0.0), 2, Trim::Outliers).unwrap();
        assert_eq!((spiky.checks, spiky.trimmed), (6, 2));
        assert!(
            close(spiky.ratio, 0.01 / reference(0.0).rate, 1e-6),
            "{spiky:?}"
        );
        // A steady 1.8×: persistence makes the same evidence weaker.
        let steady = counts(&[0.018; 10], 20_000.0);
        let independent = span_test(&steady, &reference(0.0), 2, Trim::Outliers).unwrap();
        let persistent = span_test(&steady, &reference(0.8), 2, Trim::Outliers).unwrap();
        assert!(independent.p_value < persistent.p_value);
        assert!(persistent.p_value < 0.5);
        assert_eq!(
            span_test(
                &counts(&[0.5, 0.5], 100.0),
                &reference(0.0),
                2,
                Trim::Always
            ),
            None
        );
    }

    #[test]
    fn the_spent_alpha_sums_to_alpha_and_shrinks() {
        let total: f64 = (1..1_000_000).map(|t| spent_alpha(0.01, t, 20)).sum();
        // α/2 + (α/2) × 20/21: under α, whatever the number of looks.
        assert!(total < 0.01 && total > 0.0097, "{total}");
        assert_eq!(spent_alpha(0.01, 3, 20), spent_alpha(0.01, 20, 20));
        assert!(spent_alpha(0.01, 40, 20) < spent_alpha(0.01, 20, 20));
    }

    #[test]
    fn theil_sen_ignores_a_third_of_wild_points() {
        let mut points: Vec<(f64, f64)> =
            (0..12).map(|i| (i as f64, 2.0 * i as f64 + 5.0)).collect();
        points[3].1 = 90.0;
        points[7].1 = -40.0;
        points[10].1 = 0.0;
        assert!(close(theil_sen(&points).unwrap(), 2.0, 1e-9));
        assert_eq!(theil_sen(&[(1.0, 1.0)]), None);
    }
}
