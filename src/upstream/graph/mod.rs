//! Sending through Microsoft Graph (`Mail.Send`), for tenants where SMTP AUTH is off.
//!
//! Graph takes at most about 3 MB per request (a larger POST body gets 413), and a printer's
//! scan is usually larger. So (ARCHITECTURE.md, "Graph and the Gmail API"):
//!
//! - A message whose base64 fits in one request goes by `POST /users/{mailbox}/sendMail` with
//!   the base64 MIME as `text/plain`; 202 is success.
//! - A larger one becomes a draft: `POST /users/{mailbox}/messages` with the MIME less its
//!   top-level attachments ([`crate::message::attachments`]), then each attachment, one at a
//!   time: under [`UPLOAD_MIN`] by `POST .../messages/{id}/attachments` (a JSON fileAttachment),
//!   from there up to [`MAX_ATTACHMENT`] by `createUploadSession` and `PUT`s of at most
//!   [`RANGE`] bytes to the session's `uploadUrl` (pre-authenticated: no Authorization header
//!   goes there). Then `POST .../messages/{id}/send`.
//!
//! Steps reported to the observer (`mfd-relay test`): `graph-send`; or `draft`,
//! `attachment i/n` (each), `recipients` (the draft's lists set to the envelope), `draft-state` (after
//! a restart in state "sending"), `send`.
//!
//! # Exactly once
//! Before each step the state is saved through the message's [`ProgressSink`] ([`Resume`]):
//! "creating" before the draft POST, the draft id right after it, the attachment under way
//! (and its upload URL and offset after each range), each finished attachment, "sending" before
//! the final send. A new attempt continues from there: the same draft, the upload session's
//! `nextExpectedRanges` (or a new session), and an attachment under way that may have
//! arrived is looked for on the draft by name before it is added again. In state "sending",
//! `GET .../messages/{id}` decides: 404 `ErrorItemNotFound` means it was sent (a sent draft
//! leaves Drafts and its id stops working; any other 404 is an error, never "sent"), still a
//! draft means the send never happened, so it is sent now, and a 404 to that send means the
//! earlier one went through. A state in "sending" is never reset, whatever else it says. A
//! draft that is gone before any send (deleted by someone) is started again, once.
//!
//! # Recipients
//! Before "sending", the draft's `toRecipients`, `ccRecipients` and `bccRecipients` are set
//! (`PATCH`) to the envelope's plan ([`Outgoing::plan`]): Graph fills a draft's lists from the
//! MIME as it reads it and need not keep a Bcc. A small message whose header named addresses
//! outside the envelope ([`crate::message::recipients::Plan::dropped`]) goes this way too.
//! A draft refused permanently (before any send was attempted) is deleted, best effort.
//!
//! What remains:
//! - A crash after the draft POST and before its id is saved leaves an orphan draft (never a
//!   second send): the next attempt logs a warning with the Message-ID and makes a new draft.
//!   It is not deleted by Message-ID: a device that sends one transaction per recipient makes
//!   several queued messages with one Message-ID, and another one's draft must not be touched.
//! - A crash right after Graph answered 202 to the send, while Graph still shows the item as a
//!   draft: the next attempt waits until [`SETTLE`] after "sending" was saved before it
//!   believes a draft that is still there.
//! - `sendMail` is one request: a crash after Graph accepted it and before the queue recorded
//!   it sends again, as SMTP does after a lost reply to the final dot (RFC 5321 6.1).
//!
//! # Memory
//! The message is read from the spool in ranges ([`Outgoing`] as an attachments
//! [`Source`]): scanned a block at a time for its attachments, the rest (at most 2.3 MB) built
//! in memory, each attachment decoded one upload range (3.75 MiB) at a time. An attachment
//! under 2 MiB is decoded whole for its JSON request, a small message read whole for sendMail.
//! Reads and decoding run on blocking threads; an upload keeps one range ahead at most.

pub(crate) mod reply;

use reply::Answer;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Semaphore;

use super::api::{Outbound, Progress};
use super::classify::UpstreamReply;
use super::client::{SendError, SendOutcome};
use super::recipients::Outgoing;
use super::trace::emit;
use crate::locks::MutexExt;
use crate::message::attachments::{self, Attachment, Source};
use crate::oauth::tokens::AccessToken;

pub use reply::DEFAULT_RETRY_AFTER;

/// The largest request body Graph takes (measured: 3,145,611 bytes; 413 above).
pub const MAX_POST: usize = 3_145_611;
/// Upload sessions refuse files under this size
/// (`ErrorAttachmentSizeShouldNotBeLessThanMinimumSize`); smaller ones go as JSON, whose
/// base64 (2.8 MB at most) fits in [`MAX_POST`].
pub const UPLOAD_MIN: u64 = 2_097_152;
/// The largest attachment an upload session takes.
pub const MAX_ATTACHMENT: u64 = 150 * 1000 * 1000;
/// Bytes per upload `PUT`: at most 4 MiB; 12 × 320 KiB, a multiple of 3 so that each range
/// decodes from whole base64 quantums.
pub const RANGE: usize = 12 * 320 * 1024;
/// Graph's concurrent requests per mailbox (more get 429 `MailboxConcurrency`).
pub const PER_MAILBOX: usize = 4;
/// How long after the send a draft that is still there is taken for unsent.
pub const SETTLE: Duration = Duration::from_secs(30);
/// The per-request timeout: a 4 MiB range on a slow uplink.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// An upload session's URL: it authorises the upload by itself, so it is never printed.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SessionUrl(pub String);

