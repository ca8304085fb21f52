//! SASL codecs: PLAIN and LOGIN from clients (RFC 4616), XOAUTH2 to
//! upstreams, and the provider's XOAUTH2 error challenge.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::Credentials;
use crate::secret::Secret;

/// Why a client's SASL message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("invalid base64")]
    Base64,
    #[error("malformed PLAIN message")]
    Plain,
    #[error("authorization identity differs from the authentication identity")]
    Authzid,
}

/// Decodes one base64 line of a SASL exchange. `=` is the empty response
/// (RFC 9051 §6.2.2).
///
/// # Errors
/// [`SaslError::Base64`] when the line is not base64.
pub fn decode_base64(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    if line == b"=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(line).map_err(|_| SaslError::Base64)
}

/// Decodes a base64 PLAIN message: `[authzid] NUL authcid NUL passwd`
/// (RFC 4616 §2). The gateway logs in as `authcid`. Acting as another user
/// is not offered, so an `authzid` other than `authcid` is refused.
///
/// # Errors
/// When the base64 or the framing is wrong, or the authzid differs.
pub fn decode_plain(line: &[u8]) -> Result<Credentials, SaslError> {
    let message = decode_base64(line)?;
    let mut parts = message.splitn(3, |&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Plain);
    };
    if authcid.is_empty() || password.contains(&0) {
        return Err(SaslError::Plain);
    }
    if !authzid.is_empty() && authzid != authcid {
        return Err(SaslError::Authzid);
    }
    Ok(Credentials {
        username: username(authcid),
        password: Secret::new(password.to_vec()),
        hello: None,
    })
}

/// A username from a LOGIN step or an IMAP argument. Invalid UTF-8 is
/// replaced, not refused: such a name matches no account, and goes through
/// the same verification and delay as any wrong credentials.
pub fn username(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The base64 XOAUTH2 initial response:
/// `user=<mailbox>^Aauth=Bearer <token>^A^A`.
pub fn xoauth2(mailbox: &str, access_token: &Secret<String>) -> Secret<String> {
    let raw = format!(
        "user={mailbox}\x01auth=Bearer {}\x01\x01",
        access_token.expose()
    );
    Secret::new(STANDARD.encode(raw))
}

/// The SASL mechanism of our own login upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OAuthMechanism {
    /// Google's and Microsoft's XOAUTH2 (their only one).
    #[default]
    XOAuth2,
    /// RFC 7628, which some other servers take instead.
    OAuthBearer,
}

impl OAuthMechanism {
    /// The name on the wire: `XOAUTH2`, `OAUTHBEARER`.
    pub fn name(self) -> &'static str {
        match self {
            Self::XOAuth2 => "XOAUTH2",
            Self::OAuthBearer => "OAUTHBEARER",
        }
    }

    /// The base64 initial response for `mailbox` with `token`; `host` and
    /// `port` are the upstream's, which OAUTHBEARER carries.
    pub fn initial_response(
        self,
        mailbox: &str,
        token: &Secret<String>,
        host: &str,
        port: u16,
    ) -> Secret<String> {
        match self {
            Self::XOAuth2 => xoauth2(mailbox, token),
            Self::OAuthBearer => oauthbearer(mailbox, token, host, port),
        }
    }

    /// What a client sends after the server's error challenge, to get
    /// the final failure: an empty response for XOAUTH2, `%x01` for
    /// OAUTHBEARER (RFC 7628 §3.2.3), base64 encoded.
    pub fn error_reply(self) -> &'static [u8] {
        match self {
            Self::XOAuth2 => b"\r\n",
            Self::OAuthBearer => b"AQ==\r\n",
        }
    }
}

