//! Metrics: what a node counts of the I/O it serves, and the Prometheus text exposition
//! format (version 0.0.4) that `report` writes its `GET /metrics` in.
//!
//! Every volume the node exports over NBD is wrapped in a [`Counted`] (in
//! `node::Exports::open`, and around the volume its group-commit thread syncs), which
//! forwards every [`BlockVolume`] method to the volume and counts ops, bytes, errors and
//! latency. The counters live in the node's [`Metrics`], keyed by export name, so every
//! connection to one volume adds to the same series.
//!
//! Layering: this module uses no other module of the server (`node` holds a [`Metrics`];
//! `report` renders the node's state, these counters among it).
//!
//! Written by hand: `prometheus-client` writes OpenMetrics text only (`# EOF`, `# UNIT`,
//! counter families named without `_total`), not 0.0.4.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_io::{BlockVolume, Extent, IoFuture, IoOp, StoreError, WritesFuture, ZeroMode};

/// Upper bounds (seconds) of the request latency histogram's buckets.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

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
    /// Requests that succeeded, their bytes, and requests that failed.
    pub fn get(&self) -> (u64, u64, u64) {
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
