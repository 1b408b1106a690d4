//! Frames round-trip; damage, a wrong secret and garbage are refused, never a panic.

use super::*;
use proptest::prelude::*;

fn header() -> Header {
    Header {
        kind: Kind::Write,
        reply: false,
        status: Status::Ok,
        flags: FLAG_FUA,
        id: 9,
        component: 42,
        epoch: 3,
        lsn: 1_000_001,
        offset: 1 << 30,
        count: 0,
    }
}

async fn decode(bytes: &[u8], key: &DataKey) -> Result<(Header, Vec<u8>), FrameError> {
    read_frame(&mut &bytes[..], key).await
}

#[tokio::test]
async fn a_frame_round_trips_and_damage_or_a_wrong_secret_is_refused() {
    let key = DataKey::from_secret(b"cluster secret");
    let payload = vec![0xabu8; 4096];
    let frame = encode(&key, &header(), &payload);
    assert_eq!(frame.len(), HEADER_BYTES + 4096);
    let (h, p) = decode(&frame, &key).await.unwrap();
    assert_eq!((h, p), (header(), payload.clone()));
    let reply = Header { reply: true, status: Status::StaleEpoch, ..header() };
    assert_eq!(decode(&encode(&key, &reply, &[]), &key).await.unwrap().0, reply);

    // Any flipped bit of the payload, the header or the MAC is caught.
    for at in [0usize, 5, 20, 57, 70, HEADER_BYTES + 100] {
        let mut bad = frame.clone();
        bad[at] ^= 0x10;
        assert!(decode(&bad, &key).await.is_err(), "flip at {at} accepted");
    }
    let mut bad = frame.clone();
    bad[HEADER_BYTES] ^= 1;
    assert!(matches!(decode(&bad, &key).await, Err(FrameError::Checksum)));
    let other = DataKey::from_secret(b"another secret");
    assert!(matches!(decode(&frame, &other).await, Err(FrameError::Unauthenticated)));
    // The metadata plane's key (same secret, other derivation) does not verify either.
    let meta = DataKey {
        mac: blake3::derive_key("strata cluster rpc v1", b"cluster secret"),
        channel: strata_io::net::ChannelKey::from_secret(b"cluster secret"),
    };
    assert!(matches!(decode(&frame, &meta).await, Err(FrameError::Unauthenticated)));
    let mut long = frame.clone();
    long[52..56].copy_from_slice(&(PAYLOAD_BYTES_MAX as u32 + 1).to_le_bytes());
    assert!(matches!(decode(&long, &key).await, Err(FrameError::TooLong(_))));
    assert!(matches!(decode(&frame[..50], &key).await, Err(FrameError::Io(_))));
}

#[tokio::test]
async fn a_flag_that_means_nothing_is_refused() {
    let key = DataKey::from_secret(b"secret");
    let known = Header { flags: FLAG_FUA | FLAG_VOLUME | FLAG_WHOLE | FLAG_SUSPECT, ..header() };
    assert_eq!(decode(&encode(&key, &known, b""), &key).await.unwrap().0, known);
    for unknown in [16u16, 0x8000] {
        let h = Header { flags: unknown, ..header() };
        let refused = decode(&encode(&key, &h, b""), &key).await;
        assert!(matches!(refused, Err(FrameError::Malformed(_))), "{unknown}: {refused:?}");
    }
}

proptest! {
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let key = DataKey::from_secret(b"s");
        prop_assert!(runtime.block_on(decode(&bytes, &key)).is_err());
    }

    #[test]
    fn any_header_round_trips(
        kind in 1u8..=14, reply: bool, status in 0u8..=8, flags in 0u16..16,
        id: u64, component: u64, epoch: u64, lsn: u64, offset: u64, count: u32,
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let h = Header {
            kind: Kind::from_u8(kind).unwrap(),
            reply,
            status: Status::from_u8(status).unwrap(),
            flags,
            id, component, epoch, lsn, offset, count,
        };
        let key = DataKey::from_secret(b"k");
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let back = runtime.block_on(decode(&encode(&key, &h, &payload), &key)).unwrap();
        prop_assert_eq!(back, (h, payload));
    }
}
