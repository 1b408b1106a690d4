//! Who takes a replicated volume, and when: the steward's decisions as pure functions of
//! what a node sees in the metadata service and of time (invariants 2, 5 and 11 of
//! `docs/design/replication.md`). Each node's steward calls [`decide`] for every volume
//! every `Timing::steward_every`; the server executes a `Take::Now` (the owner key by
//! CAS, then fencing), the simulation runs the same function.
//!
//! Rules:
//! - T1. An ownerless volume goes to its last owner first, then to each other node with an
//!   ACTIVE copy, `takeover_step` apart, in the record's order; only nodes that are up
//!   count. A node whose copy is suspect (back from a power loss) comes after every node
//!   whose copy is not; the suspect keep their order, so that after a power loss of every
//!   node they do not all wait for each other.
//! - T2. A suspect copy never takes the volume while another member holds an ACTIVE copy
//!   not known to be suspect too ([`Truth::Elsewhere`]).
//! - T3. An owned volume is taken only by a move to this node (an operator's or the
//!   automatic one), never by a node whose copy is suspect; this node's own owner key
//!   (the view lost, e.g. after a restart) is taken again at once, unless a move to
//!   another node that is up is pending, for at most `move_wait`.
//! - T4. A view is superseded when the owner key names a newer epoch, or names no owner
//!   `ownerless_grace` after the take (the member's state may lag the take's CAS).
//! - T5. A take whose own copy is suspect (T2 let it: every ACTIVE copy lost power) is
//!   marked in the record (`VolumeRecord::lost_at`, its epoch): writes acknowledged
//!   before it and not synced may be gone, so a FLUSH that started at an earlier epoch,
//!   retried at this owner by a forwarder, fails instead of saying they are durable
//!   ([`lost_mark`], [`flush_survives`]; flaw 12 of the simulation). A flush began no
//!   later than the oldest write it covers that a serving node acknowledged: its `since`
//!   is that write's epoch (the epoch of the owner that acknowledged it) if older than
//!   the epoch the node knows when the flush arrives ([`Unflushed`]). A flush failed for
//!   that has said so, once: the next one is not failed for the same writes.

use crate::mutation::{reopened, Flaw};
use crate::owner::{CopyState, Time};
use crate::timing::Timing;
use std::collections::{BTreeMap, BTreeSet};

/// Whom a suspect copy on this node must leave the volume to (T2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Truth {
    /// A member other than this node holds an ACTIVE copy not known to be suspect (its
    /// node down, or up with no mark published): it may hold writes this copy lost.
    Elsewhere,
    /// Every other member's ACTIVE copy is suspect too, and up (every node lost power).
    AllSuspect,
    /// No other member holds an ACTIVE copy.
    Nowhere,
}

/// A volume as one node's steward sees it.
#[derive(Clone, Debug)]
pub struct Seen {
    /// This node.
    pub me: u64,
    /// The record's last owner.
    pub last_owner: u64,
    /// Each copy's node and state, in the record's order.
    pub copies: Vec<(u64, CopyState)>,
    /// The owner key's node, if there is one.
    pub owner: Option<u64>,
    /// The node a pending move names, if any.
    pub moving_to: Option<u64>,
    /// Nodes whose sessions are up.
    pub up: BTreeSet<u64>,
    /// Nodes that published their copy of this volume as suspect.
    pub suspect: BTreeSet<u64>,
    /// This node's copy is suspect (its own mark, published or not).
    pub me_suspect: bool,
}

impl Seen {
    /// Whether this node's copy is ACTIVE in the record.
    pub fn active_here(&self) -> bool {
        self.copies.iter().any(|(n, s)| *n == self.me && *s == CopyState::Active)
    }
}

/// What one node's steward remembers of one volume between passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// Since when it has seen the volume ownerless.
    pub ownerless_since: Option<Time>,
    /// Since when a move away from this node has been pending while it holds the key.
    pub moving_away_since: Option<Time>,
    /// It said it waits for another copy's node (T2), so as to say it once.
    pub waiting_for_truth: bool,
}

impl Memory {
    /// Forgets what `seen` ends: an ownerless streak once there is an owner, a pending
    /// move away once none is pending. Called on every pass, whether or not the node
    /// decides anything (it may be serving the volume).
    pub fn observe(&mut self, seen: &Seen) {
        if seen.owner.is_some() {
            self.ownerless_since = None;
        }
        if seen.moving_to.is_none_or(|m| m == seen.me) {
            self.moving_away_since = None;
        }
    }
}

