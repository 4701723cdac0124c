//! The token manager: a valid access token per identity, on demand and ahead of time.
//!
//! - One refresh in flight per identity: callers queue on the identity's lock, and whoever
//!   gets it after a refresh finds the new token in memory, or shares that refresh's failure
//!   (a revoked refresh token is sent once, not once per waiting caller).
//! - A sign-in takes the same lock, so an older refresh still in flight cannot undo it; and
//!   a result whose starting tokens are no longer current is dropped.
//! - Tokens are refreshed before they expire: at `expires_in` minus 10 minutes (or half the
//!   lifetime when it is shorter), and at least daily for idle identities, so that a refresh
//!   token never dies of disuse (Microsoft: 90 days).
//! - `invalid_grant` and other "a person must act" answers put the identity in `needs_login`
//!   loud in logs, metrics and `auth status`; its mail stays queued. Entra sometimes answers
//!   `invalid_grant` for a passing condition, so a refusal that names no well-known cause is
//!   asked again once, after the usual minute of backoff, before anyone is told to sign in.
//! - An Entra access token is for one resource: an identity that sends through Graph and
//!   reads a mailbox over IMAP holds a Graph token and an Exchange Online token
//!   ([`Resource`]). Delegated identities get each from the one refresh token, one resource
//!   per request (Entra refuses several at once, AADSTS28000); app-only identities make a
//!   client-credentials request per resource. Each is refreshed on its own schedule and
//!   after its own rejection; the single-flight rules above hold per identity.
//! - Every record is stored encrypted ([`super::vault`]) and committed to disk before it
//!   is used: a rotated refresh token must survive a crash right after it was issued.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use oauth2::basic::BasicErrorResponse;
use oauth2::RequestTokenError;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use super::provider::ProviderInfo;
use super::provider::{Resource, Uses};
use super::vault::Vault;
use crate::config::{Config, Flow, SendVia};
use crate::locks::MutexExt;
use crate::metrics;
use crate::store::{Store, Tree};

/// Refresh this long before expiry (at least 10 minutes early).
const REFRESH_EARLY: i64 = 10 * 60;
/// Idle identities are refreshed at least this often.
const REFRESH_IDLE: i64 = 24 * 3600;
/// A token this close to expiry is not handed out.
const MIN_VALIDITY: i64 = 60;
/// Timeout of one token request.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// An access token. Its Debug form never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken {
    pub secret: String,
    pub account: String,
    /// Unix seconds.
    pub expires_at: i64,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("account", &self.account)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Why no token could be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// A person must act: sign in again, fix the app registration or the secret.
    #[error("needs login: {0}")]
    NeedsLogin(String),
    /// Network trouble, provider down or slow: try again later.
    #[error("token endpoint unavailable: {0}")]
    Transient(String),
    #[error("unknown identity \"{0}\"")]
    UnknownIdentity(String),
    #[error("{0}")]
    Config(String),
}

/// The state of an identity, for `auth status`, metrics and /readyz.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IdentityState {
    /// Has (or can get) tokens.
    Ready,
    /// Never signed in, or the provider refused the stored grant.
    #[default]
    NeedsLogin,
    /// The last refresh failed for a passing reason; the last token may still be valid.
    Error,
}

impl IdentityState {
    pub fn as_str(&self) -> &'static str {
        match self {
            IdentityState::Ready => "ready",
            IdentityState::NeedsLogin => "needs_login",
            IdentityState::Error => "error",
        }
    }
}

/// What is stored per identity (encrypted as a whole). The access token in the top-level
/// fields is the one for `resource` (the identity's sign-in resource when it was stored;
/// records written before tokens were kept per resource have none there: `Mail`); tokens of
/// the identity's other resources are in `resources`.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct TokenRecord {
    pub state: IdentityState,
    pub account: Option<String>,
    pub refresh_token: Option<String>,
    pub access_token: Option<String>,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    /// When to refresh (unix seconds).
    pub refresh_at: Option<i64>,
    pub scopes: Vec<String>,
    pub last_refresh: Option<i64>,
    pub last_error: Option<String>,
    /// The resource of the top-level access token (`None`: `Mail`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Resource>,
    /// The access tokens of the other resources.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resources: BTreeMap<Resource, ResourceToken>,
}

/// One resource's access token.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceToken {
    pub access_token: Option<String>,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    /// When to refresh (unix seconds).
    pub refresh_at: Option<i64>,
    /// When this token was obtained (unix seconds).
    #[serde(default)]
    pub last_refresh: Option<i64>,
}

impl TokenRecord {
    /// The resource of the top-level token.
    fn top_resource(&self) -> Resource {
        self.resource.unwrap_or(Resource::Mail)
    }

    /// The token of `resource`, wherever it is kept.
    pub fn token(&self, resource: Resource) -> ResourceToken {
        if resource == self.top_resource() {
            ResourceToken {
                access_token: self.access_token.clone(),
                expires_at: self.expires_at,
                refresh_at: self.refresh_at,
                last_refresh: self.last_refresh,
            }
        } else {
            self.resources.get(&resource).cloned().unwrap_or_default()
        }
    }

    /// Sets the token of `resource`.
    fn put_token(&mut self, resource: Resource, t: ResourceToken) {
        if resource == self.top_resource() {
            self.access_token = t.access_token;
            self.expires_at = t.expires_at;
            self.refresh_at = t.refresh_at;
        } else {
            self.resources.insert(resource, t);
        }
    }

    /// Forgets every access token (the grant they came from is gone).
    fn clear_access_tokens(&mut self) {
        self.access_token = None;
        self.resources.clear();
    }

    /// Makes `sign_in` the resource of the top-level token, moving the tokens where they
    /// belong: a record stored under another configuration (a mailbox added to a Graph
    /// identity, say) keeps every token it has, each under its own resource.
    fn arrange(&mut self, sign_in: Resource) {
        if self.top_resource() == sign_in {
            return;
        }
        let old = self.top_resource();
        let top = self.token(old);
        let new_top = self.resources.remove(&sign_in).unwrap_or_default();
        if top.access_token.is_some() {
            self.resources.insert(old, top);
        }
        self.resource = Some(sign_in);
        self.access_token = new_top.access_token;
        self.expires_at = new_top.expires_at;
        self.refresh_at = new_top.refresh_at;
    }
}

/// A token endpoint's answer, whatever the grant.
#[derive(Clone)]
pub struct TokenSet {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_in: Option<Duration>,
    pub scopes: Vec<String>,
    pub account: Option<String>,
}

/// How the refreshes of one identity went, for callers that waited on the lock.
#[derive(Default)]
struct Flights {
    /// Refresh attempts finished so far.
    done: u64,
    /// The last attempt's failure (None: it succeeded).
    failure: Option<TokenError>,
}

/// One identity's live data.
pub struct Slot {
    pub name: String,
    pub email: String,
    pub flow: Flow,
    pub provider: Arc<ProviderInfo>,
    /// What an interactive sign-in asks consent for: every resource's scopes at once.
    pub scopes: Vec<String>,
    /// The resources this identity needs tokens for, with each one's token-request scopes;
    /// the first is the sign-in resource (never empty).
    resources: Vec<(Resource, Vec<String>)>,
    /// Sends per minute allowed to this identity (None: unlimited).
    pub messages_per_minute: Option<u32>,
    /// How this identity's mail goes upstream.
    pub send_via: SendVia,
    /// Held while refreshing, signing in or out: one change of tokens at a time.
    flight: tokio::sync::Mutex<()>,
    record: Mutex<TokenRecord>,
    /// Bumped whenever new tokens become current (save, logout): a refresh that started
    /// under another generation must not apply its result.
    generation: std::sync::atomic::AtomicU64,
    flights: Mutex<Flights>,
    /// Per resource: unix seconds before which the background refresher leaves a failing
    /// token alone, and the failures in a row.
    retry_after: Mutex<HashMap<Resource, (i64, u32)>>,
    /// Unix seconds of a refusal that named no certain cause (see [`doubtful_refusal`]), 0
    /// when there is none: the provider is asked again [`DOUBT_RECHECK`] later, and a second
    /// such answer is believed.
    doubted_at: std::sync::atomic::AtomicI64,
    /// Resources whose last token request was refused for a reason a person must fix (a
    /// Graph consent missing from an older sign-in, say), with the refusal: another
    /// resource's new token does not make the identity ready while one is left.
    refused: Mutex<BTreeMap<Resource, String>>,
}

impl Slot {
    /// The resources this identity needs tokens for, its sign-in resource first.
    pub fn resources(&self) -> Vec<Resource> {
        self.resources.iter().map(|(r, _)| *r).collect()
    }

    /// The resource whose token a sign-in returns (what [`TokenManager::access_token`] gives).
    pub fn sign_in_resource(&self) -> Resource {
        self.resources.first().map(|(r, _)| *r).unwrap_or(Resource::Mail)
    }

    /// The scopes of a token request for `resource` (one resource only).
    pub fn scopes_for(&self, resource: Resource) -> &[String] {
        self.resources.iter().find(|(r, _)| *r == resource).map(|(_, s)| s.as_slice()).unwrap_or(&[])
    }

