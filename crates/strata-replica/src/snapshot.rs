//! Snapshots of a replicated volume: the owner's decisions as pure functions of the
//! record and the owner's state (`docs/design/replicated-snapshots.md`, S1–S7). The
//! server and the simulation execute them: a barrier's requests to the copies, the
//! record's compare-and-swaps, a pending copy's catch-up from the owner's snapshot.
//!
//! Rules, as the design numbers them:
//! - S1. A snapshot is cut behind a barrier: no write in flight, none starts, until every
//!   copy that is not STALE answered its `Snapshot` request ([`OwnerState::barrier`]),
//!   its replies folded like a write's (a copy that failed is STALE, so pending).
//! - S2. A `creating` snapshot an owner finds at its take is undone on every copy, then
//!   dropped from the record ([`undo_on_take`]).
//! - S3. One barrier at a time per volume; names unique ([`begin`]).
//! - S4/S5. A pending copy catches up while STALE, oldest snapshot first, levelled from
//!   the owner's snapshot over its bitmap (or a full compare if it owes a scan), then
//!   takes it ([`catch_up_step`]); it never takes writes before it has every snapshot.
//! - S6. Keys are never reused; a copy removes what the record does not list as served
//!   ([`to_remove`]).
//! - S7. A snapshot's reads come from a copy that holds it ([`readable_on`]).
//! - S8. Every copy the record has ACTIVE holds every `ready` snapshot ([`unheld`]): a
//!   copy becomes ACTIVE only after its catch-up, and one that misses a barrier is
//!   STALE (recorded) before the snapshot is `ready`.

use crate::error::ReplicaError;
use crate::owner::{CopyState, OwnerState, SaveBitmap, Write};
use crate::record::{CopyRef, SnapshotRecord, SnapshotState, VolumeRecord};
use std::collections::BTreeSet;
use std::ops::Range;

/// Bits of a snapshot key below the epoch: keys made at one epoch (by one owner).
pub const KEY_COUNTER_BITS: u32 = 24;

/// The key of the `counter`th snapshot an owner at `epoch` makes: the same on every
/// copy's node (each maps it to a store snapshot of its copy), never made twice (a later
/// owner has a higher epoch) (S6).
pub fn key(epoch: u64, counter: u64) -> u64 {
    assert!(counter < 1 << KEY_COUNTER_BITS, "too many snapshots at one epoch");
    epoch << KEY_COUNTER_BITS | counter
}

/// Why a snapshot command is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The name is taken.
    #[error("{volume} already has a snapshot named {name}")]
    Exists {
        /// The volume.
        volume: String,
        /// The snapshot.
        name: String,
    },
    /// Another snapshot's barrier is under way (S3).
    #[error("snapshot {name} of {volume} is being made; try again when it is done")]
    Busy {
        /// The volume.
        volume: String,
        /// The snapshot being made.
        name: String,
    },
    /// No such snapshot (or one being made or deleted, which is not served).
    #[error("{volume} has no snapshot named {name}")]
    NotFound {
        /// The volume.
        volume: String,
        /// The snapshot.
        name: String,
    },
}

/// A volume's snapshots as its record lists them, oldest first (the functions below
/// take and return the list, so that the simulation's smaller record uses them too).
pub type Snapshots = Vec<SnapshotRecord>;

/// The snapshots of volume `volume` (of `size_bytes`) with `name` added as `creating` at
/// `epoch` under `key` (the barrier's first step, S2's mark), or why not (S3).
pub fn begin(
    snapshots: &[SnapshotRecord],
    volume: &str,
    size_bytes: u64,
    name: &str,
    key: u64,
    epoch: u64,
    created_unix: u64,
) -> Result<Snapshots, SnapshotError> {
    if let Some(s) = snapshots.iter().find(|s| s.state == Some(SnapshotState::Creating)) {
        return Err(SnapshotError::Busy { volume: volume.into(), name: s.snapshot.clone() });
    }
    if snapshots.iter().any(|s| s.snapshot == name) {
        return Err(SnapshotError::Exists { volume: volume.into(), name: name.into() });
    }
    let mut next = snapshots.to_vec();
    next.push(SnapshotRecord {
        snapshot: name.to_owned(),
        size_bytes,
        created_unix,
        id: key,
        state: Some(SnapshotState::Creating),
        epoch,
        copies: Vec::new(),
    });
    Ok(next)
}

