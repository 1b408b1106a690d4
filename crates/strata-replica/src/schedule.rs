//! Resync scheduling, as decisions only (sans-I/O: no tokio, no clock reads, no files):
//! which resync job a node starts next, how many run at once, and the slots a node grants
//! for the jobs that write to its copies. The seed's scheme ("intelligently scheduling
//! resynchronization jobs"): a job queue per object (a volume), each object's queue
//! entered into a global queue of its priority level when its first job arrives.
//! Time comes in as [`Tick`]s (milliseconds on any monotonic clock the caller keeps).
//!
//! Invariants ([`Scheduler::validate`] and [`Slots::validate`] check them):
//! 1. At most `threshold` jobs run at once: [`Scheduler::next`] starts none while that
//!    many run.
//! 2. An object's queue is in exactly one level's global queue, its own level's, while it
//!    has a job waiting, and in none once it has none (an empty queue is dropped).
//! 3. [`Scheduler::next`] starts a job of the most urgent level holding one that may start
//!    now (its target not refusing): a job of a less urgent level never starts while one
//!    of a more urgent level that could start waits. Within a level, objects take turns
//!    (round robin: an object whose job started goes to the back of its level), so one
//!    volume's many jobs do not starve another's; within an object, jobs start in the
//!    order they came (skipping one whose target is refusing).
//! 4. A job refused by its target (no slot there, [`Scheduler::refused`]) goes back to the
//!    front of its object's queue, and its object to the front of its level: it keeps its
//!    place. Its target takes no job until the given tick; then all of that target's jobs
//!    may start again together, so the most urgent goes first.
//! 5. Every job submitted starts, once those running finish (or are refused) and its
//!    target's refusal ran out: levels are finite and each start moves its object behind
//!    the others of its level.
//! 6. A node grants at most `threshold` slots ([`Slots`]) for jobs writing to its copies,
//!    each until a tick its holder renews: a holder that crashed frees its slot by
//!    itself.

use std::collections::{BTreeMap, VecDeque};

/// A moment, in milliseconds, on the caller's monotonic clock.
pub type Tick = u64;

/// A volume's class: volumes of a lower class resync first among those with as many
/// ACTIVE copies left. Today every volume is of [`Class::DEFAULT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Class(pub u8);

impl Class {
    /// The class of a volume that names none.
    pub const DEFAULT: Class = Class(4);
}

impl Default for Class {
    fn default() -> Class {
        Class::DEFAULT
    }
}

/// A job's priority level: lower is more urgent. Ordered by the redundancy left (fewest
/// ACTIVE copies first: the least protected data is protected first), then the class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Level {
    /// The volume's ACTIVE copies when the job was submitted.
    pub active: u32,
    /// The volume's class.
    pub class: Class,
}

/// How a job's level is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// The class of a volume that names none.
    pub class: Class,
}

impl Policy {
    /// The level of a job for a volume with `active` ACTIVE copies and class `class`
    /// (`None`: the policy's).
    pub fn level(&self, active: usize, class: Option<Class>) -> Level {
        Level {
            active: u32::try_from(active).unwrap_or(u32::MAX),
            class: class.unwrap_or(self.class),
        }
    }
}

/// A job that [`Scheduler::next`] started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Start<O, J, T> {
    /// Its object.
    pub object: O,
    /// The job.
    pub job: J,
    /// The node holding the copy it writes.
    pub target: T,
    /// Its level.
    pub level: Level,
}

/// Jobs running and waiting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Jobs started and not yet finished or refused.
    pub running: usize,
    /// Jobs submitted and not started (or refused and back in their queue).
    pub waiting: usize,
}

/// Why the scheduler refused a call.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The job was submitted already and has not finished.
    #[error("job {0} was submitted already")]
    Duplicate(String),
    /// No such job (never submitted, or finished).
    #[error("no job {0}")]
    Unknown(String),
    /// The job is waiting, not running.
    #[error("job {0} is not running")]
    NotRunning(String),
}

#[derive(Clone, Debug)]
struct JobState<O, T> {
    object: O,
    target: T,
    level: Level,
    running: bool,
}

#[derive(Clone, Debug)]
struct ObjectQueue<J> {
    level: Level,
    jobs: VecDeque<J>,
}

/// One node's resync scheduler (the jobs it sends). `O` names objects (volumes), `J`
/// jobs, `T` the nodes jobs write to.
#[derive(Clone, Debug)]
pub struct Scheduler<O, J, T> {
    threshold: usize,
    /// The global queues: per level, the objects with a job waiting, in turn order.
    levels: BTreeMap<Level, VecDeque<O>>,
    /// Per object with a job waiting: its level and its waiting jobs in arrival order.
    objects: BTreeMap<O, ObjectQueue<J>>,
    /// Every job submitted and not finished.
    jobs: BTreeMap<J, JobState<O, T>>,
    /// Targets that refused a job, until when.
    refusing: BTreeMap<T, Tick>,
    running: usize,
}

