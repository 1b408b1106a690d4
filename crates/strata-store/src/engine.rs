//! The store engine: the log ([`crate::log`]) for durability, a copy-on-write tree per
//! volume (`strata-blockmap`) for LBA → VBA, and the VBA map for VBA → (slot, crc32c).
//!
//! Volumes are created with a size, written, trimmed, zeroed, resized, rolled back to a
//! snapshot and removed; snapshots are O(1) and read-only; clones of snapshots are
//! writable volumes sharing their blocks; snapshot delete is the seed's method: the VBAs
//! only that snapshot holds leave the VBA map in sorted, bounded batches. Reopen loads
//! the last checkpoint (`checkpoint.rs`) and replays the log written since; the cleaner
//! (`cleaner.rs`) empties mostly-dead segments so the log reuses them.
//!
//! Volumes and snapshots share one id space ("views"). Every operation is validated
//! before its record is logged, so a refused request changes nothing, and applying a
//! logged record cannot fail — which is what makes replay deterministic.
//!
//! **Lineage.** Every view may have an *older* snapshot: the one it was last made from
//! (a volume's newest snapshot, the snapshot a clone or a rollback copied, or for a
//! snapshot the older of its volume when it was taken). A snapshot's *watermark* is the
//! next VBA when it was taken.
//!
//! Invariants:
//! 1. Every VBA a tree maps is in the VBA map, and every VBA map entry is mapped by some
//!    tree (no leak: overwrites, trims, shrinks, deletes and rollbacks remove what died).
//! 2. A read returns the bytes last written (or zeroes), or an error if the block fails its
//!    checksum — never other bytes.
//! 3. After reopen, every write flushed before a crash reads back (the log's guarantee,
//!    applied to the trees in record order).
//! 4. (Lineage) A VBA ≥ the watermark of view X's older snapshot that X maps is mapped only
//!    by X and the views made from X since. Hence a volume's overwritten block whose VBA is
//!    ≥ that watermark is dead at once, and a snapshot's exclusive blocks are those its
//!    older does not hold (below the watermark, same place) and its one younger view does
//!    not map. A snapshot two views were made from (a clone, or a rollback branch besides
//!    the next snapshot) cannot be deleted: its blocks would be shared across branches.

use crate::journal::Record;
#[cfg(test)]
use crate::journal::WRITE_BLOCKS_MAX;
use crate::log::{segment_of, Log, LogError, LogWrite, RUN_BLOCKS_MAX, SEGMENT_SLOTS};

mod checkpoint;
mod cleaner;
pub use checkpoint::Checkpoint;
use std::collections::HashMap;
use std::io;
use strata_blockmap::{Extent, Forest, Target, TreeId};
use strata_io::sim::RawFile;

/// Bytes per block.
pub const BLOCK_BYTES: usize = 4096;

/// What the engine refuses or fails at.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The log's file failed.
    #[error("log I/O: {0}")]
    Io(#[from] io::Error),
    /// A block failed its checksum (or its place is unreadable).
    #[error("volume {volume} block {lba}: {reason}")]
    Corrupt {
        /// Volume id.
        volume: u64,
        /// The block.
        lba: u64,
        /// What is wrong.
        reason: String,
    },
    /// The request is not whole blocks.
    #[error("I/O must be whole 4096-byte blocks")]
    Unaligned,
    /// The request reaches past the end of the volume.
    #[error("blocks {lba}+{blocks} are past the end of the volume ({size} bytes)")]
    OutOfRange {
        /// First block.
        lba: u64,
        /// Blocks.
        blocks: u64,
        /// The volume's size in bytes.
        size: u64,
    },
    /// No volume or snapshot with this id.
    #[error("no volume or snapshot {0}")]
    NotFound(u64),
    /// The id is taken.
    #[error("id {0} is already a volume or snapshot")]
    Exists(u64),
    /// Snapshots cannot be written.
    #[error("{0} is a snapshot and read-only")]
    ReadOnly(u64),
    /// The operation needs a snapshot.
    #[error("{0} is not a snapshot")]
    NotSnapshot(u64),
    /// The snapshot belongs to another volume.
    #[error("snapshot {snapshot} is not a snapshot of volume {volume}")]
    NotOfVolume {
        /// The volume.
        volume: u64,
        /// The snapshot.
        snapshot: u64,
    },
    /// Other views depend on the snapshot's (or the volume's snapshots') blocks.
    #[error("{id} has views that depend on it: {dependents:?}")]
    HasDependents {
        /// The snapshot or volume.
        id: u64,
        /// The views (clones, or a rollback branch) made from it.
        dependents: Vec<u64>,
    },
    /// A size that is zero or not whole blocks.
    #[error("size {0} is not a positive multiple of 4096 bytes")]
    BadSize(u64),
    /// The checkpoint file is damaged or of another format.
    #[error("the store's checkpoint is unusable: {0}")]
    BadCheckpoint(String),
    /// A client write would take space the reserve keeps for the store's own work,
    /// deletes and the metadata service: refused before anything is written.
    #[error(
        "no space left for client writes: {needed_bytes} bytes needed, {free_bytes} free, \
         {reserve_bytes} reserved"
    )]
    Full {
        /// Bytes of log the write could take.
        needed_bytes: u64,
        /// Bytes free on the file system (as last measured, less what the log took since).
        free_bytes: u64,
        /// Bytes client writes must leave free.
        reserve_bytes: u64,
    },
}

