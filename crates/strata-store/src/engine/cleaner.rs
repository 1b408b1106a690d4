//! The cleaner: empties segments whose blocks mostly died by copying their live blocks to
//! the head of the log. Only the VBA map changes (a `Move` record per run of VBAs); no tree
//! is touched, so snapshots and clones sharing a block share its new place too. A segment
//! left with no live block is freed by the next checkpoint (see `checkpoint.rs`).
//!
//! Invariants:
//! 1. A moved block keeps its bytes and its crc, even a damaged one: a move never repairs
//!    or hides damage, and a read of it still fails its checksum.
//! 2. The old copy stays readable until a checkpoint taken after the move is durable (the
//!    segment is punched only then), so a crash before that replays to either place.
//! 3. Segments the log is writing into are never cleaned.

use super::{Engine, EngineError, BLOCK_BYTES};
use crate::log::{RUN_BLOCKS_MAX, SEGMENT_SLOTS};
use strata_io::sim::RawFile;

impl<F: RawFile> Engine<F> {
    /// Segments worth cleaning: at most `max_live` live blocks (and at least one: empty
    /// ones need only a checkpoint), not being written, emptiest first.
    pub fn clean_candidates(&self, max_live: u32) -> Vec<u64> {
        let busy = self.log.busy_segments();
        let mut candidates: Vec<(u32, u64)> = self
            .vba_map
            .live
            .iter()
            .filter(|(s, live)| **live <= max_live && !busy.contains(s))
            .map(|(s, live)| (*live, *s))
            .collect();
        candidates.sort_unstable();
        candidates.into_iter().map(|(_, s)| s).collect()
    }

    /// Live blocks in each segment holding any (a segment absent holds none).
    pub fn live_by_segment(&self) -> std::collections::HashMap<u64, u32> {
        self.vba_map.live.clone()
    }

    /// Whether the log is writing into `segment` (the cleaner leaves it alone).
    pub fn is_busy(&self, segment: u64) -> bool {
        self.log.busy_segments().contains(&segment)
    }

    /// Live blocks in `segment`.
    pub fn live_blocks(&self, segment: u64) -> u32 {
        self.vba_map.live.get(&segment).copied().unwrap_or(0)
    }

    /// Moves up to `budget` live blocks out of `segment`; returns how many it moved (0
    /// when the segment holds no live block or is being written).
    pub fn clean_step(&mut self, segment: u64, budget: usize) -> Result<usize, EngineError> {
        if self.log.busy_segments().contains(&segment) {
            return Ok(0);
        }
        let mut vbas = self.vba_map.live_in(segment);
        vbas.sort_unstable();
        vbas.truncate(budget);
        let mut moved = 0;
        let mut i = 0;
        while i < vbas.len() {
            // A run of consecutive VBAs, at most one record's worth.
            let mut run = 1;
            while i + run < vbas.len()
                && run < RUN_BLOCKS_MAX
                && vbas[i + run] == vbas[i] + run as u64
            {
                run += 1;
            }
            let mut data = vec![0u8; run * BLOCK_BYTES];
            let mut crcs = Vec::with_capacity(run);
            for (k, chunk) in data.chunks_mut(BLOCK_BYTES).enumerate() {
                let place = *self.vba_map.get(&(vbas[i] + k as u64)).expect("collected live");
                self.log.file().read_at(chunk, place.slot * BLOCK_BYTES as u64)?;
                crcs.push(place.crc);
            }
            let record = self.log.move_blocks(vbas[i], &data, crcs)?;
            self.apply(&record);
            moved += run;
            i += run;
        }
        debug_assert!(moved == 0 || self.live_blocks(segment) < SEGMENT_SLOTS as u32);
        Ok(moved)
    }
}
