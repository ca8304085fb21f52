//! The shared token store: PostgreSQL, for several gateways behind a load
//! balancer.
//!
//! - **Tables:** `mailgate_tokens` (a sealed record and its version per
//!   account), `mailgate_leases` (the refresh lease per account) and
//!   `mailgate_flows` (pending authorization flows), and
//!   `mailgate_schema`, the schema version. [`PgStore::open`] creates and
//!   migrates them under an advisory lock, so instances may start at once.
//! - **Sealing:** the same AEAD, key and bytes as the file store, with the
//!   account name as associated data and the version inside the
//!   ciphertext: the database and its backups only ever hold ciphertext
//!   (the account names are the rows' plain keys), and a row can't be
//!   moved to another account or get another version unseen. (A whole
//!   row restored from a backup is a valid old record: nothing tells.)
//! - **Leases:** timed by the database's clock (`now()`), with an owner and
//!   an epoch bumped at each grant. One statement takes a lease that is
//!   free, released or expired; a save can be fenced by it, and a fenced
//!   save after the lease expired is refused ([`SaveError::LeaseLost`]).
//! - **Changes:** each instance polls the versions (one small query every
//!   `poll_interval`), so [`TokenStore::changed`] answers from memory: a
//!   login with a cached token never waits for the database.
//! - **Connection:** one connection, TLS always on and verified, opened
//!   again after it breaks; while it can't be, every call fails at once
//!   with the last error instead of waiting for another connect timeout.
//!   Every statement is bounded by `connect_timeout` too.
//!   Every statement is a single statement, so callers share the
//!   connection without transactions (the migration has its own).

use std::collections::HashMap;
use std::sync::{Arc, Mutex as StdMutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tokio_postgres::Client;
use tracing::{info, warn};

use super::key::{Sealed, Sealer};
use super::{
    Lease, PendingFlow, PendingFlows, Record, SaveError, StoreError, TokenStore, Version, Versioned,
};
use crate::config::{KeySource, PostgresSettings};
use crate::metrics::Metrics;

mod schema;
use schema::{detail, schema_version};
pub use schema::{Connector, SCHEMA_VERSION};

/// After a failed connect, calls fail at once with its error for this long.
const RECONNECT_AFTER: Duration = Duration::from_millis(500);

/// How often a lease wait asks again.
const LEASE_RETRY: Duration = Duration::from_millis(50);

/// Takes a free, released or expired lease (or renews our own), in one
/// statement. `took_over` says the previous holder's lease expired
/// unreleased. No row: another owner holds it.
const TAKE_LEASE: &str = "
    WITH prev AS (
        SELECT owner, released, expires_at FROM mailgate_leases WHERE account = $1
    )
    INSERT INTO mailgate_leases AS l (account, owner, epoch, expires_at, released)
    VALUES ($1, $2, 1, now() + make_interval(secs => $3), false)
    ON CONFLICT (account) DO UPDATE
        SET owner = EXCLUDED.owner, epoch = l.epoch + 1,
            expires_at = EXCLUDED.expires_at, released = false
        WHERE l.released OR l.expires_at <= now() OR l.owner = EXCLUDED.owner
    RETURNING l.epoch,
        COALESCE((SELECT NOT released AND expires_at <= now() AND owner <> $2 FROM prev), false)";

/// Whether the lease (account $1, owner $2, epoch $3) still holds.
const LEASE_HOLDS: &str = "EXISTS (SELECT 1 FROM mailgate_leases
    WHERE account = $1::text AND owner = $2::text AND epoch = $3::bigint
        AND NOT released AND expires_at > now())";

/// The PostgreSQL token store. Cloning shares it.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    connector: Connector,
    sealer: Sealer,
    conn: Mutex<Conn>,
    /// The version last seen of each account, by the poll or our own loads
    /// and saves.
    versions: StdMutex<HashMap<String, Version>>,
    /// The poll's last error, if the last poll failed.
    health: StdMutex<Option<String>>,
}

#[derive(Default)]
struct Conn {
    client: Option<Arc<Client>>,
    failed: Option<(Instant, String)>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("place", &self.inner.connector.place)
            .finish_non_exhaustive()
    }
}