/// A volume or a snapshot.
#[derive(Clone, Debug)]
struct View {
    tree: TreeId,
    /// Size in bytes.
    size: u64,
    /// The snapshot this view was last made from (see the module doc).
    older: Option<u64>,
    kind: ViewKind,
}

#[derive(Clone, Debug)]
enum ViewKind {
    Volume {
        /// Its snapshots, oldest first.
        snapshots: Vec<u64>,
    },
    Snapshot {
        volume: u64,
        /// The next VBA when it was taken: every VBA it holds is below.
        watermark: u64,
    },
}

/// What a view is, for callers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViewInfo {
    /// A writable volume and its snapshots, oldest first.
    Volume {
        /// Snapshot ids.
        snapshots: Vec<u64>,
    },
    /// A read-only snapshot of `volume`.
    Snapshot {
        /// The volume it was taken of.
        volume: u64,
    },
}

/// Blocks a view maps, and how many of them only it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Data blocks the view maps.
    pub mapped_blocks: u64,
    /// Of those, the blocks no other view holds: what deleting it would free.
    pub exclusive_blocks: u64,
}

/// VBAs gathered per batch when a snapshot is deleted (8 MiB of memory).
const DELETE_BUFFER_VBAS: usize = 1 << 20;

impl From<LogError> for EngineError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Io(e) => EngineError::Io(e),
        }
    }
}

/// Where a block lives and its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    slot: u64,
    crc: u32,
}

/// The VBA map, with the number of live blocks in each segment beside it (the cleaner's
/// and the allocator's view of which segments hold data), and each segment's summary:
/// the VBA last placed in each of its slots (live if the map still points there), so the
/// cleaner finds a segment's live blocks in O(segment), not O(map).
#[derive(Default)]
struct VbaMap {
    map: HashMap<u64, Place>,
    live: HashMap<u64, u32>,
    summary: HashMap<u64, Box<[u64]>>,
}

impl VbaMap {
    fn insert(&mut self, vba: u64, place: Place) {
        let segment = segment_of(place.slot);
        *self.live.entry(segment).or_default() += 1;
        let summary = self
            .summary
            .entry(segment)
            .or_insert_with(|| vec![0; SEGMENT_SLOTS as usize].into_boxed_slice());
        summary[(place.slot % SEGMENT_SLOTS) as usize] = vba;
        if let Some(old) = self.map.insert(vba, place) {
            self.dec(old.slot);
        }
    }

    fn remove(&mut self, vba: &u64) -> Option<Place> {
        let old = self.map.remove(vba)?;
        self.dec(old.slot);
        Some(old)
    }

    fn dec(&mut self, slot: u64) {
        let segment = segment_of(slot);
        let count = self.live.get_mut(&segment).expect("counted when inserted");
        *count -= 1;
        if *count == 0 {
            self.live.remove(&segment);
        }
    }

    fn get(&self, vba: &u64) -> Option<&Place> {
        self.map.get(vba)
    }

    fn contains_key(&self, vba: &u64) -> bool {
        self.map.contains_key(vba)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn keys(&self) -> impl Iterator<Item = &u64> {
        self.map.keys()
    }

    fn iter(&self) -> impl Iterator<Item = (&u64, &Place)> {
        self.map.iter()
    }

    /// The live VBAs in `segment`, in slot order.
    fn live_in(&self, segment: u64) -> Vec<u64> {
        let Some(summary) = self.summary.get(&segment) else { return Vec::new() };
        let first = segment * SEGMENT_SLOTS;
        summary
            .iter()
            .enumerate()
            .filter(|(i, vba)| self.map.get(vba).is_some_and(|p| p.slot == first + *i as u64))
            .map(|(_, vba)| *vba)
            .collect()
    }

    /// Forgets the summary of a segment that holds no live block any more.
    fn forget(&mut self, segment: u64) {
        debug_assert!(!self.live.contains_key(&segment));
        self.summary.remove(&segment);
    }
}

/// The engine over one log file.
pub struct Engine<F: RawFile> {
    log: Log<F>,
    forest: Forest,
    views: HashMap<u64, View>,
    vba_map: VbaMap,
    next_vba: u64,
    /// The file system's free space as last measured, for the reserve rule (see
    /// [`Engine::set_space`]); `None`: unlimited.
    space: Option<Space>,
}

/// The file system's free space when last measured, and what client writes must leave.
#[derive(Clone, Copy, Debug)]
struct Space {
    /// Free bytes measured.
    free_bytes: u64,
    /// The log's count of slots taken then ([`Log::taken`]): every slot taken since may
    /// have taken a block of that space.
    at: u64,
    /// Bytes client writes must leave free.
    reserve_bytes: u64,
}

fn blocks_of(size: u64) -> u64 {
    size / BLOCK_BYTES as u64
}

impl<F: RawFile> Engine<F> {
    /// A new engine in an empty file.
    pub fn create(file: F) -> Engine<F> {
        Engine {
            log: Log::create(file),
            forest: Forest::default(),
            views: HashMap::new(),
            vba_map: VbaMap::default(),
            next_vba: 1,
            space: None,
        }
    }

