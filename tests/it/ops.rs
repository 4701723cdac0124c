//! Operations, end to end: the real relay binary between the fakes, real SMTP traffic from
//! Python's smtplib, then what an operator sees: `/metrics` scraped and parsed (the counters
//! moved by exactly what was sent), the `/status` page, the admin listener's access rules, and
//! the deployment files in `deploy/` (checked by `deploy/check.py`).
//!
//! `MFD_RELAY_SCREENSHOT=/tmp/status.png cargo test --test it ops::status_page` also renders the
//! status page in headless Chromium (Debian package `chromium`) and writes the screenshot.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::fake_smtp::{replies, Times};
use crate::common::relay::{pin_hash, scan_message, standard_sections, World, CLIENT_SECRET};

const WAIT: Duration = Duration::from_secs(20);
const ADMIN_TOKEN: &str = "ops-test-admin-token";

fn login(user: &'static str, pin: &'static str) -> Vec<&'static str> {
    vec!["--auth", "PLAIN", "--user", user, "--password", pin]
}

/// The standard sections plus an identity nobody signed in yet ("print", device code flow),
/// a device that sends as it ("annex"), and a mobile-print mailbox.
fn sections(provider: &str) -> String {
    let h = pin_hash();
    // The mailbox's server is never reached: its identity is not signed in.
    format!(
        "{provider}imap = \"127.0.0.1:1\"\nimap_tls = \"none\"\n\n{}\n\
         [[identity]]\nname = \"print\"\nprovider = \"fake\"\nemail = \"print@contoso.test\"\nflow = \"device_code\"\n\n\
         [[device]]\nname = \"annex\"\nidentity = \"print\"\nusername = \"annex\"\npin_hash = \"{h}\"\n\n\
         [[mailbox]]\nname = \"mobile-print\"\nidentity = \"print\"\nspool = \"data/print\"\n",
        standard_sections()
    )
}

async fn start() -> World {
    World::start_with(|env| sections(env.provider), |_| {}).await
}

// ---------------------------------------------------------------------------
// HTTP and the Prometheus text format
// ---------------------------------------------------------------------------

/// A GET with extra header lines; returns (status, head in lower case, body).
fn http(port: u16, path: &str, headers: &[&str]) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// One sample of a scrape.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// A parsed `/metrics` answer (Prometheus text format 0.0.4).
struct Scrape(Vec<Sample>);

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut out = Vec::new();
        for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), Vec::new()),
                Some((name, rest)) => (name.to_string(), parse_labels(rest.strip_suffix('}').unwrap())),
            };
            out.push(Sample { name, labels, value });
        }
        Scrape(out)
    }

    /// The value of the series with exactly these labels; 0 when it does not exist (yet).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|(k, v)| s.labels.iter().any(|(k2, v2)| k2 == k && v2 == v))
            })
            .map(|s| s.value)
            .unwrap_or(0.0)
    }

    /// The sum over every series of `name` that has these labels (and maybe others).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|s| {
                s.name == name && labels.iter().all(|(k, v)| s.labels.iter().any(|(k2, v2)| k2 == k && v2 == v))
            })
            .map(|s| s.value)
            .sum()
    }

    fn has(&self, name: &str) -> bool {
        self.0.iter().any(|s| s.name == name)
    }
}

/// `a="x",b="y\"z"` into pairs.
fn parse_labels(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if key.is_empty() {
            return out;
        }
        assert_eq!(chars.next(), Some('"'), "label {key} has no quoted value in {text:?}");
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => break,
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').to_string(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
}

fn scrape(w: &World) -> Scrape {
    let (code, body) = w.relay.admin_get("/metrics");
    assert_eq!(code, 200, "{body}");
    Scrape::parse(&body)
}

