//! The token store as an interface: what the refresh logic needs from any
//! backend, and the records it keeps.
//!
//! - [`TokenStore`]: a record per account with a version; compare-and-save
//!   against the version that was loaded; a refresh lease per account; and
//!   a cheap check for records another process wrote.
//! - [`PendingFlows`]: started authorization-code flows (PKCE verifier and
//!   state), until the browser comes back, possibly to another process.
//!
//! [`file::FileStore`] is the embedded backend, one encrypted file per
//! account. [`postgres::PgStore`] is shared by several gateways; it
//! implements the same two traits.

pub mod file;
mod key;
pub mod postgres;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use file::FileStore;
pub use postgres::PgStore;

/// A store failure, naming where (a file, a table).
#[derive(Debug, thiserror::Error)]
#[error("token store {place}: {message}")]
pub struct StoreError {
    pub place: String,
    pub message: String,
}

/// Why a compare-and-save did not save.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// Another writer saved a newer version since the load; nothing was
    /// written.
    #[error("a newer record was saved meanwhile")]
    Conflict,
    /// The save was fenced by a lease that has expired or passed to
    /// another owner: a stale writer. Nothing was written.
    #[error("the refresh lease was lost before the save")]
    LeaseLost,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A record's version: 0 for a record never saved, then one more per save.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u64);

/// A record as loaded, with the version to save against.
#[derive(Debug, Clone, Default)]
pub struct Versioned {
    pub record: Record,
    pub version: Version,
}

/// The right to refresh one account's tokens, held by one owner at a time
/// across every process that shares the store. Dropping it releases it
/// where the backend can (the file backend's lock); [`TokenStore::release`]
/// releases it everywhere.
pub struct Lease {
    pub account: String,
    pub owner: String,
    /// Bumped at each grant of the lease, so that a stale holder can be
    /// told apart (0 where the backend has no epochs).
    pub epoch: u64,
    /// How long the lease holds from `granted_at`, by the store's clock;
    /// `None` while the holder lives (a lock the kernel drops with the
    /// process).
    pub expires_in: Option<Duration>,
    /// This process's instant just before the lease was asked for: the
    /// store's expiry is no earlier than `granted_at + expires_in`.
    pub granted_at: Instant,
    /// The previous holder's lease had expired without a release: it died,
    /// or stalled.
    pub took_over: bool,
    /// What the backend keeps for the lease's lifetime (a locked file).
    guard: Option<Box<dyn Send + Sync>>,
}

impl Lease {
    /// A lease held through `guard`.
    pub fn held(account: &str, owner: &str, epoch: u64, guard: Box<dyn Send + Sync>) -> Self {
        Self {
            account: account.to_owned(),
            owner: owner.to_owned(),
            epoch,
            expires_in: None,
            granted_at: Instant::now(),
            took_over: false,
            guard: Some(guard),
        }
    }

    /// A lease that the store expires by itself `ttl` after `granted_at`.
    pub fn expiring(
        account: &str,
        owner: &str,
        epoch: u64,
        granted_at: Instant,
        ttl: Duration,
        took_over: bool,
    ) -> Self {
        Self {
            account: account.to_owned(),
            owner: owner.to_owned(),
            epoch,
            expires_in: Some(ttl),
            granted_at,
            took_over,
            guard: None,
        }
    }

    /// Whether the lease surely holds for `needed` more: a token request
    /// is only sent when it ends inside the lease.
    pub fn holds_for(&self, needed: Duration) -> bool {
        self.expires_in.is_none_or(|ttl| {
            ttl.checked_sub(self.granted_at.elapsed())
                .is_some_and(|left| left > needed)
        })
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("account", &self.account)
            .field("owner", &self.owner)
            .field("epoch", &self.epoch)
            .field("expires_in", &self.expires_in)
            .field("took_over", &self.took_over)
            .field("guarded", &self.guard.is_some())
            .finish()
    }
}