impl<O, J, T> Scheduler<O, J, T>
where
    O: Ord + Clone + std::fmt::Debug,
    J: Ord + Clone + std::fmt::Debug,
    T: Ord + Clone + std::fmt::Debug,
{
    /// A scheduler running at most `threshold` jobs at once (at least 1).
    pub fn new(threshold: usize) -> Self {
        Scheduler {
            threshold: threshold.max(1),
            levels: BTreeMap::new(),
            objects: BTreeMap::new(),
            jobs: BTreeMap::new(),
            refusing: BTreeMap::new(),
            running: 0,
        }
    }

    /// The most jobs that run at once.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// Changes the threshold (at least 1): beyond a lower one, the jobs running go on,
    /// and none starts until fewer run.
    pub fn set_threshold(&mut self, threshold: usize) {
        self.threshold = threshold.max(1);
    }

    /// Queues `job` of `object`, writing to `target`. The object takes `level` (the
    /// latest word on its redundancy): one already waiting at another level moves to the
    /// back of that level's queue.
    pub fn submit(
        &mut self,
        object: O,
        job: J,
        target: T,
        level: Level,
    ) -> Result<(), ScheduleError> {
        if self.jobs.contains_key(&job) {
            return Err(ScheduleError::Duplicate(format!("{job:?}")));
        }
        let state = JobState { object: object.clone(), target, level, running: false };
        self.jobs.insert(job.clone(), state);
        match self.objects.get_mut(&object) {
            Some(q) => {
                q.jobs.push_back(job);
                if q.level != level {
                    let old = std::mem::replace(&mut q.level, level);
                    self.leave_level(&object, old);
                    self.levels.entry(level).or_default().push_back(object);
                }
            }
            None => {
                self.objects
                    .insert(object.clone(), ObjectQueue { level, jobs: VecDeque::from([job]) });
                self.levels.entry(level).or_default().push_back(object);
            }
        }
        Ok(())
    }

    /// Takes `object` out of level `level`'s queue (dropping the queue if it empties).
    fn leave_level(&mut self, object: &O, level: Level) {
        if let Some(q) = self.levels.get_mut(&level) {
            q.retain(|o| o != object);
            if q.is_empty() {
                self.levels.remove(&level);
            }
        }
    }

    /// Whether `target` refuses jobs at `now`.
    fn refuses(&self, target: &T, now: Tick) -> bool {
        self.refusing.get(target).is_some_and(|until| *until > now)
    }

    /// The next job to start at `now`, if fewer than the threshold run and one may start
    /// (invariant 3); it counts as running from then.
    pub fn next(&mut self, now: Tick) -> Option<Start<O, J, T>> {
        self.refusing.retain(|_, until| *until > now);
        if self.running >= self.threshold {
            return None;
        }
        let mut found = None;
        'levels: for (level, queue) in &self.levels {
            for (at, object) in queue.iter().enumerate() {
                let waiting = &self.objects[object].jobs;
                let pick = waiting.iter().position(|j| !self.refuses(&self.jobs[j].target, now));
                if let Some(k) = pick {
                    found = Some((*level, at, object.clone(), k));
                    break 'levels;
                }
            }
        }
        let (level, at, object, k) = found?;
        let queue = self.objects.get_mut(&object).expect("a queued object has a queue");
        let job = queue.jobs.remove(k).expect("picked from the queue");
        let more = !queue.jobs.is_empty();
        let line = self.levels.get_mut(&level).expect("picked from the level");
        line.remove(at);
        if more {
            line.push_back(object.clone());
        } else {
            self.objects.remove(&object);
            if line.is_empty() {
                self.levels.remove(&level);
            }
        }
        let state = self.jobs.get_mut(&job).expect("a queued job is known");
        state.running = true;
        self.running += 1;
        state.level = level;
        Some(Start { object, job, target: state.target.clone(), level })
    }

    /// A running job's target had no slot for it: it stops running and goes back to the
    /// front of its object's queue (its object to the front of its level), and that
    /// target takes no job before `until` (invariant 4).
    pub fn refused(&mut self, job: &J, until: Tick) -> Result<(), ScheduleError> {
        let state =
            self.jobs.get_mut(job).ok_or_else(|| ScheduleError::Unknown(format!("{job:?}")))?;
        if !state.running {
            return Err(ScheduleError::NotRunning(format!("{job:?}")));
        }
        state.running = false;
        self.running -= 1;
        let (object, target, own) = (state.object.clone(), state.target.clone(), state.level);
        let at = self.refusing.entry(target).or_insert(until);
        *at = (*at).max(until);
        let level = match self.objects.get_mut(&object) {
            Some(q) => {
                q.jobs.push_front(job.clone());
                let level = q.level;
                self.leave_level(&object, level);
                level
            }
            None => {
                let level = own;
                let q = ObjectQueue { level, jobs: VecDeque::from([job.clone()]) };
                self.objects.insert(object.clone(), q);
                level
            }
        };
        self.levels.entry(level).or_default().push_front(object);
        Ok(())
    }

    /// `job` ended (done, failed, or given up while waiting): a running job frees its
    /// place; a waiting one leaves its queue.
    pub fn finished(&mut self, job: &J) -> Result<(), ScheduleError> {
        let state =
            self.jobs.remove(job).ok_or_else(|| ScheduleError::Unknown(format!("{job:?}")))?;
        if state.running {
            self.running -= 1;
            return Ok(());
        }
        let q = self.objects.get_mut(&state.object).expect("a waiting job's object has a queue");
        q.jobs.retain(|j| j != job);
        if q.jobs.is_empty() {
            let level = q.level;
            self.objects.remove(&state.object);
            self.leave_level(&state.object, level);
        }
        Ok(())
    }

    /// Jobs running and waiting now.
    pub fn load(&self) -> Load {
        Load { running: self.running, waiting: self.jobs.len() - self.running }
    }

    /// The earliest tick after `now` at which a target that refused may take a waiting
    /// job again (when to call [`Scheduler::next`] without another event).
    pub fn wake_at(&self, now: Tick) -> Option<Tick> {
        self.jobs
            .values()
            .filter(|s| !s.running)
            .filter_map(|s| self.refusing.get(&s.target).copied())
            .filter(|until| *until > now)
            .min()
    }

    /// Checks invariant 2 and the bookkeeping (invariant 1 is checked by the callers of
    /// [`Scheduler::next`]: a lowered threshold leaves more running for a while); the
    /// first violation, if any.
    pub fn validate(&self) -> Result<(), String> {
        let running = self.jobs.values().filter(|s| s.running).count();
        if running != self.running {
            return Err(format!("{running} running, counted {}", self.running));
        }
        let mut seen = 0;
        for (object, q) in &self.objects {
            if q.jobs.is_empty() {
                return Err(format!("{object:?} has an empty queue"));
            }
            for j in &q.jobs {
                match self.jobs.get(j) {
                    Some(s) if !s.running && s.object == *object => seen += 1,
                    _ => return Err(format!("{j:?} queued under {object:?} wrongly")),
                }
            }
            for (level, line) in &self.levels {
                let n = line.iter().filter(|o| *o == object).count();
                if n != usize::from(*level == q.level) {
                    return Err(format!("{object:?} is {n} times in level {level:?}"));
                }
            }
        }
        if seen != self.jobs.len() - running {
            return Err("a waiting job is in no queue".into());
        }
        for (level, line) in &self.levels {
            if line.is_empty() || line.iter().any(|o| !self.objects.contains_key(o)) {
                return Err(format!("level {level:?} holds an empty or unknown queue"));
            }
        }
        Ok(())
    }
}

