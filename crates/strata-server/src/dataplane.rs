//! The node's data plane: component I/O for replicated volumes' owners, on the RPC port
//! (authenticated, encrypted connections — `strata_io::net::channel` — whose first bytes
//! inside the channel are `SDP1`), in `strata-frame`'s frames.
//!
//! Invariants:
//! 1. Every request on a component passes its epoch fence first and holds its pass while
//!    it applies (`fencing.rs`: durable raises, and no older request applies after a
//!    raise).
//! 2. A write's reply means the data is in the store (survives kill -9 of this process);
//!    with FUA, or a Flush's reply, it is on stable storage.
//! 3. Requests run concurrently and replies go back by id; a frame that fails its checks
//!    closes the connection.
//! 4. A request with the VOLUME flag is served by this node's owner view of the volume
//!    (ordered like a local client's request), or answered `NotOwner` when this node does
//!    not own it (any more): the sender finds the owner again and retries. A retried write
//!    still in progress here is not applied twice: the retry gets the first one's
//!    outcome (applied again later, it could land after a newer write to its blocks).
//!    Forwarded writes that came together go to the view together (its batches), on a
//!    task of their own, and their replies back in one write.
//! 5. Plain writes (no FUA) are done on the connection's own task, in the order they
//!    came, those that came together (still in the read buffer) with one store call per
//!    component: one lock, one data write and one journal write for all of them. Their
//!    replies go back with the others ready then, in one write: no hand-off between tasks
//!    or threads on the common path. Anything else runs on a task of its own, started
//!    only after the writes that came before it are applied. (An owner never has two
//!    overlapping writes in flight except in one batch, whose order is kept.)
//! 6. A Probe with the WHOLE flag takes the power-loss mark off its copy (`Node::suspect`):
//!    its owner holds the copy level, and saw its last answer over this connection. Not
//!    on a connection's first frame: an owner that has not heard from this process yet
//!    cannot vouch for what it holds (the flag may have been set for the process before).

use crate::fencing::Refused;
use crate::node::Node;
use crate::poison::Locked;
use crate::replicated::{owned_by_component, router_of};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use strata_frame::client::DETAIL_CHARS;
use strata_frame::frame::{
    encode, encode_into, read_frame, DataKey, Header, Kind, Status, DIGEST_UNIT, FLAG_FUA,
    FLAG_SUSPECT, FLAG_VOLUME, FLAG_WHOLE,
};
use strata_io::net::channel::{Channel, ChannelWriter};
use strata_io::{BlockVolume, IoOp, StoreError};
use tokio::io::AsyncWriteExt;

/// The largest read served in one request.
const READ_BYTES_MAX: u32 = 8 << 20;
/// Replies done on a connection's own task are sent at the latest when this many bytes
/// of them have gathered.
const REPLY_BATCH_BYTES: usize = 8 << 10;
/// Plain writes gathered on a connection are applied at the latest when this many bytes
/// of them have come (invariant 5).
const WRITE_BATCH_BYTES: usize = 1 << 20;
/// Forwarded writes gathered on a connection go to the owner view at the latest when
/// this many have come.
const FORWARDED_BATCH_MAX: usize = 64;

/// A connection's write half, replies written whole under its lock.
type Replies = Arc<tokio::sync::Mutex<ChannelWriter>>;

/// The data plane of one node.
pub struct DataService {
    node: Arc<Node>,
    key: DataKey,
    /// The highest LSN applied per component since start (for probes).
    lsns: Mutex<HashMap<u64, u64>>,
    /// Forwarded writes in progress, by (owner's component, forwarding node, its number
    /// for the write): a retry of one still in progress waits for its outcome instead of
    /// applying again (invariant 4).
    forwarded: Mutex<HashMap<ForwardKey, tokio::sync::watch::Receiver<Option<Status>>>>,
}

/// (owner's component, forwarding node, its number for the write).
type ForwardKey = (u64, u64, u32);

