//! nom parsers for the SMTP the gateway reads: client commands before
//! login (RFC 5321 §4.1, RFC 4954, RFC 3207, RFC 3030) and the upstream's
//! replies during our own login (RFC 5321 §4.2).
//!
//! Every parser takes one complete line from [`crate::proto::Framer`].

use nom::bytes::complete::{take_while, take_while1, take_while_m_n};
use nom::character::complete::char;
use nom::combinator::opt;
use nom::sequence::preceded;
use nom::{IResult, Parser};

/// A line that is not the SMTP it should be; answered with a 5xx reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed SMTP line")]
pub struct ParseError;

/// A client command before login. `Debug` redacts the SASL initial
/// response.
#[derive(Clone, PartialEq, Eq)]
pub enum Command<'a> {
    /// `EHLO domain` (RFC 5321 §4.1.1.1).
    Ehlo(&'a [u8]),
    /// `HELO domain`.
    Helo(&'a [u8]),
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954 §4).
    Auth {
        mechanism: &'a [u8],
        initial_response: Option<&'a [u8]>,
    },
    Noop,
    Rset,
    Quit,
    Help,
    /// `BDAT size [LAST]` (RFC 3030 §2): `size` raw bytes follow the line.
    Bdat(usize),
    /// A mail transaction or query command (`MAIL`, `RCPT`, `DATA`, `VRFY`,
    /// `EXPN`, `ETRN`, `BURL`): it needs a login first.
    NeedsLogin,
    /// A well-formed line with a verb we don't know.
    Unknown,
}

impl std::fmt::Debug for Command<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ehlo(d) => write!(f, "Ehlo({:?})", String::from_utf8_lossy(d)),
            Self::Helo(d) => write!(f, "Helo({:?})", String::from_utf8_lossy(d)),
            Self::StartTls => f.write_str("StartTls"),
            Self::Auth {
                mechanism,
                initial_response,
            } => f
                .debug_struct("Auth")
                .field("mechanism", &String::from_utf8_lossy(mechanism))
                .field("initial_response", &initial_response.map(|_| "<redacted>"))
                .finish(),
            Self::Noop => f.write_str("Noop"),
            Self::Rset => f.write_str("Rset"),
            Self::Quit => f.write_str("Quit"),
            Self::Help => f.write_str("Help"),
            Self::Bdat(n) => write!(f, "Bdat({n})"),
            Self::NeedsLogin => f.write_str("NeedsLogin"),
            Self::Unknown => f.write_str("Unknown"),
        }
    }
}

fn not_eol(b: u8) -> bool {
    b != b'\r' && b != b'\n'
}

/// `verb [SP arguments] CRLF`: a verb of letters, then the rest of the
/// line. A bare LF ends a line too: clients send it, and the line is
/// refused or relayed, never misread.
/// A verb and its arguments, if any.
type Line<'a> = (&'a [u8], Option<&'a [u8]>);

fn line(input: &[u8]) -> IResult<&[u8], Line<'_>> {
    let (i, verb) = take_while1(|b: u8| b.is_ascii_alphabetic()).parse(input)?;
    let (i, args) = opt(preceded(char(' '), take_while(not_eol))).parse(i)?;
    let (i, _) = (opt(char('\r')), char('\n')).parse(i)?;
    Ok((i, (verb, args)))
}

/// `command = verb [SP arguments] CRLF`, verbs case-insensitive (RFC 5321
/// §2.4).
///
/// # Errors
/// The line is not a command, or its arguments don't fit its verb; answer
/// with a 5xx reply.
pub fn command(input: &[u8]) -> Result<Command<'_>, ParseError> {
    let Ok((&[], (verb, args))) = line(input) else {
        return Err(ParseError);
    };
    let args = args.map(<[u8]>::trim_ascii).filter(|a| !a.is_empty());
    let is = |name: &str| verb.eq_ignore_ascii_case(name.as_bytes());
    let word = args
        .and_then(|a| a.split(|&b| b == b' ').next())
        .filter(|w| !w.is_empty());
    let command = if is("EHLO") {
        Command::Ehlo(word.ok_or(ParseError)?)
    } else if is("HELO") {
        Command::Helo(word.ok_or(ParseError)?)
    } else if is("STARTTLS") {
        if args.is_some() {
            return Err(ParseError);
        }
        Command::StartTls
    } else if is("AUTH") {
        let args = args.ok_or(ParseError)?;
        let mut words = args.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let mechanism = words.next().ok_or(ParseError)?;
        let initial_response = words.next();
        if words.next().is_some() {
            return Err(ParseError);
        }
        Command::Auth {
            mechanism,
            initial_response,
        }
    } else if is("NOOP") {
        Command::Noop
    } else if is("RSET") {
        Command::Rset
    } else if is("QUIT") {
        Command::Quit
    } else if is("HELP") {
        Command::Help
    } else if is("BDAT") {
        let size = word.ok_or(ParseError)?;
        Command::Bdat(chunk_size(size).ok_or(ParseError)?)
    } else if ["MAIL", "RCPT", "DATA", "VRFY", "EXPN", "ETRN", "BURL"]
        .iter()
        .any(|v| is(v))
    {
        Command::NeedsLogin
    } else {
        Command::Unknown
    };
    Ok(command)
}

