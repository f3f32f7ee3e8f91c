//! rollbackd: guards a host after a canary promotion.
//!
//! See `docs/ARCHITECTURE.md` for the codemap and the invariants. The layers, from the
//! bottom: [`core`] (pure decisions), [`storage`] (rollbackd's own records), [`appdb`]
//! (the application's database), [`sys`] (processes and OS limits), [`adapters`]
//! (probes), [`control`] (the socket), [`daemon`] (the effect runner), [`cli`].

pub mod adapters;
pub mod appdb;
pub mod cli;
pub mod config;
pub mod control;
pub mod core;
pub mod daemon;
pub mod exit;
pub mod fleet;
pub mod storage;
pub mod sys;
pub mod text;

/// The library API for applications (`rollbackd::flags::LiveFlags`), kept at its
/// documented path.
pub use appdb::flags;
