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
use oauth2::{
    ClientId, ClientSecret, RefreshToken, RequestTokenError, Scope, TokenResponse as _, TokenUrl,
};
use tokio::sync::Mutex;
use tokio::time::Instant;

pub use http::is_transient_status;
pub use store::{Record, StoreError, TokenStore};

use http::TokenHttp;

use crate::config::{Account, Config, Grant, Integration, Provider};
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
    /// The store has been read.
    loaded: bool,
    access: Option<Cached>,
    /// The newest refresh token, from the store, the config or a rotation.
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
            accounts: config
                .accounts
                .keys()
                .map(|name| (name.clone(), Mutex::default()))
                .collect(),
        })
    }

    /// A valid access token for `account`, from the cache or a fresh grant.
    ///
    /// # Errors
    /// When no token can be had; see [`TokenError`].
    pub async fn access_token(&self, account: &Account) -> Result<Secret<String>, TokenError> {
        let mut state = self.lock(account).await?;
        if let Some(cached) = state
            .access
            .as_ref()
            .filter(|c| c.use_until > Instant::now())
        {
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

    async fn lock(
        &self,
        account: &Account,
    ) -> Result<tokio::sync::MutexGuard<'_, AccountState>, TokenError> {
        let Some(mutex) = self.accounts.get(&account.name) else {
            return Err(TokenError::NeedsAuthorization(format!(
                "unknown account {}",
                account.name
            )));
        };
        let mut state = mutex.lock().await;
        if !state.loaded {
            let record = self.store.load(&account.name)?.unwrap_or_default();
            state.refresh = record
                .refresh_token
                .map(Secret::new)
                .or_else(|| account.refresh_token.clone());
            if let Some(token) = record.access_token {
                let now = unix_now();
                let lifetime =
                    Duration::from_secs(record.expires_at.saturating_sub(record.obtained_at));
                let usable_until = record.obtained_at + self.usable(lifetime).as_secs();
                if usable_until > now {
                    state.access = Some(Cached {
                        token: Secret::new(token),
                        use_until: Instant::now() + Duration::from_secs(usable_until - now),
                    });
                }
            }
            state.loaded = true;
        }
        Ok(state)
    }

    /// How long a token of `lifetime` is handed out: until `refresh_margin`
    /// before it expires, or half its life when it is shorter than that.
    fn usable(&self, lifetime: Duration) -> Duration {
        lifetime
            .checked_sub(self.refresh_margin)
            .unwrap_or(lifetime / 2)
    }

    async fn fetch(
        &self,
        account: &Account,
        state: &mut AccountState,
    ) -> Result<Secret<String>, TokenError> {
        let integration = &account.integration;
        let client = oauth_client(integration);
        let scopes = integration.scopes.iter().map(|s| Scope::new(s.clone()));
        let started = Instant::now();
        let response = match account.grant {
            Grant::AuthorizationCode => {
                let refresh = state.refresh.clone().ok_or_else(|| {
                    TokenError::NeedsAuthorization("no refresh token stored".into())
                })?;
                let refresh_token = RefreshToken::new(refresh.expose().clone());
                let mut request = client.exchange_refresh_token(&refresh_token);
                // RFC 6749 §6 makes scope optional on refresh and servers
                // reject any scope the grant lacks; Microsoft's v2 endpoint
                // documents it as required. Send it only there.
                if integration.provider == Provider::Microsoft {
                    request = request.add_scopes(scopes);
                }
                request.request_async(&self.http).await.map_err(classify)?
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
        let lifetime = response.expires_in().unwrap_or(DEFAULT_LIFETIME);
        let token = Secret::new(response.access_token().secret().clone());
        if let Some(rotated) = response.refresh_token() {
            state.refresh = Some(Secret::new(rotated.secret().clone()));
        }
        // The tokens are stored before the new access token is used: a
        // rotated refresh token is the only valid one from now on.
        let obtained_at = unix_now();
        let record = Record {
            refresh_token: state.refresh.as_ref().map(|r| r.expose().clone()),
            access_token: Some(token.expose().clone()),
            obtained_at,
            expires_at: obtained_at + lifetime.as_secs(),
        };
        self.store.save(&account.name, &record)?;
        state.access = Some(Cached {
            token: token.clone(),
            use_until: started + self.usable(lifetime),
        });
        tracing::info!(account = %account.name, lifetime_s = lifetime.as_secs(), "access token obtained");
        Ok(token)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn oauth_client(
    integration: &Integration,
) -> BasicClient<
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointNotSet,
    oauth2::EndpointSet,
> {
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
                BasicErrorResponseType::Extension(e)
                    if e == "temporarily_unavailable" || e == "server_error" =>
                {
                    TokenError::Transient(message)
                }
                _ => TokenError::NeedsAuthorization(message),
            }
        }
        RequestTokenError::Request(e) => TokenError::Transient(e.to_string()),
        RequestTokenError::Parse(e, _) => {
            TokenError::Transient(format!("unreadable token response: {e}"))
        }
        RequestTokenError::Other(e) => TokenError::Transient(e),
    }
}

/// Shared handle.
pub type SharedTokens = Arc<Tokens>;
