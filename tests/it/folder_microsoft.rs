//! Scan to folder on SharePoint and OneDrive: `mfd_relay::upstream::folder::microsoft::GraphDrive`
//! driven directly against the fake Graph drives ([`crate::common::fake_drive`]): folders made
//! when missing, small files by one PUT, large ones by upload session in 320 KiB multiples,
//! the resumable step committed before each step it protects, crashes resumed without a
//! second copy, conflicts, throttling, refusals with what to grant, and view links.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mfd_relay::oauth::tokens::AccessToken;
use mfd_relay::upstream::folder::microsoft::{GraphDrive, Step, CHUNK};
use mfd_relay::upstream::folder::{Conflict, MemoryBytes, NewFile, Saved, StepSink, Target, Upload};
use mfd_relay::upstream::SendError;

use crate::common::fake_drive::{Action, FakeDrive, Op, FRAGMENT};
use crate::common::BearerValidator;

const TOKEN: &str = "fake-at-drive-good";
const SITE: &str = "contoso.sharepoint.com:/sites/Scans";
const LIMIT: Duration = Duration::from_secs(60);

fn validator() -> BearerValidator {
    Arc::new(|t: &str| (t == TOKEN).then(|| "app".to_string()))
}

fn token() -> AccessToken {
    AccessToken { secret: TOKEN.to_string(), account: "app".to_string(), expires_at: i64::MAX / 2 }
}

/// Deterministic bytes that differ from file to file.
fn bytes(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn file(folder: &[&str], name: &str, size: usize) -> NewFile {
    NewFile {
        folder: folder.iter().map(|s| s.to_string()).collect(),
        name: name.to_string(),
        content_type: "application/pdf".to_string(),
        size: size as u64,
    }
}

fn sharepoint(library: Option<&str>) -> Target {
    Target::Sharepoint { site: SITE.to_string(), library: library.map(str::to_string) }
}

/// Records every committed step with how many requests the fake had seen by then, so a
/// test can tell whether a step was committed before the request it protects.
struct Recorder {
    fake: FakeDrive,
    saves: Mutex<Vec<(Step, usize)>>,
}

impl Recorder {
    fn new(fake: &FakeDrive) -> Recorder {
        Recorder { fake: fake.clone(), saves: Mutex::new(Vec::new()) }
    }

    fn saves(&self) -> Vec<(Step, usize)> {
        self.saves.lock().expect("lock").clone()
    }

    fn last(&self) -> Step {
        self.saves().last().map(|s| s.0.clone()).expect("a step was committed")
    }
}

impl StepSink<Step> for Recorder {
    fn save<'a>(&'a self, step: &'a Step) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        let seen = self.fake.requests().len();
        self.saves.lock().expect("lock").push((step.clone(), seen));
        Box::pin(async { Ok(()) })
    }
}

async fn save(
    drive: &GraphDrive,
    target: &Target,
    conflict: Conflict,
    f: &NewFile,
    content: &[u8],
    resume: Option<&Step>,
    sink: &Recorder,
) -> Result<Saved, SendError> {
    let data = MemoryBytes(Arc::new(content.to_vec()));
    let up = Upload { target, conflict, file: f, bytes: &data, resume, sink };
    tokio::time::timeout(LIMIT, drive.save(&token(), &up)).await.expect("save timed out")
}

/// Runs a save until the fake's crash point, then drops it (the process died).
async fn crash(drive: &GraphDrive, target: &Target, f: &NewFile, content: &[u8], fake: &FakeDrive, sink: &Recorder) {
    let data = MemoryBytes(Arc::new(content.to_vec()));
    let up = Upload { target, conflict: Conflict::Rename, file: f, bytes: &data, resume: None, sink };
    let tok = token();
    tokio::select! {
        r = drive.save(&tok, &up) => panic!("the save ended despite the crash point: {r:?}"),
        _ = fake.hung(1, LIMIT) => {}
    }
}

