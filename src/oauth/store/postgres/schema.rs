//! Reaching the PostgreSQL store, and preparing it: the connection
//! settings (TLS always on and verified), the schema and its migrations
//! under an advisory lock, and the key check that keeps every instance on
//! one store key. `PgStore::open` calls [`Connector::prepare`] once;
//! `check-config` only reads the schema version.

use std::sync::Arc;

use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;
use tracing::{info, warn};

use super::super::key::Sealer;
use super::super::StoreError;
use crate::config::{KeySource, PasswordSource, PostgresSettings};
use crate::metrics::Metrics;

/// The schema, one step per version; step N takes version N-1 to N.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE mailgate_tokens (
        account text PRIMARY KEY,
        version bigint NOT NULL,
        sealed bytea NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE mailgate_leases (
        account text PRIMARY KEY,
        owner text NOT NULL,
        epoch bigint NOT NULL,
        expires_at timestamptz NOT NULL,
        released boolean NOT NULL DEFAULT false
    );
    CREATE TABLE mailgate_flows (
        key text PRIMARY KEY,
        sealed bytea NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
    );
",
    "
    ALTER TABLE mailgate_schema ADD COLUMN key_check bytea;
",
];

/// What the key check seals: every instance must open it with its key.
const KEY_CHECK: &str = "mailgate-key-check";

/// The schema version this mailgate writes.
pub const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

/// Any 64-bit number, the same in every instance: the advisory lock that
/// serializes migrations.
const MIGRATION_LOCK: i64 = 0x6d61_696c_6761_7465; // "mailgate"

/// How to reach the database: settings, TLS, and the place errors name.
pub struct Connector {
    pub(super) settings: PostgresSettings,
    pg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// "postgres HOST:PORT/DB", for errors and logs.
    pub(super) place: String,
    pub(super) metrics: Option<Arc<Metrics>>,
}

