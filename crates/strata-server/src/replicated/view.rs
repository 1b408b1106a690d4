//! The owner's view of a replicated volume: the shell around the core's `OwnerState`
//! (`strata_replica::owner`) that executes its commands — the write fan-out over the data
//! plane, bitmap files, STALE marks recorded by CAS, read leases, a clean hand-over — and
//! levels copies (resync, digest scans, rebuilds, read repair) as async tasks in the
//! node's resync scheduler's order.

use super::*;
use crate::poison::Locked;

/// One copy as the owner sees it.
pub(super) struct Copy {
    pub(super) node: u64,
    /// Its component id on `node` (changes when it is rebuilt on an emptied node).
    pub(super) id: AtomicU64,
    /// `None`: the owner's own copy (`ReplicatedVolume::local`).
    pub(super) peer: Option<Arc<DataPeer>>,
}

impl Copy {
    pub(super) fn id(&self) -> u64 {
        self.id.load(Ordering::Acquire)
    }
}

/// The node's monotonic clock as the protocol core counts time: since the first call.
pub(super) fn now() -> Time {
    origin().elapsed()
}

/// The instant of the core's time `t`.
pub(super) fn instant(t: Time) -> Instant {
    origin() + t
}

pub(super) fn origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// The regions of a volume with a request in flight.
#[derive(Default)]
pub(super) struct InFlight {
    pub(super) regions: Mutex<BTreeSet<u64>>,
    pub(super) freed: tokio::sync::Notify,
}

/// A request's hold on its regions; dropping it lets overlapping requests go.
pub(super) struct Turn<'a> {
    pub(super) of: &'a InFlight,
    pub(super) regions: Vec<u64>,
}

impl InFlight {
    /// Waits until no request in flight holds any of `regions`, then holds them all.
    pub(super) async fn enter(&self, regions: Vec<u64>) -> Turn<'_> {
        loop {
            // Registered before looking, so a release between the look and the wait
            // still wakes this request.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut held = self.regions.locked("the regions in flight");
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
        let mut held = self.of.regions.locked("the regions in flight");
        for r in &self.regions {
            held.remove(r);
        }
        self.of.freed.notify_waiters();
    }
}

/// A resync job's turn: its permit among this node's jobs and, if the copy's node
/// granted one, its slot there (the peer, the request that renews it, when it was last
/// granted). Dropped, the job ends here and gives the slot back.
pub(super) struct ResyncTurn {
    /// Held for its drop.
    pub(super) _permit: crate::resync::Permit,
    pub(super) slot: Option<(Arc<DataPeer>, Header, tokio::time::Instant)>,
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
    pub(super) name: String,
    /// Grows when the volume does (`resize`).
    pub(super) size_bytes: AtomicU64,
    pub(super) epoch: u64,
    /// The record's `lost_at` when this owner took the volume (takeover T5).
    pub(super) lost_at: Option<u64>,
    pub(super) local: Component,
    pub(super) copies: Vec<Copy>,
    /// The protocol core's state of the copies (`strata_replica::owner`).
    pub(super) state: Mutex<OwnerState>,
    /// Client writes hold it shared; a resync step, or a read repair, holds it
    /// exclusively.
    pub(super) resync_lock: tokio::sync::RwLock<()>,
    /// Held while a copy's state is recorded in the volume's record.
    pub(super) recording: tokio::sync::Mutex<()>,
    /// Regions with a write or trim in flight: overlapping requests take turns, so every
    /// copy applies them in the same order (else copies could end up different).
    pub(super) in_flight: InFlight,
    pub(super) meta: Arc<Member>,
    pub(super) owner: Owner,
    pub(super) fencing: Arc<Fencing>,
    pub(super) scheduler: Arc<crate::resync::Scheduler>,
    /// Client requests served (resync paces itself against them).
    pub(super) client_ops: AtomicU64,
    /// When this node took the volume.
    pub(super) taken_at: Instant,
    /// Nodes forwarding requests to this owner: node → (start of its current streak of
    /// requests, its last request).
    pub(super) forwarders: Mutex<HashMap<u64, (Instant, Instant)>>,
    /// Set when this node finds it is no longer the owner; then it serves nothing.
    pub(super) deposed: AtomicBool,
    /// How often every ACTIVE copy is compared with this one (zero: never).
    pub(super) scrub_every: Duration,
    /// The incarnation of this node's session that the owner key is tied to: under a
    /// later one (the node was declared down and registered again) this view serves
    /// nothing, though its new session is fresh.
    pub(super) incarnation: u64,
    /// Set once this owner has handed the volume over cleanly ([`Self::release`]).
    pub(super) released: tokio::sync::Mutex<bool>,
    /// Set once it was logged that a removed node's copy has nowhere to go.
    pub(super) unplaced: AtomicBool,
    /// Set once this node's store has stayed full (`hand_over_when_full`): a hand-over
    /// then marks its copy STALE.
    pub(super) full: AtomicBool,
    /// A full store's watch is running.
    pub(super) full_watch: AtomicBool,
    /// This view itself, for tasks it starts (set by `lifecycle::take_over`).
    pub(super) weak: std::sync::OnceLock<std::sync::Weak<ReplicatedVolume>>,
    pub(super) bitmaps: PathBuf,
}

