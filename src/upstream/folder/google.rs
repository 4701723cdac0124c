//! Google Drive through the Drive API v3 (module [`super`]; ARCHITECTURE.md, "Google Drive").
//!
//! Every call carries `supportsAllDrives=true`, so a folder on a shared drive works like one
//! in My Drive.
//!
//! - The folder: each segment of [`NewFile::folder`] is looked up under its parent by name
//!   (`files.list` with `q`) and created when missing. Drive allows two folders of one name, so
//!   find-or-create runs under a lock per (account, parent, name) and the ids are cached: two
//!   jobs saving into the same new folder at once make it once.
//! - The name: Drive allows two files of one name too, so the relay enforces `conflict` itself
//!   by looking the name up first: `fail` refuses, `replace` uploads new content to the
//!   existing file (`PATCH`), `rename` takes the first free `name (1).ext`, `(2)`, …. A lock
//!   per (account, folder, name) spans the look-up and the upload, so two jobs saving one name
//!   at once take turns.
//! - The bytes: a resumable upload. The session URI (`Location`) is committed in a [`Step`]
//!   before the first byte goes up, then [`CHUNK`]-sized `PUT`s with `Content-Range`, the
//!   offset Drive confirms (`308` + `Range`) committed after each; Drive makes the file when
//!   the last byte arrives (`200`/`201` with the file).
//!
//! After a crash the recorded session is asked where it stands (`Content-Range: bytes */total`,
//! empty body): `308` continues from Drive's offset, `200`/`201` is the file already made,
//! `404`/`410` an expired session. An expired session whose last chunk may have gone up may
//! have made the file: it is looked for by name and size in the folder before a new session
//! uploads it again, so one file is never saved twice.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{Conflict, NewFile, Saved, Target, Upload};
use crate::oauth::tokens::AccessToken;
use crate::upstream::api::retry_after;
use crate::upstream::{SendError, UpstreamReply};

use crate::upstream::google_api::{content_range, GoogleError, DEFAULT_RETRY_AFTER, REQUEST_TIMEOUT, STALLS};
pub use crate::upstream::google_api::{CHUNK, CHUNK_UNIT};
/// New sessions one save may open (a session that expires under it is replaced once).
const SESSIONS_PER_SAVE: usize = 2;
/// `name (1).ext` … `name (RENAMES).ext`: beyond that, `rename` gives up.
const RENAMES: u32 = 999;
/// Find-or-create locks and cached folder ids kept at most (then forgotten all at once).
const FOLDERS_KEPT: usize = 10_000;
const FOLDER_MIME: &str = "application/vnd.google-apps.folder";
/// What a saved file's resource must say ([`Saved`]).
const FILE_FIELDS: &str = "id,name,size,webViewLink";

/// A resumable session's URI. It authorises the upload by itself (whoever has it can finish
/// the file), so it stays in the queue record and [`std::fmt::Debug`] never shows it.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionUri(pub String);

impl SessionUri {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SessionUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "SessionUri()" } else { "SessionUri(..)" })
    }
}

/// What a file's upload leaves to resume (committed before each step).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Step {
    /// The resumable session (`Location`); empty before one is opened (and for an empty file,
    /// which takes one request without a session).
    #[serde(skip_serializing_if = "SessionUri::is_empty")]
    pub session: SessionUri,
    /// The id of the folder the file goes into.
    pub folder_id: String,
    /// The name the file gets (after `conflict`).
    pub name: String,
    /// The id of the file whose content is replaced (`conflict = "replace"`); empty: a new file.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub replace: String,
    /// Bytes Drive confirmed (`Range: bytes=0-N` → N+1).
    pub offset: u64,
    /// The file's size, announced when the session was opened.
    pub total: u64,
}

/// A lock per folder to find or create, holding its id once known.
type FolderSlot = Arc<tokio::sync::Mutex<Option<String>>>;
/// (account, parent or folder id, name).
type Key = (String, String, String);
/// A lock per name to save in a folder.
type NameLock = Arc<tokio::sync::Mutex<()>>;

/// The Google Drive API.
pub struct DriveApi {
    base: url::Url,
    http: reqwest::Client,
    /// By (account, parent id, name).
    folders: Mutex<HashMap<Key, FolderSlot>>,
    /// A lock per (account, folder id, name) held from the conflict look-up to the file's
    /// creation: two jobs saving one name at once see each other's file (`rename` numbers
    /// them, `fail` refuses the second) instead of both finding the name free.
    names: Mutex<HashMap<Key, NameLock>>,
}

/// A file resource as Drive answers it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DriveFile {
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    /// Drive writes it as a string (`"12345"`).
    #[serde(default, deserialize_with = "lenient_size")]
    size: Option<u64>,
    #[serde(default)]
    web_view_link: String,
}

