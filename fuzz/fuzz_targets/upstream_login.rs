//! Every upstream login (IMAP, POP3, SMTP) fed arbitrary upstream bytes: no panic, and the
//! same actions whatever the chunking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mailgate::proto::{UpstreamAction, UpstreamLogin, UpstreamTls};
use mailgate::secret::Secret;

/// As in the session targets (`common/session.rs`), `plain` is what comes before a STARTTLS
/// handshake and `tls` what comes after it.
fn run(login: &mut dyn UpstreamLogin, plain: &[u8], tls: &[u8], chunks: &[usize]) -> Vec<String> {
    let mut log = Vec::new();
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
        login.feed(&rest[..n]);
        rest = &rest[n..];
        while let Some(action) = login.next_action() {
            match action {
                UpstreamAction::Send(b) => log.push(format!("send {b:?}")),
                UpstreamAction::StartTls => {
                    // Plaintext the upstream sent after its OK and before
                    // the handshake would break the handshake: the same
                    // outcome as the login refusing it when it came early.
                    if !rest.is_empty() {
                        log.push("failed: data before the TLS handshake".into());
                        return log;
                    }
                    log.push("starttls".into());
                    login.tls_established();
                }
                UpstreamAction::LoggedIn { capabilities, to_client } => {
                    let mut relayed = to_client.to_vec();
                    relayed.extend_from_slice(rest);
                    log.push(format!("loggedin {capabilities:?} {relayed:?}"));
                    return log;
                }
                UpstreamAction::Failed(f) => {
                    let text = format!("{f:?}");
                    if text.contains("data after STARTTLS") || text.contains("data after STLS") {
                        // Undo the starttls entry a chunked run would not
                        // have reached: both runs end the same way.
                        log.push("failed: data before the TLS handshake".into());
                    } else {
                        log.push(format!("failed {text}"));
                    }
                    return log;
                }
            }
        }
    }
    log
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else { return };
    let tls = if control & 1 == 0 { UpstreamTls::Implicit } else { UpstreamTls::StartTls };
    let token = Secret::new("token".to_owned());
    let chunks = [usize::from(control % 5) + 1, 2, usize::from(control / 5) + 1];
    let split = input.windows(2).position(|w| w == b"\n\n").map_or(input.len(), |i| i + 2);
    let (plain, after) = input.split_at(split);
    let imap = |c: &[usize]| run(&mut mailgate::imap::Upstream::new("a@b", &token, tls), plain, after, c);
    assert_eq!(imap(&[usize::MAX]), imap(&chunks));
    let pop3 = |c: &[usize]| run(&mut mailgate::pop3::Upstream::new("a@b", &token, tls), plain, after, c);
    assert_eq!(pop3(&[usize::MAX]), pop3(&chunks));
    let smtp = |c: &[usize]| {
        run(&mut mailgate::smtp::Upstream::new("a@b", &token, tls, "client.example"), plain, after, c)
    };
    assert_eq!(smtp(&[usize::MAX]), smtp(&chunks));
    // Test connection's readers of the answer one command past login: no
    // panic on any bytes, whole lines or not.
    for protocol in [&mailgate::imap::PROTOCOL, &mailgate::pop3::PROTOCOL, &mailgate::smtp::PROTOCOL] {
        let _ = (protocol.check.answer)(input);
        if let Some(end) = input.iter().rposition(|&b| b == b'\n') {
            let _ = (protocol.check.answer)(&input[..=end]);
        }
    }
});
