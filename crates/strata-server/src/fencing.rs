//! A node's epoch fences, durable and atomic with the requests they admit.
//!
//! Every request on a component (from a remote owner over the data plane, or the owner's
//! own copy on this node) enters through [`Fencing::enter`] and holds the returned pass
//! while it applies.
//!
//! Invariants:
//! 1. A request at an epoch below the component's fence is refused (`fence.rs`).
//! 2. A request that raises the fence applies only after the raised fences are durable
//!    (file `DIR/fences`, replaced atomically): a crash never lowers a fence below an
//!    epoch whose request was applied.
//! 3. Admitting and applying are one step as far as a raise is concerned: a raise waits
//!    for every request holding a pass to finish (a per-component gate: passes are
//!    shared, a raise is exclusive). So once a request at epoch `e` has been admitted
//!    (a new owner's first digest, say), no request below `e` applies afterwards — not
//!    even one admitted before the raise and still in flight.

use crate::poison::Locked;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use strata_replica::fence::{Admit, Fences};
use tokio::sync::RwLock;

/// Held while an admitted request applies.
pub type Pass = tokio::sync::OwnedRwLockReadGuard<()>;

/// Why a request was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Its epoch is below the fence, which is this.
    Stale(u64),
    /// The raised fence could not be made durable.
    Io,
}

/// The fences of one node's components.
pub struct Fencing {
    dir: PathBuf,
    fences: Mutex<Fences>,
    gates: Mutex<HashMap<u64, Arc<RwLock<()>>>>,
}

impl Fencing {
    /// Loads the fences of the node whose data directory is `dir` (none yet: all zero).
    pub fn load(dir: &std::path::Path) -> anyhow::Result<Fencing> {
        let path = dir.join("fences");
        let fences = match std::fs::read_to_string(&path) {
            Ok(text) => Fences::decode(&text).map_err(|e| {
                anyhow::anyhow!("{} is damaged ({e}); it must not be guessed", path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Fences::default(),
            Err(e) => anyhow::bail!("read {}: {e}", path.display()),
        };
        Ok(Fencing { dir: dir.to_owned(), fences: Mutex::new(fences), gates: Mutex::default() })
    }

    fn gate(&self, component: u64) -> Arc<RwLock<()>> {
        let mut gates = self.gates.locked("the fence gates");
        gates.entry(component).or_default().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fences> {
        self.fences.locked("the epoch fences")
    }

    /// The fence of `component`: the newest epoch it has seen (0: none yet).
    pub fn newest(&self, component: u64) -> u64 {
        self.lock().newest(component)
    }

    /// Admits a request on `component` at `epoch` (the invariants above).
    pub async fn enter(&self, component: u64, epoch: u64) -> Result<Pass, Refused> {
        let gate = self.gate(component);
        let pass = gate.clone().read_owned().await;
        let fence = self.lock().newest(component);
        if epoch < fence {
            return Err(Refused::Stale(fence));
        }
        if epoch == fence {
            return Ok(pass);
        }
        drop(pass);
        let raise = gate.write_owned().await;
        let mut fences = self.lock();
        let before = fences.clone();
        match fences.admit(component, epoch) {
            Err(stale) => return Err(Refused::Stale(stale.newest)),
            Ok(Admit::Current) => {}
            Ok(Admit::Raised) => {
                let text = fences.encode();
                let written =
                    strata_store::store::write_atomically(&self.dir, "fences", text.as_bytes());
                if written.is_err() {
                    *fences = before;
                    return Err(Refused::Io);
                }
            }
        }
        drop(fences);
        Ok(raise.downgrade())
    }

    /// Forgets a removed component's fence (ids are never reused).
    pub fn forget(&self, component: u64) {
        let mut fences = self.lock();
        fences.remove(component);
        let text = fences.encode();
        let _ = strata_store::store::write_atomically(&self.dir, "fences", text.as_bytes());
        self.gates.locked("the fence gates").remove(&component);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_raise_waits_for_older_requests_in_flight_and_refuses_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let fencing = Arc::new(Fencing::load(dir.path()).unwrap());
        let old = fencing.enter(7, 1).await.unwrap();
        // A newer owner's first request waits while the old one's is applying.
        let f = fencing.clone();
        let newer = tokio::spawn(async move { f.enter(7, 2).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!newer.is_finished(), "the raise must wait for the pass held at epoch 1");
        drop(old);
        newer.await.unwrap().unwrap();
        assert_eq!(fencing.enter(7, 1).await.err(), Some(Refused::Stale(2)));
        // Durable: a reload keeps the raised fence.
        let again = Fencing::load(dir.path()).unwrap();
        assert_eq!(again.enter(7, 1).await.err(), Some(Refused::Stale(2)));
        assert!(again.enter(8, 1).await.is_ok(), "fences are per component");
        std::fs::write(dir.path().join("fences"), "7 x\n").unwrap();
        let damaged = Fencing::load(dir.path()).err().unwrap().to_string();
        assert!(damaged.contains("damaged"), "{damaged}");
    }
}
