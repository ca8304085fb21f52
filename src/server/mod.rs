//! The gateway at run time: listeners, the connection pipeline, the
//! upstream login and the relay.

pub mod admission;
mod connection;
pub mod outcome;
pub mod probe;
pub mod proxy_header;
pub mod relay;
pub mod spare;
mod stream;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::{Account, Config, Limits, Listener, UpstreamServer};
use crate::metrics::{LoginOutcome, Metrics};
use crate::oauth::TokenError;
use crate::proto::{Credentials, FrameLimits, LoginFailure, LoginRequest, SessionOptions};
use crate::protocol::Protocol;
use crate::secret::Secret;
use crate::services::{Current, Services};
use outcome::{ErrorKind, LoginError};
use spare::Spares;
use upstream::{LoggedIn, UpstreamError};

/// Everything a connection needs, shared by all of them.
pub struct Gateway {
    services: Current,
    /// The limits of every services generation: fixed at start, and a
    /// reload keeps them (`app::Running::reload`).
    limits: Limits,
    /// Spare upstream connections for the next login.
    spares: Arc<Spares>,
    acceptor: TlsAcceptor,
    metrics: Arc<Metrics>,
    /// Open client connections, at most `limits.max_connections`.
    connections: Arc<tokio::sync::Semaphore>,
    /// argon2 verifications in flight, at most one per core: each takes
    /// ~19 MiB and a core's worth of time, and a crowd of wrong passwords
    /// must not take the memory with it.
    verifications: tokio::sync::Semaphore,
    admission: Arc<admission::Admission>,
    /// The gateway's host name in greetings (fixed at start, as limits).
    hostname: Arc<str>,
    /// What each upstream server offered after its greeting, by
    /// `UpstreamServer::id`.
    learned: Mutex<HashMap<String, Arc<[String]>>>,
    /// Each account's upstream session slots per protocol, where its
    /// upstream has `max_sessions`: the cap and its semaphore.
    slots: Mutex<SessionSlots>,
}

type SessionSlots = HashMap<(String, Protocol), (usize, Arc<tokio::sync::Semaphore>)>;

