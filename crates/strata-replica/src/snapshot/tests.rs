//! The snapshot rules (S1–S7) on small snapshot lists and owner states.

use super::*;
use crate::owner::{Finished, Reply, Track};
use crate::record::{ComponentRecord, VolumeState};

fn record() -> VolumeRecord {
    VolumeRecord {
        name: "vm".into(),
        node: 1,
        state: VolumeState::Ready,
        id: String::new(),
        size_bytes: 1 << 20,
        created_unix: 1,
        origin: None,
        snapshots: Vec::new(),
        replicas: 3,
        min_replicas: 2,
        components: vec![
            ComponentRecord::new(1, 10, CopyState::Active),
            ComponentRecord::new(2, 20, CopyState::Active),
            ComponentRecord::new(3, 30, CopyState::Stale),
        ],
        epoch: 6,
        released: None,
        lost_at: None,
        access: Default::default(),
    }
}

fn copy(node: u64) -> CopyRef {
    CopyRef { node, id: node * 10 }
}

/// `snapshots` with `name` begun under `k` at epoch 6.
fn begun(snapshots: &[SnapshotRecord], name: &str, k: u64) -> Result<Snapshots, SnapshotError> {
    begin(snapshots, "vm", 1 << 20, name, k, 6, 100)
}

/// `snapshots` with `name` made under `k`, held by copies 1 and 2.
fn with_made(snapshots: &[SnapshotRecord], name: &str, k: u64) -> Snapshots {
    made(&begun(snapshots, name, k).unwrap(), k, &[copy(1), copy(2)]).unwrap()
}

fn owner() -> OwnerState {
    let tracks = vec![
        Track::new(1, 10, true, CopyState::Active),
        Track::new(2, 20, false, CopyState::Active),
        Track::new(3, 30, false, CopyState::Stale),
    ];
    let mut o = OwnerState::new(6, 2, 16, tracks);
    o.fenced(1, 1);
    o
}

#[test]
fn keys_grow_with_the_epoch_and_never_repeat_across_owners() {
    assert!(key(7, 0) > key(6, (1 << KEY_COUNTER_BITS) - 1));
    assert_ne!(key(6, 1), key(6, 2));
}

#[test]
fn a_snapshot_is_marked_creating_first_and_one_barrier_runs_at_a_time() {
    let r1 = begun(&[], "s1", key(6, 1)).unwrap();
    let s = &r1[0];
    assert_eq!((s.state, s.epoch, s.id), (Some(SnapshotState::Creating), 6, key(6, 1)));
    assert!(s.copies.is_empty());
    assert_eq!(
        begun(&r1, "s2", key(6, 2)),
        Err(SnapshotError::Busy { volume: "vm".into(), name: "s1".into() })
    );
    let r2 = made(&r1, key(6, 1), &[copy(1), copy(2)]).unwrap();
    assert_eq!(r2[0].state, Some(SnapshotState::Ready));
    assert!(matches!(begun(&r2, "s1", key(6, 2)), Err(SnapshotError::Exists { .. })));
    assert!(begun(&r2, "s2", key(6, 2)).is_ok());
}

#[test]
fn a_half_made_snapshot_is_undone_by_the_next_owner_and_its_maker_cannot_finish_it() {
    let r = begun(&[], "s1", key(6, 1)).unwrap();
    let copies = copies_of(&record());
    let undo = undo_on_take(&r, &copies);
    assert_eq!(undo, vec![Undo { key: key(6, 1), copies: vec![copy(1), copy(2), copy(3)] }]);
    let r = abandoned(&r, key(6, 1)).unwrap();
    assert_eq!(r[0].state, Some(SnapshotState::Deleting));
    assert_eq!(made(&r, key(6, 1), &[copy(1)]), None, "a late made finds it abandoned");
    assert_eq!(undo_on_take(&r, &copies).len(), 1, "an undo not finished is finished");
    let r = dropped(&r, key(6, 1));
    assert!(r.is_empty());
    assert_eq!(made(&r, key(6, 1), &[copy(1)]), None, "its maker's last step finds it gone");
    // A made one is not undone.
    let r = with_made(&r, "s2", key(7, 1));
    assert!(undo_on_take(&r, &copies).is_empty());
    assert_eq!(abandoned(&r, key(7, 1)), None, "made after all: kept");
}

