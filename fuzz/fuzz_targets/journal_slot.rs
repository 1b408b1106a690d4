//! The store's journal slots on arbitrary bytes: as read from disk (checksum and all
//! checked), and with the fuzzer's records under a valid header and checksum (what a
//! torn or corrupt slot that happens to checksum, or a bug of ours, would present to
//! replay). Errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_store::journal::{self, RECORDS_BYTES_MAX, SLOT_BYTES};

/// Bytes of a slot's header (the records follow).
const HEADER_BYTES: usize = SLOT_BYTES - RECORDS_BYTES_MAX;

fuzz_target!(|data: &[u8]| {
    let mut slot = vec![0u8; SLOT_BYTES];
    let n = data.len().min(SLOT_BYTES);
    slot[..n].copy_from_slice(&data[..n]);
    let _ = journal::decode(&slot);
    // The same bytes as records of a well-formed slot.
    let records = &data[..data.len().min(SLOT_BYTES - HEADER_BYTES)];
    let mut slot = vec![0u8; SLOT_BYTES];
    slot[0..8].copy_from_slice(b"STRATAJ1");
    slot[12..16].copy_from_slice(&(records.len() as u32).to_le_bytes());
    slot[HEADER_BYTES..HEADER_BYTES + records.len()].copy_from_slice(records);
    let crc = crc32c::crc32c(&slot[12..HEADER_BYTES + records.len()]);
    slot[8..12].copy_from_slice(&crc.to_le_bytes());
    let _ = journal::decode(&slot);
});
