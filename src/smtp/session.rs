//! One SMTP conversation with a device, as an explicit state machine (RFC 5321 4.1.4).
//!
//! The state is typed so that what cannot happen cannot be written down: the client's
//! [`Greeting`] (none yet, HELO or EHLO), who the client is ([`Sender`]: unknown, a device by
//! its address, or a device that logged in), and the open [`Transaction`], which owns the
//! device it was opened for. Each command is parsed into a [`Command`] first and then handled
//! for the current state; every answer comes from the catalogue in `smtp::reply`. DATA is
//! received by `smtp::data::receive`, made durable through [`super::ports::Accept`] and
//! attempted through [`super::ports::Attempt`].
//!
//! The session is generic over the stream so the same code serves plain TCP, TLS and the
//! in-memory pipes of the tests; STARTTLS hands control back to the listener, which wraps the
//! stream and runs the same session again (RFC 3207 4.2: the state is reset and the client
//! must greet again).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};

use super::auth::{self, Credentials, DecodeError};
use super::command::{self, Command, ParseError};
use super::connection::{Connection, Line, ReadError};
use super::data::{self, DataOutcome, Reception};
use super::listener::{CurrentContext, ListenerSettings};
use super::reply::{self, Reply};
use super::Context;
use crate::config::FromPolicy;
use crate::delivery::Outcome;
use crate::devices::Device;
use crate::metrics::{self, RejectReason};
use crate::queue::{ForFolder, Incoming};

/// Longest command line accepted (RFC 5321 4.5.3.1.4 says 512; AUTH lines may be longer,
/// RFC 4954 4).
pub const MAX_COMMAND_LINE: usize = auth::MAX_AUTH_LINE;
/// Bad commands tolerated before the session is closed.
pub const MAX_ERRORS: u32 = 10;
/// Commands a client may send before it is a known device (by address at EHLO, or by AUTH).
/// A printer needs about five (EHLO, STARTTLS, EHLO, AUTH, MAIL); a client that is no device
/// must not hold one of the listener's connections for ever with NOOPs.
pub const NON_DEVICE_MAX_COMMANDS: u32 = 20;
/// Time a client may stay connected before it is a known device.
pub const NON_DEVICE_MAX_TIME: Duration = Duration::from_secs(60);

/// What the listener should do when the session returns.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// The session is over (QUIT, too many errors, a cut-off or a shutdown).
    Close,
    /// The client asked for TLS and got 220: wrap the stream and run the session again.
    StartTls,
}

/// What a client that is not (yet) a known device may still spend: commands and time, counted
/// from the connection's start (across STARTTLS).
#[derive(Debug, Clone, Copy)]
struct NonDeviceBudget {
    started: Instant,
    commands: u32,
}

impl NonDeviceBudget {
    fn new(now: Instant) -> Self {
        NonDeviceBudget { started: now, commands: 0 }
    }

    /// Counts one command; false when the budget is spent and the session must end.
    fn spend(&mut self, now: Instant) -> bool {
        self.commands = self.commands.saturating_add(1);
        self.commands <= NON_DEVICE_MAX_COMMANDS && now.duration_since(self.started) < NON_DEVICE_MAX_TIME
    }

    /// How long to wait for the next line: the command timeout, cut to the time left.
    fn read_timeout(&self, now: Instant, command_timeout: Duration) -> Duration {
        command_timeout.min(NON_DEVICE_MAX_TIME.saturating_sub(now.duration_since(self.started)))
    }

    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.started) >= NON_DEVICE_MAX_TIME
    }
}

/// How the client greeted (RFC 5321 4.1.1.1); reset by STARTTLS (RFC 3207 4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Greeting {
    /// Not yet: MAIL and AUTH must wait.
    Awaited,
    /// HELO: plain SMTP.
    Helo(String),
    /// EHLO: ESMTP.
    Ehlo(String),
}

impl Greeting {
    fn name(&self) -> Option<&str> {
        match self {
            Greeting::Awaited => None,
            Greeting::Helo(n) | Greeting::Ehlo(n) => Some(n),
        }
    }
}

