//! Delivery to the provider with SASL XOAUTH2.
//!
//! A STARTTLS handshake plus XOAUTH2 costs more than a small message, so each identity keeps
//! a small pool of authenticated connections (ARCHITECTURE.md, "Where the time goes"): a connection is
//! checked with RSET before reuse, closed when idle too long or when the token it logged in
//! with is about to expire, and never shared by two transactions at once. The number of
//! connections per identity is bounded (`relay.upstream_pool`), which also bounds how hard one
//! mailbox hits the provider.

pub mod classify;
pub mod client;
pub mod shaper;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::extension::ClientId;
use tokio::sync::Semaphore;

pub use classify::UpstreamReply;
pub use client::{Envelope, Security, SendError, SendOutcome, Target, Timeouts};

use crate::config::UpstreamTls;
use crate::locks::MutexExt;
use crate::oauth::provider::ProviderInfo;
use crate::oauth::tokens::AccessToken;

/// A pooled connection is closed after this long unused.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// A pooled connection is not reused when its token expires within this many seconds.
const TOKEN_MARGIN: i64 = 120;

struct Pooled {
    conn: AsyncSmtpConnection,
    token_expires_at: i64,
    idle_since: Instant,
}

/// Errors building the upstream side from the configuration.
#[derive(Debug, thiserror::Error)]
#[error("provider \"{provider}\": {message}")]
pub struct SetupError {
    pub provider: String,
    pub message: String,
}

/// The upstream side: one target per provider, one pool per identity.
pub struct Upstream {
    hello: ClientId,
    targets: HashMap<String, Target>,
    pool_size: usize,
    timeouts: Timeouts,
    pools: Mutex<HashMap<String, Vec<Pooled>>>,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
}

impl Upstream {
    pub fn new(
        hostname: &str,
        providers: &[Arc<ProviderInfo>],
        pool_size: usize,
        timeouts: Timeouts,
    ) -> Result<Upstream, SetupError> {
        let mut targets = HashMap::new();
        for p in providers {
            let Some(server) = p.smtp.clone() else { continue };
            let connector = || {
                crate::tls::client_config(p.ca_file.as_deref())
                    .map(|config| tokio_rustls::TlsConnector::from(Arc::new(config)))
                    .map_err(|e| SetupError { provider: p.name.clone(), message: format!("TLS setup: {e}") })
            };
            let security = match server.tls {
                UpstreamTls::None => Security::Plain,
                UpstreamTls::Starttls => Security::StartTls(connector()?),
                UpstreamTls::Implicit => Security::Implicit(connector()?),
            };
            targets.insert(p.name.clone(), Target { host: server.host, port: server.port, security });
        }
        Ok(Upstream {
            hello: ClientId::Domain(hostname.to_string()),
            targets,
            pool_size: pool_size.max(1),
            timeouts,
            pools: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
        })
    }

    fn limit(&self, identity: &str) -> Arc<Semaphore> {
        self.limits
            .locked()
            .entry(identity.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.pool_size)))
            .clone()
    }

    /// Sends one message as `identity` (XOAUTH2 user `user`) through `provider`'s server.
    pub async fn send(
        &self,
        identity: &str,
        provider: &str,
        user: &str,
        token: &AccessToken,
        env: &Envelope<'_>,
        body: &Path,
    ) -> Result<SendOutcome, SendError> {
        let target = self
            .targets
            .get(provider)
            .ok_or_else(|| SendError::Network(format!("provider \"{provider}\" has no smtp server")))?;
        let limit = self.limit(identity);
        let _permit = limit.acquire().await.map_err(|_| SendError::Network("shutting down".into()))?;
        let (mut conn, token_expires_at) = match self.checkout(identity).await {
            Some(p) => p,
            None => (client::connect(target, &self.hello, user, &token.secret, self.timeouts).await?, token.expires_at),
        };
        let result = client::transaction(&mut conn, env, body, self.timeouts).await;
        match &result {
            // The connection is healthy after a normal outcome or a refused transaction.
            Ok(_) => self.checkin(identity, conn, token_expires_at),
            Err(SendError::Rejected(r)) if r.code != 421 => self.checkin(identity, conn, token_expires_at),
            Err(_) => drop_connection(conn),
        }
        result
    }

    /// A pooled connection that still works, if any.
    async fn checkout(&self, identity: &str) -> Option<(AsyncSmtpConnection, i64)> {
        let now = chrono::Utc::now().timestamp();
        loop {
            let candidate = {
                let mut pools = self.pools.locked();
                pools.get_mut(identity).and_then(|v| v.pop())
            }?;
            let fresh = candidate.idle_since.elapsed() < POOL_IDLE && candidate.token_expires_at > now + TOKEN_MARGIN;
            let mut p = candidate;
            if fresh && client::reset(&mut p.conn).await {
                return Some((p.conn, p.token_expires_at));
            }
            drop_connection(p.conn);
        }
    }

    fn checkin(&self, identity: &str, conn: AsyncSmtpConnection, token_expires_at: i64) {
        let mut pools = self.pools.locked();
        let v = pools.entry(identity.to_string()).or_default();
        if v.len() < self.pool_size {
            v.push(Pooled { conn, token_expires_at, idle_since: Instant::now() });
        } else {
            drop(pools);
            drop_connection(conn);
        }
    }

    /// Closes every pooled connection of an identity (after its token was refused).
    pub fn flush_pool(&self, identity: &str) {
        let conns = self.pools.locked().remove(identity).unwrap_or_default();
        for p in conns {
            drop_connection(p.conn);
        }
    }

    /// Closes pooled connections idle for too long (called periodically).
    pub fn close_idle(&self) {
        let mut stale = Vec::new();
        {
            let mut pools = self.pools.locked();
            for v in pools.values_mut() {
                let (keep, old): (Vec<_>, Vec<_>) = v.drain(..).partition(|p| p.idle_since.elapsed() < POOL_IDLE);
                *v = keep;
                stale.extend(old);
            }
        }
        for p in stale {
            drop_connection(p.conn);
        }
    }
}

/// QUITs a connection in the background; nobody waits for it.
fn drop_connection(mut conn: AsyncSmtpConnection) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.abort()).await;
    });
}
