//! The node's reports of what it counts and holds: `GET /metrics` (the Prometheus text
//! exposition format, version 0.0.4) and `GET /v1/stats`, rendered from the node's
//! counters ([`crate::metrics`]), its store, its metadata member and the cluster's
//! replicated volumes.
//!
//! Layering: this module sits above `node`, `registry` and `replicated` (it reads their
//! state) and below `api` (which serves what it renders); none of those uses it, and
//! `metrics` (what counts) knows none of them.
//!
//! A node counts the requests its own NBD clients make (a replicated volume's requests
//! forwarded to its owner are counted where the client is connected): sum over nodes for
//! a volume's total. The cluster-level series (`strata_meta_*`, `strata_nodes`,
//! `strata_components`, …) are every node's view of the cluster: each node reports them;
//! aggregate with `max`.

use crate::metrics::{Op, Text, VolumeCounters, LATENCY_BUCKETS};
use crate::node::{Exports, Node, VolumeInfo, MEMBERSHIP_READS};
use crate::replicated::router_of;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_meta::service::Member;
use strata_replica::record::{ComponentRecord, CopyState};

/// How long a scrape waits for the metadata leader's view of the cluster.
const CLUSTER_WAIT: Duration = Duration::from_secs(2);

/// One volume's I/O as `GET /v1/stats` shows it: counts since the node started.
#[derive(Serialize, Debug, Default)]
pub struct VolumeIo {
    /// The export name (`VOL` or `VOL@SNAP`).
    pub volume: String,
    /// Reads done.
    pub read_ops: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Writes done.
    pub write_ops: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Trims done.
    pub trim_ops: u64,
    /// Zeroing requests done.
    pub zero_ops: u64,
    /// FLUSH and FUA requests served.
    pub flushes: u64,
    /// Device syncs that served them.
    pub syncs: u64,
    /// Requests that failed.
    pub errors: u64,
}

/// What `GET /v1/stats` returns: this node's counters, for rates (sample twice).
#[derive(Serialize, Debug)]
pub struct Stats {
    /// When the sample was taken, milliseconds since the epoch.
    pub unix_ms: u64,
    /// Seconds since the node started.
    pub uptime_seconds: f64,
    /// I/O this node's NBD clients did, per export.
    pub volumes: Vec<VolumeIo>,
    /// The store's space and activity.
    pub store: StoreStatsView,
}

/// The store's part of [`Stats`].
#[derive(Serialize, Debug)]
pub struct StoreStatsView {
    /// Bytes free in the file system holding the store.
    pub free_bytes: u64,
    /// Bytes of the log's segments in use.
    pub log_bytes: u64,
    /// Bytes of live data.
    pub live_bytes: u64,
    /// Bytes of segments in use that hold no live data.
    pub dead_bytes: u64,
    /// Segments in use.
    pub segments: u64,
    /// Journal syncs so far.
    pub journal_syncs: u64,
    /// Bytes of log made durable by them.
    pub journal_synced_bytes: u64,
    /// Bytes the cleaner moved.
    pub cleaned_bytes: u64,
    /// Segments the cleaner emptied.
    pub cleaned_segments: u64,
    /// Checkpoints written.
    pub checkpoints: u64,
    /// Bytes client writes leave free on the file system (the reserve).
    pub reserve_bytes: u64,
    /// The file system is nearly full (see `GET /v1/node`'s `space`).
    pub nearly_full: bool,
    /// Client writes are refused (ENOSPC) for want of space.
    pub full: bool,
}

/// Every export's counters with its group-commit counts, dropping counters of exports
/// that are gone.
fn volume_io(node: &Arc<Node>) -> Vec<(String, Arc<VolumeCounters>, (u64, u64))> {
    let exports: std::collections::HashSet<String> =
        Exports(node.clone()).all().into_iter().map(|e| e.name).collect();
    let syncs: BTreeMap<String, (u64, u64)> = node.sync_counts().into_iter().collect();
    node.metrics()
        .volumes(|name| exports.contains(name))
        .into_iter()
        .map(|(name, c)| {
            let s = syncs.get(&name).copied().unwrap_or_default();
            (name, c, s)
        })
        .collect()
}

