//! The admin listener (loopback HTTP by default): `/metrics`, `/healthz`, `/readyz`, the
//! status page `/status` for a person with a browser, the OAuth callback, and the JSON API
//! that `mfd-relay queue ...` and `mfd-relay auth ...` use while the daemon runs (sled lets
//! only one process open the database).
//!
//! Before credentials, [`guard`] refuses requests a web page could have made: a foreign
//! `Host` (DNS rebinding), a cross-site or non-JSON state change (CSRF).
//! Access ([`auth`]): open when neither `[admin] token` nor basic auth is configured;
//! otherwise every route but `/healthz`, `/` and the OAuth callback needs a bearer token or
//! basic-auth credentials; failed logins are throttled per address like device logins.
//! What the admin takes from the configuration is one [`View`], built once per configuration
//! generation (read from the generation channel, ARCHITECTURE.md "Reload").
//!
//! The actions themselves (queue, sign-in, reload) are in [`ops`], shared with the offline
//! CLI, together with the request and answer types that the CLI sends and reads.

pub mod auth;
pub mod guard;
pub mod ops;
pub mod status;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::activity::Activity;
use crate::config::Config;
use crate::generation::{Current, Generation};
use crate::locks::MutexExt;
use crate::oauth::login::Logins;
use crate::oauth::tokens::{IdentityState, TokenManager};
use crate::queue::Queue;
use auth::Access;
use ops::Request as _;
use status::{DeviceInfo, MailboxInfo};

/// A reload request from the admin listener to the daemon's run loop, answered on the
/// oneshot.
pub type ReloadRequest = tokio::sync::oneshot::Sender<ops::ReloadReport>;

/// What the admin listener uses from the relay.
pub struct Deps {
    /// The queue the API lists, retries and drops from.
    pub queue: Arc<Queue>,
    /// Sign-ins in progress (kept across reloads).
    pub logins: Arc<Logins>,
    /// What the status page shows of devices and mailboxes.
    pub activity: Arc<Activity>,
    /// The generation channel: the current configuration and token manager.
    pub current: Current,
    /// Where `POST /api/reload` sends its request (the daemon's run loop); `None` where
    /// there is nothing to reload (the offline CLI's callback listener).
    pub reload: Option<tokio::sync::mpsc::Sender<ReloadRequest>>,
}

/// The [`View`] of one generation, with the generation it was built from.
type ViewCache = Mutex<Option<(Arc<Generation>, Arc<View>)>>;

/// Shared state of the admin handlers.
#[derive(Clone)]
pub struct Admin {
    queue: Arc<Queue>,
    logins: Arc<Logins>,
    activity: Arc<Activity>,
    current: Current,
    redirect_uri: Arc<String>,
    /// Unix seconds when the admin (and so the relay) started.
    started: i64,
    /// The view of the generation it was built from (built at the first request after a
    /// reload).
    view: Arc<ViewCache>,
    reload: Option<tokio::sync::mpsc::Sender<ReloadRequest>>,
    /// Failed admin logins per address (kept across reloads).
    throttle: Arc<crate::smtp::auth::AuthThrottle>,
    /// The browser's return from a sign-in goes on to `/status`, which shows the result
    /// (the daemon); off in the CLI's own callback listener, which stops once signed in.
    callback_to_status: bool,
}

/// What the admin listener takes from the configuration.
pub struct View {
    access: Access,
    hosts: guard::HostPolicy,
    ready_when_needs_login: bool,
    hostname: String,
    devices: Vec<DeviceInfo>,
    mailboxes: Vec<MailboxInfo>,
}

impl View {
    pub fn from_config(config: &Config) -> View {
        View {
            access: Access::new(config.admin.token.clone(), basic_auth(&config.admin)),
            hosts: guard::HostPolicy::new(
                *config.admin.listen.get_ref(),
                &config.admin.redirect_uri(),
                &config.admin.allowed_hosts.iter().map(|h| h.get_ref().clone()).collect::<Vec<_>>(),
            ),
            ready_when_needs_login: config.admin.ready_when_needs_login,
            hostname: config.relay.hostname.clone(),
            devices: DeviceInfo::from_config(config),
            mailboxes: MailboxInfo::from_config(config),
        }
    }
}

