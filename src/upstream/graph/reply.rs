//! What Graph's HTTP answers mean for the message: the typed [`SendError`] the queue acts on,
//! with Graph's own `error.code` and `error.message` in an SMTP-shaped reply, so the device's
//! panel or the bounce says why.
//!
//! - 401: the token was refused ([`SendError::Auth`]: delivery refreshes it once and retries).
//! - 429, 503, 504: throttled, retry after `Retry-After` (60 s when absent).
//! - 408 (timeout), 409 (conflict), 423 (locked), 425 (too early): transient, the message
//!   stays queued (RFC 9110 15.5.9, 15.5.10; RFC 4918 11.3; RFC 8470 5.2).
//! - 413 and other 4xx: permanent, with an enhanced status code (RFC 3463) per Graph error.
//! - other 5xx: transient.

use std::time::Duration;

use serde::Deserialize;

use super::super::client::SendError;
use crate::reply::sanitize_text;
use crate::upstream::classify::UpstreamReply;

/// An HTTP answer from Graph, read whole (Graph's answers are small JSON). Shared by the mail
/// path and the drive path (`upstream::folder::microsoft`).
pub(crate) struct Answer {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    /// Sends `req` and reads the answer; a connection error never names the URL.
    pub async fn of(req: reqwest::RequestBuilder) -> Result<Answer, SendError> {
        let resp = req.send().await.map_err(super::network)?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(super::network)?.to_vec();
        Ok(Answer { status, headers, body })
    }

    pub fn ok(&self) -> bool {
        self.status.is_success()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }

    /// Graph's `error.code`.
    pub fn code(&self) -> String {
        graph_error(&self.body).0
    }

    /// The `Retry-After` header's value.
    pub fn retry_after(&self) -> Option<&str> {
        self.headers.get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok())
    }

    /// What an answer that is not a success means for the message ([`failure`]).
    pub fn error(&self) -> SendError {
        failure(self.status.as_u16(), self.retry_after(), &self.body)
    }
}

/// The wait when a throttling answer names none.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Deserialize, Default)]
struct Envelope {
    #[serde(default)]
    error: Body,
}

