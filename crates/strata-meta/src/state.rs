//! The metadata state machine: what every member applies, in log order, to each committed
//! command. Deterministic: the same commands give the same state and responses on every
//! member (no clock, no randomness, ordered maps only).
//!
//! Invariants:
//! 1. The revision increases by one per command that changes a key, and only then; a key's
//!    version is the revision of the command that last wrote it (0 = absent).
//! 2. A refused command (a failed compare, a stale incarnation, an unknown lease) changes
//!    nothing at all.
//! 3. A command carrying `(node, incarnation)` with an incarnation below the node's
//!    current one is refused (`StaleIncarnation`): a node declared down cannot apply a
//!    request it prepared before.
//! 4. A node is declared down only by an `Expire` whose `now_ms` is at least the session
//!    timeout past its last heartbeat; that bumps its incarnation. Leases end on their own
//!    deadlines (by the same `Expire`) or when revoked, deleting their keys.
//! 5. Every change is appended to the history in revision order; the history keeps the
//!    last [`HISTORY_MAX`] changes.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Changes kept for watchers.
pub const HISTORY_MAX: usize = 10_000;
/// A node silent for this long is declared down.
pub const SESSION_TIMEOUT_MS: u64 = 10_000;
/// Bytes in a key, at most.
pub const KEY_BYTES_MAX: usize = 1024;
/// Bytes in a value, at most.
pub const VALUE_BYTES_MAX: usize = 1 << 20;
/// Operations in one transaction branch, at most.
pub const TXN_OPS_MAX: usize = 128;

/// A key's stored value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The bytes.
    pub value: Vec<u8>,
    /// The revision that last wrote it.
    pub version: u64,
    /// The lease it dies with, if any.
    pub lease: Option<u64>,
}

/// What a put or delete expects of the key first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// Anything.
    Any,
    /// The key does not exist.
    Absent,
    /// The key exists with exactly this version.
    Version(u64),
}

/// A transaction's compare.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compare {
    /// The key's version (0 = absent) equals.
    Version(String, u64),
    /// The key exists with this value.
    Value(String, Vec<u8>),
}

/// A transaction's write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Set a key (optionally tied to a lease).
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// The lease it dies with.
        lease: Option<u64>,
    },
    /// Remove a key (nothing if absent).
    Delete {
        /// The key.
        key: String,
    },
}

/// Who sends a command: a node at an incarnation (fenced), or an operator (not fenced).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Origin {
    /// A node's request, valid only at its current incarnation.
    Node {
        /// Node id.
        node: u64,
        /// The incarnation it registered with.
        incarnation: u64,
    },
    /// An operator's request (CLI, API).
    Operator,
}

/// A committed command. `now_ms` is the proposing leader's clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Compares, then applies `success` or `failure` atomically.
    Txn {
        /// Who asks.
        origin: Origin,
        /// All must hold for `success`.
        compares: Vec<Compare>,
        /// Applied when every compare holds.
        success: Vec<Op>,
        /// Applied otherwise.
        failure: Vec<Op>,
    },
    /// A node (re)joins: it gets a new incarnation and is up.
    Register {
        /// Node id.
        node: u64,
        /// Leader's clock.
        now_ms: u64,
    },
    /// A node is alive.
    Heartbeat {
        /// The node and its incarnation.
        origin: Origin,
        /// Leader's clock.
        now_ms: u64,
    },
    /// Creates a lease.
    LeaseGrant {
        /// Who asks.
        origin: Origin,
        /// Its time to live.
        ttl_ms: u64,
        /// Leader's clock.
        now_ms: u64,
    },
    /// Extends a lease to `now + ttl`.
    LeaseKeepAlive {
        /// Who asks.
        origin: Origin,
        /// The lease.
        lease: u64,
        /// Leader's clock.
        now_ms: u64,
    },
    /// Ends a lease now, deleting its keys.
    LeaseRevoke {
        /// Who asks.
        origin: Origin,
        /// The lease.
        lease: u64,
    },
    /// The leader's reaper: declares silent nodes down and ends expired leases.
    Expire {
        /// Leader's clock.
        now_ms: u64,
    },
}

