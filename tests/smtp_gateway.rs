//! SMTP submission through the gateway to the harness's real Postfix, whose
//! SASL is the harness Dovecot checking tokens at the real OAuth server,
//! and which delivers to the Maildirs that Dovecot serves: every message
//! sent here is read back over IMAP and compared byte for byte.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs
)] // tests may panic

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use base64::Engine as _;
use support::{counting_proxy, harness, python_imap, Account, Gateway, Options, RawClient};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn smtp_options() -> Options {
    Options {
        smtp: true,
        ..Options::default()
    }
}

async fn start(accounts: &[Account], options: &Options) -> Gateway {
    Gateway::start_options(tempfile::tempdir().unwrap(), accounts, options).await
}

/// Runs `tests/clients/smtp_client.py` and returns its JSON line.
fn smtplib(args: &[String]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/smtp_client.py"))
        .args(args)
        .output()
        .expect("run smtp_client.py");
    assert!(
        out.status.success(),
        "smtp_client.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// A message to `to` from `from`, marked with `marker` in its subject and
/// body, with `body` lines after the headers; CRLF line ends throughout,
/// as IMAP serves it back.
fn message(from: &str, to: &str, marker: &str, body: &str) -> Vec<u8> {
    format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {marker}\r\nMessage-ID: <{marker}@mailgate.test>\r\n\
         Date: Tue, 01 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\r\n{marker}\r\n{body}"
    )
    .into_bytes()
}

/// Sends `message` with smtplib through `port` and checks it went.
fn send_with_smtplib(
    port: u16,
    mode: &str,
    auth: &str,
    account: &Account,
    to: &[&str],
    message: &[u8],
    extra: &[&str],
) -> serde_json::Value {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), message).unwrap();
    let mut args = vec![
        "send".to_owned(),
        format!("--port={port}"),
        format!("--mode={mode}"),
        format!("--cafile={}", harness().ca_file.display()),
        format!("--user={}", account.name),
        format!("--password={}", account.password),
        format!("--auth={auth}"),
        format!("--from={}", account.mailbox),
        format!("--message={}", file.path().display()),
    ];
    args.extend(to.iter().map(|t| format!("--to={t}")));
    args.extend(extra.iter().map(|e| (*e).to_owned()));
    let out = smtplib(&args);
    assert_eq!(out["login"], "OK", "{out}");
    assert_eq!(out["sent"], true, "{out}");
    out
}

