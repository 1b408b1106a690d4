//! Resync scheduling with many volumes at once (issue 16, item 6): with `resync_jobs = 1`
//! the owner runs one resync job at a time, the node holding the stale copies lets one in
//! at a time (a `ResyncSlot`; refused, a job waits its turn again, its copy not failed),
//! and of the jobs waiting together the least redundant volume's goes first.

use super::*;

/// The test's own job number at node 3 (as if from a node 99).
const HOLDER: (u64, u64) = (99, 1);

/// Asks `m` for a resync slot (`take`) or gives it back, as job `HOLDER`.
fn slot(m: &Member, key: &DataKey, take: bool) -> Result<(), CallError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let peer = DataPeer::new(key.clone(), m.rpc.clone());
        let mut h = request(Kind::ResyncSlot, 0, 0, HOLDER.0, HOLDER.1);
        h.count = u32::from(take);
        peer.call(h, &[]).await.map(drop)
    })
}

/// `name`'s value in `m`'s metrics (`None` if it cannot be read).
fn metric(m: &Member, name: &str) -> Option<u64> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5", &format!("{}/metrics", m.node().api())])
        .output()
        .ok()?;
    let want = format!("{name} ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&want).and_then(|v| v.trim().parse().ok()))
}

/// Copy states of `name` as node 1 (its owner) sees them.
fn states(m: &Member, name: &str) -> Vec<String> {
    m.get(&format!("/v1/volumes/{name}")).map_or(Vec::new(), |v| {
        let copies = v["components"].as_array().cloned().unwrap_or_default();
        copies.iter().map(|c| c["state"].as_str().unwrap_or("").to_owned()).collect()
    })
}

#[test]
fn many_volumes_resync_one_at_a_time_the_least_redundant_first() {
    let tmp = tempfile::tempdir().unwrap();
    let mut members = three_members_with(tmp.path(), "resync_jobs = 1\n");
    let key = DataKey::from_secret(&std::fs::read(members[0].dir.join("secret")).unwrap());
    // Three volumes of three copies, and `b` of two (nodes 3 and 1): all owned by node 1.
    let wide = ["a1", "a2", "a3"];
    for name in wide {
        create_replicated(&members[0], name, "32M");
    }
    let args = ["volume", "create", "b", "--size", "32M", "--replicas", "2", "--min-replicas", "1"];
    let (ok, text) = cli(&members[2], &args);
    assert!(ok, "{text}");
    let (ok, text) = cli(&members[0], &["volume", "attach", "b", "--node", "1"]);
    assert!(ok, "{text}");
    wait_until(30, "node 1 to own b", || owner_of(&members, "b").0 == 0);

    // Node 3 away while every volume is written: each has a stale copy there.
    members[2].node.take().unwrap().kill9();
    for name in ["b"].iter().chain(&wide) {
        crate::harness::qemu_io(&members[0].node().uri(name), &["write -P 0x5a 0 8M", "flush"]);
        wait_until(10, "the copy on node 3 stale", || {
            states(&members[0], name).iter().any(|s| s == "stale")
        });
    }

    // Back; the test holds node 3's only slot while node 1's jobs queue up, refused.
    // (Should a job of node 1's take it first, the test waits for it to end, and the
    // others queue up behind the test.)
    members[2].start();
    let all: Vec<&str> = wide.iter().chain(&["b"]).copied().collect();
    wait_until(60, "the test to hold node 3's resync slot", || {
        slot(&members[2], &key, true).is_ok()
    });
    let mut pending = Vec::new();
    wait_until(30, "the jobs left waiting on node 1, their copies resyncing", || {
        pending = all
            .iter()
            .copied()
            .filter(|n| !states(&members[0], n).iter().all(|s| s == "active"))
            .collect();
        let resyncing =
            pending.iter().all(|n| states(&members[0], n).contains(&"resyncing".into()));
        resyncing && metric(&members[0], "strata_resync_jobs_waiting") == Some(pending.len() as u64)
    });
    assert!(pending.len() >= 3, "at most one job went before the test: {pending:?}");
    assert_eq!(metric(&members[2], "strata_resync_slots_held"), Some(1), "the test's");
    let log = |m: &Member| -> Vec<String> {
        m.node().log_tail(usize::MAX).lines().map(str::to_owned).collect()
    };
    let mark = log(&members[0]).len();
    slot(&members[2], &key, false).unwrap();

    // One job at a time at either end until every copy is active.
    let (mut most_running, mut most_held) = (0, 0);
    wait_until(120, "every copy active", || {
        let running = metric(&members[0], "strata_resync_jobs_running").unwrap_or(0);
        most_running = most_running.max(running);
        most_held = most_held.max(metric(&members[2], "strata_resync_slots_held").unwrap_or(0));
        all.iter().all(|n| states(&members[0], n).iter().all(|s| s == "active"))
    });
    assert!(most_running <= 1 && most_held <= 1, "{most_running} ran, {most_held} let in");
    // In node 1's log: a job starts, its copy is active, and only then the next starts;
    // the least redundant volume first, if it was waiting.
    let events: Vec<(bool, String)> = log(&members[0])[mark..]
        .iter()
        .filter_map(|l| {
            let name = l.split("volume=").nth(1)?.split(' ').next()?.to_owned();
            if l.contains("a job starts copying") {
                Some((true, name))
            } else if l.contains("state=\"active\"") || l.contains("state=active") {
                Some((false, name))
            } else {
                None
            }
        })
        .collect();
    let expected: Vec<(bool, String)> = events
        .chunks(2)
        .flat_map(|pair| [(true, pair[0].1.clone()), (false, pair[0].1.clone())])
        .collect();
    assert_eq!(events, expected, "one job after the other");
    let order: Vec<&str> = events.iter().filter(|e| e.0).map(|e| e.1.as_str()).collect();
    let mut sorted = order.clone();
    sorted.sort();
    let mut want = pending.clone();
    want.sort();
    assert_eq!(sorted, want, "each waiting volume once: {order:?}");
    if pending.contains(&"b") {
        // Refused, a job keeps its place at the front: without the levels, the first
        // job refused would go first (b itself about one run in four).
        let first_refused = log(&members[0])
            .iter()
            .find(|l| l.contains("has no slot free"))
            .and_then(|l| l.split("volume=").nth(1)?.split(' ').next().map(str::to_owned));
        eprintln!("first refused: {first_refused:?}; after the release: {order:?}");
        assert_eq!(order[0], "b", "one ACTIVE copy left goes first: {order:?}");
    }
    // No copy failed for want of a slot, and the copies are level.
    assert!(!log(&members[0]).iter().any(|l| l.contains("failed during its resync")));
    for name in all {
        wait_copies_equal(&members, &key, name, 8);
    }
}
