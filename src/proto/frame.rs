//! Splits a byte stream into lines, or IMAP commands with literals, under caps.
//!
//! Frame first, then parse: a parser only ever sees a complete line or
//! command. A line that outgrows its cap is discarded up to its LF and
//! reported once, so the session can answer it; a literal is never guessed at.

use bytes::{Buf, BytesMut};

/// Size caps for framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// The longest line, CRLF included.
    pub max_line: usize,
    /// The largest literal (IMAP `{n}`) accepted inside one command.
    pub max_literal: usize,
}

impl Default for FrameLimits {
    /// 8 KiB lines are far above any legitimate pre-login command (RFC 9051
    /// §4 suggests accepting at least 8000 octets); 8 KiB literals hold any
    /// password or SASL exchange a poller sends.
    fn default() -> Self {
        Self {
            max_line: 8192,
            max_literal: 8192,
        }
    }
}

impl FrameLimits {
    /// The largest whole command: a line's worth of command text plus two
    /// literals (LOGIN's user and password). Chaining more literals can't
    /// grow a command past this.
    pub fn max_command(&self) -> usize {
        self.max_line
            .saturating_add(self.max_literal.saturating_mul(2))
    }
}

/// Limits for upstream responses before login: capability lists and
/// greetings are long, but nothing legitimate comes near 64 KiB.
pub const UPSTREAM_LIMITS: FrameLimits = FrameLimits {
    max_line: 64 * 1024,
    max_literal: 0,
};

/// One framing result. `Debug` shows sizes only: frames carry passwords.
#[derive(PartialEq, Eq)]
pub enum Frame {
    /// A complete line or command, including its line ending.
    Complete(BytesMut),
    /// A synchronizing literal `{n}` was announced: the client waits for a
    /// continuation request before it sends the literal.
    LiteralAnnounced,
    /// A line grew past `max_line`; it was discarded up to its LF. `head`
    /// holds its first bytes so that the session can find the tag.
    TooLong { head: BytesMut },
    /// A literal larger than `max_literal` was announced. The command was
    /// discarded. A non-synchronizing literal's bytes are already on their
    /// way, so the stream can't be resynchronized.
    LiteralTooLarge { head: BytesMut, synchronizing: bool },
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Complete(b) => write!(f, "Complete(<{} bytes>)", b.len()),
            Self::LiteralAnnounced => f.write_str("LiteralAnnounced"),
            Self::TooLong { head } => write!(f, "TooLong(<{} bytes>)", head.len()),
            Self::LiteralTooLarge {
                head,
                synchronizing,
            } => {
                write!(
                    f,
                    "LiteralTooLarge(<{} bytes>, synchronizing: {synchronizing})",
                    head.len()
                )
            }
        }
    }
}

/// How many bytes of a discarded line are kept to find its tag.
const HEAD_LEN: usize = 64;

/// A resumable framer. Feed it the same buffer as bytes arrive.
#[derive(Default)]
pub struct Framer {
    limits: FrameLimits,
    /// Bytes of the current command already accepted (lines and literals).
    pos: usize,
    /// Where the search for the next LF resumes.
    scan: usize,
    /// Bytes of a literal still to come.
    literal: Option<usize>,
    /// The head of an overlong line that is being discarded.
    discarding: Option<BytesMut>,
}

impl std::fmt::Debug for Framer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Framer")
            .field("limits", &self.limits)
            .field("pos", &self.pos)
            .field("literal", &self.literal)
            .field("discarding", &self.discarding.is_some())
            .finish()
    }
}

impl Framer {
    /// A framer with these caps.
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Forgets any partial command, e.g. after STARTTLS.
    pub fn reset(&mut self) {
        let limits = self.limits;
        *self = Self::new(limits);
    }

    /// The next frame from `buf`, or `None` when more bytes are needed.
    /// With `literals`, a line ending in `{n}` or `{n+}` continues with `n`
    /// raw bytes and another line (IMAP, RFC 9051 §4.3).
    pub fn next(&mut self, buf: &mut BytesMut, literals: bool) -> Option<Frame> {
        loop {
            if let Some(head) = self.discarding.take() {
                match memchr(b'\n', buf) {
                    Some(i) => {
                        buf.advance(i + 1);
                        return Some(Frame::TooLong { head });
                    }
                    None => {
                        buf.clear();
                        self.discarding = Some(head);
                        return None;
                    }
                }
            }
            if let Some(n) = self.literal {
                if buf.len() - self.pos < n {
                    return None;
                }
                self.pos += n;
                self.scan = self.pos;
                self.literal = None;
            }
            let Some(offset) = memchr(b'\n', &buf[self.scan..]) else {
                if buf.len() - self.pos > self.limits.max_line {
                    let head = self.take_head(buf);
                    buf.clear();
                    self.discarding = Some(head);
                    continue;
                }
                self.scan = buf.len();
                return None;
            };
            let lf = self.scan + offset;
            if lf + 1 - self.pos > self.limits.max_line || lf + 1 > self.limits.max_command() {
                let head = self.take_head(buf);
                buf.advance(lf + 1);
                return Some(Frame::TooLong { head });
            }
            if literals {
                if let Some((n, synchronizing)) = literal_marker(&buf[self.pos..lf]) {
                    if n > self.limits.max_literal
                        || (lf + 1).saturating_add(n) > self.limits.max_command()
                    {
                        let head = self.take_head(buf);
                        buf.advance(lf + 1);
                        return Some(Frame::LiteralTooLarge {
                            head,
                            synchronizing,
                        });
                    }
                    self.pos = lf + 1;
                    self.scan = self.pos;
                    self.literal = Some(n);
                    if synchronizing {
                        return Some(Frame::LiteralAnnounced);
                    }
                    continue;
                }
            }
            let command = buf.split_to(lf + 1);
            self.pos = 0;
            self.scan = 0;
            return Some(Frame::Complete(command));
        }
    }

