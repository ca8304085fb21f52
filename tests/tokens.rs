//! The token cache against the harness's real OAuth server: tokens are
//! reused while fresh, refreshed before they expire, and rotations are
//! stored before use.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs,
    clippy::result_large_err
)] // tests may panic

mod support;

use std::time::Duration;

use figment::providers::{Format as _, Toml};
use mailgate::config::Config;
use mailgate::oauth::{TokenError, Tokens};
use support::{harness, password_hash, SHORT_CLIENT};

fn config(state: &std::path::Path, client: support::OAuthClient, refresh_token: &str) -> Config {
    let h = harness();
    let toml = format!(
        r#"
state_dir = "{state}"
[oauth]
allow_insecure_loopback_http = true
[integrations.h]
provider = "custom"
client_id = "{id}"
client_secret = "{secret}"
scopes = ["openid", "offline_access", "mail"]
authorization_endpoint = "{auth}"
token_endpoint = "{token}"
[accounts.acct]
password_hash = "{hash}"
integration = "h"
mailbox = "tokens@example.test"
refresh_token = "{refresh_token}"
[accounts.acct.imap]
address = "127.0.0.1:{port}"
"#,
        state = state.display(),
        id = client.id,
        secret = client.secret,
        auth = h.oauth_auth_url,
        token = h.oauth_token_url,
        hash = password_hash("x"),
        port = h.imaps_port,
    );
    Config::from_figment(figment::Figment::new().merge(Toml::string(&toml))).unwrap()
}

#[tokio::test]
async fn short_lived_tokens_are_reused_while_fresh_and_refreshed_before_expiry() {
    let h = harness();
    let grant = h.authorize(SHORT_CLIENT, "tokens@example.test");
    let state = tempfile::tempdir().unwrap();
    let config = config(state.path(), SHORT_CLIENT, &grant.refresh_token);
    let tokens = Tokens::new(
        &config,
        &mailgate::tls::client(None).unwrap(),
        metrics(),
        store_of(&config).await,
    )
    .unwrap();
    let account = &config.accounts["acct"];
    let first = tokens.access_token(account).await.unwrap();
    let again = tokens.access_token(account).await.unwrap();
    assert_eq!(first, again, "a fresh token is served from the cache");
    // A 5 s token is handed out for half its life, then refreshed before
    // it expires: never served stale.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let refreshed = tokens.access_token(account).await.unwrap();
    assert_ne!(first, refreshed, "a token past its use-by time was served");
    // Each refresh rotated the refresh token, and the store has the newest.
    let stored = support::store(state.path())
        .load_record("acct")
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.access_token.as_deref(),
        Some(refreshed.expose().as_str())
    );
    assert_ne!(
        stored.refresh_token.as_deref(),
        Some(grant.refresh_token.as_str())
    );
}

#[tokio::test]
async fn a_revoked_grant_is_reported_as_needing_authorization() {
    let h = harness();
    let grant = h.authorize(support::CLIENT, "tokens@example.test");
    let state = tempfile::tempdir().unwrap();
    let config = config(state.path(), support::CLIENT, &grant.refresh_token);
    let tokens = Tokens::new(
        &config,
        &mailgate::tls::client(None).unwrap(),
        metrics(),
        store_of(&config).await,
    )
    .unwrap();
    h.revoke(support::CLIENT, &grant.refresh_token, "refresh_token")
        .await;
    let err = tokens
        .access_token(&config.accounts["acct"])
        .await
        .unwrap_err();
    assert!(
        matches!(err, TokenError::NeedsAuthorization(ref m) if m.contains("invalid_grant")),
        "{err}"
    );
    assert!(!err.to_string().contains(&grant.refresh_token));
}

#[tokio::test]
async fn concurrent_requests_share_one_refresh() {
    let h = harness();
    let grant = h.authorize(support::CLIENT, "tokens@example.test");
    let state = tempfile::tempdir().unwrap();
    let config = std::sync::Arc::new(config(state.path(), support::CLIENT, &grant.refresh_token));
    let tokens = std::sync::Arc::new(
        Tokens::new(
            &config,
            &mailgate::tls::client(None).unwrap(),
            metrics(),
            store_of(&config).await,
        )
        .unwrap(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (tokens, config) = (tokens.clone(), config.clone());
        tasks.spawn(async move {
            tokens
                .access_token(&config.accounts["acct"])
                .await
                .map(|t| t.expose().clone())
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    while let Some(token) = tasks.join_next().await {
        seen.insert(token.unwrap().expect("every request gets a token"));
    }
    // One refresh served all 50: one distinct token.
    assert_eq!(seen.len(), 1);
}

fn metrics() -> std::sync::Arc<mailgate::metrics::Metrics> {
    std::sync::Arc::new(mailgate::metrics::Metrics::new().unwrap())
}

/// The config's token store, opened once as the wiring does.
async fn store_of(
    config: &mailgate::config::Config,
) -> std::sync::Arc<dyn mailgate::oauth::TokenStore> {
    mailgate::oauth::open_store(config, None)
        .await
        .unwrap()
        .tokens
}