impl std::fmt::Debug for SessionUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionUrl(..)")
    }
}

/// The attachment being added to the draft.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Adding {
    /// Its index among the attachments taken out of the message.
    pub index: usize,
    /// Its upload session, once created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_url: Option<SessionUrl>,
    /// Bytes the upload session has taken.
    pub offset: u64,
}

/// What a Graph send leaves to resume after a crash (module doc, "Exactly once").
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Resume {
    /// How many attachments were taken out of the message (another count: another plan).
    pub parts: usize,
    /// The draft POST was started (its id may not have been saved).
    pub creating: bool,
    /// The draft's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draft: Option<String>,
    /// Indexes of the attachments on the draft.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub done: Vec<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adding: Option<Adding>,
    /// The send was (maybe) started; since when (Unix seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sending_since: Option<i64>,
}

/// How a message goes: what [`plan`] decides.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// One `sendMail` (should Graph still answer 413, the draft path).
    Small,
    /// A draft, then these attachments one at a time.
    Large { rest: Vec<u8>, attachments: Vec<Attachment> },
}

/// base64's length for `n` bytes.
fn b64_len(n: usize) -> usize {
    n.div_ceil(3).saturating_mul(4)
}

/// How `mime` goes through Graph, or why it cannot (`Rejected`, permanently).
pub fn plan<S: Source + ?Sized>(mime: &S) -> Result<Plan, SendError> {
    if b64_len(usize::try_from(mime.size()).unwrap_or(usize::MAX)) <= MAX_POST {
        return Ok(Plan::Small);
    }
    let (rest, attachments) = split(mime)?;
    if b64_len(rest.len()) > MAX_POST {
        return Err(SendError::Rejected(UpstreamReply::new(
            552,
            format!(
                "5.3.4 Microsoft Graph takes at most {MAX_POST} bytes per request; without its {} attachments the message is still {} bytes",
                attachments.len(),
                rest.len()
            ),
        )));
    }
    if let Some(a) = attachments.iter().find(|a| a.size > MAX_ATTACHMENT) {
        return Err(SendError::Rejected(UpstreamReply::new(
            552,
            format!(
                "5.3.4 attachment \"{}\" is {} bytes; Microsoft Graph takes at most {MAX_ATTACHMENT}",
                a.name, a.size
            ),
        )));
    }
    Ok(Plan::Large { rest, attachments })
}

/// The message without its top-level attachments, and those attachments.
fn split<S: Source + ?Sized>(mime: &S) -> Result<(Vec<u8>, Vec<Attachment>), SendError> {
    let parts = attachments::find(mime).map_err(spool)?;
    let all: Vec<&Attachment> = parts.attachments.iter().collect();
    let rest = attachments::without(mime, &parts, &all).map_err(spool)?;
    Ok((rest, parts.attachments))
}

fn spool(e: std::io::Error) -> SendError {
    SendError::Network(format!("reading the spooled message: {e}"))
}

/// The message as it goes out, read in ranges from the spool.
impl Source for Outgoing {
    fn size(&self) -> u64 {
        self.len()
    }

    fn read(&self, start: u64, len: usize) -> std::io::Result<Vec<u8>> {
        self.read_range(start, len)
    }
}

/// Why a step of the draft path did not finish.
enum Fail {
    /// The draft is gone (404): start again.
    Gone,
    Send(SendError),
}

impl From<SendError> for Fail {
    fn from(e: SendError) -> Fail {
        Fail::Send(e)
    }
}

impl Answer {
    /// A 404 that says the item (draft, attachment) is gone: Graph's `ErrorItemNotFound`.
    /// Other 404s (`ErrorInvalidUser`, `MailboxNotEnabledForRESTAPI`, one without a body)
    /// say nothing about the draft.
    fn item_not_found(&self) -> bool {
        self.status == StatusCode::NOT_FOUND && self.code() == "ErrorItemNotFound"
    }

    /// The error for a 404 that is not [`Answer::item_not_found`] where the item's fate
    /// matters: Graph's own mapping when it names a known code, else transient (never
    /// "delivered", never a bounce on a guess).
    fn error_not_gone(&self) -> SendError {
        match self.error() {
            SendError::Rejected(r) if r.code == 554 => SendError::Rejected(UpstreamReply::new(
                451,
                format!("4.3.0 Microsoft Graph answered HTTP {} ({})", self.status.as_u16(), r.text),
            )),
            e => e,
        }
    }
}

/// A Graph endpoint (one per provider).
pub struct Graph {
    base: String,
    http: reqwest::Client,
    /// One semaphore per mailbox: at most [`PER_MAILBOX`] requests in flight.
    permits: Mutex<HashMap<String, Arc<Semaphore>>>,
    settle: Duration,
}

impl Graph {
    /// `base_url`: e.g. `https://graph.microsoft.com`; `ca_file`: extra CAs to trust.
    pub fn new(base_url: &str, ca_file: Option<&Path>) -> Result<Graph, String> {
        let http = crate::tls::http_client(ca_file.as_slice(), REQUEST_TIMEOUT)?;
        url::Url::parse(base_url).map_err(|e| format!("graph_url {base_url:?}: {e}"))?;
        Ok(Graph {
            base: base_url.trim_end_matches('/').to_string(),
            http,
            permits: Mutex::new(HashMap::new()),
            settle: SETTLE,
        })
    }

