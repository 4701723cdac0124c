//! Bad input and abuse: every case gets a clear SMTP reply (or a clean close), never a panic,
//! a hang, an open relay or a smuggled message.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::relay::{RawClient, World};

const WAIT: Duration = Duration::from_secs(20);

fn auth_plain() -> String {
    format!("AUTH PLAIN {}", common::b64(b"\0floor3\x001234"))
}

/// Runs `f` on a blocking thread (the raw client is synchronous).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_lines_get_clear_replies() {
    let w = World::start(|_| {}).await;
    let port = w.relay.smtp_port;
    blocking(move || {
        let mut c = RawClient::connect(port);
        // Garbage before EHLO, as old devices send.
        assert!(c.cmd("\u{1b}[0m", "\r\n").starts_with("500"));
        // A 1 MB line.
        let r = c.cmd(&"A".repeat(1024 * 1024), "\r\n");
        assert!(r.starts_with("500 5.5.6"), "{r}");
        // NUL bytes and invalid UTF-8.
        c.send(b"EHLO a\x00b\r\n");
        let r = c.reply();
        assert!(r.starts_with("250") || r.starts_with("501"), "{r}");
        c.send(b"MAIL FROM:<\xff\xfe@x.test>\r\n");
        assert!(c.reply().starts_with("501"));
        // Invalid base64 and a cancelled AUTH.
        assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
        assert!(c.cmd("AUTH PLAIN !!!notbase64", "\r\n").starts_with("501"));
        assert!(c.cmd("AUTH LOGIN", "\r\n").starts_with("334"));
        assert!(c.cmd("*", "\r\n").starts_with("501"));
        assert!(c.cmd("AUTH CRAM-MD5", "\r\n").starts_with("504"));
        // Still serving.
        assert!(c.cmd("NOOP", "\r\n").starts_with("250"));
        assert!(c.cmd("QUIT", "\r\n").starts_with("221"));
    })
    .await;
    // Ten errors in a row close the session: the tenth gets its 500, then 421 and the end.
    blocking(move || {
        let mut c = RawClient::connect(port);
        for _ in 0..9 {
            assert!(c.cmd("BOGUS", "\r\n").starts_with("500"));
        }
        let tenth = c.cmd("BOGUS", "\r\n");
        assert!(tenth.starts_with("500"), "{tenth}");
        assert!(c.reply().starts_with("421 4.7.0"));
        assert_eq!(c.reply(), "EOF");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_recipients_and_size_lies() {
    let w = World::start(|s| s.listener_extra.push_str("max_message_size = \"1MiB\"\n")).await;
    let port = w.relay.smtp_port;
    blocking(move || {
        let mut c = RawClient::connect(port);
        assert!(c.cmd("EHLO x", "\r\n").contains("SIZE 1048576"));
        assert!(c.cmd(&auth_plain(), "\r\n").starts_with("235"));
        assert!(c.cmd("MAIL FROM:<a@printer.lan>", "\r\n").starts_with("250"));
        // 10,000 recipients, pipelined in one write: the first 100 are taken, the rest 452.
        let mut batch = String::new();
        for i in 0..10_000 {
            batch.push_str(&format!("RCPT TO:<r{i}@contoso.test>\r\n"));
        }
        c.send(batch.as_bytes());
        let (mut ok, mut full) = (0, 0);
        for _ in 0..10_000 {
            let r = c.reply();
            if r.starts_with("250") {
                ok += 1;
            } else if r.starts_with("452 4.5.3") {
                full += 1;
            }
        }
        assert_eq!((ok, full), (100, 9_900));
        assert!(c.cmd("RSET", "\r\n").starts_with("250"));
        // SIZE says small, the body is 2 MB: refused after DATA, nothing queued.
        assert!(c.cmd("MAIL FROM:<a@printer.lan> SIZE=100", "\r\n").starts_with("250"));
        assert!(c.cmd("RCPT TO:<b@contoso.test>", "\r\n").starts_with("250"));
        assert!(c.cmd("DATA", "\r\n").starts_with("354"));
        let line = "x".repeat(998) + "\r\n";
        for _ in 0..2100 {
            c.send(line.as_bytes());
        }
        let r = c.cmd(".", "\r\n");
        assert!(r.starts_with("552 5.3.4"), "{r}");
        // The session goes on.
        assert!(c.cmd("NOOP", "\r\n").starts_with("250"));
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(w.upstream.messages().is_empty());
    let (_, out, _) = w.relay.cli(&["queue", "list"], None);
    assert!(out.contains("queue is empty"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off() {
    let w = World::start(|s| s.listener_extra.push_str("command_timeout = \"2s\"\n")).await;
    let port = w.relay.smtp_port;
    blocking(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"220"));
        let start = Instant::now();
        // One byte every 300 ms, never a complete line.
        let mut closed = false;
        for b in b"EHLO slowly-but-surely.example.test".iter().cycle().take(60) {
            if s.write_all(&[*b]).is_err() {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(300));
            if start.elapsed() > Duration::from_secs(4) {
                break;
            }
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        let text = String::from_utf8_lossy(&rest);
        assert!(closed || text.contains("421 4.4.2"), "{text}");
        assert!(start.elapsed() < Duration::from_secs(8), "cut off after the command timeout");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_address_are_limited() {
    let w = World::start(|s| s.listener_extra.push_str("max_connections_per_address = 50\n")).await;
    let port = w.relay.smtp_port;
    blocking(move || {
        let mut open = Vec::new();
        let (mut greeted, mut refused) = (0, 0);
        for _ in 0..2000 {
            let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
                refused += 1;
                continue;
            };
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut buf = [0u8; 256];
            match s.read(&mut buf) {
                Ok(n) if buf[..n].starts_with(b"220") => {
                    greeted += 1;
                    open.push(s);
                }
                Ok(n) if buf[..n].starts_with(b"421") => refused += 1,
                _ => refused += 1,
            }
        }
        assert_eq!(greeted, 50, "refused {refused}");
        assert_eq!(refused, 1950);
        // Another address is not affected.
        let mut c = RawClient::connect_from("127.0.0.2", port);
        assert!(c.cmd("EHLO lobby", "\r\n").starts_with("250"));
        drop(open);
    })
    .await;
    // Once they close, this address is served again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    blocking(move || {
        let mut c = RawClient::connect(port);
        assert!(c.cmd("NOOP", "\r\n").starts_with("250"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_never_injects_a_second_message() {
    let w = World::start(|_| {}).await;
    let port = w.relay.smtp_port;
    for (i, smuggle) in [&b"\n.\r\n"[..], b"\r.\r\n", b"\n.\n", b"\r\n.\n", b"\r.\r"].iter().enumerate() {
        let smuggle = smuggle.to_vec();
        let reply = blocking(move || {
            let mut c = RawClient::connect(port);
            assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
            assert!(c.cmd(&auth_plain(), "\r\n").starts_with("235"));
            assert!(c.cmd("MAIL FROM:<a@printer.lan>", "\r\n").starts_with("250"));
            assert!(c.cmd("RCPT TO:<b@contoso.test>", "\r\n").starts_with("250"));
            assert!(c.cmd("DATA", "\r\n").starts_with("354"));
            let mut body = format!("Subject: smuggle {i}\r\n\r\nbefore").into_bytes();
            body.extend_from_slice(&smuggle);
            body.extend_from_slice(b"MAIL FROM:<evil@evil.test>\r\nRCPT TO:<victim@contoso.test>\r\nDATA\r\nSubject: injected\r\n\r\nevil\r\n.\r\n");
            c.send(&body);
            let r = c.reply();
            assert!(c.cmd("QUIT", "\r\n").starts_with("221"));
            r
        })
        .await;
        assert!(reply.starts_with("250"), "{reply}");
    }
    let got = w.upstream.wait_for_messages(5, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = w.upstream.messages();
    assert_eq!(all.len(), 5, "one message per session, no injected ones");
    for m in &got {
        assert_eq!(m.rcpts, vec!["b@contoso.test"], "nothing reached the victim");
        assert!(m.data_str().contains("MAIL FROM:<evil@evil.test>"), "the injection stayed content");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_sequence_relays_for_an_unmapped_address() {
    let w = World::start(|_| {}).await;
    let port = w.relay.smtp_port;
    let commands = [
        "EHLO x",
        "HELO x",
        "MAIL FROM:<a@b.test>",
        "MAIL FROM:<>",
        "RCPT TO:<c@contoso.test>",
        "DATA",
        "RSET",
        "NOOP",
        "AUTH PLAIN AGZsb29yMwA5OTk5",
        "VRFY x",
        "STARTTLS",
        ".",
        "Subject: x",
    ];
    blocking(move || {
        // A deterministic pseudo-random walk over the commands, many sessions.
        let mut x: u32 = 42;
        for _ in 0..30 {
            let mut c = RawClient::connect(port);
            for _ in 0..25 {
                x = x.wrapping_mul(1103515245).wrapping_add(12345);
                let cmd = commands[(x >> 16) as usize % commands.len()];
                let r = c.cmd(cmd, "\r\n");
                assert!(!r.starts_with("354"), "DATA was accepted from an unmapped address after {cmd}");
                if r.contains("421") || r == "EOF" {
                    break;
                }
            }
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(w.upstream.messages().is_empty());
}
