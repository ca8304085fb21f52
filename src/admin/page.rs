//! The integrations page: every integration and account, with an
//! Authorize and a Test connection button per account. The config stays
//! the source of truth: the page shows it and acts on it, never edits it.
//!
//! Protection, in the order a request meets it:
//! 1. the `Host` header must name this gateway (its public URL's host,
//!    `localhost` or an IP address), so that a DNS-rebinding page can't
//!    make itself same-origin with us;
//! 2. loopback peers are let in; others need the admin credential from the
//!    config (HTTP Basic over the HTTPS listener), and without one in the
//!    config they get 403;
//! 3. actions are POSTs carrying a CSRF token that only this page shows
//!    (an HMAC under a per-process key), from a same-origin page.
//!
//! Responses carry a strict CSP (no inline script or style, no third-party
//! anything), `no-store`, `nosniff`, `no-referrer` and `frame-ancestors
//! 'none'`. The client secret is never shown, only whether it is set.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Form;
use base64::Engine as _;
use ring::hmac;
use tracing::{info, warn};

use super::authorize::Pending;
use super::{escape as e, secure, AdminState};
use crate::account::{verify_hash, Remembered};
use crate::config::{Account, AdminCredential, Config, Grant, HttpSettings, Integration};
use crate::oauth::{authorization_needed, format_relative, format_time, grant, unix_now, Record};
use crate::secret::Secret;
use crate::server::probe::{self, Step};
use crate::services::Services;

const CSS: &str = include_str!("page.css");
const JS: &str = include_str!("page.js");
const ICON: &str = include_str!("icon.svg");

/// What the page remembers between requests, in memory only.
pub struct PageState {
    csrf_key: hmac::Key,
    admin: Remembered,
    /// One admin password verification at a time: argon2 is slow on purpose.
    verifications: tokio::sync::Semaphore,
    notes: Mutex<HashMap<String, Notes>>,
}

/// The outcome of the last actions on an account, shown on its card.
#[derive(Clone, Default)]
struct Notes {
    /// When the last authorization ended, and how.
    authorization: Option<(u64, Result<(), String>)>,
    /// When the last Test connection ran, and its steps.
    test: Option<(u64, Vec<Step>)>,
}

impl PageState {
    /// A fresh state with new random keys.
    ///
    /// # Errors
    /// Only if the system's random source fails.
    pub fn new() -> Result<Self, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        Ok(Self {
            csrf_key: hmac::Key::generate(hmac::HMAC_SHA256, &rng)?,
            admin: Remembered::new()?,
            verifications: tokio::sync::Semaphore::new(1),
            notes: Mutex::new(HashMap::new()),
        })
    }

    fn csrf_token(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(hmac::sign(&self.csrf_key, b"mailgate admin page").as_ref())
    }

    fn csrf_ok(&self, presented: &str) -> bool {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(presented)
            .is_ok_and(|tag| hmac::verify(&self.csrf_key, b"mailgate admin page", &tag).is_ok())
    }

    fn note(&self, account: &str, f: impl FnOnce(&mut Notes)) {
        let mut notes = self.notes.lock().unwrap_or_else(PoisonError::into_inner);
        f(notes.entry(account.to_owned()).or_default());
    }

    fn notes(&self, account: &str) -> Notes {
        self.notes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(account)
            .cloned()
            .unwrap_or_default()
    }

    /// Records how an authorization started from the page ended.
    pub(crate) fn authorization_ended(&self, account: &str, outcome: Result<(), String>) {
        self.note(account, |n| n.authorization = Some((unix_now(), outcome)));
    }
}

/// An account's card on the page, as the browser reaches it (under the
/// public URL's path).
pub(crate) fn account_url(config: &Config, account: &str) -> String {
    let base = config.http.as_ref().map_or("", |h| h.public_url.path());
    format!("{}/#account-{account}", base.trim_end_matches('/'))
}

