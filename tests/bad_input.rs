//! Bad input over real sockets: garbage and NUL bytes, overlong lines, a
//! huge literal announced, a literal that never arrives, TLS garbage, and
//! 10,000 wrong passwords. Each gets a clear protocol answer; nothing
//! panics; the real account keeps working.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs
)] // tests may panic

mod support;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt as _;

use support::{counting_proxy, harness, Account, Gateway, Options, RawClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_overlong_lines_and_literals_get_clear_answers() {
    harness().seed("garbage@example.test");
    let account = Account::authorized("garbage", "garbage@example.test");
    let options = Options {
        limits: "pre_auth_timeout = \"2s\"".into(),
        ..Options::default()
    };
    let gateway =
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await;

    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(b"\x00\x01\xff\xfe garbage \x00 with NULs\r\n").await;
    assert_eq!(c.line().await, "* BAD Syntax error");
    c.send(format!("t1 NOOP {}\r\n", "x".repeat(20_000)).as_bytes())
        .await;
    assert_eq!(c.line().await, "t1 BAD Line too long");
    c.send(b"t2 LOGIN {999999999}\r\n").await;
    assert_eq!(c.line().await, "t2 BAD Literal too large");
    // The connection is still usable, and the account logs in.
    c.send(format!("t3 LOGIN garbage {}\r\n", account.password).as_bytes())
        .await;
    assert!(c
        .until_tagged("t3")
        .await
        .last()
        .unwrap()
        .starts_with("t3 OK"));

    // A non-synchronizing literal that's too large can't be skipped.
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(b"t LOGIN garbage {99999999+}\r\n").await;
    assert_eq!(c.line().await, "* BYE Literal too large");
    assert_eq!(c.line().await, "", "closed after BYE");

    // A literal that never arrives: the pre-auth timeout ends it with BYE.
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(b"t LOGIN {10}\r\n").await;
    assert!(c.line().await.starts_with("+ "));
    c.send(b"abc").await;
    let bye = tokio::time::timeout(Duration::from_secs(10), c.line())
        .await
        .expect("no answer after the timeout");
    assert_eq!(bye, "* BYE mailgate shutting down");

    // POP3: garbage and an overlong line.
    let (mut p, greeting) = RawClient::connect(gateway.pop3s).await;
    assert!(greeting.starts_with("+OK"));
    p.send(b"\x00\xff\x01\r\n").await;
    assert_eq!(p.line().await, "-ERR Unknown command or bad syntax");
    p.send(format!("USER {}\r\n", "y".repeat(20_000)).as_bytes())
        .await;
    assert_eq!(p.line().await, "-ERR Line too long");

    // TLS garbage on the implicit-TLS port: the handshake fails, the
    // gateway goes on.
    let mut raw = tokio::net::TcpStream::connect(gateway.imaps).await.unwrap();
    raw.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 1, 2, 3])
        .await
        .unwrap();
    raw.write_all(&[0xab; 4096]).await.unwrap();
    drop(raw);
    let (_c, greeting) = RawClient::connect(gateway.imaps).await;
    assert!(greeting.starts_with("* OK"));
    gateway.stop().await;
}

