//! SharePoint and OneDrive through Microsoft Graph's drives (module [`super`]).
//!
//! One file goes like this (ARCHITECTURE.md, "SharePoint and OneDrive"):
//!
//! 1. The drive: a SharePoint site (`GET /sites/{host}:/sites/{path}`), then its library by
//!    name (`GET /sites/{id}/drives`) or its default one (`/sites/{id}/drive`); a OneDrive by
//!    `GET /users/{user}/drive`. Cached per [`Target`].
//! 2. The folder: each level created by `POST .../items/{parent}/children` with
//!    `conflictBehavior` "fail"; a 409 means it is there (another job may have just made it),
//!    so it is looked up by path and its id used. Cached per drive and path. A 404 from a
//!    cached drive or folder forgets both caches and starts again, once.
//! 3. What is at the file's path now (`GET .../items/{parent}:/{name}`): its eTag and the
//!    server's `Date` go into the [`Step`], so that a later attempt can tell its own file from
//!    one that was there before. With `conflict = "fail"` an existing file stops here.
//! 4. Up to [`SIMPLE_MAX`] bytes: one `PUT .../items/{parent}:/{name}:/content`. Larger: an
//!    upload session (`createUploadSession`), then `PUT`s of [`CHUNK`] bytes (a multiple of
//!    320 KiB, as Graph requires) to its `uploadUrl`, strictly in order, without the token
//!    (the URL authorises by itself, and is never printed: [`SessionUrl`]).
//!
//! # Exactly once
//! The [`Step`] is committed through the job's sink before each step it protects: "put"
//! before the simple PUT, "creating" before the session is created, the upload URL before the
//! first range, and the offset Graph confirmed before each next range. A later attempt:
//! - with an upload URL asks the session where it stands (`GET uploadUrl`,
//!   `nextExpectedRanges`) and continues there;
//! - when the session is gone (finished, or expired), or after a simple PUT that may have
//!   happened, looks for its file ([`GraphDrive`]'s `find_ours`): at the path, the same size
//!   and another eTag than before the upload; with `conflict = "rename"` also at the names
//!   Graph gives (`name 1.pdf`, `name 2.pdf`, ...), created since the upload began. Found: it
//!   is the result, never uploaded again. Not found: a new upload;
//! - in state "creating" without a URL starts a new session: no byte went to the old one,
//!   which expires by itself.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE, DATE};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Conflict, Saved, Target, Upload};
use crate::locks::MutexExt;
use crate::oauth::tokens::AccessToken;
use crate::reply::sanitize_text;
use crate::upstream::classify::UpstreamReply;
use crate::upstream::graph::reply::{graph_error, Answer};
use crate::upstream::graph::{usable_upload_url, SessionUrl};
use crate::upstream::SendError;

/// The largest file a simple `PUT .../content` takes (Graph: 4 MB).
pub const SIMPLE_MAX: u64 = 4 * 1024 * 1024;
/// Upload session ranges must be multiples of this (except the last).
pub const FRAGMENT_UNIT: usize = 320 * 1024;
/// Bytes per upload session `PUT`: 10 MiB, 32 × 320 KiB (Graph takes under 60 MiB).
pub const CHUNK: usize = 32 * FRAGMENT_UNIT;
/// The per-request timeout: a 10 MiB range on a slow uplink.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// How many `name N.ext` a resumed rename looks at.
const RENAME_PROBES: u32 = 20;

/// What a file's upload leaves to resume (committed before each step; module doc).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Step {
    /// Graph's clock (Unix seconds, its `Date`) just before the upload began: a file created
    /// since may be this upload's.
    pub since: i64,
    /// The eTag of what was at the file's path before the upload (`None`: nothing was).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// The simple PUT was (maybe) sent.
    pub put: bool,
    /// The upload session was being created (its URL maybe not saved).
    pub creating: bool,
    /// The upload session, once created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_url: Option<SessionUrl>,
    /// Bytes the session confirmed.
    pub offset: u64,
}

/// Why an attempt did not finish.
enum Fail {
    /// A cached drive or folder is gone (404): forget the caches, once.
    Stale,
    Send(SendError),
}

impl From<SendError> for Fail {
    fn from(e: SendError) -> Fail {
        Fail::Send(e)
    }
}