/// The base64 OAUTHBEARER initial response (RFC 7628 §3.1):
/// `n,a=<mailbox>,^Ahost=<host>^Aport=<port>^Aauth=Bearer <token>^A^A`.
/// A `,` or `=` in the mailbox is escaped as `=2C` / `=3D` (RFC 5801's
/// saslname).
pub fn oauthbearer(
    mailbox: &str,
    access_token: &Secret<String>,
    host: &str,
    port: u16,
) -> Secret<String> {
    let user = mailbox.replace('=', "=3D").replace(',', "=2C");
    let raw = format!(
        "n,a={user},\x01host={host}\x01port={port}\x01auth=Bearer {}\x01\x01",
        access_token.expose()
    );
    Secret::new(STANDARD.encode(raw))
}

/// The HTTP-like status in a provider's XOAUTH2 error challenge, a base64
/// JSON object such as `{"status":"401","schemes":"bearer","scope":"..."}`.
/// Google and Dovecot send the status as a string, some servers as a number,
/// and RFC 7628-style servers as `invalid_token` (which means 401).
pub fn xoauth2_error_status(challenge: &[u8]) -> Option<u16> {
    let json = STANDARD.decode(challenge.trim_ascii()).ok()?;
    let value: serde_json::Value = serde_json::from_slice(&json).ok()?;
    match value.get("status")? {
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        serde_json::Value::String(s) if s == "invalid_token" => Some(401),
        serde_json::Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// A SASL mechanism a client may use to log in to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616.
    Plain,
    /// The customary LOGIN mechanism (draft-murchison-sasl-login).
    Login,
}

impl Mechanism {
    /// The mechanism named `name` (case-insensitive), if we offer it.
    pub fn from_name(name: &[u8]) -> Option<Self> {
        if name.eq_ignore_ascii_case(b"PLAIN") {
            Some(Self::Plain)
        } else if name.eq_ignore_ascii_case(b"LOGIN") {
            Some(Self::Login)
        } else {
            None
        }
    }
}

/// base64 of `Username:` and `Password:`, the customary LOGIN prompts.
const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

/// One client SASL exchange, the same in IMAP `AUTHENTICATE` and POP3 `AUTH`.
#[derive(Debug)]
pub struct Exchange {
    step: ExchangeStep,
}

#[derive(Debug)]
enum ExchangeStep {
    Plain,
    LoginUsername,
    LoginPassword { username: String },
}

/// What an exchange wants next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this base64 challenge and read another response line.
    Challenge(&'static str),
    /// The exchange is complete.
    Done(Credentials),
}

/// Why an exchange ended without credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeError {
    /// The client answered `*` (RFC 4422 §3.5).
    #[error("authentication cancelled")]
    Cancelled,
    #[error("invalid SASL response: {0}")]
    Malformed(#[from] SaslError),
}

impl Exchange {
    /// Starts `mechanism`. Send [`Exchange::first_challenge`] unless the
    /// client gave an initial response; feed that to [`Exchange::respond`].
    pub fn new(mechanism: Mechanism) -> Self {
        let step = match mechanism {
            Mechanism::Plain => ExchangeStep::Plain,
            Mechanism::Login => ExchangeStep::LoginUsername,
        };
        Self { step }
    }

    /// The challenge that opens the exchange (empty for PLAIN).
    pub fn first_challenge(&self) -> &'static str {
        match self.step {
            ExchangeStep::LoginUsername => LOGIN_USERNAME_PROMPT,
            _ => "",
        }
    }

    /// One client response line, without its line ending.
    ///
    /// # Errors
    /// `*` cancels; a malformed response ends the exchange.
    pub fn respond(&mut self, line: &[u8]) -> Result<Step, ExchangeError> {
        if line == b"*" {
            return Err(ExchangeError::Cancelled);
        }
        match std::mem::replace(&mut self.step, ExchangeStep::Plain) {
            ExchangeStep::Plain => Ok(Step::Done(decode_plain(line)?)),
            ExchangeStep::LoginUsername => {
                let username = username(&decode_base64(line)?);
                self.step = ExchangeStep::LoginPassword { username };
                Ok(Step::Challenge(LOGIN_PASSWORD_PROMPT))
            }
            ExchangeStep::LoginPassword { username } => Ok(Step::Done(Credentials {
                username,
                password: Secret::new(decode_base64(line)?),
                hello: None,
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &[u8]) -> Vec<u8> {
        STANDARD.encode(s).into_bytes()
    }

    #[test]
    fn plain_uses_authcid_and_keeps_password_bytes() {
        let c = decode_plain(&b64(b"alice\0alice\0p\xc3\xa4ss word")).unwrap();
        assert_eq!(c.username, "alice");
        assert_eq!(c.password.expose(), b"p\xc3\xa4ss word");
        let c = decode_plain(&b64(b"\0bob\0x")).unwrap();
        assert_eq!(c.username, "bob");
    }

    #[test]
    fn plain_rejects_malformed_messages() {
        assert_eq!(decode_plain(b"!!!"), Err(SaslError::Base64));
        assert_eq!(decode_plain(&b64(b"alice\0pw")), Err(SaslError::Plain));
        assert_eq!(decode_plain(&b64(b"\0\0pw")), Err(SaslError::Plain));
        assert_eq!(decode_plain(&b64(b"\0a\0p\0w")), Err(SaslError::Plain));
        assert_eq!(
            decode_plain(&b64(b"admin\0alice\0pw")),
            Err(SaslError::Authzid)
        );
        assert_eq!(
            decode_plain(&b64(b"\0\xff\0pw")).unwrap().username,
            "\u{fffd}"
        );
        assert_eq!(decode_plain(b"="), Err(SaslError::Plain));
    }

    #[test]
    fn login_exchange_prompts_for_username_then_password() {
        let mut ex = Exchange::new(Mechanism::Login);
        assert_eq!(ex.first_challenge(), "VXNlcm5hbWU6");
        assert_eq!(ex.respond(b"YWxpY2U="), Ok(Step::Challenge("UGFzc3dvcmQ6")));
        let Ok(Step::Done(c)) = ex.respond(b"c2VjcmV0") else {
            panic!("not done")
        };
        assert_eq!(
            (c.username.as_str(), c.password.expose().as_slice()),
            ("alice", &b"secret"[..])
        );
        let mut ex = Exchange::new(Mechanism::Plain);
        assert_eq!(ex.first_challenge(), "");
        assert_eq!(ex.respond(b"*"), Err(ExchangeError::Cancelled));
        assert_eq!(Mechanism::from_name(b"plain"), Some(Mechanism::Plain));
        assert_eq!(Mechanism::from_name(b"CRAM-MD5"), None);
    }

    #[test]
    fn oauthbearer_encodes_rfc_7628_with_an_escaped_authzid() {
        let token = Secret::new("tok".to_owned());
        let encoded = oauthbearer("a,b=c@example.com", &token, "imap.example.com", 993);
        let raw = STANDARD.decode(encoded.expose()).unwrap();
        assert_eq!(
            raw,
            b"n,a=a=2Cb=3Dc@example.com,\x01host=imap.example.com\x01port=993\x01auth=Bearer tok\x01\x01"
        );
        assert_eq!(OAuthMechanism::OAuthBearer.error_reply(), b"AQ==\r\n");
        assert_eq!(STANDARD.decode("AQ==").unwrap(), b"\x01");
    }

    #[test]
    fn xoauth2_encodes_the_documented_format() {
        let r = xoauth2(
            "someuser@example.com",
            &Secret::new("ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg".into()),
        );
        // The example from Google's XOAUTH2 protocol documentation.
        assert_eq!(
            r.expose(),
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }

    #[test]
    fn xoauth2_error_status_known_answers() {
        let cases: [(&str, Option<u16>); 6] = [
            (
                r#"{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}"#,
                Some(401),
            ),
            (r#"{"status":400}"#, Some(400)),
            (
                r#"{"status":"invalid_token","schemes":"bearer"}"#,
                Some(401),
            ),
            (r#"{"status":"500"}"#, Some(500)),
            (r#"{"schemes":"bearer"}"#, None),
            ("not json", None),
        ];
        for (json, want) in cases {
            assert_eq!(xoauth2_error_status(&b64(json.as_bytes())), want, "{json}");
        }
        assert_eq!(xoauth2_error_status(b"%%%"), None);
    }
}
