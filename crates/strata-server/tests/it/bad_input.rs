//! Malformed and out-of-range NBD input over a raw socket: each gets the error the spec
//! names, the connection stays usable where the spec says so, and nothing changes.

use crate::harness::{pseudo_random, Node};
use crate::raw::*;

fn node_with(volume: &str, size: &str) -> Node {
    let node = Node::start();
    node.create(volume, size);
    node
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let node = node_with("v", "1M");
    let mut raw = Raw::connect_with_flags(&node.nbd, 1 << 7);
    assert!(raw.is_closed());
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let node = node_with("v", "1M");
    let mut raw = Raw::connect(&node.nbd);
    use std::io::Write;
    raw.s.write_all(&[0xde; 16]).unwrap();
    assert!(raw.is_closed());
}

#[test]
fn unknown_option_is_unsupported_and_negotiation_continues() {
    let node = node_with("v", "1M");
    let mut raw = Raw::connect(&node.nbd);
    let r = raw.option(77, b"whatever");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, ERR_UNSUP);
    // STARTTLS is not offered yet: also unsupported.
    assert_eq!(raw.option(5, &[])[0].kind, ERR_UNSUP);
    let list = raw.option(OPT_LIST, &[]);
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0].kind, REP_SERVER);
    assert_eq!(&list[0].data[4..5], b"v");
    assert_eq!(list[1].kind, REP_ACK);
    // LIST with data is invalid.
    assert_eq!(raw.option(OPT_LIST, b"x")[0].kind, ERR_INVALID);
    let (size, _) = raw.go("v");
    assert_eq!(size, 1 << 20);
}

#[test]
fn unknown_export_under_go_gets_a_message_and_export_name_closes() {
    let node = node_with("v", "1M");
    let mut raw = Raw::connect(&node.nbd);
    let r = raw.option(OPT_GO, &Raw::go_data("nope"));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].kind, ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].data).contains("no volume named \"nope\""));
    let r = raw.option(OPT_GO, &Raw::go_data(""));
    assert_eq!(r[0].kind, ERR_UNKNOWN, "no default export");
    // Truncated GO data is invalid, and the session goes on.
    assert_eq!(raw.option(OPT_GO, &[0, 0, 0, 9, b'v'])[0].kind, ERR_INVALID);
    raw.go("v");

    let mut raw = Raw::connect(&node.nbd);
    raw.send_option(OPT_EXPORT_NAME, b"nope");
    assert!(raw.is_closed(), "EXPORT_NAME of an unknown export closes the connection");

    let mut raw = Raw::connect(&node.nbd);
    raw.send_option(OPT_EXPORT_NAME, b"v");
    let reply = raw.read_n(10);
    assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), 1 << 20);
}

#[test]
fn out_of_range_io_gets_errors_and_the_connection_stays_usable() {
    let node = node_with("v", "1M");
    let mut raw = Raw::connect(&node.nbd);
    raw.go("v");
    let size = 1u64 << 20;
    raw.request(0, CMD_READ, 1, size - 4096, 8192);
    assert_eq!(raw.reply(0).error, EINVAL, "read past the end");
    raw.request(0, CMD_READ, 2, u64::MAX - 10, 4096);
    assert_eq!(raw.reply(0).error, EINVAL, "offset overflow");
    raw.write(3, size - 512, &[9u8; 1024]);
    assert_eq!(raw.reply(0).error, ENOSPC, "write past the end");
    raw.request(0, 4, 4, size, 4096);
    assert_eq!(raw.reply(0).error, EINVAL, "trim past the end");
    raw.request(0, 6, 5, size, 4096);
    assert_eq!(raw.reply(0).error, ENOSPC, "write zeroes past the end");
    raw.request(0, 42, 6, 0, 0);
    assert_eq!(raw.reply(0).error, EINVAL, "unknown command");
    raw.request(1 << 3, CMD_READ, 7, 0, 4096);
    assert_eq!(raw.reply(0).error, EINVAL, "REQ_ONE is not a READ flag");
    raw.request(0, CMD_BLOCK_STATUS, 8, 0, 4096);
    assert_eq!(raw.reply(0).error, EINVAL, "BLOCK_STATUS without a meta context");
    // Nothing was written by any of these, and the connection still works.
    assert_eq!(raw.read_ok(9, size - 4096, 4096), vec![0u8; 4096]);
    raw.write(10, 0, b"ok");
    assert_eq!(raw.reply(0).error, 0);
    assert_eq!(raw.read_ok(11, 0, 2), b"ok");
}

#[test]
fn oversized_payloads_are_discarded_or_close_the_connection() {
    let node = node_with("v", "64M");
    let mut raw = Raw::connect(&node.nbd);
    raw.go("v");
    let over = (32 << 20) + 4096;
    raw.write(1, 0, &vec![0xee; over]);
    assert_eq!(raw.reply(0).error, EINVAL, "payload over the maximum");
    assert_eq!(raw.read_ok(2, 0, 4096), vec![0u8; 4096], "nothing written");
    raw.request(0, CMD_READ, 3, 0, over as u32);
    assert_eq!(raw.reply(0).error, EINVAL, "read over the maximum");
    // An absurd length is not read at all: the server hangs up.
    raw.request(0, CMD_WRITE, 4, 0, 1 << 30);
    assert!(raw.is_closed());
}