impl Answer {
    /// The server's clock (`Date`, RFC 9110 6.6.1), Unix seconds.
    fn date(&self) -> Option<i64> {
        let v = self.headers.get(DATE)?.to_str().ok()?;
        Some(chrono::DateTime::parse_from_rfc2822(v).ok()?.timestamp())
    }
}

/// A drive item as far as it matters here.
#[derive(Debug)]
struct Item {
    id: String,
    name: String,
    size: u64,
    web_url: String,
    etag: Option<String>,
    /// `createdDateTime`, Unix seconds.
    created: Option<i64>,
    folder: bool,
}

impl Item {
    fn parse(v: &Value) -> Option<Item> {
        let text = |k: &str| v[k].as_str().map(str::to_string);
        Some(Item {
            id: text("id")?,
            name: text("name").unwrap_or_default(),
            size: v["size"].as_u64().unwrap_or(0),
            web_url: text("webUrl").unwrap_or_default(),
            etag: text("eTag"),
            created: v["createdDateTime"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.timestamp()),
            folder: v.get("folder").is_some_and(|f| !f.is_null()),
        })
    }

    fn saved(self) -> Saved {
        Saved { id: self.id, name: self.name, size: self.size, web_url: self.web_url, link: None }
    }
}

/// Microsoft Graph's drive endpoints.
pub struct GraphDrive {
    base: String,
    http: reqwest::Client,
    /// Drive ids per target.
    drives: Mutex<HashMap<Target, String>>,
    /// Folder ids per (drive, lower-case path).
    folders: Mutex<HashMap<(String, String), String>>,
}

impl GraphDrive {
    /// `base_url`: the provider's Graph (`https://graph.microsoft.com`); `ca_file`: extra CAs.
    pub fn new(base_url: &str, ca_file: Option<&Path>) -> Result<GraphDrive, String> {
        let http = crate::tls::http_client(ca_file.as_slice(), REQUEST_TIMEOUT)?;
        url::Url::parse(base_url).map_err(|e| format!("graph_url {base_url:?}: {e}"))?;
        Ok(GraphDrive {
            base: base_url.trim_end_matches('/').to_string(),
            http,
            drives: Mutex::new(HashMap::new()),
            folders: Mutex::new(HashMap::new()),
        })
    }

    /// Saves one file in the target's folder.
    pub async fn save(&self, token: &AccessToken, up: &Upload<'_, Step>) -> Result<Saved, SendError> {
        // Kept for the second attempt too: its checks ask Graph again and change nothing.
        let resume = up.resume.filter(|s| **s != Step::default());
        for _ in 0..2 {
            match self.attempt(token, up, resume).await {
                Ok(saved) => return Ok(saved),
                Err(Fail::Send(e)) => return Err(e),
                Err(Fail::Stale) => {
                    tracing::warn!("a SharePoint/OneDrive drive or folder vanished; looking it up again");
                    self.forget(up.target);
                }
            }
        }
        Err(SendError::Rejected(UpstreamReply::new(
            451,
            "4.3.0 the drive or folder disappeared twice while the file was being saved",
        )))
    }

    /// An organisation-scoped view link to a saved file.
    pub async fn share(&self, token: &AccessToken, target: &Target, saved: &Saved) -> Result<String, SendError> {
        let drive = self.drive_id(token, target).await?;
        let url = self.url(&["drives", &drive, "items", &saved.id, "createLink"])?;
        let a = self
            .call(self.api(Method::POST, url, token).json(&json!({"type": "view", "scope": "organization"})))
            .await?;
        if !a.ok() {
            if a.status == StatusCode::NOT_FOUND {
                self.forget(target);
            }
            return Err(refusal(&a, target, &format!("a link to \"{}\"", saved.name)));
        }
        match a.json()["link"]["webUrl"].as_str() {
            Some(u) => Ok(u.to_string()),
            None => Err(SendError::Network("Microsoft Graph made a link without a webUrl".into())),
        }
    }