/// 10,000 wrong passwords from one address, on as many connections as it
/// may open: answered at a bounded rate (the back-off), with no upstream or
/// OAuth traffic, while the real account logs in from another address
/// during and after the attack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_wrong_passwords() {
    let h = harness();
    h.seed("victim@example.test");
    let token_target: std::net::SocketAddr = h
        .oauth_issuer
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let (token_proxy, token_connections) = counting_proxy(token_target).await;
    let (imap_proxy, imap_connections) =
        counting_proxy(format!("127.0.0.1:{}", h.imaps_port).parse().unwrap()).await;
    let path = h.oauth_token_url.splitn(4, '/').nth(3).unwrap().to_owned();
    let account = Account {
        token_url: Some(format!("http://{token_proxy}/{path}")),
        upstream: (imap_proxy.to_string(), "implicit"),
        ..Account::authorized("victim", "victim@example.test")
    };
    // Cheap hashes keep 10,000 verifications quick; the back-off is what
    // bounds the rate. 32 connections (the default per-address cap).
    let options = Options {
        oauth: "refresh_in_background = false".into(),
        failure_delay: "1ms".into(),
        limits: "login_failure_max_delay = \"20ms\"".into(),
        cheap_hashes: true,
        ..Options::default()
    };
    let gateway = Arc::new(
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await,
    );
    let connections = 32;
    let per_connection = 10_000usize.div_ceil(connections);
    let attempts = per_connection * connections;
    let started = std::time::Instant::now();
    let mut attackers = tokio::task::JoinSet::new();
    for c in 0..connections {
        let gateway = gateway.clone();
        attackers.spawn(async move {
            let (mut client, _) = RawClient::connect(gateway.imaps).await;
            let mut refused = 0;
            for i in 0..per_connection {
                client
                    .send(format!("x{i} LOGIN victim wrong-{c}-{i}\r\n").as_bytes())
                    .await;
                let reply = client.until_tagged(&format!("x{i}")).await;
                assert_eq!(
                    reply.last().unwrap(),
                    &format!("x{i} NO [AUTHENTICATIONFAILED] Authentication failed")
                );
                refused += 1;
            }
            refused
        });
    }
    // During the attack, from another address: the right password works.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = login_from(gateway.imaps, "127.0.0.2", &account).await;
    assert!(during.starts_with("a OK"), "during the attack: {during}");
    let mut refused = 0;
    while let Some(n) = attackers.join_next().await {
        refused += n.unwrap();
    }
    let elapsed = started.elapsed();
    assert_eq!(refused, attempts);
    assert!(attempts >= 10_000);
    // Rate bound: each connection's answers wait up to 20 ms each once the
    // back-off is at its cap; 10,000 over 32 connections can't beat that.
    assert!(
        elapsed >= Duration::from_millis(per_connection as u64 * 20 - 200),
        "answered too fast: {elapsed:?}"
    );
    let after = login_from(gateway.imaps, "127.0.0.2", &account).await;
    assert!(after.starts_with("a OK"), "after the attack: {after}");
    // Only the two real logins reached the upstream (each leaves one spare
    // connection for the next: two or three connections in all), and one
    // token request served them.
    let upstream = imap_connections.load(SeqCst);
    assert!(
        (2..=3).contains(&upstream),
        "upstream connections: {upstream}"
    );
    assert_eq!(
        token_connections.load(SeqCst),
        1,
        "token endpoint connections"
    );
}

/// Logs in over TLS from a chosen loopback source address.
async fn login_from(gateway: std::net::SocketAddr, source: &str, account: &Account) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = socket.connect(gateway).await.unwrap();
    let mut client = RawClient::over(tcp).await;
    client
        .send(format!("a LOGIN {} {}\r\n", account.name, account.password).as_bytes())
        .await;
    let reply = client.until_tagged("a").await.last().unwrap().clone();
    client.send(b"z LOGOUT\r\n").await;
    let _ = client.until_tagged("z").await;
    reply
}

/// A client that connects and never starts its TLS handshake is dropped
/// after the handshake timeout, and doesn't hold up anyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_tls_client_is_dropped_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt as _;
    let account = Account {
        refresh_token: None,
        ..Account::authorized_without_grant("silent", "silent@example.test")
    };
    let options = Options {
        limits: "tls_handshake_timeout = \"1s\"".into(),
        ..Options::default()
    };
    let gateway = Gateway::start_options(tempfile::tempdir().unwrap(), &[account], &options).await;
    let mut silent = tokio::net::TcpStream::connect(gateway.imaps).await.unwrap();
    // Meanwhile another client is served at once.
    let (_other, greeting) = RawClient::connect(gateway.imaps).await;
    assert!(greeting.starts_with("* OK"));
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
        .await
        .expect("still open after the handshake timeout");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "expected the connection to close: {read:?}"
    );
    gateway.stop().await;
}

