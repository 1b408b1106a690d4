//! The node's resync scheduler, the shell around `strata_replica::schedule` (which makes
//! every decision): resync jobs are async tasks that wait for their turn on a oneshot
//! (no thread parked, no `block_on`), the slots this node grants for jobs writing to its
//! copies, and how a running job shares the node with client I/O.
//!
//! Invariants:
//! 1. At most `resync_jobs` (config, default 2) jobs this node sends hold a [`Permit`] at
//!    once, whatever the volumes; and at most `resync_jobs` jobs writing to this node's
//!    copies hold one of its slots at once. The two counts are apart: a sending job that
//!    waits for a slot elsewhere never holds one a job coming here needs, so two nodes
//!    resyncing to each other cannot lock each other out.
//! 2. A job starts in the order `schedule` gives (`schedule.rs` invariant 3): the most
//!    urgent level first — the volume with the fewest ACTIVE copies, then the lower
//!    class, then arrival — round robin among the volumes of a level.
//! 3. A job writes only while it holds a slot on the node of the copy it writes (renewed
//!    while it runs; freed when it ends, or [`SLOT_LEASE`] after its holder stopped
//!    renewing it, so a crashed owner's slot frees itself). Refused (`Busy`), it goes
//!    back to its place in the queue and that node gets no job for [`SLOT_RETRY`]: a
//!    busy node is no failed copy. A node that cannot answer is asked nothing more: the
//!    job's own requests find out whether its copy answers.
//! 4. A running job paces itself: after a step during which clients did I/O on its
//!    volume, it pauses as long as the step took, so under client load resync gets half
//!    the time and clients the other half; on an idle volume it runs flat out.

use crate::poison::Locked;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_replica::schedule::{Level, Load, Policy, Scheduler as Core, Slots, Tick};
use tokio::sync::oneshot;

/// Resync jobs a node runs at once by default (config `resync_jobs`).
pub const JOBS_DEFAULT: usize = 2;
/// How long a slot granted here lasts unless its holder renews it.
pub const SLOT_LEASE: Duration = Duration::from_secs(30);
/// A running job renews its slot when it is this old.
pub const SLOT_RENEW: Duration = Duration::from_secs(10);
/// How long a node that refused a slot gets no job.
pub const SLOT_RETRY: Duration = Duration::from_millis(500);

/// A slot's holder: (the sending node, its job).
type Holder = (u64, u64);

/// The scheduler (one per node).
pub struct Scheduler {
    policy: Policy,
    /// The clock `schedule`'s ticks are read from (tokio's: the same as the system's
    /// monotonic clock, but for tests that pause it).
    origin: tokio::time::Instant,
    next_job: AtomicU64,
    sending: Mutex<Sending>,
    receiving: Mutex<Slots<Holder>>,
}

/// The jobs this node sends: the decisions, and each waiting job's wake-up.
struct Sending {
    core: Core<String, u64, u64>,
    waiting: HashMap<u64, oneshot::Sender<()>>,
}

/// A job this node sends; dropped (done, failed, or given up while waiting), it ends and
/// the next job may start.
pub struct Permit {
    scheduler: Arc<Scheduler>,
    job: u64,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.scheduler.lock();
        // Unknown only if it ended already (its wake-up found nobody waiting).
        let _ = s.core.finished(&self.job);
        s.waiting.remove(&self.job);
        self.scheduler.pump(&mut s);
    }
}

impl Permit {
    /// The job's number (unique on this node since it started; what its slot is named by).
    pub fn job(&self) -> u64 {
        self.job
    }

    /// Waits for its turn (invariant 2).
    async fn started(self, rx: oneshot::Receiver<()>) -> Permit {
        // The sender goes only with the job's entry, which only this permit ends.
        let _ = rx.await;
        self
    }

