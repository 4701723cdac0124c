//! Reaching the provider's IMAP server: TCP, TLS (implicit, RFC 8314, or STARTTLS, RFC 3501
//! 6.2.1), and SASL XOAUTH2 (RFC 3501 6.2.2 AUTHENTICATE with Google's/Microsoft's XOAUTH2
//! mechanism).
//!
//! TLS is rustls with the ring provider; trusted roots are webpki-roots plus the provider's
//! `ca_file`. STARTTLS never falls back to plain text: a server that refuses it is an error.
//! A refused token comes back, as with SMTP, as a `+` challenge carrying base64 JSON
//! (`{"status":"401","schemes":"bearer",...}`): the client answers with an empty line and the
//! server then says NO. That JSON is the only explanation the admin gets, so it is kept in
//! [`ImapError::AuthRejected`]. The token itself never appears in an error or a log line.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::UpstreamTls;
use crate::oauth::provider::Server;
use crate::upstream::Security;

/// TCP connect, TLS handshake and greeting, each.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// One authentication exchange.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors talking to the IMAP server.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    #[error("connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("TLS with {addr}: {message}")]
    Tls { addr: String, message: String },
    #[error("the server refused STARTTLS: {0}")]
    Starttls(String),
    #[error("no greeting from the server")]
    Greeting,
    /// The server refused the token (after the XOAUTH2 exchange).
    #[error("the server refused the token{}", .detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    AuthRejected { detail: Option<String> },
    #[error("{what} timed out")]
    Timeout { what: &'static str },
    #[error("{what}: {source}")]
    Protocol { what: &'static str, source: async_imap::error::Error },
    #[error("{0}")]
    Unexpected(String),
}

impl ImapError {
    pub fn protocol(what: &'static str) -> impl FnOnce(async_imap::error::Error) -> ImapError {
        move |source| ImapError::Protocol { what, source }
    }
}

/// The connection under the IMAP client: plain TCP (tests, loopback) or TLS.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// An IMAP client before login.
pub type Client = async_imap::Client<Stream>;
/// An authenticated IMAP session.
pub type Session = async_imap::Session<Stream>;

/// The SASL XOAUTH2 initial response: `user=<user>^Aauth=Bearer <token>^A^A`.
pub fn xoauth2_response(user: &str, token: &str) -> String {
    format!("user={user}\x01auth=Bearer {token}\x01\x01")
}

/// Answers the XOAUTH2 exchange: the credentials to the first (empty) challenge; an empty
/// response to the error challenge that follows a refused token, whose JSON it keeps.
struct XOAuth2<'a> {
    user: &'a str,
    token: &'a str,
    rounds: u32,
    error: Option<String>,
}

impl async_imap::Authenticator for &mut XOAuth2<'_> {
    type Response = Vec<u8>;

    fn process(&mut self, challenge: &[u8]) -> Vec<u8> {
        self.rounds += 1;
        if self.rounds == 1 && challenge.is_empty() {
            return xoauth2_response(self.user, self.token).into_bytes();
        }
        self.error = Some(crate::reply::sanitize_text(&String::from_utf8_lossy(challenge), 300));
        Vec::new()
    }
}

/// Opens connections to one IMAP server; its TLS mode carries the connector it needs.
pub struct Connector {
    server: Server,
    security: Security,
}

/// The rustls configuration: ring, webpki roots plus the extra CA file (PEM).
pub fn tls_config(ca_file: Option<&std::path::Path>) -> Result<rustls::ClientConfig, ImapError> {
    crate::tls::client_config(ca_file).map_err(ImapError::TlsSetup)
}

async fn within<T>(
    what: &'static str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, ImapError>>,
) -> Result<T, ImapError> {
    tokio::time::timeout(limit, f).await.map_err(|_| ImapError::Timeout { what })?
}

impl Connector {
    pub fn new(server: Server, ca_file: Option<&std::path::Path>) -> Result<Connector, ImapError> {
        let connector = || Ok::<_, ImapError>(TlsConnector::from(Arc::new(tls_config(ca_file)?)));
        let security = match server.tls {
            UpstreamTls::None => Security::Plain,
            UpstreamTls::Starttls => Security::StartTls(connector()?),
            UpstreamTls::Implicit => Security::Implicit(connector()?),
        };
        Ok(Connector { server, security })
    }

    pub fn server(&self) -> &Server {
        &self.server
    }

    fn addr(&self) -> String {
        format!("{}:{}", self.server.host, self.server.port)
    }

    async fn handshake(&self, tcp: TcpStream, connector: &TlsConnector) -> Result<Stream, ImapError> {
        let name = ServerName::try_from(self.server.host.clone())
            .map_err(|e| ImapError::TlsSetup(format!("server name {}: {e}", self.server.host)))?;
        let tls = within("TLS handshake", CONNECT_TIMEOUT, async {
            connector.connect(name, tcp).await.map_err(|e| ImapError::Tls { addr: self.addr(), message: e.to_string() })
        })
        .await?;
        Ok(Stream::Tls(Box::new(tls)))
    }

