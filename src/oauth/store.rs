//! The token store: one encrypted file per account in `<state_dir>/tokens/`.
//!
//! - **Encryption:** ChaCha20-Poly1305 (ring's AEAD) under a 256-bit key
//!   from a key file that mailgate creates with mode 0600, or from the
//!   environment. The account name is the associated data, so a record
//!   can't be moved to another account.
//! - **Writing:** temp file, fsync, rename, fsync of the directory: a crash
//!   leaves the old record or the new one, never half of one.
//! - **Concurrency:** each account has a lock file. A process holds it
//!   exclusively for a whole refresh (read, token request, write), so two
//!   processes never refresh with the same rotating refresh token.
//! - **Damage:** a record that can't be decrypted or parsed is an error
//!   that names the file. It is never silently replaced.

use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// A store failure, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("token store {path}: {message}")]
pub struct StoreError {
    pub path: PathBuf,
    pub message: String,
}

fn error(path: &Path, message: impl ToString) -> StoreError {
    StoreError {
        path: path.to_owned(),
        message: message.to_string(),
    }
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

/// Where the store key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A file holding 64 hex digits; created with mode 0600 when missing.
    File(PathBuf),
    /// 64 hex digits, given directly (from an environment variable).
    Hex(Secret<String>),
}

/// The environment variable that may hold the store key.
pub const KEY_ENV: &str = "MAILGATE_TOKEN_KEY";

/// A file header: format and version.
const MAGIC: &[u8; 4] = b"MGT1";
/// How long a writer waits for another process's lock before giving up.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// Encrypted token records on disk.
pub struct TokenStore {
    dir: PathBuf,
    key: LessSafeKey,
    rng: SystemRandom,
    lock_timeout: Duration,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl TokenStore {
    /// Opens the store under `state_dir`, creating the key file if the key
    /// comes from a file that doesn't exist yet.
    ///
    /// # Errors
    /// When the key can't be read, created or parsed.
    pub fn open(state_dir: &Path, key: &KeySource) -> Result<Self, StoreError> {
        let dir = state_dir.join("tokens");
        let bytes = match key {
            KeySource::Hex(hex) => parse_key(hex.expose()).ok_or_else(|| {
                error(
                    Path::new(KEY_ENV),
                    "must be 64 hexadecimal digits (32 bytes)",
                )
            })?,
            KeySource::File(path) => load_or_create_key(path)?,
        };
        let key =
            UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| error(&dir, "bad key"))?;
        Ok(Self {
            dir,
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
        })
    }

    /// Changes how long writers wait for another process's lock.
    pub fn with_lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The record file of `account`.
    pub fn path(&self, account: &str) -> PathBuf {
        self.dir.join(format!("{account}.token"))
    }

    /// When the record of `account` last changed, if it exists.
    pub fn modified(&self, account: &str) -> Option<SystemTime> {
        std::fs::metadata(self.path(account))
            .and_then(|m| m.modified())
            .ok()
    }

    /// The stored record of `account`, if any.
    ///
    /// # Errors
    /// When the file exists but can't be read, decrypted or parsed.
    pub fn load(&self, account: &str) -> Result<Option<Record>, StoreError> {
        self.load_value(account)
    }

    /// Replaces the record of `account`, atomically. Call it while holding
    /// [`TokenStore::lock`] for the account.
    ///
    /// # Errors
    /// When the directory or file can't be written; the old file is kept.
    pub fn save(&self, account: &str, record: &Record) -> Result<(), StoreError> {
        self.save_value(account, record)
    }

    /// Any value stored under `name`, encrypted like the token records.
    ///
    /// # Errors
    /// When the file exists but can't be read, decrypted or parsed.
    pub fn load_value<T: serde::de::DeserializeOwned>(
        &self,
        account: &str,
    ) -> Result<Option<T>, StoreError> {
        let path = self.path(account);
        let mut bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(error(&path, e)),
        };
        let damaged = |why: &str| {
            error(
                &path,
                format!("damaged or encrypted under another key ({why}); it was left as it is"),
            )
        };
        if bytes.len() < MAGIC.len() + NONCE_LEN || !bytes.starts_with(MAGIC) {
            return Err(damaged("no mailgate header"));
        }
        let (nonce, sealed) = bytes[MAGIC.len()..].split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| damaged("nonce"))?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(account.as_bytes()), sealed)
            .map_err(|_| damaged("authentication failed"))?;
        let record = serde_json::from_slice(plain).map_err(|e| damaged(&format!("json: {e}")))?;
        Ok(Some(record))
    }

    /// Stores any value under `name`, atomically and encrypted.
    ///
    /// # Errors
    /// When the directory or file can't be written; the old file is kept.
    pub fn save_value<T: Serialize>(&self, account: &str, record: &T) -> Result<(), StoreError> {
        let path = self.path(account);
        self.create_dir()?;
        let mut sealed = serde_json::to_vec(record).map_err(|e| error(&path, e))?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| error(&path, "no randomness"))?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(account.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| error(&path, "encryption failed"))?;
        let tmp = self.dir.join(format!(".{account}.token.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(&nonce)?;
            f.write_all(&sealed)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            error(&path, e)
        })
    }

    /// Takes the account's cross-process lock, waiting up to the lock
    /// timeout. The lock is released when the guard is dropped.
    ///
    /// Blocking: call it from a blocking context.
    ///
    /// # Errors
    /// When the lock file can't be opened, or another process holds the
    /// lock for longer than the timeout.
    pub fn lock(&self, account: &str) -> Result<StoreLock, StoreError> {
        self.create_dir()?;
        let path = self.dir.join(format!("{account}.lock"));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| error(&path, e))?;
        let deadline = std::time::Instant::now() + self.lock_timeout;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(StoreLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(error(&path, "locked by another mailgate process"));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(error(&path, e)),
            }
        }
    }

    fn create_dir(&self) -> Result<(), StoreError> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| error(&self.dir, e))
    }
}

