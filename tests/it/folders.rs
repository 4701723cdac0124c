//! Scan to folder through the relay binary: a device sends to an address that stands for a
//! SharePoint library folder (`[[destination]]`), against the fake Graph drives
//! (`common::fake_drive`) and the fake SMTP upstream for the mail recipients.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::fake_drive::{Action, FakeDrive, Op};
use crate::common::relay::{endpoints, pin_hash, World, CLIENT_ID, CLIENT_SECRET, SCANS};
use crate::graph::{pdf, scan_message};

const SITE: &str = "contoso.sharepoint.com:/sites/Finance";

/// A relay whose identity "scans" (Microsoft, app-only) mails through the fake SMTP upstream
/// and saves to destination "finance" (`finance@scan.lan`, library "Documents", folder
/// `Scans/{device}`, files `{n}-{name}`) on the fake drives. `extra` goes after the sections.
pub(crate) async fn relay_with_folder(
    extra: &str,
    tweak: impl FnOnce(&mut crate::common::relay::Setup),
) -> (World, FakeDrive) {
    use crate::common::fake_oauth::FakeOAuth;
    let idp: Arc<std::sync::OnceLock<FakeOAuth>> = Arc::default();
    let known = idp.clone();
    // Graph takes the provider's tokens for Graph only.
    let fake = FakeDrive::start(Arc::new(move |t: &str| {
        let idp = known.get()?;
        let for_graph = idp.access_token_info(t).is_some_and(|i| i.scope.contains("https://graph.microsoft.com/"));
        (idp.token_is_valid(t, SCANS) && for_graph).then(|| SCANS.to_string())
    }))
    .await;
    fake.add_site(SITE, &["Documents", "Archive"]);
    let base = fake.url();
    let extra = extra.to_string();
    let w = World::start_with(
        |e| {
            let _ = idp.set(e.idp.clone());
            format!(
                "[[provider]]\nname = \"contoso\"\nkind = \"microsoft\"\ntenant = \"contoso.test\"\nclient_id = \"{CLIENT_ID}\"\n\
                 client_secret = \"{CLIENT_SECRET}\"\n{}graph_url = \"{base}\"\nsmtp = \"127.0.0.1:{}\"\nsmtp_tls = \"starttls\"\nca_file = \"{}\"\n\n\
                 [[identity]]\nname = \"scans\"\nprovider = \"contoso\"\nemail = \"{SCANS}\"\nflow = \"client_credentials\"\n\n\
                 [[device]]\nname = \"floor3\"\nidentity = \"scans\"\nusername = \"floor3\"\npin_hash = \"{}\"\n\n\
                 [[destination]]\nname = \"finance\"\naddress = \"finance@scan.lan\"\nidentity = \"scans\"\nkind = \"sharepoint\"\n\
                 site = \"{SITE}\"\nlibrary = \"Documents\"\nfolder = \"Scans/{{device}}\"\nfile_name = \"{{n}}-{{name}}\"\n{extra}\n",
                endpoints(e.idp),
                e.smtp_port,
                e.ca.display(),
                pin_hash()
            )
        },
        tweak,
    )
    .await;
    (w, fake)
}

fn device_to(to: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["--auth", "PLAIN", "--user", "floor3", "--password", "1234"].map(String::from).to_vec();
    for t in to {
        a.push("--to".into());
        a.push(t.to_string());
    }
    a
}

async fn send(w: &World, to: &[&str], body: &[u8]) -> crate::common::relay::SendResult {
    let args = device_to(to);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    w.send(&a, body).await
}

async fn wait_for_files(fake: &FakeDrive, n: usize, w: &World) -> Vec<crate::common::fake_drive::StoredFile> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let files = fake.files();
        if files.len() >= n {
            return files;
        }
        assert!(Instant::now() < deadline, "{} of {n} files saved\n{}", files.len(), w.relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A 2-page scan lands byte-identical in the destination's folder, named by its templates;
/// the device hears that it was saved; the metrics count the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_page_scan_lands_in_the_sharepoint_folder_byte_identical() {
    let (w, fake) = relay_with_folder("", |_| {}).await;
    let (p1, p2) = (pdf(150_000, 1), pdf(5_500_000, 2));
    let scan = scan_message(&["finance@scan.lan"], &[("page 1.pdf", &p1), ("page:2?.pdf", &p2)]);
    let r = send(&w, &["finance@scan.lan"], &scan).await;
    assert!(r.ok && r.message.contains("saved 2 file(s)"), "{r:?}\n{}", w.relay.log());
    let files = wait_for_files(&fake, 2, &w).await;
    assert_eq!((files[0].drive.as_str(), files[0].path.as_str()), ("Documents", "Scans/floor3/1-page 1.pdf"));
    assert_eq!(files[1].path, "Scans/floor3/2-page_2_.pdf", "SharePoint's forbidden characters are replaced");
    assert!(files[0].bytes == p1 && files[1].bytes == p2, "not byte-identical");
    assert_eq!(fake.sessions_created(), 1, "the 5.5 MB page went by upload session");
    assert!(w.upstream.messages().is_empty(), "nothing was mailed");
    let m = w.relay.metrics_with(
        "mfd_relay_files_saved_total{destination=\"finance\",kind=\"sharepoint\"} 2",
        Duration::from_secs(5),
    );
    assert!(m.contains("mfd_relay_file_bytes_saved_total{destination=\"finance\"} 5650000"), "{m}");
}

