//! The metadata service's Raft storage on openraft 0.9: the log and the vote in a redb
//! database (every append, truncate, purge and vote is one committed — fsynced — redb
//! transaction), and the [`State`] machine applied in memory with snapshots kept in the
//! same database, so a restarted member starts from its last snapshot and the log after
//! it. openraft's storage conformance suite runs against it (`raft/tests.rs`).
//!
//! Invariants:
//! 1. `append` reports its entries flushed only after the redb transaction that holds
//!    them has committed (redb's default durability: fsync). A writer thread groups every
//!    job queued meanwhile into one transaction; until written, appended entries are read
//!    from memory. Truncate, purge and the vote go through the same queue, in order.
//! 2. The vote is durable before `save_vote` returns: a member never votes twice in a
//!    term across a crash.
//! 3. The state machine's applied log id and membership move only forward, by `apply` or
//!    by installing a newer snapshot.

// openraft's traits fix the error type (`StorageError`, large); helpers return it too.
#![allow(clippy::result_large_err)]

use crate::state::{Command, Response, State};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, RwLock};

openraft::declare_raft_types!(
    /// Strata's Raft types: commands and responses of the metadata state machine.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        Entry = Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// A member's node id.
pub type NodeId = u64;

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

/// A job for the log's writer thread.
enum Job {
    /// Entries (index, serialized), durable before `callback`.
    Append { entries: Vec<(u64, Arc<Vec<u8>>)>, callback: LogFlushed<TypeConfig> },
    /// Delete entries from `since` on.
    Truncate { since: u64, done: tokio::sync::oneshot::Sender<Result<()>> },
    /// Remember `upto` as purged (its entries are deleted a chunk per transaction).
    Purge { upto: Vec<u8>, done: tokio::sync::oneshot::Sender<Result<()>> },
    /// A key of the meta table; `done` (if any) once durable.
    Meta {
        key: &'static str,
        bytes: Vec<u8>,
        done: Option<tokio::sync::oneshot::Sender<Result<()>>>,
    },
}

/// Entries appended but not yet written, readable at once: index → serialized entry.
type Pending = Arc<RwLock<BTreeMap<u64, Arc<Vec<u8>>>>>;

/// The log and vote store. Appends are acknowledged to openraft when durable, by a writer
/// thread that puts every job queued meanwhile into one redb transaction (group commit:
/// one fsync for many client writes). Until then the entries are read from memory.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// `None`: jobs run inline, one transaction each (for the paused-clock simulation,
    /// where a thread's real-time fsync would let the virtual clock run ahead).
    writer: Option<Arc<Writer>>,
    pending: Pending,
}

