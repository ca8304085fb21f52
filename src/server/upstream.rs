//! Dialling the upstream and driving our XOAUTH2 login there.

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::stream::{Stream, UpstreamStream};
use crate::config::UpstreamServer;
use crate::proto::{UpstreamAction, UpstreamFailure, UpstreamLogin, UpstreamTls};

/// A logged-in upstream connection, ready to relay.
pub struct LoggedIn {
    pub stream: UpstreamStream,
    pub capabilities: Vec<String>,
    /// Upstream bytes that followed the login reply; they go to the client.
    pub to_client: Bytes,
}

/// Why the upstream login failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {0}: {1}")]
    Connect(String, io::Error),
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
}

impl From<UpstreamFailure> for UpstreamError {
    fn from(f: UpstreamFailure) -> Self {
        match f {
            UpstreamFailure::Rejected { status, in_use } => Self::Rejected { status, in_use },
            UpstreamFailure::Protocol(why) => Self::Protocol(why),
        }
    }
}

/// Connects to `server` and runs `login` over the connection.
///
/// # Errors
/// See [`UpstreamError`]. The caller bounds the whole call with a timeout.
///
/// # Cancel safety
/// Not cancel safe: dropping it drops the half-open connection, which is
/// what a timeout wants.
pub async fn login<L: UpstreamLogin>(
    server: &UpstreamServer,
    connector: &TlsConnector,
    mut login: L,
) -> Result<LoggedIn, UpstreamError> {
    let address = format!("{}:{}", server.host, server.port);
    let name = ServerName::try_from(server.host.clone()).map_err(|e| {
        UpstreamError::Connect(
            address.clone(),
            io::Error::new(io::ErrorKind::InvalidInput, e),
        )
    })?;
    let tcp = TcpStream::connect((server.host.as_str(), server.port))
        .await
        .map_err(|e| UpstreamError::Connect(address.clone(), e))?;
    tcp.set_nodelay(true)?;
    let mut stream: UpstreamStream = match server.tls {
        UpstreamTls::Implicit => Stream::Tls(Box::new(
            connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|e| UpstreamError::Tls(address.clone(), e))?,
        )),
        UpstreamTls::StartTls => Stream::Plain(tcp),
    };
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
                        .connect(name.clone(), tcp)
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

/// A TLS connector per distinct extra CA, built once.
pub fn connector(config: Arc<rustls::ClientConfig>) -> TlsConnector {
    TlsConnector::from(config)
}