fn rejected(e: SendError) -> mfd_relay::upstream::UpstreamReply {
    match e {
        SendError::Rejected(r) => r,
        other => panic!("not rejected: {other:?}"),
    }
}

fn start_range(r: &crate::common::fake_drive::Logged) -> u64 {
    let cr = r.content_range.as_deref().expect("a Content-Range");
    cr.trim_start_matches("bytes ").split('-').next().and_then(|s| s.parse().ok()).expect("range start")
}

async fn fake_with_site() -> FakeDrive {
    let fake = FakeDrive::start(validator()).await;
    fake.add_site(SITE, &["Documents", "Scans"]);
    fake
}

#[tokio::test]
async fn a_two_page_scan_lands_in_the_library_folder_made_for_it() {
    let fake = fake_with_site().await;
    let drive = GraphDrive::new(&fake.url(), None).expect("drive");
    let sink = Recorder::new(&fake);
    let target = sharepoint(Some("scans"));
    let (p1, p2) = (bytes(180_000, 1), bytes(2_500_000, 2));
    let folder = ["Printers", "Floor 2 #1"];
    let a = save(&drive, &target, Conflict::Rename, &file(&folder, "scan p1.pdf", p1.len()), &p1, None, &sink)
        .await
        .expect("page 1");
    let b = save(&drive, &target, Conflict::Rename, &file(&folder, "scan p2.pdf", p2.len()), &p2, None, &sink)
        .await
        .expect("page 2");
    assert_eq!((a.name.as_str(), a.size, b.name.as_str(), b.size), ("scan p1.pdf", 180_000, "scan p2.pdf", 2_500_000));
    assert!(a.web_url.ends_with("Printers/Floor 2 #1/scan p1.pdf"), "{}", a.web_url);
    let files = fake.files();
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!((files[0].drive.as_str(), files[0].path.as_str()), ("Scans", "Printers/Floor 2 #1/scan p1.pdf"));
    assert_eq!((files[1].drive.as_str(), files[1].path.as_str()), ("Scans", "Printers/Floor 2 #1/scan p2.pdf"));
    assert!(files[0].bytes == p1 && files[1].bytes == p2, "not byte-identical");
    assert_eq!(fake.folders(), ["Printers", "Printers/Floor 2 #1"]);
    let reqs = fake.requests();
    let count = |op| reqs.iter().filter(|r| r.op == Some(op)).count();
    // The drive and folders were looked up once; small files by one PUT each.
    assert_eq!((count(Op::GetSite), count(Op::ListDrives), count(Op::CreateFolder)), (1, 1, 2), "{reqs:?}");
    assert_eq!((count(Op::PutContent), count(Op::CreateSession)), (2, 0));
    assert!(reqs.iter().all(|r| r.authorization), "every API request carries the token");
    // "put" was committed before each PUT.
    for (i, _) in reqs.iter().enumerate().filter(|(_, r)| r.op == Some(Op::PutContent)) {
        assert!(sink.saves().iter().any(|(s, seen)| s.put && *seen <= i), "no step before PUT #{i}");
    }

    // The default library when none is named; an existing folder is found, not an error.
    let other = GraphDrive::new(&fake.url(), None).expect("drive");
    let c = save(
        &other,
        &sharepoint(None),
        Conflict::Rename,
        &file(&["Printers"], "x.pdf", 10),
        b"0123456789",
        None,
        &sink,
    )
    .await
    .expect("default library");
    assert_eq!(c.name, "x.pdf");
    assert!(fake
        .files()
        .iter()
        .any(|f| f.drive == "Documents" && f.path == "Printers/x.pdf" && f.bytes == b"0123456789"));
}

