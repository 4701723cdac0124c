//! Wiring: binds the listeners, starts every part of a validated configuration and runs them
//! until shutdown; on reload, builds the next [`Generation`] and publishes it on the
//! generation channel (ARCHITECTURE.md, "Reload"). No other module imports this one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::ops::ReloadReport;
use crate::admin::ReloadRequest;
use crate::config::{Config, ListenerTls};
use crate::generation::{BuildError, Generation, Shared};
use crate::smtp::listener::{self, CurrentContext, ListenerSettings};

/// How long sessions in flight may take to finish after a shutdown request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Deliveries running at once from the queue.
const QUEUE_PARALLELISM: usize = 32;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("listener {addr}: {message}")]
    Listen { addr: String, message: String },
    /// The database failed while running; the relay stopped so that it can be restarted.
    #[error("stopped after a database failure: {0}")]
    Store(String),
}

/// The background tasks of one configuration: token refresher and retry scheduler. Stopped
/// as a whole when a reload replaces them, or at shutdown. (The mailbox pollers follow the
/// generation channel themselves: [`crate::imap::Pollers`].)
struct Background {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Background {
    fn start(generation: &Generation) -> Background {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let tasks = vec![
            tokio::spawn(generation.tokens.clone().run_refresher(rx.clone())),
            tokio::spawn(generation.delivery.clone().run(QUEUE_PARALLELISM, rx)),
        ];
        Background { stop, tasks }
    }

    /// Stops the tasks and waits for them (bounded).
    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            if tokio::time::timeout(SHUTDOWN_GRACE, t).await.is_err() {
                tracing::warn!("a background task did not stop in time");
            }
        }
    }
}

/// Settings only a restart applies (listeners, data directory, key, admin address).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if old.data_dir() != new.data_dir() {
        out.push("relay.data_dir".to_string());
    }
    if old.key_file() != new.key_file() {
        out.push("relay.key_file".to_string());
    }
    if old.admin.listen.get_ref() != new.admin.listen.get_ref() {
        out.push("admin.listen".to_string());
    }
    // Every setting of a listener is read when it is bound (ARCHITECTURE.md, "Reload").
    if old.listeners != new.listeners {
        out.push("[[listener]] sections".to_string());
    }
    out
}

