//! The admin operations, written once for both of their callers: the admin listener's JSON API
//! ([`super::Admin`]) and the CLI (`mfd-relay queue ...`, `auth ...`, `reload`), which asks the
//! running daemon through that API and, when no daemon answers, performs the same operation on
//! the data directory itself (sled lets only one process open the database).
//!
//! Each operation is one [`Request`] type: its route, its body, its typed answer, and what it
//! does ([`Request::run`]) on the parts it needs ([`QueueOps`] or [`AuthOps`]). The server
//! answers with the answer type as JSON, the [`Client`] reads the same type back.

use std::future::Future;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::generation::{BuildError, Current, Generation, Shared};
use crate::oauth::login::{LoginStart, LoginStatus, Logins};
use crate::oauth::tokens::{IdentityStatus, TokenManager};
use crate::queue::{MessageId, Queue, QueueError, QueueRecord};
use crate::store::Store;

/// Why an operation failed; the kind decides the HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A malformed request, or one the configuration refuses (400).
    #[error("{0}")]
    Invalid(String),
    /// No such message (404).
    #[error("{0}")]
    NotFound(String),
    /// The message is being delivered right now (409).
    #[error("{0}")]
    Busy(String),
    /// The relay cannot do it now (500, 503).
    #[error("{0}")]
    Unavailable(String),
}

impl OpError {
    /// The HTTP status the admin API answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            OpError::Invalid(_) => 400,
            OpError::NotFound(_) => 404,
            OpError::Busy(_) => 409,
            OpError::Unavailable(_) => 503,
        }
    }
}

/// Parses a queue id as the CLI and the API take it.
fn parse_id(s: &str) -> Result<MessageId, OpError> {
    s.parse()
        .map_err(|_| OpError::Invalid(format!("\"{s}\" is not a queue id (16 hex digits, see `mfd-relay queue list`)")))
}

/// One admin operation: its route, its body, its answer, and what it does.
pub trait Request: Sync {
    /// What the operation answers (the JSON body of a success).
    type Answer: Serialize + DeserializeOwned + Send;
    /// The parts of the relay it acts on.
    type Ops: Sync;
    /// A change (POST, through the admin guard) rather than a read (GET).
    const POST: bool;
    /// Its path under the admin listener.
    fn path(&self) -> String;
    /// The JSON body of a POST (`{}` when there is nothing to say: the admin listener takes
    /// changes only as JSON, which no HTML form can send).
    fn body(&self) -> serde_json::Value {
        serde_json::json!({})
    }
    /// Performs the operation.
    fn run(&self, ops: &Self::Ops) -> impl Future<Output = Result<Self::Answer, OpError>> + Send;
}

/// What the queue operations act on.
pub struct QueueOps {
    /// The relay's queue (the daemon's, or one opened by the CLI).
    pub queue: Arc<Queue>,
}

impl QueueOps {
    /// Opens the data directory (the daemon is stopped). The store stays open as long as
    /// the returned value lives.
    pub async fn offline(config: &Config) -> Result<(QueueOps, Arc<Store>), QueueError> {
        let (store, queue) = crate::queue::open_data_dir(&config.data_dir()).await?;
        Ok((QueueOps { queue }, store))
    }
}

/// What the sign-in operations act on.
pub struct AuthOps {
    /// The current generation's token manager.
    pub tokens: Arc<TokenManager>,
    /// Sign-ins in progress.
    pub logins: Arc<Logins>,
    /// Where the browser comes back to (the admin listener's `/oauth/callback`).
    pub redirect_uri: String,
}

/// Messages in one page of a listing when the request names no `limit`.
pub const DEFAULT_PAGE: usize = 100;
/// The most messages one page may hold.
pub const MAX_PAGE: usize = 1000;