/// A device's test mail (no attachment) to a folder: 550 5.6.0 in session, nothing saved,
/// nothing queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_attachments_is_refused_in_session_with_5_6_0() {
    let (w, fake) = relay_with_folder("", |_| {}).await;
    let test_mail = crate::common::relay::scan_message("Test page", "This is a test.");
    let r = send(&w, &["finance@scan.lan"], &test_mail).await;
    assert_eq!(r.code, Some(550), "{r:?}\n{}", w.relay.log());
    assert!(r.message.contains("5.6.0") && r.message.contains("nothing to save"), "{r:?}");
    assert!(fake.files().is_empty());
    let (_, q) = w.relay.admin_get("/api/queue");
    assert!(!q.contains("finance@scan.lan"), "nothing stays queued: {q}");
}

/// The same test page to two folders: still one 550 5.6.0 in session, never 250 and bounces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_page_to_two_folders_is_refused_in_session_too() {
    let second = format!(
        "\n[[destination]]\nname = \"archive\"\naddress = \"archive@scan.lan\"\nidentity = \"scans\"\n\
         kind = \"sharepoint\"\nsite = \"{SITE}\"\nlibrary = \"Archive\"\n"
    );
    let (w, fake) = relay_with_folder(&second, |_| {}).await;
    let test_mail = crate::common::relay::scan_message("Test page", "This is a test.");
    let r = send(&w, &["finance@scan.lan", "archive@scan.lan"], &test_mail).await;
    assert_eq!(r.code, Some(550), "{r:?}\n{}", w.relay.log());
    assert!(r.message.contains("5.6.0") && r.message.contains("nothing to save"), "{r:?}");
    // One of them with something to save: both are queued, each handled on its own.
    let page = pdf(20_000, 11);
    let r = send(&w, &["finance@scan.lan", "archive@scan.lan"], &scan_message(&[], &[("p.pdf", &page)])).await;
    assert!(r.ok, "{r:?}\n{}", w.relay.log());
    let files = wait_for_files(&fake, 2, &w).await;
    let drives: Vec<&str> = files.iter().map(|f| f.drive.as_str()).collect();
    assert_eq!(drives, ["Archive", "Documents"]);
    w.relay.metrics_with("reason=\"nothing_to_save\"} 1", Duration::from_secs(5));
}

/// `save_body = true`: a message without attachments is saved whole as a `.eml`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_body_saves_a_message_without_attachments_as_eml() {
    let (w, fake) = relay_with_folder("save_body = true\n", |_| {}).await;
    let note = crate::common::relay::scan_message("Meeting notes", "Room 4 at ten.");
    let r = send(&w, &["finance@scan.lan"], &note).await;
    assert!(r.ok, "{r:?}\n{}", w.relay.log());
    let files = wait_for_files(&fake, 1, &w).await;
    assert_eq!(files[0].path, "Scans/floor3/1-Meeting notes.eml");
    let text = String::from_utf8_lossy(&files[0].bytes);
    assert!(text.contains("Subject: Meeting notes") && text.contains("Room 4 at ten."), "{text}");
}

/// One message to a folder and to a mail recipient: each is handled on its own. The mail
/// goes upstream to its recipient only, the files to the folder, and a refused mail
/// recipient does not undo the saved files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_folder_and_mail_recipients_are_each_handled() {
    let (w, fake) = relay_with_folder("", |_| {}).await;
    let page = pdf(80_000, 3);
    let scan = scan_message(&["finance@scan.lan", "bob@contoso.test"], &[("scan.pdf", &page)]);
    let r = send(&w, &["finance@scan.lan", "bob@contoso.test"], &scan).await;
    assert!(r.ok && r.message.contains("saved 1 file(s)"), "{r:?}\n{}", w.relay.log());
    let files = wait_for_files(&fake, 1, &w).await;
    assert!(files[0].bytes == page);
    let mails = w.upstream.wait_for_messages(1, Duration::from_secs(30)).await;
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].rcpts, ["bob@contoso.test"], "the folder address never goes upstream");

    // The mail recipient refused for good: 250 all the same (the files are saved), and a
    // bounce reports bob alone.
    w.upstream.reject_recipient("carol@contoso.test");
    let scan = scan_message(&["finance@scan.lan", "carol@contoso.test"], &[("scan2.pdf", &page)]);
    let r = send(&w, &["finance@scan.lan", "carol@contoso.test"], &scan).await;
    assert!(r.ok, "{r:?}\n{}", w.relay.log());
    assert!(r.message.contains("saved 1 file(s)") && r.message.contains("refused"), "{r:?}");
    wait_for_files(&fake, 2, &w).await;
}

