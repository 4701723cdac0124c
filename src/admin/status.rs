//! The status page (`GET /status`): what a person looks at first when a printer complains.
//! Identities with their token state and expiry, devices with last seen / messages today /
//! last error, the queue with its oldest messages, and the mobile-print mailboxes with their
//! last check, on one plain HTML page (a little inline CSS, no JavaScript) that reloads
//! itself every [`REFRESH_SECONDS`].
//!
//! [`collect`] gathers a [`Status`] from the running parts; [`render`] is a pure function of
//! it (no clock, no I/O), so the page is tested as text below. Every value goes through
//! [`html_escape`]. Nothing secret is in a [`Status`] to begin with: tokens appear only as
//! their expiry, devices only as their name, identity and addresses (no username, no PIN
//! hash), providers only by name.

use std::fmt::Write as _;

use crate::activity::{Activity, DeviceActivity, MailboxActivity};
use crate::admin::html_escape;
use crate::config::Config;
use crate::oauth::tokens::{IdentityStatus, TokenManager};
use crate::queue::{Queue, QueueRecord};

/// The page reloads itself this often (a `<meta http-equiv=refresh>`).
pub const REFRESH_SECONDS: u32 = 30;
/// Queued messages listed on the page, oldest first; `mfd-relay queue list` has them all.
pub const QUEUE_ROWS: usize = 10;
/// A message queued longer than this is called out at the top of the page.
pub const QUEUE_AGE_WARNING: i64 = 15 * 60;
/// A device error younger than this is shown in red.
const RECENT_ERROR: i64 = 3600;
/// Error texts longer than this are cut (the full text is in the log).
const MAX_ERROR_CHARS: usize = 300;

/// A configured device as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub identity: String,
    /// The device logs in (AUTH with username and PIN).
    pub logs_in: bool,
    pub addresses: Vec<String>,
}

/// A configured mobile-print mailbox as the page shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxInfo {
    pub name: String,
    pub identity: String,
    pub folder: String,
    /// Seconds between checks when the server has no IDLE.
    pub poll_interval: u64,
}

impl DeviceInfo {
    pub fn from_config(config: &Config) -> Vec<DeviceInfo> {
        config
            .devices
            .iter()
            .map(|d| {
                let d = d.get_ref();
                DeviceInfo {
                    name: d.name.get_ref().clone(),
                    identity: d.identity.get_ref().clone(),
                    logs_in: d.username.is_some(),
                    addresses: d.addresses.iter().map(|a| a.get_ref().to_string()).collect(),
                }
            })
            .collect()
    }
}

impl MailboxInfo {
    pub fn from_config(config: &Config) -> Vec<MailboxInfo> {
        config
            .mailboxes
            .iter()
            .map(|m| {
                let m = m.get_ref();
                MailboxInfo {
                    name: m.name.get_ref().clone(),
                    identity: m.identity.get_ref().clone(),
                    folder: m.folder.clone(),
                    poll_interval: m.poll_interval.0.as_secs(),
                }
            })
            .collect()
    }

    /// No successful check for this long means the mailbox is stuck.
    pub fn stale_after(&self) -> i64 {
        (3 * self.poll_interval as i64).max(600)
    }
}

/// Everything the page shows, at one moment.
#[derive(Debug, Clone)]
pub struct Status {
    /// Unix seconds when this was collected.
    pub now: i64,
    pub hostname: String,
    pub version: String,
    /// Unix seconds when the relay started.
    pub started: i64,
    pub identities: Vec<IdentityRow>,
    pub devices: Vec<DeviceRow>,
    pub queue: QueueView,
    pub mailboxes: Vec<MailboxRow>,
}

#[derive(Debug, Clone)]
pub struct IdentityRow {
    pub status: IdentityStatus,
    /// Messages in the queue for this identity.
    pub queued: usize,
}

#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub info: DeviceInfo,
    pub activity: DeviceActivity,
}

#[derive(Debug, Clone)]
pub struct MailboxRow {
    pub info: MailboxInfo,
    pub activity: MailboxActivity,
}

#[derive(Debug, Clone, Default)]
pub struct QueueView {
    pub depth: usize,
    /// The oldest messages (at most [`QUEUE_ROWS`]), oldest first.
    pub oldest: Vec<QueueRecord>,
    /// Why the queue could not be read, if it could not.
    pub error: Option<String>,
    /// Message files found without a record at start-up and moved aside.
    pub set_aside: usize,
    /// Where they are.
    pub set_aside_dir: String,
}

