//! The session tested in process: whole conversations over `tokio::io::duplex`, with fakes
//! for the session's ports (`smtp::ports`), written as transcripts: `C:` what the client sends
//! (consecutive `C:` lines go out in one write, as a pipelining client sends them), `S:` the
//! line the server must answer (`*` at the end: the rest may be anything). Time is paused, so
//! timeouts and login delays cost nothing: every test runs in milliseconds.
//!
//! [`every_reply_is_produced`] runs every scenario and fails when a reply of the catalogue
//! (`smtp::reply::ALL`) was never produced. The black-box tests in `tests/` keep what needs
//! the real binary (disk, durability, real clients and providers).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine as _;
use futures_util::future::BoxFuture;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::auth::AuthThrottle;
use super::listener::{self, Acceptor, CurrentContext, ListenerSettings, Stream, Tls};
use super::ports::{Accept, Attempt, BodySink, Identities, Verify};
use super::reply::{ALL, PRODUCED};
use super::Context;
use crate::config::Config;
use crate::delivery::Outcome;
use crate::devices::{AuthError, Device, Devices};
use crate::queue::{Incoming, Lease, MessageId, QueueError};
use crate::upstream::UpstreamReply;

const HOST: &str = "relay.test";
/// A device by its address (`from = "keep"`).
const LAN: &str = "192.168.10.5";
/// No device.
const STRANGER: &str = "10.0.0.9";

/// Devices: `lan` by address; `scanner` (user "scan", PIN "1234") may send to contoso.com
/// only, and its From is rewritten; `expired` sends as an identity that needs a new sign-in;
/// `orphan` as an identity that is not configured.
const CONFIG: &str = r#"
[[identity]]
name = "i"
email = "scans@contoso.com"
provider = "mail"
flow = "auth_code"
[[device]]
name = "lan"
identity = "i"
addresses = ["192.168.10.0/24"]
from = "keep"
[[device]]
name = "scanner"
identity = "i"
username = "scan"
pin_hash = "not-used-by-the-fake"
recipients = ["*@contoso.com"]
[[device]]
name = "expired"
identity = "j"
username = "exp"
pin_hash = "not-used-by-the-fake"
[[device]]
name = "orphan"
identity = "gone"
username = "orphan"
pin_hash = "not-used-by-the-fake"
"#;

// ---- Fakes for the ports. ----

/// Devices from [`CONFIG`]; every login's PIN is "1234" (no argon2).
struct FakeDevices(Devices);

impl Verify for FakeDevices {
    fn by_address(&self, ip: std::net::IpAddr) -> Option<Arc<Device>> {
        self.0.by_address(ip)
    }
    fn still_logged_in(&self, old: &Device, ip: std::net::IpAddr) -> Option<Arc<Device>> {
        self.0.still_logged_in(old, ip)
    }
    fn name_of_user(&self, username: &str) -> Option<String> {
        self.0.name_of_user(username).map(str::to_string)
    }
    fn authenticate<'a>(
        &'a self,
        username: &'a str,
        pin: &'a str,
        _ip: std::net::IpAddr,
    ) -> BoxFuture<'a, Result<Arc<Device>, AuthError>> {
        Box::pin(async move {
            let d = self
                .0
                .all()
                .iter()
                .find(|d| d.username.as_deref().is_some_and(|u| u.eq_ignore_ascii_case(username)))
                .ok_or(AuthError::UnknownUser)?;
            if pin == "1234" {
                Ok(d.clone())
            } else {
                Err(AuthError::WrongPin)
            }
        })
    }
    fn identities(&self) -> &[String] {
        self.0.identities()
    }
}

/// Identity "i" (scans@contoso.com) and "j" (needs a new sign-in); "gone" is unknown.
#[derive(Default)]
struct FakeIdentities {
    limit: Mutex<Option<u64>>,
}

impl Identities for FakeIdentities {
    fn email(&self, identity: &str) -> Option<String> {
        match identity {
            "i" => Some("scans@contoso.com".into()),
            "j" => Some("j@contoso.com".into()),
            _ => None,
        }
    }
    fn size_limit(&self, _identity: &str) -> Option<u64> {
        *self.limit.lock().unwrap()
    }
    fn needs_login(&self, identity: &str) -> bool {
        identity == "j"
    }
}

/// A queue in memory that can be told to fail.
#[derive(Default)]
struct FakeQueue {
    last: AtomicU64,
    fail_write: AtomicBool,
    fail_accept: AtomicBool,
    bodies: Arc<Mutex<HashMap<MessageId, Vec<u8>>>>,
    accepted: Mutex<Vec<Incoming>>,
}

struct MemSink {
    id: MessageId,
    buf: Vec<u8>,
    fail: bool,
    bodies: Arc<Mutex<HashMap<MessageId, Vec<u8>>>>,
}

impl BodySink for MemSink {
    fn write<'a>(&'a mut self, bytes: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            if self.fail {
                return Err(std::io::Error::other("disk full"));
            }
            self.buf.extend_from_slice(bytes);
            Ok(())
        })
    }
    fn written(&self) -> u64 {
        self.buf.len() as u64
    }
    fn finish(self: Box<Self>) -> BoxFuture<'static, std::io::Result<()>> {
        Box::pin(async move {
            self.bodies.lock().unwrap().insert(self.id, self.buf);
            Ok(())
        })
    }
    fn abort(self: Box<Self>) {}
}

