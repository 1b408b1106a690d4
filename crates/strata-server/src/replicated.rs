//! Replicated volumes, first step (`docs/design/replication.md`): placement of
//! components on distinct nodes, ownership by CAS, and the owner's write fan-out.
//!
//! Invariants:
//! 1. A volume's components are on distinct nodes, spread over racks then sites first.
//! 2. The owner holds `/volumes/<name>/owner = {node, epoch}`, taken by CAS with a higher
//!    epoch than any before; every request it sends carries that epoch, so components
//!    refuse a deposed owner (`dataplane.rs`).
//! 3. A write's reply means every component holds it (in its store); a FLUSH/FUA reply,
//!    that every component synced it. Until STALE marking and resync are built, a write
//!    that one component cannot take fails (EIO) — never a silent degrade.
//! 4. Reads come from the owner's local component.

use crate::error::{ApiError, ApiResult};
use crate::node::{Component, Node};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use strata_io::{BlockVolume, Extent, StoreError, ZeroMode};
use strata_meta::service::{ClientReply, ClientRequest, Member};
use strata_meta::state::{Command, Compare, Op, Response};
use strata_replica::client::{request, DataPeer};
use strata_replica::frame::{DataKey, Kind, FLAG_FUA, PAYLOAD_BYTES_MAX};
use strata_types::ErrorCode;

/// How long a component may take to answer one request.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One component in a volume's record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ComponentRecord {
    /// The node holding it.
    pub node: u64,
    /// Its id on that node.
    pub id: u64,
    /// `active`, `stale` or `resyncing`.
    pub state: String,
    /// Bytes its synchronization bitmap marks as missed (the owner's live view; not
    /// stored in the record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<u64>,
}

/// `/volumes/<name>/owner`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The owning node.
    pub node: u64,
    /// Its epoch.
    pub epoch: u64,
}

/// A node as placement sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Node id.
    pub id: u64,
    /// Its RPC address.
    pub rpc: String,
    /// Site.
    pub site: String,
    /// Rack.
    pub rack: String,
}

/// Chooses `n` distinct nodes, `me` first, then the others preferring a site, then a rack,
/// not yet used (invariant 1). `None` if there are fewer than `n` nodes.
pub fn place(me: u64, candidates: &[Candidate], n: usize) -> Option<Vec<Candidate>> {
    let mut chosen: Vec<Candidate> = candidates.iter().filter(|c| c.id == me).cloned().collect();
    let mut rest: Vec<Candidate> = candidates.iter().filter(|c| c.id != me).cloned().collect();
    rest.sort_by_key(|c| c.id);
    while chosen.len() < n {
        let score = |c: &Candidate| {
            let site = chosen.iter().any(|x| x.site == c.site) as u8;
            let rack = chosen.iter().any(|x| x.site == c.site && x.rack == c.rack) as u8;
            (site, rack, c.id)
        };
        let best = rest.iter().enumerate().min_by_key(|(_, c)| score(c)).map(|(i, _)| i)?;
        chosen.push(rest.remove(best));
    }
    Some(chosen)
}

/// Bytes per bit of a synchronization bitmap.
pub const REGION: u64 = 64 << 10;
/// How often the owner looks for a stale copy that came back.
const RESYNC_EVERY: Duration = Duration::from_secs(2);

/// One copy as the owner sees it.
struct Copy {
    node: u64,
    id: u64,
    /// `None`: the owner's own copy (`ReplicatedVolume::local`).
    peer: Option<Arc<DataPeer>>,
}

/// A copy's state (the volume record holds the same, changed by the owner by CAS).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CopyState {
    Active,
    Stale,
    Resyncing,
}

impl CopyState {
    fn name(self) -> &'static str {
        match self {
            CopyState::Active => "active",
            CopyState::Stale => "stale",
            CopyState::Resyncing => "resyncing",
        }
    }

    fn parse(s: &str) -> CopyState {
        match s {
            "active" => CopyState::Active,
            "resyncing" => CopyState::Resyncing,
            _ => CopyState::Stale,
        }
    }
}

struct Copies {
    states: Vec<CopyState>,
    /// Per copy: the regions it lacks (its synchronization bitmap).
    dirty: Vec<BTreeSet<u64>>,
    /// Per copy: regions written since its last successful flush (a copy that fails may
    /// have lost them with its page cache, so they join its bitmap).
    unflushed: Vec<BTreeSet<u64>>,
    /// Copies STALE here whose mark the record does not hold yet.
    unrecorded: BTreeSet<usize>,
}

