//! Sending through Microsoft Graph (`mfd_relay::upstream::graph::Graph`) against the fake Graph
//! ([`crate::common::fake_graph`]): small messages by sendMail, scans by draft and upload
//! session with attachments arriving byte for byte, no request over Graph's limits, crashes at
//! each step neither losing nor duplicating the message, throttling and refusals typed.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use mail_parser::{MessageParser, MimeHeaders};
use mfd_relay::oauth::tokens::AccessToken;
use mfd_relay::upstream::api::{Outbound, Progress, ProgressSink};
use mfd_relay::upstream::graph::{Graph, Resume};
use mfd_relay::upstream::{Envelope, Observer, SendError, SendOutcome, Step};

use crate::common::fake_graph::{Action, FakeGraph, Op, MAX_POST, MAX_RANGE};
use crate::common::BearerValidator;

const MAILBOX: &str = "scans@contoso.com";
const TOKEN: &str = "fake-at-graph-good";

fn validator() -> BearerValidator {
    Arc::new(|t: &str| (t == TOKEN).then(|| MAILBOX.to_string()))
}

fn token(secret: &str) -> AccessToken {
    AccessToken { secret: secret.to_string(), account: MAILBOX.to_string(), expires_at: i64::MAX / 2 }
}

/// Keeps every saved progress in memory, as the queue record would.
#[derive(Default)]
struct MemSink {
    saves: Mutex<Vec<Progress>>,
}

impl MemSink {
    fn last(&self) -> Progress {
        self.saves.lock().expect("lock").last().cloned().unwrap_or_default()
    }
}

impl ProgressSink for MemSink {
    fn save<'a>(&'a self, progress: &'a Progress) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        self.saves.lock().expect("lock").push(progress.clone());
        Box::pin(async { Ok(()) })
    }
}

#[derive(Default)]
struct Steps(Mutex<Vec<Step>>);

impl Observer for Steps {
    fn step(&self, step: Step) {
        self.0.lock().expect("lock").push(step);
    }
}

impl Steps {
    fn names(&self) -> Vec<String> {
        self.0.lock().expect("lock").iter().map(|s| s.name.clone()).collect()
    }
}

