//! The PROXY v1/v2 header parser that every `accept_proxy_protocol` listener runs on the
//! first bytes of a connection: it must never panic, never claim more bytes than it was
//! given, and agree with itself on every prefix of its input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waitless::proxy_protocol::{parse_header, Parsed};

fuzz_target!(|data: &[u8]| {
    let whole = parse_header(data);
    if let Ok(Parsed::Header { len, .. }) = whole {
        assert!(
            len > 0 && len <= data.len(),
            "header length {len} of {}",
            data.len()
        );
        // The same header with nothing after it parses the same way: what follows the
        // header belongs to the protocol and must not change how it is read.
        if let Some(exact) = data.get(..len) {
            assert_eq!(parse_header(exact), whole);
        }
    }
});