/// The owner's view of a replicated volume: a `BlockVolume` whose writes go to every
/// ACTIVE (and RESYNCING) copy.
pub struct ReplicatedVolume {
    name: String,
    size_bytes: u64,
    epoch: u64,
    lsn: AtomicU64,
    min_replicas: usize,
    local: Component,
    copies: Vec<Copy>,
    state: Mutex<Copies>,
    /// Client writes hold it shared; a resync copies a region holding it exclusively.
    resync_lock: RwLock<()>,
    meta: Arc<Member>,
    owner: Owner,
    bitmaps: PathBuf,
    runtime: tokio::runtime::Handle,
    /// Bytes copied by resyncs since start.
    pub resynced_bytes: AtomicU64,
}

fn io_error(what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::io(what)(std::io::Error::other(e.to_string()))
}

impl ReplicatedVolume {
    fn bitmap_file(&self, i: usize) -> String {
        format!("{}.{}.{}", self.name, self.copies[i].node, self.copies[i].id)
    }

    /// Makes copy `i`'s bitmap durable (before a write that set bits in it is replied).
    fn save_bitmap(&self, i: usize, dirty: &BTreeSet<u64>) -> Result<(), StoreError> {
        let text: String = dirty.iter().map(|r| format!("{r}\n")).collect();
        std::fs::create_dir_all(&self.bitmaps).map_err(|e| io_error("bitmap", e))?;
        strata_store::store::write_atomically(&self.bitmaps, &self.bitmap_file(i), text.as_bytes())
            .map_err(|e| io_error("bitmap", e))
    }

