//! Configuration: a TOML file, then `MAILGATE_*` environment overrides,
//! validated in one step into typed values before any port is bound.
//!
//! Errors name the offending key, e.g.
//! `accounts.jira.integration: no integration named "ms"`.
//!
//! The layer imports nothing above it: the typed values here are what
//! `oauth`, `server` and `admin` are built from.
//!
//! - `raw`: the serde mirror of the file;
//! - `settings`: limits, OAuth client behaviour, logging;
//! - `http`: the HTTP listener and the admin credential;
//! - `integration`: OAuth client registrations;
//! - `account`: local logins and their upstreams;
//! - `catalogue`: the providers' documented endpoints and scopes;
//! - `summary`: what `check-config` prints.

mod account;
mod catalogue;
mod http;
mod integration;
mod network;
mod raw;
mod settings;
mod summary;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format as _, Toml};
use figment::Figment;
use url::Url;

use crate::protocol::Protocol;
use crate::secret::Secret;

pub use crate::proto::ListenerTls;
pub use account::{Account, UpstreamServer};
pub use http::{AdminCredential, HttpSettings, HttpTls};
pub use integration::{ClientCertificate, Integration, ServiceAccount};
pub use network::{NetworkSettings, ProxyUrl};
pub use raw::{Cloud, Grant, LogFormat, Provider};
pub use settings::*;

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
    /// The gateway's host name, for greetings that name the server (SMTP).
    pub hostname: String,
    pub http: Option<HttpSettings>,
    /// Where the token store's key comes from.
    pub store_key: KeySource,
    /// Which store holds tokens, leases and pending flows.
    pub store: StoreBackend,
    pub log: LogSettings,
    pub listeners: Vec<Listener>,
    /// PEM files for the listeners; `None` means a self-signed certificate
    /// kept in the state directory.
    pub certificate: Option<CertificateFiles>,
    pub limits: Limits,
    /// `limits.trusted_addresses`: exempt from the per-address cap and
    /// back-off (not a `Limits` field: that one is `Copy`).
    pub trusted_addresses: Vec<ipnet::IpNet>,
    pub network: NetworkSettings,
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
    /// Load balancers whose connections start with a PROXY protocol
    /// header (v1 or v2) naming the real client; empty: none.
    pub proxy_protocol_from: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where the token store key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file holding 64 hex digits; created with mode 0600 when missing.
    File(PathBuf),
    /// 64 hex digits, given directly (from an environment variable).
    Hex(Secret<String>),
}

/// The environment variable that may hold the store key.
pub const KEY_ENV: &str = "MAILGATE_TOKEN_KEY";

/// The environment variable that may hold the PostgreSQL store's password.
pub const STORE_PASSWORD_ENV: &str = "MAILGATE_STORE_PASSWORD";

/// Where token records, refresh leases and pending flows live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// Encrypted files in the state directory: one instance, no database.
    File,
    /// A PostgreSQL database shared by several instances.
    Postgres(PostgresSettings),
}

/// `[store] backend = "postgres"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSettings {
    /// The connection URL or key=value string, without a password.
    pub url: String,
    pub password: Option<PasswordSource>,
    /// CA certificates that the server's certificate may chain to, beside
    /// the bundled web roots (webpki-roots). TLS is always on, and the
    /// certificate must name the host.
    pub ca_file: Option<PathBuf>,
    /// How often each instance looks for records that another one saved.
    pub poll_interval: Duration,
    /// How long connecting (TCP, TLS, authentication) may take.
    pub connect_timeout: Duration,
}

/// Where a password comes from: never the config file itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// Read at each connection, so that a rotated password is picked up.
    File(PathBuf),
    /// From `MAILGATE_STORE_PASSWORD`.
    Env(Secret<String>),
}

