//! nom parsers for the POP3 the gateway reads: client commands in the
//! AUTHORIZATION state (RFC 1939 §4, RFC 2449, RFC 5034) and upstream
//! responses during our own login.
//!
//! Every parser takes one complete line from [`crate::proto::Framer`].

use nom::branch::alt;
use nom::bytes::complete::{tag_no_case, take_while, take_while1, take_while_m_n};
use nom::character::complete::char;
use nom::combinator::{map, opt, rest, verify};
use nom::sequence::{delimited, preceded, terminated};
use nom::{IResult, Parser};

/// A line that is not the POP3 it should be; answered with `-ERR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed POP3 line")]
pub struct ParseError;

/// A client command before login. `Debug` redacts `PASS` and the SASL
/// initial response.
#[derive(Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Capa,
    /// `USER name`
    User(&'a [u8]),
    /// `PASS string`: everything after the space, spaces included
    /// (RFC 1939 §7).
    Pass(&'a [u8]),
    /// `AUTH [mechanism [initial-response]]` (RFC 5034). Without a
    /// mechanism, the client asks for the list (RFC 1734).
    Auth {
        mechanism: Option<&'a [u8]>,
        initial_response: Option<&'a [u8]>,
    },
    Apop,
    Quit,
    Stls,
    /// A well-formed command that is not valid before login.
    Other(&'a [u8]),
}

impl std::fmt::Debug for Command<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::User(name) => f
                .debug_tuple("User")
                .field(&String::from_utf8_lossy(name))
                .finish(),
            Self::Pass(_) => f.write_str("Pass(<redacted>)"),
            Self::Auth {
                mechanism,
                initial_response,
            } => f
                .debug_struct("Auth")
                .field("mechanism", &mechanism.map(String::from_utf8_lossy))
                .field("initial_response", &initial_response.map(|_| "<redacted>"))
                .finish(),
            Self::Other(name) => f
                .debug_tuple("Other")
                .field(&String::from_utf8_lossy(name))
                .finish(),
            Self::Capa => f.write_str("Capa"),
            Self::Apop => f.write_str("Apop"),
            Self::Quit => f.write_str("Quit"),
            Self::Stls => f.write_str("Stls"),
        }
    }
}

/// `command = keyword [SP arguments] CRLF`; keywords are 3 or 4 letters,
/// case-insensitive (RFC 2449 §3).
///
/// # Errors
/// The line is not a command; answer it with `-ERR`.
pub fn command(input: &[u8]) -> Result<Command<'_>, ParseError> {
    let parsed: IResult<&[u8], Command<'_>> = terminated(
        alt((
            map(terminated(tag_no_case("CAPA"), end_of_keyword), |_| {
                Command::Capa
            }),
            map(terminated(tag_no_case("APOP"), end_of_keyword), |_| {
                Command::Apop
            }),
            map(terminated(tag_no_case("QUIT"), end_of_keyword), |_| {
                Command::Quit
            }),
            map(terminated(tag_no_case("STLS"), end_of_keyword), |_| {
                Command::Stls
            }),
            map(
                preceded(
                    tag_no_case("USER "),
                    take_while1(|b| b != b'\r' && b != b'\n'),
                ),
                Command::User,
            ),
            map(
                preceded(
                    tag_no_case("PASS "),
                    take_while(|b| b != b'\r' && b != b'\n'),
                ),
                Command::Pass,
            ),
            auth,
            map(
                terminated(
                    verify(
                        take_while_m_n(3, 4, |b: u8| b.is_ascii_alphabetic()),
                        |k: &[u8]| !is_known(k),
                    ),
                    opt(preceded(
                        char(' '),
                        take_while(|b| b != b'\r' && b != b'\n'),
                    )),
                ),
                Command::Other,
            ),
        )),
        crlf,
    )
    .parse(input);
    match parsed {
        Ok((&[], command)) => Ok(command),
        _ => Err(ParseError),
    }
}

fn is_known(keyword: &[u8]) -> bool {
    ["CAPA", "USER", "PASS", "AUTH", "APOP", "QUIT", "STLS"]
        .iter()
        .any(|k| keyword.eq_ignore_ascii_case(k.as_bytes()))
}

/// Keywords without arguments may still carry some (APOP has two); they
/// are ignored, but the keyword must end there.
fn end_of_keyword(i: &[u8]) -> IResult<&[u8], ()> {
    map(
        opt(preceded(
            char(' '),
            take_while(|b| b != b'\r' && b != b'\n'),
        )),
        |_| (),
    )
    .parse(i)
}

/// `auth = "AUTH" [SP mechanism [SP (base64 / "=")]]`
fn auth(i: &[u8]) -> IResult<&[u8], Command<'_>> {
    map(
        preceded(
            tag_no_case("AUTH"),
            opt((
                preceded(
                    char(' '),
                    take_while1(|b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                ),
                opt(preceded(char(' '), take_while1(is_base64_char))),
            )),
        ),
        |args| match args {
            Some((mechanism, initial_response)) => Command::Auth {
                mechanism: Some(mechanism),
                initial_response,
            },
            None => Command::Auth {
                mechanism: None,
                initial_response: None,
            },
        },
    )
    .parse(i)
}

fn is_base64_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')
}

/// Line ending. Bare LF is accepted, as most servers do.
fn crlf(i: &[u8]) -> IResult<&[u8], ()> {
    map((opt(char('\r')), char('\n')), |_| ()).parse(i)
}

