//! Upstream faults a real server won't produce on demand, played by small
//! fakes beside the real parts: an upstream that refuses the connection,
//! one that stalls before its greeting, and one that resets in the middle
//! of a relay. mailgate answers clearly, doesn't panic, and keeps serving.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs
)] // tests may panic

mod support;

use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpListener;

use support::{harness, Account, Gateway, Options, RawClient};

/// An app account whose upstream is `address` (token from the real OAuth
/// server by client credentials).
fn account(name: &'static str, address: String) -> Account {
    Account {
        grant: "client_credentials",
        refresh_token: None,
        upstream: (address, "implicit"),
        ..Account::authorized_without_grant(name, "app@example.test")
    }
}

async fn login_reply(gateway: &Gateway, account: &Account) -> String {
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(format!("a LOGIN {} {}\r\n", account.name, account.password).as_bytes())
        .await;
    c.until_tagged("a").await.last().unwrap().clone()
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    let h = harness();
    let certs = rustls::pki_types::CertificateDer::pem_file_iter(h.harness_dir.join("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(h.harness_dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(mailgate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_or_stalls_gives_unavailable() {
    // Refuses: a port with nothing listening.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused = closed.local_addr().unwrap();
    drop(closed);
    // Stalls: accepts, never greets.
    let stall = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stalled = stall.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((c, _)) = stall.accept().await {
            held.push(c);
        }
    });
    let a = account("refused", refused.to_string());
    let b = account("stalled", stalled.to_string());
    let options = Options {
        limits: "upstream_timeout = \"1s\"".into(),
        ..Options::default()
    };
    let gateway = Gateway::start_options(
        tempfile::tempdir().unwrap(),
        &[a.clone(), b.clone()],
        &options,
    )
    .await;
    let unavailable = "a NO [UNAVAILABLE] Upstream mail service unavailable, try again later";
    assert_eq!(login_reply(&gateway, &a).await, unavailable);
    let reply = tokio::time::timeout(Duration::from_secs(20), login_reply(&gateway, &b))
        .await
        .expect("a stalled upstream hung the login");
    assert_eq!(reply, unavailable);
    gateway.stop().await;
}

/// A fake IMAP upstream over TLS with the harness certificate: it greets
/// as an XOAUTH2 server, then `serve` plays the rest of each connection.
async fn fake_upstream<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(BufReader<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>) -> Fut
        + Clone
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let acceptor = tls_acceptor();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut tls = BufReader::new(tls);
                let _ = tls
                    .get_mut()
                    .write_all(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] fake\r\n")
                    .await;
                serve(tls).await;
            });
        }
    });
    address
}

/// A fake IMAP upstream over TLS that logs anyone in, answers one command,
/// then resets the connection.
async fn resetting_upstream() -> std::net::SocketAddr {
    fake_upstream(|mut tls| async move {
        let mut line = String::new();
        let _ = tls.read_line(&mut line).await; // m3 AUTHENTICATE XOAUTH2 ...
        let _ = tls
            .get_mut()
            .write_all(b"m3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
            .await;
        line.clear();
        let _ = tls.read_line(&mut line).await; // the client's first command
        let _ = tls.get_mut().write_all(b"* 1 EXISTS\r\n").await;
        // Reset: close the TCP socket without a TLS close_notify.
        let (tcp, _) = tls.into_inner().into_inner();
        // Linger 0: the kernel sends RST, as a crashed upstream would.
        #[allow(deprecated)]
        let _ = tcp.set_linger(Some(Duration::ZERO));
        drop(tcp);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_reset_mid_relay_closes_that_session_only() {
    let address = resetting_upstream().await;
    let a = account("resetting", address.to_string());
    let mut b = Account::authorized("steady", "steady@example.test");
    b.upstream = (format!("127.0.0.1:{}", harness().imaps_port), "implicit");
    harness().seed("steady@example.test");
    let gateway = Gateway::start(&[a.clone(), b.clone()]).await;
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(format!("a LOGIN {} {}\r\n", a.name, a.password).as_bytes())
        .await;
    assert!(c
        .until_tagged("a")
        .await
        .last()
        .unwrap()
        .starts_with("a OK"));
    c.send(b"b SELECT INBOX\r\n").await;
    assert_eq!(c.line().await, "* 1 EXISTS");
    // Then the upstream resets: the client's connection ends, cleanly.
    let end = tokio::time::timeout(Duration::from_secs(10), c.line())
        .await
        .expect("the relay hung after the reset");
    assert_eq!(end, "");
    // The gateway is unharmed: another session logs in and works.
    let (mut d, _) = RawClient::connect(gateway.imaps).await;
    d.send(format!("a LOGIN {} {}\r\nb SELECT INBOX\r\n", b.name, b.password).as_bytes())
        .await;
    assert!(d
        .until_tagged("a")
        .await
        .last()
        .unwrap()
        .starts_with("a OK"));
    assert!(d
        .until_tagged("b")
        .await
        .last()
        .unwrap()
        .starts_with("b OK"));
    gateway.stop().await;
}

/// A token endpoint fake that answers every request with `body` (HTTP 200,
/// JSON content type).
async fn token_endpoint(body: &'static str) -> String {
    use tokio::io::AsyncReadExt as _;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0; 16 * 1024];
                let _ = c.read(&mut buf).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = c.write_all(response.as_bytes()).await;
            });
        }
    });
    format!("http://{address}/token")
}

