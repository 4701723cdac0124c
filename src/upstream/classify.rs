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
///
/// The enhanced status code (RFC 3463) decides where there is one, compared as a whole: a text
/// search for "5.2.2" would also find "5.2.252". Exchange's variants of one code differ only in
/// the words after it, so those are matched too.
pub fn hint(code: u16, text: &str) -> Option<&'static str> {
    let t = text.to_ascii_lowercase();
    let has = |s: &str| t.contains(s);
    let status = Status::parse_prefix(text).map(|Status(a, b, c)| (a, b, c));
    match status {
        Some((5, 7, 139)) if has("security defaults") => Some(
            "security defaults are on for the tenant: they block SMTP AUTH whatever the mailbox's own switch says; \
             turn them off in favour of Conditional Access, or send through Graph",
        ),
        Some((5, 7, 139)) => Some(
            "SMTP AUTH is disabled for this mailbox or tenant (security defaults); enable authenticated SMTP for the mailbox",
        ),
        Some((4, 3, 2)) => Some(
            "Exchange allows 3 SMTP connections per mailbox at once: the relay opens fewer for a while and retries",
        ),
        Some((5, 2, 0)) if has("submissionquotaexceeded") => Some(
            "the mailbox reached its daily sending limit (10,000 recipients a day): spread devices over more identities",
        ),
        Some((5, 2, 2)) if has("library is full") || has("storagequotaexceeded") => Some(
            "the folder destination's storage is full: free space in the library or drive, or raise its quota",
        ),
        Some((5, 2, 2)) => Some(
            "the mailbox is full, most likely its Sent Items (every message sent by SMTP AUTH is kept there): \
             give the scan mailbox a retention policy that empties Sent Items",
        ),
        Some((5, 7, 60)) => Some(
            "the identity may not send as this From address: grant it Send As on that mailbox, or set from = \"rewrite\" on the device",
        ),
        Some((5, 2, 252)) => SEND_AS,
        Some((5, 7, 30)) => BASIC_AUTH,
        Some((5, 7, 3 | 8)) if code == 535 => TOKEN_REFUSED,
        Some((4, 7, 66)) => Some("the provider refused the TLS version"),
        Some((5, 6, 11)) => BARE_LF,
        Some((5, 7, 57)) => Some("the upstream did not see an authenticated session"),
        Some((5, 4, 5)) => RATE,
        Some((4, 4, 2)) if has("message submission rate") => RATE,
        Some((4, 7, 0)) if has("throttl") => RATE,
        Some((5, 3, 4)) => TOO_BIG,
        // No (or no known) enhanced status code: the words alone.
        _ if has("sendasdenied") => SEND_AS,
        _ if has("barelinefeed") => BARE_LF,
        _ if has("message size exceeds") => TOO_BIG,
        _ if has("concurrent connections limit") => Some(
            "Exchange allows 3 SMTP connections per mailbox at once: the relay opens fewer for a while and retries",
        ),
        // Microsoft Graph's error codes (upstream::graph).
        _ if has("erroraccessdenied") => Some(
            "the app may not send as this mailbox through Graph: grant it with Exchange RBAC for Applications \
             (New-ManagementRoleAssignment -Role \"Application Mail.Send\" -App <app id> -CustomResourceScope <scope>; \
             \"Application Mail.ReadWrite\" too for scans over 3 MB) and allow up to 2 hours",
        ),
        _ if has("mailboxnotenabledforrestapi") => Some(
            "Graph cannot use this mailbox: it must be a licensed Exchange Online mailbox (not on-premises, inactive or soft-deleted)",
        ),
        _ => None,
    }
}

const SEND_AS: Option<&str> =
    Some("the From address is not the identity's mailbox: set from = \"rewrite\" on the device, or grant Send As");
const BASIC_AUTH: Option<&str> = Some("basic authentication was refused; the provider must be reached with OAuth");
const TOKEN_REFUSED: Option<&str> = Some(
    "the provider refused the token: check the app's SMTP.Send (or SMTP.SendAsApp) permission, admin consent, and the mailbox name",
);
const BARE_LF: Option<&str> = Some("bare LF refused upstream");
const RATE: Option<&str> =
    Some("the mailbox's sending limit was reached; lower messages_per_minute or spread devices over more identities");
const TOO_BIG: Option<&str> = Some("the message is larger than the provider accepts");

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
    fn exchange_limits_and_permissions_get_their_own_hints() {
        let h = |code, text| hint(code, text).unwrap_or_default();
        assert!(h(432, "4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending")
            .contains("3 SMTP connections"));
        assert!(h(
            554,
            "5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException; Failed to process message"
        )
        .contains("daily sending limit"));
        assert!(
            h(554, "5.2.2 mailbox full; STOREDRV.Submission.Exception:QuotaExceededException").contains("Sent Items")
        );
        assert!(h(550, "5.7.60 SMTP; Client does not have permissions to send as this sender").contains("Send As"));
        let defaults = h(535, "5.7.139 Authentication unsuccessful, user is locked by your organization's security defaults policy. Contact your administrator.");
        assert!(
            defaults.contains("security defaults are on") && defaults.contains("whatever the mailbox's own switch"),
            "{defaults}"
        );
        assert!(h(535, "5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Mailbox")
            .contains("enable authenticated SMTP"));
    }

    #[test]
    fn a_code_is_compared_whole() {
        // 5.2.252 is SendAsDenied, not the full mailbox of 5.2.2.
        assert!(hint(554, "5.2.252 SendAsDenied; x not allowed to send as y").unwrap().contains("rewrite"));
        assert!(hint(554, "5.2.2 mailbox full").unwrap().contains("Sent Items"));
        // A 5.2.0 that is not the quota gets no quota hint.
        assert!(hint(554, "5.2.0 STOREDRV.Submission.Exception:OtherException").is_none());
        // Texts without an enhanced code still get the word-based hints.
        assert!(hint(550, "SendAsDenied").unwrap().contains("rewrite"));
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
