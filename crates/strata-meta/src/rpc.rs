//! Inter-node RPC for the Raft members: framed messages inside the authenticated,
//! encrypted inter-node channel (`strata_io::net::channel`).
//!
//! Every connection to the RPC port runs the channel's handshake first (Noise NNpsk0, the
//! key derived from the cluster secret): a peer without the secret is refused there, with
//! a refusal that says so (`CallError::Refused`: "is this node's secret the cluster's?"),
//! and a record replayed, reordered or taken from another connection is refused by the
//! channel. Inside it, the connection's first bytes say which plane it is for: `SRP1`
//! frames below, or `SDP1` (`strata-frame`'s data frames), handed to the member's
//! [`DataPlane`]. The port's listener (`strata_io::net::listener`) reads nothing but a
//! small handshake before a peer is authenticated, and survives floods and descriptor
//! exhaustion.
//!
//! ```text
//! frame:  0  4  magic "SRP1"
//!         4  4  body length (little-endian, at most FRAME_BYTES_MAX)
//!         8 32  BLAKE3 keyed hash of the body, keyed by a key derived from the secret
//!        40  …  body: JSON of `Envelope`
//! ```
//! The MAC predates the channel and stays as defense in depth (the channel's AEAD already
//! authenticates every byte). A frame whose MAC does not verify is answered with one
//! refusal frame (magic "SRP!", length, a UTF-8 reason) and the connection is closed.
//! Decoding untrusted bytes never panics.
//!
//! Every frame's body is an [`Envelope`]: a request id and the message. Requests run
//! concurrently and are answered by id, so one connection carries many at once (Raft's
//! appends and heartbeats, client requests forwarded to the leader, a benchmark's). A
//! [`Peer`] writes whole frames from one writer task, so a caller that gives up (a
//! timeout) never leaves half a frame on the stream.

use crate::raft::{NodeId, TypeConfig};
use crate::service::{ClientReply, ClientRequest, Member, ServiceError};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_io::net::channel::{Channel, ChannelKey, HandshakeError};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

const MAGIC: &[u8; 4] = b"SRP1";
/// The first bytes of a data-plane connection (`strata-frame`'s frames), handed to the
/// member's [`DataPlane`].
pub const DATA_MAGIC: &[u8; 4] = b"SDP1";

/// Serves data-plane connections arriving on the RPC port.
pub trait DataPlane: Send + Sync + 'static {
    /// Takes over an authenticated connection whose first bytes are [`DATA_MAGIC`] (spawns
    /// its own task).
    fn handle(&self, channel: Channel, peer: std::net::SocketAddr);
}
const REFUSAL: &[u8; 4] = b"SRP!";
/// How long connecting to a peer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const HEADER_BYTES: usize = 40;
/// The largest frame body accepted (a snapshot chunk or a batch of entries fits).
pub const FRAME_BYTES_MAX: usize = 64 << 20;

/// How long a new connection's first frame may take to say which plane it is for.
const PLANE_TIMEOUT: Duration = Duration::from_secs(10);

/// The keys of the RPC plane, derived from the cluster secret: the channel's and the
/// frames' MAC key.
#[derive(Clone)]
pub struct Key {
    mac: [u8; 32],
    channel: ChannelKey,
}

impl Key {
    /// Derives the RPC keys from the cluster secret's bytes.
    pub fn from_secret(secret: &[u8]) -> Key {
        Key {
            mac: blake3::derive_key("strata cluster rpc v1", secret),
            channel: ChannelKey::from_secret(secret),
        }
    }

    /// The inter-node channel's key.
    pub fn channel(&self) -> &ChannelKey {
        &self.channel
    }

    fn mac(&self, body: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.mac, body).as_bytes()
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// Not a Strata RPC frame.
    #[error("not a Strata RPC frame")]
    Magic,
    /// Longer than allowed.
    #[error("frame of {0} bytes is longer than allowed")]
    TooLong(usize),
    /// The MAC does not verify: the sender does not have the cluster secret.
    #[error("frame not authenticated with this cluster's secret")]
    Unauthenticated,
    /// The body is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The peer refused our frames (we do not have its cluster's secret).
    #[error("refused by the peer: {0}")]
    Refused(String),
}

/// Encodes `message` as one authenticated frame.
pub fn encode<T: Serialize>(key: &Key, message: &T) -> Vec<u8> {
    let body = serde_json::to_vec(message).expect("messages serialize");
    let mut frame = Vec::with_capacity(HEADER_BYTES + body.len());
    frame.extend_from_slice(MAGIC);
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&key.mac(&body));
    frame.extend_from_slice(&body);
    frame
}

