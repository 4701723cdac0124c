//! Scan to folder on Google Drive: `mfd_relay::upstream::folder::google::DriveApi` driven
//! directly against the fake Drive API ([`common::fake_gdrive`]), with the queue record played
//! by a sink that keeps every committed [`Step`]; a crash is a save task aborted while the fake
//! holds a request it carried out but never answers.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mfd_relay::oauth::tokens::AccessToken;
use mfd_relay::upstream::folder::google::{DriveApi, Step, CHUNK};
use mfd_relay::upstream::folder::{Conflict, MemoryBytes, NewFile, Saved, StepSink, Target, Upload};
use mfd_relay::upstream::SendError;

use crate::common::fake_gdrive::{FakeGdrive, Fault, CHUNK_UNIT};
use crate::common::BearerValidator;

const TOKEN: &str = "ya29.fake-drive-token-scans";
const ACCOUNT: &str = "scans@contoso.com";

fn validator() -> BearerValidator {
    Arc::new(|t: &str| (t == TOKEN).then(|| ACCOUNT.to_string()))
}

fn token() -> AccessToken {
    AccessToken { secret: TOKEN.to_string(), account: ACCOUNT.to_string(), expires_at: i64::MAX }
}

/// The queue record of one file: every committed [`Step`], in order.
#[derive(Default)]
struct Steps(Mutex<Vec<Step>>);

impl Steps {
    fn all(&self) -> Vec<Step> {
        self.0.lock().unwrap().clone()
    }
    fn last(&self) -> Step {
        self.all().last().cloned().expect("a step was committed")
    }
}

impl StepSink<Step> for Steps {
    fn save<'a>(&'a self, step: &'a Step) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(async move {
            self.0.lock().unwrap().push(step.clone());
            Ok(())
        })
    }
}

/// Deterministic bytes (xorshift), `n` of them.
fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15 ^ seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn pdf(folder: &[&str], name: &str, size: usize) -> NewFile {
    NewFile {
        folder: folder.iter().map(|s| s.to_string()).collect(),
        name: name.to_string(),
        content_type: "application/pdf".to_string(),
        size: size as u64,
    }
}

fn drive(folder_id: &str) -> Target {
    Target::GoogleDrive { folder_id: folder_id.to_string() }
}

async fn save(
    api: &DriveApi,
    target: &Target,
    conflict: Conflict,
    file: &NewFile,
    bytes: &[u8],
    resume: Option<&Step>,
    sink: &Steps,
) -> Result<Saved, SendError> {
    let bytes = MemoryBytes(Arc::new(bytes.to_vec()));
    let up = Upload { target, conflict, file, bytes: &bytes, resume, sink };
    tokio::time::timeout(Duration::from_secs(60), api.save(&token(), &up)).await.expect("a save ends in time")
}

async fn setup() -> (FakeGdrive, Arc<DriveApi>) {
    let fake = FakeGdrive::start(validator()).await;
    let api = Arc::new(DriveApi::new(&fake.base_url(), None).expect("DriveApi"));
    (fake, api)
}