/// `GET /api/queue[?after=<id>&limit=<n>]`: one page of queued messages, oldest first. A page
/// reads only its own records from the store, so listing a deep queue costs no memory; the
/// next page starts after the last id of this one (a cursor, which stays valid while messages
/// leave the queue, unlike an offset).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct QueueList {
    /// Start after this queue id (the previous page's `next_after`); from the oldest without.
    #[serde(default)]
    pub after: Option<String>,
    /// At most this many messages ([`DEFAULT_PAGE`] without, at most [`MAX_PAGE`]).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// The answer to [`QueueList`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuePage {
    /// This page's messages, oldest first.
    pub messages: Vec<QueueRecord>,
    /// Messages queued in all (waiting or being attempted), not only on this page.
    pub total: usize,
    /// The page size used.
    pub limit: usize,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

impl Request for QueueList {
    type Answer = QueuePage;
    type Ops = QueueOps;
    const POST: bool = false;
    fn path(&self) -> String {
        let mut query = Vec::new();
        if let Some(a) = &self.after {
            query.push(format!("after={}", segment(a)));
        }
        if let Some(l) = self.limit {
            query.push(format!("limit={l}"));
        }
        if query.is_empty() {
            "/api/queue".into()
        } else {
            format!("/api/queue?{}", query.join("&"))
        }
    }
    async fn run(&self, ops: &QueueOps) -> Result<QueuePage, OpError> {
        let after = self.after.as_deref().map(parse_id).transpose()?;
        let limit = self.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
        // One more than the page, to know whether another page follows.
        let mut messages = ops.queue.page(after, limit + 1).map_err(|e| OpError::Unavailable(e.to_string()))?;
        let next_after = if messages.len() > limit {
            messages.truncate(limit);
            messages.last().map(|r| r.id.to_string())
        } else {
            None
        };
        let messages = messages.into_iter().map(QueueRecord::shown).collect();
        Ok(QueuePage { messages, total: ops.queue.depth(), limit, next_after })
    }
}

/// `POST /api/queue/retry/{id|all}`: makes a message (or every one) due now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueRetry {
    /// A queue id, or `all`.
    pub which: String,
}

/// The answer to [`QueueRetry`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Retried {
    /// How many messages were made due now.
    pub retried: usize,
}

impl Request for QueueRetry {
    type Answer = Retried;
    type Ops = QueueOps;
    const POST: bool = true;
    fn path(&self) -> String {
        format!("/api/queue/retry/{}", segment(&self.which))
    }
    async fn run(&self, ops: &QueueOps) -> Result<Retried, OpError> {
        let which = if self.which == "all" { None } else { Some(parse_id(&self.which)?) };
        match ops.queue.retry_now(which, None).await {
            Ok(retried) => Ok(Retried { retried }),
            Err(e) => Err(OpError::NotFound(e.to_string())),
        }
    }
}

/// `POST /api/queue/drop/{id}`: removes a message without delivering it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueDrop {
    /// The queue id (16 hex digits).
    pub id: String,
}

/// The answer to [`QueueDrop`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dropped {
    /// The id of the dropped message.
    pub dropped: String,
}

impl Request for QueueDrop {
    type Answer = Dropped;
    type Ops = QueueOps;
    const POST: bool = true;
    fn path(&self) -> String {
        format!("/api/queue/drop/{}", segment(&self.id))
    }
    async fn run(&self, ops: &QueueOps) -> Result<Dropped, OpError> {
        let id = parse_id(&self.id)?;
        match ops.queue.drop_message(id).await {
            Ok(()) => Ok(Dropped { dropped: id.to_string() }),
            Err(e @ QueueError::InFlight(_)) => Err(OpError::Busy(e.to_string())),
            Err(e) => Err(OpError::NotFound(e.to_string())),
        }
    }
}

/// `GET /api/auth/status`: each identity's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthStatus;

impl Request for AuthStatus {
    type Answer = Vec<IdentityStatus>;
    type Ops = AuthOps;
    const POST: bool = false;
    fn path(&self) -> String {
        "/api/auth/status".into()
    }
    async fn run(&self, ops: &AuthOps) -> Result<Vec<IdentityStatus>, OpError> {
        Ok(ops.tokens.status())
    }
}

