//! Shared by the Raft tests: members on the in-process network, a 3-member cluster, and
//! waiting for a leader.

use super::router::Router;
use super::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// A member: its Raft and a handle on its state machine.
pub struct Member {
    pub raft: openraft::Raft<TypeConfig>,
    pub state: StateMachineStore,
}

/// Starts member `id` on `router`, its database in `dir` (reopened if it exists: a
/// restart after a crash).
pub async fn start(router: &Router, dir: &std::path::Path, id: NodeId) -> Member {
    let (log, sm) = open_inline(&dir.join(format!("meta{id}.redb"))).unwrap();
    let config = openraft::Config {
        heartbeat_interval: 50,
        election_timeout_min: 300,
        election_timeout_max: 600,
        ..Default::default()
    };
    let config = Arc::new(config.validate().unwrap());
    let raft = openraft::Raft::new(id, config, router.network(id), log, sm.clone()).await.unwrap();
    router.add(id, raft.clone());
    Member { raft, state: sm }
}

/// Members 1, 2 and 3, initialized as one cluster.
pub async fn cluster(router: &Router, dir: &std::path::Path) -> BTreeMap<NodeId, Member> {
    let mut members = BTreeMap::new();
    for id in 1..=3 {
        members.insert(id, start(router, dir, id).await);
    }
    let nodes: BTreeMap<NodeId, BasicNode> =
        (1..=3).map(|id| (id, BasicNode::new(format!("n{id}")))).collect();
    members[&1].raft.initialize(nodes).await.unwrap();
    members
}

/// The member that believes it leads, if any.
pub fn leader_of(members: &BTreeMap<NodeId, Member>) -> Option<NodeId> {
    members
        .iter()
        .find_map(|(id, m)| (m.raft.metrics().borrow().current_leader == Some(*id)).then_some(*id))
}

/// Waits (up to 10 s) for a leader.
pub async fn wait_leader(members: &BTreeMap<NodeId, Member>) -> NodeId {
    for _ in 0..400 {
        if let Some(id) = leader_of(members) {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no leader elected");
}

/// A single-thread runtime with paused time: timers fire as soon as nothing else can run.
pub fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap()
}
