//! A connection to one node's data plane carrying many requests at once: each request
//! gets an id, replies are matched by id (they may come in any order), whole frames are
//! written by one writer task, so a caller that gives up never leaves half a frame.

use crate::frame::{encode, read_frame, DataKey, FrameError, Header, Kind, Status};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// Nothing was sent: the node could not be reached.
    #[error("cannot reach {0}")]
    NotSent(String),
    /// The connection broke after the request may have left.
    #[error("no answer from {0}")]
    Lost(String),
    /// The node answered with a failure status.
    #[error("{addr} answered {status:?}")]
    Status {
        /// The node.
        addr: String,
        /// What it said.
        status: Status,
        /// The reply's epoch (for `StaleEpoch`: the component's newest).
        epoch: u64,
    },
}

type Waiters = Mutex<Option<HashMap<u64, oneshot::Sender<(Header, Vec<u8>)>>>>;

struct Conn {
    frames: mpsc::UnboundedSender<Vec<u8>>,
    waiting: Waiters,
    reader: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Conn {
    fn alive(&self) -> bool {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn kill(&self) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// A node's data plane.
pub struct DataPeer {
    key: DataKey,
    addr: String,
    next: AtomicU64,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
}

impl Drop for DataPeer {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.get_mut().take() {
            conn.kill();
            if let Some(r) = conn.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
                r.abort();
            }
        }
    }
}

impl DataPeer {
    /// The data plane at `addr` (the node's RPC address).
    pub fn new(key: DataKey, addr: impl Into<String>) -> DataPeer {
        DataPeer {
            key,
            addr: addr.into(),
            next: AtomicU64::new(1),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    async fn connection(&self) -> Result<Arc<Conn>, CallError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.alive()) {
            return Ok(c.clone());
        }
        let stream = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            strata_io::net::connect(&self.addr),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(CallError::NotSent(format!("{}: {e}", self.addr))),
            Err(_) => return Err(CallError::NotSent(format!("{}: connect timed out", self.addr))),
        };
        let _ = stream.set_nodelay(true);
        let (mut reader, mut writer) = stream.into_split();
        let (frames, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let conn = Arc::new(Conn {
            frames,
            waiting: Mutex::new(Some(HashMap::new())),
            reader: Mutex::new(None),
        });
        let w = conn.clone();
        tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if writer.write_all(&frame).await.is_err() {
                    return w.kill();
                }
            }
        });
        let r = conn.clone();
        let key = self.key.clone();
        let task = tokio::spawn(async move {
            loop {
                let got: Result<_, FrameError> = read_frame(&mut reader, &key).await;
                let Ok((h, payload)) = got else { return r.kill() };
                let mut waiting = r.waiting.lock().unwrap_or_else(|e| e.into_inner());
                let Some(map) = waiting.as_mut() else { return };
                if let Some(w) = map.remove(&h.id) {
                    let _ = w.send((h, payload));
                }
            }
        });
        *conn.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends a request (its `id` is set here) and waits for the reply; a reply with a
    /// failure status is an error.
    pub async fn call(
        &self,
        mut h: Header,
        payload: &[u8],
    ) -> Result<(Header, Vec<u8>), CallError> {
        let conn = self.connection().await?;
        h.id = self.next.fetch_add(1, Ordering::Relaxed);
        h.reply = false;
        let (tx, rx) = oneshot::channel();
        match conn.waiting.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(map) => map.insert(h.id, tx),
            None => return Err(CallError::NotSent(self.addr.clone())),
        };
        struct Forget<'a>(&'a Conn, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                if let Some(m) = self.0.waiting.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    m.remove(&self.1);
                }
            }
        }
        let _forget = Forget(&conn, h.id);
        if conn.frames.send(encode(&self.key, &h, payload)).is_err() {
            return Err(CallError::NotSent(self.addr.clone()));
        }
        let (reply, data) = rx.await.map_err(|_| CallError::Lost(self.addr.clone()))?;
        if reply.status != Status::Ok {
            return Err(CallError::Status {
                addr: self.addr.clone(),
                status: reply.status,
                epoch: reply.epoch,
            });
        }
        Ok((reply, data))
    }
}

/// A request header with the given fields (the rest zero).
pub fn request(kind: Kind, component: u64, epoch: u64, lsn: u64, offset: u64) -> Header {
    Header {
        kind,
        reply: false,
        status: Status::Ok,
        flags: 0,
        id: 0,
        component,
        epoch,
        lsn,
        offset,
        count: 0,
    }
}
