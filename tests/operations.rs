//! Operations: metrics (checked with promtool), health and readiness,
//! structured logs with no secret in them, SIGHUP reload, and graceful
//! SIGTERM/SIGINT, with the real binary where signals are involved.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs
)] // tests may panic

mod support;

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{config_toml, free_port, harness, Account, Gateway, Options, Process, RawClient};

async fn login(addr: std::net::SocketAddr, account: &Account, tag: &str) -> (RawClient, String) {
    let (mut c, _) = RawClient::connect(addr).await;
    c.send(format!("{tag} LOGIN {} \"{}\"\r\n", account.name, account.password).as_bytes())
        .await;
    let reply = c.until_tagged(tag).await.last().unwrap().clone();
    (c, reply)
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus, installed by tests/harness/setup)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_after_real_traffic_pass_promtool_and_health_endpoints_answer() {
    harness().seed("metrics@example.test");
    let account = Account::authorized("metrics", "metrics@example.test");
    let never = Account {
        refresh_token: None,
        ..Account::authorized_without_grant("never", "never@example.test")
    };
    let port = free_port();
    let options = Options {
        http_port: Some(port),
        ..Options::default()
    };
    let gateway = Gateway::start_options(
        tempfile::tempdir().unwrap(),
        &[account.clone(), never],
        &options,
    )
    .await;
    let (mut c, reply) = login(gateway.imaps, &account, "a").await;
    assert!(reply.starts_with("a OK"));
    c.send(b"b SELECT INBOX\r\nc FETCH 1 (BODY.PEEK[])\r\nd LOGOUT\r\n")
        .await;
    let _ = c.until_tagged("d").await;
    // The relay ends, and its bytes are counted, when both sides close.
    drop(c);
    let wrong = Account {
        password: "wrong",
        ..account.clone()
    };
    let (_c, reply) = login(gateway.imaps, &wrong, "a").await;
    assert!(reply.starts_with("a NO"));
    // A TLS handshake that fails.
    let mut raw = tokio::net::TcpStream::connect(gateway.imaps).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw, b"not tls at all\r\n")
        .await
        .unwrap();
    drop(raw);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let base = format!("http://127.0.0.1:{port}");
    let scrape = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "mailgate_connections_accepted_total{listener=",
        "mailgate_connections_active{",
        "mailgate_logins_total{outcome=\"ok\",protocol=\"imap\"} 1",
        "mailgate_logins_total{outcome=\"bad_credentials\",protocol=\"imap\"} 1",
        "mailgate_upstream_connect_seconds_bucket{protocol=\"imap\"",
        "mailgate_upstream_login_seconds_count{protocol=\"imap\"} 1",
        "mailgate_token_requests_total{grant=\"refresh_token\",integration=\"metrics\",outcome=\"ok\"}",
        "mailgate_token_expiry_seconds{account=\"metrics\"}",
        "mailgate_account_needs_authorization{account=\"never\"} 1",
        "mailgate_account_needs_authorization{account=\"metrics\"} 0",
        "mailgate_relayed_bytes_total{direction=\"upstream_to_client\"}",
        "mailgate_tls_handshake_failures_total{protocol=\"imap\"} 1",
        "process_resident_memory_bytes",
    ] {
        assert!(scrape.contains(needle), "{needle} missing from:\n{scrape}");
    }
    let (ok, out) = promtool(&["check", "metrics"], Some(&scrape));
    assert!(ok, "promtool check metrics: {out}");

    assert_eq!(
        reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .status(),
        200
    );
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["ready"], true);
    assert_eq!(body["needs_authorization"][0]["account"], "never");
    assert_eq!(
        body["needs_authorization"][0]["fix"],
        "mailgate authorize never"
    );
    gateway.stop().await;
}

#[test]
fn alert_rules_pass_promtool() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/alerts.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "promtool check rules: {out}");
    // Every rule in the file was read.
    let written = std::fs::read_to_string(&rules)
        .unwrap()
        .matches("- alert:")
        .count();
    assert!(written >= 8, "{written} rules");
    assert!(
        out.contains(&format!("SUCCESS: {written} rules found")),
        "{out}"
    );
}

