//! TLS for old devices: OpenSSL, for listeners with `legacy_tls = true` only.
//!
//! rustls speaks TLS 1.2 and 1.3 with AEAD suites and nothing else. Printers and scanners made
//! before about 2017 often offer only TLS 1.0/1.1, or TLS 1.2 with CBC suites and RSA key
//! exchange (`AES128-SHA`, `AES256-SHA`, `ECDHE-RSA-AES128-SHA`); against a rustls listener their
//! handshake fails, and having seen STARTTLS advertised they do not fall back to plaintext. A
//! legacy listener accepts them through OpenSSL at security level 0. Everything else in the
//! relay (the default listeners, every connection to a provider) stays on rustls
//! (ARCHITECTURE.md, "TLS").

use std::path::Path;
use std::pin::Pin;

use openssl::ssl::{Ssl, SslAcceptor, SslMethod, SslOptions, SslRef, SslVersion};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_openssl::SslStream;

/// The cipher list (TLS 1.2 and older) a legacy listener offers: every AES and ChaCha suite,
/// CBC and RSA key exchange included, strongest first. Not offered even here: NULL, export,
/// anonymous, DES, 3DES (Sweet32), RC4, MD5, PSK and SRP suites.
pub const LEGACY_CIPHERS: &str =
    "HIGH:!aNULL:!eNULL:!EXPORT:!DES:!3DES:!RC4:!MD5:!PSK:!SRP:!CAMELLIA:!ARIA:!SEED:!IDEA:@STRENGTH:@SECLEVEL=0";

/// Why a legacy acceptor cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum LegacyTlsError {
    #[error("{path}: {source}")]
    File { path: String, source: openssl::error::ErrorStack },
    #[error("the certificate does not match the key: {0}")]
    Mismatch(openssl::error::ErrorStack),
    #[error("OpenSSL setup: {0}")]
    Setup(#[from] openssl::error::ErrorStack),
}

/// An OpenSSL acceptor that also speaks TLS 1.0 and 1.1 and the CBC / RSA-key-exchange suites,
/// from the listener's PEM certificate (chain) and key.
pub fn acceptor(cert: &Path, key: &Path) -> Result<SslAcceptor, LegacyTlsError> {
    fn file(path: &Path) -> impl FnOnce(openssl::error::ErrorStack) -> LegacyTlsError + '_ {
        move |source| LegacyTlsError::File { path: path.display().to_string(), source }
    }
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())?;
    // Debian's openssl.cnf asks for security level 2 and TLS 1.2; this listener exists to
    // undo exactly that, for itself only.
    b.set_security_level(0);
    b.clear_options(SslOptions::NO_TLSV1 | SslOptions::NO_TLSV1_1);
    // No renegotiation: each one costs the server a handshake, and the old protocols this
    // listener speaks are where renegotiation attacks lived.
    b.set_options(SslOptions::NO_RENEGOTIATION);
    b.set_min_proto_version(Some(SslVersion::TLS1))?;
    b.set_cipher_list(LEGACY_CIPHERS)?;
    b.set_certificate_chain_file(cert).map_err(file(cert))?;
    b.set_private_key_file(key, openssl::ssl::SslFiletype::PEM).map_err(file(key))?;
    b.check_private_key().map_err(LegacyTlsError::Mismatch)?;
    Ok(b.build())
}

/// Runs the server side of a handshake over `stream`.
pub async fn accept<S>(acceptor: &SslAcceptor, stream: S) -> Result<SslStream<S>, openssl::ssl::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ssl = Ssl::new(acceptor.context()).map_err(openssl::ssl::Error::from)?;
    let mut tls = SslStream::new(ssl, stream).map_err(openssl::ssl::Error::from)?;
    Pin::new(&mut tls).accept().await?;
    Ok(tls)
}

