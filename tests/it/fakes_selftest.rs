//! Self-test of the test fakes in `tests/common`: drives [`FakeOAuth`] with
//! reqwest and [`FakeSmtp`] with raw tokio TCP / rustls clients, proving
//! they behave as the relay's integration tests assume.

use crate::common;

use std::time::{Duration, Instant};

use crate::common::fake_oauth::{
    AadError, ClientApp, FakeOAuth, Grant, GOOGLE_MAIL_SCOPE, MS_APP_SCOPE, MS_SMTP_SCOPE,
};
use crate::common::fake_smtp::{replies, FakeSmtp, SmtpOptions, Times, Tls};
use crate::common::{dot_stuff, pkce_pair, tls, unix_now, RsaTestKey, SmtpClient};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("reqwest client")
}

/// POSTs a form and returns (status, JSON body).
async fn post_form(url: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let resp = http().post(url).form(form).send().await.expect("POST");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("JSON body"))
}

/// The AADSTS number of an Entra-style error body.
fn aad_code(body: &Value) -> u64 {
    let code = body["error_codes"][0].as_u64().expect("error_codes");
    let desc = body["error_description"].as_str().expect("error_description");
    assert!(desc.starts_with(&format!("AADSTS{code}: ")), "{desc}");
    code
}

fn query_param(url: &reqwest::Url, name: &str) -> Option<String> {
    url.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

// ---------------------------------------------------------------------------
// FakeOAuth
// ---------------------------------------------------------------------------

#[tokio::test]
async fn client_credentials_with_secret() {
    let idp = FakeOAuth::start().await;
    idp.register_client(ClientApp::public("app-1").secret("s3cret").app_account("scans@contoso.com"));
    let url = idp.token_url();
    let ok = [
        ("grant_type", "client_credentials"),
        ("client_id", "app-1"),
        ("client_secret", "s3cret"),
        ("scope", MS_APP_SCOPE),
    ];
    let (status, body) = post_form(&url, &ok).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], MS_APP_SCOPE);
    assert!(body.get("refresh_token").is_none(), "no refresh token for app-only");
    let at = body["access_token"].as_str().unwrap();
    assert!(at.starts_with("fake-at-"));
    assert!(idp.token_is_valid(at, "scans@contoso.com"));
    assert!(idp.token_is_valid(at, "SCANS@contoso.com"));
    assert!(!idp.token_is_valid(at, "other@contoso.com"));
    assert!(!idp.token_is_valid("fake-at-nope", "scans@contoso.com"));

    // Client secret via HTTP Basic (the oauth2 crate's default).
    let resp = http()
        .post(&url)
        .basic_auth("app-1", Some("s3cret"))
        .form(&[("grant_type", "client_credentials"), ("scope", MS_APP_SCOPE)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // Wrong secret: 401 invalid_client AADSTS7000215.
    let (status, body) = post_form(
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "app-1"),
            ("client_secret", "wrong"),
            ("scope", MS_APP_SCOPE),
        ],
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")));
    assert_eq!(aad_code(&body), 7000215);

    // Expired secret: AADSTS7000222.
    idp.set_client_secret_expired("app-1", true);
    let (status, body) = post_form(&url, &ok).await;
    assert_eq!((status, aad_code(&body)), (401, 7000222));
    idp.set_client_secret_expired("app-1", false);

    // App-only scope must end in /.default.
    let (status, body) = post_form(
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "app-1"),
            ("client_secret", "s3cret"),
            ("scope", MS_SMTP_SCOPE),
        ],
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_scope")));
    assert_eq!(aad_code(&body), 1002012);

    // Unknown app, repeated parameter.
    let (status, body) = post_form(
        &url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "nobody"),
            ("client_secret", "x"),
            ("scope", MS_APP_SCOPE),
        ],
    )
    .await;
    assert_eq!((status, aad_code(&body)), (400, 700016));
    let (status, body) = post_form(&url, &[("grant_type", "client_credentials"), ("scope", "a"), ("scope", "b")]).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_request")));

    assert_eq!(idp.tokens_issued(Grant::ClientCredentials), 2);
    // ok, basic, wrong, expired, bad scope, unknown (the repeated one has no grant).
    assert_eq!(idp.token_requests(Grant::ClientCredentials), 6);
    let seen = idp.requests();
    assert_eq!(seen[1].basic_auth_client.as_deref(), Some("app-1"));
    assert_eq!(seen[2].error.as_deref(), Some("invalid_client"));
}

