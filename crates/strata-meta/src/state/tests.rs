//! The state machine against a model (versioned map + sessions), for random command
//! sequences; refusals change nothing; fencing of stale incarnations; leases; watch.

use super::*;
use proptest::prelude::*;

const OP: Origin = Origin::Operator;

/// A transaction without compares: just writes.
fn writes(success: Vec<Op>) -> Command {
    Command::Txn { origin: OP, compares: vec![], success, failure: vec![] }
}

fn put(key: &str, value: &[u8]) -> Op {
    Op::Put { key: key.to_owned(), value: value.to_vec(), lease: None }
}

#[test]
fn cas_succeeds_only_on_the_expected_version() {
    let mut s = State::default();
    assert_eq!(
        s.apply(&cas(OP, "a", 0, b"1".to_vec())),
        Response::Txn { succeeded: true, revision: 1 }
    );
    // Absent expected, but it exists now: no change, no new revision.
    assert_eq!(
        s.apply(&cas(OP, "a", 0, b"2".to_vec())),
        Response::Txn { succeeded: false, revision: 1 }
    );
    assert_eq!(s.get("a").unwrap().value, b"1");
    assert_eq!(
        s.apply(&cas(OP, "a", 1, b"3".to_vec())),
        Response::Txn { succeeded: true, revision: 2 }
    );
    assert_eq!(s.get("a").unwrap().version, 2);
    // A wrong version, and a CAS on a missing key with a non-zero version.
    assert_eq!(
        s.apply(&cas(OP, "a", 1, b"4".to_vec())),
        Response::Txn { succeeded: false, revision: 2 }
    );
    assert_eq!(
        s.apply(&cas(OP, "b", 5, b"4".to_vec())),
        Response::Txn { succeeded: false, revision: 2 }
    );
    assert!(s.get("b").is_none());
}

#[test]
fn a_transaction_applies_all_or_the_other_branch() {
    let mut s = State::default();
    s.apply(&Command::Txn {
        origin: OP,
        compares: vec![],
        success: vec![put("x", b"1"), put("y", b"1")],
        failure: vec![],
    });
    let txn = Command::Txn {
        origin: OP,
        compares: vec![Compare::Version("x".into(), 1), Compare::Value("y".into(), b"2".to_vec())],
        success: vec![put("x", b"ok"), Op::Delete { key: "y".into() }],
        failure: vec![put("z", b"failed")],
    };
    assert_eq!(s.apply(&txn), Response::Txn { succeeded: false, revision: 2 });
    assert_eq!(s.get("x").unwrap().value, b"1");
    assert_eq!(s.get("z").unwrap().value, b"failed");
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut s = State::default();
    s.apply(&cas(OP, "k", 0, b"v".to_vec()));
    let before = s.clone();
    let long = "k".repeat(KEY_BYTES_MAX + 1);
    for command in [
        cas(OP, "", 0, b"v".to_vec()),
        cas(OP, &long, 0, b"v".to_vec()),
        cas(OP, "k2", 0, vec![0; VALUE_BYTES_MAX + 1]),
        Command::Txn {
            origin: OP,
            compares: vec![],
            success: vec![put("a", b"1"); TXN_OPS_MAX + 1],
            failure: vec![],
        },
        Command::Txn {
            origin: OP,
            compares: vec![],
            success: vec![Op::Put { key: "l".into(), value: vec![], lease: Some(99) }],
            failure: vec![],
        },
        Command::LeaseKeepAlive { origin: OP, lease: 7, now_ms: 0 },
        Command::LeaseRevoke { origin: OP, lease: 7 },
        Command::LeaseGrant { origin: OP, ttl_ms: 0, now_ms: 0 },
        Command::Heartbeat { origin: Origin::Node { node: 3, incarnation: 1 }, now_ms: 0 },
    ] {
        assert!(matches!(s.apply(&command), Response::Refused(_)), "{command:?}");
        assert_eq!(s, before, "{command:?} changed the state");
    }
}

#[test]
fn a_node_declared_down_cannot_apply_what_it_prepared_before() {
    let mut s = State::default();
    let Response::Registered { incarnation, lease } =
        s.apply(&Command::Register { node: 1, now_ms: 0 })
    else {
        panic!()
    };
    let me = Origin::Node { node: 1, incarnation };
    // An ownership tied to the session.
    let own = Op::Put { key: "/volumes/v/owner".into(), value: b"1".to_vec(), lease: Some(lease) };
    let put = Command::Txn { origin: me, compares: vec![], success: vec![own], failure: vec![] };
    assert!(matches!(s.apply(&put), Response::Txn { succeeded: true, .. }));
    assert_eq!(s.apply(&Command::Heartbeat { origin: me, now_ms: 5_000 }), Response::Ok);
    // Not yet past the timeout after the last heartbeat: still up.
    assert_eq!(
        s.apply(&Command::Expire { now_ms: 14_000 }),
        Response::Expired { nodes: vec![], leases: vec![] }
    );
    // Silent past the timeout: down, incarnation bumped.
    assert_eq!(
        s.apply(&Command::Expire { now_ms: 15_000 }),
        Response::Expired { nodes: vec![1], leases: vec![lease] }
    );
    assert_eq!(s.get("/volumes/v/owner"), None, "its ownership was released");
    let before = s.clone();
    let late = s.apply(&cas(me, "owner", 0, b"node1".to_vec()));
    assert_eq!(late, Response::Refused(Refusal::StaleIncarnation { node: 1, sent: 1, current: 2 }));
    assert_eq!(s, before);
    // Re-registering gives a newer incarnation, which works.
    let Response::Registered { incarnation, .. } =
        s.apply(&Command::Register { node: 1, now_ms: 16_000 })
    else {
        panic!()
    };
    assert_eq!(incarnation, 3);
    let me = Origin::Node { node: 1, incarnation };
    assert!(matches!(
        s.apply(&cas(me, "owner", 0, b"node1".to_vec())),
        Response::Txn { succeeded: true, .. }
    ));
}

