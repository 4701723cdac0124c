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

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use crate::generation::{Current, Generation};
pub use poller::{Deps, PollError, Poller, TEST_CRASH_AFTER_SPOOL};

/// `mfd-relay mailbox reset <name> --from-now`, with the daemon stopped: only mail that
/// arrives in the mailbox's folder from now on is printed. Returns (UIDVALIDITY, UIDNEXT).
pub async fn reset_from_now(deps: Deps, mailbox: &str) -> Result<(u32, u32), String> {
    let generation = deps.current.borrow().clone();
    let m = generation
        .config
        .mailboxes
        .iter()
        .map(|m| m.get_ref())
        .find(|m| m.name.get_ref() == mailbox)
        .ok_or_else(|| format!("no [[mailbox]] named \"{mailbox}\""))?;
    let p = Poller::new(m, &generation.config.resolve(&m.spool), &generation.tokens, Arc::new(deps))?;
    p.reset_from_now().await.map_err(|e| e.to_string())
}

/// A running poller's task.
struct Running {
    /// The settings it runs with ([`Poller::fingerprint`]).
    fingerprint: String,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// How long a stopping poller may take to finish its message at shutdown.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Every mailbox poller of a relay: follows the generation channel, starting, keeping and
/// stopping one poller per configured mailbox.
pub struct Pollers {
    deps: Arc<Deps>,
    running: HashMap<String, Running>,
}

impl Pollers {
    /// The pollers of a relay; none runs before [`Pollers::run`].
    pub fn new(deps: Deps) -> Pollers {
        Pollers { deps: Arc::new(deps), running: HashMap::new() }
    }

    /// Runs the pollers of each configuration generation until `shutdown` becomes true, then
    /// stops every poller and waits for each (bounded).
    ///
    /// When a new generation is published, a poller whose mailbox, identity and server
    /// settings did not change keeps running (its session, IDLE included; it reads the token
    /// manager from the current generation at each use). Changed mailboxes get a new poller
    /// (which waits for the old one to finish its message), removed ones are stopped.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut current: Current = self.deps.current.clone();
        let mut open = true;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let generation = current.borrow_and_update().clone();
            self.follow(&generation);
            tokio::select! {
                r = current.changed(), if open => open = r.is_ok(),
                r = shutdown.changed() => if r.is_err() { break },
            }
        }
        self.stop_all().await;
    }

    /// Makes the running pollers those of `generation`.
    fn follow(&mut self, generation: &Generation) {
        let pollers = self.build(generation);
        let wanted: std::collections::HashSet<String> = pollers.iter().map(|p| p.name().to_string()).collect();
        self.running.retain(|name, r| {
            let keep = wanted.contains(name) && !r.task.is_finished();
            if !keep {
                let _ = r.stop.send(true);
            }
            keep
        });
        for p in pollers {
            let name = p.name().to_string();
            if let Some(r) = self.running.get(&name) {
                if r.fingerprint == p.fingerprint() {
                    tracing::info!(mailbox = %name, "mailbox poller kept running: its settings did not change");
                    continue;
                }
                tracing::info!(mailbox = %name, "mailbox settings changed: restarting its poller");
                let _ = r.stop.send(true);
            }
            let (stop, rx) = watch::channel(false);
            let fingerprint = p.fingerprint().to_string();
            let task = tokio::spawn(p.run(rx));
            self.running.insert(name, Running { fingerprint, stop, task });
        }
    }

    /// One poller per configured mailbox. A mailbox whose configuration keeps it from running
    /// is reported (log, status page, error metric) and left out; the relay runs on.
    fn build(&self, generation: &Generation) -> Vec<Poller> {
        let config = &generation.config;
        let mut pollers = Vec::new();
        let mut watched = HashMap::new();
        for m in &config.mailboxes {
            let m = m.get_ref();
            let spool = config.resolve(&m.spool);
            // Two pollers on one folder would print every mail twice.
            let folder = state::folder_prefix(m.identity.get_ref(), &m.folder);
            let result = match watched.get(&folder) {
                Some(first) => {
                    Err(format!("mailbox \"{first}\" already polls folder \"{}\" of this identity", m.folder))
                }
                None => Poller::new(m, &spool, &generation.tokens, self.deps.clone()),
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
                    self.deps.activity.mailbox_error(name, &format!("not polled: {e}"));
                }
            }
        }
        pollers
    }

    /// Stops every running poller and waits for each (bounded).
    async fn stop_all(&mut self) {
        let all: Vec<Running> = self.running.drain().map(|(_, r)| r).collect();
        for r in &all {
            let _ = r.stop.send(true);
        }
        for r in all {
            if tokio::time::timeout(STOP_GRACE, r.task).await.is_err() {
                tracing::warn!("a mailbox poller did not stop in time");
            }
        }
    }
}
