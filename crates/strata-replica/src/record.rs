//! The replication records: what the metadata service stores for a volume under
//! `/volumes/<name>` ([`VolumeRecord`], with its [`ComponentRecord`]s and the last owner's
//! clean hand-over, [`Released`]) and under `/volumes/<name>/owner` ([`Owner`]); the API
//! returns the same JSON. Data and its serde form only: no I/O, no decisions.
//!
//! Invariants:
//! 1. The JSON is the stored form, so it never changes for a record that means the same:
//!    field names, their order, what is skipped when empty, and every value's spelling
//!    (`tests/records_golden.rs` holds it byte for byte). A field added later has a
//!    default, so records written before it still parse.
//! 2. A state is one of its enum's values; a record naming any other is refused with an
//!    error that says which, never read as another state (a copy read as STALE or ACTIVE
//!    by mistake would be resynced or trusted wrongly).
//! 3. A copy is named by its node and component id together: ids are unique only on their
//!    node.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fmt;
use strata_types::AccessList;

/// A volume's state in its record.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// The name is taken, the volume is being made.
    Creating,
    /// Made: it serves I/O.
    Ready,
    /// Being deleted: its copies are removed, then the record (no node takes it any more).
    Deleting,
}

impl VolumeState {
    /// Its name in records and messages: `creating`, `ready` or `deleting`.
    pub fn name(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Ready => "ready",
            VolumeState::Deleting => "deleting",
        }
    }
}

impl fmt::Display for VolumeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A copy's state (in the record, changed by the owner by compare-and-swap).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum CopyState {
    /// Holds every acknowledged write; takes every write.
    Active,
    /// Misses writes (its bitmap holds their regions); takes none until resynced.
    Stale,
    /// Being resynced: takes every write, and the regions it missed are being copied.
    Resyncing,
}

impl CopyState {
    /// Every state, in the order metrics list them.
    pub const ALL: [CopyState; 3] = [CopyState::Active, CopyState::Stale, CopyState::Resyncing];

    /// Its name in records, metrics and messages: `active`, `stale` or `resyncing`.
    pub fn name(self) -> &'static str {
        match self {
            CopyState::Active => "active",
            CopyState::Stale => "stale",
            CopyState::Resyncing => "resyncing",
        }
    }
}

impl fmt::Display for CopyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A volume's record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    /// The volume's name.
    pub name: String,
    /// The node holding its data (a replicated volume's: its last owner).
    pub node: u64,
    /// Being made, made, or being deleted.
    pub state: VolumeState,
    /// The store id on its node (hex), once made.
    pub id: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// `VOL@SNAP` it was cloned from.
    pub origin: Option<String>,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<SnapshotRecord>,
    /// Copies of its data (1: the volume lives on `node` alone).
    #[serde(default = "one")]
    pub replicas: u32,
    /// Copies that must be ACTIVE for a write to be acknowledged.
    #[serde(default = "one")]
    pub min_replicas: u32,
    /// A replicated volume's components (`node` is then its last owner).
    #[serde(default)]
    pub components: Vec<ComponentRecord>,
    /// A replicated volume's highest owner epoch so far.
    #[serde(default)]
    pub epoch: u64,
    /// Set by an owner that handed the volume over cleanly (`strata-server`'s
    /// `replicated.rs`, invariant 5); cleared by the next owner's take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released: Option<Released>,
    /// The latest epoch whose owner took the volume with its own copy suspect as the
    /// truth (every ACTIVE copy had come back from a power loss, invariant 11): writes
    /// acknowledged before it and not synced may be lost, so a FLUSH that started before
    /// it is not acknowledged (`takeover::flush_survives`). Kept by later takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_at: Option<u64>,
    /// Who may open it over NBD, on every node that serves it (absent: anyone).
    #[serde(default, skip_serializing_if = "AccessList::is_empty")]
    pub access: AccessList,
}

fn one() -> u32 {
    1
}

