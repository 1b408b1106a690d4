//! Replicated volumes, first step (`docs/design/replication.md`): placement of
//! components on distinct nodes, ownership by CAS, and the owner's write fan-out.
//!
//! Invariants:
//! 1. A volume's components are on distinct nodes, spread over racks then sites first.
//! 2. The owner holds `/volumes/<name>/owner = {node, epoch}`, taken by CAS with a higher
//!    epoch than any before; every request it sends carries that epoch, so components
//!    refuse a deposed owner (`dataplane.rs`).
//! 3. A write's reply means every component holds it (in its store); a FLUSH/FUA reply,
//!    that every component synced it. Until STALE marking and resync are built, a write
//!    that one component cannot take fails (EIO) — never a silent degrade.
//! 4. Reads come from the owner's local component.

use crate::error::{ApiError, ApiResult};
use crate::node::{Component, Node};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use strata_io::{BlockVolume, Extent, StoreError, ZeroMode};
use strata_meta::service::{ClientReply, ClientRequest, Member};
use strata_meta::state::{Command, Compare, Op, Response};
use strata_replica::client::{request, DataPeer};
use strata_replica::frame::{DataKey, Kind, FLAG_FUA, PAYLOAD_BYTES_MAX};
use strata_types::ErrorCode;

/// How long a component may take to answer one request.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One component in a volume's record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ComponentRecord {
    /// The node holding it.
    pub node: u64,
    /// Its id on that node.
    pub id: u64,
    /// `active` (only state so far).
    pub state: String,
}

/// `/volumes/<name>/owner`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The owning node.
    pub node: u64,
    /// Its epoch.
    pub epoch: u64,
}

/// A node as placement sees it.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// Node id.
    pub id: u64,
    /// Its RPC address.
    pub rpc: String,
    /// Site.
    pub site: String,
    /// Rack.
    pub rack: String,
}

/// Chooses `n` distinct nodes, `me` first, then the others preferring a site, then a rack,
/// not yet used (invariant 1). `None` if there are fewer than `n` nodes.
pub fn place(me: u64, candidates: &[Candidate], n: usize) -> Option<Vec<Candidate>> {
    let mut chosen: Vec<Candidate> = candidates.iter().filter(|c| c.id == me).cloned().collect();
    let mut rest: Vec<Candidate> = candidates.iter().filter(|c| c.id != me).cloned().collect();
    rest.sort_by_key(|c| c.id);
    while chosen.len() < n {
        let score = |c: &Candidate| {
            let site = chosen.iter().any(|x| x.site == c.site) as u8;
            let rack = chosen.iter().any(|x| x.site == c.site && x.rack == c.rack) as u8;
            (site, rack, c.id)
        };
        let best = rest.iter().enumerate().min_by_key(|(_, c)| score(c)).map(|(i, _)| i)?;
        chosen.push(rest.remove(best));
    }
    Some(chosen)
}

enum Target {
    /// The owner's own component (`ReplicatedVolume::local`).
    Local,
    Remote {
        peer: Arc<DataPeer>,
        id: u64,
    },
}

/// The owner's view of a replicated volume: a `BlockVolume` whose writes go to every
/// component.
pub struct ReplicatedVolume {
    size_bytes: u64,
    epoch: u64,
    lsn: AtomicU64,
    local: Component,
    targets: Vec<Target>,
    runtime: tokio::runtime::Handle,
}

fn io_error(what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::io(what)(std::io::Error::other(e.to_string()))
}

