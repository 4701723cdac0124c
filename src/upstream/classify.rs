//! Upstream replies: what they mean for the message, and what the admin should do.
//!
//! Office 365 and Gmail answer with well-known codes whose meaning is not obvious from the
//! text (README.md, "What the printer's panel shows"). Each gets a short hint that goes into the log and
//! into the reply the person at the printer sees.

use crate::reply::{sanitize_text, Reply, Status};

/// A reply from the upstream server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamReply {
    pub code: u16,
    pub text: String,
}

impl UpstreamReply {
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        UpstreamReply { code, text: text.into() }
    }

    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The enhanced status code at the start of the text, if any (RFC 3463).
    pub fn status(&self) -> Option<Status> {
        Status::parse_prefix(&self.text)
    }

    /// What the admin should do about it, if it is a well-known refusal.
    pub fn hint(&self) -> Option<&'static str> {
        hint(self.code, &self.text)
    }

    /// One line for logs: code, text and hint.
    pub fn describe(&self) -> String {
        let text = sanitize_text(&self.text, 300);
        match self.hint() {
            Some(h) => format!("{} {} [{}]", self.code, text, h),
            None => format!("{} {}", self.code, text),
        }
    }

    /// The reply for the device: same class, the upstream's code and text, and the hint,
    /// so the person at the panel sees why (ARCHITECTURE.md, "In-session delivery").
    pub fn to_device_reply(&self) -> Reply {
        let status = self.status().unwrap_or(if self.is_permanent() { Status(5, 0, 0) } else { Status(4, 0, 0) });
        let text =
            self.text.split_whitespace().skip(usize::from(self.status().is_some())).collect::<Vec<_>>().join(" ");
        let text = sanitize_text(&text, 300);
        let code = if (400..600).contains(&self.code) { self.code } else { 451 };
        let line = match self.hint() {
            Some(h) => format!("Upstream refused: {text} ({h})"),
            None => format!("Upstream refused: {text}"),
        };
        Reply::with(code, status, line)
    }
}

/// Hints for well-known refusals of Office 365 and Gmail.
pub fn hint(code: u16, text: &str) -> Option<&'static str> {
    let t = text.to_ascii_lowercase();
    let has = |s: &str| t.contains(s);
    if has("5.7.139") {
        Some("SMTP AUTH is disabled for this mailbox or tenant (security defaults); enable authenticated SMTP for the mailbox")
    } else if has("5.2.252") || has("sendasdenied") {
        Some("the From address is not the identity's mailbox: set from = \"rewrite\" on the device, or grant Send As")
    } else if has("5.7.30") {
        Some("basic authentication was refused; the provider must be reached with OAuth")
    } else if code == 535 && (has("5.7.3") || has("5.7.8")) {
        Some("the provider refused the token: check the app's SMTP.Send (or SMTP.SendAsApp) permission, admin consent, and the mailbox name")
    } else if has("4.7.66") {
        Some("the provider refused the TLS version")
    } else if has("5.6.11") || has("barelinefeed") {
        Some("bare LF refused upstream")
    } else if has("5.7.57") {
        Some("the upstream did not see an authenticated session")
    } else if has("4.7.0") && has("throttl") || has("5.4.5") || has("4.4.2 message submission rate") {
        Some(
            "the mailbox's sending limit was reached; lower messages_per_minute or spread devices over more identities",
        )
    } else if has("5.3.4") || has("message size exceeds") {
        Some("the message is larger than the provider accepts")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_as_denied_reaches_the_device_with_a_hint() {
        let r = UpstreamReply::new(554, "5.2.252 SendAsDenied; scans@contoso.com not allowed to send as scanner@printer.local; STOREDRV.Submission.Exception");
        let d = r.to_device_reply();
        assert_eq!(d.code, 554);
        assert_eq!(d.status, Some(Status(5, 2, 252)));
        let text = d.text();
        assert!(text.starts_with("Upstream refused: SendAsDenied;"), "{text}");
        assert!(text.contains("from = \"rewrite\""), "{text}");
    }

    #[test]
    fn hints_for_known_codes() {
        assert!(hint(535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant")
            .unwrap()
            .contains("disabled"));
        assert!(hint(535, "5.7.3 Authentication unsuccessful").unwrap().contains("token"));
        assert!(hint(550, "5.7.30 Basic authentication is not supported for Client Submission")
            .unwrap()
            .contains("basic"));
        assert!(hint(250, "2.0.0 OK").is_none());
    }

    #[test]
    fn device_reply_is_one_clean_line() {
        let r = UpstreamReply::new(550, "5.1.1 <x@y>: Recipient\r\naddress rejected");
        let bytes = r.to_device_reply().to_bytes();
        assert_eq!(bytes.iter().filter(|&&b| b == b'\n').count(), 1);
        let r = UpstreamReply::new(451, "try later");
        assert_eq!(r.to_device_reply().status, Some(Status(4, 0, 0)));
    }
}
