//! The data plane's frames on arbitrary bytes: a header parsed as it arrives, before its
//! MAC is checked (only fixed fields and a bounded length), then the same bytes made into
//! an authenticated frame with the key (what a peer holding the secret can send) and read
//! whole. Errors, never panics; a frame that reads back re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_frame::frame::{self, DataKey, HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    let Some(head) = data.get(..HEADER_BYTES) else { return };
    let head: &[u8; HEADER_BYTES] = head.try_into().expect("sized");
    // As it arrives: unauthenticated.
    let Ok((header, length)) = frame::parse_header(head) else { return };
    let payload = &data[HEADER_BYTES..];
    let payload = &payload[..length.min(payload.len())];
    let key = DataKey::from_secret(b"fuzzing cluster secret");
    let _ = frame::verify(&key, head, payload);
    // After authentication: a frame with a valid crc and MAC.
    let bytes = frame::encode(&key, &header, payload);
    let mut reader = &bytes[..];
    let read = poll_once(frame::read_frame(&mut reader, &key));
    if let Some(Ok((again, body))) = read {
        assert_eq!(body, payload);
        assert_eq!(frame::encode(&key, &again, &body), bytes, "a frame round-trips");
    }
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
