//! The IMAP gateway end to end, against the harness's real Dovecot and real
//! OAuth server, with real clients: Python imaplib, curl, and a raw client.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs,
    clippy::result_large_err
)] // tests may panic

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use support::{harness, python_imap, Account, Gateway, RawClient, SHORT_CLIENT};

fn sha(bytes: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn seed_digests() -> BTreeSet<String> {
    harness().seed_messages().iter().map(|m| sha(m)).collect()
}

/// Logs in with imaplib the given way, fetches everything, and checks that
/// the messages are byte-identical to the Maildir's.
async fn imaplib_fetch(port: u16, mode: &'static str, account: &Account, login: &'static str) {
    let out_dir = tempfile::tempdir().unwrap();
    let args = vec![
        "fetch".into(),
        format!("--port={port}"),
        format!("--mode={mode}"),
        format!("--cafile={}", harness().ca_file.display()),
        format!("--user={}", account.name),
        format!("--password={}", account.password),
        format!("--login={login}"),
        format!("--out={}", out_dir.path().display()),
    ];
    let out = tokio::task::spawn_blocking(move || python_imap(&args))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "imap_client.py: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(result["login"], "OK", "{login} over {mode}: {result}");
    assert_eq!(
        result["count"].as_u64(),
        Some(harness().seed_messages().len() as u64)
    );
    let fetched: BTreeSet<String> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| sha(&std::fs::read(e.unwrap().path()).unwrap()))
        .collect();
    assert_eq!(
        fetched,
        seed_digests(),
        "{login} over {mode}: fetched messages differ from the Maildir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaplib_logs_in_every_way_over_implicit_tls_and_fetches_identical_bytes() {
    harness().seed("imaplib@example.test");
    let account = Account::authorized("imaplib", "imaplib@example.test");
    let gateway = Gateway::start(&[account.clone()]).await;
    for login in ["atom", "quoted", "literal", "authenticate"] {
        imaplib_fetch(gateway.imaps.port(), "ssl", &account, login).await;
    }
    gateway.stop().await;
    // A password with a space and a quote: quoted with escapes, or literal.
    let account = Account {
        password: "p\\a ss\"w",
        ..Account::authorized("imaplib", "imaplib@example.test")
    };
    let gateway = Gateway::start(&[account.clone()]).await;
    for login in ["quoted", "literal", "authenticate"] {
        imaplib_fetch(gateway.imaps.port(), "ssl", &account, login).await;
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_identical_bytes_with_authenticate_plain_and_login() {
    let h = harness();
    h.seed("curl@example.test");
    // A password that LOGIN must quote, with escapes.
    let account = Account {
        password: "pa ss\\\"word",
        ..Account::authorized("curl", "curl@example.test")
    };
    let gateway = Gateway::start(&[account.clone()]).await;
    let seeds = h.seed_messages();
    let cases = [
        (format!("imaps://localhost:{}", gateway.imaps.port()), None),
        (
            format!("imaps://localhost:{}", gateway.imaps.port()),
            Some("AUTH=LOGIN"),
        ),
        (format!("imap://localhost:{}", gateway.imap.port()), None),
    ];
    for (base, login_options) in cases {
        for (i, seed) in seeds.iter().enumerate() {
            let mut cmd = Command::new("curl");
            // curl takes no --opt=value; none of these values starts with "-".
            cmd.args(["--silent", "--show-error", "--ssl-reqd", "--cacert"])
                .arg(&h.ca_file)
                .arg("--user")
                .arg(format!("{}:{}", account.name, account.password))
                .arg(format!("{base}/INBOX;UID={}", i + 1));
            if let Some(o) = login_options {
                cmd.args(["--login-options", o]);
            }
            let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "curl {base} {login_options:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.stdout == *seed,
                "curl {base} {login_options:?} UID {}: bytes differ",
                i + 1
            );
        }
    }
    gateway.stop().await;
}

/// Two literals, commands pipelined behind LOGIN, and the upstream's
/// capabilities in the tagged OK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn literal_login_with_pipelined_commands_reaches_the_upstream() {
    harness().seed("pipeline@example.test");
    let account = Account {
        password: "p w\"{1}\r\n",
        ..Account::authorized("pipeline", "pipeline@example.test")
    };
    let gateway = Gateway::start(&[account.clone()]).await;
    let (mut c, greeting) = RawClient::connect(gateway.imaps).await;
    assert!(
        greeting.starts_with("* OK [CAPABILITY IMAP4rev1"),
        "{greeting}"
    );
    assert!(
        greeting.contains("AUTH=PLAIN") && greeting.contains("SASL-IR"),
        "{greeting}"
    );
    c.send(format!("a LOGIN {{{}}}\r\n", account.name.len()).as_bytes())
        .await;
    assert!(c.line().await.starts_with("+ "));
    let password = account.password.as_bytes();
    let mut rest = format!("{} {{{}+}}\r\n", account.name, password.len()).into_bytes();
    rest.extend_from_slice(password);
    rest.extend_from_slice(b"\r\nb SELECT INBOX\r\nc FETCH 1 (BODY.PEEK[])\r\nd LOGOUT\r\n");
    c.send(&rest).await;
    let login = c.until_tagged("a").await;
    let ok = login.last().unwrap();
    assert!(ok.starts_with("a OK [CAPABILITY IMAP4rev1"), "{login:?}");
    assert!(!ok.contains("AUTH="), "pre-login capabilities leaked: {ok}");
    let select = c.until_tagged("b").await;
    assert!(select.last().unwrap().starts_with("b OK"), "{select:?}");
    let body = c.literal().await;
    assert_eq!(body, harness().seed_messages()[0]);
    assert!(c
        .until_tagged("c")
        .await
        .last()
        .unwrap()
        .starts_with("c OK"));
    assert!(c
        .until_tagged("d")
        .await
        .last()
        .unwrap()
        .starts_with("d OK"));
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sees_a_message_appended_by_another_connection() {
    harness().seed("idle@example.test");
    let account = Account::authorized("idle", "idle@example.test");
    let gateway = Gateway::start(&[account.clone()]).await;
    let login = |c: &'static str| {
        format!(
            "{c} LOGIN {} \"{}\"\r\n",
            account.name,
            account.password.replace('"', "\\\"")
        )
    };

    let (mut idler, _) = RawClient::connect(gateway.imaps).await;
    idler.send(login("a").as_bytes()).await;
    assert!(idler
        .until_tagged("a")
        .await
        .last()
        .unwrap()
        .starts_with("a OK"));
    idler.send(b"b SELECT INBOX\r\n").await;
    let select = idler.until_tagged("b").await;
    let exists = select
        .iter()
        .find_map(|l| l.strip_suffix(" EXISTS"))
        .unwrap()
        .trim_start_matches("* ")
        .to_owned();
    let before: usize = exists.parse().unwrap();
    idler.send(b"c IDLE\r\n").await;
    assert!(idler.line().await.starts_with("+ "), "IDLE not accepted");

    let (mut writer, _) = RawClient::connect(gateway.imaps).await;
    writer.send(login("w1").as_bytes()).await;
    assert!(writer
        .until_tagged("w1")
        .await
        .last()
        .unwrap()
        .starts_with("w1 OK"));
    let message =
        b"From: a@example.test\r\nTo: idle@example.test\r\nSubject: appended\r\n\r\nhello\r\n";
    writer
        .send(format!("w2 APPEND INBOX {{{}+}}\r\n", message.len()).as_bytes())
        .await;
    writer.send(message).await;
    writer.send(b"\r\n").await;
    assert!(writer
        .until_tagged("w2")
        .await
        .last()
        .unwrap()
        .starts_with("w2 OK"));

    let seen = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = idler.line().await;
            if line == format!("* {} EXISTS", before + 1) {
                return line;
            }
            assert!(!line.is_empty(), "connection closed while idling");
        }
    })
    .await
    .expect("IDLE saw no EXISTS within 30 s");
    assert_eq!(seen, format!("* {} EXISTS", before + 1));
    idler.send(b"DONE\r\n").await;
    assert!(idler
        .until_tagged("c")
        .await
        .last()
        .unwrap()
        .starts_with("c OK"));
    gateway.stop().await;
}