/// Scrapes until `cond` holds (the queue works in the background); returns that scrape.
async fn scrape_until(w: &World, what: &str, cond: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + WAIT;
    loop {
        let m = scrape(w);
        if cond(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "{what} did not happen within {WAIT:?}\n{}", w.relay.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn the_scrape_parser_reads_the_text_format() {
    let m = Scrape::parse(
        "# HELP x_total help\n# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"uote\"} 3\nx_total{a=\"2\"} 4\ny 1.5e3\nz_bucket{le=\"+Inf\"} 7\n",
    );
    assert_eq!(m.get("x_total", &[("b", "q\"uote"), ("a", "1")]), 3.0);
    assert_eq!(m.get("x_total", &[("a", "1")]), 0.0, "exact label set only");
    assert_eq!(m.sum("x_total", &[]), 7.0);
    assert_eq!(m.get("y", &[]), 1500.0);
    assert_eq!(m.get("z_bucket", &[("le", "+Inf")]), 7.0);
    assert!(m.has("y") && !m.has("nope"));
}

// ---------------------------------------------------------------------------
// Metrics after real traffic
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_real_traffic() {
    let w = start().await;
    let listener = format!("127.0.0.1:{}", w.relay.smtp_port);
    let l = listener.as_str();

    let m = scrape(&w);
    assert_eq!(m.get("mfd_relay_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert_eq!(m.get("mfd_relay_identity_state", &[("identity", "scans")]), 1.0, "app-only: ready");
    assert_eq!(m.get("mfd_relay_identity_state", &[("identity", "print")]), 0.0);
    assert!(m.0.iter().any(|s| s.name == "mfd_relay_identity_state" && s.labels[0].1 == "print"), "print is exported");
    assert_eq!(m.get("mfd_relay_queue_depth", &[]), 0.0);
    assert!(m.has("mfd_relay_queue_oldest_age_seconds"));
    assert_eq!(m.get("mfd_relay_message_size_bytes_count", &[]), 0.0);
    // (The test harness connects once to see that the relay listens.)
    let connections_before = m.get("mfd_relay_smtp_connections_total", &[("listener", l)]);

    // Deliveries while the device waits: two from a device that logs in, one known by address.
    let mut sent_bytes = 0;
    for i in 0..2 {
        let body = scan_message(&format!("scan {i}"), &"x".repeat(5000));
        sent_bytes += body.len();
        let r = w.send(&login("floor3", "1234"), &body).await;
        assert!(r.ok && r.message.contains("delivered"), "{r:?}");
    }
    let body = scan_message("lobby", "y");
    sent_bytes += body.len();
    let r = w.send(&["--source", "127.0.0.2"], &body).await;
    assert!(r.ok && r.message.contains("delivered"), "{r:?}");

    let m = scrape(&w);
    assert_eq!(m.get("mfd_relay_messages_accepted_total", &[("device", "floor3"), ("identity", "scans")]), 2.0);
    assert_eq!(m.get("mfd_relay_messages_accepted_total", &[("device", "lobby"), ("identity", "scans")]), 1.0);
    assert_eq!(
        m.get("mfd_relay_messages_delivered_total", &[("identity", "scans"), ("path", "session"), ("via", "smtp")]),
        3.0
    );
    assert_eq!(m.get("mfd_relay_upstream_latency_seconds_count", &[("identity", "scans")]), 3.0);
    let latency = m.get("mfd_relay_upstream_latency_seconds_sum", &[("identity", "scans")]);
    assert!(latency > 0.0 && latency < 30.0, "{latency}");
    assert_eq!(m.get("mfd_relay_upstream_latency_seconds_bucket", &[("identity", "scans"), ("le", "+Inf")]), 3.0);
    assert_eq!(m.get("mfd_relay_message_size_bytes_count", &[]), 3.0);
    let size_sum = m.get("mfd_relay_message_size_bytes_sum", &[]);
    assert!(size_sum >= sent_bytes as f64 && size_sum < sent_bytes as f64 + 3.0 * 2048.0, "{size_sum} vs {sent_bytes}");
    assert_eq!(m.get("mfd_relay_message_size_bytes_bucket", &[("le", "4000")]), 1.0, "the small lobby scan");
    assert_eq!(m.get("mfd_relay_message_size_bytes_bucket", &[("le", "16000")]), 3.0);
    assert!(m.get("mfd_relay_token_refreshes_total", &[("identity", "scans"), ("result", "ok")]) >= 1.0);
    assert_eq!(m.get("mfd_relay_token_refreshes_total", &[("identity", "scans"), ("result", "error")]), 0.0);
    let now = common::unix_now() as f64;
    let expiry = m.get("mfd_relay_token_expiry_timestamp_seconds", &[("identity", "scans")]);
    assert!(expiry > now + 60.0, "{expiry} vs {now}");
    assert!(m.get("mfd_relay_token_expires_in_seconds", &[("identity", "scans")]) > 60.0);
    let connections = m.get("mfd_relay_smtp_connections_total", &[("listener", l)]);
    // One per send; the harness's probe may not have been counted yet at the first scrape.
    let probe_late = connections_before == 0.0 && connections == 4.0;
    assert!(connections - connections_before == 3.0 || probe_late, "{connections_before} then {connections}");
    assert_eq!(m.get("mfd_relay_smtp_sessions_active", &[("listener", l)]), 0.0);

    // Refusals: wrong PIN, unknown user (auth failures by listener), a recipient outside the
    // allow-list, an address that is no device, a device whose identity needs a sign-in.
    assert_eq!(w.send(&login("floor3", "9999"), &scan_message("x", "y")).await.code, Some(535));
    assert_eq!(w.send(&login("nobody", "1234"), &scan_message("x", "y")).await.code, Some(535));
    let r = w
        .send(&["--auth", "PLAIN", "--user", "restricted", "--password", "1234", "--to", "x@elsewhere.test"], b"x")
        .await;
    assert_eq!(r.code, Some(550), "{r:?}");
    assert_eq!(w.send(&[], &scan_message("x", "y")).await.code, Some(550));
    let r = w.send(&login("annex", "1234"), &scan_message("x", "y")).await;
    assert_eq!((r.code, r.stage.as_str()), (Some(451), "mail"), "{r:?}");

    let m = scrape(&w);
    assert_eq!(m.get("mfd_relay_auth_failures_total", &[("listener", l)]), 2.0);
    let rejected =
        |device, reason| m.get("mfd_relay_messages_rejected_total", &[("device", device), ("reason", reason)]);
    assert_eq!(rejected("restricted", "recipient_not_allowed"), 1.0);
    assert_eq!(rejected("unknown", "not_a_device"), 1.0);
    assert_eq!(rejected("annex", "needs_login"), 1.0);
    assert_eq!(m.sum("mfd_relay_messages_rejected_total", &[]), 3.0);
    assert_eq!(m.sum("mfd_relay_messages_accepted_total", &[]), 3.0, "refusals accept nothing");

    // A permanent refusal upstream reaches the device: failed, via the reply.
    w.upstream.set_data_reply(replies::SEND_AS_DENIED, Times::Next(1));
    assert_eq!(w.send(&login("floor3", "1234"), &scan_message("denied", "z")).await.code, Some(554));
    let m = scrape(&w);
    assert_eq!(m.get("mfd_relay_messages_failed_total", &[("identity", "scans"), ("via", "reply")]), 1.0);
    assert_eq!(m.get("mfd_relay_messages_accepted_total", &[("device", "floor3"), ("identity", "scans")]), 3.0);

    // A transient reply: deferred (upstream_4xx), then delivered from the queue.
    w.upstream.set_data_reply(replies::TRANSIENT, Times::Next(1));
    let r = w.send(&login("floor3", "1234"), &scan_message("transient", "z")).await;
    assert!(r.ok && r.message.contains("queued"), "{r:?}");
    let m = scrape_until(&w, "delivery from the queue", |m| {
        m.get("mfd_relay_messages_delivered_total", &[("identity", "scans"), ("path", "queue"), ("via", "smtp")]) == 1.0
    })
    .await;
    assert_eq!(m.get("mfd_relay_messages_deferred_total", &[("identity", "scans"), ("reason", "upstream_4xx")]), 1.0);

    // Upstream down: deferred (network), the queue holds it and ages; back up: delivered.
    w.upstream.down().await;
    let r = w.send(&login("floor3", "1234"), &scan_message("while down", "z")).await;
    assert!(r.ok && r.message.contains("queued"), "{r:?}");
    let m = scrape_until(&w, "queue age", |m| m.get("mfd_relay_queue_oldest_age_seconds", &[]) >= 1.0).await;
    assert_eq!(m.get("mfd_relay_queue_depth", &[]), 1.0);
    assert!(m.get("mfd_relay_messages_deferred_total", &[("identity", "scans"), ("reason", "network")]) >= 1.0);
    w.upstream.up().await;
    let m = scrape_until(&w, "the queue to drain", |m| {
        m.get("mfd_relay_messages_delivered_total", &[("identity", "scans"), ("path", "queue"), ("via", "smtp")]) == 2.0
            && m.get("mfd_relay_queue_depth", &[]) == 0.0
    })
    .await;
    assert_eq!(m.get("mfd_relay_queue_oldest_age_seconds", &[]), 0.0);

    // Totals: six accepted, each measured once; one failed; five delivered.
    assert_eq!(m.sum("mfd_relay_messages_accepted_total", &[]), 6.0);
    assert_eq!(m.get("mfd_relay_message_size_bytes_count", &[]), 6.0);
    assert_eq!(m.sum("mfd_relay_messages_delivered_total", &[]), 5.0);
    assert_eq!(m.sum("mfd_relay_messages_failed_total", &[]), 1.0);
    let attempts = m.get("mfd_relay_upstream_latency_seconds_count", &[("identity", "scans")]);
    assert!(attempts >= 7.0, "at least one attempt per delivery, failure and deferral: {attempts}");
    assert_eq!(w.upstream.messages().len(), 5);

    // Label values come from the configuration only: nothing from the network got in.
    let allowed = ["floor3", "lobby", "restricted", "annex", "unknown", "scans", "print", "fake", "mobile-print", l];
    for s in &m.0 {
        for (k, v) in &s.labels {
            if ["device", "identity", "listener", "provider", "mailbox"].contains(&k.as_str()) {
                assert!(allowed.contains(&v.as_str()), "{k}={v} in {s:?}");
            }
        }
    }
    let text = w.relay.admin_get("/metrics").1;
    assert!(!text.contains("fake-at-") && !text.contains(CLIENT_SECRET), "a secret in the metrics");
}

// ---------------------------------------------------------------------------
// The status page
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_identities_devices_queue_and_mailboxes() {
    let w = start().await;
    for i in 0..2 {
        assert!(w.send(&login("floor3", "1234"), &scan_message(&format!("s{i}"), "x")).await.ok);
    }
    assert_eq!(w.send(&login("floor3", "0000"), &scan_message("x", "y")).await.code, Some(535));
    assert_eq!(w.send(&login("annex", "1234"), &scan_message("x", "y")).await.code, Some(451));
    w.upstream.down().await;
    let r = w.send(&login("floor3", "1234"), &scan_message("queued", "x")).await;
    assert!(r.ok && r.message.contains("queued"), "{r:?}");

    let (code, head, page) = http(w.relay.admin_port, "/status", &[]);
    assert_eq!(code, 200, "{page}");
    assert!(head.contains("content-type: text/html"), "{head}");
    // The summary says what to do.
    assert!(page.contains("Needs attention"), "{page}");
    assert!(page.contains("Identity <b>print</b> needs a sign-in: run <code>mfd-relay auth login print</code>"));
    // Identities: state and token expiry.
    assert!(page.contains("<b>scans</b>") && page.contains("scans@contoso.test"), "{page}");
    assert!(page.contains("<span class=\"b ok\">ready</span>") && page.contains("expires in "), "{page}");
    assert!(page.contains("<span class=\"b bad\">needs sign-in</span>"), "{page}");
    // Devices: last seen, messages today, last error.
    let row = |name: &str| {
        let start = page.find(&format!("<tr><td><b>{name}</b>")).unwrap_or_else(|| panic!("no row {name}: {page}"));
        page[start..start + page[start..].find("</tr>").unwrap()].to_string()
    };
    let floor3 = row("floor3");
    assert!(floor3.contains("just now") || floor3.contains("s ago"), "{floor3}");
    assert!(floor3.contains("<td class=n>3</td>"), "three accepted today: {floor3}");
    assert!(floor3.contains("delivery deferred"), "{floor3}");
    assert!(row("annex").contains("needs a new sign-in"), "{}", row("annex"));
    assert!(row("lobby").contains("never"), "{}", row("lobby"));
    assert!(row("lobby").contains("address <small>127.0.0.2/32</small>"));
    // The queue: depth, the waiting message.
    assert!(page.contains("Queue <small>1 message waiting · oldest "), "{page}");
    assert!(page.contains("floor3 → scans"), "{page}");
    // Mailboxes: last check.
    let mailbox = row("mobile-print");
    assert!(mailbox.contains("INBOX") && mailbox.contains("never"), "{mailbox}");
    // No secrets: no client secret, PIN hash or token.
    for secret in [CLIENT_SECRET, "$argon2", "fake-at-", "fake-rt-", "Bearer"] {
        assert!(!page.contains(secret), "{secret:?} on the status page");
    }

    if let Ok(png) = std::env::var("MFD_RELAY_SCREENSHOT") {
        screenshot(w.relay.admin_port, Path::new(&png));
    }
    w.upstream.up().await;
}

/// Renders /status in headless Chromium into `png`.
fn screenshot(port: u16, png: &Path) {
    let profile = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("http://127.0.0.1:{port}/status"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("chromium (apt-get install chromium)");
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let bytes = std::fs::read(png).expect("chromium wrote no screenshot");
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    eprintln!("status page screenshot: {}", png.display());
}

// ---------------------------------------------------------------------------
// Access to the admin listener
// ---------------------------------------------------------------------------

/// Adds keys to the `[admin]` section of the running relay's config and restarts it.
fn restart_with_admin_keys(w: &mut World, keys: &str) {
    w.relay.stop();
    let text = std::fs::read_to_string(&w.relay.config).unwrap();
    let text = text.replacen("[admin]\n", &format!("[admin]\n{keys}"), 1);
    std::fs::write(&w.relay.config, text).unwrap();
    w.relay.spawn();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_guards_everything_but_health_and_the_cli_still_works() {
    let mut w = start().await;
    tokio::task::block_in_place(|| restart_with_admin_keys(&mut w, &format!("token = \"{ADMIN_TOKEN}\"\n")));
    let port = w.relay.admin_port;
    let bearer = format!("Authorization: Bearer {ADMIN_TOKEN}");

    assert_eq!(http(port, "/healthz", &[]).0, 200);
    for path in ["/metrics", "/readyz", "/status", "/api/queue", "/api/auth/status"] {
        let (code, head, _) = http(port, path, &[]);
        assert_eq!(code, 401, "{path} without the token");
        assert!(head.contains("www-authenticate: bearer"), "{path}: {head}");
        assert_eq!(http(port, path, &["Authorization: Bearer wrong"]).0, 401, "{path}");
        let want = if path == "/readyz" { 503 } else { 200 }; // "print" needs a sign-in
        assert_eq!(http(port, path, &[bearer.as_str()]).0, want, "{path} with the token");
    }
    // Not in the query string: the token is header-only.
    assert_eq!(http(port, &format!("/metrics?token={ADMIN_TOKEN}"), &[]).0, 401);
    // A browser sent to /status learns how to get in.
    let (_, head, body) = http(port, "/status", &[]);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(body.contains("basic_auth_user") && body.contains("basic_auth_password_hash"), "{body}");
    // The CLI reads the token from the same config.
    let (code, out, err) = w.relay.cli(&["queue", "list"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("queue is empty"), "{out}");
    let (code, out, err) = w.relay.cli(&["auth", "status"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("print") && out.contains("scans"), "{out}");
}

/// Basic auth for a person with a browser (`[admin] basic_auth_user` and
/// `basic_auth_password_hash`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_opens_the_status_page_in_a_browser() {
    let mut w = start().await;
    let hash = mfd_relay::credentials::hash("correct horse battery").unwrap();
    let keys = format!("token = \"{ADMIN_TOKEN}\"\nbasic_auth_user = \"it\"\nbasic_auth_password_hash = \"{hash}\"\n");
    tokio::task::block_in_place(|| restart_with_admin_keys(&mut w, &keys));
    let port = w.relay.admin_port;
    let basic = |user: &str, pass: &str| format!("Authorization: Basic {}", common::b64(format!("{user}:{pass}")));

    let (code, head, body) = http(port, "/status", &[]);
    assert_eq!(code, 401);
    assert!(head.contains("www-authenticate: basic realm=\"mfd-relay admin\""), "{head}");
    assert!(body.contains("Sign in"), "{body}");
    assert_eq!(http(port, "/status", &[&basic("it", "wrong")]).0, 401);
    let (code, _, page) = http(port, "/status", &[&basic("it", "correct horse battery")]);
    assert_eq!(code, 200);
    assert!(page.contains("<b>floor3</b>") && !page.contains(&hash));
    // Prometheus and the CLI keep the token.
    assert_eq!(http(port, "/metrics", &[&format!("Authorization: Bearer {ADMIN_TOKEN}")]).0, 200);
    let (code, out, err) = w.relay.cli(&["queue", "list"], None);
    assert_eq!(code, 0, "{out}{err}");
    // `check` refuses a password hash that is not argon2.
    let text = std::fs::read_to_string(&w.relay.config).unwrap().replace(&hash, "plain-password");
    let bad = w.dir.path().join("bad.toml");
    std::fs::write(&bad, text).unwrap();
    let (code, out, err) = common::relay::run_cli(&bad, &["check"], None);
    assert_eq!(code, 1, "{out}{err}");
    assert!(format!("{out}{err}").contains("basic_auth_password_hash"), "{out}{err}");
}

#[test]
fn check_explains_each_providers_endpoints_and_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        r#"
[relay]
hostname = "relay.test"
data_dir = "data"

[[provider]]
name = "dod"
kind = "microsoft"
tenant = "contoso.onmicrosoft.us"
cloud = "usgov-dod"
client_id = "c"

[[identity]]
name = "scans"
provider = "dod"
email = "scans@contoso.us"
flow = "device_code"

[[listener]]
listen = "127.0.0.1:2525"
"#,
    )
    .unwrap();
    let (code, out, err) = common::relay::run_cli(&config, &["check", "--explain"], None);
    assert_eq!(code, 0, "{out}{err}");
    for line in [
        "token:         https://login.microsoftonline.us/contoso.onmicrosoft.us/oauth2/v2.0/token",
        "smtp:          outlook-dod.office365.us:587 (STARTTLS)",
        "imap:          outlook-dod.office365.us:993 (implicit TLS)",
        "identity \"scans\" (device_code, scans@contoso.us): scopes https://outlook-dod.office365.us/SMTP.Send offline_access openid profile",
    ] {
        assert!(out.contains(line), "{line}\n{out}");
    }
    // Without --explain, only the verdict.
    let (_, out, _) = common::relay::run_cli(&config, &["check"], None);
    assert!(!out.contains("token:"), "{out}");
}

// ---------------------------------------------------------------------------
// Deployment files
// ---------------------------------------------------------------------------

#[test]
fn deploy_files_pass_their_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("python3")
        .arg(root.join("deploy/check.py"))
        .args(["--bin", env!("CARGO_BIN_EXE_mfd-relay")])
        .current_dir(root)
        .output()
        .expect("python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.code() == Some(3) {
        eprintln!("SKIPPED: {text}");
        return;
    }
    assert!(out.status.success(), "deploy/check.py failed:\n{text}");
    assert!(text.contains("all checks passed"), "{text}");
}

/// rustls everywhere; the one OpenSSL is the system's OpenSSL 3 (for `legacy_tls` listeners),
/// linked dynamically so that Debian's security updates reach it, and nothing else.
#[test]
fn binary_links_only_the_system_openssl_3() {
    let bin = env!("CARGO_BIN_EXE_mfd-relay");
    let Ok(out) = std::process::Command::new("ldd").arg(bin).output() else {
        eprintln!("no ldd here; skipped");
        return;
    };
    let libs = String::from_utf8_lossy(&out.stdout);
    assert!(!libs.contains("not found"), "{libs}");
    for line in libs.lines().filter(|l| l.contains("libssl") || l.contains("libcrypto")) {
        assert!(line.contains("libssl.so.3") || line.contains("libcrypto.so.3"), "not OpenSSL 3: {line}");
    }
    assert!(libs.contains("libssl.so.3"), "the legacy listener's OpenSSL is the system's: {libs}");
}
