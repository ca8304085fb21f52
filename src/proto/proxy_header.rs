//! The PROXY protocol header (v1 text, v2 binary) that a trusted load
//! balancer sends before anything else on a connection, naming the real
//! client: where a header ends, and the address it names (sans-io; the
//! bytes are parsed by the `ppp` crate). `server::proxy_header` reads it
//! off the socket.

use std::net::SocketAddr;
use std::time::Duration;

use ppp::v1;
use ppp::v2;

/// The v2 signature (12 bytes).
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 prefix.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included (its specification's limit).
pub const V1_MAX: usize = 107;
/// The v2 fixed part: signature, version and command, family, length.
const V2_FIXED: usize = 16;

/// Why no client address could be had from the header.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("no PROXY protocol header within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before its PROXY protocol header")]
    Closed,
    #[error("the connection did not start with a PROXY protocol header")]
    Missing,
    #[error("bad PROXY protocol header: {0}")]
    Invalid(String),
}

/// Whether `bytes` (the first ones of a connection) could begin a PROXY
/// header of either version.
pub fn starts_like_header(bytes: &[u8]) -> bool {
    let is_prefix = |sig: &[u8]| {
        let n = bytes.len().min(sig.len());
        n > 0 && bytes[..n] == sig[..n]
    };
    is_prefix(V1_PREFIX) || is_prefix(V2_SIGNATURE)
}

/// Whether `bytes`, a connection's first, begin with a whole signature of
/// either version (what an untrusted sender of a header is told by).
pub fn is_header(bytes: &[u8]) -> bool {
    bytes.starts_with(V1_PREFIX) || bytes.starts_with(V2_SIGNATURE)
}

/// How long the header at the start of `bytes` is: `Ok(None)` when more
/// bytes are needed to tell.
///
/// # Errors
/// When `bytes` can't start a header, or a v1 header runs too long.
pub fn header_len(bytes: &[u8]) -> Result<Option<usize>, HeaderError> {
    if !starts_like_header(bytes) {
        return Err(HeaderError::Missing);
    }
    if bytes.starts_with(V1_PREFIX) {
        return match bytes.windows(2).position(|w| w == b"\r\n") {
            Some(at) if at + 2 <= V1_MAX => Ok(Some(at + 2)),
            Some(_) => Err(HeaderError::Invalid(
                "a v1 header longer than 107 bytes".into(),
            )),
            None if bytes.len() >= V1_MAX => Err(HeaderError::Invalid(
                "a v1 header longer than 107 bytes".into(),
            )),
            None => Ok(None),
        };
    }
    match bytes.get(14..16) {
        Some(&[hi, lo]) => Ok(Some(V2_FIXED + usize::from(u16::from_be_bytes([hi, lo])))),
        _ => Ok(None),
    }
}

/// The client address that a whole header names: `None` for a LOCAL
/// (v2, the balancer's own health check) or UNKNOWN (v1) connection, and
/// for families without an IP address.
///
/// # Errors
/// When the header doesn't parse.
pub fn client_address(header: &[u8]) -> Result<Option<SocketAddr>, HeaderError> {
    if header.starts_with(V1_PREFIX) {
        // ASCII only: ppp slices the text one past its CR by byte offset,
        // which panics inside a multi-byte character (found by fuzzing).
        if !header.is_ascii() {
            return Err(HeaderError::Invalid("a v1 header that is not ASCII".into()));
        }
        let text = std::str::from_utf8(header)
            .map_err(|_| HeaderError::Invalid("a v1 header that is not ASCII".into()))?;
        let parsed = v1::Header::try_from(text).map_err(|e| HeaderError::Invalid(e.to_string()))?;
        return Ok(match parsed.addresses {
            v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
            v1::Addresses::Unknown => None,
        });
    }
    let parsed = v2::Header::try_from(header).map_err(|e| HeaderError::Invalid(e.to_string()))?;
    if parsed.command == v2::Command::Local {
        return Ok(None);
    }
    Ok(match parsed.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_header(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&u16::try_from(addresses.len()).unwrap().to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[test]
    fn v1_headers_name_the_source_and_end_at_their_crlf() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 993\r\nA001 LOGIN";
        assert_eq!(header_len(h), Ok(Some(45)));
        assert_eq!(
            client_address(&h[..45]),
            Ok(Some("192.0.2.7:56324".parse().unwrap()))
        );
        let h6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 143\r\n";
        assert_eq!(
            client_address(h6),
            Ok(Some("[2001:db8::1]:4000".parse().unwrap()))
        );
        assert_eq!(client_address(b"PROXY UNKNOWN\r\n"), Ok(None));
        // Incomplete, then too long.
        assert_eq!(header_len(b"PROXY TCP4 192.0"), Ok(None));
        assert!(header_len(&[b"PROXY ".as_slice(), &[b'1'; 120]].concat()).is_err());
        assert!(client_address(b"PROXY TCP4 nonsense\r\n").is_err());
        // A multi-byte character right after the CR (a panic in ppp).
        assert!(client_address("PROXY TCP4 193.0.2.7 118.51.10.1 143\rÞGIN".as_bytes()).is_err());
    }

    #[test]
    fn v2_headers_name_the_source_or_nothing_for_local() {
        let mut addresses = vec![192, 0, 2, 7, 198, 51, 100, 1];
        addresses.extend_from_slice(&56324u16.to_be_bytes());
        addresses.extend_from_slice(&993u16.to_be_bytes());
        let h = v2_header(1, 0x11, &addresses);
        assert_eq!(header_len(&h[..15]), Ok(None));
        assert_eq!(header_len(&h), Ok(Some(28)));
        assert_eq!(
            client_address(&h),
            Ok(Some("192.0.2.7:56324".parse().unwrap()))
        );
        let local = v2_header(0, 0x00, &[]);
        assert_eq!(client_address(&local), Ok(None));
        // A wrong version nibble.
        let mut bad = h.clone();
        bad[12] = 0x31;
        assert!(client_address(&bad).is_err());
    }

    #[test]
    fn anything_else_is_no_header() {
        assert_eq!(header_len(b"a001 LOGIN"), Err(HeaderError::Missing));
        assert_eq!(header_len(&[0x16, 0x03, 0x01]), Err(HeaderError::Missing));
        assert!(starts_like_header(b"PRO"));
        assert!(starts_like_header(b"\r\n\r\n"));
        assert!(!starts_like_header(b"EHLO x"));
        assert!(!starts_like_header(b""));
        assert!(is_header(b"PROXY TCP4"));
        assert!(!is_header(b"\r\n"));
    }
}
