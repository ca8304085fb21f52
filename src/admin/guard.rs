//! Who may use the integrations page, in the order a request meets it:
//! 1. the `Host` header must name this gateway (its public URL's host,
//!    `localhost` or an IP address), so that a DNS-rebinding page can't
//!    make itself same-origin with us;
//! 2. loopback peers are let in; others need the admin credential from the
//!    config (HTTP Basic over the HTTPS listener), and without one in the
//!    config they get 403;
//! 3. actions are POSTs carrying a CSRF token that only this page shows
//!    (an HMAC under a per-process key), from a same-origin page.

use std::net::SocketAddr;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use ring::hmac;
use tracing::{info, warn};

use super::page::{refuse, ActionForm};
use super::AdminState;
use crate::account::{verify_hash, Remembered};
use crate::config::{AdminCredential, HttpSettings};
use crate::secret::Secret;

/// The guard's memory, per process: the CSRF key and the admin's
/// remembered credential.
pub struct Guard {
    csrf_key: hmac::Key,
    admin: Remembered,
    /// One admin password verification at a time: argon2 is slow on purpose.
    verifications: tokio::sync::Semaphore,
}

impl Guard {
    /// A fresh guard with new random keys.
    ///
    /// # Errors
    /// Only if the system's random source fails.
    pub fn new() -> Result<Self, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        Ok(Self {
            csrf_key: hmac::Key::generate(hmac::HMAC_SHA256, &rng)?,
            admin: Remembered::new()?,
            verifications: tokio::sync::Semaphore::new(1),
        })
    }

    /// The token every action form carries.
    pub fn csrf_token(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(hmac::sign(&self.csrf_key, b"mailgate admin page").as_ref())
    }

    fn csrf_ok(&self, presented: &str) -> bool {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(presented)
            .is_ok_and(|tag| hmac::verify(&self.csrf_key, b"mailgate admin page", &tag).is_ok())
    }
}

/// Lets the request through, or answers it.
pub async fn admit(s: &AdminState, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Response> {
    let services = s.services.get();
    let Some(http) = services.config.http.as_ref() else {
        return Err(super::page::not_found());
    };
    if !host_is_ours(headers, http.public_url.host_str()) {
        return Err(refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "Unexpected Host",
            "Open the page at the gateway's own address (its public URL, localhost or an IP address).",
        ));
    }
    let admin = match access(peer, http, headers) {
        Access::Open => return Ok(()),
        Access::Refused => {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "Loopback only",
                "The integrations page is served only to the gateway's own host. To reach it from elsewhere, \
                 set http.admin_password_hash (mailgate hash-password) in the config.",
            ))
        }
        Access::Password(admin) => admin,
    };
    if let Some((user, password)) = basic_credentials(headers) {
        let hash = admin.password_hash.expose();
        let password = password.expose().as_bytes();
        if user == admin.username && s.page.guard.admin.contains(&user, password, hash) {
            return Ok(());
        }
        // One verification at a time, and no waiting in line for long:
        // bad guesses must not lock the admin out.
        let permit = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            s.page.guard.verifications.acquire(),
        )
        .await;
        let Ok(Ok(permit)) = permit else {
            return Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "Busy",
                "Too many sign-in attempts at once; try again in a moment.",
            ));
        };
        let (hash_owned, password_owned) = (hash.clone(), password.to_vec());
        let verified =
            tokio::task::spawn_blocking(move || verify_hash(&hash_owned, &password_owned))
                .await
                .unwrap_or(false);
        drop(permit);
        if verified && user == admin.username {
            s.page.guard.admin.insert(&user, password, hash);
            return Ok(());
        }
        let user: String = user.chars().take(64).collect();
        info!(%peer, username = ?user, "admin page login failed");
        tokio::time::sleep(services.config.limits.login_failure_delay).await;
    }
    let mut response = refuse(
        StatusCode::UNAUTHORIZED,
        "Sign in",
        "The integrations page needs the admin credential from the config.",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"mailgate\", charset=\"UTF-8\""),
    );
    Err(response)
}

/// Who may see the page.
#[derive(Debug, PartialEq, Eq)]
enum Access<'a> {
    Open,
    Password(&'a AdminCredential),
    Refused,
}

/// Loopback peers are let in, unless the config asks them for the password
/// too; other peers need the password, and without one configured they
/// are refused.
fn access<'a>(peer: SocketAddr, http: &'a HttpSettings, headers: &HeaderMap) -> Access<'a> {
    // A request a proxy forwarded comes from loopback but isn't local.
    let forwarded = ["forwarded", "x-forwarded-for", "x-real-ip"]
        .iter()
        .any(|h| headers.contains_key(*h));
    let loopback = peer.ip().to_canonical().is_loopback() && !forwarded;
    match &http.admin {
        _ if loopback && !http.admin_password_on_loopback => Access::Open,
        Some(admin) => Access::Password(admin),
        None => Access::Refused,
    }
}

