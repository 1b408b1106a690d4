//! The inter-node channel: every connection between two nodes, either plane, runs a Noise
//! handshake first and then carries its bytes as encrypted, authenticated records.
//!
//! ```text
//! handshake message:  0  4  magic "SNX1" (a refusal: "SNX!", then a UTF-8 reason)
//!                     4  2  length (little-endian, at most INTERNODE_HANDSHAKE_BYTES_MAX)
//!                     6  …  Noise message (48 bytes: an ephemeral key and a tag)
//! record:             0  2  length (little-endian, at most INTERNODE_RECORD_BYTES_MAX)
//!                     2  …  ciphertext and its 16-byte tag
//! ```
//! The pattern is `Noise_NNpsk0_25519_AESGCM_SHA256`: no static keys (a node has no
//! identity beyond holding the cluster secret), an ephemeral X25519 key from each side (so
//! each connection's keys are fresh on both sides, and forward secret), and a pre-shared
//! key derived from the cluster secret mixed in before the first message (`psk0`), so the
//! responder refuses an initiator without the secret on its very first message, before
//! it has spent anything but one DH. The prologue names the protocol and version (and
//! the bench-only plaintext mode), so a peer of another version fails the handshake
//! instead of misreading records.
//!
//! The initiator's first record is a fixed confirmation, read by the responder under the
//! same bound and deadline as the handshake: the Noise responder cannot tell a replayed
//! first message from a fresh one, but a replayer cannot open the keys, so until the
//! confirmation opens the connection counts as unauthenticated.
//!
//! After the handshake each direction has its own key and a record counter as the AEAD
//! nonce (never sent): a record replayed later on the same connection, reordered, spliced
//! from another connection (other keys) or sent to another node (other keys) fails its
//! tag, and the connection is closed. A frame of either plane (`SRP1`, `SDP1`, the first
//! bytes inside the channel) is split into records of at most 64 KiB.
//!
//! Before the peer is authenticated nothing longer than `INTERNODE_HANDSHAKE_BYTES_MAX` is
//! read, and the handshake has a deadline (`INTERNODE_HANDSHAKE_TIMEOUT_MS`): the
//! listener's side of that (how many such connections wait at once) is in
//! [`super::listener`].

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use strata_types::limits::{
    INTERNODE_HANDSHAKE_BYTES_MAX, INTERNODE_HANDSHAKE_TIMEOUT_MS, INTERNODE_RECORD_BYTES_MAX,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// The Noise protocol every inter-node connection speaks.
pub const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Names the protocol and its version in the handshake hash.
const PROLOGUE: &[u8] = b"strata inter-node channel v1";
/// Added to the prologue in the bench-only plaintext mode: a node in one mode and a node
/// in the other fail the handshake.
const PROLOGUE_PLAINTEXT: &[u8] = b" (bench: records not encrypted)";
/// Starts each handshake message.
const HELLO: &[u8; 4] = b"SNX1";
/// Starts a refusal: the responder could not authenticate the initiator.
const REFUSAL: &[u8; 4] = b"SNX!";
/// The initiator's first record (its content is fixed; opening it is the proof).
const CONFIRMATION: &[u8] = b"strata channel confirmed";
/// Magic and length before each handshake message.
const HANDSHAKE_HEADER_BYTES: usize = 6;
/// The AEAD tag after each record's ciphertext.
const TAG_BYTES: usize = 16;
/// The length before each record.
const RECORD_HEADER_BYTES: usize = 2;
/// The most plaintext one record carries.
pub const RECORD_PLAIN_BYTES_MAX: usize = INTERNODE_RECORD_BYTES_MAX - TAG_BYTES;
/// Ciphertext a reader buffers (one read takes many records); at least one whole record.
const RAW_BUFFER_BYTES: usize = 256 << 10;
/// Plaintext one `poll_write` seals before writing it out (several records per syscall).
const SEAL_BYTES_MAX: usize = 256 << 10;
/// How long the handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(INTERNODE_HANDSHAKE_TIMEOUT_MS);

const _: () = assert!(RAW_BUFFER_BYTES >= RECORD_HEADER_BYTES + INTERNODE_RECORD_BYTES_MAX);
const _: () = assert!(INTERNODE_RECORD_BYTES_MAX <= u16::MAX as usize);

/// The word the refusal text and the initiator's error end with.
pub const SECRET_HINT: &str = "is this node's secret the cluster's?";

static PLAINTEXT: OnceLock<bool> = OnceLock::new();

/// Bench only: after the handshake (which still authenticates both sides), records are
/// sent in plaintext, to measure what encryption costs. Never for operators: the records
/// are then neither secret nor authenticated. Call before the first connection; returns
/// whether the mode was set.
pub fn bench_plaintext_records() -> bool {
    PLAINTEXT.set(true).is_ok()
}

fn plaintext() -> bool {
    *PLAINTEXT.get_or_init(|| false)
}

/// The pre-shared key the channel authenticates both sides with, derived from the cluster
/// secret.
#[derive(Clone)]
pub struct ChannelKey([u8; 32]);

impl ChannelKey {
    /// Derives the channel's key from the cluster secret's bytes (its own derivation
    /// context: it is no key of anything else).
    pub fn from_secret(secret: &[u8]) -> ChannelKey {
        ChannelKey(blake3::derive_key("strata inter-node channel noise psk v1", secret))
    }
}

impl std::fmt::Debug for ChannelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelKey(..)")
    }
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    /// The deadline passed.
    #[error("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs())]
    TimedOut,
    /// The first bytes are no Strata handshake.
    #[error("not a Strata inter-node handshake")]
    NotStrata,
    /// A handshake message longer than allowed.
    #[error("handshake message of {0} bytes is longer than allowed")]
    TooLong(usize),
    /// The peer does not hold this cluster's secret (or speaks another version).
    #[error("the peer did not authenticate with this cluster's secret ({SECRET_HINT})")]
    Unauthenticated,
    /// The initiator's first record did not open: a replay of another connection's first
    /// handshake message (whoever sent it does not hold that message's ephemeral key).
    #[error("the peer did not confirm the handshake (a replayed handshake message?)")]
    Unconfirmed,
    /// The peer refused our handshake (we do not hold its cluster's secret).
    #[error("refused by the peer: {0}")]
    Refused(String),
}