    /// Opens an engine, replaying its whole log (no checkpoint).
    pub fn open(file: F) -> Result<Engine<F>, EngineError> {
        Engine::open_with(file, None, true)
    }

    /// Opens an engine from a checkpoint's bytes and the log written since.
    pub fn open_checkpoint(file: F, checkpoint: &[u8]) -> Result<Engine<F>, EngineError> {
        Engine::open_with(file, Some(checkpoint), true)
    }

    /// Opens an engine to inspect it (fsck): nothing is written, and it must not be
    /// changed afterwards.
    pub fn inspect(file: F, checkpoint: Option<&[u8]>) -> Result<Engine<F>, EngineError> {
        Engine::open_with(file, checkpoint, false)
    }

    fn open_with(
        file: F,
        checkpoint: Option<&[u8]>,
        writable: bool,
    ) -> Result<Engine<F>, EngineError> {
        let mut engine = match checkpoint {
            Some(bytes) => Engine::from_checkpoint(file, bytes)?,
            None => {
                let (log, records) = Log::open(file)?;
                let mut engine = Engine {
                    log,
                    forest: Forest::default(),
                    views: HashMap::new(),
                    vba_map: VbaMap::default(),
                    next_vba: 1,
                    space: None,
                };
                for record in records {
                    engine.apply(&record);
                }
                engine
            }
        };
        if writable {
            engine.log.start_run()?;
        }
        Ok(engine)
    }

    fn view(&self, id: u64) -> Result<&View, EngineError> {
        self.views.get(&id).ok_or(EngineError::NotFound(id))
    }

    /// Checks that `id` is an existing volume (not a snapshot).
    fn existing_volume(&self, id: u64) -> Result<&View, EngineError> {
        let view = self.view(id)?;
        match view.kind {
            ViewKind::Snapshot { .. } => Err(EngineError::ReadOnly(id)),
            ViewKind::Volume { .. } => Ok(view),
        }
    }

    /// Checks that `id` is an existing snapshot.
    fn existing_snapshot(&self, id: u64) -> Result<&View, EngineError> {
        let view = self.view(id)?;
        match view.kind {
            ViewKind::Snapshot { .. } => Ok(view),
            ViewKind::Volume { .. } => Err(EngineError::NotSnapshot(id)),
        }
    }

    /// Checks that no volume or snapshot is named `id`.
    fn free_id(&self, id: u64) -> Result<(), EngineError> {
        if self.views.contains_key(&id) {
            return Err(EngineError::Exists(id));
        }
        Ok(())
    }

    fn check_size(size: u64) -> Result<(), EngineError> {
        if size == 0 || !size.is_multiple_of(BLOCK_BYTES as u64) {
            return Err(EngineError::BadSize(size));
        }
        Ok(())
    }

    /// Checks a block range of writable volume `volume`.
    fn writable_range(&self, volume: u64, lba: u64, blocks: u64) -> Result<(), EngineError> {
        let size = self.existing_volume(volume)?.size;
        Self::in_range(size, lba, blocks)
    }

    fn in_range(size: u64, lba: u64, blocks: u64) -> Result<(), EngineError> {
        match lba.checked_add(blocks) {
            Some(end) if blocks > 0 && end <= blocks_of(size) => Ok(()),
            _ => Err(EngineError::OutOfRange { lba, blocks, size }),
        }
    }

    /// The views made from snapshot `id` (see the module doc), in id order.
    fn younger(&self, id: u64) -> Vec<u64> {
        let mut ids: Vec<u64> =
            self.views.iter().filter(|(_, v)| v.older == Some(id)).map(|(k, _)| *k).collect();
        ids.sort_unstable();
        ids
    }

    fn watermark(&self, snapshot: u64) -> u64 {
        match self.views[&snapshot].kind {
            ViewKind::Snapshot { watermark, .. } => watermark,
            ViewKind::Volume { .. } => unreachable!("an older view is a snapshot"),
        }
    }

    /// The lowest VBA that only view `id` (and views made from it since) can hold.
    fn floor(&self, id: u64) -> u64 {
        self.views[&id].older.map_or(0, |older| self.watermark(older))
    }

    /// Creates an empty volume of `size` bytes.
    pub fn create_volume(&mut self, volume: u64, size: u64) -> Result<(), EngineError> {
        self.free_id(volume)?;
        Self::check_size(size)?;
        self.log_and_apply(Record::Create { volume, size })
    }

    /// Changes a volume's size; a shrink drops the blocks past the new end.
    pub fn resize(&mut self, volume: u64, size: u64) -> Result<(), EngineError> {
        self.existing_volume(volume)?;
        Self::check_size(size)?;
        self.log_and_apply(Record::Resize { volume, size })
    }

    /// Removes a volume and its snapshots. Refused while clones depend on its snapshots.
    pub fn remove_volume(&mut self, volume: u64) -> Result<(), EngineError> {
        self.existing_volume(volume)?;
        let family = self.family(volume);
        let outside: Vec<u64> = family
            .iter()
            .flat_map(|id| self.younger(*id))
            .filter(|id| !family.contains(id))
            .collect();
        if !outside.is_empty() {
            return Err(EngineError::HasDependents { id: volume, dependents: outside });
        }
        self.log_and_apply(Record::Remove { volume })
    }