/// Holds an account's store lock until dropped.
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

fn parse_key(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

fn load_or_create_key(path: &Path) -> Result<[u8; 32], StoreError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_key(&text)
            .ok_or_else(|| error(path, "must hold 64 hexadecimal digits (32 bytes)")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| error(path, "no randomness"))?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| error(parent, e))?;
            }
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            // create_new: two processes starting at once can't both write a key.
            let created = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .and_then(|mut f| {
                    f.write_all(hex.as_bytes())?;
                    f.write_all(b"\n")?;
                    f.sync_all()
                });
            match created {
                Ok(()) => Ok(key),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => load_or_create_key(path),
                Err(e) => Err(error(path, e)),
            }
        }
        Err(e) => Err(error(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn record(rt: &str) -> Record {
        Record {
            refresh_token: Some(rt.into()),
            ..Record::default()
        }
    }

    #[test]
    fn records_round_trip_encrypted_under_a_0600_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("token.key");
        let store = TokenStore::open(dir.path(), &KeySource::File(key_file.clone())).unwrap();
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(store.load("jira").unwrap().is_none());
        store.save("jira", &record("rt-secret-1")).unwrap();
        store.save("jira", &record("rt-secret-2")).unwrap();
        let raw = std::fs::read(store.path("jira")).unwrap();
        assert!(
            !raw.windows(11).any(|w| w == b"rt-secret-2"),
            "stored in the clear"
        );
        assert_eq!(
            std::fs::metadata(store.path("jira"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        // A second open reads the same key.
        let again = TokenStore::open(dir.path(), &KeySource::File(key_file)).unwrap();
        assert_eq!(
            again
                .load("jira")
                .unwrap()
                .unwrap()
                .refresh_token
                .as_deref(),
            Some("rt-secret-2")
        );
        assert!(!format!("{:?}", again.load("jira").unwrap()).contains("rt-secret"));
    }

    #[test]
    fn damage_and_a_wrong_key_are_errors_that_name_the_file_and_keep_it() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            TokenStore::open(dir.path(), &KeySource::Hex(Secret::new("11".repeat(32)))).unwrap();
        store.save("jira", &record("rt")).unwrap();
        let other =
            TokenStore::open(dir.path(), &KeySource::Hex(Secret::new("22".repeat(32)))).unwrap();
        let err = other.load("jira").unwrap_err().to_string();
        assert!(
            err.contains("jira.token") && err.contains("another key"),
            "{err}"
        );
        // A record can't be replayed as another account's.
        std::fs::copy(store.path("jira"), store.path("other")).unwrap();
        assert!(store.load("other").is_err());
        std::fs::write(store.path("jira"), b"garbage").unwrap();
        assert!(store
            .load("jira")
            .unwrap_err()
            .to_string()
            .contains("jira.token"));
        assert_eq!(
            std::fs::read(store.path("jira")).unwrap(),
            b"garbage",
            "the damaged file was kept"
        );
        assert!(TokenStore::open(dir.path(), &KeySource::Hex(Secret::new("xyz".into()))).is_err());
    }

    #[test]
    fn a_second_writer_waits_for_the_lock_and_gives_up_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeySource::Hex(Secret::new("33".repeat(32)));
        let a = TokenStore::open(dir.path(), &key).unwrap();
        let b = TokenStore::open(dir.path(), &key)
            .unwrap()
            .with_lock_timeout(Duration::from_millis(100));
        let held = a.lock("jira").unwrap();
        let err = b.lock("jira").unwrap_err().to_string();
        assert!(err.contains("locked by another"), "{err}");
        drop(held);
        assert!(b.lock("jira").is_ok());
    }
}
