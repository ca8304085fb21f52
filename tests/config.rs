//! The config: every example in config/ parses; bad values name their key;
//! environment overrides apply; secrets never show.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cloned_ref_to_slice_refs,
    clippy::result_large_err
)] // tests may panic

use std::path::Path;
use std::process::Command;

use figment::providers::{Env, Format as _, Toml};
use figment::{Figment, Jail};
use mailgate::config::{Config, ConfigError, ListenerTls};

const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$rS2VPIxCZDpOgvZJl0PePw$f3lmjbIrteUNm46qzVMxuh+obrM7KGBmFBzKS02Fwrc";

fn base(extra: &str) -> String {
    format!(
        r#"
state_dir = "/tmp/mg"
[[listeners]]
protocol = "imap"
address = "127.0.0.1:1993"
tls = "implicit"
[integrations.g]
provider = "google"
client_id = "id"
client_secret = "very-secret-client-secret"
[accounts.jira]
password_hash = "{HASH}"
integration = "g"
mailbox = "jira@example.com"
refresh_token = "very-secret-refresh-token"
{extra}"#
    )
}

fn parse(toml: &str) -> Result<Config, ConfigError> {
    Config::from_figment(Figment::new().merge(Toml::string(toml)))
}

fn error_of(toml: &str) -> String {
    match parse(toml) {
        Ok(_) => panic!("config was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            // Secrets referenced by env or file must exist for validation.
            Jail::expect_with(|jail| {
                jail.set_env("M365_CLIENT_SECRET", "x");
                let text = std::fs::read_to_string(&path).unwrap();
                let secret = jail.directory().join("app.secret");
                std::fs::write(&secret, "s\n").unwrap();
                let text = text
                    .replace("/etc/mailgate/m365-app.secret", secret.to_str().unwrap())
                    .replace("/etc/mailgate/corp.secret", secret.to_str().unwrap())
                    .replace("/etc/mailgate/db-password", secret.to_str().unwrap());
                // Certificate files named by the examples, made here.
                let generated =
                    rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
                let (cert, key) = (
                    jail.directory().join("cert.pem"),
                    jail.directory().join("key.pem"),
                );
                std::fs::write(&cert, generated.cert.pem()).unwrap();
                std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
                let text = text
                    .replace("/etc/mailgate/fullchain.pem", cert.to_str().unwrap())
                    .replace("/etc/mailgate/privkey.pem", key.to_str().unwrap())
                    .replace("/etc/mailgate/m365-app.pem", cert.to_str().unwrap())
                    .replace("/etc/mailgate/m365-app.key", key.to_str().unwrap())
                    .replace("/etc/mailgate/db-ca.pem", cert.to_str().unwrap());
                let config = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
                assert!(!config.listeners.is_empty());
                Ok(())
            });
            count += 1;
        }
    }
    assert!(
        count >= 5,
        "expected the Google, Microsoft, Microsoft app-only, custom and cluster examples in {}",
        dir.display()
    );
}

#[test]
fn provider_defaults_are_filled_in() {
    let c = parse(&base("")).unwrap();
    let g = &c.integrations["g"];
    assert_eq!(
        g.token_endpoint.as_str(),
        "https://oauth2.googleapis.com/token"
    );
    assert_eq!(
        g.authorization_endpoint.as_str(),
        "https://accounts.google.com/o/oauth2/auth"
    );
    assert_eq!(g.scopes, ["https://mail.google.com/"]);
    let a = &c.accounts["jira"];
    let imap = a.upstream(imap_protocol()).unwrap();
    assert_eq!((imap.host.as_str(), imap.port), ("imap.gmail.com", 993));
    let pop3 = a.upstream(pop3_protocol()).unwrap();
    assert_eq!((pop3.host.as_str(), pop3.port), ("pop.gmail.com", 995));
    assert_eq!(a.username, "jira", "username defaults to the account name");

    let ms = parse(&base("").replace(
        "provider = \"google\"",
        "provider = \"microsoft\"\ntenant = \"contoso.onmicrosoft.com\"",
    ))
    .unwrap();
    let m = &ms.integrations["g"];
    assert_eq!(
        m.token_endpoint.as_str(),
        "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
    );
    assert!(m.scopes.iter().any(|s| s == "offline_access"));
    let ms_account = &ms.accounts["jira"];
    assert_eq!(
        ms_account.upstream(imap_protocol()).unwrap().host,
        "outlook.office365.com"
    );
    assert_eq!(ms_account.upstream(pop3_protocol()).unwrap().port, 995);
}

