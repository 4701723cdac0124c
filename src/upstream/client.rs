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
use std::sync::Arc;
use std::time::{Duration, Instant};

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
use super::trace::{emit, Observer};
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
    /// The provider is throttling (HTTP 429/503/504): try again, not before `retry_after`.
    #[error("upstream is throttling: {} (retry after {} s)", .reply.describe(), .retry_after.as_secs())]
    Throttled { reply: UpstreamReply, retry_after: std::time::Duration },
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

/// An authenticated connection and what its server offered in EHLO (after TLS).
pub struct Connection {
    conn: AsyncSmtpConnection,
    /// RFC 2920: the server takes MAIL, RCPT and DATA in one flight.
    pub pipelining: bool,
}

impl Connection {
    /// QUITs without waiting long for the answer.
    pub async fn abort(&mut self) {
        self.conn.abort().await
    }
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
    obs: &dyn Observer,
) -> Result<(Connection, Option<u64>), SendError> {
    let addr = (server.host.as_str(), server.port);
    let mut advertised = None;
    let started = Instant::now();
    let failed = |step: &str, since: Instant, e: SendError| {
        emit(obs, step, false, since, || e.to_string());
        e
    };
    let mut tcp = match tokio::time::timeout(t.command, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let e = SendError::Network(format!("connect to {}:{}: {e}", server.host, server.port));
            return Err(failed("connect", started, e));
        }
        Err(_) => {
            let e = SendError::Network(format!("connect to {}:{} timed out", server.host, server.port));
            return Err(failed("connect", started, e));
        }
    };
    let _ = tcp.set_nodelay(true);
    emit(obs, "connect", true, started, || {
        let name = format!("{}:{}", server.host, server.port);
        match tcp.peer_addr() {
            Ok(a) if a.to_string() != name => format!("{name} ({a})"),
            _ => name,
        }
    });
    let started = Instant::now();
    let stream: Box<dyn AsyncTokioStream> = match &server.security {
        Security::Plain => {
            emit(obs, "tls", true, started, || "none: plain SMTP (loopback or a local smarthost only)".into());
            Box::new(tcp)
        }
        Security::StartTls(connector) | Security::Implicit(connector) => {
            let greeting: &'static [u8] = if matches!(server.security, Security::StartTls(_)) {
                match tokio::time::timeout(t.command, plaintext_starttls(&mut tcp, hello)).await {
                    Ok(Ok(size)) => {
                        advertised = size;
                        UPGRADED_GREETING
                    }
                    Ok(Err(e)) => {
                        let e = SendError::Network(format!("{}:{}: {e}", server.host, server.port));
                        return Err(failed("tls", started, e));
                    }
                    Err(_) => {
                        let e = SendError::Network(format!("STARTTLS with {} timed out", server.host));
                        return Err(failed("tls", started, e));
                    }
                }
            } else {
                b""
            };
            let name = rustls_pki_types::ServerName::try_from(server.host.clone())
                .map_err(|e| SendError::Network(format!("{}: {e}", server.host)))?;
            match tokio::time::timeout(t.command, connector.connect(name, tcp)).await {
                Ok(Ok(tls)) => {
                    emit(obs, "tls", true, started, || {
                        let how = if greeting.is_empty() { "implicit TLS" } else { "STARTTLS" };
                        format!("{how}, {}", describe_tls(tls.get_ref().1))
                    });
                    Box::new(OwnTls { tls, greeting })
                }
                Ok(Err(e)) => {
                    return Err(failed("tls", started, SendError::Network(format!("TLS with {}: {e}", server.host))))
                }
                Err(_) => {
                    return Err(failed(
                        "tls",
                        started,
                        SendError::Network(format!("TLS with {} timed out", server.host)),
                    ))
                }
            }
        }
    };
    let started = Instant::now();
    // lettre parses the EHLO reply but keeps neither PIPELINING nor SIZE: the stream keeps a
    // copy of what the server says until then.
    let seen = Arc::new(std::sync::Mutex::new(Some(Vec::new())));
    let stream = Box::new(Sniffed { inner: stream, seen: seen.clone() });
    let conn = timed(t.command, "the greeting", AsyncSmtpConnection::connect_with_transport(stream, hello))
        .await
        .map_err(|e| failed("auth", started, e))?;
    let ehlo = ehlo_lines(&seen.locked().take().unwrap_or_default());
    // RFC 3207 4.2: what the server offered inside TLS is what counts for PIPELINING.
    let pipelining = ehlo.iter().skip(1).any(|l| keyword(l).eq_ignore_ascii_case("PIPELINING"));
    let mut conn = Connection { conn, pipelining };
    match authenticate(&mut conn.conn, user, token, t).await {
        Ok(r) => emit(obs, "auth", true, started, || {
            let offers = ehlo.iter().skip(1).map(|l| keyword(l)).collect::<Vec<_>>().join(" ");
            format!("EHLO offers {offers}; AUTH XOAUTH2 as {user}: {}", r.describe())
        }),
        Err(e) => return Err(failed("auth", started, e)),
    }
    Ok((conn, advertised))
}

