//! Wiring: a validated [`Config`] becomes bound listeners and shared
//! services, then runs until shutdown.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::info;

use crate::account::Accounts;
use crate::admin::{AdminState, PendingStore};
use crate::config::Config;
use crate::config::HttpTls;
use crate::oauth::TokenStore;
use crate::oauth::Tokens;
use crate::server::{self, Gateway};

/// A failure to start; the message names what failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StartError(String);

fn start_error(what: &str, e: impl std::fmt::Display) -> StartError {
    StartError(format!("{what}: {e}"))
}

/// A running gateway.
pub struct Running {
    /// The bound address of each configured listener, in config order.
    pub addresses: Vec<SocketAddr>,
    /// The bound address of the HTTP listener, if configured.
    pub http_address: Option<SocketAddr>,
    /// The listener certificate's SHA-256 fingerprint.
    pub fingerprint: String,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Running {
    /// Stops accepting and waits for the accept loops to end.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Builds everything from `config`, binds the listeners, and starts
/// accepting.
///
/// # Errors
/// When a certificate, key or CA file is unusable, or a port can't be bound.
pub async fn start(config: Config) -> Result<Running, StartError> {
    crate::tls::install_default_provider();
    let config = Arc::new(config);
    let server_tls = crate::tls::server(config.certificate.as_ref(), &config.state_dir)
        .map_err(|e| start_error("listener certificate", e))?;
    info!(sha256 = %server_tls.fingerprint, "listener certificate");
    let connectors =
        server::upstream::connectors(&config).map_err(|e| start_error("upstream tls", e))?;
    let oauth_tls = crate::tls::client(None).map_err(|e| start_error("oauth tls", e))?;
    let tokens =
        Arc::new(Tokens::new(&config, &oauth_tls).map_err(|e| start_error("token store", e))?);
    let pending = Arc::new(PendingStore::new(
        TokenStore::open(&config.state_dir, &config.store_key)
            .map_err(|e| start_error("token store", e))?,
    ));
    let http = crate::admin::bind(&config)
        .await
        .map_err(|e| start_error("http listen", e))?;
    let accounts = Accounts::new(&config).map_err(|e| start_error("accounts", e))?;
    let bound = server::bind(&config)
        .await
        .map_err(|e| start_error("listen", e))?;
    let addresses = bound
        .iter()
        .map(server::Bound::local_addr)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| start_error("listen", e))?;
    let acceptor = TlsAcceptor::from(server_tls.config.clone());
    let gateway = Arc::new(Gateway::new(
        config.clone(),
        Arc::new(accounts),
        tokens.clone(),
        acceptor.clone(),
        connectors,
    ));
    let (shutdown, receiver) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for b in bound {
        info!(address = %b.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), protocol = ?b.config.protocol, tls = ?b.config.tls, "listening");
        tasks.spawn(server::accept_loop(gateway.clone(), b, receiver.clone()));
    }
    let http_address = match http {
        Some((listener, address)) => {
            let tls = match config.http.as_ref().map(|h| h.tls) {
                Some(HttpTls::Implicit) => Some(acceptor.clone()),
                _ => None,
            };
            let router = crate::admin::router(AdminState {
                config: config.clone(),
                tokens: tokens.clone(),
                pending,
            });
            info!(%address, "http listening");
            tasks.spawn(crate::admin::serve(
                listener,
                tls,
                router,
                config.limits.tls_handshake_timeout,
                receiver.clone(),
            ));
            Some(address)
        }
        None => None,
    };
    if config.oauth.refresh_in_background {
        tasks.spawn(tokens.run_refresher(receiver));
    }
    Ok(Running {
        addresses,
        http_address,
        fingerprint: server_tls.fingerprint,
        shutdown,
        tasks,
    })
}
