//! A linearizability checker for histories of one compare-and-swap register (keys are
//! independent, so a history of many keys is checked key by key). The simulation and the
//! real-process tests of the metadata service record every client operation's call,
//! its result and when it started and ended, and ask whether some order of the
//! operations, each taking effect at one instant between its start and its end, explains
//! every result.
//!
//! The search is Wing & Gong's, with Lowe's memoization: linearize, one at a time, any
//! operation that started before every not-yet-linearized completed operation ended;
//! remember (set of linearized operations, register value) pairs already explored.
//! An operation whose outcome is unknown (the client timed out) may take effect at any
//! time after its start, or never.
//!
//! Values are `u64`; 0 stands for "absent". Tests make every written value unique, so a
//! read names the write it saw.

use std::collections::HashSet;

/// What a client asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// Read the value.
    Read,
    /// Set the value.
    Write(u64),
    /// Set `to` if the value is `from`.
    Cas {
        /// The expected value.
        from: u64,
        /// The new value.
        to: u64,
    },
}

/// What the client got back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A read's value.
    Read(u64),
    /// The write or CAS took effect.
    Done,
    /// The CAS found another value and changed nothing.
    Failed,
    /// No answer (timeout, lost connection): it may or may not have taken effect.
    Unknown,
}

/// One operation of a history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operation {
    /// The call.
    pub call: Call,
    /// The outcome.
    pub outcome: Outcome,
    /// When the client sent it.
    pub start: u64,
    /// When the client got the outcome (ignored for `Unknown`).
    pub end: u64,
}

/// Steps of the search before giving up (a history this hard is a test-design problem).
const STEPS_MAX: u64 = 5_000_000;

/// Whether `history` (one register, initially absent) is linearizable. On failure the
/// error says which operations could not be placed.
pub fn check(history: &[Operation]) -> Result<(), String> {
    // Unknown reads constrain nothing.
    let ops: Vec<Operation> = history
        .iter()
        .copied()
        .filter(|op| !(op.outcome == Outcome::Unknown && op.call == Call::Read))
        .collect();
    for op in &ops {
        if op.outcome != Outcome::Unknown && op.end < op.start {
            return Err(format!("{op:?} ends before it starts"));
        }
    }
    // The search recurses once per placed operation: give it a stack to match (a thread
    // of its own; the pages are only touched as deep as it goes).
    let stack = (8 << 20) + ops.len() * 4096;
    let (explored, best) = std::thread::scope(|scope| {
        let search = std::thread::Builder::new().stack_size(stack).spawn_scoped(scope, || {
            let mut search = Search { ops: &ops, seen: HashSet::new(), steps: 0, best: 0 };
            let mut done = vec![false; ops.len()];
            let explored = search.explore(&mut done, 0, 0);
            (explored, search.best)
        });
        search.expect("spawn the checker's thread").join().expect("the checker panicked")
    });
    match explored {
        Some(true) => Ok(()),
        Some(false) => Err(format!(
            "not linearizable: at most {} of the {} completed operations can be placed",
            best,
            ops.iter().filter(|o| o.outcome != Outcome::Unknown).count()
        )),
        None => Err(format!("gave up after {STEPS_MAX} steps (history too concurrent)")),
    }
}

struct Search<'a> {
    ops: &'a [Operation],
    seen: HashSet<(Vec<bool>, u64)>,
    steps: u64,
    best: usize,
}

impl Search<'_> {
    /// Some(true) if the rest can be linearized from `value`; None if out of steps.
    fn explore(&mut self, done: &mut Vec<bool>, value: u64, placed: usize) -> Option<bool> {
        self.steps += 1;
        if self.steps > STEPS_MAX {
            return None;
        }
        self.best = self.best.max(placed);
        // Finished when every operation with a known outcome is placed.
        let pending_known = self
            .ops
            .iter()
            .zip(done.iter())
            .filter(|(op, d)| !**d && op.outcome != Outcome::Unknown);
        let Some(deadline) = pending_known.map(|(op, _)| op.end).min() else {
            return Some(true);
        };
        if !self.seen.insert((done.clone(), value)) {
            return Some(false);
        }
        for i in 0..self.ops.len() {
            let op = self.ops[i];
            // It must have started before the earliest pending known operation ended.
            if done[i] || op.start > deadline {
                continue;
            }
            let Some(next) = step(op, value) else { continue };
            done[i] = true;
            let result = self.explore(done, next, placed + 1);
            done[i] = false;
            match result {
                Some(false) => {}
                other => return other,
            }
        }
        Some(false)
    }
}

/// The register after `op` takes effect on `value`, if its outcome allows it there.
fn step(op: Operation, value: u64) -> Option<u64> {
    match (op.call, op.outcome) {
        (Call::Read, Outcome::Read(seen)) => (seen == value).then_some(value),
        (Call::Write(v), Outcome::Done | Outcome::Unknown) => Some(v),
        (Call::Cas { from, to }, Outcome::Done) => (from == value).then_some(to),
        (Call::Cas { from, .. }, Outcome::Failed) => (from != value).then_some(value),
        // An unknown CAS placed here must have been able to act; if it could not, it is
        // simply never placed (it changed nothing).
        (Call::Cas { from, to }, Outcome::Unknown) => (from == value).then_some(to),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