/// The slots a node grants for resync jobs writing to its copies (invariant 6), by
/// holder (`H`: the sending node and its job).
#[derive(Clone, Debug)]
pub struct Slots<H> {
    threshold: usize,
    held: BTreeMap<H, Tick>,
}

impl<H: Ord + Clone> Slots<H> {
    /// At most `threshold` slots (at least 1).
    pub fn new(threshold: usize) -> Self {
        Slots { threshold: threshold.max(1), held: BTreeMap::new() }
    }

    /// Frees the slots whose holders did not renew them by `now`.
    fn expire(&mut self, now: Tick) {
        self.held.retain(|_, until| *until > now);
    }

    /// A slot for `holder` until `until` (renewed if it holds one); `false`: none is free.
    pub fn acquire(&mut self, holder: H, now: Tick, until: Tick) -> bool {
        self.expire(now);
        if let Some(at) = self.held.get_mut(&holder) {
            *at = (*at).max(until);
            return true;
        }
        if self.held.len() >= self.threshold {
            return false;
        }
        self.held.insert(holder, until);
        true
    }

    /// Changes the threshold (at least 1); slots held beyond it stay until released.
    pub fn set_threshold(&mut self, threshold: usize) {
        self.threshold = threshold.max(1);
    }

    /// `holder`'s job ended; whether it held a slot.
    pub fn release(&mut self, holder: &H) -> bool {
        self.held.remove(holder).is_some()
    }

    /// Slots held at `now`.
    pub fn held(&mut self, now: Tick) -> usize {
        self.expire(now);
        self.held.len()
    }

    /// Checks invariant 6's count (under an unchanged threshold).
    pub fn validate(&self) -> Result<(), String> {
        if self.held.len() > self.threshold {
            return Err(format!("{} slots held, at most {}", self.held.len(), self.threshold));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