/// Keys of one connection's two directions, shared by its two halves.
struct Keys {
    transport: snow::StatelessTransportState,
    /// False in the bench-only plaintext mode (the handshake and the confirmation record
    /// are still sealed).
    encrypt: bool,
}

/// An authenticated connection: its reader and writer halves.
pub struct Channel<R = OwnedReadHalf, W = OwnedWriteHalf> {
    /// Reads the peer's records as a byte stream.
    pub reader: ChannelReader<R>,
    /// Writes bytes as records.
    pub writer: ChannelWriter<W>,
}

/// A fresh handshake of this cluster's channel, as the side that connected (`initiator`)
/// or the side that accepted.
fn handshake_state(key: &ChannelKey, initiator: bool) -> snow::HandshakeState {
    let params = NOISE_PATTERN.parse().expect("a valid Noise pattern");
    let prologue = prologue();
    let builder = snow::Builder::new(params)
        .psk(0, &key.0)
        .expect("psk 0 is valid for NNpsk0")
        .prologue(&prologue)
        .expect("a prologue is set once");
    if initiator {
        builder.build_initiator().expect("a valid initiator")
    } else {
        builder.build_responder().expect("a valid responder")
    }
}

fn prologue() -> Vec<u8> {
    let mut p = PROLOGUE.to_vec();
    if plaintext() {
        p.extend_from_slice(PROLOGUE_PLAINTEXT);
    }
    p
}

async fn write_message(
    w: &mut (impl AsyncWrite + Unpin),
    magic: &[u8; 4],
    body: &[u8],
) -> io::Result<()> {
    let mut m = Vec::with_capacity(HANDSHAKE_HEADER_BYTES + body.len());
    m.extend_from_slice(magic);
    m.extend_from_slice(&(body.len() as u16).to_le_bytes());
    m.extend_from_slice(body);
    w.write_all(&m).await?;
    w.flush().await
}

