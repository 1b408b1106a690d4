//! The owner's state of a replicated volume, and its write path as decisions: one
//! [`Track`] per copy (state, bitmap, unflushed regions, LSNs, lease), a write planned by
//! [`OwnerState::begin`] and its replies folded in by [`OwnerState::finish`], which return
//! what the driver must do (save a bitmap, record a STALE mark, hold acknowledgments
//! until a lease has run out). No I/O, no clock: time comes in as [`Time`] arguments, the
//! copies' answers as [`Reply`] values. The server's owner (`strata-server`'s
//! `replicated`) executes the commands; the simulation runs the same code.
//!
//! A write's course, driven by its executor:
//! 1. `begin(count, regions, flush)`: LSNs given out, the regions put in every STALE
//!    copy's bitmap ([`SaveBitmap`] commands: on file *before* anything is sent), and the
//!    copies to send to.
//! 2. The executor sends to those copies and applies the owner's own copy, then calls
//!    `finish` with every answer: a copy that failed (or answered over a new
//!    connection: its node may have restarted after losing what it had not synced) is
//!    STALE, its unflushed regions and every region in flight in its bitmap (more
//!    [`SaveBitmap`]s); the copies whose STALE mark is not in the volume's record yet are
//!    listed to be recorded.
//! 3. The executor records each (by CAS) and says so (`recorded`), then `conclude`
//!    says whether the write may be acknowledged, and from when (a read lease of a copy
//!    that stopped being ACTIVE must have run out first).
//!
//! Invariants ([`OwnerState::validate`] checks them; numbers as in
//! `docs/design/replication.md`, "The owner's state"):
//! - O1. Exactly one track is the owner's own copy; it is ACTIVE, owes no scan and has an
//!   empty bitmap (it is the truth). Checked in release builds too before a write is
//!   planned: an owner serving without its own copy would lose data.
//! - O2. A copy's acknowledged LSN never goes back, and no copy has acknowledged an LSN
//!   not given out yet.
//! - O3. A STALE mark not yet recorded is on a copy that is not ACTIVE.
//! - O4. Only an ACTIVE copy holds a read lease.
//! - O5. Bitmaps, scans and regions in flight lie within the volume.
//! - O6. A STALE copy is sent nothing; the regions of a write are in every STALE copy's
//!   bitmap before the write is sent (the commands of `begin` come first).

use crate::error::ReplicaError;
use crate::mutation::{reopened, Flaw};
pub use crate::record::CopyState;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// A moment on the driver's monotonic clock (time since an origin it chose).
pub type Time = Duration;

/// LSNs of the owner at `epoch` start above `epoch << LSN_EPOCH_SHIFT`, so they grow
/// across owners too.
pub const LSN_EPOCH_SHIFT: u32 = 40;

/// One copy as the owner sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Track {
    /// The copy's node.
    pub node: u64,
    /// Its component id there (changes when it is rebuilt on an emptied node).
    pub id: u64,
    /// The owner's own copy.
    pub local: bool,
    /// Its state.
    pub state: CopyState,
    /// The regions it lacks (its synchronization bitmap).
    pub dirty: BTreeSet<u64>,
    /// Regions written since its last successful flush (a copy that fails may have lost
    /// them with its page cache, so they join its bitmap), each with the completion count
    /// when its write to that copy completed: a flush clears only the regions whose writes
    /// had completed when it was sent.
    pub unflushed: BTreeMap<u64, u64>,
    /// Its node's connection count when it was last known whole; a reply over a later
    /// connection fails the copy.
    pub connection: Option<u64>,
    /// STALE here, the mark not in the record yet.
    pub unrecorded: bool,
    /// The next region of a digest scan it owes, if one is due.
    pub scan: Option<u64>,
    /// Bytes copied to it by resyncs and scans.
    pub resynced: u64,
    /// The highest LSN it acknowledged.
    pub acked: u64,
    /// While not ACTIVE: the LSN of the first write it missed.
    pub missed_from: Option<u64>,
    /// Until when its node may serve reads from it (invariant 10).
    pub leased_until: Option<Time>,
}

impl Track {
    /// A copy as a new owner finds it in the volume's record.
    pub fn new(node: u64, id: u64, local: bool, state: CopyState) -> Track {
        Track {
            node,
            id,
            local,
            state,
            dirty: BTreeSet::new(),
            unflushed: BTreeMap::new(),
            connection: None,
            unrecorded: false,
            scan: None,
            resynced: 0,
            acked: 0,
            missed_from: None,
            leased_until: None,
        }
    }
}

