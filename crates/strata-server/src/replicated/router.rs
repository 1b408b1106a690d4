//! How one node serves one replicated volume (invariant 6): through its owner view while
//! it owns it, else by forwarding each request to the owner (retrying while a new owner is
//! chosen), and reads from its own copy under a read lease (invariant 10).

use super::*;
use crate::poison::{Locked, RwLocked};

/// How one node serves one replicated volume (invariant 6): through its owner view
/// while it owns the volume, else by forwarding each request to the owner.
pub struct Router {
    pub(super) name: String,
    /// Grows when the volume does (its clients see it when they reconnect).
    pub(super) size_bytes: AtomicU64,
    pub(super) meta: Arc<Member>,
    pub(super) key: DataKey,
    pub(super) view: RwLock<Option<Arc<ReplicatedVolume>>>,
    pub(super) peers: Mutex<HashMap<String, Arc<DataPeer>>>,
    pub(super) runtime: tokio::runtime::Handle,
    /// Held while this node takes ownership.
    pub(super) taking: tokio::sync::Mutex<()>,
    /// When a client of this node last did I/O on the volume.
    pub(super) last_local: Mutex<Option<Instant>>,
    /// Numbers this node's forwarded writes (an owner knows a retry by it).
    pub(super) forwarded: std::sync::atomic::AtomicU32,
    /// This node's copy of the volume, if it holds one (set by the steward).
    pub(super) local: Mutex<Option<(Component, Arc<Fencing>)>>,
    /// The owner's leave to read this node's copy (invariant 10).
    pub(super) lease: Arc<Leasing>,
    /// Reads served from this node's copy.
    pub(super) local_reads: AtomicU64,
    /// Batches of writes that came together, fanned out by this node's view, and the
    /// writes in them.
    pub(super) batches: [AtomicU64; 2],
    /// This node's clients' writes that no flush of theirs covers yet, by the epoch of
    /// the owner that acknowledged them (takeover T5: a flush says the oldest).
    pub(super) unflushed: Mutex<Unflushed>,
}

/// A router's read lease, and whether it is asking for one.
#[derive(Default)]
pub(super) struct Leasing {
    pub(super) held: Mutex<Option<ReadLease>>,
    pub(super) asking: AtomicBool,
}

/// Where forwarded requests go.
pub(super) struct Target {
    pub(super) peer: Arc<DataPeer>,
    pub(super) component: u64,
    pub(super) epoch: u64,
}

/// Why a forwarded request is retried when the owner changed while it waited.
pub(super) const OWNER_MOVED: &str = "the volume has another owner now";

/// Why a forwarded request did not succeed.
pub(super) enum Forwarded {
    /// The owner answered with a failure: the client gets it.
    Failed(StoreError),
    /// No owner answered: try again (the same or a new owner).
    Retry(String),
}

impl Router {
    /// A router of the volume `record` describes.
    pub fn new(meta: Arc<Member>, record: &VolumeRecord) -> Router {
        Router {
            name: record.name.clone(),
            size_bytes: AtomicU64::new(record.size_bytes),
            key: DataKey::from_secret(meta.secret()),
            meta,
            view: RwLock::new(None),
            peers: Mutex::default(),
            runtime: tokio::runtime::Handle::current(),
            taking: tokio::sync::Mutex::new(()),
            last_local: Mutex::new(None),
            forwarded: std::sync::atomic::AtomicU32::new(1),
            local: Mutex::new(None),
            lease: Arc::default(),
            local_reads: AtomicU64::new(0),
            batches: Default::default(),
            unflushed: Mutex::default(),
        }
    }

    /// Counts a batch of `writes` writes that came together, fanned out by this node's
    /// view (from its own clients, or forwarded by another node).
    pub fn count_batch(&self, writes: usize) {
        self.batches[0].fetch_add(1, Ordering::Relaxed);
        self.batches[1].fetch_add(writes as u64, Ordering::Relaxed);
    }

    /// Batches of writes that came together from a client, fanned out by this node as
    /// the owner, and the writes in them.
    pub fn write_batches(&self) -> (u64, u64) {
        let [batches, writes] = &self.batches;
        (batches.load(Ordering::Relaxed), writes.load(Ordering::Relaxed))
    }

