//! Corporate networks: a real HTTP proxy (Debian's tinyproxy) on loopback
//! carries the token requests and CONNECT tunnels to the upstreams, with
//! TLS verified end to end inside them, and mail reads back byte for byte;
//! a proxy that refuses is named in Test connection and `status`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs
)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use support::cli::{config_file, mailgate};
use support::{free_port, harness, Account, Gateway, Options, RawClient};

/// A tinyproxy on loopback, stopped (by its pid) when dropped.
struct Tinyproxy {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Tinyproxy {
    /// `allow`: the client address it serves (others get 403).
    async fn start(allow: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 60\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 200\nAllow {allow}\n",
                dir.path().join("log").display()
            ),
        )
        .unwrap();
        let mut child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy (Debian package tinyproxy, installed by tests/harness/setup)");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Self { child, port, dir };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("tinyproxy did not start");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_and_mail_go_through_a_real_proxy_byte_for_byte() {
    let h = harness();
    h.seed("proxied-mail@example.test");
    let proxy = Tinyproxy::start("127.0.0.1").await;
    let account = Account::authorized("viaproxy", "proxied-mail@example.test");
    let options = Options {
        top: format!(
            "[network]\nproxy = \"{0}\"\nmail_proxy = \"{0}\"\n",
            proxy.url()
        ),
        limits: "upstream_spare_for = \"0s\"".into(),
        ..Options::default()
    };
    let gateway =
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await;
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(format!("a LOGIN {} \"{}\"\r\n", account.name, account.password).as_bytes())
        .await;
    assert!(c
        .until_tagged("a")
        .await
        .last()
        .unwrap()
        .starts_with("a OK"));
    c.send(b"s SELECT INBOX\r\n").await;
    let _ = c.until_tagged("s").await;
    // Every seed message, through the tunnel, byte for byte.
    for (i, expected) in h.seed_messages().iter().enumerate() {
        c.send(format!("f{i} FETCH {} (BODY.PEEK[])\r\n", i + 1).as_bytes())
            .await;
        let body = c.literal().await;
        assert_eq!(body.len(), expected.len());
        assert!(body == *expected, "message {} differs", i + 1);
        let _ = c.until_tagged(&format!("f{i}")).await;
    }
    c.send(b"z LOGOUT\r\n").await;
    let _ = c.until_tagged("z").await;
    let log = proxy.log();
    assert!(
        log.contains("Request (file descriptor") && log.contains("/token HTTP/1.1"),
        "no token request in the proxy's log:\n{log}"
    );
    assert!(
        log.contains(&format!("CONNECT 127.0.0.1:{} HTTP/1.1", h.imaps_port)),
        "no tunnel in the proxy's log:\n{log}"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_environment_s_proxy_serves_token_requests() {
    let proxy = Tinyproxy::start("127.0.0.1").await;
    let account = Account::authorized("envproxy", "env-proxy@example.test");
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &[account], &Options::default());
    // `test` makes a token request first; HTTP_PROXY carries it (the
    // harness's token endpoint is http://).
    let out = mailgate(&config)
        .args(["test", "envproxy"])
        .env("HTTP_PROXY", proxy.url())
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ok    token"), "{text}");
    assert!(proxy.log().contains("/token HTTP/1.1"), "{}", proxy.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_that_refuses_is_named_in_test_connection_and_status() {
    let serving = Tinyproxy::start("127.0.0.1").await;
    // Serves only 127.0.0.2: mailgate, on 127.0.0.1, gets 403 for all.
    let refusing = Tinyproxy::start("127.0.0.2").await;
    let account = Account::authorized("refused", "refused-proxy@example.test");
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        top: format!(
            "[network]\nproxy = \"{}\"\nmail_proxy = \"{}\"\n",
            serving.url(),
            refusing.url()
        ),
        ..Options::default()
    };
    let config = config_file(dir.path(), &[account.clone()], &options);
    let out = mailgate(&config)
        .args(["test", "refused"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let failed = text
        .lines()
        .find(|l| l.contains("FAIL  imap connect"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        failed.contains(&format!("proxy {}: refused the tunnel", refusing.url()))
            && failed.contains("403"),
        "{failed}"
    );
    // The token endpoint through the refusing proxy: `status` names it.
    let options = Options {
        top: format!("[network]\nproxy = \"{}\"\n", refusing.url()),
        ..Options::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &[account], &options);
    let out = mailgate(&config)
        .args(["test", "refused"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("through proxy {}", refusing.url())),
        "{text}"
    );
    let out = mailgate(&config).arg("status").output().unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains(&format!("through proxy {}", refusing.url())),
        "{status}"
    );
    assert!(
        !status.contains("needs authorization"),
        "a proxy's refusal marked the account: {status}"
    );
}
