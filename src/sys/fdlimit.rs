//! The daemon's file-descriptor budget (RLIMIT_NOFILE).
//!
//! systemd's default soft limit is 1024. At start-up the daemon raises its soft limit to
//! the hard limit (the unit sets `LimitNOFILE=65536`), and whatever the limit ends up
//! being, [`RESERVE`] descriptors are kept out of reach of the operator surfaces so the
//! switch hook's pipes, the SQLite files, the health probes and the control socket always
//! get theirs: the HTTP endpoint takes at most `min(64, (soft - RESERVE) / 2)` connections
//! (see [`crate::daemon::http::connection_cap`]) and the control socket at most
//! [`crate::control::MAX_CONNECTIONS`].

use std::io;

/// Descriptors never handed to HTTP connections: what the daemon itself needs (hooks,
/// SQLite, probes, alerts, audit files, the runtime) with a wide margin.
pub const RESERVE: u64 = 256;

/// RLIMIT_NOFILE: the soft limit (what applies) and the hard limit (how far an
/// unprivileged process may raise it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoFile {
    pub soft: u64,
    pub hard: u64,
}

/// The current limit.
// rlim_t is u64 here but not on every target.
#[allow(clippy::useless_conversion)]
pub fn current() -> io::Result<NoFile> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(NoFile {
        soft: u64::from(limit.rlim_cur),
        hard: u64::from(limit.rlim_max),
    })
}

/// Raises the soft limit to the hard limit; returns the limit before and after.
pub fn raise_soft_to_hard() -> io::Result<(NoFile, NoFile)> {
    let before = current()?;
    if before.soft >= before.hard {
        return Ok((before, before));
    }
    let limit = libc::rlimit {
        rlim_cur: before.hard as libc::rlim_t,
        rlim_max: before.hard as libc::rlim_t,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((before, current()?))
}
