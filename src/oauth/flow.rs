//! The authorization-code flow's state between its start and the
//! browser's return: start (PKCE verifier and state, kept encrypted in
//! the store), finish (the code exchanged, the tokens installed), and
//! expiry. `mailgate authorize` and the integrations page both use it, and
//! the callback may reach another process than the one that started it.

use std::sync::Arc;
use std::time::Duration;

use super::store::{PendingFlow, PendingFlows, StoreError};
use super::{grant, unix_now, TokenError, Tokens};
use crate::config::{Config, Integration};
use crate::secret::Secret;

/// A pending flow is good for 15 minutes: time to sign in, not more.
const PENDING_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// Started flows, by their state. A flow is stored under the SHA-256 of
/// its state, so the state itself (a bearer secret until used) is never
/// written down.
#[derive(Clone)]
pub struct Flows {
    store: Arc<dyn PendingFlows>,
}

impl Flows {
    pub fn new(store: Arc<dyn PendingFlows>) -> Self {
        Self { store }
    }

    /// The store key of the flow with `state`.
    pub fn key(state: &str) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, state.as_bytes());
        digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Starts a flow for `account`: the authorization URL with PKCE and
    /// state, remembered until the browser comes back.
    ///
    /// # Errors
    /// When the URL can't be built or the store can't be written.
    pub async fn start(
        &self,
        account: &str,
        integration: &Integration,
        redirect: &url::Url,
        login_hint: Option<&str>,
        from_page: bool,
    ) -> Result<grant::Authorization, TokenError> {
        let started = grant::authorization(integration, redirect, login_hint)?;
        let flow = PendingFlow {
            account: account.to_owned(),
            verifier: started.verifier.expose().clone(),
            created_at: unix_now(),
            outcome: None,
            from_page,
        };
        // Flows abandoned in the browser, or finished by a process that
        // didn't clean up, go when the next one starts.
        self.store.sweep(PENDING_LIFETIME).await;
        self.store
            .put(&Self::key(started.state.expose()), &flow)
            .await?;
        Ok(started)
    }

    /// The flow with this state, if it exists and is fresh.
    ///
    /// # Errors
    /// When the store can't be read.
    pub async fn load(&self, state: &str) -> Result<Option<PendingFlow>, StoreError> {
        let flow = self.store.get(&Self::key(state)).await?;
        Ok(flow.filter(|f| unix_now().saturating_sub(f.created_at) < PENDING_LIFETIME.as_secs()))
    }

    /// Forgets a flow.
    pub async fn remove(&self, state: &str) {
        self.store.remove(&Self::key(state)).await;
    }

    /// Records how a flow ended, for the process that started it.
    pub async fn finish(&self, state: &str, mut flow: PendingFlow, outcome: Result<(), String>) {
        flow.outcome = Some(outcome);
        let _ = self.store.put(&Self::key(state), &flow).await;
    }
}

/// Why a callback could not complete a flow; shown to the admin.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error("The provider refused the authorization: {0}. Start again with mailgate authorize ACCOUNT, or from the integrations page.")]
    Provider(String),
    #[error("The request lacks the authorization code or the state. Open the URL that mailgate authorize printed, and let the provider send you back here.")]
    Incomplete,
    #[error("No authorization is waiting for this state: it expired (after 15 minutes), was used already, or was never started here.")]
    UnknownState,
    #[error("This authorization was started for integration {0}, not this one.")]
    WrongIntegration(String),
    #[error("Exchanging the code failed: {0}")]
    Exchange(String),
}

/// The authorization endpoint's error codes (RFC 6749 §4.1.2.1, OpenID
/// Connect Core §3.1.2.6) in plain words, with what to do.
fn explain(error: &str) -> &'static str {
    match error {
        "access_denied" => "the user declined, or cancelled, at the provider's sign-in or consent page",
        "invalid_scope" => "the provider doesn't know a scope of this integration, or the client may not ask for it",
        "unauthorized_client" => "the client may not use the authorization-code grant: enable it in the provider's app registration",
        "invalid_request" => "the provider rejected the request; check that the redirect URL registered there is exactly the one mailgate shows",
        "unsupported_response_type" => "the provider doesn't offer the authorization-code flow to this client",
        "server_error" | "temporarily_unavailable" => "the provider had a problem; try again in a moment",
        "login_required" | "interaction_required" | "consent_required" | "account_selection_required" => {
            "the provider needs the user to sign in or consent interactively"
        }
        _ => "see the provider's documentation for this error code",
    }
}

/// Completes the flow that `state` names: exchanges the code with the PKCE
/// verifier and stores the tokens. Returns the account's name.
#[allow(clippy::too_many_arguments)]
pub async fn finish(
    flows: &Flows,
    config: &Config,
    tokens: &Tokens,
    integration: &Integration,
    code: Option<&str>,
    state: Option<&str>,
    error: Option<&str>,
    error_description: Option<&str>,
) -> Result<String, CallbackError> {
    let pending = match state {
        Some(state) => flows
            .load(state)
            .await
            .map_err(|e| CallbackError::Exchange(e.to_string()))?,
        None => None,
    };
    if let Some(error) = error {
        // The provider's words are shown only for a flow started here: a
        // crafted link must not put its own text on this origin.
        let (Some(state), Some(p)) = (state, pending.filter(|p| p.outcome.is_none())) else {
            return Err(CallbackError::UnknownState);
        };
        let why = match error_description {
            Some(d) => format!("{error} ({d}): {}", explain(error)),
            None => format!("{error}: {}", explain(error)),
        };
        flows
            .finish(state, p, Err(format!("the provider refused: {why}")))
            .await;
        return Err(CallbackError::Provider(why));
    }
    let (Some(code), Some(state)) = (code, state) else {
        return Err(CallbackError::Incomplete);
    };
    let pending = pending
        .filter(|p| p.outcome.is_none())
        .ok_or(CallbackError::UnknownState)?;
    let account = config
        .accounts
        .get(&pending.account)
        .cloned()
        .ok_or(CallbackError::UnknownState)?;
    if account.integration.name != integration.name {
        return Err(CallbackError::WrongIntegration(
            account.integration.name.clone(),
        ));
    }
    let redirect = config
        .redirect_url(integration)
        .ok_or(CallbackError::UnknownState)?;
    let result = async {
        let granted = grant::exchange_code(
            tokens.http(),
            integration,
            &redirect,
            code,
            &Secret::new(pending.verifier.clone()),
        )
        .await?;
        tokens.install(&account, granted).await
    }
    .await;
    match result {
        Ok(()) => {
            flows.finish(state, pending, Ok(())).await;
            Ok(account.name.clone())
        }
        Err(e) => {
            flows.finish(state, pending, Err(e.to_string())).await;
            Err(CallbackError::Exchange(e.to_string()))
        }
    }
}
