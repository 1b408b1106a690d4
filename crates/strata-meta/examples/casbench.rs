//! CAS load generator for `bench/meta.sh`: the same operation as `../shared/peers/etcd.sh`
//! drives etcd with. One CAS = a linearizable read of the key (its version), then a
//! transaction "if version(key) == v then put(key, value)"; succeeded or conflicted.
//! `own`: client i CASes its own key; `contended`: every client CASes a random one of
//! NKEYS shared keys. Client i talks to member i % members (each member routes to the
//! leader), over one connection per client.
//!
//! ```text
//! casbench --endpoints 127.0.0.1:10811,127.0.0.1:10812,127.0.0.1:10813 --secret FILE \
//!          [--clients 1,16,64] [--modes own,contended] [--duration 10] [--warmup 1]
//!          [--nkeys 8] [--vsize 64]
//! ```
//! Prints one line per case: clients mode ops_s succ conf err p50_ms p99_ms.

use std::sync::Arc;
use std::time::{Duration, Instant};
use strata_meta::rpc::{Key, Peer};
use strata_meta::service::{ClientReply, ClientRequest};
use strata_meta::state::{cas, Origin, Response};

struct Args {
    endpoints: Vec<String>,
    secret: String,
    clients: Vec<usize>,
    modes: Vec<String>,
    duration: f64,
    warmup: f64,
    nkeys: usize,
    vsize: usize,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        endpoints: Vec::new(),
        secret: String::new(),
        clients: vec![1, 16, 64],
        modes: vec!["own".into(), "contended".into()],
        duration: 10.0,
        warmup: 1.0,
        nkeys: 8,
        vsize: 64,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--endpoints" => a.endpoints = value.split(',').map(str::to_owned).collect(),
            "--secret" => a.secret = value,
            "--clients" => {
                a.clients = value
                    .split(',')
                    .map(|c| c.parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad(&e))?
            }
            "--modes" => a.modes = value.split(',').map(str::to_owned).collect(),
            "--duration" => a.duration = value.parse().map_err(|e| bad(&e))?,
            "--warmup" => a.warmup = value.parse().map_err(|e| bad(&e))?,
            "--nkeys" => a.nkeys = value.parse().map_err(|e| bad(&e))?,
            "--vsize" => a.vsize = value.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if a.endpoints.is_empty() || a.secret.is_empty() {
        return Err("--endpoints and --secret are required".into());
    }
    if a.modes.iter().any(|m| m != "own" && m != "contended") {
        return Err("--modes takes own and/or contended".into());
    }
    Ok(a)
}

#[derive(Default)]
struct Tally {
    succ: u64,
    conf: u64,
    err: u64,
    latencies: Vec<Duration>,
    error: Option<String>,
}

async fn one_cas(peer: &Peer, key: &str, value: &[u8]) -> Result<bool, String> {
    let read = peer.request(ClientRequest::Get { key: key.to_owned() }).await;
    let version = match read {
        Ok(ClientReply::Value { entry, .. }) => entry.map_or(0, |e| e.version),
        Ok(other) => return Err(format!("unexpected {other:?}")),
        Err(e) => return Err(e.to_string()),
    };
    let write = cas(Origin::Operator, key, version, value.to_vec());
    match peer.request(ClientRequest::Write(write)).await {
        Ok(ClientReply::Written(Response::Txn { succeeded, .. })) => Ok(succeeded),
        Ok(other) => Err(format!("unexpected {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

async fn client(
    peer: Arc<Peer>,
    keys: Vec<String>,
    seed: u64,
    value: Vec<u8>,
    window: (Instant, Instant),
) -> Tally {
    let mut tally = Tally::default();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    loop {
        let start = Instant::now();
        if start >= window.1 {
            return tally;
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let key = &keys[(x % keys.len() as u64) as usize];
        let result = tokio::time::timeout(Duration::from_secs(10), one_cas(&peer, key, &value))
            .await
            .unwrap_or_else(|_| Err("timed out".into()));
        let end = Instant::now();
        if end < window.0 || end > window.1 {
            continue;
        }
        match result {
            Ok(true) => tally.succ += 1,
            Ok(false) => tally.conf += 1,
            Err(e) => {
                tally.err += 1;
                tally.error = Some(e);
                continue;
            }
        }
        tally.latencies.push(end - start);
    }
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1e3
}

async fn run(args: Args) -> Result<(), String> {
    let secret = std::fs::read(&args.secret).map_err(|e| format!("{}: {e}", args.secret))?;
    let key = Key::from_secret(&secret);
    let value: Vec<u8> = (0..args.vsize).map(|i| b'a' + (i % 26) as u8).collect();
    println!(
        "# strata CAS bench: {} members {:?}, dur={}s warmup={}s nkeys={} vsize={}",
        args.endpoints.len(),
        args.endpoints,
        args.duration,
        args.warmup,
        args.nkeys,
        args.vsize
    );
    println!("clients mode      ops_s    succ    conf  err  p50_ms  p99_ms");
    for &clients in &args.clients {
        for mode in &args.modes {
            let peers: Vec<Arc<Peer>> = (0..clients)
                .map(|i| {
                    let addr = &args.endpoints[i % args.endpoints.len()];
                    Arc::new(Peer::new(key.clone(), addr.clone()))
                })
                .collect();
            let hot: Vec<String> = (0..args.nkeys).map(|k| format!("/bench/hot/{k}")).collect();
            // Every key exists before the case (as etcd.sh puts each once).
            for (i, k) in hot.iter().enumerate() {
                let put = cas(Origin::Operator, k, 0, b"init".to_vec());
                let _ = peers[i % peers.len()].request(ClientRequest::Write(put)).await;
            }
            let start = Instant::now() + Duration::from_millis(50);
            let window = (
                start + Duration::from_secs_f64(args.warmup),
                start + Duration::from_secs_f64(args.warmup + args.duration),
            );
            let tasks: Vec<_> = (0..clients)
                .map(|i| {
                    let keys =
                        if mode == "own" { vec![format!("/bench/own/{i}")] } else { hot.clone() };
                    let peer = peers[i].clone();
                    tokio::spawn(client(peer, keys, i as u64 + 1, value.clone(), window))
                })
                .collect();
            let mut total = Tally::default();
            for t in tasks {
                let t = t.await.map_err(|e| e.to_string())?;
                total.succ += t.succ;
                total.conf += t.conf;
                total.err += t.err;
                total.latencies.extend(t.latencies);
                total.error = total.error.or(t.error);
            }
            total.latencies.sort();
            let ops = (total.succ + total.conf) as f64 / args.duration;
            println!(
                "{clients:7} {mode:9} {ops:8.0} {:7} {:7} {:4} {:7.2} {:7.2}{}",
                total.succ,
                total.conf,
                total.err,
                percentile(&total.latencies, 0.50),
                percentile(&total.latencies, 0.99),
                total.error.map(|e| format!(" errors: {e}")).unwrap_or_default()
            );
        }
    }
    Ok(())
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("casbench: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    if let Err(e) = runtime.block_on(run(args)) {
        eprintln!("casbench: {e}");
        std::process::exit(1);
    }
}