    /// One attempt at [`GraphDrive::save`].
    async fn attempt(&self, token: &AccessToken, up: &Upload<'_, Step>, resume: Option<&Step>) -> Result<Saved, Fail> {
        let drive = self.drive_id(token, up.target).await?;
        let parent = self.folder_id(token, up.target, &drive, &up.file.folder).await?;
        if let Some(s) = resume {
            if let Some(url) = &s.upload_url {
                if let Some(next) = self.session_next(up.target, url).await? {
                    if next < up.file.size {
                        if let Some(saved) = self.upload(up, s.clone(), url, next).await? {
                            return Ok(saved);
                        }
                    }
                }
                if let Some(saved) = self.find_ours(token, up, &drive, &parent, s).await? {
                    return Ok(saved);
                }
            } else if s.put {
                if let Some(saved) = self.find_ours(token, up, &drive, &parent, s).await? {
                    return Ok(saved);
                }
            }
            // "creating" without a URL: no byte went to that session; a new one.
        }
        self.fresh(token, up, &drive, &parent).await
    }

    /// A new upload of the file.
    async fn fresh(
        &self,
        token: &AccessToken,
        up: &Upload<'_, Step>,
        drive: &str,
        parent: &str,
    ) -> Result<Saved, Fail> {
        let name = &up.file.name;
        let (there, date) = self.item_at(token, up.target, drive, parent, name).await?;
        if there.is_some() && up.conflict == Conflict::Fail {
            return Err(Fail::Send(name_taken(name)));
        }
        let mut step = Step {
            since: date.unwrap_or_else(|| chrono::Utc::now().timestamp()),
            before: there.and_then(|i| i.etag),
            ..Step::default()
        };
        if up.file.size <= SIMPLE_MAX {
            step.put = true;
            self.commit(up, &step).await?;
            return self.put_small(token, up, drive, parent).await;
        }
        for round in 0..2 {
            if round > 0 {
                // The session ended under us: it may have finished the file before it did.
                if let Some(saved) = self.find_ours(token, up, drive, parent, &step).await? {
                    return Ok(saved);
                }
            }
            step = Step { creating: true, put: false, upload_url: None, offset: 0, ..step };
            self.commit(up, &step).await?;
            let url = self.create_session(token, up, drive, parent).await?;
            step = Step { creating: false, upload_url: Some(url.clone()), ..step };
            self.commit(up, &step).await?;
            if let Some(saved) = self.upload(up, step.clone(), &url, 0).await? {
                return Ok(saved);
            }
            // The session ended under us (expired): a new one.
        }
        Err(Fail::Send(SendError::Rejected(UpstreamReply::new(
            451,
            "4.3.0 Microsoft Graph ended the upload session twice",
        ))))
    }

    /// Commits `step` before the step it protects.
    async fn commit(&self, up: &Upload<'_, Step>, step: &Step) -> Result<(), SendError> {
        up.sink
            .save(step)
            .await
            .map_err(|e| SendError::Network(format!("could not record the progress of the upload: {e}")))
    }

    fn url(&self, tail: &[&str]) -> Result<url::Url, SendError> {
        let mut u = url::Url::parse(&self.base).map_err(|e| SendError::Network(format!("graph_url: {e}")))?;
        u.path_segments_mut()
            .map_err(|_| SendError::Network("graph_url cannot be a base".into()))?
            .pop_if_empty()
            .push("v1.0")
            .extend(tail);
        Ok(u)
    }

    /// A request to Graph itself, with the token.
    fn api(&self, method: Method, url: url::Url, token: &AccessToken) -> reqwest::RequestBuilder {
        self.http.request(method, url).bearer_auth(&token.secret)
    }

    async fn call(&self, req: reqwest::RequestBuilder) -> Result<Answer, SendError> {
        Answer::of(req).await
    }

    fn forget(&self, target: &Target) {
        if let Some(drive) = self.drives.locked().remove(target) {
            self.folders.locked().retain(|(d, _), _| *d != drive);
        }
    }

