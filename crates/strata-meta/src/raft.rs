//! The metadata service's Raft storage on openraft 0.9: the log and the vote in a redb
//! database (every append, truncate, purge and vote is one committed — fsynced — redb
//! transaction), and the [`State`] machine applied in memory with snapshots kept in the
//! same database, so a restarted member starts from its last snapshot and the log after
//! it. openraft's storage conformance suite runs against it (`raft/tests.rs`).
//!
//! Invariants:
//! 1. `append` reports its entries flushed only after the redb transaction that holds
//!    them has committed (redb's default durability: fsync).
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
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, RwLock};

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
const SNAPSHOT: &str = "snapshot";

type Result<T> = std::result::Result<T, StorageError<NodeId>>;

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

/// The log and vote store.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
}

impl LogStore {
    /// Opens (creating) the log in `db`.
    pub fn new(db: Arc<Database>) -> Result<LogStore> {
        let tx = db.begin_write().map_err(write_err)?;
        tx.open_table(LOG).map_err(write_err)?;
        tx.open_table(META).map_err(write_err)?;
        tx.commit().map_err(write_err)?;
        Ok(LogStore { db })
    }

    fn get_meta<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(META).map_err(read_err)?;
        let Some(bytes) = table.get(key).map_err(read_err)? else { return Ok(None) };
        let value = serde_json::from_slice(bytes.value()).map_err(read_err)?;
        Ok(Some(value))
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<()> {
        let bytes = serde_json::to_vec(value).map_err(write_err)?;
        let tx = self.db.begin_write().map_err(write_err)?;
        tx.open_table(META).map_err(write_err)?.insert(key, bytes.as_slice()).map_err(write_err)?;
        tx.commit().map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>> {
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(LOG).map_err(read_err)?;
        let bounds = (range.start_bound().cloned(), range.end_bound().cloned());
        let mut entries = Vec::new();
        for item in table.range::<u64>(bounds).map_err(read_err)? {
            let (_, bytes) = item.map_err(read_err)?;
            entries.push(serde_json::from_slice(bytes.value()).map_err(read_err)?);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(PURGED)?;
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(LOG).map_err(read_err)?;
        let last = match table.last().map_err(read_err)? {
            Some((_, bytes)) => {
                let entry: Entry<TypeConfig> =
                    serde_json::from_slice(bytes.value()).map_err(read_err)?;
                Some(entry.log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<()> {
        self.put_meta(VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<()> {
        self.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let tx = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = tx.open_table(LOG).map_err(write_err)?;
            for entry in entries {
                let bytes = serde_json::to_vec(&entry).map_err(write_err)?;
                table.insert(entry.log_id.index, bytes.as_slice()).map_err(write_err)?;
            }
        }
        tx.commit().map_err(write_err)?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let tx = self.db.begin_write().map_err(write_err)?;
        {
            let mut table = tx.open_table(LOG).map_err(write_err)?;
            table.retain_in(log_id.index.., |_, _| false).map_err(write_err)?;
        }
        tx.commit().map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<()> {
        let bytes = serde_json::to_vec(&Some(log_id)).map_err(write_err)?;
        let tx = self.db.begin_write().map_err(write_err)?;
        {
            let mut meta = tx.open_table(META).map_err(write_err)?;
            meta.insert(PURGED, bytes.as_slice()).map_err(write_err)?;
            let mut table = tx.open_table(LOG).map_err(write_err)?;
            table.retain_in(..=log_id.index, |_, _| false).map_err(write_err)?;
        }
        tx.commit().map_err(write_err)
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
#[derive(Clone)]
pub struct StateMachineStore {
    db: Arc<Database>,
    applied: Arc<RwLock<Applied>>,
    snapshots_built: u64,
}

impl StateMachineStore {
    /// Opens the state machine in `db`, starting from the last snapshot stored there.
    pub fn new(db: Arc<Database>) -> Result<StateMachineStore> {
        let store = StateMachineStore { db, applied: Arc::default(), snapshots_built: 0 };
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
        let tx = self.db.begin_read().map_err(read_err)?;
        let table = tx.open_table(META).map_err(read_err)?;
        let Some(bytes) = table.get(SNAPSHOT).map_err(read_err)? else { return Ok(None) };
        Ok(Some(serde_json::from_slice(bytes.value()).map_err(read_err)?))
    }

    fn store_snapshot(&self, snapshot: &StoredSnapshot) -> Result<()> {
        let bytes = serde_json::to_vec(snapshot).map_err(write_err)?;
        let tx = self.db.begin_write().map_err(write_err)?;
        tx.open_table(META)
            .map_err(write_err)?
            .insert(SNAPSHOT, bytes.as_slice())
            .map_err(write_err)?;
        tx.commit().map_err(write_err)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>> {
        let (data, last_applied, membership) = {
            let applied = self.lock();
            let data = serde_json::to_vec(&*applied).map_err(write_err)?;
            (data, applied.last_applied, applied.membership.clone())
        };
        self.snapshots_built += 1;
        let snapshot_id = match last_applied {
            Some(id) => format!("{}-{}-{}", id.leader_id, id.index, self.snapshots_built),
            None => format!("none-{}", self.snapshots_built),
        };
        let meta =
            SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id };
        self.store_snapshot(&StoredSnapshot { meta: meta.clone(), data: data.clone() })?;
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
    let db = Arc::new(Database::create(path).map_err(write_err)?);
    Ok((LogStore::new(db.clone())?, StateMachineStore::new(db)?))
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
