//! The store engine: the log ([`crate::log`]) for durability, a copy-on-write tree per
//! volume (`strata-blockmap`) for LBA → VBA, and the VBA map for VBA → (slot, crc32c).
//!
//! So far: write, read (every block checked against its crc), trim, write zeroes, flush,
//! snapshots (O(1), read-only), clones of snapshots (writable), snapshot delete (the
//! seed's method: the VBAs only that snapshot holds leave the VBA map in sorted, bounded
//! batches), and reopen by replaying the whole log. Not yet: checkpoints (replay is from
//! the start), the cleaner, fsck.
//!
//! Volumes and snapshots share one id space ("views"). Every operation is validated
//! before its record is logged, so a refused request changes nothing, and applying a
//! logged record cannot fail — which is what makes replay deterministic.
//!
//! Invariants:
//! 1. Every VBA a tree maps is in the VBA map.
//! 2. A read returns the bytes last written (or zeroes), or an error if the block fails its
//!    checksum — never other bytes.
//! 3. After reopen, every write flushed before a crash reads back (the log's guarantee,
//!    applied to the trees in record order).

use crate::journal::{Record, WRITE_BLOCKS_MAX};
use crate::log::{Log, LogError};
use std::collections::HashMap;
use std::io;
use strata_blockmap::{Forest, Target, TreeId};
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
    /// Clones still depend on the snapshot.
    #[error("snapshot {id} has {clones} clone(s) that depend on it")]
    HasClones {
        /// The snapshot.
        id: u64,
        /// Its clones.
        clones: u32,
    },
}

/// A volume or a snapshot.
#[derive(Clone, Debug)]
struct View {
    tree: TreeId,
    kind: ViewKind,
}

#[derive(Clone, Debug)]
enum ViewKind {
    Volume {
        /// Its snapshots, oldest first.
        snapshots: Vec<u64>,
        /// The snapshot it was cloned from, if any.
        origin: Option<u64>,
    },
    Snapshot {
        volume: u64,
        /// The next VBA when it was taken: every VBA it holds is below.
        watermark: u64,
        clones: u32,
    },
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

/// The engine over one log file.
pub struct Engine<F: RawFile> {
    log: Log<F>,
    forest: Forest,
    views: HashMap<u64, View>,
    vba_map: HashMap<u64, Place>,
    next_vba: u64,
}

impl<F: RawFile> Engine<F> {
    /// A new engine in an empty file.
    pub fn create(file: F) -> Engine<F> {
        Engine {
            log: Log::create(file),
            forest: Forest::default(),
            views: HashMap::new(),
            vba_map: HashMap::new(),
            next_vba: 1,
        }
    }

    /// Opens an engine, replaying its log.
    pub fn open(file: F) -> Result<Engine<F>, EngineError> {
        let (log, records) = Log::open(file)?;
        let mut engine = Engine {
            log,
            forest: Forest::default(),
            views: HashMap::new(),
            vba_map: HashMap::new(),
            next_vba: 1,
        };
        for record in records {
            engine.apply(&record);
        }
        Ok(engine)
    }

    /// The tree of writable volume `volume`, created on first use.
    fn tree(&mut self, volume: u64) -> TreeId {
        let forest = &mut self.forest;
        self.views
            .entry(volume)
            .or_insert_with(|| View {
                tree: forest.create(),
                kind: ViewKind::Volume { snapshots: Vec::new(), origin: None },
            })
            .tree
    }

    fn writable(&self, id: u64) -> Result<(), EngineError> {
        match self.views.get(&id) {
            Some(View { kind: ViewKind::Snapshot { .. }, .. }) => Err(EngineError::ReadOnly(id)),
            _ => Ok(()),
        }
    }

    /// Checks that `id` is an existing volume (not a snapshot).
    fn existing_volume(&self, id: u64) -> Result<(), EngineError> {
        self.views.get(&id).ok_or(EngineError::NotFound(id))?;
        self.writable(id)
    }

