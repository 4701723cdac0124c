//! Sending through the Gmail API: `mfd_relay::upstream::gmail::Gmail` driven directly against
//! the fake Gmail API ([`common::fake_gmail`]), with the queue record played by an in-memory
//! progress sink that can "crash" (refuse a save).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mfd_relay::oauth::tokens::AccessToken;
use mfd_relay::upstream::api::{Outbound, Progress, ProgressSink};
use mfd_relay::upstream::gmail::{Gmail, Resume, CHUNK};
use mfd_relay::upstream::{Envelope, NoTrace, Observer, SendError, SendOutcome, Step};

use crate::common::fake_gmail::{FakeGmail, SentMessage};
use crate::common::BearerValidator;

const TOKEN: &str = "ya29.fake-gmail-token-scans";
const ACCOUNT: &str = "scans@example.com";

fn validator() -> BearerValidator {
    Arc::new(|t: &str| (t == TOKEN).then(|| ACCOUNT.to_string()))
}

fn token(secret: &str) -> AccessToken {
    AccessToken { secret: secret.to_string(), account: ACCOUNT.to_string(), expires_at: i64::MAX }
}

/// The queue record of one message: every committed [`Progress`], in order. `fail_at(n)`: the
/// nth save from now fails (the relay died before the record was written).
#[derive(Default)]
struct MemorySink {
    saved: Mutex<Vec<Progress>>,
    fail_at: Mutex<Option<usize>>,
    calls: Mutex<usize>,
}

impl MemorySink {
    fn fail_at(&self, n: usize) {
        *self.fail_at.lock().unwrap() = Some(*self.calls.lock().unwrap() + n);
    }

    fn last(&self) -> Progress {
        self.saved.lock().unwrap().last().cloned().unwrap_or_default()
    }

    fn offsets(&self) -> Vec<u64> {
        self.saved
            .lock()
            .unwrap()
            .iter()
            .map(|p| match p {
                Progress::Gmail(r) => r.offset,
                other => panic!("not a Gmail progress: {other:?}"),
            })
            .collect()
    }
}

impl ProgressSink for MemorySink {
    fn save<'a>(&'a self, progress: &'a Progress) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            let mut calls = self.calls.lock().unwrap();
            *calls += 1;
            if *self.fail_at.lock().unwrap() == Some(*calls) {
                return Err("the relay stopped before the record was written".to_string());
            }
            self.saved.lock().unwrap().push(progress.clone());
            Ok(())
        })
    }
}

/// Collects the steps `mfd-relay test` would show.
#[derive(Default)]
struct Steps(Mutex<Vec<Step>>);

impl Observer for Steps {
    fn step(&self, step: Step) {
        self.0.lock().unwrap().push(step);
    }
}

/// A scan as a printer sends it: a short text part and a PDF in base64; `size` bytes in all.
fn scan(size: usize, to: &str) -> Vec<u8> {
    let mut m = format!(
        "From: Scanner <{ACCOUNT}>\r\nTo: {to}\r\nSubject: Scan\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\n\
         Message-ID: <scan-{size}@printer.local>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n\
         Scanned document attached.\r\n--b1\r\nContent-Type: application/pdf; name=\"scan.pdf\"\r\n\
         Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"scan.pdf\"\r\n\r\n"
    )
    .into_bytes();
    // Deterministic "random" base64 (xorshift).
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ size as u64;
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    // Exactly `size` bytes: 76-character lines, a shorter last one, the closing boundary.
    let end = b"\r\n--b1--\r\n";
    let room = size.saturating_sub(m.len() + end.len());
    for i in 0..room {
        let col = i % 78;
        let last = i + 1 == room;
        match col {
            76 if !last => m.push(b'\r'),
            77 => m.push(b'\n'),
            _ => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                m.push(alphabet[(x % 64) as usize]);
            }
        }
    }
    m.extend_from_slice(end);
    m
}

struct Scan {
    _dir: tempfile::TempDir,
    path: PathBuf,
    bytes: Vec<u8>,
    rcpts: Vec<String>,
}

/// A scan whose To is the envelope.
fn spool(size: usize, rcpts: &[&str]) -> Scan {
    spool_to(size, &rcpts.join(", "), rcpts)
}