/// This node's counters (`GET /v1/stats`); `started`: when the node started.
pub fn stats(node: &Arc<Node>, started: Instant) -> Stats {
    let volumes = volume_io(node)
        .into_iter()
        .map(|(volume, c, (syncs, flushes))| {
            let (read_ops, read_bytes, _) = c.op(Op::Read).get();
            let (write_ops, write_bytes, _) = c.op(Op::Write).get();
            let errors = Op::ALL.iter().map(|op| c.op(*op).get().2).sum();
            VolumeIo {
                volume,
                read_ops,
                read_bytes,
                write_ops,
                write_bytes,
                trim_ops: c.op(Op::Trim).get().0,
                zero_ops: c.op(Op::Zero).get().0,
                flushes,
                syncs,
                errors,
            }
        })
        .collect();
    let s = node.store_stats();
    let space = node.space();
    Stats {
        unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        uptime_seconds: started.elapsed().as_secs_f64(),
        volumes,
        store: StoreStatsView {
            free_bytes: node.free_bytes(),
            log_bytes: s.log_bytes,
            live_bytes: s.live_bytes,
            dead_bytes: s.dead_bytes,
            segments: s.segments,
            journal_syncs: s.journal_syncs,
            journal_synced_bytes: s.journal_synced_bytes,
            cleaned_bytes: s.cleaned_bytes,
            cleaned_segments: s.cleaned_segments,
            checkpoints: s.checkpoints,
            reserve_bytes: space.reserve_bytes,
            nearly_full: space.nearly_full,
            full: space.full,
        },
    }
}

/// The whole exposition (`GET /metrics`) of `node`, a member of the metadata service `meta`;
/// `volumes` lists every volume of the cluster (taken after the metadata leader answered).
pub async fn exposition(
    node: &Arc<Node>,
    meta: &Member,
    volumes: impl FnOnce() -> Vec<VolumeInfo>,
) -> String {
    let mut t = Text::default();
    volume_series(&mut t, &volume_io(node));
    store_series(&mut t, node);
    meta_series(&mut t, meta).await;
    replicated_series(&mut t, &volumes());
    let name = "strata_volume_local_reads_total";
    t.family(
        name,
        "counter",
        "Reads of a replicated volume this node served from its own copy, under the owner's \
         read lease, instead of forwarding them.",
    );
    let mut names = node.replicated_names();
    names.sort();
    let routers: Vec<_> = names
        .iter()
        .filter_map(|volume| Some((volume.as_str(), router_of(node, volume)?)))
        .collect();
    for (volume, router) in &routers {
        t.int(name, &[("volume", volume)], router.local_reads());
    }
    let batches = [
        (
            "strata_volume_write_batches_total",
            "Batches of writes to a replicated volume that came together (from a client of \
             this node in one pass over its input, or forwarded by another node in one \
             burst) and that this node, as the owner, sent to the copies together: one \
             send per copy, one store call on each.",
        ),
        ("strata_volume_batched_writes_total", "Writes in those batches."),
    ];
    for (k, (name, help)) in batches.into_iter().enumerate() {
        t.family(name, "counter", help);
        for (volume, router) in &routers {
            let (b, w) = router.write_batches();
            t.int(name, &[("volume", volume)], [b, w][k]);
        }
    }
    t.finish()
}

fn volume_series(t: &mut Text, volumes: &[(String, Arc<VolumeCounters>, (u64, u64))]) {
    let counters = [
        ("read_ops", "Read requests done", Op::Read, false),
        ("read_bytes", "Bytes read", Op::Read, true),
        ("write_ops", "Write requests done", Op::Write, false),
        ("write_bytes", "Bytes written", Op::Write, true),
        ("trim_ops", "Trim requests done", Op::Trim, false),
        ("trim_bytes", "Bytes trimmed", Op::Trim, true),
        ("zero_ops", "Write-zeroes requests done", Op::Zero, false),
        ("zero_bytes", "Bytes zeroed", Op::Zero, true),
    ];
    for (name, help, op, bytes) in counters {
        let name = format!("strata_volume_{name}_total");
        t.family(&name, "counter", &format!("{help} for this node's NBD clients, per volume."));
        for (volume, c, _) in volumes {
            let (ops, b, _) = c.op(op).get();
            t.int(&name, &[("volume", volume)], if bytes { b } else { ops });
        }
    }
    let name = "strata_volume_flushes_total";
    t.family(name, "counter", "FLUSH and FUA requests served, per volume.");
    for (volume, _, (_, flushes)) in volumes {
        t.int(name, &[("volume", volume)], *flushes);
    }
    let name = "strata_volume_syncs_total";
    t.family(name, "counter", "Device syncs serving those requests (group commit), per volume.");
    for (volume, _, (syncs, _)) in volumes {
        t.int(name, &[("volume", volume)], *syncs);
    }
    let name = "strata_volume_errors_total";
    t.family(name, "counter", "Requests that failed, per volume and kind.");
    for (volume, c, _) in volumes {
        for op in Op::ALL {
            t.int(name, &[("volume", volume), ("op", op.label())], c.op(op).get().2);
        }
    }
    let name = "strata_volume_request_duration_seconds";
    t.family(
        name,
        "histogram",
        "Time the store took for a request, per volume and kind (flush: one device sync).",
    );
    for (volume, c, _) in volumes {
        for op in Op::ALL {
            let (cumulative, sum) = c.op(op).latency.cumulative();
            let labels = [("volume", volume.as_str()), ("op", op.label())];
            t.histogram(name, &labels, &LATENCY_BUCKETS, &cumulative, sum);
        }
    }
}

