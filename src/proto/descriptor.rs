//! A protocol as the upper layers see it: one value per protocol module
//! (`imap::PROTOCOL`, `pop3::PROTOCOL`), listed once in
//! [`crate::protocol`]. `server/`, the probe, metrics and the provider
//! catalogue read these fields and never name a protocol themselves.

use std::sync::Arc;
use std::time::Duration;

use super::sasl::OAuthMechanism;
use super::{ClientSession, FrameLimits, UpstreamLogin, UpstreamTls};
use crate::secret::Secret;

/// The last complete line of `tail`, with its line ending: the bytes
/// after the previous LF (or all of `tail`), when `tail` ends with LF.
pub fn last_line(tail: &[u8]) -> Option<&[u8]> {
    let body = tail.strip_suffix(b"\n")?;
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    Some(&tail[start..])
}

/// Whether `name` can name a host in a greeting: a domain (letters, digits, `-`,
/// `.`) or an address literal in brackets (RFC 5321 §4.1.3), at most 255
/// octets.
pub fn is_host_name(name: &str) -> bool {
    let ok_domain = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    name.len() <= 255
        && match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
            Some(literal) => {
                !literal.is_empty()
                    && literal
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b":.-".contains(&b))
            }
            None => ok_domain(name),
        }
}

/// How a listener's clients get TLS. Plaintext exists only on loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerTls {
    /// TLS from the first byte.
    Implicit,
    /// A plaintext greeting; the client upgrades with the protocol's
    /// STARTTLS command.
    StartTls,
    /// Plaintext on a loopback address: treated as private.
    Plaintext,
}

/// How a client session starts, fixed by its listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOptions {
    pub tls: ListenerTls,
    pub limits: FrameLimits,
    /// The gateway's host name, for greetings that name the server.
    pub host: Arc<str>,
    /// What the upstreams said they support after their own greeting,
    /// one list per upstream server a login may go to; `None` until every
    /// one of them is known. Only protocols whose descriptor sets
    /// `advertises_upstream_capabilities` get it.
    pub upstream_capabilities: Option<Arc<[Arc<[String]>]>>,
}

impl<'a> LoginRequest<'a> {
    /// A plain XOAUTH2 login as `mailbox` (tests, fuzzing, benchmarks):
    /// no upstream address for OAUTHBEARER, no greeting names.
    pub fn xoauth2(mailbox: &'a str, token: &'a Secret<String>, tls: UpstreamTls) -> Self {
        Self {
            mailbox,
            token,
            mechanism: OAuthMechanism::XOAuth2,
            tls,
            host: "",
            port: 0,
            client_hello: None,
            gateway_host: "",
        }
    }
}

/// Everything our own login at an upstream needs.
#[derive(Debug)]
pub struct LoginRequest<'a> {
    /// The mailbox to log in as (XOAUTH2's `user=`).
    pub mailbox: &'a str,
    pub token: &'a Secret<String>,
    pub mechanism: OAuthMechanism,
    pub tls: UpstreamTls,
    /// The upstream's host and port (OAUTHBEARER names them).
    pub host: &'a str,
    pub port: u16,
    /// The name the client greeted the gateway with, if it gave one.
    pub client_hello: Option<&'a str>,
    /// The gateway's own host name, when the client's is unusable.
    pub gateway_host: &'a str,
}

/// The mail services whose hosts the catalogue knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownProvider {
    Google,
    /// Microsoft 365, worldwide.
    Microsoft,
    /// Microsoft 365 for the US government (GCC High, DoD).
    MicrosoftUsgov,
    /// Microsoft 365 operated by 21Vianet in China.
    MicrosoftChina,
}

/// A provider's documented mail host for one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefaultUpstream {
    pub host: &'static str,
    pub port: u16,
    pub tls: UpstreamTls,
}

/// One command past login that proves the mailbox can be used, not only
/// that the token was accepted (Microsoft logs a token in and then answers
/// `BAD User is authenticated but not connected`).
pub struct Check {
    pub name: &'static str,
    pub command: fn(gateway_host: &str) -> Vec<u8>,
    pub answer: fn(&[u8]) -> Option<Result<String, String>>,
}

/// Everything the upper layers need to know about one protocol.
pub struct Descriptor {
    /// The config name (`protocol = "imap"`, `[accounts.NAME.imap]`) and
    /// the `protocol` metric label.
    pub name: &'static str,
    /// The name people read: "IMAP".
    pub title: &'static str,
    /// A client session for a connection on a listener.
    pub new_session: fn(SessionOptions) -> Box<dyn ClientSession + Send>,
    /// Our own login at an upstream.
    pub new_login: fn(&LoginRequest<'_>) -> Box<dyn UpstreamLogin + Send>,
    /// The command that ends a logged-in upstream session politely.
    pub logout: &'static [u8],
    /// How the answer to `logout` starts, on a line of its own.
    pub logout_done: &'static [u8],
    /// Test connection's step past login: its name (`EXAMINE INBOX`), the
    /// command for a gateway of this host name, and a reader of the
    /// answer: `None` until it is whole, then what it said, `Err` for a
    /// refusal (in the upstream's words).
    pub check: Check,
    /// Whether the last bytes a client sent (up to 32) end with its logout
    /// command: a client that then drops without a TLS close_notify ended
    /// its session normally.
    pub logged_out: fn(tail: &[u8]) -> bool,
    /// How long a logged-in session may stay silent both ways before the
    /// gateway closes it, unless the config says otherwise.
    pub default_idle_timeout: Duration,
    /// The provider's mail host for this protocol.
    pub default_upstream: fn(KnownProvider) -> DefaultUpstream,
    /// The delegated permission Microsoft's mail service wants for this
    /// protocol, under its scope host (`IMAP.AccessAsUser.All`).
    pub microsoft_scope: &'static str,
    /// How many upstream sessions of this protocol the provider allows per
    /// mailbox, where it documents a limit.
    pub sessions_per_mailbox: fn(KnownProvider) -> Option<usize>,
    /// Whether a session needs `SessionOptions::upstream_capabilities`
    /// before login (SMTP's EHLO promises what the upstream does).
    pub advertises_upstream_capabilities: bool,
}

impl std::fmt::Debug for Descriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.title)
    }
}
