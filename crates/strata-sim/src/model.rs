//! What the simulation's hosts share: the seeded randomness, the disks (which outlive a
//! host's crash), the clients' history, the trace, and the ghost state the checkers read.

use rand::rngs::SmallRng;
use rand::Rng;
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
pub use strata_replica::record::{CopyRef, CopyState, SnapshotRecord};
use strata_replica::timing::Timing;
use tokio::time::Duration;

/// 4 KiB blocks per volume.
pub const BLOCKS: u64 = 256;
/// Blocks per 64 KiB region (a bitmap bit, a digest).
pub const REGION_BLOCKS: u64 = 16;
/// Regions per volume.
pub const REGIONS: u64 = BLOCKS / REGION_BLOCKS;
/// Bytes per block.
pub const BLOCK_BYTES: u64 = 4096;
/// Storage nodes (each holds one component of the one volume).
pub const NODES: usize = 3;
/// Host index of the metadata service.
pub const META: usize = NODES;
/// Host index of the clients.
pub const CLIENT: usize = NODES + 1;
/// The volume's `min_replicas`.
pub const MIN_REPLICAS: usize = 2;

/// The protocol's timeouts and periods: the server's ([`Timing::DEFAULT`]) divided by
/// 10 (only their ratios matter to the protocol, and a shorter simulated second runs
/// more seeds).
pub fn timing() -> Timing {
    Timing::DEFAULT.scaled(10)
}

// Constants of the simulation that `Timing` does not hold (the server's own are fixed
// in its code or its metadata service).
/// A node sends a heartbeat this often (the metadata service's client: 1 s, scaled).
pub const HEARTBEAT_EVERY: Duration = Duration::from_millis(100);
/// A metadata request's patience.
pub const META_TIMEOUT: Duration = Duration::from_millis(300);
/// A forwarded request retries this often.
pub const FORWARD_RETRY: Duration = Duration::from_millis(20);
/// Regions compared per resync step (`replicated::SCAN_BATCH`).
pub const SCAN_BATCH: u64 = 16;

/// A protocol rule the simulation can break, to show its checks find the breach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mutation {
    /// A failed copy's STALE mark is not recorded before the write is acknowledged.
    AckBeforeStale,
    /// Components apply requests whatever their epoch (no fence).
    NoFence,
    /// An owner serves whether or not its session is confirmed fresh.
    NoLease,
    /// A new owner does not digest-scan the other ACTIVE copies.
    NoScan,
    /// A copy that stops being ACTIVE does not hold back acknowledgments until its read
    /// lease has run out (invariant 10, `revoked_until`).
    NoRevocation,
    /// A node reads its copy under a read lease whatever its copy's fence (invariant 10,
    /// `Router::read_here`).
    NoLeaseFence,
    /// An unclean take with an unfenced copy acknowledges at once (invariant 10,
    /// `take_over`'s `2 * read_lease`).
    NoTakeWait,
    /// A pending copy catches a snapshot up from the owner's live volume, not from the
    /// snapshot (S4).
    CatchUpFromLive,
    /// A STALE copy turns RESYNCING while a snapshot is being made (S5, as first built).
    ResyncWhileCreating,
}

/// `/volumes/<name>/owner`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub node: usize,
    pub epoch: u64,
}

/// `/volumes/<name>`: the highest epoch, the last owner, each component's state
/// (component `i` is on node `i`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub epoch: u64,
    pub node: usize,
    pub states: [CopyState; NODES],
    /// `VolumeRecord::lost_at`: the latest epoch taken with a suspect copy as the truth.
    pub lost_at: Option<u64>,
    /// `VolumeRecord::snapshots` (`strata_replica::snapshot`); a copy is named by its
    /// node index, as node and id.
    pub snapshots: Vec<SnapshotRecord>,
}

/// One component on one node's disk: a page cache over a durable image.
#[derive(Clone, Debug)]
pub struct Component {
    /// What a read sees.
    pub live: Vec<u64>,
    /// What survives a machine crash.
    pub durable: Vec<u64>,
    /// Writes since the last sync, in order.
    pub unsynced: Vec<(u64, u64)>,
    /// The epoch fence (durable: a raise is on disk before the request applies).
    pub fence: u64,
    /// It may have lost unsynced writes in a power loss and no owner has vouched for it
    /// since (the server's power-loss mark, on disk; invariant 11).
    pub suspect: bool,
    /// Its snapshots by key: the blocks when each was taken (durable: a snapshot is
    /// synced when it is taken).
    pub snapshots: BTreeMap<u64, Vec<u64>>,
}

impl Component {
    fn new() -> Component {
        Component {
            live: vec![0; BLOCKS as usize],
            durable: vec![0; BLOCKS as usize],
            unsynced: Vec::new(),
            fence: 0,
            suspect: false,
            snapshots: BTreeMap::new(),
        }
    }