/// The parts of the running relay the page reads.
pub struct Sources<'a> {
    pub hostname: &'a str,
    pub started: i64,
    pub tokens: &'a TokenManager,
    pub queue: &'a Queue,
    pub activity: &'a Activity,
    pub devices: &'a [DeviceInfo],
    pub mailboxes: &'a [MailboxInfo],
}

/// Reads the current state (a page of the queue records: run it off the async workers).
pub fn collect(src: &Sources<'_>, now: i64) -> Status {
    // One page of the oldest records (ids sort by arrival) and counts from the in-memory
    // schedule: the page never loads the whole queue.
    let (records, error) = match src.queue.page(None, QUEUE_ROWS) {
        Ok(v) => (v, None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let identities = src
        .tokens
        .status()
        .into_iter()
        .map(|status| {
            let queued = src.queue.depth_of(&status.name);
            IdentityRow { status, queued }
        })
        .collect();
    let devices =
        src.devices.iter().map(|d| DeviceRow { info: d.clone(), activity: src.activity.device(&d.name) }).collect();
    let mailboxes =
        src.mailboxes.iter().map(|m| MailboxRow { info: m.clone(), activity: src.activity.mailbox(&m.name) }).collect();
    let depth = src.queue.depth();
    Status {
        now,
        hostname: src.hostname.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started: src.started,
        identities,
        devices,
        queue: QueueView {
            depth,
            oldest: records,
            error,
            set_aside: src.queue.set_aside_count(),
            set_aside_dir: src.queue.spool().set_aside_dir().display().to_string(),
        },
        mailboxes,
    }
}

fn e(s: &str) -> String {
    html_escape(s)
}

/// "42 s", "5 min", "3 h 5 min", "2 d 3 h".
pub fn span(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=86399 if s % 3600 / 60 == 0 => format!("{} h", s / 3600),
        3600..=86399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ if s % 86400 / 3600 == 0 => format!("{} d", s / 86400),
        _ => format!("{} d {} h", s / 86400, s % 86400 / 3600),
    }
}

/// A past moment: "just now", "5 min ago".
pub fn ago(now: i64, t: i64) -> String {
    if now - t < 5 {
        "just now".into()
    } else {
        format!("{} ago", span(now - t))
    }
}

/// The wall-clock time of `t` (UTC): the time alone on the same day as `now`, else the date too.
pub fn clock(now: i64, t: i64) -> String {
    let (Some(at), Some(today)) = (chrono::DateTime::from_timestamp(t, 0), chrono::DateTime::from_timestamp(now, 0))
    else {
        return "?".into();
    };
    if at.date_naive() == today.date_naive() {
        at.format("%H:%M UTC").to_string()
    } else {
        at.format("%Y-%m-%d %H:%M UTC").to_string()
    }
}

/// A past moment as a cell: relative, with the clock time beside it.
fn when(now: i64, t: Option<i64>) -> String {
    match t {
        Some(t) => format!("{} <small>{}</small>", e(&ago(now, t)), e(&clock(now, t))),
        None => "<span class=dim>never</span>".into(),
    }
}

/// Cuts `s` to [`MAX_ERROR_CHARS`] characters.
fn cut(s: &str) -> String {
    match s.char_indices().nth(MAX_ERROR_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn badge(class: &str, text: &str) -> String {
    format!("<span class=\"b {class}\">{}</span>", e(text))
}

fn delegated(flow: &str) -> bool {
    matches!(flow, "device_code" | "auth_code")
}

/// What needs a person's attention, as HTML fragments (values escaped).
pub fn problems(s: &Status) -> Vec<String> {
    let mut out = Vec::new();
    for i in &s.identities {
        let st = &i.status;
        let waiting =
            if i.queued > 0 { format!(" {} queued message(s) wait for it.", i.queued) } else { String::new() };
        match st.state.as_str() {
            "needs_login" if delegated(&st.flow) => out.push(format!(
                "Identity <b>{}</b> needs a sign-in: run <code>mfd-relay auth login {}</code>.{}",
                e(&st.name),
                e(&st.name),
                e(&waiting)
            )),
            "needs_login" => out.push(format!(
                "Identity <b>{}</b> (app-only) cannot get a token: {}. Check the app's secret or certificate and its consent in the provider's portal.{}",
                e(&st.name),
                e(&cut(st.last_error.as_deref().unwrap_or("no token yet"))),
                e(&waiting)
            )),
            "error" => out.push(format!(
                "Token refresh for <b>{}</b> is failing; the relay keeps retrying: {}.{}",
                e(&st.name),
                e(&cut(st.last_error.as_deref().unwrap_or("unknown error"))),
                e(&waiting)
            )),
            _ => {}
        }
    }
    if let Some(err) = &s.queue.error {
        out.push(format!("The queue cannot be read: {}", e(err)));
    }
    if let Some(first) = s.queue.oldest.first() {
        let age = s.now - first.received;
        if age > QUEUE_AGE_WARNING {
            out.push(format!(
                "The oldest queued message has waited {} (since {}); see the queue below.",
                e(&span(age)),
                e(&clock(s.now, first.received))
            ));
        }
    }
    for m in &s.mailboxes {
        let limit = m.info.stale_after();
        match m.activity.last_check {
            Some(t) if s.now - t > limit => out.push(format!(
                "Mailbox <b>{}</b> has not been checked for {}.",
                e(&m.info.name),
                e(&span(s.now - t))
            )),
            None if s.now - s.started > limit => {
                out.push(format!("Mailbox <b>{}</b> has never been checked successfully.", e(&m.info.name)))
            }
            _ => {}
        }
    }
    out
}

const STYLE: &str = "\
body{font:14px/1.45 system-ui,-apple-system,\"Segoe UI\",Roboto,\"DejaVu Sans\",sans-serif;margin:0;color:#1f2328;background:#f6f8fa}\
header{background:#24292f;color:#fff;padding:12px 24px}\
header h1{font-size:20px;margin:0}header h1 span{font-weight:normal;color:#d0d7de}\
header p{margin:2px 0 0;color:#d0d7de;font-size:12px}\
main{padding:4px 24px 24px;max-width:1400px}\
h2{font-size:16px;margin:22px 0 6px}h2 small{font-weight:normal;color:#57606a;font-size:13px}\
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #d0d7de}\
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #d8dee4;vertical-align:top}\
th{background:#eaeef2;font-weight:600;font-size:12px;color:#424a53}\
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}\
td.e{max-width:420px;overflow-wrap:anywhere}\
small,.dim{color:#57606a}small{font-size:12px}\
.b{display:inline-block;padding:0 8px;border-radius:10px;font-size:12px;font-weight:600;white-space:nowrap}\
.ok{background:#dafbe1;color:#116329}.bad{background:#ffebe9;color:#a40e26}.warn{background:#fff8c5;color:#7d4e00}\
.err{color:#a40e26}\
.summary{border-radius:6px;padding:8px 14px;margin:16px 0 4px;border:1px solid #4ac26b;background:#dafbe1}\
.summary.bad{border-color:#ff8182;background:#ffebe9}.summary ul{margin:4px 0;padding-left:20px}\
code{font:12px ui-monospace,\"DejaVu Sans Mono\",monospace;background:#eaeef2;padding:1px 4px;border-radius:4px}\
footer{margin-top:24px;font-size:12px;color:#57606a}footer a{color:#0969da}";

/// The page.
pub fn render(s: &Status) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=refresh content={REFRESH_SECONDS}>\
         <title>mfd-relay status: {host}</title><style>{STYLE}</style></head><body>\
         <header><h1>mfd-relay <span>{host}</span></h1>\
         <p>version {version} · up {up} · updated {updated} · this page reloads every {REFRESH_SECONDS} s</p></header><main>",
        host = e(&s.hostname),
        version = e(&s.version),
        up = e(&span(s.now - s.started)),
        updated = e(&chrono::DateTime::from_timestamp(s.now, 0).map(|t| t.format("%H:%M:%S UTC").to_string()).unwrap_or_default()),
    );
    let problems = problems(s);
    if problems.is_empty() {
        h.push_str(
            "<div class=summary><b>All good.</b> Every identity has a token, nothing waits long in the queue.</div>",
        );
    } else {
        let _ = write!(h, "<div class=\"summary bad\"><b>Needs attention</b><ul>");
        for p in &problems {
            let _ = write!(h, "<li>{p}</li>");
        }
        h.push_str("</ul></div>");
    }
    identities(&mut h, s);
    devices(&mut h, s);
    queue(&mut h, s);
    mailboxes(&mut h, s);
    h.push_str(
        "<footer>Times are UTC. Machine-readable: <a href=\"/metrics\">/metrics</a> · \
         <a href=\"/api/auth/status\">/api/auth/status</a> · <a href=\"/api/queue\">/api/queue</a> · \
         <a href=\"/readyz\">/readyz</a></footer></main></body></html>\n",
    );
    h
}

fn identities(h: &mut String, s: &Status) {
    let _ = write!(h, "<h2>Identities <small>{} configured</small></h2>", s.identities.len());
    if s.identities.is_empty() {
        h.push_str("<p class=dim>No identities configured.</p>");
        return;
    }
    h.push_str(
        "<table><tr><th>Identity</th><th>Account</th><th>Provider · sign-in</th><th>State</th>\
         <th>Access token</th><th>Last refresh</th><th class=n>Queued</th><th>Last error</th></tr>",
    );
    for i in &s.identities {
        let st = &i.status;
        let state = match st.state.as_str() {
            "ready" => badge("ok", "ready"),
            "needs_login" => badge("bad", "needs sign-in"),
            "error" => badge("warn", "refresh failing"),
            other => badge("warn", other),
        };
        let token = match st.expires_at {
            Some(t) if t > s.now => {
                format!("expires in {} <small>{}</small>", e(&span(t - s.now)), e(&clock(s.now, t)))
            }
            Some(t) => format!("<span class=err>expired {}</span>", e(&ago(s.now, t))),
            None => "<span class=dim>none</span>".into(),
        };
        let mut error =
            st.last_error.as_deref().map(|x| format!("<span class=err>{}</span>", e(&cut(x)))).unwrap_or_default();
        if st.state == "needs_login" && delegated(&st.flow) {
            if !error.is_empty() {
                error.push_str("<br>");
            }
            let _ = write!(error, "run <code>mfd-relay auth login {}</code>", e(&st.name));
        }
        let _ = write!(
            h,
            "<tr><td><b>{}</b></td><td>{}</td><td>{} · {}</td><td>{state}</td><td>{token}</td><td>{}</td>\
             <td class=n>{}</td><td class=e>{error}</td></tr>",
            e(&st.name),
            e(&st.account),
            e(&st.provider),
            e(&st.flow.replace('_', " ")),
            when(s.now, st.last_refresh),
            i.queued,
        );
    }
    h.push_str("</table>");
}

fn devices(h: &mut String, s: &Status) {
    let _ = write!(h, "<h2>Devices <small>{} configured</small></h2>", s.devices.len());
    if s.devices.is_empty() {
        h.push_str("<p class=dim>No devices configured: nothing can send through this relay.</p>");
        return;
    }
    h.push_str(
        "<table><tr><th>Device</th><th>Identity</th><th>Recognised by</th><th>Last seen</th>\
         <th class=n>Messages today</th><th>Last error</th></tr>",
    );
    for d in &s.devices {
        let addrs = e(&d.info.addresses.join(", "));
        let by = match (d.info.logs_in, d.info.addresses.is_empty()) {
            (true, true) => "login + PIN".to_string(),
            (true, false) => format!("login + PIN <small>from {addrs}</small>"),
            (false, _) => format!("address <small>{addrs}</small>"),
        };
        let a = &d.activity;
        let seen = match (a.last_seen, &a.last_address) {
            (Some(t), Some(ip)) => format!("{}<br><small>from {}</small>", when(s.now, Some(t)), e(ip)),
            (t, _) => when(s.now, t),
        };
        let error = match &a.last_error {
            Some((t, msg)) => {
                let class = if s.now - t < RECENT_ERROR { "e err" } else { "e dim" };
                format!("<td class=\"{class}\">{} <small>{}</small></td>", e(&cut(msg)), e(&ago(s.now, *t)))
            }
            None => "<td class=e></td>".into(),
        };
        let _ = write!(
            h,
            "<tr><td><b>{}</b></td><td>{}</td><td>{by}</td><td>{seen}</td><td class=n>{}</td>{error}</tr>",
            e(&d.info.name),
            e(&d.info.identity),
            a.messages_today,
        );
    }
    h.push_str("</table>");
}

/// "512 B", "12.3 KiB", "4.0 MiB".
pub fn size(bytes: u64) -> String {
    match bytes {
        0..=1023 => format!("{bytes} B"),
        1024..=1_048_575 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

fn queue(h: &mut String, s: &Status) {
    let q = &s.queue;
    let summary = match q.oldest.first() {
        Some(first) => format!(
            "{} waiting · oldest {}",
            if q.depth == 1 { "1 message".to_string() } else { format!("{} messages", q.depth) },
            e(&ago(s.now, first.received))
        ),
        None if q.error.is_some() => format!("{} messages", q.depth),
        None => "empty".into(),
    };
    let _ = write!(h, "<h2>Queue <small>{summary}</small></h2>");
    if let Some(err) = &q.error {
        let _ = write!(h, "<p class=err>Cannot read the queue: {}</p>", e(err));
    }
    if q.set_aside > 0 {
        let _ = write!(
            h,
            "<p class=err>{} message file(s) without a queue record were found at start-up and moved to \
             <code>{}</code>: a crash before their 250, or a damaged database. They are not delivered; \
             look at them, then resend or delete them.</p>",
            q.set_aside,
            e(&q.set_aside_dir)
        );
    }
    if q.oldest.is_empty() {
        if q.error.is_none() {
            h.push_str("<p class=dim>Nothing waits: every accepted message has been delivered.</p>");
        }
        return;
    }
    h.push_str(
        "<table><tr><th>ID</th><th>Received</th><th>Device → identity</th><th class=n>Recipients</th>\
         <th class=n>Size</th><th class=n>Attempts</th><th>Next attempt</th><th>Last error</th></tr>",
    );
    for r in &q.oldest {
        let next = r.next_attempt / 1000;
        let next = if next <= s.now {
            "due now".to_string()
        } else {
            format!("in {} <small>{}</small>", e(&span(next - s.now)), e(&clock(s.now, next)))
        };
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td><td>{} → {}</td><td class=n>{}</td><td class=n>{}</td>\
             <td class=n>{}</td><td>{next}</td><td class=\"e err\">{}</td></tr>",
            e(&r.id.to_string()),
            when(s.now, Some(r.received)),
            e(&r.device),
            e(&r.identity),
            r.rcpts.len(),
            e(&size(r.size)),
            r.attempts,
            e(&cut(r.last_error.as_deref().unwrap_or(""))),
        );
    }
    h.push_str("</table>");
    if q.depth > q.oldest.len() {
        let _ =
            write!(h, "<p class=dim>… and {} more: <code>mfd-relay queue list</code></p>", q.depth - q.oldest.len());
    }
}

fn mailboxes(h: &mut String, s: &Status) {
    let _ = write!(h, "<h2>Mobile-print mailboxes <small>{} configured</small></h2>", s.mailboxes.len());
    if s.mailboxes.is_empty() {
        h.push_str("<p class=dim>No mobile-print mailboxes configured.</p>");
        return;
    }
    h.push_str(
        "<table><tr><th>Mailbox</th><th>Identity</th><th>Folder</th><th>Last check</th>\
         <th class=n>Jobs today</th><th>Last error</th></tr>",
    );
    for m in &s.mailboxes {
        let a = &m.activity;
        let limit = m.info.stale_after();
        let stale = match a.last_check {
            Some(t) => s.now - t > limit,
            None => s.now - s.started > limit,
        };
        let check = if stale {
            format!("{} {}", when(s.now, a.last_check), badge("bad", "stale"))
        } else {
            when(s.now, a.last_check)
        };
        let error = match &a.last_error {
            Some((t, msg)) => format!("{} <small>{}</small>", e(&cut(msg)), e(&ago(s.now, *t))),
            None => String::new(),
        };
        let _ = write!(
            h,
            "<tr><td><b>{}</b></td><td>{}</td><td>{}</td><td>{check}</td><td class=n>{}</td>\
             <td class=\"e err\">{error}</td></tr>",
            e(&m.info.name),
            e(&m.info.identity),
            e(&m.info.folder),
            a.jobs_today,
        );
    }
    h.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::MessageId;

    const NOW: i64 = 1_795_000_000; // 2026-11-18 11:06:40 UTC

    fn identity(name: &str, state: &str, flow: &str) -> IdentityStatus {
        IdentityStatus {
            name: name.into(),
            provider: "contoso".into(),
            flow: flow.into(),
            account: format!("{name}@contoso.com"),
            state: state.into(),
            expires_at: (state == "ready").then_some(NOW + 3120),
            last_refresh: Some(NOW - 600),
            last_error: None,
            has_refresh_token: true,
        }
    }

    fn record(id: u64, received: i64) -> QueueRecord {
        QueueRecord {
            id: MessageId(id),
            received,
            device: "floor3-canon".into(),
            identity: "scans".into(),
            client: "192.168.10.31".into(),
            from: "scans@contoso.com".into(),
            original_from: "scanner@printer.local".into(),
            bounce_to_sender: false,
            rcpts: vec!["boss@contoso.com".into(), "team@contoso.com".into()],
            size: 1_572_864,
            eight_bit: false,
            attempts: 3,
            next_attempt: (NOW + 90) * 1000,
            last_error: Some("network: connection refused".into()),
            is_bounce: false,
        }
    }

    fn healthy() -> Status {
        Status {
            now: NOW,
            hostname: "relay.contoso.lan".into(),
            version: "0.1.0".into(),
            started: NOW - 3 * 3600 - 300,
            identities: vec![IdentityRow { status: identity("scans", "ready", "device_code"), queued: 0 }],
            devices: vec![DeviceRow {
                info: DeviceInfo {
                    name: "floor3-canon".into(),
                    identity: "scans".into(),
                    logs_in: true,
                    addresses: vec!["192.168.10.31/32".into()],
                },
                activity: {
                    let mut a = DeviceActivity::default();
                    a.last_seen = Some(NOW - 120);
                    a.last_address = Some("192.168.10.31".into());
                    a.messages_today = 7;
                    a
                },
            }],
            queue: QueueView::default(),
            mailboxes: vec![MailboxRow {
                info: MailboxInfo {
                    name: "print".into(),
                    identity: "print".into(),
                    folder: "INBOX".into(),
                    poll_interval: 60,
                },
                activity: {
                    let mut a = MailboxActivity::default();
                    a.last_check = Some(NOW - 30);
                    a.jobs_today = 2;
                    a
                },
            }],
        }
    }

    #[test]
    fn durations_and_times() {
        assert_eq!(span(0), "0 s");
        assert_eq!(span(-5), "0 s");
        assert_eq!(span(59), "59 s");
        assert_eq!(span(61), "1 min");
        assert_eq!(span(3600), "1 h");
        assert_eq!(span(3 * 3600 + 300), "3 h 5 min");
        assert_eq!(span(2 * 86400), "2 d");
        assert_eq!(span(2 * 86400 + 7200 + 59), "2 d 2 h");
        assert_eq!(ago(NOW, NOW - 2), "just now");
        assert_eq!(ago(NOW, NOW - 300), "5 min ago");
        assert_eq!(clock(NOW, NOW - 60), "11:05 UTC");
        assert_eq!(clock(NOW, NOW - 86400), "2026-11-17 11:06 UTC");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(2048), "2.0 KiB");
        assert_eq!(size(1_572_864), "1.5 MiB");
        assert_eq!(cut(&"é".repeat(400)).chars().count(), MAX_ERROR_CHARS + 1);
    }

    #[test]
    fn healthy_relay_says_all_good() {
        let s = healthy();
        assert!(problems(&s).is_empty(), "{:?}", problems(&s));
        let page = render(&s);
        assert!(page.starts_with("<!doctype html>"));
        assert!(page.contains("<meta http-equiv=refresh content=30>"));
        assert!(page.contains("All good."));
        assert!(page.contains("relay.contoso.lan") && page.contains("up 3 h 5 min"));
        assert!(page.contains("<b>scans</b>") && page.contains("scans@contoso.com"));
        assert!(page.contains("expires in 52 min <small>11:58 UTC</small>"), "{page}");
        assert!(page.contains("<span class=\"b ok\">ready</span>"));
        assert!(page.contains("<b>floor3-canon</b>"));
        assert!(page.contains("login + PIN <small>from 192.168.10.31/32</small>"));
        assert!(page.contains("2 min ago <small>11:04 UTC</small><br><small>from 192.168.10.31</small>"), "{page}");
        assert!(page.contains("<td class=n>7</td>"), "messages today");
        assert!(page.contains("Queue <small>empty</small>"));
        assert!(page.contains("<b>print</b>") && page.contains("INBOX") && page.contains("30 s ago"));
        assert!(!page.contains("<script"), "no JavaScript");
    }

    #[test]
    fn problems_are_called_out_with_what_to_do() {
        let mut s = healthy();
        s.identities.push(IdentityRow { status: identity("print", "needs_login", "device_code"), queued: 2 });
        let mut app = identity("app", "needs_login", "client_credentials");
        app.last_error = Some("AADSTS7000222: the client secret has expired".into());
        s.identities.push(IdentityRow { status: app, queued: 0 });
        let mut failing = identity("gmail", "error", "auth_code");
        failing.last_error = Some("token endpoint: timeout".into());
        s.identities.push(IdentityRow { status: failing, queued: 0 });
        s.queue = QueueView {
            depth: 14,
            oldest: vec![record(1, NOW - 7200), record(2, NOW - 60)],
            error: None,
            ..Default::default()
        };
        s.mailboxes[0].activity.last_check = Some(NOW - 3600);
        let p = problems(&s);
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(p[0].contains("<b>print</b> needs a sign-in: run <code>mfd-relay auth login print</code>"), "{p:?}");
        assert!(p[0].contains("2 queued message(s) wait for it"));
        assert!(p[1].contains("(app-only)") && p[1].contains("AADSTS7000222"), "{p:?}");
        assert!(p[2].contains("Token refresh for <b>gmail</b> is failing") && p[2].contains("timeout"));
        assert!(p[3].contains("waited 2 h (since 09:06 UTC)"), "{p:?}");
        assert!(p[4].contains("Mailbox <b>print</b> has not been checked for 1 h"), "{p:?}");

        let page = render(&s);
        assert!(page.contains("<div class=\"summary bad\"><b>Needs attention</b>"));
        assert!(page.contains("<span class=\"b bad\">needs sign-in</span>"));
        assert!(page.contains("<span class=\"b warn\">refresh failing</span>"));
        assert!(page.contains("Queue <small>14 messages waiting · oldest 2 h ago</small>"), "{page}");
        assert!(page.contains("<code>0000000000000001</code>"));
        assert!(page.contains("floor3-canon → scans") && page.contains("1.5 MiB"));
        assert!(page.contains("in 1 min <small>11:08 UTC</small>"), "next attempt: {page}");
        assert!(page.contains("… and 12 more: <code>mfd-relay queue list</code>"));
        assert!(page.contains("<span class=\"b bad\">stale</span>"));
    }

    #[test]
    fn a_mailbox_never_checked_is_stale_only_after_a_while() {
        let mut s = healthy();
        s.mailboxes[0].activity.last_check = None;
        s.started = NOW - 60;
        assert!(problems(&s).is_empty(), "just started: not yet");
        s.started = NOW - 3600;
        assert!(problems(&s)[0].contains("never been checked"));
    }

    #[test]
    fn every_value_is_escaped() {
        let mut s = healthy();
        let evil = "<script>alert(\"x\")</script>&'";
        s.hostname = evil.into();
        s.identities[0].status.last_error = Some(evil.into());
        s.identities[0].status.account = evil.into();
        s.devices[0].activity.last_error = Some((NOW - 5, evil.into()));
        s.devices[0].activity.last_address = Some(evil.into());
        s.devices[0].info.addresses = vec![evil.into()];
        s.mailboxes[0].info.folder = evil.into();
        s.mailboxes[0].activity.last_error = Some((NOW, evil.into()));
        let mut r = record(1, NOW - 10);
        r.device = evil.into();
        r.last_error = Some(evil.into());
        s.queue = QueueView { depth: 1, oldest: vec![r], error: Some(evil.into()), ..Default::default() };
        let page = render(&s);
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("\"x\""));
        assert!(page.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"));
    }

    #[test]
    fn no_secrets_reach_the_page() {
        // A Status holds no token, PIN hash or client secret; the page does not invent any
        // either: nothing on it looks like one.
        let mut s = healthy();
        s.queue = QueueView { depth: 1, oldest: vec![record(1, NOW - 10)], error: None, ..Default::default() };
        let page = render(&s);
        for needle in ["$argon2", "Bearer", "refresh_token", "access_token", "secret", "eyJ"] {
            assert!(!page.contains(needle), "{needle} on the page");
        }
        // Recipients are counted, not listed; the device's own address is its name only.
        assert!(!page.contains("boss@contoso.com") && !page.contains("scanner@printer.local"));
    }
}
