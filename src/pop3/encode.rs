//! Bytes the gateway writes in POP3.

use bytes::Bytes;

/// `+OK text`
pub fn ok(text: &str) -> Bytes {
    Bytes::from(format!("+OK {text}\r\n"))
}

/// `-ERR [code] text`, with an RFC 3206 / RFC 2449 response code.
pub fn err(code: Option<&str>, text: &str) -> Bytes {
    Bytes::from(match code {
        Some(code) => format!("-ERR [{code}] {text}\r\n"),
        None => format!("-ERR {text}\r\n"),
    })
}

/// `+ challenge` (RFC 5034 §4); the space is sent even when it is empty.
pub fn continuation(challenge: &str) -> Bytes {
    Bytes::from(format!("+ {challenge}\r\n"))
}

/// `+OK text` followed by one line per item and the terminating `.`.
/// Items never start with `.`, so no dot-stuffing is needed.
pub fn list(text: &str, items: &[&str]) -> Bytes {
    let mut s = format!("+OK {text}\r\n");
    for item in items {
        s.push_str(item);
        s.push_str("\r\n");
    }
    s.push_str(".\r\n");
    Bytes::from(s)
}