impl Accept for FakeQueue {
    fn new_id(&self) -> MessageId {
        MessageId(self.last.fetch_add(1, Ordering::SeqCst) + 1)
    }
    fn body(&self, id: MessageId) -> Box<dyn BodySink> {
        let fail = self.fail_write.load(Ordering::SeqCst);
        Box::new(MemSink { id, buf: Vec::new(), fail, bodies: self.bodies.clone() })
    }
    fn spooled(&self, _id: MessageId) -> Option<std::path::PathBuf> {
        None
    }
    fn discard(&self, id: MessageId) {
        self.bodies.lock().unwrap().remove(&id);
    }
    fn accept<'a>(&'a self, m: &'a Incoming) -> BoxFuture<'a, Result<Vec<Lease>, QueueError>> {
        Box::pin(async move {
            if self.fail_accept.load(Ordering::SeqCst) {
                return Err(QueueError::Io(std::io::Error::other("sync failed")));
            }
            self.accepted.lock().unwrap().push(m.clone());
            Ok(vec![Lease::unqueued(m.id)])
        })
    }
}

/// When on, one folder destination: `finance@scan.lan`, saved by identity "files".
#[derive(Default)]
struct FakeDestinations(AtomicBool);

impl super::ports::Destinations for FakeDestinations {
    fn by_address(&self, address: &str) -> Option<(String, String)> {
        (self.any() && address.eq_ignore_ascii_case("finance@scan.lan")).then(|| ("finance".into(), "files".into()))
    }
    fn any(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    fn reachable(&self, allows: &dyn Fn(&str) -> bool) -> bool {
        self.any() && allows("finance@scan.lan")
    }
    fn nothing_to_save<'a>(
        &'a self,
        _: &'a [String],
        _: &'a std::path::Path,
    ) -> BoxFuture<'a, Option<crate::reply::Reply>> {
        Box::pin(async { None })
    }
}

/// The in-session attempt answers what it is told to.
struct FakeDelivery(Mutex<Outcome>);

impl Attempt for FakeDelivery {
    fn attempt_in_session(self: Arc<Self>, _leases: Vec<Lease>) -> BoxFuture<'static, Outcome> {
        let outcome = self.0.lock().unwrap().clone();
        Box::pin(async move { outcome })
    }
}

// ---- The harness. ----

/// One relay (its fakes) and the listener settings of the sessions it runs.
struct World {
    ctx: Arc<Context>,
    queue: Arc<FakeQueue>,
    delivery: Arc<FakeDelivery>,
    identities: Arc<FakeIdentities>,
    folders: Arc<FakeDestinations>,
    current: CurrentContext,
    /// What `current` reads: a reload replaces it.
    slot: Arc<RwLock<Arc<Context>>>,
    settings: Arc<ListenerSettings>,
}

/// How a test listener is set up.
struct Setup {
    tls: Tls,
    require_auth: bool,
    require_auth_tls: bool,
    max_message_size: u64,
    command_timeout: Duration,
    max_recipients: usize,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            tls: Tls::None,
            require_auth: false,
            require_auth_tls: false,
            max_message_size: 1_000_000,
            command_timeout: Duration::from_secs(300),
            max_recipients: 3,
        }
    }
}

fn devices() -> Devices {
    let config = Config::parse(Path::new("t.toml"), CONFIG.to_string()).expect("test config parses");
    Devices::from_config(&config)
}

impl World {
    fn new(setup: Setup) -> World {
        let queue = Arc::new(FakeQueue::default());
        let delivery =
            Arc::new(FakeDelivery(Mutex::new(Outcome::Delivered(UpstreamReply::new(250, "2.0.0 OK queued as 42")))));
        let identities = Arc::new(FakeIdentities::default());
        let folders = Arc::new(FakeDestinations::default());
        let ctx = Arc::new(Context {
            hostname: HOST.into(),
            devices: Arc::new(FakeDevices(devices())),
            queue: queue.clone(),
            delivery: delivery.clone(),
            tokens: identities.clone(),
            folders: folders.clone(),
            throttle: Arc::new(AuthThrottle::new(super::AUTH_LIMITS)),
            max_recipients: setup.max_recipients,
            activity: Default::default(),
        });
        let settings = Arc::new(ListenerSettings {
            name: "test".into(),
            tls: setup.tls,
            require_auth: setup.require_auth,
            require_auth_tls: setup.require_auth_tls,
            max_message_size: setup.max_message_size,
            command_timeout: setup.command_timeout,
            max_connections: 10,
            max_connections_per_address: 10,
        });
        let slot = Arc::new(RwLock::new(ctx.clone()));
        let read = slot.clone();
        let current = CurrentContext::new(move || read.read().unwrap().clone());
        World { ctx, queue, delivery, identities, folders, current, slot, settings }
    }

    fn plain() -> World {
        World::new(Setup::default())
    }