    /// The resource to fetch for a caller's `resource`: Google's and generic providers'
    /// one token serves every use; a Microsoft identity has only the resources its
    /// configuration needs.
    fn resolve(&self, resource: Resource) -> Result<Resource, TokenError> {
        if self.resources.iter().any(|(r, _)| *r == resource) {
            Ok(resource)
        } else if self.provider.kind != crate::config::ProviderKind::Microsoft {
            Ok(self.sign_in_resource())
        } else {
            Err(TokenError::Config(format!(
                "identity \"{}\" has no {} token: its configuration (send_via, mailboxes) needs only {}",
                self.name,
                resource.as_str(),
                self.resources().iter().map(|r| r.as_str()).collect::<Vec<_>>().join(" and ")
            )))
        }
    }

    fn record(&self) -> TokenRecord {
        self.record.locked().clone()
    }

    fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn flights_done(&self) -> u64 {
        self.flights.locked().done
    }

    /// The failure of a refresh that finished after `seen` attempts, if the last one failed.
    fn failure_since(&self, seen: u64) -> Option<TokenError> {
        let f = self.flights.locked();
        if f.done > seen {
            f.failure.clone()
        } else {
            None
        }
    }

    fn flight_finished(&self, failure: Option<TokenError>) {
        let mut f = self.flights.locked();
        f.done += 1;
        f.failure = failure;
    }

    /// A token of `resource` from memory that is valid long enough and not due for refresh.
    fn fresh(&self, resource: Resource, now: i64) -> Option<AccessToken> {
        self.token_in_memory(resource, now, true)
    }

    /// A token that is still valid, even if due for refresh (used when a refresh fails).
    fn still_valid(&self, resource: Resource, now: i64) -> Option<AccessToken> {
        self.token_in_memory(resource, now, false)
    }

    fn token_in_memory(&self, resource: Resource, now: i64, before_refresh: bool) -> Option<AccessToken> {
        let r = self.record.locked();
        let tok = r.token(resource);
        let (Some(t), Some(exp)) = (tok.access_token, tok.expires_at) else { return None };
        let due = before_refresh && now >= tok.refresh_at.unwrap_or(exp);
        (now + MIN_VALIDITY < exp && !due).then(|| AccessToken {
            secret: t,
            account: r.account.clone().unwrap_or_else(|| self.email.clone()),
            expires_at: exp,
        })
    }
}

/// One identity's status line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityStatus {
    pub name: String,
    pub provider: String,
    pub flow: String,
    /// The account the tokens were issued to (from the ID token of a sign-in), or the
    /// configured mailbox before any token.
    pub account: String,
    /// The configured mailbox (`[[identity]] email`): the relay sends from it.
    #[serde(default)]
    pub mailbox: String,
    /// Whether `account` comes from a token (some sign-in or token request succeeded).
    #[serde(default)]
    pub signed_in: bool,
    pub state: String,
    pub expires_at: Option<i64>,
    pub last_refresh: Option<i64>,
    pub last_error: Option<String>,
    pub has_refresh_token: bool,
    /// Each resource's access token (the sign-in resource's first, as in `expires_at`).
    #[serde(default)]
    pub tokens: Vec<TokenStatus>,
}

/// One resource's access token in a status line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenStatus {
    /// `mail` or `graph` ([`Resource::as_str`]).
    pub resource: String,
    /// Unix seconds; `None`: no token held.
    pub expires_at: Option<i64>,
}

/// The token manager.
pub struct TokenManager {
    store: Arc<Store>,
    vault: Arc<Vault>,
    http: reqwest::Client,
    slots: HashMap<String, Arc<Slot>>,
    ready: tokio::sync::broadcast::Sender<String>,
    /// Client certificates to watch: (provider, certificate file).
    certificates: Vec<(String, std::path::PathBuf)>,
    /// Token requests in flight at once, for every identity together (see
    /// [`TOKEN_REQUESTS_AT_ONCE`]); shared by every configuration generation.
    requests: Arc<tokio::sync::Semaphore>,
}

/// At most this many token requests are out at once. A large site starts with hundreds of
/// identities and mailboxes that all want a token in the same second; unbounded, that is a
/// burst the provider throttles (Entra answers 429 to a tenant's burst) and as many TLS
/// handshakes on the relay's two cores. Sixteen at ~100 ms each still gets 1,000 identities
/// their tokens in seconds (BENCHMARKS.md, "A fleet").
pub const TOKEN_REQUESTS_AT_ONCE: usize = 16;

/// At shutdown, refreshes already under way get this long to store their answer.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The background refresher refreshes this many identities at once (fewer than
/// [`TOKEN_REQUESTS_AT_ONCE`], so that a device's on-demand request always finds a slot).
const REFRESHES_AT_ONCE: usize = 8;

/// Warn this long before a client certificate expires.
const CERT_WARNING: i64 = 30 * 24 * 3600;

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// The HTTP client for token requests: rustls, no redirects (RFC 6749 10.6 / oauth2 docs).
pub fn http_client(ca_files: &[std::path::PathBuf]) -> Result<reqwest::Client, String> {
    let paths: Vec<&std::path::Path> = ca_files.iter().map(|p| p.as_path()).collect();
    crate::tls::http_client(&paths, HTTP_TIMEOUT)
}