/// The messages of `account`'s INBOX whose subject is `marker`, fetched
/// through the gateway's IMAP listener; waits for delivery.
async fn read_back(gateway: &Gateway, account: &Account, marker: &str) -> Vec<Vec<u8>> {
    for _ in 0..100 {
        let out_dir = tempfile::tempdir().unwrap();
        let out = python_imap(&[
            "fetch".into(),
            format!("--port={}", gateway.imaps.port()),
            format!("--cafile={}", harness().ca_file.display()),
            format!("--user={}", account.name),
            format!("--password={}", account.password),
            format!("--out={}", out_dir.path().display()),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let found: Vec<Vec<u8>> = std::fs::read_dir(out_dir.path())
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .filter(|m| {
                m.windows(marker.len() + 9)
                    .any(|w| w == format!("Subject: {marker}").as_bytes())
            })
            .collect();
        if !found.is_empty() {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{marker} was not delivered to {}", account.mailbox);
}

/// Postfix prepends its trace headers; everything we sent follows them
/// unchanged.
fn assert_delivered_unchanged(delivered: &[u8], sent: &[u8]) {
    assert!(
        delivered.ends_with(sent),
        "the delivered message differs from the one sent ({} bytes delivered, {} sent)",
        delivered.len(),
        sent.len()
    );
}

/// SMTP replies: every line of one reply.
async fn reply(c: &mut RawClient) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = c.line().await;
        let last = line.as_bytes().get(3) != Some(&b'-');
        lines.push(line);
        if last {
            return lines;
        }
    }
}

/// EHLO, then AUTH PLAIN as `account`: the AUTH reply.
async fn auth_plain(c: &mut RawClient, account: &Account) -> Vec<String> {
    c.send(b"EHLO client.example\r\n").await;
    reply(c).await;
    c.send(format!("AUTH PLAIN {}\r\n", plain(account)).as_bytes())
        .await;
    reply(c).await
}

fn plain(account: &Account) -> String {
    B64.encode(format!("\0{}\0{}", account.name, account.password))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_sends_over_both_tls_modes_with_both_login_forms_and_it_reads_back() {
    let h = harness();
    h.seed("sender@example.test");
    let account = Account::authorized("sender", "sender@example.test");
    let gateway = start(&[account.clone()], &smtp_options()).await;
    let (smtps, smtp) = (gateway.smtps.unwrap(), gateway.smtp.unwrap());
    for (port, mode) in [(smtps.port(), "ssl"), (smtp.port(), "starttls")] {
        for auth in ["plain", "login"] {
            let marker = format!("smtplib-{mode}-{auth}");
            let sent = message(&account.mailbox, &account.mailbox, &marker, "Hello.\r\n");
            let out =
                send_with_smtplib(port, mode, auth, &account, &[&account.mailbox], &sent, &[]);
            // What the gateway advertised: its own AUTH, and what Postfix
            // offers (known after the first login).
            assert!(
                out["ehlo"].as_array().unwrap().iter().any(|f| f == "auth"),
                "{out}"
            );
            let delivered = read_back(&gateway, &account, &marker).await;
            assert_delivered_unchanged(&delivered[0], &sent);
        }
    }
    // Postfix's extensions were learned from its EHLO; its AUTH line is
    // never passed on.
    let (mut c, greeting) = RawClient::connect(smtps).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    c.send(b"EHLO client.example\r\n").await;
    let ehlo = reply(&mut c).await;
    for extension in ["PIPELINING", "8BITMIME", "SMTPUTF8", "CHUNKING"] {
        assert!(
            ehlo.iter().any(|l| l[4..].starts_with(extension)),
            "{extension}: {ehlo:?}"
        );
    }
    assert!(ehlo.iter().any(|l| l[4..].starts_with("SIZE ")), "{ehlo:?}");
    let auth: Vec<_> = ehlo.iter().filter(|l| l[4..].starts_with("AUTH")).collect();
    assert_eq!(auth, ["250 AUTH PLAIN LOGIN"], "{ehlo:?}");
    assert_eq!(
        gateway.metric("mailgate_logins_total{outcome=\"ok\",protocol=\"smtp\"}"),
        4.0
    );
    gateway.stop().await;
}

/// A transaction pipelined behind AUTH (RFC 2920) reaches Postfix after the
/// login, in order, and the mail is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_pipelined_behind_auth_is_delivered() {
    harness().seed("piper@example.test");
    let account = Account::authorized("piper", "piper@example.test");
    let gateway = start(&[account.clone()], &smtp_options()).await;
    let (mut c, _) = RawClient::connect(gateway.smtps.unwrap()).await;
    c.send(b"EHLO client.example\r\n").await;
    reply(&mut c).await;
    let mailbox = &account.mailbox;
    c.send(
        format!(
            "AUTH PLAIN {}\r\nMAIL FROM:<{mailbox}>\r\nRCPT TO:<{mailbox}>\r\nDATA\r\n",
            plain(&account)
        )
        .as_bytes(),
    )
    .await;
    for want in ["235 ", "250 ", "250 ", "354 "] {
        let r = reply(&mut c).await;
        assert!(r.last().unwrap().starts_with(want), "{want}: {r:?}");
    }
    let sent = message(mailbox, mailbox, "pipelined", ".leading dot\r\n");
    // Dot-stuffing is the client's: the relay passes it through unchanged.
    c.send(&sent.replace_lines_starting_with_dot()).await;
    c.send(b".\r\nQUIT\r\n").await;
    assert!(reply(&mut c).await[0].starts_with("250 "));
    assert!(reply(&mut c).await[0].starts_with("221 "));
    let delivered = read_back(&gateway, &account, "pipelined").await;
    assert_delivered_unchanged(&delivered[0], &sent);
    gateway.stop().await;
}

trait DotStuff {
    fn replace_lines_starting_with_dot(&self) -> Vec<u8>;
}

impl DotStuff for Vec<u8> {
    /// RFC 5321 §4.5.2: a line that starts with a dot gets another.
    fn replace_lines_starting_with_dot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len() + 16);
        let mut at_line_start = true;
        for &b in self {
            if at_line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            at_line_start = b == b'\n';
        }
        out
    }
}

