//! The scalar settings: limits, OAuth client behaviour, logging; each
//! default with the reason for its value.

use std::time::Duration;

use url::Url;

use super::{invalid, raw, ConfigError};
use crate::protocol::{self, Protocol};

/// Caps and timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open client connections at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    pub max_line: usize,
    pub max_literal: usize,
    /// How long a failed login waits before its NO.
    pub login_failure_delay: Duration,
    pub tls_handshake_timeout: Duration,
    /// How long a client may take from connecting to logging in.
    pub pre_auth_timeout: Duration,
    /// The budget for dialling the upstream and logging in there.
    pub upstream_timeout: Duration,
    /// How long relayed sessions may go on after SIGTERM.
    pub shutdown_grace: Duration,
    /// Connections from one client address that have not logged in yet.
    pub max_pre_login_per_ip: usize,
    /// The cap of the failed-login back-off.
    pub login_failure_max_delay: Duration,
    /// A logged-in session with no traffic either way is closed after
    /// this, per protocol (`limits.imap_idle_timeout`, ...); the default is
    /// the protocol's RFC minimum.
    pub idle_timeouts: [Duration; protocol::COUNT],
    /// How long a spare upstream connection, dialled after a login for the
    /// next one, is kept; zero: no spares.
    pub upstream_spare_for: Duration,
    /// How long a login waits for one of its account's upstream sessions
    /// (`max_sessions`) to end before it is refused.
    pub upstream_session_wait: Duration,
    /// How long a connection from a trusted load balancer may take to send
    /// its PROXY protocol header.
    pub proxy_header_timeout: Duration,
    /// TCP keepalive on client and upstream connections: how long a
    /// connection is idle before the first probe; `None`: off.
    pub tcp_keepalive: Option<Duration>,
    /// How long a connection over `max_pre_login_per_ip` waits for a slot
    /// before it is refused.
    pub pre_login_wait: Duration,
}

/// A burst from one host (a poller starting many jobs, a cluster behind
/// NAT) is served in turn rather than refused: logins take milliseconds.
pub const DEFAULT_PRE_LOGIN_WAIT: Duration = Duration::from_secs(10);

/// Under the 4 minutes after which Azure's load balancer (and many NATs)
/// drop an idle flow, which would end an IMAP IDLE session silently.
pub const DEFAULT_TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// A balancer sends its PROXY header with the connection's first packet.
pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// 32 half-open logins from one address is more than any poller needs,
/// and little for an attacker.
pub const DEFAULT_MAX_PRE_LOGIN_PER_IP: usize = 32;
/// Failed logins from one address or for one username wait twice as long
/// each time, up to 30 s.
pub const DEFAULT_LOGIN_FAILURE_MAX_DELAY: Duration = Duration::from_secs(30);
/// A sender whose account has all its upstream sessions busy waits this
/// long for one: most submissions take seconds, and SMTP clients retry a
/// `421` later anyway.
pub const DEFAULT_UPSTREAM_SESSION_WAIT: Duration = Duration::from_secs(30);
/// Long enough for a poller's next login in a burst; short enough that no
/// server closes a connection that hasn't logged in (Dovecot allows 3 min).
pub const DEFAULT_UPSTREAM_SPARE_FOR: Duration = Duration::from_secs(10);

