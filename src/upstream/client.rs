//! One authenticated connection to the provider's submission server, built on lettre's
//! `AsyncSmtpConnection`: connect (implicit TLS or STARTTLS, RFC 3207/8314), EHLO,
//! `AUTH XOAUTH2`, then transactions whose body streams from the spool file.
//!
//! TLS is opened by the relay, never by lettre. For STARTTLS the plaintext part (greeting,
//! EHLO, STARTTLS, 220) is spoken here on the bare socket, and whatever the server sent after
//! its 220 is discarded before the handshake (RFC 3207 section 5): lettre reads through a
//! buffer that it keeps across its own upgrade, so injected plaintext would be taken as
//! coming from inside TLS.
//!
//! The AUTH exchange is written here rather than with lettre's `auth()`: when the provider
//! refuses a token it first answers `334 <base64 JSON>`; the client must send an empty line
//! to get the final 535, and that JSON is the only explanation the admin gets, so it is kept.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use lettre::address::Address;
use std::pin::Pin;
use std::task::{Context, Poll};

use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, MailBodyParameter, MailParameter};
use lettre::transport::smtp::response::Response;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::classify::UpstreamReply;
use crate::locks::MutexExt;

/// How long the relay waits for the upstream.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Connecting, TLS, the greeting, and each command's reply. RFC 5321 4.5.3.2 suggests
    /// minutes; providers answer in well under a second, and a stalled upstream must not
    /// hold the queue for long (`relay.upstream_timeout`, 60 s by default).
    pub command: Duration,
    /// The body and the reply to the final dot (RFC 5321 4.5.3.2.6: 10 minutes).
    pub data: Duration,
}

impl Timeouts {
    pub fn new(command: Duration) -> Timeouts {
        Timeouts { command, data: command.saturating_mul(10) }
    }
}
/// Chunk size when streaming a body from the spool.
const CHUNK: usize = 256 * 1024;

/// Why a send did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Could not connect, TLS failed, the connection broke or timed out.
    #[error("upstream unreachable: {0}")]
    Network(String),
    /// The upstream refused the token. `detail` is its decoded XOAUTH2 error JSON.
    #[error("upstream refused the token: {}{}", .reply.describe(), .detail.as_deref().map(|d| format!(" {d}")).unwrap_or_default())]
    Auth { reply: UpstreamReply, detail: Option<String> },
    /// The upstream refused the transaction (MAIL or DATA) as a whole.
    #[error("upstream refused the message: {}", .0.describe())]
    Rejected(UpstreamReply),
}

/// What the upstream did with one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendOutcome {
    pub accepted: Vec<String>,
    /// Recipients refused at RCPT, with the reply.
    pub refused: Vec<(String, UpstreamReply)>,
    /// The reply to the end of data (when any recipient was accepted).
    pub reply: Option<UpstreamReply>,
}

/// A raw command line (lettre's command types cover all but our AUTH).
struct Line<'a>(&'a str);

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}\r\n", self.0)
    }
}

fn reply_of(r: &Response) -> UpstreamReply {
    UpstreamReply::new(u16::from(r.code()), r.message().collect::<Vec<_>>().join(" "))
}

/// Converts a lettre error: SMTP replies keep code and text, the rest is a network error.
fn from_lettre(e: lettre::transport::smtp::Error) -> SendError {
    match e.status() {
        Some(code) => {
            let text = std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default();
            SendError::Rejected(UpstreamReply::new(u16::from(code), text.replace('\n', " ")))
        }
        None => SendError::Network(e.to_string()),
    }
}

async fn timed<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, lettre::transport::smtp::Error>>,
) -> Result<T, SendError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(from_lettre),
        Err(_) => Err(SendError::Network(format!("timed out during {what}"))),
    }
}

/// The XOAUTH2 initial response (Google's and Microsoft's SASL XOAUTH2), base64-encoded.
pub fn xoauth2(user: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

/// A TLS stream opened by the relay, handed to lettre as if it were plain TCP. After
/// STARTTLS it first yields a greeting of our own: lettre's connection starts by reading one,
/// and the server sends none inside TLS (its EHLO comes next, RFC 3207 4.2).
#[derive(Debug)]
struct OwnTls {
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    greeting: &'static [u8],
}

/// What lettre reads first on a connection upgraded by STARTTLS.
const UPGRADED_GREETING: &[u8] = b"220 TLS established\r\n";

impl AsyncRead for OwnTls {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if !me.greeting.is_empty() {
            let n = me.greeting.len().min(buf.remaining());
            buf.put_slice(&me.greeting[..n]);
            me.greeting = &me.greeting[n..];
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for OwnTls {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for OwnTls {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.tls.get_ref().0.peer_addr()
    }
}

/// How the connection to a server is secured; TLS modes carry the connector they need, so a
/// TLS server cannot be reached without one.
#[derive(Clone)]
pub enum Security {
    /// Plain TCP; only sensible on loopback (tests, a local smarthost).
    Plain,
    /// RFC 3207: plain greeting and EHLO, then TLS after STARTTLS.
    StartTls(tokio_rustls::TlsConnector),
    /// RFC 8314: TLS from the first byte.
    Implicit(tokio_rustls::TlsConnector),
}

impl fmt::Debug for Security {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Security::Plain => "Plain",
            Security::StartTls(_) => "StartTls",
            Security::Implicit(_) => "Implicit",
        })
    }
}

