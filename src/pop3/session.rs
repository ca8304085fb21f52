//! The client's POP3 conversation in the AUTHORIZATION state, as a state
//! machine.

use bytes::Bytes;

use super::parse::{self, Command};
use super::{capability, encode};
use crate::proto::machine::{self, trim_line_end, Machine, Stepped};
use crate::proto::sasl::{self, Exchange, ExchangeError, Mechanism, Step};
use crate::proto::{Action, ClientSession, Credentials, Frame, FrameLimits, LoginFailure};
use crate::secret::Secret;

/// How a session starts, fixed by its listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The connection is already TLS (implicit TLS listener).
    pub tls_active: bool,
    /// The listener offers STLS.
    pub stls: bool,
    /// The listener is plaintext on loopback: treated as private.
    pub loopback_plaintext: bool,
    pub limits: FrameLimits,
}

#[derive(Debug)]
enum State {
    /// RFC 1939's AUTHORIZATION state; `user` holds a USER name waiting
    /// for its PASS.
    Authorization {
        user: Option<String>,
    },
    /// An AUTH exchange waits for the client's next line.
    Sasl {
        exchange: Exchange,
    },
    StartingTls,
    AwaitingLogin,
    Relaying,
    Closed,
}

/// The client side of one POP3 connection, until it is spliced. `Debug`
/// leaves out the buffered client bytes, which may hold a password.
#[derive(Debug)]
pub struct Session {
    options: Options,
    state: State,
    machine: Machine<Action>,
}

impl Session {
    /// A new session; its first action sends the greeting. The greeting has
    /// no APOP timestamp: APOP is not offered.
    pub fn new(options: Options) -> Self {
        let mut session = Self {
            options,
            state: State::Authorization { user: None },
            machine: Machine::new(options.limits),
        };
        session.send(encode::ok("mailgate ready"));
        session
    }

    fn secure(&self) -> bool {
        self.options.tls_active || self.options.loopback_plaintext
    }

    fn send(&mut self, bytes: Bytes) {
        self.machine.push(Action::Send(bytes));
    }

    fn close_with(&mut self, bytes: Bytes) {
        self.send(bytes);
        self.machine.stop(Action::Close);
        self.state = State::Closed;
    }

    fn handle_frame(&mut self) -> bool {
        if !matches!(self.state, State::Authorization { .. } | State::Sasl { .. }) {
            return false;
        }
        let Some(frame) = self.machine.frame(false) else {
            return false;
        };
        let state = std::mem::replace(&mut self.state, State::Authorization { user: None });
        match frame {
            Frame::Complete(line) => match state {
                State::Sasl { exchange } => self.sasl_line(exchange, &line),
                State::Authorization { user } => self.command(user, &line),
                other => self.state = other,
            },
            // The framer runs without literals: only `TooLong` can come.
            _ => self.send(encode::err(None, "Line too long")),
        }
        true
    }

    fn command(&mut self, user: Option<String>, line: &[u8]) {
        let Ok(command) = parse::command(line) else {
            self.send(encode::err(None, "Unknown command or bad syntax"));
            return;
        };
        match command {
            Command::Capa => {
                let caps = capability::before_login(
                    self.secure(),
                    self.options.stls && !self.options.tls_active,
                );
                self.send(encode::list("Capability list follows", &caps));
            }
            Command::Quit => self.close_with(encode::ok("mailgate signing off")),
            Command::Stls => {
                if self.options.stls && !self.options.tls_active {
                    self.send(encode::ok("Begin TLS negotiation"));
                    self.machine.push(Action::StartTls);
                    self.state = State::StartingTls;
                } else {
                    self.send(encode::err(None, "STLS not available"));
                }
            }
            Command::Apop => self.send(encode::err(
                None,
                "APOP not supported; use USER/PASS or AUTH",
            )),
            _ if !self.secure() => self.send(encode::err(None, "Use STLS first")),
            Command::User(name) => {
                self.send(encode::ok("Send PASS"));
                self.state = State::Authorization {
                    user: Some(sasl::username(name)),
                };
            }
            Command::Pass(password) => match user {
                Some(username) => {
                    self.authenticate(Credentials {
                        username,
                        password: Secret::new(password.to_vec()),
                        hello: None,
                    });
                }
                None => self.send(encode::err(None, "USER first")),
            },
            Command::Auth {
                mechanism: None, ..
            } => self.send(encode::list("Mechanisms follow", &["PLAIN", "LOGIN"])),
            Command::Auth {
                mechanism: Some(name),
                initial_response,
            } => {
                let Some(mechanism) = Mechanism::from_name(name) else {
                    self.send(encode::err(None, "Unsupported authentication mechanism"));
                    return;
                };
                let exchange = Exchange::new(mechanism);
                match initial_response {
                    Some(ir) => self.sasl_line(exchange, ir),
                    None => {
                        self.send(encode::continuation(exchange.first_challenge()));
                        self.state = State::Sasl { exchange };
                    }
                }
            }
            Command::Other(_) => self.send(encode::err(None, "Command not valid before login")),
        }
    }

