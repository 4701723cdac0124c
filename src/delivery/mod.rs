//! From the queue to the provider: the in-session attempt and the retry scheduler.
//!
//! ARCHITECTURE.md, "In-session delivery": after DATA the relay tries the upstream at once,
//! bounded by `in_session_timeout`. Upstream 2xx: the device gets 250. Upstream 5xx for every
//! recipient: the device gets that 5xx and the message is dropped (the person at the panel
//! knows). Anything else (unreachable, 4xx, no token, timeout, rate limit): the message stays
//! queued, the device gets 250, and the scheduler retries with exponential backoff until
//! `queue_lifetime`, then bounces it (RFC 3464).
//!
//! Whether the device still waits is decided once ([`Waiter`]): either the session gives up
//! waiting and answers 250, and from then on every outcome is a delivery or a bounce; or the
//! attempt claims the answer first, and the session waits for it. Each outcome is committed
//! ([`Queue::settle`]) before the device or anyone else hears of it.
//!
//! Bounces go to `bounce_to`, else to the device's envelope sender when that address passed the
//! device's recipient allow-list, else to the identity's own mailbox: a device must not be able
//! to make the identity mail arbitrary outside addresses.

mod folder;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::config::{ProviderKind, SendVia};
use crate::locks::MutexExt;
use crate::metrics::{self, DeferReason};
use crate::oauth::provider::Resource;
use crate::oauth::tokens::{AccessToken, TokenError, TokenManager};
use crate::queue::bounce::{self, FailedRecipient};
use crate::queue::{now_ms, Lease, OwnMessage, Queue, QueueError, QueueRecord};
use crate::reply::Reply;
use crate::upstream::api::{Outbound, Progress, ProgressSink};
use crate::upstream::folder::Folders;
use crate::upstream::{Envelope, NoTrace, SendError, SendOutcome, Upstream, UpstreamReply};

/// Retry policy and identity of the relay.
#[derive(Debug, Clone)]
pub struct Policy {
    pub hostname: String,
    pub retry_first: Duration,
    pub retry_max: Duration,
    pub queue_lifetime: Duration,
    pub bounce_to: Option<String>,
    pub in_session_timeout: Duration,
    /// `relay.upstream_pool`: connections per identity (at most 3 for Microsoft), which is
    /// also how many queued messages of one identity the runner attempts at once.
    pub upstream_pool: usize,
}

/// What became of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every recipient accepted upstream.
    Delivered(UpstreamReply),
    /// Some or all recipients are still queued and will be retried; the device gets 250.
    Queued(String),
    /// Finished without a retry, but not delivered to everyone: some recipients were refused
    /// (or the message expired) and a bounce reports them. The device gets 250 with this text.
    Reported(String),
    /// Every recipient refused permanently; the device gets this reply.
    Refused(Reply),
    /// The message is no longer queued (dropped by the admin).
    Gone,
}

/// Sends queued messages.
pub struct Delivery {
    pub policy: Policy,
    queue: Arc<Queue>,
    tokens: Arc<TokenManager>,
    upstream: Arc<Upstream>,
    /// Shared by every configuration generation: a reload must not grant a new burst.
    shaper: Arc<crate::upstream::shaper::Shaper>,
    activity: Arc<crate::activity::Activity>,
    /// Identities whose sending limit is used up, and until when ([`now_ms`]): the runner
    /// leaves their queued mail alone until then instead of taking and deferring each message.
    rate_held: Mutex<HashMap<String, i64>>,
    /// The folder destinations (scan to folder).
    folders: Arc<Folders>,
    /// `oversize = "link"`: identity → the destination its oversize scans' files go to.
    oversize: HashMap<String, String>,
}

/// Whether the device that sent a message still waits for the outcome of its first attempt.
/// Decided exactly once, by whichever side comes first: the session when it stops waiting
/// ([`Waiter::stop_waiting`]) or the attempt when it has a refusal to hand over
/// ([`Waiter::claim`]).
#[derive(Debug, Default)]
pub struct Waiter(AtomicU8);

const WAITING: u8 = 0;
const GONE: u8 = 1;
const CLAIMED: u8 = 2;

impl Waiter {
    /// The attempt takes the device's answer; false when the device was already told 250.
    pub fn claim(&self) -> bool {
        matches!(self.0.compare_exchange(WAITING, CLAIMED, Ordering::SeqCst, Ordering::SeqCst), Ok(_) | Err(CLAIMED))
    }

    /// The session stops waiting; false when the attempt already claimed the answer (the
    /// session must then wait for it).
    pub fn stop_waiting(&self) -> bool {
        matches!(self.0.compare_exchange(WAITING, GONE, Ordering::SeqCst, Ordering::SeqCst), Ok(_) | Err(GONE))
    }

    fn still_waiting(&self) -> bool {
        self.0.load(Ordering::SeqCst) != GONE
    }
}

