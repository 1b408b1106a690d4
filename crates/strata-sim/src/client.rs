//! The verifying workload: a few clients, each doing one request at a time through a
//! node chosen at random (an NBD connection to that node), every 4 KiB write tagged with
//! a unique write id, flushes now and then, reads; each operation's start, end and
//! outcome go to the history.

use crate::model::{Event, Outcome, Shared, BLOCKS, CLIENT, NODES};
use crate::net::{Msg, Op, Rpc};
use rand::Rng;
use std::rc::Rc;
use tokio::time::Duration;

/// A client gives up on a request after this (its node may be down): the outcome is
/// then unknown.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(2000);
/// Clients running at once.
const CLIENTS: usize = 6;
/// Blocks the clients write most (so regions are written again while a copy is away).
const HOT_BLOCKS: u64 = 32;

/// Runs the workload until `until` (simulated time), with `readers` clients that only
/// read (`Scenario::readers`), and, if `snapshots`, an operator taking a snapshot through
/// a random node every 200–800 ms (`Scenario::snapshots`).
pub async fn run(
    sh: Rc<Shared>,
    until: Duration,
    readers: usize,
    snapshots: bool,
) -> turmoil::Result {
    let rpc = Rpc::start(sh.clone(), CLIENT, |_, _| Box::pin(async { None })).await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (sh, rpc) = (sh.clone(), rpc.clone());
        clients.push(tokio::task::spawn_local(async move {
            while sh.now() < until {
                let (node, op, pause) = {
                    let mut rng = sh.rng.borrow_mut();
                    let node = rng.random_range(0..NODES);
                    let block = if rng.random_bool(0.7) {
                        rng.random_range(0..HOT_BLOCKS)
                    } else {
                        rng.random_range(0..BLOCKS)
                    };
                    let op = match rng.random_range(0..100) {
                        0..65 => {
                            let value = sh.next_write.get();
                            sh.next_write.set(value + 1);
                            Op::Write { block, value, fua: rng.random_bool(0.05) }
                        }
                        65..75 => Op::Flush,
                        _ => {
                            // Mostly a block written lately (a stale read shows there).
                            let recent = sh.history.borrow().iter().rev().take(16).find_map(|e| {
                                match e.op {
                                    Op::Write { block, .. } if e.outcome == Outcome::Ok => {
                                        Some(block)
                                    }
                                    _ => None,
                                }
                            });
                            Op::Read {
                                block: recent.filter(|_| rng.random_bool(0.7)).unwrap_or(block),
                            }
                        }
                    };
                    (node, op, Duration::from_millis(rng.random_range(0..10)))
                };
                request(&sh, &rpc, node, op).await;
                tokio::time::sleep(pause).await;
            }
        }));
    }
    for _ in 0..readers {
        let (sh, rpc) = (sh.clone(), rpc.clone());
        clients.push(tokio::task::spawn_local(async move {
            while sh.now() < until {
                let (node, op, pause) = {
                    let mut rng = sh.rng.borrow_mut();
                    let node = rng.random_range(0..NODES);
                    let last = sh.history.borrow().iter().rev().take(64).find_map(|e| match e.op {
                        Op::Write { block, .. } if e.outcome == Outcome::Ok => Some(block),
                        _ => None,
                    });
                    let block = match last.filter(|_| rng.random_bool(0.8)) {
                        Some(b) => b,
                        None => rng.random_range(0..HOT_BLOCKS),
                    };
                    (node, Op::Read { block }, Duration::from_millis(rng.random_range(0..5)))
                };
                request(&sh, &rpc, node, op).await;
                tokio::time::sleep(pause).await;
            }
        }));
    }
    if snapshots {
        let (sh, rpc) = (sh.clone(), rpc.clone());
        clients.push(tokio::task::spawn_local(async move {
            while sh.now() < until {
                let (node, pause) = {
                    let mut rng = sh.rng.borrow_mut();
                    (rng.random_range(0..NODES), Duration::from_millis(rng.random_range(200..800)))
                };
                tokio::time::sleep(pause).await;
                let name = sh.next_snapshot.get();
                sh.next_snapshot.set(name + 1);
                request(&sh, &rpc, node, Op::Snapshot { name }).await;
            }
        }));
    }
    for c in clients {
        let _ = c.await;
    }
    Ok(())
}

/// One client request through `node`, its start, end and outcome into the history.
async fn request(sh: &Shared, rpc: &Rpc, node: usize, op: Op) {
    let start = sh.now();
    let reply = rpc.call(node, Msg::Client { op: op.clone() }, CLIENT_TIMEOUT).await;
    let (outcome, value) = match reply {
        Some(Msg::Done(v)) => (Outcome::Ok, v),
        Some(_) => (Outcome::Failed, None),
        None => (Outcome::Unknown, None),
    };
    sh.history.borrow_mut().push(Event { op, start, end: sh.now(), outcome, value });
}