impl ReplicatedVolume {
    /// Runs `call` on every remote component (on the runtime) while `local` runs here,
    /// and fails if any fails (invariant 3).
    fn fan_out(
        &self,
        kind: Kind,
        offset: u64,
        count: u32,
        payload: &[u8],
        fua: bool,
        local: impl FnOnce(&Component) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let lsn = self.lsn.fetch_add(1, Ordering::Relaxed) + 1;
        let mut remote = Vec::new();
        for t in &self.targets {
            if let Target::Remote { peer, id } = t {
                let mut h = request(kind, *id, self.epoch, lsn, offset);
                h.count = count;
                if fua {
                    h.flags = FLAG_FUA;
                }
                let (peer, payload) = (peer.clone(), payload.to_vec());
                remote.push(self.runtime.spawn(async move {
                    match tokio::time::timeout(IO_TIMEOUT, peer.call(h, &payload)).await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".to_owned()),
                    }
                }));
            }
        }
        let here = local(&self.local);
        let mut failed = None;
        for r in remote {
            match self.runtime.block_on(r) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed = Some(e),
                Err(e) => failed = Some(e.to_string()),
            }
        }
        here?;
        match failed {
            None => Ok(()),
            Some(e) => {
                tracing::error!(offset, "a component did not take the request: {e}");
                Err(io_error("replicate", format!("a component did not take it: {e}")))
            }
        }
    }
}

