//! What rollbackd asks of the operating system beyond files and sockets: finding and
//! signalling processes it started in an earlier life (`procs`).

pub mod procs;
