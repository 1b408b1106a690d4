//! Journal slots: round trips, corruption is caught, garbage never panics, and a slot
//! rewritten in place and then torn by a crash decodes as the synced version, the new
//! version, or not at all — never as a mix.

use super::*;
use proptest::prelude::*;
use strata_io::sim::{RawFile, SimFile, SimRng};

fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u32>(),
            proptest::collection::vec(any::<u32>(), 1..300)
        )
            .prop_map(|(volume, lba, vba, pba, crcs)| Record::Write {
                volume,
                lba,
                vba,
                pba,
                crcs
            }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(volume, lba, blocks)| Record::Trim {
            volume,
            lba,
            blocks
        }),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(volume, lba, blocks)| Record::Zero {
            volume,
            lba,
            blocks
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(volume, snapshot)| Record::Snapshot { volume, snapshot }),
        (any::<u64>(), any::<u64>()).prop_map(|(source, clone)| Record::Clone { source, clone }),
        any::<u64>().prop_map(|snapshot| Record::Delete { snapshot }),
        (any::<u64>(), any::<u64>()).prop_map(|(volume, size)| Record::Create { volume, size }),
        (any::<u64>(), any::<u64>()).prop_map(|(volume, size)| Record::Resize { volume, size }),
        any::<u64>().prop_map(|volume| Record::Remove { volume }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(volume, snapshot)| Record::Rollback { volume, snapshot }),
        (any::<u64>(), any::<u64>()).prop_map(|(from, through)| Record::Durable { from, through }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(sequence, index)| Record::Truncate { sequence, index }),
        (any::<u64>(), any::<u32>(), proptest::collection::vec(any::<u32>(), 1..50))
            .prop_map(|(vba, pba, crcs)| Record::Move { vba, pba, crcs }),
    ]
}

/// Pushes records until one does not fit; returns the ones that went in.
fn fill(writer: &mut SlotWriter, records: &[Record]) -> Vec<Record> {
    let mut pushed = Vec::new();
    for r in records {
        if !writer.push(r) {
            break;
        }
        pushed.push(r.clone());
    }
    pushed
}

proptest! {
    #[test]
    fn slots_round_trip(
        sequence in any::<u64>(),
        records in proptest::collection::vec(record(), 0..40),
    ) {
        let mut writer = SlotWriter::new(sequence, sequence ^ 0xffff);
        let pushed = fill(&mut writer, &records);
        let encoded = writer.encode();
        let crc = u32::from_le_bytes(encoded[8..12].try_into().unwrap());
        let next = sequence ^ 0xffff;
        let slot = Slot { sequence, next, run: 1, prev: 0, crc, records: pushed };
        prop_assert_eq!(decode(&encoded[..]), Ok(slot));
    }

    #[test]
    fn a_flipped_bit_in_the_used_part_is_caught(
        records in proptest::collection::vec(record(), 1..10),
        bit in any::<usize>(),
    ) {
        let mut writer = SlotWriter::new(1, 2);
        let pushed = fill(&mut writer, &records);
        prop_assume!(!pushed.is_empty());
        let mut slot = writer.encode();
        let used = u32_at(&slot[..], 12) as usize;
        let bit = 8 * 8 + bit % ((HEADER_BYTES + used - 8) * 8); // anywhere after the magic
        slot[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(decode(&slot[..]).is_err());
    }

    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), SLOT_BYTES)) {
        let _ = decode(&bytes);
        // And with a valid magic and checksum over garbage records.
        let mut slot = bytes.clone();
        slot[0..8].copy_from_slice(MAGIC);
        let used = u32_at(&slot, 12) as usize % (RECORDS_BYTES_MAX + 1);
        slot[12..16].copy_from_slice(&(used as u32).to_le_bytes());
        let crc = crc32c::crc32c(&slot[12..HEADER_BYTES + used]);
        slot[8..12].copy_from_slice(&crc.to_le_bytes());
        let _ = decode(&slot);
    }
}

#[test]
fn a_full_slot_refuses_a_record_and_stays_unchanged() {
    let mut writer = SlotWriter::new(9, 10);
    let big = Record::Write { volume: 1, lba: 0, vba: 0, pba: 0, crcs: vec![7; WRITE_BLOCKS_MAX] };
    assert!(writer.push(&big));
    let before = writer.encode();
    assert!(!writer.push(&big));
    assert_eq!(writer.encode(), before);
    assert_eq!(decode(&before[..]).unwrap().records, vec![big]);
}

#[test]
fn a_torn_rewrite_decodes_as_old_new_or_nothing() {
    let old_records = vec![Record::Trim { volume: 1, lba: 5, blocks: 3 }];
    let mut writer = SlotWriter::new(4, 5);
    assert!(writer.push(&old_records[0]));
    let mut outcomes = [0usize; 3];
    for seed in 0..300 {
        let file = SimFile::new();
        let mut w = SlotWriter::new(4, 5);
        w.push(&old_records[0]);
        file.write_at(&w.encode()[..], 0).unwrap();
        file.sync().unwrap();
        // Unsynced rewrite with many more records, spanning several sectors.
        for i in 0..40 {
            w.push(&Record::Zero { volume: 2, lba: i, blocks: 1 });
        }
        let new_records = decode(&w.encode()[..]).unwrap().records;
        file.write_at(&w.encode()[..], 0).unwrap();
        file.crash(&mut SimRng::new(seed));
        let mut slot = vec![0u8; SLOT_BYTES];
        file.read_at(&mut slot, 0).unwrap();
        match decode(&slot) {
            Ok(s) if s.records == old_records => outcomes[0] += 1,
            Ok(s) if s.records == new_records => outcomes[1] += 1,
            Err(SlotError::Checksum) => outcomes[2] += 1,
            other => panic!("seed {seed}: a torn slot decoded as {other:?}"),
        }
    }
    assert!(outcomes.iter().all(|&n| n > 0), "every outcome should occur: {outcomes:?}");
}