fn lenient_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match Option::<serde_json::Value>::deserialize(d)? {
        Some(serde_json::Value::String(s)) => s.parse().ok(),
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        _ => None,
    })
}

#[derive(Debug, Default, Deserialize)]
struct FileList {
    #[serde(default)]
    files: Vec<DriveFile>,
}

/// What Drive said about a resumable session.
#[derive(Debug)]
enum Session {
    /// Incomplete: Drive has this many bytes.
    At(u64),
    /// Complete: the file.
    Done(DriveFile),
    /// Expired or unknown (`404`/`410`).
    Gone,
}

/// Why a resumable upload stopped.
#[derive(Debug)]
enum UploadError {
    /// The session expired (`404`/`410`) under a chunk: it made no file.
    Gone,
    Send(SendError),
}

impl From<SendError> for UploadError {
    fn from(e: SendError) -> Self {
        UploadError::Send(e)
    }
}

impl UploadError {
    fn into_send(self) -> SendError {
        match self {
            UploadError::Gone => {
                SendError::Network("Google Drive's upload session expired twice in one attempt".into())
            }
            UploadError::Send(e) => e,
        }
    }
}

/// What a refused request was about, for the error's text.
#[derive(Debug, Clone, Copy)]
enum Ctx<'a> {
    /// A folder by id (listing in it, creating in it, uploading into it).
    Folder(&'a str),
    /// A file by id (replacing it, sharing it).
    File(&'a str),
    /// An upload session.
    Session,
}

impl DriveApi {
    /// `base_url`: the Drive API (`https://www.googleapis.com`); `ca_file`: extra CAs.
    pub fn new(base_url: &str, ca_file: Option<&Path>) -> Result<DriveApi, String> {
        let base = url::Url::parse(base_url.trim_end_matches('/')).map_err(|e| format!("drive_api_url: {e}"))?;
        if !matches!(base.scheme(), "https" | "http") || base.cannot_be_a_base() {
            return Err(format!("drive_api_url: {base} is not an http(s) URL"));
        }
        let http = crate::tls::http_client(ca_file.as_slice(), REQUEST_TIMEOUT)?;
        Ok(DriveApi { base, http, folders: Mutex::new(HashMap::new()), names: Mutex::new(HashMap::new()) })
    }

    /// `base` + `/`-separated `path` + each of `ids` as one (encoded) segment.
    fn url(&self, path: &str, ids: &[&str], tail: &[&str]) -> url::Url {
        let mut u = self.base.clone();
        if let Ok(mut segs) = u.path_segments_mut() {
            segs.pop_if_empty();
            segs.extend(path.split('/').filter(|s| !s.is_empty()));
            segs.extend(ids);
            segs.extend(tail);
        }
        u.query_pairs_mut().append_pair("supportsAllDrives", "true");
        u
    }

    /// Saves one file in the target's folder.
    ///
    /// Never saves it twice: a recorded session is asked first whether it made the file, and an
    /// expired one whose last chunk may have gone up is followed by a look for the file.
    pub async fn save(&self, token: &AccessToken, up: &Upload<'_, Step>) -> Result<Saved, SendError> {
        let Target::GoogleDrive { folder_id } = up.target else {
            return Err(permanent(554, "5.3.5 the destination is not a Google Drive folder"));
        };
        let total = up.file.size;
        if let Some(step) = up.resume.filter(|s| s.total == total && !s.folder_id.is_empty() && !s.name.is_empty()) {
            return self.resume(token, up, step).await;
        }
        let mut fresh_ids = false;
        loop {
            let (folder, cached) = self.resolve(token, folder_id, &up.file.folder, fresh_ids).await?;
            let name_lock = self.name_lock(&token.account, &folder, &up.file.name);
            let result = {
                let _held = name_lock.lock().await;
                match self.pick_name(token, &folder, up.file, up.conflict).await {
                    Ok((name, replace)) => self.fresh(token, up, folder, name, replace).await,
                    Err(e) => Err(e),
                }
            };
            drop(name_lock);
            self.names.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, l| Arc::strong_count(l) > 1);
            match result {
                // A cached folder was deleted (or moved out of reach) since: look it up again.
                Err(e) if cached && !fresh_ids && is_missing_folder(&e) => {
                    self.forget(&token.account);
                    fresh_ids = true;
                }
                r => return r,
            }
        }
    }

    /// Continues from what an earlier attempt committed.
    async fn resume(&self, token: &AccessToken, up: &Upload<'_, Step>, step: &Step) -> Result<Saved, SendError> {
        let total = step.total;
        // Without a session (an empty file's single request) the file may have been made.
        let mut lost = true;
        if !step.session.is_empty() {
            match self.query(token, step).await? {
                Session::Done(f) => return Ok(saved(f, total)),
                Session::At(n) if n <= total => {
                    let step = Step { offset: n, ..step.clone() };
                    match self.upload(token, up, step).await {
                        // Expired between the question and the chunk: that session made no file.
                        Err(UploadError::Gone) => lost = false,
                        r => return r.map_err(UploadError::into_send),
                    }
                }
                Session::At(_) => lost = false,
                Session::Gone => {}
            }
        }
        // The session expired unanswered: if its last chunk may have gone up, Drive made the
        // file then (a `replace` only rewrites the same file: uploading it again is harmless).
        if lost && step.replace.is_empty() && total.saturating_sub(step.offset) <= CHUNK {
            if let Some(f) = self.find_file(token, &step.folder_id, &step.name, Some(total)).await? {
                return Ok(saved(f, total));
            }
        }
        self.fresh(token, up, step.folder_id.clone(), step.name.clone(), step.replace.clone()).await
    }

    /// A new upload (a first attempt, or after an expired session).
    async fn fresh(
        &self,
        token: &AccessToken,
        up: &Upload<'_, Step>,
        folder_id: String,
        name: String,
        replace: String,
    ) -> Result<Saved, SendError> {
        let total = up.file.size;
        let mut step = Step { session: SessionUri::default(), folder_id, name, replace, offset: 0, total };
        if total == 0 {
            save_step(up, &step).await?;
            return self.empty(token, up.file, &step).await;
        }
        let mut sessions = 0;
        loop {
            sessions += 1;
            step.session = self.open(token, up.file, &step).await?;
            step.offset = 0;
            // Recorded before the first byte goes up (see `save`).
            save_step(up, &step).await?;
            match self.upload(token, up, step.clone()).await {
                Err(UploadError::Gone) if sessions < SESSIONS_PER_SAVE => continue,
                r => return r.map_err(UploadError::into_send),
            }
        }
    }

    /// The folder under `root` for `segments`, found or created level by level; whether any
    /// id came from the cache.
    async fn resolve(
        &self,
        token: &AccessToken,
        root: &str,
        segments: &[String],
        fresh: bool,
    ) -> Result<(String, bool), SendError> {
        let mut parent = root.to_string();
        let mut cached = false;
        for name in segments {
            let slot = self.slot(&token.account, &parent, name);
            let mut id = slot.lock().await;
            match id.as_ref() {
                Some(known) if !fresh => {
                    cached = true;
                    parent = known.clone();
                }
                _ => {
                    let found = self.find_or_create(token, &parent, name).await?;
                    *id = Some(found.clone());
                    parent = found;
                }
            }
        }
        Ok((parent, cached))
    }

    fn slot(&self, account: &str, parent: &str, name: &str) -> FolderSlot {
        let mut map = self.folders.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= FOLDERS_KEPT {
            // Slots in use stay alive in their holders; only the sharing of new ones is lost.
            map.clear();
        }
        map.entry((account.to_string(), parent.to_string(), name.to_string())).or_default().clone()
    }

    fn name_lock(&self, account: &str, folder: &str, name: &str) -> NameLock {
        let mut map = self.names.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((account.to_string(), folder.to_string(), name.to_string())).or_default().clone()
    }

    /// Forgets the cached folder ids of `account`.
    fn forget(&self, account: &str) {
        self.folders.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| k.0 != account);
    }

    /// Called with the (parent, name) lock held.
    async fn find_or_create(&self, token: &AccessToken, parent: &str, name: &str) -> Result<String, SendError> {
        let q = format!(
            "name = '{}' and '{}' in parents and mimeType = '{FOLDER_MIME}' and trashed = false",
            q_escape(name),
            q_escape(parent)
        );
        if let Some(f) = self.list(token, &q, parent).await?.into_iter().next() {
            return Ok(f.id);
        }
        let body = serde_json::json!({"name": name, "mimeType": FOLDER_MIME, "parents": [parent]});
        let req = self.http.post(self.url("drive/v3/files", &[], &[])).query(&[("fields", "id")]).json(&body);
        let f: DriveFile = self.json(req, token, Ctx::Folder(parent)).await?;
        if f.id.is_empty() {
            return Err(SendError::Network("Google Drive created a folder without an id".into()));
        }
        Ok(f.id)
    }

    /// `files.list` with `q`, oldest first (the first of two same-named folders wins).
    async fn list(&self, token: &AccessToken, q: &str, folder: &str) -> Result<Vec<DriveFile>, SendError> {
        let req = self.http.get(self.url("drive/v3/files", &[], &[])).query(&[
            ("q", q),
            ("fields", "files(id,name,size,webViewLink)"),
            ("includeItemsFromAllDrives", "true"),
            ("orderBy", "createdTime"),
            ("pageSize", "100"),
        ]);
        let list: FileList = self.json(req, token, Ctx::Folder(folder)).await?;
        Ok(list.files)
    }

    /// A file (not a folder) named `name` in `folder`, of `size` bytes when given.
    async fn find_file(
        &self,
        token: &AccessToken,
        folder: &str,
        name: &str,
        size: Option<u64>,
    ) -> Result<Option<DriveFile>, SendError> {
        let q = format!(
            "name = '{}' and '{}' in parents and mimeType != '{FOLDER_MIME}' and trashed = false",
            q_escape(name),
            q_escape(folder)
        );
        let files = self.list(token, &q, folder).await?;
        Ok(files.into_iter().find(|f| f.name == name && size.is_none_or(|s| f.size == Some(s))))
    }

    /// The name to save under, and the file to replace (empty: none), by `conflict`.
    async fn pick_name(
        &self,
        token: &AccessToken,
        folder: &str,
        file: &NewFile,
        conflict: Conflict,
    ) -> Result<(String, String), SendError> {
        let Some(existing) = self.find_file(token, folder, &file.name, None).await? else {
            return Ok((file.name.clone(), String::new()));
        };
        match conflict {
            Conflict::Fail => Err(permanent(
                550,
                format!(
                    "5.2.0 a file named \"{}\" is already in the Google Drive folder {folder} (conflict = \"fail\")",
                    crate::reply::sanitize_text(&file.name, 200)
                ),
            )),
            Conflict::Replace => Ok((file.name.clone(), existing.id)),
            Conflict::Rename => {
                for n in 1..=RENAMES {
                    let candidate = numbered(&file.name, n);
                    if self.find_file(token, folder, &candidate, None).await?.is_none() {
                        return Ok((candidate, String::new()));
                    }
                }
                Err(permanent(
                    550,
                    format!(
                        "5.2.0 \"{}\" and {RENAMES} numbered names are all taken in the Google Drive folder {folder}",
                        crate::reply::sanitize_text(&file.name, 200)
                    ),
                ))
            }
        }
    }

    /// Opens a resumable session for the step's file; returns its URI.
    async fn open(&self, token: &AccessToken, file: &NewFile, step: &Step) -> Result<SessionUri, SendError> {
        let (req, ctx) = if step.replace.is_empty() {
            let meta =
                serde_json::json!({"name": step.name, "parents": [step.folder_id], "mimeType": file.content_type});
            (self.http.post(self.url("upload/drive/v3/files", &[], &[])).json(&meta), Ctx::Folder(&step.folder_id))
        } else {
            let url = self.url("upload/drive/v3/files", &[&step.replace], &[]);
            (self.http.patch(url).json(&serde_json::json!({})), Ctx::File(&step.replace))
        };
        let req = req
            .query(&[("uploadType", "resumable"), ("fields", FILE_FIELDS)])
            .header("X-Upload-Content-Type", &file.content_type)
            .header("X-Upload-Content-Length", step.total.to_string());
        let r = self.send(req, token, ctx).await?;
        let location = r.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok());
        self.session_uri(location)
    }

    /// An empty file: one request (a resumable session has no byte to end it).
    async fn empty(&self, token: &AccessToken, file: &NewFile, step: &Step) -> Result<Saved, SendError> {
        let req = if step.replace.is_empty() {
            let meta =
                serde_json::json!({"name": step.name, "parents": [step.folder_id], "mimeType": file.content_type});
            self.http.post(self.url("drive/v3/files", &[], &[])).json(&meta)
        } else {
            self.http
                .patch(self.url("upload/drive/v3/files", &[&step.replace], &[]))
                .query(&[("uploadType", "media")])
                .header(reqwest::header::CONTENT_TYPE, &file.content_type)
                .body(Vec::new())
        };
        let ctx = if step.replace.is_empty() { Ctx::Folder(&step.folder_id) } else { Ctx::File(&step.replace) };
        let f: DriveFile = self.json(req.query(&[("fields", FILE_FIELDS)]), token, ctx).await?;
        Ok(saved(f, 0))
    }

    /// The session URI from a `Location`, which must stay on the API's own origin: the token
    /// goes along with every chunk.
    fn session_uri(&self, location: Option<&str>) -> Result<SessionUri, SendError> {
        let bad = |why: &str| {
            SendError::Rejected(UpstreamReply::new(451, format!("4.3.0 Google Drive's upload session {why}")))
        };
        let location = location.ok_or_else(|| bad("came without a Location"))?;
        let uri = self.base.join(location).map_err(|_| bad("has an unreadable Location"))?;
        if !self.trusted(&uri) {
            return Err(bad("is on another host"));
        }
        Ok(SessionUri(uri.to_string()))
    }

    /// Whether `uri` may receive the token: the API's own origin, or, for Google's API, any
    /// https host of googleapis.com.
    fn trusted(&self, uri: &url::Url) -> bool {
        let google = |u: &url::Url| {
            u.scheme() == "https"
                && u.host_str().is_some_and(|h| h == "googleapis.com" || h.ends_with(".googleapis.com"))
        };
        uri.origin() == self.base.origin() || (google(&self.base) && google(uri))
    }

    /// Asks a recorded session where it stands.
    async fn query(&self, token: &AccessToken, step: &Step) -> Result<Session, SendError> {
        let Some(uri) = url::Url::parse(&step.session.0).ok().filter(|u| self.trusted(u)) else {
            // Recorded under another configuration: it never gets the token; a new one replaces it.
            return Ok(Session::Gone);
        };
        let r = self
            .http
            .put(uri)
            .bearer_auth(&token.secret)
            .header(reqwest::header::CONTENT_RANGE, format!("bytes */{}", step.total))
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .body(Vec::new())
            .send()
            .await
            .map_err(network)?;
        match session_state(r).await {
            Ok(s) => Ok(s),
            Err(UploadError::Gone) => Ok(Session::Gone),
            Err(UploadError::Send(e)) => Err(e),
        }
    }

    /// Uploads from `step.offset` to the end, committing each confirmed offset; returns the file.
    async fn upload(&self, token: &AccessToken, up: &Upload<'_, Step>, mut step: Step) -> Result<Saved, UploadError> {
        let Some(uri) = url::Url::parse(&step.session.0).ok().filter(|u| self.trusted(u)) else {
            return Err(UploadError::Gone);
        };
        let total = step.total;
        let mut stalls = 0;
        loop {
            // From the confirmed offset; again from Drive's offset when it kept less of a chunk.
            let mut chunks = up.bytes.chunks(step.offset, CHUNK as usize);
            let mut start = step.offset;
            loop {
                if start >= total {
                    return Err(SendError::Network(format!(
                        "Google Drive has all {total} bytes but did not finish the upload"
                    ))
                    .into());
                }
                let data = match chunks.recv().await {
                    Some(Ok(data)) => data,
                    Some(Err(e)) => return Err(SendError::Network(format!("reading the file: {e}")).into()),
                    None => {
                        return Err(SendError::Network(format!("the file ended at {start} of {total} bytes")).into())
                    }
                };
                let len = data.len() as u64;
                if len == 0 || len > CHUNK || start + len > total || (len != CHUNK && start + len != total) {
                    return Err(SendError::Network(format!(
                        "the file's bytes do not match its announced size ({total} bytes)"
                    ))
                    .into());
                }
                let r = self
                    .http
                    .put(uri.clone())
                    .bearer_auth(&token.secret)
                    .header(reqwest::header::CONTENT_RANGE, content_range(start, len, total))
                    .body(data)
                    .send()
                    .await
                    .map_err(network)?;
                match session_state(r).await? {
                    Session::Done(f) => return Ok(saved(f, total)),
                    Session::Gone => return Err(UploadError::Gone),
                    Session::At(n) if n > total => {
                        return Err(SendError::Network(format!("Google Drive confirmed {n} of {total} bytes")).into())
                    }
                    Session::At(n) if n == start + len => {
                        stalls = 0;
                        step.offset = n;
                        save_step(up, &step).await?;
                        start = n;
                    }
                    Session::At(n) => {
                        if n <= step.offset {
                            stalls += 1;
                            if stalls >= STALLS {
                                return Err(SendError::Network(format!(
                                    "Google Drive's upload does not progress beyond {n} of {total} bytes"
                                ))
                                .into());
                            }
                        } else {
                            stalls = 0;
                            save_step(up, &Step { offset: n, ..step.clone() }).await?;
                        }
                        step.offset = n;
                        break;
                    }
                }
            }
        }
    }

    /// An organisation-scoped view link to a saved file: a `reader` permission for the
    /// account's Workspace domain (never a public one); returns the file's `webViewLink`.
    pub async fn share(&self, token: &AccessToken, target: &Target, saved: &Saved) -> Result<String, SendError> {
        if !matches!(target, Target::GoogleDrive { .. }) {
            return Err(permanent(554, "5.3.5 the destination is not a Google Drive folder"));
        }
        let Some(domain) = workspace_domain(&token.account) else {
            return Err(permanent(
                550,
                format!(
                    "5.7.1 no organisation-scoped link for {}: that needs an account of a Google Workspace domain, \
                     and the relay makes no public links",
                    crate::reply::sanitize_text(&token.account, 100)
                ),
            ));
        };
        let body =
            serde_json::json!({"role": "reader", "type": "domain", "domain": domain, "allowFileDiscovery": false});
        let req = self
            .http
            .post(self.url("drive/v3/files", &[&saved.id], &["permissions"]))
            .query(&[("fields", "id")])
            .json(&body);
        self.send(req, token, Ctx::File(&saved.id)).await?;
        if !saved.web_url.is_empty() {
            return Ok(saved.web_url.clone());
        }
        let req = self.http.get(self.url("drive/v3/files", &[&saved.id], &[])).query(&[("fields", FILE_FIELDS)]);
        let f: DriveFile = self.json(req, token, Ctx::File(&saved.id)).await?;
        Ok(f.web_view_link)
    }

    /// Sends with the token; a `2xx` answer, or the refusal.
    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        token: &AccessToken,
        ctx: Ctx<'_>,
    ) -> Result<reqwest::Response, SendError> {
        let r = req.bearer_auth(&token.secret).send().await.map_err(network)?;
        if r.status().is_success() {
            Ok(r)
        } else {
            Err(refusal_of(r, ctx).await)
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        token: &AccessToken,
        ctx: Ctx<'_>,
    ) -> Result<T, SendError> {
        let r = self.send(req, token, ctx).await?;
        let body = r.bytes().await.map_err(network)?;
        serde_json::from_slice(&body)
            .map_err(|e| SendError::Network(format!("Google Drive answered unreadable JSON: {e}")))
    }
}