/// One line from the upstream during login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response<'a> {
    /// `+OK [text]`
    Ok(&'a [u8]),
    /// `-ERR [[code]] [text]` with an RFC 2449 / RFC 3206 response code.
    Err {
        code: Option<&'a [u8]>,
        text: &'a [u8],
    },
    /// `+ [base64]`: a SASL continuation (RFC 5034 §4).
    Continue(&'a [u8]),
}

/// `+OK`, `-ERR` or `+ ` line.
///
/// # Errors
/// The line is none of them.
pub fn response(input: &[u8]) -> Result<Response<'_>, ParseError> {
    let text = |i| take_while(|b| b != b'\r' && b != b'\n').parse(i);
    let parsed: IResult<&[u8], Response<'_>> = terminated(
        alt((
            map(
                preceded(tag_no_case("+OK"), opt(preceded(char(' '), text))),
                |t| Response::Ok(t.unwrap_or_default()),
            ),
            map(
                preceded(
                    tag_no_case("-ERR"),
                    opt(preceded(
                        char(' '),
                        (
                            opt(terminated(
                                delimited(
                                    char('['),
                                    take_while(|b| b != b']' && b != b'\r' && b != b'\n'),
                                    char(']'),
                                ),
                                opt(char(' ')),
                            )),
                            text,
                        ),
                    )),
                ),
                |r| match r {
                    Some((code, text)) => Response::Err { code, text },
                    None => Response::Err {
                        code: None,
                        text: b"",
                    },
                },
            ),
            map(preceded(char('+'), opt(preceded(char(' '), text))), |t| {
                Response::Continue(t.unwrap_or_default())
            }),
        )),
        crlf,
    )
    .parse(input);
    match parsed {
        Ok((&[], r)) => Ok(r),
        _ => Err(ParseError),
    }
}

/// One line of a multi-line response (RFC 1939 §3): `None` for the
/// terminating `.`, else the line with one leading `.` unstuffed.
pub fn multiline(input: &[u8]) -> Option<&[u8]> {
    let line: IResult<&[u8], &[u8]> =
        terminated(take_while(|b| b != b'\r' && b != b'\n'), crlf).parse(input);
    let line = line.map_or(input, |(_, l)| l);
    match line {
        b"." => None,
        _ => Some(line.strip_prefix(b".").unwrap_or(line)),
    }
}

/// Everything after the first space; used for capability arguments.
pub fn arguments(line: &[u8]) -> &[u8] {
    let r: IResult<&[u8], &[u8]> =
        preceded((take_while(|b| b != b' '), opt(char(' '))), rest).parse(line);
    r.map(|(_, t)| t).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let cases: [(&[u8], Command<'_>); 13] = [
            (b"CAPA\r\n", Command::Capa),
            (b"capa\n", Command::Capa),
            (b"USER alice\r\n", Command::User(b"alice")),
            (b"PASS my secret pass\r\n", Command::Pass(b"my secret pass")),
            (b"PASS \r\n", Command::Pass(b"")),
            (
                b"AUTH\r\n",
                Command::Auth {
                    mechanism: None,
                    initial_response: None,
                },
            ),
            (
                b"AUTH PLAIN\r\n",
                Command::Auth {
                    mechanism: Some(b"PLAIN"),
                    initial_response: None,
                },
            ),
            (
                b"auth plain AGEAYg==\r\n",
                Command::Auth {
                    mechanism: Some(b"plain"),
                    initial_response: Some(b"AGEAYg=="),
                },
            ),
            (
                b"APOP mrose c4c9334bac560ecc979e58001b3e22fb\r\n",
                Command::Apop,
            ),
            (b"QUIT\r\n", Command::Quit),
            (b"STLS\r\n", Command::Stls),
            (b"NOOP\r\n", Command::Other(b"NOOP")),
            (b"RETR 1\r\n", Command::Other(b"RETR")),
        ];
        for (line, want) in cases {
            assert_eq!(
                command(line),
                Ok(want),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn malformed_commands() {
        for line in [
            &b"USER\r\n"[..],
            b"\r\n",
            b"X\r\n",
            b"TOOLONG\r\n",
            b"\x00\xff\r\n",
            b"CAPA",
            b"QUITX\r\n",
        ] {
            assert_eq!(
                command(line),
                Err(ParseError),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn responses() {
        assert_eq!(
            response(b"+OK Dovecot ready.\r\n"),
            Ok(Response::Ok(b"Dovecot ready."))
        );
        assert_eq!(response(b"+OK\r\n"), Ok(Response::Ok(b"")));
        assert_eq!(
            response(b"-ERR [AUTH] Authentication failed.\r\n"),
            Ok(Response::Err {
                code: Some(b"AUTH"),
                text: b"Authentication failed."
            })
        );
        assert_eq!(
            response(b"-ERR [IN-USE]\r\n"),
            Ok(Response::Err {
                code: Some(b"IN-USE"),
                text: b""
            })
        );
        assert_eq!(
            response(b"-ERR no\r\n"),
            Ok(Response::Err {
                code: None,
                text: b"no"
            })
        );
        assert_eq!(response(b"+ eyJ9\r\n"), Ok(Response::Continue(b"eyJ9")));
        assert_eq!(response(b"+ \r\n"), Ok(Response::Continue(b"")));
        assert_eq!(response(b"* OK\r\n"), Err(ParseError));
        assert_eq!(multiline(b".\r\n"), None);
        assert_eq!(multiline(b"..x\r\n"), Some(&b".x"[..]));
        assert_eq!(
            multiline(b"SASL PLAIN XOAUTH2\r\n"),
            Some(&b"SASL PLAIN XOAUTH2"[..])
        );
        assert_eq!(arguments(b"SASL PLAIN XOAUTH2"), b"PLAIN XOAUTH2");
    }
}