/// The snapshots with `key` made (`ready`), held by `copies` (the barrier's last step).
/// `None` if they no longer have it `creating` (another owner undid it).
pub fn made(snapshots: &[SnapshotRecord], key: u64, copies: &[CopyRef]) -> Option<Snapshots> {
    let mut next = snapshots.to_vec();
    let s = next.iter_mut().find(|s| s.id == key)?;
    if s.state != Some(SnapshotState::Creating) {
        return None;
    }
    s.state = Some(SnapshotState::Ready);
    s.copies = copies.to_vec();
    Some(next)
}

/// What a new owner does about a snapshot left `creating` (S2): remove it from every
/// copy (idempotent; a copy without it answers as removed), then drop it from the record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Undo {
    /// The snapshot's key.
    pub key: u64,
    /// Every copy of the volume (any may have taken it before its maker died).
    pub copies: Vec<CopyRef>,
}

/// The snapshots an owner that just took the volume must undo (S2): those left
/// `creating`, and those an undo marked `deleting` without holders and did not finish;
/// `copies` are every copy of the volume ([`copies_of`]).
pub fn undo_on_take(snapshots: &[SnapshotRecord], copies: &[CopyRef]) -> Vec<Undo> {
    let left = |s: &&SnapshotRecord| match s.state {
        Some(SnapshotState::Creating) => true,
        Some(SnapshotState::Deleting) => s.copies.is_empty(),
        _ => false,
    };
    snapshots.iter().filter(left).map(|s| Undo { key: s.id, copies: copies.to_vec() }).collect()
}

/// An undo's first step: the snapshots with `key` turned from `creating` to `deleting`
/// (then no late `made` of its maker can make it `ready`: that compares the record's
/// version), or `None` if it is not `creating` (made after all: not undone; or gone).
/// Then the copies remove it, then [`dropped`].
pub fn abandoned(snapshots: &[SnapshotRecord], key: u64) -> Option<Snapshots> {
    let mut next = snapshots.to_vec();
    let s = next.iter_mut().find(|s| s.id == key)?;
    match s.state {
        Some(SnapshotState::Creating) => {
            s.state = Some(SnapshotState::Deleting);
            s.copies.clear();
            Some(next)
        }
        Some(SnapshotState::Deleting) if s.copies.is_empty() => Some(next),
        _ => None,
    }
}

/// Every copy of a volume in its record.
pub fn copies_of(record: &VolumeRecord) -> Vec<CopyRef> {
    record.components.iter().map(|c| CopyRef { node: c.node, id: c.id }).collect()
}

/// The snapshots without `key` (an undo or a delete finished).
pub fn dropped(snapshots: &[SnapshotRecord], key: u64) -> Snapshots {
    snapshots.iter().filter(|s| s.id != key).cloned().collect()
}

/// The snapshots copy `copy` lacks, oldest first: those `ready` it is not listed in.
pub fn pending(snapshots: &[SnapshotRecord], copy: CopyRef) -> Vec<&SnapshotRecord> {
    snapshots
        .iter()
        .filter(|s| s.state == Some(SnapshotState::Ready) && !s.held_by(copy.node, copy.id))
        .collect()
}

/// The snapshots with copy `copy` added to `key`'s holders (a catch-up took it), or
/// `None` if it is no longer `ready` (deleted meanwhile: the copy removes it).
pub fn caught_up(snapshots: &[SnapshotRecord], key: u64, copy: CopyRef) -> Option<Snapshots> {
    let mut next = snapshots.to_vec();
    let s = next.iter_mut().find(|s| s.id == key)?;
    if s.state != Some(SnapshotState::Ready) {
        return None;
    }
    if !s.held_by(copy.node, copy.id) {
        s.copies.push(copy);
    }
    Some(next)
}