fn store_series(t: &mut Text, node: &Node) {
    let s = node.store_stats();
    let space = node.space();
    let gauges = [
        ("strata_store_free_bytes", "Bytes free in the file system holding the store.", {
            node.free_bytes()
        }),
        ("strata_store_log_bytes", "Bytes of the log's segments in use.", s.log_bytes),
        ("strata_store_live_bytes", "Bytes of live data (shared blocks once).", s.live_bytes),
        ("strata_store_dead_bytes", "Bytes of segments in use holding no live data.", s.dead_bytes),
        ("strata_store_segments", "Segments of the log in use.", s.segments),
        ("strata_store_segment_bytes", "The size of a segment.", s.segment_bytes),
        ("strata_store_reserve_bytes", "Bytes client writes leave free (the reserve).", {
            space.reserve_bytes
        }),
        ("strata_store_nearly_full", "1 when free space nears the reserve (see the docs).", {
            u64::from(space.nearly_full)
        }),
        ("strata_store_full", "1 while client writes are refused (ENOSPC) for want of space.", {
            u64::from(space.full)
        }),
    ];
    for (name, help, value) in gauges {
        t.single(name, "gauge", help, value);
    }
    let counters = [
        ("strata_store_journal_syncs_total", "Journal syncs (fdatasync of the log).", {
            s.journal_syncs
        }),
        ("strata_store_journal_synced_bytes_total", "Bytes of log journal syncs made durable.", {
            s.journal_synced_bytes
        }),
        ("strata_store_cleaner_moved_bytes_total", "Live bytes the cleaner moved.", {
            s.cleaned_bytes
        }),
        ("strata_store_cleaner_segments_total", "Segments the cleaner emptied.", {
            s.cleaned_segments
        }),
        ("strata_store_checkpoints_total", "Checkpoints written.", s.checkpoints),
        ("strata_store_refused_writes_total", "Client writes refused (ENOSPC) for space.", {
            space.refused_writes
        }),
    ];
    for (name, help, value) in counters {
        t.single(name, "counter", &format!("{help} Since the node started."), value);
    }
    let name = "strata_store_journal_sync_duration_seconds_total";
    t.family(name, "counter", "Seconds journal syncs took in all. Since the node started.");
    t.real(name, &[], s.journal_sync_seconds);
    let name = "strata_store_journal_sync_batch_blocks";
    t.family(name, "histogram", "Log blocks (4 KiB) each journal sync made durable.");
    let bounds: Vec<f64> = strata_store::store::BATCH_BUCKETS.iter().map(|b| *b as f64).collect();
    let mut total = 0;
    let cumulative: Vec<u64> = s
        .journal_batch_blocks
        .iter()
        .map(|n| {
            total += n;
            total
        })
        .collect();
    let sum = s.journal_synced_bytes as f64 / 4096.0;
    t.histogram(name, &[], &bounds, &cumulative, sum);
    let load = node.resync_scheduler().load();
    let running = load.running as u64;
    t.single("strata_resync_jobs_running", "gauge", "Resync jobs this node runs.", running);
    let waiting = load.waiting as u64;
    t.single("strata_resync_jobs_waiting", "gauge", "Resync jobs waiting here.", waiting);
    let held = node.resync_scheduler().slots_held() as u64;
    t.single(
        "strata_resync_slots_held",
        "gauge",
        "Resync jobs of other nodes writing to copies here now (slots granted).",
        held,
    );
}

