//! The answer to a refused mail (`reply_refused = true`): a short text telling the sender why
//! nothing was printed, queued through the relay's own queue and sent as the mailbox's
//! identity, like a bounce.
//!
//! It is an automatic response in the sense of RFC 3834: it carries `Auto-Submitted:
//! auto-replied` (3.1.7), `In-Reply-To`/`References` (3.1.4), and it is never sent to a mail
//! that is itself automatic (`Auto-Submitted` other than `no`, `Precedence: bulk|list|junk`,
//! `List-Id`, 2), to a null or mailer-daemon sender, or to the mailbox itself; the queue never
//! bounces it (`is_bounce`), so two robots cannot keep answering each other.

use std::fmt::Write as _;

use base64::Engine as _;
use mail_parser::Message;

use crate::queue::Queue;

/// What the answer says.
pub struct Answer<'a> {
    /// The mailbox's identity address (the only From the provider accepts).
    pub from: &'a str,
    pub to: &'a str,
    pub mailbox: &'a str,
    pub subject: Option<&'a str>,
    pub message_id: Option<&'a str>,
    pub reason: &'a str,
    pub hostname: &'a str,
    pub now: chrono::DateTime<chrono::Utc>,
    /// Unique part of the answer's Message-ID.
    pub unique: &'a str,
}

/// Whether a mail may be answered automatically (RFC 3834 2), and to whom.
pub fn should_answer(msg: &Message<'_>, sender: &str, own_address: &str) -> bool {
    let header = |name: &str| msg.header_raw(name).map(|v| v.trim().to_ascii_lowercase());
    if header("Auto-Submitted").is_some_and(|v| !v.starts_with("no")) {
        return false;
    }
    if header("Precedence").is_some_and(|v| matches!(v.as_str(), "bulk" | "list" | "junk")) {
        return false;
    }
    if header("List-Id").is_some() || header("List-Unsubscribe").is_some() {
        return false;
    }
    let s = sender.trim().to_ascii_lowercase();
    let local = s.split('@').next().unwrap_or("");
    !(s.is_empty()
        || !s.contains('@')
        || matches!(local, "mailer-daemon" | "postmaster" | "noreply" | "no-reply")
        || s == own_address.trim().to_ascii_lowercase())
}

/// An unstructured header value: RFC 2047 encoded-words when it is not plain ASCII.
pub fn encode_header_text(text: &str) -> String {
    let clean: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if clean.is_ascii() {
        return clean;
    }
    // RFC 2047 2: encoded-words of at most 75 characters; 45 bytes of UTF-8 make 60 of base64.
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in clean.chars() {
        if chunk.len() + c.len_utf8() > 45 {
            words.push(std::mem::take(&mut chunk));
        }
        chunk.push(c);
    }
    if !chunk.is_empty() {
        words.push(chunk);
    }
    words
        .iter()
        .map(|w| format!("=?UTF-8?B?{}?=", base64::engine::general_purpose::STANDARD.encode(w)))
        .collect::<Vec<_>>()
        .join("\r\n ")
}

