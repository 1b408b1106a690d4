//! Real NBD clients against a real node: qemu-io, qemu-img, nbdinfo, nbdcopy, fio.

use crate::harness::{pseudo_random, qemu_io, run, Node};

#[test]
fn qemu_io_patterns_round_trip_aligned_and_unaligned() {
    let node = Node::start();
    node.create("vm1", "64M");
    let uri = node.uri("vm1");
    qemu_io(
        &uri,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 4096 4096",
            "write -P 0x33 1000 3333",
            "write -P 0x44 67104768 4096",
        ],
    );
    let out = qemu_io(
        &uri,
        &[
            "read -P 0x11 0 1000",
            "read -P 0x33 1000 3333",
            "read -P 0x22 4333 3859",
            "read -P 0x11 8192 1040384",
            "read -P 0x00 1M 1M",
            "read -P 0x44 67104768 4096",
        ],
    );
    assert_eq!(out.matches("read ").count(), 6, "{out}");
}

#[test]
fn qemu_img_convert_then_compare() {
    let node = Node::start();
    node.create("img", "32M");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    // Data with holes in between: 1 MiB of data every 3 MiB.
    let mut image = vec![0u8; 32 << 20];
    for (i, chunk) in image.chunks_mut(3 << 20).enumerate() {
        let n = chunk.len().min(1 << 20);
        chunk[..n].copy_from_slice(&pseudo_random(i as u64 + 1, n));
    }
    std::fs::write(&src, &image).unwrap();
    let src = src.to_str().unwrap();
    let uri = node.uri("img");
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src, &uri]);
    let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src, &uri]);
    assert!(out.contains("Images are identical"), "{out}");
    // And a byte that differs is noticed (the comparison is real).
    qemu_io(&uri, &["write -P 0x5a 4096 512"]);
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", src, &uri])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn nbdinfo_map_shows_holes_after_trim_and_write_zeroes() {
    let node = Node::start();
    node.create("thin", "16M");
    let uri = node.uri("thin");
    let map = run("nbdinfo", &["--map", "--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "a new volume is one hole: {map}");
    assert_eq!(v[0]["type"], 3, "{map}");

    qemu_io(&uri, &["write -P 0x77 0 4M", "discard 1M 1M", "write -z 2M 1M"]);
    let map = run("nbdinfo", &["--map", "--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    let extents: Vec<(u64, u64, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect();
    let mib = 1 << 20;
    assert_eq!(
        extents,
        // qemu-io's `write -z` sends NO_HOLE (no -u): zeroes that stay allocated (2).
        vec![
            (0, mib, 0),
            (mib, mib, 3),
            (2 * mib, mib, 2),
            (3 * mib, mib, 0),
            (4 * mib, 12 * mib, 3)
        ],
        "{map}"
    );
    qemu_io(&uri, &["read -P 0x77 0 1M", "read -P 0 1M 2M", "read -P 0x77 3M 1M"]);

    // Zeroes that may unmap (-u) become a hole; the data the volume holds is what counts
    // as allocated.
    qemu_io(&uri, &["write -z -u 0 1M"]);
    qemu_io(&uri, &["read -P 0 0 1M"]);
    let info = node.cli(&["volume", "info", "thin", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["allocated_bytes"].as_u64().unwrap(), mib, "only 3M..4M holds data");
    let map = run("nbdinfo", &["--map", "--json", &uri]);
    let v: serde_json::Value = serde_json::from_str(&map).unwrap();
    assert_eq!((v[0]["offset"].as_u64(), v[0]["length"].as_u64()), (Some(0), Some(2 * mib)));
    assert_eq!(v[0]["type"], 3, "{map}");
}

#[test]
fn nbdcopy_with_four_connections_round_trips() {
    let node = Node::start();
    node.create("copy", "48M");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    let data = pseudo_random(42, 48 << 20);
    std::fs::write(&src, &data).unwrap();
    let uri = node.uri("copy");
    run("nbdcopy", &["--connections=4", "--flush", src.to_str().unwrap(), &uri]);
    std::fs::write(&back, b"").unwrap();
    run("nbdcopy", &["--connections=4", &uri, back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == data, "nbdcopy round trip differs");
}

#[test]
fn fio_nbd_engine_verifies_crc32c() {
    let node = Node::start();
    node.create("fio", "64M");
    // fio writes a verify-state file into its working directory: keep it out of the tree.
    let scratch = tempfile::tempdir().unwrap();
    let out = crate::harness::run_in(
        scratch.path(),
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", node.uri("fio")),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=32m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--output-format=json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    assert_eq!(v["jobs"][0]["error"], 0, "{out}");
    assert!(v["jobs"][0]["write"]["total_ios"].as_u64().unwrap() >= 8192, "{out}");
    assert!(v["jobs"][0]["read"]["total_ios"].as_u64().unwrap() >= 8192, "verify read back");
}
