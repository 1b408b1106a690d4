//! The NBD server: handshake (fixed newstyle) and transmission, one task per connection.
//!
//! Transmission shape: the connection task owns the socket. It parses requests in order
//! and either answers them at once into its output buffer (cached reads, whole-page
//! writes, BLOCK_STATUS, errors) or hands them off (device I/O to the blocking pool, FLUSH
//! and FUA to the volume's sync thread), which send the reply back through a channel; so
//! replies leave out of order, matched by cookie, one write call per turn. Handed-off
//! requests are bounded in number and bytes per connection; at the bound the task stops
//! parsing. See `docs/design/nbd.md`.

use crate::buffers::{BufferPool, PooledBuffer};
use crate::codec::{
    self, cflags, cmd, errno, opt, rep, reply, tflags, DecodeError, Request, TlsGate, TlsMode,
};
use crate::stream::{subject_of, Stream, TLS_SEND_BUFFER_BYTES, TLS_SOCKET_BUFFER_BYTES};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};
use strata_io::{BlockVolume, GroupSync, IoOp, StoreError, ZeroMode};
use strata_types::limits::{
    self, BLOCK_SIZE_BYTES, NBD_BLOCK_STATUS_EXTENTS_MAX, NBD_CONNECTIONS_MAX,
    NBD_CONNECTIONS_PER_ADDRESS_MAX, NBD_IN_FLIGHT_BYTES_MAX, NBD_OPTIONS_PER_HANDSHAKE_MAX,
    NBD_OPTION_BYTES_MAX, NBD_PAYLOAD_BYTES_MAX, NBD_PAYLOAD_DISCARD_BYTES_MAX,
    NBD_REPLY_BYTES_MAX, NBD_REQUESTS_IN_FLIGHT_MAX, NBD_TLS_HANDSHAKE_SECS,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// A client that has not finished the handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// An option payload above this is not even read: the connection is closed.
const OPTION_DISCARD_BYTES_MAX: u32 = 16 << 20;
/// Options a client may send before TLS in require mode (each is refused): what is read
/// from an unauthenticated client stays small.
const OPTIONS_BEFORE_TLS_MAX: u32 = 16;
/// At most one log line this often about refused connections (a flood must not flood
/// the log).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection, as far as the server knows: what an
/// [`ExportProvider`] decides access by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Client {
    /// The peer's IP address.
    pub address: IpAddr,
    /// The subject common name (CN) of the certificate the client presented over TLS,
    /// verified against the CA; `None` without TLS or without a certificate.
    pub subject: Option<String>,
    /// TLS is up.
    pub tls: bool,
}

/// Why an export was not opened; the message is for the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No such export (`NBD_REP_ERR_UNKNOWN`).
    Unknown(String),
    /// The export exists but its access list does not admit this client
    /// (`NBD_REP_ERR_POLICY`).
    Policy(String),
}

impl Refusal {
    fn reply(&self) -> (u32, &str) {
        match self {
            Refusal::Unknown(m) => (rep::ERR_UNKNOWN, m),
            Refusal::Policy(m) => (rep::ERR_POLICY, m),
        }
    }
}

/// How [`serve`] runs.
#[derive(Clone, Default)]
pub struct Options {
    /// TLS is required, with this configuration (it decides whether client certificates
    /// are asked for or required); `None`: plain NBD, STARTTLS unsupported.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// A connection with no request in flight and no input for this long (up to twice
    /// it: the check is lazy, to keep timers off the hot path) is closed; `None`: never.
    pub idle_timeout: Option<Duration>,
}

/// One export, as listed by NBD_OPT_LIST.
#[derive(Clone, Debug)]
pub struct ExportSummary {
    /// The export name (a volume name).
    pub name: String,
    /// A human description.
    pub description: String,
}

/// An opened export: what one connection serves.
pub struct Export {
    /// Canonical name.
    pub name: String,
    /// Human description.
    pub description: String,
    /// The data.
    pub volume: Arc<dyn BlockVolume>,
    /// The volume's shared group-commit handle: FLUSH from any connection syncs every
    /// connection's completed writes, which is what makes CAN_MULTI_CONN true.
    pub group_sync: GroupSync,
    /// Refuse writes.
    pub read_only: bool,
    /// Becomes `true` when the export must drop its clients (forced delete).
    pub closed: watch::Receiver<bool>,
    /// Held while the connection lives (attachment accounting); dropped at disconnect.
    pub attachment: Box<dyn Any + Send + Sync>,
}

/// Where the server finds exports.
pub trait ExportProvider: Send + Sync + 'static {
    /// The exports `client` may open, for NBD_OPT_LIST.
    fn list(&self, client: &Client) -> Vec<ExportSummary>;
    /// Opens an export by name for `client`.
    ///
    /// # Correctness
    /// Refuses with [`Refusal::Policy`] an export whose access list does not admit
    /// `client`: the server relies on it for access control.
    fn open(&self, name: &str, client: &Client) -> Result<Export, Refusal>;
}

