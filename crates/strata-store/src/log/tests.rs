//! The log under crashes: random writes, batches of writes, trims and flushes on a
//! `SimFile`, crashes at
//! random points (unsynced writes kept, dropped or torn), replay after each. Every block
//! flushed before a crash is there; every other block reads as the flushed value or as one
//! of the writes made after that flush; replayed data always matches its checksum.

use super::*;
use proptest::prelude::*;
use std::collections::HashMap;
use strata_io::sim::{SimFile, SimRng};

/// What a block holds: (write id, block index within the write), or a hole.
type Value = Option<(u64, u64)>;

fn block(id: u64, index: u64) -> Vec<u8> {
    let mut b = vec![0u8; SLOT_BYTES];
    for (i, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&id.to_le_bytes());
        chunk[8..16].copy_from_slice(&(index ^ i as u64).to_le_bytes());
    }
    b
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        lba: u64,
        blocks: u64,
    },
    /// `write_many` of these (lba, blocks): they may overlap, and span segments.
    WriteMany {
        writes: Vec<(u64, u64)>,
    },
    Trim {
        lba: u64,
        blocks: u64,
    },
    Flush,
    Crash {
        seed: u64,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0u64..40, 1u64..4).prop_map(|(lba, blocks)| Op::Write { lba, blocks }),
        2 => proptest::collection::vec((0u64..40, 1u64..4), 1..40)
            .prop_map(|writes| Op::WriteMany { writes }),
        1 => (0u64..40, 1u64..4).prop_map(|(lba, blocks)| Op::Trim { lba, blocks }),
        2 => Just(Op::Flush),
        1 => any::<u64>().prop_map(|seed| Op::Crash { seed }),
    ]
}

/// Applies replayed records to a block map, checking every Write's data.
fn state_of(log: &Log<SimFile>, records: &[Record]) -> HashMap<u64, Value> {
    let mut state = HashMap::new();
    for r in records {
        match r {
            Record::Write { lba, vba, pba, crcs, .. } => {
                for (i, crc) in crcs.iter().enumerate() {
                    let mut buf = vec![0u8; SLOT_BYTES];
                    log.read_block(u64::from(*pba) + i as u64, *crc, &mut buf).unwrap();
                    // The VBA encodes the write id; the data must be that write's block.
                    assert_eq!(buf, block(*vba, i as u64), "replayed data differs");
                    state.insert(lba + i as u64, Some((*vba, i as u64)));
                }
            }
            Record::Trim { lba, blocks, .. } | Record::Zero { lba, blocks, .. } => {
                for i in 0..*blocks {
                    state.insert(lba + i, None);
                }
            }
            _ => {
                unreachable!("this test logs only writes, trims and zeroes")
            }
        }
    }
    state
}