/// A TCP listener that counts connections: stands in for the token
/// endpoint and the upstream to prove that nothing reaches them.
async fn counting_listener() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(conn);
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused_with_no_oauth_or_upstream_traffic() {
    use std::sync::atomic::Ordering::SeqCst;
    let (oauth, oauth_hits) = counting_listener().await;
    let (upstream, upstream_hits) = counting_listener().await;
    let account = Account {
        name: "victim",
        password: "right password",
        mailbox: "victim@example.test".into(),
        client: support::CLIENT,
        grant: "client_credentials",
        refresh_token: None,
        upstream: (upstream.to_string(), "implicit"),
        pop3_upstream: (upstream.to_string(), "implicit"),
        smtp_upstream: (upstream.to_string(), "implicit"),
        token_url: Some(format!("http://{oauth}/token")),
        integration_extra: String::new(),
    };
    // No background refresh: only logins may cause token requests here.
    let gateway = Gateway::start_with(&[account], "refresh_in_background = false").await;
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    for (tag, line) in [
        ("a", "a LOGIN victim \"wrong password\"\r\n"),
        ("b", "b LOGIN nobody \"right password\"\r\n"),
        ("c", "c AUTHENTICATE PLAIN AHZpY3RpbQB3cm9uZw==\r\n"),
    ] {
        c.send(line.as_bytes()).await;
        let reply = c.until_tagged(tag).await;
        assert_eq!(
            reply.last().unwrap(),
            &format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed")
        );
    }
    assert_eq!(
        oauth_hits.load(SeqCst),
        0,
        "a failed local login reached the OAuth server"
    );
    assert_eq!(
        upstream_hits.load(SeqCst),
        0,
        "a failed local login reached the upstream"
    );
    // Control: the right password does reach the token endpoint (which is
    // not a real one, so the login ends in UNAVAILABLE).
    c.send(b"d LOGIN victim \"right password\"\r\n").await;
    let reply = c.until_tagged("d").await;
    assert!(
        reply.last().unwrap().starts_with("d NO [UNAVAILABLE]"),
        "{reply:?}"
    );
    assert!(
        oauth_hits.load(SeqCst) > 0,
        "the counting token endpoint saw nothing"
    );
    gateway.stop().await;
}

