//! What the relay changes in a message's header section before it is spooled.
//!
//! - A `Received:` trace field on top (RFC 5321 4.4: a relay MUST add one).
//! - With `from = "rewrite"`: `From:` becomes the identity's mailbox (Exchange answers
//!   `554 5.2.252 SendAsDenied` otherwise, Gmail rewrites or refuses), keeping the device's
//!   display name; the original From becomes `Reply-To:` when there is none, so replies still
//!   reach the person; `Sender:` is removed (it would ask for "send on behalf" rights).
//! - `Date:` and `Message-ID:` when missing (RFC 6409 8.2, 8.3: a submission server may add
//!   them; Gmail refuses messages without a Message-ID).
//!
//! The body is never touched. Pure functions over the header bytes; mail-parser reads them.

use mail_parser::{HeaderName, MessageParser};

/// The header section may be at most this large; beyond it the message is refused (552),
/// since it cannot be a scan's header and would be held in memory.
pub const MAX_HEADER_SECTION: usize = 1024 * 1024;

/// How to change the header section.
pub struct Changes<'a> {
    /// The `Received:` field, without the trailing CRLF.
    pub received: &'a str,
    /// Rewrite From to this address.
    pub rewrite_from: Option<&'a str>,
    /// Our host name, for a Message-ID we add.
    pub hostname: &'a str,
    /// Unique part for a Message-ID we add.
    pub unique: &'a str,
    pub now: chrono::DateTime<chrono::Utc>,
}

/// Finds the end of the header section in `buf`: the offset just after the CRLF that ends
/// the last header line (the empty line follows), if complete.
pub fn header_end(buf: &[u8]) -> Option<usize> {
    if buf.starts_with(b"\r\n") {
        return Some(0);
    }
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 2)
}

/// Returns the new header section for `header` (which ends with CRLF or is empty; the empty
/// line that separates the body is not part of it).
pub fn rewrite_header(header: &[u8], c: &Changes<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(header.len() + 256);
    out.extend_from_slice(c.received.as_bytes());
    out.extend_from_slice(b"\r\n");

    // Parse a copy that is sure to end the header section, so the parser stops there.
    let mut probe = header.to_vec();
    probe.extend_from_slice(b"\r\n");
    let parsed = MessageParser::default().parse_headers(&probe);
    let headers = parsed.as_ref().map(|m| m.headers()).unwrap_or(&[]);

    let has = |name: HeaderName<'_>| headers.iter().any(|h| h.name == name);
    let mut skip: Vec<(usize, usize)> = Vec::new();
    let mut extra = String::new();

    if let Some(addr) = c.rewrite_from {
        let froms: Vec<_> = headers.iter().filter(|h| h.name == HeaderName::From).collect();
        let original_raw = froms.first().map(|h| {
            let raw = &header[(h.offset_start as usize).min(header.len())..(h.offset_end as usize).min(header.len())];
            String::from_utf8_lossy(raw).trim().to_string()
        });
        for h in headers.iter().filter(|h| h.name == HeaderName::From || h.name == HeaderName::Sender) {
            skip.push((h.offset_field as usize, h.offset_end as usize));
        }
        let display = original_raw
            .as_deref()
            .and_then(|raw| raw.split_once('<').map(|(name, _)| name.trim()))
            .filter(|n| !n.is_empty() && !n.contains(['\r', '\n']));
        match display {
            Some(name) => extra.push_str(&format!("From: {name} <{addr}>\r\n")),
            None => extra.push_str(&format!("From: {addr}\r\n")),
        }
        if let Some(raw) = original_raw.filter(|r| !r.is_empty()) {
            let same = parsed
                .as_ref()
                .and_then(|m| m.from())
                .and_then(|a| a.first())
                .and_then(|a| a.address())
                .is_some_and(|a| a.eq_ignore_ascii_case(addr));
            if !same && !has(HeaderName::ReplyTo) {
                extra.push_str(&format!("Reply-To: {}\r\n", unfold(&raw)));
            }
        }
    }
    if !has(HeaderName::Date) {
        extra.push_str(&format!("Date: {}\r\n", c.now.to_rfc2822()));
    }
    if !has(HeaderName::MessageId) {
        extra.push_str(&format!("Message-ID: <{}@{}>\r\n", c.unique, c.hostname));
    }

    skip.sort();
    let mut pos = 0;
    for (start, end) in skip {
        let (start, end) = (start.min(header.len()), end.min(header.len()));
        if start >= pos {
            out.extend_from_slice(&header[pos..start]);
            pos = end;
        }
    }
    out.extend_from_slice(&header[pos.min(header.len())..]);
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(extra.as_bytes());
    out
}

