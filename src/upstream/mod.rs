//! Delivery to the provider with SASL XOAUTH2.
//!
//! A STARTTLS handshake plus XOAUTH2 costs more than a small message, so each identity keeps
//! a small pool of authenticated connections (ARCHITECTURE.md, "Where the time goes"): a connection is
//! checked with RSET before reuse, closed when idle too long or when the token it logged in
//! with is about to expire, and never shared by two transactions at once. The number of
//! connections per identity is bounded (`relay.upstream_pool`, at most 3 for Microsoft:
//! Exchange Online refuses a mailbox's 4th concurrent SMTP AUTH connection with
//! `432 4.3.2`), in-session attempts and the queue runner together. Should the provider still
//! answer `432 4.3.2` (another program uses the mailbox too), the identity opens one
//! connection fewer for [`SHRINK_FOR`] and the send waits for one of its own connections
//! instead: the message does not fail for it.

pub mod api;
pub mod classify;
pub mod client;
pub mod folder;
pub mod gmail;
pub mod google_api;
pub mod graph;
pub mod recipients;
pub mod shaper;
pub mod trace;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lettre::transport::smtp::extension::ClientId;
use tokio::sync::Semaphore;

pub use classify::UpstreamReply;
pub use client::{Connection, Envelope, Security, SendError, SendOutcome, Target, Timeouts};
pub use trace::{NoTrace, Observer, Step};

use crate::config::{ProviderKind, SendVia, UpstreamTls};
use crate::locks::MutexExt;
use crate::oauth::provider::ProviderInfo;
use crate::oauth::tokens::AccessToken;

/// A pooled connection is closed after this long unused.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// A pooled connection is not reused when its token expires within this many seconds.
const TOKEN_MARGIN: i64 = 120;
/// Exchange Online's concurrent SMTP AUTH connections per mailbox.
pub const EXCHANGE_CONNECTIONS: usize = 3;
/// How long an identity keeps one connection fewer after the provider said it has too many.
pub const SHRINK_FOR: Duration = Duration::from_secs(300);
/// A send refused for too many connections waits for a connection of its own this many times.
const CONCURRENCY_RETRIES: usize = 10;
/// How long such a send waits for one of its identity's connections to come back to the pool.
const CONCURRENCY_WAIT: Duration = Duration::from_secs(2);

/// The connections one identity may have open: a semaphore whose size can shrink for a while.
struct Limit {
    permits: Arc<Semaphore>,
    /// Permits not taken away by [`Limit::shrink`].
    size: Arc<AtomicUsize>,
}

impl Limit {
    fn new(size: usize) -> Limit {
        Limit { permits: Arc::new(Semaphore::new(size)), size: Arc::new(AtomicUsize::new(size)) }
    }

    /// One connection fewer for [`SHRINK_FOR`] (never fewer than one): the permit is taken as
    /// soon as a connection is free and given back later.
    fn shrink(&self, identity: &str) {
        let Ok(was) = self.size.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n > 1).then(|| n - 1)) else {
            return;
        };
        tracing::warn!(
            identity,
            connections = was - 1,
            "the provider has too many connections for this mailbox: one fewer for {} s",
            SHRINK_FOR.as_secs()
        );
        let (permits, size) = (self.permits.clone(), self.size.clone());
        tokio::spawn(async move {
            if let Ok(p) = permits.clone().acquire_owned().await {
                p.forget();
                tokio::time::sleep(SHRINK_FOR).await;
                permits.add_permits(1);
            }
            size.fetch_add(1, Ordering::SeqCst);
        });
    }
}

/// A provider's server and how many connections each of its identities may open.
struct Route {
    target: Target,
    pool_size: usize,
}

/// Whether a send may use a pooled connection.
#[derive(Clone, Copy)]
enum Fresh {
    Pooled,
    Always,
}

