//! Our own login at an SMTP upstream: greeting, `EHLO`, `STARTTLS` and
//! `EHLO` again (submission on 587) or implicit TLS (465), then `AUTH
//! XOAUTH2` (or `OAUTHBEARER`), with the provider's error challenge.

use bytes::{Bytes, BytesMut};

use super::parse::{self, ReplyLine};
use crate::proto::machine::{self, Machine, Stepped};
use crate::proto::sasl::{self, OAuthMechanism};
use crate::proto::{
    LoginRequest, UpstreamAction, UpstreamFailure, UpstreamLogin, UpstreamTls, UPSTREAM_LIMITS,
};
use crate::secret::Secret;

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets, CRLF
/// included. A longer `AUTH` with its initial response goes in two steps,
/// as Microsoft documents it anyway for its long tokens.
const MAX_COMMAND_LINE: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    /// `EHLO` sent; `after_tls` once it is the second one.
    Ehlo {
        after_tls: bool,
    },
    StartTls,
    StartingTls,
    /// `AUTH` sent. `responded`: our response went out. `challenged`: the
    /// provider's error challenge came (with its status, if any).
    Auth {
        responded: bool,
        challenged: Option<Option<u16>>,
    },
    Done,
}

/// Logs in at an SMTP upstream. Fed upstream bytes, yields
/// [`UpstreamAction`]s until `LoggedIn` or `Failed`.
#[derive(Debug)]
pub struct Upstream {
    state: State,
    tls: UpstreamTls,
    mechanism: OAuthMechanism,
    response: Secret<String>,
    /// The name we greet the upstream with.
    hello: String,
    /// The keyword lines of the last `EHLO` reply.
    capabilities: Vec<String>,
    /// The lines of the reply being read, for a multi-line one.
    reply: Vec<String>,
    machine: Machine<UpstreamAction>,
}

impl Upstream {
    /// The login `request` asks for. The client's `EHLO` name is passed on
    /// when it is a usable name, else the gateway's own.
    pub fn with(request: &LoginRequest<'_>) -> Self {
        let hello = request
            .client_hello
            .filter(|h| parse::is_hello_name(h))
            .or(Some(request.gateway_host).filter(|h| parse::is_hello_name(h)))
            .unwrap_or("localhost")
            .to_owned();
        Self {
            state: State::Greeting,
            tls: request.tls,
            mechanism: request.mechanism,
            response: request.mechanism.initial_response(
                request.mailbox,
                request.token,
                request.host,
                request.port,
            ),
            hello,
            capabilities: Vec::new(),
            reply: Vec::new(),
            machine: Machine::new(UPSTREAM_LIMITS),
        }
    }

    /// An XOAUTH2 login as `mailbox` with `access_token`, greeting as
    /// `hello`.
    pub fn new(
        mailbox: &str,
        access_token: &Secret<String>,
        tls: UpstreamTls,
        hello: &str,
    ) -> Self {
        Self::with(&LoginRequest {
            client_hello: Some(hello),
            ..LoginRequest::xoauth2(mailbox, access_token, tls)
        })
    }

    fn send(&mut self, bytes: Bytes) {
        self.machine.push(UpstreamAction::Send(bytes));
    }

    fn finish(&mut self, action: UpstreamAction) {
        self.machine.stop(action);
        self.state = State::Done;
    }

    fn fail(&mut self, failure: UpstreamFailure) {
        self.finish(UpstreamAction::Failed(failure));
    }

    fn protocol(&mut self, why: String) {
        self.fail(UpstreamFailure::Protocol(why));
    }

    fn ehlo(&mut self, after_tls: bool) {
        self.capabilities.clear();
        self.send(Bytes::from(format!("EHLO {}\r\n", self.hello)));
        self.state = State::Ehlo { after_tls };
    }

    fn line(&mut self, bytes: &[u8]) {
        let Ok(ReplyLine { code, last, text }) = parse::reply_line(bytes) else {
            return self.protocol("upstream sent a line that is not an SMTP reply".into());
        };
        self.reply.push(String::from_utf8_lossy(text).into_owned());
        if !last {
            return;
        }
        let lines = std::mem::take(&mut self.reply);
        self.reply_complete(code, lines);
    }

    /// The upstream's whole reply: `code` and its text lines.
    fn reply_complete(&mut self, code: u16, lines: Vec<String>) {
        let text = lines.join(" ");
        let said = |what: &str| format!("upstream answered {code} {text} to {what}");
        if code == 421 {
            return self.fail(UpstreamFailure::Unavailable(said("us")));
        }
        match self.state {
            State::Greeting if code == 220 => self.ehlo(false),
            State::Greeting if (400..500).contains(&code) || code == 554 => {
                self.fail(UpstreamFailure::Unavailable(said("the connection")));
            }
            State::Ehlo { after_tls } if code == 250 => {
                // The first line names the server; the rest are keywords.
                self.capabilities = lines.into_iter().skip(1).collect();
                if self.tls == UpstreamTls::StartTls && !after_tls {
                    self.send(Bytes::from_static(b"STARTTLS\r\n"));
                    self.state = State::StartTls;
                } else {
                    self.authenticate();
                }
            }
            State::StartTls if code == 220 => {
                if self.machine.has_input() {
                    // Plaintext after the 220 would be read as if it came
                    // over TLS (RFC 3207 §6).
                    return self.protocol("upstream sent data after STARTTLS".into());
                }
                self.machine.push(UpstreamAction::StartTls);
                self.state = State::StartingTls;
            }
            State::Auth {
                responded,
                challenged,
            } => self.auth_reply(code, &text, responded, challenged),
            State::Greeting => self.protocol(said("the connection")),
            State::Ehlo { .. } => self.protocol(said("EHLO")),
            State::StartTls => self.protocol(said("STARTTLS")),
            State::StartingTls | State::Done => {}
        }
    }

