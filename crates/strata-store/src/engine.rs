//! The store engine: the log ([`crate::log`]) for durability, a copy-on-write tree per
//! volume (`strata-blockmap`) for LBA → VBA, and the VBA map for VBA → (slot, crc32c).
//!
//! So far: write, read (every block checked against its crc), trim, write zeroes, flush,
//! and reopen by replaying the whole log into the trees and the map. Not yet: checkpoints
//! (replay is from the start), snapshots through the API, the cleaner, fsck.
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
}

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
    trees: HashMap<u64, TreeId>,
    vba_map: HashMap<u64, Place>,
    next_vba: u64,
}

impl<F: RawFile> Engine<F> {
    /// A new engine in an empty file.
    pub fn create(file: F) -> Engine<F> {
        Engine {
            log: Log::create(file),
            forest: Forest::default(),
            trees: HashMap::new(),
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
            trees: HashMap::new(),
            vba_map: HashMap::new(),
            next_vba: 1,
        };
        for record in records {
            engine.apply(&record);
        }
        Ok(engine)
    }

    fn tree(&mut self, volume: u64) -> TreeId {
        let forest = &mut self.forest;
        *self.trees.entry(volume).or_insert_with(|| forest.create())
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
        }
    }

    /// Writes whole blocks at `lba`. Survives a process crash when it returns.
    pub fn write(&mut self, volume: u64, lba: u64, data: &[u8]) -> Result<(), EngineError> {
        if data.is_empty() || !data.len().is_multiple_of(BLOCK_BYTES) {
            return Err(EngineError::Unaligned);
        }
        for (i, chunk) in data.chunks(WRITE_BLOCKS_MAX * BLOCK_BYTES).enumerate() {
            let lba = lba + (i * WRITE_BLOCKS_MAX) as u64;
            let record = self.log.write(volume, lba, self.next_vba, chunk)?;
            self.apply(&record);
        }
        Ok(())
    }

    /// Makes `blocks` blocks from `lba` a hole.
    pub fn trim(&mut self, volume: u64, lba: u64, blocks: u64) -> Result<(), EngineError> {
        let record = Record::Trim { volume, lba, blocks };
        self.log.append(record.clone())?;
        self.apply(&record);
        Ok(())
    }

    /// Makes `blocks` blocks from `lba` read as zeroes.
    pub fn write_zeroes(&mut self, volume: u64, lba: u64, blocks: u64) -> Result<(), EngineError> {
        let record = Record::Zero { volume, lba, blocks };
        self.log.append(record.clone())?;
        self.apply(&record);
        Ok(())
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
        let Some(tree) = self.trees.get(&volume) else { return Ok(()) };
        let blocks = (buf.len() / BLOCK_BYTES) as u64;
        let extents = self.forest.lookup(*tree, lba, blocks).expect("non-empty range");
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
        for (volume, tree) in &self.trees {
            for extent in self.forest.lookup(*tree, 0, u64::MAX / 2).expect("valid range") {
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
