//! The log: one file of 4 KiB slots holding data blocks and journal slots, written in
//! order, made durable by one sync per group commit (`docs/design/store.md`).
//!
//! Layout: journal slots form a chain (each names the slot reserved for its successor);
//! data slots lie between them. A write puts its blocks at the tail, adds a `Write` record
//! (with each block's crc32c) to the open journal slot and rewrites that slot in place.
//! `flush` syncs the file, then seals the open slot: it is never rewritten again, and the
//! next records go to the slot it reserved.
//!
//! Replay follows the chain from the first journal slot and stops at the first slot that
//! does not decode or has the wrong sequence. A `Write` record counts only if every block
//! it names reads back with its crc: records whose data a crash lost were never flushed.
//!
//! Invariants:
//! 1. A sealed journal slot is never written again.
//! 2. Every record returned by `flush` (i.e. appended before it) survives any later crash.
//! 3. Replay returns records in the order they were appended, and only records whose data
//!    is intact.
//! 4. A slot at or past the tail is never referenced by a valid record.

use crate::journal::{self, Record, SlotWriter, SLOT_BYTES};
use std::io;
use strata_io::sim::RawFile;

/// Why a log does not open.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Reading the file failed.
    #[error("read the log: {0}")]
    Io(#[from] io::Error),
}

/// The log over a file.
pub struct Log<F: RawFile> {
    file: F,
    /// The next free slot.
    tail: u64,
    /// Where the open journal slot lives, and its contents.
    open_at: u64,
    open: SlotWriter,
    open_sequence: u64,
    /// The slot reserved for the journal slot after the open one.
    next_at: u64,
}

fn offset(slot: u64) -> u64 {
    slot * SLOT_BYTES as u64
}

impl<F: RawFile> Log<F> {
    /// Starts a new log in an empty `file`: journal slot 1 at slot 0, its successor
    /// reserved at slot 1.
    pub fn create(file: F) -> Log<F> {
        Log { file, tail: 2, open_at: 0, open: SlotWriter::new(1, 1), open_sequence: 1, next_at: 1 }
    }

    /// Opens the log whose first journal slot is slot 0, replaying it: returns the log,
    /// ready to append after what survived, and the surviving records in order.
    pub fn open(file: F) -> Result<(Log<F>, Vec<Record>), LogError> {
        let mut records = Vec::new();
        let mut at = 0;
        let mut sequence = 1;
        let mut tail = 0;
        let mut slot = vec![0u8; SLOT_BYTES];
        let file_slots = file.length_bytes()? / SLOT_BYTES as u64;
        loop {
            if at >= file_slots {
                break;
            }
            file.read_at(&mut slot, offset(at))?;
            let Ok(decoded) = journal::decode(&slot) else { break };
            if decoded.sequence != sequence {
                break;
            }
            tail = tail.max(at + 1);
            for record in decoded.records {
                if let Record::Write { pba, ref crcs, .. } = record {
                    if !Self::data_intact(&file, u64::from(pba), crcs, file_slots)? {
                        continue; // never flushed: its data did not survive
                    }
                    tail = tail.max(u64::from(pba) + crcs.len() as u64);
                }
                records.push(record);
            }
            at = decoded.next;
            sequence += 1;
        }
        // `at` is the first slot of the chain that did not decode: the next journal slot
        // goes there. Everything after the surviving data is free.
        let next_at = tail.max(at + 1);
        let log = Log {
            file,
            tail: next_at + 1,
            open_at: at,
            open: SlotWriter::new(sequence, next_at),
            open_sequence: sequence,
            next_at,
        };
        Ok((log, records))
    }

