//! The one module that owns the embedded database (sled).
//!
//! Everything durable except message bodies lives here: queue records, encrypted token
//! records, the mailbox poller's UID state. Keeping sled behind this small API means it could
//! be replaced (redb commits durably by default) without touching the rest.
//!
//! Durability (ARCHITECTURE.md, "Durability"): a write is durable only after
//! [`Store::commit`], which is a group commit: concurrent callers share one round of syncs.
//! sled's own flush is `pwrite` + `sync_file_range`, which reaches neither the disk's cache nor
//! the file's metadata (sled's real fsync runs on a 500 ms timer), so each commit is:
//! 1. fsync of the directories registered with [`Store::open`] (spool files renamed into them
//!    become durable together with the records that point at them);
//! 2. sled's flush (every write made before it is in the log file);
//! 3. `fdatasync` of sled's log file and of any blob files, which is what survives a power cut.
//!
//! Fail-stop: an error from sled or from a sync is never retried and trusted ("fsyncgate": after
//! a failed fsync the kernel may have dropped the dirty pages and a second fsync succeeds). The
//! store marks itself failed, every later write or commit fails at once, and [`Store::failed`]
//! wakes the daemon, which stops accepting and exits non-zero so that its service manager
//! restarts it on freshly opened files. Nothing that the failed commit covered was acknowledged.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::fsutil::sync_dir;

/// Errors of the database layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    #[error("sync of {path}: {source}")]
    Sync { path: PathBuf, source: std::io::Error },
    #[error("corrupt record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// Another process (a running daemon, an offline command) holds the data directory.
    #[error("database {path} is locked: another mfd-relay uses this data directory")]
    Locked { path: PathBuf },
    #[error("database lock {path}: {source}")]
    Lock { path: PathBuf, source: std::io::Error },
    /// An earlier write or sync failed; the process must restart (see the module docs).
    #[error("database unusable since an earlier failure ({0}); the relay is restarting")]
    Failed(String),
}

/// A key and its value.
pub type Record = (Vec<u8>, Vec<u8>);

/// One change of an atomic batch ([`Store::apply`]).
#[derive(Debug, Clone)]
pub enum Change {
    Put(Vec<u8>, Vec<u8>),
    Remove(Vec<u8>),
}

/// Which collection a record belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Tree {
    /// Queue records, keyed by message id (big-endian u64, so keys sort by arrival).
    Queue,
    /// Encrypted token records, keyed by identity name.
    Tokens,
    /// Mailbox poller state, keyed by mailbox name and UID.
    Imap,
}

/// The database.
pub struct Store {
    db: sled::Db,
    queue: sled::Tree,
    tokens: sled::Tree,
    imap: sled::Tree,
    /// sled's log file (`db/db`) and blob folder, fdatasynced by every commit.
    log_file: Arc<std::fs::File>,
    log_path: PathBuf,
    blobs_dir: PathBuf,
    sync_dirs: Vec<PathBuf>,
    /// Tickets handed out to writers that asked for a commit.
    tickets: AtomicU64,
    /// The highest ticket known durable; the lock serialises flushes.
    durable: tokio::sync::Mutex<u64>,
    /// Why the store became unusable, once it has.
    failure: OnceLock<String>,
    failed_tx: tokio::sync::watch::Sender<bool>,
    /// Holds the data directory's lock for as long as the store is open.
    _lock: std::fs::File,
}

/// Takes the exclusive lock of a data directory (`dir/db.lock`, created private).
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("db.lock");
    let err = |source| StoreError::Lock { path: path.clone(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(crate::fsutil::FILE_MODE)
        .open(&path)
        .map_err(err)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked { path }),
        Err(std::fs::TryLockError::Error(e)) => Err(err(e)),
    }
}

