//! The data plane's frames: one header, an optional payload, a checksum and a MAC. They
//! travel inside the inter-node channel (`strata_io::net::channel`: Noise NNpsk0, AES-GCM
//! records numbered per direction), which authenticates the peer and encrypts them, and
//! refuses a record replayed, reordered or taken from another connection: a frame is
//! bound to its connection, direction and position.
//!
//! ```text
//! off len field
//!   0   4 magic "SDP1"
//!   4   1 kind       (a request kind 1-14; a reply sets the high bit: 0x80 | kind)
//!   5   1 status     (replies: 0 ok, else a Status; requests: 0)
//!   6   2 flags      (FUA = 1 on writes; VOLUME = 2: for the volume's owner, below;
//!                     WHOLE = 4 on probes: the owner vouches for the copy;
//!                     SUSPECT = 8 on probe replies: the copy lost power)
//!   8   8 request id (chosen by the requester; a reply carries its request's)
//!  16   8 component  (the component's store id on the receiving node)
//!  24   8 epoch      (the owner's; a StaleEpoch reply carries the component's newest)
//!  32   8 lsn
//!  40   8 offset     (bytes into the component)
//!  48   4 count      (bytes a Read asks for / a Trim covers; a VOLUME Write: its number)
//!  52   4 payload length
//!  56   4 crc32c of bytes 0..56 and the payload
//!  60  32 BLAKE3 keyed hash of the payload, then bytes 0..60 (key from the cluster
//!          secret; the payload first, so that its whole 1 KiB chunks hash in parallel)
//!  92     payload
//! ```
//! A request with the VOLUME flag (Write, Read, Flush, Trim) is for a replicated volume as
//! a whole, sent by a node serving it to the node it believes owns it; `component` is the
//! owner's component of the volume, `lsn` the sending node's id, and the owner orders the
//! request like one of its own clients' (or answers `NotOwner`). A VOLUME Flush's
//! `offset` is the volume's epoch when the flush began (0: not said), so that an owner
//! that took with a suspect copy as the truth since refuses it. A VOLUME Write's `count`,
//! and a VOLUME Trim's payload (4 bytes), is the sender's number for it, the same when it
//! retries it.
//!
//! All integers little-endian. A frame is accepted only if its magic, kind, lengths, crc
//! and MAC all check; the crc catches damage, the MAC a sender without the secret (a
//! different key derivation from the metadata plane's, so a frame of one plane is no
//! frame of the other). The MAC predates the channel and stays as defense in depth: the
//! channel's AEAD already authenticates every byte, so it costs ~1.3 us of BLAKE3 per
//! 4 KiB frame at each end for no new property. Decoding never panics on any input.
//!
//! A flag, kind or status a node does not know makes the frame malformed: an older node
//! fails a newer one's probe reply that says SUSPECT (its copy is taken for failed, and
//! STALE, the safe side). There is no mixed-version cluster yet: every node runs one
//! version.

use tokio::io::{AsyncRead, AsyncReadExt};

/// The magic that starts every data-plane connection's frames.
pub const MAGIC: &[u8; 4] = b"SDP1";
/// Header bytes (with the crc and the MAC).
pub const HEADER_BYTES: usize = 92;
/// The largest payload accepted.
pub const PAYLOAD_BYTES_MAX: usize = 8 << 20;

/// The keys of the data plane, derived from the cluster secret: the inter-node channel's
/// and the frames' MAC key.
#[derive(Clone)]
pub struct DataKey {
    mac: [u8; 32],
    channel: strata_io::net::ChannelKey,
}

impl DataKey {
    /// Derives the data-plane keys from the cluster secret's bytes.
    pub fn from_secret(secret: &[u8]) -> DataKey {
        DataKey {
            mac: blake3::derive_key("strata cluster data v1", secret),
            channel: strata_io::net::ChannelKey::from_secret(secret),
        }
    }

    /// The inter-node channel's key.
    pub fn channel(&self) -> &strata_io::net::ChannelKey {
        &self.channel
    }

    /// The payload goes first: after the 60 header bytes it would start mid-chunk, and
    /// BLAKE3 then compresses every chunk one block at a time (4.8 us for 4 KiB here,
    /// against 1.8 us with the chunks aligned).
    fn mac(&self, head: &[u8], payload: &[u8]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_keyed(&self.mac);
        hasher.update(payload);
        hasher.update(head);
        *hasher.finalize().as_bytes()
    }
}

