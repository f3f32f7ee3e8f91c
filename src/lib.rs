//! rollbackd: guards a host after a canary promotion.
//!
//! See `docs/ARCHITECTURE.md` for the codemap and the invariants.

pub mod check;
pub mod cmd_flags;
pub mod engine;
pub mod flags;
pub mod settings;
