//! `[notify]` end to end: the real binary, the fake provider and upstream, and a fake webhook
//! receiver on loopback. An identity whose refresh is refused produces one webhook in each
//! format and one mail through another, healthy identity; signing it in again produces one
//! "cleared" of each; nothing more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::relay::{pin_hash, World};

const OFFICE: &str = "office@contoso.test";
const IT: &str = "it@contoso.test";
const WAIT: Duration = Duration::from_secs(30);

/// What the fake receiver got: per format, the JSON bodies it accepted, and every request.
#[derive(Default)]
struct Received {
    accepted: HashMap<String, Vec<serde_json::Value>>,
    requests: HashMap<String, u32>,
    /// Requests still to refuse with 500, per format.
    refuse: HashMap<String, u32>,
}

/// A webhook receiver on 127.0.0.1: `POST /hook/<format>?sig=...` answers 202 (as a Teams
/// workflow does) unless told to refuse.
async fn receiver() -> (u16, Arc<Mutex<Received>>) {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    let got: Arc<Mutex<Received>> = Arc::default();
    async fn hook(
        State(got): State<Arc<Mutex<Received>>>,
        Path(format): Path<String>,
        body: axum::body::Bytes,
    ) -> StatusCode {
        let mut g = got.lock().unwrap();
        *g.requests.entry(format.clone()).or_default() += 1;
        if let Some(n) = g.refuse.get_mut(&format).filter(|n| **n > 0) {
            *n -= 1;
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
        match serde_json::from_slice(&body) {
            Ok(v) => {
                g.accepted.entry(format).or_default().push(v);
                StatusCode::ACCEPTED
            }
            Err(_) => StatusCode::BAD_REQUEST,
        }
    }
    let app = axum::Router::new().route("/hook/{format}", axum::routing::post(hook)).with_state(got.clone());
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(tcp, app).await });
    (port, got)
}

fn accepted(got: &Arc<Mutex<Received>>, format: &str) -> Vec<serde_json::Value> {
    got.lock().unwrap().accepted.get(format).cloned().unwrap_or_default()
}

fn mails_to_it(w: &World) -> Vec<crate::common::fake_smtp::Received> {
    w.upstream.messages().into_iter().filter(|m| m.rcpts.iter().any(|r| r == IT)).collect()
}

