//! Durable acceptance and the retry schedule.
//!
//! A message is accepted when its body is in the spool ([`spool`]) and its record (envelope,
//! device, identity, attempts, next try) is committed to the store: only then may a device get
//! a 250 (ARCHITECTURE.md, "Durability"). Every later change that decides who still gets the
//! message (recipients delivered, a bounce queued, the message finished) is committed before
//! the relay acts on it, and several related changes go in one atomic batch: a crash between
//! two writes can repeat at most the one delivery whose answer was lost, never bounce twice or
//! lose a recipient. The queue also keeps an in-memory schedule of when each message is due,
//! and which ones are being attempted right now, so that the in-session attempt and the
//! background retries never deliver the same message at the same time.
//!
//! Time: the schedule runs on [`now_ms`], a clock that follows the wall clock at start-up and
//! then only moves forward with the monotonic clock, so a clock step neither delays every
//! retry nor expires the whole queue. Stored times are re-based when the queue is opened.

pub mod bounce;
pub mod incoming;
pub mod spool;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::locks::MutexExt;
use crate::store::{Change, Store, StoreError, Tree};
use crate::upstream::api::Progress;
pub use incoming::{ForFolder, Incoming};
pub use spool::{Spool, SpoolWriter};

/// A queued message's id: microseconds since the epoch at acceptance, made unique, so ids
/// sort by arrival. Shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl FromStr for MessageId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(MessageId)
    }
}

/// Everything the relay knows about a queued message besides its body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueRecord {
    pub id: MessageId,
    /// Unix seconds when the device's DATA completed.
    pub received: i64,
    pub device: String,
    pub identity: String,
    /// The device's address, for logs.
    pub client: String,
    /// Envelope sender used upstream (after any rewrite); empty for the null sender.
    pub from: String,
    /// Envelope sender the device gave.
    pub original_from: String,
    /// The device's own sender may receive bounces: it passed the device's recipient
    /// allow-list when the message was accepted. Otherwise bounces go to `bounce_to` or the
    /// identity's own mailbox, so that a device cannot make the relay mail arbitrary outside
    /// addresses (backscatter). Records written before this field existed say false.
    #[serde(default)]
    pub bounce_to_sender: bool,
    /// Recipients not yet delivered.
    pub rcpts: Vec<String>,
    pub size: u64,
    pub eight_bit: bool,
    pub attempts: u32,
    /// Unix milliseconds of the next attempt.
    pub next_attempt: i64,
    pub last_error: Option<String>,
    /// This message is itself a bounce: it is never bounced again.
    #[serde(default)]
    pub is_bounce: bool,
    /// A send through an HTTP API that a restart must continue, not repeat (a Graph draft
    /// and its finished uploads, a Gmail upload session).
    #[serde(default, skip_serializing_if = "Progress::is_none")]
    pub progress: Progress,
    /// Scan to folder: the `[[destination]]` (by name) whose address is this record's one
    /// recipient; its files are saved there instead of mailed. `None`: mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

impl QueueRecord {
    /// The record as the admin API and the status page show it: without the resumable state
    /// of an API send, whose upload URLs let whoever holds them finish a message that is then
    /// sent as the mailbox.
    pub fn shown(mut self) -> QueueRecord {
        self.progress = Progress::None;
        self
    }
}

/// Errors of the queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("spool: {0}")]
    Io(#[from] std::io::Error),
    #[error("no queued message {0}")]
    NotFound(MessageId),
    #[error("message {0} is being delivered right now; try again in a moment")]
    InFlight(MessageId),
}

/// The in-memory schedule: when each queued message is due, under its identity, and which
/// messages are being attempted. Records stay on disk; this holds only ids, times and a shared
/// name per identity, so it stays small at any depth and lets the runner pick an identity's
/// due messages (and `retry` pick an identity's messages) without reading the store.
#[derive(Default)]
struct Schedule {
    /// Per identity: (due time in [`now_ms`] milliseconds, id), earliest first. An identity
    /// whose upstream is saturated does not hide another identity's due messages.
    due: HashMap<Arc<str>, BTreeSet<(i64, MessageId)>>,
    /// Each scheduled message's time and identity.
    at: HashMap<MessageId, (i64, Arc<str>)>,
    /// Being attempted now (each held by one [`Lease`]): not due, whatever their time.
    in_flight: HashMap<MessageId, Arc<str>>,
    /// One shared name per identity (the entries above point at it).
    names: HashSet<Arc<str>>,
}

impl Schedule {
    /// The shared name of `identity`.
    fn intern(&mut self, identity: &str) -> Arc<str> {
        if let Some(n) = self.names.get(identity) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(identity);
        self.names.insert(n.clone());
        n
    }

    /// Makes `id` due at `at` ([`now_ms`] milliseconds) under `identity`, replacing its
    /// earlier time.
    fn set(&mut self, id: MessageId, at: i64, identity: Arc<str>) {
        self.unschedule(id);
        self.due.entry(identity.clone()).or_default().insert((at, id));
        self.at.insert(id, (at, identity));
    }

    /// Takes `id` off the schedule (not off the in-flight set); returns its identity.
    fn unschedule(&mut self, id: MessageId) -> Option<Arc<str>> {
        let (at, identity) = self.at.remove(&id)?;
        if let Some(set) = self.due.get_mut(&identity) {
            set.remove(&(at, id));
            if set.is_empty() {
                self.due.remove(&identity);
            }
        }
        Some(identity)
    }

    /// Marks `id` in flight (taking it off the schedule); `None` when it already is. The
    /// identity is the scheduled one, else `identity`.
    fn take(&mut self, id: MessageId, identity: Option<&str>) -> Option<Arc<str>> {
        if self.in_flight.contains_key(&id) {
            return None;
        }
        let name = match self.unschedule(id) {
            Some(n) => n,
            None => self.intern(identity.unwrap_or_default()),
        };
        self.in_flight.insert(id, name.clone());
        Some(name)
    }

    /// Forgets `id` altogether (a finished message).
    fn forget(&mut self, id: MessageId) {
        self.in_flight.remove(&id);
        self.unschedule(id);
    }

