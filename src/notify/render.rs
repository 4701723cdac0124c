//! What a notification says: its title and text (what is wrong, what to do), the mail the
//! relay queues for `[notify] email`, and the body of each webhook format. Pure functions.

use std::fmt::Write as _;

use serde_json::json;

use super::policy::{utc, Change, Event, Kind};
use crate::config::WebhookFormat;

/// What every notification mentions besides the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// `[relay] hostname`: which relay speaks.
    pub hostname: String,
    /// The status page.
    pub status_url: Option<String>,
    /// Where it can be opened from (a loopback listener).
    pub status_note: Option<String>,
}

/// No line breaks or other controls in what goes into one line (a header, a title).
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect::<String>().trim().to_string()
}

/// The one-line title of an event.
pub fn title(e: &Event) -> String {
    let c = &e.condition;
    let s = &c.subject;
    let cleared = e.change == Change::Cleared;
    let t = match (c.kind, cleared) {
        (Kind::NeedsLogin, false) if c.delegated => format!("Identity \"{s}\" needs a sign-in"),
        (Kind::NeedsLogin, true) if c.delegated => format!("Identity \"{s}\" is signed in again"),
        (Kind::NeedsLogin, false) => format!("Identity \"{s}\" (app-only) cannot get a token"),
        (Kind::NeedsLogin, true) => format!("Identity \"{s}\" (app-only) gets tokens again"),
        (Kind::RefreshFailing, false) => format!("Token refreshes for \"{s}\" have failed for 15 minutes"),
        (Kind::RefreshFailing, true) => format!("Token refreshes for \"{s}\" work again"),
        (Kind::QueueOld, false) => "A message has waited more than 30 minutes".to_string(),
        (Kind::QueueOld, true) => "No message waits more than 30 minutes any more".to_string(),
        (Kind::CertificateExpiring, false) => {
            format!("The client certificate of provider \"{s}\" expires within 30 days")
        }
        (Kind::CertificateExpiring, true) => format!("The client certificate of provider \"{s}\" was renewed"),
        (Kind::MailboxStale, false) => format!("Mailbox \"{s}\" has not been checked for 15 minutes"),
        (Kind::MailboxStale, true) => format!("Mailbox \"{s}\" is checked again"),
    };
    let prefix = match e.change {
        Change::Started => "PROBLEM",
        Change::Reminder => "STILL",
        Change::Cleared => "RESOLVED",
    };
    one_line(&format!("{prefix}: {t}"))
}

/// What to do (for a start or a reminder), as plain text lines.
fn advice(e: &Event) -> Vec<String> {
    let c = &e.condition;
    let s = &c.subject;
    match c.kind {
        Kind::NeedsLogin if c.delegated => vec![
            "Its mail waits in the queue and its devices are told 451 4.7.0 until someone signs in.".into(),
            format!("Run on the relay's host: mfd-relay auth login {s}"),
        ],
        Kind::NeedsLogin => {
            vec!["Its mail waits in the queue. Check the app's secret or certificate and its admin consent in the \
             provider's portal; the relay keeps trying."
                .into()]
        }
        Kind::RefreshFailing => vec![
            "The provider is unreachable or erroring; the relay keeps retrying and mail stays queued.".into(),
            "mfd-relay auth status shows the last error; check the network to the provider.".into(),
        ],
        Kind::QueueOld => vec!["mfd-relay queue list shows each message's last error.".into()],
        Kind::CertificateExpiring => {
            vec!["Make a new certificate, upload it to the app registration, and update client_certificate and \
             client_key."
                .into()]
        }
        Kind::MailboxStale => {
            vec!["Mobile print is not picking up mail: check the identity's sign-in and the relay log.".into()]
        }
    }
}

