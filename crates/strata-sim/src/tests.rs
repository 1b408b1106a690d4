//! Runs seeds (`STRATA_SIM_SEEDS`, from `STRATA_SIM_SEED_FROM`; one with
//! `STRATA_SIM_SEED`; the protocol as built, flaw included, with `STRATA_SIM_AS_BUILT=1`),
//! checks a seed replays exactly, shows the flaw found in the protocol as built, and
//! shows that breaking a rule of the protocol makes the checks fail within a few seeds.

use super::*;

fn env(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
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
) -> Vec<Report> {
    let next = std::sync::atomic::AtomicU64::new(seeds.start);
    let failed = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= seeds.end {
                    return;
                }
                let report = run(seed, protocol, mutation);
                if !report.failures.is_empty() {
                    failed.lock().unwrap().push(report);
                }
            });
        }
    });
    let mut failed = failed.into_inner().unwrap();
    failed.sort_by_key(|r| r.seed);
    failed
}

#[test]
fn seeds_hold_the_properties() {
    let n = env("STRATA_SIM_SEEDS").unwrap_or(100);
    let from = env("STRATA_SIM_SEED_FROM").unwrap_or(0);
    let started = std::time::Instant::now();
    let failed = run_many(from..from + n, protocol(), None);
    println!("{n} seeds from {from} ({:?}) in {:.1?}", protocol(), started.elapsed());
    for r in &failed {
        println!("{r}");
    }
    assert!(failed.is_empty(), "{} of {n} seeds failed (first: {})", failed.len(), failed[0].seed);
}

#[test]
fn one_seed() {
    let seed = env("STRATA_SIM_SEED").unwrap_or(1);
    let report = run_seed(seed, protocol());
    println!("{report}");
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
        let report = run(seed, protocol, m);
        if report.failures.iter().any(|f| f.starts_with(check)) {
            return report;
        }
    }
    panic!("{protocol:?} {m:?}: no seed of {within} failed {check}");
}

#[test]
fn as_built_loses_acknowledged_writes() {
    let report = first_failing(40, Protocol::AsBuilt, None, "check 1");
    println!("as built, the first seed to lose an acknowledged write:\n{report}");
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
