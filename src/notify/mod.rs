//! Telling the admin without Prometheus (`[notify]`, README.md "Notifications"): an e-mail
//! and/or webhooks when an identity needs a sign-in, token refreshes keep failing, a message
//! waits too long, a client certificate is about to expire, or a mailbox is not checked.
//!
//! Every `check_every` the runner takes a [`policy::Snapshot`] of the relay (identities'
//! states, the oldest queued message, mailbox activity, certificate expiry), and
//! [`policy::step`] (pure) turns it and the previous state into events: one when a condition
//! starts, one when it clears, a reminder a day. The edges are here: the state is kept in
//! `data_dir/notify.json` so that a restart announces nothing twice; mail is queued as the
//! relay's own message through a healthy identity ([`policy::choose_sender`]), so it is
//! durable and retried by the queue; each webhook has a worker that POSTs in order and
//! retries with backoff, off the relay's paths (a full worker drops, and counts, rather
//! than wait). Webhook URLs carry tokens: only their host is ever logged.

pub mod policy;
pub mod render;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::activity::Activity;
use crate::config::{Config, Flow, WebhookFormat, WebhookUrl};
use crate::generation::Current;
use crate::metrics;
use crate::oauth::provider::ProviderInfo;
use crate::oauth::tokens::IdentityState;
use crate::queue::{OwnMessage, Queue};
use policy::{CertSnap, Event, IdentitySnap, MailboxSnap, Policy, Snapshot, State};

/// Notifications waiting for a healthy identity to mail them; older ones are dropped.
const MAX_OUTBOX: usize = 50;
/// Notifications waiting per webhook; more are dropped (and counted as failed).
const WEBHOOK_QUEUE: usize = 64;
/// Attempts per webhook notification.
const WEBHOOK_ATTEMPTS: u32 = 8;
/// The longest wait between two attempts.
const WEBHOOK_BACKOFF_MAX: Duration = Duration::from_secs(15 * 60);
/// How long one POST may take.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// A client certificate's expiry is read again after this long.
const CERT_REREAD: i64 = 3600;

/// What the notifier reads and writes.
pub struct Deps {
    pub queue: Arc<Queue>,
    pub activity: Arc<Activity>,
    pub current: Current,
    /// Where `notify.json` lives.
    pub data_dir: PathBuf,
    /// Unix seconds when the relay started.
    pub started: i64,
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Where the status page can be opened: `[admin] redirect_uri`'s host when it names one
/// other than localhost, else the first `allowed_hosts` name, else the listen address (the
/// relay's hostname when it listens on every address).
pub fn status_url(config: &Config) -> String {
    let admin = &config.admin;
    let listen = *admin.listen.get_ref();
    if let Some(u) = admin.redirect_uri.as_deref().and_then(|u| url::Url::parse(u).ok()) {
        let local = matches!(u.host(), Some(url::Host::Domain(d)) if d.eq_ignore_ascii_case("localhost"))
            || matches!(u.host(), Some(url::Host::Ipv4(ip)) if ip.is_loopback())
            || matches!(u.host(), Some(url::Host::Ipv6(ip)) if ip.is_loopback());
        if let (false, Some(host)) = (local, u.host_str()) {
            let port = u.port().map(|p| format!(":{p}")).unwrap_or_default();
            return format!("{}://{host}{port}/status", u.scheme());
        }
    }
    if let Some(h) = admin.allowed_hosts.first() {
        return format!("http://{}:{}/status", h.get_ref(), listen.port());
    }
    if listen.ip().is_unspecified() {
        return format!("http://{}:{}/status", config.relay.hostname, listen.port());
    }
    format!("http://{listen}/status")
}

/// Where a loopback status page can be opened from, said beside its link.
pub fn status_note(config: &Config) -> Option<String> {
    let listen = *config.admin.listen.get_ref();
    (listen.ip().is_loopback() && status_url(config) == format!("http://{listen}/status"))
        .then(|| format!("on the relay's host, or through ssh -L {}:{listen} relay-host", listen.port()))
}

/// Reads client certificates' expiry, at most hourly per file.
#[derive(Default)]
struct Certificates {
    read: HashMap<PathBuf, (i64, Option<i64>)>,
}

impl Certificates {
    fn not_after(&mut self, path: &PathBuf, now: i64) -> Option<i64> {
        if let Some((at, v)) = self.read.get(path) {
            if now - at < CERT_REREAD {
                return *v;
            }
        }
        let v = rustls_pki_types::CertificateDer::from_pem_file(path)
            .ok()
            .and_then(|d| crate::oauth::jwt::not_after(d.as_ref()));
        self.read.insert(path.clone(), (now, v));
        v
    }
}

use rustls_pki_types::pem::PemObject as _;

/// The relay as the policy sees it.
fn snapshot(deps: &Deps, gen: &crate::generation::Generation, certs: &mut Certificates, now: i64) -> Snapshot {
    let config = &gen.config;
    let providers: HashMap<String, ProviderInfo> = config
        .providers
        .iter()
        .map(|p| (p.get_ref().name.get_ref().clone(), ProviderInfo::from_config(config, p.get_ref())))
        .collect();
    let identities = gen
        .tokens
        .status()
        .into_iter()
        .map(|s| {
            let state = match s.state.as_str() {
                "ready" => IdentityState::Ready,
                "error" => IdentityState::Error,
                _ => IdentityState::NeedsLogin,
            };
            IdentitySnap {
                delegated: matches!(s.flow.as_str(), "device_code" | "auth_code"),
                can_send: providers.get(&s.provider).is_some_and(|p| p.smtp.is_some()),
                name: s.name,
                state,
                last_error: s.last_error,
            }
        })
        .collect();
    let certificates = providers
        .values()
        .filter_map(|p| {
            let path = p.client_certificate.as_ref()?;
            let identities = config
                .identities
                .iter()
                .map(|i| i.get_ref())
                .filter(|i| i.provider.get_ref() == &p.name && *i.flow.get_ref() == Flow::ClientCredentials)
                .map(|i| i.name.get_ref().clone())
                .collect();
            Some(CertSnap { provider: p.name.clone(), not_after: certs.not_after(path, now), identities })
        })
        .collect();
    let mailboxes = config
        .mailboxes
        .iter()
        .map(|m| {
            let m = m.get_ref();
            let name = m.name.get_ref().clone();
            // We do not know whether the server has IDLE: allow for either.
            let quiet = m.poll_interval.0.max(crate::imap::poller::IDLE_RENEW).as_secs() as i64;
            MailboxSnap { last_check: deps.activity.mailbox(&name).last_check, quiet, name }
        })
        .collect();
    Snapshot {
        now,
        started: deps.started,
        identities,
        oldest_queued: deps.queue.oldest_received(),
        certificates,
        mailboxes,
    }
}

/// The saved state; a missing or unreadable file is a fresh start.
fn load_state(path: &std::path::Path) -> State {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!("{}: {e}; starting notifications afresh", path.display());
            State::default()
        }),
        Err(_) => State::default(),
    }
}

