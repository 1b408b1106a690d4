//! The inter-node channel's responder on arbitrary bytes: what any stranger who reaches
//! the RPC port can send before authenticating. It must refuse (never panic), read no
//! more than the handshake bound, and never authenticate bytes made without the key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use strata_io::net::{channel, ChannelKey};
use strata_types::limits::INTERNODE_HANDSHAKE_BYTES_MAX;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let key = ChannelKey::from_secret(b"fuzzing cluster secret");
    let mut unread = data;
    let result = runtime().block_on(channel::respond_on(&mut unread, tokio::io::sink(), &key));
    assert!(result.is_err(), "bytes made without the key authenticated");
    // A message's few header bytes, then at most the bound.
    let read = data.len() - unread.len();
    assert!(read <= 8 + INTERNODE_HANDSHAKE_BYTES_MAX, "read {read} bytes before authenticating");
});
