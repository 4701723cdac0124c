//! Other real clients against the relay: swaks (STARTTLS, implicit TLS, AUTH LOGIN) and
//! curl's smtp:// (STARTTLS, AUTH PLAIN), plus the STARTTLS command-injection check
//! (RFC 3207 4.2, CVE-2011-0411 class).

use crate::common;

use std::process::Command;
use std::time::Duration;

use crate::common::relay::{World, IMPLICIT_TLS, STARTTLS};
use crate::common::SmtpClient;

const WAIT: Duration = Duration::from_secs(20);

fn tool(name: &str) -> bool {
    Command::new("which").arg(name).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Fails loudly when a client is missing, unless MFD_RELAY_SKIP_INTEROP is set.
fn require(name: &str) -> bool {
    if tool(name) {
        return true;
    }
    if std::env::var_os("MFD_RELAY_SKIP_INTEROP").is_some() {
        eprintln!("skipping: {name} is not installed (MFD_RELAY_SKIP_INTEROP is set)");
        return false;
    }
    panic!("{name} is not installed; run tests/run.sh as root (it installs it), or set MFD_RELAY_SKIP_INTEROP=1");
}

async fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// swaks as floor3 (PIN 1234) to boss@contoso.test, with `extra` options.
async fn swaks(port: u16, extra: &[&str]) -> (bool, String) {
    let port = port.to_string();
    let mut cmd = Command::new("swaks");
    cmd.args(["--server", "127.0.0.1", "--port", &port, "--auth-user", "floor3", "--auth-password", "1234"])
        .args(["--to", "boss@contoso.test", "--timeout", "30"])
        .args(extra);
    run(&mut cmd).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_with_starttls_and_auth_login() {
    if !require("swaks") {
        return;
    }
    let w = World::start(|s| s.listener_extra.push_str(STARTTLS)).await;
    let (ok, out) = swaks(
        w.relay.smtp_port,
        &["--tls", "--auth", "LOGIN", "--from", "scanner@printer.local", "--header", "Subject: swaks starttls"],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("STARTTLS") && out.contains("250 2.0.0 OK") && out.contains("delivered"), "{out}");
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert!(got[0].data_str().contains("Subject: swaks starttls"));
    // The trace field says the device used TLS and logged in.
    assert!(got[0].data_str().contains("with ESMTPSA"), "{}", got[0].data_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_with_implicit_tls() {
    if !require("swaks") {
        return;
    }
    let w = World::start(|s| s.listener_extra.push_str(IMPLICIT_TLS)).await;
    let (ok, out) = swaks(w.relay.smtp_port, &["--tls-on-connect", "--auth", "PLAIN"]).await;
    assert!(ok, "{out}");
    w.upstream.wait_for_messages(1, WAIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_smtp_with_starttls_and_auth_plain() {
    if !require("curl") {
        return;
    }
    let w = World::start(|s| s.listener_extra.push_str(STARTTLS)).await;
    let body = common::relay::write_file(
        w.dir.path(),
        "curl.eml",
        b"From: scanner@printer.local\r\nTo: boss@contoso.test\r\nSubject: curl scan\r\n\r\nfrom curl\r\n",
    );
    let (ok, out) = run(Command::new("curl")
        .args(["--silent", "--show-error", "--ssl-reqd", "--cacert"])
        .arg(w.dir.path().join("relay.pem"))
        .arg(format!("smtp://localhost:{}", w.relay.smtp_port))
        .args(["--login-options", "AUTH=PLAIN", "--user", "floor3:1234"])
        .args(["--mail-from", "scanner@printer.local", "--mail-rcpt", "boss@contoso.test", "--upload-file"])
        .arg(&body)
        .args(["--max-time", "30"]))
    .await;
    assert!(ok, "{out}");
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert!(got[0].data_str().contains("from curl"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_pipelined_after_starttls_is_discarded() {
    let w = World::start(|s| s.listener_extra.push_str(STARTTLS)).await;
    let (mut c, greeting) = SmtpClient::connect(w.relay.smtp_port).await;
    assert_eq!(greeting.code, 220);
    c.send_raw(b"EHLO attacker\r\n").await.unwrap();
    let ehlo = c.read_reply().await.unwrap();
    assert!(ehlo.has_line("STARTTLS"), "{ehlo:?}");
    // The injection: a command sent in the clear right behind STARTTLS.
    c.send_raw(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n").await.unwrap();
    let ready = c.read_reply().await.unwrap();
    assert_eq!(ready.code, 220);
    let tcp = c.into_inner();
    let tls = common::tls::connect(tcp, common::tls::client_config_trusting(&w.relay_cert), "localhost").await.unwrap();
    let mut c = SmtpClient::new(tls);
    // Had the MAIL been kept, it would be answered now (and RFC 3207 requires a new EHLO).
    c.send_raw(b"EHLO honest\r\n").await.unwrap();
    let r = c.read_reply().await.unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    assert!(!r.has_line("STARTTLS"), "no STARTTLS inside TLS: {r:?}");
    c.send_raw(b"RCPT TO:<x@contoso.test>\r\n").await.unwrap();
    let r = c.read_reply().await.unwrap();
    assert_eq!(r.code, 503, "no transaction survived the upgrade: {r:?}");
    assert!(w.relay.log().contains("discarded plaintext sent after STARTTLS"));
}
