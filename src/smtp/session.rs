//! One SMTP conversation with a device, as an explicit state machine (RFC 5321 4.1.4).
//!
//! States: before a greeting (EHLO/HELO), greeted, in a transaction (after MAIL), with
//! recipients (after RCPT). Each command is parsed into a [`Command`] first and then handled
//! for the current state; every answer is a typed [`Reply`]. The session is generic over the
//! stream so the same code serves plain TCP and TLS; STARTTLS hands control back to the
//! listener, which wraps the stream and runs the same session again (RFC 3207 4.2: the state
//! is reset and the client must greet again).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};

use super::auth::{self, Credentials, DecodeError};
use super::command::{self, Command, ParseError};
use super::connection::{Connection, Line, ReadError};
use super::data::{DotDecoder, Progress};
use super::listener::{CurrentContext, ListenerSettings};
use super::reply::{Reply, Status};
use super::Context;
use crate::config::{FromPolicy, TlsMode};
use crate::delivery::Outcome;
use crate::devices::Device;
use crate::metrics;
use crate::oauth::tokens::IdentityState;
use crate::queue::{now_ms, QueueRecord};

/// Longest command line accepted (RFC 5321 4.5.3.1.4 says 512; AUTH lines may be longer,
/// RFC 4954 4).
pub const MAX_COMMAND_LINE: usize = auth::MAX_AUTH_LINE;
/// Bad commands tolerated before the session is closed.
pub const MAX_ERRORS: u32 = 10;
/// RFC 5321 4.5.3.2.5: a server waits at least 3 minutes for each chunk of DATA.
pub const DATA_TIMEOUT: Duration = Duration::from_secs(180);
/// The whole DATA phase may take at most this long (a client trickling bytes is cut off).
pub const DATA_DEADLINE: Duration = Duration::from_secs(30 * 60);
/// Commands a client may send before it is a known device (by address at EHLO, or by AUTH).
/// A printer needs about five (EHLO, STARTTLS, EHLO, AUTH, MAIL); a client that is no device
/// must not hold one of the listener's connections for ever with NOOPs.
pub const NON_DEVICE_MAX_COMMANDS: u32 = 20;
/// Time a client may stay connected before it is a known device.
pub const NON_DEVICE_MAX_TIME: Duration = Duration::from_secs(60);

/// What the listener should do when the session returns.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
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

/// 421 for a client that spent its budget without becoming a device.
fn non_device_cut_off() -> Reply {
    Reply::with(421, Status(4, 7, 0), "Not a configured device and no login; closing connection")
}

/// RFC 4954 6: AUTH before TLS where the listener requires TLS for it.
fn encryption_required() -> Reply {
    Reply::with(538, Status(5, 7, 11), "Encryption required for requested authentication mechanism")
}

/// 454 when a username (rather than the address) has too many failed logins.
fn login_throttled() -> Reply {
    Reply::with(454, Status(4, 7, 0), "Too many failed logins; try again later")
}