/// Commits the step to the queue record; the step it protects waits for it.
async fn save_step(up: &Upload<'_, Step>, step: &Step) -> Result<(), SendError> {
    up.sink.save(step).await.map_err(|e| SendError::Network(format!("could not record the upload's progress: {e}")))
}

/// Reads a session's answer: `308` (+ `Range`), `200`/`201` (the file), `404`/`410` (gone), or a refusal.
async fn session_state(r: reqwest::Response) -> Result<Session, UploadError> {
    match r.status().as_u16() {
        308 => Ok(Session::At(crate::upstream::google_api::session_offset(&r, "Google Drive")?)),
        200 | 201 => {
            let body = r.bytes().await.map_err(network)?;
            let f: DriveFile = serde_json::from_slice(&body)
                .map_err(|e| SendError::Network(format!("Google Drive answered an unreadable file: {e}")))?;
            Ok(Session::Done(f))
        }
        404 | 410 => Err(UploadError::Gone),
        _ => Err(refusal_of(r, Ctx::Session).await.into()),
    }
}

fn saved(f: DriveFile, size: u64) -> Saved {
    Saved { size: f.size.unwrap_or(size), id: f.id, name: f.name, web_url: f.web_view_link, link: None }
}

fn permanent(code: u16, text: impl Into<String>) -> SendError {
    SendError::Rejected(UpstreamReply::new(code, text))
}

