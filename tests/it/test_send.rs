//! `mfd-relay test` and `POST /api/test`: one test message sent as a device would send it,
//! each step printed as it happens with the provider's own replies; through the running
//! daemon and with the daemon stopped; a refusal exits 1 with its reply and the relay's hint.

use std::time::Duration;

use base64::Engine as _;

use crate::common::fake_smtp::Times;
use crate::common::relay::{standard_sections, World, SCANS};

const WAIT: Duration = Duration::from_secs(20);
const STEPS: [&str; 8] = ["token", "connect", "tls", "auth", "mail", "rcpt", "data", "final"];

/// The standard world plus `nobody`, an identity that was never signed in, and its device.
async fn world() -> World {
    let w = World::start_with(
        |e| {
            format!(
                "{}\n{}\n[[identity]]\nname = \"nobody\"\nprovider = \"fake\"\nemail = \"nobody@contoso.test\"\nflow = \"device_code\"\n\n\
                 [[device]]\nname = \"orphan\"\nidentity = \"nobody\"\naddresses = [\"127.0.0.9/32\"]\n",
                e.provider,
                standard_sections()
            )
        },
        |_| {},
    )
    .await;
    w
}

fn test_cli(w: &World, args: &[&str]) -> (i32, String) {
    let mut all = vec!["test"];
    all.extend_from_slice(args);
    let (code, out, err) = tokio::task::block_in_place(|| w.relay.cli(&all, None));
    (code, format!("{out}{err}"))
}

/// Each step's line, in order (`name ok|FAIL ms detail`).
fn step_lines(out: &str) -> Vec<(String, bool)> {
    out.lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?;
            let ok = words.next()?;
            (STEPS.contains(&name) && (ok == "ok" || ok == "FAIL")).then(|| (name.to_string(), ok == "ok"))
        })
        .collect()
}

