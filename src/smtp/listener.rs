//! The accept loop of one `[[listener]]`: TLS (STARTTLS or implicit), connection limits,
//! graceful shutdown. Modelled on mini-redis's `Listener`: a semaphore bounds the number of
//! connections, accept errors back off, and each connection runs its own session task.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::connection::{Connection, ReadError};
use super::reply;
use super::session::{Next, Session};
use super::Context;
use crate::locks::MutexExt;
use crate::metrics;

/// Time allowed for a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A byte stream a session can run on: plain TCP, or TLS from any [`Acceptor`].
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The server side of TLS, one variant per TLS library: sessions only see a [`Stream`].
#[derive(Clone)]
pub enum Acceptor {
    /// TLS 1.2 and 1.3 with AEAD suites: every listener but a legacy one.
    Rustls(tokio_rustls::TlsAcceptor),
    /// OpenSSL, TLS 1.0 and up with CBC / RSA-key-exchange suites: a `legacy_tls` listener
    /// ([`crate::legacy_tls`]).
    OpenSsl(Arc<openssl::ssl::SslAcceptor>),
}

/// What a TLS handshake agreed on, for the session's log line and the per-version count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// "TLSv1", "TLSv1.1", "TLSv1.2" or "TLSv1.3".
    pub version: String,
    pub cipher: String,
}

impl Acceptor {
    /// Runs the server handshake on `stream` (without a time limit; the caller bounds it).
    pub async fn accept<S>(&self, stream: S) -> std::io::Result<(Box<dyn Stream>, Negotiated)>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match self {
            Acceptor::Rustls(a) => {
                let tls = a.accept(stream).await?;
                let conn = tls.get_ref().1;
                let version = match conn.protocol_version() {
                    Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
                    Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
                    Some(other) => format!("{other:?}"),
                    None => "unknown".to_string(),
                };
                let cipher = conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite())).unwrap_or_default();
                Ok((Box::new(tls), Negotiated { version, cipher }))
            }
            Acceptor::OpenSsl(a) => {
                let tls = crate::legacy_tls::accept(a, stream).await.map_err(std::io::Error::other)?;
                let (version, cipher) = crate::legacy_tls::negotiated(tls.ssl());
                Ok((Box::new(tls), Negotiated { version: version.to_string(), cipher }))
            }
        }
    }
}

/// How a listener speaks TLS, with the acceptor where it has one: an implicit-TLS listener
/// without an acceptor (that would serve plaintext) cannot be built.
#[derive(Clone)]
pub enum Tls {
    /// Plaintext only.
    None,
    /// RFC 3207: plaintext at first, TLS after STARTTLS.
    StartTls(Acceptor),
    /// RFC 8314: TLS from the first byte.
    Implicit(Acceptor),
}

impl Tls {
    /// Whether STARTTLS is offered (before TLS is up).
    pub fn offers_starttls(&self) -> bool {
        matches!(self, Tls::StartTls(_))
    }

    /// Whether a session is TLS from its start.
    pub fn is_implicit(&self) -> bool {
        matches!(self, Tls::Implicit(_))
    }
}

/// A listener's settings, shared by its sessions.
pub struct ListenerSettings {
    /// Used as the metrics label and in logs: the configured address.
    pub name: String,
    pub tls: Tls,
    pub require_auth: bool,
    /// AUTH only after STARTTLS (RFC 4954 4, RFC 3207 4.2); an implicit-TLS session is TLS
    /// from the start.
    pub require_auth_tls: bool,
    pub max_message_size: u64,
    pub command_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
}

/// Counts connections per source address (per /64 for IPv6, see [`super::client_key`]).
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

impl PerAddress {
    fn try_add(&self, ip: IpAddr, max: usize) -> bool {
        let mut m = self.0.locked();
        let n = m.entry(super::client_key(ip)).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    fn remove(&self, ip: IpAddr) {
        let key = super::client_key(ip);
        let mut m = self.0.locked();
        if let Some(n) = m.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&key);
            }
        }
    }
}

/// The context new sessions get, read from the relay's current configuration generation
/// (ARCHITECTURE.md, "Reload"); a reload replaces it. Sessions in flight keep theirs for a
/// transaction already begun and move to the current one at their next EHLO, AUTH or MAIL.
#[derive(Clone)]
pub struct CurrentContext(Arc<dyn Fn() -> Arc<Context> + Send + Sync>);

impl CurrentContext {
    /// Reads the current context with `current` (the wiring reads its generation channel).
    pub fn new(current: impl Fn() -> Arc<Context> + Send + Sync + 'static) -> CurrentContext {
        CurrentContext(Arc::new(current))
    }

    /// The context of the current configuration.
    pub fn get(&self) -> Arc<Context> {
        (self.0)()
    }
}

/// Accepts connections until `shutdown` fires, then waits (up to `grace`) for sessions in
/// flight to finish.
pub async fn serve(
    listener: TcpListener,
    settings: Arc<ListenerSettings>,
    current: CurrentContext,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    grace: Duration,
) {
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let per_address = Arc::new(PerAddress::default());
    let mut backoff = Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => break,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => {
                backoff = Duration::from_millis(10);
                x
            }
            Err(e) => {
                // Out of file descriptors and the like: wait and try again.
                tracing::warn!(listener = %settings.name, "accept failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let ctx = current.get();
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                refuse(tcp, &settings);
                continue;
            }
        };
        if !per_address.try_add(peer.ip(), settings.max_connections_per_address) {
            drop(permit);
            refuse(tcp, &settings);
            continue;
        }
        metrics::SMTP_CONNECTIONS.with_label_values(&[&settings.name]).inc();
        let (settings, ctx, per_address, shutdown, current) =
            (settings.clone(), ctx.clone(), per_address.clone(), shutdown.clone(), current.clone());
        tokio::spawn(async move {
            let active = metrics::SMTP_SESSIONS_ACTIVE.with_label_values(&[&settings.name]);
            active.inc();
            handle(tcp, peer, settings, ctx, current, shutdown).await;
            active.dec();
            per_address.remove(peer.ip());
            drop(permit);
        });
    }
    // Stop accepting; let sessions in flight finish (they see the shutdown between commands).
    drop(listener);
    let all = settings.max_connections as u32;
    let _ = tokio::time::timeout(grace, limit.acquire_many(all)).await;
}