/// A scan with header `To: to`, spooled for the envelope `rcpts`.
fn spool_to(size: usize, to: &str, rcpts: &[&str]) -> Scan {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("message.eml");
    let bytes = scan(size, to);
    assert_eq!(bytes.len(), size);
    std::fs::write(&path, &bytes).expect("write the spooled message");
    Scan { _dir: dir, path, bytes, rcpts: rcpts.iter().map(|s| s.to_string()).collect() }
}

/// The header section of a message (up to its empty line) and what follows.
fn split(raw: &[u8]) -> (&[u8], &[u8]) {
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a header section") + 4;
    raw.split_at(at)
}

async fn send(
    gmail: &Gmail,
    secret: &str,
    scan: &Scan,
    progress: &Progress,
    sink: &MemorySink,
    obs: &dyn Observer,
) -> Result<SendOutcome, SendError> {
    let env = Envelope { from: ACCOUNT, rcpts: &scan.rcpts, size: scan.bytes.len() as u64, eight_bit: false };
    let msg =
        Outbound { identity: "scans", mailbox: ACCOUNT, env: &env, body: Path::new(&scan.path), progress, sink, obs };
    gmail.send(&token(secret), &msg).await
}

async fn setup() -> (FakeGmail, Gmail) {
    let fake = FakeGmail::start(validator()).await;
    let gmail = Gmail::new(&fake.base_url(), None).expect("client builds");
    (fake, gmail)
}

/// Bytes of chunks that went up from request `from` on.
fn chunk_bytes(fake: &FakeGmail, from: usize) -> usize {
    fake.requests()[from..].iter().filter(|r| r.kind == "chunk" && r.status != 503).map(|r| r.body_len).sum()
}

fn only_message(fake: &FakeGmail, scan: &Scan) -> SentMessage {
    let sent = fake.sent();
    assert_eq!(sent.len(), 1, "exactly one message sent");
    let m = sent.into_iter().next().expect("one");
    assert_eq!(m.account, ACCOUNT);
    assert_eq!(m.recipients, scan.rcpts);
    assert!(m.raw == scan.bytes, "the message arrived byte-identical ({} of {} bytes)", m.raw.len(), scan.bytes.len());
    m
}

#[tokio::test]
async fn a_small_scan_goes_up_in_one_media_request() {
    let (fake, gmail) = setup().await;
    let scan = spool(2_000, &["alice@example.com"]);
    let sink = MemorySink::default();
    let steps = Steps::default();
    let out = send(&gmail, TOKEN, &scan, &Progress::None, &sink, &steps).await.expect("sent");
    assert_eq!(out.accepted, scan.rcpts);
    assert!(out.refused.is_empty());
    let reply = out.reply.expect("a reply");
    assert_eq!(reply.code, 250);
    let m = only_message(&fake, &scan);
    assert_eq!(m.upload, "media");
    assert!(reply.text.contains(&m.id), "{}", reply.text);
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 1);
    assert!(reqs[0].kind == "media" && reqs[0].authorization && reqs[0].body_len == scan.bytes.len());
    assert!(sink.saved.lock().unwrap().is_empty(), "a one-request send records nothing");
    let steps = steps.0.lock().unwrap();
    assert!(steps.iter().any(|s| s.name == "gmail-send" && s.ok), "{steps:?}");
    assert!(!steps.iter().any(|s| s.detail.contains(TOKEN)));
}