/// A statement bounded by `connect_timeout`: a database host that stops
/// answering without closing the connection must not hold a login (or the
/// lease wait, or `/readyz`) for the kernel's keepalive time. On expiry the
/// connection is dropped, so the next call opens a new one.
trait Within<T> {
    async fn within(self, store: &PgStore, operation: &'static str) -> Result<T, StoreError>;
}

impl<T, F: std::future::Future<Output = Result<T, tokio_postgres::Error>>> Within<T> for F {
    async fn within(self, store: &PgStore, operation: &'static str) -> Result<T, StoreError> {
        let limit = store.inner.connector.settings.connect_timeout;
        match tokio::time::timeout(limit, self).await {
            Ok(done) => done.map_err(|e| store.error(operation, detail(&e))),
            Err(_) => {
                store.inner.conn.lock().await.client = None;
                Err(store.error(operation, format!("no answer within {limit:?}")))
            }
        }
    }
}

impl PgStore {
    /// Connects, creates or migrates the tables, and starts the poll of
    /// versions (stopped when the last clone is dropped).
    ///
    /// See [`Connector::prepare`] for the key.
    ///
    /// # Errors
    /// When the key, the CA file or the database can't be had, or the
    /// database's schema is newer than this mailgate's.
    pub async fn open(
        settings: &PostgresSettings,
        key: &KeySource,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, StoreError> {
        let connector = Connector::new(settings, metrics)?;
        let (client, sealer) = connector.prepare(key).await?;
        let store = Self {
            inner: Arc::new(Inner {
                sealer,
                connector,
                // The connection that prepared the store serves it.
                conn: Mutex::new(Conn {
                    client: Some(Arc::new(client)),
                    failed: None,
                }),
                versions: StdMutex::default(),
                health: StdMutex::default(),
            }),
        };
        let weak = Arc::downgrade(&store.inner);
        tokio::spawn(poll(weak, settings.poll_interval));
        Ok(store)
    }

    fn error(&self, operation: &'static str, message: impl std::fmt::Display) -> StoreError {
        self.inner.connector.error(operation, message)
    }

    fn place(&self) -> &str {
        &self.inner.connector.place
    }

    /// The shared connection, opened again when it broke.
    async fn client(&self) -> Result<Arc<Client>, StoreError> {
        let mut conn = self.inner.conn.lock().await;
        if let Some(c) = conn.client.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        conn.client = None;
        if let Some((at, why)) = &conn.failed {
            if at.elapsed() < RECONNECT_AFTER {
                return Err(StoreError {
                    place: self.place().to_owned(),
                    message: why.clone(),
                });
            }
        }
        match self.inner.connector.connect().await {
            Ok(client) => {
                if conn.failed.take().is_some() {
                    info!(store = %self.place(), "token store reachable again");
                }
                let client = Arc::new(client);
                conn.client = Some(client.clone());
                Ok(client)
            }
            Err(e) => {
                conn.failed = Some((Instant::now(), e.message.clone()));
                Err(e)
            }
        }
    }

    /// The schema version in the database.
    ///
    /// # Errors
    /// When the database can't be reached or read.
    pub async fn schema_version(&self) -> Result<i32, StoreError> {
        let client = self.client().await?;
        schema_version(&client).within(self, "check").await
    }

    fn note_version(&self, account: &str, version: Version) {
        let mut versions = self
            .inner
            .versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // The latest read wins, even when older: a row restored from a
        // backup is then read once, not at every use.
        versions.insert(account.to_owned(), version);
    }

    /// The newest version each account has in the database.
    async fn poll_once(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        let rows = client
            .query("SELECT account, version FROM mailgate_tokens", &[])
            .within(self, "poll")
            .await?;
        for row in rows {
            let (account, version): (String, i64) = (row.get(0), row.get(1));
            self.note_version(&account, Version(u64::try_from(version).unwrap_or(0)));
        }
        Ok(())
    }

    /// The sealed record of `account`, whatever its version, for `store
    /// copy`: the bytes as stored and the version.
    ///
    /// # Errors
    /// When the database can't be read.
    pub async fn load_sealed(&self, account: &str) -> Result<Option<(Vec<u8>, u64)>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT sealed, version FROM mailgate_tokens WHERE account = $1",
                &[&account],
            )
            .within(self, "load")
            .await?;
        Ok(row.map(|r| {
            let version: i64 = r.get(1);
            (r.get(0), u64::try_from(version).unwrap_or(0))
        }))
    }