    /// A client connected from `peer` (an IP address); the session runs in its own task.
    fn connect(&self, peer: &str) -> Client {
        let (client, server) = tokio::io::duplex(1 << 20);
        let peer: SocketAddr = SocketAddr::new(peer.parse().expect("test address"), 40000);
        let (shutdown, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(listener::handle(server, peer, self.settings.clone(), self.ctx.clone(), self.current.clone(), rx));
        let io: Box<dyn Stream> = Box::new(client);
        Client { io: BufReader::new(io), shutdown }
    }

    fn outcome(&self, o: Outcome) {
        *self.delivery.0.lock().unwrap() = o;
    }

    fn accepted(&self) -> Vec<Incoming> {
        self.queue.accepted.lock().unwrap().clone()
    }

    fn body(&self, id: u64) -> String {
        String::from_utf8_lossy(self.queue.bodies.lock().unwrap().get(&MessageId(id)).expect("body")).into_owned()
    }
}

/// The client end of a session.
struct Client {
    io: BufReader<Box<dyn Stream>>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl Client {
    async fn send(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.expect("client write");
        self.io.get_mut().flush().await.expect("client flush");
    }

    /// One line from the server, without its CRLF; "" at the end of the stream.
    async fn line(&mut self) -> String {
        let mut s = String::new();
        match tokio::time::timeout(Duration::from_secs(3600), self.io.read_line(&mut s)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("client read: {e}"),
            Err(_) => panic!("the server said nothing for an hour"),
        }
        assert!(s.is_empty() || s.ends_with("\r\n"), "a reply line without CRLF: {s:?}");
        s.trim_end_matches("\r\n").to_string()
    }

    /// Plays a transcript (see the module docs).
    async fn transcript(&mut self, t: &str) {
        let mut out = Vec::new();
        for raw in t.lines() {
            let l = raw.trim_start();
            if let Some(c) = l.strip_prefix("C:") {
                out.extend_from_slice(c.strip_prefix(' ').unwrap_or(c).as_bytes());
                out.extend_from_slice(b"\r\n");
            } else if let Some(s) = l.strip_prefix("S:") {
                if !out.is_empty() {
                    self.send(&std::mem::take(&mut out)).await;
                }
                let want = s.strip_prefix(' ').unwrap_or(s);
                let got = self.line().await;
                match want.strip_suffix('*') {
                    Some(prefix) => assert!(got.starts_with(prefix), "expected {want:?}, got {got:?}"),
                    None => assert_eq!(got, want, "transcript line {l:?}"),
                }
            } else {
                assert!(l.is_empty(), "a transcript line is C: or S: ({l:?})");
            }
        }
        if !out.is_empty() {
            self.send(&out).await;
        }
    }

    /// Reads the greeting and greets with EHLO; returns the EHLO reply's lines.
    async fn ehlo(&mut self) -> Vec<String> {
        self.transcript("S: 220 relay.test ESMTP mfd-relay ready").await;
        self.ehlo_again().await
    }

    /// EHLO; returns the reply's lines.
    async fn ehlo_again(&mut self) -> Vec<String> {
        self.send(b"EHLO printer\r\n").await;
        let mut lines = Vec::new();
        loop {
            let l = self.line().await;
            assert!(l.starts_with("250"), "EHLO answered {l:?}");
            let last = l.starts_with("250 ");
            lines.push(l);
            if last {
                return lines;
            }
        }
    }

    /// Opens a transaction for one recipient and starts DATA, pipelined.
    async fn start_data(&mut self, rcpt: &str) {
        self.transcript(&format!(
            "C: MAIL FROM:<p@printer.local>
             C: RCPT TO:<{rcpt}>
             C: DATA
             S: 250 2.1.0 Sender OK
             S: 250 2.1.5 Recipient OK
             S: 354 *"
        ))
        .await;
    }

    /// AUTH PLAIN with an initial response.
    async fn login(&mut self, user: &str, pin: &str) -> String {
        self.send(format!("AUTH PLAIN {}\r\n", plain(user, pin)).as_bytes()).await;
        self.line().await
    }

    /// The server closed the connection.
    async fn closed(&mut self) {
        assert_eq!(self.line().await, "", "the session should have ended");
    }

    /// Upgrades to TLS (after the server's 220 to STARTTLS, or at once for implicit TLS).
    async fn tls(self, cert: &TestCert) -> Client {
        let plain = self.io.into_inner();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der.clone()).expect("test root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, plain).await.expect("handshake");
        let io: Box<dyn Stream> = Box::new(tls);
        Client { io: BufReader::new(io), shutdown: self.shutdown }
    }
}

/// AUTH PLAIN's initial response (RFC 4616).
fn plain(user: &str, pin: &str) -> String {
    b64(&format!("\0{user}\0{pin}"))
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A self-signed certificate for "localhost" and the acceptor presenting it.
struct TestCert {
    der: rustls::pki_types::CertificateDer<'static>,
    acceptor: Acceptor,
}

fn test_cert() -> TestCert {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert =
        rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params").self_signed(&key).expect("cert");
    let der = cert.der().clone();
    let pk = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], pk)
        .expect("server config");
    TestCert { der, acceptor: Acceptor::Rustls(tokio_rustls::TlsAcceptor::from(Arc::new(config))) }
}

/// The EHLO lines of a plain listener for a client that may log in.
const EHLO_PLAIN: &[&str] = &[
    "250-relay.test Hello printer [192.168.10.5]",
    "250-SIZE 1000000",
    "250-8BITMIME",
    "250-PIPELINING",
    "250-ENHANCEDSTATUSCODES",
    "250-AUTH PLAIN LOGIN",
    "250 HELP",
];

// ---- The scenarios. ----

async fn greeting_and_simple_commands() {
    let w = World::plain();
    let mut c = w.connect(LAN);
    c.transcript(
        "S: 220 relay.test ESMTP mfd-relay ready
         C: EHLO printer
         S: 250-relay.test Hello printer [192.168.10.5]
         S: 250-SIZE 1000000
         S: 250-8BITMIME
         S: 250-PIPELINING
         S: 250-ENHANCEDSTATUSCODES
         S: 250-AUTH PLAIN LOGIN
         S: 250 HELP
         C: HELO printer
         S: 250 relay.test Hello printer
         C: NOOP
         S: 250 2.0.0 OK
         C: HELP
         S: 214 2.0.0 Commands: *
         C: VRFY someone
         S: 252 2.5.0 Cannot VRFY user*
         C: EXPN list
         S: 502 5.5.1 EXPN not supported
         C: QUIT
         S: 221 2.0.0 relay.test closing connection",
    )
    .await;
    c.closed().await;
}

async fn a_message_from_an_address_device() {
    let w = World::plain();
    let mut c = w.connect(LAN);
    assert_eq!(c.ehlo().await, EHLO_PLAIN);
    c.transcript(
        "C: MAIL FROM:<panel@printer.local>
         S: 250 2.1.0 Sender OK
         C: RCPT TO:<a@example.com>
         S: 250 2.1.5 Recipient OK
         C: RCPT TO:<A@example.com>
         S: 250 2.1.5 Recipient OK
         C: DATA
         S: 354 Start mail input; end with <CRLF>.<CRLF>
         C: Subject: hi
         C:
         C: ..dot-stuffed
         C: .
         S: 250 2.0.0 OK 0000000000000001 delivered: 2.0.0 OK queued as 42",
    )
    .await;
    let m = &w.accepted()[0];
    assert_eq!((m.device.as_str(), m.identity.as_str(), m.from.as_str()), ("lan", "i", "panel@printer.local"));
    assert_eq!(m.rcpts, ["a@example.com"], "the same recipient twice is kept once");
    assert_eq!(m.rewrite_from, None, "lan keeps its sender");
    let body = w.body(1);
    assert!(body.starts_with("Received: from printer ([192.168.10.5])"), "{body}");
    assert!(body.contains("with ESMTP id 0000000000000001"), "{body}");
    assert!(body.contains("Subject: hi\r\n") && body.ends_with("\r\n\r\n.dot-stuffed\r\n"), "{body}");
}

async fn every_outcome_of_the_in_session_attempt() {
    let w = World::plain();
    let mut c = w.connect(LAN);
    c.ehlo().await;
    let refusal = UpstreamReply::new(554, "5.2.252 SendAsDenied; not allowed").to_device_reply();
    for (outcome, want) in [
        (
            Outcome::Queued("upstream down".into()),
            "250 2.0.0 OK 0000000000000001 queued; delivery will be retried (upstream down)",
        ),
        (Outcome::Reported("1 of 2 refused".into()), "250 2.0.0 OK 0000000000000002 1 of 2 refused"),
        (Outcome::Gone, "250 2.0.0 OK 0000000000000003"),
        (Outcome::Refused(refusal), "554 5.2.252 Upstream refused: SendAsDenied; not allowed*"),
    ] {
        w.outcome(outcome);
        c.transcript(&format!(
            "C: MAIL FROM:<>
             C: RCPT TO:<a@example.com>
             C: DATA
             S: 250 *
             S: 250 *
             S: 354 *
             C: Subject: x
             C:
             C: y
             C: .
             S: {want}"
        ))
        .await;
    }
    assert!(w.accepted().iter().all(|m| !m.record().bounce_to_sender), "the null sender gets no bounces");
}

async fn rset_and_ehlo_reset_the_transaction() {
    let w = World::plain();
    let mut c = w.connect(LAN);
    c.ehlo().await;
    c.transcript(
        "C: MAIL FROM:<p@printer.local>
         S: 250 2.1.0 Sender OK
         C: RSET
         S: 250 2.0.0 Reset
         C: RCPT TO:<a@example.com>
         S: 503 5.5.1 MAIL first
         C: DATA
         S: 503 5.5.1 MAIL first
         C: MAIL FROM:<p@printer.local>
         S: 250 2.1.0 Sender OK
         C: MAIL FROM:<p@printer.local>
         S: 503 5.5.1 Nested MAIL command",
    )
    .await;
    assert_eq!(c.ehlo_again().await, EHLO_PLAIN);
    c.transcript(
        "C: RCPT TO:<a@example.com>
         S: 503 5.5.1 MAIL first",
    )
    .await;
}

async fn commands_out_of_sequence() {
    let w = World::plain();
    let mut c = w.connect(LAN);
    c.transcript(
        "S: 220 *
         C: MAIL FROM:<p@printer.local>
         S: 503 5.5.1 Send EHLO first
         C: AUTH PLAIN AHNjYW4AMTIzNA==
         S: 503 5.5.1 Send EHLO first
         C: RCPT TO:<a@example.com>
         S: 503 5.5.1 MAIL first",
    )
    .await;
}

async fn auth_inside_a_transaction_and_a_logged_in_device() {
    let w = World::plain();
    let mut c = w.connect(LAN);
    c.ehlo().await;
    c.transcript(&format!(
        "C: MAIL FROM:<p@printer.local>
         S: 250 2.1.0 Sender OK
         C: AUTH PLAIN {creds}
         S: 503 5.5.1 AUTH not allowed during a mail transaction
         C: RSET
         S: 250 2.0.0 Reset
         C: AUTH PLAIN {creds}
         S: 235 2.7.0 Authentication successful
         C: AUTH PLAIN {creds}
         S: 503 5.5.1 Already authenticated",
        creds = plain("scan", "1234")
    ))
    .await;
    // Logged in: AUTH is no longer offered, and the device is the logged-in one.
    let ehlo = c.ehlo_again().await;
    assert!(!ehlo.iter().any(|l| l.contains("AUTH")), "{ehlo:?}");
    c.transcript(
        "C: MAIL FROM:<p@printer.local>
         C: RCPT TO:<someone@elsewhere.org>
         C: RCPT TO:<boss@contoso.com>
         C: DATA
         S: 250 2.1.0 Sender OK
         S: 550 5.7.1 Recipient not allowed for this device
         S: 250 2.1.5 Recipient OK
         S: 354 *
         C: From: <p@printer.local>
         C:
         C: scan
         C: .
         S: 250 2.0.0 OK 0000000000000001 delivered: *",
    )
    .await;
    let m = &w.accepted()[0];
    assert_eq!(m.device, "scanner");
    assert_eq!(m.rewrite_from.as_deref(), Some("scans@contoso.com"));
    assert_eq!(m.record().from, "scans@contoso.com");
    assert!(w.body(1).contains("with ESMTPA id"), "{}", w.body(1));
}

async fn auth_exchanges() {
    let w = World::plain();
    let mut c = w.connect(STRANGER);
    c.ehlo().await;
    c.transcript(&format!(
        "C: AUTH CRAM-MD5
         S: 504 5.5.4 Unrecognized authentication type
         C: AUTH PLAIN !!!
         S: 501 5.5.4 Invalid base64 in AUTH
         C: AUTH LOGIN
         S: 334 VXNlcm5hbWU6
         C: *
         S: 501 5.0.0 Authentication cancelled
         C: AUTH PLAIN {malformed}
         S: 535 5.7.8 Authentication credentials invalid
         C: AUTH PLAIN {wrong}
         S: 535 5.7.8 Authentication credentials invalid
         C: AUTH LOGIN
         S: 334 VXNlcm5hbWU6
         C: {user}
         S: 334 UGFzc3dvcmQ6
         C: {pin}
         S: 235 2.7.0 Authentication successful",
        malformed = b64("no separators"),
        wrong = plain("scan", "9999"),
        user = b64("scan"),
        pin = b64("1234"),
    ))
    .await;
    let mut c = w.connect(STRANGER);
    c.ehlo().await;
    c.transcript(&format!(
        "C: AUTH PLAIN
         S: 334 
         C: {creds}
         S: 235 2.7.0 Authentication successful",
        creds = plain("scan", "1234")
    ))
    .await;
}

async fn failed_logins_are_throttled_per_address_and_per_username() {
    let w = World::plain();
    let mut c = w.connect("10.0.0.1");
    c.ehlo().await;
    for _ in 0..5 {
        assert_eq!(c.login("scan", "0000").await, "535 5.7.8 Authentication credentials invalid");
    }
    assert_eq!(c.login("scan", "1234").await, "454 4.7.0 Too many failed logins from your address; try again later");
    // Another address, the same username: the username's failures count.
    let mut c = w.connect("10.0.0.2");
    c.ehlo().await;
    assert_eq!(c.login("scan", "1234").await, "454 4.7.0 Too many failed logins; try again later");
}

async fn listeners_that_require_a_login_or_tls() {
    let cert = test_cert();
    let w = World::new(Setup {
        tls: Tls::StartTls(cert.acceptor.clone()),
        require_auth: true,
        require_auth_tls: true,
        ..Setup::default()
    });
    let mut c = w.connect(LAN);
    let ehlo = c.ehlo().await;
    assert!(ehlo.contains(&"250-STARTTLS".to_string()) && !ehlo.iter().any(|l| l.contains("AUTH")), "{ehlo:?}");
    c.transcript(&format!(
        "C: AUTH PLAIN {creds}
         S: 538 5.7.11 Encryption required for requested authentication mechanism
         C: MAIL FROM:<p@printer.local>
         S: 530 5.7.0 Must issue a STARTTLS command first",
        creds = plain("scan", "1234")
    ))
    .await;
    let w = World::new(Setup { require_auth: true, ..Setup::default() });
    let mut c = w.connect(LAN);
    c.ehlo().await;
    c.transcript(
        "C: MAIL FROM:<p@printer.local>
         S: 530 5.7.0 Authentication required",
    )
    .await;
    let w = World::plain();
    let mut c = w.connect(STRANGER);
    c.ehlo().await;
    c.transcript(
        "C: MAIL FROM:<p@printer.local>
         S: 550 5.7.1 Relaying denied: this address is not a configured device*",
    )
    .await;
}

async fn starttls_resets_the_state() {
    let cert = test_cert();
    let w = World::new(Setup { tls: Tls::StartTls(cert.acceptor.clone()), ..Setup::default() });
    let mut c = w.connect(LAN);
    let ehlo = c.ehlo().await;
    assert!(ehlo.contains(&"250-STARTTLS".to_string()), "{ehlo:?}");
    c.transcript(&format!(
        "C: AUTH PLAIN {creds}
         S: 235 2.7.0 Authentication successful
         C: MAIL FROM:<p@printer.local>
         S: 250 2.1.0 Sender OK
         C: STARTTLS
         C: NOOP
         S: 220 2.0.0 Ready to start TLS",
        creds = plain("scan", "1234")
    ))
    .await;
    // The NOOP pipelined in the clear was discarded (RFC 3207 4.2): the first reply inside TLS
    // answers the first command sent inside TLS.
    let mut c = c.tls(&cert).await;
    c.transcript(
        "C: MAIL FROM:<p@printer.local>
         S: 503 5.5.1 Send EHLO first",
    )
    .await;
    let ehlo = c.ehlo_again().await;
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS")), "{ehlo:?}");
    assert!(ehlo.contains(&"250-AUTH PLAIN LOGIN".to_string()), "the login was forgotten: {ehlo:?}");
    c.transcript(&format!(
        "C: RCPT TO:<a@contoso.com>
         S: 503 5.5.1 MAIL first
         C: STARTTLS
         S: 502 5.5.1 STARTTLS not available
         C: AUTH PLAIN {creds}
         S: 235 2.7.0 Authentication successful",
        creds = plain("scan", "1234")
    ))
    .await;
    c.start_data("a@contoso.com").await;
    c.transcript(
        "C: Subject: tls
         C:
         C: .
         S: 250 2.0.0 OK *",
    )
    .await;
    assert!(w.body(1).contains("with ESMTPSA id"), "{}", w.body(1));
    // A plain listener has no STARTTLS.
    let w = World::plain();
    let mut c = w.connect(LAN);
    c.ehlo().await;
    c.transcript(
        "C: STARTTLS
         S: 502 5.5.1 STARTTLS not available",
    )
    .await;
}

async fn implicit_tls_greets_inside_tls() {
    let cert = test_cert();
    let w = World::new(Setup { tls: Tls::Implicit(cert.acceptor.clone()), ..Setup::default() });
    let mut c = w.connect(LAN).tls(&cert).await;
    let ehlo = c.ehlo().await;
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS")), "{ehlo:?}");
}

async fn pipelined_recipient_failures() {
    let w = World::new(Setup { max_recipients: 2, ..Setup::default() });
    let mut c = w.connect(LAN);
    c.ehlo().await;
    c.transcript(&format!(
        "C: AUTH PLAIN {creds}
         C: MAIL FROM:<p@printer.local>
         C: RCPT TO:<a..b@example.com>
         C: RCPT TO:<x@elsewhere.org>
         C: DATA
         C: RCPT TO:<a@contoso.com>
         C: RCPT TO:<b@contoso.com>
         C: RCPT TO:<c@contoso.com>
         S: 235 *
         S: 250 2.1.0 Sender OK
         S: 553 5.1.3 Recipient address not usable
         S: 550 5.7.1 Recipient not allowed for this device
         S: 554 5.5.1 No valid recipients
         S: 250 2.1.5 Recipient OK
         S: 250 2.1.5 Recipient OK
         S: 452 4.5.3 Too many recipients",
        creds = plain("scan", "1234")
    ))
    .await;
}

async fn bad_commands_and_parameters() {
    let w = World::plain();
    let mut c = w.connect(LAN);
    c.ehlo().await;
    c.transcript(
        "C: FOO
         S: 500 5.5.1 Command not recognized
         C: MAIL TO:<x@example.com>
         S: 501 5.5.4 Syntax: MAIL FROM:<address>
         C: MAIL FROM:<p@printer.local> FOO=1
         S: 555 5.5.4 FOO parameter not supported
         C: BDAT 10
         S: 502 5.5.1 BDAT not supported; use DATA
         C: MAIL FROM:<a..b@example.com>
         S: 553 5.1.3 Sender address not usable",
    )
    .await;
}

async fn a_folder_recipient_is_split_off_and_takes_the_listener_s_size() {
    let w = World::new(Setup { max_message_size: 1000, ..Setup::default() });
    w.folders.0.store(true, Ordering::SeqCst);
    // The mail provider takes 50 bytes; a folder takes what the listener takes.
    *w.identities.limit.lock().unwrap() = Some(50);
    let mut c = w.connect(LAN);
    let ehlo = c.ehlo().await;
    assert!(ehlo.contains(&"250-SIZE 1000".to_string()), "a device may send a large scan to a folder: {ehlo:?}");
    let scan = "x".repeat(300);
    c.transcript(&format!(
        "C: MAIL FROM:<p@printer.local> SIZE=400
         S: 250 2.1.0 Sender OK
         C: RCPT TO:<Finance@scan.lan>
         S: 250 2.1.5 Recipient OK
         C: DATA
         S: 354 *
         C: Subject: scan
         C:
         C: {scan}
         C: .
         S: 250 *"
    ))
    .await;
    let got = w.accepted();
    assert_eq!(got.len(), 1);
    assert!(got[0].rcpts.is_empty(), "{:?}", got[0].rcpts);
    assert_eq!(got[0].folders.len(), 1);
    assert_eq!(
        (
            got[0].folders[0].address.as_str(),
            got[0].folders[0].destination.as_str(),
            got[0].folders[0].identity.as_str()
        ),
        ("Finance@scan.lan", "finance", "files")
    );
    // A declared size over the mail provider's limit: that recipient is refused, the
    // folder still takes the message.
    c.transcript(
        "C: MAIL FROM:<p@printer.local> SIZE=400
         S: 250 2.1.0 Sender OK
         C: RCPT TO:<a@example.com>
         S: 552 5.3.4 Message too big (limit 50 bytes)
         C: RCPT TO:<finance@scan.lan>
         S: 250 2.1.5 Recipient OK
         C: RSET
         S: 250 *",
    )
    .await;
    // With a mail recipient too, the message must fit the mail provider: 552 after DATA.
    c.transcript(&format!(
        "C: MAIL FROM:<p@printer.local>
         S: 250 2.1.0 Sender OK
         C: RCPT TO:<finance@scan.lan>
         S: 250 2.1.5 Recipient OK
         C: RCPT TO:<a@example.com>
         S: 250 2.1.5 Recipient OK
         C: DATA
         S: 354 *
         C: Subject: scan
         C:
         C: {scan}
         C: .
         S: 552 5.3.4 Message too big (limit 50 bytes)"
    ))
    .await;
    c.transcript(
        "C: MAIL FROM:<p@printer.local>
         S: 250 2.1.0 Sender OK
         C: RCPT TO:<finance@scan.lan>
         S: 250 2.1.5 Recipient OK
         C: RCPT TO:<a@example.com>
         S: 250 2.1.5 Recipient OK
         C: DATA
         S: 354 *
         C: Subject: small
         C:
         C: .
         S: 250 *",
    )
    .await;
    let got = w.accepted();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].rcpts, vec!["a@example.com"]);
    assert_eq!(got[1].folders.len(), 1);
}