/// `POST /api/auth/login/{identity}`: starts a sign-in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthLogin {
    /// The `[[identity]]` name.
    pub identity: String,
}

impl Request for AuthLogin {
    type Answer = LoginStart;
    type Ops = AuthOps;
    const POST: bool = true;
    fn path(&self) -> String {
        format!("/api/auth/login/{}", segment(&self.identity))
    }
    async fn run(&self, ops: &AuthOps) -> Result<LoginStart, OpError> {
        ops.logins
            .start(&ops.tokens, &self.identity, &ops.redirect_uri)
            .await
            .map_err(|e| OpError::Invalid(e.to_string()))
    }
}

/// `GET /api/auth/login/{identity}`: where a sign-in stands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthLoginStatus {
    /// The `[[identity]]` name.
    pub identity: String,
}

impl Request for AuthLoginStatus {
    type Answer = LoginStatus;
    type Ops = AuthOps;
    const POST: bool = false;
    fn path(&self) -> String {
        format!("/api/auth/login/{}", segment(&self.identity))
    }
    async fn run(&self, ops: &AuthOps) -> Result<LoginStatus, OpError> {
        Ok(ops.logins.status(&self.identity))
    }
}

/// `POST /api/auth/login/{identity}/url`: completes a browser sign-in with the address the
/// browser ended on (pasted by the person when the redirect could not reach the relay).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthLoginUrl {
    /// The `[[identity]]` name (in the path, not the body).
    #[serde(skip)]
    pub identity: String,
    /// The address the browser ended on.
    pub url: String,
}

/// The answer to [`AuthLoginUrl`]: what happened, for the person.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completed {
    /// What happened, for the person.
    pub ok: String,
}

impl Request for AuthLoginUrl {
    type Answer = Completed;
    type Ops = AuthOps;
    const POST: bool = true;
    fn path(&self) -> String {
        format!("/api/auth/login/{}/url", segment(&self.identity))
    }
    fn body(&self) -> serde_json::Value {
        serde_json::json!({ "url": self.url })
    }
    async fn run(&self, ops: &AuthOps) -> Result<Completed, OpError> {
        match ops.logins.complete_with_url(&ops.tokens, &self.url).await {
            Ok(ok) => Ok(Completed { ok }),
            Err(e) => Err(OpError::Invalid(e.to_string())),
        }
    }
}

/// `POST /api/auth/logout/{identity}`: forgets an identity's stored tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthLogout {
    /// The `[[identity]]` name.
    pub identity: String,
}

/// The answer to [`AuthLogout`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoggedOut {
    /// The identity whose tokens were removed.
    pub logged_out: String,
}

impl Request for AuthLogout {
    type Answer = LoggedOut;
    type Ops = AuthOps;
    const POST: bool = true;
    fn path(&self) -> String {
        format!("/api/auth/logout/{}", segment(&self.identity))
    }
    async fn run(&self, ops: &AuthOps) -> Result<LoggedOut, OpError> {
        match ops.tokens.logout(&self.identity).await {
            Ok(()) => Ok(LoggedOut { logged_out: self.identity.clone() }),
            Err(e) => Err(OpError::Invalid(e.to_string())),
        }
    }
}

/// `POST /api/auth/import/{identity}`: stores a refresh token obtained elsewhere.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthImport {
    /// The `[[identity]]` name (in the path, not the body).
    #[serde(skip)]
    pub identity: String,
    /// The refresh token (a secret: never logged).
    pub refresh_token: String,
}

/// The answer to [`AuthImport`]: the account the token signs in as.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Imported {
    /// The account the token signs in as.
    pub account: String,
}

