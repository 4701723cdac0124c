//! What a mailbox poller remembers, in the store's `imap` tree.
//!
//! IMAP names a message by its UID, which is only meaningful together with the mailbox's
//! UIDVALIDITY (RFC 3501 2.3.1.1): UIDs strictly ascend and are never reused while
//! UIDVALIDITY stays; when it changes, every UID the client knew is void.
//!
//! The records belong to the folder, not to the `[[mailbox]]` section that polls it: they are
//! keyed by the identity and the folder (INBOX in upper case, RFC 3501 5.1), so renaming a
//! section does not make the relay forget what it printed. The prefix is
//! `%id/<identity>/<folder>/`, each part with `%` and `/` percent-encoded, so that one
//! prefix never covers another's. Relays before this keyed the records by the section's name
//! (`<mailbox>/`, same encoding, which never starts with `%i`); [`MailboxState::open`] moves
//! such records to the new prefix the first time.
//!
//! | key                              | value                                             |
//! |----------------------------------|---------------------------------------------------|
//! | `<prefix>uidvalidity`            | the UIDVALIDITY the records below belong to (decimal) |
//! | `<prefix>floor`                  | `<uidvalidity>:<uid>`: mail below this UID is not printed (`mailbox reset --from-now`) |
//! | `<prefix>uid/<uid, 10 digits>`   | [`UidRecord`] as JSON                             |
//! | `<prefix>carry/<message key>`    | [`UidRecord`] of a message seen under an earlier UIDVALIDITY |
//!
//! A record is written, and committed, *before* the action it announces: `Spooling` before
//! the job folder is written (so a crash never writes a second job for the same mail),
//! `Spooled`/`Refused` before `after` is applied upstream (so a restart applies it), and
//! `handoff = started` before the print command runs (so a crash never prints twice).
//!
//! When UIDVALIDITY changes, the records still open become "carried" under their message key
//! (the SHA-256 of the Message-ID, or of the header section without one): a message that
//! shows up again under a new UID with the same key is recognised instead of printed twice.
//! Records of UIDs no longer in the mailbox are pruned at each check; carried records after
//! [`CARRY_DAYS`].

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError, Tree};

/// Carried records are forgotten after this many days.
pub const CARRY_DAYS: i64 = 30;

/// Where a message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The job folder is being written under `job`.
    Spooling,
    /// The job folder `job` is complete.
    Spooled,
    /// Not printed, for `reason`.
    Refused,
}

/// The print command's progress for a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Handoff {
    /// No command configured (or a refused mail).
    #[default]
    None,
    /// To be run.
    Pending,
    /// Started; if the relay stops now it is not run again (at most once: never print twice).
    Started,
    Done,
}

/// What is known about one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UidRecord {
    pub stage: Stage,
    /// The message key (see the module docs).
    pub key: String,
    /// The job folder's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether `after` (delete, seen, move) has been applied upstream.
    #[serde(default)]
    pub after_applied: bool,
    #[serde(default)]
    pub handoff: Handoff,
    /// Unix seconds of the last change.
    pub at: i64,
}