    /// The node of the copy it writes had no slot for it: it goes back to its place in
    /// the queue, that node gets no job for [`SLOT_RETRY`], and it waits for its turn
    /// again (invariant 3).
    pub async fn refused(self) -> Permit {
        let scheduler = self.scheduler.clone();
        let rx = {
            let mut s = scheduler.lock();
            let until = scheduler.tick() + millis(SLOT_RETRY);
            let _ = s.core.refused(&self.job, until);
            let (tx, rx) = oneshot::channel();
            s.waiting.insert(self.job, tx);
            scheduler.pump(&mut s);
            rx
        };
        // Nothing else may happen when the node rests no more: look again then.
        let again = scheduler.clone();
        tokio::spawn(async move {
            tokio::time::sleep(SLOT_RETRY).await;
            let mut s = again.lock();
            again.pump(&mut s);
        });
        self.started(rx).await
    }
}

fn millis(d: Duration) -> Tick {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Scheduler {
    /// A scheduler running at most `jobs` jobs at once, and granting at most `jobs` slots.
    pub fn new(jobs: usize) -> Scheduler {
        Scheduler {
            policy: Policy::default(),
            origin: tokio::time::Instant::now(),
            next_job: AtomicU64::new(1),
            sending: Mutex::new(Sending { core: Core::new(jobs), waiting: HashMap::new() }),
            receiving: Mutex::new(Slots::new(jobs)),
        }
    }

    /// Sets the threshold (config `resync_jobs`, at least 1) for the jobs it sends and
    /// the slots it grants.
    pub fn set_jobs(&self, jobs: usize) {
        self.lock().core.set_threshold(jobs);
        self.receiving.locked("the resync slots granted").set_threshold(jobs);
        let mut s = self.lock();
        self.pump(&mut s);
    }

    fn tick(&self) -> Tick {
        millis(self.origin.elapsed())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sending> {
        self.sending.locked("the resync queue")
    }

    /// Wakes every job that may start now.
    fn pump(&self, s: &mut Sending) {
        let now = self.tick();
        while let Some(start) = s.core.next(now) {
            let woken = s.waiting.remove(&start.job).is_some_and(|tx| tx.send(()).is_ok());
            if !woken {
                // Its task gave up meanwhile: the job ends here.
                let _ = s.core.finished(&start.job);
            }
        }
    }

    /// The level of a job for a volume with `active` ACTIVE copies (every volume is of
    /// the policy's class today).
    pub fn level(&self, active: usize) -> Level {
        self.policy.level(active, None)
    }

    /// Queues a job of `volume` writing to node `target` at `level`, and waits for its
    /// turn (invariant 2).
    pub async fn start(self: &Arc<Self>, volume: &str, target: u64, level: Level) -> Permit {
        let job = self.next_job.fetch_add(1, Ordering::Relaxed);
        let permit = Permit { scheduler: self.clone(), job };
        let rx = {
            let mut s = self.lock();
            let (tx, rx) = oneshot::channel();
            s.waiting.insert(job, tx);
            if let Err(e) = s.core.submit(volume.to_owned(), job, target, level) {
                tracing::error!("resync scheduler: {e}"); // A new number each time: never.
            }
            self.pump(&mut s);
            rx
        };
        permit.started(rx).await
    }

    /// Jobs this node sends, running and waiting now.
    pub fn load(&self) -> Load {
        self.lock().core.load()
    }

    /// A slot for job `job` of node `node`, writing to a copy here (renewed if it holds
    /// one); `false`: every slot is taken (invariant 3).
    pub fn acquire_slot(&self, node: u64, job: u64) -> bool {
        let now = self.tick();
        let mut slots = self.receiving.locked("the resync slots granted");
        slots.acquire((node, job), now, now + millis(SLOT_LEASE))
    }

    /// Job `job` of node `node` ended.
    pub fn release_slot(&self, node: u64, job: u64) {
        self.receiving.locked("the resync slots granted").release(&(node, job));
    }

    /// Slots held here now (jobs writing to this node's copies).
    pub fn slots_held(&self) -> usize {
        self.receiving.locked("the resync slots granted").held(self.tick())
    }
}

/// Paces one job's steps against client I/O (invariant 4).
pub struct Pacer {
    step_start: Instant,
    ops_at_start: u64,
}

impl Pacer {
    /// Starts pacing; `ops` is the volume's client I/O count now.
    pub fn new(ops: u64) -> Pacer {
        Pacer { step_start: Instant::now(), ops_at_start: ops }
    }

    /// After a step: how long to pause given the client I/O count now (and starts the
    /// next step's clock after that pause).
    pub fn after_step(&mut self, ops: u64) -> Duration {
        let took = self.step_start.elapsed();
        let pause = if ops != self.ops_at_start { took } else { Duration::ZERO };
        self.step_start = Instant::now() + pause;
        self.ops_at_start = ops;
        pause
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn at_most_the_limit_run_and_the_least_redundant_volume_goes_first() {
        let scheduler = Arc::new(Scheduler::new(2));
        let a = scheduler.start("a", 3, scheduler.level(2)).await;
        let b = scheduler.start("b", 3, scheduler.level(2)).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Queued in this order; they must run by level, then arrival: one ACTIVE copy
        // first.
        for (name, active) in [("big", 2), ("small", 2), ("fragile", 1)] {
            let (s, o) = (scheduler.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = s.start(name, 3, s.level(active)).await;
                o.lock().unwrap().push(name);
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(p);
            }));
            tokio::task::yield_now().await;
        }
        assert_eq!(scheduler.load(), Load { running: 2, waiting: 3 }, "two run, three wait");
        drop(a);
        tokio::task::yield_now().await;
        assert_eq!(order.lock().unwrap().as_slice(), ["fragile"], "one permit was free");
        drop(b);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(order.lock().unwrap().as_slice(), ["fragile", "big", "small"]);
        assert_eq!(scheduler.load(), Load::default());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_refused_job_waits_out_its_node_and_a_job_given_up_while_waiting_ends() {
        let scheduler = Arc::new(Scheduler::new(1));
        let p = scheduler.start("a", 3, scheduler.level(2)).await;
        let s = scheduler.clone();
        let waiter = tokio::spawn(async move { s.start("b", 3, s.level(2)).await.job() });
        tokio::task::yield_now().await;
        let refused_at = tokio::time::Instant::now();
        // Node 3 is busy: a goes back; b writes to node 3 too, so nothing starts until
        // the node rests no more; then a, which kept its place.
        let p = p.refused().await;
        assert!(refused_at.elapsed() >= SLOT_RETRY, "{:?}", refused_at.elapsed());
        assert_eq!(scheduler.load(), Load { running: 1, waiting: 1 });
        drop(p);
        assert_eq!(waiter.await.unwrap(), 2);
        // A job given up while it waits leaves the queue.
        let p = scheduler.start("c", 3, scheduler.level(2)).await;
        let s = scheduler.clone();
        let waiter = tokio::spawn(async move { s.start("d", 3, s.level(2)).await.job() });
        tokio::task::yield_now().await;
        assert_eq!(scheduler.load(), Load { running: 1, waiting: 1 });
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(scheduler.load(), Load { running: 1, waiting: 0 });
        drop(p);
        assert_eq!(scheduler.load(), Load::default());
    }

    #[test]
    fn slots_here_are_bounded_and_freed() {
        let scheduler = Scheduler::new(1);
        assert!(scheduler.acquire_slot(1, 7));
        assert!(scheduler.acquire_slot(1, 7), "renewed");
        assert!(!scheduler.acquire_slot(2, 7), "one slot");
        assert_eq!(scheduler.slots_held(), 1);
        scheduler.release_slot(1, 7);
        assert!(scheduler.acquire_slot(2, 7));
    }

    #[test]
    fn a_step_pauses_as_long_as_it_took_only_when_clients_did_io() {
        let mut pacer = Pacer::new(7);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(pacer.after_step(7), Duration::ZERO, "no client I/O: no pause");
        std::thread::sleep(Duration::from_millis(20));
        let pause = pacer.after_step(9);
        assert!(pause >= Duration::from_millis(20) && pause < Duration::from_secs(1), "{pause:?}");
    }
}