/// Deterministic bytes that look like a scanned PDF (incompressible after the header).
pub(crate) fn pdf(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n".to_vec();
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A scanner's message: a text part and one base64 part per file.
pub(crate) fn scan_message(to: &[&str], files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut m = format!(
        "Received: from mfd (10.0.0.9)\r\nFrom: scans@contoso.com\r\nTo: {}\r\nSubject: Scan\r\n\
         Message-ID: <scan-{}@relay.lan>\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"----=_scan\"\r\n\r\n\
         ------=_scan\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nScanned on floor 3.\r\n",
        to.join(", "),
        files.len()
    )
    .into_bytes();
    for (name, bytes) in files {
        m.extend_from_slice(
            format!(
                "------=_scan\r\nContent-Type: application/pdf; name=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\
                 Content-Disposition: attachment; filename=\"{name}\"\r\n\r\n"
            )
            .as_bytes(),
        );
        let b = STANDARD.encode(bytes);
        for line in b.as_bytes().chunks(76) {
            m.extend_from_slice(line);
            m.extend_from_slice(b"\r\n");
        }
    }
    m.extend_from_slice(b"------=_scan--\r\n");
    m
}

struct Fixture {
    fake: FakeGraph,
    graph: Graph,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    rcpts: Vec<String>,
}

async fn fixture(msg: &[u8], rcpts: &[&str]) -> Fixture {
    let fake = FakeGraph::start(validator()).await;
    let graph = Graph::new(&fake.url(), None).expect("graph").with_settle(Duration::from_millis(200));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("msg.eml");
    std::fs::write(&path, msg).expect("write");
    Fixture { fake, graph, _dir: dir, path, rcpts: rcpts.iter().map(|s| s.to_string()).collect() }
}

impl Fixture {
    async fn send_with(
        &self,
        secret: &str,
        progress: &Progress,
        sink: &MemSink,
        obs: &Steps,
    ) -> Result<SendOutcome, SendError> {
        let size = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        let env = Envelope { from: MAILBOX, rcpts: &self.rcpts, size, eight_bit: false };
        let msg = Outbound { identity: "scans", mailbox: MAILBOX, env: &env, body: &self.path, progress, sink, obs };
        self.graph.send(&token(secret), &msg).await
    }

    async fn send(&self, progress: &Progress, sink: &MemSink) -> Result<SendOutcome, SendError> {
        self.send_with(TOKEN, progress, sink, &Steps::default()).await
    }

    /// No request over Graph's limits, no token on an upload.
    fn assert_requests_within_limits(&self) {
        for r in self.fake.requests() {
            match r.op {
                Some(Op::Put) => {
                    assert!(r.body_len <= MAX_RANGE, "{r:?}");
                    assert!(!r.authorization, "an upload PUT carried Authorization: {r:?}");
                }
                Some(Op::GetSession) => assert!(!r.authorization, "{r:?}"),
                _ => assert!(r.body_len <= MAX_POST, "{r:?}"),
            }
        }
    }

    fn count(&self, op: Op) -> usize {
        self.fake.requests().iter().filter(|r| r.op == Some(op)).count()
    }
}

/// The attachments of the original message, decoded.
fn original_attachments(msg: &[u8]) -> Vec<(String, Vec<u8>)> {
    let m = MessageParser::default().parse(msg).expect("parses");
    m.attachments().map(|a| (a.attachment_name().unwrap_or("").to_string(), a.contents().to_vec())).collect()
}

fn sent_attachments(s: &crate::common::fake_graph::SentMessage) -> Vec<(String, Vec<u8>)> {
    s.attachments.iter().map(|a| (a.name.clone(), a.bytes.clone())).collect()
}

#[tokio::test]
async fn a_small_message_goes_by_send_mail() {
    let msg = scan_message(&["anna@contoso.com"], &[("small.pdf", &pdf(1200, 1))]);
    assert!(msg.len() < 4000);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    let (sink, steps) = (MemSink::default(), Steps::default());
    let out = f.send_with(TOKEN, &Progress::None, &sink, &steps).await.expect("sent");
    assert_eq!(out.accepted, ["anna@contoso.com"]);
    assert!(out.refused.is_empty());
    let reply = out.reply.expect("reply");
    assert_eq!(reply.code, 250);
    assert!(reply.text.contains("Microsoft Graph"), "{reply:?}");
    let sent = f.fake.sent();
    assert_eq!(sent.len(), 1);
    assert!(sent[0].by_send_mail);
    assert_eq!(sent[0].mailbox, MAILBOX);
    assert_eq!(sent[0].recipients(), ["anna@contoso.com"]);
    assert_eq!(sent[0].mime, msg, "the MIME arrives as spooled");
    assert_eq!(sent_attachments(&sent[0]), original_attachments(&msg));
    assert_eq!(steps.names(), ["graph-send"]);
    assert!(f.fake.drafts().is_empty());
    assert_eq!(f.fake.requests().len(), 1);
    // Nothing to resume for one request.
    assert!(sink.saves.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn a_30_mb_scan_goes_by_draft_and_upload_session_byte_for_byte() {
    let scan = pdf(30 * 1000 * 1000, 7);
    let msg = scan_message(&["anna@contoso.com", "bob@contoso.com"], &[("scan.pdf", &scan)]);
    let f = fixture(&msg, &["anna@contoso.com", "bob@contoso.com"]).await;
    let (sink, steps) = (MemSink::default(), Steps::default());
    let t = Instant::now();
    let out = f.send_with(TOKEN, &Progress::None, &sink, &steps).await.expect("sent");
    let took = t.elapsed();
    eprintln!("30 MB scan through the fake Graph: {} ms", took.as_millis());
    assert_eq!(out.accepted.len(), 2);
    let sent = f.fake.sent();
    assert_eq!(sent.len(), 1);
    assert!(!sent[0].by_send_mail);
    assert_eq!(sent[0].recipients(), ["anna@contoso.com", "bob@contoso.com"]);
    let got = sent_attachments(&sent[0]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "scan.pdf");
    assert!(got[0].1 == scan, "the scan arrived changed ({} bytes of {})", got[0].1.len(), scan.len());
    // The draft carried the text, not the scan.
    assert!(sent[0].mime.len() < 2000, "{}", sent[0].mime.len());
    assert!(String::from_utf8_lossy(&sent[0].mime).contains("Scanned on floor 3."));
    f.assert_requests_within_limits();
    assert_eq!(f.count(Op::CreateSession), 1);
    assert_eq!(f.count(Op::Put), 30_000_000usize.div_ceil(mfd_relay::upstream::graph::RANGE));
    assert!(f.fake.drafts().is_empty(), "the draft was sent");
    assert_eq!(steps.names(), ["draft", "attachment 1/1", "recipients", "send"]);
    let Progress::Graph(last) = sink.last() else { panic!("no Graph progress saved") };
    assert!(last.sending_since.is_some() && last.draft.is_some() && last.done == [0], "{last:?}");
}

#[tokio::test]
async fn many_small_pages_go_one_post_each() {
    let pages: Vec<Vec<u8>> = (0..5).map(|i| pdf(1_000_000, 100 + i)).collect();
    let files: Vec<(String, &[u8])> =
        pages.iter().enumerate().map(|(i, p)| (format!("page{i}.pdf"), p.as_slice())).collect();
    let files: Vec<(&str, &[u8])> = files.iter().map(|(n, p)| (n.as_str(), *p)).collect();
    let msg = scan_message(&["anna@contoso.com"], &files);
    assert!(msg.len() > MAX_POST, "too small to need the draft path");
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    f.send(&Progress::None, &MemSink::default()).await.expect("sent");
    let sent = f.fake.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent_attachments(&sent[0]), original_attachments(&msg));
    assert_eq!(f.count(Op::AddAttachment), 5);
    assert_eq!(f.count(Op::CreateSession), 0);
    f.assert_requests_within_limits();
}

#[tokio::test]
async fn a_crash_mid_upload_continues_the_same_draft() {
    let scan = pdf(10 * 1000 * 1000, 11);
    let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &scan)]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    // The second range arrives, and the relay dies before it hears so.
    f.fake.fault(Op::Put, 2, Action::Hang);
    let sink = MemSink::default();
    let first = tokio::time::timeout(Duration::from_secs(5), f.send(&Progress::None, &sink)).await;
    assert!(first.is_err(), "the first attempt should hang at the second range: {first:?}");
    let saved = sink.last();
    let Progress::Graph(r) = &saved else { panic!("{saved:?}") };
    let adding = r.adding.clone().expect("an upload under way");
    assert_eq!(adding.offset, mfd_relay::upstream::graph::RANGE as u64, "{r:?}");
    assert!(f.fake.sent().is_empty());

    let out = f.send(&saved, &sink).await.expect("resumed");
    assert_eq!(out.reply.map(|r| r.code), Some(250));
    let sent = f.fake.sent();
    assert_eq!(sent.len(), 1, "exactly one message");
    assert!(sent_attachments(&sent[0])[0].1 == scan, "the scan arrived changed");
    assert_eq!(f.count(Op::CreateDraft), 1, "the same draft was continued");
    assert_eq!(f.count(Op::CreateSession), 1, "the same upload session was continued");
    assert_eq!(f.count(Op::GetSession), 1);
    // Three ranges in all, the second PUT of the first attempt included: nothing sent twice.
    assert_eq!(f.count(Op::Put), 3);
    f.assert_requests_within_limits();
}

