//! Durability and restarts: acknowledged writes survive kill -9; the data directory is
//! locked against a second node but not by a dead one; SIGTERM stops cleanly.

use crate::harness::{pseudo_random, qemu_io, Node};
use crate::raw::{Raw, CMD_FLUSH};

fn write_acknowledged(node: &Node, flush: bool) -> Vec<(u64, Vec<u8>)> {
    let mut raw = Raw::connect(&node.nbd);
    raw.go("d");
    let mut written = Vec::new();
    for i in 0..64u64 {
        let data = pseudo_random(i + 100, 4096 + (i as usize % 3) * 512);
        let offset = i * 65536 + (i % 5) * 512;
        raw.write(i, offset, &data);
        let r = raw.reply(0);
        assert_eq!((r.error, r.cookie), (0, i));
        written.push((offset, data));
    }
    if flush {
        raw.request(0, CMD_FLUSH, 999, 0, 0);
        assert_eq!(raw.reply(0).error, 0);
    }
    // No DISC and no flush: the connection dies with the process.
    std::mem::forget(raw);
    written
}

fn check_after_kill9(flush: bool) {
    let mut node = Node::start();
    let keep = node.keep_dir();
    node.create("d", "8M");
    let written = write_acknowledged(&node, flush);
    let dir = node.kill9();
    let node = Node::start_in(&dir);
    let mut raw = Raw::connect(&node.nbd);
    raw.go("d");
    for (i, (offset, data)) in written.iter().enumerate() {
        let got = raw.read_ok(i as u64, *offset, data.len() as u32);
        assert!(&got == data, "write {i} at {offset} lost after kill -9 (flush={flush})");
    }
    drop(keep);
}

#[test]
fn acknowledged_writes_survive_kill9_without_flush() {
    check_after_kill9(false);
}

#[test]
fn flushed_writes_survive_kill9() {
    check_after_kill9(true);
}

#[test]
fn second_node_on_same_dir_is_refused_and_killed_node_restarts() {
    let mut first = Node::start();
    let keep = first.keep_dir();
    first.create("v", "4M");
    let err = Node::try_start_in(&first.dir).err().expect("second node must fail");
    assert!(err.contains("in use by another strata process"), "{err}");
    assert!(err.contains(&format!("pid {}", first.pid())), "{err}");
    let dir = first.kill9();
    // The dead node's flock is gone with it; its lock file is still there.
    assert!(dir.join("lock").exists());
    let node = Node::start_in(&dir);
    let out = node.cli(&["volume", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("v "), "volumes survive restart");
    drop(keep);
}

#[test]
fn sigterm_finishes_and_restart_keeps_data() {
    let mut node = Node::start();
    let keep = node.keep_dir();
    node.create("keep", "16M");
    node.create("other", "4M");
    qemu_io(&node.uri("keep"), &["write -P 0x5e 0 8M"]);
    let dir = node.dir.clone();
    let (status, stderr) = node.stop();
    assert!(status.success(), "exit status {status}: {stderr}");
    let node = Node::start_in(&dir);
    qemu_io(&node.uri("keep"), &["read -P 0x5e 0 8M", "read -P 0 8M 8M"]);
    let out = node.cli(&["volume", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> =
        v.as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["keep", "other"]);
    drop(keep);
}

#[test]
fn a_client_that_stops_reading_cannot_hold_the_shutdown_forever() {
    let node = Node::start();
    node.create("stuck", "64M");
    let mut raw = Raw::connect(&node.nbd);
    raw.go("stuck");
    // 64 MiB of read replies that the client never reads: the server's writes block.
    raw.flood_unread_reads(64);
    let started = std::time::Instant::now();
    let (status, stderr) = node.stop();
    assert!(status.success(), "{status}: {stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(45), "{:?}", started.elapsed());
    assert!(stderr.contains("did not finish"), "{stderr}");
}

#[test]
fn a_corrupt_catalog_is_a_clear_error_and_is_left_as_it_was() {
    let mut node = Node::start();
    let keep = node.keep_dir();
    node.create("v", "4M");
    let dir = node.kill9();
    let catalog = dir.join("catalog.json");
    let log = std::fs::read(dir.join("store/log")).unwrap();
    std::fs::write(&catalog, b"{\"format\": 2, \"volu").unwrap();
    let err = Node::try_start_in(&dir).err().expect("a corrupt catalog must stop the node");
    assert!(err.contains("is corrupt or not a Strata catalog"), "{err}");
    assert_eq!(std::fs::read(&catalog).unwrap(), b"{\"format\": 2, \"volu", "nothing rewritten");
    assert!(std::fs::read(dir.join("store/log")).unwrap() == log, "the store is untouched");
    std::fs::write(&catalog, b"{\"format\": 9, \"next_id\": 1, \"volumes\": []}").unwrap();
    let err = Node::try_start_in(&dir).err().expect("an unknown format must stop the node");
    assert!(err.contains("format 9"), "{err}");
    drop(keep);
}

#[test]
fn a_data_dir_of_the_file_per_volume_format_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = br#"{"format":1,"next_id":2,"volumes":[{"id":1,"name":"old","created_unix":0}]}"#;
    std::fs::write(dir.path().join("catalog.json"), catalog).unwrap();
    std::fs::create_dir(dir.path().join("volumes")).unwrap();
    std::fs::write(dir.path().join("volumes/0000000000000001.vol"), b"old data").unwrap();
    let err = Node::try_start_in(dir.path()).err().expect("format 1 must be refused");
    assert!(err.contains("format of strata 0.1") && err.contains("not changed"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("catalog.json")).unwrap(), catalog);
    assert_eq!(
        std::fs::read(dir.path().join("volumes/0000000000000001.vol")).unwrap(),
        b"old data"
    );
    assert!(!dir.path().join("store").exists(), "no store was created");
}
