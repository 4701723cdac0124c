//! The admin listener (loopback HTTP): `/metrics`, `/healthz`, `/readyz`, and the JSON API
//! that `mfd-relay queue ...` and `mfd-relay auth ...` use while the daemon runs (sled lets
//! only one process open the database).

use std::sync::Arc;

use std::collections::HashMap;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::oauth::login::Logins;
use crate::oauth::tokens::{IdentityState, TokenManager};
use crate::queue::{MessageId, Queue};
use crate::relay::Parts;

/// Shared state of the admin handlers.
#[derive(Clone)]
pub struct Admin {
    queue: Arc<Queue>,
    tokens: Arc<TokenManager>,
    token: Option<Arc<String>>,
    ready_when_needs_login: bool,
    logins: Arc<Logins>,
    redirect_uri: Arc<String>,
}

impl Admin {
    pub fn new(parts: &Parts) -> Admin {
        Admin {
            queue: parts.queue.clone(),
            tokens: parts.tokens.clone(),
            token: parts.config.admin.token.clone().map(Arc::new),
            ready_when_needs_login: parts.config.admin.ready_when_needs_login,
            logins: parts.logins.clone(),
            redirect_uri: Arc::new(parts.config.admin.redirect_uri()),
        }
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .route("/api/queue", get(queue_list))
            .route("/api/queue/retry/{id}", post(queue_retry))
            .route("/api/queue/drop/{id}", post(queue_drop))
            .route("/api/auth/status", get(auth_status))
            .route("/api/auth/login/{id}", post(auth_login).get(auth_login_status))
            .route("/api/auth/login/{id}/url", post(auth_login_url))
            .route("/api/auth/logout/{id}", post(auth_logout))
            .route("/api/auth/import/{id}", post(auth_import))
            .route("/oauth/callback", get(oauth_callback))
            .with_state(self)
    }

    /// Serves until shutdown.
    pub async fn serve(self, listener: tokio::net::TcpListener, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let app = self.router();
        let result = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!("admin listener: {e}");
        }
    }

    fn authorised(&self, headers: &HeaderMap) -> bool {
        match &self.token {
            None => true,
            Some(t) => headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|v| constant_time_eq(v.as_bytes(), t.as_bytes())),
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorised() -> Response {
    (StatusCode::UNAUTHORIZED, "admin token required\n").into_response()
}

async fn readyz(State(a): State<Admin>, headers: HeaderMap) -> Response {
    if !a.authorised(&headers) {
        return unauthorised();
    }
    let waiting: Vec<String> = a
        .tokens
        .status()
        .into_iter()
        .filter(|s| s.state == IdentityState::NeedsLogin.as_str())
        .map(|s| s.name)
        .collect();
    if waiting.is_empty() || a.ready_when_needs_login {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("identities need a sign-in: {}\n", waiting.join(", ")))
            .into_response()
    }
}

async fn metrics(State(a): State<Admin>, headers: HeaderMap) -> Response {
    if !a.authorised(&headers) {
        return unauthorised();
    }
    crate::delivery::update_queue_metrics(&a.queue);
    ([("content-type", "text/plain; version=0.0.4")], crate::metrics::render()).into_response()
}

async fn queue_list(State(a): State<Admin>, headers: HeaderMap) -> Response {
    if !a.authorised(&headers) {
        return unauthorised();
    }
    match a.queue.list() {
        Ok(v) => Json(v).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn queue_retry(State(a): State<Admin>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !a.authorised(&headers) {
        return unauthorised();
    }
    let which = if id == "all" {
        None
    } else {
        match id.parse::<MessageId>() {
            Ok(m) => Some(m),
            Err(_) => return (StatusCode::BAD_REQUEST, format!("\"{id}\" is not a queue id\n")).into_response(),
        }
    };
    match a.queue.retry_now(which, None) {
        Ok(n) => Json(serde_json::json!({ "retried": n })).into_response(),
        Err(e) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    }
}

async fn queue_drop(State(a): State<Admin>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !a.authorised(&headers) {
        return unauthorised();
    }
    let Ok(id) = id.parse::<MessageId>() else {
        return (StatusCode::BAD_REQUEST, format!("\"{id}\" is not a queue id\n")).into_response();
    };
    match a.queue.drop_message(id) {
        Ok(()) => Json(serde_json::json!({ "dropped": id.to_string() })).into_response(),
        Err(e) => (StatusCode::NOT_FOUND, format!("{e}\n")).into_response(),
    }
}

async fn auth_status(State(a): State<Admin>, headers: HeaderMap) -> Response {
    if !a.authorised(&headers) {
        return unauthorised();
    }
    Json(a.tokens.status()).into_response()
}

fn error(status: StatusCode, e: impl std::fmt::Display) -> Response {
    (status, format!("{e}\n")).into_response()
}

async fn auth_login(State(a): State<Admin>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !a.authorised(&headers) {
        return unauthorised();
    }
    match a.logins.start(&a.tokens, &id, &a.redirect_uri).await {
        Ok(start) => Json(start).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn auth_login_status(State(a): State<Admin>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !a.authorised(&headers) {
        return unauthorised();
    }
    Json(a.logins.status(&id)).into_response()
}

/// Body of `POST /api/auth/login/{id}/url`: the address the browser ended on.
#[derive(serde::Deserialize)]
struct RedirectedUrl {
    url: String,
}

async fn auth_login_url(State(a): State<Admin>, headers: HeaderMap, Json(body): Json<RedirectedUrl>) -> Response {
    if !a.authorised(&headers) {
        return unauthorised();
    }
    match a.logins.complete_with_url(&a.tokens, &body.url).await {
        Ok(msg) => Json(serde_json::json!({ "ok": msg })).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn auth_logout(State(a): State<Admin>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !a.authorised(&headers) {
        return unauthorised();
    }
    match a.tokens.logout(&id).await {
        Ok(()) => Json(serde_json::json!({ "logged_out": id })).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// Body of `POST /api/auth/import/{id}`.
#[derive(serde::Deserialize)]
struct ImportToken {
    refresh_token: String,
}

async fn auth_import(
    State(a): State<Admin>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Json(body): Json<ImportToken>,
) -> Response {
    if !a.authorised(&headers) {
        return unauthorised();
    }
    match a.tokens.import_refresh_token(&id, body.refresh_token.trim()).await {
        Ok(t) => Json(serde_json::json!({ "account": t.account })).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// The browser's return from the provider (authorization code flow). No admin token: the
/// browser cannot send one; the one-time `state` is what authorises this request.
async fn oauth_callback(State(a): State<Admin>, Query(q): Query<HashMap<String, String>>) -> Response {
    let (status, title, text) = match a.logins.callback(&a.tokens, &q).await {
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

/// Escapes text for HTML.
pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
