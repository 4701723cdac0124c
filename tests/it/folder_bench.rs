//! A measurement, not a check of behaviour: a 100 MB scan to a SharePoint folder through the
//! relay binary (smtplib → relay → fake Graph drive), and the same file through
//! `GraphDrive::save` alone. Ignored in the normal suite; BENCHMARKS.md ("Scan to folder: a
//! 100 MB upload") has the figures and the command:
//! `cargo test --locked --test it folder_bench:: -- --ignored --nocapture`.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mfd_relay::oauth::tokens::AccessToken;
use mfd_relay::upstream::folder::microsoft::GraphDrive;
use mfd_relay::upstream::folder::{Conflict, MemoryBytes, NewFile, NoSteps, Target, Upload};

use crate::common::fake_drive::{FakeDrive, Op};
use crate::folders::relay_with_folder;
use crate::graph::{pdf, scan_message};

const SIZE: usize = 100_000_000;
const MB: f64 = 1_000_000.0;

/// smtplib, step by step, so that the end of DATA and the reply each get a time stamp (Unix
/// seconds). Quoting and the final dot as `smtplib.SMTP.data` does them.
const CLIENT: &str = r#"
import json, smtplib, sys, time
port, path = int(sys.argv[1]), sys.argv[2]
body = open(path, "rb").read()
t = {"start": time.time()}
s = smtplib.SMTP("127.0.0.1", port, timeout=900)
s.ehlo("printer.lan")
s.login("floor3", "1234")
code, msg = s.mail("scanner@printer.local", ["SIZE=%d" % len(body)])
assert code == 250, (code, msg)
code, msg = s.rcpt("finance@scan.lan")
assert code == 250, (code, msg)
s.putcmd("data")
code, msg = s.getreply()
assert code == 354, (code, msg)
t["354"] = time.time()
q = smtplib._quote_periods(body)
if q[-2:] != b"\r\n":
    q += b"\r\n"