impl Connector {
    /// Checks the settings and loads the CA file; touches no database.
    ///
    /// # Errors
    /// When the URL doesn't parse or the CA file can't be had.
    pub fn new(
        settings: &PostgresSettings,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, StoreError> {
        let mut pg: tokio_postgres::Config = settings.url.parse().map_err(|e| StoreError {
            place: "store.url".into(),
            message: format!("{e}"),
        })?;
        pg.ssl_mode(tokio_postgres::config::SslMode::Require)
            .connect_timeout(settings.connect_timeout)
            .application_name("mailgate");
        let place = format!(
            "postgres {}/{}",
            pg.get_hosts()
                .iter()
                .zip(pg.get_ports().iter().chain(std::iter::repeat(&5432)))
                .map(|(h, p)| match h {
                    tokio_postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
                    tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            pg.get_dbname().unwrap_or_default()
        );
        // The CA file's certificates, beside the bundled web roots.
        let tls = crate::tls::client(settings.ca_file.as_deref()).map_err(|e| StoreError {
            place: "store.ca_file".into(),
            message: e.to_string(),
        })?;
        Ok(Self {
            settings: settings.clone(),
            pg,
            tls: MakeRustlsConnect::new((*tls).clone()),
            place,
            metrics,
        })
    }

    pub(super) fn error(
        &self,
        operation: &'static str,
        message: impl std::fmt::Display,
    ) -> StoreError {
        if let Some(m) = &self.metrics {
            m.store_errors
                .with_label_values(&["postgres", operation])
                .inc();
        }
        StoreError {
            place: self.place.clone(),
            message: format!("{operation}: {message}"),
        }
    }

    async fn config_with_password(&self) -> Result<tokio_postgres::Config, StoreError> {
        let mut pg = self.pg.clone();
        match &self.settings.password {
            Some(PasswordSource::File(path)) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| StoreError {
                        place: path.display().to_string(),
                        message: e.to_string(),
                    })?;
                pg.password(text.trim_end_matches(['\r', '\n']));
            }
            Some(PasswordSource::Env(secret)) => {
                pg.password(secret.expose().as_str());
            }
            None => {}
        }
        Ok(pg)
    }

    /// A new connection of its own, its driver spawned.
    ///
    /// # Errors
    /// When the database can't be reached, or refuses the login.
    pub async fn connect(&self) -> Result<Client, StoreError> {
        let pg = self.config_with_password().await?;
        let timeout = self.settings.connect_timeout;
        let connected = tokio::time::timeout(timeout, pg.connect(self.tls.clone()))
            .await
            .map_err(|_| self.error("connect", format!("timed out after {timeout:?}")))?;
        let (client, connection) = connected.map_err(|e| self.error("connect", detail(&e)))?;
        let place = self.place.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                warn!(store = %place, error = %e, "token store connection closed");
            }
        });
        Ok(client)
    }

    /// The schema version in the database (0: no tables yet), read
    /// without creating anything (`check-config`).
    ///
    /// # Errors
    /// When the database can't be reached or read.
    pub async fn schema_version(&self) -> Result<i32, StoreError> {
        let client = self.connect().await?;
        schema_version(&client)
            .await
            .map_err(|e| self.error("check", detail(&e)))
    }

    /// Connects, creates or migrates the tables, and checks the store key;
    /// returns the connection (the store's first) and the sealer.
    ///
    /// A store key file that doesn't exist is created only while the
    /// database holds no records: every instance must seal with the same
    /// key, and an instance that made its own would split the cluster.
    pub(super) async fn prepare(&self, key: &KeySource) -> Result<(Client, Sealer), StoreError> {
        let mut client = self.connect().await?;
        self.migrate(&mut client).await?;
        if let KeySource::File(path) = key {
            if !path.exists() {
                let held: bool = client
                    .query_one("SELECT EXISTS (SELECT 1 FROM mailgate_tokens)", &[])
                    .await
                    .map_err(|e| self.error("open", detail(&e)))?
                    .get(0);
                if held {
                    return Err(StoreError {
                        place: path.display().to_string(),
                        message: "missing, and the database holds records sealed under a key: copy the key file from another instance (every instance uses the same key)".into(),
                    });
                }
            }
        }
        let sealer = Sealer::new(key)?;
        self.key_check(&client, &sealer).await?;
        Ok((client, sealer))
    }

    fn newer(&self, found: i32) -> StoreError {
        self.error(
            "migrate",
            format!(
                "the database's schema is version {found}, newer than this mailgate's ({SCHEMA_VERSION}): upgrade mailgate"
            ),
        )
    }

    /// Creates or migrates the tables, once across every instance. A
    /// database at this version is only read, so that a role without the
    /// right to create tables can run an installed schema.
    async fn migrate(&self, client: &mut Client) -> Result<(), StoreError> {
        let fail = |e: tokio_postgres::Error| self.error("migrate", detail(&e));
        let found = schema_version(client).await.map_err(fail)?;
        if found == SCHEMA_VERSION {
            return Ok(());
        }
        // Before anything that needs the right to create tables: a role
        // without it should hear "upgrade", not "permission denied".
        if found > SCHEMA_VERSION {
            return Err(self.newer(found));
        }
        let tx = client.transaction().await.map_err(fail)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
            .await
            .map_err(fail)?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS mailgate_schema (version integer NOT NULL);
             INSERT INTO mailgate_schema (version)
                 SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM mailgate_schema);",
        )
        .await
        .map_err(fail)?;
        let current: i32 = tx
            .query_one("SELECT version FROM mailgate_schema", &[])
            .await
            .map_err(fail)?
            .get(0);
        // Another instance may have migrated while we waited for the lock.
        if current > SCHEMA_VERSION {
            return Err(self.newer(current));
        }
        let from = usize::try_from(current).unwrap_or(0);
        for step in MIGRATIONS.iter().skip(from) {
            tx.batch_execute(step).await.map_err(fail)?;
        }
        tx.execute(
            "UPDATE mailgate_schema SET version = $1",
            &[&SCHEMA_VERSION],
        )
        .await
        .map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        if from < MIGRATIONS.len() {
            info!(store = %self.place, from = current, to = SCHEMA_VERSION, "token store schema migrated");
        }
        Ok(())
    }

    /// Every instance must seal with the same key: the first one to open the
    /// database seals a known value into `mailgate_schema.key_check`, and each
    /// one after it must open that value with its own key. (Two instances that
    /// started together with keys of their own can't both win: the update only
    /// fills an empty check.)
    async fn key_check(&self, client: &Client, sealer: &Sealer) -> Result<(), StoreError> {
        let fail = |e: tokio_postgres::Error| self.error("key_check", detail(&e));
        let sealed = sealer
            .seal(KEY_CHECK, &KEY_CHECK)
            .map_err(|why| self.error("key_check", why))?;
        client
            .execute(
                "UPDATE mailgate_schema SET key_check = $1 WHERE key_check IS NULL",
                &[&sealed],
            )
            .await
            .map_err(fail)?;
        let stored: Option<Vec<u8>> = client
            .query_one("SELECT key_check FROM mailgate_schema", &[])
            .await
            .map_err(fail)?
            .get(0);
        let opened = stored.and_then(|s| sealer.open::<String>(KEY_CHECK, s).ok());
        if opened.as_deref() != Some(KEY_CHECK) {
            return Err(self.error(
                "key_check",
                "this instance's store key is not the key the database's records are sealed with: every instance must use the same key (copy key_file, or MAILGATE_TOKEN_KEY, from another instance)",
            ));
        }
        Ok(())
    }
}

/// What went wrong, in words: the server's message for a database error
/// (tokio-postgres's own text is only "db error"), else the error and its
/// cause.
pub(super) fn detail(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// `mailgate_schema`'s version, 0 when there is no such table.
pub(super) async fn schema_version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('mailgate_schema') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(0);
    }
    Ok(client
        .query_one("SELECT version FROM mailgate_schema", &[])
        .await?
        .get(0))
}
