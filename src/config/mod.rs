//! Configuration: a TOML file, then `MAILGATE_*` environment overrides,
//! validated in one step into typed values before any port is bound.
//!
//! Errors name the offending key, e.g.
//! `accounts.jira.integration: no integration named "ms"`.

mod raw;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format as _, Toml};
use figment::Figment;
use url::Url;

use crate::proto::UpstreamTls;
use crate::secret::Secret;

pub use raw::{Cloud, Grant, LogFormat, Protocol, Provider};

/// A config error that names its key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment could not be read or deserialized.
    #[error("{0}")]
    Load(Box<figment::Error>),
    /// A value is invalid.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    pub state_dir: PathBuf,
    pub http: Option<HttpSettings>,
    /// Where the token store's key comes from.
    pub store_key: crate::oauth::KeySource,
    pub log: LogSettings,
    pub listeners: Vec<Listener>,
    /// PEM files for the listeners; `None` means a self-signed certificate
    /// kept in the state directory.
    pub certificate: Option<CertificateFiles>,
    pub limits: Limits,
    pub oauth: OAuthSettings,
    pub integrations: BTreeMap<String, Arc<Integration>>,
    pub accounts: BTreeMap<String, Arc<Account>>,
}

/// One listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub protocol: Protocol,
    pub address: SocketAddr,
    pub tls: ListenerTls,
}

/// How a listener's clients get TLS. Plaintext exists only on loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerTls {
    Implicit,
    StartTls,
    Plaintext,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

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
    /// A logged-in IMAP session with no traffic either way is closed
    /// after this (RFC 9051 §5.4: at least 30 minutes).
    pub imap_idle_timeout: Duration,
    /// The same for POP3 (RFC 1939 §3: at least 10 minutes).
    pub pop3_idle_timeout: Duration,
    /// How long a spare upstream connection, dialled after a login for the
    /// next one, is kept; zero: no spares.
    pub upstream_spare_for: Duration,
}

/// 32 half-open logins from one address is more than any poller needs,
/// and little for an attacker.
pub const DEFAULT_MAX_PRE_LOGIN_PER_IP: usize = 32;
/// Failed logins from one address or for one username wait twice as long
/// each time, up to 30 s.
pub const DEFAULT_LOGIN_FAILURE_MAX_DELAY: Duration = Duration::from_secs(30);
/// RFC 9051 §5.4's minimum autologout time.
pub const DEFAULT_IMAP_IDLE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// RFC 1939 §3's minimum autologout time.
pub const DEFAULT_POP3_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
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

/// How and how much mailgate logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `mailgate=debug`;
    /// `RUST_LOG` overrides it.
    pub level: String,
}

/// The HTTP listener: the OAuth redirect URL, metrics and health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    pub address: SocketAddr,
    pub tls: HttpTls,
    /// The base of the redirect URLs, as the admin's browser reaches us.
    pub public_url: Url,
    /// The credential that opens the integrations page to peers other than
    /// loopback; without one, only loopback peers get the page.
    pub admin: Option<AdminCredential>,
    /// Ask loopback peers for the credential too (behind a reverse proxy on
    /// the same host, every peer is loopback).
    pub admin_password_on_loopback: bool,
}

/// The integrations page's login, for HTTP Basic authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCredential {
    pub username: String,
    /// An argon2id PHC string (`mailgate hash-password`).
    pub password_hash: Secret<String>,
}

/// HTTPS, or HTTP on a loopback address only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpTls {
    Implicit,
    Plaintext,
}

/// Token endpoint calls are small; 30 s is patient but bounded.
pub const DEFAULT_OAUTH_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A first retry after 5 s rides out a blip without hammering an outage.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(5);
/// Some Microsoft endpoints reject tokens with less than ~10 minutes left.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(600);

