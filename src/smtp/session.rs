//! The client's SMTP conversation up to login, as a state machine:
//! greeting, `EHLO`/`HELO`, `STARTTLS`, `AUTH PLAIN`/`AUTH LOGIN`, and the
//! harmless commands; anything that needs a login is refused until then.

use std::sync::Arc;

use bytes::Bytes;

use super::parse::{self, Command};
use super::{capability, encode};
use crate::proto::machine::{self, trim_line_end, Machine, Stepped};
use crate::proto::sasl::{Exchange, ExchangeError, Mechanism, Step};
use crate::proto::{Action, ClientSession, Frame, FrameLimits, LoginFailure};

/// How a session starts, fixed by its listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The connection is already TLS (implicit TLS listener).
    pub tls_active: bool,
    /// The listener offers STARTTLS.
    pub starttls: bool,
    /// The listener is plaintext on loopback: treated as private.
    pub loopback_plaintext: bool,
    pub limits: FrameLimits,
    /// The name in the greeting and the EHLO reply.
    pub host: Arc<str>,
    /// The upstreams' EHLO keyword lines, when all are known.
    pub upstream_capabilities: Option<Arc<[Arc<[String]>]>>,
}

#[derive(Debug)]
enum State {
    /// Greeted; `hello` once the client said `EHLO`/`HELO`.
    Ready {
        hello: Option<String>,
    },
    /// An AUTH exchange waits for the client's next line.
    Sasl {
        hello: String,
        exchange: Exchange,
    },
    /// `BDAT` before login was refused: its chunk is skipped.
    Skipping {
        hello: Option<String>,
        left: usize,
    },
    StartingTls,
    AwaitingLogin {
        hello: String,
    },
    Relaying,
    Closed,
}

/// The client side of one SMTP connection, until it is spliced. `Debug`
/// leaves out the buffered client bytes, which may hold a password.
#[derive(Debug)]
pub struct Session {
    options: Options,
    state: State,
    machine: Machine<Action>,
}

impl Session {
    /// A new session; its first action sends the greeting (`220`).
    pub fn new(options: Options) -> Self {
        let greeting = Bytes::from(format!("220 {} ESMTP mailgate\r\n", options.host));
        let mut session = Self {
            machine: Machine::new(options.limits),
            options,
            state: State::Ready { hello: None },
        };
        session.send(greeting);
        session
    }

    fn secure(&self) -> bool {
        self.options.tls_active || self.options.loopback_plaintext
    }

    fn send(&mut self, bytes: Bytes) {
        self.machine.push(Action::Send(bytes));
    }

    fn reply(&mut self, code: u16, enhanced: &str, text: &str) {
        self.send(encode::reply(code, enhanced, text));
    }

    fn close_with(&mut self, bytes: Bytes) {
        self.send(bytes);
        self.machine.stop(Action::Close);
        self.state = State::Closed;
    }

    fn handle_frame(&mut self) -> bool {
        if let State::Skipping { left, .. } = &mut self.state {
            *left = self.machine.discard(*left);
            if *left > 0 {
                return false;
            }
            let State::Skipping { hello, .. } =
                std::mem::replace(&mut self.state, State::Ready { hello: None })
            else {
                return false;
            };
            self.state = State::Ready { hello };
            self.reply(530, "5.7.0", "Authentication required");
            return true;
        }
        if !matches!(self.state, State::Ready { .. } | State::Sasl { .. }) {
            return false;
        }
        let Some(frame) = self.machine.frame(false) else {
            return false;
        };
        let state = std::mem::replace(&mut self.state, State::Ready { hello: None });
        match (frame, state) {
            (Frame::Complete(line), State::Sasl { hello, exchange }) => {
                self.sasl_line(hello, exchange, &line);
            }
            (Frame::Complete(line), State::Ready { hello }) => self.command(hello, &line),
            // Only `TooLong` comes without literals: a line past the cap.
            (_, State::Sasl { hello, .. }) => {
                self.state = State::Ready { hello: Some(hello) };
                self.reply(500, "5.5.6", "Line too long");
            }
            (_, state) => {
                self.state = state;
                self.reply(500, "5.5.6", "Line too long");
            }
        }
        true
    }