impl VolumeRecord {
    /// Whether it is a replicated volume (its components listed; managed by the
    /// replication, not a node's catalog).
    pub fn replicated(&self) -> bool {
        !self.components.is_empty()
    }
}

/// A snapshot in a volume's record. A replicated volume's (`docs/design/
/// replicated-snapshots.md`) has its id, state, barrier epoch and the copies holding it;
/// a node's own volume's has none of them, and its JSON is as it always was.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// The snapshot's name.
    pub snapshot: String,
    /// Its size.
    pub size_bytes: u64,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
    /// A replicated volume's: its store id on every copy's node (unique in the cluster).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub id: u64,
    /// A replicated volume's: being made, made, or being deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<SnapshotState>,
    /// A replicated volume's: the owner's epoch at its barrier.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epoch: u64,
    /// A replicated volume's: the copies that hold it (the others are pending).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<CopyRef>,
}

impl SnapshotRecord {
    /// A node's own volume's snapshot (no replication fields).
    pub fn plain(snapshot: impl Into<String>, size_bytes: u64, created_unix: u64) -> Self {
        SnapshotRecord { snapshot: snapshot.into(), size_bytes, created_unix, ..Self::default() }
    }

    /// Whether the copy `node`/`id` holds it.
    pub fn held_by(&self, node: u64, id: u64) -> bool {
        self.copies.iter().any(|c| c.node == node && c.id == id)
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A replicated volume's snapshot's state in the record.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    /// Its barrier may be under way: no node serves it; an owner that takes the volume
    /// with it so undoes it (S2).
    Creating,
    /// Made: served, cloned, caught up by pending copies.
    Ready,
    /// Being deleted: no node serves it; copies remove it, then the record drops it.
    Deleting,
}

/// In a volume's record: the owner at `epoch` handed the volume over cleanly, with the
/// copies `level` equal and synced (`replicated.rs` invariant 5). A copy is named by node
/// and component id together (invariant 3).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Released {
    /// The epoch of the owner that let go.
    pub epoch: u64,
    /// The copies that were ACTIVE, equal and synced then. (Named `equal`, with ids
    /// alone, before: such a record vouches for none, and the next owner compares them.)
    #[serde(default)]
    pub level: Vec<CopyRef>,
    /// The synchronization bitmaps of the STALE copies then (those owing no digest scan,
    /// of at most [`HANDED_RUNS_MAX`] runs): the next owner resyncs just those regions,
    /// where without them it would compare the whole copy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stale: Vec<HandedBitmap>,
}

/// A copy in a volume's record: its node and its component id there.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyRef {
    /// The node.
    pub node: u64,
    /// The component id on that node.
    pub id: u64,
}

/// A STALE copy's bitmap, handed over in [`Released`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HandedBitmap {
    /// The component's node (0 in records written before it was: matches no copy, which
    /// the next owner then compares in full).
    #[serde(default)]
    pub node: u64,
    /// The component.
    pub id: u64,
    /// Runs of regions it lacks, `[first, last]` (a region is a bitmap bit's bytes).
    pub runs: Vec<[u64; 2]>,
}

/// The most runs of a STALE copy's bitmap a clean hand-over puts in the record (about
/// 40 bytes each); a copy whose bitmap has more is compared in full by the next owner.
pub const HANDED_RUNS_MAX: usize = 2048;

/// `regions` as runs of consecutive ones (for [`HandedBitmap::runs`]).
pub fn runs_of(regions: &BTreeSet<u64>) -> Vec<[u64; 2]> {
    let mut runs: Vec<[u64; 2]> = Vec::new();
    for &r in regions {
        match runs.last_mut() {
            Some(run) if run[1] + 1 == r => run[1] = r,
            _ => runs.push([r, r]),
        }
    }
    runs
}

