//! The status page acting (issue 16), end to end with the real binary: headless Chromium
//! (Debian's `chromium` and `chromedriver`, driven by tests/clients/status_page.py with
//! selenium) clicks through a token request, a device-code sign-in, queue retry / drop /
//! retry all and a test mail, then an authorization-code sign-in that leaves for the fake
//! provider and comes back to `/status`; the admin listener asks for basic auth throughout.
//! And the page's POSTs refused when they come from another site, as plain HTTP requests.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::common::fake_oauth::Grant;
use crate::common::relay::{endpoints, scan_message, standard_sections, Relay, World, CLIENT_ID, SCANS};

const USER: &str = "it";
const PASSWORD: &str = "page password";
/// The account that approves the device code: not the identity's mailbox.
const ALICE: &str = "alice@contoso.test";
const DESK: &str = "desk@contoso.test";
const WEB: &str = "web@contoso.test";
/// The whole browser run (Chromium's start included) must end within this.
const BROWSER_BUDGET: Duration = Duration::from_secs(75);
/// Whether this relay has `POST /api/test` (the test-mail API): the page's test mail is then
/// delivered; without it the page says the relay has none.
const TEST_MAIL_API: bool = true;
const TEST_TO: &str = "me@contoso.test";

use crate::common::relay::http_request as request;

fn basic() -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}")))
}

/// GET with the admin's basic-auth credentials.
fn get(relay: &Relay, path: &str) -> (u16, String) {
    let host = format!("127.0.0.1:{}", relay.admin_port);
    let auth = basic();
    let (code, _, body) = request(relay.admin_port, "GET", path, &[("Host", &host), ("Authorization", &auth)], "");
    (code, body)
}

fn queue_ids(relay: &Relay) -> Vec<String> {
    let (code, body) = get(relay, "/api/queue");
    assert_eq!(code, 200, "{body}");
    ids_of(&body)
}

/// The queue ids (16 hex digits, as the page shows them) in an `/api/queue` answer: a list of
/// records, or a page of them (the first list in an object).
fn ids_of(body: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let list = match &v {
        serde_json::Value::Array(a) => a.clone(),
        serde_json::Value::Object(o) => o.values().find_map(|x| x.as_array().cloned()).unwrap_or_default(),
        other => panic!("not a queue: {other}"),
    };
    list.iter()
        .map(|m| match &m["id"] {
            serde_json::Value::Number(n) => format!("{:016X}", n.as_u64().unwrap()),
            serde_json::Value::String(s) => s.clone(),
            other => panic!("not a queue id: {other}"),
        })
        .collect()
}

/// The fakes, the standard devices and identity `scans` (client credentials), plus
/// `desk` (device code) and `web` (authorization code) on a delegated app; retries an hour
/// apart (only the page's buttons retry); basic auth on the admin listener.
async fn world() -> World {
    let mut w = World::start_with(
        |e| {
            format!(
                "{}\n{}\n[[provider]]\nname = \"delegated\"\nkind = \"generic\"\nclient_id = \"{CLIENT_ID}\"\n{}\
                 scopes = [\"https://outlook.office.com/SMTP.Send\", \"offline_access\", \"openid\"]\n\
                 smtp = \"127.0.0.1:{}\"\nsmtp_tls = \"starttls\"\nca_file = \"{}\"\n\n\
                 [[identity]]\nname = \"desk\"\nprovider = \"delegated\"\nemail = \"{DESK}\"\nflow = \"device_code\"\n\n\
                 [[identity]]\nname = \"web\"\nprovider = \"delegated\"\nemail = \"{WEB}\"\nflow = \"auth_code\"\n",
                e.provider,
                standard_sections(),
                endpoints(e.idp),
                e.smtp_port,
                e.ca.display()
            )
        },
        |_| {},
    )
    .await;
    w.idp.set_device_poll_interval(1);
    w.idp.set_authorize_account(Some(WEB));
    let hash = mfd_relay::credentials::hash(PASSWORD).unwrap();
    let relay = &mut w.relay;
    tokio::task::block_in_place(|| {
        relay.stop();
        let text = std::fs::read_to_string(&relay.config).unwrap();
        let text = text
            .replacen("retry_first = \"1s\"\nretry_max = \"2s\"\n", "retry_first = \"1h\"\nretry_max = \"1h\"\n", 1)
            .replacen(
                "[admin]\n",
                &format!("[admin]\ntoken = \"admin-token-for-tests\"\nbasic_auth_user = \"{USER}\"\nbasic_auth_password_hash = \"{hash}\"\n"),
                1,
            );
        std::fs::write(&relay.config, text).unwrap();
        relay.spawn();
    });
    w
}

fn floor3() -> Vec<&'static str> {
    vec!["--auth", "PLAIN", "--user", "floor3", "--password", "1234"]
}

