//! The HTTP client the token requests go through: reqwest on rustls, no
//! redirects, timeouts. Statuses that mean "try again" (408, 429, 5xx)
//! become transport errors here, so that `oauth2` never mistakes them for
//! a permanent refusal.

use std::future::Future;
use std::pin::Pin;

use oauth2::{AsyncHttpClient, HttpRequest, HttpResponse};

/// A token request that failed before a usable answer came back.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Transport(String),
    #[error("token endpoint answered HTTP {0}")]
    Status(u16),
}

/// Wraps the shared reqwest client.
#[derive(Debug, Clone)]
pub struct TokenHttp(pub reqwest::Client);

/// Whether an HTTP status is worth retrying (RFC 9110 §15.5.9, RFC 6585 §4,
/// and every 5xx).
pub fn is_transient_status(status: u16) -> bool {
    status == 408 || status == 429 || (500..600).contains(&status)
}

impl<'c> AsyncHttpClient<'c> for TokenHttp {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + Sync + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let request =
                reqwest::Request::try_from(request).map_err(|e| HttpError::Transport(chain(&e)))?;
            let response = self
                .0
                .execute(request)
                .await
                .map_err(|e| HttpError::Transport(chain(&e)))?;
            let status = response.status();
            if is_transient_status(status.as_u16()) {
                return Err(HttpError::Status(status.as_u16()));
            }
            let mut builder = oauth2::http::Response::builder().status(status);
            for (name, value) in response.headers() {
                builder = builder.header(name, value);
            }
            let body = response
                .bytes()
                .await
                .map_err(|e| HttpError::Transport(chain(&e)))?;
            builder
                .body(body.to_vec())
                .map_err(|e| HttpError::Transport(e.to_string()))
        })
    }
}

/// An error with its sources, e.g. "error sending request: connection refused".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}