/// Waits until each format has `n` accepted webhooks and the upstream `n` mails for IT.
async fn wait_for(w: &World, got: &Arc<Mutex<Received>>, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let done = ["json", "teams", "slack"].iter().all(|f| accepted(got, f).len() >= n) && mails_to_it(w).len() >= n;
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "waited for {n} notification(s) of each: json {}, teams {}, slack {}, mails {}\n{}",
            accepted(got, "json").len(),
            accepted(got, "teams").len(),
            accepted(got, "slack").len(),
            mails_to_it(w).len(),
            w.relay.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn import(w: &World, name: &str, account: &str) {
    let token = w.idp.issue_refresh_token(account);
    let file = w.dir.path().join(format!("{name}.token"));
    std::fs::write(&file, token).unwrap();
    let (rc, out, err) = w.relay.cli(&["auth", "import", name, "--refresh-token-file", file.to_str().unwrap()], None);
    assert_eq!(rc, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_refresh_is_told_once_by_every_channel_and_its_fix_once() {
    let (port, got) = receiver().await;
    // Teams' first POST fails: the relay tries again.
    got.lock().unwrap().refuse.insert("teams".into(), 1);
    let w = World::start_with(
        |e| {
            format!(
                "{}\n[[identity]]\nname = \"scans\"\nprovider = \"fake\"\nemail = \"scans@contoso.test\"\nflow = \"client_credentials\"\n\n\
                 [[identity]]\nname = \"office\"\nprovider = \"fake\"\nemail = \"{OFFICE}\"\nflow = \"device_code\"\n\n\
                 [[device]]\nname = \"floor3\"\nidentity = \"scans\"\nusername = \"floor3\"\npin_hash = \"{}\"\n\n\
                 [[device]]\nname = \"office-mfp\"\nidentity = \"office\"\naddresses = [\"127.0.0.3/32\"]\n",
                e.provider,
                pin_hash()
            )
        },
        |_| {},
    )
    .await;
    // Short tokens: the refresher renews office's within seconds.
    w.idp.set_access_token_lifetime(Duration::from_secs(4));
    import(&w, "office", OFFICE).await;

    // Now the admin asks to be told, by reload.
    let mut text = std::fs::read_to_string(&w.relay.config).unwrap();
    text.push_str(&format!(
        "\n[notify]\nemail = \"{IT}\"\ncheck_every = \"1s\"\nwebhooks = [\n\
         {{ url = \"http://127.0.0.1:{port}/hook/json?sig=SECRET-json\", format = \"json\" }},\n\
         {{ url = \"http://127.0.0.1:{port}/hook/teams?sig=SECRET-teams\", format = \"teams\" }},\n\
         {{ url = \"http://127.0.0.1:{port}/hook/slack?sig=SECRET-slack\", format = \"slack\" }},\n]\n"
    ));
    std::fs::write(&w.relay.config, text).unwrap();
    let (rc, out, err) = w.relay.cli(&["reload"], None);
    assert_eq!(rc, 0, "{out}{err}");
    // All is well: nobody hears anything.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(got.lock().unwrap().requests.is_empty(), "{}", w.relay.log());
    assert!(mails_to_it(&w).is_empty());

    // The user's password changes: office's next refresh is refused (needs a sign-in).
    w.idp.revoke_account(OFFICE);
    wait_for(&w, &got, 1).await;
    let json = &accepted(&got, "json")[0];
    assert_eq!(json["event"], "started", "{json}");
    assert_eq!(json["condition"], "needs_login", "{json}");
    assert_eq!(json["subject"], "office", "{json}");
    assert_eq!(json["command"], "mfd-relay auth login office", "{json}");
    let status = format!("http://127.0.0.1:{}/status", w.relay.admin_port);
    assert!(json["status_url"].as_str().unwrap().starts_with(&status), "{json}");
    let teams = &accepted(&got, "teams")[0];
    let card = &teams["attachments"][0]["content"];
    assert_eq!(teams["attachments"][0]["contentType"], "application/vnd.microsoft.card.adaptive", "{teams}");
    assert_eq!(card["body"][0]["text"], "PROBLEM: Identity \"office\" needs a sign-in", "{teams}");
    assert!(card["body"][1]["text"].as_str().unwrap().contains("mfd-relay auth login office"), "{teams}");
    assert_eq!(got.lock().unwrap().requests["teams"], 2, "the refused POST was sent again");
    let slack = accepted(&got, "slack")[0]["text"].as_str().unwrap().to_string();
    assert!(slack.starts_with("*PROBLEM: Identity \"office\" needs a sign-in*"), "{slack}");
    assert!(slack.contains("mfd-relay auth login office") && slack.contains(&status), "{slack}");
    let mail = &mails_to_it(&w)[0];
    assert_eq!(mail.user.as_deref(), Some("scans@contoso.test"), "sent through the healthy identity");
    assert_eq!(mail.from, "scans@contoso.test");
    let data = mail.data_str();
    assert!(data.contains("Subject: [mfd-relay relay.test] PROBLEM: Identity \"office\" needs a sign-in"), "{data}");
    assert!(data.contains("mfd-relay auth login office") && data.contains(&status), "{data}");

    // Signed in again (a token imported): one "cleared" each, then silence.
    import(&w, "office", OFFICE).await;
    wait_for(&w, &got, 2).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    for format in ["json", "teams", "slack"] {
        assert_eq!(accepted(&got, format).len(), 2, "{format}: {:?}", accepted(&got, format));
    }
    assert_eq!(accepted(&got, "json")[1]["event"], "cleared");
    let mails = mails_to_it(&w);
    assert_eq!(mails.len(), 2, "{}", w.relay.log());
    assert!(
        mails[1].data_str().contains("RESOLVED: Identity \"office\" is signed in again"),
        "{}",
        mails[1].data_str()
    );
    assert_eq!(mails[1].user.as_deref(), Some("scans@contoso.test"));

    let (_, metrics) = w.relay.admin_get("/metrics");
    for channel in ["email", "json", "teams", "slack"] {
        let line = format!("mfd_relay_notifications_total{{channel=\"{channel}\",result=\"sent\"}} 2");
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
    // The webhook URLs carry tokens: the log names their host only.
    let log = w.relay.log();
    assert!(!log.contains("SECRET"), "{log}");
    assert!(log.contains("webhook=http://127.0.0.1"), "{log}");
}
