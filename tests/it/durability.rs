//! Durability to the disk and through crashes between two writes: the order of syscalls
//! before a 250 (strace), a failing sync (fail-stop, a fault-injecting LD_PRELOAD shim), a
//! refusal that arrives after the device was told "queued", partial refusals and where their
//! bounces go, repair at start-up, a second process on the same data directory, and the rate
//! shaper across reloads.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::relay::{scan_message, RawClient, World, SCANS};

const WAIT: Duration = Duration::from_secs(30);

/// Whether a tool the test needs is here; in CI it must be (tests/interop/install.sh).
fn have(tool: &str) -> bool {
    let found =
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success());
    if !found && std::env::var_os("MFD_RELAY_SKIP_INTEROP").is_none() {
        panic!("{tool} is missing: run tests/interop/install.sh as root (or set MFD_RELAY_SKIP_INTEROP=1)");
    }
    found
}

/// One message over a raw connection, AUTH as floor3; returns the reply to the final dot.
fn send_one(port: u16, from: &str, rcpts: &[&str], subject: &str, user: &str) -> String {
    let mut c = RawClient::connect(port);
    assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
    let auth = common::b64(format!("\0{user}\x001234").as_bytes());
    let r = c.cmd(&format!("AUTH PLAIN {auth}"), "\r\n");
    assert!(r.starts_with("235"), "{r}");
    assert!(c.cmd(&format!("MAIL FROM:<{from}>"), "\r\n").starts_with("250"));
    for r in rcpts {
        let reply = c.cmd(&format!("RCPT TO:<{r}>"), "\r\n");
        assert!(reply.starts_with("250"), "{reply}");
    }
    assert!(c.cmd("DATA", "\r\n").starts_with("354"));
    c.send(&scan_message(subject, "scan"));
    let reply = c.cmd(".", "\r\n");
    let _ = c.cmd("QUIT", "\r\n");
    reply
}

async fn send_blocking(port: u16, from: &str, rcpts: &[&str], subject: &str, user: &str) -> String {
    let (from, subject, user) = (from.to_string(), subject.to_string(), user.to_string());
    let rcpts: Vec<String> = rcpts.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let r: Vec<&str> = rcpts.iter().map(|s| s.as_str()).collect();
        send_one(port, &from, &r, &subject, &user)
    })
    .await
    .unwrap()
}

/// The queue id in "250 2.0.0 OK <id> ...".
fn queue_id(reply: &str) -> String {
    reply.split_whitespace().nth(3).unwrap_or_default().to_string()
}

// ---------------------------------------------------------------------------
// A 250 survives a power cut: every file written for the message is synced before it.
// ---------------------------------------------------------------------------

/// One completed syscall from an `strace -f -yy` log.
#[derive(Debug)]
struct Call {
    /// Line (of the log) where the call completed, or started for the reply's write.
    at: usize,
    name: String,
    args: String,
}

