//! CAPA policy (RFC 2449): what we advertise before login, and what the
//! upstream's list says about XOAUTH2.

/// Capabilities before login. Until the connection is private, a STLS
/// listener offers only `STLS`: no USER and no SASL on cleartext (RFC 2595
/// §2 lets a server hide them).
pub fn before_login(secure: bool, stls_offered: bool) -> Vec<&'static str> {
    let mut caps = Vec::new();
    if secure {
        caps.extend(["USER", "SASL PLAIN LOGIN"]);
    } else if stls_offered {
        caps.push("STLS");
    }
    caps.extend(["RESP-CODES", "AUTH-RESP-CODE", "IMPLEMENTATION mailgate"]);
    caps
}

/// Whether a `SASL ...` line in `caps` lists `mechanism`.
pub fn has_sasl<S: AsRef<str>>(caps: &[S], mechanism: &str) -> bool {
    caps.iter().any(|line| {
        let mut words = line.as_ref().split_ascii_whitespace();
        words.next().is_some_and(|w| w.eq_ignore_ascii_case("SASL"))
            && words.any(|m| m.eq_ignore_ascii_case(mechanism))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleartext_hides_user_and_sasl() {
        assert_eq!(
            before_login(false, true),
            [
                "STLS",
                "RESP-CODES",
                "AUTH-RESP-CODE",
                "IMPLEMENTATION mailgate"
            ]
        );
        assert_eq!(
            before_login(true, false),
            [
                "USER",
                "SASL PLAIN LOGIN",
                "RESP-CODES",
                "AUTH-RESP-CODE",
                "IMPLEMENTATION mailgate"
            ]
        );
    }

    #[test]
    fn sasl_lookup() {
        let caps = ["TOP", "SASL PLAIN xoauth2", "UIDL"];
        assert!(has_sasl(&caps, "XOAUTH2"));
        assert!(!has_sasl(&caps, "TOP"));
        assert!(!has_sasl(&["USER"], "USER"));
    }
}
