//! Scale (issue 15): a backlog drains at the upstream's speed, not at a fixed pace of the
//! retry runner, and listings page instead of loading the whole queue.

use crate::common;

use std::time::{Duration, Instant};

use crate::common::relay::{RawClient, World};

/// Queues `n` messages over one logged-in connection (the upstream is down, so each is
/// acknowledged as queued).
fn queue_messages(port: u16, n: usize) {
    let mut c = RawClient::connect(port);
    assert!(c.cmd("EHLO printer", "\r\n").starts_with("250"));
    let auth = format!("AUTH PLAIN {}", common::b64(b"\0floor3\x001234"));
    assert!(c.cmd(&auth, "\r\n").starts_with("235"));
    for i in 0..n {
        assert!(c.cmd("MAIL FROM:<scanner@printer.local>", "\r\n").starts_with("250"));
        assert!(c.cmd("RCPT TO:<someone@contoso.test>", "\r\n").starts_with("250"));
        assert!(c.cmd("DATA", "\r\n").starts_with("354"));
        let r = c.cmd(&format!("Subject: backlog {i}\r\n\r\nscan {i}\r\n."), "\r\n");
        assert!(r.starts_with("250") && r.contains("queued"), "{i}: {r}");
    }
    c.cmd("QUIT", "\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drains_at_the_upstream_s_speed_and_lists_in_pages() {
    const N: usize = 500;
    let w = World::start(|s| s.relay_extra.push_str("upstream_pool = 3\n")).await;
    w.upstream.down().await;
    let port = w.relay.smtp_port;
    tokio::task::spawn_blocking(move || queue_messages(port, N)).await.unwrap();

    // The API pages (100 by default) with the total and a cursor to the next page.
    let (code, body) = w.relay.admin_get("/api/queue");
    assert_eq!(code, 200, "{body}");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page["total"], N, "{body}");
    assert_eq!(page["limit"], 100);
    let first = page["messages"].as_array().unwrap();
    assert_eq!(first.len(), 100);
    assert!(first.iter().all(|m| m["identity"] == "scans" && m["rcpts"][0] == "someone@contoso.test"));
    let next = page["next_after"].as_str().unwrap().to_string();
    assert_eq!(first[99]["id"].as_u64().map(|id| format!("{id:016X}")), Some(next.clone()));
    let (_, body) = w.relay.admin_get(&format!("/api/queue?after={next}&limit=1000"));
    let rest: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(rest["messages"].as_array().unwrap().len(), N - 100, "the rest, from the cursor on");
    assert!(rest["next_after"].is_null(), "the last page: {}", &body[..200.min(body.len())]);
    let (code, _) = w.relay.admin_get("/api/queue?after=nonsense");
    assert_eq!(code, 400);
    // The CLI shows one page and says how to get the next.
    let (_, out, err) = w.relay.cli(&["queue", "list", "--limit", "10"], None);
    assert_eq!(out.lines().filter(|l| l.contains("someone@contoso.test")).count(), 10, "{out}{err}");
    assert!(out.contains(&format!("10 shown of {N} queued; next page: mfd-relay queue list --after ")), "{out}");

    // The upstream comes back and the admin retries everything: the whole backlog arrives in
    // a few seconds (a runner that moves one batch of 32 a second needs 16).
    w.upstream.up().await;
    let started = Instant::now();
    let (code, out, err) = w.relay.cli(&["queue", "retry", "all"], None);
    assert_eq!(code, 0, "{out}{err}");
    let got = w.upstream.wait_for_messages(N, Duration::from_secs(30)).await;
    let took = started.elapsed();
    eprintln!("drained {N} messages in {took:?}");
    assert_eq!(got.len(), N, "{}", w.relay.log());
    assert!(took < Duration::from_secs(8), "{N} messages took {took:?}");
    let mut subjects: Vec<String> = got
        .iter()
        .filter_map(|m| m.data_str().lines().find(|l| l.starts_with("Subject: backlog ")).map(str::to_string))
        .collect();
    subjects.sort();
    subjects.dedup();
    assert_eq!(subjects.len(), N, "each message once");
    let stats = w.upstream.stats();
    assert!(stats.max_connections_of_a_user <= 3, "never more attempts than the pool: {stats:?}");
    // The removals were committed: nothing is listed and nothing is sent again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, body) = w.relay.admin_get("/api/queue");
    let page: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((page["total"].as_u64(), page["messages"].as_array().map(Vec::len)), (Some(0), Some(0)), "{body}");
    assert_eq!(w.upstream.messages().len(), N);
}