/// What a new owner finds of a copy, in the volume's record and its own files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// The copy's node.
    pub node: u64,
    /// Its component id there.
    pub id: u64,
    /// The new owner's own copy (which must be ACTIVE in the record).
    pub local: bool,
    /// Its state in the record.
    pub state: Option<CopyState>,
    /// The LSN of the first write it missed, as recorded.
    pub stale_lsn: Option<u64>,
    /// Its bitmap as this node's previous owner view kept it, if that file is trusted
    /// (kept at the epoch just before, in this boot).
    pub kept: Option<BTreeSet<u64>>,
    /// The last owner vouched for it at a clean hand-over (level and synced).
    pub vouched: bool,
    /// Its bitmap as the last owner handed it over cleanly.
    pub handed: Option<BTreeSet<u64>>,
}

impl Track {
    /// Copy `f` as a new owner starts with it (invariant 5): its own copy is the truth;
    /// another ACTIVE copy owes a digest scan unless the last owner vouched for it; a
    /// STALE one keeps the bitmap kept or handed over, else owes a scan in full; a
    /// RESYNCING one (its resync was cut short) is STALE and owes a scan in full.
    pub fn found(f: Found) -> Track {
        let state = f.state.unwrap_or(CopyState::Stale);
        let mut t = Track::new(f.node, f.id, f.local, CopyState::Stale);
        t.missed_from = f.stale_lsn.filter(|_| state != CopyState::Active);
        if f.local {
            t.state = CopyState::Active;
            return t;
        }
        match (state, f.kept) {
            (CopyState::Stale, Some(regions)) => t.dirty = regions,
            (CopyState::Active, _) => {
                t.state = CopyState::Active;
                t.scan = (!f.vouched).then_some(0);
            }
            (CopyState::Stale, None) => match f.handed {
                Some(regions) => t.dirty = regions,
                None => t.scan = Some(0),
            },
            (CopyState::Resyncing, _) => t.scan = Some(0),
        }
        t
    }
}

/// Save copy `copy`'s bitmap (replacing the file), before going on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveBitmap {
    /// The copy (an index into the tracks).
    pub copy: usize,
    /// Its bitmap.
    pub regions: BTreeSet<u64>,
    /// The copy owes a digest scan the bitmap does not cover: no later owner may trust
    /// the file alone.
    pub owes_scan: bool,
}

/// A write planned by [`OwnerState::begin`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Write {
    /// The LSN of its first request.
    pub first: u64,
    /// The LSN of its last request.
    pub last: u64,
    /// The regions it covers.
    pub regions: Vec<u64>,
    /// The copies (not the owner's own) to send it to.
    pub targets: Vec<usize>,
    /// It is a flush.
    pub flush: bool,
    /// For a flush: the writes completed before it was sent (it covers those).
    flushed_after: u64,
}

/// A copy's answer to a write, as the executor saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// It took every request, over its node's connection number `connection`.
    Took {
        /// The connection count of the copy's node when it answered.
        connection: u64,
    },
    /// It has seen a newer owner.
    StaleEpoch {
        /// The epoch it has seen.
        newest: u64,
    },
    /// Its node has no room.
    NoSpace {
        /// What it said.
        why: String,
    },
    /// Anything else: an error, a timeout, a lost connection.
    Failed {
        /// What went wrong.
        why: String,
    },
}

/// What [`OwnerState::finish`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finished {
    /// A copy has seen a newer owner: this owner is deposed, nothing more is done.
    Deposed {
        /// The epoch it has seen.
        newest: u64,
    },
    /// The replies are folded in.
    Folded {
        /// Bitmaps to save, before anything else (copies that failed).
        saves: Vec<SaveBitmap>,
        /// Copies that failed, with why (for the log).
        failed: Vec<(usize, String)>,
        /// A copy's node was full: the write gets ENOSPC once the marks are recorded.
        full: bool,
        /// Copies whose STALE mark must be recorded before any reply.
        record: Vec<usize>,
    },
}