/// Lets the request through, or answers it.
async fn admit(s: &AdminState, peer: SocketAddr, headers: &HeaderMap) -> Result<(), Response> {
    let services = s.services.get();
    let Some(http) = services.config.http.as_ref() else {
        return Err(not_found());
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
        if user == admin.username && s.page.admin.contains(&user, password, hash) {
            return Ok(());
        }
        // One verification at a time, and no waiting in line for long:
        // bad guesses must not lock the admin out.
        let permit = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            s.page.verifications.acquire(),
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
            s.page.admin.insert(&user, password, hash);
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
fn refuse_action(s: &AdminState, headers: &HeaderMap, form: &ActionForm) -> Option<Response> {
    let fetch_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("same-origin");
    if !matches!(fetch_site, "same-origin" | "none") || !s.page.csrf_ok(&form.csrf) {
        warn!("admin page action refused: missing or wrong CSRF token, or a cross-site request");
        return Some(refuse(
            StatusCode::FORBIDDEN,
            "Refused",
            "This action must come from the integrations page itself. Reload the page and try again.",
        ));
    }
    None
}

/// Admits an action on account `name`: the peer, the CSRF token, the
/// account. Returns the current services and the account.
async fn action(
    s: &AdminState,
    peer: SocketAddr,
    headers: &HeaderMap,
    name: &str,
    form: &ActionForm,
) -> Result<(Arc<Services>, Arc<Account>), Response> {
    admit(s, peer, headers).await?;
    if let Some(refused) = refuse_action(s, headers, form) {
        return Err(refused);
    }
    let services = s.services.get();
    let account = services
        .config
        .accounts
        .get(name)
        .cloned()
        .ok_or_else(not_found)?;
    Ok((services, account))
}

/// The hidden field every action form carries.
#[derive(serde::Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    csrf: String,
}

/// `GET /`: the page.
pub async fn show(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = admit(&s, peer, &headers).await {
        return r;
    }
    let services = s.services.get();
    let body = render(&s, &services);
    html(StatusCode::OK, body, &services.config)
}

/// `GET /static/page.css`, `page.js` and `icon.svg`.
pub async fn asset(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(file): Path<String>,
) -> Response {
    if let Err(r) = admit(&s, peer, &headers).await {
        return r;
    }
    let (body, kind) = match file.as_str() {
        "page.css" => (CSS, "text/css; charset=utf-8"),
        "page.js" => (JS, "text/javascript; charset=utf-8"),
        "icon.svg" => (ICON, "image/svg+xml"),
        _ => return not_found(),
    };
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// `POST /accounts/{name}/authorize`: starts the authorization-code flow
/// (PKCE S256, state) and sends the browser to the provider, which sends
/// it back to the redirect URL, which sends it back here.
pub async fn authorize(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    let (services, account) = match action(&s, peer, &headers, &name, &form).await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let back = account_url(&services.config, &name);
    if account.grant != Grant::AuthorizationCode {
        s.page.authorization_ended(
            &name,
            Err(format!(
                "this account uses the {} grant: there is nothing to authorize in a browser",
                grant_name(account.grant)
            )),
        );
        return see_other(&back);
    }
    let integration = &account.integration;
    let Some(redirect) = services.config.redirect_url(integration) else {
        return not_found();
    };
    // The mailbox as login hint: the provider pre-fills its sign-in page.
    let started = match grant::authorization(integration, &redirect, Some(&account.mailbox)) {
        Ok(started) => started,
        Err(err) => {
            s.page
                .authorization_ended(&name, Err(format!("could not start: {err}")));
            return see_other(&back);
        }
    };
    let pending = Pending::started(&name, &started, true);
    if let Err(err) = s.pending.save(&started.state, &pending) {
        s.page
            .authorization_ended(&name, Err(format!("could not start: {err}")));
        return see_other(&back);
    }
    info!(account = %name, "authorization started from the integrations page");
    see_other(started.url.as_str())
}

/// `POST /accounts/{name}/test`: runs the steps of `mailgate test`.
pub async fn test(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<ActionForm>,
) -> Response {
    let (services, account) = match action(&s, peer, &headers, &name, &form).await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let steps = probe::test_account(
        &services.tokens,
        &services.connectors,
        &account,
        services.config.limits.upstream_timeout,
    )
    .await;
    let failed = steps.iter().any(|step| step.outcome.is_err());
    info!(account = %name, ok = !failed, "test connection from the integrations page");
    s.page.note(&name, |n| n.test = Some((unix_now(), steps)));
    see_other(&account_url(&services.config, &name))
}

fn grant_name(grant: Grant) -> &'static str {
    match grant {
        Grant::AuthorizationCode => "authorization_code",
        Grant::ClientCredentials => "client_credentials",
        Grant::JwtBearer => "jwt_bearer",
    }
}

fn provider_name(i: &Integration) -> &'static str {
    match i.provider {
        crate::config::Provider::Google => "Google",
        crate::config::Provider::Microsoft => "Microsoft",
        crate::config::Provider::Custom => "Custom",
    }
}

