//! nom parsers for the IMAP the gateway reads: client commands before login
//! (RFC 9051 §6.1, §6.2) and upstream responses during our own login (§7).
//!
//! Every parser takes one complete frame from [`crate::proto::Framer`], so the
//! `complete` combinators apply: a short input is an error, never "more".

use nom::branch::alt;
use nom::bytes::complete::{tag, tag_no_case, take, take_while, take_while1};
use nom::character::complete::{char, digit1};
use nom::combinator::{map, map_res, opt, verify};
use nom::multi::separated_list1;
use nom::sequence::{delimited, preceded, terminated};
use nom::{IResult, Parser};

use crate::secret::Secret;

/// A line that is not the IMAP it should be. Answered with BAD, or fails
/// an upstream login; never a reason to guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed IMAP line")]
pub struct ParseError;

/// A client command before login. `Debug` redacts the password and the
/// SASL initial response.
#[derive(Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Capability,
    Noop,
    Logout,
    /// RFC 2971. The client's parameters are accepted and ignored.
    Id,
    StartTls,
    Login {
        username: Vec<u8>,
        password: Secret<Vec<u8>>,
    },
    Authenticate {
        mechanism: &'a [u8],
        /// The SASL-IR initial response (RFC 4959), still base64.
        initial_response: Option<&'a [u8]>,
    },
    /// A well-formed command that is not valid before login.
    Other(&'a [u8]),
}

impl std::fmt::Debug for Command<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Login { username, password } => f
                .debug_struct("Login")
                .field("username", &String::from_utf8_lossy(username))
                .field("password", password)
                .finish(),
            Self::Authenticate {
                mechanism,
                initial_response,
            } => f
                .debug_struct("Authenticate")
                .field("mechanism", &String::from_utf8_lossy(mechanism))
                .field("initial_response", &initial_response.map(|_| "<redacted>"))
                .finish(),
            Self::Other(name) => f
                .debug_tuple("Other")
                .field(&String::from_utf8_lossy(name))
                .finish(),
            Self::Capability => f.write_str("Capability"),
            Self::Noop => f.write_str("Noop"),
            Self::Logout => f.write_str("Logout"),
            Self::Id => f.write_str("Id"),
            Self::StartTls => f.write_str("StartTls"),
        }
    }
}

/// A command with its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tagged<'a> {
    pub tag: &'a str,
    pub command: Command<'a>,
}

/// `command = tag SP (command-any / command-nonauth / ...) CRLF`
///
/// # Errors
/// The input is not a command we understand; answer it with BAD.
pub fn command(input: &[u8]) -> Result<Tagged<'_>, ParseError> {
    let parsed: IResult<&[u8], Tagged<'_>> = terminated(
        (terminated(imap_tag, char(' ')), command_body)
            .map(|(tag, command)| Tagged { tag, command }),
        crlf,
    )
    .parse(input);
    match parsed {
        Ok((&[], tagged)) => Ok(tagged),
        _ => Err(ParseError),
    }
}

/// The tag at the start of a line that failed to parse, to answer it with
/// `tag BAD`. `None` when there is no usable tag (answer `* BAD`).
pub fn leading_tag(input: &[u8]) -> Option<&str> {
    terminated(imap_tag, char(' '))
        .parse(input)
        .ok()
        .map(|(_, t)| t)
}

fn command_body(i: &[u8]) -> IResult<&[u8], Command<'_>> {
    alt((
        map(tag_no_case("CAPABILITY"), |_| Command::Capability),
        map(tag_no_case("NOOP"), |_| Command::Noop),
        map(tag_no_case("LOGOUT"), |_| Command::Logout),
        map(tag_no_case("STARTTLS"), |_| Command::StartTls),
        map(
            (
                tag_no_case("ID"),
                char(' '),
                take_while1(|b| b != b'\r' && b != b'\n'),
            ),
            |_| Command::Id,
        ),
        login,
        authenticate,
        // Any other command name; a known one whose arguments failed above
        // is a syntax error, not "not valid before login".
        map(
            (
                verify(atom, |name: &[u8]| !is_known(name)),
                take_while(|b| b != b'\r' && b != b'\n'),
            ),
            |(name, _)| Command::Other(name),
        ),
    ))
    .parse(i)
}

