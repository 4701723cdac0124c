//! A fake of Microsoft Graph's drives (SharePoint document libraries, OneDrive for Business)
//! for integration tests, on `127.0.0.1:<random port>`.
//!
//! It enforces what Graph does to a client saving files:
//! - `Authorization: Bearer` on every API request, checked by the test's
//!   [`BearerValidator`](super::BearerValidator); 401 with Graph's error JSON otherwise. An
//!   upload URL needs none; whether one was sent there is recorded ([`Logged::authorization`]).
//! - Only the sites, libraries and OneDrives set up exist (`GET /sites/{host}:/sites/{path}`,
//!   `/sites/{id}/drives`, `/sites/{id}/drive`, `/users/{user}/drive`); others get 404
//!   `itemNotFound`. Items are addressed by id or by `{parent-id}:/{path}` (`root` too), names
//!   compared without case, as SharePoint does.
//! - `POST .../children` makes a folder; with `conflictBehavior` "fail" (as sent) an existing
//!   name gets 409 `nameAlreadyExists`.
//! - `PUT .../{name}:/content` takes at most 4 MiB (413 above); `conflictBehavior` from the
//!   query: "fail" (409 `nameAlreadyExists`), "rename" (`name 1.pdf`, the first free one),
//!   "replace" (same item, new eTag; the default).
//! - `createUploadSession` gives an `uploadUrl`; its `PUT`s must come in order (416 otherwise)
//!   with a correct `Content-Range` (400), each a multiple of 320 KiB except the last (400),
//!   under 60 MiB (413). 202 with `nextExpectedRanges` until the last, then 201 (200 when it
//!   replaced) with the driveItem; the session is gone then (404). `GET uploadUrl` gives
//!   `nextExpectedRanges`. The conflict is decided at the end (and for "fail" at creation).
//! - `createLink` makes a link of the asked type and scope.
//!
//! Knobs: [`FakeDrive::throttle`] (429 with `Retry-After` N times), [`FakeDrive::fault`] (the
//! n-th request of a kind answers an error, or is carried out and then never answered: a crash
//! point, see [`FakeDrive::hung`]), [`FakeDrive::deny_writes`] (403 `accessDenied` to writes,
//! an app with read access only), [`FakeDrive::set_quota`] (507 `quotaLimitReached`). Every
//! file is kept with its drive, path and bytes for byte-for-byte comparison.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State as AxState};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::Notify;

use super::BearerValidator;
use super::ServerTask;

/// The largest simple upload.
pub const SIMPLE_MAX: usize = 4 * 1024 * 1024;
/// Upload session ranges are multiples of this, except the last.
pub const FRAGMENT: usize = 320 * 1024;
/// Upload session ranges are smaller than this.
pub const MAX_FRAGMENT: usize = 60 * 1024 * 1024;
/// How long a "hung" answer waits (the client gives up, or is dropped, long before).
const HANG: Duration = Duration::from_secs(60);

/// A kind of request, for [`FakeDrive::fault`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    GetSite,
    ListDrives,
    GetDrive,
    UserDrive,
    GetItem,
    CreateFolder,
    PutContent,
    CreateSession,
    PutChunk,
    GetSession,
    CreateLink,
}

/// What a fault does.
#[derive(Clone, Debug)]
pub enum Action {
    /// Answer this instead of doing anything.
    Error { status: u16, code: String, message: String },
    /// Do it, then never answer (a crash after the server acted).
    Hang,
}

impl Action {
    pub fn error(status: u16, code: &str, message: &str) -> Action {
        Action::Error { status, code: code.into(), message: message.into() }
    }
}

/// A file in a drive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFile {
    pub id: String,
    /// The drive's name (a library's, or `OneDrive`).
    pub drive: String,
    /// Folders and name from the drive's root, `/`-separated.
    pub path: String,
    pub name: String,
    pub bytes: Vec<u8>,
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Logged {
    #[allow(dead_code)] // shown by Debug in assertion messages
    pub method: String,
    /// Without the query.
    #[allow(dead_code)]
    pub path: String,
    pub op: Option<Op>,
    pub authorization: bool,
    pub content_range: Option<String>,
    pub body_len: usize,
}

struct Item {
    id: String,
    drive: String,
    name: String,
    parent: Option<String>,
    folder: bool,
    bytes: Vec<u8>,
    version: u64,
    created: String,
}

struct Drive {
    id: String,
    name: String,
    root: String,
}

