//! NBD's decoders on arbitrary bytes: option headers, INFO/GO and meta-context option
//! data, transmission request headers. Each must return an error, never panic, and what
//! decodes must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_nbd::codec::{InfoRequest, MetaContextRequest, OptionHeader, Request};

fuzz_target!(|data: &[u8]| {
    if let Some(b) = data.get(..OptionHeader::SIZE) {
        let _ = OptionHeader::decode(b.try_into().expect("sized"));
    }
    let _ = InfoRequest::decode(data);
    if let Ok(m) = MetaContextRequest::decode(data) {
        for query in &m.queries {
            let _ = strata_nbd::codec::lists_base_allocation(query);
        }
    }
    if let Some(b) = data.get(..Request::SIZE) {
        if let Ok(r) = Request::decode(b.try_into().expect("sized")) {
            let mut out = bytes::BytesMut::new();
            r.encode(&mut out);
            assert_eq!(&out[..], b, "a request header round-trips");
        }
    }
});