/// Exponential backoff: `first`, doubling per attempt, at most `max`, with 10% jitter.
pub fn backoff(attempts: u32, first: Duration, max: Duration) -> Duration {
    use rand::Rng;
    let exp = first.saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
    let base = exp.min(max);
    let jitter = rand::thread_rng().gen_range(0.9..=1.1);
    base.mul_f64(jitter)
}

impl Delivery {
    pub fn new(
        policy: Policy,
        queue: Arc<Queue>,
        tokens: Arc<TokenManager>,
        upstream: Arc<Upstream>,
        activity: Arc<crate::activity::Activity>,
        shaper: Arc<crate::upstream::shaper::Shaper>,
    ) -> Delivery {
        Delivery {
            policy,
            queue,
            tokens,
            upstream,
            shaper,
            activity,
            rate_held: Mutex::default(),
            folders: Arc::new(Folders::default()),
            oversize: HashMap::new(),
        }
    }

    /// The folder destinations, and the identities whose oversize scans become links
    /// (identity → destination name).
    pub fn with_folders(mut self, folders: Arc<Folders>, oversize: HashMap<String, String>) -> Delivery {
        self.folders = folders;
        self.oversize = oversize;
        self
    }

    /// Attempts a just-accepted message while the device waits, for at most
    /// `in_session_timeout`; after that the attempt goes on in the background and the device
    /// is told the message is queued (see [`Waiter`]). `leases` are the ones
    /// [`Queue::accept_incoming`] returned: one per record of the message (its mail
    /// recipients; each folder recipient). With several, they are attempted at once and none
    /// may refuse in session: the device hears one reply for all, so a refusal of one part is
    /// reported by a bounce, never by a reply that would also cancel the parts that went.
    pub async fn attempt_in_session(self: &Arc<Self>, mut leases: Vec<Lease>) -> Outcome {
        if leases.len() <= 1 {
            return match leases.pop() {
                Some(lease) => self.attempt_one_in_session(lease, true).await,
                None => Outcome::Gone,
            };
        }
        let parts = leases.into_iter().map(|lease| self.attempt_one_in_session(lease, false));
        combine(futures_util::future::join_all(parts).await)
    }

    /// One record's in-session attempt; `may_refuse`: the device may be handed its refusal.
    async fn attempt_one_in_session(self: &Arc<Self>, lease: Lease, may_refuse: bool) -> Outcome {
        let id = lease.id();
        let me = self.clone();
        let waiter = Arc::new(Waiter::default());
        if !may_refuse {
            waiter.stop_waiting();
        }
        let w = waiter.clone();
        let mut task = tokio::spawn(async move { me.attempt(lease, Some(&w)).await });
        let joined = match tokio::time::timeout(self.policy.in_session_timeout, &mut task).await {
            Ok(joined) => joined,
            Err(_) if waiter.stop_waiting() => {
                return Outcome::Queued("upstream is slow; delivery goes on in the background".into())
            }
            // The attempt has a refusal for the device and is committing it: wait for it.
            Err(_) => task.await,
        };
        match joined {
            Ok(outcome) => outcome,
            Err(join) => {
                // The task's lease released the message as the task ended.
                tracing::error!(queue_id = %id, "delivery task failed: {join}");
                Outcome::Queued("delivery will be retried".into())
            }
        }
    }