#[tokio::test]
async fn a_crash_after_a_finished_upload_does_not_attach_twice() {
    let scan = pdf(3 * 1000 * 1000, 12);
    let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &scan), ("page.pdf", &pdf(500_000, 13))]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    // The only range completes the upload; its answer is lost.
    f.fake.fault(Op::Put, 1, Action::Hang);
    let sink = MemSink::default();
    assert!(tokio::time::timeout(Duration::from_secs(5), f.send(&Progress::None, &sink)).await.is_err());
    f.send(&sink.last(), &sink).await.expect("resumed");
    let sent = f.fake.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent_attachments(&sent[0]), original_attachments(&msg), "each attachment once, byte for byte");
    assert_eq!(f.count(Op::ListAttachments), 1, "the draft was asked");
}

#[tokio::test]
async fn a_crash_after_graph_sent_does_not_send_twice() {
    let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &pdf(4_000_000, 21))]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    f.fake.fault(Op::Send, 1, Action::Hang);
    let sink = MemSink::default();
    assert!(tokio::time::timeout(Duration::from_secs(5), f.send(&Progress::None, &sink)).await.is_err());
    assert_eq!(f.fake.sent().len(), 1, "Graph sent it before the crash");
    let saved = sink.last();
    assert!(matches!(&saved, Progress::Graph(r) if r.sending_since.is_some()), "{saved:?}");
    let out = f.send(&saved, &sink).await.expect("recognised as sent");
    assert_eq!(out.reply.map(|r| r.code), Some(250));
    assert_eq!(f.fake.sent().len(), 1, "no second send");
    assert_eq!(f.count(Op::Send), 1);
    assert_eq!(f.count(Op::GetMessage), 1);
}

#[tokio::test]
async fn a_send_that_never_reached_graph_is_sent_once_on_the_next_attempt() {
    let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &pdf(4_000_000, 22))]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    f.fake.fault(Op::Send, 1, Action::error(503, "ServiceUnavailable", "Try again later."));
    let sink = MemSink::default();
    let first = f.send(&Progress::None, &sink).await;
    assert!(matches!(first, Err(SendError::Throttled { .. })), "{first:?}");
    assert!(f.fake.sent().is_empty());
    f.send(&sink.last(), &sink).await.expect("sent on the second attempt");
    assert_eq!(f.fake.sent().len(), 1);
    assert_eq!(f.count(Op::CreateDraft), 1);
    assert_eq!(f.count(Op::Send), 2);
}

#[tokio::test]
async fn a_draft_deleted_before_sending_is_started_again() {
    let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &pdf(4_000_000, 23))]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    let sink = MemSink::default();
    // A progress naming a draft Graph does not know (someone emptied Drafts).
    let stale = Progress::Graph(Resume { parts: 1, draft: Some("AAMkAGgone=".into()), ..Resume::default() });
    f.send(&stale, &sink).await.expect("started again");
    let sent = f.fake.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent_attachments(&sent[0]), original_attachments(&msg));
}

