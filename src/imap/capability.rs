//! Capability policy: what we advertise before login, and what of the
//! upstream's list we pass on after it. Pure functions over lists.

/// Capabilities before login.
///
/// `secure` is true once the client connection is private (TLS, or a
/// loopback plaintext listener). Until then a STARTTLS listener advertises
/// `STARTTLS LOGINDISABLED` and no `AUTH=` mechanism: some clients refuse to
/// log in at all when they see `AUTH=PLAIN` on cleartext (RFC 9051 §6.2.3).
pub fn before_login(secure: bool, starttls_offered: bool) -> Vec<&'static str> {
    let mut caps = vec!["IMAP4rev1", "LITERAL+", "ID"];
    if secure {
        caps.extend(["SASL-IR", "AUTH=PLAIN", "AUTH=LOGIN"]);
    } else {
        if starttls_offered {
            caps.push("STARTTLS");
        }
        caps.push("LOGINDISABLED");
    }
    caps
}

/// The upstream's capabilities after login, as the client should see them.
/// Only the entries that describe the not-authenticated state are dropped;
/// everything else is the upstream's to offer, since we relay unchanged.
pub fn after_login<S: AsRef<str>>(upstream: &[S]) -> Vec<&str> {
    upstream
        .iter()
        .map(AsRef::as_ref)
        .filter(|c| {
            let upper = c.to_ascii_uppercase();
            !(upper.starts_with("AUTH=")
                || upper == "STARTTLS"
                || upper == "LOGINDISABLED"
                || upper == "SASL-IR")
        })
        .collect()
}

/// Whether `caps` contains `name`, compared case-insensitively.
pub fn has<S: AsRef<str>>(caps: &[S], name: &str) -> bool {
    caps.iter().any(|c| c.as_ref().eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cleartext_advertises_no_auth_mechanism() {
        assert_eq!(
            before_login(false, true),
            ["IMAP4rev1", "LITERAL+", "ID", "STARTTLS", "LOGINDISABLED"]
        );
        let secure = before_login(true, true);
        assert!(secure.contains(&"AUTH=PLAIN") && secure.contains(&"SASL-IR"));
        assert!(!secure.contains(&"STARTTLS") && !secure.contains(&"LOGINDISABLED"));
    }

    #[test]
    fn after_login_drops_only_pre_auth_entries() {
        let up = [
            "IMAP4rev1",
            "SASL-IR",
            "auth=xoauth2",
            "IDLE",
            "STARTTLS",
            "LITERAL+",
            "UIDPLUS",
        ];
        assert_eq!(
            after_login(&up),
            ["IMAP4rev1", "IDLE", "LITERAL+", "UIDPLUS"]
        );
        assert!(has(&up, "idle"));
        assert!(!has(&up, "MOVE"));
    }
}
