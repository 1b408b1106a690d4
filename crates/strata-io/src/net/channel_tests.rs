//! The channel: frames of any size round-trip; a record tampered with, replayed, reordered
//! or spliced from another connection is refused; a wrong key fails the handshake on both
//! sides with a clear error; junk before authentication is refused after a bounded read;
//! a silent peer hits the deadline. The records cross a man in the middle (this test)
//! that can keep, change and resend them.

use super::*;
use tokio::io::{duplex, DuplexStream, ReadHalf, WriteHalf};

const HELLO_BYTES: usize = HANDSHAKE_HEADER_BYTES + 48;
const CONFIRMATION_RECORD_BYTES: usize = RECORD_HEADER_BYTES + CONFIRMATION.len() + TAG_BYTES;

fn key(secret: &[u8]) -> ChannelKey {
    ChannelKey::from_secret(secret)
}

async fn tcp_pair(
    client: &ChannelKey,
    server: &ChannelKey,
) -> (Result<Channel, HandshakeError>, Result<Channel, HandshakeError>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_key = server.clone();
    let accepted = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        respond(stream, &server_key).await
    });
    let stream = TcpStream::connect(addr).await.unwrap();
    let client = initiate(stream, client).await;
    (client, accepted.await.unwrap())
}

#[tokio::test]
async fn small_and_large_frames_round_trip_both_ways() {
    let k = key(b"cluster secret");
    let (client, server) = tcp_pair(&k, &k).await;
    let (mut client, mut server) = (client.unwrap(), server.unwrap());
    let small = b"SRP1 a small frame".to_vec();
    // Over 64 KiB: several records, the last one partial.
    let large: Vec<u8> = (0..(3 << 20) + 12345).map(|i: u32| (i * 7 + i / 251) as u8).collect();
    let (s, l) = (small.clone(), large.clone());
    let writing = tokio::spawn(async move {
        client.writer.write_all(&s).await.unwrap();
        client.writer.write_all(&l).await.unwrap();
        client
    });
    let mut got = vec![0u8; small.len()];
    server.reader.read_exact(&mut got).await.unwrap();
    assert_eq!(got, small);
    let mut got = vec![0u8; large.len()];
    server.reader.read_exact(&mut got).await.unwrap();
    assert!(got == large, "the large frame differs");
    let mut client = writing.await.unwrap();
    // And back.
    server.writer.write_all(&large).await.unwrap();
    let mut got = vec![0u8; large.len()];
    client.reader.read_exact(&mut got).await.unwrap();
    assert!(got == large, "the large frame back differs");
    // The peer's end of stream reads as the end, not an error.
    drop(server);
    assert_eq!(client.reader.read(&mut got).await.unwrap(), 0);
}

/// A connection whose client-to-server bytes pass through the test: `to_server` takes
/// what the test decides to forward, `from_client` gives what the client wrote.
struct Middle {
    client: Channel<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>,
    server: Channel<ReadHalf<DuplexStream>, WriteHalf<DuplexStream>>,
    from_client: DuplexStream,
    to_server: DuplexStream,
}

async fn middle(k: &ChannelKey) -> Middle {
    let (client_out, mut from_client) = duplex(1 << 20);
    let (mut to_server, server_in) = duplex(1 << 20);
    let (server_out, client_in) = duplex(1 << 20);
    let (client_r, _) = tokio::io::split(client_in);
    let (_, client_w) = tokio::io::split(client_out);
    let (server_r, _) = tokio::io::split(server_in);
    let (_, server_w) = tokio::io::split(server_out);
    let (k1, k2) = (k.clone(), k.clone());
    let client = tokio::spawn(async move { initiate_on(client_r, client_w, &k1).await });
    let server = tokio::spawn(async move { respond_on(server_r, server_w, &k2).await });
    // The client's handshake message and confirmation go through untouched.
    let mut hello = [0u8; HELLO_BYTES];
    from_client.read_exact(&mut hello).await.unwrap();
    to_server.write_all(&hello).await.unwrap();
    let mut confirmation = [0u8; CONFIRMATION_RECORD_BYTES];
    from_client.read_exact(&mut confirmation).await.unwrap();
    to_server.write_all(&confirmation).await.unwrap();
    let client = client.await.unwrap().unwrap();
    let server = server.await.unwrap().unwrap();
    Middle { client, server, from_client, to_server }
}