/// Writes the state aside and renames it into place (a crashing process leaves the old or the
/// new file; after a power cut an unreadable file only means a fresh start).
async fn save_state(path: &std::path::Path, state: &State) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}

/// One POST to send.
struct Job {
    url: WebhookUrl,
    format: WebhookFormat,
    body: Vec<u8>,
    /// The first wait before a retry (doubling after each failure).
    backoff: Duration,
}

/// One worker per webhook URL: POSTs in order, retries with backoff.
struct Webhooks {
    http: reqwest::Client,
    workers: HashMap<String, mpsc::Sender<Job>>,
}

impl Webhooks {
    fn new() -> Webhooks {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(WEBHOOK_TIMEOUT)
            .connect_timeout(WEBHOOK_TIMEOUT)
            .user_agent(concat!("mfd-relay/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Webhooks { http, workers: HashMap::new() }
    }

    /// Hands `job` to its URL's worker (started on first use); never waits.
    fn send(&mut self, job: Job) {
        let key = job.url.0.as_str().to_string();
        let tx = self.workers.entry(key).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
            tokio::spawn(webhook_worker(self.http.clone(), rx));
            tx
        });
        if let Err(e) = tx.try_send(job) {
            let job = match e {
                mpsc::error::TrySendError::Full(j) | mpsc::error::TrySendError::Closed(j) => j,
            };
            tracing::warn!(webhook = %job.url, "notification dropped: too many waiting for this webhook");
            metrics::NOTIFICATIONS.with_label_values(&[job.format.as_str(), "failed"]).inc();
        }
    }

    /// Ends the workers of URLs no longer configured (after what they hold is sent).
    fn keep_only(&mut self, urls: &[String]) {
        self.workers.retain(|k, _| urls.contains(k));
    }
}

