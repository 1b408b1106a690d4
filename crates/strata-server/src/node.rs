//! One node's volumes and snapshots: the catalog (names → ids), the open volumes,
//! attachment counts, and the NBD exports (`VOL` read-write, `VOL@SNAP` read-only).
//!
//! Data directory layout (format 2):
//! ```text
//! DIR/lock           flock'ed by the running process; holds its pid (informational)
//! DIR/catalog.json   {"format":2,"next_id":N,"volumes":[{"id","name","created_unix",
//!                      "origin","access","snapshots":[{"id","name","created_unix"}]}]}
//!                    ("access": the NBD access list; absent: none, anyone may open it)
//! DIR/store/log      the log-structured store (strata_store::LogStore), keyed by id
//! ```
//! Invariants:
//! - The catalog is replaced atomically (write, fsync, rename, fsync dir): a crash leaves
//!   the old or the new catalog, never a mix.
//! - The store decides what exists, the catalog what it is called. Creating (a volume,
//!   snapshot or clone) changes the store durably first and the catalog last; deleting
//!   does the same. At open, a store view the catalog does not name is the leftover of an
//!   interrupted create and is removed; a catalog entry the store lacks is the leftover of
//!   an interrupted delete and is dropped. Either way the operation is all or nothing.
//! - Names are never paths: the store only sees ids.
//! - A data directory of format 1 (one file per volume, `DIR/volumes/`) is refused with
//!   a message; it is never modified.
//! - The node knows replicated volumes only as [`Routed`] exports (it names no type of
//!   `replicated`, which is above it): `replicated` makes each volume's router, exports it
//!   here, and gets its own type back (`replicated::router_of`, `owned`).

use crate::access;
use crate::catalog::{
    Catalog, CatalogEntry, ComponentEntry, ComponentSnapshot, SnapshotEntry, CATALOG_FORMAT,
};
use crate::error::{ApiError, ApiResult};
use crate::poison::Locked;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use strata_io::{BlockVolume, GroupSync, Store, VolumeId};
use strata_nbd::{Client, Export, ExportProvider, ExportSummary, Refusal};
use strata_replica::record::ComponentRecord;
use strata_store::engine::{EngineError, ViewInfo};
use strata_store::store::write_atomically;
use strata_store::LogStore;
use strata_types::limits::VOLUMES_MAX;
use strata_types::{format_size, AccessList, ErrorCode, VolumeName};
use tokio::sync::watch;

/// Linearizable reads of the cluster's membership this process made for its replicated
/// volumes (placement, takeovers, re-placing removed nodes' copies), for `/metrics`.
pub static MEMBERSHIP_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

const BLOCK: u64 = 4096;
/// How long a forced rollback or shrink waits for the volume's clients to go.
const DISCONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A replicated volume as this node exports it: the volume every NBD client of the node
/// reaches it through (its router, which `replicated` makes). `Any` lets `replicated` get
/// its router back (the node names no type of `replicated`, which depends on it); a
/// router is `Routed` by the blanket implementation.
pub trait Routed: BlockVolume + std::any::Any {}

impl<T: BlockVolume + std::any::Any> Routed for T {}

/// A component of a replicated volume held here.
#[derive(Clone)]
pub struct Component {
    /// Its store view.
    pub volume: Arc<dyn BlockVolume>,
    /// Its flushes.
    pub group_sync: GroupSync,
    entry: ComponentEntry,
}

impl Component {
    /// Makes every write to it so far durable, joining its group sync.
    pub async fn sync(&self) -> Result<(), strata_io::StoreError> {
        self.group_sync
            .sync()
            .await
            .map_err(|e| strata_io::StoreError::io("sync")(std::io::Error::other(e.message)))
    }

    /// Writes `writes` in order with one store call: on this task if the page cache takes
    /// them at once (`try_write_many_nowait`), else on the blocking pool.
    pub async fn write_together(
        &self,
        writes: Vec<(u64, bytes::Bytes)>,
    ) -> Result<(), strata_io::StoreError> {
        let slices: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, &d[..])).collect();
        if self.volume.try_write_many_nowait(&slices)? {
            return Ok(());
        }
        let volume = self.volume.clone();
        tokio::task::spawn_blocking(move || {
            let slices: Vec<(u64, &[u8])> = writes.iter().map(|(o, d)| (*o, &d[..])).collect();
            volume.write_many(&slices)
        })
        .await
        .unwrap_or_else(|e| Err(strata_io::StoreError::io("write")(std::io::Error::other(e))))
    }

    /// Its id on this node.
    pub fn id(&self) -> u64 {
        self.entry.id
    }
}

/// Attachment bookkeeping of one export.
struct Attach {
    count: Arc<AtomicUsize>,
    close: watch::Sender<bool>,
}

impl Attach {
    fn new() -> Attach {
        Attach { count: Arc::new(AtomicUsize::new(0)), close: watch::channel(false).0 }
    }

    fn connections(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

struct OpenVolume {
    id: u64,
    name: VolumeName,
    created_unix: u64,
    origin: Option<String>,
    /// Who may open its exports and its snapshots'.
    access: AccessList,
    volume: Arc<dyn BlockVolume>,
    group_sync: GroupSync,
    attach: Attach,
    /// By name.
    snapshots: BTreeMap<String, OpenSnapshot>,
}

struct OpenSnapshot {
    entry: SnapshotEntry,
    volume: Arc<dyn BlockVolume>,
    attach: Attach,
}

/// What the API shows of a volume.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct VolumeInfo {
    /// The name.
    pub name: String,
    /// The store id (hex).
    pub id: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Size for humans.
    pub size: String,
    /// Bytes of data the volume maps (its used space; zero and trimmed ranges cost none).
    pub allocated_bytes: u64,
    /// Of those, bytes only the volume holds (written since its newest snapshot).
    pub exclusive_bytes: u64,
    /// Of those, bytes it shares with its snapshots or the snapshot it was cloned from.
    pub shared_bytes: u64,
    /// Bytes its snapshots alone hold: what deleting all of them would free.
    pub snapshot_exclusive_bytes: u64,
    /// `VOL@SNAP` it was cloned from, if it is a clone.
    pub origin: Option<String>,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<SnapshotInfo>,
    /// NBD connections attached now.
    pub connections: usize,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// The NBD URI to connect to.
    pub export_uri: String,
    /// The node holding its data (for a replicated volume: its owner).
    pub node: u64,
    /// Copies of its data (1: on `node` alone).
    pub replicas: u32,
    /// A replicated volume's components (empty for a volume of one node).
    pub components: Vec<ComponentRecord>,
    /// A replicated volume's owner epoch (0 for a volume of one node).
    #[serde(default)]
    pub epoch: u64,
    /// Who may open it and its snapshots over NBD (empty: anyone).
    #[serde(default)]
    pub access: AccessList,
}

/// What the API shows of a snapshot.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SnapshotInfo {
    /// `VOL@SNAP`.
    pub name: String,
    /// The snapshot's own name.
    pub snapshot: String,
    /// The volume's name.
    pub volume: String,
    /// The store id (hex).
    pub id: String,
    /// Size in bytes (the volume's when it was taken).
    pub size_bytes: u64,
    /// Bytes of data it maps.
    pub allocated_bytes: u64,
    /// Bytes only it holds: what deleting it frees.
    pub exclusive_bytes: u64,
    /// Bytes it shares with the volume, other snapshots or clones.
    pub shared_bytes: u64,
    /// Volumes cloned from it.
    pub clones: Vec<String>,
    /// NBD connections attached now.
    pub connections: usize,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// The read-only NBD URI.
    pub export_uri: String,
}

