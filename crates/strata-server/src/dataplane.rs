//! The node's data plane: component I/O for replicated volumes' owners, on the RPC port
//! (connections that start with `SDP1`), in `strata-replica`'s frames.
//!
//! Invariants:
//! 1. Every request on a component passes its epoch fence first (`strata_replica::fence`);
//!    a request that raises the fence applies only after the raised fences are durable
//!    (file `DIR/fences`, replaced atomically), so a crash never lowers a fence below an
//!    epoch whose write was applied.
//! 2. A write's reply means the data is in the store (survives kill -9 of this process);
//!    with FUA, or a Flush's reply, it is on stable storage.
//! 3. Requests run concurrently and replies go back by id; a frame that fails its checks
//!    closes the connection.

use crate::node::Node;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use strata_io::StoreError;
use strata_replica::fence::{Admit, Fences};
use strata_replica::frame::{encode, read_frame, DataKey, Header, Kind, Status, FLAG_FUA};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// The largest read served in one request.
const READ_BYTES_MAX: u32 = 8 << 20;

/// The data plane of one node.
pub struct DataService {
    node: Arc<Node>,
    key: DataKey,
    fences: Mutex<Fences>,
    fences_path: PathBuf,
    /// The highest LSN applied per component since start (for probes).
    lsns: Mutex<HashMap<u64, u64>>,
}

impl DataService {
    /// The data plane of `node` (data directory `dir`), authenticated with `secret`.
    pub fn open(node: Arc<Node>, dir: &std::path::Path, secret: &[u8]) -> anyhow::Result<Self> {
        let fences_path = dir.join("fences");
        let fences = match std::fs::read_to_string(&fences_path) {
            Ok(text) => Fences::decode(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{} is damaged ({e}); it must not be guessed",
                    fences_path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Fences::default(),
            Err(e) => anyhow::bail!("read {}: {e}", fences_path.display()),
        };
        Ok(DataService {
            node,
            key: DataKey::from_secret(secret),
            fences: Mutex::new(fences),
            fences_path,
            lsns: Mutex::default(),
        })
    }

    /// Admits a request at `epoch` on `component` (invariant 1); `Err` is the reply.
    fn admit(&self, component: u64, epoch: u64) -> Result<(), (Status, u64)> {
        let mut fences = self.fences.lock().unwrap_or_else(|e| e.into_inner());
        let before = fences.clone();
        match fences.admit(component, epoch) {
            Ok(Admit::Current) => Ok(()),
            Ok(Admit::Raised) => {
                let dir = self.fences_path.parent().expect("in the data directory");
                let text = fences.encode();
                if strata_store::store::write_atomically(dir, "fences", text.as_bytes()).is_err() {
                    *fences = before;
                    return Err((Status::Io, 0));
                }
                Ok(())
            }
            Err(stale) => Err((Status::StaleEpoch, stale.newest)),
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
        let Some(component) = self.node.component(h.component) else {
            return (Status::NotFound, reply, Vec::new());
        };
        if let Err((status, newest)) = self.admit(h.component, h.epoch) {
            reply.epoch = newest;
            return (status, reply, Vec::new());
        }
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
            Kind::Read if h.count > READ_BYTES_MAX => return (Status::Invalid, reply, Vec::new()),
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
                let node = self.node.clone();
                let id = h.component;
                match tokio::task::spawn_blocking(move || node.component_remove(id)).await {
                    Ok(Ok(())) => {
                        // Its fence goes with it (ids are never reused).
                        let mut fences = self.fences.lock().unwrap_or_else(|e| e.into_inner());
                        fences.remove(id);
                        let dir = self.fences_path.parent().expect("in the data directory");
                        let text = fences.encode();
                        let _ =
                            strata_store::store::write_atomically(dir, "fences", text.as_bytes());
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
        let (mut reader, mut writer) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if writer.write_all(&frame).await.is_err() {
                    return;
                }
            }
        });
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

/// Hands data-plane connections of the RPC port to the service.
pub struct Plane(pub Arc<DataService>);

impl strata_meta::rpc::DataPlane for Plane {
    fn handle(&self, stream: TcpStream, peer: std::net::SocketAddr) {
        tokio::spawn(self.0.clone().serve(stream, peer));
    }
}