impl Middle {
    /// The client sends `frame`; returns its records as they crossed the wire.
    async fn records_of(&mut self, frame: &[u8]) -> Vec<Vec<u8>> {
        self.client.writer.write_all(frame).await.unwrap();
        let mut records = Vec::new();
        let mut left = frame.len();
        while left > 0 {
            let mut header = [0u8; RECORD_HEADER_BYTES];
            self.from_client.read_exact(&mut header).await.unwrap();
            let length = u16::from_le_bytes(header) as usize;
            let mut record = header.to_vec();
            record.resize(RECORD_HEADER_BYTES + length, 0);
            self.from_client.read_exact(&mut record[RECORD_HEADER_BYTES..]).await.unwrap();
            left -= length - TAG_BYTES;
            records.push(record);
        }
        records
    }

    async fn forward(&mut self, record: &[u8]) {
        self.to_server.write_all(record).await.unwrap();
    }

    /// What the server reads next: the bytes, or the error that closes the connection.
    async fn server_reads(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut got = vec![0u8; n];
        self.server.reader.read_exact(&mut got).await?;
        Ok(got)
    }
}

fn is_refused(result: io::Result<Vec<u8>>) -> bool {
    matches!(&result, Err(e) if e.kind() == io::ErrorKind::InvalidData
        && e.to_string().contains("failed authentication"))
}

#[tokio::test]
async fn a_record_tampered_with_is_refused() {
    let mut m = middle(&key(b"s")).await;
    let mut record = m.records_of(b"SDP1 write 4k").await.remove(0);
    let last = record.len() - 1;
    record[last - 20] ^= 1;
    m.forward(&record).await;
    assert!(is_refused(m.server_reads(13).await));
}

#[tokio::test]
async fn a_record_replayed_later_on_the_same_connection_is_refused() {
    let mut m = middle(&key(b"s")).await;
    let first = m.records_of(b"SDP1 write A").await.remove(0);
    m.forward(&first).await;
    assert_eq!(m.server_reads(12).await.unwrap(), b"SDP1 write A");
    let second = m.records_of(b"SDP1 write B").await.remove(0);
    m.forward(&second).await;
    assert_eq!(m.server_reads(12).await.unwrap(), b"SDP1 write B");
    m.forward(&first).await;
    assert!(is_refused(m.server_reads(12).await));
}

#[tokio::test]
async fn records_reordered_are_refused() {
    let mut m = middle(&key(b"s")).await;
    let first = m.records_of(b"SDP1 write A").await.remove(0);
    let second = m.records_of(b"SDP1 write B").await.remove(0);
    m.forward(&second).await;
    m.forward(&first).await;
    assert!(is_refused(m.server_reads(12).await));
}

#[tokio::test]
async fn a_record_spliced_from_another_connection_is_refused() {
    let k = key(b"s");
    let (mut one, mut two) = (middle(&k).await, middle(&k).await);
    // The same position on both connections: only the keys differ.
    let from_one = one.records_of(b"SDP1 write A").await.remove(0);
    let _ = two.records_of(b"SDP1 write B").await;
    two.forward(&from_one).await;
    assert!(is_refused(two.server_reads(12).await));
    // And a record from the server's direction, turned back at it, is refused too.
    one.server.writer.write_all(b"SDP1 reply").await.unwrap();
    let mut raw = vec![0u8; RECORD_HEADER_BYTES + 10 + TAG_BYTES];
    one.client.reader.inner.read_exact(&mut raw).await.unwrap();
    one.forward(&raw).await;
    assert!(is_refused(one.server_reads(10).await));
}

#[tokio::test]
async fn a_replayed_handshake_opens_no_channel() {
    let k = key(b"s");
    // A connection's first bytes, as recorded: handshake message and confirmation.
    let (client_out, mut from_client) = duplex(1 << 20);
    let (_, client_w) = tokio::io::split(client_out);
    let (server_out, client_in) = duplex(1 << 20);
    let (client_r, _) = tokio::io::split(client_in);
    let k1 = k.clone();
    let client = tokio::spawn(async move { initiate_on(client_r, client_w, &k1).await });
    let mut recorded = vec![0u8; HELLO_BYTES];
    from_client.read_exact(&mut recorded).await.unwrap();
    let (sr, sw) = tokio::io::split(server_out);
    let (server, client) = tokio::join!(respond_on(&recorded[..], sw, &k), client);
    drop((server, sr));
    let _ = client.unwrap().expect("the client finished its handshake");
    let mut confirmation = vec![0u8; CONFIRMATION_RECORD_BYTES];
    from_client.read_exact(&mut confirmation).await.unwrap();
    recorded.extend_from_slice(&confirmation);
    // Replayed to a responder, the handshake message gets an answer (with a new key),
    // but the confirmation does not open: no channel.
    let err = respond_on(&recorded[..], Vec::new(), &k).await.err().expect("a replay");
    assert!(matches!(err, HandshakeError::Unconfirmed), "{err}");
}