    /// Copy `i` failed during its resync: the regions it took since its last flush may
    /// be lost with its page cache, so they go back into its bitmap (durable).
    fn lose_unflushed(&self, i: usize) -> Result<(), StoreError> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let lost = std::mem::take(&mut st.unflushed[i]);
        st.dirty[i].extend(lost);
        let dirty = st.dirty[i].clone();
        drop(st);
        self.save_bitmap(i, &dirty)
    }

    /// Records copy `i`'s state in the volume's record, by CAS, only while this node is
    /// still the owner at its epoch.
    fn set_state(&self, i: usize, to: CopyState) -> Result<(), String> {
        let (meta, name, owner) = (self.meta.clone(), self.name.clone(), self.owner);
        let (node, id) = (self.copies[i].node, self.copies[i].id);
        let result = self.runtime.block_on(async move {
            let key = format!("/volumes/{name}");
            for _ in 0..5 {
                let got = meta.request(ClientRequest::Get { key: key.clone() }).await;
                let Ok(ClientReply::Value { entry: Some(e), .. }) = got else {
                    return Err(format!("cannot read the record of {name}"));
                };
                let mut record: crate::registry::VolumeRecord =
                    serde_json::from_slice(&e.value).map_err(|e| e.to_string())?;
                for c in &mut record.components {
                    if c.node == node && c.id == id {
                        c.state = to.name().into();
                    }
                }
                let value = serde_json::to_vec(&record).expect("serializes");
                let owner_key = format!("/volumes/{name}/owner");
                let owner_value = serde_json::to_vec(&owner).expect("serializes");
                let compares = vec![
                    Compare::Value(owner_key, owner_value),
                    Compare::Version(key.clone(), e.version),
                ];
                let put = Op::Put { key: key.clone(), value, lease: None };
                match write(&meta, compares, vec![put]).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => {
                        // Either the record changed (retry) or we are no longer the owner.
                        let k = format!("/volumes/{name}/owner");
                        let now = meta.request(ClientRequest::Get { key: k }).await;
                        let still = matches!(&now, Ok(ClientReply::Value { entry: Some(o), .. })
                            if serde_json::from_slice::<Owner>(&o.value).ok() == Some(owner));
                        if !still {
                            return Err(format!("no longer the owner of {name}"));
                        }
                    }
                    Err(e) => return Err(e.message),
                }
            }
            Err("the record keeps changing".into())
        });
        if result.is_ok() {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.states[i] = to;
            tracing::info!(volume = %self.name, node, component = id, state = to.name(), "copy");
        }
        result
    }

    /// Runs the request on every ACTIVE or RESYNCING remote copy (on the runtime) while
    /// `local` runs here. A copy that fails is marked STALE before the reply, the
    /// regions `offset..offset+length` go to every STALE copy's bitmap (durable before
    /// the reply), and the request fails if fewer than `min_replicas` copies are ACTIVE.
    #[allow(clippy::too_many_arguments)]
    fn fan_out(
        &self,
        kind: Kind,
        offset: u64,
        length: u64,
        count: u32,
        payload: &[u8],
        fua: bool,
        local: impl FnOnce(&Component) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let _shared = self.resync_lock.read().unwrap_or_else(|e| e.into_inner());
        let lsn = self.lsn.fetch_add(1, Ordering::Relaxed) + 1;
        let states = self.state.lock().unwrap_or_else(|e| e.into_inner()).states.clone();
        let mut remote = Vec::new();
        for (i, c) in self.copies.iter().enumerate() {
            let Some(peer) = &c.peer else { continue };
            if states[i] == CopyState::Stale {
                continue;
            }
            let mut h = request(kind, c.id, self.epoch, lsn, offset);
            h.count = count;
            if fua {
                h.flags = FLAG_FUA;
            }
            let (peer, payload) = (peer.clone(), payload.to_vec());
            remote.push((
                i,
                self.runtime.spawn(async move {
                    match tokio::time::timeout(IO_TIMEOUT, peer.call(h, &payload)).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".to_owned()),
                    }
                }),
            ));
        }
        let here = local(&self.local);
        let mut failed = Vec::new();
        let mut took = Vec::new();
        for (i, r) in remote {
            match self.runtime.block_on(r) {
                Ok(Ok(())) => took.push(i),
                Ok(Err(e)) => failed.push((i, e)),
                Err(e) => failed.push((i, e.to_string())),
            }
        }
        let regions = (length > 0).then(|| offset / REGION..=(offset + length - 1) / REGION);
        // A failed copy is STALE from now on in memory, and what it may lack goes to its
        // bitmap (durable) before anything else: the write's regions and every region
        // written since its last flush. Even if the mark cannot be recorded, the copy is
        // brought level later, never left silently different.
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for i in &took {
                match (&regions, kind) {
                    (_, Kind::Flush) => st.unflushed[*i].clear(),
                    (Some(r), _) => st.unflushed[*i].extend(r.clone()),
                    (None, _) => {}
                }
            }
            for (i, e) in &failed {
                let node = self.copies[*i].node;
                tracing::warn!(volume = %self.name, node, "a copy failed: {e}");
                st.states[*i] = CopyState::Stale;
                st.unrecorded.insert(*i);
                let lost = std::mem::take(&mut st.unflushed[*i]);
                st.dirty[*i].extend(lost);
            }
            for i in 0..self.copies.len() {
                if st.states[i] != CopyState::Stale {
                    continue;
                }
                let before = st.dirty[i].len();
                if let Some(r) = &regions {
                    st.dirty[i].extend(r.clone());
                }
                if st.dirty[i].len() != before || failed.iter().any(|(f, _)| *f == i) {
                    let dirty = st.dirty[i].clone();
                    self.save_bitmap(i, &dirty)?;
                }
            }
        }
        here?;
        // Every STALE mark is recorded before the reply (and recording fails once this
        // node is no longer the owner at its epoch: then nothing more is acknowledged).
        let unrecorded: Vec<usize> = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.unrecorded.iter().copied().collect()
        };
        for i in unrecorded {
            self.set_state(i, CopyState::Stale).map_err(|e| {
                io_error("replicate", format!("a copy failed and cannot be marked stale: {e}"))
            })?;
            self.state.lock().unwrap_or_else(|e| e.into_inner()).unrecorded.remove(&i);
        }
        let active = {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.states.iter().filter(|s| **s == CopyState::Active).count()
        };
        if active < self.min_replicas {
            return Err(io_error(
                "replicate",
                format!("only {active} copies are active, {} needed", self.min_replicas),
            ));
        }
        Ok(())
    }

    /// Brings a STALE copy that answers again up to date: RESYNCING (new writes reach
    /// it), every region of its bitmap copied from this owner's copy (each under the
    /// exclusive lock, so no client write interleaves), then ACTIVE.
    fn resync(&self, i: usize) -> Result<(), String> {
        let Some(peer) = self.copies[i].peer.clone() else {
            return Err("the owner's own copy is recorded as not active".into());
        };
        let id = self.copies[i].id;
        let (epoch, runtime) = (self.epoch, self.runtime.clone());
        let probe = runtime.block_on(async {
            let h = request(Kind::Probe, id, epoch, 0, 0);
            tokio::time::timeout(Duration::from_secs(2), peer.call(h, &[])).await
        });
        if !matches!(probe, Ok(Ok(_))) {
            return Ok(()); // Still away.
        }
        {
            // Under the exclusive lock: no write is between reading the states and adding
            // its bits, so none can miss both this copy and its bitmap.
            let _exclusive = self.resync_lock.write().unwrap_or_else(|e| e.into_inner());
            let unrecorded =
                self.state.lock().unwrap_or_else(|e| e.into_inner()).unrecorded.contains(&i);
            if unrecorded {
                // Its STALE mark first (it could not be recorded when the copy failed).
                self.set_state(i, CopyState::Stale)?;
                self.state.lock().unwrap_or_else(|e| e.into_inner()).unrecorded.remove(&i);
            }
            self.set_state(i, CopyState::Resyncing)?;
        }
        loop {
            let next = {
                let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                st.dirty[i].iter().next().copied()
            };
            let Some(region) = next else { break };
            let _exclusive = self.resync_lock.write().unwrap_or_else(|e| e.into_inner());
            let offset = region * REGION;
            let len = REGION.min(self.size_bytes.saturating_sub(offset)) as usize;
            let mut buf = vec![0u8; len];
            self.local.volume.read_at(&mut buf, offset).map_err(|e| e.to_string())?;
            let lsn = self.lsn.fetch_add(1, Ordering::Relaxed) + 1;
            let h = request(Kind::Write, id, epoch, lsn, offset);
            let wrote = runtime
                .block_on(async { tokio::time::timeout(IO_TIMEOUT, peer.call(h, &buf)).await });
            if !matches!(wrote, Ok(Ok(_))) {
                self.lose_unflushed(i).map_err(|e| e.to_string())?;
                drop(_exclusive);
                self.set_state(i, CopyState::Stale)?;
                return Err(format!("copy {id} failed during its resync"));
            }
            self.resynced_bytes.fetch_add(len as u64, Ordering::Relaxed);
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.unflushed[i].insert(region);
            st.dirty[i].remove(&region);
            let dirty = st.dirty[i].clone();
            drop(st);
            self.save_bitmap(i, &dirty).map_err(|e| e.to_string())?;
        }
        // Everything it lacked is copied and new writes reach it: make it durable there,
        // then ACTIVE — all under the exclusive lock, so no write fails on it meanwhile
        // (a write that failed before left bits, and the loop goes round again).
        let _exclusive = self.resync_lock.write().unwrap_or_else(|e| e.into_inner());
        {
            let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if !st.dirty[i].is_empty() || st.states[i] != CopyState::Resyncing {
                return Ok(()); // Marked again meanwhile: the next round resyncs it.
            }
        }
        let flushed = runtime.block_on(async {
            let h = request(Kind::Flush, id, epoch, 0, 0);
            tokio::time::timeout(IO_TIMEOUT, peer.call(h, &[])).await
        });
        if !matches!(flushed, Ok(Ok(_))) {
            self.lose_unflushed(i).map_err(|e| e.to_string())?;
            self.set_state(i, CopyState::Stale)?;
            return Err(format!("copy {id} failed to flush after its resync"));
        }
        self.state.lock().unwrap_or_else(|e| e.into_inner()).unflushed[i].clear();
        self.set_state(i, CopyState::Active)?;
        let _ = std::fs::remove_file(self.bitmaps.join(self.bitmap_file(i)));
        Ok(())
    }

    /// Each copy as the owner sees it now: state and bytes its bitmap marks.
    pub fn live(&self) -> Vec<ComponentRecord> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.copies
            .iter()
            .enumerate()
            .map(|(i, c)| ComponentRecord {
                node: c.node,
                id: c.id,
                state: st.states[i].name().into(),
                dirty_bytes: Some(st.dirty[i].len() as u64 * REGION),
            })
            .collect()
    }

    /// The copies to resync now.
    fn stale(&self) -> Vec<usize> {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (0..self.copies.len()).filter(|i| st.states[*i] != CopyState::Active).collect()
    }
}

