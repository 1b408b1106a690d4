//! The owner's view of the volume: the simulation's driver of the protocol core's
//! [`OwnerState`] (`strata_replica::owner`), as `replicated::ReplicatedVolume` is the
//! server's. Every decision is the core's: which copies a write goes to, which bitmaps to
//! save first, which copies failed and what goes into their bitmaps, which STALE marks to
//! record, whether and when a write is acknowledged, which copies a new owner scans,
//! fences, grants read leases to, resyncs and vouches for. What is here is only the I/O
//! the core leaves to its driver, done as the server does it: region turns, sends over
//! the simulated network and their timeouts, the owner's own copy, the bitmap files on
//! the owner's disk, the metadata service's compare-and-swap, the resync's digests and
//! copies, and the locks (client writes shared, each resync step exclusive; what the
//! server does on blocking threads is done here on the host's task, awaited).
//!
//! Invariants:
//! 1. The core's state is changed only through [`Checked`], which runs
//!    [`OwnerState::validate`] when let go: a broken invariant fails the seed with its
//!    message (`Shared::core_violation`).
//! 2. No `RefCell` borrow of the state is held across an `await`.
//! 3. The bitmaps the core asks to save are saved before anything else is done, in the
//!    order asked.
//! 4. A copy's "connection" is the instance of its node's process this node last heard
//!    from ([`Rpc::connection`]): as the server's connection count, it changes when the
//!    node restarts (after a machine crash, without what it had not synced).

use crate::model::{
    Bitmap, CopyRef, CopyState, Mutation, Owner, Record, Shared, SnapshotRecord, BLOCKS,
    BLOCK_BYTES, META, META_TIMEOUT, MIN_REPLICAS, NODES, REGIONS, REGION_BLOCKS, SCAN_BATCH,
};
use crate::net::{CompReq, Msg, Op, Rpc};
use crate::node::{component, Lease, Seen};
use std::cell::{Cell, RefCell, RefMut};
use std::collections::BTreeSet;
use std::rc::Rc;
use strata_replica::mutation::{reopened, Flaw};
use strata_replica::owner::{Finished, Found, OwnerState, Reply, SaveBitmap, Time, Track, Write};
use strata_replica::resync::ResyncStep;
use strata_replica::snapshot::{self, CatchUp};
use strata_replica::takeover;

const REGION_BYTES: u64 = REGION_BLOCKS * BLOCK_BYTES;

/// How an undo ended.
#[derive(PartialEq)]
enum Undone {
    /// Removed from every copy and the record.
    Done,
    /// Not now (a copy or the metadata service did not answer): a later round finishes.
    NotNow,
    /// It is `ready`: made after all, kept.
    MadeAfterAll,
}

/// Which accounting a copied region goes to.
#[derive(Clone, Copy)]
enum Copying {
    Scan,
    Resync,
}

/// The core's state, borrowed; its invariants are checked when it is let go.
struct Checked<'a> {
    st: RefMut<'a, OwnerState>,
    sh: &'a Shared,
}

impl std::ops::Deref for Checked<'_> {
    type Target = OwnerState;
    fn deref(&self) -> &OwnerState {
        &self.st
    }
}

impl std::ops::DerefMut for Checked<'_> {
    fn deref_mut(&mut self) -> &mut OwnerState {
        &mut self.st
    }
}

impl Drop for Checked<'_> {
    fn drop(&mut self) {
        if let Err(v) = self.st.validate() {
            self.sh.core_violation(format!("epoch {}: {v}", self.st.epoch()));
        }
    }
}

pub struct View {
    sh: Rc<Shared>,
    rpc: Rc<Rpc>,
    lease: Rc<Lease>,
    me: usize,
    pub owner: Owner,
    /// `Record::lost_at` when it took the volume.
    pub lost_at: Option<u64>,
    /// The session the owner key is tied to.
    session: u64,
    state: RefCell<OwnerState>,
    /// Client writes hold it shared; a resync step holds it exclusively.
    resync_lock: tokio::sync::RwLock<()>,
    /// One change of the record at a time.
    recording: tokio::sync::Mutex<()>,
    /// Regions with a write in flight (overlapping writes take turns).
    in_flight: RefCell<BTreeSet<u64>>,
    freed: tokio::sync::Notify,
    deposed: Cell<bool>,
    /// When this node took the volume.
    pub taken_at: Time,
    /// Snapshots this view made (the counter of their keys), and the one it is making
    /// (its periodic round undoes any other left `creating`).
    snapshots_made: Cell<u64>,
    making: Cell<Option<u64>>,
}

/// A write's hold on its region.
struct Turn<'a> {
    view: &'a View,
    region: u64,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.view.in_flight.borrow_mut().remove(&self.region);
        self.view.freed.notify_waiters();
    }
}