#[tokio::test]
async fn throttling_is_reported_with_graphs_retry_after() {
    let msg = scan_message(&["anna@contoso.com"], &[]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    f.fake.throttle(1, 17);
    match f.send(&Progress::None, &MemSink::default()).await {
        Err(SendError::Throttled { reply, retry_after }) => {
            assert_eq!(retry_after, Duration::from_secs(17));
            assert!(!reply.is_permanent(), "{reply:?}");
        }
        other => panic!("not throttled: {other:?}"),
    }
    assert!(f.fake.sent().is_empty());
    f.send(&Progress::None, &MemSink::default()).await.expect("sent after the wait");
    assert_eq!(f.fake.sent().len(), 1);
}

#[tokio::test]
async fn send_as_denied_is_permanent_with_graphs_code_and_a_hint() {
    let msg = scan_message(&["anna@contoso.com"], &[]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    f.fake.fault(
        Op::SendMail,
        1,
        Action::error(
            403,
            "ErrorSendAsDenied",
            "The user account which was used to submit this request does not have the right to send mail on behalf of the specified sending account.",
        ),
    );
    match f.send(&Progress::None, &MemSink::default()).await {
        Err(SendError::Rejected(r)) => {
            assert_eq!(r.code, 554);
            assert!(r.text.starts_with("5.7.60 Microsoft Graph ErrorSendAsDenied: The user account"), "{r:?}");
            let device = r.to_device_reply().text();
            assert!(device.contains("ErrorSendAsDenied") && device.contains("Send As"), "{device}");
        }
        other => panic!("not rejected: {other:?}"),
    }
}

#[tokio::test]
async fn a_refused_token_is_an_auth_error_that_does_not_show_the_token() {
    let msg = scan_message(&["anna@contoso.com"], &[]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    let secret = "fake-at-expired-SECRET";
    match f.send_with(secret, &Progress::None, &MemSink::default(), &Steps::default()).await {
        Err(e @ SendError::Auth { .. }) => {
            let text = format!("{e} {e:?}");
            assert!(text.contains("InvalidAuthenticationToken") && !text.contains("SECRET"), "{text}");
        }
        other => panic!("not an auth error: {other:?}"),
    }
}

#[tokio::test]
async fn at_most_four_requests_per_mailbox_are_in_flight() {
    let msg = scan_message(&["anna@contoso.com"], &[]);
    let f = Arc::new(fixture(&msg, &["anna@contoso.com"]).await);
    f.fake.set_delay(Duration::from_millis(300));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let f = f.clone();
        tasks.push(tokio::spawn(async move { f.send(&Progress::None, &MemSink::default()).await }));
    }
    for t in tasks {
        t.await.expect("task").expect("no send was throttled");
    }
    assert_eq!(f.fake.sent().len(), 10);
    assert_eq!(f.fake.max_in_flight(), 4);
}

#[tokio::test]
async fn one_transaction_per_recipient_reaches_exactly_its_envelope_on_both_paths() {
    // A device sends one transaction per recipient with every address in To and a Cc: the
    // header names addresses outside the envelope, so the draft path with its lists set, small
    // or large. A header that names only envelope addresses goes by sendMail, the rest in Bcc.
    let all = ["anna@contoso.com", "Bob@contoso.com", "carl@contoso.com"];
    let large = pdf(4_000_000, 31);
    let bob: &[&str] = &["Bob@contoso.com"];
    for (to, files, by_send_mail) in [(&all[..], vec![], false), (&all[..], vec![large], false), (bob, vec![], true)] {
        let named: Vec<(&str, &[u8])> = files.iter().map(|f| ("scan.pdf", f.as_slice())).collect();
        let msg = scan_message(to, &named);
        let msg = if by_send_mail {
            msg
        } else {
            String::from_utf8(msg)
                .expect("ascii")
                .replacen("Subject: Scan\r\n", "Cc: dora@contoso.com\r\nSubject: Scan\r\n", 1)
                .into_bytes()
        };
        let f = fixture(&msg, &["bob@contoso.com", "eve@fabrikam.com"]).await;
        f.fake.drop_mime_bcc(true);
        f.send(&Progress::None, &MemSink::default()).await.expect("sent");
        let sent = f.fake.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].by_send_mail, by_send_mail, "{to:?}");
        assert_eq!(sent[0].to, ["bob@contoso.com"], "To keeps only the envelope's");
        assert!(sent[0].cc.is_empty(), "{:?}", sent[0].cc);
        assert_eq!(sent[0].bcc, ["eve@fabrikam.com"], "an envelope-only recipient goes in Bcc");
        if !by_send_mail {
            assert_eq!(sent_attachments(&sent[0]), original_attachments(&msg));
        }
    }
}

#[tokio::test]
async fn a_crash_before_the_draft_id_is_saved_leaves_an_orphan_draft_never_a_second_send() {
    let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &pdf(4_000_000, 41))]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    f.fake.fault(Op::CreateDraft, 1, Action::Hang);
    let sink = MemSink::default();
    assert!(tokio::time::timeout(Duration::from_secs(5), f.send(&Progress::None, &sink)).await.is_err());
    let saved = sink.last();
    assert!(matches!(&saved, Progress::Graph(r) if r.creating && r.draft.is_none()), "{saved:?}");
    f.send(&saved, &sink).await.expect("sent with a new draft");
    assert_eq!(f.fake.sent().len(), 1, "sent once");
    // The orphan stays in Drafts, unsent, and can be found by its Message-ID.
    let url = format!("{}/v1.0/users/{MAILBOX}/messages", f.fake.url());
    let listed: serde_json::Value = reqwest::Client::new()
        .get(url)
        .query(&[("$filter", "internetMessageId eq '<scan-1@relay.lan>'")])
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("lists")
        .json()
        .await
        .expect("json");
    assert_eq!(listed["value"].as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(f.fake.drafts().len(), 1);
}

