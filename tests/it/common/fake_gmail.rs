//! A fake Gmail API (`users.messages.send` by upload) for integration tests, on
//! `127.0.0.1:<random port>`.
//!
//! It enforces what Google does:
//! - `Authorization: Bearer` on every send and session start (401 with Google's error JSON
//!   otherwise); the account is what the [`BearerValidator`] says.
//! - `POST /upload/gmail/v1/users/me/messages/send?uploadType=media`: `Content-Type`
//!   `message/*`, at most [`MEDIA_MAX`] bytes (413 above).
//! - `?uploadType=resumable`: `X-Upload-Content-Length` at most [`MAX_SIZE`] (413 above);
//!   200 with a `Location` session URI (the same path with `&upload_id=`). `PUT` chunks in
//!   order with `Content-Range: bytes a-b/total`, each a multiple of 256 KiB except the last;
//!   308 with `Range: bytes=0-N` while incomplete (no `Range` before the first byte), 200 with
//!   the message resource when complete. `Content-Range: bytes */total` with an empty body asks
//!   where a session stands; a completed session answers 200 again and sends nothing more.
//!   Like Google, the session URI itself is the credential: chunks need no token.
//! - The message is parsed: the recipients are its To/Cc/Bcc, Bcc is removed from what is
//!   delivered, a message without recipients is refused (400 `invalidArgument`).
//!
//! Knobs: answer 429 with `Retry-After` the next N requests ([`FakeGmail::throttle`]), refuse
//! with a given Google error ([`FakeGmail::refuse`]), fail the Nth chunk once with 503 without
//! keeping it ([`FakeGmail::fail_chunk`]), hang on the Nth chunk ([`FakeGmail::stall_chunk`]),
//! expire every open session ([`FakeGmail::expire_sessions`]).
//! Every request is logged ([`FakeGmail::requests`]) so a test can count the bytes that went up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, RawQuery, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::json;

use super::BearerValidator;
use super::ServerTask;

/// Largest `uploadType=media` body.
pub const MEDIA_MAX: usize = 5_000_000;
/// Largest message (35 MiB).
pub const MAX_SIZE: u64 = 35 * 1024 * 1024;
/// Chunks are multiples of this, except the last.
pub const CHUNK_UNIT: usize = 256 * 1024;

const SEND_PATH: &str = "/upload/gmail/v1/users/me/messages/send";
/// How long a stalled chunk hangs.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(20);

/// A message the fake "sent".
#[derive(Clone, Debug)]
pub struct SentMessage {
    /// The account of the token that sent it.
    pub account: String,
    /// Its To, Cc and Bcc addresses, lowercased, in header order, without duplicates.
    pub recipients: Vec<String>,
    /// The message as delivered (Bcc removed).
    pub raw: Vec<u8>,
    /// `media` or `resumable`.
    pub upload: &'static str,
    pub id: String,
}

/// One request the fake answered.
#[derive(Clone, Debug)]
pub struct Request {
    /// `media`, `open`, `chunk` or `query`.
    pub kind: &'static str,
    pub content_range: Option<String>,
    pub body_len: usize,
    pub status: u16,
    pub authorization: bool,
}

struct Session {
    account: String,
    total: u64,
    received: Vec<u8>,
    sent: Option<String>,
    expired: bool,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, Session>,
    next_id: u64,
    sent: Vec<SentMessage>,
    requests: Vec<Request>,
    throttle: u32,
    throttle_retry_after: u64,
    refuse: Option<(u16, String, String)>,
    fail_chunk: Option<usize>,
    stall_chunk: Option<usize>,
    stalled: usize,
    chunks_seen: usize,
}