/// A provider's submission server, with its TLS settings built once.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// For implicit TLS and STARTTLS the relay opens TLS itself, before lettre sees the
    /// stream (see the module docs).
    pub security: Security,
}

/// Opens a connection, secures it as the server requires, and authenticates.
///
/// The TCP connection is made here rather than by lettre so that TCP_NODELAY is set: SMTP
/// is a request/reply protocol, and Nagle's algorithm against the peer's delayed ACK would
/// add 40 ms to the end of every message.
pub async fn connect(
    server: &Target,
    hello: &ClientId,
    user: &str,
    token: &str,
    t: Timeouts,
) -> Result<(AsyncSmtpConnection, Option<u64>), SendError> {
    let addr = (server.host.as_str(), server.port);
    let mut advertised = None;
    let mut tcp = match tokio::time::timeout(t.command, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(SendError::Network(format!("connect to {}:{}: {e}", server.host, server.port))),
        Err(_) => return Err(SendError::Network(format!("connect to {}:{} timed out", server.host, server.port))),
    };
    let _ = tcp.set_nodelay(true);
    let stream: Box<dyn AsyncTokioStream> = match &server.security {
        Security::Plain => Box::new(tcp),
        Security::StartTls(connector) | Security::Implicit(connector) => {
            let greeting: &'static [u8] = if matches!(server.security, Security::StartTls(_)) {
                match tokio::time::timeout(t.command, plaintext_starttls(&mut tcp, hello)).await {
                    Ok(Ok(size)) => {
                        advertised = size;
                        UPGRADED_GREETING
                    }
                    Ok(Err(e)) => return Err(SendError::Network(format!("{}:{}: {e}", server.host, server.port))),
                    Err(_) => return Err(SendError::Network(format!("STARTTLS with {} timed out", server.host))),
                }
            } else {
                b""
            };
            let name = rustls_pki_types::ServerName::try_from(server.host.clone())
                .map_err(|e| SendError::Network(format!("{}: {e}", server.host)))?;
            match tokio::time::timeout(t.command, connector.connect(name, tcp)).await {
                Ok(Ok(tls)) => Box::new(OwnTls { tls, greeting }),
                Ok(Err(e)) => return Err(SendError::Network(format!("TLS with {}: {e}", server.host))),
                Err(_) => return Err(SendError::Network(format!("TLS with {} timed out", server.host))),
            }
        }
    };
    let mut conn = timed(t.command, "the greeting", AsyncSmtpConnection::connect_with_transport(stream, hello)).await?;
    authenticate(&mut conn, user, token, t).await?;
    Ok((conn, advertised))
}

/// The limit in an EHLO reply's `SIZE` keyword (RFC 1870 4), if it has one; `SIZE` alone or
/// `SIZE 0` means no fixed limit.
pub fn ehlo_size(lines: &[String]) -> Option<u64> {
    lines.iter().skip(1).find_map(|l| {
        let mut words = l.split_whitespace();
        words.next().filter(|k| k.eq_ignore_ascii_case("SIZE"))?;
        words.next()?.parse::<u64>().ok().filter(|n| *n > 0)
    })
}

/// Longest reply accepted in the plaintext phase (a greeting or an EHLO reply).
const MAX_PLAINTEXT_REPLY: usize = 16 * 1024;

