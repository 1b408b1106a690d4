//! A seeded simulation of a 3-member cluster on the in-process network, on a single-thread
//! runtime with paused time: clients run compare-and-swap and linearizable reads on a few
//! keys while the simulation cuts a member off, crashes and restarts members (from their
//! redb files), and loses and delays messages. Every client operation's start, end and
//! outcome is recorded, and the histories are checked linearizable key by key. A failing
//! seed is printed; `SIM_SEED=n` replays its fault schedule (openraft's own election
//! jitter is not seeded, so the interleaving may differ). `SIM_STATS=1` prints what each
//! seed did. Reading from any member without read-index makes it fail at once (checked).

use super::router::Router;
use super::testkit::{cluster, leader_of, paused_runtime, start, wait_leader};
use super::*;
use crate::linearizability::{self, Call, Operation, Outcome};
use crate::state::{Compare, Op, Origin};
use std::collections::BTreeMap;
use std::time::Duration;

const KEYS: [&str; 2] = ["/a", "/b"];

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn now(origin: tokio::time::Instant) -> u64 {
    origin.elapsed().as_millis() as u64
}

/// A CAS from `from` (0 = absent) to `to` on `key`, as a transaction on values.
fn cas(key: &str, from: u64, to: u64) -> crate::state::Command {
    let compare = if from == 0 {
        Compare::Version(key.to_owned(), 0)
    } else {
        Compare::Value(key.to_owned(), from.to_le_bytes().to_vec())
    };
    crate::state::Command::Txn {
        origin: Origin::Operator,
        compares: vec![compare],
        success: vec![Op::Put {
            key: key.to_owned(),
            value: to.to_le_bytes().to_vec(),
            lease: None,
        }],
        failure: vec![],
    }
}

async fn run(seed: u64) -> std::result::Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::default();
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut members = cluster(&router, dir.path()).await;
    router.set_faults(seed, 20, 30);
    let origin = tokio::time::Instant::now();
    let mut histories: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    let mut next_value = 1;
    let mut last_seen: BTreeMap<&str, u64> = BTreeMap::new();
    let mut down: Option<NodeId> = None;
    for step in 0..120 {
        // Faults, now and then.
        match rng.below(20) {
            0 if down.is_none() => {
                let id = 1 + rng.below(3);
                router.remove(id);
                members.remove(&id).unwrap().raft.shutdown().await.unwrap();
                down = Some(id);
            }
            1 if down.is_some() => {
                let id = down.take().unwrap();
                members.insert(id, start(&router, dir.path(), id).await);
            }
            2 => router.partition(&[1 + rng.below(3)]),
            3 => router.heal(),
            _ => {}
        }
        let Some(leader) = leader_of(&members) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let key = KEYS[rng.below(KEYS.len() as u64) as usize];
        let history = histories.entry(key).or_default();
        let start_ms = now(origin);
        let member = &members[&leader];
        if rng.below(3) == 0 {
            let read =
                tokio::time::timeout(Duration::from_secs(2), member.raft.ensure_linearizable());
            if let Ok(Ok(_)) = read.await {
                let value = member.state.read(|s| {
                    s.get(key).map_or(0, |e| u64::from_le_bytes(e.value[..8].try_into().unwrap()))
                });
                let end = now(origin);
                last_seen.insert(key, value);
                history.push(Operation {
                    call: Call::Read,
                    outcome: Outcome::Read(value),
                    start: start_ms,
                    end,
                });
            }
        } else {
            // Mostly the last value this client saw (so most succeed), sometimes a stale
            // one (so some fail).
            let seen = last_seen.get(key).copied().unwrap_or(0);
            let from = if rng.below(4) == 0 { next_value - rng.below(next_value) } else { seen };
            next_value += 1;
            let to = next_value;
            let write = tokio::time::timeout(
                Duration::from_secs(2),
                member.raft.client_write(cas(key, from, to)),
            );
            let outcome = match write.await {
                Ok(Ok(r)) => match r.data {
                    crate::state::Response::Txn { succeeded: true, .. } => Outcome::Done,
                    crate::state::Response::Txn { succeeded: false, .. } => Outcome::Failed,
                    other => return Err(format!("seed {seed} step {step}: unexpected {other:?}")),
                },
                _ => Outcome::Unknown,
            };
            let end = now(origin);
            if outcome == Outcome::Done {
                last_seen.insert(key, to);
            }
            history.push(Operation { call: Call::Cas { from, to }, outcome, start: start_ms, end });
        }
    }
    router.heal();
    for m in members.values() {
        m.raft.shutdown().await.unwrap();
    }
    if std::env::var("SIM_STATS").is_ok() {
        let all: Vec<&Operation> = histories.values().flatten().collect();
        let count = |f: &dyn Fn(&Operation) -> bool| all.iter().filter(|o| f(o)).count();
        eprintln!(
            "seed {seed}: {} ops, {} done, {} failed, {} unknown, {} reads",
            all.len(),
            count(&|o| o.outcome == Outcome::Done),
            count(&|o| o.outcome == Outcome::Failed),
            count(&|o| o.outcome == Outcome::Unknown),
            count(&|o| matches!(o.outcome, Outcome::Read(_))),
        );
    }
    for (key, history) in &histories {
        linearizability::check(history)
            .map_err(|e| format!("seed {seed}: key {key}: {e}\n{history:?}"))?;
    }
    Ok(())
}

