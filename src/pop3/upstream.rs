//! Our own login at a POP3 upstream: greeting, optional STLS, CAPA, and
//! `AUTH XOAUTH2`, with the provider's error challenge.

use bytes::{Bytes, BytesMut};

use super::parse::{self, Response};
use crate::proto::machine::{self, Machine, Stepped};
use crate::proto::sasl::{self, OAuthMechanism};
use crate::proto::{
    LoginRequest, UpstreamAction, UpstreamFailure, UpstreamLogin, UpstreamTls, UPSTREAM_LIMITS,
};
use crate::secret::Secret;

/// RFC 2449 §4 caps a command line at 255 octets, CRLF included. RFC 5034
/// §4: an initial response that would exceed it goes in a continuation.
const MAX_COMMAND_LINE: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    Stls,
    StartingTls,
    /// `CAPA` sent; `listing` once its `+OK` has come.
    Capa {
        listing: bool,
    },
    /// `AUTH XOAUTH2` sent without the response; waiting for `+`.
    AwaitContinue,
    /// Our XOAUTH2 response went out, inline (`initial`) or after `+`.
    Responded {
        initial: bool,
    },
    /// The error challenge came and was answered; waiting for `-ERR`.
    Challenged {
        status: Option<u16>,
    },
    Done,
}

/// Logs in at a POP3 upstream with XOAUTH2. Fed upstream bytes, yields
/// [`UpstreamAction`]s until `LoggedIn` or `Failed`.
#[derive(Debug)]
pub struct Upstream {
    state: State,
    tls: UpstreamTls,
    mechanism: OAuthMechanism,
    response: Secret<String>,
    capabilities: Vec<String>,
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
            machine: Machine::new(UPSTREAM_LIMITS),
        }
    }

    fn send(&mut self, bytes: Bytes) {
        self.machine.push(UpstreamAction::Send(bytes));
    }

    fn finish(&mut self, action: UpstreamAction) {
        self.machine.stop(action);
        self.state = State::Done;
    }

    fn fail(&mut self, why: &str) {
        self.finish(UpstreamAction::Failed(UpstreamFailure::Protocol(
            why.to_owned(),
        )));
    }

    fn response_line(&self) -> Bytes {
        let mut bytes = BytesMut::from(self.response.expose().as_bytes());
        bytes.extend_from_slice(b"\r\n");
        bytes.freeze()
    }

    /// `AUTH XOAUTH2 <response>` when it fits in a command line, else the
    /// two-step form, which Microsoft requires anyway for its long tokens.
    fn authenticate(&mut self) {
        let inline = format!(
            "AUTH {} {}\r\n",
            self.mechanism.name(),
            self.response.expose()
        );
        if inline.len() <= MAX_COMMAND_LINE {
            self.send(Bytes::from(inline));
            self.state = State::Responded { initial: true };
        } else {
            self.two_step();
        }
    }

    /// `AUTH <mechanism>` alone; the response follows the `+`.
    fn two_step(&mut self) {
        self.send(Bytes::from(format!("AUTH {}\r\n", self.mechanism.name())));
        self.state = State::AwaitContinue;
    }

    fn line(&mut self, line: &[u8]) {
        if let State::Capa { listing: true } = self.state {
            match parse::multiline(line) {
                Some(cap) => self
                    .capabilities
                    .push(String::from_utf8_lossy(cap).into_owned()),
                None => self.authenticate(),
            }
            return;
        }
        let Ok(response) = parse::response(line) else {
            return self.fail("upstream sent an unparseable response");
        };
        match (self.state, response) {
            (State::Greeting, Response::Ok(_)) => {
                if self.tls == UpstreamTls::StartTls {
                    self.send(Bytes::from_static(b"STLS\r\n"));
                    self.state = State::Stls;
                } else {
                    self.send(Bytes::from_static(b"CAPA\r\n"));
                    self.state = State::Capa { listing: false };
                }
            }
            (State::Stls, Response::Ok(_)) => {
                if self.machine.has_input() {
                    return self.fail("upstream sent data after STLS");
                }
                self.machine.push(UpstreamAction::StartTls);
                self.state = State::StartingTls;
            }
            (State::Capa { .. }, Response::Ok(_)) => self.state = State::Capa { listing: true },
            // No CAPA: go ahead, XOAUTH2 is what we have.
            (State::Capa { .. }, Response::Err { .. }) => self.authenticate(),
            (State::AwaitContinue, Response::Continue(_)) => {
                let line = self.response_line();
                self.send(line);
                self.state = State::Responded { initial: false };
            }
            (State::Responded { .. }, Response::Ok(_)) => {
                let to_client = self.machine.take_input();
                let capabilities = std::mem::take(&mut self.capabilities);
                self.finish(UpstreamAction::LoggedIn {
                    capabilities,
                    to_client,
                });
            }
            (State::Responded { .. }, Response::Continue(challenge)) => {
                // The provider's error challenge: answer with an empty line
                // to get the final -ERR.
                let status = sasl::xoauth2_error_status(challenge);
                self.send(Bytes::from_static(self.mechanism.error_reply()));
                self.state = State::Challenged { status };
            }
            // A plain -ERR to an initial response: the upstream may not take
            // one (RFC 5034 lets a client fall back); try the two-step form.
            (State::Responded { initial: true }, Response::Err { code, .. })
                if !is_auth_failure(code) =>
            {
                self.two_step();
            }
            (State::Responded { .. } | State::AwaitContinue, Response::Err { code, .. }) => {
                self.rejected(None, code);
            }
            (State::Challenged { status }, Response::Err { code, .. }) => {
                self.rejected(status, code)
            }
            (State::Greeting, Response::Err { .. }) => self.fail("upstream greeting is -ERR"),
            (State::Stls, Response::Err { .. }) => self.fail("upstream refused STLS"),
            _ => self.fail("upstream sent an unexpected response"),
        }
    }

    fn rejected(&mut self, status: Option<u16>, code: Option<&[u8]>) {
        // RFC 3206: SYS/TEMP and SYS/PERM blame the system, not the user.
        let failure = match code {
            Some(c) if c.to_ascii_uppercase().starts_with(b"SYS/") => UpstreamFailure::Unavailable(
                format!("upstream answered -ERR [{}]", String::from_utf8_lossy(c)),
            ),
            Some(c) if c.eq_ignore_ascii_case(b"IN-USE") => UpstreamFailure::Rejected {
                status,
                in_use: true,
            },
            _ => UpstreamFailure::Rejected {
                status,
                in_use: false,
            },
        };
        self.finish(UpstreamAction::Failed(failure));
    }
}

/// `[AUTH]`, `[IN-USE]` and `[SYS/...]` are verdicts on the login itself,
/// not on the form of the command.
fn is_auth_failure(code: Option<&[u8]>) -> bool {
    code.is_some_and(|c| {
        c.eq_ignore_ascii_case(b"AUTH")
            || c.eq_ignore_ascii_case(b"IN-USE")
            || c.to_ascii_uppercase().starts_with(b"SYS/")
    })
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
    fn feed(&mut self, bytes: &[u8]) {
        match self.state {
            State::Done => {}
            State::StartingTls if !bytes.is_empty() => self.fail("upstream sent data after STLS"),
            _ => self.machine.feed(bytes),
        }
    }

    fn next_action(&mut self) -> Option<UpstreamAction> {
        machine::next_action(self)
    }

    fn tls_established(&mut self) {
        if self.state == State::StartingTls {
            self.send(Bytes::from_static(b"CAPA\r\n"));
            self.state = State::Capa { listing: false };
        }
    }
}
