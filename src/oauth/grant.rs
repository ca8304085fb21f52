//! Token requests, one function per grant, through the `oauth2` crate:
//! refresh token, client credentials (secret or certificate), JWT bearer
//! (Google service accounts), authorization code with PKCE, and the device
//! authorization grant (RFC 8628).

use std::time::Duration;

use oauth2::basic::{
    BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse,
    BasicTokenIntrospectionResponse, BasicTokenType,
};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret, CsrfToken,
    DeviceAuthorizationUrl, EndpointMaybeSet, EndpointNotSet, EndpointSet, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope,
    StandardDeviceAuthorizationResponse, StandardRevocableToken, TokenUrl,
};
use serde::{Deserialize, Deserializer, Serialize};
use url::Url;

use super::http::{HttpError, TokenHttp};
use super::jwt::{base64url, Signer};
use super::{unix_now as now, TokenError};
use crate::config::{Account, Integration, Provider};
use crate::secret::Secret;

/// A token endpoint's answer, read leniently: `expires_in` may be missing
/// or a string, and `token_type` any case (PROVIDERS.md, "Token endpoint
/// behaviour to expect").
#[derive(Clone, Deserialize, Serialize)]
pub struct TokenResponse {
    access_token: oauth2::AccessToken,
    #[serde(deserialize_with = "case_insensitive_token_type")]
    token_type: BasicTokenType,
    #[serde(default, deserialize_with = "lenient_seconds")]
    expires_in: Option<u64>,
    #[serde(default)]
    refresh_token: Option<oauth2::RefreshToken>,
}

impl std::fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenResponse")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// RFC 6749 §5.1: the token type is case-insensitive ("bearer", "Bearer").
fn case_insensitive_token_type<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BasicTokenType, D::Error> {
    let name = String::deserialize(d)?;
    Ok(match name.to_ascii_lowercase().as_str() {
        "bearer" => BasicTokenType::Bearer,
        "mac" => BasicTokenType::Mac,
        _ => BasicTokenType::Extension(name),
    })
}

fn lenient_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seconds {
        Number(u64),
        Text(String),
    }
    Ok(match Option::<Seconds>::deserialize(d)? {
        Some(Seconds::Number(n)) => Some(n),
        Some(Seconds::Text(s)) => s.trim().parse().ok(),
        None => None,
    })
}

impl oauth2::TokenResponse for TokenResponse {
    type TokenType = BasicTokenType;
    fn access_token(&self) -> &oauth2::AccessToken {
        &self.access_token
    }
    fn token_type(&self) -> &BasicTokenType {
        &self.token_type
    }
    fn expires_in(&self) -> Option<Duration> {
        self.expires_in.map(Duration::from_secs)
    }
    fn refresh_token(&self) -> Option<&oauth2::RefreshToken> {
        self.refresh_token.as_ref()
    }
    fn scopes(&self) -> Option<&Vec<Scope>> {
        None
    }
}

type Client = oauth2::Client<
    BasicErrorResponse,
    TokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointMaybeSet,
    EndpointMaybeSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// An access token lifetime when the provider doesn't say (RFC 6749 §5.1
/// makes `expires_in` optional; providers use one hour).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// The longest lifetime believed: a day. A larger `expires_in` is treated
/// as a day (we refresh early, which costs nothing) and keeps time
/// arithmetic in range.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Tokens from a successful grant.
pub struct Granted {
    pub access_token: Secret<String>,
    pub refresh_token: Option<Secret<String>>,
    pub lifetime: Duration,
}

impl TryFrom<TokenResponse> for Granted {
    type Error = TokenError;
    fn try_from(r: TokenResponse) -> Result<Self, TokenError> {
        if r.token_type != BasicTokenType::Bearer {
            let kind = match &r.token_type {
                BasicTokenType::Extension(name) => name.clone(),
                other => format!("{other:?}"),
            };
            return Err(TokenError::NeedsAuthorization(format!(
                "the token endpoint issued a {kind:?} token; XOAUTH2 needs a Bearer token"
            )));
        }
        Ok(Self {
            access_token: Secret::new(r.access_token.secret().clone()),
            refresh_token: r.refresh_token.map(|t| Secret::new(t.secret().clone())),
            lifetime: r
                .expires_in
                .map_or(DEFAULT_LIFETIME, Duration::from_secs)
                .min(MAX_LIFETIME),
        })
    }
}