#[tokio::test]
async fn client_credentials_with_certificate_assertion() {
    let idp = FakeOAuth::start().await;
    let key = RsaTestKey::a();
    let cert = key.self_signed_cert("mfd-relay test app");
    idp.register_client(
        ClientApp::public("app-cert")
            .assertion_key(key.public_key_der(), Some(&cert.x5t_s256))
            .app_account("scans@contoso.com"),
    );
    let url = idp.token_url();
    let request = |assertion: String| {
        let url = url.clone();
        async move {
            post_form(
                &url,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", "app-cert"),
                    ("client_assertion_type", common::fake_oauth::CLIENT_ASSERTION_TYPE_JWT),
                    ("client_assertion", &assertion),
                    ("scope", MS_APP_SCOPE),
                ],
            )
            .await
        }
    };

    let (status, body) = request(key.client_assertion(&cert, "app-cert", &url)).await;
    assert_eq!(status, 200, "{body}");
    let at = body["access_token"].as_str().unwrap();
    assert!(idp.token_is_valid(at, "scans@contoso.com"));

    // The audience is the URL the request went to: the Microsoft-shaped path works too.
    let ms_url = idp.microsoft_token_url("contoso.onmicrosoft.com");
    let (status, body) = post_form(
        &ms_url,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "app-cert"),
            ("client_assertion_type", common::fake_oauth::CLIENT_ASSERTION_TYPE_JWT),
            ("client_assertion", &key.client_assertion(&cert, "app-cert", &ms_url)),
            ("scope", MS_APP_SCOPE),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Signed by another key: AADSTS700027.
    let (status, body) = request(RsaTestKey::b().client_assertion(&cert, "app-cert", &url)).await;
    assert_eq!((status, aad_code(&body)), (401, 700027));

    // Wrong audience.
    let (status, body) = request(key.client_assertion(&cert, "app-cert", &ms_url)).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("invalid_client")));
    assert_eq!(aad_code(&body), 700212);

    let now = unix_now();
    let header = json!({"alg": "RS256", "typ": "JWT", "x5t#S256": cert.x5t_s256});
    let claims =
        |iss: &str, exp: u64| json!({"aud": url, "iss": iss, "sub": iss, "jti": "j", "nbf": now - 600, "exp": exp});
    // Expired.
    let (status, body) = request(key.jwt(&header, &claims("app-cert", now - 10))).await;
    assert_eq!((status, aad_code(&body)), (401, 700024));
    // iss/sub not the client id.
    let (status, body) = request(key.jwt(&header, &claims("someone-else", now + 600))).await;
    assert_eq!((status, aad_code(&body)), (401, 700021));
    // No x5t#S256 header.
    let (status, body) = request(key.jwt(&json!({"alg": "RS256"}), &claims("app-cert", now + 600))).await;
    assert_eq!((status, aad_code(&body)), (401, 700027));
    // Garbage.
    let (status, body) = request("not.a.jwt".to_string()).await;
    assert_eq!((status, aad_code(&body)), (401, 50027));

    assert_eq!(idp.tokens_issued(Grant::ClientCredentials), 2);
}

#[tokio::test]
async fn refresh_rotates_and_revoked_gives_invalid_grant() {
    let idp = FakeOAuth::start().await;
    idp.register_client(ClientApp::public("pub"));
    let url = idp.token_url();
    let rt0 = idp.issue_refresh_token("scans@contoso.com");
    let refresh = |rt: String| {
        let url = url.clone();
        async move {
            post_form(
                &url,
                &[
                    ("grant_type", "refresh_token"),
                    ("client_id", "pub"),
                    ("refresh_token", &rt),
                    ("scope", &format!("{MS_SMTP_SCOPE} offline_access")),
                ],
            )
            .await
        }
    };

    let (status, body) = refresh(rt0.clone()).await;
    assert_eq!(status, 200, "{body}");
    let rt1 = body["refresh_token"].as_str().unwrap().to_string();
    assert!(rt1.starts_with("fake-rt-") && rt1 != rt0, "rotated");
    let at = body["access_token"].as_str().unwrap();
    assert!(idp.token_is_valid(at, "scans@contoso.com"));
    let info = idp.access_token_info(at).unwrap();
    assert_eq!(info.grant, Some(Grant::RefreshToken));
    assert!(info.scope.contains(MS_SMTP_SCOPE));
    // The old one stays valid, like Microsoft's.
    assert_eq!(refresh(rt0.clone()).await.0, 200);

    // Revoked: invalid_grant with AADSTS50173 by default.
    idp.revoke_refresh_token(&rt0);
    let (status, body) = refresh(rt0.clone()).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")));
    assert_eq!(aad_code(&body), 50173);
    // Unknown token: the same.
    let (status, body) = refresh("fake-rt-unknown".into()).await;
    assert_eq!((status, aad_code(&body)), (400, 50173));

    // A configured code; revoking the account kills its access tokens too.
    idp.set_invalid_grant_error(AadError::refresh_token_expired());
    idp.revoke_account("scans@contoso.com");
    assert!(!idp.token_is_valid(at, "scans@contoso.com"));
    assert!(!idp.refresh_token_is_valid(&rt1));
    let (status, body) = refresh(rt1).await;
    assert_eq!((status, aad_code(&body)), (400, 700082));

    // Rotation off: no refresh_token in the answer.
    idp.set_rotate_refresh_tokens(false);
    let (status, body) = refresh(idp.issue_refresh_token("scans@contoso.com")).await;
    assert_eq!(status, 200);
    assert!(body.get("refresh_token").is_none());

    assert_eq!(idp.token_requests(Grant::RefreshToken), 6);
    assert_eq!(idp.tokens_issued(Grant::RefreshToken), 3);
}