/// Runs the relay until `shutdown` becomes true. SIGHUP (or `mfd-relay reload`, through the
/// admin listener) re-reads the configuration file: a file with problems is refused and the
/// running configuration stays; a good one replaces devices, identities, providers and
/// mailboxes without dropping sessions in flight (they finish with what they started with).
///
/// Each configuration becomes one [`Generation`], published once on the generation channel
/// that listeners, admin, pollers and sign-ins read (ARCHITECTURE.md, "Reload").
pub async fn run(config: Config, mut shutdown: tokio::sync::watch::Receiver<bool>) -> Result<(), StartError> {
    crate::metrics::init();
    let shared = Shared::open(&config).await?;
    let (publish, current) = tokio::sync::watch::channel(Arc::new(Generation::build(config, &shared, None)?));
    let first = current.borrow().clone();
    let config = &first.config;

    // Bind everything first, so a port in use is a clear startup error.
    let mut listeners = Vec::new();
    for l in &config.listeners {
        let l = l.get_ref();
        let sock = *l.listen.get_ref();
        let addr = sock.to_string();
        let err = |message: String| StartError::Listen { addr: addr.clone(), message };
        let legacy = *l.legacy_tls.get_ref();
        let acceptor = |cert: &toml::Spanned<std::path::PathBuf>, key: &toml::Spanned<std::path::PathBuf>| {
            let (cert, key) = (config.resolve(cert.get_ref()), config.resolve(key.get_ref()));
            if legacy {
                // Old devices only (README.md, "Old devices and TLS"): OpenSSL at security level 0.
                crate::legacy_tls::acceptor(&cert, &key)
                    .map(|a| listener::Acceptor::OpenSsl(Arc::new(a)))
                    .map_err(|e| err(e.to_string()))
            } else {
                crate::tls::server_acceptor(&cert, &key).map(listener::Acceptor::Rustls).map_err(err)
            }
        };
        let tls = match &l.tls {
            ListenerTls::None => listener::Tls::None,
            ListenerTls::StartTls { cert, key } => listener::Tls::StartTls(acceptor(cert, key)?),
            ListenerTls::Implicit { cert, key } => listener::Tls::Implicit(acceptor(cert, key)?),
        };
        let tcp = tokio::net::TcpListener::bind(sock).await.map_err(|e| err(e.to_string()))?;
        let settings = Arc::new(ListenerSettings {
            name: addr.clone(),
            tls,
            require_auth: l.require_auth,
            require_auth_tls: l.require_auth_tls,
            max_message_size: l.max_message_size.0,
            command_timeout: l.command_timeout.0,
            max_connections: l.max_connections.max(1),
            max_connections_per_address: l.max_connections_per_address.max(1),
        });
        tracing::info!(listen = %tcp.local_addr().map(|a| a.to_string()).unwrap_or(addr.clone()), tls = ?l.tls.mode(), "listening for devices");
        listeners.push((tcp, settings));
    }
    let admin_addr: SocketAddr = *config.admin.listen.get_ref();
    let admin_tcp = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|e| StartError::Listen { addr: admin_addr.to_string(), message: e.to_string() })?;
    tracing::info!(listen = %admin_addr, "admin listener (metrics, health, control)");

    // What stops the listeners: the caller's shutdown, or a failing database (fail-stop: see
    // ARCHITECTURE.md, "Durability").
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<ReloadRequest>(4);
    // A sign-in that outlives a reload is saved into the current generation's identities.
    let for_logins = current.clone();
    shared.logins.follow(move || for_logins.borrow().tokens.clone());
    let mut tasks = Vec::new();
    let admin = crate::admin::Admin::new(crate::admin::Deps {
        queue: shared.queue.clone(),
        logins: shared.logins.clone(),
        activity: shared.activity.clone(),
        current: current.clone(),
        reload: Some(reload_tx),
    });
    tasks.push(tokio::spawn(admin.serve(admin_tcp, stop.clone())));
    for (tcp, settings) in listeners {
        let generations = current.clone();
        let ctx = CurrentContext::new(move || generations.borrow().smtp.clone());
        tasks.push(tokio::spawn(listener::serve(tcp, settings, ctx, stop.clone(), SHUTDOWN_GRACE)));
    }
    let pollers = crate::imap::Pollers::new(crate::imap::Deps {
        store: shared.store.clone(),
        queue: shared.queue.clone(),
        activity: shared.activity.clone(),
        current: current.clone(),
    });
    tasks.push(tokio::spawn(pollers.run(stop.clone())));
    // Tells the admin ([notify]); follows the generation channel like the pollers.
    let notify = crate::notify::Deps {
        queue: shared.queue.clone(),
        activity: shared.activity.clone(),
        current: current.clone(),
        data_dir: config.data_dir(),
        started: chrono::Utc::now().timestamp(),
    };
    tasks.push(tokio::spawn(crate::notify::run(notify, stop.clone())));
    let mut background = Background::start(&first);
    init_label_sets(&first.config);
    crate::delivery::update_queue_metrics(&shared.queue);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        devices = first.config.devices.len(),
        identities = first.config.identities.len(),
        queued = shared.queue.depth(),
        "mfd-relay running"
    );
    drop(first);

    let mut hangup = hangup_signal();
    loop {
        let reply = tokio::select! {
            _ = shutdown.changed() => break,
            _ = shared.store.failed() => break,
            _ = hangup.recv() => None,
            Some(r) = reload_rx.recv() => Some(r),
        };
        let running = current.borrow().clone();
        let report = match Config::load(&running.config.path) {
            Err(e) => {
                let problems: Vec<String> = match e {
                    crate::config::ConfigError::Invalid(v) => v.iter().map(|p| p.to_string()).collect(),
                    other => vec![other.to_string()],
                };
                for p in &problems {
                    tracing::error!("reload refused, the running configuration stays: {p}");
                }
                ReloadReport { ok: false, problems, needs_restart: vec![] }
            }
            Ok(new_config) => {
                for advice in new_config.advice() {
                    tracing::warn!("{advice}");
                }
                let needs_restart = restart_only_changes(&running.config, &new_config);
                match Generation::build(new_config, &shared, Some(&running)) {
                    Err(e) => {
                        tracing::error!("reload refused, the running configuration stays: {e}");
                        ReloadReport { ok: false, problems: vec![e.to_string()], needs_restart }
                    }
                    Ok(next) => {
                        let next = Arc::new(next);
                        // New sessions, admin requests, pollers and sign-ins use it at once;
                        // sessions in flight keep the one they started with.
                        publish.send_replace(next.clone());
                        background.stop().await;
                        background = Background::start(&next);
                        init_label_sets(&next.config);
                        for n in &needs_restart {
                            tracing::warn!("reload: {n} changed; that takes effect at the next restart");
                        }
                        tracing::info!(
                            devices = next.config.devices.len(),
                            identities = next.config.identities.len(),
                            mailboxes = next.config.mailboxes.len(),
                            "configuration reloaded"
                        );
                        ReloadReport { ok: true, problems: vec![], needs_restart }
                    }
                }
            }
        };
        if let Some(reply) = reply {
            let _ = reply.send(report);
        }
    }
    stop_tx.send_replace(true);
    background.stop().await;
    for t in tasks {
        let _ = t.await;
    }
    if let Some(why) = shared.store.failure() {
        return Err(StartError::Store(why.to_string()));
    }
    if let Err(e) = shared.store.flush() {
        tracing::error!("final database flush failed: {e}");
    }
    tracing::info!("mfd-relay stopped");
    Ok(())
}

