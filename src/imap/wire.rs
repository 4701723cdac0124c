//! Mailbox names and strings as IMAP wants them on the wire.
//!
//! IMAP4rev1 mailbox names are 7-bit: anything else is written in "modified UTF-7"
//! (RFC 3501 5.1.3), so a folder called `Gedruckt/März` becomes `Gedruckt/M&AOQ-rz`. Quoted
//! strings (RFC 3501 4.3) escape `"` and `\` and cannot hold CR or LF.

use base64::Engine as _;

/// RFC 3501 5.1.3: printable US-ASCII except `&` stands for itself, `&` is `&-`, and every
/// other run of characters is UTF-16BE in base64 (with `,` for `/`, no padding) between
/// `&` and `-`.
pub fn mutf7(name: &str) -> String {
    let engine =
        base64::engine::GeneralPurpose::new(&base64::alphabet::IMAP_MUTF7, base64::engine::general_purpose::NO_PAD);
    let mut out = String::with_capacity(name.len());
    let mut run: Vec<u16> = Vec::new();
    let flush = |run: &mut Vec<u16>, out: &mut String| {
        if !run.is_empty() {
            let bytes: Vec<u8> = run.iter().flat_map(|u| u.to_be_bytes()).collect();
            out.push('&');
            out.push_str(&engine.encode(bytes));
            out.push('-');
            run.clear();
        }
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut run, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            run.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut run, &mut out);
    out
}

/// A quoted string (RFC 3501 4.3), or `None` when the text cannot be one (CR, LF, NUL).
pub fn quoted(s: &str) -> Option<String> {
    if s.contains(['\r', '\n', '\0']) {
        return None;
    }
    Some(format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modified_utf7_follows_rfc_3501_examples() {
        assert_eq!(mutf7("INBOX"), "INBOX");
        assert_eq!(mutf7("Printed"), "Printed");
        // RFC 3501 5.1.3's example: "~peter/mail/台北/日本語".
        assert_eq!(mutf7("~peter/mail/\u{53F0}\u{5317}/\u{65E5}\u{672C}\u{8A9E}"), "~peter/mail/&U,BTFw-/&ZeVnLIqe-");
        assert_eq!(mutf7("A&B"), "A&-B");
        assert_eq!(mutf7("Gedruckt/März"), "Gedruckt/M&AOQ-rz");
        // Outside the BMP: a surrogate pair.
        assert_eq!(mutf7("\u{1F5A8}"), "&2D3dqA-");
    }

    #[test]
    fn quoting() {
        assert_eq!(quoted("INBOX").as_deref(), Some("\"INBOX\""));
        assert_eq!(quoted("a\"b\\c").as_deref(), Some("\"a\\\"b\\\\c\""));
        assert_eq!(quoted("a\r\nb"), None);
    }
}