#[tokio::test]
async fn a_30_mb_scan_goes_up_resumably_byte_identical() {
    let (fake, gmail) = setup().await;
    let scan = spool(30_000_000, &["alice@example.com", "bob@example.com"]);
    let sink = MemorySink::default();
    let steps = Steps::default();
    let started = Instant::now();
    let out = send(&gmail, TOKEN, &scan, &Progress::None, &sink, &steps).await.expect("sent");
    eprintln!("30 MB by resumable upload to the fake: {:?}", started.elapsed());
    assert_eq!(out.reply.expect("reply").code, 250);
    assert_eq!(only_message(&fake, &scan).upload, "resumable");
    // The session was recorded before the first byte, then each confirmed offset.
    assert_eq!(sink.offsets(), vec![0, CHUNK, 2 * CHUNK, 3 * CHUNK]);
    let reqs = fake.requests();
    let kinds: Vec<_> = reqs.iter().map(|r| r.kind).collect();
    assert_eq!(kinds, ["open", "chunk", "chunk", "chunk", "chunk"]);
    assert_eq!(chunk_bytes(&fake, 0), scan.bytes.len(), "every byte went up once");
    let ranges: Vec<_> = reqs.iter().filter_map(|r| r.content_range.as_deref()).collect();
    assert_eq!(
        ranges,
        [
            "bytes 0-8388607/30000000",
            "bytes 8388608-16777215/30000000",
            "bytes 16777216-25165823/30000000",
            "bytes 25165824-29999999/30000000"
        ]
    );
    let steps = steps.0.lock().unwrap();
    let names: Vec<_> = steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["upload-session", "upload", "upload", "upload", "upload"]);
    let Progress::Gmail(r) = sink.last() else { panic!("recorded") };
    assert!(!steps.iter().any(|s| s.detail.contains(&r.session)), "the session URI is not shown");
}

#[tokio::test]
async fn a_crash_mid_upload_continues_the_same_session() {
    let (fake, gmail) = setup().await;
    let scan = spool(30_000_000, &["alice@example.com"]);
    let sink = MemorySink::default();
    fake.fail_chunk(3);
    let first = send(&gmail, TOKEN, &scan, &Progress::None, &sink, &NoTrace).await;
    assert!(matches!(first, Err(SendError::Throttled { .. })), "{first:?}");
    assert!(fake.sent().is_empty());
    let recorded = sink.last();
    assert!(matches!(&recorded, Progress::Gmail(r) if r.offset == 2 * CHUNK), "{recorded:?}");

    let before = fake.requests().len();
    send(&gmail, TOKEN, &scan, &recorded, &sink, &NoTrace).await.expect("resumed and sent");
    only_message(&fake, &scan);
    assert_eq!(fake.sessions_opened(), 1, "the same session continued");
    let again = &fake.requests()[before..];
    assert_eq!(again[0].kind, "query");
    assert_eq!(chunk_bytes(&fake, before), scan.bytes.len() - 2 * CHUNK as usize, "only the rest went up again");
}

#[tokio::test]
async fn a_crash_before_the_offset_was_recorded_continues_where_google_is() {
    let (fake, gmail) = setup().await;
    let scan = spool(30_000_000, &["alice@example.com"]);
    let sink = MemorySink::default();
    // Saves: the session (offset 0), offset 8 MiB, then 16 MiB: the relay dies before that one.
    sink.fail_at(3);
    let first = send(&gmail, TOKEN, &scan, &Progress::None, &sink, &NoTrace).await;
    assert!(matches!(first, Err(SendError::Network(_))), "{first:?}");
    let recorded = sink.last();
    assert!(matches!(&recorded, Progress::Gmail(r) if r.offset == CHUNK), "{recorded:?}");

    let before = fake.requests().len();
    send(&gmail, TOKEN, &scan, &recorded, &sink, &NoTrace).await.expect("resumed and sent");
    only_message(&fake, &scan);
    assert_eq!(fake.sessions_opened(), 1);
    assert_eq!(chunk_bytes(&fake, before), scan.bytes.len() - 2 * CHUNK as usize, "continued from Google's offset");
}

#[tokio::test]
async fn a_session_that_completed_before_the_crash_sends_nothing_more() {
    let (fake, gmail) = setup().await;
    let scan = spool(12_000_000, &["alice@example.com"]);
    let sink = MemorySink::default();
    send(&gmail, TOKEN, &scan, &Progress::None, &sink, &NoTrace).await.expect("sent");
    // The relay died before the queue record said "done": it comes back with the session.
    let recorded = sink.last();
    assert!(matches!(&recorded, Progress::Gmail(r) if r.offset == CHUNK), "{recorded:?}");
    let before = fake.requests().len();
    let out = send(&gmail, TOKEN, &scan, &recorded, &sink, &NoTrace).await.expect("already sent");
    assert_eq!(out.reply.expect("reply").code, 250);
    only_message(&fake, &scan);
    let again: Vec<_> = fake.requests()[before..].iter().map(|r| r.kind).collect();
    assert_eq!(again, ["query"], "one question, no upload, no new session");
}

