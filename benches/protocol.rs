//! Criterion benches of the protocol hot paths: framing and parsing a
//! client command, a whole pre-login session, an upstream XOAUTH2 login,
//! and capability filtering. `cargo bench --bench protocol`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mailgate::proto::{
    Action, ClientSession, FrameLimits, Framer, UpstreamAction, UpstreamLogin as _, UpstreamTls,
};
use mailgate::secret::Secret;
use mailgate::{imap, pop3};

fn parse_imap_login_command(c: &mut Criterion) {
    let line = b"a001 LOGIN \"jira@example.com\" {16}\r\ncorrect-horse-42\r\n";
    let mut g = c.benchmark_group("imap_parse");
    g.throughput(Throughput::Bytes(line.len() as u64));
    g.bench_function("login_with_literal", |b| {
        b.iter(|| imap::parse::command(black_box(line)))
    });
    let response = b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ AUTH=PLAIN AUTH=XOAUTH2] Dovecot ready.\r\n";
    g.bench_function("upstream_greeting", |b| {
        b.iter(|| imap::parse::response(black_box(response)))
    });
    g.finish();
}

fn frame_commands(c: &mut Criterion) {
    let mut input = Vec::new();
    for i in 0..100 {
        input.extend_from_slice(format!("a{i} NOOP\r\n").as_bytes());
    }
    let mut g = c.benchmark_group("framer");
    g.throughput(Throughput::Bytes(input.len() as u64));
    g.bench_function("100_lines", |b| {
        b.iter(|| {
            let mut framer = Framer::new(FrameLimits::default());
            let mut buf = bytes::BytesMut::from(&input[..]);
            let mut n = 0;
            while framer.next(&mut buf, true).is_some() {
                n += 1;
            }
            n
        })
    });
    g.finish();
}

/// A whole IMAP pre-login conversation: greeting, CAPABILITY, LOGIN with
/// a literal, and the splice.
fn imap_session_to_splice(c: &mut Criterion) {
    let input = b"a CAPABILITY\r\nb LOGIN jira {8+}\r\npassword\r\nc SELECT INBOX\r\n";
    let caps = vec![
        "IMAP4rev1".to_owned(),
        "IDLE".to_owned(),
        "UIDPLUS".to_owned(),
    ];
    c.bench_function("imap_session_to_splice", |b| {
        b.iter(|| {
            let mut s = imap::Session::new(imap::Options {
                tls_active: true,
                starttls: false,
                loopback_plaintext: false,
                limits: FrameLimits::default(),
            });
            s.feed(input);
            let mut spliced = false;
            while let Some(a) = ClientSession::next_action(&mut s) {
                match a {
                    Action::Authenticate(_) => ClientSession::login_succeeded(&mut s, &caps),
                    Action::Splice { .. } => spliced = true,
                    _ => {}
                }
            }
            spliced
        })
    });
}

fn pop3_session_to_splice(c: &mut Criterion) {
    let input = b"CAPA\r\nUSER jira\r\nPASS password\r\nSTAT\r\n";
    c.bench_function("pop3_session_to_splice", |b| {
        b.iter(|| {
            let mut s = pop3::Session::new(pop3::Options {
                tls_active: true,
                stls: false,
                loopback_plaintext: false,
                limits: FrameLimits::default(),
            });
            s.feed(input);
            let mut spliced = false;
            while let Some(a) = s.next_action() {
                match a {
                    Action::Authenticate(_) => s.login_succeeded(&[]),
                    Action::Splice { .. } => spliced = true,
                    _ => {}
                }
            }
            spliced
        })
    });
}

/// Our XOAUTH2 login at an IMAP upstream, from greeting to logged in.
fn imap_upstream_login(c: &mut Criterion) {
    let token = Secret::new("ya29.".to_owned() + &"x".repeat(200));
    let greeting = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n";
    let ok = b"m3 OK [CAPABILITY IMAP4rev1 IDLE UIDPLUS MOVE] Logged in\r\n";
    c.bench_function("imap_upstream_login", |b| {
        b.iter(|| {
            let mut up = imap::Upstream::new("jira@example.com", &token, UpstreamTls::Implicit);
            up.feed(greeting);
            while up.next_action().is_some() {}
            up.feed(ok);
            matches!(up.next_action(), Some(UpstreamAction::LoggedIn { .. }))
        })
    });
}

fn capability_filtering(c: &mut Criterion) {
    let upstream: Vec<String> = "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES \
         THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS \
         LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS \
         BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ NOTIFY SPECIAL-USE"
        .split(' ')
        .map(str::to_owned)
        .collect();
    c.bench_function("capability_after_login_dovecot", |b| {
        b.iter(|| imap::capability::after_login(black_box(&upstream)).len())
    });
}

criterion_group!(
    benches,
    parse_imap_login_command,
    frame_commands,
    imap_session_to_splice,
    pop3_session_to_splice,
    imap_upstream_login,
    capability_filtering
);
criterion_main!(benches);