/// Removes a forwarded write from the map when it ends, however it ends, and tells any
/// retry waiting for it.
struct InProgress<'a> {
    of: &'a DataService,
    key: ForwardKey,
    outcome: tokio::sync::watch::Sender<Option<Status>>,
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.of.forwarded.locked("the forwarded writes seen").remove(&self.key);
        self.outcome.send_if_modified(|o| {
            let unset = o.is_none();
            o.get_or_insert(Status::Io);
            unset
        });
    }
}

impl DataService {
    /// The data plane of `node`, authenticated with `secret`.
    pub fn new(node: Arc<Node>, secret: &[u8]) -> Self {
        DataService {
            node,
            key: DataKey::from_secret(secret),
            lsns: Mutex::default(),
            forwarded: Mutex::default(),
        }
    }

    /// A VOLUME request (invariant 4).
    async fn for_volume(&self, h: &Header, payload: Vec<u8>) -> (Status, Header, Vec<u8>) {
        let reply = *h;
        let Some(view) = owned_by_component(&self.node, h.component).filter(|v| v.serving()) else {
            return (Status::NotOwner, reply, Vec::new());
        };
        view.note_forwarded(h.lsn);
        // A write carries its forwarder's number for it in `count`, a trim as its payload
        // (the same on a retry).
        let number = match h.kind {
            Kind::Write => h.count,
            Kind::Trim => payload.as_slice().try_into().map_or(0, u32::from_le_bytes),
            _ => 0,
        };
        let in_progress = match self.claim(h, number) {
            Ok(claimed) => claimed,
            Err(rx) => return (Self::earlier(rx).await, reply, Vec::new()),
        };
        // A forwarded flush says the epoch it began at (in `offset`): not acknowledged if
        // writes acknowledged before may have been lost since (takeover T5).
        if h.kind == Kind::Flush && !view.flush_survives(h.offset) {
            let why = "writes acknowledged before this flush began may have been lost: every \
                       copy holding them lost power";
            let answer = (Status::Io, reply, detail(&why));
            if let Some(p) = &in_progress {
                p.outcome.send_replace(Some(answer.0));
            }
            return answer;
        }
        let (offset, count) = (h.offset, h.count);
        let op = match h.kind {
            Kind::Write => {
                IoOp::Write { offset, data: Bytes::from(payload), fua: h.flags & FLAG_FUA != 0 }
            }
            Kind::Read => IoOp::Read { offset, length: count as usize },
            Kind::Trim => IoOp::Trim { offset, length: u64::from(count) },
            _ => IoOp::Flush,
        };
        // On this task: the view awaits its copies without a thread of its own.
        let answer = Self::answer(&view, h, view.run(op).await);
        if let Some(p) = &in_progress {
            p.outcome.send_replace(Some(answer.0));
        }
        answer
    }

    /// Forwarded writes of one connection that came together (invariant 4): those for
    /// one volume fanned out as batches by its view, each answered as `for_volume` would.
    async fn for_volume_writes(
        &self,
        batch: Vec<(Header, Vec<u8>)>,
    ) -> Vec<(Status, Header, Vec<u8>)> {
        let component = batch[0].0.component;
        let view = owned_by_component(&self.node, component).filter(|v| v.serving());
        let Some(view) = view.filter(|_| batch.iter().all(|(h, _)| h.component == component))
        else {
            let mut out = Vec::with_capacity(batch.len());
            for (h, payload) in batch {
                out.push(self.for_volume(&h, payload).await);
            }
            return out;
        };
        let mut out: Vec<Option<(Status, Header, Vec<u8>)>> = batch.iter().map(|_| None).collect();
        let (mut fresh, mut ops, mut claims, mut earlier) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (j, (h, payload)) in batch.into_iter().enumerate() {
            view.note_forwarded(h.lsn);
            match self.claim(&h, h.count) {
                Ok(claimed) => {
                    let fua = h.flags & FLAG_FUA != 0;
                    ops.push(IoOp::Write { offset: h.offset, data: Bytes::from(payload), fua });
                    fresh.push((j, h));
                    claims.push(claimed);
                }
                Err(rx) => earlier.push((j, h, rx)),
            }
        }
        if let Some(router) = router_of(&self.node, view.name()).filter(|_| ops.len() > 1) {
            router.count_batch(ops.len());
        }
        let done = view.run_writes(ops).await;
        for (((j, h), result), claimed) in fresh.into_iter().zip(done).zip(claims) {
            let answer = Self::answer(&view, &h, result.map(|()| Bytes::new()));
            if let Some(p) = &claimed {
                p.outcome.send_replace(Some(answer.0));
            }
            out[j] = Some(answer);
        }
        for (j, h, rx) in earlier {
            out[j] = Some((Self::earlier(rx).await, h, Vec::new()));
        }
        out.into_iter().map(|a| a.expect("every write answered")).collect()
    }

