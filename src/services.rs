//! The reloadable part of the runtime: the config with its accounts,
//! tokens and upstream TLS connectors. SIGHUP builds a new set from the new
//! config and swaps it in; connections already relaying keep what they
//! have, new logins use the new set. The token store is not rebuilt: it is
//! opened once and every generation shares it.

use std::sync::{Arc, RwLock};

use crate::account::Accounts;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::oauth::{TokenError, TokenStore, Tokens};
use crate::tls::{Connectors, TlsError};

/// One generation of the reloadable services.
pub struct Services {
    pub config: Arc<Config>,
    pub accounts: Arc<Accounts>,
    pub tokens: Arc<Tokens>,
    pub connectors: Connectors,
}

/// Why services could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("upstream tls: {0}")]
    UpstreamTls(TlsError),
    #[error("oauth tls: {0}")]
    OAuthTls(TlsError),
    #[error("token client: {0}")]
    Tokens(#[from] TokenError),
    #[error("accounts: {0}")]
    Accounts(argon2::password_hash::Error),
}

impl Services {
    /// Builds every service of `config` around the shared token `store`.
    ///
    /// # Errors
    /// When a CA file, the token client or the password hashing can't be
    /// set up; the error says which.
    pub fn build(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        store: Arc<dyn TokenStore>,
    ) -> Result<Self, BuildError> {
        crate::tls::install_default_provider();
        let connectors = crate::tls::connectors(&config).map_err(BuildError::UpstreamTls)?;
        let oauth_tls = crate::tls::client(None).map_err(BuildError::OAuthTls)?;
        // The series that the alerts compare, at 0 until they count.
        metrics.export_zeroes(
            config.listeners.iter().map(|l| l.protocol.name),
            config
                .accounts
                .values()
                .map(|a| (a.integration.name.as_str(), a.grant.request_label())),
        );
        let tokens = Tokens::new(&config, &oauth_tls, metrics, store)?;
        let accounts = Accounts::new(&config).map_err(BuildError::Accounts)?;
        Ok(Self {
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