async fn size_limits() {
    let w = World::new(Setup { max_message_size: 100, ..Setup::default() });
    let mut c = w.connect(LAN);
    let ehlo = c.ehlo().await;
    assert!(ehlo.contains(&"250-SIZE 100".to_string()), "{ehlo:?}");
    let big = "x".repeat(300);
    c.transcript(
        "C: MAIL FROM:<p@printer.local> SIZE=1000
         S: 552 5.3.4 Message too big (limit 100 bytes)",
    )
    .await;
    c.start_data("a@example.com").await;
    c.transcript(&format!(
        "C: Subject: big
         C:
         C: {big}
         C: .
         S: 552 5.3.4 Message too big (limit 100 bytes)
         C: NOOP
         S: 250 2.0.0 OK"
    ))
    .await;
    assert!(w.accepted().is_empty());
    // The provider's limit lowers the listener's.
    *w.identities.limit.lock().unwrap() = Some(50);
    let ehlo = c.ehlo_again().await;
    assert!(ehlo.contains(&"250-SIZE 50".to_string()), "{ehlo:?}");
}

async fn headers_that_cannot_be_made_valid() {
    let w = World::plain();
    let mut c = w.connect(LAN);
    c.ehlo().await;
    let long = "x".repeat(1200);
    let many: String = (0..400).map(|i| format!("X-Pad-{i}: {}\r\n", "y".repeat(700))).collect();
    c.start_data("a@example.com").await;
    c.transcript(&format!(
        "C: Subject: {long}
         C:
         C: .
         S: 554 5.6.0 Message refused: *"
    ))
    .await;
    c.start_data("a@example.com").await;
    c.send(format!("{many}\r\n.\r\n").as_bytes()).await;
    c.transcript("S: 552 5.3.4 Message refused: the header section is larger than*").await;
    assert!(w.accepted().is_empty());
}