fn is_known(name: &[u8]) -> bool {
    [
        "CAPABILITY",
        "NOOP",
        "LOGOUT",
        "STARTTLS",
        "ID",
        "LOGIN",
        "AUTHENTICATE",
    ]
    .iter()
    .any(|k| name.eq_ignore_ascii_case(k.as_bytes()))
}

/// `login = "LOGIN" SP userid SP password`; both are `astring`.
fn login(i: &[u8]) -> IResult<&[u8], Command<'_>> {
    map(
        (tag_no_case("LOGIN "), astring, char(' '), astring),
        |(_, username, _, password)| Command::Login {
            username,
            password: Secret::new(password),
        },
    )
    .parse(i)
}

/// `authenticate = "AUTHENTICATE" SP auth-type [SP (base64 / "=")]`
fn authenticate(i: &[u8]) -> IResult<&[u8], Command<'_>> {
    map(
        (
            tag_no_case("AUTHENTICATE "),
            atom,
            opt(preceded(char(' '), take_while1(is_base64_char))),
        ),
        |(_, mechanism, initial_response)| Command::Authenticate {
            mechanism,
            initial_response,
        },
    )
    .parse(i)
}

/// `tag = 1*<any ASTRING-CHAR except "+">`
fn imap_tag(i: &[u8]) -> IResult<&[u8], &str> {
    map_res(
        take_while1(|b| is_astring_char(b) && b != b'+'),
        std::str::from_utf8,
    )
    .parse(i)
}

/// `atom = 1*ATOM-CHAR`
fn atom(i: &[u8]) -> IResult<&[u8], &[u8]> {
    take_while1(is_atom_char).parse(i)
}

/// `astring = 1*ASTRING-CHAR / string`
fn astring(i: &[u8]) -> IResult<&[u8], Vec<u8>> {
    alt((map(take_while1(is_astring_char), <[u8]>::to_vec), string)).parse(i)
}

/// `string = quoted / literal`
fn string(i: &[u8]) -> IResult<&[u8], Vec<u8>> {
    alt((quoted, map(literal, <[u8]>::to_vec))).parse(i)
}

/// `quoted = DQUOTE *QUOTED-CHAR DQUOTE`, where `QUOTED-CHAR` is a text
/// character other than `"` and `\`, or `\` followed by either. UTF-8 is
/// allowed (RFC 9051 §9, `UTF8-2` to `UTF8-4`).
fn quoted(i: &[u8]) -> IResult<&[u8], Vec<u8>> {
    let (mut i, _) = char('"').parse(i)?;
    let mut out = Vec::new();
    loop {
        match i.split_first() {
            Some((b'"', rest)) => return Ok((rest, out)),
            Some((b'\\', rest)) => match rest.split_first() {
                Some((&c @ (b'"' | b'\\'), rest)) => {
                    out.push(c);
                    i = rest;
                }
                _ => return Err(fail(i)),
            },
            Some((&c, rest)) if c != b'\r' && c != b'\n' && c != 0 => {
                out.push(c);
                i = rest;
            }
            _ => return Err(fail(i)),
        }
    }
}

/// `literal = "{" number64 ["+"] "}" CRLF *CHAR8`. The framer has already
/// checked the size against the cap and waited for all of it.
fn literal(i: &[u8]) -> IResult<&[u8], &[u8]> {
    let (i, n) = delimited(
        char('{'),
        terminated(
            map_res(digit1, |d: &[u8]| {
                std::str::from_utf8(d)
                    .map_err(|_| ())?
                    .parse::<usize>()
                    .map_err(|_| ())
            }),
            opt(char('+')),
        ),
        char('}'),
    )
    .parse(i)?;
    let (i, _) = crlf(i)?;
    let (i, data) = take(n).parse(i)?;
    if data.contains(&0) {
        return Err(fail(i));
    }
    Ok((i, data))
}

/// Line ending. Bare LF is accepted, as most servers do.
fn crlf(i: &[u8]) -> IResult<&[u8], ()> {
    map((opt(char('\r')), char('\n')), |_| ()).parse(i)
}

fn fail(i: &[u8]) -> nom::Err<nom::error::Error<&[u8]>> {
    nom::Err::Error(nom::error::Error::new(i, nom::error::ErrorKind::Verify))
}

/// `ATOM-CHAR = <any CHAR except atom-specials>`
fn is_atom_char(b: u8) -> bool {
    b.is_ascii()
        && !b.is_ascii_control()
        && !matches!(
            b,
            b'(' | b')' | b'{' | b' ' | b'%' | b'*' | b'"' | b'\\' | b']'
        )
}