/// A string literal inside a Drive query: `\` and `'` escaped with `\`.
fn q_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\'', "\\'")
}

/// `name (n).ext` (the extension is what follows the last dot, unless the dot starts the name).
fn numbered(name: &str, n: u32) -> String {
    match name.rfind('.') {
        Some(dot) if dot > 0 => format!("{} ({n}){}", &name[..dot], &name[dot..]),
        _ => format!("{name} ({n})"),
    }
}

/// The Workspace domain of an account (`scans@contoso.com` → `contoso.com`); `None` for a
/// consumer account or a service account acting as itself.
fn workspace_domain(account: &str) -> Option<String> {
    let (_, domain) = account.rsplit_once('@')?;
    let domain = domain.trim().to_ascii_lowercase();
    let consumer = matches!(domain.as_str(), "gmail.com" | "googlemail.com")
        || domain == "gserviceaccount.com"
        || domain.ends_with(".gserviceaccount.com");
    let valid = domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && domain.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    (valid && !consumer).then_some(domain)
}

/// Whether `e` says an uploaded-into folder is missing.
fn is_missing_folder(e: &SendError) -> bool {
    matches!(e, SendError::Rejected(r) if r.code == 550 && r.text.starts_with("5.1.1 "))
}

/// A reqwest error, without the URL (a session URI is a capability).
fn network(e: reqwest::Error) -> SendError {
    crate::upstream::google_api::network("Google Drive", e)
}

