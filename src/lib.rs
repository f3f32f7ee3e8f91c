//! rollbackd: guards a host after a canary promotion.
//!
//! See `docs/ARCHITECTURE.md` for the codemap and the invariants.

pub mod audit;
pub mod check;
pub mod cli;
pub mod config;
pub mod control;
pub mod engine;
pub mod hooks;
pub mod notify;
pub mod simulate;
pub mod store;
pub mod trace;