    /// The same endpoint believing a draft left after a send sooner than [`SETTLE`] (tests).
    pub fn with_settle(mut self, settle: Duration) -> Graph {
        self.settle = settle;
        self
    }

    /// Sends `msg` as `msg.mailbox` with a Graph token, to exactly the envelope's recipients.
    pub async fn send(&self, token: &AccessToken, msg: &Outbound<'_>) -> Result<SendOutcome, SendError> {
        // The message as it must go out: its header names exactly the envelope's recipients.
        // Read from the spool in ranges as it goes (module doc, "Memory").
        let (path, rcpts) = (msg.body.to_path_buf(), msg.env.rcpts.to_vec());
        let blocking = |e: tokio::task::JoinError| SendError::Network(format!("reading the spooled message: {e}"));
        let out = tokio::task::spawn_blocking(move || Outgoing::open(&path, &rcpts))
            .await
            .map_err(blocking)?
            .map_err(spool)?;
        let resume = match msg.progress {
            Progress::Graph(r) if *r != Resume::default() => Some(r.clone()),
            _ => None,
        };
        let scan = out.clone();
        let plan = tokio::task::spawn_blocking(move || -> Result<Plan, SendError> {
            match plan(&scan)? {
                // The header named addresses outside the envelope: sendMail would take the
                // recipients from the MIME as Graph reads it, so the draft path, whose lists
                // are set to the envelope explicitly (`set_recipients`).
                Plan::Small if scan.plan.dropped => {
                    let (rest, attachments) = split(&scan)?;
                    Ok(Plan::Large { rest, attachments })
                }
                p => Ok(p),
            }
        })
        .await
        .map_err(blocking)??;
        match (plan, resume) {
            (Plan::Small, None) => {
                let whole = out.clone();
                let mime =
                    tokio::task::spawn_blocking(move || whole.read_all()).await.map_err(blocking)?.map_err(spool)?;
                match self.send_small(token, msg, &mime).await? {
                    Some(sent) => Ok(sent),
                    // Graph found it too large for one request after all: the draft path, if
                    // the message has attachments to take out.
                    None => {
                        let scan = out.clone();
                        let (rest, atts) =
                            tokio::task::spawn_blocking(move || split(&scan)).await.map_err(blocking)??;
                        if atts.is_empty() || b64_len(rest.len()) > MAX_POST {
                            return Err(SendError::Rejected(UpstreamReply::new(
                                552,
                                "5.3.4 Microsoft Graph refused the message as too large for one request (HTTP 413)",
                            )));
                        }
                        self.send_large(token, msg, &out, &rest, &atts, Resume::default()).await
                    }
                }
            }
            // A draft was started for this message: it is finished, whatever the size now.
            (Plan::Small, Some(r)) => {
                let scan = out.clone();
                let (rest, atts) = tokio::task::spawn_blocking(move || split(&scan)).await.map_err(blocking)??;
                self.send_large(token, msg, &out, &rest, &atts, r).await
            }
            (Plan::Large { rest, attachments }, r) => {
                self.send_large(token, msg, &out, &rest, &attachments, r.unwrap_or_default()).await
            }
        }
    }

    fn url(&self, mailbox: &str, tail: &[&str]) -> Result<url::Url, SendError> {
        let mut u = url::Url::parse(&self.base).map_err(|e| SendError::Network(format!("graph_url: {e}")))?;
        u.path_segments_mut()
            .map_err(|_| SendError::Network("graph_url cannot be a base".into()))?
            .pop_if_empty()
            .extend(["v1.0", "users", mailbox])
            .extend(tail);
        Ok(u)
    }

    fn semaphore(&self, mailbox: &str) -> Arc<Semaphore> {
        self.permits
            .locked()
            .entry(mailbox.to_ascii_lowercase())
            .or_insert_with(|| Arc::new(Semaphore::new(PER_MAILBOX)))
            .clone()
    }

    /// One request, holding one of the mailbox's permits while it is in flight.
    async fn call(&self, mailbox: &str, req: reqwest::RequestBuilder) -> Result<Answer, SendError> {
        let sem = self.semaphore(mailbox);
        let _permit = sem.acquire().await.map_err(|_| SendError::Network("shutting down".into()))?;
        Answer::of(req).await
    }

    /// A request to Graph itself, with the token.
    fn api(&self, method: Method, url: url::Url, token: &AccessToken) -> reqwest::RequestBuilder {
        self.http.request(method, url).bearer_auth(&token.secret)
    }

    async fn save(&self, msg: &Outbound<'_>, r: &Resume) -> Result<(), SendError> {
        msg.sink
            .save(&Progress::Graph(r.clone()))
            .await
            .map_err(|e| SendError::Network(format!("could not record the progress of the Graph send: {e}")))
    }

    fn outcome(msg: &Outbound<'_>, how: &str) -> SendOutcome {
        SendOutcome {
            accepted: msg.env.rcpts.to_vec(),
            refused: Vec::new(),
            reply: Some(UpstreamReply::new(250, format!("2.0.0 {how} accepted by Microsoft Graph"))),
        }
    }

