//! Fuzzes the PROXY protocol header reader that `rstcpserversink` will run before
//! the HTTP request with `proxy-protocol=true` (issue 11): any bytes, read in growing
//! prefixes as the server reads them, must give "read more", a header or a refusal,
//! never a panic; the answer must not change once given, a header never claims more
//! bytes than were read, and "read more" never goes past the caps.
#![no_main]

use gstrsmultifdsink::proxy_protocol::{
    ProxyParsed, V1_MAX_LEN, V2_MAX_PAYLOAD, parse_proxy_header,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for end in 0..=data.len() {
        match parse_proxy_header(&data[..end]) {
            ProxyParsed::NeedMore => assert!(end < (16 + V2_MAX_PAYLOAD).max(V1_MAX_LEN)),
            answer => {
                if let ProxyParsed::Complete(header) = answer {
                    assert!(header.consumed <= end);
                }
                // More bytes behind a decided answer do not change it.
                assert_eq!(parse_proxy_header(data), answer);
                break;
            }
        }
    }
});
