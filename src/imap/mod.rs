//! IMAP4 (RFC 9051, RFC 3501): the client side before login, and our own
//! XOAUTH2 login to the upstream. Pure: no sockets, no clocks.

pub mod capability;
pub mod encode;
pub mod parse;
mod session;
mod upstream;

pub use crate::proto::UpstreamTls;
pub use session::{Options, Session};
pub use upstream::Upstream;

use std::time::Duration;

use crate::proto::descriptor::Check;
use crate::proto::{
    ClientSession, DefaultUpstream, Descriptor, KnownProvider, ListenerTls, LoginRequest,
    SessionOptions, UpstreamLogin,
};

/// IMAP, as the upper layers see it.
pub static PROTOCOL: Descriptor = Descriptor {
    name: "imap",
    title: "IMAP",
    new_session,
    new_login,
    logged_out,
    logout: b"z LOGOUT\r\n",
    logout_done: b"z OK",
    check: Check {
        name: "EXAMINE INBOX",
        command: |_| b"y EXAMINE INBOX\r\n".to_vec(),
        answer: examined,
    },
    // RFC 9051 §5.4: an autologout timer of at least 30 minutes.
    default_idle_timeout: Duration::from_secs(30 * 60),
    default_upstream,
    sessions_per_mailbox: |_| None,
    advertises_upstream_capabilities: false,
    microsoft_scope: "IMAP.AccessAsUser.All",
};

/// The answer to `y EXAMINE INBOX`: whole once the tagged line is in.
fn examined(answer: &[u8]) -> Option<Result<String, String>> {
    // Whole lines only: a read may end inside one.
    let whole = &answer[..answer.iter().rposition(|&b| b == b'\n')? + 1];
    let lines = || whole.split(|&b| b == b'\n').map(<[u8]>::trim_ascii);
    let tagged = lines().find(|l| l.starts_with(b"y "))?;
    let text = String::from_utf8_lossy(&tagged[2..]).into_owned();
    if !tagged.starts_with(b"y OK") {
        return Some(Err(text));
    }
    let exists = lines().find_map(|l| {
        let n = l.strip_prefix(b"* ")?.strip_suffix(b" EXISTS")?;
        std::str::from_utf8(n).ok()?.parse::<u64>().ok()
    });
    Some(Ok(match exists {
        Some(n) => format!("INBOX holds {n} messages"),
        None => "INBOX opened".into(),
    }))
}

/// `tag LOGOUT` (RFC 9051 §6.1.3) as the client's last line.
fn logged_out(tail: &[u8]) -> bool {
    crate::proto::descriptor::last_line(tail)
        .and_then(|line| parse::command(line).ok())
        .is_some_and(|c| c.command == parse::Command::Logout)
}

fn new_session(options: SessionOptions) -> Box<dyn ClientSession + Send> {
    Box::new(Session::new(Options {
        tls_active: options.tls == ListenerTls::Implicit,
        starttls: options.tls == ListenerTls::StartTls,
        loopback_plaintext: options.tls == ListenerTls::Plaintext,
        limits: options.limits,
    }))
}

fn new_login(request: &LoginRequest<'_>) -> Box<dyn UpstreamLogin + Send> {
    Box::new(Upstream::with(request))
}

/// The providers' documented IMAP hosts, over implicit TLS.
fn default_upstream(provider: KnownProvider) -> DefaultUpstream {
    let host = match provider {
        KnownProvider::Google => "imap.gmail.com",
        KnownProvider::Microsoft => "outlook.office365.com",
        KnownProvider::MicrosoftUsgov => "outlook.office365.us",
        KnownProvider::MicrosoftChina => "partner.outlook.cn",
    };
    DefaultUpstream {
        host,
        port: 993,
        tls: UpstreamTls::Implicit,
    }
}