/// An OAuth 2.0 client registration at a provider.
#[derive(Debug, PartialEq, Eq)]
pub struct Integration {
    pub name: String,
    pub provider: Provider,
    pub description: Option<String>,
    pub client_id: String,
    /// Write-only: never printed, never logged.
    pub client_secret: Option<Secret<String>>,
    /// Unix seconds when the client secret expires, if the admin said.
    pub client_secret_expires: Option<u64>,
    /// A certificate for `private_key_jwt` client authentication.
    pub client_certificate: Option<ClientCertificate>,
    /// A Google service account key, for the JWT bearer grant.
    pub service_account: Option<ServiceAccount>,
    pub scopes: Vec<String>,
    pub authorization_endpoint: Url,
    pub token_endpoint: Url,
    pub device_authorization_endpoint: Option<Url>,
    /// The path of the redirect URL under `http.public_url`.
    pub redirect_path: String,
    /// The provider's mail hosts, when it has them.
    default_imap: Option<(String, u16)>,
    default_pop3: Option<(String, u16)>,
}

/// A client certificate and key for `private_key_jwt` (RFC 7523 §2.2).
#[derive(Debug, PartialEq, Eq)]
pub struct ClientCertificate {
    /// SHA-256 of the certificate's DER, the JWT header's `x5t#S256`.
    pub thumbprint_sha256: Vec<u8>,
    pub private_key_pem: Secret<String>,
}

/// The parts of a Google service account key that mailgate uses.
#[derive(Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key_id: Option<String>,
    pub private_key_pem: Secret<String>,
}

/// A local login mapped to an upstream mailbox.
#[derive(Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub username: String,
    /// An argon2id PHC string. Not a password, but an offline guessing
    /// target: redacted like one.
    pub password_hash: Secret<String>,
    pub integration: Arc<Integration>,
    /// The XOAUTH2 `user=`; may differ from the token's owner.
    pub mailbox: String,
    pub grant: Grant,
    pub refresh_token: Option<Secret<String>>,
    /// The upstream IMAP server; `None` only for a custom provider that
    /// gives none and has no IMAP listener to serve.
    pub imap: Option<UpstreamServer>,
    /// The upstream POP3 server, likewise.
    pub pop3: Option<UpstreamServer>,
}

impl Account {
    /// The upstream for `protocol`.
    pub fn upstream(&self, protocol: Protocol) -> Option<&UpstreamServer> {
        match protocol {
            Protocol::Imap => self.imap.as_ref(),
            Protocol::Pop3 => self.pop3.as_ref(),
        }
    }
}

/// An upstream mail server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamServer {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
    /// An extra CA, trusted beside the webpki roots.
    pub ca_file: Option<PathBuf>,
}

impl Config {
    /// Loads `path`, applies `MAILGATE_*` overrides, and validates.
    ///
    /// # Errors
    /// When the file can't be read, or any value is invalid.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_figment(
            Figment::new()
                .merge(Toml::file_exact(path))
                // MAILGATE_CONFIG names the file and MAILGATE_TOKEN_KEY holds
                // the store key; neither is a key in the file.
                .merge(
                    Env::prefixed("MAILGATE_")
                        .ignore(&["config", "token_key"])
                        .split("__"),
                ),
        )
    }

    /// Validates whatever `figment` holds.
    ///
    /// # Errors
    /// When a value is missing or invalid.
    pub fn from_figment(figment: Figment) -> Result<Self, ConfigError> {
        let raw: raw::Config = figment
            .extract()
            .map_err(|e| ConfigError::Load(Box::new(e)))?;
        validate(raw)
    }

    /// The account whose local username is `username`.
    pub fn account_by_username(&self, username: &str) -> Option<&Arc<Account>> {
        self.accounts.values().find(|a| a.username == username)
    }

    /// A human summary, with secrets shown only as "set".
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "state_dir: {}", self.state_dir.display());
        let _ = writeln!(
            s,
            "certificate: {}",
            match &self.certificate {
                Some(c) => format!("{} (key {})", c.cert.display(), c.key.display()),
                None => "self-signed, kept in the state directory".into(),
            }
        );
        for l in &self.listeners {
            let _ = writeln!(
                s,
                "listener: {:?} on {} ({:?})",
                l.protocol, l.address, l.tls
            );
        }
        if let Some(h) = &self.http {
            let _ = writeln!(
                s,
                "http: {} ({:?}), public URL {}, integrations page: {}",
                h.address,
                h.tls,
                h.public_url,
                match (&h.admin, h.admin_password_on_loopback) {
                    (None, _) => "loopback only".to_owned(),
                    (Some(a), false) => {
                        format!(
                            "loopback, or user {} with a password (hash set)",
                            a.username
                        )
                    }
                    (Some(a), true) => format!("user {} with a password (hash set)", a.username),
                }
            );
        }
        for i in self.integrations.values() {
            let _ = writeln!(
                s,
                "integration {}: {:?}, client id {}, client secret {}, scopes [{}]\n  authorization {}\n  token {}",
                i.name,
                i.provider,
                i.client_id,
                if i.client_secret.is_some() { "set" } else { "not set" },
                i.scopes.join(" "),
                i.authorization_endpoint,
                i.token_endpoint
            );
        }
        for a in self.accounts.values() {
            let _ = writeln!(
                s,
                "account {}: user {}, integration {}, mailbox {}, grant {:?}, imap {}, pop3 {}",
                a.name,
                a.username,
                a.integration.name,
                a.mailbox,
                a.grant,
                describe(a.imap.as_ref()),
                describe(a.pop3.as_ref()),
            );
        }
        s
    }
}