/// The basic-auth credentials of `[admin]`: (user, argon2 hash of the password).
///
/// Waiting for two fields in `config::Admin` (issue 5):
/// `basic_auth_user: Option<String>` and `basic_auth_password_hash: Option<String>`; then:
/// `admin.basic_auth_user.clone().zip(admin.basic_auth_password_hash.clone())`.
fn basic_auth(admin: &crate::config::Admin) -> Option<(String, String)> {
    admin
        .basic_auth_user
        .as_ref()
        .map(|u| u.get_ref().clone())
        .zip(admin.basic_auth_password_hash.as_ref().map(|h| h.get_ref().clone()))
}

impl Admin {
    /// The redirect URI is the first generation's: the browser comes back to the address the
    /// relay started with.
    pub fn new(deps: Deps) -> Admin {
        let redirect_uri = deps.current.borrow().config.admin.redirect_uri();
        Admin {
            queue: deps.queue,
            logins: deps.logins,
            activity: deps.activity,
            current: deps.current,
            redirect_uri: Arc::new(redirect_uri),
            started: chrono::Utc::now().timestamp(),
            view: Arc::default(),
            reload: deps.reload,
            throttle: Arc::new(crate::smtp::auth::AuthThrottle::new(crate::smtp::AUTH_LIMITS)),
            callback_to_status: true,
        }
    }

    /// The browser's return from a sign-in ends on its own page ("You can close this
    /// window") instead of going on to `/status`: for the CLI's listener, which stops once
    /// the sign-in is done.
    pub fn callback_page_only(mut self) -> Admin {
        self.callback_to_status = false;
        self
    }

    /// The current generation's token manager.
    fn tokens(&self) -> Arc<TokenManager> {
        self.current.borrow().tokens.clone()
    }

    /// Replaces what the admin takes from the current configuration, until the next
    /// generation (tests).
    pub fn set_view(&self, view: View) {
        let generation = self.current.borrow().clone();
        *self.view.locked() = Some((generation, Arc::new(view)));
    }

    /// What the admin takes from the current generation's configuration: the credentials,
    /// devices and mailboxes shown and the readiness rule. Built once per generation, so a
    /// reload forgets a remembered basic-auth success.
    fn view(&self) -> Arc<View> {
        let generation = self.current.borrow().clone();
        let mut cached = self.view.locked();
        if let Some((built_for, view)) = &*cached {
            if Arc::ptr_eq(built_for, &generation) {
                return view.clone();
            }
        }
        let view = Arc::new(View::from_config(&generation.config));
        *cached = Some((generation, view.clone()));
        view
    }

    pub fn router(self) -> Router {
        let protected = Router::new()
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/status", get(status_page))
            .route("/api/queue", get(queue_list))
            .route("/api/queue/retry/{id}", post(queue_retry))
            .route("/api/queue/drop/{id}", post(queue_drop))
            .route("/api/auth/status", get(auth_status))
            .route("/api/auth/login/{id}", post(auth_login).get(auth_login_status))
            .route("/api/auth/login/{id}/url", post(auth_login_url))
            .route("/api/auth/logout/{id}", post(auth_logout))
            .route("/api/auth/import/{id}", post(auth_import))
            .route("/api/reload", post(reload))
            .route("/api/test", post(test_send))
            .route_layer(middleware::from_fn_with_state(self.clone(), require_access));
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/", get(|| async { Redirect::to("/status") }))
            // The browser's return from the provider: the one-time `state` authorises it.
            .route("/oauth/callback", get(oauth_callback))
            .merge(protected)
            .layer(middleware::from_fn_with_state(self.clone(), guard_requests))
            .with_state(self)
    }

    /// Serves until shutdown.
    pub async fn serve(self, listener: tokio::net::TcpListener, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let app = self.router();
        let result = axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!("admin listener: {e}");
        }
    }
}

/// Refuses what [`guard::check`] refuses: foreign `Host`, cross-site or non-JSON changes.
async fn guard_requests(State(a): State<Admin>, req: Request, next: Next) -> Response {
    match guard::check(&a.view().hosts, req.method(), req.uri().path(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refusal) => {
            tracing::debug!(path = %req.uri().path(), ?refusal, "admin request refused");
            refusal.response()
        }
    }
}

/// How long a throttled address is told to wait (seconds).
const THROTTLE_RETRY_AFTER: u64 = crate::smtp::AUTH_LIMITS.forgive_every.as_secs();

