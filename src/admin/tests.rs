//! The admin router in process: which routes ask for credentials, and what a browser gets.

use super::*;
use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "test-admin-token";

/// An admin listener on a free loopback port over a fresh data directory.
async fn start(dir: &std::path::Path) -> (Admin, u16, tokio::sync::watch::Sender<bool>) {
    let text = format!(
        "[relay]\nhostname = \"relay.test\"\ndata_dir = \"data\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"
    );
    let config = Config::parse(&dir.join("config.toml"), text).unwrap();
    let admin = ops::Offline::open(config).await.unwrap().admin();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(admin.clone().serve(tcp, rx));
    (admin, port, tx)
}

/// One HTTP/1.1 request; returns (status, raw head, body).
async fn get(port: u16, path: &str, auth: Option<&str>) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let auth = auth.map(|a| format!("Authorization: {a}\r\n")).unwrap_or_default();
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

#[test]
fn escapes_html() {
    assert_eq!(html_escape("a<b>&\"c\"'d'"), "a&lt;b&gt;&amp;&quot;c&quot;&#39;d&#39;");
    assert_eq!(html_escape("plain é"), "plain é");
}

#[tokio::test]
async fn token_only_protects_everything_but_health_and_tells_a_browser_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let (_admin, port, _stop) = start(dir.path()).await;
    let bearer = format!("Bearer {TOKEN}");

    assert_eq!(get(port, "/healthz", None).await.0, 200);
    let (code, head, _) = get(port, "/", None).await;
    assert_eq!(code, 303);
    assert!(head.contains("location: /status"), "{head}");
    for path in ["/metrics", "/readyz", "/status", "/api/queue", "/api/auth/status"] {
        let (code, head, _) = get(port, path, None).await;
        assert_eq!(code, 401, "{path}");
        assert!(head.contains("www-authenticate: bearer realm=\"mfd-relay admin\""), "{path}: {head}");
        assert!(!head.contains("basic"), "no basic challenge while basic auth is off: {head}");
        assert_eq!(get(port, path, Some(&bearer)).await.0, 200, "{path}");
    }
    let (_, _, body) = get(port, "/api/queue", None).await;
    assert_eq!(body, "admin token required\n", "the CLI shows this text");
    let (_, head, body) = get(port, "/status", None).await;
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(body.contains("basic_auth_user") && body.contains("mfd-relay hash-pin"), "{body}");
    assert_eq!(get(port, "/api/queue", Some(&bearer)).await.2, r#"{"messages":[],"total":0,"limit":100}"#);
}