/// What a request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The component's newest epoch and highest LSN.
    Probe = 1,
    /// Write the payload at `offset`.
    Write = 2,
    /// Read `count` bytes at `offset`.
    Read = 3,
    /// Make every write so far durable.
    Flush = 4,
    /// Discard `count` bytes at `offset` (they read as zeroes).
    Trim = 5,
    /// Create a component of `offset` bytes for the volume named in the payload; the
    /// reply's `component` is its id.
    Create = 6,
    /// Remove the component.
    Remove = 7,
    /// BLAKE3 of each `DIGEST_UNIT` piece of the `count` bytes at `offset` (the reply's
    /// payload: 32 bytes per piece), to find where two components differ without
    /// sending their data.
    Digest = 8,
    /// To the owner, about the volume whose component there is `component`, at its
    /// epoch: hand it over cleanly (stop serving, let every request in flight end, sync
    /// every active copy, record that they are equal), so the next owner need not
    /// compare them.
    Release = 9,
    /// Grow the component to `offset` bytes (never shrinks it).
    Resize = 10,
    /// To the owner, about the volume whose component there is `component`, at its
    /// epoch: may the sender (node id in `lsn`) serve reads from its own copy? Granted,
    /// the reply's `component` is that copy's id: the sender may, for its read lease
    /// from when it asked, while its fence for the copy is still at the epoch.
    Lease = 11,
    /// From an owner about to resync a copy held here: a resync slot of this node's for
    /// job `offset` of node `lsn` (`count` 1: take it or renew it, for a bounded time;
    /// 0: give it back). Refused `Busy` while every slot is taken: the sender tries later.
    /// Passes no fence (it touches no component).
    ResyncSlot = 12,
    /// Take the volume's snapshot `offset` (its key: `strata_replica::snapshot`) of the
    /// component, synced first; one of that key there is replaced. Fenced like a write.
    Snapshot = 13,
    /// Remove the component's snapshot `offset` (done if it has none). Fenced.
    RemoveSnapshot = 14,
}

/// The piece of a component each digest of a `Digest` reply covers.
pub const DIGEST_UNIT: u64 = 64 << 10;

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Probe,
            2 => Kind::Write,
            3 => Kind::Read,
            4 => Kind::Flush,
            5 => Kind::Trim,
            6 => Kind::Create,
            7 => Kind::Remove,
            8 => Kind::Digest,
            9 => Kind::Release,
            10 => Kind::Resize,
            11 => Kind::Lease,
            12 => Kind::ResyncSlot,
            13 => Kind::Snapshot,
            14 => Kind::RemoveSnapshot,
            _ => return None,
        })
    }
}

/// A reply's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Done.
    Ok = 0,
    /// Refused: the request's epoch is older than one the component has seen (the reply's
    /// epoch field is that newer one).
    StaleEpoch = 1,
    /// No such component here.
    NotFound = 2,
    /// Beyond the component's end.
    OutOfRange = 3,
    /// The store failed (or a block failed its checksum).
    Io = 4,
    /// A malformed request.
    Invalid = 5,
    /// A VOLUME request reached a node that does not own the volume (now).
    NotOwner = 6,
    /// The store refused a write for want of space (its reserve): nothing was written,
    /// and the store serves on (the node's disk is full).
    NoSpace = 7,
    /// Not now: every resync slot here is taken (`ResyncSlot`); try later.
    Busy = 8,
}

impl Status {
    fn from_u8(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Ok,
            1 => Status::StaleEpoch,
            2 => Status::NotFound,
            3 => Status::OutOfRange,
            4 => Status::Io,
            5 => Status::Invalid,
            6 => Status::NotOwner,
            7 => Status::NoSpace,
            8 => Status::Busy,
            _ => return None,
        })
    }
}

/// Set on a write that must be durable before its reply.
pub const FLAG_FUA: u16 = 1;
/// Set on a request for a replicated volume's owner (see the module doc).
pub const FLAG_VOLUME: u16 = 2;
/// On a Probe: the owner holds this copy level with its own (ACTIVE, owing no scan, its
/// last answer over this very connection), so a mark the copy's node keeps after a power
/// loss may come off.
pub const FLAG_WHOLE: u16 = 4;
/// On a Probe's reply: the copy's node marks it suspect (it came back from a power loss
/// and no owner has vouched for it since), so it may lack writes it had not synced. A
/// new owner fencing it takes it for STALE, owing a full digest scan.
pub const FLAG_SUSPECT: u16 = 8;