/// Reads one handshake message (never more than the bound); a refusal is an error.
async fn read_message(r: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>, HandshakeError> {
    let mut header = [0u8; HANDSHAKE_HEADER_BYTES];
    r.read_exact(&mut header).await?;
    let length = u16::from_le_bytes([header[4], header[5]]) as usize;
    if &header[..4] != HELLO && &header[..4] != REFUSAL {
        return Err(HandshakeError::NotStrata);
    }
    if length > INTERNODE_HANDSHAKE_BYTES_MAX {
        return Err(HandshakeError::TooLong(length));
    }
    let mut body = vec![0u8; length];
    r.read_exact(&mut body).await?;
    if &header[..4] == REFUSAL {
        return Err(HandshakeError::Refused(String::from_utf8_lossy(&body).into_owned()));
    }
    Ok(body)
}

fn keys_of(state: snow::HandshakeState) -> Arc<Keys> {
    let transport = state.into_stateless_transport_mode().expect("the handshake is finished");
    Arc::new(Keys { transport, encrypt: !plaintext() })
}

/// The channel over `reader` and `writer` with the handshake's keys; the first record
/// (the confirmation) in the initiator's direction is already sent or read.
fn into_channel<R, W>(keys: Arc<Keys>, reader: R, writer: W, initiator: bool) -> Channel<R, W> {
    let (read_nonce, write_nonce) = if initiator { (0, 1) } else { (1, 0) };
    Channel {
        reader: ChannelReader {
            inner: reader,
            keys: keys.clone(),
            nonce: read_nonce,
            raw: vec![0u8; RAW_BUFFER_BYTES].into_boxed_slice(),
            raw_start: 0,
            raw_end: 0,
            plain: Vec::new(),
            plain_start: 0,
        },
        writer: ChannelWriter {
            inner: writer,
            keys,
            nonce: write_nonce,
            out: Vec::new(),
            out_start: 0,
            owed: None,
        },
    }
}

/// Opens the channel on a connection this node made (within the handshake deadline).
pub async fn initiate(stream: TcpStream, key: &ChannelKey) -> Result<Channel, HandshakeError> {
    let (reader, writer) = stream.into_split();
    initiate_on(reader, writer, key).await
}

/// Accepts the channel on a connection a peer made (within the handshake deadline).
pub async fn respond(stream: TcpStream, key: &ChannelKey) -> Result<Channel, HandshakeError> {
    let (reader, writer) = stream.into_split();
    respond_on(reader, writer, key).await
}

/// [`initiate`] on any reader and writer.
pub async fn initiate_on<R, W>(
    mut r: R,
    mut w: W,
    key: &ChannelKey,
) -> Result<Channel<R, W>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let run = async {
        let mut state = handshake_state(key, true);
        let mut buf = [0u8; INTERNODE_HANDSHAKE_BYTES_MAX];
        let n = state.write_message(&[], &mut buf).expect("the first message fits");
        write_message(&mut w, HELLO, &buf[..n]).await?;
        let reply = read_message(&mut r).await?;
        state.read_message(&reply, &mut buf).map_err(|_| HandshakeError::Unauthenticated)?;
        let keys = keys_of(state);
        // The confirmation: proves this side holds its ephemeral key (a replayed first
        // message cannot produce it). It goes out with the first frames, no round trip.
        let n = keys.transport.write_message(0, CONFIRMATION, &mut buf).expect("it fits");
        let mut record = (n as u16).to_le_bytes().to_vec();
        record.extend_from_slice(&buf[..n]);
        w.write_all(&record).await?;
        Ok::<_, HandshakeError>(keys)
    };
    let keys = tokio::time::timeout(HANDSHAKE_TIMEOUT, run)
        .await
        .map_err(|_| HandshakeError::TimedOut)??;
    Ok(into_channel(keys, r, w, true))
}