/// The owner's state, locked; in debug builds (every test) its invariants are checked
/// when the lock is let go, so each change is checked as it is made.
pub(super) struct Checked<'a>(std::sync::MutexGuard<'a, OwnerState>);

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
pub(super) fn deposed() -> StoreError {
    io_error("replicate", ReplicaError::Deposed { newer: None })
}

/// A core's refusal as the volume interface's error.
pub(super) fn store_error(e: ReplicaError) -> StoreError {
    match e {
        ReplicaError::NoSpace => StoreError::NoSpace,
        e => io_error("replicate", e),
    }
}

pub(super) fn io_error(what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::io(what)(std::io::Error::other(e.to_string()))
}

impl ReplicatedVolume {
    /// Whether a FLUSH that began when the volume's epoch was `since` may be
    /// acknowledged by this owner (takeover T5: not if it took, or an owner since `since`
    /// took, with a suspect copy as the truth).
    pub fn flush_survives(&self, since: u64) -> bool {
        takeover::flush_survives(since, self.lost_at)
    }

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
    pub(super) fn state(&self) -> Checked<'_> {
        Checked(self.state.lock().unwrap_or_else(|e| {
            if !self.deposed.swap(true, Ordering::AcqRel) {
                tracing::error!(volume = %self.name, epoch = self.epoch,
                    "a panic left the owner's state half-changed: no longer serving");
            }
            e.into_inner()
        }))
    }

    /// The volume's size in bytes.
    pub(super) fn size(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// Hands the volume over cleanly (a planned move; invariant 5): stops serving, lets
    /// every request in flight end, syncs every ACTIVE copy, and records in the volume's
    /// record (compared with the owner key) that at this epoch those copies were equal.
    /// The next owner, taking the epoch right after, need not compare them. Asked again,
    /// it answers as the first time.
    pub async fn release(&self) -> Result<(), ReplicaError> {
        let mut released = self.released.lock().await;
        if *released {
            return Ok(());
        }
        if self.deposed() {
            return Err(ReplicaError::Deposed { newer: None });
        }
        // New requests find it deposed (their clients retry at the next owner); those
        // in flight hold the lock shared.
        self.let_go();
        let _exclusive = self.resync_lock.write().await;
        let plan = self.state().release();
        if plan.unrecorded {
            return Err(ReplicaError::NotNow { why: "a copy's failure is not recorded yet" });
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
        let mine = CopyRef { node: me.node, id: me.id() };
        let mut stale = stale;
        // This node's store is full (`hand_over_when_full`): its copy is handed over
        // STALE, so that the next owner's writes skip it (and their regions go to its
        // bitmap) until this node has room and a resync levels it. Synced, it lacks
        // nothing yet: an empty bitmap; not synced, the next owner compares it in full.
        let full = self.full.load(Ordering::Acquire);
        let synced_here = level.contains(&mine);
        if full {
            level.retain(|c| *c != mine);
            if synced_here {
                stale.push(HandedBitmap { node: mine.node, id: mine.id, runs: Vec::new() });
            }
        } else if !synced_here {
            return Err(ReplicaError::NotNow { why: "this node's copy did not sync" });
        }
        let stale_lsn = self.state().lsn() + 1;
        // If the owner key changed, the CAS keeps failing and the next owner compares
        // the copies.
        let mark = Released { epoch: self.epoch, level: level.clone(), stale };
        self.change_record(|record| {
            record.released = Some(mark.clone());
            if full {
                for c in record.components.iter_mut().filter(|c| c.node == mine.node) {
                    c.state = CopyState::Stale;
                    c.stale_lsn = Some(stale_lsn);
                }
            }
            Ok(())
        })
        .await?;
        *released = true;
        tracing::info!(volume = %self.name, epoch = self.epoch, copies = level.len(),
            "handed over cleanly: the copies are level and synced");
        Ok(())
    }

    /// This node's store refused a write (`bytes` in `count` requests) for want of room:
    /// if that write still would not fit `Timing::full_grace` later (a cleaner or a trim
    /// did not free enough), the volume is
    /// moved to a node with an ACTIVE copy that is up (the core's `successors`), whose
    /// take asks this owner to let go: `release` then hands this node's copy over STALE.
    /// So clients get ENOSPC for a moment, not until an operator steps in; the copy is
    /// levelled by a resync once this node has room. At most one such watch at a time.
    pub(super) fn hand_over_when_full(&self, bytes: u64, count: usize) {
        if self.full_watch.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(me) = self.weak.get().and_then(std::sync::Weak::upgrade) else {
            self.full_watch.store(false, Ordering::Release);
            return;
        };
        tokio::spawn(async move {
            tokio::time::sleep(T.full_grace).await;
            let still = !me.local.volume.has_room(bytes, count);
            if still && me.serving() {
                me.full.store(true, Ordering::Release);
                let up: BTreeSet<u64> = me.meta.read_local(|s| {
                    me.copies
                        .iter()
                        .map(|c| c.node)
                        .filter(|n| s.session(*n).is_some_and(|x| x.up))
                        .collect()
                });
                let to = me
                    .state()
                    .successors()
                    .into_iter()
                    .map(|i| me.copies[i].node)
                    .find(|n| up.contains(n));
                match to {
                    Some(to) => {
                        tracing::warn!(volume = %me.name, to,
                            "this node's disk is full: moving the volume to node {to}, \
                             this copy stale until it has room again");
                        let key = format!("/volumes/{}/attach", me.name);
                        let value = serde_json::to_vec(&Move { node: to }).expect("serializes");
                        let put = Op::Put { key, value, lease: None };
                        if let Err(e) = write(&me.meta, vec![], vec![put]).await {
                            let why = e.message;
                            tracing::warn!(volume = %me.name, "cannot ask for the move: {why}");
                        }
                    }
                    None => tracing::warn!(volume = %me.name,
                        "this node's disk is full and no other node with an active copy is \
                         up: writes get ENOSPC until there is room"),
                }
            }
            me.full_watch.store(false, Ordering::Release);
        });
    }

    /// Changes the volume's record by CAS compared with this owner's key (so only while
    /// it owns the volume at its epoch), reading it again after a lost race, 5 times at
    /// most. `change` may refuse, with the error returned.
    pub(super) async fn change_record(
        &self,
        mut change: impl FnMut(&mut VolumeRecord) -> Result<(), ReplicaError>,
    ) -> Result<(), ReplicaError> {
        let key = format!("/volumes/{}", self.name);
        let owner_key = format!("/volumes/{}/owner", self.name);
        let owner_value = serde_json::to_vec(&self.owner).expect("serializes");
        for _ in 0..5 {
            let (mut record, version) =
                read_record(&self.meta, &self.name).await.map_err(|e| record_error(e.message))?;
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
                Err(e) => return Err(record_error(e.message)),
            }
        }
        Err(record_error("it keeps changing, or another node owns the volume"))
    }

    /// The index of the owner's own copy in `copies`.
    pub(super) fn local_index(&self) -> usize {
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
        let mut f = self.forwarders.locked("the forwarders seen");
        let entry = f.entry(from).or_insert((now, now));
        if now.duration_since(entry.1) > T.streak_gap {
            entry.0 = now; // A new streak.
        }
        entry.1 = now;
    }

    /// The node that alone has been sending this volume's I/O for at least `after`, if
    /// this owner has had no client of its own for as long (the automatic move).
    pub(super) fn sole_user(&self, after: Duration, local: Option<Instant>) -> Option<u64> {
        if local.is_some_and(|t| t.elapsed() < after) {
            return None;
        }
        let f = self.forwarders.locked("the forwarders seen");
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
    pub(super) fn let_go(&self) {
        if !self.deposed.swap(true, Ordering::AcqRel) {
            tracing::info!(volume = %self.name, epoch = self.epoch, "handing the volume over");
        }
    }

    pub(super) fn bitmap_file(&self, i: usize) -> String {
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
    pub(super) fn save_bitmap(
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
    pub(super) fn lose_unflushed(&self, i: usize) -> Result<(), StoreError> {
        let mut st = self.state();
        let save = st.lose_unflushed(i);
        // Saved under the state lock: saves follow the changes in order.
        self.save_bitmaps(&st, &[save])
    }

    /// Records copy `i`'s state (and, with `new_id`, its new component id) in the
    /// volume's record, by CAS, only while this node is still the owner at its epoch.
    pub(super) async fn record(
        &self,
        i: usize,
        to: CopyState,
        new_id: Option<u64>,
    ) -> Result<(), ReplicaError> {
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
                return ReplicaError::Deposed { newer: None };
            }
            record_error(e)
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
    pub(super) async fn fan_out(&self, op: IoOp) -> Result<(), StoreError> {
        self.fan_out_all(vec![op]).await
    }

    /// Requests applied on every copy together: one request of any kind, or writes of
    /// which no two touch one region. Each gets its LSN; each copy gets all their frames
    /// in one send (and applies the writes with one store call, `dataplane.rs`
    /// invariant 5), this copy too. They are acknowledged together: a copy took them if
    /// it took every one, else it failed.
    pub(super) async fn fan_out_all(&self, ops: Vec<IoOp>) -> Result<(), StoreError> {
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
            self.hand_over_when_full(bytes, ops.len());
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
                let why = ReplicaError::Unrecorded { why: e.to_string() }.to_string();
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
    pub(super) fn save_bitmaps(
        &self,
        _st: &OwnerState,
        saves: &[SaveBitmap],
    ) -> Result<(), StoreError> {
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
    pub(super) async fn apply_local(&self, op: IoOp) -> Result<(), StoreError> {
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
    pub(super) async fn apply_local_all(&self, mut ops: Vec<IoOp>) -> Result<(), StoreError> {
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
    pub(super) async fn run_batch(&self, batch: Vec<IoOp>, out: &mut Vec<Result<(), StoreError>>) {
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
    pub(super) async fn read(
        self: &Arc<Self>,
        offset: u64,
        length: usize,
    ) -> Result<Bytes, StoreError> {
        self.client_ops.fetch_add(1, Ordering::Relaxed);
        let mut buf = vec![0u8; length];
        match self.local.volume.try_read_at_nowait(&mut buf, offset) {
            Ok(true) => return Ok(Bytes::from(buf)),
            Ok(false) | Err(StoreError::Corrupt { .. }) => {}
            Err(e) => return Err(e),
        }
        self.read_local(offset, length, false).await.map(Bytes::from)
    }

    /// Fences this node's copy, then every other copy (a probe) at this owner's epoch:
    /// from then on no older owner's request applies there, nor its read lease. A copy
    /// that does not answer is marked STALE; returns whether one that was ACTIVE did not.
    pub(super) async fn fence_copies(&self) -> Result<bool, ReplicaError> {
        // This node's own copy first: a request of an older view of this node's, deposed
        // while it waited for its regions' turn, would else still pass its fence and land
        // on the copy that is now the truth, after the other copies were compared with it
        // (found by the simulation). The raise waits for what the old epoch admitted.
        match self.fencing.enter(self.local.id(), self.epoch).await {
            Ok(pass) => drop(pass),
            Err(Refused::Stale(newest)) => {
                return Err(ReplicaError::Deposed { newer: Some(newest) })
            }
            Err(Refused::Io) => {
                let why = "its store refused".to_string();
                return Err(ReplicaError::Persist { what: "this node's copy's epoch fence", why });
            }
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
                Ok(Ok(Ok((reply, _)))) => {
                    let now = self.copies[i].peer.as_ref().map_or(0, |p| p.connections());
                    let mut st = self.state();
                    st.fenced(i, now);
                    // Back from a power loss and not vouched for since: it may lack what
                    // it had not synced, which no bitmap names (flaw 11 of the simulation).
                    if reply.flags & FLAG_SUSPECT != 0 && st.lost_power(i) {
                        tracing::warn!(volume = %self.name, node = self.copies[i].node,
                            "a copy came back from a power loss and no owner vouched for it \
                             since: stale, compared in full");
                    }
                }
                Ok(Ok(Err(CallError::Status { status: Status::StaleEpoch, epoch, .. }))) => {
                    return Err(ReplicaError::Deposed { newer: Some(epoch) });
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
    pub(super) fn active_copies(&self) -> usize {
        self.state().active()
    }

    /// Starts a digest scan of every ACTIVE copy not being scanned already: a block that
    /// rotted on a copy is found and rewritten (and one of this node's copy, by read
    /// repair, as the scan reads it).
    pub(super) fn scrub(&self) {
        let started = self.state().scrub();
        if started > 0 {
            tracing::info!(volume = %self.name, copies = started, "scrub: comparing the copies");
        }
    }

    /// The copies to resync (or scan) now.
    pub(super) fn stale(&self) -> Vec<usize> {
        self.state().wanting()
    }
}

/// A copy's node's failure as the owner logs it (a `NoSpace` said plainly; any other
/// status with the reason that node gave).
pub(super) fn copy_failure(e: &CallError) -> String {
    match e {
        CallError::Status { status: Status::NoSpace, .. } => {
            format!("{e}: its node's disk is full")
        }
        _ => e.to_string(),
    }
}
