//! Durable acceptance and the retry schedule.
//!
//! A message is accepted when its body is in the spool ([`spool`]) and its record (envelope,
//! device, identity, attempts, next try) is committed to the store: only then may a device get
//! a 250 (DESIGN rule 1). The queue also keeps an in-memory schedule of when each message is
//! due, and which ones are being attempted right now, so that the in-session attempt and the
//! background retries never deliver the same message at the same time.

pub mod bounce;
pub mod spool;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::store::{Store, StoreError, Tree};
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
    /// Envelope sender the device gave (bounces go there unless `bounce_to` is set).
    pub original_from: String,
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
}

#[derive(Default)]
struct Schedule {
    /// (due time in unix ms, id), earliest first.
    due: BTreeSet<(i64, MessageId)>,
    at: HashMap<MessageId, i64>,
    /// Being attempted now: not due, whatever their time.
    in_flight: HashSet<MessageId>,
}

/// The queue: store records, spool bodies and the schedule.
pub struct Queue {
    store: Arc<Store>,
    spool: Spool,
    schedule: Mutex<Schedule>,
    last_id: AtomicU64,
    /// Woken when a message becomes due earlier than the scheduler thought.
    pub wake: Notify,
}

/// Current time in unix milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Queue {
    /// Opens the queue: loads the schedule from the store, removes orphaned bodies, and
    /// reports records whose body is missing.
    pub fn open(store: Arc<Store>, spool: Spool) -> Result<Queue, QueueError> {
        let q = Queue {
            store,
            spool,
            schedule: Mutex::new(Schedule::default()),
            last_id: AtomicU64::new(0),
            wake: Notify::new(),
        };
        let records = q.list()?;
        let known: HashSet<MessageId> = records.iter().map(|r| r.id).collect();
        for id in q.spool.ids()? {
            if !known.contains(&id) {
                tracing::info!(queue_id = %id, "removing a body without a queue record (accepted with no 250 before a crash)");
                q.spool.remove(id);
            }
        }
        let mut s = q.lock();
        for r in &records {
            if !q.spool.path(r.id).exists() {
                tracing::error!(queue_id = %r.id, "queue record without a body in the spool; it cannot be delivered");
                continue;
            }
            s.due.insert((r.next_attempt, r.id));
            s.at.insert(r.id, r.next_attempt);
        }
        drop(s);
        if let Some(max) = records.iter().map(|r| r.id.0).max() {
            q.last_id.store(max, Ordering::SeqCst);
        }
        Ok(q)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// A new unique id, later than every earlier one.
    pub fn new_id(&self) -> MessageId {
        let now = chrono::Utc::now().timestamp_micros().max(0) as u64;
        let mut last = self.last_id.load(Ordering::SeqCst);
        loop {
            let next = now.max(last + 1);
            match self.last_id.compare_exchange(last, next, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return MessageId(next),
                Err(actual) => last = actual,
            }
        }
    }

    fn put(&self, r: &QueueRecord) -> Result<(), QueueError> {
        let value =
            serde_json::to_vec(r).map_err(|e| StoreError::Corrupt { key: r.id.to_string(), reason: e.to_string() })?;
        self.store.put(Tree::Queue, &r.id.0.to_be_bytes(), &value)?;
        Ok(())
    }

    /// Makes an accepted message durable (its body must already be finished in the spool).
    /// The message is marked in flight: the caller attempts it, then calls [`Queue::release`]
    /// or [`Queue::complete`].
    pub async fn accept(&self, r: &QueueRecord) -> Result<(), QueueError> {
        self.put(r)?;
        self.lock().in_flight.insert(r.id);
        if let Err(e) = self.store.commit().await {
            self.lock().in_flight.remove(&r.id);
            let _ = self.store.remove(Tree::Queue, &r.id.0.to_be_bytes());
            return Err(e.into());
        }
        Ok(())
    }

    /// Queues a message the relay writes itself (a bounce, an answer to a refused print
    /// job): spools `body`, commits its record and schedules it now. Such messages are never
    /// bounced or answered in turn. Returns its id.
    pub async fn enqueue_own(
        &self,
        body: &[u8],
        identity: &str,
        device: &str,
        from: &str,
        to: &str,
    ) -> Result<MessageId, QueueError> {
        let id = self.new_id();
        let mut w = self.spool.writer(id);
        w.write(body).await?;
        w.finish().await?;
        let r = QueueRecord {
            id,
            received: chrono::Utc::now().timestamp(),
            device: device.to_string(),
            identity: identity.to_string(),
            client: "mfd-relay".into(),
            from: from.to_string(),
            original_from: String::new(),
            rcpts: vec![to.to_string()],
            size: body.len() as u64,
            eight_bit: !body.is_ascii(),
            attempts: 0,
            next_attempt: now_ms(),
            last_error: None,
            is_bounce: true,
        };
        self.put(&r)?;
        if let Err(e) = self.store.commit().await {
            let _ = self.store.remove(Tree::Queue, &id.0.to_be_bytes());
            self.spool.remove(id);
            return Err(e.into());
        }
        self.schedule_at(id, r.next_attempt);
        Ok(id)
    }

    pub fn get(&self, id: MessageId) -> Result<Option<QueueRecord>, QueueError> {
        match self.store.get(Tree::Queue, &id.0.to_be_bytes())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| QueueError::Store(StoreError::Corrupt { key: id.to_string(), reason: e.to_string() })),
        }
    }

    /// Every queued record, oldest first.
    pub fn list(&self) -> Result<Vec<QueueRecord>, QueueError> {
        let mut out = Vec::new();
        for (k, v) in self.store.scan(Tree::Queue, b"")? {
            match serde_json::from_slice::<QueueRecord>(&v) {
                Ok(r) => out.push(r),
                Err(e) => tracing::error!(key = ?k, error = %e, "unreadable queue record skipped"),
            }
        }
        Ok(out)
    }

    /// Saves a changed record (after a deferral) and schedules it. Not flushed: losing this
    /// update in a crash only means an earlier retry.
    pub fn defer(&self, r: &QueueRecord) -> Result<(), QueueError> {
        self.put(r)?;
        self.release(r.id, Some(r.next_attempt));
        Ok(())
    }

    /// The message is finished (delivered, failed and reported, or dropped): record and body
    /// go. Not flushed: a crash right after may deliver it again (at least once, never lost).
    pub fn complete(&self, id: MessageId) -> Result<(), QueueError> {
        self.store.remove(Tree::Queue, &id.0.to_be_bytes())?;
        self.spool.remove(id);
        let mut s = self.lock();
        s.in_flight.remove(&id);
        if let Some(at) = s.at.remove(&id) {
            s.due.remove(&(at, id));
        }
        Ok(())
    }

    /// Ends an attempt; `next` schedules the message again (unix ms).
    pub fn release(&self, id: MessageId, next: Option<i64>) {
        self.lock().in_flight.remove(&id);
        if let Some(at) = next {
            self.schedule_at(id, at);
        }
    }

    fn schedule_at(&self, id: MessageId, at: i64) {
        let mut s = self.lock();
        if let Some(old) = s.at.insert(id, at) {
            s.due.remove(&(old, id));
        }
        s.due.insert((at, id));
        drop(s);
        self.wake.notify_one();
    }

    /// Takes up to `max` messages due at `now` and marks them in flight.
    pub fn take_due(&self, now: i64, max: usize) -> Vec<MessageId> {
        let mut s = self.lock();
        let mut out = Vec::new();
        while out.len() < max {
            let Some(&(at, id)) = s.due.iter().next() else { break };
            if at > now {
                break;
            }
            s.due.remove(&(at, id));
            s.at.remove(&id);
            if s.in_flight.insert(id) {
                out.push(id);
            }
        }
        out
    }

    /// When the earliest scheduled message is due (unix ms).
    pub fn next_due(&self) -> Option<i64> {
        self.lock().due.iter().next().map(|(at, _)| *at)
    }

    /// Makes queued messages due now: one id, or all of them (`None`), or those of one
    /// identity. Returns how many.
    pub fn retry_now(&self, which: Option<MessageId>, identity: Option<&str>) -> Result<usize, QueueError> {
        let now = now_ms();
        let mut n = 0;
        for mut r in self.list()? {
            if which.is_some_and(|id| id != r.id) || identity.is_some_and(|i| i != r.identity) {
                continue;
            }
            let in_flight = self.lock().in_flight.contains(&r.id);
            if in_flight {
                continue;
            }
            r.next_attempt = now;
            self.put(&r)?;
            self.schedule_at(r.id, now);
            n += 1;
        }
        if let Some(id) = which {
            if n == 0 && self.get(id)?.is_none() {
                return Err(QueueError::NotFound(id));
            }
        }
        Ok(n)
    }

    /// Removes a message without delivering it (admin's `queue drop`).
    pub fn drop_message(&self, id: MessageId) -> Result<(), QueueError> {
        if self.get(id)?.is_none() {
            return Err(QueueError::NotFound(id));
        }
        self.complete(id)
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
}

