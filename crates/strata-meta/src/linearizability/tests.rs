//! The checker on hand-made histories (each case says why it is or is not linearizable)
//! and on histories generated from a real register with random overlaps.

use super::*;
use proptest::prelude::*;

fn op(call: Call, outcome: Outcome, start: u64, end: u64) -> Operation {
    Operation { call, outcome, start, end }
}

#[test]
fn a_sequential_history_is_linearizable() {
    let h = [
        op(Call::Read, Outcome::Read(0), 0, 1),
        op(Call::Write(5), Outcome::Done, 2, 3),
        op(Call::Cas { from: 5, to: 6 }, Outcome::Done, 4, 5),
        op(Call::Cas { from: 5, to: 7 }, Outcome::Failed, 6, 7),
        op(Call::Read, Outcome::Read(6), 8, 9),
    ];
    check(&h).unwrap();
}

#[test]
fn a_stale_read_after_a_completed_write_is_not() {
    let h = [op(Call::Write(5), Outcome::Done, 0, 1), op(Call::Read, Outcome::Read(0), 2, 3)];
    assert!(check(&h).is_err());
}

#[test]
fn overlapping_operations_may_take_effect_in_either_order() {
    // The read overlaps the write: it may see the old or the new value.
    for seen in [0, 5] {
        let h =
            [op(Call::Write(5), Outcome::Done, 0, 10), op(Call::Read, Outcome::Read(seen), 2, 3)];
        check(&h).unwrap();
    }
}

#[test]
fn two_cas_from_the_same_value_cannot_both_succeed() {
    let h = [
        op(Call::Cas { from: 0, to: 1 }, Outcome::Done, 0, 10),
        op(Call::Cas { from: 0, to: 2 }, Outcome::Done, 0, 10),
    ];
    assert!(check(&h).is_err());
}

#[test]
fn a_cas_that_failed_although_it_should_have_succeeded_is_caught() {
    let h = [
        op(Call::Write(3), Outcome::Done, 0, 1),
        op(Call::Cas { from: 3, to: 4 }, Outcome::Failed, 2, 3),
    ];
    assert!(check(&h).is_err());
}

#[test]
fn an_unknown_outcome_may_or_may_not_have_happened() {
    // The timed-out CAS took effect (a later read sees it)...
    let took = [
        op(Call::Cas { from: 0, to: 9 }, Outcome::Unknown, 0, 0),
        op(Call::Read, Outcome::Read(9), 5, 6),
    ];
    check(&took).unwrap();
    // ... or did not.
    let did_not = [
        op(Call::Cas { from: 0, to: 9 }, Outcome::Unknown, 0, 0),
        op(Call::Read, Outcome::Read(0), 5, 6),
    ];
    check(&did_not).unwrap();
    // But not before it started.
    let too_early = [
        op(Call::Read, Outcome::Read(9), 0, 1),
        op(Call::Cas { from: 0, to: 9 }, Outcome::Unknown, 5, 0),
    ];
    assert!(check(&too_early).is_err());
}

/// Runs operations against a real register in a random order of effect, each effect at
/// an instant inside its interval: the history is linearizable by construction.
fn generated(calls: Vec<(u8, u8, u8, bool)>) -> Vec<Operation> {
    let mut value = 0u64;
    let mut next_value = 1u64;
    let mut history = Vec::new();
    for (i, (kind, pre, post, unknown)) in calls.into_iter().enumerate() {
        let at = 100 * i as u64; // the instant it takes effect
        let (start, end) = (at - u64::from(pre).min(at), at + u64::from(post));
        let (call, outcome) = match kind % 3 {
            0 => (Call::Read, Outcome::Read(value)),
            1 => {
                next_value += 1;
                value = next_value;
                (Call::Write(value), Outcome::Done)
            }
            _ => {
                next_value += 1;
                let from = if pre % 2 == 0 { value } else { value + 1000 };
                if from == value {
                    value = next_value;
                    (Call::Cas { from, to: next_value }, Outcome::Done)
                } else {
                    (Call::Cas { from, to: next_value }, Outcome::Failed)
                }
            }
        };
        let outcome =
            if unknown && outcome != Outcome::Failed { Outcome::Unknown } else { outcome };
        history.push(op(call, outcome, start, end));
    }
    history
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn histories_of_a_real_register_are_linearizable(
        calls in proptest::collection::vec(
            (any::<u8>(), 0u8..250, 0u8..250, proptest::bool::weighted(0.1)),
            1..40,
        )
    ) {
        let history = generated(calls);
        prop_assert!(check(&history).is_ok(), "{history:?}");
    }

    #[test]
    fn a_read_of_a_value_never_written_is_caught(
        calls in proptest::collection::vec((any::<u8>(), 0u8..250, 0u8..250, Just(false)), 1..30),
    ) {
        let mut history = generated(calls);
        history.push(op(Call::Read, Outcome::Read(999_999), 0, u64::MAX / 2));
        prop_assert!(check(&history).is_err());
    }
}