async fn login_ok(gateway: &Gateway, account: &Account) -> Vec<String> {
    login_ok_with(gateway.imaps, support::client_tls(), account).await
}

/// LOGIN, then LOGOUT, at `address` with the client TLS config `tls`;
/// returns the LOGIN reply.
async fn login_ok_with(
    address: std::net::SocketAddr,
    tls: std::sync::Arc<rustls::ClientConfig>,
    account: &Account,
) -> Vec<String> {
    let (mut c, _) = RawClient::connect_with(address, tls).await;
    c.send(
        format!(
            "a LOGIN {} \"{}\"\r\n",
            account.name,
            account.password.replace('"', "\\\"")
        )
        .as_bytes(),
    )
    .await;
    let reply = c.until_tagged("a").await;
    c.send(b"z LOGOUT\r\n").await;
    let _ = c.until_tagged("z").await;
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_access_token_is_refreshed_before_use() {
    let h = harness();
    h.seed("short@example.test");
    let grant = h.authorize(SHORT_CLIENT, "short@example.test");
    let account = Account {
        client: SHORT_CLIENT,
        refresh_token: Some(grant.refresh_token.clone()),
        ..Account::authorized("short", "short@example.test")
    };
    let gateway = Gateway::start(&[account.clone()]).await;
    let first = login_ok(&gateway, &account).await;
    assert!(first.last().unwrap().starts_with("a OK"), "{first:?}");
    let stored = gateway
        .stored_refresh_token("short")
        .expect("rotated refresh token stored");
    assert_ne!(
        stored, grant.refresh_token,
        "the rotated refresh token was kept"
    );
    // The access token lives 5 s; after 6 s it has expired.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let second = login_ok(&gateway, &account).await;
    assert!(second.last().unwrap().starts_with("a OK"), "{second:?}");
    let restored = gateway.stored_refresh_token("short").unwrap();
    assert_ne!(
        restored, stored,
        "a second refresh happened (and rotated again)"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_access_token_is_replaced_and_a_dead_grant_gives_a_clean_no() {
    let h = harness();
    h.seed("revoked@example.test");
    // oidc-provider revokes a token's whole grant, refresh token included
    // (OAuth 2.1 style). So the stored access token comes from an older
    // grant than the refresh token, as after a re-authorization, and
    // revoking it leaves the refresh token alive.
    let old = h.authorize(support::CLIENT, "revoked@example.test");
    let grant = h.authorize(support::CLIENT, "revoked@example.test");
    let account = Account {
        refresh_token: None,
        ..Account::authorized("revoked", "revoked@example.test")
    };
    let stored = support::Grant {
        access_token: old.access_token.clone(),
        refresh_token: grant.refresh_token.clone(),
    };
    // The gateway's first login uses the stored access token.
    let gateway = Gateway::start_with_store(&[account.clone()], "revoked", &stored).await;
    h.revoke(support::CLIENT, &old.access_token, "access_token")
        .await;
    // Dovecot rejects the revoked token with a 401 challenge; the gateway
    // refreshes and logs in.
    let reply = login_ok(&gateway, &account).await;
    assert!(reply.last().unwrap().starts_with("a OK"), "{reply:?}");
    let rotated = gateway.stored_refresh_token("revoked").unwrap();
    assert_ne!(
        rotated, grant.refresh_token,
        "the refresh happened and its rotation was stored"
    );

    // Now kill the whole grant: the cached token is rejected and the
    // refresh fails too. The client gets a clean NO, and nothing is deleted.
    h.revoke(support::CLIENT, &rotated, "refresh_token").await;
    let reply = login_ok(&gateway, &account).await;
    assert_eq!(
        reply.last().unwrap(),
        "a NO [AUTHENTICATIONFAILED] This account must be authorized again by the mailgate administrator",
        "{reply:?}"
    );
    assert!(
        !reply.iter().any(|l| l.starts_with("+ ")),
        "the provider's challenge reached the client: {reply:?}"
    );
    assert_eq!(
        gateway.stored_refresh_token("revoked").as_deref(),
        Some(rotated.as_str()),
        "the stored token was kept"
    );
    gateway.stop().await;
}

/// A client-credentials token has no grant behind it: revoking the cached
/// one makes Dovecot refuse it, and the gateway fetches a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_client_credentials_token_is_replaced() {
    let h = harness();
    let account = Account {
        grant: "client_credentials",
        refresh_token: None,
        ..Account::authorized("app", "app@example.test")
    };
    mailgate::tls::install_default_provider();
    let response: serde_json::Value = reqwest::Client::new()
        .post(&h.oauth_token_url)
        .basic_auth(support::CLIENT.id, Some(support::CLIENT.secret))
        .form(&[("grant_type", "client_credentials"), ("scope", "mail")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = response["access_token"]
        .as_str()
        .expect("client credentials token")
        .to_owned();
    let stored = support::Grant {
        access_token: token.clone(),
        refresh_token: String::new(),
    };
    let gateway = Gateway::start_with_store(&[account.clone()], "app", &stored).await;
    h.revoke(support::CLIENT, &token, "access_token").await;
    let reply = login_ok(&gateway, &account).await;
    assert!(reply.last().unwrap().starts_with("a OK"), "{reply:?}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_grant_logs_in_as_the_app_mailbox() {
    let h = harness();
    h.seed("app@example.test");
    let account = Account {
        grant: "client_credentials",
        refresh_token: None,
        ..Account::authorized("app", "app@example.test")
    };
    let gateway = Gateway::start(&[account.clone()]).await;
    imaplib_fetch(gateway.imaps.port(), "ssl", &account, "quoted").await;
    gateway.stop().await;
}

/// 20 logins at once on a gateway with no access token yet: one refresh
/// serves them all. With rotation and replay detection at the OAuth
/// server, a second refresh with the same token would kill the grant and
/// fail logins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_logins_wait_for_one_refresh() {
    harness().seed("crowd@example.test");
    let account = Account::authorized("crowd", "crowd@example.test");
    let gateway = std::sync::Arc::new(Gateway::start(&[account.clone()]).await);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (gateway, account) = (gateway.clone(), account.clone());
        tasks.spawn(async move { login_ok(&gateway, &account).await });
    }
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.unwrap();
        assert!(reply.last().unwrap().starts_with("a OK"), "{reply:?}");
    }
    // One more login, after all of them, still works: the grant is alive.
    let reply = login_ok(&gateway, &account).await;
    assert!(reply.last().unwrap().starts_with("a OK"), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_certificate_must_chain_to_a_trusted_root() {
    let account = Account::authorized("untrusted", "untrusted@example.test");
    // The same Dovecot, but without the harness CA: its certificate is
    // untrusted (webpki roots only), and the login fails.
    let gateway = Gateway::start_with_trust(&[account.clone()], "", false).await;
    let reply = login_ok(&gateway, &account).await;
    assert_eq!(
        reply.last().unwrap(),
        "a NO [UNAVAILABLE] Upstream mail service unavailable, try again later",
        "{reply:?}"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_answered_after_the_configured_delay() {
    // Other test gateways wait 10 ms; this one 400 ms.
    let account = Account {
        refresh_token: None,
        ..Account::authorized("slow", "slow@example.test")
    };
    let gateway = Gateway::start_with_delay(&[account], "400ms").await;
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    let started = std::time::Instant::now();
    c.send(b"a LOGIN slow wrong\r\n").await;
    let reply = c.until_tagged("a").await;
    assert!(reply
        .last()
        .unwrap()
        .starts_with("a NO [AUTHENTICATIONFAILED]"));
    // A lower bound on a deliberate delay, not a speed measurement.
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "answered after {:?}",
        started.elapsed()
    );
    gateway.stop().await;
}

/// A minimal HTTP server: answers every request with `response`, counting
/// connections; `None` accepts and never answers (a stalled endpoint).
async fn http_fake(
    response: Option<String>,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                match response {
                    Some(r) => {
                        let _ = conn.write_all(r.as_bytes()).await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(60)).await,
                }
            });
        }
    });
    (addr, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_follow_no_redirects_and_time_out() {
    use std::sync::atomic::Ordering::SeqCst;
    let (target, target_hits) = http_fake(Some(
        "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n".into(),
    ))
    .await;
    let redirect = format!(
        "HTTP/1.1 307 Temporary Redirect\r\nlocation: http://{target}/token\r\ncontent-length: 0\r\n\r\n"
    );
    let (redirector, redirector_hits) = http_fake(Some(redirect)).await;
    let (stalled, _) = http_fake(None).await;
    let base = Account {
        grant: "client_credentials",
        refresh_token: None,
        ..Account::authorized("x", "x@example.test")
    };
    let redirected = Account {
        name: "redirected",
        token_url: Some(format!("http://{redirector}/token")),
        ..base.clone()
    };
    let stalling = Account {
        name: "stalling",
        token_url: Some(format!("http://{stalled}/token")),
        ..base
    };
    let gateway = Gateway::start_with(
        &[redirected.clone(), stalling.clone()],
        "request_timeout = \"1s\"",
    )
    .await;
    let reply = login_ok(&gateway, &redirected).await;
    assert!(reply.last().unwrap().starts_with("a NO"), "{reply:?}");
    assert!(redirector_hits.load(SeqCst) > 0);
    assert_eq!(
        target_hits.load(SeqCst),
        0,
        "the token request followed a redirect"
    );
    let reply = tokio::time::timeout(Duration::from_secs(20), login_ok(&gateway, &stalling))
        .await
        .expect("a stalled token endpoint must not hang the login");
    assert_eq!(
        reply.last().unwrap(),
        "a NO [UNAVAILABLE] Upstream mail service unavailable, try again later",
        "{reply:?}"
    );
    gateway.stop().await;
}

/// The upstream refuses every token for this mailbox (its `user=` is not
/// the token's owner): one refresh, one retry, then a clean NO, and the
/// provider's challenge never reaches the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_a_fresh_token_too_gives_authenticationfailed() {
    let account = Account {
        mailbox: "somebody-else@example.test".into(),
        ..Account::authorized("mismatch", "mismatch@example.test")
    };
    let gateway = Gateway::start(&[account.clone()]).await;
    let before = gateway.stored_refresh_token("mismatch");
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(format!("a LOGIN mismatch {}\r\n", account.password).as_bytes())
        .await;
    let reply = c.until_tagged("a").await;
    assert_eq!(
        reply,
        ["a NO [AUTHENTICATIONFAILED] Authentication failed"],
        "{reply:?}"
    );
    assert_ne!(
        gateway.stored_refresh_token("mismatch"),
        before,
        "the gateway refreshed once before giving up"
    );
    gateway.stop().await;
}

/// Every LOGIN form over every combination of client and upstream TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_login_form_over_every_tls_combination() {
    let h = harness();
    h.seed("matrix@example.test");
    for upstream in [(h.imaps_port, "implicit"), (h.imap_port, "starttls")] {
        let mut account = Account::authorized("matrix", "matrix@example.test");
        account.upstream = (format!("127.0.0.1:{}", upstream.0), upstream.1);
        let gateway = Gateway::start(&[account.clone()]).await;
        for (port, mode) in [
            (gateway.imaps.port(), "ssl"),
            (gateway.imap.port(), "starttls"),
        ] {
            for login in ["atom", "quoted", "literal", "authenticate"] {
                imaplib_fetch(port, mode, &account, login).await;
            }
        }
        // curl's SASL-IR AUTHENTICATE PLAIN, STARTTLS client side.
        let out = Command::new("curl")
            .args(["--silent", "--show-error", "--ssl-reqd", "--cacert"])
            .arg(&h.ca_file)
            .arg("--user")
            .arg(format!("{}:{}", account.name, account.password))
            .arg(format!(
                "imap://localhost:{}/INBOX;UID=1",
                gateway.imap.port()
            ))
            .output()
            .unwrap();
        assert!(
            out.stdout == h.seed_messages()[0],
            "curl over STARTTLS, upstream {}",
            upstream.1
        );
        gateway.stop().await;
    }
}

