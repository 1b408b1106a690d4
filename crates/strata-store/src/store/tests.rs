//! The store behind the `BlockVolume` traits: byte-granular I/O over 4 KiB blocks,
//! extents, reopen, snapshots through views.

use super::*;

fn store() -> (tempfile::TempDir, LogStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[test]
fn unaligned_writes_keep_their_neighbours() {
    let (_dir, store) = store();
    let v = store.create_volume(VolumeId(1), 64 * 1024).unwrap();
    let mut model = vec![0u8; 64 * 1024];
    for (offset, len, seed) in
        [(0, 8192, 1u8), (100, 10, 2), (4000, 200, 3), (5000, 9000, 4), (65535, 1, 5)]
    {
        let data = pattern(len, seed);
        v.write_at(&data, offset as u64).unwrap();
        model[offset..offset + len].copy_from_slice(&data);
        let mut back = vec![0u8; model.len()];
        v.read_at(&mut back, 0).unwrap();
        assert!(back == model, "after writing {len} bytes at {offset}");
        let mut part = vec![0u8; 77];
        v.read_at(&mut part, 4050).unwrap();
        assert_eq!(part, model[4050..4127]);
    }
}

#[test]
fn zeroes_and_trims_are_exact_and_show_in_extents() {
    let (_dir, store) = store();
    let v = store.create_volume(VolumeId(1), 64 * 1024).unwrap();
    v.write_at(&pattern(64 * 1024, 9), 0).unwrap();
    v.trim(8192, 8192).unwrap();
    v.write_zeroes(20480, 4096, ZeroMode::Allocate).unwrap();
    v.trim(30000, 100).unwrap(); // inside one block: written as zero bytes
    let mut back = vec![0u8; 64 * 1024];
    v.read_at(&mut back, 0).unwrap();
    let mut model = pattern(64 * 1024, 9);
    model[8192..16384].fill(0);
    model[20480..24576].fill(0);
    model[30000..30100].fill(0);
    assert!(back == model);
    let extents = v.extents(0, 64 * 1024, 100).unwrap();
    let kinds: Vec<(u64, bool, bool)> =
        extents.iter().map(|e| (e.length, e.hole, e.zero)).collect();
    assert_eq!(
        kinds,
        vec![
            (8192, false, false),
            (8192, true, true),
            (4096, false, false),
            (4096, false, true),
            (40960, false, false)
        ]
    );
    // A range inside one extent, unaligned.
    let e = v.extents(9000, 10, 1).unwrap();
    assert_eq!(e, vec![Extent { length: 10, hole: true, zero: true }]);
}

#[test]
fn out_of_range_and_snapshot_writes_are_refused_and_change_nothing() {
    let (_dir, store) = store();
    let v = store.create_volume(VolumeId(1), 8192).unwrap();
    v.write_at(&[7u8; 8192], 0).unwrap();
    assert!(matches!(v.write_at(&[1u8; 2], 8191), Err(StoreError::OutOfRange { .. })));
    assert!(matches!(v.trim(4096, 8192), Err(StoreError::OutOfRange { .. })));
    store.snapshot(1, 2).unwrap();
    let snap = store.view(2).unwrap();
    assert!(matches!(snap.write_at(&[1u8; 4096], 0), Err(StoreError::ReadOnly)));
    let mut back = vec![0u8; 8192];
    v.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|b| *b == 7));
}

