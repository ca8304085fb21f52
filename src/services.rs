//! The reloadable part of the runtime: the config with its accounts,
//! tokens and upstream TLS connectors. SIGHUP builds a new set from the new
//! config and swaps it in; connections already relaying keep what they
//! have, new logins use the new set.

use std::sync::{Arc, RwLock};

use crate::account::Accounts;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::oauth::Tokens;
use crate::server::spare::Spares;
use crate::tls::Connectors;

/// One generation of the reloadable services.
pub struct Services {
    pub config: Arc<Config>,
    pub accounts: Arc<Accounts>,
    pub tokens: Arc<Tokens>,
    pub connectors: Connectors,
    /// Spare upstream connections for the next login.
    pub spares: Arc<Spares>,
}

/// Why services could not be built from a config.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BuildError(String);

impl Services {
    /// Builds every service of `config`.
    ///
    /// # Errors
    /// When a CA file, the token store or the password hashing can't be set
    /// up; the message says which.
    pub fn build(config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Self, BuildError> {
        crate::tls::install_default_provider();
        let connectors = crate::tls::connectors(&config)
            .map_err(|e| BuildError(format!("upstream tls: {e}")))?;
        let oauth_tls =
            crate::tls::client(None).map_err(|e| BuildError(format!("oauth tls: {e}")))?;
        let tokens = Tokens::new(&config, &oauth_tls, metrics)
            .map_err(|e| BuildError(format!("token store: {e}")))?;
        let accounts = Accounts::new(&config).map_err(|e| BuildError(format!("accounts: {e}")))?;
        Ok(Self {
            spares: Spares::new(config.limits.upstream_spare_for),
            config,
            accounts: Arc::new(accounts),
            tokens: Arc::new(tokens),
            connectors,
        })
    }
}

/// The current services, swapped whole on reload.
#[derive(Clone)]
pub struct Current(Arc<RwLock<Arc<Services>>>);

impl Current {
    pub fn new(services: Services) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(services))))
    }

    /// A snapshot to use for one login or one request.
    pub fn get(&self) -> Arc<Services> {
        match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Installs a new generation; returns the old one.
    pub fn replace(&self, services: Services) -> Arc<Services> {
        let new = Arc::new(services);
        match self.0.write() {
            Ok(mut guard) => std::mem::replace(&mut *guard, new),
            Err(poisoned) => std::mem::replace(&mut *poisoned.into_inner(), new),
        }
    }
}
