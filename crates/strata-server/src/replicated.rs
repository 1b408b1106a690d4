//! Replicated volumes (`docs/design/replication.md`): placement of components on distinct
//! nodes, ownership by CAS, the owner's write fan-out, STALE marking with synchronization
//! bitmaps, resync, forwarding from every node, and ownership moves. The records it
//! keeps and placement's choice are `strata_replica`'s (`record`, `placement`).
//!
//! Invariants:
//! 1. A volume's components are on distinct nodes, spread over sites then racks first.
//! 2. The owner holds `/volumes/<name>/owner = {node, epoch}`, taken by CAS with a higher
//!    epoch than any before and tied to its session's lease (it dies when the node is
//!    declared down or registers again). Every request it sends, and its own copy's
//!    writes, pass the components' fences at that epoch (`fencing.rs`), so once a new
//!    owner has touched a component nothing of an older owner applies there.
//! 3. An owner serves I/O only while its session is confirmed fresh (`T.owner_lease`, well
//!    under the session timeout): a paused or cut-off owner stops before anyone may take
//!    its place. A new owner fences every component (a probe at its epoch) before it
//!    serves anything.
//! 4. A write's reply means every ACTIVE copy holds it; a FLUSH/FUA reply, that every
//!    ACTIVE copy synced it. A copy that fails is STALE (recorded by CAS before the
//!    reply); a STALE copy's bitmap holds a write's regions (on file) *before* the write
//!    is sent anywhere. Below `min_replicas` ACTIVE copies a write fails.
//! 5. A new owner's copy is the truth: every other ACTIVE copy is compared with it by
//!    digest, region by region, and differing regions copied (in the background, while
//!    I/O goes on: a copy owing its scan serves no reads). So copies converge whatever
//!    was in flight when the old owner died. After a clean hand-over (`release`) the
//!    next owner compares none of the copies the last one vouched for, and takes a STALE
//!    copy's bitmap from the record instead of comparing that copy in full.
//! 6. Every node serves every replicated volume over NBD: the owner through its view,
//!    any other node by forwarding each request to the owner (retrying, while a new owner
//!    is chosen, for up to `T.forward_patience`: block writes are idempotent).
//! 7. Deleting a volume marks its record `deleting` by CAS, deleting its owner and move
//!    keys in the same transaction: from then no node takes it, its owner's next record
//!    change fails, and every node stops exporting it. Each node holding a copy removes
//!    it, then takes its component out of the record by CAS; the last one out deletes
//!    the record, and only then is the name free. A node down at the time does this when
//!    it returns; a node removed from the cluster is taken out by any node. A copy that
//!    no record lists (a rebuild whose record change failed, a volume deleted while its
//!    node was away for good) is removed once `ORPHAN_GRACE_SECS` old, after a
//!    linearizable read of its record confirms it.
//! 8. A volume grows (never shrinks) copies first, then its record: a copy larger than
//!    the record is harmless, and every node takes the record's size (its clients see it
//!    when they reconnect). A copy made later (a rebuild) takes the owner's size then.
//! 9. A copy on a node removed from the cluster is placed again: the owner makes a new
//!    component on an up member holding no copy (spread as in 1), hands the volume over
//!    cleanly to itself (every ACTIVE copy synced and vouched for), swaps the new
//!    component into the record in the removed one's place, STALE, by CAS compared with
//!    its owner key, and takes the volume again at the next epoch: the new copy is
//!    filled by a full digest scan, nothing else is compared. With no such member up,
//!    the copy stays STALE (the owner logs why, once) until one is.
//! 10. A node that is not the owner serves a read from its own copy only under a read
//!     lease: granted by the serving owner (whose member has not applied a newer take)
//!     while the copy is ACTIVE and owes no scan, valid for `T.read_lease` from when the
//!     node asked and only while the copy's fence is still at the granting epoch (held
//!     for the read). When a copy stops being ACTIVE, no write is acknowledged until
//!     its lease has run out; an owner letting go cleanly waits for every lease it
//!     granted; a take while the last owner's session is live (it did not let go, or
//!     it restarted and registered again), with a copy that could not be fenced,
//!     acknowledges nothing for `2 * T.read_lease`. So a copy serving a read holds every
//!     acknowledged write. Otherwise reads are forwarded to the owner.
//! 11. A node back from a power loss (`lost_power`) marks every copy it holds suspect, on
//!     file, and publishes the marks (`/suspect/NODE`): they may lack writes they had not
//!     synced, which other copies hold. While its copy is suspect it never takes the
//!     volume if another member holds an ACTIVE copy that is not known to be suspect too
//!     (its node down, or up with no mark published for it) — that member takes it, and
//!     compares this copy with its own — and otherwise only after every other up node
//!     with an ACTIVE copy. The mark comes off when an owner vouches for the copy (a WHOLE
//!     probe: ACTIVE, owing no scan, its last answer over that connection; `dataplane.rs`
//!     invariant 6), or when this node takes the volume (its copy is then as good as any
//!     there is: every other ACTIVE copy is suspect too, after a power loss of every
//!     node, or there is none; the node says which). A mark published late only delays a
//!     takeover; one unpublished late was taken off by an owner that vouched, whose own
//!     ACTIVE copy blocks the take (invariant 11 again) until it is up and suspect.

use crate::error::{ApiError, ApiResult};
use crate::fencing::{Fencing, Refused};
use crate::node::{Component, Node};
use crate::registry::{applied_record, records};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use strata_frame::client::{request, CallError, DataPeer};
use strata_frame::frame::{
    DataKey, Header, Kind, Status, DIGEST_UNIT, FLAG_FUA, FLAG_VOLUME, FLAG_WHOLE,
    PAYLOAD_BYTES_MAX,
};
use strata_io::{BlockVolume, Extent, IoOp, StoreError, ZeroMode};
use strata_meta::service::{ClientReply, ClientRequest, Member};
use strata_meta::state::{Command, Compare, Op, Response};
use strata_replica::error::ReplicaError;
use strata_replica::owner::{Finished, Found, OwnerState, Reply, SaveBitmap, Time, Track};
use strata_replica::placement::{place, place_one, Candidate};
use strata_replica::record::{
    regions_of, runs_of, ComponentRecord, CopyRef, CopyState, HandedBitmap, Owner, Released,
    VolumeRecord, VolumeState, HANDED_RUNS_MAX,
};
use strata_replica::takeover::{self, Truth};
use strata_replica::timing::Timing;
use strata_types::ErrorCode;

/// Every timeout and period of the protocol (`strata_replica::timing`): today's values.
const T: Timing = Timing::DEFAULT;

/// A copy held here that no volume's record lists is removed once this old (a copy being
/// made is listed within seconds; invariant 7).
const ORPHAN_GRACE_SECS: u64 = 300;
/// Regions compared per step of a digest scan.
const SCAN_BATCH: u64 = 16;
/// The most writes of one client fanned out together (`ReplicatedVolume::run_writes`).
const WRITE_BATCH_MAX: usize = 64;

/// The last owner's clean hand-over (`record.released`), if its word counts for a new
/// owner on node `me`: only if this node's copy was one of the level ones (the truth now
/// is what the last owner's copy was then), its node and id both.
fn handed_word(record: &VolumeRecord, me: u64) -> Option<&Released> {
    record.released.as_ref().filter(|r| {
        r.level.iter().any(|x| {
            x.node == me && record.components.iter().any(|c| c.node == x.node && c.id == x.id)
        })
    })
}

/// Bytes per bit of a synchronization bitmap (and per digest).
pub const REGION: u64 = DIGEST_UNIT;

/// One copy as the owner sees it.
struct Copy {
    node: u64,
    /// Its component id on `node` (changes when it is rebuilt on an emptied node).
    id: AtomicU64,
    /// `None`: the owner's own copy (`ReplicatedVolume::local`).
    peer: Option<Arc<DataPeer>>,
}

impl Copy {
    fn id(&self) -> u64 {
        self.id.load(Ordering::Acquire)
    }
}

/// The node's monotonic clock as the protocol core counts time: since the first call.
fn now() -> Time {
    origin().elapsed()
}

/// The instant of the core's time `t`.
fn instant(t: Time) -> Instant {
    origin() + t
}

fn origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// The regions of a volume with a request in flight.
#[derive(Default)]
struct InFlight {
    regions: Mutex<BTreeSet<u64>>,
    freed: tokio::sync::Notify,
}

/// A request's hold on its regions; dropping it lets overlapping requests go.
struct Turn<'a> {
    of: &'a InFlight,
    regions: Vec<u64>,
}

impl InFlight {
    /// Waits until no request in flight holds any of `regions`, then holds them all.
    async fn enter(&self, regions: Vec<u64>) -> Turn<'_> {
        loop {
            // Registered before looking, so a release between the look and the wait
            // still wakes this request.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut held = self.regions.lock().unwrap_or_else(|e| e.into_inner());
                if !regions.iter().any(|r| held.contains(r)) {
                    held.extend(regions.iter().copied());
                    return Turn { of: self, regions };
                }
            }
            freed.await;
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut held = self.of.regions.lock().unwrap_or_else(|e| e.into_inner());
        for r in &self.regions {
            held.remove(r);
        }
        self.of.freed.notify_waiters();
    }
}

/// A resync job's turn: its permit among this node's jobs and, if the copy's node
/// granted one, its slot there (the peer, the request that renews it, when it was last
/// granted). Dropped, the job ends here and gives the slot back.
struct ResyncTurn {
    /// Held for its drop.
    _permit: crate::resync::Permit,
    slot: Option<(Arc<DataPeer>, Header, tokio::time::Instant)>,
}

impl Drop for ResyncTurn {
    fn drop(&mut self) {
        let Some((peer, mut h, _)) = self.slot.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        // Given back in the background; if it does not arrive, the slot expires there.
        h.count = 0;
        runtime.spawn(async move {
            let _ = tokio::time::timeout(T.probe_timeout, peer.call(h, &[])).await;
        });
    }
}

/// The owner's view of a replicated volume: a `BlockVolume` whose writes go to every
/// ACTIVE (and RESYNCING) copy.
pub struct ReplicatedVolume {
    name: String,
    /// Grows when the volume does (`resize`).
    size_bytes: AtomicU64,
    epoch: u64,
    local: Component,
    copies: Vec<Copy>,
    /// The protocol core's state of the copies (`strata_replica::owner`).
    state: Mutex<OwnerState>,
    /// Client writes hold it shared; a resync step, or a read repair, holds it
    /// exclusively.
    resync_lock: tokio::sync::RwLock<()>,
    /// Held while a copy's state is recorded in the volume's record.
    recording: tokio::sync::Mutex<()>,
    /// Regions with a write or trim in flight: overlapping requests take turns, so every
    /// copy applies them in the same order (else copies could end up different).
    in_flight: InFlight,
    meta: Arc<Member>,
    owner: Owner,
    fencing: Arc<Fencing>,
    scheduler: Arc<crate::resync::Scheduler>,
    /// Client requests served (resync paces itself against them).
    client_ops: AtomicU64,
    /// When this node took the volume.
    taken_at: Instant,
    /// Nodes forwarding requests to this owner: node → (start of its current streak of
    /// requests, its last request).
    forwarders: Mutex<HashMap<u64, (Instant, Instant)>>,
    /// Set when this node finds it is no longer the owner; then it serves nothing.
    deposed: AtomicBool,
    /// How often every ACTIVE copy is compared with this one (zero: never).
    scrub_every: Duration,
    /// The incarnation of this node's session that the owner key is tied to: under a
    /// later one (the node was declared down and registered again) this view serves
    /// nothing, though its new session is fresh.
    incarnation: u64,
    /// Set once this owner has handed the volume over cleanly ([`Self::release`]).
    released: tokio::sync::Mutex<bool>,
    /// Set once it was logged that a removed node's copy has nowhere to go.
    unplaced: AtomicBool,
    bitmaps: PathBuf,
    runtime: tokio::runtime::Handle,
}

/// The owner's state, locked; in debug builds (every test) its invariants are checked
/// when the lock is let go, so each change is checked as it is made.
struct Checked<'a>(std::sync::MutexGuard<'a, OwnerState>);

impl std::ops::Deref for Checked<'_> {
    type Target = OwnerState;
    fn deref(&self) -> &OwnerState {
        &self.0
    }
}

impl std::ops::DerefMut for Checked<'_> {
    fn deref_mut(&mut self) -> &mut OwnerState {
        &mut self.0
    }
}

impl Drop for Checked<'_> {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        if !std::thread::panicking() {
            if let Err(v) = self.0.validate() {
                panic!("{v}");
            }
        }
    }
}

/// The error of a request this owner can no longer serve (its client retries at the
/// next owner).
fn deposed() -> StoreError {
    io_error("replicate", ReplicaError::Deposed { newer: None })
}

/// A core's refusal as the volume interface's error.
fn store_error(e: ReplicaError) -> StoreError {
    match e {
        ReplicaError::NoSpace => StoreError::NoSpace,
        e => io_error("replicate", e),
    }
}

fn io_error(what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::io(what)(std::io::Error::other(e.to_string()))
}

impl ReplicatedVolume {
    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id of the owner's own copy.
    pub fn local_id(&self) -> u64 {
        self.local.id()
    }