impl TokenManager {
    /// Builds the manager from a validated configuration and loads stored records.
    ///
    /// On a reload, `previous` is the running manager: identities whose provider, mailbox,
    /// flow and scopes are unchanged keep their slot (tokens in memory, a refresh in flight),
    /// and "ready" notifications keep reaching whoever listens to the previous manager's.
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        vault: Arc<Vault>,
        previous: Option<&TokenManager>,
    ) -> Result<TokenManager, TokenError> {
        let mut slots = HashMap::new();
        let mut providers: HashMap<String, Arc<ProviderInfo>> = HashMap::new();
        let mut ca_files = Vec::new();
        for p in &config.providers {
            let info = ProviderInfo::from_config(config, p.get_ref());
            if let Some(ca) = &info.ca_file {
                ca_files.push(ca.clone());
            }
            providers.insert(info.name.clone(), Arc::new(info));
        }
        for id in &config.identities {
            let id = id.get_ref();
            let name = id.name.get_ref().clone();
            let Some(provider) = providers.get(id.provider.get_ref()).cloned() else {
                return Err(TokenError::Config(format!("identity \"{name}\": unknown provider")));
            };
            let uses = Uses::of(config, &name);
            let flow = *id.flow.get_ref();
            let send_via = uses.send_via;
            let scopes = provider.sign_in_scopes(flow, uses);
            let resources: Vec<(Resource, Vec<String>)> =
                provider.resources(uses).into_iter().map(|r| (r, provider.resource_scopes(flow, r, uses))).collect();
            let messages_per_minute = id.messages_per_minute.or(provider.messages_per_minute).filter(|n| *n > 0);
            let email = id.email.get_ref().clone();
            if let Some(old) = previous.and_then(|p| p.slots.get(&name)) {
                if *old.provider == *provider
                    && old.email == email
                    && old.flow == flow
                    && old.scopes == scopes
                    && old.resources == resources
                    && old.messages_per_minute == messages_per_minute
                    && old.send_via == send_via
                {
                    slots.insert(name.clone(), old.clone());
                    continue;
                }
            }
            let record = match store.get(Tree::Tokens, name.as_bytes()) {
                Ok(Some(sealed)) => match vault.unseal(&name, &sealed) {
                    Ok(plain) => serde_json::from_slice(&plain).unwrap_or_default(),
                    Err(e) => {
                        tracing::error!(identity = %name, "{e}");
                        TokenRecord { last_error: Some(e.to_string()), ..Default::default() }
                    }
                },
                _ => TokenRecord::default(),
            };
            let mut record = record;
            record.arrange(resources.first().map(|(r, _)| *r).unwrap_or(Resource::Mail));
            if flow == Flow::ClientCredentials || flow == Flow::ServiceAccount {
                // App-only identities need no sign-in: they are ready unless a request fails.
                if record.state == IdentityState::NeedsLogin && record.last_error.is_none() {
                    record.state = IdentityState::Ready;
                }
            }
            metrics::IDENTITY_STATE.with_label_values(&[&name]).set(state_value(record.state));
            slots.insert(
                name.clone(),
                Arc::new(Slot {
                    name: name.clone(),
                    email,
                    flow,
                    provider,
                    scopes,
                    resources,
                    messages_per_minute,
                    send_via,
                    flight: tokio::sync::Mutex::new(()),
                    record: Mutex::new(record),
                    generation: Default::default(),
                    flights: Default::default(),
                    retry_after: Mutex::new(HashMap::new()),
                    doubted_at: Default::default(),
                    refused: Default::default(),
                }),
            );
        }
        // One client for all providers; extra CAs (tests, private clouds) are added to it.
        let http = http_client(&ca_files).map_err(TokenError::Config)?;
        let ready = match previous {
            Some(p) => p.ready.clone(),
            None => tokio::sync::broadcast::channel(64).0,
        };
        let certificates =
            providers.values().filter_map(|p| p.client_certificate.clone().map(|c| (p.name.clone(), c))).collect();
        let requests = match previous {
            Some(p) => p.requests.clone(),
            None => Arc::new(tokio::sync::Semaphore::new(TOKEN_REQUESTS_AT_ONCE)),
        };
        Ok(TokenManager { store, vault, http, slots, ready, certificates, requests })
    }

    pub fn slot(&self, name: &str) -> Result<&Arc<Slot>, TokenError> {
        self.slots.get(name).ok_or_else(|| TokenError::UnknownIdentity(name.into()))
    }

    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Identity names that became ready (after a sign-in or a recovered refresh).
    pub fn subscribe_ready(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.ready.subscribe()
    }

    /// The state of an identity now.
    pub fn state(&self, name: &str) -> Option<IdentityState> {
        self.slots.get(name).map(|s| s.record.locked().state)
    }

    /// A valid access token for `name`'s sign-in resource (the mail servers' token, or
    /// Graph's for an identity that only sends through Graph), refreshing if needed.
    pub async fn access_token(&self, name: &str) -> Result<AccessToken, TokenError> {
        let slot = self.slot(name)?;
        self.token_of(slot, slot.sign_in_resource()).await
    }

    /// A valid access token of `name` for `resource` (Graph or the mail servers), refreshing
    /// that resource's token if needed. Google's and generic identities have one token,
    /// returned whatever the resource; a Microsoft identity whose configuration does not need
    /// `resource` gets [`TokenError::Config`].
    pub async fn access_token_for(&self, name: &str, resource: Resource) -> Result<AccessToken, TokenError> {
        let slot = self.slot(name)?;
        let resource = slot.resolve(resource)?;
        self.token_of(slot, resource).await
    }

    async fn token_of(&self, slot: &Slot, resource: Resource) -> Result<AccessToken, TokenError> {
        if let Some(t) = slot.fresh(resource, now()) {
            return Ok(t);
        }
        let seen = slot.flights_done();
        let _flight = slot.flight.lock().await;
        if let Some(t) = slot.fresh(resource, now()) {
            return Ok(t);
        }
        // A refresh finished while we waited and failed: share its answer rather than send
        // the same (perhaps revoked) refresh token again.
        let result = match slot.failure_since(seen) {
            Some(e) => Err(e),
            None => self.refresh_locked(slot, resource).await,
        };
        match result {
            Ok(t) => Ok(t),
            // A passing failure with a still-valid token in hand: use it.
            Err(TokenError::Transient(e)) => slot.still_valid(resource, now()).ok_or(TokenError::Transient(e)),
            Err(e) => Err(e),
        }
    }

    /// The upstream (Graph, the mail servers) refused `rejected`, a token of `name` for
    /// `resource`: get a new one of that resource only, unless someone already did.
    pub async fn refresh_after_rejection_for(
        &self,
        name: &str,
        resource: Resource,
        rejected: &AccessToken,
    ) -> Result<AccessToken, TokenError> {
        let slot = self.slot(name)?;
        let resource = slot.resolve(resource)?;
        let seen = slot.flights_done();
        let _flight = slot.flight.lock().await;
        if let Some(t) = slot.still_valid(resource, now()) {
            if t.secret != rejected.secret {
                return Ok(t);
            }
        }
        if let Some(e) = slot.failure_since(seen) {
            return Err(e);
        }
        self.refresh_locked(slot, resource).await
    }

    /// Gets new tokens now, whatever the ones in hand, for every resource of the identity
    /// (sign-in of app-only identities, "fetch a token now"); returns the sign-in resource's.
    pub async fn refresh_now(&self, name: &str) -> Result<AccessToken, TokenError> {
        let slot = self.slot(name)?;
        let _flight = slot.flight.lock().await;
        let first = self.refresh_locked(slot, slot.sign_in_resource()).await?;
        for r in slot.resources().into_iter().skip(1) {
            // The first token proves the sign-in works; another resource's failure (a missing
            // Graph permission, say) is recorded and shown, and does not undo it.
            if let Err(e) = self.refresh_locked(slot, r).await {
                tracing::warn!(identity = %slot.name, resource = r.as_str(), "no {} token: {e}", r.as_str());
            }
        }
        Ok(first)
    }

    /// The upstream refused `rejected`, a token of `name`'s sign-in resource: get a new one
    /// unless someone already did.
    pub async fn refresh_after_rejection(&self, name: &str, rejected: &AccessToken) -> Result<AccessToken, TokenError> {
        let slot = self.slot(name)?;
        self.refresh_after_rejection_for(name, slot.sign_in_resource(), rejected).await
    }

    /// Gets a new access token for `resource` from the provider; the caller holds the flight
    /// lock.
    async fn refresh_locked(&self, slot: &Slot, resource: Resource) -> Result<AccessToken, TokenError> {
        if let Some(wait) = doubt_pending(&slot.doubted_at, now()) {
            // The provider is asked again once the minute is over, not once per waiting caller.
            return Err(TokenError::Transient(format!(
                "the provider refused the refresh token with no certain cause; asking again in {wait} s"
            )));
        }
        let record = slot.record();
        let generation = slot.generation();
        let scopes = slot.scopes_for(resource);
        // Closed never: the semaphore lives as long as the manager.
        let permit = self.requests.acquire().await;
        let result = match slot.flow {
            Flow::ClientCredentials => super::flows::client_credentials(&self.http, slot, scopes).await,
            Flow::ServiceAccount => super::flows::service_account(&self.http, slot, scopes).await,
            Flow::DeviceCode | Flow::AuthCode => match &record.refresh_token {
                Some(rt) => self.refresh_grant(slot, rt, scopes).await,
                None => {
                    Err(TokenError::NeedsLogin(format!("not signed in yet: run `mfd-relay auth login {}`", slot.name)))
                }
            },
        };
        drop(permit);
        metrics::TOKEN_REFRESHES
            .with_label_values(&[slot.name.as_str(), if result.is_ok() { "ok" } else { "error" }])
            .inc();
        // Tokens changed while the request was out (the lock makes this unlikely, but a
        // result for tokens that are no longer current must never be applied).
        let current = slot.record();
        if slot.generation() != generation || current.refresh_token != record.refresh_token {
            tracing::debug!(identity = %slot.name, "refresh result dropped: the tokens changed meanwhile");
            slot.flight_finished(None);
            return slot
                .still_valid(resource, now())
                .ok_or_else(|| TokenError::Transient("the tokens changed during the refresh; try again".into()));
        }
        let result = match result.map_err(|e| second_opinion(&slot.doubted_at, now(), &slot.name, e)) {
            Ok(set) => self.save_locked(slot, resource, set, false).await,
            Err(e) => {
                self.record_failure(slot, resource, &e).await;
                Err(e)
            }
        };
        slot.flight_finished(result.as_ref().err().cloned());
        result
    }

    /// Makes the tokens of a completed sign-in current: its access token is for the
    /// identity's sign-in resource; the other resources' tokens (from the previous grant) are
    /// dropped and fetched again from the new refresh token. It waits for a refresh in
    /// flight, so that refresh's answer (an `invalid_grant` for the old token, say) lands
    /// first and the sign-in's tokens win.
    pub async fn sign_in(&self, slot: &Slot, set: TokenSet) -> Result<AccessToken, TokenError> {
        let _flight = slot.flight.lock().await;
        let result = self.save_locked(slot, slot.sign_in_resource(), set, true).await;
        if result.is_ok() {
            slot.flight_finished(None);
        }
        result
    }

    /// RFC 6749 6 with one resource's `scopes`.
    async fn refresh_grant(&self, slot: &Slot, refresh_token: &str, scopes: &[String]) -> Result<TokenSet, TokenError> {
        let mut form = vec![("grant_type", "refresh_token".to_string()), ("refresh_token", refresh_token.to_string())];
        // The OpenID scopes only name who signs in (the account is kept from the sign-in), and a
        // refresh may ask for no more than its sign-in granted: an identity signed in before
        // the relay asked for them must go on refreshing (Entra answers AADSTS70000 otherwise).
        let scopes: Vec<&str> =
            scopes.iter().map(String::as_str).filter(|s| !matches!(*s, "openid" | "profile" | "email")).collect();
        if !scopes.is_empty() {
            form.push(("scope", scopes.join(" ")));
        }
        let mut set = super::flows::client_token_request(&self.http, &slot.provider, form).await?;
        // No new refresh token in the answer: keep the old one (RFC 6749 6).
        if set.refresh_token.is_none() {
            set.refresh_token = Some(refresh_token.to_string());
        }
        Ok(set)
    }

    /// Stores a new token set for `resource` (from a refresh or a sign-in) and makes it
    /// current; the caller holds the flight lock. A rotated refresh token replaces the one
    /// every resource refreshes from. `new_grant`: a sign-in or an imported refresh token,
    /// whose grant replaces the old one (the other resources' tokens go). The record is
    /// committed to disk before it is current in memory, so no token is handed out that a
    /// crash could lose (a rotated refresh token lives only in the newest record).
    async fn save_locked(
        &self,
        slot: &Slot,
        resource: Resource,
        set: TokenSet,
        new_grant: bool,
    ) -> Result<AccessToken, TokenError> {
        let t = now();
        let lifetime = set.expires_in.map(|d| d.as_secs() as i64).unwrap_or(3600).max(1);
        let expires_at = t + lifetime;
        let jitter = {
            use rand::Rng;
            rand::thread_rng().gen_range(0..=(lifetime / 10).min(300))
        };
        let refresh_at = t + (lifetime - REFRESH_EARLY - jitter).max(lifetime / 2);
        let mut rec = slot.record();
        let was = rec.state;
        let account = set.account.clone().or_else(|| rec.account.clone()).unwrap_or_else(|| slot.email.clone());
        if rec.account.as_deref() != Some(account.as_str()) && !account.eq_ignore_ascii_case(&slot.email) {
            tracing::warn!(
                identity = %slot.name, account = %account, mailbox = %slot.email,
                "signed in as another account than the identity's mailbox: fine for a shared mailbox \
                 (the relay logs in as the account and sends from the mailbox; the account needs Send As on it), \
                 otherwise sign in again as the mailbox"
            );
        }
        if new_grant {
            rec.clear_access_tokens();
        }
        let refused = {
            let mut refused = slot.refused.locked();
            if new_grant {
                refused.clear();
            }
            refused.remove(&resource);
            refused.iter().next().map(|(r, why)| format!("{} token: {why}", r.as_str()))
        };
        // Ready, unless another resource's token is still refused: then the identity still
        // needs a person (this resource's token is kept and used all the same).
        rec.state = if refused.is_some() { IdentityState::NeedsLogin } else { IdentityState::Ready };
        rec.account = Some(account.clone());
        if set.refresh_token.is_some() {
            rec.refresh_token = set.refresh_token.clone();
        }
        rec.put_token(
            resource,
            ResourceToken {
                access_token: Some(set.access_token.clone()),
                expires_at: Some(expires_at),
                refresh_at: Some(refresh_at),
                last_refresh: Some(t),
            },
        );
        if !set.scopes.is_empty() && resource == slot.sign_in_resource() {
            rec.scopes = set.scopes.clone();
        }
        rec.last_refresh = Some(t);
        rec.last_error = refused;
        slot.doubted_at.store(0, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = self.persist(&slot.name, &rec).await {
            // Keep the newest refresh token in memory (the provider may have rotated the old
            // one away), but hand out no access token until a record is on disk.
            let mut r = slot.record.locked();
            r.refresh_token = rec.refresh_token;
            let mut none = r.token(resource);
            none.access_token = None;
            r.put_token(resource, none);
            r.last_error = Some(format!("cannot store tokens: {e}"));
            tracing::error!(identity = %slot.name, "cannot store new tokens: {e}");
            return Err(TokenError::Transient(format!("cannot store tokens: {e}")));
        }
        let rec_state = rec.state;
        *slot.record.locked() = rec;
        slot.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        {
            let mut ra = slot.retry_after.locked();
            if new_grant {
                ra.clear();
            } else {
                ra.remove(&resource);
            }
        }
        metrics::IDENTITY_STATE.with_label_values(&[&slot.name]).set(state_value(rec_state));
        if resource == slot.sign_in_resource() {
            metrics::TOKEN_EXPIRY.with_label_values(&[&slot.name]).set(expires_at as f64);
        }
        if was != IdentityState::Ready && rec_state == IdentityState::Ready {
            tracing::info!(identity = %slot.name, account = %account, "identity ready");
            let _ = self.ready.send(slot.name.clone());
        }
        Ok(AccessToken { secret: set.access_token, account, expires_at })
    }

    async fn record_failure(&self, slot: &Slot, resource: Resource, e: &TokenError) {
        let rec = {
            let mut r = slot.record.locked();
            r.last_error = Some(match slot.resources.len() {
                1 => e.to_string(),
                _ => format!("{} token: {e}", resource.as_str()),
            });
            match e {
                TokenError::NeedsLogin(why) => {
                    r.state = IdentityState::NeedsLogin;
                    slot.refused.locked().insert(resource, why.clone());
                    // The provider refused the grant for this resource: its token is worthless
                    // now. Another resource's stays until its own refresh says otherwise (a
                    // Graph consent missing from an older sign-in leaves IMAP working).
                    if slot.flow == Flow::DeviceCode || slot.flow == Flow::AuthCode {
                        let mut t = r.token(resource);
                        t.access_token = None;
                        r.put_token(resource, t);
                    }
                }
                _ if r.state == IdentityState::Ready => r.state = IdentityState::Error,
                _ => {}
            }
            r.clone()
        };
        {
            let mut ra = slot.retry_after.locked();
            let entry = ra.entry(resource).or_insert((0, 0));
            entry.1 = entry.1.saturating_add(1);
            entry.0 = now() + (30i64 << entry.1.min(6)).min(1800);
        }
        match e {
            TokenError::NeedsLogin(why) => {
                tracing::error!(identity = %slot.name, resource = resource.as_str(), "identity needs a new sign-in: {why}")
            }
            other => {
                tracing::warn!(identity = %slot.name, resource = resource.as_str(), "token refresh failed: {other}")
            }
        }
        metrics::IDENTITY_STATE.with_label_values(&[&slot.name]).set(state_value(rec.state));
        if let Err(e) = self.persist(&slot.name, &rec).await {
            tracing::error!(identity = %slot.name, "cannot store token state: {e}");
        }
    }

    async fn persist(&self, name: &str, rec: &TokenRecord) -> Result<(), TokenError> {
        let plain = serde_json::to_vec(rec).map_err(|e| TokenError::Config(e.to_string()))?;
        let sealed = self.vault.seal(name, &plain);
        self.store.put(Tree::Tokens, name.as_bytes(), &sealed).map_err(|e| TokenError::Config(e.to_string()))?;
        self.store.commit().await.map_err(|e| TokenError::Config(e.to_string()))
    }

    /// Stores a refresh token obtained elsewhere (migration from another tool) and tries it.
    pub async fn import_refresh_token(&self, name: &str, refresh_token: &str) -> Result<AccessToken, TokenError> {
        let slot = self.slot(name)?;
        let _flight = slot.flight.lock().await;
        let resource = slot.sign_in_resource();
        let set = self.refresh_grant(slot, refresh_token, slot.scopes_for(resource)).await;
        match set {
            Ok(set) => self.save_locked(slot, resource, set, true).await,
            Err(e) => {
                self.record_failure(slot, resource, &e).await;
                Err(e)
            }
        }
    }

    /// Publishes client certificate expiry and warns when one is close (30 days).
    fn check_certificates(&self, now: i64) {
        for (provider, path) in &self.certificates {
            let der = rustls_pki_types::CertificateDer::from_pem_file(path);
            let Some(not_after) = der.ok().and_then(|d| super::jwt::not_after(d.as_ref())) else {
                tracing::warn!(provider = %provider, "cannot read the expiry of client certificate {}", path.display());
                continue;
            };
            metrics::CERT_EXPIRY.with_label_values(&[provider.as_str()]).set(not_after as f64);
            let days = (not_after - now) / 86400;
            if not_after - now < CERT_WARNING {
                tracing::warn!(
                    provider = %provider,
                    "client certificate {} expires in {days} days: upload a new one to the app registration and update client_certificate",
                    path.display()
                );
            }
        }
    }

    /// Forgets the stored tokens of an identity.
    pub async fn logout(&self, name: &str) -> Result<(), TokenError> {
        let slot = self.slot(name)?;
        let _flight = slot.flight.lock().await;
        self.store.remove(Tree::Tokens, name.as_bytes()).map_err(|e| TokenError::Config(e.to_string()))?;
        self.store.commit().await.map_err(|e| TokenError::Config(e.to_string()))?;
        *slot.record.locked() = TokenRecord::default();
        slot.refused.locked().clear();
        slot.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        metrics::IDENTITY_STATE.with_label_values(&[name]).set(state_value(IdentityState::NeedsLogin));
        Ok(())
    }

    /// Status of every identity, in name order.
    pub fn status(&self) -> Vec<IdentityStatus> {
        let mut v: Vec<IdentityStatus> = self
            .slots
            .values()
            .map(|s| {
                let r = s.record();
                let tokens = s
                    .resources()
                    .into_iter()
                    .map(|res| {
                        let t = r.token(res);
                        TokenStatus {
                            resource: res.as_str().into(),
                            expires_at: t.expires_at.filter(|_| t.access_token.is_some()),
                        }
                    })
                    .collect();
                let sign_in = r.token(s.sign_in_resource());
                IdentityStatus {
                    name: s.name.clone(),
                    provider: s.provider.name.clone(),
                    flow: s.flow.to_string(),
                    account: r.account.clone().unwrap_or_else(|| s.email.clone()),
                    mailbox: s.email.clone(),
                    signed_in: r.account.is_some(),
                    state: r.state.as_str().into(),
                    expires_at: sign_in.expires_at.filter(|_| sign_in.access_token.is_some()),
                    last_refresh: r.last_refresh,
                    last_error: r.last_error.clone(),
                    has_refresh_token: r.refresh_token.is_some(),
                    tokens,
                }
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Whether the background refresher should refresh `slot`'s token of `resource` at `t`:
    /// then that token and the refresh token as they were seen, to tell whether someone else
    /// refreshed (or signed in or out) before the refresher got to it.
    fn refresh_due(slot: &Slot, resource: Resource, t: i64) -> Option<(ResourceToken, Option<String>)> {
        let r = slot.record();
        let app_only = matches!(slot.flow, Flow::ClientCredentials | Flow::ServiceAccount);
        // A delegated identity that needs a sign-in waits for a person; an app-only one is
        // retried (with backoff), since consent or a secret may be fixed in the provider's
        // portal without touching the relay.
        if r.state == IdentityState::NeedsLogin && !app_only {
            return None;
        }
        let retry_after = slot.retry_after.locked().get(&resource).map_or(0, |(at, _)| *at);
        if t < retry_after {
            return None;
        }
        let tok = r.token(resource);
        let due = if resource == slot.sign_in_resource() {
            match (tok.refresh_at, r.last_refresh) {
                (Some(at), _) if t >= at => true,
                (_, Some(last)) => t >= last + REFRESH_IDLE,
                // App-only identities fetch their first token at startup.
                (None, None) => app_only,
                _ => false,
            }
        } else {
            // Another resource's token: fetched as soon as the identity can (signed in, or
            // app-only), then refreshed ahead of its own expiry.
            match (&tok.access_token, tok.refresh_at) {
                (Some(_), Some(at)) => t >= at,
                _ => true,
            }
        };
        (due && (r.refresh_token.is_some() || app_only)).then_some((tok, r.refresh_token))
    }

    /// Keeps every identity's token fresh until `shutdown` fires: refreshes ahead of expiry
    /// (with jitter, chosen when the token was stored), refreshes idle identities daily, and
    /// backs off after failures.
    pub async fn run_refresher(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut certs_checked: Option<i64> = None;
        loop {
            let t = now();
            if certs_checked.is_none_or(|c| t - c >= 6 * 3600) {
                self.check_certificates(t);
                certs_checked = Some(t);
            }
            // Each resource's token on its own schedule.
            let due: Vec<_> = self
                .slots
                .values()
                .flat_map(|slot| slot.resources().into_iter().map(move |r| (slot, r)))
                .filter_map(|(slot, r)| Self::refresh_due(slot, r, t).map(|seen| (slot, r, seen)))
                .collect();
            // Several at once (a fleet's tokens are often due together, and one slow answer
            // must not hold up the rest), never more than REFRESHES_AT_ONCE.
            let me: &TokenManager = &self;
            let round = futures_util::stream::iter(due).for_each_concurrent(
                REFRESHES_AT_ONCE,
                |(slot, resource, (seen, seen_rt))| async move {
                    let _flight = slot.flight.lock().await;
                    // Someone may have refreshed (or signed in or out) while we waited; a
                    // token left due is seen again in the next round.
                    let now_rec = slot.record();
                    if now_rec.token(resource) != seen || now_rec.refresh_token != seen_rt {
                        return;
                    }
                    if let Err(e) = me.refresh_locked(slot, resource).await {
                        tracing::debug!(identity = %slot.name, resource = resource.as_str(), "background refresh: {e}");
                    }
                },
            );
            tokio::pin!(round);
            tokio::select! {
                _ = &mut round => {}
                _ = shutdown.changed() => {
                    // A refresh past the provider's answer must still store it (a rotated
                    // refresh token lives only there): let the round end, within a bound.
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, round).await;
                    return;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Numeric form of the state for the identity-state gauge: 1 ready, 0 needs login, 2 error.
pub fn state_value(s: IdentityState) -> i64 {
    match s {
        IdentityState::Ready => 1,
        IdentityState::NeedsLogin => 0,
        IdentityState::Error => 2,
    }
}

/// Sorts a token endpoint failure into "a person must act" or "try again".
pub fn classify_error<RE: std::error::Error + 'static>(e: RequestTokenError<RE, BasicErrorResponse>) -> TokenError {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let code = r.error().as_ref().to_string();
            let desc = r.error_description().cloned().unwrap_or_default();
            classify_response(&code, &desc)
        }
        RequestTokenError::Request(e) => {
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg = format!("{msg}: {s}");
                src = s.source();
            }
            TokenError::Transient(msg)
        }
        // Never the body nor serde's message (which quotes the offending value): a
        // half-readable answer may hold live tokens. The path names the field.
        RequestTokenError::Parse(e, body) => TokenError::Transient(format!(
            "unexpected answer from the token endpoint ({} bytes; the field that does not fit: {})",
            body.len(),
            match e.path().to_string().as_str() {
                "." | "" => "the document itself".to_string(),
                p => p.to_string(),
            }
        )),
        RequestTokenError::Other(s) => TokenError::Transient(s),
    }
}

/// Whether a refusal of a refresh token may be a passing condition: `invalid_grant` whose
/// description names none of the well-known causes of [`explain`] (password changed, 90 days
/// unused, MFA, ...). Entra gives such answers now and then and takes them back a minute later.
pub fn doubtful_refusal(e: &TokenError) -> bool {
    matches!(e, TokenError::NeedsLogin(text) if text.starts_with("invalid_grant") && explain(text).is_none())
}

/// How long after a doubtful refusal the provider is asked again.
pub const DOUBT_RECHECK: i64 = 60;

/// Seconds left before a doubted refresh token may be tried again, if any.
fn doubt_pending(doubted_at: &std::sync::atomic::AtomicI64, now: i64) -> Option<i64> {
    let at = doubted_at.load(std::sync::atomic::Ordering::SeqCst);
    (at != 0 && now < at + DOUBT_RECHECK).then(|| at + DOUBT_RECHECK - now)
}

/// The first doubtful refusal becomes a passing failure, asked again [`DOUBT_RECHECK`] later;
/// a second one in a row is believed. Any other answer ends the doubt.
fn second_opinion(doubted_at: &std::sync::atomic::AtomicI64, now: i64, identity: &str, e: TokenError) -> TokenError {
    use std::sync::atomic::Ordering;
    // Whatever the answer, the doubt it answers is over.
    let was_doubted = doubted_at.swap(0, Ordering::SeqCst) != 0;
    if was_doubted || !doubtful_refusal(&e) {
        return e;
    }
    doubted_at.store(now, Ordering::SeqCst);
    tracing::warn!(identity, "the provider refused the refresh token with no certain cause ({e}); asking again in {DOUBT_RECHECK} s before a new sign-in is needed");
    match e {
        TokenError::NeedsLogin(text) => {
            TokenError::Transient(format!("{text} (asking again in {DOUBT_RECHECK} s before a new sign-in is needed)"))
        }
        other => other,
    }
}

/// Classifies an OAuth error code and description (RFC 6749 5.2).
pub fn classify_response(code: &str, description: &str) -> TokenError {
    let first_line = description.lines().next().unwrap_or("").trim();
    let text = match explain(description) {
        Some(why) => format!("{code}: {why} ({first_line})"),
        None if first_line.is_empty() => code.to_string(),
        None => format!("{code}: {first_line}"),
    };
    match code {
        // RFC 6749 5.2, plus OpenID Connect's interaction/consent errors: a person must act.
        "invalid_grant"
        | "invalid_client"
        | "unauthorized_client"
        | "invalid_scope"
        | "interaction_required"
        | "consent_required"
        | "invalid_request" => TokenError::NeedsLogin(text),
        _ => TokenError::Transient(text),
    }
}

/// What well-known Microsoft errors mean for the admin.
pub fn explain(description: &str) -> Option<&'static str> {
    const KNOWN: &[(&str, &str)] = &[
        ("AADSTS700082", "the refresh token expired after 90 days without use; sign in again"),
        // After 700082, which contains it.
        ("AADSTS70008", "the refresh token or authorization code has expired; sign in again"),
        ("AADSTS50173", "the password was changed or the sessions were revoked; sign in again"),
        ("AADSTS7000222", "the app's client secret has expired; create a new one in Entra ID and update the config"),
        ("AADSTS7000215", "the client secret is wrong; copy the secret's value (not its id) from Entra ID"),
        ("AADSTS50076", "multi-factor authentication is required; sign in again interactively"),
        ("AADSTS50079", "the user must enrol in multi-factor authentication; sign in again interactively"),
        ("AADSTS53003", "blocked by Conditional Access; ask the Entra ID admin to exclude this sign-in"),
        ("AADSTS65001", "the app has no consent for these permissions; grant admin consent in Entra ID"),
        ("AADSTS700016", "the app (client_id) is not found in this tenant; check client_id and tenant"),
        ("AADSTS70011", "the requested scope is not valid for this app"),
        ("AADSTS50126", "wrong username or password"),
    ];
    KNOWN.iter().find(|(code, _)| description.contains(code)).map(|(_, why)| *why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_without_a_certain_cause_are_asked_again() {
        let refusal = |code: &str, description: &str| classify_response(code, description);
        assert!(doubtful_refusal(&refusal(
            "invalid_grant",
            "AADSTS70000: The provided grant is invalid or malformed."
        )));
        assert!(doubtful_refusal(&refusal("invalid_grant", "Token has been expired or revoked.")));
        for certain in [
            "AADSTS50173: revoked",
            "AADSTS70008: expired",
            "AADSTS700082: inactive",
            "AADSTS50076: MFA",
            "AADSTS50079: enrol",
        ] {
            assert!(!doubtful_refusal(&refusal("invalid_grant", certain)), "{certain}");
        }
        assert!(!doubtful_refusal(&refusal("invalid_client", "AADSTS7000222: expired")));
        assert!(!doubtful_refusal(&TokenError::Transient("invalid_grant: x".into())));
    }

    #[test]
    fn a_doubtful_refusal_is_believed_the_second_time_a_minute_later() {
        let doubted_at = std::sync::atomic::AtomicI64::new(0);
        let doubtful =
            || classify_response("invalid_grant", "AADSTS70000: The provided grant is invalid or malformed.");
        let first = second_opinion(&doubted_at, 1000, "scans", doubtful());
        assert!(
            matches!(&first, TokenError::Transient(t) if t.contains("AADSTS70000") && t.contains("asking again")),
            "{first:?}"
        );
        assert_eq!(doubt_pending(&doubted_at, 1030), Some(30), "no second request within the minute");
        assert_eq!(doubt_pending(&doubted_at, 1060), None);
        assert!(matches!(second_opinion(&doubted_at, 1060, "scans", doubtful()), TokenError::NeedsLogin(_)));
        assert_eq!(doubt_pending(&doubted_at, 1061), None, "the doubt is over");
        // A certain refusal is believed at once, and ends a doubt.
        let certain = classify_response("invalid_grant", "AADSTS50173: revoked");
        assert!(matches!(second_opinion(&doubted_at, 2000, "scans", certain.clone()), TokenError::NeedsLogin(_)));
        second_opinion(&doubted_at, 3000, "scans", doubtful());
        assert!(matches!(second_opinion(&doubted_at, 3100, "scans", certain), TokenError::NeedsLogin(_)));
        assert_eq!(doubt_pending(&doubted_at, 3101), None);
        // "In a row": a passing network failure in between ends the doubt, so a doubtful
        // refusal after it is asked again rather than believed.
        second_opinion(&doubted_at, 4000, "scans", doubtful());
        second_opinion(&doubted_at, 4070, "scans", TokenError::Transient("connection reset".into()));
        assert!(matches!(second_opinion(&doubted_at, 4080, "scans", doubtful()), TokenError::Transient(_)));
    }

    #[test]
    fn invalid_grant_needs_login_and_is_explained() {
        let e = classify_response(
            "invalid_grant",
            "AADSTS50173: The provided grant has expired due to it being revoked.\r\nTrace ID: x",
        );
        match e {
            TokenError::NeedsLogin(t) => {
                assert!(t.contains("password was changed"), "{t}");
                assert!(t.contains("AADSTS50173"), "{t}");
                assert!(!t.contains("Trace ID"), "{t}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(classify_response("invalid_client", "AADSTS7000222: expired"), TokenError::NeedsLogin(t) if t.contains("client secret has expired"))
        );
        assert!(matches!(classify_response("temporarily_unavailable", ""), TokenError::Transient(_)));
        assert!(
            matches!(classify_response("interaction_required", "AADSTS50076: MFA"), TokenError::NeedsLogin(t) if t.contains("multi-factor"))
        );
    }

    /// A token endpoint that holds every refresh request until the test lets it answer,
    /// then refuses the grant (as for a revoked refresh token).
    struct SlowEndpoint {
        refreshes: std::sync::atomic::AtomicUsize,
        received: tokio::sync::Notify,
        gate: tokio::sync::Semaphore,
    }

    async fn slow_endpoint() -> (Arc<SlowEndpoint>, String) {
        use axum::routing::post;
        let ep = Arc::new(SlowEndpoint {
            refreshes: Default::default(),
            received: tokio::sync::Notify::new(),
            gate: tokio::sync::Semaphore::new(0),
        });
        let state = ep.clone();
        let app = axum::Router::new().route(
            "/token",
            post(move |body: axum::body::Bytes| {
                let ep = state.clone();
                async move {
                    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
                    assert_eq!(form.get("grant_type").map(String::as_str), Some("refresh_token"));
                    ep.refreshes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    ep.received.notify_one();
                    if let Ok(p) = ep.gate.acquire().await {
                        p.forget();
                    }
                    (
                        axum::http::StatusCode::BAD_REQUEST,
                        [("content-type", "application/json")],
                        r#"{"error":"invalid_grant","error_description":"AADSTS50173: revoked"}"#,
                    )
                }
            }),
        );
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", tcp.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(tcp, app).await });
        (ep, url)
    }

    /// A client-credentials token endpoint that answers after `delay` and counts the requests
    /// in flight: (most at once, in all, url).
    async fn counting_endpoint(delay: Duration) -> (Arc<[std::sync::atomic::AtomicUsize; 3]>, String) {
        use axum::routing::post;
        use std::sync::atomic::Ordering::SeqCst;
        let counts: Arc<[std::sync::atomic::AtomicUsize; 3]> = Arc::default();
        let c = counts.clone();
        let app = axum::Router::new().route(
            "/token",
            post(move || {
                let c = c.clone();
                async move {
                    let now = c[0].fetch_add(1, SeqCst) + 1;
                    c[1].fetch_max(now, SeqCst);
                    c[2].fetch_add(1, SeqCst);
                    tokio::time::sleep(delay).await;
                    c[0].fetch_sub(1, SeqCst);
                    (
                        [("content-type", "application/json")],
                        r#"{"access_token":"at","token_type":"Bearer","expires_in":3600}"#,
                    )
                }
            }),
        );
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", tcp.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(tcp, app).await });
        (counts, url)
    }

    /// A token manager with `n` app-only identities "a0".. on one provider.
    fn fleet(dir: &std::path::Path, token_url: &str, n: usize) -> Arc<TokenManager> {
        let mut text = format!(
            "[relay]\nhostname = \"relay.test\"\ndata_dir = \"data\"\n\n\
             [[listener]]\nlisten = \"127.0.0.1:2525\"\n\n\
             [[provider]]\nname = \"p\"\nkind = \"generic\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
             token_url = \"{token_url}\"\nsmtp = \"127.0.0.1:9\"\nsmtp_tls = \"none\"\n\n"
        );
        for i in 0..n {
            text.push_str(&format!(
                "[[identity]]\nname = \"a{i}\"\nprovider = \"p\"\nemail = \"a{i}@example.com\"\nflow = \"client_credentials\"\n\n"
            ));
        }
        let config = Config::parse(&dir.join("config.toml"), text).unwrap();
        std::fs::create_dir_all(config.data_dir()).unwrap();
        let store = Arc::new(crate::store::Store::open(&config.data_dir(), vec![]).unwrap());
        let vault = Arc::new(crate::oauth::vault::Vault::open(&config.key_file(), None).unwrap());
        Arc::new(TokenManager::new(&config, store, vault, None).unwrap())
    }

    #[tokio::test]
    async fn a_fleet_asking_for_tokens_at_once_is_not_a_thundering_herd() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (counts, url) = counting_endpoint(Duration::from_millis(50)).await;
        let tokens = fleet(dir.path(), &url, 64);
        // 64 mailboxes start together, each wanting its identity's first token.
        let asks: Vec<_> = (0..64)
            .map(|i| {
                let t = tokens.clone();
                tokio::spawn(async move { t.access_token(&format!("a{i}")).await })
            })
            .collect();
        for a in asks {
            tokio::time::timeout(Duration::from_secs(20), a).await.unwrap().unwrap().unwrap();
        }
        assert_eq!(counts[2].load(SeqCst), 64);
        let most = counts[1].load(SeqCst);
        assert!(most <= TOKEN_REQUESTS_AT_ONCE, "{most} token requests at once");
        assert!(most > 1, "requests for different identities go out in parallel");
    }

    #[tokio::test]
    async fn the_refresher_fetches_a_fleet_s_tokens_several_at_a_time() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (counts, url) = counting_endpoint(Duration::from_millis(100)).await;
        let tokens = fleet(dir.path(), &url, 40);
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let started = std::time::Instant::now();
        let refresher = tokio::spawn(tokens.clone().run_refresher(shutdown));
        while counts[2].load(SeqCst) < 40 || counts[0].load(SeqCst) > 0 {
            assert!(started.elapsed() < Duration::from_secs(20), "refresher too slow");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // One at a time, 40 requests of 100 ms would take 4 s.
        assert!(started.elapsed() < Duration::from_secs(3), "{:?}", started.elapsed());
        let most = counts[1].load(SeqCst);
        assert!((2..=REFRESHES_AT_ONCE).contains(&most), "{most} refreshes at once");
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), refresher).await.unwrap().unwrap();
        assert_eq!(counts[2].load(SeqCst), 40, "each identity fetched once");
    }

    /// A token manager with one delegated identity "u" whose tokens are `rt` and an access
    /// token that is already due for refresh.
    async fn manager(dir: &std::path::Path, token_url: &str, rt: &str) -> Arc<TokenManager> {
        let text = format!(
            "[relay]\nhostname = \"relay.test\"\ndata_dir = \"data\"\n\n\
             [[provider]]\nname = \"p\"\nkind = \"generic\"\nclient_id = \"c\"\ntoken_url = \"{token_url}\"\n\
             device_authorization_url = \"{token_url}\"\nsmtp = \"127.0.0.1:9\"\nsmtp_tls = \"none\"\n\n\
             [[identity]]\nname = \"u\"\nprovider = \"p\"\nemail = \"u@example.com\"\nflow = \"device_code\"\n"
        );
        let config = Config::parse(&dir.join("config.toml"), text).unwrap();
        std::fs::create_dir_all(config.data_dir()).unwrap();
        let store = Arc::new(crate::store::Store::open(&config.data_dir(), vec![]).unwrap());
        let vault = Arc::new(crate::oauth::vault::Vault::open(&config.key_file(), None).unwrap());
        let tokens = Arc::new(TokenManager::new(&config, store, vault, None).unwrap());
        let set = TokenSet {
            access_token: "at-old".into(),
            refresh_token: Some(rt.into()),
            expires_in: Some(Duration::from_secs(1)),
            scopes: vec![],
            account: None,
        };
        tokens.sign_in(tokens.slot("u").unwrap(), set).await.unwrap();
        tokens
    }

    #[tokio::test]
    async fn a_sign_in_during_a_refresh_is_not_undone_by_its_invalid_grant() {
        let dir = tempfile::tempdir().unwrap();
        let (ep, url) = slow_endpoint().await;
        let tokens = manager(dir.path(), &url, "rt-old").await;
        let t = tokens.clone();
        let refresh = tokio::spawn(async move { t.access_token("u").await });
        tokio::time::timeout(Duration::from_secs(10), ep.received.notified()).await.unwrap();
        // The person signs in while the old refresh token's request is out.
        let t = tokens.clone();
        let sign_in = tokio::spawn(async move {
            let set = TokenSet {
                access_token: "at-new".into(),
                refresh_token: Some("rt-new".into()),
                expires_in: Some(Duration::from_secs(3600)),
                scopes: vec![],
                account: Some("u@example.com".into()),
            };
            t.sign_in(t.slot("u").unwrap(), set).await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!sign_in.is_finished(), "the sign-in waits for the refresh in flight");
        ep.gate.add_permits(1);
        let refreshed = tokio::time::timeout(Duration::from_secs(10), refresh).await.unwrap().unwrap();
        assert!(matches!(refreshed, Err(TokenError::NeedsLogin(_))), "{refreshed:?}");
        tokio::time::timeout(Duration::from_secs(10), sign_in).await.unwrap().unwrap().unwrap();

        let slot = tokens.slot("u").unwrap();
        let r = slot.record();
        assert_eq!(r.state, IdentityState::Ready, "{:?}", r.last_error);
        assert_eq!(r.refresh_token.as_deref(), Some("rt-new"));
        assert_eq!(tokens.access_token("u").await.unwrap().secret, "at-new");
        assert_eq!(ep.refreshes.load(std::sync::atomic::Ordering::SeqCst), 1);
        // What is on disk is what is in memory.
        let sealed = tokens.store.get(Tree::Tokens, b"u").unwrap().unwrap();
        let stored: TokenRecord = serde_json::from_slice(&tokens.vault.unseal("u", &sealed).unwrap()).unwrap();
        assert_eq!((stored.state, stored.refresh_token.as_deref()), (IdentityState::Ready, Some("rt-new")));
    }

    #[tokio::test]
    async fn callers_waiting_on_a_refresh_share_its_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (ep, url) = slow_endpoint().await;
        let tokens = manager(dir.path(), &url, "rt-revoked").await;
        let callers: Vec<_> = (0..5)
            .map(|_| {
                let t = tokens.clone();
                tokio::spawn(async move { t.access_token("u").await })
            })
            .collect();
        tokio::time::timeout(Duration::from_secs(10), ep.received.notified()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        ep.gate.add_permits(10);
        for c in callers {
            let r = tokio::time::timeout(Duration::from_secs(10), c).await.unwrap().unwrap();
            assert!(matches!(r, Err(TokenError::NeedsLogin(ref t)) if t.contains("invalid_grant")), "{r:?}");
        }
        assert_eq!(
            ep.refreshes.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one request with the revoked token, not one per caller"
        );
    }

    #[test]
    fn a_record_stored_before_tokens_per_resource_still_loads() {
        // What a relay stored before tokens were kept per resource.
        let old = br#"{"state":"ready","account":"u@example.com","refresh_token":"rt","access_token":"at-mail",
            "expires_at":2000,"refresh_at":1500,"scopes":["s"],"last_refresh":1000,"last_error":null}"#;
        let mut r: TokenRecord = serde_json::from_slice(old).unwrap();
        assert_eq!(r.token(Resource::Mail).access_token.as_deref(), Some("at-mail"));
        assert_eq!(r.token(Resource::Mail).expires_at, Some(2000));
        assert!(r.token(Resource::Graph) == ResourceToken::default());
        // The identity now sends through Graph and reads a mailbox: Mail stays the sign-in
        // resource, and a Graph token goes into the map, on disk too.
        r.arrange(Resource::Mail);
        r.put_token(
            Resource::Graph,
            ResourceToken {
                access_token: Some("at-graph".into()),
                expires_at: Some(3000),
                refresh_at: Some(2500),
                last_refresh: Some(1200),
            },
        );
        let json = serde_json::to_string(&r).unwrap();
        let back: TokenRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back.access_token.as_deref(), Some("at-mail"));
        assert_eq!(back.token(Resource::Graph).access_token.as_deref(), Some("at-graph"));
        // The mailbox goes: Graph becomes the sign-in resource, each token keeps its resource.
        let mut moved = back.clone();
        moved.arrange(Resource::Graph);
        assert_eq!((moved.access_token.as_deref(), moved.expires_at), (Some("at-graph"), Some(3000)));
        assert_eq!(moved.token(Resource::Mail).access_token.as_deref(), Some("at-mail"));
        assert_eq!(moved.token(Resource::Graph).access_token.as_deref(), Some("at-graph"));
        // A record with one resource serialises as before (no new keys).
        let plain: TokenRecord = serde_json::from_slice(old).unwrap();
        let v: serde_json::Value = serde_json::to_value(&plain).unwrap();
        assert!(v.get("resources").is_none() && v.get("resource").is_none(), "{v}");
        // Signing out of a new grant forgets every resource's token.
        moved.clear_access_tokens();
        assert_eq!((moved.token(Resource::Mail).access_token, moved.token(Resource::Graph).access_token), (None, None));
    }

    /// A Microsoft-like token endpoint: refuses a request whose scopes span several resources
    /// (AADSTS28000), answers others with a token named after the resource and a rotated
    /// refresh token, and records (grant, scope, refresh token) of each request.
    async fn entra_endpoint() -> (Arc<Mutex<Vec<(String, String, String)>>>, String) {
        entra_endpoint_refusing(false).await
    }

    /// [`entra_endpoint`]; `refuse_graph`: Graph's scopes were never consented to (AADSTS65001).
    async fn entra_endpoint_refusing(refuse_graph: bool) -> (Arc<Mutex<Vec<(String, String, String)>>>, String) {
        use axum::routing::post;
        let seen: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
        let log = seen.clone();
        let app = axum::Router::new().route(
            "/token",
            post(move |body: axum::body::Bytes| {
                let log = log.clone();
                async move {
                    let form: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
                    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
                    let scope = get("scope");
                    let mut hosts: Vec<&str> = scope
                        .split_whitespace()
                        .filter_map(|s| s.strip_prefix("https://"))
                        .filter_map(|s| s.split('/').next())
                        .collect();
                    hosts.dedup();
                    let n = {
                        let mut l = log.locked();
                        l.push((get("grant_type"), scope.clone(), get("refresh_token")));
                        l.len()
                    };
                    if hosts.len() != 1 {
                        return (
                            axum::http::StatusCode::BAD_REQUEST,
                            [("content-type", "application/json")],
                            r#"{"error":"invalid_scope","error_description":"AADSTS28000: more than one resource"}"#
                                .to_string(),
                        );
                    }
                    let resource = if hosts[0].contains("graph") { "graph" } else { "mail" };
                    if refuse_graph && resource == "graph" {
                        return (
                            axum::http::StatusCode::BAD_REQUEST,
                            [("content-type", "application/json")],
                            r#"{"error":"invalid_grant","error_description":"AADSTS65001: The user or administrator has not consented to use the application."}"#
                                .to_string(),
                        );
                    }
                    (
                        axum::http::StatusCode::OK,
                        [("content-type", "application/json")],
                        format!(
                            r#"{{"access_token":"at-{resource}-{n}","refresh_token":"rt-{n}","token_type":"Bearer","expires_in":3600}}"#
                        ),
                    )
                }
            }),
        );
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", tcp.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(tcp, app).await });
        (seen, url)
    }

    #[tokio::test]
    async fn each_resource_s_token_comes_from_the_one_refresh_token_one_resource_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (seen, url) = entra_endpoint().await;
        let text = format!(
            "[relay]\nhostname = \"relay.test\"\ndata_dir = \"data\"\n\n\
             [[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"t\"\nclient_id = \"c\"\ntoken_url = \"{url}\"\n\
             graph_url = \"http://127.0.0.1:9\"\n\n\
             [[identity]]\nname = \"u\"\nprovider = \"m\"\nemail = \"u@example.com\"\nflow = \"device_code\"\nsend_via = \"graph\"\n\n\
             [[mailbox]]\nname = \"print\"\nidentity = \"u\"\nspool = \"spool\"\n"
        );
        let config = Config::parse(&dir.path().join("config.toml"), text).unwrap();
        std::fs::create_dir_all(config.data_dir()).unwrap();
        let store = Arc::new(crate::store::Store::open(&config.data_dir(), vec![]).unwrap());
        let vault = Arc::new(crate::oauth::vault::Vault::open(&config.key_file(), None).unwrap());
        let tokens = Arc::new(TokenManager::new(&config, store, vault, None).unwrap());
        let slot = tokens.slot("u").unwrap();
        assert_eq!(slot.resources(), vec![Resource::Mail, Resource::Graph]);
        // The sign-in's token is the mail servers'.
        let set = TokenSet {
            access_token: "at-mail-0".into(),
            refresh_token: Some("rt-0".into()),
            expires_in: Some(Duration::from_secs(3600)),
            scopes: vec![],
            account: Some("u@example.com".into()),
        };
        tokens.sign_in(slot, set).await.unwrap();
        assert_eq!(tokens.access_token("u").await.unwrap().secret, "at-mail-0");
        assert_eq!(tokens.access_token_for("u", Resource::Mail).await.unwrap().secret, "at-mail-0");
        assert!(seen.locked().is_empty());

        // Graph's token: a refresh grant with Graph's scopes only.
        let graph = tokens.access_token_for("u", Resource::Graph).await.unwrap();
        assert_eq!(graph.secret, "at-graph-1");
        assert_eq!(
            seen.locked()[0],
            (
                "refresh_token".to_string(),
                "https://graph.microsoft.com/Mail.Send https://graph.microsoft.com/Mail.ReadWrite offline_access"
                    .to_string(),
                "rt-0".to_string()
            )
        );
        // Cached per resource.
        assert_eq!(tokens.access_token_for("u", Resource::Graph).await.unwrap().secret, "at-graph-1");
        assert_eq!(tokens.access_token("u").await.unwrap().secret, "at-mail-0");

        // Graph refuses its token: only Graph's is renewed, with the rotated refresh token.
        let again = tokens.refresh_after_rejection_for("u", Resource::Graph, &graph).await.unwrap();
        assert_eq!(again.secret, "at-graph-2");
        assert_eq!(seen.locked()[1].2, "rt-1");
        assert_eq!(tokens.access_token("u").await.unwrap().secret, "at-mail-0", "the mail token is untouched");
        assert_eq!(seen.locked().len(), 2);

        // The mail servers refuse theirs: renewed from the refresh token Graph's answer rotated.
        let mail = tokens.access_token("u").await.unwrap();
        let mail = tokens.refresh_after_rejection("u", &mail).await.unwrap();
        assert_eq!(mail.secret, "at-mail-3");
        let third = seen.locked()[2].clone();
        assert_eq!(
            (third.1.as_str(), third.2.as_str()),
            ("https://outlook.office.com/IMAP.AccessAsUser.All offline_access", "rt-2")
        );
        assert_eq!(tokens.access_token_for("u", Resource::Graph).await.unwrap().secret, "at-graph-2");

        // Both shown; both on disk.
        let st = tokens.status().into_iter().find(|s| s.name == "u").unwrap();
        assert_eq!(st.tokens.iter().map(|t| t.resource.as_str()).collect::<Vec<_>>(), vec!["mail", "graph"]);
        assert!(st.tokens.iter().all(|t| t.expires_at.is_some()), "{st:?}");
        let sealed = tokens.store.get(Tree::Tokens, b"u").unwrap().unwrap();
        let stored: TokenRecord = serde_json::from_slice(&tokens.vault.unseal("u", &sealed).unwrap()).unwrap();
        assert_eq!(stored.refresh_token.as_deref(), Some("rt-3"));
        assert_eq!(stored.token(Resource::Graph).access_token.as_deref(), Some("at-graph-2"));
        assert_eq!(stored.token(Resource::Mail).access_token.as_deref(), Some("at-mail-3"));

        // A new sign-in drops the old grant's Graph token.
        let set = TokenSet {
            access_token: "at-mail-new".into(),
            refresh_token: Some("rt-new".into()),
            expires_in: Some(Duration::from_secs(3600)),
            scopes: vec![],
            account: None,
        };
        tokens.sign_in(slot, set).await.unwrap();
        assert_eq!(tokens.access_token_for("u", Resource::Graph).await.unwrap().secret, "at-graph-4");
        assert_eq!(seen.locked()[3].2, "rt-new");
    }

    #[tokio::test]
    async fn a_graph_consent_missing_needs_a_sign_in_and_leaves_the_mail_token_working() {
        let dir = tempfile::tempdir().unwrap();
        let (seen, url) = entra_endpoint_refusing(true).await;
        let text = format!(
            "[relay]\nhostname = \"relay.test\"\ndata_dir = \"data\"\n\n\
             [[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"t\"\nclient_id = \"c\"\ntoken_url = \"{url}\"\n\n\
             [[identity]]\nname = \"u\"\nprovider = \"m\"\nemail = \"u@example.com\"\nflow = \"device_code\"\nsend_via = \"graph\"\n\n\
             [[mailbox]]\nname = \"print\"\nidentity = \"u\"\nspool = \"spool\"\n"
        );
        let config = Config::parse(&dir.path().join("config.toml"), text).unwrap();
        std::fs::create_dir_all(config.data_dir()).unwrap();
        let store = Arc::new(crate::store::Store::open(&config.data_dir(), vec![]).unwrap());
        let vault = Arc::new(crate::oauth::vault::Vault::open(&config.key_file(), None).unwrap());
        let tokens = TokenManager::new(&config, store, vault, None).unwrap();
        // Signed in when the identity only read its mailbox.
        let set = TokenSet {
            access_token: "at-mail-0".into(),
            refresh_token: Some("rt-0".into()),
            expires_in: Some(Duration::from_secs(3600)),
            scopes: vec![],
            account: Some("u@example.com".into()),
        };
        tokens.sign_in(tokens.slot("u").unwrap(), set).await.unwrap();
        let refused = tokens.access_token_for("u", Resource::Graph).await;
        assert!(matches!(&refused, Err(TokenError::NeedsLogin(t)) if t.contains("AADSTS65001")), "{refused:?}");
        let st = || tokens.status().into_iter().find(|s| s.name == "u").unwrap();
        assert_eq!(st().state, "needs_login");
        assert!(st().last_error.unwrap_or_default().starts_with("graph token: "), "{:?}", st());
        // The mailbox goes on: its token is kept, and renewed, and the identity still says
        // that a person must sign in (for Graph's consent).
        assert_eq!(tokens.access_token("u").await.unwrap().secret, "at-mail-0");
        let mail = tokens.access_token("u").await.unwrap();
        assert_eq!(tokens.refresh_after_rejection("u", &mail).await.unwrap().secret, "at-mail-2");
        assert_eq!(st().state, "needs_login", "{:?}", st());
        assert!(st().last_error.unwrap_or_default().contains("AADSTS65001"), "{:?}", st());
        assert_eq!(seen.locked().len(), 2);
        // A new sign-in (with Graph's consent) clears it.
        let set = TokenSet {
            access_token: "at-mail-new".into(),
            refresh_token: Some("rt-new".into()),
            expires_in: Some(Duration::from_secs(3600)),
            scopes: vec![],
            account: None,
        };
        tokens.sign_in(tokens.slot("u").unwrap(), set).await.unwrap();
        assert_eq!((st().state.as_str(), st().last_error), ("ready", None));
    }

    #[tokio::test]
    async fn a_mailbox_added_by_a_reload_keeps_the_graph_token_and_fetches_the_mail_one() {
        let dir = tempfile::tempdir().unwrap();
        let (seen, url) = entra_endpoint().await;
        let text = |mailbox: &str| {
            format!(
                "[relay]\nhostname = \"relay.test\"\ndata_dir = \"data\"\n\n\
                 [[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"t\"\nclient_id = \"c\"\ntoken_url = \"{url}\"\n\n\
                 [[identity]]\nname = \"u\"\nprovider = \"m\"\nemail = \"u@example.com\"\nflow = \"device_code\"\nsend_via = \"graph\"\n\n{mailbox}"
            )
        };
        let config = Config::parse(&dir.path().join("config.toml"), text("")).unwrap();
        std::fs::create_dir_all(config.data_dir()).unwrap();
        let store = Arc::new(crate::store::Store::open(&config.data_dir(), vec![]).unwrap());
        let vault = Arc::new(crate::oauth::vault::Vault::open(&config.key_file(), None).unwrap());
        let first = TokenManager::new(&config, store.clone(), vault.clone(), None).unwrap();
        assert_eq!(first.slot("u").unwrap().resources(), vec![Resource::Graph]);
        let set = TokenSet {
            access_token: "at-graph-0".into(),
            refresh_token: Some("rt-0".into()),
            expires_in: Some(Duration::from_secs(3600)),
            scopes: vec![],
            account: Some("u@example.com".into()),
        };
        first.sign_in(first.slot("u").unwrap(), set).await.unwrap();
        assert_eq!(first.access_token("u").await.unwrap().secret, "at-graph-0");
        // Graph-only: no mail token to be had.
        assert!(matches!(first.access_token_for("u", Resource::Mail).await, Err(TokenError::Config(_))));

        let config = Config::parse(
            &dir.path().join("config.toml"),
            text("[[mailbox]]\nname = \"print\"\nidentity = \"u\"\nspool = \"spool\"\n"),
        )
        .unwrap();
        let second = TokenManager::new(&config, store, vault, Some(&first)).unwrap();
        assert_eq!(second.slot("u").unwrap().resources(), vec![Resource::Mail, Resource::Graph]);
        assert_eq!(second.access_token_for("u", Resource::Graph).await.unwrap().secret, "at-graph-0");
        assert!(seen.locked().is_empty(), "the Graph token was kept");
        // The sign-in resource is now the mailbox's: fetched with its own scopes.
        assert_eq!(second.access_token("u").await.unwrap().secret, "at-mail-1");
        assert_eq!(seen.locked()[0].1, "https://outlook.office.com/IMAP.AccessAsUser.All offline_access");
        assert_eq!(second.access_token_for("u", Resource::Graph).await.unwrap().secret, "at-graph-0");
    }

    #[test]
    fn access_token_debug_hides_secret() {
        let t = AccessToken { secret: "eyJ0eXAi-secret".into(), account: "a@b".into(), expires_at: 1 };
        assert!(!format!("{t:?}").contains("secret\""));
        assert!(!format!("{t:?}").contains("eyJ0"));
    }
}
