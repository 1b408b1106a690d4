//! Locks whose poisoning stops the node. A lock is poisoned when a thread panicked while
//! holding it: the state it guards may be half-changed (a fence raised but not its gate,
//! a region turn taken and never given back, a lease recorded for a copy no longer
//! ACTIVE). Going on with it could serve stale data or apply a deposed owner's write, so
//! the node logs why and stops at once, as a `kill -9` would stop it: the protocol is
//! built to survive exactly that (its volumes are taken by other nodes, it recovers its
//! store at the next start). The owner's replication state is the one exception
//! (`replicated::view`): a poisoned owner state deposes that one view instead.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Stops the process: `what` was left half-changed by a panic.
fn stop(what: &str) -> ! {
    tracing::error!("a panic left {what} half-changed: stopping this node");
    eprintln!("strata: a panic left {what} half-changed: stopping this node");
    std::process::abort()
}

/// `lock()` that stops the node when the mutex is poisoned.
pub trait Locked<T> {
    /// The guard; `what` names the state for the log.
    fn locked(&self, what: &str) -> MutexGuard<'_, T>;
}

impl<T> Locked<T> for Mutex<T> {
    fn locked(&self, what: &str) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|_| stop(what))
    }
}

/// `read()` and `write()` that stop the node when the lock is poisoned.
pub trait RwLocked<T> {
    /// A shared guard.
    fn read_locked(&self, what: &str) -> RwLockReadGuard<'_, T>;
    /// The exclusive guard.
    fn write_locked(&self, what: &str) -> RwLockWriteGuard<'_, T>;
}

impl<T> RwLocked<T> for RwLock<T> {
    fn read_locked(&self, what: &str) -> RwLockReadGuard<'_, T> {
        self.read().unwrap_or_else(|_| stop(what))
    }
    fn write_locked(&self, what: &str) -> RwLockWriteGuard<'_, T> {
        self.write().unwrap_or_else(|_| stop(what))
    }
}
