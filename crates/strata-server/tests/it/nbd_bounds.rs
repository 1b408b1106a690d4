//! The NBD server's bounds, black box over raw sockets: a client that pipelines READs
//! and never reads a reply costs a bounded amount of memory (the node's VmRSS) while
//! other clients are served; one address cannot hold more than
//! `NBD_CONNECTIONS_PER_ADDRESS_MAX` connections; an idle connection is closed.

use crate::harness::{Node, STRATA};
use crate::raw::{Raw, CMD_READ};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

#[test]
fn unread_pipelined_reads_cost_bounded_memory_and_others_are_served() {
    let node = Node::start();
    node.create("big", "2G");
    let before = rss_bytes(node.pid());
    let mut flood = Raw::connect(&node.nbd);
    flood.go("big");
    // 10,000 READs of 127 KiB (1.2 GiB of replies), each answered inline into the
    // output buffer (smaller than the pooled-buffer reads; the data is a hole), sent from
    // a thread since the server stops reading them; no reply is ever read. Each 64 KiB of
    // requests asks for 290 MiB.
    let mut requests = Vec::new();
    for i in 0..10_000u64 {
        requests.extend(Raw::request_bytes(0, CMD_READ, i, (i % 8192) << 17, 127 << 10));
    }
    let mut writer = flood.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&requests);
    });
    std::thread::sleep(Duration::from_secs(3));
    // Another client is served meanwhile.
    let mut other = Raw::connect(&node.nbd);
    other.go("big");
    other.write(1, 0, &[7u8; 4096]);
    assert_eq!(other.reply(0).error, 0);
    assert_eq!(other.read_ok(2, 0, 4096), vec![7u8; 4096]);
    let grown = rss_bytes(node.pid()).saturating_sub(before);
    eprintln!("the node grew by {} MiB under the flood", grown >> 20);
    // Queued replies are bounded at 64 MiB (plus one request's overshoot): well under the
    // 1.2 GiB the requests ask for, and under the 290 MiB or more that a server which
    // did not count inline replies queued from one socket read.
    assert!(grown < 200 << 20, "the node grew by {} MiB", grown >> 20);
    drop(other);
    flood.s.shutdown(std::net::Shutdown::Both).unwrap();
    sender.join().unwrap();
}

#[test]
fn one_address_cannot_hold_more_than_its_share_of_connections() {
    let node = Node::start();
    node.create("v", "16M");
    let held: Vec<Raw> = (0..64).map(|_| Raw::connect(&node.nbd)).collect();
    // The 65th is closed at once: no greeting.
    let mut extra = TcpStream::connect(&node.nbd).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 18];
    assert!(matches!(extra.read(&mut b), Ok(0) | Err(_)), "closed without a greeting");
    // A connection that ends gives its place back.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let mut raw = Raw::connect(&node.nbd);
    raw.go("v");
    let log = node.log_tail(50);
    assert!(log.contains("closed at once"), "one rate-limited line: {log}");
    assert_eq!(log.matches("closed at once").count(), 1, "{log}");
}

#[test]
fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let tmp = tempfile::tempdir().unwrap();
    let mut command = Command::new(STRATA);
    command
        .args(["up", "--nbd", "127.0.0.1:0", "--http", "127.0.0.1:0", "--rpc", "127.0.0.1:0"])
        .args(["--nbd-idle-timeout-secs", "1", "--data-dir"])
        .arg(tmp.path());
    let node = Node::launch_command(command, tmp.path());
    node.create("v", "16M");
    let mut idle = Raw::connect(&node.nbd);
    idle.go("v");
    let mut busy = Raw::connect(&node.nbd);
    busy.go("v");
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        busy.read_ok(1, 0, 4096);
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(idle.is_closed(), "idle for 3.5 s with a 1 s timeout");
    busy.read_ok(2, 0, 4096);
}

/// By default an idle connection stays (a VM's disk may sit idle for days) and the kernel
/// watches it with TCP keepalive instead, so a client whose machine died is closed.
#[test]
fn an_idle_client_stays_connected_by_default_under_tcp_keepalive() {
    let node = Node::start();
    node.create("v", "16M");
    let mut idle = Raw::connect(&node.nbd);
    idle.go("v");
    let port = node.nbd.rsplit_once(':').unwrap().1;
    // The server's side of the connection: a keepalive timer (about 60 s) once the
    // replies sent are acknowledged (until then ss shows the retransmission timer).
    let mut text = String::new();
    for _ in 0..20 {
        let out = Command::new("ss")
            .args(["-tno", "state", "established", &format!("( sport = :{port} )")])
            .output()
            .expect("run ss");
        text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("timer:(keepalive") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(text.contains("timer:(keepalive"), "no keepalive on the NBD socket: {text}");
    std::thread::sleep(Duration::from_millis(1500));
    // Still served after sitting idle (closed, this read would fail).
    idle.read_ok(1, 0, 4096);
}
