//! The spine, end to end: a printer's plain SMTP reaches the (fake) provider as XOAUTH2,
//! durably. The real relay binary runs on loopback between a fake OAuth provider and a fake
//! Office-365-like upstream; clients are Python's smtplib and raw sockets.

use crate::common;

use std::time::Duration;

use crate::common::fake_smtp::{replies, Times};
use crate::common::relay::{scan_message, without_trace, RawClient, World, SCANS};

const WAIT: Duration = Duration::from_secs(20);

fn login(mech: &'static str) -> Vec<&'static str> {
    vec!["--auth", mech, "--user", "floor3", "--password", "1234"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_plain_and_login_deliver_with_xoauth2_and_rewritten_from() {
    let w = World::start(|_| {}).await;
    for mech in ["PLAIN", "LOGIN"] {
        for initial in ["yes", "no"] {
            let mut args = login(mech);
            args.extend(["--initial-response", initial, "--to", "boss@contoso.test"]);
            let r = w.send(&args, &scan_message(&format!("{mech} {initial}"), "hello")).await;
            assert!(r.ok, "{mech}/{initial}: {r:?}\n{}", w.relay.log());
            assert!(r.message.contains("delivered"), "{r:?}");
        }
    }
    let got = w.upstream.wait_for_messages(4, WAIT).await;
    for m in &got {
        assert_eq!(m.user.as_deref(), Some(SCANS), "XOAUTH2 user is the identity");
        assert!(m.tls, "STARTTLS upstream");
        assert_eq!(m.from, SCANS, "envelope sender rewritten");
        assert_eq!(m.rcpts, vec!["boss@contoso.test"]);
        let text = m.data_str();
        assert!(text.contains("\r\nFrom: \"Floor 3 Scanner\" <scans@contoso.test>\r\n"), "{text}");
        assert!(text.contains("\r\nReply-To: \"Floor 3 Scanner\" <scanner@printer.local>\r\n"), "{text}");
        assert!(text.contains("\r\nMessage-ID: <") && text.contains("\r\nDate: "), "{text}");
        assert!(text.ends_with("\r\n\r\nhello\r\n"), "{text:?}");
    }
    // The four messages shared pooled connections: far fewer logins than messages.
    assert!(w.upstream.stats().auth_successes < 4, "{:?}", w.upstream.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pin_gets_535_and_is_throttled() {
    let w = World::start(|_| {}).await;
    let bad = ["--auth", "PLAIN", "--user", "floor3", "--password", "9999"];
    let r = w.send(&bad, &scan_message("x", "y")).await;
    assert_eq!((r.ok, r.code, r.stage.as_str()), (false, Some(535), "auth"), "{r:?}");
    assert!(r.message.starts_with("5.7.8"), "{r:?}");
    let r = w.send(&["--auth", "LOGIN", "--user", "nobody", "--password", "1234"], &scan_message("x", "y")).await;
    assert_eq!(r.code, Some(535), "{r:?}");
    // After five failures from this address, AUTH is refused for a while, even with the PIN.
    for _ in 0..3 {
        w.send(&bad, &scan_message("x", "y")).await;
    }
    let r = w.send(&login("PLAIN"), &scan_message("x", "y")).await;
    assert_eq!(r.code, Some(454), "{r:?}");
    assert!(w.upstream.messages().is_empty());
    // No PIN as a word of its own (timestamps, ports and queue ids may contain the digits).
    let log = w.relay.log();
    let words: Vec<&str> = log.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    assert!(!words.contains(&"9999") && !words.contains(&"1234"), "a PIN reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmapped_address_cannot_relay() {
    let w = World::start(|_| {}).await;
    // 127.0.0.1 is no device's address and the client does not log in.
    let r = w.send(&[], &scan_message("x", "y")).await;
    assert_eq!((r.ok, r.code, r.stage.as_str()), (false, Some(550), "mail"), "{r:?}");
    assert!(r.message.contains("not a configured device"), "{r:?}");
    // Same with a raw client trying every order of commands.
    let mut c = RawClient::connect(w.relay.smtp_port);
    assert!(c.cmd("RCPT TO:<a@b.test>", "\r\n").starts_with("503"));
    assert!(c.cmd("DATA", "\r\n").starts_with("503"));
    assert!(c.cmd("HELO x", "\r\n").starts_with("250"));
    assert!(c.cmd("MAIL FROM:<a@b.test>", "\r\n").starts_with("550"));
    assert!(c.cmd("RCPT TO:<a@b.test>", "\r\n").starts_with("503"));
    assert!(c.cmd("DATA", "\r\n").starts_with("503"));
    assert!(c.cmd("QUIT", "\r\n").starts_with("221"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(w.upstream.messages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn address_mapped_device_with_helo_and_bare_lf() {
    let w = World::start(|_| {}).await;
    let port = w.relay.smtp_port;
    let reply = tokio::task::spawn_blocking(move || {
        let mut c = RawClient::connect_from("127.0.0.2", port);
        // An old device: HELO, lower case, a space after the colon, bare LF throughout.
        assert!(c.cmd("helo oldprinter", "\n").starts_with("250"));
        assert!(c.cmd("mail from: <scanner@printer.local>", "\n").starts_with("250"));
        assert!(c.cmd("rcpt to: <boss@contoso.test>", "\n").starts_with("250"));
        assert!(c.cmd("data", "\n").starts_with("354"));
        c.send(b"Subject: old\nFrom: scanner@printer.local\n\nline one\n..dotted\nline three\n.\n");
        let r = c.reply();
        assert!(c.cmd("quit", "\n").starts_with("221"));
        r
    })
    .await
    .unwrap();
    assert!(reply.starts_with("250 2.0.0"), "{reply}\n{}", w.relay.log());
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    // The fake upstream refuses bare LF like Exchange; the relay sent CRLF.
    let body = without_trace(&got[0].data);
    assert!(
        body.starts_with(b"Subject: old\r\nFrom: scanner@printer.local\r\n"),
        "{:?}",
        String::from_utf8_lossy(body)
    );
    assert!(body.ends_with(b"\r\n\r\nline one\r\n.dotted\r\nline three\r\n"), "{:?}", String::from_utf8_lossy(body));
    assert_eq!(got[0].from, "scanner@printer.local", "from = keep");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_megabyte_scan_arrives_byte_identical() {
    let w = World::start(|_| {}).await;
    // A realistic scan: base64 lines of 76 characters, 30 MB, plus 8-bit and dot lines.
    let mut msg = b"From: scanner@printer.local\r\nTo: boss@contoso.test\r\nSubject: big scan\r\nDate: Thu, 26 Nov 2026 06:00:00 +0000\r\nMessage-ID: <big@printer>\r\nMIME-Version: 1.0\r\n\r\n".to_vec();
    let mut x: u32 = 7;
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    while msg.len() < 30 * 1024 * 1024 {
        for _ in 0..76 {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            msg.push(alphabet[(x >> 26) as usize]);
        }
        msg.extend_from_slice(b"\r\n");
    }
    msg.extend_from_slice(b".leading dot\r\n..two dots\r\n.\r\ncaf\xc3\xa9 \xe9t\xe9\r\n");
    let mut args = vec!["--auth", "PLAIN", "--user", "floor3", "--password", "1234", "--to", "boss@contoso.test"];
    args.extend(["--timeout", "120"]);
    // Keep the original From: the body must come out unchanged but for the trace field.
    let w = w;
    let r = w.send(&args, &msg).await;
    assert!(r.ok, "{r:?}\n{}", w.relay.log());
    let got = w.upstream.wait_for_messages(1, Duration::from_secs(120)).await;
    let data = &got[0].data;
    // The relay rewrote From (device floor3) and kept everything else byte for byte.
    let body_at = msg.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let up_body_at = data.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    assert_eq!(data.len() - up_body_at, msg.len() - body_at, "body length");
    assert!(data[up_body_at..] == msg[body_at..], "body differs");
    assert!(got[0].mail_params.iter().any(|p| p.eq_ignore_ascii_case("BODY=8BITMIME")), "{:?}", got[0].mail_params);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_permanent_refusal_reaches_the_device() {
    let w = World::start(|_| {}).await;
    w.upstream.set_data_reply(replies::SEND_AS_DENIED, Times::Next(1));
    let r = w.send(&login("PLAIN"), &scan_message("denied", "x")).await;
    assert_eq!((r.ok, r.code, r.stage.as_str()), (false, Some(554), "data"), "{r:?}");
    assert!(r.message.contains("5.2.252") && r.message.contains("SendAsDenied"), "{r:?}");
    assert!(r.message.contains("rewrite"), "the hint for the admin: {r:?}");
    // Not retried.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(w.upstream.messages().is_empty());
    let (_, out, _) = w.relay.cli(&["queue", "list"], None);
    assert!(out.contains("queue is empty"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_with_smtp_auth_disabled_is_named_to_the_device() {
    let w = World::start(|_| {}).await;
    w.upstream.set_auth_reply(Some(replies::AUTH_DISABLED));
    let r = w.send(&login("PLAIN"), &scan_message("auth off", "x")).await;
    // The tenant may switch SMTP AUTH back on: the message is kept, and the device is told why.
    assert!(r.ok && r.message.contains("queued") && r.message.contains("5.7.139"), "{r:?}");
    let (_, out, _) = w.relay.cli(&["queue", "list"], None);
    assert!(out.contains("SMTP AUTH is disabled for this mailbox or tenant"), "the admin's hint: {out}");
    // Once the tenant allows SMTP AUTH again, the retry delivers it.
    w.upstream.set_auth_reply(None);
    w.relay.cli(&["queue", "retry", "all"], None);
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert!(got[0].data_str().contains("auth off"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_with_too_many_connections_costs_no_message() {
    // The relay may open 6 connections, the Exchange-like upstream takes 3 per mailbox and
    // answers the 4th AUTH with 432 4.3.2: the relay opens fewer and waits for its own.
    let w = World::start(|s| s.relay_extra.push_str("upstream_pool = 6\n")).await;
    // Long enough that five clients started one after another (each a Python process, slow
    // to start on a loaded machine) are all in session together.
    w.upstream.set_data_delay(Duration::from_millis(1500));
    // Five at once: the AUTH throttle holds a sixth concurrent login from one address.
    let bodies: Vec<Vec<u8>> = (0..5).map(|i| scan_message(&format!("at once {i}"), "x")).collect();
    let args = login("PLAIN");
    let sends = bodies.iter().map(|b| w.send(&args, b));
    let results = futures_util::future::join_all(sends).await;
    for r in &results {
        assert!(r.ok && r.message.contains("delivered"), "no message waits for a retry: {r:?}\n{}", w.relay.log());
    }
    let stats = w.upstream.stats();
    assert!(stats.concurrency_refusals >= 1, "the test reached the limit: {stats:?}");
    assert!(stats.max_connections_of_a_user <= 3, "{stats:?}");
    assert_eq!(stats.messages_accepted, 5);
    assert!(w.relay.log().contains("too many connections for this mailbox"), "{}", w.relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_providers_ehlo_size_becomes_the_limit_devices_see() {
    // The listener would take 100 MiB; the provider advertises 35 MiB (SIZE 36700160).
    let w = World::start(|s| s.listener_extra.push_str("max_message_size = \"100MiB\"\n")).await;
    let port = w.relay.smtp_port;
    let ehlo = move || {
        tokio::task::spawn_blocking(move || {
            let mut c = RawClient::connect(port);
            let auth = format!("AUTH PLAIN {}", common::b64(b"\0floor3\x001234"));
            c.cmd("EHLO x", "\r\n");
            assert!(c.cmd(&auth, "\r\n").starts_with("235"));
            c.cmd("EHLO x", "\r\n")
        })
    };
    // Not yet known: the listener's limit.
    let before = ehlo().await.unwrap();
    assert!(before.contains("SIZE 104857600"), "{before}");
    let r = w.send(&login("PLAIN"), &scan_message("learn", "x")).await;
    assert!(r.ok, "{r:?}");
    // Seen in the provider's EHLO: a scan it would refuse is refused in session instead.
    let after = ehlo().await.unwrap();
    assert!(after.contains("SIZE 36700160"), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_then_back_delivers_from_the_queue() {
    let w = World::start(|_| {}).await;
    w.upstream.down().await;
    let r = w.send(&login("PLAIN"), &scan_message("queued", "while down")).await;
    assert!(r.ok, "{r:?}");
    assert!(r.message.contains("queued"), "{r:?}");
    let (_, out, _) = w.relay.cli(&["queue", "list"], None);
    assert!(out.contains("floor3") && out.contains("someone@contoso.test"), "{out}");
    w.upstream.up().await;
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert!(got[0].data_str().contains("while down"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, out, _) = w.relay.cli(&["queue", "list"], None);
    assert!(out.contains("queue is empty"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_upstream_reply_is_retried() {
    let w = World::start(|_| {}).await;
    w.upstream.set_data_reply(replies::TRANSIENT, Times::Next(1));
    let r = w.send(&login("LOGIN"), &scan_message("retry", "x")).await;
    assert!(r.ok && r.message.contains("queued"), "{r:?}");
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert!(got[0].data_str().contains("Subject: retry"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_after_250_delivers_after_restart() {
    let mut w = World::start(|_| {}).await;
    w.upstream.down().await;
    let r = w.send(&login("PLAIN"), &scan_message("durable", "survives kill -9")).await;
    assert!(r.ok, "{r:?}");
    w.relay.kill9();
    w.upstream.up().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(w.upstream.messages().is_empty(), "nothing is delivered while the relay is dead");
    tokio::task::block_in_place(|| w.relay.spawn());
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert!(got[0].data_str().contains("survives kill -9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_allow_list_and_limits() {
    let w = World::start(|s| s.relay_extra.push_str("max_recipients = 3\n")).await;
    let r = w
        .send(
            &["--auth", "PLAIN", "--user", "restricted", "--password", "1234", "--to", "x@elsewhere.test"],
            &scan_message("x", "y"),
        )
        .await;
    assert_eq!((r.code, r.stage.as_str()), (Some(550), "rcpt"), "{r:?}");
    let r = w
        .send(
            &[
                "--auth",
                "PLAIN",
                "--user",
                "restricted",
                "--password",
                "1234",
                "--to",
                "x@elsewhere.test",
                "--to",
                "ok@allowed.test",
            ],
            &scan_message("partly", "y"),
        )
        .await;
    assert!(r.ok, "{r:?}");
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].rcpts, vec!["ok@allowed.test"]);

    let port = w.relay.smtp_port;
    tokio::task::spawn_blocking(move || {
        let mut c = RawClient::connect(port);
        assert!(c.cmd("EHLO x", "\r\n").contains("SIZE"));
        let auth = format!("AUTH PLAIN {}", common::b64(b"\0floor3\x001234"));
        assert!(c.cmd(&auth, "\r\n").starts_with("235"));
        assert!(c.cmd("MAIL FROM:<a@b.test> SIZE=999999999999", "\r\n").starts_with("552"));
        assert!(c.cmd("MAIL FROM:<a@b.test>", "\r\n").starts_with("250"));
        for i in 0..3 {
            assert!(c.cmd(&format!("RCPT TO:<r{i}@contoso.test>"), "\r\n").starts_with("250"));
        }
        assert!(c.cmd("RCPT TO:<r9@contoso.test>", "\r\n").starts_with("452 4.5.3"));
        assert!(c.cmd("RSET", "\r\n").starts_with("250"));
        assert!(c.cmd("FOO", "\r\n").starts_with("500 5.5.1"));
        assert!(c.cmd(&"NOOP ".repeat(5000), "\r\n").starts_with("500 5.5.6"));
        assert!(c.cmd("VRFY bob", "\r\n").starts_with("252"));
        assert!(c.cmd("MAIL FROM:<a@b.test> SMTPUTF8", "\r\n").starts_with("555"));
        assert!(c.cmd("AUTH PLAIN", "\r\n").starts_with("503"), "already authenticated");
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_commands_get_their_replies_in_order() {
    let w = World::start(|_| {}).await;
    let port = w.relay.smtp_port;
    tokio::task::spawn_blocking(move || {
        let mut c = RawClient::connect(port);
        let auth = common::b64(b"\0floor3\x001234");
        c.send(format!("EHLO x\r\nAUTH PLAIN {auth}\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<p@contoso.test>\r\nRCPT TO:<q@contoso.test>\r\nDATA\r\n").as_bytes());
        assert!(c.reply().starts_with("250-"));
        assert!(c.reply().starts_with("235"));
        assert!(c.reply().starts_with("250"));
        assert!(c.reply().starts_with("250"));
        assert!(c.reply().starts_with("250"));
        assert!(c.reply().starts_with("354"));
        c.send(b"Subject: piped\r\n\r\nbody\r\n.\r\nQUIT\r\n");
        assert!(c.reply().starts_with("250"));
        assert!(c.reply().starts_with("221"));
    })
    .await
    .unwrap();
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].rcpts, vec!["p@contoso.test", "q@contoso.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_token_is_refreshed_once_and_the_json_is_logged() {
    let w = World::start(|_| {}).await;
    // Warm up: one delivery so the relay holds a token and a pooled connection.
    assert!(w.send(&login("PLAIN"), &scan_message("one", "x")).await.ok);
    w.upstream.wait_for_messages(1, WAIT).await;
    // The provider invalidates the tokens it issued; the relay's cached one is refused.
    w.idp.expire_access_tokens();
    w.upstream.clear_messages();
    // Force a new upstream connection so AUTH happens again.
    w.upstream.down().await;
    w.upstream.up().await;
    let r = w.send(&login("PLAIN"), &scan_message("two", "x")).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", w.relay.log());
    let attempts = w.upstream.auth_attempts();
    let failed: Vec<_> = attempts.iter().filter(|a| a.final_reply.starts_with("535")).collect();
    assert!(!failed.is_empty(), "{attempts:?}");
    assert!(failed.iter().all(|a| a.sent_empty_line()), "the relay answers the 334 with an empty line");
    let log = w.relay.log();
    assert!(
        log.contains("\\\"status\\\":\\\"401\\\"") || log.contains("\"status\":\"401\""),
        "the JSON reaches the log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_shaping_holds_the_excess_in_the_queue() {
    let w = World::start(|s| {
        s.sections = s
            .sections
            .replace("flow = \"client_credentials\"\n", "flow = \"client_credentials\"\nmessages_per_minute = 2\n")
    })
    .await;
    for i in 0..3 {
        let r = w.send(&login("PLAIN"), &scan_message(&format!("m{i}"), "x")).await;
        assert!(r.ok, "{r:?}");
        if i == 2 {
            assert!(r.message.contains("queued") && r.message.contains("limit"), "{r:?}");
        }
    }
    w.upstream.wait_for_messages(2, WAIT).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w.upstream.messages().len(), 2, "the third waits for the minute to pass");
    let (_, out, _) = w.relay.cli(&["queue", "list"], None);
    assert!(out.contains("floor3"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeliverable_message_is_bounced_after_its_lifetime() {
    let w =
        World::start(|s| s.relay_extra.push_str("queue_lifetime = \"3s\"\nbounce_to = \"it@contoso.test\"\n")).await;
    w.upstream.reject_recipient_with("stuck@contoso.test", "450 4.2.1 Mailbox busy");
    let r = w
        .send(
            &["--auth", "PLAIN", "--user", "floor3", "--password", "1234", "--to", "stuck@contoso.test"],
            &scan_message("stuck", "x"),
        )
        .await;
    assert!(r.ok && r.message.contains("queued"), "{r:?}");
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].rcpts, vec!["it@contoso.test"]);
    let text = got[0].data_str();
    assert!(text.contains("multipart/report; report-type=delivery-status"), "{text}");
    assert!(text.contains("Final-Recipient: rfc822; stuck@contoso.test"), "{text}");
    assert!(text.contains("Subject: stuck"), "the original headers are quoted: {text}");
}
