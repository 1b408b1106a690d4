//! A running member of the metadata service: the Raft group member, its RPC server, the
//! leader's reaper, request routing to the leader, membership, and the node's own session.
//!
//! Invariants:
//! 1. Every write and every linearizable read is executed by the member that is leader at
//!    that moment; a member that is not forwards the request once (`forwarded`), and a
//!    member receiving a forwarded request it cannot lead answers `NotLeader` so the
//!    origin re-routes. No request is passed on twice.
//! 2. A request is retried only when it is known not to have been proposed: the leader
//!    could not be reached, answered `NotLeader`, or (for reads, which change nothing)
//!    anything. A write whose fate is unknown (the connection broke after sending, or
//!    the leader lost its leadership while the entry was in flight) is answered
//!    `Unknown`, never retried: a retried compare-and-swap could apply twice.
//! 3. Reads go through read-index (`ensure_linearizable`): a deposed or paused leader
//!    cannot answer them, as it cannot confirm its leadership with a quorum. Concurrent
//!    reads share a round, but only one that starts after they arrived.
//! 4. The leader stamps each command with its own clock before proposing it; members
//!    apply the stamped time (`state.rs` invariant 4).
//! 5. Voters are the first 1, 3 or 5 members (the largest of those not above the number
//!    of members): present voters are kept, learners promoted in id order. A change of
//!    membership is done only by the leader, one at a time (openraft's joint consensus).

use crate::raft::{self, NodeId, StateMachineStore, TypeConfig};
use crate::rpc::{self, Key, Peer};
use crate::state::{Command, Entry, Origin, Refusal, Response, Session, Watch};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, ServerState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// A request to the metadata service.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Propose a command (the leader stamps its clock).
    Write(Command),
    /// Linearizable read of one key.
    Get {
        /// The key.
        key: String,
    },
    /// Linearizable read of the keys under a prefix, in key order.
    Range {
        /// The prefix.
        prefix: String,
        /// At most this many.
        limit: usize,
    },
    /// The committed changes under `prefix` from revision `from`, as this member has
    /// applied them; waits up to `wait_ms` for one if there is none yet.
    Watch {
        /// The prefix.
        prefix: String,
        /// The first revision wanted.
        from: u64,
        /// How long to wait for a change.
        wait_ms: u64,
    },
    /// Add a member (as a learner; promoted to voter when the count allows).
    Join {
        /// Its node id.
        id: NodeId,
        /// Its RPC address.
        addr: String,
    },
    /// Remove a member.
    Remove {
        /// Its node id.
        id: NodeId,
    },
    /// The cluster as the leader sees it.
    Status,
    /// Which node answers (asked of a node before it is added).
    Identify,
}

impl ClientRequest {
    fn needs_leader(&self) -> bool {
        !matches!(self, ClientRequest::Watch { .. } | ClientRequest::Identify)
    }

    fn is_read(&self) -> bool {
        matches!(
            self,
            ClientRequest::Get { .. }
                | ClientRequest::Range { .. }
                | ClientRequest::Status
                | ClientRequest::Identify
        )
    }
}

/// The answer to a [`ClientRequest`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClientReply {
    /// What the command's application answered.
    Written(Response),
    /// One key.
    Value {
        /// The key's entry, if it exists.
        entry: Option<Entry>,
        /// The revision the read saw.
        revision: u64,
    },
    /// Keys under a prefix.
    Range {
        /// Key and entry, in key order.
        entries: Vec<(String, Entry)>,
        /// The revision the read saw.
        revision: u64,
    },
    /// Changes for a watcher.
    Changes(Watch),
    /// Done.
    Done,
    /// The cluster.
    Status(ClusterStatus),
    /// The node that answered.
    Identity {
        /// Its node id.
        id: NodeId,
    },
}