#[tokio::test]
async fn a_scan_sent_as_the_whole_body_goes_up_as_an_attachment() {
    let scan = pdf(5_000_000, 51);
    let mut msg =
        b"From: scans@contoso.com\r\nTo: anna@contoso.com\r\nSubject: Scan\r\nMessage-ID: <one@relay.lan>\r\n\
        MIME-Version: 1.0\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\
        Content-Disposition: attachment; filename=\"scan.pdf\"\r\n\r\n"
            .to_vec();
    for line in STANDARD.encode(&scan).as_bytes().chunks(76) {
        msg.extend_from_slice(line);
        msg.extend_from_slice(b"\r\n");
    }
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    f.send(&Progress::None, &MemSink::default()).await.expect("sent");
    let sent = f.fake.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].recipients(), ["anna@contoso.com"]);
    let got = sent_attachments(&sent[0]);
    assert_eq!(got.len(), 1);
    assert!(got[0].0 == "scan.pdf" && got[0].1 == scan, "the scan arrived changed");
    f.assert_requests_within_limits();
}

#[tokio::test]
async fn throttled_mid_upload_the_next_attempt_continues_where_it_stopped() {
    let scan = pdf(10 * 1000 * 1000, 61);
    let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &scan)]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    f.fake.fault(Op::Put, 2, Action::error(503, "ServiceUnavailable", "The service is busy."));
    let sink = MemSink::default();
    let first = f.send(&Progress::None, &sink).await;
    assert!(matches!(first, Err(SendError::Throttled { .. })), "{first:?}");
    f.send(&sink.last(), &sink).await.expect("resumed");
    let sent = f.fake.sent();
    assert_eq!(sent.len(), 1);
    assert!(sent_attachments(&sent[0])[0].1 == scan, "the scan arrived changed");
    assert_eq!((f.count(Op::CreateDraft), f.count(Op::CreateSession)), (1, 1));
    // Three ranges and the refused one: the first range was not sent again.
    assert_eq!(f.count(Op::Put), 4);
}

// ---------------------------------------------------------------------------
// Through the relay: an identity with send_via = "graph"
// ---------------------------------------------------------------------------

/// A relay whose identity "scans" (client credentials) sends through `fake` with
/// `send_via = "graph"`; device "floor3" (PIN 1234) uses it.
async fn relay_through(
    tweak: impl FnOnce(&mut crate::common::relay::Setup),
) -> (crate::common::relay::World, FakeGraph) {
    use crate::common::fake_oauth::FakeOAuth;
    use crate::common::relay::{endpoints, pin_hash, World, CLIENT_ID, CLIENT_SECRET, SCANS};

    // The fake Graph takes the fake provider's tokens for Graph only (an Outlook token is for
    // another resource), and the provider starts with the relay.
    let idp: Arc<std::sync::OnceLock<FakeOAuth>> = Arc::default();
    let known = idp.clone();
    let fake = FakeGraph::start(Arc::new(move |t: &str| {
        let idp = known.get()?;
        let for_graph = idp.access_token_info(t).is_some_and(|i| i.scope.contains("https://graph.microsoft.com/"));
        (idp.token_is_valid(t, SCANS) && for_graph).then(|| SCANS.to_string())
    }))
    .await;
    let base = fake.url();
    let w = World::start_with(
        |e| {
            let _ = idp.set(e.idp.clone());
            format!(
                "[[provider]]\nname = \"contoso\"\nkind = \"microsoft\"\ntenant = \"contoso.test\"\nclient_id = \"{CLIENT_ID}\"\n\
                 client_secret = \"{CLIENT_SECRET}\"\n{}graph_url = \"{base}\"\n\n\
                 [[identity]]\nname = \"scans\"\nprovider = \"contoso\"\nemail = \"{SCANS}\"\nflow = \"client_credentials\"\nsend_via = \"graph\"\n\n\
                 [[device]]\nname = \"floor3\"\nidentity = \"scans\"\nusername = \"floor3\"\npin_hash = \"{}\"\n",
                endpoints(e.idp),
                pin_hash()
            )
        },
        tweak,
    )
    .await;
    (w, fake)
}

const DEVICE: [&str; 8] = ["--auth", "PLAIN", "--user", "floor3", "--password", "1234", "--to", "bob@contoso.test"];

/// The relay end to end: a printer's scans (small, and large with a 9 MB file) through an
/// identity with `send_via = "graph"`, one transaction per recipient, to the envelope only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_printer_s_scans_go_out_through_graph() {
    let (w, fake) = relay_through(|_| {}).await;
    let small = scan_message(&["alice@contoso.test", "bob@contoso.test"], &[("small.pdf", &pdf(2_000, 71))]);
    let r = w.send(&DEVICE, &small).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", w.relay.log());
    let large = scan_message(&["alice@contoso.test", "bob@contoso.test"], &[("scan.pdf", &pdf(9_000_000, 72))]);
    let r = w.send(&DEVICE, &large).await;
    assert!(r.ok, "{r:?}\n{}", w.relay.log());
    let sent = fake.wait_for_sent(2, Duration::from_secs(60)).await;
    assert_eq!(sent.len(), 2, "{}", w.relay.log());
    for (m, original) in sent.iter().zip([&small, &large]) {
        assert_eq!(m.mailbox, crate::common::relay::SCANS);
        assert_eq!(m.recipients(), ["bob@contoso.test"]);
        assert_eq!(sent_attachments(m), original_attachments(original), "attachments byte for byte");
    }
    // Both headers name alice, outside the envelope: the draft path, whose lists are set.
    assert_eq!((sent[0].by_send_mail, sent[1].by_send_mail), (false, false));
    for r in fake.requests() {
        assert!(r.op != Some(Op::Put) || !r.authorization, "{r:?}");
    }
}

