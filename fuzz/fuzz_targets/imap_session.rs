//! The IMAP client session fed arbitrary bytes: no panic, and the same
//! actions whatever the chunking (the driver is in `common/session.rs`).
#![no_main]

#[path = "common/session.rs"]
mod session;

use libfuzzer_sys::fuzz_target;
use mailgate::imap;

fuzz_target!(|data: &[u8]| {
    session::check(data, &["IMAP4rev1".to_owned()], |control| {
        imap::Session::new(imap::Options {
            tls_active: control & 1 == 0,
            starttls: control & 1 == 1,
            loopback_plaintext: false,
            limits: session::LIMITS,
        })
    });
});
