//! Group commit: every FLUSH and FUA of a volume, from any connection, goes through one
//! [`GroupSync`]. While one device sync runs, new requests gather; the next sync serves
//! them all at once.
//!
//! Invariant: a request is answered only by a sync that *started after* the request
//! arrived, so every write completed before the request is covered. A failed sync fails
//! every waiter of that round and the volume refuses further syncs (sticky failure).

use crate::{BlockVolume, StoreError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Waiters queued for the next sync; the bound keeps memory finite under a flood.
const SYNC_WAITERS_MAX: usize = 16 * 1024;

/// Why a group sync failed.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct SyncError {
    /// The underlying error, rendered.
    pub message: String,
}

type Waiter = oneshot::Sender<Result<(), SyncError>>;

/// The handle through which flushes reach a volume's sync task. Cloning shares the task.
#[derive(Clone)]
pub struct GroupSync {
    tx: mpsc::Sender<Waiter>,
    stats: Arc<SyncStats>,
}

/// Counters for tests and metrics.
#[derive(Default, Debug)]
pub struct SyncStats {
    /// Device syncs performed.
    pub syncs: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
}

impl GroupSync {
    /// Starts the sync task for `volume` on the current tokio runtime. The task ends when
    /// every handle is dropped.
    pub fn spawn(volume: Arc<dyn BlockVolume>) -> GroupSync {
        let (tx, rx) = mpsc::channel(SYNC_WAITERS_MAX);
        let stats = Arc::new(SyncStats::default());
        tokio::spawn(run(volume, rx, stats.clone()));
        GroupSync { tx, stats }
    }

    /// Returns once every write completed before this call is durable.
    pub async fn sync(&self) -> Result<(), SyncError> {
        let (tx, rx) = oneshot::channel();
        let gone = || SyncError { message: "volume is closed".to_owned() };
        self.tx.send(tx).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// (device syncs, requests served) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.stats.syncs.load(Ordering::Relaxed), self.stats.requests.load(Ordering::Relaxed))
    }
}

async fn run(volume: Arc<dyn BlockVolume>, mut rx: mpsc::Receiver<Waiter>, stats: Arc<SyncStats>) {
    let mut waiters = Vec::new();
    while rx.recv_many(&mut waiters, SYNC_WAITERS_MAX).await > 0 {
        let v = volume.clone();
        let result = match tokio::task::spawn_blocking(move || v.sync()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(SyncError { message: render(&e) }),
            Err(e) => Err(SyncError { message: format!("sync task failed: {e}") }),
        };
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats.requests.fetch_add(waiters.len() as u64, Ordering::Relaxed);
        for waiter in waiters.drain(..) {
            let _ = waiter.send(result.clone());
        }
    }
}

fn render(e: &StoreError) -> String {
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FileStore, Store, VolumeId};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_share_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path()).unwrap();
        let vol = store.create_volume(VolumeId(1), 1 << 20).unwrap();
        let gs = GroupSync::spawn(vol.clone());
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let gs = gs.clone();
            let vol = vol.clone();
            tasks.push(tokio::spawn(async move {
                vol.write_at(&[i as u8; 4096], i * 4096).unwrap();
                gs.sync().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (syncs, requests) = gs.counts();
        assert_eq!(requests, 64);
        assert!(syncs <= requests);
        assert!(syncs >= 1);
    }
}