/// What [`OwnerState::release`] found: what a clean hand-over may vouch for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Release {
    /// The copies ACTIVE and owing no scan: to be synced, then vouched for.
    pub level: Vec<usize>,
    /// The STALE copies owing no scan, with their bitmaps.
    pub stale: Vec<(usize, BTreeSet<u64>)>,
    /// A copy's failure is not recorded yet (no hand-over then).
    pub unrecorded: bool,
    /// Every read lease granted has run out by then.
    pub leases_until: Option<Time>,
}

/// A broken invariant of the owner's state (module header).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("owner invariant {number} broken: {what}")]
pub struct Violation {
    /// Its number (`O1`…).
    pub number: &'static str,
    /// What is wrong.
    pub what: String,
}

/// The owner's state of one replicated volume at one epoch.
#[derive(Clone, Debug)]
pub struct OwnerState {
    epoch: u64,
    /// The last LSN given out.
    lsn: u64,
    min_replicas: usize,
    /// Regions in the volume (grows with it).
    regions: u64,
    tracks: Vec<Track>,
    /// Writes completed on copies so far (see `Track::unflushed`).
    completions: u64,
    /// No write is acknowledged before this: the read lease of a copy that stopped
    /// being ACTIVE has run out by then.
    revoked_until: Option<Time>,
    /// Regions of writes planned and not yet finished, with their count.
    in_flight: BTreeMap<u64, u32>,
    /// The acknowledged LSNs last seen by `validate` (O2).
    acked_seen: Vec<u64>,
}