/// The writer thread's queue; dropping the last handle stops the thread and waits for it,
/// so the database is closed when the last `LogStore` is gone (a restart can reopen it).
struct Writer {
    jobs: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

/// The most jobs in one transaction.
const BATCH_JOBS_MAX: usize = 4096;

/// Purged entries deleted per transaction: deleting thousands at once stalled the
/// group commits behind them for 100 ms and more.
const PURGE_CHUNK: u64 = 256;

fn writer(db: Arc<Database>, jobs: std::sync::mpsc::Receiver<Job>, pending: Pending) {
    loop {
        // With purged entries left to delete, an idle writer deletes them a chunk at a time.
        let first = if purge_left(&db) {
            match jobs.recv_timeout(std::time::Duration::from_millis(20)) {
                Ok(job) => Some(job),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match jobs.recv() {
                Ok(job) => Some(job),
                Err(_) => return,
            }
        };
        let mut batch: Vec<Job> = first.into_iter().collect();
        while batch.len() < BATCH_JOBS_MAX {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        run_batch(&db, batch, &pending);
    }
}

/// Writes a batch in one transaction, then reports each job's completion.
fn run_batch(db: &Database, batch: Vec<Job>, pending: &Pending) {
    let result = write_batch(db, &batch);
    // The written entries are now read from redb (unless replaced meanwhile).
    if result.is_ok() {
        let mut p = pending.write().unwrap_or_else(|e| e.into_inner());
        for job in &batch {
            if let Job::Append { entries, .. } = job {
                for (index, bytes) in entries {
                    if p.get(index).is_some_and(|b| Arc::ptr_eq(b, bytes)) {
                        p.remove(index);
                    }
                }
            }
        }
    }
    for job in batch {
        let failed = || {
            let message = result.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            std::io::Error::other(message)
        };
        match job {
            Job::Append { callback, .. } => {
                callback.log_io_completed(result.as_ref().map(|_| ()).map_err(|_| failed()))
            }
            Job::Truncate { done, .. } | Job::Purge { done, .. } => {
                let _ = done.send(result.clone());
            }
            Job::Meta { done, .. } => {
                if let Some(done) = done {
                    let _ = done.send(result.clone());
                }
            }
        }
    }
}

/// Whether purged entries remain in the table.
fn purge_left(db: &Database) -> bool {
    let check = || -> Option<bool> {
        let tx = db.begin_read().ok()?;
        let meta = tx.open_table(META).ok()?;
        let purged: Option<LogId<NodeId>> =
            serde_json::from_slice(meta.get(PURGED).ok()??.value()).ok()?;
        let log = tx.open_table(LOG).ok()?;
        let first = log.first().ok()??.0.value();
        Some(purged.is_some_and(|p| first <= p.index))
    };
    check().unwrap_or(false)
}

fn write_batch(db: &Database, batch: &[Job]) -> Result<()> {
    let mut tx = db.begin_write().map_err(write_err)?;
    // A batch of nothing but the committed index need not be synced: it is an
    // optimisation (replay up to it at restart), persisted by the next synced commit.
    let durable = batch.iter().any(|j| !matches!(j, Job::Meta { done: None, .. }));
    if !durable {
        tx.set_durability(redb::Durability::None);
    }
    {
        let mut log = tx.open_table(LOG).map_err(write_err)?;
        let mut meta = tx.open_table(META).map_err(write_err)?;
        for job in batch {
            match job {
                Job::Append { entries, .. } => {
                    for (index, bytes) in entries {
                        log.insert(*index, bytes.as_slice()).map_err(write_err)?;
                    }
                }
                Job::Truncate { since, .. } => {
                    log.retain_in(*since.., |_, _| false).map_err(write_err)?;
                }
                Job::Purge { upto, .. } => {
                    // Entries up to it are deleted a chunk per transaction, below.
                    meta.insert(PURGED, upto.as_slice()).map_err(write_err)?;
                }
                Job::Meta { key, bytes, .. } => {
                    meta.insert(*key, bytes.as_slice()).map_err(write_err)?;
                }
            }
        }
        let purged: Option<LogId<NodeId>> = match meta.get(PURGED).map_err(write_err)? {
            Some(b) => serde_json::from_slice(b.value()).map_err(write_err)?,
            None => None,
        };
        if let Some(purged) = purged {
            for _ in 0..PURGE_CHUNK {
                match log.first().map_err(write_err)? {
                    Some((index, _)) if index.value() <= purged.index => {}
                    _ => break,
                }
                log.pop_first().map_err(write_err)?;
            }
        }
    }
    tx.commit().map_err(write_err)
}

impl LogStore {
    /// Opens (creating) the log in `db` and starts its writer thread.
    pub fn new(db: Arc<Database>) -> Result<LogStore> {
        LogStore::create_tables(&db)?;
        let (jobs, rx) = std::sync::mpsc::channel();
        let pending = Pending::default();
        let (d, p) = (db.clone(), pending.clone());
        let thread = std::thread::Builder::new()
            .name("meta-log".into())
            .spawn(move || writer(d, rx, p))
            .map_err(write_err)?;
        let writer = Writer { jobs: Mutex::new(Some(jobs)), thread: Mutex::new(Some(thread)) };
        Ok(LogStore { db, writer: Some(Arc::new(writer)), pending })
    }

    /// Opens (creating) the log in `db`, writing each job inline (no group commit).
    pub fn new_inline(db: Arc<Database>) -> Result<LogStore> {
        LogStore::create_tables(&db)?;
        Ok(LogStore { db, writer: None, pending: Pending::default() })
    }

    fn create_tables(db: &Database) -> Result<()> {
        let tx = db.begin_write().map_err(write_err)?;
        tx.open_table(LOG).map_err(write_err)?;
        tx.open_table(META).map_err(write_err)?;
        tx.commit().map_err(write_err)
    }

    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(META).map_err(read_err)?;
        let Some(bytes) = table.get(key).map_err(read_err)? else { return Ok(None) };
        let value = serde_json::from_slice(bytes.value()).map_err(read_err)?;
        Ok(Some(value))
    }

    fn submit(&self, job: Job) -> Result<()> {
        let Some(writer) = &self.writer else {
            run_batch(&self.db, vec![job], &self.pending);
            return Ok(());
        };
        let stopped = || write_err(std::io::Error::other("the log writer stopped"));
        let jobs = writer.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.as_ref().ok_or_else(stopped)?.send(job).map_err(|_| stopped())
    }

    async fn wait(&self, job: Job, done: tokio::sync::oneshot::Receiver<Result<()>>) -> Result<()> {
        self.submit(job)?;
        done.await.map_err(|_| write_err(std::io::Error::other("the log writer stopped")))?
    }

    async fn put_meta<T: Serialize>(&self, key: &'static str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(write_err)?;
        let (done, rx) = tokio::sync::oneshot::channel();
        self.wait(Job::Meta { key, bytes, done: Some(done) }, rx).await
    }

    fn pending(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, Arc<Vec<u8>>>> {
        self.pending.read().unwrap_or_else(|e| e.into_inner())
    }

    fn pending_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, Arc<Vec<u8>>>> {
        self.pending.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        // Pending entries first (a copy), then redb: an entry the writer moves from one to
        // the other meanwhile is found in one or both, never in neither.
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let mut found: BTreeMap<u64, Arc<Vec<u8>>> =
            self.pending().range(bounds).map(|(i, b)| (*i, b.clone())).collect();
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(LOG).map_err(read_err)?;
        for item in table.range::<u64>(bounds).map_err(read_err)? {
            let (index, bytes) = item.map_err(read_err)?;
            found.entry(index.value()).or_insert_with(|| Arc::new(bytes.value().to_vec()));
        }
        // Purged entries not deleted yet are gone all the same.
        let purged: Option<LogId<NodeId>> = self.get_meta(PURGED)?;
        if let Some(p) = purged {
            found.retain(|i, _| *i > p.index);
        }
        found.values().map(|b| serde_json::from_slice(b).map_err(read_err)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(PURGED)?;
        let pending_last = self.pending().values().next_back().cloned();
        let last_bytes = match pending_last {
            Some(b) => Some(b.to_vec()),
            None => {
                let tx = self.db.begin_read().map_err(read_err)?;
                let table = tx.open_table(LOG).map_err(read_err)?;
                let last = table.last().map_err(read_err)?;
                last.map(|(_, bytes)| bytes.value().to_vec())
            }
        };
        let last = match last_bytes {
            Some(bytes) => {
                let entry: Entry<TypeConfig> = serde_json::from_slice(&bytes).map_err(read_err)?;
                // All purged, some not deleted yet: the purge point is the last.
                Some(entry.log_id).max(last_purged_log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        self.put_meta(VOTE, vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        let bytes = serde_json::to_vec(&committed).map_err(write_err)?;
        self.submit(Job::Meta { key: COMMITTED, bytes, done: None })
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = Vec::new();
        for entry in entries {
            let bytes = Arc::new(serde_json::to_vec(&entry).map_err(write_err)?);
            batch.push((entry.log_id.index, bytes));
        }
        {
            let mut pending = self.pending_mut();
            for (index, bytes) in &batch {
                pending.insert(*index, bytes.clone());
            }
        }
        self.submit(Job::Append { entries: batch, callback })
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        self.pending_mut().retain(|i, _| *i < log_id.index);
        let (done, rx) = tokio::sync::oneshot::channel();
        self.wait(Job::Truncate { since: log_id.index, done }, rx).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let upto = serde_json::to_vec(&Some(log_id)).map_err(write_err)?;
        self.pending_mut().retain(|i, _| *i > log_id.index);
        let (done, rx) = tokio::sync::oneshot::channel();
        self.wait(Job::Purge { upto, done }, rx).await
    }
}

/// A snapshot as stored: its metadata and the serialized state machine.
#[derive(Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// What a snapshot's data holds.
#[derive(Clone, Default, Serialize, Deserialize)]
struct Applied {
    state: State,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
}

/// The state machine and its snapshots. Clones share the state (readers keep a clone
/// while Raft owns the original).
///
/// The last snapshot is a file beside the database, replaced atomically (written to a
/// temporary file, synced, renamed, the directory synced):
/// ```text
/// "SMS1" | meta length u32 LE | meta (JSON) | data (the serialized state machine) |
/// BLAKE3 of everything before (32 bytes)
/// ```
/// (In redb, a snapshot of megabytes took a transaction of 50-200 ms, stalling the log's
/// group commits behind it.)
#[derive(Clone)]
pub struct StateMachineStore {
    path: Arc<std::path::PathBuf>,
    applied: Arc<RwLock<Applied>>,
    snapshots_built: u64,
    /// Serializes replacing the snapshot file: a snapshot being built and one being
    /// installed may be written at once (openraft builds on a task of its own).
    replacing: Arc<Mutex<u64>>,
}

const SNAPSHOT_MAGIC: &[u8; 4] = b"SMS1";

impl StateMachineStore {
    /// Opens the state machine whose snapshot file is `path`, starting from that snapshot
    /// if it exists.
    pub fn new(path: std::path::PathBuf) -> Result<StateMachineStore> {
        let store = StateMachineStore {
            path: Arc::new(path),
            applied: Arc::default(),
            snapshots_built: 0,
            replacing: Arc::default(),
        };
        if let Some(snapshot) = store.stored_snapshot()? {
            *store.lock() = serde_json::from_slice(&snapshot.data).map_err(read_err)?;
        }
        Ok(store)
    }

    fn lock(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.applied.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the state as applied so far (after read-index, a linearizable read).
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.applied.read().unwrap_or_else(|e| e.into_inner()).state)
    }

    fn stored_snapshot(&self) -> Result<Option<StoredSnapshot>> {
        let bytes = match std::fs::read(&*self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let damaged = || {
            let message = format!("the snapshot {} is damaged", self.path.display());
            read_err(std::io::Error::other(message))
        };
        if bytes.len() < 40 || &bytes[..4] != SNAPSHOT_MAGIC {
            return Err(damaged());
        }
        let (body, sum) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(damaged());
        }
        let meta_len = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes")) as usize;
        if 8 + meta_len > body.len() {
            return Err(damaged());
        }
        let meta = serde_json::from_slice(&body[8..8 + meta_len]).map_err(read_err)?;
        Ok(Some(StoredSnapshot { meta, data: body[8 + meta_len..].to_vec() }))
    }

    fn store_snapshot(&self, snapshot: &StoredSnapshot) -> Result<()> {
        use std::io::Write;
        let meta = serde_json::to_vec(&snapshot.meta).map_err(write_err)?;
        let mut bytes = Vec::with_capacity(8 + meta.len() + snapshot.data.len() + 32);
        bytes.extend_from_slice(SNAPSHOT_MAGIC);
        bytes.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&meta);
        bytes.extend_from_slice(&snapshot.data);
        let sum = *blake3::hash(&bytes).as_bytes();
        bytes.extend_from_slice(&sum);
        // Each writer its own temporary file; the rename only if no newer snapshot (by
        // last log index) replaced the file meanwhile.
        let mut replacing = self.replacing.lock().unwrap_or_else(|e| e.into_inner());
        *replacing += 1;
        let tmp = self.path.with_extension(format!("snapshot.tmp{}", *replacing));
        let newest = self.stored_snapshot().ok().flatten().and_then(|s| s.meta.last_log_id);
        if newest.is_some() && newest > snapshot.meta.last_log_id {
            return Ok(()); // An older snapshot than the one stored: nothing to do.
        }
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &*self.path)?;
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(write_err)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        // A copy under the lock (memory speed); serialized and stored on the blocking
        // pool, so neither applying, reading nor the runtime's workers wait for it.
        let copy = self.applied.read().unwrap_or_else(|e| e.into_inner()).clone();
        self.snapshots_built += 1;
        let snapshot_id = match copy.last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, self.snapshots_built),
            None => format!("none-{}", self.snapshots_built),
        };
        let meta = SnapshotMeta {
            last_log_id: copy.last_applied,
            last_membership: copy.membership.clone(),
            snapshot_id,
        };
        let store = self.clone();
        let stored = meta.clone();
        let data = tokio::task::spawn_blocking(move || {
            let data = serde_json::to_vec(&copy).map_err(write_err)?;
            store.store_snapshot(&StoredSnapshot { meta: stored, data: data.clone() })?;
            Ok::<_, StorageError<NodeId>>(data)
        })
        .await
        .map_err(write_err)??;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let applied = self.lock();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut responses = Vec::new();
        let mut applied = self.lock();
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            responses.push(match entry.payload {
                EntryPayload::Blank => Response::Ok,
                EntryPayload::Normal(command) => applied.state.apply(&command),
                EntryPayload::Membership(membership) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                    Response::Ok
                }
            });
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<()> {
        let data = snapshot.into_inner();
        let applied: Applied = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        self.store_snapshot(&StoredSnapshot { meta: meta.clone(), data })?;
        let mut current = self.lock();
        *current = applied;
        current.last_applied = meta.last_log_id;
        current.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>> {
        Ok(self
            .stored_snapshot()?
            .map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

/// Opens (creating) the redb database at `path` and both stores over it.
pub fn open(path: &std::path::Path) -> Result<(LogStore, StateMachineStore)> {
    open_with(path, LogStore::new)
}

/// As [`open`], with the log written inline (see [`LogStore::new_inline`]).
pub fn open_inline(path: &std::path::Path) -> Result<(LogStore, StateMachineStore)> {
    open_with(path, LogStore::new_inline)
}

fn open_with(
    path: &std::path::Path,
    log: fn(Arc<Database>) -> Result<LogStore>,
) -> Result<(LogStore, StateMachineStore)> {
    let db = Arc::new(Database::create(path).map_err(write_err)?);
    let log = log(db)?;
    log.forget_committed_vote()?;
    Ok((log, StateMachineStore::new(path.with_extension("snapshot"))?))
}

impl LogStore {
    /// At startup, stores the saved vote as not committed (same term, same candidate), so
    /// a member that led before it stopped does not resume leading without an election.
    /// openraft 0.9 restarts a member whose saved vote is committed and its own as leader
    /// at once (`Engine::startup`), in the old term: its read index is then
    /// max(its first entry of that term, the committed index it saved), and the committed
    /// index is saved lazily (`save_committed`, not synced), so a read served right after
    /// the restart can miss writes the cluster committed and acknowledged before the
    /// crash. An election makes it (or another member) propose a blank entry of a new term
    /// first, which every read then waits for. Granting no new vote, this is safe.
    fn forget_committed_vote(&self) -> Result<()> {
        let Some(mut vote) = self.get_meta::<Vote<NodeId>>(VOTE)? else { return Ok(()) };
        if !vote.is_committed() {
            return Ok(());
        }
        vote.committed = false;
        let bytes = serde_json::to_vec(&vote).map_err(write_err)?;
        let tx = self.db.begin_write().map_err(write_err)?;
        {
            let mut meta = tx.open_table(META).map_err(write_err)?;
            meta.insert(VOTE, bytes.as_slice()).map_err(write_err)?;
        }
        tx.commit().map_err(write_err)
    }
}

pub mod router;

/// The leader's reaper: every `every`, if this member leads, proposes `Expire` with the
/// time `clock` gives (ms), which declares silent nodes down and ends expired leases.
/// Runs until the member shuts down. Only a leader proposes; a deposed one's proposal
/// fails and changes nothing.
pub async fn run_reaper(
    raft: openraft::Raft<TypeConfig>,
    me: NodeId,
    every: std::time::Duration,
    clock: impl Fn() -> u64,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let metrics = raft.metrics().borrow().clone();
        if metrics.state == openraft::ServerState::Shutdown {
            return;
        }
        if metrics.current_leader == Some(me) {
            let expired = raft.client_write(Command::Expire { now_ms: clock() }).await;
            if let Ok(r) = expired {
                if let Response::Expired { nodes, leases } = r.data {
                    if !nodes.is_empty() || !leases.is_empty() {
                        tracing::info!(?nodes, ?leases, "declared down / expired");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod sim_tests;
#[cfg(test)]
mod testkit;
#[cfg(test)]
mod tests;
