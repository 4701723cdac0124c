//! The IMAP commands the poller uses, on an authenticated session, each bounded in time.
//!
//! - `SELECT` (RFC 3501 6.3.1) for UIDVALIDITY and UIDNEXT; `UID SEARCH ALL` (6.4.4, 6.4.8) for
//!   the UIDs, and `UID SEARCH UNSEEN` for the new ones with `after = seen`;
//! - `UID FETCH (UID FLAGS RFC822.SIZE)` first, then the header section (at most
//!   [`MAX_HEADER`] bytes of it), to refuse by size or sender without downloading, then
//!   `BODY.PEEK[]` one message at a time (6.4.5; PEEK leaves `\Seen` alone);
//! - `after`: `UID STORE +FLAGS.SILENT (\Deleted)` then `UID EXPUNGE` (RFC 4315 2.1, UIDPLUS;
//!   plain `EXPUNGE` without it), `+FLAGS.SILENT (\Seen)`, or `UID MOVE` (RFC 6851 3.2) with a
//!   `UID COPY` + delete fallback when the server has no MOVE, creating the target folder when
//!   the server answers `[TRYCREATE]` (RFC 3501 7.1);
//! - `IDLE` (RFC 2177), ended with `DONE` on new data, at a deadline, or at shutdown.

use std::collections::HashSet;
use std::time::Duration;

use async_imap::extensions::idle::IdleResponse;
use async_imap::types::{Flag, UnsolicitedResponse};
use futures_util::TryStreamExt as _;
use tokio::sync::watch;

use super::client::{ImapError, Session};
use super::wire;

/// A command that should answer at once.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Downloading one message (up to `max_size`).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// UIDs per size and header FETCH.
pub const FETCH_BATCH: usize = 50;
/// Bytes of a header section fetched at most (enough for any real mail's header; the
/// sender, subject and Authentication-Results are at its top).
pub const MAX_HEADER: usize = 64 * 1024;

/// What the server can do beyond IMAP4rev1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    /// RFC 2177.
    pub idle: bool,
    /// RFC 6851.
    pub mv: bool,
    /// RFC 4315.
    pub uidplus: bool,
}

/// A message before its body is downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub uid: u32,
    pub size: u64,
    pub deleted: bool,
    pub header: Vec<u8>,
}

/// A downloaded message, in the response it came in.
pub struct Body(async_imap::types::Fetch);

impl Body {
    pub fn bytes(&self) -> &[u8] {
        self.0.body().unwrap_or_default()
    }
}

pub use crate::config::After;

/// Why an IDLE ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The server reported a change.
    NewData,
    /// The deadline passed.
    Deadline,
    Shutdown,
}

async fn within<T, E>(
    what: &'static str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, E>>,
    map: impl FnOnce(E) -> ImapError,
) -> Result<T, ImapError> {
    match tokio::time::timeout(limit, f).await {
        Err(_) => Err(ImapError::Timeout { what }),
        Ok(r) => r.map_err(map),
    }
}

/// An authenticated session with the print folder selected.
pub struct Mailbox {
    session: Session,
    pub caps: Caps,
    pub uidvalidity: u32,
    /// UIDNEXT when the folder was selected (RFC 3501 2.3.1.1), if the server said.
    pub uidnext: Option<u32>,
    /// New messages were reported outside a command's own answer. Reports are taken from
    /// async-imap's queue after every command: the queue holds 100 and drops the rest, and
    /// a check that expunges many messages would otherwise lose an EXISTS among them.
    news: bool,
}

impl Mailbox {
    /// Reads the capabilities (RFC 3501 6.1.1) and selects `folder`.
    pub async fn open(mut session: Session, folder: &str) -> Result<Mailbox, ImapError> {
        let caps =
            within("CAPABILITY", COMMAND_TIMEOUT, session.capabilities(), ImapError::protocol("CAPABILITY")).await?;
        let caps = Caps { idle: caps.has_str("IDLE"), mv: caps.has_str("MOVE"), uidplus: caps.has_str("UIDPLUS") };
        // async-imap quotes the name itself; it must be 7-bit (RFC 3501 5.1.3).
        let selected =
            within("SELECT", COMMAND_TIMEOUT, session.select(wire::mutf7(folder)), ImapError::protocol("SELECT"))
                .await?;
        // RFC 3501 2.3.1.1: a server without UIDVALIDITY cannot keep UIDs; nothing can be tracked.
        let uidvalidity = selected
            .uid_validity
            .ok_or_else(|| ImapError::Unexpected(format!("the server sent no UIDVALIDITY for \"{folder}\"")))?;
        Ok(Mailbox { session, caps, uidvalidity, uidnext: selected.uid_next, news: false })
    }

    fn collect_news(&mut self) {
        self.news |= any_news(|| self.session.unsolicited_responses.try_recv().ok());
    }

