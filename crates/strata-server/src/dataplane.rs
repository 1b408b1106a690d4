//! The node's data plane: component I/O for replicated volumes' owners, on the RPC port
//! (connections that start with `SDP1`), in `strata-replica`'s frames.
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
//!    not own it (any more): the sender finds the owner again and retries.

use crate::fencing::Refused;
use crate::node::Node;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use strata_io::{BlockVolume, StoreError};
use strata_replica::frame::{
    encode, read_frame, DataKey, Header, Kind, Status, DIGEST_UNIT, FLAG_FUA, FLAG_VOLUME,
};
use tokio::net::TcpStream;

/// The largest read served in one request.
const READ_BYTES_MAX: u32 = 8 << 20;

/// The data plane of one node.
pub struct DataService {
    node: Arc<Node>,
    key: DataKey,
    /// The highest LSN applied per component since start (for probes).
    lsns: Mutex<HashMap<u64, u64>>,
}

impl DataService {
    /// The data plane of `node`, authenticated with `secret`.
    pub fn new(node: Arc<Node>, secret: &[u8]) -> Self {
        DataService { node, key: DataKey::from_secret(secret), lsns: Mutex::default() }
    }

    /// A VOLUME request (invariant 4).
    async fn for_volume(&self, h: &Header, payload: Vec<u8>) -> (Status, Header, Vec<u8>) {
        let reply = *h;
        let Some(view) = self.node.owned_by_component(h.component).filter(|v| v.serving()) else {
            return (Status::NotOwner, reply, Vec::new());
        };
        view.note_forwarded(h.lsn);
        let (kind, offset, count, fua) = (h.kind, h.offset, h.count, h.flags & FLAG_FUA != 0);
        let v = view.clone();
        let done = tokio::task::spawn_blocking(move || match kind {
            Kind::Write => {
                v.write_at(&payload, offset)?;
                if fua {
                    v.sync()?;
                }
                Ok(Vec::new())
            }
            Kind::Read => {
                let mut buf = vec![0u8; count as usize];
                v.read_at(&mut buf, offset).map(|()| buf)
            }
            Kind::Trim => v.trim(offset, u64::from(count)).map(|()| Vec::new()),
            _ => v.sync().map(|()| Vec::new()),
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::io("forwarded")(std::io::Error::other(e))));
        match done {
            Ok(data) => (Status::Ok, reply, data),
            // Deposed meanwhile: the sender retries at the new owner.
            Err(_) if view.deposed() => (Status::NotOwner, reply, Vec::new()),
            Err(StoreError::OutOfRange { .. }) => (Status::OutOfRange, reply, Vec::new()),
            Err(e) => {
                tracing::warn!(offset = h.offset, "forwarded request failed: {e}");
                (Status::Io, reply, Vec::new())
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
                _ => (Status::Io, reply, Vec::new()),
            };
        }
        if h.flags & FLAG_VOLUME != 0 {
            if !matches!(h.kind, Kind::Write | Kind::Read | Kind::Flush | Kind::Trim)
                || h.count > READ_BYTES_MAX
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
                let lsns = self.lsns.lock().unwrap_or_else(|e| e.into_inner());
                reply.lsn = lsns.get(&h.component).copied().unwrap_or(0);
                reply.count = 0;
                Ok(Vec::new())
            }
            Kind::Write => {
                let wrote = tokio::task::spawn_blocking(move || {
                    volume.write_at(&payload, offset).map(|()| Vec::new())
                })
                .await
                .unwrap_or_else(|e| Err(StoreError::io("write")(std::io::Error::other(e))));
                match wrote {
                    Ok(v) if h.flags & FLAG_FUA != 0 => component
                        .group_sync
                        .sync()
                        .await
                        .map(|()| v)
                        .map_err(|e| StoreError::io("sync")(std::io::Error::other(e.message))),
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
                let count = h.count as usize;
                tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; count];
                    volume.read_at(&mut buf, offset).map(|()| buf)
                })
                .await
                .unwrap_or_else(|e| Err(StoreError::io("read")(std::io::Error::other(e))))
            }
            Kind::Flush => component
                .group_sync
                .sync()
                .await
                .map(|()| Vec::new())
                .map_err(|e| StoreError::io("sync")(std::io::Error::other(e.message))),
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
            Kind::Create => unreachable!("handled above"),
        };
        match result {
            Ok(data) => {
                if matches!(h.kind, Kind::Write | Kind::Trim) {
                    let mut lsns = self.lsns.lock().unwrap_or_else(|e| e.into_inner());
                    let top = lsns.entry(h.component).or_insert(0);
                    *top = (*top).max(h.lsn);
                }
                (Status::Ok, reply, data)
            }
            Err(StoreError::OutOfRange { .. }) => (Status::OutOfRange, reply, Vec::new()),
            Err(e) => {
                tracing::warn!(component = h.component, offset = h.offset, "data plane: {e}");
                (Status::Io, reply, Vec::new())
            }
        }
    }

    async fn serve(self: Arc<Self>, stream: TcpStream, peer: std::net::SocketAddr) {
        let (mut reader, writer) = stream.into_split();
        let tx = strata_io::net::frame_writer(writer, || ());
        loop {
            let (h, payload) = match read_frame(&mut reader, &self.key).await {
                Ok(f) => f,
                Err(strata_replica::frame::FrameError::Io(_)) => return,
                Err(e) => {
                    tracing::warn!(%peer, "closing a data-plane connection: {e}");
                    return;
                }
            };
            if h.reply {
                tracing::warn!(%peer, "closing a data-plane connection: a reply as a request");
                return;
            }
            let this = self.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let (status, mut reply, data) = this.execute(&h, payload).await;
                reply.reply = true;
                reply.status = status;
                let _ = tx.send(encode(&this.key, &reply, &data));
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
    fn handle(&self, stream: TcpStream, peer: std::net::SocketAddr) {
        tokio::spawn(self.0.clone().serve(stream, peer));
    }
}
