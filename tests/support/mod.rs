//! Shared test support: the harness (a real Dovecot and a real OAuth
//! server, started by `tests/harness/start`), an in-process gateway on
//! port 0, and a small raw IMAP client over real TLS.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod cli;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// What `tests/harness/start` wrote to `harness.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub struct Harness {
    pub harness_dir: PathBuf,
    pub ca_file: PathBuf,
    pub oauth_issuer: String,
    pub oauth_token_url: String,
    pub oauth_auth_url: String,
    pub oauth_revocation_url: String,
    pub oauth_device_url: String,
    pub client_jwt_key: PathBuf,
    pub client_jwt_cert: PathBuf,
    pub service_account_json: PathBuf,
    pub imap_port: u16,
    pub imaps_port: u16,
    pub pop3_port: u16,
    pub pop3s_port: u16,
    /// The harness Postfix: submission with STARTTLS, and implicit TLS.
    pub smtp_port: u16,
    pub smtps_port: u16,
    /// The harness Postfix's config directory (`DIR/postfix/etc`); its
    /// queue is the sibling `queue/`.
    pub postfix_config_dir: PathBuf,
    /// `tests/harness/relay-mta`, which starts an MTA relaying through a
    /// smarthost.
    pub relay_mta: PathBuf,
    pub seed_dir: PathBuf,
    /// The harness PostgreSQL cluster: TLS only (the harness CA), SCRAM,
    /// a role that may create databases.
    pub pg_host: String,
    pub pg_port: u16,
    pub pg_user: String,
    pub pg_database: String,
    pub pg_password_file: PathBuf,
    /// `tests/harness/pg`, which stops, starts and restarts the cluster.
    pub pg_control: PathBuf,
    /// `tests/harness/balancer`, which starts a private HAProxy.
    pub balancer: PathBuf,
}

/// An OAuth client registered at the harness's OAuth server.
#[derive(Debug, Clone, Copy)]
pub struct OAuthClient {
    pub id: &'static str,
    pub secret: &'static str,
}

/// Tokens live an hour.
pub const CLIENT: OAuthClient = OAuthClient {
    id: "mailgate-test",
    secret: "mailgate-test-secret",
};
/// Access tokens live 5 seconds.
pub const SHORT_CLIENT: OAuthClient = OAuthClient {
    id: "mailgate-short",
    secret: "mailgate-short-secret",
};

/// The harness, from `MG_HARNESS` (the path of `harness.json`).
pub fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let path = std::env::var("MG_HARNESS").unwrap_or_else(|_| {
            panic!("MG_HARNESS is not set: run the suite with tests/run, which starts Dovecot and the OAuth server")
        });
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
    })
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/harness")
        .join(name)
}