impl Gateway {
    /// Wires the shared services.
    pub fn new(services: Current, acceptor: TlsAcceptor, metrics: Arc<Metrics>) -> Self {
        let (limits, hostname, trusted) = {
            let config = &services.get().config;
            (
                config.limits,
                Arc::from(config.hostname.as_str()),
                config.trusted_addresses.clone(),
            )
        };
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self {
            connections: Arc::new(tokio::sync::Semaphore::new(limits.max_connections)),
            verifications: tokio::sync::Semaphore::new(cores),
            admission: Arc::new(
                admission::Admission::new(
                    limits.max_pre_login_per_ip,
                    limits.login_failure_delay,
                    limits.login_failure_max_delay,
                )
                .trusting(trusted),
            ),
            spares: Spares::new(limits.upstream_spare_for, limits.tcp_keepalive),
            hostname,
            learned: Mutex::default(),
            slots: Mutex::default(),
            services,
            limits,
            acceptor,
            metrics,
        }
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn frame_limits(&self) -> FrameLimits {
        FrameLimits {
            max_line: self.limits.max_line,
            max_literal: self.limits.max_literal,
        }
    }

    fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Drops every spare upstream connection (after a reload).
    pub fn forget_spares(&self) {
        self.spares.clear();
    }

    /// Waits until every connection has closed, or `grace` has passed.
    /// Returns whether all closed.
    pub async fn drain(&self, grace: std::time::Duration) -> bool {
        let all = u32::try_from(self.limits.max_connections).unwrap_or(u32::MAX);
        tokio::time::timeout(grace, self.connections.acquire_many(all))
            .await
            .is_ok()
    }

    /// Checks local credentials, gets a token and logs in upstream. A wrong
    /// local password causes no upstream or OAuth traffic at all.
    async fn login(
        &self,
        protocol: Protocol,
        credentials: &Credentials,
    ) -> Result<(String, LoggedIn), LoginError> {
        let services = self.services.get();
        let result = self.login_with(&services, protocol, credentials).await;
        let outcome = match &result {
            Ok(_) => LoginOutcome::Ok,
            Err(e) => LoginOutcome::from(e.failure),
        };
        self.metrics
            .logins
            .with_label_values(&[protocol.name, outcome.label()])
            .inc();
        result
    }

    async fn login_with(
        &self,
        services: &Services,
        protocol: Protocol,
        credentials: &Credentials,
    ) -> Result<(String, LoggedIn), LoginError> {
        let account = self.verify(services, credentials).await?;
        let tokens = &services.tokens;
        let token = tokens
            .access_token(&account)
            .await
            .map_err(|e| token_failure(&account, e))?;
        let hello = credentials.hello.as_deref();
        let logged_in = match self
            .upstream_login(services, protocol, &account, &token, hello)
            .await
        {
            Err(UpstreamError::Rejected {
                status: Some(400 | 401),
                ..
            }) => {
                info!(account = %account.name, "upstream rejected the token; getting a fresh one");
                let token = tokens
                    .replace_rejected(&account, &token)
                    .await
                    .map_err(|e| token_failure(&account, e))?;
                self.upstream_login(services, protocol, &account, &token, hello)
                    .await
                    .map_err(|e| upstream_failure(&account, e))?
            }
            Err(UpstreamError::Disabled(why)) => {
                // Only the mailbox's administrator can fix this: say so
                // where they look (status, the page), not only in the log.
                tokens.note_upstream_refusal(&account, &why).await;
                return Err(upstream_failure(&account, UpstreamError::Disabled(why)));
            }
            other => other.map_err(|e| upstream_failure(&account, e))?,
        };
        if let Some(server) = account.upstream(protocol) {
            self.learn(server, &logged_in.capabilities);
        }
        Ok((account.name.clone(), logged_in))
    }

    async fn verify(
        &self,
        services: &Services,
        credentials: &Credentials,
    ) -> Result<Arc<Account>, LoginError> {
        if let Some(account) = services.accounts.remembered(credentials) {
            return Ok(account);
        }
        // argon2 takes tens of milliseconds of CPU: keep it off the I/O threads.
        let _permit = self
            .verifications
            .acquire()
            .await
            .map_err(|_| LoginError::new(LoginFailure::Unavailable, ErrorKind::Internal))?;
        // A burst of logins with the same credentials (a restart, a poller
        // opening several connections) waits here behind the first: once
        // it has verified, the rest need no hash of their own.
        if let Some(account) = services.accounts.remembered(credentials) {
            return Ok(account);
        }
        let accounts = services.accounts.clone();
        let presented = credentials.clone();
        let verified = tokio::task::spawn_blocking(move || accounts.verify(&presented)).await;
        let outcome = match &verified {
            Ok(Ok(_)) => "ok",
            Ok(Err(_)) => "bad",
            Err(_) => "failed",
        };
        self.metrics
            .password_checks
            .with_label_values(&[outcome])
            .inc();
        match verified {
            Ok(Ok(account)) => Ok(account),
            Ok(Err(_)) => {
                // Debug-quoted and cut short: a client chooses these bytes.
                let username: String = credentials.username.chars().take(64).collect();
                info!(username = ?username, "local login failed");
                Err(LoginError::new(
                    LoginFailure::BadCredentials,
                    ErrorKind::BadCredentials,
                ))
            }
            Err(e) => {
                warn!(error = %e, "password verification task failed");
                Err(LoginError::new(
                    LoginFailure::Unavailable,
                    ErrorKind::Internal,
                ))
            }
        }
    }

    async fn upstream_login(
        &self,
        services: &Services,
        protocol: Protocol,
        account: &Account,
        token: &Secret<String>,
        client_hello: Option<&str>,
    ) -> Result<LoggedIn, UpstreamError> {
        let server = account.upstream(protocol).ok_or_else(|| {
            UpstreamError::Protocol(format!("account has no {} upstream", protocol.title))
        })?;
        // The provider's cap on sessions per mailbox: wait for a slot
        // before dialling, outside the login's own timeout.
        let slot = match server.max_sessions {
            Some(most) => Some(self.session_slot(&account.name, protocol, most).await?),
            None => None,
        };
        let connector = services
            .connectors
            .get(&server.ca_file)
            .ok_or_else(|| UpstreamError::Protocol("no TLS connector for this upstream".into()))?;
        let label = [protocol.name];
        let dial = || async {
            let started = tokio::time::Instant::now();
            let connected = upstream::connect(server, connector, self.limits.tcp_keepalive).await?;
            self.metrics
                .upstream_connect_seconds
                .with_label_values(&label)
                .observe(started.elapsed().as_secs_f64());
            Ok::<_, UpstreamError>(connected)
        };
        let log_in = |connected| async {
            let started = tokio::time::Instant::now();
            let login = (protocol.new_login)(&LoginRequest {
                mailbox: &account.mailbox,
                token,
                mechanism: account.integration.mechanism,
                tls: server.tls,
                host: &server.host,
                port: server.port,
                client_hello,
                gateway_host: &self.hostname,
            });
            let result = upstream::login(connected, connector, login).await;
            self.metrics
                .upstream_login_seconds
                .with_label_values(&label)
                .observe(started.elapsed().as_secs_f64());
            // Plain-TCP upstreams have no handshake to count.
            if let Ok(logged_in) = &result {
                if let kind @ Some(_) = logged_in.stream.handshake_kind() {
                    self.metrics.count_handshake("upstream", kind);
                }
            }
            result
        };
        let login = async {
            let spare = self.spares.take(server);
            let result = match spare {
                Some(connected) => match log_in(connected).await {
                    // The upstream closed the spare while it waited: dial.
                    Err(UpstreamError::Io(_) | UpstreamError::Closed) => {
                        self.metrics
                            .upstream_spares
                            .with_label_values(&["stale"])
                            .inc();
                        log_in(dial().await?).await
                    }
                    other => {
                        self.metrics
                            .upstream_spares
                            .with_label_values(&["used"])
                            .inc();
                        other
                    }
                },
                None => log_in(dial().await?).await,
            };
            // The next spare is dialled once this login is done, so that
            // its handshake doesn't compete with this login for the CPU.
            self.spares.refill(server, connector);
            result
        };
        let mut logged_in = tokio::time::timeout(self.limits.upstream_timeout, login)
            .await
            .unwrap_or(Err(UpstreamError::Timeout))?;
        logged_in.slot = slot;
        Ok(logged_in)
    }

    /// One of `most` upstream session slots of `account` for `protocol`,
    /// waiting up to `limits.upstream_session_wait` for one to free.
    async fn session_slot(
        &self,
        account: &str,
        protocol: Protocol,
        most: usize,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, UpstreamError> {
        let semaphore = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            let (size, semaphore) = slots
                .entry((account.to_owned(), protocol))
                .or_insert_with(|| (most, Arc::new(tokio::sync::Semaphore::new(most))));
            if *size != most {
                // A reload changed the cap: sessions from now on count
                // against the new one.
                *size = most;
                *semaphore = Arc::new(tokio::sync::Semaphore::new(most));
            }
            semaphore.clone()
        };
        match tokio::time::timeout(self.limits.upstream_session_wait, semaphore.acquire_owned())
            .await
        {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(UpstreamError::SessionLimit),
        }
    }

    /// Remembers what `server` offered after its greeting, for the next
    /// client greetings (SMTP's EHLO).
    fn learn(&self, server: &UpstreamServer, capabilities: &[String]) {
        let mut learned = self.learned.lock().unwrap_or_else(PoisonError::into_inner);
        let id = server.id();
        if learned
            .get(&id)
            .is_none_or(|known| **known != *capabilities)
        {
            learned.insert(id, capabilities.into());
        }
    }

    /// The options of a new client session on a `protocol` listener.
    fn session_options(
        &self,
        protocol: Protocol,
        tls: crate::proto::ListenerTls,
    ) -> SessionOptions {
        let upstream_capabilities = protocol
            .advertises_upstream_capabilities
            .then(|| self.upstream_capabilities(protocol))
            .flatten();
        SessionOptions {
            tls,
            limits: self.frame_limits(),
            host: self.hostname.clone(),
            upstream_capabilities,
        }
    }

    /// What every `protocol` upstream a login may go to offered, once all
    /// of them are known.
    fn upstream_capabilities(&self, protocol: Protocol) -> Option<Arc<[Arc<[String]>]>> {
        let services = self.services.get();
        let learned = self.learned.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ids: Vec<String> = services
            .config
            .accounts
            .values()
            .filter_map(|a| a.upstream(protocol).map(UpstreamServer::id))
            .collect();
        ids.sort();
        ids.dedup();
        ids.iter()
            .map(|id| learned.get(id).cloned())
            .collect::<Option<Vec<_>>>()
            .map(Into::into)
    }
}

fn token_failure(account: &Account, e: TokenError) -> LoginError {
    let (failure, kind) = match &e {
        TokenError::Transient(_) => (LoginFailure::Unavailable, ErrorKind::TokenUnavailable),
        TokenError::Store(_) => (LoginFailure::Unavailable, ErrorKind::TokenStore),
        TokenError::NotAuthorizedYet(_) => (
            LoginFailure::NotAuthorizedYet,
            ErrorKind::NeedsAuthorization,
        ),
        TokenError::NeedsAuthorization(_) => (
            LoginFailure::NeedsAuthorization,
            ErrorKind::NeedsAuthorization,
        ),
    };
    if kind == ErrorKind::NeedsAuthorization {
        warn!(account = %account.name, error = %e, "account needs authorization: run `{}`", crate::oauth::fix_command(&account.name));
    } else {
        warn!(account = %account.name, error = %e, "no access token");
    }
    LoginError::new(failure, kind)
}

fn upstream_failure(account: &Account, e: UpstreamError) -> LoginError {
    warn!(account = %account.name, error = %e, "upstream login failed");
    let (failure, kind) = match e {
        UpstreamError::Rejected { in_use: true, .. } => {
            (LoginFailure::InUse, ErrorKind::MailboxInUse)
        }
        UpstreamError::Rejected { .. } | UpstreamError::Disabled(_) => {
            (LoginFailure::BadCredentials, ErrorKind::UpstreamRejected)
        }
        UpstreamError::SessionLimit => (LoginFailure::SessionLimit, ErrorKind::SessionLimit),
        _ => (LoginFailure::Unavailable, ErrorKind::UpstreamUnavailable),
    };
    LoginError::new(failure, kind)
}

/// Turns TCP keepalive on for `tcp`: the first probe after `idle` without
/// traffic, then every 15 s, 4 times, before the connection counts as dead.
/// Keeps NATs and load balancers from dropping an idle session's flow, and
/// finds a peer that vanished.
///
/// # Errors
/// When the socket option can't be set.
pub fn set_keepalive(
    tcp: &tokio::net::TcpStream,
    idle: Option<std::time::Duration>,
) -> std::io::Result<()> {
    let Some(idle) = idle else {
        return Ok(());
    };
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval(std::time::Duration::from_secs(15))
        .with_retries(4);
    socket2::SockRef::from(tcp).set_tcp_keepalive(&keepalive)
}

/// A bound listener.
pub struct Bound {
    pub listener: TcpListener,
    pub config: Listener,
}

impl Bound {
    /// The address actually bound (port 0 resolved).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Binds every configured listener.
///
/// # Errors
/// When an address can't be bound.
pub async fn bind(config: &Config) -> std::io::Result<Vec<Bound>> {
    let mut bound = Vec::new();
    for l in &config.listeners {
        let listener = TcpListener::bind(l.address)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("bind {}: {e}", l.address)))?;
        bound.push(Bound {
            listener,
            config: l.clone(),
        });
    }
    Ok(bound)
}

/// Accepts connections on `bound` until `shutdown` fires. Each connection
/// holds a permit from the gateway's connection limit; at the limit the
/// loop stops accepting until one closes.
pub async fn accept_loop(
    gateway: Arc<Gateway>,
    bound: Bound,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Bound { listener, config } = bound;
    let proxy_from: Arc<[ipnet::IpNet]> = config.proxy_protocol_from.clone().into();
    let label: Arc<str> = listener
        .local_addr()
        .map_or_else(|_| config.address.to_string(), |a| a.to_string())
        .into();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // The permit is taken after accepting, so that idle listeners hold
        // none. At the limit this connection waits for one (and the next
        // ones wait in the kernel's backlog).
        let permit = tokio::select! {
            _ = shutdown.changed() => return,
            permit = gateway.connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let connection = connection::serve(
            gateway.clone(),
            tcp,
            peer,
            connection::Listener {
                protocol: config.protocol,
                tls: config.tls,
                label: label.clone(),
                proxy_from: proxy_from.clone(),
            },
            shutdown.clone(),
            permit,
        );
        tokio::spawn(connection);
    }
}
