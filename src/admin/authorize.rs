//! Pending authorizations: the PKCE verifier and state of a started
//! authorization-code flow, kept (encrypted) until the browser comes back
//! to the redirect URL, possibly in another process.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::Integration;
use crate::oauth::{grant, TokenError, TokenStore};
use crate::secret::Secret;
use crate::services::Services;

/// A flow started by `mailgate authorize` or the integrations page.
#[derive(Clone, Serialize, Deserialize)]
pub struct Pending {
    pub account: String,
    pub verifier: String,
    pub created_at: u64,
    /// Set when the flow ended: `Ok(())`, or why it failed.
    #[serde(default)]
    pub outcome: Option<Result<(), String>>,
    /// Started from the integrations page: the callback sends the browser
    /// back there.
    #[serde(default)]
    pub from_page: bool,
}

impl Pending {
    /// The record of a flow just started for `account`.
    pub fn started(account: &str, started: &grant::Authorization, from_page: bool) -> Self {
        Self {
            account: account.to_owned(),
            verifier: started.verifier.expose().clone(),
            created_at: now(),
            outcome: None,
            from_page,
        }
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("account", &self.account)
            .field("outcome", &self.outcome)
            .finish_non_exhaustive()
    }
}

/// A pending flow is good for 15 minutes: time to sign in, not more.
const PENDING_LIFETIME_S: u64 = 15 * 60;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Pending flows, in the token store's directory, under its key. A flow
/// is named by the SHA-256 of its state, so the state itself (a bearer
/// secret until used) is never written down.
pub struct PendingStore {
    store: TokenStore,
}

impl PendingStore {
    pub fn new(store: TokenStore) -> Self {
        Self { store }
    }

    fn name(state: &str) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, state.as_bytes());
        let hex: String = digest.as_ref()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("pending-{hex}")
    }

    /// Remembers a started flow.
    ///
    /// # Errors
    /// When the store can't be written.
    pub fn save(&self, state: &Secret<String>, pending: &Pending) -> Result<(), TokenError> {
        self.sweep();
        self.write(state.expose(), pending)
    }

    /// Removes flows older than their lifetime: abandoned in the browser,
    /// or finished by a process that didn't clean up.
    fn sweep(&self) {
        let Some(dir) = self.store.path("pending-x").parent().map(PathBuf::from) else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let lifetime = std::time::Duration::from_secs(PENDING_LIFETIME_S);
        for entry in entries.flatten() {
            let stale = entry.file_name().to_string_lossy().starts_with("pending-")
                && entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > lifetime));
            if stale {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    fn write(&self, state: &str, pending: &Pending) -> Result<(), TokenError> {
        self.store
            .save_value(&Self::name(state), pending)
            .map_err(TokenError::from)
    }

    /// The flow with this state, if it exists and is fresh.
    ///
    /// # Errors
    /// When the store can't be read.
    pub fn load(&self, state: &str) -> Result<Option<Pending>, TokenError> {
        let pending: Option<Pending> = self.store.load_value(&Self::name(state))?;
        Ok(pending.filter(|p| now().saturating_sub(p.created_at) < PENDING_LIFETIME_S))
    }

    /// Forgets a flow.
    pub fn remove(&self, state: &str) {
        let _ = std::fs::remove_file(self.store.path(&Self::name(state)));
    }

    /// The file a flow lives in (for tests and cleanup).
    pub fn path(&self, state: &str) -> PathBuf {
        self.store.path(&Self::name(state))
    }

    /// Records how a flow ended, for the process that started it.
    pub fn finish(&self, state: &str, mut pending: Pending, outcome: Result<(), String>) {
        pending.outcome = Some(outcome);
        let _ = self.write(state, &pending);
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
pub async fn finish(
    pending_store: &PendingStore,
    s: &Services,
    integration: &Integration,
    code: Option<&str>,
    state: Option<&str>,
    error: Option<&str>,
    error_description: Option<&str>,
) -> Result<String, CallbackError> {
    let pending = match state {
        Some(state) => pending_store
            .load(state)
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
        pending_store.finish(state, p, Err(format!("the provider refused: {why}")));
        return Err(CallbackError::Provider(why));
    }
    let (Some(code), Some(state)) = (code, state) else {
        return Err(CallbackError::Incomplete);
    };
    let pending = pending
        .filter(|p| p.outcome.is_none())
        .ok_or(CallbackError::UnknownState)?;
    let account = s
        .config
        .accounts
        .get(&pending.account)
        .cloned()
        .ok_or(CallbackError::UnknownState)?;
    if account.integration.name != integration.name {
        return Err(CallbackError::WrongIntegration(
            account.integration.name.clone(),
        ));
    }
    let redirect = s
        .config
        .redirect_url(integration)
        .ok_or(CallbackError::UnknownState)?;
    let result = async {
        let granted = grant::exchange_code(
            s.tokens.http(),
            integration,
            &redirect,
            code,
            &Secret::new(pending.verifier.clone()),
        )
        .await?;
        s.tokens.install(&account, granted).await
    }
    .await;
    match result {
        Ok(()) => {
            pending_store.finish(state, pending, Ok(()));
            Ok(account.name.clone())
        }
        Err(e) => {
            pending_store.finish(state, pending, Err(e.to_string()));
            Err(CallbackError::Exchange(e.to_string()))
        }
    }
}