fn describe(u: Option<&UpstreamServer>) -> String {
    u.map_or_else(
        || "none".into(),
        |u| format!("{}:{} ({:?})", u.host, u.port, u.tls),
    )
}

fn validate(raw: raw::Config) -> Result<Config, ConfigError> {
    let listeners = raw
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| listener(&format!("listeners[{i}]"), l))
        .collect::<Result<Vec<_>, _>>()?;
    let l = &raw.limits;
    let limits = Limits {
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
        imap_idle_timeout: bounded(
            "limits.imap_idle_timeout",
            l.imap_idle_timeout,
            DEFAULT_IMAP_IDLE_TIMEOUT,
            true,
        )?,
        pop3_idle_timeout: bounded(
            "limits.pop3_idle_timeout",
            l.pop3_idle_timeout,
            DEFAULT_POP3_IDLE_TIMEOUT,
            true,
        )?,
        upstream_spare_for: bounded(
            "limits.upstream_spare_for",
            l.upstream_spare_for,
            DEFAULT_UPSTREAM_SPARE_FOR,
            false,
        )?,
    };
    let oauth = OAuthSettings {
        allow_insecure_loopback_http: raw.oauth.allow_insecure_loopback_http,
        request_timeout: bounded(
            "oauth.request_timeout",
            raw.oauth.request_timeout,
            DEFAULT_OAUTH_REQUEST_TIMEOUT,
            true,
        )?,
        refresh_margin: bounded(
            "oauth.refresh_margin",
            raw.oauth.refresh_margin,
            DEFAULT_REFRESH_MARGIN,
            false,
        )?,
        refresh_in_background: raw.oauth.refresh_in_background.unwrap_or(true),
        retry_backoff: bounded(
            "oauth.retry_backoff",
            raw.oauth.retry_backoff,
            DEFAULT_RETRY_BACKOFF,
            true,
        )?,
        notify_command: match raw.oauth.notify_command {
            Some(argv) if argv.first().is_none_or(String::is_empty) => {
                return Err(invalid("oauth.notify_command", "must name a program"))
            }
            other => other,
        },
        notify_url: raw
            .oauth
            .notify_url
            .map(|u| {
                Url::parse(&u)
                    .map_err(|e| invalid("oauth.notify_url", format!("{u:?} is not a URL: {e}")))
            })
            .transpose()?,
    };
    let mut integrations = BTreeMap::new();
    for (name, i) in raw.integrations {
        let key = format!("integrations.{name}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                key,
                "integration names use letters, digits, '-', '_' and '.'",
            ));
        }
        integrations.insert(name.clone(), Arc::new(integration(&key, name, i, &oauth)?));
    }
    let mut accounts = BTreeMap::new();
    let mut usernames = HashMap::new();
    let serves = |p: Protocol| listeners.iter().any(|l| l.protocol == p);
    let protocols = (serves(Protocol::Imap), serves(Protocol::Pop3));
    for (name, a) in raw.accounts {
        let key = format!("accounts.{name}");
        // Account names name files in the token store.
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || name.starts_with('.')
        {
            return Err(invalid(
                key,
                "account names use letters, digits, '-', '_' and '.', and don't start with '.'",
            ));
        }
        let account = account(&key, name.clone(), a, &integrations, protocols)?;
        if let Some(other) = usernames.insert(account.username.clone(), name.clone()) {
            return Err(invalid(
                format!("{key}.username"),
                format!(
                    "username {:?} is also used by account {other:?}",
                    account.username
                ),
            ));
        }
        accounts.insert(name, Arc::new(account));
    }
    let http = raw.http.map(http_settings).transpose()?;
    let store_key = match std::env::var(crate::oauth::KEY_ENV) {
        Ok(hex) => crate::oauth::KeySource::Hex(Secret::new(hex)),
        Err(_) => crate::oauth::KeySource::File(
            raw.store
                .key_file
                .unwrap_or_else(|| raw.state_dir.join("token.key")),
        ),
    };
    if let Some(c) = &raw.certificate {
        check_certificate_files(&c.cert, &c.key)?;
    }
    let log = LogSettings {
        format: raw.log.format.unwrap_or(LogFormat::Human),
        level: raw.log.level.unwrap_or_else(|| "info".into()),
    };
    if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
        return Err(invalid(
            "log.level",
            format!(
                "{:?} is not a log filter (try info, debug, mailgate=debug)",
                log.level
            ),
        ));
    }
    Ok(Config {
        http,
        store_key,
        log,
        state_dir: raw.state_dir,
        listeners,
        certificate: raw.certificate.map(|c| CertificateFiles {
            cert: c.cert,
            key: c.key,
        }),
        limits,
        oauth,
        integrations,
        accounts,
    })
}