struct Site {
    id: String,
    /// `host:/sites/path`, lower case.
    path: String,
    /// The first is the default library.
    drives: Vec<String>,
}

struct Session {
    drive: String,
    parent: String,
    name: String,
    conflict: String,
    total: Option<u64>,
    received: Vec<u8>,
}

#[derive(Default)]
struct State {
    next: u64,
    sites: Vec<Site>,
    users: HashMap<String, String>,
    drives: HashMap<String, Drive>,
    items: HashMap<String, Item>,
    sessions: HashMap<String, Session>,
    sessions_created: usize,
    links: Vec<(String, String, String)>,
    log: Vec<Logged>,
    throttle: Option<(usize, u64)>,
    faults: Vec<(Op, usize, Action)>,
    hangs: usize,
    deny_writes: bool,
    quota: Option<u64>,
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

/// Handle on a running fake. Cheap to clone; the server stops with the last clone.
#[derive(Clone)]
pub struct FakeDrive {
    shared: Arc<Shared>,
    _task: Arc<ServerTask>,
}

impl FakeDrive {
    pub async fn start(validator: BearerValidator) -> FakeDrive {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("FakeDrive: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            base_url: format!("http://{addr}"),
            validator,
            changed: Notify::new(),
        });
        // Limits are Graph's, enforced in the handler: axum's own 2 MB default must not apply.
        let app = Router::new().fallback(handle).layer(DefaultBodyLimit::disable()).with_state(shared.clone());
        FakeDrive { shared, _task: ServerTask::serve(listener, app) }
    }

    /// What `graph_url` is set to.
    pub fn url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// A SharePoint site (`host:/sites/path`) with these document libraries (the first is
    /// the default one). Returns the site's id.
    pub fn add_site(&self, site: &str, libraries: &[&str]) -> String {
        let mut st = self.shared.lock();
        st.next += 1;
        let id = format!("{},{:08}-site,web", site.split(':').next().unwrap_or(site), st.next);
        let drives = libraries.iter().map(|l| new_drive(&mut st, l)).collect();
        st.sites.push(Site { id: id.clone(), path: site.to_lowercase(), drives });
        id
    }

    /// A user's OneDrive for Business.
    pub fn add_onedrive(&self, user: &str) {
        let mut st = self.shared.lock();
        let d = new_drive(&mut st, "OneDrive");
        st.users.insert(user.to_lowercase(), d);
    }

    /// The next `times` API requests get 429 with `Retry-After: secs`.
    pub fn throttle(&self, times: usize, secs: u64) {
        self.shared.lock().throttle = Some((times, secs));
    }

    /// The `nth` (from 1, counted from now) request of kind `op` meets `action`.
    pub fn fault(&self, op: Op, nth: usize, action: Action) {
        self.shared.lock().faults.push((op, nth.max(1), action));
    }

    /// Writes (folders, files, sessions, links) get 403 `accessDenied`: an app that may read
    /// the site and no more.
    pub fn deny_writes(&self, on: bool) {
        self.shared.lock().deny_writes = on;
    }

    /// Bytes all drives may hold together; more gets 507 `quotaLimitReached`.
    pub fn set_quota(&self, quota: Option<u64>) {
        self.shared.lock().quota = quota;
    }

    /// Every file, sorted by drive and path.
    pub fn files(&self) -> Vec<StoredFile> {
        let st = self.shared.lock();
        let mut v: Vec<StoredFile> = st
            .items
            .values()
            .filter(|i| !i.folder && i.parent.is_some())
            .map(|i| StoredFile {
                id: i.id.clone(),
                drive: st.drives.get(&i.drive).map(|d| d.name.clone()).unwrap_or_default(),
                path: path_of(&st, &i.id),
                name: i.name.clone(),
                bytes: i.bytes.clone(),
            })
            .collect();
        v.sort_by(|a, b| (&a.drive, &a.path).cmp(&(&b.drive, &b.path)));
        v
    }

    /// Every folder's path from its drive's root, sorted.
    pub fn folders(&self) -> Vec<String> {
        let st = self.shared.lock();
        let mut v: Vec<String> =
            st.items.values().filter(|i| i.folder && i.parent.is_some()).map(|i| path_of(&st, &i.id)).collect();
        v.sort();
        v
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.shared.lock().log.clone()
    }

    /// Upload sessions created so far.
    pub fn sessions_created(&self) -> usize {
        self.shared.lock().sessions_created
    }

