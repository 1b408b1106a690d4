//! Golden test of the replication records: the JSON the metadata service stores under
//! `/volumes/<name>` (and `/volumes/<name>/owner`) and the API returns, byte for byte, and
//! the JSON older versions wrote, with what it parses to. A change to the records that
//! changes a byte here breaks every cluster with records written before it.

use strata_replica::record::{
    ComponentRecord, CopyRef, CopyState, HandedBitmap, Owner, Released, SnapshotRecord,
    VolumeRecord, VolumeState,
};
use strata_types::AccessList;

fn component(node: u64, id: u64, state: CopyState, stale_lsn: Option<u64>) -> ComponentRecord {
    ComponentRecord { stale_lsn, ..ComponentRecord::new(node, id, state) }
}

/// A volume of one node, ready, cloned from a snapshot and with two of its own.
fn single() -> VolumeRecord {
    VolumeRecord {
        name: "vm1".into(),
        node: 2,
        state: VolumeState::Ready,
        id: "00000000000000000000000000000a1f".into(),
        size_bytes: 10 << 30,
        created_unix: 1_765_000_000,
        origin: Some("base@golden".into()),
        snapshots: vec![
            SnapshotRecord::plain("before-upgrade", 10 << 30, 1_765_000_100),
            SnapshotRecord::plain("s2", 10 << 30, 1_765_000_200),
        ],
        replicas: 1,
        min_replicas: 1,
        components: Vec::new(),
        epoch: 0,
        released: None,
        lost_at: None,
        access: AccessList::default(),
    }
}

/// A name taken for a volume being made (`Registry::reserve`).
fn creating() -> VolumeRecord {
    VolumeRecord {
        name: "new".into(),
        node: 3,
        state: VolumeState::Creating,
        id: String::new(),
        size_bytes: 1 << 20,
        created_unix: 1_765_000_300,
        origin: None,
        snapshots: Vec::new(),
        replicas: 1,
        min_replicas: 1,
        components: Vec::new(),
        epoch: 0,
        released: None,
        lost_at: None,
        access: AccessList::default(),
    }
}

/// A replicated volume with a copy in each state, a clean hand-over and an access list.
fn replicated() -> VolumeRecord {
    VolumeRecord {
        name: "db1".into(),
        node: 1,
        state: VolumeState::Ready,
        id: String::new(),
        size_bytes: 50 << 30,
        created_unix: 1_765_000_400,
        origin: None,
        snapshots: Vec::new(),
        replicas: 3,
        min_replicas: 2,
        components: vec![
            component(1, 7, CopyState::Active, None),
            component(2, 7, CopyState::Stale, Some((7 << 40) + 12)),
            component(3, 9, CopyState::Resyncing, Some((6 << 40) + 3)),
        ],
        epoch: 7,
        released: Some(Released {
            epoch: 7,
            level: vec![CopyRef { node: 1, id: 7 }, CopyRef { node: 3, id: 9 }],
            stale: vec![HandedBitmap { node: 2, id: 7, runs: vec![[0, 2], [5, 5], [9, 10]] }],
        }),
        lost_at: None,
        access: AccessList {
            allow: vec!["client-a".into()],
            allow_net: vec!["10.0.0.0/8".into(), "fd00::/8".into()],
        },
    }
}

/// A replicated volume being deleted: two copies still to remove.
fn deleting() -> VolumeRecord {
    VolumeRecord {
        name: "gone".into(),
        node: 2,
        state: VolumeState::Deleting,
        id: String::new(),
        size_bytes: 1 << 30,
        created_unix: 1_765_000_500,
        origin: None,
        snapshots: Vec::new(),
        replicas: 3,
        min_replicas: 2,
        components: vec![
            component(2, 4, CopyState::Active, None),
            component(3, 5, CopyState::Stale, Some(99)),
        ],
        epoch: 3,
        released: None,
        lost_at: None,
        access: AccessList::default(),
    }
}

/// A copy as the owner's live view shows it (`volume info`).
fn live() -> ComponentRecord {
    ComponentRecord {
        node: 3,
        id: 9,
        state: CopyState::Resyncing,
        dirty_bytes: Some(3 << 20),
        resynced_bytes: Some(1 << 20),
        scan_left_bytes: Some(65536),
        lsn: Some((7 << 40) + 40),
        stale_lsn: Some((6 << 40) + 3),
        suspect: false,
    }
}

const SINGLE: &str = include_str!("golden/single.json");
const CREATING: &str = include_str!("golden/creating.json");
const REPLICATED: &str = include_str!("golden/replicated.json");
const DELETING: &str = include_str!("golden/deleting.json");
const LIVE: &str = include_str!("golden/live.json");
const OWNER: &str = r#"{"node":2,"epoch":8}"#;

#[test]
fn todays_records_serialize_byte_for_byte_as_before_and_read_back() {
    for (record, golden) in [
        (single(), SINGLE),
        (creating(), CREATING),
        (replicated(), REPLICATED),
        (deleting(), DELETING),
    ] {
        let json = serde_json::to_string(&record).expect("records serialize");
        assert_eq!(json, golden, "{} serializes as before", record.name);
        let back: VolumeRecord = serde_json::from_str(golden).expect("the golden JSON parses");
        assert_eq!(back, record, "{} reads back", record.name);
    }
    assert_eq!(serde_json::to_string(&live()).unwrap(), LIVE);
    assert_eq!(serde_json::from_str::<ComponentRecord>(LIVE).unwrap(), live());
    let owner = Owner { node: 2, epoch: 8 };
    assert_eq!(serde_json::to_string(&owner).unwrap(), OWNER);
    assert_eq!(serde_json::from_str::<Owner>(OWNER).unwrap(), owner);
}

/// Written before replication: no `replicas`, `min_replicas`, `components`, `epoch`,
/// `released` or `access`.
const OLD_SINGLE: &str = include_str!("golden/old_single.json");
/// Written before a hand-over named copies by node: `released` with `equal` (ids alone,
/// vouching for none) and a STALE bitmap without its node (matching no copy).
const OLD_RELEASED: &str = include_str!("golden/old_released.json");

#[test]
fn records_older_versions_wrote_parse_as_they_did() {
    let old: VolumeRecord = serde_json::from_str(OLD_SINGLE).expect("an old record parses");
    let want = VolumeRecord {
        name: "vm0".into(),
        node: 1,
        state: VolumeState::Ready,
        id: "0a".into(),
        size_bytes: 4096,
        created_unix: 1_700_000_000,
        origin: None,
        snapshots: vec![SnapshotRecord::plain("s", 4096, 1_700_000_001)],
        replicas: 1,
        min_replicas: 1,
        components: Vec::new(),
        epoch: 0,
        released: None,
        lost_at: None,
        access: AccessList::default(),
    };
    assert_eq!(old, want);
    assert!(!old.replicated());
    let old: VolumeRecord = serde_json::from_str(OLD_RELEASED).expect("an old hand-over parses");
    let released = old.released.as_ref().expect("released");
    assert_eq!(
        released,
        &Released {
            epoch: 4,
            level: Vec::new(),
            stale: vec![HandedBitmap { node: 0, id: 7, runs: vec![[1, 3]] }],
        }
    );
    assert_eq!(
        old.components,
        vec![component(1, 7, CopyState::Active, None), component(2, 7, CopyState::Stale, None)]
    );
    // Written back today, the old fields are gone and the new ones there.
    assert_eq!(
        serde_json::to_string(&old).unwrap(),
        include_str!("golden/old_released_rewritten.json")
    );
}
