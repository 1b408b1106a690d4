//! The engine against a model under crashes: random writes (1–3 blocks, two volumes),
//! trims, zeroes, flushes, reads and SimFile crashes with reopen. Every read returns what
//! the model says; after a crash every block holds its flushed value or a later write's.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use strata_io::sim::{SimFile, SimRng};

/// A block's content names its write: (write id, block index); `None` reads as zeroes.
type Value = Option<(u64, u64)>;

fn block(value: Value) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_BYTES];
    if let Some((id, index)) = value {
        for (i, chunk) in b.chunks_mut(16).enumerate() {
            chunk[..8].copy_from_slice(&id.to_le_bytes());
            chunk[8..16].copy_from_slice(&(index ^ i as u64).to_le_bytes());
        }
    }
    b
}

#[derive(Clone, Debug)]
enum Op {
    Write { volume: u64, lba: u64, blocks: u64 },
    Trim { volume: u64, lba: u64, blocks: u64 },
    Zero { volume: u64, lba: u64, blocks: u64 },
    Flush,
    Crash { seed: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    let place = (0u64..2, 0u64..30, 1u64..4);
    prop_oneof![
        8 => place.clone().prop_map(|(volume, lba, blocks)| Op::Write { volume, lba, blocks }),
        1 => place.clone().prop_map(|(volume, lba, blocks)| Op::Trim { volume, lba, blocks }),
        1 => place.prop_map(|(volume, lba, blocks)| Op::Zero { volume, lba, blocks }),
        2 => Just(Op::Flush),
        1 => any::<u64>().prop_map(|seed| Op::Crash { seed }),
    ]
}

const BLOCKS: u64 = 33;

fn read_all(engine: &Engine<SimFile>, volume: u64) -> Vec<u8> {
    let mut buf = vec![0u8; BLOCKS as usize * BLOCK_BYTES];
    engine.read(volume, 0, &mut buf).unwrap();
    buf
}

/// Asserts that every block of `view` reads as `expected(lba)` says.
fn assert_reads(engine: &Engine<SimFile>, view: u64, expected: impl Fn(u64) -> Value) {
    let data = read_all(engine, view);
    for lba in 0..BLOCKS {
        let want = block(expected(lba));
        assert!(
            data[lba as usize * BLOCK_BYTES..][..BLOCK_BYTES] == want[..],
            "view {view} block {lba} differs from the model"
        );
    }
}

fn run(ops: Vec<Op>) {
    let mut engine = Engine::create(SimFile::new());
    // Per (volume, block): the value now, the durable one, and the ones since the flush.
    let mut now: HashMap<(u64, u64), Value> = HashMap::new();
    let mut durable: HashMap<(u64, u64), Value> = HashMap::new();
    let mut since_flush: HashMap<(u64, u64), Vec<Value>> = HashMap::new();
    let mut next_id = 1;
    for op in ops {
        let mut set = |volume: u64, lba: u64, blocks: u64, f: &dyn Fn(u64) -> Value| {
            for i in 0..blocks {
                now.insert((volume, lba + i), f(i));
                since_flush.entry((volume, lba + i)).or_default().push(f(i));
            }
        };
        match op {
            Op::Write { volume, lba, blocks } => {
                let id = next_id;
                next_id += 1;
                let data: Vec<u8> = (0..blocks).flat_map(|i| block(Some((id, i)))).collect();
                engine.write(volume, lba, &data).unwrap();
                set(volume, lba, blocks, &|i| Some((id, i)));
            }
            Op::Trim { volume, lba, blocks } => {
                engine.trim(volume, lba, blocks).unwrap();
                set(volume, lba, blocks, &|_| None);
            }
            Op::Zero { volume, lba, blocks } => {
                engine.write_zeroes(volume, lba, blocks).unwrap();
                set(volume, lba, blocks, &|_| None);
            }
            Op::Flush => {
                engine.flush().unwrap();
                durable.clone_from(&now);
                since_flush.clear();
            }
            Op::Crash { seed } => {
                let file = engine.into_file();
                file.crash(&mut SimRng::new(seed));
                engine = Engine::open(file).unwrap();
                for volume in 0..2 {
                    let data = read_all(&engine, volume);
                    for lba in 0..BLOCKS {
                        let key = (volume, lba);
                        let got = &data[lba as usize * BLOCK_BYTES..][..BLOCK_BYTES];
                        let flushed = durable.get(&key).copied().unwrap_or(None);
                        let candidates = since_flush.get(&key).cloned().unwrap_or_default();
                        let value = std::iter::once(flushed)
                            .chain(candidates)
                            .find(|v| block(*v) == got)
                            .unwrap_or_else(|| panic!("block {key:?} holds unknown data"));
                        now.insert(key, value);
                    }
                }
                durable.clone_from(&now);
                since_flush.clear();
            }
        }
        engine.validate().unwrap();
        for volume in 0..2 {
            assert_reads(&engine, volume, |lba| now.get(&(volume, lba)).copied().unwrap_or(None));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_the_model_across_crashes(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops);
    }
}

#[test]
fn a_flipped_bit_in_a_block_is_an_error_never_wrong_data() {
    let mut engine = Engine::create(SimFile::new());
    engine.write(7, 3, &block(Some((1, 0)))).unwrap();
    engine.flush().unwrap();
    let file = engine.into_file();
    // The data slot follows the two journal slots at 0 and 1.
    let mut b = vec![0u8; BLOCK_BYTES];
    file.read_at(&mut b, 2 * BLOCK_BYTES as u64).unwrap();
    assert_eq!(b, block(Some((1, 0))));
    b[100] ^= 4;
    file.write_at(&b, 2 * BLOCK_BYTES as u64).unwrap();
    file.sync().unwrap();
    // At reopen the record's data no longer checks out, so the write is not replayed...
    let engine = Engine::open(file).unwrap();
    let mut buf = vec![1u8; BLOCK_BYTES];
    engine.read(7, 3, &mut buf).unwrap();
    assert_eq!(buf, vec![0u8; BLOCK_BYTES], "the damaged write was dropped at replay");
    // ...and a block damaged while open is an error, not wrong data.
    let mut engine = engine;
    engine.write(7, 4, &block(Some((2, 0)))).unwrap();
    let file = engine.into_file();
    let (log, records) = Log::open(file).unwrap();
    let Some(Record::Write { pba, .. }) = records.last() else { panic!("{records:?}") };
    let file = log.into_file();
    let at = u64::from(*pba) * BLOCK_BYTES as u64;
    let mut b = vec![0u8; BLOCK_BYTES];
    file.read_at(&mut b, at).unwrap();
    let engine = Engine::open(file).unwrap();
    let mut damaged = b.clone();
    damaged[0] ^= 1;
    engine.log.file().write_at(&damaged, at).unwrap();
    let mut buf = vec![0u8; BLOCK_BYTES];
    let err = engine.read(7, 4, &mut buf).unwrap_err();
    assert!(matches!(err, EngineError::Corrupt { volume: 7, lba: 4, .. }), "{err}");
}

#[test]
fn unaligned_io_is_refused() {
    let mut engine = Engine::create(SimFile::new());
    assert!(matches!(engine.write(1, 0, &[0u8; 100]), Err(EngineError::Unaligned)));
    assert!(matches!(engine.read(1, 0, &mut [0u8; 4097]), Err(EngineError::Unaligned)));
    engine.validate().unwrap();
}

#[derive(Clone, Debug)]
enum SnapOp {
    Write { view: usize, lba: u64, blocks: u64 },
    Trim { view: usize, lba: u64, blocks: u64 },
    Snapshot { view: usize },
    Clone { view: usize },
    Delete { view: usize },
    FlushCrash { seed: u64 },
}

fn snap_op() -> impl Strategy<Value = SnapOp> {
    prop_oneof![
        8 => (any::<usize>(), 0u64..30, 1u64..4)
            .prop_map(|(view, lba, blocks)| SnapOp::Write { view, lba, blocks }),
        1 => (any::<usize>(), 0u64..30, 1u64..4)
            .prop_map(|(view, lba, blocks)| SnapOp::Trim { view, lba, blocks }),
        2 => any::<usize>().prop_map(|view| SnapOp::Snapshot { view }),
        1 => any::<usize>().prop_map(|view| SnapOp::Clone { view }),
        2 => any::<usize>().prop_map(|view| SnapOp::Delete { view }),
        1 => any::<u64>().prop_map(|seed| SnapOp::FlushCrash { seed }),
    ]
}

/// Volumes and snapshots against a model: reads of every view match, snapshots never
/// change, deleting one removes exactly the VBAs no other view holds, refusals change
/// nothing, and all of it replays identically after a crash.
fn run_snapshots(ops: Vec<SnapOp>) {
    let mut engine = Engine::create(SimFile::new());
    engine.write(0, 0, &block(Some((1, 0)))).unwrap();
    let mut model: BTreeMap<u64, (bool, HashMap<u64, Value>)> = BTreeMap::new();
    model.insert(0, (true, HashMap::from([(0, Some((1, 0)))])));
    let mut clones: HashMap<u64, u32> = HashMap::new();
    let mut next_id = 2;
    let mut next_view = 1;
    for op in ops {
        let ids: Vec<u64> = model.keys().copied().collect();
        let kinds: HashMap<u64, bool> = model.iter().map(|(id, (w, _))| (*id, *w)).collect();
        let pick = |i: usize, writable: bool| {
            let matching: Vec<u64> =
                ids.iter().copied().filter(|id| kinds[id] == writable).collect();
            (!matching.is_empty()).then(|| matching[i % matching.len()])
        };
        match op {
            SnapOp::Write { view, lba, blocks } => {
                let Some(id) = pick(view, true) else { continue };
                let w = next_id;
                next_id += 1;
                let data: Vec<u8> = (0..blocks).flat_map(|i| block(Some((w, i)))).collect();
                engine.write(id, lba, &data).unwrap();
                let m = &mut model.get_mut(&id).unwrap().1;
                for i in 0..blocks {
                    m.insert(lba + i, Some((w, i)));
                }
                if let Some(snap) = pick(view, false) {
                    let err = engine.write(snap, lba, &data).unwrap_err();
                    assert!(matches!(err, EngineError::ReadOnly(s) if s == snap));
                }
            }
            SnapOp::Trim { view, lba, blocks } => {
                let Some(id) = pick(view, true) else { continue };
                engine.trim(id, lba, blocks).unwrap();
                let m = &mut model.get_mut(&id).unwrap().1;
                for i in 0..blocks {
                    m.insert(lba + i, None);
                }
            }
            SnapOp::Snapshot { view } => {
                let Some(id) = pick(view, true) else { continue };
                let s = 1000 + next_view;
                next_view += 1;
                engine.snapshot(id, s).unwrap();
                let contents = model[&id].1.clone();
                model.insert(s, (false, contents));
                assert!(matches!(engine.snapshot(id, s), Err(EngineError::Exists(_))));
            }
            SnapOp::Clone { view } => {
                let Some(s) = pick(view, false) else { continue };
                let c = next_view;
                next_view += 1;
                engine.clone_snapshot(s, c).unwrap();
                let contents = model[&s].1.clone();
                model.insert(c, (true, contents));
                *clones.entry(s).or_default() += 1;
            }
            SnapOp::Delete { view } => {
                let Some(s) = pick(view, false) else { continue };
                if clones.get(&s).copied().unwrap_or(0) > 0 {
                    let before = engine.vba_map_len();
                    let err = engine.delete_snapshot(s).unwrap_err();
                    assert!(matches!(err, EngineError::HasClones { .. }), "{err}");
                    assert_eq!(engine.vba_map_len(), before, "a refused delete changes nothing");
                    continue;
                }
                let others: std::collections::HashSet<u64> =
                    ids.iter().filter(|id| **id != s).flat_map(|id| engine.vbas_of(*id)).collect();
                let exclusive: Vec<u64> =
                    engine.vbas_of(s).into_iter().filter(|v| !others.contains(v)).collect();
                engine.delete_snapshot(s).unwrap();
                assert!(exclusive.iter().all(|v| !engine.has_vba(*v)), "exclusive VBAs remain");
                model.remove(&s);
                assert!(matches!(engine.read(s, 0, &mut [0u8; BLOCK_BYTES]), Ok(())));
            }
            SnapOp::FlushCrash { seed } => {
                engine.flush().unwrap();
                let file = engine.into_file();
                file.crash(&mut SimRng::new(seed));
                engine = Engine::open(file).unwrap();
            }
        }
        engine.validate().unwrap();
        for (id, (_, blocks)) in &model {
            assert_reads(&engine, *id, |lba| blocks.get(&lba).copied().unwrap_or(None));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn snapshots_clones_and_deletes_match_the_model(
        ops in proptest::collection::vec(snap_op(), 1..120),
    ) {
        run_snapshots(ops);
    }
}

/// Regression: a volume created by a write whose data did not survive (never flushed, or
/// damaged) must not break the replay of a later record that names the volume.
#[test]
fn replay_survives_a_lost_write_that_created_a_volume() {
    let mut engine = Engine::create(SimFile::new());
    engine.write(5, 0, &block(Some((1, 0)))).unwrap();
    engine.snapshot(5, 6).unwrap();
    engine.flush().unwrap();
    let file = engine.into_file();
    // Damage the only data block (slot 2, after the journal slots 0 and 1).
    let mut b = vec![0u8; BLOCK_BYTES];
    file.read_at(&mut b, 2 * BLOCK_BYTES as u64).unwrap();
    b[9] ^= 0x40;
    file.write_at(&b, 2 * BLOCK_BYTES as u64).unwrap();
    let engine = Engine::open(file).unwrap();
    engine.validate().unwrap();
    for view in [5, 6] {
        let mut buf = vec![1u8; BLOCK_BYTES];
        engine.read(view, 0, &mut buf).unwrap();
        assert_eq!(buf, vec![0u8; BLOCK_BYTES], "view {view}");
    }
}