/// curl, over implicit TLS and with STARTTLS required.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_sends_over_smtps_and_starttls() {
    let h = harness();
    h.seed("curler@example.test");
    let account = Account::authorized("curler", "curler@example.test");
    let gateway = start(&[account.clone()], &smtp_options()).await;
    let urls = [
        (
            format!("smtps://localhost:{}", gateway.smtps.unwrap().port()),
            None,
        ),
        (
            format!("smtp://localhost:{}", gateway.smtp.unwrap().port()),
            Some("--ssl-reqd"),
        ),
    ];
    for (i, (url, flag)) in urls.iter().enumerate() {
        let marker = format!("curl-{i}");
        let sent = message(
            &account.mailbox,
            &account.mailbox,
            &marker,
            "Sent by curl.\r\n",
        );
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &sent).unwrap();
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "--url", url])
            .arg("--cacert")
            .arg(&h.ca_file)
            .args(["--user", &format!("{}:{}", account.name, account.password)])
            .args([
                "--mail-from",
                &account.mailbox,
                "--mail-rcpt",
                &account.mailbox,
            ])
            .arg("--upload-file")
            .arg(file.path());
        if let Some(flag) = flag {
            cmd.arg(flag);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "curl {url}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let delivered = read_back(&gateway, &account, &marker).await;
        assert_delivered_unchanged(&delivered[0], &sent);
    }
    gateway.stop().await;
}

/// A 10 MB message, 8-bit and SMTPUTF8 content, BDAT, and several
/// recipients: each delivered byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_8bit_utf8_bdat_and_many_recipients_arrive_unchanged() {
    let h = harness();
    h.seed("bulk@example.test");
    h.seed("other@example.test");
    let account = Account::authorized("bulk", "bulk@example.test");
    let other = Account::authorized("other", "other@example.test");
    let gateway = start(&[account.clone(), other.clone()], &smtp_options()).await;
    let port = gateway.smtps.unwrap().port();
    let me = account.mailbox.as_str();

    // 10 MB of 76-character lines.
    let line = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd\r\n";
    let big = message(
        me,
        me,
        "ten-megabytes",
        &line.repeat(10 * 1024 * 1024 / line.len()),
    );
    send_with_smtplib(port, "ssl", "plain", &account, &[me], &big, &[]);
    assert_delivered_unchanged(
        &read_back(&gateway, &account, "ten-megabytes").await[0],
        &big,
    );

    let eight_bit = message(
        me,
        me,
        "eight-bit",
        "Gr\u{fc}\u{df}e aus K\u{f6}ln, \u{1f4e8}\r\n",
    );
    send_with_smtplib(
        port,
        "ssl",
        "plain",
        &account,
        &[me],
        &eight_bit,
        &["--8bitmime"],
    );
    assert_delivered_unchanged(
        &read_back(&gateway, &account, "eight-bit").await[0],
        &eight_bit,
    );

    let utf8 = format!(
        "From: <{me}>\r\nTo: <{me}>\r\nSubject: smtputf8\r\nX-Name: J\u{f6}rg \u{e9}\u{e8}\r\n\r\nsmtputf8\r\n\u{65e5}\u{672c}\r\n"
    )
    .into_bytes();
    send_with_smtplib(
        port,
        "ssl",
        "login",
        &account,
        &[me],
        &utf8,
        &["--smtputf8"],
    );
    assert_delivered_unchanged(&read_back(&gateway, &account, "smtputf8").await[0], &utf8);

    // Several recipients: both mailboxes get the same message.
    let both = message(me, &other.mailbox, "two-recipients", "To both.\r\n");
    send_with_smtplib(
        port,
        "ssl",
        "plain",
        &account,
        &[me, &other.mailbox],
        &both,
        &[],
    );
    assert_delivered_unchanged(
        &read_back(&gateway, &account, "two-recipients").await[0],
        &both,
    );
    assert_delivered_unchanged(
        &read_back(&gateway, &other, "two-recipients").await[0],
        &both,
    );

    // BDAT (RFC 3030), in two chunks, no dot-stuffing.
    let chunked = message(me, me, "bdat-chunks", ".a line with a leading dot\r\n");
    let (first, second) = chunked.split_at(chunked.len() / 2);
    let (mut c, _) = RawClient::connect(gateway.smtps.unwrap()).await;
    c.send(b"EHLO client.example\r\n").await;
    assert!(reply(&mut c).await.iter().any(|l| l.ends_with("CHUNKING")));
    c.send(format!("AUTH PLAIN {}\r\n", plain(&account)).as_bytes())
        .await;
    assert!(reply(&mut c).await[0].starts_with("235 "));
    c.send(format!("MAIL FROM:<{me}>\r\nRCPT TO:<{me}>\r\n").as_bytes())
        .await;
    assert!(reply(&mut c).await[0].starts_with("250"));
    assert!(reply(&mut c).await[0].starts_with("250"));
    let mut command = format!("BDAT {}\r\n", first.len()).into_bytes();
    command.extend_from_slice(first);
    c.send(&command).await;
    assert!(reply(&mut c).await[0].starts_with("250"));
    let mut command = format!("BDAT {} LAST\r\n", second.len()).into_bytes();
    command.extend_from_slice(second);
    c.send(&command).await;
    assert!(reply(&mut c).await[0].starts_with("250"));
    c.send(b"QUIT\r\n").await;
    reply(&mut c).await;
    assert_delivered_unchanged(
        &read_back(&gateway, &account, "bdat-chunks").await[0],
        &chunked,
    );
    gateway.stop().await;
}

