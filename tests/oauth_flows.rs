//! OAuth 2.0 integrations as the admin uses them, against the harness's
//! real OAuth server: authorize (browser callback, paste-back, device),
//! client credentials with a certificate, service accounts, refresh with
//! rotation, needs-authorization with notifications, retries of transient
//! failures, one token request for 100 logins, and kill -9 during writes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs
)] // tests may panic

mod support;

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use support::cli::{browser, config_file, mailgate, start_authorize, unauthorized, wait};
use support::{free_port, harness, Account, Gateway, Options, RawClient};

async fn login(gateway: &Gateway, account: &Account) -> String {
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(format!("a LOGIN {} \"{}\"\r\n", account.name, account.password).as_bytes())
        .await;
    let reply = c.until_tagged("a").await.last().unwrap().clone();
    c.send(b"z LOGOUT\r\n").await;
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paste_back_authorization_with_pkce_then_status_and_test() {
    harness().seed("paste@example.test");
    let dir = tempfile::tempdir().unwrap();
    let account = unauthorized("paste", "paste@example.test");
    let options = Options {
        http_port: Some(free_port()),
        ..Options::default()
    };
    let config = config_file(dir.path(), &[account], &options);
    // Before: status says the account needs authorization (exit 2).
    let status = mailgate(&config).arg("status").output().unwrap();
    assert_eq!(status.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&status.stdout).contains("NEEDS AUTHORIZATION"));

    let (mut child, url) = start_authorize(&config, "paste", &["--paste"]).await;
    assert!(
        url.contains("code_challenge_method=S256") && url.contains("state="),
        "{url}"
    );
    let redirected = browser(url, "paste@example.test").await;
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{redirected}").unwrap();
    drop(stdin);
    let (ok, stderr) = wait(child).await;
    assert!(ok, "authorize failed: {stderr}");

    let status = mailgate(&config).arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert_eq!(status.status.code(), Some(0), "{text}");
    assert!(text.contains("access token: valid until"), "{text}");
    let test = mailgate(&config).args(["test", "paste"]).output().unwrap();
    let text = String::from_utf8_lossy(&test.stdout);
    assert!(test.status.success(), "{text}");
    // Neither command prints a secret.
    let record = support::store(dir.path())
        .load_record("paste")
        .unwrap()
        .unwrap();
    let secrets = [
        record.access_token.clone().unwrap(),
        record.refresh_token.clone().unwrap(),
        support::CLIENT.secret.to_owned(),
    ];
    let status = mailgate(&config).arg("status").output().unwrap();
    for output in [&status.stdout, &status.stderr, &test.stdout, &test.stderr] {
        let output = String::from_utf8_lossy(output);
        for secret in &secrets {
            assert!(
                !output.contains(secret.as_str()),
                "a secret was printed: {output}"
            );
        }
    }
    for step in [
        "token",
        "imap connect",
        "imap xoauth2 login",
        "imap EXAMINE INBOX",
        "imap logout",
        "pop3 xoauth2 login",
        "pop3 STAT",
        "pop3 logout",
    ] {
        assert!(
            text.lines().any(|l| l.contains(" ok ") && l.contains(step)
                || l.trim_start().starts_with("ok") && l.contains(step)),
            "{step}: {text}"
        );
    }
    // The state was checked: a redirect from another attempt is refused.
    let (mut child, _url) = start_authorize(&config, "paste", &["--paste"]).await;
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{redirected}").unwrap();
    drop(stdin);
    let (ok, stderr) = wait(child).await;
    assert!(!ok && stderr.contains("state"), "{stderr}");
}