/// A connection to database `db` of the harness PostgreSQL, as its role.
pub async fn pg_client(db: &str) -> tokio_postgres::Client {
    let h = harness();
    let password = std::fs::read_to_string(&h.pg_password_file).unwrap();
    let mut config = tokio_postgres::Config::new();
    config
        .host(&h.pg_host)
        .port(h.pg_port)
        .user(&h.pg_user)
        .password(password.trim_end())
        .dbname(db)
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new((*client_tls()).clone());
    let (client, connection) = config.connect(tls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// A new, empty database in the harness PostgreSQL: one per test, so
/// that tests share the cluster but not their tables.
pub async fn fresh_database() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "mg_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    pg_client(&harness().pg_database)
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    name
}

/// The `[store]` table of a gateway on database `db`, sealing with the
/// key in `key_file` (shared by every instance of a test).
pub fn pg_store_toml(db: &str, key_file: &Path) -> String {
    let h = harness();
    format!(
        "[store]\nbackend = \"postgres\"\nurl = \"postgres://{user}@{host}:{port}/{db}\"\n\
         password_file = \"{password}\"\nca_file = \"{ca}\"\nkey_file = \"{key}\"\n\
         poll_interval = \"200ms\"\n",
        user = h.pg_user,
        host = h.pg_host,
        port = h.pg_port,
        password = h.pg_password_file.display(),
        ca = h.ca_file.display(),
        key = key_file.display(),
    )
}

/// A private HAProxy in front of `servers` (`tests/harness/balancer`,
/// TCP mode, PROXY protocol `proxy`: v1, v2 or none); returns its port.
/// Stopped by [`stop_balancer`] or with the harness.
pub fn start_balancer(name: &str, servers: &[SocketAddr], proxy: &str) -> u16 {
    let h = harness();
    let mut cmd = Command::new(&h.balancer);
    cmd.arg(&h.harness_dir)
        .arg(name)
        .args(["--listen", "0", "--proxy", proxy]);
    for s in servers {
        cmd.arg("--server").arg(s.to_string());
    }
    let out = harness_script(&mut cmd, "balancer");
    let started: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    u16::try_from(started["port"].as_u64().unwrap()).unwrap()
}

pub fn stop_balancer(name: &str) {
    let h = harness();
    harness_script(
        Command::new(&h.balancer)
            .arg("--stop")
            .arg(&h.harness_dir)
            .arg(name),
        "balancer --stop",
    );
}

/// Runs a harness script that must succeed; its output.
fn harness_script(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A TCP connection to `to` from the loopback address `from` (127.0.0.0/8
/// has many), so that tests can be several clients.
pub async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Runs `tests/harness/pg DIR ACTION` (stop, start, restart).
pub fn pg_control(action: &str) {
    let h = harness();
    harness_script(
        Command::new(&h.pg_control).arg(&h.harness_dir).arg(action),
        &format!("pg {action}"),
    );
}

/// Tokens from the authorization-code flow.
#[derive(Debug, Deserialize)]
pub struct Grant {
    pub access_token: String,
    pub refresh_token: String,
}

impl Harness {
    /// Runs the whole authorization-code flow with PKCE as `user`.
    pub fn authorize(&self, client: OAuthClient, user: &str) -> Grant {
        let out = Command::new("python3")
            .arg(script("authorize.py"))
            .arg(format!("--issuer={}", self.oauth_issuer))
            .arg(format!("--client-id={}", client.id))
            .arg(format!("--client-secret={}", client.secret))
            .arg(format!("--user={user}"))
            .arg("--scope=openid offline_access mail")
            .output()
            .expect("run authorize.py");
        assert!(
            out.status.success(),
            "authorize.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("token response")
    }

    /// Gives `user` a Maildir holding every seed message.
    pub fn seed(&self, user: &str) {
        let status = Command::new(script("seed"))
            .arg(&self.harness_dir)
            .arg(user)
            .status()
            .expect("run seed");
        assert!(status.success(), "seed {user}");
    }

    /// The seed messages, in UID order.
    pub fn seed_messages(&self) -> Vec<Vec<u8>> {
        let mut paths: Vec<_> = std::fs::read_dir(&self.seed_dir)
            .expect("seed dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|p| std::fs::read(p).expect("seed message"))
            .collect()
    }

    /// Files in `user`'s Maildir (cur and new).
    pub fn maildir_count(&self, user: &str) -> usize {
        ["cur", "new"]
            .iter()
            .map(|d| {
                std::fs::read_dir(
                    self.harness_dir
                        .join("mail")
                        .join(user)
                        .join("Maildir")
                        .join(d),
                )
                .map(|r| r.count())
                .unwrap_or(0)
            })
            .sum()
    }

    /// Revokes a token at the OAuth server (RFC 7009).
    pub async fn revoke(&self, client: OAuthClient, token: &str, hint: &str) {
        mailgate::tls::install_default_provider();
        let response = reqwest::Client::new()
            .post(&self.oauth_revocation_url)
            .basic_auth(client.id, Some(client.secret))
            .form(&[("token", token), ("token_type_hint", hint)])
            .send()
            .await
            .expect("revocation request");
        assert!(
            response.status().is_success(),
            "revocation: {}",
            response.status()
        );
    }
}

/// One account of a test gateway.
#[derive(Clone)]
pub struct Account {
    pub name: &'static str,
    pub password: &'static str,
    pub mailbox: String,
    pub client: OAuthClient,
    pub grant: &'static str,
    pub refresh_token: Option<String>,
    /// Upstream IMAP `host:port` and TLS mode.
    pub upstream: (String, &'static str),
    /// Upstream POP3 `host:port` and TLS mode.
    pub pop3_upstream: (String, &'static str),
    /// Upstream SMTP `host:port` and TLS mode.
    pub smtp_upstream: (String, &'static str),
    /// Overrides the token endpoint (fault tests).
    pub token_url: Option<String>,
    /// More lines for the account's `[integrations.NAME]` table.
    pub integration_extra: String,
}

impl Account {
    /// An account for `mailbox` at the harness's Dovecot over implicit TLS,
    /// authorized through the real OAuth server.
    pub fn authorized(name: &'static str, mailbox: &str) -> Self {
        let grant = harness().authorize(CLIENT, mailbox);
        Self {
            refresh_token: Some(grant.refresh_token),
            ..Self::authorized_without_grant(name, mailbox)
        }
    }

    /// The same account, but without running the authorization flow.
    pub fn authorized_without_grant(name: &'static str, mailbox: &str) -> Self {
        let h = harness();
        Self {
            name,
            password: "s3cret!",
            mailbox: mailbox.to_owned(),
            client: CLIENT,
            grant: "authorization_code",
            refresh_token: None,
            upstream: (format!("127.0.0.1:{}", h.imaps_port), "implicit"),
            pop3_upstream: (format!("127.0.0.1:{}", h.pop3s_port), "implicit"),
            smtp_upstream: (format!("127.0.0.1:{}", h.smtps_port), "implicit"),
            token_url: None,
            integration_extra: String::new(),
        }
    }
}

/// The argon2id hash of a password, computed once per password.
pub fn password_hash(password: &str) -> String {
    static HASHES: OnceLock<std::sync::Mutex<std::collections::HashMap<String, String>>> =
        OnceLock::new();
    let map = HASHES.get_or_init(Default::default);
    let mut map = map.lock().unwrap();
    map.entry(password.to_owned())
        .or_insert_with(|| {
            mailgate::account::hash_password(password.as_bytes())
                .unwrap()
                .expose()
                .clone()
        })
        .clone()
}

/// An argon2id hash with tiny parameters (64 KiB, one pass), for tests
/// that verify thousands of passwords.
pub fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher as _, SaltString};
    let params = argon2::Params::new(64, 1, 1, None).unwrap();
    let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"mailgate-test-salt").unwrap();
    argon
        .hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// A gateway running in this process, listening on port 0.
pub struct Gateway {
    /// Implicit-TLS IMAP listener.
    pub imaps: SocketAddr,
    /// STARTTLS IMAP listener.
    pub imap: SocketAddr,
    /// Implicit-TLS POP3 listener.
    pub pop3s: SocketAddr,
    /// STLS POP3 listener.
    pub pop3: SocketAddr,
    /// Implicit-TLS and STARTTLS SMTP listeners, with `Options::smtp`.
    pub smtps: Option<SocketAddr>,
    pub smtp: Option<SocketAddr>,
    pub state: tempfile::TempDir,
    running: Option<mailgate::app::Running>,
}

impl Gateway {
    pub async fn start(accounts: &[Account]) -> Self {
        Self::start_with(accounts, "").await
    }

    /// Starts a gateway whose token store already holds `grant` for
    /// `account`, as `mailgate authorize` leaves it.
    pub async fn start_with_store(accounts: &[Account], account: &str, grant: &Grant) -> Self {
        let state = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let record = mailgate::oauth::Record {
            refresh_token: Some(grant.refresh_token.clone()).filter(|t| !t.is_empty()),
            access_token: Some(grant.access_token.clone()),
            obtained_at: now,
            expires_at: now + 3600,
            ..Default::default()
        };
        store(state.path()).save_record(account, &record).unwrap();
        Self::start_in(state, accounts, "", "10ms", true).await
    }

    /// Starts a gateway; `oauth` lines go into its `[oauth]` table.
    pub async fn start_with(accounts: &[Account], oauth: &str) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), accounts, oauth, "10ms", true).await
    }

    /// Starts a gateway whose failed logins wait `delay`.
    pub async fn start_with_delay(accounts: &[Account], delay: &str) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), accounts, "", delay, true).await
    }

    /// Starts a gateway that trusts the harness CA for upstreams, or not.
    pub async fn start_with_trust(
        accounts: &[Account],
        oauth: &str,
        trust_harness_ca: bool,
    ) -> Self {
        Self::start_in(
            tempfile::tempdir().unwrap(),
            accounts,
            oauth,
            "10ms",
            trust_harness_ca,
        )
        .await
    }

    async fn start_in(
        state: tempfile::TempDir,
        accounts: &[Account],
        oauth: &str,
        failure_delay: &str,
        trust_harness_ca: bool,
    ) -> Self {
        let options = Options {
            oauth: oauth.into(),
            failure_delay: failure_delay.into(),
            trust_harness_ca,
            ..Options::default()
        };
        Self::start_options(state, accounts, &options).await
    }

    /// Starts a gateway from a config file (as the binary would read it),
    /// binding its listeners on this process.
    pub async fn start_config(path: &Path, state: tempfile::TempDir) -> Self {
        let config = mailgate::config::Config::load(path).unwrap();
        let running = mailgate::app::start(config).await.expect("gateway starts");
        Self {
            imaps: running.addresses[0],
            imap: running.addresses[1],
            pop3s: running.addresses[2],
            pop3: running.addresses[3],
            smtps: running.addresses.get(4).copied(),
            smtp: running.addresses.get(5).copied(),
            state,
            running: Some(running),
        }
    }

    /// Starts a gateway with every option spelled out.
    pub async fn start_options(
        state: tempfile::TempDir,
        accounts: &[Account],
        options: &Options,
    ) -> Self {
        let toml = config_toml(state.path(), accounts, options);
        let config = mailgate::config::Config::from_figment(
            figment::Figment::new()
                .merge(<figment::providers::Toml as figment::providers::Format>::string(&toml)),
        )
        .unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
        let running = mailgate::app::start(config).await.expect("gateway starts");
        Self {
            imaps: running.addresses[0],
            imap: running.addresses[1],
            pop3s: running.addresses[2],
            pop3: running.addresses[3],
            smtps: running.addresses.get(4).copied(),
            smtp: running.addresses.get(5).copied(),
            state,
            running: Some(running),
        }
    }

    /// The value of one metric series, e.g.
    /// `mailgate_upstream_spares_total{outcome="used"}`; 0 when absent.
    pub fn metric(&self, series: &str) -> f64 {
        let text = self.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Every metric the gateway registers.
    pub fn metric_names(&self) -> Vec<String> {
        self.running.as_ref().expect("running").metrics().names()
    }

    /// The Prometheus exposition of the gateway's metrics.
    pub fn metrics_text(&self) -> String {
        self.running.as_ref().expect("running").metrics().render()
    }

    /// The stored record of an account.
    pub fn stored(&self, account: &str) -> Option<mailgate::oauth::Record> {
        store(self.state.path()).load_record(account).unwrap()
    }

    /// The stored refresh token of an account.
    pub fn stored_refresh_token(&self, account: &str) -> Option<String> {
        self.stored(account)?.refresh_token
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.stop(std::time::Duration::from_secs(5)).await;
        }
    }
}