    /// Takes the volume's size from its record (it only grows): this node's clients see
    /// it when they reconnect, and its owner view resyncs and scans all of it.
    pub(super) fn grow(&self, size_bytes: u64) {
        if self.size_bytes.fetch_max(size_bytes, Ordering::AcqRel) < size_bytes {
            tracing::info!(volume = %self.name, size = size_bytes, "the volume grew");
        }
        if let Some(v) = self.view() {
            v.size_bytes.fetch_max(size_bytes, Ordering::AcqRel);
            v.state().grow(size_bytes.div_ceil(REGION));
        }
    }

    /// This node's copy of the volume (`None`: it holds none), for reads under a lease.
    pub fn set_local(&self, copy: Option<(Component, Arc<Fencing>)>) {
        let mut local = self.local.locked("the node's own copy");
        if local.as_ref().map(|(c, _)| c.id()) != copy.as_ref().map(|(c, _)| c.id()) {
            *self.lease.held.locked("the read lease") = None;
        }
        *local = copy;
    }

    /// Reads served from this node's copy so far.
    pub fn local_reads(&self) -> u64 {
        self.local_reads.load(Ordering::Relaxed)
    }

    /// Serves a read from this node's copy if the owner's lease allows it now (invariant
    /// 10): the lease is current and the copy's fence still at its epoch, held for the
    /// read so no newer owner's fence completes meanwhile. `None`: forward it. Asks for
    /// a lease (in the background) when there is none or it is half gone.
    pub(super) async fn read_here(&self, offset: u64, length: usize) -> Option<Bytes> {
        let (copy, fencing) = self.local.locked("the node's own copy").clone()?;
        // The core's rules (`strata_replica::lease`, L1-L3).
        let lease = *self.lease.held.locked("the read lease");
        if ReadLease::renew_due(lease.as_ref(), now(), &T) {
            self.renew_lease(copy.id());
        }
        let fence = |l: &ReadLease| fencing.newest(l.component);
        let lease = lease.filter(|l| l.admits(copy.id(), now(), fence(l)))?;
        let _pass = fencing.enter(lease.component, lease.epoch).await.ok()?;
        if !lease.admits(copy.id(), now(), fencing.newest(lease.component)) {
            return None;
        }
        // From the page cache on this task when it can (no hop to the blocking pool);
        // a damaged block is not read here: the owner reads it and repairs its copy.
        let mut buf = vec![0u8; length];
        let data = match copy.volume.try_read_at_nowait(&mut buf, offset) {
            Ok(true) => Bytes::from(buf),
            Ok(false) => copy.volume.clone().submit(IoOp::Read { offset, length }).await.ok()?,
            Err(_) => return None,
        };
        (data.len() == length).then(|| {
            self.local_reads.fetch_add(1, Ordering::Relaxed);
            data
        })
    }

    /// Asks the owner for a read lease of copy `component` (one request at a time).
    pub(super) fn renew_lease(&self, component: u64) {
        if self.lease.asking.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(t) = self.target() else {
            self.lease.asking.store(false, Ordering::Release);
            return;
        };
        let me = self.meta.id();
        let asked = now();
        let h = request(Kind::Lease, t.component, t.epoch, me, 0);
        // Not awaited by the read: it is forwarded meanwhile.
        let leasing = self.lease.clone();
        tokio::spawn(async move {
            let reply = tokio::time::timeout(T.read_lease / 2, t.peer.call(h, &[])).await;
            if matches!(reply, Ok(Ok((r, _))) if r.component == component) {
                let l = ReadLease::granted(t.epoch, component, asked, &T);
                *leasing.held.locked("the read lease") = Some(l);
            }
            leasing.asking.store(false, Ordering::Release);
        });
    }

    /// This node's owner view, if it owns the volume.
    pub fn view(&self) -> Option<Arc<ReplicatedVolume>> {
        self.view.read_locked("the owner view").clone()
    }

    pub(super) fn install(&self, view: Arc<ReplicatedVolume>) {
        *self.view.write_locked("the owner view") = Some(view);
    }

