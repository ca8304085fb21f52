//! One token status per account, computed here and only rendered by
//! `mailgate status`, the integrations page, `/readyz` and the gauges.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::store::{Record, StoreError};
use crate::config::{Account, Grant};

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A Unix time as RFC 3339 UTC, to the second.
pub fn format_time(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// A Unix time relative to now: "in 59m 58s" or "3m 2s ago".
pub fn format_relative(unix: u64) -> String {
    let now = unix_now();
    if unix > now {
        format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(unix - now))
        )
    } else {
        format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(now - unix))
        )
    }
}

/// The command that fixes an account that needs authorization.
pub fn fix_command(account: &str) -> String {
    format!("mailgate authorize {account}")
}

/// Whether an account can get tokens, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorization {
    /// Tokens can be had: a refresh token is stored or configured, or the
    /// grant needs none.
    Authorized,
    /// The authorization-code flow never ran for this account.
    NotAuthorizedYet,
    /// The provider refused the grant; the reason, in its words.
    Revoked(String),
}

/// An account's token state, as every view shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStatus {
    pub account: String,
    pub authorization: Authorization,
    /// When the stored access token expires (Unix seconds), if one is
    /// stored.
    pub access_token_expires: Option<u64>,
    /// The last successful token request (Unix seconds).
    pub last_refresh: Option<u64>,
    /// Why the last token request failed, when it did and the account is
    /// still authorized.
    pub last_error: Option<String>,
    /// A refresh token is stored (kept even when the grant was refused).
    pub tokens_kept: bool,
    /// The record could not be read.
    pub store_error: Option<String>,
}

impl TokenStatus {
    /// The status of `account` from its stored record.
    pub fn of(account: &Account, record: Result<Option<&Record>, &StoreError>) -> Self {
        let record = match record {
            Ok(record) => record,
            Err(e) => {
                return Self {
                    account: account.name.clone(),
                    authorization: Authorization::Authorized,
                    access_token_expires: None,
                    last_refresh: None,
                    last_error: None,
                    tokens_kept: false,
                    store_error: Some(e.to_string()),
                }
            }
        };
        let refresh_token =
            record.is_some_and(|r| r.refresh_token.is_some()) || account.refresh_token.is_some();
        let authorization = match record.and_then(|r| r.needs_authorization.as_ref()) {
            _ if account.grant == Grant::AuthorizationCode && !refresh_token => {
                Authorization::NotAuthorizedYet
            }
            Some(why) => Authorization::Revoked(why.clone()),
            None => Authorization::Authorized,
        };
        let authorized = authorization == Authorization::Authorized;
        Self {
            account: account.name.clone(),
            access_token_expires: record
                .filter(|r| r.access_token.is_some())
                .map(|r| r.expires_at),
            last_refresh: record.map(|r| r.last_refresh).filter(|t| *t > 0),
            last_error: record
                .and_then(|r| r.last_error.clone())
                .filter(|_| authorized),
            tokens_kept: record.is_some_and(|r| r.refresh_token.is_some()),
            store_error: None,
            authorization,
        }
    }

    /// Why the account needs `mailgate authorize`, if it does.
    pub fn needs_authorization(&self) -> Option<String> {
        match &self.authorization {
            Authorization::Authorized => None,
            Authorization::NotAuthorizedYet => Some("not authorized yet".to_owned()),
            Authorization::Revoked(why) => Some(why.clone()),
        }
    }

    /// The command that fixes the account, when it needs one.
    pub fn fix(&self) -> Option<String> {
        self.needs_authorization()
            .map(|_| fix_command(&self.account))
    }

    /// Seconds until the access token expires (negative: expired; 0: none).
    pub fn expiry_seconds(&self, now: u64) -> i64 {
        self.access_token_expires.map_or(0, |expires| {
            i64::try_from(expires)
                .unwrap_or(i64::MAX)
                .saturating_sub(i64::try_from(now).unwrap_or(i64::MAX))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_authorized_and_revoked_are_told_apart() {
        let config = crate::config::Config::from_figment(figment::Figment::from(
            figment::providers::Serialized::defaults(serde_json::json!({
                "state_dir": "/tmp/mg-status-test",
                "integrations": {"g": {"provider": "google", "client_id": "id"}},
                "accounts": {"a": {
                    "integration": "g",
                    "mailbox": "a@example.com",
                    "password_hash": "$argon2id$v=19$m=64,t=1,p=1$bWFpbGdhdGUtdGVzdC1zYWx0$7o8Jk8yMcHBYwQwXyb1b3Q"
                }},
            })),
        ))
        .unwrap();
        let account = &config.accounts["a"];
        let never = TokenStatus::of(account, Ok(None));
        assert_eq!(never.authorization, Authorization::NotAuthorizedYet);
        assert_eq!(never.fix().as_deref(), Some("mailgate authorize a"));
        let revoked = Record {
            refresh_token: Some("rt".into()),
            needs_authorization: Some("invalid_grant".into()),
            last_error: Some("invalid_grant".into()),
            ..Record::default()
        };
        let status = TokenStatus::of(account, Ok(Some(&revoked)));
        assert_eq!(
            status.authorization,
            Authorization::Revoked("invalid_grant".into())
        );
        assert!(status.tokens_kept);
        assert_eq!(status.last_error, None, "the reason is shown once");
        let fine = Record {
            refresh_token: Some("rt".into()),
            access_token: Some("at".into()),
            expires_at: 100,
            last_refresh: 40,
            ..Record::default()
        };
        let status = TokenStatus::of(account, Ok(Some(&fine)));
        assert_eq!(status.authorization, Authorization::Authorized);
        assert_eq!(status.fix(), None);
        assert_eq!(status.expiry_seconds(60), 40);
        assert_eq!(status.last_refresh, Some(40));
    }
}
