//! Message bodies on disk: one file per queued message.
//!
//! A body is written to `spool/tmp/<id>` as it arrives, fsynced, then renamed to
//! `spool/msg/<id>`; the rename is made durable by the store's commit, which fsyncs
//! `spool/msg` before it flushes the queue record (see [`crate::store`]). So `spool/msg` only
//! ever holds complete bodies, and a body without a record (a crash before the commit) is an
//! orphan: the device got no 250 for it and sends again. Start-up never deletes such a body
//! (a damaged database could make a real message look like one): it moves it to
//! `spool/set-aside` and says so ([`super::Queue::open`]).
//!
//! Everything here is created private to the relay's user (folders 0700, files 0600),
//! whatever the umask: scans are often confidential.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::MessageId;
use crate::fsutil::{create_private_dir, sync_dir, FILE_MODE};

/// The spool directories.
#[derive(Debug, Clone)]
pub struct Spool {
    msg_dir: PathBuf,
    tmp_dir: PathBuf,
    set_aside_dir: PathBuf,
}

/// Bytes buffered before a write to the file; small messages are written in one go at the end.
const WRITE_BUFFER: usize = 256 * 1024;

impl Spool {
    /// The folder of complete bodies under a data directory.
    pub fn msg_dir_of(data_dir: &Path) -> PathBuf {
        data_dir.join("spool").join("msg")
    }

    /// Creates `data_dir/spool/{msg,tmp,set-aside}` as needed and empties `tmp`. Call it only
    /// while holding the database lock (see [`super::open_data_dir`]): `tmp` holds the bodies
    /// that the lock holder is receiving.
    pub fn open(data_dir: &Path) -> std::io::Result<Spool> {
        let spool = data_dir.join("spool");
        let s = Spool {
            msg_dir: Self::msg_dir_of(data_dir),
            tmp_dir: spool.join("tmp"),
            set_aside_dir: spool.join("set-aside"),
        };
        for d in [&spool, &s.msg_dir, &s.tmp_dir, &s.set_aside_dir] {
            create_private_dir(d)?;
        }
        for entry in std::fs::read_dir(&s.tmp_dir)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(s)
    }

    /// Where start-up puts bodies that have no queue record.
    pub fn set_aside_dir(&self) -> &Path {
        &self.set_aside_dir
    }

    /// Moves a body without a record out of the queue, durably.
    pub fn set_aside(&self, id: MessageId) -> std::io::Result<()> {
        std::fs::rename(self.path(id), self.set_aside_dir.join(id.to_string()))?;
        sync_dir(&self.set_aside_dir)?;
        sync_dir(&self.msg_dir)
    }

    /// Ids of the bodies set aside so far.
    pub fn set_aside_ids(&self) -> std::io::Result<Vec<MessageId>> {
        ids_in(&self.set_aside_dir)
    }

    /// The directory whose entries must be durable with the queue records.
    pub fn msg_dir(&self) -> &Path {
        &self.msg_dir
    }

    pub fn path(&self, id: MessageId) -> PathBuf {
        self.msg_dir.join(id.to_string())
    }

    /// Starts a new body.
    pub fn writer(&self, id: MessageId) -> SpoolWriter {
        SpoolWriter {
            tmp: self.tmp_dir.join(id.to_string()),
            dest: self.path(id),
            file: None,
            buf: Vec::with_capacity(8 * 1024),
            len: 0,
        }
    }

    /// Gives the body of `from` a second name, `to` (one message queued as several records:
    /// each record removes its own name). Durable with the next store commit, which syncs
    /// `spool/msg`.
    /// On a filesystem without hard links (some network and FUSE volumes) the body is
    /// copied instead: written under `tmp`, synced, then renamed, like a received body.
    pub fn link(&self, from: MessageId, to: MessageId) -> std::io::Result<()> {
        match std::fs::hard_link(self.path(from), self.path(to)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
            Err(_) => {
                let tmp = self.tmp_dir.join(to.to_string());
                std::fs::copy(self.path(from), &tmp)?;
                std::fs::OpenOptions::new().write(true).open(&tmp)?.sync_all()?;
                std::fs::rename(&tmp, self.path(to))
            }
        }
    }