/// At `max_connections` the gateway serves no more (new clients wait in
/// the backlog) and resumes when a connection closes. Idle listeners hold
/// no capacity: with four listeners and a cap of two, two clients are
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_for_a_free_slot() {
    let account = Account {
        refresh_token: None,
        ..Account::authorized_without_grant("capacity", "capacity@example.test")
    };
    let options = Options {
        limits: "max_connections = 2".into(),
        ..Options::default()
    };
    let gateway = Gateway::start_options(tempfile::tempdir().unwrap(), &[account], &options).await;
    let (first, _) = RawClient::connect(gateway.imaps).await;
    let (_second, greeting) =
        tokio::time::timeout(Duration::from_secs(10), RawClient::connect(gateway.imaps))
            .await
            .expect("the second connection, within the cap, was not served");
    assert!(greeting.starts_with("* OK"));
    let address = gateway.imaps;
    let third = tokio::spawn(async move { RawClient::connect(address).await.1 });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served beyond the cap"
    );
    drop(first);
    let greeting = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("no greeting after a slot freed")
        .unwrap();
    assert!(greeting.starts_with("* OK"), "{greeting}");
    gateway.stop().await;
}

/// A client that hangs up while its failed login waits out the back-off
/// gives its pre-login slot back at once, not when the back-off ends: the
/// real poller on the same address is not refused meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_during_the_back_off_frees_its_slot_at_once() {
    let account = Account::authorized_without_grant("hangup", "hangup@example.test");
    let options = Options {
        // The back-off outlasts the test: only an early end frees a slot.
        failure_delay: "60s".into(),
        limits: "max_pre_login_per_ip = 2\nlogin_failure_max_delay = \"60s\"".into(),
        ..Options::default()
    };
    let gateway =
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await;
    for checks in 1..=2 {
        let (mut c, greeting) = RawClient::connect(gateway.imaps).await;
        assert!(greeting.starts_with("* OK"), "{greeting}");
        c.send(b"a LOGIN hangup wrong\r\n").await;
        wrong_passwords_checked(&gateway, checks).await;
        drop(c);
    }
    // Both slots were taken by clients that hung up mid back-off. Within a
    // few seconds (not the minute the back-off lasts) a new client is
    // greeted rather than refused.
    let mut greeting = String::new();
    for _ in 0..100 {
        let (_c, g) = RawClient::connect(gateway.imaps).await;
        greeting = g;
        if greeting.starts_with("* OK") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(greeting.starts_with("* OK"), "still refused: {greeting}");
    gateway.stop().await;
}

/// A failed login waiting out its back-off hears the gateway's goodbye
/// at shutdown instead of holding the shutdown up for the back-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_failed_login_s_back_off_with_a_goodbye() {
    let account = Account::authorized_without_grant("bye", "bye@example.test");
    let options = Options {
        failure_delay: "60s".into(),
        limits: "login_failure_max_delay = \"60s\"".into(),
        ..Options::default()
    };
    let gateway =
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await;
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(b"a LOGIN bye wrong\r\n").await;
    wrong_passwords_checked(&gateway, 1).await;
    // stop() waits up to 5 s for sessions; the goodbye must come first.
    let (goodbye, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(10), c.line()),
        gateway.stop()
    );
    assert_eq!(
        goodbye.expect("a goodbye before the back-off ended"),
        "* BYE mailgate shutting down"
    );
}

/// Waits until the gateway has counted `n` logins with bad credentials:
/// from then on, the last one waits out its back-off.
async fn wrong_passwords_checked(gateway: &Gateway, n: usize) {
    let series = "mailgate_logins_total{outcome=\"bad_credentials\",protocol=\"imap\"}";
    let counted = async {
        while gateway.metric(series) < n as f64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), counted)
        .await
        .expect("the wrong password was checked");
}
