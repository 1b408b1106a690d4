//! `strata snapshot delete --wait`: the delete is instant, and the command then follows
//! the space only that snapshot held until the log can reuse it (GET /v1/node's
//! `reclaim`), with progress lines on stderr (not a terminal here). A small snapshot's
//! space is not reclaimed (the cleaner waits for 256 MiB of dead space): the wait stops
//! when nothing moves and says so. A large one's is: the cleaner frees its segments.

use crate::harness::{qemu_io, Node};
use serde_json::Value;
use std::time::Instant;

const MIB: u64 = 1 << 20;

fn node_status(node: &Node) -> Value {
    let body = ureq::get(format!("{}/v1/node", node.api()))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    serde_json::from_str(&body).unwrap()
}

/// Runs `strata snapshot delete FULL --wait`: (success, stdout, stderr, seconds taken).
fn delete_wait(node: &Node, full: &str) -> (bool, String, String, u64) {
    let started = Instant::now();
    let out = node.cli(&["snapshot", "delete", full, "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), stdout, stderr, started.elapsed().as_secs())
}

/// Writes `mib` MiB of `byte` from offset 0, 32 MiB per request.
fn fill(uri: &str, mib: u64, byte: u8) {
    let commands: Vec<String> =
        (0..mib / 32).map(|i| format!("write -P {byte:#x} {}M 32M", i * 32)).collect();
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    qemu_io(uri, &commands);
}

#[test]
fn a_deleted_snapshots_space_is_followed_until_reused_or_stuck() {
    let node = Node::start();

    // Small: 8 MiB only the snapshot holds. The cleaner does not run for so little dead
    // space, so the wait stops after 10 s of nothing and says what remains and why.
    node.create("small", "64M");
    let uri = node.uri("small");
    qemu_io(&uri, &["write -P 0x11 0 8M"]);
    assert!(node.cli(&["snapshot", "create", "small@s1"]).status.success());
    qemu_io(&uri, &["write -P 0x12 0 8M", "flush"]);
    let (ok, stdout, stderr, secs) = delete_wait(&node, "small@s1");
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("deleted small@s1"), "{stdout}");
    assert!((10..40).contains(&secs), "stopped after {secs}s of nothing moving: {stderr}");
    assert!(stderr.contains("reclaiming [--------------------]   0%  0B of 8M"), "{stderr}");
    assert!(
        stderr.contains("small@s1: 0B of 8M reclaimed; 8M remains, dead but not yet reusable")
            && stderr.contains("the cleaner is not running: it runs once at least 256M"),
        "{stderr}"
    );
    // The API shows it, by name and id.
    let reclaim = node_status(&node)["reclaim"].clone();
    let s = &reclaim["snapshots"][0];
    assert_eq!(s["name"], "small@s1", "{reclaim}");
    assert_eq!(
        (s["freed_bytes"].as_u64(), s["waiting_bytes"].as_u64()),
        (Some(8 * MIB), Some(8 * MIB))
    );
    assert_eq!(reclaim["cleaner_running"], false, "{reclaim}");
    assert_eq!(reclaim["waiting_bytes"], 8 * MIB, "{reclaim}");

    // Large: 288 MiB (nine segments) only the snapshot holds, written in one go. Its
    // delete leaves more than 256 MiB and a quarter of the log dead, so the cleaner
    // runs, and the segments it lay in are freed (but an edge one, shared with live
    // data, which the cleaner leaves).
    node.create("big", "288M");
    let uri = node.uri("big");
    fill(&uri, 288, 0x21);
    assert!(node.cli(&["snapshot", "create", "big@s1"]).status.success());
    fill(&uri, 288, 0x22);
    qemu_io(&uri, &["flush"]);
    let (ok, stdout, stderr, secs) = delete_wait(&node, "big@s1");
    assert!(ok && secs < 60, "{secs}s: {stdout}{stderr}");
    let reclaim = node_status(&node)["reclaim"].clone();
    let s = reclaim["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "big@s1")
        .unwrap_or_else(|| panic!("{reclaim}"))
        .clone();
    assert_eq!(s["freed_bytes"], 288 * MIB, "{reclaim}");
    let waiting = s["waiting_bytes"].as_u64().unwrap();
    assert!(waiting <= 64 * MIB, "at most its edge segments wait: {reclaim}\n{stderr}");
    assert_eq!(s["held_bytes"].as_u64(), Some(waiting), "what waits, the cleaner leaves: {s}");
    assert!(stderr.contains("reclaiming ["), "{stderr}");
    if waiting == 0 {
        assert!(stderr.contains("the 288M big@s1 held alone is free"), "{stderr}");
    } else {
        assert!(stderr.contains("in segments still more than a quarter live"), "{stderr}");
    }
    // The volume reads back its own data after the cleaner moved blocks around.
    qemu_io(&uri, &["read -P 0x22 0 32M", "read -P 0x22 256M 32M"]);
}