/// The relay killed (SIGKILL) in the middle of an upload session: after the restart the queued
/// message continues the same draft and session, and Graph sends it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_upload_continues_after_restart_and_sends_once() {
    let (mut w, fake) = relay_through(|s| s.relay_extra.push_str("in_session_timeout = \"1s\"\n")).await;
    fake.fault(Op::Put, 2, Action::Hang);
    let scan = pdf(12_000_000, 73);
    let large = scan_message(&["bob@contoso.test"], &[("scan.pdf", &scan)]);
    let r = w.send(&DEVICE, &large).await;
    assert!(r.ok && r.message.contains("queued"), "{r:?}\n{}", w.relay.log());
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.requests().iter().filter(|r| r.op == Some(Op::Put)).count() < 2 {
        assert!(Instant::now() < deadline, "the upload never reached its second range\n{}", w.relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::block_in_place(|| {
        w.relay.kill9();
        w.relay.spawn();
    });
    let sent = fake.wait_for_sent(1, Duration::from_secs(60)).await;
    assert_eq!(sent.len(), 1, "{}", w.relay.log());
    assert!(sent_attachments(&sent[0])[0].1 == scan, "the scan arrived changed");
    let count = |op| fake.requests().iter().filter(|r| r.op == Some(op)).count();
    assert_eq!((count(Op::CreateDraft), count(Op::CreateSession)), (1, 1), "the same draft and session continued");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.sent().len(), 1, "and it is not sent again");
}

/// `mfd-relay test` through Graph shows the draft, the attachment and the send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mfd_relay_test_shows_the_graph_steps() {
    let (w, fake) = relay_through(|_| {}).await;
    let (code, out, err) = tokio::task::block_in_place(|| {
        w.relay.cli(&["test", "--device", "floor3", "--to", "bob@contoso.test", "--size", "5MB"], None)
    });
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(fake.sent().len(), 1, "{out}");
    assert!(out.contains("draft") && out.contains("attachment 1/1") && out.contains("send"), "{out}");
    assert!(!out.contains("fake-upload-secret"), "the upload URL is not shown: {out}");
}

#[tokio::test]
async fn a_413_to_send_mail_falls_back_to_the_draft_path() {
    let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &pdf(1_500_000, 81))]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    f.fake.fault(Op::SendMail, 1, Action::error(413, "RequestBodyTooLarge", "The request body is too large."));
    f.send(&Progress::None, &MemSink::default()).await.expect("sent by draft");
    let sent = f.fake.sent();
    assert_eq!(sent.len(), 1);
    assert!(!sent[0].by_send_mail);
    assert_eq!(sent_attachments(&sent[0]), original_attachments(&msg));
    // Without attachments to take out, it is refused as too large, permanently.
    let f = fixture(&scan_message(&["anna@contoso.com"], &[]), &["anna@contoso.com"]).await;
    f.fake.fault(Op::SendMail, 1, Action::error(413, "RequestBodyTooLarge", "The request body is too large."));
    match f.send(&Progress::None, &MemSink::default()).await {
        Err(SendError::Rejected(r)) => assert!(r.code == 552 && r.text.starts_with("5.3.4 "), "{r:?}"),
        other => panic!("{other:?}"),
    }
}

/// A 30 MB scan (~41 MB of MIME) through the relay to a tenant whose mailbox takes 150 MB
/// (`max_message_size = "150MB"`): within what the relay tells the device (SIZE), and the file
/// arrives byte for byte by a draft and its upload session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_mb_scan_through_the_relay_arrives_byte_for_byte() {
    let (w, fake) = relay_through(|s| {
        s.sections = s.sections.replacen("graph_url =", "max_message_size = \"150MB\"\ngraph_url =", 1)
    })
    .await;
    let large = scan_message(&["bob@contoso.test"], &[("scan.pdf", &pdf(30_000_000, 74))]);
    assert!(large.len() > 40_000_000, "the device's MIME is larger than the scan");
    let r = w.send(&DEVICE, &large).await;
    assert!(r.ok, "{r:?}\n{}", w.relay.log());
    let sent = fake.wait_for_sent(1, Duration::from_secs(120)).await;
    assert_eq!(sent.len(), 1, "{}", w.relay.log());
    assert!(!sent[0].by_send_mail);
    assert_eq!(sent[0].recipients(), ["bob@contoso.test"]);
    assert_eq!(sent_attachments(&sent[0]), original_attachments(&large), "attachments byte for byte");
}

