//! Sending through the Gmail API: `users.messages.send` with the raw message
//! (ARCHITECTURE.md, "Graph and the Gmail API").
//!
//! - Up to [`MEDIA_MAX`]: one request, `uploadType=media`, body = the message
//!   (`message/rfc822`).
//! - Larger, up to [`MAX_SIZE`]: a resumable upload. `uploadType=resumable` opens a session
//!   whose URI (`Location`) is saved in the queue record before any byte goes up; the message
//!   then goes up in [`CHUNK`]-sized `PUT`s with `Content-Range`, and the offset Google
//!   confirms (`308` + `Range`) is saved after each. Google sends the message when the last
//!   byte arrives (`200` with the message resource).
//!
//! After a crash the recorded session is asked where it stands (`Content-Range: bytes */total`,
//! empty body): `308` continues from the offset Google has (which may be beyond the recorded
//! one: the offset is saved after the chunk), `200`/`201` means the message was already sent,
//! `404`/`410` means the session expired and a new one starts.
//!
//! The recipients Gmail sends to are the message's To/Cc/Bcc, not an envelope: the message goes
//! out as [`Outgoing`] rewrites it, so they are exactly the envelope's RCPTs (Gmail removes
//! Bcc before delivery).

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::api::{retry_after, Outbound, Progress};
use super::classify::UpstreamReply;
use super::client::{SendError, SendOutcome};
use super::recipients::Outgoing;
use super::trace::emit;
use crate::oauth::tokens::AccessToken;

/// Largest message sent in one request. Google documents simple (`media`) uploads for "5 MB or
/// less"; above it the resumable protocol also survives a broken connection.
pub const MEDIA_MAX: u64 = 5_000_000;
/// The Gmail API's largest message (35 MiB, the raw message as uploaded).
pub const MAX_SIZE: u64 = crate::oauth::provider::GMAIL_API_MAX;
use super::google_api::{content_range, GoogleError, DEFAULT_RETRY_AFTER, REQUEST_TIMEOUT, STALLS};
pub use super::google_api::{CHUNK, CHUNK_UNIT};
/// New sessions one send may open (a session that expires under it is replaced once).
const SESSIONS_PER_SEND: usize = 2;
/// The media type of a raw message.
const RFC822: &str = "message/rfc822";
/// The path of `users.messages.send` for uploads.
const SEND_PATH: &str = "/upload/gmail/v1/users/me/messages/send";

/// What a Gmail API send leaves to resume after a crash: the resumable session and how much
/// of the message Google confirmed.
///
/// The session URI is a capability (whoever has it can finish the upload, and so send mail as
/// the mailbox): it stays in the queue record and is never logged ([`std::fmt::Debug`] hides
/// it).
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resume {
    /// The session URI Google answered with (`Location`).
    pub session: String,
    /// Bytes Google confirmed (`Range: bytes=0-N` → N+1).
    pub offset: u64,
    /// The size announced when the session was opened (`X-Upload-Content-Length`).
    pub total: u64,
}

impl std::fmt::Debug for Resume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let session = if self.session.is_empty() { "" } else { "<hidden>" };
        f.debug_struct("Resume")
            .field("session", &session)
            .field("offset", &self.offset)
            .field("total", &self.total)
            .finish()
    }
}

/// A Gmail API endpoint (one per provider).
pub struct Gmail {
    base: url::Url,
    http: reqwest::Client,
}

/// What Google said about a resumable session.
#[derive(Debug, PartialEq, Eq)]
enum Session {
    /// Incomplete: Google has this many bytes.
    At(u64),
    /// Complete: the message was sent (its id).
    Sent(String),
    /// Expired or unknown (`404`/`410`): an unfinished session sends nothing.
    Gone,
}