    /// Links made: (item id, type, scope).
    pub fn links(&self) -> Vec<(String, String, String)> {
        self.shared.lock().links.clone()
    }

    /// Waits until `n` requests were carried out and left unanswered ([`Action::Hang`]).
    pub async fn hung(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            if self.shared.lock().hangs >= n {
                return;
            }
            assert!(Instant::now() < deadline, "FakeDrive: no request hung in {timeout:?}");
            let _ = tokio::time::timeout(deadline - Instant::now(), changed).await;
        }
    }
}

fn new_drive(st: &mut State, name: &str) -> String {
    st.next += 1;
    let id = format!("b!fakeDrive{:04}", st.next);
    let root = format!("01ROOT{:04}", st.next);
    st.items.insert(
        root.clone(),
        Item {
            id: root.clone(),
            drive: id.clone(),
            name: "root".into(),
            parent: None,
            folder: true,
            bytes: Vec::new(),
            version: 1,
            created: now(),
        },
    );
    st.drives.insert(id.clone(), Drive { id: id.clone(), name: name.to_string(), root });
    id
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An item's path from its drive's root.
fn path_of(st: &State, id: &str) -> String {
    let mut parts = Vec::new();
    let mut at = st.items.get(id);
    while let Some(i) = at {
        if i.parent.is_none() {
            break;
        }
        parts.push(i.name.clone());
        at = i.parent.as_ref().and_then(|p| st.items.get(p));
    }
    parts.reverse();
    parts.join("/")
}

fn graph_error(status: u16, code: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json!({"error": {"code": code, "message": message, "innerError": {"request-id": "fake"}}})))
        .into_response()
}

fn not_found() -> Response {
    graph_error(404, "itemNotFound", "The resource could not be found.")
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

/// What a request addresses.
#[derive(Debug)]
enum Route {
    Site(String),
    SiteDrives(String),
    SiteDrive(String),
    UserDrive(String),
    /// drive, item id, path below it.
    Item(String, String, Vec<String>),
    Children(String, String),
    Link(String, String),
    Content(String, String, Vec<String>),
    Session(String, String, Vec<String>),
    Upload(String),
}

fn route(method: &Method, segs: &[String]) -> Option<(Op, Route)> {
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let m = method.as_str();
    let owned = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    Some(match (m, s.as_slice()) {
        ("PUT", ["upload", t]) => (Op::PutChunk, Route::Upload(t.to_string())),
        ("GET", ["upload", t]) => (Op::GetSession, Route::Upload(t.to_string())),
        ("GET", ["v1.0", "sites", host, rest @ ..]) if host.ends_with(':') && !rest.is_empty() => {
            (Op::GetSite, Route::Site(format!("{host}/{}", rest.join("/"))))
        }
        ("GET", ["v1.0", "sites", id, "drives"]) => (Op::ListDrives, Route::SiteDrives(id.to_string())),
        ("GET", ["v1.0", "sites", id, "drive"]) => (Op::GetDrive, Route::SiteDrive(id.to_string())),
        ("GET", ["v1.0", "users", u, "drive"]) => (Op::UserDrive, Route::UserDrive(u.to_lowercase())),
        (_, ["v1.0", "drives", d, "items", rest @ ..]) => {
            let d = d.to_string();
            match (m, rest) {
                ("GET", [id]) => (Op::GetItem, Route::Item(d, id.to_string(), Vec::new())),
                ("POST", [id, "children"]) => (Op::CreateFolder, Route::Children(d, id.to_string())),
                ("POST", [id, "createLink"]) => (Op::CreateLink, Route::Link(d, id.to_string())),
                (_, [pid, path @ ..]) if pid.ends_with(':') && !path.is_empty() => {
                    let pid = pid.trim_end_matches(':').to_string();
                    match (m, path) {
                        ("PUT", [p @ .., last, "content"]) if last.ends_with(':') => {
                            let mut p = owned(p);
                            p.push(last.trim_end_matches(':').to_string());
                            (Op::PutContent, Route::Content(d, pid, p))
                        }
                        ("POST", [p @ .., last, "createUploadSession"]) if last.ends_with(':') => {
                            let mut p = owned(p);
                            p.push(last.trim_end_matches(':').to_string());
                            (Op::CreateSession, Route::Session(d, pid, p))
                        }
                        ("GET", p) => {
                            let mut p = owned(p);
                            if let Some(l) = p.last_mut() {
                                *l = l.trim_end_matches(':').to_string();
                            }
                            (Op::GetItem, Route::Item(d, pid, p))
                        }
                        _ => return None,
                    }
                }
                _ => return None,
            }
        }
        _ => return None,
    })
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
    shared.lock().log.push(Logged {
        method: method.to_string(),
        path: uri.path().to_string(),
        op: routed.as_ref().map(|r| r.0),
        authorization: headers.contains_key(header::AUTHORIZATION),
        content_range: headers.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).map(str::to_string),
        body_len: body.len(),
    });
    let Some((op, route)) = routed else {
        return graph_error(400, "invalidRequest", &format!("Invalid request: {} {}", method, uri.path()));
    };
    let is_upload = matches!(op, Op::PutChunk | Op::GetSession);
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
    let (fault, throttled) = {
        let mut st = shared.lock();
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
        (fault, throttled)
    };
    if let Some(secs) = throttled {
        let mut r = graph_error(429, "activityLimitReached", "The request has been throttled");
        r.headers_mut().insert(header::RETRY_AFTER, secs.to_string().parse().expect("header value"));
        return r;
    }
    let hang = match fault {
        Some(Action::Error { status, code, message }) => return graph_error(status, &code, &message),
        Some(Action::Hang) => true,
        None => false,
    };
    let query = percent_decode(uri.query().unwrap_or(""));
    let response = serve(&shared, op, route, &query, &headers, &body);
    if hang {
        shared.lock().hangs += 1;
    }
    shared.changed.notify_waiters();
    if hang {
        tokio::time::sleep(HANG).await;
    }
    response
}

