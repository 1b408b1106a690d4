//! The store's checkpoint file on arbitrary bytes, opened over an empty log: as read
//! from disk, and with the fuzzer's body under a valid header and checksum (so the body's
//! counts, views, VBA map and forest are what is exercised). Loading refuses anything
//! malformed with an error; it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_io::sim::SimFile;
use strata_store::engine::Engine;

/// The most segments a fuzzed checkpoint may name: the log is a `SimFile` in memory, and
/// opening one that names many segments fills them (a real file stays sparse).
const SEGMENTS_MAX: u64 = 8;

fuzz_target!(|data: &[u8]| {
    // The body's sixth field is the count of segments the log has used ("fresh").
    let fresh = data.get(40..48).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if fresh.is_some_and(|f| f > SEGMENTS_MAX) {
        return;
    }
    let _ = Engine::open_checkpoint(SimFile::new(), data);
    let mut file = Vec::with_capacity(24 + data.len());
    file.extend_from_slice(b"STRATAK1");
    file.extend_from_slice(&1u32.to_le_bytes());
    file.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    file.extend_from_slice(&(data.len() as u64).to_le_bytes());
    file.extend_from_slice(data);
    let _ = Engine::open_checkpoint(SimFile::new(), &file);
});
