//! Our own login at the upstream: greeting, optional STARTTLS, CAPABILITY,
//! `AUTHENTICATE XOAUTH2`, and the provider's error challenge.

use bytes::{Bytes, BytesMut};

use super::capability;
use super::parse::{self, Code, Response, Status};
use crate::proto::machine::{self, Machine, Stepped};
use crate::proto::sasl::{self, OAuthMechanism};
use crate::proto::{
    LoginRequest, UpstreamAction, UpstreamFailure, UpstreamLogin, UpstreamTls, UPSTREAM_LIMITS,
};
use crate::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    StartTls,
    StartingTls,
    Capability,
    /// `AUTHENTICATE XOAUTH2` sent. `responded`: our base64 went out.
    /// `challenge`: the provider's error challenge, once seen.
    Authenticate {
        responded: bool,
        challenge: Option<Option<u16>>,
    },
    PostLoginCapability,
    Done,
}

/// Logs in at an IMAP upstream with XOAUTH2. Fed upstream bytes, yields
/// [`UpstreamAction`]s until `LoggedIn` or `Failed`.
#[derive(Debug)]
pub struct Upstream {
    state: State,
    tls: UpstreamTls,
    mechanism: OAuthMechanism,
    response: Secret<String>,
    capabilities: Vec<String>,
    /// `capabilities` came after our AUTHENTICATE: it is the post-login list.
    fresh_capabilities: bool,
    machine: Machine<UpstreamAction>,
}

impl Upstream {
    /// An XOAUTH2 login as `mailbox` with `access_token`.
    pub fn new(mailbox: &str, access_token: &Secret<String>, tls: UpstreamTls) -> Self {
        Self::with(&LoginRequest::xoauth2(mailbox, access_token, tls))
    }

    /// The login `request` asks for.
    pub fn with(request: &LoginRequest<'_>) -> Self {
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
            capabilities: Vec::new(),
            fresh_capabilities: false,
            machine: Machine::new(UPSTREAM_LIMITS),
        }
    }

    fn send(&mut self, bytes: Bytes) {
        self.machine.push(UpstreamAction::Send(bytes));
    }

    fn fail(&mut self, why: &str) {
        self.finish(UpstreamAction::Failed(UpstreamFailure::Protocol(
            why.to_owned(),
        )));
    }

    fn finish(&mut self, action: UpstreamAction) {
        self.machine.stop(action);
        self.state = State::Done;
    }

    fn line(&mut self, line: &[u8]) {
        let response = match parse::response(line) {
            Ok(r) => r,
            // Untagged data we don't need (ID answers, odd servers) is not
            // a reason to fail a login.
            Err(_) if line.starts_with(b"* ") => return,
            Err(_) => return self.fail("upstream sent an unparseable response"),
        };
        match (self.state, response) {
            (_, Response::Untagged { status, .. }) if status.eq_ignore_ascii_case(b"BYE") => {
                self.fail("upstream closed the connection (BYE)");
            }
            (State::Greeting, Response::Untagged { status, code }) => {
                if !status.eq_ignore_ascii_case(b"OK") {
                    return self.fail("upstream greeting is not OK");
                }
                if let Some(Code::Capabilities(caps)) = code {
                    self.capabilities = caps.iter().map(|c| (*c).to_owned()).collect();
                }
                if self.tls == UpstreamTls::StartTls {
                    self.send(Bytes::from_static(b"m1 STARTTLS\r\n"));
                    self.state = State::StartTls;
                } else if self.capabilities.is_empty() {
                    self.send(Bytes::from_static(b"m2 CAPABILITY\r\n"));
                    self.state = State::Capability;
                } else {
                    self.authenticate();
                }
            }
            (
                State::StartTls,
                Response::Tagged {
                    tag: "m1", status, ..
                },
            ) => {
                if status != Status::Ok {
                    return self.fail("upstream refused STARTTLS");
                }
                if self.machine.has_input() {
                    // Anything after the OK and before the handshake would be
                    // injected plaintext (RFC 2595 §3.1).
                    return self.fail("upstream sent data after STARTTLS");
                }
                self.machine.push(UpstreamAction::StartTls);
                self.state = State::StartingTls;
            }
            (
                State::Capability | State::PostLoginCapability | State::Authenticate { .. },
                Response::Capabilities(caps),
            ) => {
                self.capabilities = caps.iter().map(|c| (*c).to_owned()).collect();
                // Gmail sends the post-login list untagged before the OK.
                self.fresh_capabilities = !matches!(self.state, State::Capability);
            }
            (
                State::Capability,
                Response::Tagged {
                    tag: "m2", status, ..
                },
            ) => {
                if status != Status::Ok {
                    return self.fail("upstream refused CAPABILITY");
                }
                self.authenticate();
            }
            (
                State::Authenticate {
                    responded,
                    challenge,
                },
                Response::Continue(text),
            ) => {
                if !responded {
                    let mut bytes = BytesMut::from(self.response.expose().as_bytes());
                    bytes.extend_from_slice(b"\r\n");
                    self.send(bytes.freeze());
                    self.state = State::Authenticate {
                        responded: true,
                        challenge,
                    };
                } else {
                    // The provider's error challenge. Answer with an empty
                    // line to get the tagged NO (Google's XOAUTH2 protocol).
                    let status = sasl::xoauth2_error_status(text);
                    self.send(Bytes::from_static(self.mechanism.error_reply()));
                    self.state = State::Authenticate {
                        responded,
                        challenge: Some(status),
                    };
                }
            }
            (
                State::Authenticate { challenge, .. },
                Response::Tagged {
                    tag: "m3",
                    status,
                    code,
                    ..
                },
            ) => {
                let code_is = |name: &[u8]| matches!(code, Some(Code::Other(c)) if c.eq_ignore_ascii_case(name));
                let failure = match status {
                    Status::Ok => None,
                    Status::Bad => Some(UpstreamFailure::Protocol(
                        "upstream answered BAD to AUTHENTICATE".into(),
                    )),
                    // RFC 5530: the server, not the credentials, is the problem.
                    Status::No if code_is(b"UNAVAILABLE") => Some(UpstreamFailure::Unavailable(
                        "upstream answered NO [UNAVAILABLE]".into(),
                    )),
                    Status::No => Some(UpstreamFailure::Rejected {
                        status: challenge.flatten(),
                        in_use: code_is(b"INUSE"),
                    }),
                };
                if let Some(failure) = failure {
                    return self.finish(UpstreamAction::Failed(failure));
                }
                match code {
                    Some(Code::Capabilities(caps)) => {
                        self.capabilities = caps.iter().map(|c| (*c).to_owned()).collect();
                        self.logged_in();
                    }
                    _ if self.fresh_capabilities => self.logged_in(),
                    _ => {
                        self.capabilities.clear();
                        self.send(Bytes::from_static(b"m4 CAPABILITY\r\n"));
                        self.state = State::PostLoginCapability;
                    }
                }
            }
            (State::PostLoginCapability, Response::Tagged { tag: "m4", .. }) => self.logged_in(),
            (_, Response::Untagged { .. }) => {}
            (_, Response::Tagged { .. } | Response::Continue(_)) => {
                self.fail("upstream sent an unexpected response");
            }
            (_, Response::Capabilities(_)) => {}
        }
    }

    fn authenticate(&mut self) {
        let responded = capability::has(&self.capabilities, "SASL-IR");
        let command = if responded {
            format!(
                "m3 AUTHENTICATE {} {}\r\n",
                self.mechanism.name(),
                self.response.expose()
            )
        } else {
            format!("m3 AUTHENTICATE {}\r\n", self.mechanism.name())
        };
        self.send(Bytes::from(command));
        self.state = State::Authenticate {
            responded,
            challenge: None,
        };
    }

    fn logged_in(&mut self) {
        let to_client = self.machine.take_input();
        let capabilities = std::mem::take(&mut self.capabilities);
        self.finish(UpstreamAction::LoggedIn {
            capabilities,
            to_client,
        });
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
            s.fail("upstream sent an overlong line")
        })
    }
}

