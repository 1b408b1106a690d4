//! The properties every seed is checked for.
//!
//! **Check 1, the durability contract as a per-block register** (DESIGN, Qualities:
//! a write's reply means it is held by every ACTIVE copy so that a process crash, or the
//! loss of every node but one holding an ACTIVE copy, cannot lose it; a FLUSH/FUA reply
//! means it is synced on every ACTIVE copy, so even a power loss of every node keeps
//! it). Precisely: a value `v` of block `b` (a write's id, or the initial zero) may be
//! observed by a read from `t` to `u` (the final state: `t = u` = the end) unless `v`
//! had not started by `u`, or no write to `b` carried it, or some write `p` of `b`
//! *must be visible* at `t` and superseded `v` (`v` is the initial zero, or was
//! acknowledged and ended before `p` started; a write that failed or got no answer is
//! never superseded: it may land any time, or never). A write `p` acknowledged before
//! `t` must be visible at `t` unless it may have been lost: every node whose ACTIVE copy
//! held it at its reply (ghost state from the owner) was *gone* at some point in
//! `(p.start, bound)` — gone meaning a machine crash (its unsynced writes may be lost)
//! or a STALE mark recorded for its copy (it no longer counts). `bound` is the start
//! of the first acknowledged FLUSH that started after `p`'s reply and ended before `t`
//! (from then on `p` is synced on every ACTIVE copy: nothing may lose it), `p`'s start
//! if `p` was a FUA write, else `u` (a loss while the read is under way may show in it).
//!
//! **Check 2**: after healing, every ACTIVE component equals the owner's.
//! **Check 3**: no component applied a request stamped with an epoch below one it had
//! applied before (`Shared::applied_at`, ghost state a crash does not reset).
//! **Check 4**: bytes resync copied from bitmaps ≤ 1.25 × the region bytes the bitmaps
//! marked (reported with the bytes digest scans copied).
//! **Check 5**: the protocol core's own invariants (`OwnerState::validate`, O1–O4 of
//! `docs/design/replication.md`) held after every step the owner views took
//! (`view.rs`'s `Checked`).

use crate::model::{Event, Op, Outcome, Shared};
use std::collections::BTreeMap;
use tokio::time::Duration;

/// What is known of one block's writes.
struct Write {
    value: u64,
    start: Duration,
    end: Duration,
    acked: bool,
    fua: bool,
}

/// The history, indexed for check 1.
pub struct Register {
    writes: BTreeMap<u64, Vec<Write>>,
    /// Acknowledged flushes: (start, end).
    flushes: Vec<(Duration, Duration)>,
    /// When each node was gone (a machine crash or a STALE mark).
    gone: Vec<(Duration, usize)>,
    holders: BTreeMap<u64, Vec<usize>>,
}

impl Register {
    pub fn new(history: &[Event], sh: &Shared) -> Register {
        let mut writes: BTreeMap<u64, Vec<Write>> = BTreeMap::new();
        let mut flushes = Vec::new();
        for e in history {
            match e.op {
                Op::Write { block, value, fua } => writes.entry(block).or_default().push(Write {
                    value,
                    start: e.start,
                    end: e.end,
                    acked: e.outcome == Outcome::Ok,
                    fua,
                }),
                Op::Flush if e.outcome == Outcome::Ok => flushes.push((e.start, e.end)),
                _ => {}
            }
        }
        let mut gone = sh.lossy_crashes.borrow().clone();
        gone.extend(sh.stale_marks.borrow().iter().copied());
        Register { writes, flushes, gone, holders: sh.holders.borrow().clone() }
    }

    /// Whether `p` must be visible to a read from `t` to `until` (a loss before the read
    /// ends may show in it).
    fn must_be_visible(&self, p: &Write, t: Duration, until: Duration) -> bool {
        if !p.acked || p.end >= t {
            return false;
        }
        let flush =
            self.flushes.iter().filter(|(s, e)| *s > p.end && *e < t).map(|(s, _)| *s).min();
        let bound = if p.fua { p.start } else { flush.unwrap_or(until) };
        let none = Vec::new();
        let holders = self.holders.get(&p.value).unwrap_or(&none);
        let lost = !holders.is_empty()
            && holders
                .iter()
                .all(|h| self.gone.iter().any(|(at, n)| n == h && *at >= p.start && *at < bound));
        !lost
    }

    /// Why value `v` of `block` may not be observed by a read from `t` to `until`
    /// (both the end of the run for the final state), if it may not.
    pub fn check(&self, block: u64, v: u64, t: Duration, until: Duration) -> Option<String> {
        let none = Vec::new();
        let writes = self.writes.get(&block).unwrap_or(&none);
        let found = writes.iter().find(|w| w.value == v);
        if v != 0 && found.is_none() {
            return Some(format!("block {block} holds {v}, which no write to it carried"));
        }
        if found.is_some_and(|w| w.start >= until) {
            return Some(format!("block {block} holds write {v}, which had not started"));
        }
        // `v` superseded: the initial zero, or acknowledged and ended before `p` started.
        let superseded_by = |p: &Write| match found {
            None => true,
            Some(w) => w.acked && w.end < p.start,
        };
        let p = writes
            .iter()
            .find(|p| p.value != v && superseded_by(p) && self.must_be_visible(p, t, until))?;
        // The flush that bounds it (the earliest to start after its reply), as above.
        let flush = self.flushes.iter().filter(|(s, e)| *s > p.end && *e < t).min();
        let holders = self.holders.get(&p.value).cloned().unwrap_or_default();
        Some(format!(
            "block {block} at {}ms holds {} but write {} (started {}ms, acked {}ms{}, flush \
             {flush:?}, held by nodes {holders:?}) must be visible",
            t.as_millis(),
            if v == 0 { "nothing".to_string() } else { format!("write {v}") },
            p.value,
            p.start.as_millis(),
            p.end.as_millis(),
            if p.fua { ", FUA" } else { "" },
        ))
    }
}
