//! The sans-io vocabulary that the IMAP and POP3 gateways share.
//!
//! A client session ([`crate::imap::Session`], later POP3's) is fed client
//! bytes and yields [`Action`]s. An upstream login ([`crate::imap::Upstream`])
//! is fed upstream bytes and yields [`UpstreamAction`]s. Neither awaits, opens
//! a socket or reads a clock: `server::connection` owns the wire.

pub mod descriptor;
pub mod frame;
pub mod machine;
pub mod proxy_header;
pub mod sasl;

use bytes::Bytes;

use crate::secret::Secret;

pub use descriptor::{
    DefaultUpstream, Descriptor, KnownProvider, ListenerTls, LoginRequest, SessionOptions,
};
pub use frame::{Frame, FrameLimits, Framer, UPSTREAM_LIMITS};
pub use machine::Machine;

/// The local credentials a client presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The local username (an account's `username`).
    pub username: String,
    /// The local password, as sent.
    pub password: Secret<Vec<u8>>,
    /// The name the client greeted with (SMTP's `EHLO`), for the
    /// upstream's greeting; `None` where the protocol has none.
    pub hello: Option<String>,
}

/// What a client session asks its driver to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the client.
    Send(Bytes),
    /// Upgrade the client connection to TLS, then call `tls_established`.
    StartTls,
    /// Check these local credentials, log in upstream, then call
    /// `login_succeeded` or `login_failed`.
    Authenticate(Credentials),
    /// Login is complete: write `to_upstream` (client bytes that were already
    /// buffered) to the upstream, then relay both ways unchanged.
    Splice { to_upstream: Bytes },
    /// Close the client connection.
    Close,
}

/// A client conversation before login (IMAP's, POP3's), as the driver
/// sees it.
pub trait ClientSession {
    /// Adds bytes read from the client.
    fn feed(&mut self, bytes: &[u8]);
    /// The next action, or `None` when more client bytes are needed (or the
    /// session waits for one of the calls below).
    fn next_action(&mut self) -> Option<Action>;
    /// The handshake that `Action::StartTls` asked for is done.
    fn tls_established(&mut self);
    /// The login that `Action::Authenticate` asked for succeeded.
    fn login_succeeded(&mut self, upstream_capabilities: &[String]);
    /// The login failed.
    fn login_failed(&mut self, failure: LoginFailure);
    /// The gateway is shutting down: say goodbye unless logged in.
    fn shutdown(&mut self);
    /// Too many connections from this client: say so instead of greeting.
    fn too_busy(&mut self);
}

/// Our own login at an upstream (IMAP's, POP3's), as the driver sees it.
pub trait UpstreamLogin {
    /// Adds bytes read from the upstream.
    fn feed(&mut self, bytes: &[u8]);
    /// The next action, or `None` when more upstream bytes are needed.
    fn next_action(&mut self) -> Option<UpstreamAction>;
    /// The handshake that `UpstreamAction::StartTls` asked for is done.
    fn tls_established(&mut self);
}

/// Why a login failed, in the terms the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginFailure {
    /// Wrong local credentials, or the upstream refused the token for good.
    BadCredentials,
    /// The upstream or the OAuth server could not be reached; try later.
    Unavailable,
    /// The account was never authorized: an administrator must do it.
    NotAuthorizedYet,
    /// The provider refused the account's grant: an administrator must
    /// authorize it again.
    NeedsAuthorization,
    /// The upstream reports the mailbox as locked by another session.
    InUse,
    /// The account already has as many upstream sessions as its provider
    /// allows, and none ended in time.
    SessionLimit,
}

/// How an upstream connection gets private.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    /// TLS from the first byte (IMAP 993, POP3 995).
    Implicit,
    /// A plaintext greeting, then `STARTTLS` / `STLS`.
    StartTls,
}

/// What an upstream login asks its driver to do next.
///
/// `Debug` shows only the length of bytes to send: they carry the token.
#[derive(PartialEq, Eq)]
pub enum UpstreamAction {
    /// Write these bytes to the upstream.
    Send(Bytes),
    /// Upgrade the upstream connection to TLS, then call `tls_established`.
    StartTls,
    /// Logged in. `capabilities` is the upstream's list after login;
    /// `to_client` holds upstream bytes that followed the login reply and
    /// belong to the client.
    LoggedIn {
        capabilities: Vec<String>,
        to_client: Bytes,
    },
    /// The login failed; the connection is of no further use.
    Failed(UpstreamFailure),
}

/// Why an upstream login failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The upstream rejected the token. `status` is the HTTP-like status from
    /// the provider's error challenge (400, 401, ...), when it sent one.
    Rejected { status: Option<u16>, in_use: bool },
    /// The upstream can't serve the login now (IMAP `[UNAVAILABLE]`, POP3
    /// `[SYS/TEMP]` or `[SYS/PERM]`): not the credentials' fault.
    Unavailable(String),
    /// The upstream said something we can't follow, or said goodbye.
    Protocol(String),
    /// The upstream refuses this way of logging in for the mailbox, for
    /// reasons only its administrator can change (Microsoft's `535 5.7.139`:
    /// SMTP AUTH disabled for the mailbox or tenant); the text says which.
    Disabled(String),
}

impl std::fmt::Debug for UpstreamAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Send(bytes) => write!(f, "Send(<{} bytes>)", bytes.len()),
            Self::StartTls => f.write_str("StartTls"),
            Self::LoggedIn {
                capabilities,
                to_client,
            } => f
                .debug_struct("LoggedIn")
                .field("capabilities", capabilities)
                .field("to_client", &to_client.len())
                .finish(),
            Self::Failed(failure) => f.debug_tuple("Failed").field(failure).finish(),
        }
    }
}