#[test]
fn errors_name_the_offending_key() {
    let cases = [
        (base("surprise = 1"), "surprise"),
        (
            base("").replace(
                "127.0.0.1:1993\"\ntls = \"implicit\"",
                "0.0.0.0:143\"\ntls = \"plaintext\"",
            ),
            "listeners[0].tls",
        ),
        (
            base("").replace("address = \"127.0.0.1:1993\"", "address = \"nowhere\""),
            "listeners[0].address",
        ),
        (
            base("").replace("integration = \"g\"", "integration = \"ms\""),
            "accounts.jira.integration: no integration named \"ms\"",
        ),
        (
            base("").replace(HASH, "plaintext-password"),
            "accounts.jira.password_hash",
        ),
        (
            base("").replace("provider = \"google\"", "provider = \"custom\""),
            "integrations.g.authorization_endpoint",
        ),
        (
            base("").replace(
                "provider = \"google\"",
                "provider = \"google\"\ntoken_endpoint = \"http://oauth.example.com/token\"",
            ),
            "integrations.g.token_endpoint: must be https",
        ),
        (
            base("").replace(
                "provider = \"google\"",
                "provider = \"google\"\ntoken_endpoint = \"http://127.0.0.1:9/token\"",
            ),
            "allow_insecure_loopback_http",
        ),
        (
            base("").replace(
                "client_secret = ",
                "client_secret_env = \"NOPE_NOT_SET\"\n#",
            ),
            "integrations.g.client_secret_env",
        ),
        (
            base("[accounts.jira.imap]\naddress = \"imap.example.com\""),
            "accounts.jira.imap.address",
        ),
        (
            base("").replace(
                "provider = \"google\"",
                "provider = \"google\"\ntenant = \"common\"",
            ),
            "integrations.g.tenant",
        ),
        (
            base("[http]\naddress = \"127.0.0.1:8080\"\ntls = \"plaintext\"\nadmin_password_hash = \"hunter2\""),
            "http.admin_password_hash: not a PHC hash string",
        ),
        (
            base("[http]\naddress = \"127.0.0.1:8080\"\ntls = \"plaintext\"\nadmin_username = \"root\""),
            "http.admin_password_hash: admin_username is set",
        ),
        (
            base("[http]\naddress = \"127.0.0.1:8080\"\ntls = \"plaintext\"\nadmin_password_on_loopback = true"),
            "http.admin_password_hash: admin_password_on_loopback needs",
        ),
    ];
    for (toml, want) in cases {
        let err = error_of(&toml);
        assert!(err.contains(want), "error {err:?} should mention {want:?}");
    }
}

#[test]
fn loopback_http_endpoints_need_the_explicit_switch() {
    let toml = base("[oauth]\nallow_insecure_loopback_http = true").replace(
        "provider = \"google\"",
        "provider = \"google\"\ntoken_endpoint = \"http://127.0.0.1:9/token\"",
    );
    assert_eq!(
        parse(&toml).unwrap().integrations["g"]
            .token_endpoint
            .as_str(),
        "http://127.0.0.1:9/token"
    );
}

#[test]
fn plaintext_and_starttls_listeners() {
    let c = parse(&base("[[listeners]]\nprotocol = \"imap\"\naddress = \"[::1]:1143\"\ntls = \"plaintext\"\n[[listeners]]\nprotocol = \"imap\"\naddress = \"0.0.0.0:143\"\ntls = \"starttls\"")).unwrap();
    assert_eq!(c.listeners[1].tls, ListenerTls::Plaintext);
    assert_eq!(c.listeners[2].tls, ListenerTls::StartTls);
}