/// The steward's decision for one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Take it now.
    Now,
    /// Not now (not this node's turn, or nothing to do).
    NotYet,
    /// Not while another member's copy may hold writes this one lost (T2); `first` is
    /// set the first time, to say so once.
    WaitForTruth {
        /// The first pass that waits.
        first: bool,
    },
}

/// [`Truth`] for a suspect copy on `me`: `members` are the cluster's members.
pub fn truth_for_suspect(seen: &Seen, members: &BTreeSet<u64>) -> Truth {
    let mut others = seen
        .copies
        .iter()
        .filter(|(n, s)| *n != seen.me && *s == CopyState::Active && members.contains(n));
    let mut any = false;
    let all_suspect = others.all(|(n, _)| {
        any = true;
        seen.up.contains(n) && seen.suspect.contains(n)
    });
    match (any, all_suspect) {
        (false, _) => Truth::Nowhere,
        (true, true) => Truth::AllSuspect,
        (true, false) => Truth::Elsewhere,
    }
}

/// The order in which up nodes take an ownerless volume (T1).
pub fn line(seen: &Seen) -> Vec<u64> {
    let mut line = vec![seen.last_owner];
    line.extend(
        seen.copies
            .iter()
            .filter(|(n, s)| *s == CopyState::Active && *n != seen.last_owner)
            .map(|(n, _)| *n),
    );
    line.retain(|n| seen.up.contains(n));
    let marked = |n: &u64| {
        !reopened(Flaw::PowerLoss)
            && (seen.suspect.contains(n) || (*n == seen.me && seen.me_suspect))
    };
    // A stable sort: the suspect keep their order.
    line.sort_by_key(marked);
    line
}

/// Whether this node's view at `epoch`, taken `held` ago, is superseded (T4):
/// `owner_epoch` is the owner key's epoch, if there is one.
pub fn superseded(owner_epoch: Option<u64>, epoch: u64, held: Time, timing: &Timing) -> bool {
    match owner_epoch {
        Some(e) => e > epoch,
        None => held > timing.ownerless_grace,
    }
}

/// The record's `lost_at` after a take at `epoch` whose own copy is `own_suspect`, the
/// record having said `lost_at` before (T5): such a take is the latest one with a suspect
/// truth; any other keeps the earlier mark (a flush begun before it still fails).
pub fn lost_mark(lost_at: Option<u64>, epoch: u64, own_suspect: bool) -> Option<u64> {
    if own_suspect {
        Some(epoch)
    } else {
        lost_at
    }
}

/// Whether a FLUSH first tried when the volume's epoch was `since` may be acknowledged
/// by an owner whose record says the latest take with a suspect truth was at `lost_at`
/// (T5). `since` 0: a sender that did not say (it predates the rule): acknowledged.
pub fn flush_survives(since: u64, lost_at: Option<u64>) -> bool {
    reopened(Flaw::FlushAcrossLoss) || since == 0 || lost_at.is_none_or(|lost| lost <= since)
}

/// A serving node's writes (and trims) acknowledged and not yet covered by a flush that
/// succeeded, by the epoch of the owner that acknowledged them (T5). Without it, a write
/// acknowledged at epoch 4, every copy holding it losing power, a take at 5 with a suspect
/// truth, and then a flush arriving would say `since` 5 and be acknowledged.
#[derive(Clone, Debug, Default)]
pub struct Unflushed {
    /// For each epoch with such writes, the number of the latest one acknowledged at it.
    epochs: BTreeMap<u64, u64>,
    /// Writes acknowledged so far, ever (each one's number).
    acked: u64,
}

/// A flush begun ([`Unflushed::flush_begins`]): its `since`, and what it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushBegun {
    /// The epoch to send with it (`flush_survives`).
    pub since: u64,
    /// The number of the last write acknowledged before it began.
    covers: u64,
}

impl Unflushed {
    /// A write acknowledged by the owner at `epoch`.
    pub fn acked(&mut self, epoch: u64) {
        self.acked += 1;
        self.epochs.insert(epoch, self.acked);
    }

    /// A flush arrives while the node knows the volume's epoch as `now`: it covers every
    /// write acknowledged so far, so its `since` is the oldest of theirs and `now`.
    pub fn flush_begins(&self, now: u64) -> FlushBegun {
        let oldest = self.epochs.keys().next().copied().unwrap_or(now);
        FlushBegun { since: oldest.min(now), covers: self.acked }
    }

    /// The flush `f` succeeded: the writes it covers are durable (those acknowledged while
    /// it ran are not covered). A failed flush changes nothing.
    pub fn flushed(&mut self, f: FlushBegun) {
        self.epochs.retain(|_, last| *last > f.covers);
    }

