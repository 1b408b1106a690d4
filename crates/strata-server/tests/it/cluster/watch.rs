//! `strata volume info NAME --watch` against three real `strata serve` processes: with
//! every copy active it says there is nothing to resync and exits; with a copy made
//! stale (its node killed while 64 MiB are written) it follows the resync when the node
//! is back, through the owner's API and through another node's (which asks the owner
//! for the figures), with plain progress lines on stderr (not a terminal here), and
//! exits 0 once every copy is active; when the node it asks goes away for good, it
//! fails with a clear message after 30 s.

use super::{cli, three_members, wait_until, Member, STRATA};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Starts `strata --api (member's) volume info NAME --watch`, stdout and stderr piped.
fn watch(member: &Member, name: &str) -> Child {
    Command::new(STRATA)
        .arg("--api")
        .arg(member.node().api())
        .args(["volume", "info", name, "--watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (up to `secs`) for a watcher to exit: (success, stdout, stderr).
fn finish(members: &[Member], child: Child, secs: u64) -> (bool, String, String) {
    let pid = child.id();
    let waited = std::thread::spawn(move || child.wait_with_output().unwrap());
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !waited.is_finished() {
        if Instant::now() > deadline {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            let out = waited.join().unwrap();
            for m in members.iter().filter(|m| m.node.is_some()) {
                eprintln!("---- node {} ----\n{}", m.id, m.node().log_tail(40));
            }
            panic!("the watcher did not exit: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = waited.join().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

fn state_of(member: &Member, name: &str, node: usize) -> String {
    member.get(&format!("/v1/volumes/{name}")).map_or(String::new(), |v| {
        v["components"][node]["state"].as_str().unwrap_or_default().to_owned()
    })
}

#[test]
fn volume_info_watch_follows_a_resync_until_every_copy_is_active() {
    let tmp = tempfile::tempdir().unwrap();
    let mut members = three_members(tmp.path());
    let (ok, text) =
        cli(&members[0], &["volume", "create", "w1", "--size", "128M", "--replicas", "3"]);
    assert!(ok, "{text}");

    // Nothing to resync: it says so and exits.
    let (ok, stdout, stderr) = finish(&members, watch(&members[0], "w1"), 20);
    assert!(ok && stdout.contains("replicas:     3"), "{stdout}{stderr}");
    assert!(stderr.contains("every copy of w1 is active: nothing to resync"), "{stderr}");
    // A volume of one copy has nothing to resync either.
    let (ok, text) = cli(&members[0], &["volume", "create", "one", "--size", "16M"]);
    assert!(ok, "{text}");
    let (ok, _, stderr) = finish(&members, watch(&members[0], "one"), 20);
    assert!(ok && stderr.contains("one has one copy: nothing to resync"), "{stderr}");

    // Node 3 away while 64 MiB are written: its copy is stale and misses them.
    members[2].node.take().unwrap().kill9();
    let uri = members[0].node().uri("w1");
    crate::harness::qemu_io(&uri, &["write -P 0x5a 0 32M", "write -P 0x5b 32M 32M", "flush"]);
    wait_until(20, "node 3's copy stale", || state_of(&members[0], "w1", 2) == "stale");
    // Watched through the owner (node 1) and through node 2, which does not own it.
    let through_owner = watch(&members[0], "w1");
    let through_other = watch(&members[1], "w1");
    std::thread::sleep(Duration::from_secs(2));
    members[2].start();
    for (which, child) in [("owner", through_owner), ("other", through_other)] {
        let (ok, stdout, stderr) = finish(&members, child, 90);
        assert!(ok, "through the {which}: {stdout}{stderr}");
        assert!(stdout.contains("name:         w1"), "the info first: {stdout}");
        // The owner knows what the copy missed; another node knows its state.
        let stale = if which == "owner" { "stale, 64M to copy:" } else { "stale:" };
        assert!(
            stderr.contains(&format!("w1: node 3's copy is {stale} it resyncs when node 3")),
            "through the {which}: {stderr}"
        );
        assert!(stderr.contains("w1: node 3's copy is active"), "{stderr}");
        assert!(stderr.contains("resyncing w1 ["), "through the {which}: {stderr}");
        assert!(stderr.contains("100%  64M of 64M"), "through the {which}: {stderr}");
        assert!(stderr.contains("every copy of w1 is active (copied 64M"), "{stderr}");
        assert!(!stderr.contains('\r'), "plain lines when stderr is no terminal: {stderr}");
        if which == "other" {
            assert!(stderr.contains("w1: figures from its owner, node 1"), "{stderr}");
        }
    }

    // The node it asks goes away for good: after 30 s it gives up, non-zero.
    members[2].node.take().unwrap().kill9();
    crate::harness::qemu_io(&uri, &["write -P 0x5c 0 1M", "flush"]);
    wait_until(20, "node 3's copy stale again", || state_of(&members[0], "w1", 2) == "stale");
    let watcher = watch(&members[1], "w1");
    std::thread::sleep(Duration::from_secs(2));
    members[1].node.take().unwrap().kill9();
    let (ok, _, stderr) = finish(&members, watcher, 60);
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("retrying for 30s"), "{stderr}");
    assert!(
        stderr.contains("strata: while watching w1: gave up after 30s without an answer"),
        "{stderr}"
    );
}