    /// Connects, secures the connection as configured and reads the greeting (RFC 3501 7.1).
    pub async fn connect(&self) -> Result<Client, ImapError> {
        let addr = self.addr();
        let tcp = within("connect", CONNECT_TIMEOUT, async {
            TcpStream::connect((self.server.host.as_str(), self.server.port))
                .await
                .map_err(|e| ImapError::Connect { addr: addr.clone(), message: e.to_string() })
        })
        .await?;
        let _ = tcp.set_nodelay(true);
        match &self.security {
            Security::StartTls(connector) => {
                let mut plain = async_imap::Client::new(Stream::Plain(tcp));
                greeting(&mut plain).await?;
                within("STARTTLS", CONNECT_TIMEOUT, async {
                    plain
                        .run_command_and_check_ok("STARTTLS", None)
                        .await
                        .map_err(|e| ImapError::Starttls(e.to_string()))
                })
                .await?;
                // Whatever the server sent after its OK is dropped with the plain client
                // (RFC 3501 6.2.1: nothing before the handshake counts).
                let Stream::Plain(tcp) = plain.into_inner() else {
                    return Err(ImapError::Unexpected("STARTTLS on a TLS stream".into()));
                };
                let stream = self.handshake(tcp, connector).await?;
                Ok(async_imap::Client::new(stream))
            }
            Security::Implicit(connector) => {
                let stream = self.handshake(tcp, connector).await?;
                let mut client = async_imap::Client::new(stream);
                greeting(&mut client).await?;
                Ok(client)
            }
            Security::Plain => {
                let mut client = async_imap::Client::new(Stream::Plain(tcp));
                greeting(&mut client).await?;
                Ok(client)
            }
        }
    }
}

async fn greeting(client: &mut Client) -> Result<(), ImapError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, client.read_response()).await {
        Err(_) => Err(ImapError::Timeout { what: "greeting" }),
        Ok(Ok(Some(_))) => Ok(()),
        Ok(Ok(None)) => Err(ImapError::Greeting),
        Ok(Err(e)) => Err(ImapError::Protocol { what: "greeting", source: e.into() }),
    }
}

/// AUTHENTICATE XOAUTH2 as `user` with `token`.
pub async fn authenticate(client: Client, user: &str, token: &str) -> Result<Session, ImapError> {
    let mut auth = XOAuth2 { user, token, rounds: 0, error: None };
    let result = tokio::time::timeout(AUTH_TIMEOUT, client.authenticate("XOAUTH2", &mut auth)).await;
    match result {
        Err(_) => Err(ImapError::Timeout { what: "AUTHENTICATE" }),
        Ok(Ok(session)) => Ok(session),
        Ok(Err((async_imap::error::Error::No(text), _))) => {
            Err(ImapError::AuthRejected { detail: auth.error.or(Some(crate::reply::sanitize_text(&text, 300))) })
        }
        Ok(Err((e, _))) if auth.error.is_some() => {
            tracing::debug!("AUTHENTICATE ended with {e} after an error challenge");
            Err(ImapError::AuthRejected { detail: auth.error })
        }
        Ok(Err((e, _))) => Err(ImapError::Protocol { what: "AUTHENTICATE", source: e }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_imap::Authenticator as _;

    #[test]
    fn xoauth2_string() {
        assert_eq!(xoauth2_response("print@contoso.com", "tok"), "user=print@contoso.com\x01auth=Bearer tok\x01\x01");
    }

    #[test]
    fn authenticator_answers_credentials_then_an_empty_line_and_keeps_the_json() {
        let mut a = XOAuth2 { user: "u@x", token: "t", rounds: 0, error: None };
        assert_eq!((&mut a).process(b""), xoauth2_response("u@x", "t").into_bytes());
        let json = br#"{"status":"401","schemes":"bearer","scope":"mail"}"#;
        assert_eq!((&mut a).process(json), b"");
        assert_eq!(a.error.as_deref(), Some(r#"{"status":"401","schemes":"bearer","scope":"mail"}"#));
    }

    #[test]
    fn tls_config_reads_extra_roots_and_reports_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        assert!(tls_config(Some(&ca)).is_ok());
        assert!(tls_config(None).is_ok());
        let missing = dir.path().join("missing.pem");
        assert!(matches!(tls_config(Some(&missing)), Err(ImapError::TlsSetup(m)) if m.contains("missing.pem")));
    }

    #[tokio::test]
    async fn starttls_refusal_is_an_error_not_a_fallback() {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            w.write_all(b"* OK fake IMAP ready\r\n").await.unwrap();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let tag = line.split(' ').next().unwrap_or("*").to_string();
                w.write_all(format!("{tag} BAD STARTTLS not supported\r\n").as_bytes()).await.unwrap();
            }
        });
        let c = Connector::new(Server { host: "127.0.0.1".into(), port, tls: UpstreamTls::Starttls }, None).unwrap();
        assert!(matches!(c.connect().await, Err(ImapError::Starttls(_))));
    }
}
