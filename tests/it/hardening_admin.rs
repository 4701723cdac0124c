//! The admin listener against a hostile browser and a sloppy token endpoint, end to end
//! with the real binary: foreign `Host` (DNS rebinding) refused, cross-site and non-JSON
//! changes refused, the CLI still talking to the daemon, failed admin logins throttled, and
//! token answers read (a quoted `expires_in`) without their secrets reaching logs or pages.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::relay::{Relay, Setup, World};

const TOKEN: &str = "admin-token-for-tests";

use crate::common::relay::http_request as request;

/// Restarts the relay with `lines` added to its `[admin]` section.
fn with_admin_keys(relay: &mut Relay, lines: &str) {
    relay.stop();
    let text = std::fs::read_to_string(&relay.config).unwrap();
    let text = text.replacen("[admin]\n", &format!("[admin]\n{lines}\n"), 1);
    std::fs::write(&relay.config, text).unwrap();
    relay.spawn();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_and_cross_site_changes_are_refused() {
    // No admin credentials: exactly the listener a DNS-rebinding page would read.
    let w = World::start(|_| {}).await;
    let port = w.relay.admin_port;
    let own = format!("127.0.0.1:{port}");
    let result = tokio::task::spawn_blocking(move || {
        let host = |h: &str| vec![("Host", h.to_string())];
        let get = |path: &str, h: &str| {
            let hs = host(h);
            let hs: Vec<(&str, &str)> = hs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            request(port, "GET", path, &hs, "")
        };
        for path in ["/api/queue", "/status", "/api/auth/status", "/oauth/callback?state=x&code=y", "/"] {
            let (code, _, body) = get(path, &format!("attacker.example:{port}"));
            assert_eq!(code, 421, "{path}: {body}");
            assert!(!body.contains("scans"), "{path}: nothing of the relay in the refusal: {body}");
        }
        assert_eq!(get("/api/queue", &own).0, 200);
        assert_eq!(get("/api/queue", &format!("localhost:{port}")).0, 200);
        assert_eq!(get("/status", &own).0, 200);
        // Scrapers and probes use the pod or host IP.
        for path in ["/metrics", "/healthz", "/readyz"] {
            let code = get(path, &format!("10.42.0.17:{port}")).0;
            assert!(code == 200 || code == 503, "{path}: {code}");
        }

        let post = |path: &str, extra: &[(&str, &str)], body: &str| {
            let mut hs: Vec<(&str, &str)> = vec![("Host", own.as_str())];
            hs.extend_from_slice(extra);
            request(port, "POST", path, &hs, body)
        };
        let json = ("Content-Type", "application/json");
        // A form posted from another page: no JSON, a foreign Origin, or cross-site.
        let (code, _, body) = post(
            "/api/auth/logout/scans",
            &[("Content-Type", "application/x-www-form-urlencoded"), ("Origin", "https://attacker.example")],
            "a=b",
        );
        assert_eq!(code, 403, "{body}");
        assert_eq!(post("/api/auth/logout/scans", &[json, ("Origin", "https://attacker.example")], "{}").0, 403);
        assert_eq!(post("/api/auth/logout/scans", &[json, ("Origin", "null")], "{}").0, 403);
        assert_eq!(post("/api/auth/logout/scans", &[json, ("Sec-Fetch-Site", "cross-site")], "{}").0, 403);
        let (code, _, body) = post("/api/queue/retry/all", &[("Content-Type", "text/plain")], "{}");
        assert_eq!(code, 415, "{body}");
        assert!(body.contains("application/json"), "{body}");
        assert_eq!(post("/api/queue/retry/all", &[], "").0, 415, "no body, no type");
        // Rebinding plus JSON: the Host check comes first.
        let (code, _, _) = request(
            port,
            "POST",
            "/api/queue/retry/all",
            &[("Host", "attacker.example"), json, ("Origin", "http://attacker.example")],
            "{}",
        );
        assert_eq!(code, 421);
        // The same request from the listener's own page, or from a program: accepted.
        let origin = format!("http://{own}");
        let (code, _, body) =
            post("/api/queue/retry/all", &[json, ("Origin", origin.as_str()), ("Sec-Fetch-Site", "same-origin")], "{}");
        assert_eq!(code, 200, "{body}");
        assert_eq!(post("/api/queue/retry/all", &[json], "{}").0, 200);
    })
    .await;
    if let Err(e) = result {
        panic!("{e:?}\n{}", w.relay.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_still_drives_the_daemon() {
    let mut w = World::start(|_| {}).await;
    tokio::task::spawn_blocking(move || {
        with_admin_keys(&mut w.relay, &format!("token = \"{TOKEN}\""));
        let (code, out, err) = w.relay.cli(&["queue", "list"], None);
        assert_eq!(code, 0, "{out}{err}");
        let (code, out, err) = w.relay.cli(&["auth", "login", "scans"], None);
        assert_eq!(code, 0, "a POST through the admin API: {out}{err}\n{}", w.relay.log());
        let (code, out, err) = w.relay.cli(&["auth", "status"], None);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("scans") && out.contains("ready"), "{out}");
        let (code, out, err) = w.relay.cli(&["queue", "retry", "all"], None);
        assert_eq!(code, 0, "{out}{err}");
        let (code, out, err) = w.relay.cli(&["reload"], None);
        assert_eq!(code, 0, "{out}{err}\n{}", w.relay.log());
        w
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_admin_logins_are_throttled_per_address() {
    let mut w = World::start(|_| {}).await;
    tokio::task::spawn_blocking(move || {
        with_admin_keys(&mut w.relay, &format!("token = \"{TOKEN}\""));
        let port = w.relay.admin_port;
        let own = format!("127.0.0.1:{port}");
        let get = |auth: Option<&str>| {
            let mut hs = vec![("Host", own.as_str())];
            if let Some(a) = auth {
                hs.push(("Authorization", a));
            }
            request(port, "GET", "/api/queue", &hs, "")
        };
        let good = format!("Bearer {TOKEN}");
        // Requests without credentials are no failed logins (a browser asks without first).
        for _ in 0..8 {
            assert_eq!(get(None).0, 401);
        }
        assert_eq!(get(Some(&good)).0, 200);
        // Wrong tokens: refused, each later than the one before.
        let started = Instant::now();
        for i in 0..5 {
            let (code, _, body) = get(Some(&format!("Bearer guess-{i}")));
            assert_eq!(code, 401, "{body}");
        }
        assert!(started.elapsed() >= Duration::from_millis(250 * (1 + 2 + 3 + 4)), "{:?}", started.elapsed());
        // Then the address is shut out for a while, even with the right token.
        let (code, head, body) = get(Some(&good));
        assert_eq!(code, 429, "{body}");
        assert!(head.contains("retry-after:"), "{head}");
        assert_eq!(get(Some("Bearer another-guess")).0, 429);
        // Health stays answerable.
        assert_eq!(request(port, "GET", "/healthz", &[("Host", own.as_str())], "").0, 200);
        assert!(w.relay.log().contains("too many failed logins"), "{}", w.relay.log());
        w
    })
    .await
    .unwrap();
}

/// A token endpoint that answers client-credentials requests with whatever body the test
/// sets.
async fn scripted_token_endpoint(answer: Arc<Mutex<(u16, String)>>) -> String {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/token",
        post(move || {
            let answer = answer.clone();
            async move {
                let (status, body) = answer.lock().unwrap().clone();
                (axum::http::StatusCode::from_u16(status).unwrap(), [("content-type", "application/json")], body)
            }
        }),
    );
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/token", tcp.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(tcp, app).await });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_answers_are_read_without_echoing_their_secrets() {
    let answer = Arc::new(Mutex::new((
        200,
        r#"{"token_type":"Bearer","access_token":"SECRET-AT-1","expires_in":"3600"}"#.to_string(),
    )));
    let url = scripted_token_endpoint(answer.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let sections = format!(
        "[[provider]]\nname = \"p\"\nkind = \"generic\"\nclient_id = \"c\"\nclient_secret = \"s\"\ntoken_url = \"{url}\"\n\
         scopes = [\"x\"]\nsmtp = \"127.0.0.1:9\"\nsmtp_tls = \"none\"\n\n\
         [[identity]]\nname = \"scans\"\nprovider = \"p\"\nemail = \"scans@contoso.test\"\nflow = \"client_credentials\"\n"
    );
    let path = dir.path().to_path_buf();
    let relay = tokio::task::spawn_blocking(move || Relay::start(&path, &Setup::new(sections))).await.unwrap();
    let relay = tokio::task::spawn_blocking(move || {
        // `expires_in` as a string, as some endpoints send it: a token.
        let (code, out, err) = relay.cli(&["auth", "login", "scans"], None);
        assert_eq!(code, 0, "{out}{err}\n{}", relay.log());
        relay
    })
    .await
    .unwrap();

    // Now an answer that does not fit, full of live-looking tokens.
    *answer.lock().unwrap() = (
        200,
        r#"{"token_type":"Bearer","access_token":"SECRET-AT-2","refresh_token":"SECRET-RT-2","expires_in":"soon"}"#
            .to_string(),
    );
    tokio::task::spawn_blocking(move || {
        let (code, out, err) = relay.cli(&["auth", "login", "scans"], None);
        assert_ne!(code, 0, "{out}{err}");
        let said = format!("{out}{err}");
        assert!(said.contains("expires_in"), "the field is named: {said}");
        let (code, status, err) = relay.cli(&["auth", "status"], None);
        assert_eq!(code, 0, "{err}");
        assert!(status.contains("expires_in"), "{status}");
        let (code, page) = relay.admin_get("/status");
        assert_eq!(code, 200);
        let log = relay.log();
        for (what, text) in [("CLI", &said), ("auth status", &status), ("status page", &page), ("log", &log)] {
            assert!(!text.contains("SECRET-RT-2") && !text.contains("SECRET-AT-2"), "{what} echoes a token: {text}");
            assert!(!text.contains("soon"), "{what} echoes a value: {text}");
        }
    })
    .await
    .unwrap();
}

/// The fake provider checks certificate assertions as Microsoft documents them: PS256 with
/// `x5t#S256`, the signature verified with the algorithm the header names.
#[tokio::test]
async fn the_fake_provider_verifies_ps256_client_assertions() {
    use crate::common::fake_oauth::{ClientApp, FakeOAuth, CLIENT_ASSERTION_TYPE_JWT, MS_APP_SCOPE};
    use crate::common::{b64url, unix_now, RsaTestKey};
    use rustls_pki_types::pem::PemObject;

    let idp = FakeOAuth::start().await;
    let key = RsaTestKey::a();
    let cert = key.self_signed_cert("mfd-relay test app");
    idp.register_client(
        ClientApp::public("app-cert").assertion_key(key.public_key_der(), Some(&cert.x5t_s256)).app_account("a@b.test"),
    );
    let url = idp.token_url();
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(key.private_key_pem().as_bytes()).unwrap();
    let pair = ring::signature::RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).unwrap();
    let sign = |alg: &str, encoding: &'static dyn ring::signature::RsaEncoding| {
        let now = unix_now();
        let header = serde_json::json!({"alg": alg, "typ": "JWT", "x5t#S256": cert.x5t_s256});
        let claims = serde_json::json!({"aud": url, "iss": "app-cert", "sub": "app-cert", "jti": "j", "nbf": now, "iat": now, "exp": now + 600});
        let input = format!("{}.{}", b64url(header.to_string()), b64url(claims.to_string()));
        let mut sig = vec![0u8; pair.public().modulus_len()];
        pair.sign(encoding, &ring::rand::SystemRandom::new(), input.as_bytes(), &mut sig).unwrap();
        format!("{input}.{}", b64url(sig))
    };
    let client = reqwest::Client::new();
    let post = |assertion: String| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let resp = client
                .post(&url)
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", "app-cert"),
                    ("client_assertion_type", CLIENT_ASSERTION_TYPE_JWT),
                    ("client_assertion", assertion.as_str()),
                    ("scope", MS_APP_SCOPE),
                ])
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.text().await.unwrap())
        }
    };
    let (code, body) = post(sign("PS256", &ring::signature::RSA_PSS_SHA256)).await;
    assert_eq!(code, 200, "PS256 with x5t#S256: {body}");
    // A PKCS#1 v1.5 signature labelled PS256 does not verify.
    let (code, body) = post(sign("PS256", &ring::signature::RSA_PKCS1_SHA256)).await;
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("700027"), "{body}");
    // Nor a PSS signature labelled RS256.
    let (code, body) = post(sign("RS256", &ring::signature::RSA_PSS_SHA256)).await;
    assert_eq!(code, 401, "{body}");
    let (code, body) = post(sign("HS256", &ring::signature::RSA_PSS_SHA256)).await;
    assert!(code == 401 && body.contains("50027"), "{body}");
}