/// [`respond`] on any reader and writer. A peer that fails to authenticate is sent a
/// refusal saying why, so its side can tell its operator.
pub async fn respond_on<R, W>(
    mut r: R,
    mut w: W,
    key: &ChannelKey,
) -> Result<Channel<R, W>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let run = async {
        let mut state = handshake_state(key, false);
        let mut buf = [0u8; INTERNODE_HANDSHAKE_BYTES_MAX];
        let hello = match read_message(&mut r).await {
            Ok(hello) => hello,
            Err(e @ (HandshakeError::NotStrata | HandshakeError::TooLong(_))) => {
                let _ = write_message(&mut w, REFUSAL, e.to_string().as_bytes()).await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        if state.read_message(&hello, &mut buf).is_err() {
            let reason = format!(
                "the handshake did not authenticate with this node's cluster secret \
                 (or another version: {})",
                String::from_utf8_lossy(PROLOGUE)
            );
            let _ = write_message(&mut w, REFUSAL, reason.as_bytes()).await;
            return Err(HandshakeError::Unauthenticated);
        }
        let n = state.write_message(&[], &mut buf).expect("the reply fits");
        write_message(&mut w, HELLO, &buf[..n]).await?;
        let keys = keys_of(state);
        // Until the initiator's confirmation opens, it may be a replay of another
        // connection's first message: still bounded, still under the deadline.
        let mut length = [0u8; RECORD_HEADER_BYTES];
        r.read_exact(&mut length).await?;
        let length = u16::from_le_bytes(length) as usize;
        if length != CONFIRMATION.len() + TAG_BYTES {
            return Err(HandshakeError::Unconfirmed);
        }
        let mut sealed = [0u8; CONFIRMATION.len() + TAG_BYTES];
        r.read_exact(&mut sealed).await?;
        let opened = keys.transport.read_message(0, &sealed, &mut buf);
        if opened.ok().map(|n| &buf[..n]) != Some(CONFIRMATION) {
            return Err(HandshakeError::Unconfirmed);
        }
        Ok::<_, HandshakeError>(keys)
    };
    let keys = tokio::time::timeout(HANDSHAKE_TIMEOUT, run)
        .await
        .map_err(|_| HandshakeError::TimedOut)??;
    Ok(into_channel(keys, r, w, false))
}

fn refused_record() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "an inter-node record failed authentication (tampered with, replayed, reordered or \
         from another connection)",
    )
}

/// The reading half: decrypts the peer's records in order and reads as their bytes.
pub struct ChannelReader<R = OwnedReadHalf> {
    inner: R,
    keys: Arc<Keys>,
    /// The next record's number (its nonce).
    nonce: u64,
    /// Records read but not yet opened: `raw[raw_start..raw_end]`.
    raw: Box<[u8]>,
    raw_start: usize,
    raw_end: usize,
    /// Plaintext opened but not yet read: `plain[plain_start..]`.
    plain: Vec<u8>,
    plain_start: usize,
}

impl<R> ChannelReader<R> {
    /// Whether bytes that arrived wait here (read from the socket, not yet handed out): a
    /// reader that batches "what came together" asks this beside its own buffer.
    pub fn has_buffered(&self) -> bool {
        self.plain_start < self.plain.len() || self.raw_start < self.raw_end
    }

    /// The next whole record in `raw`, as (ciphertext start, its length), if one is there.
    fn next_record(&self) -> io::Result<Option<(usize, usize)>> {
        let have = self.raw_end - self.raw_start;
        if have < RECORD_HEADER_BYTES {
            return Ok(None);
        }
        let at = self.raw_start;
        let length = u16::from_le_bytes([self.raw[at], self.raw[at + 1]]) as usize;
        let tag = if self.keys.encrypt { TAG_BYTES } else { 0 };
        // Writers never send an empty record (it would read as the stream's end).
        if length <= tag {
            return Err(refused_record());
        }
        if have < RECORD_HEADER_BYTES + length {
            return Ok(None);
        }
        Ok(Some((at + RECORD_HEADER_BYTES, length)))
    }

    /// Opens the record at `raw[at..at + length]` into `out` (at least its plaintext
    /// long); returns the plaintext's length.
    fn open(&mut self, at: usize, length: usize, out: &mut [u8]) -> io::Result<usize> {
        let sealed = &self.raw[at..at + length];
        let n = if self.keys.encrypt {
            let t = &self.keys.transport;
            t.read_message(self.nonce, sealed, out).map_err(|_| refused_record())?
        } else {
            out[..length].copy_from_slice(sealed);
            length
        };
        self.nonce += 1;
        self.raw_start = at + length;
        Ok(n)
    }

    fn plain_length(&self, length: usize) -> usize {
        if self.keys.encrypt {
            length - TAG_BYTES
        } else {
            length
        }
    }
}