async fn storage_failures() {
    let w = World::plain();
    let mut c = w.connect(LAN);
    c.ehlo().await;
    let message = "C: Subject: s
                   C:
                   C: .
                   S: 452 4.3.1 Insufficient system storage; try again later";
    w.queue.fail_write.store(true, Ordering::SeqCst);
    c.start_data("a@example.com").await;
    c.transcript(message).await;
    w.queue.fail_write.store(false, Ordering::SeqCst);
    w.queue.fail_accept.store(true, Ordering::SeqCst);
    c.start_data("a@example.com").await;
    c.transcript(message).await;
    assert!(w.accepted().is_empty());
}

async fn identities_that_cannot_send() {
    let w = World::plain();
    let mut c = w.connect(STRANGER);
    c.ehlo().await;
    assert_eq!(c.login("exp", "1234").await, "235 2.7.0 Authentication successful");
    c.transcript(
        "C: MAIL FROM:<p@printer.local>
         S: 451 4.7.0 Mailbox sign-in for \"j\" expired; IT must run: mfd-relay auth login j",
    )
    .await;
    let mut c = w.connect(STRANGER);
    c.ehlo().await;
    assert_eq!(c.login("orphan", "1234").await, "235 2.7.0 Authentication successful");
    c.transcript(
        "C: MAIL FROM:<p@printer.local>
         C: RCPT TO:<a@example.com>
         C: DATA
         S: 250 *
         S: 250 *
         S: 451 4.3.0 Local error; try again later
         C: NOOP
         S: 250 2.0.0 OK",
    )
    .await;
}

