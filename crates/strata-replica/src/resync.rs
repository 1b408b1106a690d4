//! The resync plan: how the owner brings a copy level with its own, as steps. The driver
//! asks [`OwnerState::resync_step`] for the next step (holding the volume's exclusive
//! lock, so no client write interleaves), executes it (compare digests, copy what
//! differs, flush) and tells the core what it did ([`OwnerState::levelled`],
//! [`OwnerState::scanned`], [`OwnerState::cleared`], [`OwnerState::recorded`]); a step
//! that fails makes the copy STALE ([`OwnerState::stale`], [`OwnerState::lose_unflushed`]).
//!
//! A copy's course: a STALE copy that answers again is recorded RESYNCING (new writes
//! reach it from then on), then
//! 1. the digest scan it owes, if any, a batch of regions per step ([`ResyncStep::Scan`]);
//! 2. the runs of its bitmap, up to a batch of consecutive regions per step
//!    ([`ResyncStep::Run`]);
//! 3. level: flushed on its node, vouched for and recorded ACTIVE ([`ResyncStep::Flush`]).
//!
//! An ACTIVE copy can owe a scan too (after a change of owner, a scrub): it ends with
//! [`ResyncStep::Done`], its state unchanged.
//!
//! Invariants:
//! - R1. No step levels a copy that failed since its resync began ([`ResyncStep::Stop`]):
//!   a STALE copy's bitmap is not emptied by a resync it is no longer part of (flaw 10 of
//!   the simulation).
//! - R2. Flush comes only when nothing is left (no scan owed, an empty bitmap) and the
//!   copy is still RESYNCING; only then may it be recorded ACTIVE.
//! - R3. The steps cover what the copy lacks: every region of a scan (from where it
//!   stands to the end of the volume), every region of its bitmap.

use crate::mutation::{reopened, Flaw};
use crate::owner::{CopyState, OwnerState};
use std::ops::Range;

/// The next step of a copy's resync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResyncStep {
    /// Compare these regions of the digest scan it owes; copy those that differ; then
    /// [`OwnerState::levelled`] and [`OwnerState::scanned`].
    Scan(Range<u64>),
    /// Compare and copy this run of its bitmap; then [`OwnerState::levelled`] and
    /// [`OwnerState::cleared`] (the bitmap to save).
    Run(Range<u64>),
    /// Level: flush it on its node; if it was reached over the same connection all
    /// along, clear its unflushed regions, vouch for it if [`OwnerState::settled`], and
    /// record it ACTIVE.
    Flush,
    /// A scan of an ACTIVE copy is over: nothing else changes.
    Done,
    /// It failed, or was marked again, since its resync began: stop here; the next round
    /// resyncs it.
    Stop,
}

impl OwnerState {
    /// The next step of copy `i`'s resync, which began with the copy in state `was`
    /// (ACTIVE for a scan only), each step at most `batch` regions.
    pub fn resync_step(&self, i: usize, was: CopyState, batch: u64) -> ResyncStep {
        let batch = batch.max(1);
        if !self.may_level(i, was) {
            return ResyncStep::Stop;
        }
        let t = self.track(i);
        if let Some(from) = t.scan {
            let to = from.saturating_add(batch).min(self.regions());
            if from < to {
                return ResyncStep::Scan(from..to);
            }
        }
        let mut dirty = t.dirty.iter().copied();
        if let Some(first) = dirty.next() {
            let more = dirty
                .take(batch as usize - 1)
                .enumerate()
                .take_while(|(k, r)| *r == first + 1 + *k as u64)
                .count() as u64;
            return ResyncStep::Run(first..first + 1 + more);
        }
        match (was, t.state) {
            (CopyState::Active, _) => ResyncStep::Done,
            (_, CopyState::Resyncing) if t.scan.is_none() => ResyncStep::Flush,
            _ => ResyncStep::Stop,
        }
    }

    /// A [`ResyncStep::Scan`] of copy `i` compared every region below `to`.
    pub fn scanned(&mut self, i: usize, to: u64) {
        let regions = self.regions();
        let t = self.track_mut(i);
        t.scan = (to < regions).then_some(to);
    }

