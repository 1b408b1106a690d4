//! An in-process network for Raft members: RPCs are direct calls on the target member,
//! and links can be cut (a partition) or a member removed (a crash). The deterministic
//! simulation and the in-process cluster tests use it; real members will speak the
//! authenticated TCP RPC instead.

use super::{NodeId, TypeConfig};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// The members and which links are cut.
#[derive(Clone, Default)]
pub struct Router {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    members: BTreeMap<NodeId, Raft<TypeConfig>>,
    /// Cut links, both directions: (lower id, higher id).
    cut: BTreeSet<(NodeId, NodeId)>,
    /// Message faults: a seeded generator, the chance in 1000 of dropping a message and
    /// the longest delay in ms (delays also reorder messages).
    faults: Option<(u64, u64, u64)>,
}

fn link(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    (a.min(b), a.max(b))
}

impl Router {
    /// Adds (or replaces) a member.
    pub fn add(&self, id: NodeId, raft: Raft<TypeConfig>) {
        self.inner.lock().expect("not poisoned").members.insert(id, raft);
    }

    /// Removes a member: it is unreachable from now on (a crash, from the others' view).
    pub fn remove(&self, id: NodeId) -> Option<Raft<TypeConfig>> {
        self.inner.lock().expect("not poisoned").members.remove(&id)
    }

    /// Cuts every link between `side` and the other members.
    pub fn partition(&self, side: &[NodeId]) {
        let mut inner = self.inner.lock().expect("not poisoned");
        let all: Vec<NodeId> = inner.members.keys().copied().collect();
        for a in side {
            for b in all.iter().filter(|b| !side.contains(b)) {
                inner.cut.insert(link(*a, *b));
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.inner.lock().expect("not poisoned").cut.clear();
    }

    /// Drops each message with probability `drop_per_mille`/1000 and delays each by up to
    /// `delay_ms_max` (so messages also overtake each other), from seed `seed`.
    pub fn set_faults(&self, seed: u64, drop_per_mille: u64, delay_ms_max: u64) {
        self.inner.lock().expect("not poisoned").faults =
            Some((seed | 1, drop_per_mille, delay_ms_max));
    }

    /// The target member, or why it cannot be reached; and a delay to apply first.
    fn target(&self, from: NodeId, to: NodeId) -> Result<(Raft<TypeConfig>, u64), Unreachable> {
        let mut inner = self.inner.lock().expect("not poisoned");
        if inner.cut.contains(&link(from, to)) {
            return Err(Unreachable::new(&std::io::Error::other("link cut")));
        }
        let mut delay = 0;
        if let Some((state, drop, delay_max)) = &mut inner.faults {
            let mut next = || {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                *state
            };
            if next() % 1000 < *drop {
                return Err(Unreachable::new(&std::io::Error::other("message lost")));
            }
            delay = next() % (*delay_max + 1);
        }
        let raft = inner
            .members
            .get(&to)
            .cloned()
            .ok_or_else(|| Unreachable::new(&std::io::Error::other("member down")))?;
        Ok((raft, delay))
    }

    /// A network factory for member `from`.
    pub fn network(&self, from: NodeId) -> Network {
        Network { router: self.clone(), from }
    }
}

/// Member `from`'s view of the network.
#[derive(Clone)]
pub struct Network {
    router: Router,
    from: NodeId,
}

/// A connection from one member to another.
pub struct Connection {
    router: Router,
    from: NodeId,
    to: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        Connection { router: self.router.clone(), from: self.from, to: target }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Connection {
    async fn target(&self) -> Result<Raft<TypeConfig>, Unreachable> {
        let (raft, delay) = self.router.target(self.from, self.to)?;
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        Ok(raft)
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let raft = self.target().await?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let raft = self.target().await?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let raft = self.target().await?;
        raft.vote(rpc).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }
}
