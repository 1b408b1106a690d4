//! The owner's view of the volume, ported from `replicated::ReplicatedVolume`: the
//! write fan-out with region turns, bitmaps and STALE marks (invariant 4), the fencing
//! of every copy by a new owner (invariant 3), digest scans of the other ACTIVE copies
//! (invariant 5), and resync. What the real code does on blocking threads under
//! `blocking_write` is done here on the host's task under the same lock, awaited.

use crate::model::{
    Bitmap, CopyState, Mutation, Owner, Record, Shared, BLOCK_BYTES, IO_TIMEOUT, META,
    META_TIMEOUT, MIN_REPLICAS, NODES, PROBE_TIMEOUT, READ_LEASE, REGIONS, REGION_BLOCKS,
    RESYNC_EVERY, SCAN_BATCH,
};
use crate::net::{CompReq, Msg, Op, Rpc};
use crate::node::{component, Lease, Seen};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use tokio::time::Instant;

const REGION_BYTES: u64 = REGION_BLOCKS * BLOCK_BYTES;

struct Copies {
    states: [CopyState; NODES],
    /// Per copy: its synchronization bitmap.
    dirty: Vec<BTreeSet<u64>>,
    /// Per copy: regions written since its last successful flush.
    /// (Region → the LSN of the last write to it, for the fourth fix.)
    unflushed: Vec<BTreeMap<u64, u64>>,
    /// STALE here, not yet in the record.
    unrecorded: BTreeSet<usize>,
    /// Per copy: the next region of a due digest scan.
    scan: Vec<Option<u64>>,
    /// Per copy: until when its node may serve reads from it (`leased_until`,
    /// invariant 10).
    leased_until: [Option<Instant>; NODES],
    /// No write or flush is acknowledged before this (`revoked_until`): the read lease
    /// of a copy that stopped being ACTIVE has run out by then.
    revoked_until: Option<Instant>,
}

impl Copies {
    /// `Copies::stale`: copy `i` misses writes from now on; its read lease, if it has
    /// one, holds back every acknowledgment until it ends.
    fn stale(&mut self, i: usize) {
        self.states[i] = CopyState::Stale;
        self.unrecorded.insert(i);
        if let Some(until) = self.leased_until[i].take() {
            self.revoked_until = self.revoked_until.max(Some(until));
        }
    }
}

/// Which accounting a copied region goes to.
#[derive(Clone, Copy)]
enum Copying {
    Scan,
    Resync,
}

