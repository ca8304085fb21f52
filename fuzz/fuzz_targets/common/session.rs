//! The driver both session targets share: a client session fed arbitrary
//! bytes must not panic, and must take the same actions whatever the
//! chunking. The first byte chooses the chunk sizes, whether the listener
//! is implicit TLS or STARTTLS, and how the (simulated) driver answers
//! logins.

use mailgate::proto::{Action, ClientSession, FrameLimits, LoginFailure};

/// The frame limits the targets use: small, so that the caps are hit.
pub const LIMITS: FrameLimits = FrameLimits { max_line: 256, max_literal: 64 };

/// `plain` is the cleartext part of the stream and `tls` what follows a
/// STARTTLS handshake: plaintext after the STARTTLS command is dropped
/// whatever the chunking (as the session must), so the driver skips the
/// rest of `plain` once TLS is up.
fn run<S: ClientSession>(
    mut session: S,
    capabilities: &[String],
    plain: &[u8],
    tls: &[u8],
    chunks: &[usize],
    outcomes: u8,
) -> Vec<String> {
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
                        session.login_succeeded(capabilities);
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


/// Runs `data` through a session made by `make` (given the control byte)
/// whole and in chunks, and compares the actions.
pub fn check<S: ClientSession>(data: &[u8], capabilities: &[String], make: impl Fn(u8) -> S) {
    let Some((&control, input)) = data.split_first() else { return };
    let chunks = [usize::from(control % 7) + 1, 1, 3, usize::from(control / 7) + 2];
    // Where the TLS part starts: after the first "\n\n" (any bytes may
    // come before it).
    let split = input.windows(2).position(|w| w == b"\n\n").map_or(input.len(), |i| i + 2);
    let (plain, tls) = input.split_at(split);
    let whole = run(make(control), capabilities, plain, tls, &[usize::MAX], control);
    let chunked = run(make(control), capabilities, plain, tls, &chunks, control);
    assert_eq!(whole, chunked, "chunking changed the actions");
}