    /// Takes snapshot `key` of what a read sees now, synced first (replacing one of that
    /// key: a catch-up takes again one the copy took at a barrier it was then failed at).
    pub fn take_snapshot(&mut self, key: u64) {
        self.sync();
        self.snapshots.insert(key, self.live.clone());
    }

    /// Writes `values` from block `first` (to the page cache).
    pub fn write(&mut self, first: u64, values: &[u64]) {
        for (k, v) in values.iter().enumerate() {
            let b = first + k as u64;
            self.live[b as usize] = *v;
            self.unsynced.push((b, *v));
        }
    }

    /// fdatasync.
    pub fn sync(&mut self) {
        self.durable.clone_from(&self.live);
        self.unsynced.clear();
    }

    /// A digest of region `r`.
    pub fn digest(&self, r: u64) -> u64 {
        let blocks = &self.live[(r * REGION_BLOCKS) as usize..((r + 1) * REGION_BLOCKS) as usize];
        // FNV-1a: deterministic across runs (std's hasher is keyed per process).
        blocks.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| {
            v.to_le_bytes().iter().fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
        })
    }
}

/// A bitmap file the owner keeps for a STALE copy: replaced by a rename, not synced.
/// As the server's, it names the epoch and boot it was kept at: epoch 0 when the copy
/// owed a scan the bitmap does not cover, so that no later owner trusts it.
#[derive(Clone, Debug)]
pub struct Bitmap {
    pub epoch: u64,
    pub boot: u64,
    pub regions: BTreeSet<u64>,
}

/// One node's disk.
#[derive(Clone, Debug)]
pub struct Disk {
    pub component: Component,
    /// Bitmap files by copy (node) index.
    pub bitmaps: BTreeMap<usize, Bitmap>,
    /// The boot count (a machine crash starts a new boot).
    pub boot: u64,
}

/// How an operation ended, as its client saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed,
    /// No answer in time: it may apply any time, or never.
    Unknown,
}

/// One client operation.
#[derive(Clone, Debug)]
pub struct Event {
    pub op: Op,
    /// Simulated time it started and ended.
    pub start: Duration,
    pub end: Duration,
    pub outcome: Outcome,
    /// A read's value.
    pub value: Option<u64>,
}

pub use crate::net::Op;

/// Per copy, for the resync check (the owner's accounting, kept across owners).
#[derive(Clone, Debug, Default)]
pub struct ResyncStats {
    /// Bytes of regions ever put in a bitmap (dirtied while the copy was away, or
    /// unflushed when it failed).
    pub dirtied_bytes: u64,
    /// Bytes copied from a bitmap's regions.
    pub resync_bytes: u64,
    /// Bytes copied by digest scans after a change of owner.
    pub scan_bytes: u64,
    /// Distinct 4 KiB blocks written while the copy was STALE, since it last was.
    pub away_blocks: BTreeSet<u64>,
    /// Bytes of those blocks, summed over the copy's returns to ACTIVE.
    pub away_bytes: u64,
}

/// State every host of one simulation shares.
pub struct Shared {
    /// The protocol's timing ([`timing`]).
    pub timing: Timing,
    /// Per host: the instance of its current process (each start a new one; the
    /// server's data plane sees a restart as a new connection).
    pub instances: RefCell<Vec<u64>>,
    /// Invariants of the core's owner state found broken (`OwnerState::validate`).
    pub core_violations: RefCell<Vec<String>>,
    /// Addresses by host index (nodes, the metadata service, the clients).
    pub hosts: RefCell<Vec<IpAddr>>,
    /// The owner key and record as the metadata service holds them (for the driver).
    pub published: RefCell<(Option<Owner>, Option<Record>)>,
    pub mutation: Option<Mutation>,
    pub rng: RefCell<SmallRng>,
    /// Probability that a datagram is lost now.
    pub loss: Cell<f64>,
    pub next_key: Cell<u64>,
    pub stash: RefCell<BTreeMap<u64, crate::net::EnvelopeBox>>,
    pub disks: RefCell<Vec<Disk>>,
    pub history: RefCell<Vec<Event>>,
    /// Machine crashes (unsynced writes may be lost there): (time, node).
    pub lossy_crashes: RefCell<Vec<(Duration, usize)>>,
    /// STALE marks recorded in the volume's record: (time, node).
    pub stale_marks: RefCell<Vec<(Duration, usize)>>,
    /// Per acknowledged write (by id): the nodes whose copies held it at the reply.
    pub holders: RefCell<BTreeMap<u64, Vec<usize>>>,
    /// Per component: the highest epoch of a request it applied (never lowered, not
    /// even by a crash: ghost state).
    pub ghost_epoch: RefCell<Vec<u64>>,
    pub violations: RefCell<Vec<String>>,
    pub resync: RefCell<Vec<ResyncStats>>,
    /// Per node: client requests it is serving or forwarding now (it goes on after the
    /// client gave up).
    pub routing: RefCell<Vec<u32>>,
    /// Per node: whether its owner view has work left (`None`: no view serving).
    pub busy: RefCell<Vec<Option<bool>>>,
    pub trace: RefCell<VecDeque<String>>,
    pub trace_hash: Cell<u64>,
    pub next_write: Cell<u64>,
    /// The next snapshot's name (`s1`, `s2`, …; `Scenario::snapshots`).
    pub next_snapshot: Cell<u64>,
    /// Partitioned pairs of hosts now (lower index first).
    pub cut: RefCell<BTreeSet<(usize, usize)>>,
    /// `STRATA_SIM_FAST_REFUSE=1`, an experiment: a new owner's fence probe to a host cut
    /// off from it fails at once (as a refused or reset connection does in the real
    /// code) instead of after `Timing::probe_timeout`.
    pub fast_refuse: bool,
    /// `STRATA_SIM_OWNER_BOUNCE=1`, with it: half the faults restart the owner at once
    /// and cut it off from one other node.
    pub owner_bounce: bool,
    /// `Scenario::snapshots`: owners look for snapshots to undo and catch up (without
    /// any, the look would only add messages, and move every seed's course).
    pub snapshots: bool,
    /// Reads a node served from its own copy under a read lease.
    pub local_reads: Cell<u64>,
    /// Trace lines kept for a failure's report.
    pub trace_kept: usize,
    /// The driver's simulated time (for its own trace lines).
    pub clock: Cell<Duration>,
}