#[test]
fn reopen_keeps_volumes_sizes_snapshots_and_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        let store = LogStore::open(&path).unwrap();
        let v = store.create_volume(VolumeId(3), 1 << 20).unwrap();
        v.write_at(&pattern(12345, 1), 777).unwrap();
        store.snapshot(3, 4).unwrap();
        v.write_at(&pattern(100, 2), 777).unwrap();
        v.resize(2 << 20).unwrap();
        v.sync().unwrap();
    }
    let store = LogStore::open(&path).unwrap();
    assert_eq!(store.volume_ids().unwrap(), vec![VolumeId(3)]);
    let v = store.open_volume(VolumeId(3)).unwrap();
    assert_eq!(v.size_bytes(), 2 << 20);
    let mut back = vec![0u8; 12345];
    v.read_at(&mut back, 777).unwrap();
    let mut model = pattern(12345, 1);
    model[..100].copy_from_slice(&pattern(100, 2));
    assert!(back == model);
    store.view(4).unwrap().read_at(&mut back, 777).unwrap();
    assert!(back == pattern(12345, 1));
    assert!(store.check(true).is_empty());
}

#[test]
fn maintenance_reclaims_overwritten_space_and_reopens_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let segment_bytes = crate::log::SEGMENT_SLOTS * BLOCK;
    {
        let store = LogStore::open(&path).unwrap();
        let v = store.create_volume(VolumeId(1), 32 * BLOCK).unwrap();
        store.snapshot(1, 2).unwrap();
        for round in 0..40u8 {
            v.write_at(&pattern(32 * BLOCK_BYTES, round), 0).unwrap();
            store.maintain(usize::MAX, false).unwrap();
        }
        store.maintain(usize::MAX, true).unwrap();
        store.maintain(usize::MAX, true).unwrap();
        // 40 rounds wrote 1280 blocks; 64 are live (the volume and its snapshot).
        let in_use = store.log_bytes() / segment_bytes;
        assert!(in_use <= 12, "{in_use} segments in use");
        let stats = store.stats();
        assert_eq!(stats.segments, in_use, "{stats:?}");
        assert!(stats.cleaned_segments > 0 && stats.cleaned_bytes > 0, "{stats:?}");
        assert!(stats.checkpoints >= 2, "{stats:?}");
        assert!(store.check(true).is_empty(), "{:?}", store.check(true));
        v.write_at(&pattern(100, 77), 5).unwrap();
        v.sync().unwrap();
    }
    let store = LogStore::open(&path).unwrap();
    assert!(path.join(CHECKPOINT_FILE).exists());
    let v = store.open_volume(VolumeId(1)).unwrap();
    let mut back = vec![0u8; 32 * BLOCK_BYTES];
    v.read_at(&mut back, 0).unwrap();
    let mut model = pattern(32 * BLOCK_BYTES, 39);
    model[5..105].copy_from_slice(&pattern(100, 77));
    assert!(back == model);
    store.view(2).unwrap().read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|b| *b == 0), "the snapshot was taken of an empty volume");
    assert!(store.check(true).is_empty());
}

#[test]
fn stats_count_journal_syncs_and_their_batches() {
    let (_dir, store) = store();
    let v = store.create_volume(VolumeId(1), 64 * BLOCK).unwrap();
    let before = store.stats();
    v.write_at(&pattern(16 * BLOCK_BYTES, 1), 0).unwrap();
    v.sync().unwrap();
    let after = store.stats();
    assert_eq!(after.journal_syncs, before.journal_syncs + 1);
    assert!(after.journal_synced_bytes >= before.journal_synced_bytes + 16 * BLOCK);
    assert_eq!(after.journal_batch_blocks.iter().sum::<u64>(), after.journal_syncs);
    assert!(after.journal_sync_seconds > 0.0, "{after:?}");
    assert_eq!(after.live_bytes, 16 * BLOCK);
}

#[test]
fn a_damaged_checkpoint_file_stops_the_open_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    {
        let store = LogStore::open(&path).unwrap();
        store.create_volume(VolumeId(1), 8192).unwrap();
        store.checkpoint().unwrap();
    }
    let cp = path.join(CHECKPOINT_FILE);
    let mut bytes = std::fs::read(&cp).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&cp, &bytes).unwrap();
    let err = LogStore::open(&path).err().expect("refused");
    assert!(err.to_string().contains("checkpoint is unusable"), "{err}");
    assert_eq!(std::fs::read(&cp).unwrap(), bytes, "left as it was");
}

