//! A fake Google Drive API v3 for integration tests, on `127.0.0.1:<random port>`.
//!
//! It enforces what Drive does:
//! - `Authorization: Bearer` on every request, upload session `PUT`s included (401 with
//!   Google's error JSON otherwise); the account is what the [`BearerValidator`] says.
//! - Folders and files with ids, names, parents and bytes; `root` is My Drive. Two items of one
//!   name in one folder are allowed, as on Drive. A parent that does not exist is 404 `notFound`
//!   (`File not found: <id>.`); a listing in a parent that does not exist is empty.
//! - `GET /drive/v3/files?q=`: the query is parsed (`name = '…'`, `'<id>' in parents`,
//!   `mimeType = / != '…'`, `trashed = false`, joined by `and`; `\'` and `\\` escapes); anything
//!   else, an unterminated string included, is 400 `invalidQuery`. Oldest first.
//! - `POST /drive/v3/files`: a folder (or an empty file) from JSON metadata.
//! - `POST /upload/drive/v3/files?uploadType=resumable` (JSON metadata, `X-Upload-Content-Length`)
//!   and `PATCH /upload/drive/v3/files/{id}?uploadType=resumable` (new content for a file): 200
//!   with a `Location` session URI (the request's path and query with `&upload_id=`). `PUT`
//!   chunks in order with `Content-Range: bytes a-b/total`, each a multiple of 256 KiB except
//!   the last, else 400; 308 with `Range: bytes=0-N` while incomplete (none before the first
//!   byte); 200 with the file (the `fields` asked for when the session was opened) once the last
//!   byte arrived: only then does the file exist. `bytes */total` with an empty body asks
//!   where a session stands (a finished one answers 200 again).
//! - Shared drives ([`FakeGdrive::add_shared_drive`]): their items are 404 without
//!   `supportsAllDrives=true`, and absent from listings without `includeItemsFromAllDrives=true`.
//! - `POST /drive/v3/files/{id}/permissions`: recorded ([`FakeGdrive::permissions`]).
//!
//! Knobs: 429 with `Retry-After` the next N requests ([`FakeGdrive::throttle`]); 403
//! `userRateLimitExceeded` the next N ([`FakeGdrive::rate_limit`]); every request refused with
//! a Google error ([`FakeGdrive::refuse`]); the Nth request of a kind answered with an error or
//! carried out and never answered, a crash point ([`FakeGdrive::fault`]); every open session
//! expires ([`FakeGdrive::expire_sessions`]). Every request is logged ([`FakeGdrive::requests`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as AxPath, RawQuery, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

use super::BearerValidator;
use super::ServerTask;

/// Chunks are multiples of this, except the last.
pub const CHUNK_UNIT: usize = 256 * 1024;
/// How long a request carried out but never answered hangs ([`Fault::Hang`]).
pub const HANG: Duration = Duration::from_secs(600);
pub const FOLDER_MIME: &str = "application/vnd.google-apps.folder";

/// A file or folder.
#[derive(Clone, Debug)]
pub struct Item {
    pub id: String,
    pub name: String,
    pub mime_type: String,
    pub parents: Vec<String>,
    pub bytes: Vec<u8>,
    pub folder: bool,
    /// The shared drive it is on (its root's id).
    pub drive: Option<String>,
    /// How many times its content was written (1: created).
    pub versions: u32,
}

/// A permission made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Permission {
    pub file_id: String,
    pub role: String,
    pub kind: String,
    pub domain: Option<String>,
    pub allow_file_discovery: Option<bool>,
    /// The account of the token that made it.
    pub account: String,
}

/// One request the fake answered (or hung on: status 0).
#[derive(Clone, Debug)]
pub struct Request {
    /// `list`, `create`, `get`, `open`, `replace`, `media`, `chunk`, `query`, `permission`.
    pub kind: &'static str,
    pub query: String,
    pub content_range: Option<String>,
    pub body_len: usize,
    pub status: u16,
    pub authorization: bool,
}

