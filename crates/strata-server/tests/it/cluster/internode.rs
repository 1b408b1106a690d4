//! Inter-node traffic can be neither replayed nor read, and the RPC port survives a flood.
//!
//! Issue 15, item 3: a captured component write applied again later on any connection,
//! and nothing was encrypted. Here a recording TCP proxy sits between a node forwarding
//! writes of a replicated volume (the test, with the cluster secret, through the same
//! `DataPeer` the nodes use) and the volume's owner: it records a write's bytes and
//! replays them on the same connection later, on a new connection, and to the other two
//! nodes. Every replay is refused (the node says so), the copies keep the newer data, and
//! the nodes keep serving. Then 2,000 connections that never finish a handshake do not
//! stop the cluster, and are all closed, at once or by the handshake deadline.

use super::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};

/// The initiator's handshake message on the wire (magic, length, Noise message).
const HELLO_BYTES: usize = 6 + 48;

/// One proxied connection: what the client sent, and the way to the server.
type Recorded = (Arc<Mutex<Vec<u8>>>, TcpStream);

/// A TCP proxy to one address that records each connection's client-to-server bytes and
/// can write more into a connection's server side.
struct Recorder {
    addr: String,
    connections: Arc<Mutex<Vec<Recorded>>>,
}

impl Recorder {
    fn start(target: &str) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let connections: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let (list, target) = (connections.clone(), target.to_owned());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&target) else { continue };
                let recorded = Arc::new(Mutex::new(Vec::new()));
                list.lock().unwrap().push((recorded.clone(), server.try_clone().unwrap()));
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap(), Some(recorded));
                pipe(server, client, None);
            }
        });
        Recorder { addr, connections }
    }

    /// What the client of connection `i` has sent so far.
    fn recorded(&self, i: usize) -> Vec<u8> {
        self.connections.lock().unwrap()[i].0.lock().unwrap().clone()
    }

    /// Writes `bytes` to the server of connection `i`, as if its client sent them.
    fn inject(&self, i: usize, bytes: &[u8]) {
        let mut server = self.connections.lock().unwrap()[i].1.try_clone().unwrap();
        server.write_all(bytes).unwrap();
    }
}

/// Copies `from` to `to` (recording what passes) until either side ends.
fn pipe(mut from: TcpStream, mut to: TcpStream, record: Option<Arc<Mutex<Vec<u8>>>>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if let Some(r) = &record {
                r.lock().unwrap().extend_from_slice(&buf[..n]);
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

/// Sends `bytes` on a new connection to `addr` and waits until the node closes it.
fn replay_on_a_new_connection(addr: &str, bytes: &[u8]) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream.write_all(bytes).unwrap();
    let mut sink = Vec::new();
    // The node answers the replayed handshake message (it cannot tell a replay from a
    // node's first message), then refuses the confirmation record and closes.
    let _ = stream.read_to_end(&mut sink);
    assert!(sink.len() < 200, "the node answered only the handshake: {} bytes", sink.len());
}

/// How often a node said it refused inter-node bytes: a record on a connection, or the
/// replay of another connection's handshake (whose confirmation record does not open).
fn refusals(m: &Member) -> usize {
    let log = m.node().log_tail(10_000);
    log.matches("record failed authentication").count()
        + log.matches("did not confirm the handshake").count()
}

#[test]
fn a_captured_write_replayed_later_on_a_new_connection_or_to_another_node_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let members = three_members(tmp.path());
    let (copies, _) = create_replicated(&members[0], "rp", "4M");
    // Served once through node 1's export: node 1 owns it and serves.
    crate::harness::qemu_io(&members[0].node().uri("rp"), &["write -P 0x11 0 64k"]);
    let (o, epoch) = owner_of(&members, "rp");
    let owner_copy = copies.iter().find(|(node, _)| *node == o as u64 + 1).unwrap().1;
    let key = DataKey::from_secret(&std::fs::read(members[0].dir.join("secret")).unwrap());
    let proxy = Recorder::start(&members[o].rpc);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // As node 99 forwarding its write number `number` to the owner (no copy there, so
    // no automatic move towards it).
    // A connection the owner closed is found dead at the next call, which is lost:
    // tried again (a new connection), as a node would.
    let forward = |peer: &DataPeer, number: u32, byte: u8| {
        let mut h = request(Kind::Write, owner_copy, epoch, 99, 0);
        h.flags = FLAG_VOLUME;
        h.count = number;
        let mut status = rt.block_on(peer.call(h, &[byte; 4096])).map(|(r, _)| r.status);
        if matches!(status, Err(CallError::Lost(_))) {
            status = rt.block_on(peer.call(h, &[byte; 4096])).map(|(r, _)| r.status);
        }
        assert_eq!(status, Ok(Status::Ok), "write {number}");
    };
    let through_proxy = DataPeer::new(key.clone(), proxy.addr.clone());
    forward(&through_proxy, 1, 0xaa);
    let captured = proxy.recorded(0);
    assert!(captured.len() > HELLO_BYTES + 4096, "the write crossed the proxy");
    assert!(
        !captured.windows(64).any(|w| w == [0xaa; 64])
            && !captured.windows(4).any(|w| w == b"SDP1"),
        "the write's data and frame travel encrypted"
    );
    // A newer write to the same block, over the same connection.
    forward(&through_proxy, 2, 0xbb);
    let before: Vec<usize> = members.iter().map(refusals).collect();

    // 1. The captured write's records, later on the same connection.
    proxy.inject(0, &captured[HELLO_BYTES..]);
    wait_logged(&members, 20, "the owner refusing the records replayed on its connection", || {
        refusals(&members[o]) > before[o]
    });
    // 2. The whole capture, handshake and all, on a new connection to the owner.
    replay_on_a_new_connection(&members[o].rpc, &captured);
    // 3. And to each other node.
    for (i, m) in members.iter().enumerate().filter(|(i, _)| *i != o) {
        replay_on_a_new_connection(&m.rpc, &captured);
        wait_logged(&members, 20, "the other node refusing the replay", || refusals(m) > before[i]);
    }
    wait_logged(&members, 20, "the owner refusing the replay on a new connection", || {
        refusals(&members[o]) > before[o] + 1
    });

    // Nothing replayed applied: every copy holds the newer write, and the nodes serve
    // (the forwarding node reconnects; NBD clients of every node read and write).
    wait_copies_equal(&members, &key, "rp", 1);
    forward(&through_proxy, 3, 0xbb);
    for m in &members {
        crate::harness::qemu_io(&m.node().uri("rp"), &["read -P 0xbb 0 4k", "read -P 0x11 4k 60k"]);
    }
    crate::harness::qemu_io(&members[1].node().uri("rp"), &["write -P 0xcc 64k 64k"]);
    crate::harness::qemu_io(&members[2].node().uri("rp"), &["read -P 0xcc 64k 64k"]);
    wait_copies_equal(&members, &key, "rp", 1);
}