#[tokio::test]
async fn device_code_flow() {
    let idp = FakeOAuth::start().await;
    idp.register_client(ClientApp::public("pub"));
    idp.set_device_poll_interval(1);
    let (dc_url, url) = (idp.devicecode_url(), idp.token_url());
    let start = || async {
        let (status, body) =
            post_form(&dc_url, &[("client_id", "pub"), ("scope", &format!("{MS_SMTP_SCOPE} offline_access"))]).await;
        assert_eq!(status, 200, "{body}");
        body
    };
    let poll = |device_code: String| {
        let url = url.clone();
        async move {
            post_form(
                &url,
                &[
                    ("grant_type", common::fake_oauth::GRANT_DEVICE_CODE),
                    ("client_id", "pub"),
                    ("device_code", &device_code),
                ],
            )
            .await
        }
    };

    // A: pending, approved, redeemed once.
    let a = start().await;
    assert_eq!(a["interval"], 1);
    assert_eq!(a["expires_in"], 900);
    let user_code = a["user_code"].as_str().unwrap().to_string();
    assert!(a["message"].as_str().unwrap().contains(&user_code));
    assert_eq!(idp.wait_for_user_code(T).await, user_code);
    let dc = a["device_code"].as_str().unwrap().to_string();
    let (status, body) = poll(dc.clone()).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("authorization_pending")));
    assert_eq!(aad_code(&body), 70016);
    idp.approve_device(&user_code, "scans@contoso.com");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = poll(dc.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert!(idp.token_is_valid(body["access_token"].as_str().unwrap(), "scans@contoso.com"));
    assert!(body["refresh_token"].is_string());
    let (status, body) = poll(dc).await;
    assert_eq!((status, aad_code(&body)), (400, 54005));

    // B: polled faster than the interval.
    let b = start().await;
    let dc = b["device_code"].as_str().unwrap().to_string();
    assert_eq!(poll(dc.clone()).await.1["error"], "authorization_pending");
    assert_eq!(poll(dc).await.1["error"], "slow_down");

    // No pace check from here on.
    idp.set_device_poll_interval(0);
    // C: denied.
    let c = start().await;
    idp.deny_device(c["user_code"].as_str().unwrap());
    let (status, body) = poll(c["device_code"].as_str().unwrap().into()).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("access_denied")));
    // D: expired.
    let d = start().await;
    idp.expire_device(d["user_code"].as_str().unwrap());
    let (_, body) = poll(d["device_code"].as_str().unwrap().into()).await;
    assert_eq!(body["error"], "expired_token");
    assert_eq!(aad_code(&body), 70020);
    // E: slow_down forced; the interval is now 5 s (RFC 8628 §3.5), so an
    // immediate poll is too fast.
    let e = start().await;
    let dc = e["device_code"].as_str().unwrap().to_string();
    idp.force_slow_down(1);
    assert_eq!(poll(dc.clone()).await.1["error"], "slow_down");
    assert_eq!(poll(dc).await.1["error"], "slow_down");

    assert_eq!(idp.counts().devicecode_requests, 5);
    assert_eq!(idp.tokens_issued(Grant::DeviceCode), 1);
    assert_eq!(idp.user_codes().len(), 5);
}

#[tokio::test]
async fn google_device_flow_refuses_gmail_scope() {
    let idp = FakeOAuth::start().await;
    idp.register_client(ClientApp::public("google-app"));
    idp.refuse_scope_in_device_flow(GOOGLE_MAIL_SCOPE);
    let (status, body) =
        post_form(&idp.devicecode_url(), &[("client_id", "google-app"), ("scope", GOOGLE_MAIL_SCOPE)]).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_scope")));
    // Other scopes still work.
    let (status, _) = post_form(&idp.devicecode_url(), &[("client_id", "google-app"), ("scope", "email")]).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn authorization_code_with_pkce() {
    let idp = FakeOAuth::start().await;
    idp.register_client(ClientApp::public("pub"));
    let scope = format!("{GOOGLE_MAIL_SCOPE} offline_access");

    // A loopback "relay callback" the browser is redirected to.
    let callback = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let redirect_uri = format!("http://127.0.0.1:{}/callback", callback.local_addr().unwrap().port());
    let authorize = |challenge: Option<&str>| {
        let mut url = reqwest::Url::parse(&idp.authorize_url()).unwrap();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("response_type", "code")
                .append_pair("client_id", "pub")
                .append_pair("redirect_uri", &redirect_uri)
                .append_pair("scope", &scope)
                .append_pair("state", "st-123");
            if let Some(c) = challenge {
                q.append_pair("code_challenge", c).append_pair("code_challenge_method", "S256");
            }
        }
        url
    };
    let location = |resp: &reqwest::Response| {
        assert_eq!(resp.status(), 302);
        let loc = resp.headers()["location"].to_str().unwrap();
        reqwest::Url::parse(loc).unwrap()
    };

    // No account signed in: the user "declines".
    let (_, challenge) = pkce_pair();
    let resp = http().get(authorize(Some(&challenge))).send().await.unwrap();
    let loc = location(&resp);
    assert_eq!(query_param(&loc, "error").as_deref(), Some("access_denied"));
    assert_eq!(query_param(&loc, "state").as_deref(), Some("st-123"));

    idp.set_authorize_account(Some("user@gmail.test"));
    // PKCE is required.
    let loc = location(&http().get(authorize(None)).send().await.unwrap());
    assert_eq!(query_param(&loc, "error").as_deref(), Some("invalid_request"));

    // The browser follows the redirect to the callback.
    let (verifier, challenge) = pkce_pair();
    let browser = reqwest::Client::builder().timeout(T).build().unwrap();
    let url = authorize(Some(&challenge));
    let (resp, request_line) = tokio::join!(browser.get(url).send(), async {
        let (mut sock, _) = callback.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "browser hung up");
            head.extend_from_slice(&buf[..n]);
        }
        sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await.unwrap();
        String::from_utf8_lossy(&head).lines().next().unwrap().to_string()
    });
    assert_eq!(resp.unwrap().text().await.unwrap(), "ok");
    assert!(request_line.starts_with("GET /callback?code=fake-ac-"), "{request_line}");
    let cb = reqwest::Url::parse(&format!("http://x{}", request_line.split(' ').nth(1).unwrap())).unwrap();
    let code = query_param(&cb, "code").unwrap();
    assert_eq!(query_param(&cb, "state").as_deref(), Some("st-123"));

    let redeem = |verifier: String, redirect: String| {
        let (url, code) = (idp.token_url(), code.clone());
        async move {
            post_form(
                &url,
                &[
                    ("grant_type", "authorization_code"),
                    ("client_id", "pub"),
                    ("code", &code),
                    ("redirect_uri", &redirect),
                    ("code_verifier", &verifier),
                ],
            )
            .await
        }
    };
    // Wrong verifier.
    let (status, body) = redeem(pkce_pair().0, redirect_uri.clone()).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")));
    assert_eq!(aad_code(&body), 501481);
    // Wrong redirect_uri.
    let (status, body) = redeem(verifier.clone(), format!("{redirect_uri}x")).await;
    assert_eq!((status, aad_code(&body)), (400, 500112));
    // Right.
    let (status, body) = redeem(verifier.clone(), redirect_uri.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert!(idp.token_is_valid(body["access_token"].as_str().unwrap(), "user@gmail.test"));
    assert!(body["refresh_token"].is_string());
    // Codes are single-use.
    let (status, body) = redeem(verifier, redirect_uri).await;
    assert_eq!((status, aad_code(&body)), (400, 54005));
    assert_eq!(idp.counts().authorize_requests, 3);
}

