//! Self-signed listener certificates (`mfd-relay make-cert`) and what kind of key one holds.
//!
//! RSA-2048 is the default: many printers made before about 2017 have no ECDSA suites at all,
//! and `AES128-SHA` (RSA key exchange) needs an RSA certificate. ECDSA P-256 is for listeners
//! that only modern devices use. ring cannot make RSA keys, so OpenSSL makes the key and rcgen
//! the certificate.

use std::path::Path;

/// The kind of key a certificate is made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyType {
    /// RSA 2048: every device, old ones included.
    Rsa,
    /// ECDSA P-256: smaller and faster, for listeners only modern devices use.
    Ecdsa,
}

/// Why a certificate could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("making the key: {0}")]
    Key(#[from] openssl::error::ErrorStack),
    #[error("making the certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("{0}: {1}")]
    Read(String, String),
}

/// A self-signed certificate for `names` (host names or IP addresses), valid ten years from
/// today, and its private key, both PEM.
pub fn self_signed(names: &[String], key_type: KeyType) -> Result<(String, String), CertError> {
    let key = match key_type {
        KeyType::Ecdsa => rcgen::KeyPair::generate()?,
        KeyType::Rsa => {
            let rsa = openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048)?)?;
            let pem = String::from_utf8_lossy(&rsa.private_key_to_pem_pkcs8()?).into_owned();
            rcgen::KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256)?
        }
    };
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, names.first().cloned().unwrap_or_default());
    use chrono::Datelike;
    let today = chrono::Utc::now().date_naive();
    params.not_before = rcgen::date_time_ymd(today.year(), today.month() as u8, today.day() as u8);
    params.not_after = rcgen::date_time_ymd(today.year() + 10, today.month() as u8, 1);
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Whether the first certificate in a PEM file has an RSA key.
pub fn is_rsa(cert: &Path) -> Result<bool, CertError> {
    let read = |e: String| CertError::Read(cert.display().to_string(), e);
    let pem = std::fs::read(cert).map_err(|e| read(e.to_string()))?;
    let x509 = openssl::x509::X509::from_pem(&pem).map_err(|e| read(e.to_string()))?;
    let key = x509.public_key().map_err(|e| read(e.to_string()))?;
    Ok(key.id() == openssl::pkey::Id::RSA)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsa_by_default_and_ecdsa_on_request() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (kind, rsa) in [(KeyType::Rsa, true), (KeyType::Ecdsa, false)] {
            let (cert, key) = self_signed(&["printer.lan".into(), "127.0.0.1".into()], kind).expect("cert");
            assert!(cert.starts_with("-----BEGIN CERTIFICATE-----") && key.contains("PRIVATE KEY"));
            let path = dir.path().join("c.pem");
            std::fs::write(&path, &cert).expect("write");
            assert_eq!(is_rsa(&path).expect("readable"), rsa, "{kind:?}");
            let x509 = openssl::x509::X509::from_pem(cert.as_bytes()).expect("pem");
            if rsa {
                assert_eq!(x509.public_key().and_then(|k| k.rsa()).map(|r| r.size() * 8).ok(), Some(2048));
            }
        }
    }

    #[test]
    fn a_file_that_is_no_certificate_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("not-a-cert.pem");
        std::fs::write(&path, "hello").expect("write");
        let e = is_rsa(&path).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("not-a-cert.pem"), "{e}");
    }
}
