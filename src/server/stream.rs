//! A TCP connection that may be upgraded to TLS in place (STARTTLS), and
//! the read-ahead layer under TLS.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Plain TCP, or TLS over it (`T` is tokio-rustls' server or client stream).
pub enum Stream<T> {
    Plain(TcpStream),
    Tls(Box<T>),
    /// Taken for an upgrade in place; any I/O on it fails.
    Taken,
}

fn taken() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "stream taken for a TLS upgrade",
    )
}

impl<T> Stream<T> {
    /// The TCP stream underneath, for an in-place upgrade. `None` if the
    /// stream is TLS already.
    pub fn into_plain(self) -> Option<TcpStream> {
        match self {
            Self::Plain(tcp) => Some(tcp),
            Self::Tls(_) | Self::Taken => None,
        }
    }

    /// Whether TLS is up.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
    }

    /// Takes the TCP stream out for an upgrade, leaving `Taken` behind.
    pub fn take_plain(&mut self) -> Option<TcpStream> {
        std::mem::replace(self, Self::Taken).into_plain()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stream<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Self::Taken => Poll::Ready(Err(taken())),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stream<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Self::Taken => Poll::Ready(Err(taken())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Self::Taken => Poll::Ready(Err(taken())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
            Self::Taken => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Self::Taken => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Self::Taken => Poll::Ready(Ok(())),
        }
    }
}

/// TCP under TLS, read ahead.
pub type TlsTcp = ReadAhead<TcpStream>;
/// The client side of a connection.
pub type ClientStream = Stream<tokio_rustls::server::TlsStream<TlsTcp>>;
/// The upstream side of a connection.
pub type UpstreamStream = Stream<tokio_rustls::client::TlsStream<TlsTcp>>;

impl UpstreamStream {
    /// How the TLS handshake went; `None` for plain TCP.
    pub fn handshake_kind(&self) -> Option<rustls::HandshakeKind> {
        match self {
            Self::Tls(tls) => tls.get_ref().1.handshake_kind(),
            Self::Plain(_) | Self::Taken => None,
        }
    }
}

/// How much [`ReadAhead`] asks the socket for at once.
pub const READ_AHEAD: usize = 64 * 1024;

thread_local! {
    static READ_SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; READ_AHEAD].into_boxed_slice());
}

/// Reads up to [`READ_AHEAD`] bytes per system call however little the
/// caller asks for. rustls asks its socket for 4 KiB at a time, so a
/// large download through TLS would otherwise cost a `recv` per 4 KiB.
/// The read goes into a per-thread scratch buffer; only what the caller
/// didn't take is kept, in a buffer freed as soon as it is drained, so an
/// idle connection holds nothing here.
pub struct ReadAhead<S> {
    inner: S,
    kept: Vec<u8>,
    pos: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            kept: Vec::new(),
            pos: 0,
        }
    }

    /// Copies kept bytes into `out`; frees the buffer once drained.
    fn take_kept(&mut self, out: &mut ReadBuf<'_>) {
        let n = out.remaining().min(self.kept.len() - self.pos);
        out.put_slice(&self.kept[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.kept.len() {
            self.kept = Vec::new();
            self.pos = 0;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.kept.len() {
            this.take_kept(out);
            return Poll::Ready(Ok(()));
        }
        if out.remaining() >= READ_AHEAD {
            return Pin::new(&mut this.inner).poll_read(cx, out);
        }
        READ_SCRATCH.with(|scratch| {
            let Ok(mut scratch) = scratch.try_borrow_mut() else {
                // Never nested in practice; read as asked if it were.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            };
            let mut read = ReadBuf::new(&mut scratch[..]);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let data = read.filled();
            let n = out.remaining().min(data.len());
            out.put_slice(&data[..n]);
            if n < data.len() {
                this.kept = data[n..].to_vec();
                this.pos = 0;
            }
            Poll::Ready(Ok(()))
        })
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_the_buffer_is_freed() {
        let (mut far, near) = tokio::io::duplex(4 * READ_AHEAD);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        far.write_all(&data).await.unwrap();
        drop(far);
        let mut reader = ReadAhead::new(near);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        let mut kept_sometimes = false;
        loop {
            let n = reader.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            kept_sometimes |= !reader.kept.is_empty();
            got.extend_from_slice(&chunk[..n]);
        }
        assert!(got == data, "bytes differ");
        assert!(kept_sometimes, "never read ahead");
        assert_eq!(reader.kept.capacity(), 0, "the buffer outlived its bytes");
    }
}