    /// A volume and its snapshots.
    fn family(&self, volume: u64) -> Vec<u64> {
        let ViewKind::Volume { snapshots } = &self.views[&volume].kind else {
            unreachable!("a volume")
        };
        let mut ids = snapshots.clone();
        ids.push(volume);
        ids
    }

    /// Takes a snapshot of `volume` named `snapshot`: O(1), and it never changes.
    pub fn snapshot(&mut self, volume: u64, snapshot: u64) -> Result<(), EngineError> {
        self.existing_volume(volume)?;
        self.free_id(snapshot)?;
        self.log_and_apply(Record::Snapshot { volume, snapshot })
    }

    /// Makes writable volume `clone` from snapshot `source`, sharing its blocks.
    pub fn clone_snapshot(&mut self, source: u64, clone: u64) -> Result<(), EngineError> {
        self.existing_snapshot(source)?;
        self.free_id(clone)?;
        self.log_and_apply(Record::Clone { source, clone })
    }

    /// Returns `volume` to snapshot `snapshot` (one of its own): its contents and size
    /// become the snapshot's; what it wrote since is freed. Its snapshots all stay.
    pub fn rollback(&mut self, volume: u64, snapshot: u64) -> Result<(), EngineError> {
        self.existing_volume(volume)?;
        match self.existing_snapshot(snapshot)?.kind {
            ViewKind::Snapshot { volume: of, .. } if of == volume => {}
            _ => return Err(EngineError::NotOfVolume { volume, snapshot }),
        }
        self.log_and_apply(Record::Rollback { volume, snapshot })
    }

    /// Deletes snapshot `snapshot`, removing the VBAs only it held from the VBA map.
    /// Refused while two or more views were made from it (clones, rollback branches).
    pub fn delete_snapshot(&mut self, snapshot: u64) -> Result<(), EngineError> {
        self.existing_snapshot(snapshot)?;
        let younger = self.younger(snapshot);
        if younger.len() > 1 {
            return Err(EngineError::HasDependents { id: snapshot, dependents: younger });
        }
        self.log_and_apply(Record::Delete { snapshot })
    }

    fn log_and_apply(&mut self, record: Record) -> Result<(), EngineError> {
        self.log.append(record.clone())?;
        self.apply(&record);
        Ok(())
    }

    /// Removes from the VBA map the blocks of `lba..lba+blocks` in volume `volume` that
    /// only it holds (they are about to be replaced or dropped: invariant 4).
    fn drop_dead(&mut self, volume: u64, lba: u64, blocks: u64) {
        let floor = self.floor(volume);
        self.forget_vbas(self.views[&volume].tree, lba, blocks, floor);
    }

    /// Removes from the VBA map the VBAs at or above `floor` that `tree` maps in
    /// `lba..lba+blocks`.
    fn forget_vbas(&mut self, tree: TreeId, lba: u64, blocks: u64, floor: u64) {
        for extent in self.forest.lookup(tree, lba, blocks).expect("validated range") {
            if let Target::Data { vba } = extent.target {
                for v in vba.max(floor)..vba + extent.length {
                    self.vba_map.remove(&v);
                }
            }
        }
    }

    fn apply_snapshot(&mut self, volume: u64, snapshot: u64) {
        let head = &self.views[&volume];
        let tree = self.forest.snapshot(head.tree).expect("validated before logging");
        let view = View {
            tree,
            size: head.size,
            older: head.older,
            kind: ViewKind::Snapshot { volume, watermark: self.next_vba },
        };
        self.views.insert(snapshot, view);
        let head = self.views.get_mut(&volume).expect("validated");
        head.older = Some(snapshot);
        if let ViewKind::Volume { snapshots } = &mut head.kind {
            snapshots.push(snapshot);
        }
    }

    fn apply_clone(&mut self, source: u64, clone: u64) {
        let snap = &self.views[&source];
        let tree = self.forest.clone_tree(snap.tree).expect("validated");
        let kind = ViewKind::Volume { snapshots: Vec::new() };
        self.views.insert(clone, View { tree, size: snap.size, older: Some(source), kind });
    }

    fn apply_delete(&mut self, snapshot: u64) {
        let younger = self.younger(snapshot);
        debug_assert!(younger.len() <= 1, "validated");
        let View { tree, older, kind, .. } = self.views.remove(&snapshot).expect("validated");
        let ViewKind::Snapshot { volume, .. } = kind else { unreachable!("validated") };
        let older_tree = older.map(|id| (self.views[&id].tree, self.watermark(id)));
        let newer = younger.first().map(|id| self.views[id].tree);
        let vba_map = &mut self.vba_map;
        self.forest
            .exclusive_vbas(tree, older_tree, newer, DELETE_BUFFER_VBAS, |batch| {
                for vba in batch {
                    vba_map.remove(vba);
                }
            })
            .expect("trees exist");
        self.forest.drop_tree(tree).expect("exists");
        if let Some(young) = younger.first() {
            self.views.get_mut(young).expect("exists").older = older;
        }
        if let Some(View { kind: ViewKind::Volume { snapshots }, .. }) = self.views.get_mut(&volume)
        {
            snapshots.retain(|s| *s != snapshot);
        }
    }

