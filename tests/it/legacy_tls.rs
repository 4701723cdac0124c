//! Old devices and TLS (README.md, "Old devices and TLS"): a client that offers only TLS 1.0
//! or 1.1, or only CBC / RSA-key-exchange suites, delivers through a `legacy_tls` listener
//! (OpenSSL) with STARTTLS and with implicit TLS, and is refused by a default (rustls) one.
//! The client is Python's ssl forced to the old protocol, as the printers are.

use std::path::Path;
use std::process::Command;

use crate::common::relay::{standard_sections, SendResult, World, STARTTLS};

/// An RSA certificate for the legacy listener, made by `mfd-relay make-cert` (its default).
fn rsa_pair(dir: &Path) -> std::path::PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_mfd-relay"))
        .args(["make-cert", "--name", "localhost", "--name", "127.0.0.1", "--dir"])
        .arg(dir.join("legacy"))
        .output()
        .expect("mfd-relay make-cert");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    dir.join("legacy/relay.pem")
}

async fn legacy_world(mode: &str) -> (World, std::path::PathBuf) {
    let mut ca = None;
    let w = World::start_with(
        |env| {
            ca = Some(rsa_pair(env.dir));
            format!("{}\n{}", env.provider, standard_sections())
        },
        |s| {
            s.listener_extra.push_str(&format!(
                "tls = \"{mode}\"\ncert = \"legacy/relay.pem\"\nkey = \"legacy/relay-key.pem\"\nlegacy_tls = true\nrequire_auth_tls = true\n"
            ))
        },
    )
    .await;
    (w, ca.expect("made"))
}

fn login<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["--auth", "PLAIN", "--user", "floor3", "--password", "1234"];
    v.extend_from_slice(extra);
    v
}

fn delivered(r: &SendResult, version: &str, cipher: &str) {
    assert!(r.ok && r.message.contains("delivered"), "{r:?}");
    assert_eq!((r.tls_version.as_deref(), r.cipher.as_deref()), (Some(version), Some(cipher)), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_printer_delivers_through_a_legacy_starttls_listener() {
    let (w, ca) = legacy_world("starttls").await;
    let ca = ca.to_string_lossy().into_owned();
    let body = crate::common::relay::scan_message("tls 1.0", "x");
    let r = w
        .send(&login(&["--starttls", "--cafile", &ca, "--tls-version", "1.0", "--ciphers", "AES128-SHA"]), &body)
        .await;
    delivered(&r, "TLSv1", "AES128-SHA");
    let r = w
        .send(
            &login(&["--starttls", "--cafile", &ca, "--tls-version", "1.2", "--ciphers", "ECDHE-RSA-AES128-SHA"]),
            &body,
        )
        .await;
    delivered(&r, "TLSv1.2", "ECDHE-RSA-AES128-SHA");
    // A modern client on the same listener still gets TLS 1.3.
    let r = w.send(&login(&["--starttls", "--cafile", &ca]), &body).await;
    assert_eq!(r.tls_version.as_deref(), Some("TLSv1.3"), "{r:?}");
    assert!(r.ok, "{r:?}");
    // require_auth_tls holds on the legacy listener too: no login in clear.
    let r = w.send(&login(&[]), &body).await;
    assert_eq!((r.ok, r.code), (false, Some(538)), "{r:?}");

    // The admin sees who is on which version: in the log and in the metrics.
    let log = w.relay.log();
    assert!(log.contains("tls=TLSv1 cipher=AES128-SHA") && log.contains("device=floor3"), "{log}");
    let (_, metrics) = w.relay.admin_get("/metrics");
    let line = |version: &str| {
        format!(
            "mfd_relay_smtp_tls_sessions_total{{listener=\"127.0.0.1:{}\",version=\"{version}\"}} 1",
            w.relay.smtp_port
        )
    };
    for v in ["TLSv1", "TLSv1.2", "TLSv1.3"] {
        assert!(metrics.contains(&line(v)), "{}\n{metrics}", line(v));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_printer_delivers_through_a_legacy_implicit_tls_listener() {
    let (w, ca) = legacy_world("implicit").await;
    let ca = ca.to_string_lossy().into_owned();
    let body = crate::common::relay::scan_message("tls 1.1", "x");
    let r = w
        .send(&login(&["--implicit-tls", "--cafile", &ca, "--tls-version", "1.1", "--ciphers", "AES256-SHA"]), &body)
        .await;
    delivered(&r, "TLSv1.1", "AES256-SHA");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_listener_refuses_old_tls_and_says_where_to_look() {
    let w = World::start(|s| s.listener_extra.push_str(STARTTLS)).await;
    let ca = w.dir.path().join("relay.pem").to_string_lossy().into_owned();
    let body = crate::common::relay::scan_message("tls 1.0", "x");
    let r = w.send(&login(&["--starttls", "--cafile", &ca, "--tls-version", "1.0"]), &body).await;
    assert_eq!((r.ok, r.stage.as_str()), (false, "starttls"), "{r:?}");
    let r = w
        .send(&login(&["--starttls", "--cafile", &ca, "--tls-version", "1.2", "--ciphers", "AES128-SHA"]), &body)
        .await;
    assert_eq!((r.ok, r.stage.as_str()), (false, "starttls"), "CBC with RSA key exchange: {r:?}");
    let log = w.relay.log();
    assert!(log.contains("TLS handshake failed") && log.contains("legacy_tls listener"), "{log}");
    assert!(w.upstream.messages().is_empty());
    // A modern client on the same listener is fine.
    let r = w.send(&login(&["--starttls", "--cafile", &ca]), &body).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}");
}
