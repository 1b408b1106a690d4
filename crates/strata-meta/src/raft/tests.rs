//! openraft's storage conformance suite against the redb log and the state machine, and
//! a restart that keeps the vote, the log and the last snapshot.

use super::*;
use openraft::testing::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore)> {
        let dir = tempfile::tempdir().map_err(write_err)?;
        let (log, sm) = open(&dir.path().join("meta.redb"))?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_conformance_suite() {
    Suite::test_all(Builder).unwrap();
}

#[tokio::test]
async fn a_restart_keeps_the_vote_and_the_last_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    let vote = Vote::new(3, 1);
    {
        let (mut log, mut sm) = open(&path).unwrap();
        log.save_vote(&vote).await.unwrap();
        let id = |index| LogId::new(openraft::CommittedLeaderId::new(3, 1), index);
        let entry = |index, command| Entry::<TypeConfig> {
            log_id: id(index),
            payload: EntryPayload::Normal(command),
        };
        let responses = sm
            .apply([
                entry(1, crate::state::cas(crate::state::Origin::Operator, "k", 0, b"v".to_vec())),
                entry(2, crate::state::cas(crate::state::Origin::Operator, "k", 0, b"w".to_vec())),
            ])
            .await
            .unwrap();
        assert_eq!(responses[1], Response::Txn { succeeded: false, revision: 1 });
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    }
    let (mut log, mut sm) = open(&path).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(vote));
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied.map(|id| id.index), Some(2));
    assert_eq!(sm.read(|s| s.get("k").unwrap().value.clone()), b"v");
}

use super::testkit::{cluster, wait_leader};

#[tokio::test]
async fn a_restarted_leader_does_not_resume_leading_without_an_election() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.redb");
    {
        let (mut log, _sm) = open(&path).unwrap();
        log.save_vote(&Vote::new_committed(3, 1)).await.unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(3, 1)));
    }
    // Same term, same candidate (no new vote is granted), but not committed: openraft
    // starts it as a follower, and it leads again only through an election.
    let (mut log, _sm) = open(&path).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(3, 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_agree_and_survive_the_loss_of_the_leader() {
    let dir = tempfile::tempdir().unwrap();
    let router = router::Router::default();
    let mut members = cluster(&router, dir.path()).await;
    let first = wait_leader(&members).await;

    // CAS through the leader: exactly one of two racing creates wins.
    let op = crate::state::Origin::Operator;
    let a = members[&first].raft.client_write(crate::state::cas(op, "/owner", 0, b"a".to_vec()));
    let b = members[&first].raft.client_write(crate::state::cas(op, "/owner", 0, b"b".to_vec()));
    let (a, b) = tokio::join!(a, b);
    let wins = [a.unwrap().data, b.unwrap().data]
        .iter()
        .filter(|r| matches!(r, Response::Txn { succeeded: true, .. }))
        .count();
    assert_eq!(wins, 1);

    // The leader dies; the others elect one and go on; a linearizable read sees the value.
    router.remove(first);
    members.remove(&first).unwrap().raft.shutdown().await.unwrap();
    let second = wait_leader(&members).await;
    assert_ne!(second, first);
    let owner = members[&second].state.read(|s| s.get("/owner").cloned()).unwrap();
    let r = members[&second]
        .raft
        .client_write(crate::state::cas(op, "/owner", owner.version, b"c".to_vec()))
        .await
        .unwrap();
    assert!(matches!(r.data, Response::Txn { succeeded: true, .. }), "{:?}", r.data);
    members[&second].raft.ensure_linearizable().await.unwrap();
    assert_eq!(members[&second].state.read(|s| s.get("/owner").unwrap().value.clone()), b"c");
    // A leader cut off from the majority cannot confirm its leadership for a read (no
    // stale read from a deposed or isolated leader): it fails or never answers.
    router.partition(&[second]);
    let read = members[&second].raft.ensure_linearizable();
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(3), read).await;
    assert!(!matches!(outcome, Ok(Ok(_))), "an isolated leader confirmed a read");
    router.heal();
    for m in members.values() {
        m.raft.shutdown().await.unwrap();
    }
}
