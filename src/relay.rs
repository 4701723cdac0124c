//! Wiring: builds every part from a validated configuration and runs them until shutdown.

use crate::locks::RwLockExt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, TlsMode};
use crate::delivery::{Delivery, Policy};
use crate::devices::Devices;
use crate::oauth::provider::ProviderInfo;
use crate::oauth::tokens::TokenManager;
use crate::oauth::vault::Vault;
use crate::smtp::listener::{self, ListenerSettings};
use crate::smtp::{auth::AuthThrottle, Context};
use crate::upstream::Upstream;

/// How long sessions in flight may take to finish after a shutdown request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Deliveries running at once from the queue.
const QUEUE_PARALLELISM: usize = 32;

/// Why the relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory {path}: {message}")]
    Data { path: PathBuf, message: String },
    #[error("token key: {0}")]
    Vault(#[from] crate::oauth::vault::VaultError),
    #[error("identities: {0}")]
    Tokens(#[from] crate::oauth::tokens::TokenError),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::SetupError),
    #[error("listener {addr}: {message}")]
    Listen { addr: String, message: String },
    /// The database failed while running; the relay stopped so that it can be restarted.
    #[error("stopped after a database failure: {0}")]
    Store(String),
}

/// What outlives a configuration: the database, queue, token key, sign-ins in progress,
/// activity and the login throttle. A reload builds new [`Parts`] around the same `Shared`.
#[derive(Clone)]
pub struct Shared {
    pub store: Arc<crate::store::Store>,
    pub queue: Arc<crate::queue::Queue>,
    pub vault: Arc<Vault>,
    pub logins: Arc<crate::oauth::login::Logins>,
    pub activity: Arc<crate::activity::Activity>,
    pub throttle: Arc<AuthThrottle>,
    /// Per-identity send windows: kept across reloads, or each SIGHUP would allow a new burst.
    pub shaper: Arc<crate::upstream::shaper::Shaper>,
}

/// Everything a running relay is made of, for one configuration.
pub struct Parts {
    pub config: Config,
    pub store: Arc<crate::store::Store>,
    pub queue: Arc<crate::queue::Queue>,
    pub tokens: Arc<TokenManager>,
    pub delivery: Arc<Delivery>,
    pub ctx: Arc<Context>,
    pub logins: Arc<crate::oauth::login::Logins>,
    pub activity: Arc<crate::activity::Activity>,
}

/// Opens the data directory and the token key.
pub async fn open_shared(config: &Config) -> Result<Shared, StartError> {
    let data_dir = config.data_dir();
    let (store, queue) = crate::queue::open_data_dir(&data_dir)
        .await
        .map_err(|e| StartError::Data { path: data_dir.clone(), message: e.to_string() })?;
    let env_key = std::env::var("MFD_RELAY_KEY").ok();
    let vault = Arc::new(Vault::open(&config.key_file(), env_key.as_deref())?);
    Ok(Shared {
        store,
        queue,
        vault,
        logins: Default::default(),
        activity: Default::default(),
        throttle: Arc::new(AuthThrottle::new(crate::smtp::AUTH_LIMITS)),
        shaper: Default::default(),
    })
}

/// Builds every part from a validated configuration (opening the data directory).
pub async fn build(config: Config) -> Result<Parts, StartError> {
    let shared = open_shared(&config).await?;
    build_with(config, &shared, None)
}

/// Builds the parts of one configuration around `shared`; `previous` (on reload) lends its
/// identities' live token state.
pub fn build_with(config: Config, shared: &Shared, previous: Option<&Parts>) -> Result<Parts, StartError> {
    let tokens = Arc::new(TokenManager::new(
        &config,
        shared.store.clone(),
        shared.vault.clone(),
        previous.map(|p| p.tokens.as_ref()),
    )?);
    let providers: Vec<Arc<ProviderInfo>> =
        config.providers.iter().map(|p| Arc::new(ProviderInfo::from_config(&config, p.get_ref()))).collect();
    let timeouts = crate::upstream::Timeouts::new(config.relay.upstream_timeout.0);
    let upstream = Arc::new(Upstream::new(&config.relay.hostname, &providers, config.relay.upstream_pool, timeouts)?);
    let policy = Policy {
        hostname: config.relay.hostname.clone(),
        retry_first: config.relay.retry_first.0,
        retry_max: config.relay.retry_max.0,
        queue_lifetime: config.relay.queue_lifetime.0,
        bounce_to: config.relay.bounce_to.clone(),
        in_session_timeout: config.relay.in_session_timeout.0,
    };
    let delivery = Arc::new(Delivery::new(
        policy,
        shared.queue.clone(),
        tokens.clone(),
        upstream,
        shared.activity.clone(),
        shared.shaper.clone(),
    ));
    let ctx = Arc::new(Context {
        hostname: config.relay.hostname.clone(),
        devices: Arc::new(Devices::from_config(&config)),
        queue: shared.queue.clone(),
        delivery: delivery.clone(),
        tokens: tokens.clone(),
        throttle: shared.throttle.clone(),
        max_recipients: config.relay.max_recipients,
        activity: shared.activity.clone(),
    });
    Ok(Parts {
        config,
        store: shared.store.clone(),
        queue: shared.queue.clone(),
        tokens,
        delivery,
        ctx,
        logins: shared.logins.clone(),
        activity: shared.activity.clone(),
    })
}

/// The background tasks of one configuration: token refresher, retry scheduler, mailbox
/// pollers. Stopped as a whole when a reload replaces them, or at shutdown.
struct Generation {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Generation {
    /// `shutdown` is the relay's: mailbox pollers outlive a generation that a reload ends.
    fn start(parts: &Parts, shutdown: &tokio::sync::watch::Receiver<bool>) -> Generation {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let tasks = vec![
            tokio::spawn(parts.tokens.clone().run_refresher(rx.clone())),
            tokio::spawn(parts.delivery.clone().run(QUEUE_PARALLELISM, rx.clone())),
            tokio::spawn(crate::imap::Pollers::new(parts).run(rx, shutdown.clone())),
        ];
        Generation { stop, tasks }
    }

    /// Stops the tasks and waits for them (bounded), so that two pollers never work on one
    /// mailbox at the same time.
    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            if tokio::time::timeout(SHUTDOWN_GRACE, t).await.is_err() {
                tracing::warn!("a background task did not stop in time");
            }
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReloadReport {
    pub ok: bool,
    /// Problems that kept the new configuration from being used (file:line: message).
    pub problems: Vec<String>,
    /// Changes that only a restart applies.
    pub needs_restart: Vec<String>,
}

/// A reload request from the admin listener, answered on the oneshot.
pub type ReloadRequest = tokio::sync::oneshot::Sender<ReloadReport>;

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
    let listeners = |c: &Config| -> Vec<String> {
        c.listeners
            .iter()
            .map(|l| {
                let l = l.get_ref();
                format!(
                    "{}|{:?}|{:?}|{:?}|{}|{}|{}|{:?}|{}|{}",
                    l.listen.get_ref(),
                    l.tls,
                    l.cert.as_ref().map(|c| c.get_ref()),
                    l.key.as_ref().map(|k| k.get_ref()),
                    l.require_auth,
                    l.require_auth_tls,
                    l.max_message_size.0,
                    l.command_timeout.0,
                    l.max_connections,
                    l.max_connections_per_address
                )
            })
            .collect()
    };
    if listeners(old) != listeners(new) {
        out.push("[[listener]] sections".to_string());
    }
    out
}

/// Runs the relay until `shutdown` becomes true. SIGHUP (or `mfd-relay reload`, through the
/// admin listener) re-reads the configuration file: a file with problems is refused and the
/// running configuration stays; a good one replaces devices, identities, providers and
/// mailboxes without dropping sessions in flight (they finish with what they started with).
pub async fn run(config: Config, mut shutdown: tokio::sync::watch::Receiver<bool>) -> Result<(), StartError> {
    crate::metrics::init();
    let shared = open_shared(&config).await?;
    let mut parts = Arc::new(build_with(config, &shared, None)?);
    shared.logins.use_tokens(&parts.tokens);
    let config = &parts.config;

    // Bind everything first, so a port in use is a clear startup error.
    let mut listeners = Vec::new();
    for l in &config.listeners {
        let l = l.get_ref();
        let addr = l.listen.get_ref().clone();
        let err = |message: String| StartError::Listen { addr: addr.clone(), message };
        let sock: SocketAddr = addr.parse().map_err(|_| err("not an address:port".into()))?;
        let acceptor = match (l.tls, &l.cert, &l.key) {
            (TlsMode::None, _, _) => None,
            (_, Some(c), Some(k)) => Some(
                crate::tls::server_acceptor(&config.resolve(c.get_ref()), &config.resolve(k.get_ref())).map_err(err)?,
            ),
            _ => return Err(err("tls needs cert and key".into())),
        };
        let tcp = tokio::net::TcpListener::bind(sock).await.map_err(|e| err(e.to_string()))?;
        let settings = Arc::new(ListenerSettings {
            name: addr.clone(),
            tls: l.tls,
            acceptor,
            require_auth: l.require_auth,
            require_auth_tls: l.require_auth_tls,
            max_message_size: l.max_message_size.0,
            command_timeout: l.command_timeout.0,
            max_connections: l.max_connections.max(1),
            max_connections_per_address: l.max_connections_per_address.max(1),
        });
        tracing::info!(listen = %tcp.local_addr().map(|a| a.to_string()).unwrap_or(addr.clone()), tls = ?l.tls, "listening for devices");
        listeners.push((tcp, settings));
    }
    let admin_addr: SocketAddr = config.admin.listen.get_ref().parse().map_err(|_| StartError::Listen {
        addr: config.admin.listen.get_ref().clone(),
        message: "not an address:port".into(),
    })?;
    let admin_tcp = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|e| StartError::Listen { addr: admin_addr.to_string(), message: e.to_string() })?;
    tracing::info!(listen = %admin_addr, "admin listener (metrics, health, control)");

    // What stops the listeners: the caller's shutdown, or a failing database (fail-stop: see
    // ARCHITECTURE.md, "Durability").
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<ReloadRequest>(4);
    let current = Arc::new(std::sync::RwLock::new(parts.ctx.clone()));
    let mut tasks = Vec::new();
    let admin = crate::admin::Admin::new(&parts);
    admin.set_reload(reload_tx);
    tasks.push(tokio::spawn(admin.clone().serve(admin_tcp, stop.clone())));
    for (tcp, settings) in listeners {
        tasks.push(tokio::spawn(listener::serve(tcp, settings, current.clone(), stop.clone(), SHUTDOWN_GRACE)));
    }
    let mut generation = Generation::start(&parts, &stop);
    init_label_sets(&parts.config);
    crate::delivery::update_queue_metrics(&parts.queue);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        devices = parts.config.devices.len(),
        identities = parts.config.identities.len(),
        queued = parts.queue.depth(),
        "mfd-relay running"
    );

    let mut hangup = hangup_signal();
    loop {
        let reply = tokio::select! {
            _ = shutdown.changed() => break,
            _ = shared.store.failed() => break,
            _ = hangup.recv() => None,
            Some(r) = reload_rx.recv() => Some(r),
        };
        let report = match Config::load(&parts.config.path) {
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
                let needs_restart = restart_only_changes(&parts.config, &new_config);
                match build_with(new_config, &shared, Some(&parts)) {
                    Err(e) => {
                        tracing::error!("reload refused, the running configuration stays: {e}");
                        ReloadReport { ok: false, problems: vec![e.to_string()], needs_restart }
                    }
                    Ok(new_parts) => {
                        let new_parts = Arc::new(new_parts);
                        // New sessions use the new configuration at once; sessions in flight
                        // keep the one they started with.
                        *current.write_locked() = new_parts.ctx.clone();
                        admin.reload(&new_parts);
                        // A sign-in in progress is saved into the new identities.
                        shared.logins.use_tokens(&new_parts.tokens);
                        generation.stop().await;
                        generation = Generation::start(&new_parts, &stop);
                        init_label_sets(&new_parts.config);
                        for n in &needs_restart {
                            tracing::warn!("reload: {n} changed; that takes effect at the next restart");
                        }
                        tracing::info!(
                            devices = new_parts.config.devices.len(),
                            identities = new_parts.config.identities.len(),
                            mailboxes = new_parts.config.mailboxes.len(),
                            "configuration reloaded"
                        );
                        parts = new_parts;
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
    generation.stop().await;
    for t in tasks {
        let _ = t.await;
    }
    if let Some(why) = parts.store.failure() {
        return Err(StartError::Store(why.to_string()));
    }
    if let Err(e) = parts.store.flush() {
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
        let name = l.get_ref().listen.get_ref().as_str();
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
            m::MESSAGES_DELIVERED.with_label_values(&[name, path]);
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
