//! The provider catalogue: Google's and Microsoft's documented OAuth
//! endpoints and mail scopes. Each protocol's mail hosts come from its
//! descriptor ([`crate::proto::Descriptor::default_upstream`]).

use super::{Cloud, Provider};
use crate::proto::KnownProvider;
use crate::protocol::Protocol;

/// A provider's documented endpoints and mail scopes, and which mail
/// service it is.
pub(super) struct ProviderDefaults {
    pub authorization: String,
    pub token: String,
    pub device: Option<String>,
    pub scopes: Vec<String>,
    pub mail: KnownProvider,
}

/// Google's and Microsoft's documented defaults; `None` for custom.
pub(super) fn provider_defaults(
    provider: Provider,
    tenant: &str,
    cloud: Cloud,
) -> Option<ProviderDefaults> {
    match provider {
        Provider::Google => Some(ProviderDefaults {
            authorization: "https://accounts.google.com/o/oauth2/auth".into(),
            token: "https://oauth2.googleapis.com/token".into(),
            // Google's device flow doesn't offer the mail scope.
            device: None,
            scopes: vec!["https://mail.google.com/".into()],
            mail: KnownProvider::Google,
        }),
        Provider::Microsoft => {
            let (login, scope_host, mail) = match cloud {
                Cloud::Global => (
                    "login.microsoftonline.com",
                    "outlook.office.com",
                    KnownProvider::Microsoft,
                ),
                Cloud::Usgov => (
                    "login.microsoftonline.us",
                    "outlook.office365.us",
                    KnownProvider::MicrosoftUsgov,
                ),
                Cloud::China => (
                    "login.partner.microsoftonline.cn",
                    "partner.outlook.cn",
                    KnownProvider::MicrosoftChina,
                ),
            };
            // One delegated permission per protocol, then a refresh token.
            let mut scopes: Vec<String> = Protocol::all()
                .map(|p| format!("https://{scope_host}/{}", p.microsoft_scope))
                .collect();
            scopes.push("offline_access".into());
            let base = format!("https://{login}/{tenant}/oauth2/v2.0");
            Some(ProviderDefaults {
                authorization: format!("{base}/authorize"),
                token: format!("{base}/token"),
                device: Some(format!("{base}/devicecode")),
                scopes,
                mail,
            })
        }
        Provider::Custom => None,
    }
}