/// The answer as wire bytes (CRLF, 7-bit: the text is base64 when it is not ASCII).
pub fn build(a: &Answer<'_>) -> Vec<u8> {
    let subject = format!("Not printed: {}", a.subject.unwrap_or("(no subject)"));
    let text = format!(
        "Your mail to the print mailbox \"{mailbox}\" was not printed:\r\n\r\n    {reason}\r\n\r\nNothing of it was printed. Please fix this and send it again.\r\n\r\n-- \r\nmfd-relay on {host} (automatic answer)\r\n",
        mailbox = a.mailbox,
        reason = a.reason.replace(['\r', '\n'], " "),
        host = a.hostname,
    );
    let mut m = String::new();
    let _ = write!(
        m,
        "From: {from}\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: {date}\r\nMessage-ID: <refused.{unique}@{host}>\r\nAuto-Submitted: auto-replied\r\n",
        from = a.from,
        to = a.to,
        subject = encode_header_text(&subject),
        date = a.now.to_rfc2822(),
        unique = a.unique,
        host = a.hostname,
    );
    if let Some(id) = a.message_id.map(str::trim).filter(|i| !i.is_empty() && !i.contains(['\r', '\n'])) {
        let id = if id.starts_with('<') { id.to_string() } else { format!("<{id}>") };
        let _ = write!(m, "In-Reply-To: {id}\r\nReferences: {id}\r\n");
    }
    m.push_str("MIME-Version: 1.0\r\n");
    if text.is_ascii() {
        m.push_str("Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n");
        m.push_str(&text);
    } else {
        m.push_str("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(text.as_bytes());
        for line in b64.as_bytes().chunks(76) {
            m.push_str(&String::from_utf8_lossy(line));
            m.push_str("\r\n");
        }
    }
    m.into_bytes()
}

/// Errors queueing an answer.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error(transparent)]
    Queue(#[from] crate::queue::QueueError),
}

/// Writes the answer to the queue's spool and queues it for `identity`.
pub async fn queue(queue: &Queue, identity: &str, mailbox: &str, a: &Answer<'_>) -> Result<(), ReplyError> {
    let body = build(a);
    let id = queue
        .enqueue_own(crate::queue::OwnMessage {
            body: &body,
            identity,
            device: &format!("mailbox {mailbox}"),
            from: a.from,
            to: a.to,
        })
        .await?;
    tracing::info!(mailbox, queue_id = %id, to = %a.to, "answer to a refused mail queued");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MessageParser;

    fn answer<'a>(subject: Option<&'a str>, reason: &'a str) -> Answer<'a> {
        Answer {
            from: "print@contoso.com",
            to: "eve@example.test",
            mailbox: "print",
            subject,
            message_id: Some("<abc@x>"),
            reason,
            hostname: "relay.test",
            now: chrono::DateTime::from_timestamp(1_795_000_000, 0).unwrap(),
            unique: "1",
        }
    }

    #[test]
    fn answer_is_a_well_formed_auto_reply() {
        let raw = build(&answer(Some("Quarterly report"), "the sender eve@example.test is not allowed to print here"));
        let text = String::from_utf8(raw.clone()).unwrap();
        assert!(text.contains("Subject: Not printed: Quarterly report\r\n"), "{text}");
        assert!(text.contains("Auto-Submitted: auto-replied\r\n"));
        assert!(text.contains("In-Reply-To: <abc@x>\r\nReferences: <abc@x>\r\n"));
        assert!(text.contains("is not allowed to print here"));
        assert!(!text.replace("\r\n", "").contains('\n'), "CRLF only");
        let parsed = MessageParser::default().parse(&raw).unwrap();
        assert_eq!(parsed.subject(), Some("Not printed: Quarterly report"));
        assert_eq!(parsed.from().and_then(|f| f.first()).and_then(|a| a.address()), Some("print@contoso.com"));
    }

    #[test]
    fn non_ascii_subject_and_reason_are_encoded() {
        let subject = "Bericht für März – bitte drucken, danke schön, mit langen Wörtern";
        let raw = build(&answer(Some(subject), "the attachment \"Übersicht.docx\" is not printable"));
        assert!(raw.is_ascii());
        let parsed = MessageParser::default().parse(&raw).unwrap();
        assert_eq!(parsed.subject().map(str::to_string), Some(format!("Not printed: {subject}")));
        assert!(parsed.body_text(0).unwrap().contains("Übersicht.docx"));
        for line in String::from_utf8(raw).unwrap().split("\r\n") {
            assert!(line.len() <= 998, "line too long");
        }
    }

    #[test]
    fn robots_and_lists_are_not_answered() {
        let answers = |extra_header: &str, sender: &str| {
            let raw = format!("{extra_header}From: a@b.c\r\n\r\nx\r\n");
            let msg = MessageParser::default().parse(raw.as_bytes()).unwrap();
            should_answer(&msg, sender, "print@contoso.com")
        };
        assert!(answers("", "a@b.c"));
        assert!(answers("Auto-Submitted: no\r\n", "a@b.c"));
        assert!(!answers("Auto-Submitted: auto-replied\r\n", "a@b.c"));
        assert!(!answers("Precedence: bulk\r\n", "a@b.c"));
        assert!(!answers("List-Id: <x.y>\r\n", "a@b.c"));
        assert!(!answers("", "MAILER-DAEMON@b.c"));
        assert!(!answers("", "Print@Contoso.com"));
        assert!(!answers("", ""));
    }
}