/// Who the client is (ARCHITECTURE.md, "Never an open relay").
#[derive(Debug, Clone)]
enum Sender {
    /// No device (yet).
    Unknown,
    /// The device of the client's address (not on `require_auth` listeners).
    ByAddress(Arc<Device>),
    /// The device that logged in with AUTH.
    LoggedIn(Arc<Device>),
}

impl Sender {
    fn device(&self) -> Option<&Arc<Device>> {
        match self {
            Sender::Unknown => None,
            Sender::ByAddress(d) | Sender::LoggedIn(d) => Some(d),
        }
    }

    fn logged_in(&self) -> bool {
        matches!(self, Sender::LoggedIn(_))
    }
}

/// An open mail transaction (after MAIL FROM), for the device it was opened for.
#[derive(Debug)]
struct Transaction {
    device: Arc<Device>,
    /// The device's envelope sender ("" for the null sender).
    from: String,
    rcpts: Vec<String>,
    /// The size MAIL declared (RFC 1870), if any.
    size: Option<u64>,
}

/// One session's state.
pub struct Session {
    /// The configuration this session works with; replaced by the current one at EHLO, AUTH
    /// and MAIL (between transactions) after a reload.
    ctx: Arc<Context>,
    /// The configuration new sessions get (a reload replaces it).
    current: CurrentContext,
    listener: Arc<ListenerSettings>,
    peer: SocketAddr,
    /// The connection is encrypted (implicit TLS, or after STARTTLS).
    tls: bool,
    greeting: Greeting,
    sender: Sender,
    txn: Option<Transaction>,
    /// Every line so far ended with a bare LF (an old device): `<LF>.<LF>` may end DATA.
    bare_lf_only: bool,
    lines: u64,
    errors: u32,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Messages accepted in this session (for the closing log line).
    accepted: u32,
    budget: NonDeviceBudget,
}

