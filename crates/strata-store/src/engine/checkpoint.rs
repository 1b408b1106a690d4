//! Checkpoints: the engine's whole state (views, VBA map, trees, and where the log's
//! replay starts and how it was allocating), saved so that reopening replays only the log
//! written since, and so that the cleaner's freed segments can be reused.
//!
//! ```text
//! 0   8  magic "STRATAK1"
//! 8   4  format version (1)
//! 12  4  crc32c of bytes 16..16+length
//! 16  8  length of the body
//! 24  …  body (little-endian):
//!        next_vba u64
//!        log start: at u64, sequence u64, head u64, head_end u64, fresh u64,
//!                   free count u64, free segments u64…
//!        views u64, then per view: id u64, tree u64, size u64, older u64 (0 = none,
//!                   else id + 1), kind u8 (1 volume, 2 snapshot),
//!                   volume: snapshots u64, ids u64…; snapshot: volume u64, watermark u64
//!        VBA map u64, then per entry: vba u64, slot u64, crc32c u32
//!        the forest (strata_blockmap::Forest::save)
//! ```
//!
//! Invariants:
//! 1. A checkpoint is written only after the log is synced through the state it holds:
//!    every block its VBA map names is durable.
//! 2. Replay starts at the journal slot opened by the seal that preceded the capture, so
//!    no record is applied twice or missed.
//! 3. Segments found empty at the capture are not free in the checkpoint: they become
//!    free (reusable) only once the checkpoint is durable, and are listed free from the
//!    next checkpoint on. (A reused segment may hold anything: the log zeroes each slot it
//!    reserves for a journal slot, so stale bytes are never read as the chain.)
//! 4. Loading refuses anything malformed (checksum, lengths, a forest that fails
//!    validation) with an error; it never panics on the bytes.

use super::{Engine, EngineError, Place, VbaMap, View, ViewKind};
use crate::log::{Log, Start, SEGMENT_SLOTS};
use std::collections::{BTreeSet, HashMap};
use strata_blockmap::{Forest, TreeId};
use strata_io::sim::RawFile;

const MAGIC: &[u8; 8] = b"STRATAK1";
const VERSION: u32 = 1;
const HEADER_BYTES: usize = 24;

/// A captured checkpoint, to be written durably by the caller.
pub struct Checkpoint {
    /// The file's bytes.
    pub bytes: Vec<u8>,
    /// Segments to release once the checkpoint is durable.
    pub empty_segments: Vec<u64>,
}