/// The negotiated protocol version ("TLSv1", "TLSv1.2", ...) and cipher suite of a session,
/// for the log and the per-version session count.
pub fn negotiated(ssl: &SslRef) -> (&'static str, String) {
    let cipher = ssl.current_cipher().map(|c| c.name().to_string()).unwrap_or_default();
    (ssl.version_str(), cipher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::ssl::{SslConnector, SslVerifyMode};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn rsa_files(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let (cert, key) =
            crate::certs::self_signed(&["localhost".into()], crate::certs::KeyType::Rsa).expect("a certificate");
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, cert).expect("write");
        std::fs::write(&k, key).expect("write");
        (c, k)
    }

    /// A client as old as the printers: one protocol version and one suite (None: this
    /// OpenSSL has no such suite at all).
    fn try_old_client(version: SslVersion, cipher: &str) -> Option<SslConnector> {
        let mut b = SslConnector::builder(SslMethod::tls_client()).ok()?;
        b.set_security_level(0);
        b.clear_options(SslOptions::NO_TLSV1 | SslOptions::NO_TLSV1_1);
        b.set_min_proto_version(Some(version)).ok()?;
        b.set_max_proto_version(Some(version)).ok()?;
        b.set_cipher_list(&format!("{cipher}:@SECLEVEL=0")).ok()?;
        b.set_verify(SslVerifyMode::NONE);
        Some(b.build())
    }

    fn old_client(version: SslVersion, cipher: &str) -> SslConnector {
        try_old_client(version, cipher).unwrap_or_else(|| panic!("this OpenSSL cannot offer {cipher}"))
    }

    async fn handshake(acceptor: SslAcceptor, client: SslConnector) -> Result<(&'static str, String), String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut tls = accept(&acceptor, a).await.map_err(|e| e.to_string())?;
            let got = negotiated(tls.ssl());
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            tls.write_all(&buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(got)
        });
        let ssl = client.configure().and_then(|c| c.into_ssl("localhost")).map_err(|e| e.to_string())?;
        let mut tls = SslStream::new(ssl, b).map_err(|e| e.to_string())?;
        let client_side = async {
            Pin::new(&mut tls).connect().await.map_err(|e| e.to_string())?;
            tls.write_all(b"EHLO").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(buf)
        };
        let echoed = client_side.await;
        let server = server.await.map_err(|e| e.to_string())?;
        assert_eq!(&echoed?, b"EHLO");
        server
    }

    #[tokio::test]
    async fn tls_1_0_with_aes128_sha_is_accepted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = rsa_files(dir.path());
        for (version, cipher, name) in [
            (SslVersion::TLS1, "AES128-SHA", "TLSv1"),
            (SslVersion::TLS1_1, "AES256-SHA", "TLSv1.1"),
            (SslVersion::TLS1_2, "ECDHE-RSA-AES128-SHA", "TLSv1.2"),
        ] {
            let got = handshake(acceptor(&c, &k).expect("acceptor"), old_client(version, cipher)).await;
            assert_eq!(got, Ok((name, cipher.to_string())), "{name} {cipher}");
        }
    }

    #[tokio::test]
    async fn weak_suites_stay_refused_even_here() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, k) = rsa_files(dir.path());
        let mut tried = 0;
        for cipher in ["DES-CBC3-SHA", "NULL-SHA", "RC4-SHA", "CAMELLIA128-SHA", "SEED-SHA"] {
            // Suites this OpenSSL was built without cannot be offered by any client either.
            let Some(client) = try_old_client(SslVersion::TLS1, cipher) else { continue };
            let got = handshake(acceptor(&c, &k).expect("acceptor"), client).await;
            assert!(got.is_err(), "{cipher}: {got:?}");
            tried += 1;
        }
        assert!(tried > 0, "no weak suite could be offered at all");
    }

    #[test]
    fn a_key_that_does_not_match_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (c, _) = rsa_files(dir.path());
        let (_, other_key) = crate::certs::self_signed(&["x".into()], crate::certs::KeyType::Rsa).expect("cert");
        let k = dir.path().join("other.pem");
        std::fs::write(&k, other_key).expect("write");
        let e = acceptor(&c, &k).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("other.pem") && e.contains("mismatch"), "{e}");
        let missing = dir.path().join("missing.pem");
        let e = acceptor(&missing, &k).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("missing.pem"), "{e}");
    }
}