/// `chunk-size = 1*DIGIT` (RFC 3030 §2), within `usize`.
fn chunk_size(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// One line of an upstream reply (RFC 5321 §4.2): `code "-" text` inside a
/// multi-line reply, `code [SP text]` on its last line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyLine<'a> {
    pub code: u16,
    /// The last line of the reply.
    pub last: bool,
    pub text: &'a [u8],
}

/// `Reply-line = *( Reply-code "-" [ textstring ] CRLF ) Reply-code [ SP
/// textstring ] CRLF`.
///
/// # Errors
/// The line is not a reply line.
pub fn reply_line(input: &[u8]) -> Result<ReplyLine<'_>, ParseError> {
    type Parts<'a> = (&'a [u8], Option<char>, &'a [u8]);
    let parsed: IResult<&[u8], Parts<'_>> = (
        take_while_m_n(3, 3, |b: u8| b.is_ascii_digit()),
        opt(nom::branch::alt((char('-'), char(' ')))),
        take_while(not_eol),
    )
        .parse(input);
    let Ok((rest, (digits, separator, text))) = parsed else {
        return Err(ParseError);
    };
    if !matches!(rest, b"\r\n" | b"\n") || (separator.is_none() && !text.is_empty()) {
        return Err(ParseError);
    }
    let code = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    if !(200..600).contains(&code) {
        return Err(ParseError);
    }
    Ok(ReplyLine {
        code,
        last: separator != Some('-'),
        text,
    })
}

/// The first word of an EHLO keyword line, upper-cased: `SIZE 10240000`
/// -> `SIZE`.
pub fn keyword(line: &str) -> String {
    line.split(' ')
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase()
}

/// Whether `name` can stand in an EHLO (RFC 5321 §4.1.3).
pub fn is_hello_name(name: &str) -> bool {
    crate::proto::descriptor::is_host_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_known_answers() {
        assert_eq!(
            command(b"EHLO client.example\r\n"),
            Ok(Command::Ehlo(b"client.example"))
        );
        assert_eq!(
            command(b"ehlo [127.0.0.1]\n"),
            Ok(Command::Ehlo(b"[127.0.0.1]"))
        );
        assert_eq!(command(b"HELO x\r\n"), Ok(Command::Helo(b"x")));
        assert_eq!(command(b"STARTTLS\r\n"), Ok(Command::StartTls));
        assert_eq!(
            command(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
            Ok(Command::Auth {
                mechanism: b"PLAIN",
                initial_response: Some(b"AGFsaWNlAHNlY3JldA==")
            })
        );
        assert_eq!(
            command(b"auth login\r\n"),
            Ok(Command::Auth {
                mechanism: b"login",
                initial_response: None
            })
        );
        assert_eq!(command(b"MAIL FROM:<a@b>\r\n"), Ok(Command::NeedsLogin));
        assert_eq!(command(b"DATA\r\n"), Ok(Command::NeedsLogin));
        assert_eq!(command(b"BDAT 1000 LAST\r\n"), Ok(Command::Bdat(1000)));
        assert_eq!(command(b"NOOP hello\r\n"), Ok(Command::Noop));
        assert_eq!(command(b"XYZZY\r\n"), Ok(Command::Unknown));
    }

    #[test]
    fn malformed_commands_are_errors() {
        for bad in [
            &b"EHLO\r\n"[..],
            b"EHLO \r\n",
            b"AUTH\r\n",
            b"AUTH PLAIN a b\r\n",
            b"STARTTLS now\r\n",
            b"BDAT x\r\n",
            b"BDAT 99999999999999999999999\r\n",
            b"\r\n",
            b"1234\r\n",
            b"EHLO x",
        ] {
            assert_eq!(
                command(bad),
                Err(ParseError),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn reply_lines() {
        assert_eq!(
            reply_line(b"250-SIZE 35882577\r\n"),
            Ok(ReplyLine {
                code: 250,
                last: false,
                text: b"SIZE 35882577"
            })
        );
        assert_eq!(
            reply_line(b"235 2.7.0 Authentication successful\r\n"),
            Ok(ReplyLine {
                code: 235,
                last: true,
                text: b"2.7.0 Authentication successful"
            })
        );
        assert_eq!(
            reply_line(b"250\r\n"),
            Ok(ReplyLine {
                code: 250,
                last: true,
                text: b""
            })
        );
        for bad in [
            &b"25 ok\r\n"[..],
            b"abc ok\r\n",
            b"250x\r\n",
            b"999 x\r\n",
            b"250 ok",
        ] {
            assert!(
                reply_line(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn hello_names() {
        assert!(is_hello_name("client.example.com"));
        assert!(is_hello_name("[192.0.2.1]"));
        assert!(is_hello_name("[IPv6:2001:db8::1]"));
        assert!(!is_hello_name("bad name"));
        assert!(!is_hello_name("évil"));
        assert!(!is_hello_name(""));
        assert!(!is_hello_name("[]"));
    }
}