/// Graph's 429 through the relay: the message waits as long as `Retry-After` says (the
/// harness's backoff is 1-2 s, so only Retry-After explains 4), then goes once; the metrics
/// name the wait and the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_from_graph_through_the_relay_waits_its_retry_after() {
    let (w, fake) = relay_through(|_| {}).await;
    fake.throttle(1, 4);
    let started = Instant::now();
    let small = scan_message(&["bob@contoso.test"], &[("small.pdf", &pdf(2_000, 75))]);
    let r = w.send(&DEVICE, &small).await;
    assert!(r.ok && r.message.contains("queued"), "{r:?}\n{}", w.relay.log());
    let sent = fake.wait_for_sent(1, Duration::from_secs(30)).await;
    assert_eq!(sent.len(), 1, "{}", w.relay.log());
    assert!(started.elapsed() >= Duration::from_secs(4), "sent after {:?}", started.elapsed());
    // The provider has the message a moment before the relay has counted it.
    let delivered = r#"mfd_relay_messages_delivered_total{identity="scans",path="queue",via="graph"} 1"#;
    let metrics = tokio::task::block_in_place(|| w.relay.metrics_with(delivered, Duration::from_secs(10)));
    assert!(metrics.contains(delivered), "{metrics}");
    assert!(
        metrics.contains(r#"mfd_relay_messages_deferred_total{identity="scans",reason="throttled"} 1"#),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.sent().len(), 1, "sent once");
}

/// With Exchange's default 35 MB MaxSendSize, the relay tells the device so (SIZE) and refuses
/// a 30 MB scan in session, instead of a 250 and a bounce when Graph refuses it later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_over_the_mailbox_s_default_limit_is_refused_in_session() {
    let (w, fake) = relay_through(|_| {}).await;
    let large = scan_message(&["bob@contoso.test"], &[("scan.pdf", &pdf(30_000_000, 76))]);
    let r = w.send(&DEVICE, &large).await;
    assert_eq!((r.ok, r.code), (false, Some(552)), "{r:?}");
    assert!(r.message.contains("5.3.4") && r.message.contains("36700160"), "{r:?}");
    assert!(fake.requests().is_empty(), "nothing reached Graph");
}

/// A first attempt whose send Graph refused with 503: the state says "sending", nothing sent.
async fn sending_but_unsent(seed: u64) -> (Fixture, MemSink) {
    let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &pdf(4_000_000, seed))]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    f.fake.fault(Op::Send, 1, Action::error(503, "ServiceUnavailable", "Try again later."));
    let sink = MemSink::default();
    assert!(matches!(f.send(&Progress::None, &sink).await, Err(SendError::Throttled { .. })));
    assert!(matches!(sink.last(), Progress::Graph(r) if r.sending_since.is_some() && r.draft.is_some()));
    assert!(f.fake.sent().is_empty());
    (f, sink)
}

#[tokio::test]
async fn a_404_other_than_item_not_found_is_never_taken_for_sent() {
    let (f, sink) = sending_but_unsent(51).await;
    for code in ["MailboxNotEnabledForRESTAPI", "ErrorInvalidUser", "SomethingNew"] {
        f.fake.fault(Op::GetMessage, 1, Action::error(404, code, "Not here."));
        match f.send(&sink.last(), &sink).await {
            Err(SendError::Rejected(r)) => assert!(r.text.contains(code), "{r:?}"),
            other => panic!("{code}: taken for delivered: {other:?}"),
        }
    }
    // Unsent, and still resumable: sent once when Graph answers again.
    assert!(f.fake.sent().is_empty());
    f.send(&sink.last(), &sink).await.expect("sent");
    assert_eq!(f.fake.sent().len(), 1);
    assert_eq!(f.count(Op::CreateDraft), 1);
}

#[tokio::test]
async fn a_draft_gone_at_a_resumed_send_was_sent_not_started_again() {
    let (f, sink) = sending_but_unsent(52).await;
    // Still a draft when asked, gone at the send: the earlier send went through meanwhile.
    f.fake.fault(
        Op::Send,
        1,
        Action::error(404, "ErrorItemNotFound", "The specified object was not found in the store."),
    );
    let out = f.send(&sink.last(), &sink).await.expect("taken for sent");
    assert_eq!(out.reply.map(|r| r.code), Some(250));
    assert_eq!(f.count(Op::CreateDraft), 1, "no second draft, so no second send");
    assert!(f.fake.sent().is_empty());
}

#[tokio::test]
async fn a_state_under_way_to_send_is_not_reset_when_its_parts_do_not_match() {
    let (f, sink) = sending_but_unsent(53).await;
    let Progress::Graph(mut r) = sink.last() else { panic!("no Graph progress") };
    r.parts = 7;
    f.send(&Progress::Graph(r), &sink).await.expect("sent");
    assert_eq!(f.fake.sent().len(), 1);
    assert_eq!(f.count(Op::CreateDraft), 1, "the saved draft was asked and sent, not a new one");
    assert!(f.count(Op::GetMessage) >= 1, "the saved draft was asked whether it was sent");
}