/// Resyncs the volume's stale copies when they answer again, until the process ends.
pub async fn run_resync(volume: Arc<ReplicatedVolume>) {
    loop {
        tokio::time::sleep(RESYNC_EVERY).await;
        for i in volume.stale() {
            let v = volume.clone();
            let done = tokio::task::spawn_blocking(move || v.resync(i)).await;
            if let Ok(Err(e)) = done {
                tracing::warn!(volume = %volume.name, "resync: {e}");
            }
        }
    }
}

impl BlockVolume for ReplicatedVolume {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn allocated_bytes(&self) -> Result<u64, StoreError> {
        self.local.volume.allocated_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.local.volume.read_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), StoreError> {
        for (i, chunk) in data.chunks(PAYLOAD_BYTES_MAX).enumerate() {
            let at = offset + (i * PAYLOAD_BYTES_MAX) as u64;
            let n = chunk.len() as u64;
            self.fan_out(Kind::Write, at, n, 0, chunk, false, |c| c.volume.write_at(chunk, at))?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        for at in (offset..offset + length).step_by(1 << 30) {
            let n = (offset + length - at).min(1 << 30);
            self.fan_out(Kind::Trim, at, n, n as u32, &[], false, |c| c.volume.trim(at, n))?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode) -> Result<(), StoreError> {
        // A trimmed range reads as zeroes on every copy.
        for at in (offset..offset + length).step_by(1 << 30) {
            let n = (offset + length - at).min(1 << 30);
            self.fan_out(Kind::Trim, at, n, n as u32, &[], false, |c| {
                c.volume.write_zeroes(at, n, mode)
            })?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, length: u64, max: usize) -> Result<Vec<Extent>, StoreError> {
        self.local.volume.extents(offset, length, max)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.fan_out(Kind::Flush, 0, 0, 0, &[], false, |c| c.volume.sync())
    }

    fn resize(&self, _size_bytes: u64) -> Result<(), StoreError> {
        Err(io_error("resize", "resizing a replicated volume is not supported yet"))
    }
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, e.to_string())
}

async fn write(meta: &Member, compares: Vec<Compare>, success: Vec<Op>) -> ApiResult<bool> {
    let txn = Command::Txn { origin: meta.origin(), compares, success, failure: vec![] };
    match meta.request(ClientRequest::Write(txn)).await.map_err(unavailable)? {
        ClientReply::Written(Response::Txn { succeeded, .. }) => Ok(succeeded),
        other => Err(unavailable(format!("the metadata service answered {other:?}"))),
    }
}

/// Takes ownership of `name`: epoch one above the last (invariant 2).
pub async fn take_ownership(meta: &Member, name: &str) -> ApiResult<Owner> {
    let key = format!("/volumes/{name}/owner");
    for _ in 0..10 {
        let (current, version) = match meta
            .request(ClientRequest::Get { key: key.clone() })
            .await
            .map_err(unavailable)?
        {
            ClientReply::Value { entry: Some(e), .. } => {
                (serde_json::from_slice::<Owner>(&e.value).ok(), e.version)
            }
            _ => (None, 0),
        };
        let owner = Owner { node: meta.id(), epoch: current.map_or(1, |o| o.epoch + 1) };
        let value = serde_json::to_vec(&owner).expect("serializes");
        let put = Op::Put { key: key.clone(), value, lease: None };
        if write(meta, vec![Compare::Version(key.clone(), version)], vec![put]).await? {
            return Ok(owner);
        }
    }
    Err(unavailable(format!("could not take ownership of {name}: it keeps changing")))
}

/// Opens the owner's view of a replicated volume; a STALE copy's bitmap is read back
/// (a copy whose bitmap is missing needs every region).
pub fn open(
    node: &Node,
    meta: &Arc<Member>,
    record: &crate::registry::VolumeRecord,
    owner: Owner,
    rpc_of: impl Fn(u64) -> Option<String>,
) -> ApiResult<ReplicatedVolume> {
    let key = DataKey::from_secret(meta.secret());
    let bitmaps = node.dir().join("bitmaps");
    let mut local = None;
    let mut copies = Vec::new();
    let mut states = Vec::new();
    let mut dirty = Vec::new();
    let regions = record.size_bytes.div_ceil(REGION);
    for c in &record.components {
        let mut state = CopyState::parse(&c.state);
        let mut lacks = BTreeSet::new();
        // A bitmap on disk wins over an "active" record: the owner may have known a copy
        // stale without being able to record it (no quorum) before it restarted.
        let file = bitmaps.join(format!("{}.{}.{}", record.name, c.node, c.id));
        match std::fs::read_to_string(&file) {
            Ok(text) => lacks.extend(text.lines().filter_map(|l| l.parse::<u64>().ok())),
            Err(_) if state != CopyState::Active => lacks.extend(0..regions),
            Err(_) => {}
        }
        if state == CopyState::Active && !lacks.is_empty() {
            state = CopyState::Stale;
        }
        if c.node == meta.id() {
            let here = node.component(c.id).ok_or_else(|| {
                ApiError::new(ErrorCode::Io, format!("component {} is missing here", c.id))
            })?;
            local = Some(here);
            copies.push(Copy { node: c.node, id: c.id, peer: None });
        } else {
            let rpc = rpc_of(c.node).ok_or_else(|| {
                unavailable(format!("node {} (holding a component) has no address", c.node))
            })?;
            let peer = Arc::new(DataPeer::new(key.clone(), rpc));
            copies.push(Copy { node: c.node, id: c.id, peer: Some(peer) });
        }
        states.push(state);
        dirty.push(lacks);
    }
    let local = local.ok_or_else(|| ApiError::invalid("the owner holds no component"))?;
    let n = copies.len();
    Ok(ReplicatedVolume {
        name: record.name.clone(),
        size_bytes: record.size_bytes,
        epoch: owner.epoch,
        lsn: AtomicU64::new(0),
        min_replicas: record.min_replicas as usize,
        local,
        copies,
        state: Mutex::new(Copies {
            states,
            dirty,
            unflushed: vec![BTreeSet::new(); n],
            unrecorded: BTreeSet::new(),
        }),
        resync_lock: RwLock::new(()),
        meta: meta.clone(),
        owner,
        bitmaps,
        runtime: tokio::runtime::Handle::current(),
        resynced_bytes: AtomicU64::new(0),
    })
}

/// The RPC address of `node` from its record (this member's applied state).
pub fn rpc_of(meta: &Member, node: u64) -> Option<String> {
    meta.read_local(|s| {
        let e = s.get(&format!("/nodes/{node}"))?;
        let v: serde_json::Value = serde_json::from_slice(&e.value).ok()?;
        v["rpc"].as_str().map(str::to_owned)
    })
}

/// The nodes that are up, for placement (a linearizable read of the cluster status).
async fn candidates(meta: &Member) -> ApiResult<Vec<Candidate>> {
    let ClientReply::Status(status) =
        meta.request(ClientRequest::Status).await.map_err(unavailable)?
    else {
        return Err(unavailable("the metadata service answered something else"));
    };
    Ok(status
        .members
        .iter()
        .filter(|m| m.session.as_ref().is_some_and(|s| s.up))
        .filter_map(|m| {
            let r = m.record.as_ref()?;
            let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            Some(Candidate { id: m.id, rpc: text("rpc"), site: text("site"), rack: text("rack") })
        })
        .collect())
}

/// Creates a replicated volume owned by this node: the name is taken, components are
/// made on `replicas` nodes (this one first), ownership is taken, the record published
/// and the volume exported here. On a failure, what was made is removed again.
pub async fn create(
    node: &Arc<Node>,
    meta: &Arc<Member>,
    registry: &crate::registry::Registry,
    name: &str,
    size_bytes: u64,
    replicas: u32,
    min_replicas: u32,
) -> ApiResult<crate::node::VolumeInfo> {
    let up = candidates(meta).await?;
    let chosen = place(meta.id(), &up, replicas as usize).ok_or_else(|| {
        ApiError::invalid(format!(
            "{replicas} replicas need {replicas} nodes up; the cluster has {} up",
            up.len()
        ))
    })?;
    if chosen.first().is_none_or(|c| c.id != meta.id()) {
        return Err(unavailable("this node's session is not registered yet; retry"));
    }
    registry.reserve(name, size_bytes).await?;
    let key = DataKey::from_secret(meta.secret());
    let mut made: Vec<(Candidate, u64)> = Vec::new();
    let mut failure = None;
    for c in &chosen {
        let result = if c.id == meta.id() {
            let (node, of) = (node.clone(), name.to_owned());
            tokio::task::spawn_blocking(move || node.component_create(&of, size_bytes))
                .await
                .unwrap_or_else(|e| Err(ApiError::new(ErrorCode::Internal, e.to_string())))
        } else {
            let peer = DataPeer::new(key.clone(), c.rpc.clone());
            let h = request(Kind::Create, 0, 0, 0, size_bytes);
            match tokio::time::timeout(IO_TIMEOUT, peer.call(h, name.as_bytes())).await {
                Ok(Ok((reply, _))) => Ok(reply.component),
                Ok(Err(e)) => Err(unavailable(format!("node {}: {e}", c.id))),
                Err(_) => Err(unavailable(format!("node {} did not answer", c.id))),
            }
        };
        match result {
            Ok(id) => made.push((c.clone(), id)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let owner = match failure {
        None => take_ownership(meta, name).await,
        Some(e) => Err(e),
    };
    let components: Vec<ComponentRecord> = made
        .iter()
        .map(|(c, id)| ComponentRecord {
            node: c.id,
            id: *id,
            state: "active".into(),
            dirty_bytes: None,
        })
        .collect();
    let record = crate::registry::VolumeRecord {
        name: name.to_owned(),
        node: meta.id(),
        state: "ready".into(),
        id: String::new(),
        size_bytes,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        origin: None,
        snapshots: Vec::new(),
        replicas,
        min_replicas,
        components: components.clone(),
    };
    let done = match owner {
        Ok(owner) => match registry.publish(&record).await {
            Ok(()) => open(node, meta, &record, owner, |n| rpc_of(meta, n)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match done {
        Ok(volume) => {
            let volume = Arc::new(volume);
            tokio::spawn(run_resync(volume.clone()));
            node.add_replicated(name, volume);
            tracing::info!(volume = name, replicas, ?components, "replicated volume created");
            let nbd = node.nbd_addr();
            Ok(record.info(&nbd))
        }
        Err(e) => {
            // Undo: remove the components made, give the name back.
            for (c, id) in made {
                if c.id == meta.id() {
                    let _ = node.component_remove(id);
                } else {
                    let peer = DataPeer::new(key.clone(), c.rpc.clone());
                    let _ = tokio::time::timeout(
                        IO_TIMEOUT,
                        peer.call(request(Kind::Remove, id, 0, 0, 0), &[]),
                    )
                    .await;
                }
            }
            registry.release(name).await;
            Err(e)
        }
    }
}

/// After a restart: takes ownership again (a new epoch) of the replicated volumes this
/// node owned and exports them. Waits for the node's session first.
pub async fn reopen(node: Arc<Node>, meta: Arc<Member>, registry: Arc<crate::registry::Registry>) {
    while !meta.wait_registered(Duration::from_secs(60)).await {}
    for record in registry.owned_replicated() {
        let opened = async {
            let owner = take_ownership(&meta, &record.name).await?;
            open(&node, &meta, &record, owner, |n| rpc_of(&meta, n))
        };
        match opened.await {
            Ok(v) => {
                let v = Arc::new(v);
                tokio::spawn(run_resync(v.clone()));
                node.add_replicated(&record.name, v);
                tracing::info!(volume = %record.name, "replicated volume reopened");
            }
            Err(e) => tracing::error!(volume = %record.name, "cannot reopen: {}", e.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, site: &str, rack: &str) -> Candidate {
        Candidate { id, rpc: String::new(), site: site.into(), rack: rack.into() }
    }

    #[test]
    fn placement_spreads_over_sites_then_racks_and_needs_enough_nodes() {
        let nodes = [c(1, "a", "r1"), c(2, "a", "r1"), c(3, "a", "r2"), c(4, "b", "r1")];
        let ids = |v: Vec<Candidate>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(place(1, &nodes, 1).unwrap()), vec![1]);
        assert_eq!(ids(place(1, &nodes, 2).unwrap()), vec![1, 4], "another site first");
        assert_eq!(ids(place(1, &nodes, 3).unwrap()), vec![1, 4, 3], "then another rack");
        assert_eq!(ids(place(2, &nodes, 4).unwrap()), vec![2, 4, 3, 1]);
        assert!(place(1, &nodes, 5).is_none());
    }
}