    /// Whether a resync of copy `i`, which began with it in state `was`, may take its
    /// next step: only while the copy is still ACTIVE (a scan of an ACTIVE copy) or
    /// RESYNCING (R1). One that failed between two steps is STALE: levelled on, its bitmap
    /// would be emptied while what the steps copied counts only as unflushed, which a
    /// STALE copy's restart does not put back (flaw 10 of the simulation); it waits for
    /// the next resync, which makes it RESYNCING first.
    pub fn may_level(&self, i: usize, was: CopyState) -> bool {
        if reopened(Flaw::LevelWhileStale) {
            return true;
        }
        match was {
            CopyState::Active => self.track(i).state == CopyState::Active,
            _ => self.track(i).state == CopyState::Resyncing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::owner::Track;

    /// Owner on node 1, a RESYNCING copy on node 2, over 16 regions.
    fn state() -> OwnerState {
        let tracks = vec![
            Track::new(1, 10, true, CopyState::Active),
            Track::new(2, 20, false, CopyState::Resyncing),
        ];
        OwnerState::new(1, 1, 16, tracks)
    }

    #[test]
    fn a_scan_comes_first_then_the_bitmaps_runs_then_the_flush() {
        let mut st = state();
        st[1].scan = Some(10);
        st[1].dirty.extend([2, 3, 4, 9]);
        assert_eq!(st.resync_step(1, CopyState::Stale, 4), ResyncStep::Scan(10..14));
        st.scanned(1, 14);
        assert_eq!(st.resync_step(1, CopyState::Stale, 4), ResyncStep::Scan(14..16));
        st.scanned(1, 16);
        assert_eq!(st[1].scan, None);
        // Runs of consecutive regions, at most a batch each.
        assert_eq!(st.resync_step(1, CopyState::Stale, 2), ResyncStep::Run(2..4));
        let _ = st.cleared(1, 2..4);
        assert_eq!(st.resync_step(1, CopyState::Stale, 2), ResyncStep::Run(4..5));
        let _ = st.cleared(1, 4..5);
        assert_eq!(st.resync_step(1, CopyState::Stale, 2), ResyncStep::Run(9..10));
        let _ = st.cleared(1, 9..10);
        assert_eq!(st.resync_step(1, CopyState::Stale, 2), ResyncStep::Flush);
    }

    #[test]
    fn a_copy_that_failed_meanwhile_is_not_levelled_on() {
        let mut st = state();
        st[1].dirty.insert(5);
        assert_eq!(st.resync_step(1, CopyState::Stale, 8), ResyncStep::Run(5..6));
        st.stale(1);
        assert_eq!(st.resync_step(1, CopyState::Stale, 8), ResyncStep::Stop);
        // Nor is a scanned ACTIVE copy that failed.
        let mut st = state();
        st[1].state = CopyState::Active;
        st[1].scan = Some(0);
        assert_eq!(st.resync_step(1, CopyState::Active, 8), ResyncStep::Scan(0..8));
        st.stale(1);
        assert_eq!(st.resync_step(1, CopyState::Active, 8), ResyncStep::Stop);
    }

    #[test]
    fn a_scanned_active_copy_is_done_not_flushed_and_activated() {
        let mut st = state();
        st[1].state = CopyState::Active;
        st[1].scan = Some(12);
        assert_eq!(st.resync_step(1, CopyState::Active, 8), ResyncStep::Scan(12..16));
        st.scanned(1, 16);
        assert_eq!(st.resync_step(1, CopyState::Active, 8), ResyncStep::Done);
    }

    #[test]
    fn the_steps_cover_every_region_it_lacks() {
        // R3, for every bitmap and scan start over 16 regions and a few batch sizes.
        for bits in [0u32, 1, 0b1011_0110_0000_0001, 0xffff, 0x8000, 0x0f0f] {
            for scan in [None, Some(0), Some(7), Some(15)] {
                for batch in [1, 3, 16] {
                    let mut st = state();
                    st[1].dirty.extend((0..16).filter(|r| bits & 1 << r != 0));
                    st[1].scan = scan;
                    let mut scanned = Vec::new();
                    let mut copied = Vec::new();
                    let mut steps = 0;
                    loop {
                        steps += 1;
                        assert!(steps < 100, "the steps end");
                        match st.resync_step(1, CopyState::Stale, batch) {
                            ResyncStep::Scan(r) => {
                                assert!(r.end - r.start <= batch);
                                scanned.extend(r.clone());
                                st.scanned(1, r.end);
                            }
                            ResyncStep::Run(r) => {
                                assert!(r.end - r.start <= batch);
                                copied.extend(r.clone());
                                let _ = st.cleared(1, r);
                            }
                            ResyncStep::Flush => break,
                            other => panic!("{other:?}"),
                        }
                    }
                    let want: Vec<u64> = scan.map_or(vec![], |s| (s..16).collect());
                    assert_eq!(scanned, want, "bits {bits:b} scan {scan:?} batch {batch}");
                    let want: Vec<u64> = (0..16).filter(|r| bits & 1 << r != 0).collect();
                    assert_eq!(copied, want, "bits {bits:b} scan {scan:?} batch {batch}");
                }
            }
        }
    }
}
