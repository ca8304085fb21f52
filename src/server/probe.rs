//! Test connection: each step of a login, run for real and timed: the
//! token grant or refresh, the upstream TLS connect, the XOAUTH2 login and
//! the logout. `mailgate test` prints them; the integrations page shows
//! them.

use std::time::Duration;

use tokio::time::Instant;

use super::upstream::{self, Connectors, UpstreamError};
use crate::config::{Account, Grant};
use crate::oauth::Tokens;
use crate::proto::{LoginRequest, UpstreamTls};
use crate::protocol::Protocol;

/// One step and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    /// What happened, in plain words; `Err` for a failed step.
    pub outcome: Result<String, String>,
    pub elapsed: Duration,
}

/// A failure after a successful login, with the likely causes where the
/// provider's words are known: Microsoft's "User is authenticated but not
/// connected" means the token was fine but the mailbox can't be opened.
fn diagnose(account: &Account, failure: &str) -> String {
    if !failure
        .to_ascii_lowercase()
        .contains("authenticated but not connected")
    {
        return failure.to_owned();
    }
    let causes = if account.grant == Grant::ClientCredentials {
        format!(
            "the app's service principal is not registered in Exchange Online (New-ServicePrincipal -AppId {} -ObjectId <the enterprise application's object ID>), or it has no access to {} (Add-MailboxPermission -Identity {} -User <the service principal's ID> -AccessRights FullAccess), or the mailbox address is wrong",
            account.integration.client_id, account.mailbox, account.mailbox
        )
    } else {
        format!(
            "{} is not the signed-in user's mailbox and the user has no Full Access permission on it (Add-MailboxPermission -Identity {} -User <the signed-in user> -AccessRights FullAccess), or the mailbox isn't licensed for Exchange Online, or the account signed in as someone else",
            account.mailbox, account.mailbox
        )
    };
    format!("{failure}: the token was accepted, but the mailbox can't be opened. Likely: {causes}")
}

/// Runs every step for `account`, stopping at the first failure.
pub async fn test_account(
    tokens: &Tokens,
    connectors: &Connectors,
    account: &Account,
    timeout: Duration,
    gateway_host: &str,
) -> Vec<Step> {
    let mechanism = account.integration.mechanism.name().to_ascii_lowercase();
    let mut steps = Vec::new();
    let started = Instant::now();
    let token = tokens.force_refresh(account).await;
    let token = match token {
        Ok(t) => {
            steps.push(Step {
                name: "token".into(),
                outcome: Ok(account.grant.exchanged().into()),
                elapsed: started.elapsed(),
            });
            t
        }
        Err(e) => {
            steps.push(Step {
                name: "token".into(),
                outcome: Err(e.to_string()),
                elapsed: started.elapsed(),
            });
            return steps;
        }
    };
    for protocol in Protocol::all() {
        let Some(server) = account.upstream(protocol) else {
            continue;
        };
        let label = protocol.name;
        let Some(connector) = connectors.get(&server.ca_file) else {
            continue;
        };
        let started = Instant::now();
        let connected = tokio::time::timeout(timeout, upstream::connect(server, connector, None))
            .await
            .unwrap_or(Err(UpstreamError::Timeout));
        let connected = match connected {
            Ok(c) => {
                let tls = match server.tls {
                    UpstreamTls::Implicit => "TLS",
                    UpstreamTls::StartTls => "plaintext, STARTTLS next",
                };
                steps.push(Step {
                    name: format!("{label} connect"),
                    outcome: Ok(format!("{}:{} ({tls})", server.host, server.port)),
                    elapsed: started.elapsed(),
                });
                c
            }
            Err(e) => {
                steps.push(Step {
                    name: format!("{label} connect"),
                    outcome: Err(e.to_string()),
                    elapsed: started.elapsed(),
                });
                return steps;
            }
        };
        let started = Instant::now();
        let login = upstream::login(
            connected,
            connector,
            (protocol.new_login)(&LoginRequest {
                mailbox: &account.mailbox,
                token: &token,
                mechanism: account.integration.mechanism,
                tls: server.tls,
                host: &server.host,
                port: server.port,
                client_hello: None,
                gateway_host,
            }),
        );
        let mut logged_in = match tokio::time::timeout(timeout, login)
            .await
            .unwrap_or(Err(UpstreamError::Timeout))
        {
            Ok(l) => {
                steps.push(Step {
                    name: format!("{label} {mechanism} login"),
                    outcome: Ok(format!("logged in as {}", account.mailbox)),
                    elapsed: started.elapsed(),
                });
                l
            }
            Err(e) => {
                steps.push(Step {
                    name: format!("{label} {mechanism} login"),
                    outcome: Err(e.to_string()),
                    elapsed: started.elapsed(),
                });
                return steps;
            }
        };
        // One command past login: a provider may accept the token and
        // still not open the mailbox.
        let started = Instant::now();
        let checked = tokio::time::timeout(
            timeout,
            upstream::check(&mut logged_in, protocol, gateway_host),
        )
        .await
        .unwrap_or(Err(UpstreamError::Timeout))
        .map_err(|e| diagnose(account, &e.to_string()));
        let failed = checked.is_err();
        steps.push(Step {
            name: format!("{label} {}", protocol.check.name),
            outcome: checked,
            elapsed: started.elapsed(),
        });
        if failed {
            return steps;
        }
        let started = Instant::now();
        let outcome = tokio::time::timeout(timeout, upstream::logout(logged_in, protocol))
            .await
            .unwrap_or(Err(UpstreamError::Timeout))
            .map(|()| "logged out".to_owned())
            .map_err(|e| e.to_string());
        let failed = outcome.is_err();
        steps.push(Step {
            name: format!("{label} logout"),
            outcome,
            elapsed: started.elapsed(),
        });
        if failed {
            return steps;
        }
    }
    steps
}
