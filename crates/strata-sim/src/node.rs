//! A storage node: its component behind the epoch fence (the data plane and
//! `fencing.rs`), its session (heartbeats, the owner lease), its steward (takeover, as
//! `replicated::steward`), its router (serve as owner, or forward to the owner, as
//! `replicated::Router`) and, while it owns the volume, its owner view (`view.rs`).
//! A node that is not the owner reads its own copy under a read lease from the owner
//! (`Router::read_here`, `renew_lease`; invariant 10); the lease lives in memory, so a
//! crash of either kind loses it.

use crate::model::{
    CopyState, Mutation, Owner, Record, Shared, FORWARD_RETRY, HEARTBEAT_EVERY, META, META_TIMEOUT,
    NODES,
};
use crate::net::{CompReq, Msg, Op, Rpc};
use crate::view::View;
use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::rc::{Rc, Weak};
use strata_replica::lease::ReadLease;
use strata_replica::mutation::{reopened, Flaw};
use strata_replica::takeover::{self, Memory, Take, Unflushed};
use tokio::time::{Duration, Instant};

/// A node's session with the metadata service.
#[derive(Default)]
pub struct Lease {
    pub session: Cell<Option<u64>>,
    /// When the last heartbeat the service accepted was sent.
    pub confirmed: Cell<Option<Instant>>,
}

impl Lease {
    /// `session_fresh(owner_lease)`.
    pub fn fresh(&self, owner_lease: Duration) -> bool {
        self.session.get().is_some()
            && self.confirmed.get().is_some_and(|t| t.elapsed() < owner_lease)
    }
}

/// The metadata as a node last read it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub owner: Option<Owner>,
    pub owner_version: u64,
    pub record: Record,
    pub record_version: u64,
    pub up: Vec<usize>,
    pub suspect: Vec<usize>,
}

impl Seen {
    /// From a `Seen` reply.
    pub fn from(msg: Msg) -> Option<Seen> {
        match msg {
            Msg::Seen { owner, owner_version, record, record_version, up, suspect } => {
                Some(Seen { owner, owner_version, record, record_version, up, suspect })
            }
            _ => None,
        }
    }
}

/// `Router::lease` (`Leasing`): the read lease this node holds (the owner's epoch, and
/// until when, counted from when it asked), and whether it is asking for one.
#[derive(Default)]
pub struct Leasing {
    held: Cell<Option<ReadLease>>,
    asking: Cell<bool>,
}

pub struct Node {
    me: usize,
    read_lease: Rc<Leasing>,
    sh: Rc<Shared>,
    rpc: RefCell<Option<Rc<Rpc>>>,
    lease: Rc<Lease>,
    seen: RefCell<Option<Seen>>,
    view: RefCell<Option<Rc<View>>>,
    taking: Cell<bool>,
    /// The steward's memory of the volume between passes (`takeover::Memory`).
    memory: Cell<Memory>,
    /// The writes this node's clients had acknowledged that no flush covers yet
    /// (`takeover::Unflushed`, the router's; lost with a crash, as its clients are).
    unflushed: RefCell<Unflushed>,
}