/// A node's volumes.
pub struct Node {
    dir: PathBuf,
    store: LogStore,
    nbd_addr: Mutex<String>,
    /// NBD requires TLS: export URIs are `nbds://`.
    nbd_tls: std::sync::atomic::AtomicBool,
    node_id: std::sync::atomic::AtomicU64,
    fencing: Arc<crate::fencing::Fencing>,
    resync: Arc<crate::resync::Scheduler>,
    state: Mutex<State>,
    /// The I/O counters of the exports (`metrics::Counted` wraps each).
    metrics: Arc<crate::metrics::Metrics>,
    /// Asked when a client names an export this node does not have: it may export it
    /// now (a replicated volume made a moment ago on another node).
    discover: std::sync::OnceLock<Discover>,
    /// A replicated volume's access list, from its record in the metadata service.
    access_of: std::sync::OnceLock<AccessOf>,
    /// How often an owner compares its replicated volumes' copies (0: never).
    scrub_every_secs: std::sync::atomic::AtomicU64,
    /// This node's copies (component ids) that may lack writes they had not synced (the
    /// node came back from a power loss), until an owner vouches for each (on file,
    /// `DATA/suspect`): see `replicated.rs` invariant 11.
    suspect: Mutex<BTreeSet<u64>>,
    /// `VOL@SNAP` of the snapshots deleted since start, by store id (as many as the
    /// store follows, `strata_store::store::RECLAIMS_TRACKED`).
    deleted: Mutex<BTreeMap<u64, String>>,
}

/// The store's file system space and its reserve (`GET /v1/node`'s `space`).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct SpaceStatus {
    /// Bytes of the file system holding the store.
    pub size_bytes: u64,
    /// Bytes free on it, as last measured (every 0.5 s).
    pub free_bytes: u64,
    /// Bytes client writes leave free (the reserve).
    pub reserve_bytes: u64,
    /// Free space is below the reserve plus the larger of the reserve and a tenth of the
    /// file system.
    pub nearly_full: bool,
    /// The latest client write was refused (ENOSPC) for want of space.
    pub full: bool,
    /// Client writes refused for want of space since the node started.
    pub refused_writes: u64,
}

/// The space deleted snapshots held alone and the log has not reused yet
/// (`GET /v1/node`'s `reclaim`).
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct Reclaim {
    /// Bytes of deleted snapshots' space not reused yet (the deletes below).
    pub waiting_bytes: u64,
    /// Whether the cleaner runs now (enough of the log is dead).
    pub cleaner_running: bool,
    /// Bytes of the log's segments that hold no live data (the node's, whatever made them
    /// dead).
    pub dead_bytes: u64,
    /// Bytes of the log's segments in use.
    pub log_bytes: u64,
    /// The latest snapshot deletes since the node started, oldest first.
    pub snapshots: Vec<SnapshotReclaim>,
}

/// One deleted snapshot's space.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SnapshotReclaim {
    /// `VOL@SNAP` it had.
    pub name: String,
    /// Its store id (hex), as `SnapshotInfo::id` showed it.
    pub id: String,
    /// Bytes it held alone (the delete made them dead).
    pub freed_bytes: u64,
    /// Of those, bytes in segments the log has not freed yet.
    pub waiting_bytes: u64,
    /// Of those, bytes the cleaner leaves as they are: in segments still mostly live
    /// (more than a quarter) or being written.
    pub held_bytes: u64,
}

/// See [`Node::set_discover`].
pub type Discover = Box<dyn Fn(&Node, &str) -> bool + Send + Sync>;
/// See [`Node::set_access_of`].
pub type AccessOf = Box<dyn Fn(&str) -> Option<AccessList> + Send + Sync>;

struct State {
    next_id: u64,
    volumes: BTreeMap<String, OpenVolume>,
    components: BTreeMap<u64, Component>,
    /// Replicated volumes (every node serves each: as its owner or forwarding to it),
    /// exported over NBD by name.
    replicated: BTreeMap<String, (Arc<dyn Routed>, GroupSync, Attach)>,
}

impl State {
    /// The names of the views made from snapshot `id`, except `volume`'s own.
    fn name_of(&self, id: u64) -> Option<String> {
        self.volumes.values().find_map(|v| {
            if v.id == id {
                return Some(v.name.to_string());
            }
            v.snapshots
                .values()
                .find(|s| s.entry.id == id)
                .map(|s| format!("{}@{}", v.name, s.entry.name))
        })
    }
}

fn store_error(context: &str) -> impl FnOnce(strata_io::StoreError) -> ApiError + '_ {
    move |e| match e {
        strata_io::StoreError::NoSpace => {
            ApiError::new(ErrorCode::NoSpace, format!("{context}: {e}"))
        }
        e => ApiError::new(ErrorCode::Io, format!("{context}: {e}")),
    }
}