async fn a_reload_that_removes_the_device() {
    let w = World::plain();
    let mut c = w.connect(LAN);
    c.ehlo().await;
    // The new configuration has no device for the address (a relay with no devices).
    let empty = Config::parse(Path::new("t.toml"), String::new()).expect("empty config");
    let next = Arc::new(Context {
        hostname: HOST.into(),
        devices: Arc::new(FakeDevices(Devices::from_config(&empty))),
        queue: w.queue.clone(),
        delivery: w.delivery.clone(),
        tokens: w.identities.clone(),
        folders: w.ctx.folders.clone(),
        throttle: w.ctx.throttle.clone(),
        max_recipients: 3,
        activity: Default::default(),
    });
    *w.slot.write().unwrap() = next;
    c.transcript(
        "C: MAIL FROM:<p@printer.local>
         S: 550 5.7.1 Relaying denied*",
    )
    .await;
}

async fn line_too_long_and_too_many_errors() {
    let w = World::plain();
    let mut c = w.connect(LAN);
    c.ehlo().await;
    let long = "x".repeat(super::session::MAX_COMMAND_LINE + 10);
    c.transcript(&format!(
        "C: NOOP {long}
         S: 500 5.5.6 Line too long
         C: NOOP
         S: 250 2.0.0 OK"
    ))
    .await;
    // One error so far; nine more end the session.
    let mut t = String::new();
    for _ in 0..9 {
        t.push_str("C: FOO\nS: 500 5.5.1 Command not recognized\n");
    }
    t.push_str("S: 421 4.7.0 Too many errors; closing connection\n");
    c.transcript(&t).await;
    c.closed().await;
}