/// Malformed JSON is a transient failure (UNAVAILABLE, retried later); a
/// token type other than Bearer can't be used for XOAUTH2 (the account
/// needs the administrator). Neither reaches the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_non_bearer_token_responses_give_clear_answers() {
    let upstream = format!("127.0.0.1:{}", harness().imaps_port);
    let malformed = Account {
        token_url: Some(token_endpoint("{\"access_token\": ").await),
        ..account("malformed", upstream.clone())
    };
    let mac = Account {
        token_url: Some(
            token_endpoint("{\"access_token\":\"x\",\"token_type\":\"mac\",\"expires_in\":3600}")
                .await,
        ),
        ..account("mac", upstream)
    };
    let options = Options {
        oauth: "refresh_in_background = false".into(),
        ..Options::default()
    };
    let gateway = Gateway::start_options(
        tempfile::tempdir().unwrap(),
        &[malformed.clone(), mac.clone()],
        &options,
    )
    .await;
    assert_eq!(
        login_reply(&gateway, &malformed).await,
        "a NO [UNAVAILABLE] Upstream mail service unavailable, try again later"
    );
    assert_eq!(
        login_reply(&gateway, &mac).await,
        "a NO [AUTHENTICATIONFAILED] This account must be authorized again by the mailgate administrator"
    );
    let record = gateway.stored("mac").unwrap();
    assert!(record.needs_authorization.unwrap().contains("Bearer"));
    gateway.stop().await;
}

/// Microsoft's failure after a good login: an IMAP upstream that accepts
/// any XOAUTH2 token, then answers every command `BAD User is
/// authenticated but not connected.` (the real Dovecot can't).
async fn not_connected_upstream() -> std::net::SocketAddr {
    fake_upstream(|mut tls| async move {
        let mut logged_in = false;
        loop {
            let mut line = String::new();
            if tls.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let tag = line.split(' ').next().unwrap_or("*").to_owned();
            let answer = if !logged_in {
                logged_in = true;
                format!("{tag} OK [CAPABILITY IMAP4rev1] Logged in\r\n")
            } else if line.to_ascii_uppercase().contains("LOGOUT") {
                format!("* BYE\r\n{tag} OK LOGOUT completed\r\n")
            } else {
                format!("{tag} BAD User is authenticated but not connected.\r\n")
            };
            let _ = tls.get_mut().write_all(answer.as_bytes()).await;
        }
    })
    .await
}

/// Test connection goes one command past login, and names the likely
/// causes of "authenticated but not connected" for the grant in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connection_names_the_causes_of_authenticated_but_not_connected() {
    use support::cli::{config_file, mailgate};
    let upstream = not_connected_upstream().await.to_string();
    let app = account("appnc", upstream.clone());
    let delegated = Account {
        upstream: (upstream, "implicit"),
        ..Account::authorized("delegatednc", "delegated-nc@example.test")
    };
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &[app, delegated], &Options::default());
    for (name, cause) in [
        ("appnc", "New-ServicePrincipal"),
        ("delegatednc", "Full Access permission"),
    ] {
        let out = mailgate(&config).args(["test", name]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(text.contains("ok    imap xoauth2 login"), "{text}");
        let failed = text
            .lines()
            .find(|l| l.contains("FAIL  imap EXAMINE INBOX"))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(
            failed.contains("User is authenticated but not connected"),
            "{failed}"
        );
        assert!(failed.contains("the mailbox can't be opened"), "{failed}");
        assert!(failed.contains(cause), "{failed}");
    }
}
