//! The listener certificate: without PEM files, a self-signed certificate
//! is made once, kept in the state directory, and its fingerprint logged.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs,
    clippy::result_large_err
)] // tests may panic

use std::process::{Command, Stdio};

use figment::providers::{Format as _, Toml};
use mailgate::config::Config;

fn config(state: &std::path::Path) -> Config {
    let toml = format!(
        "state_dir = \"{}\"\n[[listeners]]\nprotocol = \"imap\"\naddress = \"127.0.0.1:0\"\ntls = \"implicit\"\n",
        state.display()
    );
    Config::from_figment(figment::Figment::new().merge(Toml::string(&toml))).unwrap()
}

/// The SHA-256 fingerprint of the certificate a TLS server presents, as
/// OpenSSL's command-line client reports it.
fn served_fingerprint(addr: std::net::SocketAddr) -> String {
    let mut s_client = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    let x509 = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256"])
        .stdin(s_client.stdout.take().unwrap())
        .output()
        .expect("openssl x509");
    s_client.wait().unwrap();
    let out = String::from_utf8(x509.stdout).unwrap();
    out.trim()
        .rsplit_once('=')
        .expect("fingerprint line")
        .1
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_certificate_is_made_once_and_kept_across_restarts() {
    use std::os::unix::fs::PermissionsExt as _;
    let state = tempfile::tempdir().unwrap();
    let first = mailgate::app::start(config(state.path())).await.unwrap();
    let addr = first.addresses[0];
    let fingerprint = first.fingerprint.clone();
    let served = tokio::task::spawn_blocking(move || served_fingerprint(addr))
        .await
        .unwrap();
    assert_eq!(
        served, fingerprint,
        "the logged fingerprint is the served certificate's"
    );
    first.stop(std::time::Duration::from_secs(1)).await;
    let key = state.path().join("tls/self-signed.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let second = mailgate::app::start(config(state.path())).await.unwrap();
    assert_eq!(
        second.fingerprint, fingerprint,
        "a restart keeps the certificate"
    );
    second.stop(std::time::Duration::from_secs(1)).await;
}

/// The cipher suite OpenSSL's client ends up with, offering `suites` (in
/// its order of preference).
fn negotiated_suite(addr: std::net::SocketAddr, suites: &str) -> String {
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-ciphersuites",
            suites,
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.split_once("Cipher is ").map(|(_, s)| s.trim().to_owned()))
        .unwrap_or_else(|| panic!("no cipher line in: {text}"))
}

/// The listeners pick AES-128-GCM even for a client that asks for AES-256
/// first (OpenSSL's default order): cheaper handshakes (SHA-256 has a
/// hardware path, SHA-384 hasn't) and cheaper bytes. A client that offers
/// only AES-256 or ChaCha20 still gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_prefer_aes_128_gcm_and_still_accept_the_others() {
    let state = tempfile::tempdir().unwrap();
    let running = mailgate::app::start(config(state.path())).await.unwrap();
    let addr = running.addresses[0];
    let cases = [
        (
            "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256",
            "TLS_AES_128_GCM_SHA256",
        ),
        ("TLS_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384"),
        (
            "TLS_CHACHA20_POLY1305_SHA256",
            "TLS_CHACHA20_POLY1305_SHA256",
        ),
    ];
    for (offered, expected) in cases {
        let suite = tokio::task::spawn_blocking(move || negotiated_suite(addr, offered))
            .await
            .unwrap();
        assert_eq!(suite, expected, "offered {offered}");
    }
    running.stop(std::time::Duration::from_secs(1)).await;
}
