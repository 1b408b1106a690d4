//! A deterministic simulation of Strata's replication protocol
//! (`docs/design/replication.md`), run over many seeds under crashes, partitions,
//! message loss and delay, and lost unsynced writes, and checked for the durability
//! contract, convergence, fencing and the protocol core's own invariants (`check.rs`).
//!
//! Dev-only (`publish = false`): nothing depends on this crate. It drives the protocol
//! core the server drives, `strata-replica` (with its `mutations` feature: below), on
//! [turmoil](https://docs.rs/turmoil): every host is a turmoil host with its own tokio
//! runtime in simulated time, and every message crosses turmoil's network (UDP
//! datagrams kept in order per pair of hosts, as a TCP connection keeps them, `net.rs`).
//!
//! **What runs real: the core's decisions**, the code the server runs. The owner view
//! (`view.rs`) drives `owner::OwnerState` as the server's `replicated` module does: a
//! new owner's start per copy (`Track::found`); every write and flush (`begin`,
//! `finish`, `conclude`: the copies to send to, the bitmaps to save first, which copies
//! failed and what goes into their bitmaps, the STALE marks to record, whether and when
//! to acknowledge); the fence and the periodic probes (`fenced`, `silent`, `lost_power`,
//! `answered`); read leases, the owner's side (`whole`, `grant`, `hold_acks_until`) and
//! a reading node's (`lease::ReadLease`: `granted`, `admits`, `renew_due`); the resync
//! plan, step by step (`resync_step`, `scanned`, `levelled_copying`, `cleared`,
//! `lose_unflushed`, `settled`); and
//! `OwnerState::validate` after every step (check 5). The steward (`node.rs`) takes the
//! volume when `takeover::decide` says so and deposes a view `takeover::superseded`
//! names, with `takeover::truth_for_suspect` for a suspect copy. Every timeout and
//! period is the server's, `Timing::DEFAULT.scaled(10)` (`model::timing`: only their
//! ratios matter, and a shorter simulated second runs more seeds).
//!
//! **What is modelled**: the network (above); the store (one component per node behind
//! its epoch fence, a page cache over a durable image, `model::Component`); Raft (the
//! metadata service is one host, `meta.rs`); sessions, routing, forwarding and the read
//! lease's router (`node.rs`); the clients; and the driver around the core: the I/O the
//! core leaves to it (region turns, sends and their timeouts, the owner's own copy, the
//! bitmap files, the record's compare-and-swap, digests and copies, the resync's locks),
//! written after the server's driver, not its code. Not run at all: the wire format and
//! MAC, real files, openraft, blocking threads.
//!
//! # What is modelled, precisely
//! - **The metadata service** (`meta.rs`), one host: a linearizable key-value store (one
//!   sequential state machine, as the Raft group is) with the volume's record
//!   (`{epoch, last owner, each copy's state}`) and owner key, compare-and-swap, and node
//!   sessions: one not heard from for `Timing::session_timeout` dies, and the owner key
//!   tied to it dies with it; registering again ends the old session. It never crashes
//!   (it stands for a Raft group), but partitions cut it off like any host.
//! - **Three storage nodes** (`node.rs`), each with one component of a 256-block
//!   (1 MiB, 16 regions of 64 KiB) volume. A component admits a request only through its
//!   epoch fence (below the fence: refused; a raise is on disk before the request
//!   applies, and admit and apply are one step). Writes land in a page cache; FLUSH or
//!   FUA syncs. **A machine crash keeps the synced image plus any subset of the unsynced
//!   writes (each survives with probability ½, applied in order)** and sets the copy's
//!   power-loss mark (suspect until an owner vouches for it); a process crash (kill -9)
//!   keeps the page cache. The owner's bitmap files are not synced: a machine crash
//!   starts a new boot, and a bitmap of another boot is not trusted (`View::open`).
//! - **Sessions and the owner lease**: heartbeats every `HEARTBEAT_EVERY`; an owner
//!   serves only under the session its owner key is tied to, while the last heartbeat
//!   the service accepted was *sent* less than `Timing::owner_lease` ago
//!   (`View::serving`, `Lease::fresh`). A node's view of the metadata is its last
//!   successful read (the member's applied state lags the same way when cut off).
//! - **Ownership** (`Node::steward`, `take_over`, `View::open`, `fence_copies`): the
//!   core's `takeover::decide` picks the moment (the last owner first, then each other
//!   node with an ACTIVE copy `Timing::takeover_step` later, a suspect copy last); the
//!   owner key by CAS at one above the highest epoch, tied to the session, if the fresh
//!   record shows this node's copy ACTIVE; the new owner raises its own copy's fence,
//!   then probes every other copy at its epoch (a silent one is STALE, a suspect one
//!   STALE with a full scan); its copy is the truth, every other ACTIVE copy gets a
//!   digest scan, a STALE copy keeps its bitmap only if kept at the epoch just before in
//!   the same boot and owing no scan (else a full scan).
//! - **The write path** (`View::fan_out`): region turns; the region into every STALE
//!   copy's bitmap before sending; sent to every ACTIVE and RESYNCING copy, then the own
//!   copy written; a copy that fails, times out or answers over a new connection (its
//!   node restarted) is STALE, with its unflushed regions and every region in flight in
//!   its bitmap, recorded by CAS (compared with the owner key) before the reply; fewer
//!   than `MIN_REPLICAS` (2) ACTIVE copies: the write fails. A FLUSH goes to every copy
//!   that is not STALE, and clears only the regions of writes completed before it was
//!   sent.
//! - **Resync** (`View::resync`, `level`, `check_copies`): a STALE copy that answers is
//!   RESYNCING (by CAS), scans and bitmap runs are compared by digest and differing
//!   regions copied, each step under the exclusive lock and only while the core says the
//!   copy may still be levelled; every region compared counts as unflushed; flushed over
//!   the same connection, it is vouched for and ACTIVE (by CAS). ACTIVE copies are
//!   probed every `Timing::resync_every`, and vouched for when the core finds them
//!   whole.
//! - **Routing** (`Node::route`): a client's request through any node, served by its
//!   view or forwarded to the owner, retried for `Timing::forward_patience` while a new
//!   owner is chosen (and still retried after the client gave up).
//! - **Read leases** (invariant 10; `Node::read_here`, `renew_lease` by the core's
//!   `lease::ReadLease` rules,
//!   `View::grant_lease`, the end of `fan_out`, `take_over`): a node that is not the
//!   owner serves a read from its own copy while it holds a lease (asked of the owner its
//!   metadata view names, at that epoch; valid `Timing::read_lease` from the ask) and its
//!   copy's fence is still exactly the lease's epoch (checked and read in one step); it
//!   asks again in the background once half is gone, and forwards meanwhile. The owner
//!   grants while it serves at that epoch, its metadata view still names it, and the
//!   core finds the copy whole (ACTIVE, owing no scan, last heard over the connection
//!   its node has now) and it answers a probe. A copy marked STALE (any path) has its
//!   lease revoked in the core, and no write or flush is acknowledged before that lease
//!   has run out; a take that replaced a live owner key (never after a clean hand-over:
//!   none is modelled) with an ACTIVE copy silent at the fence acknowledges nothing for
//!   `2 * Timing::read_lease`. A lease lives in the node's memory: a crash loses it.
//! - **Clients** (`client.rs`): six, each one request at a time through a random node;
//!   every write a unique id in one 4 KiB block (mostly 32 hot blocks); flushes, FUA
//!   writes, and reads (mostly of a block written lately); and six more that only read
//!   (`Scenario::readers`), mostly the block of the write acknowledged last, through a
//!   random node (so many reads are served under read leases); each operation's start,
//!   end and outcome recorded.
//! - **Faults** (`Faults`), chosen by the seed, one every 0.3–1.5 s during the first
//!   `FAULTS_END` of simulated time: crash and restart (50 ms–1.5 s later) of any node,
//!   the owner too, half of them machine crashes; partitions between any two of the
//!   nodes and the metadata service; a node cut off from all (often the owner); message
//!   loss (2–30 %) and delay (up to 100 ms); with `Scenario::crash_resyncing`, also a
//!   machine crash, half the time, of a copy's node soon after its copy turns RESYNCING;
//!   with `Scenario::crash_owner_after_resync`, of the owner's soon after a copy is
//!   ACTIVE again after its resync.
//!   Then every fault stops and the cluster gets up to `HEAL_MAX` to converge (the owner
//!   serving, every copy ACTIVE, no scan or forwarded request left, for `STABLE`); not
//!   converging is a failure too.
//!
//! # Checks (`check.rs` says each precisely)
//! 1. Every read, and every block at the end, shows the last write that must be visible
//!    or one concurrent with it (a per-block register whose unacknowledged writes may
//!    land any time or never), where the durability contract says what must be visible:
//!    a FLUSH/FUA reply protects the writes acknowledged before it against anything; a
//!    write's reply protects it unless every node that held it at the reply lost power
//!    or had its copy marked STALE before a flush covered it.
//! 2. After healing, every ACTIVE component equals the owner's.
//! 3. No component applied a request stamped with an epoch below one it had applied.
//! 4. Resync copied ≤ 1.25 × the region bytes its bitmaps marked (the design's measure;
//!    the seeds test prints it, about 0.16 over 10,000 seeds, and also the ratio to the
//!    bytes of distinct 4 KiB blocks written while copies were STALE, about 2.4: a
//!    64 KiB region is copied for a 4 KiB write, and regions unflushed when a copy
//!    failed are copied too; digest scans after a change of owner copy about two and a
//!    half times as much again).
//! 5. The core's invariants (`OwnerState::validate`, O1–O4) held after every step.
//! 6. With `Scenario::snapshots` (an operator takes a snapshot through a random node
//!    every 0.2–0.8 s; the owner runs `strata_replica::snapshot`'s barrier, undo of a
//!    half-made one in its periodic round, and a pending copy's catch-up before its
//!    resync): every snapshot the final record has `ready` holds, on every copy it
//!    lists, in every block, what a read spanning its command could have returned (check
//!    1's register: S1, and S4 as every copy the same); one acknowledged is `ready`.
//! 7. With snapshots, once converged: no copy keeps a snapshot the record does not list
//!    for it `ready` (S2), and every ACTIVE copy holds every `ready` one (S8). The first
//!    seeds found S5 as first built broken (a STALE copy turned RESYNCING during a
//!    barrier that skipped it, then ACTIVE without it): `snapshot::may_resync` now waits
//!    for a `creating` one; mutations `ResyncWhileCreating` (check 7) and
//!    `CatchUpFromLive` (check 6) are found by seeds 11 and 0 of that scenario.
//!
//! # Mapping to the design's invariants
//! 1 (placement): fixed, one component per node. 2 (owner by CAS, fences): modelled,
//! check 3 watches the fences. 3 (lease, fence before serving): modelled, check 1 on
//! reads. 4 (write reply, STALE before the reply, bitmaps, `min_replicas`): the core's,
//! checks 1 and 2. 5 (new owner's copy is the truth, scans): the core's, check 2.
//! 6 (every node serves, forwarding): modelled. 7 (delete): not modelled. 10 (read
//! leases): the core's, but for the clean hand-over's wait (no hand-over is modelled),
//! check 1 on every read served under a lease. 11 (power-loss marks): the core's
//! (`takeover`, `lost_power`, `settled`), checks 1 and 2.
//!
//! # Flaws found in the protocol
//! Each flaw the simulation found is fixed in the core (or, for 2, 5 and 8, in its
//! drivers), and each fix has a knob in `strata_replica::mutation` ([`Flaw`], numbered
//! as here): `mutation::set` re-opens it on the thread a seed runs on, and the core (or
//! this crate's driver) then takes the old, flawed branch. Each flaw's regression test in
//! `tests.rs`, `flaw_N_<name>_is_found_again`, runs a seed that fails a check with the
//! knob set and passes without it. Flaws 1–8 were found while the simulation was a
//! hand-written port of the server's code; 9–11 once it drove the core.
//! 1. `PowerLoss`: **a copy that lost power is not known to have lost anything.** Its
//!    node restarts and the owner's next request to it succeeds over a new connection,
//!    so it stays ACTIVE without the acknowledged writes it had not synced, and if it is
//!    first in line its copy becomes the truth. Fix: an answer over a new connection
//!    fails the copy (`OwnerState::finish`, `answered`); a copy that lost power is
//!    suspect until an owner vouches for it, and a suspect copy is not taken as the
//!    truth while one that is not may be (`takeover::line`, `decide`). Test: seed 26,
//!    check 1.
//! 2. `TakeChecksCopy`: **taking ownership does not check the fresh record.** The
//!    steward decides on its lagging view, the owner key is CASed where the fresh record
//!    shows this node's copy STALE, the view cannot open, and the owner key names a node
//!    that never serves. Fix (the driver's, `Node::take_over`): take only if the fresh
//!    record shows the copy ACTIVE. Test: seed 159, "did not converge".
//! 3. `BitmapKeepsScan`: **a kept bitmap forgets a scan its owner owed.** A copy owing
//!    a digest scan that turns STALE gets a bitmap of the regions written since; the next
//!    owner (same node, next epoch, same boot) trusts the file and never compares the
//!    others. Fix: such a bitmap is saved as owing a scan (`SaveBitmap::owes_scan`), and
//!    no later owner trusts it. Test: seed 23, check 2.
//! 4. `FlushClearsOlder`: **a flush's reply clears the regions of writes that completed
//!    after it was sent**, though the copy may have applied them after it synced; if it
//!    then loses power its bitmap lacks them. Fix: only regions of writes completed
//!    before the flush was sent are cleared (`OwnerState::finish`). Test: seed 7190 (none
//!    of the first 6000 fail, 5 of the next 8000), check 2.
//! 5. `SameSession`: **an old view serves again under a new session**: `serving`
//!    checked the session was fresh, not that it was the one the owner key was tied to,
//!    so a node that registers again makes its superseded view serve reads until its
//!    steward sees the new owner. Fix (the driver's, `View::serving`). Test: seed 143,
//!    check 1.
//! 6. `InFlightToBitmap`: **a failed copy's bitmap misses the writes still in flight.**
//!    They join it when they fail in turn, which never happens if the owner dies first;
//!    the next owner trusts the file. Fix: every region in flight joins the bitmap when
//!    the copy fails (`OwnerState::finish`). Test: seed 4184 (1 of the first 5000),
//!    check 2.
//! 7. `LevelKeepsEqual`: **a region a resync finds equal is tracked nowhere**, though it
//!    may be equal only in the copy's page cache; a power loss of the copy before the
//!    resync's flush loses it unseen. Fix: every region compared counts as unflushed
//!    until the copy's next flush (`OwnerState::levelled_copying`). Test: seed 274,
//!    check 2.
//! 8. `FenceOwnCopy`: **a deposed view's write lands on the next owner's own copy.** A
//!    write of a node's older view, deposed while it waited for its region's turn, passed
//!    the own copy's fence (still at that older epoch) after the node took the volume
//!    again and levelled the others with it. Fix (the driver's, `View::fence_copies`,
//!    `fan_out`): a new owner raises its own copy's fence first, and a write deposed
//!    while it waited sends nothing. Test (with no reading clients): seed 2355 (1 of
//!    the first 5000), check 2.
//! 9. `VouchAfterResync`: **a resynced copy stays suspect until the next periodic
//!    look**; if the owner loses power meanwhile both copies are suspect, and the
//!    owner's, lacking what it had not synced, may be taken as the truth. Fix: a copy
//!    levelled and flushed over its resync's connection is vouched for before it is
//!    ACTIVE (`OwnerState::settled`). Test (with `Scenario::crash_owner_after_resync`):
//!    seed 2 (5 of the first 1500), check 1.
//! 10. `LevelWhileStale`: **a resync goes on levelling a copy that failed mid-way**: its
//!     bitmap is emptied while it is STALE, and after a power loss of its node it differs
//!     for ever. Fix: no step levels a copy that failed since its resync began
//!     (`OwnerState::resync_step`, `may_level`: R1). Test (with
//!     `Scenario::crash_resyncing`): seed 698 (4 of the first 1500), check 2.
//! 11. `SuspectStaysActive`: **a copy answering a new owner's fence with its power-loss
//!     mark on stays ACTIVE** (owing only a scan); writes acknowledged with it as a
//!     holder are lost if the new owner loses power too. Fix: it is STALE with a full
//!     scan (`OwnerState::lost_power`). Test (with `Scenario::crash_resyncing`): seed 19
//!     (3 of the first 1000), check 1.
//! 12. `FlushAcrossLoss`: **a flush begun before every copy lost power is acknowledged
//!     after it.** Writes acknowledged and held by two copies both lost with their
//!     machines before any flush; a FLUSH begun meanwhile is retried by its forwarder
//!     until the node back from its power loss takes the volume with its suspect copy as
//!     the truth, and that owner acknowledged it as if they were durable. Fix: such a
//!     take marks the record (`lost_at`, takeover T5), a route says the epoch a flush
//!     began at, and an owner does not acknowledge one from before the mark
//!     (`takeover::flush_survives`). Found as built by the 10,000 seeds once the
//!     simulation took the core's resync steps and lease rules. Test: seed 8413, check 1.
//!     A route's flush says the epoch of the oldest write its node acknowledged that no
//!     flush covers yet (`takeover::Unflushed`), so one arriving after the take fails
//!     too; check 1 excuses a loss before a flush began, so no seed can show that part
//!     (the server's cluster test does).
//!
//! # Not covered
//! The wire format and MAC, LSN bookkeeping (used only to order flushes and writes),
//! trims and multi-block writes, read repair and corrupt blocks, rebuilds of an emptied
//! disk, full disks, moves (`attach`, automatic moves, hand-over on SIGTERM), deletes
//! (of the volume, and of snapshots), rollbacks and clones,
//! the retried forwarded write's de-duplication, the resync scheduler and pacing, torn
//! writes, clock drift (all hosts share turmoil's clock), and a Raft group's own faults
//! (the metadata service is one always-correct host). Of read leases: `release`'s wait
//! for every lease (no clean hand-over is modelled). One volume of three components.
//!
//! # Running and reproducing
//! `cargo test -p strata-sim` runs 100 seeds, the flaw and mutation tests (about 100 s
//! on 2 cores in debug). More: `STRATA_SIM_SEEDS=10000 [STRATA_SIM_SEED_FROM=S]
//! cargo test -p strata-sim --release seeds_hold -- --nocapture` (about 30 ms a seed
//! per core in release: 10,000 seeds in about 5 minutes on 2 cores). A failing seed
//! prints itself, its counts and its trace's last lines; rerun it with
//! `STRATA_SIM_SEED=S cargo test -p strata-sim one_seed -- --nocapture`.
//! `STRATA_SIM_FLAW=N` (1–12, or a [`Flaw`] by name) re-opens a flaw in either.
//! `STRATA_SIM_FIND_FLAWS=N [STRATA_SIM_SEED_FROM=S] [STRATA_SIM_FLAW=n] cargo test -p
//! strata-sim --release find_flaws -- --nocapture` lists, for each flaw (or flaw n), the
//! seeds from S to below N that fail with it re-opened, which of them pass without it
//! (a regression seed must), and the first such one's report. A run's [`Scenario`] (the
//! default unless a test says otherwise) is set for these tests by
//! `STRATA_SIM_READERS=N` (reading clients; flaw 8's test runs with none),
//! `STRATA_SIM_CRASH_RESYNCING=1` (a copy's machine crashes mid-resync; flaws 10 and
//! 11's tests run so) and `STRATA_SIM_CRASH_OWNER_AFTER_RESYNC=1` (the owner's machine
//! crashes just after a resync; flaw 9's test runs so). `STRATA_SIM_MUTATION=M`
//! breaks [`Mutation`] `M` (a rule of the driver or the store, not a flaw) in the seeds
//! test; `STRATA_SIM_TRACE_LINES=N` keeps N trace lines (`one_seed` prints them). Two
//! experiments for read leases, off by default: `STRATA_SIM_FAST_REFUSE=1` makes a new
//! owner's fence probe to a node cut off from it fail at once (the real code's refused
//! or reset connection: the model's faults otherwise only ever time out, after
//! `Timing::probe_timeout` = `Timing::read_lease`, which alone outlasts any lease an
//! owner that just went away had granted), and `STRATA_SIM_OWNER_BOUNCE=1` makes half
//! the faults restart the owner at once, cut off from one other node (its leases from
//! before the crash may still run when it takes the volume again: its old owner key
//! died when it registered again, so the take is not "unclean").
//!
//! A run is exactly reproducible, across processes too: every random choice comes from
//! the seed (faults, clients and message loss from seeded `SmallRng`s, latencies from
//! turmoil's seeded one), hosts run on one thread in a fixed order, every map iterated
//! is ordered, and nothing draws from tokio's own RNG (no `select!`), so nothing needs
//! `--cfg tokio_unstable`; `a_seed_replays_exactly` checks the trace hash. A change to
//! the simulation or to the core moves every seed's course, so the flaw and mutation
//! tests' seeds must then be found again (`STRATA_SIM_FIND_FLAWS=N`, in the test's
//! scenario).