/// Starts a save that the fake will leave hanging at a [`Fault::Hang`], waits until it hangs,
/// and aborts it: the relay "crashed" there. Returns what it committed.
async fn crash(fake: &FakeGdrive, api: &Arc<DriveApi>, file: NewFile, bytes: &[u8]) -> Arc<Steps> {
    let steps = Arc::new(Steps::default());
    let (api2, sink, bytes) = (api.clone(), steps.clone(), bytes.to_vec());
    let task = tokio::spawn(async move {
        let bytes = MemoryBytes(Arc::new(bytes));
        let target = drive("root");
        let up = Upload {
            target: &target,
            conflict: Conflict::Fail,
            file: &file,
            bytes: &bytes,
            resume: None,
            sink: sink.as_ref(),
        };
        api2.save(&token(), &up).await
    });
    let since = Instant::now();
    while fake.hung() == 0 {
        assert!(since.elapsed() < Duration::from_secs(30), "the save never reached the crash point");
        assert!(!task.is_finished(), "the save ended before the crash point: {:?}", task.await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    let _ = task.await;
    steps
}

/// Bytes of chunk `PUT`s answered after request number `from`.
fn chunk_bytes_since(fake: &FakeGdrive, from: usize) -> usize {
    fake.requests()[from..].iter().filter(|r| r.kind == "chunk").map(|r| r.body_len).sum()
}

#[tokio::test]
async fn a_scan_lands_in_its_nested_folder_made_once_by_two_saves_at_once() {
    let (fake, api) = setup().await;
    let path = ["Scans", "2026-12", "O'Brien \\ Legal"];
    let (a, b) = (data(300_000, 1), data(1_234_567, 2));
    let (fa, fb) = (pdf(&path, "scan-0001.pdf", a.len()), pdf(&path, "scan-0002.pdf", b.len()));
    let (sa, sb) = (Steps::default(), Steps::default());
    let target = drive("root");
    let (ra, rb) = tokio::join!(
        save(&api, &target, Conflict::Fail, &fa, &a, None, &sa),
        save(&api, &target, Conflict::Fail, &fb, &b, None, &sb),
    );
    let (ra, rb) = (ra.expect("first save"), rb.expect("second save"));
    for level in 1..=path.len() {
        assert_eq!(fake.folders_at("root", &path[..level]).len(), 1, "one folder at {:?}", &path[..level]);
    }
    let leaf = fake.folders_at("root", &path).remove(0);
    let files = fake.children(&leaf.id);
    assert_eq!(files.len(), 2, "{files:?}");
    for (saved, bytes, name) in [(&ra, &a, "scan-0001.pdf"), (&rb, &b, "scan-0002.pdf")] {
        let f = files.iter().find(|f| f.id == saved.id).expect("the saved id is in the folder");
        assert_eq!(f.name, name);
        assert_eq!(&f.bytes, bytes, "byte-identical");
        assert_eq!(f.mime_type, "application/pdf");
        assert_eq!(saved.size, bytes.len() as u64);
        assert_eq!(saved.web_url, format!("https://drive.google.com/file/d/{}/view?usp=drivesdk", f.id));
    }
    // The session was committed before the first byte went up.
    let first = sa.all().remove(0);
    assert_eq!((first.offset, first.total, first.folder_id.as_str()), (0, a.len() as u64, leaf.id.as_str()));
    assert!(!format!("{first:?}").contains("upload_id"), "the session URI stays out of Debug: {first:?}");
    assert!(serde_json::to_string(&first).expect("serialises").contains("upload_id"));
    // A third save into the same folder finds it in the cache: no folder listing.
    let before = fake.requests().len();
    let c = data(1000, 3);
    save(&api, &target, Conflict::Fail, &pdf(&path, "scan-0003.pdf", c.len()), &c, None, &Steps::default())
        .await
        .expect("third save");
    let lists = fake.requests()[before..].iter().filter(|r| r.kind == "list").count();
    assert_eq!(lists, 1, "only the conflict look-up");
    assert!(fake.requests().iter().all(|r| r.authorization && r.query.contains("supportsAllDrives=true")));
}

#[tokio::test]
async fn a_40_mb_file_goes_up_in_8_mib_chunks_byte_identical() {
    let (fake, api) = setup().await;
    let bytes = data(40_000_000, 4);
    let steps = Steps::default();
    let saved = save(&api, &drive("root"), Conflict::Fail, &pdf(&[], "big.pdf", bytes.len()), &bytes, None, &steps)
        .await
        .expect("saved");
    let files = fake.children("root");
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].id, saved.id);
    assert!(files[0].bytes == bytes, "byte-identical");
    let chunks: Vec<usize> = fake.requests().iter().filter(|r| r.kind == "chunk").map(|r| r.body_len).collect();
    let c = CHUNK as usize;
    assert_eq!(c, 32 * CHUNK_UNIT);
    assert_eq!(chunks, vec![c, c, c, c, bytes.len() - 4 * c]);
    let last = fake.requests().into_iter().rfind(|r| r.kind == "chunk").expect("chunks");
    assert_eq!(last.content_range.as_deref(), Some("bytes 33554432-39999999/40000000"));
    assert_eq!(last.status, 200);
    // The session, then the offset after each chunk Drive confirmed with 308.
    let offsets: Vec<u64> = steps.all().iter().map(|s| s.offset).collect();
    assert_eq!(offsets, vec![0, CHUNK, 2 * CHUNK, 3 * CHUNK, 4 * CHUNK]);
    assert!(fake.requests().iter().all(|r| r.authorization), "a bearer on every request, session PUTs included");
}