/// The driveItem JSON.
fn item_json(base: &str, st: &State, i: &Item) -> Value {
    let mut v = json!({
        "id": i.id,
        "name": i.name,
        "size": if i.folder { 0 } else { i.bytes.len() },
        "eTag": format!("\"{{{}}},{}\"", i.id, i.version),
        "cTag": format!("\"c:{{{}}},{}\"", i.id, i.version),
        "createdDateTime": i.created,
        "lastModifiedDateTime": now(),
        "webUrl": format!("{base}/web/{}/{}", i.drive, path_of(st, &i.id)),
        "parentReference": {"driveId": i.drive, "id": i.parent},
    });
    if i.folder {
        v["folder"] = json!({"childCount": st.items.values().filter(|c| c.parent.as_deref() == Some(&i.id)).count()});
    } else {
        v["file"] = json!({"mimeType": "application/octet-stream"});
    }
    v
}

/// The id of `id` (`root` too) in drive `d`, then down `path`.
fn resolve(st: &State, d: &str, id: &str, path: &[String]) -> Option<String> {
    let drive = st.drives.get(d)?;
    let mut at = if id == "root" { drive.root.clone() } else { id.to_string() };
    if st.items.get(&at).is_none_or(|i| i.drive != d) {
        return None;
    }
    for name in path {
        at = child(st, &at, name)?;
    }
    Some(at)
}

fn child(st: &State, parent: &str, name: &str) -> Option<String> {
    st.items
        .values()
        .find(|i| i.parent.as_deref() == Some(parent) && i.name.eq_ignore_ascii_case(name))
        .map(|i| i.id.clone())
}

/// `name N.ext`, as Graph renames.
fn renamed(name: &str, n: u32) -> String {
    match name.rfind('.') {
        Some(dot) if dot > 0 => format!("{} {n}{}", &name[..dot], &name[dot..]),
        _ => format!("{name} {n}"),
    }
}

