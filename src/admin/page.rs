//! The integrations page: every integration and account, with an
//! Authorize and a Test connection button per account. The config stays
//! the source of truth: the page shows it and acts on it, never edits it.
//! Who may see it and act is [`super::guard`]'s job.
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
use tracing::info;

use super::guard::{admit, refuse_action, Guard};
use super::{escape as e, secure, AdminState};
use crate::config::{Account, Config, Grant, Integration};
use crate::oauth::{format_relative, format_time, unix_now, Authorization, TokenStatus};
use crate::protocol::Protocol;
use crate::server::probe::{self, Step};
use crate::services::Services;

const CSS: &str = include_str!("page.css");
const JS: &str = include_str!("page.js");
const ICON: &str = include_str!("icon.svg");

/// What the page remembers between requests, in memory only.
pub struct PageState {
    pub(super) guard: Guard,
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
        Ok(Self {
            guard: Guard::new()?,
            notes: Mutex::new(HashMap::new()),
        })
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
    pub(super) csrf: String,
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
    let statuses = services.tokens.statuses().await;
    let body = render(&s, &services, &statuses);
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
                account.grant.name()
            )),
        );
        return see_other(&back);
    }
    let integration = &account.integration;
    let Some(redirect) = services.config.redirect_url(integration) else {
        return not_found();
    };
    // The mailbox as login hint: the provider pre-fills its sign-in page.
    let started = match s
        .flows
        .start(&name, integration, &redirect, Some(&account.mailbox), true)
        .await
    {
        Ok(started) => started,
        Err(err) => {
            s.page
                .authorization_ended(&name, Err(format!("could not start: {err}")));
            return see_other(&back);
        }
    };
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
        &services.config.hostname,
    )
    .await;
    let failed = steps.iter().any(|step| step.outcome.is_err());
    info!(account = %name, ok = !failed, "test connection from the integrations page");
    s.page.note(&name, |n| n.test = Some((unix_now(), steps)));
    see_other(&account_url(&services.config, &name))
}

fn render(s: &AdminState, services: &Services, statuses: &[(Arc<Account>, TokenStatus)]) -> String {
    let config = &services.config;
    let csrf = s.page.guard.csrf_token();
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
    for (a, status) in statuses {
        render_account(&mut out, a, status, &s.page.notes(&a.name), &csrf);
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
        p = i.provider.title()
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

/// The token status of an account, in plain words.
fn token_state(status: &TokenStatus) -> String {
    if let Some(err) = &status.store_error {
        return format!(
            "<span class=\"bad\">token store unreadable:</span> {}",
            e(err)
        );
    }
    let mut text = String::new();
    match &status.authorization {
        Authorization::NotAuthorizedYet => text.push_str(
            "<span class=\"bad state\">Needs authorization</span>: not authorized yet.",
        ),
        Authorization::Revoked(why) => {
            let _ = write!(
                text,
                "<span class=\"bad state\">Needs authorization</span>: {}.",
                e(why)
            );
            if status.tokens_kept {
                text.push_str(" The old tokens are kept until then.");
            }
        }
        Authorization::Authorized => match status.access_token_expires {
            Some(expires) if expires > unix_now() => {
                let _ = write!(
                    text,
                    "<span class=\"good state\">Authorized</span>: access token valid until {} ({})",
                    e(&format_time(expires)),
                    e(&format_relative(expires))
                );
            }
            Some(expires) => {
                let _ = write!(
                    text,
                    "<span class=\"good state\">Authorized</span>: access token expired {}; a new one is fetched when needed",
                    e(&format_relative(expires))
                );
            }
            None if status.last_refresh.is_none() && !status.tokens_kept => text.push_str(
                "<span class=\"state\">No token yet</span>: one is fetched at the first login",
            ),
            None => text.push_str(
                "<span class=\"good state\">Authorized</span>: an access token is fetched at the first login",
            ),
        },
    }
    if let Some(at) = status.last_refresh {
        let _ = write!(
            text,
            "<br>Last refresh: {} ({})",
            e(&format_time(at)),
            e(&format_relative(at))
        );
    }
    if let Some(err) = &status.last_error {
        let _ = write!(
            text,
            "<br><span class=\"bad\">Last error:</span> {}",
            e(err)
        );
    }
    text
}

fn render_account(out: &mut String, a: &Account, status: &TokenStatus, notes: &Notes, csrf: &str) {
    let state = token_state(status);
    let needs = status.needs_authorization().is_some();
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
    row(out, "Grant", a.grant.name());
    for protocol in Protocol::all() {
        if let Some(server) = a.upstream(protocol) {
            row(
                out,
                &format!("Upstream {}", protocol.title),
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

pub(super) fn not_found() -> Response {
    refuse(StatusCode::NOT_FOUND, "Not found", "There is nothing here.")
}

pub(super) fn refuse(status: StatusCode, title: &str, text: &str) -> Response {
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