#[tokio::test]
async fn a_crash_mid_upload_resumes_the_same_session_sending_only_the_rest() {
    let (fake, api) = setup().await;
    let bytes = data(20_000_000, 5);
    let file = pdf(&[], "resumed.pdf", bytes.len());
    // The 2nd chunk is kept by Drive, but its 308 never comes back: the relay dies there.
    fake.fault("chunk", 2, Fault::Hang);
    let steps = crash(&fake, &api, file.clone(), &bytes).await;
    let step = steps.last();
    assert_eq!(step.offset, CHUNK, "the first chunk was committed, the second not");
    let before = fake.requests().len();
    let saved = save(&api, &drive("root"), Conflict::Fail, &file, &bytes, Some(&step), &Steps::default())
        .await
        .expect("resumed");
    assert_eq!(fake.sessions_opened(), 1, "the same session");
    let files = fake.children("root");
    assert_eq!(files.len(), 1, "one file");
    assert_eq!(files[0].id, saved.id);
    assert!(files[0].bytes == bytes, "byte-identical");
    // Drive had 2 chunks: only the third went up again.
    assert_eq!(chunk_bytes_since(&fake, before), bytes.len() - 2 * CHUNK as usize);
    assert_eq!(fake.requests()[before].kind, "query", "the session was asked first");
}

#[tokio::test]
async fn a_crash_after_the_last_chunk_gets_the_file_without_saving_it_again() {
    let (fake, api) = setup().await;
    let bytes = data(10_000_000, 6);
    let file = pdf(&["Done"], "finished.pdf", bytes.len());
    fake.fault("chunk", 2, Fault::Hang);
    let steps = crash(&fake, &api, file.clone(), &bytes).await;
    assert_eq!(fake.children(&steps.last().folder_id).len(), 1, "Drive made the file before the crash");
    let before = fake.requests().len();
    let saved = save(&api, &drive("root"), Conflict::Fail, &file, &bytes, Some(&steps.last()), &Steps::default())
        .await
        .expect("resumed");
    let files = fake.children(&steps.last().folder_id);
    assert_eq!(files.len(), 1, "no second file");
    assert_eq!((files[0].id.as_str(), saved.name.as_str()), (saved.id.as_str(), "finished.pdf"));
    assert!(saved.web_url.contains(&saved.id));
    assert_eq!(chunk_bytes_since(&fake, before), 0);
}

#[tokio::test]
async fn an_expired_session_after_the_last_chunk_finds_the_file_instead_of_saving_it_again() {
    let (fake, api) = setup().await;
    let bytes = data(10_000_000, 7);
    let file = pdf(&[], "expired.pdf", bytes.len());
    fake.fault("chunk", 2, Fault::Hang);
    let steps = crash(&fake, &api, file.clone(), &bytes).await;
    fake.expire_sessions();
    let before = fake.requests().len();
    let saved = save(&api, &drive("root"), Conflict::Fail, &file, &bytes, Some(&steps.last()), &Steps::default())
        .await
        .expect("resumed");
    assert_eq!(fake.children("root").len(), 1, "no second file");
    assert_eq!(fake.children("root")[0].id, saved.id);
    assert_eq!(fake.sessions_opened(), 1, "no new session");
    assert_eq!(chunk_bytes_since(&fake, before), 0);
}

#[tokio::test]
async fn an_expired_session_mid_upload_starts_a_new_one_and_makes_one_file() {
    let (fake, api) = setup().await;
    let bytes = data(20_000_000, 8);
    let file = pdf(&[], "restarted.pdf", bytes.len());
    fake.fault("chunk", 1, Fault::Hang);
    let steps = crash(&fake, &api, file.clone(), &bytes).await;
    fake.expire_sessions();
    let sink = Steps::default();
    let saved =
        save(&api, &drive("root"), Conflict::Fail, &file, &bytes, Some(&steps.last()), &sink).await.expect("saved");
    assert_eq!(fake.sessions_opened(), 2);
    assert_ne!(sink.all()[0].session, steps.last().session, "the new session was committed");
    let files = fake.children("root");
    assert_eq!(files.len(), 1, "the expired session made nothing");
    assert!(files[0].id == saved.id && files[0].bytes == bytes);
}

#[tokio::test]
async fn conflict_fail_refuses_naming_the_file() {
    let (fake, api) = setup().await;
    let folder = fake.add_folder("root", "Inbox");
    fake.add_file(&folder, "scan.pdf", b"old");
    let bytes = data(1000, 9);
    let e = save(&api, &drive(&folder), Conflict::Fail, &pdf(&[], "scan.pdf", 1000), &bytes, None, &Steps::default())
        .await
        .expect_err("refused");
    let SendError::Rejected(r) = e else { panic!("{e:?}") };
    assert!(r.is_permanent() && r.text.contains("\"scan.pdf\"") && r.text.contains("conflict"), "{r:?}");
    assert_eq!(fake.children(&folder).len(), 1);
    assert_eq!(fake.sessions_opened(), 0);
}