#[tokio::test]
async fn service_account_jwt_bearer() {
    let idp = FakeOAuth::start().await;
    let sa = "relay@project.iam.gserviceaccount.com";
    let key = RsaTestKey::a();
    idp.register_service_account(sa, key.public_key_der());
    idp.set_grantable_scopes(Some(&[GOOGLE_MAIL_SCOPE]));
    let url = idp.token_url();
    let grant = |assertion: String| {
        let url = url.clone();
        async move {
            post_form(&url, &[("grant_type", common::fake_oauth::GRANT_JWT_BEARER), ("assertion", &assertion)]).await
        }
    };

    let (status, body) = grant(key.service_account_assertion(sa, "print@corp.test", GOOGLE_MAIL_SCOPE, &url)).await;
    assert_eq!(status, 200, "{body}");
    let at = body["access_token"].as_str().unwrap();
    assert!(idp.token_is_valid(at, "print@corp.test"));
    assert!(body.get("refresh_token").is_none());

    // Google-style errors: no error_codes.
    let (status, body) =
        grant(RsaTestKey::b().service_account_assertion(sa, "print@corp.test", GOOGLE_MAIL_SCOPE, &url)).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_grant")));
    assert_eq!(body["error_description"], "Invalid JWT Signature.");
    assert!(body.get("error_codes").is_none());
    let (_, body) =
        grant(key.service_account_assertion(sa, "print@corp.test", GOOGLE_MAIL_SCOPE, "https://elsewhere.test/token"))
            .await;
    assert_eq!(body["error"], "invalid_grant");
    let (_, body) =
        grant(key.service_account_assertion(sa, "print@corp.test", "https://www.googleapis.com/auth/drive", &url))
            .await;
    assert_eq!(body["error"], "invalid_scope");
    let (_, body) = grant(key.service_account_assertion(
        "stranger@project.iam.gserviceaccount.com",
        "print@corp.test",
        GOOGLE_MAIL_SCOPE,
        &url,
    ))
    .await;
    assert_eq!(body["error"], "invalid_grant");

    // The key file helper carries the key and the token URI.
    let file: Value = serde_json::from_str(&key.service_account_json(sa, &url)).unwrap();
    assert_eq!(file["token_uri"], url.as_str());
    assert!(file["private_key"].as_str().unwrap().contains("BEGIN PRIVATE KEY"));
    assert_eq!(idp.tokens_issued(Grant::JwtBearer), 1);
}

