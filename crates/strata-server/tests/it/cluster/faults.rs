//! The fault harness: three real `strata serve` processes, a replicated volume, and a
//! verifying workload over NBD while nodes are killed (-9), paused past the session
//! timeout, restarted, and brought back with an emptied data disk.
//!
//! Every 4 KiB block the workload writes carries the volume's tag, its block number, a
//! unique write id and a checksum, so any read names exactly the write it returned (or
//! shows damage). Each worker owns its blocks and runs one request at a time, moving to
//! another node when its node stops answering; it records each operation's start, end
//! and outcome (done, failed, or unknown when the connection broke).
//!
//! After healing, the checks: every read returned the last acknowledged write of its
//! block or a later write whose outcome the client never learned (and, once it saw such
//! a write, nothing older until the next acknowledged one); a final read of every block
//! does the same (no acknowledged write lost); every copy is active and the copies are
//! byte-for-byte equal (so no write of a deposed owner applied anywhere).
//!
//! Run as root with `nft` (nftables) installed, the schedule also cuts the owner off from
//! the other nodes (each node has its own 127.0.0.x) and drops a fifth of one node's
//! packets; otherwise those phases are skipped, and the test says so.
//!
//! `STRATA_FAULT_ROUNDS=N` runs the fault schedule N times (1 in CI; more by hand).

use super::{owner_of, three_members, wait_copies_equal, wait_logged, Member};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_frame::frame::DataKey;

const VOLUME: &str = "f1";
const TAG: u64 = 0x5354_5241_5441_4631;
/// Blocks the workload uses, one per 16 KiB over the first 8 MiB (so writes dirty many
/// bitmap regions).
const BLOCKS: u64 = 512;
const STRIDE: u64 = 16 << 10;
const WORKERS: u64 = 4;

/// A fallible NBD client (simple replies), enough for the workload.
pub(super) struct Client {
    s: TcpStream,
}

fn io_err(what: &str) -> std::io::Error {
    std::io::Error::other(what.to_owned())
}

impl Client {
    pub(super) fn connect(addr: &str, volume: &str) -> std::io::Result<Client> {
        let s = TcpStream::connect(addr)?;
        // Longer than the forwarding patience (60 s): a stalled failover shows as a
        // failed request, not a hung test.
        s.set_read_timeout(Some(Duration::from_secs(90)))?;
        s.set_nodelay(true)?;
        let mut c = Client { s };
        let hello = c.read_n(18)?;
        if &hello[0..8] != b"NBDMAGIC" {
            return Err(io_err("not an NBD server"));
        }
        c.s.write_all(&3u32.to_be_bytes())?;
        let mut go = Vec::new();
        go.extend_from_slice(&0x4948_4156_454F_5054u64.to_be_bytes());
        go.extend_from_slice(&7u32.to_be_bytes());
        go.extend_from_slice(&(4 + volume.len() as u32 + 2).to_be_bytes());
        go.extend_from_slice(&(volume.len() as u32).to_be_bytes());
        go.extend_from_slice(volume.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        c.s.write_all(&go)?;
        loop {
            let h = c.read_n(20)?;
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let length = u32::from_be_bytes(h[16..20].try_into().unwrap());
            c.read_n(length as usize)?;
            if kind == 1 {
                return Ok(c);
            }
            if kind & (1 << 31) != 0 {
                return Err(io_err("export refused"));
            }
        }
    }

    fn read_n(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }

    /// One request; `Ok(None)` is an error reply, `Ok(Some(data))` success.
    pub(super) fn call(
        &mut self,
        kind: u16,
        offset: u64,
        payload: &[u8],
        read: u32,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).max(read).to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b)?;
        let h = self.read_n(16)?;
        if u32::from_be_bytes(h[0..4].try_into().unwrap()) != 0x6744_6698 {
            return Err(io_err("bad reply magic"));
        }
        if u32::from_be_bytes(h[4..8].try_into().unwrap()) != 0 {
            return Ok(None);
        }
        Ok(Some(self.read_n(read as usize)?))
    }
}

/// A block's bytes for write `id`.
fn block(b: u64, id: u64) -> Vec<u8> {
    let mut data = vec![0u8; 4096];
    data[0..8].copy_from_slice(&TAG.to_le_bytes());
    data[8..16].copy_from_slice(&b.to_le_bytes());
    data[16..24].copy_from_slice(&id.to_le_bytes());
    let mut x = id | 1;
    for chunk in data[32..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    let sum = checksum(&data);
    data[24..32].copy_from_slice(&sum.to_le_bytes());
    data
}

fn checksum(data: &[u8]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&data[0..24]);
    h.update(&data[32..]);
    u64::from_le_bytes(h.finalize().as_bytes()[0..8].try_into().unwrap())
}

