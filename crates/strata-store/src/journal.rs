//! Journal slots: the 4 KiB log slots that describe what the data slots around them hold.
//!
//! ```text
//! 0   8  magic "STRATAJ1"
//! 8   4  crc32c of bytes 12..48+used
//! 12  4  used: bytes of records
//! 16  8  slot sequence (increases by one per journal slot in the log)
//! 24  8  PBA of the next journal slot (reserved when this one is started)
//! 32  8  run: the sequence of the first slot written since the log was last opened
//! 40  4  crc32c (bytes 8..12) of the previous journal slot as it was when this one began
//! 44  4  zero
//! 48  …  records, then zeroes to 4096
//! record: kind u8, length u16, payload (little-endian)
//!   1 Write  volume u64, lba u64, vba u64, pba u32, crc32c u32 per block (1..=1000 blocks)
//!   2 Trim   volume u64, lba u64, blocks u64
//!   3 Zero   volume u64, lba u64, blocks u64
//!   4 Snapshot  volume u64, snapshot u64, 0 u64
//!   5 Clone     source u64, clone u64, 0 u64
//!   6 Delete    snapshot u64, 0 u64, 0 u64
//!   7 Create    volume u64, size bytes u64, 0 u64
//!   8 Resize    volume u64, size bytes u64, 0 u64
//!   9 Remove    volume u64, 0 u64, 0 u64
//!  10 Rollback  volume u64, snapshot u64, 0 u64
//!  11 Durable   from u64, through u64, 0 u64  (a sync covered journal slots from..=through)
//!  12 Move      vba u64, 0 u64, 0 u64, pba u32, crc32c u32 per block (the cleaner moved
//!               blocks vba.. to slots pba..; 1..=1000 blocks)
//!  13 Truncate  sequence u64, index u64, 0 u64  (replay at the start of this run dropped
//!               the record `index` of slot `sequence` and everything after it)
//! ```
//!
//! Journal slots are found by following `next` from the superblock, never by scanning the
//! log: a guest can write a data block that looks exactly like a journal slot, checksum
//! and all, and replay must never read it as metadata.
//!
//! A slot may be rewritten in place with more records only until it has been synced (the
//! store's rule, invariant 3 of the design): the checksum covers the whole used part, so a
//! torn rewrite fails to decode and costs only the records that were never synced.
//! Decoding untrusted bytes returns [`SlotError`], never panics.

use strata_types::le::{u16_at, u32_at, u64_at};

/// Bytes in a slot.
pub const SLOT_BYTES: usize = 4096;
const MAGIC: &[u8; 8] = b"STRATAJ1";
const HEADER_BYTES: usize = 48;
/// Bytes available for records in one slot.
pub const RECORDS_BYTES_MAX: usize = SLOT_BYTES - HEADER_BYTES;
const RECORD_HEADER_BYTES: usize = 3;
const WRITE_FIXED_BYTES: usize = 8 + 8 + 8 + 4;
/// Blocks one Write record describes at most (a larger write takes several records).
pub const WRITE_BLOCKS_MAX: usize = 1000;

const _: () =
    assert!(RECORD_HEADER_BYTES + WRITE_FIXED_BYTES + 4 * WRITE_BLOCKS_MAX <= RECORDS_BYTES_MAX);

const KIND_WRITE: u8 = 1;
const KIND_TRIM: u8 = 2;
const KIND_ZERO: u8 = 3;
const KIND_SNAPSHOT: u8 = 4;
const KIND_CLONE: u8 = 5;
const KIND_DELETE: u8 = 6;
const KIND_CREATE: u8 = 7;
const KIND_RESIZE: u8 = 8;
const KIND_REMOVE: u8 = 9;
const KIND_ROLLBACK: u8 = 10;
const KIND_DURABLE: u8 = 11;
const KIND_MOVE: u8 = 12;
const KIND_TRUNCATE: u8 = 13;