/// The smarthost case: a real Postfix MTA with `relayhost` and SASL PLAIN
/// relays a local submission through the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_mta_relays_through_the_gateway() {
    let h = harness();
    h.seed("relayed@example.test");
    let account = Account::authorized("relayed", "relayed@example.test");
    let gateway = start(&[account.clone()], &smtp_options()).await;
    let smarthost = format!("[127.0.0.1]:{}", gateway.smtp.unwrap().port());
    let out = Command::new(&h.relay_mta)
        .arg(&h.harness_dir)
        .arg(&smarthost)
        .args([account.name, account.password])
        .arg("--tls=starttls")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "relay-mta: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let relay: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let relay_port = relay["RELAY_SMTP_PORT"].as_u64().unwrap();
    let sent = message(
        &account.mailbox,
        &account.mailbox,
        "via-smarthost",
        "Relayed.\r\n",
    );
    // The application hands its mail to the local MTA without a login.
    let (mut c, greeting) =
        RawClient::connect_plain(format!("127.0.0.1:{relay_port}").parse().unwrap()).await;
    assert!(greeting.starts_with("220"), "{greeting}");
    for command in [
        "EHLO app.example\r\n".to_owned(),
        format!("MAIL FROM:<{}>\r\n", account.mailbox),
        format!("RCPT TO:<{}>\r\n", account.mailbox),
        "DATA\r\n".to_owned(),
    ] {
        c.send(command.as_bytes()).await;
        let r = reply(&mut c).await;
        assert!(
            matches!(r.last().unwrap().as_bytes()[0], b'2' | b'3'),
            "{command}: {r:?}"
        );
    }
    c.send(&sent).await;
    c.send(b".\r\n").await;
    assert!(reply(&mut c).await[0].starts_with("250"));
    let delivered = read_back(&gateway, &account, "via-smarthost").await;
    assert_delivered_unchanged(&delivered[0], &sent);
    let stopped = Command::new(&h.relay_mta)
        .args([
            "--stop".as_ref(),
            h.harness_dir.as_os_str(),
            relay_port.to_string().as_ref(),
        ])
        .status()
        .unwrap();
    assert!(stopped.success());
    gateway.stop().await;
}

