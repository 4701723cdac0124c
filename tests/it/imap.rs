//! Mobile print end to end: the real relay binary polls a real Dovecot (`passdb oauth2`,
//! tokens checked against the in-process fake provider) and turns mail into job folders.
//!
//! Mail goes in the way it does in an office: IMAP APPEND by an independent client
//! (async-imap, XOAUTH2), or SMTP through the harness's Postfix (XOAUTH2) into Dovecot by
//! LMTP. Covered: two PDFs become one job and are deleted upstream (implicit TLS, print
//! command), IDLE picks a mail up within seconds, refused senders and types (STARTTLS, with
//! answers delivered through Postfix), hostile file names (and `after = move:`), kill -9
//! between spool and delete, a UIDVALIDITY change, and a refused token refreshed once.
//!
//! Needs root and Dovecot/Postfix (tests/interop/install.sh); `MFD_RELAY_SKIP_INTEROP=1`
//! skips instead of failing.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::fake_oauth::{ClientApp, FakeOAuth, Grant};
use crate::common::real::{spawn_relay_until_exit, ImapUser, RealServers};
use crate::common::relay::{Relay, Setup};

const PRINT: &str = "print@example.test";
const ALICE: &str = "alice@example.test";
const EVE: &str = "eve@example.test";
const CLIENT: &str = "print-app";
const SECRET: &str = "print-app-secret";
const WAIT: Duration = Duration::from_secs(30);

const PDF_A: &[u8] = b"%PDF-1.4\n1 0 obj <</Type /Catalog>> endobj\n% first document\ntrailer <<>>\n%%EOF\n";
const PDF_B: &[u8] =
    b"%PDF-1.7\n1 0 obj <</Type /Catalog>> endobj\n% second document, a bit longer\ntrailer <<>>\n%%EOF\n";

/// How the relay reaches Dovecot.
#[derive(Clone, Copy)]
enum ImapTls {
    Plain,
    Starttls,
    Implicit,
}

/// Fake provider, real Dovecot + Postfix, and a relay polling `print@example.test`.
/// Torn down in field order: the relay first, so that it is not left reconnecting to
/// servers that are stopping.
struct Print {
    relay: Relay,
    real: RealServers,
    idp: FakeOAuth,
    dir: tempfile::TempDir,
}

impl Print {
    /// `mailbox` holds extra keys for the [[mailbox]] section. `None` when interop tests are
    /// skipped.
    async fn start(test: &str, tls: ImapTls, mailbox: &str) -> Option<Print> {
        Self::start_with(test, tls, mailbox, |_| {}).await
    }

    /// Like [`Print::start`], with `servers` run on the real servers before the relay starts.
    async fn start_with(
        test: &str,
        tls: ImapTls,
        mailbox: &str,
        servers: impl FnOnce(&RealServers) + Send + 'static,
    ) -> Option<Print> {
        let idp = FakeOAuth::start().await;
        idp.register_client(ClientApp::public(CLIENT).secret(SECRET).app_account(PRINT));
        let url = idp.introspect_url();
        let name = test.to_string();
        let real = tokio::task::spawn_blocking(move || {
            let real = RealServers::start(&name, &url)?;
            servers(&real);
            Some(real)
        })
        .await
        .unwrap()?;
        let dir = tempfile::tempdir().unwrap();
        let ca = real.info.ca_cert.clone().expect("the harness made TLS material");
        let (port, mode) = match tls {
            ImapTls::Plain => (real.info.imap_port, "none"),
            ImapTls::Starttls => (real.info.imap_port, "starttls"),
            ImapTls::Implicit => (real.info.imaps_port.expect("IMAPS port"), "implicit"),
        };
        let sections = format!(
            "[[provider]]\nname = \"dove\"\nkind = \"generic\"\nclient_id = \"{CLIENT}\"\nclient_secret = \"{SECRET}\"\n\
             token_url = \"{}\"\nscopes = [\"https://outlook.office365.com/.default\"]\n\
             imap = \"127.0.0.1:{port}\"\nimap_tls = \"{mode}\"\nsmtp = \"127.0.0.1:{}\"\nsmtp_tls = \"none\"\nca_file = \"{}\"\n\n\
             [[identity]]\nname = \"print\"\nprovider = \"dove\"\nemail = \"{PRINT}\"\nflow = \"client_credentials\"\n\n\
             [[mailbox]]\nname = \"print\"\nidentity = \"print\"\nspool = \"spool\"\n\
             types = [\"application/pdf\", \"image/jpeg\", \"image/png\"]\n{poll}{mailbox}\n",
            idp.token_url(),
            real.info.smtp_port,
            ca.display(),
            // Only IDLE (or a test that sets it) picks mail up quickly.
            poll = if mailbox.contains("poll_interval") { "" } else { "poll_interval = \"10m\"\n" },
        );
        let setup = Setup::new(sections);
        let path = dir.path().to_path_buf();
        let relay = tokio::task::spawn_blocking(move || Relay::start(&path, &setup)).await.unwrap();
        Some(Print { relay, real, idp, dir })
    }