#[tokio::test]
async fn a_wrong_secret_fails_the_handshake_on_both_sides_with_a_clear_error() {
    let (client, server) = tcp_pair(&key(b"ours"), &key(b"theirs")).await;
    let client = client.err().expect("the client is refused");
    let server = server.err().expect("the server refuses");
    assert!(matches!(server, HandshakeError::Unauthenticated), "{server}");
    assert!(server.to_string().contains(SECRET_HINT), "{server}");
    match client {
        HandshakeError::Refused(reason) => assert!(reason.contains("cluster secret"), "{reason}"),
        other => panic!("the client got {other}"),
    }
}

/// Reads from `bytes`, counting what was taken.
struct Counting<'a> {
    bytes: &'a [u8],
    taken: usize,
}

impl AsyncRead for Counting<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = buf.remaining().min(self.bytes.len() - self.taken);
        let at = self.taken;
        buf.put_slice(&self.bytes[at..at + n]);
        self.taken += n;
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn junk_before_the_handshake_is_refused_after_a_bounded_read() {
    let k = key(b"s");
    // A claimed handshake message of 60000 bytes, then that many bytes.
    let mut long = b"SNX1".to_vec();
    long.extend_from_slice(&60000u16.to_le_bytes());
    long.resize(70000, 7);
    // Garbage (an HTTP request), and a plane's frame without the channel (an old node).
    let mut old = b"SRP1".to_vec();
    old.resize(70000, 0);
    let http = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    for (bytes, why) in [(&long, "too long"), (&old, "no handshake"), (&http, "garbage")] {
        let mut reader = Counting { bytes, taken: 0 };
        let mut said = Vec::new();
        let err = respond_on(&mut reader, &mut said, &k).await.err().expect(why);
        assert!(
            matches!(err, HandshakeError::TooLong(_) | HandshakeError::NotStrata),
            "{why}: {err}"
        );
        assert!(reader.taken <= HANDSHAKE_HEADER_BYTES + INTERNODE_HANDSHAKE_BYTES_MAX, "{why}");
        assert_eq!(&said[..4], REFUSAL, "{why}: the peer is told");
    }
    // A well-formed message of random bytes (no secret at all) fails authentication.
    let mut forged = b"SNX1".to_vec();
    forged.extend_from_slice(&48u16.to_le_bytes());
    forged.extend_from_slice(&[0x5a; 48]);
    let mut reader = Counting { bytes: &forged, taken: 0 };
    let err = respond_on(&mut reader, Vec::new(), &k).await.err().expect("forged");
    assert!(matches!(err, HandshakeError::Unauthenticated), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_silent_peer_hits_the_handshake_deadline() {
    let k = key(b"s");
    let (ours, _theirs) = duplex(1024);
    let (r, w) = tokio::io::split(ours);
    let started = tokio::time::Instant::now();
    let err = respond_on(r, w, &k).await.err().expect("no handshake");
    assert!(matches!(err, HandshakeError::TimedOut), "{err}");
    assert_eq!(started.elapsed(), HANDSHAKE_TIMEOUT);
    // A peer that sends half a handshake and stalls too.
    let (ours, mut theirs) = duplex(1024);
    theirs.write_all(b"SNX1\x30\x00half").await.unwrap();
    let (r, w) = tokio::io::split(ours);
    let err = respond_on(r, w, &k).await.err().expect("half a handshake");
    assert!(matches!(err, HandshakeError::TimedOut), "{err}");
    // And the initiator's side: a responder that never answers.
    let (ours, _theirs) = duplex(1024);
    let (r, w) = tokio::io::split(ours);
    let err = initiate_on(r, w, &k).await.err().expect("no answer");
    assert!(matches!(err, HandshakeError::TimedOut), "{err}");
}
