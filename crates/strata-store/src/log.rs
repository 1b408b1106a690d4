//! The log: one file of 4 KiB slots holding data blocks and journal slots, written in
//! order, made durable by one sync per group commit (`docs/design/store.md`).
//!
//! Layout: journal slots form a chain (each names the slot reserved for its successor);
//! data slots lie between them. A write puts its blocks at the tail, adds a `Write` record
//! (with each block's crc32c) to the open journal slot and rewrites that slot in place.
//! A batch of writes (`write_many`) puts all its blocks first (one vectored write per
//! stretch of consecutive slots), then all its records, and rewrites the slot once.
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
use std::collections::BTreeSet;
use std::io;
use strata_io::sim::RawFile;

/// Why a log does not open.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Reading the file failed.
    #[error("read the log: {0}")]
    Io(#[from] io::Error),
}

/// Slots per segment (32 MiB): the unit the cleaner frees and the allocator reuses. The
/// crate's own unit tests use 16-slot segments so that small simulated logs span many.
pub const SEGMENT_SLOTS: u64 = if cfg!(test) { 16 } else { 8192 };
/// Blocks one Write or Move record may carry: one record's worth, within one segment.
pub const RUN_BLOCKS_MAX: usize = if (SEGMENT_SLOTS as usize) < journal::WRITE_BLOCKS_MAX {
    SEGMENT_SLOTS as usize
} else {
    journal::WRITE_BLOCKS_MAX
};

/// Where replay starts and how slots were being handed out at that point: saved by a
/// checkpoint, so that replay can follow the allocation that came after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start {
    /// The slot of the first journal slot to replay.
    pub at: u64,
    /// Its sequence.
    pub sequence: u64,
    /// The next free slot in the head segment.
    pub head: u64,
    /// The end of the head segment.
    pub head_end: u64,
    /// Segments free for reuse, handed out lowest first.
    pub free: BTreeSet<u64>,
    /// The first segment never used.
    pub fresh: u64,
}

impl Start {
    /// The start of a new, empty log.
    pub fn empty() -> Start {
        Start {
            at: 0,
            sequence: 1,
            head: 0,
            head_end: SEGMENT_SLOTS,
            free: BTreeSet::new(),
            fresh: 1,
        }
    }
}

/// The log over a file.
pub struct Log<F: RawFile> {
    file: F,
    /// The next free slot of the head segment, and that segment's end.
    head: u64,
    head_end: u64,
    /// Segments free for reuse, lowest first, and the first never-used segment.
    free: BTreeSet<u64>,
    fresh: u64,
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
    /// The checksum of the open slot as last written (its successor names it).
    open_crc: u32,
    /// Whether the open slot holds records not written yet (pushed by a batch).
    open_pending: bool,
    /// Whether the open slot was written whole once already: a rewrite then writes only
    /// its header and records (the zeroes after them are there).
    open_written: bool,
    /// Slots handed out since the log was opened (a checkpoint policy's measure).
    allocated: u64,
    /// Slots left unused at the ends of segments since the log was opened (a run never
    /// crosses a segment); with `allocated`, the most file space the log can have taken.
    skipped: u64,
    /// One past the last slot written (or the file's length at open): slots at or past it
    /// read as zeroes.
    file_end: u64,
    /// A segment being prepared (see `take_fresh`), outside the lock.
    preparing: Option<u64>,
    /// Free segments zeroed in this run and not used since, and whether the head is one.
    zeroed: BTreeSet<u64>,
    head_zeroed: bool,
    /// Free segments punched in this run and not used since: they hold no file-system
    /// space, so punching them again would give nothing back.
    holes: BTreeSet<u64>,
    /// What the replay that opened the log decided, for `start_run` to record: the
    /// slots it judged, and where it truncated.
    judged: Option<(u64, u64)>,
    truncate_at: Option<(u64, u64)>,
}