/// Default connection cap: 20,000 sessions (two sockets each) fit in a
/// few hundred MiB and a raised file-descriptor limit.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20_000;
/// Default pre-login line cap; RFC 9051 §4 asks for at least 8000 octets.
pub const DEFAULT_MAX_LINE: usize = 8192;
/// Default pre-login literal cap: passwords and SASL responses are small.
pub const DEFAULT_MAX_LITERAL: usize = 8192;
/// A failed login waits 2 s: brute force gets slow, people don't notice.
pub const DEFAULT_LOGIN_FAILURE_DELAY: Duration = Duration::from_secs(2);
/// A TLS handshake needs two round trips; 10 s covers slow links.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pollers log in right away; a minute is generous (RFC 9051 §5.4 asks
/// only for the 30-minute limit after login).
pub const DEFAULT_PRE_AUTH_TIMEOUT: Duration = Duration::from_secs(60);
/// Pollers finish a fetch within seconds; 30 s lets them, and keeps a
/// service manager's stop timeout (90 s by default) out of reach.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Upstream dial, TLS and XOAUTH2 login together.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// OAuth client behaviour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthSettings {
    /// Accept `http://` endpoints on loopback addresses (tests only).
    pub allow_insecure_loopback_http: bool,
    pub request_timeout: Duration,
    /// Refresh an access token this long before it expires.
    pub refresh_margin: Duration,
    /// Run this (argv) when an account comes to need authorization.
    pub notify_command: Option<Vec<String>>,
    /// POST a JSON notice here when an account comes to need authorization.
    pub notify_url: Option<Url>,
    /// Keep every account's token fresh in the background (default), or
    /// only refresh when a login needs a token.
    pub refresh_in_background: bool,
    /// The first wait after a transient token failure; it doubles up to
    /// 10 minutes.
    pub retry_backoff: Duration,
}

/// Token endpoint calls are small; 30 s is patient but bounded.
pub const DEFAULT_OAUTH_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A first retry after 5 s rides out a blip without hammering an outage.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(5);
/// Some Microsoft endpoints reject tokens with less than ~10 minutes left.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(600);

/// The longest any duration setting may be: a day. Longer values are
/// mistakes, and bounded values keep deadline arithmetic in range.
pub(super) const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