/// The write id a block's bytes name (0: never written), or what is wrong with them.
fn decode(b: u64, data: &[u8]) -> Result<u64, String> {
    if data.iter().all(|x| *x == 0) {
        return Ok(0);
    }
    let field = |at: usize| u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
    if field(0) != TAG || field(8) != b || field(24) != checksum(data) {
        return Err(format!("block {b} holds damaged or misplaced data"));
    }
    Ok(field(16))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    /// Failed or unknown: it may or may not have taken effect.
    Maybe,
}

#[derive(Clone, Debug)]
enum Op {
    Write { id: u64, outcome: Outcome },
    Read { saw: u64 },
}

/// Per block, its operations in order (one worker per block, one request at a time).
type History = Arc<Mutex<Vec<Vec<(Op, u128, u128)>>>>;

/// Reads of other workers' blocks, through whatever node the reader uses: (block, write
/// id seen, start, end) — these catch a node serving a block older than an acknowledged
/// write made through another node.
type CrossReads = Arc<Mutex<Vec<(u64, u64, u128, u128)>>>;

/// What the workers share: where to connect, when to stop, what they record.
#[derive(Clone)]
struct Shared {
    addrs: Vec<String>,
    stop: Arc<AtomicBool>,
    history: History,
    cross: CrossReads,
    errors: Arc<Mutex<Vec<String>>>,
    /// Times are µs since this.
    epoch: Instant,
}