/// What [`FakeGdrive::fault`] does to its request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Not carried out; answered with this status and Google reason.
    Answer(u16, &'static str),
    /// Carried out, then never answered (for [`HANG`]): the client may crash there.
    Hang,
}

enum Target {
    New { name: String, parents: Vec<String>, mime_type: String },
    Replace(String),
}

struct Session {
    total: u64,
    received: Vec<u8>,
    target: Target,
    fields: Option<String>,
    done: Option<String>,
    expired: bool,
}

#[derive(Default)]
struct State {
    items: HashMap<String, Item>,
    /// Ids in creation order.
    order: Vec<String>,
    next_id: u64,
    sessions: HashMap<String, Session>,
    sessions_opened: usize,
    permissions: Vec<Permission>,
    requests: Vec<Request>,
    throttle: u32,
    throttle_retry_after: u64,
    rate_limit: u32,
    refuse: Option<(u16, String, String)>,
    /// (kind, requests of that kind still to pass, what to do).
    fault: Option<(&'static str, usize, Fault)>,
    hung: usize,
    shared_drives: HashSet<String>,
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

/// Handle on a running fake Drive API; the server stops with the last clone.
#[derive(Clone)]
pub struct FakeGdrive {
    shared: Arc<Shared>,
    _task: Arc<ServerTask>,
}

impl FakeGdrive {
    pub async fn start(validator: BearerValidator) -> FakeGdrive {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("FakeGdrive: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let mut state = State::default();
        state.items.insert(
            "root".into(),
            Item {
                id: "root".into(),
                name: "My Drive".into(),
                mime_type: FOLDER_MIME.into(),
                parents: vec![],
                bytes: vec![],
                folder: true,
                drive: None,
                versions: 1,
            },
        );
        let shared = Arc::new(Shared { state: Mutex::new(state), base_url: format!("http://{addr}"), validator });
        let app = Router::new()
            .route("/drive/v3/files", get(list_handler).post(create_handler))
            .route("/drive/v3/files/{id}", get(get_handler))
            .route("/drive/v3/files/{id}/permissions", post(permission_handler))
            .route("/upload/drive/v3/files", post(open_handler).put(chunk_handler))
            .route("/upload/drive/v3/files/{id}", axum::routing::patch(replace_handler).put(chunk_handler_id))
            .layer(DefaultBodyLimit::max(64 * 1024 * 1024))
            .with_state(shared.clone());
        FakeGdrive { shared, _task: ServerTask::serve(listener, app) }
    }

    /// The Drive API's base URL: `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// A folder made by someone else; its id.
    pub fn add_folder(&self, parent: &str, name: &str) -> String {
        let mut st = self.shared.lock();
        let drive = st.items.get(parent).and_then(|p| p.drive.clone());
        insert(&mut st, name, FOLDER_MIME, vec![parent.to_string()], Vec::new(), drive)
    }

    /// A file made by someone else; its id.
    pub fn add_file(&self, parent: &str, name: &str, bytes: &[u8]) -> String {
        let mut st = self.shared.lock();
        let drive = st.items.get(parent).and_then(|p| p.drive.clone());
        insert(&mut st, name, "application/pdf", vec![parent.to_string()], bytes.to_vec(), drive)
    }

    /// A shared drive; its id (also the id of its root folder).
    pub fn add_shared_drive(&self, name: &str) -> String {
        let mut st = self.shared.lock();
        st.next_id += 1;
        let id = format!("0AFakeDrive{}", st.next_id);
        st.items.insert(
            id.clone(),
            Item {
                id: id.clone(),
                name: name.into(),
                mime_type: FOLDER_MIME.into(),
                parents: vec![],
                bytes: vec![],
                folder: true,
                drive: Some(id.clone()),
                versions: 1,
            },
        );
        st.shared_drives.insert(id.clone());
        id
    }

    /// Deletes an item and everything under it, as a person emptying the bin would.
    pub fn delete(&self, id: &str) {
        let mut st = self.shared.lock();
        let mut gone = vec![id.to_string()];
        while let Some(next) = gone.pop() {
            st.items.remove(&next);
            gone.extend(st.items.values().filter(|i| i.parents.contains(&next)).map(|i| i.id.clone()));
        }
        let items = std::mem::take(&mut st.items);
        st.order.retain(|i| items.contains_key(i));
        st.items = items;
    }

    /// Every item (folders and files), oldest first.
    pub fn items(&self) -> Vec<Item> {
        let st = self.shared.lock();
        st.order.iter().filter_map(|id| st.items.get(id).cloned()).collect()
    }

    /// The items directly in `parent`, oldest first.
    pub fn children(&self, parent: &str) -> Vec<Item> {
        self.items().into_iter().filter(|i| i.parents.iter().any(|p| p == parent)).collect()
    }

    /// The folders named `path` level by level under `root` (all of them at each level).
    pub fn folders_at(&self, root: &str, path: &[&str]) -> Vec<Item> {
        let mut level = vec![root.to_string()];
        let mut found = Vec::new();
        for name in path {
            found = self
                .items()
                .into_iter()
                .filter(|i| i.folder && i.name == *name && i.parents.iter().any(|p| level.contains(p)))
                .collect();
            level = found.iter().map(|i| i.id.clone()).collect();
        }
        found
    }

    pub fn permissions(&self) -> Vec<Permission> {
        self.shared.lock().permissions.clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.shared.lock().requests.clone()
    }

    /// Resumable sessions opened so far.
    pub fn sessions_opened(&self) -> usize {
        self.shared.lock().sessions_opened
    }

    /// The next `times` requests get 429 `rateLimitExceeded` with `Retry-After: retry_after`.
    pub fn throttle(&self, times: u32, retry_after: u64) {
        let mut st = self.shared.lock();
        st.throttle = times;
        st.throttle_retry_after = retry_after;
    }

    /// The next `times` requests get 403 `userRateLimitExceeded` (no `Retry-After`), as Drive
    /// answers a per-user rate limit.
    pub fn rate_limit(&self, times: u32) {
        self.shared.lock().rate_limit = times;
    }

    /// Every request is refused with this Google error from now on.
    pub fn refuse(&self, status: u16, reason: &str, message: &str) {
        self.shared.lock().refuse = Some((status, reason.to_string(), message.to_string()));
    }

    /// The `n`th request of `kind` from now (1-based) gets `fault`.
    pub fn fault(&self, kind: &'static str, n: usize, fault: Fault) {
        self.shared.lock().fault = Some((kind, n, fault));
    }

    /// Requests carried out and left unanswered so far ([`Fault::Hang`]).
    pub fn hung(&self) -> usize {
        self.shared.lock().hung
    }

    /// Every session open now expires (404 from then on).
    pub fn expire_sessions(&self) {
        for s in self.shared.lock().sessions.values_mut() {
            s.expired = true;
        }
    }
}

fn insert(
    st: &mut State,
    name: &str,
    mime: &str,
    parents: Vec<String>,
    bytes: Vec<u8>,
    drive: Option<String>,
) -> String {
    st.next_id += 1;
    let id = format!("1Fake{:06}x{}", st.next_id, super::random_b64url(9).replace(['-', '_'], "z"));
    st.items.insert(
        id.clone(),
        Item {
            id: id.clone(),
            name: name.to_string(),
            mime_type: mime.to_string(),
            parents,
            bytes,
            folder: mime == FOLDER_MIME,
            drive,
            versions: 1,
        },
    );
    st.order.push(id.clone());
    id
}

/// Google's error body.
fn google_error(status: StatusCode, reason: &str, message: &str) -> Response {
    let grpc = match status.as_u16() {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        _ => "UNKNOWN",
    };
    let body = json!({"error": {"code": status.as_u16(), "message": message, "status": grpc,
        "errors": [{"message": message, "domain": "global", "reason": reason}]}});
    (status, [(header::CONTENT_TYPE, "application/json; charset=UTF-8")], body.to_string()).into_response()
}

fn not_found(id: &str) -> Response {
    google_error(StatusCode::NOT_FOUND, "notFound", &format!("File not found: {id}."))
}

fn bad(reason: &str, message: &str) -> Response {
    google_error(StatusCode::BAD_REQUEST, reason, message)
}

fn json_ok(v: Value) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "application/json; charset=UTF-8")], v.to_string()).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

