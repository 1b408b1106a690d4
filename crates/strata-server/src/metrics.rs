//! Metrics: what a node counts of the I/O it serves, and `GET /metrics`, the Prometheus
//! text exposition format (version 0.0.4) of those counts, the store's space and
//! activity, the metadata service and the cluster's replicated volumes.
//!
//! Every volume the node exports over NBD is wrapped in a [`Counted`] (in
//! `node::Exports::open`, and around the volume its group-commit thread syncs), which
//! forwards every [`BlockVolume`] method to the volume and counts ops, bytes, errors and
//! latency. The counters live in the node's [`Metrics`], keyed by export name, so every
//! connection to one volume adds to the same series. A node counts the requests its own
//! NBD clients make (a replicated volume's requests forwarded to its owner are counted
//! where the client is connected): sum over nodes for a volume's total.
//!
//! The cluster-level series (`strata_meta_*`, `strata_nodes`, `strata_components`, …) are
//! every node's view of the cluster: each node reports them; aggregate with `max`.
//!
//! Written by hand: `prometheus-client` writes OpenMetrics text only (`# EOF`, `# UNIT`,
//! counter families named without `_total`), not 0.0.4.

use crate::api::Api;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_io::{BlockVolume, Extent, IoFuture, IoOp, StoreError, WritesFuture, ZeroMode};
use strata_replica::record::{ComponentRecord, CopyState};

/// Upper bounds (seconds) of the request latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a scrape waits for the metadata leader's view of the cluster.
const CLUSTER_WAIT: Duration = Duration::from_secs(2);

/// The kinds of request counted, the `op` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `read_at` (and a `try_read_at_nowait` that read).
    Read,
    /// `write_at` (and a `try_write_at_nowait` that wrote).
    Write,
    /// `trim`.
    Trim,
    /// `write_zeroes`.
    Zero,
    /// `extents` (NBD block status).
    BlockStatus,
    /// `sync`: a device sync, serving any number of FLUSH and FUA requests.
    Flush,
}

impl Op {
    /// The kind and bytes of a request made as a future.
    fn of(op: &IoOp) -> (Op, u64) {
        match op {
            IoOp::Read { length, .. } => (Op::Read, *length as u64),
            IoOp::Write { data, .. } => (Op::Write, data.len() as u64),
            IoOp::Trim { length, .. } => (Op::Trim, *length),
            IoOp::Zero { length, .. } => (Op::Zero, *length),
            IoOp::Flush => (Op::Flush, 0),
        }
    }
}

impl Op {
    /// Every kind, in the order of [`VolumeCounters`]' arrays.
    pub const ALL: [Op; 6] = [Op::Read, Op::Write, Op::Trim, Op::Zero, Op::BlockStatus, Op::Flush];

    /// The `op` label's value.
    pub fn label(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Trim => "trim",
            Op::Zero => "zero",
            Op::BlockStatus => "block_status",
            Op::Flush => "flush",
        }
    }
}

/// A latency histogram (buckets [`LATENCY_BUCKETS`]).
#[derive(Default)]
pub struct Histogram {
    /// Observations at most each bound (not cumulative; the last is past every bound).
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let i = LATENCY_BUCKETS.iter().position(|&le| seconds <= le);
        self.buckets[i.unwrap_or(LATENCY_BUCKETS.len())].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (the last is the total count) and the sum in seconds.
    pub fn cumulative(&self) -> ([u64; LATENCY_BUCKETS.len() + 1], f64) {
        let mut total = 0;
        let counts = std::array::from_fn(|i| {
            total += self.buckets[i].load(Ordering::Relaxed);
            total
        });
        (counts, self.nanos.load(Ordering::Relaxed) as f64 / 1e9)
    }
}

/// One kind of request's counts.
#[derive(Default)]
pub struct OpCounters {
    /// Requests that succeeded.
    pub ops: AtomicU64,
    /// Their bytes (for block status: none).
    pub bytes: AtomicU64,
    /// Requests that failed.
    pub errors: AtomicU64,
    /// Latency of every request, failed or not.
    pub latency: Histogram,
}

impl OpCounters {
    fn get(&self) -> (u64, u64, u64) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        (load(&self.ops), load(&self.bytes), load(&self.errors))
    }
}

/// One volume's counts (one export name: `VOL`, or `VOL@SNAP`).
#[derive(Default)]
pub struct VolumeCounters {
    ops: [OpCounters; Op::ALL.len()],
}

impl VolumeCounters {
    /// The counts of one kind of request.
    pub fn op(&self, op: Op) -> &OpCounters {
        &self.ops[op as usize]
    }