    /// Takes up to `max` of `identity`'s messages due at `now`, earliest first.
    fn take_due_for(&mut self, identity: &str, now: i64, max: usize) -> Vec<(MessageId, Arc<str>)> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&(at, id)) = self.due.get(identity).and_then(|set| set.first()) else { break };
            if at > now {
                break;
            }
            if let Some(name) = self.take(id, None) {
                out.push((id, name));
            } else {
                // In flight and scheduled at once cannot happen; never loop on it.
                self.unschedule(id);
            }
        }
        out
    }
}

/// How long after an attempt that ended without an outcome (its [`Lease`] dropped, e.g. by a
/// panic) the message is due again: soon, but not at once, so that a message whose attempt
/// panics every time does not spin.
pub const ABANDONED_RETRY_MS: i64 = 60_000;

/// A message taken for an attempt (or for an admin's retry or drop): while its lease lives,
/// no one else takes the message, so the in-session attempt, the scheduler and the admin never
/// work on one message at once (ARCHITECTURE.md, "Durability").
///
/// A lease ends through the queue's outcome methods ([`Queue::settle`], [`Queue::defer`],
/// [`Queue::finish_delivered`]) or [`Lease::release`]. A lease dropped otherwise (the task
/// holding it panicked or was cancelled) releases the message itself, due again after
/// [`ABANDONED_RETRY_MS`]: nothing stays marked in flight until a restart.
#[must_use = "a dropped lease releases its message at once"]
pub struct Lease {
    id: MessageId,
    /// The message's identity (it is scheduled under it again).
    identity: Arc<str>,
    schedule: Arc<Mutex<Schedule>>,
    wake: Arc<Notify>,
    /// Still marks the message in flight (false once ended).
    held: bool,
}

impl Lease {
    /// A lease that belongs to no queue, for a fake queue (the in-process session tests):
    /// ending or dropping it changes nothing anywhere.
    pub fn unqueued(id: MessageId) -> Lease {
        Lease { id, identity: Arc::from(""), schedule: Default::default(), wake: Default::default(), held: true }
    }

    /// The message this lease holds.
    pub fn id(&self) -> MessageId {
        self.id
    }

    /// The identity the message is sent as.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Ends the attempt; `next` schedules the message again ([`now_ms`] milliseconds), `None`
    /// leaves it unscheduled until the next start (its record is gone, or the store failed).
    pub fn release(mut self, next: Option<i64>) {
        self.end(next);
    }

    fn end(&mut self, next: Option<i64>) {
        if !std::mem::replace(&mut self.held, false) {
            return;
        }
        let mut s = self.schedule.locked();
        s.in_flight.remove(&self.id);
        if let Some(at) = next {
            s.set(self.id, at, self.identity.clone());
            drop(s);
            self.wake.notify_one();
        }
    }

    /// Ends the lease of a finished message: it leaves the schedule.
    fn end_finished(&mut self) {
        if std::mem::replace(&mut self.held, false) {
            self.schedule.locked().forget(self.id);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.held {
            tracing::warn!(queue_id = %self.id, "an attempt ended without an outcome; the message is due again in {} s", ABANDONED_RETRY_MS / 1000);
            self.end(Some(now_ms() + ABANDONED_RETRY_MS));
        }
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).field("held", &self.held).finish()
    }
}

/// A message the relay writes itself (a bounce, an answer to a refused print job).
#[derive(Debug, Clone, Copy)]
pub struct OwnMessage<'a> {
    pub body: &'a [u8],
    pub identity: &'a str,
    /// Shown in `queue list` and logs ("mailbox print", the original device).
    pub device: &'a str,
    pub from: &'a str,
    pub to: &'a str,
}

/// The queue: store records, spool bodies and the schedule.
pub struct Queue {
    store: Arc<Store>,
    spool: Spool,
    /// Shared with the [`Lease`]s, which end themselves.
    schedule: Arc<Mutex<Schedule>>,
    last_id: AtomicU64,
    set_aside: AtomicUsize,
    /// Woken when a message becomes due earlier than the scheduler thought.
    pub wake: Arc<Notify>,
    /// Delivered messages whose record removal waits for the next commit
    /// ([`Queue::finish_delivered`]).
    delivered: Mutex<DeliveredBatch>,
}

/// Delivered messages waiting for the commit of their record's removal: one task commits
/// them in batches, so a fast drain costs one commit per batch, not a task and a commit per
/// message.
#[derive(Default)]
struct DeliveredBatch {
    leases: Vec<Lease>,
    /// A task is committing batches right now.
    committing: bool,
}

/// Stored times further ahead than this were computed under a clock that has since stepped
/// back (or by hand): such a message is due at once rather than after the step.
const MAX_STORED_WAIT_MS: i64 = 6 * 3600 * 1000;

/// The relay's clock in unix milliseconds: the wall clock when the process first asks, then
/// advanced by the monotonic clock only. Use it for everything that is compared in memory
/// (schedules, rate windows, ages); it is shown and stored as unix time.
pub fn now_ms() -> i64 {
    static ANCHOR: OnceLock<(i64, Instant)> = OnceLock::new();
    let (wall, mono) = ANCHOR.get_or_init(|| (chrono::Utc::now().timestamp_millis(), Instant::now()));
    wall + mono.elapsed().as_millis() as i64
}

/// Re-bases a stored next-attempt time at start-up (see [`MAX_STORED_WAIT_MS`]).
fn rebase_due(stored: i64, now: i64) -> i64 {
    if stored - now > MAX_STORED_WAIT_MS {
        now
    } else {
        stored
    }
}