struct Shared {
    state: Mutex<State>,
    base_url: String,
    validator: BearerValidator,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle on a running fake Gmail API; the server stops with the last clone.
#[derive(Clone)]
pub struct FakeGmail {
    shared: Arc<Shared>,
    _task: Arc<ServerTask>,
}

impl FakeGmail {
    pub async fn start(validator: BearerValidator) -> FakeGmail {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("FakeGmail: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let shared =
            Arc::new(Shared { state: Mutex::new(State::default()), base_url: format!("http://{addr}"), validator });
        let app = Router::new()
            .route(SEND_PATH, post(send_handler).put(chunk_handler))
            // Room for a 35 MiB media upload to be refused with Google's 413, not axum's.
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(shared.clone());
        FakeGmail { shared, _task: ServerTask::serve(listener, app) }
    }

    /// The `gmail_api_url`: `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The messages sent so far.
    pub fn sent(&self) -> Vec<SentMessage> {
        self.shared.lock().sent.clone()
    }

    /// The requests answered so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// The next `times` requests (sends, session starts, chunks) get 429 `rateLimitExceeded`
    /// with `Retry-After: retry_after`.
    pub fn throttle(&self, times: u32, retry_after: u64) {
        let mut st = self.shared.lock();
        st.throttle = times;
        st.throttle_retry_after = retry_after;
    }

    /// Every send and session start is refused with this Google error from now on.
    pub fn refuse(&self, status: u16, reason: &str, message: &str) {
        self.shared.lock().refuse = Some((status, reason.to_string(), message.to_string()));
    }

    /// The `n`th chunk `PUT` from now (1-based; status queries do not count) gets 503 once and
    /// is not kept, as when the connection broke under it.
    pub fn fail_chunk(&self, n: usize) {
        let mut st = self.shared.lock();
        st.fail_chunk = Some(st.chunks_seen + n);
    }

    /// The `n`th chunk `PUT` from now hangs for [`STALL`], is not kept, and then gets 503:
    /// time for a test to kill the relay in the middle of an upload.
    pub fn stall_chunk(&self, n: usize) {
        let mut st = self.shared.lock();
        st.stall_chunk = Some(st.chunks_seen + n);
    }

    /// How many chunks have started to hang ([`FakeGmail::stall_chunk`]).
    pub fn stalled(&self) -> usize {
        self.shared.lock().stalled
    }

    /// Every session open now expires (404 from then on).
    pub fn expire_sessions(&self) {
        for s in self.shared.lock().sessions.values_mut() {
            s.expired = true;
        }
    }

    /// Sessions opened so far.
    pub fn sessions_opened(&self) -> usize {
        self.shared.lock().next_id as usize
    }
}

/// Google's error body.
fn google_error(status: StatusCode, reason: &str, message: &str) -> Response {
    let grpc = match status.as_u16() {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        413 => "INVALID_ARGUMENT",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        _ => "UNKNOWN",
    };
    let body = json!({"error": {"code": status.as_u16(), "message": message, "status": grpc,
        "errors": [{"message": message, "domain": "global", "reason": reason}]}});
    (status, [(header::CONTENT_TYPE, "application/json; charset=UTF-8")], body.to_string()).into_response()
}

fn unauthenticated() -> Response {
    google_error(
        StatusCode::UNAUTHORIZED,
        "authError",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential.",
    )
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// The throttle and refusal knobs, applied before anything else.
fn knobs(st: &mut State) -> Option<Response> {
    if st.throttle > 0 {
        st.throttle -= 1;
        let mut r = google_error(StatusCode::TOO_MANY_REQUESTS, "rateLimitExceeded", "User-rate limit exceeded.");
        r.headers_mut().insert(header::RETRY_AFTER, st.throttle_retry_after.into());
        return Some(r);
    }
    None
}

fn log(st: &mut State, kind: &'static str, headers: &HeaderMap, body_len: usize, r: &Response) {
    st.requests.push(Request {
        kind,
        content_range: headers.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).map(str::to_string),
        body_len,
        status: r.status().as_u16(),
        authorization: headers.contains_key(header::AUTHORIZATION),
    });
}

async fn send_handler(
    AxState(shared): AxState<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query.unwrap_or_default();
    let kind = match query_param(&query, "uploadType") {
        Some("media") => "media",
        Some("resumable") => "open",
        _ => {
            return google_error(
                StatusCode::BAD_REQUEST,
                "invalidArgument",
                "Invalid upload type; expected media or resumable.",
            )
        }
    };
    let account = bearer(&headers).and_then(|t| (shared.validator)(t));
    let mut st = shared.lock();
    let r = answer_send(&mut st, kind, account, &headers, &body, &shared.base_url);
    log(&mut st, kind, &headers, body.len(), &r);
    r
}

fn answer_send(
    st: &mut State,
    kind: &'static str,
    account: Option<String>,
    headers: &HeaderMap,
    body: &[u8],
    base_url: &str,
) -> Response {
    let Some(account) = account else { return unauthenticated() };
    if let Some(r) = knobs(st) {
        return r;
    }
    if let Some((status, reason, message)) = &st.refuse {
        return google_error(StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST), reason, message);
    }
    if kind == "media" {
        let ctype = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !ctype.starts_with("message/") {
            return google_error(
                StatusCode::BAD_REQUEST,
                "badContent",
                &format!("Media type '{ctype}' is not supported. Valid media types: [message/*]"),
            );
        }
        if body.len() > MEDIA_MAX {
            return google_error(StatusCode::PAYLOAD_TOO_LARGE, "uploadTooLarge", "Request Entity Too Large");
        }
        return deliver(st, account, body.to_vec(), "media");
    }
    let Some(total) = headers.get("x-upload-content-length").and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) else {
        return google_error(StatusCode::BAD_REQUEST, "invalidArgument", "X-Upload-Content-Length is required.");
    };
    if total > MAX_SIZE {
        return google_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "uploadTooLarge",
            &format!("Media larger than: {MAX_SIZE}"),
        );
    }
    st.next_id += 1;
    let id = format!("fakeup{}x{}", st.next_id, super::random_b64url(12).replace(['-', '_'], "z"));
    st.sessions.insert(id.clone(), Session { account, total, received: Vec::new(), sent: None, expired: false });
    let location = format!("{base_url}{SEND_PATH}?uploadType=resumable&upload_id={id}");
    (StatusCode::OK, [(header::LOCATION, location)]).into_response()
}