async fn refusal_of(r: reqwest::Response, ctx: Ctx<'_>) -> SendError {
    let status = r.status().as_u16();
    let after = r.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = r.bytes().await.unwrap_or_default();
    refusal(status, after.as_deref(), &body, ctx, chrono::Utc::now())
}

/// What the admin should do about a refusal, by Google's reason.
fn advice(reason: &str) -> Option<&'static str> {
    match reason {
        "insufficientPermissions"
        | "ACCESS_TOKEN_SCOPE_INSUFFICIENT"
        | "forbidden"
        | "insufficientFilePermissions"
        | "PERMISSION_DENIED" => Some(
            "the account may not write there: give the service account domain-wide delegation with the \
             https://www.googleapis.com/auth/drive scope (or sign in a user who has it), and share the folder \
             with the account (on a shared drive: a member with Content manager)",
        ),
        "accessNotConfigured" | "SERVICE_DISABLED" => {
            Some("the Drive API is not enabled in the Google Cloud project: enable it under APIs & Services")
        }
        "domainPolicy" => Some("the Workspace domain's policy does not allow this app: allow it under API controls"),
        "storageQuotaExceeded" | "teamDriveFileLimitExceeded" | "numChildrenInNonRootLimitExceeded" => {
            Some("the drive or folder is full: free space or raise its quota")
        }
        "cannotShareTeamDriveWithNonGoogleAccounts" | "sharingRateLimitExceeded" => None,
        _ => None,
    }
}

