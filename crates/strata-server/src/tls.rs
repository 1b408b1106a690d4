//! TLS credentials in qemu's x509 layout, so one directory serves qemu's
//! `tls-creds-x509,dir=DIR`, libnbd's `tls-certificates=DIR` and Strata alike:
//!
//! ```text
//! DIR/ca-cert.pem      the CA that signed the server's (and clients') certificates
//! DIR/server-cert.pem  this node's certificate (then any intermediates)
//! DIR/server-key.pem   its private key (PKCS#8, PKCS#1 or SEC1), readable by its owner only
//! ```
//!
//! [`Credentials::load`] reads and checks them once at start (a bad file is a clear error
//! naming it) and builds the rustls configurations: NBD's, which asks clients for a
//! certificate of the CA (required with `tls_verify_peer`, optional otherwise, so a
//! volume's access list can name certificate subjects), and HTTPS's, which does not.

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The CA's certificate file in a credential directory (qemu's name).
pub const CA_CERT: &str = "ca-cert.pem";
/// The server's certificate chain (qemu's name).
pub const SERVER_CERT: &str = "server-cert.pem";
/// The server's private key (qemu's name).
pub const SERVER_KEY: &str = "server-key.pem";

/// A node's TLS credentials, loaded and checked.
#[derive(Clone)]
pub struct Credentials {
    dir: PathBuf,
    nbd: Arc<ServerConfig>,
    https: Arc<ServerConfig>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// The crypto provider: ring. rustls 0.23.48 deprecates it for lacking post-quantum key
/// exchange; aws-lc-rs, which has it, is a long C build on a 2-core CI, and the NBD
/// clients (qemu and libnbd through GnuTLS) do not offer it in the versions here.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Credentials {
    /// Reads `dir`'s credentials. `verify_peer`: NBD clients must present a certificate
    /// signed by the CA (else one is asked for but not required).
    pub fn load(dir: &Path, verify_peer: bool) -> anyhow::Result<Credentials> {
        if !dir.is_dir() {
            bail!("the TLS directory {} does not exist", dir.display());
        }
        let chain = read_certs(&dir.join(SERVER_CERT))?;
        let key_path = dir.join(SERVER_KEY);
        crate::files::warn_if_exposed(&key_path, "the TLS private key");
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| anyhow::anyhow!("{}: no private key: {e}", key_path.display()))?;
        let ca_path = dir.join(CA_CERT);
        let roots = if ca_path.exists() {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(&ca_path)? {
                roots.add(cert).with_context(|| format!("{}: a bad CA", ca_path.display()))?;
            }
            Some(Arc::new(roots))
        } else if verify_peer {
            bail!("tls_verify_peer needs the CA certificate {}", ca_path.display());
        } else {
            None
        };
        let builder = || {
            ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .expect("the ring provider supports TLS 1.2 and 1.3")
        };
        let nbd = match &roots {
            Some(roots) => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider());
                let verifier =
                    if verify_peer { verifier } else { verifier.allow_unauthenticated() };
                let verifier = verifier.build().context("the client certificate verifier")?;
                builder().with_client_cert_verifier(verifier)
            }
            None => builder().with_no_client_auth(),
        }
        .with_single_cert(chain.clone(), key.clone_key())
        .with_context(|| {
            format!("{} and {} do not make a server credential", SERVER_CERT, SERVER_KEY)
        })?;
        let mut https = builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .context("the HTTPS credential")?;
        https.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Credentials { dir: dir.to_owned(), nbd: Arc::new(nbd), https: Arc::new(https) })
    }

    /// The directory they came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// NBD's server configuration (client certificates asked for, or required).
    pub fn nbd(&self) -> Arc<ServerConfig> {
        self.nbd.clone()
    }

    /// HTTPS's server configuration.
    pub fn https(&self) -> Arc<ServerConfig> {
        self.https.clone()
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_bad_credential_is_a_clear_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = format!("{:#}", Credentials::load(&dir.path().join("none"), false).unwrap_err());
        assert!(e.contains("does not exist"), "{e}");
        let e = format!("{:#}", Credentials::load(dir.path(), false).unwrap_err());
        assert!(e.contains(SERVER_CERT), "{e}");
        std::fs::write(dir.path().join(SERVER_CERT), "not a certificate").unwrap();
        let e = format!("{:#}", Credentials::load(dir.path(), false).unwrap_err());
        assert!(e.contains("no certificate"), "{e}");
    }
}