/// A query parameter, percent-decoded.
fn param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

fn flag(query: &str, name: &str) -> bool {
    param(query, name).as_deref() == Some("true")
}

/// One request, end to end: authentication, knobs, the handler `f` (under the state lock),
/// the log, and a [`Fault::Hang`] after the work is done.
async fn handle(
    shared: &Shared,
    kind: &'static str,
    query: &str,
    headers: &HeaderMap,
    body_len: usize,
    f: impl FnOnce(&mut State, &str) -> Response,
) -> Response {
    let account = bearer(headers).and_then(|t| (shared.validator)(t));
    let mut hang = false;
    let r = {
        let mut st = shared.lock();
        let r = match account {
            None => google_error(
                StatusCode::UNAUTHORIZED,
                "authError",
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
            ),
            Some(account) => match knobs(&mut st, kind) {
                Some(Fault::Answer(status, reason)) => google_error(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    reason,
                    "Injected fault.",
                ),
                Some(Fault::Hang) => {
                    hang = true;
                    st.hung += 1;
                    f(&mut st, &account)
                }
                None => match knob_refusal(&mut st) {
                    Some(r) => r,
                    None => f(&mut st, &account),
                },
            },
        };
        st.requests.push(Request {
            kind,
            query: query.to_string(),
            content_range: headers.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).map(str::to_string),
            body_len,
            status: if hang { 0 } else { r.status().as_u16() },
            authorization: headers.contains_key(header::AUTHORIZATION),
        });
        r
    };
    if hang {
        tokio::time::sleep(HANG).await;
    }
    r
}

