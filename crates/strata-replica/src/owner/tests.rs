use super::*;
use proptest::prelude::*;

const REGIONS: u64 = 16;

fn three() -> OwnerState {
    let tracks = vec![
        Track::new(1, 10, true, CopyState::Active),
        Track::new(2, 20, false, CopyState::Active),
        Track::new(3, 30, false, CopyState::Active),
    ];
    let mut o = OwnerState::new(5, 2, REGIONS, tracks);
    o.fenced(1, 1);
    o.fenced(2, 1);
    o
}

fn took() -> Reply {
    Reply::Took { connection: 1 }
}

type Folded = (Vec<SaveBitmap>, Vec<(usize, String)>, bool, Vec<usize>);

fn folded(f: Finished) -> Folded {
    match f {
        Finished::Folded { saves, failed, full, record } => (saves, failed, full, record),
        Finished::Deposed { newest } => panic!("deposed by {newest}"),
    }
}

#[test]
fn lsns_start_above_the_epoch_and_grow() {
    let mut o = three();
    let (w, _) = o.begin(3, &[1], false);
    assert_eq!(w.first, (5 << LSN_EPOCH_SHIFT) + 1);
    assert_eq!(w.last, w.first + 2);
    assert_eq!(w.targets, vec![1, 2]);
    folded(o.finish(&w, vec![(1, took()), (2, took())], true));
    assert_eq!(o.track(1).acked, w.last);
    assert_eq!(o.track(0).acked, w.last);
    o.validate().unwrap();
}

#[test]
fn a_stale_copys_bitmap_holds_the_regions_before_the_write_is_sent_to_anyone() {
    let mut o = three();
    o.stale(2);
    let (w, saves) = o.begin(1, &[3, 4], false);
    assert_eq!(w.targets, vec![1], "a STALE copy is sent nothing");
    assert_eq!(saves.len(), 1);
    assert_eq!(saves[0].copy, 2);
    assert_eq!(saves[0].regions, [3, 4].into());
    // The same regions again change nothing to save.
    let (w2, saves2) = o.begin(1, &[3], false);
    assert!(saves2.is_empty());
    folded(o.finish(&w, vec![(1, took())], true));
    folded(o.finish(&w2, vec![(1, took())], true));
    o.validate().unwrap();
}

#[test]
fn a_failed_copys_bitmap_gets_its_unflushed_regions_and_every_write_in_flight() {
    let mut o = three();
    let (a, _) = o.begin(1, &[1], false);
    folded(o.finish(&a, vec![(1, took()), (2, took())], true));
    // Two writes in flight; the first fails on copy 2 while the second still flies
    // (flaw 6 of the simulation: the second would else never reach the bitmap if the
    // owner died before it failed in turn).
    let (b, _) = o.begin(1, &[5], false);
    let (c, _) = o.begin(1, &[9], false);
    let (saves, failed, full, record) = folded(o.finish(
        &b,
        vec![(1, took()), (2, Reply::Failed { why: "timed out".into() })],
        true,
    ));
    assert!(!full);
    assert_eq!(failed.len(), 1);
    assert_eq!(record, vec![2]);
    assert_eq!(saves[0].regions, [1, 5, 9].into(), "unflushed 1, this write's 5, flying 9");
    assert_eq!(o.track(2).state, CopyState::Stale);
    assert_eq!(o.track(2).missed_from, Some(b.first));
    folded(o.finish(&c, vec![(1, took())], true));
    o.recorded(2, CopyState::Stale, None);
    assert_eq!(o.conclude(false, Time::ZERO), Ok(None));
    o.validate().unwrap();
}

#[test]
fn a_flush_clears_only_the_regions_of_writes_completed_before_it_was_sent() {
    let mut o = three();
    let (a, _) = o.begin(1, &[1], false);
    folded(o.finish(&a, vec![(1, took()), (2, took())], true));
    let (flush, _) = o.begin(1, &[], true);
    // A write sent after the flush, answered before it (flaw 4).
    let (b, _) = o.begin(1, &[2], false);
    folded(o.finish(&b, vec![(1, took()), (2, took())], true));
    folded(o.finish(&flush, vec![(1, took()), (2, took())], true));
    let left: Vec<u64> = o.track(1).unflushed.keys().copied().collect();
    assert_eq!(left, vec![2]);
}

#[test]
fn an_answer_over_a_new_connection_fails_the_copy() {
    let mut o = three();
    let (w, _) = o.begin(1, &[1], false);
    folded(o.finish(&w, vec![(1, took()), (2, took())], true));
    let (w, _) = o.begin(1, &[2], false);
    let (saves, failed, _, record) =
        folded(o.finish(&w, vec![(1, Reply::Took { connection: 2 }), (2, took())], true));
    assert_eq!(failed[0].0, 1);
    assert_eq!(record, vec![1]);
    assert_eq!(saves[0].regions, [1, 2].into(), "what it had not synced is in its bitmap");
    // A probe over a new connection does the same to an ACTIVE copy.
    let save = o.answered(2, 7).expect("stale");
    assert_eq!(save.regions, [1, 2].into());
    assert!(o.answered(2, 7).is_none(), "already STALE");
}