impl View {
    /// `replicated::open`: the owner's copy must be ACTIVE; each copy starts as the core
    /// decides from the record and the bitmap file this node kept for it
    /// (`Track::found`: trusted only if kept at the epoch just before, in this boot).
    pub fn open(
        sh: Rc<Shared>,
        rpc: Rc<Rpc>,
        lease: Rc<Lease>,
        me: usize,
        record: &Record,
        owner: Owner,
    ) -> Result<View, String> {
        if record.states[me] != CopyState::Active {
            return Err("this node's copy is not active".into());
        }
        let session = lease.session.get().ok_or("no session")?;
        let mut tracks = Vec::with_capacity(NODES);
        {
            let mut disks = sh.disks.borrow_mut();
            let disk = &mut disks[me];
            for i in 0..NODES {
                let state = record.states[i];
                let kept = disk
                    .bitmaps
                    .remove(&i)
                    .filter(|b| b.epoch + 1 == owner.epoch && b.boot == disk.boot)
                    .map(|b| b.regions);
                let mut track = Track::found(Found {
                    node: i as u64,
                    id: i as u64,
                    local: i == me,
                    state: Some(state),
                    stale_lsn: None,
                    kept: kept.filter(|_| state == CopyState::Stale),
                    vouched: false,
                    handed: None,
                });
                if sh.broken(Mutation::NoScan) && track.state == CopyState::Active {
                    track.scan = None;
                }
                tracks.push(track);
            }
        }
        let regions = REGIONS;
        let view = View {
            rpc,
            lease,
            me,
            owner,
            lost_at: record.lost_at,
            session,
            state: RefCell::new(OwnerState::new(owner.epoch, MIN_REPLICAS, regions, tracks)),
            resync_lock: tokio::sync::RwLock::new(()),
            recording: tokio::sync::Mutex::new(()),
            in_flight: RefCell::default(),
            freed: tokio::sync::Notify::new(),
            deposed: Cell::new(false),
            taken_at: sh.now(),
            snapshots_made: Cell::new(0),
            making: Cell::new(None),
            sh,
        };
        // A STALE copy's bitmap is on file again under this epoch.
        for i in 0..NODES {
            let st = view.st();
            if st[i].state == CopyState::Stale && !st[i].dirty.is_empty() {
                let save = SaveBitmap { copy: i, regions: st[i].dirty.clone(), owes_scan: false };
                drop(st);
                view.save_bitmap(&save, false);
            }
        }
        view.publish();
        Ok(view)
    }