    /// Takes a numbered forwarded write or trim in hand (`None` for a request without a
    /// number), or returns the outcome to wait for of the same one still in progress here
    /// (a retry: applying it again could land after a later write to its blocks).
    fn claim(
        &self,
        h: &Header,
        number: u32,
    ) -> Result<Option<InProgress<'_>>, tokio::sync::watch::Receiver<Option<Status>>> {
        if number == 0 {
            return Ok(None);
        }
        let key = (h.component, h.lsn, number);
        let mut map = self.forwarded.locked("the forwarded writes seen");
        if let Some(rx) = map.get(&key) {
            return Err(rx.clone());
        }
        let (outcome, rx) = tokio::sync::watch::channel(None);
        map.insert(key, rx);
        Ok(Some(InProgress { of: self, key, outcome }))
    }

    /// The outcome of the same forwarded request still in progress (see `claim`).
    async fn earlier(mut rx: tokio::sync::watch::Receiver<Option<Status>>) -> Status {
        rx.wait_for(Option::is_some).await.map_or(Status::Io, |s| s.unwrap_or(Status::Io))
    }

    /// The reply to forwarded request `h` that `view` ran with `done`.
    fn answer(
        view: &crate::replicated::ReplicatedVolume,
        h: &Header,
        done: Result<Bytes, StoreError>,
    ) -> (Status, Header, Vec<u8>) {
        match done {
            Ok(data) => (Status::Ok, *h, data.into()),
            // Deposed meanwhile: the sender retries at the new owner.
            Err(_) if view.deposed() => (Status::NotOwner, *h, Vec::new()),
            Err(StoreError::OutOfRange { .. }) => (Status::OutOfRange, *h, Vec::new()),
            Err(StoreError::NoSpace) => (Status::NoSpace, *h, Vec::new()),
            Err(e) => {
                // Logged once, where the client is answered (the forwarding node's NBD
                // server), with this text.
                tracing::debug!(offset = h.offset, "forwarded request failed: {e}");
                (Status::Io, *h, detail(&e))
            }
        }
    }

    async fn execute(&self, h: &Header, payload: Vec<u8>) -> (Status, Header, Vec<u8>) {
        let mut reply = *h;
        if h.kind == Kind::Create {
            let Ok(volume) = String::from_utf8(payload) else {
                return (Status::Invalid, reply, Vec::new());
            };
            let node = self.node.clone();
            let size = h.offset;
            let made =
                tokio::task::spawn_blocking(move || node.component_create(&volume, size)).await;
            return match made {
                Ok(Ok(id)) => {
                    reply.component = id;
                    (Status::Ok, reply, Vec::new())
                }
                Ok(Err(e)) if e.code == strata_types::ErrorCode::InvalidArgument => {
                    (Status::Invalid, reply, Vec::new())
                }
                Ok(Err(e)) if e.code == strata_types::ErrorCode::NoSpace => {
                    (Status::NoSpace, reply, Vec::new())
                }
                Ok(Err(e)) => (Status::Io, reply, detail(&e.message)),
                Err(e) => (Status::Io, reply, detail(&e)),
            };
        }
        if h.kind == Kind::Release {
            // Any view of this node's at that epoch, serving or not: asked again, one
            // that let go already answers as the first time.
            let view = owned_by_component(&self.node, h.component).filter(|v| v.epoch() == h.epoch);
            let Some(view) = view else {
                return (Status::NotOwner, reply, Vec::new());
            };
            return match view.release().await {
                Ok(()) => (Status::Ok, reply, Vec::new()),
                Err(e) => {
                    tracing::warn!(component = h.component, "cannot hand over cleanly: {e}");
                    (
                        Status::Io,
                        reply,
                        e.to_string().chars().take(DETAIL_CHARS).collect::<String>().into_bytes(),
                    )
                }
            };
        }
        if h.kind == Kind::Lease {
            // Only the serving owner at that epoch grants one.
            let view = owned_by_component(&self.node, h.component);
            let view = view.filter(|v| v.epoch() == h.epoch && v.serving());
            let Some(view) = view else {
                return (Status::NotOwner, reply, Vec::new());
            };
            return match view.grant_lease(h.lsn).await {
                Some(id) => (Status::Ok, Header { component: id, ..reply }, Vec::new()),
                None => (Status::NotFound, reply, Vec::new()),
            };
        }
        if h.kind == Kind::ResyncSlot {
            // A slot for a resync job writing to a copy here (`resync.rs` invariant 3):
            // node `lsn`'s job `offset`; `count` 1 takes or renews it, 0 gives it back.
            let scheduler = self.node.resync_scheduler();
            let status = match h.count {
                0 => {
                    scheduler.release_slot(h.lsn, h.offset);
                    Status::Ok
                }
                1 if scheduler.acquire_slot(h.lsn, h.offset) => Status::Ok,
                1 => Status::Busy,
                _ => Status::Invalid,
            };
            return (status, reply, Vec::new());
        }
        if h.flags & FLAG_VOLUME != 0 {
            if !matches!(h.kind, Kind::Write | Kind::Read | Kind::Flush | Kind::Trim)
                || (h.kind == Kind::Read && h.count > READ_BYTES_MAX)
            {
                return (Status::Invalid, reply, Vec::new());
            }
            return self.for_volume(h, payload).await;
        }
        let Some(component) = self.node.component(h.component) else {
            return (Status::NotFound, reply, Vec::new());
        };
        let _pass = match self.node.fencing().enter(h.component, h.epoch).await {
            Ok(pass) => pass,
            Err(Refused::Stale(newest)) => {
                reply.epoch = newest;
                return (Status::StaleEpoch, reply, Vec::new());
            }
            Err(Refused::Io) => return (Status::Io, reply, Vec::new()),
        };
        let volume = component.volume.clone();
        let offset = h.offset;
        let result: Result<Vec<u8>, StoreError> = match h.kind {
            Kind::Probe => {
                // Vouched for by its owner (invariant 6): a power-loss mark comes off.
                if h.flags & FLAG_WHOLE != 0 && self.node.clear_suspect(h.component) {
                    tracing::info!(
                        component = h.component,
                        epoch = h.epoch,
                        "the owner levelled this node's copy: no longer suspect after the \
                         power loss"
                    );
                }
                // Still suspect: said in the reply, for a new owner's fence.
                reply.flags &= !FLAG_SUSPECT;
                if self.node.suspect(h.component) {
                    reply.flags |= FLAG_SUSPECT;
                }
                let lsns = self.lsns.locked("the LSNs applied");
                reply.lsn = lsns.get(&h.component).copied().unwrap_or(0);
                reply.count = 0;
                Ok(Vec::new())
            }
            Kind::Write => {
                // Straight to the page cache when it can (no thread hop), else blocking.
                let wrote = match volume.try_write_at_nowait(&payload, offset) {
                    Ok(true) => Ok(Vec::new()),
                    Ok(false) => tokio::task::spawn_blocking(move || {
                        volume.write_at(&payload, offset).map(|()| Vec::new())
                    })
                    .await
                    .unwrap_or_else(|e| Err(StoreError::io("write")(std::io::Error::other(e)))),
                    Err(e) => Err(e),
                };
                match wrote {
                    Ok(v) if h.flags & FLAG_FUA != 0 => component.sync().await.map(|()| v),
                    other => other,
                }
            }
            Kind::Read | Kind::Digest if h.count > READ_BYTES_MAX => {
                return (Status::Invalid, reply, Vec::new())
            }
            Kind::Digest => {
                let count = h.count as usize;
                tokio::task::spawn_blocking(move || digests(&*volume, offset, count))
                    .await
                    .unwrap_or_else(|e| Err(StoreError::io("digest")(std::io::Error::other(e))))
            }
            Kind::Read => {
                let mut buf = vec![0u8; h.count as usize];
                match volume.try_read_at_nowait(&mut buf, offset) {
                    Ok(true) => Ok(buf),
                    Ok(false) | Err(StoreError::Corrupt { .. }) => {
                        tokio::task::spawn_blocking(move || {
                            volume.read_at(&mut buf, offset).map(|()| buf)
                        })
                        .await
                        .unwrap_or_else(|e| Err(StoreError::io("read")(std::io::Error::other(e))))
                    }
                    Err(e) => Err(e),
                }
            }
            Kind::Flush => component.sync().await.map(|()| Vec::new()),
            Kind::Trim => {
                let count = u64::from(h.count);
                tokio::task::spawn_blocking(move || volume.trim(offset, count).map(|()| Vec::new()))
                    .await
                    .unwrap_or_else(|e| Err(StoreError::io("trim")(std::io::Error::other(e))))
            }
            Kind::Remove => {
                drop(volume);
                drop(component);
                drop(_pass);
                let node = self.node.clone();
                let id = h.component;
                match tokio::task::spawn_blocking(move || node.component_remove(id)).await {
                    Ok(Ok(())) => {
                        // Its fence goes with it (ids are never reused).
                        self.node.fencing().forget(id);
                        Ok(Vec::new())
                    }
                    _ => return (Status::Io, reply, Vec::new()),
                }
            }
            Kind::Resize => {
                let size = h.offset;
                if size < volume.size_bytes() {
                    return (Status::Invalid, reply, Vec::new());
                }
                tokio::task::spawn_blocking(move || {
                    volume.resize(size)?;
                    volume.sync().map(|()| Vec::new())
                })
                .await
                .unwrap_or_else(|e| Err(StoreError::io("resize")(std::io::Error::other(e))))
            }
            Kind::Snapshot | Kind::RemoveSnapshot => {
                // The volume's snapshot `offset` (its key): what the component holds,
                // synced first (`strata_replica::snapshot`; the owner sends it behind a
                // barrier, or to a STALE copy it levelled from its own snapshot).
                let take = h.kind == Kind::Snapshot;
                let synced = match take {
                    true => component.sync().await,
                    false => Ok(()),
                };
                let (node, id, key) = (self.node.clone(), h.component, h.offset);
                let done = match synced {
                    Ok(()) => tokio::task::spawn_blocking(move || match take {
                        true => node.component_snapshot(id, key),
                        false => node.component_snapshot_remove(id, key),
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.message)),
                    Err(e) => Err(e.to_string()),
                };
                done.map(|()| Vec::new())
                    .map_err(|e| StoreError::io("snapshot")(std::io::Error::other(e)))
            }
            Kind::Create | Kind::Release | Kind::Lease | Kind::ResyncSlot => {
                unreachable!("handled above")
            }
        };
        match result {
            Ok(data) => {
                if matches!(h.kind, Kind::Write | Kind::Trim) {
                    self.applied(h);
                }
                (Status::Ok, reply, data)
            }
            Err(StoreError::OutOfRange { .. }) => (Status::OutOfRange, reply, Vec::new()),
            // The store said so once (it is full); the owner decides what the client sees.
            Err(StoreError::NoSpace) => (Status::NoSpace, reply, Vec::new()),
            Err(e) => {
                tracing::warn!(component = h.component, offset = h.offset, "data plane: {e}");
                (Status::Io, reply, detail(&e))
            }
        }
    }

    fn applied(&self, h: &Header) {
        let mut lsns = self.lsns.locked("the LSNs applied");
        let top = lsns.entry(h.component).or_insert(0);
        *top = (*top).max(h.lsn);
    }

    /// Plain component writes that came together, applied in order (invariant 5), their
    /// replies added to `done`: each admitted by its component's fence (whose passes are
    /// held until all are written), then one store call per component, on the blocking
    /// pool when the page cache cannot take them at once (awaited here: nothing on this
    /// connection overtakes them).
    async fn write_batch(&self, batch: Vec<(Header, Bytes)>, done: &mut Vec<u8>) {
        let mut status = vec![Status::Ok; batch.len()];
        // Why a write failed, for its sender (a store error's text).
        let mut why: Vec<Vec<u8>> = vec![Vec::new(); batch.len()];
        let mut replies: Vec<Header> = batch.iter().map(|(h, _)| *h).collect();
        let mut passes = Vec::with_capacity(batch.len());
        for (j, (h, _)) in batch.iter().enumerate() {
            if self.node.component(h.component).is_none() {
                status[j] = Status::NotFound;
                continue;
            }
            match self.node.fencing().enter(h.component, h.epoch).await {
                Ok(pass) => passes.push(pass),
                Err(Refused::Stale(newest)) => {
                    status[j] = Status::StaleEpoch;
                    replies[j].epoch = newest;
                }
                Err(Refused::Io) => status[j] = Status::Io,
            }
        }
        let mut components: Vec<u64> = Vec::new();
        for (j, (h, _)) in batch.iter().enumerate() {
            if status[j] == Status::Ok && !components.contains(&h.component) {
                components.push(h.component);
            }
        }
        for id in components {
            let Some(component) = self.node.component(id) else { continue };
            let ours: Vec<usize> = (0..batch.len())
                .filter(|j| status[*j] == Status::Ok && batch[*j].0.component == id)
                .collect();
            let writes = ours.iter().map(|j| (batch[*j].0.offset, batch[*j].1.clone())).collect();
            let failed = match component.write_together(writes).await {
                Ok(()) => None,
                Err(StoreError::OutOfRange { .. }) => Some((Status::OutOfRange, Vec::new())),
                Err(StoreError::NoSpace) => Some((Status::NoSpace, Vec::new())),
                Err(e) => {
                    tracing::warn!(component = id, writes = ours.len(), "data plane: {e}");
                    Some((Status::Io, detail(&e)))
                }
            };
            for j in ours {
                match &failed {
                    None => self.applied(&batch[j].0),
                    Some((s, text)) => {
                        status[j] = *s;
                        why[j] = text.clone();
                    }
                }
            }
        }
        drop(passes);
        for ((mut reply, status), why) in replies.into_iter().zip(status).zip(why) {
            reply.reply = true;
            reply.status = status;
            encode_into(&self.key, &reply, &why, done);
        }
    }

    /// Runs forwarded writes that came together on a task of their own
    /// (`for_volume_writes`), their replies written together.
    fn spawn_forwarded(self: Arc<Self>, batch: Vec<(Header, Vec<u8>)>, writer: Replies) {
        tokio::spawn(async move {
            let answers = self.for_volume_writes(batch).await;
            let mut frames = Vec::new();
            for (status, mut reply, data) in answers {
                reply.reply = true;
                reply.status = status;
                encode_into(&self.key, &reply, &data, &mut frames);
            }
            let _ = writer.lock().await.write_all(&frames).await;
        });
    }

    async fn serve(self: Arc<Self>, channel: Channel, peer: std::net::SocketAddr) {
        let Channel { reader, writer } = channel;
        let mut reader =
            tokio::io::BufReader::with_capacity(strata_io::net::READ_BUFFER_BYTES, reader);
        // Replies are written whole under this lock: by this task for the requests it
        // did itself (together, once no more input is buffered), by a request's own task
        // for the others.
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        let mut done = Vec::new();
        let (mut batch, mut batched) = (Vec::new(), 0);
        let mut forwarded = Vec::new();
        let mut first = true;
        loop {
            // Applied, and then sent, once no more input is buffered (the requests of one
            // burst applied together and answered in one write), or once enough have
            // gathered (under a steady stream the buffer may never be empty at a frame's
            // end).
            let idle = reader.buffer().is_empty() && !reader.get_ref().has_buffered();
            if !batch.is_empty() && (idle || batched >= WRITE_BATCH_BYTES) {
                self.write_batch(std::mem::take(&mut batch), &mut done).await;
                batched = 0;
            }
            if !forwarded.is_empty() && (idle || forwarded.len() >= FORWARDED_BATCH_MAX) {
                self.clone().spawn_forwarded(std::mem::take(&mut forwarded), writer.clone());
            }
            if !done.is_empty() && (idle || done.len() >= REPLY_BATCH_BYTES) {
                if writer.lock().await.write_all(&done).await.is_err() {
                    return;
                }
                done.clear();
            }
            let (h, payload) = match read_frame(&mut reader, &self.key).await {
                Ok(f) => f,
                Err(strata_frame::frame::FrameError::Io(e)) => {
                    return strata_meta::rpc::closed(peer, &e)
                }
                Err(e) => {
                    tracing::warn!(%peer, "closing a data-plane connection: {e}");
                    return;
                }
            };
            if h.reply {
                tracing::warn!(%peer, "closing a data-plane connection: a reply as a request");
                return;
            }
            // A vouch counts only on a connection this process answered on before
            // (invariant 6).
            let mut h = h;
            if first {
                h.flags &= !FLAG_WHOLE;
                first = false;
            }
            if h.kind == Kind::Write && h.flags & (FLAG_FUA | FLAG_VOLUME) == 0 {
                batched += payload.len();
                batch.push((h, Bytes::from(payload)));
                continue;
            }
            if h.kind == Kind::Write && h.flags & FLAG_VOLUME != 0 && h.count != 0 {
                forwarded.push((h, payload));
                continue;
            }
            if !forwarded.is_empty() {
                self.clone().spawn_forwarded(std::mem::take(&mut forwarded), writer.clone());
            }
            if !batch.is_empty() {
                self.write_batch(std::mem::take(&mut batch), &mut done).await;
                batched = 0;
            }
            let this = self.clone();
            let writer = writer.clone();
            tokio::spawn(async move {
                let (status, mut reply, data) = this.execute(&h, payload).await;
                reply.reply = true;
                reply.status = status;
                let frame = encode(&this.key, &reply, &data);
                let _ = writer.lock().await.write_all(&frame).await;
            });
        }
    }
}

