//! A fake Microsoft Graph mail API for integration tests, on `127.0.0.1:<random port>`.
//!
//! It enforces what Graph does to a mail client:
//! - `Authorization: Bearer` on every API request, checked by the test's
//!   [`BearerValidator`](super::BearerValidator); 401 with Graph's error JSON otherwise.
//! - A request body over 3,145,611 bytes gets 413 (the measured limit); an upload range over
//!   4 MiB likewise.
//! - `sendMail` and draft creation take base64 MIME (`text/plain`) and send to the To, Cc and
//!   Bcc of its header, never to an envelope. A draft is sent to its toRecipients,
//!   ccRecipients and bccRecipients: filled from the MIME at creation (without its Bcc when
//!   [`FakeGraph::drop_mime_bcc`]), replaced by `PATCH .../messages/{id}` (only these three
//!   lists, addresses with an `@`, only on a draft).
//! - `createUploadSession` refuses files under 2,097,152 bytes
//!   (`ErrorAttachmentSizeShouldNotBeLessThanMinimumSize`) and over 150 MB; the `PUT`s to the
//!   `uploadUrl` must come in order, each at most 4 MiB with a correct `Content-Range`; `GET`
//!   on it gives `nextExpectedRanges`. Whether a PUT carried `Authorization` is recorded
//!   (real Graph ignores it; the relay must not send its token there).
//! - `POST .../send` moves a draft to the sent messages: its id answers 404 afterwards.
//! - At most [`CONCURRENCY`] requests in flight per mailbox; one more gets 429
//!   `ApplicationThrottled` (MailboxConcurrency) with `Retry-After`.
//!
//! Knobs: [`FakeGraph::throttle`] (429 with `Retry-After` N times), [`FakeGraph::fault`] (the
//! n-th request of a kind answers an error, or is carried out and then never answered: a crash
//! point), [`FakeGraph::set_delay`] (slow answers, to see the concurrency). Every sent message
//! is kept with its recipients and all its attachments (those of the MIME and those added to the
//! draft), decoded, for byte-for-byte comparison.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State as AxState};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::BearerValidator;
use super::ServerTask;

/// Graph's largest request body.
pub const MAX_POST: usize = 3_145_611;
/// The largest upload range.
pub const MAX_RANGE: usize = 4 * 1024 * 1024;
/// Upload sessions refuse smaller files.
pub const MIN_UPLOAD: u64 = 2_097_152;
/// Upload sessions refuse larger files.
pub const MAX_UPLOAD: u64 = 150 * 1000 * 1000;
/// Concurrent requests per mailbox.
pub const CONCURRENCY: usize = 4;
/// How long a "hung" answer waits (the client gives up long before).
const HANG: Duration = Duration::from_secs(60);

/// A kind of request, for [`FakeGraph::fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    SendMail,
    CreateDraft,
    ListMessages,
    GetMessage,
    UpdateMessage,
    DeleteMessage,
    ListAttachments,
    AddAttachment,
    CreateSession,
    Put,
    GetSession,
    Send,
}

/// What a fault does.
#[derive(Clone, Debug)]
pub enum Action {
    /// Answer this instead of doing anything.
    Error { status: u16, code: String, message: String },
    /// Answer this JSON with this status instead of doing anything (a Graph that
    /// misbehaves: e.g. a session's `nextExpectedRanges` past the file).
    Answer { status: u16, body: Value },
    /// Do it, then never answer (the client times out: a crash after the server acted).
    Hang,
}

impl Action {
    pub fn error(status: u16, code: &str, message: &str) -> Action {
        Action::Error { status, code: code.into(), message: message.into() }
    }
}

/// A file attachment, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileAttachment {
    pub name: String,
    pub content_type: String,
    pub bytes: Vec<u8>,
    /// `isInline` as added to a draft (false for the MIME's own attachments).
    pub inline: bool,
}