/// The plaintext phase of STARTTLS on the bare socket: greeting, EHLO, STARTTLS, 220. Bytes
/// the server sent behind its 220 are dropped here, never read as part of the TLS session.
/// Returns the EHLO's SIZE (Gmail: 35882577), which the session uses as the provider's limit.
async fn plaintext_starttls(tcp: &mut TcpStream, hello: &ClientId) -> Result<Option<u64>, String> {
    let mut buf = Vec::new();
    let (code, _) = read_reply(tcp, &mut buf).await?;
    if code != 220 {
        return Err(format!("greeting {code}"));
    }
    tcp.write_all(format!("EHLO {hello}\r\n").as_bytes()).await.map_err(|e| e.to_string())?;
    let (code, lines) = read_reply(tcp, &mut buf).await?;
    if code != 250 {
        return Err(format!("EHLO refused: {code} {}", lines.join(" ")));
    }
    if !lines.iter().skip(1).any(|l| l.split_whitespace().next().is_some_and(|k| k.eq_ignore_ascii_case("STARTTLS"))) {
        return Err("does not offer STARTTLS".into());
    }
    let size = ehlo_size(&lines);
    if !buf.is_empty() {
        return Err("sent data before STARTTLS was asked for".into());
    }
    tcp.write_all(b"STARTTLS\r\n").await.map_err(|e| e.to_string())?;
    let (code, lines) = read_reply(tcp, &mut buf).await?;
    if code != 220 {
        return Err(format!("STARTTLS refused: {code} {}", lines.join(" ")));
    }
    if !buf.is_empty() {
        // RFC 3207 5: anything before the handshake is not protected by it.
        tracing::warn!(
            bytes = buf.len(),
            "discarded what the provider sent after its STARTTLS 220 (plaintext injection?)"
        );
    }
    Ok(size)
}

/// Reads one SMTP reply (RFC 5321 4.2.1) from `tcp`, keeping bytes read past it in `buf`;
/// returns its code and the text of each line.
async fn read_reply(tcp: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(u16, Vec<String>), String> {
    let mut lines = Vec::new();
    loop {
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            let code =
                text.get(..3).and_then(|c| c.parse::<u16>().ok()).ok_or_else(|| format!("bad reply line {text:?}"))?;
            let last = text.as_bytes().get(3) != Some(&b'-');
            lines.push(text.get(4..).unwrap_or_default().to_string());
            if last {
                return Ok((code, lines));
            }
        }
        if buf.len() > MAX_PLAINTEXT_REPLY {
            return Err("reply too long".into());
        }
        let mut chunk = [0u8; 2048];
        let n = tcp.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `AUTH XOAUTH2` with the initial response; on a 334 challenge, keeps the decoded JSON,
/// answers with an empty line and reports the final reply.
async fn authenticate(conn: &mut AsyncSmtpConnection, user: &str, token: &str, t: Timeouts) -> Result<(), SendError> {
    let line = format!("AUTH XOAUTH2 {}", xoauth2(user, token));
    let first = tokio::time::timeout(t.command, conn.command(Line(&line)))
        .await
        .map_err(|_| SendError::Network("timed out during AUTH".into()))?;
    match first {
        Ok(r) if r.has_code(334) => {
            let challenge = r.message().collect::<Vec<_>>().join("");
            let detail = base64::engine::general_purpose::STANDARD
                .decode(challenge.trim())
                .ok()
                .map(|b| String::from_utf8_lossy(&b).into_owned());
            let last = tokio::time::timeout(t.command, conn.command(Line("")))
                .await
                .map_err(|_| SendError::Network("timed out during AUTH".into()))?;
            let reply = match last {
                Ok(r) => reply_of(&r),
                Err(e) => match from_lettre(e) {
                    SendError::Rejected(r) => r,
                    other => return Err(other),
                },
            };
            Err(SendError::Auth { reply, detail })
        }
        Ok(r) if r.code().severity == lettre::transport::smtp::response::Severity::PositiveCompletion => Ok(()),
        // Not the token: the mailbox has too many connections (the pool handles it).
        Ok(r) if super::too_many_connections(&reply_of(&r)) => Err(SendError::Rejected(reply_of(&r))),
        Ok(r) => Err(SendError::Auth { reply: reply_of(&r), detail: None }),
        Err(e) => match from_lettre(e) {
            SendError::Rejected(reply) if super::too_many_connections(&reply) => Err(SendError::Rejected(reply)),
            SendError::Rejected(reply) => Err(SendError::Auth { reply, detail: None }),
            other => Err(other),
        },
    }
}

/// Checks a pooled connection before reuse (and resets any leftover transaction).
pub async fn reset(conn: &mut AsyncSmtpConnection) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(10), conn.command(Rset)).await, Ok(Ok(_)))
}

/// Envelope of one transaction.
pub struct Envelope<'a> {
    pub from: &'a str,
    pub rcpts: &'a [String],
    pub size: u64,
    pub eight_bit: bool,
}

fn address(a: &str) -> Result<Address, SendError> {
    a.parse::<Address>().map_err(|e| {
        SendError::Rejected(UpstreamReply::new(553, format!("5.1.3 address <{a}> not usable upstream: {e}")))
    })
}

