//! EHLO policy: what we advertise before login. The client sees our EHLO
//! reply, not the upstream's, so everything it may use after login must be
//! true of the upstream it ends up at: an extension is offered only when
//! every upstream a login may go to offers it (RFC 5321 §4.1.1.1). Pure
//! functions over lists.

use super::parse::keyword;

/// The extensions that pass through the relay unchanged, in the order we
/// advertise them. Never the upstream's `AUTH`: that is ours to offer.
pub const RELAYED: [&str; 8] = [
    "SIZE",
    "PIPELINING",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "SMTPUTF8",
    "CHUNKING",
    "DSN",
    "BINARYMIME",
];

/// The EHLO keyword lines before login (after the greeting line).
///
/// `upstreams` holds each upstream's EHLO keyword lines (after its TLS),
/// or `None` while some upstream is not known yet: then only what needs no
/// upstream support is offered. `SIZE` is the smallest limit any upstream
/// gives (`SIZE` alone: no limit). `AUTH PLAIN LOGIN` only once the
/// connection is private (`secure`); `STARTTLS` where the listener offers
/// it and TLS isn't up yet.
pub fn before_login<S: AsRef<[String]>>(
    upstreams: Option<&[S]>,
    secure: bool,
    starttls_offered: bool,
) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(upstreams) = upstreams.filter(|u| !u.is_empty()) {
        for extension in RELAYED {
            let offers: Vec<Option<&String>> = upstreams
                .iter()
                .map(|u| u.as_ref().iter().find(|l| keyword(l) == extension))
                .collect();
            if offers.iter().any(Option::is_none) {
                continue;
            }
            if extension == "SIZE" {
                let limit = offers
                    .iter()
                    .flatten()
                    .filter_map(|l| l.split(' ').nth(1)?.parse::<u64>().ok())
                    .filter(|n| *n > 0)
                    .min();
                lines.push(limit.map_or_else(|| "SIZE".to_owned(), |n| format!("SIZE {n}")));
            } else {
                lines.push(extension.to_owned());
            }
        }
    }
    if secure {
        lines.push("AUTH PLAIN LOGIN".to_owned());
    } else if starttls_offered {
        lines.push("STARTTLS".to_owned());
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn only_what_every_upstream_offers_and_never_their_auth() {
        let a = lines(&[
            "PIPELINING",
            "SIZE 35882577",
            "AUTH PLAIN XOAUTH2",
            "8BITMIME",
            "CHUNKING",
            "SMTPUTF8",
            "ETRN",
        ]);
        let b = lines(&["pipelining", "SIZE 10240000", "8BITMIME", "DSN"]);
        assert_eq!(
            before_login(Some(&[a.clone(), b][..]), true, false),
            [
                "SIZE 10240000",
                "PIPELINING",
                "8BITMIME",
                "AUTH PLAIN LOGIN"
            ]
        );
        assert_eq!(
            before_login(Some(&[a][..]), true, false),
            [
                "SIZE 35882577",
                "PIPELINING",
                "8BITMIME",
                "SMTPUTF8",
                "CHUNKING",
                "AUTH PLAIN LOGIN"
            ]
        );
    }

    #[test]
    fn unknown_upstreams_get_nothing_and_cleartext_gets_no_auth() {
        assert_eq!(
            before_login::<Vec<String>>(None, true, false),
            ["AUTH PLAIN LOGIN"]
        );
        assert_eq!(before_login::<Vec<String>>(None, false, true), ["STARTTLS"]);
        let unlimited = lines(&["SIZE", "PIPELINING"]);
        assert_eq!(
            before_login(Some(&[unlimited][..]), false, false),
            ["SIZE", "PIPELINING"]
        );
    }
}