    /// The target's drive id (cached).
    async fn drive_id(&self, token: &AccessToken, target: &Target) -> Result<String, SendError> {
        if let Some(d) = self.drives.locked().get(target) {
            return Ok(d.clone());
        }
        let id = match target {
            Target::Sharepoint { site, library } => {
                let mut tail = vec!["sites"];
                tail.extend(site.split('/'));
                let a = self.call(self.api(Method::GET, self.url(&tail)?, token)).await?;
                let what = format!("SharePoint site {site}");
                let site_id = found_id(&a, target, &what)?;
                match library {
                    None => {
                        let url = self.url(&["sites", &site_id, "drive"])?;
                        let a = self.call(self.api(Method::GET, url, token)).await?;
                        found_id(&a, target, &format!("the default library of {what}"))?
                    }
                    Some(lib) => self.library(token, target, &site_id, site, lib).await?,
                }
            }
            Target::Onedrive { user } => {
                let url = self.url(&["users", user, "drive"])?;
                let a = self.call(self.api(Method::GET, url, token)).await?;
                found_id(&a, target, &format!("the OneDrive of {user}"))?
            }
            Target::GoogleDrive { .. } => {
                return Err(SendError::Rejected(UpstreamReply::new(
                    554,
                    "5.3.5 a Google Drive destination went to Microsoft Graph",
                )))
            }
        };
        self.drives.locked().insert(target.clone(), id.clone());
        Ok(id)
    }

    /// A site's document library by name (`GET /sites/{id}/drives`, every page).
    async fn library(
        &self,
        token: &AccessToken,
        target: &Target,
        site_id: &str,
        site: &str,
        lib: &str,
    ) -> Result<String, SendError> {
        let mut url = self.url(&["sites", site_id, "drives"])?;
        let mut names = Vec::new();
        for _ in 0..20 {
            let a = self.call(self.api(Method::GET, url.clone(), token)).await?;
            if !a.ok() {
                return Err(refusal(&a, target, &format!("the libraries of SharePoint site {site}")));
            }
            let v = a.json();
            for d in v["value"].as_array().into_iter().flatten() {
                let name = d["name"].as_str().unwrap_or_default();
                if name.eq_ignore_ascii_case(lib) {
                    if let Some(id) = d["id"].as_str() {
                        return Ok(id.to_string());
                    }
                }
                names.push(sanitize_text(name, 60));
            }
            // The next page, only on Graph itself (the token goes with it).
            match v["@odata.nextLink"].as_str().and_then(|n| url::Url::parse(n).ok()) {
                Some(next) if next.as_str().starts_with(&format!("{}/", self.base)) => url = next,
                _ => break,
            }
        }
        Err(SendError::Rejected(UpstreamReply::new(
            550,
            format!(
                "5.1.1 SharePoint site {site} has no document library named \"{}\" (it has: {})",
                sanitize_text(lib, 80),
                names.join(", ")
            ),
        )))
    }

    /// The folder's id, each level created when missing (cached).
    async fn folder_id(
        &self,
        token: &AccessToken,
        target: &Target,
        drive: &str,
        folder: &[String],
    ) -> Result<String, Fail> {
        let mut parent = "root".to_string();
        for i in 0..folder.len() {
            let key = (drive.to_string(), folder[..=i].join("/").to_lowercase());
            if let Some(id) = self.folders.locked().get(&key) {
                parent = id.clone();
                continue;
            }
            let id = self.make_folder(token, target, drive, &parent, &folder[i]).await?;
            self.folders.locked().insert(key, id.clone());
            parent = id;
        }
        Ok(parent)
    }

    /// Creates folder `name` under `parent`, or finds the one there.
    async fn make_folder(
        &self,
        token: &AccessToken,
        target: &Target,
        drive: &str,
        parent: &str,
        name: &str,
    ) -> Result<String, Fail> {
        let url = self.url(&["drives", drive, "items", parent, "children"])?;
        let body = json!({"name": name, "folder": {}, "@microsoft.graph.conflictBehavior": "fail"});
        let a = self.call(self.api(Method::POST, url, token).json(&body)).await?;
        match a.status.as_u16() {
            _ if a.ok() => match Item::parse(&a.json()) {
                Some(i) => Ok(i.id),
                None => Err(Fail::Send(SendError::Network("Microsoft Graph made a folder without an id".into()))),
            },
            // There already (maybe made by another job just now): that one.
            409 => match self.item_at(token, target, drive, parent, name).await?.0 {
                Some(i) if i.folder => Ok(i.id),
                Some(_) => Err(Fail::Send(SendError::Rejected(UpstreamReply::new(
                    550,
                    format!("5.2.0 \"{}\" is a file where the folder should be", sanitize_text(name, 120)),
                )))),
                None => Err(Fail::Send(SendError::Rejected(UpstreamReply::new(
                    451,
                    format!("4.3.0 folder \"{}\" was there and then gone", sanitize_text(name, 120)),
                )))),
            },
            404 => Err(Fail::Stale),
            _ => Err(Fail::Send(refusal(&a, target, &format!("folder \"{}\"", sanitize_text(name, 120))))),
        }
    }