impl UpstreamLogin for Upstream {
    /// Adds bytes read from the upstream.
    fn feed(&mut self, bytes: &[u8]) {
        match self.state {
            State::Done => {}
            // The driver hands the socket to the TLS handshake after
            // `StartTls`; plaintext now would be injected (RFC 2595 §3.1).
            State::StartingTls if !bytes.is_empty() => {
                self.fail("upstream sent data after STARTTLS")
            }
            _ => self.machine.feed(bytes),
        }
    }

    /// The next thing to do, or `None` when more upstream bytes are needed.
    fn next_action(&mut self) -> Option<UpstreamAction> {
        machine::next_action(self)
    }

    /// The TLS handshake after `STARTTLS` is done.
    fn tls_established(&mut self) {
        if self.state == State::StartingTls {
            // Capabilities must be asked again after STARTTLS (RFC 9051 §6.2.1).
            self.capabilities.clear();
            self.send(Bytes::from_static(b"m2 CAPABILITY\r\n"));
            self.state = State::Capability;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(up: &mut Upstream) -> Vec<UpstreamAction> {
        std::iter::from_fn(|| up.next_action()).collect()
    }

    fn protocol_failure(actions: &[UpstreamAction]) -> bool {
        matches!(
            actions.last(),
            Some(UpstreamAction::Failed(UpstreamFailure::Protocol(_)))
        )
    }

    /// Plaintext after the upstream's STARTTLS OK would be read as if it came
    /// over TLS: refuse it whether it arrives with the OK or after it.
    #[test]
    fn data_after_starttls_ok_fails_the_login() {
        let token = Secret::new("tok".to_owned());
        let mut up = Upstream::new("a@b", &token, UpstreamTls::StartTls);
        up.feed(b"* OK ready\r\nm1 OK go\r\n* OK injected\r\n");
        assert!(protocol_failure(&drain(&mut up)));

        let mut up = Upstream::new("a@b", &token, UpstreamTls::StartTls);
        up.feed(b"* OK ready\r\nm1 OK go\r\n");
        assert_eq!(drain(&mut up).last(), Some(&UpstreamAction::StartTls));
        up.feed(b"* OK injected\r\n");
        assert!(protocol_failure(&drain(&mut up)));
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let token = Secret::new("very-secret-token".to_owned());
        let mut up = Upstream::new("a@b", &token, UpstreamTls::Implicit);
        up.feed(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n");
        let actions = drain(&mut up);
        let shown = format!("{up:?} {actions:?}");
        assert!(!shown.contains("very-secret-token"));
        assert!(!shown.contains(sasl::xoauth2("a@b", &token).expose()));
    }
}
