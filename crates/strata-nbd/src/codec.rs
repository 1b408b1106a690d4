//! The NBD wire format: constants, decoders and encoders. Pure: no I/O, no tokio, no clock.
//!
//! Decoders take untrusted bytes and return a typed error, never panic (a property test
//! feeds them arbitrary input). Encoders append to a `BytesMut`. Integers are big-endian
//! on the wire (network byte order), per the spec.

use bytes::{BufMut, BytesMut};

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// The magic of an option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// The magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// The magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// The magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can skip the 124 zero bytes.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// FLUSH is shared across connections.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// FAST_ZERO is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option types.
pub mod opt {
    /// Choose an export and end negotiation (no error reporting).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and start transmission.
    pub const GO: u32 = 7;
    /// Negotiate structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types.
pub mod rep {
    /// Success / end of list.
    pub const ACK: u32 = 1;
    /// One export in a LIST.
    pub const SERVER: u32 = 2;
    /// One piece of information for INFO/GO.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// Malformed option.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// Unsupported on this platform.
    pub const ERR_PLATFORM: u32 = (1 << 31) + 4;
    /// TLS must be started first (NBD_OPT_STARTTLS).
    pub const ERR_TLS_REQD: u32 = (1 << 31) + 5;
    /// Unknown export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
    /// Shutting down.
    pub const ERR_SHUTDOWN: u32 = (1 << 31) + 7;
    /// Too big.
    pub const ERR_TOO_BIG: u32 = (1 << 31) + 9;
}

/// NBD_INFO types.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim.
    pub const TRIM: u16 = 4;
    /// Cache (prefetch).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ must not be fragmented.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS wants one extent.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES must be fast or fail.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply types and flags.
pub mod reply {
    /// Final chunk.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// Empty final chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// Zeroes at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// Error.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// NBD error values.
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space.
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` flag: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;
/// The one metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The id we give `base:allocation` on SET_META_CONTEXT.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Longest string (export name, query) the spec allows.
pub const STRING_BYTES_MAX: usize = 4096;

/// A malformed piece of the handshake or of a request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// A magic number is wrong.
    #[error("bad magic {found:#x}")]
    BadMagic {
        /// What arrived.
        found: u64,
    },
    /// The data is shorter than its own length fields say.
    #[error("truncated: needed {needed} bytes, have {have}")]
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        have: usize,
    },
    /// Bytes are left over after the last field.
    #[error("{extra} trailing bytes")]
    Trailing {
        /// How many.
        extra: usize,
    },
    /// A string is longer than 4096 bytes or not UTF-8.
    #[error("bad string")]
    BadString,
    /// A list is longer than its limit.
    #[error("too many items: {count}")]
    TooMany {
        /// How many were announced.
        count: u32,
    },
}

/// An option request header (16 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option type.
    pub option: u32,
    /// Bytes of data that follow.
    pub length: u32,
}

impl OptionHeader {
    /// Bytes on the wire.
    pub const SIZE: usize = 16;

    /// Decodes the header.
    pub fn decode(b: &[u8; Self::SIZE]) -> Result<OptionHeader, DecodeError> {
        let magic = u64::from_be_bytes(b[0..8].try_into().expect("8 bytes"));
        if magic != IHAVEOPT {
            return Err(DecodeError::BadMagic { found: magic });
        }
        Ok(OptionHeader {
            option: u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
            length: u32::from_be_bytes(b[12..16].try_into().expect("4 bytes")),
        })
    }
}

/// A cursor over untrusted option data.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.data.len() < n {
            return Err(DecodeError::Truncated { needed: n, have: self.data.len() });
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn string(&mut self, length: u32) -> Result<String, DecodeError> {
        let length = length as usize;
        if length > STRING_BYTES_MAX {
            return Err(DecodeError::BadString);
        }
        let bytes = self.take(length)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::BadString)
    }
    fn finish(&self) -> Result<(), DecodeError> {
        match self.data.len() {
            0 => Ok(()),
            extra => Err(DecodeError::Trailing { extra }),
        }
    }
}

/// The data of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export name.
    pub name: String,
    /// The NBD_INFO types asked for.
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Decodes INFO/GO option data.
    pub fn decode(data: &[u8]) -> Result<InfoRequest, DecodeError> {
        let mut r = Reader { data };
        let name_length = r.u32()?;
        let name = r.string(name_length)?;
        let count = r.u16()?;
        let mut requests = Vec::with_capacity(usize::from(count).min(64));
        for _ in 0..count {
            requests.push(r.u16()?);
        }
        r.finish()?;
        Ok(InfoRequest { name, requests })
    }
}

/// The data of LIST_META_CONTEXT / SET_META_CONTEXT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// The export name.
    pub export: String,
    /// The queries.
    pub queries: Vec<String>,
}

/// The most queries one meta-context option may carry.
pub const META_QUERIES_MAX: u32 = 128;

impl MetaContextRequest {
    /// Decodes meta-context option data.
    pub fn decode(data: &[u8]) -> Result<MetaContextRequest, DecodeError> {
        let mut r = Reader { data };
        let export_length = r.u32()?;
        let export = r.string(export_length)?;
        let count = r.u32()?;
        if count > META_QUERIES_MAX {
            return Err(DecodeError::TooMany { count });
        }
        let mut queries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let length = r.u32()?;
            queries.push(r.string(length)?);
        }
        r.finish()?;
        Ok(MetaContextRequest { export, queries })
    }
}

/// Does `query` select `base:allocation` when listing (wildcards allowed)?
pub fn lists_base_allocation(query: &str) -> bool {
    query == "base:" || query == BASE_ALLOCATION
}

/// A transmission request header (28 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's cookie, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Bytes on the wire.
    pub const SIZE: usize = 28;

    /// Decodes a request header.
    pub fn decode(b: &[u8; Self::SIZE]) -> Result<Request, DecodeError> {
        let magic = u32::from_be_bytes(b[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(DecodeError::BadMagic { found: u64::from(magic) });
        }
        Ok(Request {
            flags: u16::from_be_bytes(b[4..6].try_into().expect("2 bytes")),
            kind: u16::from_be_bytes(b[6..8].try_into().expect("2 bytes")),
            cookie: u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(b[16..24].try_into().expect("8 bytes")),
            length: u32::from_be_bytes(b[24..28].try_into().expect("4 bytes")),
        })
    }

    /// Encodes a request header (for tests and clients).
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    /// The command flags this command may carry.
    pub fn allowed_flags(kind: u16) -> u16 {
        match kind {
            cmd::WRITE_ZEROES => cflags::FUA | cflags::NO_HOLE | cflags::FAST_ZERO,
            cmd::BLOCK_STATUS => cflags::FUA | cflags::REQ_ONE,
            _ => cflags::FUA,
        }
    }
}

/// Appends an option reply with `data`.
pub fn put_option_reply(out: &mut BytesMut, option: u32, reply_type: u32, data: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(u32::try_from(data.len()).expect("option replies are small"));
    out.put_slice(data);
}

/// Appends the NBD_INFO_EXPORT payload (type, size, flags).
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&info::EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// The NBD_INFO_BLOCK_SIZE payload.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&minimum.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&maximum.to_be_bytes());
    v
}

/// An NBD_INFO carrying a string (NAME, DESCRIPTION).
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// Appends a simple reply header.
pub fn put_simple_reply(out: &mut BytesMut, error: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error);
    out.put_u64(cookie);
}

/// Appends a structured reply chunk header.
pub fn put_chunk_header(out: &mut BytesMut, flags: u16, kind: u16, cookie: u64, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(kind);
    out.put_u64(cookie);
    out.put_u32(length);
}

/// Appends a final structured error chunk with a message (truncated to 4096 bytes).
pub fn put_error_chunk(out: &mut BytesMut, cookie: u64, error: u32, message: &str) {
    let mut end = message.len().min(STRING_BYTES_MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let message = &message.as_bytes()[..end];
    put_chunk_header(out, reply::FLAG_DONE, reply::ERROR, cookie, 6 + message.len() as u32);
    out.put_u32(error);
    out.put_u16(message.len() as u16);
    out.put_slice(message);
}

/// The server's TLS mode: FORCEDTLS in the spec's words, or NOTLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS: STARTTLS is answered `ERR_UNSUP`.
    Off,
    /// Every option but ABORT and STARTTLS is refused until TLS is up.
    Require,
}

/// What the TLS mode makes of an option before it is handled ([`tls_gate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsGate {
    /// Handle the option as usual.
    Handle,
    /// Acknowledge, then run the TLS handshake.
    StartTls,
    /// Answer with this error reply (and discard the option's data).
    Refuse(u32),
    /// Close the connection without a reply (EXPORT_NAME, which cannot fail, before TLS).
    Close,
}

/// Decides an option's fate under `mode` (pure: the handshake's TLS rules in one place).
/// `tls`: TLS is already up; `length`: the option's data length.
///
/// FORCEDTLS (spec, "TLS support"): before TLS every option except ABORT and STARTTLS
/// gets `ERR_TLS_REQD` (INFO and GO included); EXPORT_NAME cannot be answered with an
/// error, so the connection closes. STARTTLS with TLS up, or with data, is `ERR_INVALID`.
/// NOTLS: STARTTLS is `ERR_UNSUP` and nothing is ever `ERR_TLS_REQD`.
pub fn tls_gate(mode: TlsMode, tls: bool, option: u32, length: u32) -> TlsGate {
    match (mode, option) {
        (TlsMode::Off, opt::STARTTLS) => TlsGate::Refuse(rep::ERR_UNSUP),
        (TlsMode::Off, _) => TlsGate::Handle,
        (TlsMode::Require, opt::STARTTLS) if tls || length != 0 => {
            TlsGate::Refuse(rep::ERR_INVALID)
        }
        (TlsMode::Require, opt::STARTTLS) => TlsGate::StartTls,
        (TlsMode::Require, _) if tls => TlsGate::Handle,
        (TlsMode::Require, opt::ABORT) => TlsGate::Handle,
        (TlsMode::Require, opt::EXPORT_NAME) => TlsGate::Close,
        (TlsMode::Require, _) => TlsGate::Refuse(rep::ERR_TLS_REQD),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn require_mode_refuses_every_option_but_abort_and_starttls_before_tls() {
        use TlsGate::*;
        let before = |option| tls_gate(TlsMode::Require, false, option, 0);
        assert_eq!(before(opt::STARTTLS), StartTls);
        assert_eq!(before(opt::ABORT), Handle);
        assert_eq!(before(opt::EXPORT_NAME), Close, "cannot be refused: the connection closes");
        for option in [opt::LIST, opt::INFO, opt::GO, opt::STRUCTURED_REPLY, opt::SET_META_CONTEXT]
        {
            assert_eq!(before(option), Refuse(rep::ERR_TLS_REQD), "option {option}");
        }
        assert_eq!(before(999), Refuse(rep::ERR_TLS_REQD), "unknown options too");
        assert_eq!(tls_gate(TlsMode::Require, false, opt::STARTTLS, 1), Refuse(rep::ERR_INVALID));
        // With TLS up: everything is handled, and never ERR_TLS_REQD.
        for option in [opt::LIST, opt::INFO, opt::GO, opt::EXPORT_NAME, opt::ABORT, 999] {
            assert_eq!(tls_gate(TlsMode::Require, true, option, 0), Handle, "option {option}");
        }
        assert_eq!(tls_gate(TlsMode::Require, true, opt::STARTTLS, 0), Refuse(rep::ERR_INVALID));
    }

    #[test]
    fn without_tls_starttls_is_unsupported_and_nothing_needs_tls() {
        assert_eq!(
            tls_gate(TlsMode::Off, false, opt::STARTTLS, 0),
            TlsGate::Refuse(rep::ERR_UNSUP)
        );
        for option in [opt::LIST, opt::INFO, opt::GO, opt::EXPORT_NAME, opt::ABORT, 999] {
            assert_eq!(tls_gate(TlsMode::Off, false, option, 0), TlsGate::Handle);
        }
    }

    #[test]
    fn request_round_trips() {
        let req = Request { flags: 1, kind: cmd::WRITE, cookie: 7, offset: 4096, length: 512 };
        let mut b = BytesMut::new();
        req.encode(&mut b);
        assert_eq!(Request::decode(b[..].try_into().unwrap()), Ok(req));
    }

    #[test]
    fn info_request_decodes() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&info::NAME.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        let r = InfoRequest::decode(&d).unwrap();
        assert_eq!(r.name, "vol");
        assert_eq!(r.requests, vec![info::NAME, info::BLOCK_SIZE]);
        d.push(0);
        assert_eq!(InfoRequest::decode(&d), Err(DecodeError::Trailing { extra: 1 }));
        assert!(InfoRequest::decode(&d[..5]).is_err());
    }

    #[test]
    fn error_chunk_truncates_on_char_boundary() {
        let mut b = BytesMut::new();
        put_error_chunk(&mut b, 1, errno::EIO, &"é".repeat(3000));
        let length = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
        assert_eq!(b.len(), 20 + length);
        assert!(length - 6 <= STRING_BYTES_MAX);
        assert!(std::str::from_utf8(&b[26..]).is_ok());
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = InfoRequest::decode(&data);
            let _ = MetaContextRequest::decode(&data);
            if data.len() >= Request::SIZE {
                let _ = Request::decode(data[..Request::SIZE].try_into().unwrap());
            }
            if data.len() >= OptionHeader::SIZE {
                let _ = OptionHeader::decode(data[..OptionHeader::SIZE].try_into().unwrap());
            }
        }

        #[test]
        fn meta_request_round_trips(
            export in "[a-z]{0,20}",
            queries in proptest::collection::vec("[a-z:]{0,30}", 0..5),
        ) {
            let mut d = Vec::new();
            d.extend_from_slice(&(export.len() as u32).to_be_bytes());
            d.extend_from_slice(export.as_bytes());
            d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
            for q in &queries {
                d.extend_from_slice(&(q.len() as u32).to_be_bytes());
                d.extend_from_slice(q.as_bytes());
            }
            let r = MetaContextRequest::decode(&d).unwrap();
            prop_assert_eq!(r.export, export);
            prop_assert_eq!(r.queries, queries);
        }
    }
}