#[tokio::test]
async fn jobs_creating_one_folder_at_once_share_it() {
    let fake = fake_with_site().await;
    let target = sharepoint(Some("Scans"));
    let sink = Recorder::new(&fake);
    let runs = (0..4).map(|i| {
        let (fake, target, sink) = (&fake, &target, &sink);
        async move {
            // One GraphDrive each: no shared cache, as after a restart or on two relays.
            let drive = GraphDrive::new(&fake.url(), None).expect("drive");
            let content = bytes(1000 + i, i as u32);
            save(
                &drive,
                target,
                Conflict::Rename,
                &file(&["New", "Deep"], &format!("s{i}.pdf"), content.len()),
                &content,
                None,
                sink,
            )
            .await
        }
    });
    for r in futures_util::future::join_all(runs).await {
        r.expect("every job saves its file");
    }
    assert_eq!(fake.folders(), ["New", "New/Deep"]);
    assert_eq!(fake.files().iter().filter(|f| f.path.starts_with("New/Deep/")).count(), 4);
}

#[tokio::test]
async fn a_40_mb_file_goes_by_upload_session_in_320_kib_multiples() {
    let fake = fake_with_site().await;
    let drive = GraphDrive::new(&fake.url(), None).expect("drive");
    let sink = Recorder::new(&fake);
    let content = bytes(40_000_000, 7);
    let f = file(&["Big"], "scan.pdf", content.len());
    let saved =
        save(&drive, &sharepoint(Some("Scans")), Conflict::Rename, &f, &content, None, &sink).await.expect("saved");
    assert_eq!((saved.name.as_str(), saved.size), ("scan.pdf", 40_000_000));
    let files = fake.files();
    assert_eq!(files.len(), 1);
    assert!(files[0].bytes == content, "not byte-identical");
    assert_eq!(fake.sessions_created(), 1);
    let reqs = fake.requests();
    let puts: Vec<(usize, &crate::common::fake_drive::Logged)> =
        reqs.iter().enumerate().filter(|(_, r)| r.op == Some(Op::PutChunk)).collect();
    assert_eq!(puts.len(), 4, "{reqs:?}");
    for (n, (_, r)) in puts.iter().enumerate() {
        assert!(!r.authorization, "the token went to the upload URL");
        if n + 1 < puts.len() {
            assert_eq!(r.body_len, CHUNK);
            assert_eq!(r.body_len % FRAGMENT, 0);
        }
    }
    assert_eq!(puts.iter().map(|(_, r)| r.body_len).sum::<usize>(), content.len());
    assert!(reqs.iter().all(|r| r.op != Some(Op::PutContent)));
    // "creating" before the session was asked for, the URL before the first range, and each
    // confirmed offset before the range that follows it.
    let saves = sink.saves();
    let session_at = reqs.iter().position(|r| r.op == Some(Op::CreateSession)).expect("session");
    assert!(saves.iter().any(|(s, seen)| s.creating && *seen <= session_at), "{saves:?}");
    for (i, r) in &puts {
        let start = start_range(r);
        assert!(
            saves.iter().any(|(s, seen)| s.upload_url.is_some() && s.offset == start && seen <= i),
            "bytes from {start} went before their offset was committed: {saves:?}"
        );
    }
}

#[tokio::test]
async fn a_crash_after_a_range_resumes_the_same_session_with_the_rest() {
    let fake = fake_with_site().await;
    let target = sharepoint(Some("Scans"));
    let sink = Recorder::new(&fake);
    let content = bytes(40_000_000, 8);
    let f = file(&[], "scan.pdf", content.len());
    // The second range is taken and never answered: the relay dies there.
    fake.fault(Op::PutChunk, 2, Action::Hang);
    crash(&GraphDrive::new(&fake.url(), None).expect("drive"), &target, &f, &content, &fake, &sink).await;
    let step = sink.last();
    assert_eq!(step.offset, CHUNK as u64, "the first range's end was committed");
    assert!(step.upload_url.is_some());
    let before = fake.requests().len();

    // A new process: a new GraphDrive, the saved step.
    let drive = GraphDrive::new(&fake.url(), None).expect("drive");
    let saved = save(&drive, &target, Conflict::Rename, &f, &content, Some(&step), &sink).await.expect("resumed");
    assert_eq!(saved.name, "scan.pdf");
    let files = fake.files();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].bytes == content, "not byte-identical");
    assert_eq!(fake.sessions_created(), 1, "the same session");
    let after: Vec<_> = fake.requests().into_iter().skip(before).collect();
    let puts: Vec<_> = after.iter().filter(|r| r.op == Some(Op::PutChunk)).collect();
    // The session had two ranges; only what it still expected went.
    assert_eq!(start_range(puts[0]), 2 * CHUNK as u64, "{after:?}");
    assert_eq!(puts.iter().map(|r| r.body_len).sum::<usize>(), content.len() - 2 * CHUNK);
    assert!(after.iter().any(|r| r.op == Some(Op::GetSession)));
}

