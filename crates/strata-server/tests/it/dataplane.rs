//! The data plane of a real node, through `strata-frame`'s client on the RPC port:
//! components are created, written, read, flushed and removed; a request at an epoch
//! older than one the component has seen is refused and changes nothing, also after a
//! kill -9 and restart; bad requests get clear statuses; a wrong secret gets nothing.

use crate::harness::Node;
use strata_frame::client::{request, CallError, DataPeer};
use strata_frame::frame::{DataKey, Kind, Status, FLAG_FUA};

fn rpc_addr(node: &Node) -> String {
    // The node's own record has the address it listens on now (a port 0 changes at
    // restart); it is written once the node's session registers.
    for _ in 0..100 {
        let out = std::process::Command::new("curl")
            .args(["-sf", &format!("{}/v1/cluster", node.api())])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(rpc) = v["cluster"]["members"][0]["record"]["rpc"].as_str() {
            if std::net::TcpStream::connect(rpc).is_ok() {
                return rpc.to_owned();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("no RPC address for the node");
}

/// `strata fsck --data` of a stopped node's directory finds the store clean, with no
/// store view left without a catalog entry.
fn fsck_clean(dir: &std::path::Path) {
    let out = std::process::Command::new(crate::harness::STRATA)
        .args(["fsck", "--data", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && !text.contains("no catalog entry"), "{text}");
}

fn status(e: CallError) -> (Status, u64) {
    match e {
        CallError::Status { status, epoch, .. } => (status, epoch),
        other => panic!("expected a status, got {other}"),
    }
}

#[test]
fn components_are_fenced_by_epoch_across_a_crash() {
    let mut node = Node::start();
    let keep = node.keep_dir();
    let secret = std::fs::read(node.dir.join("secret")).unwrap();
    let key = DataKey::from_secret(&secret);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let addr = rpc_addr(&node);
    let peer = DataPeer::new(key.clone(), addr.clone());
    let block = vec![0x5au8; 4096];
    let component = rt.block_on(async {
        let create = request(Kind::Create, 0, 0, 0, 8 << 20);
        let (reply, _) = peer.call(create, b"vm1").await.unwrap();
        let c = reply.component;
        peer.call(request(Kind::Write, c, 2, 1, 4096), &block).await.unwrap();
        let mut read = request(Kind::Read, c, 2, 0, 4096);
        read.count = 4096;
        assert_eq!(peer.call(read, &[]).await.unwrap().1, block);
        // An older epoch is refused, with the newer one, and writes nothing.
        let late = peer.call(request(Kind::Write, c, 1, 2, 4096), &[0u8; 4096]).await;
        assert_eq!(status(late.unwrap_err()), (Status::StaleEpoch, 2));
        assert_eq!(peer.call(read, &[]).await.unwrap().1, block);
        // FUA, flush, probe.
        let mut fua = request(Kind::Write, c, 2, 3, 8192);
        fua.flags = FLAG_FUA;
        peer.call(fua, &block).await.unwrap();
        peer.call(request(Kind::Flush, c, 2, 0, 0), &[]).await.unwrap();
        let (probe, _) = peer.call(request(Kind::Probe, c, 2, 0, 0), &[]).await.unwrap();
        assert_eq!(probe.lsn, 3);
        // Bad requests: clear statuses, nothing changed.
        let mut past = read;
        past.offset = 8 << 20;
        assert_eq!(status(peer.call(past, &[]).await.unwrap_err()).0, Status::OutOfRange);
        let mut huge = read;
        huge.count = u32::MAX;
        assert_eq!(status(peer.call(huge, &[]).await.unwrap_err()).0, Status::Invalid);
        let missing = request(Kind::Write, 999_999, 2, 1, 0);
        assert_eq!(status(peer.call(missing, &block).await.unwrap_err()).0, Status::NotFound);
        let bad_name = request(Kind::Create, 0, 0, 0, 8 << 20);
        assert_eq!(status(peer.call(bad_name, b"../x").await.unwrap_err()).0, Status::Invalid);
        // A peer without the secret is refused at the handshake, before it sends a frame,
        // and told why.
        let outsider = DataPeer::new(DataKey::from_secret(b"not the secret"), addr.clone());
        let r = outsider.call(request(Kind::Read, c, 9, 0, 0), &[]).await;
        assert!(matches!(&r, Err(CallError::NotSent(why)) if why.contains("secret")), "{r:?}");
        c
    });
    // Components are not volumes: not listed, not exported.
    let out = node.cli(&["volume", "list", "--json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");

    let dir = node.kill9();
    let node = Node::start_in(&dir);
    let addr = rpc_addr(&node);
    let peer = DataPeer::new(key, addr);
    rt.block_on(async {
        let mut read = request(Kind::Read, component, 2, 0, 4096);
        read.count = 4096;
        assert_eq!(peer.call(read, &[]).await.unwrap().1, block, "flushed data kept");
        let late = peer.call(request(Kind::Write, component, 1, 9, 0), &block).await;
        assert_eq!(status(late.unwrap_err()), (Status::StaleEpoch, 2), "the fence survived");
        peer.call(request(Kind::Write, component, 3, 1, 0), &block).await.unwrap();
        peer.call(request(Kind::Remove, component, 3, 0, 0), &[]).await.unwrap();
        let gone = peer.call(read, &[]).await;
        assert_eq!(status(gone.unwrap_err()).0, Status::NotFound);
        // One left in place for fsck.
        let (made, _) = peer.call(request(Kind::Create, 0, 0, 0, 1 << 20), b"vm2").await.unwrap();
        peer.call(request(Kind::Write, made.component, 1, 1, 0), &block).await.unwrap();
        peer.call(request(Kind::Flush, made.component, 1, 0, 0), &[]).await.unwrap();
    });
    let dir = node.kill9();
    // fsck knows components: a clean store with no finding and no orphan note.
    fsck_clean(&dir);
    drop(keep);
}

/// A component's store failing a request (here a block that rotted on disk) answers Io
/// with its reason, so the owner's log says why, not only `answered Io`.
#[test]
fn a_failed_component_request_says_why() {
    let mut node = Node::start();
    let keep = node.keep_dir();
    let key = DataKey::from_secret(&std::fs::read(node.dir.join("secret")).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let peer = DataPeer::new(key.clone(), rpc_addr(&node));
    let block = vec![0x6bu8; 4096];
    let c = rt.block_on(async {
        let (made, _) = peer.call(request(Kind::Create, 0, 0, 0, 1 << 20), b"rot").await.unwrap();
        let c = made.component;
        peer.call(request(Kind::Write, c, 1, 1, 0), &block).await.unwrap();
        peer.call(request(Kind::Flush, c, 1, 0, 0), &[]).await.unwrap();
        c
    });
    let dir = node.kill9();
    let at = crate::snapshots::find_in_log(&dir, &block);
    let mut log = std::fs::read(dir.join("store/log")).unwrap();
    log[at as usize + 100] ^= 0x01;
    std::fs::write(dir.join("store/log"), &log).unwrap();
    let node = Node::start_in(&dir);
    let peer = DataPeer::new(key, rpc_addr(&node));
    let e = rt.block_on(async {
        let mut read = request(Kind::Read, c, 1, 0, 0);
        read.count = 4096;
        peer.call(read, &[]).await.unwrap_err()
    });
    let text = e.to_string();
    match e {
        CallError::Status { status: Status::Io, detail, .. } => {
            assert!(!detail.is_empty(), "no reason given: {text}")
        }
        other => panic!("expected Io, got {other}"),
    }
    assert!(text.contains("answered Io: "), "{text}");
    drop(node);
    drop(keep);
}

/// A replicated volume's snapshot on one copy (`Kind::Snapshot`, `strata_replica::snapshot`'s
/// barrier and catch-up): taken of what the component holds (synced first), named by its
/// key in the catalog, kept across a kill -9, replaced when taken again, removed (twice is
/// fine); fenced like a write; fsck finds the store clean, no snapshot orphaned.
#[test]
fn a_component_snapshot_is_kept_by_key_replaced_removed_and_fenced() {
    let mut node = Node::start();
    let keep = node.keep_dir();
    let secret = std::fs::read(node.dir.join("secret")).unwrap();
    let key = DataKey::from_secret(&secret);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let peer = DataPeer::new(key.clone(), rpc_addr(&node));
    const SNAP: u64 = (3 << 24) | 1;
    let snapshots = |dir: &std::path::Path| -> Vec<u64> {
        let catalog: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("catalog.json")).unwrap()).unwrap();
        catalog["components"][0]["snapshots"]
            .as_array()
            .map(|a| a.iter().map(|s| s["key"].as_u64().unwrap()).collect())
            .unwrap_or_default()
    };
    let c = rt.block_on(async {
        let (reply, _) = peer.call(request(Kind::Create, 0, 0, 0, 1 << 20), b"vm").await.unwrap();
        let c = reply.component;
        peer.call(request(Kind::Write, c, 3, 1, 0), &[0x11; 4096]).await.unwrap();
        peer.call(request(Kind::Snapshot, c, 3, 0, SNAP), &[]).await.unwrap();
        // Fenced: an older owner's snapshot request is refused.
        let late = peer.call(request(Kind::Snapshot, c, 2, 0, SNAP + 1), &[]).await;
        assert_eq!(status(late.unwrap_err()), (Status::StaleEpoch, 3));
        let missing = peer.call(request(Kind::Snapshot, 999_999, 3, 0, SNAP), &[]).await;
        assert_eq!(status(missing.unwrap_err()).0, Status::NotFound);
        c
    });
    assert_eq!(snapshots(&node.dir), [SNAP]);
    let dir = node.kill9();
    let node = Node::start_in(&dir);
    assert_eq!(snapshots(&node.dir), [SNAP], "kept across a kill -9");
    let peer = DataPeer::new(key, rpc_addr(&node));
    rt.block_on(async {
        // Taken again (a catch-up): replaced, still one.
        peer.call(request(Kind::Write, c, 3, 2, 0), &[0x22; 4096]).await.unwrap();
        peer.call(request(Kind::Snapshot, c, 3, 0, SNAP), &[]).await.unwrap();
    });
    assert_eq!(snapshots(&node.dir), [SNAP]);
    rt.block_on(async {
        peer.call(request(Kind::RemoveSnapshot, c, 3, 0, SNAP), &[]).await.unwrap();
        peer.call(request(Kind::RemoveSnapshot, c, 3, 0, SNAP), &[]).await.unwrap();
        let mut read = request(Kind::Read, c, 3, 0, 0);
        read.count = 4096;
        assert_eq!(peer.call(read, &[]).await.unwrap().1, [0x22; 4096], "the volume is as it was");
        peer.call(request(Kind::Snapshot, c, 3, 0, SNAP + 2), &[]).await.unwrap();
    });
    assert_eq!(snapshots(&node.dir), [SNAP + 2]);
    let dir = node.kill9();
    fsck_clean(&dir);
    drop(keep);
}
