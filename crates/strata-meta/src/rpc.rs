//! Inter-node RPC for the Raft members: framed, authenticated with the cluster secret.
//!
//! ```text
//! frame:  0  4  magic "SRP1"
//!         4  4  body length (little-endian, at most FRAME_BYTES_MAX)
//!         8 32  BLAKE3 keyed hash of the body, keyed by a key derived from the secret
//!        40  …  body: JSON of `Envelope`
//! ```
//! A frame whose MAC does not verify is refused and the connection closed: a node without
//! the secret can neither join nor talk. Decoding untrusted bytes never panics.
//! (Replay of captured frames is not prevented yet; the RPC is meant for a private
//! network or loopback until it runs over TLS.)
//!
//! The server answers each request on the connection it came on, in order; the client
//! opens a connection per peer and reuses it.

use crate::raft::{NodeId, TypeConfig};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAGIC: &[u8; 4] = b"SRP1";
const HEADER_BYTES: usize = 40;
/// The largest frame body accepted (a snapshot chunk or a batch of entries fits).
pub const FRAME_BYTES_MAX: usize = 64 << 20;

/// The key frames are authenticated with, derived from the cluster secret.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl Key {
    /// Derives the RPC key from the cluster secret's bytes.
    pub fn from_secret(secret: &[u8]) -> Key {
        Key(blake3::derive_key("strata cluster rpc v1", secret))
    }

    fn mac(&self, body: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, body).as_bytes()
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
    stream.read_exact(&mut header).await?;
    if &header[..4] != MAGIC {
        return Err(FrameError::Magic);
    }
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

/// A request between members.
#[derive(Serialize, Deserialize)]
pub enum Request {
    /// Raft's append-entries (and heartbeats).
    Append(AppendEntriesRequest<TypeConfig>),
    /// Raft's vote.
    Vote(VoteRequest<NodeId>),
    /// A snapshot chunk.
    Snapshot(InstallSnapshotRequest<TypeConfig>),
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
}

/// Serves member RPCs on `listener` for `raft` until the listener fails. Connections with
/// a bad frame are closed.
pub async fn serve(listener: TcpListener, raft: Raft<TypeConfig>, key: Key) {
    loop {
        let Ok((mut stream, peer)) = listener.accept().await else { return };
        let _ = stream.set_nodelay(true);
        let raft = raft.clone();
        let key = key.clone();
        tokio::spawn(async move {
            loop {
                let request = match read_frame::<Request>(&mut stream, &key).await {
                    Ok(r) => r,
                    Err(FrameError::Io(_)) => return,
                    Err(e) => {
                        tracing::warn!(%peer, "refusing an RPC connection: {e}");
                        return;
                    }
                };
                let reply = match request {
                    Request::Append(r) => Reply::Append(raft.append_entries(r).await),
                    Request::Vote(r) => Reply::Vote(raft.vote(r).await),
                    Request::Snapshot(r) => Reply::Snapshot(raft.install_snapshot(r).await),
                };
                if stream.write_all(&encode(&key, &reply)).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The TCP network of one member: peers are found by the address in their `BasicNode`.
#[derive(Clone)]
pub struct TcpNetwork {
    key: Key,
}

impl TcpNetwork {
    /// A network authenticating with `key`.
    pub fn new(key: Key) -> TcpNetwork {
        TcpNetwork { key }
    }
}

/// A connection to one peer, opened on first use and reopened after a failure.
pub struct TcpConnection {
    key: Key,
    target: NodeId,
    addr: String,
    stream: Option<TcpStream>,
}

impl RaftNetworkFactory<TypeConfig> for TcpNetwork {
    type Network = TcpConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> TcpConnection {
        TcpConnection { key: self.key.clone(), target, addr: node.addr.clone(), stream: None }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl TcpConnection {
    async fn call(&mut self, request: &Request) -> Result<Reply, NetworkError> {
        let stream = match &mut self.stream {
            Some(s) => s,
            None => {
                let s = TcpStream::connect(&self.addr).await.map_err(|e| NetworkError::new(&e))?;
                let _ = s.set_nodelay(true);
                self.stream.insert(s)
            }
        };
        let result = async {
            stream.write_all(&encode(&self.key, request)).await?;
            read_frame::<Reply>(stream, &self.key).await
        }
        .await;
        result.map_err(|e| {
            self.stream = None;
            NetworkError::new(&e)
        })
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
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        match self.call(&Request::Append(rpc)).await? {
            Reply::Append(r) => r.map_err(|e| self.remote(e)),
            _ => Err(unexpected().into()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self.call(&Request::Snapshot(rpc)).await? {
            Reply::Snapshot(r) => r.map_err(|e| self.remote(e)),
            _ => Err(unexpected().into()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        match self.call(&Request::Vote(rpc)).await? {
            Reply::Vote(r) => r.map_err(|e| self.remote(e)),
            _ => Err(unexpected().into()),
        }
    }
}

#[cfg(test)]
mod tests;