/// Joins folded lines of a header value (RFC 5322 2.2.3).
fn unfold(s: &str) -> String {
    s.replace("\r\n", "").replace('\n', "")
}

/// The `Received:` field for a message (RFC 5321 4.4), without CRLF.
pub fn received_field(
    helo: &str,
    client_ip: &str,
    hostname: &str,
    with: &str,
    queue_id: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    format!(
        "Received: from {helo} ([{client_ip}])\r\n\tby {hostname} (mfd-relay) with {with} id {queue_id};\r\n\t{}",
        now.to_rfc2822()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(rewrite: Option<&str>) -> Changes<'_> {
        Changes {
            received: "Received: from x",
            rewrite_from: rewrite,
            hostname: "relay.lan",
            unique: "ABC",
            now: chrono::DateTime::from_timestamp(1_700_000_000, 0).unwrap(),
        }
    }

    fn s(v: Vec<u8>) -> String {
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn header_end_finds_the_empty_line() {
        assert_eq!(header_end(b"A: b\r\nC: d\r\n\r\nbody"), Some(12));
        assert_eq!(header_end(b"\r\nbody"), Some(0));
        assert_eq!(header_end(b"A: b\r\nC: d\r\n"), None);
    }

    #[test]
    fn keep_adds_trace_and_missing_fields_only() {
        let h = b"From: scanner@printer.local\r\nSubject: Scan\r\n";
        let out = s(rewrite_header(h, &changes(None)));
        assert!(out.starts_with("Received: from x\r\nFrom: scanner@printer.local\r\nSubject: Scan\r\n"));
        assert!(out.contains("\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\n"));
        assert!(out.ends_with("Message-ID: <ABC@relay.lan>\r\n"));
        let full = b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@y>\r\n";
        assert_eq!(
            s(rewrite_header(full, &changes(None))),
            "Received: from x\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <x@y>\r\n"
        );
    }

    #[test]
    fn rewrite_from_keeps_name_and_adds_reply_to() {
        let h = b"From: \"Floor 3 Scanner\" <scanner@printer.local>\r\nSender: x@y\r\nSubject: Scan\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@p>\r\n";
        let out = s(rewrite_header(h, &changes(Some("scans@contoso.com"))));
        assert!(!out.contains("Sender:"), "{out}");
        assert!(!out.contains("From: \"Floor 3 Scanner\" <scanner@printer.local>"), "{out}");
        assert!(out.contains("From: \"Floor 3 Scanner\" <scans@contoso.com>\r\n"), "{out}");
        assert!(out.contains("Reply-To: \"Floor 3 Scanner\" <scanner@printer.local>\r\n"), "{out}");
        assert!(out.contains("Subject: Scan\r\n"));
        let parsed = mail_parser::MessageParser::default().parse(out.as_bytes()).unwrap();
        assert_eq!(parsed.from().unwrap().first().unwrap().address(), Some("scans@contoso.com"));
    }

    #[test]
    fn rewrite_respects_existing_reply_to_and_missing_from() {
        let h = b"From: a@b.c\r\nReply-To: boss@b.c\r\n";
        let out = s(rewrite_header(h, &changes(Some("scans@contoso.com"))));
        assert!(out.contains("From: scans@contoso.com\r\n"));
        assert_eq!(out.matches("Reply-To:").count(), 1);
        let out = s(rewrite_header(b"Subject: x\r\n", &changes(Some("scans@contoso.com"))));
        assert!(out.contains("From: scans@contoso.com\r\n") && !out.contains("Reply-To"));
        let out = s(rewrite_header(b"From: Scans@Contoso.com\r\n", &changes(Some("scans@contoso.com"))));
        assert!(!out.contains("Reply-To"), "{out}");
    }

    #[test]
    fn folded_from_is_replaced_whole() {
        let h = b"From: \"Long Name\"\r\n <a@b.c>\r\nTo: x@y\r\n";
        let out = s(rewrite_header(h, &changes(Some("s@c.d"))));
        assert!(!out.contains("<a@b.c>\r\nTo") && out.contains("To: x@y\r\n"), "{out}");
        assert!(out.contains("Reply-To: \"Long Name\" <a@b.c>\r\n"), "{out}");
    }

    #[test]
    fn garbage_header_is_survived() {
        let out = rewrite_header(b"\x00\xff garbage without colon\r\n", &changes(Some("s@c.d")));
        assert!(String::from_utf8_lossy(&out).contains("From: s@c.d\r\n"));
        let _ = rewrite_header(b"", &changes(None));
    }
}
