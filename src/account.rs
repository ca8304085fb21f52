//! Local authentication: a username and an argon2id password hash per
//! account.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use ring::hmac;

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
    /// Successful verifications, so that a poller logging in every minute
    /// pays for argon2 once per config rather than once per login. Memory
    /// only; one entry per account at most; the key is random per
    /// `Accounts`, and a reload builds a new `Accounts`, so everything
    /// remembered is forgotten when the config changes.
    remembered: Remembered,
}

/// Credentials that verified against an argon2 hash, remembered as
/// HMAC-SHA256 tags under a random per-instance key, one per username.
/// Memory only: a new instance (a reload) forgets everything.
pub(crate) struct Remembered {
    key: hmac::Key,
    tags: Mutex<HashMap<String, hmac::Tag>>,
}

impl Remembered {
    pub(crate) fn new() -> Result<Self, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        Ok(Self {
            key: hmac::Key::generate(hmac::HMAC_SHA256, &rng)?,
            tags: Mutex::new(HashMap::new()),
        })
    }

    /// What a tag covers: the username, the password and the hash they
    /// verified against, each length-prefixed so no two inputs collide.
    fn message(username: &str, password: &[u8], hash: &str) -> Vec<u8> {
        let parts: [&[u8]; 3] = [username.as_bytes(), password, hash.as_bytes()];
        let mut message = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
        for part in parts {
            message.extend_from_slice(&(part.len() as u64).to_be_bytes());
            message.extend_from_slice(part);
        }
        message
    }

    /// Whether these credentials verified against `hash` before.
    pub(crate) fn contains(&self, username: &str, password: &[u8], hash: &str) -> bool {
        let tags = self.tags.lock().unwrap_or_else(PoisonError::into_inner);
        tags.get(username).is_some_and(|tag| {
            // Constant-time comparison with the stored tag.
            let message = Self::message(username, password, hash);
            hmac::verify(&self.key, &message, tag.as_ref()).is_ok()
        })
    }

    /// Remembers credentials that just verified against `hash`.
    pub(crate) fn insert(&self, username: &str, password: &[u8], hash: &str) {
        let tag = hmac::sign(&self.key, &Self::message(username, password, hash));
        self.tags
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(username.to_owned(), tag);
    }
}

/// Whether `password` matches the PHC string `hash`. CPU-heavy.
pub(crate) fn verify_hash(hash: &str, password: &[u8]) -> bool {
    PasswordHash::new(hash)
        .and_then(|h| Argon2::default().verify_password(password, &h))
        .is_ok()
}

impl Accounts {
    /// The accounts of `config`.
    ///
    /// # Errors
    /// Only if the system's random source fails.
    pub fn new(config: &Config) -> Result<Self, argon2::password_hash::Error> {
        let remembered = Remembered::new().map_err(|_| argon2::password_hash::Error::Crypto)?;
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
            remembered,
        })
    }

    /// The account these credentials open, if they verified before under
    /// this config. Cheap (one HMAC): callable on the async threads. `None`
    /// means "not known to be good", not "bad": call [`Self::verify`].
    pub fn remembered(&self, credentials: &Credentials) -> Option<Arc<Account>> {
        let account = self.by_username.get(&credentials.username)?;
        self.remembered
            .contains(
                &credentials.username,
                credentials.password.expose(),
                account.password_hash.expose(),
            )
            .then(|| account.clone())
    }

    /// The account these credentials open. Always runs exactly one argon2
    /// verification, known user or not. CPU-heavy: call it off the async
    /// threads (`spawn_blocking`). Remembers success for [`Self::remembered`].
    ///
    /// # Errors
    /// [`BadCredentials`] for an unknown user or a wrong password alike.
    pub fn verify(&self, credentials: &Credentials) -> Result<Arc<Account>, BadCredentials> {
        let account = self.by_username.get(&credentials.username);
        let hash = account.map_or(self.dummy_hash.as_str(), |a| {
            a.password_hash.expose().as_str()
        });
        let ok = verify_hash(hash, credentials.password.expose());
        match account {
            Some(account) if ok => {
                self.remembered.insert(
                    &credentials.username,
                    credentials.password.expose(),
                    account.password_hash.expose(),
                );
                Ok(account.clone())
            }
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

    fn config_with(hash: &str) -> Config {
        let toml = format!(
            "state_dir = \"/tmp\"\n[integrations.g]\nprovider = \"google\"\nclient_id = \"x\"\n\
             [accounts.a]\nusername = \"jira\"\npassword_hash = \"{hash}\"\nintegration = \"g\"\nmailbox = \"a@x\"\n"
        );
        Config::from_figment(figment::Figment::from(
            <figment::providers::Toml as figment::providers::Format>::string(&toml),
        ))
        .unwrap()
    }

    fn credentials(username: &str, password: &str) -> Credentials {
        Credentials {
            username: username.into(),
            password: Secret::new(password.as_bytes().to_vec()),
            hello: None,
        }
    }

    #[test]
    fn only_successful_verifications_are_remembered_and_a_new_config_forgets_them() {
        let hash = cheap_hash("right");
        let accounts = Accounts::new(&config_with(hash.expose())).unwrap();
        let right = credentials("jira", "right");
        let wrong = credentials("jira", "wrong");
        assert!(
            accounts.remembered(&right).is_none(),
            "nothing verified yet"
        );

        assert!(accounts.verify(&wrong).is_err());
        assert!(
            accounts.remembered(&wrong).is_none(),
            "failures are not remembered"
        );
        assert!(accounts.remembered(&right).is_none());

        assert_eq!(accounts.verify(&right).unwrap().name, "a");
        assert_eq!(
            accounts
                .remembered(&right)
                .map(|a| a.name.clone())
                .as_deref(),
            Some("a")
        );
        // A remembered user with another password still needs argon2.
        assert!(accounts.remembered(&wrong).is_none());
        assert!(accounts
            .remembered(&credentials("other", "right"))
            .is_none());

        // A reload builds new Accounts: a new key, nothing remembered.
        let reloaded = Accounts::new(&config_with(hash.expose())).unwrap();
        assert!(reloaded.remembered(&right).is_none());
        // A changed hash for the same password isn't matched by an old tag.
        let rehashed = cheap_hash("right");
        let changed = Accounts::new(&config_with(rehashed.expose())).unwrap();
        assert!(changed.remembered(&right).is_none());
    }

    fn cheap_hash(password: &str) -> Secret<String> {
        let salt = SaltString::generate(&mut OsRng);
        let params = Params::new(8, 1, 1, None).unwrap();
        Secret::new(
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password(password.as_bytes(), &salt)
                .unwrap()
                .to_string(),
        )
    }
}
