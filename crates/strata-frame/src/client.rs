//! A connection to one node's data plane carrying many requests at once, inside the
//! inter-node channel (opened with its handshake, `strata_io::net::channel`): each request
//! gets an id, replies are matched by id (they may come in any order). The caller writes
//! its frame itself (no hand-off to a writer task: one wake-up less per request), under
//! the connection's write lock; a caller that gives up in the middle of a frame kills
//! the connection, so no half frame is ever followed by another.

use crate::frame::{encode_into, read_frame, DataKey, FrameError, Header, Kind, Status};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use strata_io::net::channel::{Channel, ChannelWriter, HandshakeError, SECRET_HINT};
use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

/// The most of a failure's text kept from a reply.
pub const DETAIL_CHARS: usize = 512;

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
    #[error("{addr} answered {status:?}{}", colon(detail))]
    Status {
        /// The node.
        addr: String,
        /// What it said.
        status: Status,
        /// The reply's epoch (for `StaleEpoch`: the component's newest).
        epoch: u64,
        /// Why, when the node said (a failed VOLUME request's error, as text).
        detail: String,
    },
}

/// `": text"`, or nothing for no text.
fn colon(text: &str) -> String {
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

type Waiters = Mutex<Option<HashMap<u64, oneshot::Sender<(Header, Vec<u8>)>>>>;

struct Conn {
    writer: tokio::sync::Mutex<ChannelWriter>,
    waiting: Waiters,
    reader: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Conn {
    fn alive(&self) -> bool {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Fails every waiting call and stops the reader (which closes the socket).
    fn kill(&self) {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(r) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            r.abort();
        }
    }
}

/// A request sent, its reply awaited by [`Pending::wait`]; dropped, it stops waiting.
pub struct Pending {
    conn: Arc<Conn>,
    id: u64,
    rx: Option<oneshot::Receiver<(Header, Vec<u8>)>>,
    addr: String,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(m) = self.conn.waiting.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            m.remove(&self.id);
        }
    }
}

impl Pending {
    /// Waits for the reply; a reply with a failure status is an error.
    pub async fn wait(mut self) -> Result<(Header, Vec<u8>), CallError> {
        let rx = self.rx.take().expect("waited once");
        let (reply, data) = rx.await.map_err(|_| CallError::Lost(self.addr.clone()))?;
        if reply.status != Status::Ok {
            let detail: String =
                String::from_utf8_lossy(&data).chars().take(DETAIL_CHARS).collect();
            return Err(CallError::Status {
                addr: self.addr.clone(),
                status: reply.status,
                epoch: reply.epoch,
                detail,
            });
        }
        Ok((reply, data))
    }
}

/// A node's data plane.
pub struct DataPeer {
    key: DataKey,
    addr: String,
    next: AtomicU64,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    /// Connections made so far.
    connections: AtomicU64,
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
            connections: AtomicU64::new(0),
        }
    }

    /// How many connections to the node this peer has made: when it grows, the node
    /// may be a new process (and, after a power loss, without what it had not synced).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
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
        let Channel { reader, writer } =
            strata_io::net::channel::initiate(stream, self.key.channel()).await.map_err(|e| {
                CallError::NotSent(match e {
                    HandshakeError::Refused(reason) => {
                        format!("{} refused us: {reason} ({SECRET_HINT})", self.addr)
                    }
                    e => format!("{}: {e}", self.addr),
                })
            })?;
        let mut reader =
            tokio::io::BufReader::with_capacity(strata_io::net::READ_BUFFER_BYTES, reader);
        let conn = Arc::new(Conn {
            writer: tokio::sync::Mutex::new(writer),
            waiting: Mutex::new(Some(HashMap::new())),
            reader: Mutex::new(None),
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
        self.connections.fetch_add(1, Ordering::AcqRel);
        Ok(conn)
    }

    /// Sends a request (its `id` is set here) and waits for the reply; a reply with a
    /// failure status is an error.
    pub async fn call(&self, h: Header, payload: &[u8]) -> Result<(Header, Vec<u8>), CallError> {
        self.send(h, payload).await?.wait().await
    }

    /// Sends a request (its `id` is set here); the reply is the returned one's to await
    /// (so a caller can send to several nodes before waiting for any).
    pub async fn send(&self, h: Header, payload: &[u8]) -> Result<Pending, CallError> {
        let mut sent = self.send_many(&[(h, payload)]).await?;
        Ok(sent.pop().expect("one request sent"))
    }

    /// Sends requests in this order in one write (each one's `id` is set here); their
    /// replies are the returned ones' to await, in the same order.
    pub async fn send_many(&self, requests: &[(Header, &[u8])]) -> Result<Vec<Pending>, CallError> {
        let conn = self.connection().await?;
        let mut frames = Vec::new();
        let mut pending = Vec::with_capacity(requests.len());
        {
            let mut waiting = conn.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let Some(map) = waiting.as_mut() else {
                return Err(CallError::NotSent(self.addr.clone()));
            };
            for (h, payload) in requests {
                let mut h = *h;
                h.id = self.next.fetch_add(1, Ordering::Relaxed);
                h.reply = false;
                let (tx, rx) = oneshot::channel();
                map.insert(h.id, tx);
                let addr = self.addr.clone();
                pending.push(Pending { conn: conn.clone(), id: h.id, rx: Some(rx), addr });
                encode_into(&self.key, &h, payload, &mut frames);
            }
        }
        let mut writer = conn.writer.lock().await;
        /// Kills the connection unless the whole frame was written.
        struct Whole<'a>(&'a Conn, bool);
        impl Drop for Whole<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.kill();
                }
            }
        }
        let mut whole = Whole(&conn, false);
        let wrote = writer.write_all(&frames).await;
        whole.1 = wrote.is_ok();
        drop(whole);
        match wrote {
            Ok(()) => Ok(pending),
            Err(_) => Err(CallError::Lost(self.addr.clone())),
        }
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