/// Connections that have not logged in are capped per client address: one
/// over the cap waits `pre_login_wait` for a slot, then is refused; a login
/// frees a slot, and a waiting connection takes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pre_login_connections_are_capped_per_address() {
    harness().seed("capped@example.test");
    let account = Account::authorized("capped", "capped@example.test");
    let options = support::Options {
        limits: "max_pre_login_per_ip = 2\npre_login_wait = \"300ms\"".into(),
        ..support::Options::default()
    };
    let gateway =
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await;
    let (mut first, greeting) = RawClient::connect(gateway.imaps).await;
    assert!(greeting.starts_with("* OK"));
    let (_second, greeting) = RawClient::connect(gateway.imaps).await;
    assert!(greeting.starts_with("* OK"));
    let started = std::time::Instant::now();
    let (_third, greeting) = RawClient::connect(gateway.imaps).await;
    assert_eq!(
        greeting,
        "* BYE [UNAVAILABLE] Too many connections from your address, try again later"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "refused without waiting"
    );
    // Logging in frees the first slot.
    first
        .send(format!("a LOGIN capped {}\r\n", account.password).as_bytes())
        .await;
    assert!(first
        .until_tagged("a")
        .await
        .last()
        .unwrap()
        .starts_with("a OK"));
    let (_fourth, greeting) = RawClient::connect(gateway.imaps).await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    gateway.stop().await;
}

