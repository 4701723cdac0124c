//! Live reload (SIGHUP and `mfd-relay reload`) and graceful shutdown (SIGTERM).

use crate::common;

use std::time::{Duration, Instant};

use crate::common::relay::{pin_hash, RawClient, World};

fn auth(user: &str) -> String {
    format!("AUTH PLAIN {}", common::b64(format!("\0{user}\x001234")))
}

/// Waits until `cond` holds or panics after 10 s.
fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_devices_without_dropping_sessions() {
    let w = World::start(|_| {}).await;
    let port = w.relay.smtp_port;
    let config = w.relay.config.clone();
    let original = std::fs::read_to_string(&config).unwrap();

    // A session in flight when the configuration changes.
    let mut inflight = tokio::task::block_in_place(|| {
        let mut c = RawClient::connect(port);
        assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
        assert!(c.cmd(&auth("restricted"), "\r\n").starts_with("235"));
        assert!(c.cmd("MAIL FROM:<a@printer.lan>", "\r\n").starts_with("250"));
        c
    });

    // Remove "restricted", add "annex".
    let changed = original
        .replace("name = \"restricted\"", "name = \"annex\"")
        .replace("username = \"restricted\"", "username = \"annex\"");
    assert_ne!(changed, original);
    std::fs::write(&config, &changed).unwrap();
    let (code, out, err) = w.relay.cli(&["reload"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration reloaded"), "{out}");

    tokio::task::block_in_place(|| {
        // The session in flight finishes with the configuration it started with.
        assert!(inflight.cmd("RCPT TO:<x@allowed.test>", "\r\n").starts_with("250"));
        assert!(inflight.cmd("DATA", "\r\n").starts_with("354"));
        let r = inflight.cmd("Subject: in flight\r\n\r\nbody\r\n.", "\r\n");
        assert!(r.starts_with("250"), "{r}");
        // New sessions see the new devices.
        let mut c = RawClient::connect(port);
        assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
        assert!(c.cmd(&auth("restricted"), "\r\n").starts_with("535"), "removed device");
        let mut c = RawClient::connect(port);
        assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
        assert!(c.cmd(&auth("annex"), "\r\n").starts_with("235"), "added device");
    });
    w.upstream.wait_for_messages(1, Duration::from_secs(20)).await;

    // A bad file is refused with file:line; the relay keeps the previous configuration.
    std::fs::write(
        &config,
        format!("{changed}\n[[device]]\nname = \"broken\"\nidentity = \"nobody\"\naddresses = [\"10.0.0.1\"]\n"),
    )
    .unwrap();
    let (code, out, _) = w.relay.cli(&["reload"], None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("config.toml:") && out.contains("identity \"nobody\" is not defined"), "{out}");
    assert!(out.contains("previous configuration"), "{out}");
    tokio::task::block_in_place(|| {
        let mut c = RawClient::connect(port);
        assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
        assert!(c.cmd(&auth("annex"), "\r\n").starts_with("235"), "still the last good configuration");
    });

    // SIGHUP does the same as `mfd-relay reload`.
    let h = pin_hash();
    std::fs::write(
        &config,
        format!(
            "{changed}\n[[device]]\nname = \"hup\"\nidentity = \"scans\"\nusername = \"hup\"\npin_hash = \"{h}\"\n"
        ),
    )
    .unwrap();
    w.relay.signal("HUP");
    tokio::task::block_in_place(|| {
        eventually("the SIGHUP reload", || {
            let mut c = RawClient::connect(port);
            c.cmd("EHLO printer", "\r\n");
            c.cmd(&auth("hup"), "\r\n").starts_with("235")
        })
    });
    assert!(w.relay.log().contains("configuration reloaded"));

    // A bad file on SIGHUP: refused in the log, the relay goes on as it was.
    std::fs::write(&config, "[relay\nbroken").unwrap();
    w.relay.signal("HUP");
    tokio::task::block_in_place(|| {
        eventually("the refusal in the log", || w.relay.log().contains("reload refused"));
        let mut c = RawClient::connect(port);
        c.cmd("EHLO printer", "\r\n");
        assert!(c.cmd(&auth("hup"), "\r\n").starts_with("235"));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_message_in_flight_then_stops() {
    let mut w = World::start(|_| {}).await;
    let port = w.relay.smtp_port;
    let mut c = tokio::task::block_in_place(|| {
        let mut c = RawClient::connect(port);
        assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
        assert!(c.cmd(&auth("floor3"), "\r\n").starts_with("235"));
        assert!(c.cmd("MAIL FROM:<a@printer.lan>", "\r\n").starts_with("250"));
        assert!(c.cmd("RCPT TO:<b@contoso.test>", "\r\n").starts_with("250"));
        assert!(c.cmd("DATA", "\r\n").starts_with("354"));
        c.send(b"Subject: during shutdown\r\n\r\nfirst half\r\n");
        c
    });
    w.relay.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| {
        // No new connections...
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "stopped accepting");
        // ...but the message in flight is finished and acknowledged, then the session ends.
        c.send(b"second half\r\n.\r\n");
        let r = c.reply();
        assert!(r.starts_with("250"), "{r}");
        let r = c.cmd("NOOP", "\r\n");
        assert!(r.starts_with("421"), "{r}");
    });
    w.upstream.wait_for_messages(1, Duration::from_secs(20)).await;
    tokio::task::block_in_place(|| eventually("the relay to exit", || !w.relay.running()));
    assert!(w.relay.log().contains("mfd-relay stopped"));
}
