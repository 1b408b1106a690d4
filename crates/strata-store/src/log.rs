//! The log: one file of 4 KiB slots holding data blocks and journal slots, written in
//! order, made durable by one sync per group commit (`docs/design/store.md`).
//!
//! Layout: journal slots form a chain (each names the slot reserved for its successor);
//! data slots lie between them. A write puts its blocks at the tail, adds a `Write` record
//! (with each block's crc32c) to the open journal slot and rewrites that slot in place.
//! `flush` seals the open slot (it is never rewritten again, and the next records go to
//! the slot it reserved), syncs the file, then notes in the journal (a `Durable` record)
//! which slots that sync covered. The three steps can be split (`seal`, a sync of the
//! file, `synced`) so that a caller's lock is not held across the sync.
//!
//! Replay follows the chain from the first journal slot and stops at the first slot that
//! does not decode or has the wrong sequence. A `Write` record in a slot past the last
//! noted sync counts only if every block it names reads back with its crc: records whose
//! data a crash lost were never flushed. In a slot a sync covered, a bad crc is damage
//! to durable data: the record is kept so that the block reads as an error.
//!
//! Invariants:
//! 1. A sealed journal slot is never written again, and a slot is sealed before a sync
//!    covers it (a torn rewrite can never damage a record a flush promised).
//! 2. Every record appended before a `flush` (or before `seal` of a completed split flush)
//!    survives any later crash.
//! 3. Replay returns records in the order they were appended; past the last noted sync,
//!    only records whose data is intact.
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
    /// The last journal slot a completed sync is recorded to have covered.
    durable_through: u64,
    /// The first journal slot sequence since the log was created or opened.
    run_from: u64,
    /// Whether the open slot holds a record other than `Durable`.
    open_changes: bool,
}

fn offset(slot: u64) -> u64 {
    slot * SLOT_BYTES as u64
}

impl<F: RawFile> Log<F> {
    /// Starts a new log in an empty `file`: journal slot 1 at slot 0, its successor
    /// reserved at slot 1.
    pub fn create(file: F) -> Log<F> {
        Log {
            file,
            tail: 2,
            open_at: 0,
            open: SlotWriter::new(1, 1),
            open_sequence: 1,
            next_at: 1,
            durable_through: 0,
            run_from: 1,
            open_changes: false,
        }
    }

    /// Opens the log whose first journal slot is slot 0, replaying it: returns the log,
    /// ready to append after what survived, and the surviving records in order.
    pub fn open(file: F) -> Result<(Log<F>, Vec<Record>), LogError> {
        let mut at = 0;
        let mut sequence = 1;
        let mut tail = 0;
        let mut slot = vec![0u8; SLOT_BYTES];
        let file_slots = file.length_bytes()? / SLOT_BYTES as u64;
        // First the chain, and how far a completed sync is known to have reached.
        let mut slots = Vec::new();
        let mut durable: Vec<(u64, u64)> = Vec::new();
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
            for record in &decoded.records {
                if let Record::Durable { from, through } = record {
                    durable.push((*from, *through));
                }
            }
            slots.push((decoded.sequence, decoded.records));
            at = decoded.next;
            sequence += 1;
        }
        // A Write whose data fails its crc was torn by a crash if no noted sync covered its
        // slot: it was never flushed, and is dropped. In a slot a sync covered, the data
        // was durable and has rotted since: the record stays, so reads of the block fail
        // their checksum (an I/O error, never older bytes) and fsck reports it. A sync
        // noted after a reopen covers only slots from the reopen on, so a record an
        // earlier replay dropped as torn never comes back as "damaged".
        let covered =
            |s: u64| durable.iter().any(|(from, through)| (*from..=*through).contains(&s));
        let mut records = Vec::new();
        for (slot_sequence, slot_records) in slots {
            for record in slot_records {
                match record {
                    Record::Durable { .. } => continue,
                    Record::Write { pba, ref crcs, .. } => {
                        if !covered(slot_sequence)
                            && !Self::data_intact(&file, u64::from(pba), crcs, file_slots)?
                        {
                            continue;
                        }
                        tail = tail.max(u64::from(pba) + crcs.len() as u64);
                    }
                    _ => {}
                }
                records.push(record);
            }
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
            durable_through: sequence - 1,
            run_from: sequence,
            open_changes: false,
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
        self.open_changes |= !matches!(record, Record::Durable { .. });
        self.file.write_at(&self.open.encode()[..], offset(self.open_at))
    }

    /// Moves on to the reserved journal slot and reserves the one after it.
    fn advance(&mut self) {
        self.open_sequence += 1;
        self.open_at = self.next_at;
        self.next_at = self.tail;
        self.tail += 1;
        self.open = SlotWriter::new(self.open_sequence, self.next_at);
        self.open_changes = false;
    }

    /// Makes everything appended so far durable: seals the open journal slot, syncs, and
    /// notes the sync in the journal.
    pub fn flush(&mut self) -> io::Result<()> {
        let through = self.seal();
        self.file.sync()?;
        self.synced(through)
    }

    /// Seals the open journal slot (if it holds records) so that a sync started now covers
    /// a slot that is never rewritten: records appended from now on go to the next slot.
    /// Returns the sequence of the last sealed slot, for [`Log::synced`] once the sync is
    /// done. `seal`, a sync of [`Log::file`], then `synced` is `flush` split in three, so
    /// that the sync can run without the caller's lock while writes continue.
    pub fn seal(&mut self) -> u64 {
        // A slot holding only `Durable` notes needs no seal: nothing in it was promised.
        if self.open_changes {
            self.advance();
        }
        self.open_sequence - 1
    }

    /// Records that a sync covered every journal slot up to `through`: replay then knows
    /// that a record there whose data fails its crc is damage, not a torn tail.
    pub fn synced(&mut self, through: u64) -> io::Result<()> {
        if through > self.durable_through {
            self.durable_through = through;
            self.append(Record::Durable { from: self.run_from, through })?;
        }
        Ok(())
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