/// What applying a command answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A transaction ran: whether its compares held, and the revision after it.
    Txn {
        /// Whether `success` was applied.
        succeeded: bool,
        /// The revision after the command.
        revision: u64,
    },
    /// A node registered with this incarnation.
    Registered {
        /// Its new incarnation.
        incarnation: u64,
        /// The session's lease: keys put with it (a node's volume ownerships) are deleted
        /// when the node is declared down or registers again.
        lease: u64,
    },
    /// A lease was created.
    Lease {
        /// Its id.
        lease: u64,
    },
    /// Done, nothing to report.
    Ok,
    /// Nodes declared down and leases ended by an `Expire`.
    Expired {
        /// Nodes now down.
        nodes: Vec<u64>,
        /// Leases ended.
        leases: Vec<u64>,
    },
    /// Refused; nothing changed.
    Refused(Refusal),
}

/// Why a command was refused (nothing changed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The node's incarnation is newer than the request's: it was declared down since.
    #[error("node {node} sent incarnation {sent}, current is {current}: re-register")]
    StaleIncarnation {
        /// The node.
        node: u64,
        /// The incarnation in the request.
        sent: u64,
        /// The node's current incarnation.
        current: u64,
    },
    /// The node never registered.
    #[error("node {0} is not registered")]
    UnknownNode(u64),
    /// The node is down: it must register again.
    #[error("node {0} is down: re-register")]
    NodeDown(u64),
    /// No such lease.
    #[error("lease {0} does not exist (expired or revoked)")]
    UnknownLease(u64),
    /// A key, value or transaction is too large or empty.
    #[error("{0}")]
    Invalid(String),
}

/// A node's session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Bumped at every register and every declaration of down.
    pub incarnation: u64,
    /// Whether it is up.
    pub up: bool,
    /// The leader's clock at its last heartbeat (or registration).
    pub last_seen_ms: u64,
    /// The session's lease (no deadline of its own: it ends with the session).
    pub lease: u64,
}

/// A lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Time to live.
    pub ttl_ms: u64,
    /// When it ends, by the leader's clock.
    pub deadline_ms: u64,
}

/// One change, for watchers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The revision that made it.
    pub revision: u64,
    /// The key.
    pub key: String,
    /// The new value, or `None` for a delete.
    pub value: Option<Vec<u8>>,
}

/// The replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    revision: u64,
    keys: BTreeMap<String, Entry>,
    sessions: BTreeMap<u64, Session>,
    leases: BTreeMap<u64, Lease>,
    next_lease: u64,
    history: VecDeque<Change>,
}

/// What a watcher reading the history gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Watch {
    /// The changes from the requested revision on, in order.
    Changes(Vec<Change>),
    /// The history no longer reaches back that far: re-read with `range`.
    Compacted {
        /// The oldest revision still in the history.
        oldest: u64,
    },
}