fn assert_every_step_ok(out: &str) {
    let steps = step_lines(out);
    let names: Vec<&str> = steps.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, STEPS, "{out}");
    assert!(steps.iter().all(|(_, ok)| *ok), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_through_the_running_relay_prints_every_step_and_delivers() {
    let w = world().await;
    let (code, out) = test_cli(&w, &["--device", "floor3", "--to", "boss@contoso.test"]);
    assert_eq!(code, 0, "{out}\n{}", w.relay.log());
    assert_every_step_ok(&out);
    assert!(!out.contains("not running"), "went through the daemon: {out}");
    // The provider's own replies and the TLS the relay got.
    assert!(out.contains("2.1.0 Sender OK") && out.contains("<boss@contoso.test>: 250 2.1.5"), "{out}");
    assert!(out.contains("STARTTLS, TLSv1_3") && out.contains("certificate subject"), "{out}");
    assert!(out.contains("AUTH XOAUTH2 as scans@contoso.test: 235"), "{out}");
    let delivered = out.lines().find(|l| l.starts_with("delivered: ")).expect("a result line");
    assert!(delivered.contains("250 2.0.0 OK <FAKE"), "{out}");
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].rcpts, ["boss@contoso.test"]);
    assert_eq!(got[0].from, SCANS);
    let text = got[0].data_str();
    // floor3 rewrites From: the same header rewrite as its own mail.
    assert!(text.contains("\r\nFrom: \"mfd-relay test (floor3)\" <scans@contoso.test>\r\n"), "{text}");
    assert!(text.starts_with("Received: ") && text.contains("Message-ID: <"), "{text}");
    // Not queued: nothing to retry or bounce.
    let (_, queue) = w.relay.admin_get("/api/queue");
    let page: serde_json::Value = serde_json::from_str(&queue).unwrap();
    assert_eq!((page["total"].as_u64(), page["messages"].as_array().map(Vec::len)), (Some(0), Some(0)), "{queue}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_with_the_relay_stopped_sends_on_its_own() {
    let mut w = world().await;
    tokio::task::block_in_place(|| w.relay.stop());
    let (code, out) = test_cli(&w, &["--device", "floor3", "--to", "boss@contoso.test"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("the relay is not running"), "{out}");
    assert_every_step_ok(&out);
    assert_eq!(w.upstream.wait_for_messages(1, WAIT).await[0].rcpts, ["boss@contoso.test"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_as_refusal_exits_1_with_the_reply_and_the_hint() {
    let w = world().await;
    let refusal = "550 5.7.60 SMTP; Client does not have permissions to send as this sender";
    w.upstream.set_data_reply(refusal, Times::Next(1));
    let (code, out) = test_cli(&w, &["--device", "floor3", "--to", "boss@contoso.test"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAILED: 550 5.7.60 SMTP; Client does not have permissions"), "{out}");
    let hint = out.lines().find(|l| l.starts_with("hint: ")).unwrap_or_else(|| panic!("no hint: {out}"));
    assert!(hint.contains("Send As"), "{hint}");
    assert_eq!(step_lines(&out).last(), Some(&("final".to_string(), false)), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_that_needs_a_sign_in_exits_1_naming_the_login_command() {
    let w = world().await;
    let (code, out) = test_cli(&w, &["--device", "orphan", "--to", "boss@contoso.test"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(step_lines(&out), [("token".to_string(), false)], "{out}");
    assert!(out.contains("mfd-relay auth login nobody"), "{out}");
    assert!(w.upstream.stats().connections == 0, "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_attaches_a_pdf_of_that_many_bytes() {
    let w = world().await;
    let (code, out) = test_cli(&w, &["--device", "floor3", "--to", "boss@contoso.test", "--size", "200KB"]);
    assert_eq!(code, 0, "{out}");
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    let text = got[0].data_str();
    assert!(text.contains("Content-Type: application/pdf; name=\"mfd-relay-test.pdf\""), "{}", &text[..2000]);
    let b64: String = text
        .split("Content-Transfer-Encoding: base64\r\n\r\n")
        .nth(1)
        .and_then(|rest| rest.split("\r\n--").next())
        .expect("the attachment")
        .replace("\r\n", "");
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).expect("base64");
    assert_eq!(bytes.len(), 200_000);
}

/// `POST /api/test` with the given headers; returns (status, head in lower case, body).
fn request(port: u16, headers: &[(&str, &str)], body: &str) -> (u16, String, String) {
    let headers: Vec<(&str, &str)> = [("Host", "127.0.0.1")].into_iter().chain(headers.iter().copied()).collect();
    crate::common::relay::http_request(port, "POST", "/api/test", &headers, body)
}

/// The body of a chunked answer, de-chunked.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_streams_ndjson_and_refuses_what_a_web_page_or_the_configuration_would_not_allow() {
    let w = world().await;
    let port = w.relay.admin_port;
    let json = ("Content-Type", "application/json");
    let ask = r#"{"device": "floor3", "to": "me@contoso.test", "size": 1000}"#;
    let (status, head, body) = tokio::task::block_in_place(|| request(port, &[json], ask));
    assert_eq!(status, 200, "{head}{body}");
    assert!(head.contains("content-type: application/x-ndjson"), "{head}");
    let body = if head.contains("transfer-encoding: chunked") { dechunk(&body) } else { body };
    let lines: Vec<serde_json::Value> =
        body.lines().map(|l| serde_json::from_str(l).expect("one JSON per line")).collect();
    let names: Vec<&str> = lines.iter().filter_map(|l| l["step"]["name"].as_str()).collect();
    assert_eq!(names, STEPS, "{body}");
    assert!(lines[..8].iter().all(|l| l["step"]["ok"] == true && l["step"]["ms"].is_u64()), "{body}");
    let last = lines.last().unwrap();
    assert_eq!(last["result"]["delivered"], true, "{body}");
    assert!(last["result"]["reply"].as_str().unwrap().starts_with("250 2.0.0 OK"), "{body}");
    assert!(last["result"]["hint"].is_null());
    assert_eq!(w.upstream.wait_for_messages(1, WAIT).await[0].rcpts, ["me@contoso.test"]);

    // Refused before anything is sent: a foreign origin, a form, an unknown device, a
    // recipient outside the device's allow-list.
    let post = |headers: &[(&str, &str)], body: &str| tokio::task::block_in_place(|| request(port, headers, body));
    assert_eq!(post(&[json, ("Origin", "https://attacker.example")], ask).0, 403);
    assert_eq!(post(&[json, ("Sec-Fetch-Site", "cross-site")], ask).0, 403);
    assert_eq!(
        post(&[("Content-Type", "application/x-www-form-urlencoded")], "device=floor3&to=me%40contoso.test").0,
        415
    );
    let (status, _, body) = post(&[json], r#"{"device": "nope", "to": "me@contoso.test"}"#);
    assert_eq!(status, 400, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    assert!(error["error"].as_str().unwrap().contains("no device \"nope\""), "{body}");
    let (status, _, body) = post(&[json], r#"{"device": "restricted", "to": "me@elsewhere.test"}"#);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("may not send to <me@elsewhere.test>"), "{body}");
    assert_eq!(w.upstream.stats().messages_accepted, 1, "only the first test was sent");
}