mod check;
mod client;
mod meta;
mod model;
mod net;
mod node;
mod view;

pub use model::Mutation;
pub use strata_replica::mutation::Flaw;

use model::{Shared, CLIENT, META, NODES};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;
use strata_replica::record::SnapshotState;

/// Faults happen until this (simulated time); the clients stop then too.
const FAULTS_END: Duration = Duration::from_millis(6000);
/// After the faults, the longest the cluster may take to converge.
const HEAL_MAX: Duration = Duration::from_millis(12000);
/// How long the cluster must stay converged to count as such (the owner probes every
/// copy every `Timing::resync_every`).
const STABLE: Duration = Duration::from_millis(1000);
/// Simulated time per turmoil step.
const TICK: Duration = Duration::from_millis(2);

/// One seed's result.
#[derive(Debug)]
pub struct Report {
    pub seed: u64,
    /// Every property that failed (empty: the seed passed).
    pub failures: Vec<String>,
    /// The trace's last lines.
    pub trace: Vec<String>,
    /// A hash of the whole trace (equal for two runs of one seed).
    pub trace_hash: u64,
    /// One line of counts.
    pub summary: String,
    /// Bytes resync copied from bitmaps, the region bytes bitmaps marked, the bytes
    /// digest scans copied, and the bytes of distinct blocks written while copies were
    /// STALE.
    pub resync: (u64, u64, u64, u64),
    /// Writes acknowledged, and operations in all.
    pub ops: (usize, usize),
    /// Reads served by a node other than the owner from its own copy, under a lease.
    pub local_reads: u64,
    /// Snapshots acknowledged to the operator (`Scenario::snapshots`).
    pub snapshots: usize,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "seed {}: {}", self.seed, self.summary)?;
        for x in &self.failures {
            writeln!(f, "  FAILED: {x}")?;
        }
        if !self.failures.is_empty() {
            writeln!(f, "  trace (last lines):")?;
            for l in &self.trace {
                writeln!(f, "    {l}")?;
            }
            writeln!(
                f,
                "  rerun: STRATA_SIM_SEED={} cargo test -p strata-sim one_seed -- --nocapture",
                self.seed
            )?;
        }
        Ok(())
    }
}