fn client(integration: &Integration, with_secret: bool) -> Client {
    let client = oauth2::Client::new(ClientId::new(integration.client_id.clone()))
        .set_auth_uri_option(Some(AuthUrl::from_url(
            integration.authorization_endpoint.clone(),
        )))
        .set_device_authorization_url_option(
            integration
                .device_authorization_endpoint
                .clone()
                .map(DeviceAuthorizationUrl::from_url),
        )
        .set_token_uri(TokenUrl::from_url(integration.token_endpoint.clone()));
    match (&integration.client_secret, with_secret) {
        (Some(secret), true) => {
            client.set_client_secret(ClientSecret::new(secret.expose().clone()))
        }
        // A public client, or one that authenticates with an assertion:
        // client_id goes in the body (RFC 6749 §2.3.1).
        _ => client.set_auth_type(AuthType::RequestBody),
    }
}

fn scopes(integration: &Integration) -> impl Iterator<Item = Scope> + '_ {
    integration.scopes.iter().map(|s| Scope::new(s.clone()))
}

/// The `private_key_jwt` client assertion (RFC 7523 §2.2), as Microsoft's
/// certificate credentials describe it.
fn client_assertion(integration: &Integration) -> Result<Option<String>, TokenError> {
    let Some(cert) = &integration.client_certificate else {
        return Ok(None);
    };
    let signer =
        Signer::from_pem(cert.private_key_pem.expose()).map_err(TokenError::NeedsAuthorization)?;
    let now = now();
    let mut jti = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut jti)
        .map_err(|_| TokenError::Transient("no randomness".into()))?;
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t#S256": base64url(&cert.thumbprint_sha256)});
    let claims = serde_json::json!({
        "aud": integration.token_endpoint.as_str(),
        "iss": integration.client_id,
        "sub": integration.client_id,
        "jti": base64url(&jti),
        "nbf": now,
        "iat": now,
        "exp": now + 300,
    });
    signer
        .sign(&header, &claims)
        .map(Some)
        .map_err(TokenError::Transient)
}

const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// A fresh access token for `account` by its configured grant. `refresh`
/// is the refresh token, for `authorization_code` accounts.
///
/// # Errors
/// [`TokenError::Transient`] or [`TokenError::NeedsAuthorization`].
pub async fn request(
    http: &TokenHttp,
    account: &Account,
    refresh: Option<&Secret<String>>,
) -> Result<Granted, TokenError> {
    use crate::config::Grant;
    let integration = &account.integration;
    let assertion = client_assertion(integration)?;
    let client = client(integration, assertion.is_none());
    let response = match account.grant {
        Grant::AuthorizationCode => {
            let refresh =
                refresh.ok_or_else(|| TokenError::NotAuthorizedYet(account.name.clone()))?;
            let refresh_token = RefreshToken::new(refresh.expose().clone());
            let mut request = client.exchange_refresh_token(&refresh_token);
            // RFC 6749 §6 makes scope optional on refresh and servers
            // reject any scope the grant lacks; Microsoft's v2 endpoint
            // documents it as required. Send it only there.
            if integration.provider == Provider::Microsoft {
                request = request.add_scopes(scopes(integration));
            }
            if let Some(a) = &assertion {
                request = request
                    .add_extra_param("client_assertion_type", ASSERTION_TYPE)
                    .add_extra_param("client_assertion", a.clone());
            }
            request.request_async(http).await
        }
        Grant::ClientCredentials => {
            let mut request = client
                .exchange_client_credentials()
                .add_scopes(scopes(integration));
            if let Some(a) = &assertion {
                request = request
                    .add_extra_param("client_assertion_type", ASSERTION_TYPE)
                    .add_extra_param("client_assertion", a.clone());
            }
            request.request_async(http).await
        }
        Grant::JwtBearer => return jwt_bearer(http, account).await,
    };
    response.map_err(classify)?.try_into()
}