/// How a test gateway is configured beyond its accounts.
#[derive(Clone)]
pub struct Options {
    /// Lines for the `[oauth]` table.
    pub oauth: String,
    pub failure_delay: String,
    pub trust_harness_ca: bool,
    /// An HTTP listener on this loopback port (plain HTTP).
    pub http_port: Option<u16>,
    /// Fixed ports for the four mail listeners (for a separate process).
    pub listener_ports: Option<[u16; 4]>,
    /// Lines for the top level (before any table).
    pub top: String,
    /// More lines for the `[limits]` table.
    pub limits: String,
    /// Cheap argon2id parameters for the accounts (load tests).
    pub cheap_hashes: bool,
    /// Two SMTP listeners after the four others: implicit TLS, STARTTLS.
    pub smtp: bool,
    /// More lines for every account's `[accounts.NAME.smtp]` table.
    pub smtp_account_extra: String,
    /// `proxy_protocol_from` of every mail listener (a TOML array).
    pub proxy_protocol_from: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            oauth: String::new(),
            failure_delay: "10ms".into(),
            trust_harness_ca: true,
            http_port: None,
            listener_ports: None,
            top: String::new(),
            limits: String::new(),
            cheap_hashes: false,
            smtp: false,
            smtp_account_extra: String::new(),
            proxy_protocol_from: None,
        }
    }
}