/// The fault knob, for a request of `kind`.
fn knobs(st: &mut State, kind: &'static str) -> Option<Fault> {
    let (k, n, _) = st.fault.as_mut()?;
    if *k != kind {
        return None;
    }
    *n -= 1;
    if *n > 0 {
        return None;
    }
    st.fault.take().map(|(_, _, f)| f)
}

/// The throttle and refusal knobs.
fn knob_refusal(st: &mut State) -> Option<Response> {
    if st.throttle > 0 {
        st.throttle -= 1;
        let mut r = google_error(StatusCode::TOO_MANY_REQUESTS, "rateLimitExceeded", "Rate Limit Exceeded");
        r.headers_mut().insert(header::RETRY_AFTER, st.throttle_retry_after.into());
        return Some(r);
    }
    if st.rate_limit > 0 {
        st.rate_limit -= 1;
        return Some(google_error(StatusCode::FORBIDDEN, "userRateLimitExceeded", "User Rate Limit Exceeded"));
    }
    if let Some((status, reason, message)) = &st.refuse {
        return Some(google_error(StatusCode::from_u16(*status).unwrap_or(StatusCode::FORBIDDEN), reason, message));
    }
    None
}

/// The item `id` as this request may see it (shared drives need `supportsAllDrives=true`).
fn visible<'a>(st: &'a State, id: &str, query: &str) -> Option<&'a Item> {
    let item = st.items.get(id)?;
    (item.drive.is_none() || flag(query, "supportsAllDrives")).then_some(item)
}