async fn webhook_worker(http: reqwest::Client, mut rx: mpsc::Receiver<Job>) {
    while let Some(job) = rx.recv().await {
        let channel = job.format.as_str();
        let mut wait = job.backoff;
        let mut attempt = 1;
        let outcome = loop {
            let sent = http
                .post(job.url.0.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(job.body.clone())
                .send()
                .await;
            // Without the URL: reqwest's error text may carry it, and it holds a token.
            let why = match sent {
                Ok(r) if r.status().is_success() => break Ok(()),
                Ok(r) => {
                    let status = r.status();
                    // The receiver refuses the request itself: asking again changes nothing.
                    if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
                        break Err(format!("HTTP {status}"));
                    }
                    format!("HTTP {status}")
                }
                Err(e) if e.is_timeout() => "timed out".to_string(),
                Err(e) if e.is_connect() => "cannot connect".to_string(),
                Err(_) => "request failed".to_string(),
            };
            if attempt >= WEBHOOK_ATTEMPTS {
                break Err(why);
            }
            tracing::warn!(webhook = %job.url, format = channel, attempt, "webhook failed ({why}); retrying in {}s", wait.as_secs_f32());
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(WEBHOOK_BACKOFF_MAX);
            attempt += 1;
        };
        match outcome {
            Ok(()) => {
                tracing::info!(webhook = %job.url, format = channel, attempt, "notification sent");
                metrics::NOTIFICATIONS.with_label_values(&[channel, "sent"]).inc();
            }
            Err(why) => {
                tracing::error!(webhook = %job.url, format = channel, attempt, "notification not sent: {why}");
                metrics::NOTIFICATIONS.with_label_values(&[channel, "failed"]).inc();
            }
        }
    }
}

/// Creates the notification counters' label sets at zero.
pub fn init_metrics() {
    for channel in ["email", "json", "teams", "slack"] {
        for result in ["sent", "failed"] {
            metrics::NOTIFICATIONS.with_label_values(&[channel, result]);
        }
    }
}

/// The runner's memory between checks.
struct Notifier {
    deps: Deps,
    path: PathBuf,
    state: State,
    certs: Certificates,
    webhooks: Webhooks,
    /// Events waiting for a healthy identity to mail them.
    outbox: Vec<Event>,
    /// Makes each mail's Message-ID unique.
    mails: u64,
    warned_no_sender: bool,
}

impl Notifier {
    /// One check: snapshot, policy, then what changed goes out.
    async fn tick(&mut self, gen: &crate::generation::Generation) {
        let notify = &gen.config.notify;
        let t = now();
        let snap = snapshot(&self.deps, gen, &mut self.certs, t);
        let policy = Policy { remind_every: notify.remind_every.get_ref().0.as_secs() as i64 };
        let (next, events) = policy::step(&self.state, &policy::observe(&snap), t, policy);
        if next != self.state {
            if let Err(e) = save_state(&self.path, &next).await {
                tracing::warn!("{}: {e}", self.path.display());
            }
            self.state = next;
        }
        let ctx = render::Context {
            hostname: gen.config.relay.hostname.clone(),
            status_url: Some(status_url(&gen.config)),
            status_note: status_note(&gen.config),
        };
        let urls: Vec<String> =
            notify.webhooks.iter().map(|w| w.get_ref().url.get_ref().0.as_str().to_string()).collect();
        self.webhooks.keep_only(&urls);
        let backoff = notify.check_every.get_ref().0.clamp(Duration::from_secs(1), Duration::from_secs(60));
        for e in &events {
            tracing::info!(condition = %e.condition.key(), change = e.change.as_str(), "{}", render::title(e));
            for w in notify.webhooks.iter().map(|w| w.get_ref()) {
                let body = serde_json::to_vec(&render::webhook(w.format, e, &ctx)).unwrap_or_default();
                self.webhooks.send(Job { url: w.url.get_ref().clone(), format: w.format, body, backoff });
            }
        }
        match &notify.email {
            Some(to) => {
                self.outbox.extend(events);
                self.mail_outbox(gen, &snap, to.get_ref(), &ctx, t).await;
            }
            None => self.outbox.clear(),
        }
    }

    /// Queues the waiting events as one mail, through a healthy identity if there is one.
    async fn mail_outbox(
        &mut self,
        gen: &crate::generation::Generation,
        snap: &Snapshot,
        to: &str,
        ctx: &render::Context,
        t: i64,
    ) {
        if self.outbox.len() > MAX_OUTBOX {
            let dropped = self.outbox.len() - MAX_OUTBOX;
            self.outbox.drain(..dropped);
            tracing::warn!("{dropped} notification mail(s) dropped: no identity could send them");
            metrics::NOTIFICATIONS.with_label_values(&["email", "failed"]).inc_by(dropped as u64);
        }
        if self.outbox.is_empty() {
            return;
        }
        let Some(identity) = policy::choose_sender(&snap.identities, &self.state) else {
            if !self.warned_no_sender {
                self.warned_no_sender = true;
                tracing::warn!("notification mail waits: no healthy identity can send it now");
            }
            return;
        };
        self.warned_no_sender = false;
        self.mails += 1;
        let from = gen.config.identity(&identity).map(|i| i.email.get_ref().clone()).unwrap_or_default();
        let body = render::mail(&self.outbox, ctx, &from, to, t, self.mails);
        let message = OwnMessage { body: &body, identity: &identity, device: "notify", from: &from, to };
        match self.deps.queue.enqueue_own(message).await {
            Ok(id) => {
                tracing::info!(queue_id = %id, identity, notifications = self.outbox.len(), "notification mail queued");
                metrics::NOTIFICATIONS.with_label_values(&["email", "sent"]).inc();
                self.outbox.clear();
            }
            Err(e) => {
                tracing::warn!("notification mail not queued (kept for the next check): {e}");
                metrics::NOTIFICATIONS.with_label_values(&["email", "failed"]).inc();
            }
        }
    }
}