    async fn send_small(
        &self,
        token: &AccessToken,
        msg: &Outbound<'_>,
        mime: &[u8],
    ) -> Result<Option<SendOutcome>, SendError> {
        let t = Instant::now();
        let url = self.url(msg.mailbox, &["sendMail"])?;
        let req = self.api(Method::POST, url, token).header(CONTENT_TYPE, "text/plain").body(STANDARD.encode(mime));
        let a = self.call(msg.mailbox, req).await;
        let ok = matches!(&a, Ok(a) if a.ok());
        emit(msg.obs, "graph-send", ok, t, || match &a {
            Ok(a) => format!("sendMail: HTTP {} ({} bytes of MIME)", a.status.as_u16(), mime.len()),
            Err(e) => e.to_string(),
        });
        let a = a?;
        match a.status.as_u16() {
            _ if a.ok() => Ok(Some(Self::outcome(msg, "message"))),
            413 => Ok(None),
            _ => Err(a.error()),
        }
    }

    async fn send_large(
        &self,
        token: &AccessToken,
        msg: &Outbound<'_>,
        mime: &Outgoing,
        rest: &[u8],
        atts: &[Attachment],
        mut r: Resume,
    ) -> Result<SendOutcome, SendError> {
        // A state with a send under way is never reset: whether it was sent is asked of its
        // draft (`was_sent`), whatever the count of parts says.
        if r.draft.is_some() && r.parts != atts.len() && r.sending_since.is_none() {
            tracing::warn!(
                identity = msg.identity,
                "the saved Graph progress does not fit the message; starting again"
            );
            r = Resume::default();
        }
        let mut restarted = false;
        // Whether a send may have happened before this attempt: its draft is never deleted.
        let resumed_sending = r.sending_since.is_some();
        loop {
            match self.draft_path(token, msg, mime, rest, atts, &mut r).await {
                Ok(o) => return Ok(o),
                Err(Fail::Send(e)) => {
                    if let (SendError::Rejected(reply), Some(id), false) = (&e, &r.draft, resumed_sending) {
                        if reply.is_permanent() {
                            self.delete_draft(token, msg, id).await;
                        }
                    }
                    return Err(e);
                }
                Err(Fail::Gone) if !restarted => {
                    tracing::warn!(
                        identity = msg.identity,
                        "the Graph draft is gone before it was sent; starting again"
                    );
                    restarted = true;
                    r = Resume::default();
                    self.save(msg, &r).await?;
                }
                Err(Fail::Gone) => {
                    return Err(SendError::Rejected(UpstreamReply::new(
                        451,
                        "4.3.0 the Microsoft Graph draft disappeared twice before it was sent",
                    )))
                }
            }
        }
    }

    async fn draft_path(
        &self,
        token: &AccessToken,
        msg: &Outbound<'_>,
        mime: &Outgoing,
        rest: &[u8],
        atts: &[Attachment],
        r: &mut Resume,
    ) -> Result<SendOutcome, Fail> {
        let id = match r.draft.clone() {
            Some(id) => id,
            None => {
                if r.creating {
                    let mid = mail_parser::MessageParser::default()
                        .parse_headers(rest)
                        .and_then(|m| m.message_id().map(str::to_string))
                        .unwrap_or_default();
                    tracing::warn!(
                        identity = msg.identity,
                        message_id = mid,
                        "an earlier attempt may have left an orphan Graph draft (never sent) in the mailbox's Drafts"
                    );
                }
                *r = Resume { parts: atts.len(), creating: true, ..Resume::default() };
                self.save(msg, r).await?;
                let id = self.create_draft(token, msg, rest, atts.len()).await?;
                r.draft = Some(id.clone());
                r.creating = false;
                self.save(msg, r).await?;
                id
            }
        };
        // A send was attempted before this one: a draft gone now was sent by it.
        let sent_before = r.sending_since.is_some();
        if let Some(since) = r.sending_since {
            if self.was_sent(token, msg, &id, since).await? {
                return Ok(Self::outcome(msg, "draft (sent before a restart)"));
            }
        } else {
            for i in 0..atts.len() {
                if r.done.contains(&i) {
                    continue;
                }
                self.attach(token, msg, mime, &id, atts, i, r).await?;
                r.done.push(i);
                r.adding = None;
                self.save(msg, r).await?;
            }
            // Idempotent, so on every attempt that gets here: the lists as planned, whatever
            // Graph kept of the MIME's (a Bcc in particular).
            self.set_recipients(token, msg, &id, &mime.plan).await?;
            r.sending_since = Some(chrono::Utc::now().timestamp());
            self.save(msg, r).await?;
        }
        let t = Instant::now();
        let url = self.url(msg.mailbox, &["messages", &id, "send"])?;
        let a = self
            .call(msg.mailbox, self.api(Method::POST, url, token).header(CONTENT_TYPE, "application/json").body(""))
            .await;
        emit(msg.obs, "send", matches!(&a, Ok(a) if a.ok()), t, || match &a {
            Ok(a) => format!("HTTP {}", a.status.as_u16()),
            Err(e) => e.to_string(),
        });
        let a = a?;
        match a.status.as_u16() {
            _ if a.ok() => Ok(Self::outcome(msg, "draft")),
            // Gone after an earlier send: that send went through (a sent draft's id stops
            // working); starting a new draft would send it twice.
            404 if a.item_not_found() && sent_before => Ok(Self::outcome(msg, "draft (sent before a restart)")),
            // Gone before any send: someone deleted it; start again.
            404 if a.item_not_found() => Err(Fail::Gone),
            404 => Err(Fail::Send(a.error_not_gone())),
            _ => Err(Fail::Send(a.error())),
        }
    }