fn name(host: usize) -> String {
    match host {
        META => "meta".into(),
        CLIENT => "client".into(),
        n => format!("n{n}"),
    }
}

/// What a run's workload is, apart from its seed and protocol. The default is what the
/// seeds test runs; a flaw test may change it to make its flaw's interleaving common.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    /// Clients that only read (mostly the block of the write acknowledged last), so that
    /// many reads find a node other than the owner holding a read lease (invariant 10);
    /// the six clients that write run whatever this is.
    pub readers: usize,
    /// Besides the usual faults, a copy being resynced (RESYNCING in the record) has its
    /// node's machine crash mid-resync half the time (`Faults::crash_resyncing`).
    pub crash_resyncing: bool,
    /// Besides the usual faults, when the record shows a copy ACTIVE again after its
    /// resync, the owner's machine crashes soon after half the time
    /// (`Faults::crash_owner_after_resync`).
    pub crash_owner_after_resync: bool,
    /// An operator takes snapshots (`strata_replica::snapshot`) through random nodes all
    /// along; checks 6 and 7 hold them to S1, S2, S4 and S8.
    pub snapshots: bool,
}

impl Default for Scenario {
    fn default() -> Scenario {
        Scenario {
            readers: 6,
            crash_resyncing: false,
            crash_owner_after_resync: false,
            snapshots: false,
        }
    }
}

