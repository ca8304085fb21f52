//! Provider error codes in plain words: what happened, and the fix. The
//! token endpoint's answer (`error`, `error_description`) is matched
//! against the codes that Microsoft's identity platform (AADSTS numbers,
//! from its published error reference) and Google's OAuth 2.0 server
//! document; the result reads "what happened (code). Fix: ...", and the
//! provider's own words stay beside it for support cases.

/// A code we can explain.
struct Known {
    /// An `AADSTS` number, or Google's `error` value.
    code: &'static str,
    /// Only when the description holds this too (Google reuses
    /// `invalid_grant` for several causes).
    description_has: Option<&'static str>,
    what: &'static str,
    fix: &'static str,
}

const AUTHORIZE_AGAIN: &str = "authorize the account again (`mailgate authorize ACCOUNT`, or Authorize on the integrations page)";

const MICROSOFT: &[Known] = &[
    Known {
        code: "AADSTS700082",
        description_has: None,
        what: "the refresh token expired after 90 days without use (mailgate was stopped, or the account unused, that long)",
        fix: AUTHORIZE_AGAIN,
    },
    Known {
        code: "AADSTS50173",
        description_has: None,
        what: "the grant was revoked, usually by a password change or reset, or an admin revoking the user's sessions",
        fix: AUTHORIZE_AGAIN,
    },
    Known {
        code: "AADSTS70043",
        description_has: None,
        what: "a Conditional Access sign-in frequency policy ended the session (the refresh token is too old for the policy)",
        fix: "exclude this app or account from the sign-in frequency policy, or use the app-only grant (client_credentials); then authorize again",
    },
    Known {
        code: "AADSTS70008",
        description_has: None,
        what: "the refresh token or authorization code expired, or was revoked",
        fix: AUTHORIZE_AGAIN,
    },
    Known {
        code: "AADSTS7000222",
        description_has: None,
        what: "the integration's client secret has expired",
        fix: "create a new client secret for the app registration in Entra ID (Certificates & secrets), put its Value in client_secret (or client_secret_file), and reload mailgate",
    },
    Known {
        code: "AADSTS7000215",
        description_has: None,
        what: "the client secret is wrong (often the secret's ID was copied instead of its Value)",
        fix: "copy the secret's Value from Entra ID (Certificates & secrets) into client_secret, and reload mailgate",
    },
    Known {
        code: "AADSTS54005",
        description_has: None,
        what: "the authorization code was already redeemed (a redirect URL pasted twice, or a browser reload of the callback)",
        fix: "start the authorization again; each redirect URL works once",
    },
    Known {
        code: "AADSTS65001",
        description_has: None,
        what: "the user or an administrator has not consented to the app's permissions",
        fix: "grant admin consent for the app registration's API permissions in Entra ID, then authorize again",
    },
    Known {
        code: "AADSTS700016",
        description_has: None,
        what: "no app with this client ID exists in the tenant",
        fix: "check client_id and the tenant in the integration's endpoints (a multitenant app needs the `organizations` or the right tenant ID)",
    },
    Known {
        code: "AADSTS90002",
        description_has: None,
        what: "the tenant in the endpoint URL doesn't exist",
        fix: "check the tenant ID or domain in the integration's endpoints",
    },
    Known {
        code: "AADSTS50076",
        description_has: None,
        what: "multi-factor authentication is required by Conditional Access for this sign-in",
        fix: "authorize again interactively (the browser will ask for MFA), or exclude the account from the policy",
    },
    Known {
        code: "AADSTS53003",
        description_has: None,
        what: "a Conditional Access policy blocked the sign-in",
        fix: "check the sign-in logs in Entra ID for the policy, and exclude this app or the gateway's network from it",
    },
    Known {
        code: "AADSTS50057",
        description_has: None,
        what: "the user account is disabled",
        fix: "enable the account in Entra ID, or configure the mailbox of another account",
    },
    Known {
        code: "AADSTS700024",
        description_has: None,
        what: "the client assertion (certificate credential) is not valid: its time is off, or it expired",
        fix: "check the gateway's clock (NTP) and the certificate's dates",
    },
    Known {
        code: "AADSTS700027",
        description_has: None,
        what: "the client assertion's signature doesn't verify: the certificate isn't the one uploaded to the app registration",
        fix: "upload client_certificate_file's certificate to the app registration (Certificates & secrets)",
    },
];

const GOOGLE: &[Known] = &[
    Known {
        code: "invalid_grant",
        description_has: Some("Token has been expired or revoked"),
        what: "Google expired or revoked the refresh token: an app whose OAuth consent screen is in Testing gets tokens that last 7 days; otherwise the user revoked access, changed the password, or the token was unused for 6 months",
        fix: "publish the app (OAuth consent screen: In production) if it is in Testing, then authorize the account again",
    },
    Known {
        code: "admin_policy_enforced",
        description_has: None,
        what: "the Google Workspace administrator's API access policy blocks this app",
        fix: "in the Admin console (Security > API controls), trust the app's client ID or allow its scopes",
    },
    Known {
        code: "org_internal",
        description_has: None,
        what: "the app is limited to its own Google Workspace organization, and this account is outside it",
        fix: "use an account of that organization, or make the app External on its OAuth consent screen",
    },
    Known {
        code: "disabled_client",
        description_has: None,
        what: "the OAuth client is disabled in the Google Cloud project",
        fix: "enable the OAuth client (APIs & Services > Credentials), or create a new one",
    },
    Known {
        code: "unauthorized_client",
        description_has: None,
        what: "the client may not use this grant: for a service account, domain-wide delegation of the mail scope is missing",
        fix: "in the Admin console (Security > API controls > Domain-wide delegation), add the service account's client ID with https://mail.google.com/",
    },
];