    fn version_param(version: Version) -> Result<i64, SaveError> {
        i64::try_from(version.0).map_err(|_| {
            SaveError::Store(StoreError {
                place: "token store".into(),
                message: "version out of range".into(),
            })
        })
    }
}

/// Polls the versions until the store is dropped.
async fn poll(store: Weak<Inner>, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = store.upgrade() else {
            return;
        };
        let store = PgStore { inner };
        let outcome = store.poll_once().await.err().map(|e| e.to_string());
        let mut health = store
            .inner
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if outcome.is_some() && health.is_none() {
            warn!(store = %store.place(), error = outcome.as_deref().unwrap_or(""), "token store unreachable; cached access tokens keep serving logins");
        }
        *health = outcome;
    }
}

#[async_trait::async_trait]
impl TokenStore for PgStore {
    async fn load(&self, account: &str) -> Result<Option<Versioned>, StoreError> {
        let Some((sealed, version)) = self.load_sealed(account).await? else {
            return Ok(None);
        };
        let opened: Sealed<Record> = self.inner.sealer.open(account, sealed).map_err(|why| {
            self.error(
                "load",
                format!("the record of {account} is damaged or sealed under another key ({why})"),
            )
        })?;
        if opened.version != version {
            return Err(self.error(
                "load",
                format!(
                    "the record of {account} says version {} but its row {version}: it was altered outside mailgate",
                    opened.version
                ),
            ));
        }
        self.note_version(account, Version(version));
        Ok(Some(Versioned {
            record: opened.value,
            version: Version(version),
        }))
    }

    async fn save(
        &self,
        account: &str,
        record: &Record,
        expected: Version,
        fence: Option<&Lease>,
    ) -> Result<Version, SaveError> {
        let next = Version(expected.0 + 1);
        let sealed = self
            .inner
            .sealer
            .seal(
                account,
                &Sealed {
                    version: next.0,
                    value: record,
                },
            )
            .map_err(|why| self.error("save", why))?;
        let (expected_p, next_p) = (Self::version_param(expected)?, Self::version_param(next)?);
        let (owner, epoch) = match fence {
            Some(l) => (
                Some(l.owner.as_str()),
                Self::version_param(Version(l.epoch))?,
            ),
            None => (None, 0),
        };
        // $1 account, $2 owner, $3 epoch, $4 expected, $5 next, $6 sealed.
        let fenced = format!("($2::text IS NULL OR {LEASE_HOLDS})");
        let sql = if expected.0 == 0 {
            format!(
                "INSERT INTO mailgate_tokens (account, version, sealed)
                 SELECT $1::text, $5::bigint, $6::bytea WHERE $4::bigint = 0 AND {fenced}
                 ON CONFLICT (account) DO NOTHING"
            )
        } else {
            format!(
                "UPDATE mailgate_tokens SET version = $5, sealed = $6, updated_at = now()
                 WHERE account = $1 AND version = $4::bigint AND {fenced}"
            )
        };
        let client = self.client().await?;
        let written = client
            .execute(
                &sql,
                &[&account, &owner, &epoch, &expected_p, &next_p, &sealed],
            )
            .within(self, "save")
            .await?;
        if written == 1 {
            self.note_version(account, next);
            return Ok(next);
        }
        if fence.is_some() {
            let holds: bool = client
                .query_one(
                    &format!("SELECT {LEASE_HOLDS}"),
                    &[&account, &owner, &epoch],
                )
                .within(self, "save")
                .await?
                .get(0);
            if !holds {
                return Err(SaveError::LeaseLost);
            }
        }
        Err(SaveError::Conflict)
    }

