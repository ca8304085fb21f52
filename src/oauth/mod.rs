//! OAuth 2.0 tokens: grants through the `oauth2` crate, a per-account cache
//! with one refresh in flight, and the refresh-token store.
//!
//! The server sees one seam: [`Tokens::access_token`], "a valid access token
//! for this account", and [`Tokens::replace_rejected`] when the upstream
//! refused one.

mod http;
mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use oauth2::basic::{BasicClient, BasicErrorResponseType, BasicTokenType};
use oauth2::{ClientId, ClientSecret, RefreshToken, RequestTokenError, Scope, TokenResponse as _, TokenUrl};
use tokio::sync::Mutex;
use tokio::time::Instant;

pub use http::is_transient_status;
pub use store::{StoreError, TokenStore};

use http::TokenHttp;

use crate::config::{Account, Config, Grant, Integration};
use crate::secret::Secret;

/// Why no token could be had. Transient failures are worth retrying;
/// the others need the administrator.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Network, timeout, 408, 429, 5xx, or an unreadable answer.
    #[error("token endpoint unavailable: {0}")]
    Transient(String),
    /// `invalid_grant` and other refusals: the account must be authorized
    /// again. Nothing is deleted.
    #[error("account needs authorization: {0}")]
    NeedsAuthorization(String),
    /// The token store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A cached access token.
#[derive(Clone)]
struct Cached {
    token: Secret<String>,
    /// When the cache stops handing it out: shortly before it expires.
    use_until: Instant,
}

#[derive(Default)]
struct AccountState {
    access: Option<Cached>,
    /// The newest refresh token, once read from the store or the config.
    refresh: Option<Secret<String>>,
}

/// Access tokens for every account.
pub struct Tokens {
    http: TokenHttp,
    store: TokenStore,
    refresh_margin: Duration,
    /// One lock per account: holding it while fetching makes concurrent
    /// logins wait for the one refresh in flight.
    accounts: HashMap<String, Mutex<AccountState>>,
}

/// An access token lifetime when the provider doesn't say (RFC 6749 §5.1
/// makes `expires_in` optional; providers use one hour).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

