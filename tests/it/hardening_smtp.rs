//! Hardening of the device-facing SMTP server: the login throttle under parallel and
//! interleaved attempts, AUTH only under TLS where required, sessions that outlive a reload,
//! MAIL before EHLO, and clients that are no device holding connections.

use crate::common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use crate::common::relay::{RawClient, World, IMPLICIT_TLS, STARTTLS};
use crate::common::SmtpClient;

fn auth(user: &str, pin: &str) -> String {
    format!("AUTH PLAIN {}", common::b64(format!("\0{user}\0{pin}")))
}

/// Runs `f` on a blocking thread (the raw client is synchronous).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Connects from a chosen loopback address with the async client and reads the greeting.
async fn connect_from(source: &str, port: u16) -> SmtpClient<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let tcp = sock.connect(format!("127.0.0.1:{port}").parse().unwrap()).await.unwrap();
    let mut c = SmtpClient::new(tcp);
    assert_eq!(c.read_reply().await.unwrap().code, 220);
    c
}

/// The code of a reply line ("535 5.7.8 ...").
fn code(reply: &str) -> &str {
    reply.get(..3).unwrap_or(reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_parallel_wrong_pins_from_one_address_are_throttled() {
    let w = World::start(|_| {}).await;
    let port = w.relay.smtp_port;
    let replies = blocking(move || {
        let barrier = Arc::new(Barrier::new(40));
        let threads: Vec<_> = (0..40)
            .map(|i| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let mut c = RawClient::connect(port);
                    assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
                    barrier.wait();
                    c.cmd(&auth("floor3", &format!("{:04}", 9000 + i)), "\r\n")
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect::<Vec<_>>()
    })
    .await;
    let refused = replies.iter().filter(|r| code(r) == "454").count();
    let checked = replies.iter().filter(|r| code(r) == "535").count();
    assert_eq!(refused + checked, 40, "{replies:?}");
    // Only the burst is ever checked; the others are refused before their PIN is.
    assert!(checked <= 5, "{checked} PINs checked in parallel: {replies:?}");
    assert!(refused >= 35, "{replies:?}");
    // The address stays refused, even with the right PIN.
    let r = blocking(move || {
        let mut c = RawClient::connect(port);
        c.cmd("EHLO printer", "\r\n");
        c.cmd(&auth("floor3", "1234"), "\r\n")
    })
    .await;
    assert!(r.starts_with("454 4.7.0"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_login_for_another_user_does_not_reset_failures() {
    let w = World::start(|_| {}).await;
    let port = w.relay.smtp_port;
    blocking(move || {
        let mut c = RawClient::connect(port);
        assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
        for pin in ["0001", "0002", "0003", "0004"] {
            let r = c.cmd(&auth("floor3", pin), "\r\n");
            assert!(r.starts_with("535"), "{r}");
        }
        // The attacker's own device logs in fine from the same address...
        let mut good = RawClient::connect(port);
        good.cmd("EHLO printer", "\r\n");
        let r = good.cmd(&auth("restricted", "1234"), "\r\n");
        assert!(r.starts_with("235"), "{r}");
        // ...which does not wash away the four failures: the fifth is the last.
        let r = c.cmd(&auth("floor3", "0005"), "\r\n");
        assert!(r.starts_with("535"), "{r}");
        let r = c.cmd(&auth("floor3", "1234"), "\r\n");
        assert!(r.starts_with("454"), "the sixth attempt must be refused: {r}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_against_one_username_count_across_addresses() {
    let w = World::start(|_| {}).await;
    let port = w.relay.smtp_port;
    blocking(move || {
        // One wrong PIN from each of five addresses (127.0.0.2 is the lobby device: skipped).
        for (i, pin) in ["1111", "2222", "3333", "4444", "5555"].iter().enumerate() {
            let mut c = RawClient::connect_from(&format!("127.0.0.{}", i + 3), port);
            c.cmd("EHLO printer", "\r\n");
            let r = c.cmd(&auth("floor3", pin), "\r\n");
            assert!(r.starts_with("535"), "{r}");
        }
        let mut c = RawClient::connect_from("127.0.0.20", port);
        c.cmd("EHLO printer", "\r\n");
        let r = c.cmd(&auth("floor3", "1234"), "\r\n");
        assert!(r.starts_with("454"), "floor3 has five failures: {r}");
        // Another username from that address is not affected.
        let r = c.cmd(&auth("restricted", "1234"), "\r\n");
        assert!(r.starts_with("235"), "{r}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_auth_tls_refuses_auth_before_starttls() {
    let w = World::start(|s| {
        s.listener_extra.push_str(STARTTLS);
        s.listener_extra.push_str("require_auth_tls = true\n");
    })
    .await;
    let (mut c, _) = SmtpClient::connect(w.relay.smtp_port).await;
    let ehlo = c.cmd_expect("EHLO printer", 250).await;
    assert!(ehlo.has_line("STARTTLS"), "{ehlo:?}");
    assert!(!ehlo.has_line("AUTH"), "AUTH offered before TLS: {ehlo:?}");
    let r = c.cmd(&auth("floor3", "1234")).await;
    assert_eq!(r.code, 538, "{r:?}");
    assert!(r.text().starts_with("5.7.11 Encryption required"), "{r:?}");
    let r = c.cmd("AUTH LOGIN").await;
    assert_eq!(r.code, 538, "{r:?}");
    // After STARTTLS (and a new EHLO) AUTH is offered and works.
    let mut c = c.starttls(common::tls::client_config_trusting(&w.relay_cert)).await;
    let ehlo = c.cmd_expect("EHLO printer", 250).await;
    assert!(ehlo.has_line("AUTH PLAIN LOGIN"), "{ehlo:?}");
    c.cmd_expect(&auth("floor3", "1234"), 235).await;
    let r = c.send_mail("scanner@printer.local", &["boss@contoso.test"], b"Subject: tls\r\n\r\nx\r\n").await;
    assert_eq!(r.code, 250, "{r:?}");
    w.upstream.wait_for_messages(1, Duration::from_secs(20)).await;
    // Without the option, old devices may still log in in the clear.
    drop(w);
    let w = World::start(|s| s.listener_extra.push_str(STARTTLS)).await;
    let (mut c, _) = SmtpClient::connect(w.relay.smtp_port).await;
    assert!(c.cmd_expect("EHLO printer", 250).await.has_line("AUTH"));
    c.cmd_expect(&auth("floor3", "1234"), 235).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_auth_tls_on_implicit_tls_allows_auth_at_once() {
    let w = World::start(|s| {
        s.listener_extra.push_str(IMPLICIT_TLS);
        s.listener_extra.push_str("require_auth_tls = true\n");
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", w.relay.smtp_port)).await.unwrap();
    let tls = common::tls::connect(tcp, common::tls::client_config_trusting(&w.relay_cert), "localhost").await.unwrap();
    let mut c = SmtpClient::new(tls);
    assert_eq!(c.read_reply().await.unwrap().code, 220);
    assert!(c.cmd_expect("EHLO printer", 250).await.has_line("AUTH PLAIN LOGIN"));
    c.cmd_expect(&auth("floor3", "1234"), 235).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_to_sessions_that_stay_open() {
    let w = World::start(|_| {}).await;
    let port = w.relay.smtp_port;
    // Three sessions open across the reload: a logged-in device that is removed, an
    // address-matched device that is removed, and a logged-in device whose settings change.
    let mut removed = SmtpClient::connect(port).await.0;
    removed.cmd_expect("EHLO printer", 250).await;
    removed.cmd_expect(&auth("restricted", "1234"), 235).await;
    let mut lobby = connect_from("127.0.0.2", port).await;
    lobby.cmd_expect("EHLO lobby", 250).await;
    let mut changed = SmtpClient::connect(port).await.0;
    changed.cmd_expect("EHLO printer", 250).await;
    changed.cmd_expect(&auth("floor3", "1234"), 235).await;

    let original = std::fs::read_to_string(&w.relay.config).unwrap();
    let new = original
        .replace("name = \"restricted\"", "name = \"annex\"")
        .replace("username = \"restricted\"", "username = \"annex\"")
        .replace("addresses = [\"127.0.0.2/32\"]", "addresses = [\"127.0.0.9/32\"]")
        .replace("username = \"floor3\"\n", "username = \"floor3\"\nrecipients = [\"*@allowed.test\"]\n");
    assert_eq!(new.matches("allowed.test").count(), 2, "{new}");
    std::fs::write(&w.relay.config, &new).unwrap();
    let (status, out, err) = w.relay.cli(&["reload"], None);
    assert_eq!(status, 0, "{out}{err}");

    // The removed devices are refused like unknown ones.
    let r = removed.cmd("MAIL FROM:<a@printer.lan>").await;
    assert_eq!(r.code, 550, "removed device still relays: {r:?}");
    let r = lobby.cmd("MAIL FROM:<a@printer.lan>").await;
    assert_eq!(r.code, 550, "removed address device still relays: {r:?}");
    // The changed device is looked up again: its new recipient rule applies.
    changed.cmd_expect("MAIL FROM:<a@printer.lan>", 250).await;
    let r = changed.cmd("RCPT TO:<b@contoso.test>").await;
    assert_eq!(r.code, 550, "old settings still used: {r:?}");
    changed.cmd_expect("RCPT TO:<b@allowed.test>", 250).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(w.upstream.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_before_ehlo_is_a_bad_sequence() {
    let w = World::start(|s| s.listener_extra.push_str(STARTTLS)).await;
    let port = w.relay.smtp_port;
    // The lobby device is known by its address, but must still greet first.
    let mut c = connect_from("127.0.0.2", port).await;
    let r = c.cmd("MAIL FROM:<a@printer.lan>").await;
    assert_eq!(r.code, 503, "{r:?}");
    assert!(r.text().starts_with("5.5.1"), "{r:?}");
    c.cmd_expect("EHLO lobby", 250).await;
    // After STARTTLS the greeting is forgotten (RFC 3207 4.2): MAIL needs a new EHLO.
    let mut c = c.starttls(common::tls::client_config_trusting(&w.relay_cert)).await;
    let r = c.cmd("MAIL FROM:<a@printer.lan>").await;
    assert_eq!(r.code, 503, "{r:?}");
    assert!(r.text().starts_with("5.5.1"), "{r:?}");
    c.cmd_expect("EHLO lobby", 250).await;
    c.cmd_expect("MAIL FROM:<a@printer.lan>", 250).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_is_no_device_is_cut_off() {
    let w = World::start(|_| {}).await;
    let port = w.relay.smtp_port;
    blocking(move || {
        // 127.0.0.1 is no device and does not log in: twenty commands, then 421 and the end.
        let mut c = RawClient::connect(port);
        assert!(c.cmd("EHLO idle", "\r\n").starts_with("250"));
        for i in 1..20 {
            let r = c.cmd("NOOP", "\r\n");
            assert!(r.starts_with("250"), "NOOP {i}: {r}");
        }
        let r = c.cmd("NOOP", "\r\n");
        assert!(r.starts_with("421 4.7.0"), "{r}");
        assert_eq!(c.reply(), "EOF");
        // A device (known by its address) is not limited.
        let mut c = RawClient::connect_from("127.0.0.2", port);
        assert!(c.cmd("EHLO lobby", "\r\n").starts_with("250"));
        for i in 0..50 {
            let r = c.cmd("NOOP", "\r\n");
            assert!(r.starts_with("250"), "NOOP {i}: {r}");
        }
        // Neither is a client that logs in.
        let mut c = RawClient::connect(port);
        for _ in 0..10 {
            c.cmd("NOOP", "\r\n");
        }
        assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
        assert!(c.cmd(&auth("floor3", "1234"), "\r\n").starts_with("235"));
        for i in 0..50 {
            let r = c.cmd("NOOP", "\r\n");
            assert!(r.starts_with("250"), "NOOP {i}: {r}");
        }
    })
    .await;
}

/// RFC 3207 5: plaintext the provider (or a man in the middle) sends behind its 220 to
/// STARTTLS is discarded, never read as the first reply inside TLS. Before, lettre's buffer
/// carried it across the upgrade and every later reply was read one step late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_plaintext_after_the_starttls_220_is_discarded() {
    let w = World::start(|_| {}).await;
    // Read inside TLS, this would answer the relay's EHLO with a refusal.
    w.upstream.set_inject_after_starttls(Some("554 5.7.0 injected in plaintext"));
    let port = w.relay.smtp_port;
    let reply = blocking(move || {
        let mut c = RawClient::connect(port);
        assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
        assert!(c.cmd(&auth("floor3", "1234"), "\r\n").starts_with("235"));
        assert!(c.cmd("MAIL FROM:<scanner@printer.local>", "\r\n").starts_with("250"));
        assert!(c.cmd("RCPT TO:<a@contoso.test>", "\r\n").starts_with("250"));
        assert!(c.cmd("DATA", "\r\n").starts_with("354"));
        c.send(&common::relay::scan_message("after injection", "x"));
        c.cmd(".", "\r\n")
    })
    .await;
    assert!(reply.starts_with("250") && reply.contains("delivered"), "{reply}");
    let got = w.upstream.wait_for_messages(1, Duration::from_secs(20)).await;
    assert!(got[0].tls, "sent inside TLS");
    assert!(w.relay.log().contains("discarded what the provider sent after its STARTTLS 220"), "{}", w.relay.log());
}
