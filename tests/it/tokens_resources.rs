//! Access tokens per (identity, resource): an identity that sends through Microsoft Graph and
//! reads a mailbox over IMAP holds a Graph token and an Exchange Online token from one grant.
//! The fake provider refuses a token request spanning several resources (AADSTS28000) as
//! Entra does, and tells each resource's tokens apart (its bearer validator for Graph, its
//! token validator for the mail servers).
//!
//! The relay binary: a device-code sign-in consents to both resources and the background
//! refresher fetches Graph's token with its own request; app-only identities make one
//! client-credentials request per resource; `auth status` shows both. The real token manager
//! in process (what the Graph client calls): a rejected Graph token renews only Graph's, a
//! refresh token rotated by Graph's refresh serves the next mail refresh, and the refresher
//! renews each resource's token on its own schedule.

use std::sync::Arc;
use std::time::Duration;

use mfd_relay::oauth::provider::Resource;
use mfd_relay::oauth::tokens::TokenManager;

use crate::common::fake_oauth::{FakeOAuth, Grant, SeenRequest, GRAPH_RESOURCE};
use crate::common::relay::{CliProc, Env, World, CLIENT_ID, CLIENT_SECRET, SCANS};

const WAIT: Duration = Duration::from_secs(20);

const IMAP_SCOPE: &str = "https://outlook.office.com/IMAP.AccessAsUser.All";
const GRAPH_SEND: &str = "https://graph.microsoft.com/Mail.Send";
const GRAPH_RW: &str = "https://graph.microsoft.com/Mail.ReadWrite";
/// What a delegated Graph token is asked with.
const GRAPH_SCOPES: &str =
    "https://graph.microsoft.com/Mail.Send https://graph.microsoft.com/Mail.ReadWrite offline_access";
/// What the mail servers' token of a Graph sender with a mailbox is asked with.
const MAIL_SCOPES: &str = "https://outlook.office.com/IMAP.AccessAsUser.All offline_access";

/// A Microsoft provider "ms" on the fake endpoints (Graph's URL points at nothing: the scopes
/// must not follow it), the identity "scans" with `flow` sending through Graph, and a mailbox
/// read with it.
fn graph_sections(idp: &FakeOAuth, ca: &std::path::Path, smtp_port: u16, flow: &str) -> String {
    format!(
        "[[provider]]\nname = \"ms\"\nkind = \"microsoft\"\ntenant = \"contoso.test\"\n\
         client_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n\
         token_url = \"{}\"\ndevice_authorization_url = \"{}\"\nauthorization_url = \"{}\"\n\
         smtp = \"127.0.0.1:{smtp_port}\"\nsmtp_tls = \"starttls\"\nimap = \"127.0.0.1:9\"\nimap_tls = \"none\"\n\
         ca_file = \"{}\"\ngraph_url = \"http://127.0.0.1:9\"\n\n\
         [[identity]]\nname = \"scans\"\nprovider = \"ms\"\nemail = \"{SCANS}\"\nflow = \"{flow}\"\nsend_via = \"graph\"\n\n\
         [[mailbox]]\nname = \"print\"\nidentity = \"scans\"\nspool = \"spool\"\npoll_interval = \"10m\"\n",
        idp.token_url(),
        idp.devicecode_url(),
        idp.authorize_url(),
        ca.display()
    )
}

fn sections(flow: &'static str) -> impl FnOnce(&Env<'_>) -> String {
    move |e| graph_sections(e.idp, e.ca, e.smtp_port, flow)
}

/// Token requests the provider answered, in order.
fn token_requests(idp: &FakeOAuth) -> Vec<SeenRequest> {
    idp.requests().into_iter().filter(|r| r.path.ends_with("/token") && r.grant.is_some()).collect()
}

