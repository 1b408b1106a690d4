//! A raw-socket NBD client for tests: it sends exactly the bytes we choose, including the
//! malformed ones libnbd and qemu refuse to send.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const ERR_UNSUP: u32 = (1 << 31) + 1;
pub const ERR_INVALID: u32 = (1 << 31) + 3;
pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_LIST: u32 = 3;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const EPERM: u32 = 1;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

pub struct Raw {
    pub s: TcpStream,
}

/// One option reply.
#[derive(Debug)]
pub struct OptReply {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One reply in transmission (simple, or one structured chunk).
#[derive(Debug)]
pub struct Reply {
    pub structured: bool,
    pub flags: u16,
    pub kind: u16,
    pub error: u32,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Raw {
    /// Connects and reads the server greeting; sends `client_flags`.
    pub fn connect_with_flags(addr: &str, client_flags: u32) -> Raw {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // A write's header and payload go out as two sends: without NODELAY, Nagle holds
        // the second until the server's delayed ACK (40 ms per request).
        s.set_nodelay(true).unwrap();
        let mut raw = Raw { s };
        let hello = raw.read_n(18);
        assert_eq!(&hello[0..8], b"NBDMAGIC");
        assert_eq!(u64::from_be_bytes(hello[8..16].try_into().unwrap()), IHAVEOPT);
        let flags = u16::from_be_bytes(hello[16..18].try_into().unwrap());
        assert_eq!(flags & 3, 3, "fixed newstyle and no zeroes");
        raw.s.write_all(&client_flags.to_be_bytes()).unwrap();
        raw
    }

    pub fn connect(addr: &str) -> Raw {
        Raw::connect_with_flags(addr, 3)
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read from server");
        b
    }

    /// True if the server closed the connection (EOF or reset) within the timeout.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_)) && {
            // Distinguish a timeout (still open) from a close.
            match self.s.read(&mut b) {
                Ok(0) => true,
                Err(e) => {
                    e.kind() != std::io::ErrorKind::WouldBlock
                        && e.kind() != std::io::ErrorKind::TimedOut
                }
                Ok(_) => false,
            }
        }
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    pub fn read_option_reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), 0x0003_e889_0455_65a9);
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let length = u32::from_be_bytes(h[16..20].try_into().unwrap());
        OptReply { kind, data: self.read_n(length as usize) }
    }

    /// Sends an option and collects replies up to the final one (ACK or an error).
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data);
        let mut replies = Vec::new();
        loop {
            let r = self.read_option_reply();
            let last = r.kind == REP_ACK || r.kind & (1 << 31) != 0;
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    pub fn go_data(name: &str) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    /// OPT_GO; returns (size, transmission flags) or panics.
    pub fn go(&mut self, name: &str) -> (u64, u16) {
        let replies = self.option(OPT_GO, &Raw::go_data(name));
        let last = replies.last().unwrap();
        assert_eq!(last.kind, REP_ACK, "GO {name}: {replies:?}");
        let export = replies
            .iter()
            .find(|r| r.kind == REP_INFO && r.data[0..2] == [0, 0])
            .expect("NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(export.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.data[10..12].try_into().unwrap());
        (size, flags)
    }

    pub fn structured(&mut self) {
        let r = self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r[0].kind, REP_ACK);
    }

    pub fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
        let b = Raw::request_bytes(flags, kind, cookie, offset, length);
        self.s.write_all(&b).unwrap();
    }

    /// The 28 bytes of a request header (to pipeline several in one write).
    pub fn request_bytes(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b
    }

    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(0, CMD_WRITE, cookie, offset, data.len() as u32);
        self.s.write_all(data).unwrap();
    }

    /// Reads one reply; `read_length` is the data length of a simple READ reply.
    pub fn reply(&mut self, read_length: usize) -> Reply {
        self.reply_with(|_| read_length)
    }

    /// Reads one reply; `read_length(cookie)` gives the data length of a simple READ reply
    /// (replies may come in any order).
    pub fn reply_with(&mut self, read_length: impl Fn(u64) -> usize) -> Reply {
        let magic = u32::from_be_bytes(self.read_n(4).try_into().unwrap());
        if magic == 0x6744_6698 {
            let h = self.read_n(12);
            let error = u32::from_be_bytes(h[0..4].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
            let payload = if error == 0 { self.read_n(read_length(cookie)) } else { Vec::new() };
            return Reply { structured: false, flags: 0, kind: 0, error, cookie, payload };
        }
        assert_eq!(magic, 0x668e_33ef, "reply magic");
        let h = self.read_n(16);
        let flags = u16::from_be_bytes(h[0..2].try_into().unwrap());
        let kind = u16::from_be_bytes(h[2..4].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
        let length = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let payload = self.read_n(length as usize);
        let error = if kind & 0x8000 != 0 {
            u32::from_be_bytes(payload[0..4].try_into().unwrap())
        } else {
            0
        };
        Reply { structured: true, flags, kind, error, cookie, payload }
    }

    /// Sends `count` 1 MiB READs from offset 0 and never reads the replies, so the
    /// server's writes to this socket block once the socket buffers are full.
    pub fn flood_unread_reads(&mut self, count: u64) {
        let mut requests = Vec::new();
        for i in 0..count {
            requests.extend(Raw::request_bytes(0, CMD_READ, i, i << 20, 1 << 20));
        }
        self.s.write_all(&requests).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }

    /// A simple-reply READ that must succeed.
    pub fn read_ok(&mut self, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        self.request(0, CMD_READ, cookie, offset, length);
        let r = self.reply(length as usize);
        assert_eq!((r.error, r.cookie), (0, cookie), "read {offset}+{length}");
        r.payload
    }
}
