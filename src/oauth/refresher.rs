//! The background refresher: every account's token kept fresh ahead of
//! expiry, with back-off after transient failures.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::{TokenError, Tokens};

/// Back-off after transient failures: `first` doubling to 10 minutes, with
/// up to 50 % jitter so that many accounts don't retry in step.
fn backoff(first: Duration, failures: u32) -> Duration {
    let base = first
        .saturating_mul(1 << failures.min(10))
        .min(Duration::from_secs(600));
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    base + base.mul_f64(f64::from(byte[0]) / 255.0 / 2.0)
}

impl Tokens {
    /// Refreshes the accounts that are due and returns how long to wait
    /// before the next one is. Accounts that are busy, need authorization,
    /// or wait out a back-off are skipped.
    pub async fn refresh_due(&self) -> Duration {
        let mut next = Instant::now() + Duration::from_secs(60);
        for entry in self.accounts.values() {
            let Ok(mut state) = entry.state.try_lock() else {
                continue;
            };
            if let Err(e) = self.sync(&entry.account, &mut state).await {
                warn!(account = %entry.account.name, error = %e, "token store unreadable");
                continue;
            }
            if state.record.needs_authorization.is_some() {
                continue;
            }
            let now = Instant::now();
            if let Some(until) = state.use_until.filter(|u| *u > now) {
                next = next.min(until);
                continue;
            }
            if let Some(at) = state.retry_at.filter(|a| *a > now) {
                next = next.min(at);
                continue;
            }
            match self.refresh(&entry.account, &mut state, None).await {
                Ok(_) => {
                    state.failures = 0;
                    state.retry_at = None;
                    if let Some(until) = state.use_until {
                        next = next.min(until);
                    }
                }
                Err(TokenError::NeedsAuthorization(_) | TokenError::NotAuthorizedYet(_)) => {}
                Err(e) => {
                    state.failures += 1;
                    let wait = backoff(self.retry_backoff, state.failures - 1);
                    warn!(account = %entry.account.name, error = %e, retry_in_s = wait.as_secs(), "token refresh failed; will retry");
                    let at = Instant::now() + wait;
                    state.retry_at = Some(at);
                    next = next.min(at);
                }
            }
        }
        next.saturating_duration_since(Instant::now())
            .max(Duration::from_millis(100))
    }

    /// Runs [`Tokens::refresh_due`] until `shutdown` fires.
    pub async fn run_refresher(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            let wait = self.refresh_due().await;
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let first = Duration::from_secs(5);
        for failures in 0..20 {
            let base = first
                .saturating_mul(1 << failures.min(10))
                .min(Duration::from_secs(600));
            let wait = backoff(first, failures);
            assert!(
                wait >= base && wait <= base + base / 2,
                "{failures}: {wait:?}"
            );
        }
        assert!(backoff(first, 30) <= Duration::from_secs(900));
    }
}
