//! One mailbox's poller: log in, watch the folder, turn each new mail into a job, apply
//! `after`, and start again after any error.
//!
//! A session: XOAUTH2 login (a refused token gets one refresh and one retry), `SELECT`,
//! adopt UIDVALIDITY, then a loop of *check* and *wait*. The wait is IDLE when the server has
//! it (RFC 2177; renewed every [`IDLE_RENEW`], before the 29 minutes after which a server may
//! drop an idle client, and each renewal checks again) or `poll_interval` otherwise. The
//! session ends, and a new one starts with a fresh token, shortly before the token it logged
//! in with expires (Exchange Online ends such sessions itself). Errors end the session; the
//! next one starts after an exponential backoff, or, when the identity needs a new sign-in,
//! as soon as it is signed in again.
//!
//! A check handles each message through the stages recorded in [`super::state`]:
//!
//! ```text
//! new UID ─▶ header: sender, size ─▶ Spooling ─▶ body: types, names ─▶ job folder written ─▶ Spooled
//!               │ refused                               │ refused                                │
//!               └───────────────▶ Refused (reason) ◀────┘                                        │
//!                                       │                                                        │
//!                                       └────────────▶ `after` upstream ◀────────────────────────┘
//!                                                             │ (spooled, with a command)
//!                                                             └─▶ hand-off Started ─▶ Done
//! ```
//!
//! Every arrow into a stage is committed to the store before the next step, which is what
//! makes a crash at any point safe: the job is never written twice, `after` is applied on
//! restart, and the print command never runs twice.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use mail_parser::{Message, MessageParser};
use tokio::sync::watch;
use tokio::time::Instant;

use super::client::{self, Connector, ImapError, Session};
use super::job::{self, JobDirs, JobError, JobJson};
use super::policy::{self, Policy, Refusal};
use super::session::{After, Mailbox, Wake, FETCH_BATCH};
use super::state::{self, Handoff, MailboxState, Stage, UidRecord};
use super::{filename, handoff, reply};
use crate::activity::Activity;
use crate::config::{Mailbox as MailboxConfig, UpstreamTls};
use crate::generation::Current;
use crate::locks::MutexExt;
use crate::metrics;
use crate::oauth::tokens::{AccessToken, TokenError, TokenManager};
use crate::queue::Queue;
use crate::store::{Store, StoreError};

/// IDLE is ended and started again this often (RFC 2177 3: at least every 29 minutes).
pub const IDLE_RENEW: Duration = Duration::from_secs(25 * 60);
/// After a message could not be handled (a command declined, a job not written), the next
/// check comes at the latest this soon, IDLE or not.
pub const RETRY_SOON: Duration = Duration::from_secs(30);
/// A session ends this long before its token expires, to log in again with a fresh one.
pub const TOKEN_MARGIN: i64 = 120;
/// The shortest session, whatever the token's lifetime.
const MIN_SESSION: Duration = Duration::from_secs(60);
/// Backoff after errors: from the first wait, doubling, up to the last.
pub const RECONNECT_FIRST: Duration = Duration::from_secs(1);
pub const RECONNECT_MAX: Duration = Duration::from_secs(300);
/// How long to wait for a person to sign the identity in again before trying anyway.
const NEEDS_LOGIN_WAIT: Duration = Duration::from_secs(600);

/// Test only: with this variable set to `1`, the relay aborts right after the first job is
/// on disk and recorded as spooled, before `after` is applied upstream (the kill -9 test).
pub const TEST_CRASH_AFTER_SPOOL: &str = "MFD_RELAY_TEST_CRASH_AFTER_SPOOL";

/// How many mailboxes download a message body at once, relay-wide: each holds its mail in
/// memory while it is checked and written.
pub const FETCHING_AT_ONCE: usize = 2;
static FETCHING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(FETCHING_AT_ONCE);

/// The hand-off result of a job whose print command was running when the relay stopped.
pub const INTERRUPTED: &str = "interrupted: the relay stopped while the print command ran; not run again";