    fn command(&mut self, hello: Option<String>, line: &[u8]) {
        let Ok(command) = parse::command(line) else {
            self.state = State::Ready { hello };
            self.reply(501, "5.5.2", "Syntax error");
            return;
        };
        match command {
            Command::Ehlo(name) => {
                let name = String::from_utf8_lossy(name).into_owned();
                let mut lines = vec![format!("{} greets {name}", self.options.host)];
                lines.extend(capability::before_login(
                    self.options.upstream_capabilities.as_deref(),
                    self.secure(),
                    self.options.starttls && !self.options.tls_active,
                ));
                self.send(encode::multiline(250, &lines));
                self.state = State::Ready { hello: Some(name) };
            }
            Command::Helo(name) => {
                let name = String::from_utf8_lossy(name).into_owned();
                self.send(Bytes::from(format!("250 {}\r\n", self.options.host)));
                self.state = State::Ready { hello: Some(name) };
            }
            Command::StartTls => {
                if self.options.starttls && !self.options.tls_active {
                    self.reply(220, "2.0.0", "Ready to start TLS");
                    self.machine.push(Action::StartTls);
                    self.state = State::StartingTls;
                } else {
                    self.state = State::Ready { hello };
                    self.reply(502, "5.5.1", "STARTTLS not available");
                }
            }
            Command::Auth {
                mechanism,
                initial_response,
            } => self.auth(hello, mechanism, initial_response),
            Command::Noop | Command::Rset => {
                self.state = State::Ready { hello };
                self.reply(250, "2.0.0", "OK");
            }
            Command::Help => {
                self.state = State::Ready { hello };
                self.reply(214, "2.0.0", "mailgate: log in with AUTH, then send mail");
            }
            Command::Quit => self.close_with(encode::reply(221, "2.0.0", "Bye")),
            Command::Bdat(size) => {
                // Its chunk is on its way: skip it, then refuse (RFC 3030
                // §2 has the server read the chunk whatever it answers).
                self.state = State::Skipping { hello, left: size };
            }
            Command::NeedsLogin => {
                self.state = State::Ready { hello };
                self.reply(530, "5.7.0", "Authentication required");
            }
            Command::Unknown => {
                self.state = State::Ready { hello };
                self.reply(500, "5.5.2", "Command not recognized");
            }
        }
    }

    fn auth(&mut self, hello: Option<String>, mechanism: &[u8], initial: Option<&[u8]>) {
        let Some(hello) = hello else {
            self.state = State::Ready { hello };
            return self.reply(503, "5.5.1", "Send EHLO first");
        };
        if !self.secure() {
            self.state = State::Ready { hello: Some(hello) };
            return self.reply(530, "5.7.0", "Must issue a STARTTLS command first");
        }
        let Some(mechanism) = Mechanism::from_name(mechanism) else {
            self.state = State::Ready { hello: Some(hello) };
            return self.reply(504, "5.5.4", "Unrecognized authentication type");
        };
        let exchange = Exchange::new(mechanism);
        match initial {
            Some(ir) => self.sasl_line(hello, exchange, ir),
            None => {
                self.send(encode::continuation(exchange.first_challenge()));
                self.state = State::Sasl { hello, exchange };
            }
        }
    }