fn engine_error(context: &str) -> impl FnOnce(EngineError) -> ApiError + '_ {
    move |e| match e {
        EngineError::Io(ref io) if io.raw_os_error() == Some(28) => {
            ApiError::new(ErrorCode::NoSpace, format!("{context}: {e}"))
        }
        e => ApiError::new(ErrorCode::Io, format!("{context}: {e}")),
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Splits `VOL@SNAP`.
pub fn split_snapshot(full: &str) -> ApiResult<(VolumeName, VolumeName)> {
    let Some((volume, snapshot)) = full.split_once('@') else {
        return Err(ApiError::invalid(format!("{full:?} is not VOL@SNAPSHOT")));
    };
    let volume = VolumeName::new(volume).map_err(|e| ApiError::invalid(e.to_string()))?;
    let snapshot =
        VolumeName::new(snapshot).map_err(|e| ApiError::invalid(format!("snapshot name: {e}")))?;
    Ok((volume, snapshot))
}

impl Node {
    /// Opens the node's data in `dir` (which the caller has locked): reads the catalog,
    /// opens the store and reconciles what a crash left half-made.
    pub fn open(dir: &Path) -> anyhow::Result<Arc<Node>> {
        use anyhow::Context;
        let catalog_path = dir.join("catalog.json");
        let catalog: Catalog = match std::fs::read(&catalog_path) {
            Ok(bytes) => crate::catalog::decode(&bytes, dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if dir.join("volumes").exists() {
                    anyhow::bail!(
                        "{} has a volumes/ directory but no catalog: not a data directory \
                         this strata can open",
                        dir.display()
                    );
                }
                // Ids start from the clock: a data directory made again after a disk was
                // emptied never reuses an id the cluster may still know (a component id
                // must name the same data for as long as anyone remembers it).
                Catalog {
                    format: CATALOG_FORMAT,
                    next_id: (now_unix() << 20) | 1,
                    volumes: Vec::new(),
                    components: Vec::new(),
                }
            }
            Err(e) => return Err(e).context("read the catalog"),
        };
        let store = LogStore::open(&dir.join("store")).context("open the store")?;
        let in_store: std::collections::HashSet<u64> = store.view_ids().into_iter().collect();
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let mut volumes = BTreeMap::new();
        let mut next_id = catalog.next_id;
        let mut named = std::collections::HashSet::new();
        let mut dropped = false;
        for entry in catalog.volumes {
            next_id = next_id.max(entry.id + 1);
            if !in_store.contains(&entry.id) {
                tracing::warn!(volume = %entry.name, "dropping a volume a crash left half-deleted");
                dropped = true;
                continue;
            }
            named.insert(entry.id);
            let volume = store
                .open_volume(VolumeId(entry.id))
                .with_context(|| format!("open volume {}", entry.name))?;
            let mut snapshots = BTreeMap::new();
            for snap in entry.snapshots {
                next_id = next_id.max(snap.id + 1);
                if !in_store.contains(&snap.id) {
                    tracing::warn!(volume = %entry.name, snapshot = %snap.name,
                        "dropping a snapshot a crash left half-deleted");
                    dropped = true;
                    continue;
                }
                named.insert(snap.id);
                let view = store
                    .view(snap.id)
                    .with_context(|| format!("open snapshot {}@{}", entry.name, snap.name))?;
                snapshots.insert(
                    snap.name.to_string(),
                    OpenSnapshot { entry: snap, volume: view, attach: Attach::new() },
                );
            }
            let group_sync = GroupSync::spawn(metrics.wrap(entry.name.as_str(), volume.clone()));
            volumes.insert(
                entry.name.to_string(),
                OpenVolume {
                    id: entry.id,
                    name: entry.name,
                    created_unix: entry.created_unix,
                    origin: entry.origin,
                    access: entry.access,
                    group_sync,
                    volume,
                    attach: Attach::new(),
                    snapshots,
                },
            );
        }
        let mut components = BTreeMap::new();
        for mut entry in catalog.components {
            next_id = next_id.max(entry.id + 1);
            if !in_store.contains(&entry.id) {
                tracing::warn!(id = entry.id, "dropping a component a crash left half-removed");
                dropped = true;
                continue;
            }
            named.insert(entry.id);
            let before = entry.snapshots.len();
            entry.snapshots.retain(|s| in_store.contains(&s.id));
            if entry.snapshots.len() != before {
                tracing::warn!(id = entry.id, "dropping component snapshots a crash left removed");
                dropped = true;
            }
            for s in &entry.snapshots {
                next_id = next_id.max(s.id + 1);
                named.insert(s.id);
            }
            let volume = store
                .open_volume(VolumeId(entry.id))
                .with_context(|| format!("open component {}", entry.id))?;
            let group_sync = GroupSync::spawn(volume.clone());
            components.insert(entry.id, Component { volume, group_sync, entry });
        }
        // Leftovers of interrupted creates: volumes (clones first, they depend on
        // snapshots) and then snapshots.
        let orphans: Vec<u64> =
            store.view_ids().into_iter().filter(|id| !named.contains(id)).collect();
        for id in &orphans {
            if let Ok(ViewInfo::Volume { .. }) = store.info(*id) {
                tracing::warn!(id, "removing a volume a crash left without a catalog entry");
                store.remove(*id).context("remove an orphan volume")?;
            }
        }
        for id in &orphans {
            if let Ok(ViewInfo::Snapshot { .. }) = store.info(*id) {
                tracing::warn!(id, "removing a snapshot a crash left without a catalog entry");
                if let Err(e) = store.delete_snapshot(*id) {
                    tracing::warn!(id, "keeping an orphan snapshot: {e}");
                }
            }
        }
        let fencing = Arc::new(crate::fencing::Fencing::load(dir)?);
        let node = Node {
            metrics,
            dir: dir.to_owned(),
            store,
            nbd_addr: Mutex::new(String::from("127.0.0.1:10809")),
            nbd_tls: std::sync::atomic::AtomicBool::new(false),
            node_id: std::sync::atomic::AtomicU64::new(0),
            fencing,
            resync: Arc::new(crate::resync::Scheduler::new(crate::resync::JOBS_DEFAULT)),
            state: Mutex::new(State { next_id, volumes, components, replicated: BTreeMap::new() }),
            discover: std::sync::OnceLock::new(),
            access_of: std::sync::OnceLock::new(),
            scrub_every_secs: std::sync::atomic::AtomicU64::new(0),
            suspect: Mutex::new(load_suspect(dir)?),
            deleted: Mutex::default(),
        };
        if dropped || !catalog_path.exists() {
            node.persist(&node.lock()).map_err(|e| anyhow::anyhow!("{}", e.message))?;
        }
        Ok(Arc::new(node))
    }

    /// Creates a component of volume `of` (a replicated volume's replica held here);
    /// returns its id. All or nothing: a crash before the catalog names it removes it at
    /// the next open.
    pub fn component_create(&self, of: &str, size_bytes: u64) -> ApiResult<u64> {
        strata_types::check_size(size_bytes).map_err(|e| ApiError::invalid(e.to_string()))?;
        VolumeName::new(of).map_err(|e| ApiError::invalid(e.to_string()))?;
        let mut state = self.lock();
        let id = state.next_id;
        self.store
            .create_volume(VolumeId(id), size_bytes)
            .map_err(store_error("create the component"))?;
        let volume = match self.store.open_volume(VolumeId(id)) {
            Ok(v) => v,
            Err(e) => {
                let _ = self.store.remove(id);
                return Err(store_error("open the component")(e));
            }
        };
        state.next_id = id + 1;
        let entry = ComponentEntry {
            id,
            volume: of.to_owned(),
            created_unix: now_unix(),
            snapshots: Vec::new(),
        };
        let group_sync = GroupSync::spawn(volume.clone());
        state.components.insert(id, Component { volume, group_sync, entry });
        if let Err(e) = self.persist(&state) {
            state.components.remove(&id);
            let _ = self.store.remove(id);
            return Err(e);
        }
        tracing::info!(component = id, volume = of, size = size_bytes, "component created");
        Ok(id)
    }

    /// The export of replicated volume `name` (its router), made by `make` (and exported)
    /// if this node has none yet.
    pub fn export_replicated(
        &self,
        name: &str,
        make: impl FnOnce() -> Arc<dyn Routed>,
    ) -> Arc<dyn Routed> {
        let mut state = self.lock();
        if let Some((router, _, _)) = state.replicated.get(name) {
            return router.clone();
        }
        let router = make();
        let volume: Arc<dyn BlockVolume> = router.clone();
        let group_sync = GroupSync::spawn(self.metrics.wrap(name, volume));
        state.replicated.insert(name.to_owned(), (router.clone(), group_sync, Attach::new()));
        router
    }

    /// The export of replicated volume `name` (its router), if this node exports it.
    pub fn replicated_export(&self, name: &str) -> Option<Arc<dyn Routed>> {
        self.lock().replicated.get(name).map(|(r, _, _)| r.clone())
    }

    /// The exports (routers) of the replicated volumes this node exports, by name.
    pub fn replicated_exports(&self) -> Vec<Arc<dyn Routed>> {
        self.lock().replicated.values().map(|(r, _, _)| r.clone()).collect()
    }

    /// The node's resync scheduler.
    pub fn resync_scheduler(&self) -> &Arc<crate::resync::Scheduler> {
        &self.resync
    }

    /// The epoch fences of this node's components.
    pub fn fencing(&self) -> &Arc<crate::fencing::Fencing> {
        &self.fencing
    }

    /// A component held here.
    pub fn component(&self, id: u64) -> Option<Component> {
        self.lock().components.get(&id).cloned()
    }

    /// The components held here, with the volume each belongs to and when it was made.
    pub fn components(&self) -> Vec<(u64, String, u64)> {
        let state = self.lock();
        state
            .components
            .values()
            .map(|c| (c.entry.id, c.entry.volume.clone(), c.entry.created_unix))
            .collect()
    }

    /// Marks every copy this node holds suspect (it came back from a power loss: they may
    /// lack writes they had not synced), on file before it returns.
    pub fn mark_suspect(&self) -> anyhow::Result<()> {
        let ids: Vec<u64> = self.components().into_iter().map(|(id, _, _)| id).collect();
        let mut suspect = self.suspect.lock().expect("not poisoned");
        let mut marked = suspect.clone();
        marked.extend(ids);
        save_suspect(&self.dir, &marked)?;
        *suspect = marked;
        Ok(())
    }

    /// Whether copy `component` may lack writes it had not synced before a power loss
    /// (and no owner has vouched for it since).
    pub fn suspect(&self, component: u64) -> bool {
        self.suspect.lock().expect("not poisoned").contains(&component)
    }

    /// The copies marked suspect.
    pub fn suspects(&self) -> BTreeSet<u64> {
        self.suspect.lock().expect("not poisoned").clone()
    }

    /// Takes the mark off copy `component` (an owner vouched for it, or it became the
    /// truth); returns whether it had one. Kept if the file cannot be written.
    pub fn clear_suspect(&self, component: u64) -> bool {
        let mut suspect = self.suspect.lock().expect("not poisoned");
        if !suspect.contains(&component) {
            return false;
        }
        let mut left = suspect.clone();
        left.remove(&component);
        match save_suspect(&self.dir, &left) {
            Ok(()) => {
                *suspect = left;
                true
            }
            Err(e) => {
                tracing::warn!(component, "cannot take the power-loss mark off a copy: {e:#}");
                false
            }
        }
    }

    /// Sets how often an owner compares its replicated volumes' copies (0: never).
    pub fn set_scrub_every(&self, every: std::time::Duration) {
        self.scrub_every_secs.store(every.as_secs(), std::sync::atomic::Ordering::Relaxed);
    }

    /// How often an owner compares its replicated volumes' copies (zero: never).
    pub fn scrub_every(&self) -> std::time::Duration {
        std::time::Duration::from_secs(
            self.scrub_every_secs.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Sets what is asked when a client names an export this node does not have (true:
    /// it exports it now). Set once.
    pub fn set_discover(&self, f: Discover) {
        let _ = self.discover.set(f);
    }

    /// Blocks mapped in component `id` held here (its bytes allocated), if it is here.
    pub fn component_allocated(&self, id: u64) -> Option<u64> {
        if !self.lock().components.contains_key(&id) {
            return None;
        }
        self.store.usage(id).ok().map(|u| u.mapped_blocks * BLOCK)
    }

    /// The NBD connections this node has to replicated volume `name`.
    pub fn replicated_connections(&self, name: &str) -> usize {
        self.lock().replicated.get(name).map_or(0, |(_, _, attach)| attach.connections())
    }

    /// The replicated volumes this node exports.
    pub fn replicated_names(&self) -> Vec<String> {
        self.lock().replicated.keys().cloned().collect()
    }

    /// Stops exporting replicated volume `name` (it is being deleted): its clients here
    /// are disconnected. Returns its router, if there was one.
    pub fn unexport_replicated(&self, name: &str) -> Option<Arc<dyn Routed>> {
        let (router, _group_sync, attach) = self.lock().replicated.remove(name)?;
        attach.close.send_replace(true);
        Some(router)
    }

    /// Removes a component and its data.
    pub fn component_remove(&self, id: u64) -> ApiResult<()> {
        let mut state = self.lock();
        if !state.components.contains_key(&id) {
            return Err(no_component(id));
        }
        self.store.remove(id).map_err(engine_error("remove the component"))?;
        state.components.remove(&id);
        // The store no longer has it; a failed catalog write is repaired at the next open.
        self.persist(&state)
    }

    /// Takes snapshot `key` of component `id` (a replicated volume's snapshot: its
    /// barrier's, or a copy's catch-up): a store snapshot of what the component holds now
    /// (the caller synced it first), named by `key` in the catalog. One of that key
    /// already here is replaced (a catch-up takes again one its copy took at a barrier it
    /// was then failed at). Durable on return.
    pub fn component_snapshot(&self, id: u64, key: u64) -> ApiResult<()> {
        let mut state = self.lock();
        let sid = state.next_id;
        let c = state.components.get(&id).ok_or_else(|| no_component(id))?;
        let before = c.entry.snapshots.clone();
        self.store.snapshot(id, sid).map_err(engine_error("take the component's snapshot"))?;
        state.next_id = sid + 1;
        let c = state.components.get_mut(&id).expect("checked above");
        c.entry.snapshots.retain(|s| s.key != key);
        c.entry.snapshots.push(ComponentSnapshot { key, id: sid, created_unix: now_unix() });
        if let Err(e) = self.persist(&state) {
            state.components.get_mut(&id).expect("checked above").entry.snapshots = before;
            let _ = self.store.delete_snapshot(sid);
            return Err(e);
        }
        // No longer named: removed now (else at the next open, as an orphan).
        if let Some(old) = before.iter().find(|s| s.key == key) {
            if let Err(e) = self.store.delete_snapshot(old.id) {
                tracing::warn!(
                    component = id,
                    key,
                    "the replaced snapshot stays until restart: {e}"
                );
            }
        }
        tracing::info!(component = id, key, "component snapshot taken");
        Ok(())
    }

    /// Removes snapshot `key` of component `id` (done if it has none). Durable on return.
    pub fn component_snapshot_remove(&self, id: u64, key: u64) -> ApiResult<()> {
        let mut state = self.lock();
        let c = state.components.get_mut(&id).ok_or_else(|| no_component(id))?;
        let Some(at) = c.entry.snapshots.iter().position(|s| s.key == key) else { return Ok(()) };
        let gone = c.entry.snapshots.remove(at);
        if let Err(e) = self.persist(&state) {
            state.components.get_mut(&id).expect("checked above").entry.snapshots.insert(at, gone);
            return Err(e);
        }
        // The catalog no longer names it: a failed delete is repaired at the next open.
        if let Err(e) = self.store.delete_snapshot(gone.id) {
            tracing::warn!(component = id, key, "the removed snapshot stays until restart: {e}");
        }
        tracing::info!(component = id, key, "component snapshot removed");
        Ok(())
    }

    /// Records the cluster's id for this node (shown with its volumes).
    pub fn set_node_id(&self, id: u64) {
        self.node_id.store(id, std::sync::atomic::Ordering::Relaxed);
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The NBD address.
    pub fn nbd_addr(&self) -> String {
        self.nbd_addr.lock().expect("not poisoned").clone()
    }

    /// Records the NBD address, for export URIs.
    pub fn set_nbd_addr(&self, addr: String) {
        *self.nbd_addr.lock().expect("not poisoned") = addr;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, state: &State) -> ApiResult<()> {
        let catalog = Catalog {
            format: CATALOG_FORMAT,
            next_id: state.next_id,
            volumes: state
                .volumes
                .values()
                .map(|v| CatalogEntry {
                    id: v.id,
                    name: v.name.clone(),
                    created_unix: v.created_unix,
                    origin: v.origin.clone(),
                    access: v.access.clone(),
                    snapshots: v.snapshots.values().map(|s| s.entry.clone()).collect(),
                })
                .collect(),
            components: state.components.values().map(|c| c.entry.clone()).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&catalog).expect("catalog serializes");
        write_atomically(&self.dir, "catalog.json", &bytes)
            .map_err(|e| ApiError::new(ErrorCode::Io, format!("write the catalog: {e}")))
    }

    fn uri(&self, export: &str) -> String {
        let scheme = if self.nbd_tls.load(Ordering::Relaxed) { "nbds" } else { "nbd" };
        format!("{scheme}://{}/{export}", self.nbd_addr.lock().expect("not poisoned"))
    }

    /// Sets where a replicated volume's access list is read at each NBD open (its
    /// record in the metadata service, as this node applied it). Without it, or
    /// without a record, a replicated volume has no list.
    pub fn set_access_of(&self, f: AccessOf) {
        let _ = self.access_of.set(f);
    }

    fn replicated_access(&self, name: &str) -> AccessList {
        self.access_of.get().and_then(|f| f(name)).unwrap_or_default()
    }

    /// NBD requires TLS: export URIs become `nbds://`.
    pub fn set_nbd_tls(&self, tls: bool) {
        self.nbd_tls.store(tls, Ordering::Relaxed);
    }

    fn snapshot_info(&self, state: &State, v: &OpenVolume, s: &OpenSnapshot) -> SnapshotInfo {
        let usage = self.store.usage(s.entry.id).unwrap_or_default();
        let name = format!("{}@{}", v.name, s.entry.name);
        let clones = self
            .store
            .dependents(s.entry.id)
            .into_iter()
            .filter(|id| state.volumes.values().any(|o| o.id == *id && o.id != v.id))
            .filter_map(|id| state.name_of(id))
            .collect();
        SnapshotInfo {
            snapshot: s.entry.name.to_string(),
            volume: v.name.to_string(),
            id: VolumeId(s.entry.id).to_string(),
            size_bytes: s.volume.size_bytes(),
            allocated_bytes: usage.mapped_blocks * BLOCK,
            exclusive_bytes: usage.exclusive_blocks * BLOCK,
            shared_bytes: (usage.mapped_blocks - usage.exclusive_blocks) * BLOCK,
            clones,
            connections: s.attach.connections(),
            created_unix: s.entry.created_unix,
            export_uri: self.uri(&name),
            name,
        }
    }

    fn info(&self, state: &State, v: &OpenVolume) -> VolumeInfo {
        let size_bytes = v.volume.size_bytes();
        let usage = self.store.usage(v.id).unwrap_or_default();
        let snapshots: Vec<SnapshotInfo> =
            self.ordered_snapshots(v).map(|s| self.snapshot_info(state, v, s)).collect();
        VolumeInfo {
            name: v.name.to_string(),
            id: VolumeId(v.id).to_string(),
            size_bytes,
            size: format_size(size_bytes),
            allocated_bytes: usage.mapped_blocks * BLOCK,
            exclusive_bytes: usage.exclusive_blocks * BLOCK,
            shared_bytes: (usage.mapped_blocks - usage.exclusive_blocks) * BLOCK,
            snapshot_exclusive_bytes: snapshots.iter().map(|s| s.exclusive_bytes).sum(),
            origin: v.origin.clone(),
            snapshots,
            connections: v.attach.connections(),
            created_unix: v.created_unix,
            export_uri: self.uri(v.name.as_str()),
            node: self.node_id.load(std::sync::atomic::Ordering::Relaxed),
            replicas: 1,
            components: Vec::new(),
            epoch: 0,
            access: v.access.clone(),
        }
    }

    /// A volume's snapshots, oldest first.
    fn ordered_snapshots<'a>(&self, v: &'a OpenVolume) -> impl Iterator<Item = &'a OpenSnapshot> {
        let mut all: Vec<&OpenSnapshot> = v.snapshots.values().collect();
        all.sort_by_key(|s| s.entry.id);
        all.into_iter()
    }

    /// Every volume.
    pub fn list(&self) -> Vec<VolumeInfo> {
        let state = self.lock();
        state.volumes.values().map(|v| self.info(&state, v)).collect()
    }

    /// One volume.
    pub fn get(&self, name: &str) -> ApiResult<VolumeInfo> {
        let state = self.lock();
        let v = state.volumes.get(name).ok_or_else(|| not_found(name))?;
        Ok(self.info(&state, v))
    }

    fn check_new_volume(state: &State, name: &VolumeName) -> ApiResult<()> {
        if state.volumes.contains_key(name.as_str()) {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("a volume named {name} already exists"),
            ));
        }
        if state.volumes.len() >= VOLUMES_MAX {
            return Err(ApiError::new(
                ErrorCode::NoSpace,
                format!("this node holds the maximum of {VOLUMES_MAX} volumes"),
            ));
        }
        Ok(())
    }

    /// Adds a volume the store already holds to the catalog; undoes the store's change if
    /// the catalog cannot be written.
    fn add_volume(
        &self,
        state: &mut State,
        id: u64,
        name: VolumeName,
        origin: Option<String>,
        access: AccessList,
    ) -> ApiResult<VolumeInfo> {
        let volume =
            self.store.open_volume(VolumeId(id)).map_err(store_error("open the volume"))?;
        state.next_id = id + 1;
        let open = OpenVolume {
            id,
            name: name.clone(),
            created_unix: now_unix(),
            origin,
            access,
            group_sync: GroupSync::spawn(self.metrics.wrap(name.as_str(), volume.clone())),
            volume,
            attach: Attach::new(),
            snapshots: BTreeMap::new(),
        };
        state.volumes.insert(name.to_string(), open);
        if let Err(e) = self.persist(state) {
            // Undo: the volume must not exist unless the catalog names it.
            state.volumes.remove(name.as_str());
            let _ = self.store.remove(id);
            return Err(e);
        }
        Ok(self.info(state, &state.volumes[name.as_str()]))
    }

    /// Creates a volume (`access`: who may open it). Blocks on disk syncs: call from a
    /// blocking context.
    pub fn create(
        &self,
        name: VolumeName,
        size_bytes: u64,
        access: AccessList,
    ) -> ApiResult<VolumeInfo> {
        let mut state = self.lock();
        Self::check_new_volume(&state, &name)?;
        let free = self.store.free_bytes().unwrap_or(u64::MAX);
        let id = state.next_id;
        self.store
            .create_volume(VolumeId(id), size_bytes)
            .map_err(store_error("create the volume"))?;
        let info = self.add_volume(&mut state, id, name.clone(), None, access)?;
        if size_bytes > free {
            tracing::info!(volume = %name, "volume is larger than the free space (thin)");
        }
        tracing::info!(volume = %name, size = size_bytes, "volume created");
        Ok(info)
    }

    /// Resizes a volume. Shrinking needs `allow_shrink`, and while clients are attached
    /// `force` too, which disconnects them first (the end of their disk goes away).
    pub fn resize(
        &self,
        name: &str,
        size_bytes: u64,
        allow_shrink: bool,
        force: bool,
    ) -> ApiResult<VolumeInfo> {
        let mut state = self.lock();
        let v = state.volumes.get(name).ok_or_else(|| not_found(name))?;
        let current = v.volume.size_bytes();
        if size_bytes < current && !allow_shrink {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "shrinking {name} from {} to {} discards data; \
                     pass --allow-shrink (API: allow_shrink) to do it",
                    format_size(current),
                    format_size(size_bytes)
                ),
            ));
        }
        let attached = v.attach.connections();
        if size_bytes < current && attached > 0 {
            if !force {
                return Err(Self::busy(name, attached, "shrink it"));
            }
            Self::disconnect(&mut state, name)?;
        }
        let v = &state.volumes[name];
        if size_bytes != current {
            v.volume.resize(size_bytes).map_err(store_error("resize the volume"))?;
            v.volume.sync().map_err(store_error("sync the resize"))?;
            tracing::info!(volume = %name, from = current, to = size_bytes, "volume resized");
        }
        Ok(self.info(&state, v))
    }

    /// The names of views outside `volume` made from its snapshots (clones).
    fn clones_of(&self, state: &State, v: &OpenVolume) -> Vec<String> {
        let own: Vec<u64> = v.snapshots.values().map(|s| s.entry.id).chain([v.id]).collect();
        v.snapshots
            .values()
            .flat_map(|s| self.store.dependents(s.entry.id))
            .filter(|id| !own.contains(id))
            .filter_map(|id| state.name_of(id))
            .collect()
    }

    /// `name` has clients attached, so `action` (what would change their disk under
    /// them) is refused without force.
    fn busy(name: &str, connections: usize, action: &str) -> ApiError {
        ApiError::new(
            ErrorCode::Busy,
            format!(
                "{name} has {connections} NBD client connection(s) attached; disconnect them, \
                 or pass --force (API: force) to {action} anyway, which disconnects them"
            ),
        )
    }

    /// Disconnects the clients of volume `name` (found by the caller) and waits until
    /// they are gone, so no write of theirs lands after what follows.
    fn disconnect(state: &mut State, name: &str) -> ApiResult<()> {
        let v = state.volumes.get_mut(name).expect("the caller found it");
        let old = std::mem::replace(&mut v.attach, Attach::new());
        old.close.send_replace(true);
        let deadline = std::time::Instant::now() + DISCONNECT_WAIT;
        while old.connections() > 0 {
            if std::time::Instant::now() > deadline {
                return Err(ApiError::new(
                    ErrorCode::Busy,
                    format!("{name}'s clients did not disconnect; nothing was changed"),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        Ok(())
    }

    /// Deletes a volume and its snapshots; refused while attached unless `force`, which
    /// drops the clients, and while clones depend on its snapshots.
    pub fn delete(&self, name: &str, force: bool) -> ApiResult<()> {
        let mut state = self.lock();
        let v = state.volumes.get(name).ok_or_else(|| not_found(name))?;
        let attached = v.attach.connections()
            + v.snapshots.values().map(|s| s.attach.connections()).sum::<usize>();
        if attached > 0 && !force {
            return Err(Self::busy(name, attached, "delete it"));
        }
        let clones = self.clones_of(&state, v);
        if !clones.is_empty() {
            return Err(ApiError::new(
                ErrorCode::Busy,
                format!(
                    "{name} has snapshots that clones depend on ({}); delete the clones first",
                    clones.join(", ")
                ),
            ));
        }
        self.store.remove(v.id).map_err(engine_error("remove the volume"))?;
        let v = state.volumes.remove(name).expect("checked above");
        v.attach.close.send_replace(true);
        for s in v.snapshots.values() {
            s.attach.close.send_replace(true);
        }
        // The store no longer has it; a failed catalog write is repaired at the next open.
        self.persist(&state)?;
        tracing::info!(volume = %name, forced = force && attached > 0, "volume deleted");
        Ok(())
    }

    /// Takes snapshot `VOL@SNAP`. O(1) in the volume's size.
    pub fn snapshot_create(&self, volume: &str, snapshot: VolumeName) -> ApiResult<SnapshotInfo> {
        let mut state = self.lock();
        let id = state.next_id;
        let v = state.volumes.get(volume).ok_or_else(|| not_found(volume))?;
        if v.snapshots.contains_key(snapshot.as_str()) {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("{volume} already has a snapshot named {snapshot}"),
            ));
        }
        let vid = v.id;
        self.store.snapshot(vid, id).map_err(engine_error("take the snapshot"))?;
        let view = self.store.view(id).map_err(engine_error("open the snapshot"))?;
        let entry = SnapshotEntry { id, name: snapshot.clone(), created_unix: now_unix() };
        state.next_id = id + 1;
        let v = state.volumes.get_mut(volume).expect("checked above");
        v.snapshots.insert(
            snapshot.to_string(),
            OpenSnapshot { entry, volume: view, attach: Attach::new() },
        );
        if let Err(e) = self.persist(&state) {
            let v = state.volumes.get_mut(volume).expect("checked above");
            v.snapshots.remove(snapshot.as_str());
            let _ = self.store.delete_snapshot(id);
            return Err(e);
        }
        tracing::info!(%volume, %snapshot, "snapshot taken");
        let v = &state.volumes[volume];
        Ok(self.snapshot_info(&state, v, &v.snapshots[snapshot.as_str()]))
    }

    fn find_snapshot<'a>(
        state: &'a State,
        volume: &str,
        snapshot: &str,
    ) -> ApiResult<(&'a OpenVolume, &'a OpenSnapshot)> {
        let v = state.volumes.get(volume).ok_or_else(|| not_found(volume))?;
        let s = v.snapshots.get(snapshot).ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("{volume} has no snapshot named {snapshot:?}"),
            )
        })?;
        Ok((v, s))
    }

    /// A volume's snapshots, oldest first.
    pub fn snapshot_list(&self, volume: &str) -> ApiResult<Vec<SnapshotInfo>> {
        let state = self.lock();
        let v = state.volumes.get(volume).ok_or_else(|| not_found(volume))?;
        Ok(self.ordered_snapshots(v).map(|s| self.snapshot_info(&state, v, s)).collect())
    }

    /// One snapshot.
    pub fn snapshot_get(&self, volume: &str, snapshot: &str) -> ApiResult<SnapshotInfo> {
        let state = self.lock();
        let (v, s) = Self::find_snapshot(&state, volume, snapshot)?;
        Ok(self.snapshot_info(&state, v, s))
    }

    /// Deletes `VOL@SNAP`: its exclusive blocks are freed. Refused while clones (or a
    /// rollback branch besides the next snapshot) depend on it, and while attached unless
    /// `force`.
    pub fn snapshot_delete(&self, volume: &str, snapshot: &str, force: bool) -> ApiResult<()> {
        let mut state = self.lock();
        let (v, s) = Self::find_snapshot(&state, volume, snapshot)?;
        let full = format!("{volume}@{snapshot}");
        let attached = s.attach.connections();
        if attached > 0 && !force {
            return Err(Self::busy(&full, attached, "delete it"));
        }
        let id = s.entry.id;
        let dependents = self.store.dependents(id);
        if dependents.len() > 1 {
            let names: Vec<String> = dependents
                .iter()
                .map(|d| match state.name_of(*d) {
                    Some(n) if n == v.name.as_str() => format!("{n} (rolled back to it)"),
                    Some(n) => n,
                    None => format!("id {d}"),
                })
                .collect();
            return Err(ApiError::new(
                ErrorCode::Busy,
                format!(
                    "{full} cannot be deleted: {} depend on its blocks ({}); delete the \
                     clones (or the other branch) first",
                    names.len(),
                    names.join(", ")
                ),
            ));
        }
        self.store.delete_snapshot(id).map_err(engine_error("delete the snapshot"))?;
        {
            let mut deleted = self.deleted.locked("the list of deleted volumes");
            deleted.insert(id, full.clone());
            while deleted.len() > strata_store::store::RECLAIMS_TRACKED {
                deleted.pop_first();
            }
        }
        let v = state.volumes.get_mut(volume).expect("found above");
        let s = v.snapshots.remove(snapshot).expect("found above");
        s.attach.close.send_replace(true);
        self.persist(&state)?;
        tracing::info!(snapshot = %full, "snapshot deleted");
        Ok(())
    }

    /// Makes volume `name` from snapshot `VOL@SNAP`, sharing its blocks; it takes the
    /// source volume's access list unless given its own.
    pub fn clone_volume(
        &self,
        source: &str,
        name: VolumeName,
        access: Option<AccessList>,
    ) -> ApiResult<VolumeInfo> {
        let (volume, snapshot) = split_snapshot(source)?;
        let mut state = self.lock();
        let (v, s) = Self::find_snapshot(&state, volume.as_str(), snapshot.as_str())?;
        let snap_id = s.entry.id;
        let access = access.unwrap_or_else(|| v.access.clone());
        Self::check_new_volume(&state, &name)?;
        let id = state.next_id;
        self.store.clone_snapshot(snap_id, id).map_err(engine_error("clone the snapshot"))?;
        let origin = Some(source.to_owned());
        let info = self.add_volume(&mut state, id, name.clone(), origin, access)?;
        tracing::info!(clone = %name, %source, "volume cloned");
        Ok(info)
    }

    /// Replaces volume `name`'s access list (empty: anyone). Connections already open
    /// stay; new ones are decided by the new list.
    pub fn set_access(&self, name: &str, access: AccessList) -> ApiResult<VolumeInfo> {
        let mut state = self.lock();
        let v = state.volumes.get_mut(name).ok_or_else(|| not_found(name))?;
        let old = std::mem::replace(&mut v.access, access);
        if let Err(e) = self.persist(&state) {
            state.volumes.get_mut(name).expect("found above").access = old;
            return Err(e);
        }
        let v = &state.volumes[name];
        tracing::info!(volume = %name, access = %v.access.describe(), "access list set");
        Ok(self.info(&state, v))
    }

    /// Returns a volume to one of its snapshots. Refused while the volume has clients
    /// unless `force`, which disconnects them first (their disk changes under them) and
    /// waits until their connections are gone, so no write of theirs lands afterwards.
    pub fn rollback(&self, source: &str, force: bool) -> ApiResult<VolumeInfo> {
        let (volume, snapshot) = split_snapshot(source)?;
        let mut state = self.lock();
        let (v, s) = Self::find_snapshot(&state, volume.as_str(), snapshot.as_str())?;
        let (vid, sid) = (v.id, s.entry.id);
        let attached = v.attach.connections();
        if attached > 0 && !force {
            return Err(Self::busy(volume.as_str(), attached, "roll it back"));
        }
        if attached > 0 {
            Self::disconnect(&mut state, volume.as_str())?;
        }
        self.store.rollback(vid, sid).map_err(engine_error("roll back"))?;
        tracing::info!(volume = %volume, %snapshot, "volume rolled back");
        Ok(self.info(&state, &state.volumes[volume.as_str()]))
    }

    /// Syncs the store and writes a checkpoint (at shutdown), so a restart replays
    /// nothing.
    pub fn sync_all(&self) -> anyhow::Result<()> {
        self.store.sync().map_err(|e| anyhow::anyhow!("sync the store: {e}"))?;
        self.store.checkpoint().map_err(|e| anyhow::anyhow!("checkpoint the store: {e}"))
    }

    /// Free bytes in the file system holding the store.
    pub fn free_bytes(&self) -> u64 {
        self.store.free_bytes().unwrap_or(0)
    }

    /// Sets the space client writes leave free on the store's file system.
    pub fn set_reserve(&self, reserve: strata_types::Reserve) {
        self.store.set_reserve(reserve);
        let space = self.store.space();
        tracing::info!(
            reserve = %reserve,
            reserve_bytes = space.reserve_bytes,
            free_bytes = space.free_bytes,
            "client writes leave the reserve free"
        );
    }

    /// The store's file system space, its reserve and whether writes are refused.
    pub fn space(&self) -> SpaceStatus {
        let s = self.store.space();
        SpaceStatus {
            size_bytes: s.size_bytes,
            free_bytes: s.free_bytes,
            reserve_bytes: s.reserve_bytes,
            nearly_full: s.nearly_full,
            full: s.full,
            refused_writes: s.refused_writes,
        }
    }

    /// A warning line when the node's disk is nearly full (`strata volume list`, logs).
    pub fn space_warning(space: &SpaceStatus) -> Option<String> {
        let (free, reserve) = (format_size(space.free_bytes), format_size(space.reserve_bytes));
        if space.full {
            Some(format!(
                "the node's disk is full: {free} free, {reserve} reserved; writes get ENOSPC \
                 until volumes or snapshots are deleted or trimmed"
            ))
        } else if space.nearly_full {
            Some(format!(
                "the node's disk is nearly full: {free} free; writes get ENOSPC once only the \
                 {reserve} reserve is left"
            ))
        } else {
            None
        }
    }

    /// Bytes of live data in the store (every volume and snapshot, shared blocks once).
    pub fn live_bytes(&self) -> u64 {
        self.store.live_bytes()
    }

    /// Bytes the store's log occupies.
    pub fn log_bytes(&self) -> u64 {
        self.store.log_bytes()
    }

    /// The space deleted snapshots held alone, and how much the log has reused.
    pub fn reclaim(&self) -> Reclaim {
        let deleted = self.deleted.locked("the list of deleted volumes").clone();
        let snapshots: Vec<SnapshotReclaim> = self
            .store
            .reclaims()
            .into_iter()
            .map(|r| SnapshotReclaim {
                name: deleted.get(&r.snapshot).cloned().unwrap_or_default(),
                id: VolumeId(r.snapshot).to_string(),
                freed_bytes: r.freed_bytes,
                waiting_bytes: r.waiting_bytes,
                held_bytes: r.held_bytes,
            })
            .collect();
        let stats = self.store.stats();
        Reclaim {
            waiting_bytes: snapshots.iter().map(|s| s.waiting_bytes).sum(),
            cleaner_running: self.store.cleaner_due(),
            dead_bytes: stats.dead_bytes,
            log_bytes: stats.log_bytes,
            snapshots,
        }
    }

    /// The store's space and activity.
    pub fn store_stats(&self) -> strata_store::store::StoreStats {
        self.store.stats()
    }

    /// The I/O counters of the node's exports.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.metrics
    }

    /// Each exported volume's group commit: (device syncs, FLUSH/FUA requests served).
    pub fn sync_counts(&self) -> Vec<(String, (u64, u64))> {
        let state = self.lock();
        let volumes = state.volumes.iter().map(|(name, v)| (name.clone(), v.group_sync.counts()));
        let replicated = state.replicated.iter().map(|(name, r)| (name.clone(), r.1.counts()));
        volumes.chain(replicated).collect()
    }
}

