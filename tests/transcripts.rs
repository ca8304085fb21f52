//! Conversation transcripts run against the sans-io sessions, with the input
//! split at chunk sizes 1, 2, 3, 7, 64 and whole: the same transcript must
//! hold at every size.
//!
//! Format, one event a line (`#` starts a comment; CRLF is appended to each
//! `cl>`/`up>`/`>cl`/`>up` line unless it ends in a lone `\`; `\r`, `\n`,
//! `\\` and `\xHH` are escapes; any other backslash stands for itself):
//! - client sessions: `cl> bytes` the client sends; `>cl bytes` we answer;
//!   `!starttls`, `!auth USER PASS`, `!splice BYTES`, `!close` are expected
//!   actions; `=tls`, `=ok CAPS...`, `=fail bad|unavailable|needs-auth|not-authorized|in-use|session-limit`
//!   are the driver's calls.
//! - upstream logins: `up> bytes` the upstream sends; `>up bytes` we send;
//!   `!starttls`, `!loggedin CAPS...`, `!leftover BYTES`, `!rejected STATUS|-`,
//!   `!in-use`, `!unavailable`, `!protocol`, `!disabled` are expected actions; `=tls` is
//!   the driver's call.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs,
    clippy::result_large_err
)] // tests may panic

use std::fmt::Write as _;
use std::path::Path;

use mailgate::proto::{
    Action, ClientSession, FrameLimits, LoginFailure, UpstreamAction, UpstreamFailure,
    UpstreamLogin, UpstreamTls,
};
use mailgate::secret::Secret;
use mailgate::{imap, pop3, smtp};

const CHUNKS: [usize; 6] = [1, 2, 3, 7, 64, usize::MAX];

fn unescape(s: &str) -> Vec<u8> {
    let (s, crlf) = match s.strip_suffix('\\') {
        Some(s) if !s.ends_with('\\') => (s, false),
        _ => (s, true),
    };
    let mut out = Vec::new();
    let mut chars = s.bytes().peekable();
    while let Some(c) = chars.next() {
        if c != b'\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex: String = [chars.next(), chars.next()]
                    .iter()
                    .flatten()
                    .map(|&b| b as char)
                    .collect();
                out.push(u8::from_str_radix(&hex, 16).expect("bad \\x escape"));
            }
            // Any other backslash stands for itself (IMAP quoted escapes).
            Some(other) => out.extend([b'\\', other]),
            None => out.push(b'\\'),
        }
    }
    if crlf {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A transcript split into segments: bytes to feed (or a driver call), then
/// the actions expected before the next segment.
struct Segment {
    input: Vec<u8>,
    call: Option<String>,
    expected: String,
}

fn segments(text: &str, input_prefix: &str, output_prefix: &str) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    let mut expecting = false;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(bytes) = line.strip_prefix(input_prefix) {
            let bytes = unescape(bytes.strip_prefix(' ').unwrap_or(bytes));
            match out.last_mut() {
                Some(seg) if !expecting && seg.call.is_none() => seg.input.extend(bytes),
                _ => out.push(Segment {
                    input: bytes,
                    call: None,
                    expected: String::new(),
                }),
            }
            expecting = false;
        } else if let Some(call) = line.strip_prefix('=') {
            out.push(Segment {
                input: Vec::new(),
                call: Some(call.to_owned()),
                expected: String::new(),
            });
            expecting = false;
        } else {
            let seg = match out.last_mut() {
                Some(seg) => seg,
                None => {
                    out.push(Segment {
                        input: Vec::new(),
                        call: None,
                        expected: String::new(),
                    });
                    out.last_mut().unwrap()
                }
            };
            if let Some(bytes) = line.strip_prefix(output_prefix) {
                let bytes = unescape(bytes.strip_prefix(' ').unwrap_or(bytes));
                writeln!(seg.expected, "send {:?}", String::from_utf8_lossy(&bytes)).unwrap();
            } else {
                let action = line
                    .strip_prefix('!')
                    .unwrap_or_else(|| panic!("unknown line {line:?}"));
                let (name, arg) = action.split_once(' ').unwrap_or((action, ""));
                match name {
                    "leftover" => {
                        let bytes = unescape(&format!("{arg}\\"));
                        writeln!(
                            seg.expected,
                            "leftover {:?}",
                            String::from_utf8_lossy(&bytes)
                        )
                        .unwrap();
                    }
                    "splice" => {
                        let bytes = unescape(&format!("{arg}\\"));
                        writeln!(seg.expected, "splice {:?}", String::from_utf8_lossy(&bytes))
                            .unwrap();
                    }
                    _ => writeln!(seg.expected, "{name} {arg}").unwrap(),
                }
            }
            expecting = true;
        }
    }
    out
}

