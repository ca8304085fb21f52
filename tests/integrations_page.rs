//! The integrations page in a real headless Chromium (Debian's, driven by
//! playwright-core: tests/harness/browser/page.mjs), against the harness's
//! real OAuth server and Dovecot: authorize, Test connection, a revoked
//! grant, a refused authorization. Screenshots of every step land in
//! target/test-artifacts/integrations-page/. Plus the page's protections,
//! checked over raw HTTP: loopback only by default, the admin credential,
//! CSRF, the Host check and the security headers.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::{free_port, harness, Account, Gateway, Options, CLIENT};

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts/integrations-page")
}

/// Runs one browser scenario; returns what the page showed (page.mjs's JSON).
async fn browser(
    scenario: &str,
    url: &str,
    account: &str,
    secrets: &[String],
) -> serde_json::Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/harness/browser/page.mjs");
    let mut cmd = Command::new("node");
    cmd.arg(script)
        .args([scenario, url, account])
        .arg(screenshots())
        .env("MAILGATE_SECRETS", secrets.join("\n"));
    let output = tokio::task::spawn_blocking(move || cmd.output().expect("node runs"))
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "browser scenario {scenario} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("page.mjs prints JSON")
}

fn unauthorized(name: &'static str, mailbox: &str) -> Account {
    Account {
        refresh_token: None,
        ..Account::authorized_without_grant(name, mailbox)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_test_and_revoke_in_a_real_browser() {
    let h = harness();
    h.seed("page@example.test");
    let port = free_port();
    let options = Options {
        http_port: Some(port),
        ..Options::default()
    };
    let account = unauthorized("page", "page@example.test");
    let gateway = Gateway::start_options(tempfile::tempdir().unwrap(), &[account], &options).await;
    let url = format!("http://127.0.0.1:{port}/");
    let secrets = vec![CLIENT.secret.to_owned()];

    let seen = browser("authorize-and-test", &url, "page", &secrets).await;
    // The browser went to the OAuth server and came back through the
    // redirect URL, which the page showed and copied.
    let redirect = seen["redirectUrl"].as_str().unwrap();
    assert!(redirect.starts_with(&format!("http://127.0.0.1:{port}/oauth2/callback/page-")));
    let visited: Vec<&str> = seen["visited"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(visited.contains(&h.oauth_auth_url.as_str()), "{visited:?}");
    // The tokens are in the store, and every step of the test passed.
    let stored = gateway.stored("page").expect("tokens stored");
    let refresh = stored.refresh_token.clone().expect("a refresh token");
    let names: Vec<&str> = seen["test"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "token",
            "imap connect",
            "imap xoauth2 login",
            "imap EXAMINE INBOX",
            "imap logout",
            "pop3 connect",
            "pop3 xoauth2 login",
            "pop3 STAT",
            "pop3 logout",
            // The account has an SMTP upstream too (the harness Postfix).
            "smtp connect",
            "smtp xoauth2 login",
            "smtp EHLO",
            "smtp logout"
        ]
    );

    // Revoke the grant at the OAuth server: Test connection now fails at
    // the token step, and the page asks for authorization.
    h.revoke(CLIENT, &refresh, "refresh_token").await;
    let mut secrets = secrets;
    secrets.push(refresh.clone());
    if let Some(access) = &stored.access_token {
        secrets.push(access.clone());
    }
    let seen = browser("revoked", &url, "page", &secrets).await;
    let token_step = &seen["test"]["steps"][0];
    assert!(
        token_step["text"]
            .as_str()
            .unwrap()
            .contains("invalid_grant"),
        "{token_step}"
    );
    assert!(gateway
        .stored("page")
        .unwrap()
        .needs_authorization
        .is_some());
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_authorization_comes_back_explained() {
    let port = free_port();
    let options = Options {
        http_port: Some(port),
        ..Options::default()
    };
    // The harness's OAuth server refuses this user with access_denied.
    let account = unauthorized("refused", "deny@example.test");
    let gateway = Gateway::start_options(tempfile::tempdir().unwrap(), &[account], &options).await;
    let url = format!("http://127.0.0.1:{port}/");
    let seen = browser("denied", &url, "refused", &[]).await;
    assert!(
        seen["outcome"]
            .as_str()
            .unwrap()
            .contains("refused by the test harness"),
        "{seen}"
    );
    assert!(gateway
        .stored("refused")
        .and_then(|r| r.refresh_token)
        .is_none());
    gateway.stop().await;
}

/// The CSRF token in the page's forms.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a form") + 19;
    page[at..].split('"').next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_checks_host_csrf_and_the_admin_password_and_sends_security_headers() {
    mailgate::tls::install_default_provider();
    let port = free_port();
    let admin_hash = support::password_hash("admin-pw");
    let options = Options {
        http_port: Some(port),
        ..Options::default()
    };
    // Not authorized: Test connection stops at the token step, with no
    // traffic to the provider; enough to see an action run.
    let account = unauthorized("guarded", "guarded@example.test");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");

    // 1. Loopback, no password configured: open.
    let gateway = Gateway::start_options(
        tempfile::tempdir().unwrap(),
        std::slice::from_ref(&account),
        &options,
    )
    .await;
    let response = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let h = response.headers().clone();
    assert_eq!(h["cache-control"], "no-store");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["referrer-policy"], "no-referrer");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.starts_with("default-src 'none'; script-src 'self'; style-src 'self'"),
        "{csp}"
    );
    let form_action = csp
        .split("; ")
        .find(|d| d.starts_with("form-action 'self' "))
        .unwrap_or_else(|| panic!("{csp}"));
    // The provider's authorization endpoint, and the public URL where
    // the redirect chain ends.
    assert!(
        form_action.contains(&url_origin(&harness().oauth_auth_url)),
        "{csp}"
    );
    assert!(form_action.contains(&base), "{csp}");
    let page = response.text().await.unwrap();
    assert!(
        !page.contains(CLIENT.secret),
        "the page shows the client secret"
    );
    assert!(page.contains("set (write-only)"));
    let csrf = csrf_of(&page);

    // A request a reverse proxy forwarded isn't local, though it comes
    // from loopback: without an admin password it is refused.
    let response = http
        .get(format!("{base}/"))
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);

    // A crafted link to the redirect URL can't put its own words on this
    // origin: the provider's text is shown only for a flow started here.
    let at = page.find("data-copy=\"").unwrap() + 11;
    let redirect = page[at..].split('"').next().unwrap().to_owned();
    let response = http
        .get(format!(
            "{redirect}?error=access_denied&error_description=Call+0800+EVIL&state=forged"
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let text = response.text().await.unwrap();
    assert!(!text.contains("EVIL"), "{text}");
    assert!(text.contains("No authorization is waiting"), "{text}");

    // A DNS-rebinding page would arrive with its own Host: refused.
    let response = http
        .get(format!("{base}/"))
        .header("host", format!("rebind.example:{port}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 421);

    // Actions need the page's CSRF token, from the same origin.
    let action = format!("{base}/accounts/guarded/test");
    let response = http
        .post(&action)
        .form(&[("csrf", "forged")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = http.post(&action).send().await.unwrap();
    assert!(response.status().is_client_error());
    let response = http
        .post(&action)
        .header("sec-fetch-site", "cross-site")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = http
        .post(&action)
        .header("sec-fetch-site", "same-origin")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 303);
    assert_eq!(response.headers()["location"], "/#account-guarded");
    let page = http
        .get(format!("{base}/"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Test connection"), "{page}");
    assert!(
        page.contains("class=\"step bad\""),
        "the failed token step is shown: {page}"
    );
    // Unknown accounts and assets are 404s, not errors.
    for path in ["/static/nothing.js", "/accounts/nobody/test"] {
        let response = if path.starts_with("/accounts") {
            http.post(format!("{base}{path}"))
                .form(&[("csrf", csrf.as_str())])
                .send()
                .await
        } else {
            http.get(format!("{base}{path}")).send().await
        }
        .unwrap();
        assert_eq!(response.status(), 404, "{path}");
    }
    gateway.stop().await;

    // 2. With an admin password required on loopback too (as behind a
    // reverse proxy): HTTP Basic, and a wrong password is refused.
    let options = Options {
        http_port: Some(port),
        ..Options::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut toml = support::config_toml(dir.path(), &[account], &options);
    toml = toml.replace(
        "tls = \"plaintext\"\n",
        &format!("tls = \"plaintext\"\nadmin_password_hash = \"{admin_hash}\"\nadmin_password_on_loopback = true\n"),
    );
    let config = mailgate::config::Config::from_figment(figment::Figment::from(
        <figment::providers::Toml as figment::providers::Format>::string(&toml),
    ))
    .unwrap();
    let running = mailgate::app::start(config).await.unwrap();
    let http = reqwest::Client::new();
    let response = http.get(format!("{base}/")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic realm=\"mailgate\""));
    for (user, password) in [("admin", "wrong"), ("root", "admin-pw")] {
        let response = http
            .get(format!("{base}/"))
            .basic_auth(user, Some(password))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{user}:{password}");
    }
    for _ in 0..2 {
        // The second time is answered from the remembered verification.
        let response = http
            .get(format!("{base}/"))
            .basic_auth("admin", Some("admin-pw"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    // The callback and the health endpoints stay open: the provider sends
    // the browser to the first, monitoring reads the others.
    let response = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    running.stop(std::time::Duration::from_secs(1)).await;
}

fn url_origin(url: &str) -> String {
    let u = url::Url::parse(url).unwrap();
    u.origin().ascii_serialization()
}