/// A stored access token the upstream refuses is replaced once, and the
/// login goes through on a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_is_refreshed_and_retried_once() {
    harness().seed("stale@example.test");
    let grant = harness().authorize(support::CLIENT, "stale@example.test");
    let account = Account {
        refresh_token: Some(grant.refresh_token.clone()),
        ..Account::authorized_without_grant("stale", "stale@example.test")
    };
    let stored = support::Grant {
        access_token: "not-a-token-the-upstream-knows".into(),
        refresh_token: grant.refresh_token.clone(),
    };
    let state = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    support::store(state.path())
        .save_record(
            "stale",
            &mailgate::oauth::Record {
                refresh_token: Some(stored.refresh_token.clone()),
                access_token: Some(stored.access_token.clone()),
                obtained_at: now,
                expires_at: now + 3600,
                ..Default::default()
            },
        )
        .unwrap();
    let options = Options {
        oauth: "refresh_in_background = false".into(),
        ..smtp_options()
    };
    let gateway = Gateway::start_options(state, &[account.clone()], &options).await;
    let (mut c, _) = RawClient::connect(gateway.smtps.unwrap()).await;
    c.send(b"EHLO client.example\r\n").await;
    reply(&mut c).await;
    c.send(format!("AUTH PLAIN {}\r\n", plain(&account)).as_bytes())
        .await;
    let r = reply(&mut c).await;
    assert_eq!(r, ["235 2.7.0 Authentication successful"]);
    let requests = gateway.metric(
        "mailgate_token_requests_total{grant=\"refresh_token\",integration=\"stale\",outcome=\"ok\"}",
    );
    assert_eq!(requests, 1.0, "one refresh for the rejected token");
    // Two logins upstream, each on its own connection (the second may be
    // the spare dialled after the first).
    assert_eq!(
        gateway.metric("mailgate_upstream_login_seconds_count{protocol=\"smtp\"}"),
        2.0,
        "one retry on a fresh connection"
    );
    gateway.stop().await;
}

/// The per-account cap: a second sender waits for the first one's session,
/// then gets 421 4.3.2 and is closed; once the first quits, a third logs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_account_session_cap_holds_and_refuses_after_the_wait() {
    harness().seed("capped-smtp@example.test");
    let account = Account::authorized("cappedsmtp", "capped-smtp@example.test");
    let options = Options {
        limits: "upstream_session_wait = \"1s\"".into(),
        smtp_account_extra: "max_sessions = 1".into(),
        ..smtp_options()
    };
    let gateway = start(&[account.clone()], &options).await;
    let (mut first, _) = RawClient::connect(gateway.smtps.unwrap()).await;
    assert_eq!(
        auth_plain(&mut first, &account).await,
        ["235 2.7.0 Authentication successful"]
    );
    let (mut second, _) = RawClient::connect(gateway.smtps.unwrap()).await;
    assert_eq!(
        auth_plain(&mut second, &account).await,
        ["421 4.3.2 Too many sessions for this mailbox, try again later"]
    );
    assert_eq!(second.line().await, "", "closed after the 421");
    first.send(b"QUIT\r\n").await;
    assert!(reply(&mut first).await[0].starts_with("221"));
    drop(first);
    let mut third_reply = Vec::new();
    for _ in 0..50 {
        let (mut third, _) = RawClient::connect(gateway.smtps.unwrap()).await;
        third_reply = auth_plain(&mut third, &account).await;
        if third_reply[0].starts_with("235") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(third_reply, ["235 2.7.0 Authentication successful"]);
    assert_eq!(
        gateway.metric("mailgate_logins_total{outcome=\"session_limit\",protocol=\"smtp\"}"),
        1.0
    );
    gateway.stop().await;
}