impl Session {
    pub fn new(
        ctx: Arc<Context>,
        current: CurrentContext,
        listener: Arc<ListenerSettings>,
        peer: SocketAddr,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Session {
        Session {
            ctx,
            current,
            tls: listener.tls.is_implicit(),
            listener,
            peer,
            greeting: Greeting::Awaited,
            sender: Sender::Unknown,
            txn: None,
            bare_lf_only: true,
            lines: 0,
            errors: 0,
            shutdown,
            accepted: 0,
            budget: NonDeviceBudget::new(Instant::now()),
        }
    }

    /// Messages accepted in this session.
    pub fn accepted(&self) -> u32 {
        self.accepted
    }

    /// The device the client is, if it is one.
    pub fn device_name(&self) -> Option<&str> {
        self.sender.device().map(|d| d.name.as_str())
    }

    /// After STARTTLS: forget everything learnt in the clear (RFC 3207 4.2).
    pub fn reset_for_tls(&mut self) {
        self.tls = true;
        self.greeting = Greeting::Awaited;
        self.sender = Sender::Unknown;
        self.txn = None;
    }

    /// Runs the conversation until QUIT, an error, or STARTTLS.
    pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
    ) -> Result<Next, ReadError> {
        loop {
            // A shutdown that came while a message was being received ends the session before
            // its next command, whatever is already waiting on the socket (the select below
            // prefers the socket, and a task out of cooperative budget may not see the signal).
            if *self.shutdown.borrow() {
                return self.close(conn, reply::shutting_down(&self.ctx.hostname)).await;
            }
            let timeout = self.read_timeout();
            let line = tokio::select! {
                biased;
                r = conn.read_line(MAX_COMMAND_LINE, timeout) => r,
                _ = self.shutdown.changed() => {
                    return self.close(conn, reply::shutting_down(&self.ctx.hostname)).await;
                }
            };
            let line = match line {
                Ok(l) => l,
                Err(ReadError::Timeout) => {
                    let r = if self.sender.device().is_none() && self.budget.expired(Instant::now()) {
                        reply::non_device_cut_off()
                    } else {
                        reply::timeout(&self.ctx.hostname)
                    };
                    let _ = self.close(conn, r).await;
                    return Err(ReadError::Timeout);
                }
                Err(e) => return Err(e),
            };
            if self.sender.device().is_none() && !self.budget.spend(Instant::now()) {
                tracing::warn!(peer = %self.peer, commands = self.budget.commands, "cut off: still no device");
                return self.close(conn, reply::non_device_cut_off()).await;
            }
            let (line, bare_lf) = match line {
                Line::Text { line, bare_lf } => (line, bare_lf),
                Line::TooLong => {
                    if self.error(conn, reply::line_too_long()) {
                        return self.close_now(conn).await;
                    }
                    continue;
                }
            };
            self.lines += 1;
            if !bare_lf {
                self.bare_lf_only = false;
            }
            let cmd = match command::parse(&line) {
                Ok(c) => c,
                Err(e) => {
                    let r = match e {
                        ParseError::Unknown => reply::unknown_command(),
                        ParseError::Syntax(t) => reply::syntax(t),
                        ParseError::UnsupportedParam(t) => reply::param_not_recognized(t),
                        ParseError::NotImplemented(t) => reply::not_implemented(t),
                    };
                    if self.error(conn, r) {
                        return self.close_now(conn).await;
                    }
                    continue;
                }
            };
            match cmd {
                Command::Ehlo(name) => {
                    let r = self.ehlo(name, true);
                    conn.send(&r);
                }
                Command::Helo(name) => {
                    let r = self.ehlo(name, false);
                    conn.send(&r);
                }
                Command::Starttls => {
                    if !self.listener.tls.offers_starttls() || self.tls {
                        if self.error(conn, reply::starttls_unavailable()) {
                            return self.close_now(conn).await;
                        }
                        continue;
                    }
                    conn.send(&reply::ready_for_tls());
                    conn.flush().await?;
                    return Ok(Next::StartTls);
                }
                Command::Auth { mechanism, initial } => {
                    let r = self.auth(conn, &mechanism, initial).await?;
                    conn.send(&r);
                }
                Command::Mail { from, size, eight_bit: _ } => {
                    let r = self.mail(from, size);
                    if r.is_permanent() {
                        self.errors += 1;
                    }
                    conn.send(&r);
                }
                Command::Rcpt { to } => {
                    let r = self.rcpt(to);
                    conn.send(&r);
                }
                Command::Data => match self.txn.take() {
                    None => conn.send(&reply::mail_first()),
                    // RFC 2920 3.1: after pipelined RCPTs that all failed.
                    Some(txn) if txn.rcpts.is_empty() => {
                        self.txn = Some(txn);
                        conn.send(&reply::no_valid_recipients());
                    }
                    Some(txn) => match self.data(conn, txn).await {
                        Ok(r) => conn.send(&r),
                        Err(e) => {
                            if matches!(e, ReadError::Timeout) {
                                let _ = self.close(conn, reply::timeout(&self.ctx.hostname)).await;
                            }
                            return Err(e);
                        }
                    },
                },
                Command::Rset => {
                    self.txn = None;
                    conn.send(&reply::reset());
                }
                Command::Noop => conn.send(&reply::ok()),
                Command::Quit => {
                    conn.send(&reply::bye(&self.ctx.hostname));
                    conn.flush().await?;
                    return Ok(Next::Close);
                }
                Command::Vrfy => conn.send(&reply::vrfy()),
                Command::Expn => conn.send(&reply::expn()),
                Command::Help => conn.send(&reply::help()),
            }
            if self.errors >= MAX_ERRORS {
                conn.send(&reply::too_many_errors());
                conn.flush().await?;
                return Ok(Next::Close);
            }
        }
    }