/// BLAKE3 of each `DIGEST_UNIT` piece of `count` bytes of `volume` at `offset`; a piece
/// that fails its checksum gets 32 zero bytes (no piece hashes to that), so the owner
/// finds it different and rewrites it: a scan repairs a damaged copy.
pub fn digests(volume: &dyn BlockVolume, offset: u64, count: usize) -> Result<Vec<u8>, StoreError> {
    let mut out = Vec::with_capacity(count.div_ceil(DIGEST_UNIT as usize) * 32);
    let mut buf = vec![0u8; count.min(DIGEST_UNIT as usize)];
    let mut at = 0;
    while at < count {
        let n = (count - at).min(DIGEST_UNIT as usize);
        match volume.read_at(&mut buf[..n], offset + at as u64) {
            Ok(()) => out.extend_from_slice(blake3::hash(&buf[..n]).as_bytes()),
            Err(StoreError::Corrupt { message }) => {
                tracing::warn!(offset = offset + at as u64, "digest of a damaged piece: {message}");
                out.extend_from_slice(&[0u8; 32]);
            }
            Err(e) => return Err(e),
        }
        at += n;
    }
    Ok(out)
}

/// Hands data-plane connections of the RPC port to the service.
pub struct Plane(pub Arc<DataService>);

impl strata_meta::rpc::DataPlane for Plane {
    fn handle(&self, channel: Channel, peer: std::net::SocketAddr) {
        tokio::spawn(self.0.clone().serve(channel, peer));
    }
}

/// A failure's text as a reply's payload (its sender logs it: `CallError::Status`'s
/// detail), cut to `DETAIL_CHARS`.
fn detail(e: &impl std::fmt::Display) -> Vec<u8> {
    e.to_string().chars().take(DETAIL_CHARS).collect::<String>().into_bytes()
}
