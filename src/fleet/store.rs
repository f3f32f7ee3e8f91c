//! The fleet store as a trait: the few operations of a distributed key-value store with
//! leases and watches that the fleet needs (SPEC §8). The one implementation is etcd v3
//! ([`super::etcd::EtcdGateway`]); the trait keeps the daemon and the CLI independent of
//! how it is reached.

use std::time::Duration;

use crate::adapters::BoxFuture;

/// One key's value and the store revision that last changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    /// The revision of the last change to this key (etcd `mod_revision`).
    pub mod_revision: i64,
    /// The lease the key is attached to (0: none).
    pub lease: LeaseId,
}

/// What [`FleetStore::claim`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is written under the lease, at this revision.
    Written(i64),
    /// Another lease holds the key (another instance wrote it): left as it is.
    Held(Kv),
    /// The key is gone although it was this lease's (the lease expired): not written.
    Lost,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(Kv),
    /// The key was deleted at `revision` (a lease that expired deletes its keys).
    Delete {
        key: String,
        revision: i64,
    },
}

/// A lease (etcd `ID`).
pub type LeaseId = i64;

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FleetError {
    /// No endpoint answered (refused, timed out, reset): the host is cut off.
    #[error("etcd unreachable: {0}")]
    Unreachable(String),
    /// An endpoint answered with an error.
    #[error("etcd refused the request: {0}")]
    Server(String),
    /// This host's own credentials cannot be used: a TLS or password file missing,
    /// unreadable or not PEM, or a password etcd refuses. Unlike `Unreachable`, nothing
    /// is wrong with etcd, and mending the files mends it.
    #[error("the fleet credentials cannot be used: {0}")]
    Credentials(String),
    /// The lease is gone (expired, revoked): keys written with it were deleted.
    #[error("the lease {0} has expired")]
    LeaseExpired(LeaseId),
    /// The watch ended (the server closed the stream, or it was compacted past).
    #[error("the watch ended: {0}")]
    WatchEnded(String),
    /// This host's name is registered by another running instance (a live lease): the
    /// host does not join under it. The text says which and what to do.
    #[error("{0}")]
    NameTaken(String),
}

/// An open watch: changes in revision order.
pub trait Watch: Send {
    /// The next batch of changes; an error ends the watch (open a new one from the last
    /// revision seen + 1, which loses nothing while the history is not compacted).
    fn next(&mut self) -> BoxFuture<'_, Result<Vec<WatchEvent>, FleetError>>;
}

/// The operations the fleet needs from its store.
pub trait FleetStore: Send + Sync {
    /// The value of `key` and the store's current revision.
    fn get(&self, key: &str) -> BoxFuture<'_, Result<(Option<Kv>, i64), FleetError>>;
    /// Every key starting with `prefix`, and the store's current revision.
    fn list(&self, prefix: &str) -> BoxFuture<'_, Result<(Vec<Kv>, i64), FleetError>>;
    /// Writes `key`; returns the previous value (if any) and the new revision.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> BoxFuture<'_, Result<(Option<Kv>, i64), FleetError>>;
    /// Writes `key` under `lease` only if it is free or already `lease`'s — one etcd
    /// transaction comparing the key's lease, so an instance never overwrites (and its
    /// lease's end never deletes) a key another instance holds. With `create`, a missing
    /// key is written (a first registration); without it, a missing key is
    /// [`Claim::Lost`] (it was ours, and our lease ended).
    fn claim(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: LeaseId,
        create: bool,
    ) -> BoxFuture<'_, Result<Claim, FleetError>>;
    /// A new lease of `ttl`.
    fn grant(&self, ttl: Duration) -> BoxFuture<'_, Result<LeaseId, FleetError>>;
    /// Renews `lease`; [`FleetError::LeaseExpired`] when it is gone.
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<Duration, FleetError>>;
    /// Ends `lease` now (its keys are deleted).
    fn revoke(&self, lease: LeaseId) -> BoxFuture<'_, Result<(), FleetError>>;
    /// Watches `key` (or every key under it when `prefix`) from `start_revision`.
    fn watch(
        &self,
        key: &str,
        prefix: bool,
        start_revision: i64,
    ) -> BoxFuture<'_, Result<Box<dyn Watch>, FleetError>>;
}