impl Request for AuthImport {
    type Answer = Imported;
    type Ops = AuthOps;
    const POST: bool = true;
    fn path(&self) -> String {
        format!("/api/auth/import/{}", segment(&self.identity))
    }
    fn body(&self) -> serde_json::Value {
        serde_json::json!({ "refresh_token": self.refresh_token })
    }
    async fn run(&self, ops: &AuthOps) -> Result<Imported, OpError> {
        match ops.tokens.import_refresh_token(&self.identity, self.refresh_token.trim()).await {
            Ok(t) => Ok(Imported { account: t.account }),
            Err(e) => Err(OpError::Invalid(e.to_string())),
        }
    }
}

/// What a reload did (`POST /api/reload`, answered 200 when `ok`, else 422 with the same body).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadReport {
    /// The new configuration runs.
    pub ok: bool,
    /// Problems that kept the new configuration from being used (file:line: message).
    pub problems: Vec<String>,
    /// Changes that only a restart applies.
    pub needs_restart: Vec<String>,
}

/// What [`Reload`] acts on: the daemon's run loop, when there is one.
pub struct ReloadOps {
    /// The run loop's request channel; `None` in a process that cannot reload.
    pub reload: Option<tokio::sync::mpsc::Sender<super::ReloadRequest>>,
}

/// `POST /api/reload`: re-reads the configuration file in the daemon (like SIGHUP).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reload;

impl Request for Reload {
    type Answer = ReloadReport;
    type Ops = ReloadOps;
    const POST: bool = true;
    fn path(&self) -> String {
        "/api/reload".into()
    }
    async fn run(&self, ops: &ReloadOps) -> Result<ReloadReport, OpError> {
        let Some(tx) = ops.reload.clone() else {
            return Err(OpError::Unavailable("reload is not available here".into()));
        };
        let shutting_down = || OpError::Unavailable("the relay is shutting down".into());
        let (reply, rx) = tokio::sync::oneshot::channel();
        tx.send(reply).await.map_err(|_| shutting_down())?;
        rx.await.map_err(|_| shutting_down())
    }
}

/// What [`crate::testsend::TestSend`] acts on: a configuration generation (the daemon's
/// current one, or one opened offline), and who watches the steps.
pub struct TestOps {
    pub generation: Arc<Generation>,
    pub observer: Arc<dyn crate::upstream::Observer>,
}

/// `POST /api/test`: sends one test message as a device would (`mfd-relay test`). The API
/// streams the steps as `application/x-ndjson` ([`crate::testsend::Event`] per line) and ends
/// with the answer; [`Client::test_send`] reads them as they come.
impl Request for crate::testsend::TestSend {
    type Answer = crate::testsend::TestResult;
    type Ops = TestOps;
    const POST: bool = true;
    fn path(&self) -> String {
        "/api/test".into()
    }
    fn body(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
    async fn run(&self, ops: &TestOps) -> Result<crate::testsend::TestResult, OpError> {
        let device = crate::testsend::check(&ops.generation, self).map_err(|e| OpError::Invalid(e.to_string()))?;
        Ok(crate::testsend::run(&ops.generation, &device, self, ops.observer.as_ref()).await)
    }
}

/// The relay's parts opened by a command while the daemon is stopped: the data directory,
/// the token key and one configuration generation (never reloaded).
pub struct Offline {
    /// The data directory and what else outlives a configuration.
    pub shared: Shared,
    /// Keeps the generation channel open.
    _publish: tokio::sync::watch::Sender<Arc<Generation>>,
    /// The generation channel (one generation).
    pub current: Current,
}

impl Offline {
    /// Opens the data directory (failing with [`crate::store::StoreError::Locked`] inside
    /// while the daemon runs) and builds the configuration's parts.
    pub async fn open(config: Config) -> Result<Offline, BuildError> {
        let shared = Shared::open(&config).await?;
        let (publish, current) = Generation::build(config, &shared, None)?.publish_once();
        Ok(Offline { shared, _publish: publish, current })
    }

    /// The sign-in operations on these parts.
    pub fn auth_ops(&self) -> AuthOps {
        let generation = self.current.borrow().clone();
        AuthOps {
            tokens: generation.tokens.clone(),
            logins: self.shared.logins.clone(),
            redirect_uri: generation.config.admin.redirect_uri(),
        }
    }

