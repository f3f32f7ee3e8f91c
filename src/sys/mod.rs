//! What rollbackd asks of the operating system beyond files and sockets: child processes
//! with a time limit ([`hooks`]), finding a dead daemon's hook again ([`procs`]), file
//! descriptor limits ([`fdlimit`]) and tokio deadlines ([`clock`]).

pub mod child;
pub mod clock;
pub mod fdlimit;
pub mod hooks;
pub mod procs;