impl Tokens {
    /// Token state for the accounts of `config`.
    ///
    /// # Errors
    /// When the HTTP client can't be built.
    pub fn new(config: &Config, tls: &rustls::ClientConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.oauth.request_timeout)
            .connect_timeout(config.oauth.request_timeout)
            .use_preconfigured_tls(tls.clone())
            .build()?;
        Ok(Self {
            http: TokenHttp(http),
            store: TokenStore::new(&config.state_dir),
            refresh_margin: config.oauth.refresh_margin,
            accounts: config.accounts.keys().map(|name| (name.clone(), Mutex::default())).collect(),
        })
    }

    /// A valid access token for `account`, from the cache or a fresh grant.
    ///
    /// # Errors
    /// When no token can be had; see [`TokenError`].
    pub async fn access_token(&self, account: &Account) -> Result<Secret<String>, TokenError> {
        let mut state = self.lock(account).await?;
        if let Some(cached) = state.access.as_ref().filter(|c| c.use_until > Instant::now()) {
            return Ok(cached.token.clone());
        }
        self.fetch(account, &mut state).await
    }

    /// The upstream refused `rejected`: a new token, unless another login
    /// already replaced it.
    ///
    /// # Errors
    /// When no token can be had; see [`TokenError`].
    pub async fn replace_rejected(
        &self,
        account: &Account,
        rejected: &Secret<String>,
    ) -> Result<Secret<String>, TokenError> {
        let mut state = self.lock(account).await?;
        match &state.access {
            Some(cached) if cached.token != *rejected && cached.use_until > Instant::now() => {
                Ok(cached.token.clone())
            }
            _ => {
                state.access = None;
                self.fetch(account, &mut state).await
            }
        }
    }

    async fn lock(&self, account: &Account) -> Result<tokio::sync::MutexGuard<'_, AccountState>, TokenError> {
        match self.accounts.get(&account.name) {
            Some(m) => Ok(m.lock().await),
            None => Err(TokenError::NeedsAuthorization(format!("unknown account {}", account.name))),
        }
    }

    async fn fetch(&self, account: &Account, state: &mut AccountState) -> Result<Secret<String>, TokenError> {
        let integration = &account.integration;
        let client = oauth_client(integration);
        let scopes = integration.scopes.iter().map(|s| Scope::new(s.clone()));
        let started = Instant::now();
        let response = match account.grant {
            Grant::AuthorizationCode => {
                let refresh = match state.refresh.clone() {
                    Some(r) => r,
                    None => self
                        .store
                        .load(&account.name)?
                        .or_else(|| account.refresh_token.clone())
                        .ok_or_else(|| {
                            TokenError::NeedsAuthorization("no refresh token stored".into())
                        })?,
                };
                let refresh_token = RefreshToken::new(refresh.expose().clone());
                let response = client
                    .exchange_refresh_token(&refresh_token)
                    .add_scopes(scopes)
                    .request_async(&self.http)
                    .await
                    .map_err(classify)?;
                state.refresh = Some(refresh);
                response
            }
            Grant::ClientCredentials => client
                .exchange_client_credentials()
                .add_scopes(scopes)
                .request_async(&self.http)
                .await
                .map_err(classify)?,
        };
        if *response.token_type() != BasicTokenType::Bearer {
            return Err(TokenError::NeedsAuthorization(format!(
                "token endpoint issued a {:?} token, not Bearer",
                response.token_type()
            )));
        }
        // A rotated refresh token is stored before the new access token is
        // used: if the store fails, the old one may already be revoked.
        if let Some(rotated) = response.refresh_token() {
            let rotated = Secret::new(rotated.secret().clone());
            self.store.save(&account.name, &rotated)?;
            state.refresh = Some(rotated);
        }
        let lifetime = response.expires_in().unwrap_or(DEFAULT_LIFETIME);
        // Hand the token out until `refresh_margin` before it expires, or
        // for half its life when it is shorter than the margin.
        let usable = lifetime.checked_sub(self.refresh_margin).unwrap_or(lifetime / 2);
        let token = Secret::new(response.access_token().secret().clone());
        state.access = Some(Cached { token: token.clone(), use_until: started + usable });
        tracing::info!(account = %account.name, lifetime_s = lifetime.as_secs(), "access token obtained");
        Ok(token)
    }
}

fn oauth_client(
    integration: &Integration,
) -> BasicClient<oauth2::EndpointNotSet, oauth2::EndpointNotSet, oauth2::EndpointNotSet, oauth2::EndpointNotSet, oauth2::EndpointSet>
{
    let client = BasicClient::new(ClientId::new(integration.client_id.clone()))
        .set_token_uri(TokenUrl::from_url(integration.token_endpoint.clone()));
    match &integration.client_secret {
        Some(secret) => client.set_client_secret(ClientSecret::new(secret.expose().clone())),
        None => client,
    }
}

/// Sorts a token endpoint failure into transient and permanent.
fn classify(
    err: RequestTokenError<http::HttpError, oauth2::basic::BasicErrorResponse>,
) -> TokenError {
    match err {
        RequestTokenError::ServerResponse(response) => {
            let code = response.error();
            let message = match response.error_description() {
                Some(d) => format!("{code}: {d}"),
                None => code.to_string(),
            };
            match code {
                BasicErrorResponseType::Extension(e) if e == "temporarily_unavailable" || e == "server_error" => {
                    TokenError::Transient(message)
                }
                _ => TokenError::NeedsAuthorization(message),
            }
        }
        RequestTokenError::Request(e) => TokenError::Transient(e.to_string()),
        RequestTokenError::Parse(e, _) => TokenError::Transient(format!("unreadable token response: {e}")),
        RequestTokenError::Other(e) => TokenError::Transient(e),
    }
}

/// Shared handle.
pub type SharedTokens = Arc<Tokens>;