    /// One client line of an AUTH exchange (RFC 4954 §4).
    fn sasl_line(&mut self, hello: String, mut exchange: Exchange, line: &[u8]) {
        match exchange.respond(trim_line_end(line)) {
            Ok(Step::Challenge(challenge)) => {
                self.send(encode::continuation(challenge));
                self.state = State::Sasl { hello, exchange };
            }
            Ok(Step::Done(mut credentials)) => {
                credentials.hello = Some(hello.clone());
                self.machine.push(Action::Authenticate(credentials));
                self.state = State::AwaitingLogin { hello };
            }
            Err(ExchangeError::Cancelled) => {
                self.state = State::Ready { hello: Some(hello) };
                self.reply(501, "5.0.0", "Authentication cancelled");
            }
            Err(ExchangeError::Malformed(_)) => {
                self.state = State::Ready { hello: Some(hello) };
                self.reply(501, "5.5.2", "Cannot decode the response");
            }
        }
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
        // Anything pipelined after STARTTLS was sent in the clear: discard
        // it, and forget the EHLO (RFC 3207 §4.2).
        self.machine.restart_after_tls();
        if matches!(self.state, State::StartingTls) {
            self.state = State::Ready { hello: None };
        }
    }

    fn login_succeeded(&mut self, _upstream_capabilities: &[String]) {
        if !matches!(self.state, State::AwaitingLogin { .. }) {
            return;
        }
        self.state = State::Relaying;
        self.reply(235, "2.7.0", "Authentication successful");
        let to_upstream = self.machine.take_input();
        self.machine.push(Action::Splice { to_upstream });
    }

    fn login_failed(&mut self, failure: LoginFailure) {
        let State::AwaitingLogin { hello } =
            std::mem::replace(&mut self.state, State::Ready { hello: None })
        else {
            return;
        };
        self.state = State::Ready { hello: Some(hello) };
        let (code, enhanced, text) = match failure {
            LoginFailure::BadCredentials => (535, "5.7.8", "Authentication credentials invalid"),
            LoginFailure::Unavailable | LoginFailure::InUse => {
                (454, "4.7.0", "Temporary authentication failure")
            }
            LoginFailure::NotAuthorizedYet => (
                535,
                "5.7.8",
                "This account must be authorized by the mailgate administrator first",
            ),
            LoginFailure::NeedsAuthorization => (
                535,
                "5.7.8",
                "This account must be authorized again by the mailgate administrator",
            ),
            LoginFailure::SessionLimit => {
                return self.close_with(encode::reply(
                    421,
                    "4.3.2",
                    "Too many sessions for this mailbox, try again later",
                ));
            }
        };
        self.reply(code, enhanced, text);
    }

    fn shutdown(&mut self) {
        if !matches!(self.state, State::Relaying | State::Closed) {
            self.close_with(encode::reply(421, "4.3.2", "mailgate shutting down"));
        }
    }

    fn too_busy(&mut self) {
        self.machine.clear_actions();
        self.close_with(encode::reply(
            421,
            "4.7.0",
            "Too many connections from your address, try again later",
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(tls_active: bool) -> Options {
        Options {
            tls_active,
            starttls: !tls_active,
            loopback_plaintext: false,
            limits: FrameLimits::default(),
            host: "gw.example".into(),
            upstream_capabilities: None,
        }
    }

    fn sent(session: &mut Session) -> String {
        let mut out = String::new();
        while let Some(action) = session.next_action() {
            match action {
                Action::Send(b) => out.push_str(&String::from_utf8_lossy(&b)),
                other => out.push_str(&format!("<{other:?}>")),
            }
        }
        out
    }

    #[test]
    fn bdat_before_login_skips_its_chunk_at_every_chunk_size() {
        let input = b"EHLO c\r\nBDAT 12 LAST\r\nNOOP\r\nNOOP\r\nNOOP\r\n";
        for chunk in [1, 2, 3, 7, 64] {
            let mut s = Session::new(options(true));
            let mut out = sent(&mut s);
            for piece in input.chunks(chunk) {
                s.feed(piece);
                out.push_str(&sent(&mut s));
            }
            // The chunk "NOOP\r\nNOOP\r\n" is data, not commands.
            assert_eq!(
                out.matches("250 2.0.0 OK").count(),
                1,
                "chunk {chunk}: {out}"
            );
            assert_eq!(out.matches("530 5.7.0").count(), 1, "chunk {chunk}: {out}");
        }
    }
}