/// Where the screenshots go: under cargo's temporary directory for integration tests
/// (`target/tmp`), kept after the test.
fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status_page");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_signs_in_retries_drops_and_tests_through_real_clicks() {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(Path::new(tool).exists(), "{tool} is missing: tests/interop/install.sh installs it");
    }
    let w = world().await;
    let relay = &w.relay;

    // Three messages wait in the queue (the provider's SMTP is down); their ids in order.
    w.upstream.down().await;
    let mut queued = Vec::new();
    for subject in ["q1", "q2", "q3"] {
        let r = w.send(&floor3(), &scan_message(subject, "x")).await;
        assert!(r.ok && r.message.contains("queued"), "{r:?}");
        let ids = queue_ids(relay);
        let new = ids.iter().find(|id| !queued.iter().any(|(_, q)| q == *id)).unwrap().clone();
        queued.push((subject, new));
    }
    let tokens_before = w.idp.tokens_issued(Grant::ClientCredentials);

    let out = screenshot_dir();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/status_page.py");
    let ids: Vec<&str> = queued.iter().map(|(_, id)| id.as_str()).collect();
    let mut child = Command::new("timeout")
        .arg(BROWSER_BUDGET.as_secs().to_string())
        .arg("python3")
        .arg(&script)
        .args(["--base", &format!("http://localhost:{}", relay.admin_port)])
        .arg("--out")
        .arg(&out)
        .args(["--user", USER, "--password", PASSWORD])
        .args(["--queued", &ids.join(",")])
        .args(["--app-account", SCANS, "--device-account", ALICE, "--device-mailbox", DESK, "--web-account", WEB])
        .args(["--test-to", TEST_TO, "--test-mail", if TEST_MAIL_API { "delivered" } else { "missing" }])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let started = Instant::now();
    let mut seen = Vec::new();
    let mut outcome = None;
    while outcome.is_none() {
        let left = (started + BROWSER_BUDGET + Duration::from_secs(5)).saturating_duration_since(Instant::now());
        let line = match tokio::task::block_in_place(|| rx.recv_timeout(left)) {
            Ok(line) => line,
            Err(_) => break,
        };
        seen.push(line.clone());
        let (word, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match word {
            "SCREENSHOT" => println!("status page screenshot: {rest}"),
            "USER_CODE" => {
                // The code on the page is the one the provider issued; the person approves it
                // (as another account than the mailbox).
                let issued = w.idp.user_codes();
                assert!(issued.iter().any(|c| c == rest), "page shows {rest:?}, provider issued {issued:?}");
                w.idp.approve_device(rest, ALICE);
                writeln!(stdin, "go").unwrap();
            }
            "WAIT" if rest == "retry-all" => {
                w.upstream.up().await;
                writeln!(stdin, "go").unwrap();
            }
            "WAIT" if rest == "slow-final" => {
                w.upstream.set_data_delay(Duration::from_secs(2));
                writeln!(stdin, "go").unwrap();
            }
            "OK" => outcome = Some(Ok(())),
            "FAIL" => outcome = Some(Err(rest.to_string())),
            _ => {}
        }
    }
    drop(stdin);
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    let elapsed = started.elapsed();
    let stderr = errors.join().unwrap_or_default();
    println!("browser run: {:.1} s", elapsed.as_secs_f64());
    match outcome {
        Some(Ok(())) => assert!(status.success(), "{status}"),
        other => panic!(
            "the browser run failed ({other:?}, {status}) after {elapsed:?}\nscript output:\n{}\nstderr:\n{stderr}\nrelay log:\n{}",
            seen.join("\n"),
            relay.log()
        ),
    }

    // What the clicks did, seen from the relay and the fakes.
    assert!(w.idp.tokens_issued(Grant::ClientCredentials) > tokens_before, "Fetch a token now asked the provider");
    let (_, auth) = get(relay, "/api/auth/status");
    let auth: serde_json::Value = serde_json::from_str(&auth).unwrap();
    let identity = |name: &str| auth.as_array().unwrap().iter().find(|i| i["name"] == name).unwrap().clone();
    assert_eq!(identity("desk")["account"], ALICE, "{auth}");
    assert_eq!(identity("desk")["mailbox"], DESK, "{auth}");
    assert_eq!(identity("desk")["state"], "ready", "{auth}");
    assert_eq!(identity("web")["account"], WEB, "{auth}");
    assert_eq!(identity("web")["state"], "ready", "{auth}");
    assert!(queue_ids(relay).is_empty());
    let expected = if TEST_MAIL_API { 3 } else { 2 };
    let got = w.upstream.wait_for_messages(expected, Duration::from_secs(10)).await;
    let (tests, got): (Vec<_>, Vec<_>) = got.into_iter().partition(|m| m.rcpts.iter().any(|r| r == TEST_TO));
    assert_eq!(tests.len(), usize::from(TEST_MAIL_API), "the test mail from the page reached the provider");
    let subjects: Vec<String> = got
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.data).to_string();
            text.lines().find_map(|l| l.strip_prefix("Subject: ").map(str::to_string)).unwrap_or_default()
        })
        .collect();
    assert_eq!(got.len(), 2, "{subjects:?}");
    assert!(subjects.contains(&"q1".into()) && subjects.contains(&"q3".into()), "{subjects:?}");
    assert!(!subjects.contains(&"q2".into()), "the dropped message was not delivered: {subjects:?}");
}