/// Why a request failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ServiceError {
    /// No leader could be found in time.
    #[error("no leader: the metadata service has no quorum (are a majority of voters up?)")]
    NoLeader,
    /// A forwarded request reached a member that no longer leads (the origin re-routes).
    #[error("not the leader")]
    NotLeader,
    /// The request may or may not have been applied.
    #[error("outcome unknown ({0}): the request may or may not have been applied")]
    Unknown(String),
    /// The member could not be reached (nothing was sent).
    #[error("{0}")]
    Unreachable(String),
    /// The member refused our frames: not the cluster's secret.
    #[error("{0}")]
    Refused(String),
    /// This member is not part of a cluster yet.
    #[error(
        "this node is not part of a cluster yet: run `strata cluster init` on the first \
         node, or start it with `join` set to a member's address"
    )]
    NotInitialized,
    /// A membership change that cannot be made.
    #[error("{0}")]
    Membership(String),
    /// The member's Raft stopped.
    #[error("the metadata service stopped: {0}")]
    Fatal(String),
}

/// How long [`Member::shutdown`] waits for the requests under way.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);

/// One request under way (`Member::busy`), until dropped.
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A member as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Node id.
    pub id: NodeId,
    /// RPC address.
    pub rpc: String,
    /// `voter` or `learner`.
    pub role: String,
    /// The last log index the leader knows it holds.
    pub matched: Option<u64>,
    /// Its session (absent until it registers).
    pub session: Option<Session>,
    /// The node's own record (`/nodes/<id>`: addresses, site, rack), if written.
    pub record: Option<serde_json::Value>,
}

/// The cluster as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The leader's node id.
    pub leader: NodeId,
    /// The Raft term.
    pub term: u64,
    /// The last log index applied by the leader.
    pub applied: u64,
    /// The state machine's revision.
    pub revision: u64,
    /// Every member.
    pub members: Vec<MemberStatus>,
}

/// What this member knows of itself, without asking anyone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalStatus {
    /// Node id.
    pub id: NodeId,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub state: String,
    /// The leader it follows, if known.
    pub leader: Option<NodeId>,
    /// The Raft term.
    pub term: u64,
    /// The last log index applied here.
    pub applied: u64,
    /// Whether it belongs to a cluster.
    pub initialized: bool,
    /// Its session's incarnation (0 before it registered).
    pub incarnation: u64,
    /// Its requests refused for a stale incarnation since it started (it was declared down
    /// while it could not heartbeat, and re-registered).
    pub stale_refusals: u64,
}

/// Raft timers.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Leader heartbeat.
    pub heartbeat_ms: u64,
    /// Election timeout, lower bound.
    pub election_min_ms: u64,
    /// Election timeout, upper bound.
    pub election_max_ms: u64,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing { heartbeat_ms: 150, election_min_ms: 1000, election_max_ms: 2000 }
    }
}

/// How to start a member.
pub struct Options {
    /// Node id (non-zero, unique in the cluster).
    pub id: NodeId,
    /// Where the Raft database lives (`meta.redb` inside).
    pub dir: PathBuf,
    /// The bound RPC listener.
    pub listener: TcpListener,
    /// The RPC address other members reach it at.
    pub advertise: String,
    /// The cluster secret's bytes.
    pub secret: Vec<u8>,
    /// Raft timers.
    pub timing: Timing,
}

/// How long a request may look for a leader.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// How long a status request may look for a leader.
const STATUS_DEADLINE: Duration = Duration::from_secs(3);
/// How long a forwarded request may wait for its answer.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a new learner may take to catch up before its addition is reported failed.
const LEARNER_CATCH_UP: Duration = Duration::from_secs(30);
/// How often a node heartbeats its session.
const SESSION_HEARTBEAT: Duration = Duration::from_secs(1);
/// How long one heartbeat may wait for its answer before it is sent again (to whoever
/// leads then): a heartbeat forwarded to a leader that hangs (paused, cut off) must not
/// wait out [`FORWARD_TIMEOUT`] while a new leader counts the session silent.
const HEARTBEAT_PATIENCE: Duration = Duration::from_secs(2);

/// A running member.
pub struct Member {
    id: NodeId,
    addr: String,
    key: Key,
    raft: Raft<TypeConfig>,
    state: StateMachineStore,
    peers: Mutex<HashMap<String, Arc<Peer>>>,
    incarnation: AtomicU64,
    stale_refusals: AtomicU64,
    /// Set by [`Member::shutdown`]: requests are refused from then.
    stopping: AtomicBool,
    /// Requests that need the leader, under way (a shutdown waits for them a moment).
    busy: AtomicUsize,
    /// When the last heartbeat (or registration) the leader accepted was sent.
    confirmed: Mutex<Option<Instant>>,
    reads: Mutex<ReadRounds>,
    data: std::sync::OnceLock<Arc<dyn rpc::DataPlane>>,
    secret: Vec<u8>,
}

