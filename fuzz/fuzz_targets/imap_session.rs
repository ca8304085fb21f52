//! The IMAP client session fed arbitrary bytes: no panic, and the same
//! actions whatever the chunking. The first bytes choose the chunk sizes
//! and how the (simulated) driver answers logins.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::imap;
use mailgate::proto::{Action, ClientSession as _, FrameLimits, LoginFailure};

/// `plain` is the cleartext part of the stream and `tls` what follows a
/// STARTTLS handshake: plaintext after the STARTTLS command is dropped
/// whatever the chunking (as the session must), so the driver skips the
/// rest of `plain` once TLS is up.
fn run(plain: &[u8], tls: &[u8], chunks: &[usize], outcomes: u8) -> Vec<String> {
    let mut session = imap::Session::new(imap::Options {
        tls_active: outcomes & 1 == 0,
        starttls: outcomes & 1 == 1,
        loopback_plaintext: false,
        limits: FrameLimits { max_line: 256, max_literal: 64 },
    });
    let mut log = Vec::new();
    let mut logins = 0u32;
    let mut rest = plain;
    let mut after_tls = Some(tls);
    let mut i = 0;
    loop {
        if rest.is_empty() {
            match after_tls.take() {
                Some(t) if log.iter().any(|l| l == "starttls") => rest = t,
                _ => break,
            }
            if rest.is_empty() {
                break;
            }
        }
        let n = chunks[i % chunks.len()].clamp(1, rest.len());
        i += 1;
        session.feed(&rest[..n]);
        rest = &rest[n..];
        while let Some(action) = session.next_action() {
            match action {
                Action::Send(b) => log.push(format!("send {b:?}")),
                Action::StartTls => {
                    log.push("starttls".into());
                    session.tls_established();
                    rest = &[];
                }
                Action::Authenticate(c) => {
                    log.push(format!("auth {:?}", c.username));
                    logins += 1;
                    if outcomes >> (logins % 7) & 1 == 1 {
                        session.login_succeeded(&["IMAP4rev1".to_owned()]);
                    } else {
                        session.login_failed(LoginFailure::BadCredentials);
                    }
                }
                Action::Splice { to_upstream } => {
                    log.push("splice".into());
                    // After the splice, later bytes are the relay's: record
                    // all of them as one stream.
                    let mut relayed = to_upstream.to_vec();
                    relayed.extend_from_slice(rest);
                    log.push(format!("relay {relayed:?}"));
                    return log;
                }
                Action::Close => {
                    log.push("close".into());
                    return log;
                }
            }
        }
    }
    log
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else { return };
    let chunks = [usize::from(control % 7) + 1, 1, 3, usize::from(control / 7) + 2];
    // Where the TLS part starts: after the first "\n\n" (any bytes may
    // come before it).
    let split = input.windows(2).position(|w| w == b"\n\n").map_or(input.len(), |i| i + 2);
    let (plain, tls) = input.split_at(split);
    let whole = run(plain, tls, &[usize::MAX], control);
    let chunked = run(plain, tls, &chunks, control);
    assert_eq!(whole, chunked, "chunking changed the actions");
});