    /// The epoch this view owns the volume at.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The protocol core's state. A panic that left it half-changed deposes this view:
    /// it serves nothing more (the next owner compares the copies).
    fn state(&self) -> Checked<'_> {
        Checked(self.state.lock().unwrap_or_else(|e| {
            if !self.deposed.swap(true, Ordering::AcqRel) {
                tracing::error!(volume = %self.name, epoch = self.epoch,
                    "a panic left the owner's state half-changed: no longer serving");
            }
            e.into_inner()
        }))
    }

    /// The volume's size in bytes.
    fn size(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// Hands the volume over cleanly (a planned move; invariant 5): stops serving, lets
    /// every request in flight end, syncs every ACTIVE copy, and records in the volume's
    /// record (compared with the owner key) that at this epoch those copies were equal.
    /// The next owner, taking the epoch right after, need not compare them. Asked again,
    /// it answers as the first time.
    pub async fn release(&self) -> Result<(), String> {
        let mut released = self.released.lock().await;
        if *released {
            return Ok(());
        }
        if self.deposed() {
            return Err("this node no longer owns the volume".into());
        }
        // New requests find it deposed (their clients retry at the next owner); those
        // in flight hold the lock shared.
        self.let_go();
        let _exclusive = self.resync_lock.write().await;
        let plan = self.state().release();
        if plan.unrecorded {
            return Err("a copy's failure is not recorded yet".into());
        }
        // No write is in flight: a STALE copy's bitmap is all it lacks.
        let stale: Vec<HandedBitmap> = plan
            .stale
            .iter()
            .map(|(i, regions)| HandedBitmap {
                node: self.copies[*i].node,
                id: self.copies[*i].id(),
                runs: runs_of(regions),
            })
            .filter(|b| b.runs.len() <= HANDED_RUNS_MAX)
            .collect();
        // The next owner grants leases anew and waits for none of these (invariant 10).
        if let Some(until) = plan.leases_until.map(instant).filter(|u| *u > Instant::now()) {
            tokio::time::sleep_until(until.into()).await;
        }
        // Synced: nothing a copy acknowledged can be lost to a crash after the hand-over
        // (the next owner would not know to look for it).
        let deadline = tokio::time::Instant::now() + T.io_timeout;
        let mut level = Vec::new();
        for (i, c) in self.copies.iter().enumerate() {
            // A copy still owed a digest scan may differ: not vouched for.
            if !plan.level.contains(&i) {
                continue;
            }
            let synced = match &c.peer {
                None => self.apply_local(IoOp::Flush).await.map_err(|e| e.to_string()),
                Some(peer) => {
                    let h = request(Kind::Flush, c.id(), self.epoch, 0, 0);
                    match tokio::time::timeout_at(deadline, peer.call(h, &[])).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".into()),
                    }
                }
            };
            match synced {
                Ok(()) => level.push(CopyRef { node: c.node, id: c.id() }),
                // Left out: the next owner compares it.
                Err(e) => {
                    let node = c.node;
                    tracing::warn!(volume = %self.name, node, "no sync at the hand-over: {e}")
                }
            }
        }
        let me = &self.copies[self.local_index()];
        if !level.contains(&CopyRef { node: me.node, id: me.id() }) {
            return Err("this node's copy did not sync".into());
        }
        // If the owner key changed, the CAS keeps failing and the next owner compares
        // the copies.
        let mark = Released { epoch: self.epoch, level: level.clone(), stale };
        self.change_record(|record| {
            record.released = Some(mark.clone());
            Ok(())
        })
        .await?;
        *released = true;
        tracing::info!(volume = %self.name, epoch = self.epoch, copies = level.len(),
            "handed over cleanly: the copies are level and synced");
        Ok(())
    }

    /// Changes the volume's record by CAS compared with this owner's key (so only while
    /// it owns the volume at its epoch), reading it again after a lost race, 5 times at
    /// most. `change` may refuse, with the error returned.
    async fn change_record(
        &self,
        mut change: impl FnMut(&mut VolumeRecord) -> Result<(), String>,
    ) -> Result<(), String> {
        let key = format!("/volumes/{}", self.name);
        let owner_key = format!("/volumes/{}/owner", self.name);
        let owner_value = serde_json::to_vec(&self.owner).expect("serializes");
        for _ in 0..5 {
            let (mut record, version) =
                read_record(&self.meta, &self.name).await.map_err(|e| e.message)?;
            change(&mut record)?;
            let value = serde_json::to_vec(&record).expect("serializes");
            let compares = vec![
                Compare::Value(owner_key.clone(), owner_value.clone()),
                Compare::Version(key.clone(), version),
            ];
            let put = Op::Put { key: key.clone(), value, lease: None };
            match write(&self.meta, compares, vec![put]).await {
                Ok(true) => return Ok(()),
                Ok(false) => continue,
                Err(e) => return Err(e.message),
            }
        }
        Err("the volume's record keeps changing, or another node owns it".into())
    }

    /// The index of the owner's own copy in `copies`.
    fn local_index(&self) -> usize {
        self.copies.iter().position(|c| c.peer.is_none()).expect("the owner holds a copy")
    }

    /// Whether this view may serve I/O now (invariant 3).
    pub fn serving(&self) -> bool {
        !self.deposed()
            && self.meta.incarnation() == self.incarnation
            && self.meta.session_fresh(T.owner_lease)
    }

    /// Notes a request forwarded by node `from` (for automatic moves).
    pub fn note_forwarded(&self, from: u64) {
        let now = Instant::now();
        let mut f = self.forwarders.lock().unwrap_or_else(|e| e.into_inner());
        let entry = f.entry(from).or_insert((now, now));
        if now.duration_since(entry.1) > T.streak_gap {
            entry.0 = now; // A new streak.
        }
        entry.1 = now;
    }

    /// The node that alone has been sending this volume's I/O for at least `after`, if
    /// this owner has had no client of its own for as long (the automatic move).
    fn sole_user(&self, after: Duration, local: Option<Instant>) -> Option<u64> {
        if local.is_some_and(|t| t.elapsed() < after) {
            return None;
        }
        let f = self.forwarders.lock().unwrap_or_else(|e| e.into_inner());
        let recent: Vec<(&u64, &(Instant, Instant))> =
            f.iter().filter(|(_, (_, last))| last.elapsed() < after).collect();
        match recent.as_slice() {
            [(node, (first, last))]
                if first.elapsed() >= after && last.elapsed() < T.streak_gap =>
            {
                Some(**node)
            }
            _ => None,
        }
    }

    /// Whether this node found it is no longer the owner.
    pub fn deposed(&self) -> bool {
        self.deposed.load(Ordering::Acquire)
    }

    /// Stops serving: another node owns the volume now (or may).
    pub fn depose(&self, why: &str) {
        if !self.deposed.swap(true, Ordering::AcqRel) {
            tracing::warn!(volume = %self.name, epoch = self.epoch, "no longer the owner: {why}");
        }
    }

    /// [`ReplicatedVolume::depose`] for a planned hand-over: nothing is wrong.
    fn let_go(&self) {
        if !self.deposed.swap(true, Ordering::AcqRel) {
            tracing::info!(volume = %self.name, epoch = self.epoch, "handing the volume over");
        }
    }

    fn bitmap_file(&self, i: usize) -> String {
        format!("{}.{}.{}", self.name, self.copies[i].node, self.copies[i].id())
    }

    /// Saves copy `i`'s bitmap with the epoch and boot it was kept at (a later owner
    /// trusts it only at the next epoch, in the same boot). The caller holds the state
    /// lock, so saves follow the changes in order.
    ///
    /// Replaced by a rename, not synced: a sync per write that marks a new region made
    /// writes to a volume with a stale copy crawl (200 a second). The file survives the
    /// process (kill -9) but maybe not the machine, so it records the kernel's boot id and
    /// is trusted only within the same boot (`open`); after a reboot the copy is scanned.
    /// Saves copy `i`'s bitmap. `owed_scan`: the copy still owes a digest scan (a change
    /// of owner's), which the bitmap does not cover: saved at epoch 0, which no later
    /// owner trusts, so the next one scans it in full.
    fn save_bitmap(
        &self,
        i: usize,
        dirty: &BTreeSet<u64>,
        owed_scan: bool,
    ) -> Result<(), StoreError> {
        let epoch = if owed_scan { 0 } else { self.epoch };
        let mut text = format!("epoch {epoch} boot {}\n", boot_id());
        text.extend(dirty.iter().map(|r| format!("{r}\n")));
        std::fs::create_dir_all(&self.bitmaps).map_err(|e| io_error("bitmap", e))?;
        let path = self.bitmaps.join(self.bitmap_file(i));
        let tmp = self.bitmaps.join(format!("{}.tmp", self.bitmap_file(i)));
        std::fs::write(&tmp, text.as_bytes())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| io_error("bitmap", e))
    }

    /// Copy `i` failed during its resync: the regions it took since its last flush may
    /// be lost with its page cache, so they go back into its bitmap (on file).
    fn lose_unflushed(&self, i: usize) -> Result<(), StoreError> {
        let mut st = self.state();
        let save = st.lose_unflushed(i);
        // Saved under the state lock: saves follow the changes in order.
        self.save_bitmaps(&st, &[save])
    }

    /// Records copy `i`'s state (and, with `new_id`, its new component id) in the
    /// volume's record, by CAS, only while this node is still the owner at its epoch.
    async fn record(&self, i: usize, to: CopyState, new_id: Option<u64>) -> Result<(), String> {
        // One change of the record at a time: writes failing together on one copy all
        // want the same mark, and racing CASes made some give up (and fail their write).
        let _recording = self.recording.lock().await;
        let (meta, name, owner) = (self.meta.clone(), self.name.clone(), self.owner);
        let (node, id) = (self.copies[i].node, self.copies[i].id());
        let stale_lsn = match to {
            CopyState::Active => None,
            _ => self.state()[i].missed_from,
        };
        let result = async move {
            let key = format!("/volumes/{name}");
            for _ in 0..5 {
                let got = meta.request(ClientRequest::Get { key: key.clone() }).await;
                let Ok(ClientReply::Value { entry: Some(e), .. }) = got else {
                    return Err((false, format!("cannot read the record of {name}")));
                };
                let mut record: VolumeRecord =
                    serde_json::from_slice(&e.value).map_err(|e| (false, e.to_string()))?;
                let want = new_id.unwrap_or(id);
                if record.components.iter().any(|c| {
                    c.node == node
                        && c.id == want
                        && c.state == to
                        && c.stale_lsn == stale_lsn
                        && new_id.is_none()
                }) {
                    return Ok(()); // Recorded already (by a write that failed with this one).
                }
                for c in &mut record.components {
                    if c.node == node && c.id == id {
                        c.state = to;
                        c.id = new_id.unwrap_or(id);
                        c.stale_lsn = stale_lsn;
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
                            return Err((true, format!("no longer the owner of {name}")));
                        }
                    }
                    Err(e) => return Err((false, e.message)),
                }
            }
            Err((false, "the record keeps changing".into()))
        }
        .await;
        let result = result.map_err(|(deposed, e)| {
            if deposed {
                self.depose(&e);
            }
            e
        });
        if result.is_ok() {
            if let Some(new_id) = new_id {
                self.copies[i].id.store(new_id, Ordering::Release);
            }
            // Level with the owner's copy if ACTIVE (the caller holds the exclusive lock).
            self.state().recorded(i, to, new_id);
            tracing::info!(volume = %self.name, node, component = id, state = to.name(), "copy");
        }
        result
    }

    /// Runs the request (not a read) on every ACTIVE or RESYNCING remote copy and on the
    /// owner's own copy under its fence. The regions it covers go to every STALE copy's
    /// bitmap (on file) before anything is sent; a copy that fails is
    /// marked STALE before the reply; the request fails if fewer than `min_replicas`
    /// copies are ACTIVE, or if a component has seen a newer owner (then this view is
    /// deposed). Runs on the runtime: no thread waits for the network. The caller runs it
    /// to its end (a spawned task), never dropping it halfway.
    async fn fan_out(&self, op: IoOp) -> Result<(), StoreError> {
        self.fan_out_all(vec![op]).await
    }

    /// Requests applied on every copy together: one request of any kind, or writes of
    /// which no two touch one region. Each gets its LSN; each copy gets all their frames
    /// in one send (and applies the writes with one store call, `dataplane.rs`
    /// invariant 5), this copy too. They are acknowledged together: a copy took them if
    /// it took every one, else it failed.
    async fn fan_out_all(&self, ops: Vec<IoOp>) -> Result<(), StoreError> {
        let wires: Vec<(Kind, u64, u64)> = ops.iter().map(wire).collect();
        let payloads: Vec<(Bytes, bool)> = ops
            .iter()
            .map(|op| match op {
                IoOp::Write { data, fua, .. } => (data.clone(), *fua),
                _ => (Bytes::new(), false),
            })
            .collect();
        let flush = matches!(ops[..], [IoOp::Flush]);
        let _shared = self.resync_lock.read().await;
        if self.deposed() {
            return Err(deposed());
        }
        self.client_ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
        // The owner's own copy first: writes it would refuse for want of space are refused
        // before any copy takes them (copies that took them would differ from it, with no
        // bitmap to say so). A copy whose node is full is handled after (below).
        let bytes: u64 = payloads.iter().map(|(p, _)| p.len() as u64).sum();
        if bytes > 0 && !self.local.volume.has_room(bytes, ops.len()) {
            return Err(StoreError::NoSpace);
        }
        let regions: Vec<u64> = {
            let mut all = BTreeSet::new();
            for (_, offset, length) in wires.iter().filter(|w| w.2 > 0) {
                all.extend(offset / REGION..=(offset + length - 1) / REGION);
            }
            all.into_iter().collect()
        };
        let _turn = match regions.is_empty() {
            true => None,
            false => Some(self.in_flight.enter(regions.clone()).await),
        };
        // Deposed while it waited: nothing of it is sent (the fences refuse it anyway).
        if self.deposed() {
            return Err(deposed());
        }
        // Planned by the core: LSNs, and the write's regions in every STALE copy's bitmap
        // (on file) before any copy has it (invariant 4), whatever happens next. Saved
        // under the state lock, so saves follow the changes in order.
        let write = {
            let mut st = self.state();
            let (write, saves) = st.begin(ops.len(), &regions, flush);
            if let Err(e) = self.save_bitmaps(&st, &saves) {
                st.abandon(&write);
                return Err(e);
            }
            write
        };
        // Sent to every remote copy first, then the own copy written, then the replies
        // awaited.
        let deadline = tokio::time::Instant::now() + T.io_timeout;
        let mut sent = Vec::with_capacity(write.targets.len());
        for &i in &write.targets {
            let Some(peer) = &self.copies[i].peer else { continue };
            let id = self.copies[i].id();
            let requests: Vec<_> = wires
                .iter()
                .zip(&payloads)
                .enumerate()
                .map(|(j, ((kind, offset, length), (payload, fua)))| {
                    let mut h = request(*kind, id, self.epoch, write.first + j as u64, *offset);
                    if *kind == Kind::Trim {
                        h.count = *length as u32;
                    }
                    if *fua {
                        h.flags = FLAG_FUA; // Written and synced there in one trip.
                    }
                    (h, &payload[..])
                })
                .collect();
            let send = tokio::time::timeout_at(deadline, peer.send_many(&requests)).await;
            sent.push((
                i,
                match send {
                    Ok(Ok(p)) => Ok(p),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                },
            ));
        }
        let here = match self.fencing.enter(self.local.id(), self.epoch).await {
            Ok(_pass) => self.apply_local_all(ops).await,
            Err(Refused::Stale(newest)) => {
                self.depose(&format!("this node's copy has seen epoch {newest}"));
                Err(deposed())
            }
            Err(Refused::Io) => Err(io_error("replicate", "cannot persist the epoch fence")),
        };
        let mut replies = Vec::with_capacity(sent.len());
        for (i, p) in sent {
            let pending = match p {
                Ok(p) => p,
                Err(why) => {
                    replies.push((i, Reply::Failed { why }));
                    continue;
                }
            };
            let mut reply = None;
            for p in pending {
                let failure = match tokio::time::timeout_at(deadline, p.wait()).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(CallError::Status { status: Status::StaleEpoch, epoch, .. })) => {
                        Reply::StaleEpoch { newest: epoch }
                    }
                    Ok(Err(e @ CallError::Status { status: Status::NoSpace, .. })) => {
                        Reply::NoSpace { why: e.to_string() }
                    }
                    Ok(Err(e)) => Reply::Failed { why: e.to_string() },
                    Err(_) => Reply::Failed { why: "timed out".to_owned() },
                };
                // A newer epoch outranks any other failure of the copy.
                if reply.is_none() || matches!(failure, Reply::StaleEpoch { .. }) {
                    reply = Some(failure);
                }
            }
            let connection = self.copies[i].peer.as_ref().map_or(0, |p| p.connections());
            replies.push((i, reply.unwrap_or(Reply::Took { connection })));
        }
        // A failed copy is STALE from now on in memory, and what it may lack goes to its
        // bitmap (on file) before anything else: the write's regions, every region in
        // flight and every region written since its last flush. Even if the mark cannot
        // be recorded, the copy is brought level later, never left silently different.
        let (full, record) = {
            let mut st = self.state();
            match st.finish(&write, replies, here.is_ok()) {
                Finished::Deposed { newest } => {
                    drop(st);
                    self.depose(&format!("a copy has seen epoch {newest}"));
                    return Err(deposed());
                }
                Finished::Folded { saves, failed, full, record } => {
                    for (i, e) in &failed {
                        let node = self.copies[*i].node;
                        tracing::warn!(volume = %self.name, node, "a copy failed: {e}");
                    }
                    self.save_bitmaps(&st, &saves)?;
                    (full, record)
                }
            }
        };
        if self.deposed() {
            return Err(deposed());
        }
        here?;
        // Every STALE mark is recorded before the reply (and recording fails once this
        // node is no longer the owner at its epoch: then nothing more is acknowledged).
        for i in record {
            self.record(i, CopyState::Stale, None).await.map_err(|e| {
                // Not sure to own the volume any more (another node took it while this
                // one was paused or cut off, or its session was renewed): deposed, so
                // that the write is retried at the owner (whichever node that is), not
                // failed to the client. The next owner, taking without a clean
                // hand-over, compares the copies.
                let why = ReplicaError::Unrecorded { why: e }.to_string();
                self.depose(&why);
                io_error("replicate", why)
            })?;
        }
        // A copy's node is full: the copy is STALE like any failed one (its bitmap has the
        // write, and the resync levels it once that node has room again), and the client
        // gets ENOSPC, as from a single disk, so that a VM pauses (qemu's werror=enospc)
        // and the operator frees space, instead of running on with a copy fewer unseen.
        // The write is on the other copies: a retry (qemu's, on resume) goes to them.
        //
        // A copy that missed this write (or an earlier one) may still serve reads under
        // its lease: acknowledged once that has run out (invariant 10).
        let hold = self.state().conclude(full, now()).map_err(store_error)?;
        if let Some(until) = hold {
            tokio::time::sleep_until(instant(until).into()).await;
        }
        Ok(())
    }

    /// Saves the bitmaps the core asked for, in order (the caller holds the state lock,
    /// so saves follow the changes in order).
    fn save_bitmaps(&self, _st: &OwnerState, saves: &[SaveBitmap]) -> Result<(), StoreError> {
        for save in saves {
            self.save_bitmap(save.copy, &save.regions, save.owes_scan)?;
        }
        Ok(())
    }

    /// A read lease for the copy on `node` (invariant 10): granted while this owner
    /// serves and the copy is ACTIVE, owes no digest scan, and answers a probe over the
    /// connection its writes were acknowledged on (a node that restarted since, maybe
    /// after a power loss that took writes it had not synced, gets none: its next write
    /// fails the copy). Returns the copy's id.
    pub async fn grant_lease(&self, node: u64) -> Option<u64> {
        let i = self.copies.iter().position(|c| c.node == node && c.peer.is_some())?;
        let peer = self.copies[i].peer.clone()?;
        if !self.serving() || !self.state().whole(i, peer.connections()) {
            return None;
        }
        let probe = request(Kind::Probe, self.copies[i].id(), self.epoch, 0, 0);
        let answered = tokio::time::timeout(T.read_lease / 4, peer.call(probe, &[])).await;
        if !matches!(answered, Ok(Ok(_))) {
            return None;
        }
        // Not once this member has applied a newer owner's take.
        let key = format!("/volumes/{}/owner", self.name);
        let owner = self.meta.read_local(|s| {
            s.get(&key).and_then(|e| serde_json::from_slice::<Owner>(&e.value).ok())
        });
        if owner.is_none_or(|o| o != self.owner) || !self.serving() {
            return None;
        }
        // Counted from now: the node counts from when it asked, which was earlier.
        let granted = self.state().grant(i, peer.connections(), now() + T.read_lease);
        granted.then(|| self.copies[i].id())
    }

    /// The owner's own copy's part of a request (the caller holds its fence pass): a
    /// write goes straight to the page cache when it can, else (and every other kind)
    /// through the store's blocking calls on the blocking pool; a flush, or a write's
    /// FUA, joins the copy's group sync.
    async fn apply_local(&self, op: IoOp) -> Result<(), StoreError> {
        let volume = self.local.volume.clone();
        match op {
            IoOp::Write { offset, data, fua } => {
                if !volume.try_write_at_nowait(&data, offset)? {
                    volume.submit(IoOp::Write { offset, data, fua: false }).await?;
                }
                if fua {
                    self.local.sync().await?;
                }
                Ok(())
            }
            IoOp::Flush => self.local.sync().await,
            op => volume.submit(op).await.map(drop),
        }
    }

    /// [`Self::apply_local`] for what `fan_out_all` sends: one request, or writes (with one
    /// store call, and one group sync if any of them is FUA).
    async fn apply_local_all(&self, mut ops: Vec<IoOp>) -> Result<(), StoreError> {
        if ops.len() == 1 {
            return self.apply_local(ops.pop().expect("one")).await;
        }
        let mut fua = false;
        let mut writes = Vec::with_capacity(ops.len());
        for op in ops {
            let IoOp::Write { offset, data, fua: f } = op else {
                unreachable!("only writes are applied together")
            };
            fua |= f;
            writes.push((offset, data));
        }
        self.local.write_together(writes).await?;
        if fua {
            self.local.sync().await?;
        }
        Ok(())
    }

    /// Writes that came together (each at most `PAYLOAD_BYTES_MAX`): sent in batches of
    /// which no two writes touch one region (a later one that would goes in the next
    /// batch, after), each batch acknowledged as one. Their outcomes, in their order.
    pub async fn run_writes(&self, ops: Vec<IoOp>) -> Vec<Result<(), StoreError>> {
        let mut out = Vec::with_capacity(ops.len());
        let mut batch: Vec<IoOp> = Vec::new();
        let mut touched = BTreeSet::new();
        let mut ops = ops.into_iter().peekable();
        while let Some(op) = ops.next() {
            let (_, offset, length) = wire(&op);
            let regions = offset / REGION..=(offset + length.max(1) - 1) / REGION;
            if regions.clone().any(|r| touched.contains(&r)) {
                self.run_batch(std::mem::take(&mut batch), &mut out).await;
                touched.clear();
            }
            touched.extend(regions);
            batch.push(op);
            if batch.len() >= WRITE_BATCH_MAX || ops.peek().is_none() {
                self.run_batch(std::mem::take(&mut batch), &mut out).await;
                touched.clear();
            }
        }
        out
    }

    /// Fans out one batch of [`Self::run_writes`], adding each write's outcome to `out`.
    async fn run_batch(&self, batch: Vec<IoOp>, out: &mut Vec<Result<(), StoreError>>) {
        let n = batch.len();
        if n == 0 {
            return;
        }
        match self.fan_out_all(batch).await {
            Ok(()) => out.extend((0..n).map(|_| Ok(()))),
            Err(e) => {
                out.extend((1..n).map(|_| Err(io_error("replicate", &e))));
                out.push(Err(e));
            }
        }
    }

    /// One client request (at most `PAYLOAD_BYTES_MAX` of data, a trim at most 4 GiB).
    pub async fn run(self: &Arc<Self>, op: IoOp) -> Result<Bytes, StoreError> {
        match op {
            IoOp::Read { offset, length } => self.read(offset, length).await,
            op => self.fan_out(op).await.map(|()| Bytes::new()),
        }
    }

    /// Reads the owner's copy: from the page cache when it can, else on the blocking
    /// pool (with read repair, `read_local`).
    async fn read(self: &Arc<Self>, offset: u64, length: usize) -> Result<Bytes, StoreError> {
        self.client_ops.fetch_add(1, Ordering::Relaxed);
        let mut buf = vec![0u8; length];
        match self.local.volume.try_read_at_nowait(&mut buf, offset) {
            Ok(true) => return Ok(Bytes::from(buf)),
            Ok(false) | Err(StoreError::Corrupt { .. }) => {}
            Err(e) => return Err(e),
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            me.read_local(&mut buf, offset, false).map(|()| Bytes::from(buf))
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::io("read")(std::io::Error::other(e))))
    }

    /// Makes regions `regions` of copy `i` equal to the owner's copy: their digests are
    /// compared and the regions that differ copied. The caller holds the exclusive lock.
    async fn level(
        self: &Arc<Self>,
        i: usize,
        regions: std::ops::Range<u64>,
    ) -> Result<(), String> {
        let peer = self.copies[i].peer.clone().ok_or("the owner's own copy")?;
        let id = self.copies[i].id();
        let offset = regions.start * REGION;
        let end = (regions.end * REGION).min(self.size());
        // The owner's copy is read on the blocking pool (a store read, with read repair).
        let me = self.clone();
        let ours = tokio::task::spawn_blocking(move || {
            let mut ours = vec![0u8; (end - offset) as usize];
            me.read_local(&mut ours, offset, true).map(|()| ours)
        })
        .await
        .map_err(|e| format!("reading this node's copy: {e}"))?
        .map_err(|e| e.to_string())?;
        let mut h = request(Kind::Digest, id, self.epoch, 0, offset);
        h.count = ours.len() as u32;
        let theirs = match tokio::time::timeout(T.io_timeout, peer.call(h, &[])).await {
            Ok(Ok((_, digests))) => digests,
            Ok(Err(e)) => return Err(format!("copy {id}: {e}")),
            Err(_) => return Err(format!("copy {id} did not answer")),
        };
        // The regions that differ, all sent before any reply is awaited.
        let differ: Vec<(u64, &[u8])> = ours
            .chunks(REGION as usize)
            .enumerate()
            .filter(|(k, piece)| {
                theirs.get(k * 32..k * 32 + 32) != Some(blake3::hash(piece).as_bytes())
            })
            .map(|(k, piece)| (regions.start + k as u64, piece))
            .collect();
        let wrote = async {
            let deadline = tokio::time::Instant::now() + T.io_timeout;
            let mut sent = Vec::new();
            for (region, piece) in &differ {
                let lsn = self.state().next_lsn();
                // A region of zeroes travels as a trim (it reads as zeroes there too): a
                // copy on a full node is levelled by freeing space, not taking more.
                let zeroes = piece.iter().all(|b| *b == 0);
                let kind = if zeroes { Kind::Trim } else { Kind::Write };
                let mut h = request(kind, id, self.epoch, lsn, region * REGION);
                let payload: &[u8] = if zeroes {
                    h.count = piece.len() as u32;
                    &[]
                } else {
                    piece
                };
                sent.push(tokio::time::timeout_at(deadline, peer.send(h, payload)).await);
            }
            for p in sent {
                let Ok(Ok(p)) = p else { return false };
                if !matches!(tokio::time::timeout_at(deadline, p.wait()).await, Ok(Ok(_))) {
                    return false;
                }
            }
            true
        }
        .await;
        if !wrote {
            return Err(format!("copy {id} failed during its resync"));
        }
        let copied = differ.iter().map(|(_, piece)| piece.len() as u64).sum();
        self.state().levelled(i, regions, copied);
        Ok(())
    }

    /// Copy `i` failed while being levelled: STALE (recorded later if not now), and what
    /// it took since its last flush back in its bitmap.
    async fn fail_copy(&self, i: usize, why: String) -> String {
        self.state().stale(i);
        if let Err(e) = self.lose_unflushed(i) {
            return format!("{why}; its bitmap cannot be saved: {e}");
        }
        // Recorded now if it can be (else by the next write, or the next resync).
        let _ = self.record(i, CopyState::Stale, None).await;
        why
    }

    /// Waits for copy `i`'s resync job's turn among this node's jobs, then for a slot on
    /// the copy's node (`resync.rs` invariants 2 and 3). `None`: deposed meanwhile.
    async fn resync_turn(&self, i: usize, peer: &Arc<DataPeer>) -> Option<ResyncTurn> {
        let level = self.scheduler.level(self.active_copies());
        let node = self.copies[i].node;
        let mut permit = self.scheduler.start(&self.name, node, level).await;
        let mut told = false;
        loop {
            if self.deposed() {
                return None;
            }
            let h = self.slot_request(i, permit.job(), true);
            match tokio::time::timeout(T.probe_timeout, peer.call(h, &[])).await {
                Ok(Ok(_)) => {
                    let at = tokio::time::Instant::now();
                    let slot = Some((peer.clone(), h, at));
                    tracing::info!(volume = %self.name, node, active = level.active,
                        "resync: a job starts copying to a copy");
                    return Some(ResyncTurn { _permit: permit, slot });
                }
                Ok(Err(CallError::Status { status: Status::Busy, .. })) => {
                    if !told {
                        told = true;
                        tracing::info!(volume = %self.name, node, active = level.active,
                            "resync: the copy's node has no slot free; the job waits its turn");
                    }
                    permit = permit.refused().await;
                }
                // Its own requests find out whether the copy answers.
                _ => return Some(ResyncTurn { _permit: permit, slot: None }),
            }
        }
    }

    /// A `ResyncSlot` request for job `job` writing to copy `i`: take (or renew) the
    /// slot, or give it back.
    fn slot_request(&self, i: usize, job: u64, take: bool) -> Header {
        let mut h =
            request(Kind::ResyncSlot, self.copies[i].id(), self.epoch, self.owner.node, job);
        h.count = u32::from(take);
        h
    }

    /// After a step of a resync job: its pause (`resync.rs` invariant 4), and its slot
    /// renewed when it is due.
    async fn pace(&self, pacer: &mut crate::resync::Pacer, turn: &mut ResyncTurn) {
        tokio::time::sleep(pacer.after_step(self.client_ops.load(Ordering::Relaxed))).await;
        let Some((peer, h, at)) = turn.slot.as_mut() else { return };
        if at.elapsed() < crate::resync::SLOT_RENEW {
            return;
        }
        let renewed = tokio::time::timeout(T.probe_timeout, peer.call(*h, &[])).await;
        if matches!(renewed, Ok(Ok(_))) {
            *at = tokio::time::Instant::now();
        } else {
            // The job goes on: stopping halfway would waste what it copied.
            tracing::debug!(volume = %self.name, "resync: the slot was not renewed");
        }
    }

    /// Brings copy `i` level with the owner's: a STALE copy that answers again becomes
    /// RESYNCING (new writes reach it); then, in its turn among the node's resync jobs
    /// and with a slot on the copy's node, a digest scan, if one is due, compares every
    /// region; the regions of its bitmap are copied (each compared first); then, flushed,
    /// it is ACTIVE. Each step holds the exclusive lock, so no client write interleaves.
    async fn resync(self: &Arc<Self>, i: usize) -> Result<(), String> {
        let Some(peer) = self.copies[i].peer.clone() else {
            return Err("the owner's own copy is recorded as not active".into());
        };
        if self.deposed() {
            return Ok(());
        }
        let id = self.copies[i].id();
        let epoch = self.epoch;
        let was = self.state()[i].state;
        if was != CopyState::Active {
            let h = request(Kind::Probe, id, epoch, 0, 0);
            let probe = tokio::time::timeout(T.probe_timeout, peer.call(h, &[])).await;
            match probe {
                Ok(Ok(_)) => {}
                Ok(Err(CallError::Status { status: Status::NotFound, .. })) => {
                    return self.rebuild(i).await;
                }
                _ => return Ok(()), // Still away.
            }
            // Under the exclusive lock: no write is between reading the states and adding
            // its bits, so none can miss both this copy and its bitmap.
            let _exclusive = self.resync_lock.write().await;
            let unrecorded = self.state()[i].unrecorded;
            if unrecorded {
                // Its STALE mark first (it could not be recorded when the copy failed).
                self.record(i, CopyState::Stale, None).await?;
            }
            self.record(i, CopyState::Resyncing, None).await?;
            // Whole from this connection on; if it changes before the end, the resync fails.
            self.state()[i].connection = Some(peer.connections());
        }
        let regions = self.size().div_ceil(REGION);
        // The copying waits its turn among the node's resync jobs, and paces itself.
        let Some(mut turn) = self.resync_turn(i, &peer).await else {
            return Ok(());
        };
        let mut pacer = crate::resync::Pacer::new(self.client_ops.load(Ordering::Relaxed));
        loop {
            let Some(from) = self.state()[i].scan else {
                break;
            };
            if self.deposed() {
                return Ok(());
            }
            let exclusive = self.resync_lock.write().await;
            let to = (from + SCAN_BATCH).min(regions);
            if let Err(e) = self.level(i, from..to).await {
                drop(exclusive);
                return Err(self.fail_copy(i, e).await);
            }
            self.state()[i].scan = (to < regions).then_some(to);
            drop(exclusive);
            self.pace(&mut pacer, &mut turn).await;
        }
        loop {
            // A run of up to SCAN_BATCH consecutive bitmap regions per step.
            let run = {
                let st = self.state();
                let mut run = st[i].dirty.iter().copied();
                run.next().map(|first| {
                    let n = 1 + run
                        .take(SCAN_BATCH as usize - 1)
                        .enumerate()
                        .take_while(|(k, r)| *r == first + 1 + *k as u64)
                        .count() as u64;
                    first..first + n
                })
            };
            let Some(run) = run else { break };
            if self.deposed() {
                return Ok(());
            }
            let exclusive = self.resync_lock.write().await;
            if let Err(e) = self.level(i, run.clone()).await {
                drop(exclusive);
                return Err(self.fail_copy(i, e).await);
            }
            {
                let mut st = self.state();
                for region in run {
                    st[i].dirty.remove(&region);
                }
                let owed_scan = st[i].scan.is_some();
                self.save_bitmap(i, &st[i].dirty, owed_scan).map_err(|e| e.to_string())?;
            }
            drop(exclusive);
            self.pace(&mut pacer, &mut turn).await;
        }
        if was == CopyState::Active {
            return Ok(()); // A scan of an active copy: nothing else changes.
        }
        // Everything it lacked is copied and new writes reach it: make it durable there,
        // then ACTIVE — all under the exclusive lock, so no write fails on it meanwhile
        // (a write that failed before left bits, and the loop goes round again).
        let exclusive = self.resync_lock.write().await;
        {
            let st = self.state();
            let level = st[i].dirty.is_empty() && st[i].scan.is_none();
            if !level || st[i].state != CopyState::Resyncing {
                return Ok(()); // Marked again meanwhile: the next round resyncs it.
            }
        }
        let h = request(Kind::Flush, id, epoch, 0, 0);
        let flushed = tokio::time::timeout(T.io_timeout, peer.call(h, &[])).await;
        if !matches!(flushed, Ok(Ok(_))) {
            drop(exclusive);
            let why = format!("copy {id} failed to flush after its resync");
            return Err(self.fail_copy(i, why).await);
        }
        let same = self.state()[i].connection == Some(peer.connections());
        if !same {
            drop(exclusive);
            let why = format!("copy {id} was reached over a new connection during its resync");
            return Err(self.fail_copy(i, why).await);
        }
        self.state()[i].unflushed.clear();
        self.record(i, CopyState::Active, None).await?;
        drop(exclusive);
        drop(turn);
        let _ = std::fs::remove_file(self.bitmaps.join(self.bitmap_file(i)));
        Ok(())
    }

    /// Copy `i`'s node answers but no longer has the component (it came back with an
    /// empty disk): a new component is made there, recorded in its place (RESYNCING),
    /// and filled by a full digest scan.
    async fn rebuild(self: &Arc<Self>, i: usize) -> Result<(), String> {
        let peer = self.copies[i].peer.clone().ok_or("the owner's own copy")?;
        let node = self.copies[i].node;
        let h = request(Kind::Create, 0, 0, 0, self.size());
        let made = tokio::time::timeout(T.io_timeout, peer.call(h, self.name.as_bytes())).await;
        let id = match made {
            Ok(Ok((reply, _))) => reply.component,
            Ok(Err(e)) => return Err(format!("node {node}: cannot make a new copy: {e}")),
            Err(_) => return Err(format!("node {node} did not answer")),
        };
        tracing::warn!(volume = %self.name, node, component = id,
            "a copy's node lost it (an emptied disk?): rebuilding it in full");
        {
            let _exclusive = self.resync_lock.write().await;
            let _ = std::fs::remove_file(self.bitmaps.join(self.bitmap_file(i)));
            self.record(i, CopyState::Resyncing, Some(id)).await?;
            let mut st = self.state();
            st[i].dirty.clear();
            st[i].unflushed.clear();
            st[i].unrecorded = false;
            st[i].scan = Some(0);
        }
        Box::pin(self.resync(i)).await
    }

    /// Reads the owner's copy; a block that fails its checksum is read from another
    /// ACTIVE copy instead and rewritten here (read repair). `locked`: the caller holds
    /// the exclusive lock (else the repair takes it, so no write interleaves).
    fn read_local(&self, buf: &mut [u8], offset: u64, locked: bool) -> Result<(), StoreError> {
        let damage = match self.local.volume.read_at(buf, offset) {
            Err(StoreError::Corrupt { message }) => message,
            other => return other,
        };
        let _exclusive = (!locked).then(|| self.resync_lock.blocking_write());
        let states: Vec<CopyState> = self.state().tracks().iter().map(|t| t.state).collect();
        for (i, c) in self.copies.iter().enumerate() {
            let Some(peer) = c.peer.clone() else { continue };
            if states[i] != CopyState::Active {
                continue;
            }
            let mut h = request(Kind::Read, c.id(), self.epoch, 0, offset);
            h.count = buf.len() as u32;
            let read = self
                .runtime
                .block_on(async { tokio::time::timeout(T.io_timeout, peer.call(h, &[])).await });
            let Ok(Ok((_, data))) = read else { continue };
            if data.len() != buf.len() {
                continue;
            }
            buf.copy_from_slice(&data);
            let pass = self.runtime.block_on(self.fencing.enter(self.local.id(), self.epoch));
            if pass.is_ok() && self.local.volume.write_at(&data, offset).is_ok() {
                tracing::warn!(volume = %self.name, offset, len = buf.len(), from = c.node,
                    "repaired a damaged read from another copy ({damage})");
            }
            return Ok(());
        }
        Err(StoreError::Corrupt { message: format!("{damage}; no other copy could be read") })
    }

    /// Probes every ACTIVE copy: one whose node answers but no longer has it (an emptied
    /// disk) is STALE at once (its rebuild follows), even if no write has failed on it.
    async fn check_copies(&self) {
        let states: Vec<CopyState> = self.state().tracks().iter().map(|t| t.state).collect();
        for (i, c) in self.copies.iter().enumerate() {
            let Some(peer) = c.peer.clone() else { continue };
            if states[i] != CopyState::Active {
                continue;
            }
            let mut h = request(Kind::Probe, c.id(), self.epoch, 0, 0);
            // Level with this copy, as far as this owner knows: it vouches (`dataplane.rs`
            // invariant 6), and a power-loss mark on the copy comes off.
            if self.state().whole(i, peer.connections()) {
                h.flags = FLAG_WHOLE;
            }
            let probe = tokio::time::timeout(T.probe_timeout, peer.call(h, &[])).await;
            if let Ok(Err(CallError::Status { status: Status::NotFound, .. })) = probe {
                let _exclusive = self.resync_lock.write().await;
                self.state().stale(i);
                tracing::warn!(volume = %self.name, node = c.node, "a copy is gone from its node");
            }
            // Answered over a new connection: its node may have restarted, after a power
            // loss without what it had not synced. Failed now, not at the next write
            // (an idle volume has none): its unflushed regions join its bitmap.
            if matches!(probe, Ok(Ok(_))) {
                let _exclusive = self.resync_lock.write().await;
                let mut st = self.state();
                if let Some(save) = st.answered(i, peer.connections()) {
                    tracing::warn!(volume = %self.name, node = c.node,
                        "a copy answered over a new connection: its node may have restarted; \
                         stale until levelled");
                    if let Err(e) = self.save_bitmaps(&st, &[save]) {
                        tracing::warn!(volume = %self.name, node = c.node, "bitmap: {e}");
                    }
                }
            }
        }
    }

    /// Fences this node's copy, then every other copy (a probe) at this owner's epoch:
    /// from then on no older owner's request applies there, nor its read lease. A copy
    /// that does not answer is marked STALE; returns whether one that was ACTIVE did not.
    async fn fence_copies(&self) -> Result<bool, String> {
        // This node's own copy first: a request of an older view of this node's, deposed
        // while it waited for its regions' turn, would else still pass its fence and land
        // on the copy that is now the truth, after the other copies were compared with it
        // (found by the simulation). The raise waits for what the old epoch admitted.
        match self.fencing.enter(self.local.id(), self.epoch).await {
            Ok(pass) => drop(pass),
            Err(Refused::Stale(newest)) => {
                return Err(format!("this node's copy has seen a newer owner (epoch {newest})"))
            }
            Err(Refused::Io) => return Err("cannot persist this node's copy's fence".into()),
        }
        let mut silent = false;
        let mut probes = Vec::new();
        for (i, c) in self.copies.iter().enumerate() {
            let Some(peer) = c.peer.clone() else { continue };
            let h = request(Kind::Probe, c.id(), self.epoch, 0, 0);
            probes.push((
                i,
                tokio::spawn(async move {
                    tokio::time::timeout(T.probe_timeout, peer.call(h, &[])).await
                }),
            ));
        }
        for (i, probe) in probes {
            match probe.await {
                Ok(Ok(Ok(_))) => {
                    let now = self.copies[i].peer.as_ref().map_or(0, |p| p.connections());
                    self.state().fenced(i, now);
                }
                Ok(Ok(Err(CallError::Status { status: Status::StaleEpoch, epoch, .. }))) => {
                    return Err(format!("a copy has seen a newer owner (epoch {epoch})"));
                }
                _ => {
                    let mut st = self.state();
                    if st[i].state != CopyState::Stale {
                        tracing::warn!(volume = %self.name, node = self.copies[i].node,
                            "a copy does not answer the new owner: stale");
                    }
                    silent |= st.silent(i);
                }
            }
        }
        Ok(silent)
    }

    /// Each copy as the owner sees it now: state and bytes its bitmap marks.
    pub fn live(&self) -> Vec<ComponentRecord> {
        let st = self.state();
        st.tracks()
            .iter()
            .map(|t| ComponentRecord {
                node: t.node,
                id: t.id,
                state: t.state,
                dirty_bytes: Some(t.dirty.len() as u64 * REGION),
                resynced_bytes: Some(t.resynced),
                scan_left_bytes: Some(
                    t.scan.map_or(0, |from| self.size().saturating_sub(from * REGION)),
                ),
                lsn: Some(t.acked),
                stale_lsn: t.missed_from,
                suspect: false,
            })
            .collect()
    }

    /// The volume's ACTIVE copies now (its resync jobs' level, `resync.rs` invariant 2).
    fn active_copies(&self) -> usize {
        self.state().active()
    }

    /// Starts a digest scan of every ACTIVE copy not being scanned already: a block that
    /// rotted on a copy is found and rewritten (and one of this node's copy, by read
    /// repair, as the scan reads it).
    fn scrub(&self) {
        let started = self.state().scrub();
        if started > 0 {
            tracing::info!(volume = %self.name, copies = started, "scrub: comparing the copies");
        }
    }

    /// The copies to resync (or scan) now.
    fn stale(&self) -> Vec<usize> {
        self.state().wanting()
    }
}