/// Runs one seed of the protocol as built (every flaw fixed, no mutation).
pub fn run_seed(seed: u64) -> Report {
    run(seed, None, None, Scenario::default())
}

/// The faults in force and to come.
struct Faults {
    rng: SmallRng,
    /// Per node: when it restarts, if it is down.
    down: [Option<Duration>; NODES],
    /// Partitioned pairs of hosts and when each heals.
    cut: BTreeMap<(usize, usize), Duration>,
    next: Duration,
    /// When the loss rate and latency go back to normal.
    calm_at: Option<Duration>,
    crashes: u32,
    lossy: u32,
    partitions: u32,
    /// Per node, with `Scenario::crash_resyncing`, while the record shows its copy
    /// RESYNCING: when its machine crashes (`None` inside: it does not).
    resyncing: [Option<Option<Duration>>; NODES],
    /// With `Scenario::crash_owner_after_resync`: the copies' states last seen in the
    /// record, and when the owner's machine crashes.
    last_states: Option<[model::CopyState; NODES]>,
    owner_crash_at: Option<Duration>,
}

impl Faults {
    fn inject(&mut self, sim: &mut turmoil::Sim<'_>, sh: &Shared, t: Duration) {
        let rng = &mut self.rng;
        let ms =
            |rng: &mut SmallRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..hi));
        if sh.owner_bounce && rng.random_bool(0.5) {
            // The experiment's fault: the owner restarts at once, cut off from one other
            // node (its read leases from before the crash may still run).
            let Some(o) = sh.published.borrow().0.map(|o| o.node) else { return };
            if self.down[o].is_some() {
                return;
            }
            let n = (o + rng.random_range(1..NODES)) % NODES;
            sim.crash(name(o));
            sh.busy.borrow_mut()[o] = None;
            self.crashes += 1;
            let back = t + ms(rng, 20, 100);
            self.down[o] = Some(back);
            let until = t + ms(rng, 300, 1000);
            sim.partition(name(o), name(n));
            sh.cut.borrow_mut().insert((o.min(n), o.max(n)));
            let e = self.cut.entry((o.min(n), o.max(n))).or_default();
            *e = (*e).max(until);
            self.partitions += 1;
            sh.note(format!(
                "FAULT crash n{o} (process), back at {}ms, cut from n{n} until {}ms",
                back.as_millis(),
                until.as_millis()
            ));
            return;
        }
        match rng.random_range(0..100) {
            0..30 => {
                let n = rng.random_range(0..NODES);
                if self.down[n].is_some() {
                    return;
                }
                let machine = rng.random_bool(0.5);
                self.crash(sim, sh, t, n, machine);
            }
            30..60 => {
                let (a, b) = if rng.random_bool(0.3) {
                    (rng.random_range(0..NODES), META)
                } else {
                    let a = rng.random_range(0..NODES);
                    (a, (a + rng.random_range(1..NODES)) % NODES)
                };
                let until = t + ms(rng, 100, 2000);
                sim.partition(name(a), name(b));
                sh.cut.borrow_mut().insert((a.min(b), a.max(b)));
                let e = self.cut.entry((a.min(b), a.max(b))).or_default();
                *e = (*e).max(until);
                self.partitions += 1;
                sh.note(format!(
                    "FAULT partition {} | {} until {}ms",
                    name(a),
                    name(b),
                    until.as_millis()
                ));
            }
            60..80 => {
                // Often the owner: the fault the lease is for.
                let owner = sh.published.borrow().0.map(|o| o.node);
                let a =
                    owner.filter(|_| rng.random_bool(0.5)).unwrap_or(rng.random_range(0..NODES));
                let until = t + ms(rng, 300, 3000);
                for b in (0..=META).filter(|b| *b != a) {
                    sim.partition(name(a), name(b));
                    sh.cut.borrow_mut().insert((a.min(b), a.max(b)));
                    let e = self.cut.entry((a.min(b), a.max(b))).or_default();
                    *e = (*e).max(until);
                }
                self.partitions += 1;
                sh.note(format!("FAULT isolate n{a} until {}ms", until.as_millis()));
            }
            _ => {
                let loss = [0.02, 0.1, 0.3][rng.random_range(0..3)];
                let latency = [10, 30, 100][rng.random_range(0..3)];
                sh.loss.set(loss);
                sim.set_max_message_latency(Duration::from_millis(latency));
                let until = t + ms(rng, 200, 2000);
                self.calm_at = Some(until);
                sh.note(format!(
                    "FAULT loss {loss}, latency up to {latency}ms until {}ms",
                    until.as_millis()
                ));
            }
        }
    }

    /// Crashes node `n` (a machine crash if `machine`: its unsynced writes each survive
    /// with probability ½), to restart 50 ms–1.5 s later.
    fn crash(
        &mut self,
        sim: &mut turmoil::Sim<'_>,
        sh: &Shared,
        t: Duration,
        n: usize,
        machine: bool,
    ) {
        let rng = &mut self.rng;
        sim.crash(name(n));
        let mut disks = sh.disks.borrow_mut();
        let disk = &mut disks[n];
        if machine {
            disk.boot += 1;
            let c = &mut disk.component;
            let unsynced = std::mem::take(&mut c.unsynced);
            let kept: Vec<(u64, u64)> =
                unsynced.into_iter().filter(|_| rng.random_bool(0.5)).collect();
            for (b, v) in kept {
                c.durable[b as usize] = v;
            }
            c.live.clone_from(&c.durable);
            c.suspect = true;
            sh.lossy_crashes.borrow_mut().push((t, n));
            self.lossy += 1;
        }
        drop(disks);
        sh.busy.borrow_mut()[n] = None;
        self.crashes += 1;
        let back = t + Duration::from_millis(rng.random_range(50..1500));
        self.down[n] = Some(back);
        sh.note(format!(
            "FAULT crash n{n} ({}), back at {}ms",
            if machine { "machine" } else { "process" },
            back.as_millis()
        ));
    }

    /// `Scenario::crash_resyncing`: each time the record shows a copy RESYNCING, with
    /// probability ½ its node's machine crashes 0–40 ms later if it still is.
    fn crash_resyncing(&mut self, sim: &mut turmoil::Sim<'_>, sh: &Shared, t: Duration) {
        let states = sh.published.borrow().1.as_ref().map(|r| r.states);
        for n in 0..NODES {
            let resyncing = states.is_some_and(|s| s[n] == model::CopyState::Resyncing);
            if !resyncing {
                self.resyncing[n] = None;
                continue;
            }
            let due = *self.resyncing[n].get_or_insert_with(|| {
                self.rng
                    .random_bool(0.5)
                    .then(|| t + Duration::from_millis(self.rng.random_range(0..40)))
            });
            if due.is_some_and(|at| t >= at) && self.down[n].is_none() {
                self.resyncing[n] = Some(None);
                self.crash(sim, sh, t, n, true);
            }
        }
    }

    /// `Scenario::crash_owner_after_resync`: each time the record shows a copy ACTIVE
    /// that was RESYNCING, with probability ½ the owner's machine crashes 0–200 ms later
    /// (within a periodic look of the owner's, `Timing::resync_every`).
    fn crash_owner_after_resync(&mut self, sim: &mut turmoil::Sim<'_>, sh: &Shared, t: Duration) {
        let states = sh.published.borrow().1.as_ref().map(|r| r.states);
        if let (Some(before), Some(now)) = (self.last_states, states) {
            let resynced = (0..NODES).any(|n| {
                before[n] == model::CopyState::Resyncing && now[n] == model::CopyState::Active
            });
            if resynced && self.owner_crash_at.is_none() && self.rng.random_bool(0.5) {
                self.owner_crash_at =
                    Some(t + Duration::from_millis(self.rng.random_range(0..200)));
            }
        }
        if states.is_some() {
            self.last_states = states;
        }
        if self.owner_crash_at.is_some_and(|at| t >= at) {
            self.owner_crash_at = None;
            let owner = sh.published.borrow().0.map(|o| o.node);
            if let Some(o) = owner.filter(|o| self.down[*o].is_none()) {
                self.crash(sim, sh, t, o, true);
            }
        }
    }

    /// Restarts, repairs and calms what is due at `t` (everything once `all`).
    fn expire(&mut self, sim: &mut turmoil::Sim<'_>, sh: &Shared, t: Duration, all: bool) {
        for n in 0..NODES {
            if self.down[n].is_some_and(|at| all || t >= at) {
                self.down[n] = None;
                sim.bounce(name(n));
                sh.note(format!("restart n{n}"));
            }
        }
        let due: Vec<(usize, usize)> =
            self.cut.iter().filter(|(_, until)| all || t >= **until).map(|(k, _)| *k).collect();
        for (a, b) in due {
            self.cut.remove(&(a, b));
            sim.repair(name(a), name(b));
            sh.cut.borrow_mut().remove(&(a, b));
        }
        if self.calm_at.is_some_and(|at| all || t >= at) {
            self.calm_at = None;
            sh.loss.set(0.0);
            sim.set_max_message_latency(Duration::from_millis(10));
        }
    }
}