    /// One delivery attempt of the message `lease` holds; `waiter` when the device that sent
    /// it may still be waiting. Every outcome ends the lease.
    pub async fn attempt(&self, lease: Lease, waiter: Option<&Waiter>) -> Outcome {
        let id = lease.id();
        let mut rec = match self.queue.get(id) {
            Ok(Some(r)) => r,
            Ok(None) => {
                lease.release(None);
                return Outcome::Gone;
            }
            Err(e) => {
                tracing::error!(queue_id = %id, "cannot read queue record: {e}");
                lease.release(Some(now_ms() + 60_000));
                return Outcome::Queued("queue read error".into());
            }
        };
        let age = now_ms() / 1000 - rec.received;
        if waiter.is_none() && age > self.policy.queue_lifetime.as_secs() as i64 {
            let mut why = rec.last_error.clone().unwrap_or_else(|| "delivery kept failing".into());
            if !rec.progress.is_none() {
                // A send through an API was under way: its last request may have gone through.
                why.push_str(
                    "; an upload to the provider was under way, so it may have been sent: check before sending again",
                );
            }
            let failed: Vec<_> = rec
                .rcpts
                .iter()
                .map(|r| FailedRecipient {
                    address: r.clone(),
                    status: "4.4.7".into(),
                    diagnostic: format!("gave up after {} attempts over {}h: {why}", rec.attempts, age / 3600),
                })
                .collect();
            tracing::warn!(queue_id = %id, identity = %rec.identity, attempts = rec.attempts, "queue lifetime exceeded; bouncing: {why}");
            if let Err(e) = self.finish(lease, &rec, false, &failed).await {
                tracing::error!(queue_id = %id, "cannot record the expiry: {e}");
                return Outcome::Queued("the outcome could not be recorded".into());
            }
            return Outcome::Reported("expired; a bounce reports it".into());
        }
        if let Some(name) = rec.destination.clone() {
            return self.attempt_folder(lease, rec, &name, waiter).await;
        }
        let Ok(slot) = self.tokens.slot(&rec.identity) else {
            tracing::error!(queue_id = %id, identity = %rec.identity, "identity no longer configured; message kept");
            return self.defer(lease, rec, "identity not configured", None, DeferReason::Config);
        };
        let slot = slot.clone();
        if let Some(dest) = self.oversize.get(&rec.identity) {
            // `oversize = "link"`: a message over the provider's limit goes as links. A send
            // already begun through an API is not one (it fitted when it began).
            // The links are for the organisation only: a message to anyone outside the
            // identity's domain is not sent as links nobody there could open.
            let limit = self.upstream.size_limit(&slot.provider, slot.send_via);
            let inside = rec.rcpts.iter().all(|r| folder::same_domain(r, &slot.email));
            if let Some(limit) = limit.filter(|l| rec.size > *l && inside) {
                if matches!(rec.progress, Progress::None | Progress::Folder(_)) {
                    let dest = dest.clone();
                    return self.attempt_oversize(lease, rec, &dest, limit, waiter).await;
                }
            }
        }
        let limit = slot.messages_per_minute;
        if let Err(at) = self.shaper.try_acquire(&rec.identity, limit, now_ms()) {
            metrics::deferred(&rec.identity, DeferReason::RateLimit);
            self.rate_held.locked().insert(rec.identity.clone(), at);
            rec.next_attempt = at;
            if let Err(e) = self.queue.defer(lease, &rec) {
                tracing::error!(queue_id = %id, "cannot update queue record: {e}");
            }
            return Outcome::Queued(format!("sending limit of {} messages a minute reached", limit.unwrap_or(0)));
        }
        // A send begun through an API is finished through it, whatever the identity's path
        // is now: another path could send the message a second time.
        let via = match &rec.progress {
            Progress::Graph(_) => SendVia::Graph,
            Progress::Gmail(_) => SendVia::GmailApi,
            Progress::None => slot.send_via,
            // Files of an oversize message were being saved (its links are not sent yet).
            Progress::Folder(_) => slot.send_via,
        };
        let resource = resource_of(via);
        let token = match self.tokens.access_token_for(&rec.identity, resource).await {
            Ok(t) => t,
            Err(TokenError::NeedsLogin(why)) => {
                return self.defer(
                    lease,
                    rec,
                    &format!("identity needs a new sign-in: {why}"),
                    Some(Duration::from_secs(300)),
                    DeferReason::NeedsLogin,
                )
            }
            Err(e) => return self.defer(lease, rec, &e.to_string(), None, DeferReason::Token),
        };
        let path = self.queue.spool().path(id);
        let started = Instant::now();
        let progress = RecordProgress::new(&self.queue, &lease, &rec);
        let send = |token: AccessToken| {
            let (rec, path, progress, slot) = (&rec, &path, &progress, &slot);
            async move {
                let env = Envelope { from: &rec.from, rcpts: &rec.rcpts, size: rec.size, eight_bit: rec.eight_bit };
                let saved = progress.latest();
                let msg = Outbound {
                    identity: &rec.identity,
                    mailbox: &slot.email,
                    env: &env,
                    body: path,
                    progress: &saved,
                    sink: progress,
                    obs: &NoTrace,
                };
                self.upstream.send(via, &slot.provider.name, &token, &msg).await
            }
        };
        let mut result = send(token.clone()).await;
        if let Err(SendError::Auth { reply, detail }) = &result {
            // A refused token forces one refresh and one retry (ARCHITECTURE.md, "A revoked token is loud").
            tracing::warn!(queue_id = %id, identity = %rec.identity, detail = detail.as_deref().unwrap_or(""), "upstream refused the token ({}); refreshing once", reply.describe());
            self.upstream.flush_pool(&rec.identity);
            match self.tokens.refresh_after_rejection_for(&rec.identity, resource, &token).await {
                Ok(t2) => result = send(t2).await,
                Err(e) => tracing::warn!(identity = %rec.identity, "refresh after rejection failed: {e}"),
            }
        }
        // What a long API send recorded stays with the record: a deferral keeps it.
        rec.progress = progress.into_latest();
        let took = started.elapsed();
        metrics::UPSTREAM_LATENCY.with_label_values(&[&rec.identity]).observe(took.as_secs_f64());

        match result {
            Ok(outcome) => self.settle(lease, rec, outcome, waiter, took, via.as_str()).await,
            Err(e) => self.failed(lease, rec, e, waiter, took, via.as_str(), true).await,
        }
    }