#[tokio::test]
async fn basic_auth_lets_a_person_in() {
    let dir = tempfile::tempdir().unwrap();
    let (admin, port, _stop) = start(dir.path()).await;
    let config = Config::parse(
        &dir.path().join("config.toml"),
        "[relay]\nhostname = \"relay.test\"\ndata_dir = \"data\"\n[admin]\nlisten = \"127.0.0.1:0\"\n".into(),
    )
    .unwrap();
    let hash = crate::credentials::hash("s3cret pass").unwrap();
    admin.set_view(View {
        access: Access::new(Some(TOKEN.into()), Some(("admin".into(), hash.clone()))),
        ..View::from_config(&config)
    });

    let (code, head, body) = get(port, "/status", None).await;
    assert_eq!(code, 401);
    assert!(head.contains("www-authenticate: basic realm=\"mfd-relay admin\", charset=\"utf-8\""), "{head}");
    assert!(body.contains("Sign in with the admin user and password"), "{body}");
    assert_eq!(get(port, "/status", Some(&basic("admin", "wrong"))).await.0, 401);
    assert_eq!(get(port, "/status", Some(&basic("root", "s3cret pass"))).await.0, 401);

    let (code, head, page) = get(port, "/status", Some(&basic("admin", "s3cret pass"))).await;
    assert_eq!(code, 200, "{page}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    assert!(head.contains("content-security-policy: default-src 'none'"), "{head}");
    assert!(page.contains("mfd-relay <span>relay.test</span>") && page.contains("All good."), "{page}");
    assert!(!page.contains(&hash) && !page.contains(TOKEN), "no credential on the page");
    // The same person may read the API and metrics; programs keep using the token.
    assert_eq!(get(port, "/metrics", Some(&basic("admin", "s3cret pass"))).await.0, 200);
    assert_eq!(get(port, "/api/queue", Some(&format!("Bearer {TOKEN}"))).await.0, 200);

    // A reload without basic auth takes it away again.
    admin.set_view(View::from_config(&config));
    assert_eq!(get(port, "/status", Some(&basic("admin", "s3cret pass"))).await.0, 200, "open: no credentials set");
}

#[tokio::test]
async fn the_cli_client_reads_the_typed_answers_of_the_api() {
    use ops::{Client, ClientError};
    let dir = tempfile::tempdir().unwrap();
    let (_admin, port, _stop) = start(dir.path()).await;
    let wait = std::time::Duration::from_secs(10);
    let c = Client::at(format!("http://127.0.0.1:{port}"), Some(TOKEN.into()), wait).unwrap();
    let page = c.send(&ops::QueueList::default(), false).await.unwrap().unwrap();
    assert!(page.messages.is_empty() && page.total == 0 && page.next_after.is_none(), "{page:?}");
    // A POST from the client passes the guard (JSON body) and the access check (token).
    assert_eq!(c.send(&ops::QueueRetry { which: "all".into() }, false).await.unwrap().unwrap().retried, 0);
    let refused = |r: Result<Option<ops::Dropped>, ClientError>| match r {
        Err(ClientError::Refused { status, text }) => (status.as_u16(), text),
        other => panic!("{other:?}"),
    };
    let (status, text) = refused(c.send(&ops::QueueDrop { id: "nope".into() }, false).await);
    assert_eq!(status, 400);
    assert!(text.starts_with("\"nope\" is not a queue id"), "{text}");
    let (status, text) = refused(c.send(&ops::QueueDrop { id: "0000000000000001".into() }, false).await);
    assert_eq!((status, text.as_str()), (404, "no queued message 0000000000000001"));
    // A process that cannot reload says so.
    match c.send(&ops::Reload, true).await {
        Err(ClientError::Refused { status, text }) => {
            assert_eq!((status.as_u16(), text.as_str()), (503, "reload is not available here"))
        }
        other => panic!("{other:?}"),
    }
    // Without the token: the API's own refusal text.
    let anonymous = Client::at(format!("http://127.0.0.1:{port}"), None, wait).unwrap();
    match anonymous.send(&ops::QueueList::default(), false).await {
        Err(ClientError::Refused { status, text }) => {
            assert_eq!((status.as_u16(), text.as_str()), (401, "admin token required"))
        }
        other => panic!("{other:?}"),
    }
    // Nothing listening: no daemon, so the CLI works on the data directory instead.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    assert!(Client::at(dead, None, wait).unwrap().send(&ops::QueueList::default(), false).await.unwrap().is_none());
}

#[tokio::test]
async fn a_published_generation_is_what_the_admin_uses_next() {
    let dir = tempfile::tempdir().unwrap();
    let config_with = |admin: &str| {
        let text = format!(
            "[relay]\nhostname = \"relay.test\"\ndata_dir = \"data\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n{admin}"
        );
        Config::parse(&dir.path().join("config.toml"), text).unwrap()
    };
    let first = config_with(&format!("token = \"{TOKEN}\"\n"));
    let shared = crate::generation::Shared::open(&first).await.unwrap();
    let generation = Generation::build(first, &shared, None).unwrap();
    let (publish, current) = tokio::sync::watch::channel(Arc::new(generation));
    let admin = Admin::new(Deps {
        queue: shared.queue.clone(),
        logins: shared.logins.clone(),
        activity: shared.activity.clone(),
        current: current.clone(),
        reload: None,
    });
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(admin.serve(tcp, rx));
    assert_eq!(get(port, "/api/queue", None).await.0, 401, "the first generation wants the token");

    // A reload publishes a generation without the token: the next request needs none.
    let running = current.borrow().clone();
    let next = Generation::build(config_with(""), &shared, Some(&running)).unwrap();
    publish.send_replace(Arc::new(next));
    assert_eq!(get(port, "/api/queue", None).await.0, 200);
}

#[tokio::test]
async fn the_return_from_a_sign_in_goes_on_to_the_status_page_with_its_result() {
    let dir = tempfile::tempdir().unwrap();
    let text = "[relay]\nhostname = \"relay.test\"\ndata_dir = \"data\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
                [[provider]]\nname = \"idp\"\nkind = \"generic\"\nclient_id = \"app\"\n\
                token_url = \"http://127.0.0.1:9/token\"\nauthorization_url = \"http://127.0.0.1:9/authorize\"\n\
                scopes = [\"mail\"]\nsmtp = \"127.0.0.1:25\"\n\n\
                [[identity]]\nname = \"web desk\"\nprovider = \"idp\"\nemail = \"web@contoso.test\"\nflow = \"auth_code\"\n";
    let config = Config::parse(&dir.path().join("config.toml"), text.into()).unwrap();
    let offline = ops::Offline::open(config).await.unwrap();
    // The daemon's listener (the offline CLI's own one keeps its "close this window" page).
    let admin = Admin::new(Deps {
        queue: offline.shared.queue.clone(),
        logins: offline.shared.logins.clone(),
        activity: offline.shared.activity.clone(),
        current: offline.current.clone(),
        reload: None,
    });
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(admin.serve(tcp, rx));

    // A browser sign-in started (no network: only its address is made), then declined.
    let start = ops::AuthLogin { identity: "web desk".into() }.run(&offline.auth_ops()).await.unwrap();
    let crate::oauth::login::LoginStart::AuthCode { url, .. } = start else { panic!("{start:?}") };
    let state = url::Url::parse(&url).unwrap().query_pairs().find(|(k, _)| k == "state").unwrap().1.to_string();
    let (code, head, _) =
        get(port, &format!("/oauth/callback?state={state}&error=access_denied&error_description=declined"), None).await;
    assert_eq!(code, 303, "{head}");
    assert!(head.contains("location: /status?signin=web+desk#identities"), "{head}");
    // The page shows what the sign-in itself says, whatever the link says.
    let (code, _, page) = get(port, "/status?signin=web+desk", None).await;
    assert_eq!(code, 200);
    assert!(page.contains("<span>Sign-in failed</span>") && page.contains("access_denied: declined"), "{page}");
    let (_, _, page) = get(port, "/status?signin=nobody", None).await;
    assert!(!page.contains("id=signin-result"), "an identity that is not configured shows nothing");
    // A state used once, or never issued, stays an error page: nothing to show on /status.
    let (code, _, page) = get(port, &format!("/oauth/callback?state={state}&code=x"), None).await;
    assert_eq!(code, 400);
    assert!(page.contains("Sign-in failed") && page.contains("unknown or already used"), "{page}");
}
