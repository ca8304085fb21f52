//! Load: 2,000 concurrent sessions through mailgate to the harness's
//! Dovecot (many sessions per Dovecot process), all logging in and
//! fetching, with no errors, exactly one token request per account, and
//! bounded memory. Counts and limits, not timings.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs
)] // tests may panic

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use support::{harness, Account, Gateway, Options, RawClient};

const SESSIONS: usize = 2_000;
const ACCOUNTS: usize = 20;

/// A proxy in front of the real token endpoint that counts HTTP requests.
async fn counting_token_proxy() -> (String, Arc<AtomicUsize>) {
    let h = harness();
    let target: std::net::SocketAddr = h
        .oauth_issuer
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let path = h.oauth_token_url.splitn(4, '/').nth(3).unwrap().to_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(upstream) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                let to_server = async move {
                    let mut buf = vec![0; 16 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        // Each request starts with its request line.
                        seen.fetch_add(
                            buf[..n].windows(5).filter(|w| w == b"POST ").count(),
                            SeqCst,
                        );
                        if uw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let to_client = async move {
                    let _ = tokio::io::copy(&mut ur, &mut cw).await;
                };
                tokio::join!(to_server, to_client);
            });
        }
    });
    (format!("http://{address}/{path}"), requests)
}

fn resident_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_sessions_log_in_and_fetch() {
    let h = harness();
    let (token_url, token_requests) = counting_token_proxy().await;
    let names: Vec<&'static str> = (0..ACCOUNTS)
        .map(|i| &*Box::leak(format!("load{i}").into_boxed_str()))
        .collect();
    let accounts: Vec<Account> = names
        .iter()
        .map(|name| {
            let mailbox = format!("{name}@example.test");
            h.seed(&mailbox);
            Account {
                token_url: Some(token_url.clone()),
                ..Account::authorized(name, &mailbox)
            }
        })
        .collect();
    let options = Options {
        // All sessions come from 127.0.0.1 at once.
        limits: format!("max_pre_login_per_ip = {}", SESSIONS * 2),
        cheap_hashes: true,
        ..Options::default()
    };
    let gateway =
        Arc::new(Gateway::start_options(tempfile::tempdir().unwrap(), &accounts, &options).await);
    let before = resident_kib();
    let first = h.seed_messages()[0].clone();
    // Every session logs in, fetches, then waits until all are open.
    let all_open = Arc::new(tokio::sync::Barrier::new(SESSIONS + 1));
    let mut sessions = tokio::task::JoinSet::new();
    for i in 0..SESSIONS {
        let (gateway, account, all_open, first) = (
            gateway.clone(),
            accounts[i % ACCOUNTS].clone(),
            all_open.clone(),
            first.clone(),
        );
        sessions.spawn(async move {
            let (mut c, greeting) = RawClient::connect(gateway.imaps).await;
            assert!(greeting.starts_with("* OK"), "{greeting}");
            c.send(
                format!(
                    "a LOGIN {} {}\r\nb SELECT INBOX\r\nc FETCH 1 (BODY.PEEK[])\r\n",
                    account.name, account.password
                )
                .as_bytes(),
            )
            .await;
            let login = c.until_tagged("a").await;
            assert!(
                login.last().unwrap().starts_with("a OK"),
                "session {i}: {login:?}"
            );
            assert!(c
                .until_tagged("b")
                .await
                .last()
                .unwrap()
                .starts_with("b OK"));
            assert_eq!(c.literal().await, first);
            assert!(c
                .until_tagged("c")
                .await
                .last()
                .unwrap()
                .starts_with("c OK"));
            all_open.wait().await;
            c.send(b"d LOGOUT\r\n").await;
            let _ = c.until_tagged("d").await;
        });
    }
    all_open.wait().await;
    let peak = resident_kib();
    while let Some(result) = sessions.join_next().await {
        result.unwrap();
    }
    assert_eq!(
        token_requests.load(SeqCst),
        ACCOUNTS,
        "token requests for {ACCOUNTS} accounts"
    );
    // Bounded: the whole test process (2,000 client sessions and the
    // gateway's 4,000 TLS legs) grew by less than 1 MiB per session.
    let growth = peak.saturating_sub(before);
    assert!(
        growth < (SESSIONS as u64) * 1024,
        "resident memory grew by {growth} KiB for {SESSIONS} sessions"
    );
    eprintln!("resident memory: {before} KiB before, {peak} KiB with {SESSIONS} sessions open");
}
