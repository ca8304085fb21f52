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
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn pattern(len: u32, step: u32) -> Vec<u8> {
        (0..len)
            .map(|i| (i.wrapping_mul(step) % 251) as u8)
            .collect()
    }

    /// Both far ends write and read at once through small pipes, so that
    /// the relay's writes block and leftovers must be kept.
    #[tokio::test]
    async fn relays_every_byte_both_ways_through_slow_writers_and_counts_them() {
        let (client_far, mut client) = tokio::io::duplex(1000);
        let (mut upstream, upstream_far) = tokio::io::duplex(777);
        let (mut client_r, mut client_w) = tokio::io::split(client_far);
        let (mut upstream_r, mut upstream_w) = tokio::io::split(upstream_far);
        let down = pattern(1_000_000, 7);
        let up = pattern(300_000, 13);
        let activity = Activity::new();
        let mut counts = Counts::default();
        let (relayed, (), (), got_down, got_up) = tokio::join!(
            relay(
                &mut client,
                &mut upstream,
                &activity,
                &mut counts,
                SessionEnd::NEVER
            ),
            async {
                upstream_w.write_all(&down).await.unwrap();
                upstream_w.shutdown().await.unwrap();
            },
            async {
                client_w.write_all(&up).await.unwrap();
                client_w.shutdown().await.unwrap();
            },
            async {
                let mut v = Vec::new();
                client_r.read_to_end(&mut v).await.unwrap();
                v
            },
            async {
                let mut v = Vec::new();
                upstream_r.read_to_end(&mut v).await.unwrap();
                v
            },
        );
        relayed.unwrap();
        assert!(got_down == down, "downstream bytes differ");
        assert!(got_up == up, "upstream bytes differ");
        assert_eq!(
            counts,
            Counts {
                from_client: up.len() as u64,
                from_upstream: down.len() as u64
            }
        );
    }

    /// What the writer can't take is kept, and freed once it drains.
    #[tokio::test]
    async fn leftovers_are_kept_while_the_writer_lags_and_freed_once_drained() {
        let (mut reader_far, mut reader) = tokio::io::duplex(2 * SCRATCH);
        let (mut writer, mut writer_far) = tokio::io::duplex(100);
        let data = pattern(5000, 3);
        reader_far.write_all(&data).await.unwrap();
        let activity = Activity::new();
        let mut direction = Direction::default();
        let first =
            poll_fn(|cx| Poll::Ready(direction.poll(cx, &mut reader, &mut writer, &activity)))
                .await;
        assert!(first.is_pending());
        assert_eq!(direction.pending.len() - direction.written, 4900);

        let pump = poll_fn(
            |cx| match direction.poll(cx, &mut reader, &mut writer, &activity) {
                Poll::Pending if direction.count == 5000 && direction.pending.capacity() == 0 => {
                    Poll::Ready(())
                }
                Poll::Pending => Poll::Pending,
                Poll::Ready(r) => panic!("the relay ended: {r:?}"),
            },
        );
        let mut got = vec![0; 5000];
        let ((), read) = tokio::join!(pump, writer_far.read_exact(&mut got));
        read.unwrap();
        assert!(got == data);
    }

    /// A reader that yields some bytes, then an error once, then end of
    /// file (as a socket does after a reset).
    struct Breaks(Vec<u8>, bool);

    impl AsyncRead for Breaks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if !self.0.is_empty() {
                let data = std::mem::take(&mut self.0);
                buf.put_slice(&data);
                return Poll::Ready(Ok(()));
            }
            if !self.1 {
                self.1 = true;
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            Poll::Ready(Ok(()))
        }
    }

    /// Bytes read before an error are written on, and then the error ends
    /// the direction: a reset isn't mistaken for a clean end.
    #[tokio::test]
    async fn bytes_before_a_read_error_are_delivered_and_the_error_reported() {
        let mut reader = Breaks(pattern(1000, 5), false);
        let (mut writer, mut writer_far) = tokio::io::duplex(4096);
        let activity = Activity::new();
        let mut direction = Direction::default();
        let result = poll_fn(|cx| direction.poll(cx, &mut reader, &mut writer, &activity)).await;
        assert_eq!(
            result.map_err(|(failure, e)| (failure, e.kind())),
            Err((Failure::Read, io::ErrorKind::ConnectionReset))
        );
        let mut got = vec![0; 1000];
        writer_far.read_exact(&mut got).await.unwrap();
        assert!(got == pattern(1000, 5));
        assert_eq!(direction.count, 1000);
    }

    /// A client that hangs up without a TLS close_notify: every read says
    /// so (as rustls does), every write goes nowhere.
    struct Unclean;

    impl AsyncRead for Unclean {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()))
        }
    }

    impl AsyncWrite for Unclean {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// After LOGOUT the upstream answers and closes; a client that then
    /// drops without close_notify ends the session normally. Before the
    /// upstream has ended, the same drop is the client's error.
    #[tokio::test]
    async fn an_unclean_client_close_after_the_upstream_ended_is_a_normal_end() {
        let (mut upstream, mut upstream_far) = tokio::io::duplex(4096);
        upstream_far
            .write_all(b"* BYE Logging out\r\na OK LOGOUT completed\r\n")
            .await
            .unwrap();
        upstream_far.shutdown().await.unwrap();
        let mut counts = Counts::default();
        let ended = relay(
            &mut Unclean,
            &mut upstream,
            &Activity::new(),
            &mut counts,
            SessionEnd::NEVER,
        )
        .await;
        assert!(ended.is_ok(), "{ended:?}");
        assert_eq!(counts.from_upstream, 42);

        let (mut upstream, _still_open) = tokio::io::duplex(4096);
        let ended = relay(
            &mut Unclean,
            &mut upstream,
            &Activity::new(),
            &mut counts,
            SessionEnd::NEVER,
        )
        .await;
        let error = ended.unwrap_err();
        assert_eq!(error.side, Side::Client);
        assert_eq!(error.error.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A client that logs out, waits for the answer, then hangs up
    /// without close_notify.
    #[derive(Default)]
    struct LogsOut {
        sent: bool,
        answered: bool,
        waker: Option<std::task::Waker>,
    }

    impl AsyncRead for LogsOut {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if !self.sent {
                self.sent = true;
                buf.put_slice(b"a LOGOUT\r\n");
                return Poll::Ready(Ok(()));
            }
            if self.answered {
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
            self.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    impl AsyncWrite for LogsOut {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.answered = true;
            if let Some(w) = self.waker.take() {
                w.wake();
            }
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// An upstream that answers the logout but hasn't closed yet (POP3's
    /// QUIT commits its deletions first): the client's drop after the
    /// answer is still a normal end, when the protocol says its last line
    /// was the logout.
    #[tokio::test]
    async fn an_unclean_close_after_an_answered_logout_is_a_normal_end() {
        let logout = |tail: &[u8]| tail.ends_with(b"LOGOUT\r\n");
        for (logged_out, normal) in [
            (logout as fn(&[u8]) -> bool, true),
            (|_: &[u8]| false, false),
        ] {
            let (mut upstream, mut upstream_far) = tokio::io::duplex(4096);
            // The upstream answers, then closes once its client has.
            tokio::spawn(async move {
                let mut command = [0u8; 10];
                upstream_far.read_exact(&mut command).await.unwrap();
                upstream_far.write_all(b"* BYE\r\na OK\r\n").await.unwrap();
                let _ = upstream_far.read_to_end(&mut Vec::new()).await;
            });
            let mut client = LogsOut::default();
            let mut counts = Counts::default();
            let ended = relay(
                &mut client,
                &mut upstream,
                &Activity::new(),
                &mut counts,
                SessionEnd {
                    logged_out,
                    client_sent: b"",
                },
            )
            .await;
            assert_eq!(ended.is_ok(), normal, "{ended:?}");
        }
    }
}