/// Lets a request through when its credentials fit [`View::access`]; else a 401, given
/// after a delay that grows with the failures of that address, and after too many a 429
/// whatever the credentials (as device logins are throttled).
async fn require_access(State(a): State<Admin>, req: Request, next: Next) -> Response {
    let view = a.view();
    if view.access.is_open() {
        return next.run(req).await;
    }
    let ip = req.extensions().get::<ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip());
    // The attempt is reserved before the credentials are checked, as for device logins, so
    // that parallel guesses cannot all pass the throttle before the first failure counts.
    let attempt = match ip.map(|ip| a.throttle.begin(ip, None, std::time::Instant::now())) {
        Some(Err(_)) => {
            tracing::warn!(address = ?ip, "admin request refused: too many failed logins");
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, THROTTLE_RETRY_AFTER.to_string())],
                "too many failed logins from this address; try again later\n",
            )
                .into_response();
        }
        Some(Ok(attempt)) => Some(attempt),
        None => None,
    };
    match view.access.check(req.headers()).await {
        auth::Verdict::Allowed => {
            if let Some(attempt) = attempt {
                attempt.succeeded_sole_credential(std::time::Instant::now());
            }
            next.run(req).await
        }
        auth::Verdict::Missing => {
            // No credentials at all is a browser's first request, not a guess.
            if let Some(attempt) = attempt {
                attempt.succeeded(std::time::Instant::now());
            }
            view.access.refusal(req.uri().path() == "/status")
        }
        auth::Verdict::Wrong => {
            tracing::warn!(path = %req.uri().path(), address = ?ip, "admin request refused: wrong credentials");
            if let Some(attempt) = attempt {
                tokio::time::sleep(attempt.failed(std::time::Instant::now())).await;
            }
            view.access.refusal(req.uri().path() == "/status")
        }
    }
}

async fn readyz(State(a): State<Admin>) -> Response {
    if let Some(why) = a.queue.store_failure() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("database failed, restarting: {why}\n")).into_response();
    }
    let waiting: Vec<String> = a
        .tokens()
        .status()
        .into_iter()
        .filter(|s| s.state == IdentityState::NeedsLogin.as_str())
        .map(|s| s.name)
        .collect();
    if waiting.is_empty() || a.view().ready_when_needs_login {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("identities need a sign-in: {}\n", waiting.join(", ")))
            .into_response()
    }
}

async fn metrics(State(a): State<Admin>) -> Response {
    crate::delivery::update_queue_metrics(&a.queue);
    ([("content-type", "text/plain; version=0.0.4")], crate::metrics::render()).into_response()
}

/// The status page: collected off the async workers (it scans the queue records).
/// `?signin=<identity>` (where the browser lands after a sign-in) shows that identity's
/// sign-in result at the top.
async fn status_page(State(a): State<Admin>, Query(q): Query<HashMap<String, String>>) -> Response {
    let page = tokio::task::spawn_blocking(move || {
        let view = a.view();
        let tokens = a.tokens();
        let sources = status::Sources {
            hostname: &view.hostname,
            started: a.started,
            tokens: &tokens,
            queue: &a.queue,
            activity: &a.activity,
            devices: &view.devices,
            mailboxes: &view.mailboxes,
            logins: &a.logins,
            signin: q.get("signin").map(String::as_str),
        };
        status::render(&status::collect(&sources, chrono::Utc::now().timestamp()))
    })
    .await;
    match page {
        Ok(page) => (
            [
                (header::CACHE_CONTROL, "no-store"),
                // Inline CSS and the page's own script (by its hash) only: any script that
                // slipped into a value would not run.
                (header::CONTENT_SECURITY_POLICY, status::content_security_policy()),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                (header::X_FRAME_OPTIONS, "DENY"),
                (header::REFERRER_POLICY, "no-referrer"),
            ],
            Html(page),
        )
            .into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Runs one operation of [`ops`] and answers with its typed answer as JSON, or its error's
/// status and text.
async fn answer<R: ops::Request>(ops: &R::Ops, req: R) -> Response {
    match req.run(ops).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            error(status, e)
        }
    }
}

impl Admin {
    fn queue_ops(&self) -> ops::QueueOps {
        ops::QueueOps { queue: self.queue.clone() }
    }

    fn auth_ops(&self) -> ops::AuthOps {
        ops::AuthOps { tokens: self.tokens(), logins: self.logins.clone(), redirect_uri: self.redirect_uri.to_string() }
    }
}

/// `GET /api/queue[?after=<id>&limit=<n>]`: one page (see [`ops::QueueList`]).
async fn queue_list(State(a): State<Admin>, Query(page): Query<ops::QueueList>) -> Response {
    answer(&a.queue_ops(), page).await
}

