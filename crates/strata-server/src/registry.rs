//! The cluster's volume registry: one record per volume in the metadata service, under
//! `/volumes/<name>`: its node, size, origin and snapshots (the record's type and JSON
//! form, `VolumeRecord`, are `strata_replica::record`'s; this module reads and writes
//! them). A volume of one node has its data on the node that created it; that node's
//! catalog is the truth for what it holds, and it keeps the records of its volumes in step
//! with it. A replicated volume's record is kept by `replicated.rs`.
//!
//! Invariants:
//! 1. A name is taken cluster-wide by a compare-and-swap ("absent" → a `creating`
//!    record of this node) *before* the volume is made locally; so two nodes can never
//!    both create a volume of one name. Without a metadata quorum, creating is refused.
//! 2. Every registry write carries this node's incarnation: a node declared down cannot
//!    change the registry with a request it prepared before (`state.rs` invariant 3).
//! 3. A node only ever changes or deletes records that name it. Its reconciler makes
//!    them equal to its catalog: after every operation (kicked) and every 10 s, so a
//!    change the registry missed (no quorum at the time, a crash between the local change
//!    and the record) is published later; a `creating` record left by a crash before
//!    the volume was made is deleted once it is a minute old.
//!
//! Reads for listing use the member's applied state (no quorum needed): a list may lag
//! a just-made change on another node by the replication delay.

use crate::error::{ApiError, ApiResult};
use crate::node::{Node, SnapshotInfo, VolumeInfo};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use strata_meta::service::{ClientReply, ClientRequest, Member};
use strata_meta::state::{Command, Compare, Entry, Op, Response};
use strata_replica::record::{SnapshotRecord, VolumeRecord, VolumeState};
use strata_types::{format_size, AccessList, ErrorCode};

const PREFIX: &str = "/volumes/";
/// A `creating` record older than this with no volume behind it was left by a crash.
const CREATING_GRACE_SECS: u64 = 60;
/// How often the reconciler runs unkicked.
const RECONCILE_EVERY: Duration = Duration::from_secs(10);

/// The record of `v`, a volume of this node's catalog (`node`).
fn record_of(node: u64, v: &VolumeInfo) -> VolumeRecord {
    VolumeRecord {
        name: v.name.clone(),
        node,
        state: VolumeState::Ready,
        id: v.id.clone(),
        size_bytes: v.size_bytes,
        created_unix: v.created_unix,
        origin: v.origin.clone(),
        snapshots: v
            .snapshots
            .iter()
            .map(|s| SnapshotRecord::plain(s.snapshot.clone(), s.size_bytes, s.created_unix))
            .collect(),
        replicas: 1,
        min_replicas: 1,
        components: Vec::new(),
        epoch: 0,
        released: None,
        lost_at: None,
        access: v.access.clone(),
    }
}

/// What the API shows of a volume held by another node, or replicated (its usage is known
/// there), from its record.
pub fn info(record: &VolumeRecord, nbd: &str) -> VolumeInfo {
    let export = |name: &str| format!("nbd://{nbd}/{name}");
    VolumeInfo {
        name: record.name.clone(),
        id: record.id.clone(),
        node: record.node,
        size_bytes: record.size_bytes,
        size: format_size(record.size_bytes),
        allocated_bytes: 0,
        exclusive_bytes: 0,
        shared_bytes: 0,
        snapshot_exclusive_bytes: 0,
        origin: record.origin.clone(),
        snapshots: record
            .snapshots
            .iter()
            .map(|s| {
                let name = format!("{}@{}", record.name, s.snapshot);
                SnapshotInfo {
                    snapshot: s.snapshot.clone(),
                    volume: record.name.clone(),
                    id: String::new(),
                    size_bytes: s.size_bytes,
                    allocated_bytes: 0,
                    exclusive_bytes: 0,
                    shared_bytes: 0,
                    clones: Vec::new(),
                    connections: 0,
                    created_unix: s.created_unix,
                    export_uri: export(&name),
                    name,
                }
            })
            .collect(),
        connections: 0,
        created_unix: record.created_unix,
        export_uri: export(&record.name),
        replicas: record.replicas,
        components: record.components.clone(),
        access: record.access.clone(),
        epoch: record.epoch,
    }
}

