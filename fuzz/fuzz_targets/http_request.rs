//! Fuzzes the HTTP request reader of `rstcpserversink` (the only parser of
//! untrusted input): any bytes, split at any point and read in pieces as the server
//! does, must give a request, a refusal or "read more", never a panic, and a request
//! only once a complete head is in.
#![no_main]

use gstrsmultifdsink::http::{Parsed, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&limit, bytes)) = data.split_first() else {
        return;
    };
    let max_head = 16 + usize::from(limit) * 8;
    // Feed growing prefixes, as reads arrive; once answered, the server stops.
    for end in 0..=bytes.len() {
        match parse_request(&bytes[..end], max_head) {
            // More than the limit without a complete head is refused, not awaited.
            Parsed::Incomplete => assert!(end <= max_head),
            Parsed::Request(req) => {
                assert!(req.path.starts_with('/'));
                break;
            }
            Parsed::Refused(_) => break,
        }
    }
});