/// Read-index rounds: concurrent reads share one round of leadership confirmation. A
/// read joins the next round to *start* (one already running may have begun before the
/// read arrived, and a confirmation older than the read would not make it linearizable).
#[derive(Default)]
struct ReadRounds {
    running: bool,
    next: Vec<tokio::sync::oneshot::Sender<Result<(), ReadFailure>>>,
}

/// Held by the read running the read-index rounds. Dropped with a round unfinished (the
/// read's future was dropped), it stops the rounds and tells every waiting read to try
/// again, so one of them runs the rounds anew — else every later read would wait forever.
struct RoundRunner<'a>(&'a Mutex<ReadRounds>);

impl Drop for RoundRunner<'_> {
    fn drop(&mut self) {
        let mut rounds = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if rounds.running {
            rounds.running = false;
            for w in rounds.next.drain(..) {
                let _ = w.send(Err(ReadFailure::NotLeader));
            }
        }
    }
}

/// Why a read-index round failed.
#[derive(Clone, Debug)]
enum ReadFailure {
    NotLeader,
    Fatal(String),
}

/// One attempt's failure: try again, or give up with this error.
enum Attempt {
    Retry,
    Fail(ServiceError),
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn fatal(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Fatal(e.to_string())
}

impl Member {
    /// Opens the member's database, starts its Raft, its RPC server and its reaper.
    pub async fn start(options: Options) -> Result<Arc<Member>, ServiceError> {
        if options.id == 0 {
            return Err(ServiceError::Membership("node ids start at 1".into()));
        }
        std::fs::create_dir_all(&options.dir).map_err(fatal)?;
        let (log, state) = raft::open(&options.dir.join("meta.redb")).map_err(fatal)?;
        let config = openraft::Config {
            cluster_name: "strata".into(),
            heartbeat_interval: options.timing.heartbeat_ms,
            election_timeout_min: options.timing.election_min_ms,
            election_timeout_max: options.timing.election_max_ms,
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(fatal)?);
        let key = Key::from_secret(&options.secret);
        let network = rpc::TcpNetwork::new(key.clone());
        let raft =
            Raft::new(options.id, config, network, log, state.clone()).await.map_err(fatal)?;
        let member = Arc::new(Member {
            id: options.id,
            addr: options.advertise,
            key,
            raft: raft.clone(),
            state,
            peers: Mutex::new(HashMap::new()),
            incarnation: AtomicU64::new(0),
            stale_refusals: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            confirmed: Mutex::new(None),
            reads: Mutex::new(ReadRounds::default()),
            data: std::sync::OnceLock::new(),
            secret: options.secret.clone(),
        });
        tokio::spawn(rpc::serve(options.listener, member.clone()));
        tokio::spawn(raft::run_reaper(raft, options.id, Duration::from_millis(500), now_ms));
        Ok(member)
    }

    /// This member's node id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The RPC address other members reach it at.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Serves data-plane connections of the RPC port with `data` (once).
    pub fn set_data_plane(&self, data: Arc<dyn rpc::DataPlane>) {
        let _ = self.data.set(data);
    }

    /// The data plane, once set.
    pub fn data_plane(&self) -> Option<&Arc<dyn rpc::DataPlane>> {
        self.data.get()
    }

    /// The cluster secret (for the data plane's own key).
    pub fn secret(&self) -> &[u8] {
        &self.secret
    }

    /// The RPC key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// The Raft handle.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// Reads this member's applied state (not linearizable: use [`Member::request`]).
    pub fn read_local<T>(&self, f: impl FnOnce(&crate::state::State) -> T) -> T {
        self.state.read(f)
    }

    /// The node's current session origin (for requests fenced by incarnation).
    pub fn origin(&self) -> Origin {
        Origin::Node { node: self.id, incarnation: self.incarnation.load(Ordering::Acquire) }
    }

    /// Whether the node's session is registered (its requests carry a live incarnation).
    pub fn registered(&self) -> bool {
        self.incarnation.load(Ordering::Acquire) != 0
    }