#[test]
fn a_deleted_snapshots_space_is_followed_until_its_segments_are_freed() {
    let (_dir, store) = store();
    // (Unit tests use 16-block segments, so every segment is small enough to clean.)
    let segment_bytes = crate::log::SEGMENT_SLOTS * BLOCK;
    // Eight segments' worth written, snapshotted, then overwritten: the snapshot holds
    // the first copy alone, in segments of its own (but for their edges).
    let size = 8 * segment_bytes;
    let v = store.create_volume(VolumeId(1), size).unwrap();
    let chunk = segment_bytes as usize;
    for at in (0..size).step_by(chunk) {
        v.write_at(&pattern(chunk, 1), at).unwrap();
    }
    store.snapshot(1, 2).unwrap();
    for at in (0..size).step_by(chunk) {
        v.write_at(&pattern(chunk, 2), at).unwrap();
    }
    // A small snapshot whose blocks sit among live ones.
    store.snapshot(1, 3).unwrap();
    v.write_at(&pattern(4 * BLOCK_BYTES, 3), 0).unwrap();
    v.sync().unwrap();
    store.delete_snapshot(2).unwrap();
    store.delete_snapshot(3).unwrap();
    let r = store.reclaims();
    assert_eq!(r.len(), 2, "{r:?}");
    assert_eq!((r[0].snapshot, r[0].freed_bytes, r[0].waiting_bytes), (2, size, size));
    assert_eq!((r[1].snapshot, r[1].freed_bytes, r[1].waiting_bytes), (3, 4 * BLOCK, 4 * BLOCK));
    store.maintain(usize::MAX, true).unwrap();
    store.maintain(usize::MAX, true).unwrap();
    // Freed (emptied, or cleaned and emptied) but for the segments the log writes in.
    for r in store.reclaims() {
        assert_eq!(r.waiting_bytes, r.held_bytes, "{r:?}");
        assert!(r.waiting_bytes <= 4 * segment_bytes, "{r:?}");
    }
    assert!(store.reclaims()[0].waiting_bytes < size / 2);
    assert!(store.check(true).is_empty());
}

#[test]
fn the_oldest_deletes_are_forgotten_beyond_the_limit() {
    let (_dir, store) = store();
    let v = store.create_volume(VolumeId(1), 1 << 20).unwrap();
    for id in 0..RECLAIMS_TRACKED as u64 + 3 {
        v.write_at(&pattern(4096, id as u8), 0).unwrap();
        store.snapshot(1, 100 + id).unwrap();
        store.delete_snapshot(100 + id).unwrap();
    }
    let r = store.reclaims();
    assert_eq!(r.len(), RECLAIMS_TRACKED);
    assert_eq!(r[0].snapshot, 103, "the three oldest are gone");
}

/// Reads all of a volume.
fn read_all(v: &dyn BlockVolume) -> Vec<u8> {
    let mut all = vec![0u8; v.size_bytes() as usize];
    v.read_at(&mut all, 0).unwrap();
    all
}

/// Writes, owning their bytes: (offset, data).
type Owned = Vec<(u64, Vec<u8>)>;

/// Writes of several blocks, some overlapping, enough of them to fill several of the
/// tests' 16-slot segments; then the same with some not whole blocks.
fn batch_data() -> (Owned, Owned) {
    let aligned = (0..40u64)
        .map(|i| ((i * 7 % 30) * 4096, pattern(4096 * (1 + i as usize % 5), i as u8)))
        .chain([(0, Vec::new()), (4096, pattern(20 * 4096, 99))])
        .collect();
    let unaligned = (0..20u64)
        .map(|i| (i * 5000 % 100_000, pattern(1 + (i as usize * 3001) % 9000, 100 + i as u8)))
        .chain([(8192, pattern(8192, 7))])
        .collect();
    (aligned, unaligned)
}

