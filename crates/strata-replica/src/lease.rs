//! The read-lease rules of a node that is not the owner (invariant 10 of
//! `docs/design/replication.md`; the owner's side is `OwnerState::grant` and `whole`): a
//! node serves a read from its own copy only under a lease the owner granted, and only
//! while its copy's fence is still exactly at the lease's epoch, so that no newer owner
//! has fenced the copy (and perhaps written to the other copies) meanwhile.
//!
//! Rules:
//! - L1. A lease runs `read_lease` from when it was *asked for*, not from when the grant
//!   arrived: the owner counts its grant from later than that, so the node's lease ends
//!   before the owner stops counting it.
//! - L2. A read is served here only for the leased copy, before the lease's end, with the
//!   copy's fence exactly at the lease's epoch (the driver then holds the fence at that
//!   epoch for the read and checks the end again after).
//! - L3. A node asks again once less than half of its lease is left (or it holds none),
//!   in the background: reads are forwarded meanwhile, never held up.

use crate::owner::Time;
use crate::timing::Timing;

/// A read lease a node holds on its own copy of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLease {
    /// The owner's epoch it was granted at.
    pub epoch: u64,
    /// The copy (component id) it covers.
    pub component: u64,
    /// Until when reads may be served under it.
    pub until: Time,
}

impl ReadLease {
    /// The lease an owner at `epoch` granted for `component`, asked for at `asked` (L1).
    pub fn granted(epoch: u64, component: u64, asked: Time, timing: &Timing) -> ReadLease {
        ReadLease { epoch, component, until: asked + timing.read_lease }
    }

    /// Whether a read of `component` may be served here at `now`, the copy's fence being
    /// at `fence` (L2).
    pub fn admits(&self, component: u64, now: Time, fence: u64) -> bool {
        self.component == component && now < self.until && fence == self.epoch
    }

    /// Whether a node holding `lease` should ask for a new one at `now` (L3).
    pub fn renew_due(lease: Option<&ReadLease>, now: Time, timing: &Timing) -> bool {
        lease.is_none_or(|l| l.until < now + timing.read_lease / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T: Timing = Timing::DEFAULT;

    fn s(secs: f64) -> Time {
        Duration::from_secs_f64(secs)
    }

    #[test]
    fn a_lease_runs_from_the_ask_and_only_for_its_copy_at_its_epoch() {
        let l = ReadLease::granted(7, 42, s(10.0), &T);
        assert_eq!(l.until, s(10.0) + T.read_lease);
        assert!(l.admits(42, s(10.5), 7));
        assert!(!l.admits(43, s(10.5), 7), "another copy");
        assert!(!l.admits(42, s(10.5), 8), "a newer owner fenced the copy");
        assert!(!l.admits(42, s(10.5), 6), "a fence behind the lease's epoch");
        assert!(!l.admits(42, l.until, 7), "over at its end");
    }

    #[test]
    fn a_node_asks_again_once_half_its_lease_is_gone() {
        assert!(ReadLease::renew_due(None, s(0.0), &T));
        let l = ReadLease::granted(1, 1, s(10.0), &T);
        assert!(!ReadLease::renew_due(Some(&l), s(10.0), &T));
        assert!(!ReadLease::renew_due(Some(&l), s(10.0) + T.read_lease / 2, &T));
        assert!(ReadLease::renew_due(Some(&l), s(10.01) + T.read_lease / 2, &T));
    }
}
