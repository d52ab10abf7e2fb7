//! HTTPS on the public listener: rustls with the ring provider (half the build time of
//! aws-lc-rs on two cores, measured: README, HTTPS), TLS 1.2 and 1.3, ALPN `h2` and `http/1.1`, session resumption by ID (TLS 1.2) and by
//! ticket (both). Several certificate pairs may be given; each handshake gets the first whose
//! certificate is valid for the name the client asked for (SNI), else the first.
//!
//! Invariant: the pairs in use were all read and checked together. A reload reads every
//! pair again and swaps them in at once, or, if any file is unreadable, has no certificate or
//! key, or holds a key that does not match its certificate, refuses and keeps the old ones.
//! Open connections keep the certificate they were opened with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The certificate and key files of one pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The listener's TLS: its configuration, and the certificates it presents, replaceable.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ServerConfig>,
    certificates: Arc<Certificates>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("certificates", &self.certificates.keys.load().len()).finish()
    }
}

impl Tls {
    /// Reads every pair; an error names the file.
    pub fn load(pairs: &[Pair]) -> Result<Tls> {
        let certificates = Arc::new(Certificates { keys: ArcSwap::from_pointee(read_pairs(pairs)?) });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .context("setting up TLS")?
            .with_no_client_auth()
            .with_cert_resolver(certificates.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ticketer = rustls::crypto::ring::Ticketer::new().context("setting up TLS session tickets")?;
        Ok(Tls { config: Arc::new(config), certificates })
    }

    /// Reads every pair again and presents them from the next handshake on; on an error the
    /// pairs in use stay.
    pub fn reload(&self, pairs: &[Pair]) -> Result<()> {
        let keys = read_pairs(pairs)?;
        self.certificates.keys.store(Arc::new(keys));
        Ok(())
    }

    pub fn config(&self) -> &Arc<rustls::ServerConfig> {
        &self.config
    }
}

/// The pairs in use, each with the names its certificate is valid for checked at handshake.
#[derive(Debug)]
struct Certificates {
    keys: ArcSwap<Vec<Arc<CertifiedKey>>>,
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let keys = self.keys.load();
        if keys.len() > 1 {
            if let Some(name) = hello.server_name().and_then(|n| ServerName::try_from(n.to_owned()).ok()) {
                if let Some(key) = keys.iter().find(|key| valid_for(key, &name)) {
                    return Some(key.clone());
                }
            }
        }
        keys.first().cloned()
    }
}

fn valid_for(key: &CertifiedKey, name: &ServerName<'_>) -> bool {
    let Some(cert) = key.cert.first() else { return false };
    webpki::EndEntityCert::try_from(cert)
        .is_ok_and(|cert| cert.verify_is_valid_for_subject_name(name).is_ok())
}

fn read_pairs(pairs: &[Pair]) -> Result<Vec<Arc<CertifiedKey>>> {
    if pairs.is_empty() {
        bail!("no TLS certificate given");
    }
    pairs.iter().map(read_pair).collect()
}

fn read_pair(pair: &Pair) -> Result<Arc<CertifiedKey>> {
    let certs = read_certs(&pair.cert)?;
    let key = PrivateKeyDer::from_pem_file(&pair.key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => anyhow!("no private key in {}", pair.key.display()),
        e => anyhow!("reading TLS key {}: {e}", pair.key.display()),
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| anyhow!("TLS key {}: {e}", pair.key.display()))?;
    let certified = CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|_| {
        anyhow!("TLS key {} does not match the certificate in {}", pair.key.display(), pair.cert.display())
    })?;
    Ok(Arc::new(certified))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| anyhow!("reading TLS certificate {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("reading TLS certificate {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    webpki::EndEntityCert::try_from(&certs[0]).map_err(|e| {
        anyhow!("TLS certificate {}: not a certificate rip can present ({e})", path.display())
    })?;
    Ok(certs)
}
