//! POP3 (RFC 1939, RFC 2449, RFC 5034, RFC 2595): the client side before
//! login, and our own XOAUTH2 login to the upstream. Pure: no sockets, no
//! clocks. The same shape as [`crate::imap`]; what both need lives in
//! [`crate::proto`].

pub mod capability;
pub mod encode;
pub mod parse;
mod session;
mod upstream;

pub use session::{Options, Session};
pub use upstream::Upstream;

use std::time::Duration;

use crate::proto::descriptor::Check;
use crate::proto::{
    ClientSession, DefaultUpstream, Descriptor, KnownProvider, ListenerTls, LoginRequest,
    SessionOptions, UpstreamLogin, UpstreamTls,
};

/// POP3, as the upper layers see it.
pub static PROTOCOL: Descriptor = Descriptor {
    name: "pop3",
    title: "POP3",
    new_session,
    new_login,
    logged_out,
    logout: b"QUIT\r\n",
    logout_done: b"+OK",
    check: Check {
        name: "STAT",
        command: |_| b"STAT\r\n".to_vec(),
        answer: stat,
    },
    // RFC 1939 §3: an inactivity autologout timer of at least 10 minutes.
    default_idle_timeout: Duration::from_secs(10 * 60),
    default_upstream,
    sessions_per_mailbox: |_| None,
    advertises_upstream_capabilities: false,
    microsoft_scope: "POP.AccessAsUser.All",
};

/// The answer to `STAT`: one line, `+OK count size` or `-ERR why`.
fn stat(answer: &[u8]) -> Option<Result<String, String>> {
    let end = answer.iter().position(|&b| b == b'\n')?;
    let line = String::from_utf8_lossy(answer[..end].trim_ascii()).into_owned();
    Some(match line.strip_prefix("+OK") {
        Some(rest) => {
            let mut counts = rest.split_ascii_whitespace();
            match (counts.next(), counts.next()) {
                (Some(n), Some(size)) => Ok(format!("{n} messages, {size} bytes")),
                _ => Ok("answered".into()),
            }
        }
        None => Err(line),
    })
}

/// `QUIT` (RFC 1939 §6) as the client's last line.
fn logged_out(tail: &[u8]) -> bool {
    crate::proto::descriptor::last_line(tail)
        .and_then(|line| parse::command(line).ok())
        .is_some_and(|c| c == parse::Command::Quit)
}

fn new_session(options: SessionOptions) -> Box<dyn ClientSession + Send> {
    Box::new(Session::new(Options {
        tls_active: options.tls == ListenerTls::Implicit,
        stls: options.tls == ListenerTls::StartTls,
        loopback_plaintext: options.tls == ListenerTls::Plaintext,
        limits: options.limits,
    }))
}

fn new_login(request: &LoginRequest<'_>) -> Box<dyn UpstreamLogin + Send> {
    Box::new(Upstream::with(request))
}

/// The providers' documented POP3 hosts, over implicit TLS.
fn default_upstream(provider: KnownProvider) -> DefaultUpstream {
    let host = match provider {
        KnownProvider::Google => "pop.gmail.com",
        KnownProvider::Microsoft => "outlook.office365.com",
        KnownProvider::MicrosoftUsgov => "outlook.office365.us",
        KnownProvider::MicrosoftChina => "partner.outlook.cn",
    };
    DefaultUpstream {
        host,
        port: 995,
        tls: UpstreamTls::Implicit,
    }
}