/// Reads and verifies one frame.
pub async fn read_frame<T: for<'de> Deserialize<'de>>(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    key: &Key,
) -> Result<T, FrameError> {
    let mut header = [0u8; HEADER_BYTES];
    stream.read_exact(&mut header[..8]).await?;
    if &header[..4] == REFUSAL {
        let length = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        let mut reason = vec![0u8; length.min(1024)];
        stream.read_exact(&mut reason).await?;
        return Err(FrameError::Refused(String::from_utf8_lossy(&reason).into_owned()));
    }
    if &header[..4] != MAGIC {
        return Err(FrameError::Magic);
    }
    stream.read_exact(&mut header[8..]).await?;
    let length = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
    if length > FRAME_BYTES_MAX {
        return Err(FrameError::TooLong(length));
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    // Constant-time comparison (blake3's Hash equality is).
    let sent: [u8; 32] = header[8..40].try_into().expect("32 bytes");
    if blake3::Hash::from(key.mac(&body)) != blake3::Hash::from(sent) {
        return Err(FrameError::Unauthenticated);
    }
    serde_json::from_slice(&body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// A frame's body: a request id (replies carry their request's) and the message.
#[derive(Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Chosen by the requester, unique on its connection.
    pub id: u64,
    /// The message.
    pub body: T,
}

/// A request to a member.
#[derive(Serialize, Deserialize)]
pub enum Request {
    /// Raft's append-entries (and heartbeats).
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft's vote.
    Vote(VoteRequest<NodeId>),
    /// A snapshot chunk.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client's request; `forwarded` when a member passes it on to the leader (the
    /// leader does not pass it on again).
    Client {
        /// The request.
        request: ClientRequest,
        /// Already forwarded once.
        forwarded: bool,
    },
}

/// The answer to a [`Request`].
#[derive(Serialize, Deserialize)]
pub enum Reply {
    /// To `Append`.
    Append(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To `Vote`.
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To `Snapshot`.
    Snapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
    /// To `Client`.
    Client(Result<ClientReply, ServiceError>),
}

fn refusal_frame(reason: &str) -> Vec<u8> {
    let mut frame = Vec::with_capacity(8 + reason.len());
    frame.extend_from_slice(REFUSAL);
    frame.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    frame.extend_from_slice(reason.as_bytes());
    frame
}

/// Serves RPCs to `member` on `listener` (never ends: accept errors are retried).
pub async fn serve(listener: TcpListener, member: Arc<Member>) {
    let key = member.key().channel.clone();
    strata_io::net::listener::serve(listener, key, move |mut channel, peer| {
        let member = member.clone();
        async move {
            // The port carries both planes; a connection's first bytes say which.
            let magic = match tokio::time::timeout(PLANE_TIMEOUT, channel.reader.peek(4)).await {
                Ok(Ok(first)) => <[u8; 4]>::try_from(&first[..4]).expect("4 bytes peeked"),
                Ok(Err(e)) => return closed(peer, &e),
                Err(_) => return,
            };
            match member.data_plane() {
                Some(data) if &magic == DATA_MAGIC => data.handle(channel, peer),
                _ => serve_connection(channel, peer, member).await,
            }
        }
    })
    .await
}

/// Says why an authenticated connection broke, if it was the channel refusing a record
/// (tampered with, replayed, spliced); a connection that just closed is no news.
pub fn closed(peer: std::net::SocketAddr, e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::InvalidData {
        tracing::warn!(%peer, "closing an inter-node connection: {e}");
    }
}

async fn serve_connection(channel: Channel, peer: std::net::SocketAddr, member: Arc<Member>) {
    let key = member.key().clone();
    let Channel { mut reader, writer } = channel;
    let tx = strata_io::net::frame_writer(writer, || ());
    loop {
        let Envelope { id, body } = match read_frame::<Envelope<Request>>(&mut reader, &key).await {
            Ok(r) => r,
            Err(FrameError::Io(e)) => return closed(peer, &e),
            Err(e) => {
                tracing::warn!(%peer, "refusing an RPC connection: {e}");
                let _ = tx.send(refusal_frame(&e.to_string()));
                return;
            }
        };
        // Each request runs on its own: a heartbeat (or a read-index round) must not wait
        // behind an append that waits for this member's fsync. Raft tolerates reordering
        // (a stale or out-of-order append is refused and retried by the leader).
        let member = member.clone();
        let tx = tx.clone();
        let key = key.clone();
        tokio::spawn(async move {
            let raft = member.raft();
            let body = match body {
                Request::Append(r) => Reply::Append(raft.append_entries(r).await),
                Request::Vote(r) => Reply::Vote(raft.vote(r).await),
                Request::Snapshot(r) => Reply::Snapshot(raft.install_snapshot(r).await),
                Request::Client { request, forwarded } => {
                    Reply::Client(member.handle(request, forwarded).await)
                }
            };
            let _ = tx.send(encode(&key, &Envelope { id, body }));
        });
    }
}

/// Why a call to a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The request never left: the peer could not be reached.
    #[error("cannot reach {0}")]
    NotSent(String),
    /// The connection broke or the caller gave up after the request may have left: it
    /// may or may not have been applied.
    #[error("no answer from {0}")]
    Lost(String),
    /// The peer refused our frames: we do not have its cluster's secret.
    #[error("{addr} refused us: {reason} (is this node's secret the cluster's?)")]
    Refused {
        /// The peer.
        addr: String,
        /// What it said.
        reason: String,
    },
}

/// A connection to one member carrying many requests at once, opened on first use and
/// reopened after a failure.
pub struct Peer {
    key: Key,
    addr: String,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    /// Since when Raft's calls find the peer unreachable (logged once, not per retry).
    unreachable_since: Mutex<Option<Instant>>,
}

type Pending = Mutex<Option<HashMap<u64, oneshot::Sender<Reply>>>>;

struct Conn {
    frames: mpsc::UnboundedSender<Vec<u8>>,
    /// `None` once the connection is dead.
    pending: Pending,
    next: AtomicU64,
    refused: Mutex<Option<String>>,
    reader: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Conn {
    fn kill(&self, refused: Option<String>) {
        if refused.is_some() {
            *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = refused;
        }
        // Dropping the senders wakes every waiting caller.
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn alive(&self) -> bool {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

/// Removes a call's pending slot when the caller stops waiting (answered or not).
struct Waiting<'a> {
    conn: &'a Conn,
    id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(map) = self.conn.pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            map.remove(&self.id);
        }
    }
}

impl Peer {
    /// A peer at `addr` (host:port), authenticated with `key`.
    pub fn new(key: Key, addr: impl Into<String>) -> Peer {
        Peer {
            key,
            addr: addr.into(),
            conn: tokio::sync::Mutex::new(None),
            unreachable_since: Mutex::new(None),
        }
    }

    /// The peer's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn connection(&self) -> Result<Arc<Conn>, CallError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            if conn.alive() {
                return Ok(conn.clone());
            }
            let refused = conn.refused.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(reason) = refused {
                *slot = None;
                return Err(CallError::Refused { addr: self.addr.clone(), reason });
            }
        }
        let connect = tokio::time::timeout(CONNECT_TIMEOUT, strata_io::net::connect(&self.addr));
        let stream = match connect.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(CallError::NotSent(format!("{}: {e}", self.addr))),
            Err(_) => return Err(CallError::NotSent(format!("{}: connect timed out", self.addr))),
        };
        let _ = stream.set_nodelay(true);
        let Channel { mut reader, writer } =
            strata_io::net::channel::initiate(stream, &self.key.channel).await.map_err(|e| {
                let addr = self.addr.clone();
                match e {
                    HandshakeError::Refused(reason) => CallError::Refused { addr, reason },
                    HandshakeError::Unauthenticated => CallError::Refused {
                        addr,
                        reason: "its handshake did not authenticate with our secret".into(),
                    },
                    e => CallError::NotSent(format!("{addr}: {e}")),
                }
            })?;
        let conn = Arc::new_cyclic(|me: &std::sync::Weak<Conn>| {
            let me = me.clone();
            Conn {
                frames: strata_io::net::frame_writer(writer, move || {
                    if let Some(conn) = me.upgrade() {
                        conn.kill(None);
                    }
                }),
                pending: Mutex::new(Some(HashMap::new())),
                next: AtomicU64::new(1),
                refused: Mutex::new(None),
                reader: Mutex::new(None),
            }
        });
        let r = conn.clone();
        let key = self.key.clone();
        let reader_task = tokio::spawn(async move {
            loop {
                match read_frame::<Envelope<Reply>>(&mut reader, &key).await {
                    Ok(Envelope { id, body }) => {
                        let mut pending = r.pending.lock().unwrap_or_else(|e| e.into_inner());
                        let Some(map) = pending.as_mut() else { return };
                        if let Some(waiter) = map.remove(&id) {
                            let _ = waiter.send(body);
                        }
                    }
                    Err(FrameError::Refused(reason)) => return r.kill(Some(reason)),
                    Err(_) => return r.kill(None),
                }
            }
        });
        *conn.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(reader_task.abort_handle());
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `request` and waits for its reply.
    pub async fn call(&self, request: &Request) -> Result<Reply, CallError> {
        let conn = self.connection().await?;
        let id = conn.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        match conn.pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(map) => map.insert(id, tx),
            None => return Err(CallError::NotSent(self.addr.clone())),
        };
        let _waiting = Waiting { conn: &conn, id };
        if conn.frames.send(encode(&self.key, &Envelope { id, body: request })).is_err() {
            return Err(CallError::NotSent(self.addr.clone()));
        }
        rx.await.map_err(|_| match conn.refused.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            Some(reason) => CallError::Refused { addr: self.addr.clone(), reason },
            None => CallError::Lost(self.addr.clone()),
        })
    }

    /// Sends a client request to this member (which routes it to the leader).
    pub async fn request(&self, request: ClientRequest) -> Result<ClientReply, ServiceError> {
        let request = Request::Client { request, forwarded: false };
        match self.call(&request).await {
            Ok(Reply::Client(r)) => r,
            Ok(_) => Err(ServiceError::Unknown("reply of the wrong kind".into())),
            Err(e @ CallError::NotSent(_)) => Err(ServiceError::Unreachable(e.to_string())),
            Err(e @ CallError::Refused { .. }) => Err(ServiceError::Refused(e.to_string())),
            Err(e @ CallError::Lost(_)) => Err(ServiceError::Unknown(e.to_string())),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // The reader task holds the connection (and so the writer's queue): stop it, which
        // closes the socket and ends the writer.
        if let Some(conn) = self.conn.get_mut().take() {
            conn.kill(None);
            if let Some(reader) = conn.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
                reader.abort();
            }
        }
    }
}