/// Parses `strace -f` output, joining `<unfinished ...>` and `<... resumed>` halves; each call
/// is placed at the line where it returned (a sync counts once it has finished).
fn parse_strace(log: &str) -> (Vec<Call>, Vec<(usize, String)>) {
    let mut pending: std::collections::HashMap<String, (String, String)> = Default::default();
    let mut calls = Vec::new();
    let mut starts = Vec::new();
    for (i, line) in log.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else { continue };
        let rest = rest.trim_start();
        if let Some(resumed) = rest.strip_prefix("<... ") {
            let name = resumed.split_whitespace().next().unwrap_or_default().to_string();
            if let Some((n, args)) = pending.remove(pid) {
                if n == name {
                    calls.push(Call { at: i, name, args: format!("{args}{resumed}") });
                }
            }
            continue;
        }
        let Some((name, args)) = rest.split_once('(') else { continue };
        starts.push((i, rest.to_string()));
        if args.ends_with("<unfinished ...>") {
            pending.insert(pid.to_string(), (name.to_string(), args.to_string()));
        } else {
            calls.push(Call { at: i, name: name.to_string(), args: args.to_string() });
        }
    }
    (calls, starts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_file_of_a_message_is_synced_before_its_250() {
    if !have("strace") {
        return;
    }
    let w = World::start(|_| {}).await;
    w.upstream.down().await;
    let log = w.dir.path().join("strace.log");
    let mut strace = Command::new("strace")
        .args(["-f", "-yy", "-s", "120", "-o"])
        .arg(&log)
        .args([
            "-e",
            "trace=write,writev,sendto,sendmsg,pwrite64,fsync,fdatasync,sync_file_range,rename,renameat,renameat2",
            "-p",
            &w.relay.pid().to_string(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("strace");
    // Attached once strace has written its first lines (the relay's threads are idle).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let reply =
        send_blocking(w.relay.smtp_port, "scanner@printer.local", &["a@contoso.test"], "traced", "floor3").await;
    assert!(reply.starts_with("250"), "{reply}");
    let id = queue_id(&reply);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = Command::new("kill").args(["-INT", &strace.id().to_string()]).status();
    let _ = strace.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let (calls, starts) = parse_strace(&text);

    // The 250 to the device, on its TCP socket; and before it the moment the relay took the
    // message as accepted (its log line, written before the in-session attempt, so that a
    // background sync that happens to run during the attempt proves nothing).
    let (reply_at, _) = starts
        .iter()
        .find(|(_, l)| l.contains("TCP:[") && l.contains(&format!("250 2.0.0 OK {id}")))
        .unwrap_or_else(|| panic!("no 250 for {id} in the trace:\n{text}"));
    let (accepted_at, _) = starts
        .iter()
        .find(|(_, l)| l.contains("relay.log>") && l.contains(&id) && l.contains("accepted"))
        .unwrap_or_else(|| panic!("no 'accepted' log line for {id} in the trace:\n{text}"));
    assert!(accepted_at < reply_at);
    let before: Vec<&Call> = calls.iter().filter(|c| c.at < *accepted_at).collect();
    let find = |what: &str, pred: &dyn Fn(&Call) -> bool| -> usize {
        before
            .iter()
            .find(|c| pred(c))
            .map(|c| c.at)
            .unwrap_or_else(|| panic!("{what} not before the message was acknowledged:\n{text}"))
    };
    let is_sync = |c: &Call| c.name == "fsync" || c.name == "fdatasync";
    let tmp = format!("/spool/tmp/{id}>");
    let body_synced = find("sync of the body", &|c| is_sync(c) && c.args.contains(&tmp) && c.args.contains("= 0"));
    let renamed =
        find("rename into spool/msg", &|c| c.name.starts_with("rename") && c.args.contains(&format!("spool/msg/{id}")));
    assert!(body_synced < renamed, "the body is synced before it is renamed into the queue");
    find("sync of spool/msg after the rename", &|c| {
        is_sync(c) && c.at > renamed && c.args.contains("/spool/msg>") && c.args.contains("= 0")
    });
    let record = find("the record written to the database log", &|c| {
        c.name == "pwrite64" && c.at > renamed && c.args.contains("/data/db/db>")
    });
    find("sync of the database log after the record", &|c| {
        is_sync(c) && c.at > record && c.args.contains("/data/db/db>") && c.args.contains("= 0")
    });
}

// ---------------------------------------------------------------------------
// A failed sync is never trusted: the relay stops (fail-stop) and loses nothing.
// ---------------------------------------------------------------------------

/// An LD_PRELOAD shim: while the file named by MFD_FAULT_FILE exists, fsync and fdatasync
/// of anything under a `/db/` folder fail with EIO, as a dying disk's would.
const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static int failing(int fd) {
    const char *flag = getenv("MFD_FAULT_FILE");
    if (!flag || access(flag, F_OK) != 0) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    return strstr(path, "/db/") != NULL;
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fsync");
    if (failing(fd)) { errno = EIO; return -1; }
    return real(fd);
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = dlsym(RTLD_NEXT, "fdatasync");
    if (failing(fd)) { errno = EIO; return -1; }
    return real(fd);
}
"#;

fn build_shim(dir: &Path) -> PathBuf {
    let src = dir.join("fault.c");
    std::fs::write(&src, SHIM).unwrap();
    let so = dir.join("fault.so");
    let out = Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(&so).arg(&src).arg("-ldl").output().expect("cc");
    assert!(out.status.success(), "cannot build the shim: {}", String::from_utf8_lossy(&out.stderr));
    so
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_database_sync_stops_the_relay_and_loses_nothing() {
    let mut w = World::start(|_| {}).await;
    let shim = build_shim(w.dir.path());
    let flag = w.dir.path().join("disk-failing");
    w.relay.stop();
    w.relay.env.push(("LD_PRELOAD".into(), shim.display().to_string()));
    w.relay.env.push(("MFD_FAULT_FILE".into(), flag.display().to_string()));
    tokio::task::block_in_place(|| w.relay.spawn());
    w.upstream.down().await;
    let port = w.relay.smtp_port;

    let a = send_blocking(port, "scanner@printer.local", &["a@contoso.test"], "before the fault", "floor3").await;
    assert!(a.starts_with("250") && a.contains("queued"), "{a}");

    // The disk starts failing: the message is refused, never acknowledged.
    std::fs::write(&flag, b"").unwrap();
    let b = send_blocking(port, "scanner@printer.local", &["b@contoso.test"], "during the fault", "floor3").await;
    assert!(b.starts_with("452 4.3.1"), "a message whose sync failed is not acknowledged: {b}");
    // Fail-stop: readiness goes, then the process exits non-zero for its service manager.
    let code = tokio::task::block_in_place(|| w.relay.wait_exit(Duration::from_secs(40)));
    assert!(
        matches!(code, Some(c) if c != 0),
        "the relay must exit non-zero after a failed sync: {code:?}\n{}",
        w.relay.log()
    );
    assert!(w.relay.log().contains("database failure"), "{}", w.relay.log());

    // The service manager restarts it once the disk works again.
    std::fs::remove_file(&flag).unwrap();
    tokio::task::block_in_place(|| w.relay.spawn());
    let c = send_blocking(port, "scanner@printer.local", &["c@contoso.test"], "after the fault", "floor3").await;
    assert!(c.starts_with("250"), "{c}");
    w.upstream.up().await;
    let got = w.upstream.wait_for_messages(2, WAIT).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got_all = w.upstream.messages();
    let subjects: Vec<String> = got_all
        .iter()
        .map(|m| m.data_str().lines().find(|l| l.starts_with("Subject:")).unwrap_or_default().to_string())
        .collect();
    assert_eq!(got.len(), 2);
    assert_eq!(subjects.len(), 2, "each acknowledged message exactly once, the refused one never: {subjects:?}");
    assert!(subjects.iter().any(|s| s.contains("before the fault")), "{subjects:?}");
    assert!(subjects.iter().any(|s| s.contains("after the fault")), "{subjects:?}");
    let (_, body) = w.relay.admin_get("/api/queue");
    assert!(queue_is_empty(&body), "no phantom record: {body}");
    w.relay.stop();
}

// ---------------------------------------------------------------------------
// After a 250, every outcome is a delivery or a bounce.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_after_the_device_was_told_queued_is_bounced() {
    let w = World::start(|s| s.relay_extra.push_str("in_session_timeout = \"1s\"\n")).await;
    // A provider that scans a big upload for 3 s and then refuses it.
    w.upstream.set_data_delay(Duration::from_secs(3));
    w.upstream.set_data_reply("554 5.6.0 Message content rejected", common::fake_smtp::Times::Next(1));
    let r =
        send_blocking(w.relay.smtp_port, "scanner@printer.local", &["a@contoso.test"], "slow then refused", "floor3")
            .await;
    assert!(r.starts_with("250") && r.contains("queued"), "the device was told 250 queued: {r}");
    w.upstream.set_data_delay(Duration::ZERO);
    // The refusal becomes a DSN (to the device's sender: floor3 may send anywhere).
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    let dsn = &got[0];
    assert_eq!(dsn.rcpts, vec!["scanner@printer.local".to_string()]);
    let text = dsn.data_str();
    assert!(text.contains("multipart/report") && text.contains("554 5.6.0"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_refusal_does_not_promise_a_retry_and_never_bounces_outside_the_allow_list() {
    let w = World::start(|_| {}).await;
    w.upstream.reject_recipient("gone@allowed.test");
    // `restricted` may only send to *@allowed.test; its envelope sender is an outside address.
    let r = send_blocking(
        w.relay.smtp_port,
        "victim@elsewhere.test",
        &["ok@allowed.test", "gone@allowed.test"],
        "partly refused",
        "restricted",
    )
    .await;
    assert!(r.starts_with("250"), "{r}");
    assert!(!r.contains("retried"), "nothing will be retried: {r}");
    assert!(r.contains("1 of 2") && r.contains("bounce"), "{r}");
    let got = w.upstream.wait_for_messages(2, WAIT).await;
    let bounce = got.iter().find(|m| m.data_str().contains("multipart/report")).expect("a bounce");
    assert_eq!(bounce.rcpts, vec![SCANS.to_string()], "the bounce goes to the identity, not the outside sender");
    assert!(bounce.data_str().contains("gone@allowed.test"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w.upstream.messages().len(), 2, "one delivery, one bounce, nothing more");
}

// ---------------------------------------------------------------------------
// Repair at start-up, and a second process on the same data directory.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_repairs_records_without_bodies_and_sets_bodies_without_records_aside() {
    let mut w = World::start(|_| {}).await;
    w.upstream.down().await;
    let r = send_blocking(w.relay.smtp_port, "scanner@printer.local", &["a@contoso.test"], "body lost", "floor3").await;
    assert!(r.contains("queued"), "{r}");
    let id = queue_id(&r);
    w.relay.stop();
    let data = w.dir.path().join("data");
    // A crash after the body went but before the record's removal was durable...
    std::fs::remove_file(data.join("spool/msg").join(&id)).unwrap();
    // ...and a body whose record never made it.
    std::fs::write(data.join("spool/msg/00000000000000AB"), scan_message("orphan", "x")).unwrap();
    tokio::task::block_in_place(|| w.relay.spawn());
    let (_, queue) = w.relay.admin_get("/api/queue");
    assert!(queue_is_empty(&queue), "the record without a body is gone: {queue}");
    assert!(data.join("spool/set-aside/00000000000000AB").exists(), "kept, not deleted");
    assert!(!data.join("spool/msg/00000000000000AB").exists());
    let (_, metrics) = w.relay.admin_get("/metrics");
    assert!(metrics.contains("mfd_relay_queue_set_aside 1"), "{metrics}");
    assert!(metrics.contains("mfd_relay_queue_oldest_age_seconds 0"), "{metrics}");
    let (_, page) = w.relay.admin_get("/status");
    assert!(page.contains("1 message file(s) without a queue record"), "{page}");
    let log = w.relay.log();
    assert!(log.contains("queue record without its message file") && log.contains(&id), "{log}");
    assert!(log.contains("moved aside"), "{log}");
    w.relay.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_does_not_touch_the_spool_of_the_first() {
    let w = World::start(|_| {}).await;
    let data = w.dir.path().join("data");
    // A body being received right now.
    let receiving = data.join("spool/tmp/0000000000000001");
    std::fs::write(&receiving, b"half a scan").unwrap();
    // An offline command whose admin port does not answer (another config, same data dir).
    let text = std::fs::read_to_string(&w.relay.config).unwrap();
    let other = w.dir.path().join("other.toml");
    let dead_port = common::relay::free_port();
    std::fs::write(&other, text.replace(&format!(":{}\"", w.relay.admin_port), &format!(":{dead_port}\""))).unwrap();
    let (code, _, err) = common::relay::run_cli(&other, &["queue", "list"], None);
    assert_ne!(code, 0, "the database is locked by the daemon");
    assert!(err.contains("another mfd-relay") || err.contains("lock"), "{err}");
    assert!(receiving.exists(), "spool/tmp of the running relay is left alone");
    // The data directory is private whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    for entry in std::fs::read_dir(data.join("db")).unwrap() {
        let p = entry.unwrap().path();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o077;
        assert_eq!(mode, 0, "{} is private", p.display());
    }
}

// ---------------------------------------------------------------------------
// A reload does not reset the per-identity sending limit.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_the_sending_limit() {
    let w = World::start_with(
        |e| format!("{}messages_per_minute = 2\n\n{}", e.provider, common::relay::standard_sections()),
        |_| {},
    )
    .await;
    let port = w.relay.smtp_port;
    for i in 0..2 {
        let r = send_blocking(port, "scanner@printer.local", &["a@contoso.test"], &format!("m{i}"), "floor3").await;
        assert!(r.contains("delivered"), "{r}");
    }
    let r = send_blocking(port, "scanner@printer.local", &["a@contoso.test"], "third", "floor3").await;
    assert!(r.contains("queued") && r.contains("limit"), "{r}");
    w.relay.signal("HUP");
    let deadline = Instant::now() + WAIT;
    while !w.relay.log().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "no reload:\n{}", w.relay.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = send_blocking(port, "scanner@printer.local", &["a@contoso.test"], "fourth", "floor3").await;
    assert!(r.contains("queued") && r.contains("limit"), "a reload grants no new burst: {r}");
    assert_eq!(w.upstream.messages().len(), 2);
}

// ---------------------------------------------------------------------------
// kill -9 right after an outcome: what the device or the provider was told stays true.
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_a_delivery_leaves_no_record_behind() {
    let mut w = World::start(|_| {}).await;
    let r = send_blocking(w.relay.smtp_port, "scanner@printer.local", &["a@contoso.test"], "delivered", "floor3").await;
    assert!(r.contains("delivered"), "{r}");
    // The removal is committed right after the device's 250 (off its path); a crash inside
    // those few milliseconds would repeat this one delivery, the unavoidable case.
    tokio::time::sleep(Duration::from_millis(150)).await;
    tokio::task::block_in_place(|| {
        w.relay.kill9();
        w.relay.spawn();
    });
    let (_, queue) = w.relay.admin_get("/api/queue");
    assert!(queue_is_empty(&queue), "a delivered message is not listed after a crash: {queue}");
    assert!(!w.relay.log().contains("without its message file"), "the removal was durable before the body went");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w.upstream.messages().len(), 1, "and it is not sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_right_after_a_refusal_neither_retries_nor_bounces() {
    let mut w = World::start(|_| {}).await;
    w.upstream.reject_recipient("nobody@contoso.test");
    let r = send_blocking_expect_refusal(w.relay.smtp_port).await;
    assert!(r.starts_with("550"), "the device sees the refusal: {r}");
    tokio::task::block_in_place(|| {
        w.relay.kill9();
        w.relay.spawn();
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(w.upstream.messages().is_empty(), "no retry and no bounce for a refusal the device saw");
    let (_, queue) = w.relay.admin_get("/api/queue");
    assert!(queue_is_empty(&queue), "{queue}");
}

/// One message to a recipient the upstream refuses; returns the reply to the final dot.
async fn send_blocking_expect_refusal(port: u16) -> String {
    tokio::task::spawn_blocking(move || {
        let mut c = RawClient::connect(port);
        assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
        let auth = common::b64(b"\0floor3\x001234");
        assert!(c.cmd(&format!("AUTH PLAIN {auth}"), "\r\n").starts_with("235"));
        assert!(c.cmd("MAIL FROM:<scanner@printer.local>", "\r\n").starts_with("250"));
        assert!(c.cmd("RCPT TO:<nobody@contoso.test>", "\r\n").starts_with("250"));
        assert!(c.cmd("DATA", "\r\n").starts_with("354"));
        c.send(&scan_message("refused", "scan"));
        c.cmd(".", "\r\n")
    })
    .await
    .unwrap()
}

// ---------------------------------------------------------------------------
// Clocks: a wall-clock step neither expires the queue nor stalls it.
// ---------------------------------------------------------------------------

/// libfaketime (Debian's faketime package), multi-threaded flavour.
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wall_clock_step_forward_does_not_bounce_the_queue() {
    if !Path::new(FAKETIME).exists() {
        assert!(
            std::env::var_os("MFD_RELAY_SKIP_INTEROP").is_some(),
            "{FAKETIME} is missing: run tests/interop/install.sh as root (or set MFD_RELAY_SKIP_INTEROP=1)"
        );
        return;
    }
    let mut w = World::start(|s| s.relay_extra.push_str("queue_lifetime = \"1h\"\n")).await;
    // The relay's wall clock follows this file; its monotonic clock stays real.
    let offset = w.dir.path().join("clock-offset");
    std::fs::write(&offset, "+0").unwrap();
    w.relay.stop();
    for (k, v) in [
        ("LD_PRELOAD", FAKETIME.to_string()),
        ("FAKETIME_TIMESTAMP_FILE", offset.display().to_string()),
        ("FAKETIME_NO_CACHE", "1".to_string()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
    ] {
        w.relay.env.push((k.into(), v));
    }
    tokio::task::block_in_place(|| w.relay.spawn());
    w.upstream.down().await;
    let r =
        send_blocking(w.relay.smtp_port, "scanner@printer.local", &["a@contoso.test"], "across a clock step", "floor3")
            .await;
    assert!(r.contains("queued"), "{r}");
    // NTP (or a resumed VM) steps the clock two days ahead; retries keep running every 1-2 s.
    std::fs::write(&offset, "+2d").unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    w.upstream.up().await;
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    let text = got[0].data_str();
    assert!(text.contains("Subject: across a clock step"), "delivered, not bounced as expired:\n{text}");
    assert!(!w.relay.log().contains("queue lifetime exceeded"), "{}", w.relay.log());
}

/// The admin API's answer (`GET /api/queue`) lists no message and counts none.
fn queue_is_empty(answer: &str) -> bool {
    let v: serde_json::Value = serde_json::from_str(answer).unwrap_or_default();
    v["total"] == 0 && v["messages"].as_array().is_some_and(Vec::is_empty)
}