/// Failed logins wait longer each time, for the username and the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_back_off() {
    let account = Account {
        refresh_token: None,
        ..Account::authorized_without_grant("backoff", "backoff@example.test")
    };
    let options = support::Options {
        failure_delay: "100ms".into(),
        ..support::Options::default()
    };
    let gateway = Gateway::start_options(tempfile::tempdir().unwrap(), &[account], &options).await;
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    let mut waits = Vec::new();
    for i in 0..4 {
        let started = std::time::Instant::now();
        c.send(format!("a{i} LOGIN backoff wrong\r\n").as_bytes())
            .await;
        assert!(c
            .until_tagged(&format!("a{i}"))
            .await
            .last()
            .unwrap()
            .contains("NO [AUTHENTICATIONFAILED]"));
        waits.push(started.elapsed());
    }
    // Lower bounds on deliberate delays (100, 200, 400, 800 ms), not speed.
    for (i, wait) in waits.iter().enumerate() {
        assert!(
            *wait >= Duration::from_millis(100 << i),
            "failure {i} answered after {wait:?}"
        );
    }
    gateway.stop().await;
}

/// A logged-in session with no traffic is closed after the idle timeout;
/// traffic resets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_relayed_sessions_are_closed_and_traffic_resets_the_timer() {
    harness().seed("idler@example.test");
    let account = Account::authorized("idler", "idler@example.test");
    let options = support::Options {
        limits: "imap_idle_timeout = \"2s\"".into(),
        ..support::Options::default()
    };
    let gateway =
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await;
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(format!("a LOGIN idler {}\r\n", account.password).as_bytes())
        .await;
    assert!(c
        .until_tagged("a")
        .await
        .last()
        .unwrap()
        .starts_with("a OK"));
    // Traffic every 1.2 s keeps it open past 2 s.
    for tag in ["b", "c", "d"] {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        c.send(format!("{tag} NOOP\r\n").as_bytes()).await;
        assert!(
            c.until_tagged(tag)
                .await
                .last()
                .unwrap()
                .starts_with(&format!("{tag} OK")),
            "closed while active"
        );
    }
    // Then silence: the gateway closes it.
    let closed = tokio::time::timeout(Duration::from_secs(10), c.line())
        .await
        .expect("still open after the idle timeout");
    assert_eq!(closed, "", "expected the connection to close");
    gateway.stop().await;
}