impl BlockVolume for ReplicatedVolume {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn allocated_bytes(&self) -> Result<u64, StoreError> {
        self.local.volume.allocated_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        self.local.volume.read_at(buf, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), StoreError> {
        for (i, chunk) in data.chunks(PAYLOAD_BYTES_MAX).enumerate() {
            let at = offset + (i * PAYLOAD_BYTES_MAX) as u64;
            self.fan_out(Kind::Write, at, 0, chunk, false, |c| c.volume.write_at(chunk, at))?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        for at in (offset..offset + length).step_by(1 << 30) {
            let n = (offset + length - at).min(1 << 30);
            self.fan_out(Kind::Trim, at, n as u32, &[], false, |c| c.volume.trim(at, n))?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode) -> Result<(), StoreError> {
        // A trimmed range reads as zeroes on every component.
        for at in (offset..offset + length).step_by(1 << 30) {
            let n = (offset + length - at).min(1 << 30);
            self.fan_out(Kind::Trim, at, n as u32, &[], false, |c| {
                c.volume.write_zeroes(at, n, mode)
            })?;
        }
        Ok(())
    }

    fn extents(&self, offset: u64, length: u64, max: usize) -> Result<Vec<Extent>, StoreError> {
        self.local.volume.extents(offset, length, max)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.fan_out(Kind::Flush, 0, 0, &[], false, |c| c.volume.sync())
    }

    fn resize(&self, _size_bytes: u64) -> Result<(), StoreError> {
        Err(io_error("resize", "resizing a replicated volume is not supported yet"))
    }
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, e.to_string())
}

async fn write(meta: &Member, compares: Vec<Compare>, success: Vec<Op>) -> ApiResult<bool> {
    let txn = Command::Txn { origin: meta.origin(), compares, success, failure: vec![] };
    match meta.request(ClientRequest::Write(txn)).await.map_err(unavailable)? {
        ClientReply::Written(Response::Txn { succeeded, .. }) => Ok(succeeded),
        other => Err(unavailable(format!("the metadata service answered {other:?}"))),
    }
}

/// Takes ownership of `name`: epoch one above the last (invariant 2).
pub async fn take_ownership(meta: &Member, name: &str) -> ApiResult<Owner> {
    let key = format!("/volumes/{name}/owner");
    for _ in 0..10 {
        let (current, version) = match meta
            .request(ClientRequest::Get { key: key.clone() })
            .await
            .map_err(unavailable)?
        {
            ClientReply::Value { entry: Some(e), .. } => {
                (serde_json::from_slice::<Owner>(&e.value).ok(), e.version)
            }
            _ => (None, 0),
        };
        let owner = Owner { node: meta.id(), epoch: current.map_or(1, |o| o.epoch + 1) };
        let value = serde_json::to_vec(&owner).expect("serializes");
        let put = Op::Put { key: key.clone(), value, lease: None };
        if write(meta, vec![Compare::Version(key.clone(), version)], vec![put]).await? {
            return Ok(owner);
        }
    }
    Err(unavailable(format!("could not take ownership of {name}: it keeps changing")))
}

/// Opens the owner's view of a replicated volume.
pub fn open(
    node: &Node,
    meta: &Member,
    size_bytes: u64,
    owner: Owner,
    components: &[ComponentRecord],
    rpc_of: impl Fn(u64) -> Option<String>,
) -> ApiResult<ReplicatedVolume> {
    let key = DataKey::from_secret(meta.secret());
    let mut local = None;
    let mut targets = Vec::new();
    for c in components {
        if c.node == meta.id() {
            let here = node.component(c.id).ok_or_else(|| {
                ApiError::new(ErrorCode::Io, format!("component {} is missing here", c.id))
            })?;
            local = Some(here);
            targets.push(Target::Local);
        } else {
            let rpc = rpc_of(c.node).ok_or_else(|| {
                unavailable(format!("node {} (holding a component) has no address", c.node))
            })?;
            targets
                .push(Target::Remote { peer: Arc::new(DataPeer::new(key.clone(), rpc)), id: c.id });
        }
    }
    let local = local.ok_or_else(|| ApiError::invalid("the owner holds no component"))?;
    Ok(ReplicatedVolume {
        size_bytes,
        epoch: owner.epoch,
        lsn: AtomicU64::new(0),
        local,
        targets,
        runtime: tokio::runtime::Handle::current(),
    })
}

/// The RPC address of `node` from its record (this member's applied state).
pub fn rpc_of(meta: &Member, node: u64) -> Option<String> {
    meta.read_local(|s| {
        let e = s.get(&format!("/nodes/{node}"))?;
        let v: serde_json::Value = serde_json::from_slice(&e.value).ok()?;
        v["rpc"].as_str().map(str::to_owned)
    })
}

/// The nodes that are up, for placement (a linearizable read of the cluster status).
async fn candidates(meta: &Member) -> ApiResult<Vec<Candidate>> {
    let ClientReply::Status(status) =
        meta.request(ClientRequest::Status).await.map_err(unavailable)?
    else {
        return Err(unavailable("the metadata service answered something else"));
    };
    Ok(status
        .members
        .iter()
        .filter(|m| m.session.as_ref().is_some_and(|s| s.up))
        .filter_map(|m| {
            let r = m.record.as_ref()?;
            let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            Some(Candidate { id: m.id, rpc: text("rpc"), site: text("site"), rack: text("rack") })
        })
        .collect())
}

/// Creates a replicated volume owned by this node: the name is taken, components are
/// made on `replicas` nodes (this one first), ownership is taken, the record published
/// and the volume exported here. On a failure, what was made is removed again.
pub async fn create(
    node: &Arc<Node>,
    meta: &Member,
    registry: &crate::registry::Registry,
    name: &str,
    size_bytes: u64,
    replicas: u32,
) -> ApiResult<crate::node::VolumeInfo> {
    let up = candidates(meta).await?;
    let chosen = place(meta.id(), &up, replicas as usize).ok_or_else(|| {
        ApiError::invalid(format!(
            "{replicas} replicas need {replicas} nodes up; the cluster has {} up",
            up.len()
        ))
    })?;
    if chosen.first().is_none_or(|c| c.id != meta.id()) {
        return Err(unavailable("this node's session is not registered yet; retry"));
    }
    registry.reserve(name, size_bytes).await?;
    let key = DataKey::from_secret(meta.secret());
    let mut made: Vec<(Candidate, u64)> = Vec::new();
    let mut failure = None;
    for c in &chosen {
        let result = if c.id == meta.id() {
            let (node, of) = (node.clone(), name.to_owned());
            tokio::task::spawn_blocking(move || node.component_create(&of, size_bytes))
                .await
                .unwrap_or_else(|e| Err(ApiError::new(ErrorCode::Internal, e.to_string())))
        } else {
            let peer = DataPeer::new(key.clone(), c.rpc.clone());
            let h = request(Kind::Create, 0, 0, 0, size_bytes);
            match tokio::time::timeout(IO_TIMEOUT, peer.call(h, name.as_bytes())).await {
                Ok(Ok((reply, _))) => Ok(reply.component),
                Ok(Err(e)) => Err(unavailable(format!("node {}: {e}", c.id))),
                Err(_) => Err(unavailable(format!("node {} did not answer", c.id))),
            }
        };
        match result {
            Ok(id) => made.push((c.clone(), id)),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let owner = match failure {
        None => take_ownership(meta, name).await,
        Some(e) => Err(e),
    };
    let components: Vec<ComponentRecord> = made
        .iter()
        .map(|(c, id)| ComponentRecord { node: c.id, id: *id, state: "active".into() })
        .collect();
    let record = crate::registry::VolumeRecord {
        name: name.to_owned(),
        node: meta.id(),
        state: "ready".into(),
        id: String::new(),
        size_bytes,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        origin: None,
        snapshots: Vec::new(),
        replicas,
        components: components.clone(),
    };
    let done = match owner {
        Ok(owner) => match registry.publish(&record).await {
            Ok(()) => open(node, meta, size_bytes, owner, &components, |n| rpc_of(meta, n)),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match done {
        Ok(volume) => {
            node.add_replicated(name, Arc::new(volume));
            tracing::info!(volume = name, replicas, ?components, "replicated volume created");
            let nbd = node.nbd_addr();
            Ok(record.info(&nbd))
        }
        Err(e) => {
            // Undo: remove the components made, give the name back.
            for (c, id) in made {
                if c.id == meta.id() {
                    let _ = node.component_remove(id);
                } else {
                    let peer = DataPeer::new(key.clone(), c.rpc.clone());
                    let _ = tokio::time::timeout(
                        IO_TIMEOUT,
                        peer.call(request(Kind::Remove, id, 0, 0, 0), &[]),
                    )
                    .await;
                }
            }
            registry.release(name).await;
            Err(e)
        }
    }
}

/// After a restart: takes ownership again (a new epoch) of the replicated volumes this
/// node owned and exports them. Waits for the node's session first.
pub async fn reopen(node: Arc<Node>, meta: Arc<Member>, registry: Arc<crate::registry::Registry>) {
    while !meta.wait_registered(Duration::from_secs(60)).await {}
    for record in registry.owned_replicated() {
        let opened = async {
            let owner = take_ownership(&meta, &record.name).await?;
            open(&node, &meta, record.size_bytes, owner, &record.components, |n| rpc_of(&meta, n))
        };
        match opened.await {
            Ok(v) => {
                node.add_replicated(&record.name, Arc::new(v));
                tracing::info!(volume = %record.name, "replicated volume reopened");
            }
            Err(e) => tracing::error!(volume = %record.name, "cannot reopen: {}", e.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: u64, site: &str, rack: &str) -> Candidate {
        Candidate { id, rpc: String::new(), site: site.into(), rack: rack.into() }
    }

    #[test]
    fn placement_spreads_over_sites_then_racks_and_needs_enough_nodes() {
        let nodes = [c(1, "a", "r1"), c(2, "a", "r1"), c(3, "a", "r2"), c(4, "b", "r1")];
        let ids = |v: Vec<Candidate>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
        assert_eq!(ids(place(1, &nodes, 1).unwrap()), vec![1]);
        assert_eq!(ids(place(1, &nodes, 2).unwrap()), vec![1, 4], "another site first");
        assert_eq!(ids(place(1, &nodes, 3).unwrap()), vec![1, 4, 3], "then another rack");
        assert_eq!(ids(place(2, &nodes, 4).unwrap()), vec![2, 4, 3, 1]);
        assert!(place(1, &nodes, 5).is_none());
    }
}
