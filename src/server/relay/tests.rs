//! The relay's tests: every byte both ways, leftovers, errors, and the
//! ends that count as normal.

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
        poll_fn(|cx| Poll::Ready(direction.poll(cx, &mut reader, &mut writer, &activity))).await;
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