/// A parsed `Content-Range`: `bytes a-b/total` or `bytes */total`.
fn content_range(v: &str) -> Option<(Option<(u64, u64)>, u64)> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let total = total.parse().ok()?;
    if range == "*" {
        return Some((None, total));
    }
    let (a, b) = range.split_once('-')?;
    let (a, b) = (a.parse().ok()?, b.parse().ok()?);
    (a <= b).then_some((Some((a, b)), total))
}

fn incomplete(received: usize) -> Response {
    let mut r = StatusCode::PERMANENT_REDIRECT.into_response();
    if received > 0 {
        r.headers_mut().insert(header::RANGE, format!("bytes=0-{}", received - 1).parse().expect("header value"));
    }
    r
}

fn resource(id: &str) -> Response {
    let body = json!({"id": id, "threadId": id, "labelIds": ["SENT"]});
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json; charset=UTF-8")], body.to_string()).into_response()
}

async fn chunk_handler(
    AxState(shared): AxState<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query.unwrap_or_default();
    let id = query_param(&query, "upload_id").unwrap_or("").to_string();
    let range = headers.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).and_then(content_range);
    let kind = if matches!(range, Some((None, _))) { "query" } else { "chunk" };
    let stall = {
        let mut st = shared.lock();
        let stall = kind == "chunk" && st.stall_chunk == Some(st.chunks_seen + 1);
        if stall {
            st.stall_chunk = None;
            st.chunks_seen += 1;
            st.stalled += 1;
        }
        stall
    };
    if stall {
        tokio::time::sleep(STALL).await;
        let r = google_error(StatusCode::SERVICE_UNAVAILABLE, "backendError", "Service unavailable.");
        log(&mut shared.lock(), kind, &headers, body.len(), &r);
        return r;
    }
    let mut st = shared.lock();
    let r = answer_chunk(&mut st, &id, range, kind, &body);
    log(&mut st, kind, &headers, body.len(), &r);
    r
}

