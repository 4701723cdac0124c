//! `from = "rewrite"` cannot be used to spoof, end to end: hostile header sections sent by a
//! device reach the (fake) provider with exactly one From, the identity's, none of the
//! device's Sender or Resent-* fields, a valid header section and the body bytes unchanged;
//! what cannot be made valid gets 554 5.6.0 (or 552 5.3.4 for an oversized header section).

use std::time::Duration;

use crate::common::fake_smtp::Received;
use crate::common::relay::{standard_sections, without_trace, RawClient, World, SCANS};

const WAIT: Duration = Duration::from_secs(20);

/// The standard devices plus `mfd` at 127.0.0.3, `from = "rewrite"`, no login.
async fn world() -> World {
    World::start_with(
        |e| {
            format!(
                "{}\n{}\n[[device]]\nname = \"mfd\"\nidentity = \"scans\"\naddresses = [\"127.0.0.3/32\"]\nfrom = \"rewrite\"\n",
                e.provider,
                standard_sections()
            )
        },
        |_| {},
    )
    .await
}

/// Sends `msg` (without the end-of-data line) from `source` over a raw socket; the DATA reply.
async fn send_raw(w: &World, source: &'static str, msg: &[u8]) -> String {
    let port = w.relay.smtp_port;
    let mut data = msg.to_vec();
    data.extend_from_slice(b".\r\n");
    tokio::task::spawn_blocking(move || {
        let mut c = RawClient::connect_from(source, port);
        assert!(c.cmd("EHLO mfd", "\r\n").starts_with("250"));
        assert!(c.cmd("MAIL FROM:<dev@printer.test>", "\r\n").starts_with("250"));
        assert!(c.cmd("RCPT TO:<boss@contoso.test>", "\r\n").starts_with("250"));
        assert!(c.cmd("DATA", "\r\n").starts_with("354"));
        c.send(&data);
        let r = c.reply();
        assert!(c.cmd("QUIT", "\r\n").starts_with("221"));
        r
    })
    .await
    .unwrap()
}

/// Sends from the rewrite device, expects 250 and returns what the upstream received.
async fn relay(w: &World, source: &'static str, msg: &[u8]) -> Received {
    let before = w.upstream.messages().len();
    let r = send_raw(w, source, msg).await;
    assert!(r.starts_with("250 2.0.0"), "{r}\n{}", w.relay.log());
    w.upstream.wait_for_messages(before + 1, WAIT).await.pop().unwrap()
}

/// The header lines (after our Received) and the rest from the empty line on.
fn split(m: &Received) -> (Vec<String>, Vec<u8>) {
    let data = without_trace(&m.data);
    let at = data.windows(4).position(|w| w == b"\r\n\r\n").map_or(data.len(), |p| p + 2);
    let header = String::from_utf8_lossy(&data[..at]).into_owned();
    let lines = header.split_terminator("\r\n").map(str::to_string).collect();
    (lines, data[at..].to_vec())
}

