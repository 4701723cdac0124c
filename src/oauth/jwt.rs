//! RS256 JSON Web Tokens (RFC 7519) for the two grants that sign their own request:
//! Microsoft's certificate client assertion (RFC 7523 2.2, header `x5t#S256`) and Google's
//! service-account JWT bearer grant (RFC 7523 2.1).

use std::path::Path;

use base64::Engine;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// An RSA signing key with an optional certificate thumbprint.
pub struct Signer {
    key: RsaKeyPair,
    /// base64url SHA-256 of the certificate (DER), for `x5t#S256`.
    pub x5t_s256: Option<String>,
    /// Certificate expiry (unix seconds), to warn before it lapses.
    pub cert_not_after: Option<i64>,
}

/// Loads an RSA private key from PEM text (PKCS#8 "PRIVATE KEY" or PKCS#1 "RSA PRIVATE KEY").
pub fn rsa_key_from_pem(pem: &[u8]) -> Result<RsaKeyPair, String> {
    let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| format!("no private key in PEM ({e})"))?;
    match &der {
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
        _ => return Err("the private key must be RSA (PKCS#8 or PKCS#1)".into()),
    }
    .map_err(|e| format!("unusable RSA key: {e}"))
}

impl Signer {
    /// Loads a certificate and its key (PEM files) for client assertions.
    pub fn from_cert_files(cert: &Path, key: &Path) -> Result<Signer, String> {
        let cert_der =
            CertificateDer::from_pem_file(cert).map_err(|e| format!("{}: no certificate ({e})", cert.display()))?;
        let key_pem = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
        let key = rsa_key_from_pem(&key_pem).map_err(|e| format!("{}: {e}", key.display()))?;
        Ok(Signer {
            key,
            x5t_s256: Some(b64url(&sha2::Sha256::digest(cert_der.as_ref()))),
            cert_not_after: crate::oauth::jwt::not_after(cert_der.as_ref()),
        })
    }

    pub fn from_key_pem(pem: &[u8]) -> Result<Signer, String> {
        Ok(Signer { key: rsa_key_from_pem(pem)?, x5t_s256: None, cert_not_after: None })
    }

    /// Signs `claims` with RS256; `kid` names the key where the issuer wants it.
    pub fn sign(&self, claims: &serde_json::Value, kid: Option<&str>) -> Result<String, String> {
        let mut header = serde_json::json!({ "alg": "RS256", "typ": "JWT" });
        if let Some(x5t) = &self.x5t_s256 {
            header["x5t#S256"] = x5t.clone().into();
        }
        if let Some(kid) = kid {
            header["kid"] = kid.into();
        }
        let input = format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), input.as_bytes(), &mut sig)
            .map_err(|_| "RSA signing failed".to_string())?;
        Ok(format!("{input}.{}", b64url(&sig)))
    }
}

/// The notAfter of a DER certificate (unix seconds), read without a full X.509 parser:
/// the validity is the first SEQUENCE of two times after the signature algorithm.
pub fn not_after(der: &[u8]) -> Option<i64> {
    // Find UTCTime (0x17, len 13) or GeneralizedTime (0x18, len 15) pairs; the second time of
    // the first pair is notAfter.
    let mut times = Vec::new();
    let mut i = 0;
    while i + 2 < der.len() && times.len() < 2 {
        let (tag, len) = (der[i], der[i + 1] as usize);
        if (tag == 0x17 && len == 13) || (tag == 0x18 && len == 15) {
            if let Some(raw) = der.get(i + 2..i + 2 + len) {
                if let Some(t) = parse_asn1_time(raw, tag == 0x18) {
                    times.push(t);
                    i += 2 + len;
                    continue;
                }
            }
        }
        i += 1;
    }
    times.get(1).copied()
}

fn parse_asn1_time(raw: &[u8], generalized: bool) -> Option<i64> {
    let s = std::str::from_utf8(raw).ok()?.strip_suffix('Z')?;
    let full = if generalized {
        s.to_string()
    } else {
        let yy: i32 = s.get(0..2)?.parse().ok()?;
        format!("{}{}", if yy >= 50 { 19 } else { 20 }, s)
    };
    let dt = chrono::NaiveDateTime::parse_from_str(&full, "%Y%m%d%H%M%S").ok()?;
    Some(dt.and_utc().timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_after_reads_generated_certificates() {
        let mut params = rcgen::CertificateParams::new(vec!["x".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2026, 1, 1);
        params.not_after = rcgen::date_time_ymd(2027, 6, 30);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let want =
            chrono::NaiveDate::from_ymd_opt(2027, 6, 30).unwrap().and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp();
        assert_eq!(not_after(cert.der()), Some(want));
    }
}