#[tokio::test]
async fn an_expired_session_is_replaced_and_the_message_sent_once() {
    let (fake, gmail) = setup().await;
    let scan = spool(20_000_000, &["alice@example.com"]);
    let sink = MemorySink::default();
    fake.fail_chunk(2);
    assert!(send(&gmail, TOKEN, &scan, &Progress::None, &sink, &NoTrace).await.is_err());
    let recorded = sink.last();
    fake.expire_sessions();
    let before = fake.requests().len();
    send(&gmail, TOKEN, &scan, &recorded, &sink, &NoTrace).await.expect("sent through a new session");
    only_message(&fake, &scan);
    assert_eq!(fake.sessions_opened(), 2);
    let again: Vec<_> = fake.requests()[before..].iter().map(|r| (r.kind, r.status)).collect();
    assert_eq!(again[..2], [("query", 404), ("open", 200)]);
    assert_eq!(chunk_bytes(&fake, before), scan.bytes.len(), "the new session took the whole message");
    let Progress::Gmail(Resume { session, .. }) = sink.last() else { panic!("recorded") };
    let Progress::Gmail(old) = recorded else { panic!("recorded") };
    assert_ne!(session, old.session, "the new session was recorded");
}

#[tokio::test]
async fn throttling_is_deferred_for_the_retry_after() {
    let (fake, gmail) = setup().await;
    let scan = spool(2_000, &["alice@example.com"]);
    let sink = MemorySink::default();
    fake.throttle(1, 42);
    let e = send(&gmail, TOKEN, &scan, &Progress::None, &sink, &NoTrace).await.expect_err("throttled");
    let SendError::Throttled { reply, retry_after } = e else { panic!("{e:?}") };
    assert_eq!(retry_after, Duration::from_secs(42));
    assert!(!reply.is_permanent() && reply.text.contains("rateLimitExceeded"), "{}", reply.text);
    assert!(fake.sent().is_empty());
    send(&gmail, TOKEN, &scan, &Progress::None, &sink, &NoTrace).await.expect("sent after the wait");
    only_message(&fake, &scan);
}

#[tokio::test]
async fn a_token_without_gmail_send_is_refused_permanently_with_the_fix() {
    let (fake, gmail) = setup().await;
    let scan = spool(2_000, &["alice@example.com"]);
    fake.refuse(403, "insufficientPermissions", "Request had insufficient authentication scopes.");
    let e = send(&gmail, TOKEN, &scan, &Progress::None, &MemorySink::default(), &NoTrace).await.expect_err("refused");
    let SendError::Rejected(reply) = e else { panic!("{e:?}") };
    assert!(reply.is_permanent(), "{reply:?}");
    assert!(reply.text.contains("insufficientPermissions") && reply.text.contains("gmail.send"), "{}", reply.text);
    assert!(reply.to_device_reply().text().contains("gmail.send"));
}

#[tokio::test]
async fn an_unknown_token_is_an_auth_error_without_the_token() {
    let (fake, gmail) = setup().await;
    let scan = spool(2_000, &["alice@example.com"]);
    let e = send(&gmail, "ya29.revoked-token", &scan, &Progress::None, &MemorySink::default(), &NoTrace)
        .await
        .expect_err("refused");
    assert!(matches!(&e, SendError::Auth { reply, .. } if reply.code == 535), "{e:?}");
    assert!(!format!("{e} {e:?}").contains("ya29.revoked-token"));
    assert!(fake.sent().is_empty());
}

#[tokio::test]
async fn a_message_over_35_mib_is_refused_before_anything_goes_up() {
    let (fake, gmail) = setup().await;
    let scan = spool(36 * 1024 * 1024 + 10, &["alice@example.com"]);
    let e = send(&gmail, TOKEN, &scan, &Progress::None, &MemorySink::default(), &NoTrace).await.expect_err("too big");
    let SendError::Rejected(reply) = e else { panic!("{e:?}") };
    assert_eq!(reply.code, 552);
    assert!(reply.text.starts_with("5.3.4"), "{}", reply.text);
    assert!(fake.requests().is_empty());
}