fn http_settings(h: raw::Http) -> Result<HttpSettings, ConfigError> {
    let address: SocketAddr = h.address.parse().map_err(|e| {
        invalid(
            "http.address",
            format!("{:?} is not an IP:port address: {e}", h.address),
        )
    })?;
    let tls = match h.tls {
        raw::HttpTls::Implicit => HttpTls::Implicit,
        raw::HttpTls::Plaintext if address.ip().is_loopback() => HttpTls::Plaintext,
        raw::HttpTls::Plaintext => {
            return Err(invalid(
                "http.tls",
                "plaintext is allowed only on a loopback address",
            ))
        }
    };
    let default = format!(
        "{}://{address}",
        if tls == HttpTls::Implicit {
            "https"
        } else {
            "http"
        }
    );
    let given = h.public_url.unwrap_or(default);
    let public_url = Url::parse(&given)
        .map_err(|e| invalid("http.public_url", format!("{given:?} is not a URL: {e}")))?;
    // Authorization codes travel over HTTPS only; plain http is for a
    // browser on the same machine.
    match public_url.scheme() {
        "https" => {}
        "http" if is_loopback_host(&public_url) => {}
        _ => {
            return Err(invalid(
                "http.public_url",
                "must be https (http only on a loopback address)",
            ))
        }
    }
    let admin = match h.admin_password_hash {
        Some(hash) => {
            argon2id_hash("http.admin_password_hash", &hash)?;
            let username = h.admin_username.unwrap_or_else(|| "admin".into());
            if username.is_empty() || username.contains(':') {
                return Err(invalid(
                    "http.admin_username",
                    "must be non-empty and without ':'",
                ));
            }
            Some(AdminCredential {
                username,
                password_hash: hash,
            })
        }
        None if h.admin_username.is_some() => {
            return Err(invalid(
                "http.admin_password_hash",
                "admin_username is set but admin_password_hash is not",
            ))
        }
        None => None,
    };
    // Plain HTTP on loopback with a public URL elsewhere means a reverse
    // proxy in front: every request then comes from loopback, so loopback
    // can't be trusted by default.
    let behind_proxy = tls == HttpTls::Plaintext && !is_loopback_host(&public_url);
    let admin_password_on_loopback = h.admin_password_on_loopback.unwrap_or(behind_proxy);
    if h.admin_password_on_loopback == Some(true) && admin.is_none() {
        return Err(invalid(
            "http.admin_password_hash",
            "admin_password_on_loopback needs an admin_password_hash",
        ));
    }
    Ok(HttpSettings {
        address,
        tls,
        public_url,
        admin,
        admin_password_on_loopback,
    })
}

