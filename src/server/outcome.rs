//! How a connection ended, classified once: a closed set of kinds (the
//! `error_kind` of the connection summary and the metric label), each with
//! whose fault it is, which decides how loudly it is logged.

use crate::proto::LoginFailure;

/// Whose fault an ending is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// Nobody's: a normal end.
    None,
    /// The mail client: it went away, stalled, or sent what can't work.
    Client,
    /// The upstream mail server.
    Upstream,
    /// The OAuth provider's token endpoint.
    Provider,
    /// This gateway or its administrator: shutdown, an account that needs
    /// authorization, a store that can't be read.
    Local,
}

impl Blame {
    pub fn label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Client => "client",
            Self::Upstream => "upstream",
            Self::Provider => "provider",
            Self::Local => "local",
        }
    }
}

/// How a connection, or a login on it, ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A normal end: the session was relayed and one side closed cleanly,
    /// or the client logged out before logging in.
    None,
    /// The client closed before logging in.
    ClientGone,
    /// A read or write on the client connection failed.
    ClientIo,
    TlsHandshake,
    TlsHandshakeTimeout,
    /// No login before `limits.pre_auth_timeout`.
    PreAuthTimeout,
    /// A logged-in session silent both ways for the idle timeout.
    IdleTimeout,
    /// The gateway shut down.
    Shutdown,
    /// Wrong local credentials.
    BadCredentials,
    /// The account must be authorized (for the first time, or again).
    NeedsAuthorization,
    /// The token endpoint could not be reached or answered with an error
    /// worth retrying.
    TokenUnavailable,
    /// The token store could not be read or written.
    TokenStore,
    /// The upstream could not be reached, or failed the login for its own
    /// reasons (`[UNAVAILABLE]`, a protocol error, a timeout).
    UpstreamUnavailable,
    /// The upstream refused the token, even a fresh one.
    UpstreamRejected,
    /// The upstream reports the mailbox in use by another session.
    MailboxInUse,
    /// The account's upstream sessions were all busy for the whole wait.
    SessionLimit,
    /// A read or write on the upstream connection failed while relaying.
    UpstreamIo,
    /// No valid PROXY protocol header from a trusted balancer, or one
    /// from an address that is not trusted.
    ProxyHeader,
    /// A bug: the session asked for something out of order.
    Internal,
}

impl ErrorKind {
    /// The closed label.
    pub fn label(self) -> &'static str {
        self.describe().0
    }

    /// Whose fault it is.
    pub fn blame(self) -> Blame {
        self.describe().1
    }

    fn describe(self) -> (&'static str, Blame) {
        match self {
            Self::None => ("none", Blame::None),
            Self::ClientGone => ("client_gone", Blame::Client),
            Self::ClientIo => ("client_io", Blame::Client),
            Self::TlsHandshake => ("tls_handshake", Blame::Client),
            Self::TlsHandshakeTimeout => ("tls_handshake_timeout", Blame::Client),
            Self::PreAuthTimeout => ("pre_auth_timeout", Blame::Client),
            Self::IdleTimeout => ("idle_timeout", Blame::Client),
            Self::Shutdown => ("shutdown", Blame::Local),
            Self::BadCredentials => ("bad_credentials", Blame::Client),
            Self::NeedsAuthorization => ("needs_authorization", Blame::Local),
            Self::TokenUnavailable => ("token_unavailable", Blame::Provider),
            Self::TokenStore => ("token_store", Blame::Local),
            Self::UpstreamUnavailable => ("upstream_unavailable", Blame::Upstream),
            Self::UpstreamRejected => ("upstream_rejected", Blame::Upstream),
            Self::MailboxInUse => ("mailbox_in_use", Blame::Upstream),
            Self::SessionLimit => ("session_limit", Blame::Upstream),
            Self::UpstreamIo => ("upstream_io", Blame::Upstream),
            Self::ProxyHeader => ("proxy_header", Blame::Client),
            Self::Internal => ("internal", Blame::Local),
        }
    }
}

/// A failed login: what the client is told, and what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginError {
    pub failure: LoginFailure,
    pub kind: ErrorKind,
}

impl LoginError {
    pub fn new(failure: LoginFailure, kind: ErrorKind) -> Self {
        Self { failure, kind }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_snake_case_words() {
        let kinds = [
            ErrorKind::None,
            ErrorKind::ClientGone,
            ErrorKind::ClientIo,
            ErrorKind::TlsHandshake,
            ErrorKind::TlsHandshakeTimeout,
            ErrorKind::PreAuthTimeout,
            ErrorKind::IdleTimeout,
            ErrorKind::Shutdown,
            ErrorKind::BadCredentials,
            ErrorKind::ProxyHeader,
            ErrorKind::NeedsAuthorization,
            ErrorKind::TokenUnavailable,
            ErrorKind::TokenStore,
            ErrorKind::UpstreamUnavailable,
            ErrorKind::UpstreamRejected,
            ErrorKind::MailboxInUse,
            ErrorKind::SessionLimit,
            ErrorKind::UpstreamIo,
            ErrorKind::Internal,
        ];
        let labels: std::collections::BTreeSet<_> = kinds.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), kinds.len());
        assert!(labels
            .iter()
            .all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
        assert_eq!(ErrorKind::None.blame(), Blame::None);
        assert_eq!(ErrorKind::TokenUnavailable.blame(), Blame::Provider);
    }
}
