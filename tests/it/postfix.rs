//! Interop with real servers: Postfix as the upstream, accepting AUTH XOAUTH2 through Dovecot
//! SASL with `passdb oauth2` (tokens checked against the fake provider's introspection
//! endpoint), delivering into a Dovecot mailbox. Needs root and the Debian packages that
//! tests/interop/install.sh installs (tests/run.sh does).

use std::time::{Duration, Instant};

use crate::common::fake_oauth::{ClientApp, FakeOAuth};
use crate::common::real::RealServers;
use crate::common::relay::{pin_hash, scan_message, smtplib_send, write_file, Relay, Setup, CLIENT_ID, CLIENT_SECRET};

const ALICE: &str = "alice@example.test";

/// Waits until alice's mailbox holds a message containing `needle`.
fn wait_for_mail(real: &RealServers, needle: &str) -> Vec<u8> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(m) =
            real.inbox_files(ALICE).into_iter().find(|m| m.windows(needle.len()).any(|w| w == needle.as_bytes()))
        {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "no mail with {needle:?} in Dovecot.\npostfix log:\n{}",
            std::fs::read_to_string(&real.info.postfix_log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The relay delivering as `alice` (client credentials at the fake provider) through real
/// Postfix, which checks XOAUTH2 with Dovecot; a device `floor3` logs in with PIN 1234.
struct PostfixRelay {
    idp: FakeOAuth,
    real: RealServers,
    dir: tempfile::TempDir,
    relay: Relay,
}

impl PostfixRelay {
    /// None (the test is skipped) when Postfix and Dovecot are not installed.
    async fn start(what: &str) -> Option<PostfixRelay> {
        let idp = FakeOAuth::start().await;
        idp.register_client(ClientApp::public(CLIENT_ID).secret(CLIENT_SECRET).app_account(ALICE));
        let introspect = idp.introspect_url();
        let real = tokio::task::block_in_place(|| RealServers::start(what, &introspect))?;
        let dir = tempfile::tempdir().unwrap();
        let sections = format!(
            "[[provider]]\nname = \"postfix\"\nkind = \"generic\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\ntoken_url = \"{}\"\nscopes = [\"https://outlook.office365.com/.default\"]\nsmtp = \"127.0.0.1:{}\"\nsmtp_tls = \"none\"\n\n\
             [[identity]]\nname = \"alice\"\nprovider = \"postfix\"\nemail = \"{ALICE}\"\nflow = \"client_credentials\"\n\n\
             [[device]]\nname = \"floor3\"\nidentity = \"alice\"\nusername = \"floor3\"\npin_hash = \"{}\"\nfrom = \"keep\"\n",
            idp.token_url(),
            real.info.smtp_port,
            pin_hash()
        );
        let setup = Setup::new(sections);
        let path = dir.path().to_path_buf();
        let relay = tokio::task::block_in_place(|| Relay::start(&path, &setup));
        Some(PostfixRelay { idp, real, dir, relay })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn printer_mail_reaches_dovecot_through_real_postfix_with_xoauth2() {
    let Some(PostfixRelay { idp, real, dir, mut relay }) = PostfixRelay::start("postfix interop").await else {
        return;
    };

    // A printer-like client: plain SMTP with AUTH PLAIN to the relay.
    let send = |relay: &Relay, subject: &str| {
        let body = write_file(dir.path(), &format!("{subject}.eml"), &scan_message(subject, "scanned page"));
        let port = relay.smtp_port;
        tokio::task::block_in_place(|| {
            smtplib_send(port, &["--auth", "PLAIN", "--user", "floor3", "--password", "1234", "--to", ALICE], &body)
        })
    };
    let r = send(&relay, "first scan through postfix");
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", relay.log());
    let m = tokio::task::block_in_place(|| wait_for_mail(&real, "first scan through postfix"));
    let text = String::from_utf8_lossy(&m);
    assert!(
        text.contains("Received: from printer.lan ([127.0.0.1])") && text.contains("by relay.test (mfd-relay)"),
        "{text}"
    );

    // The provider revokes the token the relay holds (stored, still "valid" by its expiry).
    relay.stop();
    idp.expire_access_tokens();
    tokio::task::block_in_place(|| relay.spawn());
    let r = send(&relay, "second scan after revocation");
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", relay.log());
    tokio::task::block_in_place(|| wait_for_mail(&real, "second scan after revocation"));
    // Postfix answered the stale token with 334 <base64 JSON>; the relay answered with an
    // empty line, logged the JSON, refreshed once and retried.
    let log = relay.log();
    assert!(
        log.contains(r#"\"status\":\"401\""#) || log.contains(r#""status":"401""#),
        "the 334 JSON is logged:\n{log}"
    );
    assert!(log.contains("refreshing once"), "{log}");
    let postfix_log = std::fs::read_to_string(&real.info.postfix_log).unwrap_or_default();
    assert!(postfix_log.contains("SASL XOAUTH2 authentication failed"), "{postfix_log}");
    relay.stop();
}

/// Postfix offers PIPELINING: the relay's pipelined envelopes (the second behind an RSET on the
/// pooled connection) are taken as a real server takes them, and Postfix sees nothing improper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_envelopes_and_a_pooled_connection_work_with_real_postfix() {
    let Some(PostfixRelay { idp: _idp, real, dir, mut relay }) = PostfixRelay::start("postfix pipelining").await else {
        return;
    };
    for subject in ["pipelined one", "pipelined two"] {
        let body = write_file(dir.path(), &format!("{subject}.eml"), &scan_message(subject, "scanned page"));
        let port = relay.smtp_port;
        let r = tokio::task::block_in_place(|| {
            smtplib_send(port, &["--auth", "PLAIN", "--user", "floor3", "--password", "1234", "--to", ALICE], &body)
        });
        assert!(r.ok && r.message.contains("delivered"), "{subject}: {r:?}\n{}", relay.log());
        tokio::task::block_in_place(|| wait_for_mail(&real, subject));
    }
    // The relay's stop closes its pooled connection: Postfix then logs what that one
    // connection carried, both messages (the second behind an RSET).
    relay.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    let postfix_log = loop {
        let log = std::fs::read_to_string(&real.info.postfix_log).unwrap_or_default();
        if log.lines().any(|l| l.contains("disconnect from") && l.contains(" auth=1 ")) || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(!postfix_log.contains("improper command pipelining"), "{postfix_log}");
    let session = postfix_log.lines().find(|l| l.contains("disconnect from") && l.contains(" auth=1 "));
    let session = session.unwrap_or_else(|| panic!("no disconnect line:\n{postfix_log}"));
    assert!(session.contains(" mail=2 ") && session.contains(" data=2 ") && session.contains(" rset=1 "), "{session}");
}
