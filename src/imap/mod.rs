//! IMAP4 (RFC 9051, RFC 3501): the client side before login, and our own
//! XOAUTH2 login to the upstream. Pure: no sockets, no clocks.

pub mod capability;
pub mod encode;
pub mod parse;
mod session;
mod upstream;

pub use crate::proto::UpstreamTls;
pub use session::{Options, Session};
pub use upstream::Upstream;