fn put(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn bad(what: &str) -> EngineError {
    EngineError::BadCheckpoint(what.to_owned())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u64(&mut self) -> Result<u64, EngineError> {
        let end = self.at + 8;
        let b = self.bytes.get(self.at..end).ok_or_else(|| bad("truncated"))?;
        self.at = end;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    fn u32(&mut self) -> Result<u32, EngineError> {
        let end = self.at + 4;
        let b = self.bytes.get(self.at..end).ok_or_else(|| bad("truncated"))?;
        self.at = end;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    fn u8(&mut self) -> Result<u8, EngineError> {
        let b = *self.bytes.get(self.at).ok_or_else(|| bad("truncated"))?;
        self.at += 1;
        Ok(b)
    }
    /// A count that cannot exceed the bytes left (each item takes at least `min` bytes).
    fn count(&mut self, min: usize) -> Result<usize, EngineError> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.at) / min.max(1);
        usize::try_from(n).ok().filter(|n| *n <= left).ok_or_else(|| bad("count too large"))
    }
}

impl<F: RawFile> Engine<F> {
    /// Captures a checkpoint: seals the open journal slot, then saves the state. The
    /// caller must sync the log, then write the bytes durably, then release
    /// `empty_segments` ([`Engine::release_segments`]).
    pub fn checkpoint(&mut self) -> Result<Checkpoint, EngineError> {
        self.log.seal()?;
        let start = self.log.start();
        let empty_segments = self.empty_segments();
        let mut body = Vec::new();
        put(&mut body, self.next_vba);
        for v in [start.at, start.sequence, start.head, start.head_end, start.fresh] {
            put(&mut body, v);
        }
        put(&mut body, start.free.len() as u64);
        for s in &start.free {
            put(&mut body, *s);
        }
        let mut ids: Vec<&u64> = self.views.keys().collect();
        ids.sort_unstable();
        put(&mut body, ids.len() as u64);
        for id in ids {
            let view = &self.views[id];
            for v in [*id, view.tree.0, view.size, view.older.map_or(0, |o| o + 1)] {
                put(&mut body, v);
            }
            match &view.kind {
                ViewKind::Volume { snapshots } => {
                    body.push(1);
                    put(&mut body, snapshots.len() as u64);
                    for s in snapshots {
                        put(&mut body, *s);
                    }
                }
                ViewKind::Snapshot { volume, watermark } => {
                    body.push(2);
                    put(&mut body, *volume);
                    put(&mut body, *watermark);
                }
            }
        }
        put(&mut body, self.vba_map.len() as u64);
        for (vba, place) in self.vba_map.iter() {
            put(&mut body, *vba);
            put(&mut body, place.slot);
            body.extend_from_slice(&place.crc.to_le_bytes());
        }
        self.forest.save(&mut body);
        let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len());
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        put(&mut bytes, body.len() as u64);
        bytes.extend_from_slice(&body);
        Ok(Checkpoint { bytes, empty_segments })
    }

    /// Segments in use that hold no live block and are not being written: the next
    /// checkpoint frees them.
    pub fn empty_segments(&self) -> Vec<u64> {
        let busy = self.log.busy_segments();
        (0..self.log.start().fresh)
            .filter(|s| !busy.contains(s) && !self.log.is_free(*s))
            .filter(|s| !self.vba_map.live.contains_key(s))
            .collect()
    }

    /// Makes segments a durable checkpoint found empty available to the allocator.
    pub fn release_segments(&mut self, segments: &[u64]) {
        // A segment that got data since the capture cannot be one: the allocator hands
        // out only free and fresh segments, and these were neither.
        for s in segments {
            self.vba_map.forget(*s);
        }
        self.log.release(segments);
    }

    /// Takes free segments beyond the `keep` lowest out of the allocator, to give their
    /// space back to the file system ([`Engine::punch`]), then [`Engine::return_free`].
    pub fn take_surplus_free(&mut self, keep: usize) -> Vec<u64> {
        self.log.take_surplus(keep)
    }

    /// Punches segments out of the log's file (they read as zeroes and cost no space).
    pub fn punch(file: &F, segments: &[u64]) -> std::io::Result<()> {
        let length = file.length_bytes()?;
        for s in segments {
            let from = s * SEGMENT_SLOTS * super::BLOCK_BYTES as u64;
            if from < length {
                let bytes = (SEGMENT_SLOTS * super::BLOCK_BYTES as u64).min(length - from);
                file.punch(from, bytes)?;
            }
        }
        Ok(())
    }

    /// Takes a never-used segment to prepare when fewer than `want` are free (see
    /// [`Engine::prepare`]); return it with [`Engine::prepared`].
    pub fn take_fresh(&mut self, want: usize) -> Option<u64> {
        self.log.take_fresh(want)
    }

    /// Writes zeroes over a segment taken by [`Engine::take_fresh`] and syncs, so that the
    /// file system allocates its blocks now and not on the next flush's critical path.
    pub fn prepare(file: &F, segment: u64) -> std::io::Result<()> {
        let from = segment * SEGMENT_SLOTS * super::BLOCK_BYTES as u64;
        let bytes = SEGMENT_SLOTS * super::BLOCK_BYTES as u64;
        file.zero_fill(from, bytes)?;
        file.sync()
    }

    /// Returns a segment taken by [`Engine::take_fresh`], zeroed or not.
    pub fn prepared(&mut self, segment: u64, zeroed: bool) {
        self.log.prepared(segment, zeroed);
    }

    /// Returns segments taken by [`Engine::take_surplus_free`].
    pub fn return_free(&mut self, segments: &[u64]) {
        self.log.release(segments);
    }

    /// Bytes of free segments that hold file-system space (not punched): log writes
    /// there cost the file system nothing.
    pub fn backed_free_bytes(&self) -> u64 {
        self.log.backed_free_segments() * SEGMENT_SLOTS * super::BLOCK_BYTES as u64
    }

    /// Returns segments taken by [`Engine::take_surplus_free`] once punched (later calls
    /// of it leave them out until they are used again).
    pub fn return_punched(&mut self, segments: &[u64]) {
        self.log.release_punched(segments);
    }

    /// Loads a checkpoint's bytes and replays the log written since.
    pub(super) fn from_checkpoint(file: F, bytes: &[u8]) -> Result<Engine<F>, EngineError> {
        if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
            return Err(bad("not a Strata checkpoint"));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(bad(&format!("format version {version}, this strata reads {VERSION}")));
        }
        let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        let length = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let body = usize::try_from(length)
            .ok()
            .and_then(|l| bytes.get(HEADER_BYTES..HEADER_BYTES.checked_add(l)?))
            .ok_or_else(|| bad("truncated"))?;
        if crc32c::crc32c(body) != crc {
            return Err(bad("checksum mismatch"));
        }
        let mut r = Reader { bytes: body, at: 0 };
        let next_vba = r.u64()?;
        let (at, sequence, head, head_end, fresh) =
            (r.u64()?, r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        // Checked: a checkpoint is untrusted bytes (a fuzzer found `fresh` overflowing).
        // Slots are u32 on disk (16 TiB of log), so every slot named is below 2^32.
        let slots_end = fresh.saturating_mul(SEGMENT_SLOTS);
        let slots_ok = slots_end <= 1 << 32 && at < slots_end;
        // Journal sequences start at 1 and a log never gets near 2^63 of them.
        let sequence_ok = (1..u64::MAX / 2).contains(&sequence);
        if head_end == 0
            || head > head_end
            || head_end > slots_end
            || head_end % SEGMENT_SLOTS != 0
            || !sequence_ok
            || !slots_ok
        {
            return Err(bad("allocator state out of range"));
        }
        let mut free = BTreeSet::new();
        for _ in 0..r.count(8)? {
            let s = r.u64()?;
            if s >= fresh {
                return Err(bad("free segment out of range"));
            }
            free.insert(s);
        }
        let start = Start { at, sequence, head, head_end, free, fresh };
        let mut views = HashMap::new();
        for _ in 0..r.count(33)? {
            let (id, tree, size, older) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
            let kind = match r.u8()? {
                1 => {
                    let mut snapshots = Vec::new();
                    for _ in 0..r.count(8)? {
                        snapshots.push(r.u64()?);
                    }
                    ViewKind::Volume { snapshots }
                }
                2 => ViewKind::Snapshot { volume: r.u64()?, watermark: r.u64()? },
                _ => return Err(bad("unknown view kind")),
            };
            let older = older.checked_sub(1);
            views.insert(id, View { tree: TreeId(tree), size, older, kind });
        }
        let mut vba_map = VbaMap::default();
        for _ in 0..r.count(20)? {
            let (vba, slot, crc) = (r.u64()?, r.u64()?, r.u32()?);
            if slot >= slots_end || vba >= next_vba {
                return Err(bad("VBA map entry out of range"));
            }
            vba_map.insert(vba, Place { slot, crc });
        }
        let (forest, _) = Forest::load(&body[r.at..]).map_err(|e| bad(&e))?;
        // Every view's tree must exist, and every older view be a snapshot.
        for (id, view) in &views {
            if forest.end_lba(view.tree).is_err() {
                return Err(bad(&format!("view {id} names a missing tree")));
            }
            if view.older.is_some_and(|o| {
                !matches!(views.get(&o), Some(View { kind: ViewKind::Snapshot { .. }, .. }))
            }) {
                return Err(bad(&format!("view {id} names a missing older snapshot")));
            }
        }
        let (log, records) = Log::open_from(file, start)?;
        let mut engine = Engine { log, forest, views, vba_map, next_vba, space: None };
        for record in records {
            engine.apply(&record);
        }
        Ok(engine)
    }
}
