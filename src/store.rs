//! The one module that owns the embedded database (sled).
//!
//! Everything durable except message bodies lives here: queue records, encrypted token
//! records, the mailbox poller's UID state. Keeping sled behind this small API means it could
//! be replaced (redb commits durably by default) without touching the rest.
//!
//! Durability: sled syncs by itself only every 500 ms, so a write is durable only after
//! [`Store::commit`]. `commit` is a group commit: concurrent callers share one flush (a sled
//! flush covers every write made before it), and before that flush the directories registered
//! with [`Store::open`] are fsynced, so spool files renamed into them are durable together with
//! the records that point at them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

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
}

/// A key and its value.
pub type Record = (Vec<u8>, Vec<u8>);

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
    sync_dirs: Vec<PathBuf>,
    /// Tickets handed out to writers that asked for a commit.
    tickets: AtomicU64,
    /// The highest ticket known durable; the lock serialises flushes.
    durable: tokio::sync::Mutex<u64>,
}

impl Store {
    /// Opens (or creates) the database in `dir/db`. `sync_dirs` are fsynced on every commit.
    pub fn open(dir: &Path, sync_dirs: Vec<PathBuf>) -> Result<Store, StoreError> {
        let path = dir.join("db");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(16 * 1024 * 1024)
            .open()
            .map_err(|source| StoreError::Open { path: path.clone(), source })?;
        let open_tree =
            |name: &str| db.open_tree(name).map_err(|source| StoreError::Open { path: path.clone(), source });
        Ok(Store {
            queue: open_tree("queue")?,
            tokens: open_tree("tokens")?,
            imap: open_tree("imap")?,
            db,
            sync_dirs,
            tickets: AtomicU64::new(0),
            durable: tokio::sync::Mutex::new(0),
        })
    }

    fn tree(&self, t: Tree) -> &sled::Tree {
        match t {
            Tree::Queue => &self.queue,
            Tree::Tokens => &self.tokens,
            Tree::Imap => &self.imap,
        }
    }

    pub fn put(&self, t: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tree(t).insert(key, value)?;
        Ok(())
    }

    pub fn get(&self, t: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree(t).get(key)?.map(|v| v.to_vec()))
    }

    pub fn remove(&self, t: Tree, key: &[u8]) -> Result<(), StoreError> {
        self.tree(t).remove(key)?;
        Ok(())
    }

    /// All records of a tree whose key starts with `prefix`, in key order.
    pub fn scan(&self, t: Tree, prefix: &[u8]) -> Result<Vec<Record>, StoreError> {
        self.tree(t)
            .scan_prefix(prefix)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(StoreError::from))
            .collect()
    }

    /// The first record of a tree in key order.
    pub fn first(&self, t: Tree) -> Result<Option<Record>, StoreError> {
        Ok(self.tree(t).first()?.map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    /// Number of records in a tree (sled walks the whole tree to count).
    pub fn len(&self, t: Tree) -> usize {
        self.tree(t).len()
    }

    /// Makes every write made before this call durable (group commit, see the module docs).
    pub async fn commit(&self) -> Result<(), StoreError> {
        let ticket = self.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        let mut durable = self.durable.lock().await;
        if *durable >= ticket {
            return Ok(());
        }
        // Every ticket up to here was taken after its write: this flush covers them all.
        let target = self.tickets.load(Ordering::SeqCst);
        for dir in &self.sync_dirs {
            let dir = dir.clone();
            let res = tokio::task::spawn_blocking(move || {
                std::fs::File::open(&dir)
                    .and_then(|f| f.sync_all())
                    .map_err(|source| StoreError::Sync { path: dir, source })
            })
            .await;
            match res {
                Ok(r) => r?,
                Err(join) => {
                    return Err(StoreError::Sync {
                        path: PathBuf::new(),
                        source: std::io::Error::other(join.to_string()),
                    })
                }
            }
        }
        self.db.flush_async().await?;
        *durable = target;
        Ok(())
    }

    /// Flushes everything (shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
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
