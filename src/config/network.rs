//! `[network]`: how mailgate reaches the outside from a network that only
//! lets a proxy out. Token requests (and the notification webhook) go
//! through `proxy`, or the `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`
//! environment when it is unset; upstream mail connections go through an
//! HTTP CONNECT tunnel at `mail_proxy` (or a per-upstream `proxy`), with
//! TLS verified end to end inside the tunnel.

use std::sync::Arc;

use base64::Engine as _;

use super::{invalid, raw, ConfigError};
use crate::secret::Secret;

/// An HTTP proxy: where it is, and its credentials when the URL has them.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    pub host: String,
    pub port: u16,
    /// `Basic base64(user:password)`, for `Proxy-Authorization`.
    pub authorization: Option<Secret<String>>,
    /// The whole URL, credentials included (for the HTTP client).
    pub url: Secret<String>,
}

impl std::fmt::Display for ProxyUrl {
    /// `http://host:port`, never the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)?;
        if self.authorization.is_some() {
            f.write_str(" (with credentials)")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

/// The validated `[network]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkSettings {
    /// For token requests and the webhook; `None`: the environment's.
    pub proxy: Option<Arc<ProxyUrl>>,
    /// For upstream mail connections; `None`: direct.
    pub mail_proxy: Option<Arc<ProxyUrl>>,
}

pub(super) fn network(n: &raw::Network) -> Result<NetworkSettings, ConfigError> {
    let given = |key: &str, url: &Option<String>| {
        url.as_deref()
            .map(|u| proxy_url(key, u).map(Arc::new))
            .transpose()
    };
    Ok(NetworkSettings {
        proxy: given("network.proxy", &n.proxy)?,
        mail_proxy: given("network.mail_proxy", &n.mail_proxy)?,
    })
}

/// `http://[user:password@]host[:port]` (port 80 when missing).
pub(super) fn proxy_url(key: &str, given: &str) -> Result<ProxyUrl, ConfigError> {
    // The error never repeats the URL: it may hold a password.
    let url = url::Url::parse(given)
        .map_err(|e| invalid(key, format!("is not a URL ({e}); write http://host:port")))?;
    if url.scheme() != "http" {
        return Err(invalid(
            key,
            "must be an http:// proxy URL (the tunnel to the proxy is plain HTTP; TLS runs end to end inside it)",
        ));
    }
    let host = url
        .host_str()
        .ok_or_else(|| invalid(key, "names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let authorization = (!url.username().is_empty()).then(|| {
        let user = percent_decode(url.username());
        let password = percent_decode(url.password().unwrap_or(""));
        Secret::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
        ))
    });
    Ok(ProxyUrl {
        host,
        port,
        authorization,
        url: Secret::new(given.to_owned()),
    })
}

/// The URL's user or password as written before percent-encoding (not
/// form decoding: `+` stays a plus).
fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_and_never_show_their_password() {
        let p = proxy_url("k", "http://alice:s%40cret@proxy.corp:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert_eq!(p.to_string(), "http://proxy.corp:3128 (with credentials)");
        assert!(!format!("{p:?}").contains("s@cret"));
        let expected = base64::engine::general_purpose::STANDARD.encode("alice:s@cret");
        assert_eq!(
            p.authorization.unwrap().expose(),
            &format!("Basic {expected}")
        );
        let p = proxy_url("k", "http://bob:a+b&c@proxy:8080").unwrap();
        let expected = base64::engine::general_purpose::STANDARD.encode("bob:a+b&c");
        assert_eq!(
            p.authorization.unwrap().expose(),
            &format!("Basic {expected}")
        );
        let p = proxy_url("k", "http://10.0.0.1").unwrap();
        assert_eq!((p.port, p.authorization.is_none()), (80, true));
        let e = proxy_url("k", "https://u:hunter2@proxy:443")
            .unwrap_err()
            .to_string();
        assert!(e.contains("http://") && !e.contains("hunter2"), "{e}");
        assert!(proxy_url("k", "not a url").is_err());
    }
}