    fn auth_reply(
        &mut self,
        code: u16,
        text: &str,
        responded: bool,
        challenged: Option<Option<u16>>,
    ) {
        let said = || {
            format!(
                "upstream answered {code} {text} to AUTH {}",
                self.mechanism.name()
            )
        };
        match code {
            235 => {
                let to_client = self.machine.take_input();
                let capabilities = std::mem::take(&mut self.capabilities);
                self.finish(UpstreamAction::LoggedIn {
                    capabilities,
                    to_client,
                });
            }
            334 if !responded => {
                let mut line = BytesMut::from(self.response.expose().as_bytes());
                line.extend_from_slice(b"\r\n");
                self.send(line.freeze());
                self.state = State::Auth {
                    responded: true,
                    challenged,
                };
            }
            334 if challenged.is_none() => {
                // The provider's error challenge: answer it to get the
                // final reply (Google's XOAUTH2, RFC 7628 §3.2.3).
                let status = sasl::xoauth2_error_status(text.as_bytes());
                self.send(Bytes::from_static(self.mechanism.error_reply()));
                self.state = State::Auth {
                    responded,
                    challenged: Some(status),
                };
            }
            // Microsoft: SMTP AUTH is switched off for the mailbox or the
            // tenant. Only its administrator can change that.
            535 if text.contains("5.7.139") => self.fail(UpstreamFailure::Disabled(format!(
                "SMTP AUTH is disabled for this mailbox or tenant ({code} {text}); enable it with \
                 `Set-CASMailbox -Identity MAILBOX -SmtpClientAuthenticationDisabled $false`"
            ))),
            535 => self.fail(UpstreamFailure::Rejected {
                status: challenged.flatten(),
                in_use: false,
            }),
            400..=499 => self.fail(UpstreamFailure::Unavailable(said())),
            _ => self.protocol(said()),
        }
    }

    /// `AUTH <mechanism> <response>` when the line fits, else `AUTH
    /// <mechanism>` and the response after the `334`.
    fn authenticate(&mut self) {
        let name = self.mechanism.name();
        let inline = format!("AUTH {name} {}\r\n", self.response.expose());
        let responded = inline.len() <= MAX_COMMAND_LINE;
        if responded {
            self.send(Bytes::from(inline));
        } else {
            self.send(Bytes::from(format!("AUTH {name}\r\n")));
        }
        self.state = State::Auth {
            responded,
            challenged: None,
        };
    }
}

impl Stepped for Upstream {
    type Action = UpstreamAction;

    fn machine(&mut self) -> &mut Machine<UpstreamAction> {
        &mut self.machine
    }

    fn step(&mut self) -> bool {
        let waits = matches!(self.state, State::Done | State::StartingTls);
        machine::step_upstream(self, waits, Self::line, |s| {
            s.protocol("upstream sent an overlong line".into())
        })
    }
}

impl UpstreamLogin for Upstream {
    fn feed(&mut self, bytes: &[u8]) {
        match self.state {
            State::Done => {}
            State::StartingTls if !bytes.is_empty() => {
                self.protocol("upstream sent data after STARTTLS".into());
            }
            _ => self.machine.feed(bytes),
        }
    }

    fn next_action(&mut self) -> Option<UpstreamAction> {
        machine::next_action(self)
    }

    fn tls_established(&mut self) {
        if self.state == State::StartingTls {
            // The EHLO must be repeated after STARTTLS (RFC 3207 §4.2).
            self.ehlo(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(up: &mut Upstream) -> Vec<UpstreamAction> {
        std::iter::from_fn(|| up.next_action()).collect()
    }

    #[test]
    fn a_long_token_goes_in_two_steps_and_never_shows_in_debug() {
        let token = Secret::new("t".repeat(2000));
        let mut up = Upstream::new("a@b", &token, UpstreamTls::Implicit, "client.example");
        up.feed(b"220 mx ESMTP\r\n250-mx\r\n250 AUTH XOAUTH2\r\n");
        let actions = drain(&mut up);
        assert_eq!(
            actions.last(),
            Some(&UpstreamAction::Send(Bytes::from_static(
                b"AUTH XOAUTH2\r\n"
            )))
        );
        assert!(!format!("{up:?} {actions:?}").contains(&"t".repeat(50)));
        up.feed(b"334 \r\n");
        let actions = drain(&mut up);
        assert!(matches!(&actions[..], [UpstreamAction::Send(b)] if b.len() > 2000));
        up.feed(b"235 2.7.0 Accepted\r\n");
        assert!(matches!(
            drain(&mut up).last(),
            Some(UpstreamAction::LoggedIn { capabilities, .. }) if capabilities == &["AUTH XOAUTH2".to_owned()]
        ));
    }

    #[test]
    fn microsoft_s_disabled_smtp_auth_names_the_fix() {
        let token = Secret::new("tok".to_owned());
        let mut up = Upstream::new("a@b", &token, UpstreamTls::Implicit, "[bad name");
        up.feed(b"220 mx\r\n");
        assert_eq!(
            drain(&mut up),
            [UpstreamAction::Send(Bytes::from_static(
                b"EHLO localhost\r\n"
            ))],
            "an unusable client name is replaced"
        );
        up.feed(b"250 mx\r\n535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox.\r\n");
        let last = drain(&mut up).pop();
        assert!(
            matches!(&last, Some(UpstreamAction::Failed(UpstreamFailure::Disabled(why))) if why.contains("Set-CASMailbox")),
            "{last:?}"
        );
    }
}