q += b".\r\n"
t["data"] = time.time()
s.send(q)
t["data_end"] = time.time()
code, msg = s.getreply()
t["reply"] = time.time()
s.quit()
print(json.dumps({"code": code, "message": msg.decode(), "t": t}))
"#;

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// VmHWM and VmRSS of a process, in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// User plus system CPU of a process (or "self"), in seconds.
fn cpu(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|v| v.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    ticks as f64 / 100.0
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The last range of the upload session has reached the fake (its body read whole).
fn last_range_in(fake: &FakeDrive) -> bool {
    let end = format!("-{}/{}", SIZE - 1, SIZE);
    fake.requests()
        .iter()
        .any(|r| r.op == Some(Op::PutChunk) && r.content_range.as_deref().is_some_and(|c| c.ends_with(&end)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (BENCHMARKS.md); run with --ignored --nocapture"]
async fn a_100_mb_scan_to_a_sharepoint_folder() {
    let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
    println!("profile: {profile} (binary {})", crate::common::relay::binary().display());

    // ---- through the relay ----
    let (w, fake) = relay_with_folder("", |s| s.relay_extra.push_str("in_session_timeout = \"600s\"\n")).await;
    let page = pdf(SIZE, 13);
    let scan = scan_message(&["finance@scan.lan"], &[("big scan.pdf", &page)]);
    let body = w.dir.path().join("scan.eml");
    std::fs::write(&body, &scan).expect("write the message");
    let pid = w.relay.pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (hwm0, rss0) = memory(pid);
    let (cpu0, self0) = (cpu(&pid.to_string()), cpu("self"));

    // Peak VmRSS while it runs, and when the last range reached the fake.
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                peak.fetch_max(memory(pid).1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let watcher = {
        let fake = fake.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(900);
            while !last_range_in(&fake) {
                assert!(Instant::now() < deadline, "the last range never came");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            now()
        })
    };
    let port = w.relay.smtp_port;
    let out = tokio::task::spawn_blocking(move || run_client(port, &body)).await.expect("client");
    let file_at = watcher.await.expect("watcher");
    stop.store(true, Ordering::SeqCst);
    sampler.join().expect("sampler");
    let (hwm1, rss1) = memory(pid);
    let (cpu1, self1) = (cpu(&pid.to_string()), cpu("self"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, rss2) = memory(pid);

    let code = out["code"].as_u64().unwrap_or(0);
    let message = out["message"].as_str().unwrap_or("").to_string();
    assert!(code == 250 && message.contains("saved 1 file(s)"), "{out}\n{}", w.relay.log());
    let files = fake.files();
    assert_eq!(files.len(), 1, "{}", w.relay.log());
    assert_eq!(files[0].path, "Scans/floor3/1-big scan.pdf");
    assert!(files[0].bytes == page, "the file is not byte-identical");
    let ranges = fake.requests().iter().filter(|r| r.op == Some(Op::PutChunk)).count();

    let t = |k: &str| out["t"][k].as_f64().unwrap_or(0.0);
    let (start, ready, data, data_end, reply) = (t("start"), t("354"), t("data"), t("data_end"), t("reply"));
    println!("machine: {} CPUs, load {}", num_cpus(), loadavg());
    println!("message: {} bytes ({:.1} MB) for a {SIZE}-byte attachment", scan.len(), scan.len() as f64 / MB);
    println!("connect, EHLO, AUTH PLAIN, MAIL, RCPT, DATA to 354: {:.2} s", ready - start);
    println!("smtplib quoting the message (client side, not timed below): {:.2} s", data - ready);
    println!("DATA transfer (354 to the final dot written): {:.2} s", data_end - data);
    println!(
        "end of DATA to the last range in the fake: {:.2} s ({:.1} MB/s of file)",
        file_at - data_end,
        SIZE as f64 / MB / (file_at - data_end)
    );
    println!(
        "end of DATA to 250 \"saved\": {:.2} s ({:.1} MB/s of file)",
        reply - data_end,
        SIZE as f64 / MB / (reply - data_end)
    );
    println!(
        "connect to 250 \"saved\", less the client's quoting: {:.2} s ({:.1} MB/s of file)",
        reply - start - (data - ready),
        SIZE as f64 / MB / (reply - start - (data - ready))
    );
    println!("upload ranges: {ranges} (10 MiB each, the last shorter)");
    println!("relay VmHWM before / after: {} / {}", mib(hwm0), mib(hwm1));
    println!(
        "relay VmRSS before / peak sampled / after / 2 s later: {} / {} / {} / {}",
        mib(rss0),
        mib(peak.load(Ordering::SeqCst)),
        mib(rss1),
        mib(rss2)
    );
    println!("relay CPU (user+system) for the scan: {:.2} s", cpu1 - cpu0);
    println!("test process CPU (fakes, smtplib's parent) meanwhile: {:.2} s", self1 - self0);
    println!("reply: {code} {message}");
    drop(w);
    drop(fake);

    // ---- GraphDrive::save alone (in this process, from memory) ----
    const TOKEN: &str = "fake-at-bench";
    let fake = FakeDrive::start(Arc::new(|t: &str| (t == TOKEN).then(|| "app".to_string()))).await;
    let site = "contoso.sharepoint.com:/sites/Finance";
    fake.add_site(site, &["Documents"]);
    let drive = GraphDrive::new(&fake.url(), None).expect("drive");
    let token = AccessToken { secret: TOKEN.to_string(), account: "app".to_string(), expires_at: i64::MAX / 2 };
    let target = Target::Sharepoint { site: site.to_string(), library: None };
    let data = MemoryBytes(Arc::new(page.clone()));
    let file = NewFile {
        folder: vec!["Scans".to_string()],
        name: "big scan.pdf".to_string(),
        content_type: "application/pdf".to_string(),
        size: SIZE as u64,
    };
    let up =
        Upload { target: &target, conflict: Conflict::Rename, file: &file, bytes: &data, resume: None, sink: &NoSteps };
    let self0 = cpu("self");
    let started = Instant::now();
    let saved = drive.save(&token, &up).await.expect("save");
    let took = started.elapsed().as_secs_f64();
    let self1 = cpu("self");
    assert_eq!(saved.size, SIZE as u64);
    assert!(fake.files()[0].bytes == page, "GraphDrive::save: not byte-identical");
    println!("GraphDrive::save alone: {took:.2} s ({:.1} MB/s), CPU {:.2} s", SIZE as f64 / MB / took, self1 - self0);
}

fn run_client(port: u16, body: &Path) -> serde_json::Value {
    let out = std::process::Command::new("python3")
        .args(["-c", CLIENT, &port.to_string()])
        .arg(body)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("the client printed no result ({e}):\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr))
    })
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
