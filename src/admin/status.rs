//! The status page (`GET /status`): what a person looks at first when a printer complains.
//! Identities with their token state and expiry, devices with last seen / messages today /
//! last error, the queue with its oldest messages, and the mobile-print mailboxes with their
//! last check, on one HTML page (inline CSS) that is refreshed every [`REFRESH_SECONDS`].
//!
//! The page also acts (issue 16): its one inline script ([`SCRIPT`], `status.js`, allowed by
//! its hash in [`content_security_policy`]) signs identities in (following a device code, or
//! going to the provider and back through `/oauth/callback`), fetches a token for app-only
//! identities, retries and drops queued messages, and sends a test mail per device, all
//! through the JSON API with the same guard as the CLI (same-origin JSON POSTs). Without
//! JavaScript the page stays what it was: read-only, reloaded by a `<meta>` refresh, the
//! commands to type shown. With it, the script refreshes only the data part (`#data`) and
//! never while a confirmation is open or a field is being typed in; what an action shows
//! lives outside it (`#actions`), so a refresh cannot end a sign-in being followed.
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
use crate::oauth::login::{LoginStatus, Logins};
use crate::oauth::tokens::{IdentityStatus, TokenManager};
use crate::queue::{Queue, QueueRecord};

/// The page is refreshed this often (by its script, else by a `<meta http-equiv=refresh>`).
pub const REFRESH_SECONDS: u32 = 30;
/// The page's script: its actions and its refresh. Inline, allowed by its hash only.
pub const SCRIPT: &str = include_str!("status.js");

/// The page's Content-Security-Policy: inline CSS, [`SCRIPT`] by its SHA-256 (no other
/// script, inline or not, runs: a value that slipped through unescaped stays inert), requests
/// to the listener itself only, no forms, no frames.
pub fn content_security_policy() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        use base64::Engine as _;
        use sha2::Digest as _;
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(SCRIPT.as_bytes()));
        format!(
            "default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{hash}'; connect-src 'self'; \
             base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        )
    })
}
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
    /// The sign-in whose result the page was opened to show (`/status?signin=<identity>`,
    /// where `/oauth/callback` sends the browser): the identity and where its sign-in stands.
    pub signin: Option<(String, LoginStatus)>,
}

#[derive(Debug, Clone)]
pub struct IdentityRow {
    pub status: IdentityStatus,
    /// Messages in the queue for this identity.
    pub queued: usize,
    /// Its last sign-in started in this process (from the page or the CLI).
    pub sign_in: LoginStatus,
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
    /// Sign-ins in progress or done.
    pub logins: &'a Logins,
    /// The identity named by `?signin=`, if any (shown only when it is configured).
    pub signin: Option<&'a str>,
}