impl Gmail {
    /// `base_url`: e.g. `https://gmail.googleapis.com`; `ca_file`: extra CAs to trust.
    pub fn new(base_url: &str, ca_file: Option<&Path>) -> Result<Gmail, String> {
        let base = url::Url::parse(base_url.trim_end_matches('/')).map_err(|e| format!("gmail_api_url: {e}"))?;
        if !matches!(base.scheme(), "https" | "http") {
            return Err(format!("gmail_api_url: {base} is not an http(s) URL"));
        }
        let http = crate::tls::http_client(ca_file.as_slice(), REQUEST_TIMEOUT)?;
        Ok(Gmail { base, http })
    }

    fn send_url(&self, upload_type: &str) -> String {
        format!("{}{SEND_PATH}?uploadType={upload_type}", self.base.as_str().trim_end_matches('/'))
    }

    /// Sends `msg` as `msg.mailbox` with a Gmail token, to exactly the envelope's recipients.
    ///
    /// Never sends twice for one queued message: a resumable session is recorded before its
    /// first byte goes up, and a recorded session is asked whether it completed before
    /// anything else is done. A new session replaces only one that is unfinished (`308`) or
    /// expired (`404`/`410`), and an unfinished session sends nothing: Google sends the
    /// message only when the session's last byte arrives.
    pub async fn send(&self, token: &AccessToken, msg: &Outbound<'_>) -> Result<SendOutcome, SendError> {
        let out = Outgoing::open(msg.body, msg.env.rcpts).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => {
                SendError::Rejected(UpstreamReply::new(554, format!("5.6.0 the message cannot be sent as it is: {e}")))
            }
            _ => SendError::Network(format!("reading the spooled message: {e}")),
        })?;
        let total = out.len();
        if total > MAX_SIZE {
            return Err(SendError::Rejected(UpstreamReply::new(
                552,
                format!("5.3.4 the message ({total} bytes) is larger than the Gmail API accepts ({MAX_SIZE} bytes)"),
            )));
        }
        let recorded = match msg.progress {
            Progress::Gmail(r) if !r.session.is_empty() => Some(r),
            _ => None,
        };
        let id = match recorded {
            Some(r) => match self.query(token, msg, r).await? {
                Session::Sent(id) => id,
                Session::At(offset) if r.total == total && offset <= total => {
                    match self.upload(token, msg, &out, Resume { session: r.session.clone(), offset, total }).await {
                        // Expired between the question and the chunk: it sent nothing.
                        Err(UploadError::Gone) => self.fresh(token, msg, &out).await?,
                        r => r.map_err(UploadError::into_send)?,
                    }
                }
                // A session for other bytes (cannot happen with a deterministic rewrite) or one
                // that expired: it sends nothing, a new one replaces it.
                Session::At(_) | Session::Gone => self.fresh(token, msg, &out).await?,
            },
            None => self.fresh(token, msg, &out).await?,
        };
        Ok(SendOutcome {
            accepted: msg.env.rcpts.to_vec(),
            refused: Vec::new(),
            reply: Some(UpstreamReply::new(250, format!("2.0.0 sent by the Gmail API, id {id}"))),
        })
    }

    /// A first attempt (or one after an expired session): media or resumable by size.
    async fn fresh(&self, token: &AccessToken, msg: &Outbound<'_>, out: &Outgoing) -> Result<String, SendError> {
        if out.len() <= MEDIA_MAX {
            return self.media(token, msg, out).await;
        }
        let mut sessions = 0;
        loop {
            sessions += 1;
            let session = self.open(token, msg, out.len()).await?;
            let resume = Resume { session, offset: 0, total: out.len() };
            // Recorded before the first byte goes up (see `send`).
            save(msg, &resume).await?;
            match self.upload(token, msg, out, resume).await {
                Err(UploadError::Gone) if sessions < SESSIONS_PER_SEND => continue,
                r => return r.map_err(UploadError::into_send),
            }
        }
    }

    /// `uploadType=media`: the whole message in one request.
    async fn media(&self, token: &AccessToken, msg: &Outbound<'_>, out: &Outgoing) -> Result<String, SendError> {
        let since = Instant::now();
        let body = out.read_all().map_err(|e| SendError::Network(format!("reading the spooled message: {e}")))?;
        let len = body.len();
        let r = self
            .http
            .post(self.send_url("media"))
            .bearer_auth(&token.secret)
            .header(reqwest::header::CONTENT_TYPE, RFC822)
            .body(body)
            .send()
            .await
            .map_err(network)?;
        let status = r.status().as_u16();
        let result = match status {
            200 | 201 => Ok(message_id(&r.bytes().await.unwrap_or_default())),
            _ => Err(refusal_of(r).await),
        };
        emit(msg.obs, "gmail-send", result.is_ok(), since, || match &result {
            Ok(id) => format!("{len} bytes, uploadType=media: {status}, id {id}"),
            Err(e) => format!("{len} bytes, uploadType=media: {e}"),
        });
        result
    }

    /// Opens a resumable session for `total` bytes; returns its URI.
    async fn open(&self, token: &AccessToken, msg: &Outbound<'_>, total: u64) -> Result<String, SendError> {
        let since = Instant::now();
        let r = self
            .http
            .post(self.send_url("resumable"))
            .bearer_auth(&token.secret)
            .header("X-Upload-Content-Type", RFC822)
            .header("X-Upload-Content-Length", total.to_string())
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .body(Vec::new())
            .send()
            .await
            .map_err(network)?;
        let result = match r.status().as_u16() {
            200 | 201 => {
                let location = r.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok());
                self.session_uri(location)
            }
            _ => Err(refusal_of(r).await),
        };
        emit(msg.obs, "upload-session", result.is_ok(), since, || match &result {
            Ok(_) => format!("opened a resumable session for {total} bytes"),
            Err(e) => format!("opening a resumable session for {total} bytes: {e}"),
        });
        result
    }

    /// The session URI from a `Location`, which must stay on the API's own origin: the token
    /// goes along with every chunk.
    fn session_uri(&self, location: Option<&str>) -> Result<String, SendError> {
        let bad = |why: &str| {
            SendError::Rejected(UpstreamReply::new(451, format!("4.3.0 the Gmail API's upload session {why}")))
        };
        let location = location.ok_or_else(|| bad("came without a Location"))?;
        let uri = self.base.join(location).map_err(|_| bad("has an unreadable Location"))?;
        if !self.trusted(&uri) {
            return Err(bad("is on another host"));
        }
        Ok(uri.to_string())
    }

    /// Whether `uri` may receive the token: the API's own origin, or, for Google's API, any
    /// https host of googleapis.com (Google may answer a session on another of its hosts).
    fn trusted(&self, uri: &url::Url) -> bool {
        let google = |u: &url::Url| {
            u.scheme() == "https"
                && u.host_str().is_some_and(|h| h == "googleapis.com" || h.ends_with(".googleapis.com"))
        };
        uri.origin() == self.base.origin() || (google(&self.base) && google(uri))
    }

    /// Whether `uri` may receive the token (the recorded URI of an older configuration may not).
    fn own(&self, uri: &str) -> bool {
        url::Url::parse(uri).is_ok_and(|u| self.trusted(&u))
    }

    /// Asks a recorded session where it stands.
    async fn query(&self, token: &AccessToken, msg: &Outbound<'_>, r: &Resume) -> Result<Session, SendError> {
        let since = Instant::now();
        let mut req = self
            .http
            .put(&r.session)
            .header(reqwest::header::CONTENT_RANGE, format!("bytes */{}", r.total))
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .body(Vec::new());
        if self.own(&r.session) {
            req = req.bearer_auth(&token.secret);
        }
        let resp = req.send().await.map_err(network)?;
        let result = match session_state(resp).await {
            Ok(s) => Ok(s),
            Err(UploadError::Gone) => Ok(Session::Gone),
            Err(UploadError::Send(e)) => Err(e),
        };
        emit(msg.obs, "upload-session", result.is_ok(), since, || match &result {
            Ok(Session::At(n)) => format!("resuming the recorded session: Google has {n} of {} bytes", r.total),
            Ok(Session::Sent(id)) => format!("the recorded session had already sent the message, id {id}"),
            Ok(Session::Gone) => "the recorded session expired: starting a new one".to_string(),
            Err(e) => format!("asking the recorded session: {e}"),
        });
        result
    }

    /// Uploads from `resume.offset` to the end; returns the sent message's id.
    async fn upload(
        &self,
        token: &AccessToken,
        msg: &Outbound<'_>,
        out: &Outgoing,
        mut resume: Resume,
    ) -> Result<String, UploadError> {
        let mut stalls = 0;
        let with_token = self.own(&resume.session);
        loop {
            let (start, len) = next_chunk(resume.offset, resume.total);
            let since = Instant::now();
            // A few MiB from the local spool: read in place rather than on a blocking thread.
            let data = out
                .read_range(start, len as usize)
                .map_err(|e| SendError::Network(format!("reading the spooled message: {e}")))?;
            let range = content_range(start, len, resume.total);
            let mut req = self.http.put(&resume.session).header(reqwest::header::CONTENT_RANGE, &range).body(data);
            if with_token {
                req = req.bearer_auth(&token.secret);
            }
            let resp = req.send().await.map_err(network)?;
            let status = resp.status().as_u16();
            let state = session_state(resp).await;
            emit(msg.obs, "upload", state.is_ok(), since, || match &state {
                Ok(Session::At(n)) => format!("{range}: {status}, Google has {n} bytes"),
                Ok(Session::Sent(id)) => format!("{range}: {status}, sent, id {id}"),
                Ok(Session::Gone) => format!("{range}: {status}"),
                Err(UploadError::Gone) => format!("{range}: {status}, the session expired"),
                Err(UploadError::Send(e)) => format!("{range}: {e}"),
            });
            match state? {
                Session::Sent(id) => return Ok(id),
                Session::Gone => return Err(UploadError::Gone),
                Session::At(n) if n > resume.total => {
                    return Err(
                        SendError::Network(format!("the Gmail API confirmed {n} of {} bytes", resume.total)).into()
                    )
                }
                Session::At(n) if n <= resume.offset => {
                    stalls += 1;
                    if stalls >= STALLS {
                        return Err(SendError::Network(format!(
                            "the Gmail API's upload does not progress beyond {n} of {} bytes",
                            resume.total
                        ))
                        .into());
                    }
                    resume.offset = n;
                }
                Session::At(n) => {
                    stalls = 0;
                    resume.offset = n;
                    save(msg, &resume).await?;
                }
            }
        }
    }
}