    fn apply_rollback(&mut self, volume: u64, snapshot: u64) {
        let size = self.views[&volume].size;
        self.drop_dead(volume, 0, blocks_of(size));
        let snap = &self.views[&snapshot];
        let (snap_tree, snap_size) = (snap.tree, snap.size);
        let tree = self.forest.clone_tree(snap_tree).expect("validated");
        let head = self.views.get_mut(&volume).expect("validated");
        let old_tree = std::mem::replace(&mut head.tree, tree);
        head.size = snap_size;
        head.older = Some(snapshot);
        self.forest.drop_tree(old_tree).expect("exists");
    }

    fn apply_remove(&mut self, volume: u64) {
        let family = self.family(volume);
        // The family's oldest outside ancestor (a clone's source) keeps what is below its
        // watermark; everything at or above it is the family's alone (invariant 4).
        let floor = family
            .iter()
            .filter_map(|id| self.views[id].older)
            .find(|older| !family.contains(older))
            .map_or(0, |older| self.watermark(older));
        for id in &family {
            let view = self.views.remove(id).expect("family members exist");
            self.forget_vbas(view.tree, 0, u64::MAX / 2, floor);
            self.forest.drop_tree(view.tree).expect("exists");
        }
    }

    /// Applies a record to the trees and the VBA map (at write time and at replay).
    fn apply(&mut self, record: &Record) {
        match record {
            Record::Write { volume, lba, vba, pba, crcs } => {
                let blocks = crcs.len() as u64;
                self.drop_dead(*volume, *lba, blocks);
                let tree = self.views[volume].tree;
                self.forest
                    .map(tree, *lba, blocks, Target::Data { vba: *vba })
                    .expect("a write record has at least one block");
                for (i, crc) in crcs.iter().enumerate() {
                    let place = Place { slot: u64::from(*pba) + i as u64, crc: *crc };
                    self.vba_map.insert(vba + i as u64, place);
                }
                self.next_vba = self.next_vba.max(vba + blocks);
            }
            Record::Trim { volume, lba, blocks } => {
                self.drop_dead(*volume, *lba, *blocks);
                let tree = self.views[volume].tree;
                self.forest.unmap(tree, *lba, *blocks).expect("trim records are non-empty");
            }
            Record::Zero { volume, lba, blocks } => {
                self.drop_dead(*volume, *lba, *blocks);
                let tree = self.views[volume].tree;
                self.forest.map(tree, *lba, *blocks, Target::Zero).expect("non-empty");
            }
            Record::Snapshot { volume, snapshot } => self.apply_snapshot(*volume, *snapshot),
            Record::Clone { source, clone } => self.apply_clone(*source, *clone),
            Record::Delete { snapshot } => self.apply_delete(*snapshot),
            Record::Create { volume, size } => {
                let tree = self.forest.create();
                let kind = ViewKind::Volume { snapshots: Vec::new() };
                self.views.insert(*volume, View { tree, size: *size, older: None, kind });
            }
            Record::Resize { volume, size } => {
                let (old, new) = (blocks_of(self.views[volume].size), blocks_of(*size));
                if new < old {
                    self.drop_dead(*volume, new, old - new);
                    let tree = self.views[volume].tree;
                    self.forest.unmap(tree, new, old - new).expect("non-empty");
                }
                self.views.get_mut(volume).expect("validated").size = *size;
            }
            Record::Remove { volume } => self.apply_remove(*volume),
            Record::Durable { .. } | Record::Truncate { .. } => {} // the log's own
            Record::Move { vba, pba, crcs } => {
                for (i, crc) in crcs.iter().enumerate() {
                    let v = vba + i as u64;
                    // A block deleted since the move was planned stays deleted.
                    if self.vba_map.get(&v).is_some_and(|p| p.crc == *crc) {
                        let place = Place { slot: u64::from(*pba) + i as u64, crc: *crc };
                        self.vba_map.insert(v, place);
                    }
                }
            }
            Record::Rollback { volume, snapshot } => self.apply_rollback(*volume, *snapshot),
        }
    }

    /// Writes whole blocks at `lba`. Survives a process crash when it returns.
    pub fn write(&mut self, volume: u64, lba: u64, data: &[u8]) -> Result<(), EngineError> {
        self.write_many(volume, &[(lba, data)])
    }

    /// Writes each `(lba, blocks)` of `volume` with the effect of [`Engine::write`] for
    /// each in turn (a later one wins where two overlap), logged together
    /// ([`Log::write_many`]). Every entry is checked first: if one is refused, nothing is
    /// written. Survives a process crash when it returns.
    pub fn write_many(&mut self, volume: u64, writes: &[(u64, &[u8])]) -> Result<(), EngineError> {
        self.write_many_with(volume, writes, true)
    }

    /// [`Engine::write`] that may take the reserve: for the partial edge blocks (at most
    /// two) of a trim or a zeroing, which must work on a full store.
    pub fn write_from_reserve(
        &mut self,
        volume: u64,
        lba: u64,
        data: &[u8],
    ) -> Result<(), EngineError> {
        self.write_many_with(volume, &[(lba, data)], false)
    }

