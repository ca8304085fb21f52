//! One client connection, start to end: TLS handshake, the pre-login
//! session, the upstream login, then the relay. This is the one place that
//! runs a session against the wire.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{info, Instrument as _};

use super::outcome::{ErrorKind, LoginError};
use super::proxy_header;
use super::relay::{self, Activity, Counts, RelayError, SessionEnd, Side};
use super::stream::{ClientStream, ReadAhead, Stream, TlsTcp};
use super::upstream::LoggedIn;
use super::Gateway;
use crate::proto::{Action, ClientSession, ListenerTls, LoginFailure};
use crate::protocol::Protocol;

/// How a connection ended before login, for the log line.
#[derive(Debug, thiserror::Error)]
enum Closed {
    #[error("client closed the connection")]
    ClientGone,
    #[error("client i/o: {0}")]
    ClientIo(#[from] io::Error),
    #[error("tls handshake failed: {0}")]
    Handshake(io::Error),
    #[error("tls handshake timed out")]
    HandshakeTimeout,
    #[error("no login before the pre-auth timeout")]
    PreAuthTimeout,
    #[error("the gateway is shutting down")]
    Shutdown,
    #[error("client logged out")]
    Logout,
    #[error("session state error: {0}")]
    Internal(&'static str),
    #[error("{0}")]
    ProxyHeader(#[from] proxy_header::HeaderError),
    #[error("a PROXY protocol header from an address that is not a trusted balancer")]
    UntrustedProxyHeader,
}

impl Closed {
    /// A failed read from the client. A TCP close without a TLS
    /// close_notify is the client going away, as a clean close would be.
    fn from_read(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::ClientGone
        } else {
            Self::ClientIo(e)
        }
    }

    /// The closed set of endings.
    fn kind(&self) -> ErrorKind {
        match self {
            Self::ClientGone => ErrorKind::ClientGone,
            Self::ClientIo(_) => ErrorKind::ClientIo,
            Self::Handshake(_) => ErrorKind::TlsHandshake,
            Self::HandshakeTimeout => ErrorKind::TlsHandshakeTimeout,
            Self::PreAuthTimeout => ErrorKind::PreAuthTimeout,
            Self::Shutdown => ErrorKind::Shutdown,
            Self::Logout => ErrorKind::None,
            Self::Internal(_) => ErrorKind::Internal,
            Self::ProxyHeader(_) | Self::UntrustedProxyHeader => ErrorKind::ProxyHeader,
        }
    }
}

/// A connection that ended before login, with its last failed login.
struct Refused {
    closed: Closed,
    login_failure: Option<ErrorKind>,
}

impl From<Closed> for Refused {
    fn from(closed: Closed) -> Self {
        Self {
            closed,
            login_failure: None,
        }
    }
}

/// How long a goodbye (`* BYE`, `-ERR`) may take to write.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// The listener a connection came in on.
pub struct Listener {
    pub protocol: Protocol,
    pub tls: ListenerTls,
    /// The `listener` metric label: the bound address.
    pub label: Arc<str>,
    /// Balancers that send a PROXY protocol header first.
    pub proxy_from: Arc<[ipnet::IpNet]>,
}

/// Serves one accepted connection on a listener, holding `permit` (its
/// place under `limits.max_connections`) until it closes.
///
/// Spawn this future itself rather than a wrapper that awaits it: a
/// wrapper holds the future twice (the captured value and the one being
/// awaited), which doubled each session's task allocation.
pub async fn serve(
    gateway: Arc<Gateway>,
    mut tcp: TcpStream,
    mut peer: SocketAddr,
    listener: Listener,
    shutdown: watch::Receiver<bool>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let Listener {
        protocol,
        tls,
        label,
        proxy_from,
    } = listener;
    // Behind a trusted balancer the client is who its PROXY header says;
    // anyone else who sends one is refused.
    let balancer = peer;
    // IPv4 clients of a dual-stack listener show as ::ffff:a.b.c.d.
    let trusted = proxy_from
        .iter()
        .any(|n| n.contains(&peer.ip().to_canonical()));
    let header = if trusted {
        proxy_header::read(&mut tcp, gateway.limits().proxy_header_timeout)
            .await
            .map(|client| {
                if let Some(client) = client {
                    peer = client;
                }
            })
    } else {
        Ok(())
    };
    let refuse_headers = !proxy_from.is_empty() && !trusted;
    let labels = [protocol.name, &*label];
    gateway
        .metrics
        .connections_accepted
        .with_label_values(&labels)
        .inc();
    let active = gateway
        .metrics
        .connections_active
        .with_label_values(&labels);
    active.inc();
    let span = if trusted {
        tracing::info_span!("conn", %peer, via = %balancer, protocol = protocol.name, listener = &*label)
    } else {
        tracing::info_span!("conn", %peer, protocol = protocol.name, listener = &*label)
    };
    async move {
        let started = Instant::now();
        let connection = Connection {
            gateway: &gateway,
            protocol,
            shutdown,
            refuse_headers,
        };
        let session = (protocol.new_session)(gateway.session_options(protocol, tls));
        let result = match header {
            Ok(()) => {
                connection
                    .run(tcp, peer.ip().to_canonical(), tls, session)
                    .await
            }
            Err(e) => Err(Refused::from(Closed::from(e))),
        };
        let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        // One summary event per connection.
        let kind = match result {
            Ok(relayed) => {
                let m = &gateway.metrics.relayed_bytes;
                m.with_label_values(&["client_to_upstream"])
                    .inc_by(relayed.from_client);
                m.with_label_values(&["upstream_to_client"])
                    .inc_by(relayed.from_upstream);
                let kind = relayed.ended;
                info!(
                    outcome = "relayed",
                    account = %relayed.account,
                    bytes_from_client = relayed.from_client,
                    bytes_from_upstream = relayed.from_upstream,
                    duration_ms,
                    error_kind = kind.label(),
                    blame = kind.blame().label(),
                    error = relayed.error.as_deref().unwrap_or(""),
                    "connection closed"
                );
                kind
            }
            Err(Refused {
                closed,
                login_failure,
            }) => {
                if matches!(closed, Closed::Handshake(_) | Closed::HandshakeTimeout) {
                    gateway
                        .metrics
                        .tls_handshake_failures
                        .with_label_values(&[protocol.name])
                        .inc();
                }
                let kind = closed.kind();
                info!(
                    outcome = "closed_before_login",
                    error_kind = kind.label(),
                    blame = kind.blame().label(),
                    login_failure = login_failure.map_or("none", ErrorKind::label),
                    reason = %closed,
                    duration_ms,
                    "connection closed"
                );
                kind
            }
        };
        gateway
            .metrics
            .connections_closed
            .with_label_values(&[protocol.name, kind.label(), kind.blame().label()])
            .inc();
        active.dec();
        drop(permit);
    }
    .instrument(span)
    .await;
}

/// A finished relay.
struct Relayed {
    account: String,
    from_client: u64,
    from_upstream: u64,
    /// How it ended: [`ErrorKind::None`] for a clean close.
    ended: ErrorKind,
    /// The I/O error that ended it, if one did.
    error: Option<String>,
}

struct Connection<'a> {
    gateway: &'a Arc<Gateway>,
    protocol: Protocol,
    shutdown: watch::Receiver<bool>,
    /// Close a connection that starts with a PROXY header (the listener
    /// trusts balancers, and this peer is not one).
    refuse_headers: bool,
}

impl Connection<'_> {
    /// `address` is the client's (from the PROXY header behind a
    /// balancer).
    async fn run(
        mut self,
        tcp: TcpStream,
        address: std::net::IpAddr,
        tls: ListenerTls,
        mut session: Box<dyn ClientSession + Send>,
    ) -> Result<Relayed, Refused> {
        let limits = self.gateway.limits();
        let _ = tcp.set_nodelay(true);
        let _ = super::set_keepalive(&tcp, limits.tcp_keepalive);
        // The client speaks first under implicit TLS: look before the
        // handshake. Otherwise the first bytes read are checked below.
        if self.refuse_headers && tls == ListenerTls::Implicit {
            let mut first = [0u8; 12];
            if let Ok(Ok(n)) = timeout(limits.tls_handshake_timeout, tcp.peek(&mut first)).await {
                if proxy_header::is_header(&first[..n]) {
                    return Err(Closed::UntrustedProxyHeader.into());
                }
            }
        }
        let pre_login = tokio::select! {
            slot = self.gateway.admission.enter_within(address, limits.pre_login_wait) => slot,
            _ = self.shutdown.changed() => return Err(Closed::Shutdown.into()),
        };
        if pre_login.is_none() {
            session.too_busy();
        }
        // One deadline covers everything before login: the handshake,
        // reads, and writes to a client that doesn't read.
        let deadline = Instant::now() + limits.pre_auth_timeout;
        let mut client: ClientStream = match tls {
            ListenerTls::Implicit => Stream::Tls(Box::new(Box::pin(self.handshake(tcp)).await?)),
            ListenerTls::StartTls | ListenerTls::Plaintext => Stream::Plain(tcp),
        };
        // Boxed: the login phase's state (the session's buffers, the
        // upstream dial and login) is several KiB that an idle relayed
        // session would otherwise keep in its task for its whole life.
        let mut login_failure = None;
        let result = Box::pin(self.pre_auth(
            &mut client,
            &mut *session,
            deadline,
            address,
            pre_login,
            &mut login_failure,
        ))
        .await;
        let refused = |closed| Refused {
            closed,
            login_failure,
        };
        match result {
            Ok((account, logged_in, to_upstream)) => {
                info!(%account, "logged in");
                let idle = limits.idle_timeout(self.protocol);
                let logged_out = self.protocol.logged_out;
                Ok(relay(account, client, logged_in, to_upstream, idle, logged_out).await)
            }
            Err(closed @ (Closed::PreAuthTimeout | Closed::Shutdown)) => {
                session.shutdown();
                goodbye(&mut client, &mut *session).await;
                Err(refused(closed))
            }
            Err(closed) => Err(refused(closed)),
        }
    }

