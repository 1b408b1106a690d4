//! Frames: round trip, a wrong secret refused, garbage never panics; members over real
//! TCP on loopback elect and agree, and a member without the secret takes no part.

use super::*;
use crate::raft::open;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

#[tokio::test]
async fn frames_round_trip_and_a_wrong_secret_is_refused() {
    let key = Key::from_secret(b"cluster secret");
    let frame = encode(&key, &vec![1u64, 2, 3]);
    let back: Vec<u64> = read_frame(&mut &frame[..], &key).await.unwrap();
    assert_eq!(back, vec![1, 2, 3]);
    let other = Key::from_secret(b"another secret");
    let err = read_frame::<Vec<u64>>(&mut &frame[..], &other).await.unwrap_err();
    assert!(matches!(err, FrameError::Unauthenticated), "{err}");
    // A flipped bit of the body fails the MAC too.
    let mut damaged = frame.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    assert!(matches!(
        read_frame::<Vec<u64>>(&mut &damaged[..], &key).await,
        Err(FrameError::Unauthenticated)
    ));
    let mut long = frame.clone();
    long[4..8].copy_from_slice(&(FRAME_BYTES_MAX as u32 + 1).to_le_bytes());
    assert!(matches!(
        read_frame::<Vec<u64>>(&mut &long[..], &key).await,
        Err(FrameError::TooLong(_))
    ));
}

proptest! {
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let key = Key::from_secret(b"s");
        let result = runtime.block_on(read_frame::<Request>(&mut &bytes[..], &key));
        prop_assert!(result.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_over_tcp_agree_and_one_without_the_secret_takes_no_part() {
    let dir = tempfile::tempdir().unwrap();
    let mut members = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    let mut listeners = Vec::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        nodes.insert(id, BasicNode::new(listener.local_addr().unwrap().to_string()));
        listeners.push((id, listener));
    }
    for (id, listener) in listeners {
        // Member 3 has the wrong secret.
        let secret: &[u8] = if id == 3 { b"wrong" } else { b"right" };
        let key = Key::from_secret(secret);
        let (log, sm) = open(&dir.path().join(format!("m{id}.redb"))).unwrap();
        let config = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 200,
            election_timeout_max: 400,
            ..Default::default()
        };
        let config = Arc::new(config.validate().unwrap());
        let raft =
            Raft::new(id, config, TcpNetwork::new(key.clone()), log, sm.clone()).await.unwrap();
        tokio::spawn(serve(listener, raft.clone(), key));
        members.insert(id, (raft, sm));
    }
    members[&1].0.initialize(nodes).await.unwrap();
    let leader = 'found: {
        for _ in 0..200 {
            for (id, (raft, _)) in &members {
                if raft.metrics().borrow().current_leader == Some(*id) {
                    break 'found *id;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("no leader");
    };
    assert_ne!(leader, 3, "the member without the secret cannot win an election");
    let op = crate::state::Origin::Operator;
    let r = members[&leader].0.client_write(crate::state::cas(op, "/k", 0, b"v".to_vec())).await;
    assert!(matches!(r.unwrap().data, crate::state::Response::Txn { succeeded: true, .. }));
    let follower = if leader == 1 { 2 } else { 1 };
    for _ in 0..100 {
        if members[&follower].1.read(|s| s.get("/k").is_some()) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(members[&follower].1.read(|s| s.get("/k").is_some()), "the follower applied it");
    // Well after the others applied it, the outsider still has nothing.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(members[&3].1.read(|s| s.get("/k").is_none()), "the outsider received nothing");
    for (raft, _) in members.values() {
        raft.shutdown().await.unwrap();
    }
}