/// Resyncs the volume's stale copies when they answer again, scans its copies after
/// a change of owner that was not a clean hand-over and every `scrub_every` (a scrub),
/// until the volume is deposed.
pub async fn run_resync(volume: Arc<ReplicatedVolume>) {
    let mut scrubbed = Instant::now();
    loop {
        tokio::time::sleep(T.resync_every).await;
        if volume.deposed() {
            return;
        }
        if !volume.scrub_every.is_zero() && scrubbed.elapsed() >= volume.scrub_every {
            scrubbed = Instant::now();
            volume.scrub();
        }
        volume.check_copies().await;
        // A task per copy to level: each waits for its turn among the node's jobs.
        let jobs: Vec<_> = volume
            .stale()
            .into_iter()
            .map(|i| {
                let v = volume.clone();
                tokio::spawn(async move { v.resync(i).await })
            })
            .collect();
        for job in jobs {
            if let Ok(Err(e)) = job.await {
                tracing::warn!(volume = %volume.name, "resync: {e}");
            }
        }
    }
}

impl ReplicatedVolume {
    /// Places the copy of a node removed from the cluster on another member (invariant
    /// 9). Returns whether the volume was handed over for it: this view is then deposed,
    /// and the steward takes the volume again at the next epoch, with the new copy.
    /// `members`: the cluster's members and whether each is up (read once a round for
    /// every volume this node owns: [`replace_removed_copies`]).
    async fn replace_removed(&self, members: &[(Candidate, bool)]) -> Result<bool, String> {
        let member = |node: u64| members.iter().any(|(m, _)| m.id == node);
        let Some(i) = self.copies.iter().position(|c| !member(c.node)) else {
            return Ok(false);
        };
        let (gone, gone_id) = (self.copies[i].node, self.copies[i].id());
        let holds = |node: u64| self.copies.iter().any(|c| c.node == node);
        let holding: Vec<Candidate> =
            members.iter().filter(|(m, _)| holds(m.id)).map(|(m, _)| m.clone()).collect();
        let free: Vec<Candidate> =
            members.iter().filter(|(m, up)| *up && !holds(m.id)).map(|(m, _)| m.clone()).collect();
        let Some(to) = place_one(&holding, &free) else {
            if !self.unplaced.swap(true, Ordering::AcqRel) {
                tracing::warn!(volume = %self.name, node = gone,
                    "a copy's node was removed from the cluster, and no member without a \
                     copy is up to hold it instead: it stays stale until one is");
            }
            return Ok(false);
        };
        if self.state().tracks().iter().any(|t| t.unrecorded) {
            return Ok(false); // A copy's failure is being recorded: the next round.
        }
        let peer = DataPeer::new(DataKey::from_secret(self.meta.secret()), to.rpc.clone());
        let h = request(Kind::Create, 0, 0, 0, self.size());
        let id = match tokio::time::timeout(T.io_timeout, peer.call(h, self.name.as_bytes())).await
        {
            Ok(Ok((reply, _))) => reply.component,
            Ok(Err(e)) => {
                return Err(format!("node {}: cannot make a copy: {}", to.id, copy_failure(&e)))
            }
            Err(_) => return Err(format!("node {} did not answer", to.id)),
        };
        tracing::info!(volume = %self.name, from = gone, to = to.id, component = id,
            "a copy's node was removed from the cluster: placing the copy on another node");
        // Recorded first, then handed over: the steward takes the volume again as soon as
        // this view is deposed, and must find the new copy in the record. Until then the
        // new copy misses writes, which its full scan finds. A failure before the record
        // lists it leaves the component an orphan (removed as such).
        self.change_record(|record| {
            let c = record.components.iter_mut().find(|c| c.node == gone && c.id == gone_id);
            let Some(c) = c else { return Err("the volume's copies changed meanwhile".into()) };
            *c = ComponentRecord {
                node: to.id,
                id,
                state: CopyState::Stale,
                dirty_bytes: None,
                resynced_bytes: None,
                scan_left_bytes: None,
                lsn: None,
                stale_lsn: None,
                suspect: false,
            };
            Ok(())
        })
        .await?;
        let _ = std::fs::remove_file(self.bitmaps.join(self.bitmap_file(i)));
        tracing::info!(volume = %self.name, node = to.id, component = id,
            "the new copy is recorded in place of the removed node's: it fills at the next epoch");
        // Deposed either way: without the clean hand-over, the next epoch compares every
        // copy.
        if let Err(e) = self.release().await {
            self.depose("a copy was placed again");
            tracing::warn!(volume = %self.name,
                "no clean hand-over for the new copy ({e}): the copies are compared");
        }
        Ok(true)
    }