fn render(s: &AdminState, services: &Services) -> String {
    let config = &services.config;
    let csrf = s.page.csrf_token();
    let mut out = String::with_capacity(16 * 1024);
    out.push_str(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>mailgate: OAuth 2.0 integrations</title>\
         <link rel=\"icon\" href=\"static/icon.svg\" type=\"image/svg+xml\">\
         <link rel=\"stylesheet\" href=\"static/page.css\">\
         <script src=\"static/page.js\" defer></script></head><body>\n\
         <header><h1>mailgate</h1><p>OAuth 2.0 integrations and the mail accounts that use them. \
         The config file is the source of truth: change it there, then reload (SIGHUP).</p></header>\n<main>\n",
    );
    out.push_str("<section id=\"integrations\"><h2>Integrations</h2>\n");
    for i in config.integrations.values() {
        render_integration(&mut out, config, i);
    }
    out.push_str("</section>\n<section id=\"accounts\"><h2>Accounts</h2>\n");
    if config.accounts.is_empty() {
        out.push_str("<p>No accounts are configured.</p>\n");
    }
    for a in config.accounts.values() {
        let record = services.tokens.store().load(&a.name);
        render_account(&mut out, a, record, &s.page.notes(&a.name), &csrf);
    }
    out.push_str("</section>\n</main></body></html>\n");
    out
}

fn row(out: &mut String, label: &str, value: &str) {
    let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", e(label), value);
}

fn render_integration(out: &mut String, config: &Config, i: &Integration) {
    let _ = write!(
        out,
        "<article class=\"card\" id=\"integration-{n}\" data-integration=\"{n}\"><h3>{n} <span class=\"tag\">{p}</span></h3>",
        n = e(&i.name),
        p = provider_name(i)
    );
    if let Some(d) = &i.description {
        let _ = write!(out, "<p class=\"description\">{}</p>", e(d));
    }
    out.push_str("<table>");
    row(
        out,
        "Client ID",
        &format!("<code>{}</code>", e(&i.client_id)),
    );
    let secret = match (&i.client_secret, i.client_secret_expires) {
        (Some(_), Some(expires)) => format!(
            "set (write-only); expires {} ({})",
            e(&format_time(expires)),
            e(&format_relative(expires))
        ),
        (Some(_), None) => "set (write-only)".to_owned(),
        (None, _) if i.client_certificate.is_some() => "certificate (private_key_jwt)".to_owned(),
        (None, _) if i.service_account.is_some() => "service account key".to_owned(),
        (None, _) => "not set (public client)".to_owned(),
    };
    row(out, "Client secret", &secret);
    row(
        out,
        "Scopes",
        &i.scopes
            .iter()
            .map(|scope| format!("<code>{}</code>", e(scope)))
            .collect::<Vec<_>>()
            .join(" "),
    );
    row(
        out,
        "Authorization endpoint",
        &format!("<code>{}</code>", e(i.authorization_endpoint.as_str())),
    );
    row(
        out,
        "Token endpoint",
        &format!("<code>{}</code>", e(i.token_endpoint.as_str())),
    );
    if let Some(device) = &i.device_authorization_endpoint {
        row(
            out,
            "Device endpoint",
            &format!("<code>{}</code>", e(device.as_str())),
        );
    }
    if let Some(url) = config.redirect_url(i) {
        row(
            out,
            "Redirect URL",
            &format!(
                "<code class=\"redirect-url\">{u}</code> <button type=\"button\" class=\"copy\" data-copy=\"{u}\">Copy</button>\
                 <div class=\"hint\">Register this URL at the provider. It changes when an endpoint changes.</div>",
                u = e(url.as_str())
            ),
        );
    }
    out.push_str("</table></article>\n");
}

