//! Deadlines that cannot overflow.
//!
//! `Instant + Duration` panics when the sum leaves the clock's range. Configured durations
//! are bounded at load (`config::duration_max`), but a deadline is computed in places a
//! panic would leave a rollback half done, so every deadline is built here instead: past
//! the clock's range it saturates to the latest instant that can be represented.

use std::time::{Duration, Instant};

/// `start + after`, or the latest representable instant when that overflows.
pub fn deadline(start: Instant, after: Duration) -> Instant {
    if let Some(at) = start.checked_add(after) {
        return at;
    }
    // Find the largest addable span by halving; at most ~64 steps, only on overflow.
    let mut at = start;
    let mut step = after;
    while !step.is_zero() {
        match at.checked_add(step) {
            Some(next) => at = next,
            None => step /= 2,
        }
    }
    at
}

/// [`deadline`] for tokio's clock.
pub fn deadline_tokio(start: tokio::time::Instant, after: Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(deadline(start.into_std(), after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflowing_deadline_saturates_instead_of_panicking() {
        let now = Instant::now();
        let far = deadline(now, Duration::MAX);
        assert!(far > now + Duration::from_secs(365 * 86_400));
        assert_eq!(
            deadline(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        let tokio_far = deadline_tokio(tokio::time::Instant::now(), Duration::MAX);
        assert!(tokio_far > tokio::time::Instant::now());
    }
}