impl Store {
    /// Opens (or creates) the database in `dir/db`. `sync_dirs` are fsynced on every commit.
    /// The store first takes an exclusive lock on `dir/db.lock` ([`StoreError::Locked`] when
    /// another process holds it): a second process fails here, before it has touched anything
    /// else under `dir`. (sled locks its own files too, but reports that only as error text.)
    pub fn open(dir: &Path, sync_dirs: Vec<PathBuf>) -> Result<Store, StoreError> {
        let lock = lock_data_dir(dir)?;
        let path = dir.join("db");
        let db = sled::Config::new()
            .path(&path)
            // The relay reads back only recent records (an attempt right after acceptance or a
            // retry of one record at a time): a 4 MiB cache drains 100,000 queued messages as
            // fast as 16 MiB did, with 6 to 9 MiB less RSS (BENCHMARKS.md, "Draining a backlog").
            .cache_capacity(4 * 1024 * 1024)
            .open()
            .map_err(|source| StoreError::Open { path: path.clone(), source })?;
        let open_tree =
            |name: &str| db.open_tree(name).map_err(|source| StoreError::Open { path: path.clone(), source });
        let log_path = path.join("db");
        let sync_err = |p: &Path| {
            let p = p.to_path_buf();
            move |source| StoreError::Sync { path: p, source }
        };
        let log_file = std::fs::File::open(&log_path).map_err(sync_err(&log_path))?;
        // The files sled just created, and their names, are durable before anything is
        // acknowledged.
        log_file.sync_all().map_err(sync_err(&log_path))?;
        sync_dir(&path).map_err(sync_err(&path))?;
        sync_dir(dir).map_err(sync_err(dir))?;
        Ok(Store {
            queue: open_tree("queue")?,
            tokens: open_tree("tokens")?,
            imap: open_tree("imap")?,
            db,
            log_file: Arc::new(log_file),
            log_path,
            blobs_dir: path.join("blobs"),
            sync_dirs,
            tickets: AtomicU64::new(0),
            durable: tokio::sync::Mutex::new(0),
            failure: OnceLock::new(),
            failed_tx: tokio::sync::watch::channel(false).0,
            _lock: lock,
        })
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        match t {
            Tree::Queue => &self.queue,
            Tree::Tokens => &self.tokens,
            Tree::Imap => &self.imap,
        }
    }

    /// Marks the store unusable (see the module docs) and returns the error to pass on.
    fn fail(&self, e: StoreError) -> StoreError {
        if let StoreError::Failed(_) = e {
            return e;
        }
        let why = e.to_string();
        if self.failure.set(why.clone()).is_ok() {
            tracing::error!("database failure: {why}; no further message is acknowledged and the relay stops so that it can be restarted on freshly opened files");
            crate::metrics::STORE_FAILED.set(1);
            self.failed_tx.send_replace(true);
        }
        e
    }

    fn check(&self) -> Result<(), StoreError> {
        match self.failure.get() {
            Some(why) => Err(StoreError::Failed(why.clone())),
            None => Ok(()),
        }
    }

    /// Why the store became unusable, if it has.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }

    /// Resolves once the store has become unusable.
    pub async fn failed(&self) {
        let mut rx = self.failed_tx.subscribe();
        let _ = rx.wait_for(|f| *f).await;
    }

    pub fn put(&self, t: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.check()?;
        self.tree(t).insert(key, value).map_err(|e| self.fail(e.into()))?;
        Ok(())
    }

