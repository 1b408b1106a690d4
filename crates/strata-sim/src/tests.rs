//! Runs seeds (`STRATA_SIM_SEEDS`, from `STRATA_SIM_SEED_FROM`; one with
//! `STRATA_SIM_SEED`; the protocol as built, flaw included, with `STRATA_SIM_AS_BUILT=1`),
//! checks a seed replays exactly, shows the flaw found in the protocol as built, and
//! shows that breaking a rule of the protocol makes the checks fail within a few seeds.

use super::*;

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// `STRATA_SIM_MUTATION=NoRevocation` (a [`Mutation`] by name): the seeds test breaks it.
fn mutation() -> Option<Mutation> {
    let name = std::env::var("STRATA_SIM_MUTATION").ok()?;
    let all = [
        Mutation::AckBeforeStale,
        Mutation::NoFence,
        Mutation::NoLease,
        Mutation::NoScan,
        Mutation::NoRevocation,
        Mutation::NoLeaseFence,
        Mutation::NoTakeWait,
    ];
    let m = all.into_iter().find(|m| format!("{m:?}") == name);
    Some(m.unwrap_or_else(|| panic!("no mutation named {name}")))
}

/// `STRATA_SIM_READERS=N`: the seeds and find-flaws tests run `N` reading clients
/// instead of the default's; `STRATA_SIM_CRASH_RESYNCING=1`: with
/// [`Scenario::crash_resyncing`].
fn scenario() -> Scenario {
    let mut s = Scenario::default();
    if let Some(n) = env("STRATA_SIM_READERS") {
        s.readers = n as usize;
    }
    s.crash_resyncing = env("STRATA_SIM_CRASH_RESYNCING") == Some(1);
    s
}

fn protocol() -> Protocol {
    match env("STRATA_SIM_AS_BUILT") {
        Some(1) => Protocol::AsBuilt,
        _ => Protocol::Fixed,
    }
}

/// Runs `seeds` on two threads; returns the reports of the failing ones, in seed order.
fn run_many(
    seeds: std::ops::Range<u64>,
    protocol: Protocol,
    mutation: Option<Mutation>,
    scenario: Scenario,
) -> Vec<Report> {
    let next = std::sync::atomic::AtomicU64::new(seeds.start);
    let reports = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= seeds.end {
                    return;
                }
                let report = run(seed, protocol, mutation, scenario);
                reports.lock().unwrap().push(report);
            });
        }
    });
    let mut reports = reports.into_inner().unwrap();
    reports.sort_by_key(|r| r.seed);
    reports
}

fn failed(reports: Vec<Report>) -> Vec<Report> {
    reports.into_iter().filter(|r| !r.failures.is_empty()).collect()
}

#[test]
fn seeds_hold_the_properties() {
    let n = env("STRATA_SIM_SEEDS").unwrap_or(100);
    let from = env("STRATA_SIM_SEED_FROM").unwrap_or(0);
    let started = std::time::Instant::now();
    let reports = run_many(from..from + n, protocol(), mutation(), scenario());
    println!(
        "{n} seeds from {from} ({:?}, mutation {:?}, {:?}) in {:.1?}",
        protocol(),
        mutation(),
        scenario(),
        started.elapsed()
    );
    let sum = |f: &dyn Fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    let (copied, dirtied, scanned) =
        (sum(&|r| r.resync.0), sum(&|r| r.resync.1), sum(&|r| r.resync.2));
    let away = sum(&|r| r.resync.3);
    println!(
        "{} writes acked in {} operations ({} reads under read leases); resync copied \
         {copied} bytes for {dirtied} bytes of regions its bitmaps marked ({:.2}), {away} \
         bytes of blocks written while copies were STALE ({:.2}); digest scans copied \
         {scanned} more",
        sum(&|r| r.ops.0 as u64),
        sum(&|r| r.ops.1 as u64),
        sum(&|r| r.local_reads),
        copied as f64 / dirtied.max(1) as f64,
        copied as f64 / away.max(1) as f64,
    );
    let failed = failed(reports);
    for r in &failed {
        println!("{r}");
    }
    assert!(failed.is_empty(), "{} of {n} seeds failed (first: {})", failed.len(), failed[0].seed);
}

#[test]
fn one_seed() {
    let seed = env("STRATA_SIM_SEED").unwrap_or(1);
    let report = run(seed, protocol(), None, scenario());
    println!("{report}  trace hash {:016x}", report.trace_hash);
    if report.failures.is_empty() {
        for l in &report.trace {
            println!("  {l}");
        }
    }
    assert!(report.failures.is_empty());
}

