//! Integrations: OAuth 2.0 client registrations at a provider, with the
//! provider's defaults filled in from the catalogue.

use std::path::Path;

use url::Url;

use super::catalogue::provider_defaults;
use super::{invalid, raw, Cloud, ConfigError, OAuthSettings, Provider};
use crate::proto::sasl::OAuthMechanism;
use crate::proto::KnownProvider;
use crate::secret::Secret;

/// An OAuth 2.0 client registration at a provider.
#[derive(Debug, PartialEq, Eq)]
pub struct Integration {
    pub name: String,
    pub provider: Provider,
    pub description: Option<String>,
    pub client_id: String,
    /// Write-only: never printed, never logged.
    pub client_secret: Option<Secret<String>>,
    /// Unix seconds when the client secret expires, if the admin said.
    pub client_secret_expires: Option<u64>,
    /// A certificate for `private_key_jwt` client authentication.
    pub client_certificate: Option<ClientCertificate>,
    /// A Google service account key, for the JWT bearer grant.
    pub service_account: Option<ServiceAccount>,
    pub scopes: Vec<String>,
    pub authorization_endpoint: Url,
    pub token_endpoint: Url,
    pub device_authorization_endpoint: Option<Url>,
    /// The path of the redirect URL under `http.public_url`.
    pub redirect_path: String,
    /// Which provider's mail hosts the accounts default to; `None` for a
    /// custom provider.
    pub mail_provider: Option<KnownProvider>,
    /// The SASL mechanism of our login upstream (`mechanism`): XOAUTH2,
    /// what Google and Microsoft take, unless the config says OAUTHBEARER.
    pub mechanism: OAuthMechanism,
}

/// A client certificate and key for `private_key_jwt` (RFC 7523 §2.2).
#[derive(Debug, PartialEq, Eq)]
pub struct ClientCertificate {
    /// SHA-256 of the certificate's DER, the JWT header's `x5t#S256`.
    pub thumbprint_sha256: Vec<u8>,
    pub private_key_pem: Secret<String>,
}

/// The parts of a Google service account key that mailgate uses.
#[derive(Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub client_email: String,
    pub private_key_id: Option<String>,
    pub private_key_pem: Secret<String>,
}