async fn a_client_that_is_no_device_is_cut_off() {
    let w = World::plain();
    let mut c = w.connect(STRANGER);
    c.ehlo().await;
    let mut t = String::new();
    for _ in 1..super::session::NON_DEVICE_MAX_COMMANDS {
        t.push_str("C: NOOP\nS: 250 2.0.0 OK\n");
    }
    t.push_str("C: NOOP\nS: 421 4.7.0 Not a configured device and no login; closing connection\n");
    c.transcript(&t).await;
    c.closed().await;
}

async fn timeouts_and_shutdown() {
    let w = World::new(Setup { command_timeout: Duration::from_secs(5), ..Setup::default() });
    let mut c = w.connect(LAN);
    c.ehlo().await;
    c.transcript("S: 421 4.4.2 relay.test timeout exceeded; closing connection").await;
    c.closed().await;

    let mut c = w.connect(LAN);
    c.ehlo().await;
    c.shutdown.send_replace(true);
    c.transcript("S: 421 4.3.2 relay.test shutting down; try again later").await;
    c.closed().await;
}

async fn connection_limits() {
    let w = World::plain();
    let (client, server) = tokio::io::duplex(1024);
    listener::refuse(server, &w.settings);
    let io: Box<dyn Stream> = Box::new(client);
    let (shutdown, _) = tokio::sync::watch::channel(false);
    let mut c = Client { io: BufReader::new(io), shutdown };
    c.transcript("S: 421 4.7.0 Too many connections; try again later").await;
}