/// An open mail transaction (after MAIL FROM).
#[derive(Debug)]
struct Transaction {
    /// The device's envelope sender ("" for the null sender).
    from: String,
    rcpts: Vec<String>,
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
    tls: bool,
    helo: Option<String>,
    esmtp: bool,
    device: Option<Arc<Device>>,
    authenticated: bool,
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

/// How a DATA phase ended.
enum DataResult {
    Reply(Reply),
    /// The connection is unusable (closed, timed out mid-DATA).
    Abort(ReadError),
}

impl Session {
    pub fn new(
        ctx: Arc<Context>,
        current: CurrentContext,
        listener: Arc<ListenerSettings>,
        peer: SocketAddr,
        tls: bool,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Session {
        Session {
            ctx,
            current,
            listener,
            peer,
            tls,
            helo: None,
            esmtp: false,
            device: None,
            authenticated: false,
            txn: None,
            bare_lf_only: true,
            lines: 0,
            errors: 0,
            shutdown,
            accepted: 0,
            budget: NonDeviceBudget::new(Instant::now()),
        }
    }

    pub fn accepted(&self) -> u32 {
        self.accepted
    }

    pub fn device_name(&self) -> Option<&str> {
        self.device.as_ref().map(|d| d.name.as_str())
    }

    /// After STARTTLS: forget everything learnt in the clear (RFC 3207 4.2).
    pub fn reset_for_tls(&mut self) {
        self.tls = true;
        self.helo = None;
        self.esmtp = false;
        self.device = None;
        self.authenticated = false;
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
                conn.send(&Reply::shutting_down(&self.ctx.hostname));
                let _ = conn.flush().await;
                return Ok(Next::Close);
            }
            let timeout = self.read_timeout();
            let line = tokio::select! {
                biased;
                r = conn.read_line(MAX_COMMAND_LINE, timeout) => r,
                _ = self.shutdown.changed() => {
                    conn.send(&Reply::shutting_down(&self.ctx.hostname));
                    let _ = conn.flush().await;
                    return Ok(Next::Close);
                }
            };
            let line = match line {
                Ok(l) => l,
                Err(ReadError::Timeout) => {
                    if self.device.is_none() && self.budget.expired(Instant::now()) {
                        conn.send(&non_device_cut_off());
                    } else {
                        conn.send(&Reply::timeout(&self.ctx.hostname));
                    }
                    let _ = conn.flush().await;
                    return Err(ReadError::Timeout);
                }
                Err(e) => return Err(e),
            };
            if self.device.is_none() && !self.budget.spend(Instant::now()) {
                tracing::warn!(peer = %self.peer, commands = self.budget.commands, "cut off: still no device");
                conn.send(&non_device_cut_off());
                let _ = conn.flush().await;
                return Ok(Next::Close);
            }
            let (line, bare_lf) = match line {
                Line::Text { line, bare_lf } => (line, bare_lf),
                Line::TooLong => {
                    if self.error(conn, Reply::line_too_long()) {
                        let _ = conn.flush().await;
                        return Ok(Next::Close);
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
                    let reply = match e {
                        ParseError::Unknown => Reply::unknown_command(),
                        ParseError::Syntax(t) => Reply::syntax(t),
                        ParseError::UnsupportedParam(t) => Reply::param_not_recognized(t),
                        ParseError::NotImplemented(t) => Reply::not_implemented(t),
                    };
                    if self.error(conn, reply) {
                        let _ = conn.flush().await;
                        return Ok(Next::Close);
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
                    if self.listener.tls != TlsMode::Starttls || self.tls {
                        if self.error(conn, Reply::not_implemented("STARTTLS not available")) {
                            let _ = conn.flush().await;
                            return Ok(Next::Close);
                        }
                        continue;
                    }
                    conn.send(&Reply::ready_for_tls());
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
                Command::Data => match self.txn.as_ref().map(|t| t.rcpts.len()) {
                    None => conn.send(&Reply::bad_sequence("MAIL first")),
                    // RFC 2920 3.1: after pipelined RCPTs that all failed.
                    Some(0) => conn.send(&Reply::with(554, Status(5, 5, 1), "No valid recipients")),
                    Some(_) => {
                        conn.send(&Reply::start_data());
                        match self.data(conn).await {
                            DataResult::Reply(r) => conn.send(&r),
                            DataResult::Abort(e) => {
                                if matches!(e, ReadError::Timeout) {
                                    conn.send(&Reply::timeout(&self.ctx.hostname));
                                    let _ = conn.flush().await;
                                }
                                return Err(e);
                            }
                        }
                    }
                },
                Command::Rset => {
                    self.txn = None;
                    conn.send(&Reply::reset());
                }
                Command::Noop => conn.send(&Reply::ok()),
                Command::Quit => {
                    conn.send(&Reply::bye(&self.ctx.hostname));
                    conn.flush().await?;
                    return Ok(Next::Close);
                }
                Command::Vrfy => conn.send(&Reply::vrfy()),
                Command::Expn => conn.send(&Reply::not_implemented("EXPN not supported")),
                Command::Help => conn.send(&Reply::help()),
            }
            if self.errors >= MAX_ERRORS {
                conn.send(&Reply::too_many_errors());
                conn.flush().await?;
                return Ok(Next::Close);
            }
        }
    }

    /// How long to wait for the next line: the listener's command timeout, shortened to the
    /// time left for a client that is not yet a device.
    fn read_timeout(&self) -> Duration {
        match self.device {
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
        let before = self.device.take();
        if self.authenticated {
            self.device = before.as_ref().and_then(|d| self.ctx.devices.still_logged_in(d, self.peer.ip()));
            if self.device.is_none() {
                self.authenticated = false;
            }
        } else if before.is_some() {
            self.device = self.address_device();
        }
        if let (Some(old), None) = (&before, &self.device) {
            tracing::warn!(peer = %self.peer, device = %old.name, "device removed or changed by a reload; the session is no longer that device");
        }
    }

    /// Sends an error reply; true when the session should end (too many errors).
    fn error<S: AsyncRead + AsyncWrite + Unpin>(&mut self, conn: &mut Connection<S>, reply: Reply) -> bool {
        self.errors += 1;
        conn.send(&reply);
        if self.errors >= MAX_ERRORS {
            conn.send(&Reply::too_many_errors());
            return true;
        }
        false
    }

    fn ehlo(&mut self, name: String, esmtp: bool) -> Reply {
        // RFC 5321 4.1.4: EHLO resets the transaction.
        self.txn = None;
        self.follow_reload();
        self.helo = Some(name.clone());
        self.esmtp = esmtp;
        if !self.authenticated {
            self.device = self.address_device();
        }
        let host = &self.ctx.hostname;
        if !esmtp {
            return Reply::new(250, None, format!("{host} Hello {name}"));
        }
        let mut lines: Vec<std::borrow::Cow<'static, str>> = vec![
            format!("{host} Hello {name} [{}]", self.peer.ip()).into(),
            format!("SIZE {}", self.size_limit()).into(),
            "8BITMIME".into(),
            "PIPELINING".into(),
            "ENHANCEDSTATUSCODES".into(),
        ];
        if self.listener.tls == TlsMode::Starttls && !self.tls {
            lines.push("STARTTLS".into());
        }
        if !self.authenticated && self.auth_possible() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("HELP".into());
        Reply::multi(250, lines)
    }

    /// The device this connection is by its address, when address matching is allowed.
    fn address_device(&self) -> Option<Arc<Device>> {
        if self.listener.require_auth {
            return None;
        }
        self.ctx.devices.by_address(self.peer.ip())
    }

    /// The SIZE to advertise and enforce: the listener's limit, lowered to the provider's.
    fn size_limit(&self) -> u64 {
        let provider = match &self.device {
            Some(d) => self.ctx.provider_limit(&d.identity),
            None => self.ctx.smallest_provider_limit(),
        };
        provider.map_or(self.listener.max_message_size, |p| p.min(self.listener.max_message_size))
    }

    async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Connection<S>,
        mechanism: &str,
        initial: Option<String>,
    ) -> Result<Reply, ReadError> {
        if self.authenticated {
            return Ok(Reply::bad_sequence("Already authenticated"));
        }
        if self.txn.is_some() {
            return Ok(Reply::bad_sequence("AUTH not allowed during a mail transaction"));
        }
        if self.helo.is_none() {
            return Ok(Reply::bad_sequence("Send EHLO first"));
        }
        if !self.auth_possible() {
            return Ok(encryption_required());
        }
        self.follow_reload();
        let ip = self.peer.ip();
        if !self.ctx.throttle.allowed(ip, Instant::now()) {
            return Ok(self.auth_refused(Reply::auth_throttled()));
        }
        let creds = match mechanism {
            "PLAIN" => {
                let raw = match initial {
                    Some(i) => auth::decode_line(&i),
                    None => {
                        conn.send(&Reply::auth_challenge(""));
                        self.auth_line(conn).await?
                    }
                };
                raw.and_then(|r| auth::decode_plain(&r))
            }
            "LOGIN" => {
                let user = match initial {
                    Some(i) => auth::decode_line(&i),
                    None => {
                        conn.send(&Reply::auth_challenge(auth::LOGIN_USERNAME));
                        self.auth_line(conn).await?
                    }
                };
                match user.and_then(auth::decode_login_field) {
                    Err(e) => Err(e),
                    Ok(username) => {
                        conn.send(&Reply::auth_challenge(auth::LOGIN_PASSWORD));
                        self.auth_line(conn)
                            .await?
                            .and_then(auth::decode_login_field)
                            .map(|password| Credentials { username, password })
                    }
                }
            }
            _ => return Ok(Reply::mechanism_unsupported()),
        };
        let creds = match creds {
            Ok(c) => c,
            Err(DecodeError::Cancelled) => return Ok(Reply::auth_cancelled()),
            Err(DecodeError::Base64) => return Ok(Reply::syntax("Invalid base64 in AUTH")),
            Err(DecodeError::Malformed) => {
                return Ok(match self.ctx.throttle.begin(ip, None, Instant::now()) {
                    Ok(attempt) => self.auth_failed(attempt, "malformed credentials").await,
                    Err(_) => self.auth_refused(Reply::auth_throttled()),
                });
            }
        };
        // Reserved before the PIN is checked, so parallel attempts cannot all pass.
        let attempt = match self.ctx.throttle.begin(ip, Some(&creds.username), Instant::now()) {
            Ok(a) => a,
            Err(_) => return Ok(self.auth_refused(login_throttled())),
        };
        match self.ctx.devices.authenticate(&creds.username, &creds.password, ip).await {
            Ok(device) => {
                attempt.succeeded(Instant::now());
                self.ctx.activity.seen(&device.name, &ip.to_string());
                tracing::debug!(peer = %self.peer, device = %device.name, "device logged in");
                self.device = Some(device);
                self.authenticated = true;
                Ok(Reply::auth_ok())
            }
            Err(e) => {
                if let Some(name) = self.ctx.devices.name_of_user(&creds.username) {
                    self.ctx.activity.device_error(name, &format!("login refused: {e}"));
                }
                let why = format!("{e} (username \"{}\")", crate::smtp::reply::sanitize_text(&creds.username, 64));
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
        Reply::auth_failed()
    }

    /// AUTH refused by the throttle, without checking anything.
    fn auth_refused(&mut self, reply: Reply) -> Reply {
        metrics::AUTH_FAILURES.with_label_values(&[&self.listener.name]).inc();
        tracing::warn!(peer = %self.peer, listener = %self.listener.name, "device login refused: too many failed logins");
        reply
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
            return Reply::bad_sequence("Nested MAIL command");
        }
        // RFC 5321 4.1.4 / RFC 3207 4.2: a session greets first, and again after STARTTLS.
        if self.helo.is_none() {
            return Reply::bad_sequence("Send EHLO first");
        }
        // A reload may have removed or changed this device since the session began.
        self.follow_reload();
        let Some(device) =
            self.device.clone().or_else(|| if self.authenticated { None } else { self.address_device() })
        else {
            metrics::MESSAGES_REJECTED.with_label_values(&["unknown", "not_a_device"]).inc();
            tracing::warn!(peer = %self.peer, "refused: not a configured device");
            return match (self.listener.require_auth, self.auth_possible()) {
                (true, true) => Reply::auth_required(),
                (true, false) => Reply::tls_required(),
                (false, _) => Reply::not_a_device(),
            };
        };
        self.device = Some(device.clone());
        if !self.authenticated {
            self.ctx.activity.seen(&device.name, &self.peer.ip().to_string());
        }
        if let Some(s) = size {
            let limit = self.size_limit();
            if s > limit {
                metrics::MESSAGES_REJECTED.with_label_values(&[&device.name, "too_big"]).inc();
                return Reply::message_too_big(limit);
            }
        }
        let from = from.unwrap_or_default();
        if !from.is_empty() && from.parse::<lettre::Address>().is_err() {
            return Reply::bad_address("Sender address not usable");
        }
        if self.ctx.tokens.state(&device.identity) == Some(IdentityState::NeedsLogin) {
            metrics::MESSAGES_REJECTED.with_label_values(&[&device.name, "needs_login"]).inc();
            self.ctx.activity.device_error(&device.name, "refused: its identity needs a new sign-in");
            return Reply::needs_login(&device.identity);
        }
        self.txn = Some(Transaction { from, rcpts: Vec::new() });
        Reply::sender_ok()
    }

    fn rcpt(&mut self, to: String) -> Reply {
        let Some(txn) = self.txn.as_mut() else {
            return Reply::bad_sequence("MAIL first");
        };
        let Some(device) = self.device.as_ref() else {
            return Reply::bad_sequence("MAIL first");
        };
        if txn.rcpts.len() >= self.ctx.max_recipients {
            return Reply::too_many_recipients();
        }
        if to.parse::<lettre::Address>().is_err() {
            return Reply::bad_address("Recipient address not usable");
        }
        if !device.allows_recipient(&to) {
            metrics::MESSAGES_REJECTED.with_label_values(&[&device.name, "recipient_not_allowed"]).inc();
            tracing::warn!(device = %device.name, rcpt = %to, "recipient not allowed for this device");
            return Reply::recipient_not_allowed();
        }
        if !txn.rcpts.iter().any(|r| r.eq_ignore_ascii_case(&to)) {
            txn.rcpts.push(to);
        }
        Reply::recipient_ok()
    }

    /// Receives the message, spools it, commits it, and tries the upstream.
    async fn data<S: AsyncRead + AsyncWrite + Unpin>(&mut self, conn: &mut Connection<S>) -> DataResult {
        let Some(txn) = self.txn.take() else {
            return DataResult::Reply(Reply::bad_sequence("MAIL first"));
        };
        let Some(device) = self.device.clone() else {
            return DataResult::Reply(Reply::bad_sequence("MAIL first"));
        };
        let Ok(slot) = self.ctx.tokens.slot(&device.identity).cloned() else {
            return DataResult::Reply(Reply::local_error());
        };
        let limit = self.size_limit();
        let id = self.ctx.queue.new_id();
        let now = chrono::Utc::now();
        let with = match (self.esmtp, self.tls, self.authenticated) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, true, false) => "ESMTPS",
            (true, false, true) => "ESMTPA",
            (true, true, true) => "ESMTPSA",
        };
        let received = crate::message::received_field(
            self.helo.as_deref().unwrap_or("unknown"),
            &self.peer.ip().to_string(),
            &self.ctx.hostname,
            with,
            &id.to_string(),
            now,
        );
        let rewrite = (device.from == FromPolicy::Rewrite).then_some(slot.email.as_str());
        let unique = format!("{}.{}", id, now.timestamp());
        let changes = crate::message::Changes {
            received: &received,
            rewrite_from: rewrite,
            hostname: &self.ctx.hostname,
            unique: &unique,
            now,
        };

        let mut writer = self.ctx.queue.spool().writer(id);
        let mut decoder = DotDecoder::new(self.bare_lf_only && self.lines > 0);
        let mut out = Vec::with_capacity(64 * 1024);
        let mut header: Option<Vec<u8>> = Some(Vec::new());
        let mut scanner = crate::message::HeaderScanner::new();
        let mut refused: Option<crate::message::Refusal> = None;
        let mut size: u64 = 0;
        let mut too_big = false;
        let mut write_error: Option<std::io::Error> = None;
        let deadline = tokio::time::Instant::now() + DATA_DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let chunk = match conn.data_chunk(left.min(DATA_TIMEOUT)).await {
                Ok(c) => c,
                Err(e) => {
                    writer.abort();
                    return DataResult::Abort(e);
                }
            };
            let progress = decoder.feed(chunk, &mut out);
            let consumed = match progress {
                Progress::Done { consumed } => consumed,
                Progress::NeedMore => chunk.len(),
            };
            conn.consume(consumed);
            size += out.len() as u64;
            if size > limit {
                too_big = true;
            }
            if !too_big && write_error.is_none() && refused.is_none() {
                let res = match header.as_mut() {
                    // The scanner looks at each new byte once (no rescan of the buffer).
                    Some(h) => {
                        h.extend_from_slice(&out);
                        match scanner
                            .find(h)
                            .and_then(|s| s.map(|s| crate::message::rewrite_start(h, s, &changes)).transpose())
                        {
                            Ok(Some(first)) => {
                                header = None;
                                writer.write(&first).await
                            }
                            Ok(None) => Ok(()),
                            Err(e) => {
                                refused = Some(e);
                                Ok(())
                            }
                        }
                    }
                    None => writer.write(&out).await,
                };
                if let Err(e) = res {
                    write_error = Some(e);
                }
            }
            out.clear();
            if matches!(progress, Progress::Done { .. }) {
                break;
            }
        }
        // The data ended in the header section: all header, or a last line without CRLF.
        if let (Some(h), false, None, None) = (header.take(), too_big, write_error.as_ref(), refused.as_ref()) {
            match scanner.finish(&h).and_then(|s| crate::message::rewrite_start(&h, s, &changes)) {
                Ok(first) => {
                    if let Err(e) = writer.write(&first).await {
                        write_error = Some(e);
                    }
                }
                Err(e) => refused = Some(e),
            }
        }
        if too_big {
            writer.abort();
            metrics::MESSAGES_REJECTED.with_label_values(&[&device.name, "too_big"]).inc();
            tracing::warn!(device = %device.name, size, limit, "message too big");
            return DataResult::Reply(Reply::message_too_big(limit));
        }
        if let Some(why) = refused {
            writer.abort();
            metrics::MESSAGES_REJECTED.with_label_values(&[&device.name, why.label()]).inc();
            tracing::warn!(device = %device.name, "message refused: {why}");
            return DataResult::Reply(Reply::message_refused(&why));
        }
        if let Some(e) = write_error {
            writer.abort();
            tracing::error!(device = %device.name, "cannot write the spool: {e}");
            metrics::MESSAGES_REJECTED.with_label_values(&[&device.name, "storage"]).inc();
            return DataResult::Reply(Reply::storage_failed());
        }
        let final_size = writer.len();
        if let Err(e) = writer.finish().await {
            tracing::error!(device = %device.name, "cannot write the spool: {e}");
            metrics::MESSAGES_REJECTED.with_label_values(&[&device.name, "storage"]).inc();
            return DataResult::Reply(Reply::storage_failed());
        }
        let envelope_from = if device.from == FromPolicy::Rewrite { slot.email.clone() } else { txn.from.clone() };
        let rec = QueueRecord {
            id,
            received: now_ms() / 1000,
            device: device.name.clone(),
            identity: device.identity.clone(),
            client: self.peer.ip().to_string(),
            from: envelope_from,
            original_from: txn.from.clone(),
            bounce_to_sender: !txn.from.is_empty() && device.allows_recipient(&txn.from),
            rcpts: txn.rcpts.clone(),
            size: final_size,
            eight_bit: decoder.eight_bit,
            attempts: 0,
            next_attempt: now_ms(),
            last_error: None,
            is_bounce: false,
        };
        let lease = match self.ctx.queue.accept(&rec).await {
            Ok(lease) => lease,
            Err(e) => {
                self.ctx.queue.spool().remove(id);
                tracing::error!(device = %device.name, "cannot queue the message: {e}");
                metrics::MESSAGES_REJECTED.with_label_values(&[&device.name, "storage"]).inc();
                return DataResult::Reply(Reply::storage_failed());
            }
        };
        // From here on the message is durable (ARCHITECTURE.md, "Durability").
        self.accepted += 1;
        self.ctx.activity.accepted(&device.name);
        metrics::MESSAGES_ACCEPTED.with_label_values(&[&device.name, &device.identity]).inc();
        metrics::MESSAGE_SIZE.observe(final_size as f64);
        tracing::info!(
            queue_id = %id, device = %device.name, identity = %device.identity, peer = %self.peer.ip(),
            size = final_size, rcpts = rec.rcpts.len(), bare_lf = decoder.normalised, "accepted"
        );
        let reply = match self.ctx.delivery.attempt_in_session(lease).await {
            Outcome::Delivered(up) => {
                let text = crate::smtp::reply::sanitize_text(&up.text, 200);
                Reply::with(250, Status(2, 0, 0), format!("OK {id} delivered: {text}"))
            }
            Outcome::Queued(why) => Reply::with(
                250,
                Status(2, 0, 0),
                format!("OK {id} queued; delivery will be retried ({})", crate::smtp::reply::sanitize_text(&why, 120)),
            ),
            Outcome::Reported(what) => {
                Reply::with(250, Status(2, 0, 0), format!("OK {id} {}", crate::smtp::reply::sanitize_text(&what, 160)))
            }
            Outcome::Gone => Reply::with(250, Status(2, 0, 0), format!("OK {id}")),
            Outcome::Refused(r) => r,
        };
        DataResult::Reply(reply)
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