/// The page's requests as another site would send them: refused before they act.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_posts_are_refused_from_another_site() {
    let w = World::start(|_| {}).await;
    w.upstream.down().await;
    let r = w.send(&floor3(), &scan_message("kept", "x")).await;
    assert!(r.ok && r.message.contains("queued"), "{r:?}");
    let port = w.relay.admin_port;
    let relay = &w.relay;
    let id = queue_ids_open(port)[0].clone();
    let tokens_before = w.idp.tokens_issued(Grant::ClientCredentials);
    let own = format!("127.0.0.1:{port}");
    let origin = format!("http://{own}");
    let json = ("Content-Type", "application/json");
    let paths = [
        "/api/auth/login/scans".to_string(),
        format!("/api/queue/retry/{id}"),
        "/api/queue/retry/all".to_string(),
        format!("/api/queue/drop/{id}"),
        "/api/test".to_string(),
    ];
    let body = r#"{"device":"floor3","to":"someone@contoso.test"}"#;
    tokio::task::block_in_place(|| {
        for path in &paths {
            let post = |headers: &[(&str, &str)]| {
                let mut hs = vec![("Host", own.as_str())];
                hs.extend_from_slice(headers);
                request(port, "POST", path, &hs, body)
            };
            // A script on another site, a form posted from it, a sandboxed frame (`null`).
            let (code, _, text) = post(&[json, ("Origin", "https://attacker.example")]);
            assert_eq!(code, 403, "{path}: {text}");
            assert_eq!(post(&[json, ("Origin", "null")]).0, 403, "{path}");
            assert_eq!(post(&[json, ("Sec-Fetch-Site", "cross-site")]).0, 403, "{path}");
            assert_eq!(post(&[json, ("Origin", &format!("http://127.0.0.1:{}", port + 1))]).0, 403, "{path}");
            assert_eq!(
                post(&[("Content-Type", "application/x-www-form-urlencoded"), ("Origin", origin.as_str())]).0,
                415,
                "{path}"
            );
            assert_eq!(post(&[("Content-Type", "text/plain")]).0, 415, "{path}");
            // DNS rebinding: the page's own origin, but under the attacker's name.
            let rebound = format!("attacker.example:{port}");
            let (code, _, _) = request(
                port,
                "POST",
                path,
                &[("Host", &rebound), json, ("Origin", &format!("http://{rebound}"))],
                body,
            );
            assert_eq!(code, 421, "{path}");
        }
        // Nothing happened: the message is still there, no token was asked for.
        assert_eq!(queue_ids_open(port), vec![id.clone()]);
        assert_eq!(w.idp.tokens_issued(Grant::ClientCredentials), tokens_before);
        // The same request from the page itself passes the guard.
        let (code, _, text) = request(
            port,
            "POST",
            &format!("/api/queue/drop/{id}"),
            &[("Host", &own), json, ("Origin", &origin), ("Sec-Fetch-Site", "same-origin")],
            "{}",
        );
        assert_eq!(code, 200, "{text}\n{}", relay.log());
        assert!(queue_ids_open(port).is_empty());

        // The page runs its own script only: the CSP names it by hash.
        let (code, head, page) = request(port, "GET", "/status", &[("Host", &own)], "");
        assert_eq!(code, 200);
        let csp = head.lines().find(|l| l.starts_with("content-security-policy:")).unwrap_or_default().to_string();
        let script_src = csp.split(';').find(|d| d.trim().starts_with("script-src")).unwrap_or_default();
        assert!(script_src.trim().starts_with("script-src 'sha256-"), "{csp}");
        assert!(!script_src.contains("unsafe") && !script_src.contains("'self'"), "only the page's own script: {csp}");
        assert!(page.contains("<noscript><meta http-equiv=refresh content=30></noscript>"));
        // The return from a sign-in with an unknown state stays an error page, not /status.
        let (code, _, page) = request(port, "GET", "/oauth/callback?code=x&state=forged", &[("Host", &own)], "");
        assert_eq!(code, 400, "{page}");
        assert!(page.contains("Sign-in failed"), "{page}");
    });
}

/// `/api/queue` on a listener without credentials.
fn queue_ids_open(port: u16) -> Vec<String> {
    let own = format!("127.0.0.1:{port}");
    let (code, _, body) = request(port, "GET", "/api/queue", &[("Host", &own)], "");
    assert_eq!(code, 200, "{body}");
    ids_of(&body)
}
