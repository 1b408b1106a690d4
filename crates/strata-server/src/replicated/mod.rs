//! Replicated volumes, the server's shell around the protocol core (`strata-replica`):
//! placement of components on distinct nodes, ownership by CAS, the owner's write
//! fan-out, STALE marks with synchronization bitmaps, resync, forwarding from every node,
//! ownership moves, deletes. The numbered invariants the code cites (1–11), the core's
//! (O1–O6, T1–T4), the timing and the formats of the records and bitmap files are in
//! `docs/design/replication.md`.
//!
//! Modules, depending one way (each uses this module's shared helpers):
//! - `view`: the owner's view (`ReplicatedVolume`), executing the core's commands;
//! - `levelling`: resync, digest scans, rebuilds, read repair of the owner's view;
//! - `router`: how every node serves every volume (forwarding, leased local reads), and
//!   the node's routers as `Router`s (`node` keeps them as `node::Routed` exports, naming
//!   no type of this module, which uses it: `export_router`, `router_of`, `owned`);
//! - `lifecycle`: create, take ownership, open a view, attach, grow;
//! - `steward`: each node's loop over the volumes (takeovers, moves, stop);
//! - `housekeeping`: deletes, client counts, orphans, removed nodes' copies.

mod housekeeping;
mod levelling;
mod lifecycle;
mod router;
mod steward;
mod view;

pub use self::{housekeeping::*, levelling::*, lifecycle::*, router::*, steward::*, view::*};

use crate::error::{ApiError, ApiResult};
use crate::fencing::{Fencing, Refused};
use crate::node::{Component, Node, Routed};
use crate::registry::{applied_record, records};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use strata_frame::client::{request, CallError, DataPeer};
use strata_frame::frame::{
    DataKey, Header, Kind, Status, DIGEST_UNIT, FLAG_FUA, FLAG_SUSPECT, FLAG_VOLUME, FLAG_WHOLE,
    PAYLOAD_BYTES_MAX,
};
use strata_io::{BlockVolume, Extent, IoOp, StoreError, ZeroMode};
use strata_meta::service::{ClientReply, ClientRequest, Member};
use strata_meta::state::{Command, Compare, Op, Response};
use strata_replica::error::ReplicaError;
use strata_replica::lease::ReadLease;
use strata_replica::owner::{Finished, Found, OwnerState, Reply, SaveBitmap, Time, Track};
use strata_replica::placement::{place, place_one, Candidate};
use strata_replica::record::{
    regions_of, runs_of, ComponentRecord, CopyRef, CopyState, HandedBitmap, Owner, Released,
    VolumeRecord, VolumeState, HANDED_RUNS_MAX,
};
use strata_replica::resync::ResyncStep;
use strata_replica::takeover::{self, FlushBegun, Truth, Unflushed};
use strata_replica::timing::Timing;
use strata_types::ErrorCode;

/// Every timeout and period of the protocol (`strata_replica::timing`): today's values.
const T: Timing = Timing::DEFAULT;

/// A copy held here that no volume's record lists is removed once this old (a copy being
/// made is listed within seconds; invariant 7).
const ORPHAN_GRACE_SECS: u64 = 300;
/// Regions compared per step of a digest scan.
const SCAN_BATCH: u64 = 16;
/// The most writes of one client fanned out together (`ReplicatedVolume::run_writes`).
const WRITE_BATCH_MAX: usize = 64;

/// The last owner's clean hand-over (`record.released`), if its word counts for a new
/// owner on node `me`: only if this node's copy was one of the level ones (the truth now
/// is what the last owner's copy was then), its node and id both.
fn handed_word(record: &VolumeRecord, me: u64) -> Option<&Released> {
    record.released.as_ref().filter(|r| {
        r.level.iter().any(|x| {
            x.node == me && record.components.iter().any(|c| c.node == x.node && c.id == x.id)
        })
    })
}

/// Bytes per bit of a synchronization bitmap (and per digest).
pub const REGION: u64 = DIGEST_UNIT;

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Unavailable, e.to_string())
}

/// The volume's record could not be read or changed: `why`.
fn record_error(why: impl Into<String>) -> ReplicaError {
    ReplicaError::Record { why: why.into() }
}

async fn write(meta: &Member, compares: Vec<Compare>, success: Vec<Op>) -> ApiResult<bool> {
    let txn = Command::Txn { origin: meta.origin(), compares, success, failure: vec![] };
    match meta.request(ClientRequest::Write(txn)).await.map_err(unavailable)? {
        ClientReply::Written(Response::Txn { succeeded, .. }) => Ok(succeeded),
        other => Err(unavailable(format!("the metadata service answered {other:?}"))),
    }
}

/// Volume `name`'s record and its version (a linearizable read), if it has one.
async fn fresh_record(meta: &Member, name: &str) -> ApiResult<Option<(VolumeRecord, u64)>> {
    let Some((bytes, version)) = get(meta, &format!("/volumes/{name}")).await? else {
        return Ok(None);
    };
    let record = serde_json::from_slice(&bytes)
        .map_err(|e| unavailable(format!("the record of {name} is unreadable: {e}")))?;
    Ok(Some((record, version)))
}