/// Whether the `Host` header names us: the public URL's host, `localhost`,
/// or an IP address (which no rebinding attack can forge).
fn host_is_ours(headers: &HeaderMap, public_host: Option<&str>) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    // host = name [ ":" port ] / "[" v6 "]" [ ":" port ]
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, "")) => (v6, None),
            Some((v6, after)) => match after.strip_prefix(':') {
                Some(port) => (v6, Some(port)),
                None => return false,
            },
            None => return false,
        },
        None => match host.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (host, None),
        },
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let name = name.strip_suffix('.').unwrap_or(name);
    port_ok
        && !name.is_empty()
        && (name.parse::<std::net::IpAddr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || public_host.is_some_and(|p| {
                p.trim_start_matches('[')
                    .trim_end_matches(']')
                    .eq_ignore_ascii_case(name)
            }))
}

/// The user and password of an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, Secret<String>)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = Secret::new(String::from_utf8(decoded).ok()?);
    let (user, password) = text.expose().split_once(':')?;
    Some((user.to_owned(), Secret::new(password.to_owned())))
}

/// Checks an action's CSRF token and that it came from a same-origin page;
/// the refusal if not.
pub fn refuse_action(s: &AdminState, headers: &HeaderMap, form: &ActionForm) -> Option<Response> {
    let fetch_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("same-origin");
    if !matches!(fetch_site, "same-origin" | "none") || !s.page.guard.csrf_ok(&form.csrf) {
        warn!("admin page action refused: missing or wrong CSRF token, or a cross-site request");
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "Refused",
            "This action must come from the integrations page itself. Reload the page and try again.",
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).unwrap());
        h
    }

    #[test]
    fn loopback_is_open_by_default_and_elsewhere_needs_the_password() {
        let mut http = HttpSettings {
            address: "0.0.0.0:8443".parse().unwrap(),
            tls: crate::config::HttpTls::Implicit,
            public_url: "https://mail.example.com:8443/".parse().unwrap(),
            admin: None,
            admin_password_on_loopback: false,
        };
        let loopback: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        let remote: SocketAddr = "192.0.2.7:5000".parse().unwrap();
        let none = HeaderMap::new();
        assert_eq!(access(loopback, &http, &none), Access::Open);
        assert_eq!(access(mapped, &http, &none), Access::Open);
        assert_eq!(access(remote, &http, &none), Access::Refused);
        let mut proxied = HeaderMap::new();
        proxied.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        assert_eq!(access(loopback, &http, &proxied), Access::Refused);
        let admin = AdminCredential {
            username: "admin".into(),
            password_hash: crate::secret::Secret::new("$argon2id$...".into()),
        };
        http.admin = Some(admin.clone());
        assert_eq!(access(loopback, &http, &none), Access::Open);
        assert_eq!(access(remote, &http, &none), Access::Password(&admin));
        assert_eq!(access(loopback, &http, &proxied), Access::Password(&admin));
        http.admin_password_on_loopback = true;
        assert_eq!(access(loopback, &http, &none), Access::Password(&admin));
    }

    #[test]
    fn only_our_own_host_names_pass() {
        let public = Some("mail.example.com");
        for ok in [
            "mail.example.com",
            "MAIL.example.com:8443",
            "127.0.0.1:8080",
            "[::1]:8080",
            "localhost:1234",
            "10.0.0.5",
            "mail.example.com.",
        ] {
            assert!(host_is_ours(&headers(ok), public), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "mail.example.com.evil",
            "",
        ] {
            assert!(!host_is_ours(&headers(bad), public), "{bad}");
        }
        assert!(!host_is_ours(&HeaderMap::new(), public));
    }

    #[test]
    fn basic_credentials_are_parsed_and_junk_is_not() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YWRtaW46cDpzcw=="), // admin:p:ss
        );
        let (user, password) = basic_credentials(&h).unwrap();
        assert_eq!(
            (user.as_str(), password.expose().as_str()),
            ("admin", "p:ss")
        );
        for junk in ["Bearer abc", "Basic !!!", "Basic", "Basic YWRtaW4="] {
            h.insert(header::AUTHORIZATION, HeaderValue::from_static(junk));
            assert!(basic_credentials(&h).is_none(), "{junk}");
        }
    }

    #[test]
    fn csrf_tokens_are_per_process() {
        let a = Guard::new().unwrap();
        let b = Guard::new().unwrap();
        assert!(a.csrf_ok(&a.csrf_token()));
        assert!(!a.csrf_ok(&b.csrf_token()));
        assert!(!a.csrf_ok(""));
        assert!(!a.csrf_ok("not base64 at all!"));
    }
}
