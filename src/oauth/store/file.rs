//! The embedded token store: one encrypted file per account in
//! `<state_dir>/tokens/`, and pending authorization flows beside them.
//!
//! - **Encryption:** ChaCha20-Poly1305 (ring's AEAD) under a 256-bit key
//!   from a key file that mailgate creates with mode 0600, or from the
//!   environment. The account name is the associated data, so a record
//!   can't be moved to another account.
//! - **Writing:** temp file, fsync, rename, fsync of the directory: a crash
//!   leaves the old record or the new one, never half of one.
//! - **Versions:** each record carries a counter, bumped at every save. A
//!   save compares it under a short store-wide write lock, so a writer that
//!   loaded an older version is refused. A file's modification time tells,
//!   with one `stat`, whether another process may have written it.
//! - **Leases:** the refresh lease is an exclusive lock on the account's
//!   lock file, held for a whole refresh (read, token request, write). The
//!   kernel drops it with its process, so it never outlives a dead holder.
//! - **Damage:** a record that can't be decrypted or parsed is an error
//!   that names the file. It is never silently replaced.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::key::{Sealed, Sealer};
use super::{
    Lease, PendingFlow, PendingFlows, Record, SaveError, StoreError, TokenStore, Version, Versioned,
};
use crate::config::KeySource;

/// A record file's inode and modification time.
type Stamp = (u64, Option<SystemTime>);

fn error(path: &Path, message: impl ToString) -> StoreError {
    StoreError {
        place: path.display().to_string(),
        message: message.to_string(),
    }
}

/// How long a writer waits for another process's lock before giving up.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

/// Encrypted token records and pending flows on disk. Cloning shares the
/// store.
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    sealer: Sealer,
    lock_timeout: Duration,
    /// Per account: the file's stamp and the version last read or written
    /// here, for [`TokenStore::changed`].
    seen: Mutex<HashMap<String, (Option<Stamp>, Version)>>,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

impl FileStore {
    /// Opens the store under `state_dir`, creating the key file if the key
    /// comes from a file that doesn't exist yet.
    ///
    /// # Errors
    /// When the key can't be read, created or parsed.
    pub fn open(state_dir: &Path, key: &KeySource) -> Result<Self, StoreError> {
        Ok(Self::from_inner(Inner {
            dir: state_dir.join("tokens"),
            sealer: Sealer::new(key)?,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            seen: Mutex::default(),
        }))
    }

    fn from_inner(inner: Inner) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Changes how long a lease waits for another process's lock.
    ///
    /// # Panics
    /// Never; call it before the store is shared (it is a builder step).
    pub fn with_lock_timeout(self, timeout: Duration) -> Self {
        match Arc::try_unwrap(self.inner) {
            Ok(mut inner) => {
                inner.lock_timeout = timeout;
                Self::from_inner(inner)
            }
            Err(shared) => Self { inner: shared },
        }
    }

    /// The record file of `account`.
    pub fn path(&self, account: &str) -> PathBuf {
        self.inner.dir.join(format!("{account}.token"))
    }