#[test]
fn environment_overrides_the_file() {
    Jail::expect_with(|jail| {
        jail.create_file("mailgate.toml", &base(""))?;
        jail.set_env("MAILGATE_ACCOUNTS__JIRA__MAILBOX", "other@example.com");
        jail.set_env("MAILGATE_STATE_DIR", "/srv/mailgate");
        let c = Config::from_figment(
            Figment::new()
                .merge(Toml::file("mailgate.toml"))
                .merge(Env::prefixed("MAILGATE_").split("__")),
        )
        .map_err(|e| e.to_string())?;
        assert_eq!(c.accounts["jira"].mailbox, "other@example.com");
        assert_eq!(c.state_dir, Path::new("/srv/mailgate"));
        Ok(())
    });
}

#[test]
fn secrets_never_show_in_debug_or_summary() {
    let c = parse(&base("")).unwrap();
    for shown in [format!("{c:?}"), c.summary()] {
        assert!(!shown.contains("very-secret-client-secret"), "{shown}");
        assert!(!shown.contains("very-secret-refresh-token"), "{shown}");
    }
}

#[test]
fn check_config_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        base("").replace("integration = \"g\"", "integration = \"ms\""),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .args(["--config", bad.to_str().unwrap(), "check-config"])
        .env_remove("MAILGATE_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("accounts.jira.integration"));

    let good = dir.path().join("good.toml");
    std::fs::write(&good, base("")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .args(["--config", good.to_str().unwrap(), "check-config"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("client secret set"), "{stdout}");
    assert!(!stdout.contains("very-secret"), "{stdout}");
}

#[test]
fn config_is_accepted_after_the_command_too() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, base("")).unwrap();
    for args in [
        ["check-config", "--config", good.to_str().unwrap()],
        ["check-config", "-c", good.to_str().unwrap()],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mailgate"))
            .args(args)
            .env_remove("MAILGATE_CONFIG")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("config OK"));
    }
}

#[test]
fn hash_password_reads_stdin_and_makes_a_verifiable_argon2id_hash() {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.starts_with("$argon2id$"));
    assert!(!hash.contains("correct horse"));
    let c = parse(&base("").replace(HASH, hash.trim())).unwrap();
    let accounts = mailgate::account::Accounts::new(&c).unwrap();
    let creds = |u: &str, p: &[u8]| mailgate::proto::Credentials {
        username: u.into(),
        password: mailgate::secret::Secret::new(p.to_vec()),
        hello: None,
    };
    assert!(accounts.verify(&creds("jira", b"correct horse")).is_ok());
    assert!(accounts.verify(&creds("jira", b"correct horse\n")).is_err());
    // An unknown user and a wrong password fail the same way.
    assert_eq!(
        accounts
            .verify(&creds("nobody", b"correct horse"))
            .unwrap_err(),
        accounts.verify(&creds("jira", b"wrong")).unwrap_err()
    );
}

fn with_http(toml: &str) -> String {
    format!("{toml}\n[http]\naddress = \"127.0.0.1:8443\"\ntls = \"implicit\"\npublic_url = \"https://mailgate.example.com/gw/\"\n")
}

#[test]
fn redirect_url_is_derived_from_the_public_url_and_changes_with_an_endpoint() {
    let c = parse(&with_http(&base(""))).unwrap();
    let url = c.redirect_url(&c.integrations["g"]).unwrap();
    assert!(
        url.as_str()
            .starts_with("https://mailgate.example.com/gw/oauth2/callback/g-"),
        "{url}"
    );
    let moved = parse(&with_http(&base("").replace(
        "provider = \"google\"",
        "provider = \"google\"\ntoken_endpoint = \"https://oauth2.example.com/token\"",
    )))
    .unwrap();
    let moved_url = moved.redirect_url(&moved.integrations["g"]).unwrap();
    assert_ne!(
        url, moved_url,
        "changing an endpoint must change the redirect URL"
    );
    // The same config gives the same URL: it is stable across restarts.
    assert_eq!(
        url,
        parse(&with_http(&base("")))
            .unwrap()
            .redirect_url(&c.integrations["g"])
            .unwrap()
    );
    // Without [http] there is no redirect URL.
    assert!(parse(&base(""))
        .unwrap()
        .redirect_url(&c.integrations["g"])
        .is_none());
}

