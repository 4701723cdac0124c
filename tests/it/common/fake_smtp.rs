//! A fake upstream SMTP submission server for integration tests, playing
//! Office 365 (`smtp.office365.com:587`): it demands `AUTH XOAUTH2` (and
//! STARTTLS first, when configured), records every accepted message, and
//! misbehaves on request.
//!
//! Shape: one accept loop task owns the listener and a `JoinSet` of
//! connection tasks, so aborting it ([`FakeSmtp::down`], drop) closes the
//! port and every open connection at once. A connection is one [`Session`]
//! served by [`serve`], generic over the stream so the same code runs on
//! plain TCP, after STARTTLS and on implicit TLS. EHLO offers PIPELINING (RFC
//! 2920) as Exchange does (`SmtpOptions::pipelining = false` turns the keyword
//! off); commands are taken from the read buffer one line at a time and
//! answered in order, as a real server does. Every command is logged with the
//! flight (the read from the socket) that brought it ([`FakeSmtp::commands`]),
//! and each accepted message says how many flights its envelope took.
//! Test-visible state (faults, counters, recorded messages and AUTH
//! exchanges) lives behind one mutex shared with the [`FakeSmtp`] handle and
//! is updated *before* the reply that reports it is written, so a test that
//! has read a reply can assert on the state right away.
//!
//! Reply texts follow Exchange Online where it matters to the relay:
//! `530 5.7.57`, `535 5.7.3`, `550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal`,
//! the XOAUTH2 failure dance (`334 <base64 JSON>`, empty client line, `535`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::{b64, tls, CertPair};

/// `(user, token) -> accepted?`; wire it to
/// [`FakeOAuth::token_validator`](super::fake_oauth::FakeOAuth::token_validator).
pub type TokenValidator = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// A validator that accepts any user with any token.
pub fn accept_any_token() -> TokenValidator {
    Arc::new(|_, _| true)
}

/// Exchange Online's default maximum message size (35 MiB), advertised in EHLO.
pub const DEFAULT_MAX_SIZE: usize = 35 * 1024 * 1024;
/// Longest command line accepted. RFC 5321 §4.5.3.1.4 says 512, but an
/// `AUTH XOAUTH2` line carries a whole access token (a few KB at Microsoft).
const MAX_COMMAND_LINE: usize = 64 * 1024;
/// Longest DATA line accepted (RFC 5321 says 1000; scanners send longer).
const MAX_DATA_LINE: usize = 1024 * 1024;
/// Recipients per transaction (RFC 5321 §4.5.3.1.8 asks for at least 100).
const MAX_RECIPIENTS: usize = 500;
/// A stalled connection is held at most this long.
const STALL_LIMIT: Duration = Duration::from_secs(600);

/// Exchange Online's limit of concurrent SMTP AUTH connections per mailbox.
pub const EXCHANGE_CONNECTIONS_PER_USER: usize = 3;

/// The JSON Office 365 sends (base64) in the 334 after a refused token.
pub const O365_XOAUTH2_ERROR: &str =
    r#"{"status":"401","schemes":"bearer","scope":"https://outlook.office.com/SMTP.Send"}"#;

/// Reply texts, in one place.
pub mod replies {
    pub const AUTH_OK: &str = "235 2.7.0 Authentication successful";
    pub const AUTH_FAILED: &str = "535 5.7.3 Authentication unsuccessful";
    pub const NEED_STARTTLS: &str = "530 5.7.0 Must issue a STARTTLS command first";
    pub const NEED_AUTH: &str = "530 5.7.57 Client not authenticated to send mail";
    pub const BARE_LF: &str = "550 5.6.11 SMTPSEND.BareLinefeedsAreIllegal; message contains \
        bare linefeeds, which cannot be sent via DATA and receiving system does not support BDAT";
    pub const TOO_BIG: &str = "552 5.3.4 Message size exceeds fixed maximum message size";
    pub const SEND_AS_DENIED: &str = "554 5.2.252 SendAsDenied; scans@contoso.com not allowed \
        to send as printer@contoso.com; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied";
    pub const AUTH_DISABLED: &str = "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication \
        is disabled for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.";
    pub const TOO_MANY_CONNECTIONS: &str = "432 4.3.2 Concurrent connections limit exceeded. Visit \
        https://aka.ms/concurrent_sending for more information. [Hostname=FAKE0001]";
    pub const TRANSIENT: &str = "451 4.3.0 Temporary server error. Please try again later";
    pub const CLOSING_421: &str = "421 4.7.0 Temporary server error. Please try again later. PRX4 closing connection";
}

/// How the server speaks TLS.
#[allow(clippy::enum_variant_names)] // `Tls::StartTls` reads as the protocol says
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tls {
    /// Plain SMTP; AUTH allowed without TLS.
    None,
    /// STARTTLS offered and required before AUTH (port 587).
    StartTls,
    /// TLS from the first byte (port 465).
    Implicit,
}

/// How often an injected fault fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Times {
    Next(u32),
}

impl Times {
    /// Uses one occurrence; false when none is left.
    fn take(&mut self) -> bool {
        match self {
            Times::Next(0) => false,
            Times::Next(n) => {
                *n -= 1;
                true
            }
        }
    }
}