/// Serves NBD on `listener` until `shutdown` becomes true; then stops accepting, lets every
/// connection finish its in-flight requests and send their replies, and returns.
pub async fn serve(
    listener: TcpListener,
    provider: Arc<dyn ExportProvider>,
    options: Options,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let for_connections = shutdown.clone();
    let buffers = BufferPool::default();
    let options = Arc::new(options);
    let addresses = Addresses::default();
    let mut refused = RefusalLog::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Beyond a cap the connection is closed at once (dropped).
                    let Some(slot) = addresses.take(peer.ip()) else {
                        refused.note(peer, "this address holds the most connections allowed");
                        continue;
                    };
                    if connections.len() >= NBD_CONNECTIONS_MAX {
                        refused.note(peer, "the node holds the most connections allowed");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    // A client whose machine died is found without an idle timeout.
                    let _ = strata_io::net::keep_alive(
                        &stream,
                        Duration::from_secs(limits::NBD_KEEPALIVE_IDLE_SECS),
                        Duration::from_secs(limits::NBD_KEEPALIVE_INTERVAL_SECS),
                        limits::NBD_KEEPALIVE_PROBES,
                    );
                    let stop = for_connections.clone();
                    let buffers = buffers.clone();
                    let (provider, options) = (provider.clone(), options.clone());
                    connections.spawn(async move {
                        connection(stream, peer, provider, options, stop, buffers).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = signalled(&mut shutdown) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Connections held per client address (see `NBD_CONNECTIONS_PER_ADDRESS_MAX`).
#[derive(Clone, Default)]
struct Addresses(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// One connection's place in [`Addresses`], given back when dropped (even by a panic).
struct AddressSlot {
    addresses: Addresses,
    address: IpAddr,
}

impl Addresses {
    fn take(&self, address: IpAddr) -> Option<AddressSlot> {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = held.entry(address).or_default();
        if *count >= NBD_CONNECTIONS_PER_ADDRESS_MAX {
            return None;
        }
        *count += 1;
        Some(AddressSlot { addresses: self.clone(), address })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self.addresses.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = held.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.address);
            }
        }
    }
}

/// Refused connections, logged at most once per [`REFUSAL_LOG_EVERY`].
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    since: u64,
}

impl RefusalLog {
    fn note(&mut self, peer: SocketAddr, why: &str) {
        self.since += 1;
        if self.last.is_some_and(|t| t.elapsed() < REFUSAL_LOG_EVERY) {
            return;
        }
        tracing::warn!(%peer, refused = self.since, "NBD connection closed at once: {why}");
        self.last = Some(Instant::now());
        self.since = 0;
    }
}

/// Resolves once the flag is set (or its sender is gone, which also means "stop").
async fn signalled(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// The handshake's buffered stream (it reads and writes through one object).
type Conn = BufReader<BufWriter<Stream>>;

fn buffered(stream: Stream) -> Conn {
    BufReader::with_capacity(64 << 10, BufWriter::with_capacity(64 << 10, stream))
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    provider: Arc<dyn ExportProvider>,
    options: Arc<Options>,
    shutdown: watch::Receiver<bool>,
    buffers: BufferPool,
) {
    let client = Client { address: peer.ip(), subject: None, tls: false };
    let handshake = handshake(buffered(Stream::Plain(stream)), provider.as_ref(), &options, client);
    let negotiated = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await;
    let (conn, session) = match negotiated {
        Ok(Ok((conn, Some(session)))) => (conn, session),
        Ok(Ok((_, None))) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "NBD handshake ended: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "NBD handshake timed out");
            return;
        }
    };
    tracing::debug!(%peer, export = %session.export.name, subject = ?session.client.subject,
        "NBD client attached");
    // Requests the client sent right behind its GO stay in the handshake's buffer.
    let leftover = BytesMut::from(conn.buffer());
    let idle = options.idle_timeout;
    // The transmission phase is compiled once per stream type: plain connections keep
    // the plain socket's cost.
    let ended = match conn.into_inner().into_inner() {
        Stream::Plain(s) => {
            transmission(s, leftover, session, shutdown, buffers, idle, false).await
        }
        Stream::Tls(s) => transmission(*s, leftover, session, shutdown, buffers, idle, true).await,
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, "NBD connection ended: {e}");
    }
}

