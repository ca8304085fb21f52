//! Local authentication: a username and an argon2id password hash per
//! account.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::Argon2;

use crate::config::{Account, Config};
use crate::proto::Credentials;
use crate::secret::Secret;

/// The local credentials were wrong (or named no account: the client can't
/// tell the two apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("bad local credentials")]
pub struct BadCredentials;

/// Verifies local logins.
pub struct Accounts {
    by_username: HashMap<String, Arc<Account>>,
    /// Verified against for unknown usernames, so that they take as long as
    /// a wrong password.
    dummy_hash: String,
}

impl Accounts {
    /// The accounts of `config`.
    ///
    /// # Errors
    /// Only if the system's random source fails.
    pub fn new(config: &Config) -> Result<Self, argon2::password_hash::Error> {
        let by_username = config
            .accounts
            .values()
            .map(|a| (a.username.clone(), a.clone()))
            .collect();
        let dummy_hash = hash_password(b"no account has this password")?;
        Ok(Self {
            by_username,
            dummy_hash: dummy_hash.expose().clone(),
        })
    }

    /// The account these credentials open. Always runs exactly one argon2
    /// verification, known user or not. CPU-heavy: call it off the async
    /// threads (`spawn_blocking`).
    ///
    /// # Errors
    /// [`BadCredentials`] for an unknown user or a wrong password alike.
    pub fn verify(&self, credentials: &Credentials) -> Result<Arc<Account>, BadCredentials> {
        let account = self.by_username.get(&credentials.username);
        let hash = account.map_or(self.dummy_hash.as_str(), |a| a.password_hash.as_str());
        let ok = PasswordHash::new(hash)
            .and_then(|h| Argon2::default().verify_password(credentials.password.expose(), &h))
            .is_ok();
        match account {
            Some(account) if ok => Ok(account.clone()),
            _ => Err(BadCredentials),
        }
    }
}

/// An argon2id PHC string for `password`, with a random salt and the
/// argon2 crate's default (OWASP-recommended) parameters.
///
/// # Errors
/// Only if the system's random source fails.
pub fn hash_password(password: &[u8]) -> Result<Secret<String>, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Secret::new(
        Argon2::default()
            .hash_password(password, &salt)?
            .to_string(),
    ))
}