fn web_view_link(item: &Item) -> String {
    if item.folder {
        format!("https://drive.google.com/drive/folders/{}", item.id)
    } else {
        format!("https://drive.google.com/file/d/{}/view?usp=drivesdk", item.id)
    }
}

/// A file resource with the `fields` asked for (Drive's default set without).
fn resource(item: &Item, fields: Option<&str>) -> Value {
    let all = json!({
        "kind": "drive#file", "id": item.id, "name": item.name, "mimeType": item.mime_type,
        "parents": item.parents, "webViewLink": web_view_link(item),
        "size": if item.folder { Value::Null } else { Value::String(item.bytes.len().to_string()) },
    });
    let wanted: Vec<&str> = match fields {
        None => vec!["kind", "id", "name", "mimeType"],
        Some(f) => f.split(',').map(str::trim).collect(),
    };
    let mut out = serde_json::Map::new();
    for w in wanted {
        if let Some(v) = all.get(w).filter(|v| !v.is_null()) {
            out.insert(w.to_string(), v.clone());
        }
    }
    Value::Object(out)
}

/// One condition of a Drive query.
#[derive(Debug, PartialEq)]
enum Cond {
    Name(String),
    InParents(String),
    Mime(bool, String),
    Trashed(bool),
}

#[derive(Debug, PartialEq)]
enum Tok {
    Str(String),
    Word(String),
    Op(&'static str),
}

fn tokens(q: &str) -> Option<Vec<Tok>> {
    let mut out = Vec::new();
    let mut it = q.chars().peekable();
    while let Some(&c) = it.peek() {
        if c.is_whitespace() {
            it.next();
        } else if c == '\'' {
            it.next();
            let mut s = String::new();
            loop {
                match it.next()? {
                    '\\' => s.push(it.next()?),
                    '\'' => break,
                    c => s.push(c),
                }
            }
            out.push(Tok::Str(s));
        } else if c == '=' {
            it.next();
            out.push(Tok::Op("="));
        } else if c == '!' {
            it.next();
            (it.next()? == '=').then_some(())?;
            out.push(Tok::Op("!="));
        } else if c.is_ascii_alphanumeric() {
            let mut w = String::new();
            while let Some(&c) = it.peek().filter(|c| c.is_ascii_alphanumeric()) {
                w.push(c);
                it.next();
            }
            out.push(Tok::Word(w));
        } else {
            return None;
        }
    }
    Some(out)
}

fn parse_q(q: &str) -> Option<Vec<Cond>> {
    let toks = tokens(q)?;
    let mut conds = Vec::new();
    let mut i = 0;
    let word = |t: &Tok, w: &str| matches!(t, Tok::Word(x) if x == w);
    while i < toks.len() {
        if !conds.is_empty() {
            word(&toks[i], "and").then_some(())?;
            i += 1;
        }
        let c = match toks.get(i..i + 3)? {
            [Tok::Word(f), Tok::Op("="), Tok::Str(v)] if f == "name" => Cond::Name(v.clone()),
            [Tok::Str(v), a, b] if word(a, "in") && word(b, "parents") => Cond::InParents(v.clone()),
            [Tok::Word(f), Tok::Op(op), Tok::Str(v)] if f == "mimeType" => Cond::Mime(*op == "=", v.clone()),
            [Tok::Word(f), Tok::Op("="), Tok::Word(v)] if f == "trashed" => Cond::Trashed(v == "true"),
            _ => return None,
        };
        conds.push(c);
        i += 3;
    }
    Some(conds)
}

async fn list_handler(
    AxState(shared): AxState<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query = query.unwrap_or_default();
    handle(&shared, "list", &query, &headers, 0, |st, _| {
        let Some(conds) = param(&query, "q").as_deref().map(parse_q).unwrap_or(Some(Vec::new())) else {
            return bad("invalidQuery", "Invalid Value");
        };
        let all_drives = flag(&query, "supportsAllDrives") && flag(&query, "includeItemsFromAllDrives");
        let files: Vec<Value> = st
            .order
            .iter()
            .filter_map(|id| st.items.get(id))
            .filter(|i| i.drive.is_none() || all_drives)
            .filter(|i| {
                conds.iter().all(|c| match c {
                    Cond::Name(n) => &i.name == n,
                    Cond::InParents(p) => i.parents.contains(p),
                    Cond::Mime(eq, m) => (&i.mime_type == m) == *eq,
                    Cond::Trashed(t) => !*t,
                })
            })
            .map(|i| resource(i, Some("id,name,mimeType,size,webViewLink")))
            .collect();
        // `fields=files(a,b)`: only those.
        let fields = param(&query, "fields")
            .and_then(|f| f.strip_prefix("files(").and_then(|r| r.strip_suffix(')')).map(str::to_string));
        let files: Vec<Value> = match fields {
            None => files,
            Some(f) => files
                .into_iter()
                .map(|v| {
                    let keep: Vec<&str> = f.split(',').map(str::trim).collect();
                    Value::Object(
                        v.as_object()
                            .into_iter()
                            .flatten()
                            .filter(|(k, _)| keep.contains(&k.as_str()))
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect(),
                    )
                })
                .collect(),
        };
        json_ok(json!({"files": files}))
    })
    .await
}

/// Checks a new item's parents: each exists (as this request may see it) and is a folder.
fn check_parents(st: &State, parents: &[String], query: &str) -> Result<Option<String>, Box<Response>> {
    if parents.len() != 1 {
        return Err(Box::new(bad("invalidParents", "A file must have exactly one parent.")));
    }
    match visible(st, &parents[0], query) {
        Some(p) if p.folder => Ok(p.drive.clone()),
        Some(_) => Err(Box::new(bad("invalidParents", "The parent is not a folder."))),
        None => Err(Box::new(not_found(&parents[0]))),
    }
}

/// `name`, `mimeType`, `parents` from JSON metadata.
fn metadata(body: &[u8]) -> Option<(Option<String>, Option<String>, Vec<String>)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let parents = match v.get("parents") {
        None => vec!["root".to_string()],
        Some(p) => p.as_array()?.iter().map(|x| x.as_str().map(str::to_string)).collect::<Option<Vec<_>>>()?,
    };
    Some((s("name"), s("mimeType"), parents))
}