/// What the handshake agreed on.
struct Session {
    export: Export,
    structured: bool,
    /// `base:allocation` was selected for this export.
    block_status: bool,
    /// The size advertised to the client.
    size: u64,
    /// Who the client is.
    client: Client,
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Decode(#[from] DecodeError),
    #[error("{0}")]
    Protocol(String),
}

fn transmission_flags(read_only: bool) -> u16 {
    let mut flags = tflags::HAS_FLAGS
        | tflags::SEND_FLUSH
        | tflags::SEND_FUA
        | tflags::SEND_TRIM
        | tflags::SEND_WRITE_ZEROES
        | tflags::SEND_FAST_ZERO
        | tflags::SEND_CACHE
        | tflags::CAN_MULTI_CONN;
    if read_only {
        flags |= tflags::READ_ONLY;
    }
    flags
}

async fn send_option_reply(
    wr: &mut Conn,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> Result<(), ConnError> {
    let mut out = BytesMut::with_capacity(20 + data.len());
    codec::put_option_reply(&mut out, option, reply_type, data);
    wr.write_all(&out).await?;
    Ok(())
}

/// Runs option haggling. Returns the stream (plain or TLS by now) with the session to
/// serve, or `None` when the client ended the handshake cleanly (ABORT) or must be
/// dropped without a reply. In require mode nothing but ABORT and STARTTLS is served
/// before TLS ([`codec::tls_gate`]).
async fn handshake(
    mut conn: Conn,
    provider: &dyn ExportProvider,
    options: &Options,
    mut client: Client,
) -> Result<(Conn, Option<Session>), ConnError> {
    let mode = if options.tls.is_some() { TlsMode::Require } else { TlsMode::Off };
    let mut refused_before_tls = 0;
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(codec::NBD_MAGIC);
    hello.put_u64(codec::IHAVEOPT);
    hello.put_u16(codec::FLAG_FIXED_NEWSTYLE | codec::FLAG_NO_ZEROES);
    conn.write_all(&hello).await?;
    conn.flush().await?;

    let client_flags = conn.read_u32().await?;
    if client_flags & !(codec::FLAG_C_FIXED_NEWSTYLE | codec::FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & codec::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // The export for which `base:allocation` is selected, if any.
    let mut meta_export: Option<String> = None;

    for _ in 0..NBD_OPTIONS_PER_HANDSHAKE_MAX {
        conn.flush().await?;
        let mut header = [0u8; codec::OptionHeader::SIZE];
        conn.read_exact(&mut header).await?;
        let header = codec::OptionHeader::decode(&header)?;
        let option = header.option;
        let gate = codec::tls_gate(mode, client.tls, option, header.length);
        if gate != TlsGate::Handle && header.length > NBD_OPTION_BYTES_MAX {
            return Err(ConnError::Protocol(format!("option of {} bytes", header.length)));
        }
        if header.length > NBD_OPTION_BYTES_MAX {
            if option == opt::EXPORT_NAME || header.length > OPTION_DISCARD_BYTES_MAX {
                return Err(ConnError::Protocol(format!("option of {} bytes", header.length)));
            }
            discard(&mut conn, u64::from(header.length)).await?;
            send_option_reply(&mut conn, option, rep::ERR_TOO_BIG, b"option data too large")
                .await?;
            continue;
        }
        let mut data = vec![0u8; header.length as usize];
        conn.read_exact(&mut data).await?;

        match gate {
            TlsGate::Handle => {}
            TlsGate::Close => {
                return Err(ConnError::Protocol("EXPORT_NAME before STARTTLS".into()));
            }
            TlsGate::Refuse(code) => {
                let message: &[u8] = match code {
                    rep::ERR_TLS_REQD => b"TLS is required: send NBD_OPT_STARTTLS first",
                    rep::ERR_UNSUP => b"this server does not serve TLS",
                    _ if client.tls => b"TLS is already up",
                    _ => b"STARTTLS takes no data",
                };
                send_option_reply(&mut conn, option, code, message).await?;
                if !client.tls {
                    refused_before_tls += 1;
                    if mode == TlsMode::Require && refused_before_tls > OPTIONS_BEFORE_TLS_MAX {
                        conn.flush().await?;
                        return Err(ConnError::Protocol("too many options before TLS".into()));
                    }
                }
                continue;
            }
            TlsGate::StartTls => {
                let config = options.tls.clone().expect("require mode has a configuration");
                send_option_reply(&mut conn, option, rep::ACK, &[]).await?;
                conn.flush().await?;
                // Bytes sent in the clear behind STARTTLS must never be taken as if they
                // came over TLS (the STARTTLS injection of CVE-2011-0411 in SMTP).
                if !conn.buffer().is_empty() {
                    return Err(ConnError::Protocol("data sent behind STARTTLS".into()));
                }
                let Stream::Plain(tcp) = conn.into_inner().into_inner() else {
                    return Err(ConnError::Protocol("STARTTLS over TLS".into()));
                };
                let socket = BufReader::with_capacity(TLS_SOCKET_BUFFER_BYTES, tcp);
                let accept = tokio_rustls::TlsAcceptor::from(config).accept(socket);
                let deadline = Duration::from_secs(NBD_TLS_HANDSHAKE_SECS);
                let mut tls = tokio::time::timeout(deadline, accept)
                    .await
                    .map_err(|_| ConnError::Protocol("the TLS handshake timed out".into()))?
                    .map_err(|e| ConnError::Protocol(format!("TLS handshake: {e}")))?;
                tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES));
                client.subject = subject_of(tls.get_ref().1.peer_certificates());
                client.tls = true;
                conn = buffered(Stream::Tls(Box::new(tls)));
                // The spec: nothing negotiated before STARTTLS survives it.
                structured = false;
                meta_export = None;
                continue;
            }
        }

        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8(data)
                    .map_err(|_| ConnError::Protocol("export name is not UTF-8".into()))?;
                // The spec gives no way to report an error here: close the connection.
                let export = provider.open(&name, &client).map_err(|refusal| {
                    ConnError::Protocol(format!("EXPORT_NAME {name:?}: {refusal:?}"))
                })?;
                let size = export.volume.size_bytes();
                let mut out = BytesMut::with_capacity(134);
                out.put_u64(size);
                out.put_u16(transmission_flags(export.read_only));
                if !no_zeroes {
                    out.put_bytes(0, 124);
                }
                conn.write_all(&out).await?;
                conn.flush().await?;
                let block_status = meta_export.as_deref() == Some(name.as_str());
                return Ok((
                    conn,
                    Some(Session { export, structured, block_status, size, client }),
                ));
            }
            opt::ABORT => {
                send_option_reply(&mut conn, option, rep::ACK, &[]).await?;
                conn.flush().await?;
                return Ok((conn, None));
            }
            opt::LIST => {
                if !data.is_empty() {
                    send_option_reply(&mut conn, option, rep::ERR_INVALID, b"LIST takes no data")
                        .await?;
                    continue;
                }
                for export in provider.list(&client) {
                    let mut d = Vec::with_capacity(4 + export.name.len());
                    d.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(export.name.as_bytes());
                    d.extend_from_slice(export.description.as_bytes());
                    send_option_reply(&mut conn, option, rep::SERVER, &d).await?;
                }
                send_option_reply(&mut conn, option, rep::ACK, &[]).await?;
            }
            opt::INFO | opt::GO => {
                let request = match codec::InfoRequest::decode(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        let msg = format!("malformed INFO/GO: {e}");
                        send_option_reply(&mut conn, option, rep::ERR_INVALID, msg.as_bytes())
                            .await?;
                        continue;
                    }
                };
                let export = match provider.open(&request.name, &client) {
                    Ok(export) => export,
                    Err(refusal) => {
                        let (code, message) = refusal.reply();
                        send_option_reply(&mut conn, option, code, message.as_bytes()).await?;
                        continue;
                    }
                };
                let size = export.volume.size_bytes();
                let info = codec::info_export(size, transmission_flags(export.read_only));
                send_option_reply(&mut conn, option, rep::INFO, &info).await?;
                // Default constraints (minimum 1) because unaligned requests are served
                // correctly; 4 KiB is the efficient size.
                let bs = codec::info_block_size(1, BLOCK_SIZE_BYTES as u32, NBD_PAYLOAD_BYTES_MAX);
                send_option_reply(&mut conn, option, rep::INFO, &bs).await?;
                if request.requests.contains(&codec::info::NAME) {
                    let d = codec::info_string(codec::info::NAME, &export.name);
                    send_option_reply(&mut conn, option, rep::INFO, &d).await?;
                }
                if request.requests.contains(&codec::info::DESCRIPTION) {
                    let d = codec::info_string(codec::info::DESCRIPTION, &export.description);
                    send_option_reply(&mut conn, option, rep::INFO, &d).await?;
                }
                send_option_reply(&mut conn, option, rep::ACK, &[]).await?;
                if option == opt::GO {
                    conn.flush().await?;
                    let block_status = meta_export.as_deref() == Some(request.name.as_str());
                    let session = Session { export, structured, block_status, size, client };
                    return Ok((conn, Some(session)));
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    let msg = b"STRUCTURED_REPLY takes no data";
                    send_option_reply(&mut conn, option, rep::ERR_INVALID, msg).await?;
                    continue;
                }
                structured = true;
                send_option_reply(&mut conn, option, rep::ACK, &[]).await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                if option == opt::SET_META_CONTEXT {
                    meta_export = None; // replaced even when this request fails
                }
                let meta = &mut meta_export;
                meta_context(&mut conn, option, &data, structured, provider, &client, meta).await?;
            }
            _ => {
                let msg = format!("option {option} is not supported by this server");
                send_option_reply(&mut conn, option, rep::ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
    Err(ConnError::Protocol("too many options".into()))
}

async fn meta_context(
    wr: &mut Conn,
    option: u32,
    data: &[u8],
    structured: bool,
    provider: &dyn ExportProvider,
    client: &Client,
    meta_export: &mut Option<String>,
) -> Result<(), ConnError> {
    if !structured {
        let msg = b"negotiate structured replies first";
        return send_option_reply(wr, option, rep::ERR_INVALID, msg).await;
    }
    let request = match codec::MetaContextRequest::decode(data) {
        Ok(r) => r,
        Err(e) => {
            let msg = format!("malformed meta context request: {e}");
            return send_option_reply(wr, option, rep::ERR_INVALID, msg.as_bytes()).await;
        }
    };
    if let Err(refusal) = provider.open(&request.export, client) {
        let (code, message) = refusal.reply();
        return send_option_reply(wr, option, code, message.as_bytes()).await;
    }
    let selected = if option == opt::LIST_META_CONTEXT {
        request.queries.is_empty()
            || request.queries.iter().any(|q| codec::lists_base_allocation(q))
    } else {
        request.queries.iter().any(|q| q == codec::BASE_ALLOCATION)
    };
    if selected {
        let id = if option == opt::SET_META_CONTEXT { codec::BASE_ALLOCATION_ID } else { 0 };
        let mut d = Vec::with_capacity(4 + codec::BASE_ALLOCATION.len());
        d.extend_from_slice(&id.to_be_bytes());
        d.extend_from_slice(codec::BASE_ALLOCATION.as_bytes());
        send_option_reply(wr, option, rep::META_CONTEXT, &d).await?;
        if option == opt::SET_META_CONTEXT {
            *meta_export = Some(request.export);
        }
    }
    send_option_reply(wr, option, rep::ACK, &[]).await
}

async fn discard(rd: &mut Conn, mut length: u64) -> Result<(), ConnError> {
    let mut sink = vec![0u8; 64 << 10];
    while length > 0 {
        let n = length.min(sink.len() as u64) as usize;
        rd.read_exact(&mut sink[..n]).await?;
        length -= n as u64;
    }
    Ok(())
}

/// A reply finished off the connection task: header and payload in one buffer, and the
/// payload bytes its request held in flight.
type Outgoing = (Bytes, u64);

/// The payload bytes a request holds while in flight (its data buffer).
fn cost(req: &Request) -> u64 {
    match req.kind {
        cmd::READ | cmd::WRITE => u64::from(req.length),
        _ => 0,
    }
}

/// Requests handed off by a connection and not yet answered: bounded in number and in
/// payload bytes, so one connection's memory stays bounded.
#[derive(Default)]
struct InFlight {
    count: usize,
    bytes: u64,
    /// Reply bytes handed back and waiting to be sent (large replies, not in the
    /// output buffer the parser appends to).
    held: u64,
}

impl InFlight {
    fn full(&self) -> bool {
        self.count >= NBD_REQUESTS_IN_FLIGHT_MAX || self.bytes >= NBD_IN_FLIGHT_BYTES_MAX
    }

    /// The client has enough reply bytes queued (in `out`, or handed back and waiting):
    /// parse nothing more until they are sent. READs answered inline count as much as
    /// those handed back; requests in flight are bounded apart ([`InFlight::full`]).
    fn holds_enough(&self, out: &BytesMut) -> bool {
        self.held + out.len() as u64 >= NBD_REPLY_BYTES_MAX
    }
    fn start(&mut self, req: &Request) {
        self.count += 1;
        self.bytes += cost(req);
    }
    fn finish(&mut self, bytes: u64) {
        debug_assert!(self.count > 0);
        self.count -= 1;
        self.bytes -= bytes;
    }
}

/// The connection's view of its export, shared with the tasks and threads that finish
/// requests off the connection task.
struct Shared {
    volume: Arc<dyn BlockVolume>,
    /// The volume's requests run as futures on this runtime (`BlockVolume::asynchronous`).
    asynchronous: bool,
    group_sync: GroupSync,
    name: String,
    structured: bool,
    /// Replies of requests finished elsewhere. Its capacity equals the in-flight limit
    /// and each such request sends exactly one reply, so `try_send` never finds it full.
    tx: mpsc::Sender<Outgoing>,
    /// Buffers for large reads, shared by every connection of the server.
    buffers: BufferPool,
}

fn put_ok(out: &mut BytesMut, cookie: u64) {
    codec::put_simple_reply(out, 0, cookie);
}

fn put_error(out: &mut BytesMut, structured: bool, cookie: u64, error: u32, message: &str) {
    if structured {
        codec::put_error_chunk(out, cookie, error, message);
    } else {
        codec::put_simple_reply(out, error, cookie);
    }
}

/// A command's name for the log.
fn command_name(kind: u16) -> &'static str {
    match kind {
        cmd::READ => "read",
        cmd::WRITE => "write",
        cmd::FLUSH => "flush",
        cmd::TRIM => "trim",
        cmd::CACHE => "cache",
        cmd::WRITE_ZEROES => "write_zeroes",
        cmd::BLOCK_STATUS => "block_status",
        _ => "other",
    }
}

fn store_errno(e: &StoreError) -> (u32, bool) {
    match e {
        StoreError::OutOfRange { .. } => (errno::EINVAL, false),
        // A full store says so once (and again when space is back): a VM retrying its
        // writes while paused would otherwise log a line a request.
        StoreError::NoSpace => (errno::ENOSPC, false),
        StoreError::Unsupported { .. } => (errno::ENOTSUP, false),
        StoreError::ReadOnly => (errno::EPERM, false),
        StoreError::Failed
        | StoreError::Io { .. }
        | StoreError::Corrupt { .. }
        | StoreError::NotFound { .. } => (errno::EIO, true),
    }
}

impl Shared {
    /// Renders a store error as a reply, logging it once if it is the server's fault (a
    /// client's mistake, such as a range past the end, is only answered).
    fn put_store_error(&self, out: &mut BytesMut, req: &Request, e: &StoreError) {
        let (code, log) = store_errno(e);
        if log {
            self.log_io_error(req, e);
        }
        put_error(out, self.structured, req.cookie, code, &e.to_string());
    }