/// Exactly one From field, the given one; no Sender, no Resent-*; every header line a field
/// or a continuation.
fn assert_one_from(lines: &[String], from: &str) {
    let froms: Vec<&String> = lines.iter().filter(|l| l.to_ascii_lowercase().starts_with("from")).collect();
    assert_eq!(froms, vec![from], "{lines:#?}");
    for l in lines {
        let lower = l.to_ascii_lowercase();
        assert!(!lower.starts_with("sender") && !lower.starts_with("resent-"), "{lines:#?}");
        let field = l.split_once(':').is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic()));
        let continuation = l.starts_with([' ', '\t']) && !l.trim().is_empty();
        assert!(field || continuation, "not a header line: {l:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_from_fields_leave_exactly_the_identity() {
    let w = world().await;
    let ip = "127.0.0.3";

    // A header section that starts with a whitespace-only line: all of it is body now.
    let msg = b"   \r\nFrom: ceo@contoso.test\r\nSender: ceo@contoso.test\r\nSubject: pay this\r\n\r\nbody\r\n";
    let (lines, rest) = split(&relay(&w, ip, msg).await);
    assert_one_from(&lines, &format!("From: {SCANS}"));
    assert_eq!(rest, [&b"\r\n"[..], msg].concat(), "{lines:#?}");

    // An address list keeps no other mailbox.
    let msg = b"From: ceo@contoso.test, <dev@printer.test>\r\nSubject: list\r\n\r\nbody 2\r\n";
    let (lines, rest) = split(&relay(&w, ip, msg).await);
    assert_one_from(&lines, &format!("From: {SCANS}"));
    assert!(!lines.iter().any(|l| l.contains("ceo@") || l.contains("dev@")), "{lines:#?}");
    assert_eq!(rest, b"\r\nbody 2\r\n");

    // A quoted '<' in the display name stays quoted.
    let msg = b"From: \"Smith <boss>\" <dev@printer.test>\r\nSubject: q\r\n\r\nbody 3\r\n";
    let (lines, rest) = split(&relay(&w, ip, msg).await);
    assert_one_from(&lines, &format!("From: \"Smith <boss>\" <{SCANS}>"));
    assert!(lines.contains(&"Reply-To: \"Smith <boss>\" <dev@printer.test>".to_string()), "{lines:#?}");
    assert_eq!(rest, b"\r\nbody 3\r\n");

    // Sender and Resent-* of any case and spacing go; the rest stays in order.
    let msg = b"Resent-From: ceo@contoso.test\r\nRESENT-SENDER: ceo@contoso.test\r\nSender : ceo@contoso.test\r\n\
                From: \"Floor 3\" <dev@printer.test>\r\nTo: boss@contoso.test\r\nSubject: s\r\n\r\n..dot\r\nbody 4\r\n";
    let (lines, rest) = split(&relay(&w, ip, msg).await);
    assert_one_from(&lines, &format!("From: \"Floor 3\" <{SCANS}>"));
    assert_eq!(lines[..2], ["To: boss@contoso.test", "Subject: s"], "{lines:#?}");
    assert_eq!(rest, b"\r\n.dot\r\nbody 4\r\n", "dot-stuffing undone, nothing else");

    // A device that sends only a body gets a header section and its body intact.
    let msg = b"Scan attached.\r\nPage 2: see below\r\n";
    let (lines, rest) = split(&relay(&w, ip, msg).await);
    assert_one_from(&lines, &format!("From: {SCANS}"));
    assert!(lines.iter().any(|l| l.starts_with("Message-ID: <")) && lines.iter().any(|l| l.starts_with("Date: ")));
    assert_eq!(rest, [&b"\r\n"[..], msg].concat(), "{lines:#?}");

    // A header line in the middle that is no header line starts the body there.
    let msg = b"From: dev@printer.test\r\nSubject: x\r\nthis is text\r\nX-Not: a header\r\n\r\nend\r\n";
    let (lines, rest) = split(&relay(&w, ip, msg).await);
    assert_one_from(&lines, &format!("From: {SCANS}"));
    assert!(lines.contains(&"Subject: x".to_string()), "{lines:#?}");
    assert_eq!(rest, b"\r\nthis is text\r\nX-Not: a header\r\n\r\nend\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_devices_get_the_malformed_header_repair_too() {
    let w = world().await;
    // "lobby" (127.0.0.2) keeps its From; its body-only line still becomes the body.
    let msg = b"From: scanner@printer.local\r\nSender: scanner@printer.local\r\nscan from the lobby\r\n";
    let (lines, rest) = split(&relay(&w, "127.0.0.2", msg).await);
    assert_eq!(lines[..2], ["From: scanner@printer.local", "Sender: scanner@printer.local"], "{lines:#?}");
    assert_eq!(rest, b"\r\nscan from the lobby\r\n");
    let msg = b"  \r\nFrom: scanner@printer.local\r\n\r\nbody\r\n";
    let (lines, rest) = split(&relay(&w, "127.0.0.2", msg).await);
    assert!(!lines.iter().any(|l| l.starts_with("From")), "{lines:#?}");
    assert_eq!(rest, [&b"\r\n"[..], msg].concat());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_cannot_be_made_valid_is_refused_before_the_250() {
    let w = world().await;
    // A header line of 1200 characters without whitespace cannot be folded.
    let msg = format!("From: dev@printer.test\r\nX-Blob: {}\r\n\r\nbody\r\n", "x".repeat(1200));
    let r = send_raw(&w, "127.0.0.3", msg.as_bytes()).await;
    assert!(r.starts_with("554 5.6.0 ") && r.contains("X-Blob") && r.contains("998"), "{r}");
    // A header section over 256 KiB.
    let mut msg = Vec::new();
    while msg.len() <= 256 * 1024 {
        msg.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
    }
    msg.extend_from_slice(b"\r\nbody\r\n");
    let r = send_raw(&w, "127.0.0.3", &msg).await;
    assert!(r.starts_with("552 5.3.4 ") && r.contains("header section"), "{r}");
    // Just under the limit is fine, and long lines with spaces are folded.
    msg.truncate(250 * 1024 - (250 * 1024) % 52);
    msg.extend_from_slice(format!("X-Words: {}\r\n\r\nbody\r\n", "word ".repeat(400)).as_bytes());
    let (lines, rest) = split(&relay(&w, "127.0.0.3", &msg).await);
    assert!(lines.iter().all(|l| l.len() <= 998), "a line over 998");
    assert_eq!(rest, b"\r\nbody\r\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.upstream.messages().len(), 1, "only the valid message went upstream");
    let (_, out, _) = w.relay.cli(&["queue", "list"], None);
    assert!(out.contains("queue is empty"), "{out}");
}