impl Queue {
    /// Opens the queue and repairs what a crash can leave behind: a record whose body is gone
    /// (the body was removed, the record's removal was not yet durable) is removed; a body
    /// without a record is never deleted (it may be a message that was acknowledged under a
    /// failing disk) but moved to `spool/set-aside` and reported. The records are streamed
    /// into the schedule one at a time (only id, identity and time are kept), so opening a
    /// deep queue costs neither the memory of its records nor a second scan.
    pub async fn open(store: Arc<Store>, spool: Spool) -> Result<Queue, QueueError> {
        let q = Queue {
            store,
            spool,
            schedule: Arc::default(),
            last_id: AtomicU64::new(0),
            set_aside: AtomicUsize::new(0),
            wake: Arc::default(),
            delivered: Mutex::default(),
        };
        let now = now_ms();
        let mut missing = Vec::new();
        let mut max_id = 0;
        {
            let mut s = q.lock();
            for item in q.store.iter(Tree::Queue) {
                let (k, v) = item?;
                // The whole record is read, not only the fields the schedule keeps: one that
                // cannot be read whole could neither be attempted nor dropped, and would spin.
                let head = match serde_json::from_slice::<QueueRecord>(&v) {
                    Ok(h) => h,
                    Err(e) => {
                        // Its body (if any) is set aside below: nothing is lost unseen.
                        tracing::error!(key = ?k, error = %e, "unreadable queue record skipped");
                        continue;
                    }
                };
                max_id = max_id.max(head.id.0);
                if !q.spool.path(head.id).exists() {
                    tracing::warn!(queue_id = %head.id, device = %head.device, "queue record without its message file (delivered or dropped just before a crash); record removed");
                    missing.push(Change::Remove(k));
                    continue;
                }
                let name = s.intern(&head.identity);
                s.set(head.id, rebase_due(head.next_attempt, now), name);
            }
        }
        for id in q.spool.ids()? {
            if !q.lock().at.contains_key(&id) {
                tracing::warn!(queue_id = %id, dir = %q.spool.set_aside_dir().display(), "message file without a queue record (a crash before its 250, or a damaged database); moved aside for the admin to check, not delivered");
                q.spool.set_aside(id)?;
            }
        }
        if !missing.is_empty() {
            q.store.apply(Tree::Queue, &missing)?;
            q.store.commit().await?;
        }
        q.set_aside.store(q.spool.set_aside_ids()?.len(), Ordering::SeqCst);
        crate::metrics::QUEUE_SET_ASIDE.set(q.set_aside.load(Ordering::SeqCst) as i64);
        q.last_id.store(max_id, Ordering::SeqCst);
        Ok(q)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.locked()
    }

    fn lease(&self, id: MessageId, identity: Arc<str>) -> Lease {
        Lease { id, identity, schedule: self.schedule.clone(), wake: self.wake.clone(), held: true }
    }