/// Maps a Drive API refusal to a send error: `401` the token; `429`, the rate limits Drive
/// answers with `403`, and `500`/`502`/`503`/`504` throttling (Retry-After, else a minute);
/// a missing folder, a full drive and other `4xx` a permanent reply with a hint.
fn refusal(
    status: u16,
    retry: Option<&str>,
    body: &[u8],
    ctx: Ctx<'_>,
    now: chrono::DateTime<chrono::Utc>,
) -> SendError {
    let e = GoogleError::parse(body);
    let reason = e.reason();
    let message = crate::reply::sanitize_text(&e.message, 200);
    let said = match (reason.is_empty(), message.is_empty()) {
        (true, true) => format!("HTTP {status}"),
        (true, false) => format!("HTTP {status}: {message}"),
        (false, true) => format!("HTTP {status} {reason}"),
        (false, false) => format!("HTTP {status} {reason}: {message}"),
    };
    let rate = matches!(reason, "rateLimitExceeded" | "userRateLimitExceeded" | "sharingRateLimitExceeded");
    if matches!(status, 429 | 500 | 502 | 503 | 504) || (status == 403 && rate) {
        return SendError::Throttled {
            reply: UpstreamReply::new(451, format!("4.7.0 Google Drive is throttling or failing: {said}")),
            retry_after: retry_after(retry, now).unwrap_or(DEFAULT_RETRY_AFTER),
        };
    }
    let text = |enhanced: &str| match advice(reason) {
        Some(a) => format!("{enhanced} Google Drive refused: {said} ({a})"),
        None => format!("{enhanced} Google Drive refused: {said}"),
    };
    match status {
        401 => SendError::Auth {
            reply: UpstreamReply::new(535, format!("5.7.0 Google Drive refused the token: {said}")),
            detail: None,
        },
        _ if matches!(
            reason,
            "storageQuotaExceeded" | "teamDriveFileLimitExceeded" | "numChildrenInNonRootLimitExceeded"
        ) =>
        {
            permanent(552, text("5.2.2"))
        }
        404 => match ctx {
            Ctx::Folder(id) => permanent(
                550,
                format!(
                    "5.1.1 the Google Drive folder {} was not found: {said} (check folder_id; share the folder with \
                     the account, and for a shared drive make the account a member: the relay asks with \
                     supportsAllDrives=true)",
                    crate::reply::sanitize_text(id, 100)
                ),
            ),
            Ctx::File(id) => permanent(
                550,
                format!("5.1.1 the Google Drive file {} was not found: {said}", crate::reply::sanitize_text(id, 100)),
            ),
            Ctx::Session => SendError::Rejected(UpstreamReply::new(451, text("4.3.0"))),
        },
        403 => permanent(550, text("5.7.1")),
        413 => permanent(552, text("5.3.4")),
        408 | 409 | 425 => SendError::Rejected(UpstreamReply::new(451, text("4.3.0"))),
        400..=499 => permanent(554, text("5.0.0")),
        _ => SendError::Rejected(UpstreamReply::new(451, format!("4.3.0 Google Drive answered {said}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::google_api::confirmed;
    use std::time::Duration;

    fn now() -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc2822("Wed, 02 Dec 2026 10:00:00 GMT").expect("date").to_utc()
    }

    fn google(code: u16, reason: &str, message: &str) -> Vec<u8> {
        serde_json::json!({"error": {"code": code, "message": message,
            "errors": [{"message": message, "domain": "global", "reason": reason}]}})
        .to_string()
        .into_bytes()
    }

    fn reply(e: SendError) -> UpstreamReply {
        match e {
            SendError::Rejected(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_step_keeps_its_session_in_the_record_and_out_of_debug() {
        let step = Step {
            session: SessionUri("https://www.googleapis.com/upload/drive/v3/files?upload_id=secret1".into()),
            folder_id: "1abc".into(),
            name: "scan.pdf".into(),
            replace: String::new(),
            offset: CHUNK,
            total: 20_000_000,
        };
        let json = serde_json::to_string(&step).expect("serialises");
        assert!(json.contains("upload_id=secret1") && !json.contains("replace"), "{json}");
        assert_eq!(serde_json::from_str::<Step>(&json).expect("parses"), step);
        assert!(!format!("{step:?}").contains("secret1"));
        assert_eq!(serde_json::from_str::<Step>("{}").expect("defaults"), Step::default());
    }

    #[test]
    fn query_strings_are_escaped_and_renames_numbered() {
        assert_eq!(q_escape(r"O'Brien \ Legal"), r"O\'Brien \\ Legal");
        assert_eq!(numbered("scan.pdf", 1), "scan (1).pdf");
        assert_eq!(numbered("scan.2026.pdf", 2), "scan.2026 (2).pdf");
        assert_eq!(numbered("README", 3), "README (3)");
        assert_eq!(numbered(".hidden", 1), ".hidden (1)");
    }

    #[test]
    fn only_a_workspace_domain_gets_a_link() {
        assert_eq!(workspace_domain("scans@Contoso.com").as_deref(), Some("contoso.com"));
        assert_eq!(workspace_domain("someone@gmail.com"), None);
        assert_eq!(workspace_domain("relay@project.iam.gserviceaccount.com"), None);
        assert_eq!(workspace_domain("no-domain"), None);
        assert_eq!(workspace_domain("x@localhost"), None);
    }

    #[test]
    fn drive_sizes_are_read_as_strings_or_numbers() {
        let f: DriveFile =
            serde_json::from_str(r#"{"id":"1","name":"a","size":"42","webViewLink":"u"}"#).expect("parses");
        assert_eq!((f.size, f.web_view_link.as_str()), (Some(42), "u"));
        let f: DriveFile = serde_json::from_str(r#"{"id":"1","size":7}"#).expect("parses");
        assert_eq!(f.size, Some(7));
        assert_eq!(confirmed("bytes=0-8388607"), Some(CHUNK));
        assert_eq!(confirmed("bytes=5-9"), None);
    }

    #[test]
    fn refusals_map_by_status_and_reason() {
        let e = refusal(401, None, &google(401, "authError", "Invalid Credentials"), Ctx::Session, now());
        assert!(matches!(&e, SendError::Auth { reply, .. } if reply.code == 535), "{e:?}");
        for (status, reason, after, wait) in [
            (429, "rateLimitExceeded", Some("17"), 17),
            (403, "userRateLimitExceeded", None, 60),
            (403, "rateLimitExceeded", Some("3"), 3),
            (500, "backendError", None, 60),
            (502, "", None, 60),
            (503, "", Some("9"), 9),
            (504, "", None, 60),
        ] {
            let e = refusal(status, after, &google(status, reason, "x"), Ctx::Session, now());
            assert!(
                matches!(&e, SendError::Throttled { retry_after, .. } if *retry_after == Duration::from_secs(wait)),
                "{status} {reason}: {e:?}"
            );
        }
        let r = reply(refusal(403, None, &google(403, "insufficientPermissions", "no"), Ctx::Folder("root"), now()));
        assert!(r.code == 550 && r.text.starts_with("5.7.1 ") && r.text.contains("auth/drive"), "{}", r.text);
        let r = reply(refusal(403, None, &google(403, "storageQuotaExceeded", "full"), Ctx::Folder("root"), now()));
        assert!(r.code == 552 && r.text.starts_with("5.2.2 "), "{}", r.text);
        let r = reply(refusal(404, None, &google(404, "notFound", "File not found: 1x."), Ctx::Folder("1x"), now()));
        assert!(r.code == 550 && r.text.contains("folder 1x") && r.text.contains("supportsAllDrives"), "{}", r.text);
        assert!(is_missing_folder(&SendError::Rejected(r)));
        let r = reply(refusal(404, None, b"", Ctx::Session, now()));
        assert!(!r.is_permanent(), "{}", r.text);
        let r = reply(refusal(400, None, &google(400, "invalid", "Bad"), Ctx::Session, now()));
        assert!(r.is_permanent() && r.text.contains("Bad"), "{}", r.text);
    }

    #[test]
    fn a_session_must_stay_on_the_api_s_origin() {
        let d = DriveApi::new("https://www.googleapis.com", None).expect("builds");
        assert!(d.session_uri(Some("https://www.googleapis.com/upload/drive/v3/files?upload_id=x")).is_ok());
        assert!(d.session_uri(Some("/upload/drive/v3/files?upload_id=y")).is_ok());
        assert!(d.session_uri(Some("https://evil.example/upload?upload_id=x")).is_err());
        assert!(d.session_uri(None).is_err());
        let u = d.url("drive/v3/files", &["a/b"], &["permissions"]);
        assert_eq!(u.as_str(), "https://www.googleapis.com/drive/v3/files/a%2Fb/permissions?supportsAllDrives=true");
    }
}
