//! The PostgreSQL token store against the harness's real PostgreSQL (TLS
//! with the harness CA, SCRAM): the store contract as two instances see it
//! (versions, compare-and-save, leases timed by the database, fencing),
//! sealing, migrations, and pending flows.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs
)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mailgate::config::{KeySource, PasswordSource, PostgresSettings};
use mailgate::oauth::{
    PendingFlow, PendingFlows as _, PgStore, Record, SaveError, TokenStore as _, Version,
};
use mailgate::secret::Secret;
use support::{
    fresh_database, harness, metric_sum, pg_client, Account, Gateway, Options, Process, RawClient,
};

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
    let _shared = DATABASE.read().await;
    let db = fresh_database().await;
    let a = PgStore::open(&settings(&db), &key("11"), None)
        .await
        .unwrap();
    // A second instance starting on the migrated database migrates nothing.
    let b = PgStore::open(&settings(&db), &key("11"), None)
        .await
        .unwrap();
    assert_eq!(a.schema_version().await.unwrap(), 2);
    assert!(a.check().await.unwrap().contains("schema version 2"));

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
    // An instance with another key is refused at open, and says why.
    let e = PgStore::open(&settings(&db), &key("22"), None)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("every instance must use the same key"), "{e}");
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
    assert!(
        held_a.took_over,
        "the expired lease was not reported as taken over"
    );
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
    let _shared = DATABASE.read().await;
    let db = fresh_database().await;
    drop(
        PgStore::open(&settings(&db), &key("33"), None)
            .await
            .unwrap(),
    );
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

/// `n` mailgate processes on the cluster's database, behind a real HAProxy
/// (`name`) that sends them PROXY v2 headers; returns them and the
/// balancer's IMAPS address.
async fn behind_haproxy(
    cluster: &Cluster,
    name: &str,
    account: &Account,
    n: usize,
) -> (Vec<Process>, std::net::SocketAddr) {
    let mut processes = Vec::new();
    for _ in 0..n {
        let options = Options {
            proxy_protocol_from: Some("[\"127.0.0.1/32\"]".into()),
            ..cluster.options("", Some(support::free_port()))
        };
        processes.push(Process::start_options(std::slice::from_ref(account), &options).await);
    }
    let servers: Vec<_> = processes.iter().map(|p| p.imaps).collect();
    let port = support::start_balancer(name, &servers, "v2");
    (
        processes,
        std::net::SocketAddr::from(([127, 0, 0, 1], port)),
    )
}

