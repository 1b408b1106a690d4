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
    assert_eq!(sm.state().get("k").unwrap().value, b"v");
}
