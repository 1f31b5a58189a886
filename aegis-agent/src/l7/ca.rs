//! The node CA: the certificate agent workloads trust (mounted bundle plus `SSL_CERT_FILE` /
//! `REQUESTS_CA_BUNDLE` / `NODE_EXTRA_CA_CERTS`) so that the L7 enforcer can terminate their
//! TLS. It mints one leaf certificate per server name (SNI), cached.
//!
//! Invariants: the CA key never leaves the node (written 0600 beside the certificate when
//! generated); leaves are ECDSA P-256, valid 24 hours (re-minted after 12), with the server
//! name as their only subject alternative name (RFC 6125); the cache holds at most
//! [`MAX_CACHED_LEAVES`] names.

use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::{
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    sign::CertifiedKey,
};

/// Names whose leaf certificate is kept; beyond, the cache is cleared (re-minting costs about
/// a millisecond).
pub const MAX_CACHED_LEAVES: usize = 10_000;
/// Validity of a minted leaf.
const LEAF_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Age after which a cached leaf is re-minted.
const LEAF_REFRESH: Duration = Duration::from_secs(12 * 3600);
/// Validity of a generated CA.
const CA_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// Errors of the node CA, naming the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a usable CA certificate or key: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("minting a certificate for {name}: {source}")]
    Mint {
        name: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("the certificate for {name} is unusable by TLS: {source}")]
    Key {
        name: String,
        #[source]
        source: rustls::Error,
    },
}

/// Chooses the leaf of the ClientHello's SNI (lowercased), minted or cached by the node CA; a
/// ClientHello without SNI, or a name the CA cannot mint for, gets none and the handshake fails.
pub struct LeafResolver(Arc<NodeCa>);

impl std::fmt::Debug for LeafResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeafResolver")
    }
}

impl rustls::server::ResolvesServerCert for LeafResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        self.0.leaf(&name).ok()
    }
}

/// The node CA and its leaf cache.
pub struct NodeCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    leaves: Mutex<HashMap<String, (Instant, Arc<CertifiedKey>)>>,
}

