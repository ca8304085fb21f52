//! The relay after login: bytes both ways, unchanged, until either side
//! closes.
//!
//! Why not `tokio::io::copy_bidirectional`: it gives each direction a
//! fixed buffer (8 KiB) for the whole session. Small buffers mean a TLS
//! record and a `writev` per 8 KiB, and the system calls and wake-ups
//! dominate the relay's CPU; big ones would cost every idle session their
//! size. Here each direction reads into a per-thread scratch buffer of
//! [`SCRATCH`] bytes, as much as is ready, and writes it on at once. Only
//! bytes the writer can't take yet are copied into a buffer of the
//! session's own, which is freed as soon as it drains: an idle session
//! holds no relay buffer at all.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The most one read-then-write pass moves: four full TLS records.
pub const SCRATCH: usize = 64 * 1024;

thread_local! {
    static SCRATCH_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// One direction of the relay.
#[derive(Default)]
struct Direction {
    /// Bytes read but not yet accepted by the writer; empty and
    /// unallocated whenever the writer keeps up.
    pending: Vec<u8>,
    written: usize,
    /// The reader reached end of file; shut the writer down once drained.
    eof: bool,
    /// Written since the last flush.
    unflushed: bool,
    /// Bytes read from this direction's reader.
    count: u64,
    /// A read error that came after some bytes: returned once they are
    /// written.
    failed: Option<io::Error>,
    /// The last bytes read, for telling a logout from the client's last
    /// line (a fixed array: nothing to allocate per session).
    tail: Tail,
}

/// The last [`TAIL`] bytes a direction read.
#[derive(Default)]
struct Tail {
    bytes: [u8; TAIL],
    len: usize,
}

/// Enough for `<tag> LOGOUT` with any tag a client really sends, or `QUIT`.
const TAIL: usize = 32;

impl Tail {
    fn push(&mut self, data: &[u8]) {
        if data.len() >= TAIL {
            self.bytes.copy_from_slice(&data[data.len() - TAIL..]);
            self.len = TAIL;
            return;
        }
        let keep = self.len.min(TAIL - data.len());
        self.bytes.copy_within(self.len - keep..self.len, 0);
        self.bytes[keep..keep + data.len()].copy_from_slice(data);
        self.len = keep + data.len();
    }

    fn get(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl Direction {
    /// Moves bytes from `r` to `w` until `r` ends (then shuts `w` down and
    /// returns `Ready(Ok)`), an error, or neither side can go on.
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        activity: &Activity,
    ) -> Poll<Result<(), (Failure, io::Error)>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let write_error = |e| (Failure::Write, e);
        loop {
            while self.written < self.pending.len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.pending[self.written..]))
                    .map_err(write_error)?;
                if n == 0 {
                    return Poll::Ready(Err(write_error(io::ErrorKind::WriteZero.into())));
                }
                self.written += n;
                self.unflushed = true;
            }
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.written = 0;
            }
            if let Some(e) = self.failed.take() {
                return Poll::Ready(Err((Failure::Read, e)));
            }
            if self.eof {
                let close_error = |e| (Failure::Close, e);
                ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(close_error)?;
                return Pin::new(&mut *w).poll_shutdown(cx).map_err(close_error);
            }
            let step = SCRATCH_BUFFER.with(|scratch| {
                // A relay never polls another relay from inside its own
                // poll, so the scratch buffer is never borrowed twice; if it
                // were, a fresh buffer keeps this correct.
                match scratch.try_borrow_mut() {
                    Ok(mut buffer) => self.pass(cx, r, w, &mut buffer, activity),
                    Err(_) => self.pass(cx, r, w, &mut vec![0; SCRATCH], activity),
                }
            });
            match step {
                Step::Again => {}
                Step::Blocked => {
                    if self.unflushed {
                        match Pin::new(&mut *w).poll_flush(cx) {
                            Poll::Ready(Ok(())) => self.unflushed = false,
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(write_error(e))),
                            Poll::Pending => {}
                        }
                    }
                    return Poll::Pending;
                }
                Step::Failed(failure, e) => return Poll::Ready(Err((failure, e))),
            }
        }
    }

    /// Reads all that is ready (up to the scratch size), then writes it.
    fn pass<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
        scratch: &mut [u8],
        activity: &Activity,
    ) -> Step
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut buf = ReadBuf::new(scratch);
        let mut blocked = false;
        while buf.remaining() > 0 {
            let before = buf.filled().len();
            match Pin::new(&mut *r).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().len() == before => {
                    self.eof = true;
                    break;
                }
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) if before == 0 => return Step::Failed(Failure::Read, e),
                // Send what came before the error, then report it.
                Poll::Ready(Err(e)) => {
                    self.failed = Some(e);
                    break;
                }
                Poll::Pending => {
                    blocked = true;
                    break;
                }
            }
        }
        let data = buf.filled();
        if !data.is_empty() {
            self.count += data.len() as u64;
            self.tail.push(data);
            activity.touch();
        }
        let mut off = 0;
        while off < data.len() {
            match Pin::new(&mut *w).poll_write(cx, &data[off..]) {
                Poll::Ready(Ok(0)) => {
                    return Step::Failed(Failure::Write, io::ErrorKind::WriteZero.into())
                }
                Poll::Ready(Ok(n)) => {
                    off += n;
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Step::Failed(Failure::Write, e),
                Poll::Pending => {
                    // The writer's waker is set; keep the rest.
                    self.pending = data[off..].to_vec();
                    self.written = 0;
                    return Step::Blocked;
                }
            }
        }
        if blocked && !self.eof && self.failed.is_none() {
            Step::Blocked
        } else {
            Step::Again
        }
    }
}