/// The flow ends at the running gateway's redirect URL, and the gateway
/// uses the new tokens without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_callback_reaches_the_running_gateway_which_uses_the_tokens_at_once() {
    harness().seed("callback@example.test");
    let dir = tempfile::tempdir().unwrap();
    let account = unauthorized("callback", "callback@example.test");
    let options = Options {
        http_port: Some(free_port()),
        ..Options::default()
    };
    let config = config_file(dir.path(), &[account.clone()], &options);
    let state = tempfile::TempDir::new_in(dir.path()).unwrap();
    // The running gateway shares the config (and so the state directory).
    let gateway = Gateway::start_config(&config, state).await;
    assert!(login(&gateway, &account)
        .await
        .starts_with("a NO [AUTHENTICATIONFAILED] This account must be authorized"));

    let (child, url) = start_authorize(&config, "callback", &[]).await;
    let redirected = browser(url, "callback@example.test").await;
    let page = reqwest::get(&redirected).await.unwrap();
    assert_eq!(page.status(), 200);
    assert_eq!(page.headers()["cache-control"], "no-store");
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("Account callback is authorized"));
    let (ok, stderr) = wait(child).await;
    assert!(ok, "authorize failed: {stderr}");
    assert!(
        login(&gateway, &account).await.starts_with("a OK"),
        "the gateway didn't pick up the new tokens"
    );

    // A refused authorization comes back explained.
    let (child, url) = start_authorize(&config, "callback", &[]).await;
    let redirected = browser(url, "deny@example.test").await;
    let page = reqwest::get(&redirected).await.unwrap();
    assert_eq!(page.status(), 400);
    assert!(page.text().await.unwrap().contains("access_denied"));
    let (ok, stderr) = wait(child).await;
    assert!(!ok && stderr.contains("access_denied"), "{stderr}");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_authorization_grant() {
    let h = harness();
    h.seed("device@example.test");
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        &[unauthorized("device", "device@example.test")],
        &Options::default(),
    );
    let mut child = mailgate(&config)
        .args(["authorize", "device", "--device"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let (mut uri, mut code) = (String::new(), String::new());
    stdout.read_line(&mut uri).unwrap();
    stdout.read_line(&mut code).unwrap();
    assert!(uri.trim().starts_with(&h.oauth_issuer), "{uri}");
    let code = code.trim().strip_prefix("code: ").unwrap().to_owned();
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/harness/device.py"))
        .arg(format!("--issuer={}", h.oauth_issuer))
        .arg(format!("--user-code={code}"))
        .arg("--user=device@example.test")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "device.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The CLI polls every 5 s (the RFC default) until it has tokens.
    let (ok, stderr) = wait(child).await;
    assert!(ok, "{stderr}");
    let test = mailgate(&config).args(["test", "device"]).output().unwrap();
    assert!(
        test.status.success(),
        "{}",
        String::from_utf8_lossy(&test.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_with_a_certificate_and_service_accounts() {
    let h = harness();
    h.seed("app@example.test");
    h.seed("delegated@example.test");
    let jwt_client = support::OAuthClient {
        id: "mailgate-jwt",
        secret: "",
    };
    let certificate = Account {
        client: jwt_client,
        grant: "client_credentials",
        refresh_token: None,
        integration_extra: format!(
            "client_certificate_file = \"{}\"\nclient_key_file = \"{}\"",
            h.client_jwt_cert.display(),
            h.client_jwt_key.display()
        ),
        ..Account::authorized_without_grant("certapp", "app@example.test")
    };
    let service = Account {
        client: support::OAuthClient {
            id: "svc-account",
            secret: "",
        },
        grant: "jwt_bearer",
        refresh_token: None,
        integration_extra: format!(
            "service_account_file = \"{}\"",
            h.service_account_json.display()
        ),
        ..Account::authorized_without_grant("delegated", "delegated@example.test")
    };
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(
        dir.path(),
        &[certificate.clone(), service.clone()],
        &Options::default(),
    );
    for name in ["certapp", "delegated"] {
        let test = mailgate(&config).args(["test", name]).output().unwrap();
        assert!(
            test.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&test.stdout),
            String::from_utf8_lossy(&test.stderr)
        );
    }
    // And through the gateway, with the real mail flowing.
    let gateway = Gateway::start(&[certificate.clone(), service.clone()]).await;
    assert!(login(&gateway, &certificate).await.starts_with("a OK"));
    assert!(login(&gateway, &service).await.starts_with("a OK"));
    gateway.stop().await;
}

/// A refused grant: the account needs authorization, nothing is deleted,
/// clients get a clear NO, and the hooks fire with the fixing command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_marks_needs_authorization_keeps_tokens_and_notifies() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let h = harness();
    let dir = tempfile::tempdir().unwrap();
    let webhook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let webhook_addr = webhook.local_addr().unwrap();
    let (body_tx, mut body_rx) = tokio::sync::mpsc::channel::<String>(4);
    tokio::spawn(async move {
        while let Ok((mut c, _)) = webhook.accept().await {
            let mut buf = vec![0; 8192];
            let n = c.read(&mut buf).await.unwrap_or(0);
            let _ = c
                .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                .await;
            let _ = body_tx
                .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                .await;
        }
    });
    let marker = dir.path().join("notified");
    let account = Account::authorized("revokee", "revokee@example.test");
    let refresh = account.refresh_token.clone().unwrap();
    h.revoke(support::CLIENT, &refresh, "refresh_token").await;
    let oauth = format!(
        "notify_command = [\"/bin/sh\", \"-c\", \"echo \\\"$MAILGATE_ACCOUNT|$MAILGATE_FIX|$MAILGATE_REASON\\\" >> {}\"]\nnotify_url = \"http://{webhook_addr}/hook\"",
        marker.display()
    );
    let gateway = Gateway::start_options(
        tempfile::tempdir().unwrap(),
        &[account.clone()],
        &Options {
            oauth,
            ..Options::default()
        },
    )
    .await;
    let reply = login(&gateway, &account).await;
    assert_eq!(reply, "a NO [AUTHENTICATIONFAILED] This account must be authorized again by the mailgate administrator");
    let record = gateway.stored("revokee").expect("the record is kept");
    assert_eq!(
        record.refresh_token.as_deref(),
        Some(refresh.as_str()),
        "the refresh token was kept"
    );
    assert!(record
        .needs_authorization
        .as_deref()
        .unwrap()
        .contains("invalid_grant"));
    let body = tokio::time::timeout(Duration::from_secs(10), body_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(
        body.contains("\"fix\":\"mailgate authorize revokee\""),
        "{body}"
    );
    assert!(body.contains("\"account\":\"revokee\""), "{body}");
    assert!(!body.contains(&refresh), "the notice carries a token");
    let mut notified = String::new();
    for _ in 0..50 {
        notified = std::fs::read_to_string(&marker).unwrap_or_default();
        if !notified.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        notified.starts_with("revokee|mailgate authorize revokee|"),
        "{notified:?}"
    );
    // Only the first transition notifies; the next login doesn't request
    // a token at all, and tells the client the same.
    assert!(login(&gateway, &account)
        .await
        .contains("must be authorized again"));
    gateway.stop().await;
}

/// A TCP proxy to the real token endpoint that counts requests, and first
/// fails `fail` of them: with HTTP 500 (`stall` false) or by never
/// answering (`stall` true).
async fn token_proxy(fail: usize, stall: bool) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let h = harness();
    let upstream: std::net::SocketAddr = format!(
        "127.0.0.1:{}",
        h.oauth_token_url
            .split(':')
            .nth(2)
            .unwrap()
            .split('/')
            .next()
            .unwrap()
    )
    .parse()
    .unwrap();
    let path = h.oauth_token_url.splitn(4, '/').nth(3).unwrap().to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut first = vec![0; 64 * 1024];
                let Ok(n) = client.read(&mut first).await else {
                    return;
                };
                let count = seen.fetch_add(1, SeqCst) + 1;
                if count <= fail {
                    if stall {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    } else {
                        let _ = client.write_all(b"HTTP/1.1 500 Internal Server Error\r\nconnection: close\r\ncontent-length: 0\r\n\r\n").await;
                    }
                    return;
                }
                let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await else {
                    return;
                };
                if up.write_all(&first[..n]).await.is_err() {
                    return;
                }
                // One request per connection is enough for counting; the
                // proxy asks the server to close after answering.
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            });
        }
    });
    (format!("http://{addr}/{path}"), requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_with_back_off() {
    for stall in [false, true] {
        let (token_url, requests) = token_proxy(2, stall).await;
        let account = Account {
            token_url: Some(token_url),
            ..Account::authorized("retried", "retried@example.test")
        };
        let oauth = "retry_backoff = \"200ms\"\nrequest_timeout = \"1s\"".to_owned();
        let gateway = Gateway::start_options(
            tempfile::tempdir().unwrap(),
            &[account.clone()],
            &Options {
                oauth,
                ..Options::default()
            },
        )
        .await;
        // The background refresher fails twice, backs off, then succeeds.
        let mut ok = false;
        for _ in 0..100 {
            if gateway
                .stored("retried")
                .is_some_and(|r| r.last_refresh > 0)
            {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            ok,
            "no token after transient failures (stall: {stall}); {} requests",
            requests.load(SeqCst)
        );
        assert!(requests.load(SeqCst) >= 3);
        let record = gateway.stored("retried").unwrap();
        assert!(
            record.needs_authorization.is_none(),
            "a transient failure marked the account"
        );
        assert!(login(&gateway, &account).await.starts_with("a OK"));
        gateway.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_logins_cause_exactly_one_token_request() {
    harness().seed("hundred@example.test");
    let (token_url, requests) = token_proxy(0, false).await;
    let account = Account {
        token_url: Some(token_url),
        ..Account::authorized("hundred", "hundred@example.test")
    };
    // 100 logins from one address at once: above the default per-address cap.
    let options = Options {
        oauth: "refresh_in_background = false".into(),
        limits: "max_pre_login_per_ip = 200".into(),
        ..Options::default()
    };
    let gateway = Arc::new(
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await,
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (gateway, account) = (gateway.clone(), account.clone());
        tasks.spawn(async move { login(&gateway, &account).await });
    }
    while let Some(reply) = tasks.join_next().await {
        assert!(reply.unwrap().starts_with("a OK"));
    }
    assert_eq!(
        requests.load(SeqCst),
        1,
        "token requests for 100 concurrent logins"
    );
}

/// `kill -9` at random moments of a gateway that refreshes constantly
/// (5-second tokens, several accounts): the store stays readable and
/// keeps every account's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_store_writes_leaves_a_readable_store() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["k1", "k2", "k3", "k4", "k5", "k6"];
    let accounts: Vec<Account> = names
        .iter()
        .map(|n| {
            let mailbox = format!("{n}@example.test");
            let grant = harness().authorize(support::SHORT_CLIENT, &mailbox);
            Account {
                client: support::SHORT_CLIENT,
                refresh_token: Some(grant.refresh_token),
                ..Account::authorized_without_grant(n, &mailbox)
            }
        })
        .collect();
    let config = config_file(dir.path(), &accounts, &Options::default());
    let store = support::store(dir.path());
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    for round in 0..12 {
        let mut child = mailgate(&config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(300 + rng % 2500)).await;
        // SIGKILL: no chance to finish a write.
        child.kill().unwrap();
        child.wait().unwrap();
        for name in names {
            let record = store
                .load_record(name)
                .unwrap_or_else(|e| panic!("round {round}: {name}: {e}"));
            if let Some(record) = record {
                assert!(
                    record.refresh_token.is_some(),
                    "round {round}: {name} lost its refresh token"
                );
            }
        }
    }
    let written = names
        .iter()
        .filter(|n| store.load_record(n).unwrap().is_some())
        .count();
    assert!(written > 0, "the gateway never wrote the store");
}

/// Microsoft's refusal, in the body its token endpoint sends, comes out in
/// plain words with its code beside it, where the admin looks: the record
/// (`status`, the page) and the notification hook's reason. The endpoint is
/// a fake: the harness server can't send Microsoft's codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_codes_reach_status_and_the_hook_in_plain_words() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let body = r#"{"error":"invalid_grant","error_description":"AADSTS700082: The refresh token has expired due to inactivity. The token was issued on 2026-08-01T10:00:00.0000000Z and was inactive for 90.00:00:00.\r\nTrace ID: 0f4e9d2c\r\nCorrelation ID: 6a1b2c3d\r\nTimestamp: 2026-11-30 10:00:00Z","error_codes":[700082]}"#;
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tcp.write_all(answer.as_bytes()).await;
        }
    });
    let marker = dir.path().join("notified");
    let account = Account {
        token_url: Some(url),
        refresh_token: Some("an-old-refresh-token".into()),
        ..Account::authorized_without_grant("inactive", "inactive@example.test")
    };
    let oauth = format!(
        "notify_command = [\"/bin/sh\", \"-c\", \"echo \\\"$MAILGATE_REASON\\\" >> {}\"]",
        marker.display()
    );
    let gateway = Gateway::start_options(
        tempfile::tempdir().unwrap(),
        &[account.clone()],
        &Options {
            oauth,
            ..Options::default()
        },
    )
    .await;
    assert!(login(&gateway, &account)
        .await
        .starts_with("a NO [AUTHENTICATIONFAILED]"));
    let why = gateway
        .stored("inactive")
        .unwrap()
        .needs_authorization
        .unwrap();
    assert!(
        why.starts_with("the refresh token expired after 90 days without use"),
        "{why}"
    );
    assert!(
        why.contains("(AADSTS700082). Fix: authorize the account again"),
        "{why}"
    );
    assert!(why.contains("The provider said: invalid_grant: AADSTS700082: The refresh token has expired due to inactivity."), "{why}");
    let mut notified = String::new();
    for _ in 0..50 {
        notified = std::fs::read_to_string(&marker).unwrap_or_default();
        if !notified.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        notified.contains("90 days without use") && notified.contains("AADSTS700082"),
        "{notified:?}"
    );
    gateway.stop().await;
}