fn answer_chunk(
    st: &mut State,
    id: &str,
    range: Option<(Option<(u64, u64)>, u64)>,
    kind: &'static str,
    body: &[u8],
) -> Response {
    let not_found = || google_error(StatusCode::NOT_FOUND, "notFound", "Upload session not found or expired.");
    match st.sessions.get(id) {
        None => return not_found(),
        Some(s) if s.expired => return not_found(),
        Some(_) => {}
    }
    if kind == "chunk" {
        st.chunks_seen += 1;
        if st.fail_chunk == Some(st.chunks_seen) {
            st.fail_chunk = None;
            return google_error(StatusCode::SERVICE_UNAVAILABLE, "backendError", "Service unavailable.");
        }
        if let Some(r) = knobs(st) {
            return r;
        }
    }
    let Some((span, total)) = range else {
        return google_error(StatusCode::BAD_REQUEST, "invalidArgument", "Missing or invalid Content-Range.");
    };
    let s = st.sessions.get_mut(id).expect("checked above");
    if total != s.total {
        return google_error(
            StatusCode::BAD_REQUEST,
            "invalidArgument",
            "Content-Range total does not match the session.",
        );
    }
    if let Some(id) = &s.sent {
        return resource(id);
    }
    let Some((a, b)) = span else {
        if !body.is_empty() {
            return google_error(StatusCode::BAD_REQUEST, "invalidArgument", "A status query has no body.");
        }
        return incomplete(s.received.len());
    };
    let len = (b - a + 1) as usize;
    if a != s.received.len() as u64 || body.len() != len || b >= total {
        return google_error(
            StatusCode::BAD_REQUEST,
            "invalidArgument",
            &format!("Content-Range bytes {a}-{b}/{total} does not continue the upload at {}", s.received.len()),
        );
    }
    let last = b + 1 == total;
    if !last && !len.is_multiple_of(CHUNK_UNIT) {
        return google_error(
            StatusCode::BAD_REQUEST,
            "invalidArgument",
            "Chunk size must be a multiple of 262144 bytes except for the last chunk.",
        );
    }
    s.received.extend_from_slice(body);
    if !last {
        return incomplete(s.received.len());
    }
    let (account, raw) = (s.account.clone(), std::mem::take(&mut s.received));
    let r = deliver(st, account, raw, "resumable");
    if r.status() == StatusCode::OK {
        let sent_id = st.sent.last().map(|m| m.id.clone()).unwrap_or_default();
        if let Some(s) = st.sessions.get_mut(id) {
            s.sent = Some(sent_id);
        }
    }
    r
}

/// "Sends" a raw message: recipients from To/Cc/Bcc, Bcc removed.
fn deliver(st: &mut State, account: String, raw: Vec<u8>, upload: &'static str) -> Response {
    let Some(parsed) = mail_parser::MessageParser::default().parse(&raw) else {
        return google_error(StatusCode::BAD_REQUEST, "invalidArgument", "Invalid RFC 822 message.");
    };
    let mut recipients: Vec<String> = Vec::new();
    for list in [parsed.to(), parsed.cc(), parsed.bcc()].into_iter().flatten() {
        for a in list.iter() {
            if let Some(addr) = a.address() {
                let addr = addr.to_ascii_lowercase();
                if !recipients.contains(&addr) {
                    recipients.push(addr);
                }
            }
        }
    }
    if recipients.is_empty() {
        return google_error(StatusCode::BAD_REQUEST, "invalidArgument", "Recipient address required");
    }
    let raw = without_bcc(&raw);
    let id = format!("18c{:013x}", st.sent.len() + 1);
    st.sent.push(SentMessage { account, recipients, raw, upload, id: id.clone() });
    resource(&id)
}

/// The message without its Bcc header field (and its folded lines).
pub fn without_bcc(raw: &[u8]) -> Vec<u8> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 2).unwrap_or(raw.len());
    let mut out = Vec::with_capacity(raw.len());
    let mut skipping = false;
    for line in raw[..end].split_inclusive(|&b| b == b'\n') {
        let folded = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !folded {
            skipping = line.len() >= 4 && line[..4].eq_ignore_ascii_case(b"bcc:");
        }
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(&raw[end..]);
    out
}
