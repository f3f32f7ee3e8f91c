//! Deadlines that cannot overflow, for tokio's clock ([`crate::core::time::deadline`] for std's).
//!
//! `Instant + Duration` panics when the sum leaves the clock's range. Configured durations
//! are bounded at load (`config::duration_max`), but a deadline is computed in places a
//! panic would leave a rollback half done, so every deadline is built here instead: past
//! the clock's range it saturates to the latest instant that can be represented.

use std::time::Duration;

pub use crate::core::time::deadline;

/// [`deadline`] for tokio's clock.
pub fn deadline_tokio(start: tokio::time::Instant, after: Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(deadline(start.into_std(), after))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflowing_tokio_deadline_saturates_instead_of_panicking() {
        let tokio_far = deadline_tokio(tokio::time::Instant::now(), Duration::MAX);
        assert!(tokio_far > tokio::time::Instant::now());
    }
}