/// Full sessions, then the whole log is searched for every secret the
/// test used; the JSON log has one summary event per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_hold_one_summary_per_connection_and_no_secret() {
    let h = harness();
    h.seed("logs@example.test");
    let grant = h.authorize(support::CLIENT, "logs@example.test");
    let account = Account {
        refresh_token: Some(grant.refresh_token.clone()),
        ..Account::authorized_without_grant("logs", "logs@example.test")
    };
    let mut process = Process::start(
        &[account.clone()],
        "[log]\nformat = \"json\"\nlevel = \"debug\"",
    )
    .await;
    let (mut c, reply) = login(process.imaps, &account, "a").await;
    assert!(reply.starts_with("a OK"), "{reply}");
    c.send(b"b SELECT INBOX\r\nc LOGOUT\r\n").await;
    let _ = c.until_tagged("c").await;
    drop(c);
    let (mut p, _) = RawClient::connect(process.pop3s).await;
    p.send(format!("USER logs\r\nPASS {}\r\nSTAT\r\nQUIT\r\n", account.password).as_bytes())
        .await;
    for _ in 0..4 {
        p.line().await;
    }
    drop(p);
    let (c, reply) = login(
        process.imaps,
        &Account {
            password: "wrong-password-123",
            ..account.clone()
        },
        "a",
    )
    .await;
    assert!(reply.starts_with("a NO"));
    drop(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    process.signal("TERM");
    let state_dir = process.config.parent().unwrap().to_path_buf();
    let code = process.exit_code().await;
    assert_eq!(code, Some(0));
    let log = std::fs::read_to_string(state_dir.join("log")).unwrap();
    // The tokens mailgate got itself, from its store.
    let record = support::store(&state_dir)
        .load_record("logs")
        .unwrap()
        .unwrap();
    let mut secrets = vec![
        record.access_token.clone().unwrap(),
        record.refresh_token.clone().unwrap(),
        account.password.to_owned(),
        "wrong-password-123".to_owned(),
        support::CLIENT.secret.to_owned(),
        grant.refresh_token.clone(),
        grant.access_token.clone(),
    ];
    secrets.retain(|s| !s.is_empty());
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "a secret is in the log");
    }
    let summaries: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "connection closed")
        .collect();
    assert_eq!(summaries.len(), 3, "one summary per connection:\n{log}");
    let relayed: Vec<_> = summaries
        .iter()
        .filter(|s| s["fields"]["outcome"] == "relayed")
        .collect();
    assert_eq!(relayed.len(), 2);
    for s in relayed {
        assert_eq!(s["fields"]["account"], "logs");
        assert!(s["fields"]["bytes_from_upstream"].as_u64().unwrap() > 0);
        assert!(s["fields"]["duration_ms"].is_u64(), "{s}");
        // LOGOUT / QUIT, then a drop without close_notify: a normal end.
        assert_eq!(s["fields"]["error_kind"], "none", "{s}");
        assert_eq!(s["fields"]["blame"], "none", "{s}");
    }
    // The wrong password, then a hang-up: the client's doing, and why its
    // login failed.
    let refused = summaries
        .iter()
        .find(|s| s["fields"]["outcome"] == "closed_before_login")
        .expect("the refused connection's summary");
    assert_eq!(refused["fields"]["error_kind"], "client_gone", "{refused}");
    assert_eq!(refused["fields"]["blame"], "client", "{refused}");
    assert_eq!(
        refused["fields"]["login_failure"], "bad_credentials",
        "{refused}"
    );
}

/// SIGHUP: a relayed session survives, a new account works, and an invalid
/// config is refused with the old one kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_accounts_without_dropping_sessions() {
    let h = harness();
    h.seed("hup@example.test");
    h.seed("hupnew@example.test");
    let first = Account::authorized("hup", "hup@example.test");
    let mut process = Process::start(&[first.clone()], "").await;
    let (mut relayed, reply) = login(process.imaps, &first, "a").await;
    assert!(reply.starts_with("a OK"));
    relayed.send(b"b SELECT INBOX\r\n").await;
    assert!(relayed
        .until_tagged("b")
        .await
        .last()
        .unwrap()
        .starts_with("b OK"));

    let second = Account::authorized("hupnew", "hupnew@example.test");
    let text = std::fs::read_to_string(&process.config).unwrap();
    let dir = process.config.parent().unwrap().to_path_buf();
    let added = config_toml(&dir, &[first.clone(), second.clone()], &Options::default());
    // Keep the listener section of the running config; add the account.
    let accounts_start = added.find("\n[integrations.").unwrap();
    let head_end = text.find("\n[integrations.").unwrap();
    std::fs::write(
        &process.config,
        format!("{}{}", &text[..head_end], &added[accounts_start..]),
    )
    .unwrap();
    process.signal("HUP");
    process.wait_for_log("configuration reloaded").await;
    let (c2, reply) = login(process.imaps, &second, "a").await;
    assert!(reply.starts_with("a OK"), "the new account: {reply}");
    drop(c2);
    relayed.send(b"c NOOP\r\n").await;
    assert!(
        relayed
            .until_tagged("c")
            .await
            .last()
            .unwrap()
            .starts_with("c OK"),
        "the relayed session was dropped"
    );

    std::fs::write(&process.config, "this is not = [valid").unwrap();
    process.signal("HUP");
    process.wait_for_log("the old configuration stays").await;
    let (c3, reply) = login(process.imaps, &second, "a").await;
    assert!(reply.starts_with("a OK"), "after a bad reload: {reply}");
    drop(c3);
    relayed.send(b"d LOGOUT\r\n").await;
    let _ = relayed.until_tagged("d").await;
    drop(relayed);
    process.signal("INT");
    assert_eq!(process.exit_code().await, Some(0));
}