/// A frame's header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// What is asked (or answered).
    pub kind: Kind,
    /// Whether this is a reply.
    pub reply: bool,
    /// A reply's status (`Ok` on requests).
    pub status: Status,
    /// Flags (`FLAG_FUA`).
    pub flags: u16,
    /// Request id.
    pub id: u64,
    /// The component.
    pub component: u64,
    /// The epoch.
    pub epoch: u64,
    /// The LSN.
    pub lsn: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte count (reads, trims).
    pub count: u32,
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The connection failed or closed.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// Not a data-plane frame.
    #[error("not a Strata data frame")]
    Magic,
    /// An unknown kind or status, or flags set that mean nothing.
    #[error("malformed data frame: {0}")]
    Malformed(&'static str),
    /// A payload longer than allowed.
    #[error("data frame payload of {0} bytes is longer than allowed")]
    TooLong(usize),
    /// The crc does not match: damaged in flight.
    #[error("data frame checksum mismatch")]
    Checksum,
    /// The MAC does not verify: the sender lacks the cluster secret.
    #[error("data frame not authenticated with this cluster's secret")]
    Unauthenticated,
}

/// Encodes a frame.
pub fn encode(key: &DataKey, h: &Header, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_BYTES + payload.len());
    encode_into(key, h, payload, &mut f);
    f
}

/// Encodes a frame at the end of `out` (frames sent together go in one buffer).
pub fn encode_into(key: &DataKey, h: &Header, payload: &[u8], out: &mut Vec<u8>) {
    assert!(payload.len() <= PAYLOAD_BYTES_MAX, "payload over the limit");
    let start = out.len();
    out.reserve(HEADER_BYTES + payload.len());
    let f = out;
    f.extend_from_slice(MAGIC);
    f.push(h.kind as u8 | if h.reply { 0x80 } else { 0 });
    f.push(h.status as u8);
    f.extend_from_slice(&h.flags.to_le_bytes());
    for v in [h.id, h.component, h.epoch, h.lsn, h.offset] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    f.extend_from_slice(&h.count.to_le_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&f[start..]), payload);
    f.extend_from_slice(&crc.to_le_bytes());
    let mac = key.mac(&f[start..], payload);
    f.extend_from_slice(&mac);
    f.extend_from_slice(payload);
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// Checks a header's fixed fields; returns it and the payload length to read.
pub fn parse_header(b: &[u8; HEADER_BYTES]) -> Result<(Header, usize), FrameError> {
    if &b[..4] != MAGIC {
        return Err(FrameError::Magic);
    }
    let kind = Kind::from_u8(b[4] & 0x7f).ok_or(FrameError::Malformed("unknown kind"))?;
    let status = Status::from_u8(b[5]).ok_or(FrameError::Malformed("unknown status"))?;
    let flags = u16::from_le_bytes([b[6], b[7]]);
    if flags & !(FLAG_FUA | FLAG_VOLUME | FLAG_WHOLE | FLAG_SUSPECT) != 0 {
        return Err(FrameError::Malformed("unknown flags"));
    }
    let length = u32_at(b, 52) as usize;
    if length > PAYLOAD_BYTES_MAX {
        return Err(FrameError::TooLong(length));
    }
    let header = Header {
        kind,
        reply: b[4] & 0x80 != 0,
        status,
        flags,
        id: u64_at(b, 8),
        component: u64_at(b, 16),
        epoch: u64_at(b, 24),
        lsn: u64_at(b, 32),
        offset: u64_at(b, 40),
        count: u32_at(b, 48),
    };
    Ok((header, length))
}

/// Checks a frame's crc and MAC over its header and payload.
pub fn verify(key: &DataKey, b: &[u8; HEADER_BYTES], payload: &[u8]) -> Result<(), FrameError> {
    let crc = crc32c::crc32c_append(crc32c::crc32c(&b[..56]), payload);
    if crc != u32_at(b, 56) {
        return Err(FrameError::Checksum);
    }
    let sent: [u8; 32] = b[60..92].try_into().expect("32 bytes");
    // Constant-time comparison (blake3's Hash equality is).
    if blake3::Hash::from(key.mac(&b[..60], payload)) != blake3::Hash::from(sent) {
        return Err(FrameError::Unauthenticated);
    }
    Ok(())
}

/// Reads and checks one frame.
pub async fn read_frame(
    stream: &mut (impl AsyncRead + Unpin),
    key: &DataKey,
) -> Result<(Header, Vec<u8>), FrameError> {
    let mut b = [0u8; HEADER_BYTES];
    stream.read_exact(&mut b).await?;
    let (header, length) = parse_header(&b)?;
    let mut payload = vec![0u8; length];
    stream.read_exact(&mut payload).await?;
    verify(key, &b, &payload)?;
    Ok((header, payload))
}

#[cfg(test)]
mod tests;