    /// Checks that `id` is an existing snapshot; returns how many clones depend on it.
    fn existing_snapshot(&self, id: u64) -> Result<u32, EngineError> {
        match self.views.get(&id).ok_or(EngineError::NotFound(id))?.kind {
            ViewKind::Snapshot { clones, .. } => Ok(clones),
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

    /// Deletes snapshot `snapshot`, removing the VBAs only it held from the VBA map.
    pub fn delete_snapshot(&mut self, snapshot: u64) -> Result<(), EngineError> {
        match self.existing_snapshot(snapshot)? {
            0 => self.log_and_apply(Record::Delete { snapshot }),
            clones => Err(EngineError::HasClones { id: snapshot, clones }),
        }
    }

    fn log_and_apply(&mut self, record: Record) -> Result<(), EngineError> {
        self.log.append(record.clone())?;
        self.apply(&record);
        Ok(())
    }

    fn apply_snapshot(&mut self, volume: u64, snapshot: u64) {
        // At replay the volume may not exist: the write that created it may be one whose
        // data did not survive (it was never flushed). It is then empty, as that write is.
        let tree = self.tree(volume);
        let snap_tree = self.forest.snapshot(tree).expect("validated before logging");
        if let ViewKind::Volume { snapshots, .. } =
            &mut self.views.get_mut(&volume).expect("validated").kind
        {
            snapshots.push(snapshot);
        }
        let kind = ViewKind::Snapshot { volume, watermark: self.next_vba, clones: 0 };
        self.views.insert(snapshot, View { tree: snap_tree, kind });
    }

    fn apply_clone(&mut self, source: u64, clone: u64) {
        let tree = self.forest.clone_tree(self.views[&source].tree).expect("validated");
        if let ViewKind::Snapshot { clones, .. } =
            &mut self.views.get_mut(&source).expect("validated").kind
        {
            *clones += 1;
        }
        let kind = ViewKind::Volume { snapshots: Vec::new(), origin: Some(source) };
        self.views.insert(clone, View { tree, kind });
    }

    fn apply_delete(&mut self, snapshot: u64) {
        let View { tree, kind } = self.views.remove(&snapshot).expect("validated");
        let ViewKind::Snapshot { volume, .. } = kind else { unreachable!("validated") };
        let (snapshots, origin) = match &self.views[&volume].kind {
            ViewKind::Volume { snapshots, origin } => (snapshots.clone(), *origin),
            ViewKind::Snapshot { .. } => unreachable!("a snapshot's volume is a volume"),
        };
        let at = snapshots.iter().position(|s| *s == snapshot).expect("listed");
        // The next older tree sharing blocks with this one: the volume's previous
        // snapshot, or for a clone's first snapshot the snapshot it was cloned from.
        let older_id = if at > 0 { Some(snapshots[at - 1]) } else { origin };
        let older = older_id.map(|id| match self.views[&id].kind {
            ViewKind::Snapshot { watermark, .. } => (self.views[&id].tree, watermark),
            ViewKind::Volume { .. } => unreachable!("older trees are snapshots"),
        });
        let newer =
            snapshots.get(at + 1).map_or(self.views[&volume].tree, |id| self.views[id].tree);
        let vba_map = &mut self.vba_map;
        self.forest
            .exclusive_vbas(tree, older, newer, DELETE_BUFFER_VBAS, |batch| {
                for vba in batch {
                    vba_map.remove(vba);
                }
            })
            .expect("trees exist");
        self.forest.drop_tree(tree).expect("exists");
        if let ViewKind::Volume { snapshots, .. } =
            &mut self.views.get_mut(&volume).expect("exists").kind
        {
            snapshots.remove(at);
        }
    }

    /// Applies a record to the trees and the VBA map (at write time and at replay).
    fn apply(&mut self, record: &Record) {
        match record {
            Record::Write { volume, lba, vba, pba, crcs } => {
                let tree = self.tree(*volume);
                let blocks = crcs.len() as u64;
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
                let tree = self.tree(*volume);
                self.forest.unmap(tree, *lba, *blocks).expect("trim records are non-empty");
            }
            Record::Zero { volume, lba, blocks } => {
                let tree = self.tree(*volume);
                self.forest.map(tree, *lba, *blocks, Target::Zero).expect("non-empty");
            }
            Record::Snapshot { volume, snapshot } => self.apply_snapshot(*volume, *snapshot),
            Record::Clone { source, clone } => self.apply_clone(*source, *clone),
            Record::Delete { snapshot } => self.apply_delete(*snapshot),
        }
    }

    /// Writes whole blocks at `lba`. Survives a process crash when it returns.
    pub fn write(&mut self, volume: u64, lba: u64, data: &[u8]) -> Result<(), EngineError> {
        if data.is_empty() || !data.len().is_multiple_of(BLOCK_BYTES) {
            return Err(EngineError::Unaligned);
        }
        self.writable(volume)?;
        for (i, chunk) in data.chunks(WRITE_BLOCKS_MAX * BLOCK_BYTES).enumerate() {
            let lba = lba + (i * WRITE_BLOCKS_MAX) as u64;
            let record = self.log.write(volume, lba, self.next_vba, chunk)?;
            self.apply(&record);
        }
        Ok(())
    }

    /// Makes `blocks` blocks from `lba` a hole.
    pub fn trim(&mut self, volume: u64, lba: u64, blocks: u64) -> Result<(), EngineError> {
        self.writable(volume)?;
        self.log_and_apply(Record::Trim { volume, lba, blocks })
    }

    /// Makes `blocks` blocks from `lba` read as zeroes.
    pub fn write_zeroes(&mut self, volume: u64, lba: u64, blocks: u64) -> Result<(), EngineError> {
        self.writable(volume)?;
        self.log_and_apply(Record::Zero { volume, lba, blocks })
    }

    /// Makes everything written so far durable.
    pub fn flush(&mut self) -> Result<(), EngineError> {
        Ok(self.log.flush()?)
    }

    /// Reads whole blocks from `lba` into `buf`.
    pub fn read(&self, volume: u64, lba: u64, buf: &mut [u8]) -> Result<(), EngineError> {
        if buf.is_empty() || !buf.len().is_multiple_of(BLOCK_BYTES) {
            return Err(EngineError::Unaligned);
        }
        buf.fill(0);
        let Some(view) = self.views.get(&volume) else { return Ok(()) };
        let blocks = (buf.len() / BLOCK_BYTES) as u64;
        let extents = self.forest.lookup(view.tree, lba, blocks).expect("non-empty range");
        for extent in extents {
            let Target::Data { vba } = extent.target else { continue };
            for i in 0..extent.length {
                let at = ((extent.lba + i - lba) as usize) * BLOCK_BYTES;
                let out = &mut buf[at..at + BLOCK_BYTES];
                let corrupt =
                    |reason: String| EngineError::Corrupt { volume, lba: extent.lba + i, reason };
                let place = self.vba_map.get(&(vba + i)).ok_or_else(|| {
                    corrupt(format!("VBA {} is missing from the VBA map", vba + i))
                })?;
                self.log
                    .read_block(place.slot, place.crc, out)
                    .map_err(|e| corrupt(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Checks invariant 1 and the forest's own invariants.
    pub fn validate(&self) -> Result<(), String> {
        self.forest.validate()?;
        for (volume, view) in &self.views {
            for extent in self.forest.lookup(view.tree, 0, u64::MAX / 2).expect("valid range") {
                if let Target::Data { vba } = extent.target {
                    if let Some(missing) =
                        (vba..vba + extent.length).find(|v| !self.vba_map.contains_key(v))
                    {
                        return Err(format!("volume {volume}: VBA {missing} not in the VBA map"));
                    }
                }
            }
        }
        Ok(())
    }

    /// The log's file (tests crash it).
    pub fn into_file(self) -> F {
        self.log.into_file()
    }
}

#[cfg(test)]
mod tests;

impl<F: RawFile> Engine<F> {
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

    /// Entries in the VBA map.
    pub fn vba_map_len(&self) -> usize {
        self.vba_map.len()
    }

    /// Whether the VBA map holds `vba`.
    pub fn has_vba(&self, vba: u64) -> bool {
        self.vba_map.contains_key(&vba)
    }
}