/// One change the journal records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Blocks `lba..lba+crcs.len()` of `volume` now live at VBAs `vba..` and PBAs `pba..`,
    /// with these checksums.
    Write {
        /// Volume id.
        volume: u64,
        /// First LBA.
        lba: u64,
        /// First VBA.
        vba: u64,
        /// First PBA (slots are consecutive).
        pba: u32,
        /// crc32c of each block.
        crcs: Vec<u32>,
    },
    /// `blocks` blocks from `lba` became a hole.
    Trim {
        /// Volume id.
        volume: u64,
        /// First LBA.
        lba: u64,
        /// Blocks.
        blocks: u64,
    },
    /// `blocks` blocks from `lba` read as zeroes.
    Zero {
        /// Volume id.
        volume: u64,
        /// First LBA.
        lba: u64,
        /// Blocks.
        blocks: u64,
    },
    /// A snapshot of `volume` was taken, named by id `snapshot`.
    Snapshot {
        /// Volume id.
        volume: u64,
        /// The snapshot's id (same id space as volumes).
        snapshot: u64,
    },
    /// A writable volume `clone` was made from snapshot `source`.
    Clone {
        /// The snapshot cloned.
        source: u64,
        /// The new volume's id.
        clone: u64,
    },
    /// Snapshot `snapshot` was deleted.
    Delete {
        /// The snapshot's id.
        snapshot: u64,
    },
    /// An empty volume was created.
    Create {
        /// Volume id.
        volume: u64,
        /// Its size in bytes.
        size: u64,
    },
    /// A volume's size changed (a shrink drops the blocks past the new end).
    Resize {
        /// Volume id.
        volume: u64,
        /// The new size in bytes.
        size: u64,
    },
    /// A volume and all its snapshots were removed.
    Remove {
        /// Volume id.
        volume: u64,
    },
    /// A volume's head became a copy of one of its snapshots.
    Rollback {
        /// Volume id.
        volume: u64,
        /// The snapshot.
        snapshot: u64,
    },
    /// The cleaner copied blocks `vba..vba+crcs.len()` to slots `pba..` (same bytes).
    Move {
        /// First VBA.
        vba: u64,
        /// First new PBA.
        pba: u32,
        /// crc32c of each block (unchanged by the move).
        crcs: Vec<u32>,
    },
    /// Replay dropped the `index`th record of slot `sequence` (its data was lost) and,
    /// with it, every record after it in slots before the one holding this record.
    Truncate {
        /// The slot's sequence.
        sequence: u64,
        /// The record's index in the slot.
        index: u64,
    },
    /// A completed sync covered journal slots `from..=through` (`from` is where the log
    /// was last opened: slots before it were judged by an earlier replay).
    Durable {
        /// The first journal slot sequence of this run of the log.
        from: u64,
        /// The last journal slot sequence the sync covered.
        through: u64,
    },
}