    pub fn get(&self, t: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(t).get(key).map_err(|e| self.fail(e.into()))?.map(|v| v.to_vec()))
    }

    pub fn remove(&self, t: Tree, key: &[u8]) -> Result<(), StoreError> {
        self.check()?;
        self.tree(t).remove(key).map_err(|e| self.fail(e.into()))?;
        Ok(())
    }

    /// Applies several changes to one tree atomically: after a crash either all of them or
    /// none are there (sled batches are atomic). Durable after the next [`Store::commit`].
    pub fn apply(&self, t: Tree, changes: &[Change]) -> Result<(), StoreError> {
        self.check()?;
        let mut batch = sled::Batch::default();
        for c in changes {
            match c {
                Change::Put(k, v) => batch.insert(k.as_slice(), v.as_slice()),
                Change::Remove(k) => batch.remove(k.as_slice()),
            }
        }
        self.tree(t).apply_batch(batch).map_err(|e| self.fail(e.into()))?;
        Ok(())
    }

    /// All records of a tree whose key starts with `prefix`, in key order.
    pub fn scan(&self, t: Tree, prefix: &[u8]) -> Result<Vec<Record>, StoreError> {
        self.tree(t)
            .scan_prefix(prefix)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(|e| self.fail(e.into())))
            .collect()
    }

    /// Every record of a tree in key order, one at a time: for a walk over a tree too large
    /// to hold in memory (opening a deep queue).
    pub fn iter(&self, t: Tree) -> impl Iterator<Item = Result<Record, StoreError>> + '_ {
        self.tree(t).iter().map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(|e| self.fail(e.into())))
    }

    /// Records of a tree in key order, starting after `after` (or at the start), at most
    /// `limit` of them: for listings that must not load a whole large tree.
    pub fn page(&self, t: Tree, after: Option<&[u8]>, limit: usize) -> Result<Vec<Record>, StoreError> {
        use std::ops::Bound;
        let range = match after {
            Some(k) => (Bound::Excluded(k.to_vec()), Bound::Unbounded),
            None => (Bound::Unbounded, Bound::Unbounded),
        };
        self.tree(t)
            .range::<Vec<u8>, _>(range)
            .take(limit)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(|e| self.fail(e.into())))
            .collect()
    }

    /// The first record of a tree in key order.
    pub fn first(&self, t: Tree) -> Result<Option<Record>, StoreError> {
        Ok(self.tree(t).first().map_err(|e| self.fail(e.into()))?.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    /// Number of records in a tree (sled walks the whole tree to count).
    pub fn len(&self, t: Tree) -> usize {
        self.tree(t).len()
    }

    /// Makes every write made before this call durable (group commit, see the module docs).
    pub async fn commit(&self) -> Result<(), StoreError> {
        self.check()?;
        let ticket = self.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        let mut durable = self.durable.lock().await;
        if *durable >= ticket {
            return Ok(());
        }
        // A commit that failed while this one waited covers nothing: never trust a later sync.
        self.check()?;
        // Every ticket up to here was taken after its write: this flush covers them all.
        let target = self.tickets.load(Ordering::SeqCst);
        // The folders and the database are independent: nothing is acknowledged before both
        // are synced, so their syncs run at the same time (one disk flush's latency, not two).
        let dirs = self.sync_dirs.clone();
        let folders = blocking(move || {
            for dir in &dirs {
                sync_dir(dir).map_err(|source| StoreError::Sync { path: dir.clone(), source })?;
            }
            Ok(())
        });
        let (log, log_path, blobs) = (self.log_file.clone(), self.log_path.clone(), self.blobs_dir.clone());
        let database = async {
            self.db.flush_async().await?;
            blocking(move || sync_log(&log, &log_path, &blobs)).await
        };
        let (folders, database) = tokio::join!(folders, database);
        folders.map_err(|e| self.fail(e))?;
        database.map_err(|e| self.fail(e))?;
        *durable = target;
        Ok(())
    }

    /// Flushes and syncs everything (shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.check()?;
        self.db.flush().map_err(|e| self.fail(e.into()))?;
        sync_log(&self.log_file, &self.log_path, &self.blobs_dir).map_err(|e| self.fail(e))
    }
}

/// fdatasync of sled's log file, then of every blob file (sled writes blobs, values too large
/// for its log, with no sync at all) and of the blob folder.
fn sync_log(log: &std::fs::File, log_path: &Path, blobs: &Path) -> Result<(), StoreError> {
    log.sync_data().map_err(|source| StoreError::Sync { path: log_path.to_path_buf(), source })?;
    let sync_err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::Sync { path: p, source }
    };
    let entries = match std::fs::read_dir(blobs) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(sync_err(blobs)(e)),
    };
    for entry in entries {
        let path = entry.map_err(sync_err(blobs))?.path();
        match std::fs::File::open(&path) {
            Ok(f) => f.sync_data().map_err(sync_err(&path))?,
            // sled removed a blob it no longer needs between the listing and the open.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(sync_err(&path)(e)),
        }
    }
    sync_dir(blobs).map_err(sync_err(blobs))
}

/// Runs blocking file-system work off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(join) => Err(StoreError::Sync { path: PathBuf::new(), source: std::io::Error::other(join.to_string()) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_scan_commit() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), vec![dir.path().to_path_buf()]).unwrap();
        s.put(Tree::Queue, &2u64.to_be_bytes(), b"two").unwrap();
        s.put(Tree::Queue, &1u64.to_be_bytes(), b"one").unwrap();
        s.put(Tree::Imap, b"m/1", b"x").unwrap();
        s.commit().await.unwrap();
        let all = s.scan(Tree::Queue, b"").unwrap();
        assert_eq!(all.iter().map(|(_, v)| v.as_slice()).collect::<Vec<_>>(), vec![&b"one"[..], b"two"]);
        assert_eq!(s.len(Tree::Queue), 2);
        s.remove(Tree::Queue, &1u64.to_be_bytes()).unwrap();
        assert_eq!(s.get(Tree::Queue, &1u64.to_be_bytes()).unwrap(), None);
        assert_eq!(s.scan(Tree::Imap, b"m/").unwrap().len(), 1);
    }

    #[test]
    fn a_second_open_of_a_data_directory_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path(), vec![]).unwrap();
        assert!(matches!(Store::open(dir.path(), vec![]), Err(StoreError::Locked { .. })));
        drop(first);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_share_flushes() {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Store::open(dir.path(), vec![]).unwrap());
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                s.put(Tree::Queue, &i.to_be_bytes(), b"v").unwrap();
                s.commit().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(s.len(Tree::Queue), 64);
    }
}