#[test]
fn a_seed_replays_exactly() {
    let (a, b) = (run_seed(3, Protocol::Fixed), run_seed(3, Protocol::Fixed));
    assert_eq!(a.trace_hash, b.trace_hash, "{a}\n{b}");
    assert_eq!(a.summary, b.summary);
    assert_ne!(a.trace_hash, run_seed(4, Protocol::Fixed).trace_hash);
}

/// The first seed below `within` whose run fails a check starting with `check`.
fn first_failing(within: u64, protocol: Protocol, m: Option<Mutation>, check: &str) -> Report {
    for seed in 0..within {
        let report = run(seed, protocol, m, Scenario::default());
        if report.failures.iter().any(|f| f.starts_with(check)) {
            return report;
        }
    }
    panic!("{protocol:?} {m:?}: no seed of {within} failed {check}");
}

/// Breaks `m` and expects some seed below `within` to fail `check`.
fn found(m: Mutation, within: u64, check: &str) {
    let report = first_failing(within, Protocol::Fixed, Some(m), check);
    println!("{m:?}: the first seed to fail:\n{report}");
}

#[test]
fn mutation_ack_before_stale_is_found() {
    found(Mutation::AckBeforeStale, 60, "check 1");
}

#[test]
fn mutation_no_fence_is_found() {
    found(Mutation::NoFence, 60, "check 3");
}

#[test]
fn mutation_no_scan_is_found() {
    found(Mutation::NoScan, 60, "check 2");
}

#[test]
fn mutation_no_lease_is_found() {
    found(Mutation::NoLease, 60, "check 1");
}

#[test]
fn mutation_no_revocation_is_found() {
    found(Mutation::NoRevocation, 100, "check 1");
}

/// Not found in 3000 seeds: in the model a copy fenced by a newer owner misses that
/// owner's writes only after a write to it timed out (`IO_TIMEOUT`, five read leases),
/// and a copy the newer owner could not fence fails the fence check anyway, so the check
/// is never what stops a stale read here (the real code also fails a copy on an error
/// that comes at once, which the model does not produce). Kept to be run by hand.
#[test]
#[ignore]
fn mutation_no_lease_fence_is_found() {
    found(Mutation::NoLeaseFence, 400, "check 1");
}

/// Not found in 1000 seeds: the model's stewards take a volume only once its owner key
/// is gone (or names their own node), so a take never replaces a live owner that could
/// still grant; the rule holds back acknowledgments after such takes here, but no
/// stale read follows without it. Kept to be run by hand.
#[test]
#[ignore]
fn mutation_no_take_wait_is_found() {
    found(Mutation::NoTakeWait, 400, "check 1");
}

/// Each fix, off alone (every other on).
fn without(name: &str) -> Fixes {
    let mut f = Fixes::ALL;
    match name {
        "power_loss" => f.power_loss = false,
        "take_checks_copy" => f.take_checks_copy = false,
        "bitmap_keeps_scan" => f.bitmap_keeps_scan = false,
        "flush_clears_older" => f.flush_clears_older = false,
        "same_session" => f.same_session = false,
        "in_flight_to_bitmap" => f.in_flight_to_bitmap = false,
        "level_keeps_equal" => f.level_keeps_equal = false,
        "fence_own_copy" => f.fence_own_copy = false,
        _ => unreachable!("no fix named {name}"),
    }
    f
}

const FIXES: [&str; 8] = [
    "power_loss",
    "take_checks_copy",
    "bitmap_keeps_scan",
    "flush_clears_older",
    "same_session",
    "in_flight_to_bitmap",
    "level_keeps_equal",
    "fence_own_copy",
];

/// `STRATA_SIM_FIND_FLAWS=N`: for each fix (or the one `STRATA_SIM_FIX` names), the
/// seeds from `STRATA_SIM_SEED_FROM` (0 if unset) to below N that fail without it (and
/// every other fix on), which of them pass with every fix (a flaw test's seed must), and
/// the first such one's report.
#[test]
fn find_flaws() {
    let Some(n) = env("STRATA_SIM_FIND_FLAWS") else { return };
    let from = env("STRATA_SIM_SEED_FROM").unwrap_or(0);
    let only = std::env::var("STRATA_SIM_FIX").ok();
    for name in FIXES.into_iter().filter(|f| only.as_deref().is_none_or(|o| o == *f)) {
        let failed = failed(run_many(from..n, Protocol::With(without(name)), None, scenario()));
        let seeds: Vec<u64> = failed.iter().map(|r| r.seed).collect();
        let (flaws, also): (Vec<Report>, Vec<Report>) = failed
            .into_iter()
            .partition(|r| run(r.seed, Protocol::Fixed, None, scenario()).failures.is_empty());
        let also: Vec<u64> = also.iter().map(|r| r.seed).collect();
        println!(
            "without {name}: {} of seeds {from}..{n} fail ({seeds:?}); with every fix, \
             these fail too: {also:?}",
            seeds.len()
        );
        if let Some(r) = flaws.first() {
            println!("the first that passes with every fix:\n{r}");
        }
    }
}

