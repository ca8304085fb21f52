//! Monitoring as a new user sets it up: a real Prometheus (Debian's
//! `prometheus`) scrapes two gateways every 2 s and evaluates
//! `config/alerts.yml` (a copy with `for: 0s`). Failures are driven for
//! real: an upstream down from the start, a token endpoint down from the
//! start, a revoked grant, a client secret near its expiry. Each matching
//! rule must hold and fire, the healthy parts must stay silent, and every
//! query of `config/grafana-dashboard.json` must run and name only
//! metrics mailgate exports.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, harness, Account, Gateway, Options, RawClient};

/// A Prometheus server on loopback, stopped (by its pid) when dropped.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[u16]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rules = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/alerts.yml"),
        )
        .unwrap();
        // The shipped rules, with no waiting before they fire.
        let rules: String = rules
            .lines()
            .map(|l| match l.trim_start().strip_prefix("for:") {
                Some(_) => l.split("for:").next().unwrap().to_owned() + "for: 0s",
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.path().join("alerts.yml"), rules).unwrap();
        let targets: Vec<String> = targets.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
        std::fs::write(
            dir.path().join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\n\
                 rule_files: [alerts.yml]\n\
                 scrape_configs:\n  - job_name: mailgate\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
            .spawn()
            .expect("prometheus (Debian package prometheus, installed by tests/harness/setup)");
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> serde_json::Value {
        let response = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{}/api/v1/{path}", self.port))
            .query(query)
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }

    /// The result of an instant query; panics on a query error.
    async fn query(&self, expr: &str) -> Vec<serde_json::Value> {
        let answer = self.api("query", &[("query", expr)]).await;
        assert_eq!(answer["status"], "success", "{expr}: {answer}");
        answer["data"]["result"].as_array().unwrap().clone()
    }

    async fn ready(&self) {
        for _ in 0..200 {
            let url = format!("http://127.0.0.1:{}/-/ready", self.port);
            if reqwest::get(url)
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("prometheus never became ready");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The expression of alert `name` in `config/alerts.yml`.
fn rule_expr(name: &str) -> String {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/alerts.yml"))
            .unwrap();
    let at = text.find(&format!("- alert: {name}\n")).expect(name);
    text[at..]
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("expr: "))
        .unwrap()
        .to_owned()
}

/// Waits until `expr` returns something (the rule's condition holds), and
/// returns the series.
async fn holds(prometheus: &Prometheus, expr: &str) -> Vec<serde_json::Value> {
    let until = Instant::now() + Duration::from_secs(40);
    loop {
        let result = prometheus.query(expr).await;
        if !result.is_empty() {
            return result;
        }
        assert!(Instant::now() < until, "never held: {expr}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn labels(series: &[serde_json::Value], label: &str) -> Vec<String> {
    let mut values: Vec<String> = series
        .iter()
        .filter_map(|s| s["metric"][label].as_str().map(str::to_owned))
        .collect();
    values.sort();
    values
}

async fn login(address: std::net::SocketAddr, account: &Account) -> String {
    let (mut c, _) = RawClient::connect(address).await;
    c.send(format!("a LOGIN {} \"{}\"\r\n", account.name, account.password).as_bytes())
        .await;
    c.until_tagged("a").await.last().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_fires_the_matching_alerts_and_no_others() {
    let h = harness();
    for mailbox in [
        "mon-ok@example.test",
        "mon-revoked@example.test",
        "mon-expiring@example.test",
    ] {
        h.seed(mailbox);
    }
    // Gateway "broken": its upstream was never reachable, and neither was
    // one account's token endpoint.
    let closed = format!("127.0.0.1:{}", free_port());
    let nodial = Account {
        upstream: (closed.clone(), "implicit"),
        ..Account::authorized("nodial", "mon-ok@example.test")
    };
    let notoken = Account {
        token_url: Some(format!("http://{closed}/token")),
        ..Account::authorized("notoken", "mon-ok@example.test")
    };
    let broken_port = free_port();
    let broken = Gateway::start_options(
        tempfile::tempdir().unwrap(),
        &[nodial.clone(), notoken.clone()],
        &Options {
            http_port: Some(broken_port),
            oauth: "retry_backoff = \"1s\"".into(),
            ..Options::default()
        },
    )
    .await;
    // Gateway "mixed": a healthy account, a revoked grant, and a client
    // secret that expires in 3 days.
    let healthy = Account::authorized("healthy", "mon-ok@example.test");
    let revoked = Account::authorized("revoked", "mon-revoked@example.test");
    h.revoke(
        support::CLIENT,
        revoked.refresh_token.as_deref().unwrap(),
        "refresh_token",
    )
    .await;
    let in_3_days = {
        let out = Command::new("date")
            .args(["-u", "-d", "+3 days", "+%Y-%m-%d"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let expiring = Account {
        integration_extra: format!("client_secret_expires = \"{in_3_days}\""),
        ..Account::authorized("expiring", "mon-expiring@example.test")
    };
    let mixed_port = free_port();
    let mixed = Gateway::start_options(
        tempfile::tempdir().unwrap(),
        &[healthy.clone(), revoked.clone(), expiring.clone()],
        &Options {
            http_port: Some(mixed_port),
            ..Options::default()
        },
    )
    .await;

    let prometheus = Prometheus::start(&[broken_port, mixed_port]);
    prometheus.ready().await;
    // Let it see the gateways before anything happens: the failures come
    // after the first scrape, as they would for a gateway started during
    // an outage.
    holds(&prometheus, "up{job=\"mailgate\"} == 1").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for _ in 0..8 {
        let reply = login(broken.imaps, &nodial).await;
        assert!(reply.starts_with("a NO [UNAVAILABLE]"), "{reply}");
    }
    assert!(login(broken.imaps, &notoken).await.starts_with("a NO"));
    for account in [&healthy, &expiring] {
        let reply = login(mixed.imaps, account).await;
        assert!(reply.starts_with("a OK"), "{reply}");
    }
    assert!(login(mixed.imaps, &revoked).await.starts_with("a NO"));

    let instance = |port: u16| format!("127.0.0.1:{port}");
    let failing = holds(&prometheus, &rule_expr("MailgateLoginsFailing")).await;
    assert_eq!(labels(&failing, "instance"), [instance(broken_port)]);
    let refreshes = holds(&prometheus, &rule_expr("MailgateTokenRefreshesFailing")).await;
    assert_eq!(labels(&refreshes, "integration"), ["notoken"]);
    let needs = holds(&prometheus, &rule_expr("MailgateAccountNeedsAuthorization")).await;
    assert_eq!(labels(&needs, "account"), ["revoked"]);
    let secret = holds(&prometheus, &rule_expr("MailgateClientSecretExpiringSoon")).await;
    assert_eq!(labels(&secret, "integration"), ["expiring"]);
    // The listener certificate's expiry reaches Prometheus from both
    // gateways (the harness certificate is far from expiring).
    let certificates = holds(
        &prometheus,
        "mailgate_listener_certificate_expiry_seconds > 86400",
    )
    .await;
    assert_eq!(certificates.len(), 2);
    // The healthy parts stay silent: nothing else fires.
    let mut firing = Vec::new();
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        let rules = prometheus.api("rules", &[("type", "alert")]).await;
        firing = rules["data"]["groups"][0]["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["state"] == "firing")
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect();
        firing.sort();
        if firing.len() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        firing,
        [
            "MailgateAccountNeedsAuthorization",
            "MailgateClientSecretExpiringSoon",
            "MailgateLoginsFailing",
            "MailgateTokenExpiringSoon",
            "MailgateTokenRefreshesFailing",
        ]
    );
    // The account whose token endpoint is down has no token, and says so;
    // the healthy ones don't.
    let expiring_tokens = prometheus
        .query(&rule_expr("MailgateTokenExpiringSoon"))
        .await;
    assert_eq!(labels(&expiring_tokens, "account"), ["notoken"]);

    // Every dashboard query runs, and names only metrics mailgate has.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/grafana-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let exported = mixed.metric_names();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            prometheus.query(expr).await;
            for name in metric_names_in(expr) {
                assert!(
                    exported.contains(&name),
                    "panel {:?} names {name}, which mailgate doesn't export",
                    panel["title"]
                );
            }
            queries += 1;
        }
    }
    assert!(queries >= 10);
    broken.stop().await;
    mixed.stop().await;
}

/// The `mailgate_*` metric names in a PromQL expression, histogram
/// suffixes taken off.
fn metric_names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("mailgate_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_owned();
        names.push(base);
    }
    assert!(!names.is_empty(), "{expr} names no mailgate metric");
    names
}
