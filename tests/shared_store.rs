//! The PostgreSQL token store against the harness's real PostgreSQL (TLS
//! with the harness CA, SCRAM): the store contract as two instances see it
//! (versions, compare-and-save, leases timed by the database, fencing),
//! sealing, migrations, and pending flows.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use mailgate::config::{KeySource, PasswordSource, PostgresSettings};
use mailgate::oauth::{
    PendingFlow, PendingFlows as _, PgStore, Record, SaveError, TokenStore as _, Version,
};
use mailgate::secret::Secret;
use support::{fresh_database, harness, metric_sum, pg_client, Account, Gateway, Options, RawClient};

fn settings(db: &str) -> PostgresSettings {
    let h = harness();
    PostgresSettings {
        url: format!("postgres://{}@{}:{}/{db}", h.pg_user, h.pg_host, h.pg_port),
        password: Some(PasswordSource::File(h.pg_password_file.clone())),
        ca_file: Some(h.ca_file.clone()),
        poll_interval: Duration::from_millis(100),
        connect_timeout: Duration::from_secs(5),
    }
}

fn key(byte: &str) -> KeySource {
    KeySource::Hex(Secret::new(byte.repeat(32)))
}

fn record(refresh: &str, access: &str) -> Record {
    Record {
        refresh_token: Some(refresh.into()),
        access_token: Some(access.into()),
        ..Record::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_versions_leases_and_flows_through_one_database() {
    let db = fresh_database().await;
    let a = PgStore::open(&settings(&db), &key("11"), None).await.unwrap();
    // A second instance starting on the migrated database migrates nothing.
    let b = PgStore::open(&settings(&db), &key("11"), None).await.unwrap();
    assert_eq!(a.schema_version().await.unwrap(), 1);
    assert!(a.check().await.unwrap().contains("schema version 1"));

    // Versions and compare-and-save.
    assert!(a.load("acct").await.unwrap().is_none());
    let v1 = a
        .save("acct", &record("rt-1", "at-1"), Version(0), None)
        .await
        .unwrap();
    assert_eq!(v1, Version(1));
    let seen = b.load("acct").await.unwrap().unwrap();
    assert_eq!(seen.version, v1);
    assert_eq!(seen.record.refresh_token.as_deref(), Some("rt-1"));
    let v2 = b
        .save("acct", &record("rt-2", "at-2"), v1, None)
        .await
        .unwrap();
    assert!(matches!(
        a.save("acct", &record("rt-stale", "at"), v1, None).await,
        Err(SaveError::Conflict)
    ));
    assert!(matches!(
        a.save("acct", &record("rt-stale", "at"), Version(0), None)
            .await,
        Err(SaveError::Conflict)
    ));
    // The other instance notices the save by its poll, without a load.
    let mut noticed = false;
    for _ in 0..50 {
        if a.changed("acct", v1) {
            noticed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(noticed, "instance a never noticed b's save");
    assert!(!a.changed("acct", v2));

    // Only ciphertext in the database: no token, no account name in it.
    let client = pg_client(&db).await;
    let row = client
        .query_one(
            "SELECT sealed FROM mailgate_tokens WHERE account = 'acct'",
            &[],
        )
        .await
        .unwrap();
    let sealed: Vec<u8> = row.get(0);
    assert!(sealed.starts_with(b"MGT1"));
    let text = String::from_utf8_lossy(&sealed);
    assert!(!text.contains("rt-2") && !text.contains("at-2"));
    // A store with another key can't read it, and says so.
    let other = PgStore::open(&settings(&db), &key("22"), None).await.unwrap();
    let e = other.load("acct").await.unwrap_err().to_string();
    assert!(e.contains("another key"), "{e}");
    // A record moved to another account is refused (the name is sealed in).
    client
        .execute(
            "INSERT INTO mailgate_tokens (account, version, sealed) SELECT 'moved', version, sealed FROM mailgate_tokens WHERE account = 'acct'",
            &[],
        )
        .await
        .unwrap();
    assert!(a.load("moved").await.is_err());
    // So is a row whose version was rolled back outside mailgate.
    client
        .execute(
            "UPDATE mailgate_tokens SET version = 1 WHERE account = 'acct'",
            &[],
        )
        .await
        .unwrap();
    let e = a.load("acct").await.unwrap_err().to_string();
    assert!(e.contains("altered outside mailgate"), "{e}");
    client
        .execute(
            "UPDATE mailgate_tokens SET version = 2 WHERE account = 'acct'",
            &[],
        )
        .await
        .unwrap();

    // Leases: one holder at a time; the other waits, then gets it once
    // released, with a new epoch.
    let ttl = Duration::from_secs(2);
    let held = a.lease("acct", "owner-a", ttl).await.unwrap();
    assert!(!held.took_over);
    let waiting = tokio::spawn({
        let b = b.clone();
        async move { b.lease("acct", "owner-b", ttl).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "b got a lease that a holds");
    let epoch_a = held.epoch;
    a.release(held).await;
    let held_b = waiting.await.unwrap().unwrap();
    assert!(held_b.epoch > epoch_a && !held_b.took_over);
    // A save fenced by a live lease goes through.
    let v3 = b
        .save("acct", &record("rt-3", "at-3"), v2, Some(&held_b))
        .await
        .unwrap();
    // b stalls past its lease: a takes it over (timed by the database's
    // clock), and b's fenced save is refused as stale.
    let started = std::time::Instant::now();
    let held_a = a.lease("acct", "owner-a", ttl).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(held_a.took_over, "the expired lease was not reported as taken over");
    assert!(!held_b.holds_for(Duration::ZERO));
    assert!(matches!(
        b.save("acct", &record("rt-stale", "at"), v3, Some(&held_b))
            .await,
        Err(SaveError::LeaseLost)
    ));
    assert_eq!(
        a.load("acct")
            .await
            .unwrap()
            .unwrap()
            .record
            .refresh_token
            .as_deref(),
        Some("rt-3")
    );
    a.release(held_a).await;

    // Pending flows: put on one instance, found and removed on the other.
    let flow = PendingFlow {
        account: "acct".into(),
        verifier: "verifier-secret".into(),
        created_at: 1,
        outcome: None,
        from_page: false,
    };
    a.put("state-key", &flow).await.unwrap();
    let got = b.get("state-key").await.unwrap().unwrap();
    assert_eq!(got.verifier, "verifier-secret");
    b.remove("state-key").await;
    assert!(a.get("state-key").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_newer_than_this_mailgate_is_refused_and_nothing_is_touched() {
    let db = fresh_database().await;
    drop(PgStore::open(&settings(&db), &key("33"), None).await.unwrap());
    let client = pg_client(&db).await;
    client
        .execute("UPDATE mailgate_schema SET version = 99", &[])
        .await
        .unwrap();
    let e = PgStore::open(&settings(&db), &key("33"), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("newer than this mailgate"), "{e}");
    let version: i32 = client
        .query_one("SELECT version FROM mailgate_schema", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, 99);
}

// --- Several gateways on one database ---------------------------------------------

/// Tests that stop the database take this exclusively; the others share it.
static DATABASE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// What every instance of one test shares: a database and a store key.
struct Cluster {
    dir: tempfile::TempDir,
    db: String,
}

impl Cluster {
    async fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            db: fresh_database().await,
        }
    }

    fn options(&self, oauth: &str, http_port: Option<u16>) -> Options {
        Options {
            top: support::pg_store_toml(&self.db, &self.dir.path().join("shared.key")),
            oauth: oauth.into(),
            http_port,
            // Every test client comes from 127.0.0.1.
            limits: "max_pre_login_per_ip = 1000".into(),
            ..Options::default()
        }
    }

    /// An instance in this process, with a state directory of its own.
    async fn gateway(&self, accounts: &[Account], oauth: &str) -> Gateway {
        Gateway::start_options(
            tempfile::tempdir().unwrap(),
            accounts,
            &self.options(oauth, None),
        )
        .await
    }
}

async fn imap_login(address: std::net::SocketAddr, account: &Account) -> String {
    let (mut c, _) = RawClient::connect(address).await;
    c.send(format!("a LOGIN {} \"{}\"\r\n", account.name, account.password).as_bytes())
        .await;
    let reply = c.until_tagged("a").await.last().unwrap().clone();
    c.send(b"z LOGOUT\r\n").await;
    reply
}

fn token_requests(gateways: &[&Gateway], outcome: Option<&str>) -> f64 {
    let label = outcome.map(|o| format!("outcome=\"{o}\""));
    let labels: Vec<&str> = label.iter().map(String::as_str).collect();
    gateways
        .iter()
        .map(|g| metric_sum(&g.metrics_text(), "mailgate_token_requests_total", &labels))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_cold_logins_over_three_instances_make_one_token_request() {
    let _shared = DATABASE.read().await;
    harness().seed("cluster-cold@example.test");
    let account = Account::authorized("cold", "cluster-cold@example.test");
    let cluster = Cluster::new().await;
    let mut gateways = Vec::new();
    for _ in 0..3 {
        gateways.push(cluster.gateway(&[account.clone()], "").await);
    }
    let addresses: Vec<_> = gateways.iter().map(|g| g.imaps).collect();
    let mut logins = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (address, account) = (addresses[i % 3], account.clone());
        logins.spawn(async move { imap_login(address, &account).await });
    }
    while let Some(reply) = logins.join_next().await {
        let reply = reply.unwrap();
        assert!(reply.starts_with("a OK"), "{reply}");
    }
    let all: Vec<&Gateway> = gateways.iter().collect();
    assert_eq!(token_requests(&all, None), 1.0);
    for g in gateways {
        g.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_over_many_cycles_equal_the_rotations_and_the_grant_survives() {
    let _shared = DATABASE.read().await;
    let h = harness();
    h.seed("cluster-cycles@example.test");
    // Access tokens live 5 seconds; every refresh rotates the refresh
    // token, and presenting a spent one revokes the whole grant.
    let grant = h.authorize(support::SHORT_CLIENT, "cluster-cycles@example.test");
    let account = Account {
        client: support::SHORT_CLIENT,
        refresh_token: Some(grant.refresh_token),
        ..Account::authorized_without_grant("cycles", "cluster-cycles@example.test")
    };
    let cluster = Cluster::new().await;
    let (a, b) = (
        cluster.gateway(&[account.clone()], "").await,
        cluster.gateway(&[account.clone()], "").await,
    );
    // 20 s: at least six generations of 5-second tokens, refreshed by both
    // instances' refreshers and by logins on both.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let mut turn = 0;
    while std::time::Instant::now() < until {
        let address = if turn % 2 == 0 { a.imaps } else { b.imaps };
        let reply = imap_login(address, &account).await;
        assert!(reply.starts_with("a OK"), "login {turn}: {reply}");
        turn += 1;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let both = [&a, &b];
    let requests = token_requests(&both, None);
    let rotations = token_requests(&both, Some("ok"));
    assert!(rotations >= 6.0, "only {rotations} refreshes in 20 s");
    assert_eq!(requests, rotations, "a refresh request failed: a spent refresh token was presented");
    for g in both {
        let text = g.metrics_text();
        assert_eq!(
            metric_sum(&text, "mailgate_account_needs_authorization", &[]),
            0.0
        );
        assert_eq!(metric_sum(&text, "mailgate_store_stale_saves_total", &[]), 0.0);
    }
    a.stop().await;
    b.stop().await;
}