impl Record {
    fn payload_bytes(&self) -> usize {
        match self {
            Record::Write { crcs, .. } | Record::Move { crcs, .. } => {
                WRITE_FIXED_BYTES + 4 * crcs.len()
            }
            _ => 24,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let (kind, fields): (u8, [u64; 3]) = match self {
            Record::Write { volume, lba, vba, .. } => (KIND_WRITE, [*volume, *lba, *vba]),
            Record::Trim { volume, lba, blocks } => (KIND_TRIM, [*volume, *lba, *blocks]),
            Record::Zero { volume, lba, blocks } => (KIND_ZERO, [*volume, *lba, *blocks]),
            Record::Snapshot { volume, snapshot } => (KIND_SNAPSHOT, [*volume, *snapshot, 0]),
            Record::Clone { source, clone } => (KIND_CLONE, [*source, *clone, 0]),
            Record::Delete { snapshot } => (KIND_DELETE, [*snapshot, 0, 0]),
            Record::Create { volume, size } => (KIND_CREATE, [*volume, *size, 0]),
            Record::Resize { volume, size } => (KIND_RESIZE, [*volume, *size, 0]),
            Record::Remove { volume } => (KIND_REMOVE, [*volume, 0, 0]),
            Record::Rollback { volume, snapshot } => (KIND_ROLLBACK, [*volume, *snapshot, 0]),
            Record::Durable { from, through } => (KIND_DURABLE, [*from, *through, 0]),
            Record::Move { vba, .. } => (KIND_MOVE, [*vba, 0, 0]),
            Record::Truncate { sequence, index } => (KIND_TRUNCATE, [*sequence, *index, 0]),
        };
        out.push(kind);
        let length = u16::try_from(self.payload_bytes()).expect("records fit a slot");
        out.extend_from_slice(&length.to_le_bytes());
        for field in fields {
            out.extend_from_slice(&field.to_le_bytes());
        }
        if let Record::Write { pba, crcs, .. } | Record::Move { pba, crcs, .. } = self {
            out.extend_from_slice(&pba.to_le_bytes());
            for crc in crcs {
                out.extend_from_slice(&crc.to_le_bytes());
            }
        }
    }
}

/// Why a slot does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SlotError {
    /// Not 4096 bytes.
    #[error("slot is {0} bytes, not {SLOT_BYTES}")]
    Length(usize),
    /// Not a journal slot (a data slot, or never written).
    #[error("not a journal slot")]
    NotJournal,
    /// The checksum does not match: a torn or corrupt slot.
    #[error("journal slot checksum mismatch")]
    Checksum,
    /// The checksum matches but the records are impossible.
    #[error("journal slot is malformed: {0}")]
    Malformed(&'static str),
}

/// A decoded journal slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Its place in the chain of journal slots.
    pub sequence: u64,
    /// Where the next journal slot of the chain is.
    pub next: u64,
    /// The sequence of the first slot of its run (written since the log was last opened).
    pub run: u64,
    /// The checksum of the previous slot in its final form: a slot follows only the
    /// version of its predecessor it was started after.
    pub prev: u32,
    /// This slot's own checksum (what its successor's `prev` names).
    pub crc: u32,
    /// What it records, in order.
    pub records: Vec<Record>,
}

/// Builds one journal slot.
#[derive(Debug)]
pub struct SlotWriter {
    sequence: u64,
    next: u64,
    run: u64,
    prev: u32,
    records: Vec<u8>,
}

impl SlotWriter {
    /// An empty slot with this sequence number, chaining to the journal slot at PBA `next`.
    pub fn new(sequence: u64, next: u64) -> SlotWriter {
        SlotWriter {
            sequence,
            next,
            run: 1,
            prev: 0,
            records: Vec::with_capacity(RECORDS_BYTES_MAX),
        }
    }

    /// The same, in the run that started at sequence `run`.
    pub fn in_run(mut self, run: u64) -> SlotWriter {
        self.run = run;
        self
    }

    /// The same, following a slot whose final checksum is `prev`.
    pub fn after(mut self, prev: u32) -> SlotWriter {
        self.prev = prev;
        self
    }

    /// Appends `record` if it fits; returns false (and changes nothing) if it does not.
    ///
    /// Panics on a Write record of no block or of more than `WRITE_BLOCKS_MAX` blocks (the
    /// store splits writes first).
    pub fn push(&mut self, record: &Record) -> bool {
        if let Record::Write { crcs, .. } | Record::Move { crcs, .. } = record {
            assert!((1..=WRITE_BLOCKS_MAX).contains(&crcs.len()), "write record size");
        }
        let needed = RECORD_HEADER_BYTES + record.payload_bytes();
        if self.records.len() + needed > RECORDS_BYTES_MAX {
            return false;
        }
        record.encode(&mut self.records);
        true
    }