fn no_component(id: u64) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no component {id} here"))
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(ErrorCode::NotFound, format!("no volume named {name:?}"))
}

/// Decrements the attachment count when a connection ends.
struct Attachment(Arc<AtomicUsize>);

impl Drop for Attachment {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves the node's volumes as NBD exports: `VOL` read-write, `VOL@SNAP` read-only.
pub struct Exports(pub Arc<Node>);

impl ExportProvider for Exports {
    fn list(&self, client: &Client) -> Vec<ExportSummary> {
        let state = self.0.lock();
        let admitted = |name: &str| {
            let volume = name.split_once('@').map_or(name, |(v, _)| v);
            match state.volumes.get(volume) {
                Some(v) => access::admits(&v.access, client),
                None => access::admits(&self.0.replicated_access(volume), client),
            }
        };
        let mut all = self.summaries(&state);
        all.retain(|e| admitted(&e.name));
        all
    }

    fn open(&self, name: &str, client: &Client) -> Result<Export, Refusal> {
        match self.open_exported(name, client) {
            Err(Refusal::Unknown(e)) if !name.is_empty() && !name.contains('@') => {
                let found = self.0.discover.get().is_some_and(|f| f(&self.0, name));
                if found {
                    self.open_exported(name, client)
                } else {
                    Err(Refusal::Unknown(e))
                }
            }
            opened => opened,
        }
    }
}

impl Exports {
    /// Every export, whoever may open it.
    pub fn all(&self) -> Vec<ExportSummary> {
        self.summaries(&self.0.lock())
    }