/// Creates every configured label set at zero, so that Prometheus sees the first increment
/// of each series (a series that does not exist yet has no "before").
fn init_label_sets(config: &Config) {
    use crate::metrics as m;
    for l in &config.listeners {
        let name = l.get_ref().listen.get_ref().to_string();
        let name = name.as_str();
        m::SMTP_CONNECTIONS.with_label_values(&[name]);
        m::AUTH_FAILURES.with_label_values(&[name]);
        m::SMTP_SESSIONS_ACTIVE.with_label_values(&[name]);
    }
    for d in &config.devices {
        let d = d.get_ref();
        m::MESSAGES_ACCEPTED.with_label_values(&[d.name.get_ref().as_str(), d.identity.get_ref().as_str()]);
    }
    for i in &config.identities {
        let name = i.get_ref().name.get_ref().as_str();
        for path in ["session", "queue"] {
            m::MESSAGES_DELIVERED.with_label_values(&[name, path, i.get_ref().send_via().as_str()]);
        }
        for via in ["reply", "bounce"] {
            m::MESSAGES_FAILED.with_label_values(&[name, via]);
        }
        for result in ["ok", "error"] {
            m::TOKEN_REFRESHES.with_label_values(&[name, result]);
        }
    }
    for mb in &config.mailboxes {
        let name = mb.get_ref().name.get_ref().as_str();
        for result in ["spooled", "refused"] {
            m::IMAP_JOBS.with_label_values(&[name, result]);
        }
        m::IMAP_ERRORS.with_label_values(&[name]);
    }
}

/// SIGHUP as a stream (never fires where there are no Unix signals).
fn hangup_signal() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut hup) = signal(SignalKind::hangup()) {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    if tx.send(()).await.is_err() {
                        return;
                    }
                }
            });
            return rx;
        }
    }
    std::mem::forget(tx);
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(listener: &str) -> Config {
        let text = format!("[[listener]]\nlisten = \"127.0.0.1:2525\"\n{listener}");
        Config::parse(std::path::Path::new("/etc/mfd/c.toml"), text).expect("parses")
    }

    #[test]
    fn any_listener_setting_needs_a_restart() {
        let base = config("tls = \"starttls\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n");
        assert!(
            restart_only_changes(&base, &config("tls = \"starttls\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n")).is_empty()
        );
        // Lines moving (a comment added) change no setting.
        assert!(restart_only_changes(
            &base,
            &config("# old printers\n\ntls = \"starttls\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n")
        )
        .is_empty());
        for changed in [
            "tls = \"starttls\"\ncert = \"c.pem\"\nkey = \"k.pem\"\nlegacy_tls = true\n",
            "tls = \"implicit\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
            "tls = \"starttls\"\ncert = \"other.pem\"\nkey = \"k.pem\"\n",
            "tls = \"starttls\"\ncert = \"c.pem\"\nkey = \"k.pem\"\nrequire_auth_tls = true\n",
            "tls = \"starttls\"\ncert = \"c.pem\"\nkey = \"k.pem\"\nmax_connections = 7\n",
        ] {
            assert_eq!(restart_only_changes(&base, &config(changed)), vec!["[[listener]] sections"], "{changed}");
        }
    }
}