/// The text of an event: title, details, what to do, the status page.
pub fn text(e: &Event, ctx: &Context) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "{}", title(e));
    let _ = writeln!(t, "Relay: {}", one_line(&ctx.hostname));
    let _ = writeln!(t, "Since: {}", utc(e.since));
    if e.change == Change::Cleared {
        let _ = writeln!(t, "Cleared: {}", utc(e.at));
    } else {
        if !e.condition.detail.is_empty() {
            let _ = writeln!(t, "Details: {}", one_line(&e.condition.detail));
        }
        for line in advice(e) {
            let _ = writeln!(t, "{line}");
        }
        if e.flapping {
            let _ = writeln!(
                t,
                "This came and went several times today; further changes are not reported until it lasts a day."
            );
        }
    }
    match (&ctx.status_url, &ctx.status_note) {
        (Some(url), Some(note)) => {
            let _ = writeln!(t, "Status page: {url} ({note})");
        }
        (Some(url), None) => {
            let _ = writeln!(t, "Status page: {url}");
        }
        _ => {}
    }
    t
}

use crate::message::header_text;

/// The mail for `[notify] email`: one message for the events of one check (RFC 5322, CRLF).
pub fn mail(events: &[Event], ctx: &Context, from: &str, to: &str, now: i64, unique: u64) -> Vec<u8> {
    let subject = match events {
        [one] => title(one),
        many => format!("{} changes: {}", many.len(), many.iter().map(title).collect::<Vec<_>>().join("; ")),
    };
    let date = chrono::DateTime::from_timestamp(now, 0).unwrap_or_default().to_rfc2822();
    let mut m = String::new();
    let _ = write!(
        m,
        "From: mfd-relay <{from}>\r\nTo: <{to}>\r\nSubject: [mfd-relay {}] {}\r\nDate: {date}\r\n\
         Message-ID: <notify.{now}.{unique}@{}>\r\nAuto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n",
        header_text(&ctx.hostname),
        header_text(&subject),
        one_line(&ctx.hostname).replace(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'), "-"),
    );
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            m.push_str("\r\n");
        }
        for line in text(e, ctx).lines() {
            m.push_str(line);
            m.push_str("\r\n");
        }
    }
    m.into_bytes()
}

/// The body of a webhook POST in `format`.
pub fn webhook(format: WebhookFormat, e: &Event, ctx: &Context) -> serde_json::Value {
    let title = title(e);
    let body = text(e, ctx);
    let details: String = body.lines().skip(1).collect::<Vec<_>>().join("\n");
    match format {
        WebhookFormat::Json => json!({
            "relay": ctx.hostname,
            "event": e.change.as_str(),
            "condition": e.condition.kind.as_str(),
            "subject": e.condition.subject,
            "key": e.condition.key(),
            "title": title,
            "text": body,
            "detail": e.condition.detail,
            "since": e.since,
            "at": e.at,
            "status_url": ctx.status_url,
            "command": (e.condition.kind == Kind::NeedsLogin && e.condition.delegated)
                .then(|| format!("mfd-relay auth login {}", e.condition.subject)),
        }),
        // A Teams Workflows webhook ("when a Teams webhook request is received") posts the
        // Adaptive Cards found in `attachments`.
        WebhookFormat::Teams => {
            let color = if e.change == Change::Cleared { "Good" } else { "Attention" };
            let mut card = json!({
                "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                "type": "AdaptiveCard",
                "version": "1.4",
                "body": [
                    {"type": "TextBlock", "text": title, "weight": "Bolder", "size": "Medium", "wrap": true, "color": color},
                    {"type": "TextBlock", "text": details, "wrap": true},
                ],
            });
            if let Some(url) = &ctx.status_url {
                card["actions"] = json!([{"type": "Action.OpenUrl", "title": "Status page", "url": url}]);
            }
            json!({
                "type": "message",
                "summary": title,
                "attachments": [{
                    "contentType": "application/vnd.microsoft.card.adaptive",
                    "contentUrl": null,
                    "content": card,
                }],
            })
        }
        // Slack incoming webhooks take `text` (mrkdwn); the title in bold.
        WebhookFormat::Slack => json!({ "text": format!("*{}*\n{}", slack_escape(&title), slack_escape(&details)) }),
    }
}