    /// What a failed attempt (mail or files) does to its record: deferred, throttled (`hold`:
    /// the identity's other messages wait as long), or refused for every recipient.
    #[allow(clippy::too_many_arguments)]
    async fn failed(
        &self,
        lease: Lease,
        rec: QueueRecord,
        e: SendError,
        waiter: Option<&Waiter>,
        took: Duration,
        via: &str,
        hold: bool,
    ) -> Outcome {
        match e {
            SendError::Auth { reply, detail } => {
                let why = format!(
                    "upstream refused the token: {}{}",
                    reply.describe(),
                    detail.map(|d| format!(" {d}")).unwrap_or_default()
                );
                tracing::error!(queue_id = %rec.id, identity = %rec.identity, "{why}");
                self.defer(lease, rec, &why, None, DeferReason::Auth)
            }
            SendError::Network(e) => self.defer(lease, rec, &e, None, DeferReason::Network),
            SendError::Throttled { reply, retry_after } => self.throttled(lease, rec, &reply, retry_after, hold),
            SendError::Rejected(r) if !r.is_permanent() => {
                self.defer(lease, rec, &r.describe(), None, DeferReason::Upstream4xx)
            }
            SendError::Rejected(r) => {
                let all: Vec<_> = rec.rcpts.iter().map(|a| (a.clone(), r.clone())).collect();
                let out = SendOutcome { accepted: vec![], refused: all, reply: None };
                self.settle(lease, rec, out, waiter, took, via).await
            }
        }
    }

    /// Applies the per-recipient result of a transaction: commits it, then reports it.
    async fn settle(
        &self,
        lease: Lease,
        mut rec: QueueRecord,
        out: SendOutcome,
        waiter: Option<&Waiter>,
        took: Duration,
        via: &str,
    ) -> Outcome {
        let id = rec.id;
        // The reply to the final dot applies to every accepted recipient.
        let (delivered, data_refused): (Vec<String>, Vec<(String, UpstreamReply)>) = match &out.reply {
            Some(r) if r.code < 400 => (out.accepted.clone(), vec![]),
            Some(r) => (vec![], out.accepted.iter().map(|a| (a.clone(), r.clone())).collect()),
            None => (vec![], vec![]),
        };
        let refused: Vec<_> = out.refused.into_iter().chain(data_refused).collect();
        let (permanent, transient): (Vec<_>, Vec<_>) = refused.into_iter().partition(|(_, r)| r.is_permanent());
        let path = if waiter.is_some_and(Waiter::still_waiting) { "session" } else { "queue" };
        let total = rec.rcpts.len();

        // Everything refused for good and the device still waiting: it gets the refusal. The
        // claim is what decides that no bounce is due; the removal is durable before the reply.
        let refuse_in_session =
            delivered.is_empty() && transient.is_empty() && !permanent.is_empty() && waiter.is_some_and(Waiter::claim);
        let outcome = if refuse_in_session {
            self.finish(lease, &rec, false, &[]).await
        } else if transient.is_empty() && permanent.is_empty() {
            // Delivered to everyone: nobody waits for this record's removal (the device's
            // answer does not depend on it), so it is committed off the device's path; the
            // body goes once the removal is durable.
            self.queue.finish_delivered(lease)
        } else if transient.is_empty() {
            self.finish(lease, &rec, false, &failed_recipients(&permanent)).await
        } else {
            // Some recipients remain: the shortened record (and any bounce) is durable before
            // the next attempt can send to them, so nobody gets the message twice.
            rec.rcpts = transient.iter().map(|(a, _)| a.clone()).collect();
            let why = transient[0].1.describe();
            let changed = rec.rcpts.len() != total;
            if !changed && permanent.is_empty() {
                return self.defer(lease, rec, &why, None, DeferReason::Upstream4xx);
            }
            self.next_try(&mut rec, &why, None);
            self.finish(lease, &rec, true, &failed_recipients(&permanent)).await
        };
        if let Err(e) = outcome {
            // The store failed (and the relay is stopping): nothing of this attempt was
            // recorded, so the restart repeats it. The device is not told it was refused.
            tracing::error!(queue_id = %id, "cannot record the outcome of a delivery: {e}");
            return Outcome::Queued("the outcome could not be recorded; delivery will be retried".into());
        }

        if !delivered.is_empty() {
            metrics::MESSAGES_DELIVERED.with_label_values(&[&rec.identity, path, via]).inc();
            tracing::info!(
                queue_id = %id, device = %rec.device, identity = %rec.identity, size = rec.size,
                rcpts = delivered.len(), upstream = %out.reply.as_ref().map(|r| r.describe()).unwrap_or_default(),
                ms = took.as_millis() as u64, path, via, "delivered"
            );
        }
        for (rcpt, r) in &permanent {
            tracing::warn!(queue_id = %id, identity = %rec.identity, rcpt = %rcpt, "refused upstream: {}", r.describe());
            self.activity.device_error(&rec.device, &format!("refused upstream for {rcpt}: {}", r.describe()));
        }
        if refuse_in_session {
            metrics::MESSAGES_FAILED.with_label_values(&[&rec.identity, "reply"]).inc();
            return Outcome::Refused(permanent[0].1.to_device_reply());
        }
        if !permanent.is_empty() {
            metrics::MESSAGES_FAILED.with_label_values(&[&rec.identity, "bounce"]).inc();
        }
        if !transient.is_empty() {
            let why = transient[0].1.describe();
            metrics::deferred(&rec.identity, DeferReason::Upstream4xx);
            tracing::warn!(queue_id = %id, identity = %rec.identity, attempts = rec.attempts, rcpts = transient.len(), "deferred: {why}");
            return Outcome::Queued(format!(
                "delivered to {} of {total} recipients; the others will be retried: {why}",
                delivered.len()
            ));
        }
        match out.reply {
            Some(r) if permanent.is_empty() => Outcome::Delivered(r),
            _ => Outcome::Reported(format!(
                "delivered to {} of {total} recipients; {} refused, a bounce reports them",
                delivered.len(),
                permanent.len()
            )),
        }
    }