/// What [`FakeSmtp::start`] needs.
#[derive(Clone)]
pub struct SmtpOptions {
    pub tls: Tls,
    pub validator: TokenValidator,
    /// Certificate for STARTTLS / implicit TLS; a fresh `localhost` one if `None`.
    pub cert: Option<CertPair>,
    /// Name in the greeting and EHLO reply.
    pub hostname: String,
    /// `SIZE` limit (EHLO keyword, MAIL parameter and DATA length).
    pub max_size: usize,
    /// A connection silent this long gets `421 4.4.2` and is closed.
    pub idle_timeout: Duration,
    /// JSON sent (base64) in the 334 challenge after a refused token.
    pub xoauth2_error_json: String,
    /// Connections one user may have authenticated at once; the next AUTH gets
    /// [`replies::TOO_MANY_CONNECTIONS`] (Exchange Online: 3).
    pub max_connections_per_user: usize,
    /// Whether EHLO offers `PIPELINING` (RFC 2920), as Exchange Online and Gmail do.
    pub pipelining: bool,
}

impl SmtpOptions {
    pub fn new(tls: Tls, validator: TokenValidator) -> SmtpOptions {
        SmtpOptions {
            tls,
            validator,
            cert: None,
            hostname: "fake.upstream".to_string(),
            max_size: DEFAULT_MAX_SIZE,
            idle_timeout: Duration::from_secs(30),
            xoauth2_error_json: O365_XOAUTH2_ERROR.to_string(),
            max_connections_per_user: EXCHANGE_CONNECTIONS_PER_USER,
            pipelining: true,
        }
    }
}

/// One accepted message.
#[derive(Clone, Debug)]
pub struct Received {
    /// Connection number (1 = the first connection this server accepted).
    pub conn: u64,
    /// Envelope sender (without angle brackets; empty for `<>`).
    pub from: String,
    /// MAIL FROM parameters as sent (`SIZE=123`, `BODY=8BITMIME`).
    pub mail_params: Vec<String>,
    /// Accepted envelope recipients, in order.
    pub rcpts: Vec<String>,
    /// The message exactly as received, after dot-unstuffing, without the
    /// terminating `.CRLF` (so it ends with the CRLF of its last line).
    pub data: Vec<u8>,
    /// The XOAUTH2 user the connection authenticated as.
    pub user: Option<String>,
    /// Whether the connection was in TLS.
    pub tls: bool,
    /// Flights the envelope took: separate reads that brought its MAIL, RCPT and DATA
    /// commands (1 when pipelined, 2 + recipients when not).
    pub envelope_flights: usize,
}