    fn write_many_with(
        &mut self,
        volume: u64,
        writes: &[(u64, &[u8])],
        check_room: bool,
    ) -> Result<(), EngineError> {
        for (lba, data) in writes {
            if data.is_empty() || !data.len().is_multiple_of(BLOCK_BYTES) {
                return Err(EngineError::Unaligned);
            }
            self.writable_range(volume, *lba, (data.len() / BLOCK_BYTES) as u64)?;
        }
        if check_room {
            self.check_room(writes)?;
        }
        // Longer writes are split into runs of one record each, given VBAs in order.
        let mut vba = self.next_vba;
        let mut runs = Vec::with_capacity(writes.len());
        for (lba, data) in writes {
            for (i, chunk) in data.chunks(RUN_BLOCKS_MAX * BLOCK_BYTES).enumerate() {
                let lba = lba + (i * RUN_BLOCKS_MAX) as u64;
                runs.push(LogWrite { volume, lba, vba, data: chunk });
                vba += (chunk.len() / BLOCK_BYTES) as u64;
            }
        }
        for record in self.log.write_many(&runs)? {
            self.apply(&record);
        }
        Ok(())
    }

    /// Refuses `writes` (already validated) if they could take space the reserve keeps:
    /// their blocks, a journal slot per record and one more (a segment's unwritten tail
    /// skipped by the allocator costs the file system nothing).
    fn check_room(&self, writes: &[(u64, &[u8])]) -> Result<(), EngineError> {
        let bytes: usize = writes.iter().map(|(_, d)| d.len()).sum();
        self.check_room_for(bytes as u64, writes.len())
    }

    /// Whether writes of `bytes` in `writes` requests would be taken now (the reserve
    /// rule of `write`, `write_many`).
    pub fn has_room(&self, bytes: u64, writes: usize) -> bool {
        self.check_room_for(bytes, writes).is_ok()
    }

    fn check_room_for(&self, bytes: u64, writes: usize) -> Result<(), EngineError> {
        let Some(space) = self.space else { return Ok(()) };
        let blocks = bytes.div_ceil(BLOCK_BYTES as u64);
        // Each request's runs of at most a record's worth, one more for a partial one.
        let runs = blocks / RUN_BLOCKS_MAX as u64 + writes as u64;
        let needed_bytes = (blocks + runs + 1) * BLOCK_BYTES as u64;
        let free_bytes = self.free_bytes().expect("space is set");
        if free_bytes < needed_bytes.saturating_add(space.reserve_bytes) {
            return Err(EngineError::Full {
                needed_bytes,
                free_bytes,
                reserve_bytes: space.reserve_bytes,
            });
        }
        Ok(())
    }

    /// Tells the engine the file system's free space, just measured (no slot handed out
    /// since), and the reserve client writes must leave: from now on a client write
    /// (`write`, `write_many`) that could take more than the free space less the reserve
    /// is refused ([`EngineError::Full`]) before anything is written. Trims, zeroes,
    /// deletes, metadata changes and the cleaner are never refused: the reserve is theirs.
    /// `None`: no limit (the default).
    pub fn set_space(&mut self, free_and_reserve: Option<(u64, u64)>) {
        self.space = free_and_reserve.map(|(free_bytes, reserve_bytes)| Space {
            free_bytes,
            at: self.log.taken(),
            reserve_bytes,
        });
    }

    /// The file system's free space as last measured, less a block for every slot the log
    /// has handed out since (a slot in space the file already holds costs nothing, so
    /// this may be less than the truth, never more); `None` if never measured.
    pub fn free_bytes(&self) -> Option<u64> {
        let space = self.space?;
        let taken = (self.log.taken() - space.at) * BLOCK_BYTES as u64;
        Some(space.free_bytes.saturating_sub(taken))
    }

    /// Makes `blocks` blocks from `lba` a hole.
    pub fn trim(&mut self, volume: u64, lba: u64, blocks: u64) -> Result<(), EngineError> {
        self.writable_range(volume, lba, blocks)?;
        self.log_and_apply(Record::Trim { volume, lba, blocks })
    }

    /// Makes `blocks` blocks from `lba` read as zeroes.
    pub fn write_zeroes(&mut self, volume: u64, lba: u64, blocks: u64) -> Result<(), EngineError> {
        self.writable_range(volume, lba, blocks)?;
        self.log_and_apply(Record::Zero { volume, lba, blocks })
    }

    /// Makes everything written so far durable.
    pub fn flush(&mut self) -> Result<(), EngineError> {
        Ok(self.log.flush()?)
    }

    /// The first part of a flush that runs its sync without `&mut self`: seals the open
    /// journal slot; afterwards a sync of [`Engine::file`] makes everything written
    /// before the seal durable. Returns what to pass to [`Engine::synced`] after it.
    pub fn seal(&mut self) -> Result<u64, EngineError> {
        Ok(self.log.seal()?)
    }

    /// The last part of a split flush: records that the sync after `seal` completed.
    pub fn synced(&mut self, through: u64) -> Result<(), EngineError> {
        Ok(self.log.synced(through)?)
    }

    /// Reads whole blocks from `lba` of a volume or snapshot into `buf`.
    pub fn read(&self, view: u64, lba: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        self.read_with(view, lba, buf, false).map(|_| ())
    }