/// A free loopback port, for listeners whose URL must be known before they
/// bind (the OAuth redirect URL).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The TOML of a test gateway: the harness certificate, IMAP and POP3
/// listeners (implicit TLS, then STARTTLS/STLS) on port 0, and one
/// integration per account at the harness's OAuth server.
pub fn config_toml(state: &Path, accounts: &[Account], options: &Options) -> String {
    let h = harness();
    let [p1, p2, p3, p4] = options.listener_ports.unwrap_or([0; 4]);
    let proxy = options
        .proxy_protocol_from
        .as_ref()
        .map(|from| format!("proxy_protocol_from = {from}"))
        .unwrap_or_default();
    let mut toml = format!(
        r#"
state_dir = "{state}"
{top}
[certificate]
cert = "{dir}/server.pem"
key = "{dir}/server.key"
[[listeners]]
protocol = "imap"
address = "127.0.0.1:{p1}"
tls = "implicit"
{proxy}
[[listeners]]
protocol = "imap"
address = "127.0.0.1:{p2}"
tls = "starttls"
{proxy}
[[listeners]]
protocol = "pop3"
address = "127.0.0.1:{p3}"
tls = "implicit"
{proxy}
[[listeners]]
protocol = "pop3"
address = "127.0.0.1:{p4}"
tls = "starttls"
{proxy}
{smtp_listeners}
[limits]
login_failure_delay = "{failure_delay}"
{limits}
[oauth]
allow_insecure_loopback_http = true
{oauth}
"#,
        state = state.display(),
        dir = h.harness_dir.display(),
        failure_delay = options.failure_delay,
        oauth = options.oauth,
        top = options.top,
        limits = options.limits,
        proxy = proxy,
        smtp_listeners = if options.smtp {
            format!(
                "[[listeners]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:0\"\ntls = \"implicit\"\n{proxy}\n\
                 [[listeners]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:0\"\ntls = \"starttls\"\n{proxy}"
            )
        } else {
            String::new()
        },
    );
    if let Some(port) = options.http_port {
        toml.push_str(&format!(
            "[http]\naddress = \"127.0.0.1:{port}\"\ntls = \"plaintext\"\n"
        ));
    }
    let ca = if options.trust_harness_ca {
        format!("ca_file = \"{}\"", h.ca_file.display())
    } else {
        String::new()
    };
    for a in accounts {
        let secret = if a.client.secret.is_empty() {
            String::new()
        } else {
            format!("client_secret = \"{}\"", a.client.secret)
        };
        toml.push_str(&format!(
            r#"
[integrations.{name}]
provider = "custom"
client_id = "{id}"
{secret}
scopes = ["openid", "offline_access", "mail"]
authorization_endpoint = "{auth}"
token_endpoint = "{token}"
device_authorization_endpoint = "{device}"
{integration_extra}
[accounts.{name}]
password_hash = "{hash}"
integration = "{name}"
mailbox = "{mailbox}"
grant = "{grant}"
{refresh}
[accounts.{name}.imap]
address = "{upstream}"
tls = "{upstream_tls}"
{ca}
[accounts.{name}.pop3]
address = "{pop3_upstream}"
tls = "{pop3_upstream_tls}"
{ca}
[accounts.{name}.smtp]
address = "{smtp_upstream}"
tls = "{smtp_upstream_tls}"
{ca}
{smtp_extra}
"#,
            name = a.name,
            id = a.client.id,
            auth = h.oauth_auth_url,
            token = a.token_url.as_deref().unwrap_or(&h.oauth_token_url),
            device = h.oauth_device_url,
            integration_extra = a.integration_extra,
            hash = if options.cheap_hashes {
                cheap_hash(a.password)
            } else {
                password_hash(a.password)
            },
            mailbox = a.mailbox,
            grant = a.grant,
            refresh = a
                .refresh_token
                .as_ref()
                .map(|t| format!("refresh_token = \"{t}\""))
                .unwrap_or_default(),
            upstream = a.upstream.0,
            upstream_tls = a.upstream.1,
            pop3_upstream = a.pop3_upstream.0,
            pop3_upstream_tls = a.pop3_upstream.1,
            smtp_upstream = a.smtp_upstream.0,
            smtp_upstream_tls = a.smtp_upstream.1,
            smtp_extra = options.smtp_account_extra,
        ));
    }
    toml
}