    fn record(&self, op: Op, bytes: u64, took: Duration, ok: bool) {
        let c = self.op(op);
        if ok {
            c.ops.fetch_add(1, Ordering::Relaxed);
            c.bytes.fetch_add(bytes, Ordering::Relaxed);
        } else {
            c.errors.fetch_add(1, Ordering::Relaxed);
        }
        c.latency.observe(took);
    }
}

/// The node's counters, by export name.
#[derive(Default)]
pub struct Metrics {
    volumes: Mutex<BTreeMap<String, Arc<VolumeCounters>>>,
}

impl Metrics {
    /// The counters of export `name` (made on first use).
    pub fn volume(&self, name: &str) -> Arc<VolumeCounters> {
        let mut volumes = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = volumes.get(name) {
            return c.clone();
        }
        // Bounded without a scrape too: counters no volume holds any more (every wrapper
        // of theirs is gone) are dropped once there are many.
        if volumes.len() >= 2 * strata_types::limits::VOLUMES_MAX {
            volumes.retain(|_, c| Arc::strong_count(c) > 1);
        }
        volumes.entry(name.to_owned()).or_default().clone()
    }

    /// `inner` counted under export name `name`.
    pub fn wrap(&self, name: &str, inner: Arc<dyn BlockVolume>) -> Arc<dyn BlockVolume> {
        Arc::new(Counted { inner, counters: self.volume(name) })
    }

    /// Every export's counters, by name; drops those of exports `exists` denies that no
    /// wrapper holds any more (one made while `exists` was decided is kept).
    pub fn volumes(&self, exists: impl Fn(&str) -> bool) -> Vec<(String, Arc<VolumeCounters>)> {
        let mut volumes = self.volumes.lock().unwrap_or_else(|p| p.into_inner());
        volumes.retain(|name, c| exists(name) || Arc::strong_count(c) > 1);
        volumes.iter().map(|(n, c)| (n.clone(), c.clone())).collect()
    }
}

/// A volume whose every request is counted: forwards each [`BlockVolume`] method to the
/// inner volume (including those with default bodies, so the inner volume's own fast
/// paths and futures are kept: `try_*_nowait`, `prefetch`, `asynchronous`, `submit`) and
/// records ops, bytes, errors and latency around it. A method added to the trait must be
/// forwarded here too.
pub struct Counted {
    inner: Arc<dyn BlockVolume>,
    counters: Arc<VolumeCounters>,
}

impl Counted {
    fn timed<T>(
        &self,
        op: Op,
        bytes: u64,
        f: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let result = f();
        self.counters.record(op, bytes, started.elapsed(), result.is_ok());
        result
    }

    /// Writes done together, each counted with the time they took together.
    fn record_each(&self, writes: &[(u64, &[u8])], started: Instant, ok: bool) {
        let took = started.elapsed();
        for (_, data) in writes {
            self.counters.record(Op::Write, data.len() as u64, took, ok);
        }
    }

    /// A `try_*_nowait` call: counted when it did the request or failed; `Ok(false)` (not
    /// done, the caller goes on to the blocking call, counted there) is not counted.
    fn timed_nowait(
        &self,
        op: Op,
        bytes: u64,
        f: impl FnOnce() -> Result<bool, StoreError>,
    ) -> Result<bool, StoreError> {
        let started = Instant::now();
        let result = f();
        if !matches!(result, Ok(false)) {
            self.counters.record(op, bytes, started.elapsed(), result.is_ok());
        }
        result
    }
}

impl BlockVolume for Counted {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn allocated_bytes(&self) -> Result<u64, StoreError> {
        self.inner.allocated_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let len = buf.len() as u64;
        self.timed(Op::Read, len, || self.inner.read_at(buf, offset))
    }

    fn try_read_at_nowait(&self, buf: &mut [u8], offset: u64) -> Result<bool, StoreError> {
        let len = buf.len() as u64;
        self.timed_nowait(Op::Read, len, || self.inner.try_read_at_nowait(buf, offset))
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), StoreError> {
        self.timed(Op::Write, data.len() as u64, || self.inner.write_at(data, offset))
    }

    fn try_write_at_nowait(&self, data: &[u8], offset: u64) -> Result<bool, StoreError> {
        let len = data.len() as u64;
        self.timed_nowait(Op::Write, len, || self.inner.try_write_at_nowait(data, offset))
    }

