//! The SASL decoders: PLAIN, LOGIN steps, and the XOAUTH2 error challenge.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::proto::sasl;

fuzz_target!(|data: &[u8]| {
    let _ = sasl::decode_plain(data);
    let _ = sasl::xoauth2_error_status(data);
    let mut exchange = sasl::Exchange::new(sasl::Mechanism::Login);
    for line in data.split(|&b| b == b'\n') {
        if exchange.respond(line).is_err() {
            break;
        }
    }
});
