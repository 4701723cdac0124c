//! OAuth identities end to end through the CLI: device code (pending, slow_down, denied,
//! expired), authorization code with PKCE (daemon callback and the CLI's own listener),
//! client credentials with a certificate assertion, Google-style service accounts, refresh
//! before expiry, revocation then re-login draining the queue, and the encrypted store.

use crate::common;

use std::time::Duration;

use crate::common::fake_oauth::{AadError, ClientApp, Grant};
use crate::common::relay::{endpoints, pin_hash, scan_message, CliProc, Env, World, CLIENT_ID, SCANS};
use crate::common::RsaTestKey;

const WAIT: Duration = Duration::from_secs(20);

/// A provider named "fake" (its credentials and scopes given), the identity "scans" with
/// `flow`, and the device floor3 (PIN 1234) using it.
fn sections(e: &Env<'_>, credentials: &str, scopes: &str, flow: &str) -> String {
    format!(
        "[[provider]]\nname = \"fake\"\nkind = \"generic\"\n{credentials}{}scopes = [{scopes}]\nsmtp = \"127.0.0.1:{}\"\nsmtp_tls = \"starttls\"\nca_file = \"{}\"\n\n\
         [[identity]]\nname = \"scans\"\nprovider = \"fake\"\nemail = \"{SCANS}\"\nflow = \"{flow}\"\n\n\
         [[device]]\nname = \"floor3\"\nidentity = \"scans\"\nusername = \"floor3\"\npin_hash = \"{}\"\n",
        endpoints(e.idp),
        e.smtp_port,
        e.ca.display(),
        pin_hash()
    )
}

/// A delegated identity (device code or auth code) and one device using it.
fn delegated(flow: &'static str) -> impl FnOnce(&Env<'_>) -> String {
    move |e| {
        let credentials = format!("client_id = \"{CLIENT_ID}\"\n");
        sections(e, &credentials, "\"https://outlook.office.com/SMTP.Send\", \"offline_access\"", flow)
    }
}

fn login() -> Vec<&'static str> {
    vec!["--auth", "PLAIN", "--user", "floor3", "--password", "1234"]
}

/// Runs `auth login scans`, approves the device code at the fake provider, returns the
/// exit code and output.
async fn device_login(w: &World, approve: bool) -> (i32, String) {
    device_login_as(w, approve.then_some(SCANS)).await
}