    async fn lease(&self, account: &str, owner: &str, ttl: Duration) -> Result<Lease, StoreError> {
        // Long enough for a dead holder's lease to run out, and then some.
        let deadline = Instant::now() + ttl + Duration::from_secs(2);
        loop {
            let client = self.client().await?;
            let granted_at = Instant::now();
            let row = client
                .query_opt(TAKE_LEASE, &[&account, &owner, &ttl.as_secs_f64()])
                .within(self, "lease")
                .await?;
            if let Some(row) = row {
                let (epoch, took_over): (i64, bool) = (row.get(0), row.get(1));
                if took_over {
                    if let Some(m) = &self.inner.connector.metrics {
                        m.lease_takeovers.with_label_values(&[account]).inc();
                    }
                    warn!(account, "took over a refresh lease that expired unreleased (its holder died or stalled)");
                }
                return Ok(Lease::expiring(
                    account,
                    owner,
                    u64::try_from(epoch).unwrap_or(0),
                    granted_at,
                    ttl,
                    took_over,
                ));
            }
            if Instant::now() >= deadline {
                return Err(self.error(
                    "lease",
                    format!("another instance held the refresh lease of {account} for longer than {ttl:?}"),
                ));
            }
            tokio::time::sleep(LEASE_RETRY).await;
        }
    }

    async fn release(&self, lease: Lease) {
        let Ok(epoch) = i64::try_from(lease.epoch) else {
            return;
        };
        let released = async {
            self.client()
                .await?
                .execute(
                    "UPDATE mailgate_leases SET released = true
                     WHERE account = $1 AND owner = $2 AND epoch = $3",
                    &[&lease.account, &lease.owner, &epoch],
                )
                .within(self, "release")
                .await
        }
        .await;
        // Not fatal: the lease runs out by itself.
        if let Err(e) = released {
            warn!(account = %lease.account, error = %e, "can't release the refresh lease; it expires by itself");
        }
    }

    fn changed(&self, account: &str, seen: Version) -> bool {
        self.inner
            .versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(account)
            .is_some_and(|v| *v != seen)
    }

    async fn check(&self) -> Result<String, StoreError> {
        if let Some(why) = self
            .inner
            .health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Err(StoreError {
                place: self.place().to_owned(),
                message: why,
            });
        }
        let version = self.schema_version().await?;
        Ok(format!("{}, schema version {version}", self.place()))
    }
}

/// Flows are rows keyed by the flow's key, sealed under `.pending-KEY`
/// (the file store's name for them).
#[async_trait::async_trait]
impl PendingFlows for PgStore {
    async fn put(&self, key: &str, flow: &PendingFlow) -> Result<(), StoreError> {
        let sealed = self
            .inner
            .sealer
            .seal(&format!(".pending-{key}"), flow)
            .map_err(|why| self.error("put_flow", why))?;
        self.client()
            .await?
            .execute(
                "INSERT INTO mailgate_flows (key, sealed) VALUES ($1, $2)
                 ON CONFLICT (key) DO UPDATE SET sealed = EXCLUDED.sealed",
                &[&key, &sealed],
            )
            .within(self, "put_flow")
            .await?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<PendingFlow>, StoreError> {
        let row = self
            .client()
            .await?
            .query_opt("SELECT sealed FROM mailgate_flows WHERE key = $1", &[&key])
            .within(self, "get_flow")
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        self.inner
            .sealer
            .open(&format!(".pending-{key}"), row.get(0))
            .map(Some)
            .map_err(|why| self.error("get_flow", format!("damaged ({why})")))
    }

    async fn remove(&self, key: &str) {
        if let Ok(client) = self.client().await {
            if let Err(e) = client
                .execute("DELETE FROM mailgate_flows WHERE key = $1", &[&key])
                .within(self, "remove_flow")
                .await
            {
                warn!(error = %e, "can't forget a pending flow");
            }
        }
    }

    async fn sweep(&self, age: Duration) {
        if let Ok(client) = self.client().await {
            if let Err(e) = client
                .execute(
                    "DELETE FROM mailgate_flows WHERE created_at < now() - make_interval(secs => $1)",
                    &[&age.as_secs_f64()],
                )
                .within(self, "sweep_flows")
                .await
            {
                warn!(error = %e, "can't sweep old pending flows");
            }
        }
    }
}