/// The token state of an account, in plain words, and whether it needs
/// authorization.
fn token_state(
    a: &Account,
    record: &Result<Option<Record>, crate::oauth::StoreError>,
) -> (String, bool) {
    let record = match record {
        Ok(record) => record.as_ref(),
        Err(err) => {
            return (
                format!(
                    "<span class=\"bad\">token store unreadable:</span> {}",
                    e(&err.to_string())
                ),
                false,
            )
        }
    };
    let needs = authorization_needed(a, record);
    let mut text = String::new();
    match (&needs, record) {
        (Some(why), _) => {
            let _ = write!(
                text,
                "<span class=\"bad state\">Needs authorization</span>: {}.",
                e(why)
            );
            if record.is_some_and(|r| r.refresh_token.is_some()) {
                text.push_str(" The old tokens are kept until then.");
            }
        }
        (None, None) => text.push_str(
            "<span class=\"state\">No token yet</span>: one is fetched at the first login",
        ),
        (None, Some(r)) => {
            let now = unix_now();
            match &r.access_token {
                Some(_) if r.expires_at > now => {
                    let _ = write!(
                        text,
                        "<span class=\"good state\">Authorized</span>: access token valid until {} ({})",
                        e(&format_time(r.expires_at)),
                        e(&format_relative(r.expires_at))
                    );
                }
                Some(_) => {
                    let _ = write!(
                        text,
                        "<span class=\"good state\">Authorized</span>: access token expired {}; a new one is fetched when needed",
                        e(&format_relative(r.expires_at))
                    );
                }
                None => text.push_str(
                    "<span class=\"good state\">Authorized</span>: an access token is fetched at the first login",
                ),
            }
        }
    }
    if let Some(r) = record {
        if r.last_refresh > 0 {
            let _ = write!(
                text,
                "<br>Last refresh: {} ({})",
                e(&format_time(r.last_refresh)),
                e(&format_relative(r.last_refresh))
            );
        }
        if let (Some(err), None) = (&r.last_error, &needs) {
            let _ = write!(
                text,
                "<br><span class=\"bad\">Last error:</span> {}",
                e(err)
            );
        }
    }
    (text, needs.is_some())
}