    /// Like [`Engine::read`], but returns `Ok(false)` (with `buf` partly filled) instead of
    /// waiting for the device when a block is not cached.
    pub fn read_nowait(&self, view: u64, lba: u64, buf: &mut [u8]) -> Result<bool, EngineError> {
        self.read_with(view, lba, buf, true)
    }

    /// [`Engine::read`] (`nowait` false, always `Ok(true)`) or [`Engine::read_nowait`].
    pub(crate) fn read_with(
        &self,
        view: u64,
        lba: u64,
        buf: &mut [u8],
        nowait: bool,
    ) -> Result<bool, EngineError> {
        if buf.is_empty() || !buf.len().is_multiple_of(BLOCK_BYTES) {
            return Err(EngineError::Unaligned);
        }
        let v = self.view(view)?;
        let blocks = (buf.len() / BLOCK_BYTES) as u64;
        Self::in_range(v.size, lba, blocks)?;
        buf.fill(0);
        let extents = self.forest.lookup(v.tree, lba, blocks).expect("non-empty range");
        let mut crcs = Vec::new();
        for extent in extents {
            let Target::Data { vba } = extent.target else { continue };
            // Read runs of blocks that lie in consecutive slots with one call each.
            let mut i = 0;
            while i < extent.length {
                let corrupt = |at: u64, reason: String| EngineError::Corrupt {
                    volume: view,
                    lba: extent.lba + at,
                    reason,
                };
                let place = |at: u64| {
                    self.vba_map.get(&(vba + at)).ok_or_else(|| {
                        corrupt(at, format!("VBA {} is missing from the VBA map", vba + at))
                    })
                };
                let first = place(i)?;
                crcs.clear();
                crcs.push(first.crc);
                let mut run = 1;
                while i + run < extent.length {
                    let next = place(i + run)?;
                    if next.slot != first.slot + run {
                        break;
                    }
                    crcs.push(next.crc);
                    run += 1;
                }
                let at = ((extent.lba + i - lba) as usize) * BLOCK_BYTES;
                let out = &mut buf[at..at + run as usize * BLOCK_BYTES];
                let result = if nowait {
                    match self.log.read_run_nowait(first.slot, &crcs, out) {
                        Ok(None) => return Ok(false),
                        Ok(Some(r)) => Ok(r),
                        Err(e) => Err(e),
                    }
                } else {
                    self.log.read_run(first.slot, &crcs, out)
                };
                match result {
                    Ok(None) => {}
                    Ok(Some(bad)) => {
                        out.fill(0);
                        let slot = first.slot + bad as u64;
                        return Err(corrupt(
                            i + bad as u64,
                            format!("block in slot {slot} fails its checksum"),
                        ));
                    }
                    Err(e) => return Err(corrupt(i, e.to_string())),
                }
                i += run;
            }
        }
        Ok(true)
    }

    /// The extents of a volume or snapshot in `lba..lba+blocks` (unmapped runs absent).
    pub fn extents(&self, view: u64, lba: u64, blocks: u64) -> Result<Vec<Extent>, EngineError> {
        let v = self.view(view)?;
        Self::in_range(v.size, lba, blocks)?;
        Ok(self.forest.lookup(v.tree, lba, blocks).expect("non-empty range"))
    }

    /// A view's size in bytes.
    pub fn size(&self, view: u64) -> Result<u64, EngineError> {
        Ok(self.view(view)?.size)
    }

    /// What view `id` is.
    pub fn info(&self, id: u64) -> Result<ViewInfo, EngineError> {
        Ok(match &self.view(id)?.kind {
            ViewKind::Volume { snapshots } => ViewInfo::Volume { snapshots: snapshots.clone() },
            ViewKind::Snapshot { volume, .. } => ViewInfo::Snapshot { volume: *volume },
        })
    }

    /// Every view id, volumes and snapshots, in order.
    pub fn view_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.views.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The views made from snapshot `id`: clones, a rollback branch, its next snapshot or
    /// its volume. More than one blocks its deletion.
    pub fn dependents(&self, id: u64) -> Vec<u64> {
        self.younger(id)
    }

    /// How many blocks view `id` maps and how many only it holds. O(its extents) for a
    /// volume; a snapshot's exclusive count walks it as its deletion would.
    pub fn usage(&self, id: u64) -> Result<Usage, EngineError> {
        let view = self.view(id)?;
        let floor = self.floor(id);
        let mut usage = Usage::default();
        for extent in self.forest.lookup(view.tree, 0, u64::MAX / 2).expect("valid range") {
            if let Target::Data { vba } = extent.target {
                usage.mapped_blocks += extent.length;
                if matches!(view.kind, ViewKind::Volume { .. }) {
                    let end = vba + extent.length;
                    usage.exclusive_blocks += end - vba.max(floor).min(end);
                }
            }
        }
        if matches!(view.kind, ViewKind::Snapshot { .. }) {
            let older = view.older.map(|o| (self.views[&o].tree, self.watermark(o)));
            // A block is exclusive when no view made from the snapshot maps it either.
            let mut exclusive: Option<Vec<u64>> = None;
            let younger = self.younger(id);
            for newer in younger.iter().map(|y| Some(self.views[y].tree)).chain(
                // With none made from it, compare against nothing.
                younger.is_empty().then_some(None),
            ) {
                let mut vbas = Vec::new();
                self.forest
                    .exclusive_vbas(view.tree, older, newer, DELETE_BUFFER_VBAS, |batch| {
                        vbas.extend_from_slice(batch)
                    })
                    .expect("trees exist");
                vbas.sort_unstable();
                exclusive = Some(match exclusive {
                    None => vbas,
                    Some(prev) => {
                        prev.into_iter().filter(|v| vbas.binary_search(v).is_ok()).collect()
                    }
                });
            }
            usage.exclusive_blocks = exclusive.map_or(0, |v| v.len() as u64);
        }
        Ok(usage)
    }