#[test]
fn the_barrier_goes_to_every_copy_not_stale_and_a_failed_copy_turns_stale_and_pending() {
    let mut o = owner();
    let (w, _) = o.begin(1, &[3], false);
    folded(o.finish(&w, vec![(1, Reply::Took { connection: 1 })], true));
    let b = o.barrier().unwrap();
    assert_eq!(b.write.targets, vec![1], "the STALE copy 3 is pending; the own copy takes it");
    let f = o.finish(&b.write, vec![(1, Reply::Failed { why: "gone".into() })], true);
    let Finished::Folded { saves, failed, record, .. } = f else { panic!("deposed") };
    assert_eq!(failed.len(), 1);
    assert_eq!(saves[0].copy, 1);
    assert!(saves[0].regions.contains(&3), "what it had not flushed goes to its bitmap");
    assert_eq!(record, vec![1]);
    assert_eq!(o.track(1).state, CopyState::Stale);
    o.validate().unwrap();
}

#[test]
fn a_resyncing_copy_is_stale_from_the_barrier_with_its_unflushed_regions() {
    let mut o = owner();
    o.fenced(2, 1);
    o.stale(2);
    o.recorded(2, CopyState::Resyncing, None);
    let b = o.barrier().unwrap();
    assert_eq!(b.write.targets, vec![1]);
    assert_eq!(b.record, vec![2]);
    assert_eq!(b.saves.len(), 1);
    assert_eq!(o.track(2).state, CopyState::Stale);
    o.validate().unwrap();
}

#[test]
fn every_active_copy_holds_every_ready_snapshot() {
    let mut r = record();
    r.snapshots = with_made(&[], "s1", key(6, 1));
    assert!(unheld(&r).is_empty(), "copy 3 is STALE: pending");
    r.components[2].state = CopyState::Active;
    assert_eq!(unheld(&r), vec![("s1".to_owned(), copy(3))]);
}

#[test]
#[should_panic(expected = "writes in flight")]
fn no_barrier_while_a_write_is_in_flight() {
    let mut o = owner();
    let _ = o.begin(1, &[3], false);
    let _ = o.barrier();
}

#[test]
fn no_barrier_while_an_active_copy_owes_a_scan() {
    let tracks = vec![
        Track::new(1, 10, true, CopyState::Active),
        Track::new(2, 20, false, CopyState::Active),
    ];
    let mut o = OwnerState::new(6, 1, 16, tracks);
    o.fenced(1, 1);
    let mut scanning = o.clone();
    scanning.track_mut(1).scan = Some(0);
    assert!(matches!(scanning.barrier(), Err(ReplicaError::NotNow { .. })));
    assert!(o.barrier().is_ok());
}

#[test]
fn a_newer_epoch_at_the_barrier_deposes() {
    let mut o = owner();
    let b = o.barrier().unwrap();
    let f = o.finish(&b.write, vec![(1, Reply::StaleEpoch { newest: 9 })], true);
    assert_eq!(f, Finished::Deposed { newest: 9 });
}