/// The snapshot keys a copy holds that it must remove (S6): those the list does not
/// have, or has as `deleting`. A `creating` one is left to its barrier (or its undo).
pub fn to_remove(snapshots: &[SnapshotRecord], held: &[u64]) -> Vec<u64> {
    let keep = |k: &u64| {
        snapshots.iter().any(|s| {
            s.id == *k && matches!(s.state, Some(SnapshotState::Creating | SnapshotState::Ready))
        })
    };
    held.iter().copied().filter(|k| !keep(k)).collect()
}

/// The snapshots of `volume` with `name` marked `deleting`, and its key.
pub fn begin_delete(
    snapshots: &[SnapshotRecord],
    volume: &str,
    name: &str,
) -> Result<(Snapshots, u64), SnapshotError> {
    let mut next = snapshots.to_vec();
    let s = match next.iter_mut().find(|s| s.snapshot == name) {
        Some(s) if s.state == Some(SnapshotState::Ready) => s,
        Some(s) if s.state == Some(SnapshotState::Creating) => {
            return Err(SnapshotError::Busy { volume: volume.into(), name: name.into() })
        }
        _ => return Err(SnapshotError::NotFound { volume: volume.into(), name: name.into() }),
    };
    s.state = Some(SnapshotState::Deleting);
    let key = s.id;
    Ok((next, key))
}

/// The snapshots once copy `copy` removed `key`: it leaves the holders; the list drops
/// the snapshot once none holds it.
pub fn removed_from(snapshots: &[SnapshotRecord], key: u64, copy: CopyRef) -> Snapshots {
    let mut next = snapshots.to_vec();
    if let Some(s) = next.iter_mut().find(|s| s.id == key) {
        s.copies.retain(|c| *c != copy);
        if s.copies.is_empty() && s.state == Some(SnapshotState::Deleting) {
            return dropped(&next, key);
        }
    }
    next
}

/// Whether the copy `copy` may serve reads of snapshot `name` (S7): the snapshot is
/// `ready` and the copy holds it.
pub fn readable_on(snapshots: &[SnapshotRecord], name: &str, copy: CopyRef) -> bool {
    snapshots.iter().any(|s| {
        s.snapshot == name && s.state == Some(SnapshotState::Ready) && s.held_by(copy.node, copy.id)
    })
}

/// A barrier: the owner holds every region's turn; the copies to snapshot (every ACTIVE
/// copy, the owner's own among them) and the write-like plan their replies fold into
/// (`OwnerState::finish`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Barrier {
    /// The plan: no regions, one LSN, the remote copies to send to.
    pub write: Write,
    /// Bitmaps to save first: a RESYNCING copy is STALE from the barrier (it is not level
    /// yet, so its snapshot would not be the volume's; its resync starts again with the
    /// catch-up), with what it took since its last flush back in its bitmap.
    pub saves: Vec<SaveBitmap>,
    /// Copies whose STALE mark to record before the snapshot is `ready` (S8).
    pub record: Vec<usize>,
}

impl OwnerState {
    /// Plans a snapshot's barrier (S1). The caller holds every region's turn, so no write
    /// is in flight; the remote copies to send `Snapshot` to are `write.targets`, and the
    /// own copy takes it too. Replies go to [`OwnerState::finish`] as a write's do: a copy
    /// that failed is STALE (pending), a newer epoch deposes.
    ///
    /// Not while an ACTIVE copy owes a digest scan (a new owner's, after a take without a
    /// clean hand-over): it may still differ from the owner's where writes were in flight
    /// at the change of owner, so its snapshot would not be the others' (S4; found by the
    /// simulation). Made STALE it would count as a copy fewer until levelled: refused
    /// instead, until the scans are done.
    pub fn barrier(&mut self) -> Result<Barrier, ReplicaError> {
        self.barrier_ready()?;
        assert!(self.in_flight_regions() == 0, "a snapshot barrier with writes in flight");
        let mut saves = Vec::new();
        let resyncing: Vec<usize> = (0..self.tracks().len())
            .filter(|&i| self.track(i).state == CopyState::Resyncing)
            .collect();
        for &i in &resyncing {
            self.stale(i);
            saves.push(self.lose_unflushed(i));
        }
        let (write, more) = self.begin(1, &[], false);
        debug_assert!(more.is_empty(), "no regions: no bitmap changes");
        Ok(Barrier { write, saves, record: resyncing })
    }