    /// Copies the start of the current command and resets the position.
    fn take_head(&mut self, buf: &BytesMut) -> BytesMut {
        let head = BytesMut::from(&buf[..buf.len().min(HEAD_LEN)]);
        self.pos = 0;
        self.scan = 0;
        self.literal = None;
        head
    }
}

/// The literal announced at the end of a line: `{n}` or `{n+}`, then CR.
fn literal_marker(line: &[u8]) -> Option<(usize, bool)> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let inner = line.strip_suffix(b"}")?;
    let open = inner.iter().rposition(|&b| b == b'{')?;
    let mut digits = &inner[open + 1..];
    let synchronizing = match digits.strip_suffix(b"+") {
        Some(d) => {
            digits = d;
            false
        }
        None => true,
    };
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().try_fold(0usize, |n, d| {
        n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
    })?;
    Some((n, synchronizing))
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8], chunk: usize, literals: bool, limits: FrameLimits) -> Vec<Frame> {
        let mut framer = Framer::new(limits);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            while let Some(f) = framer.next(&mut buf, literals) {
                out.push(f);
            }
        }
        out
    }

    const CHUNKS: [usize; 6] = [1, 2, 3, 7, 64, usize::MAX];

    #[test]
    fn lines_and_literals_frame_the_same_at_every_chunk_size() {
        let input = b"a1 NOOP\r\na2 LOGIN {5}\r\nalice {3+}\r\npw!\r\na3 LOGOUT\n";
        for chunk in CHUNKS {
            let got = frames(input, chunk.min(input.len()), true, FrameLimits::default());
            assert_eq!(
                got,
                vec![
                    Frame::Complete(BytesMut::from(&b"a1 NOOP\r\n"[..])),
                    Frame::LiteralAnnounced,
                    Frame::Complete(BytesMut::from(
                        &b"a2 LOGIN {5}\r\nalice {3+}\r\npw!\r\n"[..]
                    )),
                    Frame::Complete(BytesMut::from(&b"a3 LOGOUT\n"[..])),
                ],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn literal_markers_are_ignored_without_literals() {
        let got = frames(b"x {5}\r\n", 64, false, FrameLimits::default());
        assert_eq!(
            got,
            vec![Frame::Complete(BytesMut::from(&b"x {5}\r\n"[..]))]
        );
    }

    #[test]
    fn overlong_line_is_discarded_to_its_end_and_reported_once() {
        let limits = FrameLimits {
            max_line: 16,
            max_literal: 8,
        };
        let mut input = b"t1 ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\r\nt2 NOOP\r\n");
        for chunk in CHUNKS {
            let got = frames(&input, chunk.min(input.len()), true, limits);
            assert_eq!(got.len(), 2, "chunk {chunk}: {got:?}");
            assert!(matches!(&got[0], Frame::TooLong { head } if head.starts_with(b"t1 ")));
            assert_eq!(got[1], Frame::Complete(BytesMut::from(&b"t2 NOOP\r\n"[..])));
        }
    }

    #[test]
    fn oversized_literal_is_refused_before_any_byte_of_it() {
        let limits = FrameLimits {
            max_line: 64,
            max_literal: 8,
        };
        let got = frames(b"t LOGIN {9999999}\r\n", 64, true, limits);
        assert!(matches!(
            &got[..],
            [Frame::LiteralTooLarge {
                synchronizing: true,
                ..
            }]
        ));
        let got = frames(b"t LOGIN {99999999999999999999+}\r\n", 64, true, limits);
        // An unparseable count is not a literal: the line is a plain command.
        assert!(matches!(&got[..], [Frame::Complete(_)]));
    }

    /// Chained literals can't grow one command without bound: a command
    /// is capped at `max_command` whatever its shape.
    #[test]
    fn chained_literals_hit_the_command_cap() {
        let limits = FrameLimits {
            max_line: 64,
            max_literal: 8,
        };
        let mut input = b"a LOGIN {8+}\r\n12345678".to_vec();
        for _ in 0..10 {
            input.extend_from_slice(b" {8+}\r\n12345678");
        }
        input.extend_from_slice(b"\r\n");
        for chunk in CHUNKS {
            let got = frames(&input, chunk.min(input.len()), true, limits);
            assert!(
                matches!(
                    got.first(),
                    Some(Frame::LiteralTooLarge {
                        synchronizing: false,
                        ..
                    })
                ),
                "chunk {chunk}: {got:?}"
            );
        }
        let mut zeros = b"a LOGIN".to_vec();
        for _ in 0..100 {
            zeros.extend_from_slice(b" {0+}\r\n");
        }
        let got = frames(&zeros, 7, true, limits);
        assert!(
            !got.iter().any(|f| matches!(f, Frame::Complete(_))),
            "{got:?}"
        );
    }

    #[test]
    fn literal_marker_known_answers() {
        assert_eq!(literal_marker(b"a LOGIN {5}"), Some((5, true)));
        assert_eq!(literal_marker(b"a LOGIN {5+}\r"), Some((5, false)));
        assert_eq!(literal_marker(b"a LOGIN {}"), None);
        assert_eq!(literal_marker(b"a LOGIN {+}"), None);
        assert_eq!(literal_marker(b"a LOGIN {x}"), None);
        assert_eq!(literal_marker(b"a LOGIN 5}"), None);
    }
}
