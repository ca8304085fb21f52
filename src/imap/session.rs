//! The client's IMAP conversation up to login, as a state machine.

use bytes::{Bytes, BytesMut};

use super::parse::{self, Command};
use super::{capability, encode};
use crate::proto::machine::{self, trim_line_end, Machine, Stepped};
use crate::proto::sasl::{self, Exchange, Mechanism, Step};
use crate::proto::{Action, ClientSession, Credentials, Frame, FrameLimits, LoginFailure};

/// How a session starts, fixed by its listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The connection is already TLS (implicit TLS listener).
    pub tls_active: bool,
    /// The listener offers STARTTLS.
    pub starttls: bool,
    /// The listener is plaintext on loopback: treated as private.
    pub loopback_plaintext: bool,
    pub limits: FrameLimits,
}

#[derive(Debug)]
enum State {
    NotAuthenticated,
    /// An AUTHENTICATE exchange waits for the client's next line.
    Sasl {
        tag: String,
        exchange: Exchange,
    },
    /// STARTTLS was accepted; waiting for the driver's handshake.
    StartingTls,
    /// Credentials went to the driver; waiting for the login's outcome.
    AwaitingLogin {
        tag: String,
    },
    Relaying,
    Closed,
}

/// The client side of one IMAP connection, until it is spliced. `Debug`
/// leaves out the buffered client bytes, which may hold a password.
#[derive(Debug)]
pub struct Session {
    options: Options,
    state: State,
    machine: Machine<Action>,
}

impl Session {
    /// A new session; its first action sends the greeting.
    pub fn new(options: Options) -> Self {
        let mut session = Self {
            options,
            state: State::NotAuthenticated,
            machine: Machine::new(options.limits),
        };
        let greeting = encode::greeting(&session.capabilities());
        session.send(greeting);
        session
    }

    fn secure(&self) -> bool {
        self.options.tls_active || self.options.loopback_plaintext
    }

