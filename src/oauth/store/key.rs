//! The store key: 32 bytes from a key file that mailgate creates (mode
//! 0600) on first start, or 64 hex digits from the environment. Every
//! backend seals records under it, so a copied store or database backup
//! is ciphertext.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use ring::rand::{SecureRandom as _, SystemRandom};

use super::StoreError;

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