    /// Counts a failed attempt on the record and sets its next try.
    fn next_try(&self, rec: &mut QueueRecord, why: &str, cap: Option<Duration>) -> Duration {
        rec.attempts += 1;
        let mut wait = backoff(rec.attempts, self.policy.retry_first, self.policy.retry_max);
        if let Some(c) = cap {
            wait = wait.min(c);
        }
        rec.next_attempt = now_ms() + wait.as_millis() as i64;
        rec.last_error = Some(why.to_string());
        self.activity.device_error(&rec.device, &format!("delivery deferred: {why}"));
        wait
    }

    /// Keeps a message queued, with the same recipients, for a later attempt.
    fn defer(
        &self,
        lease: Lease,
        mut rec: QueueRecord,
        why: &str,
        cap: Option<Duration>,
        class: DeferReason,
    ) -> Outcome {
        let wait = self.next_try(&mut rec, why, cap);
        metrics::deferred(&rec.identity, class);
        tracing::warn!(queue_id = %rec.id, identity = %rec.identity, attempts = rec.attempts, retry_in = wait.as_secs(), "deferred: {why}");
        if let Err(e) = self.queue.defer(lease, &rec) {
            // Scheduled anyway: only the attempt count and error are lost.
            tracing::error!(queue_id = %rec.id, "cannot update queue record: {e}");
        }
        Outcome::Queued(why.to_string())
    }

    /// Keeps a message queued because the provider is throttling its mailbox: the next attempt
    /// is when the provider's `Retry-After` says, not after the failure backoff (throttling is
    /// not the message's fault, and its attempts are not counted).
    /// `hold`: the identity's other messages wait as long (its mailbox is throttled; a
    /// throttled file upload holds only itself).
    fn throttled(
        &self,
        lease: Lease,
        mut rec: QueueRecord,
        reply: &UpstreamReply,
        retry_after: Duration,
        hold: bool,
    ) -> Outcome {
        let why = reply.describe();
        let wait = retry_after.max(Duration::from_secs(1));
        rec.next_attempt = now_ms() + wait.as_millis() as i64;
        rec.last_error = Some(why.clone());
        metrics::deferred(&rec.identity, DeferReason::Throttled);
        // The provider throttles the mailbox, not this message: the identity's other queued
        // messages wait as long.
        if hold {
            self.rate_held.locked().insert(rec.identity.clone(), rec.next_attempt);
        }
        tracing::warn!(queue_id = %rec.id, identity = %rec.identity, retry_in = wait.as_secs(), "throttled: {why}");
        if let Err(e) = self.queue.defer(lease, &rec) {
            tracing::error!(queue_id = %rec.id, "cannot update queue record: {e}");
        }
        Outcome::Queued(format!("the provider is throttling this mailbox: {why}"))
    }