/// Declares each scenario as a test of its own, and [`all`] to run them in a row.
macro_rules! scenarios {
    ($($name:ident),* $(,)?) => {
        mod each {
            $(
                #[tokio::test(start_paused = true)]
                async fn $name() {
                    super::$name().await
                }
            )*
        }

        async fn all() {
            $( $name().await; )*
        }
    };
}

scenarios! {
    greeting_and_simple_commands,
    a_message_from_an_address_device,
    every_outcome_of_the_in_session_attempt,
    rset_and_ehlo_reset_the_transaction,
    commands_out_of_sequence,
    auth_inside_a_transaction_and_a_logged_in_device,
    auth_exchanges,
    failed_logins_are_throttled_per_address_and_per_username,
    listeners_that_require_a_login_or_tls,
    starttls_resets_the_state,
    implicit_tls_greets_inside_tls,
    pipelined_recipient_failures,
    bad_commands_and_parameters,
    size_limits,
    a_folder_recipient_is_split_off_and_takes_the_listener_s_size,
    headers_that_cannot_be_made_valid,
    storage_failures,
    identities_that_cannot_send,
    a_reload_that_removes_the_device,
    line_too_long_and_too_many_errors,
    a_client_that_is_no_device_is_cut_off,
    timeouts_and_shutdown,
    connection_limits,
}

/// Every reply in the catalogue is produced by some scenario: a reply added to
/// `smtp::reply` without a conversation that shows it fails here.
#[tokio::test(start_paused = true)]
async fn every_reply_is_produced() {
    all().await;
    let produced = PRODUCED.lock().unwrap_or_else(|e| e.into_inner());
    let missing: Vec<_> = ALL.iter().filter(|n| !produced.contains(*n)).collect();
    assert!(missing.is_empty(), "replies no scenario produces: {missing:?}");
}

/// The reasons counted in the metrics are distinct labels.
#[test]
fn reason_labels_are_distinct() {
    use crate::metrics::{DeferReason, RejectReason};
    let r: HashSet<_> = RejectReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(r.len(), RejectReason::ALL.len());
    let d: HashSet<_> = DeferReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(d.len(), DeferReason::ALL.len());
}