impl NodeCa {
    /// Loads the CA from `cert` and `key` (PEM), generating and writing both if neither exists.
    ///
    /// # Errors
    /// Only one of the files exists, or they cannot be read, parsed or written.
    pub fn load_or_create(cert: &Path, key: &Path) -> Result<NodeCa, CaError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        if !cert.exists() && !key.exists() {
            let (cert_pem, key_pem) = generate_ca()?;
            if let Some(dir) = cert.parent() {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            if let Some(dir) = key.parent() {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(key)
                .map_err(io_err(key))?;
            io::Write::write_all(&mut f, key_pem.as_bytes()).map_err(io_err(key))?;
            fs::write(cert, &cert_pem).map_err(io_err(cert))?;
            tracing::info!(target: "aegis::l7", cert = %cert.display(), "generated the node CA");
        }
        let cert_pem = fs::read_to_string(cert).map_err(io_err(cert))?;
        let key_pem = fs::read_to_string(key).map_err(io_err(key))?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|source| CaError::Parse {
            path: key.to_owned(),
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key_pair).map_err(|source| CaError::Parse {
                path: cert.to_owned(),
                source,
            })?;
        Ok(NodeCa {
            issuer,
            cert_pem,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM.
    #[cfg(test)]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The leaf certificate and key for `name` (a DNS name, lowercase), minted on first use.
    ///
    /// # Errors
    /// rcgen refuses the name or rustls the key.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let mut leaves = self.leaves.lock().expect("lock poisoned");
        if let Some((minted, key)) = leaves.get(name)
            && minted.elapsed() < LEAF_REFRESH
        {
            return Ok(key.clone());
        }
        let mint_err = |source| CaError::Mint {
            name: name.to_owned(),
            source,
        };
        let key = KeyPair::generate().map_err(mint_err)?;
        let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(mint_err)?;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + LEAF_VALIDITY;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(mint_err)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = any_supported_type(&der).map_err(|source| CaError::Key {
            name: name.to_owned(),
            source,
        })?;
        let ca_der = CertificateDer::from(self.issuer_der());
        let certified = Arc::new(CertifiedKey::new(vec![cert.der().clone(), ca_der], signing));
        if leaves.len() >= MAX_CACHED_LEAVES {
            leaves.clear();
        }
        leaves.insert(name.to_owned(), (Instant::now(), certified.clone()));
        Ok(certified)
    }

    /// One server configuration for every name this CA mints leaves for: the certificate is
    /// chosen by SNI ([`LeafResolver`]), ALPN offers `h2` and `http/1.1`, and clients get
    /// session tickets (RFC 8446 section 4.6.1; keys in memory only, rotated every 6 hours) so
    /// that those which resume (section 2.2) skip the certificate and its signature. Build it
    /// once: tickets are only good for the configuration that issued them.
    ///
    /// TLS 1.3's `TLS_AES_128_GCM_SHA256` (the suite RFC 8446 section 9.1 makes mandatory) is
    /// preferred over the client's order: its SHA-256 key schedule runs on the CPU's SHA
    /// extensions, where *ring*'s SHA-384 (for `TLS_AES_256_GCM_SHA384`, which OpenSSL clients
    /// list first) did not and took ~9 % of the enforcer's CPU with a connection per request
    /// (docs/benchmarks.md, seventh session).
    ///
    /// # Errors
    /// The ticket keys cannot be generated (no system randomness).
    pub fn server_config(self: &Arc<NodeCa>) -> Result<rustls::ServerConfig, rustls::Error> {
        let mut provider = rustls::crypto::ring::default_provider();
        // A stable sort: the suite first, the others in the provider's order.
        provider
            .cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(LeafResolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.ignore_client_order = true;
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
        Ok(config)
    }

    pub(crate) fn issuer_der(&self) -> Vec<u8> {
        rustls::pki_types::pem::PemObject::from_pem_slice(self.cert_pem.as_bytes())
            .map(|c: CertificateDer<'static>| c.to_vec())
            .unwrap_or_default()
    }
}

/// A new CA: ECDSA P-256, `CN=Aegis node CA`, path length 0 (it signs leaves only).
fn generate_ca() -> Result<(String, String), CaError> {
    let mint_err = |source| CaError::Mint {
        name: "node CA".into(),
        source,
    };
    let key = KeyPair::generate().map_err(mint_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(mint_err)?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + CA_VALIDITY;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "Aegis node CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Aegis");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).map_err(mint_err)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_loads_and_mints_verifiable_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        let ca = NodeCa::load_or_create(&cert, &key).unwrap();
        let mode = fs::metadata(&key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let again = NodeCa::load_or_create(&cert, &key).unwrap();
        assert_eq!(
            ca.cert_pem(),
            again.cert_pem(),
            "an existing CA is loaded, not replaced"
        );

        let leaf = again.leaf("api.stripe.com").unwrap();
        assert!(
            Arc::ptr_eq(&leaf, &again.leaf("api.stripe.com").unwrap()),
            "leaves are cached"
        );

        // The leaf verifies against the CA for its name, and not for another.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(again.issuer_der())).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier as _;
        let now = rustls::pki_types::UnixTime::now();
        let name = rustls::pki_types::ServerName::try_from("api.stripe.com").unwrap();
        verifier
            .verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &name, &[], now)
            .unwrap();
        let other = rustls::pki_types::ServerName::try_from("evil.example").unwrap();
        assert!(
            verifier
                .verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &other, &[], now)
                .is_err()
        );
    }

    /// Moves what `from` has to write into `to`; whether there was anything.
    fn pump(
        from: &mut rustls::Connection,
        to: &mut rustls::Connection,
    ) -> Result<bool, rustls::Error> {
        let mut bytes = Vec::new();
        while from.wants_write() {
            from.write_tls(&mut bytes).unwrap();
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            to.read_tls(&mut rest).unwrap();
            to.process_new_packets()?;
        }
        Ok(!bytes.is_empty())
    }

    /// Runs the handshake (and the server's session tickets) between two in-memory
    /// connections; the first error if it fails.
    fn handshake(
        client: &mut rustls::Connection,
        server: &mut rustls::Connection,
    ) -> Result<(), rustls::Error> {
        while pump(client, server)? | pump(server, client)? {}
        Ok(())
    }

    /// One configuration serves every name with its own leaf (verified by the client for that
    /// name), refuses a ClientHello without SNI, lets a client resume its session (a ticket),
    /// and prefers AES-128-GCM.
    #[test]
    fn one_server_config_serves_every_name_and_resumes_sessions() {
        use rustls::{ClientConnection, HandshakeKind, ServerConnection};
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        let ca = Arc::new(NodeCa::load_or_create(&cert, &key).unwrap());
        let server = Arc::new(ca.server_config().unwrap());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca.issuer_der())).unwrap();
        let client = |sni: bool| {
            let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            c.enable_sni = sni;
            Arc::new(c)
        };
        let connect = |config: &Arc<rustls::ClientConfig>, name: &str| {
            let name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
            let mut c = ClientConnection::new(config.clone(), name).unwrap().into();
            let mut s = ServerConnection::new(server.clone()).unwrap().into();
            handshake(&mut c, &mut s)?;
            // The client lists TLS_AES_256_GCM_SHA384 first (rustls' default order).
            let suite = c.negotiated_cipher_suite().unwrap().suite();
            assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
            Ok(c.handshake_kind())
        };
        let with_sni = client(true);
        for name in ["api.stripe.com", "hooks.slack.com"] {
            assert_eq!(
                connect(&with_sni, name).unwrap(),
                Some(HandshakeKind::Full),
                "{name}"
            );
        }
        assert_eq!(
            connect(&with_sni, "api.stripe.com").unwrap(),
            Some(HandshakeKind::Resumed)
        );
        let err: rustls::Error = connect(&client(false), "api.stripe.com").unwrap_err();
        assert!(err.to_string().contains("no server certificate"), "{err}");
    }

    #[test]
    fn half_a_ca_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        fs::write(&cert, "not a cert").unwrap();
        let err = NodeCa::load_or_create(&cert, &key)
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("ca.key"), "{err}");
    }
}