#[test]
fn two_thousand_stalled_connections_neither_stop_the_cluster_nor_stay_open() {
    // The test holds 2,000 sockets.
    strata_io::net::raise_descriptor_limit().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let members = three_members(tmp.path());
    create_replicated(&members[0], "before", "4M");
    crate::harness::qemu_io(&members[0].node().uri("before"), &["write -P 0x21 0 64k"]);
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let target: std::net::SocketAddr = members[0].rpc.parse().unwrap();
    // From four addresses (as from four hosts), 500 each: half send nothing, half half a
    // handshake message.
    let opened = Instant::now();
    let flood = rt.block_on(async {
        let mut flood = Vec::new();
        for i in 0..2000u32 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(format!("127.0.0.{}:0", 60 + i % 4).parse().unwrap()).unwrap();
            let mut stream = socket.connect(target).await.unwrap();
            if i % 2 == 1 {
                use tokio::io::AsyncWriteExt;
                let _ = stream.write_all(b"SNX1\x30\x00partial").await;
            }
            flood.push(stream);
        }
        flood
    });

    // The cluster works meanwhile, without a restart: a new replicated volume, written
    // and read back through each node's export.
    create_replicated(&members[0], "during", "4M");
    crate::harness::qemu_io(&members[1].node().uri("during"), &["write -P 0x22 0 64k"]);
    for m in &members {
        crate::harness::qemu_io(&m.node().uri("during"), &["read -P 0x22 0 64k"]);
        crate::harness::qemu_io(&m.node().uri("before"), &["read -P 0x21 0 64k"]);
    }

    // Every flood connection is closed: beyond the limits at once, the rest by the
    // handshake deadline (5 s).
    let closed = rt.block_on(async {
        let mut waits = Vec::new();
        for mut stream in flood {
            waits.push(tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 512];
                let read = tokio::time::timeout(Duration::from_secs(30), async {
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                });
                read.await.is_ok()
            }));
        }
        let mut closed = 0;
        for w in waits {
            closed += usize::from(w.await.unwrap());
        }
        closed
    });
    assert_eq!(closed, 2000, "every stalled connection was closed");
    assert!(opened.elapsed() < Duration::from_secs(60), "{:?}", opened.elapsed());
    // Said, but not once per connection: at most a line per source address and kind.
    let log = members[0].node().log_tail(100_000);
    let lines = log.lines().filter(|l| l.contains("inter-node connection")).count();
    assert!((1..=12).contains(&lines), "{lines} log lines about the flood:\n{log}");

    // And after it, still serving.
    create_replicated(&members[0], "after", "4M");
    crate::harness::qemu_io(&members[2].node().uri("after"), &["write -P 0x23 0 64k"]);
    crate::harness::qemu_io(&members[0].node().uri("after"), &["read -P 0x23 0 64k"]);
}