#[tokio::test]
async fn introspection_expiry_down_and_slow() {
    let idp = FakeOAuth::start().await;
    let at = idp.issue_access_token("print@contoso.com");
    let intro = idp.introspect_url();

    // Dovecot style: GET ?token=
    let body: Value = http().get(format!("{intro}?token={at}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["active"], true);
    assert_eq!(body["username"], "print@contoso.com");
    // RFC 7662 style: POST form, and Authorization: Bearer.
    let (_, body) = post_form(&intro, &[("token", &at)]).await;
    assert_eq!(body["active"], true);
    let body: Value = http().get(&intro).bearer_auth(&at).send().await.unwrap().json().await.unwrap();
    assert_eq!(body["active"], true);
    let (_, body) = post_form(&intro, &[("token", "fake-at-unknown")]).await;
    assert_eq!(body, json!({"active": false}));

    // Short lifetimes expire.
    idp.set_access_token_lifetime(Duration::from_millis(300));
    let short = idp.issue_access_token("print@contoso.com");
    assert!(idp.token_is_valid(&short, "print@contoso.com"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!idp.token_is_valid(&short, "print@contoso.com"));
    let (_, body) = post_form(&intro, &[("token", &short)]).await;
    assert_eq!(body["active"], false);
    idp.expire_access_tokens();
    assert!(!idp.token_is_valid(&at, "print@contoso.com"));

    // Down: 503 on /token, introspection unaffected.
    let fresh = idp.issue_access_token("print@contoso.com");
    idp.set_down(true);
    let (status, body) = post_form(&idp.token_url(), &[("grant_type", "client_credentials")]).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("temporarily_unavailable")));
    assert_eq!(aad_code(&body), 90033);
    let (_, body) = post_form(&intro, &[("token", &fresh)]).await;
    assert_eq!(body["active"], true);
    idp.set_down(false);
    assert_eq!(idp.counts().refused_while_down, 1);

    // Slow.
    idp.set_delay(Duration::from_millis(300));
    let t0 = Instant::now();
    let (status, _) = post_form(&idp.token_url(), &[("grant_type", "client_credentials")]).await;
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(status, 400); // missing client_id, but only after the delay

    let seen = idp.requests();
    assert!(seen.iter().any(|r| r.path == "/token" && r.status == 503));
    assert_eq!(seen.last().unwrap().error.as_deref(), Some("invalid_request"));
    assert_eq!(idp.counts().introspect_requests, 6);
}

// ---------------------------------------------------------------------------
// FakeSmtp
// ---------------------------------------------------------------------------

async fn setup(tls_mode: Tls) -> (FakeOAuth, FakeSmtp, String) {
    let idp = FakeOAuth::start().await;
    let smtp = FakeSmtp::start(SmtpOptions::new(tls_mode, idp.token_validator())).await;
    let token = idp.issue_access_token("scans@contoso.com");
    (idp, smtp, token)
}

#[tokio::test]
async fn xoauth2_success_pipelining_and_recording() {
    let (_idp, smtp, token) = setup(Tls::None).await;
    let (mut c, greeting) = SmtpClient::connect(smtp.port()).await;
    assert_eq!(greeting.wire(), "220 fake.upstream ESMTP");
    let ehlo = c.cmd_expect("EHLO printer", 250).await;
    for kw in ["PIPELINING", "SIZE 36700160", "8BITMIME", "ENHANCEDSTATUSCODES", "AUTH XOAUTH2"] {
        assert!(ehlo.has_line(kw), "{kw} missing in {}", ehlo.wire());
    }
    assert!(!ehlo.has_line("STARTTLS"));
    assert!(!ehlo.text().contains("LOGIN") && !ehlo.text().contains("PLAIN"));

    let r = c.cmd("MAIL FROM:<scans@contoso.com>").await;
    assert_eq!(r.wire(), replies::NEED_AUTH);
    assert_eq!(c.auth_xoauth2("scans@contoso.com", &token).await.wire(), replies::AUTH_OK);

    // Pipelined envelope in one write (RFC 2920).
    c.send_raw(
        b"MAIL FROM:<scans@contoso.com> SIZE=100 BODY=8BITMIME\r\n\
          RCPT TO:<a@contoso.com>\r\nRCPT TO:<b@contoso.com>\r\nDATA\r\n",
    )
    .await
    .unwrap();
    for code in [250, 250, 250, 354] {
        assert_eq!(c.read_reply().await.unwrap().code, code);
    }
    let body = b"Subject: scan\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n";
    let mut wire = dot_stuff(body);
    wire.extend_from_slice(b".\r\n");
    c.send_raw(&wire).await.unwrap();
    let r = c.read_reply().await.unwrap();
    assert_eq!(r.code, 250);
    assert!(r.text().starts_with("2.0.0 OK <FAKE000001@"), "{}", r.wire());

    let second = c.send_mail("scans@contoso.com", &["c@contoso.com"], b"Subject: 2\r\n\r\nx\r\n").await;
    assert_eq!(second.code, 250);
    c.cmd_expect("RSET", 250).await;
    c.cmd_expect("NOOP", 250).await;
    c.cmd_expect("QUIT", 221).await;

    let msgs = smtp.wait_for_messages(2, T).await;
    let m = &msgs[0];
    assert_eq!(m.data, body.to_vec(), "exact bytes after dot-unstuffing");
    assert_eq!(m.from, "scans@contoso.com");
    assert_eq!(m.mail_params, ["SIZE=100", "BODY=8BITMIME"]);
    assert_eq!(m.rcpts, ["a@contoso.com", "b@contoso.com"]);
    assert_eq!(m.user.as_deref(), Some("scans@contoso.com"));
    assert_eq!((m.conn, m.tls), (1, false));
    assert_eq!(msgs[1].rcpts, ["c@contoso.com"]);
    let st = smtp.stats();
    assert_eq!((st.connections, st.auth_successes, st.messages_accepted), (1, 1, 2));
}

#[tokio::test]
async fn xoauth2_failure_is_334_then_empty_line_then_535() {
    let (idp, smtp, token) = setup(Tls::None).await;
    let (mut c, _) = SmtpClient::connect(smtp.port()).await;
    c.cmd_expect("EHLO printer", 250).await;

    let r = c.auth_xoauth2("scans@contoso.com", "fake-at-bogus").await;
    assert_eq!(r.code, 334);
    let json: Value =
        serde_json::from_slice(&base64::Engine::decode(&base64::engine::general_purpose::STANDARD, r.text()).unwrap())
            .unwrap();
    assert_eq!(json, json!({"status": "401", "schemes": "bearer", "scope": "https://outlook.office.com/SMTP.Send"}));
    assert_eq!(c.cmd("").await.wire(), replies::AUTH_FAILED);

    // A valid token for another user is refused too.
    let other = idp.issue_access_token("someone@contoso.com");
    assert_eq!(c.auth_xoauth2("scans@contoso.com", &other).await.code, 334);
    assert_eq!(c.cmd("QUIT").await.code, 535); // not the empty line: recorded as such

    // No initial response: 334, then the client's line.
    let (mut c, _) = SmtpClient::connect(smtp.port()).await;
    c.cmd_expect("EHLO printer", 250).await;
    let r = c.cmd_expect("AUTH XOAUTH2", 334).await;
    assert_eq!(r.text(), "");
    let r = c.cmd(&common::xoauth2_b64("scans@contoso.com", &token)).await;
    assert_eq!(r.wire(), replies::AUTH_OK);
    c.cmd_expect("AUTH XOAUTH2 =", 503).await; // already authenticated

    let attempts = smtp.auth_attempts();
    assert_eq!(attempts.len(), 3);
    assert!(!attempts[0].success && attempts[0].sent_empty_line());
    assert_eq!(attempts[0].user.as_deref(), Some("scans@contoso.com"));
    assert_eq!(attempts[0].token.as_deref(), Some("fake-at-bogus"));
    assert!(attempts[0].initial_response);
    assert_eq!(attempts[1].challenge_reply.as_deref(), Some("QUIT"));
    assert!(!attempts[1].sent_empty_line());
    assert!(attempts[2].success && !attempts[2].initial_response);
    assert_eq!(attempts[2].conn, 2);
    let st = smtp.stats();
    assert_eq!((st.auth_failures, st.auth_successes), (2, 1));
}

#[tokio::test]
async fn starttls_required_before_auth() {
    let (_idp, smtp, token) = setup(Tls::StartTls).await;
    let (mut c, _) = SmtpClient::connect(smtp.port()).await;
    let ehlo = c.cmd_expect("EHLO printer", 250).await;
    assert!(ehlo.has_line("STARTTLS"));
    assert_eq!(c.auth_xoauth2("scans@contoso.com", &token).await.wire(), replies::NEED_STARTTLS);

    let mut c = c.starttls(tls::client_config_trusting(smtp.cert())).await;
    // RFC 3207: the session starts over; MAIL needs EHLO and AUTH again.
    c.cmd_expect("MAIL FROM:<x@y>", 503).await;
    let ehlo = c.cmd_expect("EHLO printer", 250).await;
    assert!(!ehlo.has_line("STARTTLS"));
    assert_eq!(c.auth_xoauth2("scans@contoso.com", &token).await.code, 235);
    let r = c.send_mail("scans@contoso.com", &["a@contoso.com"], b"Subject: tls\r\n\r\nhi\r\n").await;
    assert_eq!(r.code, 250);
    c.cmd_expect("QUIT", 221).await;
    let m = &smtp.wait_for_messages(1, T).await[0];
    assert!(m.tls);
    assert_eq!(smtp.stats().starttls_upgrades, 1);

    // Plaintext pipelined after STARTTLS is refused (CVE-2011-0411 class).
    let (mut c, _) = SmtpClient::connect(smtp.port()).await;
    c.cmd_expect("EHLO printer", 250).await;
    c.send_raw(b"STARTTLS\r\nEHLO injected\r\n").await.unwrap();
    assert_eq!(c.read_reply().await.unwrap().code, 554);
    assert!(c.read_reply().await.is_err(), "connection closed");
    assert_eq!(smtp.stats().starttls_injections, 1);
}

#[tokio::test]
async fn implicit_tls() {
    let (_idp, smtp, token) = setup(Tls::Implicit).await;
    let tcp = tokio::net::TcpStream::connect(smtp.addr()).await.unwrap();
    let stream = tls::connect(tcp, tls::client_config_trusting(smtp.cert()), "localhost").await.unwrap();
    let mut c = SmtpClient::new(stream);
    assert_eq!(c.read_reply().await.unwrap().code, 220);
    assert!(!c.cmd_expect("EHLO printer", 250).await.has_line("STARTTLS"));
    assert_eq!(c.auth_xoauth2("scans@contoso.com", &token).await.code, 235);
    let r = c.send_mail("scans@contoso.com", &["a@contoso.com"], b"x\r\n").await;
    assert_eq!(r.code, 250);
    assert!(smtp.wait_for_messages(1, T).await[0].tls);
}

#[tokio::test]
async fn bare_lf_is_550_and_lf_dot_is_not_the_end() {
    let (_idp, smtp, token) = setup(Tls::None).await;
    let (mut c, _) = SmtpClient::connect(smtp.port()).await;
    c.cmd_expect("EHLO printer", 250).await;
    c.auth_xoauth2("scans@contoso.com", &token).await;
    c.cmd_expect("MAIL FROM:<scans@contoso.com>", 250).await;
    c.cmd_expect("RCPT TO:<a@contoso.com>", 250).await;
    c.cmd_expect("DATA", 354).await;
    // "\n.\r\n" is not CRLF.CRLF: the text goes on until the real end.
    c.send_raw(b"Subject: x\r\nbare\n.\r\nNOOP\r\n.\r\n").await.unwrap();
    assert_eq!(c.read_reply().await.unwrap().wire(), replies::BARE_LF);
    // Had "LF.CRLF" ended the message, "NOOP" would have been answered already.
    c.cmd_expect("NOOP", 250).await;
    assert!(smtp.messages().is_empty());
    assert_eq!(smtp.stats().messages_rejected, 1);
}

#[tokio::test]
async fn recipients_sizes_and_injected_replies() {
    let idp = FakeOAuth::start().await;
    let mut opts = SmtpOptions::new(Tls::None, idp.token_validator());
    opts.max_size = 1000;
    let smtp = FakeSmtp::start(opts).await;
    let token = idp.issue_access_token("scans@contoso.com");
    let (mut c, _) = SmtpClient::connect(smtp.port()).await;
    c.cmd_expect("EHLO printer", 250).await;
    c.auth_xoauth2("scans@contoso.com", &token).await;

    // A rejected recipient; the good one still gets the message.
    smtp.reject_recipient("Nobody@contoso.com");
    c.cmd_expect("MAIL FROM:<scans@contoso.com>", 250).await;
    let r = c.cmd("RCPT TO:<nobody@contoso.com>").await;
    assert_eq!(r.code, 550);
    assert!(r.text().starts_with("5.1.1 "));
    c.cmd_expect("RCPT TO:<a@contoso.com>", 250).await;
    c.cmd_expect("DATA", 354).await;
    c.send_raw(b"x\r\n.\r\n").await.unwrap();
    assert_eq!(c.read_reply().await.unwrap().code, 250);
    assert_eq!(smtp.wait_for_messages(1, T).await[0].rcpts, ["a@contoso.com"]);

    // SIZE over the limit, declared or actual.
    assert_eq!(c.cmd("MAIL FROM:<s@c> SIZE=1001").await.wire(), replies::TOO_BIG);
    let big = "y".repeat(990) + "\r\n" + &"z".repeat(20) + "\r\n";
    let r = c.send_mail("s@c", &["a@c"], big.as_bytes()).await;
    assert_eq!(r.wire(), replies::TOO_BIG);

    // An injected reply for the next message only.
    smtp.set_data_reply(replies::SEND_AS_DENIED, Times::Next(1));
    assert_eq!(c.send_mail("s@c", &["a@c"], b"1\r\n").await.code, 554);
    assert_eq!(c.send_mail("s@c", &["a@c"], b"2\r\n").await.code, 250);
    assert_eq!(smtp.messages().len(), 2);

    // 421 and close after one message per connection.
    smtp.set_421_after(Some(1));
    let (mut c, _) = SmtpClient::connect(smtp.port()).await;
    c.cmd_expect("EHLO printer", 250).await;
    c.auth_xoauth2("scans@contoso.com", &token).await;
    assert_eq!(c.send_mail("s@c", &["a@c"], b"3\r\n").await.code, 250);
    assert_eq!(c.cmd("MAIL FROM:<s@c>").await.code, 421);
    assert!(c.read_reply().await.is_err(), "closed after 421");
    let st = smtp.stats();
    assert_eq!((st.messages_accepted, st.messages_rejected, st.closed_with_421), (3, 2, 1));
    assert_eq!(st.recipients_rejected, 1);
}

#[tokio::test]
async fn down_and_up_on_the_same_port() {
    let (_idp, smtp, _) = setup(Tls::None).await;
    let port = smtp.port();
    let (mut open, _) = SmtpClient::connect(port).await;
    open.cmd_expect("NOOP", 250).await;

    smtp.down().await;
    assert!(!smtp.is_up());
    assert!(open.read_reply().await.is_err(), "open connections are closed");
    let err = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect_err("connect while down");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    smtp.up().await;
    assert_eq!(smtp.port(), port);
    let (_c, greeting) = SmtpClient::connect(port).await;
    assert_eq!(greeting.code, 220);
    assert_eq!(smtp.stats().connections, 2);
}

#[tokio::test]
async fn stall_and_reset_mid_data() {
    let (_idp, smtp, token) = setup(Tls::None).await;

    smtp.set_stall(true);
    let mut c = SmtpClient::new(tokio::net::TcpStream::connect(smtp.addr()).await.unwrap());
    let waited = tokio::time::timeout(Duration::from_millis(300), c.read_reply()).await;
    assert!(waited.is_err(), "a stalled server says nothing");
    smtp.set_stall(false);
    assert_eq!(smtp.stats().stalled_connections, 1);

    smtp.set_reset_mid_data(Some(Times::Next(1)));
    let (mut c, _) = SmtpClient::connect(smtp.port()).await;
    c.cmd_expect("EHLO printer", 250).await;
    c.auth_xoauth2("scans@contoso.com", &token).await;
    c.cmd_expect("MAIL FROM:<scans@contoso.com>", 250).await;
    c.cmd_expect("RCPT TO:<a@contoso.com>", 250).await;
    c.cmd_expect("DATA", 354).await;
    c.send_raw(b"Subject: half\r\n").await.unwrap();
    assert!(c.read_reply().await.is_err(), "reset, no reply");
    smtp.wait_until(T, "a reset", |s| s.resets_mid_data == 1).await;

    // Only once: the next connection delivers.
    let (mut c, _) = SmtpClient::connect(smtp.port()).await;
    c.cmd_expect("EHLO printer", 250).await;
    c.auth_xoauth2("scans@contoso.com", &token).await;
    assert_eq!(c.send_mail("s@c", &["a@c"], b"ok\r\n").await.code, 250);
    assert_eq!(smtp.wait_for_messages(1, T).await.len(), 1);
}

#[tokio::test]
#[should_panic(expected = "no 1 accepted message(s) within")]
async fn wait_for_messages_times_out_with_a_clear_message() {
    let smtp = FakeSmtp::start(SmtpOptions::new(Tls::None, common::fake_smtp::accept_any_token())).await;
    smtp.wait_for_messages(1, Duration::from_millis(100)).await;
}

/// The relay's likely client library against the fake: STARTTLS with the
/// generated certificate, XOAUTH2, raw send; and what a refused token looks
/// like from lettre (it does not answer the 334 error challenge).
#[tokio::test]
async fn lettre_client_interop() {
    use lettre::address::Envelope;
    use lettre::transport::smtp::authentication::{Credentials, Mechanism};
    use lettre::transport::smtp::client::{Certificate, Tls as LettreTls, TlsParameters};
    use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};

    let (_idp, smtp, token) = setup(Tls::StartTls).await;
    let tls_params = TlsParameters::builder("localhost".into())
        .add_root_certificate(Certificate::from_pem(smtp.cert().cert_pem.as_bytes()).unwrap())
        .build_rustls()
        .unwrap();
    let transport = |tok: &str| {
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(smtp.port())
            .tls(LettreTls::Required(tls_params.clone()))
            .credentials(Credentials::new("scans@contoso.com".into(), tok.into()))
            .authentication(vec![Mechanism::Xoauth2])
            .timeout(Some(T))
            .build()
    };
    let envelope =
        Envelope::new(Some("scans@contoso.com".parse().unwrap()), vec!["a@contoso.com".parse().unwrap()]).unwrap();
    let raw = b"Subject: lettre\r\n\r\n.starts with a dot\r\n";
    transport(&token).send_raw(&envelope, raw).await.unwrap();
    let m = &smtp.wait_for_messages(1, T).await[0];
    // lettre always ends DATA with "\r\n.\r\n", so a message that already
    // ends in CRLF arrives with one more empty line.
    assert_eq!(m.data, [&raw[..], b"\r\n"].concat());
    assert!(m.tls);
    assert_eq!(m.user.as_deref(), Some("scans@contoso.com"));

    let err = transport("fake-at-refused").send_raw(&envelope, raw).await.unwrap_err();
    smtp.wait_until(T, "a refused AUTH", |s| s.auth_failures == 1).await;
    let last = smtp.auth_attempts().pop().unwrap();
    assert!(!last.success);
    assert!(!last.sent_empty_line(), "lettre: {err}; challenge reply {:?}", last.challenge_reply);
}

