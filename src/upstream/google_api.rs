//! What the Gmail API (`upstream::gmail`) and the Drive API (`upstream::folder::google`)
//! share: Google's resumable upload protocol (chunk sizes, `Content-Range`, the `Range` a
//! `308` confirms) and Google's error body.

use std::time::Duration;

use serde::Deserialize;

use super::SendError;

/// Chunks of a resumable upload must be multiples of this, except the last.
pub const CHUNK_UNIT: u64 = 256 * 1024;
/// The chunk size: 8 MiB, a few requests for a large scan, little to send again when one breaks.
pub const CHUNK: u64 = 32 * CHUNK_UNIT;
/// How long one request may take: 8 MiB at 1 Mbit/s takes about 70 s.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
/// The wait when Google throttles without saying for how long.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);
/// `308`s in a row that confirm nothing new before the upload is given up for now.
pub const STALLS: usize = 3;

/// The bytes a `308`'s `Range: bytes=0-N` confirms: N+1.
pub fn confirmed(range: &str) -> Option<u64> {
    let end = range.trim().strip_prefix("bytes=0-")?;
    end.trim().parse::<u64>().ok()?.checked_add(1)
}

/// `Content-Range` of a chunk (RFC 9110 14.4): `bytes first-last/total`; with no bytes, the
/// status query `bytes */total`.
pub fn content_range(start: u64, len: u64, total: u64) -> String {
    if len == 0 {
        format!("bytes */{total}")
    } else {
        format!("bytes {start}-{}/{total}", start + len - 1)
    }
}

/// What a `308` says the session has: its `Range` (none: nothing yet). `service` names the
/// API in the error.
pub fn session_offset(r: &reqwest::Response, service: &str) -> Result<u64, SendError> {
    match r.headers().get(reqwest::header::RANGE).and_then(|v| v.to_str().ok()) {
        None => Ok(0),
        Some(v) => confirmed(v).ok_or_else(|| SendError::Network(format!("{service} answered an unreadable Range"))),
    }
}

/// A reqwest error, without the URL (a session URI is a capability) and never the token
/// (reqwest does not put headers in its errors). `service` names the API.
pub fn network(service: &str, e: reqwest::Error) -> SendError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let e = e.without_url();
    let mut detail = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail = format!("{detail}: {s}");
        source = s.source();
    }
    SendError::Network(format!("{service}: {what} ({detail})"))
}

/// Google's error body: `{"error": {"code", "message", "status", "errors": [{"reason"}]}}`.
#[derive(Debug, Default, Deserialize)]
pub struct GoogleError {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    errors: Vec<GoogleErrorItem>,
}

#[derive(Debug, Default, Deserialize)]
struct GoogleErrorItem {
    #[serde(default)]
    reason: String,
}

impl GoogleError {
    pub fn parse(body: &[u8]) -> GoogleError {
        #[derive(Deserialize)]
        struct Wrapper {
            error: GoogleError,
        }
        serde_json::from_slice::<Wrapper>(body).map(|w| w.error).unwrap_or_default()
    }

    /// The first `errors[].reason` (`insufficientPermissions`), else the status (`PERMISSION_DENIED`).
    pub fn reason(&self) -> &str {
        self.errors.iter().map(|e| e.reason.as_str()).find(|r| !r.is_empty()).unwrap_or(&self.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_error_bodies_read_as_google_writes_them() {
        assert_eq!(confirmed("bytes=0-262143"), Some(262_144));
        assert_eq!(confirmed("bytes=5-9"), None);
        assert_eq!(content_range(0, 10, 30), "bytes 0-9/30");
        assert_eq!(content_range(30, 0, 30), "bytes */30");
        let e = GoogleError::parse(br#"{"error":{"message":"no","status":"PERMISSION_DENIED","errors":[{"reason":"insufficientPermissions"}]}}"#);
        assert_eq!((e.reason(), e.message.as_str()), ("insufficientPermissions", "no"));
        assert_eq!(GoogleError::parse(b"{\"error\":{\"status\":\"NOT_FOUND\"}}").reason(), "NOT_FOUND");
        assert_eq!(GoogleError::parse(b"not json").reason(), "");
    }
}