#[tokio::test]
async fn a_crash_after_the_last_range_finds_the_file_and_uploads_nothing() {
    let fake = fake_with_site().await;
    let target = sharepoint(Some("Scans"));
    let sink = Recorder::new(&fake);
    // A file of that name and size is there already: the upload becomes "scan 1.pdf".
    let old = bytes(40_000_000, 1);
    let f = file(&[], "scan.pdf", old.len());
    let drive = GraphDrive::new(&fake.url(), None).expect("drive");
    save(&drive, &target, Conflict::Rename, &f, &old, None, &Recorder::new(&fake)).await.expect("the old file");
    let content = bytes(40_000_000, 9);
    fake.fault(Op::PutChunk, 4, Action::Hang);
    crash(&drive, &target, &f, &content, &fake, &sink).await;
    let step = sink.last();
    let before = fake.requests().len();

    let drive = GraphDrive::new(&fake.url(), None).expect("drive");
    let saved = save(&drive, &target, Conflict::Rename, &f, &content, Some(&step), &sink).await.expect("resumed");
    assert_eq!(saved.name, "scan 1.pdf", "the renamed file, not the old one");
    let files = fake.files();
    assert_eq!(files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(), ["scan 1.pdf", "scan.pdf"]);
    assert!(files[0].bytes == content && files[1].bytes == old);
    assert_eq!(saved.id, files[0].id);
    let after: Vec<_> = fake.requests().into_iter().skip(before).collect();
    assert!(
        after.iter().all(|r| !matches!(r.op, Some(Op::PutChunk | Op::CreateSession | Op::PutContent))),
        "uploaded again: {after:?}"
    );
}

#[tokio::test]
async fn a_crash_after_a_simple_put_finds_the_file() {
    let fake = fake_with_site().await;
    let target = sharepoint(Some("Scans"));
    let sink = Recorder::new(&fake);
    let content = bytes(1_000_000, 3);
    let f = file(&["A"], "page.pdf", content.len());
    fake.fault(Op::PutContent, 1, Action::Hang);
    crash(&GraphDrive::new(&fake.url(), None).expect("drive"), &target, &f, &content, &fake, &sink).await;
    let step = sink.last();
    assert!(step.put, "{step:?}");
    let drive = GraphDrive::new(&fake.url(), None).expect("drive");
    let saved = save(&drive, &target, Conflict::Rename, &f, &content, Some(&step), &sink).await.expect("resumed");
    assert_eq!(saved.name, "page.pdf");
    assert_eq!(fake.files().len(), 1, "{:?}", fake.files());
    assert_eq!(fake.requests().iter().filter(|r| r.op == Some(Op::PutContent)).count(), 1);
}