/// `ASTRING-CHAR = ATOM-CHAR / resp-specials`
fn is_astring_char(b: u8) -> bool {
    is_atom_char(b) || b == b']'
}

fn is_base64_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=')
}

/// One line from the upstream during login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response<'a> {
    /// `continue-req = "+" [SP (resp-text / base64)] CRLF`
    Continue(&'a [u8]),
    /// `"*" SP CAPABILITY *(SP capability)`
    Capabilities(Vec<&'a str>),
    /// Any other untagged response: `status` is `OK`, `BYE`, `PREAUTH` or
    /// another atom.
    Untagged {
        status: &'a [u8],
        code: Option<Code<'a>>,
    },
    /// `response-tagged = tag SP resp-cond-state CRLF`
    Tagged {
        tag: &'a str,
        status: Status,
        code: Option<Code<'a>>,
        text: &'a [u8],
    },
}

/// `resp-cond-state` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
}

/// A response code, `"[" resp-text-code "]"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code<'a> {
    Capabilities(Vec<&'a str>),
    Other(&'a [u8]),
}

/// `response-data / response-tagged / continue-req`, one line.
///
/// # Errors
/// The line is not an IMAP response.
pub fn response(input: &[u8]) -> Result<Response<'_>, ParseError> {
    let parsed: IResult<&[u8], Response<'_>> =
        terminated(alt((continue_req, capability_data, untagged, tagged)), crlf).parse(input);
    match parsed {
        Ok((&[], r)) => Ok(r),
        _ => Err(ParseError),
    }
}

fn line_text(i: &[u8]) -> IResult<&[u8], &[u8]> {
    take_while(|b| b != b'\r' && b != b'\n').parse(i)
}

fn continue_req(i: &[u8]) -> IResult<&[u8], Response<'_>> {
    map(
        preceded(char('+'), opt(preceded(char(' '), line_text))),
        |t| Response::Continue(t.unwrap_or_default()),
    )
    .parse(i)
}

/// `capability-data = "CAPABILITY" *(SP capability)`
fn capability_data(i: &[u8]) -> IResult<&[u8], Response<'_>> {
    map(
        preceded(tag_no_case("* CAPABILITY "), capability_list),
        Response::Capabilities,
    )
    .parse(i)
}

fn capability_list(i: &[u8]) -> IResult<&[u8], Vec<&str>> {
    terminated(
        separated_list1(char(' '), map_res(atom, std::str::from_utf8)),
        opt(char(' ')),
    )
    .parse(i)
}

fn untagged(i: &[u8]) -> IResult<&[u8], Response<'_>> {
    map(
        (
            tag("* "),
            atom,
            opt(preceded(char(' '), resp_code)),
            line_text,
        ),
        |(_, status, code, _)| Response::Untagged { status, code },
    )
    .parse(i)
}

fn tagged(i: &[u8]) -> IResult<&[u8], Response<'_>> {
    map(
        (
            terminated(imap_tag, char(' ')),
            alt((
                map(tag_no_case("OK"), |_| Status::Ok),
                map(tag_no_case("NO"), |_| Status::No),
                map(tag_no_case("BAD"), |_| Status::Bad),
            )),
            opt(preceded(char(' '), resp_code)),
            opt(char(' ')),
            line_text,
        ),
        |(tag, status, code, _, text)| Response::Tagged {
            tag,
            status,
            code,
            text,
        },
    )
    .parse(i)
}