/// Answers 421 and closes, without waiting for the client.
pub(crate) fn refuse<S>(mut stream: S, settings: &ListenerSettings)
where
    S: AsyncWrite + Unpin + Send + 'static,
{
    metrics::SMTP_REFUSED_CONNECTIONS.with_label_values(&[&settings.name]).inc();
    let bytes = reply::too_many_connections().to_bytes();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&bytes)).await;
    });
}

/// Runs one connection: greeting, session, STARTTLS upgrade, session again. Generic over the
/// stream so that tests drive it over an in-memory pipe.
pub(crate) async fn handle<S>(
    stream: S,
    peer: SocketAddr,
    settings: Arc<ListenerSettings>,
    ctx: Arc<Context>,
    current: CurrentContext,
    shutdown: tokio::sync::watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = std::time::Instant::now();
    let mut session = Session::new(ctx.clone(), current, settings.clone(), peer, shutdown);
    let mut negotiated = None;
    let result = match &settings.tls {
        Tls::Implicit(acceptor) => match handshake(acceptor, stream, peer, &settings.name).await {
            Ok((tls, n)) => {
                negotiated = Some(n);
                let mut conn = Connection::new(tls);
                conn.send(&reply::greeting(&ctx.hostname));
                session.run(&mut conn).await.map(|_| ())
            }
            Err(e) => Err(e),
        },
        Tls::None | Tls::StartTls(_) => {
            let mut conn = Connection::new(stream);
            conn.send(&reply::greeting(&ctx.hostname));
            match (session.run(&mut conn).await, &settings.tls) {
                (Ok(Next::StartTls), Tls::StartTls(acceptor)) => {
                    let (plain, leftover) = conn.into_inner();
                    if leftover > 0 {
                        // RFC 3207 4.2 / CVE-2011-0411: plaintext pipelined after STARTTLS
                        // is discarded, never executed inside the TLS session.
                        tracing::warn!(peer = %peer, bytes = leftover, "discarded plaintext sent after STARTTLS");
                    }
                    match handshake(acceptor, plain, peer, &settings.name).await {
                        Ok((tls, n)) => {
                            negotiated = Some(n);
                            session.reset_for_tls();
                            let mut conn = Connection::new(tls);
                            session.run(&mut conn).await.map(|_| ())
                        }
                        Err(e) => Err(e),
                    }
                }
                (Ok(_), _) => Ok(()),
                (Err(e), _) => Err(e),
            }
        }
    };
    let device = session.device_name().unwrap_or("-").to_string();
    let secs = started.elapsed().as_secs_f64();
    // Which devices still speak which TLS: the admin plans their replacement from this.
    let (tls, cipher) = match &negotiated {
        Some(n) => (n.version.as_str(), n.cipher.as_str()),
        None => ("none", ""),
    };
    match result {
        Ok(()) | Err(ReadError::Closed) => tracing::info!(
            peer = %peer, listener = %settings.name, device = %device, tls = %tls, cipher = %cipher, messages = session.accepted(), secs,
            "session closed"
        ),
        Err(e) => tracing::info!(
            peer = %peer, listener = %settings.name, device = %device, tls = %tls, cipher = %cipher, messages = session.accepted(), secs,
            "session ended: {e}"
        ),
    }
}

/// The TLS handshake, bounded by [`TLS_HANDSHAKE_TIMEOUT`]; counted by protocol version.
async fn handshake<S>(
    acceptor: &Acceptor,
    stream: S,
    peer: SocketAddr,
    listener: &str,
) -> Result<(Box<dyn Stream>, Negotiated), ReadError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok((tls, n))) => {
            metrics::SMTP_TLS_SESSIONS.with_label_values(&[listener, &n.version]).inc();
            Ok((tls, n))
        }
        Ok(Err(e)) => {
            let hint = match acceptor {
                Acceptor::Rustls(_) => " (a device that speaks only TLS 1.0/1.1 or CBC suites needs a legacy_tls listener: README.md, \"Old devices and TLS\")",
                Acceptor::OpenSsl(_) => "",
            };
            tracing::warn!(peer = %peer, listener, "TLS handshake failed: {e}{hint}");
            Err(ReadError::Io(e))
        }
        Err(_) => Err(ReadError::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_limit_counts_ipv6_per_64() {
        let p = PerAddress::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(p.try_add(ip("2001:db8:0:1::1"), 2));
        assert!(p.try_add(ip("2001:db8:0:1::2"), 2));
        // A third address of the same /64 is over the limit; another /64 is not.
        assert!(!p.try_add(ip("2001:db8:0:1:dead:beef::3"), 2));
        assert!(p.try_add(ip("2001:db8:0:2::1"), 2));
        p.remove(ip("2001:db8:0:1::1"));
        assert!(p.try_add(ip("2001:db8:0:1::4"), 2));
        // IPv4 stays per address.
        assert!(p.try_add(ip("192.0.2.1"), 1));
        assert!(p.try_add(ip("192.0.2.2"), 1));
        assert!(!p.try_add(ip("::ffff:192.0.2.1"), 1));
    }
}
