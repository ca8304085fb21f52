//! The HTTP listener: the OAuth redirect URL, metrics, health and the
//! integrations page, and the admin credential that guards the page.

use std::net::SocketAddr;

use url::Url;

use super::integration::is_loopback_host;
use super::{invalid, raw, ConfigError};
use crate::secret::Secret;

/// The HTTP listener: the OAuth redirect URL, metrics and health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSettings {
    pub address: SocketAddr,
    pub tls: HttpTls,
    /// The base of the redirect URLs, as the admin's browser reaches us.
    pub public_url: Url,
    /// The credential that opens the integrations page to peers other than
    /// loopback; without one, only loopback peers get the page.
    pub admin: Option<AdminCredential>,
    /// Ask loopback peers for the credential too (behind a reverse proxy on
    /// the same host, every peer is loopback).
    pub admin_password_on_loopback: bool,
}

/// The integrations page's login, for HTTP Basic authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCredential {
    pub username: String,
    /// An argon2id PHC string (`mailgate hash-password`).
    pub password_hash: Secret<String>,
}

/// HTTPS, or HTTP on a loopback address only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpTls {
    Implicit,
    Plaintext,
}

/// Validates `[http]`.
pub(super) fn http_settings(h: raw::Http) -> Result<HttpSettings, ConfigError> {
    let address: SocketAddr = h.address.parse().map_err(|e| {
        invalid(
            "http.address",
            format!("{:?} is not an IP:port address: {e}", h.address),
        )
    })?;
    let tls = match h.tls {
        raw::HttpTls::Implicit => HttpTls::Implicit,
        raw::HttpTls::Plaintext if address.ip().is_loopback() => HttpTls::Plaintext,
        raw::HttpTls::Plaintext => {
            return Err(invalid(
                "http.tls",
                "plaintext is allowed only on a loopback address",
            ))
        }
    };
    let default = format!(
        "{}://{address}",
        if tls == HttpTls::Implicit {
            "https"
        } else {
            "http"
        }
    );
    let given = h.public_url.unwrap_or(default);
    let public_url = Url::parse(&given)
        .map_err(|e| invalid("http.public_url", format!("{given:?} is not a URL: {e}")))?;
    // Authorization codes travel over HTTPS only; plain http is for a
    // browser on the same machine.
    match public_url.scheme() {
        "https" => {}
        "http" if is_loopback_host(&public_url) => {}
        _ => {
            return Err(invalid(
                "http.public_url",
                "must be https (http only on a loopback address)",
            ))
        }
    }
    let admin = match h.admin_password_hash {
        Some(hash) => {
            argon2id_hash("http.admin_password_hash", &hash)?;
            let username = h.admin_username.unwrap_or_else(|| "admin".into());
            if username.is_empty() || username.contains(':') {
                return Err(invalid(
                    "http.admin_username",
                    "must be non-empty and without ':'",
                ));
            }
            Some(AdminCredential {
                username,
                password_hash: hash,
            })
        }
        None if h.admin_username.is_some() => {
            return Err(invalid(
                "http.admin_password_hash",
                "admin_username is set but admin_password_hash is not",
            ))
        }
        None => None,
    };
    // Plain HTTP on loopback with a public URL elsewhere means a reverse
    // proxy in front: every request then comes from loopback, so loopback
    // can't be trusted by default.
    let behind_proxy = tls == HttpTls::Plaintext && !is_loopback_host(&public_url);
    let admin_password_on_loopback = h.admin_password_on_loopback.unwrap_or(behind_proxy);
    if h.admin_password_on_loopback == Some(true) && admin.is_none() {
        return Err(invalid(
            "http.admin_password_hash",
            "admin_password_on_loopback needs an admin_password_hash",
        ));
    }
    Ok(HttpSettings {
        address,
        tls,
        public_url,
        admin,
        admin_password_on_loopback,
    })
}

/// Checks that `hash` is an argon2id PHC string.
pub(super) fn argon2id_hash(key: &str, hash: &Secret<String>) -> Result<(), ConfigError> {
    match argon2::PasswordHash::new(hash.expose()) {
        Ok(h) if h.algorithm.as_str() == "argon2id" => Ok(()),
        Ok(_) => Err(invalid(
            key,
            "must be an argon2id hash (see mailgate hash-password)",
        )),
        Err(e) => Err(invalid(key, format!("not a PHC hash string: {e}"))),
    }
}