    /// Sets the draft's To, Cc and Bcc to exactly the envelope's recipients
    /// (`PATCH .../messages/{id}`): Graph sends a draft to its lists, which it fills from the
    /// MIME as it reads it (a MIME Bcc may not survive).
    async fn set_recipients(
        &self,
        token: &AccessToken,
        msg: &Outbound<'_>,
        id: &str,
        plan: &crate::message::recipients::Plan,
    ) -> Result<(), Fail> {
        let t = Instant::now();
        let list = |v: &[String]| v.iter().map(|a| json!({"emailAddress": {"address": a}})).collect::<Vec<_>>();
        let body = json!({
            "toRecipients": list(&plan.to),
            "ccRecipients": list(&plan.cc),
            "bccRecipients": list(&plan.bcc),
        });
        let url = self.url(msg.mailbox, &["messages", id])?;
        let a = self.call(msg.mailbox, self.api(Method::PATCH, url, token).json(&body)).await;
        emit(msg.obs, "recipients", matches!(&a, Ok(a) if a.ok()), t, || match &a {
            Ok(a) => format!(
                "HTTP {}: {} To, {} Cc, {} Bcc",
                a.status.as_u16(),
                plan.to.len(),
                plan.cc.len(),
                plan.bcc.len()
            ),
            Err(e) => e.to_string(),
        });
        let a = a?;
        match a.status.as_u16() {
            _ if a.ok() => Ok(()),
            404 if a.item_not_found() => Err(Fail::Gone),
            _ => Err(Fail::Send(a.error())),
        }
    }

    /// Removes a draft that will never be sent (the message was refused permanently), so it
    /// does not linger in the mailbox's Drafts with the scan in it. Best effort: a failure is
    /// only logged (the refusal stands either way).
    async fn delete_draft(&self, token: &AccessToken, msg: &Outbound<'_>, id: &str) {
        let Ok(url) = self.url(msg.mailbox, &["messages", id]) else { return };
        match self.call(msg.mailbox, self.api(Method::DELETE, url, token)).await {
            Ok(a) if a.ok() || a.item_not_found() => {}
            Ok(a) => tracing::warn!(
                identity = msg.identity,
                status = a.status.as_u16(),
                "could not delete the Graph draft of a refused message; it stays in Drafts"
            ),
            Err(e) => tracing::warn!(
                identity = msg.identity,
                error = %e,
                "could not delete the Graph draft of a refused message; it stays in Drafts"
            ),
        }
    }

    async fn create_draft(
        &self,
        token: &AccessToken,
        msg: &Outbound<'_>,
        rest: &[u8],
        n: usize,
    ) -> Result<String, Fail> {
        let t = Instant::now();
        let url = self.url(msg.mailbox, &["messages"])?;
        let req = self.api(Method::POST, url, token).header(CONTENT_TYPE, "text/plain").body(STANDARD.encode(rest));
        let a = self.call(msg.mailbox, req).await;
        let id = match &a {
            Ok(a) if a.ok() => a.json()["id"].as_str().map(str::to_string),
            _ => None,
        };
        emit(msg.obs, "draft", id.is_some(), t, || match &a {
            Ok(a) => format!("HTTP {}: {} bytes of MIME without its {n} attachments", a.status.as_u16(), rest.len()),
            Err(e) => e.to_string(),
        });
        let a = a?;
        if !a.ok() {
            return Err(Fail::Send(a.error()));
        }
        id.ok_or_else(|| Fail::Send(SendError::Network("Microsoft Graph created a draft without an id".into())))
    }

    /// In state "sending": whether the draft was sent. Waits for [`SETTLE`] after the send
    /// before it believes a draft that is still there.
    async fn was_sent(&self, token: &AccessToken, msg: &Outbound<'_>, id: &str, since: i64) -> Result<bool, Fail> {
        let mut waited = false;
        loop {
            let t = Instant::now();
            let url = self.url(msg.mailbox, &["messages", id])?;
            let req = self.api(Method::GET, url, token).query(&[("$select", "id,isDraft")]);
            let a = self.call(msg.mailbox, req).await?;
            let state = match a.status.as_u16() {
                // Only Graph's "no such item" means the draft left Drafts (it was sent).
                404 if a.item_not_found() => true,
                404 => return Err(Fail::Send(a.error_not_gone())),
                _ if a.ok() => a.json()["isDraft"].as_bool() == Some(false),
                _ => return Err(Fail::Send(a.error())),
            };
            emit(msg.obs, "draft-state", true, t, || {
                if state {
                    "sent before the restart".into()
                } else {
                    "still a draft".into()
                }
            });
            let age = Duration::from_secs(u64::try_from(chrono::Utc::now().timestamp() - since).unwrap_or(0));
            if state || waited || age >= self.settle {
                return Ok(state);
            }
            waited = true;
            tokio::time::sleep(self.settle - age).await;
        }
    }

