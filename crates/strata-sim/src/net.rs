//! Messages and a request/reply layer over turmoil's UDP: every datagram goes through
//! turmoil's network (latency, partitions, crashed hosts), and is dropped at random
//! with the current loss rate. A datagram carries only a key; the message it stands for
//! waits in the simulation's stash (every host runs on the simulation's one thread), so
//! nothing is serialized. Between two hosts, messages keep their order as on a TCP
//! connection: one that overtakes an earlier one (turmoil's latencies are random per
//! datagram) waits for it, for up to `GAP`, after which the earlier one counts as lost.

use crate::model::{Owner, Record, Shared};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};
use turmoil::net::UdpSocket;

/// Every host listens here.
pub const PORT: u16 = 9000;

/// A volume request, as a client (or a forwarding node) sends it.
#[derive(Clone, Debug)]
pub enum Op {
    /// One 4 KiB block, tagged with its write id.
    Write { block: u64, value: u64, fua: bool },
    /// FLUSH.
    Flush,
    /// One block.
    Read { block: u64 },
    /// `strata snapshot create VOL@s<name>` (`Scenario::snapshots`): its reply's value is
    /// the snapshot's key.
    Snapshot { name: u64 },
}

/// A request on one component, stamped with the sender's epoch.
#[derive(Clone, Debug)]
pub enum CompReq {
    /// Fences at the epoch, nothing else. `whole`: the owner holds the copy level and
    /// heard its last answer from this process instance (the server's WHOLE flag): the
    /// copy's power-loss mark comes off if that is the instance running now.
    Probe { whole: Option<u64> },
    /// Blocks from `first` on.
    Write { first: u64, values: Vec<u64>, fua: bool },
    /// Syncs the component.
    Flush,
    /// One digest per region, `count` regions from `first`.
    Digest { first: u64, count: u64 },
    /// Takes snapshot `key` of the component (synced; replaces one of that key).
    Snapshot { key: u64 },
    /// Removes snapshot `key` (done if there is none).
    RemoveSnapshot { key: u64 },
}

/// Every message of the simulation.
#[derive(Clone, Debug)]
pub enum Msg {
    // The metadata service.
    Register {
        node: usize,
        suspect: bool,
    },
    Registered {
        session: u64,
    },
    Heartbeat {
        session: u64,
        suspect: bool,
    },
    HeartbeatOk,
    SessionGone,
    Get,
    Seen {
        owner: Option<Owner>,
        owner_version: u64,
        record: Record,
        record_version: u64,
        up: Vec<usize>,
        suspect: Vec<usize>,
    },
    Take {
        session: u64,
        owner_version: u64,
        record_version: u64,
        owner: Owner,
        record: Record,
    },
    SetRecord {
        owner: Owner,
        record_version: u64,
        record: Record,
    },
    Cas(bool),
    // The data plane.
    Comp {
        epoch: u64,
        req: CompReq,
    },
    /// Done (a digest request's digests); `suspect`: the copy's power-loss mark is on
    /// (a flag the server's data plane would need to carry: flaw 11).
    CompOk {
        digests: Vec<u64>,
        suspect: bool,
    },
    StaleEpoch(u64),
    Volume {
        op: Op,
        /// For a flush: the epoch the forwarder saw when it began (`route`).
        since: u64,
    },
    // Replies to a volume request (forwarded, or from a client).
    Done(Option<u64>),
    Failed,
    Retry,
    Client {
        op: Op,
    },
    /// A read lease of the sender's copy, asked of the owner at `epoch` (invariant 10).
    Lease {
        epoch: u64,
    },
    /// The lease is granted (refused: `Failed`).
    Leased,
}

/// A message in flight (in the stash).
pub struct EnvelopeBox(Envelope);

struct Envelope {
    /// The sending endpoint (a new one each time a host starts) and its count of
    /// messages to this destination.
    instance: u64,
    seq: u64,
    id: u64,
    reply: bool,
    /// A reply's: the endpoint that sent the request. Ids start again at each start of a
    /// host, so a reply to a request of an earlier start is dropped, never taken for the
    /// answer to a new request of the same id (a TCP connection dies with its process).
    to_instance: u64,
    from: usize,
    msg: Msg,
}

type Handler = Rc<dyn Fn(usize, Msg) -> Pin<Box<dyn Future<Output = Option<Msg>>>>>;

/// One host's endpoint.
pub struct Rpc {
    sh: Rc<Shared>,
    me: usize,
    sock: UdpSocket,
    next: Cell<u64>,
    waiting: RefCell<BTreeMap<u64, oneshot::Sender<Msg>>>,
    instance: u64,
    /// Per destination: messages sent.
    sent: RefCell<BTreeMap<usize, u64>>,
    /// Per source: what arrived from it.
    inbound: RefCell<BTreeMap<usize, Inbound>>,
    handler: RefCell<Option<Handler>>,
}

/// Messages from one source: the next one expected, and those that overtook it.
struct Inbound {
    instance: u64,
    expected: u64,
    held: BTreeMap<u64, Envelope>,
}

impl Inbound {
    fn drain(&mut self) -> Vec<Envelope> {
        let mut ready = Vec::new();
        while let Some(env) = self.held.remove(&self.expected) {
            ready.push(env);
            self.expected += 1;
        }
        ready
    }
}

/// How long a message that overtook an earlier one waits for it (TCP would retransmit
/// the earlier one; longer than the longest latency the faults set).
const GAP: Duration = Duration::from_millis(150);

