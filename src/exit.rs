//! Exit statuses (SPEC §6) and the error that means "refused" (exit 3).

pub const SUCCESS: u8 = 0;
pub const FAILURE: u8 = 1;
pub const USAGE: u8 = 2;
pub const REFUSED: u8 = 3;
pub const CONFIG: u8 = 78;

/// A command was refused: a precondition is not met, or the operator declined (exit 3).
#[derive(Debug, thiserror::Error)]
#[error("refused: {0}")]
pub struct Refused(pub String);