    /// The session until it splices: returns the account, the upstream
    /// connection, and client bytes for the upstream.
    async fn pre_auth(
        &mut self,
        client: &mut ClientStream,
        session: &mut (dyn ClientSession + Send),
        deadline: Instant,
        address: std::net::IpAddr,
        mut pre_login: Option<super::admission::PreLogin>,
        login_failure: &mut Option<ErrorKind>,
    ) -> Result<(String, LoggedIn, bytes::Bytes), Closed> {
        // Under implicit TLS the first bytes were looked at before the
        // handshake.
        let mut refuse_headers = self.refuse_headers && !client.is_tls();
        let mut buf = BytesMut::with_capacity(4096);
        let mut upstream: Option<(String, LoggedIn)> = None;
        loop {
            while let Some(action) = session.next_action() {
                match action {
                    Action::Send(bytes) => {
                        within(deadline, async {
                            client.write_all(&bytes).await?;
                            client.flush().await
                        })
                        .await??;
                    }
                    Action::StartTls => {
                        let tcp = client
                            .take_plain()
                            .ok_or(Closed::Internal("STARTTLS on TLS"))?;
                        *client =
                            Stream::Tls(Box::new(within(deadline, self.handshake(tcp)).await??));
                        session.tls_established();
                    }
                    Action::Authenticate(credentials) => {
                        // The login runs as a task of its own, and the
                        // session stops waiting for it at shutdown: a slow
                        // upstream or token endpoint doesn't hold the
                        // shutdown up. The task itself runs on, so that a
                        // token refresh in flight still saves a rotated
                        // refresh token.
                        let login = tokio::spawn({
                            let (gateway, protocol) = (self.gateway.clone(), self.protocol);
                            let credentials = credentials.clone();
                            async move { gateway.login(protocol, &credentials).await }
                        });
                        let login = tokio::select! {
                            joined = login => joined.unwrap_or(Err(LoginError::new(
                                LoginFailure::Unavailable,
                                ErrorKind::Internal,
                            ))),
                            _ = self.shutdown.changed() => return Err(Closed::Shutdown),
                        };
                        match login {
                            Ok((account, logged_in)) => {
                                self.gateway.admission.success(&credentials.username);
                                // Logged in: no longer counts against the address.
                                pre_login = None;
                                session.login_succeeded(&logged_in.capabilities);
                                upstream = Some((account, logged_in));
                            }
                            Err(error) => {
                                *login_failure = Some(error.kind);
                                if error.failure == LoginFailure::BadCredentials {
                                    let delay = self
                                        .gateway
                                        .admission
                                        .failure(&credentials.username, address);
                                    self.back_off(client, session, delay).await?;
                                }
                                session.login_failed(error.failure);
                            }
                        }
                    }
                    Action::Splice { to_upstream } => {
                        let (account, logged_in) = upstream
                            .take()
                            .ok_or(Closed::Internal("splice before login"))?;
                        drop(pre_login.take());
                        return Ok((account, logged_in, to_upstream));
                    }
                    Action::Close => {
                        let _ = timeout(GOODBYE_TIMEOUT, client.shutdown()).await;
                        return Err(Closed::Logout);
                    }
                }
            }
            buf.clear();
            let read = tokio::select! {
                read = timeout_at(deadline, client.read_buf(&mut buf)) => read.map_err(|_| Closed::PreAuthTimeout)?,
                _ = self.shutdown.changed() => return Err(Closed::Shutdown),
            };
            match read {
                Ok(0) => return Err(Closed::ClientGone),
                Ok(_) if refuse_headers && proxy_header::is_header(&buf) => {
                    return Err(Closed::UntrustedProxyHeader)
                }
                Ok(_) => {
                    refuse_headers = false;
                    session.feed(&buf);
                }
                Err(e) => return Err(Closed::from_read(e)),
            }
        }
    }