    /// Adds attachment `i` to the draft, continuing what a crashed attempt left.
    #[allow(clippy::too_many_arguments)]
    async fn attach(
        &self,
        token: &AccessToken,
        msg: &Outbound<'_>,
        mime: &Outgoing,
        id: &str,
        atts: &[Attachment],
        i: usize,
        r: &mut Resume,
    ) -> Result<(), Fail> {
        let a = &atts[i];
        let t = Instant::now();
        let step = format!("attachment {}/{}", i + 1, atts.len());
        if let Some(was) = r.adding.clone().filter(|ad| ad.index == i) {
            if let Some(url) = &was.upload_url {
                if let Some(offset) = self.session_offset(msg, url).await?.filter(|&o| o < a.size) {
                    let how = self.upload(msg, mime, i, a, url, offset, r).await?;
                    if let Some(how) = how {
                        emit(msg.obs, &step, true, t, || {
                            format!("{} ({} bytes): {how}, resumed at {offset}", a.name, a.size)
                        });
                        return Ok(());
                    }
                }
            }
            if self.on_draft(token, msg, id, atts, i, r).await? {
                emit(msg.obs, &step, true, t, || format!("{} was already on the draft", a.name));
                return Ok(());
            }
        }
        for _ in 0..2 {
            r.adding = Some(Adding { index: i, upload_url: None, offset: 0 });
            self.save(msg, r).await?;
            if a.size < UPLOAD_MIN {
                self.post_attachment(token, msg, mime, id, a).await?;
                emit(msg.obs, &step, true, t, || format!("{} ({} bytes) by POST", a.name, a.size));
                return Ok(());
            }
            let url = self.upload_session(token, msg, id, a).await?;
            r.adding = Some(Adding { index: i, upload_url: Some(url.clone()), offset: 0 });
            self.save(msg, r).await?;
            if let Some(how) = self.upload(msg, mime, i, a, &url, 0, r).await? {
                emit(msg.obs, &step, true, t, || format!("{} ({} bytes): {how}", a.name, a.size));
                return Ok(());
            }
            // The session ended under us: a new one.
        }
        emit(msg.obs, &step, false, t, || "the upload session ended twice".into());
        Err(Fail::Send(SendError::Rejected(UpstreamReply::new(
            451,
            "4.3.0 Microsoft Graph ended the upload session twice",
        ))))
    }

    async fn post_attachment(
        &self,
        token: &AccessToken,
        msg: &Outbound<'_>,
        mime: &Outgoing,
        id: &str,
        a: &Attachment,
    ) -> Result<(), Fail> {
        let mut body = json!({
            "@odata.type": "#microsoft.graph.fileAttachment",
            "name": a.name,
            "contentType": a.content_type,
            "isInline": inline(a),
            "contentBytes": STANDARD.encode(read_blocking(mime, a).await?),
        });
        if let Some(cid) = &a.content_id {
            body["contentId"] = json!(cid);
        }
        let url = self.url(msg.mailbox, &["messages", id, "attachments"])?;
        let a = self.call(msg.mailbox, self.api(Method::POST, url, token).json(&body)).await?;
        match a.status.as_u16() {
            _ if a.ok() => Ok(()),
            404 if a.item_not_found() => Err(Fail::Gone),
            _ => Err(Fail::Send(a.error())),
        }
    }

    async fn upload_session(
        &self,
        token: &AccessToken,
        msg: &Outbound<'_>,
        id: &str,
        a: &Attachment,
    ) -> Result<SessionUrl, Fail> {
        let mut item = json!({
            "attachmentType": "file",
            "name": a.name,
            "size": a.size,
            "contentType": a.content_type,
            "isInline": inline(a),
        });
        if let Some(cid) = &a.content_id {
            item["contentId"] = json!(cid);
        }
        let url = self.url(msg.mailbox, &["messages", id, "attachments", "createUploadSession"])?;
        let ans =
            self.call(msg.mailbox, self.api(Method::POST, url, token).json(&json!({"AttachmentItem": item}))).await?;
        match ans.status.as_u16() {
            _ if ans.ok() => match ans.json()["uploadUrl"].as_str() {
                Some(u) if usable_upload_url(&self.base, u) => Ok(SessionUrl(u.to_string())),
                _ => Err(Fail::Send(SendError::Network("Microsoft Graph gave no usable uploadUrl".into()))),
            },
            404 if ans.item_not_found() => Err(Fail::Gone),
            _ => Err(Fail::Send(ans.error())),
        }
    }

    /// Where an upload session stands: the next byte it expects; `None` when the session is
    /// over (finished, expired or unknown).
    async fn session_offset(&self, msg: &Outbound<'_>, url: &SessionUrl) -> Result<Option<u64>, Fail> {
        let a = self.call(msg.mailbox, self.http.get(&url.0)).await?;
        if !a.ok() {
            return Ok(None);
        }
        Ok(a.json()["nextExpectedRanges"]
            .as_array()
            .and_then(|v| v.first())
            .and_then(|v| v.as_str())
            .and_then(range_start))
    }

    /// PUTs `a` from `offset` on, a range at a time, without Authorization (the URL carries
    /// its own). `None`: the session ended under us.
    #[allow(clippy::too_many_arguments)]
    async fn upload(
        &self,
        msg: &Outbound<'_>,
        mime: &Outgoing,
        i: usize,
        a: &Attachment,
        url: &SessionUrl,
        offset: u64,
        r: &mut Resume,
    ) -> Result<Option<String>, Fail> {
        if offset > a.size {
            // A session that claims more than the file: not ours to continue.
            return Ok(None);
        }
        let mut chunks = chunks(mime, a, offset);
        let mut at = offset;
        let mut ranges = 0;
        while at < a.size {
            let chunk = chunks.recv().await.unwrap_or_else(|| Ok(Vec::new())).map_err(spool)?;
            if chunk.is_empty() {
                // Fewer bytes than counted: the session would stay incomplete (and the draft
                // be sent without it), never a success.
                return Err(Fail::Send(short(a, at)));
            }
            let end = at + chunk.len() as u64;
            let req = self
                .http
                .put(&url.0)
                .header(CONTENT_RANGE, format!("bytes {}-{}/{}", at, end - 1, a.size))
                .header(CONTENT_TYPE, "application/octet-stream")
                .body(chunk);
            let ans = self.call(msg.mailbox, req).await?;
            match ans.status.as_u16() {
                _ if ans.ok() => {}
                // The session expired or was finished by a crashed attempt; or (400, 416) it
                // expects another range than ours after a resume: a new session.
                400 | 401 | 403 | 404 | 416 => return Ok(None),
                _ => return Err(Fail::Send(ans.error())),
            }
            at = end;
            ranges += 1;
            if at < a.size {
                r.adding = Some(Adding { index: i, upload_url: Some(url.clone()), offset: at });
                self.save(msg, r).await?;
            }
        }
        Ok(Some(format!("upload session, {ranges} ranges")))
    }

