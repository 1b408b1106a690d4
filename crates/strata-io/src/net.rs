//! Inter-node connections: outgoing ones from this node's own address, the authenticated
//! and encrypted channel every connection runs ([`channel`]: Noise NNpsk0 with a key
//! derived from the cluster secret), the listener that accepts only authenticated peers
//! and survives floods ([`listener`]), and the writer task every connection's frames go
//! out through.
//!
//! A node whose RPC address is a loopback address other than 127.0.0.1 (several nodes on
//! one machine, each on its own 127.0.0.x) connects to its peers from that address, so
//! a firewall rule can tell the nodes' traffic apart (the fault tests cut one node off
//! with nft this way). Anywhere else the kernel chooses the source address.

pub mod channel;
pub mod listener;

pub use channel::{Channel, ChannelKey, ChannelReader, ChannelWriter, HandshakeError};

use std::net::IpAddr;
use std::sync::OnceLock;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

static SOURCE: OnceLock<IpAddr> = OnceLock::new();

/// A frame writer joins queued frames into one write up to about this many bytes.
const BATCH_BYTES: usize = 256 << 10;

/// Bytes a connection's reader buffers (one read takes many small frames).
pub const READ_BUFFER_BYTES: usize = 256 << 10;

/// Sets the address outgoing inter-node connections come from (once per process), if it
/// is a loopback address other than 127.0.0.1; returns whether it was set.
pub fn set_source_address(ip: IpAddr) -> bool {
    let own_loopback = ip.is_loopback() && ip != IpAddr::from([127, 0, 0, 1]);
    own_loopback && SOURCE.set(ip).is_ok()
}

/// Connects to `addr` (host:port), from the source address if one is set.
pub async fn connect(addr: &str) -> std::io::Result<TcpStream> {
    let Some(source) = SOURCE.get() else { return TcpStream::connect(addr).await };
    let mut last = None;
    for target in tokio::net::lookup_host(addr).await? {
        let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if target.is_ipv4() == source.is_ipv4() {
            socket.bind(std::net::SocketAddr::new(*source, 0))?;
        }
        match socket.connect(target).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other(format!("{addr}: no address"))))
}

/// Spawns the task that writes each frame queued on the returned sender, whole and in
/// order (so a sender that stops waiting never leaves half a frame on the wire); on a
/// write error it runs `on_error` and stops.
pub fn frame_writer<W: AsyncWrite + Unpin + Send + 'static>(
    mut writer: W,
    on_error: impl FnOnce() + Send + 'static,
) -> mpsc::UnboundedSender<Vec<u8>> {
    let (frames, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        while let Some(mut batch) = rx.recv().await {
            // Frames queued meanwhile go out in the same write (one syscall for many
            // replies under load).
            while batch.len() < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(frame) => batch.extend_from_slice(&frame),
                    Err(_) => break,
                }
            }
            if writer.write_all(&batch).await.is_err() {
                return on_error();
            }
        }
    });
    frames
}

/// Turns on TCP keepalive for a client connection (NBD): probes after `idle` without
/// traffic, one every `interval`, the connection closed after `probes` unanswered, so a
/// client whose machine died frees its connection without an idle timeout.
pub fn keep_alive(
    stream: &TcpStream,
    idle: std::time::Duration,
    interval: std::time::Duration,
    probes: u32,
) -> std::io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_socket_keepalive(stream, true)?;
    sockopt::set_tcp_keepidle(stream, idle)?;
    sockopt::set_tcp_keepintvl(stream, interval)?;
    sockopt::set_tcp_keepcnt(stream, probes)?;
    Ok(())
}

/// Raises this process's open-file limit to its hard limit (a node holds a socket per
/// peer connection and per NBD client, and a flood of connections must meet the
/// listener's own limits, not EMFILE first); returns the limit now in force.
pub fn raise_descriptor_limit() -> std::io::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)?;
    }
    Ok(limit.current.unwrap_or(u64::MAX))
}
