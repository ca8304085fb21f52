//! OAuth 2.0 tokens: grants, a per-account cache with one refresh in flight
//! (in this process, and across processes through the store lock), a
//! background refresher, and the encrypted token store.
//!
//! The server sees one seam: [`Tokens::access_token`], "a valid access token
//! for this account", and [`Tokens::replace_rejected`] when the upstream
//! refused one.

pub mod grant;
mod http;
mod jwt;
mod notify;
mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

pub use http::{is_transient_status, TokenHttp};
pub use store::{KeySource, Record, StoreError, StoreLock, TokenStore, KEY_ENV};

use crate::config::{Account, Config, Grant};
use crate::metrics::Metrics;
use crate::secret::Secret;
use grant::Granted;
use notify::Notifier;

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

/// The command that fixes an account that needs authorization.
pub fn fix_command(account: &str) -> String {
    format!("mailgate authorize {account}")
}

/// Why `account` needs `mailgate authorize`, given its stored record, if
/// it does: the provider refused its grant, or it uses the
/// authorization-code grant and has a refresh token neither stored nor in
/// the config.
pub fn authorization_needed(account: &Account, record: Option<&Record>) -> Option<String> {
    if let Some(why) = record.and_then(|r| r.needs_authorization.as_ref()) {
        return Some(why.clone());
    }
    let refresh_token =
        record.is_some_and(|r| r.refresh_token.is_some()) || account.refresh_token.is_some();
    (account.grant == Grant::AuthorizationCode && !refresh_token)
        .then(|| "not authorized yet".to_owned())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A Unix time as RFC 3339 UTC, to the second.
pub fn format_time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// A Unix time relative to now: "in 59m 58s" or "3m 2s ago".
pub fn format_relative(unix: u64) -> String {
    let now = unix_now();
    if unix > now {
        format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(unix - now))
        )
    } else {
        format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(now - unix))
        )
    }
}

/// One account's token state in this process: a mirror of its store
/// record, plus when to use and retry.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let first = Duration::from_secs(5);
        for failures in 0..20 {
            let base = first
                .saturating_mul(1 << failures.min(10))
                .min(Duration::from_secs(600));
            let wait = backoff(first, failures);
            assert!(
                wait >= base && wait <= base + base / 2,
                "{failures}: {wait:?}"
            );
        }
        assert!(backoff(first, 30) <= Duration::from_secs(900));
    }
}

#[derive(Default)]
struct AccountState {
    /// The store file's modification time when last read or written; a
    /// change means another process (`mailgate authorize`) wrote it.
    seen: Option<SystemTime>,
    loaded: bool,
    record: Record,
    /// Until when the stored access token is handed out.
    use_until: Option<Instant>,
    /// Background refresher back-off after transient failures.
    failures: u32,
    retry_at: Option<Instant>,
}

struct AccountTokens {
    account: Arc<Account>,
    state: Mutex<AccountState>,
}

/// Access tokens for every account.
pub struct Tokens {
    http: TokenHttp,
    store: Arc<TokenStore>,
    refresh_margin: Duration,
    retry_backoff: Duration,
    notifier: Notifier,
    metrics: Arc<Metrics>,
    accounts: HashMap<String, AccountTokens>,
}

/// Back-off after transient failures: `first` doubling to 10 minutes, with
/// up to 50 % jitter so that many accounts don't retry in step.
fn backoff(first: Duration, failures: u32) -> Duration {
    let base = first
        .saturating_mul(1 << failures.min(10))
        .min(Duration::from_secs(600));
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    base + base.mul_f64(f64::from(byte[0]) / 255.0 / 2.0)
}