/// Runs one seed, with `flaw` re-opened in the core (`strata_replica::mutation`) and the
/// checker's `mutation`, if any.
fn run(seed: u64, flaw: Option<Flaw>, mutation: Option<Mutation>, scenario: Scenario) -> Report {
    // The knobs are per thread: this seed runs on this one.
    strata_replica::mutation::set(flaw.as_slice());
    let mut rng = SmallRng::seed_from_u64(seed);
    let sh = Shared::new(SmallRng::seed_from_u64(rng.random()), mutation);
    let sh = Rc::new(Shared { snapshots: scenario.snapshots, ..sh });
    let mut sim = turmoil::Builder::new()
        .rng_seed(rng.random())
        .tick_duration(TICK)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(10))
        .simulation_duration(FAULTS_END + HEAL_MAX + Duration::from_secs(10))
        .build();
    for n in 0..NODES {
        let sh = sh.clone();
        sim.host(name(n), move || node::run(sh.clone(), n));
    }
    let s = sh.clone();
    sim.host(name(META), move || meta::run(s.clone()));
    let workload = client::run(sh.clone(), FAULTS_END, scenario.readers, scenario.snapshots);
    sim.client(name(CLIENT), workload);
    *sh.hosts.borrow_mut() = (0..=CLIENT).map(|h| sim.lookup(name(h))).collect();
    let mut faults = Faults {
        rng: SmallRng::seed_from_u64(rng.random()),
        down: [None; NODES],
        cut: BTreeMap::new(),
        next: Duration::from_millis(300),
        calm_at: None,
        crashes: 0,
        lossy: 0,
        partitions: 0,
        resyncing: [None; NODES],
        last_states: None,
        owner_crash_at: None,
    };
    let mut failures = Vec::new();
    let mut clients_done = false;
    let mut healed = false;
    let mut converged_at = None;
    let mut stable_since: Option<Duration> = None;
    loop {
        match sim.step() {
            Ok(done) => clients_done |= done,
            Err(e) => {
                failures.push(format!("a host failed: {e}"));
                break;
            }
        }
        let t = sim.elapsed();
        sh.clock.set(t);
        if t < FAULTS_END {
            faults.expire(&mut sim, &sh, t, false);
            if scenario.crash_resyncing {
                faults.crash_resyncing(&mut sim, &sh, t);
            }
            if scenario.crash_owner_after_resync {
                faults.crash_owner_after_resync(&mut sim, &sh, t);
            }
            if t >= faults.next {
                faults.inject(&mut sim, &sh, t);
                faults.next = t + Duration::from_millis(faults.rng.random_range(300..1500));
            }
            continue;
        }
        if !healed {
            faults.expire(&mut sim, &sh, t, true);
            sh.note("HEAL every fault stops".into());
            healed = true;
        }
        if clients_done && t.as_millis() % 50 == 0 {
            // Converged, and still so after the owner has probed every copy again.
            if !converged(&sh) {
                stable_since = None;
            } else if t - *stable_since.get_or_insert(t) >= STABLE {
                converged_at = Some(t);
                break;
            }
        }
        if t >= FAULTS_END + HEAL_MAX {
            break;
        }
    }
    if failures.is_empty() && converged_at.is_none() {
        let (owner, record) = sh.published.borrow().clone();
        failures.push(format!(
            "did not converge within {}ms of healing: owner {owner:?}, record {record:?}, \
             busy {:?}",
            HEAL_MAX.as_millis(),
            sh.busy.borrow()
        ));
    }
    let end = sim.elapsed();
    failures.extend(check(&sh, end, converged_at.is_some()));
    let history = sh.history.borrow();
    let count = |f: &dyn Fn(&model::Event) -> bool| history.iter().filter(|e| f(e)).count();
    let stats = sh.resync.borrow();
    let (resync, dirtied, scanned) = stats.iter().fold((0, 0, 0), |(r, d, s), x| {
        (r + x.resync_bytes, d + x.dirtied_bytes, s + x.scan_bytes)
    });
    let epoch = sh.published.borrow().1.as_ref().map_or(0, |r| r.epoch);
    let summary = format!(
        "{} ops ({} writes acked, {} failed, {} unknown; {} flushes acked), {} crashes \
         ({} machine), {} partitions, last epoch {epoch}, resync {resync} of {dirtied} dirtied \
         bytes, scans {scanned}, {} local reads, \
         converged {}",
        history.len(),
        count(&|e| matches!(e.op, model::Op::Write { .. }) && e.outcome == model::Outcome::Ok),
        count(&|e| matches!(e.op, model::Op::Write { .. }) && e.outcome == model::Outcome::Failed),
        count(&|e| e.outcome == model::Outcome::Unknown),
        count(&|e| matches!(e.op, model::Op::Flush) && e.outcome == model::Outcome::Ok),
        faults.crashes,
        faults.lossy,
        faults.partitions,
        sh.local_reads.get(),
        converged_at.map_or("never".into(), |t| format!("at {}ms", t.as_millis())),
    );
    let trace = sh.trace.borrow().iter().cloned().collect();
    strata_replica::mutation::set(&[]);
    let acked =
        count(&|e| matches!(e.op, model::Op::Write { .. }) && e.outcome == model::Outcome::Ok);
    Report {
        seed,
        failures,
        trace,
        trace_hash: sh.trace_hash.get(),
        summary,
        resync: (resync, dirtied, scanned, stats.iter().map(|x| x.away_bytes).sum()),
        ops: (acked, history.len()),
        local_reads: sh.local_reads.get(),
        snapshots: count(&|e| {
            matches!(e.op, model::Op::Snapshot { .. }) && e.outcome == model::Outcome::Ok
        }),
    }
}

