//! Wiring: a validated [`Config`] becomes bound listeners and shared
//! services, then runs until shutdown. Reload swaps the services.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::admin::{AdminState, PendingStore};
use crate::config::{Config, HttpTls};
use crate::metrics::Metrics;
use crate::oauth::TokenStore;
use crate::server::{self, Gateway};
use crate::services::{Current, Services};

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
    gateway: Arc<Gateway>,
    services: Current,
    metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    /// Stops the current generation's token refresher.
    refresher: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Running {
    /// The metrics, as `/metrics` renders them.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops accepting, says goodbye to sessions that haven't logged in,
    /// and waits up to `grace` for relayed sessions to finish. Returns
    /// whether every session ended in time.
    pub async fn stop(mut self, grace: Duration) -> bool {
        let _ = self.shutdown.send(true);
        let _ = self.refresher.send(true);
        while self.tasks.join_next().await.is_some() {}
        let drained = self.gateway.drain(grace).await;
        if !drained {
            warn!(
                grace_s = grace.as_secs(),
                "sessions still open after the grace period; closing them"
            );
        }
        drained
    }

    /// Replaces accounts and integrations with those of `config`, without
    /// touching listeners or sessions in progress. On error, nothing
    /// changes.
    ///
    /// # Errors
    /// When the new config's services can't be built.
    pub fn reload(&mut self, config: Config) -> Result<(), StartError> {
        let services = Services::build(Arc::new(config), self.metrics.clone())
            .map_err(|e| start_error("reload", e))?;
        let tokens = services.tokens.clone();
        let background = services.config.oauth.refresh_in_background;
        self.services.replace(services);
        // The old generation's refresher stops; the new one starts.
        let (refresher, receiver) = watch::channel(false);
        let _ = std::mem::replace(&mut self.refresher, refresher).send(true);
        if background {
            self.tasks.spawn(tokens.run_refresher(receiver));
        }
        info!("configuration reloaded");
        Ok(())
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
    let metrics = Arc::new(Metrics::new().map_err(|e| start_error("metrics", e))?);
    let server_tls = crate::tls::server(config.certificate.as_ref(), &config.state_dir)
        .map_err(|e| start_error("listener certificate", e))?;
    info!(sha256 = %server_tls.fingerprint, "listener certificate");
    let services =
        Services::build(config.clone(), metrics.clone()).map_err(|e| start_error("start", e))?;
    let tokens = services.tokens.clone();
    let current = Current::new(services);
    let pending = Arc::new(PendingStore::new(
        TokenStore::open(&config.state_dir, &config.store_key)
            .map_err(|e| start_error("token store", e))?,
    ));
    let page = Arc::new(
        crate::admin::page::PageState::new()
            .map_err(|_| start_error("start", "the system's random source failed"))?,
    );
    let http = crate::admin::bind(&config)
        .await
        .map_err(|e| start_error("http listen", e))?;
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
        current.clone(),
        acceptor.clone(),
        metrics.clone(),
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
                services: current.clone(),
                metrics: metrics.clone(),
                pending,
                page: page.clone(),
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
    let (refresher, refresher_receiver) = watch::channel(false);
    if config.oauth.refresh_in_background {
        tasks.spawn(tokens.run_refresher(refresher_receiver));
    }
    Ok(Running {
        addresses,
        http_address,
        fingerprint: server_tls.fingerprint,
        gateway,
        services: current,
        metrics,
        shutdown,
        refresher,
        tasks,
    })
}