fn worker(w: u64, shared: Shared) {
    let Shared { addrs, stop, history, cross, errors, epoch } = shared;
    let mine: Vec<u64> = (0..BLOCKS).filter(|b| b % WORKERS == w).collect();
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (w + 1);
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut node = w as usize % addrs.len();
    let mut client: Option<Client> = None;
    let mut count = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = client.as_mut() else {
            match Client::connect(&addrs[node], VOLUME) {
                Ok(c) => client = Some(c),
                Err(_) => {
                    node = (node + 1) % addrs.len();
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            continue;
        };
        let b = mine[(next() % mine.len() as u64) as usize];
        let offset = b * STRIDE;
        let start = epoch.elapsed().as_micros();
        count += 1;
        let (op, broke) = if next() % 10 < 7 {
            let id = (w + 1) << 40 | count;
            let result = c.call(1, offset, &block(b, id), 0);
            let outcome =
                if matches!(result, Ok(Some(_))) { Outcome::Done } else { Outcome::Maybe };
            (Some(Op::Write { id, outcome }), result.is_err())
        } else if next() % 4 == 0 {
            let result = c.call(3, 0, &[], 0); // FLUSH
            (None, result.is_err())
        } else {
            // Half the reads are of another worker's block.
            let theirs = next() % 2 == 0;
            let b = if theirs { next() % BLOCKS } else { b };
            match c.call(0, b * STRIDE, &[], 4096) {
                Ok(Some(data)) => match decode(b, &data) {
                    Ok(saw) if theirs => {
                        let end = epoch.elapsed().as_micros();
                        cross.lock().unwrap().push((b, saw, start, end));
                        (None, false)
                    }
                    Ok(saw) => (Some(Op::Read { saw }), false),
                    Err(e) => {
                        errors.lock().unwrap().push(e);
                        (None, false)
                    }
                },
                Ok(None) => (None, false),
                Err(_) => (None, true),
            }
        };
        let end = epoch.elapsed().as_micros();
        if let Some(op) = op {
            history.lock().unwrap()[b as usize].push((op, start, end));
        }
        if broke {
            client = None;
            node = (node + 1) % addrs.len();
        }
    }
}

/// Checks one block's history, ending with its final read: linearizable as a register
/// whose writes of unknown outcome may take effect at any time after they were sent, or
/// never (so a read returns the block's current value or such a write, which then is
/// the current value).
fn check_block(b: usize, ops: &[(Op, u128, u128)]) -> Result<(), String> {
    let mut current = 0u64;
    let mut pending: Vec<u64> = Vec::new();
    for (op, start, _) in ops {
        match op {
            Op::Write { id, outcome: Outcome::Done } => current = *id,
            Op::Write { id, outcome: Outcome::Maybe } => pending.push(*id),
            Op::Read { saw } if *saw == current => {}
            Op::Read { saw } => {
                let Some(at) = pending.iter().position(|p| p == saw) else {
                    return Err(format!(
                        "block {b}: a read at {start} µs returned write {saw:#x}; the block \
                         held {current:#x}, and only {pending:x?} could have landed since"
                    ));
                };
                current = pending.remove(at);
            }
        }
    }
    Ok(())
}

/// An nftables table of this test's rules (removed when dropped).
struct Firewall {
    table: String,
}

impl Firewall {
    /// `None` when nft cannot be used here (not root, or not installed).
    fn new() -> Option<Firewall> {
        let table = format!("strata_faults_{}", std::process::id());
        let nft = |args: &[&str]| {
            std::process::Command::new("nft").args(args).output().is_ok_and(|o| o.status.success())
        };
        let chain = format!(
            "add chain inet {table} out {{ type filter hook output priority 0 ; policy accept ; }}"
        );
        (nft(&["add", "table", "inet", &table]) && nft(&[chain.as_str()]))
            .then_some(Firewall { table })
    }

    fn rule(&self, rule: &str) {
        let text = format!("add rule inet {} out {rule}", self.table);
        let out = std::process::Command::new("nft").arg(&text).output().unwrap();
        assert!(out.status.success(), "nft {text}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Cuts node `id` off from the other nodes, both ways.
    fn cut(&self, id: u64) {
        let (me, others) = (Member::ip(id), Firewall::others(id));
        self.rule(&format!("ip saddr {me} ip daddr {others} drop"));
        self.rule(&format!("ip saddr {others} ip daddr {me} drop"));
    }

    /// Drops `percent` % of the packets between node `id` and the others.
    fn lossy(&self, id: u64, percent: u32) {
        let (me, others) = (Member::ip(id), Firewall::others(id));
        self.rule(&format!(
            "ip saddr {me} ip daddr {others} numgen random mod 100 < {percent} drop"
        ));
        self.rule(&format!(
            "ip saddr {others} ip daddr {me} numgen random mod 100 < {percent} drop"
        ));
    }

    fn others(id: u64) -> String {
        let ips: Vec<String> = (1..=3).filter(|n| *n != id).map(Member::ip).collect();
        format!("{{ {} }}", ips.join(", "))
    }

    fn heal(&self) {
        let out = std::process::Command::new("nft")
            .args(["flush", "chain", "inet", &self.table, "out"])
            .output()
            .unwrap();
        assert!(out.status.success(), "nft flush: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "inet", &self.table])
            .output();
    }
}

/// A read of block `b` over `[start, end]` by another worker may return: a write that
/// started before the read ended, and is not older than the last write acknowledged
/// before the read started (a write of unknown outcome may land any time after it was
/// sent, so it is never "older"); or nothing written, if no write was acknowledged
/// before the read started.
fn check_cross(
    history: &[Vec<(Op, u128, u128)>],
    read: (u64, u64, u128, u128),
) -> Result<(), String> {
    let (b, saw, start, end) = read;
    let writes: Vec<(u64, Outcome, u128, u128)> = history[b as usize]
        .iter()
        .filter_map(|(op, s, e)| match op {
            Op::Write { id, outcome } => Some((*id, *outcome, *s, *e)),
            Op::Read { .. } => None,
        })
        .collect();
    let settled = writes.iter().rposition(|w| w.1 == Outcome::Done && w.3 < start);
    let fine = if saw == 0 {
        settled.is_none()
    } else {
        match writes.iter().position(|w| w.0 == saw) {
            None => false,
            Some(k) => {
                writes[k].2 < end && settled.is_none_or(|s| k >= s || writes[k].1 == Outcome::Maybe)
            }
        }
    };
    if fine {
        return Ok(());
    }
    Err(format!(
        "block {b}: a read over [{start}, {end}] µs through another node returned write \
         {saw:#x}; the block's writes (id, outcome, start, end): {writes:x?}"
    ))
}

fn rounds() -> usize {
    std::env::var("STRATA_FAULT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1)
}

fn pause(secs: u64) {
    std::thread::sleep(Duration::from_secs(secs));
}

#[test]
fn a_verifying_workload_survives_kills_pauses_restarts_and_an_emptied_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let mut members = three_members(tmp.path());
    let (ok, text) =
        super::cli(&members[0], &["volume", "create", VOLUME, "--size", "16M", "--replicas", "3"]);
    assert!(ok, "{text}");
    let secret = std::fs::read(members[0].dir.join("secret")).unwrap();
    let key = DataKey::from_secret(&secret);
    wait_logged(&members, 20, "every node to serve f1", || {
        members.iter().all(|m| {
            m.get("/v1/volumes")
                .is_some_and(|v| v.as_array().unwrap().iter().any(|v| v["name"] == VOLUME))
        })
    });
    std::thread::sleep(Duration::from_secs(2)); // The stewards export it.

    let shared = Shared {
        addrs: members.iter().map(|m| m.node().nbd.clone()).collect(),
        stop: Arc::new(AtomicBool::new(false)),
        history: Arc::new(Mutex::new(vec![Vec::new(); BLOCKS as usize])),
        cross: Arc::default(),
        errors: Arc::default(),
        epoch: Instant::now(),
    };
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let shared = shared.clone();
            std::thread::spawn(move || worker(w, shared))
        })
        .collect();
    let Shared { stop, history, cross, errors, .. } = shared;

    let firewall = Firewall::new();
    if firewall.is_none() {
        eprintln!("nft unusable here (not root, or nftables not installed): no partitions");
    }
    for round in 0..rounds() {
        eprintln!("fault round {}", round + 1);
        pause(3);
        // A copy's node is killed and comes back: its copy is stale, then resynced.
        let (o, _) = owner_of(&members, VOLUME);
        let other = (o + 1) % 3;
        members[other].node.take().unwrap().kill9();
        pause(3);
        members[other].start();
        pause(3);
        // The owner is paused beyond the session timeout: another node takes the volume;
        // resumed, the old owner applies nothing more.
        let (o, _) = owner_of(&members, VOLUME);
        members[o].signal("-STOP");
        pause(14);
        members[o].signal("-CONT");
        pause(3);
        // The (new) owner is killed and restarted at once.
        let (o, _) = owner_of(&members, VOLUME);
        members[o].node.take().unwrap().kill9();
        members[o].start();
        pause(4);
        // A node comes back with an emptied data disk: its copy is rebuilt in full.
        let (o, _) = owner_of(&members, VOLUME);
        let gone = (o + 2) % 3;
        members[gone].kill9_with_emptied_data_disk();
        members[gone].start();
        pause(4);
        if let Some(firewall) = &firewall {
            // The owner is cut off from the others: its session lapses, it stops serving,
            // another node takes the volume; healed, it rejoins as a copy.
            let (o, epoch) = owner_of(&members, VOLUME);
            firewall.cut(members[o].id);
            pause(16);
            // (Asked of a node on the majority side: the cut one's view is stale.)
            let (now, later) = owner_of(std::slice::from_ref(&members[(o + 1) % 3]), VOLUME);
            firewall.heal();
            assert!(now != o && later > epoch, "the cut-off owner was replaced: {now} {later}");
            pause(4);
            // A fifth of one node's packets are lost for a while.
            let (o, _) = owner_of(&members, VOLUME);
            firewall.lossy(members[(o + 1) % 3].id, 20);
            pause(5);
            firewall.heal();
            pause(3);
        }
    }
    // Healed: the workers stop (a restarted node listens on its old NBD address, so they
    // reached every node all along).
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let errors = errors.lock().unwrap().clone();
    assert!(errors.is_empty(), "damaged reads: {errors:?}");

    // Healed: every copy active and equal; then every block read once more.
    wait_copies_equal(&members, &key, VOLUME, 16);
    let mut history = history.lock().unwrap().clone();
    let node = members.iter().find(|m| m.node.is_some()).unwrap();
    let mut c = Client::connect(&node.node().nbd, VOLUME).unwrap();
    for (b, ops) in history.iter_mut().enumerate() {
        let data = c.call(0, b as u64 * STRIDE, &[], 4096).unwrap().expect("final read");
        let saw = decode(b as u64, &data).unwrap();
        ops.push((Op::Read { saw }, u128::MAX, u128::MAX));
    }
    let cross = cross.lock().unwrap().clone();
    for read in &cross {
        if let Err(e) = check_cross(&history, *read) {
            for m in members.iter().filter(|m| m.node.is_some()) {
                eprintln!("---- node {} ----\n{}", m.id, m.node().log_tail(60));
            }
            panic!("{e}");
        }
    }
    let (mut writes, mut done, mut reads) = (0, 0, 0);
    for (b, ops) in history.iter().enumerate() {
        if let Err(e) = check_block(b, ops) {
            for m in members.iter().filter(|m| m.node.is_some()) {
                eprintln!("---- node {} ----\n{}", m.id, m.node().log_tail(60));
            }
            panic!("{e}\n(its operations: {ops:?})");
        }
        for (op, _, _) in ops {
            match op {
                Op::Write { outcome, .. } => {
                    writes += 1;
                    done += (*outcome == Outcome::Done) as usize;
                }
                Op::Read { .. } => reads += 1,
            }
        }
    }
    // (Counted since each node's last start.)
    let local: u64 =
        members.iter().filter(|m| m.node.is_some()).map(|m| super::local_reads(m, VOLUME)).sum();
    eprintln!(
        "{writes} writes ({done} acknowledged), {reads} reads and {} reads of other workers' \
         blocks checked; {local} reads served from a non-owner's own copy",
        cross.len()
    );
    assert!(done > 200, "too few acknowledged writes ({done}) to mean anything");
}