fn simulate(seed: u64) -> std::result::Result<(), String> {
    paused_runtime().block_on(run(seed))
}

#[test]
fn cas_histories_stay_linearizable_under_faults() {
    let seeds: Vec<u64> = match std::env::var("SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("SIM_SEED is a number")],
        Err(_) => (1..=8).collect(),
    };
    for seed in seeds {
        if let Err(e) = simulate(seed) {
            panic!("{e}\nreplay with SIM_SEED={seed}");
        }
    }
}

/// A node registers through Raft, heartbeats, then pauses past the session timeout (as a
/// SIGSTOPped process would): the leader's reaper declares it down, and the write it
/// prepared before is refused for its stale incarnation; re-registered, it writes again.
#[test]
fn a_paused_node_cannot_apply_its_late_writes() {
    paused_runtime().block_on(async {
        use crate::state::{Command, Refusal, Response, SESSION_TIMEOUT_MS};
        let dir = tempfile::tempdir().unwrap();
        let router = Router::default();
        let members = cluster(&router, dir.path()).await;
        let origin = tokio::time::Instant::now();
        let clock = move || now(origin);
        for (id, m) in &members {
            tokio::spawn(run_reaper(m.raft.clone(), *id, Duration::from_millis(500), clock));
        }
        let leader = wait_leader(&members).await;
        let raft = &members[&leader].raft;
        let write = |command| async move { raft.client_write(command).await.unwrap().data };
        let Response::Registered { incarnation, .. } =
            write(Command::Register { node: 7, now_ms: clock() }).await
        else {
            panic!("register")
        };
        let me = Origin::Node { node: 7, incarnation };
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(
                write(Command::Heartbeat { origin: me, now_ms: clock() }).await,
                Response::Ok
            );
        }
        // The node prepares a write, then stalls past the session timeout.
        let late = cas_as(me, "/owner/vol1", 0, b"node7");
        tokio::time::sleep(Duration::from_millis(SESSION_TIMEOUT_MS + 2_000)).await;
        assert_eq!(
            write(late).await,
            Response::Refused(Refusal::StaleIncarnation { node: 7, sent: 1, current: 2 })
        );
        let read = members[&leader].state.read(|s| s.get("/owner/vol1").cloned());
        assert!(read.is_none(), "the stale write changed nothing");
        let Response::Registered { incarnation, .. } =
            write(Command::Register { node: 7, now_ms: clock() }).await
        else {
            panic!("register")
        };
        assert_eq!(incarnation, 3);
        let me = Origin::Node { node: 7, incarnation };
        let again = write(cas_as(me, "/owner/vol1", 0, b"node7")).await;
        assert!(matches!(again, Response::Txn { succeeded: true, .. }), "{again:?}");
        for m in members.values() {
            m.raft.shutdown().await.unwrap();
        }
    });
}

fn cas_as(origin: Origin, key: &str, version: u64, value: &[u8]) -> crate::state::Command {
    crate::state::cas(origin, key, version, value.to_vec())
}