/// A TCP proxy to `target` that counts connections and can cut every
/// connection it carries, as an upstream closing idle connections would.
async fn cutting_proxy(
    target: std::net::SocketAddr,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::sync::watch::Sender<u32>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (cut, cuts) = tokio::sync::watch::channel(0u32);
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut cuts = cuts.clone();
            cuts.mark_unchanged();
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(target).await {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut up) => {}
                        _ = cuts.changed() => {}
                    }
                }
            });
        }
    });
    (address, count, cut)
}

/// A login leaves a spare upstream connection (TCP and TLS done) for the
/// next login to the same server; a spare the upstream closed meanwhile is
/// noticed, and the login dials afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_use_spare_upstream_connections_and_survive_stale_ones() {
    let h = harness();
    h.seed("spare@example.test");
    let (proxy, connections, cut) =
        cutting_proxy(format!("127.0.0.1:{}", h.imaps_port).parse().unwrap()).await;
    let account = Account {
        upstream: (proxy.to_string(), "implicit"),
        ..Account::authorized("spare", "spare@example.test")
    };
    let gateway = Gateway::start(&[account.clone()]).await;
    let used = "mailgate_upstream_spares_total{outcome=\"used\"}";
    let stale = "mailgate_upstream_spares_total{outcome=\"stale\"}";
    let dialled = "mailgate_upstream_connect_seconds_count{protocol=\"imap\"}";
    for _ in 0..5 {
        let reply = login_ok(&gateway, &account).await;
        assert!(reply.last().unwrap().starts_with("a OK"), "{reply:?}");
        // Pacing, not a timing assertion: the spare is dialled in the
        // background after each login.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The first login dialled; the next four took spares.
    assert_eq!(gateway.metric(dialled), 1.0);
    assert_eq!(gateway.metric(used), 4.0);
    // One spare waits now: one connection more than logins.
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 6);

    // The upstream drops the waiting spare: the login still works.
    cut.send_modify(|n| *n += 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let reply = login_ok(&gateway, &account).await;
    assert!(reply.last().unwrap().starts_with("a OK"), "{reply:?}");
    assert_eq!(gateway.metric(stale), 1.0);
    assert_eq!(gateway.metric(dialled), 2.0);
    gateway.stop().await;
}