async fn create_handler(
    AxState(shared): AxState<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query.unwrap_or_default();
    handle(&shared, "create", &query, &headers, body.len(), |st, _| {
        let Some((name, mime, parents)) = metadata(&body) else { return bad("parseError", "Parse Error") };
        let drive = match check_parents(st, &parents, &query) {
            Ok(d) => d,
            Err(r) => return *r,
        };
        let name = name.unwrap_or_else(|| "Untitled".into());
        let mime = mime.unwrap_or_else(|| "application/octet-stream".into());
        let id = insert(st, &name, &mime, parents, Vec::new(), drive);
        json_ok(resource(&st.items[&id], param(&query, "fields").as_deref()))
    })
    .await
}

async fn get_handler(
    AxState(shared): AxState<Arc<Shared>>,
    AxPath(id): AxPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let query = query.unwrap_or_default();
    handle(&shared, "get", &query, &headers, 0, |st, _| match visible(st, &id, &query) {
        Some(item) => json_ok(resource(item, param(&query, "fields").as_deref())),
        None => not_found(&id),
    })
    .await
}

async fn permission_handler(
    AxState(shared): AxState<Arc<Shared>>,
    AxPath(id): AxPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query.unwrap_or_default();
    handle(&shared, "permission", &query, &headers, body.len(), |st, account| {
        if visible(st, &id, &query).is_none() {
            return not_found(&id);
        }
        let Ok(v) = serde_json::from_slice::<Value>(&body) else { return bad("parseError", "Parse Error") };
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let (Some(role), Some(kind)) = (s("role"), s("type")) else {
            return bad("required", "The permission role and type are required.");
        };
        if !matches!(role.as_str(), "reader" | "commenter" | "writer" | "fileOrganizer" | "organizer") {
            return bad("invalid", "Invalid role.");
        }
        let domain = s("domain");
        match kind.as_str() {
            "domain" if domain.is_none() => return bad("required", "A domain is required."),
            "domain" | "anyone" => {}
            "user" | "group" if s("emailAddress").is_some() => {}
            _ => return bad("invalid", "Invalid permission type."),
        }
        st.permissions.push(Permission {
            file_id: id.clone(),
            role: role.clone(),
            kind: kind.clone(),
            domain: domain.clone(),
            allow_file_discovery: v.get("allowFileDiscovery").and_then(Value::as_bool),
            account: account.to_string(),
        });
        json_ok(json!({"kind": "drive#permission", "id": format!("perm{}", st.permissions.len()), "type": kind, "role": role}))
    })
    .await
}