/// Applies one request to node `me`'s component, behind its fence: refused below the
/// fence; a raise is durable (the disk model's fence) before the request applies, and
/// the check and the apply are one step (no await between: nothing interleaves).
pub fn component(sh: &Shared, me: usize, epoch: u64, req: &CompReq) -> Msg {
    let mut disks = sh.disks.borrow_mut();
    let c = &mut disks[me].component;
    if epoch < c.fence && !sh.broken(Mutation::NoFence) {
        return Msg::StaleEpoch(c.fence);
    }
    c.fence = c.fence.max(epoch);
    sh.applied_at(me, epoch);
    let mut digests = Vec::new();
    match req {
        CompReq::Probe { whole } => {
            // Vouched for by its owner over this process's connection (the server's
            // `dataplane.rs` invariant 6): the power-loss mark comes off.
            if whole.is_some_and(|w| w == sh.instances.borrow()[me]) && c.suspect {
                c.suspect = false;
                sh.note(format!("n{me}: the owner vouched for this copy: no longer suspect"));
            }
        }
        CompReq::Write { first, values, fua } => {
            c.write(*first, values);
            if *fua {
                c.sync();
            }
        }
        CompReq::Flush => c.sync(),
        CompReq::Digest { first, count } => {
            digests = (*first..first + count).map(|r| c.digest(r)).collect()
        }
        CompReq::Snapshot { key } => {
            c.take_snapshot(*key);
            sh.note(format!("n{me}: snapshot {key} taken at epoch {epoch}"));
        }
        CompReq::RemoveSnapshot { key } => {
            if c.snapshots.remove(key).is_some() {
                sh.note(format!("n{me}: snapshot {key} removed at epoch {epoch}"));
            }
        }
    }
    Msg::CompOk { digests, suspect: disks[me].component.suspect }
}

impl Node {
    /// Whether this node's copy is suspect (back from a power loss, not vouched for
    /// since: invariant 11).
    fn suspect(&self) -> bool {
        self.sh.disks.borrow()[self.me].component.suspect
    }

    fn rpc(&self) -> Rc<Rpc> {
        self.rpc.borrow().clone().expect("started")
    }

    fn view(&self) -> Option<Rc<View>> {
        self.view.borrow().clone()
    }

    async fn handle(self: Rc<Self>, from: usize, msg: Msg) -> Option<Msg> {
        match msg {
            // The data plane's `Kind::Lease`: only the serving owner at that epoch grants.
            Msg::Lease { epoch } => Some(match self.view() {
                Some(v) if v.owner.epoch == epoch && v.serving() => {
                    let seen = || self.seen.borrow().as_ref().and_then(|s| s.owner);
                    if v.grant_lease(from, seen).await {
                        self.sh
                            .note(format!("n{} grants n{from} a read lease at {epoch}", self.me));
                        Msg::Leased
                    } else {
                        Msg::Failed
                    }
                }
                _ => Msg::Retry,
            }),
            Msg::Comp { epoch, req } => Some(component(&self.sh, self.me, epoch, &req)),
            Msg::Volume { op, since } => Some(match self.view() {
                Some(v) if v.serving() => match v.run(&op, since).await {
                    Ok(value) => Msg::Done(value),
                    Err(_) if v.deposed() => Msg::Retry,
                    Err(_) => Msg::Failed,
                },
                _ => Msg::Retry,
            }),
            Msg::Client { op } => {
                self.sh.routing.borrow_mut()[self.me] += 1;
                let reply = match self.route(&op).await {
                    Ok(value) => Msg::Done(value),
                    Err(()) => Msg::Failed,
                };
                self.sh.routing.borrow_mut()[self.me] -= 1;
                Some(reply)
            }
            _ => None,
        }
    }