    /// Removes a body (delivered, bounced or dropped).
    pub fn remove(&self, id: MessageId) {
        let _ = std::fs::remove_file(self.path(id));
    }

    /// Ids of every complete body on disk.
    pub fn ids(&self) -> std::io::Result<Vec<MessageId>> {
        ids_in(&self.msg_dir)
    }
}

fn ids_in(dir: &Path) -> std::io::Result<Vec<MessageId>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        if let Some(id) = entry?.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(id);
        }
    }
    Ok(out)
}

/// A body being written. Writes are buffered and done on the blocking pool, never on the
/// async workers; nothing touches the disk until the buffer fills or the body is finished.
pub struct SpoolWriter {
    tmp: PathBuf,
    dest: PathBuf,
    file: Option<std::fs::File>,
    buf: Vec<u8>,
    len: u64,
}

impl SpoolWriter {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends bytes.
    pub async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(data);
        self.len += data.len() as u64;
        if self.buf.len() >= WRITE_BUFFER {
            self.write_out(false).await?;
        }
        Ok(())
    }

    /// Writes the buffer to the file on the blocking pool; with `finish`, also fsyncs and
    /// renames the file into `msg/`.
    async fn write_out(&mut self, finish: bool) -> std::io::Result<()> {
        let file = self.file.take();
        let buf = std::mem::take(&mut self.buf);
        let tmp = self.tmp.clone();
        let dest = self.dest.clone();
        let (file, mut buf, res) = tokio::task::spawn_blocking(move || {
            let mut file = match file {
                Some(f) => f,
                None => match std::fs::OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(&tmp) {
                    Ok(f) => f,
                    Err(e) => return (None, buf, Err(e)),
                },
            };
            let res = file.write_all(&buf).and_then(|_| {
                if finish {
                    file.sync_data()?;
                    std::fs::rename(&tmp, &dest)?;
                }
                Ok(())
            });
            (Some(file), buf, res)
        })
        .await
        .map_err(std::io::Error::other)?;
        buf.clear();
        self.buf = buf;
        self.file = file;
        res
    }

    /// Makes the body complete: written, fsynced and renamed into the spool.
    pub async fn finish(mut self) -> std::io::Result<()> {
        let res = self.write_out(true).await;
        if res.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        res
    }

    /// Throws the partial body away.
    pub fn abort(self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn a_linked_body_outlives_the_removal_of_its_other_name() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let mut w = spool.writer(MessageId(1));
        w.write(b"scan").await.unwrap();
        w.finish().await.unwrap();
        spool.link(MessageId(1), MessageId(2)).unwrap();
        assert!(spool.link(MessageId(1), MessageId(2)).is_err(), "never over an existing body");
        spool.remove(MessageId(1));
        assert_eq!(std::fs::read(spool.path(MessageId(2))).unwrap(), b"scan");
        assert_eq!(spool.ids().unwrap(), vec![MessageId(2)]);
    }

    #[tokio::test]
    async fn write_finish_and_clean_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let id = MessageId(42);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("spool/msg")), 0o700);
        let mut w = spool.writer(id);
        w.write(b"hello ").await.unwrap();
        let big = vec![b'x'; WRITE_BUFFER + 10];
        w.write(&big).await.unwrap();
        assert!(!spool.path(id).exists(), "not visible before finish");
        w.finish().await.unwrap();
        assert_eq!(mode(&spool.path(id)), 0o600, "private whatever the umask");
        let body = std::fs::read(spool.path(id)).unwrap();
        assert_eq!(body.len(), 6 + WRITE_BUFFER + 10);
        assert_eq!(spool.ids().unwrap(), vec![id]);

        let mut w = spool.writer(MessageId(43));
        w.write(&big).await.unwrap();
        w.abort();
        assert_eq!(std::fs::read_dir(dir.path().join("spool/tmp")).unwrap().count(), 0);
        spool.remove(id);
        assert!(spool.ids().unwrap().is_empty());
    }
}