#[test]
fn simple_and_structured_replies_and_unaligned_io() {
    use std::io::Write;
    let node = node_with("v", "1M");
    // Simple replies (no structured negotiation), unaligned offsets and lengths.
    let mut raw = Raw::connect(&node.nbd);
    raw.go("v");
    let data = pseudo_random(7, 3333);
    raw.write(1, 1001, &data);
    assert_eq!(raw.reply(0).error, 0);
    assert_eq!(raw.read_ok(2, 1001, 3333), data);
    // A large read takes the scratch-buffer path; pipelined behind a small one.
    let big = pseudo_random(8, 300_000);
    raw.write(20, 65536, &big);
    assert_eq!(raw.reply(0).error, 0);
    // Both in one segment: the server must answer the second without more input.
    let mut both = Raw::request_bytes(0, CMD_READ, 21, 65536, big.len() as u32);
    both.extend(Raw::request_bytes(0, CMD_READ, 22, 1001, 3333));
    raw.s.write_all(&both).unwrap();
    let length = |cookie| if cookie == 21 { big.len() } else { 3333 };
    let mut replies = [raw.reply_with(length), raw.reply_with(length)];
    replies.sort_by_key(|r| r.cookie);
    assert!(replies[0].payload == big, "large read");
    assert_eq!(replies[1].payload, data);
    raw.request(0, CMD_DISC, 3, 0, 0);
    assert!(raw.is_closed());

    // Structured replies: READ data chunk, error chunk with a message, BLOCK_STATUS.
    let mut raw = Raw::connect(&node.nbd);
    raw.structured();
    let mut meta = Vec::new();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(b"v");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    let r = raw.option(OPT_SET_META_CONTEXT, &meta);
    assert_eq!(r[0].kind, REP_META_CONTEXT);
    assert_eq!(r[1].kind, REP_ACK);
    raw.go("v");
    raw.request(0, CMD_READ, 4, 1001, 3333);
    let r = raw.reply(0);
    assert!(r.structured);
    assert_eq!((r.kind, r.flags & 1, r.cookie), (1, 1, 4), "one OFFSET_DATA chunk, done");
    assert_eq!(u64::from_be_bytes(r.payload[0..8].try_into().unwrap()), 1001);
    assert_eq!(&r.payload[8..], &data[..]);
    raw.request(0, CMD_READ, 5, 1 << 20, 1);
    let r = raw.reply(0);
    assert_eq!((r.kind, r.error), (0x8001, EINVAL));
    assert!(String::from_utf8_lossy(&r.payload[6..]).contains("past the end"));
    raw.request(1 << 3, CMD_BLOCK_STATUS, 6, 0, 1 << 20);
    let r = raw.reply(0);
    assert_eq!(r.kind, 5);
    assert_eq!(r.payload.len(), 4 + 8, "REQ_ONE gives one extent");
    let length = u32::from_be_bytes(r.payload[4..8].try_into().unwrap());
    let flags = u32::from_be_bytes(r.payload[8..12].try_into().unwrap());
    assert_eq!(flags, 0, "the first block holds data");
    assert!((4096..=1 << 20).contains(&length));
}

#[test]
fn read_only_flag_is_not_set_and_writes_need_no_permission() {
    let node = node_with("v", "1M");
    let mut raw = Raw::connect(&node.nbd);
    let (_, flags) = raw.go("v");
    assert_eq!(flags & 2, 0, "volumes are writable");
    assert_ne!(flags & (1 << 8), 0, "CAN_MULTI_CONN");
    assert_ne!(flags & (1 << 2), 0, "SEND_FLUSH");
    let _ = EPERM;
}

#[test]
fn random_garbage_never_takes_the_server_down() {
    use std::io::Write;
    let node = node_with("v", "1M");
    for seed in 0..64u64 {
        let garbage = pseudo_random(seed, 64 + (seed as usize * 37) % 4000);
        let mut raw = Raw::connect(&node.nbd);
        if seed % 2 == 0 {
            // Garbage in the transmission phase too.
            raw.go("v");
        } else {
            // A valid option header announcing garbage data.
            let mut b = IHAVEOPT.to_be_bytes().to_vec();
            b.extend_from_slice(&((seed % 12) as u32).to_be_bytes());
            b.extend_from_slice(&(garbage.len() as u32).to_be_bytes());
            raw.s.write_all(&b).unwrap();
        }
        let _ = raw.s.write_all(&garbage);
    }
    // The server still serves, and the volume is untouched by the garbage handshakes.
    let mut raw = Raw::connect(&node.nbd);
    raw.go("v");
    raw.write(1, 0, b"alive");
    assert_eq!(raw.reply(0).error, 0);
    assert_eq!(raw.read_ok(2, 0, 5), b"alive");
}