impl Tokens {
    /// Token state for the accounts of `config`.
    ///
    /// # Errors
    /// When the store key can't be had or the HTTP client can't be built.
    pub fn new(
        config: &Config,
        tls: &rustls::ClientConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, TokenError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.oauth.request_timeout)
            .connect_timeout(config.oauth.request_timeout)
            .use_preconfigured_tls(tls.clone())
            .build()
            .map_err(|e| TokenError::Transient(format!("http client: {e}")))?;
        let store = TokenStore::open(&config.state_dir, &config.store_key)?;
        Ok(Self {
            notifier: Notifier::new(&config.oauth, http.clone()),
            metrics,
            http: TokenHttp(http),
            store: Arc::new(store),
            refresh_margin: config.oauth.refresh_margin,
            retry_backoff: config.oauth.retry_backoff,
            accounts: config
                .accounts
                .iter()
                .map(|(name, a)| {
                    (
                        name.clone(),
                        AccountTokens {
                            account: a.clone(),
                            state: Mutex::default(),
                        },
                    )
                })
                .collect(),
        })
    }

    /// The store, for the commands that read it.
    pub fn store(&self) -> &TokenStore {
        &self.store
    }

    /// The HTTP client for token requests.
    pub fn http(&self) -> &TokenHttp {
        &self.http
    }

    /// A valid access token for `account`, from the cache or a fresh grant.
    ///
    /// # Errors
    /// When no token can be had; see [`TokenError`].
    pub async fn access_token(&self, account: &Account) -> Result<Secret<String>, TokenError> {
        let entry = self.entry(account)?;
        let mut state = entry.state.lock().await;
        self.sync(account, &mut state)?;
        if let Some(token) = usable(&state) {
            return Ok(token);
        }
        if let Some(why) = &state.record.needs_authorization {
            return Err(TokenError::NeedsAuthorization(why.clone()));
        }
        self.refresh(&entry.account, &mut state, None).await
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
        let entry = self.entry(account)?;
        let mut state = entry.state.lock().await;
        self.sync(account, &mut state)?;
        match usable(&state) {
            Some(token) if token != *rejected => Ok(token),
            _ => {
                self.refresh(&entry.account, &mut state, Some(rejected))
                    .await
            }
        }
    }

    /// Refreshes now, whatever the cache holds (`mailgate test`).
    ///
    /// # Errors
    /// When no token can be had; see [`TokenError`].
    pub async fn force_refresh(&self, account: &Account) -> Result<Secret<String>, TokenError> {
        let entry = self.entry(account)?;
        let mut state = entry.state.lock().await;
        self.sync(account, &mut state)?;
        state.use_until = None;
        let current = state.record.access_token.clone().map(Secret::new);
        self.refresh(&entry.account, &mut state, current.as_ref())
            .await
    }

    /// Stores the tokens of a completed authorization and clears any
    /// needs-authorization mark. Gateways pick them up without a restart.
    ///
    /// # Errors
    /// When the store can't be written.
    pub async fn install(&self, account: &Account, granted: Granted) -> Result<(), TokenError> {
        let entry = self.entry(account)?;
        let mut state = entry.state.lock().await;
        let _lock = self.lock_store(&account.name).await?;
        self.sync(account, &mut state)?;
        let started = Instant::now();
        self.store_granted(account, &mut state, granted, started)
            .await?;
        info!(account = %account.name, "authorized");
        Ok(())
    }

    /// Refreshes the accounts that are due and returns how long to wait
    /// before the next one is. Accounts that are busy, need authorization,
    /// or wait out a back-off are skipped.
    pub async fn refresh_due(&self) -> Duration {
        let mut next = Instant::now() + Duration::from_secs(60);
        for entry in self.accounts.values() {
            let Ok(mut state) = entry.state.try_lock() else {
                continue;
            };
            if let Err(e) = self.sync(&entry.account, &mut state) {
                warn!(account = %entry.account.name, error = %e, "token store unreadable");
                continue;
            }
            if state.record.needs_authorization.is_some() {
                continue;
            }
            let now = Instant::now();
            if let Some(until) = state.use_until.filter(|u| *u > now) {
                next = next.min(until);
                continue;
            }
            if let Some(at) = state.retry_at.filter(|a| *a > now) {
                next = next.min(at);
                continue;
            }
            match self.refresh(&entry.account, &mut state, None).await {
                Ok(_) => {
                    state.failures = 0;
                    state.retry_at = None;
                    if let Some(until) = state.use_until {
                        next = next.min(until);
                    }
                }
                Err(TokenError::NeedsAuthorization(_)) => {}
                Err(e) => {
                    state.failures += 1;
                    let wait = backoff(self.retry_backoff, state.failures - 1);
                    warn!(account = %entry.account.name, error = %e, retry_in_s = wait.as_secs(), "token refresh failed; will retry");
                    let at = Instant::now() + wait;
                    state.retry_at = Some(at);
                    next = next.min(at);
                }
            }
        }
        next.saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100))
    }

    /// Runs [`Tokens::refresh_due`] until `shutdown` fires.
    pub async fn run_refresher(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            let wait = self.refresh_due().await;
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Sets the per-account gauges (token expiry, needs authorization) from
    /// the current state; called at each scrape. Busy accounts keep their
    /// last values.
    pub fn export_gauges(&self) {
        let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
        for (name, entry) in &self.accounts {
            let Ok(mut state) = entry.state.try_lock() else {
                continue;
            };
            if self.sync(&entry.account, &mut state).is_err() {
                continue;
            }
            let record = &state.record;
            let needs = i64::from(authorization_needed(&entry.account, Some(record)).is_some());
            self.metrics
                .needs_authorization
                .with_label_values(&[name])
                .set(needs);
            let expiry = if record.access_token.is_some() {
                i64::try_from(record.expires_at)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(now)
            } else {
                0
            };
            self.metrics
                .token_expiry_seconds
                .with_label_values(&[name])
                .set(expiry);
        }
    }

    /// Accounts marked as needing authorization, with the reason.
    pub fn needing_authorization(&self) -> Vec<(String, String)> {
        self.accounts
            .iter()
            .filter_map(|(name, entry)| {
                let record = self.store.load(name).ok().flatten();
                authorization_needed(&entry.account, record.as_ref()).map(|why| (name.clone(), why))
            })
            .collect()
    }

    fn entry(&self, account: &Account) -> Result<&AccountTokens, TokenError> {
        self.accounts.get(&account.name).ok_or_else(|| {
            TokenError::NeedsAuthorization(format!("unknown account {}", account.name))
        })
    }

    /// Reloads the record when the store file changed under us. A refresh
    /// token in the config seeds an account that has none stored.
    fn sync(&self, account: &Account, state: &mut AccountState) -> Result<(), StoreError> {
        let modified = self.store.modified(&account.name);
        if state.loaded && modified == state.seen {
            return Ok(());
        }
        let mut record = self.store.load(&account.name)?.unwrap_or_default();
        if record.refresh_token.is_none() && account.grant == Grant::AuthorizationCode {
            record.refresh_token = account.refresh_token.as_ref().map(|t| t.expose().clone());
        }
        state.use_until = record.access_token.as_ref().and_then(|_| {
            let lifetime =
                Duration::from_secs(record.expires_at.saturating_sub(record.obtained_at));
            let usable_until = record.obtained_at + self.usable(lifetime).as_secs();
            let left = usable_until.checked_sub(unix_now())?;
            Some(Instant::now() + Duration::from_secs(left))
        });
        if state.record.needs_authorization.is_some() && record.needs_authorization.is_none() {
            // Re-authorized elsewhere: forget the back-off too.
            state.failures = 0;
            state.retry_at = None;
        }
        state.record = record;
        state.seen = modified;
        state.loaded = true;
        Ok(())
    }

    /// How long a token of `lifetime` is handed out: until `refresh_margin`
    /// before it expires, or half its life when it is shorter than that.
    fn usable(&self, lifetime: Duration) -> Duration {
        lifetime
            .checked_sub(self.refresh_margin)
            .unwrap_or(lifetime / 2)
    }

    async fn lock_store(&self, name: &str) -> Result<StoreLock, TokenError> {
        let store = self.store.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || store.lock(&name))
            .await
            .map_err(|e| TokenError::Transient(format!("store lock task: {e}")))?
            .map_err(TokenError::from)
    }

    async fn save(&self, name: &str, state: &mut AccountState) -> Result<(), TokenError> {
        let store = self.store.clone();
        let (name, record) = (name.to_owned(), state.record.clone());
        let name2 = name.clone();
        tokio::task::spawn_blocking(move || store.save(&name, &record))
            .await
            .map_err(|e| TokenError::Transient(format!("store write task: {e}")))??;
        state.seen = self.store.modified(&name2);
        Ok(())
    }

    /// One token request under the account's store lock, so that no other
    /// process refreshes with the same refresh token meanwhile. `stale` is
    /// a token known to be bad: if the store holds another usable one by
    /// the time we have the lock, that one is used without a request.
    async fn refresh(
        &self,
        account: &Account,
        state: &mut AccountState,
        stale: Option<&Secret<String>>,
    ) -> Result<Secret<String>, TokenError> {
        let _lock = self.lock_store(&account.name).await?;
        self.sync(account, state)?;
        if let Some(token) = usable(state).filter(|t| Some(t) != stale) {
            return Ok(token);
        }
        let started = Instant::now();
        let refresh_token = state.record.refresh_token.clone().map(Secret::new);
        let result = grant::request(&self.http, account, refresh_token.as_ref()).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(TokenError::NeedsAuthorization(_)) => "needs_authorization",
            Err(_) => "transient",
        };
        let grant = match account.grant {
            Grant::AuthorizationCode => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
            Grant::JwtBearer => "jwt_bearer",
        };
        self.metrics
            .token_requests
            .with_label_values(&[&account.integration.name, grant, outcome])
            .inc();
        match result {
            Ok(granted) => self.store_granted(account, state, granted, started).await,
            Err(TokenError::NeedsAuthorization(why)) => {
                let first = state.record.needs_authorization.is_none();
                state.record.needs_authorization = Some(why.clone());
                state.record.last_error = Some(why.clone());
                self.save(&account.name, state).await?;
                warn!(
                    account = %account.name,
                    reason = %why,
                    fix = %fix_command(&account.name),
                    "account needs authorization; its tokens are kept"
                );
                if first {
                    self.notifier.needs_authorization(account, &why);
                }
                Err(TokenError::NeedsAuthorization(why))
            }
            Err(e) => {
                state.record.last_error = Some(e.to_string());
                // Best effort: the error is what matters to the caller.
                if let Err(store) = self.save(&account.name, state).await {
                    warn!(account = %account.name, error = %store, "can't record the failure");
                }
                Err(e)
            }
        }
    }

    /// Stores new tokens before anyone uses them: a rotated refresh token
    /// is the only valid one from now on (RFC 6819 §5.2.2.3).
    async fn store_granted(
        &self,
        account: &Account,
        state: &mut AccountState,
        granted: Granted,
        started: Instant,
    ) -> Result<Secret<String>, TokenError> {
        let now = unix_now();
        let record = &mut state.record;
        if let Some(rotated) = granted.refresh_token {
            record.refresh_token = Some(rotated.expose().clone());
        }
        if account.grant != Grant::AuthorizationCode {
            record.refresh_token = None;
        }
        record.access_token = Some(granted.access_token.expose().clone());
        record.obtained_at = now;
        record.expires_at = now + granted.lifetime.as_secs();
        record.last_refresh = now;
        record.last_error = None;
        record.needs_authorization = None;
        self.save(&account.name, state).await?;
        state.use_until = Some(started + self.usable(granted.lifetime));
        info!(account = %account.name, lifetime_s = granted.lifetime.as_secs(), "access token obtained");
        Ok(granted.access_token)
    }
}

fn usable(state: &AccountState) -> Option<Secret<String>> {
    let token = state.record.access_token.as_ref()?;
    state
        .use_until
        .filter(|u| *u > Instant::now())
        .map(|_| Secret::new(token.clone()))
}