#[test]
fn a_copy_that_saw_a_newer_epoch_deposes_the_owner() {
    let mut o = three();
    let (w, _) = o.begin(1, &[1], false);
    let f = o.finish(&w, vec![(1, took()), (2, Reply::StaleEpoch { newest: 9 })], true);
    assert_eq!(f, Finished::Deposed { newest: 9 });
    o.validate().unwrap();
}

#[test]
fn a_full_copy_is_stale_and_the_write_gets_no_space() {
    let mut o = three();
    let (w, _) = o.begin(1, &[1], false);
    let (_, _, full, record) = folded(o.finish(
        &w,
        vec![(1, took()), (2, Reply::NoSpace { why: "no room".into() })],
        true,
    ));
    assert!(full);
    assert_eq!(record, vec![2]);
    o.recorded(2, CopyState::Stale, None);
    assert_eq!(o.conclude(full, Time::ZERO), Err(ReplicaError::NoSpace));
}

#[test]
fn below_min_replicas_a_write_fails() {
    let mut o = three();
    o.stale(1);
    o.stale(2);
    assert_eq!(
        o.conclude(false, Time::ZERO),
        Err(ReplicaError::TooFewActive { active: 1, needed: 2 })
    );
}

#[test]
fn a_copy_that_loses_its_lease_holds_back_acknowledgments_until_it_ends() {
    let mut o = three();
    let t = Time::from_secs(100);
    assert!(o.grant(1, 1, t + Time::from_secs(2)));
    assert!(!o.grant(1, 3, t), "not over another connection");
    o.stale(1);
    assert_eq!(o.track(1).leased_until, None);
    assert_eq!(o.conclude(false, t), Ok(Some(t + Time::from_secs(2))));
    assert_eq!(o.conclude(false, t + Time::from_secs(3)), Ok(None));
    assert!(!o.grant(1, 1, t), "no lease for a STALE copy");
    o.validate().unwrap();
}

#[test]
fn a_release_vouches_for_active_copies_that_owe_no_scan() {
    let mut o = three();
    o.track_mut(2).scan = Some(0);
    let r = o.release();
    assert_eq!(r.level, vec![0, 1]);
    assert!(!r.unrecorded);
    o.stale(1);
    let r = o.release();
    assert!(r.unrecorded);
    assert_eq!(r.stale, vec![(1, BTreeSet::new())]);
}

#[test]
fn a_full_owner_hands_over_to_an_active_copy_that_owes_no_scan() {
    let mut o = three();
    assert_eq!(o.successors(), vec![1, 2]);
    o.stale(1);
    o.track_mut(2).scan = Some(3);
    assert!(o.successors().is_empty(), "none may be the truth");
}

#[test]
fn validate_finds_a_broken_state() {
    let mut o = three();
    o.track_mut(0).state = CopyState::Stale;
    assert_eq!(o.validate().unwrap_err().number, "O1");
    let mut o = three();
    o.track_mut(1).leased_until = Some(Time::ZERO);
    o.track_mut(1).state = CopyState::Resyncing;
    assert_eq!(o.validate().unwrap_err().number, "O4");
    let mut o = three();
    o.track_mut(1).dirty.insert(REGIONS);
    assert_eq!(o.validate().unwrap_err().number, "O5");
    let mut o = three();
    o.track_mut(2).acked = 7;
    o.validate().unwrap();
    o.track_mut(2).acked = 6;
    assert_eq!(o.validate().unwrap_err().number, "O2");
}

#[test]
#[should_panic(expected = "without its own copy ACTIVE")]
fn an_owner_without_its_own_copy_active_writes_nothing() {
    let mut o = three();
    o.track_mut(0).state = CopyState::Stale;
    o.begin(1, &[1], false);
}

/// One step of the property test.
#[derive(Clone, Debug)]
enum Step {
    Write { regions: Vec<u64>, replies: Vec<u8> },
    Flush { replies: Vec<u8> },
    Record(usize),
    Activate(usize),
    Probe(usize, u64),
    Lease(usize),
}

fn step() -> impl Strategy<Value = Step> {
    let replies = prop::collection::vec(0u8..6, 2);
    prop_oneof![
        4 => (prop::collection::vec(0..REGIONS, 1..3), replies.clone())
            .prop_map(|(regions, replies)| Step::Write { regions, replies }),
        1 => replies.prop_map(|replies| Step::Flush { replies }),
        1 => (1usize..3).prop_map(Step::Record),
        1 => (1usize..3).prop_map(Step::Activate),
        1 => ((1usize..3), (1u64..3)).prop_map(|(i, c)| Step::Probe(i, c)),
        1 => (1usize..3).prop_map(Step::Lease),
    ]
}

fn reply(code: u8) -> Reply {
    match code {
        0 => Reply::Failed { why: "lost".into() },
        1 => Reply::Took { connection: 2 },
        _ => Reply::Took { connection: 1 },
    }
}

