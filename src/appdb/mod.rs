//! The application's database, which is the application's (SPEC §4): its `settings`
//! table ([`settings`]), the kill switch in it ([`killswitch`]) and the flag reader
//! applications link ([`flags`]), woken by the kernel on writes ([`wakeup`]).

pub mod flags;
pub mod killswitch;
pub mod settings;
pub mod wakeup;
