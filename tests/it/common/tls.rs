//! rustls configurations for the fakes (server side) and for test clients.
//!
//! Everything is built with an explicit ring [`CryptoProvider`], so nothing
//! depends on a process-wide default provider having been installed.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::CertPair;

/// The ring crypto provider (the only one compiled into this crate).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.2 + 1.3 server configuration presenting `cert`, no client auth.
pub fn server_config(cert: &CertPair) -> Arc<ServerConfig> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("rustls protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert()], cert.key())
        .expect("rustls server certificate");
    Arc::new(config)
}

/// A tokio acceptor for [`server_config`].
pub fn acceptor(cert: &CertPair) -> TlsAcceptor {
    TlsAcceptor::from(server_config(cert))
}

/// A client configuration that trusts exactly `cert` (a self-signed
/// certificate acting as its own CA).
pub fn client_config_trusting(cert: &CertPair) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(cert.cert()).expect("add test root");
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("rustls protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// Client TLS handshake over `stream` for `server_name` (e.g. `"localhost"`),
/// bounded to 10 seconds.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<S>> {
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio::time::timeout(std::time::Duration::from_secs(10), TlsConnector::from(config).connect(name, stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}