#[test]
fn leases_expire_are_kept_alive_and_revoked_with_their_keys() {
    let mut s = State::default();
    let Response::Lease { lease } =
        s.apply(&Command::LeaseGrant { origin: OP, ttl_ms: 1000, now_ms: 0 })
    else {
        panic!()
    };
    let with_lease =
        |key: &str| Op::Put { key: key.into(), value: b"v".to_vec(), lease: Some(lease) };
    s.apply(&Command::Txn {
        origin: OP,
        compares: vec![],
        success: vec![with_lease("a"), with_lease("b"), put("c", b"v")],
        failure: vec![],
    });
    s.apply(&Command::LeaseKeepAlive { origin: OP, lease, now_ms: 900 });
    assert_eq!(
        s.apply(&Command::Expire { now_ms: 1500 }),
        Response::Expired { nodes: vec![], leases: vec![] }
    );
    assert!(s.get("a").is_some());
    let revision = s.revision();
    assert_eq!(
        s.apply(&Command::Expire { now_ms: 1900 }),
        Response::Expired { nodes: vec![], leases: vec![lease] }
    );
    assert!(s.get("a").is_none() && s.get("b").is_none() && s.get("c").is_some());
    assert_eq!(s.revision(), revision + 1, "one revision for the lease's deletes");
    assert!(matches!(
        s.apply(&Command::LeaseRevoke { origin: OP, lease }),
        Response::Refused(Refusal::UnknownLease(_))
    ));
}

#[test]
fn watch_returns_changes_in_order_and_reports_compaction() {
    let mut s = State::default();
    for i in 0..(HISTORY_MAX as u64 + 10) {
        s.apply(&Command::Txn {
            origin: OP,
            compares: vec![],
            success: vec![put(&format!("/v/{}", i % 3), b"x")],
            failure: vec![],
        });
    }
    let Watch::Changes(changes) = s.watch("/v/1", s.revision() - 5) else { panic!() };
    assert!(changes.windows(2).all(|w| w[0].revision < w[1].revision));
    assert!(changes.iter().all(|c| c.key == "/v/1"));
    assert!(matches!(s.watch("/v/", 1), Watch::Compacted { .. }));
}

enum Kind {
    Delete,
    Other,
}

#[derive(Clone, Debug)]
enum Step {
    Cas { key: u8, version: u64, value: u8 },
    Put { key: u8, value: u8 },
    Delete { key: u8 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0u8..4, 0u64..6, any::<u8>()).prop_map(|(key, version, value)| Step::Cas {
            key,
            version,
            value
        }),
        (0u8..4, any::<u8>()).prop_map(|(key, value)| Step::Put { key, value }),
        (0u8..4).prop_map(|key| Step::Delete { key }),
    ]
}

proptest! {
    /// Against a model of (value, version) per key: CAS succeeds exactly when the model's
    /// version matches; the revision grows by one per change; the same commands applied
    /// to a second state machine give the same state (determinism).
    #[test]
    fn the_state_machine_matches_a_model(steps in proptest::collection::vec(step(), 1..200)) {
        let mut s = State::default();
        let mut model: BTreeMap<String, (Vec<u8>, u64)> = BTreeMap::new();
        let mut revision = 0;
        let mut log = Vec::new();
        for step in steps {
            let step_kind = match step {
                Step::Delete { .. } => Kind::Delete,
                _ => Kind::Other,
            };
            let (command, expect_change) = match step {
                Step::Cas { key, version, value } => {
                    let k = format!("k{key}");
                    let holds = model.get(&k).map_or(0, |e| e.1) == version;
                    (cas(OP, &k, version, vec![value]), holds)
                }
                Step::Put { key, value } => {
                    let k = format!("k{key}");
                    (writes(vec![put(&k, &[value])]), true)
                }
                Step::Delete { key } => {
                    let k = format!("k{key}");
                    let exists = model.contains_key(&k);
                    (writes(vec![Op::Delete { key: k }]), exists)
                }
            };
            let response = s.apply(&command);
            if expect_change {
                revision += 1;
                if let Command::Txn { success, .. } = &command {
                    for op in success {
                        match op {
                            Op::Put { key, value, .. } => {
                                model.insert(key.clone(), (value.clone(), revision));
                            }
                            Op::Delete { key } => {
                                model.remove(key);
                            }
                        }
                    }
                }
            }
            let succeeded = expect_change || matches!(step_kind, Kind::Delete);
            prop_assert_eq!(response, Response::Txn { succeeded, revision });
            for (k, (value, version)) in &model {
                let e = s.get(k).expect("in the model");
                prop_assert_eq!(&e.value, value);
                prop_assert_eq!(e.version, *version);
            }
            prop_assert_eq!(s.range("k", 100).len(), model.len());
            log.push(command);
        }
        let mut replica = State::default();
        for command in &log {
            replica.apply(command);
        }
        prop_assert_eq!(replica, s);
    }
}