/// Waits until a token request satisfying `want` was answered with tokens.
async fn wait_request(idp: &FakeOAuth, what: &str, want: impl Fn(&SeenRequest) -> bool) -> SeenRequest {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(r) = token_requests(idp).into_iter().find(|r| r.status == 200 && want(r)) {
            return r;
        }
        assert!(tokio::time::Instant::now() < deadline, "no {what} within {WAIT:?}: {:#?}", idp.requests());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// No token request named several resources, nor was refused for it.
fn assert_one_resource_per_request(idp: &FakeOAuth) {
    for r in token_requests(idp) {
        let resources = r.scope.as_deref().map(crate::common::fake_oauth::scope_resources).unwrap_or_default();
        assert!(resources.len() <= 1, "a token request for several resources: {r:?}");
        assert_ne!(r.error.as_deref(), Some("invalid_scope"), "{r:?}");
    }
}

fn is_for(idp: &FakeOAuth, token: &str, resource: &str) -> bool {
    idp.bearer_validator(resource)(token).is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_consents_to_both_resources_and_each_token_has_its_own_request() {
    let w = World::start_with(sections("device_code"), |_| {}).await;
    let config = w.relay.config.clone();
    let mut cli =
        tokio::task::spawn_blocking(move || CliProc::start(&config, &["auth", "login", "scans"])).await.unwrap();
    let code = w.idp.wait_for_user_code(WAIT).await;
    let cli = tokio::task::spawn_blocking(move || {
        cli.wait_line("enter", WAIT);
        cli
    })
    .await
    .unwrap();
    w.idp.approve_device(&code, SCANS);
    let (status, out) = tokio::task::spawn_blocking(move || cli.wait(Duration::from_secs(60))).await.unwrap();
    assert_eq!(status, 0, "{out}\n{}", w.relay.log());

    // One consent for both resources, the sign-in resource (the mailbox's) first.
    let consent = w.idp.requests().into_iter().find(|r| r.path.ends_with("/devicecode")).unwrap().scope.unwrap();
    let consent: Vec<&str> = consent.split_whitespace().collect();
    assert_eq!(consent, vec![IMAP_SCOPE, GRAPH_SEND, GRAPH_RW, "offline_access", "openid", "profile"]);

    // The sign-in's token is the mail servers'; Graph's comes from the refresh token, asked
    // for with Graph's scopes alone, by the background refresher without anyone waiting.
    let signed_in =
        wait_request(&w.idp, "device-code token", |r| r.grant.as_deref() == Some(Grant::DeviceCode.as_str())).await;
    let mail_token = signed_in.issued_access_token.unwrap();
    assert!(w.idp.token_validator()(SCANS, &mail_token), "the mail servers take the sign-in's token");
    assert!(!is_for(&w.idp, &mail_token, GRAPH_RESOURCE), "Graph refuses an Outlook token");
    let graph = wait_request(&w.idp, "Graph token", |r| {
        r.grant.as_deref() == Some("refresh_token") && r.scope.as_deref() == Some(GRAPH_SCOPES)
    })
    .await;
    assert_eq!(graph.refresh_token, signed_in.issued_refresh_token, "from the sign-in's refresh token");
    let graph_token = graph.issued_access_token.unwrap();
    assert_eq!(w.idp.bearer_validator(GRAPH_RESOURCE)(&graph_token).as_deref(), Some(SCANS));
    assert!(!w.idp.token_validator()(SCANS, &graph_token), "the mail servers refuse a Graph token");
    assert_one_resource_per_request(&w.idp);

    // Both tokens shown, each with its expiry.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, status, _) = w.relay.cli(&["auth", "status"], None);
        if status.contains("graph token: expires in") {
            assert!(status.contains("mail token: expires in"), "{status}");
            assert!(status.contains("scans") && status.contains("ready"), "{status}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, json) = w.relay.admin_get("/api/auth/status");
    assert_eq!(code, 200, "{json}");
    let list: serde_json::Value = serde_json::from_str(&json).unwrap();
    let tokens = &list[0]["tokens"];
    assert_eq!(tokens[0]["resource"], "mail", "{json}");
    assert_eq!(tokens[1]["resource"], "graph", "{json}");
    assert!(tokens[0]["expires_at"].is_i64() && tokens[1]["expires_at"].is_i64(), "{json}");
    assert!(list[0]["expires_at"].is_i64(), "the existing field stays: {json}");
    let (_, page) = w.relay.admin_get("/status");
    assert!(page.contains("data-resource=\"graph\">graph: expires in"), "{page}");
    // No token in the relay's log.
    let log = w.relay.log();
    assert!(!log.contains("fake-at-") && !log.contains("fake-rt-"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_code_is_redeemed_for_the_sign_in_resource_only() {
    let w = World::start_with(sections("auth_code"), |_| {}).await;
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
    // The consent names both resources.
    let query: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(url.split_once('?').unwrap().1.as_bytes()).into_owned().collect();
    assert_eq!(query["scope"], format!("{IMAP_SCOPE} {GRAPH_SEND} {GRAPH_RW} offline_access openid profile"), "{url}");
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::limited(5)).build().unwrap();
    let page = client.get(&url).send().await.unwrap().text().await.unwrap();
    assert!(page.contains("Signed in"), "{page}");
    let (status, out) = tokio::task::spawn_blocking(move || cli.wait(Duration::from_secs(30))).await.unwrap();
    assert_eq!(status, 0, "{out}");
    // The redemption names the mailbox's resource (Entra refuses two), then Graph's token
    // comes from the refresh token.
    let redeemed =
        wait_request(&w.idp, "code redemption", |r| r.grant.as_deref() == Some(Grant::AuthorizationCode.as_str()))
            .await;
    assert_eq!(redeemed.scope.as_deref(), Some(format!("{MAIL_SCOPES} openid profile").as_str()));
    assert!(w.idp.token_validator()(SCANS, redeemed.issued_access_token.as_deref().unwrap()));
    let graph = wait_request(&w.idp, "Graph token", |r| r.scope.as_deref() == Some(GRAPH_SCOPES)).await;
    assert!(is_for(&w.idp, graph.issued_access_token.as_deref().unwrap(), GRAPH_RESOURCE));
    assert_one_resource_per_request(&w.idp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_only_gets_each_resource_s_default_scope_by_its_own_client_credentials_request() {
    let w = World::start_with(sections("client_credentials"), |_| {}).await;
    // At start, the refresher fetches both, one request each.
    let mail = wait_request(&w.idp, "Exchange token", |r| {
        r.grant.as_deref() == Some("client_credentials")
            && r.scope.as_deref() == Some("https://outlook.office365.com/.default")
    })
    .await;
    let graph = wait_request(&w.idp, "Graph token", |r| {
        r.grant.as_deref() == Some("client_credentials")
            && r.scope.as_deref() == Some("https://graph.microsoft.com/.default")
    })
    .await;
    assert!(is_for(&w.idp, graph.issued_access_token.as_deref().unwrap(), GRAPH_RESOURCE));
    assert!(w.idp.token_validator()(SCANS, mail.issued_access_token.as_deref().unwrap()));
    assert_eq!(w.idp.token_requests(Grant::ClientCredentials), 2, "{:#?}", w.idp.requests());
    assert_one_resource_per_request(&w.idp);

    // "Fetch a token now" (auth login of an app-only identity) renews both.
    let (code, out, err) = w.relay.cli(&["auth", "login", "scans"], None);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(w.idp.token_requests(Grant::ClientCredentials), 4, "{:#?}", w.idp.requests());
    let (_, status, _) = w.relay.cli(&["auth", "status"], None);
    assert!(status.contains("mail token: expires in") && status.contains("graph token: expires in"), "{status}");
    assert_one_resource_per_request(&w.idp);
}

/// The real token manager in this process, over the fake provider: the identity "scans"
/// (device code, Graph and a mailbox) signed in with a refresh token consenting to both.
struct InProcess {
    idp: FakeOAuth,
    tokens: Arc<TokenManager>,
    _dir: tempfile::TempDir,
}

async fn in_process() -> InProcess {
    let idp = FakeOAuth::start().await;
    idp.register_client(crate::common::fake_oauth::ClientApp::public(CLIENT_ID).secret(CLIENT_SECRET));
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[relay]\nhostname = \"relay.test\"\ndata_dir = \"data\"\n\n[[listener]]\nlisten = \"127.0.0.1:2525\"\n\n{}",
        graph_sections(&idp, &dir.path().join("none.pem"), 9, "device_code").replace("ca_file", "# ca_file")
    );
    let config = mfd_relay::config::Config::parse(&dir.path().join("config.toml"), text).unwrap();
    std::fs::create_dir_all(config.data_dir()).unwrap();
    let store = Arc::new(mfd_relay::store::Store::open(&config.data_dir(), vec![]).unwrap());
    let vault = Arc::new(mfd_relay::oauth::vault::Vault::open(&config.key_file(), None).unwrap());
    let tokens = Arc::new(TokenManager::new(&config, store, vault, None).unwrap());
    let consent = format!("{IMAP_SCOPE} {GRAPH_SEND} {GRAPH_RW} offline_access openid profile");
    let rt = idp.issue_refresh_token_with_scope(SCANS, &consent);
    tokens.import_refresh_token("scans", &rt).await.unwrap();
    InProcess { idp, tokens, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_graph_token_renews_only_graph_s_and_its_rotated_refresh_token_serves_mail() {
    let p = in_process().await;
    let (idp, tokens) = (&p.idp, &p.tokens);
    let mail = tokens.access_token("scans").await.unwrap();
    assert!(idp.token_validator()(SCANS, &mail.secret));
    let graph = tokens.access_token_for("scans", Resource::Graph).await.unwrap();
    assert!(is_for(idp, &graph.secret, GRAPH_RESOURCE), "a Graph token for Graph");
    assert!(!is_for(idp, &mail.secret, GRAPH_RESOURCE));
    let scopes: Vec<_> = token_requests(idp).into_iter().map(|r| r.scope.unwrap_or_default()).collect();
    assert_eq!(scopes, vec![MAIL_SCOPES, GRAPH_SCOPES]);
    // Each cached under its resource: no more requests.
    assert_eq!(tokens.access_token_for("scans", Resource::Graph).await.unwrap().secret, graph.secret);
    assert_eq!(tokens.access_token_for("scans", Resource::Mail).await.unwrap().secret, mail.secret);
    assert_eq!(token_requests(idp).len(), 2);

    // Graph refuses its token (revoked): only Graph's is renewed.
    idp.revoke_access_token(&graph.secret);
    assert!(!is_for(idp, &graph.secret, GRAPH_RESOURCE));
    let renewed = tokens.refresh_after_rejection_for("scans", Resource::Graph, &graph).await.unwrap();
    assert_ne!(renewed.secret, graph.secret);
    assert!(is_for(idp, &renewed.secret, GRAPH_RESOURCE));
    let seen = token_requests(idp);
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[2].scope.as_deref(), Some(GRAPH_SCOPES));
    assert_eq!(tokens.access_token("scans").await.unwrap().secret, mail.secret, "the mail token is untouched");
    assert!(idp.token_validator()(SCANS, &mail.secret));

    // The Graph refresh rotated the refresh token; the old one dies: the next mail refresh
    // must present the new one.
    let rotated = seen[2].issued_refresh_token.clone().unwrap();
    idp.revoke_refresh_token(seen[2].refresh_token.as_deref().unwrap());
    let new_mail = tokens.refresh_after_rejection("scans", &mail).await.unwrap();
    let seen = token_requests(idp);
    assert_eq!(seen.len(), 4);
    assert_eq!(
        (seen[3].scope.as_deref(), seen[3].refresh_token.as_deref()),
        (Some(MAIL_SCOPES), Some(rotated.as_str()))
    );
    assert_eq!(seen[3].status, 200, "{:?}", seen[3]);
    assert!(idp.token_validator()(SCANS, &new_mail.secret));
    assert_eq!(tokens.access_token_for("scans", Resource::Graph).await.unwrap().secret, renewed.secret);

    // Graph's tokens expire early (Graph answers 401): again, only Graph's is renewed.
    idp.expire_access_tokens_for(GRAPH_RESOURCE);
    assert!(!is_for(idp, &renewed.secret, GRAPH_RESOURCE));
    let third = tokens.refresh_after_rejection_for("scans", Resource::Graph, &renewed).await.unwrap();
    assert!(is_for(idp, &third.secret, GRAPH_RESOURCE));
    let seen = token_requests(idp);
    assert_eq!((seen.len(), seen[4].scope.as_deref()), (5, Some(GRAPH_SCOPES)));
    assert_eq!(tokens.access_token("scans").await.unwrap().secret, new_mail.secret);
    assert!(idp.token_validator()(SCANS, &new_mail.secret), "the mail token still works");
    assert_one_resource_per_request(idp);
    let st = tokens.status().into_iter().find(|s| s.name == "scans").unwrap();
    assert_eq!(st.state, "ready", "{st:?}");
    assert_eq!(st.tokens.len(), 2, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refresher_renews_the_graph_token_ahead_of_its_expiry_and_leaves_the_mail_token() {
    let p = in_process().await;
    let (idp, tokens) = (&p.idp, &p.tokens);
    let mail = tokens.access_token("scans").await.unwrap();
    // Graph's token is short-lived: due for refresh in a couple of seconds.
    idp.set_access_token_lifetime(Duration::from_secs(4));
    let graph = tokens.access_token_for("scans", Resource::Graph).await.unwrap();
    idp.set_access_token_lifetime(Duration::from_secs(3600));
    let before = token_requests(idp).len();
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let refresher = tokio::spawn(tokens.clone().run_refresher(shutdown));
    let deadline = tokio::time::Instant::now() + WAIT;
    while token_requests(idp).len() == before {
        assert!(tokio::time::Instant::now() < deadline, "no refresh by the refresher: {:#?}", idp.requests());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renewed = token_requests(idp)[before].clone();
    assert_eq!((renewed.scope.as_deref(), renewed.status), (Some(GRAPH_SCOPES), 200), "{renewed:?}");
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(15), refresher).await.unwrap().unwrap();
    assert!(
        token_requests(idp)[before..].iter().all(|r| r.scope.as_deref() == Some(GRAPH_SCOPES)),
        "{:#?}",
        idp.requests()
    );
    assert_eq!(tokens.access_token("scans").await.unwrap().secret, mail.secret, "the mail token is untouched");
    let now_graph = tokens.access_token_for("scans", Resource::Graph).await.unwrap();
    assert_eq!(Some(now_graph.secret.as_str()), renewed.issued_access_token.as_deref());
    assert!(now_graph.expires_at > graph.expires_at + 3000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_refuses_a_token_request_for_two_resources_like_entra() {
    let idp = FakeOAuth::start().await;
    idp.register_client(crate::common::fake_oauth::ClientApp::public(CLIENT_ID).secret(CLIENT_SECRET));
    let rt = idp.issue_refresh_token_with_scope(SCANS, &format!("{IMAP_SCOPE} {GRAPH_SEND} offline_access"));
    let http = reqwest::Client::new();
    let ask = |scope: String| {
        let (http, url, rt) = (http.clone(), idp.token_url(), rt.clone());
        async move {
            let form = [
                ("grant_type", "refresh_token".to_string()),
                ("refresh_token", rt),
                ("client_id", CLIENT_ID.to_string()),
                ("scope", scope),
            ];
            let resp = http.post(url).form(&form).send().await.unwrap();
            (resp.status().as_u16(), resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, body) = ask(format!("{IMAP_SCOPE} {GRAPH_SEND} offline_access")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_scope");
    assert_eq!(body["error_codes"][0], 28000);
    assert!(body["error_description"].as_str().unwrap().starts_with("AADSTS28000: Provided value for the input parameter scope is not valid because it contains more than one resource."), "{body}");
    let (status, body) = ask(format!("{GRAPH_SEND} offline_access")).await;
    assert_eq!(status, 200, "{body}");
    let at = body["access_token"].as_str().unwrap();
    assert!(is_for(&idp, at, GRAPH_RESOURCE) && !idp.token_validator()(SCANS, at));
    // Google: a gmail.send token is for the Gmail API, not for IMAP or SMTP.
    let send_only = idp.issue_access_token_with_scope(SCANS, "https://www.googleapis.com/auth/gmail.send");
    assert!(idp.bearer_validator("https://www.googleapis.com/auth/gmail.send")(&send_only).is_some());
    assert!(!idp.token_validator()(SCANS, &send_only));
    assert!(!is_for(&idp, &send_only, GRAPH_RESOURCE));
}
