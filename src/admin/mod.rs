//! The HTTP listener: the OAuth redirect URL (the end of the 3-legged
//! flow), metrics, health and the integrations page. Served over HTTPS
//! with the listeners' certificate, or plain HTTP on loopback. The flow
//! itself lives in [`crate::oauth::flow`]; this is its web side.

mod guard;
pub mod page;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::oauth::{self, Flows};
use crate::services::Current;

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub services: Current,
    pub metrics: Arc<Metrics>,
    pub flows: Flows,
    pub page: Arc<page::PageState>,
}

/// The routes.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(page::show))
        .route("/static/{file}", get(page::asset))
        .route("/accounts/{name}/authorize", post(page::authorize))
        .route("/accounts/{name}/test", post(page::test))
        .route("/oauth2/callback/{slug}", get(callback))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Prometheus text format; per-account gauges are set at scrape time.
async fn metrics(State(s): State<AdminState>) -> Response {
    let services = s.services.get();
    services.tokens.export_gauges().await;
    let now = oauth::unix_now();
    for i in services.config.integrations.values() {
        if let Some(expires) = i.client_secret_expires {
            let left = i64::try_from(expires)
                .unwrap_or(i64::MAX)
                .saturating_sub(i64::try_from(now).unwrap_or(0));
            s.metrics
                .client_secret_expiry_seconds
                .with_label_values(&[&i.name])
                .set(left);
        }
    }
    let mut response = s.metrics.render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Ready when the listeners are bound (they are, or this wouldn't answer),
/// the token store is reachable and every account's token record is
/// readable. Lists the accounts that
/// need authorization; they don't make the gateway unready.
async fn readyz(State(s): State<AdminState>) -> Response {
    let tokens = s.services.get().tokens.clone();
    let store = tokens.store_check().await;
    let statuses = tokens.statuses().await;
    let unreadable: Vec<&String> = statuses
        .iter()
        .filter_map(|(_, status)| status.store_error.as_ref())
        .collect();
    let needs: Vec<serde_json::Value> = statuses
        .iter()
        .filter_map(|(account, status)| {
            let reason = status.needs_authorization()?;
            Some(
                serde_json::json!({"account": account.name, "reason": reason, "fix": status.fix()}),
            )
        })
        .collect();
    let ready = unreadable.is_empty() && store.is_ok();
    let store = match store {
        Ok(what) => serde_json::json!({"ok": true, "store": what}),
        Err(e) => serde_json::json!({"ok": false, "error": e.to_string()}),
    };
    let body = serde_json::json!({"ready": ready, "token_store": store, "token_store_errors": unreadable, "needs_authorization": needs});
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Serves `router` on `listener` until `shutdown` fires; TLS when an
/// acceptor is given.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    handshake_timeout: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        // Take a slot before accepting, so that over the cap new
        // connections wait in the kernel's backlog, holding no descriptor.
        let permit = tokio::select! {
            _ = shutdown.changed() => return,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // The page lets loopback peers in: it needs to know the peer.
        let router = router
            .clone()
            .layer(axum::Extension(axum::extract::ConnectInfo(peer)));
        let tls = tls.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let result = match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(stream, router, shutdown).await,
                        Ok(Err(e)) => return debug!(%peer, error = %e, "http tls handshake failed"),
                        Err(_) => return debug!(%peer, "http tls handshake timed out"),
                    }
                }
                None => serve_connection(tcp, router, shutdown).await,
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "http connection");
            }
        });
    }
}

/// How long a client may take to send a request's headers (a slow-loris
/// guard); idle keep-alive connections are closed after it too.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The most HTTP connections served at once: the page, the callback and
/// scrapes need a handful, and file descriptors are shared with the mail
/// listeners.
pub const MAX_HTTP_CONNECTIONS: usize = 256;

/// Serves one connection; at shutdown, finishes the request in flight and
/// closes, so that no keep-alive connection outlives the listener.
async fn serve_connection<S>(
    stream: S,
    router: Router,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => return result,
        _ = shutdown.changed() => connection.as_mut().graceful_shutdown(),
    }
    connection.await
}

/// Binds the HTTP listener of `config`, if it has one.
///
/// # Errors
/// When the address can't be bound.
pub async fn bind(config: &Config) -> std::io::Result<Option<(TcpListener, SocketAddr)>> {
    let Some(http) = &config.http else {
        return Ok(None);
    };
    let listener = TcpListener::bind(http.address)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("bind {}: {e}", http.address)))?;
    let addr = listener.local_addr()?;
    Ok(Some((listener, addr)))
}

#[derive(serde::Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The redirect URL: finishes a pending authorization.
async fn callback(
    State(s): State<AdminState>,
    Path(slug): Path<String>,
    Query(q): Query<CallbackQuery>,
) -> Response {
    let path = format!("/oauth2/callback/{slug}");
    let services = s.services.get();
    let Some(integration) = services
        .config
        .integrations
        .values()
        .find(|i| i.redirect_path == path)
    else {
        return page(
            StatusCode::NOT_FOUND,
            "Unknown redirect URL",
            "This is not the redirect URL of any integration. If an endpoint changed, register the new URL \
             (mailgate redirect-url INTEGRATION) at the provider.",
        );
    };
    // A flow started from the integrations page returns there. A replayed
    // callback of a flow that already ended only goes back to the page.
    let started = match q.state.as_deref() {
        Some(state) => s.flows.load(state).await.ok().flatten(),
        None => None,
    }
    .filter(|p| p.from_page);
    if let Some(p) = started.as_ref().filter(|p| p.outcome.is_some()) {
        return page::see_other(&page::account_url(&services.config, &p.account));
    }
    let from_page = started.map(|p| p.account);
    let outcome = oauth::flow::finish(
        &s.flows,
        &services.config,
        &services.tokens,
        integration,
        q.code.as_deref(),
        q.state.as_deref(),
        q.error.as_deref(),
        q.error_description.as_deref(),
    )
    .await;
    if let Some(account) = from_page {
        if let Some(state) = q.state.as_deref() {
            s.flows.remove(state).await;
        }
        s.page
            .authorization_ended(&account, outcome.map(|_| ()).map_err(|e| e.to_string()));
        return page::see_other(&page::account_url(&services.config, &account));
    }
    match outcome {
        Ok(account) => page(
            StatusCode::OK,
            "Authorized",
            &format!("Account {account} is authorized. mailgate keeps its tokens fresh from now on; you can close this page."),
        ),
        Err(e) => page(StatusCode::BAD_REQUEST, "Authorization failed", &e.to_string()),
    }
}

/// A small self-contained HTML page, never cached.
fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>mailgate: {t}</title></head>\
         <body><h1>{t}</h1><p>{x}</p></body></html>\n",
        t = escape(title),
        x = escape(text)
    );
    let mut response = (status, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    secure(&mut response, "default-src 'none'");
    response
}

/// The security headers of every HTML response and redirect: the CSP,
/// never cached, no sniffing, no referrer, no framing.
pub(crate) fn secure(response: &mut Response, csp: &str) {
    let h = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, value);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

/// HTML text escaping.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}