pub(super) fn bounded(
    key: &str,
    given: Option<Duration>,
    default: Duration,
    nonzero: bool,
) -> Result<Duration, ConfigError> {
    let d = given.unwrap_or(default);
    if d > MAX_DURATION {
        return Err(invalid(key, "must be at most 24h"));
    }
    if nonzero && d.is_zero() {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(d)
}

pub(super) fn positive(key: &str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(n)
}

impl Limits {
    /// How long a logged-in `protocol` session may stay silent.
    pub fn idle_timeout(&self, protocol: Protocol) -> Duration {
        self.idle_timeouts[protocol.index()]
    }
}

/// The key of a protocol's idle timeout in `[limits]`.
fn idle_key(protocol: Protocol) -> String {
    format!("{}_idle_timeout", protocol.name)
}

/// `[limits]`: every cap and timeout, defaults filled in.
pub(super) fn limits(l: &raw::Limits) -> Result<Limits, ConfigError> {
    Ok(Limits {
        max_connections: positive(
            "limits.max_connections",
            l.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
        )?,
        max_line: positive("limits.max_line", l.max_line.unwrap_or(DEFAULT_MAX_LINE))?,
        max_literal: l.max_literal.unwrap_or(DEFAULT_MAX_LITERAL),
        login_failure_delay: bounded(
            "limits.login_failure_delay",
            l.login_failure_delay,
            DEFAULT_LOGIN_FAILURE_DELAY,
            false,
        )?,
        tls_handshake_timeout: bounded(
            "limits.tls_handshake_timeout",
            l.tls_handshake_timeout,
            DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            true,
        )?,
        pre_auth_timeout: bounded(
            "limits.pre_auth_timeout",
            l.pre_auth_timeout,
            DEFAULT_PRE_AUTH_TIMEOUT,
            true,
        )?,
        upstream_timeout: bounded(
            "limits.upstream_timeout",
            l.upstream_timeout,
            DEFAULT_UPSTREAM_TIMEOUT,
            true,
        )?,
        shutdown_grace: bounded(
            "limits.shutdown_grace",
            l.shutdown_grace,
            DEFAULT_SHUTDOWN_GRACE,
            false,
        )?,
        max_pre_login_per_ip: positive(
            "limits.max_pre_login_per_ip",
            l.max_pre_login_per_ip
                .unwrap_or(DEFAULT_MAX_PRE_LOGIN_PER_IP),
        )?,
        login_failure_max_delay: bounded(
            "limits.login_failure_max_delay",
            l.login_failure_max_delay,
            DEFAULT_LOGIN_FAILURE_MAX_DELAY,
            false,
        )?,
        idle_timeouts: idle_timeouts(&l.per_protocol)?,
        upstream_spare_for: bounded(
            "limits.upstream_spare_for",
            l.upstream_spare_for,
            DEFAULT_UPSTREAM_SPARE_FOR,
            false,
        )?,
        upstream_session_wait: bounded(
            "limits.upstream_session_wait",
            l.upstream_session_wait,
            DEFAULT_UPSTREAM_SESSION_WAIT,
            false,
        )?,
        proxy_header_timeout: bounded(
            "limits.proxy_header_timeout",
            l.proxy_header_timeout,
            DEFAULT_PROXY_HEADER_TIMEOUT,
            true,
        )?,
        tcp_keepalive: Some(bounded(
            "limits.tcp_keepalive",
            l.tcp_keepalive,
            DEFAULT_TCP_KEEPALIVE,
            false,
        )?)
        .filter(|idle| !idle.is_zero()),
        pre_login_wait: bounded(
            "limits.pre_login_wait",
            l.pre_login_wait,
            DEFAULT_PRE_LOGIN_WAIT,
            false,
        )?,
    })
}

/// `<protocol>_idle_timeout` for each protocol; any other key left over in
/// `[limits]` is unknown.
fn idle_timeouts(
    given: &std::collections::BTreeMap<String, figment::value::Value>,
) -> Result<[Duration; protocol::COUNT], ConfigError> {
    if let Some(unknown) = given
        .keys()
        .find(|k| !Protocol::all().any(|p| idle_key(p) == **k))
    {
        return Err(invalid(format!("limits.{unknown}"), "unknown key"));
    }
    let mut timeouts = [Duration::ZERO; protocol::COUNT];
    for p in Protocol::all() {
        let key = idle_key(p);
        let value = given
            .get(&key)
            .map(|v| {
                let text = v.as_str().ok_or_else(|| {
                    invalid(
                        format!("limits.{key}"),
                        "must be a duration such as \"30m\"",
                    )
                })?;
                humantime::parse_duration(text).map_err(|e| {
                    invalid(
                        format!("limits.{key}"),
                        format!("{text:?} is not a duration: {e}"),
                    )
                })
            })
            .transpose()?;
        timeouts[p.index()] = bounded(
            &format!("limits.{key}"),
            value,
            p.default_idle_timeout,
            true,
        )?;
    }
    Ok(timeouts)
}

/// `[oauth]`: the OAuth client's behaviour.
pub(super) fn oauth(o: raw::OAuth) -> Result<OAuthSettings, ConfigError> {
    Ok(OAuthSettings {
        allow_insecure_loopback_http: o.allow_insecure_loopback_http,
        request_timeout: bounded(
            "oauth.request_timeout",
            o.request_timeout,
            DEFAULT_OAUTH_REQUEST_TIMEOUT,
            true,
        )?,
        refresh_margin: bounded(
            "oauth.refresh_margin",
            o.refresh_margin,
            DEFAULT_REFRESH_MARGIN,
            false,
        )?,
        refresh_in_background: o.refresh_in_background.unwrap_or(true),
        retry_backoff: bounded(
            "oauth.retry_backoff",
            o.retry_backoff,
            DEFAULT_RETRY_BACKOFF,
            true,
        )?,
        notify_command: match o.notify_command {
            Some(argv) if argv.first().is_none_or(String::is_empty) => {
                return Err(invalid("oauth.notify_command", "must name a program"))
            }
            other => other,
        },
        notify_url: o
            .notify_url
            .map(|u| {
                Url::parse(&u)
                    .map_err(|e| invalid("oauth.notify_url", format!("{u:?} is not a URL: {e}")))
            })
            .transpose()?,
    })
}
