//! SMTP PIPELINING upstream (RFC 2920): when the provider's EHLO offers it, the relay sends
//! MAIL, every RCPT and DATA in one flight and reads their replies in order, so a message
//! costs two round trips; per-recipient results stay what they were one command at a time.
//! The fake upstream counts the reads that brought each envelope's commands.

use std::time::Duration;

use crate::common;
use crate::common::relay::{scan_message, RawClient, World};

const WAIT: Duration = Duration::from_secs(20);

/// Sends one message as `floor3` to `rcpts` with a raw client; returns the reply to the dot.
async fn send(port: u16, rcpts: &[&str], subject: &str) -> String {
    let rcpts: Vec<String> = rcpts.iter().map(|s| s.to_string()).collect();
    let subject = subject.to_string();
    tokio::task::spawn_blocking(move || {
        let mut c = RawClient::connect(port);
        assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
        let auth = common::b64(b"\0floor3\x001234");
        assert!(c.cmd(&format!("AUTH PLAIN {auth}"), "\r\n").starts_with("235"));
        assert!(c.cmd("MAIL FROM:<scanner@printer.local>", "\r\n").starts_with("250"));
        for r in &rcpts {
            assert!(c.cmd(&format!("RCPT TO:<{r}>"), "\r\n").starts_with("250"));
        }
        assert!(c.cmd("DATA", "\r\n").starts_with("354"));
        c.send(&scan_message(&subject, "scan"));
        let reply = c.cmd(".", "\r\n");
        c.cmd("QUIT", "\r\n");
        reply
    })
    .await
    .unwrap()
}

/// The verbs of connection `conn`'s commands, grouped by the flight that brought them.
fn flights(w: &World, conn: u64) -> Vec<Vec<String>> {
    let mut out: Vec<(u64, Vec<String>)> = Vec::new();
    for c in w.upstream.commands().into_iter().filter(|c| c.conn == conn) {
        match out.last_mut() {
            Some((f, verbs)) if *f == c.flight => verbs.push(c.verb),
            _ => out.push((c.flight, vec![c.verb])),
        }
    }
    out.into_iter().map(|(_, v)| v).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_envelope_goes_in_one_flight_when_the_upstream_offers_pipelining() {
    let w = World::start(|_| {}).await;
    let r = send(w.relay.smtp_port, &["a@contoso.test", "b@contoso.test", "c@contoso.test"], "one flight").await;
    assert!(r.starts_with("250"), "{r}\n{}", w.relay.log());
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].rcpts, ["a@contoso.test", "b@contoso.test", "c@contoso.test"]);
    assert_eq!(got[0].envelope_flights, 1, "MAIL, 3 RCPT and DATA in one write");
    let f = flights(&w, got[0].conn);
    assert!(f.contains(&vec!["MAIL".into(), "RCPT".into(), "RCPT".into(), "RCPT".into(), "DATA".into()]), "{f:?}");
    // STARTTLS and AUTH each went alone (RFC 2920: nothing after STARTTLS in its flight).
    assert!(f.contains(&vec!["STARTTLS".to_string()]) && f.contains(&vec!["AUTH".to_string()]), "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_command_at_a_time_when_the_upstream_does_not_offer_pipelining() {
    let w = World::start_upstream(
        |o| o.pipelining = false,
        |e| format!("{}\n{}", e.provider, common::relay::standard_sections()),
        |_| {},
    )
    .await;
    let r = send(w.relay.smtp_port, &["a@contoso.test", "b@contoso.test", "c@contoso.test"], "sequential").await;
    assert!(r.starts_with("250"), "{r}\n{}", w.relay.log());
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].rcpts.len(), 3);
    assert_eq!(got[0].envelope_flights, 5, "MAIL, each RCPT and DATA after the previous reply");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_recipients_under_pipelining_are_refused_and_the_others_get_the_message() {
    let w = World::start(|_| {}).await;
    w.upstream.reject_recipient("gone@contoso.test");
    let r = send(w.relay.smtp_port, &["a@contoso.test", "gone@contoso.test", "c@contoso.test"], "mixed").await;
    assert!(r.starts_with("250") && r.contains("2 of 3"), "{r}\n{}", w.relay.log());
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    let delivered = got.iter().find(|m| m.data_str().contains("Subject: mixed")).expect("the message");
    assert_eq!(delivered.rcpts, ["a@contoso.test", "c@contoso.test"]);
    assert_eq!(delivered.envelope_flights, 1);
    assert!(w.relay.log().contains("gone@contoso.test"), "the refusal is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_recipient_refused_under_pipelining_sends_no_message_text() {
    let w = World::start(|_| {}).await;
    w.upstream.reject_recipient("gone@contoso.test");
    w.upstream.reject_recipient("left@contoso.test");
    let r = send(w.relay.smtp_port, &["gone@contoso.test", "left@contoso.test"], "nobody").await;
    assert!(r.starts_with("550"), "the device sees the refusal: {r}\n{}", w.relay.log());
    // DATA got 554 (RFC 2920 3.1) and the relay sent no message text after it: no line of
    // it was read as a command.
    let cmds = w.upstream.commands();
    let data = cmds.iter().find(|c| c.verb == "DATA").expect("DATA was sent");
    assert_eq!(data.code, 554, "{cmds:?}");
    let stats = w.upstream.stats();
    assert_eq!(stats.unrecognized_commands, 0, "message text sent after a refused DATA: {cmds:?}");
    assert_eq!(stats.messages_accepted, 0);
    // The connection is still good: the next message goes through it.
    let r = send(w.relay.smtp_port, &["a@contoso.test"], "after the refusal").await;
    assert!(r.starts_with("250"), "{r}\n{}", w.relay.log());
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].conn, data.conn, "the pooled connection was reused");
    assert_eq!(w.upstream.stats().unrecognized_commands, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_is_reused_after_a_pipelined_transaction_with_rset_in_the_flight() {
    let w = World::start(|_| {}).await;
    for subject in ["first", "second", "third"] {
        let r = send(w.relay.smtp_port, &["a@contoso.test", "b@contoso.test"], subject).await;
        assert!(r.starts_with("250"), "{r}\n{}", w.relay.log());
    }
    let got = w.upstream.wait_for_messages(3, WAIT).await;
    assert!(got.iter().all(|m| m.conn == got[0].conn), "one upstream connection for all three");
    assert!(got.iter().all(|m| m.envelope_flights == 1), "{got:?}");
    assert_eq!(w.upstream.stats().auth_successes, 1);
    // The reuse is checked by an RSET at the head of the next flight, not by a round trip.
    let f = flights(&w, got[0].conn);
    let reused = vec!["RSET", "MAIL", "RCPT", "RCPT", "DATA"];
    assert_eq!(f.iter().filter(|v| **v == reused).count(), 2, "{f:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_replaced_without_losing_the_message() {
    let w = World::start(|_| {}).await;
    let r = send(w.relay.smtp_port, &["a@contoso.test"], "first").await;
    assert!(r.starts_with("250"), "{r}");
    // The provider drops every connection while the relay's one sits in the pool.
    w.upstream.down().await;
    w.upstream.up().await;
    let r = send(w.relay.smtp_port, &["a@contoso.test"], "second").await;
    assert!(r.starts_with("250") && r.contains("delivered"), "delivered in session: {r}\n{}", w.relay.log());
    let got = w.upstream.wait_for_messages(2, WAIT).await;
    assert_ne!(got[0].conn, got[1].conn, "a new connection");
    assert_eq!(got[1].envelope_flights, 1);
}