fn render_account(
    out: &mut String,
    a: &Account,
    record: Result<Option<Record>, crate::oauth::StoreError>,
    notes: &Notes,
    csrf: &str,
) {
    let (state, needs) = token_state(a, &record);
    let _ = write!(
        out,
        "<article class=\"card account\" id=\"account-{n}\" data-account=\"{n}\" data-needs-authorization=\"{needs}\">\
         <h3>{n}</h3><table>",
        n = e(&a.name)
    );
    row(out, "Local username", &e(&a.username));
    row(
        out,
        "Integration",
        &format!(
            "<a href=\"#integration-{i}\">{i}</a>",
            i = e(&a.integration.name)
        ),
    );
    row(out, "Upstream mailbox", &e(&a.mailbox));
    row(out, "Grant", grant_name(a.grant));
    for (label, server) in [("IMAP", &a.imap), ("POP3", &a.pop3)] {
        if let Some(server) = server {
            row(
                out,
                &format!("Upstream {label}"),
                &e(&format!("{}:{}", server.host, server.port)),
            );
        }
    }
    let _ = write!(
        out,
        "<tr><th>Token</th><td class=\"token-state\">{state}</td></tr></table>"
    );
    out.push_str("<div class=\"actions\">");
    if a.grant == Grant::AuthorizationCode {
        let _ = write!(
            out,
            "<form method=\"post\" action=\"accounts/{n}/authorize\"><input type=\"hidden\" name=\"csrf\" value=\"{c}\">\
             <button type=\"submit\" class=\"authorize\">{label}</button></form>",
            n = e(&a.name),
            c = e(csrf),
            label = if needs { "Authorize" } else { "Authorize again" }
        );
    }
    let _ = write!(
        out,
        "<form method=\"post\" action=\"accounts/{n}/test\"><input type=\"hidden\" name=\"csrf\" value=\"{c}\">\
         <button type=\"submit\" class=\"test\">Test connection</button></form></div>",
        n = e(&a.name),
        c = e(csrf)
    );
    if let Some((at, outcome)) = &notes.authorization {
        match outcome {
            Ok(()) => {
                let _ = write!(
                    out,
                    "<p class=\"notice good authorization-outcome\">Last authorization: succeeded {}.</p>",
                    e(&format_relative(*at))
                );
            }
            Err(why) => {
                let _ = write!(
                    out,
                    "<p class=\"notice bad authorization-outcome\">Last authorization: failed {}. {}</p>",
                    e(&format_relative(*at)),
                    e(why)
                );
            }
        }
    }
    if let Some((at, steps)) = &notes.test {
        let ok = steps.iter().all(|step| step.outcome.is_ok());
        let _ = write!(
            out,
            "<div class=\"test-result {cls}\"><h4>Test connection {when}: {verdict}</h4><table class=\"steps\">",
            cls = if ok { "good" } else { "bad" },
            when = e(&format_relative(*at)),
            verdict = if ok { "every step succeeded" } else { "failed" }
        );
        for step in steps {
            let (cls, mark, text) = match &step.outcome {
                Ok(text) => ("good", "ok", text),
                Err(text) => ("bad", "failed", text),
            };
            let _ = write!(
                out,
                "<tr class=\"step {cls}\"><td class=\"mark\">{mark}</td><td class=\"name\">{name}</td>\
                 <td class=\"ms\">{ms} ms</td><td>{text}</td></tr>",
                name = e(&step.name),
                ms = step.elapsed.as_millis(),
                text = e(text)
            );
        }
        out.push_str("</table></div>");
    }
    out.push_str("</article>\n");
}

/// A 303 to `location`, with the security headers.
pub(crate) fn see_other(location: &str) -> Response {
    match HeaderValue::from_str(location) {
        Ok(value) => {
            let mut response = StatusCode::SEE_OTHER.into_response();
            response.headers_mut().insert(header::LOCATION, value);
            secure(&mut response, "default-src 'none'");
            response
        }
        Err(_) => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Bad redirect",
            "mailgate built a redirect it can't send.",
        ),
    }
}

fn not_found() -> Response {
    refuse(StatusCode::NOT_FOUND, "Not found", "There is nothing here.")
}

fn refuse(status: StatusCode, title: &str, text: &str) -> Response {
    super::page(status, title, text)
}

/// The page's CSP: our own script and style only; forms post to us, and
/// the Authorize redirect may go on to a provider's authorization
/// endpoint (browsers check `form-action` on redirects too).
fn csp(config: &Config) -> String {
    let mut origins: Vec<String> = config
        .integrations
        .values()
        .map(|i| i.authorization_endpoint.origin().ascii_serialization())
        .collect();
    // The callback, at the public URL, ends the redirect chain.
    if let Some(http) = &config.http {
        origins.push(http.public_url.origin().ascii_serialization());
    }
    origins.sort();
    origins.dedup();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         form-action 'self' {}; frame-ancestors 'none'; base-uri 'none'",
        origins.join(" ")
    )
}

fn html(status: StatusCode, body: String, config: &Config) -> Response {
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure(&mut response, &csp(config));
    response
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
        let a = PageState::new().unwrap();
        let b = PageState::new().unwrap();
        assert!(a.csrf_ok(&a.csrf_token()));
        assert!(!a.csrf_ok(&b.csrf_token()));
        assert!(!a.csrf_ok(""));
        assert!(!a.csrf_ok("not base64 at all!"));
    }
}