/// A request sent, its reply to await.
pub struct Pending {
    rx: oneshot::Receiver<Msg>,
}

impl Pending {
    /// The reply, or `None` past `deadline` (lost, partitioned, crashed).
    pub async fn wait(self, deadline: Instant) -> Option<Msg> {
        tokio::time::timeout_at(deadline, self.rx).await.ok()?.ok()
    }
}

impl Rpc {
    /// Binds host `me` (an index into `Shared::hosts`) and serves requests with `handler`.
    pub async fn start(
        sh: Rc<Shared>,
        me: usize,
        handler: impl Fn(usize, Msg) -> Pin<Box<dyn Future<Output = Option<Msg>>>> + 'static,
    ) -> Rc<Rpc> {
        let sock = UdpSocket::bind(("0.0.0.0", PORT)).await.expect("bind");
        let instance = sh.next_key.get();
        sh.next_key.set(instance + 1);
        sh.instances.borrow_mut()[me] = instance;
        let rpc = Rc::new(Rpc {
            sh,
            me,
            sock,
            next: Cell::new(1),
            waiting: RefCell::default(),
            instance,
            sent: RefCell::default(),
            inbound: RefCell::default(),
            handler: RefCell::new(None),
        });
        *rpc.handler.borrow_mut() = Some(Rc::new(handler));
        let r = rpc.clone();
        tokio::task::spawn_local(async move {
            let mut buf = [0u8; 8];
            loop {
                let Ok((n, _)) = r.sock.recv_from(&mut buf).await else { continue };
                if n != 8 {
                    continue;
                }
                let key = u64::from_le_bytes(buf);
                let Some(EnvelopeBox(env)) = r.sh.stash.borrow_mut().remove(&key) else { continue };
                r.arrive(env);
            }
        });
        rpc
    }

    /// Takes a message in its sender's order: one that overtook an earlier one waits
    /// for it, up to `GAP` (then the earlier one is taken as lost).
    fn arrive(self: &Rc<Self>, env: Envelope) {
        let (from, instance) = (env.from, env.instance);
        let ready = {
            let mut inbound = self.inbound.borrow_mut();
            let fresh = || Inbound { instance, expected: 1, held: BTreeMap::new() };
            let inb = inbound.entry(from).or_insert_with(fresh);
            if instance < inb.instance || (instance == inb.instance && env.seq < inb.expected) {
                return; // From an earlier start of the sender, or a duplicate.
            }
            if instance > inb.instance {
                *inb = fresh();
            }
            inb.held.insert(env.seq, env);
            if inb.held.keys().next() != Some(&inb.expected) {
                let (r, expected) = (self.clone(), inb.expected);
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(GAP).await;
                    let ready = {
                        let mut inbound = r.inbound.borrow_mut();
                        let Some(inb) = inbound.get_mut(&from) else { return };
                        if inb.instance != instance || inb.expected != expected {
                            return;
                        }
                        let Some(first) = inb.held.keys().next().copied() else { return };
                        inb.expected = first;
                        inb.drain()
                    };
                    for env in ready {
                        r.dispatch(env);
                    }
                });
            }
            inb.drain()
        };
        for env in ready {
            self.dispatch(env);
        }
    }

    fn dispatch(self: &Rc<Self>, env: Envelope) {
        if env.reply {
            if env.to_instance != self.instance {
                return;
            }
            if let Some(tx) = self.waiting.borrow_mut().remove(&env.id) {
                let _ = tx.send(env.msg);
            }
            return;
        }
        let (h, r) = (self.handler.borrow().clone().expect("started"), self.clone());
        tokio::task::spawn_local(async move {
            if let Some(reply) = h(env.from, env.msg).await {
                let (instance, seq, id, from) = (0, 0, env.id, r.me);
                let to_instance = env.instance;
                let reply =
                    Envelope { instance, seq, id, reply: true, to_instance, from, msg: reply };
                r.post(env.from, reply);
            }
        });
    }

    fn post(&self, to: usize, mut env: Envelope) {
        let mut sent = self.sent.borrow_mut();
        let seq = sent.entry(to).or_default();
        *seq += 1;
        (env.instance, env.seq) = (self.instance, *seq);
        drop(sent);
        if self.sh.lose() {
            return;
        }
        let key = self.sh.next_key.get();
        self.sh.next_key.set(key + 1);
        self.sh.stash.borrow_mut().insert(key, EnvelopeBox(env));
        let _ = self.sock.try_send_to(&key.to_le_bytes(), (self.sh.hosts.borrow()[to], PORT));
    }

    /// The instance of host `to`'s process this endpoint last heard from (0: none yet):
    /// the server's count of connections to a node, which grows when the node restarts.
    pub fn connection(&self, to: usize) -> u64 {
        self.inbound.borrow().get(&to).map_or(0, |i| i.instance)
    }

    /// Sends `msg` to host `to` now; the reply is the returned one's to await.
    pub fn send(&self, to: usize, msg: Msg) -> Pending {
        let id = self.next.get();
        self.next.set(id + 1);
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(id, tx);
        let (instance, seq, to_instance, from) = (0, 0, 0, self.me);
        self.post(to, Envelope { instance, seq, id, reply: false, to_instance, from, msg });
        Pending { rx }
    }

    /// Sends and waits up to `timeout`.
    pub async fn call(&self, to: usize, msg: Msg, timeout: Duration) -> Option<Msg> {
        let deadline = Instant::now() + timeout;
        let reply = self.send(to, msg).wait(deadline).await;
        reply
    }
}