/// Slack's three control characters (https://api.slack.com/reference/surfaces/formatting).
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::policy::Condition;

    fn event(change: Change) -> Event {
        Event {
            change,
            condition: Condition {
                kind: Kind::NeedsLogin,
                subject: "office".into(),
                identity: Some("office".into()),
                delegated: true,
                detail: "AADSTS50173: the grant was revoked\r\nInjected: header".into(),
            },
            since: 1_800_000_000,
            at: 1_800_000_060,
            flapping: false,
        }
    }

    fn ctx() -> Context {
        Context {
            hostname: "relay.test".into(),
            status_url: Some("http://127.0.0.1:9925/status".into()),
            status_note: Some("on the relay's host".into()),
        }
    }

    #[test]
    fn a_sign_in_says_what_to_run_and_where_to_look() {
        let t = text(&event(Change::Started), &ctx());
        assert!(t.starts_with("PROBLEM: Identity \"office\" needs a sign-in\n"), "{t}");
        assert!(t.contains("mfd-relay auth login office"), "{t}");
        assert!(t.contains("Status page: http://127.0.0.1:9925/status (on the relay's host)"), "{t}");
        assert!(t.contains("Details: AADSTS50173: the grant was revoked  Injected: header"), "{t}");
        let t = text(&event(Change::Cleared), &ctx());
        assert!(t.starts_with("RESOLVED: Identity \"office\" is signed in again\n"), "{t}");
        assert!(!t.contains("auth login"), "{t}");
    }

    #[test]
    fn the_mail_is_one_message_with_safe_headers() {
        let text =
            String::from_utf8(mail(&[event(Change::Started)], &ctx(), "scans@x.test", "it@x.test", 1_800_000_060, 7))
                .unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains("\r\nSubject: [mfd-relay relay.test] PROBLEM: Identity \"office\" needs a sign-in\r\n"),
            "{head}"
        );
        assert!(head.starts_with("From: mfd-relay <scans@x.test>\r\nTo: <it@x.test>\r\n"), "{head}");
        assert!(head.contains("Auto-Submitted: auto-generated"));
        assert!(!body.contains("\r\nInjected:"), "{body}");
        assert!(text.split("\r\n").all(|l| !l.contains('\n') && !l.contains('\r')), "CRLF only");
        let parsed = mail_parser::MessageParser::default().parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.subject(), Some("[mfd-relay relay.test] PROBLEM: Identity \"office\" needs a sign-in"));
        // Two events of one check: one mail.
        let two =
            String::from_utf8(mail(&[event(Change::Started), event(Change::Cleared)], &ctx(), "a@b.c", "d@e.f", 0, 1))
                .unwrap();
        assert!(two.contains("Subject: [mfd-relay relay.test] 2 changes: PROBLEM"), "{two}");
        // A name that is not ASCII is encoded in the subject.
        let mut e = event(Change::Started);
        e.condition.subject = "bureau-é".into();
        let m = String::from_utf8(mail(&[e], &ctx(), "a@b.c", "d@e.f", 0, 1)).unwrap();
        assert!(m.contains("Subject: [mfd-relay relay.test] =?utf-8?B?"), "{m}");
    }

    #[test]
    fn each_webhook_format() {
        let e = event(Change::Started);
        let j = webhook(WebhookFormat::Json, &e, &ctx());
        assert_eq!(j["event"], "started");
        assert_eq!(j["condition"], "needs_login");
        assert_eq!(j["subject"], "office");
        assert_eq!(j["command"], "mfd-relay auth login office");
        assert_eq!(j["status_url"], "http://127.0.0.1:9925/status");
        let t = webhook(WebhookFormat::Teams, &e, &ctx());
        assert_eq!(t["type"], "message");
        assert_eq!(t["attachments"][0]["contentType"], "application/vnd.microsoft.card.adaptive");
        let card = &t["attachments"][0]["content"];
        assert_eq!(card["type"], "AdaptiveCard");
        assert_eq!(card["body"][0]["text"], "PROBLEM: Identity \"office\" needs a sign-in");
        assert!(card["body"][1]["text"].as_str().unwrap().contains("mfd-relay auth login office"));
        assert_eq!(card["actions"][0]["url"], "http://127.0.0.1:9925/status");
        let s = webhook(WebhookFormat::Slack, &e, &ctx());
        let text = s["text"].as_str().unwrap();
        assert!(text.starts_with("*PROBLEM: Identity \"office\" needs a sign-in*\n"), "{text}");
        assert!(text.contains("mfd-relay auth login office"), "{text}");
    }
}