/// Token requests summed over `processes` (with `outcome`, if given).
async fn requests_of(processes: &[Process], outcome: Option<&str>) -> f64 {
    let label = outcome.map(|o| format!("outcome=\"{o}\""));
    let labels: Vec<&str> = label.iter().map(String::as_str).collect();
    let mut sum = 0.0;
    for p in processes {
        sum += metric_sum(
            &p.metrics_text().await,
            "mailgate_token_requests_total",
            &labels,
        );
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_cold_logins_through_haproxy_over_three_instances_make_one_token_request() {
    let _shared = DATABASE.read().await;
    harness().seed("cluster-cold@example.test");
    let account = Account::authorized("cold", "cluster-cold@example.test");
    let cluster = Cluster::new().await;
    let (processes, balancer) = behind_haproxy(&cluster, "cold", &account, 3).await;
    let mut logins = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let account = account.clone();
        logins.spawn(async move { imap_login(balancer, &account).await });
    }
    while let Some(reply) = logins.join_next().await {
        let reply = reply.unwrap();
        assert!(reply.starts_with("a OK"), "{reply}");
    }
    assert_eq!(requests_of(&processes, None).await, 1.0);
    // The balancer spread them: every instance served logins.
    for p in &processes {
        let served = metric_sum(
            &p.metrics_text().await,
            "mailgate_logins_total",
            &["outcome=\"ok\""],
        );
        assert!(served > 0.0, "an instance served no login");
    }
    support::stop_balancer("cold");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refreshes_over_many_cycles_equal_the_rotations_and_the_grant_survives() {
    let _shared = DATABASE.read().await;
    let h = harness();
    h.seed("cluster-cycles@example.test");
    // Access tokens live 5 seconds; every refresh rotates the refresh
    // token, and presenting a spent one revokes the whole grant.
    let account = short_lived("cycles", "cluster-cycles@example.test");
    let cluster = Cluster::new().await;
    let (processes, balancer) = behind_haproxy(&cluster, "cycles", &account, 2).await;
    // 20 s: at least six generations of 5-second tokens, refreshed by both
    // instances' refreshers and by logins on both (round robin).
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let mut turn = 0;
    while std::time::Instant::now() < until {
        let reply = imap_login(balancer, &account).await;
        assert!(reply.starts_with("a OK"), "login {turn}: {reply}");
        turn += 1;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let requests = requests_of(&processes, None).await;
    let rotations = requests_of(&processes, Some("ok")).await;
    assert!(rotations >= 6.0, "only {rotations} refreshes in 20 s");
    assert_eq!(
        requests, rotations,
        "a refresh request failed: a spent refresh token was presented"
    );
    for p in &processes {
        let text = p.metrics_text().await;
        assert_eq!(
            metric_sum(&text, "mailgate_account_needs_authorization", &[]),
            0.0
        );
        assert_eq!(
            metric_sum(&text, "mailgate_store_stale_saves_total", &[]),
            0.0
        );
    }
    support::stop_balancer("cycles");
}

/// Whether a login succeeds within `wait`, trying every 200 ms.
async fn login_within(address: std::net::SocketAddr, account: &Account, wait: Duration) -> bool {
    let until = std::time::Instant::now() + wait;
    while std::time::Instant::now() < until {
        if imap_login(address, account).await.starts_with("a OK") {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

async fn readyz(port: u16) -> (u16, String) {
    let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// An account whose access tokens live 5 seconds.
fn short_lived(name: &'static str, mailbox: &str) -> Account {
    let grant = harness().authorize(support::SHORT_CLIENT, mailbox);
    Account {
        client: support::SHORT_CLIENT,
        refresh_token: Some(grant.refresh_token),
        ..Account::authorized_without_grant(name, mailbox)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_database_down_cached_tokens_serve_and_refreshes_wait_then_all_recovers() {
    let _exclusive = DATABASE.write().await;
    let h = harness();
    h.seed("down-long@example.test");
    h.seed("down-short@example.test");
    let long = Account::authorized("downlong", "down-long@example.test");
    let short = short_lived("downshort", "down-short@example.test");
    let cluster = Cluster::new().await;
    let port = support::free_port();
    let gateway = Gateway::start_options(
        tempfile::tempdir().unwrap(),
        &[long.clone(), short.clone()],
        &cluster.options("retry_backoff = \"1s\"", Some(port)),
    )
    .await;
    assert!(imap_login(gateway.imaps, &long).await.starts_with("a OK"));
    assert!(imap_login(gateway.imaps, &short).await.starts_with("a OK"));
    assert_eq!(readyz(port).await.0, 200);

    support::pg_control("stop");
    let requests_before = token_requests(&[&gateway], None);
    // The cached token keeps serving logins: they never touch the database.
    for _ in 0..5 {
        let reply = imap_login(gateway.imaps, &long).await;
        assert!(reply.starts_with("a OK"), "{reply}");
    }
    let (status, body) = readyz(port).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("token_store_errors") && body.contains("postgres"),
        "{body}"
    );
    // The short-lived token runs out; without the lease no refresh is sent,
    // and the login is told to come back later.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let reply = imap_login(gateway.imaps, &short).await;
    assert!(reply.starts_with("a NO [UNAVAILABLE]"), "{reply}");
    assert_eq!(token_requests(&[&gateway], None), requests_before);
    assert!(metric_sum(&gateway.metrics_text(), "mailgate_store_errors_total", &[]) > 0.0);

    // Back up: the gateway reconnects by itself.
    support::pg_control("start");
    let recovered = login_within(gateway.imaps, &short, Duration::from_secs(10)).await;
    assert!(recovered, "no login after the database came back");
    assert_eq!(readyz(port).await.0, 200);

    // A restart (the connection breaks under it) is recovered from too.
    support::pg_control("restart");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let recovered = login_within(gateway.imaps, &short, Duration::from_secs(10)).await;
    assert!(recovered, "no login after the database restarted");
    gateway.stop().await;
}

/// A token endpoint that accepts connections and never answers: a request
/// in flight for as long as the test likes (a fault the real OAuth server
/// can't produce). Counts the connections it accepted.
async fn black_hole() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            held.push(tcp);
        }
    });
    (url, accepted)
}

async fn until_accepted(counter: &AtomicUsize) {
    for _ in 0..200 {
        if counter.load(Ordering::SeqCst) > 0 {
            // The request's bytes follow the connect at once.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the token request never came");
}

async fn process_login(p: &Process, account: &Account) -> String {
    imap_login(p.imaps, account).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_or_paused_mid_refresh_loses_its_lease_and_one_generation_is_kept() {
    let _shared = DATABASE.read().await;
    let h = harness();
    h.seed("killed@example.test");
    h.seed("paused@example.test");
    let killed = Account::authorized("killed", "killed@example.test");
    let paused = Account::authorized("paused", "paused@example.test");
    let cluster = Cluster::new().await;
    // Token requests of the two doomed holders go nowhere; theirs time out
    // after 2 s, so their leases last 2 x 2 s + 10 s = 14 s.
    let (hole_a, accepted_a) = black_hole().await;
    let (hole_p, accepted_p) = black_hole().await;
    let doomed = |account: &Account, hole: &str| Account {
        token_url: Some(hole.to_owned()),
        ..account.clone()
    };
    let holder = |account: Account| {
        let options = cluster.options("request_timeout = \"2s\"", Some(support::free_port()));
        async move { Process::start_options(&[account], &options).await }
    };
    let mut a = holder(doomed(&killed, &hole_a)).await;
    let p = holder(doomed(&paused, &hole_p)).await;
    let b = Process::start_options(
        &[killed.clone(), paused.clone()],
        &cluster.options("", Some(support::free_port())),
    )
    .await;

    // Each holder takes its account's lease and sends its request.
    let login_a = tokio::spawn({
        let (address, account) = (a.imaps, killed.clone());
        async move { imap_login(address, &account).await }
    });
    let login_p = tokio::spawn({
        let (address, account) = (p.imaps, paused.clone());
        async move { imap_login(address, &account).await }
    });
    until_accepted(&accepted_a).await;
    until_accepted(&accepted_p).await;
    a.signal("KILL");
    p.signal("STOP");
    drop(login_a);

    // The other instance waits the leases out, takes them over, refreshes.
    let started = std::time::Instant::now();
    let (reply_killed, reply_paused) =
        tokio::join!(process_login(&b, &killed), process_login(&b, &paused));
    assert!(reply_killed.starts_with("a OK"), "{reply_killed}");
    assert!(reply_paused.starts_with("a OK"), "{reply_paused}");
    assert!(
        started.elapsed() >= Duration::from_secs(8),
        "a live-looking lease was taken over early ({:?})",
        started.elapsed()
    );
    let text = b.metrics_text().await;
    assert_eq!(
        metric_sum(&text, "mailgate_store_lease_takeovers_total", &[]),
        2.0
    );
    assert_eq!(
        metric_sum(&text, "mailgate_token_requests_total", &["outcome=\"ok\""]),
        2.0
    );

    // The paused holder resumes: its request timed out meanwhile, and its
    // write (the failure) is refused as stale and counted. The login that
    // waited behind it reads the record again and uses the other
    // instance's tokens.
    p.signal("CONT");
    let reply = login_p.await.unwrap();
    assert!(reply.starts_with("a OK"), "{reply}\n{}", p.log());
    let mut counted = 0.0;
    for _ in 0..50 {
        counted = metric_sum(
            &p.metrics_text().await,
            "mailgate_store_stale_saves_total",
            &["account=\"paused\"", "reason=\"lease_lost\""],
        );
        if counted > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counted, 1.0);
    // One generation is kept: the resumed instance now uses the tokens the
    // other one saved, and the grant is intact for both.
    assert!(process_login(&p, &paused).await.starts_with("a OK"));
    assert!(process_login(&b, &paused).await.starts_with("a OK"));
    assert_eq!(accepted_p.load(Ordering::SeqCst), 1);
    let _ = a.exit_code().await;
}

/// The config file of one instance: the cluster's store, an HTTP listener
/// on `port`, and the public URL that the balancer gives every instance.
fn instance_config(
    cluster: &Cluster,
    name: &str,
    accounts: &[Account],
    port: u16,
    public: u16,
) -> std::path::PathBuf {
    let dir = cluster.dir.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let toml = support::config_toml(&dir, accounts, &cluster.options("", Some(port))).replace(
        "[http]\n",
        &format!("[http]\npublic_url = \"http://127.0.0.1:{public}\"\n"),
    );
    let path = dir.join("mailgate.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorization_started_on_one_instance_finishes_on_the_other() {
    use support::cli::{browser, start_authorize, unauthorized, wait};
    let _shared = DATABASE.read().await;
    harness().seed("flow@example.test");
    let account = unauthorized("flow", "flow@example.test");
    let cluster = Cluster::new().await;
    let (port_a, port_b) = (support::free_port(), support::free_port());
    let config_a = instance_config(&cluster, "a", &[account.clone()], port_a, port_a);
    let config_b = instance_config(&cluster, "b", &[account.clone()], port_b, port_a);
    let a = Gateway::start_config(&config_a, tempfile::tempdir().unwrap()).await;
    let b = Gateway::start_config(&config_b, tempfile::tempdir().unwrap()).await;
    assert!(imap_login(a.imaps, &account)
        .await
        .starts_with("a NO [AUTHENTICATIONFAILED] This account must be authorized"));

    // `mailgate authorize` on A's config; the browser comes back to the
    // public URL, which the balancer hands to B.
    let (child, url) = start_authorize(&config_a, "flow", &[]).await;
    let redirected = browser(url, "flow@example.test").await;
    let public = format!("http://127.0.0.1:{port_a}/");
    assert!(redirected.starts_with(&public), "{redirected}");
    let to_b = redirected.replacen(&public, &format!("http://127.0.0.1:{port_b}/"), 1);
    let page = reqwest::get(&to_b).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("Account flow is authorized"));
    let (ok, stderr) = wait(child).await;
    assert!(ok, "authorize failed: {stderr}");
    // Both instances use the new tokens without a restart.
    for g in [&a, &b] {
        let reply = imap_login(g.imaps, &account).await;
        assert!(reply.starts_with("a OK"), "{reply}");
    }
    a.stop().await;
    b.stop().await;
}

// --- Behind a load balancer: the PROXY protocol --------------------------------------

async fn greeting_from(from: &str, to: std::net::SocketAddr) -> (RawClient, String) {
    RawClient::greeted(support::connect_from(from, to).await).await
}

/// Reads until the peer closes (or 10 s pass): what was said before.
async fn until_closed(tcp: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt as _;
    let mut seen = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(seen),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_haproxy_the_per_address_limit_sees_the_real_client_address() {
    use tokio::io::AsyncWriteExt as _;
    let h = harness();
    h.seed("proxied@example.test");
    let account = Account::authorized("proxied", "proxied@example.test");
    let options = Options {
        // HAProxy connects from 127.0.0.1; the clients are 127.0.0.2-5.
        proxy_protocol_from: Some("[\"127.0.0.1/32\"]".into()),
        limits:
            "max_pre_login_per_ip = 2\npre_login_wait = \"200ms\"\nproxy_header_timeout = \"1s\""
                .into(),
        smtp: true,
        ..Options::default()
    };
    let gateway =
        Gateway::start_options(tempfile::tempdir().unwrap(), &[account.clone()], &options).await;
    let imaps = support::start_balancer("imaps", &[gateway.imaps], "v2");
    let pop3s = support::start_balancer("pop3s", &[gateway.pop3s], "v1");
    let smtps = support::start_balancer("smtps", &[gateway.smtps.unwrap()], "v2");
    let via = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));

    // A login through the balancer works end to end.
    let (mut c, greeting) = greeting_from("127.0.0.2", via(imaps)).await;
    assert!(greeting.starts_with("* OK"), "{greeting}");
    c.send(format!("a LOGIN {} \"{}\"\r\n", account.name, account.password).as_bytes())
        .await;
    let reply = c.until_tagged("a").await.last().unwrap().clone();
    assert!(reply.starts_with("a OK"), "{reply}");
    drop(c);

    // Two connections from 127.0.0.2 that don't log in fill its
    // pre-login limit; a third is refused, while 127.0.0.3 (the same
    // balancer's address as far as TCP is concerned) is not.
    let (_held1, g1) = greeting_from("127.0.0.2", via(imaps)).await;
    let (_held2, g2) = greeting_from("127.0.0.2", via(imaps)).await;
    assert!(
        g1.starts_with("* OK") && g2.starts_with("* OK"),
        "{g1} {g2}"
    );
    let (_, refused) = greeting_from("127.0.0.2", via(imaps)).await;
    assert!(
        refused.starts_with("* BYE [UNAVAILABLE] Too many connections"),
        "{refused}"
    );
    let (_, other) = greeting_from("127.0.0.3", via(imaps)).await;
    assert!(other.starts_with("* OK"), "{other}");
    // POP3 (PROXY v1) and SMTP (v2) are the same.
    let (_p1, pop_greeting) = greeting_from("127.0.0.4", via(pop3s)).await;
    assert!(pop_greeting.starts_with("+OK"), "{pop_greeting}");
    let (_s1, smtp_greeting) = greeting_from("127.0.0.4", via(smtps)).await;
    assert!(smtp_greeting.starts_with("220 "), "{smtp_greeting}");
    let (_p2, _) = greeting_from("127.0.0.4", via(pop3s)).await;
    let (_, pop_refused) = greeting_from("127.0.0.4", via(pop3s)).await;
    assert!(pop_refused.starts_with("-ERR"), "{pop_refused}");

    // A trusted address that sends no header is closed after the wait,
    // having been told nothing.
    let started = std::time::Instant::now();
    let mut silent = support::connect_from("127.0.0.1", gateway.imap).await;
    assert_eq!(until_closed(&mut silent).await, Some(Vec::new()));
    assert!(started.elapsed() >= Duration::from_millis(900));
    // Anyone else who sends a header is refused: under implicit TLS before
    // the handshake, on a STARTTLS listener after the greeting.
    let mut forged = support::connect_from("127.0.0.5", gateway.imaps).await;
    forged
        .write_all(b"PROXY TCP4 192.0.2.1 127.0.0.1 1234 993\r\n")
        .await
        .unwrap();
    assert_eq!(until_closed(&mut forged).await, Some(Vec::new()));
    let mut forged = support::connect_from("127.0.0.5", gateway.imap).await;
    forged
        .write_all(
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x01\x7f\x00\x00\x01\x04\xd2\x00\x8f",
        )
        .await
        .unwrap();
    let said = until_closed(&mut forged).await.unwrap();
    assert!(
        String::from_utf8_lossy(&said).starts_with("* OK"),
        "{said:?}"
    );
    assert!(!String::from_utf8_lossy(&said).contains("BAD"), "{said:?}");
    assert_eq!(
        metric_sum(
            &gateway.metrics_text(),
            "mailgate_connections_closed_total",
            &["error_kind=\"proxy_header\""]
        ),
        3.0
    );
    for name in ["imaps", "pop3s", "smtps"] {
        support::stop_balancer(name);
    }
    gateway.stop().await;
}

// --- Moving a deployment ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_the_file_store_into_postgres_once_and_never_over_newer_records() {
    use support::cli::mailgate;
    let _shared = DATABASE.read().await;
    let h = harness();
    h.seed("moved@example.test");
    let grant = h.authorize(support::CLIENT, "moved@example.test");
    let dir = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let record = Record {
        refresh_token: Some(grant.refresh_token.clone()),
        access_token: Some(grant.access_token.clone()),
        obtained_at: now,
        expires_at: now + 3600,
        last_refresh: now,
        ..Record::default()
    };
    // What a single instance on the file store left behind.
    let files = support::store(dir.path());
    files.save_record("moved", &record).unwrap();
    let moved = support::cli::unauthorized("moved", "moved@example.test");
    let never = support::cli::unauthorized("never", "never@example.test");
    let db = fresh_database().await;
    let options = Options {
        top: support::pg_store_toml(&db, &dir.path().join("token.key")),
        ..Options::default()
    };
    let config = dir.path().join("mailgate.toml");
    std::fs::write(
        &config,
        support::config_toml(dir.path(), &[moved.clone(), never], &options),
    )
    .unwrap();
    let copy = || {
        let out = mailgate(&config).arg("store-copy").output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = copy();
    assert!(first.contains("moved: copied\n"), "{first}");
    assert!(
        first.contains("never: no record in the file store"),
        "{first}"
    );
    assert!(copy().contains("moved: already in the database"));

    // Instances on the database use the copied tokens: no authorization,
    // not even a token request.
    let gateway = Gateway::start_config(&config, tempfile::tempdir().unwrap()).await;
    assert!(imap_login(gateway.imaps, &moved).await.starts_with("a OK"));
    assert_eq!(
        token_requests(&[&gateway], None),
        0.0,
        "{}",
        gateway.metrics_text()
    );
    gateway.stop().await;

    // An older file record never replaces the database's; a newer one
    // (the old instance refreshed after the copy) does.
    let older = Record {
        access_token: Some("older".into()),
        last_refresh: now - 100,
        ..record.clone()
    };
    files.save_record("moved", &older).unwrap();
    assert!(copy().contains("moved: kept: the database holds a newer record"));
    let newer = Record {
        last_refresh: now + 100,
        ..record
    };
    files.save_record("moved", &newer).unwrap();
    assert!(copy().contains("moved: copied over an older record"));
    let store = PgStore::open(
        &settings(&db),
        &KeySource::File(dir.path().join("token.key")),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        store
            .load("moved")
            .await
            .unwrap()
            .unwrap()
            .record
            .last_refresh,
        now + 100
    );
}

/// A token endpoint in front of the real one that holds each request until
/// `gate` opens, then forwards it (a fault: the database going away while
/// the provider is answering, or a slow provider). What the provider
/// answered is kept in the returned buffer.
async fn gated_token_endpoint() -> (
    String,
    Arc<tokio::sync::Notify>,
    Arc<std::sync::Mutex<Vec<u8>>>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let real = url::Url::parse(&harness().oauth_token_url).unwrap();
    let upstream = format!("{}:{}", real.host_str().unwrap(), real.port().unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}{}", listener.local_addr().unwrap(), real.path());
    let gate = Arc::new(tokio::sync::Notify::new());
    let answers = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (open, seen) = (gate.clone(), answers.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (open, upstream, seen) = (open.clone(), upstream.clone(), seen.clone());
            tokio::spawn(async move {
                open.notified().await;
                let server = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut buf = [0u8; 4096];
                while let Ok(n) = server_read.read(&mut buf).await {
                    if n == 0 || client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
                up.abort();
            });
        }
    });
    (url, gate, answers)
}

/// A process on the cluster whose token requests go to `token_url`, and a
/// login on it, under way, that makes it refresh there.
async fn refreshing_through(
    cluster: &Cluster,
    account: &Account,
    token_url: String,
) -> (Process, tokio::task::JoinHandle<String>) {
    let through = Account {
        token_url: Some(token_url),
        ..account.clone()
    };
    let process = Process::start_options(&[through], &cluster.options("", None)).await;
    let login = tokio::spawn({
        let (address, account) = (process.imaps, account.clone());
        async move { imap_login(address, &account).await }
    });
    (process, login)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_answered_while_the_database_is_away_survive_a_crash_in_the_local_spool() {
    let _exclusive = DATABASE.write().await;
    harness().seed("spooled@example.test");
    let account = Account::authorized("spooled", "spooled@example.test");
    let (url, gate, _) = gated_token_endpoint().await;
    let cluster = Cluster::new().await;
    // The refresh is under way (lease taken, request sent) when the
    // database goes; then the provider answers, rotating the refresh token.
    let (mut a, login) = refreshing_through(&cluster, &account, url).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    support::pg_control("stop");
    gate.notify_one();
    let reply = login.await.unwrap();
    assert!(
        reply.starts_with("a NO [UNAVAILABLE]"),
        "{reply}\n{}",
        a.log()
    );
    // A crash before the database is back.
    support::pg_control("start");
    a.restart().await;
    // The rotated tokens were kept on local disk and are saved at the first
    // load: the grant is intact (its old refresh token was spent, and
    // presenting it would have revoked it).
    let reply = imap_login(a.imaps, &account).await;
    assert!(reply.starts_with("a OK"), "{reply}\n{}", a.log());
    assert!(a
        .log()
        .contains("saved tokens that a crash or a store outage had left in the local spool"));
    let store = PgStore::open(
        &settings(&cluster.db),
        &KeySource::File(cluster.dir.path().join("shared.key")),
        None,
    )
    .await
    .unwrap();
    let record = store.load("spooled").await.unwrap().unwrap().record;
    assert_ne!(record.refresh_token, account.refresh_token);
    assert!(record.needs_authorization.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_on_any_instance_wins_against_a_refresh_in_flight() {
    use std::io::Write as _;
    use support::cli::{browser, start_authorize, wait};
    let _shared = DATABASE.read().await;
    harness().seed("winner@example.test");
    let account = Account::authorized("winner", "winner@example.test");
    let (url, gate, answers) = gated_token_endpoint().await;
    let cluster = Cluster::new().await;
    // A refreshes: it holds the lease, its request held at the provider.
    let (a, login) = refreshing_through(&cluster, &account, url).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The admin authorizes the account again, on another instance's config.
    let config_b = instance_config(
        &cluster,
        "b",
        &[account.clone()],
        support::free_port(),
        support::free_port(),
    );
    let (mut child, url) = start_authorize(&config_b, "winner", &["--paste"]).await;
    let redirected = browser(url, "winner@example.test").await;
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{redirected}").unwrap();
    drop(stdin);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Now the provider answers A's refresh, which A saves under its lease;
    // the authorization, waiting for that lease, is saved after it.
    gate.notify_one();
    let (ok, stderr) = wait(child).await;
    assert!(ok, "authorize failed: {stderr}");
    assert!(login.await.unwrap().starts_with("a OK"));
    let answered = String::from_utf8_lossy(&answers.lock().unwrap()).into_owned();
    let refreshed = answered
        .split("\"refresh_token\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("A's refresh was answered with a refresh token")
        .to_owned();
    let store = PgStore::open(
        &settings(&cluster.db),
        &KeySource::File(cluster.dir.path().join("shared.key")),
        None,
    )
    .await
    .unwrap();
    let record = store.load("winner").await.unwrap().unwrap().record;
    let stored = record.refresh_token.unwrap();
    assert_ne!(
        stored, refreshed,
        "the refresh in flight overwrote the authorization"
    );
    assert_ne!(Some(stored), account.refresh_token);
    // A uses the authorization's tokens.
    assert!(imap_login(a.imaps, &account).await.starts_with("a OK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_says_whether_the_database_is_reachable_and_never_shows_its_password() {
    use support::cli::mailgate;
    let _shared = DATABASE.read().await;
    let h = harness();
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let write = |top: String| {
        let options = Options {
            top,
            ..Options::default()
        };
        let config = dir.path().join("mailgate.toml");
        std::fs::write(&config, support::config_toml(dir.path(), &[], &options)).unwrap();
        config
    };
    let key = dir.path().join("token.key");
    let check = |config: &std::path::Path| {
        let out = mailgate(config).arg("check-config").output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let password = std::fs::read_to_string(&h.pg_password_file).unwrap();
    let config = write(support::pg_store_toml(&db, &key));
    let (ok, text) = check(&config);
    assert!(ok, "{text}");
    assert!(
        text.contains("store: reachable; no mailgate tables yet"),
        "{text}"
    );
    // check-config creates nothing: neither tables nor the key.
    assert!(!key.exists());
    drop(
        PgStore::open(&settings(&db), &KeySource::File(key.clone()), None)
            .await
            .unwrap(),
    );
    let (ok, text) = check(&config);
    assert!(
        ok && text.contains("store: reachable, schema version 2"),
        "{text}"
    );
    assert!(!text.contains(password.trim()), "{text}");
    // The password from the environment is not shown either.
    let out = mailgate(&config)
        .arg("check-config")
        .env("MAILGATE_STORE_PASSWORD", password.trim())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("password from MAILGATE_STORE_PASSWORD"),
        "{text}"
    );
    assert!(!text.contains(password.trim()), "{text}");
    // A database that isn't there fails the check, saying so.
    let closed = support::free_port();
    let config = write(
        support::pg_store_toml(&db, &key)
            .replace(&format!(":{}/", h.pg_port), &format!(":{closed}/")),
    );
    let (ok, text) = check(&config);
    assert!(!ok && text.contains("store unreachable"), "{text}");
    // A password in the URL is refused, and not repeated.
    let config = write(support::pg_store_toml(&db, &key).replace(
        &format!("{}@", h.pg_user),
        &format!("{}:{}@", h.pg_user, password.trim()),
    ));
    let (ok, text) = check(&config);
    assert!(!ok && text.contains("must not hold the password"), "{text}");
    assert!(!text.contains(password.trim()), "{text}");
}

/// `invalid_grant` while another writer saved new tokens: the record is read
/// again before the account is marked, and the new tokens serve the login.
/// The token endpoint is a fake (the real one can't be timed against the
/// save): it saves the other writer's record, then refuses the grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_grant_rereads_the_record_before_marking_the_account() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _shared = DATABASE.read().await;
    let h = harness();
    h.seed("reread@example.test");
    let grant = h.authorize(support::CLIENT, "reread@example.test");
    let cluster = Cluster::new().await;
    let key = cluster.dir.path().join("shared.key");
    let store = PgStore::open(&settings(&cluster.db), &KeySource::File(key), None)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let (store, requests) = (store.clone(), requests.clone());
        let (access, refresh) = (grant.access_token.clone(), grant.refresh_token.clone());
        async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                requests.fetch_add(1, Ordering::SeqCst);
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs();
                let record = Record {
                    refresh_token: Some(refresh.clone()),
                    access_token: Some(access.clone()),
                    obtained_at: now,
                    expires_at: now + 3600,
                    last_refresh: now,
                    ..Record::default()
                };
                store
                    .save("reread", &record, Version(0), None)
                    .await
                    .unwrap();
                let body =
                    r#"{"error":"invalid_grant","error_description":"refresh token already used"}"#;
                let answer = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            }
        }
    });
    let account = Account {
        token_url: Some(url),
        refresh_token: Some("spent-refresh-token".into()),
        ..Account::authorized_without_grant("reread", "reread@example.test")
    };
    let gateway = Gateway::start_options(
        tempfile::tempdir().unwrap(),
        std::slice::from_ref(&account),
        &cluster.options("refresh_in_background = false", None),
    )
    .await;
    let reply = imap_login(gateway.imaps, &account).await;
    assert!(reply.starts_with("a OK"), "{reply}");
    assert_eq!(requests.load(Ordering::SeqCst), 1);
    let record = store.load("reread").await.unwrap().unwrap().record;
    assert!(record.needs_authorization.is_none(), "{record:?}");
    gateway.stop().await;
}