/// How and how much mailgate logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `mailgate=debug`;
    /// `RUST_LOG` overrides it.
    pub level: String,
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
                        .ignore(&["config", "token_key", "store_password"])
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

    /// The redirect URL of `integration`, to register at the provider.
    pub fn redirect_url(&self, integration: &Integration) -> Option<Url> {
        let http = self.http.as_ref()?;
        let mut url = http.public_url.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}{}", integration.redirect_path));
        url.set_query(None);
        Some(url)
    }

    /// Whether a listener serves `protocol`.
    pub fn serves(&self, protocol: Protocol) -> bool {
        self.listeners.iter().any(|l| l.protocol == protocol)
    }
}

fn validate(raw: raw::Config) -> Result<Config, ConfigError> {
    let listeners = raw
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| listener(&format!("listeners[{i}]"), l))
        .collect::<Result<Vec<_>, _>>()?;
    let limits = settings::limits(&raw.limits)?;
    let network = network::network(&raw.network)?;
    let trusted_addresses = networks("limits.trusted_addresses", &raw.limits.trusted_addresses)?;
    let oauth = settings::oauth(raw.oauth)?;
    let mut integrations = BTreeMap::new();
    for (name, i) in raw.integrations {
        let key = format!("integrations.{name}");
        if !valid_name(&name) {
            return Err(invalid(
                key,
                "integration names use letters, digits, '-', '_' and '.'",
            ));
        }
        let integration = integration::integration(&key, name.clone(), i, &oauth)?;
        integrations.insert(name, Arc::new(integration));
    }
    let mut accounts = BTreeMap::new();
    let mut usernames = HashMap::new();
    let served = |p: Protocol| listeners.iter().any(|l| l.protocol == p);
    for (name, a) in raw.accounts {
        let key = format!("accounts.{name}");
        // Account names name files in the token store.
        if !valid_name(&name) || name.starts_with('.') {
            return Err(invalid(
                key,
                "account names use letters, digits, '-', '_' and '.', and don't start with '.'",
            ));
        }
        let account = account::account(
            &key,
            name.clone(),
            a,
            &integrations,
            served,
            network.mail_proxy.as_ref(),
        )?;
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
    let http = raw.http.map(http::http_settings).transpose()?;
    let store = store_backend(&raw.store)?;
    let store_key = match std::env::var(KEY_ENV) {
        Ok(hex) => KeySource::Hex(Secret::new(hex)),
        Err(_) => KeySource::File(match raw.store.key_file.clone() {
            Some(file) => credential_path("store.key_file", file)?,
            None => raw.state_dir.join("token.key"),
        }),
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
    let hostname = match raw.hostname {
        Some(name) => name,
        None => system_hostname(),
    };
    if !crate::proto::descriptor::is_host_name(&hostname) {
        return Err(invalid(
            "hostname",
            format!("{hostname:?} is not a domain name"),
        ));
    }
    Ok(Config {
        hostname,
        http,
        store_key,
        store,
        log,
        state_dir: raw.state_dir,
        listeners,
        certificate: raw.certificate.map(|c| CertificateFiles {
            cert: c.cert,
            key: c.key,
        }),
        limits,
        trusted_addresses,
        network,
        oauth,
        integrations,
        accounts,
    })
}

/// The prefix of a path that names a systemd credential: `credential:NAME`
/// is `$CREDENTIALS_DIRECTORY/NAME` (`LoadCredential=NAME:/path` in the
/// unit), readable by the service only, whatever its user.
const CREDENTIAL: &str = "credential:";

/// `path`, or the credential it names.
pub(crate) fn credential_path(key: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    let Some(name) = path.to_str().and_then(|p| p.strip_prefix(CREDENTIAL)) else {
        return Ok(path);
    };
    if name.is_empty() || name.contains('/') {
        return Err(invalid(key, "credential:NAME needs a plain name"));
    }
    let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
        invalid(
            key,
            format!("names the systemd credential {name:?}, but CREDENTIALS_DIRECTORY is not set (add LoadCredential={name}:/path/to/file to the unit)"),
        )
    })?;
    Ok(PathBuf::from(dir).join(name))
}