/// A new session for `target`: 200 with `Location`.
fn new_session(st: &mut State, base: &str, path: &str, query: &str, headers: &HeaderMap, target: Target) -> Response {
    let Some(total) = headers.get("x-upload-content-length").and_then(|v| v.to_str().ok()?.parse::<u64>().ok()) else {
        return bad("required", "X-Upload-Content-Length is required.");
    };
    st.sessions_opened += 1;
    let id = format!("ADfake{}x{}", st.sessions_opened, super::random_b64url(12).replace(['-', '_'], "z"));
    let fields = param(query, "fields");
    st.sessions.insert(id.clone(), Session { total, received: Vec::new(), target, fields, done: None, expired: false });
    let location = format!("{base}{path}?{query}&upload_id={id}");
    (StatusCode::OK, [(header::LOCATION, location)]).into_response()
}

async fn open_handler(
    AxState(shared): AxState<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query.unwrap_or_default();
    let base = shared.base_url.clone();
    handle(&shared, "open", &query, &headers, body.len(), |st, _| {
        if param(&query, "uploadType").as_deref() != Some("resumable") {
            return bad("invalid", "Only resumable uploads are modelled.");
        }
        let Some((name, mime, parents)) = metadata(&body) else { return bad("parseError", "Parse Error") };
        if let Err(r) = check_parents(st, &parents, &query) {
            return *r;
        }
        let mime_type = mime
            .or_else(|| headers.get("x-upload-content-type").and_then(|v| v.to_str().ok()).map(str::to_string))
            .unwrap_or_else(|| "application/octet-stream".into());
        let target = Target::New { name: name.unwrap_or_else(|| "Untitled".into()), parents, mime_type };
        new_session(st, &base, "/upload/drive/v3/files", &query, &headers, target)
    })
    .await
}

async fn replace_handler(
    AxState(shared): AxState<Arc<Shared>>,
    AxPath(id): AxPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let query = query.unwrap_or_default();
    let base = shared.base_url.clone();
    let kind = if param(&query, "uploadType").as_deref() == Some("media") { "media" } else { "replace" };
    handle(&shared, kind, &query, &headers, body.len(), |st, _| {
        match visible(st, &id, &query) {
            Some(i) if !i.folder => {}
            Some(_) => return bad("invalid", "A folder has no content."),
            None => return not_found(&id),
        }
        match param(&query, "uploadType").as_deref() {
            Some("media") => {
                let item = st.items.get_mut(&id).expect("checked above");
                item.bytes = body.to_vec();
                item.versions += 1;
                json_ok(resource(item, param(&query, "fields").as_deref()))
            }
            Some("resumable") => new_session(
                st,
                &base,
                &format!("/upload/drive/v3/files/{id}"),
                &query,
                &headers,
                Target::Replace(id.clone()),
            ),
            _ => bad("invalid", "Invalid upload type."),
        }
    })
    .await
}