    /// Checks invariant 1 (both directions), that no view maps past its size, and the
    /// forest's own invariants. Pages shared by several trees are checked once (the
    /// seed's node maps), so a chain of snapshots costs what its distinct pages cost.
    pub fn validate(&self) -> Result<(), String> {
        self.forest.validate()?;
        for (id, view) in &self.views {
            let end = self.forest.end_lba(view.tree).map_err(|e| e.to_string())?;
            if end > blocks_of(view.size) {
                return Err(format!("view {id} maps block {} past its size", end - 1));
            }
        }
        let mut reached = std::collections::HashSet::new();
        let tail = self.log.slots_end();
        let mut problem = None;
        self.forest.for_each_distinct_extent(|extent| {
            let Target::Data { vba } = extent.target else { return };
            for v in vba..vba + extent.length {
                if problem.is_some() {
                    return;
                }
                match self.vba_map.get(&v) {
                    None => problem = Some(format!("VBA {v} is mapped but not in the VBA map")),
                    Some(place) if place.slot >= tail => {
                        problem = Some(format!("VBA {v} points past the log's tail"))
                    }
                    Some(_) if v >= self.next_vba => {
                        problem = Some(format!("VBA {v} is not below the next VBA"))
                    }
                    Some(_) => {
                        reached.insert(v);
                    }
                }
            }
        });
        if let Some(problem) = problem {
            return Err(problem);
        }
        if let Some(leaked) = self.vba_map.keys().find(|v| !reached.contains(v)) {
            return Err(format!("VBA {leaked} is in the VBA map but no view maps it"));
        }
        Ok(())
    }

    /// Reads every live block and checks its crc; returns the VBAs that fail.
    pub fn verify_data(&self) -> Result<Vec<u64>, EngineError> {
        self.verify_data_with(&mut |_, _| {})
    }

    /// As [`Engine::verify_data`], telling `progress` (bytes read, bytes to read) as it
    /// goes.
    pub fn verify_data_with(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Vec<u64>, EngineError> {
        let mut bad = Vec::new();
        let mut buf = vec![0u8; BLOCK_BYTES];
        let mut vbas: Vec<(&u64, &Place)> = self.vba_map.iter().collect();
        vbas.sort_unstable_by_key(|(_, p)| p.slot);
        let total = vbas.len() as u64 * BLOCK_BYTES as u64;
        for (k, (vba, place)) in vbas.into_iter().enumerate() {
            if self.log.read_block(place.slot, place.crc, &mut buf).is_err() {
                bad.push(*vba);
            }
            if k % 256 == 255 {
                progress((k as u64 + 1) * BLOCK_BYTES as u64, total);
            }
        }
        progress(total, total);
        bad.sort_unstable();
        Ok(bad)
    }

    /// The log's file (the store syncs it after [`Engine::seal`]; tests crash it).
    pub fn file(&self) -> &F {
        self.log.file()
    }

    /// Gives the log's file back.
    pub fn into_file(self) -> F {
        self.log.into_file()
    }

    /// Bytes of the log's segments in use (handed out and not freed).
    pub fn log_bytes(&self) -> u64 {
        self.log.segments_in_use() * SEGMENT_SLOTS * BLOCK_BYTES as u64
    }

    /// Every VBA the view `id` maps (tests and accounting).
    pub fn vbas_of(&self, id: u64) -> Vec<u64> {
        let Some(view) = self.views.get(&id) else { return Vec::new() };
        let mut vbas = Vec::new();
        for extent in self.forest.lookup(view.tree, 0, u64::MAX / 2).expect("valid range") {
            if let Target::Data { vba } = extent.target {
                vbas.extend(vba..vba + extent.length);
            }
        }
        vbas
    }

    /// Blocks of the log's segments in use that hold no live data.
    pub fn dead_blocks(&self) -> u64 {
        (self.log.segments_in_use() * SEGMENT_SLOTS).saturating_sub(self.vba_map.len() as u64)
    }

    /// Log slots handed out since the engine was opened (data and journal).
    pub fn log_allocated(&self) -> u64 {
        self.log.allocated()
    }

    /// Entries in the VBA map (live blocks).
    pub fn vba_map_len(&self) -> usize {
        self.vba_map.len()
    }

    /// Whether the VBA map holds `vba`.
    pub fn has_vba(&self, vba: u64) -> bool {
        self.vba_map.contains_key(&vba)
    }
}

#[cfg(test)]
mod checkpoint_tests;
#[cfg(test)]
mod full_tests;
#[cfg(test)]
mod tests;
