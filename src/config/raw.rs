//! The serde mirror of the config file. Every table rejects unknown keys.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub state_dir: PathBuf,
    pub http: Option<Http>,
    #[serde(default)]
    pub store: Store,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Imap,
    Pop3,
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
pub struct Store {
    pub key_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
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
    pub imap_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub pop3_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub upstream_spare_for: Option<Duration>,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    pub username: Option<String>,
    pub password_hash: Secret<String>,
    pub integration: String,
    pub mailbox: String,
    #[serde(default)]
    pub grant: Grant,
    pub refresh_token: Option<Secret<String>>,
    pub imap: Option<Upstream>,
    pub pop3: Option<Upstream>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub address: String,
    #[serde(default = "implicit")]
    pub tls: UpstreamTls,
    pub ca_file: Option<PathBuf>,
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
