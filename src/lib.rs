//! rollbackd: guards a host after a canary promotion.
//!
//! See `docs/ARCHITECTURE.md` for the codemap and the invariants.

pub mod adapters;
pub mod alerts;
pub mod audit;
pub mod check;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod core;
pub mod daemon;
pub mod engine;
pub mod exit;
pub mod fdlimit;
pub mod flags;
pub mod hooks;
pub mod http;
pub mod killswitch;
pub mod metrics;
pub mod notify;
pub mod service;
pub mod settings;
pub mod simulate;
pub mod statedir;
pub mod store;
pub mod sys;
pub mod text;
pub mod trace;
