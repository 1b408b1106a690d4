//! The NBD server: handshake (fixed newstyle) and transmission, one task per connection.
//!
//! Transmission shape: the connection task reads requests in order and either answers them
//! at once (cached reads and writes, BLOCK_STATUS, errors) or hands them to a spawned task
//! (device I/O, FLUSH, FUA), so replies leave out of order, matched by cookie. A single
//! writer task owns the socket's write half and batches replies into few syscalls. At most
//! `NBD_REQUESTS_IN_FLIGHT_MAX` requests are in flight per connection; the reader stops
//! reading when that many wait, which bounds memory per connection.

use crate::codec::{self, cflags, cmd, errno, opt, rep, reply, tflags, DecodeError, Request};
use bytes::{BufMut, Bytes, BytesMut};
use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use strata_io::{BlockVolume, GroupSync, StoreError, ZeroMode};
use strata_types::limits::{
    BLOCK_SIZE_BYTES, NBD_BLOCK_STATUS_EXTENTS_MAX, NBD_CONNECTIONS_MAX,
    NBD_OPTIONS_PER_HANDSHAKE_MAX, NBD_OPTION_BYTES_MAX, NBD_PAYLOAD_BYTES_MAX,
    NBD_PAYLOAD_DISCARD_BYTES_MAX, NBD_REQUESTS_IN_FLIGHT_MAX,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

/// A client that has not finished the handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// An option payload above this is not even read: the connection is closed.
const OPTION_DISCARD_BYTES_MAX: u32 = 16 << 20;

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
    /// Every export, for NBD_OPT_LIST.
    fn list(&self) -> Vec<ExportSummary>;
    /// Opens an export by name; the error is a message for the client.
    fn open(&self, name: &str) -> Result<Export, String>;
}

/// Serves NBD on `listener` until `shutdown` becomes true; then stops accepting, lets every
/// connection finish its in-flight requests and send their replies, and returns.
pub async fn serve(
    listener: TcpListener,
    provider: Arc<dyn ExportProvider>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    let for_connections = shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if connections.len() >= NBD_CONNECTIONS_MAX {
                        tracing::warn!(%peer, "too many NBD connections; refusing");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let stop = for_connections.clone();
                    connections.spawn(connection(stream, peer, provider.clone(), stop));
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

/// Resolves once the flag is set (or its sender is gone, which also means "stop").
async fn signalled(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    provider: Arc<dyn ExportProvider>,
    shutdown: watch::Receiver<bool>,
) {
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    let negotiated =
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut rd, &mut wr, provider.as_ref()))
            .await;
    let session = match negotiated {
        Ok(Ok(Some(session))) => session,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, "NBD handshake ended: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "NBD handshake timed out");
            return;
        }
    };
    tracing::debug!(%peer, export = %session.export.name, "NBD client attached");
    if let Err(e) = transmission(rd, wr, session, shutdown).await {
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
}

type Reader = BufReader<OwnedReadHalf>;
type Writer = BufWriter<OwnedWriteHalf>;

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
    wr: &mut Writer,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> Result<(), ConnError> {
    let mut out = BytesMut::with_capacity(20 + data.len());
    codec::put_option_reply(&mut out, option, reply_type, data);
    wr.write_all(&out).await?;
    Ok(())
}

