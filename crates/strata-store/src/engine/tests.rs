//! The engine against a model under crashes: random writes (1–3 blocks, two volumes),
//! trims, zeroes, flushes, reads and SimFile crashes with reopen. Every read returns what
//! the model says; after a crash every block holds its flushed value or a later write's.

use super::*;
use proptest::prelude::*;
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
            let data = read_all(&engine, volume);
            for lba in 0..BLOCKS {
                let want = block(now.get(&(volume, lba)).copied().unwrap_or(None));
                assert!(
                    data[lba as usize * BLOCK_BYTES..][..BLOCK_BYTES] == want[..],
                    "volume {volume} block {lba} differs from the model"
                );
            }
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