    /// Takes `id` for an attempt; `None` when someone else holds it. `identity` is the
    /// message's when it is not scheduled (a new message).
    fn try_lease(&self, id: MessageId, identity: Option<&str>) -> Option<Lease> {
        let name = self.lock().take(id, identity)?;
        Some(self.lease(id, name))
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Why the database became unusable, if it has (the relay is then stopping).
    pub fn store_failure(&self) -> Option<&str> {
        self.store.failure()
    }

    /// Message files moved aside at start-up (see [`Queue::open`]), for the status page.
    pub fn set_aside_count(&self) -> usize {
        self.set_aside.load(Ordering::SeqCst)
    }

    /// A new unique id, later than every earlier one.
    pub fn new_id(&self) -> MessageId {
        let now = (now_ms().max(0) as u64) * 1000;
        let mut last = self.last_id.load(Ordering::SeqCst);
        loop {
            let next = now.max(last + 1);
            match self.last_id.compare_exchange(last, next, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return MessageId(next),
                Err(actual) => last = actual,
            }
        }
    }

    fn encode(r: &QueueRecord) -> Result<Vec<u8>, QueueError> {
        serde_json::to_vec(r)
            .map_err(|e| QueueError::Store(StoreError::Corrupt { key: r.id.to_string(), reason: e.to_string() }))
    }

    fn put(&self, r: &QueueRecord) -> Result<(), QueueError> {
        self.store.put(Tree::Queue, &r.id.0.to_be_bytes(), &Self::encode(r)?)?;
        Ok(())
    }

    /// Makes an accepted message durable (its body must already be finished in the spool).
    /// Returns the message's [`Lease`]: the caller attempts it first.
    pub async fn accept(&self, r: &QueueRecord) -> Result<Lease, QueueError> {
        let lease = self.try_lease(r.id, Some(&r.identity)).ok_or(QueueError::InFlight(r.id))?;
        self.put(r)?;
        if let Err(e) = self.store.commit().await {
            lease.release(None);
            let _ = self.store.remove(Tree::Queue, &r.id.0.to_be_bytes());
            return Err(e.into());
        }
        Ok(lease)
    }

    /// Makes several records of one accepted message durable in one commit (a message to mail
    /// recipients and to folder destinations: one record each, ARCHITECTURE.md, "Scan to
    /// folder"), each with its own spooled body: the first record's body must be finished in
    /// the spool, and the others' are hard links to it, made here. Returns their leases, in
    /// order. On failure nothing is queued and the links are gone (the first body stays: the
    /// caller removes it).
    pub async fn accept_all(&self, records: &[QueueRecord]) -> Result<Vec<Lease>, QueueError> {
        let Some(first) = records.first() else { return Ok(Vec::new()) };
        if records.len() == 1 {
            return Ok(vec![self.accept(first).await?]);
        }
        let mut leases = Vec::with_capacity(records.len());
        let undo = |leases: Vec<Lease>, upto: usize| {
            for l in leases {
                l.release(None);
            }
            for r in &records[1..upto] {
                self.spool.remove(r.id);
            }
        };
        for (i, r) in records.iter().enumerate() {
            if i > 0 {
                if let Err(e) = self.spool.link(first.id, r.id) {
                    undo(leases, i);
                    return Err(e.into());
                }
            }
            match self.try_lease(r.id, Some(&r.identity)) {
                Some(l) => leases.push(l),
                None => {
                    undo(leases, i + 1);
                    return Err(QueueError::InFlight(r.id));
                }
            }
        }
        let mut changes = Vec::with_capacity(records.len());
        for r in records {
            changes.push(Change::Put(r.id.0.to_be_bytes().to_vec(), Self::encode(r)?));
        }
        // The store's commit syncs the spool directory first, so the links are durable with
        // the records (module `store`).
        if let Err(e) = async {
            self.store.apply(Tree::Queue, &changes)?;
            self.store.commit().await
        }
        .await
        {
            for r in records {
                let _ = self.store.remove(Tree::Queue, &r.id.0.to_be_bytes());
            }
            undo(leases, records.len());
            return Err(e.into());
        }
        Ok(leases)
    }

    /// Replaces a message by another version of it (an oversize scan whose files were saved,
    /// now a mail with their links): the new body is spooled and synced, then one commit puts
    /// the new record in and takes the old one out, and only then is the old body removed. A
    /// crash before the commit leaves the old message queued (its saved files are in its
    /// progress); after it, the new one. Ends the old lease; the new message is due at its
    /// `next_attempt`.
    pub async fn replace(&self, lease: &mut Lease, new: &QueueRecord, body: &[u8]) -> Result<(), QueueError> {
        let old = lease.id();
        let mut w = self.spool.writer(new.id);
        w.write(body).await?;
        w.finish().await?;
        let changes = [
            Change::Put(new.id.0.to_be_bytes().to_vec(), Self::encode(new)?),
            Change::Remove(old.0.to_be_bytes().to_vec()),
        ];
        if let Err(e) = async {
            self.store.apply(Tree::Queue, &changes)?;
            self.store.commit().await
        }
        .await
        {
            // As in `settle`: the store is failing and the relay stopping; the restart finds
            // what became durable (a body without a record is set aside, never lost).
            lease.end(None);
            return Err(e.into());
        }
        self.spool.remove(old);
        lease.end_finished();
        self.schedule_at(new.id, new.next_attempt, &new.identity);
        Ok(())
    }

    /// Spools a message the relay writes itself and returns its record (not yet stored).
    async fn spool_own(&self, m: &OwnMessage<'_>) -> Result<QueueRecord, QueueError> {
        let id = self.new_id();
        let mut w = self.spool.writer(id);
        w.write(m.body).await?;
        w.finish().await?;
        Ok(QueueRecord {
            id,
            received: now_ms() / 1000,
            device: m.device.to_string(),
            identity: m.identity.to_string(),
            client: "mfd-relay".into(),
            from: m.from.to_string(),
            original_from: String::new(),
            bounce_to_sender: false,
            rcpts: vec![m.to.to_string()],
            size: m.body.len() as u64,
            eight_bit: !m.body.is_ascii(),
            attempts: 0,
            next_attempt: now_ms(),
            last_error: None,
            is_bounce: true,
            progress: Progress::None,
            destination: None,
        })
    }

    /// Queues a message the relay writes itself (a bounce, an answer to a refused print
    /// job): spools it, commits its record and schedules it now. Such messages are never
    /// bounced or answered in turn. Returns its id.
    pub async fn enqueue_own(&self, m: OwnMessage<'_>) -> Result<MessageId, QueueError> {
        let r = self.spool_own(&m).await?;
        self.put(&r)?;
        self.store.commit().await?;
        self.schedule_at(r.id, r.next_attempt, &r.identity);
        Ok(r.id)
    }

    /// Records the outcome of an attempt, durably, before the caller acts on it (answers the
    /// device, logs success): `next` is the message's updated record when recipients remain
    /// (rescheduled at its `next_attempt`), `None` when it is finished; `report` is a bounce to
    /// queue in the same atomic batch. Returns the report's id. Ends the lease, except when
    /// the report cannot be spooled (a full disk, [`QueueError::Io`]): then nothing is
    /// recorded and the caller still holds the lease and decides what to commit instead.
    pub async fn settle(
        &self,
        lease: &mut Lease,
        next: Option<&QueueRecord>,
        report: Option<OwnMessage<'_>>,
    ) -> Result<Option<MessageId>, QueueError> {
        let id = lease.id();
        let report = match report {
            Some(m) => Some(self.spool_own(&m).await?),
            None => None,
        };
        let key = id.0.to_be_bytes().to_vec();
        let mut changes = Vec::with_capacity(2);
        if let Some(r) = &report {
            changes.push(Change::Put(r.id.0.to_be_bytes().to_vec(), Self::encode(r)?));
        }
        match next {
            Some(n) => changes.push(Change::Put(key, Self::encode(n)?)),
            None => changes.push(Change::Remove(key)),
        }
        if let Err(e) = async {
            self.store.apply(Tree::Queue, &changes)?;
            self.store.commit().await
        }
        .await
        {
            // The store is failing (and the relay stopping): leave every file where it is;
            // the restart finds what became durable.
            lease.end(None);
            return Err(e.into());
        }
        match next {
            Some(n) => lease.end(Some(n.next_attempt)),
            None => {
                self.spool.remove(id);
                lease.end_finished();
            }
        }
        if let Some(r) = &report {
            self.schedule_at(r.id, r.next_attempt, &r.identity);
        }
        Ok(report.map(|r| r.id))
    }

    /// Finishes a message delivered to every recipient: its record's removal is written now
    /// and committed in the background, batched with the other deliveries finished meanwhile
    /// (one commit per batch), and the body is removed only once that commit is done. Until
    /// then the lease holds the message. A crash before it repeats this one delivery (the
    /// provider's 250 came before our removal was durable), never loses or half-removes.
    pub fn finish_delivered(self: &Arc<Self>, lease: Lease) -> Result<(), QueueError> {
        let id = lease.id();
        if let Err(e) = self.store.remove(Tree::Queue, &id.0.to_be_bytes()) {
            // The store is failing (fail-stop): the restart repeats this delivery.
            lease.release(None);
            return Err(e.into());
        }
        let start = {
            let mut d = self.delivered.locked();
            d.leases.push(lease);
            !std::mem::replace(&mut d.committing, true)
        };
        if start {
            let me = self.clone();
            tokio::spawn(async move { me.commit_delivered().await });
        }
        Ok(())
    }

    /// Commits the removals of delivered messages in batches until none is waiting. Each
    /// batch is taken before its commit starts, so every removal in it was written before
    /// the commit and is covered by it.
    async fn commit_delivered(&self) {
        loop {
            let batch = {
                let mut d = self.delivered.locked();
                if d.leases.is_empty() {
                    d.committing = false;
                    return;
                }
                std::mem::take(&mut d.leases)
            };
            match self.store.commit().await {
                Ok(()) => {
                    for mut lease in batch {
                        self.spool.remove(lease.id());
                        lease.end_finished();
                    }
                }
                Err(e) => {
                    for lease in batch {
                        tracing::error!(queue_id = %lease.id(), "cannot record a delivery: {e}");
                        lease.release(None);
                    }
                }
            }
        }
    }

    pub fn get(&self, id: MessageId) -> Result<Option<QueueRecord>, QueueError> {
        match self.store.get(Tree::Queue, &id.0.to_be_bytes())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| QueueError::Store(StoreError::Corrupt { key: id.to_string(), reason: e.to_string() })),
        }
    }

    /// Every queued record, oldest first. Loads them all: for tests and small queues only;
    /// listings page ([`Queue::page`]).
    #[cfg(test)]
    pub fn list(&self) -> Result<Vec<QueueRecord>, QueueError> {
        let mut out = Vec::new();
        for item in self.store.iter(Tree::Queue) {
            let (k, v) = item?;
            match serde_json::from_slice::<QueueRecord>(&v) {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!(key = ?k, error = %e, "unreadable queue record skipped"),
            }
        }
        Ok(out)
    }

    /// At most `limit` queued records, oldest first (ids sort by
    /// arrival), starting after the message `after`: a listing reads one page of the store,
    /// never the whole queue. `after` need not be queued any more (a cursor stays valid while
    /// messages leave).
    pub fn page(&self, after: Option<MessageId>, limit: usize) -> Result<Vec<QueueRecord>, QueueError> {
        let key = after.map(|id| id.0.to_be_bytes());
        let mut out = Vec::new();
        for (k, v) in self.store.page(Tree::Queue, key.as_ref().map(|k| &k[..]), limit)? {
            match serde_json::from_slice::<QueueRecord>(&v) {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!(key = ?k, error = %e, "unreadable queue record skipped"),
            }
        }
        Ok(out)
    }

    /// Commits a message's record while its delivery is under way (the lease stays held):
    /// the resumable state of a long send is durable before the step it protects.
    pub async fn save_progress(&self, lease: &Lease, r: &QueueRecord) -> Result<(), QueueError> {
        debug_assert_eq!(lease.id(), r.id);
        self.put(r)?;
        self.store.commit().await?;
        Ok(())
    }

    /// Saves a changed attempt count, error and time (after a deferral with the same
    /// recipients) and ends the lease, scheduling the message at its `next_attempt` (also when
    /// the save failed). Not committed: losing this update in a crash only means an earlier
    /// retry. A change of recipients goes through [`Queue::settle`].
    pub fn defer(&self, lease: Lease, r: &QueueRecord) -> Result<(), QueueError> {
        let put = self.put(r);
        lease.release(Some(r.next_attempt));
        put
    }

    fn schedule_at(&self, id: MessageId, at: i64, identity: &str) {
        let mut s = self.lock();
        let name = s.intern(identity);
        s.set(id, at, name);
        drop(s);
        self.wake.notify_one();
    }

    /// Takes up to `max` messages due at `now`, earliest first whatever their identity, each
    /// with its lease.
    pub fn take_due(&self, now: i64, max: usize) -> Vec<Lease> {
        let mut s = self.lock();
        let mut out = Vec::new();
        while out.len() < max {
            let earliest = s.due.iter().filter_map(|(name, set)| set.first().map(|&(at, _)| (at, name.clone()))).min();
            let Some((at, name)) = earliest else { break };
            if at > now {
                break;
            }
            out.extend(s.take_due_for(&name, now, 1));
        }
        drop(s);
        out.into_iter().map(|(id, name)| self.lease(id, name)).collect()
    }

    /// Takes up to `max` of `identity`'s messages due at `now`, earliest first, each with its
    /// lease: the runner feeds each identity up to its own limit.
    pub fn take_due_for(&self, identity: &str, now: i64, max: usize) -> Vec<Lease> {
        let taken = self.lock().take_due_for(identity, now, max);
        taken.into_iter().map(|(id, name)| self.lease(id, name)).collect()
    }

    /// Each identity with scheduled messages and when its earliest one is due ([`now_ms`]
    /// milliseconds). One entry per identity, not per message.
    pub fn due_heads(&self) -> Vec<(Arc<str>, i64)> {
        let s = self.lock();
        s.due.iter().filter_map(|(name, set)| set.first().map(|&(at, _)| (name.clone(), at))).collect()
    }

    /// When the earliest scheduled message is due ([`now_ms`] milliseconds).
    pub fn next_due(&self) -> Option<i64> {
        self.lock().due.values().filter_map(|set| set.first().map(|&(at, _)| at)).min()
    }

    /// Makes queued messages due now: one id, or all of them (`None`), or those of one
    /// identity. Returns how many. Walks the in-memory schedule (which knows each message's
    /// identity), not the store, and rewrites one record at a time: memory stays flat at any
    /// depth. Messages being attempted are left alone.
    pub async fn retry_now(&self, which: Option<MessageId>, identity: Option<&str>) -> Result<usize, QueueError> {
        let now = now_ms();
        let ids: Vec<MessageId> = match which {
            Some(id) => vec![id],
            None => {
                let s = self.lock();
                match identity {
                    Some(i) => s.due.get(i).map(|set| set.iter().map(|&(_, id)| id).collect()).unwrap_or_default(),
                    None => s.at.keys().copied().collect(),
                }
            }
        };
        let mut n = 0;
        for id in ids {
            // Taken like an attempt, so that no attempt settles it between the read and the
            // write below (a stale record would bring back delivered recipients).
            let Some(mut lease) = self.try_lease(id, None) else { continue };
            let mut r = match self.get(id) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    lease.release(None);
                    continue;
                }
                Err(e) => {
                    lease.release(None);
                    return Err(e);
                }
            };
            if identity.is_some_and(|i| i != r.identity) {
                lease.release(None);
                continue;
            }
            if *lease.identity != *r.identity {
                // Not scheduled before (one id named by the admin): schedule it under its own.
                lease.identity = self.lock().intern(&r.identity);
            }
            let put = if r.next_attempt > now {
                r.next_attempt = now;
                self.put(&r)
            } else {
                Ok(())
            };
            lease.release(Some(now));
            put?;
            n += 1;
        }
        if let Some(id) = which {
            if n == 0 && self.get(id)?.is_none() {
                return Err(QueueError::NotFound(id));
            }
        }
        // Only the time changed, but an offline `queue retry` exits right after.
        self.store.commit().await?;
        Ok(n)
    }

    /// Removes a message without delivering it (admin's `queue drop`): the record's removal is
    /// durable before the body goes.
    pub async fn drop_message(&self, id: MessageId) -> Result<(), QueueError> {
        let mut lease = self.try_lease(id, None).ok_or(QueueError::InFlight(id))?;
        match self.get(id) {
            Ok(Some(_)) => {}
            Ok(None) => {
                lease.release(None);
                return Err(QueueError::NotFound(id));
            }
            Err(e) => {
                lease.release(None);
                return Err(e);
            }
        }
        self.settle(&mut lease, None, None).await?;
        Ok(())
    }

    /// Arrival time (unix seconds) of the oldest queued message.
    pub fn oldest_received(&self) -> Option<i64> {
        let (_, v) = self.store.first(Tree::Queue).ok()??;
        serde_json::from_slice::<QueueRecord>(&v).ok().map(|r| r.received)
    }

    /// Number of queued messages: scheduled or being attempted. Counted from the schedule,
    /// not the database (sled counts a tree by walking it), so it is cheap enough for every
    /// scheduler round.
    pub fn depth(&self) -> usize {
        let s = self.lock();
        s.at.len() + s.in_flight.len()
    }

    /// Queued messages (scheduled or being attempted) of one identity, counted from the
    /// schedule.
    pub fn depth_of(&self, identity: &str) -> usize {
        let s = self.lock();
        s.due.get(identity).map_or(0, BTreeSet::len) + s.in_flight.values().filter(|n| ***n == *identity).count()
    }
}

