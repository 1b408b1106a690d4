//! Snapshots, clones, rollback, space accounting and fsck, end to end: the real binary,
//! qemu-io and fio over NBD, the CLI, kill -9.

use crate::harness::{pseudo_random, qemu_io, run, Node, STRATA};
use crate::raw::{Raw, CMD_FLUSH};
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

fn cli_ok(node: &Node, args: &[&str]) -> Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = node.cli(&full);
    assert!(out.status.success(), "strata {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    if out.stdout.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(&out.stdout).unwrap()
}

fn cli_err(node: &Node, args: &[&str]) -> String {
    let out = node.cli(args);
    assert!(!out.status.success(), "strata {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn live_bytes(node: &Node) -> u64 {
    let body = ureq::get(format!("{}/v1/node", node.api()))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    v["live_bytes"].as_u64().unwrap()
}

fn fsck(dir: &Path, data: bool) -> (bool, String) {
    let mut args = vec!["fsck", "--data-dir", dir.to_str().unwrap()];
    if data {
        args.push("--data");
    }
    let out = Command::new(STRATA).args(&args).output().unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn snapshot_clone_and_delete_through_nbd_with_exact_accounting() {
    let node = Node::start();
    node.create("v", "16M");
    let v = node.uri("v");
    qemu_io(&v, &["write -P 0xaa 0 4M"]);
    let snap = cli_ok(&node, &["snapshot", "create", "v@s1"]);
    assert_eq!(snap["name"], "v@s1");
    qemu_io(&v, &["write -P 0xbb 0 2M"]);

    // The snapshot reads A, the volume B then A.
    let s1 = node.uri("v@s1");
    qemu_io(&s1, &["read -P 0xaa 0 4M", "read -P 0 4M 12M"]);
    qemu_io(&v, &["read -P 0xbb 0 2M", "read -P 0xaa 2M 2M"]);
    // The snapshot is read-only: a write fails and changes nothing.
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0xee 0 4k", &s1])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            || text.contains("failed")
            || text.contains("read-only")
            || text.contains("Read-only"),
        "a write to a snapshot must fail: {text}"
    );
    qemu_io(&s1, &["read -P 0xaa 0 4M"]);

    // A clone is writable and independent of the snapshot and the volume.
    cli_ok(&node, &["volume", "clone", "v@s1", "c"]);
    let c = node.uri("c");
    qemu_io(&c, &["read -P 0xaa 0 4M", "write -P 0xcc 0 1M"]);
    qemu_io(&c, &["read -P 0xcc 0 1M", "read -P 0xaa 1M 3M"]);
    qemu_io(&s1, &["read -P 0xaa 0 4M"]);
    qemu_io(&v, &["read -P 0xbb 0 2M", "read -P 0xaa 2M 2M"]);
    let info = cli_ok(&node, &["volume", "info", "c"]);
    assert_eq!(info["origin"], "v@s1");
    assert_eq!(info["exclusive_bytes"].as_u64(), Some(MIB));
    assert_eq!(info["shared_bytes"].as_u64(), Some(3 * MIB));

    // While the clone depends on s1, s1 cannot be deleted (and v neither).
    let err = cli_err(&node, &["snapshot", "delete", "v@s1"]);
    assert!(err.contains("v@s1 cannot be deleted") && err.contains('c'), "{err}");
    let err = cli_err(&node, &["volume", "delete", "v"]);
    assert!(err.contains("clones depend on (c)"), "{err}");
    qemu_io(&s1, &["read -P 0xaa 0 4M"]);

    // Without the clone, s1 alone holds 0..2M of A.
    cli_ok(&node, &["volume", "delete", "c"]);
    let info = cli_ok(&node, &["volume", "info", "v"]);
    let s1_info = &info["snapshots"][0];
    assert_eq!(s1_info["exclusive_bytes"].as_u64(), Some(2 * MIB), "{info}");
    assert_eq!(s1_info["shared_bytes"].as_u64(), Some(2 * MIB), "{info}");
    assert_eq!(info["exclusive_bytes"].as_u64(), Some(2 * MIB), "B is the volume's alone");
    assert_eq!(info["snapshot_exclusive_bytes"].as_u64(), Some(2 * MIB));
    let before = live_bytes(&node);
    assert_eq!(before, 6 * MIB, "2M of A under s1 alone, 2M shared, 2M of B");
    cli_ok(&node, &["snapshot", "delete", "v@s1"]);
    assert_eq!(before - live_bytes(&node), 2 * MIB, "exactly s1's exclusive bytes freed");
    qemu_io(&v, &["read -P 0xbb 0 2M", "read -P 0xaa 2M 2M"]);
    let list = cli_ok(&node, &["snapshot", "list", "v"]);
    assert_eq!(list.as_array().unwrap().len(), 0);
    let err = cli_err(&node, &["snapshot", "delete", "v@s1"]);
    assert!(err.contains("no snapshot named"), "{err}");
}

#[test]
fn rollback_returns_the_volume_and_keeps_every_snapshot() {
    let node = Node::start();
    node.create("r", "8M");
    let r = node.uri("r");
    qemu_io(&r, &["write -P 0x11 0 1M"]);
    cli_ok(&node, &["snapshot", "create", "r@a"]);
    qemu_io(&r, &["write -P 0x22 0 1M", "write -P 0x23 4M 1M"]);
    cli_ok(&node, &["snapshot", "create", "r@b"]);
    qemu_io(&r, &["write -P 0x33 0 512k"]);

    // Refused while a client is attached; --force disconnects it.
    let mut raw = Raw::connect(&node.nbd);
    raw.go("r");
    let err = cli_err(&node, &["volume", "rollback", "r@a"]);
    assert!(err.contains("1 NBD client connection(s) attached"), "{err}");
    qemu_io(&node.uri("r@b"), &["read -P 0x22 0 1M"]);
    cli_ok(&node, &["volume", "rollback", "r@a", "--force"]);
    drop(raw);

    qemu_io(&r, &["read -P 0x11 0 1M", "read -P 0 1M 7M"]);
    qemu_io(&node.uri("r@b"), &["read -P 0x22 0 1M", "read -P 0x23 4M 1M"]);
    qemu_io(&node.uri("r@a"), &["read -P 0x11 0 1M"]);
    // r@a now has two branches (r@b and the volume): deleting it is refused.
    let err = cli_err(&node, &["snapshot", "delete", "r@a"]);
    assert!(err.contains("rolled back to it"), "{err}");
    // r@b is a dead end now; it can go, and then r@a too.
    cli_ok(&node, &["snapshot", "delete", "r@b"]);
    cli_ok(&node, &["snapshot", "delete", "r@a"]);
    qemu_io(&r, &["read -P 0x11 0 1M", "read -P 0 1M 7M"]);
    assert_eq!(live_bytes(&node), MIB, "only the rolled-back 1M is live");
    let err = cli_err(&node, &["volume", "rollback", "r@nope"]);
    assert!(err.contains("no snapshot named"), "{err}");
    let err = cli_err(&node, &["volume", "rollback", "r"]);
    assert!(err.contains("not VOL@SNAP"), "{err}");
}

#[test]
fn bad_snapshot_requests_are_refused_and_change_nothing() {
    let node = Node::start();
    node.create("b", "4M");
    cli_ok(&node, &["snapshot", "create", "b@one"]);
    for (args, expect) in [
        (vec!["snapshot", "create", "b@one"], "already has a snapshot named one"),
        (vec!["snapshot", "create", "b@bad/name"], "snapshot name"),
        (vec!["snapshot", "create", "nope@x"], "no volume named"),
        (vec!["snapshot", "create", "b"], "not VOL@SNAP"),
        (vec!["snapshot", "delete", "b@two"], "no snapshot named"),
        (vec!["volume", "clone", "b@two", "c"], "no snapshot named"),
        (vec!["volume", "clone", "b@one", "b"], "already exists"),
        (vec!["volume", "clone", "b@one", ".x"], "may not start"),
    ] {
        let err = cli_err(&node, &args);
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let list = cli_ok(&node, &["snapshot", "list", "b"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(cli_ok(&node, &["volume", "list"]).as_array().unwrap().len(), 1);
    // The read-only export refuses an unknown snapshot by name.
    let out = Command::new("nbdinfo").arg(node.uri("b@two")).output().unwrap();
    assert!(!out.status.success());
}

/// Finds `needle` in the store's log file; returns its offset.
pub(crate) fn find_in_log(dir: &Path, needle: &[u8]) -> u64 {
    let log = std::fs::read(dir.join("store/log")).unwrap();
    log.windows(needle.len()).position(|w| w == needle).expect("the block is in the log") as u64
}

#[test]
fn fsck_is_clean_refuses_a_running_node_and_finds_a_flipped_bit() {
    let mut node = Node::start();
    let keep = node.keep_dir();
    node.create("f", "8M");
    let uri = node.uri("f");
    qemu_io(&uri, &["write -P 0x5a 0 64k", "write -P 0x77 1M 4k"]);
    cli_ok(&node, &["snapshot", "create", "f@s"]);
    qemu_io(&uri, &["write -P 0x66 0 4k"]);
    let (ok, text) = fsck(&node.dir, false);
    assert!(!ok && text.contains("in use by another strata process"), "{text}");
    let (_, stderr) = node.stop();
    let dir = keep.as_ref().unwrap().path().to_owned();
    let (ok, text) = fsck(&dir, true);
    assert!(ok && text.contains("clean") && text.contains("1 snapshot"), "{text}\n{stderr}");
    // Reading the blocks shows its progress (plain lines, not a terminal here).
    assert!(text.contains("checking blocks [####################] 100%"), "{text}");
    let (ok, text) = fsck(&dir, false);
    assert!(ok && !text.contains("checking blocks"), "no blocks read, no progress: {text}");

    // Flip one bit of the 0x77 block inside the log.
    let at = find_in_log(&dir, &[0x77; 4096]);
    let mut log = std::fs::read(dir.join("store/log")).unwrap();
    log[at as usize + 100] ^= 0x01;
    std::fs::write(dir.join("store/log"), &log).unwrap();
    let (ok, text) = fsck(&dir, false);
    assert!(ok, "without --data the structures are still consistent: {text}");
    let (ok, text) = fsck(&dir, true);
    assert!(!ok && text.contains("fails its checksum"), "{text}");

    // Served, the block is an I/O error, never the wrong bytes; its neighbours are fine.
    let node = Node::start_in(&dir);
    let uri = node.uri("f");
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x77 1M 4k", &uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Input/output error"), "{text}");
    qemu_io(&uri, &["read -P 0x66 0 4k", "read -P 0x5a 4k 60k"]);
    qemu_io(&node.uri("f@s"), &["read -P 0x5a 0 64k"]);
    drop(keep);
}

#[test]
fn kill9_under_fio_with_flushes_and_snapshots_keeps_every_flushed_write() {
    let mut node = Node::start();
    let keep = node.keep_dir();
    node.create("load", "64M");
    node.create("d", "16M");
    // Background load: fio random writes with a flush every 8 writes, running through
    // the kill.
    let mut fio = Command::new("fio")
        .args([
            "--name=load",
            // Threads, not forked jobs: killing fio then kills its workers too.
            "--thread",
            "--ioengine=nbd",
            &format!("--uri={}", node.uri("load")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            "--fsync=8",
            "--rate_iops=1000",
            "--time_based",
            "--runtime=30",
            "--size=64M",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("fio is required by this test");
    // Foreground: numbered writes to "d", a flush every 8, a snapshot every 64.
    let blocks = 256u64;
    let value = |i: u64| pseudo_random(1000 + i, 4096);
    let mut durable: Vec<Option<u64>> = vec![None; blocks as usize];
    let mut since_flush: Vec<Vec<u64>> = vec![Vec::new(); blocks as usize];
    let mut snapshots: Vec<(String, Vec<Option<u64>>)> = Vec::new();
    let mut raw = Raw::connect(&node.nbd);
    raw.go("d");
    let mut current = durable.clone();
    for i in 0..600u64 {
        let block = (i * 7919) % blocks;
        raw.write(i, block * 4096, &value(i));
        assert_eq!(raw.reply(0).error, 0);
        current[block as usize] = Some(i);
        since_flush[block as usize].push(i);
        if i % 8 == 7 {
            raw.request(0, CMD_FLUSH, 10_000 + i, 0, 0);
            assert_eq!(raw.reply(0).error, 0);
            durable = current.clone();
            since_flush.iter_mut().for_each(Vec::clear);
        }
        if i % 64 == 63 {
            let name = format!("d@s{i}");
            cli_ok(&node, &["snapshot", "create", &name]);
            snapshots.push((name, current.clone()));
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::mem::forget(raw);
    let dir = node.kill9();
    let _ = fio.kill();
    let _ = fio.wait();

    let (ok, text) = fsck(&dir, true);
    assert!(ok, "fsck after kill -9: {text}");
    let node = Node::start_in(&dir);
    let mut raw = Raw::connect(&node.nbd);
    raw.go("d");
    for block in 0..blocks {
        let got = raw.read_ok(block, block * 4096, 4096);
        let allowed: Vec<Option<u64>> = std::iter::once(durable[block as usize])
            .chain(since_flush[block as usize].iter().map(|i| Some(*i)))
            .collect();
        assert!(
            allowed.iter().any(|a| got == a.map_or(vec![0; 4096], value)),
            "block {block} lost its flushed write after kill -9"
        );
    }
    for (name, content) in &snapshots {
        let mut raw = Raw::connect(&node.nbd);
        raw.go(name);
        for block in 0..blocks {
            let got = raw.read_ok(block, block * 4096, 4096);
            let want = content[block as usize].map_or(vec![0; 4096], value);
            assert!(got == want, "{name} block {block} differs after kill -9");
        }
    }
    let _ = run("nbdinfo", &[&node.uri("load")]);
    drop(keep);
}
