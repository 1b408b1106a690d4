//! Frames: round trip, a wrong secret refused, garbage never panics. (Members over TCP:
//! `service/tests.rs`.)

use super::*;
use proptest::prelude::*;

#[tokio::test]
async fn frames_round_trip_and_a_wrong_secret_is_refused() {
    let key = Key::from_secret(b"cluster secret");
    let frame = encode(&key, &vec![1u64, 2, 3]);
    let back: Vec<u64> = read_frame(&mut &frame[..], &key).await.unwrap();
    assert_eq!(back, vec![1, 2, 3]);
    let other = Key::from_secret(b"another secret");
    let err = read_frame::<Vec<u64>>(&mut &frame[..], &other).await.unwrap_err();
    assert!(matches!(err, FrameError::Unauthenticated), "{err}");
    // A flipped bit of the body fails the MAC too.
    let mut damaged = frame.clone();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    assert!(matches!(
        read_frame::<Vec<u64>>(&mut &damaged[..], &key).await,
        Err(FrameError::Unauthenticated)
    ));
    let mut long = frame.clone();
    long[4..8].copy_from_slice(&(FRAME_BYTES_MAX as u32 + 1).to_le_bytes());
    assert!(matches!(
        read_frame::<Vec<u64>>(&mut &long[..], &key).await,
        Err(FrameError::TooLong(_))
    ));
}

proptest! {
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let key = Key::from_secret(b"s");
        let result = runtime.block_on(read_frame::<Request>(&mut &bytes[..], &key));
        prop_assert!(result.is_err());
    }
}