    /// One client line of an AUTH exchange (RFC 5034 §4).
    fn sasl_line(&mut self, mut exchange: Exchange, line: &[u8]) {
        match exchange.respond(trim_line_end(line)) {
            Ok(Step::Challenge(challenge)) => {
                self.send(encode::continuation(challenge));
                self.state = State::Sasl { exchange };
            }
            Ok(Step::Done(credentials)) => self.authenticate(credentials),
            Err(ExchangeError::Cancelled) => {
                self.send(encode::err(None, "Authentication cancelled"))
            }
            Err(ExchangeError::Malformed(_)) => {
                self.send(encode::err(None, "Invalid SASL response"))
            }
        }
    }

    fn authenticate(&mut self, credentials: Credentials) {
        self.machine.push(Action::Authenticate(credentials));
        self.state = State::AwaitingLogin;
    }
}

impl Stepped for Session {
    type Action = Action;

    fn machine(&mut self) -> &mut Machine<Action> {
        &mut self.machine
    }

    fn step(&mut self) -> bool {
        self.handle_frame()
    }
}

impl ClientSession for Session {
    fn feed(&mut self, bytes: &[u8]) {
        self.machine.feed(bytes);
    }

    fn next_action(&mut self) -> Option<Action> {
        machine::next_action(self)
    }

    fn tls_established(&mut self) {
        self.options.tls_active = true;
        // Plaintext sent before the handshake must not be read as commands
        // (RFC 2595 §4).
        self.machine.restart_after_tls();
        if matches!(self.state, State::StartingTls) {
            self.state = State::Authorization { user: None };
        }
    }

    fn login_succeeded(&mut self, _upstream_capabilities: &[String]) {
        if !matches!(self.state, State::AwaitingLogin) {
            return;
        }
        self.state = State::Relaying;
        self.send(encode::ok("Logged in"));
        let to_upstream = self.machine.take_input();
        self.machine.push(Action::Splice { to_upstream });
    }

    fn login_failed(&mut self, failure: LoginFailure) {
        if !matches!(self.state, State::AwaitingLogin) {
            return;
        }
        self.state = State::Authorization { user: None };
        // RFC 3206 response codes, which RESP-CODES and AUTH-RESP-CODE
        // promise.
        let (code, text) = match failure {
            LoginFailure::BadCredentials => ("AUTH", "Authentication failed"),
            LoginFailure::Unavailable => (
                "SYS/TEMP",
                "Upstream mail service unavailable, try again later",
            ),
            LoginFailure::NotAuthorizedYet => (
                "SYS/PERM",
                "This account must be authorized by the mailgate administrator first",
            ),
            LoginFailure::NeedsAuthorization => (
                "SYS/PERM",
                "This account must be authorized again by the mailgate administrator",
            ),
            LoginFailure::InUse => ("IN-USE", "Mailbox in use"),
            LoginFailure::SessionLimit => (
                "SYS/TEMP",
                "Too many sessions for this mailbox, try again later",
            ),
        };
        self.send(encode::err(Some(code), text));
    }

    fn shutdown(&mut self) {
        if !matches!(self.state, State::Relaying | State::Closed) {
            self.close_with(encode::err(Some("SYS/TEMP"), "mailgate shutting down"));
        }
    }

    fn too_busy(&mut self) {
        self.machine.clear_actions();
        self.close_with(encode::err(
            Some("SYS/TEMP"),
            "Too many connections from your address, try again later",
        ));
    }
}