#[tokio::test]
async fn a_draft_whose_mime_bcc_graph_drops_still_reaches_the_envelope_only_recipient() {
    // The header names exactly a To in the envelope; the archive address is envelope-only and
    // goes in the MIME's Bcc, which this Graph does not keep when it makes the draft.
    let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &pdf(4_000_000, 61))]);
    let f = fixture(&msg, &["anna@contoso.com", "archive@contoso.com"]).await;
    f.fake.drop_mime_bcc(true);
    f.send(&Progress::None, &MemSink::default()).await.expect("sent");
    let sent = f.fake.sent();
    assert_eq!(sent.len(), 1);
    assert!(!sent[0].by_send_mail);
    assert_eq!(sent[0].to, ["anna@contoso.com"]);
    assert_eq!(sent[0].bcc, ["archive@contoso.com"], "the draft's Bcc set explicitly");
    assert_eq!(f.count(Op::UpdateMessage), 1);
}

#[tokio::test]
async fn an_upload_range_refused_as_out_of_place_starts_a_new_session() {
    for (status, code) in [(416, "InvalidRange"), (400, "InvalidContentRange")] {
        let scan = pdf(5 * 1000 * 1000, 62);
        let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &scan)]);
        let f = fixture(&msg, &["anna@contoso.com"]).await;
        f.fake.fault(Op::Put, 2, Action::error(status, code, "The range is not the next expected one."));
        f.send(&Progress::None, &MemSink::default()).await.expect("sent through a new session");
        let sent = f.fake.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent_attachments(&sent[0]), original_attachments(&msg), "{status}: the scan once, whole");
        assert_eq!(f.count(Op::CreateSession), 2, "{status}");
    }
}

#[tokio::test]
async fn a_session_that_claims_more_than_the_file_is_not_taken_for_finished() {
    let scan = pdf(10 * 1000 * 1000, 63);
    let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &scan)]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    f.fake.fault(Op::Put, 2, Action::Hang);
    let sink = MemSink::default();
    assert!(tokio::time::timeout(Duration::from_secs(5), f.send(&Progress::None, &sink)).await.is_err());
    let body = serde_json::json!({"expirationDateTime": "2030-01-01T00:00:00Z", "nextExpectedRanges": ["20000000-"]});
    f.fake.fault(Op::GetSession, 1, Action::Answer { status: 200, body });
    f.send(&sink.last(), &sink).await.expect("sent");
    let sent = f.fake.sent();
    assert_eq!(sent.len(), 1);
    assert!(sent_attachments(&sent[0]).len() == 1 && sent_attachments(&sent[0])[0].1 == scan, "sent without its scan");
    assert_eq!(f.count(Op::CreateSession), 2, "a new session for the scan");
}

#[tokio::test]
async fn a_draft_over_the_mailbox_s_max_send_size_is_refused_permanently_and_deleted() {
    let msg = scan_message(&["anna@contoso.com"], &[("scan.pdf", &pdf(9_000_000, 64))]);
    let f = fixture(&msg, &["anna@contoso.com"]).await;
    // Exchange Online's default MaxSendSize is 35 MB; an admin set 10 MB here.
    f.fake.set_max_send_size(Some(10 * 1024 * 1024));
    match f.send(&Progress::None, &MemSink::default()).await {
        Err(SendError::Rejected(r)) => {
            assert_eq!(r.code, 552, "{r:?}");
            assert!(r.text.starts_with("5.3.4 Microsoft Graph ErrorMessageSizeExceeded"), "{r:?}");
            assert!(r.is_permanent() && r.hint().is_some(), "{}", r.describe());
        }
        other => panic!("not refused permanently: {other:?}"),
    }
    assert!(f.fake.sent().is_empty());
    assert_eq!(f.count(Op::DeleteMessage), 1);
    assert!(f.fake.drafts().is_empty(), "the refused scan lingers in Drafts");
}

#[tokio::test]
async fn only_a_part_with_a_content_id_is_added_as_inline() {
    let big = STANDARD.encode(pdf(3_000_000, 65));
    let small = STANDARD.encode(pdf(1_000_000, 66));
    let mut msg = String::from(
        "From: scans@contoso.com\r\nTo: anna@contoso.com\r\nSubject: Scan\r\nMessage-ID: <i@relay.lan>\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nx\r\n",
    );
    for (name, cid, b64) in [("a.pdf", "", &big), ("b.png", "Content-ID: <p1@x>\r\n", &small), ("c.pdf", "", &small)] {
        msg.push_str(&format!(
            "--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n{cid}\
             Content-Disposition: inline; filename={name}\r\n\r\n"
        ));
        for line in b64.as_bytes().chunks(76) {
            msg.push_str(std::str::from_utf8(line).expect("ascii"));
            msg.push_str("\r\n");
        }
    }
    msg.push_str("--b--\r\n");
    let f = fixture(msg.as_bytes(), &["anna@contoso.com"]).await;
    f.send(&Progress::None, &MemSink::default()).await.expect("sent");
    let sent = f.fake.sent();
    assert_eq!(sent.len(), 1);
    let inline: Vec<(String, bool)> = sent[0].attachments.iter().map(|a| (a.name.clone(), a.inline)).collect();
    assert_eq!(inline, [("a.pdf".into(), false), ("b.png".into(), true), ("c.pdf".into(), false)]);
}