/// The registry, as seen from one node.
pub struct Registry {
    node: Arc<Node>,
    meta: Arc<Member>,
    kick: tokio::sync::Notify,
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, format!("the cluster's volume registry: {e}"))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Registry {
    /// The registry of `node`'s volumes through `meta`.
    pub fn new(node: Arc<Node>, meta: Arc<Member>) -> Arc<Registry> {
        Arc::new(Registry { node, meta, kick: tokio::sync::Notify::new() })
    }

    fn me(&self) -> u64 {
        self.meta.id()
    }

    async fn write(&self, compares: Vec<Compare>, success: Vec<Op>) -> ApiResult<bool> {
        // Just after start the session may still be registering.
        self.meta.wait_registered(Duration::from_secs(5)).await;
        let txn = Command::Txn { origin: self.meta.origin(), compares, success, failure: vec![] };
        match self.meta.request(ClientRequest::Write(txn)).await.map_err(unavailable)? {
            ClientReply::Written(Response::Txn { succeeded, .. }) => Ok(succeeded),
            ClientReply::Written(Response::Refused(r)) => Err(unavailable(format!(
                "{r} (this node's session is not registered yet, or it was declared down)"
            ))),
            other => Err(unavailable(format!("unexpected reply {other:?}"))),
        }
    }

    async fn get(&self, name: &str) -> ApiResult<Option<(VolumeRecord, u64)>> {
        let key = format!("{PREFIX}{name}");
        match self.meta.request(ClientRequest::Get { key }).await.map_err(unavailable)? {
            ClientReply::Value { entry: Some(e), .. } => Ok(decode(&e).map(|r| (r, e.version))),
            ClientReply::Value { entry: None, .. } => Ok(None),
            other => Err(unavailable(format!("unexpected reply {other:?}"))),
        }
    }

    /// Replaces a replicated volume's access list in its record (a compare-and-swap on
    /// the record's version), which every node serving it reads at each NBD open.
    pub async fn set_access(&self, name: &str, access: AccessList) -> ApiResult<VolumeRecord> {
        let key = format!("{PREFIX}{name}");
        for _ in 0..5 {
            let Some((mut record, version)) = self.get(name).await? else {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("no volume named {name:?}"),
                ));
            };
            if record.state != VolumeState::Ready {
                let state = &record.state;
                return Err(ApiError::new(ErrorCode::Conflict, format!("{name} is {state}")));
            }
            record.access = access.clone();
            let value = serde_json::to_vec(&record).expect("records serialize");
            let put = Op::Put { key: key.clone(), value, lease: None };
            if self.write(vec![Compare::Version(key.clone(), version)], vec![put]).await? {
                tracing::info!(volume = %name, access = %access.describe(), "access list set");
                return Ok(record);
            }
        }
        Err(unavailable(format!("the record of {name} keeps changing; retry")))
    }

    /// Takes `name` for a volume about to be made here (invariant 1).
    pub async fn reserve(&self, name: &str, size_bytes: u64) -> ApiResult<()> {
        let key = format!("{PREFIX}{name}");
        let record = VolumeRecord {
            name: name.to_owned(),
            node: self.me(),
            state: VolumeState::Creating,
            id: String::new(),
            size_bytes,
            created_unix: now_unix(),
            origin: None,
            snapshots: Vec::new(),
            replicas: 1,
            min_replicas: 1,
            components: Vec::new(),
            epoch: 0,
            released: None,
            lost_at: None,
            access: AccessList::default(),
        };
        let value = serde_json::to_vec(&record).expect("records serialize");
        let put = Op::Put { key: key.clone(), value, lease: None };
        if self.write(vec![Compare::Version(key, 0)], vec![put]).await? {
            return Ok(());
        }
        let holder = self.get(name).await?.map_or("another node".to_owned(), |(r, _)| {
            if r.state == VolumeState::Deleting {
                return deleting(&r);
            }
            if r.node == self.me() {
                "this node".to_owned()
            } else {
                format!("node {}", r.node)
            }
        });
        Err(ApiError::new(
            ErrorCode::AlreadyExists,
            format!("a volume named {name:?} already exists in the cluster (on {holder})"),
        ))
    }

    /// Publishes a replicated volume's record over the `creating` one this node holds.
    pub async fn publish(&self, record: &VolumeRecord) -> ApiResult<()> {
        let key = format!("{PREFIX}{}", record.name);
        let version = match self.get(&record.name).await? {
            Some((r, v)) if r.node == self.me() => v,
            _ => return Err(unavailable("the volume's record changed under us")),
        };
        let value = serde_json::to_vec(record).expect("records serialize");
        let put = Op::Put { key: key.clone(), value, lease: None };
        if self.write(vec![Compare::Version(key, version)], vec![put]).await? {
            Ok(())
        } else {
            Err(unavailable("the volume's record changed under us"))
        }
    }

    /// Gives back a name taken by [`Registry::reserve`] when making the volume failed.
    pub async fn release(&self, name: &str) {
        if let Ok(Some((record, version))) = self.get(name).await {
            if record.node == self.me() && self.node.get(name).is_err() {
                let key = format!("{PREFIX}{name}");
                let delete = Op::Delete { key: key.clone() };
                let _ = self.write(vec![Compare::Version(key, version)], vec![delete]).await;
            }
        }
    }

    /// Asks the reconciler to run now (after a local change).
    pub fn kick(&self) {
        self.kick.notify_one();
    }

    /// The records of volumes not in this node's catalog (held by other nodes, or
    /// replicated), from this member's applied state.
    pub fn remote(&self) -> Vec<VolumeInfo> {
        let me = self.me();
        self.meta.read_local(|s| {
            records(s)
                .filter(|r| (r.node != me || r.replicated()) && r.state == VolumeState::Ready)
                .map(|r| {
                    let nbd = s
                        .get(&format!("/nodes/{}", r.node))
                        .and_then(|e| serde_json::from_slice::<serde_json::Value>(&e.value).ok())
                        .and_then(|v| v["nbd"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| "?".into());
                    let mut info = info(&r, &nbd);
                    // A replicated volume's clients, on every node (each node publishes
                    // its own: `replicated.rs`).
                    let clients = format!("{PREFIX}{}/clients/", r.name);
                    info.connections = s
                        .range(&clients, usize::MAX)
                        .into_iter()
                        .filter_map(|(_, e)| {
                            std::str::from_utf8(&e.value).ok()?.parse::<usize>().ok()
                        })
                        .sum();
                    info
                })
                .collect()
        })
    }

    /// Volume `name`'s record, from this member's applied state.
    pub fn record(&self, name: &str) -> Option<VolumeRecord> {
        applied_record(&self.meta, name)
    }

    /// Explains where a volume this node does not hold lives, if another node does.
    pub fn elsewhere(&self, name: &str) -> Option<ApiError> {
        let me = self.me();
        let record = self.record(name)?;
        if record.state == VolumeState::Deleting {
            return Some(ApiError::new(ErrorCode::NotFound, deleting(&record)));
        }
        // The name is right and the volume exists: it is its state (replicated, or held by
        // another node) that refuses the operation here.
        if record.replicated() {
            return Some(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "volume {name:?} is replicated ({} copies): this operation is not \
                     supported on replicated volumes yet",
                    record.replicas
                ),
            ));
        }
        (record.node != me).then(|| {
            ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "volume {name:?} lives on node {}: run the command against that node's \
                     API (until replication, a volume is managed where its data is)",
                    record.node
                ),
            )
        })
    }

    /// Makes this node's records equal to its catalog (invariant 3).
    pub async fn reconcile(&self) -> ApiResult<()> {
        let me = self.me();
        let stored: BTreeMap<String, (VolumeRecord, u64)> = match self
            .meta
            .request(ClientRequest::Range { prefix: PREFIX.into(), limit: usize::MAX })
            .await
            .map_err(unavailable)?
        {
            ClientReply::Range { entries, .. } => entries
                .into_iter()
                .filter_map(|(_, e)| decode(&e).map(|r| (r.name.clone(), (r, e.version))))
                .collect(),
            other => return Err(unavailable(format!("unexpected reply {other:?}"))),
        };
        let local: BTreeMap<String, VolumeInfo> =
            self.node.list().into_iter().map(|v| (v.name.clone(), v)).collect();
        for (name, info) in &local {
            let want = record_of(me, info);
            let key = format!("{PREFIX}{name}");
            let version = match stored.get(name) {
                Some((have, _)) if have == &want => continue,
                Some((have, _)) if have.node != me => {
                    tracing::error!(
                        volume = %name,
                        other = have.node,
                        "this node holds a volume whose name the registry gives to another node"
                    );
                    continue;
                }
                Some((_, version)) => *version,
                None => 0,
            };
            let value = serde_json::to_vec(&want).expect("records serialize");
            self.write(
                vec![Compare::Version(key.clone(), version)],
                vec![Op::Put { key, value, lease: None }],
            )
            .await?;
        }
        for (name, (record, version)) in &stored {
            if record.node != me || record.replicated() || local.contains_key(name) {
                continue;
            }
            let fresh = record.state == VolumeState::Creating
                && now_unix().saturating_sub(record.created_unix) < CREATING_GRACE_SECS;
            if fresh {
                continue;
            }
            let key = format!("{PREFIX}{name}");
            self.write(vec![Compare::Version(key.clone(), *version)], vec![Op::Delete { key }])
                .await?;
        }
        Ok(())
    }

    /// Runs the reconciler until the process ends: when kicked, and every 10 s.
    pub async fn run(self: Arc<Self>) {
        loop {
            if self.meta.registered() {
                if let Err(e) = self.reconcile().await {
                    tracing::debug!("registry reconcile: {}", e.message);
                }
            }
            let _ = tokio::time::timeout(RECONCILE_EVERY, self.kick.notified()).await;
        }
    }
}

/// Volume `name`'s record in `meta`'s applied state (which may lag the leader's).
pub fn applied_record(meta: &Member, name: &str) -> Option<VolumeRecord> {
    meta.read_local(|s| s.get(&format!("{PREFIX}{name}")).and_then(decode))
}

/// Every volume's record in the applied state `s`.
pub fn records(s: &strata_meta::state::State) -> impl Iterator<Item = VolumeRecord> + '_ {
    s.range(PREFIX, usize::MAX).into_iter().filter_map(|(_, e)| decode(e))
}

/// What a volume being deleted is waiting for.
fn deleting(r: &VolumeRecord) -> String {
    let nodes: Vec<String> = r.components.iter().map(|c| c.node.to_string()).collect();
    format!(
        "volume {:?} is being deleted: its copies on node(s) {} are removed when each is up",
        r.name,
        nodes.join(", ")
    )
}

fn decode(e: &Entry) -> Option<VolumeRecord> {
    serde_json::from_slice(&e.value).ok()
}