    /// The item at `parent:/name` (`None`: nothing there), and Graph's clock.
    async fn item_at(
        &self,
        token: &AccessToken,
        target: &Target,
        drive: &str,
        parent: &str,
        name: &str,
    ) -> Result<(Option<Item>, Option<i64>), SendError> {
        let url = self.url(&["drives", drive, "items", &format!("{parent}:"), name])?;
        let a = self.call(self.api(Method::GET, url, token)).await?;
        match a.status.as_u16() {
            404 => Ok((None, a.date())),
            _ if a.ok() => Ok((Item::parse(&a.json()), a.date())),
            _ => Err(refusal(&a, target, &format!("\"{}\"", sanitize_text(name, 120)))),
        }
    }

    /// The file as a finished earlier attempt left it, if it did (module doc).
    async fn find_ours(
        &self,
        token: &AccessToken,
        up: &Upload<'_, Step>,
        drive: &str,
        parent: &str,
        s: &Step,
    ) -> Result<Option<Saved>, Fail> {
        let (name, size) = (&up.file.name, up.file.size);
        let (there, _) = self.item_at(token, up.target, drive, parent, name).await?;
        let Some(there) = there else { return Ok(None) };
        if !there.folder && there.size == size && there.etag != s.before {
            return Ok(Some(there.saved()));
        }
        if up.conflict != Conflict::Rename {
            return Ok(None);
        }
        // Graph renamed it: `name 1.pdf`, `name 2.pdf`, ... (the first free one then).
        for n in 1..=RENAME_PROBES {
            let candidate = renamed(name, n);
            match self.item_at(token, up.target, drive, parent, &candidate).await?.0 {
                None => break,
                Some(i) if !i.folder && i.size == size && i.created.is_some_and(|c| c >= s.since) => {
                    return Ok(Some(i.saved()))
                }
                Some(_) => {}
            }
        }
        Ok(None)
    }

    /// The whole file by one `PUT .../content`.
    async fn put_small(
        &self,
        token: &AccessToken,
        up: &Upload<'_, Step>,
        drive: &str,
        parent: &str,
    ) -> Result<Saved, Fail> {
        let size = up.file.size;
        let mut rx = up.bytes.chunks(0, usize::try_from(size).unwrap_or(usize::MAX).max(1));
        let mut body = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        while let Some(c) = rx.recv().await {
            body.extend_from_slice(&c.map_err(read_error)?);
        }
        if body.len() as u64 != size {
            return Err(Fail::Send(short(&up.file.name, body.len() as u64, size)));
        }
        let mut url =
            self.url(&["drives", drive, "items", &format!("{parent}:"), &format!("{}:", up.file.name), "content"])?;
        url.set_query(Some(&format!("@microsoft.graph.conflictBehavior={}", up.conflict.as_str())));
        let req = self.api(Method::PUT, url, token).header(CONTENT_TYPE, &up.file.content_type).body(body);
        let a = self.call(req).await?;
        self.finished(&a, up)
    }

    /// A driveItem answer to the end of an upload.
    fn finished(&self, a: &Answer, up: &Upload<'_, Step>) -> Result<Saved, Fail> {
        match a.status.as_u16() {
            _ if a.ok() => match Item::parse(&a.json()) {
                Some(i) => Ok(i.saved()),
                None => Err(Fail::Send(SendError::Network("Microsoft Graph saved a file without an id".into()))),
            },
            404 => Err(Fail::Stale),
            409 if up.conflict == Conflict::Fail => Err(Fail::Send(name_taken(&up.file.name))),
            _ => Err(Fail::Send(refusal(a, up.target, &format!("\"{}\"", sanitize_text(&up.file.name, 120))))),
        }
    }

