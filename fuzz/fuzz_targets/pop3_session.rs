//! The POP3 client session fed arbitrary bytes: no panic, and the same
//! actions whatever the chunking (the driver is in `common/session.rs`).
#![no_main]

#[path = "common/session.rs"]
mod session;

use libfuzzer_sys::fuzz_target;
use mailgate::pop3;

fuzz_target!(|data: &[u8]| {
    session::check(data, &[], |control| {
        pop3::Session::new(pop3::Options {
            tls_active: control & 1 == 0,
            stls: control & 1 == 1,
            loopback_plaintext: false,
            limits: session::LIMITS,
        })
    });
});