    fn capabilities(&self) -> Vec<&'static str> {
        capability::before_login(
            self.secure(),
            self.options.starttls && !self.options.tls_active,
        )
    }

    fn send(&mut self, bytes: Bytes) {
        self.machine.push(Action::Send(bytes));
    }

    fn close_with(&mut self, bytes: Bytes) {
        self.send(bytes);
        self.machine.stop(Action::Close);
        self.state = State::Closed;
    }

    /// Handles at most one frame. Returns whether anything happened.
    fn handle_frame(&mut self) -> bool {
        let literals = match self.state {
            State::NotAuthenticated => true,
            State::Sasl { .. } => false,
            _ => return false,
        };
        let Some(frame) = self.machine.frame(literals) else {
            return false;
        };
        match frame {
            Frame::Complete(line) => {
                match std::mem::replace(&mut self.state, State::NotAuthenticated) {
                    State::Sasl { tag, exchange } => self.sasl_line(tag, exchange, &line),
                    _ => self.command(&line),
                }
            }
            Frame::LiteralAnnounced => self.send(encode::continuation("Ready for literal data")),
            Frame::TooLong { head } => {
                let tag = self
                    .abandon_sasl()
                    .or_else(|| parse::leading_tag(&head).map(str::to_owned));
                self.send(encode::bad(tag.as_deref(), "Line too long"));
            }
            Frame::LiteralTooLarge {
                head,
                synchronizing,
            } => {
                if synchronizing {
                    let tag = parse::leading_tag(&head).map(str::to_owned);
                    self.send(encode::bad(tag.as_deref(), "Literal too large"));
                } else {
                    // Its bytes are already coming; there is no way to find
                    // the next command boundary (RFC 7888 §4).
                    self.close_with(encode::bye("Literal too large"));
                }
            }
        }
        true
    }

    /// Ends an AUTHENTICATE exchange that was interrupted; returns its tag.
    fn abandon_sasl(&mut self) -> Option<String> {
        match std::mem::replace(&mut self.state, State::NotAuthenticated) {
            State::Sasl { tag, .. } => Some(tag),
            other => {
                self.state = other;
                None
            }
        }
    }

    fn command(&mut self, line: &[u8]) {
        let Ok(tagged) = parse::command(line) else {
            let tag = parse::leading_tag(line).map(str::to_owned);
            self.send(encode::bad(tag.as_deref(), "Syntax error"));
            return;
        };
        let tag = tagged.tag;
        match tagged.command {
            Command::Capability => {
                let caps = encode::capability(&self.capabilities());
                self.send(caps);
                self.send(encode::tagged(tag, "OK", None, "CAPABILITY completed"));
            }
            Command::Noop => self.send(encode::tagged(tag, "OK", None, "NOOP completed")),
            Command::Id => {
                self.send(Bytes::from_static(b"* ID (\"name\" \"mailgate\")\r\n"));
                self.send(encode::tagged(tag, "OK", None, "ID completed"));
            }
            Command::Logout => {
                let mut bytes = BytesMut::from(&encode::bye("Logging out")[..]);
                bytes.extend_from_slice(&encode::tagged(tag, "OK", None, "LOGOUT completed"));
                self.close_with(bytes.freeze());
            }
            Command::StartTls => {
                if self.options.starttls && !self.options.tls_active {
                    self.send(encode::tagged(tag, "OK", None, "Begin TLS negotiation now"));
                    self.machine.push(Action::StartTls);
                    self.state = State::StartingTls;
                } else {
                    self.send(encode::tagged(tag, "BAD", None, "STARTTLS not available"));
                }
            }
            Command::Login { username, password } => {
                if !self.secure() {
                    self.refuse_cleartext(tag);
                    return;
                }
                let credentials = Credentials {
                    username: sasl::username(&username),
                    password,
                    hello: None,
                };
                self.authenticate(tag.to_owned(), credentials);
            }
            Command::Authenticate {
                mechanism,
                initial_response,
            } => {
                if !self.secure() {
                    self.refuse_cleartext(tag);
                    return;
                }
                let tag = tag.to_owned();
                let Some(mechanism) = Mechanism::from_name(mechanism) else {
                    self.send(encode::tagged(
                        &tag,
                        "NO",
                        None,
                        "Unsupported authentication mechanism",
                    ));
                    return;
                };
                let exchange = Exchange::new(mechanism);
                match initial_response {
                    Some(ir) => self.sasl_line(tag, exchange, ir),
                    None => {
                        self.send(encode::continuation(exchange.first_challenge()));
                        self.state = State::Sasl { tag, exchange };
                    }
                }
            }
            Command::Other(_) => {
                self.send(encode::tagged(
                    tag,
                    "BAD",
                    None,
                    "Command not valid before login",
                ));
            }
        }
    }

    fn refuse_cleartext(&mut self, tag: &str) {
        self.send(encode::tagged(
            tag,
            "NO",
            Some("PRIVACYREQUIRED"),
            "Use STARTTLS first",
        ));
    }

    /// One client line of an AUTHENTICATE exchange (RFC 9051 §6.2.2).
    fn sasl_line(&mut self, tag: String, mut exchange: Exchange, line: &[u8]) {
        match exchange.respond(trim_line_end(line)) {
            Ok(Step::Challenge(challenge)) => {
                self.send(encode::continuation(challenge));
                self.state = State::Sasl { tag, exchange };
            }
            Ok(Step::Done(credentials)) => self.authenticate(tag, credentials),
            Err(sasl::ExchangeError::Cancelled) => {
                self.send(encode::tagged(
                    &tag,
                    "BAD",
                    None,
                    "Authentication cancelled",
                ));
            }
            Err(e) => self.send(encode::tagged(
                &tag,
                "BAD",
                None,
                &capitalized(&e.to_string()),
            )),
        }
    }

    fn authenticate(&mut self, tag: String, credentials: Credentials) {
        self.machine.push(Action::Authenticate(credentials));
        self.state = State::AwaitingLogin { tag };
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
    /// Adds bytes read from the client.
    fn feed(&mut self, bytes: &[u8]) {
        self.machine.feed(bytes);
    }

    /// The next thing to do, or `None` when the session needs more client
    /// bytes or is waiting for a `tls_established` / `login_*` call.
    fn next_action(&mut self) -> Option<Action> {
        machine::next_action(self)
    }

    /// The driver finished the TLS handshake that `Action::StartTls` asked for.
    fn tls_established(&mut self) {
        self.options.tls_active = true;
        // Bytes that arrived before the handshake are plaintext injected
        // ahead of TLS; they must not be read as commands (RFC 2595 §3.1).
        self.machine.restart_after_tls();
        if matches!(self.state, State::StartingTls) {
            self.state = State::NotAuthenticated;
        }
    }

    /// The upstream login succeeded with these capabilities.
    fn login_succeeded(&mut self, upstream_capabilities: &[String]) {
        let State::AwaitingLogin { tag } = std::mem::replace(&mut self.state, State::Relaying)
        else {
            return;
        };
        let caps = capability::after_login(upstream_capabilities);
        // `CAPABILITY` with no capability is invalid syntax: leave it out.
        let code = (!caps.is_empty()).then(|| format!("CAPABILITY {}", caps.join(" ")));
        self.send(encode::tagged(&tag, "OK", code.as_deref(), "Logged in"));
        let to_upstream = self.machine.take_input();
        self.machine.push(Action::Splice { to_upstream });
    }

    /// The login failed; tell the client why and read its next command.
    fn login_failed(&mut self, failure: LoginFailure) {
        let State::AwaitingLogin { tag } =
            std::mem::replace(&mut self.state, State::NotAuthenticated)
        else {
            return;
        };
        let (code, text) = match failure {
            LoginFailure::BadCredentials => ("AUTHENTICATIONFAILED", "Authentication failed"),
            LoginFailure::Unavailable => (
                "UNAVAILABLE",
                "Upstream mail service unavailable, try again later",
            ),
            LoginFailure::NotAuthorizedYet => (
                "AUTHENTICATIONFAILED",
                "This account must be authorized by the mailgate administrator first",
            ),
            LoginFailure::NeedsAuthorization => (
                "AUTHENTICATIONFAILED",
                "This account must be authorized again by the mailgate administrator",
            ),
            LoginFailure::InUse => ("INUSE", "Mailbox in use"),
            LoginFailure::SessionLimit => (
                "UNAVAILABLE",
                "Too many sessions for this mailbox, try again later",
            ),
        };
        self.send(encode::tagged(&tag, "NO", Some(code), text));
    }

    /// Says goodbye and closes, for a gateway that is shutting down.
    fn shutdown(&mut self) {
        if !matches!(self.state, State::Relaying | State::Closed) {
            self.close_with(encode::bye("mailgate shutting down"));
        }
    }

    fn too_busy(&mut self) {
        self.machine.clear_actions();
        self.close_with(encode::bye(
            "[UNAVAILABLE] Too many connections from your address, try again later",
        ));
    }
}

/// "invalid base64" -> "Invalid base64": error texts are lowercase, replies
/// are sentences.
fn capitalized(s: &str) -> String {
    let mut chars = s.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}