/// A 40 MB scan, the relay killed (SIGKILL) in the middle of its upload: after the restart the
/// queued job continues the same upload session; one file, byte-identical, no second name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_upload_resumes_the_same_session_and_saves_one_file() {
    let (mut w, fake) = relay_with_folder("", |s| s.relay_extra.push_str("in_session_timeout = \"1s\"\n")).await;
    fake.fault(Op::PutChunk, 2, Action::Hang);
    let big = pdf(40_000_000, 4);
    let scan = scan_message(&["finance@scan.lan"], &[("big scan.pdf", &big)]);
    let r = send(&w, &["finance@scan.lan"], &scan).await;
    assert!(r.ok && r.message.contains("queued"), "{r:?}\n{}", w.relay.log());
    fake.hung(1, Duration::from_secs(60)).await;
    tokio::task::block_in_place(|| {
        w.relay.kill9();
        w.relay.spawn();
    });
    let files = wait_for_files(&fake, 1, &w).await;
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].path, "Scans/floor3/1-big scan.pdf");
    assert!(files[0].bytes == big, "the scan arrived changed");
    assert_eq!(fake.sessions_created(), 1, "the same session continued\n{}", w.relay.log());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.files().len(), 1, "and nothing is saved twice");
}

/// Throttled uploads wait for Retry-After and then save once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_upload_waits_its_retry_after_then_saves() {
    let (w, fake) = relay_with_folder("", |s| s.relay_extra.push_str("in_session_timeout = \"3s\"\n")).await;
    fake.throttle(1, 2);
    let page = pdf(10_000, 5);
    let started = Instant::now();
    let r = send(&w, &["finance@scan.lan"], &scan_message(&["finance@scan.lan"], &[("p.pdf", &page)])).await;
    assert!(r.ok, "{r:?}\n{}", w.relay.log());
    let files = wait_for_files(&fake, 1, &w).await;
    assert!(started.elapsed() >= Duration::from_secs(2), "saved before the Retry-After");
    assert!(files[0].bytes == page);
    w.relay.metrics_with("reason=\"throttled\"", Duration::from_secs(5));
}

/// `oversize = "link"`: a scan over the provider's limit is accepted (SIZE says so), its file
/// goes to the destination with an organisation link, and the mail goes with the link
/// instead of the attachment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_scan_is_mailed_with_a_link_to_its_saved_file() {
    // The provider takes 1 MB; the identity sends larger scans as links.
    let (w, fake) = relay_with_folder("", |s| {
        s.sections = s.sections.replace("graph_url =", "max_message_size = \"1MB\"\ngraph_url =").replace(
            "flow = \"client_credentials\"\n",
            "flow = \"client_credentials\"\noversize = \"link\"\noversize_destination = \"finance\"\n",
        );
    })
    .await;
    let big = pdf(3_000_000, 6);
    let scan = scan_message(&["bob@contoso.test"], &[("colour scan.pdf", &big)]);
    let r = send(&w, &["bob@contoso.test"], &scan).await;
    assert!(r.ok, "a device is not refused for size: {r:?}\n{}", w.relay.log());
    let mails = w.upstream.wait_for_messages(1, Duration::from_secs(60)).await;
    let files = fake.files();
    assert_eq!(files.len(), 1, "{}", w.relay.log());
    assert!(files[0].bytes == big);
    assert_eq!(fake.links().len(), 1);
    assert_eq!((fake.links()[0].1.as_str(), fake.links()[0].2.as_str()), ("view", "organization"));
    let mail = mails[0].data_str();
    assert!(mail.len() < 100_000, "the attachment is not in the mail ({} bytes)", mail.len());
    assert!(mail.contains("colour scan.pdf") && mail.contains("too large to send by mail"), "{mail}");
    assert_eq!(mails[0].rcpts, ["bob@contoso.test"]);
}