#[tokio::test]
async fn conflict_rename_takes_the_first_free_number() {
    let (fake, api) = setup().await;
    let folder = fake.add_folder("root", "Inbox");
    fake.add_file(&folder, "scan.pdf", b"old");
    fake.add_file(&folder, "scan (1).pdf", b"older");
    let bytes = data(1000, 10);
    let saved =
        save(&api, &drive(&folder), Conflict::Rename, &pdf(&[], "scan.pdf", 1000), &bytes, None, &Steps::default())
            .await
            .expect("saved");
    assert_eq!(saved.name, "scan (2).pdf");
    let names: Vec<String> = fake.children(&folder).into_iter().map(|f| f.name).collect();
    assert_eq!(names, ["scan.pdf", "scan (1).pdf", "scan (2).pdf"]);
}

#[tokio::test]
async fn two_saves_of_one_name_at_once_are_numbered_in_turn() {
    let (fake, api) = setup().await;
    let folder = fake.add_folder("root", "Inbox");
    fake.add_file(&folder, "scan.pdf", b"old");
    let (a, b) = (data(2_000_000, 17), data(3_000_000, 18));
    let target = drive(&folder);
    let (fa, fb) = (pdf(&[], "scan.pdf", a.len()), pdf(&[], "scan.pdf", b.len()));
    let (sa, sb) = (Steps::default(), Steps::default());
    let (ra, rb) = tokio::join!(
        save(&api, &target, Conflict::Rename, &fa, &a, None, &sa),
        save(&api, &target, Conflict::Rename, &fb, &b, None, &sb),
    );
    let mut names = vec![ra.expect("first").name, rb.expect("second").name];
    names.sort();
    assert_eq!(names, ["scan (1).pdf", "scan (2).pdf"]);
    assert_eq!(fake.children(&folder).len(), 3);
}

#[tokio::test]
async fn conflict_replace_rewrites_the_existing_file() {
    let (fake, api) = setup().await;
    let folder = fake.add_folder("root", "Inbox");
    let old = fake.add_file(&folder, "scan.pdf", b"old");
    let bytes = data(9_000_000, 11);
    let saved = save(
        &api,
        &drive(&folder),
        Conflict::Replace,
        &pdf(&[], "scan.pdf", bytes.len()),
        &bytes,
        None,
        &Steps::default(),
    )
    .await
    .expect("saved");
    assert_eq!(saved.id, old);
    let files = fake.children(&folder);
    assert_eq!(files.len(), 1);
    assert!(files[0].bytes == bytes && files[0].versions == 2);
    assert!(fake.requests().iter().any(|r| r.kind == "replace"));
}

#[tokio::test]
async fn throttling_is_throttled_with_retry_after_including_drive_s_403_rate_limit() {
    let (fake, api) = setup().await;
    let bytes = data(1000, 12);
    let file = pdf(&["A"], "t.pdf", 1000);
    fake.throttle(1, 17);
    let e = save(&api, &drive("root"), Conflict::Fail, &file, &bytes, None, &Steps::default()).await.expect_err("429");
    assert!(matches!(&e, SendError::Throttled { retry_after, .. } if *retry_after == Duration::from_secs(17)), "{e:?}");
    fake.rate_limit(1);
    let e = save(&api, &drive("root"), Conflict::Fail, &file, &bytes, None, &Steps::default()).await.expect_err("403");
    let SendError::Throttled { reply, .. } = &e else { panic!("{e:?}") };
    assert!(!reply.is_permanent() && reply.text.contains("userRateLimitExceeded"), "{reply:?}");
    // A failing backend is transient too, with the default wait.
    fake.fault("open", 1, Fault::Answer(503, "backendError"));
    let e = save(&api, &drive("root"), Conflict::Fail, &file, &bytes, None, &Steps::default()).await.expect_err("503");
    assert!(matches!(&e, SendError::Throttled { retry_after, .. } if *retry_after == Duration::from_secs(60)), "{e:?}");
    save(&api, &drive("root"), Conflict::Fail, &file, &bytes, None, &Steps::default()).await.expect("then it goes");
    assert_eq!(fake.folders_at("root", &["A"]).len(), 1);
}

