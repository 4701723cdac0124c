//! Wiring: builds every part from a validated configuration and runs them until shutdown.

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
}

/// Everything a running relay is made of.
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

/// The durable state of a relay: database, queue and token key.
pub type State = (Arc<crate::store::Store>, Arc<crate::queue::Queue>, Arc<Vault>);

/// Opens the data directory and the token key.
pub fn open_state(config: &Config) -> Result<State, StartError> {
    let data_dir = config.data_dir();
    let (store, queue) = crate::queue::open_data_dir(&data_dir).map_err(|e| StartError::Data {
        path: data_dir.clone(),
        message: match e.to_string() {
            m if m.contains("WouldBlock") || m.contains("lock") => {
                format!("{m} (is another mfd-relay using this data directory?)")
            }
            m => m,
        },
    })?;
    let env_key = std::env::var("MFD_RELAY_KEY").ok();
    let vault = Arc::new(Vault::open(&config.key_file(), env_key.as_deref())?);
    Ok((store, queue, vault))
}

/// Builds every part from a validated configuration.
pub fn build(config: Config) -> Result<Parts, StartError> {
    let (store, queue, vault) = open_state(&config)?;
    let tokens = Arc::new(TokenManager::new(&config, store.clone(), vault)?);
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
    let activity = Arc::new(crate::activity::Activity::default());
    let delivery = Arc::new(Delivery::new(policy, queue.clone(), tokens.clone(), upstream, activity.clone()));
    let ctx = Arc::new(Context {
        hostname: config.relay.hostname.clone(),
        devices: Arc::new(Devices::from_config(&config)),
        queue: queue.clone(),
        delivery: delivery.clone(),
        tokens: tokens.clone(),
        throttle: AuthThrottle::new(crate::smtp::AUTH_MAX_FAILURES, crate::smtp::AUTH_BLOCK),
        max_recipients: config.relay.max_recipients,
        activity: activity.clone(),
    });
    Ok(Parts { config, store, queue, tokens, delivery, ctx, logins: Default::default(), activity })
}

/// Runs the relay until `shutdown` becomes true.
pub async fn run(config: Config, shutdown: tokio::sync::watch::Receiver<bool>) -> Result<(), StartError> {
    crate::metrics::init();
    let parts = build(config)?;
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
            (_, Some(c), Some(k)) => {
                Some(listener::tls_acceptor(&config.resolve(c.get_ref()), &config.resolve(k.get_ref())).map_err(err)?)
            }
            _ => return Err(err("tls needs cert and key".into())),
        };
        let tcp = tokio::net::TcpListener::bind(sock).await.map_err(|e| err(e.to_string()))?;
        let settings = Arc::new(ListenerSettings {
            name: addr.clone(),
            tls: l.tls,
            acceptor,
            require_auth: l.require_auth,
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

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(parts.tokens.clone().run_refresher(shutdown.clone())));
    tasks.push(tokio::spawn(parts.delivery.clone().run(QUEUE_PARALLELISM, shutdown.clone())));
    let admin = crate::admin::Admin::new(&parts);
    tasks.push(tokio::spawn(admin.serve(admin_tcp, shutdown.clone())));
    tasks.push(tokio::spawn(crate::imap::Pollers::new(&parts).run(shutdown.clone())));
    for (tcp, settings) in listeners {
        tasks.push(tokio::spawn(listener::serve(tcp, settings, parts.ctx.clone(), shutdown.clone(), SHUTDOWN_GRACE)));
    }
    crate::delivery::update_queue_metrics(&parts.queue);
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        devices = config.devices.len(),
        identities = config.identities.len(),
        queued = parts.queue.depth(),
        "mfd-relay running"
    );
    for t in tasks {
        let _ = t.await;
    }
    if let Err(e) = parts.store.flush() {
        tracing::error!("final database flush failed: {e}");
    }
    tracing::info!("mfd-relay stopped");
    Ok(())
}
