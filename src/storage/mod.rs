//! rollbackd's own records: `rollbackd.db` ([`store`]: sessions, checks, actions, the
//! outbox; the names it stores are the enums of [`states`]), the JSON files under
//! `analytics/` ([`audit`], one struct per audit event in [`events`]) and the state
//! directory with its lock ([`statedir`]).

pub mod audit;
pub mod events;
pub mod statedir;
pub mod states;
pub mod store;
