//! The local spool of new tokens, with a shared store: they are written
//! here (sealed, fsynced, in `STATE_DIR/spool/`) before the save to the
//! database, and removed once it has them. What a crash or a failed save
//! leaves is saved at the next load of the account, unless the database
//! meanwhile holds a record refreshed later. A refused save (a lost lease)
//! is not spooled back.

use tracing::{info, warn};

use super::{
    AccountState, FileStore, Record, SaveError, StoreError, TokenStore as _, Tokens, Version,
};
use crate::config::{Config, StoreBackend};

/// The spool of a config's store: none for the file store, whose saves
/// are local and atomic already.
pub(super) fn open(config: &Config) -> Result<Option<FileStore>, StoreError> {
    match config.store {
        StoreBackend::File => Ok(None),
        StoreBackend::Postgres(_) => Ok(Some(FileStore::open(
            &config.state_dir.join("spool"),
            &config.store_key,
        )?)),
    }
}

impl Tokens {
    /// Saves what the spool holds for `name` if the store's record is
    /// older (a crash or a failed save lost it there), then empties the
    /// spool. A store that can't be reached leaves the spool for later.
    pub(super) async fn replay_spool(
        &self,
        name: &str,
        state: &mut AccountState,
    ) -> Result<(), StoreError> {
        let Some(spool) = &self.spool else {
            state.spool_clear = true;
            return Ok(());
        };
        let spooled = match spool.load(name).await {
            Ok(Some(spooled)) => spooled,
            Ok(None) => {
                state.spool_clear = true;
                return Ok(());
            }
            Err(e) => {
                // Damaged, or sealed under another key: it can't help, and
                // must not block the account.
                warn!(account = %name, error = %e, "the local token spool is unreadable; it is removed");
                let _ = spool.remove_record(name);
                state.spool_clear = true;
                return Ok(());
            }
        };
        let current = self.store.load(name).await?;
        let (base, older) = match &current {
            None => (Version(0), true),
            Some(v) => (
                v.version,
                v.record.last_refresh < spooled.record.last_refresh,
            ),
        };
        if older {
            match self.store.save(name, &spooled.record, base, None).await {
                Ok(_) => {
                    info!(account = %name, "saved tokens that a crash or a store outage had left in the local spool");
                }
                // Saved meanwhile by another writer: its record stands.
                Err(SaveError::Conflict | SaveError::LeaseLost) => {}
                Err(SaveError::Store(e)) => return Err(e),
            }
        }
        spool.remove_record(name)?;
        state.spool_clear = true;
        Ok(())
    }

    /// Writes `record` to the spool (best effort: a failure is logged, and
    /// the save to the store goes ahead).
    pub(super) async fn spool_write(&self, name: &str, record: &Record) {
        let Some(spool) = &self.spool else {
            return;
        };
        let (spool, name, record) = (spool.clone(), name.to_owned(), record.clone());
        let written = tokio::task::spawn_blocking(move || {
            spool.save_record(&name, &record).map_err(|e| (name, e))
        })
        .await;
        if let Ok(Err((name, e))) = written {
            warn!(account = %name, error = %e, "can't write the local token spool");
        }
    }

    pub(super) fn empty_spool(&self, name: &str) {
        if let Some(spool) = &self.spool {
            if let Err(e) = spool.remove_record(name) {
                warn!(account = %name, error = %e, "can't empty the local token spool");
            }
        }
    }
}
