//! SMTP submission (RFC 5321, RFC 6409, RFC 4954, RFC 3207): the client
//! side before login, and our own XOAUTH2/OAUTHBEARER login to the
//! upstream. Pure: no sockets, no clocks. The same shape as
//! [`crate::imap`] and [`crate::pop3`].

pub mod capability;
pub mod encode;
pub mod parse;
mod session;
mod upstream;

pub use session::{Options, Session};
pub use upstream::Upstream;

use std::time::Duration;

use crate::proto::descriptor::{last_line, Check};
use crate::proto::{
    ClientSession, DefaultUpstream, Descriptor, KnownProvider, ListenerTls, LoginRequest,
    SessionOptions, UpstreamLogin, UpstreamTls,
};

/// SMTP submission, as the upper layers see it.
pub static PROTOCOL: Descriptor = Descriptor {
    name: "smtp",
    title: "SMTP",
    new_session,
    new_login,
    logged_out,
    logout: b"QUIT\r\n",
    logout_done: b"221",
    check: Check {
        name: "EHLO",
        command: |host| format!("EHLO {host}\r\n").into_bytes(),
        answer: ehlo_answered,
    },
    // RFC 5321 §4.5.3.2.7: a server waits at least 5 minutes for the next
    // command. No longer: Microsoft allows 3 sessions per mailbox.
    default_idle_timeout: Duration::from_secs(5 * 60),
    default_upstream,
    // Microsoft: 3 concurrent SMTP connections per mailbox ("4.3.2
    // STOREDRV.ClientSubmit; sender thread limit exceeded").
    sessions_per_mailbox: |provider| match provider {
        KnownProvider::Google => None,
        KnownProvider::Microsoft
        | KnownProvider::MicrosoftUsgov
        | KnownProvider::MicrosoftChina => Some(3),
    },
    advertises_upstream_capabilities: true,
    microsoft_scope: "SMTP.Send",
};

/// `QUIT` (RFC 5321 §4.1.1.10) as the client's last line.
fn logged_out(tail: &[u8]) -> bool {
    last_line(tail)
        .and_then(|line| parse::command(line).ok())
        .is_some_and(|c| c == parse::Command::Quit)
}

/// The answer to `EHLO` after AUTH: whole at its last line (`250 `, no
/// dash); a refusal in the server's words.
fn ehlo_answered(answer: &[u8]) -> Option<Result<String, String>> {
    // Whole lines only: a read may end inside one.
    let whole = &answer[..answer.iter().rposition(|&b| b == b'\n')? + 1];
    let lines: Vec<&[u8]> = whole
        .split(|&b| b == b'\n')
        .map(<[u8]>::trim_ascii)
        .filter(|l| !l.is_empty())
        .collect();
    let last = lines.iter().position(|l| l.get(3) != Some(&b'-'))?;
    let text = String::from_utf8_lossy(lines[last]).into_owned();
    Some(if text.starts_with("250") {
        Ok(format!("{} extensions offered", last))
    } else {
        Err(text)
    })
}

fn new_session(options: SessionOptions) -> Box<dyn ClientSession + Send> {
    Box::new(Session::new(Options {
        tls_active: options.tls == ListenerTls::Implicit,
        starttls: options.tls == ListenerTls::StartTls,
        loopback_plaintext: options.tls == ListenerTls::Plaintext,
        limits: options.limits,
        host: options.host,
        upstream_capabilities: options.upstream_capabilities,
    }))
}

fn new_login(request: &LoginRequest<'_>) -> Box<dyn UpstreamLogin + Send> {
    Box::new(Upstream::with(request))
}

/// The providers' documented submission hosts: Gmail over implicit TLS,
/// Microsoft's with STARTTLS on 587.
fn default_upstream(provider: KnownProvider) -> DefaultUpstream {
    let (host, port, tls) = match provider {
        KnownProvider::Google => ("smtp.gmail.com", 465, UpstreamTls::Implicit),
        KnownProvider::Microsoft => ("smtp.office365.com", 587, UpstreamTls::StartTls),
        KnownProvider::MicrosoftUsgov => ("smtp.office365.us", 587, UpstreamTls::StartTls),
        KnownProvider::MicrosoftChina => ("smtp.partner.outlook.cn", 587, UpstreamTls::StartTls),
    };
    DefaultUpstream { host, port, tls }
}

#[cfg(test)]
mod check_tests {
    use super::ehlo_answered;

    #[test]
    fn an_ehlo_answer_is_whole_at_its_last_line_only() {
        assert_eq!(ehlo_answered(b"250-smtp.example\r\n25"), None);
        assert_eq!(
            ehlo_answered(b"250-smtp.example\r\n250-SIZE 1000\r\n"),
            None
        );
        assert_eq!(
            ehlo_answered(b"250-smtp.example\r\n250 SIZE 1000\r\n"),
            Some(Ok("1 extensions offered".into()))
        );
        assert_eq!(
            ehlo_answered(b"421 4.7.0 closing\r\n"),
            Some(Err("421 4.7.0 closing".into()))
        );
    }
}