/// One write of [`Log::write_many`]: whole blocks of `volume` at `lba`, with VBAs from
/// `vba`.
#[derive(Clone, Copy, Debug)]
pub struct LogWrite<'a> {
    /// The volume.
    pub volume: u64,
    /// Its first block.
    pub lba: u64,
    /// The VBA of the first block (the others follow).
    pub vba: u64,
    /// The blocks: a multiple of 4096 bytes, at least one block, at most
    /// [`RUN_BLOCKS_MAX`] blocks.
    pub data: &'a [u8],
}

impl LogWrite<'_> {
    /// How many blocks it writes (checked: whole blocks, at least one, one record's worth).
    fn blocks(&self) -> usize {
        let data = self.data;
        assert!(!data.is_empty() && data.len().is_multiple_of(SLOT_BYTES), "whole blocks");
        assert!(data.len() / SLOT_BYTES <= RUN_BLOCKS_MAX, "the store splits larger writes");
        data.len() / SLOT_BYTES
    }

    /// Its record, once its blocks are in slots from `pba`.
    fn record(&self, pba: u32) -> Record {
        let crcs = self.data.chunks(SLOT_BYTES).map(crc32c::crc32c).collect();
        Record::Write { volume: self.volume, lba: self.lba, vba: self.vba, pba, crcs }
    }
}

/// Slot `pba`, the first of `blocks`, as stored on disk (u32: 16 TiB of log), if the run
/// and the journal slot after it fit; ENOSPC otherwise.
fn slot32(pba: u64, blocks: usize) -> io::Result<u32> {
    u32::try_from(pba + blocks as u64 + 1)
        .map(|_| pba as u32)
        .map_err(|_| io::Error::from_raw_os_error(28))
}

fn offset(slot: u64) -> u64 {
    slot * SLOT_BYTES as u64
}

/// The segment holding `slot`.
pub fn segment_of(slot: u64) -> u64 {
    slot / SEGMENT_SLOTS
}

impl<F: RawFile> Log<F> {
    /// Starts a new log in an empty `file`: journal slot 1 at slot 0, its successor
    /// reserved at slot 1.
    pub fn create(file: F) -> Log<F> {
        Log {
            file,
            head: 2,
            head_end: SEGMENT_SLOTS,
            free: BTreeSet::new(),
            fresh: 1,
            open_at: 0,
            open: SlotWriter::new(1, 1),
            open_sequence: 1,
            next_at: 1,
            durable_through: 0,
            run_from: 1,
            open_changes: false,
            open_crc: 0,
            open_written: false,
            open_pending: false,
            allocated: 2,
            skipped: 0,
            file_end: 0,
            preparing: None,
            zeroed: BTreeSet::new(),
            head_zeroed: false,
            holes: BTreeSet::new(),
            judged: None,
            truncate_at: None,
        }
    }

    /// Opens a log written from its first slot (no checkpoint), replaying all of it.
    pub fn open(file: F) -> Result<(Log<F>, Vec<Record>), LogError> {
        Log::open_from(file, Start::empty())
    }

