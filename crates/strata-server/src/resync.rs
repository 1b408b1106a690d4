//! The node's resync scheduler: how many resync jobs run at once, which waiting job runs
//! next, and how a running job shares the node with client I/O.
//!
//! Invariants:
//! 1. At most `limit` jobs hold a permit at once (per node, whatever the volumes).
//! 2. A freed permit goes to the waiting job with the lowest priority key: first the
//!    volume with the fewest ACTIVE copies (the least redundant data is protected
//!    first), then the least work left (short jobs do not queue behind a full rebuild),
//!    then arrival order.
//! 3. A running job paces itself: after a step during which clients did I/O on its
//!    volume, it pauses as long as the step took, so under client load resync gets half
//!    the time and clients the other half; on an idle volume it runs flat out.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Resync jobs a node runs at once.
pub const JOBS_AT_ONCE: usize = 2;

/// Which waiting job runs first (lower first): (ACTIVE copies, regions left).
pub type Priority = (usize, u64);

/// The scheduler (one per node).
pub struct Scheduler {
    limit: usize,
    state: Mutex<Queue>,
    freed: Condvar,
}

#[derive(Default)]
struct Queue {
    running: usize,
    next_ticket: u64,
    waiting: Vec<(Priority, u64)>,
}

/// A running job's permit; dropping it lets the next job run.
pub struct Permit<'a>(&'a Scheduler);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut q = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        q.running -= 1;
        self.0.freed.notify_all();
    }
}

impl Scheduler {
    /// A scheduler running at most `limit` jobs at once.
    pub fn new(limit: usize) -> Scheduler {
        Scheduler { limit: limit.max(1), state: Mutex::default(), freed: Condvar::new() }
    }

    /// Waits (blocking) for a permit, served in priority order (invariant 2).
    pub fn acquire(&self, priority: Priority) -> Permit<'_> {
        let mut q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.waiting.push((priority, ticket));
        loop {
            let first = q.waiting.iter().min().map(|(_, t)| *t);
            if q.running < self.limit && first == Some(ticket) {
                q.waiting.retain(|(_, t)| *t != ticket);
                q.running += 1;
                // Another permit may be free for the next in line.
                self.freed.notify_all();
                return Permit(self);
            }
            q = self.freed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Jobs running and waiting now.
    pub fn load(&self) -> (usize, usize) {
        let q = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (q.running, q.waiting.len())
    }
}

/// Paces one job's steps against client I/O (invariant 3).
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
    use std::sync::Arc;

    #[test]
    fn at_most_the_limit_run_and_the_least_redundant_volume_goes_first() {
        let scheduler = Arc::new(Scheduler::new(2));
        let a = scheduler.acquire((2, 100));
        let b = scheduler.acquire((2, 100));
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        // Queued in this order; they must run by priority: one ACTIVE copy first, then
        // the least work, then arrival.
        for (name, priority) in [("big", (2, 5000)), ("small", (2, 10)), ("fragile", (1, 9000))] {
            let (s, o) = (scheduler.clone(), order.clone());
            waiting.push(std::thread::spawn(move || {
                let _p = s.acquire(priority);
                o.lock().unwrap().push(name);
                std::thread::sleep(Duration::from_millis(20));
            }));
            while scheduler.load().1 < waiting.len() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(scheduler.load(), (2, 3), "two run, three wait");
        drop(a);
        // One permit is free: only one waiter may take it (b still holds the other).
        while order.lock().unwrap().is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(order.lock().unwrap().as_slice(), ["fragile"]);
        drop(b);
        for w in waiting {
            w.join().unwrap();
        }
        assert_eq!(order.lock().unwrap().as_slice(), ["fragile", "small", "big"]);
        assert_eq!(scheduler.load(), (0, 0));
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