/// The key that recognises a message across UIDVALIDITY changes.
pub fn message_key(message_id: Option<&str>, header: &[u8]) -> String {
    let mut h = Sha256::new();
    match message_id.map(str::trim).filter(|m| !m.is_empty()) {
        Some(id) => {
            h.update(b"message-id:");
            h.update(id.as_bytes());
        }
        None => {
            h.update(b"header:");
            h.update(header);
        }
    }
    hex(&h.finalize())
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The mailbox name as a key prefix: `%` and `/` percent-encoded.
pub fn key_prefix(mailbox: &str) -> String {
    let mut out = String::with_capacity(mailbox.len() + 1);
    for c in mailbox.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out.push('/');
    out
}

fn uid_key(prefix: &str, uid: u32) -> String {
    format!("{prefix}uid/{uid:010}")
}

/// The folder's name as the key uses it: INBOX is case-insensitive (RFC 3501 5.1).
pub use crate::config::folder_key;

/// The key prefix of the records of `folder` of `identity`.
pub fn folder_prefix(identity: &str, folder: &str) -> String {
    format!("%id/{}{}", key_prefix(identity), key_prefix(folder_key(folder)))
}

/// One folder's records.
pub struct MailboxState {
    store: Arc<Store>,
    prefix: String,
}

impl MailboxState {
    /// The records at a raw key prefix (tests).
    pub fn new(store: Arc<Store>, prefix: &str) -> MailboxState {
        MailboxState { store, prefix: prefix.to_string() }
    }

    /// The records of `folder` of `identity`. Records an older relay kept under the name of
    /// the `[[mailbox]]` section `legacy_name` are moved here first (committed), unless this
    /// folder already has records of its own.
    pub async fn open(
        store: Arc<Store>,
        identity: &str,
        folder: &str,
        legacy_name: &str,
    ) -> Result<MailboxState, StoreError> {
        let state = MailboxState { store, prefix: folder_prefix(identity, folder) };
        let legacy = key_prefix(legacy_name);
        let mine = state.store.scan(Tree::Imap, state.prefix.as_bytes())?;
        if mine.is_empty() {
            let old = state.store.scan(Tree::Imap, legacy.as_bytes())?;
            if !old.is_empty() {
                // One atomic batch: a crash half-way must not leave some records under each key.
                let mut changes = Vec::with_capacity(old.len() * 2);
                for (k, v) in &old {
                    let rest = &k[legacy.len()..];
                    let mut key = state.prefix.as_bytes().to_vec();
                    key.extend_from_slice(rest);
                    changes.push(crate::store::Change::Put(key, v.clone()));
                    changes.push(crate::store::Change::Remove(k.clone()));
                }
                state.store.apply(Tree::Imap, &changes)?;
                state.store.commit().await?;
                tracing::info!(
                    mailbox = legacy_name,
                    records = old.len(),
                    "mailbox state moved to its identity and folder"
                );
            }
        }
        Ok(state)
    }

    /// The first UID to print under `uidvalidity`, if `mailbox reset --from-now` set one.
    pub fn floor(&self, uidvalidity: u32) -> Result<Option<u32>, StoreError> {
        let key = format!("{}floor", self.prefix);
        let Some(v) = self.store.get(Tree::Imap, key.as_bytes())? else { return Ok(None) };
        let text = String::from_utf8_lossy(&v);
        let parsed = text.split_once(':').and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
        Ok(parsed.filter(|(v, _)| *v == uidvalidity).map(|(_, uid)| uid))
    }

    /// Starts the folder from "now": mail with a UID below `uidnext` under `uidvalidity` is
    /// never printed. Records of messages already handled stay (their jobs finish).
    /// Committed before it returns.
    pub async fn set_floor(&self, uidvalidity: u32, uidnext: u32) -> Result<(), StoreError> {
        if self.uidvalidity()? != Some(uidvalidity) {
            self.adopt_uidvalidity(uidvalidity, chrono::Utc::now().timestamp()).await?;
        }
        let key = format!("{}floor", self.prefix);
        self.store.put(Tree::Imap, key.as_bytes(), format!("{uidvalidity}:{uidnext}").as_bytes())?;
        self.store.commit().await
    }

    fn decode(&self, key: &[u8], value: &[u8]) -> Result<UidRecord, StoreError> {
        serde_json::from_slice(value)
            .map_err(|e| StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), reason: e.to_string() })
    }

    fn encode(rec: &UidRecord) -> Vec<u8> {
        // A struct of strings, numbers and enums always serialises.
        serde_json::to_vec(rec).unwrap_or_default()
    }

    pub fn uidvalidity(&self) -> Result<Option<u32>, StoreError> {
        let key = format!("{}uidvalidity", self.prefix);
        Ok(self.store.get(Tree::Imap, key.as_bytes())?.and_then(|v| String::from_utf8(v).ok()?.parse().ok()))
    }

    /// Adopts the server's UIDVALIDITY. When it differs from the stored one, every UID record
    /// is void (RFC 3501 2.3.1.1): each is carried under its message key instead, and the
    /// number carried is returned. Committed before it returns.
    pub async fn adopt_uidvalidity(&self, value: u32, now: i64) -> Result<Option<usize>, StoreError> {
        let stored = self.uidvalidity()?;
        if stored == Some(value) {
            return Ok(None);
        }
        let mut carried = 0;
        for (uid, rec) in self.records()? {
            if stored.is_some() {
                let key = format!("{}carry/{}", self.prefix, rec.key);
                self.store.put(Tree::Imap, key.as_bytes(), &Self::encode(&UidRecord { at: now, ..rec }))?;
                carried += 1;
            }
            self.store.remove(Tree::Imap, uid_key(&self.prefix, uid).as_bytes())?;
        }
        let key = format!("{}uidvalidity", self.prefix);
        self.store.put(Tree::Imap, key.as_bytes(), value.to_string().as_bytes())?;
        self.store.commit().await?;
        Ok(stored.map(|_| carried))
    }

    /// Every UID record, by UID.
    pub fn records(&self) -> Result<BTreeMap<u32, UidRecord>, StoreError> {
        let prefix = format!("{}uid/", self.prefix);
        let mut out = BTreeMap::new();
        for (k, v) in self.store.scan(Tree::Imap, prefix.as_bytes())? {
            let uid = std::str::from_utf8(&k[prefix.len()..]).ok().and_then(|s| s.parse().ok()).ok_or_else(|| {
                StoreError::Corrupt { key: String::from_utf8_lossy(&k).into_owned(), reason: "not a UID".into() }
            })?;
            out.insert(uid, self.decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Writes a record (durable after [`MailboxState::commit`]).
    pub fn put(&self, uid: u32, rec: &UidRecord) -> Result<(), StoreError> {
        self.store.put(Tree::Imap, uid_key(&self.prefix, uid).as_bytes(), &Self::encode(rec))
    }

    /// Writes a record and makes it durable.
    pub async fn record(&self, uid: u32, rec: &UidRecord) -> Result<(), StoreError> {
        self.put(uid, rec)?;
        self.store.commit().await
    }

    pub fn remove(&self, uid: u32) -> Result<(), StoreError> {
        self.store.remove(Tree::Imap, uid_key(&self.prefix, uid).as_bytes())
    }

    /// The carried record of a message seen under an earlier UIDVALIDITY, removed from the
    /// carry list (the caller records it under the new UID in the same commit).
    pub fn take_carried(&self, key: &str) -> Result<Option<UidRecord>, StoreError> {
        let k = format!("{}carry/{key}", self.prefix);
        match self.store.get(Tree::Imap, k.as_bytes())? {
            None => Ok(None),
            Some(v) => {
                let rec = self.decode(k.as_bytes(), &v)?;
                self.store.remove(Tree::Imap, k.as_bytes())?;
                Ok(Some(rec))
            }
        }
    }

    /// Forgets carried records older than [`CARRY_DAYS`]; returns how many.
    pub fn prune_carried(&self, now: i64) -> Result<usize, StoreError> {
        let prefix = format!("{}carry/", self.prefix);
        let mut n = 0;
        for (k, v) in self.store.scan(Tree::Imap, prefix.as_bytes())? {
            let old = self.decode(&k, &v).map(|r| now - r.at > CARRY_DAYS * 86400).unwrap_or(true);
            if old {
                self.store.remove(Tree::Imap, &k)?;
                n += 1;
            }
        }
        Ok(n)
    }

    pub async fn commit(&self) -> Result<(), StoreError> {
        self.store.commit().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(stage: Stage, key: &str) -> UidRecord {
        UidRecord {
            stage,
            key: key.into(),
            job: Some("j".into()),
            reason: None,
            after_applied: false,
            handoff: Handoff::None,
            at: 1000,
        }
    }

    #[test]
    fn keys_are_escaped_and_sortable() {
        assert_eq!(key_prefix("print"), "print/");
        assert_eq!(key_prefix("a/b%c"), "a%2Fb%25c/");
        assert_eq!(uid_key("print/", 42), "print/uid/0000000042");
        assert!(uid_key("p/", 9) < uid_key("p/", 10));
        assert!(uid_key("p/", u32::MAX).len() == "p/uid/".len() + 10);
    }

    #[test]
    fn message_keys() {
        let a = message_key(Some("<1@x>"), b"From: a\r\n");
        assert_eq!(a, message_key(Some(" <1@x> "), b"other header"));
        assert_ne!(a, message_key(Some("<2@x>"), b"From: a\r\n"));
        assert_ne!(message_key(None, b"From: a\r\n"), message_key(None, b"From: b\r\n"));
        assert_eq!(a.len(), 64);
    }

    #[test]
    fn state_is_keyed_by_identity_and_folder() {
        assert_eq!(folder_prefix("print", "INBOX"), "%id/print/INBOX/");
        assert_eq!(folder_prefix("print", "inbox"), folder_prefix("print", "INBOX"));
        assert_ne!(folder_prefix("print", "Print"), folder_prefix("print", "print"));
        assert_eq!(folder_prefix("a/b", "x/y"), "%id/a%2Fb/x%2Fy/");
        assert_ne!(folder_prefix("a", "b/c"), folder_prefix("a/b", "c"));
        // No section name (old layout) can produce the new prefix.
        for name in ["%id", "%id/print/INBOX", "%"] {
            assert!(!key_prefix(name).starts_with("%id/"), "{name}");
        }
    }

    #[tokio::test]
    async fn records_keyed_by_section_name_are_moved_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), vec![]).unwrap());
        // An older relay's records of the section "print", and of another section.
        let old = MailboxState::new(store.clone(), &key_prefix("print"));
        old.adopt_uidvalidity(7, 0).await.unwrap();
        old.record(3, &rec(Stage::Spooled, "k3")).await.unwrap();
        let other = MailboxState::new(store.clone(), &key_prefix("print2"));
        other.adopt_uidvalidity(9, 0).await.unwrap();
        let s = MailboxState::open(store.clone(), "print-id", "inbox", "print").await.unwrap();
        assert_eq!(s.uidvalidity().unwrap(), Some(7));
        assert_eq!(s.records().unwrap().keys().copied().collect::<Vec<_>>(), [3]);
        assert_eq!(old.uidvalidity().unwrap(), None, "moved, not copied");
        assert_eq!(other.uidvalidity().unwrap(), Some(9), "another section's records stay");
        // The section renamed: its folder's records are found all the same.
        let renamed = MailboxState::open(store.clone(), "print-id", "INBOX", "mobile").await.unwrap();
        assert_eq!(renamed.records().unwrap().len(), 1);
        // A folder with records of its own never takes a section's leftovers.
        old.adopt_uidvalidity(8, 0).await.unwrap();
        let again = MailboxState::open(store, "print-id", "INBOX", "print").await.unwrap();
        assert_eq!(again.uidvalidity().unwrap(), Some(7));
    }

    #[tokio::test]
    async fn floor_belongs_to_its_uidvalidity() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), vec![]).unwrap());
        let s = MailboxState::open(store, "id", "INBOX", "print").await.unwrap();
        assert_eq!(s.floor(7).unwrap(), None);
        s.set_floor(7, 42).await.unwrap();
        assert_eq!(s.uidvalidity().unwrap(), Some(7));
        assert_eq!(s.floor(7).unwrap(), Some(42));
        assert_eq!(s.floor(8).unwrap(), None, "void under another UIDVALIDITY");
    }

    #[tokio::test]
    async fn uidvalidity_change_carries_open_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), vec![]).unwrap());
        let s = MailboxState::new(store.clone(), &key_prefix("print"));
        let other = MailboxState::new(store, &key_prefix("print/2"));
        assert_eq!(s.uidvalidity().unwrap(), None);
        assert_eq!(s.adopt_uidvalidity(7, 0).await.unwrap(), None, "first sight carries nothing");
        s.record(1, &rec(Stage::Spooled, "k1")).await.unwrap();
        s.record(12, &rec(Stage::Refused, "k12")).await.unwrap();
        other.record(1, &rec(Stage::Spooled, "o1")).await.unwrap();
        assert_eq!(s.records().unwrap().keys().copied().collect::<Vec<_>>(), [1, 12]);
        assert_eq!(s.adopt_uidvalidity(7, 5).await.unwrap(), None, "unchanged");
        assert_eq!(s.adopt_uidvalidity(9, 5).await.unwrap(), Some(2));
        assert!(s.records().unwrap().is_empty());
        assert_eq!(s.uidvalidity().unwrap(), Some(9));
        assert_eq!(other.records().unwrap().len(), 1, "another mailbox is untouched");
        let carried = s.take_carried("k12").unwrap().unwrap();
        assert_eq!((carried.stage, carried.at), (Stage::Refused, 5));
        assert_eq!(s.take_carried("k12").unwrap(), None);
        assert_eq!(s.prune_carried(5 + CARRY_DAYS * 86400 - 1).unwrap(), 0);
        assert_eq!(s.prune_carried(5 + CARRY_DAYS * 86400 + 1).unwrap(), 1);
        assert_eq!(s.take_carried("k1").unwrap(), None);
    }
}
