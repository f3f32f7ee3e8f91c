//! Time as data: the one place that turns milliseconds into times and back, and builds
//! deadlines that cannot overflow. Nothing here reads a clock.
//!
//! `Instant + Duration` panics when the sum leaves the clock's range; configured durations
//! are bounded at load (`config::duration_max`), but a deadline is computed in places a
//! panic would leave a rollback half done, so every deadline is built here instead: past
//! the clock's range it saturates to the latest instant that can be represented.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The time of an event, on both clocks: `mono` for deadlines, `wall` for records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
}

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

/// `at + by`, saturating far in the future instead of panicking.
pub fn add(at: SystemTime, by: Duration) -> SystemTime {
    at.checked_add(by).unwrap_or_else(|| from_ms(i64::MAX / 2))
}

/// `at - by`, saturating at the Unix epoch.
pub fn sub(at: SystemTime, by: Duration) -> SystemTime {
    at.checked_sub(by).unwrap_or(UNIX_EPOCH).max(UNIX_EPOCH)
}

/// Unix time in milliseconds (0 before the epoch, as `rollbackd.db` stores it).
pub fn to_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the Unix epoch (a negative stored value is the epoch).
pub fn from_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// How long from `from` to `to`, in stored milliseconds; zero when `to` is earlier.
pub fn ms_between(from: i64, to: i64) -> Duration {
    Duration::from_millis(to.saturating_sub(from).max(0) as u64)
}

/// A duration as people write it (`1m 30s`), for messages.
pub fn show(duration: Duration) -> String {
    humantime::format_duration(duration).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflowing_deadline_saturates_instead_of_panicking() {
        let base = Instant::now();
        let far = deadline(base, Duration::MAX);
        assert!(far > base + Duration::from_secs(365 * 86_400));
        assert_eq!(
            deadline(base, Duration::from_secs(5)),
            base + Duration::from_secs(5)
        );
    }

    #[test]
    fn milliseconds_round_trip_and_clamp() {
        assert_eq!(to_ms(from_ms(1_700_000_000_123)), 1_700_000_000_123);
        assert_eq!(from_ms(-5), UNIX_EPOCH);
        assert_eq!(ms_between(10, 5), Duration::ZERO);
        assert_eq!(ms_between(5, 10), Duration::from_millis(5));
        assert_eq!(sub(from_ms(10), Duration::from_secs(3600)), UNIX_EPOCH);
        assert!(add(from_ms(0), Duration::MAX) > from_ms(1_700_000_000_000));
    }
}