/// Renders actions, merging consecutive sends (and leftovers) so that
/// chunking can't matter.
fn render(actions: &mut Vec<(Kind, String)>) -> String {
    let mut out = String::new();
    let mut pending: Option<(Kind, String)> = None;
    for (kind, text) in actions.drain(..) {
        match (&mut pending, kind) {
            (Some((k, buf)), kind) if *k == kind && kind != Kind::Action => buf.push_str(&text),
            (_, kind) => {
                if let Some(p) = pending.take() {
                    render_one(p, &mut out);
                }
                pending = Some((kind, text));
            }
        }
    }
    if let Some(p) = pending.take() {
        render_one(p, &mut out);
    }
    out
}

fn render_one((kind, text): (Kind, String), out: &mut String) {
    match kind {
        Kind::Send => writeln!(out, "send {text:?}").unwrap(),
        Kind::Leftover => writeln!(out, "leftover {text:?}").unwrap(),
        Kind::Action => writeln!(out, "{text}").unwrap(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Send,
    Leftover,
    Action,
}

fn expected_merged(expected: &str) -> String {
    // Merge consecutive expected sends the same way.
    let mut actions = Vec::new();
    for line in expected.lines() {
        if let Some(q) = line.strip_prefix("send ") {
            actions.push((Kind::Send, serde_json::from_str(q).unwrap()));
        } else if let Some(q) = line.strip_prefix("leftover ") {
            actions.push((Kind::Leftover, serde_json::from_str(q).unwrap()));
        } else {
            actions.push((Kind::Action, line.to_owned()));
        }
    }
    render(&mut actions)
}

fn client_action(action: Action, out: &mut Vec<(Kind, String)>) {
    match action {
        Action::Send(b) => out.push((Kind::Send, String::from_utf8_lossy(&b).into_owned())),
        Action::StartTls => out.push((Kind::Action, "starttls ".into())),
        Action::Authenticate(c) => out.push((
            Kind::Action,
            format!(
                "auth {} {}",
                c.username,
                String::from_utf8_lossy(c.password.expose())
            ),
        )),
        Action::Splice { to_upstream } => out.push((
            Kind::Action,
            format!("splice {:?}", String::from_utf8_lossy(&to_upstream)),
        )),
        Action::Close => out.push((Kind::Action, "close ".into())),
    }
}

const LIMITS: FrameLimits = FrameLimits {
    max_line: 200,
    max_literal: 100,
};

/// Transcripts whose name starts with `starttls` run on a STARTTLS / STLS
/// listener; the others on implicit TLS.
fn imap_session(name: &str) -> Box<dyn ClientSession> {
    let starttls = name.starts_with("starttls");
    Box::new(imap::Session::new(imap::Options {
        tls_active: !starttls,
        starttls,
        loopback_plaintext: false,
        limits: LIMITS,
    }))
}

fn pop3_session(name: &str) -> Box<dyn ClientSession> {
    let stls = name.starts_with("starttls");
    Box::new(pop3::Session::new(pop3::Options {
        tls_active: !stls,
        stls,
        loopback_plaintext: false,
        limits: LIMITS,
    }))
}

/// SMTP transcripts named `starttls*` run on a STARTTLS listener; those
/// named `known-upstream*` know one upstream's EHLO keywords.
fn smtp_session(name: &str) -> Box<dyn ClientSession> {
    let starttls = name.starts_with("starttls");
    let known: Vec<String> = [
        "SIZE 10485760",
        "PIPELINING",
        "AUTH XOAUTH2",
        "8BITMIME",
        "SMTPUTF8",
        "ETRN",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    Box::new(smtp::Session::new(smtp::Options {
        tls_active: !starttls,
        starttls,
        loopback_plaintext: false,
        limits: LIMITS,
        host: "gw.example".into(),
        upstream_capabilities: name
            .starts_with("known-upstream")
            .then(|| vec![std::sync::Arc::<[String]>::from(known)].into()),
    }))
}

/// A long token (`*long-token*`) doesn't fit one SMTP command line.
fn smtp_upstream(name: &str) -> Box<dyn UpstreamLogin> {
    let token = if name.contains("long-token") {
        "t".repeat(600)
    } else {
        "tok".to_owned()
    };
    Box::new(smtp::Upstream::new(
        "alice@example.test",
        &Secret::new(token),
        upstream_tls(name),
        "client.example",
    ))
}

fn upstream_tls(name: &str) -> UpstreamTls {
    if name.starts_with("starttls") {
        UpstreamTls::StartTls
    } else {
        UpstreamTls::Implicit
    }
}

fn imap_upstream(name: &str) -> Box<dyn UpstreamLogin> {
    Box::new(imap::Upstream::new(
        "alice@example.test",
        &Secret::new("tok".into()),
        upstream_tls(name),
    ))
}

fn pop3_upstream(name: &str) -> Box<dyn UpstreamLogin> {
    // A long token makes the initial response too long for one POP3
    // command line; transcripts named `*long-token*` use it.
    let token = if name.contains("long-token") {
        "t".repeat(300)
    } else {
        "tok".to_owned()
    };
    Box::new(pop3::Upstream::new(
        "alice@example.test",
        &Secret::new(token),
        upstream_tls(name),
    ))
}

fn run_client(name: &str, text: &str, chunk: usize, new: fn(&str) -> Box<dyn ClientSession>) {
    let mut session = new(name);
    let mut got = Vec::new();
    for (i, seg) in segments(text, "cl>", ">cl").into_iter().enumerate() {
        if let Some(call) = &seg.call {
            let (verb, arg) = call.split_once(' ').unwrap_or((call, ""));
            match verb {
                "tls" => session.tls_established(),
                "ok" => session.login_succeeded(
                    &arg.split_whitespace()
                        .map(str::to_owned)
                        .collect::<Vec<_>>(),
                ),
                "fail" => session.login_failed(match arg {
                    "bad" => LoginFailure::BadCredentials,
                    "unavailable" => LoginFailure::Unavailable,
                    "needs-auth" => LoginFailure::NeedsAuthorization,
                    "not-authorized" => LoginFailure::NotAuthorizedYet,
                    "session-limit" => LoginFailure::SessionLimit,
                    "in-use" => LoginFailure::InUse,
                    other => panic!("unknown failure {other}"),
                }),
                "shutdown" => session.shutdown(),
                other => panic!("unknown call {other}"),
            }
        }
        for piece in seg.input.chunks(chunk.min(seg.input.len()).max(1)) {
            session.feed(piece);
            while let Some(a) = session.next_action() {
                client_action(a, &mut got);
            }
        }
        while let Some(a) = session.next_action() {
            client_action(a, &mut got);
        }
        assert_eq!(
            render(&mut got),
            expected_merged(&seg.expected),
            "{name}, segment {i}, chunk {chunk}"
        );
    }
}

fn upstream_action(action: UpstreamAction, out: &mut Vec<(Kind, String)>) {
    match action {
        UpstreamAction::Send(b) => out.push((Kind::Send, String::from_utf8_lossy(&b).into_owned())),
        UpstreamAction::StartTls => out.push((Kind::Action, "starttls ".into())),
        UpstreamAction::LoggedIn {
            capabilities,
            to_client,
        } => {
            out.push((Kind::Action, format!("loggedin {}", capabilities.join(" "))));
            if !to_client.is_empty() {
                out.push((
                    Kind::Leftover,
                    String::from_utf8_lossy(&to_client).into_owned(),
                ));
            }
        }
        UpstreamAction::Failed(UpstreamFailure::Rejected { status, in_use }) => {
            let status = status.map_or("-".to_owned(), |s| s.to_string());
            out.push((Kind::Action, format!("rejected {status}")));
            if in_use {
                out.push((Kind::Action, "in-use ".into()));
            }
        }
        UpstreamAction::Failed(UpstreamFailure::Unavailable(_)) => {
            out.push((Kind::Action, "unavailable ".into()))
        }
        UpstreamAction::Failed(UpstreamFailure::Protocol(_)) => {
            out.push((Kind::Action, "protocol ".into()))
        }
        UpstreamAction::Failed(UpstreamFailure::Disabled(why)) => {
            assert!(why.contains("Set-CASMailbox"), "{why}");
            out.push((Kind::Action, "disabled ".into()))
        }
    }
}

fn run_upstream(name: &str, text: &str, chunk: usize, new: fn(&str) -> Box<dyn UpstreamLogin>) {
    let mut up = new(name);
    let mut got = Vec::new();
    let mut logged_in = false;
    for (i, seg) in segments(text, "up>", ">up").into_iter().enumerate() {
        match seg.call.as_deref() {
            Some("tls") => up.tls_established(),
            Some(other) => panic!("unknown call {other}"),
            None => {}
        }
        for piece in seg.input.chunks(chunk.min(seg.input.len()).max(1)) {
            // Once logged in, the driver relays upstream bytes to the client.
            if logged_in {
                got.push((Kind::Leftover, String::from_utf8_lossy(piece).into_owned()));
                continue;
            }
            up.feed(piece);
            while let Some(a) = up.next_action() {
                logged_in |= matches!(a, UpstreamAction::LoggedIn { .. });
                upstream_action(a, &mut got);
            }
        }
        while let Some(a) = up.next_action() {
            upstream_action(a, &mut got);
        }
        assert_eq!(
            render(&mut got),
            expected_merged(&seg.expected),
            "{name}, segment {i}, chunk {chunk}"
        );
    }
}

fn run_dir<F: Copy>(dir: &str, new: F, run: fn(&str, &str, usize, F)) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/transcripts")
        .join(dir);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for chunk in CHUNKS {
            run(&name, &text, chunk, new);
        }
        count += 1;
    }
    assert!(count > 0, "no transcripts in {}", dir.display());
}

#[test]
fn imap_client_transcripts() {
    run_dir("imap-client", imap_session as fn(&str) -> _, run_client);
}

#[test]
fn imap_upstream_transcripts() {
    run_dir(
        "imap-upstream",
        imap_upstream as fn(&str) -> _,
        run_upstream,
    );
}

#[test]
fn pop3_client_transcripts() {
    run_dir("pop3-client", pop3_session as fn(&str) -> _, run_client);
}

#[test]
fn pop3_upstream_transcripts() {
    run_dir(
        "pop3-upstream",
        pop3_upstream as fn(&str) -> _,
        run_upstream,
    );
}

#[test]
fn smtp_client_transcripts() {
    run_dir("smtp-client", smtp_session as fn(&str) -> _, run_client);
}

#[test]
fn smtp_upstream_transcripts() {
    run_dir(
        "smtp-upstream",
        smtp_upstream as fn(&str) -> _,
        run_upstream,
    );
}