#[derive(Deserialize, Default)]
struct Body {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

/// Graph's `{"error": {"code", "message"}}`, made safe for a reply line.
pub fn graph_error(body: &[u8]) -> (String, String) {
    let e = serde_json::from_slice::<Envelope>(body).unwrap_or_default().error;
    (sanitize_text(&e.code, 80), sanitize_text(&e.message, 240))
}

/// The reply class and enhanced status code for a permanent Graph error.
fn permanent(status: u16, code: &str) -> (u16, &'static str) {
    match code {
        "ErrorSendAsDenied" => (554, "5.7.60"),
        "ErrorAccessDenied" | "AccessDenied" | "Authorization_RequestDenied" | "ErrorAccessDeniedException" => {
            (550, "5.7.1")
        }
        "MailboxNotEnabledForRESTAPI"
        | "MailboxNotSupportedForRESTAPI"
        | "ErrorInvalidUser"
        | "ErrorNonExistentMailbox" => (550, "5.2.1"),
        "ErrorMessageSizeExceeded" | "RequestBodyTooLarge" | "ErrorRequestEntityTooLarge" => (552, "5.3.4"),
        "ErrorInvalidRecipients" => (550, "5.1.3"),
        "ErrorQuotaExceeded" => (552, "5.2.2"),
        _ if status == 413 => (552, "5.3.4"),
        _ => (554, "5.0.0"),
    }
}

/// The error for an HTTP answer that is not a success. `retry_after` is the header's value.
pub fn failure(status: u16, retry_after: Option<&str>, body: &[u8]) -> SendError {
    let (code, message) = graph_error(body);
    let what = match (code.is_empty(), message.is_empty()) {
        (true, _) => format!("HTTP {status}"),
        (false, true) => code.clone(),
        (false, false) => format!("{code}: {message}"),
    };
    match status {
        401 => SendError::Auth {
            reply: UpstreamReply::new(535, "5.7.0 Microsoft Graph refused the token (HTTP 401)"),
            detail: Some(what),
        },
        429 | 503 | 504 => SendError::Throttled {
            reply: UpstreamReply::new(451, format!("4.4.5 Microsoft Graph is throttling (HTTP {status}) {what}")),
            retry_after: super::super::api::retry_after(retry_after, chrono::Utc::now()).unwrap_or(DEFAULT_RETRY_AFTER),
        },
        408 | 409 | 423 | 425 => SendError::Rejected(UpstreamReply::new(
            451,
            format!("4.3.0 Microsoft Graph asked to try again (HTTP {status}) {what}"),
        )),
        400..=499 => {
            let (smtp, enhanced) = permanent(status, &code);
            SendError::Rejected(UpstreamReply::new(smtp, format!("{enhanced} Microsoft Graph {what}")))
        }
        _ => {
            SendError::Rejected(UpstreamReply::new(451, format!("4.3.0 Microsoft Graph failed (HTTP {status}) {what}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: &str, message: &str) -> Vec<u8> {
        serde_json::json!({"error": {"code": code, "message": message}}).to_string().into_bytes()
    }

    fn rejected(e: SendError) -> UpstreamReply {
        match e {
            SendError::Rejected(r) => r,
            other => panic!("not rejected: {other:?}"),
        }
    }

    #[test]
    fn permanent_refusals_carry_graphs_code_and_a_hint() {
        let r = rejected(failure(403, None, &err("ErrorSendAsDenied", "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account.")));
        assert_eq!(r.code, 554);
        assert!(r.text.starts_with("5.7.60 Microsoft Graph ErrorSendAsDenied: The user account"), "{}", r.text);
        assert!(r.is_permanent() && r.hint().unwrap_or_default().contains("Send As"), "{}", r.describe());

        let r = rejected(failure(
            403,
            None,
            &err("ErrorAccessDenied", "Access is denied. Check credentials and try again."),
        ));
        assert_eq!((r.code, r.status().map(|s| (s.0, s.1, s.2))), (550, Some((5, 7, 1))));
        assert!(r.hint().unwrap_or_default().contains("New-ManagementRoleAssignment"), "{}", r.describe());

        let r = rejected(failure(
            404,
            None,
            &err(
                "MailboxNotEnabledForRESTAPI",
                "The mailbox is either inactive, soft-deleted, or is hosted on-premise.",
            ),
        ));
        assert!(r.text.starts_with("5.2.1 "), "{}", r.text);
        assert!(r.hint().unwrap_or_default().contains("Exchange Online"), "{}", r.describe());

        let r = rejected(failure(
            400,
            None,
            &err("ErrorMessageSizeExceeded", "The message exceeds the maximum supported size."),
        ));
        assert_eq!(r.code, 552);
        assert!(r.text.starts_with("5.3.4 ") && r.hint().is_some(), "{}", r.describe());

        // 413 without a body, and an unknown 4xx.
        assert!(rejected(failure(413, None, b"")).text.starts_with("5.3.4 Microsoft Graph HTTP 413"));
        let r = rejected(failure(400, None, &err("ErrorMimeContentInvalid", "bad")));
        assert_eq!((r.code, r.text.as_str()), (554, "5.0.0 Microsoft Graph ErrorMimeContentInvalid: bad"));
    }

    #[test]
    fn throttling_waits_as_asked_and_server_errors_are_transient() {
        let body = err("ApplicationThrottled", "Application is over its MailboxConcurrency limit.");
        match failure(429, Some("7"), &body) {
            SendError::Throttled { reply, retry_after } => {
                assert_eq!(retry_after, Duration::from_secs(7));
                assert!(!reply.is_permanent() && reply.text.contains("ApplicationThrottled"), "{reply:?}");
            }
            other => panic!("{other:?}"),
        }
        for status in [503, 504] {
            assert!(
                matches!(failure(status, None, b""), SendError::Throttled { retry_after, .. } if retry_after == DEFAULT_RETRY_AFTER)
            );
        }
        let r = rejected(failure(500, None, &err("InternalServerError", "x")));
        assert!(!r.is_permanent() && r.code == 451, "{r:?}");
        for status in [408, 409, 423, 425] {
            let r = rejected(failure(status, None, &err("ErrorIrresolvableConflict", "x")));
            assert!(!r.is_permanent() && r.code == 451 && r.text.starts_with("4.3.0 "), "{status}: {r:?}");
        }
    }

    #[test]
    fn a_refused_token_is_auth_and_text_is_made_safe() {
        match failure(401, None, &err("InvalidAuthenticationToken", "Access token has expired.\r\nX: y")) {
            SendError::Auth { reply, detail } => {
                assert_eq!(reply.code, 535);
                let d = detail.unwrap_or_default();
                assert!(
                    d.starts_with("InvalidAuthenticationToken: Access token has expired.") && !d.contains('\n'),
                    "{d}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