    /// Bytes of this node's store the owner's copy occupies.
    pub fn allocated_bytes(&self) -> Result<u64, StoreError> {
        self.local.volume.allocated_bytes()
    }

    /// The owner's copy's allocation (see `BlockVolume::extents`).
    pub fn extents(&self, offset: u64, length: u64, max: usize) -> Result<Vec<Extent>, StoreError> {
        self.local.volume.extents(offset, length, max)
    }
}

/// A copy's node's failure as the owner logs it (a `NoSpace` said plainly; any other
/// status with the reason that node gave).
fn copy_failure(e: &CallError) -> String {
    match e {
        CallError::Status { status: Status::NoSpace, .. } => {
            format!("{e}: its node's disk is full")
        }
        _ => e.to_string(),
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

/// Volume `name`'s record and its version (a linearizable read), if it has one.
async fn fresh_record(meta: &Member, name: &str) -> ApiResult<Option<(VolumeRecord, u64)>> {
    let Some((bytes, version)) = get(meta, &format!("/volumes/{name}")).await? else {
        return Ok(None);
    };
    let record = serde_json::from_slice(&bytes)
        .map_err(|e| unavailable(format!("the record of {name} is unreadable: {e}")))?;
    Ok(Some((record, version)))
}

/// [`fresh_record`]; NotFound if there is none.
async fn read_record(meta: &Member, name: &str) -> ApiResult<(VolumeRecord, u64)> {
    fresh_record(meta, name)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no volume named {name:?}")))
}

/// Reads `key` linearizably: its value and version (0: absent).
async fn get(meta: &Member, key: &str) -> ApiResult<Option<(Vec<u8>, u64)>> {
    match meta.request(ClientRequest::Get { key: key.to_owned() }).await.map_err(unavailable)? {
        ClientReply::Value { entry: Some(e), .. } => Ok(Some((e.value, e.version))),
        ClientReply::Value { entry: None, .. } => Ok(None),
        other => Err(unavailable(format!("the metadata service answered {other:?}"))),
    }
}

/// `/volumes/<name>/attach`: a move of the volume's ownership asked by an operator.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    /// The node to own it.
    pub node: u64,
}

/// What [`take_ownership`] took.
pub struct Taken {
    /// The owner key now.
    pub owner: Owner,
    /// The record, with `released` if it vouches for this take.
    pub record: VolumeRecord,
    /// This member's incarnation when it took it.
    pub incarnation: u64,
    /// An owner key (a live session's) was replaced.
    pub replaced: bool,
    /// The node the record named as the last owner.
    pub last_owner: u64,
}

/// Takes ownership of `name` (invariant 2): the owner key goes from what it is to this
/// node at one epoch above any before (the record keeps the highest epoch, as the key
/// dies with its owner's session), tied to this node's session lease; the record names
/// this node; a move asked to this node is done.
pub async fn take_ownership(meta: &Member, name: &str) -> ApiResult<Taken> {
    let (lease, incarnation) = meta
        .session()
        .ok_or_else(|| unavailable("this node's session is not registered yet; retry"))?;
    let (owner_key, record_key, move_key) = (
        format!("/volumes/{name}/owner"),
        format!("/volumes/{name}"),
        format!("/volumes/{name}/attach"),
    );
    for _ in 0..10 {
        let owner = get(meta, &owner_key).await?;
        let Some((bytes, record_version)) = get(meta, &record_key).await? else {
            return Err(ApiError::new(ErrorCode::NotFound, format!("no volume named {name:?}")));
        };
        let mut record: VolumeRecord = serde_json::from_slice(&bytes)
            .map_err(|e| unavailable(format!("the record of {name} is unreadable: {e}")))?;
        // Decided on this member's state, which may lag: the fresh record must still
        // show this node's copy active (else the key would name an owner that cannot
        // serve until its session ends).
        if !record.components.iter().any(|c| c.node == meta.id() && c.state == CopyState::Active) {
            return Err(unavailable(format!("this node's copy of {name} is not active")));
        }
        let moving = get(meta, &move_key).await?;
        let last = owner.as_ref().and_then(|(b, _)| serde_json::from_slice::<Owner>(b).ok());
        let epoch = record.epoch.max(last.map_or(0, |o| o.epoch)) + 1;
        let me = Owner { node: meta.id(), epoch };
        let last_owner = record.node;
        record.node = me.node;
        record.epoch = epoch;
        // Only the owner of the epoch just before can vouch for the copies (any take
        // since would have raised the epoch and cleared this).
        record.released = record.released.take().filter(|r| r.epoch + 1 == epoch);
        let mut compares = vec![
            Compare::Version(owner_key.clone(), owner.as_ref().map_or(0, |(_, v)| *v)),
            Compare::Version(record_key.clone(), record_version),
        ];
        let mut ops = vec![
            Op::Put {
                key: owner_key.clone(),
                value: serde_json::to_vec(&me).expect("serializes"),
                lease: Some(lease),
            },
            Op::Put {
                key: record_key.clone(),
                value: serde_json::to_vec(&record).expect("serializes"),
                lease: None,
            },
        ];
        if let Some((bytes, version)) = moving {
            if serde_json::from_slice::<Move>(&bytes).is_ok_and(|m| m.node == me.node) {
                compares.push(Compare::Version(move_key.clone(), version));
                ops.push(Op::Delete { key: move_key.clone() });
            }
        }
        // Written without the marker: it vouches for the copies only until this owner
        // writes.
        let mut written = record.clone();
        written.released = None;
        if let Some(Op::Put { value, .. }) = ops.get_mut(1) {
            *value = serde_json::to_vec(&written).expect("serializes");
        }
        if write(meta, compares, ops).await? {
            let replaced = owner.is_some();
            return Ok(Taken { owner: me, record, incarnation, replaced, last_owner });
        }
    }
    Err(unavailable(format!("could not take ownership of {name}: it keeps changing")))
}

/// Opens a new owner's view of a replicated volume (this node must hold an ACTIVE copy).
/// Every other copy gets a digest scan (invariant 5), except a STALE copy whose bitmap
/// this node kept at the epoch just before (that bitmap says all it lacks), and an ACTIVE
/// copy the owner of the epoch just before vouched for with this node's when it let go
/// cleanly (`record.released`, kept by `take_ownership` only for that epoch).
pub fn open(
    node: &Node,
    meta: &Arc<Member>,
    record: &VolumeRecord,
    owner: Owner,
    rpc_of: impl Fn(u64) -> Option<String>,
) -> ApiResult<ReplicatedVolume> {
    let key = DataKey::from_secret(meta.secret());
    let bitmaps = node.dir().join("bitmaps");
    let mut local = None;
    let mut copies = Vec::new();
    let mut tracks = Vec::new();
    let handed = handed_word(record, meta.id());
    let regions = record.size_bytes.div_ceil(REGION);
    for c in &record.components {
        let state = c.state;
        let file = bitmaps.join(format!("{}.{}.{}", record.name, c.node, c.id));
        let kept = std::fs::read_to_string(&file).ok().and_then(|text| {
            let mut lines = text.lines();
            let (epoch, boot) = lines.next()?.strip_prefix("epoch ")?.split_once(" boot ")?;
            let epoch = epoch.parse::<u64>().ok()?;
            let regions = lines.map(|l| l.parse::<u64>().ok()).collect::<Option<BTreeSet<_>>>()?;
            // Kept at the epoch just before, in this boot (it is not synced).
            (epoch + 1 == owner.epoch && boot == boot_id() && boot != "unknown").then_some(regions)
        });
        let _ = std::fs::remove_file(&file);
        let mine = c.node == meta.id();
        let peer = if mine {
            if state != CopyState::Active {
                return Err(ApiError::invalid("this node's copy is not active"));
            }
            let here = node.component(c.id).ok_or_else(|| {
                ApiError::new(ErrorCode::Io, format!("component {} is missing here", c.id))
            })?;
            local = Some(here);
            None
        } else {
            let rpc = rpc_of(c.node).ok_or_else(|| {
                unavailable(format!("node {} (holding a component) has no address", c.node))
            })?;
            Some(Arc::new(DataPeer::new(key.clone(), rpc)))
        };
        copies.push(Copy { node: c.node, id: AtomicU64::new(c.id), peer });
        tracks.push(Track::found(Found {
            node: c.node,
            id: c.id,
            local: mine,
            state: Some(state),
            stale_lsn: c.stale_lsn,
            kept: kept.filter(|_| state == CopyState::Stale),
            // Equal to this node's copy when the last owner let go cleanly, and nobody
            // has written since.
            vouched: handed.is_some_and(|r| r.level.contains(&CopyRef { node: c.node, id: c.id })),
            // What it lacks from this node's copy, as the last owner handed it over.
            handed: handed
                .and_then(|r| r.stale.iter().find(|b| b.node == c.node && b.id == c.id))
                .map(|b| regions_of(&b.runs, regions)),
        }));
    }
    let local = local.ok_or_else(|| ApiError::invalid("the owner holds no component"))?;
    let n = copies.len();
    let volume = ReplicatedVolume {
        name: record.name.clone(),
        size_bytes: AtomicU64::new(record.size_bytes),
        epoch: owner.epoch,
        local,
        copies,
        state: Mutex::new(OwnerState::new(
            owner.epoch,
            record.min_replicas as usize,
            regions,
            tracks,
        )),
        resync_lock: tokio::sync::RwLock::new(()),
        recording: tokio::sync::Mutex::new(()),
        in_flight: InFlight::default(),
        meta: meta.clone(),
        owner,
        fencing: node.fencing().clone(),
        scheduler: node.resync_scheduler().clone(),
        client_ops: AtomicU64::new(0),
        taken_at: Instant::now(),
        forwarders: Mutex::default(),
        deposed: AtomicBool::new(false),
        scrub_every: node.scrub_every(),
        incarnation: meta.incarnation(),
        released: tokio::sync::Mutex::new(false),
        unplaced: AtomicBool::new(false),
        bitmaps,
        runtime: tokio::runtime::Handle::current(),
    };
    // A STALE copy's bitmap is durable again under this epoch.
    for i in 0..n {
        let st = volume.state();
        if st[i].state == CopyState::Stale && !st[i].dirty.is_empty() {
            let regions = st[i].dirty.clone();
            drop(st);
            volume
                .save_bitmap(i, &regions, false)
                .map_err(|e| ApiError::new(ErrorCode::Io, e.to_string()))?;
        }
    }
    Ok(volume)
}

/// An operator's move of `name` to node `to` (`strata volume attach`): checked (the node
/// holds an ACTIVE copy and is up), asked in `/volumes/<name>/attach`, and waited for
/// until `to` owns the volume. A move that does not happen in time is withdrawn.
pub async fn attach(meta: &Member, name: &str, to: u64) -> ApiResult<VolumeRecord> {
    let (record, _) = read_record(meta, name).await?;
    if record.state != VolumeState::Ready {
        return Err(ApiError::invalid(format!("{name} is {}: it cannot move", record.state)));
    }
    if !record.replicated() {
        return Err(ApiError::invalid(format!(
            "{name} has one copy, on node {}: only a replicated volume changes owner",
            record.node
        )));
    }
    let holders: Vec<String> = record.components.iter().map(|c| c.node.to_string()).collect();
    let Some(copy) = record.components.iter().find(|c| c.node == to) else {
        return Err(ApiError::invalid(format!(
            "node {to} holds no copy of {name} (its copies are on nodes {})",
            holders.join(", ")
        )));
    };
    if copy.state != CopyState::Active {
        return Err(ApiError::invalid(format!(
            "node {to}'s copy of {name} is {}: only a node with an active copy can own it",
            copy.state
        )));
    }
    if !meta.read_local(|s| s.session(to).is_some_and(|x| x.up)) {
        return Err(unavailable(format!("node {to} is down")));
    }
    let owner_key = format!("/volumes/{name}/owner");
    let owns = |meta: &Member| {
        meta.read_local(|s| {
            s.get(&owner_key)
                .and_then(|e| serde_json::from_slice::<Owner>(&e.value).ok())
                .is_some_and(|o| o.node == to)
        })
    };
    if !owns(meta) {
        let move_key = format!("/volumes/{name}/attach");
        let value = serde_json::to_vec(&Move { node: to }).expect("serializes");
        write(meta, vec![], vec![Op::Put { key: move_key.clone(), value, lease: None }]).await?;
        let deadline = Instant::now() + T.move_patience;
        while !owns(meta) {
            if Instant::now() >= deadline {
                if let Some((bytes, version)) = get(meta, &move_key).await? {
                    if serde_json::from_slice::<Move>(&bytes).is_ok_and(|m| m.node == to) {
                        let withdraw = Op::Delete { key: move_key.clone() };
                        let _ =
                            write(meta, vec![Compare::Version(move_key, version)], vec![withdraw])
                                .await;
                    }
                }
                return Err(unavailable(format!(
                    "node {to} did not take {name} within {:?}; the move is withdrawn",
                    T.move_patience
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    read_record(meta, name).await.map(|(record, _)| record)
}

/// Takes ownership of `name` here: the owner key, the view, every copy fenced at the new
/// epoch (invariant 3), then the view serves and its copies are scanned in the background.
///
/// `fresh`: the volume was just created (its copies are empty, so equal: no scans).
async fn take_over(
    node: &Arc<Node>,
    meta: &Arc<Member>,
    router: &Router,
    fresh: bool,
    from: Option<(Owner, &VolumeRecord)>,
) -> ApiResult<u64> {
    // One at a time per volume (the steward and a create must not both take it).
    let _taking = router.taking.try_lock().map_err(|_| unavailable("already taking it"))?;
    if router.view().is_some_and(|v| !v.deposed()) {
        return Err(unavailable("this node owns it already"));
    }
    // A planned move: the owner up now hands over cleanly first, so the copies need no
    // comparing (invariant 5); if it cannot, they are compared.
    if let Some((o, record)) = from {
        if let Err(e) = ask_release(meta, record, o).await {
            tracing::warn!(volume = %router.name, from = o.node,
                "the owner did not hand over cleanly ({e}): the copies will be compared");
        }
    }
    let Taken { owner, record, incarnation, replaced, last_owner } =
        take_ownership(meta, &router.name).await?;
    if record.released.is_some() {
        tracing::info!(volume = %router.name, epoch = owner.epoch,
            "taken over cleanly: the copies the last owner vouched for are not compared");
    }
    let mut view = open(node, meta, &record, owner, |n| rpc_of(meta, n))?;
    view.incarnation = incarnation;
    if fresh {
        view.state().created();
    }
    let view = Arc::new(view);
    match view.fence_copies().await {
        Err(e) => {
            view.depose(&e);
            return Err(unavailable(e));
        }
        // A copy this owner could not fence would honour the read leases the last owner
        // granted (invariant 10). Unless it let go cleanly (then it waited for them),
        // they may still run if its session is live (it did not let go, or it restarted
        // and registered again, which ended its owner key at once): no write is
        // acknowledged until they have surely run out. (After a crash or a pause past
        // the session timeout, they ran out long before the owner key went.)
        Ok(true) if record.released.is_none() => {
            let live = replaced
                || last_owner == meta.id()
                || members(meta)
                    .await
                    .map_or(true, |m| m.iter().any(|(c, up)| c.id == last_owner && *up));
            if live {
                view.state().hold_acks_until(now() + 2 * T.read_lease);
            }
        }
        Ok(_) => {}
    }
    router.install(view.clone());
    tokio::spawn(run_resync(view));
    Ok(owner.epoch)
}

/// Grows replicated volume `name` to `size_bytes` (invariant 8): every copy first, then
/// the record; refused while a copy's node is down, and never shrinks it.
pub async fn resize(
    node: &Node,
    meta: &Member,
    name: &str,
    size_bytes: u64,
) -> ApiResult<VolumeRecord> {
    let key = format!("/volumes/{name}");
    let (record, _) = read_record(meta, name).await?;
    if record.state != VolumeState::Ready {
        return Err(ApiError::new(ErrorCode::Conflict, format!("{name} is {}", record.state)));
    }
    if size_bytes < record.size_bytes {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "{name} is replicated: it can grow but not shrink (it is {}, asked {})",
                strata_types::format_size(record.size_bytes),
                strata_types::format_size(size_bytes)
            ),
        ));
    }
    if size_bytes == record.size_bytes {
        return Ok(record);
    }
    // Each copy grows (at the epoch of the owner, which fences it: a copy that has seen
    // a newer owner refuses, and the record tells which to ask again).
    let epoch = record.epoch;
    let dkey = DataKey::from_secret(meta.secret());
    for c in &record.components {
        let rpc = rpc_of(meta, c.node)
            .ok_or_else(|| unavailable(format!("node {} has no address", c.node)))?;
        let peer = DataPeer::new(dkey.clone(), rpc);
        let h = request(Kind::Resize, c.id, epoch, 0, size_bytes);
        match tokio::time::timeout(T.io_timeout, peer.call(h, &[])).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(unavailable(format!(
                    "node {}'s copy did not grow ({e}); nothing shrank, retry",
                    c.node
                )))
            }
            Err(_) => {
                return Err(unavailable(format!(
                    "node {} (holding a copy) does not answer: a replicated volume grows only \
                     with every copy's node up; retry",
                    c.node
                )))
            }
        }
    }
    // Then the record (the size every node serves), unless it changed meanwhile.
    for _ in 0..5 {
        let (mut now, version) = read_record(meta, name).await?;
        let ids = |r: &VolumeRecord| r.components.iter().map(|c| c.id).collect::<Vec<_>>();
        if now.state != VolumeState::Ready || ids(&now) != ids(&record) {
            return Err(unavailable(format!("{name}'s copies changed meanwhile; retry")));
        }
        now.size_bytes = now.size_bytes.max(size_bytes);
        let value = serde_json::to_vec(&now).expect("serializes");
        let put = Op::Put { key: key.clone(), value, lease: None };
        if write(meta, vec![Compare::Version(key.clone(), version)], vec![put]).await? {
            tracing::info!(
                volume = name,
                from = record.size_bytes,
                to = size_bytes,
                "volume grown"
            );
            if let Some(router) = node.replicated_router(name) {
                router.grow(now.size_bytes);
            }
            return Ok(now);
        }
    }
    Err(unavailable(format!("the record of {name} keeps changing; retry")))
}

/// Asks owner `o` of the volume `record` describes to hand it over cleanly
/// ([`ReplicatedVolume::release`]).
async fn ask_release(meta: &Member, record: &VolumeRecord, o: Owner) -> Result<(), String> {
    let component = record
        .components
        .iter()
        .find(|c| c.node == o.node)
        .map(|c| c.id)
        .ok_or("the owner holds no copy")?;
    let rpc = rpc_of(meta, o.node).ok_or("the owner has no address")?;
    let peer = DataPeer::new(DataKey::from_secret(meta.secret()), rpc);
    let h = request(Kind::Release, component, o.epoch, 0, 0);
    match tokio::time::timeout(T.release_patience, peer.call(h, &[])).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer in time".into()),
    }
}

/// What a node knows of one replicated volume, from its applied state.
struct Seen {
    record: VolumeRecord,
    owner: Option<Owner>,
    moving: Option<Move>,
    /// Nodes whose sessions are up.
    up: BTreeSet<u64>,
    /// Nodes that published their copy of this volume as suspect (invariant 11).
    suspect: BTreeSet<u64>,
}

fn seen(meta: &Member) -> Vec<Seen> {
    meta.read_local(|s| {
        fn decode<T: for<'de> Deserialize<'de>>(
            s: &strata_meta::state::State,
            key: String,
        ) -> Option<T> {
            s.get(&key).and_then(|e| serde_json::from_slice(&e.value).ok())
        }
        records(s)
            .filter(|r| r.replicated() && r.state == VolumeState::Ready)
            .map(|record| Seen {
                owner: decode(s, format!("/volumes/{}/owner", record.name)),
                moving: decode(s, format!("/volumes/{}/attach", record.name)),
                up: record
                    .components
                    .iter()
                    .map(|c| c.node)
                    .filter(|n| s.session(*n).is_some_and(|x| x.up))
                    .collect(),
                suspect: record
                    .components
                    .iter()
                    .filter(|c| {
                        decode::<Vec<u64>>(s, format!("{SUSPECT_PREFIX}{}", c.node))
                            .is_some_and(|ids| ids.contains(&c.id))
                    })
                    .map(|c| c.node)
                    .collect(),
                record,
            })
            .collect()
    })
}

/// When a volume moves by itself to the node its clients use.
#[derive(Clone, Copy, Debug)]
pub struct MovePolicy {
    /// Its clients have all been on one other node this long (zero: never).
    pub after: Duration,
    /// It has had its owner at least this long (hysteresis).
    pub hold: Duration,
}

/// As the owner of `v`, asks for a move to the node that alone uses the volume (if the
/// policy says so): that node's steward then takes it.
async fn consider_move(
    meta: &Member,
    v: &Seen,
    view: &ReplicatedVolume,
    router: &Router,
    p: MovePolicy,
) {
    if let Some(m) = v.moving {
        // A move no node can carry out (its copy is not active, or it is down) would take
        // effect whenever that changes: withdraw it.
        let able =
            v.record.components.iter().any(|c| c.node == m.node && c.state == CopyState::Active);
        if !able || !v.up.contains(&m.node) {
            let key = format!("/volumes/{}/attach", v.record.name);
            let _ = write(meta, vec![], vec![Op::Delete { key }]).await;
            let name = &v.record.name;
            tracing::warn!(volume = %name, to = m.node, "withdrew a move that node cannot make");
        }
        return;
    }
    if p.after.is_zero() || view.taken_at.elapsed() < p.hold {
        return;
    }
    let local = *router.last_local.lock().unwrap_or_else(|e| e.into_inner());
    let Some(to) = view.sole_user(p.after, local) else { return };
    let active = v.record.components.iter().any(|c| c.node == to && c.state == CopyState::Active);
    if !active || !v.up.contains(&to) {
        return;
    }
    let key = format!("/volumes/{}/attach", v.record.name);
    let value = serde_json::to_vec(&Move { node: to }).expect("serializes");
    if write(meta, vec![], vec![Op::Put { key, value, lease: None }]).await.is_ok() {
        tracing::info!(volume = %v.record.name, to, "moving to the node its clients use");
    }
}

/// At a clean stop: each volume this node owns is moved to another node with an active
/// copy that is up (as `attach` would), waiting up to `patience` in all, so clients of
/// the other nodes wait a moment instead of a session timeout.
pub async fn hand_over(node: &Node, meta: &Member, patience: Duration) {
    // Bounded as a whole: without a metadata quorum (every node stopping at once) the
    // move's write would wait forever.
    let deadline = Instant::now() + patience;
    if tokio::time::timeout(patience, hand_over_by(node, meta, deadline)).await.is_err() {
        tracing::warn!("could not hand every volume over within {patience:?}");
    }
}

async fn hand_over_by(node: &Node, meta: &Member, deadline: Instant) {
    let mut stopping = announce_stop(meta).await;
    for view in node.owned().into_iter().filter(|v| v.serving()) {
        let Some(v) = seen(meta).into_iter().find(|s| s.record.name == view.name) else {
            continue;
        };
        stopping.extend(meta.read_local(stopping_nodes));
        // A node stopping too would not take it (and nobody waits for one that cannot).
        let next = v.record.components.iter().find(|c| {
            c.node != meta.id()
                && c.state == CopyState::Active
                && v.up.contains(&c.node)
                && !stopping.contains(&c.node)
        });
        let Some(to) = next.map(|c| c.node) else {
            tracing::info!(volume = %view.name,
                "not handed over at stop: no other node with an active copy is up and staying");
            continue;
        };
        let key = format!("/volumes/{}/attach", view.name);
        let value = serde_json::to_vec(&Move { node: to }).expect("serializes");
        if write(meta, vec![], vec![Op::Put { key: key.clone(), value, lease: None }])
            .await
            .is_err()
        {
            continue;
        }
        let owner_key = format!("/volumes/{}/owner", view.name);
        while Instant::now() < deadline {
            let (moved, gone) = meta.read_local(|s| {
                let moved = s
                    .get(&owner_key)
                    .and_then(|e| serde_json::from_slice::<Owner>(&e.value).ok())
                    .is_some_and(|o| o.node == to);
                (moved, stopping_nodes(s).contains(&to))
            });
            if moved {
                tracing::info!(volume = %view.name, to, "handed over at stop");
                break;
            }
            if gone {
                // It began stopping after this node looked: it will not take the volume.
                // The move is withdrawn unless it changed (that node's steward takes
                // nothing while it stops, so no second owner can come of it).
                tracing::info!(volume = %view.name, to,
                    "not handed over at stop: that node is stopping too");
                withdraw_move(meta, &key, to).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `/stopping/NODE`: the node is stopping cleanly (it hands its volumes over, then
/// leaves). Tied to the node's session lease, so it ends with that session (declared
/// down, or registered again at the next start). Other stopping nodes hand nothing to
/// it, and its own steward takes no volume meanwhile.
const STOPPING_PREFIX: &str = "/stopping/";

/// How long a stopping node tries to publish its mark (without a quorum, as when every
/// node stops at once, the write would wait for ever).
const STOPPING_PATIENCE: Duration = Duration::from_secs(2);

/// Publishes this node's stopping mark, then reads the others' linearizably: of two nodes
/// stopping at once, at least one sees the other's mark (and the other finds it while it
/// waits for its hand-over). Returns the nodes stopping (this one's own mark included),
/// as far as it could tell in `STOPPING_PATIENCE`.
async fn announce_stop(meta: &Member) -> BTreeSet<u64> {
    let announced = async {
        let lease = meta.session_lease()?;
        let key = format!("{STOPPING_PREFIX}{}", meta.id());
        let value = b"stopping".to_vec();
        write(meta, vec![], vec![Op::Put { key, value, lease: Some(lease) }]).await.ok()?;
        let prefix = STOPPING_PREFIX.to_owned();
        let range = meta.request(ClientRequest::Range { prefix, limit: usize::MAX }).await.ok()?;
        let ClientReply::Range { entries, .. } = range else { return None };
        Some(
            entries
                .iter()
                .filter_map(|(k, _)| k.strip_prefix(STOPPING_PREFIX)?.parse().ok())
                .collect(),
        )
    };
    let stopping = tokio::time::timeout(STOPPING_PATIENCE, announced).await.ok().flatten();
    stopping.unwrap_or_else(|| {
        tracing::info!("could not publish this node's stopping mark in time");
        BTreeSet::new()
    })
}

/// The nodes with a stopping mark (`STOPPING_PREFIX`) in the applied state `s` (a mark
/// ends with its session, so each is of a node stopping now).
fn stopping_nodes(s: &strata_meta::state::State) -> BTreeSet<u64> {
    s.range(STOPPING_PREFIX, usize::MAX)
        .into_iter()
        .filter_map(|(k, _)| k.strip_prefix(STOPPING_PREFIX)?.parse().ok())
        .collect()
}

/// Withdraws the move of volume key `key` to node `to`, if it is still that move.
async fn withdraw_move(meta: &Member, key: &str, to: u64) {
    if let Ok(Some((bytes, version))) = get(meta, key).await {
        if serde_json::from_slice::<Move>(&bytes).is_ok_and(|m| m.node == to) {
            let compare = vec![Compare::Version(key.to_owned(), version)];
            let _ = write(meta, compare, vec![Op::Delete { key: key.to_owned() }]).await;
        }
    }
}

/// `/volumes/<name>/clients/<node>`: the node has NBD clients of the volume (a key tied
/// to its session, so a dead node's clients vanish with it).
fn clients_prefix(name: &str) -> String {
    format!("/volumes/{name}/clients/")
}

/// Deletes replicated volume `name` (invariant 7): refused while nodes have NBD clients
/// of it unless `force` (then they are disconnected). Returns the nodes that still hold
/// a copy after `T.delete_patience` (down now: each removes its copy when it returns).
pub async fn delete(meta: &Member, name: &str, force: bool) -> ApiResult<Vec<u64>> {
    let key = format!("/volumes/{name}");
    let mut marked = false;
    for _ in 0..5 {
        let (mut record, version) = read_record(meta, name).await?;
        if record.state == VolumeState::Deleting {
            marked = true;
            break;
        }
        if record.state != VolumeState::Ready || !record.replicated() {
            return Err(ApiError::invalid(format!("{name} is not a replicated volume")));
        }
        if !force {
            let users = clients(meta, name).await?;
            if !users.is_empty() {
                let nodes: Vec<String> = users.iter().map(u64::to_string).collect();
                return Err(ApiError::new(
                    ErrorCode::Busy,
                    format!(
                        "{name} has NBD clients on node(s) {}; disconnect them or pass --force",
                        nodes.join(", ")
                    ),
                ));
            }
        }
        record.state = VolumeState::Deleting;
        let value = serde_json::to_vec(&record).expect("serializes");
        let ops = vec![
            Op::Put { key: key.clone(), value, lease: None },
            Op::Delete { key: format!("/volumes/{name}/owner") },
            Op::Delete { key: format!("/volumes/{name}/attach") },
        ];
        if write(meta, vec![Compare::Version(key.clone(), version)], ops).await? {
            tracing::info!(volume = name, force, "deleting the replicated volume");
            marked = true;
            break;
        }
        // The record changed meanwhile (a copy's state): look again.
    }
    if !marked {
        return Err(unavailable(format!("the record of {name} keeps changing; retry")));
    }
    // Linearizable reads: this member's applied state may not show the mark yet.
    let deadline = Instant::now() + T.delete_patience;
    loop {
        let left = fresh_record(meta, name)
            .await?
            .map(|(r, _)| r)
            .filter(|r| r.state == VolumeState::Deleting);
        match left {
            // Gone (or a new volume has the name already).
            None => return Ok(Vec::new()),
            Some(r) if Instant::now() >= deadline => {
                return Ok(r.components.iter().map(|c| c.node).collect())
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The nodes with NBD clients of `name` (a linearizable read).
async fn clients(meta: &Member, name: &str) -> ApiResult<Vec<u64>> {
    let prefix = clients_prefix(name);
    let request = ClientRequest::Range { prefix: prefix.clone(), limit: usize::MAX };
    match meta.request(request).await.map_err(unavailable)? {
        ClientReply::Range { entries, .. } => Ok(entries
            .iter()
            .filter_map(|(k, _)| k.strip_prefix(&prefix).and_then(|n| n.parse().ok()))
            .collect()),
        other => Err(unavailable(format!("the metadata service answered {other:?}"))),
    }
}

/// Exports replicated volume `name` here now if this member's state has it (a client
/// asked for it before the steward's next round: made a moment ago on another node).
pub fn discover(
    node: &Node,
    meta: &Arc<Member>,
    runtime: &tokio::runtime::Handle,
    name: &str,
) -> bool {
    let record = applied_record(meta, name);
    let Some(record) = record.filter(|r| r.replicated() && r.state == VolumeState::Ready) else {
        return false;
    };
    let _runtime = runtime.enter();
    node.router(name, || Arc::new(Router::new(meta.clone(), &record)));
    true
}

/// Each node's bookkeeping of replicated volumes, every `T.steward_every` until the process
/// ends: deletes (invariant 7), the `clients` keys, and copies no record lists.
async fn housekeeping(node: Arc<Node>, meta: Arc<Member>) {
    let mut looked_for_removed = Instant::now();
    loop {
        tokio::time::sleep(T.steward_every).await;
        if !meta.registered() {
            continue;
        }
        retire_deleted(&node, &meta).await;
        unexport_unrecorded(&node, &meta).await;
        publish_clients(&node, &meta).await;
        remove_orphans(&node, &meta).await;
        if looked_for_removed.elapsed() >= T.replace_every {
            looked_for_removed = Instant::now();
            replace_removed_copies(&node, &meta).await;
        }
    }
}

/// Places again the copies of removed nodes of every volume this node owns (invariant
/// 9), with one linearizable read of the membership for all of them (none when it owns
/// none).
async fn replace_removed_copies(node: &Node, meta: &Member) {
    let owned: Vec<_> = node.owned().into_iter().filter(|v| v.serving()).collect();
    if owned.is_empty() {
        return;
    }
    let members = match members(meta).await {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("placing copies again: the membership: {}", e.message);
            return;
        }
    };
    for view in owned {
        // Placed (and handed over): the view is deposed, its resync task ends, and the
        // steward takes the volume again at the next epoch.
        if let Err(e) = view.replace_removed(&members).await {
            tracing::warn!(volume = %view.name, "placing a copy again: {e}");
        }
    }
}

/// Stops exporting a volume whose record is gone (a steward round that read the record
/// before its delete may have exported it again): confirmed by a linearizable read, as
/// this member's state may not show a volume just made here yet.
async fn unexport_unrecorded(node: &Node, meta: &Member) {
    let recorded = |r: Option<&VolumeRecord>| {
        r.is_some_and(|r| r.replicated() && r.state == VolumeState::Ready)
    };
    for name in node.replicated_names() {
        if surely_not(meta, &name, recorded).await {
            unexport(node, meta, &name, "the volume is deleted").await;
        }
    }
}

/// Whether `holds` is false of volume `name`'s record both in this member's applied
/// state and in a linearizable read: the applied state may lag (a volume just made
/// elsewhere, a member just restarted). False when the read fails.
async fn surely_not(
    meta: &Member,
    name: &str,
    holds: impl Fn(Option<&VolumeRecord>) -> bool,
) -> bool {
    if holds(applied_record(meta, name).as_ref()) {
        return false;
    }
    fresh_record(meta, name).await.is_ok_and(|fresh| !holds(fresh.as_ref().map(|(r, _)| r)))
}

/// Stops exporting `name` here (its clients are disconnected, this node's view of it
/// deposed) and takes back this node's `clients` key for it.
async fn unexport(node: &Node, meta: &Member, name: &str, why: &str) {
    if let Some(router) = node.unexport_replicated(name) {
        if let Some(view) = router.view() {
            view.depose(why);
        }
        router.clear();
        tracing::info!(volume = %name, "no longer exported: {why}");
    }
    let key = format!("{}{}", clients_prefix(name), meta.id());
    if meta.read_local(|s| s.get(&key).is_some()) {
        let _ = write(meta, vec![], vec![Op::Delete { key }]).await;
    }
}

/// Keeps this node's `clients` keys (its count of NBD connections) true (checked
/// against its applied state; written only on a change).
async fn publish_clients(node: &Node, meta: &Member) {
    let Some(lease) = meta.session_lease() else { return };
    for name in node.replicated_names() {
        let used = node.replicated_connections(&name);
        let key = format!("{}{}", clients_prefix(&name), meta.id());
        let published = meta.read_local(|s| s.get(&key).map(|e| e.value.clone()));
        let want = (used > 0).then(|| used.to_string().into_bytes());
        if published == want {
            continue;
        }
        let op = if used > 0 {
            Op::Put { key, value: used.to_string().into_bytes(), lease: Some(lease) }
        } else {
            Op::Delete { key }
        };
        let _ = write(meta, vec![], vec![op]).await;
    }
}

/// This node's part in deleting volumes (invariant 7): it stops exporting each volume
/// being deleted, removes its copies of it and takes them out of the record; and takes
/// out the copies of nodes no longer in the cluster.
async fn retire_deleted(node: &Arc<Node>, meta: &Member) {
    let me = meta.id();
    let deleting: Vec<VolumeRecord> = meta.read_local(|s| {
        records(s).filter(|r| r.replicated() && r.state == VolumeState::Deleting).collect()
    });
    for record in deleting {
        let name = &record.name;
        unexport(node, meta, name, "the volume is being deleted").await;
        remove_bitmaps(&node.dir().join("bitmaps"), name);
        let mut removed = true;
        for c in record.components.iter().filter(|c| c.node == me) {
            let (n, id) = (node.clone(), c.id);
            match tokio::task::spawn_blocking(move || n.component_remove(id)).await {
                Ok(Ok(())) => {
                    tracing::info!(volume = %name, component = id, "removed this node's copy")
                }
                Ok(Err(e)) if e.code == ErrorCode::NotFound => {}
                Ok(Err(e)) => {
                    tracing::warn!(volume = %name, component = id, "cannot remove: {}", e.message);
                    removed = false;
                }
                Err(e) => {
                    tracing::warn!(volume = %name, component = id, "cannot remove: {e}");
                    removed = false;
                }
            }
        }
        if removed && record.components.iter().any(|c| c.node == me) {
            forget_copies(meta, name, |n| n == me).await;
        }
        // A node that will never return cannot take its own copy out.
        let away: Vec<u64> = record
            .components
            .iter()
            .map(|c| c.node)
            .filter(|n| !meta.read_local(|s| s.session(*n).is_some_and(|x| x.up)))
            .collect();
        if !away.is_empty() {
            if let Ok(all) = members(meta).await {
                let members: BTreeSet<u64> = all.iter().map(|(m, _)| m.id).collect();
                if away.iter().any(|n| !members.contains(n)) {
                    forget_copies(meta, name, |n| !members.contains(&n)).await;
                }
            }
        }
    }
}

/// Takes the copies on nodes `gone` picks out of deleting volume `name`'s record; the
/// last copy out deletes the record (and the name is free).
async fn forget_copies(meta: &Member, name: &str, gone: impl Fn(u64) -> bool) {
    let key = format!("/volumes/{name}");
    for _ in 0..5 {
        let Ok((mut record, version)) = read_record(meta, name).await else { return };
        if record.state != VolumeState::Deleting {
            return;
        }
        record.components.retain(|c| !gone(c.node));
        let ops = if record.components.is_empty() {
            vec![
                Op::Delete { key: key.clone() },
                Op::Delete { key: format!("/volumes/{name}/owner") },
                Op::Delete { key: format!("/volumes/{name}/attach") },
            ]
        } else {
            let value = serde_json::to_vec(&record).expect("serializes");
            vec![Op::Put { key: key.clone(), value, lease: None }]
        };
        match write(meta, vec![Compare::Version(key.clone(), version)], ops).await {
            Ok(true) => {
                if record.components.is_empty() {
                    tracing::info!(volume = name, "deleted: every copy is removed");
                }
                return;
            }
            Ok(false) => continue,
            Err(_) => return, // Tried again at the next round.
        }
    }
}

/// Removes the synchronization bitmaps of volume `name` (`<name>.<node>.<id>`).
fn remove_bitmaps(dir: &std::path::Path, name: &str) {
    let Ok(files) = std::fs::read_dir(dir) else { return };
    for f in files.flatten() {
        let file = f.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(name)?.strip_prefix('.')) else {
            continue;
        };
        let rest = rest.strip_suffix(".tmp").unwrap_or(rest);
        let ours = rest
            .split_once('.')
            .is_some_and(|(n, id)| n.parse::<u64>().is_ok() && id.parse::<u64>().is_ok());
        if ours {
            let _ = std::fs::remove_file(f.path());
        }
    }
}

/// Removes the copies held here that no volume's record lists (invariant 7).
async fn remove_orphans(node: &Arc<Node>, meta: &Member) {
    let me = meta.id();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let listed = |record: Option<&VolumeRecord>, id: u64| {
        record.is_some_and(|r| {
            r.state == VolumeState::Creating
                || r.components.iter().any(|c| c.node == me && c.id == id)
        })
    };
    for (id, volume, made) in node.components() {
        if now.saturating_sub(made) < ORPHAN_GRACE_SECS {
            continue;
        }
        if !surely_not(meta, &volume, |r| listed(r, id)).await {
            continue;
        }
        let n = node.clone();
        match tokio::task::spawn_blocking(move || n.component_remove(id)).await {
            Ok(Ok(())) => tracing::warn!(
                volume = %volume,
                component = id,
                "removed a copy that no volume's record lists"
            ),
            Ok(Err(e)) => {
                tracing::warn!(component = id, "cannot remove an unlisted copy: {}", e.message)
            }
            Err(e) => tracing::warn!(component = id, "cannot remove an unlisted copy: {e}"),
        }
    }
}

/// Where each node publishes the copies it holds that are marked suspect (invariant 11):
/// `/suspect/NODE`, a JSON list of component ids, absent when there are none.
const SUSPECT_PREFIX: &str = "/suspect/";

/// Sets each copy's `suspect` from the marks its node published (`SUSPECT_PREFIX`, in
/// this member's applied state) and, for this node's copies, from its own marks (which
/// reach the metadata a moment later).
pub fn mark_suspects(node: &Node, meta: &Member, copies: &mut [ComponentRecord]) {
    let me = meta.id();
    let here = node.suspects();
    meta.read_local(|s| {
        for c in copies.iter_mut() {
            let published = || {
                s.get(&format!("{SUSPECT_PREFIX}{}", c.node))
                    .and_then(|e| serde_json::from_slice::<Vec<u64>>(&e.value).ok())
                    .is_some_and(|ids| ids.contains(&c.id))
            };
            c.suspect = if c.node == me { here.contains(&c.id) } else { published() };
        }
    });
}

/// The core's view of volume `v` for this node's steward (`takeover::Seen`).
fn core_seen(v: &Seen, me: u64, me_suspect: bool) -> takeover::Seen {
    takeover::Seen {
        me,
        last_owner: v.record.node,
        copies: v.record.components.iter().map(|c| (c.node, c.state)).collect(),
        owner: v.owner.map(|o| o.node),
        moving_to: v.moving.map(|m| m.node),
        up: v.up.clone(),
        suspect: v.suspect.clone(),
        me_suspect,
    }
}

/// Which [`Truth`] holds for a suspect copy on this node (invariant 11). If the
/// membership cannot be read, `Elsewhere`.
async fn truth_for_suspect(meta: &Member, seen: &takeover::Seen) -> Truth {
    let Ok(members) = members(meta).await else { return Truth::Elsewhere };
    takeover::truth_for_suspect(seen, &members.iter().map(|(m, _)| m.id).collect())
}

/// Publishes this node's suspect marks (`SUSPECT_PREFIX`) when what the metadata holds
/// differs; a failed write is tried again on the next call.
async fn publish_suspect(node: &Node, meta: &Member) {
    let key = format!("{SUSPECT_PREFIX}{}", meta.id());
    let marks: Vec<u64> = node.suspects().into_iter().collect();
    let published: Vec<u64> = meta
        .read_local(|s| s.get(&key).and_then(|e| serde_json::from_slice(&e.value).ok()))
        .unwrap_or_default();
    if marks == published {
        return;
    }
    let op = if marks.is_empty() {
        Op::Delete { key }
    } else {
        Op::Put { key, value: serde_json::to_vec(&marks).expect("serializes"), lease: None }
    };
    if let Err(e) = write(meta, Vec::new(), vec![op]).await {
        tracing::debug!("cannot publish this node's power-loss marks yet: {}", e.message);
    }
}

/// Each node's steward of the replicated volumes, until the process ends: it exports
/// every one (a router), notices when this node's view is no longer the owner's, and
/// takes ownership of a volume that has no owner (the last owner first, then the other
/// nodes with an ACTIVE copy, each a `T.takeover_step` later in id order) or that an
/// operator (or the owner, for its clients' sake: `MovePolicy`) moves to this node.
pub async fn steward(node: Arc<Node>, meta: Arc<Member>, moves: MovePolicy) {
    // Apart, so a metadata write waiting for a quorum never holds up a takeover.
    tokio::spawn(housekeeping(node.clone(), meta.clone()));
    // What the steward remembers of each volume between passes (`takeover::Memory`).
    let mut memory: HashMap<String, takeover::Memory> = HashMap::new();
    loop {
        tokio::time::sleep(T.steward_every).await;
        if !meta.registered() {
            continue;
        }
        publish_suspect(&node, &meta).await;
        let me = meta.id();
        for v in seen(&meta) {
            let name = v.record.name.clone();
            let router = node.router(&name, || Arc::new(Router::new(meta.clone(), &v.record)));
            router.grow(v.record.size_bytes);
            let here = v.record.components.iter().find(|c| c.node == me);
            let copy = here.and_then(|c| node.component(c.id));
            router.set_local(copy.map(|c| (c, node.fencing().clone())));
            // Back from a power loss and not levelled since (invariant 11).
            let suspect = here.filter(|c| node.suspect(c.id));
            let seen = core_seen(&v, me, suspect.is_some());
            let mem = memory.entry(name.clone()).or_default();
            mem.observe(&seen);
            if let Some(view) = router.view() {
                // This member's applied state may lag the CAS that made this view: only a
                // newer owner, or no owner well after the take, deposes it.
                let held = view.taken_at.elapsed();
                if takeover::superseded(v.owner.map(|o| o.epoch), view.owner.epoch, held, &T) {
                    view.depose("the owner key names a newer owner, or none");
                }
                if !view.deposed() {
                    consider_move(&meta, &v, &view, &router, moves).await;
                    continue;
                }
                router.clear();
            }
            // Whom such a copy leaves an ownerless volume to (asked once a pass).
            let truth = match (suspect, v.owner, seen.active_here()) {
                (Some(_), None, true) => Some(truth_for_suspect(&meta, &seen).await),
                _ => None,
            };
            let go = match takeover::decide(mem, &seen, truth, now(), &T) {
                takeover::Take::Now => true,
                takeover::Take::NotYet => false,
                takeover::Take::WaitForTruth { first } => {
                    if first {
                        tracing::warn!(volume = %name,
                            "not taking ownership: this node's copy may lack writes it had \
                             not synced before a power loss, and another member holds an \
                             active copy that may have them (waiting for that node to be \
                             up, or to say it lost power too; if it is gone for good, \
                             `strata node remove` it)");
                    }
                    false
                }
            };
            // Moved here while its owner is up: that owner hands over first.
            let from = match v.owner {
                Some(o) if o.node != me && v.up.contains(&o.node) => Some((o, &v.record)),
                _ => None,
            };
            // A node stopping cleanly takes nothing: it would leave at once.
            let go = go && !meta.read_local(stopping_nodes).contains(&me);
            if go && router.taking.try_lock().is_ok() {
                match take_over(&node, &meta, &router, false, from).await {
                    Ok(epoch) => {
                        tracing::info!(volume = %name, epoch, "took ownership");
                        // Its copy is the truth now: as good as any there is.
                        if let Some(c) = suspect.filter(|c| node.clear_suspect(c.id)) {
                            // (Asked now if this node took it as the owner key's node.)
                            let truth = match truth {
                                Some(t) => t,
                                None => truth_for_suspect(&meta, &seen).await,
                            };
                            let why = match truth {
                                Truth::Nowhere => "no other member holds an active copy",
                                _ => {
                                    "every other active copy came back from a power loss \
                                      too (its writes not synced may be lost as well)"
                                }
                            };
                            tracing::warn!(volume = %name, component = c.id,
                                "took ownership with a copy that may lack writes it had not \
                                 synced before a power loss: {why}");
                        }
                        if let Some(mem) = memory.get_mut(&name) {
                            mem.waiting_for_truth = false;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(volume = %name, "cannot take ownership: {}", e.message)
                    }
                }
            }
        }
    }
}

/// How one node serves one replicated volume (invariant 6): through its owner view
/// while it owns the volume, else by forwarding each request to the owner.
pub struct Router {
    name: String,
    /// Grows when the volume does (its clients see it when they reconnect).
    size_bytes: AtomicU64,
    meta: Arc<Member>,
    key: DataKey,
    view: RwLock<Option<Arc<ReplicatedVolume>>>,
    peers: Mutex<HashMap<String, Arc<DataPeer>>>,
    runtime: tokio::runtime::Handle,
    /// Held while this node takes ownership.
    taking: tokio::sync::Mutex<()>,
    /// When a client of this node last did I/O on the volume.
    last_local: Mutex<Option<Instant>>,
    /// Numbers this node's forwarded writes (an owner knows a retry by it).
    forwarded: std::sync::atomic::AtomicU32,
    /// This node's copy of the volume, if it holds one (set by the steward).
    local: Mutex<Option<(Component, Arc<Fencing>)>>,
    /// The owner's leave to read this node's copy (invariant 10).
    lease: Arc<Leasing>,
    /// Reads served from this node's copy.
    local_reads: AtomicU64,
    /// Batches of writes that came together, fanned out by this node's view, and the
    /// writes in them.
    batches: [AtomicU64; 2],
}

/// A router's read lease, and whether it is asking for one.
#[derive(Default)]
struct Leasing {
    held: Mutex<Option<ReadLease>>,
    asking: AtomicBool,
}

/// A read lease this node holds: the owner's epoch, the copy, and until when (counted
/// from when it was asked for).
#[derive(Clone, Copy)]
struct ReadLease {
    epoch: u64,
    component: u64,
    until: Instant,
}

/// Where forwarded requests go.
struct Target {
    peer: Arc<DataPeer>,
    component: u64,
    epoch: u64,
}

/// Why a forwarded request is retried when the owner changed while it waited.
const OWNER_MOVED: &str = "the volume has another owner now";

/// Why a forwarded request did not succeed.
enum Forwarded {
    /// The owner answered with a failure: the client gets it.
    Failed(StoreError),
    /// No owner answered: try again (the same or a new owner).
    Retry(String),
}

impl Router {
    /// A router of the volume `record` describes.
    pub fn new(meta: Arc<Member>, record: &VolumeRecord) -> Router {
        Router {
            name: record.name.clone(),
            size_bytes: AtomicU64::new(record.size_bytes),
            key: DataKey::from_secret(meta.secret()),
            meta,
            view: RwLock::new(None),
            peers: Mutex::default(),
            runtime: tokio::runtime::Handle::current(),
            taking: tokio::sync::Mutex::new(()),
            last_local: Mutex::new(None),
            forwarded: std::sync::atomic::AtomicU32::new(1),
            local: Mutex::new(None),
            lease: Arc::default(),
            local_reads: AtomicU64::new(0),
            batches: Default::default(),
        }
    }

    /// Counts a batch of `writes` writes that came together, fanned out by this node's
    /// view (from its own clients, or forwarded by another node).
    pub fn count_batch(&self, writes: usize) {
        self.batches[0].fetch_add(1, Ordering::Relaxed);
        self.batches[1].fetch_add(writes as u64, Ordering::Relaxed);
    }

    /// Batches of writes that came together from a client, fanned out by this node as
    /// the owner, and the writes in them.
    pub fn write_batches(&self) -> (u64, u64) {
        let [batches, writes] = &self.batches;
        (batches.load(Ordering::Relaxed), writes.load(Ordering::Relaxed))
    }

    /// Takes the volume's size from its record (it only grows): this node's clients see
    /// it when they reconnect, and its owner view resyncs and scans all of it.
    fn grow(&self, size_bytes: u64) {
        if self.size_bytes.fetch_max(size_bytes, Ordering::AcqRel) < size_bytes {
            tracing::info!(volume = %self.name, size = size_bytes, "the volume grew");
        }
        if let Some(v) = self.view() {
            v.size_bytes.fetch_max(size_bytes, Ordering::AcqRel);
            v.state().grow(size_bytes.div_ceil(REGION));
        }
    }

    /// This node's copy of the volume (`None`: it holds none), for reads under a lease.
    pub fn set_local(&self, copy: Option<(Component, Arc<Fencing>)>) {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if local.as_ref().map(|(c, _)| c.id()) != copy.as_ref().map(|(c, _)| c.id()) {
            *self.lease.held.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        *local = copy;
    }

    /// Reads served from this node's copy so far.
    pub fn local_reads(&self) -> u64 {
        self.local_reads.load(Ordering::Relaxed)
    }

    /// Serves a read from this node's copy if the owner's lease allows it now (invariant
    /// 10): the lease is current and the copy's fence still at its epoch, held for the
    /// read so no newer owner's fence completes meanwhile. `None`: forward it. Asks for
    /// a lease (in the background) when there is none or it is half gone.
    async fn read_here(&self, offset: u64, length: usize) -> Option<Bytes> {
        let (copy, fencing) = self.local.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let lease = *self.lease.held.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if lease.is_none_or(|l| l.until < now + T.read_lease / 2) {
            self.renew_lease(copy.id());
        }
        let lease = lease.filter(|l| l.component == copy.id() && now < l.until)?;
        if fencing.newest(lease.component) != lease.epoch {
            return None;
        }
        let _pass = fencing.enter(lease.component, lease.epoch).await.ok()?;
        if Instant::now() >= lease.until {
            return None;
        }
        // From the page cache on this task when it can (no hop to the blocking pool);
        // a damaged block is not read here: the owner reads it and repairs its copy.
        let mut buf = vec![0u8; length];
        let data = match copy.volume.try_read_at_nowait(&mut buf, offset) {
            Ok(true) => Bytes::from(buf),
            Ok(false) => copy.volume.clone().submit(IoOp::Read { offset, length }).await.ok()?,
            Err(_) => return None,
        };
        (data.len() == length).then(|| {
            self.local_reads.fetch_add(1, Ordering::Relaxed);
            data
        })
    }

    /// Asks the owner for a read lease of copy `component` (one request at a time).
    fn renew_lease(&self, component: u64) {
        if self.lease.asking.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(t) = self.target() else {
            self.lease.asking.store(false, Ordering::Release);
            return;
        };
        let me = self.meta.id();
        let asked = Instant::now();
        let h = request(Kind::Lease, t.component, t.epoch, me, 0);
        // Not awaited by the read: it is forwarded meanwhile.
        let leasing = self.lease.clone();
        tokio::spawn(async move {
            let reply = tokio::time::timeout(T.read_lease / 2, t.peer.call(h, &[])).await;
            if matches!(reply, Ok(Ok((r, _))) if r.component == component) {
                let l = ReadLease { epoch: t.epoch, component, until: asked + T.read_lease };
                *leasing.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(l);
            }
            leasing.asking.store(false, Ordering::Release);
        });
    }

    /// This node's owner view, if it owns the volume.
    pub fn view(&self) -> Option<Arc<ReplicatedVolume>> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn install(&self, view: Arc<ReplicatedVolume>) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Some(view);
    }

    fn clear(&self) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The owner to forward to, from this member's applied state.
    fn target(&self) -> Result<Target, String> {
        let (owner, record) = self.meta.read_local(|s| {
            let owner = s
                .get(&format!("/volumes/{}/owner", self.name))
                .and_then(|e| serde_json::from_slice::<Owner>(&e.value).ok());
            let record = s
                .get(&format!("/volumes/{}", self.name))
                .and_then(|e| serde_json::from_slice::<VolumeRecord>(&e.value).ok());
            (owner, record)
        });
        let owner = owner.ok_or("the volume has no owner now (a new one is being chosen)")?;
        if owner.node == self.meta.id() {
            return Err("this node is taking ownership".into());
        }
        let component = record
            .and_then(|r| r.components.iter().find(|c| c.node == owner.node).map(|c| c.id))
            .ok_or("the owner holds no copy")?;
        let rpc = rpc_of(&self.meta, owner.node).ok_or("the owner has no address")?;
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let peer = peers
            .entry(rpc.clone())
            .or_insert_with(|| Arc::new(DataPeer::new(self.key.clone(), rpc)))
            .clone();
        Ok(Target { peer, component, epoch: owner.epoch })
    }

    /// One VOLUME request to the owner `t`: its header and payload. A write or trim
    /// carries `number` (the same on every retry of it).
    fn forwarded<'a>(&self, t: &Target, op: &'a IoOp, number: &'a [u8; 4]) -> (Header, &'a [u8]) {
        let (kind, offset, length) = wire(op);
        let (count, payload) = match op {
            IoOp::Write { data, .. } => (u32::from_le_bytes(*number), &data[..]),
            IoOp::Trim { .. } | IoOp::Zero { .. } => (length as u32, &number[..]),
            _ => (length as u32, &[][..]),
        };
        let mut h = request(kind, t.component, t.epoch, 0, offset);
        h.count = count;
        h.flags |= FLAG_VOLUME;
        if matches!(op, IoOp::Write { fua: true, .. }) {
            h.flags |= FLAG_FUA;
        }
        h.lsn = self.meta.id(); // Who forwards (for automatic moves).
        (h, payload)
    }

    /// Sends one VOLUME request to the owner; a read's data is the reply's payload. Given
    /// up (to be retried) as soon as the volume has another owner: an owner that hangs
    /// (paused, cut off) must not hold its forwarders' clients past the failover.
    async fn forward(&self, t: &Target, op: &IoOp, number: u32) -> Result<Bytes, Forwarded> {
        let number = number.to_le_bytes();
        let (h, payload) = self.forwarded(t, op, &number);
        let call = tokio::time::timeout(T.forward_timeout, t.peer.call(h, payload));
        tokio::select! {
            reply = call => self.outcome(&h, reply),
            () = self.owner_moved(t.epoch) => Err(Forwarded::Retry(OWNER_MOVED.into())),
        }
    }

    /// Returns once the volume's owner key (as this member has applied it) no longer
    /// names the owner at `epoch`: another node took it, or its owner's session ended.
    /// What that owner does with a request it got is fenced at the copies (invariant 2),
    /// so the request may go to the next owner.
    async fn owner_moved(&self, epoch: u64) {
        let key = format!("/volumes/{}/owner", self.name);
        loop {
            tokio::time::sleep(T.owner_poll).await;
            let now = self.meta.read_local(|s| {
                s.get(&key).and_then(|e| serde_json::from_slice::<Owner>(&e.value).ok())
            });
            if now.is_none_or(|o| o.epoch != epoch) {
                return;
            }
        }
    }

    /// What the owner's reply to a forwarded request `h` means.
    fn outcome(
        &self,
        h: &Header,
        reply: Result<Result<(Header, Vec<u8>), CallError>, tokio::time::error::Elapsed>,
    ) -> Result<Bytes, Forwarded> {
        match reply {
            Ok(Ok((_, data))) if h.kind == Kind::Read && data.len() != h.count as usize => {
                Err(Forwarded::Retry("a short read from the owner".into()))
            }
            Ok(Ok((_, data))) => Ok(Bytes::from(data)),
            Ok(Err(CallError::Status { status: Status::Io, addr, detail, .. })) => {
                let why = if detail.is_empty() { "no reason given".into() } else { detail };
                Err(Forwarded::Failed(io_error(
                    "forwarded",
                    format!("the owner at {addr} failed it: {why}"),
                )))
            }
            Ok(Err(CallError::Status { status: Status::NoSpace, .. })) => {
                Err(Forwarded::Failed(StoreError::NoSpace))
            }
            Ok(Err(CallError::Status { status: Status::OutOfRange, .. })) => {
                Err(Forwarded::Failed(StoreError::OutOfRange {
                    offset: h.offset,
                    length: u64::from(h.count),
                    size: self.size_bytes.load(Ordering::Acquire),
                }))
            }
            Ok(Err(CallError::Status { status: Status::Invalid, .. })) => {
                Err(Forwarded::Failed(io_error("forwarded", "the owner refused it as malformed")))
            }
            Ok(Err(e)) => Err(Forwarded::Retry(e.to_string())),
            Err(_) => Err(Forwarded::Retry("the owner did not answer in time".into())),
        }
    }

    /// Writes forwarded to the owner together (one send; `numbers` theirs): each one's
    /// outcome, `None` for one to retry on its own (with its number).
    async fn forward_writes(
        &self,
        ops: &[IoOp],
        numbers: &[u32],
    ) -> Vec<Option<Result<Bytes, StoreError>>> {
        let Ok(t) = self.target() else { return ops.iter().map(|_| None).collect() };
        let numbers: Vec<[u8; 4]> = numbers.iter().map(|n| n.to_le_bytes()).collect();
        let requests: Vec<_> =
            ops.iter().zip(&numbers).map(|(op, n)| self.forwarded(&t, op, n)).collect();
        let Ok(pending) = t.peer.send_many(&requests).await else {
            return ops.iter().map(|_| None).collect();
        };
        let deadline = tokio::time::Instant::now() + T.forward_timeout;
        let mut out = Vec::with_capacity(ops.len());
        // As `forward`: given up once the volume has another owner.
        let moved = self.owner_moved(t.epoch);
        tokio::pin!(moved);
        for ((h, _), p) in requests.iter().zip(pending) {
            let reply = tokio::select! {
                reply = tokio::time::timeout_at(deadline, p.wait()) => reply,
                () = &mut moved => break,
            };
            out.push(match self.outcome(h, reply) {
                Ok(data) => Some(Ok(data)),
                Err(Forwarded::Failed(e)) => Some(Err(e)),
                Err(Forwarded::Retry(_)) => None,
            });
        }
        // Those left unanswered when the owner moved: retried.
        out.resize_with(ops.len(), || None);
        out
    }

    /// Runs a request: through this node's view while it owns the volume and serves,
    /// else forwarded to the owner; retried while no owner can take it (for up to
    /// `T.forward_patience`). Large requests go in pieces a frame can carry.
    pub async fn run(&self, op: IoOp) -> Result<Bytes, StoreError> {
        *self.last_local.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let pieces = split(op);
        if pieces.len() == 1 {
            return self.run_one(pieces.into_iter().next().expect("one piece")).await;
        }
        let mut read = BytesMut::new();
        for piece in pieces {
            read.extend_from_slice(&self.run_one(piece).await?);
        }
        Ok(read.freeze())
    }

    async fn run_one(&self, op: IoOp) -> Result<Bytes, StoreError> {
        if let IoOp::Read { offset, length } = op {
            let owner_here = self.view().is_some_and(|v| v.serving());
            if !owner_here {
                if let Some(data) = self.read_here(offset, length).await {
                    return Ok(data);
                }
            }
        }
        self.run_numbered(op, self.number()).await
    }

    /// A number for a forwarded write or trim (never 0: a write without one).
    fn number(&self) -> u32 {
        self.forwarded.fetch_add(1, Ordering::Relaxed).max(1)
    }

    /// [`Self::run_one`] of a request numbered `number`, which it keeps on every retry.
    async fn run_numbered(&self, op: IoOp, number: u32) -> Result<Bytes, StoreError> {
        let deadline = Instant::now() + T.forward_patience;
        loop {
            let why = match self.view() {
                Some(v) if v.serving() => match v.run(op.clone()).await {
                    Ok(data) => return Ok(data),
                    Err(e) if !v.deposed() => return Err(e),
                    Err(e) => format!("this node was deposed: {e}"),
                },
                _ => match self.target() {
                    Err(why) => why,
                    Ok(t) => match self.forward(&t, &op, number).await {
                        Ok(data) => return Ok(data),
                        Err(Forwarded::Failed(e)) => return Err(e),
                        Err(Forwarded::Retry(why)) => why,
                    },
                },
            };
            if Instant::now() >= deadline {
                return Err(io_error(
                    "replicated volume",
                    format!("no owner of {} served the request in time: {why}", self.name),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes that came together from one client (`BlockVolume::submit_writes`): fanned
    /// out in batches by this node's view while it owns the volume and serves, else
    /// forwarded to the owner in one send; those the view failed because it was deposed
    /// meanwhile, or whose forwarding is to be retried, then each as `run` does (a
    /// forwarded write keeps its number).
    pub async fn run_writes(self: Arc<Self>, ops: Vec<IoOp>) -> Vec<Result<Bytes, StoreError>> {
        let fits = ops.iter().all(|op| wire(op).2 <= PAYLOAD_BYTES_MAX as u64);
        let numbers: Vec<u32> = ops.iter().map(|_| self.number()).collect();
        *self.last_local.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let view = self.view().filter(|v| v.serving());
        let mut out: Vec<Option<Result<Bytes, StoreError>>> = match view {
            Some(v) if fits => {
                self.count_batch(ops.len());
                let done = v.run_writes(ops.clone()).await;
                let deposed = v.deposed();
                done.into_iter()
                    .map(|r| match r {
                        Err(_) if deposed => None,
                        r => Some(r.map(|()| Bytes::new())),
                    })
                    .collect()
            }
            None if fits => self.forward_writes(&ops, &numbers).await,
            _ => ops.iter().map(|_| None).collect(),
        };
        let again: Vec<_> = ops
            .into_iter()
            .zip(&out)
            .enumerate()
            .filter(|(_, (_, r))| r.is_none())
            .map(|(j, (op, _))| {
                let (me, number) = (self.clone(), numbers[j]);
                let one = wire(&op).2 <= PAYLOAD_BYTES_MAX as u64;
                (
                    j,
                    tokio::spawn(async move {
                        match one {
                            true => me.run_numbered(op, number).await,
                            false => me.run(op).await,
                        }
                    }),
                )
            })
            .collect();
        for (j, task) in again {
            out[j] = Some(task.await.unwrap_or_else(|e| Err(io_error("replicated volume", e))));
        }
        out.into_iter().map(|r| r.expect("every write ran")).collect()
    }

    /// Runs `op` from a thread outside the runtime (a blocking call).
    fn run_blocking(&self, op: IoOp) -> Result<Bytes, StoreError> {
        self.runtime.block_on(self.run(op))
    }
}

/// How a request travels between nodes: its frame's kind, offset and length in bytes. A
/// zeroing travels as a trim (a trimmed range reads as zeroes on every copy).
fn wire(op: &IoOp) -> (Kind, u64, u64) {
    match op {
        IoOp::Read { offset, length } => (Kind::Read, *offset, *length as u64),
        IoOp::Write { offset, data, .. } => (Kind::Write, *offset, data.len() as u64),
        IoOp::Trim { offset, length } | IoOp::Zero { offset, length, .. } => {
            (Kind::Trim, *offset, *length)
        }
        IoOp::Flush => (Kind::Flush, 0, 0),
    }
}

/// A request in pieces a frame can carry: reads and writes of at most `PAYLOAD_BYTES_MAX`
/// bytes, trims and zeroings of at most 1 GiB.
fn split(op: IoOp) -> Vec<IoOp> {
    const DISCARD_MAX: u64 = 1 << 30;
    let step = PAYLOAD_BYTES_MAX;
    match op {
        IoOp::Read { offset, length } if length > step => (0..length)
            .step_by(step)
            .map(|at| IoOp::Read { offset: offset + at as u64, length: (length - at).min(step) })
            .collect(),
        IoOp::Write { offset, data, fua } if data.len() > step => (0..data.len())
            .step_by(step)
            .map(|at| IoOp::Write {
                offset: offset + at as u64,
                data: data.slice(at..(at + step).min(data.len())),
                fua,
            })
            .collect(),
        IoOp::Trim { offset, length } if length > DISCARD_MAX => (offset..offset + length)
            .step_by(DISCARD_MAX as usize)
            .map(|at| IoOp::Trim { offset: at, length: (offset + length - at).min(DISCARD_MAX) })
            .collect(),
        IoOp::Zero { offset, length, mode } if length > DISCARD_MAX => (offset..offset + length)
            .step_by(DISCARD_MAX as usize)
            .map(|at| IoOp::Zero {
                offset: at,
                length: (offset + length - at).min(DISCARD_MAX),
                mode,
            })
            .collect(),
        op => vec![op],
    }
}

impl BlockVolume for Router {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    fn allocated_bytes(&self) -> Result<u64, StoreError> {
        self.view().map_or(Ok(0), |v| v.allocated_bytes())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let data = self.run_blocking(IoOp::Read { offset, length: buf.len() })?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), StoreError> {
        let data = Bytes::copy_from_slice(data);
        self.run_blocking(IoOp::Write { offset, data, fua: false }).map(drop)
    }

    fn trim(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        self.run_blocking(IoOp::Trim { offset, length }).map(drop)
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode) -> Result<(), StoreError> {
        self.run_blocking(IoOp::Zero { offset, length, mode }).map(drop)
    }

    fn extents(&self, offset: u64, length: u64, max: usize) -> Result<Vec<Extent>, StoreError> {
        match self.view() {
            Some(v) if v.serving() => v.extents(offset, length, max),
            // Not known here: all of it is data.
            _ => Ok(vec![Extent { length, hole: false, zero: false }]),
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.run_blocking(IoOp::Flush).map(drop)
    }

    fn resize(&self, _size_bytes: u64) -> Result<(), StoreError> {
        Err(io_error("resize", "resizing a replicated volume is not supported yet"))
    }

    fn asynchronous(&self) -> bool {
        true
    }

    fn submit_writes(self: Arc<Self>, writes: Vec<IoOp>) -> strata_io::WritesFuture {
        Box::pin(self.run_writes(writes))
    }

    fn submit(self: Arc<Self>, op: IoOp) -> strata_io::IoFuture {
        Box::pin(async move { self.run(op).await })
    }
}

/// This kernel boot's id ("unknown" where there is none). `STRATA_BOOT_ID` replaces it
/// (tests use it to stand for a machine that restarted).
fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        if let Ok(id) = std::env::var("STRATA_BOOT_ID") {
            return id;
        }
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into())
    })
}

/// In the data directory: the boot this node last started in.
const BOOT_FILE: &str = "boot";
/// In the data directory: present when the last run stopped cleanly (all synced).
const CLEAN_STOP_FILE: &str = "clean-stop";

/// Whether the last run in `dir` ended without a clean stop in another boot of the
/// machine: a power loss (or a crash of the machine) may have taken writes its page
/// cache held, so its copies may lack writes the owner acknowledged. Records this boot
/// for the next start.
pub fn lost_power(dir: &std::path::Path) -> bool {
    let last = std::fs::read_to_string(dir.join(BOOT_FILE)).ok();
    let clean = dir.join(CLEAN_STOP_FILE).exists();
    let _ = std::fs::remove_file(dir.join(CLEAN_STOP_FILE));
    let now = boot_id();
    if let Err(e) = strata_store::store::write_atomically(dir, BOOT_FILE, now.as_bytes()) {
        tracing::warn!("cannot record this boot: {e}");
    }
    !clean && now != "unknown" && last.is_some_and(|b| b.trim() != now)
}

/// Records that this run stopped cleanly (everything synced).
pub fn mark_clean_stop(dir: &std::path::Path) {
    if let Err(e) = strata_store::store::write_atomically(dir, CLEAN_STOP_FILE, b"") {
        tracing::warn!("cannot record the clean stop: {e}");
    }
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
    Ok(members(meta).await?.into_iter().filter_map(|(c, up)| up.then_some(c)).collect())
}

/// Every member of the cluster, and whether it is up and registered (a linearizable
/// read of the cluster status; a member that never registered has no address, site or
/// rack known, and is not up). Counted in `node::MEMBERSHIP_READS`.
async fn members(meta: &Member) -> ApiResult<Vec<(Candidate, bool)>> {
    crate::node::MEMBERSHIP_READS.fetch_add(1, Ordering::Relaxed);
    let ClientReply::Status(status) =
        meta.request(ClientRequest::Status).await.map_err(unavailable)?
    else {
        return Err(unavailable("the metadata service answered something else"));
    };
    Ok(status
        .members
        .iter()
        .map(|m| {
            let text = |k: &str| {
                m.record.as_ref().and_then(|r| r[k].as_str()).unwrap_or_default().to_owned()
            };
            let up = m.record.is_some() && m.session.as_ref().is_some_and(|s| s.up);
            let c =
                Candidate { id: m.id, rpc: text("rpc"), site: text("site"), rack: text("rack") };
            (c, up)
        })
        .collect())
}

/// Creates a replicated volume owned by this node: the name is taken, components are
/// made on `replicas` nodes (this one first), ownership is taken, the record published
/// and the volume exported here. On a failure, what was made is removed again.
// The volume's shape (size, copies, access list) as the API gave it, field by field.
#[allow(clippy::too_many_arguments)]
pub async fn create(
    node: &Arc<Node>,
    meta: &Arc<Member>,
    registry: &crate::registry::Registry,
    name: &str,
    size_bytes: u64,
    replicas: u32,
    min_replicas: u32,
    access: strata_types::AccessList,
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
            match tokio::time::timeout(T.io_timeout, peer.call(h, name.as_bytes())).await {
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
    let components: Vec<ComponentRecord> = made
        .iter()
        .map(|(c, id)| ComponentRecord {
            node: c.id,
            id: *id,
            state: CopyState::Active,
            dirty_bytes: None,
            resynced_bytes: None,
            scan_left_bytes: None,
            lsn: None,
            stale_lsn: None,
            suspect: false,
        })
        .collect();
    let mut record = VolumeRecord {
        name: name.to_owned(),
        node: meta.id(),
        state: VolumeState::Ready,
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
        epoch: 0,
        released: None,
        access,
    };
    // The record replaces this node's `creating` one, then ownership is taken as any
    // later owner takes it (epoch 1, every copy fenced).
    let done = match failure {
        None => match registry.publish(&record).await {
            Ok(()) => {
                let router = node.router(name, || Arc::new(Router::new(meta.clone(), &record)));
                match take_over(node, meta, &router, true, None).await {
                    Ok(epoch) => {
                        record.epoch = epoch;
                        Ok(())
                    }
                    // Another node with a copy took the published volume meanwhile: it
                    // exists, and must not be undone.
                    Err(e) => match get(meta, &format!("/volumes/{name}/owner")).await {
                        Ok(Some(_)) => Ok(()),
                        _ => Err(e),
                    },
                }
            }
            Err(e) => Err(e),
        },
        Some(e) => Err(e),
    };
    match done {
        Ok(()) => {
            tracing::info!(volume = name, replicas, ?components, "replicated volume created");
            let nbd = node.nbd_addr();
            Ok(crate::registry::info(&record, &nbd))
        }
        Err(e) => {
            // Undo: remove the components made, give the name back.
            for (c, id) in made {
                if c.id == meta.id() {
                    let _ = node.component_remove(id);
                } else {
                    let peer = DataPeer::new(key.clone(), c.rpc.clone());
                    let _ = tokio::time::timeout(
                        T.io_timeout,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes 1 and 2 made their copies in the same second: both got component id 7. The
    /// last owner (node 2) vouched for its own copy only, and node 3's STALE one (id 9)
    /// lacks regions 4-5. Node 1 must not take the word for its copy; node 2 may; and a
    /// record written before copies were named by node too vouches for none.
    #[test]
    fn a_hand_over_vouches_for_copies_by_node_and_id_not_id_alone() {
        let record = |released: serde_json::Value| -> VolumeRecord {
            serde_json::from_value(serde_json::json!({
                "name": "v", "node": 2, "state": "ready", "id": "", "size_bytes": 1 << 20,
                "created_unix": 0, "origin": null, "snapshots": [], "replicas": 3,
                "min_replicas": 2, "epoch": 4, "released": released,
                "components": [
                    {"node": 1, "id": 7, "state": "active"},
                    {"node": 2, "id": 7, "state": "active"},
                    {"node": 3, "id": 9, "state": "stale"},
                ],
            }))
            .unwrap()
        };
        let r = record(serde_json::json!({
            "epoch": 4,
            "level": [{"node": 2, "id": 7}],
            "stale": [{"node": 3, "id": 9, "runs": [[4, 5]]}],
        }));
        assert!(handed_word(&r, 1).is_none(), "node 1's copy was not level");
        let word = handed_word(&r, 2).expect("node 2's copy was level");
        assert!(!word.level.contains(&CopyRef { node: 1, id: 7 }));
        assert_eq!(word.stale[0].node, 3);
        let old =
            record(serde_json::json!({"epoch": 4, "equal": [7], "stale": [{"id": 9, "runs": []}]}));
        assert!(handed_word(&old, 1).is_none() && handed_word(&old, 2).is_none());
    }
}