    /// Commits a message's new state: with `retry`, `rec` (shortened) is tried again at its
    /// `next_attempt`, else the message is finished; a bounce for `failed` goes in the same
    /// atomic batch.
    async fn finish(
        &self,
        mut lease: Lease,
        rec: &QueueRecord,
        retry: bool,
        failed: &[FailedRecipient],
    ) -> Result<(), QueueError> {
        let report = if failed.is_empty() { None } else { self.bounce(rec, failed) };
        let own = report.as_ref().map(|(body, from, to)| OwnMessage {
            body,
            identity: &rec.identity,
            device: &rec.device,
            from,
            to,
        });
        match self.queue.settle(&mut lease, retry.then_some(rec), own).await {
            Ok(Some(bounce_id)) => {
                let to = report.as_ref().map(|r| r.2.as_str()).unwrap_or_default();
                tracing::info!(queue_id = %rec.id, bounce_id = %bounce_id, to = %to, "bounce queued");
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(QueueError::Io(e)) => {
                // The bounce could not be written (a full disk): keep the refused recipients
                // queued instead of losing their report; the delivered ones are not kept, so
                // nobody gets the message twice. They are refused and reported next time.
                tracing::error!(queue_id = %rec.id, "cannot write the bounce ({e}); its recipients stay queued");
                let mut keep = rec.clone();
                // The refused send must not be resumed: its recipients are only to be reported.
                keep.progress = Progress::None;
                if !retry {
                    keep.rcpts.clear();
                    self.next_try(&mut keep, &format!("bounce not written: {e}"), None);
                }
                keep.rcpts.extend(failed.iter().map(|f| f.address.clone()));
                let res = self.queue.settle(&mut lease, Some(&keep), None).await.map(|_| ());
                if res.is_err() {
                    lease.release(Some(now_ms() + 60_000));
                }
                res
            }
            Err(e) => Err(e),
        }
    }

    /// Where a bounce for this message goes (see the module docs); None when nobody may get one.
    fn bounce_recipient(&self, rec: &QueueRecord, identity_mailbox: &str) -> Option<String> {
        if rec.is_bounce {
            return None;
        }
        Some(match &self.policy.bounce_to {
            Some(admin) => admin.clone(),
            None if rec.bounce_to_sender && !rec.original_from.is_empty() => rec.original_from.clone(),
            None => identity_mailbox.to_string(),
        })
    }

    /// Builds a DSN for failed recipients: (body, from, to). None for a bounce that failed (it
    /// is never bounced again) or an identity that is no longer configured.
    fn bounce(&self, rec: &QueueRecord, failed: &[FailedRecipient]) -> Option<(Vec<u8>, String, String)> {
        let Ok(slot) = self.tokens.slot(&rec.identity) else {
            tracing::error!(queue_id = %rec.id, identity = %rec.identity, "identity no longer configured; no bounce for the failed recipients");
            return None;
        };
        let Some(to) = self.bounce_recipient(rec, &slot.email) else {
            tracing::error!(queue_id = %rec.id, "a bounce could not be delivered; dropped");
            return None;
        };
        let header = read_header(&self.queue.spool().path(rec.id));
        let arrival = chrono::DateTime::from_timestamp(rec.received, 0).unwrap_or_default().to_rfc2822();
        let qid = rec.id.to_string();
        let body = bounce::build(&bounce::Bounce {
            reporting_host: &self.policy.hostname,
            from: &slot.email,
            to: &to,
            queue_id: &qid,
            device: &rec.device,
            arrival: &arrival,
            failed,
            original_headers: &header,
            now: chrono::Utc::now(),
        });
        Some((body, slot.email.clone(), to))
    }

    /// How many queued messages of `identity` the runner attempts at once: its upstream
    /// pool (`relay.upstream_pool`, at most [`crate::upstream::EXCHANGE_CONNECTIONS`] for
    /// Microsoft, as `upstream` sizes it); one for an identity no longer configured.
    pub fn identity_limit(&self, identity: &str) -> usize {
        match self.tokens.slot(identity) {
            Ok(slot) => pool_size(slot.provider.kind, self.policy.upstream_pool),
            Err(_) => 1,
        }
    }

    /// Until when ([`now_ms`]) `identity`'s sending limit holds its queued mail, if it does.
    fn rate_held_until(&self, identity: &str, now: i64) -> Option<i64> {
        let mut held = self.rate_held.locked();
        match held.get(identity) {
            Some(&at) if at > now => Some(at),
            Some(_) => {
                held.remove(identity);
                None
            }
            None => None,
        }
    }

    /// Retries queued messages until `shutdown` fires: at most `max_parallel` attempts at
    /// once, and per identity at most its [`Delivery::identity_limit`], so a slow or refusing
    /// identity holds only its own share and never the others' due mail. The runner sleeps
    /// until the next message is due, and wakes at once when an attempt ends (a slot frees),
    /// when a message becomes due earlier, or when an identity is ready again.
    pub async fn run(self: Arc<Self>, max_parallel: usize, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let slots = Arc::new(Slots::new(max_parallel));
        let mut ready = self.tokens.subscribe_ready();
        let mut housekeeping = Instant::now();
        let mut round = 0usize;
        loop {
            let now = now_ms();
            let mut heads = self.queue.due_heads();
            // Identities take turns at the first free slots.
            heads.sort_unstable();
            round = round.wrapping_add(1);
            if !heads.is_empty() {
                let turn = round % heads.len();
                heads.rotate_left(turn);
            }
            let mut next: Option<i64> = None;
            for (identity, due) in heads {
                let limit = self.identity_limit(&identity);
                let Some(free) = slots.free_for(&identity, limit) else {
                    // Saturated: the end of one of its attempts wakes the runner.
                    continue;
                };
                let start = self.rate_held_until(&identity, now).map_or(due, |held| held.max(due));
                if start > now {
                    next = Some(next.map_or(start, |n| n.min(start)));
                    continue;
                }
                for lease in self.queue.take_due_for(&identity, now, free) {
                    let slot = slots.take(&identity);
                    let me = self.clone();
                    // The lease goes with the task: a panicking attempt releases its message,
                    // and its slot (dropped with the task) wakes the runner.
                    tokio::spawn(async move {
                        let _slot = slot;
                        me.attempt(lease, None).await;
                    });
                }
            }
            if housekeeping.elapsed() >= HOUSEKEEPING {
                housekeeping = Instant::now();
                self.upstream.close_idle();
                update_queue_metrics(&self.queue);
            }
            // Never longer than the housekeeping period; not a pace: every event that can
            // make work wakes the runner at once.
            let wait = next.map_or(HOUSEKEEPING, |at| Duration::from_millis((at - now_ms()).clamp(0, 1000) as u64));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.queue.wake.notified() => {}
                _ = slots.freed.notified() => {}
                Ok(identity) = ready.recv() => {
                    match self.queue.retry_now(None, Some(&identity)).await {
                        Ok(n) if n > 0 => tracing::info!(identity = %identity, messages = n, "identity ready again; retrying its queued mail"),
                        Ok(_) => {}
                        Err(e) => tracing::error!("queue: {e}"),
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The device's one answer for a message queued as several records: delivered when every
/// part was, else queued when a part waits for a retry, else reported (a bounce tells what
/// failed).
fn combine(outcomes: Vec<Outcome>) -> Outcome {
    let texts = |f: fn(&Outcome) -> Option<String>| outcomes.iter().filter_map(f).collect::<Vec<_>>().join("; ");
    let live: Vec<&Outcome> = outcomes.iter().filter(|o| !matches!(o, Outcome::Gone)).collect();
    if live.is_empty() {
        return Outcome::Gone;
    }
    if live.iter().all(|o| matches!(o, Outcome::Delivered(_))) {
        let text = texts(|o| match o {
            Outcome::Delivered(r) => Some(r.text.clone()),
            _ => None,
        });
        return Outcome::Delivered(UpstreamReply::new(250, text));
    }
    let all = texts(|o| match o {
        Outcome::Delivered(r) => Some(format!("delivered: {}", r.text)),
        Outcome::Queued(why) => Some(format!("queued: {why}")),
        Outcome::Reported(what) => Some(what.clone()),
        Outcome::Refused(r) => Some(format!("refused: {}", r.text())),
        Outcome::Gone => None,
    });
    if live.iter().any(|o| matches!(o, Outcome::Queued(_))) {
        Outcome::Queued(all)
    } else {
        Outcome::Reported(all)
    }
}

/// How often the runner closes idle upstream connections and updates the queue metrics.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

/// The token an identity's mail needs: Graph's for Graph, else the mail servers' (a Google
/// identity's one token covers the Gmail API).
pub fn resource_of(via: SendVia) -> Resource {
    match via {
        SendVia::Graph => Resource::Graph,
        SendVia::Smtp | SendVia::GmailApi => Resource::Mail,
    }
}

/// Keeps a long API send's progress in its queue record: each step's state is committed
/// before the step starts, while the attempt's lease holds the message. The record is copied
/// only when a step is saved, never for an SMTP send.
struct RecordProgress<'a> {
    queue: &'a Queue,
    lease: &'a Lease,
    rec: &'a QueueRecord,
    /// The last state given to save (the record's own at first).
    latest: Mutex<Progress>,
}

impl<'a> RecordProgress<'a> {
    fn new(queue: &'a Queue, lease: &'a Lease, rec: &'a QueueRecord) -> RecordProgress<'a> {
        RecordProgress { queue, lease, rec, latest: Mutex::new(rec.progress.clone()) }
    }

    fn latest(&self) -> Progress {
        self.latest.locked().clone()
    }

    fn into_latest(self) -> Progress {
        self.latest.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

impl ProgressSink for RecordProgress<'_> {
    fn save<'a>(
        &'a self,
        progress: &'a Progress,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            // Kept even when the commit fails: the deferral then still writes it (a draft id
            // remembered best effort rather than an orphan draft).
            *self.latest.locked() = progress.clone();
            let mut rec = self.rec.clone();
            rec.progress = progress.clone();
            self.queue.save_progress(self.lease, &rec).await.map_err(|e| e.to_string())
        })
    }
}

/// The upstream pool size of an identity of `kind` (as [`crate::upstream::Upstream::new`]
/// computes it): Exchange Online refuses a mailbox's 4th concurrent connection.
fn pool_size(kind: ProviderKind, configured: usize) -> usize {
    match kind {
        ProviderKind::Microsoft => configured.clamp(1, crate::upstream::EXCHANGE_CONNECTIONS),
        _ => configured.max(1),
    }
}

/// The runner's attempts in flight, in all and per identity. A [`Slot`] counts one attempt
/// and gives it back when dropped (also by a panicking attempt), waking the runner.
struct Slots {
    max: usize,
    running: Mutex<(usize, HashMap<Arc<str>, usize>)>,
    /// Signalled whenever a slot is given back.
    freed: Notify,
}

impl Slots {
    fn new(max: usize) -> Slots {
        Slots { max: max.max(1), running: Mutex::default(), freed: Notify::new() }
    }

    /// How many more attempts `identity` may start now (at most `limit` at once, within the
    /// total); `None` when it may start none.
    fn free_for(&self, identity: &str, limit: usize) -> Option<usize> {
        let r = self.running.locked();
        let own = r.1.get(identity).copied().unwrap_or(0);
        let free = limit.saturating_sub(own).min(self.max.saturating_sub(r.0));
        (free > 0).then_some(free)
    }

    fn take(self: &Arc<Self>, identity: &Arc<str>) -> Slot {
        let mut r = self.running.locked();
        r.0 += 1;
        *r.1.entry(identity.clone()).or_default() += 1;
        Slot { slots: self.clone(), identity: identity.clone() }
    }
}

/// One attempt counted in [`Slots`].
struct Slot {
    slots: Arc<Slots>,
    identity: Arc<str>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut r = self.slots.running.locked();
        r.0 = r.0.saturating_sub(1);
        if let Some(n) = r.1.get_mut(&self.identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                r.1.remove(&self.identity);
            }
        }
        drop(r);
        self.slots.freed.notify_one();
    }
}

/// Queue depth and oldest age for /metrics.
pub fn update_queue_metrics(queue: &Queue) {
    metrics::QUEUE_DEPTH.set(queue.depth() as i64);
    let oldest = queue.oldest_received().map(|t| (now_ms() / 1000 - t).max(0)).unwrap_or(0);
    metrics::QUEUE_OLDEST_AGE.set(oldest);
}

/// The recipients refused for good, as a bounce lists them.
fn failed_recipients(permanent: &[(String, UpstreamReply)]) -> Vec<FailedRecipient> {
    permanent
        .iter()
        .map(|(a, r)| FailedRecipient {
            address: a.clone(),
            status: r.status().map(|s| s.to_string()).unwrap_or_else(|| "5.0.0".into()),
            diagnostic: r.describe(),
        })
        .collect()
}

/// The header section of a spooled message, for a bounce.
fn read_header(path: &std::path::Path) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; bounce::MAX_QUOTED_HEADERS];
    let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut buf)).unwrap_or(0);
    buf.truncate(n);
    bounce::header_section(&buf).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_never_runs_more_attempts_than_its_pool() {
        let slots = Arc::new(Slots::new(5));
        let busy: Arc<str> = Arc::from("busy");
        let quiet: Arc<str> = Arc::from("quiet");
        assert_eq!(slots.free_for("busy", 3), Some(3));
        let held: Vec<Slot> = (0..3).map(|_| slots.take(&busy)).collect();
        assert_eq!(slots.free_for("busy", 3), None, "at its pool size");
        // A saturated identity does not keep another from its share of the total...
        assert_eq!(slots.free_for("quiet", 3), Some(2));
        let other: Vec<Slot> = (0..2).map(|_| slots.take(&quiet)).collect();
        // ...and the total is a cap too.
        assert_eq!(slots.free_for("third", 3), None);
        drop(other);
        assert_eq!(slots.free_for("third", 3), Some(2));
        drop(held);
        assert_eq!(slots.free_for("busy", 3), Some(3));
        assert!(slots.running.locked().1.is_empty(), "nothing counted once all ended");
    }

    #[tokio::test]
    async fn the_end_of_an_attempt_wakes_the_runner_at_once() {
        let slots = Arc::new(Slots::new(1));
        let slot = slots.take(&Arc::from("i"));
        let s = slots.clone();
        let ended = tokio::spawn(async move { tokio::task::spawn_blocking(move || drop(slot)).await });
        // Woken by the release, not by a timer (the runner's longest sleep is a second).
        tokio::time::timeout(Duration::from_millis(200), s.freed.notified()).await.expect("woken");
        ended.await.unwrap().unwrap();
        assert_eq!(slots.free_for("i", 1), Some(1));
    }

    #[test]
    fn microsoft_identities_attempt_at_most_three_at_once() {
        assert_eq!(pool_size(ProviderKind::Microsoft, 8), 3);
        assert_eq!(pool_size(ProviderKind::Microsoft, 2), 2);
        assert_eq!(pool_size(ProviderKind::Generic, 8), 8);
        assert_eq!(pool_size(ProviderKind::Generic, 0), 1);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let first = Duration::from_secs(30);
        let max = Duration::from_secs(1800);
        let b1 = backoff(1, first, max).as_secs_f64();
        let b3 = backoff(3, first, max).as_secs_f64();
        let b20 = backoff(20, first, max).as_secs_f64();
        assert!((27.0..=33.0).contains(&b1), "{b1}");
        assert!((108.0..=132.0).contains(&b3), "{b3}");
        assert!((1620.0..=1980.0).contains(&b20), "{b20}");
        assert!(backoff(u32::MAX, first, max) <= Duration::from_secs(1980));
    }
}