/// SIGTERM: no new connections, BYE / -ERR to sessions not logged in, the
/// relayed session may finish, then exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_says_goodbye_and_lets_relayed_sessions_finish() {
    harness().seed("term@example.test");
    let account = Account::authorized("term", "term@example.test");
    let mut process = Process::start(&[account.clone()], "").await;
    let (mut relayed, reply) = login(process.imaps, &account, "a").await;
    assert!(reply.starts_with("a OK"));
    let (mut waiting_imap, greeting) = RawClient::connect(process.imaps).await;
    assert!(greeting.starts_with("* OK"));
    let (mut waiting_pop3, greeting) = RawClient::connect(process.pop3s).await;
    assert!(greeting.starts_with("+OK"));
    process.signal("TERM");
    assert_eq!(waiting_imap.line().await, "* BYE mailgate shutting down");
    assert_eq!(
        waiting_pop3.line().await,
        "-ERR [SYS/TEMP] mailgate shutting down"
    );
    process.wait_for_log("shutting down").await;
    // New connections are refused now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(process.imaps).await.is_err(),
        "still accepting after SIGTERM"
    );
    // The relayed session still works, and ends on its own terms.
    relayed.send(b"b SELECT INBOX\r\n").await;
    assert!(relayed
        .until_tagged("b")
        .await
        .last()
        .unwrap()
        .starts_with("b OK"));
    relayed.send(b"c LOGOUT\r\n").await;
    let _ = relayed.until_tagged("c").await;
    drop(relayed);
    assert_eq!(process.exit_code().await, Some(0));
}

/// The established TCP connections of process `pid` with `filter` (an
/// `ss` expression), as `ss` shows them with their timers.
fn sockets(pid: u32, filter: &str) -> Vec<String> {
    let out = Command::new("ss")
        .args(["-tnopH", "state", "established"])
        .arg(filter)
        .output()
        .expect("ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("pid={pid},")))
        .map(str::to_owned)
        .collect()
}

/// Both legs of a relayed session carry TCP keepalive by default (NATs
/// and Azure's load balancer drop flows idle for 4 minutes), and
/// `limits.tcp_keepalive = "0s"` turns it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_sessions_keep_both_legs_alive() {
    let h = harness();
    h.seed("keepalive@example.test");
    for (limits, wanted) in [("", true), ("tcp_keepalive = \"0s\"", false)] {
        // A grant each: the first process rotates its refresh token.
        let account = Account::authorized("keepalive", "keepalive@example.test");
        let options = Options {
            limits: format!("upstream_spare_for = \"0s\"\n{limits}"),
            ..Options::default()
        };
        let mut process = Process::start_options(&[account.clone()], &options).await;
        let pid = process.child.id();
        let (c, reply) = login(process.imaps, &account, "a").await;
        assert!(reply.starts_with("a OK"), "{reply}");
        // `ss` shows one timer: wait until no retransmission timer hides
        // the keepalive one (the last bytes acknowledged).
        let settled = |filter: String| async move {
            for _ in 0..50 {
                let legs = sockets(pid, &filter);
                if legs.iter().all(|l| !l.contains("timer:(on,")) {
                    return legs;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            sockets(pid, &filter)
        };
        let client_leg = settled(format!("( sport = :{} )", process.imaps.port())).await;
        let upstream_leg = settled(format!("( dport = :{} )", h.imaps_port)).await;
        assert_eq!(client_leg.len(), 1, "{client_leg:?}");
        assert_eq!(upstream_leg.len(), 1, "{upstream_leg:?}");
        for leg in [&client_leg[0], &upstream_leg[0]] {
            assert_eq!(leg.contains("timer:(keepalive,"), wanted, "{leg}");
        }
        drop(c);
        process.signal("KILL");
        let _ = process.exit_code().await;
    }
}