/// A burst of first logins with the same credentials runs the password
/// hash (argon2, slow and 19 MiB each on purpose) about once, not once per
/// login: logins queued behind the first verification find it remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_first_logins_checks_the_password_hash_about_once() {
    let h = harness();
    h.seed("burst@example.test");
    let account = Account::authorized("burst", "burst@example.test");
    // Verifications run at most one per core at a time; more logins than
    // that must wait, and then skip the hash.
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let logins = cores + 6;
    let options = support::Options {
        limits: format!("max_pre_login_per_ip = {}", 4 * logins),
        ..support::Options::default()
    };
    let gateway =
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..logins {
        let (address, account) = (gateway.imaps, account.clone());
        tasks.spawn(async move { login_ok_with(address, support::client_tls(), &account).await });
    }
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.unwrap();
        assert!(reply.last().unwrap().starts_with("a OK"), "{reply:?}");
    }
    let checks = gateway.metric("mailgate_password_checks_total{outcome=\"ok\"}");
    assert!(
        checks >= 1.0 && checks <= cores as f64 && checks < logins as f64,
        "{checks} hash checks for {logins} logins"
    );
    // A wrong password is checked, and counted as such.
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(format!("b LOGIN {} wrong-password\r\n", account.name).as_bytes())
        .await;
    let reply = c.until_tagged("b").await;
    assert!(reply.last().unwrap().starts_with("b NO"), "{reply:?}");
    assert_eq!(
        gateway.metric("mailgate_password_checks_total{outcome=\"bad\"}"),
        1.0
    );
    gateway.stop().await;
}

