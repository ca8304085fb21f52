//! The PROXY protocol header (v1 and v2): where a header ends, and the
//! client address a whole one names. A length is never past what v1 or v2
//! allow, and parsing any prefix never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::proto::proxy_header::{client_address, header_len, is_header, V1_MAX};

fuzz_target!(|data: &[u8]| {
    let _ = is_header(data);
    if let Ok(Some(len)) = header_len(data) {
        assert!(len <= 16 + usize::from(u16::MAX));
        if data.starts_with(b"PROXY ") {
            assert!(len <= V1_MAX);
        }
        if let Some(header) = data.get(..len) {
            let _ = client_address(header);
        }
    }
    let _ = client_address(data);
});
