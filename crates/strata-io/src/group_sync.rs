//! Group commit: every FLUSH and FUA of a volume, from any connection, goes through one
//! [`GroupSync`]. A dedicated thread per volume runs the device syncs; while one runs, new
//! requests gather, and the next sync serves them all at once.
//!
//! Invariant: a request is answered only by a sync that *started after* the request was
//! queued, so every write completed before the request is covered. A failed sync fails
//! every waiter of that round, and the volume itself refuses further syncs (sticky
//! failure, see [`crate::StoreError::Failed`]).
//!
//! Why a thread and callbacks rather than async tasks: a flush at queue depth 1 is
//! latency-bound, and each hop between tasks and the blocking pool costs a wake-up. Here
//! the requester queues a callback, the sync thread wakes once, syncs, and calls every
//! callback, which hands the reply straight to the connection.
//! The queue is bounded by its callers: each connection has a bounded number of requests
//! in flight, and a node a bounded number of connections.

use crate::BlockVolume;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Why a group sync failed.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct SyncError {
    /// The underlying error, rendered.
    pub message: String,
}

/// What runs once the sync covering a request has finished.
pub type SyncCallback = Box<dyn FnOnce(Result<(), SyncError>) + Send>;

/// The handle through which flushes reach a volume's sync thread. Cloning shares the
/// thread; it exits when the last handle is dropped.
#[derive(Clone)]
pub struct GroupSync {
    inner: Arc<Handle>,
}

/// Dropping the last `Handle` stops the thread.
struct Handle {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    syncs: AtomicU64,
    requests: AtomicU64,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<SyncCallback>,
    closed: bool,
}

impl GroupSync {
    /// Starts the sync thread for `volume`.
    pub fn spawn(volume: Arc<dyn BlockVolume>) -> GroupSync {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            syncs: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });
        let for_thread = shared.clone();
        std::thread::Builder::new()
            .name("strata-sync".into())
            .spawn(move || run(volume, for_thread))
            .expect("spawn the volume sync thread");
        GroupSync { inner: Arc::new(Handle { shared }) }
    }

    /// Queues `done`, called (on the sync thread) once every write completed before this
    /// call is durable, or the sync failed.
    pub fn request(&self, done: SyncCallback) {
        let shared = &self.inner.shared;
        let mut queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.waiting.push(done);
        drop(queue);
        shared.wake.notify_one();
    }

    /// Returns once every write completed before this call is durable.
    pub async fn sync(&self) -> Result<(), SyncError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.request(Box::new(move |result| {
            let _ = tx.send(result);
        }));
        rx.await.map_err(|_| SyncError { message: "volume is closed".to_owned() })?
    }

    /// (device syncs, requests served) so far.
    pub fn counts(&self) -> (u64, u64) {
        let shared = &self.inner.shared;
        (shared.syncs.load(Ordering::Relaxed), shared.requests.load(Ordering::Relaxed))
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.closed = true;
        drop(queue);
        self.shared.wake.notify_one();
    }
}