/// Opens the queue under a data directory (spool + store); used by `run` and the offline CLI.
pub fn open_data_dir(data_dir: &Path) -> Result<(Arc<Store>, Arc<Queue>), QueueError> {
    std::fs::create_dir_all(data_dir)?;
    let spool = Spool::open(data_dir)?;
    let store = Arc::new(Store::open(data_dir, vec![spool.msg_dir().to_path_buf()])?);
    let queue = Arc::new(Queue::open(store.clone(), spool)?);
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
            rcpts: vec!["x@y.z".into()],
            size: 5,
            eight_bit: false,
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            is_bounce: false,
        }
    }

    async fn write_body(q: &Queue, id: MessageId) {
        let mut w = q.spool().writer(id);
        w.write(b"hello").await.unwrap();
        w.finish().await.unwrap();
    }

    #[tokio::test]
    async fn accept_defer_due_complete() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, q) = open_data_dir(dir.path()).unwrap();
        let r = record(&q);
        write_body(&q, r.id).await;
        q.accept(&r).await.unwrap();
        assert!(q.take_due(i64::MAX, 10).is_empty(), "in flight, not due");
        let mut r2 = r.clone();
        r2.attempts = 1;
        r2.next_attempt = 1000;
        q.defer(&r2).unwrap();
        assert!(q.take_due(999, 10).is_empty());
        assert_eq!(q.next_due(), Some(1000));
        assert_eq!(q.take_due(1000, 10), vec![r.id]);
        assert!(q.take_due(i64::MAX, 10).is_empty(), "taken once");
        assert_eq!(q.get(r.id).unwrap().unwrap().attempts, 1);
        q.complete(r.id).unwrap();
        assert_eq!(q.depth(), 0);
        assert!(!q.spool().path(r.id).exists());
    }

    #[tokio::test]
    async fn reopen_schedules_records_and_removes_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let kept;
        {
            let (_s, q) = open_data_dir(dir.path()).unwrap();
            let r = record(&q);
            write_body(&q, r.id).await;
            q.accept(&r).await.unwrap();
            kept = r.id;
            // A body whose record never made it (crash before the commit).
            write_body(&q, q.new_id()).await;
        }
        let (_s, q) = open_data_dir(dir.path()).unwrap();
        assert_eq!(q.spool().ids().unwrap(), vec![kept]);
        assert_eq!(q.take_due(i64::MAX, 10), vec![kept]);
        assert!(q.new_id() > kept, "ids keep increasing after a restart");
    }

    #[test]
    fn ids_are_unique_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, q) = open_data_dir(dir.path()).unwrap();
        let a = q.new_id();
        let b = q.new_id();
        assert!(b > a);
        assert_eq!(a.to_string().parse::<MessageId>().unwrap(), a);
        assert_eq!(a.to_string().len(), 16);
    }
}
