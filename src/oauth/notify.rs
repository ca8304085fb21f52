//! Tells someone when an account comes to need authorization: a command to
//! run and/or a URL to POST to, each with the command that fixes it.

use tracing::warn;
use url::Url;

use super::fix_command;
use crate::config::{Account, OAuthSettings};

pub struct Notifier {
    command: Option<Vec<String>>,
    url: Option<Url>,
    http: reqwest::Client,
}

impl Notifier {
    pub fn new(settings: &OAuthSettings, http: reqwest::Client) -> Self {
        Self {
            command: settings.notify_command.clone(),
            url: settings.notify_url.clone(),
            http,
        }
    }

    /// Fires the hooks in the background; failures are logged.
    pub fn needs_authorization(&self, account: &Account, reason: &str) {
        let fix = fix_command(&account.name);
        if let Some(argv) = self.command.clone() {
            let (name, integration, reason, fix) = (
                account.name.clone(),
                account.integration.name.clone(),
                reason.to_owned(),
                fix.clone(),
            );
            tokio::spawn(async move {
                let Some((program, args)) = argv.split_first() else {
                    return;
                };
                let status = tokio::process::Command::new(program)
                    .args(args)
                    .env("MAILGATE_ACCOUNT", &name)
                    .env("MAILGATE_INTEGRATION", &integration)
                    .env("MAILGATE_REASON", &reason)
                    .env("MAILGATE_FIX", &fix)
                    .stdin(std::process::Stdio::null())
                    .status()
                    .await;
                match status {
                    Ok(s) if s.success() => {}
                    Ok(s) => warn!(account = %name, status = %s, "notify_command failed"),
                    Err(e) => warn!(account = %name, error = %e, "notify_command could not run"),
                }
            });
        }
        if let Some(url) = self.url.clone() {
            let body = serde_json::json!({
                "event": "needs_authorization",
                "account": account.name,
                "integration": account.integration.name,
                "mailbox": account.mailbox,
                "reason": reason,
                "fix": fix,
            });
            let http = self.http.clone();
            let name = account.name.clone();
            tokio::spawn(async move {
                match http.post(url).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {}
                    Ok(r) => {
                        warn!(account = %name, status = %r.status(), "notify_url refused the notice")
                    }
                    Err(e) => warn!(account = %name, error = %e, "notify_url unreachable"),
                }
            });
        }
    }
}