/// Google's service account flow: a JWT signed by the service account,
/// with `sub` = the mailbox to impersonate (domain-wide delegation).
async fn jwt_bearer(http: &TokenHttp, account: &Account) -> Result<Granted, TokenError> {
    let integration = &account.integration;
    let Some(sa) = &integration.service_account else {
        return Err(TokenError::NeedsAuthorization(
            "no service account key configured".into(),
        ));
    };
    let signer =
        Signer::from_pem(sa.private_key_pem.expose()).map_err(TokenError::NeedsAuthorization)?;
    let now = now();
    let mut header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    if let Some(kid) = &sa.private_key_id {
        header["kid"] = serde_json::Value::String(kid.clone());
    }
    let claims = serde_json::json!({
        "iss": sa.client_email,
        "sub": account.mailbox,
        "scope": integration.scopes.join(" "),
        "aud": integration.token_endpoint.as_str(),
        "iat": now,
        "exp": now + 3600,
    });
    let assertion = signer
        .sign(&header, &claims)
        .map_err(TokenError::Transient)?;
    let body = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", JWT_BEARER)
        .append_pair("assertion", &assertion)
        .finish();
    let request = oauth2::http::Request::builder()
        .method(oauth2::http::Method::POST)
        .uri(integration.token_endpoint.as_str())
        .header(
            oauth2::http::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .header(oauth2::http::header::ACCEPT, "application/json")
        .body(body.into_bytes())
        .map_err(|e| TokenError::Transient(e.to_string()))?;
    let response = oauth2::AsyncHttpClient::call(http, request)
        .await
        .map_err(|e| classify(RequestTokenError::Request(e)))?;
    let (status, body) = (response.status(), response.body());
    if status.is_success() {
        let parsed: TokenResponse = serde_json::from_slice(body)
            .map_err(|e| TokenError::Transient(format!("unreadable token response: {e}")))?;
        return parsed.try_into();
    }
    match serde_json::from_slice::<BasicErrorResponse>(body) {
        Ok(err) => Err(classify(RequestTokenError::ServerResponse(err))),
        Err(_) => Err(TokenError::NeedsAuthorization(format!(
            "token endpoint answered HTTP {}",
            status.as_u16()
        ))),
    }
}

/// Sorts a token endpoint failure: network trouble, timeouts, 408, 429,
/// 5xx and unreadable answers are transient; a refusal is permanent.
pub fn classify(err: RequestTokenError<HttpError, BasicErrorResponse>) -> TokenError {
    match err {
        RequestTokenError::ServerResponse(response) => {
            let code = response.error();
            let description = response.error_description().map(String::as_str);
            let message =
                super::explain::explain(code.as_ref(), description).unwrap_or_else(|| {
                    match description {
                        Some(d) => format!("{code}: {d}"),
                        None => code.to_string(),
                    }
                });
            match code {
                BasicErrorResponseType::Extension(e)
                    if e == "temporarily_unavailable" || e == "server_error" =>
                {
                    TokenError::Transient(message)
                }
                _ => TokenError::NeedsAuthorization(message),
            }
        }
        RequestTokenError::Request(e) => TokenError::Transient(e.to_string()),
        RequestTokenError::Parse(e, _) => {
            TokenError::Transient(format!("unreadable token response: {e}"))
        }
        RequestTokenError::Other(e) => TokenError::Transient(e),
    }
}

/// A started authorization-code flow: send the admin to `url`, keep the
/// rest to finish it.
pub struct Authorization {
    pub url: Url,
    pub state: Secret<String>,
    pub verifier: Secret<String>,
}

/// The authorization URL, with PKCE (S256) and state. Google gets
/// `access_type=offline` and `prompt=consent`, without which it returns no
/// refresh token on a repeated authorization.
pub fn authorization(
    integration: &Integration,
    redirect: &Url,
    login_hint: Option<&str>,
) -> Result<Authorization, TokenError> {
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let client =
        client(integration, true).set_redirect_uri(RedirectUrl::from_url(redirect.clone()));
    let mut request = client
        .authorize_url(CsrfToken::new_random)
        .map_err(|e| TokenError::NeedsAuthorization(e.to_string()))?
        .add_scopes(scopes(integration))
        .set_pkce_challenge(challenge);
    if integration.provider == Provider::Google {
        request = request
            .add_extra_param("access_type", "offline")
            .add_extra_param("prompt", "consent");
    }
    if let Some(hint) = login_hint {
        request = request.add_extra_param("login_hint", hint.to_owned());
    }
    let (url, state) = request.url();
    Ok(Authorization {
        url,
        state: Secret::new(state.secret().clone()),
        verifier: Secret::new(verifier.secret().clone()),
    })
}

/// Exchanges an authorization code (RFC 6749 §4.1.3, RFC 7636 §4.5).
///
/// # Errors
/// As for any token request.
pub async fn exchange_code(
    http: &TokenHttp,
    integration: &Integration,
    redirect: &Url,
    code: &str,
    verifier: &Secret<String>,
) -> Result<Granted, TokenError> {
    let assertion = client_assertion(integration)?;
    let client = client(integration, assertion.is_none())
        .set_redirect_uri(RedirectUrl::from_url(redirect.clone()));
    let mut request = client
        .exchange_code(AuthorizationCode::new(code.to_owned()))
        .set_pkce_verifier(PkceCodeVerifier::new(verifier.expose().clone()));
    if let Some(a) = &assertion {
        request = request
            .add_extra_param("client_assertion_type", ASSERTION_TYPE)
            .add_extra_param("client_assertion", a.clone());
    }
    request
        .request_async(http)
        .await
        .map_err(classify)?
        .try_into()
}

/// What the admin must do to finish a device authorization.
pub struct DeviceCode {
    pub verification_uri: String,
    pub user_code: String,
    details: StandardDeviceAuthorizationResponse,
}

/// Starts the device authorization grant (RFC 8628 §3.1).
///
/// # Errors
/// When the integration has no device endpoint, or the request fails.
pub async fn device_start(
    http: &TokenHttp,
    integration: &Integration,
) -> Result<DeviceCode, TokenError> {
    let client = client(integration, true);
    let details: StandardDeviceAuthorizationResponse = client
        .exchange_device_code()
        .map_err(|_| {
            TokenError::NeedsAuthorization(
                "this integration has no device_authorization_endpoint".into(),
            )
        })?
        .add_scopes(scopes(integration))
        .request_async(http)
        .await
        .map_err(device_error)?;
    Ok(DeviceCode {
        verification_uri: details.verification_uri().to_string(),
        user_code: details.user_code().secret().clone(),
        details,
    })
}

/// A device-flow failure: the provider's refusal (`access_denied`,
/// `expired_token`, ...) is permanent; everything else transient.
fn device_error<E: oauth2::ErrorResponse + std::fmt::Display>(
    e: RequestTokenError<HttpError, E>,
) -> TokenError {
    match e {
        RequestTokenError::ServerResponse(r) => TokenError::NeedsAuthorization(r.to_string()),
        RequestTokenError::Request(e) => TokenError::Transient(e.to_string()),
        RequestTokenError::Parse(e, _) => {
            TokenError::Transient(format!("unreadable response: {e}"))
        }
        RequestTokenError::Other(e) => TokenError::Transient(e),
    }
}

/// Polls the token endpoint until the admin has approved (RFC 8628 §3.4,
/// §3.5): `authorization_pending` keeps polling, `slow_down` adds 5 s,
/// `expired_token` and `access_denied` stop.
///
/// # Errors
/// When the admin refuses, the code expires, or a request fails.
pub async fn device_finish(
    http: &TokenHttp,
    integration: &Integration,
    device: &DeviceCode,
) -> Result<Granted, TokenError> {
    let client = client(integration, true);
    let response = client
        .exchange_device_access_token(&device.details)
        .request_async(http, tokio::time::sleep, None)
        .await
        .map_err(device_error)?;
    response.try_into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Granted, String> {
        let r: TokenResponse = serde_json::from_str(json).map_err(|e| e.to_string())?;
        Granted::try_from(r).map_err(|e| e.to_string())
    }

    #[test]
    fn token_responses_are_read_leniently() {
        let g = parse(r#"{"access_token":"a","token_type":"bearer","expires_in":"120"}"#).unwrap();
        assert_eq!(g.lifetime, Duration::from_secs(120));
        let g = parse(r#"{"access_token":"a","token_type":"Bearer","refresh_token":"r"}"#).unwrap();
        assert_eq!(
            g.lifetime, DEFAULT_LIFETIME,
            "a missing expires_in means an hour"
        );
        assert_eq!(g.refresh_token.unwrap().expose(), "r");
        assert_eq!(
            parse(r#"{"access_token":"a","token_type":"BEARER","expires_in":60}"#)
                .unwrap()
                .lifetime
                .as_secs(),
            60
        );
        let err = parse(r#"{"access_token":"a","token_type":"DPoP","expires_in":60}"#)
            .err()
            .unwrap();
        assert!(err.contains("DPoP") && err.contains("Bearer"), "{err}");
        assert!(parse(r#"{"token_type":"Bearer"}"#).is_err());
        let huge = parse(
            r#"{"access_token":"a","token_type":"Bearer","expires_in":18446744073709551615}"#,
        )
        .unwrap();
        assert_eq!(huge.lifetime, MAX_LIFETIME);
    }
}