/// Reads the current state (a page of the queue records: run it off the async workers).
pub fn collect(src: &Sources<'_>, now: i64) -> Status {
    // One page of the oldest records (ids sort by arrival) and counts from the in-memory
    // schedule: the page never loads the whole queue.
    let (records, error) = match src.queue.page(None, QUEUE_ROWS) {
        Ok(v) => (v.into_iter().map(QueueRecord::shown).collect::<Vec<_>>(), None),
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    let identities: Vec<IdentityRow> = src
        .tokens
        .status()
        .into_iter()
        .map(|status| {
            let queued = src.queue.depth_of(&status.name);
            let sign_in = src.logins.status(&status.name);
            IdentityRow { status, queued, sign_in }
        })
        .collect();
    let signin = src
        .signin
        .and_then(|name| identities.iter().find(|i| i.status.name == name))
        .map(|i| (i.status.name.clone(), i.sign_in.clone()));
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
        signin,
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
                "Identity <b>{}</b> needs a sign-in: run <code>mfd-relay auth login {}</code>\
                 <span hidden data-js> or press <b>Sign in</b> in its row below</span>.{}",
                e(&st.name),
                e(&st.name),
                e(&waiting)
            )),
            "needs_login" => out.push(format!(
                "Identity <b>{}</b> (app-only) cannot get a token: {}. Check the app's secret or certificate and its consent in the provider's portal\
                 <span hidden data-js>, then press <b>Fetch a token now</b> in its row below</span>.{}",
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
footer{margin-top:24px;font-size:12px;color:#57606a}footer a{color:#0969da}\
button{font:inherit;font-size:12px;padding:2px 10px;border:1px solid #d0d7de;border-radius:6px;background:#f6f8fa;color:#24292f;cursor:pointer;white-space:nowrap}\
button:hover{background:#eaeef2}button:disabled{opacity:.55;cursor:default}\
button.primary{background:#1f883d;border-color:#1a7f37;color:#fff}button.danger{color:#a40e26}\
input{font:inherit;font-size:12px;padding:2px 6px;border:1px solid #d0d7de;border-radius:6px;width:15em}\
td.act{white-space:nowrap}td.act>*{margin:1px 2px}\
#actions{max-width:1400px;padding:0 24px}\
.card{background:#fff;border:1px solid #d0d7de;border-left:4px solid #0969da;border-radius:6px;padding:8px 14px;margin:12px 0 0}\
.card.ok{border-left-color:#1f883d;background:#fff}.card.bad{border-left-color:#cf222e;background:#fff}\
.card h3{font-size:14px;margin:0 0 4px;display:flex;justify-content:space-between;gap:12px}\
.card p{margin:4px 0}.card .usercode{font-size:20px;letter-spacing:2px;padding:2px 8px}\
.card ol{margin:4px 0;padding-left:22px}.card li.bad{color:#a40e26}.card li small{margin-left:6px}";

/// The page.
pub fn render(s: &Status) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\">\
         <noscript><meta http-equiv=refresh content={REFRESH_SECONDS}></noscript>\
         <title>mfd-relay status: {host}</title><style>{STYLE}</style></head><body>\
         <header><h1>mfd-relay <span>{host}</span></h1>\
         <p>version {version} · up {up} · <span id=updated>updated {updated}</span> · \
         <span id=refresh>this page reloads every {REFRESH_SECONDS} s</span> \
         <button type=button hidden data-js data-act=refresh>Refresh now</button></p></header>\
         <section id=actions aria-live=polite>{signin}</section><main><div id=data>",
        host = e(&s.hostname),
        version = e(&s.version),
        up = e(&span(s.now - s.started)),
        updated = e(&chrono::DateTime::from_timestamp(s.now, 0)
            .map(|t| t.format("%H:%M:%S UTC").to_string())
            .unwrap_or_default()),
        signin = s.signin.as_ref().map(|(name, st)| signin_card(name, st)).unwrap_or_default(),
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
    let _ = writeln!(
        h,
        "</div><footer>Times are UTC. Machine-readable: <a href=\"/metrics\">/metrics</a> · \
         <a href=\"/api/auth/status\">/api/auth/status</a> · <a href=\"/api/queue\">/api/queue</a> · \
         <a href=\"/readyz\">/readyz</a></footer></main><script>{SCRIPT}</script></body></html>",
    );
    h
}

/// The result of the sign-in the browser came back from (`/status?signin=<identity>`), read
/// from the sign-in itself.
fn signin_card(name: &str, st: &LoginStatus) -> String {
    let (class, title, text) = match st {
        LoginStatus::Done { account } => (
            "ok",
            "Signed in",
            format!("Identity \"{name}\" signed in as {account}. The relay refreshes its token from now on."),
        ),
        LoginStatus::Failed { error } => ("bad", "Sign-in failed", format!("Identity \"{name}\": {}", cut(error))),
        LoginStatus::Pending => ("", "Sign-in in progress", format!("Identity \"{name}\" is still signing in.")),
        LoginStatus::None => ("bad", "No sign-in", format!("No sign-in of identity \"{name}\" was started here.")),
    };
    format!(
        "<div class=\"card {class}\" id=signin-result><h3><span>{}</span>\
         <button type=button hidden data-js data-act=close aria-label=Close>×</button></h3><p>{}</p></div>",
        e(title),
        e(&text)
    )
}

/// What a person can do about an identity: sign in (delegated flows) or fetch a token
/// (app-only). The buttons appear with the script; the command is there for everyone.
fn identity_actions(st: &IdentityStatus) -> String {
    let name = e(&st.name);
    let button = if delegated(&st.flow) {
        let (class, label) = if st.state == "needs_login" { ("primary", "Sign in") } else { ("", "Sign in again") };
        format!(
            "<button type=button hidden data-js class=\"{class}\" data-act=signin data-id=\"{name}\" \
             data-mailbox=\"{}\" data-flow=\"{}\">{label}</button>",
            e(&st.mailbox),
            e(&st.flow)
        )
    } else {
        let class = if st.state == "ready" { "" } else { "primary" };
        format!(
            "<button type=button hidden data-js class=\"{class}\" data-act=token data-id=\"{name}\">Fetch a token now</button>"
        )
    };
    format!("{button}<noscript><code>mfd-relay auth login {name}</code></noscript>")
}

fn identities(h: &mut String, s: &Status) {
    let _ = write!(h, "<h2>Identities <small>{} configured</small></h2>", s.identities.len());
    if s.identities.is_empty() {
        h.push_str("<p class=dim>No identities configured.</p>");
        return;
    }
    h.push_str(
        "<table id=identities><tr><th>Identity</th><th>Mailbox · signed in as</th><th>Provider · sign-in</th><th>State</th>\
         <th>Access token</th><th>Last refresh</th><th class=n>Queued</th><th>Last error</th><th>Actions</th></tr>",
    );
    for i in &s.identities {
        let st = &i.status;
        let mut state = match st.state.as_str() {
            "ready" => badge("ok", "ready"),
            "needs_login" => badge("bad", "needs sign-in"),
            "error" => badge("warn", "refresh failing"),
            other => badge("warn", other),
        };
        if i.sign_in == LoginStatus::Pending {
            let _ = write!(state, "<br>{}", badge("warn", "signing in"));
        }
        // Who the tokens were issued to, next to the mailbox the relay sends from: a person
        // may sign in with another account (a shared mailbox needs Send As for it).
        let mailbox = if st.mailbox.is_empty() { &st.account } else { &st.mailbox };
        let account = if !st.signed_in {
            "<br><small class=dim>no token yet</small>".to_string()
        } else if st.account.eq_ignore_ascii_case(mailbox) {
            format!("<br><small>signed in as {}</small>", e(&st.account))
        } else {
            format!(
                "<br><small>signed in as <b>{}</b> (another account: it needs Send As on the mailbox)</small>",
                e(&st.account)
            )
        };
        let expiry = |at: Option<i64>| match at {
            Some(t) if t > s.now => {
                format!("expires in {} <small>{}</small>", e(&span(t - s.now)), e(&clock(s.now, t)))
            }
            Some(t) => format!("<span class=err>expired {}</span>", e(&ago(s.now, t))),
            None => "<span class=dim>none</span>".into(),
        };
        // One token per resource (Graph and the mail servers): each with its own expiry.
        let token = if st.tokens.len() > 1 || st.tokens.iter().any(|t| t.resource != "mail") {
            st.tokens
                .iter()
                .map(|t| {
                    format!(
                        "<span class=token data-resource=\"{}\">{}: {}</span>",
                        e(&t.resource),
                        e(&t.resource),
                        expiry(t.expires_at)
                    )
                })
                .collect::<Vec<_>>()
                .join("<br>")
        } else {
            expiry(st.expires_at)
        };
        let mut error =
            st.last_error.as_deref().map(|x| format!("<span class=err>{}</span>", e(&cut(x)))).unwrap_or_default();
        if let LoginStatus::Failed { error: why } = &i.sign_in {
            if !error.is_empty() {
                error.push_str("<br>");
            }
            let _ = write!(error, "<span class=err>last sign-in failed: {}</span>", e(&cut(why)));
        }
        if st.state == "needs_login" && delegated(&st.flow) {
            if !error.is_empty() {
                error.push_str("<br>");
            }
            let _ = write!(error, "run <code>mfd-relay auth login {}</code>", e(&st.name));
        }
        let _ = write!(
            h,
            "<tr id=\"identity-{}\"><td><b>{}</b></td><td>{}{account}</td><td>{} · {}</td><td>{state}</td><td>{token}</td><td>{}</td>\
             <td class=n>{}</td><td class=e>{error}</td><td class=act>{}</td></tr>",
            e(&st.name),
            e(&st.name),
            e(mailbox),
            e(&st.provider),
            e(&st.flow.replace('_', " ")),
            when(s.now, st.last_refresh),
            i.queued,
            identity_actions(st),
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
        "<table id=devices><tr><th>Device</th><th>Identity</th><th>Recognised by</th><th>Last seen</th>\
         <th class=n>Messages today</th><th>Last error</th><th>Test mail</th></tr>",
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
            "<tr><td><b>{}</b></td><td>{}</td><td>{by}</td><td>{seen}</td><td class=n>{}</td>{error}\
             <td class=act>{}</td></tr>",
            e(&d.info.name),
            e(&d.info.identity),
            a.messages_today,
            test_mail(&d.info.name),
        );
    }
    h.push_str("</table>");
}

/// The test-mail field and button of a device (shown with the script): the relay sends a
/// small message as that device would, through its identity, and shows each step.
fn test_mail(device: &str) -> String {
    let d = e(device);
    format!(
        "<input type=email hidden data-js data-device=\"{d}\" placeholder=\"recipient@example.com\" \
         aria-label=\"Test mail recipient for {d}\" autocomplete=email>\
         <button type=button hidden data-js data-act=test data-device=\"{d}\">Send test mail</button>\
         <noscript><code>mfd-relay test --device {d} --to &lt;address&gt;</code></noscript>"
    )
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
    let _ = write!(h, "<h2 id=queue>Queue <small>{summary}</small></h2>");
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
        "<p><button type=button hidden data-js data-act=retry-all>Retry all now</button> \
         <small class=dim>Commands: <code>mfd-relay queue retry all</code> · <code>mfd-relay queue retry &lt;id&gt;</code> · \
         <code>mfd-relay queue drop &lt;id&gt;</code></small></p>\
         <table id=queue-table><tr><th>ID</th><th>Received</th><th>Device → identity</th><th class=n>Recipients</th>\
         <th class=n>Size</th><th class=n>Attempts</th><th>Next attempt</th><th>Last error</th><th>Actions</th></tr>",
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
            "<tr data-msg=\"{id}\"><td><code>{id}</code></td><td>{}</td><td>{} → {}</td><td class=n>{}</td><td class=n>{}</td>\
             <td class=n>{}</td><td>{next}</td><td class=\"e err\">{}</td>\
             <td class=act><button type=button hidden data-js data-act=retry data-id=\"{id}\">Retry</button>\
             <button type=button hidden data-js class=danger data-act=drop data-id=\"{id}\">Drop…</button></td></tr>",
            when(s.now, Some(r.received)),
            e(&r.device),
            match &r.destination {
                Some(d) => format!("folder {}", e(d)),
                None => e(&r.identity),
            },
            r.rcpts.len(),
            e(&size(r.size)),
            r.attempts,
            e(&cut(r.last_error.as_deref().unwrap_or(""))),
            id = e(&r.id.to_string()),
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
            mailbox: format!("{name}@contoso.com"),
            signed_in: state == "ready",
            state: state.into(),
            expires_at: (state == "ready").then_some(NOW + 3120),
            last_refresh: Some(NOW - 600),
            last_error: None,
            has_refresh_token: true,
            tokens: vec![crate::oauth::tokens::TokenStatus {
                resource: "mail".into(),
                expires_at: (state == "ready").then_some(NOW + 3120),
            }],
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
            progress: Default::default(),
            destination: None,
        }
    }

    fn healthy() -> Status {
        Status {
            now: NOW,
            hostname: "relay.contoso.lan".into(),
            version: "0.1.0".into(),
            started: NOW - 3 * 3600 - 300,
            identities: vec![IdentityRow {
                status: identity("scans", "ready", "device_code"),
                queued: 0,
                sign_in: LoginStatus::None,
            }],
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
            signin: None,
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
        assert!(
            page.contains("<noscript><meta http-equiv=refresh content=30></noscript>"),
            "reloads without JavaScript"
        );
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
        assert_eq!(page.matches("<script").count(), 1, "the page's own script only");
        assert!(page.contains(&format!("<script>{SCRIPT}</script>")));
    }

    #[test]
    fn problems_are_called_out_with_what_to_do() {
        let mut s = healthy();
        s.identities.push(IdentityRow {
            status: identity("print", "needs_login", "device_code"),
            queued: 2,
            sign_in: LoginStatus::None,
        });
        let mut app = identity("app", "needs_login", "client_credentials");
        app.last_error = Some("AADSTS7000222: the client secret has expired".into());
        s.identities.push(IdentityRow { status: app, queued: 0, sign_in: LoginStatus::None });
        let mut failing = identity("gmail", "error", "auth_code");
        failing.last_error = Some("token endpoint: timeout".into());
        s.identities.push(IdentityRow { status: failing, queued: 0, sign_in: LoginStatus::None });
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
        s.identities[0].status.name = evil.into();
        s.identities[0].status.mailbox = evil.into();
        s.devices[0].info.name = evil.into();
        s.signin = Some((evil.into(), LoginStatus::Failed { error: evil.into() }));
        let page = render(&s);
        // The one <script> is the page's own; no value opened another, nor left an attribute
        // (data-id, data-device, aria-label) through a quote.
        let page = page.replace(&format!("<script>{SCRIPT}</script>"), "");
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("\"x\""));
        assert!(page.contains("data-id=\"&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;\""), "{page}");
        assert!(page.contains("data-device=\"&lt;script&gt;"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"));
    }

    #[test]
    fn each_identity_offers_its_sign_in_or_a_token_request() {
        let mut s = healthy();
        s.identities = vec![
            IdentityRow {
                status: identity("desk", "needs_login", "device_code"),
                queued: 0,
                sign_in: LoginStatus::None,
            },
            IdentityRow { status: identity("web", "ready", "auth_code"), queued: 0, sign_in: LoginStatus::Pending },
            IdentityRow {
                status: identity("app", "ready", "client_credentials"),
                queued: 0,
                sign_in: LoginStatus::Failed { error: "AADSTS70000: scope".into() },
            },
        ];
        s.identities[0].status.mailbox = "frontdesk@contoso.com".into();
        let page = render(&s);
        assert!(
            page.contains(
                "<button type=button hidden data-js class=\"primary\" data-act=signin data-id=\"desk\" \
                 data-mailbox=\"frontdesk@contoso.com\" data-flow=\"device_code\">Sign in</button>"
            ),
            "{page}"
        );
        assert!(page.contains("data-act=signin data-id=\"web\" data-mailbox=\"web@contoso.com\" data-flow=\"auth_code\">Sign in again</button>"));
        assert!(page.contains("data-act=token data-id=\"app\">Fetch a token now</button>"), "{page}");
        // Without JavaScript the buttons stay hidden and the command is there instead.
        for name in ["desk", "web", "app"] {
            assert!(page.contains(&format!("<noscript><code>mfd-relay auth login {name}</code></noscript>")), "{name}");
        }
        assert!(!page.contains("data-act=token data-id=\"desk\""), "a delegated identity gets no token button");
        assert!(page.contains("<span class=\"b warn\">signing in</span>"), "a sign-in in progress");
        assert!(page.contains("last sign-in failed: AADSTS70000: scope"), "{page}");
    }

    #[test]
    fn who_signed_in_is_shown_next_to_the_mailbox() {
        let mut s = healthy();
        s.identities[0].status.mailbox = "scans@contoso.com".into();
        s.identities[0].status.account = "alice@contoso.com".into();
        let page = render(&s);
        assert!(
            page.contains("<td>scans@contoso.com<br><small>signed in as <b>alice@contoso.com</b> (another account"),
            "{page}"
        );
        s.identities[0].status.account = "Scans@Contoso.com".into();
        assert!(render(&s).contains("<td>scans@contoso.com<br><small>signed in as Scans@Contoso.com</small></td>"));
        s.identities[0].status.signed_in = false;
        s.identities[0].status.account = "scans@contoso.com".into();
        assert!(render(&s).contains("<td>scans@contoso.com<br><small class=dim>no token yet</small></td>"));
    }

    #[test]
    fn each_resource_s_token_is_shown_with_its_expiry() {
        use crate::oauth::tokens::TokenStatus;
        let mut s = healthy();
        // One token: the cell is as it always was.
        let page = render(&s);
        assert!(!page.contains("data-resource"), "{page}");
        s.identities[0].status.tokens = vec![
            TokenStatus { resource: "mail".into(), expires_at: Some(NOW + 3120) },
            TokenStatus { resource: "graph".into(), expires_at: Some(NOW - 120) },
        ];
        let page = render(&s);
        assert!(page.contains("<span class=token data-resource=\"mail\">mail: expires in 52 min"), "{page}");
        assert!(page.contains("<span class=token data-resource=\"graph\">graph: <span class=err>expired"), "{page}");
        s.identities[0].status.tokens[1].expires_at = None;
        assert!(render(&s).contains("graph: <span class=dim>none</span>"));
    }

    #[test]
    fn the_result_of_a_sign_in_is_shown_from_the_sign_in_itself() {
        let mut s = healthy();
        s.signin = Some(("scans".into(), LoginStatus::Done { account: "alice@contoso.com".into() }));
        let page = render(&s);
        let actions = &page[page.find("<section id=actions").unwrap()..page.find("<main>").unwrap()];
        assert!(actions.contains("<div class=\"card ok\" id=signin-result><h3><span>Signed in</span>"), "{actions}");
        assert!(actions.contains("Identity &quot;scans&quot; signed in as alice@contoso.com."), "{actions}");
        s.signin = Some(("scans".into(), LoginStatus::Failed { error: "access_denied: declined".into() }));
        let page = render(&s);
        assert!(page.contains("<span>Sign-in failed</span>") && page.contains("access_denied: declined"));
        s.signin = None;
        assert!(render(&s).contains("<section id=actions aria-live=polite></section>"));
    }

    #[test]
    fn queued_messages_can_be_retried_and_dropped_and_devices_tested() {
        let mut s = healthy();
        s.queue = QueueView { depth: 1, oldest: vec![record(0xab, NOW - 10)], error: None, ..Default::default() };
        let page = render(&s);
        assert!(page.contains("<button type=button hidden data-js data-act=retry-all>Retry all now</button>"));
        assert!(page.contains("<tr data-msg=\"00000000000000AB\">"), "{page}");
        assert!(page.contains("data-act=retry data-id=\"00000000000000AB\">Retry</button>"));
        assert!(page.contains("class=danger data-act=drop data-id=\"00000000000000AB\">Drop…</button>"));
        assert!(
            page.contains("<code>mfd-relay queue retry all</code>"),
            "the commands stay for a page without JavaScript"
        );
        assert!(page.contains("<input type=email hidden data-js data-device=\"floor3-canon\""), "{page}");
        assert!(page.contains("data-act=test data-device=\"floor3-canon\">Send test mail</button>"));
        assert!(page
            .contains("<noscript><code>mfd-relay test --device floor3-canon --to &lt;address&gt;</code></noscript>"));
        // An empty queue has nothing to retry.
        assert!(!render(&healthy()).contains("data-act=retry-all>"));
    }

    #[test]
    fn the_script_runs_by_its_hash_and_only_refreshes_the_data_part() {
        use base64::Engine as _;
        use sha2::Digest as _;
        let csp = content_security_policy();
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(SCRIPT.as_bytes()));
        assert!(csp.starts_with("default-src 'none'; style-src 'unsafe-inline'; "), "{csp}");
        assert!(csp.contains(&format!("script-src 'sha256-{hash}';")), "{csp}");
        assert!(csp.contains("connect-src 'self'") && csp.contains("form-action 'none'"), "{csp}");
        assert!(!csp.contains("unsafe-eval") && !csp.contains("script-src 'unsafe-inline'"), "{csp}");
        // The script ends where the page means it to, and never writes markup.
        assert!(!SCRIPT.to_ascii_lowercase().contains("</script"));
        for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("] {
            assert!(!SCRIPT.contains(sink), "{sink} in status.js");
        }
        // What the script refreshes and where it reports are the page's own ids.
        let page = render(&healthy());
        for id in ["id=data", "id=actions", "id=updated", "id=refresh"] {
            assert!(page.contains(id), "{id}");
        }
        let data = &page[page.find("<div id=data>").unwrap()..page.find("<footer>").unwrap()];
        assert!(data.contains("Identities") && data.contains("Queue") && !data.contains("id=actions"));
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