/// Why a resumable upload stopped.
#[derive(Debug)]
enum UploadError {
    /// The session expired (`404`/`410`): nothing was sent.
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
                SendError::Network("the Gmail API's upload session expired twice in one attempt".into())
            }
            UploadError::Send(e) => e,
        }
    }
}

/// Commits the session's state to the queue record; the step it protects waits for it.
async fn save(msg: &Outbound<'_>, resume: &Resume) -> Result<(), SendError> {
    msg.sink
        .save(&Progress::Gmail(resume.clone()))
        .await
        .map_err(|e| SendError::Network(format!("could not record the upload's progress: {e}")))
}

/// Reads a session's answer: `308` (+ `Range`), `200`/`201` (sent), `404`/`410` (gone), or a refusal.
async fn session_state(r: reqwest::Response) -> Result<Session, UploadError> {
    match r.status().as_u16() {
        308 => Ok(Session::At(super::google_api::session_offset(&r, "the Gmail API")?)),
        200 | 201 => Ok(Session::Sent(message_id(&r.bytes().await.unwrap_or_default()))),
        404 | 410 => Err(UploadError::Gone),
        _ => Err(refusal_of(r).await.into()),
    }
}

/// The next chunk from `offset`: `(start, len)`; whole [`CHUNK`]s except the last.
fn next_chunk(offset: u64, total: u64) -> (u64, u64) {
    (offset, CHUNK.min(total.saturating_sub(offset)))
}