    /// The mailbox's job folders, oldest first.
    fn jobs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("spool/print"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    fn job_json(job: &Path) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(job.join("job.json")).unwrap()).unwrap()
    }

    /// Waits until there are `n` jobs; panics with the relay's log otherwise.
    async fn wait_jobs(&self, n: usize) -> Vec<PathBuf> {
        let deadline = Instant::now() + WAIT;
        loop {
            let jobs = self.jobs();
            if jobs.len() >= n {
                assert_eq!(jobs.len(), n, "more jobs than expected: {jobs:?}\n{}", self.relay.log());
                return jobs;
            }
            assert!(Instant::now() < deadline, "{} of {n} jobs after {WAIT:?}:\n{}", jobs.len(), self.relay.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn user(&self, email: &str) -> ImapUser {
        ImapUser::login(self.real.info.imap_port, email, &self.idp.issue_access_token(email)).await
    }

    /// APPENDs `raw` to the print mailbox's INBOX.
    async fn deliver(&self, raw: &[u8]) {
        let mut u = self.user(PRINT).await;
        u.append("INBOX", raw).await;
        u.logout().await;
    }

    /// UIDVALIDITY and UIDs of a folder of the print mailbox.
    async fn upstream(&self, folder: &str) -> (u32, Vec<u32>) {
        let mut u = self.user(PRINT).await;
        let r = u.uids(folder).await;
        u.logout().await;
        r
    }

    /// Waits until the print mailbox's INBOX holds `n` messages.
    async fn wait_upstream(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let (_, uids) = self.upstream("INBOX").await;
            if uids.len() == n {
                return;
            }
            assert!(Instant::now() < deadline, "INBOX still holds {uids:?}:\n{}", self.relay.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for a line in the relay's log.
    async fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.relay.log().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{}", self.relay.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The value of a metric line (name with labels), 0 when absent.
    async fn metric(&self, series: &str) -> f64 {
        let port = self.relay.admin_port;
        let text = tokio::task::spawn_blocking(move || common::relay::http_get(port, "/metrics").1).await.unwrap();
        text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0.0)
    }

    /// Delivers `raw` while the relay is down, then runs it once with the test hook that aborts
    /// it right after the job is spooled and recorded (before `after` and the print command);
    /// the relay is left stopped.
    async fn crash_after_spool(&mut self, raw: &[u8]) {
        self.wait_checked().await;
        self.relay.kill9();
        self.deliver(raw).await;
        let (config, log) = (self.relay.config.clone(), self.dir.path().join("relay.log"));
        let status = tokio::task::spawn_blocking(move || {
            spawn_relay_until_exit(&config, &log, &[(mfd_relay::imap::TEST_CRASH_AFTER_SPOOL, "1")], WAIT)
        })
        .await
        .unwrap();
        assert!(!status.success(), "the relay aborted after the spool: {status}");
    }

    /// Waits until the poller has completed at least one check in the current process.
    async fn wait_checked(&self) {
        let deadline = Instant::now() + WAIT;
        while self.metric("mfd_relay_imap_last_success_timestamp_seconds{mailbox=\"print\"}").await == 0.0 {
            assert!(Instant::now() < deadline, "the mailbox was never checked:\n{}", self.relay.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    let s = base64::engine::general_purpose::STANDARD.encode(data);
    s.as_bytes().chunks(76).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("\r\n")
}

/// A mail with a text part and attachments: (Content-Type, Content-Disposition parameters, data).
fn mail(from: &str, subject: &str, attachments: &[(&str, &str, &[u8])]) -> Vec<u8> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut m = format!(
        "From: {from}\r\nTo: {PRINT}\r\nSubject: {subject}\r\nDate: Thu, 26 Nov 2026 06:37:12 +0000\r\n\
         Message-ID: <{n}.{}@test.example>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"=b\"\r\n\r\n\
         --=b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlease print.\r\n",
        common::random_b64url(6)
    );
    for (ctype, disposition, data) in attachments {
        m.push_str(&format!(
            "--=b\r\nContent-Type: {ctype}\r\nContent-Disposition: attachment; {disposition}\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n",
            b64(data)
        ));
    }
    m.push_str("--=b--\r\n");
    m.into_bytes()
}

fn sha256_hex(data: &[u8]) -> String {
    common::sha256(data).iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pdfs_become_one_job_and_are_deleted_upstream() {
    let printed = tempfile::tempdir().unwrap();
    let command = format!("command = [\"/bin/cp\", \"{{file}}\", \"{}/\"]\n", printed.path().display());
    let Some(p) = Print::start("two_pdfs_become_one_job_and_are_deleted_upstream", ImapTls::Implicit, &command).await
    else {
        return;
    };
    p.deliver(&mail(
        &format!("Alice Example <{ALICE}>"),
        "Two documents",
        &[("application/pdf", "filename=\"a.pdf\"", PDF_A), ("application/pdf", "filename=\"b.pdf\"", PDF_B)],
    ))
    .await;
    let jobs = p.wait_jobs(1).await;
    let job = &jobs[0];
    assert!(job.file_name().unwrap().to_str().unwrap().ends_with("-uid1"), "{job:?}");
    let json = Print::job_json(job);
    assert_eq!(json["sender"], ALICE);
    assert_eq!(json["sender_name"], "Alice Example");
    assert_eq!(json["subject"], "Two documents");
    assert!(json["message_id"].as_str().unwrap().ends_with("@test.example"), "{json}");
    assert_eq!(json["date"], "2026-11-26T06:37:12Z");
    let files = json["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{json}");
    for (f, (name, data)) in files.iter().zip([("a.pdf", PDF_A), ("b.pdf", PDF_B)]) {
        assert_eq!(f["name"], name);
        assert_eq!(f["content_type"], "application/pdf");
        assert_eq!(f["size"], data.len());
        assert_eq!(f["sha256"], sha256_hex(data));
        assert_eq!(std::fs::read(job.join(name)).unwrap(), data, "{name} byte-identical");
    }
    // Deleted upstream (\Deleted + UID EXPUNGE), only after the job was on disk.
    p.wait_upstream(0).await;
    // The print command ran once per file, and job.json says how it went.
    let deadline = Instant::now() + WAIT;
    while Print::job_json(job)["handoff"].is_null() {
        assert!(Instant::now() < deadline, "no hand-off results:\n{}", p.relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let handoff = Print::job_json(job)["handoff"].as_array().unwrap().clone();
    assert_eq!(handoff.len(), 2);
    assert!(handoff.iter().all(|h| h["exit_code"] == 0), "{handoff:?}");
    assert_eq!(std::fs::read(printed.path().join("a.pdf")).unwrap(), PDF_A);
    assert_eq!(std::fs::read(printed.path().join("b.pdf")).unwrap(), PDF_B);
    // Nothing half-written is left; metrics and the log agree.
    assert_eq!(std::fs::read_dir(p.dir.path().join("spool/.tmp/print")).unwrap().count(), 0);
    assert_eq!(p.metric("mfd_relay_imap_jobs_total{mailbox=\"print\",result=\"spooled\"}").await, 1.0);
    let log = p.relay.log();
    assert!(log.contains("mailbox connected") && log.contains("idle=true"), "{log}");
    assert!(!log.contains("fake-at-"), "a token leaked into the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_picks_up_new_mail_within_seconds() {
    // poll_interval is 10 minutes: only IDLE can be this quick.
    let Some(p) = Print::start("idle_picks_up_new_mail_within_seconds", ImapTls::Plain, "").await else { return };
    p.wait_checked().await;
    p.wait_log("mailbox connected").await;
    // Let the poller enter IDLE.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Alice sends through the real Postfix (XOAUTH2), which delivers into Dovecot by LMTP.
    let (mut smtp, greeting) = common::SmtpClient::connect(p.real.info.smtp_port).await;
    assert_eq!(greeting.code, 220);
    smtp.cmd_expect("EHLO alice.example.test", 250).await;
    let auth = smtp.auth_xoauth2(ALICE, &p.idp.issue_access_token(ALICE)).await;
    assert_eq!(auth.code, 235, "{}", auth.wire());
    let sent = Instant::now();
    let r = smtp
        .send_mail(ALICE, &[PRINT], &mail(ALICE, "Via SMTP", &[("application/pdf", "filename=\"x.pdf\"", PDF_A)]))
        .await;
    assert_eq!(r.code, 250, "{}", r.wire());
    smtp.cmd("QUIT").await;
    let jobs = p.wait_jobs(1).await;
    let latency = sent.elapsed();
    eprintln!("IDLE: job spooled {latency:?} after the SMTP submission");
    assert!(latency < Duration::from_secs(10), "took {latency:?}");
    assert_eq!(Print::job_json(&jobs[0])["subject"], "Via SMTP");
    p.wait_upstream(0).await;
    // And again, with the session still idling after the first.
    let t = Instant::now();
    p.deliver(&mail(ALICE, "Second", &[("image/png", "filename=\"p.png\"", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")])).await;
    let jobs = p.wait_jobs(2).await;
    eprintln!("IDLE: second job {:?} after APPEND", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(Print::job_json(&jobs[1])["files"][0]["name"], "p.png");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_sender_and_type_are_refused_and_answered() {
    // These mails carry no Authentication-Results: the From is taken at its word here.
    let extra = format!("senders = [\"{ALICE}\"]\nreply_refused = true\nrequire_authenticated_sender = false\n");
    let Some(p) = Print::start("disallowed_sender_and_type_are_refused_and_answered", ImapTls::Starttls, &extra).await
    else {
        return;
    };
    let docx = "application/vnd.openxmlformats-officedocument.wordprocessingml.document";
    p.deliver(&mail(EVE, "From a stranger", &[("application/pdf", "filename=\"a.pdf\"", PDF_A)])).await;
    p.deliver(&mail(ALICE, "A Word file", &[(docx, "filename=\"letter.docx\"", b"PK\x03\x04\x14\0\0\0word")])).await;
    p.deliver(&mail(
        ALICE,
        "Not really a PDF",
        &[("application/pdf", "filename=\"invoice.pdf\"", b"MZ\x90\0\x03\0\0\0")],
    ))
    .await;
    p.deliver(&mail(ALICE, "Fine", &[("application/pdf", "filename=\"ok.pdf\"", PDF_A)])).await;
    // Refused mails get `after` too: the INBOX empties, and only the good mail is a job.
    p.wait_upstream(0).await;
    let jobs = p.wait_jobs(1).await;
    assert_eq!(Print::job_json(&jobs[0])["subject"], "Fine");
    assert_eq!(p.metric("mfd_relay_imap_jobs_total{mailbox=\"print\",result=\"refused\"}").await, 3.0);
    assert_eq!(p.metric("mfd_relay_imap_jobs_total{mailbox=\"print\",result=\"spooled\"}").await, 1.0);
    let log = p.relay.log();
    assert!(log.contains("the sender eve@example.test is not allowed to print here"), "{log}");
    assert!(
        log.contains(&format!("the attachment \\\"letter.docx\\\" is {docx}"))
            || log.contains(&format!("the attachment \"letter.docx\" is {docx}")),
        "{log}"
    );
    assert!(log.contains("claims to be application/pdf, but its content is application/x-msdownload"), "{log}");
    // The senders learn why, through the relay's queue and the real Postfix.
    let deadline = Instant::now() + WAIT;
    loop {
        let eve = p.real.inbox_files(EVE);
        let alice = p.real.inbox_files(ALICE);
        if eve.len() == 1 && alice.len() == 2 {
            let eve = String::from_utf8_lossy(&eve[0]).into_owned();
            assert!(eve.contains("Subject: Not printed: From a stranger"), "{eve}");
            assert!(eve.contains("Auto-Submitted: auto-replied"), "{eve}");
            assert!(eve.contains("is not allowed to print here"), "{eve}");
            let alice: Vec<String> = alice.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect();
            assert!(alice.iter().any(|m| m.contains("letter.docx")), "{alice:?}");
            assert!(alice.iter().any(|m| m.contains("invoice.pdf")), "{alice:?}");
            break;
        }
        assert!(Instant::now() < deadline, "answers: eve {}, alice {}\n{}", eve.len(), alice.len(), p.relay.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_file_names_are_sanitised_and_the_mail_is_moved() {
    let Some(p) = Print::start(
        "hostile_file_names_are_sanitised_and_the_mail_is_moved",
        ImapTls::Plain,
        "after = \"move:Printed\"\n",
    )
    .await
    else {
        return;
    };
    let passwd_before = std::fs::read("/etc/passwd").unwrap();
    p.deliver(&mail(
        ALICE,
        "Names",
        &[
            ("application/pdf", "filename=\"../../etc/passwd\"", PDF_A),
            ("application/pdf", "filename=\"..\\\\..\\\\..\\\\boot.ini\"", PDF_A),
            ("application/pdf", "filename*=utf-8''bell%07and%0D%0Anewline.pdf", PDF_B),
            ("application/pdf", "filename=\"scan.pdf\"", PDF_A),
            ("application/pdf", "filename=\"SCAN.pdf\"", PDF_B),
            ("application/pdf", "filename=\".hidden.pdf\"", PDF_A),
            ("application/pdf", "filename=\"job.json\"", PDF_A),
        ],
    ))
    .await;
    let jobs = p.wait_jobs(1).await;
    let mut names: Vec<String> =
        std::fs::read_dir(&jobs[0]).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(
        names,
        [
            "SCAN (2).pdf",
            "bellandnewline.pdf",
            "boot.ini",
            "hidden.pdf",
            "job (2).json",
            "job.json",
            "passwd.pdf",
            "scan.pdf"
        ]
    );
    let json = Print::job_json(&jobs[0]);
    let files = json["files"].as_array().unwrap();
    assert_eq!(files[0]["name"], "passwd.pdf");
    assert_eq!(files[0]["original_name"], "../../etc/passwd");
    assert_eq!(files[6]["name"], "job (2).json");
    // Nothing escaped the job folder.
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd_before);
    for stray in ["spool/etc", "spool/print/etc", "etc", "spool/boot.ini", "spool/print/passwd"] {
        assert!(!p.dir.path().join(stray).exists(), "{stray} exists");
    }
    // after = "move:Printed": the folder did not exist; the relay created it (TRYCREATE).
    p.wait_upstream(0).await;
    let (_, moved) = p.upstream("Printed").await;
    assert_eq!(moved.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_spool_and_delete_never_duplicates() {
    let Some(mut p) = Print::start("kill_9_between_spool_and_delete_never_duplicates", ImapTls::Plain, "").await else {
        return;
    };
    // The relay aborts right after the job is durable and recorded, before it deletes upstream.
    p.crash_after_spool(&mail(ALICE, "Exactly once", &[("application/pdf", "filename=\"once.pdf\"", PDF_A)])).await;
    assert!(p.relay.log().contains("aborting between spool and `after`"), "{}", p.relay.log());
    assert_eq!(p.jobs().len(), 1, "the job is on disk");
    let (_, uids) = p.upstream("INBOX").await;
    assert_eq!(uids.len(), 1, "the mail is still upstream");
    // Restart normally: `after` is applied, nothing is spooled again.
    tokio::task::block_in_place(|| p.relay.spawn());
    p.wait_upstream(0).await;
    p.wait_checked().await;
    assert_eq!(p.jobs().len(), 1, "{:?}", p.jobs());
    assert_eq!(p.metric("mfd_relay_imap_jobs_total{mailbox=\"print\",result=\"spooled\"}").await, 0.0);
    // And the poller goes on with new mail.
    p.deliver(&mail(ALICE, "After the crash", &[("application/pdf", "filename=\"two.pdf\"", PDF_B)])).await;
    let jobs = p.wait_jobs(2).await;
    assert_eq!(Print::job_json(&jobs[0])["subject"], "Exactly once");
    assert_eq!(Print::job_json(&jobs[1])["subject"], "After the crash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uidvalidity_change_neither_loses_nor_duplicates() {
    let Some(mut p) =
        Print::start("uidvalidity_change_neither_loses_nor_duplicates", ImapTls::Plain, "after = \"seen\"\n").await
    else {
        return;
    };
    p.deliver(&mail(ALICE, "A", &[("application/pdf", "filename=\"a.pdf\"", PDF_A)])).await;
    p.deliver(&mail(ALICE, "B", &[("application/pdf", "filename=\"b.pdf\"", PDF_B)])).await;
    p.wait_jobs(2).await;
    // after = "seen": both stay, flagged \Seen.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut u = p.user(PRINT).await;
        let flags = u.flags("INBOX").await;
        u.logout().await;
        if flags.len() == 2 && flags.iter().all(|(_, f)| f.iter().any(|x| x == "Seen")) {
            break;
        }
        assert!(Instant::now() < deadline, "{flags:?}\n{}", p.relay.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::task::block_in_place(|| p.relay.stop());
    let (old_validity, old_uids) = p.upstream("INBOX").await;
    assert_eq!(old_uids, [1, 2]);
    // Someone marks B unread again: with `after = seen` only unseen mail is a candidate, and
    // B must then be recognised by its Message-ID rather than printed again.
    tokio::task::block_in_place(|| {
        p.real.doveadm(&["flags", "remove", "-u", PRINT, "\\Seen", "mailbox", "INBOX", "uid", "2"])
    });
    // A leaves, C arrives; then the mailbox is renumbered under a new UIDVALIDITY, so that
    // B and C reuse UIDs the relay has records for.
    let mut u = p.user(PRINT).await;
    u.delete("INBOX", 1).await;
    u.append("INBOX", &mail(ALICE, "C", &[("application/pdf", "filename=\"c.pdf\"", PDF_A)])).await;
    u.logout().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.real.forget_uids(PRINT);
    let mut u = p.user(PRINT).await;
    let (new_validity, new_uids) = u.uids("INBOX").await;
    let subjects = u.subjects("INBOX").await;
    u.logout().await;
    assert_ne!(new_validity, old_validity);
    assert_eq!(new_uids, [1, 2], "{subjects:?}");
    assert!(subjects.iter().any(|(uid, s)| s == "C" && old_uids.contains(uid)), "C reuses a known UID: {subjects:?}");

    tokio::task::block_in_place(|| p.relay.spawn());
    let jobs = p.wait_jobs(3).await;
    p.wait_checked().await;
    p.wait_log("UIDVALIDITY changed").await;
    // Give a second check the chance to do something wrong.
    p.deliver(&mail(ALICE, "D", &[("application/pdf", "filename=\"d.pdf\"", PDF_A)])).await;
    let jobs_after = p.wait_jobs(4).await;
    assert_eq!(&jobs_after[..3], &jobs[..]);
    let subjects: Vec<String> =
        jobs_after.iter().map(|j| Print::job_json(j)["subject"].as_str().unwrap().to_string()).collect();
    assert_eq!(subjects, ["A", "B", "C", "D"], "B not printed twice, C not lost");
    assert!(p.relay.log().contains("not printed again"), "{}", p.relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_refreshed_once_and_the_reason_logged() {
    let Some(mut p) = Print::start("a_refused_token_is_refreshed_once_and_the_reason_logged", ImapTls::Plain, "").await
    else {
        return;
    };
    p.wait_checked().await;
    tokio::task::block_in_place(|| p.relay.stop());
    // The relay's stored token still looks valid to it, but Dovecot's introspection says no.
    p.idp.expire_access_tokens();
    let before = p.idp.token_requests(Grant::ClientCredentials);
    tokio::task::block_in_place(|| p.relay.spawn());
    p.wait_checked().await;
    p.wait_log("refused the token").await;
    let log = p.relay.log();
    assert!(log.contains(r#"{"status":"401","schemes":"bearer""#), "the server's JSON is logged:\n{log}");
    assert_eq!(p.idp.token_requests(Grant::ClientCredentials), before + 1, "exactly one refresh");
    p.deliver(&mail(ALICE, "After refresh", &[("application/pdf", "filename=\"r.pdf\"", PDF_A)])).await;
    p.wait_jobs(1).await;
    assert!(!p.relay.log().contains("fake-at-"), "a token leaked into the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_idle_move_or_uidplus_is_polled_and_moved_by_copy() {
    // A bare IMAP4rev1 server: no IDLE (RFC 2177), MOVE (RFC 6851) or UIDPLUS (RFC 4315).
    let Some(p) = Print::start_with(
        "a_server_without_idle_move_or_uidplus_is_polled_and_moved_by_copy",
        ImapTls::Plain,
        "poll_interval = \"1s\"\nafter = \"move:Archive\"\n",
        |real| real.restrict_capabilities("IMAP4rev1 LITERAL+ SASL-IR"),
    )
    .await
    else {
        return;
    };
    p.wait_checked().await;
    p.wait_log("idle=false").await;
    let t = Instant::now();
    p.deliver(&mail(ALICE, "Polled", &[("application/pdf", "filename=\"p.pdf\"", PDF_A)])).await;
    p.wait_jobs(1).await;
    eprintln!("poll: job spooled {:?} after APPEND (poll_interval 1 s)", t.elapsed());
    // COPY, then \Deleted and EXPUNGE: gone from the INBOX, once in the target folder.
    p.wait_upstream(0).await;
    let (_, moved) = p.upstream("Archive").await;
    assert_eq!(moved.len(), 1);
    p.deliver(&mail(ALICE, "Polled again", &[("application/pdf", "filename=\"q.pdf\"", PDF_B)])).await;
    p.wait_jobs(2).await;
    p.wait_upstream(0).await;
    assert_eq!(p.upstream("Archive").await.1.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logging_never_shows_the_token() {
    let Some(mut p) = Print::start("trace_logging_never_shows_the_token", ImapTls::Plain, "").await else { return };
    p.wait_checked().await;
    p.relay.kill9();
    let (config, log) = (p.relay.config.clone(), p.dir.path().join("relay.log"));
    let mut child =
        tokio::task::spawn_blocking(move || common::real::spawn_relay(&config, &log, &[("MFD_RELAY_LOG", "trace")]))
            .await
            .unwrap();
    p.deliver(&mail(ALICE, "Traced", &[("application/pdf", "filename=\"t.pdf\"", PDF_A)])).await;
    p.wait_jobs(1).await;
    p.wait_upstream(0).await;
    let _ = child.kill();
    let _ = child.wait();
    let log = p.relay.log();
    assert!(log.contains(" TRACE "), "trace logging was on");
    assert!(!log.contains("fake-at-"), "a token in clear");
    // The XOAUTH2 response is base64 of "user=print@example.test\x01auth=Bearer <token>...".
    let encoded = common::b64(format!("user={PRINT}\x01auth=Bearer fake-at-"));
    assert!(!log.contains(&encoded[..40]), "a base64 XOAUTH2 response");
}

/// `raw` with header fields put on top, as a receiving server adds them.
fn with_headers(fields: &str, raw: Vec<u8>) -> Vec<u8> {
    let mut out = fields.as_bytes().to_vec();
    out.extend(raw);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_from_is_refused_without_the_servers_dmarc_pass_and_not_answered() {
    let extra = format!("senders = [\"{ALICE}\"]\nreply_refused = true\n");
    let Some(p) = Print::start(
        "a_forged_from_is_refused_without_the_servers_dmarc_pass_and_not_answered",
        ImapTls::Plain,
        &extra,
    )
    .await
    else {
        return;
    };
    let pdf = [("application/pdf", "filename=\"a.pdf\"", PDF_A)];
    // Eve writes Alice's address, with no evidence at all.
    p.deliver(&mail(ALICE, "Forged, bare", &pdf)).await;
    // Eve adds her own "dmarc=pass"; the receiving server's verdict is on top of it.
    p.deliver(&with_headers(
        "Authentication-Results: mx.example.test; dmarc=fail (p=none) header.from=example.test\r\n\
         Received: from evil.test\r\n\
         Authentication-Results: mx.example.test; dmarc=pass header.from=example.test\r\n",
        mail(ALICE, "Forged, own verdict below", &pdf),
    ))
    .await;
    // A pass for another domain does not vouch for Alice's.
    p.deliver(&with_headers(
        "Authentication-Results: mx.example.test; dmarc=pass header.from=evil.test\r\n",
        mail(ALICE, "Forged, other domain", &pdf),
    ))
    .await;
    // The real Alice: the server says dmarc=pass for her domain.
    p.deliver(&with_headers(
        "Authentication-Results: mx.example.test;\r\n spf=pass smtp.mailfrom=example.test;\r\n dmarc=pass (p=reject) header.from=example.test\r\n",
        mail(ALICE, "Genuine", &pdf),
    ))
    .await;
    p.wait_upstream(0).await;
    let jobs = p.wait_jobs(1).await;
    assert_eq!(Print::job_json(&jobs[0])["subject"], "Genuine");
    assert_eq!(p.metric("mfd_relay_imap_jobs_total{mailbox=\"print\",result=\"refused\"}").await, 3.0);
    let log = p.relay.log();
    assert_eq!(log.matches("could not be verified").count(), 3, "{log}");
    assert_eq!(log.matches("refused mail not answered").count(), 3, "{log}");
    // No backscatter: nothing was queued to the forged address.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(p.real.inbox_files(ALICE).is_empty(), "an answer went to the forged sender");
    assert!(!p.relay.log().contains("answer to a refused mail queued"), "{}", p.relay.log());
}

/// Waits until job.json of `job` has hand-off results.
async fn wait_handoff(p: &Print, job: &Path) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(h) = Print::job_json(job)["handoff"].as_array() {
            return h.clone();
        }
        assert!(Instant::now() < deadline, "no hand-off results:\n{}", p.relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_print_command_runs_after_the_mail_left_the_folder() {
    let printed = tempfile::tempdir().unwrap();
    let command = format!("command = [\"/bin/cp\", \"{{file}}\", \"{}/\"]\n", printed.path().display());
    let Some(mut p) =
        Print::start("a_pending_print_command_runs_after_the_mail_left_the_folder", ImapTls::Plain, &command).await
    else {
        return;
    };
    // The relay stops with the job spooled and its command pending, before `after`.
    p.crash_after_spool(&mail(ALICE, "Pending", &[("application/pdf", "filename=\"pending.pdf\"", PDF_A)])).await;
    assert_eq!(p.jobs().len(), 1);
    // Meanwhile the mail leaves the folder (as if the server had performed `after` and only
    // its OK was lost).
    let mut u = p.user(PRINT).await;
    let (_, uids) = u.uids("INBOX").await;
    assert_eq!(uids.len(), 1);
    u.delete("INBOX", uids[0]).await;
    u.logout().await;
    tokio::task::block_in_place(|| p.relay.spawn());
    let jobs = p.wait_jobs(1).await;
    let handoff = wait_handoff(&p, &jobs[0]).await;
    assert_eq!(handoff.len(), 1, "{handoff:?}");
    assert_eq!(handoff[0]["exit_code"], 0, "{handoff:?}");
    assert_eq!(std::fs::read(printed.path().join("pending.pdf")).unwrap(), PDF_A, "the job was printed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_print_command_interrupted_after_the_mail_left_is_recorded_not_rerun() {
    // The command kills the relay (its parent) the first time, leaving the record `Started`
    // with the mail already deleted upstream; run again it would kill the new relay too.
    let marker = tempfile::tempdir().unwrap();
    let runs = marker.path().join("runs");
    let command =
        format!("command = [\"/bin/sh\", \"-c\", \"echo run >> {}; kill -9 $PPID\", \"{{file}}\"]\n", runs.display());
    let Some(mut p) =
        Print::start("a_print_command_interrupted_after_the_mail_left_is_recorded_not_rerun", ImapTls::Plain, &command)
            .await
    else {
        return;
    };
    p.deliver(&mail(
        ALICE,
        "Interrupted",
        &[("application/pdf", "filename=\"a.pdf\"", PDF_A), ("application/pdf", "filename=\"b.pdf\"", PDF_B)],
    ))
    .await;
    let deadline = Instant::now() + WAIT;
    while tokio::task::block_in_place(|| p.relay.running()) {
        assert!(Instant::now() < deadline, "the command did not stop the relay:\n{}", p.relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 1);
    let (_, uids) = p.upstream("INBOX").await;
    assert!(uids.is_empty(), "deleted upstream before the command ran");
    tokio::task::block_in_place(|| p.relay.spawn());
    p.wait_checked().await;
    let jobs = p.wait_jobs(1).await;
    let handoff = wait_handoff(&p, &jobs[0]).await;
    assert_eq!(handoff.len(), 2, "{handoff:?}");
    for (h, name) in handoff.iter().zip(["a.pdf", "b.pdf"]) {
        assert_eq!(h["file"], name);
        assert!(h["error"].as_str().unwrap().starts_with("interrupted"), "{h}");
    }
    assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 1, "never run twice");
    assert!(tokio::task::block_in_place(|| p.relay.running()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_seen_prints_only_unseen_mail_from_the_first_start() {
    let Some(mut p) =
        Print::start("after_seen_prints_only_unseen_mail_from_the_first_start", ImapTls::Plain, "after = \"seen\"\n")
            .await
    else {
        return;
    };
    p.wait_checked().await;
    p.relay.kill9();
    // The folder's history: a mail read long ago, and one nobody has read.
    p.deliver(&mail(ALICE, "Read long ago", &[("application/pdf", "filename=\"old.pdf\"", PDF_A)])).await;
    p.deliver(&mail(ALICE, "Unread", &[("application/pdf", "filename=\"new.pdf\"", PDF_B)])).await;
    tokio::task::block_in_place(|| {
        p.real.doveadm(&["flags", "add", "-u", PRINT, "\\Seen", "mailbox", "INBOX", "uid", "1"])
    });
    // A rebuilt database knows nothing of the folder.
    std::fs::remove_dir_all(p.dir.path().join("data")).unwrap();
    tokio::task::block_in_place(|| p.relay.spawn());
    let jobs = p.wait_jobs(1).await;
    assert_eq!(Print::job_json(&jobs[0])["subject"], "Unread");
    p.wait_checked().await;
    // Both stay upstream, both \Seen now; a later check prints nothing more.
    p.deliver(&mail(ALICE, "Later", &[("application/pdf", "filename=\"later.pdf\"", PDF_A)])).await;
    let jobs = p.wait_jobs(2).await;
    assert_eq!(Print::job_json(&jobs[1])["subject"], "Later");
    assert_eq!(p.upstream("INBOX").await.1.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_reset_from_now_skips_the_mail_already_there() {
    let Some(mut p) = Print::start("mailbox_reset_from_now_skips_the_mail_already_there", ImapTls::Plain, "").await
    else {
        return;
    };
    p.wait_checked().await;
    // While the daemon runs, the command says to stop it first.
    let (code, _, err) =
        tokio::task::block_in_place(|| p.relay.cli(&["mailbox", "reset", "print", "--from-now"], None));
    assert_ne!(code, 0);
    assert!(err.contains("stop the relay first"), "{err}");
    tokio::task::block_in_place(|| p.relay.stop());
    p.deliver(&mail(ALICE, "Backlog 1", &[("application/pdf", "filename=\"b1.pdf\"", PDF_A)])).await;
    p.deliver(&mail(ALICE, "Backlog 2", &[("application/pdf", "filename=\"b2.pdf\"", PDF_B)])).await;
    let (code, out, err) =
        tokio::task::block_in_place(|| p.relay.cli(&["mailbox", "reset", "print", "--from-now"], None));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("first UID 3"), "{out}");
    let (code, _, err) =
        tokio::task::block_in_place(|| p.relay.cli(&["mailbox", "reset", "nosuch", "--from-now"], None));
    assert!(code != 0 && err.contains("no [[mailbox]] named"), "{err}");
    p.deliver(&mail(ALICE, "New", &[("application/pdf", "filename=\"n.pdf\"", PDF_A)])).await;
    tokio::task::block_in_place(|| p.relay.spawn());
    let jobs = p.wait_jobs(1).await;
    assert_eq!(Print::job_json(&jobs[0])["subject"], "New");
    p.wait_checked().await;
    // The backlog stays upstream, untouched; only the new mail was deleted.
    let mut u = p.user(PRINT).await;
    let subjects = u.subjects("INBOX").await;
    u.logout().await;
    assert_eq!(subjects.iter().map(|(_, s)| s.as_str()).collect::<Vec<_>>(), ["Backlog 1", "Backlog 2"]);
    assert_eq!(p.jobs().len(), 1);
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_mails_are_checked_by_size_first_and_held_once() {
    const MIB: usize = 1024 * 1024;
    let Some(p) = Print::start(
        "large_mails_are_checked_by_size_first_and_held_once",
        ImapTls::Plain,
        "max_size = \"40MiB\"\nsenders = []\n",
    )
    .await
    else {
        return;
    };
    p.wait_checked().await;
    let pid = p.relay.pid();
    let base = peak_rss(pid);
    // A 48 MiB mail that is nearly all header: refused by its size, without its header being
    // downloaded whole.
    let mut bomb = format!("From: {ALICE}\r\nTo: {PRINT}\r\nSubject: header bomb\r\nX-Junk: x").into_bytes();
    while bomb.len() < 48 * MIB {
        bomb.extend_from_slice(b"\r\n ");
        bomb.extend(std::iter::repeat_n(b'j', 75));
    }
    bomb.extend_from_slice(b"\r\n\r\nbody\r\n");
    p.deliver(&bomb).await;
    drop(bomb);
    p.wait_upstream(0).await;
    p.wait_log("larger than this printer takes").await;
    let after_bomb = peak_rss(pid);
    eprintln!("header bomb: peak RSS {} -> {} MiB", base / MIB as u64, after_bomb / MIB as u64);
    assert!(after_bomb - base < 16 * MIB as u64, "peak grew {} MiB", (after_bomb - base) / MIB as u64);
    // A 24 MiB PDF (about 33 MB as base64): held once as the download, once decoded.
    let mut pdf = PDF_A.to_vec();
    let mut x: u32 = 1;
    while pdf.len() < 24 * MIB {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        pdf.push((x >> 16) as u8);
    }
    let raw = mail(ALICE, "Large", &[("application/pdf", "filename=\"large.pdf\"", &pdf)]);
    let raw_len = raw.len() as u64;
    p.deliver(&raw).await;
    drop(raw);
    let jobs = p.wait_jobs(1).await;
    assert_eq!(std::fs::read(jobs[0].join("large.pdf")).unwrap(), pdf);
    let after_large = peak_rss(pid);
    let grown = after_large.saturating_sub(after_bomb);
    eprintln!(
        "large mail: {} MiB raw, peak RSS {} -> {} MiB ({:.2}x)",
        raw_len / MIB as u64,
        after_bomb / MIB as u64,
        after_large / MIB as u64,
        after_large as f64 / raw_len as f64
    );
    assert!(grown < raw_len * 2, "peak grew {} MiB for a {} MiB mail", grown / MIB as u64, raw_len / MIB as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_unchanged_pollers_logged_in() {
    let Some(p) = Print::start("a_reload_keeps_unchanged_pollers_logged_in", ImapTls::Plain, "").await else { return };
    p.wait_checked().await;
    p.wait_log("mailbox connected").await;
    let logins = |p: &Print| p.relay.log().matches("mailbox connected").count();
    let reload = |p: &Print| {
        let (code, out, err) = tokio::task::block_in_place(|| p.relay.cli(&["reload"], None));
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("configuration reloaded"), "{out}");
    };
    // A reload that changes nothing about the mailbox (a new device elsewhere would do the
    // same): the poller stays in its session.
    let config = std::fs::read_to_string(&p.relay.config).unwrap();
    std::fs::write(&p.relay.config, format!("{config}\n# touched\n")).unwrap();
    reload(&p);
    p.wait_log("mailbox poller kept running").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(logins(&p), 1, "logged in again:\n{}", p.relay.log());
    // It still works, on its old session (IDLE, so within seconds).
    p.deliver(&mail(ALICE, "After reload", &[("application/pdf", "filename=\"r.pdf\"", PDF_A)])).await;
    p.wait_jobs(1).await;
    assert_eq!(logins(&p), 1, "{}", p.relay.log());
    // A changed mailbox gets a new poller.
    let config = std::fs::read_to_string(&p.relay.config).unwrap();
    std::fs::write(&p.relay.config, config.replace("[[mailbox]]\n", "[[mailbox]]\nprint_body = true\n")).unwrap();
    reload(&p);
    p.wait_log("mailbox settings changed: restarting its poller").await;
    let deadline = Instant::now() + WAIT;
    while logins(&p) < 2 {
        assert!(Instant::now() < deadline, "no new login:\n{}", p.relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.deliver(&mail(ALICE, "After change", &[])).await;
    let jobs = p.wait_jobs(2).await;
    assert_eq!(Print::job_json(&jobs[1])["files"][0]["name"], "body.txt", "the new settings apply");
    assert_eq!(p.relay.log().matches("mailbox poller kept running").count(), 1, "{}", p.relay.log());
}
