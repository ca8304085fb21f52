//! The registry: every protocol the gateway speaks, listed once. The rest
//! of the gateway names a protocol only as a [`Protocol`], which stands for
//! its [`Descriptor`]; adding a protocol is a module plus one line in
//! [`ALL`].

use crate::proto::Descriptor;

/// Every protocol, in the order the config and the metrics list them.
pub static ALL: [&Descriptor; 3] = [
    &crate::imap::PROTOCOL,
    &crate::pop3::PROTOCOL,
    &crate::smtp::PROTOCOL,
];

/// How many protocols there are.
pub const COUNT: usize = ALL.len();

/// One protocol of [`ALL`]: its descriptor by reference.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Protocol(u8);

impl Protocol {
    /// Every protocol.
    pub fn all() -> impl Iterator<Item = Protocol> {
        (0..COUNT).filter_map(|i| u8::try_from(i).ok().map(Protocol))
    }

    /// The protocol with this config name (`imap`, `pop3`).
    pub fn from_name(name: &str) -> Option<Protocol> {
        Self::all().find(|p| p.name == name)
    }

    /// This protocol's place in [`ALL`], for tables indexed by protocol.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// The config names of every protocol, for error messages.
    pub fn names() -> String {
        ALL.iter().map(|d| d.name).collect::<Vec<_>>().join(", ")
    }
}

impl std::ops::Deref for Protocol {
    type Target = Descriptor;

    fn deref(&self) -> &Descriptor {
        ALL[self.index()]
    }
}

impl std::fmt::Debug for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.title)
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

impl<'de> serde::Deserialize<'de> for Protocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Protocol::from_name(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown protocol {name:?}, expected one of {}",
                Protocol::names()
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_round_trip_and_are_distinct() {
        for p in Protocol::all() {
            assert_eq!(Protocol::from_name(p.name), Some(p));
        }
        assert_eq!(Protocol::all().count(), COUNT);
        assert!(Protocol::from_name("smtp2").is_none());
    }

    #[test]
    fn a_logout_is_recognised_only_as_the_client_s_last_complete_line() {
        let imap = Protocol::from_name("imap").unwrap();
        assert!((imap.logged_out)(b"b SELECT INBOX\r\nc LOGOUT\r\n"));
        assert!((imap.logged_out)(b"z logout\n"));
        assert!(!(imap.logged_out)(b"c LOGOUT"), "not sent whole");
        assert!(!(imap.logged_out)(b"c LOGOUT\r\nd NOOP\r\n"));
        let pop3 = Protocol::from_name("pop3").unwrap();
        assert!((pop3.logged_out)(b"STAT\r\nQUIT\r\n"));
        assert!(!(pop3.logged_out)(b"QUIT\r\nSTAT\r\n"));
        assert!(!(pop3.logged_out)(b""));
    }
}