/// A draft in a mailbox's Drafts.
#[derive(Clone, Debug)]
pub struct Draft {
    pub id: String,
    pub mailbox: String,
    pub mime: Vec<u8>,
    pub internet_message_id: Option<String>,
    /// Attachments added after creation.
    pub added: Vec<FileAttachment>,
    /// toRecipients, ccRecipients, bccRecipients: read from the MIME at creation (its Bcc
    /// not when [`FakeGraph::drop_mime_bcc`]), then as PATCHed. A draft is sent to these.
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
}

/// A message Graph sent.
#[derive(Clone, Debug)]
pub struct SentMessage {
    pub mailbox: String,
    /// Recipients (lower case): the MIME's To, Cc and Bcc (sendMail), a draft's lists.
    pub to: Vec<String>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    /// The MIME as posted (a draft's without the attachments added later).
    pub mime: Vec<u8>,
    /// Every attachment: those in the MIME, then those added to the draft.
    pub attachments: Vec<FileAttachment>,
    /// By `sendMail` (else from a draft).
    pub by_send_mail: bool,
}

impl SentMessage {
    /// All recipients, sorted.
    pub fn recipients(&self) -> Vec<String> {
        let mut v: Vec<String> = self.to.iter().chain(&self.cc).chain(&self.bcc).cloned().collect();
        v.sort();
        v
    }
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    #[allow(dead_code)] // shown by Debug in assertion messages
    pub method: String,
    /// Without the query.
    #[allow(dead_code)]
    pub path: String,
    pub body_len: usize,
    pub authorization: bool,
    pub op: Option<Op>,
}

struct Session {
    draft: String,
    mailbox: String,
    name: String,
    content_type: String,
    size: u64,
    received: Vec<u8>,
    inline: bool,
}

#[derive(Default)]
struct State {
    next: u64,
    drafts: HashMap<String, Draft>,
    /// Ids of drafts that were sent (404 now).
    sent_ids: Vec<String>,
    sent: Vec<SentMessage>,
    sessions: HashMap<String, Session>,
    log: Vec<Logged>,
    throttle: Option<(usize, u64)>,
    faults: Vec<(Op, usize, Action)>,
    in_flight: HashMap<String, usize>,
    max_in_flight: usize,
    delay: Duration,
    drop_mime_bcc: bool,
    max_send_size: Option<u64>,
}

struct Shared {
    state: Mutex<State>,
    base_url: String,
    validator: BearerValidator,
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Handle on a running fake Graph. Cheap to clone; the server stops with the last clone.
#[derive(Clone)]
pub struct FakeGraph {
    shared: Arc<Shared>,
    _task: Arc<ServerTask>,
}

impl FakeGraph {
    pub async fn start(validator: BearerValidator) -> FakeGraph {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("FakeGraph: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            base_url: format!("http://{addr}"),
            validator,
            changed: Notify::new(),
        });
        // Limits are Graph's, enforced in the handler: axum's own 2 MB default must not apply.
        let app = Router::new().fallback(handle).layer(DefaultBodyLimit::disable()).with_state(shared.clone());
        FakeGraph { shared, _task: ServerTask::serve(listener, app) }
    }

    /// What `graph_url` is set to.
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The next `times` API requests get 429 with `Retry-After: secs`.
    pub fn throttle(&self, times: usize, secs: u64) {
        self.shared.lock().throttle = Some((times, secs));
    }

    /// The `nth` (from 1, counted from now) request of kind `op` meets `action`.
    pub fn fault(&self, op: Op, nth: usize, action: Action) {
        self.shared.lock().faults.push((op, nth.max(1), action));
    }

    /// Each request takes this long (while it counts as in flight).
    pub fn set_delay(&self, d: Duration) {
        self.shared.lock().delay = d;
    }

    /// Draft creation ignores the MIME's Bcc (the draft's bccRecipients stay empty), as
    /// Graph may: only a PATCH of the lists then reaches a Bcc recipient.
    pub fn drop_mime_bcc(&self, on: bool) {
        self.shared.lock().drop_mime_bcc = on;
    }