async fn queue_retry(State(a): State<Admin>, Path(which): Path<String>) -> Response {
    answer(&a.queue_ops(), ops::QueueRetry { which }).await
}

async fn queue_drop(State(a): State<Admin>, Path(id): Path<String>) -> Response {
    answer(&a.queue_ops(), ops::QueueDrop { id }).await
}

async fn auth_status(State(a): State<Admin>) -> Response {
    answer(&a.auth_ops(), ops::AuthStatus).await
}

fn error(status: StatusCode, e: impl std::fmt::Display) -> Response {
    (status, format!("{e}\n")).into_response()
}

async fn auth_login(State(a): State<Admin>, Path(identity): Path<String>) -> Response {
    answer(&a.auth_ops(), ops::AuthLogin { identity }).await
}

async fn auth_login_status(State(a): State<Admin>, Path(identity): Path<String>) -> Response {
    answer(&a.auth_ops(), ops::AuthLoginStatus { identity }).await
}

async fn auth_login_url(
    State(a): State<Admin>,
    Path(identity): Path<String>,
    Json(body): Json<ops::AuthLoginUrl>,
) -> Response {
    answer(&a.auth_ops(), ops::AuthLoginUrl { identity, ..body }).await
}

async fn auth_logout(State(a): State<Admin>, Path(identity): Path<String>) -> Response {
    answer(&a.auth_ops(), ops::AuthLogout { identity }).await
}

async fn auth_import(
    State(a): State<Admin>,
    Path(identity): Path<String>,
    Json(body): Json<ops::AuthImport>,
) -> Response {
    answer(&a.auth_ops(), ops::AuthImport { identity, ..body }).await
}

/// The browser's return from the provider (authorization code flow). No admin token: the
/// browser cannot send one; the one-time `state` is what authorises this request.
async fn oauth_callback(State(a): State<Admin>, Query(q): Query<HashMap<String, String>>) -> Response {
    let (identity, outcome) = a.logins.callback_of(&a.tokens(), &q).await;
    if let (Some(identity), true) = (identity, a.callback_to_status) {
        // The status page reads the result from the sign-in itself, not from the URL: a link
        // cannot make it say anything but the identity's real state.
        let to: String = url::form_urlencoded::byte_serialize(identity.as_bytes()).collect();
        return Redirect::to(&format!("/status?signin={to}#identities")).into_response();
    }
    let (status, title, text) = match outcome {
        Ok(msg) => (StatusCode::OK, "Signed in", msg),
        Err(e) => (StatusCode::BAD_REQUEST, "Sign-in failed", e),
    };
    let page = format!(
        "<!doctype html><meta charset=utf-8><title>mfd-relay: {title}</title>\
         <body style=\"font-family:sans-serif;margin:3em\"><h1>{title}</h1><p>{}</p>\
         <p>You can close this window.</p></body>",
        html_escape(&text)
    );
    (status, Html(page)).into_response()
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests;

/// `POST /api/reload`: re-reads the configuration file in the daemon (like SIGHUP) and
/// answers with what happened: 200 when the new configuration runs, 422 when it was refused.
async fn reload(State(a): State<Admin>) -> Response {
    match ops::Reload.run(&ops::ReloadOps { reload: a.reload.clone() }).await {
        Ok(report) => {
            let status = if report.ok { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
            (status, Json(report)).into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// `POST /api/test`: one test message as a device would send it, its steps streamed as
/// `application/x-ndjson` as they finish, the result last (README.md, "mfd-relay test"). A
/// request the configuration refuses (unknown device, recipient outside its allow-list) gets
/// 400 with `{"error": ...}` before anything is sent.
async fn test_send(State(a): State<Admin>, Json(req): Json<crate::testsend::TestSend>) -> Response {
    use crate::testsend::{Channel, Event};
    let generation = a.current.borrow().clone();
    if let Err(e) = crate::testsend::check(&generation, &req) {
        return (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": e.to_string() }))).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let observer = Arc::new(Channel(tx.clone()));
    // The test runs to its end even if the browser goes away (it is one message, never retried).
    tokio::spawn(async move {
        let result = match req.run(&ops::TestOps { generation, observer }).await {
            Ok(result) => result,
            Err(e) => crate::testsend::TestResult { delivered: false, reply: e.to_string(), hint: None },
        };
        let _ = tx.send(Event::Result(result));
    });
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        let mut line = serde_json::to_string(&event).unwrap_or_default();
        line.push('\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson"), (header::CACHE_CONTROL, "no-store")],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}