    /// An admin listener on these parts (the browser's return of an offline sign-in).
    pub fn admin(&self) -> super::Admin {
        super::Admin::new(super::Deps {
            queue: self.shared.queue.clone(),
            logins: self.shared.logins.clone(),
            activity: self.shared.activity.clone(),
            current: self.current.clone(),
            reload: None,
        })
        .callback_page_only()
    }
}

/// Why the client could not get an answer from the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Http(#[from] reqwest::Error),
    /// The daemon refused the request: its status and text.
    #[error("{text}")]
    Refused { status: reqwest::StatusCode, text: String },
    #[error("unexpected answer from {url}: {source}")]
    Answer { url: String, source: serde_json::Error },
}

/// Talks to the running daemon's admin listener.
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client of the admin listener `config` names; `timeout` bounds each request.
    pub fn new(config: &Config, timeout: std::time::Duration) -> Result<Client, ClientError> {
        Client::at(format!("http://{}", config.admin.listen.get_ref()), config.admin.token.clone(), timeout)
    }

    /// A client of the admin listener at `base` (`http://host:port`), with its bearer token.
    pub fn at(base: String, token: Option<String>, timeout: std::time::Duration) -> Result<Client, ClientError> {
        Ok(Client { base, token, http: reqwest::Client::builder().timeout(timeout).build()? })
    }

    /// The admin listener's address, for messages.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends `req` to the daemon: `None` when no daemon answers. `answer_on_error`: the
    /// answer type also comes with an error status (a refused reload's report).
    pub async fn send<R: Request>(&self, req: &R, answer_on_error: bool) -> Result<Option<R::Answer>, ClientError> {
        let url = format!("{}{}", self.base, req.path());
        let mut r = if R::POST { self.http.post(&url).json(&req.body()) } else { self.http.get(&url) };
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        let resp = match r.send().await {
            Ok(resp) => resp,
            Err(e) if e.is_connect() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            return match serde_json::from_str(&text) {
                Ok(answer) if answer_on_error => Ok(Some(answer)),
                _ => Err(ClientError::Refused { status, text: text.trim().to_string() }),
            };
        }
        serde_json::from_str(&text).map(Some).map_err(|source| ClientError::Answer { url, source })
    }
}

impl Client {
    /// Sends a test through the daemon, handing each step and then the result to `each` as
    /// the lines arrive; `None` when no daemon answers.
    pub async fn test_send(
        &self,
        req: &crate::testsend::TestSend,
        mut each: impl FnMut(crate::testsend::Event),
    ) -> Result<Option<()>, ClientError> {
        let url = format!("{}{}", self.base, req.path());
        let mut r = self.http.post(&url).json(&req.body());
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        let mut resp = match r.send().await {
            Ok(resp) => resp,
            Err(e) if e.is_connect() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await?;
            return Err(ClientError::Refused { status, text: refusal_text(&text) });
        }
        let mut buf = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                if line.trim().is_empty() {
                    continue;
                }
                let event = serde_json::from_str(line.trim())
                    .map_err(|source| ClientError::Answer { url: url.clone(), source })?;
                each(event);
            }
        }
        Ok(Some(()))
    }
}

/// The text of a refusal: the `error` of a JSON body, else the body.
fn refusal_text(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string())
}

/// `s` as one path segment: what a person typed (a queue id, an identity) can never become
/// another route (`queue drop ../../reload`). Unreserved characters stay (RFC 3986 2.3).
fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_person_typed_stays_one_path_segment() {
        let drop = QueueDrop { id: "../../reload".into() };
        assert_eq!(drop.path(), "/api/queue/drop/..%2F..%2Freload");
        let retry = QueueRetry { which: "all".into() };
        assert_eq!(retry.path(), "/api/queue/retry/all");
        let login = AuthLogin { identity: "scans floor 3?x=1".into() };
        assert_eq!(login.path(), "/api/auth/login/scans%20floor%203%3Fx%3D1");
    }
}