impl<R: AsyncRead + Unpin> ChannelReader<R> {
    /// Reads more ciphertext from the socket; returns how many bytes (0 at its end).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.raw_start == self.raw_end {
            self.raw_start = 0;
            self.raw_end = 0;
        } else if self.raw.len() - self.raw_end < RECORD_HEADER_BYTES + INTERNODE_RECORD_BYTES_MAX {
            self.raw.copy_within(self.raw_start..self.raw_end, 0);
            self.raw_end -= self.raw_start;
            self.raw_start = 0;
        }
        let mut buf = ReadBuf::new(&mut self.raw[self.raw_end..]);
        ready!(Pin::new(&mut self.inner).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.raw_end += n;
        Poll::Ready(Ok(n))
    }

    /// Makes at least `n` bytes of plaintext available and returns what is buffered
    /// (without consuming it): a connection's first bytes say which plane it is for.
    pub async fn peek(&mut self, n: usize) -> io::Result<&[u8]> {
        while self.plain.len() - self.plain_start < n {
            match self.next_record()? {
                Some((at, length)) => {
                    self.plain.drain(..self.plain_start);
                    self.plain_start = 0;
                    let start = self.plain.len();
                    self.plain.resize(start + self.plain_length(length), 0);
                    let mut out = std::mem::take(&mut self.plain);
                    let opened = self.open(at, length, &mut out[start..]);
                    self.plain = out;
                    opened?;
                }
                None => {
                    if std::future::poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
            }
        }
        Ok(&self.plain[self.plain_start..])
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ChannelReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_start < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_start);
                buf.put_slice(&this.plain[this.plain_start..this.plain_start + n]);
                this.plain_start += n;
                if this.plain_start == this.plain.len() {
                    this.plain.clear();
                    this.plain_start = 0;
                }
                return Poll::Ready(Ok(()));
            }
            // Open every whole record buffered: straight into the caller's buffer while
            // it has room, the rest of one into `plain`.
            let mut produced = false;
            while buf.remaining() > 0 {
                let Some((at, length)) = this.next_record()? else { break };
                let plain = this.plain_length(length);
                if buf.remaining() >= plain {
                    let out = buf.initialize_unfilled_to(plain);
                    let n = this.open(at, length, out)?;
                    buf.advance(n);
                } else {
                    let mut out = std::mem::take(&mut this.plain);
                    out.resize(plain, 0);
                    let opened = this.open(at, length, &mut out);
                    this.plain = out;
                    opened?;
                    let n = buf.remaining();
                    buf.put_slice(&this.plain[..n]);
                    this.plain_start = n;
                }
                produced = true;
            }
            if produced {
                return Poll::Ready(Ok(()));
            }
            match this.poll_fill(cx) {
                Poll::Ready(Ok(0)) if this.raw_start < this.raw_end => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed inside an inter-node record",
                    )))
                }
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The writing half: seals bytes into records, in order.
///
/// `poll_write` returns only once the records holding the bytes it took are written to
/// the socket (so `write_all` returns with everything sent, as on a plain socket, with no
/// flush needed). A write dropped unfinished leaves the stream unusable, as half a frame
/// on a plain socket does.
pub struct ChannelWriter<W = OwnedWriteHalf> {
    inner: W,
    keys: Arc<Keys>,
    /// The next record's number (its nonce).
    nonce: u64,
    /// Sealed records not yet written: `out[out_start..]`.
    out: Vec<u8>,
    out_start: usize,
    /// Bytes taken from the caller whose records are still being written.
    owed: Option<usize>,
}

impl<W> ChannelWriter<W> {
    fn seal(&mut self, bytes: &[u8]) -> io::Result<()> {
        for chunk in bytes.chunks(RECORD_PLAIN_BYTES_MAX) {
            let at = self.out.len();
            let length = if self.keys.encrypt {
                let t = &self.keys.transport;
                self.out.resize(at + RECORD_HEADER_BYTES + chunk.len() + TAG_BYTES, 0);
                t.write_message(self.nonce, chunk, &mut self.out[at + RECORD_HEADER_BYTES..])
                    .map_err(|e| io::Error::other(format!("sealing a record: {e}")))?
            } else {
                self.out.extend_from_slice(&[0, 0]);
                self.out.extend_from_slice(chunk);
                chunk.len()
            };
            self.nonce += 1;
            self.out[at..at + RECORD_HEADER_BYTES].copy_from_slice(&(length as u16).to_le_bytes());
        }
        Ok(())
    }
}

impl<W: AsyncWrite + Unpin> ChannelWriter<W> {
    /// Writes out the sealed records.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_start < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_start..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_start += n;
        }
        self.out.clear();
        self.out_start = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for ChannelWriter<W> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            ready!(this.poll_drain(cx))?;
            if let Some(n) = this.owed.take() {
                return Poll::Ready(Ok(n.min(buf.len())));
            }
            if buf.is_empty() {
                return Poll::Ready(Ok(0));
            }
            let n = buf.len().min(SEAL_BYTES_MAX);
            this.seal(&buf[..n])?;
            this.owed = Some(n);
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[path = "channel_tests.rs"]
mod tests;