/// Token records, one per account.
#[async_trait::async_trait]
pub trait TokenStore: Send + Sync {
    /// The record of `account` and its version; `None` if never saved.
    ///
    /// # Errors
    /// When the record exists but can't be read or opened.
    async fn load(&self, account: &str) -> Result<Option<Versioned>, StoreError>;

    /// Saves `record` if the stored version is still `expected` and, with
    /// `fence`, while that lease still holds; returns the new version.
    ///
    /// # Errors
    /// [`SaveError::Conflict`] when another writer saved since,
    /// [`SaveError::LeaseLost`] when the fence no longer holds; a store
    /// error when it can't be written (the old record is kept).
    async fn save(
        &self,
        account: &str,
        record: &Record,
        expected: Version,
        fence: Option<&Lease>,
    ) -> Result<Version, SaveError>;

    /// Takes the refresh lease of `account` for `owner`, waiting a bounded
    /// time for another holder. `ttl` is how long it may be held; a
    /// backend that can tell a dead holder from a live one may ignore it.
    ///
    /// # Errors
    /// When another holder keeps it past the wait, or the store fails.
    async fn lease(&self, account: &str, owner: &str, ttl: Duration) -> Result<Lease, StoreError>;

    /// Gives the lease up.
    async fn release(&self, lease: Lease);

    /// Whether another writer may have saved `account` since the version
    /// seen; cheap enough to ask before every use of a cached token (it
    /// never waits for the store).
    fn changed(&self, account: &str, seen: Version) -> bool;

    /// What the store is and whether it is reachable, for `check-config`
    /// and `/readyz`: a description, or why it can't be used now.
    ///
    /// # Errors
    /// When the store can't be reached.
    async fn check(&self) -> Result<String, StoreError>;
}

/// Started authorization flows, by an opaque key.
#[async_trait::async_trait]
pub trait PendingFlows: Send + Sync {
    /// Stores (or replaces) the flow under `key`.
    ///
    /// # Errors
    /// When the store can't be written.
    async fn put(&self, key: &str, flow: &PendingFlow) -> Result<(), StoreError>;

    /// The flow under `key`, if any.
    ///
    /// # Errors
    /// When it exists but can't be read.
    async fn get(&self, key: &str) -> Result<Option<PendingFlow>, StoreError>;

    /// Forgets the flow under `key`.
    async fn remove(&self, key: &str);

    /// Forgets flows stored longer ago than `age`.
    async fn sweep(&self, age: Duration);
}

/// What is stored for one account.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<String>,
    /// Unix seconds when the access token was obtained and when it expires.
    #[serde(default)]
    pub obtained_at: u64,
    #[serde(default)]
    pub expires_at: u64,
    /// Unix seconds of the last successful token request.
    #[serde(default)]
    pub last_refresh: u64,
    /// Why the last token request failed, in plain words (no secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Set when the provider refused the grant for good: the account needs
    /// `mailgate authorize`. The tokens are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub needs_authorization: Option<String>,
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "access_token",
                &self.access_token.as_ref().map(|_| "<redacted>"),
            )
            .field("obtained_at", &self.obtained_at)
            .field("expires_at", &self.expires_at)
            .field("last_refresh", &self.last_refresh)
            .field("last_error", &self.last_error)
            .field("needs_authorization", &self.needs_authorization)
            .finish()
    }
}

/// A flow started by `mailgate authorize` or the integrations page.
#[derive(Clone, Serialize, Deserialize)]
pub struct PendingFlow {
    pub account: String,
    pub verifier: String,
    pub created_at: u64,
    /// Set when the flow ended: `Ok(())`, or why it failed.
    #[serde(default)]
    pub outcome: Option<Result<(), String>>,
    /// Started from the integrations page: the callback sends the browser
    /// back there.
    #[serde(default)]
    pub from_page: bool,
}

impl std::fmt::Debug for PendingFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingFlow")
            .field("account", &self.account)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}