/// Puts a file named `name` under `parent` as `conflict` says: (status, item id).
fn place(
    st: &mut State,
    d: &str,
    parent: &str,
    name: &str,
    conflict: &str,
    bytes: Vec<u8>,
) -> Result<(u16, String), Box<Response>> {
    if let Some(q) = st.quota {
        let used: u64 = st.items.values().map(|i| i.bytes.len() as u64).sum();
        if used + bytes.len() as u64 > q {
            return Err(Box::new(graph_error(507, "quotaLimitReached", "Insufficient Space Available")));
        }
    }
    let mut name = name.to_string();
    if let Some(existing) = child(st, parent, &name) {
        match conflict {
            "fail" => {
                return Err(Box::new(graph_error(409, "nameAlreadyExists", "The specified item name already exists.")))
            }
            "rename" => {
                let mut n = 1;
                while child(st, parent, &renamed(&name, n)).is_some() {
                    n += 1;
                }
                name = renamed(&name, n);
            }
            _ => {
                let Some(i) = st.items.get_mut(&existing) else { return Err(Box::new(not_found())) };
                if i.folder {
                    return Err(Box::new(graph_error(409, "nameAlreadyExists", "A folder of that name exists.")));
                }
                i.bytes = bytes;
                i.version += 1;
                return Ok((200, existing));
            }
        }
    }
    st.next += 1;
    let id = format!("01FILE{:06}", st.next);
    st.items.insert(
        id.clone(),
        Item {
            id: id.clone(),
            drive: d.to_string(),
            name,
            parent: Some(parent.to_string()),
            folder: false,
            bytes,
            version: 1,
            created: now(),
        },
    );
    Ok((201, id))
}

fn answer_item(base: &str, st: &State, status: u16, id: &str) -> Response {
    let Some(i) = st.items.get(id) else { return not_found() };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    (status, axum::Json(item_json(base, st, i))).into_response()
}

/// `bytes START-END/TOTAL` (RFC 9110 14.4).
fn parse_content_range(v: &str) -> Option<(u64, u64, u64)> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?, total.trim().parse().ok()?))
}

