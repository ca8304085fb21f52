//! Reads the PROXY protocol header that a trusted balancer sends first:
//! exactly its bytes and nothing of what follows (a TLS ClientHello, say),
//! so that the connection goes on as if it had started after the header.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio::time::{timeout_at, Instant};

use crate::proto::proxy_header::{client_address, header_len, V1_MAX};
pub use crate::proto::proxy_header::{is_header, HeaderError};

/// How long to wait between looks at a header that arrived in pieces.
const PIECE_WAIT: Duration = Duration::from_millis(5);

/// Reads the header at the start of `tcp` within `wait`, and only its
/// bytes; returns the client address it names (see [`client_address`]).
///
/// # Errors
/// When no whole, valid header arrives in time.
pub async fn read(tcp: &mut TcpStream, wait: Duration) -> Result<Option<SocketAddr>, HeaderError> {
    let deadline = Instant::now() + wait;
    let mut peeked = [0u8; V1_MAX];
    let len = loop {
        let n = timeout_at(deadline, tcp.peek(&mut peeked))
            .await
            .map_err(|_| HeaderError::Timeout(wait))?
            .map_err(|_| HeaderError::Closed)?;
        if n == 0 {
            return Err(HeaderError::Closed);
        }
        if let Some(len) = header_len(&peeked[..n])? {
            break len;
        }
        // Part of a header: the rest is on its way.
        if Instant::now() + PIECE_WAIT >= deadline {
            return Err(HeaderError::Timeout(wait));
        }
        tokio::time::sleep(PIECE_WAIT).await;
    };
    let mut header = vec![0u8; len];
    timeout_at(deadline, tcp.read_exact(&mut header))
        .await
        .map_err(|_| HeaderError::Timeout(wait))?
        .map_err(|_| HeaderError::Closed)?;
    client_address(&header)
}