/// The first word of an EHLO keyword line.
fn keyword(line: &str) -> &str {
    line.split_whitespace().next().unwrap_or("")
}

/// The text of each line of the last `250` reply in what a server said up to its EHLO reply
/// (its greeting comes first and is skipped).
fn ehlo_lines(seen: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(seen);
    let mut lines = Vec::new();
    for l in text.lines() {
        if l.starts_with("250") {
            lines.push(l.get(4..).unwrap_or_default().trim_end().to_string());
        } else {
            lines.clear();
        }
    }
    lines
}

/// The TLS version, cipher suite and the server certificate's subject, for `mfd-relay test`.
fn describe_tls(session: &rustls::ClientConnection) -> String {
    let version = session.protocol_version().map(|v| format!("{v:?}")).unwrap_or_else(|| "?".into());
    let suite = session.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_else(|| "?".into());
    let subject = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|der| openssl::x509::X509::from_der(der).ok())
        .map(|x| {
            x.subject_name()
                .entries()
                .map(|e| {
                    let key = e.object().nid().short_name().unwrap_or("?");
                    let value = e.data().to_string().unwrap_or_default();
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_else(|| "(no certificate)".into());
    format!("{version}, {suite}, certificate subject: {subject}")
}

/// The stream lettre reads from, keeping a copy of what is read while `seen` holds a buffer
/// (the greeting and the EHLO reply; at most [`MAX_PLAINTEXT_REPLY`] bytes).
#[derive(Debug)]
struct Sniffed {
    inner: Box<dyn AsyncTokioStream>,
    seen: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl AsyncRead for Sniffed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut me.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            if let Some(seen) = me.seen.locked().as_mut() {
                let new = &buf.filled()[before..];
                let room = MAX_PLAINTEXT_REPLY.saturating_sub(seen.len());
                seen.extend_from_slice(&new[..new.len().min(room)]);
            }
        }
        r
    }
}

impl AsyncWrite for Sniffed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl AsyncTokioStream for Sniffed {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.peer_addr()
    }
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
async fn authenticate(
    conn: &mut AsyncSmtpConnection,
    user: &str,
    token: &str,
    t: Timeouts,
) -> Result<UpstreamReply, SendError> {
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
        Ok(r) if r.code().severity == lettre::transport::smtp::response::Severity::PositiveCompletion => {
            Ok(reply_of(&r))
        }
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
pub async fn reset(conn: &mut Connection) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(10), conn.conn.command(Rset)).await, Ok(Ok(_)))
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

/// Why a transaction did not give an outcome.
pub enum TxError {
    /// A pooled connection turned out dead at the RSET that opened the flight; nothing of
    /// this message was sent or accepted, so another connection may take it.
    Stale(String),
    Send(SendError),
}

impl From<SendError> for TxError {
    fn from(e: SendError) -> TxError {
        TxError::Send(e)
    }
}

/// A flight of commands written as they are (lettre's `command` writes any `Display` in one
/// write and reads the first reply).
struct Raw<'a>(&'a str);