fn serve(shared: &Shared, op: Op, route: Route, query: &str, headers: &HeaderMap, body: &[u8]) -> Response {
    let base = shared.base_url.as_str();
    let mut st = shared.lock();
    let writes = matches!(op, Op::CreateFolder | Op::PutContent | Op::CreateSession | Op::CreateLink);
    if writes && st.deny_writes {
        return graph_error(403, "accessDenied", "Access denied");
    }
    match route {
        Route::Site(path) => match st.sites.iter().find(|s| s.path == path.to_lowercase()) {
            Some(s) => axum::Json(json!({"id": s.id, "webUrl": format!("{base}/web/site")})).into_response(),
            None => graph_error(404, "itemNotFound", "Requested site could not be found"),
        },
        Route::SiteDrives(id) => {
            let Some(s) = st.sites.iter().find(|s| s.id == id) else { return not_found() };
            let value: Vec<Value> = s
                .drives
                .iter()
                .filter_map(|d| st.drives.get(d))
                .map(|d| json!({"id": d.id, "name": d.name, "driveType": "documentLibrary"}))
                .collect();
            axum::Json(json!({"value": value})).into_response()
        }
        Route::SiteDrive(id) => {
            let Some(d) = st.sites.iter().find(|s| s.id == id).and_then(|s| s.drives.first()).and_then(|d| st.drives.get(d))
            else {
                return not_found();
            };
            axum::Json(json!({"id": d.id, "name": d.name, "driveType": "documentLibrary"})).into_response()
        }
        Route::UserDrive(user) => match st.users.get(&user).and_then(|d| st.drives.get(d)) {
            Some(d) => axum::Json(json!({"id": d.id, "name": d.name, "driveType": "business"})).into_response(),
            None => graph_error(404, "itemNotFound", "The resource could not be found."),
        },
        Route::Item(d, id, path) => match resolve(&st, &d, &id, &path) {
            Some(i) => answer_item(base, &st, 200, &i),
            None => not_found(),
        },
        Route::Children(d, id) => {
            let Some(parent) = resolve(&st, &d, &id, &[]) else { return not_found() };
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let Some(name) = v["name"].as_str().filter(|n| !n.is_empty()) else {
                return graph_error(400, "invalidRequest", "The name is missing.");
            };
            if v.get("folder").is_none() {
                return graph_error(400, "invalidRequest", "This fake makes folders only.");
            }
            let conflict = v["@microsoft.graph.conflictBehavior"].as_str().unwrap_or("fail");
            if child(&st, &parent, name).is_some() && conflict == "fail" {
                return graph_error(409, "nameAlreadyExists", "The specified item name already exists.");
            }
            st.next += 1;
            let new = format!("01DIR{:06}", st.next);
            st.items.insert(
                new.clone(),
                Item {
                    id: new.clone(),
                    drive: d,
                    name: name.to_string(),
                    parent: Some(parent),
                    folder: true,
                    bytes: Vec::new(),
                    version: 1,
                    created: now(),
                },
            );
            answer_item(base, &st, 201, &new)
        }
        Route::Link(d, id) => {
            let Some(item) = resolve(&st, &d, &id, &[]) else { return not_found() };
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let (Some(kind), scope) = (v["type"].as_str(), v["scope"].as_str().unwrap_or("anonymous")) else {
                return graph_error(400, "invalidRequest", "The link type is missing.");
            };
            st.links.push((item.clone(), kind.to_string(), scope.to_string()));
            let url = format!("{base}/:b:/s/{item}?{kind}-{scope}");
            (StatusCode::CREATED, axum::Json(json!({"id": "link", "roles": ["read"], "link": {"type": kind, "scope": scope, "webUrl": url}})))
                .into_response()
        }
        Route::Content(d, id, mut path) => {
            if body.len() > SIMPLE_MAX {
                return graph_error(
                    413,
                    "requestEntityTooLarge",
                    "Maximum request length exceeded: use an upload session above 4 MB.",
                );
            }
            let Some(name) = path.pop() else { return graph_error(400, "invalidRequest", "No name.") };
            let Some(parent) = resolve(&st, &d, &id, &path) else { return not_found() };
            let conflict = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("@microsoft.graph.conflictBehavior="))
                .unwrap_or("replace")
                .to_string();
            match place(&mut st, &d, &parent, &name, &conflict, body.to_vec()) {
                Ok((status, id)) => answer_item(base, &st, status, &id),
                Err(r) => *r,
            }
        }
        Route::Session(d, id, mut path) => {
            let Some(name) = path.pop() else { return graph_error(400, "invalidRequest", "No name.") };
            let Some(parent) = resolve(&st, &d, &id, &path) else { return not_found() };
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            let conflict = v["item"]["@microsoft.graph.conflictBehavior"].as_str().unwrap_or("replace").to_string();
            if conflict == "fail" && child(&st, &parent, &name).is_some() {
                return graph_error(409, "nameAlreadyExists", "The specified item name already exists.");
            }
            st.next += 1;
            st.sessions_created += 1;
            let token = format!("sess{}{}", st.next, super::random_b64url(12));
            st.sessions.insert(token.clone(), Session { drive: d, parent, name, conflict, total: None, received: Vec::new() });
            let url = format!("{base}/upload/{token}?tempauth=fake-upload-secret");
            axum::Json(json!({"uploadUrl": url, "expirationDateTime": "2030-01-01T00:00:00Z", "nextExpectedRanges": ["0-"]}))
                .into_response()
        }
        Route::Upload(token) if op == Op::GetSession => match st.sessions.get(&token) {
            Some(s) => axum::Json(json!({"expirationDateTime": "2030-01-01T00:00:00Z", "nextExpectedRanges": [format!("{}-", s.received.len())]}))
                .into_response(),
            None => not_found(),
        },
        Route::Upload(token) => {
            let Some(s) = st.sessions.get_mut(&token) else { return not_found() };
            let range = headers.get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).and_then(parse_content_range);
            let Some((start, end, total)) = range else {
                return graph_error(400, "invalidRequest", "The Content-Range header is missing or malformed.");
            };
            if end < start || end >= total || end - start + 1 != body.len() as u64 || s.total.is_some_and(|t| t != total) {
                return graph_error(400, "invalidRequest", "The Content-Range header does not match the body or the session.");
            }
            if body.len() >= MAX_FRAGMENT {
                return graph_error(413, "requestEntityTooLarge", "A fragment must be smaller than 60 MiB.");
            }
            if start != s.received.len() as u64 {
                return graph_error(416, "invalidRange", "The uploaded fragment is not the next expected range.");
            }
            if end + 1 < total && !body.len().is_multiple_of(FRAGMENT) {
                return graph_error(400, "invalidRequest", "A fragment must be a multiple of 320 KiB, except the last.");
            }
            s.total = Some(total);
            s.received.extend_from_slice(body);
            if (s.received.len() as u64) < total {
                let next = s.received.len();
                return (
                    StatusCode::ACCEPTED,
                    axum::Json(json!({"expirationDateTime": "2030-01-01T00:00:00Z", "nextExpectedRanges": [format!("{next}-")]})),
                )
                    .into_response();
            }
            let Some(s) = st.sessions.remove(&token) else { return not_found() };
            match place(&mut st, &s.drive, &s.parent, &s.name, &s.conflict, s.received) {
                Ok((status, id)) => answer_item(base, &st, status, &id),
                Err(r) => *r,
            }
        }
    }
}
