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

/// A count from a rate and a number of requests, as the snapshot gives them (the rate is
/// errors / requests, rounded by whoever computed it).
pub fn errors_of(rate: f64, requests: f64) -> u64 {
    (rate * requests).round().max(0.0) as u64
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
}
