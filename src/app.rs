//! Wiring: a validated [`Config`] becomes bound listeners and shared
//! services, then runs until shutdown. Reload swaps the services.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::admin::AdminState;
use crate::config::{Config, HttpTls};
use crate::metrics::Metrics;
use crate::oauth::{self, Flows, Stores};
use crate::server::{self, Gateway};
use crate::services::{BuildError, Current, Services};
use crate::tls::TlsError;

/// A failure to start or reload; says what failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("listener certificate: {0}")]
    Certificate(TlsError),
    #[error("token store: {0}")]
    Store(#[from] oauth::StoreError),
    #[error("{0}")]
    Services(#[from] BuildError),
    #[error("the system's random source failed")]
    Random,
    #[error("listen: {0}")]
    Listen(std::io::Error),
    #[error("http listen: {0}")]
    HttpListen(std::io::Error),
    #[error("reload: {0}")]
    Reload(String),
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
    stores: Stores,
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
    /// touching listeners or sessions in progress. Listeners and limits
    /// stay as they started (the connection cap, the admission tables and
    /// the spares were sized by them): the running config keeps them, so
    /// there is one source of truth, and a change to them is logged as
    /// waiting for a restart. On error, nothing changes.
    ///
    /// # Errors
    /// When the new config's services can't be built.
    pub fn reload(&mut self, mut config: Config) -> Result<(), StartError> {
        let running = self.services.get().config.clone();
        if config.limits != running.limits || config.listeners != running.listeners {
            warn!("[limits] or [[listeners]] changed: they take effect at the next restart");
        }
        config.limits = running.limits;
        config.listeners = running.listeners.clone();
        config.hostname = running.hostname.clone();
        if config.state_dir != running.state_dir
            || config.store_key != running.store_key
            || config.store != running.store
        {
            warn!("state_dir, [store] or the store key changed: the token store stays as it started until the next restart");
        }
        // The store was opened once at start; the running config names it.
        config.state_dir = running.state_dir.clone();
        config.store_key = running.store_key.clone();
        config.store = running.store.clone();
        // Accounts were checked against the file's listeners; the running
        // ones are what they will be served on.
        for account in config.accounts.values() {
            for listener in &config.listeners {
                if account.upstream(listener.protocol).is_none() {
                    return Err(StartError::Reload(format!(
                        "accounts.{}.{}: is required, a {} listener is running",
                        account.name, listener.protocol, listener.protocol.title
                    )));
                }
            }
        }
        let services = Services::build(
            Arc::new(config),
            self.metrics.clone(),
            self.stores.tokens.clone(),
        )?;
        let tokens = services.tokens.clone();
        let background = services.config.oauth.refresh_in_background;
        self.services.replace(services);
        // Spares were dialled with the old connectors (CA files may differ).
        self.gateway.forget_spares();
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
    let metrics = Arc::new(Metrics::new()?);
    let server_tls = crate::tls::server(config.certificate.as_ref(), &config.state_dir)
        .map_err(StartError::Certificate)?;
    info!(sha256 = %server_tls.fingerprint, expires = %crate::oauth::format_time(server_tls.not_after), "listener certificate");
    metrics.set_certificate_expiry(server_tls.not_after);
    let days_left = server_tls
        .not_after
        .saturating_sub(crate::oauth::unix_now())
        / 86_400;
    if server_tls.not_after > 0 && days_left < 30 {
        warn!(
            days_left,
            "the listener certificate expires within 30 days: renew it"
        );
    }
    let stores = oauth::open_store(&config, Some(metrics.clone())).await?;
    let services = Services::build(config.clone(), metrics.clone(), stores.tokens.clone())?;
    let tokens = services.tokens.clone();
    let current = Current::new(services);
    let page = Arc::new(crate::admin::page::PageState::new().map_err(|_| StartError::Random)?);
    let http = crate::admin::bind(&config)
        .await
        .map_err(StartError::HttpListen)?;
    let bound = server::bind(&config).await.map_err(StartError::Listen)?;
    let addresses = bound
        .iter()
        .map(server::Bound::local_addr)
        .collect::<Result<Vec<_>, _>>()
        .map_err(StartError::Listen)?;
    let acceptor = TlsAcceptor::from(server_tls.config.clone());
    let gateway = Arc::new(Gateway::new(
        current.clone(),
        acceptor.clone(),
        metrics.clone(),
    ));
    let (shutdown, receiver) = watch::channel(false);
    let mut tasks = JoinSet::new();
    for b in bound {
        info!(address = %b.local_addr().map_or_else(|_| "?".into(), |a| a.to_string()), protocol = b.config.protocol.name, tls = ?b.config.tls, "listening");
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
                flows: Flows::new(stores.flows.clone()),
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
        stores,
        metrics,
        shutdown,
        refresher,
        tasks,
    })
}