    /// Whether the leader accepted a heartbeat of this node's session sent less than
    /// `within` ago. The leader then counts the session alive until at least that send
    /// time plus the session timeout: with `within` well below the timeout, a node for
    /// which this holds cannot have been declared down (a paused or cut-off node finds
    /// it false before anyone may take over what its session holds).
    pub fn session_fresh(&self, within: Duration) -> bool {
        let confirmed = *self.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        self.registered() && confirmed.is_some_and(|t| t.elapsed() < within)
    }

    /// The lease of this node's session (keys put with it die with the session).
    pub fn session_lease(&self) -> Option<u64> {
        self.session().map(|(lease, _)| lease)
    }

    /// This node's session as registered now: its lease and incarnation (one read, so
    /// the two belong together).
    pub fn session(&self) -> Option<(u64, u64)> {
        let incarnation = self.incarnation.load(Ordering::Acquire);
        self.state.read(|s| {
            s.session(self.id)
                .filter(|x| x.up && x.incarnation == incarnation)
                .map(|x| (x.lease, incarnation))
        })
    }

    /// The incarnation this node's session registered with (0: not registered).
    pub fn incarnation(&self) -> u64 {
        self.incarnation.load(Ordering::Acquire)
    }

    /// Waits up to `patience` for the node's session to be registered.
    pub async fn wait_registered(&self, patience: Duration) -> bool {
        let deadline = Instant::now() + patience;
        while !self.registered() {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Stops Raft: new requests are refused at once, and those under way get up to
    /// two seconds to finish first (a request Raft drops as it stops is an error
    /// line from the library, not a clean stop).
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        let deadline = Instant::now() + SHUTDOWN_DRAIN;
        while self.busy.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = self.raft.shutdown().await;
    }

    /// Returns (with why) once Raft has stopped by itself — a storage failure, such as a
    /// full disk — and not by [`Member::shutdown`]: the node cannot keep its session,
    /// and must not go on half alive.
    pub async fn failed(&self) -> String {
        let mut metrics = self.raft.metrics();
        loop {
            {
                let m = metrics.borrow();
                if m.state == ServerState::Shutdown && !self.stopping.load(Ordering::Acquire) {
                    return match &m.running_state {
                        Err(e) => e.to_string(),
                        Ok(()) => "Raft stopped".into(),
                    };
                }
            }
            if metrics.changed().await.is_err() {
                if self.stopping.load(Ordering::Acquire) {
                    return std::future::pending().await;
                }
                return "Raft stopped".into();
            }
        }
    }

    /// Whether this member belongs to a cluster (has a membership), asking Raft itself
    /// (the metrics are published a moment after start).
    pub async fn initialized(&self) -> bool {
        self.raft.is_initialized().await.unwrap_or(false)
    }

    /// What this member knows without asking anyone.
    pub fn local_status(&self) -> LocalStatus {
        let m = self.raft.metrics().borrow().clone();
        let initialized = m.membership_config.membership().nodes().next().is_some();
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        LocalStatus {
            id: self.id,
            state: state.into(),
            leader: m.current_leader,
            term: m.current_term,
            applied: m.last_applied.map_or(0, |l| l.index),
            initialized,
            incarnation: self.incarnation.load(Ordering::Acquire),
            stale_refusals: self.stale_refusals.load(Ordering::Relaxed),
        }
    }

    /// Makes this member a one-member cluster (the first node). Refused if it already
    /// belongs to one.
    pub async fn initialize(&self) -> Result<(), ServiceError> {
        if self.initialized().await {
            return Err(ServiceError::Membership("this node already belongs to a cluster".into()));
        }
        let nodes = BTreeMap::from([(self.id, BasicNode::new(self.addr.clone()))]);
        self.raft.initialize(nodes).await.map_err(|e| ServiceError::Membership(e.to_string()))
    }

    fn peer(&self, addr: &str) -> Arc<Peer> {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        peers
            .entry(addr.to_owned())
            .or_insert_with(|| Arc::new(Peer::new(self.key.clone(), addr)))
            .clone()
    }

    /// Asks the member at `addr` to add this one to its cluster (retrying until it can
    /// be reached and a leader answers, for up to `patience`).
    pub async fn join(&self, addrs: &[String], patience: Duration) -> Result<(), ServiceError> {
        let deadline = Instant::now() + patience;
        let mut last = ServiceError::NoLeader;
        loop {
            if self.initialized().await {
                return Ok(());
            }
            for addr in addrs {
                let request = ClientRequest::Join { id: self.id, addr: self.addr.clone() };
                match self.peer(addr).request(request).await {
                    Ok(_) => return Ok(()),
                    Err(e @ (ServiceError::Refused(_) | ServiceError::Membership(_))) => {
                        return Err(e)
                    }
                    Err(e) => last = e,
                }
            }
            if Instant::now() >= deadline {
                return Err(last);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Serves a request: routes it to the leader (or, for a watch, answers locally).
    pub async fn request(&self, request: ClientRequest) -> Result<ClientReply, ServiceError> {
        self.handle(request, false).await
    }

    /// Serves a request that arrived over RPC (`forwarded` by another member or not).
    pub async fn handle(
        &self,
        request: ClientRequest,
        forwarded: bool,
    ) -> Result<ClientReply, ServiceError> {
        if let ClientRequest::Identify = request {
            return Ok(ClientReply::Identity { id: self.id });
        }
        if !request.needs_leader() {
            return self.watch(request).await;
        }
        if self.stopping.load(Ordering::Acquire) {
            return Err(ServiceError::Fatal("this member is stopping".into()));
        }
        self.busy.fetch_add(1, Ordering::AcqRel);
        let _busy = Busy(&self.busy);
        // A status is for a human or a script waiting for one: answer quickly either way.
        let patience = match request {
            ClientRequest::Status => STATUS_DEADLINE,
            _ => REQUEST_DEADLINE,
        };
        let deadline = Instant::now() + patience;
        loop {
            let leader = self.raft.metrics().borrow().current_leader;
            let attempt = match leader {
                Some(l) if l == self.id => self.lead(&request).await,
                Some(l) if !forwarded => self.forward(l, &request).await,
                _ if !self.initialized().await => Err(Attempt::Fail(ServiceError::NotInitialized)),
                _ => Err(Attempt::Retry),
            };
            match attempt {
                Ok(reply) => return Ok(reply),
                Err(Attempt::Fail(e)) => return Err(e),
                Err(Attempt::Retry) if forwarded => return Err(ServiceError::NotLeader),
                Err(Attempt::Retry) if Instant::now() >= deadline => {
                    return Err(ServiceError::NoLeader)
                }
                Err(Attempt::Retry) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        request: &ClientRequest,
    ) -> Result<ClientReply, Attempt> {
        let addr = {
            let metrics = self.raft.metrics().borrow().clone();
            metrics.membership_config.membership().get_node(&leader).map(|n| n.addr.clone())
        };
        let Some(addr) = addr else { return Err(Attempt::Retry) };
        let call = rpc::Request::Client { request: request.clone(), forwarded: true };
        let reply = tokio::time::timeout(FORWARD_TIMEOUT, self.peer(&addr).call(&call)).await;
        let unknown = |why: String| {
            if request.is_read() {
                Attempt::Retry
            } else {
                Attempt::Fail(ServiceError::Unknown(why))
            }
        };
        match reply {
            Ok(Ok(rpc::Reply::Client(Ok(reply)))) => Ok(reply),
            Ok(Ok(rpc::Reply::Client(Err(ServiceError::NotLeader | ServiceError::NoLeader)))) => {
                Err(Attempt::Retry)
            }
            Ok(Ok(rpc::Reply::Client(Err(e)))) => Err(Attempt::Fail(e)),
            Ok(Ok(_)) => Err(unknown("reply of the wrong kind".into())),
            Ok(Err(rpc::CallError::NotSent(_))) => Err(Attempt::Retry),
            Ok(Err(e @ rpc::CallError::Refused { .. })) => {
                Err(Attempt::Fail(ServiceError::Refused(e.to_string())))
            }
            Ok(Err(e @ rpc::CallError::Lost(_))) => Err(unknown(e.to_string())),
            Err(_) => Err(unknown(format!("no answer from the leader at {addr} in time"))),
        }
    }

    /// Executes a request as the leader.
    async fn lead(&self, request: &ClientRequest) -> Result<ClientReply, Attempt> {
        match request {
            ClientRequest::Write(command) => {
                let mut command = command.clone();
                command.stamp(now_ms());
                let idempotent = matches!(
                    command,
                    Command::Heartbeat { .. }
                        | Command::Expire { .. }
                        | Command::LeaseKeepAlive { .. }
                );
                match self.raft.client_write(command).await {
                    Ok(r) => Ok(ClientReply::Written(r.data)),
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))
                        if idempotent =>
                    {
                        Err(Attempt::Retry)
                    }
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                        Err(Attempt::Fail(ServiceError::Unknown("the leader stepped down".into())))
                    }
                    Err(e) => Err(Attempt::Fail(ServiceError::Unknown(e.to_string()))),
                }
            }
            ClientRequest::Get { key } => {
                self.read_index().await?;
                Ok(self.state.read(|s| ClientReply::Value {
                    entry: s.get(key).cloned(),
                    revision: s.revision(),
                }))
            }
            ClientRequest::Range { prefix, limit } => {
                self.read_index().await?;
                Ok(self.state.read(|s| ClientReply::Range {
                    entries: s
                        .range(prefix, *limit)
                        .into_iter()
                        .map(|(k, e)| (k.clone(), e.clone()))
                        .collect(),
                    revision: s.revision(),
                }))
            }
            ClientRequest::Status => {
                self.read_index().await?;
                Ok(ClientReply::Status(self.cluster_status()))
            }
            ClientRequest::Join { id, addr } => self.add_member(*id, addr).await,
            ClientRequest::Remove { id } => self.remove_member(*id).await,
            ClientRequest::Watch { .. } | ClientRequest::Identify => {
                unreachable!("answered locally")
            }
        }
    }

    async fn read_index(&self) -> Result<(), Attempt> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let start = {
            let mut rounds = self.reads.lock().unwrap_or_else(|e| e.into_inner());
            rounds.next.push(tx);
            !std::mem::replace(&mut rounds.running, true)
        };
        if start {
            // This read runs the rounds until no read is waiting; others only wait. If it
            // is dropped meanwhile (its caller gave up), the guard hands the job back.
            let _runner = RoundRunner(&self.reads);
            let raft = self.raft.clone();
            loop {
                let waiters = {
                    let mut rounds = self.reads.lock().unwrap_or_else(|e| e.into_inner());
                    if rounds.next.is_empty() {
                        rounds.running = false;
                        break;
                    }
                    std::mem::take(&mut rounds.next)
                };
                let result = match raft.ensure_linearizable().await {
                    Ok(_) => Ok(()),
                    Err(RaftError::APIError(_)) => Err(ReadFailure::NotLeader),
                    Err(RaftError::Fatal(e)) => Err(ReadFailure::Fatal(e.to_string())),
                };
                for w in waiters {
                    let _ = w.send(result.clone());
                }
            }
        }
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(ReadFailure::NotLeader)) => Err(Attempt::Retry),
            Ok(Err(ReadFailure::Fatal(e))) => Err(Attempt::Fail(ServiceError::Fatal(e))),
            Err(_) => Err(Attempt::Retry),
        }
    }