/// [`device_login`], approved by `account` (`None`: denied).
async fn device_login_as(w: &World, account: Option<&str>) -> (i32, String) {
    let config = w.relay.config.clone();
    let mut cli =
        tokio::task::spawn_blocking(move || CliProc::start(&config, &["auth", "login", "scans"])).await.unwrap();
    let code = w.idp.wait_for_user_code(WAIT).await;
    let (cli, line) = tokio::task::spawn_blocking(move || {
        let line = cli.wait_line("enter", WAIT);
        (cli, line)
    })
    .await
    .unwrap();
    assert!(line.contains(&code), "the CLI shows the user code: {line}");
    match account {
        Some(account) => w.idp.approve_device(&code, account),
        None => w.idp.deny_device(&code),
    }
    tokio::task::spawn_blocking(move || cli.wait(Duration::from_secs(60))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_login_while_running_then_mail_flows() {
    let w = World::start_with(delegated("device_code"), |_| {}).await;
    // Not signed in: the device is told, in session.
    let r = w.send(&login(), &scan_message("before", "x")).await;
    assert_eq!((r.code, r.stage.as_str()), (Some(451), "mail"), "{r:?}");
    assert!(r.message.contains("auth login scans"), "{r:?}");
    let (status, body) = w.relay.admin_get("/readyz");
    assert_eq!(status, 503, "{body}");

    let (code, out) = device_login(&w, true).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Signed in as scans@contoso.test"), "{out}");

    let r = w.send(&login(), &scan_message("after", "x")).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", w.relay.log());
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].user.as_deref(), Some(SCANS));
    assert_eq!(w.relay.admin_get("/readyz").0, 200);
    let (_, status, _) = w.relay.cli(&["auth", "status"], None);
    assert!(status.contains("scans") && status.contains("ready"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_honours_slow_down_and_reports_denial() {
    let w = World::start_with(delegated("device_code"), |_| {}).await;
    w.idp.force_slow_down(1);
    let (code, out) = device_login(&w, true).await;
    assert_eq!(code, 0, "slow_down is not fatal: {out}");
    let (code, out) = device_login(&w, false).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("declined"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_expiry_is_reported() {
    let w = World::start_with(delegated("device_code"), |_| {}).await;
    let config = w.relay.config.clone();
    let cli = tokio::task::spawn_blocking(move || CliProc::start(&config, &["auth", "login", "scans"])).await.unwrap();
    let code = w.idp.wait_for_user_code(WAIT).await;
    w.idp.expire_device(&code);
    let (status, out) = tokio::task::spawn_blocking(move || cli.wait(Duration::from_secs(60))).await.unwrap();
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("expired"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_code_login_with_the_daemon_stopped() {
    let mut w = World::start_with(delegated("device_code"), |_| {}).await;
    w.relay.stop();
    let (code, out) = device_login(&w, true).await;
    assert_eq!(code, 0, "{out}");
    tokio::task::block_in_place(|| w.relay.spawn());
    let r = w.send(&login(), &scan_message("offline login", "x")).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", w.relay.log());
}

/// Follows the authorization URL like a browser: the fake provider signs in at once and
/// redirects to the relay's callback.
async fn browser(url: &str) -> (u16, String) {
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::limited(5)).build().unwrap();
    let resp = client.get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

async fn auth_code_login(w: &World) -> (i32, String) {
    w.idp.set_authorize_account(Some(SCANS));
    let config = w.relay.config.clone();
    let mut cli =
        tokio::task::spawn_blocking(move || CliProc::start(&config, &["auth", "login", "scans"])).await.unwrap();
    let (cli, url) = tokio::task::spawn_blocking(move || {
        let url = cli.wait_line("/authorize?", WAIT);
        (cli, url.trim().to_string())
    })
    .await
    .unwrap();
    assert!(url.contains("code_challenge_method=S256") && url.contains("state="), "{url}");
    let (status, page) = browser(&url).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Signed in"), "{page}");
    tokio::task::spawn_blocking(move || cli.wait(Duration::from_secs(30))).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_code_with_pkce_through_the_daemon_and_offline() {
    let mut w = World::start_with(delegated("auth_code"), |_| {}).await;
    let (code, out) = auth_code_login(&w).await;
    assert_eq!(code, 0, "{out}");
    let r = w.send(&login(), &scan_message("pkce", "x")).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}");

    // A replayed or forged callback is refused: the state is single-use.
    let (status, page) =
        browser(&format!("http://127.0.0.1:{}/oauth/callback?code=x&state=forged", w.relay.admin_port)).await;
    assert_eq!(status, 400);
    assert!(page.contains("Sign-in failed"), "{page}");

    // With the daemon stopped, the CLI listens for the browser itself.
    w.relay.stop();
    let (code, out) = auth_code_login(&w).await;
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_credentials_with_a_certificate_assertion() {
    let key = RsaTestKey::a();
    // A certificate that expires in 10 days: the relay must warn about it.
    let cert = {
        let kp = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(key.private_key_pem(), &rcgen::PKCS_RSA_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(300);
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(10);
        let c = params.self_signed(&kp).unwrap();
        common::RsaCert { cert_pem: c.pem(), x5t_s256: common::b64url(common::sha256(c.der())) }
    };
    let w = World::start_with(
        |e| {
            e.idp.register_client(
                ClientApp::public("cert-app")
                    .assertion_key(key.public_key_der(), Some(cert.x5t_s256.as_str()))
                    .app_account(SCANS),
            );
            let cert_path = e.dir.join("app.pem");
            let key_path = e.dir.join("app-key.pem");
            std::fs::write(&cert_path, &cert.cert_pem).unwrap();
            std::fs::write(&key_path, key.private_key_pem()).unwrap();
            let credentials = format!(
                "client_id = \"cert-app\"\nclient_certificate = \"{}\"\nclient_key = \"{}\"\n",
                cert_path.display(),
                key_path.display()
            );
            sections(e, &credentials, "\"https://outlook.office365.com/.default\"", "client_credentials")
        },
        |_| {},
    )
    .await;
    let (code, out, err) = w.relay.cli(&["auth", "login", "scans"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("app-only sign-in works"), "{out}");
    let r = w.send(&login(), &scan_message("cert", "x")).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", w.relay.log());
    assert!(w.idp.token_requests(Grant::ClientCredentials) >= 1);
    let log = w.relay.log();
    assert!(
        log.contains("client certificate") && (log.contains("expires in 9 days") || log.contains("expires in 10 days")),
        "{log}"
    );
    let (_, metrics) = w.relay.admin_get("/metrics");
    assert!(metrics.contains("mfd_relay_client_certificate_expiry_timestamp_seconds{provider=\"fake\"}"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_service_account_acts_as_the_user() {
    let key = RsaTestKey::a();
    let sa = "relay@fake-project.iam.gserviceaccount.com";
    let w = World::start_with(
        |e| {
            e.idp.register_service_account(sa, key.public_key_der());
            let json = e.dir.join("sa.json");
            std::fs::write(&json, key.service_account_json(sa, &e.idp.token_url())).unwrap();
            let credentials = format!("client_id = \"unused\"\nservice_account_file = \"{}\"\n", json.display());
            sections(e, &credentials, "\"https://mail.google.com/\"", "service_account")
        },
        |_| {},
    )
    .await;
    let r = w.send(&login(), &scan_message("sa", "x")).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", w.relay.log());
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(got[0].user.as_deref(), Some(SCANS), "the token acts for the user (sub)");
    assert!(w.idp.token_requests(Grant::JwtBearer) >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_before_they_expire() {
    let w = World::start_with(delegated("device_code"), |_| {}).await;
    w.idp.set_access_token_lifetime(Duration::from_secs(6));
    let (code, out) = device_login(&w, true).await;
    assert_eq!(code, 0, "{out}");
    let before = w.idp.token_requests(Grant::RefreshToken);
    // No traffic at all: the background refresher keeps the token fresh (half the lifetime
    // for such short tokens, 10 minutes ahead for real ones).
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = w.idp.token_requests(Grant::RefreshToken);
    assert!(after > before, "refreshes: {before} -> {after}\n{}", w.relay.log());
    let (_, status, _) = w.relay.cli(&["auth", "status"], None);
    assert!(status.contains("ready"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_keeps_mail_queued_until_login_drains_it() {
    let w = World::start_with(delegated("device_code"), |_| {}).await;
    assert_eq!(device_login(&w, true).await.0, 0);
    assert!(w.send(&login(), &scan_message("one", "x")).await.ok);
    w.upstream.wait_for_messages(1, WAIT).await;

    // The user's password changes: every token of the account dies.
    w.idp.revoke_account(SCANS);
    w.upstream.down().await;
    w.upstream.up().await;
    let r = w.send(&login(), &scan_message("during revocation", "kept")).await;
    assert!(r.ok && r.message.contains("queued"), "the message is accepted and kept: {r:?}\n{}", w.relay.log());
    let r = w.send(&login(), &scan_message("later", "x")).await;
    assert_eq!(r.code, Some(451), "now the device is told: {r:?}");
    let (_, status, _) = w.relay.cli(&["auth", "status"], None);
    assert!(
        status.contains("needs_login") && status.contains("AADSTS50173") && status.contains("password was changed"),
        "{status}"
    );
    let (_, metrics) = w.relay.admin_get("/metrics");
    assert!(metrics.contains("mfd_relay_identity_state{identity=\"scans\"} 0"), "{metrics}");

    assert_eq!(device_login(&w, true).await.0, 0);
    let got = w.upstream.wait_until(WAIT, "the queued message", |s| s.messages_accepted >= 2).await;
    assert!(got.messages_accepted >= 2);
    assert!(w.upstream.messages().iter().any(|m| m.data_str().contains("during revocation")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_invalid_grant_is_asked_again_before_anyone_must_sign_in() {
    let w = World::start_with(delegated("device_code"), |_| {}).await;
    w.idp.set_access_token_lifetime(Duration::from_secs(4));
    assert_eq!(device_login(&w, true).await.0, 0);
    // Entra refuses the next refresh with a code that names no certain cause.
    w.idp.refuse_refreshes(1, AadError::new(70000, "The provided grant is invalid or malformed."));
    let refused = w.idp.token_requests(Grant::RefreshToken) + 1;
    let deadline = std::time::Instant::now() + WAIT;
    while w.idp.token_requests(Grant::RefreshToken) < refused {
        assert!(std::time::Instant::now() < deadline, "no refresh\n{}", w.relay.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The token has expired by now; the device's scan is kept, not refused with "sign in".
    tokio::time::sleep(Duration::from_secs(4)).await;
    let r = w.send(&login(), &scan_message("during the doubt", "kept")).await;
    assert!(r.ok && r.message.contains("queued"), "{r:?}\n{}", w.relay.log());
    let (_, status, _) = w.relay.cli(&["auth", "status"], None);
    assert!(!status.contains("needs_login") && status.contains("asking again"), "{status}");
    assert_eq!(w.idp.token_requests(Grant::RefreshToken), refused, "no second request within the minute");
    // A minute later the provider is asked again, says yes, and the scan goes out.
    let got = w.upstream.wait_until(Duration::from_secs(90), "the kept scan", |s| s.messages_accepted >= 1).await;
    assert!(got.messages_accepted >= 1);
    let (_, status, _) = w.relay.cli(&["auth", "status"], None);
    assert!(status.contains("ready"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegate_signs_in_for_a_shared_mailbox_and_xoauth2_names_the_delegate() {
    // scans@ is a shared mailbox: no one signs in as it; alice has Send As on it.
    const ALICE: &str = "alice@contoso.test";
    let w = World::start_with(
        |e| {
            let credentials = format!("client_id = \"{CLIENT_ID}\"\n");
            let scopes = "\"https://outlook.office.com/SMTP.Send\", \"offline_access\", \"openid\", \"profile\"";
            sections(e, &credentials, scopes, "device_code")
        },
        |_| {},
    )
    .await;
    // Short-lived tokens: the background refresher renews them within seconds.
    w.idp.set_access_token_lifetime(Duration::from_secs(4));
    let (code, out) = device_login_as(&w, Some(ALICE)).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("Signed in as {ALICE}")) && out.contains("shared mailbox"), "{out}");
    let (_, status, _) = w.relay.cli(&["auth", "status"], None);
    assert!(status.contains(ALICE), "who actually signed in: {status}");

    let r = w.send(&login(), &scan_message("from the shared mailbox", "x")).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", w.relay.log());
    let got = w.upstream.wait_for_messages(1, WAIT).await;
    // XOAUTH2 user= the token's owner; the shared address only in MAIL FROM.
    assert_eq!(got[0].user.as_deref(), Some(ALICE));
    assert_eq!(got[0].from, SCANS);
    assert_eq!(w.upstream.stats().auth_failures, 0, "right the first time");
    assert!(w.relay.log().contains("fine for a shared mailbox"), "{}", w.relay.log());

    // A refresh brings no ID token: the account from the sign-in stays.
    let deadline = std::time::Instant::now() + WAIT;
    while w.idp.tokens_issued(Grant::RefreshToken) == 0 {
        assert!(std::time::Instant::now() < deadline, "no refresh\n{}", w.relay.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = w.send(&login(), &scan_message("after a refresh", "x")).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", w.relay.log());
    let got = w.upstream.wait_for_messages(2, WAIT).await;
    assert_eq!(got[1].user.as_deref(), Some(ALICE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_signed_in_before_openid_was_asked_for_keeps_refreshing() {
    // Signed in with the scopes of an older relay (no openid/profile), then the relay asks for
    // them too: Entra refuses a refresh that asks for more than the sign-in granted.
    let w = World::start_with(delegated("device_code"), |_| {}).await;
    w.idp.set_access_token_lifetime(Duration::from_secs(4));
    assert_eq!(device_login(&w, true).await.0, 0);
    let config = std::fs::read_to_string(&w.relay.config).unwrap().replace(
        "\"https://outlook.office.com/SMTP.Send\", \"offline_access\"",
        "\"https://outlook.office.com/SMTP.Send\", \"offline_access\", \"openid\", \"profile\"",
    );
    std::fs::write(&w.relay.config, config).unwrap();
    let (code, out, err) = w.relay.cli(&["reload"], None);
    assert_eq!(code, 0, "{out}{err}");
    let before = w.idp.tokens_issued(Grant::RefreshToken);
    let deadline = std::time::Instant::now() + WAIT;
    while w.idp.tokens_issued(Grant::RefreshToken) <= before {
        assert!(std::time::Instant::now() < deadline, "no refresh succeeded\n{}", w.relay.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, status, _) = w.relay.cli(&["auth", "status"], None);
    assert!(status.contains("ready") && !status.contains("needs_login"), "{status}");
    let r = w.send(&login(), &scan_message("after the upgrade", "x")).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", w.relay.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_store_is_encrypted() {
    let w = World::start_with(delegated("device_code"), |_| {}).await;
    assert_eq!(device_login(&w, true).await.0, 0);
    assert!(w.send(&login(), &scan_message("one", "x")).await.ok);
    w.upstream.wait_for_messages(1, WAIT).await;
    let access = w.upstream.auth_attempts().iter().find(|a| a.success).and_then(|a| a.token.clone()).unwrap();
    let refresh_tokens = w.idp.refresh_tokens_of(SCANS);
    assert!(!refresh_tokens.is_empty());
    let mut relay = w.relay;
    relay.stop();
    // Not in any file of the data directory, in any form.
    for entry in walk(&relay.dir.join("data")) {
        let bytes = std::fs::read(&entry).unwrap();
        for secret in std::iter::once(&access).chain(refresh_tokens.iter()) {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} in clear in {}",
                entry.display()
            );
        }
    }
    assert!(!relay.log().contains(&access), "an access token reached the log");
    // The wrong key is a clear error, not garbage.
    let out = std::process::Command::new(common::relay::binary())
        .args(["auth", "status", "-c"])
        .arg(&relay.config)
        .env("MFD_RELAY_KEY", "00".repeat(32))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("does not decrypt"), "{text}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_google_device_code_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"x\"\n\n[[identity]]\nname = \"gmail\"\nprovider = \"g\"\nemail = \"a@example.com\"\nflow = \"device_code\"\n",
    )
    .unwrap();
    let (code, out, _) = common::relay::run_cli(&config, &["check"], None);
    assert_eq!(code, 1);
    assert!(out.contains("config.toml:10:") && out.contains("auth_code"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_code_sign_in_pending_across_a_reload_reaches_the_new_identity() {
    let w = World::start_with(delegated("device_code"), |_| {}).await;
    let config = w.relay.config.clone();
    let cli = tokio::task::spawn_blocking(move || CliProc::start(&config, &["auth", "login", "scans"])).await.unwrap();
    let code = w.idp.wait_for_user_code(WAIT).await;
    // The identity's settings change while the admin signs in: the reload replaces its slot.
    let text = std::fs::read_to_string(&w.relay.config).unwrap();
    let text = text.replacen("flow = \"device_code\"\n", "flow = \"device_code\"\nmessages_per_minute = 100\n", 1);
    std::fs::write(&w.relay.config, text).unwrap();
    let (rc, out, err) = w.relay.cli(&["reload"], None);
    assert_eq!(rc, 0, "{out}{err}");
    w.idp.approve_device(&code, SCANS);
    let (rc, out) = tokio::task::spawn_blocking(move || cli.wait(Duration::from_secs(60))).await.unwrap();
    assert_eq!(rc, 0, "{out}");
    // The running configuration's identity has the tokens: mail flows at once.
    let r = w.send(&login(), &scan_message("after a reload", "x")).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}\n{}", w.relay.log());
}