    /// Opens the log, replaying the chain of journal slots from `start`: returns the log,
    /// ready to append after what survived, and the surviving records in order.
    pub fn open_from(file: F, start: Start) -> Result<(Log<F>, Vec<Record>), LogError> {
        let mut at = start.at;
        let mut sequence = start.sequence;
        let mut run = 0;
        let mut prev_crc: Option<u32> = None;
        let mut slot = vec![0u8; SLOT_BYTES];
        let file_slots = file.length_bytes()? / SLOT_BYTES as u64;
        // Every slot the chain shows was handed out since `start`.
        let mut used: Vec<(u64, u64)> = Vec::new();
        // First the chain, and how far a completed sync is known to have reached.
        let mut slots = Vec::new();
        let mut durable: Vec<(u64, u64)> = Vec::new();
        // ((sequence, index) dropped from, sequence of the slot that says so)
        let mut truncations: Vec<((u64, u64), u64)> = Vec::new();
        loop {
            if at >= file_slots {
                break;
            }
            file.read_at(&mut slot, offset(at))?;
            let Ok(decoded) = journal::decode(&slot) else { break };
            // Runs only move forward, and a new run starts at its own first slot: a stale
            // slot left by an earlier run past a torn tail (where this run reserved its
            // next slot again) has an older run and ends the chain.
            // (The first slot replayed may be in a run that began before the checkpoint.)
            let run_ok = if run == 0 {
                decoded.run <= sequence
            } else {
                decoded.run == run || (decoded.run > run && decoded.run == sequence)
            };
            // A slot started after its predecessor's final version only: if a crash lost
            // that version (the predecessor filled and the chain moved on unsynced), the
            // records after it would follow a gap, so the chain ends here.
            let prev_ok = prev_crc.is_none_or(|c| c == decoded.prev);
            if decoded.sequence != sequence || !run_ok || !prev_ok {
                break;
            }
            run = decoded.run;
            prev_crc = Some(decoded.crc);
            used.push((at, 1));
            for record in &decoded.records {
                match record {
                    Record::Durable { from, through } => durable.push((*from, *through)),
                    Record::Truncate { sequence: s, index } => {
                        truncations.push(((*s, *index), decoded.sequence));
                    }
                    Record::Write { pba, crcs, .. } | Record::Move { pba, crcs, .. } => {
                        used.push((u64::from(*pba), crcs.len() as u64));
                    }
                    _ => {}
                }
            }
            slots.push((decoded.sequence, decoded.records));
            at = decoded.next;
            sequence += 1;
        }
        // `at` is the first slot of the chain that did not decode: it was reserved for the
        // next journal slot, which goes there now.
        used.push((at, 1));
        // A Write whose data fails its crc was torn by a crash if no noted sync covered its
        // slot: it was never flushed. Replay then stops there: it and everything after it
        // were unflushed, and the state stays a prefix of the history. The decision is
        // written at the start of the next run (`start_run`: a `Truncate` record, and a
        // `Durable` one for what was kept), so no later replay judges these records again
        // (their slots may by then read differently). In a slot a sync covered, a bad
        // crc is damage to durable data: the record stays, so reads of the block fail
        // their checksum (an I/O error, never older bytes) and fsck reports it.
        let covered =
            |s: u64| durable.iter().any(|(from, through)| (*from..=*through).contains(&s));
        let voided =
            |s: u64, i: u64| truncations.iter().any(|(at, marker)| s < *marker && (s, i) >= *at);
        let mut records = Vec::new();
        let mut truncate_at = None;
        'replay: for (slot_sequence, slot_records) in slots {
            for (index, record) in slot_records.into_iter().enumerate() {
                if voided(slot_sequence, index as u64) {
                    continue;
                }
                let lost = match &record {
                    Record::Durable { .. } | Record::Truncate { .. } => continue,
                    Record::Write { pba, crcs, .. } | Record::Move { pba, crcs, .. } => {
                        !covered(slot_sequence)
                            && !Self::data_intact(&file, u64::from(*pba), crcs, file_slots)?
                    }
                    _ => false,
                };
                if lost {
                    truncate_at = Some((slot_sequence, index as u64));
                    break 'replay;
                }
                records.push(record);
            }
        }
        let mut log = Log {
            file,
            head: start.head,
            head_end: start.head_end,
            free: start.free,
            fresh: start.fresh,
            open_at: at,
            open: SlotWriter::new(sequence, 0).in_run(sequence),
            open_sequence: sequence,
            next_at: 0,
            durable_through: sequence - 1,
            run_from: sequence,
            open_changes: false,
            open_crc: 0,
            open_written: false,
            open_pending: false,
            allocated: 0,
            skipped: 0,
            file_end: file_slots,
            preparing: None,
            zeroed: BTreeSet::new(),
            head_zeroed: false,
            holes: BTreeSet::new(),
            judged: None,
            truncate_at: None,
        };
        log.skip_used(&used);
        // Reserved, but zeroed only by `start_run`: opening writes nothing (fsck opens
        // the log read-only).
        log.next_at = log.alloc(1);
        log.open =
            SlotWriter::new(sequence, log.next_at).in_run(sequence).after(prev_crc.unwrap_or(0));
        log.judged = (start.sequence < sequence).then_some((start.sequence, sequence - 1));
        log.truncate_at = truncate_at;
        Ok((log, records))
    }

    /// Moves the allocator past every slot in `used` (handed out after the start): the
    /// segments were taken in the allocator's order (the head, then free ones lowest
    /// first, then fresh ones), so the last one touched in that order is the head now,
    /// and every one before it is taken.
    fn skip_used(&mut self, used: &[(u64, u64)]) {
        let head_segment = segment_of(self.head_end - 1);
        let free: Vec<u64> = self.free.iter().copied().collect();
        let fresh = self.fresh;
        let rank = |segment: u64| -> Option<u64> {
            if segment == head_segment {
                Some(0)
            } else if let Ok(i) = free.binary_search(&segment) {
                Some(1 + i as u64)
            } else if segment >= fresh {
                Some(1 + free.len() as u64 + (segment - fresh))
            } else {
                None // allocated before the start
            }
        };
        let mut last: Option<(u64, u64)> = None; // (rank, segment)
        let mut end_in: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        for (slot, count) in used {
            let segment = segment_of(*slot);
            let Some(r) = rank(segment) else { continue };
            let end = end_in.entry(segment).or_insert(0);
            *end = (*end).max(slot + count);
            if last.is_none_or(|(lr, _)| r > lr) {
                last = Some((r, segment));
            }
        }
        let Some((last_rank, segment)) = last else { return };
        if segment == head_segment {
            self.head = self.head.max(end_in[&segment]);
            return;
        }
        self.free.retain(|s| rank(*s).is_some_and(|r| r > last_rank));
        if segment >= fresh {
            self.fresh = segment + 1;
        }
        self.head = end_in[&segment];
        self.head_end = (segment + 1) * SEGMENT_SLOTS;
    }

    /// Reserves the slot of the next journal slot and writes zeroes into it: whatever a
    /// segment held before it was reused (guest data shaped like a journal slot, or an
    /// old slot), the chain can only ever find there zeroes or the slot written later.
    /// The zeroes reach the disk with the sync that first covers the slot naming this one.
    fn reserve(&mut self) -> io::Result<u64> {
        let slot = self.alloc(1);
        // The head of a segment zeroed in this run was never written since.
        if !self.head_zeroed {
            self.zero(slot)?;
        }
        Ok(slot)
    }

    /// Writes zeroes into `slot`, unless it lies past the end of the file as it was
    /// (nothing was ever written there, so it reads as zeroes already).
    fn zero(&mut self, slot: u64) -> io::Result<()> {
        if slot < self.file_end {
            self.file.write_at(&[0u8; SLOT_BYTES], offset(slot))?;
        }
        Ok(())
    }

    /// Hands out `n` (≤ one segment) consecutive slots within one segment.
    fn alloc(&mut self, n: u64) -> u64 {
        assert!(n <= SEGMENT_SLOTS, "runs are split to fit a segment");
        if self.head + n > self.head_end {
            self.skipped += self.head_end - self.head;
            let segment = self.free.pop_first().unwrap_or_else(|| {
                self.fresh += 1;
                self.fresh - 1
            });
            self.head_zeroed = self.zeroed.remove(&segment);
            self.holes.remove(&segment);
            self.head = segment * SEGMENT_SLOTS;
            self.head_end = self.head + SEGMENT_SLOTS;
        }
        self.head += n;
        self.allocated += n;
        self.head - n
    }

    /// Slots handed out since the log was created or opened.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    /// Slots handed out or skipped (a segment's tail too short for a run) since the log
    /// was created or opened: an upper bound of the file space it took since.
    pub fn taken(&self) -> u64 {
        self.allocated + self.skipped
    }

    /// Where replay would start if the log were reopened now from a checkpoint of the
    /// state so far: call right after [`Log::seal`], with the caller's state captured under
    /// the same lock. Segments the caller finds empty are not in it: they are handed out
    /// again only after [`Log::release`], once the checkpoint is durable.
    pub fn start(&self) -> Start {
        Start {
            at: self.open_at,
            sequence: self.open_sequence,
            head: self.head,
            head_end: self.head_end,
            free: self.free.clone(),
            fresh: self.fresh,
        }
    }

    /// Segments the log is writing into now (the head, the open journal slot's and the
    /// reserved one's, and one being prepared): never free, whatever their live count.
    pub fn busy_segments(&self) -> [u64; 4] {
        let head = segment_of(self.head_end - 1);
        [head, segment_of(self.open_at), segment_of(self.next_at), self.preparing.unwrap_or(head)]
    }

    /// Whether `segment` is free for reuse.
    pub fn is_free(&self, segment: u64) -> bool {
        self.free.contains(&segment)
    }

    /// Makes `segments` (empty, and known so by a durable checkpoint) available again.
    pub fn release(&mut self, segments: &[u64]) {
        self.free.extend(segments.iter().copied());
    }

    /// Makes `segments`, taken by [`Log::take_surplus`] and punched, free again.
    pub fn release_punched(&mut self, segments: &[u64]) {
        self.holes.extend(segments.iter().copied());
        self.zeroed.retain(|s| !segments.contains(s));
        self.release(segments);
    }

    /// Makes a segment taken by [`Log::take_fresh`] free, now known to read as zeroes
    /// (`zeroed`) or not (the preparation failed).
    pub fn prepared(&mut self, segment: u64, zeroed: bool) {
        if self.preparing == Some(segment) {
            self.preparing = None;
        }
        if zeroed {
            self.zeroed.insert(segment);
        }
        self.free.insert(segment);
    }

    /// Takes a never-used segment for preparing (writing zeroes into it ahead of need, so
    /// that later writes there change no file-system metadata); [`Log::release`] then
    /// makes it free. Only when fewer than `want` segments are free.
    pub fn take_fresh(&mut self, want: usize) -> Option<u64> {
        if self.free.len() >= want {
            return None;
        }
        self.fresh += 1;
        self.preparing = Some(self.fresh - 1);
        self.preparing
    }

    /// Takes the free segments beyond the `keep` lowest out of the free list (to punch
    /// them: give their space back to the file system); [`Log::release`] returns them.
    /// Segments punched already are left alone.
    pub fn take_surplus(&mut self, keep: usize) -> Vec<u64> {
        let surplus: Vec<u64> =
            self.free.iter().copied().skip(keep).filter(|s| !self.holes.contains(s)).collect();
        for s in &surplus {
            self.free.remove(s);
        }
        surplus
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
        let w = LogWrite { volume, lba, vba, data };
        let blocks = w.blocks();
        let pba = self.alloc(blocks as u64);
        let pba = slot32(pba, blocks)?;
        self.write_slots(data, u64::from(pba))?;
        let record = w.record(pba);
        self.append(record.clone())?;
        Ok(record)
    }

    /// Appends several writes (each as [`Log::write`] takes it) with the effect of `write`
    /// for each in turn, and returns their records in order: every write's blocks go in
    /// with one `write_vectored_at` per stretch of consecutive slots, then the records into
    /// the open journal slot, which is written once (a slot that fills on the way is
    /// written whole before the next is started, as `append` does). So the data is always
    /// written before any record naming it, and a torn rewrite costs only unsynced records,
    /// exactly as for the writes one by one. Slots are refused (ENOSPC) before anything is
    /// written. An empty batch writes nothing; a batch of one is [`Log::write`] (a
    /// `pwrite` costs a little less than a `pwritev` and the batch's bookkeeping).
    pub fn write_many(&mut self, writes: &[LogWrite<'_>]) -> io::Result<Vec<Record>> {
        match writes {
            [] => return Ok(Vec::new()),
            [w] => return Ok(vec![self.write(w.volume, w.lba, w.vba, w.data)?]),
            _ => {}
        }
        let mut placed = Vec::with_capacity(writes.len());
        for w in writes {
            let pba = self.alloc(w.blocks() as u64);
            placed.push((pba, w.data));
        }
        let pbas = placed
            .iter()
            .map(|(pba, data)| slot32(*pba, data.len() / SLOT_BYTES))
            .collect::<io::Result<Vec<u32>>>()?;
        self.write_runs(&placed)?;
        let mut records = Vec::with_capacity(writes.len());
        for (w, pba) in writes.iter().zip(pbas) {
            let record = w.record(pba);
            self.push(&record)?;
            records.push(record);
        }
        self.write_open()?;
        Ok(records)
    }

    /// Writes each `(slot, blocks)` of `placed` (in allocation order), one
    /// `write_vectored_at` per stretch of consecutive slots.
    fn write_runs(&mut self, placed: &[(u64, &[u8])]) -> io::Result<()> {
        let mut rest = placed;
        while let Some((start, _)) = rest.first() {
            let mut end = *start;
            let mut bufs = Vec::new();
            while let Some(((slot, data), after)) = rest.split_first().filter(|(r, _)| r.0 == end) {
                bufs.push(*data);
                end = slot + (data.len() / SLOT_BYTES) as u64;
                rest = after;
            }
            self.file.write_vectored_at(&bufs, offset(*start))?;
            self.file_end = self.file_end.max(end);
        }
        Ok(())
    }

    /// Copies blocks (the cleaner): `data` is the blocks of VBAs `vba..`, whose crcs are
    /// `crcs` (kept as they are, even for a block that fails its crc: a move never
    /// repairs or hides damage). Returns the `Move` record it logged.
    pub fn move_blocks(&mut self, vba: u64, data: &[u8], crcs: Vec<u32>) -> io::Result<Record> {
        let blocks = crcs.len();
        assert!((1..=RUN_BLOCKS_MAX).contains(&blocks) && data.len() == blocks * SLOT_BYTES);
        let pba = self.alloc(blocks as u64);
        let pba32 = slot32(pba, blocks)?;
        self.write_slots(data, pba)?;
        let record = Record::Move { vba, pba: pba32, crcs };
        self.append(record.clone())?;
        Ok(record)
    }

    /// Appends a record that carries no data (trim, zero).
    pub fn append(&mut self, record: Record) -> io::Result<()> {
        self.push(&record)?;
        self.write_open()
    }

    /// Adds `record` to the open slot (in memory: the caller then writes the slot). When
    /// the slot is full, it is complete: written as it stands (unless it already was), and
    /// the record goes to the next one.
    fn push(&mut self, record: &Record) -> io::Result<()> {
        if !self.open.push(record) {
            if self.open_pending {
                self.write_open()?;
            }
            self.advance()?;
            assert!(self.open.push(record), "a record fits an empty slot");
        }
        self.open_pending = true;
        self.open_changes |= !matches!(record, Record::Durable { .. });
        Ok(())
    }

    /// Starts this run on disk: its first slot is written, empty, and synced, so whatever
    /// a crash left at its place (a torn or stale slot of the dead tail) can never be read
    /// as part of the chain again, even if this run's first rewrite of it is lost. Call
    /// once after opening, before appending (not for a read-only inspection).
    pub fn start_run(&mut self) -> io::Result<()> {
        // What replay decided, so that no later replay decides otherwise.
        if let Some((from, through)) = self.judged.take() {
            self.open.push(&Record::Durable { from, through });
        }
        if let Some((sequence, index)) = self.truncate_at.take() {
            self.open.push(&Record::Truncate { sequence, index });
        }
        // Sealed at once: a torn rewrite must never cost these decisions.
        self.zero(self.next_at)?;
        self.write_open()?;
        self.advance()?;
        self.file.sync()
    }

    /// Writes the open slot: whole the first time, then only its header and records,
    /// which grow at the end (each write's record rewrote 4 KiB before: half of what a
    /// 4 KiB write cost the page cache). A torn rewrite is as before: the old header
    /// (whose checksum covers only the old records, unchanged) or a slot that fails its
    /// checksum, which costs only records never synced (invariant 1).
    fn write_open(&mut self) -> io::Result<()> {
        self.open_pending = false;
        let bytes = self.open.encode();
        self.open_crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if self.open_written {
            let used = self.open.encoded_bytes();
            self.file.write_at(&bytes[..used], offset(self.open_at))
        } else {
            self.write_slots(&bytes[..], self.open_at)?;
            self.open_written = true;
            Ok(())
        }
    }

    /// Writes whole slots from `slot`, keeping track of the file's end.
    fn write_slots(&mut self, data: &[u8], slot: u64) -> io::Result<()> {
        self.file.write_at(data, offset(slot))?;
        self.file_end = self.file_end.max(slot + (data.len() / SLOT_BYTES) as u64);
        Ok(())
    }

    /// Moves on to the reserved journal slot and reserves the one after it.
    fn advance(&mut self) -> io::Result<()> {
        debug_assert!(!self.open_pending, "a slot is written whole before the next begins");
        let reserved = self.reserve()?;
        self.open_sequence += 1;
        self.open_at = self.next_at;
        self.next_at = reserved;
        self.open = SlotWriter::new(self.open_sequence, self.next_at)
            .in_run(self.run_from)
            .after(self.open_crc);
        self.open_changes = false;
        self.open_written = false;
        Ok(())
    }

    /// Makes everything appended so far durable: seals the open journal slot, syncs, and
    /// notes the sync in the journal.
    pub fn flush(&mut self) -> io::Result<()> {
        let through = self.seal()?;
        self.file.sync()?;
        self.synced(through)
    }

    /// Seals the open journal slot (if it holds records) so that a sync started now covers
    /// a slot that is never rewritten: records appended from now on go to the next slot.
    /// Returns the sequence of the last sealed slot, for [`Log::synced`] once the sync is
    /// done. `seal`, a sync of [`Log::file`], then `synced` is `flush` split in three, so
    /// that the sync can run without the caller's lock while writes continue.
    pub fn seal(&mut self) -> io::Result<u64> {
        // A slot holding only `Durable` notes needs no seal: nothing in it was promised.
        if self.open_changes {
            self.advance()?;
        }
        Ok(self.open_sequence - 1)
    }

    /// Records that a sync covered every journal slot up to `through`: replay then knows
    /// that a record there whose data fails its crc is damage, not a torn tail.
    ///
    /// The note is written at once (into the page cache): it does not wait for a later
    /// record, so that damage found after a crash is reported, not taken for a torn tail.
    pub fn synced(&mut self, through: u64) -> io::Result<()> {
        if through > self.durable_through {
            self.durable_through = through;
            self.append(Record::Durable { from: self.run_from, through })?;
        }
        Ok(())
    }

    /// One past the last slot ever handed out: the file's extent in slots.
    pub fn slots_end(&self) -> u64 {
        self.fresh * SEGMENT_SLOTS
    }

    /// Free segments not punched in this run: they hold file-system space the log can
    /// write into without the file system giving more (punched ones at open count too:
    /// the store punches every free segment when it opens).
    pub fn backed_free_segments(&self) -> u64 {
        self.free.iter().filter(|s| !self.holes.contains(s)).count() as u64
    }

    /// Segments in use (handed out and not free).
    pub fn segments_in_use(&self) -> u64 {
        self.fresh - self.free.len() as u64
    }

    /// Reads `buf.len() / 4096` consecutive slots from `slot` and checks each against its
    /// crc in `crcs`; returns the index of the first block that fails, if any.
    pub fn read_run(&self, slot: u64, crcs: &[u32], buf: &mut [u8]) -> io::Result<Option<usize>> {
        debug_assert_eq!(buf.len(), crcs.len() * SLOT_BYTES);
        self.file.read_at(buf, offset(slot))?;
        Ok(buf.chunks(SLOT_BYTES).zip(crcs).position(|(b, crc)| crc32c::crc32c(b) != *crc))
    }

    /// Like [`Log::read_run`], but returns `None` instead of waiting for the device.
    pub fn read_run_nowait(
        &self,
        slot: u64,
        crcs: &[u32],
        buf: &mut [u8],
    ) -> io::Result<Option<Option<usize>>> {
        if !self.file.read_at_nowait(buf, offset(slot))? {
            return Ok(None);
        }
        Ok(Some(buf.chunks(SLOT_BYTES).zip(crcs).position(|(b, crc)| crc32c::crc32c(b) != *crc)))
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