    async fn create_session(
        &self,
        token: &AccessToken,
        up: &Upload<'_, Step>,
        drive: &str,
        parent: &str,
    ) -> Result<SessionUrl, Fail> {
        let url = self.url(&[
            "drives",
            drive,
            "items",
            &format!("{parent}:"),
            &format!("{}:", up.file.name),
            "createUploadSession",
        ])?;
        let body = json!({"item": {"@microsoft.graph.conflictBehavior": up.conflict.as_str(), "name": up.file.name}});
        let a = self.call(self.api(Method::POST, url, token).json(&body)).await?;
        match a.status.as_u16() {
            _ if a.ok() => match a.json()["uploadUrl"].as_str() {
                Some(u) if usable_upload_url(&self.base, u) => Ok(SessionUrl(u.to_string())),
                _ => Err(Fail::Send(SendError::Network("Microsoft Graph gave no usable uploadUrl".into()))),
            },
            404 => Err(Fail::Stale),
            409 if up.conflict == Conflict::Fail => Err(Fail::Send(name_taken(&up.file.name))),
            _ => Err(Fail::Send(refusal(&a, up.target, &format!("\"{}\"", sanitize_text(&up.file.name, 120))))),
        }
    }

    /// Where an upload session stands: the next byte it expects; `None` when it is over
    /// (finished or expired).
    async fn session_next(&self, target: &Target, url: &SessionUrl) -> Result<Option<u64>, SendError> {
        let a = self.call(self.http.get(&url.0)).await?;
        match a.status.as_u16() {
            _ if a.ok() => Ok(next_expected(&a.json())),
            404 | 410 => Ok(None),
            // Not a verdict on the session: ask again later.
            _ => Err(refusal(&a, target, "the upload session")),
        }
    }

    /// PUTs the file from `from` on, [`CHUNK`] bytes at a time, without Authorization;
    /// the offset Graph confirms is committed before the next range. `None`: the session
    /// ended under us.
    async fn upload(
        &self,
        up: &Upload<'_, Step>,
        mut step: Step,
        url: &SessionUrl,
        from: u64,
    ) -> Result<Option<Saved>, Fail> {
        let size = up.file.size;
        let mut at = from;
        if step.offset != at {
            step.offset = at;
            self.commit(up, &step).await?;
        }
        let mut rx = up.bytes.chunks(at, CHUNK);
        let mut realigned = 0;
        loop {
            let chunk = rx.recv().await.unwrap_or_else(|| Ok(Vec::new())).map_err(read_error)?;
            if chunk.is_empty() {
                return Err(Fail::Send(short(&up.file.name, at, size)));
            }
            let end = at + chunk.len() as u64;
            if end > size {
                return Err(Fail::Send(short(&up.file.name, end, size)));
            }
            let req = self
                .http
                .put(&url.0)
                .header(CONTENT_RANGE, format!("bytes {}-{}/{}", at, end - 1, size))
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(chunk);
            let a = self.call(req).await?;
            let next = match a.status.as_u16() {
                200 | 201 if end == size => return self.finished(&a, up).map(Some),
                202 => next_expected(&a.json()).unwrap_or(end),
                404 | 410 => return Ok(None),
                // Not the range the session expects (a resumed attempt raced another): ask it.
                416 if realigned < 3 => {
                    realigned += 1;
                    match self.session_next(up.target, url).await? {
                        Some(n) => n,
                        None => return Ok(None),
                    }
                }
                _ if a.ok() => {
                    return Err(Fail::Send(SendError::Network(format!(
                        "Microsoft Graph answered HTTP {} to bytes {at}-{} of {size}",
                        a.status.as_u16(),
                        end - 1
                    ))))
                }
                _ => return self.finished(&a, up).map(Some),
            };
            if next >= size {
                return Ok(None);
            }
            if next != end {
                rx = up.bytes.chunks(next, CHUNK);
            }
            at = next;
            step.offset = at;
            self.commit(up, &step).await?;
        }
    }
}