/// The `id` of the message resource Google answers a send with.
fn message_id(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Message {
        id: Option<String>,
    }
    serde_json::from_slice::<Message>(body)
        .ok()
        .and_then(|m| m.id)
        .filter(|id| id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or_else(|| "unknown".to_string())
}

/// A reqwest error, without the URL (a session URI is a capability).
fn network(e: reqwest::Error) -> SendError {
    super::google_api::network("the Gmail API", e)
}

async fn refusal_of(r: reqwest::Response) -> SendError {
    let status = r.status().as_u16();
    let after = r.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let body = r.bytes().await.unwrap_or_default();
    refusal(status, after.as_deref(), &body, chrono::Utc::now())
}

/// What the admin should do about a Gmail API refusal, by Google's reason.
fn advice(status: u16, reason: &str, message: &str) -> Option<&'static str> {
    let m = message.to_ascii_lowercase();
    match reason {
        "insufficientPermissions" | "ACCESS_TOKEN_SCOPE_INSUFFICIENT" => Some(
            "the token lacks the gmail.send scope: grant https://www.googleapis.com/auth/gmail.send to the app \
             (a service account: in the domain-wide delegation of its client ID) and sign in again",
        ),
        "accessNotConfigured" | "SERVICE_DISABLED" => {
            Some("the Gmail API is not enabled in the Google Cloud project: enable it under APIs & Services")
        }
        "failedPrecondition" if m.contains("mail service not enabled") => {
            Some("Gmail is not enabled for this account: turn Gmail on for the user in the Workspace admin console")
        }
        "failedPrecondition" => Some("Google refused the mailbox's state (is Gmail enabled for the account?)"),
        "domainPolicy" => Some("the Workspace domain's policy does not allow this app: allow it under API controls"),
        _ if status == 413 => Some("the message is larger than the Gmail API accepts"),
        "invalidArgument" => Some("Google could not read the message (a missing or invalid recipient or header)"),
        _ => None,
    }
}

