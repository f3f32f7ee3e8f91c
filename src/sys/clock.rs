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

/// The local time's offset from UTC at `at`, in seconds east (the `TZ` variable or
/// `/etc/localtime`, as `date` reads them); 0 when it cannot be found.
pub fn utc_offset_seconds(at: std::time::SystemTime) -> i32 {
    let secs = crate::core::time::to_ms(at) / 1000;
    let t = secs as libc::time_t;
    extern "C" {
        fn tzset();
    }
    // SAFETY: localtime_r only writes into the tm we own; tzset reads the environment.
    unsafe {
        tzset();
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&t, &mut tm).is_null() {
            return 0;
        }
        i32::try_from(tm.tm_gmtoff).unwrap_or(0)
    }
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