#[tokio::test]
async fn conflicts_fail_rename_or_replace_as_configured() {
    let fake = fake_with_site().await;
    let drive = GraphDrive::new(&fake.url(), None).expect("drive");
    let target = sharepoint(Some("Scans"));
    let sink = Recorder::new(&fake);
    let (one, two, three) = (bytes(5000, 1), bytes(6000, 2), bytes(7000, 3));
    let first = save(&drive, &target, Conflict::Fail, &file(&[], "scan.pdf", one.len()), &one, None, &sink)
        .await
        .expect("first");

    let e =
        save(&drive, &target, Conflict::Fail, &file(&[], "scan.pdf", two.len()), &two, None, &sink).await.unwrap_err();
    let r = rejected(e);
    assert!(r.is_permanent() && r.text.contains("\"scan.pdf\"") && r.text.contains("conflict = \"fail\""), "{r:?}");
    // Large files too, before any byte goes.
    let big = bytes(5_000_000, 4);
    let e =
        save(&drive, &target, Conflict::Fail, &file(&[], "scan.pdf", big.len()), &big, None, &sink).await.unwrap_err();
    assert!(rejected(e).is_permanent());
    assert_eq!(fake.sessions_created(), 0);

    let renamed = save(&drive, &target, Conflict::Rename, &file(&[], "scan.pdf", two.len()), &two, None, &sink)
        .await
        .expect("rename");
    assert_eq!(renamed.name, "scan 1.pdf");
    let replaced = save(&drive, &target, Conflict::Replace, &file(&[], "scan.pdf", three.len()), &three, None, &sink)
        .await
        .expect("replace");
    assert_eq!((replaced.id.as_str(), replaced.name.as_str(), replaced.size), (first.id.as_str(), "scan.pdf", 7000));
    let files = fake.files();
    assert_eq!(files.len(), 2);
    assert!(files.iter().any(|f| f.name == "scan.pdf" && f.bytes == three));
    assert!(files.iter().any(|f| f.name == "scan 1.pdf" && f.bytes == two));
}

#[tokio::test]
async fn throttling_comes_back_with_its_retry_after() {
    let fake = fake_with_site().await;
    let drive = GraphDrive::new(&fake.url(), None).expect("drive");
    fake.throttle(1, 17);
    let e =
        save(&drive, &sharepoint(None), Conflict::Rename, &file(&[], "a.pdf", 3), b"abc", None, &Recorder::new(&fake))
            .await
            .unwrap_err();
    match e {
        SendError::Throttled { retry_after, reply } => {
            assert_eq!(retry_after, Duration::from_secs(17));
            assert!(!reply.is_permanent(), "{reply:?}");
        }
        other => panic!("{other:?}"),
    }
    // A bad token: Auth, for the caller to refresh.
    let bad = AccessToken { secret: "nope".into(), account: "app".into(), expires_at: i64::MAX / 2 };
    let data = MemoryBytes(Arc::new(b"abc".to_vec()));
    let f = file(&[], "a.pdf", 3);
    let sink = Recorder::new(&fake);
    let up = Upload {
        target: &sharepoint(None),
        conflict: Conflict::Rename,
        file: &f,
        bytes: &data,
        resume: None,
        sink: &sink,
    };
    assert!(matches!(drive.save(&bad, &up).await, Err(SendError::Auth { .. })));
}