/// The token store of a gateway's state directory (default key file).
pub fn store(state_dir: &Path) -> mailgate::oauth::FileStore {
    let key = mailgate::oauth::KeySource::File(state_dir.join("token.key"));
    mailgate::oauth::FileStore::open(state_dir, &key).unwrap()
}

/// A rustls client config trusting the harness CA.
pub fn client_tls() -> Arc<rustls::ClientConfig> {
    // Built once: a config per connection would parse the root store for
    // every handshake (and make the benchmark measure that).
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| mailgate::tls::client(Some(&harness().ca_file)).expect("client tls"))
        .clone()
}

type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A raw line client (IMAP or POP3) over real TLS: sends bytes, reads lines.
pub struct RawClient {
    stream: Option<TlsStream>,
    plain: Option<TcpStream>,
    buf: BytesMut,
}

impl RawClient {
    /// Connects with implicit TLS and reads the greeting.
    pub async fn connect(addr: SocketAddr) -> (Self, String) {
        Self::connect_with(addr, client_tls()).await
    }

    /// [`RawClient::connect`] with a client config of the caller's (its
    /// own TLS session cache, for resumption).
    pub async fn connect_with(
        addr: SocketAddr,
        config: Arc<rustls::ClientConfig>,
    ) -> (Self, String) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("tls handshake with the gateway");
        let mut c = Self {
            stream: Some(tls),
            plain: None,
            buf: BytesMut::new(),
        };
        let greeting = c.line().await;
        (c, greeting)
    }

    /// TLS over an already connected socket; reads the greeting.
    pub async fn over(tcp: TcpStream) -> Self {
        Self::greeted(tcp).await.0
    }

    /// TLS over `tcp`, and the greeting.
    pub async fn greeted(tcp: TcpStream) -> (Self, String) {
        let tls = tokio_rustls::TlsConnector::from(client_tls())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("tls handshake with the gateway");
        let mut c = Self {
            stream: Some(tls),
            plain: None,
            buf: BytesMut::new(),
        };
        let greeting = c.line().await;
        (c, greeting)
    }

    /// Connects without TLS (for STARTTLS) and reads the greeting.
    pub async fn connect_plain(addr: SocketAddr) -> (Self, String) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut c = Self {
            stream: None,
            plain: Some(tcp),
            buf: BytesMut::new(),
        };
        let greeting = c.line().await;
        (c, greeting)
    }

    /// Upgrades a plain connection after the server's STARTTLS OK.
    pub async fn start_tls(&mut self) {
        let tcp = self.plain.take().expect("plain connection");
        let tls = tokio_rustls::TlsConnector::from(client_tls())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .expect("tls handshake");
        self.stream = Some(tls);
    }

    /// Writes `bytes` and flushes: under TLS the last record may
    /// otherwise wait in the TLS buffer.
    pub async fn send(&mut self, bytes: &[u8]) {
        match (&mut self.stream, &mut self.plain) {
            (Some(s), _) => {
                s.write_all(bytes).await.unwrap();
                s.flush().await.unwrap();
            }
            (None, Some(p)) => p.write_all(bytes).await.unwrap(),
            _ => unreachable!(),
        }
    }

    async fn fill(&mut self) -> usize {
        // Without spare capacity, read_buf reads 64 bytes at a time.
        self.buf.reserve(64 * 1024);
        match (&mut self.stream, &mut self.plain) {
            (Some(s), _) => s.read_buf(&mut self.buf).await.unwrap_or(0),
            (None, Some(p)) => p.read_buf(&mut self.buf).await.unwrap_or(0),
            _ => unreachable!(),
        }
    }

    /// The next line, without CRLF; empty at EOF.
    pub async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(i + 1);
                return String::from_utf8_lossy(&line)
                    .trim_end_matches(['\r', '\n'])
                    .to_owned();
            }
            if self.fill().await == 0 {
                return String::new();
            }
        }
    }

    /// Lines up to and including the one starting with `tag `.
    pub async fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            let done = line.starts_with(&format!("{tag} ")) || line.is_empty();
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// Exactly `n` raw bytes (a literal).
    pub async fn bytes(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await > 0, "eof inside a literal");
        }
        self.buf.split_to(n).to_vec()
    }

    /// An IMAP literal: the line that announces it (`... {n}`), then its
    /// `n` bytes.
    pub async fn literal(&mut self) -> Vec<u8> {
        let header = self.line().await;
        let size: usize = header
            .rsplit_once('{')
            .and_then(|(_, n)| n.trim_end_matches('}').parse().ok())
            .unwrap_or_else(|| panic!("no literal announced: {header}"));
        self.bytes(size).await
    }
}