    /// The mailbox's MaxSendSize (Exchange; none by default): a send of a larger message
    /// (its MIME plus its added attachments in base64, as Exchange counts) gets 400
    /// `ErrorMessageSizeExceeded`, and the draft stays. 400 and not 413: 413 is Graph's
    /// front end refusing a request body; this refusal comes from Exchange behind it, whose
    /// errors Graph passes on as 400 with Exchange's own code.
    pub fn set_max_send_size(&self, limit: Option<u64>) {
        self.shared.lock().max_send_size = limit;
    }

    pub fn sent(&self) -> Vec<SentMessage> {
        self.shared.lock().sent.clone()
    }

    pub fn drafts(&self) -> Vec<Draft> {
        self.shared.lock().drafts.values().cloned().collect()
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.shared.lock().log.clone()
    }

    /// The most requests one mailbox had in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.shared.lock().max_in_flight
    }

    /// Waits until `n` messages were sent (or `timeout` passed); returns them.
    pub async fn wait_for_sent(&self, n: usize, timeout: Duration) -> Vec<SentMessage> {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            let sent = self.sent();
            if sent.len() >= n || Instant::now() >= deadline {
                return sent;
            }
            let _ = tokio::time::timeout(deadline - Instant::now(), changed).await;
        }
    }
}

fn graph_error(status: u16, code: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json!({"error": {"code": code, "message": message, "innerError": {"request-id": "fake"}}})))
        .into_response()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decrements a mailbox's in-flight count when the request ends (or is dropped).
struct InFlight {
    shared: Arc<Shared>,
    mailbox: String,
    done: bool,
}