    /// The record file's identity: every save renames a new file into
    /// place, so its inode differs from the one it replaces (both exist at
    /// the rename), and a single `stat` tells whether it changed.
    fn stamp(&self, account: &str) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(self.path(account)).ok()?;
        Some((m.ino(), m.modified().ok()))
    }

    fn remember(&self, account: &str, stamp: Option<Stamp>, version: Version) {
        self.inner
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(account.to_owned(), (stamp, version));
    }

    /// The stored record of `account` and its version, if any (blocking:
    /// a small read).
    ///
    /// # Errors
    /// When the file exists but can't be read, decrypted or parsed.
    pub fn read(&self, account: &str) -> Result<Option<Versioned>, StoreError> {
        // The stamp first: a save that lands between it and the read makes
        // the next `changed` say yes (a spare reload), never no.
        let stamp = self.stamp(account);
        let sealed: Option<Sealed<Record>> = self.unseal(account)?;
        let versioned = sealed.map(|s| Versioned {
            record: s.value,
            version: Version(s.version),
        });
        let version = versioned.as_ref().map_or(Version(0), |v| v.version);
        self.remember(account, stamp, version);
        Ok(versioned)
    }

    /// The stored record of `account`, if any (for tests and tools).
    ///
    /// # Errors
    /// As [`FileStore::read`].
    pub fn load_record(&self, account: &str) -> Result<Option<Record>, StoreError> {
        Ok(self.read(account)?.map(|v| v.record))
    }

    /// Removes the record of `account`, if any.
    ///
    /// # Errors
    /// When it exists but can't be removed.
    pub fn remove_record(&self, account: &str) -> Result<(), StoreError> {
        let path = self.path(account);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(error(&path, e)),
        }
    }

    /// Saves `record`, whatever version is stored (for tests and tools).
    ///
    /// # Errors
    /// When it can't be written; the old file is kept.
    pub fn save_record(&self, account: &str, record: &Record) -> Result<(), StoreError> {
        match self.write(account, record, None) {
            Ok(_) => Ok(()),
            Err(SaveError::Store(e)) => Err(e),
            Err(SaveError::Conflict | SaveError::LeaseLost) => {
                Err(error(&self.path(account), "conflict"))
            }
        }
    }

    /// Saves `record` if the stored version is `expected` (any version
    /// with `None`), under the store's write lock; blocking (fsync).
    ///
    /// # Errors
    /// [`SaveError::Conflict`], or a store error; the old file is kept.
    pub fn write(
        &self,
        account: &str,
        record: &Record,
        expected: Option<Version>,
    ) -> Result<Version, SaveError> {
        self.create_dir()?;
        let _write = self.write_lock()?;
        let current = self
            .unseal::<Sealed<serde::de::IgnoredAny>>(account)?
            .map_or(Version(0), |s| Version(s.version));
        if expected.is_some_and(|e| e != current) {
            return Err(SaveError::Conflict);
        }
        let version = Version(current.0 + 1);
        self.seal(
            account,
            &Sealed {
                version: version.0,
                value: record,
            },
        )?;
        // Still under the write lock: the file is the one just renamed.
        self.remember(account, self.stamp(account), version);
        Ok(version)
    }

    /// The store-wide write lock: held only while a save compares the
    /// version and replaces the file.
    fn write_lock(&self) -> Result<File, StoreError> {
        self.lock_within(".write.lock")
    }

    /// Opens (creating) a lock file in the store's directory.
    fn lock_file(&self, name: &str) -> Result<(PathBuf, File), StoreError> {
        let path = self.inner.dir.join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(|e| error(&path, e))?;
        Ok((path, file))
    }

    /// Any value stored under `name`, decrypted.
    fn unseal<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let path = self.path(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(error(&path, e)),
        };
        self.inner
            .sealer
            .open(name, bytes)
            .map(Some)
            .map_err(|why| {
                error(
                    &path,
                    format!("damaged or encrypted under another key ({why}); it was left as it is"),
                )
            })
    }

    /// Stores any value under `name`, atomically and encrypted.
    fn seal<T: Serialize>(&self, name: &str, record: &T) -> Result<(), StoreError> {
        let path = self.path(name);
        self.create_dir()?;
        let sealed = self
            .inner
            .sealer
            .seal(name, record)
            .map_err(|why| error(&path, why))?;
        let tmp = self.inner.dir.join(format!(".{name}.token.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&sealed)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            File::open(&self.inner.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            error(&path, e)
        })
    }

    /// Takes the account's cross-process lock, waiting up to the lock
    /// timeout. The lock is released when the file is dropped.
    ///
    /// Blocking: call it from a blocking context.
    ///
    /// # Errors
    /// When the lock file can't be opened, or another process holds the
    /// lock for longer than the timeout.
    pub fn lock(&self, account: &str) -> Result<File, StoreError> {
        self.create_dir()?;
        self.lock_within(&format!("{account}.lock"))
    }

    /// An exclusive lock on the lock file `name`, waiting up to the lock
    /// timeout for another holder.
    fn lock_within(&self, name: &str) -> Result<File, StoreError> {
        let (path, file) = self.lock_file(name)?;
        let deadline = std::time::Instant::now() + self.inner.lock_timeout;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
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
            .create(&self.inner.dir)
            .map_err(|e| error(&self.inner.dir, e))
    }

    /// Runs blocking store work off the async threads.
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&FileStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError {
                place: store_place(what),
                message: e.to_string(),
            })?
    }
}

fn store_place(what: &str) -> String {
    format!("({what} task)")
}

#[async_trait::async_trait]
impl TokenStore for FileStore {
    async fn load(&self, account: &str) -> Result<Option<Versioned>, StoreError> {
        // A record is a few hundred bytes: read it in place.
        self.read(account)
    }

    async fn save(
        &self,
        account: &str,
        record: &Record,
        expected: Version,
        // The lease is a lock that can't expire while its holder lives.
        _fence: Option<&Lease>,
    ) -> Result<Version, SaveError> {
        let (account, record) = (account.to_owned(), record.clone());
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.write(&account, &record, Some(expected)))
            .await
            .map_err(|e| {
                SaveError::Store(StoreError {
                    place: store_place("write"),
                    message: e.to_string(),
                })
            })?
    }

    async fn lease(&self, account: &str, owner: &str, _ttl: Duration) -> Result<Lease, StoreError> {
        let name = account.to_owned();
        let file = self.blocking("lock", move |s| s.lock(&name)).await?;
        Ok(Lease::held(account, owner, 0, Box::new(file)))
    }

    async fn release(&self, lease: Lease) {
        drop(lease);
    }

    fn changed(&self, account: &str, seen: Version) -> bool {
        let remembered = self
            .inner
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(account)
            .copied();
        remembered != Some((self.stamp(account), seen))
    }

    async fn check(&self) -> Result<String, StoreError> {
        Ok(format!("files in {}", self.inner.dir.display()))
    }
}

