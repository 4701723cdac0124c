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

use crate::locks::RwLockExt;
use std::collections::HashMap;
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
    let shared = shared_of(parts);
    let p = Poller::new(m, &parts.config.resolve(&m.spool), shared)?;
    p.reset_from_now().await.map_err(|e| e.to_string())
}

/// What every poller of one configuration shares.
fn shared_of(parts: &crate::relay::Parts) -> Arc<poller::Shared> {
    Arc::new(poller::Shared {
        tokens: parts.tokens.clone(),
        store: parts.store.clone(),
        queue: parts.queue.clone(),
        activity: parts.activity.clone(),
        hostname: parts.config.relay.hostname.clone(),
    })
}

/// A poller's task, which outlives the generation that started it when a reload leaves its
/// settings unchanged.
struct Running {
    fingerprint: String,
    cell: poller::SharedCell,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The relay's running pollers, by mailbox name (one relay per process).
static RUNNING: std::sync::LazyLock<tokio::sync::Mutex<HashMap<String, Running>>> =
    std::sync::LazyLock::new(Default::default);

/// How long a stopping poller may take to finish its message at shutdown.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Every mailbox poller of a relay.
pub struct Pollers {
    pollers: Vec<Poller>,
    shared: Arc<poller::Shared>,
}

impl Pollers {
    /// One poller per configured mailbox. A mailbox whose configuration keeps it from running
    /// is reported (log, status page, error metric) and left out; the relay runs on.
    pub fn new(parts: &crate::relay::Parts) -> Pollers {
        let shared = shared_of(parts);
        let mut pollers = Vec::new();
        let mut watched = HashMap::new();
        for m in &parts.config.mailboxes {
            let m = m.get_ref();
            let spool = parts.config.resolve(&m.spool);
            // Two pollers on one folder would print every mail twice.
            let folder = state::folder_prefix(m.identity.get_ref(), &m.folder);
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
        Pollers { pollers, shared }
    }

    pub fn len(&self) -> usize {
        self.pollers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pollers.is_empty()
    }

    /// Runs the pollers of one configuration generation until `generation` becomes true.
    ///
    /// A poller whose mailbox, identity and server settings are those of a poller already
    /// running (from the generation before a reload) is not started again: the running one
    /// keeps its session, IDLE included, and only gets this generation's relay parts (token
    /// manager, queue). Changed mailboxes get a new poller (which waits for the old one to
    /// finish its message), removed ones are stopped. When the generation ends because the
    /// relay shuts down (`shutdown`), every poller is stopped and waited for.
    pub async fn run(self, mut generation: watch::Receiver<bool>, mut shutdown: watch::Receiver<bool>) {
        {
            let mut running = RUNNING.lock().await;
            let wanted: std::collections::HashSet<String> = self.pollers.iter().map(|p| p.name().to_string()).collect();
            running.retain(|name, r| {
                let keep = wanted.contains(name) && !r.task.is_finished();
                if !keep {
                    let _ = r.stop.send(true);
                }
                keep
            });
            for p in self.pollers {
                let name = p.name().to_string();
                if let Some(r) = running.get(&name) {
                    if r.fingerprint == p.fingerprint() {
                        *r.cell.write_locked() = self.shared.clone();
                        tracing::info!(mailbox = %name, "mailbox poller kept running: its settings did not change");
                        continue;
                    }
                    tracing::info!(mailbox = %name, "mailbox settings changed: restarting its poller");
                    let _ = r.stop.send(true);
                }
                let (stop, rx) = watch::channel(false);
                let fingerprint = p.fingerprint().to_string();
                let cell = p.shared_cell();
                let task = tokio::spawn(p.run(rx));
                running.insert(name, Running { fingerprint, cell, stop, task });
            }
        }
        loop {
            if *generation.borrow() || *shutdown.borrow() {
                break;
            }
            tokio::select! {
                r = generation.changed() => if r.is_err() { break },
                r = shutdown.changed() => if r.is_err() { break },
            }
        }
        if *shutdown.borrow() || shutdown.has_changed().is_err() {
            stop_all().await;
        }
    }
}

/// Stops every running poller and waits for each (bounded).
async fn stop_all() {
    let all: Vec<Running> = RUNNING.lock().await.drain().map(|(_, r)| r).collect();
    for r in &all {
        let _ = r.stop.send(true);
    }
    for r in all {
        if tokio::time::timeout(STOP_GRACE, r.task).await.is_err() {
            tracing::warn!("a mailbox poller did not stop in time");
        }
    }
}