    /// The one log line of a request the volume failed: where it is turned into a reply.
    fn log_io_error(&self, req: &Request, e: &dyn std::fmt::Display) {
        tracing::error!(volume = %self.name, offset = req.offset, length = req.length,
            command = command_name(req.kind), error = %e, "I/O failed");
    }

    /// Sends the reply of a request finished off the connection task.
    fn finish(&self, req: &Request, reply: BytesMut) {
        self.finish_bytes(req, reply.freeze());
    }

    fn finish_bytes(&self, req: &Request, reply: Bytes) {
        if self.tx.try_send((reply, cost(req))).is_err() {
            // Only when the connection is gone (or the capacity invariant broke).
            tracing::debug!(volume = %self.name, "reply dropped: connection closed");
        }
    }

    /// Finishes a write-type request: replies, or for FUA first queues a sync.
    fn write_done(self: &Arc<Self>, req: Request, result: Result<(), StoreError>) {
        match result {
            Ok(()) if req.flags & cflags::FUA != 0 => self.sync_then_reply(req),
            done => self.reply_done(&req, done),
        }
    }

    /// Replies to a request that has no data to return.
    fn reply_done(&self, req: &Request, result: Result<(), StoreError>) {
        let mut out = BytesMut::with_capacity(16);
        match result {
            Ok(()) => put_ok(&mut out, req.cookie),
            Err(e) => self.put_store_error(&mut out, req, &e),
        }
        self.finish(req, out);
    }