#[tokio::test]
async fn insufficient_permissions_are_permanent_with_a_hint() {
    let (fake, api) = setup().await;
    fake.refuse(
        403,
        "insufficientPermissions",
        "Insufficient Permission: Request had insufficient authentication scopes.",
    );
    let bytes = data(1000, 13);
    let e = save(&api, &drive("root"), Conflict::Fail, &pdf(&[], "p.pdf", 1000), &bytes, None, &Steps::default())
        .await
        .expect_err("refused");
    let SendError::Rejected(r) = e else { panic!("{e:?}") };
    assert_eq!(r.code, 550);
    assert!(r.text.starts_with("5.7.1 ") && r.text.contains("insufficientPermissions"), "{}", r.text);
    assert!(
        r.text.contains("domain-wide delegation") && r.text.contains("https://www.googleapis.com/auth/drive"),
        "{}",
        r.text
    );
}

#[tokio::test]
async fn a_missing_folder_is_permanent_and_named() {
    let (fake, api) = setup().await;
    let bytes = data(1000, 14);
    for folder in [vec![], vec!["Sub"]] {
        let e = save(
            &api,
            &drive("1NoSuchFolder"),
            Conflict::Fail,
            &pdf(&folder, "x.pdf", 1000),
            &bytes,
            None,
            &Steps::default(),
        )
        .await
        .expect_err("refused");
        let SendError::Rejected(r) = e else { panic!("{e:?}") };
        assert!(r.is_permanent() && r.text.contains("1NoSuchFolder") && r.text.contains("not found"), "{}", r.text);
    }
    assert_eq!(fake.items().len(), 0);
}

#[tokio::test]
async fn a_cached_folder_deleted_since_is_made_again() {
    let (fake, api) = setup().await;
    let bytes = data(1000, 19);
    let file = pdf(&["Scans", "Alice"], "a.pdf", 1000);
    save(&api, &drive("root"), Conflict::Fail, &file, &bytes, None, &Steps::default()).await.expect("first");
    let scans = fake.folders_at("root", &["Scans"]).remove(0);
    fake.delete(&scans.id);
    let saved =
        save(&api, &drive("root"), Conflict::Fail, &file, &bytes, None, &Steps::default()).await.expect("second");
    let alice = fake.folders_at("root", &["Scans", "Alice"]);
    assert_eq!(alice.len(), 1);
    assert_eq!(fake.children(&alice[0].id)[0].id, saved.id);
}

#[tokio::test]
async fn a_shared_drive_works_like_my_drive() {
    let (fake, api) = setup().await;
    let shared = fake.add_shared_drive("Scans");
    let bytes = data(3_000_000, 15);
    let saved = save(
        &api,
        &drive(&shared),
        Conflict::Fail,
        &pdf(&["Team"], "s.pdf", bytes.len()),
        &bytes,
        None,
        &Steps::default(),
    )
    .await
    .expect("saved");
    let team = fake.folders_at(&shared, &["Team"]);
    assert_eq!(team.len(), 1);
    let files = fake.children(&team[0].id);
    assert!(files.len() == 1 && files[0].id == saved.id && files[0].bytes == bytes);
}

#[tokio::test]
async fn share_makes_a_domain_view_permission_and_never_a_public_one() {
    let (fake, api) = setup().await;
    let bytes = data(1000, 16);
    let saved = save(&api, &drive("root"), Conflict::Fail, &pdf(&[], "s.pdf", 1000), &bytes, None, &Steps::default())
        .await
        .expect("saved");
    let link = api.share(&token(), &drive("root"), &saved).await.expect("shared");
    assert_eq!(link, saved.web_url);
    let perms = fake.permissions();
    assert_eq!(perms.len(), 1);
    let p = &perms[0];
    assert_eq!(
        (p.file_id.as_str(), p.role.as_str(), p.kind.as_str(), p.domain.as_deref(), p.allow_file_discovery),
        (saved.id.as_str(), "reader", "domain", Some("contoso.com"), Some(false))
    );
    let consumer = AccessToken { account: "someone@gmail.com".into(), ..token() };
    let e = api.share(&consumer, &drive("root"), &saved).await.expect_err("no public link");
    let SendError::Rejected(r) = e else { panic!("{e:?}") };
    assert!(r.is_permanent() && r.text.contains("Workspace"), "{}", r.text);
    assert_eq!(fake.permissions().len(), 1);
}