/// Sends one message on an authenticated connection. The body streams from `body` (which
/// holds the message with CRLF line endings, not dot-stuffed); lettre stuffs dots.
pub async fn transaction(
    conn: &mut AsyncSmtpConnection,
    env: &Envelope<'_>,
    body: &Path,
    t: Timeouts,
) -> Result<SendOutcome, SendError> {
    let from = if env.from.is_empty() { None } else { Some(address(env.from)?) };
    let mut params = vec![MailParameter::Size(env.size as usize)];
    if env.eight_bit {
        params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    timed(t.command, "MAIL", conn.command(Mail::new(from, params))).await?;

    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for rcpt in env.rcpts {
        let addr = match address(rcpt) {
            Ok(a) => a,
            Err(SendError::Rejected(r)) => {
                refused.push((rcpt.clone(), r));
                continue;
            }
            Err(e) => return Err(e),
        };
        match timed(t.command, "RCPT", conn.command(Rcpt::new(addr, vec![]))).await {
            Ok(_) => accepted.push(rcpt.clone()),
            Err(SendError::Rejected(r)) if r.code == 421 => return Err(SendError::Rejected(r)),
            Err(SendError::Rejected(r)) => refused.push((rcpt.clone(), r)),
            Err(e) => return Err(e),
        }
    }
    if accepted.is_empty() {
        let _ = reset(conn).await;
        return Ok(SendOutcome { accepted, refused, reply: None });
    }
    timed(t.command, "DATA", conn.command(Data)).await?;

    let file =
        std::fs::File::open(body).map_err(|e| SendError::Network(format!("spool file {}: {e}", body.display())))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    // lettre ends the data with CRLF.CRLF itself; the message's own final CRLF is that
    // first CRLF (RFC 5321 4.1.1.4), so it is not sent twice.
    let send_len = if len >= 2 { len - 2 } else { len };
    let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
    let chunks = FileChunks { file, remaining: send_len, failed: failed.clone() };
    let result = timed(t.data, "the message body", conn.message_iter(chunks)).await?;
    if let Some(e) = failed.locked().take() {
        // The upstream may hold a damaged copy now; the message stays queued and the
        // error is loud, since a read failure of a just-written spool file means a bad disk.
        return Err(SendError::Network(format!("reading spool file {} failed mid-message: {e}", body.display())));
    }
    Ok(SendOutcome { accepted, refused, reply: Some(reply_of(&result)) })
}

/// Reads the spool file in chunks for lettre's `message_iter`. The reads are synchronous:
/// the file was just written (or is read once after a restart), so they are served from the
/// page cache in microseconds, and the iterator cannot be async.
struct FileChunks {
    file: std::fs::File,
    remaining: u64,
    failed: std::sync::Arc<std::sync::Mutex<Option<std::io::Error>>>,
}

impl Iterator for FileChunks {
    type Item = Vec<u8>;
    fn next(&mut self) -> Option<Vec<u8>> {
        if self.remaining == 0 {
            return None;
        }
        let n = (self.remaining as usize).min(CHUNK);
        let mut buf = vec![0u8; n];
        match self.file.read_exact(&mut buf) {
            Ok(()) => {
                self.remaining -= n as u64;
                Some(buf)
            }
            Err(e) => {
                // A bare CR makes the truncated message invalid for strict providers.
                *self.failed.locked() = Some(e);
                self.remaining = 0;
                Some(b"\r".to_vec())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ehlo_size_is_read() {
        let lines = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let gmail = lines(&["smtp.gmail.com at your service", "SIZE 35882577", "8BITMIME", "STARTTLS"]);
        assert_eq!(ehlo_size(&gmail), Some(35_882_577));
        assert_eq!(ehlo_size(&lines(&["x", "SIZE", "STARTTLS"])), None, "no fixed limit");
        assert_eq!(ehlo_size(&lines(&["x", "size 0"])), None);
        assert_eq!(ehlo_size(&lines(&["x", "SIZE lots"])), None);
        // The greeting line is not a keyword.
        assert_eq!(ehlo_size(&lines(&["SIZE 5 is my name", "PIPELINING"])), None);
    }

    #[test]
    fn xoauth2_string() {
        let s = xoauth2("someuser@example.com", "ya29.vF9dft4qmTc2Nvb3RlckBhdHRhdmlzdGEuY29tCg");
        // The example from Google's XOAUTH2 documentation.
        assert_eq!(
            s,
            "dXNlcj1zb21ldXNlckBleGFtcGxlLmNvbQFhdXRoPUJlYXJlciB5YTI5LnZGOWRmdDRxbVRjMk52YjNSbGNrQmhkSFJoZG1semRHRXVZMjl0Q2cBAQ=="
        );
    }
}