fn run(volume: Arc<dyn BlockVolume>, shared: Arc<Shared>) {
    let mut round = Vec::new();
    loop {
        {
            let mut queue = shared.queue.lock().unwrap_or_else(|p| p.into_inner());
            while queue.waiting.is_empty() && !queue.closed {
                queue = shared.wake.wait(queue).unwrap_or_else(|p| p.into_inner());
            }
            if queue.waiting.is_empty() {
                return; // closed and drained
            }
            std::mem::swap(&mut round, &mut queue.waiting);
        }
        // Every callback in `round` was queued before this sync starts.
        let result = volume.sync().map_err(|e| SyncError { message: e.to_string() });
        shared.syncs.fetch_add(1, Ordering::Relaxed);
        shared.requests.fetch_add(round.len() as u64, Ordering::Relaxed);
        for done in round.drain(..) {
            done(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A volume in memory: the group-commit tests need a volume, not a disk.
    struct Mem(Mutex<Vec<u8>>);

    impl BlockVolume for Mem {
        fn size_bytes(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn allocated_bytes(&self) -> Result<u64, crate::StoreError> {
            Ok(self.size_bytes())
        }
        fn read_at(&self, b: &mut [u8], o: u64) -> Result<(), crate::StoreError> {
            let data = self.0.lock().unwrap();
            crate::check_range(o, b.len() as u64, data.len() as u64)?;
            b.copy_from_slice(&data[o as usize..o as usize + b.len()]);
            Ok(())
        }
        fn write_at(&self, d: &[u8], o: u64) -> Result<(), crate::StoreError> {
            let mut data = self.0.lock().unwrap();
            crate::check_range(o, d.len() as u64, data.len() as u64)?;
            data[o as usize..o as usize + d.len()].copy_from_slice(d);
            Ok(())
        }
        fn trim(&self, o: u64, l: u64) -> Result<(), crate::StoreError> {
            self.write_at(&vec![0; l as usize], o)
        }
        fn write_zeroes(
            &self,
            o: u64,
            l: u64,
            _: crate::ZeroMode,
        ) -> Result<(), crate::StoreError> {
            self.trim(o, l)
        }
        fn extents(
            &self,
            _: u64,
            l: u64,
            _: usize,
        ) -> Result<Vec<crate::Extent>, crate::StoreError> {
            Ok(vec![crate::Extent { length: l, hole: false, zero: false }])
        }
        fn sync(&self) -> Result<(), crate::StoreError> {
            Ok(())
        }
        fn resize(&self, s: u64) -> Result<(), crate::StoreError> {
            self.0.lock().unwrap().resize(s as usize, 0);
            Ok(())
        }
    }

    fn volume(size: usize) -> Arc<dyn BlockVolume> {
        Arc::new(Mem(Mutex::new(vec![0; size])))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_share_syncs() {
        let vol = volume(1 << 20);
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
        assert!(syncs >= 1);
        assert!(syncs <= requests);
    }

    #[test]
    fn a_request_queued_during_a_sync_waits_for_the_next_one() {
        // A volume whose sync blocks until released lets us queue a request mid-sync.
        struct Gate {
            inner: Arc<dyn BlockVolume>,
            entered: std::sync::mpsc::Sender<()>,
            release: Mutex<std::sync::mpsc::Receiver<()>>,
        }
        impl BlockVolume for Gate {
            fn size_bytes(&self) -> u64 {
                self.inner.size_bytes()
            }
            fn allocated_bytes(&self) -> Result<u64, crate::StoreError> {
                self.inner.allocated_bytes()
            }
            fn read_at(&self, b: &mut [u8], o: u64) -> Result<(), crate::StoreError> {
                self.inner.read_at(b, o)
            }
            fn write_at(&self, d: &[u8], o: u64) -> Result<(), crate::StoreError> {
                self.inner.write_at(d, o)
            }
            fn trim(&self, o: u64, l: u64) -> Result<(), crate::StoreError> {
                self.inner.trim(o, l)
            }
            fn write_zeroes(
                &self,
                o: u64,
                l: u64,
                m: crate::ZeroMode,
            ) -> Result<(), crate::StoreError> {
                self.inner.write_zeroes(o, l, m)
            }
            fn extents(
                &self,
                o: u64,
                l: u64,
                n: usize,
            ) -> Result<Vec<crate::Extent>, crate::StoreError> {
                self.inner.extents(o, l, n)
            }
            fn sync(&self) -> Result<(), crate::StoreError> {
                self.entered.send(()).unwrap();
                self.release.lock().unwrap().recv().unwrap();
                self.inner.sync()
            }
            fn resize(&self, s: u64) -> Result<(), crate::StoreError> {
                self.inner.resize(s)
            }
        }
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let gate = Arc::new(Gate {
            inner: volume(4096),
            entered: entered_tx,
            release: Mutex::new(release_rx),
        });
        let gs = GroupSync::spawn(gate);
        let (done_tx, done) = std::sync::mpsc::channel();
        let d1 = done_tx.clone();
        gs.request(Box::new(move |r| d1.send((1, r.is_ok())).unwrap()));
        entered.recv().unwrap(); // sync 1 is running
        gs.request(Box::new(move |r| done_tx.send((2, r.is_ok())).unwrap()));
        release.send(()).unwrap();
        assert_eq!(done.recv().unwrap(), (1, true));
        // Request 2 arrived during sync 1, so it needs a sync of its own.
        entered.recv().unwrap();
        assert!(done.try_recv().is_err(), "request 2 must not ride on sync 1");
        release.send(()).unwrap();
        assert_eq!(done.recv().unwrap(), (2, true));
        assert_eq!(gs.counts(), (2, 2));
    }
}
