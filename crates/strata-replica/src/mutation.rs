//! Mutation knobs for the deterministic simulation (FoundationDB's BUGGIFY in spirit):
//! each [`Flaw`] names a flaw the simulation once found in the protocol, and the place
//! in the code where the fixed protocol decides against it asks [`reopened`] whether to
//! take the flawed branch instead. `strata-sim` turns one on for a seed (`set`) and shows
//! that its regression seed then fails, and passes without it.
//!
//! Invariants:
//! 1. Without the `mutations` cargo feature (only `strata-sim` enables it) there is no
//!    switch: [`reopened`] is a constant `false`, and the decisions are the fixed ones.
//! 2. With it, every knob is off unless `set` turned it on, per thread (a seed runs on
//!    one thread; seeds run in parallel each have their own knobs).
//! 3. A knob only ever re-opens its flaw: with every knob off the behaviour is exactly
//!    the fixed protocol's.

/// A flaw the simulation found (numbered as in `strata-sim`'s header), whose fix a knob
/// can undo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Flaw {
    /// 1. A copy whose node restarted (a new connection: maybe after a power loss that
    ///    took what it had not synced) is not failed, and a suspect copy is not kept from
    ///    being the truth (`owner::OwnerState::finish`, `answered`; `takeover::line`,
    ///    `decide`).
    PowerLoss,
    /// 2. Taking ownership does not check the fresh record shows this node's copy ACTIVE
    ///    (a driver's decision: `take_ownership` in the server, `take_over` in the sim).
    TakeChecksCopy,
    /// 3. A bitmap saved while its copy owes a digest scan does not say so, so a later
    ///    owner trusts it alone (`owner::SaveBitmap::owes_scan`).
    BitmapKeepsScan,
    /// 4. A flush's reply clears every unflushed region, also those of writes that
    ///    completed after it was sent (`owner::OwnerState::finish`).
    FlushClearsOlder,
    /// 5. An owner view serves under any fresh session of its node, not only the one its
    ///    owner key is tied to (a driver's decision: `serving`).
    SameSession,
    /// 6. A copy that fails does not get the regions of the writes still in flight in its
    ///    bitmap (`owner::OwnerState::finish`).
    InFlightToBitmap,
    /// 7. Only the regions a resync copied count as unflushed on the copy, not those it
    ///    found equal (`owner::OwnerState::levelled_copying`).
    LevelKeepsEqual,
    /// 8. A new owner does not fence its own copy first, and a write deposed while it
    ///    waited for its regions' turn is still sent (a driver's decision:
    ///    `fence_copies`, `fan_out_all`).
    FenceOwnCopy,
    /// 9. A copy a resync levelled stays suspect (its power-loss mark on) until the
    ///    owner's next periodic look vouches for it, instead of being vouched for as its
    ///    resync ends: if the owner loses power meanwhile, both copies are suspect and
    ///    the owner's, lacking what it had not synced, may be taken as the truth
    ///    (`owner::OwnerState::settled`). Found by running the core: the server has it.
    VouchAfterResync,
    /// 10. A resync goes on levelling a copy that failed mid-way (a write marked it STALE
    ///     between two steps): its bitmap is emptied while it is STALE, and what the steps
    ///     copied counts only as unflushed, which a STALE copy's restart does not put back
    ///     in its bitmap; after a power loss of its node it differs for ever
    ///     (`owner::OwnerState::may_level`). Found by running the core: the server has it.
    LevelWhileStale,
    /// 11. A copy that answers a new owner's fence with its power-loss mark on stays
    ///     ACTIVE (owing only a digest scan) instead of STALE: writes acknowledged with it
    ///     as a holder may then be lost when the new owner loses power too, as every copy
    ///     is then suspect and either may be taken as the truth
    ///     (`owner::OwnerState::lost_power`). Found by running the core: the server has it
    ///     (its data plane's probe reply does not carry the mark).
    SuspectStaysActive,
    /// 12. A FLUSH that started before an owner took the volume with a suspect copy as
    ///     the truth (every ACTIVE copy had lost power, taking writes acknowledged and
    ///     not synced) is acknowledged by that owner when its forwarder retries it, as if
    ///     those writes were durable (`takeover::flush_survives`). Found by running the
    ///     core: the server has it (its router retries a forwarded flush at the next
    ///     owner).
    FlushAcrossLoss,
}

impl Flaw {
    /// Every flaw, in the order of their numbers.
    pub const ALL: [Flaw; 12] = [
        Flaw::PowerLoss,
        Flaw::TakeChecksCopy,
        Flaw::BitmapKeepsScan,
        Flaw::FlushClearsOlder,
        Flaw::SameSession,
        Flaw::InFlightToBitmap,
        Flaw::LevelKeepsEqual,
        Flaw::FenceOwnCopy,
        Flaw::VouchAfterResync,
        Flaw::LevelWhileStale,
        Flaw::SuspectStaysActive,
        Flaw::FlushAcrossLoss,
    ];

    /// Its number in the simulation's list of flaws (1–12).
    pub fn number(self) -> u32 {
        self as u32 + 1
    }
}

#[cfg(feature = "mutations")]
thread_local! {
    static REOPENED: std::cell::Cell<u16> = const { std::cell::Cell::new(0) };
}

/// Re-opens exactly the flaws in `flaws` on this thread (every other knob off).
#[cfg(feature = "mutations")]
pub fn set(flaws: &[Flaw]) {
    let bits = flaws.iter().fold(0u16, |b, f| b | 1 << (*f as u16));
    REOPENED.with(|r| r.set(bits));
}

/// Whether `flaw` is re-opened on this thread.
#[cfg(feature = "mutations")]
pub fn reopened(flaw: Flaw) -> bool {
    REOPENED.with(|r| r.get() & 1 << (flaw as u16) != 0)
}

/// Whether `flaw` is re-opened: never, without the `mutations` feature.
#[cfg(not(feature = "mutations"))]
#[inline(always)]
pub fn reopened(_flaw: Flaw) -> bool {
    false
}

#[cfg(all(test, feature = "mutations"))]
mod tests {
    use super::*;

    #[test]
    fn knobs_are_per_thread_and_off_unless_set() {
        assert!(Flaw::ALL.iter().all(|f| !reopened(*f)));
        set(&[Flaw::LevelKeepsEqual]);
        assert!(reopened(Flaw::LevelKeepsEqual));
        assert!(!reopened(Flaw::PowerLoss));
        std::thread::spawn(|| assert!(!reopened(Flaw::LevelKeepsEqual))).join().unwrap();
        set(&[]);
        assert!(!reopened(Flaw::LevelKeepsEqual));
        assert_eq!(Flaw::FenceOwnCopy.number(), 8);
    }
}