/// Runs option haggling. Returns the session to serve, or `None` when the client ended
/// the handshake cleanly (ABORT) or must be dropped without a reply.
async fn handshake(
    rd: &mut Reader,
    wr: &mut Writer,
    provider: &dyn ExportProvider,
) -> Result<Option<Session>, ConnError> {
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(codec::NBD_MAGIC);
    hello.put_u64(codec::IHAVEOPT);
    hello.put_u16(codec::FLAG_FIXED_NEWSTYLE | codec::FLAG_NO_ZEROES);
    wr.write_all(&hello).await?;
    wr.flush().await?;

    let client_flags = rd.read_u32().await?;
    if client_flags & !(codec::FLAG_C_FIXED_NEWSTYLE | codec::FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & codec::FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // The export for which `base:allocation` is selected, if any.
    let mut meta_export: Option<String> = None;

    for _ in 0..NBD_OPTIONS_PER_HANDSHAKE_MAX {
        wr.flush().await?;
        let mut header = [0u8; codec::OptionHeader::SIZE];
        rd.read_exact(&mut header).await?;
        let header = codec::OptionHeader::decode(&header)?;
        let option = header.option;
        if header.length > NBD_OPTION_BYTES_MAX {
            if option == opt::EXPORT_NAME || header.length > OPTION_DISCARD_BYTES_MAX {
                return Err(ConnError::Protocol(format!("option of {} bytes", header.length)));
            }
            discard(rd, u64::from(header.length)).await?;
            send_option_reply(wr, option, rep::ERR_TOO_BIG, b"option data too large").await?;
            continue;
        }
        let mut data = vec![0u8; header.length as usize];
        rd.read_exact(&mut data).await?;

        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8(data)
                    .map_err(|_| ConnError::Protocol("export name is not UTF-8".into()))?;
                // The spec gives no way to report an error here: close the connection.
                let export = provider.open(&name).map_err(ConnError::Protocol)?;
                let size = export.volume.size_bytes();
                let mut out = BytesMut::with_capacity(134);
                out.put_u64(size);
                out.put_u16(transmission_flags(export.read_only));
                if !no_zeroes {
                    out.put_bytes(0, 124);
                }
                wr.write_all(&out).await?;
                wr.flush().await?;
                let block_status = meta_export.as_deref() == Some(name.as_str());
                return Ok(Some(Session { export, structured, block_status, size }));
            }
            opt::ABORT => {
                send_option_reply(wr, option, rep::ACK, &[]).await?;
                wr.flush().await?;
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    send_option_reply(wr, option, rep::ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                for export in provider.list() {
                    let mut d = Vec::with_capacity(4 + export.name.len());
                    d.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(export.name.as_bytes());
                    d.extend_from_slice(export.description.as_bytes());
                    send_option_reply(wr, option, rep::SERVER, &d).await?;
                }
                send_option_reply(wr, option, rep::ACK, &[]).await?;
            }
            opt::INFO | opt::GO => {
                let request = match codec::InfoRequest::decode(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        let msg = format!("malformed INFO/GO: {e}");
                        send_option_reply(wr, option, rep::ERR_INVALID, msg.as_bytes()).await?;
                        continue;
                    }
                };
                let export = match provider.open(&request.name) {
                    Ok(export) => export,
                    Err(message) => {
                        send_option_reply(wr, option, rep::ERR_UNKNOWN, message.as_bytes()).await?;
                        continue;
                    }
                };
                let size = export.volume.size_bytes();
                let info = codec::info_export(size, transmission_flags(export.read_only));
                send_option_reply(wr, option, rep::INFO, &info).await?;
                // Default constraints (minimum 1) because unaligned requests are served
                // correctly; 4 KiB is the efficient size.
                let bs = codec::info_block_size(1, BLOCK_SIZE_BYTES as u32, NBD_PAYLOAD_BYTES_MAX);
                send_option_reply(wr, option, rep::INFO, &bs).await?;
                if request.requests.contains(&codec::info::NAME) {
                    let d = codec::info_string(codec::info::NAME, &export.name);
                    send_option_reply(wr, option, rep::INFO, &d).await?;
                }
                if request.requests.contains(&codec::info::DESCRIPTION) {
                    let d = codec::info_string(codec::info::DESCRIPTION, &export.description);
                    send_option_reply(wr, option, rep::INFO, &d).await?;
                }
                send_option_reply(wr, option, rep::ACK, &[]).await?;
                if option == opt::GO {
                    wr.flush().await?;
                    let block_status = meta_export.as_deref() == Some(request.name.as_str());
                    return Ok(Some(Session { export, structured, block_status, size }));
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    let msg = b"STRUCTURED_REPLY takes no data";
                    send_option_reply(wr, option, rep::ERR_INVALID, msg).await?;
                    continue;
                }
                structured = true;
                send_option_reply(wr, option, rep::ACK, &[]).await?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                if option == opt::SET_META_CONTEXT {
                    meta_export = None; // replaced even when this request fails
                }
                meta_context(wr, option, &data, structured, provider, &mut meta_export).await?;
            }
            _ => {
                let msg = format!("option {option} is not supported by this server");
                send_option_reply(wr, option, rep::ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
    Err(ConnError::Protocol("too many options".into()))
}

async fn meta_context(
    wr: &mut Writer,
    option: u32,
    data: &[u8],
    structured: bool,
    provider: &dyn ExportProvider,
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
    if let Err(message) = provider.open(&request.export) {
        return send_option_reply(wr, option, rep::ERR_UNKNOWN, message.as_bytes()).await;
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

async fn discard(rd: &mut Reader, mut length: u64) -> Result<(), ConnError> {
    let mut sink = vec![0u8; 64 << 10];
    while length > 0 {
        let n = length.min(sink.len() as u64) as usize;
        rd.read_exact(&mut sink[..n]).await?;
        length -= n as u64;
    }
    Ok(())
}

/// A reply on its way to the writer task: header and payload in one buffer (a read's
/// data is read straight into the buffer behind its header, so nothing is copied).
type Outgoing = Bytes;

/// What a request handler needs, shared with spawned tasks.
struct Shared {
    volume: Arc<dyn BlockVolume>,
    group_sync: GroupSync,
    name: String,
    structured: bool,
    tx: mpsc::Sender<Outgoing>,
}

impl Shared {
    async fn send(&self, out: Outgoing) {
        // The writer is gone only when the client is; the reader notices that too.
        let _ = self.tx.send(out).await;
    }

    async fn ok(&self, cookie: u64) {
        let mut head = BytesMut::with_capacity(16);
        codec::put_simple_reply(&mut head, 0, cookie);
        self.send(head.freeze()).await;
    }

    async fn error(&self, cookie: u64, error: u32, message: &str) {
        let mut head = BytesMut::with_capacity(32 + message.len());
        if self.structured {
            codec::put_error_chunk(&mut head, cookie, error, message);
        } else {
            codec::put_simple_reply(&mut head, error, cookie);
        }
        self.send(head.freeze()).await;
    }

    async fn store_error(&self, req: &Request, e: &StoreError) {
        let (code, log) = match e {
            StoreError::OutOfRange { .. } => (errno::EINVAL, false),
            StoreError::NoSpace => (errno::ENOSPC, true),
            StoreError::Unsupported { .. } => (errno::ENOTSUP, false),
            StoreError::Failed | StoreError::Io { .. } | StoreError::NotFound { .. } => {
                (errno::EIO, true)
            }
        };
        if log {
            tracing::error!(volume = %self.name, offset = req.offset, length = req.length,
                command = req.kind, "I/O failed: {e}");
        }
        self.error(req.cookie, code, &e.to_string()).await;
    }

    /// Replies to a write-type command, syncing first when FUA asks for it.
    async fn write_done(&self, req: &Request, result: Result<(), StoreError>) {
        match result {
            Ok(()) if req.flags & cflags::FUA != 0 => self.flush(req).await,
            Ok(()) => self.ok(req.cookie).await,
            Err(e) => self.store_error(req, &e).await,
        }
    }

    async fn flush(&self, req: &Request) {
        match self.group_sync.sync().await {
            Ok(()) => self.ok(req.cookie).await,
            Err(e) => {
                tracing::error!(volume = %self.name, "flush failed: {e}");
                self.error(req.cookie, errno::EIO, &format!("flush failed: {e}")).await;
            }
        }
    }
}

async fn writer_task(mut wr: Writer, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        if write_one(&mut wr, &out).await.is_err() {
            return;
        }
        // Gather whatever else is ready into the same syscall.
        while let Ok(out) = rx.try_recv() {
            if write_one(&mut wr, &out).await.is_err() {
                return;
            }
        }
        if wr.flush().await.is_err() {
            return;
        }
    }
    let _ = wr.flush().await;
    let _ = wr.shutdown().await;
}

async fn write_one(wr: &mut Writer, out: &Outgoing) -> std::io::Result<()> {
    wr.write_all(out).await
}

async fn transmission(
    mut rd: Reader,
    wr: Writer,
    session: Session,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ConnError> {
    let Session { export, structured, block_status, size } = session;
    let Export { name, volume, group_sync, read_only, mut closed, attachment, .. } = export;
    let (tx, rx) = mpsc::channel(NBD_REQUESTS_IN_FLIGHT_MAX);
    let writer = tokio::spawn(writer_task(wr, rx));
    let shared = Arc::new(Shared { volume, group_sync, name, structured, tx });
    let in_flight = Arc::new(Semaphore::new(NBD_REQUESTS_IN_FLIGHT_MAX));
    let ctx = Ctx { shared: shared.clone(), read_only, block_status, size };

    let result = loop {
        let permit = in_flight.clone().acquire_owned().await.expect("never closed");
        let mut header = [0u8; Request::SIZE];
        tokio::select! {
            biased;
            _ = signalled(&mut closed) => break Ok(Ended::Forced),
            _ = signalled(&mut shutdown) => break Ok(Ended::Graceful),
            read = rd.read_exact(&mut header) => {
                if let Err(e) = read {
                    // EOF between requests is a client's hard disconnect: not an error.
                    break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        Ok(Ended::Graceful)
                    } else {
                        Err(e.into())
                    };
                }
            }
        }
        let req = match Request::decode(&header) {
            Ok(req) => req,
            Err(e) => break Err(e.into()),
        };
        if req.kind == cmd::DISC {
            break Ok(Ended::Graceful);
        }
        if let Err(e) = ctx.dispatch(&mut rd, req, permit).await {
            break Err(e);
        }
    };
    if matches!(result, Ok(Ended::Graceful)) {
        // Every request already read gets its reply before we close.
        let _all = in_flight.acquire_many(NBD_REQUESTS_IN_FLIGHT_MAX as u32).await;
    } else {
        writer.abort();
    }
    drop(ctx);
    drop(shared);
    let _ = writer.await;
    drop(attachment);
    result.map(|_| ())
}

enum Ended {
    Graceful,
    Forced,
}

struct Ctx {
    shared: Arc<Shared>,
    read_only: bool,
    block_status: bool,
    /// The size the client was told; requests are checked against the smaller of it and
    /// the volume's current size (a shrink protects itself; a grow shows on reconnect).
    size: u64,
}

impl Ctx {
    fn size(&self) -> u64 {
        self.size.min(self.shared.volume.size_bytes())
    }

    fn in_range(&self, req: &Request) -> bool {
        req.offset.checked_add(u64::from(req.length)).is_some_and(|end| end <= self.size())
    }

    async fn dispatch(
        &self,
        rd: &mut Reader,
        req: Request,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), ConnError> {
        let sh = &self.shared;
        let bad_flags = req.flags & !Request::allowed_flags(req.kind) != 0;
        match req.kind {
            cmd::WRITE => return self.write(rd, req, bad_flags, permit).await,
            _ if bad_flags => {
                let msg = format!("flags {:#x} are not valid for command {}", req.flags, req.kind);
                sh.error(req.cookie, errno::EINVAL, &msg).await;
            }
            cmd::READ => self.read(req, permit).await,
            cmd::FLUSH => {
                let sh = sh.clone();
                tokio::spawn(async move {
                    sh.flush(&req).await;
                    drop(permit);
                });
            }
            cmd::TRIM | cmd::WRITE_ZEROES => self.zero(req, permit).await,
            cmd::BLOCK_STATUS => self.block_status(req).await,
            cmd::CACHE => {
                if !self.in_range(&req) {
                    sh.error(req.cookie, errno::EINVAL, "CACHE past the end of the export").await;
                } else {
                    match sh.volume.prefetch(req.offset, u64::from(req.length)) {
                        Ok(()) => sh.ok(req.cookie).await,
                        Err(e) => sh.store_error(&req, &e).await,
                    }
                }
            }
            other => {
                let msg = format!("unknown command {other}");
                sh.error(req.cookie, errno::EINVAL, &msg).await;
            }
        }
        Ok(())
    }

    async fn read(&self, req: Request, permit: OwnedSemaphorePermit) {
        let sh = &self.shared;
        if req.length > NBD_PAYLOAD_BYTES_MAX {
            let msg = format!("read of {} bytes exceeds the maximum payload", req.length);
            return sh.error(req.cookie, errno::EINVAL, &msg).await;
        }
        if !self.in_range(&req) {
            return sh.error(req.cookie, errno::EINVAL, "read past the end of the export").await;
        }
        let length = req.length as usize;
        let head_length = if sh.structured { 28 } else { 16 };
        let mut buf = BytesMut::with_capacity(head_length + length);
        if sh.structured {
            if length == 0 {
                codec::put_chunk_header(&mut buf, reply::FLAG_DONE, reply::NONE, req.cookie, 0);
                return sh.send(buf.freeze()).await;
            }
            let chunk_length = 8 + req.length;
            codec::put_chunk_header(
                &mut buf,
                reply::FLAG_DONE,
                reply::OFFSET_DATA,
                req.cookie,
                chunk_length,
            );
            buf.put_u64(req.offset);
        } else {
            codec::put_simple_reply(&mut buf, 0, req.cookie);
        }
        buf.resize(head_length + length, 0);
        match sh.volume.try_read_at_nowait(&mut buf[head_length..], req.offset) {
            Ok(true) => sh.send(buf.freeze()).await,
            Ok(false) => {
                let sh = sh.clone();
                tokio::spawn(async move {
                    let volume = sh.volume.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        let r = volume.read_at(&mut buf[head_length..], req.offset);
                        r.map(|()| buf)
                    })
                    .await;
                    match read {
                        Ok(Ok(buf)) => sh.send(buf.freeze()).await,
                        Ok(Err(e)) => sh.store_error(&req, &e).await,
                        Err(e) => sh.error(req.cookie, errno::EIO, &e.to_string()).await,
                    }
                    drop(permit);
                });
            }
            Err(e) => sh.store_error(&req, &e).await,
        }
    }

    async fn write(
        &self,
        rd: &mut Reader,
        req: Request,
        bad_flags: bool,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), ConnError> {
        let sh = &self.shared;
        if req.length > NBD_PAYLOAD_DISCARD_BYTES_MAX {
            return Err(ConnError::Protocol(format!("write payload of {} bytes", req.length)));
        }
        if req.length > NBD_PAYLOAD_BYTES_MAX {
            discard(rd, u64::from(req.length)).await?;
            let msg = format!("write of {} bytes exceeds the maximum payload", req.length);
            sh.error(req.cookie, errno::EINVAL, &msg).await;
            return Ok(());
        }
        let mut data = BytesMut::zeroed(req.length as usize);
        rd.read_exact(&mut data).await?;
        if bad_flags {
            let msg = format!("flags {:#x} are not valid for WRITE", req.flags);
            sh.error(req.cookie, errno::EINVAL, &msg).await;
        } else if self.read_only {
            sh.error(req.cookie, errno::EPERM, "the export is read-only").await;
        } else if !self.in_range(&req) {
            sh.error(req.cookie, errno::ENOSPC, "write past the end of the export").await;
        } else {
            let data = data.freeze();
            match sh.volume.try_write_at_nowait(&data, req.offset) {
                Ok(true) if req.flags & cflags::FUA == 0 => sh.ok(req.cookie).await,
                Ok(true) => {
                    let sh = sh.clone();
                    tokio::spawn(async move {
                        sh.write_done(&req, Ok(())).await;
                        drop(permit);
                    });
                }
                Ok(false) => {
                    let sh = sh.clone();
                    tokio::spawn(async move {
                        let volume = sh.volume.clone();
                        let written =
                            tokio::task::spawn_blocking(move || volume.write_at(&data, req.offset))
                                .await
                                .unwrap_or_else(|e| Err(join_failed(e)));
                        sh.write_done(&req, written).await;
                        drop(permit);
                    });
                }
                Err(e) => sh.store_error(&req, &e).await,
            }
        }
        Ok(())
    }

    async fn zero(&self, req: Request, permit: OwnedSemaphorePermit) {
        let sh = &self.shared;
        let trim = req.kind == cmd::TRIM;
        if self.read_only {
            return sh.error(req.cookie, errno::EPERM, "the export is read-only").await;
        }
        if !self.in_range(&req) {
            let code = if trim { errno::EINVAL } else { errno::ENOSPC };
            return sh.error(req.cookie, code, "range past the end of the export").await;
        }
        let mode =
            if req.flags & cflags::NO_HOLE != 0 { ZeroMode::Allocate } else { ZeroMode::MayTrim };
        let sh = sh.clone();
        tokio::spawn(async move {
            let volume = sh.volume.clone();
            let (offset, length) = (req.offset, u64::from(req.length));
            let done = tokio::task::spawn_blocking(move || {
                if trim {
                    volume.trim(offset, length)
                } else {
                    volume.write_zeroes(offset, length, mode)
                }
            })
            .await
            .unwrap_or_else(|e| Err(join_failed(e)));
            sh.write_done(&req, done).await;
            drop(permit);
        });
    }

    async fn block_status(&self, req: Request) {
        let sh = &self.shared;
        if !sh.structured || !self.block_status {
            let msg = "BLOCK_STATUS needs base:allocation selected with SET_META_CONTEXT";
            return sh.error(req.cookie, errno::EINVAL, msg).await;
        }
        if req.length == 0 || !self.in_range(&req) {
            return sh
                .error(req.cookie, errno::EINVAL, "BLOCK_STATUS range is empty or past the end")
                .await;
        }
        let extents_max =
            if req.flags & cflags::REQ_ONE != 0 { 1 } else { NBD_BLOCK_STATUS_EXTENTS_MAX };
        let extents = match sh.volume.extents(req.offset, u64::from(req.length), extents_max) {
            Ok(extents) => extents,
            Err(e) => return sh.store_error(&req, &e).await,
        };
        let payload_length = 4 + 8 * extents.len() as u32;
        let mut head = BytesMut::with_capacity(20 + payload_length as usize);
        codec::put_chunk_header(
            &mut head,
            reply::FLAG_DONE,
            reply::BLOCK_STATUS,
            req.cookie,
            payload_length,
        );
        head.put_u32(codec::BASE_ALLOCATION_ID);
        for extent in &extents {
            // Extents lie inside the request, whose length is a u32.
            head.put_u32(u32::try_from(extent.length).expect("extent within a u32 request"));
            let mut flags = 0;
            if extent.hole {
                flags |= codec::STATE_HOLE;
            }
            if extent.zero {
                flags |= codec::STATE_ZERO;
            }
            head.put_u32(flags);
        }
        sh.send(head.freeze()).await;
    }
}

fn join_failed(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io { op: "I/O task", source: std::io::Error::other(e.to_string()) }
}