    /// Whether a barrier may be cut now (see [`OwnerState::barrier`]).
    pub fn barrier_ready(&self) -> Result<(), ReplicaError> {
        let scanning = self
            .tracks()
            .iter()
            .any(|t| !t.local && t.state == CopyState::Active && t.scan.is_some());
        match scanning {
            true => Err(ReplicaError::NotNow {
                why: "a copy is being compared with the owner's after a change of owner",
            }),
            false => Ok(()),
        }
    }
}

/// The `ready` snapshots some ACTIVE copy of `record` does not hold, with that copy: S8
/// broken (empty when it holds).
pub fn unheld(record: &VolumeRecord) -> Vec<(String, CopyRef)> {
    let mut out = Vec::new();
    for s in record.snapshots.iter().filter(|s| s.state == Some(SnapshotState::Ready)) {
        for c in record.components.iter().filter(|c| c.state == CopyState::Active) {
            if !s.held_by(c.node, c.id) {
                out.push((s.snapshot.clone(), CopyRef { node: c.node, id: c.id }));
            }
        }
    }
    out
}

/// The next step of a pending copy's catch-up to snapshot `key` (S4, S5), while the copy
/// is STALE: its bitmap `dirty` (every region written since it went STALE), whether it
/// owes a full scan (`owes_scan`, of `regions` regions), and `from`, the first region not
/// yet levelled; at most `batch` regions a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CatchUp {
    /// Copy these regions of the owner's snapshot `key` to the copy where they differ
    /// (compare digests first); then the next step from `range.end`.
    Level {
        /// The snapshot.
        key: u64,
        /// Regions.
        range: Range<u64>,
    },
    /// Take snapshot `key` on the copy, then record it among the holders
    /// ([`caught_up`]): only if the copy answered every step of this catch-up, the take
    /// too, over one connection (a node that restarted meanwhile may have lost what the
    /// levelling wrote to its page cache, and its snapshot would keep the hole; the
    /// catch-up starts again).
    Take {
        /// The snapshot.
        key: u64,
    },
}

/// The catch-up step for snapshot `key` from region `from` (see [`CatchUp`]).
pub fn catch_up_step(
    key: u64,
    dirty: &BTreeSet<u64>,
    owes_scan: bool,
    regions: u64,
    from: u64,
    batch: u64,
) -> CatchUp {
    let batch = batch.max(1);
    if owes_scan {
        let to = from.saturating_add(batch).min(regions);
        return match from < to {
            true => CatchUp::Level { key, range: from..to },
            false => CatchUp::Take { key },
        };
    }
    let mut run = dirty.range(from..);
    let Some(&first) = run.next() else { return CatchUp::Take { key } };
    let more = run
        .take(batch as usize - 1)
        .enumerate()
        .take_while(|(k, r)| **r == first + 1 + *k as u64)
        .count() as u64;
    CatchUp::Level { key, range: first..first + 1 + more }
}

/// Whether STALE copy `copy` may go on from catching up to its resync (turn RESYNCING and
/// take writes) (S5): only if it lacks no `ready` snapshot, and no snapshot is being made
/// (that barrier skips a STALE copy, and once made, lists only those that took it: the
/// copy, ACTIVE by then, would lack it for ever; found by the simulation).
pub fn may_resync(snapshots: &[SnapshotRecord], copy: CopyRef) -> bool {
    pending(snapshots, copy).is_empty()
        && !snapshots.iter().any(|s| s.state == Some(SnapshotState::Creating))
}

/// Whether a copy in state `state` can catch up now: only while STALE (it takes no
/// writes, so levelling it from an immutable snapshot races with nothing).
pub fn may_catch_up(state: CopyState) -> bool {
    state == CopyState::Stale
}

#[cfg(test)]
mod tests;