/// Healed: the owner serves, every copy is ACTIVE, no scan is left, no snapshot is left
/// half-made.
fn converged(sh: &Shared) -> bool {
    let (owner, record) = sh.published.borrow().clone();
    let (Some(owner), Some(record)) = (owner, record) else { return false };
    let creating = record.snapshots.iter().any(|s| s.state == Some(SnapshotState::Creating));
    !creating
        && record.states.iter().all(|s| *s == model::CopyState::Active)
        && sh.busy.borrow()[owner.node] == Some(false)
        && sh.routing.borrow().iter().all(|n| *n == 0)
}

/// Checks 6 and 7, of snapshots (`Scenario::snapshots`). Check 6 (S1, S4): a snapshot
/// the final record has `ready` holds, on every copy it lists, in every block, a value a
/// read spanning its command could have returned (as check 1 has it: every write
/// acknowledged before the command began, unless lost; nothing begun after it ended),
/// the same on every copy; one acknowledged to its client is `ready`. Check 7 (S2, S8),
/// once converged: no copy keeps a snapshot the record does not have `ready` with that
/// copy among its holders, and every ACTIVE copy holds every `ready` one.
fn check_snapshots(
    sh: &Shared,
    history: &[model::Event],
    register: &check::Register,
    end: Duration,
    converged: bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    let Some(record) = sh.published.borrow().1.clone() else { return failures };
    let disks = sh.disks.borrow();
    for e in history {
        let model::Op::Snapshot { name } = e.op else { continue };
        let s = record.snapshots.iter().find(|s| s.snapshot == format!("s{name}"));
        let ready = s.filter(|s| s.state == Some(SnapshotState::Ready));
        if e.outcome == model::Outcome::Ok && ready.is_none() {
            failures
                .push(format!("check 6: snapshot s{name} was acknowledged, the record has {s:?}"));
        }
        let Some(s) = ready else { continue };
        // One its client got no answer for (or a failure, after a forwarder's retry of
        // it found it made) may have been made any time after it began.
        let until = if e.outcome == model::Outcome::Ok { e.end } else { end };
        let mut first: Option<(u64, &Vec<u64>)> = None;
        for c in &s.copies {
            let Some(blocks) = disks[c.node as usize].component.snapshots.get(&s.id) else {
                failures
                    .push(format!("check 6: s{name} is listed on copy {} which lacks it", c.node));
                continue;
            };
            for (b, v) in blocks.iter().enumerate() {
                if let Some(why) = register.check(b as u64, *v, e.start, until) {
                    failures.push(format!("check 6 (s{name} on copy {}): {why}", c.node));
                    break;
                }
            }
            match first {
                None => first = Some((c.node, blocks)),
                Some((n, other)) if other != blocks => {
                    let b = (0..blocks.len()).find(|b| other[*b] != blocks[*b]).unwrap_or(0);
                    failures.push(format!(
                        "check 6: s{name} ({}) differs between copies {n} and {} (first at \
                         block {b}: write {} and write {})",
                        s.id, c.node, other[b], blocks[b]
                    ))
                }
                Some(_) => {}
            }
        }
    }
    if converged {
        for (n, d) in disks.iter().enumerate() {
            for key in d.component.snapshots.keys() {
                let listed = record.snapshots.iter().any(|s| {
                    s.id == *key
                        && s.state == Some(SnapshotState::Ready)
                        && s.held_by(n as u64, n as u64)
                });
                if !listed {
                    failures.push(format!("check 7: copy {n} keeps snapshot {key} unlisted"));
                }
            }
        }
        for s in record.snapshots.iter().filter(|s| s.state == Some(SnapshotState::Ready)) {
            for n in (0..NODES).filter(|n| record.states[*n] == model::CopyState::Active) {
                if !s.held_by(n as u64, n as u64) {
                    failures.push(format!("check 7: ACTIVE copy {n} lacks {}", s.snapshot));
                }
            }
        }
    }
    failures
}