    /// The bytes of the slot that [`SlotWriter::encode`] fills: the header and the
    /// records (zeroes follow).
    pub fn encoded_bytes(&self) -> usize {
        HEADER_BYTES + self.records.len()
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The slot's bytes as they are now (the slot can be written again after more pushes,
    /// until it is synced).
    pub fn encode(&self) -> Box<[u8; SLOT_BYTES]> {
        let mut slot = Box::new([0u8; SLOT_BYTES]);
        slot[0..8].copy_from_slice(MAGIC);
        let used = u32::try_from(self.records.len()).expect("records fit a slot");
        slot[12..16].copy_from_slice(&used.to_le_bytes());
        slot[16..24].copy_from_slice(&self.sequence.to_le_bytes());
        slot[24..32].copy_from_slice(&self.next.to_le_bytes());
        slot[32..40].copy_from_slice(&self.run.to_le_bytes());
        slot[40..44].copy_from_slice(&self.prev.to_le_bytes());
        slot[HEADER_BYTES..HEADER_BYTES + self.records.len()].copy_from_slice(&self.records);
        let crc = crc32c::crc32c(&slot[12..HEADER_BYTES + self.records.len()]);
        slot[8..12].copy_from_slice(&crc.to_le_bytes());
        slot
    }
}

/// Decodes a journal slot.
pub fn decode(slot: &[u8]) -> Result<Slot, SlotError> {
    if slot.len() != SLOT_BYTES {
        return Err(SlotError::Length(slot.len()));
    }
    if &slot[0..8] != MAGIC {
        return Err(SlotError::NotJournal);
    }
    let used = u32_at(slot, 12) as usize;
    if used > RECORDS_BYTES_MAX {
        return Err(SlotError::Checksum); // the length field itself is damaged
    }
    if u32_at(slot, 8) != crc32c::crc32c(&slot[12..HEADER_BYTES + used]) {
        return Err(SlotError::Checksum);
    }
    let sequence = u64_at(slot, 16);
    let next = u64_at(slot, 24);
    let run = u64_at(slot, 32);
    let prev = u32_at(slot, 40);
    let crc = u32_at(slot, 8);
    let body = &slot[HEADER_BYTES..HEADER_BYTES + used];
    let mut records = Vec::new();
    let mut at = 0;
    while at < body.len() {
        if body.len() - at < RECORD_HEADER_BYTES {
            return Err(SlotError::Malformed("truncated record header"));
        }
        let kind = body[at];
        let length = usize::from(u16_at(body, at + 1));
        at += RECORD_HEADER_BYTES;
        if body.len() - at < length {
            return Err(SlotError::Malformed("record runs past the used bytes"));
        }
        records.push(decode_record(kind, &body[at..at + length])?);
        at += length;
    }
    Ok(Slot { sequence, next, run, prev, crc, records })
}

fn decode_record(kind: u8, p: &[u8]) -> Result<Record, SlotError> {
    match kind {
        KIND_WRITE | KIND_MOVE => {
            let blocks = p.len().checked_sub(WRITE_FIXED_BYTES).map(|n| (n / 4, n % 4));
            let Some((blocks, 0)) = blocks else {
                return Err(SlotError::Malformed("write record length"));
            };
            if !(1..=WRITE_BLOCKS_MAX).contains(&blocks) {
                return Err(SlotError::Malformed("write record block count"));
            }
            let crcs = (0..blocks).map(|i| u32_at(p, WRITE_FIXED_BYTES + 4 * i)).collect();
            if kind == KIND_MOVE {
                return Ok(Record::Move { vba: u64_at(p, 0), pba: u32_at(p, 24), crcs });
            }
            Ok(Record::Write {
                volume: u64_at(p, 0),
                lba: u64_at(p, 8),
                vba: u64_at(p, 16),
                pba: u32_at(p, 24),
                crcs,
            })
        }
        KIND_TRIM..=KIND_DURABLE | KIND_TRUNCATE => {
            if p.len() != 24 {
                return Err(SlotError::Malformed("record length"));
            }
            let (a, b, c) = (u64_at(p, 0), u64_at(p, 8), u64_at(p, 16));
            Ok(match kind {
                KIND_TRIM => Record::Trim { volume: a, lba: b, blocks: c },
                KIND_ZERO => Record::Zero { volume: a, lba: b, blocks: c },
                KIND_SNAPSHOT => Record::Snapshot { volume: a, snapshot: b },
                KIND_CLONE => Record::Clone { source: a, clone: b },
                KIND_DELETE => Record::Delete { snapshot: a },
                KIND_CREATE => Record::Create { volume: a, size: b },
                KIND_RESIZE => Record::Resize { volume: a, size: b },
                KIND_REMOVE => Record::Remove { volume: a },
                KIND_ROLLBACK => Record::Rollback { volume: a, snapshot: b },
                KIND_TRUNCATE => Record::Truncate { sequence: a, index: b },
                _ => Record::Durable { from: a, through: b },
            })
        }
        _ => Err(SlotError::Malformed("unknown record kind")),
    }
}

#[cfg(test)]
mod tests;