    /// The core's state (invariant 1).
    fn st(&self) -> Checked<'_> {
        Checked { st: self.state.borrow_mut(), sh: &self.sh }
    }

    /// Now, on the core's clock.
    fn now(&self) -> Time {
        self.sh.now()
    }

    /// Copy `i`'s connection now (invariant 4).
    fn connection(&self, i: usize) -> u64 {
        self.rpc.connection(i)
    }

    pub fn deposed(&self) -> bool {
        self.deposed.get()
    }

    pub fn depose(&self, why: &str) {
        if !self.deposed.replace(true) {
            self.sh.note(format!("node {} epoch {} deposed: {why}", self.me, self.owner.epoch));
        }
    }

    /// `serving` (invariant 3): not deposed, under the session the owner key is tied to
    /// (flaw 5: any fresh session of this node), while it is fresh.
    pub fn serving(&self) -> bool {
        let same = reopened(Flaw::SameSession) || self.lease.session.get() == Some(self.session);
        let fresh = self.lease.fresh(self.sh.timing.owner_lease);
        !self.deposed() && ((same && fresh) || self.sh.broken(Mutation::NoLease))
    }

    /// Tells the checker whether this owner has work left.
    fn publish(&self) {
        let busy = {
            let st = self.state.borrow();
            st.tracks().iter().any(|t| t.state != CopyState::Active || t.scan.is_some())
        };
        self.sh.busy.borrow_mut()[self.me] = (!self.deposed()).then_some(busy);
    }

    /// `save_bitmap`: the file, with the epoch and boot it was kept at (epoch 0 if the
    /// copy owes a scan the bitmap does not cover). `count`: the regions it gained count
    /// as dirtied (check 4).
    fn save_bitmap(&self, save: &SaveBitmap, count: bool) {
        let mut disks = self.sh.disks.borrow_mut();
        let disk = &mut disks[self.me];
        let epoch = if save.owes_scan { 0 } else { self.owner.epoch };
        let bitmap = Bitmap { epoch, boot: disk.boot, regions: save.regions.clone() };
        let before = disk.bitmaps.insert(save.copy, bitmap).map(|b| b.regions).unwrap_or_default();
        if count {
            let grew = save.regions.difference(&before).count() as u64;
            self.sh.resync.borrow_mut()[save.copy].dirtied_bytes += grew * REGION_BYTES;
        }
    }

    fn save_bitmaps(&self, saves: &[SaveBitmap]) {
        for save in saves {
            self.save_bitmap(save, true);
        }
    }

    /// One client request.
    pub async fn run(&self, op: &Op, since: u64) -> Result<Option<u64>, String> {
        match op {
            Op::Flush if !takeover::flush_survives(since, self.lost_at) => {
                self.sh.note(format!(
                    "epoch {}: a flush from epoch {since} fails: writes acknowledged before \
                     the take at {:?} may be lost",
                    self.owner.epoch, self.lost_at
                ));
                Err("writes acknowledged before it may have been lost".into())
            }
            Op::Read { block } => {
                Ok(Some(self.sh.disks.borrow()[self.me].component.live[*block as usize]))
            }
            Op::Snapshot { name } => self.snapshot(*name).await.map(Some),
            op => self.fan_out(op).await.map(|()| None),
        }
    }

    async fn enter(&self, region: u64) -> Turn<'_> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.in_flight.borrow_mut().insert(region) {
                return Turn { view: self, region };
            }
            freed.await;
        }
    }

    /// `fan_out_all`: a write or flush planned by the core (`begin`), sent to its
    /// targets and applied to the owner's own copy, the replies folded in (`finish`),
    /// the STALE marks recorded, and acknowledged when the core says (`conclude`).
    async fn fan_out(&self, op: &Op) -> Result<(), String> {
        let _shared = self.resync_lock.read().await;
        if self.deposed() {
            return Err("deposed".into());
        }
        let (region, req) = match op {
            Op::Write { block, value, fua } => (
                Some(block / REGION_BLOCKS),
                CompReq::Write { first: *block, values: vec![*value], fua: *fua },
            ),
            _ => (None, CompReq::Flush),
        };
        let _turn = match region {
            Some(r) => Some(self.enter(r).await),
            None => None,
        };
        // Deposed while it waited for its turn: nothing of it is sent (flaw 8's second
        // part: as built, deposition was checked only before the wait).
        if self.deposed() && !reopened(Flaw::FenceOwnCopy) {
            return Err("deposed".into());
        }
        let regions: Vec<u64> = region.into_iter().collect();
        let (write, states) = {
            let mut st = self.st();
            let (write, saves) = st.begin(1, &regions, region.is_none());
            self.save_bitmaps(&saves);
            let states: Vec<CopyState> = st.tracks().iter().map(|t| t.state).collect();
            (write, states)
        };
        if let Op::Write { block, .. } = op {
            let mut stats = self.sh.resync.borrow_mut();
            for i in (0..NODES).filter(|i| states[*i] == CopyState::Stale) {
                stats[i].away_blocks.insert(*block);
            }
        }
        let epoch = self.owner.epoch;
        let failed = self.send_and_fold(&write, &req, &format!("{op:?}")).await?;
        let now = self.now();
        let hold = self.st().conclude(false, now).map_err(|e| e.to_string())?;
        // A copy that missed this write (or an earlier one) may still serve reads under
        // its lease: acknowledged once that has run out (invariant 10).
        if let Some(until) = hold.filter(|_| !self.sh.broken(Mutation::NoRevocation)) {
            self.sh.note(format!(
                "epoch {epoch}: {op:?} waits {}ms for a revoked read lease",
                (until - now).as_millis()
            ));
            tokio::time::sleep(until - now).await;
        }
        if let Op::Write { value, .. } = op {
            // The ACTIVE copies that held it at the reply (the contract counts only those:
            // a RESYNCING one is not level yet, a new owner may level it down).
            let holders = (0..NODES).filter(|i| {
                *i == self.me
                    || (write.targets.contains(i)
                        && states[*i] == CopyState::Active
                        && !failed.iter().any(|(f, _)| f == i))
            });
            self.sh.holders.borrow_mut().entry(*value).or_default().extend(holders);
        }
        Ok(())
    }

    /// The request `req` of `write` (a write, a flush or a snapshot barrier, planned by
    /// the core): sent to its targets and applied to the owner's own copy, the replies
    /// folded in (`finish`), the STALE marks recorded. Returns the copies that failed it.
    async fn send_and_fold(
        &self,
        write: &Write,
        req: &CompReq,
        what: &str,
    ) -> Result<Vec<(usize, String)>, String> {
        let epoch = self.owner.epoch;
        let deadline = tokio::time::Instant::now() + self.sh.timing.io_timeout;
        let mut sent = Vec::new();
        for &i in &write.targets {
            sent.push((i, self.rpc.send(i, Msg::Comp { epoch, req: req.clone() })));
        }
        let here = match component(&self.sh, self.me, epoch, req) {
            Msg::StaleEpoch(newest) => {
                self.depose(&format!("this node's copy has seen epoch {newest}"));
                Err("deposed".to_string())
            }
            _ => Ok(()),
        };
        let replies = self.replies(sent, deadline).await;
        // Folded in with no await until the failed copies are STALE and their bitmaps
        // saved (as the server does under its state lock).
        let (record, failed) = {
            let mut st = self.st();
            match st.finish(write, replies, here.is_ok()) {
                Finished::Deposed { newest } => {
                    drop(st);
                    self.depose(&format!("a copy has seen epoch {newest}"));
                    return Err("deposed".into());
                }
                Finished::Folded { saves, failed, record, .. } => {
                    self.save_bitmaps(&saves);
                    (record, failed)
                }
            }
        };
        for (i, why) in &failed {
            self.sh.note(format!("epoch {epoch}: copy {i} failed a {what}: {why}"));
        }
        self.publish();
        if self.deposed() {
            return Err("deposed".into());
        }
        here?;
        // Every STALE mark is recorded before the reply; if one cannot be, this node may
        // no longer own the volume: deposed (the client retries at the owner).
        if !self.sh.broken(Mutation::AckBeforeStale) {
            self.record_stale(&record).await?;
        }
        Ok(failed)
    }

    /// Records copies `copies` STALE; if one cannot be, this node may no longer own the
    /// volume: deposed.
    async fn record_stale(&self, copies: &[usize]) -> Result<(), String> {
        for &i in copies {
            if let Err(e) = self.record(i, CopyState::Stale).await {
                let why = format!("a copy failed and cannot be marked stale: {e}");
                self.depose(&why);
                return Err(why);
            }
        }
        Ok(())
    }

    /// The copies' replies to requests `sent`, as the core takes them.
    async fn replies(
        &self,
        sent: Vec<(usize, crate::net::Pending)>,
        deadline: tokio::time::Instant,
    ) -> Vec<(usize, Reply)> {
        let mut replies = Vec::new();
        for (i, p) in sent {
            let reply = match p.wait(deadline).await {
                Some(Msg::CompOk { .. }) => Reply::Took { connection: self.connection(i) },
                Some(Msg::StaleEpoch(newest)) => Reply::StaleEpoch { newest },
                Some(other) => Reply::Failed { why: format!("answered {other:?}") },
                None => Reply::Failed { why: "timed out".into() },
            };
            replies.push((i, reply));
        }
        replies
    }

    /// Copy `i` as the record names it (here node and id are both its index).
    fn copy_ref(i: usize) -> CopyRef {
        CopyRef { node: i as u64, id: i as u64 }
    }

    /// `snapshot_create` (`strata_replica::snapshot`, S1–S3): marked `creating`, cut
    /// behind a barrier on every ACTIVE copy, made `ready` with the copies that took it;
    /// undone here if a step fails (by the next owner if this one is deposed). Returns
    /// its key.
    async fn snapshot(&self, name: u64) -> Result<u64, String> {
        let epoch = self.owner.epoch;
        let n = self.snapshots_made.get() + 1;
        self.snapshots_made.set(n);
        let key = snapshot::key(epoch, n);
        let name = format!("s{name}");
        let size = BLOCKS * BLOCK_BYTES;
        self.st().barrier_ready().map_err(|e| e.to_string())?;
        self.change_snapshots(|s| {
            snapshot::begin(s, "v", size, &name, key, epoch, 0).map_err(|e| e.to_string())
        })
        .await?;
        self.making.set(Some(key));
        let made = match self.barrier(key).await {
            Ok(copies) => {
                self.change_snapshots(|s| {
                    snapshot::made(s, key, &copies).ok_or_else(|| "undone meanwhile".into())
                })
                .await
            }
            Err(e) => Err(e),
        };
        self.making.set(None);
        match made {
            Ok(()) => {
                self.sh.note(format!("epoch {epoch}: snapshot {name} ({key}) made"));
                Ok(key)
            }
            Err(e) => {
                self.sh.note(format!("epoch {epoch}: snapshot {name} ({key}) failed: {e}"));
                match self.undo(key).await {
                    // Its `made` landed though its answer was lost.
                    Undone::MadeAfterAll => Ok(key),
                    _ => Err(e),
                }
            }
        }
    }

    /// The barrier (S1): every write held back, RESYNCING copies STALE (recorded), the
    /// snapshot sent to every ACTIVE copy and taken on this one, the replies folded as a
    /// write's. Returns the copies that took it.
    async fn barrier(&self, key: u64) -> Result<Vec<CopyRef>, String> {
        let _exclusive = self.resync_lock.write().await;
        if self.deposed() {
            return Err("deposed".into());
        }
        let b = {
            let mut st = self.st();
            let b = st.barrier().map_err(|e| e.to_string())?;
            self.save_bitmaps(&b.saves);
            b
        };
        self.record_stale(&b.record).await?;
        let failed = self.send_and_fold(&b.write, &CompReq::Snapshot { key }, "snapshot").await?;
        let mut copies = vec![Self::copy_ref(self.me)];
        copies.extend(
            (b.write.targets.iter())
                .filter(|i| !failed.iter().any(|(f, _)| f == *i))
                .map(|i| Self::copy_ref(*i)),
        );
        Ok(copies)
    }

    /// S2's undo of snapshot `key`: marked `deleting` in the record first (so that no
    /// late `made` makes it `ready`; not if it is `ready` already), removed from every
    /// copy, then dropped from the record; left for a later round if a step fails.
    async fn undo(&self, key: u64) -> Undone {
        if self.deposed() {
            return Undone::NotNow;
        }
        let epoch = self.owner.epoch;
        let made = Cell::new(false);
        let abandon = self
            .change_snapshots(|s| {
                snapshot::abandoned(s, key).ok_or_else(|| {
                    made.set(s.iter().any(|s| s.id == key));
                    "not being made".to_string()
                })
            })
            .await;
        if abandon.is_err() {
            return if made.get() { Undone::MadeAfterAll } else { Undone::NotNow };
        }
        let req = CompReq::RemoveSnapshot { key };
        if let Msg::StaleEpoch(e) = component(&self.sh, self.me, epoch, &req) {
            self.depose(&format!("this node's copy has seen epoch {e}"));
            return Undone::NotNow;
        }
        for i in (0..NODES).filter(|i| *i != self.me) {
            let msg = Msg::Comp { epoch, req: req.clone() };
            match self.rpc.call(i, msg, self.sh.timing.io_timeout).await {
                Some(Msg::CompOk { .. }) => {}
                Some(Msg::StaleEpoch(e)) => {
                    self.depose(&format!("copy {i} has seen epoch {e}"));
                    return Undone::NotNow;
                }
                _ => return Undone::NotNow,
            }
        }
        if self.change_snapshots(|s| Ok(snapshot::dropped(s, key))).await.is_err() {
            return Undone::NotNow;
        }
        self.sh.note(format!("epoch {epoch}: snapshot {key} undone"));
        Undone::Done
    }

    /// A change of the record's snapshots by CAS, compared with the owner key (as
    /// `record`): `change` gives the new list from the current one, or why not.
    async fn change_snapshots(
        &self,
        change: impl Fn(&[SnapshotRecord]) -> Result<Vec<SnapshotRecord>, String>,
    ) -> Result<(), String> {
        let _recording = self.recording.lock().await;
        for _ in 0..5 {
            let Some(seen) = self.rpc.call(META, Msg::Get, META_TIMEOUT).await.and_then(Seen::from)
            else {
                return Err("cannot read the record".into());
            };
            if seen.owner != Some(self.owner) {
                self.depose("no longer the owner");
                return Err("no longer the owner".into());
            }
            let mut record = seen.record.clone();
            record.snapshots = change(&seen.record.snapshots)?;
            if record == seen.record {
                return Ok(());
            }
            let set =
                Msg::SetRecord { owner: self.owner, record_version: seen.record_version, record };
            match self.rpc.call(META, set, META_TIMEOUT).await {
                Some(Msg::Cas(true)) => return Ok(()),
                Some(Msg::Cas(false)) => {}
                _ => return Err("the metadata service did not answer".into()),
            }
        }
        Err("the record keeps changing".into())
    }

    /// S2 in the periodic round: every snapshot left `creating` but the one this view is
    /// making (a dead or deposed owner's, or one whose undo could not reach a copy) is
    /// undone.
    async fn undo_left(&self) {
        let Some(seen) = self.rpc.call(META, Msg::Get, META_TIMEOUT).await.and_then(Seen::from)
        else {
            return;
        };
        let copies: Vec<CopyRef> = (0..NODES).map(Self::copy_ref).collect();
        for u in snapshot::undo_on_take(&seen.record.snapshots, &copies) {
            if self.making.get() != Some(u.key) {
                self.undo(u.key).await;
            }
        }
    }

    /// S5: whether STALE copy `i` lacks no snapshot (so it may turn RESYNCING).
    async fn none_pending(&self, i: usize) -> bool {
        let seen = self.rpc.call(META, Msg::Get, META_TIMEOUT).await.and_then(Seen::from);
        let Some(seen) = seen else { return false };
        let may = match self.sh.broken(Mutation::ResyncWhileCreating) {
            true => snapshot::pending(&seen.record.snapshots, Self::copy_ref(i)).is_empty(),
            false => snapshot::may_resync(&seen.record.snapshots, Self::copy_ref(i)),
        };
        may && self.st()[i].state == CopyState::Stale
    }

    /// S4/S5: a STALE copy `i` brought to each snapshot it lacks, oldest first, levelled
    /// from this node's own snapshot over its bitmap (or in full if it owes a scan), then
    /// the snapshot taken on it and recorded among the holders. Returns once none is
    /// pending (checked again under the exclusive lock before the copy is RESYNCING).
    async fn catch_up(&self, i: usize) -> Result<(), String> {
        let epoch = self.owner.epoch;
        let io_timeout = self.sh.timing.io_timeout;
        loop {
            let Some(seen) = self.rpc.call(META, Msg::Get, META_TIMEOUT).await.and_then(Seen::from)
            else {
                return Err("cannot read the record".into());
            };
            let pending = snapshot::pending(&seen.record.snapshots, Self::copy_ref(i));
            let Some(s) = pending.first() else { return Ok(()) };
            let key = s.id;
            let source = {
                let disks = self.sh.disks.borrow();
                let own = &disks[self.me].component;
                match self.sh.broken(Mutation::CatchUpFromLive) {
                    true => Some(own.live.clone()),
                    false => own.snapshots.get(&key).cloned(),
                }
            };
            let Some(source) = source else {
                return Err(format!("this node's copy lacks snapshot {key} (S8)"));
            };
            let (dirty, owes_scan) = {
                let st = self.st();
                if st[i].state != CopyState::Stale {
                    return Err("no longer STALE".into());
                }
                let b = st.bitmap(i);
                (b.regions, b.owes_scan)
            };
            // Every step over one connection: a copy that restarted meanwhile may have
            // lost what the levelling wrote, and its snapshot would keep the hole.
            let connection = self.connection(i);
            let mut from = 0;
            loop {
                match snapshot::catch_up_step(key, &dirty, owes_scan, REGIONS, from, SCAN_BATCH) {
                    CatchUp::Level { range, .. } => {
                        let deadline = tokio::time::Instant::now() + io_timeout;
                        let sent: Vec<_> = range
                            .clone()
                            .map(|r| {
                                let _lsn = self.st().next_lsn();
                                let blocks = (r * REGION_BLOCKS) as usize
                                    ..((r + 1) * REGION_BLOCKS) as usize;
                                let values = source[blocks].to_vec();
                                let req =
                                    CompReq::Write { first: r * REGION_BLOCKS, values, fua: false };
                                self.rpc.send(i, Msg::Comp { epoch, req })
                            })
                            .collect();
                        for p in sent {
                            if !matches!(p.wait(deadline).await, Some(Msg::CompOk { .. })) {
                                return Err(format!("copy {i} failed its catch-up"));
                            }
                        }
                        from = range.end;
                    }
                    CatchUp::Take { key } => {
                        let req = CompReq::Snapshot { key };
                        let taken = self.rpc.call(i, Msg::Comp { epoch, req }, io_timeout).await;
                        if !matches!(taken, Some(Msg::CompOk { .. })) {
                            return Err(format!("copy {i} did not take snapshot {key}"));
                        }
                        if self.connection(i) != connection {
                            return Err(format!("copy {i} restarted during its catch-up"));
                        }
                        let copy = Self::copy_ref(i);
                        self.change_snapshots(|s| {
                            Ok(snapshot::caught_up(s, key, copy).unwrap_or_else(|| s.to_vec()))
                        })
                        .await?;
                        self.sh.note(format!("epoch {epoch}: copy {i} caught up snapshot {key}"));
                        break;
                    }
                }
            }
        }
    }

    /// `grant_lease`: a read lease for copy `i`, while this owner serves and the core
    /// finds the copy whole (ACTIVE, owing no scan, its last answer over the connection
    /// its node has now), once it answers a probe, and only if `owner_key` (this node's
    /// metadata view) still names this owner.
    pub async fn grant_lease(&self, i: usize, owner_key: impl Fn() -> Option<Owner>) -> bool {
        if i == self.me || !self.serving() || !self.st().whole(i, self.connection(i)) {
            return false;
        }
        let epoch = self.owner.epoch;
        let probe = Msg::Comp { epoch, req: CompReq::Probe { whole: None } };
        let read_lease = self.sh.timing.read_lease;
        if !matches!(self.rpc.call(i, probe, read_lease / 4).await, Some(Msg::CompOk { .. })) {
            return false;
        }
        // Not once this node's metadata view shows a newer take.
        if owner_key() != Some(self.owner) || !self.serving() {
            return false;
        }
        // Counted from now: the node counts from when it asked, which was earlier.
        let until = self.now() + read_lease;
        let connection = self.connection(i);
        self.st().grant(i, connection, until)
    }

    /// `take_over`'s last step for a take while the last owner's session may be live,
    /// where an ACTIVE copy did not answer the fence probe: nothing is acknowledged for
    /// `2 * read_lease` (the last owner may grant until it sees the take).
    pub fn hold_acks_after_unclean_take(&self) {
        if self.sh.broken(Mutation::NoTakeWait) {
            return;
        }
        let wait = 2 * self.sh.timing.read_lease;
        self.sh.note(format!(
            "epoch {}: a take with an unfenced copy, no ack before {}ms",
            self.owner.epoch,
            (self.now() + wait).as_millis()
        ));
        let until = self.now() + wait;
        self.st().hold_acks_until(until);
    }

    /// `record`: copy `i`'s state into the record by CAS, compared with the owner key;
    /// then the core knows it is recorded.
    async fn record(&self, i: usize, to: CopyState) -> Result<(), String> {
        let _recording = self.recording.lock().await;
        let mut result = Err("the record keeps changing".to_string());
        for _ in 0..5 {
            let Some(seen) = self.rpc.call(META, Msg::Get, META_TIMEOUT).await.and_then(Seen::from)
            else {
                result = Err("cannot read the record".into());
                break;
            };
            if seen.record.states[i] == to {
                result = Ok(());
                break;
            }
            let mut record = seen.record.clone();
            record.states[i] = to;
            let set =
                Msg::SetRecord { owner: self.owner, record_version: seen.record_version, record };
            match self.rpc.call(META, set, META_TIMEOUT).await {
                Some(Msg::Cas(true)) => {
                    result = Ok(());
                    break;
                }
                Some(Msg::Cas(false)) => {
                    let now =
                        self.rpc.call(META, Msg::Get, META_TIMEOUT).await.and_then(Seen::from);
                    if now.is_some_and(|s| s.owner != Some(self.owner)) {
                        self.depose("no longer the owner");
                        result = Err("no longer the owner".into());
                        break;
                    }
                }
                _ => {
                    result = Err("the metadata service did not answer".into());
                    break;
                }
            }
        }
        if result.is_ok() {
            self.st().recorded(i, to, None);
            if to == CopyState::Active {
                let mut stats = self.sh.resync.borrow_mut();
                let away = std::mem::take(&mut stats[i].away_blocks);
                stats[i].away_bytes += away.len() as u64 * BLOCK_BYTES;
            }
            self.publish();
        }
        result
    }

    /// `fence_copies`: this node's own copy's fence raised to this epoch first (flaw 8:
    /// as built, it stayed at this node's older view's epoch until this view first wrote
    /// to it), then a probe at this epoch to every other copy; the core takes each answer
    /// as the copy's connection (`fenced`) and each silence as STALE (`silent`). One that
    /// has seen a newer owner ends this view. Returns whether a copy that was ACTIVE did
    /// not answer.
    pub async fn fence_copies(&self) -> Result<bool, String> {
        let epoch = self.owner.epoch;
        if !reopened(Flaw::FenceOwnCopy) {
            // Admitting and applying are one step here: nothing of the old epoch to wait
            // for (the server's raise waits for what the old epoch admitted).
            let probe = CompReq::Probe { whole: None };
            if let Msg::StaleEpoch(e) = component(&self.sh, self.me, epoch, &probe) {
                return Err(format!("this node's copy has seen epoch {e}"));
            }
        }
        let deadline = tokio::time::Instant::now() + self.sh.timing.probe_timeout;
        let probes: Vec<_> = (0..NODES)
            .filter(|i| *i != self.me)
            .map(|i| {
                let probe = Msg::Comp { epoch, req: CompReq::Probe { whole: None } };
                (i, self.rpc.send(i, probe))
            })
            .collect();
        let mut silent = false;
        for (i, p) in probes {
            let refused = self.sh.fast_refuse
                && self.sh.cut.borrow().contains(&(self.me.min(i), self.me.max(i)));
            let reply = if refused { None } else { p.wait(deadline).await };
            match reply {
                Some(Msg::CompOk { suspect, .. }) => {
                    let connection = self.connection(i);
                    let mut st = self.st();
                    st.fenced(i, connection);
                    if suspect && st.lost_power(i) {
                        drop(st);
                        self.sh.note(format!(
                            "epoch {epoch}: copy {i} is suspect (back from a power loss): stale"
                        ));
                    }
                }
                Some(Msg::StaleEpoch(e)) => return Err(format!("copy {i} has seen epoch {e}")),
                _ => silent |= self.st().silent(i),
            }
        }
        self.publish();
        Ok(silent)
    }

    /// `run_resync`: every `resync_every`, a look at the ACTIVE copies, then each copy the
    /// core wants resynced or scanned.
    pub async fn run_resync(self: Rc<Self>) {
        loop {
            tokio::time::sleep(self.sh.timing.resync_every).await;
            if self.deposed() {
                self.publish();
                return;
            }
            self.check_copies().await;
            if self.sh.snapshots {
                self.undo_left().await;
            }
            let wanting = self.st().wanting();
            for i in wanting {
                if let Err(e) = self.resync(i).await {
                    self.sh.note(format!("epoch {}: resync of {i}: {e}", self.owner.epoch));
                }
            }
            self.publish();
        }
    }

    /// `check_copies`: a probe to every ACTIVE copy, vouching for it (WHOLE) if the core
    /// finds it whole; one that answers over a new connection (its node restarted) is
    /// STALE, its unflushed regions in its bitmap (`answered`).
    async fn check_copies(&self) {
        let epoch = self.owner.epoch;
        let active: Vec<usize> = {
            let st = self.st();
            (0..NODES).filter(|i| *i != self.me && st[*i].state == CopyState::Active).collect()
        };
        for i in active {
            let connection = self.connection(i);
            let whole = self.st().whole(i, connection).then_some(connection);
            let probe = Msg::Comp { epoch, req: CompReq::Probe { whole } };
            let reply = self.rpc.call(i, probe, self.sh.timing.probe_timeout).await;
            if !matches!(reply, Some(Msg::CompOk { .. })) {
                continue;
            }
            let _exclusive = self.resync_lock.write().await;
            let connection = self.connection(i);
            let save = self.st().answered(i, connection);
            if let Some(save) = save {
                self.sh.note(format!(
                    "epoch {epoch}: copy {i} answered over a new connection: stale until levelled"
                ));
                self.save_bitmap(&save, true);
            }
        }
    }

    /// `fail_copy`: copy `i` failed while being levelled: STALE, what it took since its
    /// last flush back in its bitmap, the mark recorded if it can be now.
    async fn fail_copy(&self, i: usize, why: String) -> String {
        let save = {
            let mut st = self.st();
            st.stale(i);
            st.lose_unflushed(i)
        };
        self.save_bitmap(&save, true);
        let _ = self.record(i, CopyState::Stale).await;
        why
    }

    /// `resync`: a STALE copy that answers is RESYNCING (its connection the baseline);
    /// a due scan compares every region; the bitmap's runs are compared and copied;
    /// flushed over the same connection, it is ACTIVE.
    async fn resync(&self, i: usize) -> Result<(), String> {
        if self.deposed() {
            return Ok(());
        }
        let epoch = self.owner.epoch;
        let timing = self.sh.timing;
        let was = self.st()[i].state;
        if was != CopyState::Active {
            let probe = Msg::Comp { epoch, req: CompReq::Probe { whole: None } };
            if !matches!(
                self.rpc.call(i, probe, timing.probe_timeout).await,
                Some(Msg::CompOk { .. })
            ) {
                return Ok(()); // Still away.
            }
            // A STALE copy catches up first (S5); a RESYNCING one (a resync resumed)
            // holds every snapshot already (a barrier would have made it STALE).
            let catching_up = self.sh.snapshots && self.st()[i].state == CopyState::Stale;
            if catching_up {
                self.catch_up(i).await?;
            }
            let _exclusive = self.resync_lock.write().await;
            if self.st()[i].unrecorded {
                self.record(i, CopyState::Stale).await?;
            }
            // Checked under the lock, whatever the copy was when this began: a barrier
            // may have made a RESYNCING copy STALE meanwhile (S5).
            let stale = self.st()[i].state == CopyState::Stale;
            if self.sh.snapshots && stale && !self.none_pending(i).await {
                return Ok(()); // A snapshot it lacks, or one being made: the next round.
            }
            self.record(i, CopyState::Resyncing).await?;
            let connection = self.connection(i);
            self.st()[i].connection = Some(connection);
        }
        // The core's plan (`strata_replica::resync`), a step at a time, each under the
        // exclusive lock.
        let _exclusive = loop {
            let exclusive = self.resync_lock.write().await;
            let step = self.st().resync_step(i, was, SCAN_BATCH);
            match step {
                // It failed meanwhile (or a scan of an active copy is over).
                ResyncStep::Stop | ResyncStep::Done => return Ok(()),
                ResyncStep::Scan(regions) => {
                    let to = regions.end;
                    if let Err(e) = self.level(i, regions, Copying::Scan).await {
                        drop(exclusive);
                        return Err(self.fail_copy(i, e).await);
                    }
                    self.st().scanned(i, to);
                }
                ResyncStep::Run(run) => {
                    if let Err(e) = self.level(i, run.clone(), Copying::Resync).await {
                        drop(exclusive);
                        return Err(self.fail_copy(i, e).await);
                    }
                    let save = self.st().cleared(i, run);
                    self.save_bitmap(&save, false);
                }
                ResyncStep::Flush => break exclusive,
            }
        };
        let flush = Msg::Comp { epoch, req: CompReq::Flush };
        if !matches!(self.rpc.call(i, flush, timing.io_timeout).await, Some(Msg::CompOk { .. })) {
            drop(_exclusive);
            return Err(self
                .fail_copy(i, format!("copy {i} failed to flush after its resync"))
                .await);
        }
        let same = self.st()[i].connection == Some(self.connection(i));
        if !same {
            drop(_exclusive);
            let why = format!("copy {i} was reached over a new connection during its resync");
            return Err(self.fail_copy(i, why).await);
        }
        self.st()[i].unflushed.clear();
        // Level and synced over its resync's connection: vouched for now (flaw 9), before
        // it counts as ACTIVE, not only at the next periodic look.
        let connection = self.connection(i);
        if self.st().settled(i, connection) {
            let probe = Msg::Comp { epoch, req: CompReq::Probe { whole: Some(connection) } };
            let _ = self.rpc.call(i, probe, timing.probe_timeout).await;
        }
        self.record(i, CopyState::Active).await?;
        self.sh.disks.borrow_mut()[self.me].bitmaps.remove(&i);
        Ok(())
    }

    /// `level`: regions `regions` of copy `i` made equal to the owner's copy (digests
    /// compared, differing regions copied), then told to the core (`levelled`). The
    /// caller holds the exclusive lock.
    async fn level(
        &self,
        i: usize,
        regions: std::ops::Range<u64>,
        copying: Copying,
    ) -> Result<(), String> {
        let epoch = self.owner.epoch;
        let io_timeout = self.sh.timing.io_timeout;
        let (ours, digests): (Vec<u64>, Vec<u64>) = {
            let disks = self.sh.disks.borrow();
            let c = &disks[self.me].component;
            let blocks =
                (regions.start * REGION_BLOCKS) as usize..(regions.end * REGION_BLOCKS) as usize;
            (c.live[blocks].to_vec(), regions.clone().map(|r| c.digest(r)).collect())
        };
        let req = CompReq::Digest { first: regions.start, count: regions.end - regions.start };
        let theirs = match self.rpc.call(i, Msg::Comp { epoch, req }, io_timeout).await {
            Some(Msg::CompOk { digests, .. }) => digests,
            Some(Msg::StaleEpoch(e)) => return Err(format!("copy {i} has seen epoch {e}")),
            _ => return Err(format!("copy {i} did not answer")),
        };
        let differ: Vec<u64> = regions
            .clone()
            .filter(|r| {
                theirs.get((r - regions.start) as usize)
                    != Some(&digests[(r - regions.start) as usize])
            })
            .collect();
        let deadline = tokio::time::Instant::now() + io_timeout;
        let mut sent = Vec::new();
        for r in &differ {
            let _lsn = self.st().next_lsn();
            let k = ((r - regions.start) * REGION_BLOCKS) as usize;
            let values = ours[k..k + REGION_BLOCKS as usize].to_vec();
            let req = CompReq::Write { first: r * REGION_BLOCKS, values, fua: false };
            sent.push(self.rpc.send(i, Msg::Comp { epoch, req }));
        }
        for p in sent {
            if !matches!(p.wait(deadline).await, Some(Msg::CompOk { .. })) {
                return Err(format!("copy {i} failed during its resync"));
            }
        }
        let bytes = differ.len() as u64 * REGION_BYTES;
        self.st().levelled_copying(i, regions, &differ, bytes);
        let mut stats = self.sh.resync.borrow_mut();
        match copying {
            Copying::Scan => stats[i].scan_bytes += bytes,
            Copying::Resync => stats[i].resync_bytes += bytes,
        }
        Ok(())
    }
}
