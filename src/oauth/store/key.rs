//! The store key: 32 bytes from a key file that mailgate creates (mode
//! 0600) on first start, or 64 hex digits from the environment. Every
//! backend seals records under it, so a copied store or database backup
//! is ciphertext.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom as _, SystemRandom};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::config::{KeySource, KEY_ENV};

/// The header of every sealed value: format and version.
pub(super) const MAGIC: &[u8; 4] = b"MGT1";

/// A value as sealed: the record's version beside its own fields (files
/// written before versions read as version 0). The version is inside the
/// ciphertext, so a backend can't be made to serve an old record as new.
#[derive(Serialize, Deserialize)]
pub(super) struct Sealed<T> {
    #[serde(default)]
    pub version: u64,
    #[serde(flatten)]
    pub value: T,
}

/// Seals and opens stored values: ChaCha20-Poly1305 under the store key,
/// with the value's name (the account) as associated data, so that a
/// sealed record can't be moved to another account. Both backends store
/// the same bytes: `MAGIC`, the nonce, the ciphertext and its tag.
pub(super) struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl Sealer {
    /// The sealer for `source`, creating the key file when it is missing.
    pub fn new(source: &KeySource) -> Result<Self, StoreError> {
        let bytes = match source {
            KeySource::Hex(hex) => parse_key(hex.expose()).ok_or_else(|| {
                error(
                    Path::new(KEY_ENV),
                    "must be 64 hexadecimal digits (32 bytes)",
                )
            })?,
            KeySource::File(path) => load_or_create_key(path)?,
        };
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes)
            .map_err(|_| error(Path::new("store key"), "bad key"))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        })
    }

    /// `value` as JSON, sealed under `name`.
    pub fn seal<T: Serialize>(&self, name: &str, value: &T) -> Result<Vec<u8>, &'static str> {
        let mut sealed = serde_json::to_vec(value).map_err(|_| "can't serialize")?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| "no randomness")?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| "encryption failed")?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The value sealed under `name` in `bytes`; the error says why not,
    /// without any of the content.
    pub fn open<T: serde::de::DeserializeOwned>(
        &self,
        name: &str,
        mut bytes: Vec<u8>,
    ) -> Result<T, String> {
        if bytes.len() < MAGIC.len() + NONCE_LEN || !bytes.starts_with(MAGIC) {
            return Err("no mailgate header".into());
        }
        let (nonce, sealed) = bytes[MAGIC.len()..].split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "nonce".to_owned())?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), sealed)
            .map_err(|_| "authentication failed".to_owned())?;
        serde_json::from_slice(plain).map_err(|e| format!("json: {e}"))
    }
}

fn error(path: &Path, message: impl ToString) -> StoreError {
    StoreError {
        place: path.display().to_string(),
        message: message.to_string(),
    }
}

pub(super) fn parse_key(hex: &str) -> Option<[u8; 32]> {
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

pub(super) fn load_or_create_key(path: &Path) -> Result<[u8; 32], StoreError> {
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