/// `"[" resp-text-code "]"`, with `CAPABILITY` parsed out.
fn resp_code(i: &[u8]) -> IResult<&[u8], Code<'_>> {
    delimited(
        char('['),
        alt((
            map(
                preceded(tag_no_case("CAPABILITY "), capability_list),
                Code::Capabilities,
            ),
            map(
                take_while(|b| b != b']' && b != b'\r' && b != b'\n'),
                Code::Other,
            ),
        )),
        char(']'),
    )
    .parse(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login_args(line: &[u8]) -> (Vec<u8>, Vec<u8>) {
        match command(line).map(|t| t.command) {
            Ok(Command::Login { username, password }) => (username, password.expose().clone()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn login_argument_forms() {
        assert_eq!(
            login_args(b"a LOGIN alice s3cret\r\n"),
            (b"alice".to_vec(), b"s3cret".to_vec())
        );
        assert_eq!(
            login_args(b"a login \"al ice\" \"p\\\"w\\\\d\"\r\n"),
            (b"al ice".to_vec(), b"p\"w\\d".to_vec())
        );
        assert_eq!(
            login_args(b"a LOGIN {5}\r\nalice {4+}\r\np w\"\r\n"),
            (b"alice".to_vec(), b"p w\"".to_vec())
        );
        assert_eq!(
            login_args(b"a LOGIN \"\" {0}\r\n\r\n"),
            (b"".to_vec(), b"".to_vec())
        );
        assert_eq!(
            login_args(b"a LOGIN \"j\xc3\xbcrgen\" \"p\xc3\xa4ss\"\n").1,
            b"p\xc3\xa4ss".to_vec()
        );
    }

    #[test]
    fn malformed_commands_are_errors() {
        for line in [
            &b"a LOGIN alice\r\n"[..],
            b"a LOGIN \"unterminated\r\n",
            b"a LOGIN alice \"bad\\escape\"\r\n",
            b"a LOGIN {5}\r\nabc\r\n",
            b"a LOGIN alice pw extra\r\n",
            b"+a NOOP\r\n",
            b"\r\n",
            b"a\r\n",
            b"a NOOP",
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
    fn simple_commands_and_tags() {
        let t = command(b"A001 capability\r\n").unwrap();
        assert_eq!((t.tag, t.command), ("A001", Command::Capability));
        assert_eq!(command(b"x NOOP\r\n").unwrap().command, Command::Noop);
        assert_eq!(command(b"x LOGOUT\r\n").unwrap().command, Command::Logout);
        assert_eq!(
            command(b"x STARTTLS\r\n").unwrap().command,
            Command::StartTls
        );
        assert_eq!(
            command(b"x ID (\"name\" \"fetchmail\")\r\n")
                .unwrap()
                .command,
            Command::Id
        );
        assert_eq!(command(b"x ID NIL\r\n").unwrap().command, Command::Id);
        assert_eq!(
            command(b"x SELECT INBOX\r\n").unwrap().command,
            Command::Other(b"SELECT")
        );
        assert_eq!(leading_tag(b"tag99 \xff\xfe\r\n"), Some("tag99"));
        assert_eq!(leading_tag(b"\x00junk"), None);
    }

    #[test]
    fn authenticate_with_and_without_initial_response() {
        assert_eq!(
            command(b"a AUTHENTICATE PLAIN AGFsaWNlAHB3\r\n")
                .unwrap()
                .command,
            Command::Authenticate {
                mechanism: b"PLAIN",
                initial_response: Some(b"AGFsaWNlAHB3")
            }
        );
        assert_eq!(
            command(b"a authenticate login\r\n").unwrap().command,
            Command::Authenticate {
                mechanism: b"login",
                initial_response: None
            }
        );
        assert_eq!(
            command(b"a AUTHENTICATE PLAIN =\r\n").unwrap().command,
            Command::Authenticate {
                mechanism: b"PLAIN",
                initial_response: Some(b"=")
            }
        );
    }

    #[test]
    fn upstream_responses() {
        assert_eq!(
            response(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] Dovecot ready.\r\n"),
            Ok(Response::Untagged {
                status: b"OK",
                code: Some(Code::Capabilities(vec![
                    "IMAP4rev1",
                    "SASL-IR",
                    "AUTH=XOAUTH2"
                ]))
            })
        );
        assert_eq!(
            response(b"* CAPABILITY IMAP4rev1 IDLE\r\n"),
            Ok(Response::Capabilities(vec!["IMAP4rev1", "IDLE"]))
        );
        assert_eq!(
            response(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n"),
            Ok(Response::Continue(b"eyJzdGF0dXMiOiI0MDEifQ=="))
        );
        assert_eq!(response(b"+\r\n"), Ok(Response::Continue(b"")));
        assert_eq!(
            response(b"m3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
            Ok(Response::Tagged {
                tag: "m3",
                status: Status::No,
                code: Some(Code::Other(b"AUTHENTICATIONFAILED")),
                text: b"Authentication failed."
            })
        );
        assert_eq!(
            response(b"m3 OK Logged in\r\n"),
            Ok(Response::Tagged {
                tag: "m3",
                status: Status::Ok,
                code: None,
                text: b"Logged in"
            })
        );
        assert_eq!(response(b"garbage\r\n"), Err(ParseError));
    }
}
