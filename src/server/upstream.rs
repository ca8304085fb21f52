//! Dialling the upstream and driving our XOAUTH2 login there.

use std::io;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::stream::{ReadAhead, Stream, UpstreamStream};
use crate::config::{ProxyUrl, UpstreamServer};
use crate::proto::{UpstreamAction, UpstreamFailure, UpstreamLogin, UpstreamTls};
use crate::protocol::Protocol;

/// A logged-in upstream connection, ready to relay.
pub struct LoggedIn {
    pub stream: UpstreamStream,
    pub capabilities: Vec<String>,
    /// Upstream bytes that followed the login reply; they go to the client.
    pub to_client: Bytes,
    /// The account's upstream session slot, held while the session lasts.
    pub slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Why the upstream login failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {0}: {1}")]
    Connect(String, io::Error),
    /// The HTTP CONNECT proxy couldn't be reached, or refused the tunnel.
    #[error("proxy {proxy}: {why}")]
    Proxy { proxy: String, why: String },
    #[error("tls with {0}: {1}")]
    Tls(String, io::Error),
    #[error("upstream i/o: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection during login")]
    Closed,
    #[error("upstream login timed out")]
    Timeout,
    #[error("upstream refused the token (status {status:?})")]
    Rejected { status: Option<u16>, in_use: bool },
    #[error("upstream protocol: {0}")]
    Protocol(String),
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    #[error("upstream refuses this login: {0}")]
    Disabled(String),
    #[error("all of the account's upstream sessions stayed busy")]
    SessionLimit,
}

impl From<UpstreamFailure> for UpstreamError {
    fn from(f: UpstreamFailure) -> Self {
        match f {
            UpstreamFailure::Rejected { status, in_use } => Self::Rejected { status, in_use },
            UpstreamFailure::Protocol(why) => Self::Protocol(why),
            UpstreamFailure::Unavailable(why) => Self::Unavailable(why),
            UpstreamFailure::Disabled(why) => Self::Disabled(why),
        }
    }
}

/// A connection to an upstream, before our login.
pub struct Connected {
    stream: UpstreamStream,
    name: ServerName<'static>,
    address: String,
}

/// Dials `server`; with implicit TLS, also does the handshake.
///
/// # Errors
/// [`UpstreamError::Connect`] or [`UpstreamError::Tls`].
pub async fn connect(
    server: &UpstreamServer,
    connector: &TlsConnector,
    keepalive: Option<std::time::Duration>,
) -> Result<Connected, UpstreamError> {
    let address = format!("{}:{}", server.host, server.port);
    let name = ServerName::try_from(server.host.clone()).map_err(|e| {
        UpstreamError::Connect(
            address.clone(),
            io::Error::new(io::ErrorKind::InvalidInput, e),
        )
    })?;
    let tcp = match &server.proxy {
        None => TcpStream::connect((server.host.as_str(), server.port))
            .await
            .map_err(|e| UpstreamError::Connect(address.clone(), e))?,
        Some(proxy) => tunnel(proxy, &address).await?,
    };
    tcp.set_nodelay(true)?;
    super::set_keepalive(&tcp, keepalive)?;
    let stream = match server.tls {
        UpstreamTls::Implicit => Stream::Tls(Box::new(
            connector
                .connect(name.clone(), ReadAhead::new(tcp))
                .await
                .map_err(|e| UpstreamError::Tls(address.clone(), e))?,
        )),
        UpstreamTls::StartTls => Stream::Plain(tcp),
    };
    Ok(Connected {
        stream,
        name,
        address,
    })
}