/// Maps a Gmail API refusal to a send error: `401` the token, `429`/`503` (and the rate
/// limits Google answers with `403`) throttling, other `4xx` a permanent `5xx` reply, other
/// `5xx` a transient `4xx` one. The text carries Google's reason and message, never the token.
fn refusal(status: u16, retry: Option<&str>, body: &[u8], now: chrono::DateTime<chrono::Utc>) -> SendError {
    let e = GoogleError::parse(body);
    let reason = e.reason();
    let message = crate::reply::sanitize_text(&e.message, 200);
    let said = match (reason.is_empty(), message.is_empty()) {
        (true, true) => format!("HTTP {status}"),
        (true, false) => format!("HTTP {status}: {message}"),
        (false, true) => format!("HTTP {status} {reason}"),
        (false, false) => format!("HTTP {status} {reason}: {message}"),
    };
    let throttled = matches!(status, 429 | 503)
        || (status == 403 && matches!(reason, "rateLimitExceeded" | "userRateLimitExceeded" | "dailyLimitExceeded"));
    let text = |status_code: &str| match advice(status, reason, &message) {
        Some(a) => format!("{status_code} the Gmail API refused the message: {said} ({a})"),
        None => format!("{status_code} the Gmail API refused the message: {said}"),
    };
    if throttled {
        return SendError::Throttled {
            reply: UpstreamReply::new(451, format!("4.7.0 the Gmail API is throttling: {said}")),
            retry_after: retry_after(retry, now).unwrap_or(DEFAULT_RETRY_AFTER),
        };
    }
    match status {
        401 => SendError::Auth {
            reply: UpstreamReply::new(535, format!("5.7.0 the Gmail API refused the token: {said}")),
            detail: None,
        },
        413 => SendError::Rejected(UpstreamReply::new(552, text("5.3.4"))),
        403 => SendError::Rejected(UpstreamReply::new(554, text("5.7.1"))),
        // Not found, timeout, conflict, too early: a wrong URL or a passing state of the API,
        // not a verdict on the message; it stays queued (a bounce would lose nothing less).
        404 | 408 | 409 | 425 => SendError::Rejected(UpstreamReply::new(451, text("4.3.0"))),
        400..=499 => SendError::Rejected(UpstreamReply::new(554, text("5.0.0"))),
        500..=599 => SendError::Rejected(UpstreamReply::new(451, format!("4.3.0 the Gmail API failed: {said}"))),
        _ => SendError::Rejected(UpstreamReply::new(451, format!("4.3.0 the Gmail API answered {said}"))),
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
        serde_json::json!({"error": {"code": code, "message": message, "status": "X",
            "errors": [{"message": message, "domain": "global", "reason": reason}]}})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn resume_keeps_its_fields_in_the_queue_record_and_hides_the_session_in_debug() {
        let r = Resume {
            session: "https://gmail.googleapis.com/upload/gmail/v1/users/me/messages/send?uploadType=resumable&upload_id=secret1".into(),
            offset: 8 * 1024 * 1024,
            total: 30_000_000,
        };
        let p = Progress::Gmail(r.clone());
        let json = serde_json::to_string(&p).expect("serialises");
        assert!(json.contains("upload_id=secret1") && json.contains("\"offset\":8388608"), "{json}");
        assert_eq!(serde_json::from_str::<Progress>(&json).expect("parses"), p);
        let debug = format!("{p:?}");
        assert!(!debug.contains("secret1") && debug.contains("8388608"), "{debug}");
        assert_eq!(Resume::default().session, "");
    }

    #[test]
    fn chunks_are_whole_units_except_the_last() {
        assert_eq!(CHUNK % CHUNK_UNIT, 0);
        let total = 30_000_000;
        let mut offset = 0;
        let mut chunks = Vec::new();
        while offset < total {
            let (start, len) = next_chunk(offset, total);
            assert_eq!(start, offset);
            chunks.push(len);
            offset += len;
        }
        assert_eq!(offset, total);
        assert_eq!(chunks, vec![CHUNK, CHUNK, CHUNK, total - 3 * CHUNK]);
        assert_eq!(content_range(0, CHUNK, total), "bytes 0-8388607/30000000");
        assert_eq!(content_range(3 * CHUNK, total - 3 * CHUNK, total), "bytes 25165824-29999999/30000000");
        assert_eq!(content_range(0, 0, total), "bytes */30000000");
    }

    #[test]
    fn a_308_range_confirms_bytes() {
        assert_eq!(confirmed("bytes=0-8388607"), Some(8_388_608));
        assert_eq!(confirmed("bytes=0-0"), Some(1));
        assert_eq!(confirmed("bytes=5-9"), None);
        assert_eq!(confirmed("bytes=0-x"), None);
        assert_eq!(confirmed("bytes=0-18446744073709551615"), None);
    }

    #[test]
    fn message_ids_are_read_and_checked() {
        assert_eq!(
            message_id(br#"{"id":"18c2f0a1b2c3d4e5","threadId":"18c2f0a1b2c3d4e5","labelIds":["SENT"]}"#),
            "18c2f0a1b2c3d4e5"
        );
        assert_eq!(message_id(b"not json"), "unknown");
        assert_eq!(message_id(br#"{"id":"a b\r\n250 ok"}"#), "unknown");
    }

    #[test]
    fn unauthorised_is_the_token() {
        let e = refusal(401, None, &google(401, "authError", "Invalid Credentials"), now());
        let SendError::Auth { reply, .. } = e else { panic!("{e:?}") };
        assert_eq!(reply.code, 535);
        assert!(reply.text.contains("authError"), "{}", reply.text);
    }

    #[test]
    fn throttling_honours_retry_after_or_waits_a_minute() {
        let e = refusal(429, Some("17"), &google(429, "rateLimitExceeded", "User-rate limit exceeded."), now());
        assert!(
            matches!(e, SendError::Throttled { retry_after, .. } if retry_after == Duration::from_secs(17)),
            "{e:?}"
        );
        let e = refusal(503, None, b"", now());
        assert!(matches!(e, SendError::Throttled { retry_after, .. } if retry_after == DEFAULT_RETRY_AFTER), "{e:?}");
        let e = refusal(403, Some("5"), &google(403, "userRateLimitExceeded", "User rate limit exceeded"), now());
        assert!(
            matches!(e, SendError::Throttled { retry_after, .. } if retry_after == Duration::from_secs(5)),
            "{e:?}"
        );
    }

    #[test]
    fn client_errors_are_permanent_with_google_s_reason_and_a_hint() {
        let reply = |e: SendError| match e {
            SendError::Rejected(r) => r,
            other => panic!("{other:?}"),
        };
        let r = reply(refusal(
            403,
            None,
            &google(403, "insufficientPermissions", "Request had insufficient authentication scopes."),
            now(),
        ));
        assert_eq!(r.code, 554);
        assert!(r.is_permanent());
        assert!(
            r.text.starts_with("5.7.1 ") && r.text.contains("insufficientPermissions") && r.text.contains("gmail.send"),
            "{}",
            r.text
        );
        let r = reply(refusal(400, None, &google(400, "failedPrecondition", "Mail service not enabled"), now()));
        assert!(
            r.is_permanent() && r.text.contains("Mail service not enabled") && r.text.contains("turn Gmail on"),
            "{}",
            r.text
        );
        let r = reply(refusal(
            403,
            None,
            &google(403, "accessNotConfigured", "Gmail API has not been used in project 1 before or it is disabled."),
            now(),
        ));
        assert!(r.text.contains("enable it"), "{}", r.text);
        let r = reply(refusal(400, None, &google(400, "invalidArgument", "Recipient address required"), now()));
        assert!(r.is_permanent() && r.text.contains("Recipient address required"), "{}", r.text);
        let r = reply(refusal(413, None, b"<html>Request Entity Too Large</html>", now()));
        assert_eq!((r.code, r.status().map(|s| (s.0, s.1, s.2))), (552, Some((5, 3, 4))));
    }

    #[test]
    fn server_errors_are_transient() {
        let e = refusal(500, None, &google(500, "backendError", "Backend Error"), now());
        let SendError::Rejected(r) = e else { panic!("{e:?}") };
        assert!(!r.is_permanent() && r.text.contains("backendError"), "{}", r.text);
    }

    #[test]
    fn a_session_must_stay_on_the_api_s_origin() {
        let g = Gmail::new("https://gmail.googleapis.com", None).expect("builds");
        let uri = g
            .session_uri(Some(
                "https://gmail.googleapis.com/upload/gmail/v1/users/me/messages/send?uploadType=resumable&upload_id=x",
            ))
            .expect("same origin");
        assert!(uri.ends_with("upload_id=x"));
        assert!(g
            .session_uri(Some("/upload/gmail/v1/users/me/messages/send?upload_id=y"))
            .expect("relative")
            .starts_with("https://gmail.googleapis.com/"));
        assert!(g.session_uri(Some("https://evil.example/upload?upload_id=x")).is_err());
        assert!(g.session_uri(None).is_err());
        assert!(!g.own("http://gmail.googleapis.com/upload"));
    }
}
