//! OAuth 2.0 tokens: grants, a per-account cache with one refresh in flight
//! (in this process, and across processes through the store's refresh
//! lease), a background refresher, the token status every view renders,
//! and the authorization-code flow between its start and the callback.
//!
//! The server sees one seam: [`Tokens::access_token`], "a valid access token
//! for this account", and [`Tokens::replace_rejected`] when the upstream
//! refused one. The store behind it is the [`TokenStore`] interface; the
//! wiring opens it once ([`open_store`]) and hands it in.

pub mod explain;
pub mod flow;
pub mod grant;
mod http;
mod jwt;
mod notify;
mod refresher;
mod spool;
pub mod status;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

pub use flow::{CallbackError, Flows};
pub use http::{is_transient_status, TokenHttp};
pub use status::{fix_command, format_relative, format_time, unix_now, Authorization, TokenStatus};
pub use store::{
    FileStore, Lease, PendingFlow, PendingFlows, PgStore, Record, SaveError, StoreError,
    TokenStore, Version, Versioned,
};

use crate::config::{Account, Config, Grant, StoreBackend};
pub use crate::config::{KeySource, KEY_ENV};
use crate::metrics::Metrics;
use crate::secret::Secret;
use grant::Granted;
use notify::Notifier;

/// The stores a gateway shares: token records and pending flows.
#[derive(Clone)]
pub struct Stores {
    pub tokens: Arc<dyn TokenStore>,
    pub flows: Arc<dyn PendingFlows>,
}

/// Opens the configured store; call it once and share the result. The
/// PostgreSQL store is connected and its tables migrated.
///
/// # Errors
/// When the store key can't be had, or the database can't be reached.
pub async fn open_store(
    config: &Config,
    metrics: Option<Arc<Metrics>>,
) -> Result<Stores, StoreError> {
    match &config.store {
        StoreBackend::File => {
            let file = Arc::new(FileStore::open(&config.state_dir, &config.store_key)?);
            Ok(Stores {
                tokens: file.clone(),
                flows: file,
            })
        }
        StoreBackend::Postgres(settings) => {
            let pg = Arc::new(PgStore::open(settings, &config.store_key, metrics).await?);
            Ok(Stores {
                tokens: pg.clone(),
                flows: pg,
            })
        }
    }
}

/// The token status of `account` as `store` holds it.
pub async fn status_of(store: &dyn TokenStore, account: &Account) -> TokenStatus {
    match &store.load(&account.name).await {
        Ok(v) => TokenStatus::of(account, Ok(v.as_ref().map(|v| &v.record))),
        Err(e) => TokenStatus::of(account, Err(e)),
    }
}

/// Why no token could be had. Transient failures are worth retrying;
/// the others need the administrator.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Network, timeout, 408, 429, 5xx, or an unreadable answer.
    #[error("token endpoint unavailable: {0}")]
    Transient(String),
    /// The account uses the authorization-code grant and was never
    /// authorized: no refresh token is stored or configured.
    #[error("account {0} is not authorized yet: run `mailgate authorize {0}`")]
    NotAuthorizedYet(String),
    /// `invalid_grant` and other refusals: the account must be authorized
    /// again. Nothing is deleted.
    #[error("account needs authorization: {0}")]
    NeedsAuthorization(String),
    /// The token store could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long a refresh lease is asked for: longer than any token request
/// (its timeout) by a safe margin, so that a live holder's request always
/// ends inside its lease.
fn lease_ttl(request_timeout: Duration) -> Duration {
    request_timeout * 2 + Duration::from_secs(10)
}

/// How much longer than a token request a lease must still hold for the
/// request to be sent.
const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// This process's name as a lease owner: the process id and a random tag.
fn lease_owner() -> String {
    let mut tag = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tag);
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{tag}", std::process::id())
}

/// One account's token state in this process: a mirror of its store
/// record, plus when to use and retry.
#[derive(Default)]
struct AccountState {
    /// The record's version when last read or written; the store tells
    /// when another process (`mailgate authorize`) saved a newer one.
    version: Version,
    loaded: bool,
    record: Record,
    /// Until when the stored access token is handed out.
    use_until: Option<Instant>,
    /// Background refresher back-off after transient failures.
    failures: u32,
    retry_at: Option<Instant>,
    /// The spool is known to hold nothing for this account (checked at
    /// the first load, and after a save that failed).
    spool_clear: bool,
}

