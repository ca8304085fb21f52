//! The POP3 gateway end to end, against the harness's real Dovecot and real
//! OAuth server, with fetchmail, Python poplib and curl.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs
)] // tests may panic

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{harness, Account, Gateway, SHORT_CLIENT};

fn script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(name)
}

/// Runs pop3_client.py; returns its JSON line.
async fn poplib(
    port: u16,
    mode: &str,
    account: &Account,
    login: &str,
    extra: &[String],
) -> serde_json::Value {
    let mut cmd = Command::new("python3");
    cmd.arg(script("pop3_client.py"))
        .arg(format!("--port={port}"))
        .arg(format!("--mode={mode}"))
        .arg(format!("--cafile={}", harness().ca_file.display()))
        .arg(format!("--user={}", account.name))
        .arg(format!("--password={}", account.password))
        .arg(format!("--login={login}"))
        .args(extra);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pop3_client.py: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

/// STAT, LIST, UIDL, TOP and RETR of every message through the gateway,
/// byte-identical to the Maildir after poplib's dot-unstuffing.
async fn check_every_message(port: u16, mode: &str, account: &Account, login: &str) {
    let seeds = harness().seed_messages();
    let out = tempfile::tempdir().unwrap();
    let result = poplib(
        port,
        mode,
        account,
        login,
        &[format!("--out={}", out.path().display())],
    )
    .await;
    assert_eq!(result["login"], "OK", "{login} over {mode}: {result}");
    assert_eq!(
        result["count"].as_u64(),
        Some(seeds.len() as u64),
        "{result}"
    );
    let total: usize = seeds.iter().map(Vec::len).sum();
    assert_eq!(result["size"].as_u64(), Some(total as u64), "STAT size");
    let sizes: Vec<u64> = seeds.iter().map(|m| m.len() as u64).collect();
    assert_eq!(result["sizes"], serde_json::json!(sizes), "LIST sizes");
    assert_eq!(
        result["uidls"].as_array().map(Vec::len),
        Some(seeds.len()),
        "UIDL"
    );
    for (i, seed) in seeds.iter().enumerate() {
        let n = i + 1;
        let retr = std::fs::read(out.path().join(format!("{n}.eml"))).unwrap();
        assert!(
            retr == *seed,
            "{login} over {mode}: RETR {n} differs from the Maildir ({} vs {} bytes)",
            retr.len(),
            seed.len()
        );
        let top = std::fs::read(out.path().join(format!("{n}.top"))).unwrap();
        let header_end = seed.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(
            top,
            seed[..header_end],
            "TOP {n} 0 is the header and the blank line"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poplib_reads_every_message_over_pop3s_and_stls() {
    harness().seed("poplib@example.test");
    let account = Account {
        password: "pa ss word",
        ..Account::authorized("poplib", "poplib@example.test")
    };
    let gateway = Gateway::start(&[account.clone()]).await;
    check_every_message(gateway.pop3s.port(), "ssl", &account, "user").await;
    check_every_message(gateway.pop3s.port(), "ssl", &account, "plain").await;
    check_every_message(gateway.pop3.port(), "stls", &account, "user").await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_stls_serves_the_same_bytes() {
    let h = harness();
    h.seed("pop3stls@example.test");
    let mut account = Account::authorized("pop3stls", "pop3stls@example.test");
    account.pop3_upstream = (format!("127.0.0.1:{}", h.pop3_port), "starttls");
    let gateway = Gateway::start(&[account.clone()]).await;
    check_every_message(gateway.pop3s.port(), "ssl", &account, "user").await;
    gateway.stop().await;
}

/// Runs fetchmail (password only, certificate checked against the harness
/// CA, keep everything) against the gateway's POP3 `port`, with `tls` the
/// rc file's TLS words ("ssl" for POP3S, "sslproto tls1.2+" for STLS).
/// Returns its home (keep it alive) and the inbox the MDA wrote to, one
/// file per message.
async fn fetchmail(port: u16, account: &Account, tls: &str) -> (tempfile::TempDir, PathBuf) {
    let h = harness();
    let home = tempfile::tempdir().unwrap();
    let inbox = home.path().join("inbox");
    std::fs::create_dir(&inbox).unwrap();
    let rc = home.path().join("fetchmailrc");
    std::fs::write(
        &rc,
        format!(
            "set no syslog\nset invisible\npoll localhost with proto POP3 port {port} auth password\n  \
             user \"{user}\" there with password \"{password}\" is root here\n  \
             {tls} sslcertck sslcertfile \"{ca}\" keep fetchall\n  \
             mda \"/bin/sh -c 'cat > {inbox}/$(date +%s%N)'\"\n",
            user = account.name,
            password = account.password,
            ca = h.ca_file.display(),
            inbox = inbox.display(),
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&rc, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = Command::new("fetchmail");
    cmd.arg("--fetchmailrc")
        .arg(&rc)
        .arg("--nodetach")
        .env("FETCHMAILHOME", home.path());
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "fetchmail ({tls}) exited {:?}: {}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (home, inbox)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetchmail_downloads_every_message_with_a_password() {
    let h = harness();
    h.seed("fetchmail@example.test");
    let account = Account::authorized("fetchmail", "fetchmail@example.test");
    let gateway = Gateway::start(&[account.clone()]).await;
    // fetchmail checks DNS names only, so it connects as "localhost".
    let (_home, inbox) = fetchmail(gateway.pop3s.port(), &account, "ssl").await;
    // fetchmail hands messages to the MDA with LF line ends.
    let mut got: Vec<Vec<u8>> = std::fs::read_dir(&inbox)
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    let mut want: Vec<Vec<u8>> = h
        .seed_messages()
        .iter()
        .map(|m| {
            String::from_utf8_lossy(m)
                .replace("\r\n", "\n")
                .into_bytes()
        })
        .collect();
    got.sort();
    want.sort();
    assert_eq!(
        got.len(),
        want.len(),
        "fetchmail delivered {} of {} messages",
        got.len(),
        want.len()
    );
    assert!(got == want, "fetchmail's messages differ from the Maildir");
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_retrieves_every_message() {
    let h = harness();
    h.seed("curlpop@example.test");
    let account = Account::authorized("curlpop", "curlpop@example.test");
    let gateway = Gateway::start(&[account.clone()]).await;
    for (i, seed) in h.seed_messages().iter().enumerate() {
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--cacert"])
            .arg(&h.ca_file)
            .arg("--user")
            .arg(format!("{}:{}", account.name, account.password))
            .arg(format!(
                "pop3s://localhost:{}/{}",
                gateway.pop3s.port(),
                i + 1
            ));
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.stdout == *seed, "curl RETR {}: bytes differ", i + 1);
    }
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dele_then_quit_removes_upstream_and_dele_then_drop_does_not() {
    let h = harness();
    h.seed("dele@example.test");
    let account = Account::authorized("dele", "dele@example.test");
    let gateway = Gateway::start(&[account.clone()]).await;
    let before = h.maildir_count("dele@example.test");
    let dropped = poplib(
        gateway.pop3s.port(),
        "ssl",
        &account,
        "user",
        &["--dele=1".into(), "--drop".into()],
    )
    .await;
    assert_eq!(dropped["login"], "OK");
    // Dovecot expunges only on QUIT (RFC 1939 §6); give it a moment to see
    // the dropped connection, then check nothing went.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.maildir_count("dele@example.test"),
        before,
        "DELE without QUIT removed a message"
    );
    let quit = poplib(
        gateway.pop3s.port(),
        "ssl",
        &account,
        "user",
        &["--dele=1".into()],
    )
    .await;
    assert_eq!(quit["login"], "OK");
    assert_eq!(
        h.maildir_count("dele@example.test"),
        before - 1,
        "DELE then QUIT kept the message"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_refused_with_auth_code_and_no_upstream_traffic() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    tokio::spawn(async move {
        while let Ok((c, _)) = listener.accept().await {
            seen.fetch_add(1, SeqCst);
            drop(c);
        }
    });
    let account = Account {
        grant: "client_credentials",
        refresh_token: None,
        pop3_upstream: (addr.to_string(), "implicit"),
        token_url: Some(format!("http://{addr}/token")),
        ..Account::authorized("popvictim", "popvictim@example.test")
    };
    // No background refresh: only logins may cause token requests here.
    let gateway = Gateway::start_with(&[account.clone()], "refresh_in_background = false").await;
    let wrong = Account {
        password: "wrong",
        ..account.clone()
    };
    for login in ["user", "plain"] {
        let result = poplib(gateway.pop3s.port(), "ssl", &wrong, login, &[]).await;
        assert_eq!(result["login"], "ERR");
        assert_eq!(
            result["error"], "-ERR [AUTH] Authentication failed",
            "{result}"
        );
    }
    assert_eq!(
        hits.load(SeqCst),
        0,
        "a failed local login caused OAuth or upstream traffic"
    );
    // Control: the right password reaches the (fake) token endpoint.
    let result = poplib(gateway.pop3s.port(), "ssl", &account, "user", &[]).await;
    assert!(
        result["error"]
            .as_str()
            .unwrap()
            .starts_with("-ERR [SYS/TEMP]"),
        "{result}"
    );
    assert!(hits.load(SeqCst) > 0);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_revoked_tokens_are_handled_as_for_imap() {
    let h = harness();
    h.seed("popshort@example.test");
    // Expired: 5 s access tokens, a second session after 6 s.
    let grant = h.authorize(SHORT_CLIENT, "popshort@example.test");
    let short = Account {
        client: SHORT_CLIENT,
        refresh_token: Some(grant.refresh_token),
        ..Account::authorized("popshort", "popshort@example.test")
    };
    let gateway = Gateway::start(&[short.clone()]).await;
    assert_eq!(
        poplib(gateway.pop3s.port(), "ssl", &short, "user", &[]).await["login"],
        "OK"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        poplib(gateway.pop3s.port(), "ssl", &short, "user", &[]).await["login"],
        "OK"
    );
    gateway.stop().await;

    // Revoked: the stored access token is revoked at the OAuth server; the
    // gateway gets a fresh one. Then the grant dies: a clean -ERR.
    let old = h.authorize(support::CLIENT, "popshort@example.test");
    let grant = h.authorize(support::CLIENT, "popshort@example.test");
    let account = Account {
        refresh_token: None,
        ..Account::authorized("poprev", "popshort@example.test")
    };
    let stored = support::Grant {
        access_token: old.access_token.clone(),
        refresh_token: grant.refresh_token.clone(),
    };
    let gateway = Gateway::start_with_store(&[account.clone()], "poprev", &stored).await;
    h.revoke(support::CLIENT, &old.access_token, "access_token")
        .await;
    assert_eq!(
        poplib(gateway.pop3s.port(), "ssl", &account, "user", &[]).await["login"],
        "OK"
    );
    let rotated = gateway.stored_refresh_token("poprev").unwrap();
    h.revoke(support::CLIENT, &rotated, "refresh_token").await;
    let result = poplib(gateway.pop3s.port(), "ssl", &account, "user", &[]).await;
    assert_eq!(
        result["error"],
        "-ERR [SYS/PERM] This account must be authorized again by the mailgate administrator",
        "{result}"
    );
    gateway.stop().await;
}

/// Dovecot runs with `pop3_lock_session = yes`: a second session on a
/// mailbox is refused with [IN-USE], and the client hears it as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_mailbox_is_reported_in_use() {
    harness().seed("locked@example.test");
    let account = Account::authorized("locked", "locked@example.test");
    let gateway = Gateway::start(&[account.clone()]).await;
    let (mut first, greeting) = support::RawClient::connect(gateway.pop3s).await;
    assert!(greeting.starts_with("+OK"), "{greeting}");
    first
        .send(format!("USER {}\r\nPASS {}\r\n", account.name, account.password).as_bytes())
        .await;
    assert!(first.line().await.starts_with("+OK"));
    assert_eq!(first.line().await, "+OK Logged in");
    let second = poplib(gateway.pop3s.port(), "ssl", &account, "user", &[]).await;
    assert_eq!(second["error"], "-ERR [IN-USE] Mailbox in use", "{second}");
    first.send(b"QUIT\r\n").await;
    assert!(first.line().await.starts_with("+OK"));
    gateway.stop().await;
}

/// The upstream refuses every token for this mailbox: one refresh, then a
/// clean -ERR [AUTH], checked at the byte level (poplib would take the
/// provider's "+" challenge for success).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_a_fresh_token_too_gives_auth() {
    let account = Account {
        mailbox: "somebody-else@example.test".into(),
        ..Account::authorized("popmismatch", "popmismatch@example.test")
    };
    let gateway = Gateway::start(&[account.clone()]).await;
    let (mut c, greeting) = support::RawClient::connect(gateway.pop3s).await;
    assert!(greeting.starts_with("+OK"));
    c.send(format!("USER {}\r\nPASS {}\r\n", account.name, account.password).as_bytes())
        .await;
    assert_eq!(c.line().await, "+OK Send PASS");
    assert_eq!(c.line().await, "-ERR [AUTH] Authentication failed");
    c.send(b"QUIT\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    gateway.stop().await;
}

/// fetchmail and curl through the STLS listener; curl with AUTH LOGIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stls_clients_and_auth_login() {
    let h = harness();
    h.seed("popstls@example.test");
    let account = Account::authorized("popstls", "popstls@example.test");
    let gateway = Gateway::start(&[account.clone()]).await;
    let seeds = h.seed_messages();
    for (url, options) in [
        (format!("pop3://localhost:{}/1", gateway.pop3.port()), None),
        (
            format!("pop3s://localhost:{}/1", gateway.pop3s.port()),
            Some("AUTH=LOGIN"),
        ),
        (
            format!("pop3s://localhost:{}/1", gateway.pop3s.port()),
            Some("AUTH=PLAIN"),
        ),
    ] {
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--ssl-reqd", "--cacert"])
            .arg(&h.ca_file)
            .arg("--user")
            .arg(format!("{}:{}", account.name, account.password))
            .arg(&url);
        if let Some(o) = options {
            cmd.args(["--login-options", o]);
        }
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "curl {url} {options:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout == seeds[0],
            "curl {url} {options:?}: bytes differ"
        );
    }
    let (_home, inbox) = fetchmail(gateway.pop3.port(), &account, "sslproto tls1.2+").await;
    assert_eq!(std::fs::read_dir(&inbox).unwrap().count(), seeds.len());
    gateway.stop().await;
}