impl State {
    /// The current revision.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// A key's entry.
    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.keys.get(key)
    }

    /// Keys under `prefix`, in order, at most `limit`.
    pub fn range(&self, prefix: &str, limit: usize) -> Vec<(&String, &Entry)> {
        self.keys
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .collect()
    }

    /// A node's session.
    pub fn session(&self, node: u64) -> Option<&Session> {
        self.sessions.get(&node)
    }

    /// A lease.
    pub fn lease(&self, lease: u64) -> Option<&Lease> {
        self.leases.get(&lease)
    }

    /// Changes under `prefix` with revision ≥ `from`.
    pub fn watch(&self, prefix: &str, from: u64) -> Watch {
        let oldest = self.history.front().map_or(self.revision + 1, |c| c.revision);
        if from < oldest && from <= self.revision && self.revision > 0 {
            return Watch::Compacted { oldest };
        }
        Watch::Changes(
            self.history
                .iter()
                .filter(|c| c.revision >= from && c.key.starts_with(prefix))
                .cloned()
                .collect(),
        )
    }

    fn fence(&self, origin: Origin) -> Result<(), Refusal> {
        let Origin::Node { node, incarnation } = origin else { return Ok(()) };
        let session = self.sessions.get(&node).ok_or(Refusal::UnknownNode(node))?;
        if incarnation < session.incarnation {
            return Err(Refusal::StaleIncarnation {
                node,
                sent: incarnation,
                current: session.incarnation,
            });
        }
        if !session.up || incarnation != session.incarnation {
            return Err(Refusal::NodeDown(node));
        }
        Ok(())
    }

    fn check_ops(&self, ops: &[Op]) -> Result<(), Refusal> {
        if ops.len() > TXN_OPS_MAX {
            return Err(Refusal::Invalid(format!("a transaction has at most {TXN_OPS_MAX} ops")));
        }
        for op in ops {
            let (key, value, lease) = match op {
                Op::Put { key, value, lease } => (key, Some(value), *lease),
                Op::Delete { key } => (key, None, None),
            };
            check_key(key)?;
            if value.is_some_and(|v| v.len() > VALUE_BYTES_MAX) {
                return Err(Refusal::Invalid(format!(
                    "a value has at most {VALUE_BYTES_MAX} bytes"
                )));
            }
            if let Some(lease) = lease {
                if !self.leases.contains_key(&lease) {
                    return Err(Refusal::UnknownLease(lease));
                }
            }
        }
        Ok(())
    }

    fn holds(&self, compare: &Compare) -> bool {
        match compare {
            Compare::Version(key, version) => {
                self.keys.get(key).map_or(0, |e| e.version) == *version
            }
            Compare::Value(key, value) => self.keys.get(key).is_some_and(|e| &e.value == value),
        }
    }

    /// Applies writes under a new revision (if any changes anything: deleting an absent
    /// key does not).
    fn write(&mut self, ops: &[Op]) {
        let changes = ops.iter().any(|op| match op {
            Op::Put { .. } => true,
            Op::Delete { key } => self.keys.contains_key(key),
        });
        if !changes {
            return;
        }
        self.revision += 1;
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let entry =
                        Entry { value: value.clone(), version: self.revision, lease: *lease };
                    self.keys.insert(key.clone(), entry);
                    self.record(key, Some(value.clone()));
                }
                Op::Delete { key } => {
                    if self.keys.remove(key).is_some() {
                        self.record(key, None);
                    }
                }
            }
        }
    }

    fn record(&mut self, key: &str, value: Option<Vec<u8>>) {
        self.history.push_back(Change { revision: self.revision, key: key.to_owned(), value });
        while self.history.len() > HISTORY_MAX {
            self.history.pop_front();
        }
    }

    /// Applies one committed command.
    pub fn apply(&mut self, command: &Command) -> Response {
        match self.try_apply(command) {
            Ok(response) => response,
            Err(refusal) => Response::Refused(refusal),
        }
    }

    fn try_apply(&mut self, command: &Command) -> Result<Response, Refusal> {
        match command {
            Command::Txn { origin, compares, success, failure } => {
                self.fence(*origin)?;
                for c in compares {
                    match c {
                        Compare::Version(key, _) | Compare::Value(key, _) => check_key(key)?,
                    }
                }
                self.check_ops(success)?;
                self.check_ops(failure)?;
                let succeeded = compares.iter().all(|c| self.holds(c));
                self.write(if succeeded { success } else { failure });
                Ok(Response::Txn { succeeded, revision: self.revision })
            }
            Command::Register { node, now_ms } => {
                // The previous session's keys die with it.
                if let Some(old) = self.sessions.get(node).map(|s| s.lease) {
                    if self.leases.contains_key(&old) {
                        self.end_leases(&[old]);
                    }
                }
                self.next_lease += 1;
                let lease = self.next_lease;
                self.leases.insert(lease, Lease { ttl_ms: 0, deadline_ms: u64::MAX });
                let session = self.sessions.entry(*node).or_insert(Session {
                    incarnation: 0,
                    up: false,
                    last_seen_ms: *now_ms,
                    lease,
                });
                session.incarnation += 1;
                session.up = true;
                session.last_seen_ms = *now_ms;
                session.lease = lease;
                Ok(Response::Registered { incarnation: session.incarnation, lease })
            }
            Command::Heartbeat { origin, now_ms } => {
                self.fence(*origin)?;
                if let Origin::Node { node, .. } = origin {
                    let session = self.sessions.get_mut(node).expect("fenced");
                    session.last_seen_ms = session.last_seen_ms.max(*now_ms);
                }
                Ok(Response::Ok)
            }
            Command::LeaseGrant { origin, ttl_ms, now_ms } => {
                self.fence(*origin)?;
                if *ttl_ms == 0 {
                    return Err(Refusal::Invalid("a lease's TTL must be positive".into()));
                }
                self.next_lease += 1;
                let deadline_ms = now_ms.saturating_add(*ttl_ms);
                self.leases.insert(self.next_lease, Lease { ttl_ms: *ttl_ms, deadline_ms });
                Ok(Response::Lease { lease: self.next_lease })
            }
            Command::LeaseKeepAlive { origin, lease, now_ms } => {
                self.fence(*origin)?;
                let l = self.leases.get_mut(lease).ok_or(Refusal::UnknownLease(*lease))?;
                l.deadline_ms = l.deadline_ms.max(now_ms.saturating_add(l.ttl_ms));
                Ok(Response::Ok)
            }
            Command::LeaseRevoke { origin, lease } => {
                self.fence(*origin)?;
                if !self.leases.contains_key(lease) {
                    return Err(Refusal::UnknownLease(*lease));
                }
                self.end_leases(&[*lease]);
                Ok(Response::Ok)
            }
            Command::Expire { now_ms } => {
                let mut nodes = Vec::new();
                let mut leases: Vec<u64> = self
                    .leases
                    .iter()
                    .filter(|(_, l)| l.deadline_ms <= *now_ms)
                    .map(|(id, _)| *id)
                    .collect();
                for (node, session) in &mut self.sessions {
                    if session.up
                        && now_ms.saturating_sub(session.last_seen_ms) >= SESSION_TIMEOUT_MS
                    {
                        session.up = false;
                        session.incarnation += 1;
                        nodes.push(*node);
                        if self.leases.contains_key(&session.lease) {
                            leases.push(session.lease);
                        }
                    }
                }
                self.end_leases(&leases);
                Ok(Response::Expired { nodes, leases })
            }
        }
    }

    /// Ends leases, deleting their keys under one revision.
    fn end_leases(&mut self, leases: &[u64]) {
        for lease in leases {
            self.leases.remove(lease);
        }
        let doomed: Vec<Op> = self
            .keys
            .iter()
            .filter(|(_, e)| e.lease.is_some_and(|l| leases.contains(&l)))
            .map(|(k, _)| Op::Delete { key: k.clone() })
            .collect();
        self.write(&doomed);
    }
}