/// The id in a site or drive answer; 404: the thing named `what` does not exist.
fn found_id(a: &Answer, target: &Target, what: &str) -> Result<String, SendError> {
    if a.status == StatusCode::NOT_FOUND {
        return Err(SendError::Rejected(UpstreamReply::new(
            550,
            format!("5.1.1 {} not found ({})", sanitize_text(what, 200), detail(a)),
        )));
    }
    if !a.ok() {
        return Err(refusal(a, target, what));
    }
    a.json()["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| SendError::Network(format!("Microsoft Graph answered without an id for {what}")))
}

/// A file of this name is there and `conflict = "fail"`.
fn name_taken(name: &str) -> SendError {
    SendError::Rejected(UpstreamReply::new(
        550,
        format!(
            "5.2.0 \"{}\" is already in the folder and the destination says conflict = \"fail\" (\"rename\" or \"replace\" would save it)",
            sanitize_text(name, 120)
        ),
    ))
}

/// `name N.ext`, as Graph renames.
fn renamed(name: &str, n: u32) -> String {
    match name.rfind('.') {
        Some(dot) if dot > 0 => format!("{} {n}{}", &name[..dot], &name[dot..]),
        _ => format!("{name} {n}"),
    }
}

/// The first byte of the first `nextExpectedRanges` entry (`"7864320-"`, `"0-4194303"`).
fn next_expected(v: &Value) -> Option<u64> {
    v["nextExpectedRanges"].as_array()?.first()?.as_str()?.split('-').next()?.trim().parse().ok()
}

/// `code: message`, or the status when Graph said nothing.
fn detail(a: &Answer) -> String {
    let (code, message) = graph_error(&a.body);
    match (code.is_empty(), message.is_empty()) {
        (true, _) => format!("HTTP {}", a.status.as_u16()),
        (false, true) => code,
        (false, false) => format!("{code}: {message}"),
    }
}

/// The error for an answer that is not a success, about `what` (a site, a folder, a file).
fn refusal(a: &Answer, target: &Target, what: &str) -> SendError {
    let status = a.status.as_u16();
    let code = a.code();
    let d = detail(a);
    let rejected = |smtp: u16, text: String| SendError::Rejected(UpstreamReply::new(smtp, text));
    match status {
        // The app may read but not write, or not even see the site.
        403 => rejected(550, format!("5.7.1 Microsoft Graph refused access to {what} ({d}); {}", access_hint(target))),
        507 => rejected(552, format!("5.2.2 the library is full: {what} not saved ({d})")),
        _ if code == "quotaLimitReached" => rejected(552, format!("5.2.2 the library is full: {what} not saved ({d})")),
        _ => a.error(),
    }
}

/// What the admin grants for writing to the target (README.md, "SharePoint and OneDrive").
fn access_hint(target: &Target) -> &'static str {
    match target {
        Target::Onedrive { .. } => {
            "writing to a user's OneDrive needs Files.ReadWrite.All (application, admin consent)"
        }
        _ => {
            "app-only SharePoint needs Sites.Selected plus a write grant on this site \
             (POST /sites/{site-id}/permissions with roles [\"write\"])"
        }
    }
}

/// A file that gave fewer (or more) bytes than counted: the same every attempt.
fn short(name: &str, at: u64, size: u64) -> SendError {
    SendError::Rejected(UpstreamReply::new(
        554,
        format!("5.6.0 file \"{}\" gave {at} bytes; {size} were counted", sanitize_text(name, 120)),
    ))
}