/// A list of addresses and networks (`10.0.0.0/8`, `::1`).
fn networks(key: &str, given: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    given
        .iter()
        .enumerate()
        .map(|(i, net)| {
            net.parse::<ipnet::IpNet>()
                .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    invalid(
                        format!("{key}[{i}]"),
                        format!("{net:?} is not an address or a network (10.0.0.0/8, ::1)"),
                    )
                })
        })
        .collect()
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
    let proxy_protocol_from = networks(
        &format!("{key}.proxy_protocol_from"),
        &l.proxy_protocol_from,
    )?;
    Ok(Listener {
        protocol: l.protocol,
        address,
        tls,
        proxy_protocol_from,
    })
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

/// The machine's host name, or `localhost` when it can't be read.
fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| crate::proto::descriptor::is_host_name(h))
        .unwrap_or_else(|| "localhost".to_owned())
}

/// The `[store]` table's backend, checked: a PostgreSQL URL must parse,
/// name TCP hosts (TLS is always on) and hold no password.
fn store_backend(raw: &raw::Store) -> Result<StoreBackend, ConfigError> {
    let postgres_only = [
        ("store.url", raw.url.is_some()),
        ("store.password_file", raw.password_file.is_some()),
        ("store.ca_file", raw.ca_file.is_some()),
        ("store.poll_interval", raw.poll_interval.is_some()),
        ("store.connect_timeout", raw.connect_timeout.is_some()),
    ];
    if raw.backend != Some(raw::StoreBackendName::Postgres) {
        if let Some((key, _)) = postgres_only.iter().find(|(_, set)| *set) {
            return Err(invalid(
                *key,
                "is a setting of the PostgreSQL store: set store.backend = \"postgres\"",
            ));
        }
        return Ok(StoreBackend::File);
    }
    let url = raw
        .url
        .clone()
        .ok_or_else(|| invalid("store.url", "is required with backend = \"postgres\""))?;
    let parsed: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
        invalid(
            "store.url",
            format!("is not a PostgreSQL connection string: {e}"),
        )
    })?;
    if parsed.get_password().is_some() {
        return Err(invalid(
            "store.url",
            format!(
                "must not hold the password: put it in store.password_file or {STORE_PASSWORD_ENV}"
            ),
        ));
    }
    if parsed.get_hosts().is_empty()
        || parsed
            .get_hosts()
            .iter()
            .any(|h| !matches!(h, tokio_postgres::config::Host::Tcp(_)))
    {
        return Err(invalid(
            "store.url",
            "must name the database server's host (a TCP address; TLS is always used)",
        ));
    }
    if parsed.get_user().is_none() {
        return Err(invalid(
            "store.url",
            "must name the user (postgres://USER@HOST/DB)",
        ));
    }
    let password = match (std::env::var(STORE_PASSWORD_ENV), &raw.password_file) {
        (Ok(p), _) => Some(PasswordSource::Env(Secret::new(p))),
        (Err(_), Some(file)) => {
            let file = &credential_path("store.password_file", file.clone())?;
            std::fs::metadata(file)
                .map_err(|e| invalid("store.password_file", format!("{}: {e}", file.display())))?;
            Some(PasswordSource::File(file.clone()))
        }
        (Err(_), None) => None,
    };
    if let Some(ca) = &raw.ca_file {
        std::fs::metadata(ca)
            .map_err(|e| invalid("store.ca_file", format!("{}: {e}", ca.display())))?;
    }
    let poll_interval = raw.poll_interval.unwrap_or(Duration::from_secs(1));
    if poll_interval < Duration::from_millis(50) || poll_interval > Duration::from_secs(60) {
        return Err(invalid(
            "store.poll_interval",
            "must be between 50ms and 60s",
        ));
    }
    let connect_timeout = raw.connect_timeout.unwrap_or(Duration::from_secs(5));
    if connect_timeout.is_zero() {
        return Err(invalid("store.connect_timeout", "must be more than 0"));
    }
    Ok(StoreBackend::Postgres(PostgresSettings {
        url,
        password,
        ca_file: raw.ca_file.clone(),
        poll_interval,
        connect_timeout,
    }))
}

/// Names of integrations and accounts: they name files in the token store.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}