    async fn watch(&self, request: ClientRequest) -> Result<ClientReply, ServiceError> {
        let ClientRequest::Watch { prefix, from, wait_ms } = request else { unreachable!() };
        let mut metrics = self.raft.metrics();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms.min(60_000));
        loop {
            let watch = self.state.read(|s| s.watch(&prefix, from));
            if !matches!(&watch, Watch::Changes(c) if c.is_empty()) {
                return Ok(ClientReply::Changes(watch));
            }
            // Woken by every change of the metrics, which include the applied index.
            if tokio::time::timeout_at(deadline, metrics.changed()).await.is_err() {
                return Ok(ClientReply::Changes(watch));
            }
        }
    }

    fn cluster_status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let replication = m.replication.clone().unwrap_or_default();
        let members = membership
            .nodes()
            .map(|(id, node)| {
                let (session, record) = self.state.read(|s| {
                    let record = s
                        .get(&format!("/nodes/{id}"))
                        .and_then(|e| serde_json::from_slice(&e.value).ok());
                    (s.session(*id).cloned(), record)
                });
                MemberStatus {
                    id: *id,
                    rpc: node.addr.clone(),
                    role: if voters.contains(id) { "voter" } else { "learner" }.into(),
                    matched: replication.get(id).cloned().flatten().map(|l| l.index),
                    session,
                    record,
                }
            })
            .collect();
        ClusterStatus {
            leader: self.id,
            term: m.current_term,
            applied: m.last_applied.map_or(0, |l| l.index),
            revision: self.state.read(|s| s.revision()),
            members,
        }
    }

    fn membership_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Attempt {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => Attempt::Retry,
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                Attempt::Fail(ServiceError::Membership(e.to_string()))
            }
            RaftError::Fatal(e) => Attempt::Fail(fatal(e)),
        }
    }

    async fn add_member(&self, id: NodeId, addr: &str) -> Result<ClientReply, Attempt> {
        if id == 0 {
            return Err(Attempt::Fail(ServiceError::Membership("node ids start at 1".into())));
        }
        let existing = {
            let m = self.raft.metrics().borrow().clone();
            m.membership_config.membership().get_node(&id).map(|n| n.addr.clone())
        };
        match existing {
            Some(a) if a == addr => {}
            Some(a) => {
                return Err(Attempt::Fail(ServiceError::Membership(format!(
                    "node {id} is already a member at {a}; remove it first to re-add it at {addr}"
                ))))
            }
            None => {
                // The node must be there and be who it says: a typo must not leave a
                // learner that points nowhere.
                let fail = |m: String| Err(Attempt::Fail(ServiceError::Membership(m)));
                let peer = self.peer(addr);
                let probe = peer.request(ClientRequest::Identify);
                match tokio::time::timeout(Duration::from_secs(5), probe).await {
                    Ok(Ok(ClientReply::Identity { id: found })) if found == id => {}
                    Ok(Ok(ClientReply::Identity { id: found })) => {
                        return fail(format!("the node at {addr} is node {found}, not node {id}"))
                    }
                    Ok(Ok(other)) => return fail(format!("{addr} answered {other:?}")),
                    Ok(Err(e)) => return fail(format!("cannot add node {id} at {addr}: {e}")),
                    Err(_) => return fail(format!("no answer from node {id} at {addr}")),
                }
                tracing::info!(id, addr, "adding a member as a learner");
                let add = self.raft.add_learner(id, BasicNode::new(addr), true);
                match tokio::time::timeout(LEARNER_CATCH_UP, add).await {
                    Ok(r) => {
                        r.map_err(Member::membership_error)?;
                    }
                    Err(_) => {
                        return fail(format!(
                            "node {id} was added as a learner but did not catch up within \
                             {LEARNER_CATCH_UP:?}; it stays a learner"
                        ))
                    }
                }
            }
        }
        self.rebalance().await?;
        Ok(ClientReply::Done)
    }

    async fn remove_member(&self, id: NodeId) -> Result<ClientReply, Attempt> {
        let (voters, nodes) = {
            let m = self.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            (membership.voter_ids().collect::<BTreeSet<_>>(), membership.nodes().count())
        };
        let known = {
            let m = self.raft.metrics().borrow().clone();
            m.membership_config.membership().get_node(&id).is_some()
        };
        if !known {
            return Err(Attempt::Fail(ServiceError::Membership(format!(
                "node {id} is not a member"
            ))));
        }
        if nodes == 1 {
            return Err(Attempt::Fail(ServiceError::Membership(
                "cannot remove the last member".into(),
            )));
        }
        if voters.contains(&id) {
            // Promote a replacement first when there is one, so the voter count stays odd.
            let mut remaining = voters.clone();
            remaining.remove(&id);
            let target = voter_target(nodes - 1);
            let learners: Vec<NodeId> = {
                let m = self.raft.metrics().borrow().clone();
                m.membership_config.membership().learner_ids().collect()
            };
            for l in learners {
                if remaining.len() >= target {
                    break;
                }
                remaining.insert(l);
            }
            while remaining.len() > target {
                let last = *remaining.iter().next_back().expect("non-empty");
                remaining.remove(&last);
            }
            tracing::info!(id, ?remaining, "removing a voter");
            self.raft
                .change_membership(ChangeMembers::ReplaceAllVoters(remaining), true)
                .await
                .map_err(Member::membership_error)?;
        }
        let gone = BTreeSet::from([id]);
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(gone), false)
            .await
            .map_err(Member::membership_error)?;
        Ok(ClientReply::Done)
    }

    /// Makes the voters the first 1, 3 or 5 members (invariant 5).
    async fn rebalance(&self) -> Result<(), Attempt> {
        let (voters, learners) = {
            let m = self.raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            let learners: Vec<NodeId> = membership.learner_ids().collect();
            (voters, learners)
        };
        let target = voter_target(voters.len() + learners.len());
        if voters.len() >= target {
            return Ok(());
        }
        let mut wanted = voters.clone();
        for l in learners {
            if wanted.len() >= target {
                break;
            }
            wanted.insert(l);
        }
        tracing::info!(?voters, ?wanted, "promoting learners to voters");
        self.raft
            .change_membership(ChangeMembers::ReplaceAllVoters(wanted), true)
            .await
            .map_err(Member::membership_error)?;
        Ok(())
    }

    /// The node's session: registers (a new incarnation), writes the node's record under
    /// `/nodes/<id>`, then heartbeats every second until the member shuts down. When it
    /// finds itself declared down (a request refused for its incarnation) it registers
    /// again.
    pub async fn run_session(self: Arc<Self>, record: serde_json::Value) {
        let record = serde_json::to_vec(&record).expect("a JSON value serializes");
        loop {
            if self.raft.metrics().borrow().state == ServerState::Shutdown {
                return;
            }
            let incarnation = self.incarnation.load(Ordering::Acquire);
            let sent = Instant::now();
            let result = if incarnation == 0 {
                self.register(&record).await
            } else {
                let heartbeat = Command::Heartbeat { origin: self.origin(), now_ms: 0 };
                let sending = self.request(ClientRequest::Write(heartbeat));
                match tokio::time::timeout(HEARTBEAT_PATIENCE, sending).await {
                    Ok(Ok(ClientReply::Written(Response::Refused(refusal)))) => Err(refusal),
                    Ok(Ok(ClientReply::Written(_))) => {
                        *self.confirmed.lock().unwrap_or_else(|e| e.into_inner()) = Some(sent);
                        Ok(())
                    }
                    // No answer in time: at once again, to whoever leads now.
                    Err(_) => continue,
                    _ => Ok(()),
                }
            };
            if let Err(refusal) = result {
                if let Refusal::StaleIncarnation { .. } = refusal {
                    self.stale_refusals.fetch_add(1, Ordering::Relaxed);
                }
                tracing::warn!("session: {refusal}; registering again");
                self.incarnation.store(0, Ordering::Release);
                continue;
            }
            tokio::time::sleep(SESSION_HEARTBEAT).await;
        }
    }

    async fn register(&self, record: &[u8]) -> Result<(), Refusal> {
        let register = Command::Register { node: self.id, now_ms: 0 };
        let sent = Instant::now();
        let Ok(ClientReply::Written(Response::Registered { incarnation, .. })) =
            self.request(ClientRequest::Write(register)).await
        else {
            return Ok(()); // No leader yet, or unknown: the next round tries again.
        };
        self.incarnation.store(incarnation, Ordering::Release);
        *self.confirmed.lock().unwrap_or_else(|e| e.into_inner()) = Some(sent);
        tracing::info!(incarnation, "session registered");
        let put = crate::state::Op::Put {
            key: format!("/nodes/{}", self.id),
            value: record.to_vec(),
            lease: None,
        };
        let txn = Command::Txn {
            origin: self.origin(),
            compares: Vec::new(),
            success: vec![put],
            failure: Vec::new(),
        };
        match self.request(ClientRequest::Write(txn)).await {
            Ok(ClientReply::Written(Response::Refused(refusal))) => Err(refusal),
            _ => Ok(()),
        }
    }
}

/// The number of voters for `members` members: 1, 3 or 5.
pub fn voter_target(members: usize) -> usize {
    match members {
        0..=2 => 1,
        3 | 4 => 3,
        _ => 5,
    }
}

#[cfg(test)]
mod tests;