fn check_key(key: &str) -> Result<(), Refusal> {
    if key.is_empty() || key.len() > KEY_BYTES_MAX {
        return Err(Refusal::Invalid(format!("a key has 1 to {KEY_BYTES_MAX} bytes")));
    }
    Ok(())
}

impl Command {
    /// Sets the command's clock to the proposing leader's (`now_ms`), so every member
    /// applies the same time.
    pub fn stamp(&mut self, now: u64) {
        match self {
            Command::Register { now_ms, .. }
            | Command::Heartbeat { now_ms, .. }
            | Command::LeaseGrant { now_ms, .. }
            | Command::LeaseKeepAlive { now_ms, .. }
            | Command::Expire { now_ms } => *now_ms = now,
            Command::Txn { .. } | Command::LeaseRevoke { .. } => {}
        }
    }
}

/// Compare-and-swap as a transaction: put `value` if the key's version is `version`
/// (0 = absent).
pub fn cas(origin: Origin, key: &str, version: u64, value: Vec<u8>) -> Command {
    Command::Txn {
        origin,
        compares: vec![Compare::Version(key.to_owned(), version)],
        success: vec![Op::Put { key: key.to_owned(), value, lease: None }],
        failure: Vec::new(),
    }
}

#[cfg(test)]
mod tests;