    fn write_many(&self, writes: &[(u64, &[u8])]) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.inner.write_many(writes);
        self.record_each(writes, started, result.is_ok());
        result
    }

    fn try_write_many_nowait(&self, writes: &[(u64, &[u8])]) -> Result<bool, StoreError> {
        let started = Instant::now();
        let result = self.inner.try_write_many_nowait(writes);
        if !matches!(result, Ok(false)) {
            self.record_each(writes, started, result.is_ok());
        }
        result
    }

    fn trim(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        self.timed(Op::Trim, length, || self.inner.trim(offset, length))
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode) -> Result<(), StoreError> {
        self.timed(Op::Zero, length, || self.inner.write_zeroes(offset, length, mode))
    }

    fn extents(
        &self,
        offset: u64,
        length: u64,
        extents_max: usize,
    ) -> Result<Vec<Extent>, StoreError> {
        self.timed(Op::BlockStatus, 0, || self.inner.extents(offset, length, extents_max))
    }

    fn prefetch(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        self.inner.prefetch(offset, length)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.timed(Op::Flush, 0, || self.inner.sync())
    }

    fn resize(&self, size_bytes: u64) -> Result<(), StoreError> {
        self.inner.resize(size_bytes)
    }

    fn asynchronous(&self) -> bool {
        self.inner.asynchronous()
    }

    fn submit(self: Arc<Self>, op: IoOp) -> IoFuture {
        let (kind, bytes) = Op::of(&op);
        let started = Instant::now();
        let counters = self.counters.clone();
        let done = self.inner.clone().submit(op);
        Box::pin(async move {
            let result = done.await;
            counters.record(kind, bytes, started.elapsed(), result.is_ok());
            result
        })
    }

    fn submit_writes(self: Arc<Self>, writes: Vec<IoOp>) -> WritesFuture {
        let bytes: Vec<u64> = writes.iter().map(|op| Op::of(op).1).collect();
        let started = Instant::now();
        let counters = self.counters.clone();
        let done = self.inner.clone().submit_writes(writes);
        Box::pin(async move {
            let results = done.await;
            let took = started.elapsed();
            for (result, bytes) in results.iter().zip(bytes) {
                counters.record(Op::Write, bytes, took, result.is_ok());
            }
            results
        })
    }
}

/// A text exposition being written.
#[derive(Default)]
pub struct Text {
    out: String,
}

/// A label set: `(name, value)` pairs.
type Labels<'a> = &'a [(&'a str, &'a str)];

impl Text {
    /// Starts a family: `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn labels(&mut self, labels: Labels<'_>, extra: Option<(&str, &str)>) {
        let all: Vec<(&str, &str)> = labels.iter().copied().chain(extra).collect();
        if all.is_empty() {
            return;
        }
        self.out.push('{');
        for (i, (k, v)) in all.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
            let _ = write!(self.out, "{k}=\"{v}\"");
        }
        self.out.push('}');
    }

    /// One sample of an integer value.
    pub fn int(&mut self, name: &str, labels: Labels<'_>, value: u64) {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {value}");
    }

    /// One sample of a real value.
    pub fn real(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.out.push_str(name);
        self.labels(labels, None);
        let _ = writeln!(self.out, " {}", real(value));
    }

    /// A family of one sample.
    pub fn single(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.family(name, kind, help);
        self.int(name, &[], value);
    }

    /// One histogram's samples: `_bucket` (cumulative, with `le`), `_sum`, `_count`.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: Labels<'_>,
        bounds: &[f64],
        cumulative: &[u64],
        sum: f64,
    ) {
        let bucket = format!("{name}_bucket");
        for (i, count) in cumulative.iter().enumerate() {
            let le = bounds.get(i).map_or_else(|| "+Inf".to_owned(), |b| real(*b));
            self.out.push_str(&bucket);
            self.labels(labels, Some(("le", &le)));
            let _ = writeln!(self.out, " {count}");
        }
        self.real(&format!("{name}_sum"), labels, sum);
        self.int(&format!("{name}_count"), labels, cumulative.last().copied().unwrap_or(0));
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// A real number as the text format writes it.
fn real(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_owned()
    } else {
        format!("{v}")
    }
}

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
fn volume_io(api: &Api) -> Vec<(String, Arc<VolumeCounters>, (u64, u64))> {
    let exports: std::collections::HashSet<String> =
        crate::node::Exports(api.node.clone()).all().into_iter().map(|e| e.name).collect();
    let syncs: BTreeMap<String, (u64, u64)> = api.node.sync_counts().into_iter().collect();
    api.node
        .metrics()
        .volumes(|name| exports.contains(name))
        .into_iter()
        .map(|(name, c)| {
            let s = syncs.get(&name).copied().unwrap_or_default();
            (name, c, s)
        })
        .collect()
}