struct Pooled {
    conn: Connection,
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
    routes: HashMap<String, Route>,
    timeouts: Timeouts,
    pools: Mutex<HashMap<String, Vec<Pooled>>>,
    limits: Mutex<HashMap<String, Arc<Limit>>>,
    /// The SIZE each provider's server advertised in EHLO (RFC 1870), by provider name.
    advertised: Mutex<HashMap<String, u64>>,
    /// Signalled whenever a connection goes back to a pool.
    returned: tokio::sync::Notify,
    /// Microsoft Graph, by provider name (Microsoft providers).
    graph: HashMap<String, graph::Graph>,
    /// The Gmail API, by provider name (Google providers).
    gmail: HashMap<String, gmail::Gmail>,
}

impl Upstream {
    pub fn new(
        hostname: &str,
        providers: &[Arc<ProviderInfo>],
        pool_size: usize,
        timeouts: Timeouts,
    ) -> Result<Upstream, SetupError> {
        let mut routes = HashMap::new();
        let (mut graphs, mut gmails) = (HashMap::new(), HashMap::new());
        for p in providers {
            let setup = |message: String| SetupError { provider: p.name.clone(), message };
            if let Some(url) = &p.graph_url {
                graphs.insert(p.name.clone(), graph::Graph::new(url, p.ca_file.as_deref()).map_err(setup)?);
            }
            if let Some(url) = &p.gmail_api_url {
                gmails.insert(p.name.clone(), gmail::Gmail::new(url, p.ca_file.as_deref()).map_err(setup)?);
            }
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
            let target = Target { host: server.host, port: server.port, security };
            let pool_size = match p.kind {
                ProviderKind::Microsoft => pool_size.clamp(1, EXCHANGE_CONNECTIONS),
                _ => pool_size.max(1),
            };
            routes.insert(p.name.clone(), Route { target, pool_size });
        }
        Ok(Upstream {
            hello: ClientId::Domain(hostname.to_string()),
            routes,
            timeouts,
            pools: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
            advertised: Mutex::new(HashMap::new()),
            returned: tokio::sync::Notify::new(),
            graph: graphs,
            gmail: gmails,
        })
    }

    fn limit(&self, identity: &str, size: usize) -> Arc<Limit> {
        self.limits.locked().entry(identity.to_string()).or_insert_with(|| Arc::new(Limit::new(size))).clone()
    }

    /// Sends one message by `via` (SMTP, Graph or the Gmail API) with a token for that path,
    /// on a pooled SMTP connection when there is one.
    ///
    /// XOAUTH2's user is the token's owner: for a delegate who signed in for a shared mailbox
    /// that is the delegate, and the shared address only goes in MAIL FROM and From (Exchange
    /// answers `535 5.7.3` to user=shared with a delegate's token).
    pub async fn send(
        &self,
        via: SendVia,
        provider: &str,
        token: &AccessToken,
        msg: &api::Outbound<'_>,
    ) -> Result<SendOutcome, SendError> {
        self.dispatch(via, provider, token, msg, Fresh::Pooled).await
    }

    /// [`Upstream::send`] reporting each step to `msg.obs`, by SMTP on a connection of its own
    /// (never a pooled one, and closed after): `mfd-relay test` shows connect, TLS and AUTH as
    /// a device's first message would meet them.
    pub async fn send_traced(
        &self,
        via: SendVia,
        provider: &str,
        token: &AccessToken,
        msg: &api::Outbound<'_>,
    ) -> Result<SendOutcome, SendError> {
        self.dispatch(via, provider, token, msg, Fresh::Always).await
    }

