//! Delivery status notifications (RFC 3464) for messages that cannot be delivered.
//!
//! A bounce is a `multipart/report; report-type=delivery-status` message (RFC 6522) with a
//! human-readable part, a `message/delivery-status` part and the original headers
//! (`text/rfc822-headers`). It is queued like any other message, sent through the same
//! identity, and never bounced itself.

use std::fmt::Write;

/// One recipient that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRecipient {
    pub address: String,
    /// RFC 3463 status, e.g. "5.1.1" or "4.4.7" (expired).
    pub status: String,
    /// What the upstream said, or why the relay gave up.
    pub diagnostic: String,
}

/// What a bounce is about.
pub struct Bounce<'a> {
    pub reporting_host: &'a str,
    /// The identity's address: the bounce's From (the upstream accepts no other).
    pub from: &'a str,
    pub to: &'a str,
    pub queue_id: &'a str,
    pub device: &'a str,
    /// RFC 5322 date of arrival.
    pub arrival: &'a str,
    pub failed: &'a [FailedRecipient],
    /// The original message's header section (may be truncated).
    pub original_headers: &'a [u8],
    pub now: chrono::DateTime<chrono::Utc>,
}

/// The longest part of the original header section quoted in a bounce.
pub const MAX_QUOTED_HEADERS: usize = 64 * 1024;

/// Returns the header section of a message (up to the first empty line), bounded.
pub fn header_section(message: &[u8]) -> &[u8] {
    let end = message.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 2).unwrap_or(message.len());
    &message[..end.min(MAX_QUOTED_HEADERS)]
}

/// Builds the DSN as wire bytes (CRLF line endings).
pub fn build(b: &Bounce<'_>) -> Vec<u8> {
    let boundary = format!("=_mfd-relay-{}", b.queue_id);
    let date = b.now.to_rfc2822();
    let expired = b.failed.iter().all(|f| f.status.starts_with('4'));
    let mut m = String::new();
    let _ = write!(
        m,
        "From: Mail Delivery System <{from}>\r\n\
         To: <{to}>\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         Date: {date}\r\n\
         Message-ID: <bounce.{id}.{ts}@{host}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is the mail relay {host}.\r\n\
         \r\n\
         A message sent by the device \"{device}\" (queue id {id}) could not be\r\n\
         delivered to the following recipients{why}:\r\n\
         \r\n",
        from = b.from,
        to = b.to,
        id = b.queue_id,
        ts = b.now.timestamp(),
        host = b.reporting_host,
        device = b.device,
        why = if expired { ", and the relay has stopped trying" } else { "" },
    );
    for f in b.failed {
        let _ = write!(m, "  <{}>: {}\r\n", f.address, one_line(&f.diagnostic));
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {host}\r\n\
         X-Mfd-Relay-Queue-ID: {id}\r\n\
         Arrival-Date: {arrival}\r\n",
        host = b.reporting_host,
        id = b.queue_id,
        arrival = b.arrival,
    );
    for f in b.failed {
        let _ = write!(
            m,
            "\r\n\
             Final-Recipient: rfc822; {addr}\r\n\
             Action: failed\r\n\
             Status: {status}\r\n\
             Diagnostic-Code: smtp; {diag}\r\n\
             Last-Attempt-Date: {date}\r\n",
            addr = f.address,
            status = if f.status.starts_with('4') { "4.4.7".to_string() } else { f.status.clone() },
            diag = one_line(&f.diagnostic),
        );
    }
    let _ = write!(
        m,
        "\r\n--{boundary}\r\n\
         Content-Type: text/rfc822-headers\r\n\
         \r\n"
    );
    let mut out = m.into_bytes();
    out.extend_from_slice(b.original_headers);
    if !b.original_headers.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// Diagnostic text on one printable line.
fn one_line(s: &str) -> String {
    crate::reply::sanitize_text(s, 900)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_is_parseable_and_complete() {
        let failed = vec![FailedRecipient {
            address: "bob@example.test".into(),
            status: "5.1.1".into(),
            diagnostic: "550 5.1.1 User unknown\r\nextra".into(),
        }];
        let msg = build(&Bounce {
            reporting_host: "relay.lan",
            from: "scans@contoso.test",
            to: "admin@contoso.test",
            queue_id: "0001",
            device: "floor3",
            arrival: "Thu, 26 Nov 2026 06:00:00 +0000",
            failed: &failed,
            original_headers: header_section(b"Subject: scan\r\nFrom: a@b\r\n\r\nbody"),
            now: chrono::Utc::now(),
        });
        let text = String::from_utf8(msg.clone()).unwrap();
        assert!(text.contains("Status: 5.1.1"));
        assert!(text.contains("Final-Recipient: rfc822; bob@example.test"));
        assert!(text.contains("Subject: scan\r\nFrom: a@b\r\n"));
        assert!(!text.contains("body"));
        assert!(!text.contains("\r\nextra"), "diagnostics stay on one line");
        let parsed = mail_parser::MessageParser::default().parse(&msg).unwrap();
        assert_eq!(parsed.subject(), Some("Undelivered Mail Returned to Sender"));
        assert_eq!(parsed.parts.len(), 4);
        for (i, &b) in msg.iter().enumerate() {
            if b == b'\n' {
                assert_eq!(msg[i - 1], b'\r');
            }
        }
    }
}
