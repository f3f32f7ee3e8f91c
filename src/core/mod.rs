//! The pure core: decisions without I/O. Nothing under `src/core/` reads a clock, touches
//! a file, a socket or a database, or imports tokio or rusqlite (`tests/core_purity.rs`
//! fails if it does). Time and every observation are inputs; what to do is output.
//!
//! - [`baseline`]: where a session's baseline comes from, and the history it is made of.
//! - [`check`]: what one health check observed (probe, snapshot, resources), as data.
//! - [`engine`]: the windowed rules: checks in, a verdict with its evidence out.
//! - [`incident`]: the incident report after a rollback or an escalation, from recorded facts.
//! - [`stats`]: the baseline rule's tests on counts (exact binomial).
//! - [`trace`]: the `simulate` trace format, parsed into checks.
//! - [`supervisor`]: the monitoring policy as one state machine (`handle` / `poll_timeout`
//!   / `poll_effect`), run by the daemon, by `simulate` and by the tests.
//! - [`time`]: time as data (milliseconds, saturating deadlines).

pub mod baseline;
pub mod check;
pub mod engine;
pub mod incident;
pub mod stats;
pub mod supervisor;
pub mod time;
pub mod trace;

pub use supervisor::{Effect, Input, Settings, Supervisor};
pub use time::Now;