    fn data_intact(file: &F, pba: u64, crcs: &[u32], file_slots: u64) -> io::Result<bool> {
        if pba + crcs.len() as u64 > file_slots {
            return Ok(false);
        }
        let mut block = vec![0u8; SLOT_BYTES];
        for (i, crc) in crcs.iter().enumerate() {
            file.read_at(&mut block, offset(pba + i as u64))?;
            if crc32c::crc32c(&block) != *crc {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Appends blocks (a multiple of 4096 bytes, at least one block) of `volume` at `lba`
    /// with VBAs from `vba`, and returns the record it logged (which says where the blocks
    /// went and their checksums). Survives a process crash when it returns; a power loss
    /// only after the next `flush`.
    pub fn write(&mut self, volume: u64, lba: u64, vba: u64, data: &[u8]) -> io::Result<Record> {
        assert!(!data.is_empty() && data.len().is_multiple_of(SLOT_BYTES), "whole blocks");
        let blocks = data.len() / SLOT_BYTES;
        assert!(blocks <= journal::WRITE_BLOCKS_MAX, "the store splits larger writes");
        let pba = self.tail;
        // Slots are u32 on disk (16 TiB of log): refuse before writing anything.
        let last = pba + blocks as u64 + 1;
        let pba32 = u32::try_from(pba)
            .ok()
            .filter(|_| u32::try_from(last).is_ok())
            .ok_or_else(|| io::Error::from_raw_os_error(28))?;
        self.file.write_at(data, offset(pba))?;
        self.tail += blocks as u64;
        let crcs = data.chunks(SLOT_BYTES).map(crc32c::crc32c).collect();
        let record = Record::Write { volume, lba, vba, pba: pba32, crcs };
        self.append(record.clone())?;
        Ok(record)
    }

    /// Appends a record that carries no data (trim, zero).
    pub fn append(&mut self, record: Record) -> io::Result<()> {
        if !self.open.push(&record) {
            // The open slot is full: it is complete as written; continue in the next.
            self.advance();
            assert!(self.open.push(&record), "a record fits an empty slot");
        }
        self.file.write_at(&self.open.encode()[..], offset(self.open_at))
    }

    /// Moves on to the reserved journal slot and reserves the one after it.
    fn advance(&mut self) {
        self.open_sequence += 1;
        self.open_at = self.next_at;
        self.next_at = self.tail;
        self.tail += 1;
        self.open = SlotWriter::new(self.open_sequence, self.next_at);
    }

    /// Makes everything appended so far durable, then seals the open journal slot.
    pub fn flush(&mut self) -> io::Result<()> {
        self.file.sync()?;
        if !self.open.is_empty() {
            self.advance();
        }
        Ok(())
    }

    /// Seals the open journal slot (if it holds records) so that a sync started now covers
    /// a slot that is never rewritten: records appended from now on go to the next slot.
    /// `seal` then a sync of [`Log::file`] is `flush` split in two, so that the sync can
    /// run without the caller's lock while writes continue.
    pub fn seal(&mut self) {
        if !self.open.is_empty() {
            self.advance();
        }
    }

    /// Slots the log occupies (data, journal, and the reserved next journal slot).
    pub fn tail(&self) -> u64 {
        self.tail
    }

    /// Reads `buf.len() / 4096` consecutive slots from `slot` and checks each against its
    /// crc in `crcs`; returns the index of the first block that fails, if any.
    pub fn read_run(&self, slot: u64, crcs: &[u32], buf: &mut [u8]) -> io::Result<Option<usize>> {
        debug_assert_eq!(buf.len(), crcs.len() * SLOT_BYTES);
        self.file.read_at(buf, offset(slot))?;
        Ok(buf.chunks(SLOT_BYTES).zip(crcs).position(|(b, crc)| crc32c::crc32c(b) != *crc))
    }

    /// Reads the block in `slot`, checking it against `crc`.
    pub fn read_block(&self, slot: u64, crc: u32, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_at(buf, offset(slot))?;
        if crc32c::crc32c(buf) != crc {
            return Err(io::Error::other(format!("block in slot {slot} fails its checksum")));
        }
        Ok(())
    }

    /// The underlying file (tests crash it).
    pub fn file(&self) -> &F {
        &self.file
    }

    /// Gives the file back (to reopen it after a simulated crash).
    pub fn into_file(self) -> F {
        self.file
    }
}

#[cfg(test)]
mod tests;
