//! The daemon: one driver task owns the engine and the session.

pub mod db;
pub mod recorder;
