//! Runs seeds (`STRATA_SIM_SEEDS`, from `STRATA_SIM_SEED_FROM`; one with
//! `STRATA_SIM_SEED`; with a flaw re-opened in the core, `STRATA_SIM_FLAW=N`), checks a
//! seed replays exactly, shows each flaw the simulation found is found again when its
//! knob re-opens it, and shows that breaking a rule of the protocol (a [`Mutation`])
//! makes the checks fail (most within a few seeds).

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
        Mutation::CatchUpFromLive,
        Mutation::ResyncWhileCreating,
    ];
    let m = all.into_iter().find(|m| format!("{m:?}") == name);
    Some(m.unwrap_or_else(|| panic!("no mutation named {name}")))
}

/// `STRATA_SIM_FLAW=N` (1–12, or a [`Flaw`] by name): the flaw re-opened.
fn flaw_named() -> Option<Flaw> {
    let name = std::env::var("STRATA_SIM_FLAW").ok()?;
    let f =
        Flaw::ALL.into_iter().find(|f| format!("{f:?}") == name || f.number().to_string() == name);
    Some(f.unwrap_or_else(|| panic!("no flaw named {name}")))
}

/// `STRATA_SIM_READERS=N`: the seeds and find-flaws tests run `N` reading clients
/// instead of the default's; `STRATA_SIM_CRASH_RESYNCING=1`: with
/// [`Scenario::crash_resyncing`]; `STRATA_SIM_CRASH_OWNER_AFTER_RESYNC=1`: with
/// [`Scenario::crash_owner_after_resync`].
fn scenario() -> Scenario {
    let mut s = Scenario::default();
    if let Some(n) = env("STRATA_SIM_READERS") {
        s.readers = n as usize;
    }
    s.crash_resyncing = env("STRATA_SIM_CRASH_RESYNCING") == Some(1);
    s.crash_owner_after_resync = env("STRATA_SIM_CRASH_OWNER_AFTER_RESYNC") == Some(1);
    s.snapshots = env("STRATA_SIM_SNAPSHOTS") == Some(1);
    s
}

