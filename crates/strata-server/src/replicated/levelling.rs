//! Levelling copies: a STALE copy's resync (its bitmap's regions, then ACTIVE), digest
//! scans (after a change of owner, a scrub, a rebuild), rebuilds of a copy its node lost,
//! read repair of the owner's copy, the periodic look at the copies, and copies on
//! removed nodes placed again — async tasks in the order the node's resync scheduler
//! (`crate::resync`, `strata_replica::schedule`) gives, each step under the view's
//! exclusive lock, every decision about a copy's state through the core's `OwnerState`.

use super::*;

impl ReplicatedVolume {
    /// Makes regions `regions` of copy `i` equal to the owner's copy: their digests are
    /// compared and the regions that differ copied. The caller holds the exclusive lock.
    pub(super) async fn level(
        self: &Arc<Self>,
        i: usize,
        regions: std::ops::Range<u64>,
    ) -> Result<(), ReplicaError> {
        let peer = self.copies[i].peer.clone().ok_or(ReplicaError::OwnCopy)?;
        let node = self.copies[i].node;
        let id = self.copies[i].id();
        let offset = regions.start * REGION;
        let end = (regions.end * REGION).min(self.size());
        // The owner's copy, read on the blocking pool (with read repair).
        let ours = self.read_local(offset, (end - offset) as usize, true).await.map_err(|e| {
            ReplicaError::CopyFailed {
                node: self.owner.node,
                why: format!("reading the owner's copy: {e}"),
            }
        })?;
        let mut h = request(Kind::Digest, id, self.epoch, 0, offset);
        h.count = ours.len() as u32;
        let theirs = match tokio::time::timeout(T.io_timeout, peer.call(h, &[])).await {
            Ok(Ok((_, digests))) => digests,
            Ok(Err(e)) => return Err(ReplicaError::CopyFailed { node, why: copy_failure(&e) }),
            Err(_) => {
                return Err(ReplicaError::CopyFailed { node, why: "no answer in time".into() })
            }
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
            let why = format!("copy {id} failed during its resync");
            return Err(ReplicaError::CopyFailed { node, why });
        }
        let copied = differ.iter().map(|(_, piece)| piece.len() as u64).sum();
        self.state().levelled(i, regions, copied);
        Ok(())
    }

    /// Copy `i` failed while being levelled: STALE (recorded later if not now), and what
    /// it took since its last flush back in its bitmap.
    pub(super) async fn fail_copy(&self, i: usize, why: ReplicaError) -> ReplicaError {
        self.state().stale(i);
        if let Err(e) = self.lose_unflushed(i) {
            let why = format!("{why}; its bitmap: {e}");
            return ReplicaError::Persist { what: "a failed copy's bitmap", why };
        }
        // Recorded now if it can be (else by the next write, or the next resync).
        let _ = self.record(i, CopyState::Stale, None).await;
        why
    }

