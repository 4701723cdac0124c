//! An oversize scan sent as links (`[[identity]] oversize = "link"`): the message without its
//! attachments, wrapped in a `multipart/mixed` whose first part is a short text listing the
//! saved files (RFC 2046 5.1.3), the rest of the original message its second part. The
//! original header fields stay on top (From, To, Subject, Date, Message-ID, Received), its
//! MIME fields move down with its body, so whatever the device sent (one text part, a
//! multipart, an empty message that was one file) stays readable.

use super::{fields, Field};

/// Whether a header field describes the body (it moves into the nested part).
fn is_mime(f: &Field<'_>) -> bool {
    f.name.len() >= 8 && f.name[..8].eq_ignore_ascii_case(b"content-") || f.is("MIME-Version")
}

fn push_field(out: &mut Vec<u8>, f: &Field<'_>) {
    out.extend_from_slice(f.name);
    out.push(b':');
    out.extend_from_slice(f.value);
    out.extend_from_slice(b"\r\n");
    for m in &f.more {
        out.extend_from_slice(m);
        out.extend_from_slice(b"\r\n");
    }
}

/// `rest` (a message, CRLF, without its large attachments) with `text` as a first part.
/// `unique` makes the boundary (it is lengthened until it occurs nowhere in `rest`).
pub fn with_links(rest: &[u8], text: &str, unique: &str) -> Vec<u8> {
    let (header, body) = match rest.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => (&rest[..i + 2], &rest[i + 4..]),
        None => (rest, &[][..]),
    };
    let mut boundary = format!("=_mfd-relay-links.{unique}");
    while rest.windows(boundary.len()).any(|w| w == boundary.as_bytes()) {
        boundary.push('x');
    }
    let all = fields(header);
    let mut out = Vec::with_capacity(rest.len() + text.len() + 512);
    for f in all.iter().filter(|f| !is_mime(f)) {
        push_field(&mut out, f);
    }
    out.extend_from_slice(
        format!("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n").as_bytes(),
    );
    out.extend_from_slice(
        format!("--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
            .as_bytes(),
    );
    for line in text.lines() {
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
    for f in all.iter().filter(|f| is_mime(f) && !f.is("MIME-Version")) {
        push_field(&mut out, f);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MessageParser;

    #[test]
    fn the_links_come_first_and_the_rest_of_the_message_stays_readable() {
        let rest = b"Received: from mfp\r\nFrom: scans@c.test\r\nTo: a@c.test\r\nSubject: big scan\r\n\
            MIME-Version: 1.0\r\nContent-Type: multipart/mixed;\r\n boundary=b\r\n\r\n\
            --b\r\nContent-Type: text/plain\r\n\r\nScanned on MFP-1\r\n--b--\r\n";
        let m = with_links(rest, "scan.pdf (300.0 MB)\n  https://c.sharepoint.com/x", "42");
        let parsed = MessageParser::default().parse(&m).expect("parses");
        assert_eq!(parsed.subject(), Some("big scan"));
        assert_eq!(parsed.to().and_then(|t| t.first()).and_then(|a| a.address()), Some("a@c.test"));
        let text = parsed.body_text(0).expect("links text");
        assert!(text.contains("https://c.sharepoint.com/x"), "{text}");
        assert!(parsed.body_text(1).expect("original text").contains("Scanned on MFP-1"));
        assert_eq!(parsed.attachment_count(), 0);
        let s = String::from_utf8(m).unwrap();
        assert_eq!(s.matches("MIME-Version").count(), 1, "{s}");
        assert!(s.starts_with("Received: from mfp\r\n"), "{s}");
        assert!(
            s.contains("--=_mfd-relay-links.42\r\nContent-Type: multipart/mixed;\r\n boundary=b\r\n\r\n--b\r\n"),
            "{s}"
        );
    }

    #[test]
    fn a_boundary_that_occurs_in_the_message_is_lengthened() {
        let rest = b"Subject: x\r\n\r\n--=_mfd-relay-links.1\r\n";
        let m = String::from_utf8(with_links(rest, "l", "1")).unwrap();
        assert!(m.contains("boundary=\"=_mfd-relay-links.1x\""), "{m}");
        let parsed = MessageParser::default().parse(m.as_bytes()).expect("parses");
        assert_eq!(parsed.parts.len(), 3, "root, links, rest");
    }
}
