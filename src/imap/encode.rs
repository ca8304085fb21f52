//! Bytes the gateway writes in IMAP: greeting, status responses, continuations.

use bytes::Bytes;

/// `* OK [CAPABILITY ...] text`
pub fn greeting(caps: &[&str]) -> Bytes {
    Bytes::from(format!(
        "* OK [CAPABILITY {}] mailgate ready\r\n",
        caps.join(" ")
    ))
}

/// `* CAPABILITY ...`
pub fn capability(caps: &[&str]) -> Bytes {
    Bytes::from(format!("* CAPABILITY {}\r\n", caps.join(" ")))
}

/// A tagged status response: `tag OK|NO|BAD [code] text`.
pub fn tagged(tag: &str, status: &str, code: Option<&str>, text: &str) -> Bytes {
    Bytes::from(match code {
        Some(code) => format!("{tag} {status} [{code}] {text}\r\n"),
        None => format!("{tag} {status} {text}\r\n"),
    })
}

/// An untagged `BAD` for a line without a usable tag, or a tagged one.
pub fn bad(tag: Option<&str>, text: &str) -> Bytes {
    tagged(tag.unwrap_or("*"), "BAD", None, text)
}

/// `+ text`. The space is mandatory even when the text is empty: some
/// clients wait for `"+ "` (RFC 9051 §7.5).
pub fn continuation(text: &str) -> Bytes {
    Bytes::from(format!("+ {text}\r\n"))
}

/// `* BYE text`
pub fn bye(text: &str) -> Bytes {
    Bytes::from(format!("* BYE {text}\r\n"))
}