impl Received {
    pub fn data_str(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// One AUTH exchange.
#[derive(Clone, Debug)]
pub struct AuthAttempt {
    pub conn: u64,
    pub user: Option<String>,
    pub token: Option<String>,
    /// `AUTH XOAUTH2 <ir>` (true) or `AUTH XOAUTH2`, `334 `, `<ir>` (false).
    pub initial_response: bool,
    pub success: bool,
    /// After a refused token: the line the client sent in answer to the 334
    /// error challenge (`Some("")` is the correct empty line). `None`: no
    /// answer (yet): the client is silent, hung up, or timed out.
    pub challenge_reply: Option<String>,
    /// The final reply sent (`235 ...`, `535 ...`, `501 ...`).
    pub final_reply: String,
}

impl AuthAttempt {
    /// Whether the client answered the error challenge with an empty line.
    pub fn sent_empty_line(&self) -> bool {
        self.challenge_reply.as_deref() == Some("")
    }
}

/// Counters, as a snapshot.
#[derive(Clone, Debug, Default)]
pub struct SmtpStats {
    /// TCP connections accepted (stalled ones included).
    pub connections: u64,
    pub stalled_connections: u64,
    pub starttls_upgrades: u64,
    /// STARTTLS refused because plaintext was pipelined after it.
    pub starttls_injections: u64,
    pub auth_successes: u64,
    pub auth_failures: u64,
    pub messages_accepted: u64,
    /// DATA answered with anything but 250 (bare LF, size, injected reply).
    pub messages_rejected: u64,
    pub recipients_rejected: u64,
    pub resets_mid_data: u64,
    pub closed_with_421: u64,
    /// AUTHs refused with `432 4.3.2` for too many connections of one user.
    pub concurrency_refusals: u64,
    /// The most connections one user had authenticated at once.
    pub max_connections_of_a_user: u64,
    /// Lines read as commands that are none (`500 5.3.3`): message text sent after a refused DATA.
    pub unrecognized_commands: u64,
}

/// One command line as the server read it.
#[derive(Clone, Debug)]
pub struct Command {
    pub conn: u64,
    /// The read that brought it, counted per connection from 1: commands a client pipelined
    /// in one write share a flight.
    pub flight: u64,
    /// The verb, upper-cased (`MAIL`, `RCPT`, ...); never the arguments (AUTH carries a token).
    pub verb: String,
    /// The reply's code (for DATA: the reply to the message text, when one was sent).
    pub code: u16,
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Faults {
    /// Lower-cased address → reply.
    rejected_rcpts: HashMap<String, String>,
    data_reply: Option<(String, Times)>,
    /// Plaintext lines sent right behind the `220` to STARTTLS, in the same write (a
    /// man in the middle injecting responses, CVE-2011-0411's mirror image).
    inject_after_starttls: Option<String>,
    /// How long the reply to the final dot is held back (a provider scanning a large upload).
    data_delay: Duration,
    close_421_after: Option<u32>,
    auth_reply: Option<String>,
    stall: bool,
    reset_mid_data: Option<Times>,
}

#[derive(Default)]
struct Inner {
    faults: Faults,
    stats: SmtpStats,
    /// Authenticated connections per user (lower-cased), now.
    connections_of: HashMap<String, usize>,
    messages: Vec<Received>,
    auth: Vec<AuthAttempt>,
    commands: Vec<Command>,
}

/// Fixed at start.
struct Config {
    tls: Tls,
    validator: TokenValidator,
    acceptor: Option<TlsAcceptor>,
    hostname: String,
    max_size: usize,
    idle_timeout: Duration,
    xoauth2_error_json: String,
    max_connections_per_user: usize,
    pipelining: bool,
}

struct Shared {
    config: Config,
    inner: Mutex<Inner>,
    /// Woken on every change of counters or recordings.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies `f` to the state and wakes waiters.
    fn update<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let out = f(&mut self.lock());
        self.changed.notify_waiters();
        out
    }
}

// ---------------------------------------------------------------------------
// The handle
// ---------------------------------------------------------------------------

/// Handle on a running fake SMTP server. Dropping it stops the server.
pub struct FakeSmtp {
    shared: Arc<Shared>,
    addr: SocketAddr,
    cert: CertPair,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for FakeSmtp {
    fn drop(&mut self) {
        if let Some(t) = self.task_slot().take() {
            t.abort();
        }
    }
}

impl FakeSmtp {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start(opts: SmtpOptions) -> FakeSmtp {
        let cert = opts.cert.clone().unwrap_or_else(CertPair::localhost);
        let acceptor = (opts.tls != Tls::None).then(|| tls::acceptor(&cert));
        let shared = Arc::new(Shared {
            config: Config {
                tls: opts.tls,
                validator: opts.validator,
                acceptor,
                hostname: opts.hostname,
                max_size: opts.max_size,
                idle_timeout: opts.idle_timeout,
                xoauth2_error_json: opts.xoauth2_error_json,
                max_connections_per_user: opts.max_connections_per_user,
                pipelining: opts.pipelining,
            },
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
        });
        let listener = bind(0).expect("FakeSmtp: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        FakeSmtp { shared, addr, cert, accept_task: Mutex::new(Some(task)) }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The certificate served; its `cert_pem` is the CA file a client needs.
    pub fn cert(&self) -> &CertPair {
        &self.cert
    }

    // --- what happened -----------------------------------------------------

    /// Messages accepted so far, in order.
    pub fn messages(&self) -> Vec<Received> {
        self.shared.lock().messages.clone()
    }

    pub fn clear_messages(&self) {
        self.shared.lock().messages.clear();
    }

    /// Every command line read so far, in order, with the flight that brought it.
    pub fn commands(&self) -> Vec<Command> {
        self.shared.lock().commands.clone()
    }

    /// Every AUTH exchange so far, in order.
    pub fn auth_attempts(&self) -> Vec<AuthAttempt> {
        self.shared.lock().auth.clone()
    }

    pub fn stats(&self) -> SmtpStats {
        self.shared.lock().stats.clone()
    }

    /// Waits until at least `n` messages were accepted and returns all of
    /// them. Panics after `timeout` with what was seen.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let what = format!("{n} accepted message(s)");
        self.wait(timeout, &what, |inner| (inner.messages.len() >= n).then(|| inner.messages.clone())).await
    }

    /// Waits until `cond` holds for the counters and returns them. Panics
    /// after `timeout`, naming `what`.
    pub async fn wait_until(&self, timeout: Duration, what: &str, cond: impl Fn(&SmtpStats) -> bool) -> SmtpStats {
        self.wait(timeout, what, |inner| cond(&inner.stats).then(|| inner.stats.clone())).await
    }

    async fn wait<T>(&self, timeout: Duration, what: &str, check: impl Fn(&Inner) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before looking, so no change slips between.
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = check(&self.shared.lock()) {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let inner = self.shared.lock();
                panic!(
                    "FakeSmtp on port {}: no {what} within {timeout:?}; {} message(s) accepted, \
                     stats {:?}, last AUTH {:?}",
                    self.addr.port(),
                    inner.messages.len(),
                    inner.stats,
                    inner.auth.last(),
                );
            }
        }
    }

    // --- failure injection -------------------------------------------------

    /// RCPT TO this address (any case) gets `550 5.1.1 ... User unknown`.
    pub fn reject_recipient(&self, addr: &str) {
        self.reject_recipient_with(addr, &format!("550 5.1.1 <{addr}>: Recipient address rejected: User unknown"));
    }

    /// RCPT TO this address gets `reply` (a full reply line, code first).
    pub fn reject_recipient_with(&self, addr: &str, reply: &str) {
        self.shared.lock().faults.rejected_rcpts.insert(addr.to_ascii_lowercase(), reply.to_string());
    }

    /// The end of DATA gets `reply` (e.g. [`replies::SEND_AS_DENIED`],
    /// [`replies::TRANSIENT`]) instead of 250, `times` times. Those messages
    /// are not recorded.
    pub fn set_data_reply(&self, reply: &str, times: Times) {
        self.shared.lock().faults.data_reply = Some((reply.to_string(), times));
    }

    /// Sends `lines` (CRLF-separated, no final CRLF) in plaintext right behind the 220 to
    /// STARTTLS: a client must discard them (RFC 3207 5), not read them as TLS-protected.
    pub fn set_inject_after_starttls(&self, lines: Option<&str>) {
        self.shared.lock().faults.inject_after_starttls = lines.map(str::to_string);
    }

    /// Holds the reply to the final dot back for `delay` (zero: answer at once).
    pub fn set_data_delay(&self, delay: Duration) {
        self.shared.lock().faults.data_delay = delay;
    }

    /// Once a connection has had `n` messages accepted, its next command
    /// (other than QUIT) gets `421 4.7.0 ...` and the connection is closed.
    pub fn set_421_after(&self, n: Option<u32>) {
        self.shared.lock().faults.close_421_after = n;
    }

    /// Every AUTH gets `reply` at once, whatever the token (e.g.
    /// [`replies::AUTH_DISABLED`]); a 2xx reply logs the user in.
    pub fn set_auth_reply(&self, reply: Option<&str>) {
        self.shared.lock().faults.auth_reply = reply.map(str::to_string);
    }

    /// New connections are accepted and then never answered (no greeting);
    /// they are held until the client leaves, the server goes down, or 10
    /// minutes pass. Connections already open are not affected.
    pub fn set_stall(&self, stall: bool) {
        self.shared.lock().faults.stall = stall;
    }

    /// After the 354 and the first line of message data, the connection is
    /// reset (RST) without a reply, `times` times. `None` turns it off.
    pub fn set_reset_mid_data(&self, times: Option<Times>) {
        self.shared.lock().faults.reset_mid_data = times;
    }

    /// Stops listening (connects are refused) and closes every open connection.
    pub async fn down(&self) {
        let task = self.task_slot().take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await; // the listener is dropped once this returns
        }
    }

    /// Listens again on the same port. Panics if the port cannot be had
    /// back within 5 seconds.
    pub async fn up(&self) {
        if self.is_up() {
            return;
        }
        let port = self.addr.port();
        let mut tries = 0;
        let listener = loop {
            match bind(port) {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("FakeSmtp: cannot rebind 127.0.0.1:{port}: {e}"),
            }
        };
        let task = tokio::spawn(accept_loop(listener, self.shared.clone()));
        *self.task_slot() = Some(task);
    }

    /// Whether the server is listening.
    pub fn is_up(&self) -> bool {
        self.task_slot().is_some()
    }

    fn task_slot(&self) -> MutexGuard<'_, Option<JoinHandle<()>>> {
        self.accept_task.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `127.0.0.1:port` with `SO_REUSEADDR`, so [`FakeSmtp::up`] can take the
/// same port back while old connections sit in TIME_WAIT.
fn bind(port: u16) -> io::Result<TcpListener> {
    let sock = TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind(SocketAddr::from(([127, 0, 0, 1], port)))?;
    sock.listen(128)
}

// ---------------------------------------------------------------------------
// Accepting and serving
// ---------------------------------------------------------------------------

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Owned here so that aborting this task also ends every connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    conns.spawn(handle_connection(tcp, peer, shared.clone()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// A stream the session can run on, and reset (RST) on request.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {
    fn reset_on_close(&self);
}

impl Conn for TcpStream {
    fn reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }
}

impl Conn for tokio_rustls::server::TlsStream<TcpStream> {
    fn reset_on_close(&self) {
        let _ = self.get_ref().0.set_zero_linger();
    }
}

async fn handle_connection(tcp: TcpStream, peer: SocketAddr, sh: Arc<Shared>) {
    let (conn, stall) = sh.update(|i| {
        i.stats.connections += 1;
        if i.faults.stall {
            i.stats.stalled_connections += 1;
        }
        (i.stats.connections, i.faults.stall)
    });
    if stall {
        hold_silently(tcp).await;
        return;
    }
    let _ = tcp.set_nodelay(true);
    let cfg = &sh.config;
    let mut sess = Session::new(conn, peer);
    let handshake = |tcp| {
        let acceptor = cfg.acceptor.clone().expect("TLS configured");
        tokio::time::timeout(cfg.idle_timeout, acceptor.accept(tcp))
    };
    if cfg.tls == Tls::Implicit {
        if let Ok(Ok(stream)) = handshake(tcp).await {
            sess.tls = true;
            let _ = serve(BufReader::new(stream), &mut sess, &sh).await;
        }
        return;
    }
    if let Ok(Flow::StartTls(tcp)) = serve(BufReader::new(tcp), &mut sess, &sh).await {
        if let Ok(Ok(stream)) = handshake(tcp).await {
            sh.update(|i| i.stats.starttls_upgrades += 1);
            // RFC 3207 §4.2: forget everything learnt before TLS.
            sess.tls = true;
            sess.helo = None;
            sess.user = None;
            sess.counted = None;
            sess.tx = None;
            let _ = serve(BufReader::new(stream), &mut sess, &sh).await;
        }
    }
}

/// Stall mode: read and discard until the peer leaves, never answer.
async fn hold_silently(mut tcp: TcpStream) {
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(STALL_LIMIT, async {
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// One authenticated connection of a user, counted against the per-user limit while it lives.
struct Counted {
    sh: Arc<Shared>,
    user: String,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.sh.update(|i| {
            if let Some(n) = i.connections_of.get_mut(&self.user) {
                *n = n.saturating_sub(1);
            }
        });
    }
}

/// Takes one of `user`'s connections, unless the user has the most allowed already.
fn count_connection(sh: &Arc<Shared>, user: &str) -> Option<Counted> {
    let user = user.to_ascii_lowercase();
    let limit = sh.config.max_connections_per_user;
    sh.update(|i| {
        let n = i.connections_of.entry(user.clone()).or_default();
        if *n >= limit {
            i.stats.concurrency_refusals += 1;
            return None;
        }
        *n += 1;
        i.stats.max_connections_of_a_user = i.stats.max_connections_of_a_user.max(*n as u64);
        Some(())
    })?;
    Some(Counted { sh: sh.clone(), user })
}

/// One SMTP conversation (RFC 5321 §3, §4.1.4 for ordering).
struct Session {
    conn: u64,
    peer: SocketAddr,
    greeted: bool,
    tls: bool,
    helo: Option<String>,
    /// The authenticated XOAUTH2 user.
    user: Option<String>,
    /// This connection's place in its user's count of connections (given back when dropped).
    counted: Option<Counted>,
    tx: Option<Transaction>,
    /// Messages accepted on this connection.
    accepted: u32,
    /// Reads that brought commands so far; the current command came with the last one.
    flight: u64,
}

struct Transaction {
    from: String,
    params: Vec<String>,
    rcpts: Vec<String>,
    /// The flights its MAIL, RCPT and DATA commands came in.
    flights: Vec<u64>,
}

impl Session {
    fn new(conn: u64, peer: SocketAddr) -> Session {
        Session {
            conn,
            peer,
            greeted: false,
            tls: false,
            helo: None,
            user: None,
            counted: None,
            tx: None,
            accepted: 0,
            flight: 0,
        }
    }
}

/// How [`serve`] ended.
enum Flow<S> {
    Closed,
    /// STARTTLS accepted: do the handshake on this stream.
    StartTls(S),
}

enum Read {
    Line,
    Eof,
    Timeout,
    TooLong,
}

/// Reads one line including its `\n` into `buf`, at most `max` bytes.
async fn read_line<R: AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    idle: Duration,
) -> io::Result<Read> {
    buf.clear();
    let mut limited = (&mut *r).take(max as u64);
    Ok(match tokio::time::timeout(idle, limited.read_until(b'\n', buf)).await {
        Err(_) => Read::Timeout,
        Ok(Err(e)) => return Err(e),
        Ok(Ok(0)) => Read::Eof,
        Ok(Ok(_)) if buf.ends_with(b"\n") => Read::Line,
        Ok(Ok(n)) if n >= max => Read::TooLong,
        Ok(Ok(_)) => Read::Eof, // the peer left in the middle of a line
    })
}

fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Writes one reply (lines already joined with CRLF) and flushes.
async fn send<S: AsyncRead + AsyncWrite + Unpin>(io: &mut BufReader<S>, reply: &str) -> io::Result<()> {
    let w = io.get_mut();
    w.write_all(format!("{reply}\r\n").as_bytes()).await?;
    w.flush().await
}

/// Serves commands until QUIT, EOF, an error, or STARTTLS.
async fn serve<S: Conn>(mut io: BufReader<S>, sess: &mut Session, sh: &Arc<Shared>) -> io::Result<Flow<S>> {
    let cfg = &sh.config;
    let host = cfg.hostname.as_str();
    if !sess.greeted {
        sess.greeted = true;
        send(&mut io, &format!("220 {host} ESMTP")).await?;
    }
    let mut line = Vec::new();
    loop {
        // Commands are taken from the buffer one at a time (RFC 2920 3.1); one that needs a
        // fresh read from the socket starts a new flight.
        if io.buffer().is_empty() {
            sess.flight += 1;
        }
        match read_line(&mut io, &mut line, MAX_COMMAND_LINE, cfg.idle_timeout).await? {
            Read::Line => {}
            Read::Eof => return Ok(Flow::Closed),
            Read::Timeout => {
                send(&mut io, &format!("421 4.4.2 {host} Error: timeout exceeded")).await?;
                return Ok(Flow::Closed);
            }
            Read::TooLong => {
                send(&mut io, "500 5.5.6 Line too long").await?;
                return Ok(Flow::Closed);
            }
        }
        let text = String::from_utf8_lossy(strip_eol(&line)).into_owned();
        let (verb, arg) = match text.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim().to_string()),
            None => (text.trim().to_ascii_uppercase(), String::new()),
        };

        if verb != "QUIT" {
            let limit = sh.lock().faults.close_421_after;
            if limit.is_some_and(|n| sess.accepted >= n) {
                sh.update(|i| i.stats.closed_with_421 += 1);
                send(&mut io, replies::CLOSING_421).await?;
                return Ok(Flow::Closed);
            }
        }

        let reply: String = match verb.as_str() {
            "EHLO" | "HELO" => {
                if arg.is_empty() {
                    format!("501 5.5.4 Syntax: {verb} hostname")
                } else {
                    // RFC 5321 §4.1.4: EHLO resets any transaction.
                    sess.helo = Some(arg);
                    sess.tx = None;
                    ehlo_reply(&verb, sess, cfg)
                }
            }
            "STARTTLS" => {
                if cfg.tls != Tls::StartTls || sess.tls {
                    "502 5.5.1 STARTTLS not available".to_string()
                } else if sess.helo.is_none() {
                    "503 5.5.2 Send hello first".to_string()
                } else if !io.buffer().is_empty() {
                    // Plaintext pipelined after STARTTLS would be taken as
                    // coming from inside TLS (CVE-2011-0411): refuse.
                    sh.update(|i| i.stats.starttls_injections += 1);
                    send(&mut io, "554 5.5.1 Error: pipelined data after STARTTLS").await?;
                    return Ok(Flow::Closed);
                } else {
                    let (conn, flight) = (sess.conn, sess.flight);
                    sh.update(|i| i.commands.push(Command { conn, flight, verb: verb.clone(), code: 220 }));
                    let inject = sh.lock().faults.inject_after_starttls.clone();
                    match inject {
                        Some(extra) => send(&mut io, &format!("220 2.0.0 SMTP server ready\r\n{extra}")).await?,
                        None => send(&mut io, "220 2.0.0 SMTP server ready").await?,
                    }
                    return Ok(Flow::StartTls(io.into_inner()));
                }
            }
            "AUTH" => match auth(&mut io, sess, sh, &arg).await? {
                Some(r) => r,
                None => return Ok(Flow::Closed),
            },
            "MAIL" => mail(sess, cfg, &arg),
            "RCPT" => rcpt(sess, sh, &arg),
            "DATA" => match data(&mut io, sess, sh, &arg).await? {
                Some(r) => r,
                None => return Ok(Flow::Closed),
            },
            "RSET" => {
                sess.tx = None;
                "250 2.0.0 Resetting".to_string()
            }
            "NOOP" => "250 2.0.0 OK".to_string(),
            "VRFY" => "252 2.5.0 Cannot VRFY user, but will accept message".to_string(),
            "HELP" => "214 2.0.0 This is a fake Office 365 submission server".to_string(),
            "QUIT" => {
                send(&mut io, "221 2.0.0 Service closing transmission channel").await?;
                return Ok(Flow::Closed);
            }
            _ => {
                sh.update(|i| i.stats.unrecognized_commands += 1);
                "500 5.3.3 Unrecognized command".to_string()
            }
        };
        let code = reply.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        sh.update(|i| i.commands.push(Command { conn: sess.conn, flight: sess.flight, verb: verb.clone(), code }));
        send(&mut io, &reply).await?;
    }
}

fn ehlo_reply(verb: &str, sess: &Session, cfg: &Config) -> String {
    let greeting = format!("250{}{} Hello [{}]", if verb == "EHLO" { "-" } else { " " }, cfg.hostname, sess.peer.ip());
    if verb == "HELO" {
        return greeting;
    }
    let mut keywords = vec![format!("SIZE {}", cfg.max_size)];
    if cfg.pipelining {
        keywords.push("PIPELINING".to_string());
    }
    keywords.extend(["8BITMIME".to_string(), "ENHANCEDSTATUSCODES".to_string()]);
    if cfg.tls == Tls::StartTls && !sess.tls {
        keywords.push("STARTTLS".to_string());
    }
    keywords.push("AUTH XOAUTH2".to_string());
    let last = keywords.len() - 1;
    let mut lines = vec![greeting];
    for (i, k) in keywords.iter().enumerate() {
        lines.push(format!("250{}{k}", if i == last { " " } else { "-" }));
    }
    lines.join("\r\n")
}

/// `AUTH XOAUTH2 [initial-response]` (RFC 4954; the XOAUTH2 mechanism as
/// Google and Microsoft document it). `None`: the connection is gone.
async fn auth<S: Conn>(
    io: &mut BufReader<S>,
    sess: &mut Session,
    sh: &Arc<Shared>,
    arg: &str,
) -> io::Result<Option<String>> {
    let cfg = &sh.config;
    let refuse = |r: &str| Ok(Some(r.to_string()));
    if sess.helo.is_none() {
        return refuse("503 5.5.2 Send hello first");
    }
    if cfg.tls == Tls::StartTls && !sess.tls {
        return refuse(replies::NEED_STARTTLS);
    }
    if sess.user.is_some() {
        return refuse("503 5.5.1 Already authenticated");
    }
    if sess.tx.is_some() {
        return refuse("503 5.5.1 Mail transaction in progress");
    }
    let mut words = arg.split_whitespace();
    if !words.next().unwrap_or("").eq_ignore_ascii_case("XOAUTH2") {
        return refuse("504 5.7.4 Unrecognized authentication type");
    }
    let mut line = Vec::new();
    let (encoded, initial_response) = match words.next() {
        Some(ir) => (ir.to_string(), true),
        None => {
            // RFC 4954 §4: an empty challenge, then the client's response.
            send(io, "334 ").await?;
            match read_line(io, &mut line, MAX_COMMAND_LINE, cfg.idle_timeout).await? {
                Read::Line => {}
                _ => return Ok(None),
            }
            (String::from_utf8_lossy(strip_eol(&line)).trim().to_string(), false)
        }
    };
    if encoded == "*" {
        return refuse("501 5.7.0 Authentication cancelled");
    }
    let mut attempt = AuthAttempt {
        conn: sess.conn,
        user: None,
        token: None,
        initial_response,
        success: false,
        challenge_reply: None,
        final_reply: String::new(),
    };
    let decoded = if encoded == "=" {
        Some(Vec::new())
    } else {
        STANDARD.decode(&encoded).or_else(|_| STANDARD_NO_PAD.decode(&encoded)).ok()
    };
    let Some(decoded) = decoded else {
        attempt.final_reply = "501 5.5.2 Cannot decode response".to_string();
        return Ok(Some(record_auth(sh, attempt)));
    };
    (attempt.user, attempt.token) = parse_xoauth2(&decoded);

    let forced = sh.lock().faults.auth_reply.clone();
    // The validator may lock FakeOAuth's state: call it with ours unlocked.
    let valid = forced.is_none()
        && match (&attempt.user, &attempt.token) {
            (Some(u), Some(t)) => (cfg.validator)(u, t),
            _ => false,
        };
    if valid || forced.as_deref().is_some_and(|r| r.starts_with('2')) {
        // Exchange counts a mailbox's authenticated connections: the one too many is refused.
        match count_connection(sh, attempt.user.as_deref().unwrap_or("")) {
            Some(counted) => {
                sess.counted = Some(counted);
                sess.user = attempt.user.clone();
                attempt.success = true;
                attempt.final_reply = forced.unwrap_or_else(|| replies::AUTH_OK.to_string());
            }
            None => attempt.final_reply = replies::TOO_MANY_CONNECTIONS.to_string(),
        }
        return Ok(Some(record_auth(sh, attempt)));
    }
    if let Some(reply) = forced {
        attempt.final_reply = reply;
        return Ok(Some(record_auth(sh, attempt)));
    }

    // Refused: the error JSON comes as a 334 challenge, the client must
    // answer with an empty line, and only then comes the 535. The failure is
    // recorded when the 334 goes out (a client that neither answers nor
    // hangs up is visible at once); its answer is filled in when it comes.
    attempt.final_reply = replies::AUTH_FAILED.to_string();
    let reply = attempt.final_reply.clone();
    let index = sh.update(|i| {
        i.stats.auth_failures += 1;
        i.auth.push(attempt);
        i.auth.len() - 1
    });
    send(io, &format!("334 {}", b64(&cfg.xoauth2_error_json))).await?;
    let got = read_line(io, &mut line, MAX_COMMAND_LINE, cfg.idle_timeout).await?;
    let Read::Line = got else {
        return Ok(None);
    };
    let answer = String::from_utf8_lossy(strip_eol(&line)).into_owned();
    sh.update(|i| i.auth[index].challenge_reply = Some(answer));
    Ok(Some(reply))
}

/// Records an AUTH exchange; returns its final reply.
fn record_auth(sh: &Shared, attempt: AuthAttempt) -> String {
    let reply = attempt.final_reply.clone();
    sh.update(|i| {
        if attempt.success {
            i.stats.auth_successes += 1;
        } else {
            i.stats.auth_failures += 1;
        }
        i.auth.push(attempt);
    });
    reply
}

/// `user=<email>\x01auth=Bearer <token>\x01\x01` → (user, token).
fn parse_xoauth2(raw: &[u8]) -> (Option<String>, Option<String>) {
    let s = String::from_utf8_lossy(raw);
    let (mut user, mut token) = (None, None);
    for field in s.split('\x01') {
        if let Some(u) = field.strip_prefix("user=") {
            user = Some(u.to_string());
        } else if let Some(a) = field.strip_prefix("auth=") {
            if a.get(..7).is_some_and(|p| p.eq_ignore_ascii_case("bearer ")) {
                token = Some(a[7..].trim().to_string());
            }
        }
    }
    (user, token)
}

/// Strips a case-insensitive prefix such as `FROM:`.
fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    s.get(..prefix.len()).filter(|p| p.eq_ignore_ascii_case(prefix)).map(|_| &s[prefix.len()..])
}

/// `<addr> params...` → (addr, params). RFC 5321 §4.1.2 paths are bracketed.
fn parse_path(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start().strip_prefix('<')?;
    let end = s.find('>')?;
    Some((s[..end].to_string(), s[end + 1..].trim()))
}

fn mail(sess: &mut Session, cfg: &Config, arg: &str) -> String {
    if sess.helo.is_none() {
        return "503 5.5.2 Send hello first".into();
    }
    if sess.user.is_none() {
        return replies::NEED_AUTH.into();
    }
    if sess.tx.is_some() {
        return "503 5.5.1 Sender already specified".into();
    }
    let Some((from, params)) = strip_prefix_ci(arg, "FROM:").and_then(parse_path) else {
        return "501 5.5.4 Syntax: MAIL FROM:<address>".into();
    };
    let mut kept = Vec::new();
    for p in params.split_whitespace() {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        match k.to_ascii_uppercase().as_str() {
            // RFC 1870 §6: a declared size over the limit is refused at MAIL.
            "SIZE" => match v.parse::<usize>() {
                Ok(n) if n > cfg.max_size => return replies::TOO_BIG.into(),
                Ok(_) => {}
                Err(_) => return "501 5.5.4 Invalid SIZE parameter".into(),
            },
            "BODY" if v.eq_ignore_ascii_case("7BIT") || v.eq_ignore_ascii_case("8BITMIME") => {}
            "AUTH" => {}
            _ => return format!("555 5.5.4 Unsupported option: {k}"),
        }
        kept.push(p.to_string());
    }
    sess.tx = Some(Transaction { from, params: kept, rcpts: Vec::new(), flights: vec![sess.flight] });
    "250 2.1.0 Sender OK".into()
}

fn rcpt(sess: &mut Session, sh: &Shared, arg: &str) -> String {
    let Some(tx) = sess.tx.as_mut() else {
        return "503 5.5.1 Need MAIL command".into();
    };
    tx.flights.push(sess.flight);
    let Some((to, _params)) = strip_prefix_ci(arg, "TO:").and_then(parse_path) else {
        return "501 5.5.4 Syntax: RCPT TO:<address>".into();
    };
    if to.is_empty() {
        return "501 5.1.3 Bad recipient address syntax".into();
    }
    if tx.rcpts.len() >= MAX_RECIPIENTS {
        return "452 4.5.3 Too many recipients".into();
    }
    let rejected = sh.lock().faults.rejected_rcpts.get(&to.to_ascii_lowercase()).cloned();
    if let Some(reply) = rejected {
        sh.update(|i| i.stats.recipients_rejected += 1);
        return reply;
    }
    tx.rcpts.push(to);
    "250 2.1.5 Recipient OK".into()
}

/// How reading the message text ended.
enum DataEnd {
    Complete { data: Vec<u8>, bare_lf: bool, too_big: bool },
    Reset,
    Gone,
}

/// DATA (RFC 5321 §4.1.1.4). `None`: the connection is gone (or was reset).
async fn data<S: Conn>(
    io: &mut BufReader<S>,
    sess: &mut Session,
    sh: &Shared,
    arg: &str,
) -> io::Result<Option<String>> {
    let cfg = &sh.config;
    match &sess.tx {
        None => return Ok(Some("503 5.5.1 Need MAIL command".into())),
        // RFC 2920 §3.1: with every RCPT refused, a pipelined DATA gets 554.
        Some(tx) if tx.rcpts.is_empty() => return Ok(Some("554 5.5.1 Error: no valid recipients".into())),
        Some(_) if !arg.is_empty() => return Ok(Some("501 5.5.4 Syntax: DATA".into())),
        Some(_) => {}
    }
    if let Some(tx) = sess.tx.as_mut() {
        tx.flights.push(sess.flight);
    }
    let reset = sh.lock().faults.reset_mid_data.as_mut().is_some_and(Times::take);
    send(io, "354 Start mail input; end with <CRLF>.<CRLF>").await?;
    let end = read_message(io, cfg, reset).await?;
    let tx = sess.tx.take().expect("checked above");
    let (data, bare_lf, too_big) = match end {
        DataEnd::Complete { data, bare_lf, too_big } => (data, bare_lf, too_big),
        DataEnd::Gone => return Ok(None),
        DataEnd::Reset => {
            sh.update(|i| i.stats.resets_mid_data += 1);
            io.get_ref().reset_on_close();
            return Ok(None);
        }
    };
    let delay = sh.lock().faults.data_delay;
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let injected = if bare_lf || too_big {
        None
    } else {
        let mut inner = sh.lock();
        let slot = &mut inner.faults.data_reply;
        let fire = slot.as_mut().is_some_and(|(_, t)| t.take());
        fire.then(|| slot.as_ref().expect("set").0.clone())
    };
    let reply = if bare_lf {
        replies::BARE_LF.to_string()
    } else if too_big {
        replies::TOO_BIG.to_string()
    } else if let Some(r) = injected {
        r
    } else {
        sess.accepted += 1;
        let user = sess.user.clone();
        let queue_id = sh.update(|i| {
            i.stats.messages_accepted += 1;
            let queue_id = format!("FAKE{:06}", i.stats.messages_accepted);
            let mut flights = tx.flights.clone();
            flights.dedup();
            i.messages.push(Received {
                envelope_flights: flights.len(),
                conn: sess.conn,
                from: tx.from,
                mail_params: tx.params,
                rcpts: tx.rcpts,
                data,
                user,
                tls: sess.tls,
            });
            queue_id
        });
        return Ok(Some(format!("250 2.0.0 OK <{queue_id}@{}>", cfg.hostname)));
    };
    sh.update(|i| i.stats.messages_rejected += 1);
    Ok(Some(reply))
}

/// Reads message text up to `CRLF.CRLF`, dot-unstuffing. Only CRLF "." CRLF
/// ends it: `LF.LF` or `LF.CRLF` are content (no SMTP smuggling), and any
/// line ending in a bare LF marks the message for the 550 5.6.11 refusal.
async fn read_message<S: Conn>(
    io: &mut BufReader<S>,
    cfg: &Config,
    reset_after_first_line: bool,
) -> io::Result<DataEnd> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    let (mut bare_lf, mut too_big) = (false, false);
    // The DATA command line ended with CRLF, so the text starts a line.
    let mut after_crlf = true;
    loop {
        match read_line(io, &mut line, MAX_DATA_LINE, cfg.idle_timeout).await? {
            Read::Line => {}
            Read::Eof | Read::Timeout | Read::TooLong => return Ok(DataEnd::Gone),
        }
        if reset_after_first_line {
            return Ok(DataEnd::Reset);
        }
        if after_crlf && line == b".\r\n" {
            return Ok(DataEnd::Complete { data, bare_lf, too_big });
        }
        let ends_crlf = line.ends_with(b"\r\n");
        bare_lf |= !ends_crlf;
        // RFC 5321 §4.5.2: remove the first dot of a line that starts with one.
        let content = line.strip_prefix(b".").unwrap_or(&line);
        if data.len() + content.len() > cfg.max_size {
            too_big = true;
        } else {
            data.extend_from_slice(content);
        }
        after_crlf = ends_crlf;
    }
}
