//! The node's catalog file (`DIR/catalog.json`) on arbitrary bytes, decoded as a node
//! does at start (`strata_server::catalog::decode`: the format check, then the typed
//! entries and their access lists). Errors with a message, never panics; a catalog that
//! decodes encodes and decodes again to the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use strata_server::catalog;

fuzz_target!(|data: &[u8]| {
    let dir = Path::new("/fuzz/data");
    if let Ok(c) = catalog::decode(data, dir) {
        let again = serde_json::to_vec(&c).expect("a catalog serializes");
        let back = catalog::decode(&again, dir).expect("what was written reads back");
        assert_eq!(serde_json::to_vec(&back).expect("serializes"), again);
    }
});