impl InFlight {
    fn end(&mut self) {
        if !self.done {
            self.done = true;
            if let Some(n) = self.shared.lock().in_flight.get_mut(&self.mailbox) {
                *n = n.saturating_sub(1);
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.end();
    }
}

/// Which request this is: (op, mailbox, draft id, upload session).
fn route(method: &Method, segs: &[String]) -> Option<(Op, String, Option<String>, Option<String>)> {
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    match (method.as_str(), s.as_slice()) {
        ("PUT", ["upload", t]) => Some((Op::Put, String::new(), None, Some(t.to_string()))),
        ("GET", ["upload", t]) => Some((Op::GetSession, String::new(), None, Some(t.to_string()))),
        (m, ["v1.0", "users", mb, rest @ ..]) => {
            let mb = mb.to_ascii_lowercase();
            let id = rest.get(1).map(|s| s.to_string());
            let op = match (m, rest) {
                ("POST", ["sendMail"]) => Op::SendMail,
                ("POST", ["messages"]) => Op::CreateDraft,
                ("GET", ["messages"]) => Op::ListMessages,
                ("GET", ["messages", _]) => Op::GetMessage,
                ("PATCH", ["messages", _]) => Op::UpdateMessage,
                ("DELETE", ["messages", _]) => Op::DeleteMessage,
                ("POST", ["messages", _, "send"]) => Op::Send,
                ("GET", ["messages", _, "attachments"]) => Op::ListAttachments,
                ("POST", ["messages", _, "attachments"]) => Op::AddAttachment,
                ("POST", ["messages", _, "attachments", "createUploadSession"]) => Op::CreateSession,
                _ => return None,
            };
            Some((op, mb, id, None))
        }
        _ => None,
    }
}

async fn handle(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let segs: Vec<String> = uri.path().trim_start_matches('/').split('/').map(percent_decode).collect();
    let routed = route(&method, &segs);
    let authorization = headers.contains_key(header::AUTHORIZATION);
    shared.lock().log.push(Logged {
        method: method.to_string(),
        path: uri.path().to_string(),
        body_len: body.len(),
        authorization,
        op: routed.as_ref().map(|r| r.0),
    });
    let Some((op, mailbox, id, session)) = routed else {
        return graph_error(400, "BadRequest", &format!("Resource not found for the segment '{}'.", uri.path()));
    };
    let is_upload = matches!(op, Op::Put | Op::GetSession);
    // The upload URL authorises by itself; the API wants a valid bearer token.
    if !is_upload {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if token.is_empty() || (shared.validator)(token).is_none() {
            return graph_error(401, "InvalidAuthenticationToken", "Access token is empty or invalid.");
        }
    }
    let limit = if op == Op::Put { MAX_RANGE } else { MAX_POST };
    if body.len() > limit {
        return graph_error(413, "RequestBodyTooLarge", "The request body is too large.");
    }
    // Which mailbox the request counts against.
    let counted = if is_upload {
        session.as_ref().and_then(|t| shared.lock().sessions.get(t).map(|s| s.mailbox.clone())).unwrap_or_default()
    } else {
        mailbox.clone()
    };
    let (delay, fault, throttled) = {
        let mut st = shared.lock();
        let n = st.in_flight.entry(counted.clone()).or_insert(0);
        *n += 1;
        let now = *n;
        st.max_in_flight = st.max_in_flight.max(now);
        let mut fault = None;
        let mut i = 0;
        while i < st.faults.len() {
            if st.faults[i].0 == op {
                st.faults[i].1 -= 1;
                if st.faults[i].1 == 0 {
                    fault = Some(st.faults.remove(i).2);
                    break;
                }
            }
            i += 1;
        }
        let mut throttled = None;
        if !is_upload {
            if let Some((left, secs)) = st.throttle {
                if left > 0 {
                    st.throttle = Some((left - 1, secs));
                    throttled = Some(secs);
                }
            }
        }
        if now > CONCURRENCY && !counted.is_empty() {
            throttled = throttled.or(Some(1));
        }
        (st.delay, fault, throttled)
    };
    let mut guard = InFlight { shared: shared.clone(), mailbox: counted, done: false };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(secs) = throttled {
        let mut r = graph_error(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.");
        r.headers_mut().insert(header::RETRY_AFTER, secs.to_string().parse().expect("header value"));
        return r;
    }
    let hang = match fault {
        Some(Action::Error { status, code, message }) => return graph_error(status, &code, &message),
        Some(Action::Answer { status, body }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, axum::Json(body)).into_response();
        }
        Some(Action::Hang) => true,
        None => false,
    };
    let response = if op == Op::ListMessages {
        list_messages(&shared, &mailbox, uri.query().unwrap_or(""))
    } else {
        serve(&shared, op, &mailbox, id.as_deref(), session.as_deref(), &headers, &body)
    };
    guard.end();
    shared.changed.notify_waiters();
    if hang {
        tokio::time::sleep(HANG).await;
    }
    response
}

/// An error answer, boxed (a `Response` is large).
type Refusal = Box<Response>;

fn parse_b64_mime(body: &[u8]) -> Result<Vec<u8>, Refusal> {
    let clean: Vec<u8> = body.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    STANDARD.decode(&clean).map_err(|_| {
        Box::new(graph_error(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content."))
    })
}

fn addresses(a: Option<&mail_parser::Address<'_>>) -> Vec<String> {
    a.map(|a| a.iter().filter_map(|x| x.address().map(|s| s.to_ascii_lowercase())).collect()).unwrap_or_default()
}

/// What Graph reads in a MIME message.
struct Mime {
    to: Vec<String>,
    cc: Vec<String>,
    bcc: Vec<String>,
    attachments: Vec<FileAttachment>,
    message_id: Option<String>,
}

/// Recipients and attachments of a MIME message, as Graph reads them.
fn read_mime(mime: &[u8]) -> Option<Mime> {
    let m = MessageParser::default().parse(mime)?;
    let atts = m
        .attachments()
        .map(|p| FileAttachment {
            name: p.attachment_name().unwrap_or("attachment").to_string(),
            content_type: p
                .content_type()
                .map(|c| format!("{}/{}", c.ctype(), c.subtype().unwrap_or("octet-stream")))
                .unwrap_or_default(),
            bytes: p.contents().to_vec(),
            inline: false,
        })
        .collect();
    Some(Mime {
        to: addresses(m.to()),
        cc: addresses(m.cc()),
        bcc: addresses(m.bcc()),
        attachments: atts,
        message_id: m.message_id().map(str::to_string),
    })
}

/// Sends `mime` (plus `added`); to the MIME's recipients (sendMail) or to a draft's lists.
fn send_one(
    st: &mut State,
    mailbox: &str,
    mime: Vec<u8>,
    added: Vec<FileAttachment>,
    lists: Option<[Vec<String>; 3]>,
) -> Result<(), Refusal> {
    let Some(Mime { to, cc, bcc, mut attachments, .. }) = read_mime(&mime) else {
        return Err(Box::new(graph_error(400, "ErrorMimeContentInvalid", "The MIME content is invalid.")));
    };
    let by_send_mail = lists.is_none();
    let total = mime.len() as u64 + added.iter().map(|a| a.bytes.len().div_ceil(3) as u64 * 4).sum::<u64>();
    if st.max_send_size.is_some_and(|max| total > max) {
        return Err(Box::new(graph_error(
            400,
            "ErrorMessageSizeExceeded",
            "The message exceeds the maximum supported size.",
        )));
    }
    let [to, cc, bcc] = lists.unwrap_or([to, cc, bcc]);
    if to.is_empty() && cc.is_empty() && bcc.is_empty() {
        return Err(Box::new(graph_error(400, "ErrorInvalidRecipients", "At least one recipient isn't valid.")));
    }
    attachments.extend(added);
    st.sent.push(SentMessage { mailbox: mailbox.to_string(), to, cc, bcc, mime, attachments, by_send_mail });
    Ok(())
}

fn serve(
    shared: &Shared,
    op: Op,
    mailbox: &str,
    id: Option<&str>,
    session: Option<&str>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let mut st = shared.lock();
    let not_found = || graph_error(404, "ErrorItemNotFound", "The specified object was not found in the store.");
    let draft_of =
        |st: &State, id: Option<&str>| id.and_then(|i| st.drafts.get(i)).filter(|d| d.mailbox == mailbox).is_some();
    match op {
        // Answered by list_messages (it needs the query).
        Op::ListMessages => graph_error(400, "BadRequest", "unexpected"),
        Op::SendMail => {
            let mime = match parse_b64_mime(body) {
                Ok(m) => m,
                Err(r) => return *r,
            };
            match send_one(&mut st, mailbox, mime, Vec::new(), None) {
                Ok(()) => StatusCode::ACCEPTED.into_response(),
                Err(r) => *r,
            }
        }
        Op::CreateDraft => {
            let mime = match parse_b64_mime(body) {
                Ok(m) => m,
                Err(r) => return *r,
            };
            // Graph's internetMessageId keeps the angle brackets.
            let Some(read) = read_mime(&mime) else {
                return graph_error(400, "ErrorMimeContentInvalid", "The MIME content is invalid.");
            };
            let mid = read.message_id.map(|id| format!("<{id}>"));
            let bcc = if st.drop_mime_bcc { Vec::new() } else { read.bcc };
            st.next += 1;
            let id = format!("AAMkAGFake{:04}AAA=", st.next);
            st.drafts.insert(
                id.clone(),
                Draft {
                    id: id.clone(),
                    mailbox: mailbox.to_string(),
                    mime,
                    internet_message_id: mid.clone(),
                    added: Vec::new(),
                    to: read.to,
                    cc: read.cc,
                    bcc,
                },
            );
            (StatusCode::CREATED, axum::Json(json!({"id": id, "isDraft": true, "internetMessageId": mid})))
                .into_response()
        }
        Op::GetMessage => {
            let Some(d) = id.and_then(|i| st.drafts.get(i)).filter(|d| d.mailbox == mailbox) else {
                return not_found();
            };
            axum::Json(json!({"id": d.id, "isDraft": true})).into_response()
        }
        Op::UpdateMessage => {
            if !draft_of(&st, id) {
                return not_found();
            }
            let Some(v) = serde_json::from_slice::<Value>(body).ok().and_then(|v| v.as_object().cloned()) else {
                return graph_error(400, "BadRequest", "Empty Payload. JSON content expected.");
            };
            let mut lists: [Option<Vec<String>>; 3] = [None, None, None];
            for (k, val) in &v {
                let slot = match k.as_str() {
                    "toRecipients" => 0,
                    "ccRecipients" => 1,
                    "bccRecipients" => 2,
                    _ => {
                        return graph_error(400, "ErrorInvalidProperty", "This fake updates only the recipient lists.")
                    }
                };
                let Some(items) = val.as_array() else {
                    return graph_error(400, "BadRequest", "A recipient list must be an array.");
                };
                let mut list = Vec::new();
                for it in items {
                    match it["emailAddress"]["address"].as_str() {
                        Some(a) if a.contains('@') => list.push(a.to_ascii_lowercase()),
                        _ => return graph_error(400, "ErrorInvalidRecipients", "At least one recipient isn't valid."),
                    }
                }
                lists[slot] = Some(list);
            }
            let Some(d) = id.and_then(|i| st.drafts.get_mut(i)) else { return not_found() };
            let [to, cc, bcc] = lists;
            if let Some(l) = to {
                d.to = l;
            }
            if let Some(l) = cc {
                d.cc = l;
            }
            if let Some(l) = bcc {
                d.bcc = l;
            }
            axum::Json(json!({"id": d.id, "isDraft": true})).into_response()
        }
        Op::DeleteMessage => {
            if !draft_of(&st, id) {
                return not_found();
            }
            if let Some(i) = id {
                st.drafts.remove(i);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Op::ListAttachments => {
            let Some(d) = id.and_then(|i| st.drafts.get(i)).filter(|d| d.mailbox == mailbox) else {
                return not_found();
            };
            let mut all = read_mime(&d.mime).map(|m| m.attachments).unwrap_or_default();
            all.extend(d.added.iter().cloned());
            let value: Vec<Value> = all
                .iter()
                .enumerate()
                .map(|(i, a)| json!({"id": format!("att{i}"), "name": a.name, "contentType": a.content_type, "size": a.bytes.len()}))
                .collect();
            axum::Json(json!({"value": value})).into_response()
        }
        Op::AddAttachment => {
            if !draft_of(&st, id) {
                return not_found();
            }
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            if v["@odata.type"] != "#microsoft.graph.fileAttachment" {
                return graph_error(400, "ErrorInvalidRequest", "Only fileAttachment is supported by this fake.");
            }
            let (Some(name), Some(bytes)) =
                (v["name"].as_str(), v["contentBytes"].as_str().and_then(|b| STANDARD.decode(b).ok()))
            else {
                return graph_error(400, "ErrorInvalidRequest", "name and contentBytes are required.");
            };
            let a = FileAttachment {
                name: name.to_string(),
                content_type: v["contentType"].as_str().unwrap_or("application/octet-stream").to_string(),
                bytes,
                inline: v["isInline"].as_bool().unwrap_or(false),
            };
            if let Some(d) = id.and_then(|i| st.drafts.get_mut(i)) {
                d.added.push(a);
            }
            (StatusCode::CREATED, axum::Json(json!({"id": "att"}))).into_response()
        }
        Op::CreateSession => {
            if !draft_of(&st, id) {
                return not_found();
            }
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let item = &v["AttachmentItem"];
            let (Some("file"), Some(name), Some(size)) =
                (item["attachmentType"].as_str(), item["name"].as_str(), item["size"].as_u64())
            else {
                return graph_error(
                    400,
                    "ErrorInvalidRequest",
                    "AttachmentItem needs attachmentType file, name and size.",
                );
            };
            if size < MIN_UPLOAD {
                return graph_error(
                    400,
                    "ErrorAttachmentSizeShouldNotBeLessThanMinimumSize",
                    "Attachment size must be greater than the minimum size.",
                );
            }
            if size > MAX_UPLOAD {
                return graph_error(400, "ErrorAttachmentSizeExceeded", "The attachment is too large.");
            }
            st.next += 1;
            let token = format!("sess{}{}", st.next, super::random_b64url(12));
            st.sessions.insert(
                token.clone(),
                Session {
                    draft: id.unwrap_or_default().to_string(),
                    mailbox: mailbox.to_string(),
                    name: name.to_string(),
                    content_type: item["contentType"].as_str().unwrap_or("application/octet-stream").to_string(),
                    size,
                    received: Vec::new(),
                    inline: item["isInline"].as_bool().unwrap_or(false),
                },
            );
            let url = format!("{}/upload/{token}?authtoken=fake-upload-secret", shared.base_url);
            (StatusCode::CREATED, axum::Json(json!({"uploadUrl": url, "expirationDateTime": "2030-01-01T00:00:00Z", "nextExpectedRanges": ["0-"]})))
                .into_response()
        }
        Op::GetSession => {
            let Some(s) = session.and_then(|t| st.sessions.get(t)) else { return not_found() };
            axum::Json(json!({"expirationDateTime": "2030-01-01T00:00:00Z", "nextExpectedRanges": [format!("{}-", s.received.len())]}))
                .into_response()
        }
        Op::Put => {
            let token = session.unwrap_or_default().to_string();
            let Some(s) = st.sessions.get_mut(&token) else { return not_found() };
            let range = headers.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).and_then(parse_content_range);
            let Some((start, end, total)) = range else {
                return graph_error(400, "InvalidContentRange", "Content-Range is missing or malformed.");
            };
            if total != s.size || end < start || end - start + 1 != body.len() as u64 || end >= total {
                return graph_error(
                    400,
                    "InvalidContentRange",
                    "Content-Range does not match the body or the session.",
                );
            }
            if start != s.received.len() as u64 {
                return graph_error(416, "InvalidRange", "The range is not the next expected one.");
            }
            s.received.extend_from_slice(body);
            if (s.received.len() as u64) < s.size {
                let next = s.received.len();
                return axum::Json(
                    json!({"expirationDateTime": "2030-01-01T00:00:00Z", "nextExpectedRanges": [format!("{next}-")]}),
                )
                .into_response();
            }
            let Some(s) = st.sessions.remove(&token) else { return not_found() };
            let Some(d) = st.drafts.get_mut(&s.draft) else { return not_found() };
            d.added.push(FileAttachment {
                name: s.name,
                content_type: s.content_type,
                bytes: s.received,
                inline: s.inline,
            });
            StatusCode::CREATED.into_response()
        }
        Op::Send => {
            let Some(d) = id.and_then(|i| st.drafts.get(i)).filter(|d| d.mailbox == mailbox).cloned() else {
                return not_found();
            };
            if let Err(r) = send_one(&mut st, mailbox, d.mime, d.added, Some([d.to, d.cc, d.bcc])) {
                return *r;
            }
            st.drafts.remove(&d.id);
            st.sent_ids.push(d.id);
            StatusCode::ACCEPTED.into_response()
        }
    }
}

/// The mailbox's drafts; `$filter=internetMessageId eq '<id>'` is understood.
fn list_messages(shared: &Shared, mailbox: &str, query: &str) -> Response {
    let query = percent_decode(&query.replace('+', " "));
    let wanted = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("$filter="))
        .and_then(|f| f.trim().strip_prefix("internetMessageId eq '"))
        .and_then(|f| f.strip_suffix('\''))
        .map(str::to_string);
    let st = shared.lock();
    let value: Vec<Value> = st
        .drafts
        .values()
        .filter(|d| d.mailbox == mailbox)
        .filter(|d| wanted.is_none() || d.internet_message_id == wanted)
        .map(|d| json!({"id": d.id, "isDraft": true, "internetMessageId": d.internet_message_id}))
        .collect();
    axum::Json(json!({"value": value})).into_response()
}

/// `bytes START-END/TOTAL` (RFC 9110 14.4).
fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total.trim().parse().ok()?))
}