#[test]
fn a_pending_copy_catches_up_oldest_first_from_its_bitmap_then_takes_it() {
    let r = with_made(&with_made(&[], "s1", key(6, 1)), "s2", key(6, 2));
    let p = pending(&r, copy(3));
    assert_eq!(p.iter().map(|s| s.snapshot.as_str()).collect::<Vec<_>>(), ["s1", "s2"]);
    assert!(pending(&r, copy(1)).is_empty());
    assert!(!may_resync(&r, copy(3)), "S5: no writes before every snapshot is taken");
    assert!(may_catch_up(CopyState::Stale) && !may_catch_up(CopyState::Resyncing));
    let dirty: BTreeSet<u64> = [2, 3, 4, 9].into();
    let k = p[0].id;
    let step = |owes, from, batch| catch_up_step(k, &dirty, owes, 16, from, batch);
    assert_eq!(step(false, 0, 8), CatchUp::Level { key: k, range: 2..5 });
    assert_eq!(step(false, 5, 8), CatchUp::Level { key: k, range: 9..10 });
    assert_eq!(step(false, 10, 8), CatchUp::Take { key: k });
    assert_eq!(step(false, 0, 2), CatchUp::Level { key: k, range: 2..4 });
    // Owing a scan: every region, in batches.
    assert_eq!(step(true, 0, 10), CatchUp::Level { key: k, range: 0..10 });
    assert_eq!(step(true, 10, 10), CatchUp::Level { key: k, range: 10..16 });
    assert_eq!(step(true, 16, 10), CatchUp::Take { key: k });
    let second = p[1].id;
    let r = caught_up(&r, k, copy(3)).unwrap();
    assert_eq!(pending(&r, copy(3)).len(), 1);
    let r = caught_up(&r, second, copy(3)).unwrap();
    assert!(may_resync(&r, copy(3)));
    let making = begun(&r, "s3", key(6, 3)).unwrap();
    assert!(!may_resync(&making, copy(3)), "a barrier under way will not list it");
}

#[test]
fn a_deleted_snapshot_leaves_each_copy_and_then_the_record_and_is_never_served_again() {
    let k = key(6, 1);
    let r = with_made(&[], "s1", k);
    assert!(readable_on(&r, "s1", copy(2)) && !readable_on(&r, "s1", copy(3)));
    let (r, got) = begin_delete(&r, "vm", "s1").unwrap();
    assert_eq!(got, k);
    assert!(!readable_on(&r, "s1", copy(1)), "S6: not served while deleting");
    assert_eq!(to_remove(&r, &[k, 99]), vec![k, 99], "deleting, and unknown to the record");
    assert_eq!(caught_up(&r, k, copy(3)), None, "a pending copy never takes it now");
    let r = removed_from(&r, k, copy(1));
    assert_eq!(r.len(), 1, "copy 2 still holds it");
    let r = removed_from(&r, k, copy(2));
    assert!(r.is_empty());
    assert!(matches!(begin_delete(&r, "vm", "s1"), Err(SnapshotError::NotFound { .. })));
}

#[test]
fn a_copy_keeps_a_snapshot_being_made_and_a_made_one() {
    let (k1, k2) = (key(6, 1), key(6, 2));
    let r = begun(&with_made(&[], "s1", k1), "s2", k2).unwrap();
    assert!(to_remove(&r, &[k1, k2]).is_empty());
    assert!(matches!(begin_delete(&r, "vm", "s2"), Err(SnapshotError::Busy { .. })));
}

#[test]
fn a_replicated_snapshot_is_stored_as_the_design_shows_and_a_plain_one_as_before() {
    let s = SnapshotRecord {
        snapshot: "s1".into(),
        size_bytes: 4_194_304,
        created_unix: 1_765_000_000,
        id: 77,
        state: Some(SnapshotState::Ready),
        epoch: 6,
        copies: vec![CopyRef { node: 1, id: 11 }, CopyRef { node: 2, id: 12 }],
    };
    let json = serde_json::to_string(&s).unwrap();
    let expected = concat!(
        r#"{"snapshot":"s1","size_bytes":4194304,"created_unix":1765000000,"#,
        r#""id":77,"state":"ready","epoch":6,"copies":[{"node":1,"id":11},{"node":2,"id":12}]}"#
    );
    assert_eq!(json, expected);
    assert_eq!(serde_json::from_str::<SnapshotRecord>(&json).unwrap(), s);
    let plain = SnapshotRecord::plain("s", 4096, 5);
    assert_eq!(
        serde_json::to_string(&plain).unwrap(),
        r#"{"snapshot":"s","size_bytes":4096,"created_unix":5}"#
    );
    let bad = r#"{"snapshot":"s","size_bytes":1,"created_unix":1,"state":"half"}"#;
    assert!(serde_json::from_str::<SnapshotRecord>(bad).is_err(), "an unknown state is refused");
}

fn folded(f: Finished) {
    assert!(matches!(f, Finished::Folded { .. }), "{f:?}");
}
