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
use tracing::{debug, info, Instrument as _};

use super::stream::{ClientStream, Stream};
use super::upstream::LoggedIn;
use super::Gateway;
use crate::config::{ListenerTls, Protocol};
use crate::proto::{Action, ClientSession, LoginFailure};

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
}

/// How long a goodbye (`* BYE`, `-ERR`) may take to write.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);

/// Serves one accepted connection on a listener.
pub async fn serve(
    gateway: Arc<Gateway>,
    tcp: TcpStream,
    peer: SocketAddr,
    protocol: Protocol,
    tls: ListenerTls,
    shutdown: watch::Receiver<bool>,
) {
    let span = tracing::info_span!("conn", %peer, ?protocol);
    async move {
        let started = Instant::now();
        let connection = Connection {
            gateway: &gateway,
            protocol,
            shutdown,
        };
        let result = match protocol {
            Protocol::Imap => {
                let session = crate::imap::Session::new(crate::imap::Options {
                    tls_active: tls == ListenerTls::Implicit,
                    starttls: tls == ListenerTls::StartTls,
                    loopback_plaintext: tls == ListenerTls::Plaintext,
                    limits: gateway.frame_limits(),
                });
                connection.run(tcp, tls, session).await
            }
            Protocol::Pop3 => {
                let session = crate::pop3::Session::new(crate::pop3::Options {
                    tls_active: tls == ListenerTls::Implicit,
                    stls: tls == ListenerTls::StartTls,
                    loopback_plaintext: tls == ListenerTls::Plaintext,
                    limits: gateway.frame_limits(),
                });
                connection.run(tcp, tls, session).await
            }
        };
        let elapsed_ms = started.elapsed().as_millis();
        match result {
            Ok(relayed) => info!(
                account = %relayed.account,
                bytes_from_client = relayed.from_client,
                bytes_from_upstream = relayed.from_upstream,
                error = relayed.error.as_deref().unwrap_or(""),
                elapsed_ms,
                "session closed"
            ),
            Err(closed) => debug!(reason = %closed, elapsed_ms, "connection closed before login"),
        }
    }
    .instrument(span)
    .await;
}

/// A finished relay.
struct Relayed {
    account: String,
    from_client: u64,
    from_upstream: u64,
    error: Option<String>,
}

struct Connection<'a> {
    gateway: &'a Gateway,
    protocol: Protocol,
    shutdown: watch::Receiver<bool>,
}

impl Connection<'_> {
    async fn run<S: ClientSession>(
        mut self,
        tcp: TcpStream,
        tls: ListenerTls,
        mut session: S,
    ) -> Result<Relayed, Closed> {
        let limits = self.gateway.limits();
        let _ = tcp.set_nodelay(true);
        // One deadline covers everything before login: the handshake,
        // reads, and writes to a client that doesn't read.
        let deadline = Instant::now() + limits.pre_auth_timeout;
        let mut client: ClientStream = match tls {
            ListenerTls::Implicit => Stream::Tls(Box::new(self.handshake(tcp).await?)),
            ListenerTls::StartTls | ListenerTls::Plaintext => Stream::Plain(tcp),
        };
        let result = self.pre_auth(&mut client, &mut session, deadline).await;
        match result {
            Ok((account, logged_in, to_upstream)) => {
                info!(%account, "logged in");
                relay(account, client, logged_in, &to_upstream).await
            }
            Err(closed @ (Closed::PreAuthTimeout | Closed::Shutdown)) => {
                session.shutdown();
                goodbye(&mut client, &mut session).await;
                Err(closed)
            }
            Err(closed) => Err(closed),
        }
    }

    /// The session until it splices: returns the account, the upstream
    /// connection, and client bytes for the upstream.
    async fn pre_auth<S: ClientSession>(
        &mut self,
        client: &mut ClientStream,
        session: &mut S,
        deadline: Instant,
    ) -> Result<(String, LoggedIn, bytes::Bytes), Closed> {
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
                        match self.gateway.login(self.protocol, &credentials).await {
                            Ok((account, logged_in)) => {
                                session.login_succeeded(&logged_in.capabilities);
                                upstream = Some((account, logged_in));
                            }
                            Err(failure) => {
                                if failure == LoginFailure::BadCredentials {
                                    tokio::time::sleep(self.gateway.limits().login_failure_delay)
                                        .await;
                                }
                                session.login_failed(failure);
                            }
                        }
                    }
                    Action::Splice { to_upstream } => {
                        let (account, logged_in) = upstream
                            .take()
                            .ok_or(Closed::Internal("splice before login"))?;
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
                Ok(_) => session.feed(&buf),
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::server::TlsStream<TcpStream>, Closed> {
        match timeout(
            self.gateway.limits().tls_handshake_timeout,
            self.gateway.acceptor().accept(tcp),
        )
        .await
        {
            Ok(Ok(tls)) => Ok(tls),
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
async fn goodbye<S: ClientSession>(client: &mut ClientStream, session: &mut S) {
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
    to_upstream: &[u8],
) -> Result<Relayed, Closed> {
    let LoggedIn {
        stream: mut upstream,
        to_client,
        ..
    } = logged_in;
    if !to_client.is_empty() {
        client.write_all(&to_client).await?;
        client.flush().await?;
    }
    if !to_upstream.is_empty() {
        upstream.write_all(to_upstream).await?;
        upstream.flush().await?;
    }
    // TODO(#7): a relay that counts bytes on error too, with an idle timeout.
    let (counts, error) = match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok(counts) => (counts, None),
        Err(e) => ((0, 0), Some(e.to_string())),
    };
    Ok(Relayed {
        account,
        from_client: counts.0 + to_upstream.len() as u64,
        from_upstream: counts.1 + to_client.len() as u64,
        error,
    })
}