fn as_writes(data: &Owned) -> Vec<(u64, &[u8])> {
    data.iter().map(|(offset, d)| (*offset, &d[..])).collect()
}

#[test]
fn a_batch_reads_back_as_the_writes_one_by_one_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let (aligned, unaligned) = batch_data();
    let mut want = Vec::new();
    {
        let store = LogStore::open(&path).unwrap();
        let batched = store.create_volume(VolumeId(1), 160 * 1024).unwrap();
        let single = store.create_volume(VolumeId(2), 160 * 1024).unwrap();
        for data in [&aligned, &unaligned] {
            let allocated = store.shared.read().log_allocated();
            batched.write_many(&as_writes(data)).unwrap();
            for (offset, d) in data {
                single.write_at(d, *offset).unwrap();
            }
            want = read_all(&*single);
            assert!(read_all(&*batched) == want, "a batch and the writes one by one differ");
            assert!(store.shared.read().log_allocated() > allocated + 16, "crossed a segment");
        }
        assert!(store.check(true).is_empty());
    }
    let store = LogStore::open(&path).unwrap();
    let batched = store.open_volume(VolumeId(1)).unwrap();
    assert!(read_all(&*batched) == want, "reopened, the batch is there");
}

#[test]
fn a_batch_with_one_range_past_the_end_writes_nothing() {
    let (_dir, store) = store();
    let v = store.create_volume(VolumeId(1), 64 * 1024).unwrap();
    v.write_at(&pattern(64 * 1024, 1), 0).unwrap();
    let before = (read_all(&*v), store.shared.read().log_allocated());
    let (good, bad) = (pattern(8192, 2), pattern(4096, 3));
    for writes in [
        vec![(0, &good[..]), (62 * 1024, &bad[..]), (8192, &good[..])],
        vec![(0, &good[..]), (61 * 1024, &bad[..])],
        vec![(100, &good[..]), (u64::MAX, &bad[..1])],
    ] {
        assert!(matches!(v.write_many(&writes), Err(StoreError::OutOfRange { .. })));
        assert!(matches!(
            v.try_write_many_nowait(&writes),
            Err(StoreError::OutOfRange { .. }) | Ok(false)
        ));
        assert_eq!((read_all(&*v), store.shared.read().log_allocated()), before);
    }
    store.snapshot(1, 2).unwrap();
    let snap = store.view(2).unwrap();
    assert!(matches!(snap.write_many(&[(0, &good[..])]), Err(StoreError::ReadOnly)));
}

#[test]
fn a_batch_is_done_inline_only_when_whole_blocks_small_and_the_lock_free() {
    let (_dir, store) = store();
    let v = store.create_volume(VolumeId(1), 16 << 20).unwrap();
    let (block, big) = (pattern(4096, 1), pattern(INLINE_WRITE_BYTES_MAX + 4096, 2));
    let many: Vec<(u64, &[u8])> = (0..5).map(|i| (i << 20, &big[..1 << 20])).collect();
    for refused in [
        vec![(0, &block[..]), (1, &block[..])],
        vec![(0, &block[..]), (8192, &block[..100])],
        vec![(0, &block[..]), (8192, &[][..])],
        vec![(0, &big[..])],
        many,
    ] {
        assert!(!v.try_write_many_nowait(&refused).unwrap(), "not inline");
    }
    assert!(read_all(&*v).iter().all(|&b| b == 0), "and nothing written");
    let writes = [(4096, &block[..]), (0, &big[..8192])];
    {
        let _held = store.shared.write().unwrap();
        assert!(!v.try_write_many_nowait(&writes).unwrap(), "the lock is held");
    }
    assert!(v.try_write_many_nowait(&writes).unwrap());
    let mut back = vec![0u8; 8192];
    v.read_at(&mut back, 0).unwrap();
    assert_eq!(back, big[..8192], "the later write wins");
    store.shared.failed.store(true, Ordering::Release);
    assert!(matches!(v.try_write_many_nowait(&writes), Err(StoreError::Failed)));
    assert!(matches!(v.write_many(&writes), Err(StoreError::Failed)));
}

