//! SMTP replies as typed values: a code (RFC 5321 4.2), an enhanced status code
//! (RFC 3463, advertised with ENHANCEDSTATUSCODES, RFC 2034) and text lines.
//!
//! A leaf module: the device-facing session (`smtp`), the upstream client (`upstream`), the
//! queue's bounces and the mailbox poller all speak in these values, so it imports nothing
//! from the relay. The replies the session sends are named in `smtp::reply`
//! (ARCHITECTURE.md, "Where each reply comes from").

use std::borrow::Cow;
use std::fmt;

/// An RFC 3463 enhanced status code `class.subject.detail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u8, pub u16, pub u16);

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Status {
    /// Finds an enhanced status code at the start of `text` ("5.7.139 Authentication...").
    pub fn parse_prefix(text: &str) -> Option<Status> {
        let word = text.split_whitespace().next()?;
        let mut parts = word.split('.');
        let class: u8 = parts.next()?.parse().ok()?;
        let subject: u16 = parts.next()?.parse().ok()?;
        let detail: u16 = parts.next()?.parse().ok()?;
        if parts.next().is_some() || !matches!(class, 2 | 4 | 5) {
            return None;
        }
        Some(Status(class, subject, detail))
    }
}

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: Option<Status>,
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    /// A one-line reply.
    pub fn new(code: u16, status: Option<Status>, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply { code, status, lines: vec![text.into()] }
    }

    /// A one-line reply with an enhanced status code.
    pub fn with(code: u16, status: Status, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::new(code, Some(status), text)
    }

    /// A multi-line reply without enhanced status codes (EHLO, RFC 5321 4.2.1).
    pub fn multi(code: u16, lines: Vec<Cow<'static, str>>) -> Reply {
        Reply { code, status: None, lines }
    }

    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// 4xx: the client may try again (RFC 5321 4.2.1).
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx: the client must not repeat the same command.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The text of all lines joined by spaces (for logs).
    pub fn text(&self) -> String {
        self.lines.join(" ")
    }

    /// Appends the wire form to `out`: `code-status text` CRLF per line, `code status text` last.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        let n = self.lines.len().max(1);
        for i in 0..n {
            let sep = if i + 1 == n { ' ' } else { '-' };
            let text = self.lines.get(i).map(|l| l.as_ref()).unwrap_or("");
            // Writing into a Vec cannot fail.
            let _ = match self.status {
                Some(s) => write!(out, "{}{}{} {}\r\n", self.code, sep, s, text),
                None => write!(out, "{}{}{}\r\n", self.code, sep, text),
            };
        }
    }

    /// The wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        self.write_to(&mut v);
        v
    }
}

/// Makes untrusted text (an upstream reply) safe to put in a reply line: printable ASCII,
/// no CR/LF, bounded length.
pub fn sanitize_text(text: &str, max: usize) -> String {
    let mut out: String = text.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { ' ' }).collect();
    if out.len() > max {
        out.truncate(max);
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_line_with_status() {
        assert_eq!(Reply::with(250, Status(2, 0, 0), "OK").to_bytes(), b"250 2.0.0 OK\r\n");
    }

    #[test]
    fn multi_line_uses_dashes() {
        let r = Reply::multi(250, vec!["host".into(), "SIZE 10".into(), "8BITMIME".into()]);
        assert_eq!(r.to_bytes(), b"250-host\r\n250-SIZE 10\r\n250 8BITMIME\r\n");
    }

    #[test]
    fn status_prefix_parsing() {
        assert_eq!(Status::parse_prefix("5.7.139 Authentication unsuccessful"), Some(Status(5, 7, 139)));
        assert_eq!(Status::parse_prefix("Authentication unsuccessful"), None);
        assert_eq!(Status::parse_prefix("1.2.3 x"), None);
        assert_eq!(Status::parse_prefix("5.7 x"), None);
    }

    #[test]
    fn sanitize_strips_controls() {
        assert_eq!(sanitize_text("a\r\nb\x00c", 100), "a  b c");
        assert_eq!(sanitize_text("abcdef", 3), "abc...");
    }
}