/// Validates `[integrations.NAME]`, filling in the provider's defaults.
pub(super) fn integration(
    key: &str,
    name: String,
    i: raw::Integration,
    oauth: &OAuthSettings,
) -> Result<Integration, ConfigError> {
    if i.client_id.is_empty() {
        return Err(invalid(format!("{key}.client_id"), "must not be empty"));
    }
    if i.provider != Provider::Microsoft {
        for (field, given) in [("tenant", i.tenant.is_some()), ("cloud", i.cloud.is_some())] {
            if given {
                return Err(invalid(
                    format!("{key}.{field}"),
                    "applies only to provider \"microsoft\"",
                ));
            }
        }
    }
    let tenant = i.tenant.as_deref().unwrap_or("common");
    if tenant.is_empty()
        || !tenant
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
    {
        return Err(invalid(
            format!("{key}.tenant"),
            "must be common, organizations, consumers, a tenant id or a domain",
        ));
    }
    let defaults = provider_defaults(i.provider, tenant, i.cloud.unwrap_or(Cloud::Global));
    let required = |field: &str| {
        invalid(
            format!("{key}.{field}"),
            "is required for a custom provider",
        )
    };
    let authorization_endpoint = i
        .authorization_endpoint
        .or_else(|| defaults.as_ref().map(|d| d.authorization.clone()))
        .ok_or_else(|| required("authorization_endpoint"))?;
    let token_endpoint = i
        .token_endpoint
        .or_else(|| defaults.as_ref().map(|d| d.token.clone()))
        .ok_or_else(|| required("token_endpoint"))?;
    let device_endpoint = i
        .device_authorization_endpoint
        .or_else(|| defaults.as_ref().and_then(|d| d.device.clone()));
    let scopes = match (i.scopes, &defaults) {
        (Some(s), _) if !s.is_empty() => s,
        (Some(_), _) => return Err(invalid(format!("{key}.scopes"), "must not be empty")),
        (None, Some(d)) => d.scopes.clone(),
        (None, None) => return Err(required("scopes")),
    };
    let client_secret = match (i.client_secret, i.client_secret_file, i.client_secret_env) {
        (None, None, None) => None,
        (Some(s), None, None) => Some(s.expose().clone()),
        (None, Some(path), None) => Some({
            let path = super::credential_path(&format!("{key}.client_secret_file"), path)?;
            std::fs::read_to_string(&path)
                .map_err(|e| {
                    invalid(
                        format!("{key}.client_secret_file"),
                        format!("can't read {}: {e}", path.display()),
                    )
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned()
        }),
        (None, None, Some(var)) => Some(std::env::var(&var).map_err(|_| {
            invalid(
                format!("{key}.client_secret_env"),
                format!("environment variable {var} is not set"),
            )
        })?),
        _ => {
            return Err(invalid(
                format!("{key}.client_secret"),
                "give at most one of client_secret, client_secret_file and client_secret_env",
            ))
        }
    };
    let client_certificate = match (i.client_certificate_file, i.client_key_file) {
        (None, None) => None,
        (Some(cert), Some(key_file)) => Some(client_certificate(key, &cert, &key_file)?),
        _ => {
            return Err(invalid(
                format!("{key}.client_certificate_file"),
                "client_certificate_file and client_key_file go together",
            ))
        }
    };
    let service_account = i
        .service_account_file
        .map(|path| service_account(key, &path))
        .transpose()?;
    let client_secret_expires = i
        .client_secret_expires
        .map(|d| {
            unix_date(&d).ok_or_else(|| {
                invalid(
                    format!("{key}.client_secret_expires"),
                    "must be a date, YYYY-MM-DD",
                )
            })
        })
        .transpose()?;
    let authorization_endpoint = endpoint(
        &format!("{key}.authorization_endpoint"),
        &authorization_endpoint,
        oauth,
    )?;
    let token_endpoint = endpoint(&format!("{key}.token_endpoint"), &token_endpoint, oauth)?;
    let device_authorization_endpoint = device_endpoint
        .map(|d| endpoint(&format!("{key}.device_authorization_endpoint"), &d, oauth))
        .transpose()?;
    Ok(Integration {
        redirect_path: redirect_path(&name, &authorization_endpoint, &token_endpoint),
        name,
        provider: i.provider,
        description: i.description,
        client_id: i.client_id,
        client_secret: client_secret.map(Secret::new),
        client_secret_expires,
        client_certificate,
        service_account,
        scopes,
        authorization_endpoint,
        token_endpoint,
        device_authorization_endpoint,
        mail_provider: defaults.as_ref().map(|d| d.mail),
        mechanism: match i.mechanism {
            None | Some(raw::Mechanism::Xoauth2) => OAuthMechanism::XOAuth2,
            Some(raw::Mechanism::Oauthbearer) => OAuthMechanism::OAuthBearer,
        },
    })
}

/// `/oauth2/callback/<integration>-<8 hex digits of SHA-256 over both
/// endpoints>`: registering it at the provider pins these endpoints, and
/// changing an endpoint changes the URL.
fn redirect_path(name: &str, authorization: &Url, token: &Url) -> String {
    let mut input = Vec::new();
    input.extend_from_slice(authorization.as_str().as_bytes());
    input.push(b'\n');
    input.extend_from_slice(token.as_str().as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA256, &input);
    let hex: String = digest.as_ref()[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("/oauth2/callback/{name}-{hex}")
}

fn client_certificate(
    key: &str,
    cert: &Path,
    key_file: &Path,
) -> Result<ClientCertificate, ConfigError> {
    use rustls::pki_types::pem::PemObject as _;
    let cert_der = rustls::pki_types::CertificateDer::from_pem_file(cert).map_err(|e| {
        invalid(
            format!("{key}.client_certificate_file"),
            format!("{}: {e}", cert.display()),
        )
    })?;
    let private_key = std::fs::read_to_string(key_file).map_err(|e| {
        invalid(
            format!("{key}.client_key_file"),
            format!("can't read {}: {e}", key_file.display()),
        )
    })?;
    let thumbprint = ring::digest::digest(&ring::digest::SHA256, &cert_der);
    Ok(ClientCertificate {
        thumbprint_sha256: thumbprint.as_ref().to_vec(),
        private_key_pem: Secret::new(private_key),
    })
}

fn service_account(key: &str, path: &Path) -> Result<ServiceAccount, ConfigError> {
    #[derive(serde::Deserialize)]
    struct Json {
        client_email: String,
        private_key: String,
        private_key_id: Option<String>,
    }
    let field = format!("{key}.service_account_file");
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(&field, format!("can't read {}: {e}", path.display())))?;
    let json: Json = serde_json::from_str(&text).map_err(|e| {
        invalid(
            &field,
            format!("{} is not a service account key: {e}", path.display()),
        )
    })?;
    Ok(ServiceAccount {
        client_email: json.client_email,
        private_key_id: json.private_key_id,
        private_key_pem: Secret::new(json.private_key),
    })
}

/// Unix seconds at the start of a `YYYY-MM-DD` day (UTC).
fn unix_date(date: &str) -> Option<u64> {
    let mut parts = date.splitn(3, '-');
    let (y, m, d): (i64, i64, i64) = (
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
        parts.next()?.parse().ok()?,
    );
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400).ok()
}

/// An OAuth endpoint: https, or http on loopback when explicitly allowed.
fn endpoint(key: &str, value: &str, oauth: &OAuthSettings) -> Result<Url, ConfigError> {
    let url =
        Url::parse(value).map_err(|e| invalid(key, format!("{value:?} is not a URL: {e}")))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if oauth.allow_insecure_loopback_http && is_loopback_host(&url) => Ok(url),
        "http" if is_loopback_host(&url) => Err(invalid(
            key,
            "must be https (http on loopback needs oauth.allow_insecure_loopback_http = true)",
        )),
        _ => Err(invalid(key, "must be https")),
    }
}

pub(super) fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}