/// Checks 1-4 (`check.rs`).
fn check(sh: &Shared, end: Duration, converged: bool) -> Vec<String> {
    let mut failures = Vec::new();
    let history = sh.history.borrow();
    let register = check::Register::new(&history, sh);
    for e in history.iter() {
        if let (model::Op::Read { block }, Some(v)) = (&e.op, e.value) {
            if let Some(why) = register.check(*block, v, e.start, e.end) {
                failures.push(format!("check 1 (a read): {why}"));
            }
        }
    }
    if converged {
        let owner = sh.published.borrow().0.expect("converged");
        let disks = sh.disks.borrow();
        let truth = &disks[owner.node].component.live;
        for (b, v) in truth.iter().enumerate() {
            if let Some(why) = register.check(b as u64, *v, end, end) {
                failures.push(format!("check 1 (final): {why}"));
            }
        }
        for (n, d) in disks.iter().enumerate() {
            let differ: Vec<usize> =
                (0..truth.len()).filter(|b| d.component.live[*b] != truth[*b]).collect();
            if !differ.is_empty() {
                failures.push(format!(
                    "check 2: ACTIVE copy n{n} differs from the owner n{} in {} blocks (first {}: \
                     write {} there, {} at the owner)",
                    owner.node,
                    differ.len(),
                    differ[0],
                    d.component.live[differ[0]],
                    truth[differ[0]],
                ));
            }
        }
    }
    failures.extend(check_snapshots(sh, &history, &register, end, converged));
    failures.extend(sh.violations.borrow().iter().map(|v| format!("check 3: {v}")));
    failures.extend(sh.core_violations.borrow().iter().map(|v| format!("check 5: {v}")));
    let stats = sh.resync.borrow();
    let (resync, dirtied) =
        stats.iter().fold((0, 0), |(r, d), x| (r + x.resync_bytes, d + x.dirtied_bytes));
    if resync * 4 > dirtied * 5 {
        failures.push(format!("check 4: resync copied {resync} bytes for {dirtied} dirtied"));
    }
    failures.truncate(8);
    failures
}

#[cfg(test)]
mod tests;
