//! RS256 JSON Web Tokens for client assertions (RFC 7523 §2.2, Microsoft's
//! certificate credentials) and Google service accounts (RFC 7523 §2.1).
//!
//! Signed with ring directly: jsonwebtoken 12 offers only aws-lc-rs or
//! RustCrypto backends, and the crate keeps a single crypto provider.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivateKeyDer;

/// An RSA key that signs JWTs. `Debug` shows nothing of the key.
pub struct Signer {
    key: RsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<redacted>)")
    }
}

impl Signer {
    /// A signer for a PEM RSA private key (PKCS#8 or PKCS#1).
    ///
    /// # Errors
    /// When the PEM holds no RSA key ring accepts.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| format!("private key: {e}"))?;
        let key = match &der {
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            _ => return Err("private key: only RSA keys can sign RS256".into()),
        }
        .map_err(|e| format!("private key: not a usable RSA key ({e})"))?;
        Ok(Self {
            key,
            rng: SystemRandom::new(),
        })
    }

    /// `base64url(header).base64url(claims).base64url(signature)`.
    ///
    /// # Errors
    /// Only if signing itself fails.
    pub fn sign(
        &self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, String> {
        let mut jwt = URL_SAFE_NO_PAD.encode(header.to_string());
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(claims.to_string()));
        let mut signature = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, jwt.as_bytes(), &mut signature)
            .map_err(|_| "signing failed".to_owned())?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(jwt)
    }
}

/// base64url without padding, as JWT headers want thumbprints.
pub fn base64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_a_verifiable_rs256_jwt() {
        // ring can't generate RSA keys; openssl (installed by the test set-up) can.
        let out = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .output()
            .expect("openssl");
        let pem = String::from_utf8(out.stdout).unwrap();
        let signer = Signer::from_pem(&pem).unwrap();
        let jwt = signer
            .sign(
                &serde_json::json!({"alg": "RS256", "typ": "JWT"}),
                &serde_json::json!({"iss": "me", "exp": 1}),
            )
            .unwrap();
        let (signed, signature) = jwt.rsplit_once('.').unwrap();
        let (header, claims) = signed.split_once('.').unwrap();
        assert_eq!(
            URL_SAFE_NO_PAD.decode(header).unwrap(),
            br#"{"alg":"RS256","typ":"JWT"}"#
        );
        assert_eq!(
            URL_SAFE_NO_PAD.decode(claims).unwrap(),
            br#"{"exp":1,"iss":"me"}"#
        );
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            signer.key.public().as_ref().to_vec(),
        );
        public
            .verify(
                signed.as_bytes(),
                &URL_SAFE_NO_PAD.decode(signature).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn only_rsa_pem_keys_are_accepted() {
        assert!(Signer::from_pem("not a key").is_err());
        let ec = rcgen::KeyPair::generate().unwrap().serialize_pem();
        assert!(Signer::from_pem(&ec).unwrap_err().contains("RSA"));
        assert_eq!(base64url(b"\xfb\xff"), "-_8");
    }
}
