//! The cluster's certificate authority. The controller creates it on first start and issues a
//! certificate to each host that joins with a valid join token, and one to itself for the agent
//! endpoint; controller and agents then talk over mutually authenticated TLS, and anything without a
//! certificate from this CA is refused. Keys are written with 0600 permissions.
//!
//! Only the CA's key and certificate are kept; to sign, the issuer is rebuilt from the same
//! distinguished name and key, which is all a signature depends on.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};

const CA_NAME: &str = "Corral cluster CA";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("the cluster CA in {dir} could not be used: {message}")]
    Ca { dir: String, message: String },
    #[error("issuing a certificate failed: {0}")]
    Issue(String),
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// A certificate and its private key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

pub struct Ca {
    cert_pem: String,
    key: KeyPair,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    params
}

/// Writes a file only its owner can read, atomically.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// SHA-256 of a certificate's DER, hex: how the controller recognises a host's certificate, and how
/// a join token pins the CA.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The first certificate in a PEM text.
pub fn first_cert(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::Tls(format!("bad certificate PEM: {e}")))
}

impl Ca {
    /// Loads the CA from `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<Ca, PkiError> {
        let err = |e: &dyn std::fmt::Display| PkiError::Ca {
            dir: dir.display().to_string(),
            message: e.to_string(),
        };
        let (cert_path, key_path): (PathBuf, PathBuf) = (dir.join("ca.crt"), dir.join("ca.key"));
        if cert_path.exists() != key_path.exists() {
            return Err(err(&"only one of ca.crt and ca.key exists: restore the missing one from a backup (a new CA would lock out every joined host)"));
        }
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(|e| err(&e))?;
            let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path).map_err(|e| err(&e))?)
                .map_err(|e| err(&e))?;
            return Ok(Ca { cert_pem, key });
        }
        let key = KeyPair::generate().map_err(|e| err(&e))?;
        let cert = ca_params().self_signed(&key).map_err(|e| err(&e))?;
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(|e| err(&e))?;
        write_private(&cert_path, cert.pem().as_bytes()).map_err(|e| err(&e))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn fingerprint(&self) -> Result<String, PkiError> {
        Ok(fingerprint(first_cert(&self.cert_pem)?.as_ref()))
    }

    fn issue(
        &self,
        common_name: &str,
        names: &[String],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<Identity, PkiError> {
        let e = |e: rcgen::Error| PkiError::Issue(e.to_string());
        let mut params = CertificateParams::new(names.to_vec()).map_err(e)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let key = KeyPair::generate().map_err(e)?;
        let issuer = Issuer::new(ca_params(), &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(e)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client certificate for host `name`.
    pub fn issue_host(&self, name: &str) -> Result<Identity, PkiError> {
        self.issue(
            name,
            &[name.to_string()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// A server certificate for the controller's agent endpoint, valid for `names` (IPs or DNS names).
    pub fn issue_server(&self, names: &[String]) -> Result<Identity, PkiError> {
        self.issue(
            "corral-controller",
            names,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca_pem: &str) -> Result<rustls::RootCertStore, PkiError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(first_cert(ca_pem)?)
        .map_err(|e| PkiError::Tls(e.to_string()))?;
    Ok(roots)
}

fn key_of(
    identity: &Identity,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
    let cert = first_cert(&identity.cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes())
        .map_err(|e| PkiError::Tls(format!("bad key PEM: {e}")))?;
    Ok((vec![cert], key))
}

/// TLS for the controller's agent endpoint: client certificates are checked against the cluster CA
/// when presented. A client without one gets through the handshake (it may be joining) but is
/// refused by every endpoint except the join endpoints; a certificate from elsewhere fails the
/// handshake.
pub fn server_config(ca_pem: &str, server: &Identity) -> Result<rustls::ServerConfig, PkiError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| PkiError::Tls(e.to_string()))?;
    let (certs, key) = key_of(server)?;
    rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| PkiError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| PkiError::Tls(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_survives_a_reload_and_signs_verifiable_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::load_or_create(dir.path()).expect("create");
        let fp = ca.fingerprint().expect("fp");
        let again = Ca::load_or_create(dir.path()).expect("reload");
        assert_eq!(
            again.fingerprint().expect("fp"),
            fp,
            "the same CA after a restart"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "CA key is private");

        // A host certificate issued after the reload verifies against the CA certificate of before.
        let host = again.issue_host("host-a").expect("issue");
        let cert = first_cert(&host.cert_pem).expect("cert");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(ca.cert_pem()).expect("roots")),
            provider(),
        )
        .build()
        .expect("verifier");
        let now = rustls::pki_types::UnixTime::now();
        verifier
            .verify_client_cert(&cert, &[], now)
            .expect("issued by the cluster CA");

        // A certificate from another CA does not.
        let other = Ca::load_or_create(&dir.path().join("other")).expect("other CA");
        let foreign =
            first_cert(&other.issue_host("host-a").expect("issue").cert_pem).expect("cert");
        assert!(verifier.verify_client_cert(&foreign, &[], now).is_err());
        assert!(server_config(
            ca.cert_pem(),
            &ca.issue_server(&["127.0.0.1".into()]).expect("server")
        )
        .is_ok());
    }
}