    async fn dispatch(
        &self,
        via: SendVia,
        provider: &str,
        token: &AccessToken,
        msg: &api::Outbound<'_>,
        fresh: Fresh,
    ) -> Result<SendOutcome, SendError> {
        let missing = || SendError::Network(format!("provider \"{provider}\" has no {via} endpoint"));
        match via {
            SendVia::Smtp => {
                let (identity, user) = (msg.identity, token.account.as_str());
                self.send_observed(identity, provider, user, token, msg.env, msg.body, fresh, msg.obs).await
            }
            SendVia::Graph => self.graph.get(provider).ok_or_else(missing)?.send(token, msg).await,
            SendVia::GmailApi => self.gmail.get(provider).ok_or_else(missing)?.send(token, msg).await,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_observed(
        &self,
        identity: &str,
        provider: &str,
        user: &str,
        token: &AccessToken,
        env: &Envelope<'_>,
        body: &Path,
        fresh: Fresh,
        obs: &dyn Observer,
    ) -> Result<SendOutcome, SendError> {
        let route = self
            .routes
            .get(provider)
            .ok_or_else(|| SendError::Network(format!("provider \"{provider}\" has no smtp server")))?;
        let limit = self.limit(identity, route.pool_size);
        let mut tries = 0;
        loop {
            let permit = limit.permits.acquire().await.map_err(|_| SendError::Network("shutting down".into()))?;
            let pooled = match fresh {
                Fresh::Pooled => self.checkout(identity).await,
                Fresh::Always => None,
            };
            let reused = pooled.is_some();
            let (mut conn, token_expires_at) = match pooled {
                Some(p) => p,
                None => {
                    match client::connect(&route.target, &self.hello, user, &token.secret, self.timeouts, obs).await {
                        Ok((conn, size)) => {
                            if let Some(size) = size {
                                self.advertised.locked().insert(provider.to_string(), size);
                            }
                            (conn, token.expires_at)
                        }
                        // Too many connections for this mailbox: open fewer, and wait for one of
                        // ours to come back to the pool rather than fail the message.
                        Err(SendError::Rejected(r)) if too_many_connections(&r) && tries < CONCURRENCY_RETRIES => {
                            tries += 1;
                            let returned = self.returned.notified();
                            drop(permit);
                            limit.shrink(identity);
                            let _ = tokio::time::timeout(CONCURRENCY_WAIT, returned).await;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            let result = match client::transaction(&mut conn, env, body, self.timeouts, reused, obs).await {
                Ok(o) => Ok(o),
                Err(client::TxError::Send(e)) => Err(e),
                // The pooled connection died while idle; nothing was sent: take another.
                Err(client::TxError::Stale(why)) => {
                    tracing::debug!(identity, "pooled connection unusable ({why}); opening another");
                    drop_connection(conn);
                    drop(permit);
                    continue;
                }
            };
            match &result {
                Err(SendError::Rejected(r)) if too_many_connections(r) => {
                    limit.shrink(identity);
                    drop_connection(conn);
                }
                // A test's connection is not kept: the next test shows connect, TLS and AUTH.
                _ if matches!(fresh, Fresh::Always) => drop_connection(conn),
                // The connection is healthy after a normal outcome or a refused transaction.
                Ok(_) => self.checkin(identity, conn, token_expires_at, route.pool_size),
                Err(SendError::Rejected(r)) if r.code != 421 => {
                    self.checkin(identity, conn, token_expires_at, route.pool_size)
                }
                Err(_) => drop_connection(conn),
            }
            return result;
        }
    }

    /// The message size `provider`'s server advertised in its last EHLO, if known.
    pub fn advertised_size(&self, provider: &str) -> Option<u64> {
        self.advertised.locked().get(provider).copied()
    }

    /// The largest message `provider` takes by `via`: by SMTP what it was configured with or
    /// its server advertised, through an API the API's limit.
    pub fn size_limit(&self, provider: &ProviderInfo, via: SendVia) -> Option<u64> {
        match via {
            SendVia::Smtp => provider.size_limit(self.advertised_size(&provider.name)),
            via => provider.api_size_limit(via),
        }
    }

    /// A pooled connection that still works, if any. One that pipelines is checked by the RSET
    /// at the head of its next flight (`client::transaction`), not by a round trip here.
    async fn checkout(&self, identity: &str) -> Option<(Connection, i64)> {
        let now = chrono::Utc::now().timestamp();
        loop {
            let candidate = {
                let mut pools = self.pools.locked();
                pools.get_mut(identity).and_then(|v| v.pop())
            }?;
            let fresh = candidate.idle_since.elapsed() < POOL_IDLE && candidate.token_expires_at > now + TOKEN_MARGIN;
            let mut p = candidate;
            if fresh && (p.conn.pipelining || client::reset(&mut p.conn).await) {
                return Some((p.conn, p.token_expires_at));
            }
            drop_connection(p.conn);
        }
    }

    fn checkin(&self, identity: &str, conn: Connection, token_expires_at: i64, pool_size: usize) {
        let mut pools = self.pools.locked();
        let v = pools.entry(identity.to_string()).or_default();
        if v.len() < pool_size {
            v.push(Pooled { conn, token_expires_at, idle_since: Instant::now() });
            drop(pools);
            self.returned.notify_waiters();
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

/// Exchange's `432 4.3.2 Concurrent connections limit exceeded` (and its "sender thread
/// limit" variant at the end of DATA): the mailbox has too many connections open at once.
pub fn too_many_connections(reply: &UpstreamReply) -> bool {
    reply.code == 432 || matches!(reply.status(), Some(s) if (s.0, s.1, s.2) == (4, 3, 2))
}

/// QUITs a connection in the background; nobody waits for it.
fn drop_connection(mut conn: Connection) {
    tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.abort()).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn providers(text: &str) -> Vec<Arc<ProviderInfo>> {
        let c = crate::config::Config::parse(Path::new("/etc/mfd/c.toml"), text.to_string()).expect("parses");
        c.providers.iter().map(|p| Arc::new(ProviderInfo::from_config(&c, p.get_ref()))).collect()
    }

    #[test]
    fn exchange_gets_at_most_three_connections_per_identity() {
        let p = providers(
            "[[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"t\"\nclient_id = \"x\"\n\n\
             [[provider]]\nname = \"g\"\nkind = \"generic\"\nclient_id = \"x\"\ntoken_url = \"http://127.0.0.1:9/t\"\nsmtp = \"127.0.0.1:25\"\nsmtp_tls = \"none\"\n",
        );
        let pool = |size| Upstream::new("relay.test", &p, size, Timeouts::new(Duration::from_secs(5))).expect("builds");
        let sizes = |u: &Upstream| (u.routes["m"].pool_size, u.routes["g"].pool_size);
        assert_eq!(sizes(&pool(4)), (3, 4));
        assert_eq!(sizes(&pool(8)), (3, 8));
        assert_eq!(sizes(&pool(2)), (2, 2));
        assert_eq!(sizes(&pool(0)), (1, 1));
    }

    #[test]
    fn a_432_4_3_2_is_too_many_connections() {
        assert!(too_many_connections(&UpstreamReply::new(432, "4.3.2 Concurrent connections limit exceeded.")));
        assert!(too_many_connections(&UpstreamReply::new(
            452,
            "4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded"
        )));
        assert!(!too_many_connections(&UpstreamReply::new(451, "4.3.0 Temporary server error")));
        assert!(!too_many_connections(&UpstreamReply::new(535, "5.7.3 Authentication unsuccessful")));
    }

    #[tokio::test]
    async fn a_limit_shrinks_for_a_while_but_never_to_nothing() {
        let limit = Limit::new(2);
        limit.shrink("scans");
        tokio::task::yield_now().await;
        assert_eq!(limit.size.load(Ordering::SeqCst), 1);
        assert_eq!(limit.permits.available_permits(), 1, "one permit taken away");
        limit.shrink("scans");
        assert_eq!(limit.size.load(Ordering::SeqCst), 1, "never below one");
    }
}
