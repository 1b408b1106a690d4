//! The replication protocol's timeouts and periods, in one value. The server runs
//! [`Timing::default`]; the simulation scales it down (`Timing::scaled`) so that a run
//! covers many failovers in little simulated time.
//!
//! Invariants (`docs/design/replication.md`, invariants 3 and 10), kept by
//! [`Timing::check`]:
//! 1. `owner_lease < session_timeout`: an owner stops serving before anyone may take its
//!    place (its session's death frees the owner key).
//! 2. `read_lease + owner_lease <= session_timeout`: an owner that can no longer grant is
//!    replaced only after every read lease it granted has run out.
//! 3. `probe_timeout <= io_timeout` and every value is above zero.

use std::time::Duration;

/// Every timeout and period of the replication protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// A node not heard from for this long is declared down by the metadata service
    /// (its session ends, and with it its owner keys). Set by the metadata service; here
    /// so that the rules below can be checked against it.
    pub session_timeout: Duration,
    /// An owner serves only while the metadata service accepted a heartbeat it sent less
    /// than this ago (invariant 3).
    pub owner_lease: Duration,
    /// How long a node may serve reads from its own copy after it asked the owner
    /// (invariant 10).
    pub read_lease: Duration,
    /// How long the owner waits for a copy's reply before it marks the copy STALE: the
    /// trade-off between a paused copy stalling writes to every volume it holds for this
    /// long, and copies marked STALE (and resynced) for a hiccup.
    pub io_timeout: Duration,
    /// How long a probe (fence, lease, liveness) waits for its answer.
    pub probe_timeout: Duration,
    /// How long a node waits for the owner's answer to a forwarded request.
    pub forward_timeout: Duration,
    /// How long a forwarded request is retried while a new owner is chosen.
    pub forward_patience: Duration,
    /// How often a forwarder looks whether the owner key names another epoch.
    pub owner_poll: Duration,
    /// How often the steward looks at the volumes.
    pub steward_every: Duration,
    /// The last owner takes an ownerless volume first; each next node in line this much
    /// later.
    pub takeover_step: Duration,
    /// A volume seen ownerless for less than this is left to its last owner.
    pub ownerless_grace: Duration,
    /// How long an owner asked to let go waits for requests in flight and syncs.
    pub release_patience: Duration,
    /// How long a move waits for the next owner's take.
    pub move_wait: Duration,
    /// How long `volume attach` waits for the move it asked for.
    pub move_patience: Duration,
    /// How long a delete waits for the owner to let go.
    pub delete_patience: Duration,
    /// How often the owner looks for a stale copy that came back.
    pub resync_every: Duration,
    /// How often the owner looks for a copy on a node removed from the cluster.
    pub replace_every: Duration,
    /// Requests of one node further apart than this start a new streak (automatic moves).
    pub streak_gap: Duration,
    /// An owner whose own store refused a write for want of room hands the volume over
    /// if it still has none this much later.
    pub full_grace: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing::DEFAULT
    }
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// A [`Timing`] that breaks one of the rules in the module's header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("inconsistent replication timing: {0}")]
pub struct BadTiming(pub &'static str);

impl Timing {
    /// Today's values (the server's).
    pub const DEFAULT: Timing = Timing {
        session_timeout: secs(10),
        owner_lease: secs(6),
        read_lease: secs(2),
        io_timeout: secs(10),
        probe_timeout: secs(2),
        forward_timeout: secs(30),
        forward_patience: secs(60),
        owner_poll: Duration::from_millis(250),
        steward_every: secs(1),
        takeover_step: secs(3),
        ownerless_grace: secs(5),
        release_patience: secs(15),
        move_wait: secs(10),
        move_patience: secs(30),
        delete_patience: secs(15),
        resync_every: secs(2),
        replace_every: secs(10),
        streak_gap: secs(5),
        full_grace: secs(5),
    };

    /// Every value divided by `by` (the simulation runs the protocol faster).
    pub fn scaled(self, by: u32) -> Timing {
        let by = by.max(1);
        let d = |x: Duration| x / by;
        Timing {
            session_timeout: d(self.session_timeout),
            owner_lease: d(self.owner_lease),
            read_lease: d(self.read_lease),
            io_timeout: d(self.io_timeout),
            probe_timeout: d(self.probe_timeout),
            forward_timeout: d(self.forward_timeout),
            forward_patience: d(self.forward_patience),
            owner_poll: d(self.owner_poll),
            steward_every: d(self.steward_every),
            takeover_step: d(self.takeover_step),
            ownerless_grace: d(self.ownerless_grace),
            release_patience: d(self.release_patience),
            move_wait: d(self.move_wait),
            move_patience: d(self.move_patience),
            delete_patience: d(self.delete_patience),
            resync_every: d(self.resync_every),
            replace_every: d(self.replace_every),
            streak_gap: d(self.streak_gap),
            full_grace: d(self.full_grace),
        }
    }

    /// Checks the rules in the module's header.
    pub fn check(&self) -> Result<(), BadTiming> {
        let all = [
            self.session_timeout,
            self.owner_lease,
            self.read_lease,
            self.io_timeout,
            self.probe_timeout,
            self.forward_timeout,
            self.forward_patience,
            self.owner_poll,
            self.steward_every,
            self.takeover_step,
            self.ownerless_grace,
            self.release_patience,
            self.move_wait,
            self.move_patience,
            self.delete_patience,
            self.resync_every,
            self.replace_every,
            self.streak_gap,
            self.full_grace,
        ];
        if all.iter().any(Duration::is_zero) {
            return Err(BadTiming("every timeout and period must be above zero"));
        }
        if self.owner_lease >= self.session_timeout {
            return Err(BadTiming("the owner lease must be shorter than the session timeout"));
        }
        if self.read_lease + self.owner_lease > self.session_timeout {
            return Err(BadTiming(
                "a read lease and the owner lease together must fit in the session timeout",
            ));
        }
        if self.probe_timeout > self.io_timeout {
            return Err(BadTiming("a probe must not wait longer than a write"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn todays_values_and_the_simulations_scaled_ones_keep_the_rules() {
        Timing::default().check().unwrap();
        Timing::default().scaled(10).check().unwrap();
        assert_eq!(Timing::default().scaled(10).owner_lease, Duration::from_millis(600));
    }

    #[test]
    fn a_read_lease_that_outlives_the_owner_is_refused() {
        let t = Timing { read_lease: Duration::from_secs(5), ..Timing::default() };
        assert!(t.check().is_err());
        let t = Timing { owner_lease: Duration::from_secs(10), ..Timing::default() };
        assert!(t.check().is_err());
        let t = Timing { steward_every: Duration::ZERO, ..Timing::default() };
        assert!(t.check().is_err());
    }
}
