//! An async handle on the daemon's [`Store`]: every call runs on the blocking pool, so
//! SQLite never blocks the async runtime.

use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::storage::store::{Store, StoreError};

#[derive(Clone)]
pub struct Db {
    store: Arc<Mutex<Store>>,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, StoreError> {
        Ok(Db {
            store: Arc::new(Mutex::new(Store::open(path)?)),
        })
    }

    /// Runs `f` with the store on the calling thread: only for code that already runs on
    /// the blocking pool (so a check's row and its audit line share one hop).
    pub fn call_here<R>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let mut guard = self
            .store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut guard)
    }

    /// Runs `f` with the store on the blocking pool.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock poisons it; the data is still consistent
            // (SQLite transactions), so keep going.
            let mut guard = store
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut guard)
        })
        .await
        .expect("store call panicked")
    }
}