    /// Waits for copy `i`'s resync job's turn among this node's jobs, then for a slot on
    /// the copy's node (`resync.rs` invariants 2 and 3). `None`: deposed meanwhile.
    pub(super) async fn resync_turn(&self, i: usize, peer: &Arc<DataPeer>) -> Option<ResyncTurn> {
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
    pub(super) fn slot_request(&self, i: usize, job: u64, take: bool) -> Header {
        let mut h =
            request(Kind::ResyncSlot, self.copies[i].id(), self.epoch, self.owner.node, job);
        h.count = u32::from(take);
        h
    }

    /// After a step of a resync job: its pause (`resync.rs` invariant 4), and its slot
    /// renewed when it is due.
    pub(super) async fn pace(&self, pacer: &mut crate::resync::Pacer, turn: &mut ResyncTurn) {
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
    pub(super) async fn resync(self: &Arc<Self>, i: usize) -> Result<(), ReplicaError> {
        let Some(peer) = self.copies[i].peer.clone() else {
            return Err(ReplicaError::OwnCopy);
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
        // The copying waits its turn among the node's resync jobs, and paces itself.
        let Some(mut turn) = self.resync_turn(i, &peer).await else {
            return Ok(());
        };
        let mut pacer = crate::resync::Pacer::new(self.client_ops.load(Ordering::Relaxed));
        // The core's plan, a step at a time, each under the exclusive lock
        // (`strata_replica::resync`).
        loop {
            if self.deposed() {
                return Ok(());
            }
            let exclusive = self.resync_lock.write().await;
            let step = self.state().resync_step(i, was, SCAN_BATCH);
            match step {
                // It failed (or was marked again) meanwhile: the next round resyncs it.
                ResyncStep::Stop => return Ok(()),
                // A scan of an active copy: nothing else changes.
                ResyncStep::Done => return Ok(()),
                ResyncStep::Scan(regions) => {
                    let to = regions.end;
                    if let Err(e) = self.level(i, regions).await {
                        drop(exclusive);
                        return Err(self.fail_copy(i, e).await);
                    }
                    self.state().scanned(i, to);
                }
                ResyncStep::Run(run) => {
                    if let Err(e) = self.level(i, run.clone()).await {
                        drop(exclusive);
                        return Err(self.fail_copy(i, e).await);
                    }
                    let mut st = self.state();
                    let save = st.cleared(i, run);
                    self.save_bitmaps(&st, &[save]).map_err(|e| ReplicaError::Persist {
                        what: "a copy's bitmap",
                        why: e.to_string(),
                    })?;
                }
                ResyncStep::Flush => {
                    // Everything it lacked is copied and new writes reach it: durable
                    // there, then ACTIVE, under the exclusive lock, so no write fails on
                    // it meanwhile.
                    let h = request(Kind::Flush, id, epoch, 0, 0);
                    let flushed = tokio::time::timeout(T.io_timeout, peer.call(h, &[])).await;
                    if !matches!(flushed, Ok(Ok(_))) {
                        drop(exclusive);
                        let why = format!("copy {id} failed to flush after its resync");
                        let why = ReplicaError::CopyFailed { node: self.copies[i].node, why };
                        return Err(self.fail_copy(i, why).await);
                    }
                    let same = self.state()[i].connection == Some(peer.connections());
                    if !same {
                        drop(exclusive);
                        let why = format!(
                            "copy {id} was reached over a new connection during its resync"
                        );
                        let why = ReplicaError::CopyFailed { node: self.copies[i].node, why };
                        return Err(self.fail_copy(i, why).await);
                    }
                    self.state()[i].unflushed.clear();
                    // Vouched for now, before it counts as ACTIVE, so its node's power-loss
                    // mark comes off (flaw 9 of the simulation: left for the next periodic
                    // look, an owner that lost power meanwhile would find every copy
                    // suspect and might take its own as the truth).
                    if self.state().settled(i, peer.connections()) {
                        let mut h = request(Kind::Probe, id, epoch, 0, 0);
                        h.flags = FLAG_WHOLE;
                        let _ = tokio::time::timeout(T.probe_timeout, peer.call(h, &[])).await;
                    }
                    self.record(i, CopyState::Active, None).await?;
                    drop(exclusive);
                    drop(turn);
                    let _ = std::fs::remove_file(self.bitmaps.join(self.bitmap_file(i)));
                    return Ok(());
                }
            }
            drop(exclusive);
            self.pace(&mut pacer, &mut turn).await;
        }
    }

    /// Copy `i`'s node answers but no longer has the component (it came back with an
    /// empty disk): a new component is made there, recorded in its place (RESYNCING),
    /// and filled by a full digest scan.
    pub(super) async fn rebuild(self: &Arc<Self>, i: usize) -> Result<(), ReplicaError> {
        let peer = self.copies[i].peer.clone().ok_or(ReplicaError::OwnCopy)?;
        let node = self.copies[i].node;
        let h = request(Kind::Create, 0, 0, 0, self.size());
        let made = tokio::time::timeout(T.io_timeout, peer.call(h, self.name.as_bytes())).await;
        let id = match made {
            Ok(Ok((reply, _))) => reply.component,
            Ok(Err(e)) => {
                let why = format!("cannot make a new copy: {}", copy_failure(&e));
                return Err(ReplicaError::CopyFailed { node, why });
            }
            Err(_) => {
                return Err(ReplicaError::CopyFailed { node, why: "no answer in time".into() })
            }
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

    /// Reads `length` bytes of the owner's copy at `offset` on the blocking pool; a block
    /// that fails its checksum is read from another ACTIVE copy instead and rewritten here
    /// (read repair). `locked`: the caller holds the exclusive lock (else the repair takes
    /// it, so no write interleaves).
    pub(super) async fn read_local(
        &self,
        offset: u64,
        length: usize,
        locked: bool,
    ) -> Result<Vec<u8>, StoreError> {
        let volume = self.local.volume.clone();
        let read = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; length];
            volume.read_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::io("read")(std::io::Error::other(e))));
        let damage = match read {
            Err(StoreError::Corrupt { message }) => message,
            other => return other,
        };
        let _exclusive = match locked {
            true => None,
            false => Some(self.resync_lock.write().await),
        };
        let states: Vec<CopyState> = self.state().tracks().iter().map(|t| t.state).collect();
        for (i, c) in self.copies.iter().enumerate() {
            let Some(peer) = c.peer.clone() else { continue };
            if states[i] != CopyState::Active {
                continue;
            }
            let mut h = request(Kind::Read, c.id(), self.epoch, 0, offset);
            h.count = length as u32;
            let read = tokio::time::timeout(T.io_timeout, peer.call(h, &[])).await;
            let Ok(Ok((_, data))) = read else { continue };
            if data.len() != length {
                continue;
            }
            let data = data.to_vec();
            if let Ok(_pass) = self.fencing.enter(self.local.id(), self.epoch).await {
                let volume = self.local.volume.clone();
                let copy = data.clone();
                let wrote = tokio::task::spawn_blocking(move || volume.write_at(&copy, offset));
                if matches!(wrote.await, Ok(Ok(()))) {
                    tracing::warn!(volume = %self.name, offset, len = length, from = c.node,
                        "repaired a damaged read from another copy ({damage})");
                }
            }
            return Ok(data);
        }
        Err(StoreError::Corrupt { message: format!("{damage}; no other copy could be read") })
    }

    /// Probes every ACTIVE copy: one whose node answers but no longer has it (an emptied
    /// disk) is STALE at once (its rebuild follows), even if no write has failed on it.
    pub(super) async fn check_copies(&self) {
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
    pub(super) async fn replace_removed(
        &self,
        members: &[(Candidate, bool)],
    ) -> Result<bool, ReplicaError> {
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
                let why = format!("cannot make a copy: {}", copy_failure(&e));
                return Err(ReplicaError::CopyFailed { node: to.id, why });
            }
            Err(_) => {
                return Err(ReplicaError::CopyFailed {
                    node: to.id,
                    why: "no answer in time".into(),
                })
            }
        };
        tracing::info!(volume = %self.name, from = gone, to = to.id, component = id,
            "a copy's node was removed from the cluster: placing the copy on another node");
        // Recorded first, then handed over: the steward takes the volume again as soon as
        // this view is deposed, and must find the new copy in the record. Until then the
        // new copy misses writes, which its full scan finds. A failure before the record
        // lists it leaves the component an orphan (removed as such).
        self.change_record(|record| {
            let c = record.components.iter_mut().find(|c| c.node == gone && c.id == gone_id);
            let Some(c) = c else {
                return Err(record_error("the volume's copies changed meanwhile"));
            };
            *c = ComponentRecord::new(to.id, id, CopyState::Stale);
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