/// Google Drive through the relay: a service account with domain-wide delegation and the
/// `drive` scope saves a device's scan into a folder under `folder_id`, made for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_lands_in_a_google_drive_folder_through_the_relay() {
    use crate::common::fake_gdrive::FakeGdrive;
    use crate::common::fake_oauth::FakeOAuth;
    use crate::common::RsaTestKey;
    let idp: Arc<std::sync::OnceLock<FakeOAuth>> = Arc::default();
    let known = idp.clone();
    // Only a live token that carries the Drive scope.
    let fake = FakeGdrive::start(Arc::new(move |t: &str| {
        known.get().and_then(|idp| idp.bearer_validator("https://www.googleapis.com/auth/drive")(t))
    }))
    .await;
    let parent = fake.add_folder("root", "Scans");
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
                 drive_api_url = \"{base}\"\n\n\
                 [[identity]]\nname = \"scans\"\nprovider = \"google\"\nemail = \"{SCANS}\"\nflow = \"service_account\"\n\n\
                 [[device]]\nname = \"floor3\"\nidentity = \"scans\"\nusername = \"floor3\"\npin_hash = \"{}\"\n\n\
                 [[destination]]\nname = \"legal\"\naddress = \"legal@scan.lan\"\nidentity = \"scans\"\nkind = \"google_drive\"\n\
                 folder_id = \"{parent}\"\nfolder = \"{{device}}\"\nfile_name = \"{{name}}\"\n",
                json.display(),
                endpoints(e.idp),
                pin_hash()
            )
        },
        |_| {},
    )
    .await;
    let (p1, p2) = (pdf(120_000, 7), pdf(9_000_000, 8));
    let scan = scan_message(&["legal@scan.lan"], &[("contract.pdf", &p1), ("annex.pdf", &p2)]);
    let r = send(&w, &["legal@scan.lan"], &scan).await;
    assert!(r.ok && r.message.contains("saved 2 file(s)"), "{r:?}\n{}", w.relay.log());
    let folder = fake.folders_at(&parent, &["floor3"]);
    assert_eq!(folder.len(), 1, "one folder made for the device");
    let mut files = fake.children(&folder[0].id);
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["annex.pdf", "contract.pdf"]);
    assert!(files[0].bytes == p2 && files[1].bytes == p1, "not byte-identical");
    assert_eq!(fake.sessions_opened(), 2, "each file by a resumable session");
}

/// `receipt = true`: once the files are saved, one mail goes to the device's sender through
/// the identity, naming each file with its size and link; only to a sender in the
/// identity's own domain (the links and names are the organisation's), never outside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_names_each_saved_file_with_its_link_and_stays_in_the_organisation() {
    let (w, fake) = relay_with_folder("receipt = true\n", |_| {}).await;
    let page = pdf(300_000, 9);
    let scan = scan_message(&["finance@scan.lan"], &[("invoice.pdf", &page)]);
    let mut args = device_to(&["finance@scan.lan"]);
    args.extend(["--from".to_string(), "alice@contoso.test".to_string()]);
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = w.send(&a, &scan).await;
    assert!(r.ok, "{r:?}\n{}", w.relay.log());
    let files = wait_for_files(&fake, 1, &w).await;
    let mails = w.upstream.wait_for_messages(1, Duration::from_secs(30)).await;
    assert_eq!(mails[0].rcpts, ["alice@contoso.test"], "to the device's sender");
    let text = mails[0].data_str();
    assert!(text.contains("Subject: Scan saved: 1 file(s) in finance"), "{text}");
    assert!(text.contains("1-invoice.pdf (293 KB)"), "{text}");
    assert!(text.contains(&format!("Scans/floor3/{}", files[0].name)), "the file's web link: {text}");
    assert!(text.contains("Auto-Submitted: auto-generated"));

    // A sender outside the organisation (the printer's own address) gets no receipt.
    let r = send(&w, &["finance@scan.lan"], &scan_message(&["finance@scan.lan"], &[("second.pdf", &page)])).await;
    assert!(r.ok, "{r:?}");
    wait_for_files(&fake, 2, &w).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(w.upstream.messages().len(), 1, "no receipt to scanner@printer.local");
}

/// A message of more parts than a folder takes (a hostile or broken device): refused in
/// session, nothing uploaded, instead of thousands of uploads each rewriting the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_of_too_many_attachments_is_refused_before_any_upload() {
    let (w, fake) = relay_with_folder("", |_| {}).await;
    let page = pdf(40, 12);
    let names: Vec<String> = (0..=mfd_relay::upstream::folder::MAX_FILES).map(|i| format!("p{i}.pdf")).collect();
    let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), page.as_slice())).collect();
    let r = send(&w, &["finance@scan.lan"], &scan_message(&["finance@scan.lan"], &files)).await;
    assert_eq!(r.code, Some(554), "{r:?}\n{}", w.relay.log());
    assert!(r.message.contains("at most 1000"), "{r:?}");
    assert!(fake.files().is_empty() && fake.requests().is_empty(), "nothing went up");
}