/// A small tmpfs (root only: the test says so and passes elsewhere), unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .is_ok_and(|o| o.status.success());
        if !mounted {
            eprintln!("cannot mount a tmpfs here (not root?): skipped");
            return None;
        }
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// One volume fills the file system: its writes get `NoSpace` before the file system is
/// full (the reserve stays free), the store does not turn failed, the other volume still
/// reads, a trim frees space and writes resume without a reopen; the store reopens.
#[test]
fn a_volume_filling_the_disk_gets_enospc_and_the_store_serves_on() {
    let Some(fs) = Tmpfs::mount("48m") else { return };
    let dir = fs.0.path().join("store");
    let store = LogStore::open(&dir).unwrap();
    let reserve = store.space().reserve_bytes;
    assert_eq!(reserve, 24 << 20, "64 MiB at least, half of a small file system at most");
    let a = store.create_volume(VolumeId(1), 64 << 20).unwrap();
    let b = store.create_volume(VolumeId(2), 1 << 20).unwrap();
    b.write_at(&pattern(1 << 20, 7), 0).unwrap();
    let chunk = pattern(1 << 20, 3);
    let mut written = 0;
    // Fill: 1 MiB writes, then 4 KiB ones once they no longer fit.
    for size in [1 << 20, 4096] {
        let refused = loop {
            match a.write_at(&chunk[..size], written) {
                Ok(()) => written += size as u64,
                Err(e) => break e,
            }
            assert!(written < 64 << 20, "the file system filled up");
        };
        assert!(matches!(refused, StoreError::NoSpace), "{refused}");
    }
    let space = store.space();
    assert!(space.full && space.nearly_full && space.refused_writes == 2, "{space:?}");
    assert!(space.free_bytes >= reserve - (1 << 20), "the reserve stays free: {space:?}");
    // A refused write changed nothing, and the store is not failed: reads, syncs, small
    // writes refused the same way, snapshots taken.
    assert_eq!(read_all(&*b), pattern(1 << 20, 7));
    store.sync().unwrap();
    assert!(matches!(b.write_at(&[1; 4096], 0), Err(StoreError::NoSpace)));
    let mut back = vec![0u8; 4096];
    a.read_at(&mut back, written).unwrap();
    assert_eq!(back, vec![0; 4096], "nothing of the refused write");
    store.snapshot(2, 3).unwrap();
    // A trim of the full volume frees its space: writes resume without a reopen.
    a.trim(0, 64 << 20).unwrap();
    let mut waited = 0;
    while b.write_at(&[1; 4096], 0).is_err() {
        store.maintain(usize::MAX, false).unwrap();
        waited += 1;
        assert!(waited < 20, "space came back: {:?}", store.space());
    }
    assert!(!store.space().full);
    a.write_at(&chunk, 0).unwrap();
    // Full again, then the volume removed: its segments, its own alone, are freed by a
    // checkpoint without any block to move.
    let mut at = 0;
    while a.write_at(&chunk, at).is_ok() {
        at = (at + (1 << 20)) % (64 << 20);
    }
    drop(a);
    store.remove(1).unwrap();
    let mut waited = 0;
    while b.write_at(&chunk, 0).is_err() {
        store.maintain(usize::MAX, false).unwrap();
        waited += 1;
        assert!(waited < 20, "space came back: {:?}", store.space());
    }
    let a = store.create_volume(VolumeId(1), 64 << 20).unwrap();
    a.write_at(&chunk, 0).unwrap();
    drop((a, b));
    drop(store);
    let store = LogStore::open(&dir).unwrap();
    assert_eq!(read_all(&*store.open_volume(VolumeId(1)).unwrap())[..1 << 20], chunk[..]);
}