    /// Waits out a failed login's back-off. The wait ends early when the
    /// client hangs up, which frees its pre-login slot at once, or when the
    /// gateway shuts down. Bytes the client pipelines meanwhile are kept
    /// for the session (up to one command's worth) and read after the
    /// failure is told. A client that half-closes (ends its sending side)
    /// counts as gone too and hears nothing of this login: answering at
    /// once would let a client skip the delay.
    async fn back_off(
        &mut self,
        client: &mut ClientStream,
        session: &mut (dyn ClientSession + Send),
        delay: Duration,
    ) -> Result<(), Closed> {
        let until = Instant::now() + delay;
        let most = self.gateway.frame_limits().max_command();
        let mut kept = 0;
        let mut buf = BytesMut::with_capacity(1024);
        loop {
            buf.clear();
            tokio::select! {
                () = tokio::time::sleep_until(until) => return Ok(()),
                _ = self.shutdown.changed() => return Err(Closed::Shutdown),
                read = client.read_buf(&mut buf), if kept < most => match read {
                    Ok(0) => return Err(Closed::ClientGone),
                    Ok(n) => {
                        kept += n;
                        session.feed(&buf);
                    }
                    Err(e) => return Err(Closed::from_read(e)),
                },
            }
        }
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::server::TlsStream<TlsTcp>, Closed> {
        match timeout(
            self.gateway.limits().tls_handshake_timeout,
            self.gateway.acceptor().accept(ReadAhead::new(tcp)),
        )
        .await
        {
            Ok(Ok(tls)) => {
                let kind = tls.get_ref().1.handshake_kind();
                self.gateway.metrics.count_handshake("client", kind);
                Ok(tls)
            }
            Ok(Err(e)) => Err(Closed::Handshake(e)),
            Err(_) => Err(Closed::HandshakeTimeout),
        }
    }
}

/// Runs `f` unless `deadline` passes first.
async fn within<T>(deadline: Instant, f: impl Future<Output = T>) -> Result<T, Closed> {
    timeout_at(deadline, f)
        .await
        .map_err(|_| Closed::PreAuthTimeout)
}

/// Writes whatever goodbye the session queued, briefly.
async fn goodbye(client: &mut ClientStream, session: &mut (dyn ClientSession + Send)) {
    let mut bytes = Vec::new();
    while let Some(action) = session.next_action() {
        if let Action::Send(b) = action {
            bytes.extend_from_slice(&b);
        }
    }
    let _ = timeout(GOODBYE_TIMEOUT, async {
        client.write_all(&bytes).await?;
        client.flush().await?;
        client.shutdown().await
    })
    .await;
}

/// Forwards what each side had buffered, then copies both ways unchanged.
async fn relay(
    account: String,
    mut client: ClientStream,
    logged_in: LoggedIn,
    to_upstream: bytes::Bytes,
    idle: Duration,
    logged_out: fn(&[u8]) -> bool,
) -> Relayed {
    let LoggedIn {
        stream: mut upstream,
        to_client,
        capabilities,
        slot,
    } = logged_in;
    // Nothing from the login phase stays with an idle session: the
    // leftovers may share a read buffer of several KiB.
    drop(capabilities);
    let (sent_to_client, sent_to_upstream) = (to_client.len() as u64, to_upstream.len() as u64);
    let leftovers = async {
        if !to_client.is_empty() {
            let written = async {
                client.write_all(&to_client).await?;
                client.flush().await
            };
            written.await.map_err(|error| RelayError {
                side: Side::Client,
                error,
            })?;
        }
        if !to_upstream.is_empty() {
            let written = async {
                upstream.write_all(&to_upstream).await?;
                upstream.flush().await
            };
            written.await.map_err(|error| RelayError {
                side: Side::Upstream,
                error,
            })?;
        }
        Ok::<(), RelayError>(())
    };
    let leftovers = leftovers.await;
    // The relay sees the end of what the client pipelined (a logout, say).
    let client_sent = to_upstream[to_upstream.len().saturating_sub(32)..].to_vec();
    drop(to_client);
    drop(to_upstream);
    // The counts are kept as bytes are read, so that a session that ends
    // in an error (a client dropping without close_notify) is counted.
    let activity = Activity::new();
    let mut counts = Counts::default();
    let ended_by = SessionEnd {
        logged_out,
        client_sent: &client_sent,
    };
    let relayed = async {
        leftovers?;
        relay::relay(&mut client, &mut upstream, &activity, &mut counts, ended_by).await
    };
    let (ended, error) = tokio::select! {
        result = relayed => match result {
            Ok(()) => (ErrorKind::None, None),
            Err(RelayError { side: Side::Client, error }) => (ErrorKind::ClientIo, Some(error.to_string())),
            Err(RelayError { side: Side::Upstream, error }) => (ErrorKind::UpstreamIo, Some(error.to_string())),
        },
        () = idle_timeout(&activity, idle) => (ErrorKind::IdleTimeout, None),
    };
    // The account's upstream session slot is free again once the upstream
    // connection is gone.
    drop(upstream);
    drop(slot);
    Relayed {
        account,
        from_client: counts.from_client + sent_to_upstream,
        from_upstream: counts.from_upstream + sent_to_client,
        ended,
        error,
    }
}

/// Returns once nothing has been read either way for `idle`. Traffic
/// resets it; it doesn't cap the session's length.
async fn idle_timeout(activity: &Activity, idle: Duration) {
    loop {
        let deadline = activity.last() + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}
