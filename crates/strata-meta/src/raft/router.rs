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

    fn target(&self, from: NodeId, to: NodeId) -> Result<Raft<TypeConfig>, Unreachable> {
        let inner = self.inner.lock().expect("not poisoned");
        if inner.cut.contains(&link(from, to)) {
            return Err(Unreachable::new(&std::io::Error::other("link cut")));
        }
        inner
            .members
            .get(&to)
            .cloned()
            .ok_or_else(|| Unreachable::new(&std::io::Error::other("member down")))
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
    fn target(&self) -> Result<Raft<TypeConfig>, Unreachable> {
        self.router.target(self.from, self.to)
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let raft = self.target()?;
        raft.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let raft = self.target()?;
        raft.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let raft = self.target()?;
        raft.vote(rpc).await.map_err(|e| RPCError::RemoteError(RemoteError::new(self.to, e)))
    }
}