/// A TCP stream to `address` through the HTTP CONNECT `proxy` (RFC 9110
/// §9.3.6). Only the proxy's answer is read, so the first byte after it is
/// the upstream's (TLS or a greeting).
async fn tunnel(proxy: &ProxyUrl, address: &str) -> Result<TcpStream, UpstreamError> {
    let refused = |why: String| UpstreamError::Proxy {
        proxy: proxy.to_string(),
        why,
    };
    let mut tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| refused(format!("unreachable: {e}")))?;
    let mut request = format!("CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n");
    if let Some(auth) = &proxy.authorization {
        request.push_str(&format!("Proxy-Authorization: {}\r\n", auth.expose()));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| refused(format!("connection lost: {e}")))?;
    // The answer's head, a byte at a time: nothing of the tunnel's own
    // bytes may be read here. It is short (a status line and a few
    // headers), once per connection.
    let mut head = Vec::with_capacity(256);
    // CRLF CRLF ends the head; bare LFs are taken too (RFC 9112 §2.2).
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() > 8192 {
            return Err(refused("an answer to CONNECT longer than 8 KiB".into()));
        }
        let mut byte = [0u8; 1];
        if tcp
            .read(&mut byte)
            .await
            .map_err(|e| refused(format!("connection lost: {e}")))?
            == 0
        {
            return Err(refused(format!(
                "closed the connection instead of a tunnel to {address}"
            )));
        }
        head.push(byte[0]);
    }
    let status_line =
        String::from_utf8_lossy(head.split(|&b| b == b'\r').next().unwrap_or(&[])).into_owned();
    let status = status_line.split(' ').nth(1).unwrap_or("");
    if !status.starts_with('2') || status.len() != 3 {
        return Err(refused(format!(
            "refused the tunnel to {address}: {status_line}"
        )));
    }
    Ok(tcp)
}

/// Runs our XOAUTH2 `login` over a fresh connection.
///
/// # Errors
/// See [`UpstreamError`]. The caller bounds the whole call with a timeout.
///
/// # Cancel safety
/// Not cancel safe: dropping it drops the half-open connection, which is
/// what a timeout wants.
pub async fn login(
    connected: Connected,
    connector: &TlsConnector,
    mut login: Box<dyn UpstreamLogin + Send>,
) -> Result<LoggedIn, UpstreamError> {
    let Connected {
        mut stream,
        name,
        address,
    } = connected;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        while let Some(action) = login.next_action() {
            match action {
                UpstreamAction::Send(bytes) => {
                    stream.write_all(&bytes).await?;
                    stream.flush().await?;
                }
                UpstreamAction::StartTls => {
                    let tcp = stream
                        .into_plain()
                        .ok_or_else(|| UpstreamError::Protocol("STARTTLS twice".into()))?;
                    let tls = connector
                        .connect(name.clone(), ReadAhead::new(tcp))
                        .await
                        .map_err(|e| UpstreamError::Tls(address.clone(), e))?;
                    stream = Stream::Tls(Box::new(tls));
                    login.tls_established();
                }
                UpstreamAction::LoggedIn {
                    capabilities,
                    to_client,
                } => {
                    return Ok(LoggedIn {
                        stream,
                        capabilities,
                        to_client,
                        slot: None,
                    });
                }
                UpstreamAction::Failed(failure) => return Err(failure.into()),
            }
        }
        buf.clear();
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(UpstreamError::Closed);
        }
        login.feed(&buf);
    }
}

/// Ends a logged-in session politely with the protocol's logout command,
/// and waits for the answer (`mailgate test`'s last step).
///
/// # Errors
/// When the upstream doesn't answer as expected.
/// Test connection's command past login (`protocol.check`): what the
/// upstream answered, or its refusal in its own words.
///
/// # Errors
/// [`UpstreamError::Protocol`] with the refusal; i/o errors.
pub async fn check(
    logged_in: &mut LoggedIn,
    protocol: Protocol,
    gateway_host: &str,
) -> Result<String, UpstreamError> {
    let stream = &mut logged_in.stream;
    stream
        .write_all(&(protocol.check.command)(gateway_host))
        .await?;
    stream.flush().await?;
    let mut buf = BytesMut::from(&logged_in.to_client[..]);
    logged_in.to_client = Bytes::new();
    loop {
        if let Some(answer) = (protocol.check.answer)(&buf) {
            return answer.map_err(UpstreamError::Protocol);
        }
        if buf.len() > 256 * 1024 {
            return Err(UpstreamError::Protocol(format!(
                "no end to the answer to {}",
                protocol.check.name
            )));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(UpstreamError::Closed);
        }
    }
}

pub async fn logout(logged_in: LoggedIn, protocol: Protocol) -> Result<(), UpstreamError> {
    let mut stream = logged_in.stream;
    let done = protocol.logout_done;
    stream.write_all(protocol.logout).await?;
    stream.flush().await?;
    let mut buf = BytesMut::from(&logged_in.to_client[..]);
    loop {
        if buf[..].split(|&b| b == b'\n').any(|l| l.starts_with(done)) {
            let _ = stream.shutdown().await;
            return Ok(());
        }
        if buf.len() > 64 * 1024 {
            return Err(UpstreamError::Protocol("no answer to the logout".into()));
        }
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(UpstreamError::Closed);
        }
    }
}

pub use crate::tls::Connectors;