/// Opens the queue under a data directory (spool + store); used by `run` and the offline CLI.
/// The database is opened first: its lock keeps a second process (an offline command while
/// the daemon runs, a second daemon on a shared volume) from touching the spool of the first.
pub async fn open_data_dir(data_dir: &Path) -> Result<(Arc<Store>, Arc<Queue>), QueueError> {
    crate::fsutil::create_private_dir(data_dir)?;
    let msg_dir = Spool::msg_dir_of(data_dir);
    let store = Arc::new(Store::open(data_dir, vec![msg_dir])?);
    let spool = Spool::open(data_dir)?;
    let queue = Arc::new(Queue::open(store.clone(), spool).await?);
    Ok((store, queue))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(q: &Queue) -> QueueRecord {
        QueueRecord {
            id: q.new_id(),
            received: 0,
            device: "d".into(),
            identity: "i".into(),
            client: "127.0.0.1".into(),
            from: "a@b.c".into(),
            original_from: "a@b.c".into(),
            bounce_to_sender: false,
            rcpts: vec!["x@y.z".into()],
            size: 5,
            eight_bit: false,
            attempts: 0,
            next_attempt: 0,
            destination: None,
            last_error: None,
            is_bounce: false,
            progress: Default::default(),
        }
    }

    #[tokio::test]
    async fn a_record_shown_to_the_admin_api_has_no_upload_url() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_store, q) = open_data_dir(dir.path()).await.expect("opens");
        let mut r = record(&q);
        r.progress = Progress::Gmail(crate::upstream::gmail::Resume {
            session: "https://gmail.googleapis.com/upload?upload_id=CAPABILITY".into(),
            offset: 8,
            total: 9,
        });
        let stored = serde_json::to_string(&r).expect("json");
        assert!(stored.contains("CAPABILITY"), "the store keeps it to resume");
        let shown = serde_json::to_string(&r.shown()).expect("json");
        assert!(!shown.contains("CAPABILITY") && !shown.contains("progress"), "{shown}");
    }

    /// A message for a@x.test and b@x.test, accepted (so in flight: the lease holds it).
    async fn accepted_for_two(q: &Queue) -> (QueueRecord, Lease) {
        let mut r = record(q);
        r.rcpts = vec!["a@x.test".into(), "b@x.test".into()];
        write_body(q, r.id).await;
        let lease = q.accept(&r).await.unwrap();
        (r, lease)
    }

    fn ids(leases: &[Lease]) -> Vec<MessageId> {
        leases.iter().map(Lease::id).collect()
    }

    async fn write_body(q: &Queue, id: MessageId) {
        let mut w = q.spool().writer(id);
        w.write(b"hello").await.unwrap();
        w.finish().await.unwrap();
    }

    #[tokio::test]
    async fn accept_defer_due_complete() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, q) = open_data_dir(dir.path()).await.unwrap();
        let r = record(&q);
        write_body(&q, r.id).await;
        let lease = q.accept(&r).await.unwrap();
        assert!(q.take_due(i64::MAX, 10).is_empty(), "in flight, not due");
        let mut r2 = r.clone();
        r2.attempts = 1;
        r2.next_attempt = 1000;
        q.defer(lease, &r2).unwrap();
        assert!(q.take_due(999, 10).is_empty());
        assert_eq!(q.next_due(), Some(1000));
        let mut taken = q.take_due(1000, 10);
        assert_eq!(ids(&taken), vec![r.id]);
        assert!(q.take_due(i64::MAX, 10).is_empty(), "taken once");
        assert_eq!(q.get(r.id).unwrap().unwrap().attempts, 1);
        q.settle(&mut taken[0], None, None).await.unwrap();
        assert_eq!(q.depth(), 0);
        assert!(!q.spool().path(r.id).exists());
    }

    #[tokio::test]
    async fn reopen_schedules_records_and_sets_orphans_aside() {
        let dir = tempfile::tempdir().unwrap();
        let kept;
        {
            let (_s, q) = open_data_dir(dir.path()).await.unwrap();
            let r = record(&q);
            write_body(&q, r.id).await;
            let _lease = q.accept(&r).await.unwrap();
            kept = r.id;
            // A body whose record never made it (crash before the commit).
            write_body(&q, q.new_id()).await;
        }
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        assert_eq!(q.spool().ids().unwrap(), vec![kept]);
        assert_eq!(q.set_aside_count(), 1, "the body without a record is kept aside, not deleted");
        assert_eq!(ids(&q.take_due(i64::MAX, 10)), vec![kept]);
        assert!(q.new_id() > kept, "ids keep increasing after a restart");
    }

    #[tokio::test]
    async fn ids_are_unique_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        let a = q.new_id();
        let b = q.new_id();
        assert!(b > a);
        assert_eq!(a.to_string().parse::<MessageId>().unwrap(), a);
        assert_eq!(a.to_string().len(), 16);
    }

    #[tokio::test]
    async fn a_record_readable_only_in_part_is_not_scheduled_and_its_body_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let (_s, q) = open_data_dir(dir.path()).await.unwrap();
            id = q.new_id();
            write_body(&q, id).await;
            // The fields the schedule needs are fine; the recipients are not.
            let damaged = format!(r#"{{"id":{},"device":"d","identity":"i","next_attempt":0,"rcpts":5}}"#, id.0);
            q.store.put(Tree::Queue, &id.0.to_be_bytes(), damaged.as_bytes()).unwrap();
            q.store.commit().await.unwrap();
        }
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        assert_eq!(q.depth(), 0, "never attempted (it could only fail, every minute, forever)");
        assert_eq!(q.set_aside_count(), 1, "its body is kept aside for the admin");
    }

    #[tokio::test]
    async fn reopen_removes_records_whose_body_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (id, kept);
        {
            let (_s, q) = open_data_dir(dir.path()).await.unwrap();
            let r = record(&q);
            write_body(&q, r.id).await;
            let _lease = q.accept(&r).await.unwrap();
            id = r.id;
            let r2 = record(&q);
            write_body(&q, r2.id).await;
            let _lease2 = q.accept(&r2).await.unwrap();
            kept = r2.id;
            // A crash after the body was removed but before the record's removal was durable.
            q.spool().remove(id);
        }
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        assert!(q.get(id).unwrap().is_none(), "record repaired at start-up");
        assert_eq!(q.list().unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), vec![kept]);
        assert_eq!(q.depth(), 1);
    }

    #[tokio::test]
    async fn settle_shortens_and_queues_the_bounce_in_one_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        let (r, mut lease) = accepted_for_two(&q).await;
        let mut next = r.clone();
        next.rcpts = vec!["b@x.test".into()];
        next.next_attempt = now_ms() + 60_000;
        let report = OwnMessage { body: b"report", identity: "i", device: "d", from: "i@x.test", to: "i@x.test" };
        let bounce = q.settle(&mut lease, Some(&next), Some(report)).await.unwrap().unwrap();
        drop(q);
        drop(_s);
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        assert_eq!(q.get(r.id).unwrap().unwrap().rcpts, vec!["b@x.test".to_string()]);
        let b = q.get(bounce).unwrap().unwrap();
        assert!(b.is_bounce);
        assert_eq!(std::fs::read(q.spool().path(bounce)).unwrap(), b"report");
    }

    #[test]
    fn stored_times_far_ahead_are_rebased() {
        let now = 1_000_000_000_000;
        assert_eq!(rebase_due(now + 1000, now), now + 1000);
        assert_eq!(rebase_due(now - 5000, now), now - 5000);
        assert_eq!(rebase_due(now + 30 * 24 * 3600 * 1000, now), now, "a clock stepped back: due now");
    }

    #[test]
    fn the_relay_clock_never_goes_back() {
        let a = now_ms();
        let b = now_ms();
        assert!(b >= a);
        assert!((a - chrono::Utc::now().timestamp_millis()).abs() < 60_000);
    }

    #[tokio::test]
    async fn retry_and_drop_leave_a_message_in_flight_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        let (r, mut lease) = accepted_for_two(&q).await;
        // An attempt is running: the admin can neither drop nor rewrite the record under it.
        assert!(matches!(q.drop_message(r.id).await, Err(QueueError::InFlight(_))));
        assert_eq!(q.retry_now(None, None).await.unwrap(), 0);
        // The attempt settles: a delivered, b left for later.
        let mut next = r.clone();
        next.rcpts = vec!["b@x.test".into()];
        next.next_attempt = now_ms() + 60_000;
        q.settle(&mut lease, Some(&next), None).await.unwrap();
        assert_eq!(q.retry_now(None, None).await.unwrap(), 1);
        assert_eq!(q.get(r.id).unwrap().unwrap().rcpts, vec!["b@x.test".to_string()], "no stale record written back");
        let taken = q.take_due(now_ms(), 10);
        assert_eq!(ids(&taken), vec![r.id]);
        taken.into_iter().for_each(|l| l.release(None));
        q.drop_message(r.id).await.unwrap();
        assert!(q.get(r.id).unwrap().is_none());
        assert_eq!(q.depth(), 0);
    }

    #[tokio::test]
    async fn a_dropped_lease_frees_its_message() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        let (r, lease) = accepted_for_two(&q).await;
        assert!(matches!(q.drop_message(r.id).await, Err(QueueError::InFlight(_))), "held");
        drop(lease);
        // Free again, and due again (a little later, so that a failing attempt does not spin).
        assert!(q.take_due(now_ms(), 10).is_empty(), "not at once");
        let taken = q.take_due(now_ms() + ABANDONED_RETRY_MS + 1000, 10);
        assert_eq!(ids(&taken), vec![r.id]);
        drop(taken);
        q.drop_message(r.id).await.unwrap();
        assert_eq!(q.depth(), 0);
    }

    #[tokio::test]
    async fn a_panicking_attempt_frees_its_message() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        let (r, lease) = accepted_for_two(&q).await;
        let attempt = tokio::spawn(async move {
            let _held = lease;
            panic!("an attempt that panics");
        });
        assert!(attempt.await.unwrap_err().is_panic());
        assert_eq!(q.depth(), 1, "still queued");
        assert_eq!(ids(&q.take_due(i64::MAX, 10)), vec![r.id], "no longer in flight");
        assert_eq!(q.retry_now(Some(r.id), None).await.unwrap(), 1);
        q.drop_message(r.id).await.unwrap();
    }

    /// A message of `identity`, due at `at`, committed and scheduled.
    async fn queued_for(q: &Queue, identity: &str, at: i64) -> QueueRecord {
        let mut r = record(q);
        r.identity = identity.into();
        r.next_attempt = at;
        write_body(q, r.id).await;
        let lease = q.accept(&r).await.unwrap();
        q.defer(lease, &r).unwrap();
        r
    }

    #[tokio::test]
    async fn one_identity_s_backlog_does_not_hide_another_s_due_message() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        let mut backlog = Vec::new();
        for i in 0..50 {
            backlog.push(queued_for(&q, "busy", 1000 + i).await.id);
        }
        let other = queued_for(&q, "quiet", 5000).await.id;
        let mut heads = q.due_heads();
        heads.sort();
        assert_eq!(heads, vec![(Arc::from("busy"), 1000), (Arc::from("quiet"), 5000)]);
        // The busy identity is served up to its own limit, earliest first...
        assert_eq!(ids(&q.take_due_for("busy", 10_000, 3)), backlog[..3].to_vec());
        // ...and the other identity's message is reached at once, behind 47 earlier ones.
        let quiet = q.take_due_for("quiet", 10_000, 3);
        assert_eq!(ids(&quiet), vec![other]);
        assert_eq!(quiet[0].identity(), "quiet");
        assert!(q.take_due_for("quiet", 10_000, 3).is_empty(), "taken once");
        assert_eq!(q.depth_of("busy"), 50, "in flight counts as queued");
        assert_eq!(q.depth_of("quiet"), 1);
        assert_eq!(q.depth(), 51);
        // A released message goes back under its own identity.
        quiet.into_iter().for_each(|l| l.release(Some(7000)));
        assert!(q.due_heads().contains(&(Arc::from("quiet"), 7000)));
    }

    #[tokio::test]
    async fn retry_by_identity_walks_the_schedule_not_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        let later = now_ms() + 3_600_000;
        let a1 = queued_for(&q, "a", later).await;
        let a2 = queued_for(&q, "a", later).await;
        let b = queued_for(&q, "b", later).await;
        // A record of identity a that the schedule does not know: a retry of a's mail that
        // scanned the store would find and schedule it.
        let mut stray = record(&q);
        stray.identity = "a".into();
        stray.next_attempt = later;
        q.put(&stray).unwrap();
        assert_eq!(q.retry_now(None, Some("a")).await.unwrap(), 2);
        let now = now_ms();
        let mut taken = ids(&q.take_due(now, 10));
        taken.sort();
        assert_eq!(taken, vec![a1.id, a2.id], "a's scheduled mail, nothing else");
        assert!(q.get(a1.id).unwrap().unwrap().next_attempt <= now, "the new time is stored too");
        assert_eq!(q.get(b.id).unwrap().unwrap().next_attempt, later, "b untouched");
        assert_eq!(q.get(stray.id).unwrap().unwrap().next_attempt, later, "the store was not scanned");
        // One id the admin names is found even when it is not scheduled.
        assert_eq!(q.retry_now(Some(stray.id), None).await.unwrap(), 1);
        assert_eq!(q.depth_of("a"), 3);
    }

    #[tokio::test]
    async fn pages_follow_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        let mut all = Vec::new();
        for _ in 0..5 {
            all.push(queued_for(&q, "i", 0).await.id);
        }
        let page_ids = |v: Vec<QueueRecord>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(page_ids(q.page(None, 2).unwrap()), all[..2]);
        assert_eq!(page_ids(q.page(Some(all[1]), 2).unwrap()), all[2..4]);
        assert_eq!(page_ids(q.page(Some(all[3]), 2).unwrap()), all[4..]);
        // The cursor's own message left the queue meanwhile: the next page is the same.
        q.drop_message(all[3]).await.unwrap();
        assert_eq!(page_ids(q.page(Some(all[3]), 2).unwrap()), all[4..]);
        assert!(q.page(Some(all[4]), 2).unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delivered_messages_are_committed_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        let mut done = Vec::new();
        for _ in 0..200 {
            let r = record(&q);
            write_body(&q, r.id).await;
            let lease = q.accept(&r).await.unwrap();
            q.finish_delivered(lease).unwrap();
            done.push(r.id);
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while q.depth() > 0 && Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(q.depth(), 0, "every lease ended once its removal was durable");
        assert!(done.iter().all(|id| !q.spool().path(*id).exists()), "bodies removed");
        assert!(q.page(None, 10).unwrap().is_empty());
        drop(q);
        drop(_s);
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        assert_eq!(q.depth(), 0, "and durable");
        assert_eq!(q.set_aside_count(), 0);
    }

    #[tokio::test]
    async fn opening_streams_a_deep_queue_into_the_schedule() {
        let dir = tempfile::tempdir().unwrap();
        let mut kept = Vec::new();
        {
            let (_s, q) = open_data_dir(dir.path()).await.unwrap();
            for i in 0..300 {
                kept.push(queued_for(&q, if i % 3 == 0 { "x" } else { "y" }, 1000 + i).await.id);
            }
        }
        let (_s, q) = open_data_dir(dir.path()).await.unwrap();
        assert_eq!((q.depth(), q.depth_of("x"), q.depth_of("y")), (300, 100, 200));
        let mut heads = q.due_heads();
        heads.sort();
        assert_eq!(heads, vec![(Arc::from("x"), 1000), (Arc::from("y"), 1001)]);
        assert_eq!(ids(&q.take_due(i64::MAX, 1000)), kept, "earliest first across identities");
    }
}
