//! The metadata RPC's messages on arbitrary bytes, as a member decodes them once a frame
//! is authenticated: an `Envelope<Request>` (Raft's appends, votes, snapshot chunks and
//! clients' requests) and an `Envelope<Reply>`, from JSON. Errors, never panics; and the
//! same body inside an authenticated frame, read from a stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use strata_meta::rpc::{self, Envelope, Key, Reply, Request};

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<Envelope<Request>>(data);
    let _ = serde_json::from_slice::<Envelope<Reply>>(data);
    // A frame as a member holding the secret would send it, with the fuzzer's body.
    let Ok(body) = serde_json::from_slice::<Box<RawValue>>(data) else { return };
    let key = Key::from_secret(b"fuzzing cluster secret");
    let frame = rpc::encode(&key, &body);
    let mut reader = &frame[..];
    let _ = poll_once(rpc::read_frame::<Envelope<Request>>(&mut reader, &key));
    let mut reader = &frame[..];
    let _ = poll_once(rpc::read_frame::<Envelope<Reply>>(&mut reader, &key));
});

/// Polls a future over in-memory bytes once (it never waits on anything).
fn poll_once<F: std::future::Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}