    /// A client's request through this node (`Router::run_one`): served by this node's
    /// view while it owns the volume and its lease is fresh, else forwarded to the owner;
    /// retried while no owner takes it, for up to `Timing::forward_patience`.
    async fn route(&self, op: &Op) -> Result<Option<u64>, ()> {
        if let Op::Read { block } = op {
            if !self.view().is_some_and(|v| v.serving()) {
                if let Some(value) = self.read_here(*block) {
                    return Ok(Some(value));
                }
            }
        }
        let deadline = Instant::now() + self.sh.timing.forward_patience;
        // A flush is not acknowledged by an owner that took with a suspect truth since the
        // oldest write it covers, or since it arrived (T5): this node's view of the
        // record's epoch (the first epoch if it has none yet).
        let now = self
            .seen
            .borrow()
            .as_ref()
            .map_or(1, |s| s.record.epoch.max(s.owner.map_or(0, |o| o.epoch)).max(1));
        let begun = self.unflushed.borrow().flush_begins(now);
        let since = begun.since;
        // Done at the owner of `epoch`: what this node's flushes cover.
        let done = |epoch: u64| match op {
            Op::Write { .. } => self.unflushed.borrow_mut().acked(epoch),
            Op::Flush => self.unflushed.borrow_mut().flushed(begun),
            Op::Read { .. } | Op::Snapshot { .. } => {}
        };
        // Failed while the record said `lost_at`: a flush failed for a loss said so.
        let failed = |lost_at: Option<u64>| {
            if matches!(op, Op::Flush) {
                self.unflushed.borrow_mut().refused(begun, lost_at);
            }
        };
        loop {
            match self.view() {
                Some(v) if v.serving() => match v.run(op, since).await {
                    Ok(value) => {
                        done(v.owner.epoch);
                        return Ok(value);
                    }
                    Err(_) if !v.deposed() => {
                        failed(v.lost_at);
                        return Err(());
                    }
                    Err(_) => {}
                },
                _ => {
                    let target = self.seen.borrow().as_ref().and_then(|s| s.owner);
                    if let Some(o) = target.filter(|o| o.node != self.me) {
                        let msg = Msg::Volume { op: op.clone(), since };
                        match self.rpc().call(o.node, msg, self.sh.timing.forward_timeout).await {
                            Some(Msg::Done(value)) => {
                                done(o.epoch);
                                return Ok(value);
                            }
                            Some(Msg::Failed) => {
                                failed(self.seen.borrow().as_ref().and_then(|s| s.record.lost_at));
                                return Err(());
                            }
                            _ => {}
                        }
                    }
                }
            }
            if Instant::now() >= deadline {
                return Err(());
            }
            tokio::time::sleep(FORWARD_RETRY).await;
        }
    }

    /// `Router::read_here`: a read of this node's copy if the owner's lease allows it
    /// now: the lease is current and the copy's fence still at its epoch (the check and
    /// the read are one step, as the real read holds a fence pass). `None`: forward it.
    /// Asks for a lease (in the background) when there is none or it is half gone.
    fn read_here(&self, block: u64) -> Option<u64> {
        // The core's rules (`strata_replica::lease`, L1-L3).
        let lease = self.read_lease.held.get();
        let now = self.sh.now();
        if ReadLease::renew_due(lease.as_ref(), now, &self.sh.timing) {
            self.renew_lease();
        }
        let lease = lease?;
        let (epoch, until) = (lease.epoch, lease.until);
        let disks = self.sh.disks.borrow();
        let c = &disks[self.me].component;
        // The mutation: the fence not looked at.
        let fence = if self.sh.broken(Mutation::NoLeaseFence) { epoch } else { c.fence };
        if !lease.admits(self.me as u64, now, fence) {
            return None;
        }
        let value = c.live[block as usize];
        drop(disks);
        self.sh.local_reads.set(self.sh.local_reads.get() + 1);
        self.sh.note(format!(
            "n{} reads block {block} under its lease at {epoch} (until {}ms): {value}",
            self.me,
            until.as_millis()
        ));
        Some(value)
    }

    /// `Router::renew_lease`: asks the owner this node's metadata view names for a read
    /// lease (one request at a time); granted, it holds for `Timing::read_lease` from the ask.
    fn renew_lease(&self) {
        if self.read_lease.asking.replace(true) {
            return;
        }
        let Some(o) = self.seen.borrow().as_ref().and_then(|s| s.owner) else {
            self.read_lease.asking.set(false);
            return;
        };
        if o.node == self.me {
            self.read_lease.asking.set(false);
            return;
        }
        let (rpc, leasing) = (self.rpc(), self.read_lease.clone());
        let asked = self.sh.now();
        let timing = self.sh.timing;
        let (read_lease, me) = (timing.read_lease, self.me as u64);
        tokio::task::spawn_local(async move {
            let reply = rpc.call(o.node, Msg::Lease { epoch: o.epoch }, read_lease / 2).await;
            if matches!(reply, Some(Msg::Leased)) {
                leasing.held.set(Some(ReadLease::granted(o.epoch, me, asked, &timing)));
            }
            leasing.asking.set(false);
        });
    }