/// [`fresh_record`]; NotFound if there is none.
async fn read_record(meta: &Member, name: &str) -> ApiResult<(VolumeRecord, u64)> {
    fresh_record(meta, name)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no volume named {name:?}")))
}

/// Reads `key` linearizably: its value and version (0: absent).
async fn get(meta: &Member, key: &str) -> ApiResult<Option<(Vec<u8>, u64)>> {
    match meta.request(ClientRequest::Get { key: key.to_owned() }).await.map_err(unavailable)? {
        ClientReply::Value { entry: Some(e), .. } => Ok(Some((e.value, e.version))),
        ClientReply::Value { entry: None, .. } => Ok(None),
        other => Err(unavailable(format!("the metadata service answered {other:?}"))),
    }
}

/// This kernel boot's id ("unknown" where there is none). `STRATA_BOOT_ID` replaces it
/// (tests use it to stand for a machine that restarted).
fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        if let Ok(id) = std::env::var("STRATA_BOOT_ID") {
            return id;
        }
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into())
    })
}

/// In the data directory: the boot this node last started in.
const BOOT_FILE: &str = "boot";
/// In the data directory: present when the last run stopped cleanly (all synced).
const CLEAN_STOP_FILE: &str = "clean-stop";

/// Whether the last run in `dir` ended without a clean stop in another boot of the
/// machine: a power loss (or a crash of the machine) may have taken writes its page
/// cache held, so its copies may lack writes the owner acknowledged. Records this boot
/// for the next start.
pub fn lost_power(dir: &std::path::Path) -> bool {
    let last = std::fs::read_to_string(dir.join(BOOT_FILE)).ok();
    let clean = dir.join(CLEAN_STOP_FILE).exists();
    let _ = std::fs::remove_file(dir.join(CLEAN_STOP_FILE));
    let now = boot_id();
    if let Err(e) = strata_store::store::write_atomically(dir, BOOT_FILE, now.as_bytes()) {
        tracing::warn!("cannot record this boot: {e}");
    }
    !clean && now != "unknown" && last.is_some_and(|b| b.trim() != now)
}

/// Records that this run stopped cleanly (everything synced).
pub fn mark_clean_stop(dir: &std::path::Path) {
    if let Err(e) = strata_store::store::write_atomically(dir, CLEAN_STOP_FILE, b"") {
        tracing::warn!("cannot record the clean stop: {e}");
    }
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
    Ok(members(meta).await?.into_iter().filter_map(|(c, up)| up.then_some(c)).collect())
}

/// Every member of the cluster, and whether it is up and registered (a linearizable
/// read of the cluster status; a member that never registered has no address, site or
/// rack known, and is not up). Counted in `node::MEMBERSHIP_READS`.
async fn members(meta: &Member) -> ApiResult<Vec<(Candidate, bool)>> {
    crate::node::MEMBERSHIP_READS.fetch_add(1, Ordering::Relaxed);
    let ClientReply::Status(status) =
        meta.request(ClientRequest::Status).await.map_err(unavailable)?
    else {
        return Err(unavailable("the metadata service answered something else"));
    };
    Ok(status
        .members
        .iter()
        .map(|m| {
            let text = |k: &str| {
                m.record.as_ref().and_then(|r| r[k].as_str()).unwrap_or_default().to_owned()
            };
            let up = m.record.is_some() && m.session.as_ref().is_some_and(|s| s.up);
            let c =
                Candidate { id: m.id, rpc: text("rpc"), site: text("site"), rack: text("rack") };
            (c, up)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes 1 and 2 made their copies in the same second: both got component id 7. The
    /// last owner (node 2) vouched for its own copy only, and node 3's STALE one (id 9)
    /// lacks regions 4-5. Node 1 must not take the word for its copy; node 2 may; and a
    /// record written before copies were named by node too vouches for none.
    #[test]
    fn a_hand_over_vouches_for_copies_by_node_and_id_not_id_alone() {
        let record = |released: serde_json::Value| -> VolumeRecord {
            serde_json::from_value(serde_json::json!({
                "name": "v", "node": 2, "state": "ready", "id": "", "size_bytes": 1 << 20,
                "created_unix": 0, "origin": null, "snapshots": [], "replicas": 3,
                "min_replicas": 2, "epoch": 4, "released": released,
                "components": [
                    {"node": 1, "id": 7, "state": "active"},
                    {"node": 2, "id": 7, "state": "active"},
                    {"node": 3, "id": 9, "state": "stale"},
                ],
            }))
            .unwrap()
        };
        let r = record(serde_json::json!({
            "epoch": 4,
            "level": [{"node": 2, "id": 7}],
            "stale": [{"node": 3, "id": 9, "runs": [[4, 5]]}],
        }));
        assert!(handed_word(&r, 1).is_none(), "node 1's copy was not level");
        let word = handed_word(&r, 2).expect("node 2's copy was level");
        assert!(!word.level.contains(&CopyRef { node: 1, id: 7 }));
        assert_eq!(word.stale[0].node, 3);
        let old =
            record(serde_json::json!({"epoch": 4, "equal": [7], "stale": [{"id": 9, "runs": []}]}));
        assert!(handed_word(&old, 1).is_none() && handed_word(&old, 2).is_none());
    }
}