enum Step {
    /// Go round again: more may be ready, or the reader ended.
    Again,
    /// Waiting for the reader or the writer; a waker is set.
    Blocked,
    Failed(Failure, io::Error),
}

/// Which end of a direction failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Read,
    Write,
    /// Closing the writer once every byte was written.
    Close,
}

/// When anything last moved, in milliseconds since `epoch`.
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When anything last moved.
    pub fn last(&self) -> Instant {
        self.epoch + std::time::Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// Bytes read from each side by [`relay`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub from_client: u64,
    pub from_upstream: u64,
}

/// What tells a relay that the client's session is over.
#[derive(Clone, Copy)]
pub struct SessionEnd<'a> {
    /// Whether the client's last bytes end with its logout (the
    /// protocol's `logged_out`).
    pub logged_out: fn(&[u8]) -> bool,
    /// Client bytes sent on before the relay started (pipelined after the
    /// login): they may end with the logout.
    pub client_sent: &'a [u8],
}

impl SessionEnd<'_> {
    /// No logout is ever recognised.
    pub const NEVER: SessionEnd<'static> = SessionEnd {
        logged_out: |_| false,
        client_sent: b"",
    };
}

/// The side of a relay whose socket failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

/// A relay that ended in an I/O error, and on which side.
#[derive(Debug, thiserror::Error)]
#[error("{side:?} i/o: {error}")]
pub struct RelayError {
    pub side: Side,
    pub error: io::Error,
}

/// Copies both ways until both sides have ended, or either fails. `counts`
/// holds what was read so far even when this fails or is dropped
/// half-way, so that a session cut short is still counted.
///
/// A client that closes its TCP connection without a TLS close_notify, or
/// resets it, once its session is over ends normally: nothing of the
/// session is lost, and many clients close that way. Over means the
/// upstream has closed, or `logged_out` says the client's last line was
/// its logout (`LOGOUT`, `QUIT`) and the upstream has answered since.
///
/// # Errors
/// The first I/O error of either side.
pub async fn relay<C, U>(
    client: &mut C,
    upstream: &mut U,
    activity: &Activity,
    counts: &mut Counts,
    ended_by: SessionEnd<'_>,
) -> Result<(), RelayError>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let SessionEnd {
        logged_out,
        client_sent,
    } = ended_by;
    let mut up = Direction::default();
    up.tail.push(client_sent);
    let mut down = Direction::default();
    let (mut up_done, mut down_done) = (false, false);
    // How much the upstream had sent when the client last sent something.
    let (mut client_count, mut upstream_count_then) = (0, 0);
    let result = poll_fn(|cx| {
        // Whether the client's session is over: the upstream closed, or it
        // answered the client's logout.
        let over = |up: &Direction, down: &Direction, then: u64| {
            down.eof || (logged_out(up.tail.get()) && down.count > then)
        };
        // Downstream first: when the upstream's close and the client's
        // arrive together, the upstream's is seen first.
        if !down_done {
            match down.poll(cx, upstream, client, activity) {
                Poll::Ready(Ok(())) => down_done = true,
                Poll::Ready(Err((Failure::Read, error))) => {
                    return Poll::Ready(Err(RelayError {
                        side: Side::Upstream,
                        error,
                    }))
                }
                // Every byte reached the client; only closing it failed:
                // a client gone after its session.
                Poll::Ready(Err((Failure::Close, _))) => down_done = true,
                Poll::Ready(Err((Failure::Write, error))) => {
                    return Poll::Ready(Err(RelayError {
                        side: Side::Client,
                        error,
                    }))
                }
                Poll::Pending => {}
            }
        }
        if !up_done {
            let before = up.count;
            let mut polled = up.poll(cx, client, upstream, activity);
            // Bytes that came in this very poll can't have been answered.
            if matches!(polled, Poll::Ready(Err((Failure::Read, _))))
                && up.count == before
                && over(&up, &down, upstream_count_then)
            {
                // The client closed after its session, without close_notify
                // or with a reset: end this direction as at a clean end of
                // file, shutting the upstream's side down.
                up.eof = true;
                polled = up.poll(cx, client, upstream, activity);
            }
            match polled {
                Poll::Ready(Ok(())) => up_done = true,
                Poll::Ready(Err((Failure::Read, error))) => {
                    return Poll::Ready(Err(RelayError {
                        side: Side::Client,
                        error,
                    }))
                }
                Poll::Ready(Err((Failure::Write | Failure::Close, error))) => {
                    return Poll::Ready(Err(RelayError {
                        side: Side::Upstream,
                        error,
                    }))
                }
                Poll::Pending => {}
            }
        }
        if up.count != client_count {
            client_count = up.count;
            upstream_count_then = down.count;
        }
        counts.from_client = up.count;
        counts.from_upstream = down.count;
        if up_done && down_done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    counts.from_client = up.count;
    counts.from_upstream = down.count;
    result
}

#[cfg(test)]
mod tests;