    pub(super) fn clear(&self) {
        *self.view.write_locked("the owner view") = None;
    }

    /// The volume's owner key and record as this member has applied them (read together).
    pub(super) fn applied(&self) -> (Option<Owner>, Option<VolumeRecord>) {
        self.meta.read_local(|s| {
            let owner = s
                .get(&format!("/volumes/{}/owner", self.name))
                .and_then(|e| serde_json::from_slice::<Owner>(&e.value).ok());
            let record = s
                .get(&format!("/volumes/{}", self.name))
                .and_then(|e| serde_json::from_slice::<VolumeRecord>(&e.value).ok());
            (owner, record)
        })
    }

    /// The volume's epoch as this member has applied it (the record's or the owner key's,
    /// the higher; at least 1).
    pub(super) fn epoch_now(&self) -> u64 {
        let (owner, record) = self.applied();
        owner.map_or(0, |o| o.epoch).max(record.map_or(0, |r| r.epoch)).max(1)
    }

    /// The record's `lost_at` (takeover T5), as this member has applied it.
    pub(super) fn lost_at_now(&self) -> Option<u64> {
        self.applied().1.and_then(|r| r.lost_at)
    }

    /// The owner to forward to, from this member's applied state; else why there is none
    /// now (a reason to retry, not an error).
    pub(super) fn target(&self) -> Result<Target, &'static str> {
        let (owner, record) = self.applied();
        let owner = owner.ok_or("the volume has no owner now (a new one is being chosen)")?;
        if owner.node == self.meta.id() {
            return Err("this node is taking ownership");
        }
        let component = record
            .and_then(|r| r.components.iter().find(|c| c.node == owner.node).map(|c| c.id))
            .ok_or("the owner holds no copy")?;
        let rpc = rpc_of(&self.meta, owner.node).ok_or("the owner has no address")?;
        let mut peers = self.peers.locked("the data-plane peers");
        let peer = peers
            .entry(rpc.clone())
            .or_insert_with(|| Arc::new(DataPeer::new(self.key.clone(), rpc)))
            .clone();
        Ok(Target { peer, component, epoch: owner.epoch })
    }

    /// One VOLUME request to the owner `t`: its header and payload. A write or trim
    /// carries `number` (the same on every retry of it), a flush the epoch `since` it
    /// began at (in `offset`; takeover T5).
    pub(super) fn forwarded<'a>(
        &self,
        t: &Target,
        op: &'a IoOp,
        number: &'a [u8; 4],
        since: u64,
    ) -> (Header, &'a [u8]) {
        let (kind, offset, length) = wire(op);
        let (count, payload) = match op {
            IoOp::Write { data, .. } => (u32::from_le_bytes(*number), &data[..]),
            IoOp::Trim { .. } | IoOp::Zero { .. } => (length as u32, &number[..]),
            _ => (length as u32, &[][..]),
        };
        let offset = if matches!(op, IoOp::Flush) { since } else { offset };
        let mut h = request(kind, t.component, t.epoch, 0, offset);
        h.count = count;
        h.flags |= FLAG_VOLUME;
        if matches!(op, IoOp::Write { fua: true, .. }) {
            h.flags |= FLAG_FUA;
        }
        h.lsn = self.meta.id(); // Who forwards (for automatic moves).
        (h, payload)
    }

    /// Sends one VOLUME request to the owner; a read's data is the reply's payload. Given
    /// up (to be retried) as soon as the volume has another owner: an owner that hangs
    /// (paused, cut off) must not hold its forwarders' clients past the failover.
    pub(super) async fn forward(
        &self,
        t: &Target,
        op: &IoOp,
        number: u32,
        since: u64,
    ) -> Result<Bytes, Forwarded> {
        let number = number.to_le_bytes();
        let (h, payload) = self.forwarded(t, op, &number, since);
        let call = tokio::time::timeout(T.forward_timeout, t.peer.call(h, payload));
        tokio::select! {
            reply = call => self.outcome(&h, reply),
            () = self.owner_moved(t.epoch) => Err(Forwarded::Retry(OWNER_MOVED.into())),
        }
    }

    /// Returns once the volume's owner key (as this member has applied it) no longer
    /// names the owner at `epoch`: another node took it, or its owner's session ended.
    /// What that owner does with a request it got is fenced at the copies (invariant 2),
    /// so the request may go to the next owner.
    pub(super) async fn owner_moved(&self, epoch: u64) {
        let key = format!("/volumes/{}/owner", self.name);
        loop {
            tokio::time::sleep(T.owner_poll).await;
            let now = self.meta.read_local(|s| {
                s.get(&key).and_then(|e| serde_json::from_slice::<Owner>(&e.value).ok())
            });
            if now.is_none_or(|o| o.epoch != epoch) {
                return;
            }
        }
    }

    /// What the owner's reply to a forwarded request `h` means.
    pub(super) fn outcome(
        &self,
        h: &Header,
        reply: Result<Result<(Header, Vec<u8>), CallError>, tokio::time::error::Elapsed>,
    ) -> Result<Bytes, Forwarded> {
        match reply {
            Ok(Ok((_, data))) if h.kind == Kind::Read && data.len() != h.count as usize => {
                Err(Forwarded::Retry("a short read from the owner".into()))
            }
            Ok(Ok((_, data))) => Ok(Bytes::from(data)),
            Ok(Err(CallError::Status { status: Status::Io, addr, detail, .. })) => {
                let why = if detail.is_empty() { "no reason given".into() } else { detail };
                Err(Forwarded::Failed(io_error(
                    "forwarded",
                    format!("the owner at {addr} failed it: {why}"),
                )))
            }
            Ok(Err(CallError::Status { status: Status::NoSpace, .. })) => {
                Err(Forwarded::Failed(StoreError::NoSpace))
            }
            Ok(Err(CallError::Status { status: Status::OutOfRange, .. })) => {
                Err(Forwarded::Failed(StoreError::OutOfRange {
                    offset: h.offset,
                    length: u64::from(h.count),
                    size: self.size_bytes.load(Ordering::Acquire),
                }))
            }
            Ok(Err(CallError::Status { status: Status::Invalid, .. })) => {
                Err(Forwarded::Failed(io_error("forwarded", "the owner refused it as malformed")))
            }
            Ok(Err(e)) => Err(Forwarded::Retry(e.to_string())),
            Err(_) => Err(Forwarded::Retry("the owner did not answer in time".into())),
        }
    }

    /// Writes forwarded to the owner together (one send; `numbers` theirs): each one's
    /// outcome, `None` for one to retry on its own (with its number).
    pub(super) async fn forward_writes(
        &self,
        ops: &[IoOp],
        numbers: &[u32],
    ) -> Vec<Option<Result<Bytes, StoreError>>> {
        let Ok(t) = self.target() else { return ops.iter().map(|_| None).collect() };
        let numbers: Vec<[u8; 4]> = numbers.iter().map(|n| n.to_le_bytes()).collect();
        let requests: Vec<_> =
            ops.iter().zip(&numbers).map(|(op, n)| self.forwarded(&t, op, n, 0)).collect();
        let Ok(pending) = t.peer.send_many(&requests).await else {
            return ops.iter().map(|_| None).collect();
        };
        let deadline = tokio::time::Instant::now() + T.forward_timeout;
        let mut out = Vec::with_capacity(ops.len());
        // As `forward`: given up once the volume has another owner.
        let moved = self.owner_moved(t.epoch);
        tokio::pin!(moved);
        for ((h, _), p) in requests.iter().zip(pending) {
            let reply = tokio::select! {
                reply = tokio::time::timeout_at(deadline, p.wait()) => reply,
                () = &mut moved => break,
            };
            out.push(match self.outcome(h, reply) {
                Ok(data) => Some(Ok(data)),
                Err(Forwarded::Failed(e)) => Some(Err(e)),
                Err(Forwarded::Retry(_)) => None,
            });
        }
        if out.iter().any(|r| matches!(r, Some(Ok(_)))) {
            self.unflushed.locked("the unflushed writes").acked(t.epoch);
        }
        // Those left unanswered when the owner moved: retried.
        out.resize_with(ops.len(), || None);
        out
    }

    /// Runs a request: through this node's view while it owns the volume and serves,
    /// else forwarded to the owner; retried while no owner can take it (for up to
    /// `T.forward_patience`). Large requests go in pieces a frame can carry.
    pub async fn run(&self, op: IoOp) -> Result<Bytes, StoreError> {
        *self.last_local.locked("the time of the last local client") = Some(Instant::now());
        let pieces = split(op);
        if pieces.len() == 1 {
            return self.run_one(pieces.into_iter().next().expect("one piece")).await;
        }
        let mut read = BytesMut::new();
        for piece in pieces {
            read.extend_from_slice(&self.run_one(piece).await?);
        }
        Ok(read.freeze())
    }

    pub(super) async fn run_one(&self, op: IoOp) -> Result<Bytes, StoreError> {
        if let IoOp::Read { offset, length } = op {
            let owner_here = self.view().is_some_and(|v| v.serving());
            if !owner_here {
                if let Some(data) = self.read_here(offset, length).await {
                    return Ok(data);
                }
            }
        }
        self.run_numbered(op, self.number()).await
    }

    /// `op` succeeded at the owner of `epoch`: a write is one a flush must cover, a flush
    /// (begun as `begun` says) covered those before it (takeover T5, `Unflushed`).
    pub(super) fn done(&self, op: &IoOp, begun: Option<FlushBegun>, epoch: u64) {
        let mut unflushed = self.unflushed.locked("the unflushed writes");
        match (op, begun) {
            (IoOp::Flush, Some(begun)) => unflushed.flushed(begun),
            (IoOp::Write { .. } | IoOp::Trim { .. } | IoOp::Zero { .. }, _) => {
                unflushed.acked(epoch)
            }
            _ => {}
        }
    }

    /// A number for a forwarded write or trim (never 0: a write without one).
    pub(super) fn number(&self) -> u32 {
        self.forwarded.fetch_add(1, Ordering::Relaxed).max(1)
    }

    /// [`Self::run_one`] of a request numbered `number`, which it keeps on every retry.
    pub(super) async fn run_numbered(&self, op: IoOp, number: u32) -> Result<Bytes, StoreError> {
        let deadline = Instant::now() + T.forward_patience;
        // A flush is not acknowledged by an owner that took the volume with a suspect
        // copy as the truth since it began (takeover T5): since the oldest write it covers
        // was acknowledged, or the epoch now (as this member has applied it) if older.
        let begun = match op {
            IoOp::Flush => {
                let now = self.epoch_now();
                Some(self.unflushed.locked("the unflushed writes").flush_begins(now))
            }
            _ => None,
        };
        let since = begun.map_or(0, |b| b.since);
        loop {
            let why = match self.view() {
                Some(v) if v.serving() && since != 0 && !v.flush_survives(since) => {
                    if let Some(b) = begun {
                        self.unflushed.locked("the unflushed writes").refused(b, v.lost_at);
                    }
                    return Err(io_error(
                        "replicated volume",
                        "writes acknowledged before this flush began may have been lost: \
                         every copy holding them lost power",
                    ));
                }
                Some(v) if v.serving() => match v.run(op.clone()).await {
                    Ok(data) => {
                        self.done(&op, begun, v.epoch());
                        return Ok(data);
                    }
                    Err(e) if !v.deposed() => return Err(e),
                    Err(e) => format!("this node was deposed: {e}"),
                },
                _ => match self.target() {
                    Err(why) => why.to_string(),
                    Ok(t) => match self.forward(&t, &op, number, since).await {
                        Ok(data) => {
                            self.done(&op, begun, t.epoch);
                            return Ok(data);
                        }
                        Err(Forwarded::Failed(e)) => {
                            if let Some(b) = begun {
                                let lost_at = self.lost_at_now();
                                self.unflushed.locked("the unflushed writes").refused(b, lost_at);
                            }
                            return Err(e);
                        }
                        Err(Forwarded::Retry(why)) => why,
                    },
                },
            };
            if Instant::now() >= deadline {
                return Err(io_error(
                    "replicated volume",
                    format!("no owner of {} served the request in time: {why}", self.name),
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes that came together from one client (`BlockVolume::submit_writes`): fanned
    /// out in batches by this node's view while it owns the volume and serves, else
    /// forwarded to the owner in one send; those the view failed because it was deposed
    /// meanwhile, or whose forwarding is to be retried, then each as `run` does (a
    /// forwarded write keeps its number).
    pub async fn run_writes(self: Arc<Self>, ops: Vec<IoOp>) -> Vec<Result<Bytes, StoreError>> {
        let fits = ops.iter().all(|op| wire(op).2 <= PAYLOAD_BYTES_MAX as u64);
        let numbers: Vec<u32> = ops.iter().map(|_| self.number()).collect();
        *self.last_local.locked("the time of the last local client") = Some(Instant::now());
        let view = self.view().filter(|v| v.serving());
        let mut out: Vec<Option<Result<Bytes, StoreError>>> = match view {
            Some(v) if fits => {
                self.count_batch(ops.len());
                let done = v.run_writes(ops.clone()).await;
                if done.iter().any(|r| r.is_ok()) {
                    self.unflushed.locked("the unflushed writes").acked(v.epoch());
                }
                let deposed = v.deposed();
                done.into_iter()
                    .map(|r| match r {
                        Err(_) if deposed => None,
                        r => Some(r.map(|()| Bytes::new())),
                    })
                    .collect()
            }
            None if fits => self.forward_writes(&ops, &numbers).await,
            _ => ops.iter().map(|_| None).collect(),
        };
        let again: Vec<_> = ops
            .into_iter()
            .zip(&out)
            .enumerate()
            .filter(|(_, (_, r))| r.is_none())
            .map(|(j, (op, _))| {
                let (me, number) = (self.clone(), numbers[j]);
                let one = wire(&op).2 <= PAYLOAD_BYTES_MAX as u64;
                (
                    j,
                    tokio::spawn(async move {
                        match one {
                            true => me.run_numbered(op, number).await,
                            false => me.run(op).await,
                        }
                    }),
                )
            })
            .collect();
        for (j, task) in again {
            out[j] = Some(task.await.unwrap_or_else(|e| Err(io_error("replicated volume", e))));
        }
        out.into_iter().map(|r| r.expect("every write ran")).collect()
    }

    /// Runs `op` from a thread outside the runtime (a blocking call).
    pub(super) fn run_blocking(&self, op: IoOp) -> Result<Bytes, StoreError> {
        self.runtime.block_on(self.run(op))
    }
}

/// How a request travels between nodes: its frame's kind, offset and length in bytes. A
/// zeroing travels as a trim (a trimmed range reads as zeroes on every copy).
pub(super) fn wire(op: &IoOp) -> (Kind, u64, u64) {
    match op {
        IoOp::Read { offset, length } => (Kind::Read, *offset, *length as u64),
        IoOp::Write { offset, data, .. } => (Kind::Write, *offset, data.len() as u64),
        IoOp::Trim { offset, length } | IoOp::Zero { offset, length, .. } => {
            (Kind::Trim, *offset, *length)
        }
        IoOp::Flush => (Kind::Flush, 0, 0),
    }
}

/// A request in pieces a frame can carry: reads and writes of at most `PAYLOAD_BYTES_MAX`
/// bytes, trims and zeroings of at most 1 GiB.
pub(super) fn split(op: IoOp) -> Vec<IoOp> {
    const DISCARD_MAX: u64 = 1 << 30;
    let step = PAYLOAD_BYTES_MAX;
    match op {
        IoOp::Read { offset, length } if length > step => (0..length)
            .step_by(step)
            .map(|at| IoOp::Read { offset: offset + at as u64, length: (length - at).min(step) })
            .collect(),
        IoOp::Write { offset, data, fua } if data.len() > step => (0..data.len())
            .step_by(step)
            .map(|at| IoOp::Write {
                offset: offset + at as u64,
                data: data.slice(at..(at + step).min(data.len())),
                fua,
            })
            .collect(),
        IoOp::Trim { offset, length } if length > DISCARD_MAX => (offset..offset + length)
            .step_by(DISCARD_MAX as usize)
            .map(|at| IoOp::Trim { offset: at, length: (offset + length - at).min(DISCARD_MAX) })
            .collect(),
        IoOp::Zero { offset, length, mode } if length > DISCARD_MAX => (offset..offset + length)
            .step_by(DISCARD_MAX as usize)
            .map(|at| IoOp::Zero {
                offset: at,
                length: (offset + length - at).min(DISCARD_MAX),
                mode,
            })
            .collect(),
        op => vec![op],
    }
}

/// A node's export of a replicated volume as the router it is (the node knows it only as
/// a [`Routed`] volume; only [`export_router`] exports one, always a [`Router`]).
fn as_router(routed: Arc<dyn Routed>) -> Option<Arc<Router>> {
    let any: Arc<dyn std::any::Any + Send + Sync> = routed;
    any.downcast::<Router>().ok()
}

/// The router of replicated volume `name` on `node`, made by `make` and exported (over NBD,
/// counted) if the node exports none yet.
pub fn export_router(node: &Node, name: &str, make: impl FnOnce() -> Arc<Router>) -> Arc<Router> {
    let routed = node.export_replicated(name, || make());
    as_router(routed)
        .expect("a node's replicated exports are routers: only this function makes one")
}

/// `node`'s router of replicated volume `name`, if it exports it.
pub fn router_of(node: &Node, name: &str) -> Option<Arc<Router>> {
    node.replicated_export(name).and_then(as_router)
}

/// Stops `node` exporting replicated volume `name` (its clients there are disconnected);
/// returns its router, if there was one.
pub fn unexport_router(node: &Node, name: &str) -> Option<Arc<Router>> {
    node.unexport_replicated(name).and_then(as_router)
}

/// The owner views of the replicated volumes `node` owns.
pub fn owned(node: &Node) -> Vec<Arc<ReplicatedVolume>> {
    node.replicated_exports().into_iter().filter_map(as_router).filter_map(|r| r.view()).collect()
}

/// The owner view of the replicated volume whose component on `node` is `id`, if `node`
/// owns that volume.
pub fn owned_by_component(node: &Node, id: u64) -> Option<Arc<ReplicatedVolume>> {
    owned(node).into_iter().find(|v| v.local_id() == id)
}

/// The owner's live view of replicated volume `name`'s copies, if `node` owns it.
pub fn live_copies(node: &Node, name: &str) -> Option<Vec<ComponentRecord>> {
    router_of(node, name)?.view().map(|v| v.live())
}

impl BlockVolume for Router {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    fn allocated_bytes(&self) -> Result<u64, StoreError> {
        self.view().map_or(Ok(0), |v| v.allocated_bytes())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StoreError> {
        let data = self.run_blocking(IoOp::Read { offset, length: buf.len() })?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> Result<(), StoreError> {
        let data = Bytes::copy_from_slice(data);
        self.run_blocking(IoOp::Write { offset, data, fua: false }).map(drop)
    }

    fn trim(&self, offset: u64, length: u64) -> Result<(), StoreError> {
        self.run_blocking(IoOp::Trim { offset, length }).map(drop)
    }

    fn write_zeroes(&self, offset: u64, length: u64, mode: ZeroMode) -> Result<(), StoreError> {
        self.run_blocking(IoOp::Zero { offset, length, mode }).map(drop)
    }

    fn extents(&self, offset: u64, length: u64, max: usize) -> Result<Vec<Extent>, StoreError> {
        match self.view() {
            Some(v) if v.serving() => v.extents(offset, length, max),
            // Not known here: all of it is data.
            _ => Ok(vec![Extent { length, hole: false, zero: false }]),
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.run_blocking(IoOp::Flush).map(drop)
    }

    fn resize(&self, _size_bytes: u64) -> Result<(), StoreError> {
        Err(io_error("resize", "resizing a replicated volume is not supported yet"))
    }

    fn asynchronous(&self) -> bool {
        true
    }

    fn submit_writes(self: Arc<Self>, writes: Vec<IoOp>) -> strata_io::WritesFuture {
        Box::pin(self.run_writes(writes))
    }

    fn submit(self: Arc<Self>, op: IoOp) -> strata_io::IoFuture {
        Box::pin(async move { self.run(op).await })
    }
}