/// This node's counters (`GET /v1/stats`).
pub fn stats(api: &Api) -> Stats {
    let volumes = volume_io(api)
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
    let s = api.node.store_stats();
    let space = api.node.space();
    Stats {
        unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        uptime_seconds: api.started.elapsed().as_secs_f64(),
        volumes,
        store: StoreStatsView {
            free_bytes: api.node.free_bytes(),
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

/// The whole exposition (`GET /metrics`).
pub async fn exposition(api: &Api) -> String {
    let mut t = Text::default();
    volume_series(&mut t, &volume_io(api));
    store_series(&mut t, api);
    meta_series(&mut t, api).await;
    replicated_series(&mut t, &crate::api::all_volumes(api));
    let name = "strata_volume_local_reads_total";
    t.family(
        name,
        "counter",
        "Reads of a replicated volume this node served from its own copy, under the owner's \
         read lease, instead of forwarding them.",
    );
    let mut names = api.node.replicated_names();
    names.sort();
    let routers: Vec<_> = names
        .iter()
        .filter_map(|volume| Some((volume.as_str(), api.node.replicated_router(volume)?)))
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

fn store_series(t: &mut Text, api: &Api) {
    let s = api.node.store_stats();
    let space = api.node.space();
    let gauges = [
        ("strata_store_free_bytes", "Bytes free in the file system holding the store.", {
            api.node.free_bytes()
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
    let load = api.node.resync_scheduler().load();
    let running = load.running as u64;
    t.single("strata_resync_jobs_running", "gauge", "Resync jobs this node runs.", running);
    let waiting = load.waiting as u64;
    t.single("strata_resync_jobs_waiting", "gauge", "Resync jobs waiting here.", waiting);
    let held = api.node.resync_scheduler().slots_held() as u64;
    t.single(
        "strata_resync_slots_held",
        "gauge",
        "Resync jobs of other nodes writing to copies here now (slots granted).",
        held,
    );
}

async fn meta_series(t: &mut Text, api: &Api) {
    use strata_meta::service::{ClientReply, ClientRequest};
    let local = api.meta.local_status();
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
        crate::node::MEMBERSHIP_READS.load(std::sync::atomic::Ordering::Relaxed),
    );
    let cluster =
        match tokio::time::timeout(CLUSTER_WAIT, api.meta.request(ClientRequest::Status)).await {
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
    let up = cluster.members.iter().filter(|m| m.session.as_ref().is_some_and(|s| s.up)).count();
    let name = "strata_nodes";
    t.family(name, "gauge", "Cluster members by state (down: declared down or not registered).");
    t.int(name, &[("state", "up")], up as u64);
    t.int(name, &[("state", "down")], (cluster.members.len() - up) as u64);
    let name = "strata_node_up";
    t.family(name, "gauge", "1 if the member's session is up, per node id and role.");
    for m in &cluster.members {
        let id = m.id.to_string();
        let up = m.session.as_ref().is_some_and(|s| s.up);
        t.int(name, &[("node", &id), ("role", &m.role)], u64::from(up));
    }
}

fn replicated_series(t: &mut Text, volumes: &[crate::node::VolumeInfo]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem(Mutex<Vec<u8>>);

    impl BlockVolume for Mem {
        fn size_bytes(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn allocated_bytes(&self) -> Result<u64, StoreError> {
            Ok(0)
        }
        fn read_at(&self, b: &mut [u8], o: u64) -> Result<(), StoreError> {
            let d = self.0.lock().unwrap();
            strata_io::check_range(o, b.len() as u64, d.len() as u64)?;
            b.copy_from_slice(&d[o as usize..o as usize + b.len()]);
            Ok(())
        }
        fn try_read_at_nowait(&self, b: &mut [u8], o: u64) -> Result<bool, StoreError> {
            // Only the first block is "cached".
            if o > 0 {
                return Ok(false);
            }
            self.read_at(b, o).map(|()| true)
        }
        fn write_at(&self, d: &[u8], o: u64) -> Result<(), StoreError> {
            let mut m = self.0.lock().unwrap();
            strata_io::check_range(o, d.len() as u64, m.len() as u64)?;
            m[o as usize..o as usize + d.len()].copy_from_slice(d);
            Ok(())
        }
        fn trim(&self, o: u64, l: u64) -> Result<(), StoreError> {
            self.write_at(&vec![0; l as usize], o)
        }
        fn write_zeroes(&self, o: u64, l: u64, _: ZeroMode) -> Result<(), StoreError> {
            self.trim(o, l)
        }
        fn extents(&self, _: u64, l: u64, _: usize) -> Result<Vec<Extent>, StoreError> {
            Ok(vec![Extent { length: l, hole: false, zero: false }])
        }
        fn prefetch(&self, _: u64, _: u64) -> Result<(), StoreError> {
            Err(StoreError::Unsupported { what: "prefetch (forwarded)" })
        }
        fn sync(&self) -> Result<(), StoreError> {
            Ok(())
        }
        fn resize(&self, s: u64) -> Result<(), StoreError> {
            self.0.lock().unwrap().resize(s as usize, 0);
            Ok(())
        }
    }

    #[test]
    fn the_wrapper_forwards_every_method_and_counts_what_was_done() {
        let metrics = Metrics::default();
        let inner: Arc<dyn BlockVolume> = Arc::new(Mem(Mutex::new(vec![0; 8192])));
        let a = metrics.wrap("v", inner.clone());
        let b = metrics.wrap("v", inner);
        a.write_at(&[7; 4096], 0).unwrap();
        assert!(b.try_write_at_nowait(&[1; 10], 0).is_ok_and(|done| !done), "default kept");
        let mut buf = [0u8; 4096];
        assert!(b.try_read_at_nowait(&mut buf, 0).unwrap(), "the inner fast path is used");
        assert_eq!(buf, [7; 4096]);
        assert!(!b.try_read_at_nowait(&mut buf, 4096).unwrap());
        b.read_at(&mut buf[..100], 4096).unwrap();
        assert!(a.read_at(&mut buf, 8000).is_err());
        a.trim(0, 512).unwrap();
        a.write_zeroes(512, 512, ZeroMode::Allocate).unwrap();
        assert_eq!(a.extents(0, 8192, 4).unwrap().len(), 1);
        assert!(a.prefetch(0, 1).is_err(), "prefetch reaches the inner volume");
        a.sync().unwrap();
        assert!(!a.asynchronous(), "the inner volume's answer");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let data = bytes::Bytes::from(vec![9u8; 512]);
        rt.block_on(a.clone().submit(IoOp::Write { offset: 0, data, fua: false })).unwrap();
        let read = rt.block_on(b.clone().submit(IoOp::Read { offset: 0, length: 512 }));
        assert_eq!(read.unwrap(), vec![9u8; 512]);
        a.resize(16384).unwrap();
        assert_eq!(b.size_bytes(), 16384);
        let c = metrics.volume("v");
        assert_eq!(c.op(Op::Write).get(), (2, 4608, 0), "write_at and a submitted write");
        assert_eq!(c.op(Op::Read).get(), (3, 4708, 1), "the try that read, the reads, a failure");
        assert_eq!(c.op(Op::Trim).get(), (1, 512, 0));
        assert_eq!(c.op(Op::Zero).get(), (1, 512, 0));
        assert_eq!(c.op(Op::BlockStatus).get(), (1, 0, 0));
        assert_eq!(c.op(Op::Flush).get(), (1, 0, 0));
        let (cumulative, sum) = c.op(Op::Read).latency.cumulative();
        assert_eq!(cumulative.last(), Some(&4));
        assert!(cumulative.windows(2).all(|w| w[0] <= w[1]) && sum >= 0.0);
        assert_eq!(metrics.volumes(|n| n != "v").len(), 1, "kept while a wrapper holds it");
        drop((a, b, c));
        assert_eq!(metrics.volumes(|n| n != "v").len(), 0, "gone volumes are dropped");
    }

    #[test]
    fn text_is_the_exposition_format() {
        let mut t = Text::default();
        t.family("x_total", "counter", "Help with a \\ and\na newline.");
        t.int("x_total", &[("volume", "a\"b\\c")], 3);
        t.histogram("h_seconds", &[("op", "read")], &[0.5, 1.0], &[1, 2, 3], 2.25);
        t.real("g", &[], f64::INFINITY);
        let text = t.finish();
        assert_eq!(
            text,
            "# HELP x_total Help with a \\\\ and\\na newline.\n# TYPE x_total counter\n\
             x_total{volume=\"a\\\"b\\\\c\"} 3\n\
             h_seconds_bucket{op=\"read\",le=\"0.5\"} 1\n\
             h_seconds_bucket{op=\"read\",le=\"1\"} 2\n\
             h_seconds_bucket{op=\"read\",le=\"+Inf\"} 3\n\
             h_seconds_sum{op=\"read\"} 2.25\nh_seconds_count{op=\"read\"} 3\ng +Inf\n"
        );
    }
}
