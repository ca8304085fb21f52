//! A protocol as the upper layers see it: one value per protocol module
//! (`imap::PROTOCOL`, `pop3::PROTOCOL`), listed once in
//! [`crate::protocol`]. `server/`, the probe, metrics and the provider
//! catalogue read these fields and never name a protocol themselves.

use std::time::Duration;

use super::{ClientSession, FrameLimits, UpstreamLogin, UpstreamTls};
use crate::secret::Secret;

/// The last complete line of `tail`, without its line ending: the bytes
/// after the previous LF (or all of `tail`), when `tail` ends with LF.
pub fn last_line(tail: &[u8]) -> Option<&[u8]> {
    let body = tail.strip_suffix(b"\n")?;
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    Some(&tail[start..])
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    pub tls: ListenerTls,
    pub limits: FrameLimits,
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

/// Everything the upper layers need to know about one protocol.
pub struct Descriptor {
    /// The config name (`protocol = "imap"`, `[accounts.NAME.imap]`) and
    /// the `protocol` metric label.
    pub name: &'static str,
    /// The name people read: "IMAP".
    pub title: &'static str,
    /// A client session for a connection on a listener.
    pub new_session: fn(SessionOptions) -> Box<dyn ClientSession + Send>,
    /// Our own login at an upstream as `mailbox` with `token`.
    pub new_login: fn(
        mailbox: &str,
        token: &Secret<String>,
        tls: UpstreamTls,
    ) -> Box<dyn UpstreamLogin + Send>,
    /// The command that ends a logged-in upstream session politely.
    pub logout: &'static [u8],
    /// How the answer to `logout` starts, on a line of its own.
    pub logout_done: &'static [u8],
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
}

impl std::fmt::Debug for Descriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.title)
    }
}