#[test]
fn redirect_url_command_prints_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.toml");
    std::fs::write(&path, with_http(&base(""))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mailgate"))
        .args(["--config", path.to_str().unwrap(), "redirect-url", "g"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let c = parse(&with_http(&base(""))).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        c.redirect_url(&c.integrations["g"]).unwrap().as_str()
    );
}

#[test]
fn http_listener_rules() {
    let plain_public = base("") + "\n[http]\naddress = \"0.0.0.0:80\"\ntls = \"plaintext\"\n";
    assert!(error_of(&plain_public).contains("http.tls"));
    let http_url = base("") + "\n[http]\naddress = \"0.0.0.0:443\"\ntls = \"implicit\"\npublic_url = \"http://mailgate.example.com\"\n";
    assert!(error_of(&http_url).contains("http.public_url: must be https"));
    let local = base("") + "\n[http]\naddress = \"127.0.0.1:8080\"\ntls = \"plaintext\"\n";
    let c = parse(&local).unwrap();
    assert_eq!(
        c.http.unwrap().public_url.as_str(),
        "http://127.0.0.1:8080/"
    );
}

#[test]
fn microsoft_clouds_tenants_and_device_endpoints() {
    let ms = |extra: &str| {
        parse(&base("").replace(
            "provider = \"google\"",
            &format!("provider = \"microsoft\"\n{extra}"),
        ))
        .unwrap()
    };
    let global = ms("tenant = \"organizations\"");
    let i = &global.integrations["g"];
    assert_eq!(
        i.device_authorization_endpoint.as_ref().unwrap().as_str(),
        "https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode"
    );
    let gov = ms("cloud = \"usgov\"");
    let i = &gov.integrations["g"];
    assert!(i
        .token_endpoint
        .as_str()
        .starts_with("https://login.microsoftonline.us/common/"));
    assert!(i
        .scopes
        .iter()
        .any(|s| s == "https://outlook.office365.us/IMAP.AccessAsUser.All"));
    assert_eq!(
        gov.accounts["jira"].upstream(imap_protocol()).unwrap().host,
        "outlook.office365.us"
    );
    let china = ms("cloud = \"china\"");
    assert!(china.integrations["g"]
        .authorization_endpoint
        .as_str()
        .starts_with("https://login.partner.microsoftonline.cn/"));
    assert_eq!(
        china.accounts["jira"]
            .upstream(pop3_protocol())
            .unwrap()
            .host,
        "partner.outlook.cn"
    );
    // Google has no device endpoint for mail.
    assert!(parse(&base("")).unwrap().integrations["g"]
        .device_authorization_endpoint
        .is_none());
    assert!(error_of(&base("").replace(
        "provider = \"google\"",
        "provider = \"google\"\ncloud = \"china\""
    ))
    .contains("integrations.g.cloud"));
}

#[test]
fn integration_tables_reject_unknown_keys_and_grants_need_their_credentials() {
    assert!(error_of(&base("").replace(
        "client_id = \"id\"",
        "client_id = \"id\"\nclient_secrets = \"typo\""
    ))
    .contains("client_secrets"));
    let cc = base("")
        .replace("client_secret = \"very-secret-client-secret\"", "")
        .replace(
            "refresh_token = \"very-secret-refresh-token\"",
            "grant = \"client_credentials\"",
        );
    assert!(error_of(&cc)
        .contains("accounts.jira.grant: client_credentials needs a client secret or certificate"));
    let jwt = base("").replace(
        "refresh_token = \"very-secret-refresh-token\"",
        "grant = \"jwt_bearer\"",
    );
    assert!(error_of(&jwt).contains("service_account_file"));
    assert!(error_of(&base("").replace(
        "provider = \"google\"",
        "provider = \"google\"\nclient_secret_expires = \"2027-13-01\""
    ))
    .contains("client_secret_expires"));
}

#[test]
fn the_store_key_comes_from_the_environment_or_a_key_file() {
    Jail::expect_with(|jail| {
        jail.set_env("MAILGATE_TOKEN_KEY", "ab".repeat(32));
        let c = parse(&base("")).map_err(|e| e.to_string())?;
        assert!(matches!(c.store_key, mailgate::oauth::KeySource::Hex(_)));
        assert!(!format!("{:?}", c.store_key).contains("abab"));
        Ok(())
    });
    let c = parse(&base("[store]\nkey_file = \"/etc/mailgate/token.key\"")).unwrap();
    assert_eq!(
        c.store_key,
        mailgate::oauth::KeySource::File("/etc/mailgate/token.key".into())
    );
    assert_eq!(
        parse(&base("")).unwrap().store_key,
        mailgate::oauth::KeySource::File("/tmp/mg/token.key".into())
    );
}

#[test]
fn behind_a_reverse_proxy_loopback_peers_need_the_admin_password() {
    let http = |extra: &str| {
        parse(&base(&format!(
            "[http]\naddress = \"127.0.0.1:8080\"\ntls = \"plaintext\"\n{extra}"
        )))
        .unwrap()
        .http
        .unwrap()
    };
    // Loopback only, browsed on this host: loopback is trusted.
    assert!(!http("").admin_password_on_loopback);
    // Plain HTTP on loopback with a public https URL: a proxy is in front.
    assert!(http("public_url = \"https://mail-gw.example.com\"").admin_password_on_loopback);
    assert!(
        !http("public_url = \"https://mail-gw.example.com\"\nadmin_password_on_loopback = false")
            .admin_password_on_loopback
    );
}

fn imap_protocol() -> mailgate::protocol::Protocol {
    mailgate::protocol::Protocol::from_name("imap").unwrap()
}

fn pop3_protocol() -> mailgate::protocol::Protocol {
    mailgate::protocol::Protocol::from_name("pop3").unwrap()
}

fn smtp_protocol() -> mailgate::protocol::Protocol {
    mailgate::protocol::Protocol::from_name("smtp").unwrap()
}

/// SMTP submission: listeners, the providers' submission hosts and
/// session caps, SMTP.Send in Microsoft's scopes, the mechanism switch.
#[test]
fn smtp_listeners_and_provider_defaults() {
    let smtp =
        "[[listeners]]\nprotocol = \"smtp\"\naddress = \"127.0.0.1:1587\"\ntls = \"starttls\"\n";
    let c = parse(&base(smtp)).unwrap();
    assert_eq!(c.listeners[1].protocol, smtp_protocol());
    assert_eq!(c.listeners[1].tls, ListenerTls::StartTls);
    let gmail = c.accounts["jira"].upstream(smtp_protocol()).unwrap();
    assert_eq!(
        (
            gmail.host.as_str(),
            gmail.port,
            gmail.tls,
            gmail.max_sessions
        ),
        (
            "smtp.gmail.com",
            465,
            mailgate::proto::UpstreamTls::Implicit,
            None
        )
    );
    assert_eq!(
        c.integrations["g"].mechanism,
        mailgate::proto::sasl::OAuthMechanism::XOAuth2
    );

    let ms = parse(&base("").replace("provider = \"google\"", "provider = \"microsoft\"")).unwrap();
    let office = ms.accounts["jira"].upstream(smtp_protocol()).unwrap();
    assert_eq!(
        (
            office.host.as_str(),
            office.port,
            office.tls,
            office.max_sessions
        ),
        (
            "smtp.office365.com",
            587,
            mailgate::proto::UpstreamTls::StartTls,
            Some(3)
        )
    );
    assert_eq!(
        ms.integrations["g"].scopes,
        [
            "https://outlook.office.com/IMAP.AccessAsUser.All",
            "https://outlook.office.com/POP.AccessAsUser.All",
            "https://outlook.office.com/SMTP.Send",
            "offline_access"
        ]
    );
    for (cloud, host) in [
        ("usgov", "smtp.office365.us"),
        ("china", "smtp.partner.outlook.cn"),
    ] {
        let c = parse(&base("").replace(
            "provider = \"google\"",
            &format!("provider = \"microsoft\"\ncloud = \"{cloud}\""),
        ))
        .unwrap();
        assert_eq!(
            c.accounts["jira"].upstream(smtp_protocol()).unwrap().host,
            host
        );
    }

    let bearer = parse(&base("").replace(
        "client_id = \"id\"",
        "client_id = \"id\"\nmechanism = \"oauthbearer\"",
    ))
    .unwrap();
    assert_eq!(
        bearer.integrations["g"].mechanism,
        mailgate::proto::sasl::OAuthMechanism::OAuthBearer
    );
    let capped = parse(&base(
        "[accounts.jira.smtp]\naddress = \"smtp.example.com:587\"\ntls = \"starttls\"\nmax_sessions = 2",
    ))
    .unwrap();
    assert_eq!(
        capped.accounts["jira"]
            .upstream(smtp_protocol())
            .unwrap()
            .max_sessions,
        Some(2)
    );
    assert!(error_of(&base(
        "[accounts.jira.smtp]\naddress = \"smtp.example.com:587\"\nmax_sessions = 0"
    ))
    .contains("accounts.jira.smtp.max_sessions"));
    let unknown = error_of(&base("[accounts.jira.smtpp]\naddress = \"x:1\""));
    assert!(
        unknown.contains("accounts.jira.smtpp") && unknown.contains("smtp"),
        "{unknown}"
    );
    assert!(error_of(&base("").replace(
        "[[listeners]]\nprotocol = \"imap\"",
        "[[listeners]]\nprotocol = \"lmtp\""
    ))
    .contains("unknown protocol"));
    assert!(
        error_of(&base("").replace("state_dir", "hostname = \"bad name\"\nstate_dir"))
            .contains("hostname")
    );
}

/// `check-config` warns about a listener certificate that expires within
/// 30 days, and says when any expires.
#[test]
fn check_config_warns_about_a_certificate_that_expires_soon() {
    let dir = tempfile::tempdir().unwrap();
    let date = |offset: &str| -> (i32, u8, u8) {
        let out = Command::new("date")
            .args(["-u", "-d", offset, "+%Y %m %d"])
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let mut parts = text.split_whitespace().map(|p| p.parse::<i32>().unwrap());
        let (y, m, d) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        (y, u8::try_from(m).unwrap(), u8::try_from(d).unwrap())
    };
    for (offset, warned) in [("+10 days", true), ("+200 days", false)] {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        let (y, m, d) = date(offset);
        params.not_after = rcgen::date_time_ymd(y, m, d);
        let cert = params.self_signed(&key).unwrap();
        let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        let config = dir.path().join("m.toml");
        std::fs::write(
            &config,
            base(&format!(
                "[certificate]\ncert = \"{}\"\nkey = \"{}\"",
                cert_path.display(),
                key_path.display()
            )),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_mailgate"))
            .args(["--config", config.to_str().unwrap(), "check-config"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        assert!(stdout.contains("certificate expires: "), "{stdout}");
        assert_eq!(
            stdout.contains("WARNING: the listener certificate"),
            warned,
            "{stdout}"
        );
    }
}

/// `credential:NAME` in a file setting names a systemd credential
/// (`LoadCredential=NAME:...`), read from `$CREDENTIALS_DIRECTORY`.
#[test]
fn systemd_credentials_hold_the_client_secret_and_the_store_key() {
    let toml = base("[store]\nkey_file = \"credential:token.key\"").replace(
        "client_secret = \"very-secret-client-secret\"",
        "client_secret_file = \"credential:google.secret\"",
    );
    Jail::expect_with(|jail| {
        let creds = jail.directory().join("creds");
        std::fs::create_dir(&creds).unwrap();
        std::fs::write(creds.join("google.secret"), "from-a-credential\n").unwrap();
        jail.set_env("CREDENTIALS_DIRECTORY", creds.to_str().unwrap());
        let config = parse(&toml).unwrap();
        assert_eq!(
            config.integrations["g"]
                .client_secret
                .as_ref()
                .unwrap()
                .expose(),
            "from-a-credential"
        );
        assert_eq!(
            config.store_key,
            mailgate::config::KeySource::File(creds.join("token.key"))
        );
        Ok(())
    });
    Jail::expect_with(|_| {
        let e = parse(&toml).unwrap_err().to_string();
        assert!(
            e.contains("CREDENTIALS_DIRECTORY is not set") && e.contains("LoadCredential="),
            "{e}"
        );
        Ok(())
    });
}