/// Runs `tests/clients/imap_client.py` with arguments; returns stdout.
pub fn python_imap(args: &[String]) -> std::process::Output {
    Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/imap_client.py"))
        .args(args)
        .output()
        .expect("run imap_client.py")
}

/// A TCP proxy to `target` that counts connections.
pub async fn counting_proxy(
    target: std::net::SocketAddr,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
            });
        }
    });
    (address, count)
}

/// The sum of every series of metric `name` whose labels contain each of
/// `labels` (`outcome="ok"`), in a Prometheus exposition.
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (series, value) = rest.rsplit_once(' ')?;
            if !(series.is_empty() || series.starts_with('{')) {
                return None;
            }
            labels
                .iter()
                .all(|want| series.contains(want))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The `mailgate` binary, run on a config file (listeners on port 0, SMTP
/// included); its stderr (the log) goes to a file.
pub struct Process {
    pub child: std::process::Child,
    pub log: PathBuf,
    pub config: PathBuf,
    pub http_port: Option<u16>,
    pub imaps: std::net::SocketAddr,
    pub pop3s: std::net::SocketAddr,
    /// The implicit-TLS SMTP listener.
    pub smtps: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

/// A test's process ends with the test, however the test ends.
impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    pub async fn start(accounts: &[Account], top: &str) -> Self {
        let options = Options {
            top: top.into(),
            ..Options::default()
        };
        Self::start_options(accounts, &options).await
    }

    /// Starts the binary on the config of `options` (SMTP listeners
    /// always on); with `options.http_port`, [`Process::metrics_text`]
    /// scrapes it.
    pub async fn start_options(accounts: &[Account], options: &Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Port 0 everywhere; the addresses come from the "listening" log
        // lines, so no two tests can race for a port.
        let options = Options {
            smtp: true,
            ..options.clone()
        };
        let config = dir.path().join("mailgate.toml");
        std::fs::write(&config, config_toml(dir.path(), accounts, &options)).unwrap();
        let log = dir.path().join("log");
        let (child, addresses) = Self::spawn(&config, &log).await;
        Self {
            child,
            log,
            config,
            http_port: options.http_port,
            imaps: addresses[0],
            pop3s: addresses[2],
            smtps: addresses[4],
            _dir: dir,
        }
    }

    /// Kills the process (SIGKILL: a crash) and starts it again on the
    /// same config and state directory, on new ports.
    pub async fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, addresses) = Self::spawn(&self.config, &self.log).await;
        self.child = child;
        self.imaps = addresses[0];
        self.pop3s = addresses[2];
        self.smtps = addresses[4];
    }

    async fn spawn(config: &Path, log: &Path) -> (std::process::Child, Vec<std::net::SocketAddr>) {
        let child = Command::new(env!("CARGO_BIN_EXE_mailgate"))
            .arg("--config")
            .arg(config)
            .arg("run")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let mut addresses = Vec::new();
        for _ in 0..200 {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            addresses = text
                .lines()
                .filter(|l| l.contains("listening") && !l.contains("http listening"))
                .filter_map(|l| l.split("address").nth(1))
                .filter_map(|rest| {
                    rest.trim_start_matches(['=', '"', ':'])
                        .split(['"', ' ', ','])
                        .next()
                        .map(str::to_owned)
                })
                .filter_map(|a| a.parse::<std::net::SocketAddr>().ok())
                .collect::<Vec<_>>();
            if addresses.len() == 6 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            addresses.len(),
            6,
            "listeners not up:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        (child, addresses)
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// What its `/metrics` says now.
    pub async fn metrics_text(&self) -> String {
        let port = self.http_port.expect("started with an http port");
        mailgate::tls::install_default_provider();
        reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn wait_for_log(&self, needle: &str) {
        for _ in 0..100 {
            if self.log().contains(needle) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{needle:?} never appeared in the log:\n{}", self.log());
    }

    pub async fn exit_code(&mut self) -> Option<i32> {
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        panic!("mailgate did not exit:\n{}", self.log());
    }
}