/// The fake refuses what Google refuses, so the tests above would catch a client that broke
/// the rules: media over 5 MB, chunks out of order or of a wrong size, no token.
#[tokio::test]
async fn the_fake_refuses_what_google_refuses() {
    let (fake, _) = setup().await;
    let http = reqwest::Client::new();
    let url = |t: &str| format!("{}/upload/gmail/v1/users/me/messages/send?uploadType={t}", fake.base_url());
    let big = scan(5_000_001, "alice@example.com");
    let r = http.post(url("media")).bearer_auth(TOKEN).header("content-type", "message/rfc822").body(big).send().await;
    assert_eq!(r.expect("answer").status().as_u16(), 413);
    let r = http.post(url("media")).header("content-type", "message/rfc822").body(scan(2_000, "a@example.com")).send();
    assert_eq!(r.await.expect("answer").status().as_u16(), 401);
    let open = |total: u64| {
        http.post(url("resumable"))
            .bearer_auth(TOKEN)
            .header("x-upload-content-type", "message/rfc822")
            .header("x-upload-content-length", total.to_string())
            .body(Vec::new())
            .send()
    };
    assert_eq!(open(35 * 1024 * 1024 + 1).await.expect("answer").status().as_u16(), 413);
    let r = open(1_000_000).await.expect("answer");
    assert_eq!(r.status().as_u16(), 200);
    let session = r.headers()["location"].to_str().expect("ascii").to_string();
    let put = |range: &str, len: usize| {
        http.put(&session).header("content-range", range.to_string()).body(vec![b'x'; len]).send()
    };
    // Not a multiple of 256 KiB and not the last chunk; then a gap; then a right one.
    assert_eq!(put("bytes 0-99999/1000000", 100_000).await.expect("answer").status().as_u16(), 400);
    assert_eq!(put("bytes 262144-524287/1000000", 262_144).await.expect("answer").status().as_u16(), 400);
    let r = put("bytes 0-262143/1000000", 262_144).await.expect("answer");
    assert_eq!(r.status().as_u16(), 308);
    assert_eq!(r.headers()["range"], "bytes=0-262143");
    assert!(fake.sent().is_empty());
}

/// A printer that sends one transaction per recipient with every address in To: Gmail must
/// send each copy to its envelope's recipient only.
#[tokio::test]
async fn recipients_are_exactly_the_envelope_one_transaction_per_recipient() {
    let (fake, gmail) = setup().await;
    let to = "alice@example.com, bob@example.com, carol@example.com";
    for rcpt in ["alice@example.com", "bob@example.com", "carol@example.com"] {
        let scan = spool_to(2_000, to, &[rcpt]);
        send(&gmail, TOKEN, &scan, &Progress::None, &MemorySink::default(), &NoTrace).await.expect("sent");
        let m = fake.sent().pop().expect("sent");
        assert_eq!(m.recipients, [rcpt], "only the envelope's recipient");
        assert_eq!(split(&m.raw).1, split(&scan.bytes).1, "the body is untouched");
    }
    assert_eq!(fake.sent().len(), 3);
}

/// An envelope recipient the header does not name goes as Bcc, which Gmail removes.
#[tokio::test]
async fn an_envelope_only_recipient_is_sent_as_bcc_and_not_shown() {
    let (fake, gmail) = setup().await;
    let scan = spool_to(2_000, "alice@example.com", &["alice@example.com", "dave@example.com"]);
    send(&gmail, TOKEN, &scan, &Progress::None, &MemorySink::default(), &NoTrace).await.expect("sent");
    let m = fake.sent().pop().expect("sent");
    assert_eq!(m.recipients, ["alice@example.com", "dave@example.com"]);
    let (head, body) = split(&m.raw);
    assert!(!String::from_utf8_lossy(head).to_ascii_lowercase().contains("dave@"), "Bcc removed before delivery");
    assert_eq!(body, split(&scan.bytes).1);
}

