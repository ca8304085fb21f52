//! The token store: one file per account in `<state_dir>/tokens/`, holding
//! the refresh token and the current access token with its lifetime, so a
//! restart needs no refresh. Written atomically (temp file, fsync, rename), mode
//! 0600, so a crash never loses a refresh token.
//!
//! TODO(#4): encryption under a key file, and a lock against a second
//! writer process.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A store failure, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("token store {path}: {message}")]
pub struct StoreError {
    pub path: PathBuf,
    pub message: String,
}

/// What is stored for one account.
#[derive(Clone, Default, Serialize, Deserialize)]
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
            .finish()
    }
}

/// Refresh tokens on disk.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    /// A store under `state_dir`.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("tokens"),
        }
    }

    fn path(&self, account: &str) -> PathBuf {
        self.dir.join(format!("{account}.json"))
    }

    /// The stored record of `account`, if any.
    ///
    /// # Errors
    /// When the file exists but can't be read or parsed. A damaged file is
    /// never treated as absent: that would lose the token silently.
    pub fn load(&self, account: &str) -> Result<Option<Record>, StoreError> {
        let path = self.path(account);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError {
                    path,
                    message: e.to_string(),
                })
            }
        };
        let record: Record = serde_json::from_slice(&bytes).map_err(|e| StoreError {
            path,
            message: format!("unreadable ({e})"),
        })?;
        Ok(Some(record))
    }

    /// Replaces the record of `account`, atomically.
    ///
    /// # Errors
    /// When the directory or file can't be written; the old file is kept.
    pub fn save(&self, account: &str, record: &Record) -> Result<(), StoreError> {
        let path = self.path(account);
        let fail = |message: String| StoreError {
            path: path.clone(),
            message,
        };
        std::fs::create_dir_all(&self.dir).map_err(|e| fail(e.to_string()))?;
        let tmp = self.dir.join(format!(".{account}.json.tmp"));
        let json = serde_json::to_vec(record).map_err(|e| fail(e.to_string()))?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(e.to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_tokens_load_back_and_damage_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        assert!(store.load("jira").unwrap().is_none());
        let record = |rt: &str| Record {
            refresh_token: Some(rt.into()),
            ..Record::default()
        };
        store.save("jira", &record("rt-1")).unwrap();
        store.save("jira", &record("rt-2")).unwrap();
        let loaded = store.load("jira").unwrap().unwrap();
        assert_eq!(loaded.refresh_token.as_deref(), Some("rt-2"));
        assert!(!format!("{loaded:?}").contains("rt-2"));
        let path = dir.path().join("tokens/jira.json");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&path, b"{garbage").unwrap();
        let err = store.load("jira").unwrap_err();
        assert!(err.to_string().contains("jira.json"), "{err}");
        assert!(!err.to_string().contains("rt-2"));
    }
}