impl OwnerState {
    /// The state of a new owner at `epoch` of a volume of `regions` regions.
    ///
    /// # Panics
    /// If `tracks` does not hold exactly one local copy.
    pub fn new(epoch: u64, min_replicas: usize, regions: u64, tracks: Vec<Track>) -> OwnerState {
        assert_eq!(tracks.iter().filter(|t| t.local).count(), 1, "the owner holds one copy");
        let acked_seen = tracks.iter().map(|t| t.acked).collect();
        OwnerState {
            epoch,
            lsn: epoch << LSN_EPOCH_SHIFT,
            min_replicas,
            regions,
            tracks,
            completions: 0,
            revoked_until: None,
            in_flight: BTreeMap::new(),
            acked_seen,
        }
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The last LSN given out.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// Every copy.
    pub fn tracks(&self) -> &[Track] {
        &self.tracks
    }

    /// Copy `i`.
    pub fn track(&self, i: usize) -> &Track {
        &self.tracks[i]
    }

    /// Copy `i`, to change (resync's steps; `validate` checks the result).
    pub fn track_mut(&mut self, i: usize) -> &mut Track {
        &mut self.tracks[i]
    }

    /// The owner's own copy.
    pub fn local(&self) -> usize {
        self.tracks.iter().position(|t| t.local).expect("the owner holds a copy")
    }

    /// Regions in the volume.
    pub fn regions(&self) -> u64 {
        self.regions
    }

    /// The next LSN, for one request outside a planned write (a resync's copy).
    pub fn next_lsn(&mut self) -> u64 {
        self.lsn += 1;
        self.lsn
    }

    /// Regions `regions` of copy `i` were compared with the owner's, `copied` bytes of
    /// them copied. Every region compared counts as unflushed there, not only those
    /// copied: one found equal may be equal only in the copy's page cache (writes it took
    /// while RESYNCING), so it is lost too if the copy fails before its next flush (flaw 7
    /// of the simulation).
    pub fn levelled(&mut self, i: usize, regions: std::ops::Range<u64>, copied: u64) {
        self.tracks[i].resynced += copied;
        for region in regions {
            self.completions += 1;
            let done = self.completions;
            self.tracks[i].unflushed.insert(region, done);
        }
    }

    /// [`Self::levelled`], told which of the regions compared differed and were copied
    /// (`copying`): the same unless the simulation re-opens flaw 7, when only those
    /// count as unflushed.
    pub fn levelled_copying(
        &mut self,
        i: usize,
        regions: std::ops::Range<u64>,
        copying: &[u64],
        copied: u64,
    ) {
        if !reopened(Flaw::LevelKeepsEqual) {
            return self.levelled(i, regions, copied);
        }
        self.tracks[i].resynced += copied;
        for region in copying.iter().filter(|r| regions.contains(r)) {
            self.completions += 1;
            let done = self.completions;
            self.tracks[i].unflushed.insert(*region, done);
        }
    }

    /// The volume grew to `regions` regions.
    pub fn grow(&mut self, regions: u64) {
        self.regions = self.regions.max(regions);
    }

    /// ACTIVE copies.
    pub fn active(&self) -> usize {
        self.tracks.iter().filter(|t| t.state == CopyState::Active).count()
    }

    /// Plans a write (or flush, or trim) of `count` requests covering `regions` (each
    /// below the volume's region count): its LSNs, the bitmaps to save before anything
    /// is sent (O6), and the copies to send it to.
    ///
    /// # Panics
    /// In every build, if the owner's own copy is not ACTIVE (O1): serving then would
    /// acknowledge writes no copy that is the truth holds.
    pub fn begin(
        &mut self,
        count: usize,
        regions: &[u64],
        flush: bool,
    ) -> (Write, Vec<SaveBitmap>) {
        let local = self.local();
        assert!(
            self.tracks[local].state == CopyState::Active,
            "the owner serves a write without its own copy ACTIVE"
        );
        let first = self.lsn + 1;
        self.lsn += count.max(1) as u64;
        let mut saves = Vec::new();
        for (i, t) in self.tracks.iter_mut().enumerate() {
            if t.state != CopyState::Stale || regions.is_empty() {
                continue;
            }
            let before = t.dirty.len();
            t.dirty.extend(regions.iter().copied());
            if t.dirty.len() != before {
                saves.push(SaveBitmap {
                    copy: i,
                    regions: t.dirty.clone(),
                    owes_scan: owes_scan(t),
                });
            }
        }
        for r in regions {
            *self.in_flight.entry(*r).or_default() += 1;
        }
        let targets = (0..self.tracks.len())
            .filter(|&i| !self.tracks[i].local && self.tracks[i].state != CopyState::Stale)
            .collect();
        let write = Write {
            first,
            last: self.lsn,
            regions: regions.to_vec(),
            targets,
            flush,
            flushed_after: self.completions,
        };
        (write, saves)
    }

    /// Regions with writes planned and not yet finished.
    pub fn in_flight_regions(&self) -> usize {
        self.in_flight.len()
    }

    /// Ends a planned write that was not sent (a bitmap could not be saved): its
    /// regions are no longer in flight.
    pub fn abandon(&mut self, write: &Write) {
        self.leave(&write.regions);
    }

    fn leave(&mut self, regions: &[u64]) {
        for r in regions {
            if let Some(n) = self.in_flight.get_mut(r) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight.remove(r);
                }
            }
        }
    }

    /// Folds in the copies' answers to `write` (one per target) and whether the owner's
    /// own copy took it.
    pub fn finish(&mut self, write: &Write, replies: Vec<(usize, Reply)>, here: bool) -> Finished {
        if let Some(newest) = replies.iter().find_map(|(_, r)| match r {
            Reply::StaleEpoch { newest } => Some(*newest),
            _ => None,
        }) {
            self.leave(&write.regions);
            return Finished::Deposed { newest };
        }
        let mut failed = Vec::new();
        let mut took = Vec::new();
        let mut full = false;
        for (i, reply) in replies {
            match reply {
                Reply::Took { connection } => {
                    // Over a new connection: its node may have restarted after a power
                    // loss that took what it had not synced.
                    let seen = self.tracks[i].connection.replace(connection);
                    let new = seen.is_some_and(|seen| seen != connection);
                    if new && !reopened(Flaw::PowerLoss) {
                        failed.push((
                            i,
                            "answered over a new connection: its node may have restarted".into(),
                        ));
                    } else {
                        took.push(i);
                    }
                }
                Reply::NoSpace { why } => {
                    full = true;
                    failed.push((i, format!("{why}: its node's disk is full")));
                }
                Reply::Failed { why } => failed.push((i, why)),
                Reply::StaleEpoch { .. } => unreachable!("handled above"),
            }
        }
        if here {
            let me = self.local();
            self.ack(me, write.last);
        }
        for &i in &took {
            self.ack(i, write.last);
            if write.flush {
                // Not a write that completed after the flush was sent: the copy may have
                // applied it after it synced.
                if reopened(Flaw::FlushClearsOlder) {
                    self.tracks[i].unflushed.clear();
                } else {
                    self.tracks[i].unflushed.retain(|_, done| *done > write.flushed_after);
                }
            }
            for region in &write.regions {
                self.completions += 1;
                let done = self.completions;
                self.tracks[i].unflushed.insert(*region, done);
            }
        }
        // Every write in flight now may be missing on a failed copy too (each would join
        // the bitmap when it fails in turn, unless this owner dies first).
        let flying: Vec<u64> = if failed.is_empty() || reopened(Flaw::InFlightToBitmap) {
            Vec::new()
        } else {
            self.in_flight.keys().copied().collect()
        };
        let mut saves = Vec::new();
        for (i, _) in &failed {
            self.stale_from(*i, write.first);
            let t = &mut self.tracks[*i];
            let lost = std::mem::take(&mut t.unflushed);
            t.dirty.extend(lost.into_keys());
            t.dirty.extend(flying.iter().copied());
            t.dirty.extend(write.regions.iter().copied());
            saves.push(SaveBitmap { copy: *i, regions: t.dirty.clone(), owes_scan: owes_scan(t) });
        }
        self.leave(&write.regions);
        let record = (0..self.tracks.len()).filter(|&i| self.tracks[i].unrecorded).collect();
        Finished::Folded { saves, failed, full, record }
    }

    fn ack(&mut self, i: usize, lsn: u64) {
        let t = &mut self.tracks[i];
        t.acked = t.acked.max(lsn);
    }

    /// Whether a write whose marks are all recorded may be acknowledged: `Ok(None)` at
    /// once, `Ok(Some(t))` not before `t` (a revoked read lease), or why not.
    pub fn conclude(&self, full: bool, now: Time) -> Result<Option<Time>, ReplicaError> {
        if full {
            return Err(ReplicaError::NoSpace);
        }
        let active = self.active();
        if active < self.min_replicas {
            return Err(ReplicaError::TooFewActive { active, needed: self.min_replicas });
        }
        Ok(self.revoked_until.filter(|until| *until > now))
    }

    /// Copy `i` misses writes from now on. Its read lease, if it has one, holds back the
    /// acknowledgment of every write until it ends.
    pub fn stale(&mut self, i: usize) {
        self.stale_from(i, self.lsn + 1);
    }

    /// [`Self::stale`], the first write it missed being `lsn`.
    fn stale_from(&mut self, i: usize, lsn: u64) {
        let t = &mut self.tracks[i];
        t.state = CopyState::Stale;
        t.unrecorded = true;
        t.missed_from.get_or_insert(lsn);
        if let Some(until) = t.leased_until.take() {
            self.revoked_until = self.revoked_until.max(Some(until));
        }
    }

    /// Copy `i` failed while it was being brought level: the regions it took since its
    /// last flush may be lost with its page cache, so they go back into its bitmap.
    pub fn lose_unflushed(&mut self, i: usize) -> SaveBitmap {
        let t = &mut self.tracks[i];
        let lost = std::mem::take(&mut t.unflushed);
        t.dirty.extend(lost.into_keys());
        SaveBitmap { copy: i, regions: t.dirty.clone(), owes_scan: owes_scan(t) }
    }

    /// Copy `i`'s bitmap as it is now, to save.
    pub fn bitmap(&self, i: usize) -> SaveBitmap {
        let t = &self.tracks[i];
        SaveBitmap { copy: i, regions: t.dirty.clone(), owes_scan: owes_scan(t) }
    }

    /// Regions `run` of copy `i` were brought level by a resync step: they leave its
    /// bitmap, which is returned to save.
    pub fn cleared(&mut self, i: usize, run: std::ops::Range<u64>) -> SaveBitmap {
        for region in run {
            self.tracks[i].dirty.remove(&region);
        }
        self.bitmap(i)
    }

    /// Copy `i`'s state `to` (and new id) is in the volume's record now.
    pub fn recorded(&mut self, i: usize, to: CopyState, new_id: Option<u64>) {
        let lsn = self.lsn;
        let t = &mut self.tracks[i];
        if let Some(id) = new_id {
            t.id = id;
        }
        t.state = to;
        if to == CopyState::Active {
            // Level with the owner's copy (the caller holds every write back).
            t.missed_from = None;
            t.acked = t.acked.max(lsn);
            t.unrecorded = false;
        } else if to == CopyState::Stale || t.unrecorded {
            // The record no longer says ACTIVE.
            t.unrecorded = false;
        }
    }

    /// The STALE LSN to record with copy `i`'s state `to`.
    pub fn stale_lsn(&self, i: usize, to: CopyState) -> Option<u64> {
        match to {
            CopyState::Active => None,
            _ => self.tracks[i].missed_from,
        }
    }

    /// Whether copy `i` is whole as far as this owner knows: ACTIVE, owing no scan, its
    /// last answer over the connection its node has now (`connection`).
    pub fn whole(&self, i: usize, connection: u64) -> bool {
        let t = &self.tracks[i];
        t.state == CopyState::Active && t.scan.is_none() && t.connection == Some(connection)
    }

    /// Whether copy `i`, at the end of its resync, may be vouched for (its power-loss
    /// mark taken off, the WHOLE flag) before it is recorded ACTIVE: RESYNCING, nothing
    /// left in its bitmap or scan, flushed (the caller's), and its last answer over the
    /// connection its resync started on (`connection`, its node's now). Left for the
    /// next periodic look, an owner that lost power meanwhile would find every copy
    /// suspect and might take its own, lacking what it had not synced, as the truth
    /// (flaw 9 of the simulation).
    pub fn settled(&self, i: usize, connection: u64) -> bool {
        let t = &self.tracks[i];
        !reopened(Flaw::VouchAfterResync)
            && t.state == CopyState::Resyncing
            && t.dirty.is_empty()
            && t.scan.is_none()
            && t.connection == Some(connection)
    }

    /// Grants copy `i` a read lease until `until` if it is whole (invariant 10).
    pub fn grant(&mut self, i: usize, connection: u64, until: Time) -> bool {
        if !self.whole(i, connection) {
            return false;
        }
        let t = &mut self.tracks[i];
        t.leased_until = t.leased_until.max(Some(until));
        true
    }

    /// No write is acknowledged before `until` (a take that may have cut a lease short).
    pub fn hold_acks_until(&mut self, until: Time) {
        self.revoked_until = self.revoked_until.max(Some(until));
    }

    /// Copy `i`'s node answered a probe over connection `connection` (a new owner's
    /// fence, or the periodic look). Returns the bitmap to save if that was a new
    /// connection of an ACTIVE copy: its node may have restarted having lost what it had
    /// not synced, so it is STALE now with its unflushed regions in its bitmap.
    pub fn answered(&mut self, i: usize, connection: u64) -> Option<SaveBitmap> {
        let seen = self.tracks[i].connection;
        if seen.is_none_or(|seen| seen == connection) || self.tracks[i].state != CopyState::Active {
            return None;
        }
        if reopened(Flaw::PowerLoss) {
            self.tracks[i].connection = Some(connection);
            return None;
        }
        self.stale(i);
        Some(self.lose_unflushed(i))
    }

    /// Copy `i`'s node answered a new owner's fencing probe: its connection is the
    /// baseline from now on.
    pub fn fenced(&mut self, i: usize, connection: u64) {
        self.tracks[i].connection = Some(connection);
    }

    /// Copy `i` answered a new owner's fencing probe with its power-loss mark on (its
    /// node lost power and no owner has vouched for it since): it may lack writes it had
    /// not synced, which no bitmap names, so an ACTIVE one is STALE now and owes a digest
    /// scan in full. Kept ACTIVE, writes would count it as a holder, and if this owner
    /// lost power too every copy would be suspect (flaw 11 of the simulation). Returns
    /// whether it had been ACTIVE.
    pub fn lost_power(&mut self, i: usize) -> bool {
        if reopened(Flaw::SuspectStaysActive) || self.tracks[i].state != CopyState::Active {
            return false;
        }
        self.stale(i);
        self.tracks[i].scan = Some(0);
        true
    }

    /// Copy `i` did not answer a new owner's fencing probe: it is STALE. Returns whether
    /// it had been ACTIVE (then its lease, if an old owner granted one, may still run).
    pub fn silent(&mut self, i: usize) -> bool {
        let was = self.tracks[i].state;
        if was != CopyState::Stale {
            self.stale(i);
        }
        was == CopyState::Active
    }

    /// The volume was just created: every copy is empty, so equal; none owes a scan.
    pub fn created(&mut self) {
        for t in self.tracks.iter_mut() {
            t.scan = None;
        }
    }

    /// Starts a digest scan of every other ACTIVE copy not being scanned already (a
    /// scrub). Returns how many started.
    pub fn scrub(&mut self) -> usize {
        let mut started = 0;
        for t in self.tracks.iter_mut() {
            if !t.local && t.state == CopyState::Active && t.scan.is_none() {
                t.scan = Some(0);
                started += 1;
            }
        }
        started
    }

    /// The copies the volume may be handed to when the owner's own store is full: ACTIVE
    /// and owing no scan (the truth may move there), in the record's order.
    pub fn successors(&self) -> Vec<usize> {
        (0..self.tracks.len())
            .filter(|&i| !self.tracks[i].local)
            .filter(|&i| self.tracks[i].state == CopyState::Active && self.tracks[i].scan.is_none())
            .collect()
    }

    /// The copies that need a resync or a scan now.
    pub fn wanting(&self) -> Vec<usize> {
        (0..self.tracks.len())
            .filter(|&i| !self.tracks[i].local)
            .filter(|&i| self.tracks[i].state != CopyState::Active || self.tracks[i].scan.is_some())
            .collect()
    }

    /// Copy `i`'s resync priority: the volume's ACTIVE copies, then the regions left.
    pub fn priority(&self, i: usize) -> (usize, u64) {
        let t = &self.tracks[i];
        let scan_left = t.scan.map_or(0, |from| self.regions.saturating_sub(from));
        (self.active(), t.dirty.len() as u64 + scan_left)
    }

    /// What a clean hand-over may vouch for (no write in flight: the caller holds them
    /// all back).
    pub fn release(&self) -> Release {
        let level = (0..self.tracks.len())
            .filter(|&i| self.tracks[i].state == CopyState::Active && self.tracks[i].scan.is_none())
            .collect();
        let stale = (0..self.tracks.len())
            .filter(|&i| self.tracks[i].state == CopyState::Stale && self.tracks[i].scan.is_none())
            .map(|i| (i, self.tracks[i].dirty.clone()))
            .collect();
        let leases_until =
            self.tracks.iter().map(|t| t.leased_until).chain([self.revoked_until]).max().flatten();
        Release { level, stale, unrecorded: self.tracks.iter().any(|t| t.unrecorded), leases_until }
    }

    /// Checks the invariants in the module's header (O2 against the last call).
    pub fn validate(&mut self) -> Result<(), Violation> {
        let v = |number, what: String| Err(Violation { number, what });
        let locals: Vec<usize> = (0..self.tracks.len()).filter(|&i| self.tracks[i].local).collect();
        let [me] = locals[..] else {
            return v("O1", format!("{} local copies", locals.len()));
        };
        let t = &self.tracks[me];
        if t.state != CopyState::Active || t.scan.is_some() || !t.dirty.is_empty() {
            return v("O1", format!("the owner's copy is {:?}", t));
        }
        for (i, t) in self.tracks.iter().enumerate() {
            if t.acked > self.lsn {
                return v("O2", format!("copy {i} acknowledged {} > lsn {}", t.acked, self.lsn));
            }
            if self.acked_seen.get(i).is_some_and(|seen| t.acked < *seen) {
                return v("O2", format!("copy {i}'s acknowledged LSN went back to {}", t.acked));
            }
            if t.unrecorded && t.state == CopyState::Active {
                return v("O3", format!("copy {i} is ACTIVE with an unrecorded STALE mark"));
            }
            if t.leased_until.is_some() && t.state != CopyState::Active {
                return v("O4", format!("copy {i} holds a lease while {:?}", t.state));
            }
            if let Some(r) = t.dirty.iter().next_back().filter(|r| **r >= self.regions) {
                return v("O5", format!("copy {i}'s bitmap marks region {r} of {}", self.regions));
            }
            if t.scan.is_some_and(|s| s > self.regions) {
                return v("O5", format!("copy {i}'s scan is past the volume's end"));
            }
        }
        if let Some(r) = self.in_flight.keys().next_back().filter(|r| **r >= self.regions) {
            return v("O5", format!("region {r} in flight of {}", self.regions));
        }
        self.acked_seen = self.tracks.iter().map(|t| t.acked).collect();
        Ok(())
    }
}

/// Whether a bitmap saved for `t` must say it owes a scan the bitmap does not cover
/// (then no later owner trusts the file alone).
fn owes_scan(t: &Track) -> bool {
    t.scan.is_some() && !reopened(Flaw::BitmapKeepsScan)
}

impl std::ops::Index<usize> for OwnerState {
    type Output = Track;
    fn index(&self, i: usize) -> &Track {
        &self.tracks[i]
    }
}

impl std::ops::IndexMut<usize> for OwnerState {
    fn index_mut(&mut self, i: usize) -> &mut Track {
        &mut self.tracks[i]
    }
}

#[cfg(test)]
mod tests;
