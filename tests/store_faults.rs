//! Token store faults: a damaged record, and a write that fails (as on a
//! full disk). The client gets a clear answer, readiness says why, and the
//! stored file is kept as it was.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs
)] // tests may panic

mod support;

use support::{free_port, Account, Gateway, Options, RawClient};

async fn login_reply(gateway: &Gateway, account: &Account) -> String {
    let (mut c, _) = RawClient::connect(gateway.imaps).await;
    c.send(format!("a LOGIN {} {}\r\n", account.name, account.password).as_bytes())
        .await;
    c.until_tagged("a").await.last().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_is_reported_and_kept() {
    let account = Account::authorized("damaged", "damaged@example.test");
    let state = tempfile::tempdir().unwrap();
    let path = state.path().join("tokens/damaged.token");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"MGT1 this is not a sealed record").unwrap();
    let port = free_port();
    let options = Options {
        http_port: Some(port),
        oauth: "refresh_in_background = false".into(),
        ..Options::default()
    };
    let gateway = Gateway::start_options(state, &[account.clone()], &options).await;
    assert_eq!(
        login_reply(&gateway, &account).await,
        "a NO [UNAVAILABLE] Upstream mail service unavailable, try again later"
    );
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let body = ready.text().await.unwrap();
    assert!(body.contains("damaged.token"), "{body}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"MGT1 this is not a sealed record",
        "the damaged file was replaced"
    );
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_write_keeps_the_old_record() {
    let account = Account {
        grant: "client_credentials",
        refresh_token: None,
        ..Account::authorized_without_grant("diskfull", "app@example.test")
    };
    let state = tempfile::tempdir().unwrap();
    // An old record with an expired access token: the next login must
    // fetch a new token and write it.
    let old = mailgate::oauth::Record {
        access_token: Some("old".into()),
        obtained_at: 1,
        expires_at: 2,
        ..Default::default()
    };
    let store = support::store(state.path());
    store.save_record("diskfull", &old).unwrap();
    let path = state.path().join("tokens/diskfull.token");
    let before = std::fs::read(&path).unwrap();
    // The temporary file can't be created: the write fails like on a full disk.
    std::fs::create_dir(state.path().join("tokens/.diskfull.token.tmp")).unwrap();
    let options = Options {
        oauth: "refresh_in_background = false".into(),
        ..Options::default()
    };
    let gateway = Gateway::start_options(state, &[account.clone()], &options).await;
    assert_eq!(
        login_reply(&gateway, &account).await,
        "a NO [UNAVAILABLE] Upstream mail service unavailable, try again later"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the old record changed"
    );
    gateway.stop().await;
}
