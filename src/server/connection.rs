//! One client connection, start to end: TLS handshake, the pre-login
//! session, the upstream login, then the relay. This is the one place that
//! runs a session against the wire.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, Instrument as _};

use super::stream::{ClientStream, Stream};
use super::upstream::LoggedIn;
use super::Gateway;
use crate::config::{ListenerTls, Protocol};
use crate::proto::{Action, ClientSession, LoginFailure};

/// How a connection ended, for the log line.
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
    #[error("session ended before login")]
    Logout,
}

/// Serves one accepted connection on a listener.
pub async fn serve(
    gateway: Arc<Gateway>,
    tcp: TcpStream,
    peer: SocketAddr,
    protocol: Protocol,
    tls: ListenerTls,
) {
    let span = tracing::info_span!("conn", %peer, ?protocol);
    async move {
        let started = Instant::now();
        let result = match protocol {
            Protocol::Imap => {
                let session = crate::imap::Session::new(crate::imap::Options {
                    tls_active: tls == ListenerTls::Implicit,
                    starttls: tls == ListenerTls::StartTls,
                    loopback_plaintext: tls == ListenerTls::Plaintext,
                    limits: gateway.frame_limits(),
                });
                run(&gateway, tcp, protocol, tls, session).await
            }
            Protocol::Pop3 => {
                let session = crate::pop3::Session::new(crate::pop3::Options {
                    tls_active: tls == ListenerTls::Implicit,
                    stls: tls == ListenerTls::StartTls,
                    loopback_plaintext: tls == ListenerTls::Plaintext,
                    limits: gateway.frame_limits(),
                });
                run(&gateway, tcp, protocol, tls, session).await
            }
        };
        let elapsed_ms = started.elapsed().as_millis();
        match result {
            Ok(relayed) => info!(
                account = %relayed.account,
                bytes_from_client = relayed.from_client,
                bytes_from_upstream = relayed.from_upstream,
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
}

async fn run<S: ClientSession>(
    gateway: &Gateway,
    tcp: TcpStream,
    protocol: Protocol,
    tls: ListenerTls,
    mut session: S,
) -> Result<Relayed, Closed> {
    let limits = gateway.limits();
    let _ = tcp.set_nodelay(true);
    let mut client: ClientStream = match tls {
        ListenerTls::Implicit => Stream::Tls(Box::new(handshake(gateway, tcp).await?)),
        ListenerTls::StartTls | ListenerTls::Plaintext => Stream::Plain(tcp),
    };
    let deadline = Instant::now() + limits.pre_auth_timeout;
    let mut buf = BytesMut::with_capacity(4096);
    let mut upstream: Option<(String, LoggedIn)> = None;
    loop {
        while let Some(action) = session.next_action() {
            match action {
                Action::Send(bytes) => {
                    client.write_all(&bytes).await?;
                    client.flush().await?;
                }
                Action::StartTls => {
                    let tcp = client.into_plain().ok_or(Closed::Logout)?;
                    client = Stream::Tls(Box::new(handshake(gateway, tcp).await?));
                    session.tls_established();
                }
                Action::Authenticate(credentials) => {
                    match gateway.login(protocol, &credentials).await {
                        Ok((account, logged_in)) => {
                            session.login_succeeded(&logged_in.capabilities);
                            upstream = Some((account, logged_in));
                        }
                        Err(failure) => {
                            if failure == LoginFailure::BadCredentials {
                                tokio::time::sleep(limits.login_failure_delay).await;
                            }
                            session.login_failed(failure);
                        }
                    }
                }
                Action::Splice { to_upstream } => {
                    let Some((account, logged_in)) = upstream.take() else {
                        return Err(Closed::Logout);
                    };
                    info!(%account, "logged in");
                    return relay(account, client, logged_in, &to_upstream).await;
                }
                Action::Close => {
                    let _ = client.shutdown().await;
                    return Err(Closed::Logout);
                }
            }
        }
        buf.clear();
        match timeout_at(deadline, client.read_buf(&mut buf)).await {
            Err(_) => {
                session.shutdown();
                // Best effort goodbye; the session queued BYE / -ERR.
                while let Some(Action::Send(bytes)) = session.next_action() {
                    let _ = client.write_all(&bytes).await;
                }
                return Err(Closed::PreAuthTimeout);
            }
            Ok(Ok(0)) => return Err(Closed::ClientGone),
            Ok(Ok(_)) => session.feed(&buf),
            Ok(Err(e)) => return Err(e.into()),
        }
    }
}

async fn handshake(
    gateway: &Gateway,
    tcp: TcpStream,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, Closed> {
    match timeout(
        gateway.limits().tls_handshake_timeout,
        gateway.acceptor().accept(tcp),
    )
    .await
    {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(Closed::Handshake(e)),
        Err(_) => Err(Closed::HandshakeTimeout),
    }
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
    let (from_client, from_upstream) = tokio::io::copy_bidirectional(&mut client, &mut upstream)
        .await
        .unwrap_or((0, 0));
    Ok(Relayed {
        account,
        from_client: from_client + to_upstream.len() as u64,
        from_upstream: from_upstream + to_client.len() as u64,
    })
}
