//! Bytes the gateway writes in SMTP: replies with enhanced status codes
//! (RFC 3463, RFC 2034) and SASL continuations (RFC 4954 §4).

use bytes::Bytes;

/// `code enhanced text`, e.g. `250 2.0.0 OK`.
pub fn reply(code: u16, enhanced: &str, text: &str) -> Bytes {
    Bytes::from(format!("{code} {enhanced} {text}\r\n"))
}

/// A multi-line reply: `code-line` for each but the last, `code line` for
/// the last (RFC 5321 §4.2.1).
pub fn multiline(code: u16, lines: &[String]) -> Bytes {
    let mut s = String::new();
    for (i, line) in lines.iter().enumerate() {
        let separator = if i + 1 == lines.len() { ' ' } else { '-' };
        s.push_str(&format!("{code}{separator}{line}\r\n"));
    }
    Bytes::from(s)
}

/// `334 challenge`; the space is sent even when it is empty.
pub fn continuation(challenge: &str) -> Bytes {
    Bytes::from(format!("334 {challenge}\r\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_known_answers() {
        assert_eq!(&reply(250, "2.0.0", "OK")[..], b"250 2.0.0 OK\r\n");
        assert_eq!(
            &multiline(
                250,
                &[
                    "mail.example".into(),
                    "PIPELINING".into(),
                    "SIZE 100".into()
                ]
            )[..],
            b"250-mail.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n"
        );
        assert_eq!(&continuation("")[..], b"334 \r\n");
    }
}