/// A large message whose header is rewritten for its envelope resumes after a crash with the
/// same bytes: the delivered message is exactly the rewritten one, sent once.
#[tokio::test]
async fn a_rewritten_large_message_resumes_with_the_same_bytes() {
    let (fake, gmail) = setup().await;
    let scan = spool_to(12_000_000, "alice@example.com, bob@example.com", &["bob@example.com"]);
    let sink = MemorySink::default();
    fake.fail_chunk(2);
    assert!(send(&gmail, TOKEN, &scan, &Progress::None, &sink, &NoTrace).await.is_err());
    send(&gmail, TOKEN, &scan, &sink.last(), &sink, &NoTrace).await.expect("resumed");
    let sent = fake.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].recipients, ["bob@example.com"]);
    let expected = mfd_relay::upstream::recipients::Outgoing::open(&scan.path, &scan.rcpts)
        .and_then(|o| o.read_all())
        .expect("the outgoing message");
    assert!(sent[0].raw == expected, "the delivered message is the rewritten one");
    assert_eq!(split(&sent[0].raw).1, split(&scan.bytes).1);
    assert_eq!(fake.sessions_opened(), 1);
}

/// A relay whose identity "scans" (a Workspace service account) sends through `fake` with
/// `send_via = "gmail_api"`; device "floor3" (PIN 1234) uses it.
async fn relay_through(
    tweak: impl FnOnce(&mut crate::common::relay::Setup),
) -> (crate::common::relay::World, FakeGmail) {
    use crate::common::fake_oauth::FakeOAuth;
    use crate::common::relay::{endpoints, pin_hash, World, SCANS};
    use crate::common::RsaTestKey;

    // The fake Gmail API knows the fake provider's tokens (which starts with the relay).
    let idp: Arc<std::sync::OnceLock<FakeOAuth>> = Arc::default();
    let known = idp.clone();
    // Only a live token for Gmail's scopes: the service account asks for gmail.send alone.
    let fake = FakeGmail::start(Arc::new(move |t: &str| {
        known.get().and_then(|idp| idp.bearer_validator(crate::common::fake_oauth::GOOGLE_SEND_SCOPE)(t))
    }))
    .await;
    let key = RsaTestKey::a();
    let sa = "relay@fake-project.iam.gserviceaccount.com";
    let base = fake.base_url();
    let w = World::start_with(
        |e| {
            let _ = idp.set(e.idp.clone());
            e.idp.register_service_account(sa, key.public_key_der());
            let json = e.dir.join("sa.json");
            std::fs::write(&json, key.service_account_json(sa, &e.idp.token_url())).expect("write the key file");
            format!(
                "[[provider]]\nname = \"google\"\nkind = \"google\"\nclient_id = \"unused\"\nservice_account_file = \"{}\"\n{}\
                 gmail_api_url = \"{base}\"\n\n\
                 [[identity]]\nname = \"scans\"\nprovider = \"google\"\nemail = \"{SCANS}\"\nflow = \"service_account\"\nsend_via = \"gmail_api\"\n\n\
                 [[device]]\nname = \"floor3\"\nidentity = \"scans\"\nusername = \"floor3\"\npin_hash = \"{}\"\n",
                json.display(),
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

async fn wait_sent(fake: &FakeGmail, n: usize, within: Duration) -> Vec<SentMessage> {
    let deadline = Instant::now() + within;
    while fake.sent().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fake.sent()
}

/// The relay end to end: a printer's scans (small and large) through an identity with
/// `send_via = "gmail_api"`, a Workspace service account's token, to the envelope's recipients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_printer_s_scans_go_out_through_the_gmail_api() {
    let (w, fake) = relay_through(|_| {}).await;
    // One transaction per recipient, every address in To: this copy goes to bob only.
    let small = scan(2_000, "alice@contoso.test, bob@contoso.test");
    let r = w.send(&DEVICE, &small).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", w.relay.log());
    let large = scan(12_000_000, "bob@contoso.test");
    let r = w.send(&DEVICE, &large).await;
    assert!(r.ok, "{r:?}\n{}", w.relay.log());
    let sent = wait_sent(&fake, 2, Duration::from_secs(60)).await;
    assert_eq!(sent.len(), 2, "{}", w.relay.log());
    for (m, original) in sent.iter().zip([&small, &large]) {
        assert_eq!(m.account, crate::common::relay::SCANS);
        assert_eq!(m.recipients, ["bob@contoso.test"]);
        assert_eq!(split(&m.raw).1, split(original).1, "the body arrived byte-identical");
    }
    assert_eq!((sent[0].upload, sent[1].upload), ("media", "resumable"));
}

/// The relay killed (SIGKILL) in the middle of a resumable upload: after the restart the
/// queued message continues the same session from the recorded offset, and Gmail sends it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_upload_continues_after_restart_and_sends_once() {
    let (mut w, fake) = relay_through(|s| s.relay_extra.push_str("in_session_timeout = \"1s\"\n")).await;
    fake.stall_chunk(2);
    let large = scan(12_000_000, "bob@contoso.test");
    let r = w.send(&DEVICE, &large).await;
    assert!(r.ok && r.message.contains("queued"), "{r:?}\n{}", w.relay.log());
    // The first chunk is confirmed and its offset recorded before the second one starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.stalled() == 0 {
        assert!(Instant::now() < deadline, "the upload never reached its second chunk\n{}", w.relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = fake.requests().len();
    tokio::task::block_in_place(|| {
        w.relay.kill9();
        w.relay.spawn();
    });
    let sent = wait_sent(&fake, 1, Duration::from_secs(60)).await;
    assert_eq!(sent.len(), 1, "{}", w.relay.log());
    assert_eq!(split(&sent[0].raw).1, split(&large).1, "the body arrived byte-identical");
    assert_eq!(fake.sessions_opened(), 1, "the same session continued");
    let after: Vec<_> = fake.requests()[before..].iter().map(|r| (r.kind, r.status)).collect();
    assert_eq!(after.first(), Some(&("query", 308)), "{after:?}");
    let total = sent[0].raw.len();
    assert_eq!(chunk_bytes(&fake, before), total - CHUNK as usize, "only the rest went up after the restart");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.sent().len(), 1, "and it is not sent again");
}

/// `mfd-relay test` through the Gmail API shows the session and each chunk, not the session URI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mfd_relay_test_shows_the_upload_steps() {
    let (w, fake) = relay_through(|_| {}).await;
    let (code, out, err) = tokio::task::block_in_place(|| {
        w.relay.cli(&["test", "--device", "floor3", "--to", "bob@contoso.test", "--size", "9MB"], None)
    });
    assert_eq!(code, 0, "{out}\n{err}");
    let sent = fake.sent();
    assert_eq!(sent.len(), 1, "{out}");
    assert_eq!(sent[0].upload, "resumable");
    assert!(out.contains("upload-session") && out.matches("upload ").count() >= 2, "{out}");
    assert!(!out.contains("upload_id"), "the session URI is not shown: {out}");
}

/// Throttling through the relay: Gmail's 429 with `Retry-After: 4` keeps the message queued
/// (the device hears 250, queued) for those 4 seconds, not the failure backoff, and then it
/// goes out once; the metrics say why it waited and by which path it went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_through_the_relay_waits_the_retry_after_then_sends_once() {
    // The harness retries after 1-2 s: only Retry-After explains a wait of 4.
    let (w, fake) = relay_through(|_| {}).await;
    fake.throttle(1, 4);
    let started = Instant::now();
    let r = w.send(&DEVICE, &scan(2_000, "bob@contoso.test")).await;
    assert!(r.ok && r.message.contains("queued"), "{r:?}\n{}", w.relay.log());
    let sent = wait_sent(&fake, 1, Duration::from_secs(30)).await;
    assert_eq!(sent.len(), 1, "{}", w.relay.log());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(4), "sent after {waited:?}, before Retry-After");
    // The provider has the message a moment before the relay has counted it.
    let delivered = r#"mfd_relay_messages_delivered_total{identity="scans",path="queue",via="gmail_api"} 1"#;
    let metrics = tokio::task::block_in_place(|| w.relay.metrics_with(delivered, Duration::from_secs(10)));
    assert!(metrics.contains(delivered), "{metrics}");
    assert!(
        metrics.contains(r#"mfd_relay_messages_deferred_total{identity="scans",reason="throttled"} 1"#),
        "{metrics}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(fake.sent().len(), 1, "sent once");
}