    /// Registers, then heartbeats; a heartbeat's send time is what the lease counts from.
    async fn session(self: Rc<Self>) {
        loop {
            let rpc = self.rpc();
            let sent = Instant::now();
            match self.lease.session.get() {
                None => {
                    if let Some(Msg::Registered { session }) = rpc
                        .call(
                            META,
                            Msg::Register { node: self.me, suspect: self.suspect() },
                            META_TIMEOUT,
                        )
                        .await
                    {
                        self.lease.session.set(Some(session));
                        self.lease.confirmed.set(Some(sent));
                    }
                }
                Some(session) => {
                    let lease = self.lease.clone();
                    let suspect = self.suspect();
                    tokio::task::spawn_local(async move {
                        match rpc
                            .call(META, Msg::Heartbeat { session, suspect }, META_TIMEOUT)
                            .await
                        {
                            Some(Msg::HeartbeatOk) if lease.session.get() == Some(session) => {
                                let newer = lease.confirmed.get().is_none_or(|t| t < sent);
                                if newer {
                                    lease.confirmed.set(Some(sent));
                                }
                            }
                            Some(Msg::SessionGone) if lease.session.get() == Some(session) => {
                                lease.session.set(None);
                                lease.confirmed.set(None);
                            }
                            _ => {}
                        }
                    });
                }
            }
            tokio::time::sleep(HEARTBEAT_EVERY).await;
        }
    }

    /// `replicated::steward`: reads the metadata, deposes a superseded view
    /// (`takeover::superseded`), and takes the volume when the core's `takeover::decide`
    /// says so (the last owner first, then each other up node with an ACTIVE copy a
    /// `takeover_step` later; a suspect copy last, and never while another member's
    /// ACTIVE copy may hold what it lost).
    async fn steward(self: Rc<Self>) {
        let timing = self.sh.timing;
        loop {
            tokio::time::sleep(timing.steward_every).await;
            if self.lease.session.get().is_none() {
                continue;
            }
            if let Some(seen) =
                self.rpc().call(META, Msg::Get, META_TIMEOUT).await.and_then(Seen::from)
            {
                *self.seen.borrow_mut() = Some(seen);
            }
            let Some(v) = self.seen.borrow().clone() else { continue };
            let mut memory = self.memory.get();
            if v.owner.is_some() {
                memory.ownerless_since = None;
            }
            self.memory.set(memory);
            let now = self.sh.now();
            if let Some(view) = self.view() {
                let held = now.saturating_sub(view.taken_at);
                if takeover::superseded(v.owner.map(|o| o.epoch), view.owner.epoch, held, &timing) {
                    view.depose("the owner key names a newer owner, or none");
                }
                if !view.deposed() {
                    continue;
                }
                *self.view.borrow_mut() = None;
            }
            let seen = takeover::Seen {
                me: self.me as u64,
                last_owner: v.record.node as u64,
                copies: (0..NODES).map(|n| (n as u64, v.record.states[n])).collect(),
                owner: v.owner.map(|o| o.node as u64),
                moving_to: None,
                up: v.up.iter().map(|n| *n as u64).collect(),
                suspect: v.suspect.iter().map(|n| *n as u64).collect(),
                me_suspect: self.suspect(),
            };
            let members: BTreeSet<u64> = (0..NODES as u64).collect();
            let truth = (seen.me_suspect && seen.owner.is_none())
                .then(|| takeover::truth_for_suspect(&seen, &members));
            let mut memory = self.memory.get();
            let take = takeover::decide(&mut memory, &seen, truth, now, &timing);
            self.memory.set(memory);
            match take {
                Take::Now if !self.taking.get() => {
                    self.taking.set(true);
                    let took = self.take_over().await;
                    self.taking.set(false);
                    if let Err(e) = took {
                        self.sh.note(format!("node {}: cannot take ownership: {e}", self.me));
                    }
                }
                Take::WaitForTruth { first: true } => self.sh.note(format!(
                    "node {}: not taking: its copy is suspect and another may hold more",
                    self.me
                )),
                _ => {}
            }
        }
    }

