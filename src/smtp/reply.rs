//! SMTP replies as typed values: a code (RFC 5321 4.2), an enhanced status code
//! (RFC 3463, advertised with ENHANCEDSTATUSCODES, RFC 2034) and text lines.
//!
//! Replies are built from named constructors so that the session reads like a transcript
//! and every code/status pair is chosen in one place.

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
    pub fn new(code: u16, status: Option<Status>, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply { code, status, lines: vec![text.into()] }
    }

    pub fn with(code: u16, status: Status, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::new(code, Some(status), text)
    }

    pub fn multi(code: u16, lines: Vec<Cow<'static, str>>) -> Reply {
        Reply { code, status: None, lines }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

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

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        self.write_to(&mut v);
        v
    }

    // ---- The replies the session uses, named after what they mean. ----

    pub fn greeting(host: &str) -> Reply {
        Reply::new(220, None, format!("{host} ESMTP mfd-relay ready"))
    }
    pub fn ok() -> Reply {
        Reply::with(250, Status(2, 0, 0), "OK")
    }
    pub fn sender_ok() -> Reply {
        Reply::with(250, Status(2, 1, 0), "Sender OK")
    }
    pub fn recipient_ok() -> Reply {
        Reply::with(250, Status(2, 1, 5), "Recipient OK")
    }
    pub fn reset() -> Reply {
        Reply::with(250, Status(2, 0, 0), "Reset")
    }
    pub fn start_data() -> Reply {
        Reply::new(354, None, "Start mail input; end with <CRLF>.<CRLF>")
    }
    pub fn bye(host: &str) -> Reply {
        Reply::with(221, Status(2, 0, 0), format!("{host} closing connection"))
    }
    pub fn ready_for_tls() -> Reply {
        Reply::with(220, Status(2, 0, 0), "Ready to start TLS")
    }
    pub fn auth_ok() -> Reply {
        Reply::with(235, Status(2, 7, 0), "Authentication successful")
    }
    /// RFC 4954 4: a server challenge (base64 text).
    pub fn auth_challenge(b64: &'static str) -> Reply {
        Reply::new(334, None, b64)
    }
    pub fn vrfy() -> Reply {
        // RFC 5321 3.5.3: 252 when the server will accept but cannot verify.
        Reply::with(252, Status(2, 5, 0), "Cannot VRFY user, but will accept message and attempt delivery")
    }
    pub fn help() -> Reply {
        Reply::with(214, Status(2, 0, 0), "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP QUIT VRFY HELP")
    }

    pub fn syntax(text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::with(501, Status(5, 5, 4), text)
    }
    pub fn unknown_command() -> Reply {
        Reply::with(500, Status(5, 5, 1), "Command not recognized")
    }
    pub fn line_too_long() -> Reply {
        Reply::with(500, Status(5, 5, 6), "Line too long")
    }
    pub fn bad_sequence(text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::with(503, Status(5, 5, 1), text)
    }
    pub fn not_implemented(text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::with(502, Status(5, 5, 1), text)
    }
    pub fn param_not_recognized(text: impl Into<Cow<'static, str>>) -> Reply {
        // RFC 5321 4.1.1.11 / RFC 1869: unrecognised MAIL/RCPT parameters get 555.
        Reply::with(555, Status(5, 5, 4), text)
    }
    pub fn mechanism_unsupported() -> Reply {
        Reply::with(504, Status(5, 5, 4), "Unrecognized authentication type")
    }
    pub fn auth_cancelled() -> Reply {
        Reply::with(501, Status(5, 0, 0), "Authentication cancelled")
    }
    pub fn auth_failed() -> Reply {
        // RFC 4954 6: 535 5.7.8 for bad credentials.
        Reply::with(535, Status(5, 7, 8), "Authentication credentials invalid")
    }
    pub fn auth_throttled() -> Reply {
        Reply::with(454, Status(4, 7, 0), "Too many failed logins from your address; try again later")
    }
    pub fn auth_required() -> Reply {
        Reply::with(530, Status(5, 7, 0), "Authentication required")
    }
    pub fn tls_required() -> Reply {
        Reply::with(530, Status(5, 7, 0), "Must issue a STARTTLS command first")
    }
    pub fn tls_unavailable() -> Reply {
        Reply::with(454, Status(4, 7, 0), "TLS not available")
    }
    pub fn not_a_device() -> Reply {
        Reply::with(
            550,
            Status(5, 7, 1),
            "Relaying denied: this address is not a configured device (log in, or ask IT to add it)",
        )
    }
    pub fn recipient_not_allowed() -> Reply {
        Reply::with(550, Status(5, 7, 1), "Recipient not allowed for this device")
    }
    pub fn too_many_recipients() -> Reply {
        // RFC 5321 4.5.3.1.10: 452 makes the client send the rest in another transaction.
        Reply::with(452, Status(4, 5, 3), "Too many recipients")
    }
    pub fn bad_address(text: impl Into<Cow<'static, str>>) -> Reply {
        Reply::with(553, Status(5, 1, 3), text)
    }
    pub fn message_too_big(limit: u64) -> Reply {
        Reply::with(552, Status(5, 3, 4), format!("Message too big (limit {limit} bytes)"))
    }
    /// A message that cannot be made valid (RFC 3463 5.6.0), or whose header section is
    /// over the limit (5.3.4).
    pub fn message_refused(why: &crate::message::Refusal) -> Reply {
        let text = format!("Message refused: {}", sanitize_text(&why.to_string(), 200));
        match why {
            crate::message::Refusal::HeaderTooBig => Reply::with(552, Status(5, 3, 4), text),
            _ => Reply::with(554, Status(5, 6, 0), text),
        }
    }
    pub fn storage_failed() -> Reply {
        Reply::with(452, Status(4, 3, 1), "Insufficient system storage; try again later")
    }
    pub fn local_error() -> Reply {
        Reply::with(451, Status(4, 3, 0), "Local error; try again later")
    }
    pub fn needs_login(identity: &str) -> Reply {
        Reply::with(
            451,
            Status(4, 7, 0),
            format!("Mailbox sign-in for \"{identity}\" expired; IT must run: mfd-relay auth login {identity}"),
        )
    }
    pub fn too_many_errors() -> Reply {
        Reply::with(421, Status(4, 7, 0), "Too many errors; closing connection")
    }
    pub fn timeout(host: &str) -> Reply {
        Reply::with(421, Status(4, 4, 2), format!("{host} timeout exceeded; closing connection"))
    }
    pub fn too_many_connections() -> Reply {
        Reply::with(421, Status(4, 7, 0), "Too many connections; try again later")
    }
    pub fn shutting_down(host: &str) -> Reply {
        Reply::with(421, Status(4, 3, 2), format!("{host} shutting down; try again later"))
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
        assert_eq!(Reply::ok().to_bytes(), b"250 2.0.0 OK\r\n");
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