/// Runs until `stop`: looks every `check_every` (of the current configuration) and sends
/// what changed. Does nothing while `[notify]` names nobody.
pub async fn run(deps: Deps, mut stop: watch::Receiver<bool>) {
    init_metrics();
    let path = deps.data_dir.join("notify.json");
    let mut current = deps.current.clone();
    let mut n = Notifier {
        state: load_state(&path),
        path,
        deps,
        certs: Certificates::default(),
        webhooks: Webhooks::new(),
        outbox: Vec::new(),
        mails: 0,
        warned_no_sender: false,
    };
    loop {
        let gen = current.borrow_and_update().clone();
        if gen.config.notify.enabled() {
            n.tick(&gen).await;
        }
        let every = gen.config.notify.check_every.get_ref().0.max(Duration::from_secs(1));
        drop(gen);
        // A reload may turn notifications on or shorten the interval: look at once.
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            changed = current.changed() => {
                if changed.is_err() {
                    // The relay is stopping (no more generations): wait for `stop`.
                    let _ = stop.changed().await;
                    return;
                }
            }
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(admin: &str) -> Config {
        let text = format!("[relay]\nhostname = \"relay.lan\"\n[admin]\n{admin}\n");
        Config::parse(std::path::Path::new("/etc/mfd/c.toml"), text).expect("parses")
    }

    #[test]
    fn the_status_page_link_is_one_a_person_can_open() {
        let local = config("listen = \"127.0.0.1:9925\"");
        assert_eq!(status_url(&local), "http://127.0.0.1:9925/status");
        assert!(status_note(&local).unwrap().contains("ssh -L 9925:127.0.0.1:9925"));
        assert_eq!(status_note(&config("listen = \"0.0.0.0:9925\"")), None);
        assert_eq!(status_url(&config("listen = \"0.0.0.0:9925\"")), "http://relay.lan:9925/status");
        assert_eq!(status_url(&config("listen = \"192.168.1.5:9925\"")), "http://192.168.1.5:9925/status");
        assert_eq!(
            status_url(&config("listen = \"0.0.0.0:9925\"\nallowed_hosts = [\"relay.contoso.lan\"]")),
            "http://relay.contoso.lan:9925/status"
        );
        assert_eq!(
            status_url(&config(
                "listen = \"127.0.0.1:9925\"\nredirect_uri = \"https://relay.contoso.com/oauth/callback\""
            )),
            "https://relay.contoso.com/status"
        );
    }

    /// A receiver that accepts connections and never answers: the notifier still never waits;
    /// what does not fit in the webhook's queue is dropped and counted.
    #[tokio::test]
    async fn a_stuck_webhook_never_makes_the_notifier_wait() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = WebhookUrl(url::Url::parse(&format!("http://{}/hook", tcp.local_addr().unwrap())).unwrap());
        let failed = || metrics::NOTIFICATIONS.with_label_values(&["slack", "failed"]).get();
        let before = failed();
        let mut w = Webhooks::new();
        let start = std::time::Instant::now();
        for _ in 0..WEBHOOK_QUEUE + 11 {
            let job = Job {
                url: url.clone(),
                format: WebhookFormat::Slack,
                body: b"{}".to_vec(),
                backoff: Duration::from_secs(1),
            };
            w.send(job);
        }
        assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());
        // One may be in the worker's hands already, WEBHOOK_QUEUE wait, the rest are dropped.
        let dropped = failed() - before;
        assert!((10..=11).contains(&dropped), "{dropped}");
    }

    #[test]
    fn a_webhook_url_is_shown_by_its_host_only() {
        let u = WebhookUrl(
            url::Url::parse("https://prod.westeurope.logic.azure.com/workflows/abc/triggers?sig=SECRET").unwrap(),
        );
        assert_eq!(format!("{u}"), "https://prod.westeurope.logic.azure.com");
        assert!(!format!("{u:?}").contains("SECRET"));
    }
}