/// Trace lines kept for a failure's report (`STRATA_SIM_TRACE_LINES` for more).
const TRACE_KEPT: usize = 80;

impl Shared {
    pub fn new(rng: SmallRng, mutation: Option<Mutation>) -> Shared {
        Shared {
            timing: timing(),
            instances: RefCell::new(vec![0; CLIENT + 1]),
            core_violations: RefCell::default(),
            hosts: RefCell::default(),
            published: RefCell::default(),
            mutation,
            rng: RefCell::new(rng),
            loss: Cell::new(0.0),
            next_key: Cell::new(1),
            stash: RefCell::default(),
            disks: RefCell::new(
                (0..NODES)
                    .map(|_| Disk {
                        component: Component::new(),
                        bitmaps: BTreeMap::new(),
                        boot: 0,
                    })
                    .collect(),
            ),
            history: RefCell::default(),
            lossy_crashes: RefCell::default(),
            stale_marks: RefCell::default(),
            holders: RefCell::default(),
            ghost_epoch: RefCell::new(vec![0; NODES]),
            violations: RefCell::default(),
            resync: RefCell::new(vec![ResyncStats::default(); NODES]),
            busy: RefCell::new(vec![None; NODES]),
            routing: RefCell::new(vec![0; NODES]),
            trace: RefCell::default(),
            trace_hash: Cell::new(0),
            next_write: Cell::new(1),
            next_snapshot: Cell::new(1),
            local_reads: Cell::new(0),
            cut: RefCell::default(),
            fast_refuse: std::env::var("STRATA_SIM_FAST_REFUSE").is_ok_and(|v| v == "1"),
            owner_bounce: std::env::var("STRATA_SIM_OWNER_BOUNCE").is_ok_and(|v| v == "1"),
            snapshots: false,
            trace_kept: std::env::var("STRATA_SIM_TRACE_LINES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(TRACE_KEPT),
            clock: Cell::new(Duration::ZERO),
        }
    }

    /// Whether the mutation `m` is on.
    pub fn broken(&self, m: Mutation) -> bool {
        self.mutation == Some(m)
    }

    /// Whether a datagram is lost.
    pub fn lose(&self) -> bool {
        let p = self.loss.get();
        p > 0.0 && self.rng.borrow_mut().random_bool(p)
    }

    /// Notes a line in the trace (its hash covers every line ever noted).
    pub fn note(&self, line: String) {
        let now = self.now();
        let line = format!("{:>6}ms {line}", now.as_millis());
        let h = line
            .bytes()
            .fold(self.trace_hash.get(), |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        self.trace_hash.set(h);
        let mut t = self.trace.borrow_mut();
        if t.len() >= self.trace_kept {
            t.pop_front();
        }
        t.push_back(line);
    }

    /// Component `node` applies a request at `epoch` (check 3's ghost).
    pub fn applied_at(&self, node: usize, epoch: u64) {
        let mut g = self.ghost_epoch.borrow_mut();
        if epoch < g[node] {
            let v =
                format!("node {node} applied a request at epoch {epoch} after one at {}", g[node]);
            self.note(format!("VIOLATION {v}"));
            self.violations.borrow_mut().push(v);
        }
        g[node] = g[node].max(epoch);
    }

    /// An invariant of the core's owner state found broken: the seed fails with it.
    pub fn core_violation(&self, v: String) {
        self.note(format!("VIOLATION {v}"));
        self.core_violations.borrow_mut().push(v);
    }

    /// Now, in simulated time.
    pub fn now(&self) -> Duration {
        turmoil::sim_elapsed().unwrap_or(self.clock.get())
    }
}