/// The regions of `runs`, those past `regions_in_volume` left out, reversed runs ignored
/// (a record is input).
pub fn regions_of(runs: &[[u64; 2]], regions_in_volume: u64) -> BTreeSet<u64> {
    let Some(last) = regions_in_volume.checked_sub(1) else { return BTreeSet::new() };
    runs.iter().filter(|[a, b]| a <= b && *a <= last).flat_map(|&[a, b]| a..=b.min(last)).collect()
}

/// One component in a volume's record. The optional fields are the owner's live view
/// (`volume info`): never stored in the record but `stale_lsn`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ComponentRecord {
    /// The node holding it.
    pub node: u64,
    /// Its id on that node.
    pub id: u64,
    /// Its state.
    pub state: CopyState,
    /// Bytes its synchronization bitmap marks as missed (the owner's live view; not
    /// stored in the record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<u64>,
    /// Bytes copied to it by resyncs and scans since this owner took the volume (the
    /// owner's live view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resynced_bytes: Option<u64>,
    /// Bytes a digest scan still has to compare (after a change of owner, or for a
    /// rebuild; the owner's live view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_left_bytes: Option<u64>,
    /// The highest LSN it has acknowledged under the current owner (the owner's live
    /// view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<u64>,
    /// While STALE or RESYNCING: the LSN of the first write it missed (recorded with its
    /// STALE mark).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_lsn: Option<u64>,
    /// Its node came back from a power loss and marked it suspect (invariant 11): it may
    /// lack writes that node had not synced, until an owner levels it. Shown from the
    /// marks each node publishes (the server's `mark_suspects`); never stored in the
    /// record.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspect: bool,
}

impl ComponentRecord {
    /// Component `id` on `node` in `state`, as stored: none of the owner's live figures.
    pub fn new(node: u64, id: u64, state: CopyState) -> ComponentRecord {
        ComponentRecord {
            node,
            id,
            state,
            dirty_bytes: None,
            resynced_bytes: None,
            scan_left_bytes: None,
            lsn: None,
            stale_lsn: None,
            suspect: false,
        }
    }
}

/// `/volumes/<name>/owner`: the node that owns a replicated volume, and at which epoch.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The owning node.
    pub node: u64,
    /// Its epoch.
    pub epoch: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_bitmap_is_runs_that_give_back_the_same_regions_within_the_volume() {
        let regions: BTreeSet<u64> = [0, 1, 2, 5, 9, 10].into();
        let runs = runs_of(&regions);
        assert_eq!(runs, vec![[0, 2], [5, 5], [9, 10]]);
        assert_eq!(regions_of(&runs, 16), regions);
        assert!(runs_of(&BTreeSet::new()).is_empty());
        // From a record, so input: runs past the end are cut, reversed ones ignored.
        assert_eq!(regions_of(&[[14, u64::MAX], [7, 3]], 16), [14, 15].into());
        assert!(regions_of(&[[0, 3]], 0).is_empty());
    }

    #[test]
    fn states_are_spelt_as_in_the_records_and_an_unknown_one_is_refused() {
        for s in CopyState::ALL {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{s}\""));
            assert_eq!(serde_json::from_str::<CopyState>(&json).unwrap(), s);
        }
        for s in [VolumeState::Creating, VolumeState::Ready, VolumeState::Deleting] {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.name()));
            assert_eq!(serde_json::from_str::<VolumeState>(&json).unwrap(), s);
        }
        // Once silently STALE: now an error naming the value and the ones allowed.
        let bad = r#"{"node":1,"id":2,"state":"ACTIVE"}"#;
        let e = serde_json::from_str::<ComponentRecord>(bad).unwrap_err().to_string();
        assert!(e.contains("unknown variant `ACTIVE`") && e.contains("`stale`"), "{e}");
        let e = serde_json::from_str::<VolumeState>("\"gone\"").unwrap_err().to_string();
        assert!(e.contains("unknown variant `gone`") && e.contains("`deleting`"), "{e}");
    }
}