    /// Sends a last reply and ends the session (a failed write changes nothing: the session
    /// is over either way).
    async fn close<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        last: Reply,
    ) -> Result<Next, ReadError> {
        conn.send(&last);
        self.close_now(conn).await
    }

    /// Ends the session after the replies already queued.
    async fn close_now<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
    ) -> Result<Next, ReadError> {
        let _ = conn.flush().await;
        Ok(Next::Close)
    }

    /// How long to wait for the next line: the listener's command timeout, shortened to the
    /// time left for a client that is not yet a device.
    fn read_timeout(&self) -> Duration {
        match self.sender.device() {
            Some(_) => self.listener.command_timeout,
            None => self.budget.read_timeout(Instant::now(), self.listener.command_timeout),
        }
    }

    /// Whether AUTH may be offered and used now (RFC 4954 4: not before TLS where required).
    fn auth_possible(&self) -> bool {
        self.tls || !self.listener.require_auth_tls
    }

    /// After a reload, moves the session (between transactions) to the current configuration:
    /// a logged-in device must still exist with the same login, an address-matched device is
    /// matched again; otherwise the session is no longer a device.
    fn follow_reload(&mut self) {
        let current = self.current.get();
        if Arc::ptr_eq(&current, &self.ctx) {
            return;
        }
        self.ctx = current;
        let before = std::mem::replace(&mut self.sender, Sender::Unknown);
        self.sender = match &before {
            Sender::Unknown => Sender::Unknown,
            Sender::LoggedIn(d) => {
                self.ctx.devices.still_logged_in(d, self.peer.ip()).map_or(Sender::Unknown, Sender::LoggedIn)
            }
            Sender::ByAddress(_) => self.address_device(),
        };
        if let (Some(old), None) = (before.device(), self.sender.device()) {
            tracing::warn!(peer = %self.peer, device = %old.name, "device removed or changed by a reload; the session is no longer that device");
        }
    }

    /// Sends an error reply; true when the session should end (too many errors).
    fn error<S: AsyncRead + AsyncWrite + Unpin>(&mut self, conn: &mut Connection<S>, r: Reply) -> bool {
        self.errors += 1;
        conn.send(&r);
        if self.errors >= MAX_ERRORS {
            conn.send(&reply::too_many_errors());
            return true;
        }
        false
    }

    /// EHLO (`esmtp`) or HELO: resets the transaction (RFC 5321 4.1.4) and says what is
    /// offered.
    fn ehlo(&mut self, name: String, esmtp: bool) -> Reply {
        self.txn = None;
        self.follow_reload();
        if !self.sender.logged_in() {
            self.sender = self.address_device();
        }
        let host = &self.ctx.hostname;
        let r = if esmtp {
            let starttls = self.listener.tls.offers_starttls() && !self.tls;
            let auth = !self.sender.logged_in() && self.auth_possible();
            reply::ehlo(host, &name, self.peer.ip(), self.size_limit(), starttls, auth)
        } else {
            reply::helo(host, &name)
        };
        self.greeting = if esmtp { Greeting::Ehlo(name) } else { Greeting::Helo(name) };
        r
    }

    /// The device this connection is by its address, when address matching is allowed.
    fn address_device(&self) -> Sender {
        if self.listener.require_auth {
            return Sender::Unknown;
        }
        self.ctx.devices.by_address(self.peer.ip()).map_or(Sender::Unknown, Sender::ByAddress)
    }

    /// The SIZE to advertise and enforce: the listener's limit, lowered to the provider's.
    /// The SIZE for this client (RFC 1870): its identity's provider limit, unless the device
    /// may send to a folder destination, which takes what the listener takes (a message only
    /// for folders never goes to the mail provider; [`Session::data_limit`] applies the
    /// provider's limit once the recipients are known).
    fn size_limit(&self) -> u64 {
        let provider = match self.sender.device() {
            Some(d) if self.ctx.folders.reachable(&|a| d.allows_recipient(a)) => None,
            Some(d) => self.ctx.tokens.size_limit(&d.identity),
            // Before the client is known: any device may be one that sends to a folder.
            None if self.ctx.folders.any() => None,
            None => self.ctx.smallest_provider_limit(),
        };
        provider.map_or(self.listener.max_message_size, |p| p.min(self.listener.max_message_size))
    }

    /// The limit of a transaction's message: the provider's when it has mail recipients,
    /// the listener's when every recipient is a folder.
    fn data_limit(&self, txn: &Transaction) -> u64 {
        let mail = txn.rcpts.iter().any(|r| self.ctx.folders.by_address(r).is_none());
        let provider = if mail { self.ctx.tokens.size_limit(&txn.device.identity) } else { None };
        provider.map_or(self.listener.max_message_size, |p| p.min(self.listener.max_message_size))
    }

    async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        mechanism: &str,
        initial: Option<String>,
    ) -> Result<Reply, ReadError> {
        if self.sender.logged_in() {
            return Ok(reply::already_authenticated());
        }
        if self.txn.is_some() {
            return Ok(reply::auth_in_transaction());
        }
        if self.greeting == Greeting::Awaited {
            return Ok(reply::greet_first());
        }
        if !self.auth_possible() {
            return Ok(reply::encryption_required());
        }
        self.follow_reload();
        let ip = self.peer.ip();
        if !self.ctx.throttle.allowed(ip, Instant::now()) {
            return Ok(self.auth_refused(reply::auth_throttled()));
        }
        let creds = match mechanism {
            "PLAIN" => {
                let raw = match initial {
                    Some(i) => auth::decode_line(&i),
                    None => {
                        conn.send(&reply::auth_challenge(""));
                        self.auth_line(conn).await?
                    }
                };
                raw.and_then(|r| auth::decode_plain(&r))
            }
            "LOGIN" => {
                let user = match initial {
                    Some(i) => auth::decode_line(&i),
                    None => {
                        conn.send(&reply::auth_challenge(auth::LOGIN_USERNAME));
                        self.auth_line(conn).await?
                    }
                };
                match user.and_then(auth::decode_login_field) {
                    Err(e) => Err(e),
                    Ok(username) => {
                        conn.send(&reply::auth_challenge(auth::LOGIN_PASSWORD));
                        self.auth_line(conn)
                            .await?
                            .and_then(auth::decode_login_field)
                            .map(|password| Credentials { username, password })
                    }
                }
            }
            _ => return Ok(reply::mechanism_unsupported()),
        };
        let creds = match creds {
            Ok(c) => c,
            Err(DecodeError::Cancelled) => return Ok(reply::auth_cancelled()),
            Err(DecodeError::Base64) => return Ok(reply::bad_base64()),
            Err(DecodeError::Malformed) => {
                return Ok(match self.ctx.throttle.begin(ip, None, Instant::now()) {
                    Ok(attempt) => self.auth_failed(attempt, "malformed credentials").await,
                    Err(_) => self.auth_refused(reply::auth_throttled()),
                });
            }
        };
        // Reserved before the PIN is checked, so parallel attempts cannot all pass.
        let attempt = match self.ctx.throttle.begin(ip, Some(&creds.username), Instant::now()) {
            Ok(a) => a,
            Err(_) => return Ok(self.auth_refused(reply::login_throttled())),
        };
        match self.ctx.devices.authenticate(&creds.username, &creds.password, ip).await {
            Ok(device) => {
                attempt.succeeded(Instant::now());
                self.ctx.activity.seen(&device.name, &ip.to_string());
                tracing::debug!(peer = %self.peer, device = %device.name, "device logged in");
                self.sender = Sender::LoggedIn(device);
                Ok(reply::auth_ok())
            }
            Err(e) => {
                if let Some(name) = self.ctx.devices.name_of_user(&creds.username) {
                    self.ctx.activity.device_error(&name, &format!("login refused: {e}"));
                }
                let why = format!("{e} (username \"{}\")", reply::sanitize_text(&creds.username, 64));
                Ok(self.auth_failed(attempt, &why).await)
            }
        }
    }

    async fn auth_failed(&mut self, attempt: auth::Attempt, why: &str) -> Reply {
        metrics::AUTH_FAILURES.with_label_values(&[&self.listener.name]).inc();
        tracing::warn!(peer = %self.peer, listener = %self.listener.name, "device login failed: {why}");
        let delay = attempt.failed(Instant::now());
        tokio::time::sleep(delay).await;
        self.errors += 1;
        reply::auth_failed()
    }

    /// AUTH refused by the throttle, without checking anything.
    fn auth_refused(&mut self, r: Reply) -> Reply {
        metrics::AUTH_FAILURES.with_label_values(&[&self.listener.name]).inc();
        tracing::warn!(peer = %self.peer, listener = %self.listener.name, "device login refused: too many failed logins");
        r
    }

    /// One client line of an AUTH exchange.
    async fn auth_line<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
    ) -> Result<Result<Vec<u8>, DecodeError>, ReadError> {
        match conn.read_line(auth::MAX_AUTH_LINE, self.read_timeout()).await? {
            Line::Text { line, .. } => {
                Ok(std::str::from_utf8(&line).map_err(|_| DecodeError::Base64).and_then(auth::decode_line))
            }
            Line::TooLong => Ok(Err(DecodeError::Base64)),
        }
    }

    fn mail(&mut self, from: Option<String>, size: Option<u64>) -> Reply {
        if self.txn.is_some() {
            return reply::nested_mail();
        }
        // RFC 5321 4.1.4 / RFC 3207 4.2: a session greets first, and again after STARTTLS.
        if self.greeting == Greeting::Awaited {
            return reply::greet_first();
        }
        // A reload may have removed or changed this device since the session began.
        self.follow_reload();
        if let Sender::Unknown = self.sender {
            self.sender = self.address_device();
        }
        let Some(device) = self.sender.device().cloned() else {
            metrics::rejected("unknown", RejectReason::NotADevice);
            tracing::warn!(peer = %self.peer, "refused: not a configured device");
            return match (self.listener.require_auth, self.auth_possible()) {
                (true, true) => reply::auth_required(),
                (true, false) => reply::tls_required(),
                (false, _) => reply::not_a_device(),
            };
        };
        if !self.sender.logged_in() {
            self.ctx.activity.seen(&device.name, &self.peer.ip().to_string());
        }
        if let Some(s) = size {
            let limit = self.size_limit();
            if s > limit {
                metrics::rejected(&device.name, RejectReason::TooBig);
                return reply::message_too_big(limit);
            }
        }
        let from = from.unwrap_or_default();
        if !from.is_empty() && from.parse::<lettre::Address>().is_err() {
            return reply::sender_unusable();
        }
        // With folder destinations, a device whose mail identity needs a sign-in may still
        // scan to a folder: its mail recipients are refused one by one instead (`rcpt`).
        if !self.ctx.folders.any() && self.ctx.tokens.needs_login(&device.identity) {
            metrics::rejected(&device.name, RejectReason::NeedsLogin);
            self.ctx.activity.device_error(&device.name, "refused: its identity needs a new sign-in");
            return reply::needs_login(&device.identity);
        }
        self.txn = Some(Transaction { device, from, rcpts: Vec::new(), size });
        reply::sender_ok()
    }

    fn rcpt(&mut self, to: String) -> Reply {
        let Some(txn) = self.txn.as_mut() else {
            return reply::mail_first();
        };
        if txn.rcpts.len() >= self.ctx.max_recipients {
            return reply::too_many_recipients();
        }
        if to.parse::<lettre::Address>().is_err() {
            return reply::recipient_unusable();
        }
        if !txn.device.allows_recipient(&to) {
            metrics::rejected(&txn.device.name, RejectReason::RecipientNotAllowed);
            tracing::warn!(device = %txn.device.name, rcpt = %to, "recipient not allowed for this device");
            return reply::recipient_not_allowed();
        }
        match self.ctx.folders.by_address(&to) {
            Some((dest, identity)) => {
                if self.ctx.tokens.needs_login(&identity) {
                    metrics::rejected(&txn.device.name, RejectReason::NeedsLogin);
                    tracing::warn!(device = %txn.device.name, destination = %dest, "refused: the destination's identity needs a new sign-in");
                    return reply::needs_login(&identity);
                }
            }
            None => {
                let identity = &txn.device.identity;
                if self.ctx.tokens.needs_login(identity) {
                    metrics::rejected(&txn.device.name, RejectReason::NeedsLogin);
                    self.ctx.activity.device_error(&txn.device.name, "refused: its identity needs a new sign-in");
                    return reply::needs_login(identity);
                }
                // A declared size over the mail provider's limit: refused for this recipient
                // (RFC 1870 6.1), while a folder may still take the message.
                let limit = self.ctx.tokens.size_limit(identity).map(|p| p.min(self.listener.max_message_size));
                if let (Some(declared), Some(limit)) = (txn.size, limit) {
                    if declared > limit {
                        metrics::rejected(&txn.device.name, RejectReason::TooBig);
                        return reply::message_too_big(limit);
                    }
                }
            }
        }
        if !txn.rcpts.iter().any(|r| r.eq_ignore_ascii_case(&to)) {
            txn.rcpts.push(to);
        }
        reply::recipient_ok()
    }

    /// The protocol named in the Received field (RFC 3848).
    fn protocol(&self) -> &'static str {
        match (&self.greeting, self.tls, self.sender.logged_in()) {
            (Greeting::Awaited | Greeting::Helo(_), _, _) => "SMTP",
            (Greeting::Ehlo(_), false, false) => "ESMTP",
            (Greeting::Ehlo(_), true, false) => "ESMTPS",
            (Greeting::Ehlo(_), false, true) => "ESMTPA",
            (Greeting::Ehlo(_), true, true) => "ESMTPSA",
        }
    }

    /// Answers DATA: receives the message of `txn` after a 354, makes it durable, and tries
    /// the upstream. An error is a connection that is no longer usable.
    async fn data<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        txn: Transaction,
    ) -> Result<Reply, ReadError> {
        let device = txn.device.clone();
        let Some(mailbox) = self.ctx.tokens.email(&device.identity) else {
            // The identity went away in a reload: the device may send again later.
            return Ok(reply::local_error());
        };
        conn.send(&reply::start_data());
        let limit = self.data_limit(&txn);
        let id = self.ctx.queue.new_id();
        let now = chrono::Utc::now();
        let received = crate::message::received_field(
            self.greeting.name().unwrap_or("unknown"),
            &self.peer.ip().to_string(),
            &self.ctx.hostname,
            self.protocol(),
            &id.to_string(),
            now,
        );
        let rewrite = device.from == FromPolicy::Rewrite;
        let unique = format!("{}.{}", id, now.timestamp());
        let changes = crate::message::Changes {
            received: &received,
            rewrite_from: rewrite.then_some(mailbox.as_str()),
            hostname: &self.ctx.hostname,
            unique: &unique,
            now,
        };
        let reception = Reception { bare_lf_ends: self.bare_lf_only && self.lines > 0, limit, changes: &changes };
        let (size, eight_bit, normalised) = match data::receive(conn, self.ctx.queue.body(id), reception).await {
            DataOutcome::Spooled { size, eight_bit, normalised } => (size, eight_bit, normalised),
            DataOutcome::Aborted(e) => return Err(e),
            DataOutcome::TooBig { size } => {
                metrics::rejected(&device.name, RejectReason::TooBig);
                tracing::warn!(device = %device.name, size, limit, "message too big");
                return Ok(reply::message_too_big(limit));
            }
            DataOutcome::Refused(why) => {
                metrics::rejected(&device.name, why.reason());
                tracing::warn!(device = %device.name, "message refused: {why}");
                return Ok(reply::message_refused(&why));
            }
            DataOutcome::StorageFailed(e) => {
                tracing::error!(device = %device.name, "cannot write the spool: {e}");
                metrics::rejected(&device.name, RejectReason::Storage);
                return Ok(reply::storage_failed());
            }
        };
        // Each recipient that stands for a folder becomes a record of its own, saved under
        // its destination's identity (ARCHITECTURE.md, "Scan to folder").
        let (mut rcpts, mut folders) = (Vec::new(), Vec::new());
        for r in txn.rcpts {
            match self.ctx.folders.by_address(&r) {
                Some((destination, identity)) => folders.push(ForFolder { address: r, destination, identity }),
                None => rcpts.push(r),
            }
        }
        // Only folders, and nothing to save for any of them (a device's test page): refused
        // now, whatever the number of folders (one alone would be refused by its in-session
        // attempt; several could only bounce).
        if rcpts.is_empty() {
            let addresses: Vec<String> = folders.iter().map(|f| f.address.clone()).collect();
            if let Some(path) = self.ctx.queue.spooled(id) {
                if let Some(refusal) = self.ctx.folders.nothing_to_save(&addresses, &path).await {
                    self.ctx.queue.discard(id);
                    metrics::rejected(&device.name, RejectReason::NothingToSave);
                    tracing::warn!(device = %device.name, "refused: nothing to save for its folder destinations");
                    return Ok(refusal);
                }
            }
        }
        let incoming = Incoming {
            id,
            device: device.name.clone(),
            identity: device.identity.clone(),
            client: self.peer.ip().to_string(),
            rewrite_from: rewrite.then(|| mailbox.clone()),
            bounce_to_sender: device.allows_recipient(&txn.from),
            from: txn.from,
            rcpts,
            folders,
            size,
            eight_bit,
        };
        let leases = match self.ctx.queue.accept(&incoming).await {
            Ok(leases) => leases,
            Err(e) => {
                tracing::error!(device = %device.name, "cannot queue the message: {e}");
                metrics::rejected(&device.name, RejectReason::Storage);
                return Ok(reply::storage_failed());
            }
        };
        // From here on the message is durable (ARCHITECTURE.md, "Durability").
        self.accepted += 1;
        self.ctx.activity.accepted(&device.name);
        metrics::MESSAGES_ACCEPTED.with_label_values(&[&device.name, &device.identity]).inc();
        metrics::MESSAGE_SIZE.observe(size as f64);
        tracing::info!(
            queue_id = %id, device = %device.name, identity = %device.identity, peer = %self.peer.ip(),
            size, rcpts = incoming.rcpts.len(), folders = incoming.folders.len(), bare_lf = normalised, "accepted"
        );
        Ok(match self.ctx.delivery.clone().attempt_in_session(leases).await {
            Outcome::Delivered(up) => reply::delivered(id, &up.text),
            Outcome::Queued(why) => reply::queued(id, &why),
            Outcome::Reported(what) => reply::reported(id, &what),
            Outcome::Gone => reply::accepted(id),
            Outcome::Refused(r) => r,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_that_is_no_device_has_a_budget_of_commands_and_time() {
        let start = Instant::now();
        let mut b = NonDeviceBudget::new(start);
        for _ in 0..NON_DEVICE_MAX_COMMANDS {
            assert!(b.spend(start + Duration::from_secs(1)));
        }
        assert!(!b.spend(start + Duration::from_secs(1)), "one NOOP too many");

        let mut b = NonDeviceBudget::new(start);
        assert!(b.spend(start + Duration::from_secs(59)));
        assert!(!b.spend(start + NON_DEVICE_MAX_TIME), "too late");
        assert!(b.expired(start + NON_DEVICE_MAX_TIME));

        // Waiting for a line never goes past the time left.
        let long = Duration::from_secs(300);
        assert_eq!(b.read_timeout(start, long), NON_DEVICE_MAX_TIME);
        assert_eq!(b.read_timeout(start + Duration::from_secs(50), long), Duration::from_secs(10));
        assert_eq!(b.read_timeout(start + Duration::from_secs(90), long), Duration::ZERO);
        assert_eq!(b.read_timeout(start, Duration::from_secs(5)), Duration::from_secs(5));
    }
}
