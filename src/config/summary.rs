//! What `check-config` prints: the config in plain words, secrets shown
//! only as "set".

use std::fmt::Write as _;

use super::{Config, UpstreamServer};
use crate::protocol::Protocol;

impl Config {
    /// A human summary, with secrets shown only as "set".
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "state_dir: {}", self.state_dir.display());
        let _ = writeln!(
            s,
            "certificate: {}",
            match &self.certificate {
                Some(c) => format!("{} (key {})", c.cert.display(), c.key.display()),
                None => "self-signed, kept in the state directory".into(),
            }
        );
        let _ = writeln!(
            s,
            "store: {}",
            match &self.store {
                super::StoreBackend::File =>
                    format!("files in {}", self.state_dir.join("tokens").display()),
                super::StoreBackend::Postgres(p) => format!(
                    "postgres {}, password {}, CA {}",
                    p.url,
                    match &p.password {
                        Some(super::PasswordSource::File(f)) => format!("from {}", f.display()),
                        Some(super::PasswordSource::Env(_)) =>
                            format!("from {}", super::STORE_PASSWORD_ENV),
                        None => "none".into(),
                    },
                    p.ca_file.as_ref().map_or_else(
                        || "the web roots".into(),
                        |f| format!("{} and the web roots", f.display())
                    )
                ),
            }
        );
        let _ = writeln!(
            s,
            "network: token requests {}, mail {}",
            self.network.proxy.as_ref().map_or_else(
                || "direct or through HTTPS_PROXY/HTTP_PROXY".to_owned(),
                |p| format!("through {p}")
            ),
            self.network
                .mail_proxy
                .as_ref()
                .map_or_else(|| "direct".to_owned(), |p| format!("through {p}"))
        );
        for l in &self.listeners {
            let _ = writeln!(
                s,
                "listener: {:?} on {} ({:?})",
                l.protocol, l.address, l.tls
            );
        }
        if let Some(h) = &self.http {
            let _ = writeln!(
                s,
                "http: {} ({:?}), public URL {}, integrations page: {}",
                h.address,
                h.tls,
                h.public_url,
                match (&h.admin, h.admin_password_on_loopback) {
                    (None, _) => "loopback only".to_owned(),
                    (Some(a), false) => {
                        format!(
                            "loopback, or user {} with a password (hash set)",
                            a.username
                        )
                    }
                    (Some(a), true) => format!("user {} with a password (hash set)", a.username),
                }
            );
        }
        for i in self.integrations.values() {
            let _ = writeln!(
                s,
                "integration {}: {:?}, client id {}, client secret {}, scopes [{}]\n  authorization {}\n  token {}",
                i.name,
                i.provider,
                i.client_id,
                if i.client_secret.is_some() { "set" } else { "not set" },
                i.scopes.join(" "),
                i.authorization_endpoint,
                i.token_endpoint
            );
        }
        for a in self.accounts.values() {
            let upstreams: String = Protocol::all()
                .map(|p| format!(", {} {}", p.name, describe(a.upstream(p))))
                .collect();
            let _ = writeln!(
                s,
                "account {}: user {}, integration {}, mailbox {}, grant {:?}{upstreams}",
                a.name, a.username, a.integration.name, a.mailbox, a.grant,
            );
        }
        s
    }
}

fn describe(u: Option<&UpstreamServer>) -> String {
    u.map_or_else(
        || "none".into(),
        |u| format!("{}:{} ({:?})", u.host, u.port, u.tls),
    )
}