/// Runs `seeds` on two threads; returns the reports, in seed order.
fn run_many(
    seeds: std::ops::Range<u64>,
    flaw: Option<Flaw>,
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
                let report = run(seed, flaw, mutation, scenario);
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
    let reports = run_many(from..from + n, flaw_named(), mutation(), scenario());
    println!(
        "{n} seeds from {from} (flaw {:?}, mutation {:?}, {:?}) in {:.1?}",
        flaw_named(),
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

/// Seeds with an operator taking snapshots all along (`Scenario::snapshots`; checks 6
/// and 7): `STRATA_SIM_SNAPSHOT_SEEDS` of them (default 20).
#[test]
fn snapshot_seeds_hold_the_properties() {
    let n = env("STRATA_SIM_SNAPSHOT_SEEDS").unwrap_or(20);
    let from = env("STRATA_SIM_SEED_FROM").unwrap_or(0);
    let scenario = Scenario { snapshots: true, ..scenario() };
    let reports = run_many(from..from + n, flaw_named(), mutation(), scenario);
    let made: usize = reports.iter().map(|r| r.snapshots).sum();
    println!("{n} seeds from {from} with snapshots: {made} snapshots made");
    assert!(made > 0, "no snapshot was made");
    let failed = failed(reports);
    for r in &failed {
        println!("{r}");
    }
    assert!(failed.is_empty(), "{} of {n} seeds failed (first: {})", failed.len(), failed[0].seed);
}

#[test]
fn one_seed() {
    let seed = env("STRATA_SIM_SEED").unwrap_or(1);
    let report = run(seed, flaw_named(), mutation(), scenario());
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
    let (a, b) = (run_seed(3), run_seed(3));
    assert_eq!(a.trace_hash, b.trace_hash, "{a}\n{b}");
    assert_eq!(a.summary, b.summary);
    assert_ne!(a.trace_hash, run_seed(4).trace_hash);
}

/// The simulation's timing is the server's divided by 10: these are the values the
/// hand-written port declared before it ran the core, each equal to its scaled field.
#[test]
fn the_timing_is_the_servers_scaled_by_ten() {
    let t = model::timing();
    let ms = Duration::from_millis;
    let was = [
        (t.session_timeout, ms(1000)),
        (t.owner_lease, ms(600)),
        (t.io_timeout, ms(1000)),
        (t.probe_timeout, ms(200)),
        (t.forward_timeout, ms(3000)),
        (t.forward_patience, ms(6000)),
        (t.steward_every, ms(100)),
        (t.takeover_step, ms(300)),
        (t.ownerless_grace, ms(500)),
        (t.resync_every, ms(200)),
        (t.read_lease, ms(200)),
    ];
    for (i, (now, before)) in was.into_iter().enumerate() {
        assert_eq!(now, before, "value {i}");
    }
    t.check().unwrap();
}

/// The first seed below `within` whose run fails a check starting with `check`.
fn first_failing(within: u64, m: Mutation, check: &str) -> Report {
    for seed in 0..within {
        let report = run(seed, None, Some(m), Scenario::default());
        if report.failures.iter().any(|f| f.starts_with(check)) {
            return report;
        }
    }
    panic!("{m:?}: no seed of {within} failed {check}");
}

/// Breaks `m` and expects some seed below `within` to fail `check` (for the mutations
/// not found: run by hand).
fn found(m: Mutation, within: u64, check: &str) {
    let report = first_failing(within, m, check);
    println!("{m:?}: the first seed to fail:\n{report}");
}

/// Breaks `m` and expects seed `seed` to fail `check`: the first of seeds 0.. to fail it
/// (`STRATA_SIM_MUTATION=M STRATA_SIM_SEEDS=200 cargo test -p strata-sim --release
/// seeds_hold`; find it again when the simulation or the core changes). Every one of
/// these seeds passes with nothing broken (the seeds test).
fn found_at(m: Mutation, seed: u64, check: &str) {
    found_at_in(m, seed, check, Scenario::default());
}

/// [`found_at`] in `scenario`.
fn found_at_in(m: Mutation, seed: u64, check: &str, scenario: Scenario) {
    let report = run(seed, None, Some(m), scenario);
    assert!(
        report.failures.iter().any(|f| f.starts_with(check)),
        "with {m:?}, seed {seed} was expected to fail {check}:\n{report}"
    );
    println!("{m:?}:\n{report}");
}

/// With snapshots; seed 0 (the first): a pending copy caught up from the owner's live
/// volume holds later writes in its snapshot, unlike the copies that took it at the
/// barrier.
#[test]
fn mutation_catch_up_from_live_is_found() {
    let scenario = Scenario { snapshots: true, ..Scenario::default() };
    found_at_in(Mutation::CatchUpFromLive, 0, "check 6", scenario);
}

/// With snapshots; seed 11 (4 of the first 40 fail): a STALE copy turned RESYNCING while
/// a barrier that skipped it was under way, and was ACTIVE without that snapshot (the
/// rule as first built; the simulation's first seeds with snapshots found it).
#[test]
fn mutation_resync_while_creating_is_found() {
    let scenario = Scenario { snapshots: true, ..Scenario::default() };
    found_at_in(Mutation::ResyncWhileCreating, 11, "check 7", scenario);
}

/// Seed 22 (7 of the first 100 fail).
#[test]
fn mutation_ack_before_stale_is_found() {
    found_at(Mutation::AckBeforeStale, 22, "check 1");
}

/// Seed 9 (12 of the first 100 fail).
#[test]
fn mutation_no_fence_is_found() {
    found_at(Mutation::NoFence, 9, "check 3");
}

/// Seed 1 (17 of the first 100 fail).
#[test]
fn mutation_no_scan_is_found() {
    found_at(Mutation::NoScan, 1, "check 2");
}

/// Seed 164, the only one of the first 200 to fail (the hand-written port failed within
/// 60): an owner cut off from the metadata service serves on, but in the traces looked
/// at it is deposed soon after its first write that fails a copy (it cannot record the
/// STALE mark), which leaves little time for a new owner to acknowledge a write it then
/// reads stale.
#[test]
fn mutation_no_lease_is_found() {
    found_at(Mutation::NoLease, 164, "check 1");
}

/// Seed 69, the first of seeds 0.. to fail.
#[test]
fn mutation_no_revocation_is_found() {
    found_at(Mutation::NoRevocation, 69, "check 1");
}

/// Not found in 3000 seeds of the port: in the model a copy fenced by a newer owner
/// misses that owner's writes only after a write to it timed out (`io_timeout`, five
/// read leases), and a copy the newer owner could not fence fails the fence check anyway,
/// so the check is never what stops a stale read here (the real code also fails a copy on
/// an error that comes at once, which the model does not produce). Kept to be run by hand.
#[test]
#[ignore]
fn mutation_no_lease_fence_is_found() {
    found(Mutation::NoLeaseFence, 400, "check 1");
}

/// Not found in 1000 seeds of the port: a take replaces a live owner only after that
/// owner restarted (its old owner key died when it registered again), and no stale read
/// followed without the wait. Kept to be run by hand.
#[test]
#[ignore]
fn mutation_no_take_wait_is_found() {
    found(Mutation::NoTakeWait, 400, "check 1");
}

/// `STRATA_SIM_FIND_FLAWS=N`: for each flaw (or the one `STRATA_SIM_FLAW` names), the
/// seeds from `STRATA_SIM_SEED_FROM` (0 if unset) to below N that fail with it re-opened,
/// which of them pass without (a flaw test's seed must), and the first such one's report.
#[test]
fn find_flaws() {
    let Some(n) = env("STRATA_SIM_FIND_FLAWS") else { return };
    let from = env("STRATA_SIM_SEED_FROM").unwrap_or(0);
    let only = flaw_named();
    for flaw in Flaw::ALL.into_iter().filter(|f| only.is_none_or(|o| o == *f)) {
        let failed = failed(run_many(from..n, Some(flaw), None, scenario()));
        let seeds: Vec<u64> = failed.iter().map(|r| r.seed).collect();
        let (flaws, also): (Vec<Report>, Vec<Report>) = failed
            .into_iter()
            .partition(|r| run(r.seed, None, None, scenario()).failures.is_empty());
        let also: Vec<u64> = also.iter().map(|r| r.seed).collect();
        println!(
            "flaw {} ({flaw:?}) re-opened: {} of seeds {from}..{n} fail ({seeds:?}); without \
             it, these fail too: {also:?}",
            flaw.number(),
            seeds.len()
        );
        if let Some(r) = flaws.first() {
            println!("the first that passes without it:\n{r}");
        }
    }
}

/// Seed `seed` fails `check` with `flaw` re-opened in the core and passes without it.
/// The seeds come from `STRATA_SIM_FIND_FLAWS=N` (find them again when the simulation
/// or the core changes: a run is exactly reproducible, but any change moves every
/// seed's course).
fn flaw(flaw: Flaw, seed: u64, check: &str) {
    flaw_in(flaw, seed, check, Scenario::default());
}

/// [`flaw`] in `scenario`.
fn flaw_in(flaw: Flaw, seed: u64, check: &str, scenario: Scenario) {
    let with = run(seed, Some(flaw), None, scenario);
    assert!(
        with.failures.iter().any(|f| f.starts_with(check)),
        "with {flaw:?} re-opened, seed {seed} was expected to fail {check}:\n{with}"
    );
    let without = run(seed, None, None, scenario);
    assert!(without.failures.is_empty(), "as built, seed {seed} fails:\n{without}");
    println!("with {flaw:?} re-opened:\n{with}");
}

// The flaws' regression seeds (`STRATA_SIM_FIND_FLAWS`, in each test's scenario): each
// fails its check with the flaw re-opened in the core (or the driver) and passes as built.

/// Seed 26 (45 of the first 600 fail with the flaw): a copy whose machine crashed comes
/// back without writes it had acknowledged and is not failed; reads then miss them.
#[test]
fn flaw_1_power_loss_is_found_again() {
    flaw(Flaw::PowerLoss, 26, "check 1");
}

/// Seed 159 (3 of the first 400): a node takes the volume on its lagging view although
/// the fresh record shows its copy STALE; its view cannot open, and the owner key names
/// a node that never serves, so the cluster does not converge.
#[test]
fn flaw_2_take_checks_copy_is_found_again() {
    flaw(Flaw::TakeChecksCopy, 159, "did not converge");
}

/// Seed 23 (16 of the first 400): a bitmap kept for a copy that owed a digest scan is
/// trusted alone by the next owner, and the copy keeps differing where the scan would
/// have looked.
#[test]
fn flaw_3_bitmap_keeps_scan_is_found_again() {
    flaw(Flaw::BitmapKeepsScan, 23, "check 2");
}

/// Seed 7190 (none of the first 6000 fail, 5 of the next 8000): a flush's reply clears
/// a copy's unflushed regions of a write that completed after the flush was sent, which
/// the copy may have taken after it synced; its machine crash then loses that write
/// where no bitmap names it.
#[test]
fn flaw_4_flush_clears_older_is_found_again() {
    flaw(Flaw::FlushClearsOlder, 7190, "check 2");
}

/// Seed 143 (3 of the first 400): an owner view whose session ended serves again once
/// its node registers a new session, and its reads miss a write the new owner
/// acknowledged.
#[test]
fn flaw_5_same_session_is_found_again() {
    flaw(Flaw::SameSession, 143, "check 1");
}

/// Seed 4184 (1 of seeds 400 to 5000): a copy fails while a write is still in flight
/// to it, and the owner dies before that write fails in turn; the next owner trusts the
/// bitmap file, which lacks the write's region.
#[test]
fn flaw_6_in_flight_to_bitmap_is_found_again() {
    flaw(Flaw::InFlightToBitmap, 4184, "check 2");
}

/// Seed 274 (2 of the first 600, with the usual faults): a region a resync found equal
/// only in the copy's page cache leaves its bitmap and counts as flushed; the copy's
/// machine crash then loses it where nothing names it.
#[test]
fn flaw_7_level_keeps_equal_is_found_again() {
    flaw(Flaw::LevelKeepsEqual, 274, "check 2");
}

/// With no reading clients (`Scenario::readers` 0); seed 2355 (1 of the first 5000
/// there; none of the first 400 with the usual readers): a write of an older view
/// of a node, deposed while it waited for its region's turn, lands on that node's own
/// copy after it took the volume again and levelled the other copies with it.
#[test]
fn flaw_8_fence_own_copy_is_found_again() {
    let scenario = Scenario { readers: 0, ..Scenario::default() };
    flaw_in(Flaw::FenceOwnCopy, 2355, "check 2", scenario);
}

/// With [`Scenario::crash_owner_after_resync`]; seed 2 (5 of the first 1500 there;
/// none of 5000 with `crash_resyncing` nor of the first 400 with the usual faults): a
/// copy that lost power is resynced but stays suspect until the owner's next look, the
/// owner's machine crashes meanwhile, and with both copies suspect writes the owner
/// acknowledged are lost.
#[test]
fn flaw_9_vouch_after_resync_is_found_again() {
    let scenario = Scenario { crash_owner_after_resync: true, ..Scenario::default() };
    flaw_in(Flaw::VouchAfterResync, 2, "check 1", scenario);
}

/// With [`Scenario::crash_resyncing`]; seed 698 (4 of the first 1500 there): a copy
/// fails mid-resync and the resync goes on levelling it while it is STALE; its bitmap is
/// emptied, and after its machine crash it differs for ever.
#[test]
fn flaw_10_level_while_stale_is_found_again() {
    let scenario = Scenario { crash_resyncing: true, ..Scenario::default() };
    flaw_in(Flaw::LevelWhileStale, 698, "check 2", scenario);
}

/// With [`Scenario::crash_resyncing`]; seed 19 (3 of the first 1000 there): a copy that
/// answers the new owner's fence with its power-loss mark on stays ACTIVE, acknowledged
/// writes count it as a holder, and they are lost when the owner loses power too.
#[test]
fn flaw_11_suspect_stays_active_is_found_again() {
    let scenario = Scenario { crash_resyncing: true, ..Scenario::default() };
    flaw_in(Flaw::SuspectStaysActive, 19, "check 1", scenario);
}

/// Seed 8413 (found as built, by the 10,000-seed run after the simulation took the
/// core's resync steps and lease rules): writes acknowledged at epoch 2 are held by two
/// copies whose machines both crash before any flush; a FLUSH begun meanwhile is
/// retried by its forwarder until the node back from its power loss takes the volume
/// with its suspect copy as the truth (epoch 4), and that owner acknowledged it, as if
/// the lost writes were durable.
#[test]
fn flaw_12_flush_across_loss_is_found_again() {
    flaw(Flaw::FlushAcrossLoss, 8413, "check 1");
}
