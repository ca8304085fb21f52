//! The mechanics every sans-io conversation shares, client sessions and
//! upstream logins alike: the input buffer, the framer, the queue of
//! actions for the driver, and the loop that steps the conversation until
//! it has something to say. Each protocol keeps its own grammar, states
//! and replies; only this plumbing is common.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::frame::{Frame, FrameLimits, Framer};

/// Buffered input, its framer, and the actions waiting for the driver.
///
/// `Debug` shows sizes only: the input may hold a password or a token.
pub struct Machine<A> {
    input: BytesMut,
    framer: Framer,
    actions: VecDeque<A>,
    /// No more input is taken: the conversation closed or finished.
    stopped: bool,
}

impl<A> std::fmt::Debug for Machine<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("buffered", &self.input.len())
            .field("queued", &self.actions.len())
            .field("stopped", &self.stopped)
            .finish()
    }
}

impl<A> Machine<A> {
    /// An empty machine framing under `limits`.
    pub fn new(limits: FrameLimits) -> Self {
        Self {
            input: BytesMut::new(),
            framer: Framer::new(limits),
            actions: VecDeque::new(),
            stopped: false,
        }
    }

    /// Adds bytes read from the peer, unless the conversation has stopped.
    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.stopped {
            self.input.extend_from_slice(bytes);
        }
    }

    /// The next complete frame of the input, if there is one.
    pub fn frame(&mut self, literals: bool) -> Option<Frame> {
        self.framer.next(&mut self.input, literals)
    }

    /// Queues an action for the driver.
    pub fn push(&mut self, action: A) {
        self.actions.push_back(action);
    }

    /// Queues `last` and takes no more input.
    pub fn stop(&mut self, last: A) {
        self.push(last);
        self.stopped = true;
        self.input.clear();
    }

    /// Forgets queued actions (a refusal replaces whatever was queued).
    pub fn clear_actions(&mut self) {
        self.actions.clear();
    }

    /// Whether input came after the last frame (before a TLS handshake,
    /// that would be injected plaintext).
    pub fn has_input(&self) -> bool {
        !self.input.is_empty()
    }

    /// Drops buffered input and any partial frame: bytes sent before a TLS
    /// handshake must not be read as if they came over TLS (RFC 2595 §3.1).
    pub fn restart_after_tls(&mut self) {
        self.input.clear();
        self.framer.reset();
    }

    /// Drops up to `n` raw bytes of input (a chunk that follows a refused
    /// command); returns how many are still to come. Call it between
    /// frames.
    pub fn discard(&mut self, n: usize) -> usize {
        let k = n.min(self.input.len());
        bytes::Buf::advance(&mut self.input, k);
        n - k
    }

    /// Takes everything buffered, for the other side (leftovers handed
    /// over before the relay starts).
    pub fn take_input(&mut self) -> Bytes {
        self.input.split().freeze()
    }
}

/// A conversation driven by a [`Machine`]: it steps one frame at a time.
pub trait Stepped {
    type Action;
    /// The conversation's machine.
    fn machine(&mut self) -> &mut Machine<Self::Action>;
    /// Handles at most one frame; returns whether anything happened.
    fn step(&mut self) -> bool;
}

/// The next action of `conversation`, stepping it until it has one or
/// needs more input.
pub fn next_action<S: Stepped>(conversation: &mut S) -> Option<S::Action> {
    loop {
        if let Some(action) = conversation.machine().actions.pop_front() {
            return Some(action);
        }
        if !conversation.step() {
            return None;
        }
    }
}

/// One step of an upstream login: the next line to `on_line`, or an
/// overlong one to `overlong`; nothing while the login `waits` (done, or
/// in a TLS handshake). The step every upstream login takes.
pub fn step_upstream<S: Stepped>(
    login: &mut S,
    waits: bool,
    on_line: fn(&mut S, &[u8]),
    overlong: fn(&mut S),
) -> bool {
    if waits {
        return false;
    }
    match login.machine().frame(false) {
        None => false,
        Some(Frame::Complete(line)) => {
            on_line(login, &line);
            true
        }
        Some(_) => {
            overlong(login);
            true
        }
    }
}

/// A line without its CRLF (or bare LF).
pub fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}