fn run(ops: Vec<Op>) {
    let mut log = Log::create(SimFile::new());
    // What survives any crash, and what may (writes since the last flush), per block.
    let mut durable: HashMap<u64, Value> = HashMap::new();
    let mut maybe: HashMap<u64, Vec<Value>> = HashMap::new();
    let mut next_id = 1;
    for op in ops {
        match op {
            Op::Write { lba, blocks } => {
                let id = next_id;
                next_id += 1;
                let data: Vec<u8> = (0..blocks).flat_map(|i| block(id, i)).collect();
                log.write(1, lba, id, &data).unwrap();
                for i in 0..blocks {
                    maybe.entry(lba + i).or_default().push(Some((id, i)));
                }
            }
            Op::WriteMany { writes } => {
                let first = next_id;
                next_id += writes.len() as u64;
                let data: Vec<Vec<u8>> = (first..next_id)
                    .zip(&writes)
                    .map(|(id, (_, blocks))| (0..*blocks).flat_map(|i| block(id, i)).collect())
                    .collect();
                let batch: Vec<LogWrite> = (first..)
                    .zip(writes.iter().zip(&data))
                    .map(|(id, ((lba, _), data))| LogWrite { volume: 1, lba: *lba, vba: id, data })
                    .collect();
                let records = log.write_many(&batch).unwrap();
                assert_eq!(records.len(), writes.len());
                for (id, (lba, blocks)) in (first..).zip(writes) {
                    for i in 0..blocks {
                        maybe.entry(lba + i).or_default().push(Some((id, i)));
                    }
                }
            }
            Op::Trim { lba, blocks } => {
                log.append(Record::Trim { volume: 1, lba, blocks }).unwrap();
                for i in 0..blocks {
                    maybe.entry(lba + i).or_default().push(None);
                }
            }
            Op::Flush => {
                log.flush().unwrap();
                for (lba, values) in maybe.drain() {
                    durable.insert(lba, *values.last().expect("non-empty"));
                }
            }
            Op::Crash { seed } => {
                let file = std::mem::replace(&mut log, Log::create(SimFile::new())).file;
                file.crash(&mut SimRng::new(seed));
                let (mut reopened, records) = Log::open(file).unwrap();
                reopened.start_run().unwrap();
                let state = state_of(&reopened, &records);
                for lba in 0..45 {
                    let got = state.get(&lba).copied().unwrap_or(None);
                    let flushed = durable.get(&lba).copied().unwrap_or(None);
                    let allowed = got == flushed
                        || maybe.get(&lba).is_some_and(|values| values.contains(&got));
                    assert!(allowed, "block {lba}: got {got:?}, flushed {flushed:?}");
                }
                // After the crash, what is there is what the disk holds.
                durable =
                    (0..45).map(|lba| (lba, state.get(&lba).copied().unwrap_or(None))).collect();
                maybe.clear();
                log = reopened;
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
    #[test]
    fn flushed_writes_survive_every_crash(ops in proptest::collection::vec(op(), 1..200)) {
        run(ops);
    }
}

#[test]
fn journal_slots_fill_and_chain() {
    // 300 one-block writes need several journal slots; a crash after a flush keeps all.
    let mut log = Log::create(SimFile::new());
    for id in 1..=300u64 {
        log.write(1, id, id, &block(id, 0)).unwrap();
    }
    log.flush().unwrap();
    let file = log.file;
    file.crash(&mut SimRng::new(3));
    let (log, records) = Log::open(file).unwrap();
    assert_eq!(records.len(), 300);
    let state = state_of(&log, &records);
    assert!((1..=300u64).all(|id| state[&id] == Some((id, 0))));
}

#[test]
fn a_forged_journal_slot_in_the_data_is_never_replayed() {
    // A guest writes a block that is a perfectly valid journal slot claiming to be the
    // next one in the chain. Replay must not follow it: it is data, not at the chain's
    // next position.
    let mut log = Log::create(SimFile::new());
    let mut forged = SlotWriter::new(2, 99);
    forged.push(&Record::Trim { volume: 1, lba: 0, blocks: 1000 });
    log.write(1, 0, 1, &forged.encode()[..]).unwrap();
    log.flush().unwrap();
    let (_, records) = Log::open(log.file).unwrap();
    assert_eq!(records.len(), 1, "only the guest's write itself: {records:?}");
    assert!(matches!(records[0], Record::Write { .. }));
}

#[test]
fn a_damaged_flushed_block_is_kept_as_damage_but_a_torn_unflushed_one_is_dropped() {
    let mut log = Log::create(SimFile::new());
    let Record::Write { pba, .. } = log.write(1, 0, 1, &block(1, 0)).unwrap() else {
        unreachable!()
    };
    log.flush().unwrap();
    let Record::Write { pba: unflushed, .. } = log.write(1, 1, 2, &block(2, 0)).unwrap() else {
        unreachable!()
    };
    // Rot in the flushed block; the unflushed one reads as if torn.
    let file = log.file;
    for (slot, byte) in [(pba, 7u8), (unflushed, 9u8)] {
        file.write_at(&[byte], offset(u64::from(slot)) + 100).unwrap();
    }
    file.sync().unwrap();
    let (mut log, records) = Log::open(file).unwrap();
    log.start_run().unwrap();
    let writes: Vec<&Record> =
        records.iter().filter(|r| matches!(r, Record::Write { .. })).collect();
    assert_eq!(writes.len(), 1, "the torn unflushed write is dropped: {records:?}");
    let Record::Write { pba: kept, crcs, .. } = writes[0] else { unreachable!() };
    assert_eq!(*kept, pba, "the flushed write stays, so its damage is seen");
    let mut buf = vec![0u8; SLOT_BYTES];
    assert!(log.read_block(u64::from(pba), crcs[0], &mut buf).is_err());
    // After a reopen and a new sync, the dropped write does not come back as damage.
    log.write(1, 5, 3, &block(3, 0)).unwrap();
    log.flush().unwrap();
    let (_, records) = Log::open(log.file).unwrap();
    let writes = records.iter().filter(|r| matches!(r, Record::Write { .. })).count();
    assert_eq!(writes, 2, "{records:?}");
}

/// A `SimFile` that counts the calls that write.
#[derive(Default)]
struct Counted {
    file: SimFile,
    /// `write_at` calls, and `write_vectored_at` calls with their buffer counts.
    writes: std::sync::Mutex<(usize, Vec<usize>)>,
}

impl RawFile for Counted {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.writes.lock().unwrap().0 += 1;
        self.file.write_at(data, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.writes.lock().unwrap().1.push(bufs.len());
        self.file.write_vectored_at(bufs, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync()
    }
    fn length_bytes(&self) -> io::Result<u64> {
        self.file.length_bytes()
    }
    fn punch(&self, offset: u64, length: u64) -> io::Result<()> {
        self.file.punch(offset, length)
    }
}

#[test]
fn a_batch_is_one_write_per_run_of_slots_and_one_journal_write() {
    let mut log = Log::create(Counted::default());
    let data: Vec<Vec<u8>> = (1..=8).map(|id| block(id, 0)).collect();
    let batch: Vec<LogWrite> = (1..=8u64)
        .zip(&data)
        .map(|(id, data)| LogWrite { volume: 1, lba: id, vba: id, data })
        .collect();
    // Slots 2..10 of the first segment: one run.
    log.write_many(&batch).unwrap();
    assert_eq!(*log.file.writes.lock().unwrap(), (1, vec![8]));
    // 4, 8 and 8 blocks from slot 10: the 8 do not fit the 2 slots left in the segment,
    // so they start the next one; two runs (slots 10..14 and 16..32).
    let data: Vec<Vec<u8>> = [(9, 4), (10, 8), (11, 8)].map(|(id, n)| blocks_of(id, n)).into();
    let batch: Vec<LogWrite> = (9..=11u64)
        .zip(&data)
        .map(|(id, data)| LogWrite { volume: 1, lba: id * 10, vba: id, data })
        .collect();
    log.write_many(&batch).unwrap();
    assert_eq!(*log.file.writes.lock().unwrap(), (2, vec![8, 1, 2]));
}

/// `n` blocks of write `id`.
fn blocks_of(id: u64, n: u64) -> Vec<u8> {
    (0..n).flat_map(|i| block(id, i)).collect()
}

#[test]
fn a_batch_that_fills_journal_slots_and_segments_replays_whole() {
    // 300 writes of 1 to 3 blocks, some over others: several journal slots, many segments.
    let mut log = Log::create(SimFile::new());
    let writes: Vec<(u64, u64, Vec<u8>)> =
        (1..=300u64).map(|id| (id % 50, 1 + id % 3, blocks_of(id, 1 + id % 3))).collect();
    let batch: Vec<LogWrite> = writes
        .iter()
        .map(|(lba, _, data)| LogWrite { volume: 1, lba: *lba, vba: data_id(data), data })
        .collect();
    let records = log.write_many(&batch).unwrap();
    log.flush().unwrap();
    let file = log.file;
    file.crash(&mut SimRng::new(5));
    let (log, replayed) = Log::open(file).unwrap();
    assert_eq!(replayed, records, "every record, in order");
    let state = state_of(&log, &replayed);
    let mut want = HashMap::new();
    for (id, (lba, blocks, _)) in (1..).zip(&writes) {
        for i in 0..*blocks {
            want.insert(lba + i, Some((id, i)));
        }
    }
    assert_eq!(state, want);
}

/// The write id a block of `block` names.
fn data_id(data: &[u8]) -> u64 {
    u64::from_le_bytes(data[..8].try_into().unwrap())
}