    /// The flush `f` failed while the record said `lost_at`: if it failed because the
    /// writes it covers may have been lost (`flush_survives`), that is said, once, as
    /// Linux's fsync says a write-back error once; later flushes are not failed for
    /// them (else a client's every flush would fail until this node restarts). A flush
    /// that failed for another reason leaves them to the next one.
    pub fn refused(&mut self, f: FlushBegun, lost_at: Option<u64>) {
        if !flush_survives(f.since, lost_at) {
            self.flushed(f);
        }
    }
}

/// Whether this node takes the volume now (T1–T3), for a node that holds no serving view
/// of it. `truth` is asked only of a suspect copy of an ownerless volume (else `None`).
pub fn decide(
    mem: &mut Memory,
    seen: &Seen,
    truth: Option<Truth>,
    now: Time,
    timing: &Timing,
) -> Take {
    mem.observe(seen);
    if !seen.active_here() {
        return Take::NotYet;
    }
    let take = match seen.owner {
        // Its own key: not while a move to another node that is up is pending (this node
        // may have let go for it), unless that node has not taken it for a while.
        Some(o) if o == seen.me => match seen.moving_to {
            Some(m) if m != seen.me && seen.up.contains(&m) => {
                let since = *mem.moving_away_since.get_or_insert(now);
                now.saturating_sub(since) >= timing.move_wait
            }
            _ => true,
        },
        Some(_) => seen.moving_to == Some(seen.me) && !seen.me_suspect,
        None if truth == Some(Truth::Elsewhere) && !reopened(Flaw::PowerLoss) => {
            let first = !mem.waiting_for_truth;
            mem.waiting_for_truth = true;
            return Take::WaitForTruth { first };
        }
        None => {
            let since = *mem.ownerless_since.get_or_insert(now);
            let line = line(seen);
            let rank = line.iter().position(|n| *n == seen.me).unwrap_or(line.len());
            now.saturating_sub(since) >= timing.takeover_step * rank as u32
        }
    };
    if take {
        Take::Now
    } else {
        Take::NotYet
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use CopyState::*;

    fn seen(me: u64) -> Seen {
        Seen {
            me,
            last_owner: 1,
            copies: vec![(1, Active), (2, Active), (3, Active)],
            owner: None,
            moving_to: None,
            up: [1, 2, 3].into(),
            suspect: BTreeSet::new(),
            me_suspect: false,
        }
    }

    fn at(s: u64) -> Time {
        Time::from_secs(s)
    }

    #[test]
    fn the_last_owner_takes_first_then_each_next_node_a_step_later() {
        let t = Timing::default();
        for (me, after) in [(1, 0), (2, 3), (3, 6)] {
            let mut m = Memory::default();
            assert_eq!(decide(&mut m, &seen(me), None, at(100), &t), Take::from(after == 0));
            if after > 0 {
                assert_eq!(decide(&mut m, &seen(me), None, at(100 + after - 1), &t), Take::NotYet);
                assert_eq!(decide(&mut m, &seen(me), None, at(100 + after), &t), Take::Now);
            }
        }
    }

    impl From<bool> for Take {
        fn from(b: bool) -> Take {
            if b {
                Take::Now
            } else {
                Take::NotYet
            }
        }
    }

    #[test]
    fn a_down_node_is_skipped_and_a_suspect_one_goes_last_in_its_order() {
        let mut s = seen(2);
        s.up.remove(&1);
        assert_eq!(line(&s), vec![2, 3]);
        s.up.insert(1);
        s.suspect.insert(1);
        assert_eq!(line(&s), vec![2, 3, 1]);
        s.me_suspect = true;
        assert_eq!(line(&s), vec![3, 1, 2]);
        s.suspect.insert(3);
        assert_eq!(line(&s), vec![1, 2, 3], "all suspect: the record's order");
    }

    #[test]
    fn a_suspect_copy_waits_for_an_active_copy_not_known_to_be_suspect() {
        let mut s = seen(1);
        s.me_suspect = true;
        s.suspect.insert(1);
        let members = [1, 2, 3].into();
        assert_eq!(truth_for_suspect(&s, &members), Truth::Elsewhere);
        let mut m = Memory::default();
        let t = Timing::default();
        let truth = Some(truth_for_suspect(&s, &members));
        assert_eq!(decide(&mut m, &s, truth, at(1), &t), Take::WaitForTruth { first: true });
        assert_eq!(decide(&mut m, &s, truth, at(2), &t), Take::WaitForTruth { first: false });
        s.suspect.extend([2, 3]);
        assert_eq!(truth_for_suspect(&s, &members), Truth::AllSuspect);
        s.up.remove(&2);
        assert_eq!(truth_for_suspect(&s, &members), Truth::Elsewhere, "a down copy may hold more");
        assert_eq!(truth_for_suspect(&s, &[1].into()), Truth::Nowhere);
    }

    #[test]
    fn an_owned_volume_is_taken_only_by_a_move_here_and_not_by_a_suspect_copy() {
        let t = Timing::default();
        let mut s = seen(2);
        s.owner = Some(1);
        let mut m = Memory::default();
        assert_eq!(decide(&mut m, &s, None, at(1), &t), Take::NotYet);
        s.moving_to = Some(2);
        assert_eq!(decide(&mut m, &s, None, at(1), &t), Take::Now);
        s.me_suspect = true;
        assert_eq!(decide(&mut m, &s, None, at(1), &t), Take::NotYet);
    }

    #[test]
    fn its_own_key_is_taken_again_unless_a_move_away_is_pending_for_less_than_move_wait() {
        let t = Timing::default();
        let mut s = seen(1);
        s.owner = Some(1);
        let mut m = Memory::default();
        assert_eq!(decide(&mut m, &s, None, at(1), &t), Take::Now);
        s.moving_to = Some(2);
        assert_eq!(decide(&mut m, &s, None, at(10), &t), Take::NotYet);
        assert_eq!(decide(&mut m, &s, None, at(19), &t), Take::NotYet);
        assert_eq!(decide(&mut m, &s, None, at(20), &t), Take::Now);
        s.up.remove(&2);
        let mut m = Memory::default();
        assert_eq!(decide(&mut m, &s, None, at(30), &t), Take::Now, "the mover is down");
    }

    #[test]
    fn a_node_without_an_active_copy_never_takes() {
        let mut s = seen(3);
        s.copies[2].1 = Stale;
        assert_eq!(
            decide(&mut Memory::default(), &s, None, at(100), &Timing::default()),
            Take::NotYet
        );
    }

    #[test]
    fn a_view_is_superseded_by_a_newer_epoch_or_no_owner_after_the_grace() {
        let t = Timing::default();
        assert!(superseded(Some(8), 7, at(0), &t));
        assert!(!superseded(Some(7), 7, at(100), &t));
        assert!(!superseded(None, 7, at(5), &t));
        assert!(superseded(None, 7, at(6), &t));
    }

    #[test]
    fn a_flush_from_before_a_take_with_a_suspect_truth_fails() {
        assert!(flush_survives(3, None), "no such take");
        assert!(flush_survives(3, Some(3)), "the take was before the flush began");
        assert!(flush_survives(4, Some(3)));
        assert!(!flush_survives(3, Some(4)), "writes acked before it may be gone");
        assert!(flush_survives(0, Some(4)), "a sender that did not say");
    }

    #[test]
    fn a_flush_says_the_epoch_of_the_oldest_write_it_covers() {
        let mut u = Unflushed::default();
        assert_eq!(u.flush_begins(5).since, 5, "nothing to cover: the epoch now");
        u.acked(4);
        u.acked(4);
        // Every copy holding them lost power; a take at 5 with a suspect truth.
        let f = u.flush_begins(5);
        assert_eq!(f.since, 4);
        assert!(!flush_survives(f.since, lost_mark(None, 5, true)), "the writes at 4 may be gone");
        // A flush failed for another reason leaves them unflushed.
        u.refused(f, None);
        assert_eq!(u.flush_begins(5).since, 4);
        // One failed for their loss has said so: the next is not failed for them.
        u.refused(f, Some(5));
        assert_eq!(u.flush_begins(5).since, 5);
        u.acked(4);
        // A write acknowledged while a flush runs is not covered by it.
        let f = u.flush_begins(5);
        u.acked(5);
        u.flushed(f);
        assert_eq!(u.flush_begins(6).since, 5);
        let f = u.flush_begins(6);
        u.flushed(f);
        assert_eq!(u.flush_begins(6).since, 6, "all covered");
        // Flushes ending out of order: the earlier one's success clears only its writes.
        u.acked(6);
        let first = u.flush_begins(6);
        u.acked(7);
        let second = u.flush_begins(7);
        u.flushed(second);
        u.flushed(first);
        assert_eq!(u.flush_begins(8).since, 8);
        // A node whose view of the epoch lags says the older one.
        u.acked(9);
        assert_eq!(u.flush_begins(8).since, 8);
    }

    #[test]
    fn a_take_with_a_suspect_truth_is_marked_and_other_takes_keep_the_mark() {
        assert_eq!(lost_mark(None, 5, true), Some(5));
        assert_eq!(lost_mark(Some(3), 5, true), Some(5));
        assert_eq!(lost_mark(Some(3), 5, false), Some(3), "a flush from before 3 still fails");
        assert_eq!(lost_mark(None, 5, false), None);
    }
}