    /// Replies to `req` once every write completed before now is durable.
    fn sync_then_reply(self: &Arc<Self>, req: Request) {
        let me = self.clone();
        self.group_sync.request(Box::new(move |result| {
            let mut out = BytesMut::with_capacity(64);
            match result {
                Ok(()) => put_ok(&mut out, req.cookie),
                Err(e) => {
                    me.log_io_error(&req, &e);
                    let msg = format!("flush failed: {e}");
                    put_error(&mut out, me.structured, req.cookie, errno::EIO, &msg);
                }
            }
            me.finish(&req, out);
        }));
    }
}

/// How a connection's transmission phase ended.
enum Ended {
    Graceful,
    Forced,
}

/// Where the next bytes of input go.
enum Input {
    /// Receiving a large WRITE payload straight into a pooled buffer.
    Payload { req: Request, buffer: PooledBuffer, filled: usize },
    /// Request headers.
    Requests,
    /// Discarding an oversized WRITE payload; then EINVAL to `cookie`.
    Discard { left: u64, cookie: u64, length: u32 },
}

/// Free room kept in the input buffer before each socket read.
const INPUT_ROOM_BYTES: usize = 256 << 10;
/// An output buffer grown past this by a large read is released after use.
const OUTPUT_KEEP_BYTES: usize = 4 << 20;
/// Reads this large go into a pooled buffer (no zero-fill, no page faults) and their reply
/// is sent from it without a copy: read inline when the page cache has the data, else
/// on the blocking pool. The reply travels through the hand-back channel like any other.
const BIG_READ_BYTES: u32 = 128 << 10;
/// A WRITE payload this large that has not fully arrived is received into a pooled
/// buffer (see `buffers`).
const BIG_WRITE_BYTES: u32 = 128 << 10;
/// What one [`receive`] on a TLS stream reads at most before the loop looks at replies.
const DRAIN_BYTES_MAX: usize = 4 << 20;
/// A handed-back reply this large is sent as is rather than copied into the batch.
const BIG_REPLY_BYTES: usize = 64 << 10;

/// What one turn of the connection loop sends.
struct Output {
    /// Small complete replies, batched.
    replies: BytesMut,
    /// Large complete replies, sent without copying.
    chunks: Vec<Bytes>,
    /// Bytes in `chunks`.
    chunk_bytes: u64,
}

impl Output {
    fn push(&mut self, reply: Bytes) {
        if reply.len() >= BIG_REPLY_BYTES {
            self.chunk_bytes += reply.len() as u64;
            self.chunks.push(reply);
        } else {
            self.replies.extend_from_slice(&reply);
        }
    }