/// The provider's refusal in plain words, with the raw answer beside it:
/// `what (code). Fix: fix. The provider said: raw`. `None` for a code we
/// don't know (the raw answer is shown as it is).
pub fn explain(error: &str, description: Option<&str>) -> Option<String> {
    let description = description.unwrap_or("");
    let raw = if description.is_empty() {
        error.to_owned()
    } else {
        format!("{error}: {}", first_line(description))
    };
    let known = aadsts(description)
        .and_then(|code| MICROSOFT.iter().find(|k| k.code == code))
        .or_else(|| {
            GOOGLE.iter().find(|k| {
                k.code == error && k.description_has.is_none_or(|d| description.contains(d))
            })
        })?;
    Some(format!(
        "{} ({}). Fix: {}. The provider said: {raw}",
        known.what, known.code, known.fix
    ))
}

/// The `AADSTS` code at the start of a Microsoft error description.
fn aadsts(description: &str) -> Option<&str> {
    let at = description.find("AADSTS")?;
    let digits = description[at + 6..]
        .bytes()
        .take_while(u8::is_ascii_digit)
        .count();
    (digits > 0).then(|| &description[at..at + 6 + digits])
}

/// Microsoft's descriptions go on with trace and correlation IDs on
/// further lines; the first line is the message.
fn first_line(description: &str) -> &str {
    description
        .split(['\r', '\n'])
        .next()
        .unwrap_or(description)
        .trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bodies as the providers document and send them.
    #[test]
    fn microsoft_codes_from_their_error_bodies() {
        let cases = [
            (
                "invalid_grant",
                "AADSTS700082: The refresh token has expired due to inactivity. The token was issued on 2026-08-01T10:00:00.0000000Z and was inactive for 90.00:00:00.\r\nTrace ID: 0f4e9d2c-1111-4b5e-9c6a-2a3b4c5d6e7f\r\nCorrelation ID: 6a1b2c3d-2222-4e5f-8a9b-0c1d2e3f4a5b\r\nTimestamp: 2026-11-30 10:00:00Z",
                "90 days without use",
            ),
            (
                "invalid_grant",
                "AADSTS50173: The provided grant has expired due to it being revoked, a fresh auth token is needed. The user might have changed or reset their password.\r\nTrace ID: x",
                "password change",
            ),
            (
                "invalid_grant",
                "AADSTS70043: The refresh token has expired or is invalid due to sign-in frequency checks by conditional access.",
                "sign-in frequency",
            ),
            (
                "invalid_client",
                "AADSTS7000222: The provided client secret keys for app '2f3a' are expired. Visit the Azure portal to create new keys for your app.",
                "client secret has expired",
            ),
            (
                "invalid_client",
                "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
                "secret's ID was copied",
            ),
            (
                "invalid_grant",
                "AADSTS54005: OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.",
                "already redeemed",
            ),
            (
                "invalid_grant",
                "AADSTS65001: The user or administrator has not consented to use the application with ID '2f3a'.",
                "consented",
            ),
        ];
        for (error, description, words) in cases {
            let text = explain(error, Some(description)).unwrap();
            assert!(text.contains(words), "{text}");
            // The raw code and the provider's first line stay beside it;
            // trace IDs don't.
            let code = aadsts(description).unwrap();
            assert!(text.contains(&format!("({code})")), "{text}");
            assert!(text.contains(first_line(description)), "{text}");
            assert!(!text.contains("Trace ID"), "{text}");
            assert!(text.contains("Fix: "), "{text}");
        }
    }

    #[test]
    fn google_codes_from_their_error_bodies() {
        let text = explain("invalid_grant", Some("Token has been expired or revoked.")).unwrap();
        assert!(
            text.contains("Testing") && text.contains("7 days"),
            "{text}"
        );
        assert!(text.contains("(invalid_grant)"), "{text}");
        assert!(
            text.ends_with("invalid_grant: Token has been expired or revoked."),
            "{text}"
        );
        let text = explain("admin_policy_enforced", None).unwrap();
        assert!(text.contains("API controls"), "{text}");
        // invalid_grant for another cause is not explained as the 7 days.
        assert!(explain("invalid_grant", Some("Bad Request")).is_none());
    }

    #[test]
    fn unknown_codes_are_left_alone() {
        assert!(explain("invalid_grant", Some("AADSTS99999999: something new")).is_none());
        assert!(explain("invalid_request", None).is_none());
        assert_eq!(aadsts("AADSTS"), None);
        assert_eq!(aadsts("x AADSTS50173: y"), Some("AADSTS50173"));
    }
}