#[tokio::test]
async fn refusals_name_the_grant_or_what_is_missing() {
    let fake = fake_with_site().await;
    fake.add_onedrive("ann@contoso.com");
    let drive = GraphDrive::new(&fake.url(), None).expect("drive");
    let sink = Recorder::new(&fake);
    let f = file(&["In"], "a.pdf", 3);
    fake.deny_writes(true);
    let r = rejected(save(&drive, &sharepoint(None), Conflict::Rename, &f, b"abc", None, &sink).await.unwrap_err());
    assert_eq!((r.code, r.status().map(|s| (s.0, s.1, s.2))), (550, Some((5, 7, 1))), "{r:?}");
    assert!(r.text.contains("Sites.Selected") && r.text.contains("write"), "{}", r.text);
    let od = Target::Onedrive { user: "ann@contoso.com".into() };
    let r = rejected(save(&drive, &od, Conflict::Rename, &f, b"abc", None, &sink).await.unwrap_err());
    assert!(r.is_permanent() && r.text.contains("Files.ReadWrite.All"), "{}", r.text);
    fake.deny_writes(false);

    for (target, words) in [
        (
            Target::Sharepoint { site: "contoso.sharepoint.com:/sites/Nope".into(), library: None },
            "SharePoint site contoso.sharepoint.com:/sites/Nope",
        ),
        (sharepoint(Some("Invoices")), "no document library named \"Invoices\""),
        (Target::Onedrive { user: "bob@contoso.com".into() }, "the OneDrive of bob@contoso.com"),
    ] {
        let r = rejected(save(&drive, &target, Conflict::Rename, &f, b"abc", None, &sink).await.unwrap_err());
        assert!(r.code == 550 && r.text.starts_with("5.1.1 ") && r.text.contains(words), "{}", r.text);
    }

    // A locked file: transient. A folder deleted behind the cache: looked up again, once.
    fake.fault(
        Op::PutContent,
        1,
        Action::error(423, "resourceLocked", "The resource you are attempting to access is locked"),
    );
    let r = rejected(save(&drive, &sharepoint(None), Conflict::Rename, &f, b"abc", None, &sink).await.unwrap_err());
    assert!(!r.is_permanent() && r.text.contains("resourceLocked"), "{r:?}");
    let sites = |fake: &FakeDrive| fake.requests().iter().filter(|r| r.op == Some(Op::GetSite)).count();
    let looked_up = sites(&fake);
    fake.fault(Op::PutContent, 1, Action::error(404, "itemNotFound", "The resource could not be found."));
    save(&drive, &sharepoint(None), Conflict::Rename, &f, b"abc", None, &sink)
        .await
        .expect("saved after a second look");
    assert_eq!(sites(&fake), looked_up + 1, "the cached drive was forgotten");

    fake.set_quota(Some(1000));
    let big = bytes(2000, 5);
    let r = rejected(
        save(&drive, &sharepoint(None), Conflict::Rename, &file(&[], "b.pdf", 2000), &big, None, &sink)
            .await
            .unwrap_err(),
    );
    assert!(r.code == 552 && r.text.starts_with("5.2.2 the library is full"), "{}", r.text);
}

#[tokio::test]
async fn a_onedrive_file_and_its_organisation_link() {
    let fake = FakeDrive::start(validator()).await;
    fake.add_onedrive("ann@contoso.com");
    let drive = GraphDrive::new(&fake.url(), None).expect("drive");
    let target = Target::Onedrive { user: "Ann@contoso.com".into() };
    let content = bytes(5_000_000, 6);
    let saved = save(
        &drive,
        &target,
        Conflict::Rename,
        &file(&["Scans"], "s.pdf", content.len()),
        &content,
        None,
        &Recorder::new(&fake),
    )
    .await
    .expect("saved");
    let files = fake.files();
    assert_eq!((files.len(), files[0].drive.as_str(), files[0].path.as_str()), (1, "OneDrive", "Scans/s.pdf"));
    assert!(files[0].bytes == content);
    let link =
        tokio::time::timeout(LIMIT, drive.share(&token(), &target, &saved)).await.expect("in time").expect("link");
    assert!(link.starts_with(&fake.url()) && link.contains(&saved.id), "{link}");
    assert_eq!(fake.links(), [(saved.id.clone(), "view".to_string(), "organization".to_string())]);
}

#[tokio::test]
async fn a_range_refused_for_throttling_is_sent_again_in_the_same_session() {
    let fake = fake_with_site().await;
    let target = sharepoint(None);
    let sink = Recorder::new(&fake);
    let content = bytes(25_000_000, 10);
    let f = file(&[], "t.pdf", content.len());
    let drive = GraphDrive::new(&fake.url(), None).expect("drive");
    fake.fault(Op::PutChunk, 2, Action::error(503, "serviceNotAvailable", "Service unavailable"));
    let e = save(&drive, &target, Conflict::Rename, &f, &content, None, &sink).await.unwrap_err();
    assert!(matches!(e, SendError::Throttled { .. }), "{e:?}");
    let step = sink.last();
    assert_eq!(step.offset, CHUNK as u64);
    let saved = save(&drive, &target, Conflict::Rename, &f, &content, Some(&step), &sink).await.expect("resumed");
    assert_eq!((saved.name.as_str(), fake.sessions_created()), ("t.pdf", 1));
    let files = fake.files();
    assert!(files.len() == 1 && files[0].bytes == content);
}