/// Flows are files named `.pending-<key>` beside the token records: the
/// dot keeps them apart from every account (whose names can't start with
/// one).
#[async_trait::async_trait]
impl PendingFlows for FileStore {
    async fn put(&self, key: &str, flow: &PendingFlow) -> Result<(), StoreError> {
        let (name, flow) = (format!(".pending-{key}"), flow.clone());
        self.blocking("write", move |s| s.seal(&name, &flow)).await
    }

    async fn get(&self, key: &str) -> Result<Option<PendingFlow>, StoreError> {
        self.unseal(&format!(".pending-{key}"))
    }

    async fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.path(&format!(".pending-{key}")));
    }

    async fn sweep(&self, age: Duration) {
        let Ok(entries) = std::fs::read_dir(&self.inner.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let stale = entry.file_name().to_string_lossy().starts_with(".pending-")
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|elapsed| elapsed > age));
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
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
        let store = FileStore::open(dir.path(), &KeySource::File(key_file.clone())).unwrap();
        assert_eq!(
            std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(store.load_record("jira").unwrap().is_none());
        store.save_record("jira", &record("rt-secret-1")).unwrap();
        store.save_record("jira", &record("rt-secret-2")).unwrap();
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
        let again = FileStore::open(dir.path(), &KeySource::File(key_file)).unwrap();
        assert_eq!(
            again
                .load_record("jira")
                .unwrap()
                .unwrap()
                .refresh_token
                .as_deref(),
            Some("rt-secret-2")
        );
        assert!(!format!("{:?}", again.load_record("jira").unwrap()).contains("rt-secret"));
    }

    #[test]
    fn damage_and_a_wrong_key_are_errors_that_name_the_file_and_keep_it() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            FileStore::open(dir.path(), &KeySource::Hex(Secret::new("11".repeat(32)))).unwrap();
        store.save_record("jira", &record("rt")).unwrap();
        let other =
            FileStore::open(dir.path(), &KeySource::Hex(Secret::new("22".repeat(32)))).unwrap();
        let err = other.load_record("jira").unwrap_err().to_string();
        assert!(
            err.contains("jira.token") && err.contains("another key"),
            "{err}"
        );
        // A record can't be replayed as another account's.
        std::fs::copy(store.path("jira"), store.path("other")).unwrap();
        assert!(store.load_record("other").is_err());
        std::fs::write(store.path("jira"), b"garbage").unwrap();
        assert!(store
            .load_record("jira")
            .unwrap_err()
            .to_string()
            .contains("jira.token"));
        assert_eq!(
            std::fs::read(store.path("jira")).unwrap(),
            b"garbage",
            "the damaged file was kept"
        );
        assert!(FileStore::open(dir.path(), &KeySource::Hex(Secret::new("xyz".into()))).is_err());
    }

    /// Two stores on one directory stand for two processes.
    #[test]
    fn a_save_against_an_older_version_is_refused_and_changes_are_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeySource::Hex(Secret::new("44".repeat(32)));
        let a = FileStore::open(dir.path(), &key).unwrap();
        let b = FileStore::open(dir.path(), &key).unwrap();
        assert!(b.read("jira").unwrap().is_none());
        assert!(!b.changed("jira", Version(0)), "nothing was written yet");
        let v1 = a.write("jira", &record("one"), Some(Version(0))).unwrap();
        assert_eq!(v1, Version(1));
        assert!(b.changed("jira", Version(0)));
        assert_eq!(b.read("jira").unwrap().unwrap().version, v1);
        assert!(!b.changed("jira", v1));
        // Two saves within one clock tick are still told apart.
        let v2 = a.write("jira", &record("two"), Some(v1)).unwrap();
        assert!(b.changed("jira", v1));
        assert!(matches!(
            b.write("jira", &record("stale"), Some(v1)),
            Err(SaveError::Conflict)
        ));
        let now = b.read("jira").unwrap().unwrap();
        assert_eq!(now.version, v2);
        assert_eq!(now.record.refresh_token.as_deref(), Some("two"));
        assert_eq!(
            b.write("jira", &record("three"), Some(v2)).unwrap(),
            Version(3)
        );
    }

    /// Records written before versions existed read as version 0.
    #[test]
    fn records_without_a_version_read_as_version_zero() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            FileStore::open(dir.path(), &KeySource::Hex(Secret::new("55".repeat(32)))).unwrap();
        store.seal("old", &record("rt")).unwrap();
        let old = store.read("old").unwrap().unwrap();
        assert_eq!(old.version, Version(0));
        assert_eq!(old.record.refresh_token.as_deref(), Some("rt"));
    }

    #[test]
    fn a_second_writer_waits_for_the_lock_and_gives_up_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeySource::Hex(Secret::new("33".repeat(32)));
        let a = FileStore::open(dir.path(), &key).unwrap();
        let b = FileStore::open(dir.path(), &key)
            .unwrap()
            .with_lock_timeout(Duration::from_millis(100));
        let held = a.lock("jira").unwrap();
        let err = b.lock("jira").unwrap_err().to_string();
        assert!(err.contains("locked by another"), "{err}");
        drop(held);
        assert!(b.lock("jira").is_ok());
    }
}