fn read_error(e: std::io::Error) -> Fail {
    Fail::Send(SendError::Network(format!("reading the file to upload: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).expect("status"),
            headers: reqwest::header::HeaderMap::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn rejected(e: SendError) -> UpstreamReply {
        match e {
            SendError::Rejected(r) => r,
            other => panic!("not rejected: {other:?}"),
        }
    }

    /// Jobs run on spawned tasks: what they await must be Send.
    #[allow(dead_code)]
    fn futures_are_send(d: &GraphDrive, t: &AccessToken, up: &Upload<'_, Step>, target: &Target, s: &Saved) {
        fn send<T: Send>(_: T) {}
        send(d.save(t, up));
        send(d.share(t, target, s));
    }

    #[test]
    fn chunks_are_320_kib_multiples_under_60_mib() {
        const { assert!(CHUNK.is_multiple_of(FRAGMENT_UNIT) && CHUNK < 60 << 20 && FRAGMENT_UNIT == 327_680) };
        assert_eq!(SIMPLE_MAX, 4_194_304);
    }

    #[test]
    fn step_round_trips_and_hides_the_upload_url() {
        let s = Step {
            since: 1_800_000_000,
            before: Some("\"{A},1\"".into()),
            put: false,
            creating: false,
            upload_url: Some(SessionUrl("https://contoso.sharepoint.com/up?tempauth=SECRET".into())),
            offset: 10_485_760,
        };
        let text = serde_json::to_string(&s).expect("serializes");
        assert_eq!(serde_json::from_str::<Step>(&text).expect("reads"), s);
        assert!(!format!("{s:?}").contains("SECRET"));
        assert_eq!(serde_json::from_str::<Step>("{}").expect("reads"), Step::default());
    }

    #[test]
    fn renamed_names_are_graphs() {
        assert_eq!(renamed("scan.pdf", 1), "scan 1.pdf");
        assert_eq!(renamed("a.b.pdf", 2), "a.b 2.pdf");
        assert_eq!(renamed("README", 3), "README 3");
        assert_eq!(renamed(".hidden", 1), ".hidden 1");
        assert_eq!(next_expected(&json!({"nextExpectedRanges": ["12345-"]})), Some(12345));
        assert_eq!(next_expected(&json!({"nextExpectedRanges": ["0-327679", "655360-"]})), Some(0));
        assert_eq!(next_expected(&json!({})), None);
    }

    #[test]
    fn drive_refusals_say_what_to_do() {
        let sp = Target::Sharepoint { site: "contoso.sharepoint.com:/sites/scans".into(), library: None };
        let od = Target::Onedrive { user: "a@contoso.com".into() };
        let denied = answer(403, r#"{"error":{"code":"accessDenied","message":"Access denied"}}"#);
        let r = rejected(refusal(&denied, &sp, "\"x.pdf\""));
        assert_eq!((r.code, r.status().map(|s| (s.0, s.1, s.2))), (550, Some((5, 7, 1))));
        assert!(r.text.contains("Sites.Selected") && r.text.contains("/permissions"), "{}", r.text);
        assert!(rejected(refusal(&denied, &od, "x")).text.contains("Files.ReadWrite.All"));
        let full = answer(507, r#"{"error":{"code":"quotaLimitReached","message":"Insufficient Space Available"}}"#);
        let r = rejected(refusal(&full, &sp, "\"x.pdf\""));
        assert!(r.code == 552 && r.text.starts_with("5.2.2 the library is full"), "{}", r.text);
        let locked = answer(423, r#"{"error":{"code":"resourceLocked","message":"locked"}}"#);
        assert!(!rejected(refusal(&locked, &sp, "x")).is_permanent());
        let mut throttled = answer(429, r#"{"error":{"code":"activityLimitReached","message":"slow down"}}"#);
        throttled.headers.insert(reqwest::header::RETRY_AFTER, "9".parse().expect("header"));
        assert!(
            matches!(refusal(&throttled, &sp, "x"), SendError::Throttled { retry_after, .. } if retry_after == Duration::from_secs(9))
        );
        assert!(matches!(refusal(&answer(401, ""), &sp, "x"), SendError::Auth { .. }));
        let gone = answer(404, r#"{"error":{"code":"itemNotFound","message":"The resource could not be found."}}"#);
        let r = rejected(found_id(&gone, &sp, "SharePoint site contoso.sharepoint.com:/sites/nope").unwrap_err());
        assert!(
            r.code == 550 && r.text.starts_with("5.1.1 SharePoint site") && r.text.contains("not found"),
            "{}",
            r.text
        );
        let r = rejected(name_taken("scan.pdf"));
        assert!(r.is_permanent() && r.text.contains("conflict = \"fail\"") && r.text.contains("scan.pdf"));
    }

    #[test]
    fn an_upload_url_must_be_https_when_graph_is() {
        assert!(usable_upload_url("https://graph.microsoft.com", "https://contoso.sharepoint.com/_api/up?tempauth=t"));
        assert!(!usable_upload_url("https://graph.microsoft.com", "http://contoso.sharepoint.com/up"));
        assert!(usable_upload_url("http://127.0.0.1:5000", "http://127.0.0.1:5000/upload/s1"));
    }
}