    /// NOOP (RFC 3501 6.1.2): lets the server report new messages.
    pub async fn noop(&mut self) -> Result<(), ImapError> {
        within("NOOP", COMMAND_TIMEOUT, self.session.noop(), ImapError::protocol("NOOP")).await?;
        self.collect_news();
        Ok(())
    }

    /// Whether the server reported new messages outside a command's own answer (EXISTS,
    /// RECENT); empties the queue of such reports.
    pub fn drain_news(&mut self) -> bool {
        self.collect_news();
        std::mem::take(&mut self.news)
    }

    /// Every UID in the folder, ascending.
    pub async fn all_uids(&mut self) -> Result<Vec<u32>, ImapError> {
        self.search("ALL").await
    }

    /// The UIDs of messages without `\Seen` (RFC 3501 6.4.4), ascending.
    pub async fn unseen_uids(&mut self) -> Result<Vec<u32>, ImapError> {
        self.search("UNSEEN").await
    }

    async fn search(&mut self, query: &str) -> Result<Vec<u32>, ImapError> {
        let set: HashSet<u32> =
            within("UID SEARCH", COMMAND_TIMEOUT, self.session.uid_search(query), ImapError::protocol("UID SEARCH"))
                .await?;
        self.collect_news();
        let mut v: Vec<u32> = set.into_iter().collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Size, flags and header section of `uids`: sizes and flags first, then the headers of
    /// the messages not marked `\Deleted`, each cut at [`MAX_HEADER`] (a partial fetch, RFC
    /// 3501 6.4.5 `<0.n>`), so that no message, however large its header, is downloaded
    /// whole before its size is known.
    pub async fn metas(&mut self, uids: &[u32]) -> Result<Vec<Meta>, ImapError> {
        let set = uid_set(uids);
        let fetches = within(
            "UID FETCH (size)",
            COMMAND_TIMEOUT,
            async {
                let stream = self.session.uid_fetch(&set, "(UID FLAGS RFC822.SIZE)").await?;
                stream.try_collect::<Vec<_>>().await
            },
            ImapError::protocol("UID FETCH"),
        )
        .await?;
        self.collect_news();
        let mut out: Vec<Meta> = fetches
            .iter()
            .filter_map(|f| {
                Some(Meta {
                    uid: f.uid?,
                    size: u64::from(f.size.unwrap_or(0)),
                    deleted: f.flags().any(|fl| fl == Flag::Deleted),
                    header: Vec::new(),
                })
            })
            .filter(|m| uids.contains(&m.uid))
            .collect();
        drop(fetches);
        out.sort_by_key(|m| m.uid);
        out.dedup_by_key(|m| m.uid);
        let wanted: Vec<u32> = out.iter().filter(|m| !m.deleted).map(|m| m.uid).collect();
        if wanted.is_empty() {
            return Ok(out);
        }
        let set = uid_set(&wanted);
        let query = format!("(UID BODY.PEEK[HEADER]<0.{MAX_HEADER}>)");
        let fetches = within(
            "UID FETCH (header)",
            COMMAND_TIMEOUT,
            async {
                let stream = self.session.uid_fetch(&set, &query).await?;
                stream.try_collect::<Vec<_>>().await
            },
            ImapError::protocol("UID FETCH"),
        )
        .await?;
        self.collect_news();
        for f in &fetches {
            if let (Some(uid), Some(h)) = (f.uid, f.header()) {
                if let Some(m) = out.iter_mut().find(|m| m.uid == uid) {
                    m.header = h.to_vec();
                }
            }
        }
        Ok(out)
    }

    /// The whole message `uid`, or `None` when it is gone. The bytes stay in the buffer they
    /// were read into (no copy).
    pub async fn body(&mut self, uid: u32) -> Result<Option<Body>, ImapError> {
        let fetches = within(
            "UID FETCH (body)",
            FETCH_TIMEOUT,
            async {
                let stream = self.session.uid_fetch(uid.to_string(), "(UID BODY.PEEK[])").await?;
                stream.try_collect::<Vec<_>>().await
            },
            ImapError::protocol("UID FETCH"),
        )
        .await?;
        self.collect_news();
        Ok(fetches.into_iter().find(|f| f.uid == Some(uid) && f.body().is_some()).map(Body))
    }

    async fn command(&mut self, what: &'static str, line: &str) -> Result<(), ImapError> {
        let r =
            within(what, COMMAND_TIMEOUT, self.session.run_command_and_check_ok(line), ImapError::protocol(what)).await;
        self.collect_news();
        r
    }

    /// Marks `uid` \Deleted and expunges it (only it, with UIDPLUS).
    pub async fn delete(&mut self, uid: u32) -> Result<(), ImapError> {
        self.command("UID STORE", &format!("UID STORE {uid} +FLAGS.SILENT (\\Deleted)")).await?;
        if self.caps.uidplus {
            self.command("UID EXPUNGE", &format!("UID EXPUNGE {uid}")).await
        } else {
            // RFC 3501 6.4.3: also removes other messages marked \Deleted by other clients.
            self.command("EXPUNGE", "EXPUNGE").await
        }
    }

    pub async fn mark_seen(&mut self, uid: u32) -> Result<(), ImapError> {
        self.command("UID STORE", &format!("UID STORE {uid} +FLAGS.SILENT (\\Seen)")).await
    }

    /// Moves `uid` to `folder`, creating the folder when the server asks for it.
    pub async fn move_to(&mut self, uid: u32, folder: &str) -> Result<(), ImapError> {
        let target = wire::quoted(&wire::mutf7(folder))
            .ok_or_else(|| ImapError::Unexpected(format!("folder name {folder:?} cannot be sent")))?;
        let (what, line) = if self.caps.mv {
            ("UID MOVE", format!("UID MOVE {uid} {target}"))
        } else {
            ("UID COPY", format!("UID COPY {uid} {target}"))
        };
        match self.command(what, &line).await {
            Err(ImapError::Protocol { source: async_imap::error::Error::No(text), .. })
                if text.to_ascii_lowercase().contains("trycreate") =>
            {
                tracing::info!(folder, "creating the folder for `after = move`");
                self.command("CREATE", &format!("CREATE {target}")).await?;
                self.command(what, &line).await?;
            }
            other => other?,
        }
        if !self.caps.mv {
            self.delete(uid).await?;
        }
        Ok(())
    }

    /// Applies `after` to `uid`. Each action is harmless to repeat, which a restart may do.
    pub async fn apply(&mut self, after: &After, uid: u32) -> Result<(), ImapError> {
        match after {
            After::Delete => self.delete(uid).await,
            After::Seen => self.mark_seen(uid).await,
            After::Move(folder) => self.move_to(uid, folder).await,
        }
    }

    /// LOGOUT (RFC 3501 6.1.3), best effort.
    pub async fn logout(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.session.logout()).await;
    }

