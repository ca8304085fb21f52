//! The SMTP client session fed arbitrary bytes: no panic, and the same
//! actions whatever the chunking (the driver is in `common/session.rs`).
#![no_main]

#[path = "common/session.rs"]
mod session;

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mailgate::smtp;

fuzz_target!(|data: &[u8]| {
    let known: Arc<[String]> = ["SIZE 1000", "PIPELINING", "CHUNKING"].map(String::from).into();
    session::check(data, &[], |control| {
        smtp::Session::new(smtp::Options {
            tls_active: control & 1 == 0,
            starttls: control & 1 == 1,
            loopback_plaintext: false,
            limits: session::LIMITS,
            host: "gw.example".into(),
            // Half the runs know an upstream's EHLO.
            upstream_capabilities: (control & 2 == 2).then(|| vec![known.clone()].into()),
        })
    });
});