    async fn send<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> std::io::Result<()> {
        if !self.replies.is_empty() {
            stream.write_all(&self.replies).await?;
            self.replies.clear();
            if self.replies.capacity() > OUTPUT_KEEP_BYTES {
                self.replies = BytesMut::with_capacity(INPUT_ROOM_BYTES);
            }
        }
        for chunk in self.chunks.drain(..) {
            stream.write_all(&chunk).await?;
            self.chunk_bytes -= chunk.len() as u64;
        }
        // TLS holds the last records until flushed (a no-op on a plain socket).
        stream.flush().await
    }
}

/// The transmission phase of one connection.
///
/// One task owns the socket. Each turn it parses every complete request in its input
/// buffer, answers the quick ones by appending to its output buffer (a cached read's data
/// is read straight into that buffer), hands the slow ones to the blocking pool or the
/// volume's sync thread, writes the output in one call, and then waits for more input or
/// for a reply from elsewhere. Requests handed off are bounded by
/// `NBD_REQUESTS_IN_FLIGHT_MAX`; at the bound it stops parsing until one finishes.
async fn transmission<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    mut input: BytesMut,
    session: Session,
    mut shutdown: watch::Receiver<bool>,
    buffers: BufferPool,
    idle_timeout: Option<Duration>,
    drain: bool,
) -> Result<(), ConnError> {
    let Session { export, structured, block_status, size, .. } = session;
    let Export { name, volume, group_sync, read_only, mut closed, attachment, .. } = export;
    let (tx, mut rx) = mpsc::channel(NBD_REQUESTS_IN_FLIGHT_MAX);
    let asynchronous = volume.asynchronous();
    let shared =
        Arc::new(Shared { volume, asynchronous, group_sync, name, structured, tx, buffers });
    let mut ctx = Ctx { shared, read_only, block_status, size, writes: Vec::new() };
    let mut output = Output {
        replies: BytesMut::with_capacity(INPUT_ROOM_BYTES),
        chunks: Vec::new(),
        chunk_bytes: 0,
    };
    let mut state = Input::Requests;
    let mut in_flight = InFlight::default();
    let mut stopping = false;
    // The idle check: one timer for the connection's life, looked at when it fires (no
    // timer work per request). Idle means no input since the last look and nothing in
    // flight.
    let idle_every = idle_timeout.unwrap_or(Duration::from_secs(u64::from(u32::MAX)));
    let idle = tokio::time::sleep(idle_every);
    tokio::pin!(idle);
    let mut received: u64 = 0;
    let mut received_at_last_look: u64 = 0;

    let ended = loop {
        while let Ok((reply, bytes)) = rx.try_recv() {
            output.push(reply);
            in_flight.finish(bytes);
        }
        if !stopping {
            in_flight.held = output.chunk_bytes;
            stopping = ctx.parse(&mut input, &mut output.replies, &mut state, &mut in_flight)?;
        }
        // A forced close must not wait for a client that stopped reading.
        tokio::select! {
            biased;
            _ = signalled(&mut closed) => break Ended::Forced,
            sent = output.send(&mut stream) => sent?,
        }
        if stopping && in_flight.count == 0 {
            break Ended::Graceful;
        }
        if input.capacity() - input.len() < INPUT_ROOM_BYTES / 4 {
            input.reserve(INPUT_ROOM_BYTES);
        }
        let can_read = !stopping && !in_flight.full();
        tokio::select! {
            biased;
            _ = signalled(&mut closed) => break Ended::Forced,
            _ = signalled(&mut shutdown), if !stopping => stopping = true,
            Some((reply, bytes)) = rx.recv() => {
                output.push(reply);
                in_flight.finish(bytes);
            }
            read = receive(&mut stream, &mut input, &mut state, drain), if can_read => {
                // EOF: the client hung up; let what it started finish, then close.
                match read? {
                    0 => stopping = true,
                    n => received += n as u64,
                }
            }
            () = &mut idle, if idle_timeout.is_some() => {
                if received == received_at_last_look && in_flight.count == 0 {
                    tracing::debug!(volume = %ctx.shared.name, "NBD connection idle: closing");
                    break Ended::Graceful;
                }
                received_at_last_look = received;
                idle.as_mut().reset(tokio::time::Instant::now() + idle_every);
            }
        }
    };
    drop(attachment);
    if matches!(ended, Ended::Graceful) {
        let _ = stream.shutdown().await;
    }
    Ok(())
}

