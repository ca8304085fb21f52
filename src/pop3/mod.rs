//! POP3 (RFC 1939, RFC 2449, RFC 5034, RFC 2595): the client side before
//! login, and our own XOAUTH2 login to the upstream. Pure: no sockets, no
//! clocks. The same shape as [`crate::imap`]; what both need lives in
//! [`crate::proto`].

pub mod capability;
pub mod encode;
pub mod parse;
mod session;
mod upstream;

pub use session::{Options, Session};
pub use upstream::Upstream;