    /// Whether attachment `i` is on the draft already (added by a crashed attempt after its
    /// last save): more attachments of its name than the finished ones account for.
    #[allow(clippy::too_many_arguments)]
    async fn on_draft(
        &self,
        token: &AccessToken,
        msg: &Outbound<'_>,
        id: &str,
        atts: &[Attachment],
        i: usize,
        r: &Resume,
    ) -> Result<bool, Fail> {
        let url = self.url(msg.mailbox, &["messages", id, "attachments"])?;
        let ans = self.call(msg.mailbox, self.api(Method::GET, url, token).query(&[("$select", "id,name")])).await?;
        match ans.status.as_u16() {
            _ if ans.ok() => {}
            404 if ans.item_not_found() => return Err(Fail::Gone),
            _ => return Err(Fail::Send(ans.error())),
        }
        let names: Vec<String> = ans.json()["value"]
            .as_array()
            .map(|v| v.iter().filter_map(|a| a["name"].as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        Ok(already_there(&names, atts, &r.done, i))
    }
}

/// An attachment's whole content (under [`UPLOAD_MIN`]), read and decoded off the runtime.
async fn read_blocking(mime: &Outgoing, a: &Attachment) -> Result<Vec<u8>, SendError> {
    let (src, att) = (mime.clone(), a.clone());
    tokio::task::spawn_blocking(move || att.read_all(&src))
        .await
        .map_err(|e| SendError::Network(format!("reading the spooled message: {e}")))?
        .map_err(spool)
}

/// An attachment's content from `offset` on, [`RANGE`] bytes at a time, read and decoded on a
/// blocking thread (file reads and base64 do not hold the runtime). One range waits ahead at
/// most; the thread ends at the end, at an error, or when the receiver is dropped.
fn chunks(mime: &Outgoing, a: &Attachment, offset: u64) -> tokio::sync::mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let (src, att) = (mime.clone(), a.clone());
    tokio::task::spawn_blocking(move || {
        let mut content = att.content(&src);
        if let Err(e) = content.skip(offset) {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        loop {
            let chunk = content.next_chunk(RANGE);
            let last = !matches!(&chunk, Ok(c) if !c.is_empty());
            if tx.blocking_send(chunk).is_err() || last {
                return;
            }
        }
    });
    rx
}

/// Whether Graph shows the attachment as inline: only with a Content-ID for the body to
/// refer to (an inline part without one would be hidden from the reader).
fn inline(a: &Attachment) -> bool {
    a.inline && a.content_id.is_some()
}

/// An attachment that decoded to fewer bytes than its counted size: the same every attempt.
fn short(a: &Attachment, at: u64) -> SendError {
    SendError::Rejected(UpstreamReply::new(
        554,
        format!("5.6.0 attachment \"{}\" ended after {at} of its {} bytes", a.name, a.size),
    ))
}

/// Whether an `uploadUrl` may be used: https (Graph's are on outlook.office.com), or http
/// only when Graph itself is reached by http (a loopback fake: `check` allows nothing else).
pub(crate) fn usable_upload_url(base: &str, upload: &str) -> bool {
    let Ok(u) = url::Url::parse(upload) else { return false };
    match u.scheme() {
        "https" => u.host_str().is_some(),
        "http" => base.starts_with("http://") && u.host_str().is_some(),
        _ => false,
    }
}

/// Whether the draft's attachments (`names`) include attachment `i` besides the `done` ones.
fn already_there(names: &[String], atts: &[Attachment], done: &[usize], i: usize) -> bool {
    let name = &atts[i].name;
    let on_draft = names.iter().filter(|n| *n == name).count();
    let accounted = done.iter().filter(|&&d| atts.get(d).is_some_and(|a| &a.name == name)).count();
    on_draft > accounted
}

/// The first byte of a `nextExpectedRanges` entry (`"7864320-"` or `"0-4194303"`).
fn range_start(s: &str) -> Option<u64> {
    s.split('-').next()?.trim().parse().ok()
}

/// A connection error, without the URL (an upload URL carries its own authorisation).
pub(crate) fn network(e: reqwest::Error) -> SendError {
    let e = e.without_url();
    let mut text = format!("Microsoft Graph: {e}");
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    SendError::Network(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(pages: &[usize]) -> Vec<u8> {
        let mut m = b"From: scans@contoso.com\r\nTo: a@contoso.com\r\nMessage-ID: <s1@relay>\r\n\
            Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nScan\r\n"
            .to_vec();
        for (i, &n) in pages.iter().enumerate() {
            m.extend_from_slice(
                format!(
                    "--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\
                     Content-Disposition: attachment; filename=p{i}.pdf\r\n\r\n"
                )
                .as_bytes(),
            );
            let b = STANDARD.encode(vec![i as u8; n]);
            for line in b.as_bytes().chunks(76) {
                m.extend_from_slice(line);
                m.extend_from_slice(b"\r\n");
            }
        }
        m.extend_from_slice(b"--b--\r\n");
        m
    }

    #[test]
    fn small_messages_go_in_one_request_and_large_ones_lose_their_attachments() {
        assert!(matches!(plan(scan(&[2000]).as_slice()), Ok(Plan::Small)));
        // Just under the limit in base64: still one request.
        let edge = scan(&[1_700_000]);
        assert!(b64_len(edge.len()) <= MAX_POST, "{}", edge.len());
        assert!(matches!(plan(edge.as_slice()), Ok(Plan::Small)));
        let Ok(Plan::Large { rest, attachments }) = plan(scan(&[1_000_000, 1_000_000, 3_000_000]).as_slice()) else {
            panic!("not large")
        };
        assert_eq!(attachments.iter().map(|a| a.size).collect::<Vec<_>>(), [1_000_000, 1_000_000, 3_000_000]);
        assert!(rest.ends_with(b"\r\n\r\nScan\r\n--b--\r\n"), "{}", String::from_utf8_lossy(&rest));
        // Large with nothing to take out, or an attachment over 150 MB: refused, permanently.
        let big = format!("Subject: x\r\n\r\n{}", "x".repeat(3_000_000));
        match plan(big.as_bytes()) {
            Err(SendError::Rejected(r)) => assert!(r.code == 552 && r.text.starts_with("5.3.4 "), "{r:?}"),
            _ => panic!("not refused"),
        }
    }

    #[test]
    fn resume_round_trips_through_the_queue_record_and_hides_the_upload_url() {
        let r = Resume {
            parts: 3,
            creating: false,
            draft: Some("AAMkAD=".into()),
            done: vec![0, 2],
            adding: Some(Adding {
                index: 1,
                upload_url: Some(SessionUrl("https://x/up?authtoken=SECRET".into())),
                offset: 7_864_320,
            }),
            sending_since: None,
        };
        let p = Progress::Graph(r.clone());
        let text = serde_json::to_string(&p).expect("serializes");
        assert_eq!(serde_json::from_str::<Progress>(&text).expect("reads back"), p);
        assert!(!format!("{r:?}").contains("SECRET"), "{r:?}");
        // A record written before any field existed reads as the default.
        assert_eq!(serde_json::from_str::<Resume>("{}").expect("reads"), Resume::default());
    }

    #[test]
    fn an_attachment_is_on_the_draft_when_its_name_is_there_once_more() {
        let Ok(Plan::Large { attachments, .. }) = plan(scan(&[1_000_000, 1_000_000, 3_000_000]).as_slice()) else {
            panic!()
        };
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(!already_there(&names(&["p0.pdf"]), &attachments, &[0], 1));
        assert!(already_there(&names(&["p0.pdf", "p1.pdf"]), &attachments, &[0], 1));
        assert!(!already_there(&names(&[]), &attachments, &[], 0));
        assert_eq!(range_start("7864320-"), Some(7_864_320));
        assert_eq!(range_start("0-4194303"), Some(0));
        assert_eq!(range_start("x"), None);
    }

    #[test]
    fn an_upload_url_must_be_https_when_graph_is() {
        let graph = "https://graph.microsoft.com";
        assert!(usable_upload_url(
            graph,
            "https://outlook.office.com/api/v2.0/Users('x')/Messages('y')/AttachmentSessions('z')?authtoken=t"
        ));
        assert!(!usable_upload_url(graph, "http://outlook.office.com/up?authtoken=t"));
        assert!(!usable_upload_url(graph, "file:///etc/passwd"));
        assert!(!usable_upload_url(graph, "not a url"));
        assert!(usable_upload_url("http://127.0.0.1:5000", "http://127.0.0.1:5000/upload/s1?authtoken=t"));
    }

    #[test]
    fn only_error_item_not_found_says_an_item_is_gone() {
        let answer = |status: u16, body: &str| Answer {
            status: StatusCode::from_u16(status).expect("status"),
            headers: reqwest::header::HeaderMap::new(),
            body: body.as_bytes().to_vec(),
        };
        let gone =
            r#"{"error":{"code":"ErrorItemNotFound","message":"The specified object was not found in the store."}}"#;
        assert!(answer(404, gone).item_not_found());
        assert!(!answer(400, gone).item_not_found());
        for other in [r#"{"error":{"code":"ErrorInvalidUser","message":"x"}}"#, "", "<html>Not Found</html>"] {
            let a = answer(404, other);
            assert!(!a.item_not_found(), "{other}");
            // Unknown: transient; known: Graph's own mapping (ErrorInvalidUser: 5.2.1).
            match a.error_not_gone() {
                SendError::Rejected(r) if other.contains("ErrorInvalidUser") => assert_eq!(r.code, 550, "{r:?}"),
                SendError::Rejected(r) => assert!(!r.is_permanent(), "{other}: {r:?}"),
                e => panic!("{e:?}"),
            }
        }
    }

    #[test]
    fn a_range_is_whole_base64_quantums_and_at_most_4_mib() {
        const { assert!(RANGE.is_multiple_of(3) && RANGE <= 4 << 20) };
        assert!(b64_len(UPLOAD_MIN as usize - 1) + 1000 <= MAX_POST);
    }
}