struct AccountTokens {
    account: Arc<Account>,
    state: Mutex<AccountState>,
}

/// Access tokens for every account.
pub struct Tokens {
    http: TokenHttp,
    store: Arc<dyn TokenStore>,
    owner: String,
    lease_ttl: Duration,
    request_timeout: Duration,
    refresh_margin: Duration,
    retry_backoff: Duration,
    notifier: Notifier,
    metrics: Arc<Metrics>,
    accounts: HashMap<String, AccountTokens>,
    /// `[network] proxy`, named in the failures of requests through it.
    proxy: Option<String>,
    /// With a shared store: new tokens are written here, on local disk,
    /// before they are saved to the store, and removed once saved. What a
    /// crash or a store outage left here is saved at the next load.
    spool: Option<FileStore>,
}

impl Tokens {
    /// Token state for the accounts of `config`, kept in `store`.
    ///
    /// # Errors
    /// When the HTTP client can't be built.
    pub fn new(
        config: &Config,
        tls: &rustls::ClientConfig,
        metrics: Arc<Metrics>,
        store: Arc<dyn TokenStore>,
    ) -> Result<Self, TokenError> {
        let mut http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(config.oauth.request_timeout)
            .connect_timeout(config.oauth.request_timeout)
            .use_preconfigured_tls(tls.clone());
        // `[network] proxy` wins over HTTPS_PROXY/HTTP_PROXY, which the
        // client otherwise reads; NO_PROXY applies to both.
        if let Some(proxy) = &config.network.proxy {
            let proxy = reqwest::Proxy::all(proxy.url.expose().as_str())
                .map_err(|_| TokenError::Transient(format!("network.proxy {proxy}: not usable")))?
                .no_proxy(reqwest::NoProxy::from_env());
            http = http.proxy(proxy);
        }
        let http = http
            .build()
            .map_err(|e| TokenError::Transient(format!("http client: {e}")))?;

        let spool = spool::open(config)?;
        Ok(Self {
            proxy: config.network.proxy.as_ref().map(|p| p.to_string()),
            spool,
            notifier: Notifier::new(&config.oauth, http.clone()),
            metrics,
            http: TokenHttp(http),
            store,
            owner: lease_owner(),
            lease_ttl: lease_ttl(config.oauth.request_timeout),
            request_timeout: config.oauth.request_timeout,
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
        if let Err(e) = self.sync(account, &mut state).await {
            // Another writer saved, and the store can't be read now: the
            // token in hand is still good until it expires.
            match usable(&state) {
                Some(token) => {
                    warn!(account = %account.name, error = %e, "token store unreadable; using the cached access token");
                    return Ok(token);
                }
                None => return Err(e.into()),
            }
        }
        if let Some(token) = usable(&state) {
            return Ok(token);
        }
        if TokenStatus::of(account, Ok(Some(&state.record))).authorization
            != Authorization::Authorized
        {
            // About to refuse: read the record once more, in case another
            // instance installed tokens since the last poll of versions.
            state.loaded = false;
            if let Err(e) = self.sync(account, &mut state).await {
                warn!(account = %account.name, error = %e, "token store unreadable");
            }
            if let Some(token) = usable(&state) {
                return Ok(token);
            }
        }
        match TokenStatus::of(account, Ok(Some(&state.record))).authorization {
            Authorization::Revoked(why) => Err(TokenError::NeedsAuthorization(why)),
            Authorization::NotAuthorizedYet => {
                Err(TokenError::NotAuthorizedYet(account.name.clone()))
            }
            Authorization::Authorized => self.refresh(&entry.account, &mut state, None).await,
        }
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
        self.sync(account, &mut state).await?;
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
        self.sync(account, &mut state).await?;
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
        let lease = self.lease(&account.name).await?;
        let installed = async {
            self.sync(account, &mut state).await?;
            self.store_granted(account, &mut state, granted, Instant::now(), &lease)
                .await
        }
        .await;
        self.store.release(lease).await;
        installed?;
        info!(account = %account.name, "authorized");
        Ok(())
    }

    /// Records that the upstream refuses `account`'s logins for a reason
    /// only an administrator can fix (`why` names the fix), so that
    /// `status` and the page show it as the account's last error. Best
    /// effort: a failure to record is logged.
    pub async fn note_upstream_refusal(&self, account: &Account, why: &str) {
        warn!(account = %account.name, reason = %why, "the upstream refuses this account's logins");
        let Ok(entry) = self.entry(account) else {
            return;
        };
        let mut state = entry.state.lock().await;
        let noted = async {
            self.sync(account, &mut state).await?;
            if state.record.last_error.as_deref() == Some(why) {
                return Ok(());
            }
            state.record.last_error = Some(why.to_owned());
            self.save(&account.name, &mut state, None).await
        }
        .await;
        if let Err(e) = noted {
            warn!(account = %account.name, error = %e, "can't record the upstream's refusal");
        }
    }

    /// The token status of `account`, from the store.
    pub async fn status(&self, account: &Account) -> TokenStatus {
        status_of(self.store.as_ref(), account).await
    }

    /// What the token store is, or why it can't be used now.
    ///
    /// # Errors
    /// When the store can't be reached.
    pub async fn store_check(&self) -> Result<String, StoreError> {
        self.store.check().await
    }

    /// The token status of every account, in name order.
    pub async fn statuses(&self) -> Vec<(Arc<Account>, TokenStatus)> {
        let mut entries: Vec<&AccountTokens> = self.accounts.values().collect();
        entries.sort_by(|a, b| a.account.name.cmp(&b.account.name));
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            out.push((entry.account.clone(), self.status(&entry.account).await));
        }
        out
    }

    /// Sets the per-account gauges (token expiry, needs authorization) from
    /// the accounts' statuses; called at each scrape.
    pub async fn export_gauges(&self) {
        let now = unix_now();
        for (account, status) in self.statuses().await {
            if status.store_error.is_some() {
                continue;
            }
            let name = [account.name.as_str()];
            self.metrics
                .needs_authorization
                .with_label_values(&name)
                .set(i64::from(status.needs_authorization().is_some()));
            self.metrics
                .token_expiry_seconds
                .with_label_values(&name)
                .set(status.expiry_seconds(now));
        }
    }

    fn entry(&self, account: &Account) -> Result<&AccountTokens, TokenError> {
        self.accounts.get(&account.name).ok_or_else(|| {
            TokenError::NeedsAuthorization(format!("unknown account {}", account.name))
        })
    }

    /// Reloads the record when another writer saved it. A refresh token in
    /// the config seeds an account that has none stored.
    async fn sync(&self, account: &Account, state: &mut AccountState) -> Result<(), StoreError> {
        if state.loaded && !self.store.changed(&account.name, state.version) {
            return Ok(());
        }
        if !state.spool_clear {
            self.replay_spool(&account.name, state).await?;
        }
        let Versioned {
            mut record,
            version,
        } = self.store.load(&account.name).await?.unwrap_or_default();
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
        state.version = version;
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

    async fn lease(&self, account: &str) -> Result<Lease, TokenError> {
        Ok(self
            .store
            .lease(account, &self.owner, self.lease_ttl)
            .await?)
    }

    /// Saves the state's record against the version it was loaded at,
    /// fenced by `lease` when one is held.
    async fn save(
        &self,
        name: &str,
        state: &mut AccountState,
        fence: Option<&Lease>,
    ) -> Result<(), TokenError> {
        match self.compare_and_save(name, state, fence).await {
            Ok(()) => Ok(()),
            Err(e @ (SaveError::Conflict | SaveError::LeaseLost)) => {
                Err(self.stale(name, state, &e))
            }
            Err(SaveError::Store(e)) => Err(e.into()),
        }
    }

    /// A save that was refused: another writer got there first, or our
    /// lease ran out (this process stalled). Its record stands, ours is
    /// dropped and counted, and the record is read again at the next use.
    fn stale(&self, name: &str, state: &mut AccountState, why: &SaveError) -> TokenError {
        let reason = match why {
            SaveError::LeaseLost => "lease_lost",
            _ => "conflict",
        };
        self.metrics
            .stale_saves
            .with_label_values(&[name, reason])
            .inc();
        warn!(account = %name, reason, "token record saved elsewhere meanwhile; this save was dropped");
        state.loaded = false;
        TokenError::Store(StoreError {
            place: "token store".into(),
            message: format!("this save was refused ({why}); another process's record stands"),
        })
    }

    async fn compare_and_save(
        &self,
        name: &str,
        state: &mut AccountState,
        fence: Option<&Lease>,
    ) -> Result<(), SaveError> {
        state.version = self
            .store
            .save(name, &state.record, state.version, fence)
            .await?;
        Ok(())
    }

    /// One token request under the account's refresh lease, so that no
    /// other process refreshes with the same refresh token meanwhile.
    /// `stale` is a token known to be bad: if the store holds another
    /// usable one by the time we have the lease, that one is used without
    /// a request.
    async fn refresh(
        &self,
        account: &Account,
        state: &mut AccountState,
        stale: Option<&Secret<String>>,
    ) -> Result<Secret<String>, TokenError> {
        let lease = self.lease(&account.name).await?;
        let result = self.refresh_leased(account, state, stale, &lease).await;
        self.store.release(lease).await;
        result
    }

    async fn refresh_leased(
        &self,
        account: &Account,
        state: &mut AccountState,
        stale: Option<&Secret<String>>,
        lease: &Lease,
    ) -> Result<Secret<String>, TokenError> {
        // Under the lease the record is read afresh, whatever the change
        // check says: the refresh token must be the newest one.
        state.loaded = false;
        self.sync(account, state).await?;
        if let Some(token) = usable(state).filter(|t| Some(t) != stale) {
            return Ok(token);
        }
        // The request is only sent while the lease surely outlasts it: a
        // process that stalled since taking the lease may have lost it.
        if !lease.holds_for(self.request_timeout + LEASE_MARGIN) {
            return Err(TokenError::Store(StoreError {
                place: "refresh lease".into(),
                message: "it ran out before the token request could be sent (this process stalled)"
                    .into(),
            }));
        }
        let started = Instant::now();
        let refresh_token = state.record.refresh_token.clone().map(Secret::new);
        let result = grant::request(&self.http, account, refresh_token.as_ref())
            .await
            .map_err(|e| match (e, &self.proxy) {
                // The proxy may be why: say it was in the way.
                (TokenError::Transient(why), Some(proxy)) => {
                    TokenError::Transient(format!("{why} (through proxy {proxy})"))
                }
                (e, _) => e,
            });
        // No refresh token: nothing was sent, so nothing is counted.
        let sent = !matches!(result, Err(TokenError::NotAuthorizedYet(_)));
        let outcome = match &result {
            Ok(_) => "ok",
            Err(TokenError::NeedsAuthorization(_) | TokenError::NotAuthorizedYet(_)) => {
                "needs_authorization"
            }
            Err(_) => "transient",
        };
        if sent {
            self.metrics
                .token_requests
                .with_label_values(&[
                    &account.integration.name,
                    account.grant.request_label(),
                    outcome,
                ])
                .inc();
        }
        if let Err(TokenError::NeedsAuthorization(_)) = &result {
            if let Some(newer) = self
                .rotated_elsewhere(account, state, refresh_token.as_ref())
                .await?
            {
                return newer;
            }
        }
        match result {
            Ok(granted) => {
                self.store_granted(account, state, granted, started, lease)
                    .await
            }
            Err(e @ (TokenError::NeedsAuthorization(_) | TokenError::NotAuthorizedYet(_))) => {
                let why = match &e {
                    TokenError::NeedsAuthorization(why) => why.clone(),
                    _ => "not authorized yet: no refresh token stored".to_owned(),
                };
                // The mark stops further requests (and the refresher)
                // until the account is authorized; the hooks fire once.
                let first = state.record.needs_authorization.is_none();
                state.record.needs_authorization = Some(why.clone());
                state.record.last_error = Some(why.clone());
                self.save(&account.name, state, Some(lease)).await?;
                warn!(
                    account = %account.name,
                    reason = %why,
                    fix = %fix_command(&account.name),
                    "account needs authorization; its tokens are kept"
                );
                if first {
                    self.notifier.needs_authorization(account, &why);
                }
                Err(e)
            }
            Err(e) => {
                state.record.last_error = Some(e.to_string());
                // Best effort: the error is what matters to the caller.
                if let Err(store) = self.save(&account.name, state, Some(lease)).await {
                    warn!(account = %account.name, error = %store, "can't record the failure");
                }
                Err(e)
            }
        }
    }

    /// The provider refused the refresh token with `invalid_grant`. Before
    /// the account is marked, the record is read again: another instance
    /// may have rotated the token meanwhile (a holder whose lease we took
    /// over when it stalled, say), and then the new one stands.
    /// `None`: the record is unchanged, and the refusal stands.
    async fn rotated_elsewhere(
        &self,
        account: &Account,
        state: &mut AccountState,
        used: Option<&Secret<String>>,
    ) -> Result<Option<Result<Secret<String>, TokenError>>, TokenError> {
        state.loaded = false;
        self.sync(account, state).await?;
        // Another save that left the refresh token as it was (a last-error
        // note) changes nothing: the refusal stands.
        if state.record.refresh_token.as_deref() == used.map(|t| t.expose().as_str()) {
            return Ok(None);
        }
        info!(account = %account.name, "refresh token refused, but another instance saved new tokens meanwhile; using those");
        Ok(Some(usable(state).ok_or_else(|| {
            TokenError::Store(StoreError {
                place: "token store".into(),
                message:
                    "another instance saved this account's tokens during the refresh; try again"
                        .into(),
            })
        })))
    }

    /// Stores new tokens before anyone uses them: a rotated refresh token
    /// is the only valid one from now on (RFC 6819 §5.2.2.3). The save is
    /// fenced by `lease`: a holder that lost it is a stale writer.
    async fn store_granted(
        &self,
        account: &Account,
        state: &mut AccountState,
        granted: Granted,
        started: Instant,
        lease: &Lease,
    ) -> Result<Secret<String>, TokenError> {
        let now = unix_now();
        let apply = |record: &mut Record| {
            if let Some(rotated) = &granted.refresh_token {
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
        };
        apply(&mut state.record);
        // On local disk first: if the save below fails or this process
        // dies before it, the rotated refresh token survives.
        self.spool_write(&account.name, &state.record).await;
        // A refused save (the lease lost, or a newer record laid over ours
        // refused) must not come back from the spool without its fence.
        let mut refused = false;
        let saved = async {
            match self
                .compare_and_save(&account.name, state, Some(lease))
                .await
            {
                Ok(()) => Ok(()),
                // We still hold the lease, so these tokens are the newest:
                // a writer without it (a tool) got in between. Lay ours
                // over what it wrote rather than lose a rotated refresh
                // token.
                Err(SaveError::Conflict) => {
                    warn!(account = %account.name, "token record saved elsewhere during the refresh; saving the new tokens over it");
                    state.loaded = false;
                    self.sync(account, state).await?;
                    apply(&mut state.record);
                    match self
                        .compare_and_save(&account.name, state, Some(lease))
                        .await
                    {
                        Ok(()) => Ok(()),
                        Err(e @ (SaveError::Conflict | SaveError::LeaseLost)) => {
                            refused = true;
                            Err(self.stale(&account.name, state, &e))
                        }
                        Err(SaveError::Store(e)) => Err(e.into()),
                    }
                }
                Err(e @ SaveError::LeaseLost) => {
                    refused = true;
                    Err(self.stale(&account.name, state, &e))
                }
                Err(SaveError::Store(e)) => Err(e.into()),
            }
        }
        .await;
        match &saved {
            // Kept in the spool for the next load; until then the store's
            // record is the one to use.
            Err(TokenError::Store(_)) if !refused => {
                state.spool_clear = false;
                state.loaded = false;
            }
            _ => self.empty_spool(&account.name),
        }
        saved?;
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