pub struct View {
    sh: Rc<Shared>,
    rpc: Rc<Rpc>,
    lease: Rc<Lease>,
    me: usize,
    pub owner: Owner,
    /// The session the owner key is tied to.
    session: u64,
    st: RefCell<Copies>,
    /// Client writes hold it shared; a resync step holds it exclusively.
    resync_lock: tokio::sync::RwLock<()>,
    /// One change of the record at a time.
    recording: tokio::sync::Mutex<()>,
    /// Regions with a write in flight (overlapping writes take turns).
    in_flight: RefCell<BTreeSet<u64>>,
    freed: tokio::sync::Notify,
    deposed: Cell<bool>,
    /// The last LSN given out (bookkeeping, as built; the fourth fix orders by it).
    lsn: Cell<u64>,
    pub taken_at: Instant,
    /// The proposed fix: each copy's boot as this owner last saw it.
    boots: RefCell<[Option<u64>; NODES]>,
    /// The proposed fix: whether a flush of this owner's synced each copy (before that,
    /// a copy may hold unsynced writes of an older owner that no bitmap here names).
    synced: RefCell<[bool; NODES]>,
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
    /// `replicated::open`: the owner's copy must be ACTIVE; every other ACTIVE copy gets
    /// a digest scan; a STALE copy keeps the bitmap this node kept for it only if it was
    /// kept at the epoch just before, in this boot (else it is scanned in full).
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
        let mut dirty = vec![BTreeSet::new(); NODES];
        let mut scan = vec![None; NODES];
        let mut states = record.states;
        {
            let mut disks = sh.disks.borrow_mut();
            let disk = &mut disks[me];
            for i in (0..NODES).filter(|i| *i != me) {
                let kept = disk
                    .bitmaps
                    .remove(&i)
                    .filter(|b| b.epoch + 1 == owner.epoch && b.boot == disk.boot);
                match (record.states[i], kept) {
                    (CopyState::Stale, Some(bitmap)) => {
                        dirty[i] = bitmap.regions;
                        if sh.fix.bitmap_keeps_scan {
                            // As built, a scan the last owner still owed the copy is
                            // forgotten: the file holds only the regions.
                            scan[i] = bitmap.scan;
                        }
                    }
                    (CopyState::Active, _) => {
                        if !sh.broken(Mutation::NoScan) {
                            scan[i] = Some(0);
                        }
                    }
                    _ => {
                        states[i] = CopyState::Stale;
                        scan[i] = Some(0);
                    }
                }
            }
        }
        let view = View {
            sh,
            rpc,
            lease,
            me,
            owner,
            session,
            st: RefCell::new(Copies {
                states,
                dirty,
                unflushed: vec![BTreeMap::new(); NODES],
                unrecorded: BTreeSet::new(),
                scan,
                leased_until: [None; NODES],
                revoked_until: None,
            }),
            resync_lock: tokio::sync::RwLock::new(()),
            recording: tokio::sync::Mutex::new(()),
            in_flight: RefCell::default(),
            freed: tokio::sync::Notify::new(),
            deposed: Cell::new(false),
            lsn: Cell::new(owner.epoch << 40),
            taken_at: Instant::now(),
            boots: RefCell::new([None; NODES]),
            synced: RefCell::new([false; NODES]),
        };
        for i in 0..NODES {
            let st = view.st.borrow();
            if !st.dirty[i].is_empty() {
                view.save_bitmap(i, &st.dirty[i], st.scan[i]);
            }
        }
        view.publish();
        Ok(view)
    }

    /// The proposed fix: whether copy `i`, answering from `boot`, may have lost writes
    /// this owner counted on: its boot changed since this owner last heard from it, or
    /// this owner had not heard from it and it says it is suspect (then a full scan is
    /// due, as nobody knows what it lost). Always `false` as built.
    fn lost(&self, i: usize, boot: u64, suspect: bool) -> bool {
        if !self.sh.fix.power_loss {
            return false;
        }
        let mut boots = self.boots.borrow_mut();
        let lost = match boots[i] {
            Some(known) => known != boot,
            None => suspect,
        };
        boots[i] = Some(boot);
        drop(boots);
        if lost && !self.synced.borrow()[i] {
            self.st.borrow_mut().scan[i] = Some(0);
        }
        if lost {
            self.sh.note(format!(
                "epoch {}: copy {i} may have lost unsynced writes",
                self.owner.epoch
            ));
        }
        lost
    }

    /// Whether copy `i` answered `reply` and lost nothing (`lost`).
    fn answered(&self, i: usize, reply: Option<Msg>) -> bool {
        matches!(reply, Some(Msg::CompOk { boot, suspect, .. }) if !self.lost(i, boot, suspect))
    }

    fn next_lsn(&self) -> u64 {
        self.lsn.set(self.lsn.get() + 1);
        self.lsn.get()
    }

    pub fn deposed(&self) -> bool {
        self.deposed.get()
    }

    pub fn depose(&self, why: &str) {
        if !self.deposed.replace(true) {
            self.sh.note(format!("node {} epoch {} deposed: {why}", self.me, self.owner.epoch));
        }
    }

    /// Invariant 3.
    pub fn serving(&self) -> bool {
        // The fifth fix: only under the session the owner key is tied to. As built, a
        // node that registers again (a new session) makes its old view serve again
        // until its steward sees the owner key changed.
        let same = !self.sh.fix.same_session || self.lease.session.get() == Some(self.session);
        !self.deposed() && ((same && self.lease.fresh()) || self.sh.broken(Mutation::NoLease))
    }

    /// Tells the checker whether this owner has work left.
    fn publish(&self) {
        let st = self.st.borrow();
        let busy = st.states.iter().any(|s| *s != CopyState::Active)
            || st.scan.iter().any(Option::is_some);
        self.sh.busy.borrow_mut()[self.me] = (!self.deposed()).then_some(busy);
    }

    fn save_bitmap(&self, i: usize, regions: &BTreeSet<u64>, scan: Option<u64>) {
        let mut disks = self.sh.disks.borrow_mut();
        let disk = &mut disks[self.me];
        let bitmap =
            Bitmap { epoch: self.owner.epoch, boot: disk.boot, regions: regions.clone(), scan };
        disk.bitmaps.insert(i, bitmap);
    }

    /// Adds `regions` to copy `i`'s bitmap, saved if it grew.
    fn mark(&self, st: &mut Copies, i: usize, regions: impl IntoIterator<Item = u64>) {
        let before = st.dirty[i].len();
        st.dirty[i].extend(regions);
        let grew = (st.dirty[i].len() - before) as u64;
        if grew > 0 {
            self.sh.resync.borrow_mut()[i].dirtied_bytes += grew * REGION_BYTES;
            self.save_bitmap(i, &st.dirty[i], st.scan[i]);
        }
    }

    /// One client request.
    pub async fn run(&self, op: &Op) -> Result<Option<u64>, String> {
        match op {
            Op::Read { block } => {
                Ok(Some(self.sh.disks.borrow()[self.me].component.live[*block as usize]))
            }
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

    /// `fan_out`: a write or flush to every ACTIVE and RESYNCING copy and the owner's own.
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
            _ => (None, CompReq::Flush { settle: false }),
        };
        let _turn = match region {
            Some(r) => Some(self.enter(r).await),
            None => None,
        };
        if self.sh.fix.fence_own_copy && self.deposed() {
            // The eighth fix, its second part: deposed while it waited for its turn,
            // it sends nothing. As built, deposition is checked only before the wait.
            return Err("deposed".into());
        }
        // Write intent first: a STALE copy has the region in its bitmap before any
        // copy has the write.
        let states = {
            let mut st = self.st.borrow_mut();
            for i in 0..NODES {
                if let (Some(r), CopyState::Stale) = (region, st.states[i]) {
                    self.mark(&mut st, i, [r]);
                    if let Op::Write { block, .. } = op {
                        self.sh.resync.borrow_mut()[i].away_blocks.insert(*block);
                    }
                }
            }
            st.states
        };
        let deadline = Instant::now() + IO_TIMEOUT;
        let epoch = self.owner.epoch;
        let lsn = self.next_lsn();
        let mut sent = Vec::new();
        for i in (0..NODES).filter(|i| *i != self.me && states[*i] != CopyState::Stale) {
            sent.push((i, self.rpc.send(i, Msg::Comp { epoch, req: req.clone() })));
        }
        let here = match component(&self.sh, self.me, epoch, &req) {
            Msg::StaleEpoch(newest) => {
                self.depose(&format!("this node's copy has seen epoch {newest}"));
                Err("deposed".to_string())
            }
            _ => Ok(()),
        };
        let (mut took, mut failed) = (Vec::new(), Vec::new());
        let mut holders = vec![self.me];
        let mut replies = Vec::new();
        for (i, p) in sent {
            replies.push((i, p.wait(deadline).await));
        }
        // Judged once every reply is in, with no await until the failed copies are
        // STALE (as the real code judges the connections under its state lock): a read
        // lease must not be granted to a copy found to have lost writes meanwhile.
        for (i, reply) in replies {
            match reply {
                Some(Msg::CompOk { boot, suspect, .. }) if self.lost(i, boot, suspect) => {
                    failed.push(i)
                }
                Some(Msg::CompOk { .. }) => took.push(i),
                Some(Msg::StaleEpoch(e)) => self.depose(&format!("copy {i} has seen epoch {e}")),
                _ => failed.push(i),
            }
        }
        if self.deposed() {
            return Err("deposed".into());
        }
        {
            let mut st = self.st.borrow_mut();
            for i in took {
                // The contract counts ACTIVE copies only (a RESYNCING one is not yet
                // level: a new owner may level it down).
                if states[i] == CopyState::Active {
                    holders.push(i);
                }
                match region {
                    None if self.sh.fix.flush_clears_older => {
                        // The fourth fix: only what was sent before the flush is
                        // synced by it.
                        st.unflushed[i].retain(|_, at| *at > lsn);
                        self.synced.borrow_mut()[i] = true;
                    }
                    None => {
                        // As built: a write sent after the flush, answered before it,
                        // is forgotten here though its copy has not synced it.
                        st.unflushed[i].clear();
                        self.synced.borrow_mut()[i] = true;
                    }
                    Some(r) => {
                        st.unflushed[i].insert(r, lsn);
                    }
                }
            }
            for i in failed {
                self.sh.note(format!("epoch {epoch}: copy {i} failed a {op:?}"));
                st.stale(i);
                let lost = std::mem::take(&mut st.unflushed[i]);
                self.mark(&mut st, i, lost.into_keys().chain(region));
                if self.sh.fix.in_flight_to_bitmap {
                    // The sixth fix: writes still in flight to it may apply there or
                    // not; as built their regions join the bitmap only when they fail
                    // in turn, which never happens if this owner dies first (and the
                    // next owner trusts the bitmap).
                    let in_flight = self.in_flight.borrow().clone();
                    self.mark(&mut st, i, in_flight);
                }
            }
        }
        self.publish();
        here?;
        // Every STALE mark is recorded before the reply.
        if !self.sh.broken(Mutation::AckBeforeStale) {
            let unrecorded: Vec<usize> = self.st.borrow().unrecorded.iter().copied().collect();
            for i in unrecorded {
                self.record(i, CopyState::Stale)
                    .await
                    .map_err(|e| format!("cannot mark {i} stale: {e}"))?;
                self.st.borrow_mut().unrecorded.remove(&i);
            }
        }
        let active = self.st.borrow().states.iter().filter(|s| **s == CopyState::Active).count();
        if active < MIN_REPLICAS {
            return Err(format!("only {active} copies are active"));
        }
        // A copy that missed this write (or an earlier one) may still serve reads under
        // its lease: acknowledged once that has run out (invariant 10).
        let revoked = self.st.borrow().revoked_until;
        if let Some(until) = revoked.filter(|u| *u > Instant::now()) {
            if !self.sh.broken(Mutation::NoRevocation) {
                self.sh.note(format!(
                    "epoch {epoch}: {op:?} waits {}ms for a revoked read lease",
                    (until - Instant::now()).as_millis()
                ));
                tokio::time::sleep_until(until).await;
            }
        }
        if let Op::Write { value, .. } = op {
            self.sh.holders.borrow_mut().entry(*value).or_default().extend(holders);
        }
        Ok(())
    }

    /// `ReplicatedVolume::grant_lease`: a read lease for copy `i`, granted while this
    /// owner serves and the copy is ACTIVE, owes no digest scan, and answers a probe
    /// (the real code's probe must come over the connection its writes were acknowledged
    /// on: here, with the power-loss fix, from the boot this owner last saw it in; a
    /// process restart, which keeps the page cache, is not told apart); then only if
    /// `owner_key` (this node's metadata view) still names this owner.
    pub async fn grant_lease(&self, i: usize, owner_key: impl Fn() -> Option<Owner>) -> bool {
        if i == self.me {
            return false;
        }
        let whole = |st: &Copies| st.states[i] == CopyState::Active && st.scan[i].is_none();
        if !self.serving() || !whole(&self.st.borrow()) {
            return false;
        }
        let epoch = self.owner.epoch;
        let probe = Msg::Comp { epoch, req: CompReq::Probe };
        match self.rpc.call(i, probe, READ_LEASE / 4).await {
            Some(Msg::CompOk { boot, .. })
                if !self.sh.fix.power_loss || self.boots.borrow()[i] == Some(boot) => {}
            _ => return false,
        }
        // Not once this node's metadata view shows a newer take.
        if owner_key() != Some(self.owner) || !self.serving() {
            return false;
        }
        let mut st = self.st.borrow_mut();
        if !whole(&st) {
            return false;
        }
        // Counted from now: the node counts from when it asked, which was earlier.
        let until = Instant::now() + READ_LEASE;
        st.leased_until[i] = st.leased_until[i].max(Some(until));
        true
    }

    /// `take_over`'s last step for an unclean take (a live owner key replaced without a
    /// hand-over) where an ACTIVE copy did not answer the fence probe: nothing is
    /// acknowledged for `2 * READ_LEASE` (the last owner may grant until it sees it).
    pub fn hold_acks_after_unclean_take(&self) {
        if self.sh.broken(Mutation::NoTakeWait) {
            return;
        }
        let until = Instant::now() + 2 * READ_LEASE;
        self.sh.note(format!(
            "epoch {}: unclean take with an unfenced copy, no ack before {}ms",
            self.owner.epoch,
            self.sh.now().as_millis() + 2 * READ_LEASE.as_millis()
        ));
        let mut st = self.st.borrow_mut();
        st.revoked_until = st.revoked_until.max(Some(until));
    }

    /// `record`: copy `i`'s state into the record by CAS, compared with the owner key.
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
            self.st.borrow_mut().states[i] = to;
            if to == CopyState::Active {
                let mut stats = self.sh.resync.borrow_mut();
                let away = std::mem::take(&mut stats[i].away_blocks);
                stats[i].away_bytes += away.len() as u64 * BLOCK_BYTES;
            }
            self.publish();
        }
        result
    }

    /// `fence_copies`: (with the eighth fix) this node's own copy's fence raised to this
    /// epoch, then a probe at this epoch to every other copy; one that does not answer
    /// is STALE; one that has seen a newer owner ends this view. Returns whether a copy
    /// that was ACTIVE did not answer.
    pub async fn fence_copies(&self) -> Result<bool, String> {
        let mut silent = false;
        let epoch = self.owner.epoch;
        if self.sh.fix.fence_own_copy {
            // The eighth fix: as built, the own copy's fence stays at the epoch of this
            // node's older view until this view first writes to it, so a write of that
            // older view still waiting for its region's turn lands on the copy that is
            // now the truth, after the other copies were levelled with it. The real
            // raise waits for what the old epoch admitted; here admitting and applying
            // are one step, so there is nothing to wait for.
            if let Msg::StaleEpoch(e) = component(&self.sh, self.me, epoch, &CompReq::Probe) {
                return Err(format!("this node's copy has seen epoch {e}"));
            }
        }
        let deadline = Instant::now() + PROBE_TIMEOUT;
        let probes: Vec<_> = (0..NODES)
            .filter(|i| *i != self.me)
            .map(|i| (i, self.rpc.send(i, Msg::Comp { epoch, req: CompReq::Probe })))
            .collect();
        for (i, p) in probes {
            let refused = self.sh.fast_refuse
                && self.sh.cut.borrow().contains(&(self.me.min(i), self.me.max(i)));
            let reply = if refused { None } else { p.wait(deadline).await };
            match reply {
                Some(Msg::CompOk { boot, suspect, .. }) => {
                    if self.lost(i, boot, suspect) {
                        let mut st = self.st.borrow_mut();
                        st.stale(i);
                        st.scan[i] = Some(0);
                    }
                }
                Some(Msg::StaleEpoch(e)) => return Err(format!("copy {i} has seen epoch {e}")),
                _ => {
                    let mut st = self.st.borrow_mut();
                    silent |= st.states[i] == CopyState::Active;
                    if st.states[i] != CopyState::Stale {
                        st.stale(i);
                    }
                }
            }
        }
        self.publish();
        Ok(silent)
    }

    /// `run_resync`: every `RESYNC_EVERY`, each copy not ACTIVE or with a scan due.
    pub async fn run_resync(self: Rc<Self>) {
        loop {
            tokio::time::sleep(RESYNC_EVERY).await;
            if self.deposed() {
                self.publish();
                return;
            }
            self.check_copies().await;
            let due: Vec<usize> = {
                let st = self.st.borrow();
                (0..NODES)
                    .filter(|i| *i != self.me)
                    .filter(|i| st.states[*i] != CopyState::Active || st.scan[*i].is_some())
                    .collect()
            };
            for i in due {
                if let Err(e) = self.resync(i).await {
                    self.sh.note(format!("epoch {}: resync of {i}: {e}", self.owner.epoch));
                }
            }
            self.publish();
        }
    }

    /// `check_copies`: a probe to every ACTIVE copy (as built, to find an emptied disk,
    /// which is not modeled). With the proposed fix, a copy whose boot changed is STALE,
    /// its unflushed regions in its bitmap.
    async fn check_copies(&self) {
        let epoch = self.owner.epoch;
        let active: Vec<usize> = {
            let st = self.st.borrow();
            (0..NODES).filter(|i| *i != self.me && st.states[*i] == CopyState::Active).collect()
        };
        for i in active {
            let probe =
                self.rpc.call(i, Msg::Comp { epoch, req: CompReq::Probe }, PROBE_TIMEOUT).await;
            let Some(Msg::CompOk { boot, suspect, .. }) = probe else { continue };
            // Whether it lost anything is judged under the lock, with no await until it
            // is STALE (a read lease is refused meanwhile: its boot is not the one known).
            let known = self.boots.borrow()[i];
            if self.sh.fix.power_loss && known.is_none_or(|k| k != boot) {
                let _exclusive = self.resync_lock.write().await;
                if !self.lost(i, boot, suspect) {
                    continue;
                }
                let mut st = self.st.borrow_mut();
                st.stale(i);
                let lost = std::mem::take(&mut st.unflushed[i]);
                self.mark(&mut st, i, lost.into_keys());
                if suspect {
                    st.scan[i] = Some(0);
                }
            }
        }
    }

    /// Copy `i` failed while being levelled: STALE, its unflushed regions back in its
    /// bitmap.
    async fn fail_copy(&self, i: usize, why: String) -> String {
        {
            let mut st = self.st.borrow_mut();
            st.stale(i);
            let lost = std::mem::take(&mut st.unflushed[i]);
            self.mark(&mut st, i, lost.into_keys());
        }
        if self.record(i, CopyState::Stale).await.is_ok() {
            self.st.borrow_mut().unrecorded.remove(&i);
        }
        why
    }

    /// `resync`: a STALE copy that answers is RESYNCING; a due scan compares every
    /// region; the bitmap's regions are compared and copied; flushed, it is ACTIVE.
    async fn resync(&self, i: usize) -> Result<(), String> {
        if self.deposed() {
            return Ok(());
        }
        let epoch = self.owner.epoch;
        let was = self.st.borrow().states[i];
        if was != CopyState::Active {
            let probe =
                self.rpc.call(i, Msg::Comp { epoch, req: CompReq::Probe }, PROBE_TIMEOUT).await;
            let Some(Msg::CompOk { boot, suspect, .. }) = probe else {
                return Ok(()); // Still away.
            };
            if self.lost(i, boot, suspect) {
                self.st.borrow_mut().scan[i] = Some(0);
            }
            let _exclusive = self.resync_lock.write().await;
            if self.st.borrow().unrecorded.contains(&i) {
                self.record(i, CopyState::Stale).await?;
                self.st.borrow_mut().unrecorded.remove(&i);
            }
            self.record(i, CopyState::Resyncing).await?;
        }
        loop {
            let Some(from) = self.st.borrow().scan[i] else { break };
            let _exclusive = self.resync_lock.write().await;
            let to = (from + SCAN_BATCH).min(REGIONS);
            if let Err(e) = self.level(i, from..to, Copying::Scan).await {
                drop(_exclusive);
                return Err(self.fail_copy(i, e).await);
            }
            self.st.borrow_mut().scan[i] = (to < REGIONS).then_some(to);
        }
        loop {
            let run = {
                let st = self.st.borrow();
                let mut run = st.dirty[i].iter().copied();
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
            let _exclusive = self.resync_lock.write().await;
            if let Err(e) = self.level(i, run.clone(), Copying::Resync).await {
                drop(_exclusive);
                return Err(self.fail_copy(i, e).await);
            }
            let mut st = self.st.borrow_mut();
            for r in run {
                st.dirty[i].remove(&r);
            }
            let (dirty, scan) = (st.dirty[i].clone(), st.scan[i]);
            drop(st);
            self.save_bitmap(i, &dirty, scan);
        }
        if was == CopyState::Active {
            return Ok(());
        }
        let _exclusive = self.resync_lock.write().await;
        {
            let st = self.st.borrow();
            let level = st.dirty[i].is_empty() && st.scan[i].is_none();
            if !level || st.states[i] != CopyState::Resyncing {
                return Ok(());
            }
        }
        let settle = CompReq::Flush { settle: self.sh.fix.power_loss };
        let flushed = self.rpc.call(i, Msg::Comp { epoch, req: settle }, IO_TIMEOUT).await;
        if !self.answered(i, flushed) {
            drop(_exclusive);
            return Err(self
                .fail_copy(i, format!("copy {i} failed to flush after its resync"))
                .await);
        }
        self.st.borrow_mut().unflushed[i].clear();
        self.synced.borrow_mut()[i] = true;
        self.record(i, CopyState::Active).await?;
        self.sh.disks.borrow_mut()[self.me].bitmaps.remove(&i);
        Ok(())
    }

    /// `level`: regions `regions` of copy `i` made equal to the owner's copy (digests
    /// compared, differing regions copied). The caller holds the exclusive lock.
    async fn level(
        &self,
        i: usize,
        regions: std::ops::Range<u64>,
        copying: Copying,
    ) -> Result<(), String> {
        let epoch = self.owner.epoch;
        let (ours, digests): (Vec<u64>, Vec<u64>) = {
            let disks = self.sh.disks.borrow();
            let c = &disks[self.me].component;
            let blocks =
                (regions.start * REGION_BLOCKS) as usize..(regions.end * REGION_BLOCKS) as usize;
            (c.live[blocks].to_vec(), regions.clone().map(|r| c.digest(r)).collect())
        };
        let req = CompReq::Digest { first: regions.start, count: regions.end - regions.start };
        let theirs = match self.rpc.call(i, Msg::Comp { epoch, req }, IO_TIMEOUT).await {
            Some(Msg::CompOk { digests, boot, suspect }) if !self.lost(i, boot, suspect) => digests,
            Some(Msg::CompOk { .. }) => return Err(format!("copy {i} lost unsynced writes")),
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
        let deadline = Instant::now() + IO_TIMEOUT;
        let lsn = self.next_lsn();
        let mut sent = Vec::new();
        for r in &differ {
            let k = ((r - regions.start) * REGION_BLOCKS) as usize;
            let values = ours[k..k + REGION_BLOCKS as usize].to_vec();
            let req = CompReq::Write { first: r * REGION_BLOCKS, values, fua: false };
            sent.push(self.rpc.send(i, Msg::Comp { epoch, req }));
        }
        for p in sent {
            let reply = p.wait(deadline).await;
            if !self.answered(i, reply) {
                return Err(format!("copy {i} failed during its resync"));
            }
        }
        let mut st = self.st.borrow_mut();
        if self.sh.fix.level_keeps_equal {
            // The seventh fix: a region found equal may be equal only in the copy's
            // page cache (a write it took before it failed, or while RESYNCING); as
            // built it leaves the bitmap and is tracked nowhere.
            for r in regions.clone() {
                st.unflushed[i].entry(r).or_insert(lsn);
            }
        }
        let mut stats = self.sh.resync.borrow_mut();
        for r in differ {
            st.unflushed[i].insert(r, lsn);
            match copying {
                Copying::Scan => stats[i].scan_bytes += REGION_BYTES,
                Copying::Resync => stats[i].resync_bytes += REGION_BYTES,
            }
        }
        Ok(())
    }
}