async fn meta_series(t: &mut Text, meta: &Member) {
    use strata_meta::service::{ClientReply, ClientRequest};
    let local = meta.local_status();
    t.family("strata_meta_state", "gauge", "This member's Raft state (1 for the one it is in).");
    for state in ["leader", "follower", "candidate", "learner", "shutdown"] {
        t.int("strata_meta_state", &[("state", state)], u64::from(local.state == state));
    }
    t.single("strata_meta_term", "gauge", "The Raft term this member is in.", local.term);
    t.single("strata_meta_applied_index", "gauge", "Last log index applied here.", local.applied);
    t.single(
        "strata_meta_stale_refusals_total",
        "counter",
        "Requests of this node refused for a stale incarnation, since it started.",
        local.stale_refusals,
    );
    t.single(
        "strata_meta_membership_reads_total",
        "counter",
        "Linearizable reads of the membership this node made for replicated volumes \
         (placement, takeovers, and one every 10 s for all the volumes it owns).",
        MEMBERSHIP_READS.load(std::sync::atomic::Ordering::Relaxed),
    );
    let cluster =
        match tokio::time::timeout(CLUSTER_WAIT, meta.request(ClientRequest::Status)).await {
            Ok(Ok(ClientReply::Status(cluster))) => Some(cluster),
            _ => None,
        };
    t.single(
        "strata_meta_leader_reachable",
        "gauge",
        "1 if the metadata leader answered this scrape (the series below need it).",
        u64::from(cluster.is_some()),
    );
    let Some(cluster) = cluster else { return };
    t.single("strata_meta_leader", "gauge", "The metadata leader's node id.", cluster.leader);
    t.single(
        "strata_meta_commit_index",
        "gauge",
        "The last committed log index the leader has applied.",
        cluster.applied,
    );
    t.single("strata_meta_revision", "gauge", "The state machine's revision.", cluster.revision);
    // Up as placement counts it: a live session and the node's record (its address)
    // published, which registering writes just after the session.
    let is_up = |m: &strata_meta::service::MemberStatus| {
        m.record.is_some() && m.session.as_ref().is_some_and(|s| s.up)
    };
    let up = cluster.members.iter().filter(|m| is_up(m)).count();
    let name = "strata_nodes";
    t.family(
        name,
        "gauge",
        "Cluster members by state (down: declared down, not registered, or its record not \
         published yet).",
    );
    t.int(name, &[("state", "up")], up as u64);
    t.int(name, &[("state", "down")], (cluster.members.len() - up) as u64);
    let name = "strata_node_up";
    t.family(
        name,
        "gauge",
        "1 if the member's session is up and its record published, per node id and role.",
    );
    for m in &cluster.members {
        let id = m.id.to_string();
        let up = is_up(m);
        t.int(name, &[("node", &id), ("role", &m.role)], u64::from(up));
    }
}

fn replicated_series(t: &mut Text, volumes: &[VolumeInfo]) {
    let replicated: Vec<_> = volumes.iter().filter(|v| !v.components.is_empty()).collect();
    let mut by_state: BTreeMap<&str, u64> =
        CopyState::ALL.into_iter().map(|s| (s.name(), 0)).collect();
    for c in replicated.iter().flat_map(|v| &v.components) {
        *by_state.entry(c.state.name()).or_default() += 1;
    }
    let name = "strata_components";
    t.family(name, "gauge", "Components of replicated volumes by state, in the cluster.");
    for (state, n) in &by_state {
        t.int(name, &[("state", state)], *n);
    }
    let name = "strata_volume_components";
    t.family(name, "gauge", "A replicated volume's components by state.");
    for v in &replicated {
        let mut states: BTreeMap<&str, u64> = BTreeMap::new();
        for c in &v.components {
            *states.entry(c.state.name()).or_default() += 1;
        }
        for (state, n) in states {
            t.int(name, &[("volume", &v.name), ("state", state)], n);
        }
    }
    type Pick = fn(&ComponentRecord) -> Option<u64>;
    let series: [(&str, &str, Pick); 3] = [
        (
            "strata_component_resync_left_bytes",
            "Bytes a component's bitmap marks as missed (known on the volume's owner).",
            |c| c.dirty_bytes,
        ),
        (
            "strata_component_scan_left_bytes",
            "Bytes a digest scan still has to compare (known on the volume's owner).",
            |c| c.scan_left_bytes,
        ),
        (
            "strata_component_resynced_bytes",
            "Bytes copied to a component since its owner took the volume (on the owner).",
            |c| c.resynced_bytes,
        ),
    ];
    for (name, help, pick) in series {
        t.family(name, "gauge", help);
        for v in &replicated {
            for c in &v.components {
                if let Some(value) = pick(c) {
                    let node = c.node.to_string();
                    t.int(name, &[("volume", &v.name), ("node", &node)], value);
                }
            }
        }
    }
}