/// Seed `seed` fails `check` without fix `name` (every other fix on) and passes with
/// every fix. The seeds come from `STRATA_SIM_FIND_FLAWS=N` (rerun it when the
/// simulation changes: a run is exactly reproducible, but any change moves every seed's
/// course).
fn flaw(name: &str, seed: u64, check: &str) {
    flaw_in(name, seed, check, Scenario::default());
}

/// `flaw` in `scenario`.
fn flaw_in(name: &str, seed: u64, check: &str, scenario: Scenario) {
    let without = run(seed, Protocol::With(without(name)), None, scenario);
    assert!(
        without.failures.iter().any(|f| f.starts_with(check)),
        "without {name}, seed {seed} was expected to fail {check}:\n{without}"
    );
    let with = run(seed, Protocol::Fixed, None, scenario);
    assert!(with.failures.is_empty(), "with every fix, seed {seed} fails:\n{with}");
    println!("without {name}:\n{without}");
}

#[test]
fn flaw_1_a_copy_that_lost_power_stays_active_or_becomes_the_truth() {
    flaw("power_loss", 10, "check 1");
}

#[test]
fn flaw_2_taking_ownership_without_an_active_copy_leaves_no_owner_serving() {
    flaw("take_checks_copy", 36, "did not converge");
}

#[test]
fn flaw_3_a_kept_bitmap_forgets_the_scan_its_owner_owed() {
    flaw("bitmap_keeps_scan", 54, "check 2");
}

#[test]
fn flaw_5_an_old_view_serves_again_under_a_new_session() {
    flaw("same_session", 59, "check 1");
}

/// Seed 4898 (3 of the first 8000 seeds fail without the fix): copy 2, cut off from
/// the owner n0, fails a write and is STALE while a write to block 178 is still in flight
/// to it; n0's process crashes before that write times out, so its region never joins
/// the bitmap file; n0 takes the volume again at the next epoch in the same boot, trusts
/// the file, and copy 2 never gets the write n0 holds.
#[test]
fn flaw_6_a_bitmap_misses_writes_in_flight_when_the_owner_dies() {
    flaw("in_flight_to_bitmap", 4898, "check 2");
}

/// Run with [`Scenario::crash_resyncing`]: the flaw needs a copy's machine to crash in
/// the few milliseconds between a resync finding a region equal and the resync's final
/// flush, which the usual faults hit about once in 10000 seeds (and in none of the first
/// 25000 since the read leases moved every seed's course); crashing copies mid-resync
/// makes it 5 of the first 6000. Seed 3158: copy 2 holds write 32 to block 68 only in
/// its page cache when its resync finds region 4 equal and drops it from the bitmap; its
/// machine crashes 20 ms into the resync and loses the write, the resync's flush fails,
/// and once it is back nothing names region 4.
#[test]
fn flaw_7_a_region_levelled_as_equal_is_tracked_nowhere() {
    let scenario = Scenario { crash_resyncing: true, ..Scenario::default() };
    flaw_in("level_keeps_equal", 3158, "check 2", scenario);
}

/// Run with no reading clients (`Scenario::readers` 0); seed 3124 is the only one of
/// the first 8000 to fail without the fix there. n0's epoch-2 view is deposed at
/// 4182 ms while client writes to region 1 queue for its turn (each behind one that
/// waits out a copy cut off from n0); n0 takes the volume again at epoch 4 and fences
/// the other copies, not its own (still at epoch 2); its resync levels them by 6392 ms,
/// and at 6520 ms the old view's write 34 to block 16 lands on n0's copy alone. Either
/// part of the fix alone makes the seed pass.
#[test]
fn flaw_8_a_deposed_views_write_lands_on_the_next_owners_own_copy() {
    let scenario = Scenario { readers: 0, ..Scenario::default() };
    flaw_in("fence_own_copy", 3124, "check 2", scenario);
}
