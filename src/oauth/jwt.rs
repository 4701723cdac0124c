//! Signed JSON Web Tokens (RFC 7519) for the two grants that sign their own request:
//! - Microsoft's certificate client assertion (RFC 7523 2.2): PS256 (RSASSA-PSS with SHA-256,
//!   RFC 7518 3.5) with the certificate's SHA-256 thumbprint in `x5t#S256`, the pairing the
//!   Microsoft identity platform documents for certificate credentials (RS256 goes with the
//!   older SHA-1 `x5t`);
//! - Google's service-account JWT bearer grant (RFC 7523 2.1): RS256 (RSASSA-PKCS1-v1_5 with
//!   SHA-256, RFC 7518 3.3), what Google documents.

use std::path::Path;

use base64::Engine;
use ring::signature::{RsaEncoding, RsaKeyPair, RSA_PKCS1_SHA256, RSA_PSS_SHA256};
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

    /// The JWS algorithm: PS256 for a certificate (with `x5t#S256`), RS256 for a bare key.
    pub fn alg(&self) -> &'static str {
        if self.x5t_s256.is_some() {
            "PS256"
        } else {
            "RS256"
        }
    }

    /// Signs `claims` ([`Signer::alg`]); `kid` names the key where the issuer wants it.
    pub fn sign(&self, claims: &serde_json::Value, kid: Option<&str>) -> Result<String, String> {
        let alg = self.alg();
        let encoding: &'static dyn RsaEncoding = if alg == "PS256" { &RSA_PSS_SHA256 } else { &RSA_PKCS1_SHA256 };
        let mut header = serde_json::json!({ "alg": alg, "typ": "JWT" });
        if let Some(x5t) = &self.x5t_s256 {
            header["x5t#S256"] = x5t.clone().into();
        }
        if let Some(kid) = kid {
            header["kid"] = kid.into();
        }
        let input = format!("{}.{}", b64url(header.to_string().as_bytes()), b64url(claims.to_string().as_bytes()));
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(encoding, &ring::rand::SystemRandom::new(), input.as_bytes(), &mut sig)
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

    const KEY: &str = include_str!("testdata/rsa-2048-key.pem");

    fn decode(jwt: &str) -> (serde_json::Value, String, Vec<u8>) {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (input, sig) = jwt.rsplit_once('.').unwrap();
        let header = serde_json::from_slice(&b64.decode(input.split('.').next().unwrap()).unwrap()).unwrap();
        (header, input.to_string(), b64.decode(sig).unwrap())
    }

    #[test]
    fn certificate_assertions_are_ps256_with_the_sha256_thumbprint() {
        let dir = tempfile::tempdir().unwrap();
        let kp = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(KEY, &rcgen::PKCS_RSA_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["app".into()]).unwrap().self_signed(&kp).unwrap();
        std::fs::write(dir.path().join("c.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("k.pem"), KEY).unwrap();
        let signer = Signer::from_cert_files(&dir.path().join("c.pem"), &dir.path().join("k.pem")).unwrap();
        let jwt = signer.sign(&serde_json::json!({"iss": "x"}), None).unwrap();
        let (header, input, sig) = decode(&jwt);
        assert_eq!(header["alg"], "PS256", "{header}");
        assert_eq!(header["x5t#S256"].as_str(), Some(b64url(&sha2::Sha256::digest(cert.der())).as_str()));
        let public = rsa_key_from_pem(KEY.as_bytes()).unwrap().public().as_ref().to_vec();
        let verify = |alg: &'static dyn ring::signature::VerificationAlgorithm| {
            ring::signature::UnparsedPublicKey::new(alg, &public).verify(input.as_bytes(), &sig).is_ok()
        };
        assert!(verify(&ring::signature::RSA_PSS_2048_8192_SHA256), "a PSS signature");
        assert!(!verify(&ring::signature::RSA_PKCS1_2048_8192_SHA256));

        // A bare key (Google service accounts): RS256, as Google documents.
        let jwt = Signer::from_key_pem(KEY.as_bytes()).unwrap().sign(&serde_json::json!({}), Some("k1")).unwrap();
        let (header, input2, sig2) = decode(&jwt);
        assert_eq!((header["alg"].as_str(), header["kid"].as_str()), (Some("RS256"), Some("k1")));
        assert!(ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, &public)
            .verify(input2.as_bytes(), &sig2)
            .is_ok());
    }

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