async fn chunk_handler(
    AxState(shared): AxState<Arc<Shared>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    chunk(shared, query.unwrap_or_default(), headers, body).await
}

async fn chunk_handler_id(
    AxState(shared): AxState<Arc<Shared>>,
    AxPath(_id): AxPath<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    chunk(shared, query.unwrap_or_default(), headers, body).await
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

async fn chunk(shared: Arc<Shared>, query: String, headers: HeaderMap, body: Bytes) -> Response {
    let range = headers.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).and_then(content_range);
    let kind = if matches!(range, Some((None, _))) { "query" } else { "chunk" };
    let session_id = param(&query, "upload_id").unwrap_or_default();
    handle(&shared, kind, &query, &headers, body.len(), |st, _| answer_chunk(st, &session_id, range, &body)).await
}

fn answer_chunk(st: &mut State, id: &str, range: Option<(Option<(u64, u64)>, u64)>, body: &[u8]) -> Response {
    let gone = || google_error(StatusCode::NOT_FOUND, "notFound", "Upload session not found or expired.");
    let Some(s) = st.sessions.get_mut(id) else { return gone() };
    if s.expired {
        return gone();
    }
    let Some((span, total)) = range else { return bad("invalid", "Missing or invalid Content-Range.") };
    if total != s.total {
        return bad("invalid", "Content-Range total does not match the session.");
    }
    let fields = s.fields.clone();
    if let Some(file) = s.done.clone() {
        return json_ok(resource(&st.items[&file], fields.as_deref()));
    }
    let Some((a, b)) = span else {
        if !body.is_empty() {
            return bad("invalid", "A status query has no body.");
        }
        return incomplete(s.received.len());
    };
    let len = (b - a + 1) as usize;
    if a != s.received.len() as u64 || body.len() != len || b >= total {
        return bad(
            "invalid",
            &format!("Content-Range bytes {a}-{b}/{total} does not continue the upload at {}", s.received.len()),
        );
    }
    let last = b + 1 == total;
    if !last && !len.is_multiple_of(CHUNK_UNIT) {
        return bad("invalid", "Chunk size must be a multiple of 262144 bytes except for the last chunk.");
    }
    s.received.extend_from_slice(body);
    if !last {
        return incomplete(s.received.len());
    }
    let bytes = std::mem::take(&mut s.received);
    let target = std::mem::replace(&mut s.target, Target::Replace(String::new()));
    let file = match target {
        Target::New { name, parents, mime_type } => {
            // The parent may have gone while the bytes went up.
            let drive = match parents.first().and_then(|p| st.items.get(p)) {
                Some(p) => p.drive.clone(),
                None => return not_found(parents.first().map(String::as_str).unwrap_or("")),
            };
            insert(st, &name, &mime_type, parents, bytes, drive)
        }
        Target::Replace(file) => {
            let Some(item) = st.items.get_mut(&file) else { return not_found(&file) };
            item.bytes = bytes;
            item.versions += 1;
            file
        }
    };
    if let Some(s) = st.sessions.get_mut(id) {
        s.done = Some(file.clone());
    }
    json_ok(resource(&st.items[&file], fields.as_deref()))
}

#[test]
fn drive_queries_parse_with_escapes_and_refuse_the_rest() {
    assert_eq!(
        parse_q(r"name = 'O\'Brien \\ scans' and 'root' in parents and mimeType != 'x' and trashed = false"),
        Some(vec![
            Cond::Name(r"O'Brien \ scans".into()),
            Cond::InParents("root".into()),
            Cond::Mime(false, "x".into()),
            Cond::Trashed(false),
        ])
    );
    assert_eq!(parse_q("name = 'O'Brien'"), None);
    assert_eq!(parse_q("name = 'unterminated"), None);
    assert_eq!(parse_q("name contains 'x'"), None);
}