/// Checks that `hash` is an argon2id PHC string.
fn argon2id_hash(key: &str, hash: &Secret<String>) -> Result<(), ConfigError> {
    match argon2::PasswordHash::new(hash.expose()) {
        Ok(h) if h.algorithm.as_str() == "argon2id" => Ok(()),
        Ok(_) => Err(invalid(
            key,
            "must be an argon2id hash (see mailgate hash-password)",
        )),
        Err(e) => Err(invalid(key, format!("not a PHC hash string: {e}"))),
    }
}

impl Config {
    /// The redirect URL of `integration`, to register at the provider.
    pub fn redirect_url(&self, integration: &Integration) -> Option<Url> {
        let http = self.http.as_ref()?;
        let mut url = http.public_url.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}{}", integration.redirect_path));
        url.set_query(None);
        Some(url)
    }
}

/// The longest any duration setting may be: a day. Longer values are
/// mistakes, and bounded values keep deadline arithmetic in range.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

fn bounded(
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

/// How many PEM certificates `path` holds.
fn pem_certificates(path: &Path) -> Result<usize, String> {
    use rustls::pki_types::pem::PemObject as _;
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    certs
        .map(|c| {
            c.map(|_| ())
                .map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(|v| v.len())
}

/// The listener certificate and key must load before anything binds.
fn check_certificate_files(cert: &Path, key: &Path) -> Result<(), ConfigError> {
    use rustls::pki_types::pem::PemObject as _;
    match pem_certificates(cert) {
        Ok(0) => {
            return Err(invalid(
                "certificate.cert",
                format!("{}: no certificate in the file", cert.display()),
            ))
        }
        Ok(_) => {}
        Err(e) => return Err(invalid("certificate.cert", e)),
    }
    rustls::pki_types::PrivateKeyDer::from_pem_file(key)
        .map(|_| ())
        .map_err(|e| invalid("certificate.key", format!("{}: {e}", key.display())))
}

fn positive(key: &str, n: usize) -> Result<usize, ConfigError> {
    if n == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(n)
}

fn listener(key: &str, l: &raw::Listener) -> Result<Listener, ConfigError> {
    let address: SocketAddr = l.address.parse().map_err(|e| {
        invalid(
            format!("{key}.address"),
            format!("{:?} is not an IP:port address: {e}", l.address),
        )
    })?;
    let tls = match l.tls {
        raw::ListenerTls::Implicit => ListenerTls::Implicit,
        raw::ListenerTls::Starttls => ListenerTls::StartTls,
        raw::ListenerTls::Plaintext => {
            if !address.ip().is_loopback() {
                return Err(invalid(
                    format!("{key}.tls"),
                    "plaintext is allowed only on a loopback address",
                ));
            }
            ListenerTls::Plaintext
        }
    };
    Ok(Listener {
        protocol: l.protocol,
        address,
        tls,
    })
}

/// A provider's documented endpoints, mail scopes and mail hosts.
struct ProviderDefaults {
    authorization: String,
    token: String,
    device: Option<String>,
    scopes: Vec<String>,
    imap: (String, u16),
    pop3: (String, u16),
}

/// Google's and Microsoft's documented defaults; `None` for custom.
fn provider_defaults(provider: Provider, tenant: &str, cloud: Cloud) -> Option<ProviderDefaults> {
    match provider {
        Provider::Google => Some(ProviderDefaults {
            authorization: "https://accounts.google.com/o/oauth2/auth".into(),
            token: "https://oauth2.googleapis.com/token".into(),
            // Google's device flow doesn't offer the mail scope.
            device: None,
            scopes: vec!["https://mail.google.com/".into()],
            imap: ("imap.gmail.com".into(), 993),
            pop3: ("pop.gmail.com".into(), 995),
        }),
        Provider::Microsoft => {
            let (login, scope_host, mail_host) = match cloud {
                Cloud::Global => (
                    "login.microsoftonline.com",
                    "outlook.office.com",
                    "outlook.office365.com",
                ),
                Cloud::Usgov => (
                    "login.microsoftonline.us",
                    "outlook.office365.us",
                    "outlook.office365.us",
                ),
                Cloud::China => (
                    "login.partner.microsoftonline.cn",
                    "partner.outlook.cn",
                    "partner.outlook.cn",
                ),
            };
            let base = format!("https://{login}/{tenant}/oauth2/v2.0");
            Some(ProviderDefaults {
                authorization: format!("{base}/authorize"),
                token: format!("{base}/token"),
                device: Some(format!("{base}/devicecode")),
                scopes: vec![
                    format!("https://{scope_host}/IMAP.AccessAsUser.All"),
                    format!("https://{scope_host}/POP.AccessAsUser.All"),
                    "offline_access".into(),
                ],
                imap: (mail_host.into(), 993),
                pop3: (mail_host.into(), 995),
            })
        }
        Provider::Custom => None,
    }
}

fn integration(
    key: &str,
    name: String,
    i: raw::Integration,
    oauth: &OAuthSettings,
) -> Result<Integration, ConfigError> {
    if i.client_id.is_empty() {
        return Err(invalid(format!("{key}.client_id"), "must not be empty"));
    }
    if i.provider != Provider::Microsoft {
        for (field, given) in [("tenant", i.tenant.is_some()), ("cloud", i.cloud.is_some())] {
            if given {
                return Err(invalid(
                    format!("{key}.{field}"),
                    "applies only to provider \"microsoft\"",
                ));
            }
        }
    }
    let tenant = i.tenant.as_deref().unwrap_or("common");
    if tenant.is_empty()
        || !tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
    {
        return Err(invalid(
            format!("{key}.tenant"),
            "must be common, organizations, consumers, a tenant id or a domain",
        ));
    }
    let defaults = provider_defaults(i.provider, tenant, i.cloud.unwrap_or(Cloud::Global));
    let required = |field: &str| {
        invalid(
            format!("{key}.{field}"),
            "is required for a custom provider",
        )
    };
    let authorization_endpoint = i
        .authorization_endpoint
        .or_else(|| defaults.as_ref().map(|d| d.authorization.clone()))
        .ok_or_else(|| required("authorization_endpoint"))?;
    let token_endpoint = i
        .token_endpoint
        .or_else(|| defaults.as_ref().map(|d| d.token.clone()))
        .ok_or_else(|| required("token_endpoint"))?;
    let device_endpoint = i
        .device_authorization_endpoint
        .or_else(|| defaults.as_ref().and_then(|d| d.device.clone()));
    let scopes = match (i.scopes, &defaults) {
        (Some(s), _) if !s.is_empty() => s,
        (Some(_), _) => return Err(invalid(format!("{key}.scopes"), "must not be empty")),
        (None, Some(d)) => d.scopes.clone(),
        (None, None) => return Err(required("scopes")),
    };
    let client_secret = match (i.client_secret, i.client_secret_file, i.client_secret_env) {
        (None, None, None) => None,
        (Some(s), None, None) => Some(s.expose().clone()),
        (None, Some(path), None) => Some(
            std::fs::read_to_string(&path)
                .map_err(|e| {
                    invalid(
                        format!("{key}.client_secret_file"),
                        format!("can't read {}: {e}", path.display()),
                    )
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
        ),
        (None, None, Some(var)) => Some(std::env::var(&var).map_err(|_| {
            invalid(
                format!("{key}.client_secret_env"),
                format!("environment variable {var} is not set"),
            )
        })?),
        _ => {
            return Err(invalid(
                format!("{key}.client_secret"),
                "give at most one of client_secret, client_secret_file and client_secret_env",
            ))
        }
    };
    let client_certificate = match (i.client_certificate_file, i.client_key_file) {
        (None, None) => None,
        (Some(cert), Some(key_file)) => Some(client_certificate(key, &cert, &key_file)?),
        _ => {
            return Err(invalid(
                format!("{key}.client_certificate_file"),
                "client_certificate_file and client_key_file go together",
            ))
        }
    };
    let service_account = i
        .service_account_file
        .map(|path| service_account(key, &path))
        .transpose()?;
    let client_secret_expires = i
        .client_secret_expires
        .map(|d| {
            unix_date(&d).ok_or_else(|| {
                invalid(
                    format!("{key}.client_secret_expires"),
                    "must be a date, YYYY-MM-DD",
                )
            })
        })
        .transpose()?;
    let authorization_endpoint = endpoint(
        &format!("{key}.authorization_endpoint"),
        &authorization_endpoint,
        oauth,
    )?;
    let token_endpoint = endpoint(&format!("{key}.token_endpoint"), &token_endpoint, oauth)?;
    let device_authorization_endpoint = device_endpoint
        .map(|d| endpoint(&format!("{key}.device_authorization_endpoint"), &d, oauth))
        .transpose()?;
    Ok(Integration {
        redirect_path: redirect_path(&name, &authorization_endpoint, &token_endpoint),
        name,
        provider: i.provider,
        description: i.description,
        client_id: i.client_id,
        client_secret: client_secret.map(Secret::new),
        client_secret_expires,
        client_certificate,
        service_account,
        scopes,
        authorization_endpoint,
        token_endpoint,
        device_authorization_endpoint,
        default_imap: defaults.as_ref().map(|d| d.imap.clone()),
        default_pop3: defaults.as_ref().map(|d| d.pop3.clone()),
    })
}

/// `/oauth2/callback/<integration>-<8 hex digits of SHA-256 over both
/// endpoints>`: registering it at the provider pins these endpoints, and
/// changing an endpoint changes the URL.
fn redirect_path(name: &str, authorization: &Url, token: &Url) -> String {
    let mut input = Vec::new();
    input.extend_from_slice(authorization.as_str().as_bytes());
    input.push(b'\n');
    input.extend_from_slice(token.as_str().as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let hex: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("/oauth2/callback/{name}-{hex}")
}

fn client_certificate(
    key: &str,
    cert: &Path,
    key_file: &Path,
) -> Result<ClientCertificate, ConfigError> {
    use rustls::pki_types::pem::PemObject as _;
    let cert_der = rustls::pki_types::CertificateDer::from_pem_file(cert).map_err(|e| {
        invalid(
            format!("{key}.client_certificate_file"),
            format!("{}: {e}", cert.display()),
        )
    })?;
    let private_key = std::fs::read_to_string(key_file).map_err(|e| {
        invalid(
            format!("{key}.client_key_file"),
            format!("can't read {}: {e}", key_file.display()),
        )
    })?;
    let thumbprint = ring::digest::digest(&ring::digest::SHA256, &cert_der);
    Ok(ClientCertificate {
        thumbprint_sha256: thumbprint.as_ref().to_vec(),
        private_key_pem: Secret::new(private_key),
    })
}

fn service_account(key: &str, path: &Path) -> Result<ServiceAccount, ConfigError> {
    #[derive(serde::Deserialize)]
    struct Json {
        client_email: String,
        private_key: String,
        private_key_id: Option<String>,
    }
    let field = format!("{key}.service_account_file");
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(&field, format!("can't read {}: {e}", path.display())))?;
    let json: Json = serde_json::from_str(&text).map_err(|e| {
        invalid(
            &field,
            format!("{} is not a service account key: {e}", path.display()),
        )
    })?;
    Ok(ServiceAccount {
        client_email: json.client_email,
        private_key_id: json.private_key_id,
        private_key_pem: Secret::new(json.private_key),
    })
}

/// Unix seconds at the start of a `YYYY-MM-DD` day (UTC).
fn unix_date(date: &str) -> Option<u64> {
    let mut parts = date.splitn(3, '-');
    let (y, m, d): (i64, i64, i64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400).ok()
}

/// An OAuth endpoint: https, or http on loopback when explicitly allowed.
fn endpoint(key: &str, value: &str, oauth: &OAuthSettings) -> Result<Url, ConfigError> {
    let url =
        Url::parse(value).map_err(|e| invalid(key, format!("{value:?} is not a URL: {e}")))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if oauth.allow_insecure_loopback_http && is_loopback_host(&url) => Ok(url),
        "http" if is_loopback_host(&url) => Err(invalid(
            key,
            "must be https (http on loopback needs oauth.allow_insecure_loopback_http = true)",
        )),
        _ => Err(invalid(key, "must be https")),
    }
}

fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

fn account(
    key: &str,
    name: String,
    a: raw::Account,
    integrations: &BTreeMap<String, Arc<Integration>>,
    (serves_imap, serves_pop3): (bool, bool),
) -> Result<Account, ConfigError> {
    let integration = integrations
        .get(&a.integration)
        .ok_or_else(|| {
            invalid(
                format!("{key}.integration"),
                format!("no integration named {:?}", a.integration),
            )
        })?
        .clone();
    let username = a.username.unwrap_or_else(|| name.clone());
    if username.is_empty() {
        return Err(invalid(format!("{key}.username"), "must not be empty"));
    }
    argon2id_hash(&format!("{key}.password_hash"), &a.password_hash)?;
    if a.mailbox.is_empty() || a.mailbox.contains(['\x01', '\r', '\n']) {
        return Err(invalid(
            format!("{key}.mailbox"),
            "must be a non-empty mailbox name",
        ));
    }
    let imap = upstream_or_default(
        &format!("{key}.imap"),
        a.imap,
        integration.default_imap.as_ref(),
        serves_imap,
    )?;
    let pop3 = upstream_or_default(
        &format!("{key}.pop3"),
        a.pop3,
        integration.default_pop3.as_ref(),
        serves_pop3,
    )?;
    match a.grant {
        Grant::JwtBearer if integration.service_account.is_none() => {
            return Err(invalid(
                format!("{key}.grant"),
                format!(
                    "jwt_bearer needs service_account_file in integration {:?}",
                    integration.name
                ),
            ));
        }
        Grant::ClientCredentials
            if integration.client_secret.is_none() && integration.client_certificate.is_none() =>
        {
            return Err(invalid(
                format!("{key}.grant"),
                format!(
                    "client_credentials needs a client secret or certificate in integration {:?}",
                    integration.name
                ),
            ));
        }
        _ => {}
    }
    Ok(Account {
        name,
        username,
        password_hash: a.password_hash,
        integration,
        mailbox: a.mailbox,
        grant: a.grant,
        refresh_token: a.refresh_token,
        imap,
        pop3,
    })
}

/// The configured upstream, or the provider's. A custom provider must give
/// one when a listener serves the protocol.
fn upstream_or_default(
    key: &str,
    given: Option<raw::Upstream>,
    default: Option<&(String, u16)>,
    served: bool,
) -> Result<Option<UpstreamServer>, ConfigError> {
    match (given, default) {
        (Some(u), _) => upstream(key, u).map(Some),
        (None, Some((host, port))) => Ok(Some(default_upstream(host, *port))),
        (None, None) if served => Err(invalid(
            key,
            "is required for an integration with a custom provider",
        )),
        (None, None) => Ok(None),
    }
}

fn default_upstream(host: &str, port: u16) -> UpstreamServer {
    UpstreamServer {
        host: host.into(),
        port,
        tls: UpstreamTls::Implicit,
        ca_file: None,
    }
}

fn upstream(key: &str, u: raw::Upstream) -> Result<UpstreamServer, ConfigError> {
    let (host, port) = u
        .address
        .rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>().ok()?,
            ))
        })
        .filter(|(h, p)| !h.is_empty() && *p != 0)
        .ok_or_else(|| {
            invalid(
                format!("{key}.address"),
                format!("{:?} is not host:port", u.address),
            )
        })?;
    if rustls::pki_types::ServerName::try_from(host).is_err() {
        return Err(invalid(
            format!("{key}.address"),
            format!("{host:?} is not a valid host name"),
        ));
    }
    if let Some(ca) = &u.ca_file {
        if !ca.is_file() {
            return Err(invalid(
                format!("{key}.ca_file"),
                format!("{} is not a readable file", ca.display()),
            ));
        }
    }
    Ok(UpstreamServer {
        host: host.to_owned(),
        port,
        tls: match u.tls {
            raw::UpstreamTls::Implicit => UpstreamTls::Implicit,
            raw::UpstreamTls::Starttls => UpstreamTls::StartTls,
        },
        ca_file: u.ca_file,
    })
}