    /// IDLE (RFC 2177) until the server reports something, `deadline`, or shutdown.
    pub async fn idle(
        self,
        deadline: tokio::time::Instant,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(Mailbox, Wake), ImapError> {
        let Mailbox { session, caps, uidvalidity, uidnext, news } = self;
        // Reports that come before the server's "+ idling" are not seen by the IDLE wait;
        // a clone of the queue they land in shows them.
        let early = session.unsolicited_responses.clone();
        let mut handle = session.idle();
        within("IDLE", COMMAND_TIMEOUT, handle.init(), ImapError::protocol("IDLE")).await?;
        let wake = if news || any_news(|| early.try_recv().ok()) {
            Wake::NewData
        } else {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (wait, stop) = handle.wait_with_timeout(left + Duration::from_secs(1));
            tokio::pin!(wait);
            let (wake, finished) = tokio::select! {
                r = &mut wait => (match r {
                    Ok(IdleResponse::NewData(_)) => Ok(Wake::NewData),
                    Ok(IdleResponse::Timeout | IdleResponse::ManualInterrupt) => Ok(Wake::Deadline),
                    Err(e) => Err(ImapError::Protocol { what: "IDLE", source: e }),
                }, true),
                _ = tokio::time::sleep_until(deadline) => (Ok(Wake::Deadline), false),
                _ = shutdown.changed() => (Ok(Wake::Shutdown), false),
            };
            // Ends the wait if it is still on, so that the session can be had back.
            drop(stop);
            if !finished {
                let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
            }
            wake?
        };
        let session = within("IDLE DONE", COMMAND_TIMEOUT, handle.done(), ImapError::protocol("DONE")).await?;
        Ok((Mailbox { session, caps, uidvalidity, uidnext, news: false }, wake))
    }
}

/// Takes every queued report; whether one announced new messages (EXISTS, RECENT: RFC 3501
/// 7.3.1, 7.3.2).
fn any_news(mut next: impl FnMut() -> Option<UnsolicitedResponse>) -> bool {
    let mut news = false;
    while let Some(r) = next() {
        news |= matches!(r, UnsolicitedResponse::Exists(_) | UnsolicitedResponse::Recent(_));
    }
    news
}

/// A UID set (RFC 3501 9, `sequence-set`) with ranges for consecutive UIDs: `1:3,7,9:10`.
pub fn uid_set(uids: &[u32]) -> String {
    let mut sorted = uids.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_sets_use_ranges() {
        assert_eq!(uid_set(&[1, 2, 3, 7, 9, 10]), "1:3,7,9:10");
        assert_eq!(uid_set(&[5]), "5");
        assert_eq!(uid_set(&[10, 9, 9, 1]), "1,9:10");
        assert_eq!(uid_set(&[]), "");
        assert_eq!(uid_set(&[u32::MAX - 1, u32::MAX]), format!("{}:{}", u32::MAX - 1, u32::MAX));
    }
}