/// Reads from the socket into the pending payload buffer or else the input buffer.
/// Cancel-safe: a poll that read anything returns it at once.
///
/// `drain`: go on reading what the stream has ready, up to [`DRAIN_BYTES_MAX`] (and never
/// growing the input buffer). A TLS stream yields one record (at most 16 KiB) a read, so a
/// 1 MiB WRITE would otherwise take 64 turns of the connection loop; a plain socket gives
/// all it has in one read, where a second would only cost a system call.
async fn receive<S: AsyncRead + Unpin>(
    stream: &mut S,
    input: &mut BytesMut,
    state: &mut Input,
    drain: bool,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut total = 0;
        loop {
            let polled = match state {
                Input::Payload { req, buffer, filled } => {
                    let end = req.length as usize;
                    if total > 0 && *filled == end {
                        return Poll::Ready(Ok(total));
                    }
                    let read = stream.read(&mut buffer.as_mut()[*filled..end]);
                    tokio::pin!(read);
                    let polled = read.poll(cx);
                    if let Poll::Ready(Ok(n)) = polled {
                        *filled += n;
                    }
                    polled
                }
                _ => {
                    if total > 0 && input.capacity() == input.len() {
                        return Poll::Ready(Ok(total));
                    }
                    let read = stream.read_buf(input);
                    tokio::pin!(read);
                    read.poll(cx)
                }
            };
            match polled {
                // EOF (when nothing came before it).
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(total)),
                Poll::Ready(Ok(n)) => {
                    total += n;
                    if !drain || total >= DRAIN_BYTES_MAX {
                        return Poll::Ready(Ok(total));
                    }
                }
                // What was read first; the error comes again at the next read.
                Poll::Ready(Err(_)) if total > 0 => return Poll::Ready(Ok(total)),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if total > 0 => return Poll::Ready(Ok(total)),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

struct Ctx {
    shared: Arc<Shared>,
    read_only: bool,
    block_status: bool,
    /// The size the client was told; requests are checked against the smaller of it and
    /// the volume's current size (a shrink protects itself; a grow shows on reconnect).
    size: u64,
    /// An asynchronous volume's writes parsed in this pass over the input, submitted
    /// together at its end (`BlockVolume::submit_writes`).
    writes: Vec<(Request, Bytes)>,
}

impl Ctx {
    fn size(&self) -> u64 {
        self.size.min(self.shared.volume.size_bytes())
    }

    fn in_range(&self, req: &Request) -> bool {
        req.offset.checked_add(u64::from(req.length)).is_some_and(|end| end <= self.size())
    }

    fn error(&self, out: &mut BytesMut, req: &Request, error: u32, message: &str) {
        put_error(out, self.shared.structured, req.cookie, error, message);
    }

    /// Handles the complete requests in `input` until it needs more input or reaches the
    /// in-flight bound. Returns true once the client asked to disconnect.
    fn parse(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        state: &mut Input,
        in_flight: &mut InFlight,
    ) -> Result<bool, ConnError> {
        let parsed = self.parse_requests(input, out, state, in_flight);
        self.submit_writes();
        parsed
    }

    /// Submits the writes [`Ctx::parse`] gathered: one alone as a request of its own,
    /// several together.
    fn submit_writes(&mut self) {
        let mut writes = std::mem::take(&mut self.writes);
        let (sh, volume) = (self.shared.clone(), self.shared.volume.clone());
        let op = |req: &Request, data: Bytes| {
            // FUA goes with the write (the volume makes it durable in the same trip).
            IoOp::Write { offset: req.offset, data, fua: req.flags & cflags::FUA != 0 }
        };
        match writes.len() {
            0 => {}
            1 => {
                let (req, data) = writes.pop().expect("one");
                tokio::spawn(async move {
                    let written = volume.submit(op(&req, data)).await;
                    sh.reply_done(&req, written.map(drop));
                });
            }
            _ => {
                let ops = writes.iter().map(|(req, data)| op(req, data.clone())).collect();
                tokio::spawn(async move {
                    let written = volume.submit_writes(ops).await;
                    for ((req, _), result) in writes.iter().zip(written) {
                        sh.reply_done(req, result.map(drop));
                    }
                });
            }
        }
    }

    fn parse_requests(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        state: &mut Input,
        in_flight: &mut InFlight,
    ) -> Result<bool, ConnError> {
        loop {
            if let Input::Payload { req, filled, .. } = state {
                // At the in-flight bound the write waits, whole, for a reply to come back:
                // the reply channel only has room for that many.
                if *filled < req.length as usize || in_flight.full() {
                    return Ok(false);
                }
                let Input::Payload { req, buffer, .. } = std::mem::replace(state, Input::Requests)
                else {
                    unreachable!("matched above")
                };
                if self.dispatch(req, buffer.freeze(), out) {
                    in_flight.start(&req);
                }
            }
            if let Input::Discard { left, cookie, length } = state {
                let n = (*left).min(input.len() as u64);
                input.advance(n as usize);
                *left -= n;
                if *left > 0 {
                    return Ok(false);
                }
                let msg = format!("write of {length} bytes exceeds the maximum payload");
                put_error(out, self.shared.structured, *cookie, errno::EINVAL, &msg);
                *state = Input::Requests;
            }
            if in_flight.full() || in_flight.holds_enough(out) || input.len() < Request::SIZE {
                return Ok(false);
            }
            let header: &[u8; Request::SIZE] =
                input[..Request::SIZE].try_into().expect("length checked");
            let req = Request::decode(header)?;
            let mut payload = Bytes::new();
            if req.kind == cmd::WRITE {
                if req.length > NBD_PAYLOAD_DISCARD_BYTES_MAX {
                    let msg = format!("write payload of {} bytes", req.length);
                    return Err(ConnError::Protocol(msg));
                }
                if req.length > NBD_PAYLOAD_BYTES_MAX {
                    input.advance(Request::SIZE);
                    let (left, cookie, length) = (u64::from(req.length), req.cookie, req.length);
                    *state = Input::Discard { left, cookie, length };
                    continue;
                }
                let needed = Request::SIZE + req.length as usize;
                if input.len() < needed && req.length >= BIG_WRITE_BYTES {
                    // Receive the rest straight into a reusable buffer, not into a fresh
                    // allocation behind the input buffer.
                    input.advance(Request::SIZE);
                    let mut buffer = self.shared.buffers.take(req.length as usize);
                    let filled = input.len();
                    buffer.as_mut()[..filled].copy_from_slice(input);
                    input.clear();
                    *state = Input::Payload { req, buffer, filled };
                    return Ok(false);
                }
                if input.len() < needed {
                    input.reserve(needed - input.len());
                    return Ok(false);
                }
                input.advance(Request::SIZE);
                payload = input.split_to(req.length as usize).freeze();
            } else {
                input.advance(Request::SIZE);
            }
            if req.kind == cmd::DISC {
                return Ok(true);
            }
            if self.dispatch(req, payload, out) {
                in_flight.start(&req);
            }
        }
    }

    /// Handles one request. Returns true if it was handed off (its reply comes later).
    fn dispatch(&mut self, req: Request, payload: Bytes, out: &mut BytesMut) -> bool {
        if req.flags & !Request::allowed_flags(req.kind) != 0 {
            let msg = format!("flags {:#x} are not valid for command {}", req.flags, req.kind);
            self.error(out, &req, errno::EINVAL, &msg);
            return false;
        }
        match req.kind {
            cmd::READ => self.read(req, out),
            cmd::WRITE => self.write(req, payload, out),
            cmd::FLUSH => {
                self.shared.sync_then_reply(req);
                true
            }
            cmd::TRIM | cmd::WRITE_ZEROES => self.zero(req, out),
            cmd::BLOCK_STATUS => {
                self.block_status(req, out);
                false
            }
            cmd::CACHE => {
                if !self.in_range(&req) {
                    self.error(out, &req, errno::EINVAL, "CACHE past the end of the export");
                } else {
                    match self.shared.volume.prefetch(req.offset, u64::from(req.length)) {
                        Ok(()) => put_ok(out, req.cookie),
                        Err(e) => self.shared.put_store_error(out, &req, &e),
                    }
                }
                false
            }
            other => {
                self.error(out, &req, errno::EINVAL, &format!("unknown command {other}"));
                false
            }
        }
    }

    fn read(&self, req: Request, out: &mut BytesMut) -> bool {
        let sh = &self.shared;
        if req.length > NBD_PAYLOAD_BYTES_MAX {
            let msg = format!("read of {} bytes exceeds the maximum payload", req.length);
            self.error(out, &req, errno::EINVAL, &msg);
            return false;
        }
        if !self.in_range(&req) {
            self.error(out, &req, errno::EINVAL, "read past the end of the export");
            return false;
        }
        if sh.structured && req.length == 0 {
            codec::put_chunk_header(out, reply::FLAG_DONE, reply::NONE, req.cookie, 0);
            return false;
        }
        if sh.asynchronous {
            let (sh, volume) = (sh.clone(), sh.volume.clone());
            let op = IoOp::Read { offset: req.offset, length: req.length as usize };
            tokio::spawn(async move {
                let read = volume.submit(op).await;
                let mut out = BytesMut::with_capacity(32 + req.length as usize);
                match read {
                    Ok(data) => {
                        put_read_header(&mut out, sh.structured, &req);
                        out.extend_from_slice(&data);
                    }
                    Err(e) => sh.put_store_error(&mut out, &req, &e),
                }
                sh.finish(&req, out);
            });
            return true;
        }
        if req.length >= BIG_READ_BYTES {
            let mut head = BytesMut::with_capacity(28);
            let data_start = put_read_header(&mut head, sh.structured, &req);
            let mut buf = sh.buffers.take(data_start + req.length as usize);
            buf.as_mut()[..data_start].copy_from_slice(&head);
            return match sh.volume.try_read_at_nowait(&mut buf.as_mut()[data_start..], req.offset) {
                Ok(true) => {
                    sh.finish_bytes(&req, buf.freeze());
                    true
                }
                Ok(false) => self.read_blocking(req),
                Err(e) => {
                    sh.put_store_error(out, &req, &e);
                    false
                }
            };
        }
        // Try the cache first, reading straight into the output buffer.
        let start = out.len();
        let data_start = put_read_header(out, sh.structured, &req);
        out.resize(data_start + req.length as usize, 0);
        match sh.volume.try_read_at_nowait(&mut out[data_start..], req.offset) {
            Ok(true) => return false,
            Ok(false) => out.truncate(start),
            Err(e) => {
                out.truncate(start);
                sh.put_store_error(out, &req, &e);
                return false;
            }
        }
        self.read_blocking(req)
    }

    /// Reads on the blocking pool (the data is not cached); the reply comes later.
    fn read_blocking(&self, req: Request) -> bool {
        let sh = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let mut head = BytesMut::with_capacity(28);
            let data_start = put_read_header(&mut head, sh.structured, &req);
            let mut buf = sh.buffers.take(data_start + req.length as usize);
            buf.as_mut()[..data_start].copy_from_slice(&head);
            match sh.volume.read_at(&mut buf.as_mut()[data_start..], req.offset) {
                Ok(()) => sh.finish_bytes(&req, buf.freeze()),
                Err(e) => {
                    head.clear();
                    sh.put_store_error(&mut head, &req, &e);
                    sh.finish(&req, head);
                }
            }
        });
        true
    }

    fn write(&mut self, req: Request, data: Bytes, out: &mut BytesMut) -> bool {
        let sh = &self.shared;
        if self.read_only {
            self.error(out, &req, errno::EPERM, "the export is read-only");
            return false;
        }
        if !self.in_range(&req) {
            self.error(out, &req, errno::ENOSPC, "write past the end of the export");
            return false;
        }
        if sh.asynchronous {
            self.writes.push((req, data));
            return true;
        }
        match sh.volume.try_write_at_nowait(&data, req.offset) {
            Ok(true) if req.flags & cflags::FUA == 0 => {
                put_ok(out, req.cookie);
                false
            }
            Ok(true) => {
                sh.sync_then_reply(req);
                true
            }
            Ok(false) => {
                let sh = sh.clone();
                tokio::task::spawn_blocking(move || {
                    let written = sh.volume.write_at(&data, req.offset);
                    sh.write_done(req, written);
                });
                true
            }
            Err(e) => {
                sh.put_store_error(out, &req, &e);
                false
            }
        }
    }

    fn zero(&self, req: Request, out: &mut BytesMut) -> bool {
        let trim = req.kind == cmd::TRIM;
        if self.read_only {
            self.error(out, &req, errno::EPERM, "the export is read-only");
            return false;
        }
        if !self.in_range(&req) {
            let code = if trim { errno::EINVAL } else { errno::ENOSPC };
            self.error(out, &req, code, "range past the end of the export");
            return false;
        }
        let mode =
            if req.flags & cflags::NO_HOLE != 0 { ZeroMode::Allocate } else { ZeroMode::MayTrim };
        let (offset, length) = (req.offset, u64::from(req.length));
        let op =
            if trim { IoOp::Trim { offset, length } } else { IoOp::Zero { offset, length, mode } };
        // On the blocking pool, or as the volume's future (`BlockVolume::submit`).
        let (sh, volume) = (self.shared.clone(), self.shared.volume.clone());
        tokio::spawn(async move {
            let done = volume.submit(op).await;
            sh.write_done(req, done.map(drop));
        });
        true
    }

    fn block_status(&self, req: Request, out: &mut BytesMut) {
        if !self.shared.structured || !self.block_status {
            let msg = "BLOCK_STATUS needs base:allocation selected with SET_META_CONTEXT";
            return self.error(out, &req, errno::EINVAL, msg);
        }
        if req.length == 0 || !self.in_range(&req) {
            let msg = "BLOCK_STATUS range is empty or past the end";
            return self.error(out, &req, errno::EINVAL, msg);
        }
        let extents_max =
            if req.flags & cflags::REQ_ONE != 0 { 1 } else { NBD_BLOCK_STATUS_EXTENTS_MAX };
        let volume = &self.shared.volume;
        let extents = match volume.extents(req.offset, u64::from(req.length), extents_max) {
            Ok(extents) => extents,
            Err(e) => return self.shared.put_store_error(out, &req, &e),
        };
        let payload_length = 4 + 8 * extents.len() as u32;
        codec::put_chunk_header(
            out,
            reply::FLAG_DONE,
            reply::BLOCK_STATUS,
            req.cookie,
            payload_length,
        );
        out.put_u32(codec::BASE_ALLOCATION_ID);
        for extent in &extents {
            // Extents lie inside the request, whose length is a u32.
            out.put_u32(u32::try_from(extent.length).expect("extent within a u32 request"));
            let mut flags = 0;
            if extent.hole {
                flags |= codec::STATE_HOLE;
            }
            if extent.zero {
                flags |= codec::STATE_ZERO;
            }
            out.put_u32(flags);
        }
    }
}

/// Appends the header of a successful READ reply; returns where the data starts.
fn put_read_header(out: &mut BytesMut, structured: bool, req: &Request) -> usize {
    if structured {
        let chunk_length = 8 + req.length;
        codec::put_chunk_header(
            out,
            reply::FLAG_DONE,
            reply::OFFSET_DATA,
            req.cookie,
            chunk_length,
        );
        out.put_u64(req.offset);
    } else {
        codec::put_simple_reply(out, 0, req.cookie);
    }
    out.len()
}