/// The TCP network of one member: peers are found by the address in their `BasicNode`;
/// one shared connection per peer address (openraft asks for a new client per
/// read-index round, which must not mean a new connection).
#[derive(Clone)]
pub struct TcpNetwork {
    key: Key,
    peers: Arc<Mutex<HashMap<String, Arc<Peer>>>>,
}

impl TcpNetwork {
    /// A network authenticating with `key`.
    pub fn new(key: Key) -> TcpNetwork {
        TcpNetwork { key, peers: Arc::default() }
    }
}

/// Raft's connection to one peer.
pub struct TcpConnection {
    target: NodeId,
    peer: Arc<Peer>,
}

impl RaftNetworkFactory<TypeConfig> for TcpNetwork {
    type Network = TcpConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> TcpConnection {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let peer = peers
            .entry(node.addr.clone())
            .or_insert_with(|| Arc::new(Peer::new(self.key.clone(), node.addr.clone())))
            .clone();
        TcpConnection { target, peer }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl TcpConnection {
    /// A call; a peer that cannot be reached at all is `Unreachable`, which makes openraft
    /// back off (`backoff`) instead of retrying thousands of times a second while a node
    /// is down (each retry a connect). This node says once that the peer is unreachable,
    /// and once that it is back (openraft's own line for each retry is held back:
    /// `up::init_logging`).
    async fn call<E: std::error::Error>(
        &mut self,
        request: Request,
        option: &RPCOption,
    ) -> Result<Reply, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>> {
        let result = tokio::time::timeout(option.hard_ttl(), self.peer.call(&request)).await;
        let not_sent = matches!(result, Ok(Err(CallError::NotSent(_))));
        {
            let mut since = self.peer.unreachable_since.lock().unwrap_or_else(|e| e.into_inner());
            match (since.is_some(), not_sent) {
                (false, true) => {
                    *since = Some(Instant::now());
                    if let Ok(Err(e)) = &result {
                        tracing::warn!(
                            member = self.target,
                            "metadata member unreachable: {e} \
                            (retrying every 200 ms; said once)"
                        );
                    }
                }
                (true, false) if matches!(result, Ok(Ok(_))) => {
                    let away = since.take().map(|t| t.elapsed().as_secs()).unwrap_or_default();
                    tracing::info!(
                        member = self.target,
                        "metadata member reachable again \
                        (after {away} s)"
                    );
                }
                _ => {}
            }
        }
        match result {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e @ CallError::NotSent(_))) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Ok(Err(e)) => Err(RPCError::Network(NetworkError::new(&e))),
            Err(_) => {
                Err(RPCError::Network(NetworkError::new(&CallError::Lost(self.peer.addr.clone()))))
            }
        }
    }

    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new(self.target, e))
    }
}

fn unexpected() -> NetworkError {
    NetworkError::new(&std::io::Error::other("reply of the wrong kind"))
}

impl RaftNetwork<TypeConfig> for TcpConnection {
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(std::time::Duration::from_millis(200)))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        match self.call(Request::Append(rpc), &option).await? {
            Reply::Append(r) => r.map_err(|e| self.remote(e)),
            _ => Err(unexpected().into()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self.call(Request::Snapshot(rpc), &option).await? {
            Reply::Snapshot(r) => r.map_err(|e| self.remote(e)),
            _ => Err(unexpected().into()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        match self.call(Request::Vote(rpc), &option).await? {
            Reply::Vote(r) => r.map_err(|e| self.remote(e)),
            _ => Err(unexpected().into()),
        }
    }
}

#[cfg(test)]
mod tests;