    /// `take_ownership` + `take_over`: the owner key by CAS at one above the highest
    /// epoch, tied to this node's session, if the fresh record still shows this node's
    /// copy ACTIVE (flaw 2: as built, it did not look); then the view, which fences every
    /// copy, and holds acknowledgments back if the last owner may still grant leases.
    async fn take_over(&self) -> Result<(), String> {
        let session = self.lease.session.get().ok_or("no session")?;
        let rpc = self.rpc();
        let seen = rpc
            .call(META, Msg::Get, META_TIMEOUT)
            .await
            .and_then(Seen::from)
            .ok_or("no metadata")?;
        if !reopened(Flaw::TakeChecksCopy) && seen.record.states[self.me] != CopyState::Active {
            return Err("this node's copy is not active (fresh record)".into());
        }
        let epoch = seen.record.epoch.max(seen.owner.map_or(0, |o| o.epoch)) + 1;
        let owner = Owner { node: self.me, epoch };
        let mut record = seen.record.clone();
        record.node = self.me;
        record.epoch = epoch;
        // Its copy suspect, it is the truth only as every ACTIVE copy lost power: what was
        // acknowledged and not synced may be gone (T5).
        record.lost_at = takeover::lost_mark(record.lost_at, epoch, self.suspect());
        let take = Msg::Take {
            session,
            owner_version: seen.owner_version,
            record_version: seen.record_version,
            owner,
            record: record.clone(),
        };
        if !matches!(rpc.call(META, take, META_TIMEOUT).await, Some(Msg::Cas(true))) {
            return Err("the CAS failed".into());
        }
        let replaced = seen.owner.is_some();
        let last_owner = seen.record.node;
        let view =
            Rc::new(View::open(self.sh.clone(), rpc, self.lease.clone(), self.me, &record, owner)?);
        match view.fence_copies().await {
            Err(e) => {
                view.depose(&e);
                return Err(e);
            }
            // A copy this owner could not fence would honour the leases the last owner
            // granted, if its session may be live (no clean hand-over is modeled).
            Ok(true) => {
                let live = replaced || last_owner == self.me || seen.up.contains(&last_owner);
                if live {
                    view.hold_acks_after_unclean_take();
                }
            }
            Ok(false) => {}
        }
        // Its copy is the truth now: as good as any there is.
        let mut disks = self.sh.disks.borrow_mut();
        if std::mem::take(&mut disks[self.me].component.suspect) {
            self.sh.note(format!("node {} took the volume with a suspect copy", self.me));
        }
        drop(disks);
        self.sh.note(format!("node {} serves at epoch {epoch}", self.me));
        *self.view.borrow_mut() = Some(view.clone());
        tokio::task::spawn_local(view.run_resync());
        Ok(())
    }
}

/// Runs storage node `me` (again after each restart: its disk is what it keeps).
pub async fn run(sh: Rc<Shared>, me: usize) -> turmoil::Result {
    sh.routing.borrow_mut()[me] = 0; // What it forwarded before a crash died with it.
    let node = Rc::new(Node {
        me,
        read_lease: Rc::default(),
        sh: sh.clone(),
        rpc: RefCell::new(None),
        lease: Rc::new(Lease::default()),
        seen: RefCell::new(None),
        view: RefCell::new(None),
        taking: Cell::new(false),
        memory: Cell::new(Memory::default()),
        unflushed: RefCell::default(),
    });
    let weak: Weak<Node> = Rc::downgrade(&node);
    let rpc = Rpc::start(sh, me, move |from, msg| {
        let node = weak.upgrade();
        Box::pin(async move { node?.handle(from, msg).await })
    })
    .await;
    *node.rpc.borrow_mut() = Some(rpc);
    tokio::task::spawn_local(node.clone().session());
    tokio::task::spawn_local(node.clone().steward());
    std::future::pending::<()>().await;
    Ok(())
}
