//! One configuration generation: everything a reload replaces as a whole, built once from a
//! validated configuration and published through one `tokio::sync::watch` channel
//! (ARCHITECTURE.md, "Reload").
//!
//! The wiring (`relay`) owns the channel's sender; the listeners, the admin listener, the
//! mailbox pollers and the sign-ins in progress read the receiver ([`Current`]), so that there
//! is one place that says which configuration is current. What outlives a generation (the
//! database, the queue, the token key, ...) is [`Shared`], opened once per process.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Config, Oversize};
use crate::delivery::{Delivery, Policy};
use crate::devices::Devices;
use crate::oauth::provider::ProviderInfo;
use crate::oauth::tokens::TokenManager;
use crate::oauth::vault::Vault;
use crate::smtp::{auth::AuthThrottle, Context};
use crate::upstream::folder::Folders;
use crate::upstream::Upstream;

/// Why the parts of a configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("data directory {path}: {source}")]
    Data { path: PathBuf, source: crate::queue::QueueError },
    #[error("token key: {0}")]
    Vault(#[from] crate::oauth::vault::VaultError),
    #[error("identities: {0}")]
    Tokens(#[from] crate::oauth::tokens::TokenError),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::SetupError),
}

/// What outlives a configuration: the database, queue, token key, sign-ins in progress,
/// activity, the login throttle and the per-identity send windows. A reload builds a new
/// [`Generation`] around the same `Shared`.
#[derive(Clone)]
pub struct Shared {
    /// The database (holding the data directory's lock).
    pub store: Arc<crate::store::Store>,
    /// The queue (spool and records).
    pub queue: Arc<crate::queue::Queue>,
    /// The token key.
    pub vault: Arc<Vault>,
    /// Sign-ins in progress.
    pub logins: Arc<crate::oauth::login::Logins>,
    /// What devices and mailboxes did lately (the status page).
    pub activity: Arc<crate::activity::Activity>,
    /// Failed device logins per address and username.
    pub throttle: Arc<AuthThrottle>,
    /// Per-identity send windows: kept across reloads, or each SIGHUP would allow a new burst.
    pub shaper: Arc<crate::upstream::shaper::Shaper>,
}

impl Shared {
    /// Opens the data directory (taking its lock) and the token key.
    pub async fn open(config: &Config) -> Result<Shared, BuildError> {
        let data_dir = config.data_dir();
        let (store, queue) = crate::queue::open_data_dir(&data_dir)
            .await
            .map_err(|source| BuildError::Data { path: data_dir.clone(), source })?;
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
}

/// The parts of one configuration: what new sessions, admin requests and pollers use.
pub struct Generation {
    /// The validated configuration it was built from.
    pub config: Config,
    /// Its identities' tokens.
    pub tokens: Arc<TokenManager>,
    /// Its in-session attempts and retry scheduler.
    pub delivery: Arc<Delivery>,
    /// What SMTP sessions use (devices, queue, delivery, tokens, limits).
    pub smtp: Arc<Context>,
    /// The providers' servers and connection pools (`mfd-relay test` sends through them too).
    pub upstream: Arc<Upstream>,
}

/// The receiving end of the generation channel: always holds the current generation.
pub type Current = watch::Receiver<Arc<Generation>>;

impl Generation {
    /// Builds the parts of one configuration around `shared`; `previous` (on reload) lends its
    /// identities' live token state.
    pub fn build(config: Config, shared: &Shared, previous: Option<&Generation>) -> Result<Generation, BuildError> {
        let tokens = Arc::new(TokenManager::new(
            &config,
            shared.store.clone(),
            shared.vault.clone(),
            previous.map(|p| p.tokens.as_ref()),
        )?);
        let providers: Vec<Arc<ProviderInfo>> =
            config.providers.iter().map(|p| Arc::new(ProviderInfo::from_config(&config, p.get_ref()))).collect();
        let timeouts = crate::upstream::Timeouts::new(config.relay.upstream_timeout.0);
        let upstream =
            Arc::new(Upstream::new(&config.relay.hostname, &providers, config.relay.upstream_pool, timeouts)?);
        let policy = Policy {
            hostname: config.relay.hostname.clone(),
            retry_first: config.relay.retry_first.0,
            retry_max: config.relay.retry_max.0,
            queue_lifetime: config.relay.queue_lifetime.0,
            bounce_to: config.relay.bounce_to.clone(),
            in_session_timeout: config.relay.in_session_timeout.0,
            upstream_pool: config.relay.upstream_pool,
        };
        let folders = Arc::new(Folders::new(&config, &providers)?);
        // `oversize = "link"`: identity → the destination its large scans' files go to.
        let oversize: HashMap<String, String> = config
            .identities
            .iter()
            .map(|i| i.get_ref())
            .filter(|i| i.oversize() == Oversize::Link)
            .filter_map(|i| Some((i.name.get_ref().clone(), i.oversize_destination.as_ref()?.get_ref().clone())))
            .collect();
        let delivery = Arc::new(
            Delivery::new(
                policy,
                shared.queue.clone(),
                tokens.clone(),
                upstream.clone(),
                shared.activity.clone(),
                shared.shaper.clone(),
            )
            .with_folders(folders.clone(), oversize.clone()),
        );
        let identities = Arc::new(crate::smtp::ports::SessionIdentities {
            tokens: tokens.clone(),
            upstream: upstream.clone(),
            oversize_link: oversize.keys().cloned().collect(),
        });
        let smtp = Arc::new(Context {
            hostname: config.relay.hostname.clone(),
            devices: Arc::new(Devices::from_config(&config)),
            queue: shared.queue.clone(),
            delivery: delivery.clone(),
            tokens: identities,
            folders,
            throttle: shared.throttle.clone(),
            max_recipients: config.relay.max_recipients,
            activity: shared.activity.clone(),
        });
        Ok(Generation { config, tokens, delivery, smtp, upstream })
    }

    /// A channel holding only `self`, for a process that never reloads (the offline CLI,
    /// tests). The sender is returned so that the channel stays open while it is kept.
    pub fn publish_once(self) -> (watch::Sender<Arc<Generation>>, Current) {
        watch::channel(Arc::new(self))
    }
}
