//! Accounts: a local login mapped to an upstream mailbox, with one
//! upstream server per protocol.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use super::http::argon2id_hash;
use super::integration::Integration;
use super::{invalid, raw, ConfigError, Grant};
use crate::proto::UpstreamTls;
use crate::protocol::Protocol;
use crate::secret::Secret;

/// A local login mapped to an upstream mailbox.
#[derive(Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub username: String,
    /// An argon2id PHC string. Not a password, but an offline guessing
    /// target: redacted like one.
    pub password_hash: Secret<String>,
    pub integration: Arc<Integration>,
    /// The XOAUTH2 `user=`; may differ from the token's owner.
    pub mailbox: String,
    pub grant: Grant,
    pub refresh_token: Option<Secret<String>>,
    /// The upstream server of each protocol. A protocol is missing only
    /// for a custom provider that names no server for it and has no
    /// listener to serve it.
    pub upstreams: BTreeMap<Protocol, UpstreamServer>,
}

impl UpstreamServer {
    /// A name for this server and how it is reached, for per-server tables.
    pub fn id(&self) -> String {
        format!(
            "{}:{}:{:?}:{:?}:{}",
            self.host,
            self.port,
            self.tls,
            self.ca_file,
            self.proxy
                .as_ref()
                .map_or_else(|| "direct".to_owned(), |p| p.to_string())
        )
    }
}

impl Account {
    /// The upstream for `protocol`.
    pub fn upstream(&self, protocol: Protocol) -> Option<&UpstreamServer> {
        self.upstreams.get(&protocol)
    }
}

/// An upstream mail server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamServer {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
    /// An extra CA, trusted beside the webpki roots.
    pub ca_file: Option<PathBuf>,
    /// The account's upstream sessions at once, at most (Microsoft allows
    /// 3 SMTP sessions per mailbox); `None`: no cap.
    pub max_sessions: Option<usize>,
    /// The HTTP CONNECT proxy that connections go through; `None`: direct.
    pub proxy: Option<Arc<super::ProxyUrl>>,
}

/// Validates `[accounts.NAME]`; `served` says whether a listener serves a
/// protocol, which a custom provider must then name a server for.
pub(super) fn account(
    key: &str,
    name: String,
    a: raw::Account,
    integrations: &BTreeMap<String, Arc<Integration>>,
    served: impl Fn(Protocol) -> bool,
    mail_proxy: Option<&Arc<super::ProxyUrl>>,
) -> Result<Account, ConfigError> {
    let integration = integrations
        .get(&a.integration)
        .ok_or_else(|| {
            invalid(
                format!("{key}.integration"),
                format!("no integration named {:?}", a.integration),
            )
        })?
        .clone();
    let username = a.username.unwrap_or_else(|| name.clone());
    if username.is_empty() {
        return Err(invalid(format!("{key}.username"), "must not be empty"));
    }
    argon2id_hash(&format!("{key}.password_hash"), &a.password_hash)?;
    if a.mailbox.is_empty() || a.mailbox.contains(['\x01', '\r', '\n']) {
        return Err(invalid(
            format!("{key}.mailbox"),
            "must be a non-empty mailbox name",
        ));
    }
    if let Some(unknown) = a
        .upstreams
        .keys()
        .find(|k| Protocol::from_name(k).is_none())
    {
        return Err(invalid(
            format!("{key}.{unknown}"),
            format!(
                "unknown key (an upstream table is named after a protocol: {})",
                Protocol::names()
            ),
        ));
    }
    let mut upstreams = BTreeMap::new();
    for protocol in Protocol::all() {
        let key = format!("{key}.{}", protocol.name);
        let given = a
            .upstreams
            .get(protocol.name)
            .map(|v| {
                v.deserialize::<raw::Upstream>()
                    .map_err(|e| invalid(&key, e.to_string()))
            })
            .transpose()?;
        let default = integration
            .mail_provider
            .map(|p| (protocol.default_upstream)(p));
        let cap = integration
            .mail_provider
            .and_then(|p| (protocol.sessions_per_mailbox)(p));
        if let Some(mut server) =
            upstream_or_default(&key, given, default, served(protocol), mail_proxy)?
        {
            server.max_sessions = server.max_sessions.or(cap);
            if server.max_sessions == Some(0) {
                return Err(invalid(
                    format!("{key}.max_sessions"),
                    "must be greater than 0",
                ));
            }
            upstreams.insert(protocol, server);
        }
    }
    match a.grant {
        Grant::JwtBearer if integration.service_account.is_none() => {
            return Err(invalid(
                format!("{key}.grant"),
                format!(
                    "jwt_bearer needs service_account_file in integration {:?}",
                    integration.name
                ),
            ));
        }
        Grant::ClientCredentials
            if integration.client_secret.is_none() && integration.client_certificate.is_none() =>
        {
            return Err(invalid(
                format!("{key}.grant"),
                format!(
                    "client_credentials needs a client secret or certificate in integration {:?}",
                    integration.name
                ),
            ));
        }
        _ => {}
    }
    Ok(Account {
        name,
        username,
        password_hash: a.password_hash,
        integration,
        mailbox: a.mailbox,
        grant: a.grant,
        refresh_token: a.refresh_token,
        upstreams,
    })
}

/// The configured upstream, or the provider's. A custom provider must give
/// one when a listener serves the protocol.
fn upstream_or_default(
    key: &str,
    given: Option<raw::Upstream>,
    default: Option<crate::proto::DefaultUpstream>,
    served: bool,
    mail_proxy: Option<&Arc<super::ProxyUrl>>,
) -> Result<Option<UpstreamServer>, ConfigError> {
    match (given, default) {
        (Some(u), _) => upstream(key, u, mail_proxy).map(Some),
        (None, Some(d)) => Ok(Some(UpstreamServer {
            host: d.host.to_owned(),
            port: d.port,
            tls: d.tls,
            ca_file: None,
            max_sessions: None,
            proxy: mail_proxy.cloned(),
        })),
        (None, None) if served => Err(invalid(
            key,
            "is required for an integration with a custom provider",
        )),
        (None, None) => Ok(None),
    }
}

fn upstream(
    key: &str,
    u: raw::Upstream,
    mail_proxy: Option<&Arc<super::ProxyUrl>>,
) -> Result<UpstreamServer, ConfigError> {
    let (host, port) = u
        .address
        .rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>().ok()?,
            ))
        })
        .filter(|(h, p)| !h.is_empty() && *p != 0)
        .ok_or_else(|| {
            invalid(
                format!("{key}.address"),
                format!("{:?} is not host:port", u.address),
            )
        })?;
    if rustls::pki_types::ServerName::try_from(host).is_err() {
        return Err(invalid(
            format!("{key}.address"),
            format!("{host:?} is not a valid host name"),
        ));
    }
    if let Some(ca) = &u.ca_file {
        if !ca.is_file() {
            return Err(invalid(
                format!("{key}.ca_file"),
                format!("{} is not a readable file", ca.display()),
            ));
        }
    }
    Ok(UpstreamServer {
        host: host.to_owned(),
        port,
        tls: match u.tls {
            raw::UpstreamTls::Implicit => UpstreamTls::Implicit,
            raw::UpstreamTls::Starttls => UpstreamTls::StartTls,
        },
        ca_file: u.ca_file,
        max_sessions: u.max_sessions,
        proxy: match u.proxy.as_deref() {
            None => mail_proxy.cloned(),
            Some("direct") => None,
            Some(given) => Some(Arc::new(super::network::proxy_url(
                &format!("{key}.proxy"),
                given,
            )?)),
        },
    })
}