/// Bad input gets clear replies, and 10,000 wrong passwords cause no
/// upstream or OAuth traffic at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_ten_thousand_wrong_passwords() {
    let h = harness();
    let token_target: SocketAddr = h
        .oauth_issuer
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let (token_proxy, token_connections) = counting_proxy(token_target).await;
    let (smtp_proxy, smtp_connections) =
        counting_proxy(format!("127.0.0.1:{}", h.smtps_port).parse().unwrap()).await;
    let path = h.oauth_token_url.splitn(4, '/').nth(3).unwrap().to_owned();
    let account = Account {
        token_url: Some(format!("http://{token_proxy}/{path}")),
        smtp_upstream: (smtp_proxy.to_string(), "implicit"),
        ..Account::authorized("flood", "flood@example.test")
    };
    let options = Options {
        oauth: "refresh_in_background = false".into(),
        failure_delay: "1ms".into(),
        limits: "login_failure_max_delay = \"20ms\"\nmax_line = 512".into(),
        cheap_hashes: true,
        ..smtp_options()
    };
    let gateway = std::sync::Arc::new(start(&[account.clone()], &options).await);

    let (mut c, _) = RawClient::connect(gateway.smtps.unwrap()).await;
    c.send(format!("EHLO {}\r\n", "x".repeat(2000)).as_bytes())
        .await;
    assert_eq!(reply(&mut c).await, ["500 5.5.6 Line too long"]);
    c.send(b"\x00\xff\xfe garbage\r\n").await;
    assert_eq!(reply(&mut c).await, ["501 5.5.2 Syntax error"]);
    c.send(b"MAIL FROM:<x@y>\r\n").await;
    assert_eq!(reply(&mut c).await, ["530 5.7.0 Authentication required"]);
    c.send(b"AUTH PLAIN\r\n").await;
    assert_eq!(reply(&mut c).await, ["503 5.5.1 Send EHLO first"]);
    c.send(b"EHLO ok.example\r\n").await;
    reply(&mut c).await;
    c.send(b"AUTH PLAIN not-base64!\r\n").await;
    assert_eq!(
        reply(&mut c).await,
        ["501 5.5.2 Cannot decode the response"]
    );
    c.send(b"QUIT\r\n").await;
    assert_eq!(reply(&mut c).await, ["221 2.0.0 Bye"]);

    let connections = 32;
    let per_connection = 10_000usize.div_ceil(connections);
    let mut attackers = tokio::task::JoinSet::new();
    for n in 0..connections {
        let gateway = gateway.clone();
        attackers.spawn(async move {
            let (mut c, _) = RawClient::connect(gateway.smtps.unwrap()).await;
            c.send(b"EHLO attacker.example\r\n").await;
            reply(&mut c).await;
            for i in 0..per_connection {
                let wrong = B64.encode(format!("\0flood\0wrong-{n}-{i}"));
                c.send(format!("AUTH PLAIN {wrong}\r\n").as_bytes()).await;
                assert_eq!(
                    reply(&mut c).await,
                    ["535 5.7.8 Authentication credentials invalid"]
                );
            }
            per_connection
        });
    }
    let mut refused = 0;
    while let Some(n) = attackers.join_next().await {
        refused += n.unwrap();
    }
    assert!(refused >= 10_000);
    assert_eq!(smtp_connections.load(SeqCst), 0, "upstream connections");
    assert_eq!(
        token_connections.load(SeqCst),
        0,
        "token endpoint connections"
    );
    let gateway = std::sync::Arc::into_inner(gateway).unwrap();
    gateway.stop().await;
}

/// OAUTHBEARER (RFC 7628) instead of XOAUTH2, on all three protocols,
/// against the same Dovecot (IMAP, POP3) and Postfix (SMTP).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauthbearer_logs_in_on_imap_pop3_and_smtp() {
    harness().seed("bearer@example.test");
    let account = Account {
        integration_extra: "mechanism = \"oauthbearer\"".into(),
        ..Account::authorized("bearer", "bearer@example.test")
    };
    let gateway = start(&[account.clone()], &smtp_options()).await;
    let sent = message(
        &account.mailbox,
        &account.mailbox,
        "oauthbearer",
        "By bearer.\r\n",
    );
    send_with_smtplib(
        gateway.smtps.unwrap().port(),
        "ssl",
        "plain",
        &account,
        &[&account.mailbox],
        &sent,
        &[],
    );
    // The IMAP fetch inside read_back logs in with OAUTHBEARER too.
    let delivered = read_back(&gateway, &account, "oauthbearer").await;
    assert_delivered_unchanged(&delivered[0], &sent);
    let (mut p, _) = RawClient::connect(gateway.pop3s).await;
    p.send(format!("USER bearer\r\nPASS {}\r\n", account.password).as_bytes())
        .await;
    assert!(p.line().await.starts_with("+OK"));
    assert_eq!(p.line().await, "+OK Logged in");
    gateway.stop().await;
}

