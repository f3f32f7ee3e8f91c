//! rollbackd: guards a host after a canary promotion.
//!
//! See `docs/ARCHITECTURE.md` for the codemap and the invariants.

pub mod adapters;
pub mod audit;
pub mod check;
pub mod cli;
pub mod cmd_flags;
pub mod config;
pub mod daemon;
pub mod engine;
pub mod flags;
pub mod killswitch;
pub mod settings;
pub mod simulate;
pub mod store;
pub mod trace;