    fn summaries(&self, state: &State) -> Vec<ExportSummary> {
        let mut out = Vec::new();
        for v in state.volumes.values() {
            out.push(ExportSummary {
                name: v.name.to_string(),
                description: format!("Strata volume, {}", format_size(v.volume.size_bytes())),
            });
            for s in v.snapshots.values() {
                out.push(ExportSummary {
                    name: format!("{}@{}", v.name, s.entry.name),
                    description: format!(
                        "Strata snapshot (read-only), {}",
                        format_size(s.volume.size_bytes())
                    ),
                });
            }
        }
        for (name, (view, _, _)) in &state.replicated {
            out.push(ExportSummary {
                name: name.clone(),
                description: format!(
                    "Strata replicated volume, {}",
                    format_size(view.size_bytes())
                ),
            });
        }
        out
    }

    fn open_exported(&self, name: &str, client: &Client) -> Result<Export, Refusal> {
        let state = self.0.lock();
        let (volume, snapshot) = match name.split_once('@') {
            Some((v, s)) => (v, Some(s)),
            None => (name, None),
        };
        if let (Some((view, group_sync, attach)), None) = (state.replicated.get(name), snapshot) {
            refuse_unless_admitted(name, &self.0.replicated_access(name), client)?;
            attach.count.fetch_add(1, Ordering::Relaxed);
            return Ok(Export {
                name: name.to_owned(),
                description: format!(
                    "Strata replicated volume, {}",
                    format_size(view.size_bytes())
                ),
                volume: self.0.metrics.wrap(name, view.clone() as Arc<dyn BlockVolume>),
                group_sync: group_sync.clone(),
                read_only: false,
                closed: attach.close.subscribe(),
                attachment: Box::new(Attachment(attach.count.clone())),
            });
        }
        let Some(v) = state.volumes.get(volume) else {
            return Err(Refusal::Unknown(if name.is_empty() {
                "there is no default export: name a volume (see `strata volume list`)".to_owned()
            } else {
                format!("no volume named {volume:?} (see `strata volume list`)")
            }));
        };
        refuse_unless_admitted(name, &v.access, client)?;
        let (view, attach, read_only, description) = match snapshot {
            None => (
                v.volume.clone(),
                &v.attach,
                false,
                format!("Strata volume, {}", format_size(v.volume.size_bytes())),
            ),
            Some(s) => {
                let Some(snap) = v.snapshots.get(s) else {
                    return Err(Refusal::Unknown(format!(
                        "{volume} has no snapshot named {s:?} (see `strata snapshot list {volume}`)"
                    )));
                };
                (
                    snap.volume.clone(),
                    &snap.attach,
                    true,
                    format!(
                        "Strata snapshot (read-only), {}",
                        format_size(snap.volume.size_bytes())
                    ),
                )
            }
        };
        attach.count.fetch_add(1, Ordering::Relaxed);
        Ok(Export {
            name: name.to_owned(),
            description,
            volume: self.0.metrics.wrap(name, view),
            // Snapshots share their volume's sync thread: the store syncs as a whole.
            group_sync: v.group_sync.clone(),
            read_only,
            closed: attach.close.subscribe(),
            attachment: Box::new(Attachment(attach.count.clone())),
        })
    }
}

/// Refuses `client` (NBD_REP_ERR_POLICY) unless `access` admits it; logs the refusal.
fn refuse_unless_admitted(name: &str, access: &AccessList, client: &Client) -> Result<(), Refusal> {
    if access::admits(access, client) {
        return Ok(());
    }
    let who = client.subject.as_deref().map_or_else(
        || format!("address {}", client.address),
        |s| format!("certificate {s:?} or address {}", client.address),
    );
    tracing::info!(export = %name, client = %who, "NBD open refused by the access list");
    Err(Refusal::Policy(format!("{name}: {who} is not on its access list")))
}

/// The file of the copies marked suspect (`Node::mark_suspect`): one component id a line.
const SUSPECT_FILE: &str = "suspect";

fn load_suspect(dir: &Path) -> anyhow::Result<BTreeSet<u64>> {
    use anyhow::Context;
    let path = dir.join(SUSPECT_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    text.lines()
        .map(|l| l.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not a list of component ids", path.display()))
}

fn save_suspect(dir: &Path, ids: &BTreeSet<u64>) -> anyhow::Result<()> {
    use anyhow::Context;
    let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
    strata_store::store::write_atomically(dir, SUSPECT_FILE, text.as_bytes())
        .with_context(|| format!("write {}", dir.join(SUSPECT_FILE).display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_power_loss_marks_survive_and_a_damaged_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(load_suspect(dir.path()).unwrap().is_empty(), "no file: nothing marked");
        save_suspect(dir.path(), &BTreeSet::from([7, 42])).unwrap();
        assert_eq!(load_suspect(dir.path()).unwrap(), BTreeSet::from([7, 42]));
        std::fs::write(dir.path().join(SUSPECT_FILE), "7\nforty-two\n").unwrap();
        let e = format!("{:#}", load_suspect(dir.path()).unwrap_err());
        assert!(e.contains("suspect") && e.contains("component ids"), "{e}");
    }
}
