//! Mobile print: each `[[mailbox]]` is polled over IMAP and every mail in it becomes a print
//! job folder in the spool, exactly once.
//!
//! One [`poller::Poller`] task per mailbox logs in with SASL XOAUTH2 (the identity's token
//! from the token manager, [`client`]), selects the folder and waits for mail with IDLE
//! (RFC 2177) or by polling ([`session`]). Each new message is checked against the mailbox's
//! [`policy`] (sender allow-list, size, attachment types confirmed by their content, safe
//! [`filename`]s) before and after its body is downloaded, then written as a job folder
//! atomically ([`job`]), optionally handed to a print command ([`handoff`]), and only then
//! deleted, flagged or moved upstream (`after`); a refused mail gets the same `after` and,
//! if configured, an answer saying why ([`reply`]). What happened to each UID is committed to
//! the store before each step ([`state`]), so a crash anywhere never prints a mail twice, never
//! loses one, and a change of UIDVALIDITY neither.
//!
//! The files: `client` (TCP, TLS, XOAUTH2), `authres` (was the sender authenticated), `session` (IMAP commands), `wire` (mailbox names
//! on the wire), `poller` (the loop and the stages), `state` (sled records), `policy`,
//! `filename`, `job`, `handoff`, `reply`.

pub mod authres;
pub mod client;
pub mod filename;
pub mod handoff;
pub mod job;
pub mod policy;
pub mod poller;
pub mod reply;
pub mod session;
pub mod state;
pub mod wire;

use std::sync::Arc;

use tokio::sync::watch;

pub use poller::{PollError, Poller, TEST_CRASH_AFTER_SPOOL};

/// `mfd-relay mailbox reset <name> --from-now`, with the daemon stopped: only mail that
/// arrives in the mailbox's folder from now on is printed. Returns (UIDVALIDITY, UIDNEXT).
pub async fn reset_from_now(parts: &crate::relay::Parts, mailbox: &str) -> Result<(u32, u32), String> {
    let m = parts
        .config
        .mailboxes
        .iter()
        .map(|m| m.get_ref())
        .find(|m| m.name.get_ref() == mailbox)
        .ok_or_else(|| format!("no [[mailbox]] named \"{mailbox}\""))?;
    let shared = Arc::new(poller::Shared {
        tokens: parts.tokens.clone(),
        store: parts.store.clone(),
        queue: parts.queue.clone(),
        activity: parts.activity.clone(),
        hostname: parts.config.relay.hostname.clone(),
    });
    let p = Poller::new(m, &parts.config.resolve(&m.spool), shared)?;
    p.reset_from_now().await.map_err(|e| e.to_string())
}

/// Every mailbox poller of a relay.
pub struct Pollers {
    pollers: Vec<Poller>,
}

impl Pollers {
    /// One poller per configured mailbox. A mailbox whose configuration keeps it from running
    /// is reported (log, status page, error metric) and left out; the relay runs on.
    pub fn new(parts: &crate::relay::Parts) -> Pollers {
        let shared = Arc::new(poller::Shared {
            tokens: parts.tokens.clone(),
            store: parts.store.clone(),
            queue: parts.queue.clone(),
            activity: parts.activity.clone(),
            hostname: parts.config.relay.hostname.clone(),
        });
        let mut pollers = Vec::new();
        let mut watched = std::collections::HashMap::new();
        for m in &parts.config.mailboxes {
            let m = m.get_ref();
            let spool = parts.config.resolve(&m.spool);
            // Two pollers on one folder would print every mail twice.
            // IMAP names are case-sensitive, except INBOX (RFC 3501 5.1).
            let folder_name =
                if m.folder.eq_ignore_ascii_case("INBOX") { "INBOX".to_string() } else { m.folder.clone() };
            let folder = (m.identity.get_ref().clone(), folder_name);
            let result = match watched.get(&folder) {
                Some(first) => {
                    Err(format!("mailbox \"{first}\" already polls folder \"{}\" of this identity", m.folder))
                }
                None => Poller::new(m, &spool, shared.clone()),
            };
            match result {
                Ok(p) => {
                    watched.insert(folder, p.name().to_string());
                    pollers.push(p);
                }
                Err(e) => {
                    let name = m.name.get_ref();
                    tracing::error!(mailbox = %name, "mailbox not polled: {e}");
                    crate::metrics::IMAP_ERRORS.with_label_values(&[name]).inc();
                    parts.activity.mailbox_error(name, &format!("not polled: {e}"));
                }
            }
        }
        Pollers { pollers }
    }

    pub fn len(&self) -> usize {
        self.pollers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pollers.is_empty()
    }

    /// Runs every poller until `shutdown` becomes true.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let tasks: Vec<_> = self.pollers.into_iter().map(|p| tokio::spawn(p.run(shutdown.clone()))).collect();
        for t in tasks {
            if let Err(e) = t.await {
                tracing::error!("a mailbox poller ended abnormally: {e}");
            }
        }
    }
}