/// Test connection for an account with an SMTP upstream: EHLO, TLS, AUTH
/// and QUIT, and no mail sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connection_covers_smtp() {
    harness().seed("probe@example.test");
    let account = Account::authorized("probe", "probe@example.test");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mailgate.toml");
    std::fs::write(
        &config,
        support::config_toml(dir.path(), &[account], &smtp_options()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .arg("--config")
        .arg(&config)
        .args(["test", "probe"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in ["smtp connect", "smtp xoauth2 login", "smtp logout"] {
        assert!(
            text.lines()
                .any(|l| l.contains(step) && l.trim_start().starts_with("ok")),
            "{step}: {text}"
        );
    }
}

/// Microsoft's `535 5.7.139` (SMTP AUTH disabled for the mailbox), from a
/// fake upstream since Postfix can't say it: the client gets a 535, and the
/// account's status names the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_auth_disabled_at_the_provider_names_the_fix() {
    use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};
    let h = harness();
    mailgate::tls::install_default_provider();
    let files = mailgate::config::CertificateFiles {
        cert: h.harness_dir.join("server.pem"),
        key: h.harness_dir.join("server.key"),
    };
    let scratch = tempfile::tempdir().unwrap();
    let tls = mailgate::tls::server(Some(&files), scratch.path()).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(stream) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut stream = tokio::io::BufReader::new(stream);
            let _ = stream.write_all(b"220 fake.outlook ESMTP\r\n").await;
            let mut line = String::new();
            while stream.read_line(&mut line).await.unwrap_or(0) > 0 {
                let answer: &[u8] = if line.starts_with("EHLO") {
                    b"250-fake.outlook\r\n250 AUTH LOGIN XOAUTH2\r\n"
                } else {
                    b"535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.\r\n"
                };
                let _ = stream.write_all(answer).await;
                line.clear();
            }
        }
    });
    let account = Account {
        smtp_upstream: (format!("localhost:{}", fake.port()), "implicit"),
        ..Account::authorized("disabled", "disabled@example.test")
    };
    let gateway = start(&[account.clone()], &smtp_options()).await;
    let (mut c, _) = RawClient::connect(gateway.smtps.unwrap()).await;
    c.send(b"EHLO client.example\r\n").await;
    reply(&mut c).await;
    c.send(format!("AUTH PLAIN {}\r\n", plain(&account)).as_bytes())
        .await;
    assert_eq!(
        reply(&mut c).await,
        ["535 5.7.8 Authentication credentials invalid"]
    );
    let record = gateway.stored("disabled").unwrap();
    let why = record.last_error.unwrap_or_default();
    assert!(
        why.contains("5.7.139")
            && why.contains(
                "Set-CASMailbox -Identity MAILBOX -SmtpClientAuthenticationDisabled $false"
            ),
        "{why}"
    );
    assert!(record.needs_authorization.is_none(), "the grant is fine");
    gateway.stop().await;
}

/// A submission and a refused one through the binary with JSON logs: no
/// password, token or client secret in the whole log, and one summary
/// per connection with its closed error kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_log() {
    let h = harness();
    h.seed("logged@example.test");
    let grant = h.authorize(support::CLIENT, "logged@example.test");
    let account = Account {
        refresh_token: Some(grant.refresh_token.clone()),
        ..Account::authorized_without_grant("logged", "logged@example.test")
    };
    let mut process = support::Process::start(
        &[account.clone()],
        "[log]\nformat = \"json\"\nlevel = \"debug\"",
    )
    .await;
    let sent = message(&account.mailbox, &account.mailbox, "logged", "Logged.\r\n");
    send_with_smtplib(
        process.smtps.port(),
        "ssl",
        "plain",
        &account,
        &[&account.mailbox],
        &sent,
        &[],
    );
    let (mut c, _) = RawClient::connect(process.smtps).await;
    let wrong = Account {
        password: "wrong-password-456",
        ..account.clone()
    };
    assert_eq!(
        auth_plain(&mut c, &wrong).await,
        ["535 5.7.8 Authentication credentials invalid"]
    );
    c.send(b"QUIT\r\n").await;
    reply(&mut c).await;
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    process.signal("TERM");
    assert_eq!(process.exit_code().await, Some(0));
    let log = process.log();
    let state_dir = process.config.parent().unwrap().to_path_buf();
    let record = support::store(&state_dir)
        .load_record("logged")
        .unwrap()
        .unwrap();
    let secrets = [
        record.access_token.clone().unwrap(),
        record.refresh_token.clone().unwrap(),
        grant.access_token.clone(),
        grant.refresh_token.clone(),
        account.password.to_owned(),
        wrong.password.to_owned(),
        plain(&account),
        plain(&wrong),
        support::CLIENT.secret.to_owned(),
    ];
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "a secret is in the log");
    }
    let summaries: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "connection closed")
        .collect();
    let kinds: Vec<_> = summaries
        .iter()
        .map(|s| {
            (
                s["span"]["protocol"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                s["fields"]["error_kind"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("smtp".to_owned(), "none".to_owned())),
        "{kinds:?}"
    );
    assert_eq!(kinds.len(), 2, "one summary per connection: {kinds:?}");
}
