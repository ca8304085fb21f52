//! Local authentication: a username and an argon2id password hash per
//! account.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

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
        // The dummy costs as much as the costliest real hash, so that no
        // account's verification takes longer than an unknown user's.
        let mut params = Params::default();
        for account in config.accounts.values() {
            if let Ok(p) =
                PasswordHash::new(account.password_hash.expose()).and_then(|h| Params::try_from(&h))
            {
                params = Params::new(
                    params.m_cost().max(p.m_cost()),
                    params.t_cost().max(p.t_cost()),
                    params.p_cost().max(p.p_cost()),
                    None,
                )?;
            }
        }
        let salt = SaltString::generate(&mut OsRng);
        let dummy_hash = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(b"no account has this password", &salt)?
            .to_string();
        Ok(Self {
            by_username,
            dummy_hash,
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
        let hash = account.map_or(self.dummy_hash.as_str(), |a| {
            a.password_hash.expose().as_str()
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dummy_hash_costs_as_much_as_the_costliest_account() {
        let cheap = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$8bX9UiX4w5Gml+HWvQ8yJw";
        let dear = "$argon2id$v=19$m=32768,t=3,p=2$c2FsdHNhbHQ$8bX9UiX4w5Gml+HWvQ8yJw";
        let toml = |h1: &str, h2: &str| {
            format!(
                "state_dir = \"/tmp\"\n[integrations.g]\nprovider = \"google\"\nclient_id = \"x\"\n\
                 [accounts.a]\npassword_hash = \"{h1}\"\nintegration = \"g\"\nmailbox = \"a@x\"\n\
                 [accounts.b]\npassword_hash = \"{h2}\"\nintegration = \"g\"\nmailbox = \"b@x\"\n"
            )
        };
        let config = Config::from_figment(figment::Figment::from(
            <figment::providers::Toml as figment::providers::Format>::string(&toml(cheap, dear)),
        ))
        .unwrap();
        let accounts = Accounts::new(&config).unwrap();
        let dummy = Params::try_from(&PasswordHash::new(&accounts.dummy_hash).unwrap()).unwrap();
        assert_eq!(
            (dummy.m_cost(), dummy.t_cost(), dummy.p_cost()),
            (32768, 3, 2)
        );
    }
}