proptest! {
    /// Whatever the copies answer, the state keeps its invariants, and a copy that did
    /// not take a write has the write's regions in its bitmap (until it is levelled).
    #[test]
    fn the_owners_state_keeps_its_invariants(steps in prop::collection::vec(step(), 1..60)) {
        let mut o = three();
        let mut now = Time::ZERO;
        for s in steps {
            now += Time::from_millis(100);
            match s {
                Step::Write { regions, replies } => {
                    let (w, _) = o.begin(1, &regions, false);
                    let answers: Vec<(usize, Reply)> =
                        w.targets.iter().map(|&i| (i, reply(replies[i - 1]))).collect();
                    let took: Vec<usize> = answers
                        .iter()
                        .filter(|(i, r)| *r == Reply::Took { connection: 1 }
                            && o.track(*i).connection.is_none_or(|c| c == 1))
                        .map(|(i, _)| *i)
                        .collect();
                    folded(o.finish(&w, answers, true));
                    for i in 1..3 {
                        if !took.contains(&i) {
                            for r in &regions {
                                prop_assert!(o.track(i).dirty.contains(r),
                                    "copy {} missed region {} but its bitmap lacks it", i, r);
                            }
                        }
                    }
                }
                Step::Flush { replies } => {
                    let (w, _) = o.begin(1, &[], true);
                    let answers = w.targets.iter().map(|&i| (i, reply(replies[i - 1]))).collect();
                    folded(o.finish(&w, answers, true));
                }
                Step::Record(i) => {
                    if o.track(i).unrecorded {
                        o.recorded(i, CopyState::Stale, None);
                    }
                }
                Step::Activate(i) => {
                    // A resync that levelled the copy.
                    if o.track(i).state != CopyState::Active {
                        o.track_mut(i).dirty.clear();
                        o.fenced(i, 1);
                        o.recorded(i, CopyState::Active, None);
                    }
                }
                Step::Probe(i, c) => {
                    o.answered(i, c);
                }
                Step::Lease(i) => {
                    o.grant(i, 1, now + Time::from_secs(2));
                }
            }
            o.validate().map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
    }
}

#[test]
fn a_resync_step_clears_its_run_and_a_bitmap_owing_a_scan_says_so() {
    let mut o = three();
    o.stale(2);
    let (w, _) = o.begin(1, &[3, 4, 5], false);
    folded(o.finish(&w, vec![(1, took())], true));
    o[2].scan = Some(8);
    let save = o.cleared(2, 3..5);
    assert_eq!(save, SaveBitmap { copy: 2, regions: [5].into(), owes_scan: true });
    o[2].scan = None;
    assert!(!o.bitmap(2).owes_scan);
    o.validate().unwrap();
}

#[test]
fn every_region_compared_counts_as_unflushed_not_only_those_copied() {
    let mut o = three();
    o.levelled_copying(1, 2..6, &[3], 4096);
    let unflushed: Vec<u64> = o.track(1).unflushed.keys().copied().collect();
    assert_eq!(unflushed, vec![2, 3, 4, 5], "flaw 7: a region found equal counts too");
    assert_eq!(o.track(1).resynced, 4096);
    o.validate().unwrap();
}

#[test]
fn a_copy_levelled_over_one_connection_may_be_vouched_for_before_it_is_active() {
    let mut o = three();
    o.stale(2);
    let (w, _) = o.begin(1, &[3], false);
    folded(o.finish(&w, vec![(1, took())], true));
    o.recorded(2, CopyState::Stale, None);
    o.recorded(2, CopyState::Resyncing, None);
    o.fenced(2, 4);
    assert!(!o.settled(2, 4), "its bitmap still has region 3");
    o.cleared(2, 3..4);
    assert!(o.settled(2, 4));
    assert!(!o.settled(2, 5), "over another connection it may have restarted");
    assert!(!o.settled(1, 1), "an ACTIVE copy is vouched for by the periodic look");
    o.validate().unwrap();
}

#[test]
fn a_resync_stops_levelling_a_copy_that_failed_between_two_steps() {
    let mut o = three();
    assert!(o.may_level(1, CopyState::Active), "a scan of an ACTIVE copy");
    o.stale(1);
    assert!(!o.may_level(1, CopyState::Active), "it failed mid-scan");
    o.recorded(1, CopyState::Stale, None);
    o.recorded(1, CopyState::Resyncing, None);
    assert!(o.may_level(1, CopyState::Stale));
    o.stale(1);
    assert!(!o.may_level(1, CopyState::Stale), "it failed mid-resync");
    o.validate().unwrap();
}

#[test]
fn a_copy_that_answers_the_fence_with_its_power_loss_mark_is_stale_and_scanned() {
    let mut o = three();
    assert!(o.lost_power(1));
    assert_eq!(o.track(1).state, CopyState::Stale);
    assert_eq!(o.track(1).scan, Some(0));
    assert!(o.track(1).unrecorded);
    assert!(!o.lost_power(1), "already STALE");
    o.validate().unwrap();
}
