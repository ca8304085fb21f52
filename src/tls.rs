//! rustls configurations, built once at start: the listeners' server config
//! (from PEM files, or a self-signed certificate kept in the state
//! directory) and the upstreams' client configs (webpki roots plus an
//! optional extra CA).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::CertificateFiles;

/// A TLS setup failure; names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn file_error(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// The one crypto provider: ring. Both providers in the tree would make
/// rustls panic at its first default lookup, so everything names this one.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: cipher_suites(),
        ..rustls::crypto::ring::default_provider()
    })
}

/// ring's suites, AES-128-GCM first. ring's default order puts
/// AES-256-GCM-SHA384 first; its SHA-384 has no hardware path on x86-64
/// (SHA-256 has SHA-NI), so every handshake's transcript hash and key
/// schedule cost more, and AES-256 takes 14 rounds to AES-128's 10 for
/// every relayed byte. AES-128-GCM is as strong as anyone needs (it is
/// what Go and BoringSSL prefer), and the same suites stay on offer.
fn cipher_suites() -> Vec<rustls::SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite as cs;
    vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
}

/// Installs ring as the process default (for reqwest), once.
pub fn install_default_provider() {
    // Err means it is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The listeners' TLS configuration and its certificate's SHA-256.
pub struct ServerTls {
    pub config: Arc<ServerConfig>,
    /// Hex SHA-256 of the leaf certificate, as clients pin it.
    pub fingerprint: String,
    /// When the leaf certificate expires, in Unix seconds.
    pub not_after: u64,
}

/// Loads the configured certificate, or the self-signed one in `state_dir`
/// (made on first start and kept across restarts).
///
/// # Errors
/// When a file can't be read or written, or holds no usable key or cert.
pub fn server(files: Option<&CertificateFiles>, state_dir: &Path) -> Result<ServerTls, TlsError> {
    let (cert_path, key_path) = match files {
        Some(f) => (f.cert.clone(), f.key.clone()),
        None => self_signed(state_dir)?,
    };
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| file_error(&cert_path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(&cert_path, e))?;
    let Some(leaf) = certs.first() else {
        return Err(file_error(&cert_path, "no certificate in the file"));
    };
    let fingerprint = hex(ring::digest::digest(&ring::digest::SHA256, leaf).as_ref());
    // Only for the expiry gauge and warnings: a certificate that rustls
    // takes but this parser doesn't must not stop the start.
    let not_after = not_after(leaf).unwrap_or_else(|why| {
        tracing::warn!(file = %cert_path.display(), error = %why, "can't read the listener certificate's expiry");
        0
    });
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_error(&key_path, e))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    // Our order over the client's: most clients (OpenSSL, Java) ask for
    // AES-256-GCM first; see `cipher_suites`.
    config.ignore_client_order = true;
    Ok(ServerTls {
        config: Arc::new(config),
        fingerprint,
        not_after,
    })
}

/// When the first certificate of a PEM file expires, in Unix seconds.
///
/// # Errors
/// When the file can't be read or holds no certificate.
pub fn file_not_after(path: &Path) -> Result<u64, TlsError> {
    let first = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .next()
        .ok_or_else(|| file_error(path, "no certificate in the file"))?
        .map_err(|e| file_error(path, e))?;
    not_after(&first).map_err(|why| file_error(path, why))
}

/// When a DER certificate expires, in Unix seconds.
///
/// # Errors
/// When it doesn't parse.
pub fn not_after(der: &[u8]) -> Result<u64, String> {
    use x509_cert::der::Decode as _;
    let cert = x509_cert::Certificate::from_der(der).map_err(|e| format!("certificate: {e}"))?;
    Ok(cert
        .tbs_certificate
        .validity
        .not_after
        .to_unix_duration()
        .as_secs())
}

fn self_signed(state_dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let dir = state_dir.join("tls");
    let cert = dir.join("self-signed.pem");
    let key = dir.join("self-signed.key");
    if cert.is_file() && key.is_file() {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(&dir).map_err(|e| file_error(&dir, e))?;
    let hostname = std::fs::read_to_string("/etc/hostname")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mut names = vec!["localhost".to_owned()];
    if !hostname.is_empty() && hostname != "localhost" {
        names.push(hostname);
    }
    let generated = rcgen::generate_simple_self_signed(names)?;
    write_private(&key, generated.signing_key.serialize_pem().as_bytes())?;
    std::fs::write(&cert, generated.cert.pem()).map_err(|e| file_error(&cert, e))?;
    Ok((cert, key))
}

/// Writes a file readable by its owner only.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_error(path, e))?;
    f.write_all(contents).map_err(|e| file_error(path, e))
}

/// A client config trusting the webpki roots plus `extra_ca`.
///
/// # Errors
/// When the CA file can't be read or holds no certificate.
pub fn client(extra_ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca {
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| file_error(path, e))? {
            roots.add(cert.map_err(|e| file_error(path, e))?)?;
            added += 1;
        }
        if added == 0 {
            return Err(file_error(path, "no certificate in the file"));
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl From<TlsError> for io::Error {
    fn from(e: TlsError) -> Self {
        io::Error::other(e.to_string())
    }
}

/// TLS connectors by extra CA file (`None`: webpki roots only).
pub type Connectors = std::collections::HashMap<Option<PathBuf>, tokio_rustls::TlsConnector>;

/// One TLS connector per distinct extra CA file, built once for every
/// upstream of `config`.
///
/// # Errors
/// When a CA file can't be read or holds no certificate.
pub fn connectors(config: &crate::config::Config) -> Result<Connectors, TlsError> {
    let mut connectors = Connectors::new();
    let upstreams = config.accounts.values().flat_map(|a| a.upstreams.values());
    for server in upstreams {
        if let std::collections::hash_map::Entry::Vacant(entry) =
            connectors.entry(server.ca_file.clone())
        {
            let tls = client(entry.key().as_deref())?;
            entry.insert(tokio_rustls::TlsConnector::from(tls));
        }
    }
    Ok(connectors)
}