impl fmt::Display for Raw<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Sends one message on an authenticated connection. The body streams from `body` (which
/// holds the message with CRLF line endings, not dot-stuffed); lettre stuffs dots.
///
/// When the server offers PIPELINING (RFC 2920), MAIL, every RCPT and DATA go in one write
/// (behind an RSET when `reset`: a pooled connection is checked by that RSET's reply instead
/// of a round trip of its own), and their replies are read in order: a message costs two
/// round trips, this flight and the body. Otherwise one command at a time, as RFC 5321 has it.
/// `reset` is ignored without PIPELINING (the pool checked the connection with RSET already).
pub async fn transaction(
    conn: &mut Connection,
    env: &Envelope<'_>,
    body: &Path,
    t: Timeouts,
    reset: bool,
    obs: &dyn Observer,
) -> Result<SendOutcome, TxError> {
    let from = if env.from.is_empty() { None } else { Some(address(env.from)?) };
    let mut params = vec![MailParameter::Size(env.size as usize)];
    if env.eight_bit {
        params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
    }
    let mail = Mail::new(from, params);
    // Recipients the upstream cannot even parse are refused here, never sent.
    let mut sendable = Vec::new();
    let mut refused = Vec::new();
    for rcpt in env.rcpts {
        match address(rcpt) {
            Ok(a) => sendable.push((rcpt.clone(), a)),
            Err(SendError::Rejected(r)) => refused.push((rcpt.clone(), r)),
            Err(e) => return Err(e.into()),
        }
    }
    let accepted = if conn.pipelining {
        if sendable.is_empty() {
            return Ok(SendOutcome { accepted: Vec::new(), refused, reply: None });
        }
        match pipelined_envelope(conn, &mail, &sendable, &mut refused, t, reset, obs).await? {
            Some(accepted) => accepted,
            None => return Ok(SendOutcome { accepted: Vec::new(), refused, reply: None }),
        }
    } else {
        let c = &mut conn.conn;
        let started = Instant::now();
        let r = timed(t.command, "MAIL", c.command(&mail)).await;
        emit(obs, "mail", r.is_ok(), started, || outcome_text(&r));
        r?;
        let mut accepted = Vec::new();
        for (rcpt, addr) in sendable {
            let started = Instant::now();
            let r = timed(t.command, "RCPT", c.command(Rcpt::new(addr, vec![]))).await;
            emit(obs, "rcpt", r.is_ok(), started, || format!("<{rcpt}>: {}", outcome_text(&r)));
            match r {
                Ok(_) => accepted.push(rcpt),
                Err(SendError::Rejected(r)) if r.code == 421 => return Err(SendError::Rejected(r).into()),
                Err(SendError::Rejected(r)) => refused.push((rcpt, r)),
                Err(e) => return Err(e.into()),
            }
        }
        if accepted.is_empty() {
            let _ = self::reset(conn).await;
            return Ok(SendOutcome { accepted, refused, reply: None });
        }
        let started = Instant::now();
        let r = timed(t.command, "DATA", conn.conn.command(Data)).await;
        emit(obs, "data", r.is_ok(), started, || outcome_text(&r));
        r?;
        accepted
    };

    let started = Instant::now();
    let file =
        std::fs::File::open(body).map_err(|e| SendError::Network(format!("spool file {}: {e}", body.display())))?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    // lettre ends the data with CRLF.CRLF itself; the message's own final CRLF is that
    // first CRLF (RFC 5321 4.1.1.4), so it is not sent twice.
    let send_len = if len >= 2 { len - 2 } else { len };
    let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
    let chunks = FileChunks { file, remaining: send_len, failed: failed.clone() };
    let result = timed(t.data, "the message body", conn.conn.message_iter(chunks)).await;
    emit(obs, "final", result.is_ok(), started, || format!("{} bytes sent; {}", send_len, outcome_text(&result)));
    let result = result?;
    if let Some(e) = failed.locked().take() {
        // The upstream may hold a damaged copy now; the message stays queued and the
        // error is loud, since a read failure of a just-written spool file means a bad disk.
        let e = SendError::Network(format!("reading spool file {} failed mid-message: {e}", body.display()));
        return Err(e.into());
    }
    Ok(SendOutcome { accepted, refused, reply: Some(reply_of(&result)) })
}

/// The reply (or failure) of a command, for a step's detail.
fn outcome_text(r: &Result<Response, SendError>) -> String {
    match r {
        Ok(r) => reply_of(r).describe(),
        Err(SendError::Rejected(r)) => r.describe(),
        Err(e) => e.to_string(),
    }
}

/// RFC 2920: `[RSET] MAIL RCPT... DATA` in one write, then every reply in order (each
/// command's reply must be read, refused or not, or the next transaction would read them).
/// Returns the accepted recipients once DATA got its 354, `None` when no recipient was
/// accepted (DATA was refused as RFC 2920 3.1 says, and no message text is sent).
async fn pipelined_envelope(
    conn: &mut Connection,
    mail: &Mail,
    rcpts: &[(String, Address)],
    refused: &mut Vec<(String, UpstreamReply)>,
    t: Timeouts,
    reset: bool,
    obs: &dyn Observer,
) -> Result<Option<Vec<String>>, TxError> {
    let mut flight = String::new();
    if reset {
        flight.push_str("RSET\r\n");
    }
    flight.push_str(&mail.to_string());
    for (_, addr) in rcpts {
        flight.push_str(&Rcpt::new(addr.clone(), vec![]).to_string());
    }
    flight.push_str("DATA\r\n");
    let c = &mut conn.conn;
    let started = Instant::now();
    // The write and the first reply; then one reply per command, in order.
    let first = timed(t.command, "the pipelined envelope", c.command(Raw(&flight))).await;
    let mail_reply = if reset {
        match first {
            Ok(_) => {}
            // Nothing of this message reached the server: another connection may take it.
            Err(SendError::Network(e)) => return Err(TxError::Stale(e)),
            Err(SendError::Rejected(r)) => return Err(TxError::Stale(r.describe())),
            Err(e) => return Err(e.into()),
        }
        timed(t.command, "MAIL", c.read_response()).await
    } else {
        first
    };
    emit(obs, "mail", mail_reply.is_ok(), started, || outcome_text(&mail_reply));
    // A 421 anywhere: the server is closing the connection, no more replies will come.
    if let Err(SendError::Rejected(r)) = &mail_reply {
        if r.code == 421 {
            return Err(SendError::Rejected(r.clone()).into());
        }
    }
    // A server that refused MAIL and then closed: its refusal is the answer, not the
    // closed connection that follows (the caller drops the connection on any error).
    let or_mail_refusal = |e: SendError| match (&e, &mail_reply) {
        (SendError::Network(_), Err(SendError::Rejected(m))) => SendError::Rejected(m.clone()),
        _ => e,
    };
    let mut accepted = Vec::new();
    for (rcpt, _) in rcpts {
        let r = timed(t.command, "RCPT", c.read_response()).await.map_err(or_mail_refusal);
        emit(obs, "rcpt", r.is_ok(), started, || format!("<{rcpt}>: {}", outcome_text(&r)));
        match r {
            Ok(_) => accepted.push(rcpt.clone()),
            Err(SendError::Rejected(r)) if r.code == 421 => return Err(SendError::Rejected(r).into()),
            Err(SendError::Rejected(r)) => refused.push((rcpt.clone(), r)),
            Err(e) => return Err(e.into()),
        }
    }
    let data = timed(t.command, "DATA", c.read_response()).await.map_err(or_mail_refusal);
    emit(obs, "data", data.is_ok(), started, || outcome_text(&data));
    let go_ahead = match &data {
        Ok(r) if reply_of(r).code == 354 => true,
        // Any other "positive" reply to DATA is out of step with our commands (RFC 5321
        // 4.3.2: DATA's go-ahead is 354): never send the body into it.
        Ok(r) => {
            let e = SendError::Network(format!("the server answered DATA with {}", reply_of(r).describe()));
            return Err(e.into());
        }
        Err(SendError::Rejected(_)) => false,
        Err(e) => return Err(e.clone().into()),
    };
    if go_ahead && (mail_reply.is_err() || accepted.is_empty()) {
        // A server that says 354 with no transaction or no recipient: end the (empty) text at
        // once, send nothing of the message, and forget its answer.
        let _ = timed(t.command, "DATA", c.command(Raw(".\r\n"))).await;
    }
    mail_reply?;
    if accepted.is_empty() {
        return Ok(None);
    }
    data?;
    Ok(Some(accepted))
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