/// Exchange Online: a mailbox has at most 3 authenticated SMTP connections at once; the 4th
/// AUTH gets `432 4.3.2`, and a closed connection frees its place.
#[tokio::test]
async fn a_mailbox_has_at_most_three_connections() {
    let smtp = FakeSmtp::start(SmtpOptions::new(Tls::None, common::fake_smtp::accept_any_token())).await;
    let login = |user: &'static str| {
        let port = smtp.port();
        async move {
            let (mut c, _) = SmtpClient::connect(port).await;
            c.cmd_expect("EHLO relay.test", 250).await;
            let r = c.cmd(&format!("AUTH XOAUTH2 {}", common::xoauth2_b64(user, "t"))).await;
            (c, r)
        }
    };
    let mut open = Vec::new();
    for _ in 0..3 {
        let (c, r) = login("scans@contoso.test").await;
        assert_eq!(r.code, 235, "{}", r.wire());
        open.push(c);
    }
    let (_, r) = login("scans@contoso.test").await;
    assert_eq!(r.code, 432, "{}", r.wire());
    assert!(r.wire().contains("4.3.2 Concurrent connections limit exceeded"), "{}", r.wire());
    // Another mailbox is counted on its own.
    assert_eq!(login("other@contoso.test").await.1.code, 235);
    // One closes: its place is free again.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (c, r) = login("scans@contoso.test").await;
        if r.code == 235 {
            open.push(c);
            break;
        }
        assert!(Instant::now() < deadline, "the closed connection's place never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = smtp.stats();
    assert_eq!((stats.concurrency_refusals >= 1, stats.max_connections_of_a_user), (true, 3));
}