/// Why a session ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("token: {0}")]
    Token(#[from] TokenError),
    #[error("IMAP: {0}")]
    Imap(#[from] ImapError),
    #[error("state: {0}")]
    Store(#[from] StoreError),
    #[error("spool: {0}")]
    Job(#[from] JobError),
}

/// What a check did.
#[derive(Debug, Default)]
struct Checked {
    /// Jobs spooled.
    jobs: u64,
    /// Some message could not be handled and waits for the next check.
    troubled: bool,
}

impl Checked {
    /// Counts a message's outcome; returns it (`None`: try again at the next check).
    fn add(&mut self, r: Result<Option<u64>, PollError>) -> Result<Option<u64>, PollError> {
        let r = r?;
        match r {
            Some(jobs) => self.jobs += jobs,
            None => self.troubled = true,
        }
        Ok(r)
    }
}

/// How a session ended without an error.
enum End {
    Shutdown,
    /// The token is about to expire: log in again now.
    Renew,
}

/// What became of a message's body.
enum Spooled {
    Written,
    Refused(Refusal, About),
    /// The message left the folder before it could be fetched.
    Gone,
}

/// What the answer to a refused mail needs from it.
#[derive(Debug, Clone, Default)]
struct About {
    sender: Option<String>,
    subject: Option<String>,
    message_id: Option<String>,
    answerable: bool,
}

impl About {
    fn of(msg: Option<&Message<'_>>, own_address: &str, policy: &Policy) -> About {
        let Some(msg) = msg else { return About::default() };
        let from = policy::sender_of(msg).ok();
        let authenticated = from.as_ref().is_some_and(|(_, all)| policy.may_answer(msg, all));
        let sender = from.map(|(s, _)| s.address);
        About {
            answerable: authenticated && sender.as_deref().is_some_and(|s| reply::should_answer(msg, s, own_address)),
            sender,
            subject: msg.subject().map(str::to_string),
            message_id: msg.message_id().map(str::to_string),
        }
    }
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Whether an IMAP error is the server declining one command (NO, BAD) on a healthy
/// connection, rather than the connection failing.
fn declined(e: &PollError) -> bool {
    matches!(
        e,
        PollError::Imap(ImapError::Protocol {
            source: async_imap::error::Error::No(_) | async_imap::error::Error::Bad(_),
            ..
        })
    )
}

/// The parts of the relay a poller uses: the database, the queue (answers to refused mail),
/// activity, and the current configuration generation, read at each use so that a poller a
/// reload keeps running uses the new token manager and host name.
pub struct Deps {
    /// Where each UID's stage is recorded.
    pub store: Arc<Store>,
    /// Where answers to refused mail are queued.
    pub queue: Arc<Queue>,
    /// What the status page shows of each mailbox.
    pub activity: Arc<Activity>,
    /// The generation channel.
    pub current: Current,
}

impl Deps {
    /// The current generation's token manager.
    fn tokens(&self) -> Arc<TokenManager> {
        self.current.borrow().tokens.clone()
    }

    /// The relay's host name in the current generation.
    fn hostname(&self) -> String {
        self.current.borrow().config.relay.hostname.clone()
    }
}

/// One `[[mailbox]]`'s poller.
pub struct Poller {
    name: String,
    identity: String,
    /// The XOAUTH2 user: the identity's address.
    user: String,
    folder: String,
    after: After,
    policy: Policy,
    command: Option<Vec<String>>,
    command_timeout: Duration,
    poll_interval: Duration,
    reply_refused: bool,
    connector: Connector,
    dirs: JobDirs,
    state: MailboxState,
    deps: Arc<Deps>,
    /// The settings this poller was built from, to tell whether a reload changed them.
    fingerprint: String,
    crash_after_spool: bool,
}

impl Poller {
    /// Builds the poller of `m`; `spool` is its resolved spool directory, `tokens` the token
    /// manager of the generation it is built for. An error names what in the configuration
    /// keeps it from running.
    pub fn new(
        m: &MailboxConfig,
        spool: &std::path::Path,
        tokens: &TokenManager,
        deps: Arc<Deps>,
    ) -> Result<Poller, String> {
        let name = m.name.get_ref().clone();
        let identity = m.identity.get_ref().clone();
        let slot = tokens.slot(&identity).map_err(|e| e.to_string())?;
        let server = slot.provider.imap.clone().ok_or_else(|| {
            format!("provider \"{}\" has no imap server (set imap = \"host:port\")", slot.provider.name)
        })?;
        let after = m.after.get_ref().clone();
        if let After::Move(target) = &after {
            if crate::config::folder_key(target) == crate::config::folder_key(&m.folder) {
                return Err(format!("after = \"move:{target}\" moves mail into the folder it polls, which would print every mail again and again"));
            }
        }
        let connector = Connector::new(server, slot.provider.ca_file.as_deref()).map_err(|e| e.to_string())?;
        let server = connector.server();
        if server.tls == UpstreamTls::None && !matches!(server.host.as_str(), "127.0.0.1" | "::1" | "localhost") {
            tracing::warn!(mailbox = %name, host = %server.host, "IMAP without TLS to a remote host: the token crosses the network in clear");
        }
        if m.senders.is_empty() {
            tracing::warn!(mailbox = %name, "no `senders` allow-list: anyone who can mail {} can print", slot.email);
        }
        let command = m.command.clone().filter(|c| !c.is_empty());
        if let Some(c) = &command {
            if !c.iter().any(|a| a.contains(handoff::FILE_PLACEHOLDER)) {
                tracing::warn!(mailbox = %name, "`command` has no \"{}\" argument: it will not know which file to print", handoff::FILE_PLACEHOLDER);
            }
        }
        if !m.require_authenticated_sender && !m.senders.is_empty() {
            tracing::warn!(mailbox = %name, "require_authenticated_sender = false: the `senders` allow-list trusts a From field anyone can forge");
        }
        let mut policy = Policy::from_config(m);
        // Exchange strips X-MS-Exchange-Organization-* from mail that comes from outside the
        // organisation; no other server does.
        policy.trust.exchange_internal = slot.provider.kind == crate::config::ProviderKind::Microsoft;
        let fingerprint = format!(
            "{name}|{identity}|{}|{server:?}|{:?}|{after:?}|{policy:?}|{command:?}|{:?}|{:?}|{}|{}|{}",
            slot.email,
            slot.provider.ca_file,
            m.command_timeout.0,
            m.poll_interval.0,
            m.reply_refused,
            m.folder,
            spool.display(),
        );
        let dir_name = filename::sanitize(Some(&name), "mailbox", None);
        // Absolute, so that `{file}` is one whatever the relay's working directory.
        let spool = std::path::absolute(spool).map_err(|e| format!("spool {}: {e}", spool.display()))?;
        let spool = spool.as_path();
        Ok(Poller {
            user: slot.email.clone(),
            folder: m.folder.clone(),
            after,
            policy,
            command,
            command_timeout: m.command_timeout.0,
            poll_interval: m.poll_interval.0.max(Duration::from_secs(1)),
            reply_refused: m.reply_refused,
            connector,
            dirs: JobDirs::new(spool, &dir_name),
            state: MailboxState::new(deps.store.clone(), &state::folder_prefix(&identity, &m.folder)),
            crash_after_spool: std::env::var_os(TEST_CRASH_AFTER_SPOOL).is_some_and(|v| v == "1"),
            name,
            identity,
            fingerprint,
            deps,
        })
    }

    /// The settings the poller runs with: a reload that leaves them unchanged keeps it running.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `mailbox reset --from-now`: logs in, reads the folder's UIDNEXT and records it, so
    /// that only mail arriving from now on is printed. Returns (UIDVALIDITY, UIDNEXT).
    pub async fn reset_from_now(&self) -> Result<(u32, u32), PollError> {
        MailboxState::open(self.deps.store.clone(), &self.identity, &self.folder, &self.name).await?;
        let (session, _) = self.login().await?;
        let mut mb = Mailbox::open(session, &self.folder).await?;
        // UIDNEXT from SELECT (RFC 3501 7.3.1 OK [UIDNEXT]); without it, one past the highest
        // UID there is (UIDs only ascend).
        let uidnext = match mb.uidnext {
            Some(n) => n,
            None => mb.all_uids().await?.last().map_or(1, |u| u.saturating_add(1)),
        };
        let uidvalidity = mb.uidvalidity;
        mb.logout().await;
        self.state.set_floor(uidvalidity, uidnext).await?;
        Ok((uidvalidity, uidnext))
    }

    /// Polls until `shutdown` becomes true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // A poller replaced by a reload may still be finishing a message: wait for it.
        // Keyed by the folder (its records' prefix), not the section name, so a renamed
        // section waits for the poller it replaces.
        let lease = lease(&state::folder_prefix(&self.identity, &self.folder));
        let _lease = tokio::select! {
            held = lease.lock_owned() => held,
            _ = shutdown.changed() => return,
        };
        let mut failures: u32 = 0;
        let mut prepared = false;
        tracing::info!(mailbox = %self.name, identity = %self.identity, folder = %self.folder, spool = %self.dirs.jobs.display(), "mailbox poller started");
        loop {
            if *shutdown.borrow() {
                return;
            }
            let err = match self.attempt(&mut prepared, &mut shutdown, &mut failures).await {
                Ok(End::Shutdown) => return,
                Ok(End::Renew) => continue,
                Err(e) => e,
            };
            failures = failures.saturating_add(1);
            self.report(&err);
            // Subscribed here, not once: a reload may have replaced the token manager.
            let mut ready = self.deps.tokens().subscribe_ready();
            let needs_login = matches!(err, PollError::Token(TokenError::NeedsLogin(_)));
            let wait = if needs_login {
                NEEDS_LOGIN_WAIT
            } else {
                crate::delivery::backoff(failures, RECONNECT_FIRST, RECONNECT_MAX)
            };
            tracing::debug!(mailbox = %self.name, wait_ms = wait.as_millis() as u64, "mailbox poller waits before trying again");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = wait_ready(&mut ready, &self.identity), if needs_login => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Prepares the spool folders (once), then runs a session.
    async fn attempt(
        &self,
        prepared: &mut bool,
        shutdown: &mut watch::Receiver<bool>,
        failures: &mut u32,
    ) -> Result<End, PollError> {
        if !*prepared {
            self.dirs.prepare()?;
            // Moves records an older relay kept under the section's name.
            MailboxState::open(self.deps.store.clone(), &self.identity, &self.folder, &self.name).await?;
            *prepared = true;
        }
        self.session(shutdown, failures).await
    }

    fn report(&self, e: &PollError) {
        metrics::IMAP_ERRORS.with_label_values(&[&self.name]).inc();
        self.deps.activity.mailbox_error(&self.name, &e.to_string());
        match e {
            PollError::Token(TokenError::NeedsLogin(why)) => {
                tracing::error!(mailbox = %self.name, identity = %self.identity, "mailbox not checked: the identity needs a new sign-in ({why}); run `mfd-relay auth login {}`", self.identity)
            }
            e => tracing::warn!(mailbox = %self.name, "mailbox check failed: {e}"),
        }
    }

    /// XOAUTH2 login; a refused token gets one refresh and one retry.
    async fn login(&self) -> Result<(Session, AccessToken), PollError> {
        let token = self.deps.tokens().access_token(&self.identity).await?;
        let conn = self.connector.connect().await?;
        match client::authenticate(conn, &self.user, &token.secret).await {
            Ok(s) => Ok((s, token)),
            Err(ImapError::AuthRejected { detail }) => {
                tracing::warn!(
                    mailbox = %self.name,
                    identity = %self.identity,
                    server_says = %detail.as_deref().unwrap_or("-"),
                    "the IMAP server refused the token; getting a new one and trying once more"
                );
                let token = self.deps.tokens().refresh_after_rejection(&self.identity, &token).await?;
                let conn = self.connector.connect().await?;
                let session = client::authenticate(conn, &self.user, &token.secret).await?;
                Ok((session, token))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// One session, from login to its end.
    async fn session(&self, shutdown: &mut watch::Receiver<bool>, failures: &mut u32) -> Result<End, PollError> {
        let (session, token) = self.login().await?;
        let mut mb = Mailbox::open(session, &self.folder).await?;
        let now = unix_now();
        if let Some(carried) = self.state.adopt_uidvalidity(mb.uidvalidity, now).await? {
            tracing::warn!(
                mailbox = %self.name,
                uidvalidity = mb.uidvalidity,
                carried,
                "the folder's UIDVALIDITY changed (RFC 3501 2.3.1.1): its UIDs were renumbered; known messages are recognised by Message-ID"
            );
        }
        let pruned = self.state.prune_carried(now)?;
        if pruned > 0 {
            tracing::info!(mailbox = %self.name, pruned, "forgot old records from before a UIDVALIDITY change");
        }
        let life = Duration::from_secs((token.expires_at - now - TOKEN_MARGIN).max(0) as u64).max(MIN_SESSION);
        let renew_at = Instant::now() + life;
        tracing::info!(
            mailbox = %self.name,
            server = %format!("{}:{}", self.connector.server().host, self.connector.server().port),
            idle = mb.caps.idle,
            uidvalidity = mb.uidvalidity,
            "mailbox connected"
        );
        loop {
            let Checked { jobs, troubled } = self.check(&mut mb, shutdown).await?;
            *failures = 0;
            metrics::IMAP_LAST_SUCCESS.with_label_values(&[&self.name]).set(unix_now());
            self.deps.activity.mailbox_checked(&self.name, jobs);
            if *shutdown.borrow() {
                mb.logout().await;
                return Ok(End::Shutdown);
            }
            // New mail reported during the check: check again before waiting.
            if mb.drain_news() {
                continue;
            }
            let now = Instant::now();
            let next = if troubled { renew_at.min(now + RETRY_SOON) } else { renew_at };
            if now >= renew_at {
                tracing::debug!(mailbox = %self.name, "token about to expire: logging in again");
                mb.logout().await;
                return Ok(End::Renew);
            }
            if mb.caps.idle {
                let (back, wake) = mb.idle(next.min(now + IDLE_RENEW), shutdown).await?;
                mb = back;
                tracing::debug!(mailbox = %self.name, ?wake, "IDLE ended");
                if wake == Wake::Shutdown {
                    mb.logout().await;
                    return Ok(End::Shutdown);
                }
            } else {
                tokio::select! {
                    _ = tokio::time::sleep_until(next.min(now + self.poll_interval)) => {}
                    _ = shutdown.changed() => {
                        mb.logout().await;
                        return Ok(End::Shutdown);
                    }
                }
                mb.noop().await?;
            }
        }
    }

    /// Handles every message of the folder that needs anything.
    async fn check(&self, mb: &mut Mailbox, shutdown: &watch::Receiver<bool>) -> Result<Checked, PollError> {
        let uids = mb.all_uids().await?;
        let present: HashSet<u32> = uids.iter().copied().collect();
        // With `after = seen`, mail already \Seen is not new: it was printed, or read by a
        // person, before the relay (or this database) knew the folder.
        let candidates = if self.after == After::Seen { mb.unseen_uids().await? } else { uids };
        let floor = self.state.floor(mb.uidvalidity)?.unwrap_or(0);
        let records = self.state.records()?;
        let known: BTreeSet<u32> = records.keys().copied().collect();
        let mut done = Checked::default();
        // UIDs are never reused under one UIDVALIDITY: a record whose message left is done
        // upstream, but its job may not be: `after` was performed while its OK was lost, or
        // the relay stopped between `after` and the hand-off. Those jobs are finished here,
        // without IMAP, before the record goes.
        for (uid, rec) in records.iter().filter(|(u, _)| !present.contains(u)) {
            let finished = self.finish_vanished(*uid, rec.clone()).await;
            if done.add(self.guarded(finished))?.is_some() {
                self.state.remove(*uid)?;
            }
        }
        for (uid, rec) in records.into_iter().filter(|(u, _)| present.contains(u)) {
            if *shutdown.borrow() {
                return Ok(done);
            }
            let open = rec.stage == Stage::Spooling
                || !rec.after_applied
                || matches!(rec.handoff, Handoff::Pending | Handoff::Started);
            if open {
                let r = self.drive(mb, uid, rec).await;
                done.add(self.guarded(r))?;
            }
        }
        let new: Vec<u32> = candidates.into_iter().filter(|u| !known.contains(u) && *u >= floor).collect();
        for batch in new.chunks(FETCH_BATCH) {
            for meta in mb.metas(batch).await? {
                if *shutdown.borrow() {
                    return Ok(done);
                }
                let r = self.arrive(mb, meta).await;
                done.add(self.guarded(r))?;
            }
        }
        Ok(done)
    }

    /// Keeps one message's trouble from holding up the others: a command the server
    /// declined or a job that cannot be written is reported and tried again at the next
    /// check; connection and database errors end the session.
    fn guarded(&self, r: Result<u64, PollError>) -> Result<Option<u64>, PollError> {
        match r {
            Ok(jobs) => Ok(Some(jobs)),
            Err(e) if declined(&e) || matches!(e, PollError::Job(_)) => {
                self.report(&e);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A message not seen before.
    async fn arrive(&self, mb: &mut Mailbox, meta: super::session::Meta) -> Result<u64, PollError> {
        let uid = meta.uid;
        if meta.deleted {
            tracing::debug!(mailbox = %self.name, uid, "skipping a message marked \\Deleted");
            return Ok(0);
        }
        // The header section ends with an empty line the server includes; parse_headers
        // stops there.
        let head = MessageParser::default().parse_headers(&meta.header);
        let key = state::message_key(head.as_ref().and_then(|h| h.message_id()), &meta.header);
        if let Some(carried) = self.state.take_carried(&key)? {
            tracing::info!(mailbox = %self.name, uid, job = ?carried.job, stage = ?carried.stage, "message known from before the UIDVALIDITY change; not printed again");
            let rec = UidRecord { after_applied: false, at: unix_now(), ..carried };
            self.state.record(uid, &rec).await?;
            return self.drive(mb, uid, rec).await;
        }
        let early = head
            .as_ref()
            .ok_or(Refusal::NoSender)
            .and_then(|h| self.policy.check_from(h))
            .and_then(|_| self.policy.check_size(meta.size));
        if let Err(refusal) = early {
            let rec = self.refuse(uid, key, refusal, About::of(head.as_ref(), &self.user, &self.policy)).await?;
            return self.drive(mb, uid, rec).await;
        }
        let rec = UidRecord {
            stage: Stage::Spooling,
            key,
            job: Some(job::job_name(chrono::Utc::now(), uid)),
            reason: None,
            after_applied: false,
            handoff: Handoff::None,
            at: unix_now(),
        };
        self.state.record(uid, &rec).await?;
        self.drive(mb, uid, rec).await
    }

    /// Takes a recorded message through its remaining stages; returns 1 if it spooled a job.
    async fn drive(&self, mb: &mut Mailbox, uid: u32, mut rec: UidRecord) -> Result<u64, PollError> {
        let mut spooled = 0;
        if rec.stage == Stage::Spooling {
            let name = match &rec.job {
                Some(j) => j.clone(),
                None => job::job_name(chrono::Utc::now(), uid),
            };
            match self.spool(mb, uid, &name).await? {
                Spooled::Gone => {
                    tracing::warn!(mailbox = %self.name, uid, "the message left the folder before it could be fetched");
                    self.state.remove(uid)?;
                    return Ok(0);
                }
                Spooled::Refused(refusal, about) => rec = self.refuse(uid, rec.key, refusal, about).await?,
                Spooled::Written => {
                    rec.stage = Stage::Spooled;
                    rec.job = Some(name.clone());
                    rec.handoff = if self.command.is_some() { Handoff::Pending } else { Handoff::None };
                    rec.at = unix_now();
                    self.state.record(uid, &rec).await?;
                    metrics::IMAP_JOBS.with_label_values(&[&self.name, "spooled"]).inc();
                    tracing::info!(mailbox = %self.name, uid, job = %name, "print job spooled");
                    spooled = 1;
                    if self.crash_after_spool {
                        tracing::error!("{TEST_CRASH_AFTER_SPOOL}=1: aborting between spool and `after` (test only)");
                        std::process::abort();
                    }
                }
            }
        }
        if !rec.after_applied {
            mb.apply(&self.after, uid).await?;
            rec.after_applied = true;
            rec.at = unix_now();
            self.state.record(uid, &rec).await?;
            tracing::debug!(mailbox = %self.name, uid, after = ?self.after, "after applied upstream");
        }
        if rec.stage == Stage::Spooled {
            match rec.handoff {
                Handoff::Pending => self.handoff(uid, &mut rec).await?,
                Handoff::Started => self.handoff_interrupted(uid, &mut rec).await?,
                Handoff::None | Handoff::Done => {}
            }
        }
        Ok(spooled)
    }

    /// The message of `rec` left the folder: finishes its job without IMAP. A job on disk
    /// whose record still said `Spooling` (the relay stopped between the two commits) is a
    /// spooled job; a pending hand-off runs now; a started one is recorded as interrupted.
    async fn finish_vanished(&self, uid: u32, mut rec: UidRecord) -> Result<u64, PollError> {
        let on_disk = rec.job.as_deref().is_some_and(|j| self.dirs.exists(j));
        if rec.stage == Stage::Spooling {
            if !on_disk {
                tracing::warn!(mailbox = %self.name, uid, "a message left the folder before its job was written");
                return Ok(0);
            }
            tracing::info!(mailbox = %self.name, uid, job = ?rec.job, "the message left the folder after its job was written; finishing the job");
            rec.stage = Stage::Spooled;
            rec.handoff = if self.command.is_some() { Handoff::Pending } else { Handoff::None };
            rec.at = unix_now();
            self.state.record(uid, &rec).await?;
        }
        if rec.stage == Stage::Spooled && on_disk {
            match rec.handoff {
                Handoff::Pending => {
                    tracing::info!(mailbox = %self.name, uid, job = ?rec.job, "the message left the folder before its print command ran; running it now");
                    self.handoff(uid, &mut rec).await?;
                }
                Handoff::Started => self.handoff_interrupted(uid, &mut rec).await?,
                Handoff::None | Handoff::Done => {}
            }
        } else if matches!(rec.handoff, Handoff::Pending | Handoff::Started) {
            tracing::warn!(mailbox = %self.name, uid, job = ?rec.job, "the job of a message that left the folder is gone from the spool; its print command is not run");
        }
        Ok(0)
    }

    /// Fetches, checks and writes one message as job `name`.
    async fn spool(&self, mb: &mut Mailbox, uid: u32, name: &str) -> Result<Spooled, PollError> {
        if self.dirs.exists(name) {
            // Written before a crash that came before the record said so.
            return Ok(Spooled::Written);
        }
        // Bodies are held in memory (async-imap reads a literal whole): few at once.
        let _permit = FETCHING.acquire().await.map_err(|e| ImapError::Unexpected(e.to_string()))?;
        let Some(raw) = mb.body(uid).await? else { return Ok(Spooled::Gone) };
        let Some(mut msg) = MessageParser::default().parse(raw.bytes()) else {
            return Ok(Spooled::Refused(Refusal::Unparseable, About::default()));
        };
        let checked = self
            .policy
            .check_from(&msg)
            .and_then(|(sender, _)| self.policy.check_size(raw.bytes().len() as u64).map(|_| sender));
        let checked = checked.and_then(|sender| Ok((sender, self.policy.plan(&mut msg)?)));
        let (sender, plan) = match checked {
            Ok(ok) => ok,
            Err(refusal) => return Ok(Spooled::Refused(refusal, About::of(Some(&msg), &self.user, &self.policy))),
        };
        let json = JobJson {
            version: job::JOB_VERSION,
            mailbox: self.name.clone(),
            folder: self.folder.clone(),
            uidvalidity: mb.uidvalidity,
            uid,
            spooled: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            sender: sender.address,
            sender_name: sender.name,
            subject: msg.subject().map(str::to_string),
            date: msg.date().map(|d| d.to_rfc3339()),
            message_id: msg.message_id().map(str::to_string),
            files: job::describe(&plan.files),
            body: plan.body,
            skipped: plan.skipped,
            handoff: None,
        };
        // The files are in the plan now: the mail and its download go before the writing.
        drop(msg);
        drop(raw);
        self.dirs.write(name, &json, plan.files).await?;
        Ok(Spooled::Written)
    }

    /// Records a refusal and answers it if configured; returns the record (`after` pending).
    async fn refuse(&self, uid: u32, key: String, refusal: Refusal, about: About) -> Result<UidRecord, PollError> {
        let reason = refusal.to_string();
        let rec = UidRecord {
            stage: Stage::Refused,
            key,
            job: None,
            reason: Some(reason.clone()),
            after_applied: false,
            handoff: Handoff::None,
            at: unix_now(),
        };
        self.state.record(uid, &rec).await?;
        metrics::IMAP_JOBS.with_label_values(&[&self.name, "refused"]).inc();
        let sender = about.sender.as_deref().unwrap_or("(unknown sender)");
        tracing::warn!(mailbox = %self.name, uid, sender, reason = %reason, "mail refused, not printed");
        self.deps.activity.mailbox_error(&self.name, &format!("refused a mail from {sender}: {reason}"));
        if self.reply_refused {
            match (&about.sender, about.answerable) {
                (Some(to), true) => {
                    let safe_name: String = self.name.chars().filter(char::is_ascii_alphanumeric).collect();
                    let unique = format!("{safe_name}.{uid}.{}", chrono::Utc::now().timestamp_micros());
                    let hostname = self.deps.hostname();
                    let answer = reply::Answer {
                        from: &self.user,
                        to,
                        mailbox: &self.name,
                        subject: about.subject.as_deref(),
                        message_id: about.message_id.as_deref(),
                        reason: &reason,
                        hostname: &hostname,
                        now: chrono::Utc::now(),
                        unique: &unique,
                    };
                    if let Err(e) = reply::queue(&self.deps.queue, &self.identity, &self.name, &answer).await {
                        tracing::error!(mailbox = %self.name, uid, "cannot queue the answer to a refused mail: {e}");
                    }
                }
                _ => {
                    tracing::info!(mailbox = %self.name, uid, "refused mail not answered (automatic mail, list mail, unauthenticated or no usable sender)")
                }
            }
        }
        Ok(rec)
    }

    /// Runs the print command for each file of a spooled job, at most once.
    async fn handoff(&self, uid: u32, rec: &mut UidRecord) -> Result<(), PollError> {
        let (Some(command), Some(name)) = (&self.command, rec.job.clone()) else { return Ok(()) };
        let mut json = self.dirs.read_json(&name)?;
        rec.handoff = Handoff::Started;
        rec.at = unix_now();
        self.state.record(uid, rec).await?;
        let dir = self.dirs.path(&name);
        let mut results = Vec::new();
        for f in &json.files {
            let r = handoff::run(command, &dir.join(&f.name), &dir, self.command_timeout).await;
            if r.ok() {
                tracing::info!(mailbox = %self.name, job = %name, file = %f.name, "print command done");
            } else {
                let why = match (&r.error, r.timed_out, r.exit_code) {
                    (Some(e), _, _) => e.clone(),
                    (None, true, _) => format!("timed out after {} s", self.command_timeout.as_secs()),
                    (None, false, code) => format!("exit code {}: {}", code.unwrap_or(-1), r.stderr),
                };
                tracing::warn!(mailbox = %self.name, job = %name, file = %f.name, "print command failed: {why}");
                self.deps
                    .activity
                    .mailbox_error(&self.name, &format!("print command failed for {name}/{}: {why}", f.name));
            }
            results.push(r);
        }
        json.handoff = Some(results);
        self.dirs.update_json(&name, &json).await?;
        rec.handoff = Handoff::Done;
        rec.at = unix_now();
        self.state.record(uid, rec).await?;
        Ok(())
    }

    /// The relay stopped while the print command ran: it is not run again (it may have
    /// printed); job.json and the log say so.
    async fn handoff_interrupted(&self, uid: u32, rec: &mut UidRecord) -> Result<(), PollError> {
        let Some(name) = rec.job.clone() else { return Ok(()) };
        tracing::warn!(mailbox = %self.name, job = %name, "the print command was interrupted by a restart; it is not run again, check whether the job printed");
        if let Ok(mut json) = self.dirs.read_json(&name) {
            // One result per file, each saying so: the command may or may not have printed it.
            let files: Vec<String> = json.files.iter().map(|f| f.name.clone()).collect();
            let files = if files.is_empty() { vec![String::new()] } else { files };
            json.handoff = Some(
                files
                    .into_iter()
                    .map(|file| job::HandoffResult {
                        file,
                        command: self.command.clone().unwrap_or_default(),
                        started: String::new(),
                        duration_ms: 0,
                        exit_code: None,
                        timed_out: false,
                        error: Some(INTERRUPTED.into()),
                        stdout: String::new(),
                        stderr: String::new(),
                    })
                    .collect(),
            );
            self.dirs.update_json(&name, &json).await?;
        }
        rec.handoff = Handoff::Done;
        rec.at = unix_now();
        self.state.record(uid, rec).await?;
        Ok(())
    }
}

/// The lease that lets one poller at a time work on a mailbox in this process.
fn lease(mailbox: &str) -> Arc<tokio::sync::Mutex<()>> {
    type Leases = std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>;
    static LEASES: std::sync::LazyLock<Leases> = std::sync::LazyLock::new(Default::default);
    LEASES.locked().entry(mailbox.to_string()).or_default().clone()
}

/// Returns when `identity` becomes ready (signed in again).
async fn wait_ready(ready: &mut tokio::sync::broadcast::Receiver<String>, identity: &str) {
    loop {
        match ready.recv().await {
            Ok(name) if name == identity => return,
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_poller_per_mailbox_at_a_time() {
        let first = lease("lease-test").lock_owned().await;
        let second = lease("lease-test");
        assert!(second.try_lock().is_err(), "a second poller of the mailbox waits");
        assert!(lease("lease-test-other").try_lock().is_ok(), "other mailboxes do not");
        drop(first);
        assert!(second.try_lock().is_ok());
    }

    #[test]
    fn declined_commands_are_told_apart_from_broken_connections() {
        let no = PollError::Imap(ImapError::Protocol {
            what: "UID MOVE",
            source: async_imap::error::Error::No("[CANNOT] no".into()),
        });
        assert!(declined(&no));
        let lost =
            PollError::Imap(ImapError::Protocol { what: "UID MOVE", source: async_imap::error::Error::ConnectionLost });
        assert!(!declined(&lost));
        assert!(!declined(&PollError::Imap(ImapError::Timeout { what: "NOOP" })));
    }
}
