//! The serde mirror of the config file. Every table rejects unknown keys.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::protocol::Protocol;
use crate::secret::Secret;

/// Keys a table leaves to validation: one per protocol (`[accounts.NAME.imap]`,
/// `limits.imap_idle_timeout`), checked against the registry there.
pub type PerProtocol = BTreeMap<String, figment::value::Value>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub state_dir: PathBuf,
    /// The gateway's host name in greetings (SMTP's `220` and `EHLO`).
    pub hostname: Option<String>,
    pub http: Option<Http>,
    #[serde(default)]
    pub store: Store,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub log: Log,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    pub certificate: Option<Certificate>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub oauth: OAuth,
    #[serde(default)]
    pub integrations: BTreeMap<String, Integration>,
    #[serde(default)]
    pub accounts: BTreeMap<String, Account>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub protocol: Protocol,
    pub address: String,
    pub tls: ListenerTls,
    #[serde(default)]
    pub proxy_protocol_from: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    Implicit,
    Starttls,
    Plaintext,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    pub address: String,
    pub tls: HttpTls,
    pub public_url: Option<String>,
    pub admin_username: Option<String>,
    pub admin_password_hash: Option<Secret<String>>,
    pub admin_password_on_loopback: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpTls {
    Implicit,
    Plaintext,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub format: Option<LogFormat>,
    pub level: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub proxy: Option<String>,
    pub mail_proxy: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Store {
    pub key_file: Option<PathBuf>,
    pub backend: Option<StoreBackendName>,
    pub url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub poll_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackendName {
    File,
    Postgres,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Unknown keys land in `per_protocol`, which validation rejects unless
/// they name a protocol's idle timeout (serde can't deny unknown fields
/// beside a flattened map).
#[derive(Debug, Default, Deserialize)]
pub struct Limits {
    pub max_connections: Option<usize>,
    pub max_line: Option<usize>,
    pub max_literal: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub login_failure_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub tls_handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub pre_auth_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub upstream_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
    pub max_pre_login_per_ip: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub login_failure_max_delay: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub upstream_spare_for: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub upstream_session_wait: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub proxy_header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub tcp_keepalive: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub pre_login_wait: Option<Duration>,
    #[serde(default)]
    pub trusted_addresses: Vec<String>,
    #[serde(flatten)]
    pub per_protocol: PerProtocol,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth {
    #[serde(default)]
    pub allow_insecure_loopback_http: bool,
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub refresh_margin: Option<Duration>,
    pub notify_command: Option<Vec<String>>,
    pub notify_url: Option<String>,
    pub refresh_in_background: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub retry_backoff: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Google,
    Microsoft,
    Custom,
}

impl Provider {
    /// The provider's name as people write it.
    pub fn title(self) -> &'static str {
        match self {
            Self::Google => "Google",
            Self::Microsoft => "Microsoft",
            Self::Custom => "Custom",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Integration {
    pub provider: Provider,
    pub description: Option<String>,
    pub client_id: String,
    pub client_secret: Option<Secret<String>>,
    pub client_secret_file: Option<PathBuf>,
    pub client_secret_env: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub tenant: Option<String>,
    pub cloud: Option<Cloud>,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: Option<String>,
    pub device_authorization_endpoint: Option<String>,
    pub client_certificate_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    pub service_account_file: Option<PathBuf>,
    /// The date the client secret expires, `YYYY-MM-DD`.
    pub client_secret_expires: Option<String>,
    /// The SASL mechanism of our login upstream.
    pub mechanism: Option<Mechanism>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mechanism {
    Xoauth2,
    Oauthbearer,
}

/// Microsoft's national clouds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    Global,
    Usgov,
    China,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grant {
    #[default]
    AuthorizationCode,
    ClientCredentials,
    JwtBearer,
}

impl Grant {
    /// The one table of grant names: the config name, the grant a token
    /// request uses (the `grant` label of `mailgate_token_requests_total`),
    /// and what that request exchanges, in words.
    fn names(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::AuthorizationCode => (
                "authorization_code",
                "refresh_token",
                "refresh token exchanged for an access token",
            ),
            Self::ClientCredentials => (
                "client_credentials",
                "client_credentials",
                "client credentials exchanged for an access token",
            ),
            Self::JwtBearer => (
                "jwt_bearer",
                "jwt_bearer",
                "service account assertion exchanged for an access token",
            ),
        }
    }

    /// The config name: `authorization_code`, ...
    pub fn name(self) -> &'static str {
        self.names().0
    }

    /// The grant a token request uses: `refresh_token` for an authorized
    /// account, else the account's own.
    pub fn request_label(self) -> &'static str {
        self.names().1
    }

    /// What a token request exchanges, in words.
    pub fn exchanged(self) -> &'static str {
        self.names().2
    }
}

/// Unknown keys land in `upstreams`, which validation rejects unless they
/// name a protocol (`[accounts.NAME.imap]`).
#[derive(Debug, Deserialize)]
pub struct Account {
    pub username: Option<String>,
    pub password_hash: Secret<String>,
    pub integration: String,
    pub mailbox: String,
    #[serde(default)]
    pub grant: Grant,
    pub refresh_token: Option<Secret<String>>,
    #[serde(flatten)]
    pub upstreams: PerProtocol,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub address: String,
    #[serde(default = "implicit")]
    pub tls: UpstreamTls,
    pub ca_file: Option<PathBuf>,
    /// Upstream sessions of this account at once, at most.
    pub max_sessions: Option<usize>,
    /// An HTTP CONNECT proxy for this server, or `"direct"`; overrides
    /// `network.mail_proxy`.
    pub proxy: Option<String>,
}

fn implicit() -> UpstreamTls {
    UpstreamTls::Implicit
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    Implicit,
    Starttls,
}