/// A client that comes back resumes its TLS session instead of a full
/// handshake, and `mailgate_tls_handshakes_total` counts each handshake by
/// kind, with clients and upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_clients_resume_tls_and_handshakes_are_counted() {
    let h = harness();
    h.seed("resume@example.test");
    let account = Account::authorized("resume", "resume@example.test");
    let options = support::Options {
        limits: "upstream_spare_for = \"0s\"".into(),
        ..support::Options::default()
    };
    let gateway =
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await;
    // A config of its own: its session cache holds this gateway's tickets only.
    let config = mailgate::tls::client(Some(&h.ca_file)).unwrap();
    for _ in 0..3 {
        let reply = login_ok_with(gateway.imaps, config.clone(), &account).await;
        assert!(reply.last().unwrap().starts_with("a OK"), "{reply:?}");
    }
    let series = |side: &str, kind: &str| {
        gateway.metric(&format!(
            "mailgate_tls_handshakes_total{{kind=\"{kind}\",side=\"{side}\"}}"
        ))
    };
    assert_eq!(series("client", "full"), 1.0);
    assert_eq!(series("client", "resumed"), 2.0);
    // Upstream, one handshake per login; whether Dovecot resumes depends on
    // which of its login processes takes the connection.
    assert_eq!(
        series("upstream", "full") + series("upstream", "resumed"),
        3.0
    );
    assert!(series("upstream", "full") >= 1.0);
    gateway.stop().await;
}

/// With `upstream_spare_for = "0s"`, no spare is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spares_can_be_turned_off() {
    let h = harness();
    h.seed("nospare@example.test");
    let (proxy, connections, _cut) =
        cutting_proxy(format!("127.0.0.1:{}", h.imaps_port).parse().unwrap()).await;
    let account = Account {
        upstream: (proxy.to_string(), "implicit"),
        ..Account::authorized("nospare", "nospare@example.test")
    };
    let options = support::Options {
        limits: "upstream_spare_for = \"0s\"".into(),
        ..support::Options::default()
    };
    let gateway =
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await;
    for _ in 0..3 {
        let reply = login_ok(&gateway, &account).await;
        assert!(reply.last().unwrap().starts_with("a OK"), "{reply:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(connections.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(
        gateway.metric("mailgate_upstream_spares_total{outcome=\"used\"}"),
        0.0
    );
    gateway.stop().await;
}

/// A login stuck at a token endpoint that never answers ends with the
/// gateway: the client hears the goodbye at shutdown, not after the
/// token request's timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_a_login_that_waits_for_the_token_endpoint() {
    let (stalled, hits) = http_fake(None).await;
    let account = Account {
        grant: "client_credentials",
        refresh_token: None,
        token_url: Some(format!("http://{stalled}/token")),
        ..Account::authorized_without_grant("waiting", "waiting@example.test")
    };
    let options = support::Options {
        oauth: "request_timeout = \"60s\"\nrefresh_in_background = false".into(),
        ..support::Options::default()
    };
    let gateway =
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await;
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(format!("a LOGIN waiting {}\r\n", account.password).as_bytes())
        .await;
    let asked = async {
        while hits.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), asked)
        .await
        .expect("the token endpoint was asked");
    let (goodbye, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(10), c.line()),
        gateway.stop()
    );
    assert_eq!(
        goodbye.expect("a goodbye before the token request timed out"),
        "* BYE mailgate shutting down"
    );
}

/// With the default limits, a burst of 64 concurrent logins from one host
/// (a poller starting its jobs, a cluster behind one NAT) all succeed:
/// those over the per-address cap wait for a slot instead of being refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_logins_from_one_address_succeed_with_the_defaults() {
    harness().seed("burst@example.test");
    let account = Account::authorized("burst", "burst@example.test");
    let gateway = std::sync::Arc::new(
        Gateway::start_options(
            tempfile::tempdir().unwrap(),
            std::slice::from_ref(&account),
            &support::Options::default(),
        )
        .await,
    );
    let mut logins = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (gateway, account) = (gateway.clone(), account.clone());
        logins.spawn(async move {
            let (mut c, greeting) = RawClient::connect(gateway.imaps).await;
            assert!(greeting.starts_with("* OK"), "{greeting}");
            c.send(format!("a LOGIN {} {}\r\n", account.name, account.password).as_bytes())
                .await;
            c.until_tagged("a").await.last().unwrap().clone()
        });
    }
    while let Some(reply) = logins.join_next().await {
        let reply = reply.unwrap();
        assert!(reply.starts_with("a OK"), "{reply}");
    }
}
