//! Benchmark: the real relay binary on loopback, driven like printers drive it, towards a
//! loopback XOAUTH2 sink. Prints messages/s, end-to-end latency (p50/p99) and the relay's
//! peak memory per scenario. Not a test: it asserts nothing, it measures.
//!
//!     cargo bench --bench relay                 # every scenario
//!     cargo bench --bench relay -- small        # scenarios whose name contains "small"
//!
//! Each message is one connection (EHLO, AUTH PLAIN, MAIL, RCPT, DATA, QUIT) unless the
//! scenario says "reuse", exactly as MFDs do; acceptance is durable (spool fsync + database
//! flush before every 250) and delivery happens in session, so a 250 means the sink has the
//! message. The sink answers XOAUTH2 with 235 and counts messages; the token endpoint is a
//! tiny in-process HTTP server. Results go to BENCHMARKS.md by hand.
//!
//! The drain scenarios (`cargo bench --bench relay -- drain`; `drain` is 50,000 messages,
//! `drain-100k` 100,000, both scaled by `MFD_BENCH_SCALE`) queue a backlog while the sink
//! refuses (421 to a new connection, 451 to MAIL, RCPT and DATA on an open one), then bring the sink back and
//! run `mfd-relay queue retry all` through the admin API, and print the acceptance rate, RSS at
//! depth, RSS during `queue list` and `queue retry all`, the drain rate (from the retry to the
//! last delivery) and the peak RSS of the drain, and the relay's CPU seconds for the drain
//! (messages per CPU second do not depend on what else runs on the machine).
//!
//! msg/s counts the messages delivered over the time to the last delivery; a message that gets no
//! answer for 30 s (a printer's patience) is reported as timed out instead of hanging the run.
//!
//! Environment: `MFD_BENCH_SCALE=0.1` runs a tenth of the messages; `MFD_BENCH_SECONDS=60` stops
//! starting messages after 60 s in a scenario (for a slow peer); `MFD_BENCH_WRAPPER="valgrind
//! --tool=massif"` starts the relay under a profiler; `MFD_BENCH_UPSTREAM_TLS=starttls` makes
//! the sink offer STARTTLS with a fresh self-signed certificate for 127.0.0.1 and the relay use
//! it (ca_file), so upstream TLS is paid as in production; `MFD_BENCH_USER` and
//! `MFD_BENCH_PASSWORD` set the devices' AUTH PLAIN login (default `bench` and `4711`; the
//! relay's config follows them). `MFD_BENCH_SINK_PER_USER=3` makes the sink refuse a user's
//! 4th concurrent authenticated connection with `432 4.3.2`, as Exchange Online does, and
//! `MFD_BENCH_PROVIDER_KIND=microsoft` makes the relay's provider Exchange-like (per-minute
//! shaping off); each scenario then also prints how many AUTHs the sink refused.
//! `MFD_BENCH_SINK_RTT_MS=30` puts a WAN between relay and sink: the replies to each flight of
//! commands leave one RTT after it came (the `wan` scenario uses 30 ms unless this is set);
//! the sink offers PIPELINING unless `MFD_BENCH_SINK_PIPELINING=0`, and honours pipelined
//! commands either way.
//!
//! Another server in the relay's place (a peer such as emailproxy): `MFD_BENCH_PEER="command
//! args"` is started instead of mfd-relay once the sink and the token endpoint are up, with
//! `{port}` (where it must listen for SMTP, on 127.0.0.1), `{sink_port}`, `{token_port}`,
//! `{token_url}`, `{ca_file}` (the sink's certificate, with `MFD_BENCH_UPSTREAM_TLS=starttls`)
//! and `{dir}` (a fresh temporary directory for its configuration and log) substituted in its
//! arguments; it is split on whitespace and run without a shell, and it must `exec` the server
//! in the end, since the child's pid is the one whose memory is sampled. Its output goes to
//! `{dir}/peer.log`; it gets SIGTERM at the end. `benches/peer/emailproxy.sh` runs the bench this
//! way against the Python emailproxy.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// One scenario of the benchmark.
struct Scenario {
    name: &'static str,
    size: usize,
    clients: usize,
    messages: usize,
    reuse: bool,
}

const SCENARIOS: &[Scenario] = &[
    Scenario { name: "small-1", size: 2 * 1024, clients: 1, messages: 2_000, reuse: false },
    Scenario { name: "small-16", size: 2 * 1024, clients: 16, messages: 20_000, reuse: false },
    Scenario { name: "small-64", size: 2 * 1024, clients: 64, messages: 20_000, reuse: false },
    Scenario { name: "small-16-reuse", size: 2 * 1024, clients: 16, messages: 20_000, reuse: true },
    Scenario { name: "1mb-16", size: 1024 * 1024, clients: 16, messages: 400, reuse: false },
    Scenario { name: "30mb-8", size: 30 * 1024 * 1024, clients: 8, messages: 16, reuse: false },
];

/// How long a device waits for a message (connect, login, send) before it gives up on it, as a
/// printer's SMTP timeout does. A server that loses a connection (a peer whose accept queue
/// overflows drops connections that the kernel had already completed with a SYN cookie) then
/// costs a failed message, not a hung benchmark.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The devices' login: `MFD_BENCH_USER` and `MFD_BENCH_PASSWORD`, by default the relay's bench device.
fn login() -> &'static (String, String) {
    static LOGIN: OnceLock<(String, String)> = OnceLock::new();
    LOGIN.get_or_init(|| {
        let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        (var("MFD_BENCH_USER", "bench"), var("MFD_BENCH_PASSWORD", "4711"))
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let token_port = token_endpoint().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = match std::env::var("MFD_BENCH_UPSTREAM_TLS").as_deref() {
        Ok("starttls") => Some(SinkTls::new(dir.path())),
        Ok("none") | Err(_) => None,
        Ok(other) => panic!("MFD_BENCH_UPSTREAM_TLS={other}: expected starttls or none"),
    };
    let sink = Sink::start(tls).await;
    let relay = match std::env::var("MFD_BENCH_PEER") {
        Ok(command) => RelayProc::peer(&command, dir.path(), token_port, &sink),
        Err(_) => RelayProc::start(dir.path(), token_port, &sink),
    };

    println!("machine: {} cores, {}", num_cpus(), cpu_model());
    println!("{} (pid {})", relay.what, relay.pid());
    println!("upstream: {}", if sink.ca_file.is_some() { "STARTTLS" } else { "plain" });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(relay.pid());
    println!("idle RSS after start: {:.1} MiB", idle as f64 / 1024.0);
    println!();
    println!(
        "{:<16} {:>8} {:>7} {:>9} {:>11} {:>9} {:>9} {:>11}",
        "scenario", "size", "clients", "messages", "msg/s", "p50 ms", "p99 ms", "peak RSS"
    );
    for s in SCENARIOS {
        if !filter.is_empty() && !filter.iter().any(|f| s.name.contains(f.as_str())) {
            continue;
        }
        run_scenario(s, &relay, &sink).await;
    }
    if filter.is_empty() || filter.iter().any(|f| "idle-1000".contains(f.as_str())) {
        idle_connections(&relay, 1000).await;
    }
    if filter.is_empty() || filter.iter().any(|f| "wan".contains(f.as_str())) {
        wan(&relay, &sink).await;
    }
    drain_scenarios(&filter, &relay, &sink, dir.path()).await;
    let after = rss_kib(relay.pid());
    println!();
    println!("RSS after all scenarios: {:.1} MiB", after as f64 / 1024.0);
}

async fn run_scenario(s: &Scenario, relay: &RelayProc, sink: &Sink) {
    let body = Arc::new(make_body(s.size));
    let before = sink.count.load(Ordering::SeqCst);
    reset_peak(relay.pid());
    let sampler = RssSampler::start(relay.pid());
    let scale: f64 = std::env::var("MFD_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let messages = ((s.messages as f64 * scale) as usize).max(1);
    // With MFD_BENCH_SECONDS a slow server ends the scenario early; messages in flight finish.
    let limit = std::env::var("MFD_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).map(Duration::from_secs_f64);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..s.clients {
        let (body, next, port, n, reuse) = (body.clone(), next.clone(), relay.port, messages as u64, s.reuse);
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut failed, mut last) = (Vec::new(), 0, Duration::ZERO);
            let mut conn: Option<Client> = None;
            while limit.is_none_or(|l| started.elapsed() < l) && next.fetch_add(1, Ordering::SeqCst) < n {
                let t = Instant::now();
                let sent = tokio::time::timeout(MESSAGE_TIMEOUT, async {
                    if conn.is_none() {
                        conn = Some(Client::connect(port, client).await);
                    }
                    let c = conn.as_mut().expect("connected");
                    c.send_message(&body).await;
                    if !reuse {
                        if let Some(mut c) = conn.take() {
                            c.quit().await;
                        }
                    }
                })
                .await;
                match sent {
                    Ok(()) => {
                        lat.push(t.elapsed());
                        last = started.elapsed();
                    }
                    Err(_) => {
                        conn = None;
                        failed += 1;
                    }
                }
            }
            if let Some(mut c) = conn.take() {
                c.quit().await;
            }
            (lat, failed, last)
        }));
    }
    let (mut lat, mut failed, mut elapsed) = (Vec::new(), 0, Duration::ZERO);
    for t in tasks {
        let (l, f, last) = t.await.expect("client task");
        lat.extend(l);
        failed += f;
        // Up to the last message delivered: time spent only waiting out a lost one is not throughput.
        elapsed = elapsed.max(last);
    }
    let peak = sampler.stop().max(peak_kib(relay.pid()));
    // Every 250 was given after the sink accepted the message; check that nothing is missing.
    let delivered = sink.count.load(Ordering::SeqCst) - before;
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or_default()
    };
    println!(
        "{:<16} {:>8} {:>7} {:>9} {:>11.0} {:>9.2} {:>9.2} {:>8.1} MiB{}{}",
        s.name,
        human_size(s.size),
        s.clients,
        lat.len(),
        lat.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
        peak as f64 / 1024.0,
        if delivered as usize == lat.len() { String::new() } else { format!("  (sink got {delivered})") },
        if failed == 0 {
            String::new()
        } else {
            format!("  ({failed} timed out after {}s)", MESSAGE_TIMEOUT.as_secs())
        }
    );
    if let Some(limit) = sink.users.limit {
        println!(
            "{:<16} sink allows {limit} connections per user: {} AUTHs refused with 432 4.3.2; most of one user's at a login: {}",
            "",
            sink.users.refused.swap(0, Ordering::SeqCst),
            sink.users.peak.swap(0, Ordering::SeqCst)
        );
    }
}

/// Opens `n` device connections that greet and then stay idle; reports the memory they cost.
/// Stops at the first connection that times out: the server is at its limit.
async fn idle_connections(relay: &RelayProc, n: usize) {
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(relay.pid());
    let mut conns = Vec::new();
    for i in 0..n {
        let greeted = tokio::time::timeout(MESSAGE_TIMEOUT, async {
            let mut c = Client::connect(relay.port, i).await;
            c.cmd("EHLO idle.bench\r\n").await;
            c
        })
        .await;
        match greeted {
            Ok(c) => conns.push(c),
            Err(_) => break,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with = rss_kib(relay.pid());
    let open = conns.len();
    println!(
        "{:<16} {:>8} {:>7} {:>9} {:>11} {:>9} {:>9} {:>8.1} MiB  (+{:.1} MiB for {open} connections, {:.1} KiB each){}",
        "idle-1000",
        "-",
        n,
        "-",
        "-",
        "-",
        "-",
        with as f64 / 1024.0,
        (with.saturating_sub(before)) as f64 / 1024.0,
        (with.saturating_sub(before)) as f64 / open.max(1) as f64,
        if open == n {
            String::new()
        } else {
            format!("  (connection {} timed out after {}s; stopped)", open + 1, MESSAGE_TIMEOUT.as_secs())
        }
    );
    for mut c in conns {
        c.quit().await;
    }
}

/// A drain scenario: `messages` queued while the upstream refuses, then drained.
struct Drain {
    name: &'static str,
    messages: usize,
    clients: usize,
}

const DRAINS: &[Drain] = &[
    Drain { name: "drain", messages: 50_000, clients: 16 },
    Drain { name: "drain-100k", messages: 100_000, clients: 16 },
];

/// While set, the sink refuses mail as a provider that is down or refusing does: a new
/// connection gets `421` at once, an open one `451` to MAIL, RCPT and DATA.
static SINK_CLOSED: AtomicBool = AtomicBool::new(false);

/// A connection to a closed sink: one 421 greeting, then the sink hangs up.
async fn sink_closed<S: AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    s.write_all(b"421 4.3.0 sink.bench is not accepting mail right now\r\n").await?;
    s.flush().await
}

/// Runs the drain scenarios the filter selects (all of them without a filter): the relay
/// queues a backlog while the sink refuses, the sink comes back, the admin runs
/// `queue retry all`, and the backlog drains. Prints acceptance rate, RSS at depth and during
/// `queue list` and `queue retry all`, drain rate and peak RSS during the drain. Only for
/// mfd-relay (a peer has no queue CLI).
async fn drain_scenarios(filter: &[String], relay: &RelayProc, sink: &Sink, dir: &Path) {
    let selected: Vec<&Drain> =
        DRAINS.iter().filter(|d| filter.is_empty() || filter.iter().any(|f| d.name.contains(f.as_str()))).collect();
    if selected.is_empty() || std::env::var_os("MFD_BENCH_PEER").is_some() {
        return;
    }
    println!();
    println!(
        "{:<12} {:>9} {:>11} {:>11} {:>11} {:>11} {:>11} {:>11} {:>13}",
        "drain", "messages", "accept/s", "RSS depth", "RSS list", "retry all", "RSS retry", "drain/s", "peak drain"
    );
    for d in selected {
        drain(d, relay, sink, &dir.join("config.toml")).await;
    }
}

/// One drain scenario (see [`drain_scenarios`]).
async fn drain(d: &Drain, relay: &RelayProc, sink: &Sink, config: &Path) {
    let scale: f64 = std::env::var("MFD_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let messages = ((d.messages as f64 * scale) as usize).max(1);
    let body = Arc::new(make_body(2 * 1024));
    let pid = relay.pid();
    let before = sink.count.load(Ordering::SeqCst);

    // 1. The backlog: the sink refuses, every message is acknowledged as queued.
    SINK_CLOSED.store(true, Ordering::SeqCst);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..d.clients {
        let (body, next, port) = (body.clone(), next.clone(), relay.port);
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            while next.fetch_add(1, Ordering::SeqCst) < messages as u64 {
                let sent = tokio::time::timeout(MESSAGE_TIMEOUT, async {
                    let mut c = Client::connect(port, client).await;
                    c.send_message(&body).await;
                    c.quit().await;
                })
                .await;
                done += usize::from(sent.is_ok());
            }
            done
        }));
    }
    let mut accepted = 0;
    for t in tasks {
        accepted += t.await.expect("client task");
    }
    let accept_rate = accepted as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let at_depth = rss_kib(pid);

    // 2. `queue list` at depth (the default page).
    let (list_rss, list_out, _) = cli_sampled(config, &["queue", "list"], pid).await;
    let listed_total = list_out.lines().last().unwrap_or_default().to_string();

    // 3. The sink is back; the admin retries everything; the backlog drains.
    SINK_CLOSED.store(false, Ordering::SeqCst);
    reset_peak(pid);
    let drain_sampler = RssSampler::start(pid);
    let started = Instant::now();
    let cpu_before = cpu_secs(pid);
    let (retry_rss, retry_out, retry_took) = cli_sampled(config, &["queue", "retry", "all"], pid).await;
    let want = before + accepted as u64;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last = sink.count.load(Ordering::SeqCst);
    let mut last_change = Instant::now();
    while last < want && Instant::now() < deadline && last_change.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = sink.count.load(Ordering::SeqCst);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    let drain_took = started.elapsed();
    let drain_cpu = cpu_secs(pid) - cpu_before;
    let drained = (last - before) as usize;
    let peak = drain_sampler.stop().max(peak_kib(pid));
    let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
    println!(
        "{:<12} {:>9} {:>11.0} {:>11} {:>11} {:>10.2}s {:>11} {:>11.0} {:>13}{}",
        d.name,
        accepted,
        accept_rate,
        mib(at_depth),
        mib(list_rss),
        retry_took.as_secs_f64(),
        mib(retry_rss),
        drained as f64 / drain_took.as_secs_f64(),
        mib(peak),
        if drained == accepted { String::new() } else { format!("  (sink got {drained} of {accepted})") }
    );
    println!("{:<12} queue list: {listed_total}; retry: {}", "", retry_out.trim());
    println!(
        "{:<12} drain took {:.1} s and {drain_cpu:.1} s of the relay's CPU: {:.0} messages per CPU second (load-independent)",
        "",
        drain_took.as_secs_f64(),
        drained as f64 / drain_cpu.max(1e-9)
    );
    // Let the last removals commit before the next scenario.
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// CPU time (user + system) a process has used, in seconds (`/proc/<pid>/stat`, 100 ticks/s).
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / 100.0
}

/// Runs the relay's CLI with `config` (off the async workers, which serve the sink) while
/// sampling the relay's RSS: (peak RSS in KiB while it ran, its stdout, how long it took).
async fn cli_sampled(config: &Path, args: &[&str], pid: u32) -> (u64, String, Duration) {
    let config = config.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || cli_sampled_blocking(&config, &args, pid)).await.expect("CLI thread")
}

fn cli_sampled_blocking(config: &Path, args: &[String], pid: u32) -> (u64, String, Duration) {
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_mfd-relay"));
    let sampler = RssSampler::start(pid);
    let started = Instant::now();
    let out = Command::new(binary)
        .args(args)
        .arg("-c")
        .arg(config)
        .env("MFD_RELAY_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run the relay's CLI");
    let took = started.elapsed();
    let peak = sampler.stop();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    (peak, stdout, took)
}

/// Messages of the `wan` scenario (times `MFD_BENCH_SCALE`).
const WAN_MESSAGES: usize = 300;

/// `wan`: the provider is a WAN away (`MFD_BENCH_SINK_RTT_MS`, 30 ms unless set); one printer
/// sends 2 KiB scans one connection after another. Reports the in-session wait the printer
/// sees, from the end of its data to the 250 (the relay's commit and its whole upstream
/// transaction on a pooled connection), with PIPELINING offered or not
/// (`MFD_BENCH_SINK_PIPELINING=0`).
async fn wan(relay: &RelayProc, sink: &Sink) {
    let before = sink.wire.rtt_ms.load(Ordering::SeqCst);
    if std::env::var_os("MFD_BENCH_SINK_RTT_MS").is_none() {
        sink.wire.rtt_ms.store(30, Ordering::SeqCst);
    }
    let scale: f64 = std::env::var("MFD_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let messages = ((WAN_MESSAGES as f64 * scale) as usize).max(1);
    let body = make_body(2 * 1024);
    // A first message opens and pools the upstream connection (connect, TLS, AUTH: not measured).
    let mut c = Client::connect(relay.port, 0).await;
    c.send_message(&body).await;
    c.quit().await;
    let (mut lat, mut failed) = (Vec::new(), 0);
    let started = Instant::now();
    for _ in 0..messages {
        let sent = tokio::time::timeout(MESSAGE_TIMEOUT, async {
            let mut c = Client::connect(relay.port, 0).await;
            let waited = c.send_message_timed(&body).await;
            c.quit().await;
            waited
        })
        .await;
        match sent {
            Ok(d) => lat.push(d),
            Err(_) => failed += 1,
        }
    }
    let elapsed = started.elapsed();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or_default()
    };
    let rtt = sink.wire.rtt_ms.load(Ordering::SeqCst);
    println!(
        "{:<16} {:>8} {:>7} {:>9} {:>11.1} {:>9.2} {:>9.2} {:>11}  (RTT {rtt} ms to the sink, PIPELINING {}; p50/p99: DATA's end to 250){}",
        format!("wan-{rtt}ms"),
        human_size(body.len()),
        1,
        lat.len(),
        lat.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
        "-",
        if sink.wire.pipelining { "offered" } else { "not offered" },
        if failed == 0 { String::new() } else { format!("  ({failed} timed out)") }
    );
    sink.wire.rtt_ms.store(before, Ordering::SeqCst);
}

/// A message of about `size` bytes: headers and base64-like lines, as a scan is.
fn make_body(size: usize) -> Vec<u8> {
    let mut b = b"From: scanner@printer.lan\r\nTo: boss@contoso.test\r\nSubject: bench scan\r\nDate: Thu, 26 Nov 2026 06:00:00 +0000\r\nMessage-ID: <bench@printer>\r\nMIME-Version: 1.0\r\n\r\n".to_vec();
    let line = b"QmVuY2htYXJrIHBheWxvYWQgbGluZSBvZiBhIHNjYW4sIGJhc2U2NCBlbmNvZGVkLCA3NiBjaGFyYWN0ZXJzIQ\r\n";
    while b.len() < size {
        b.extend_from_slice(line);
    }
    b.extend_from_slice(b".\r\n");
    b
}

/// Devices configured in the relay: one per client of the largest scenario.
const DEVICES: usize = 64;

/// The username of device `i` (a peer under test has one login for all).
fn device_user(user: &str, i: usize) -> String {
    if std::env::var_os("MFD_BENCH_PEER").is_some() {
        user.to_string()
    } else {
        format!("{user}{i}")
    }
}

/// A printer-like SMTP client.
struct Client {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    line: String,
}

impl Client {
    /// Connects as device `n` (its username, and its own address 127.0.1.n).
    async fn connect(port: u16, n: usize) -> Client {
        let i = n % DEVICES;
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        let from = std::net::Ipv4Addr::new(127, 0, 1, 1 + i as u8);
        socket.bind((from, 0).into()).expect("bind a loopback source address");
        let s = socket.connect(([127, 0, 0, 1], port).into()).await.expect("connect to relay");
        let _ = s.set_nodelay(true);
        let (r, w) = s.into_split();
        let mut c = Client { r: BufReader::new(r), w, line: String::new() };
        c.expect("220").await;
        c.cmd("EHLO printer.bench\r\n").await;
        let (user, password) = login();
        let user = device_user(user, i);
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        let r = c.cmd(&format!("AUTH PLAIN {auth}\r\n")).await;
        assert!(r.starts_with("235"), "AUTH: {r}");
        c
    }

    async fn expect(&mut self, code: &str) -> String {
        let r = self.reply().await;
        assert!(r.starts_with(code), "expected {code}, got {r}");
        r
    }

    async fn reply(&mut self) -> String {
        loop {
            self.line.clear();
            let n = self.r.read_line(&mut self.line).await.expect("read reply");
            assert!(n > 0, "relay closed the connection");
            if self.line.as_bytes().get(3) != Some(&b'-') {
                return self.line.clone();
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.w.write_all(line.as_bytes()).await.expect("write");
        self.reply().await
    }

    async fn send_message(&mut self, body: &[u8]) {
        // RFC 2920: the envelope in one write.
        self.w
            .write_all(b"MAIL FROM:<scanner@printer.lan>\r\nRCPT TO:<boss@contoso.test>\r\nDATA\r\n")
            .await
            .expect("write");
        self.expect("250").await;
        self.expect("250").await;
        self.expect("354").await;
        for chunk in body.chunks(256 * 1024) {
            self.w.write_all(chunk).await.expect("write body");
        }
        let r = self.reply().await;
        assert!(r.starts_with("250"), "DATA: {r}");
    }

    /// Sends one message like [`Client::send_message`]; returns the time from the end of its
    /// data (the final dot written) to the 250: the in-session wait the printer sees.
    async fn send_message_timed(&mut self, body: &[u8]) -> Duration {
        self.w
            .write_all(b"MAIL FROM:<scanner@printer.lan>\r\nRCPT TO:<boss@contoso.test>\r\nDATA\r\n")
            .await
            .expect("write");
        self.expect("250").await;
        self.expect("250").await;
        self.expect("354").await;
        for chunk in body.chunks(256 * 1024) {
            self.w.write_all(chunk).await.expect("write body");
        }
        let end = Instant::now();
        let r = self.reply().await;
        assert!(r.starts_with("250"), "DATA: {r}");
        end.elapsed()
    }

    async fn quit(&mut self) {
        let _ = self.w.write_all(b"QUIT\r\n").await;
        let _ = self.reply_or_eof().await;
    }

    async fn reply_or_eof(&mut self) -> Option<String> {
        self.line.clear();
        match self.r.read_line(&mut self.line).await {
            Ok(n) if n > 0 => Some(self.line.clone()),
            _ => None,
        }
    }
}

/// The upstream: accepts XOAUTH2, counts messages, throws bodies away; offers STARTTLS when it
/// has a certificate.
struct Sink {
    port: u16,
    count: Arc<AtomicU64>,
    /// The network between relay and provider: `MFD_BENCH_SINK_RTT_MS` (each flight of
    /// replies waits this long) and `MFD_BENCH_SINK_PIPELINING=0` (PIPELINING not offered).
    wire: Arc<Wire>,
    /// Authenticated connections per user, like Exchange's 3 per mailbox.
    users: Arc<Users>,
    /// The sink's self-signed certificate, for clients to trust, when it offers STARTTLS.
    ca_file: Option<PathBuf>,
}

/// The sink's TLS side: a fresh self-signed certificate for 127.0.0.1, written out as a CA file.
struct SinkTls {
    acceptor: tokio_rustls::TlsAcceptor,
    ca_file: PathBuf,
}

impl SinkTls {
    fn new(dir: &Path) -> SinkTls {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .expect("sink certificate");
        let ca_file = dir.join("sink-ca.pem");
        std::fs::write(&ca_file, ck.cert.pem()).expect("write the sink's certificate");
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .expect("sink TLS config");
        SinkTls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca_file }
    }
}

/// A WAN between the relay and the provider, as the sink plays it.
struct Wire {
    /// Round-trip time in ms: the replies to a flight of commands (everything the client sent
    /// before waiting) leave this long after the flight came, all at once, as over a WAN.
    rtt_ms: AtomicU64,
    /// Whether EHLO offers PIPELINING (RFC 2920); pipelined commands are honoured either way.
    pipelining: bool,
}

impl Wire {
    fn from_env() -> Wire {
        let rtt = std::env::var("MFD_BENCH_SINK_RTT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        let pipelining = std::env::var("MFD_BENCH_SINK_PIPELINING").map_or(true, |v| v != "0");
        Wire { rtt_ms: AtomicU64::new(rtt), pipelining }
    }

    fn rtt(&self) -> Duration {
        Duration::from_millis(self.rtt_ms.load(Ordering::SeqCst))
    }
}

/// Sends the replies gathered for one flight, one RTT after the flight came.
async fn reply_to_flight<S: AsyncWrite + Unpin>(s: &mut S, out: &mut Vec<u8>, wire: &Wire) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let rtt = wire.rtt();
    if !rtt.is_zero() {
        tokio::time::sleep(rtt).await;
    }
    s.write_all(out).await?;
    s.flush().await?;
    out.clear();
    Ok(())
}

/// `MFD_BENCH_SINK_PER_USER=3`: the sink refuses a user's 4th concurrent authenticated
/// connection with `432 4.3.2`, as Exchange Online does.
#[derive(Default)]
struct Users {
    limit: Option<usize>,
    now: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    refused: AtomicU64,
    peak: AtomicU64,
}

impl Users {
    /// Counts a new authenticated connection of `user`; false when it is one too many.
    fn take(&self, user: &str) -> bool {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        let n = now.entry(user.to_string()).or_default();
        if self.limit.is_some_and(|l| *n >= l) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        *n += 1;
        self.peak.fetch_max(*n as u64, Ordering::SeqCst);
        true
    }

    fn give_back(&self, user: &str) {
        if let Some(n) = self.now.lock().unwrap_or_else(|e| e.into_inner()).get_mut(user) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The `user=` of an XOAUTH2 initial response (base64).
fn xoauth2_user(b64: &str) -> String {
    let raw = base64::engine::general_purpose::STANDARD.decode(b64.trim()).unwrap_or_default();
    let text = String::from_utf8_lossy(&raw);
    text.split('\x01').find_map(|f| f.strip_prefix("user=")).unwrap_or("").to_string()
}

impl Sink {
    async fn start(tls: Option<SinkTls>) -> Sink {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        let port = l.local_addr().expect("addr").port();
        let count = Arc::new(AtomicU64::new(0));
        let limit = std::env::var("MFD_BENCH_SINK_PER_USER").ok().and_then(|v| v.parse().ok());
        let users = Arc::new(Users { limit, ..Users::default() });
        let ca_file = tls.as_ref().map(|t| t.ca_file.clone());
        let acceptor = tls.map(|t| t.acceptor);
        let wire = Arc::new(Wire::from_env());
        let (c, u, w) = (count.clone(), users.clone(), wire.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (c, u, w, acceptor) = (c.clone(), u.clone(), w.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let mut user = None;
                    let _ = sink_session(s, c, &u, &mut user, acceptor, &w).await;
                    if let Some(user) = user {
                        u.give_back(&user);
                    }
                });
            }
        });
        Sink { port, count, wire, users, ca_file }
    }
}

async fn sink_session(
    s: TcpStream,
    count: Arc<AtomicU64>,
    users: &Users,
    user: &mut Option<String>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    wire: &Wire,
) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut s = BufReader::with_capacity(256 * 1024, s);
    if SINK_CLOSED.load(Ordering::SeqCst) {
        return sink_closed(s).await;
    }
    // The greeting comes one RTT after the connect (SYN, SYN-ACK, then the 220).
    reply_to_flight(&mut s, &mut b"220 sink.bench ESMTP\r\n".to_vec(), wire).await?;
    if sink_dialogue(&mut s, &count, users, user, tls.is_some(), wire).await? {
        if let Some(tls) = tls {
            // Whatever was pipelined after STARTTLS goes with the buffer (RFC 3207).
            let s = tls.accept(s.into_inner()).await?;
            let mut s = BufReader::with_capacity(256 * 1024, s);
            sink_dialogue(&mut s, &count, users, user, false, wire).await?;
        }
    }
    Ok(())
}

/// Serves SMTP commands until QUIT or EOF; returns true after answering STARTTLS (offered only
/// when `starttls`), for the caller to continue over TLS. Commands are read from the buffer
/// one at a time and their replies gathered until the client's flight is used up (RFC 2920
/// 3.1, as Postfix does); then they go out together, one RTT after the flight came.
async fn sink_dialogue<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut BufReader<S>,
    count: &AtomicU64,
    users: &Users,
    user: &mut Option<String>,
    starttls: bool,
    wire: &Wire,
) -> std::io::Result<bool> {
    let mut line = String::new();
    let mut out = Vec::new();
    loop {
        if s.buffer().is_empty() {
            reply_to_flight(s.get_mut(), &mut out, wire).await?;
        }
        line.clear();
        if s.read_line(&mut line).await? == 0 {
            return Ok(false);
        }
        let cmd = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match cmd.as_str() {
            "EHLO" => {
                out.extend_from_slice(b"250-sink.bench\r\n");
                if wire.pipelining {
                    out.extend_from_slice(b"250-PIPELINING\r\n");
                }
                out.extend_from_slice(b"250-8BITMIME\r\n250-SIZE 157286400\r\n");
                if starttls {
                    out.extend_from_slice(b"250-STARTTLS\r\n");
                }
                b"250 AUTH XOAUTH2\r\n"
            }
            "STAR" if starttls => {
                out.extend_from_slice(b"220 2.0.0 Ready to start TLS\r\n");
                reply_to_flight(s.get_mut(), &mut out, wire).await?;
                return Ok(true);
            }
            "AUTH" => {
                // "AUTH XOAUTH2" without an initial response sends the token after a 334.
                let response = match line.split_whitespace().nth(2) {
                    Some(ir) => ir.to_string(),
                    None => {
                        out.extend_from_slice(b"334 \r\n");
                        reply_to_flight(s.get_mut(), &mut out, wire).await?;
                        line.clear();
                        if s.read_line(&mut line).await? == 0 {
                            return Ok(false);
                        }
                        line.trim().to_string()
                    }
                };
                let who = xoauth2_user(&response);
                if users.take(&who) {
                    *user = Some(who);
                    b"235 2.7.0 Authentication successful\r\n"
                } else {
                    b"432 4.3.2 Concurrent connections limit exceeded. Visit https://aka.ms/concurrent_sending for more information.\r\n"
                }
            }
            // Closed (the drain scenarios): a pipelined flight gets 451 for each command, and
            // DATA no 354, so no body is read or counted.
            "MAIL" | "RCPT" | "DATA" if SINK_CLOSED.load(Ordering::SeqCst) => {
                b"451 4.3.0 sink.bench is not accepting mail right now\r\n"
            }
            "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 2.0.0 OK\r\n",
            "QUIT" => {
                out.extend_from_slice(b"221 2.0.0 Bye\r\n");
                reply_to_flight(s.get_mut(), &mut out, wire).await?;
                return Ok(false);
            }
            "DATA" => {
                // The 354 answers the flight that ended with DATA (RFC 2920: DATA is last).
                out.extend_from_slice(b"354 go ahead\r\n");
                reply_to_flight(s.get_mut(), &mut out, wire).await?;
                read_until_dot(s).await?;
                count.fetch_add(1, Ordering::SeqCst);
                b"250 2.0.0 OK queued\r\n"
            }
            _ => b"500 5.5.1 what\r\n",
        };
        out.extend_from_slice(reply);
    }
}

/// Reads DATA until CRLF.CRLF without keeping it (the DATA line's CRLF counts as the first).
async fn read_until_dot<R: AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<()> {
    const END: &[u8] = b"\r\n.\r\n";
    let mut matched = 2;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        for (i, &b) in buf.iter().enumerate() {
            matched = if b == END[matched] {
                matched + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            if matched == END.len() {
                r.consume(i + 1);
                return Ok(());
            }
        }
        let n = buf.len();
        r.consume(n);
    }
}

/// A token endpoint that grants anything, at `http://127.0.0.1:{port}/token`; returns the port.
async fn token_endpoint() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind token endpoint");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                let body = r#"{"access_token":"bench-access-token","token_type":"Bearer","expires_in":3600}"#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}

/// The server under test: the relay, started from the binary cargo built next to this
/// benchmark, or a peer started from `MFD_BENCH_PEER`.
struct RelayProc {
    child: Child,
    /// What runs, for the report.
    what: String,
    port: u16,
}

impl RelayProc {
    fn start(dir: &Path, token_port: u16, sink: &Sink) -> RelayProc {
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_mfd-relay"));
        let port = free_port();
        let admin = free_port();
        let (user, password) = login();
        let hash = mfd_relay::credentials::hash(password).expect("hash");
        let sink_port = sink.port;
        let upstream_tls = match &sink.ca_file {
            Some(ca) => format!("smtp_tls = \"starttls\"\nca_file = \"{}\"", ca.display()),
            None => "smtp_tls = \"none\"".to_string(),
        };
        // MFD_BENCH_PROVIDER_KIND=microsoft: the provider is Exchange-like (at most 3 connections
        // per identity), its per-minute shaping off so that the sink's speed is what counts.
        let kind = match std::env::var("MFD_BENCH_PROVIDER_KIND").as_deref() {
            Ok("microsoft") => "kind = \"microsoft\"\ntenant = \"bench\"\nmessages_per_minute = 0",
            _ => "kind = \"generic\"",
        };
        // One device per client (as many printers, each with its login): the relay holds at most
        // 5 logins in flight per username and per address (the AUTH throttle), so the clients
        // also come from their own loopback addresses.
        let devices: String = (0..DEVICES)
            .map(|i| {
                format!(
                    "[[device]]\nname = \"bench{i}\"\nidentity = \"scans\"\nusername = \"{}\"\npin_hash = \"{hash}\"\n\n",
                    device_user(user, i)
                )
            })
            .collect();
        let config = format!(
            r#"[relay]
hostname = "relay.bench"
data_dir = "data"
upstream_pool = 8

[admin]
listen = "127.0.0.1:{admin}"

[[listener]]
listen = "127.0.0.1:{port}"
max_connections = 5000
max_connections_per_address = 5000
max_message_size = "64MiB"

[[provider]]
name = "sink"
{kind}
client_id = "bench"
client_secret = "bench"
token_url = "http://127.0.0.1:{token_port}/token"
smtp = "127.0.0.1:{sink_port}"
{upstream_tls}

[[identity]]
name = "scans"
provider = "sink"
email = "scans@contoso.test"
flow = "client_credentials"

{devices}"#
        );
        let path = dir.join("config.toml");
        std::fs::write(&path, config).expect("write config");
        let log = std::fs::File::create(dir.join("relay.log")).expect("log");
        let wrapper: Vec<String> = std::env::var("MFD_BENCH_WRAPPER")
            .map(|w| w.split_whitespace().map(String::from).collect())
            .unwrap_or_default();
        let mut cmd = match wrapper.split_first() {
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(&binary);
                c
            }
            None => Command::new(&binary),
        };
        let child = cmd
            .args(["run", "-c"])
            .arg(&path)
            .env("MFD_RELAY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start relay");
        RelayProc { child, what: format!("relay: {}", binary.display()), port }.listening(&dir.join("relay.log"))
    }

    /// Starts `command` (`MFD_BENCH_PEER`, placeholders substituted) in the relay's place.
    fn peer(command: &str, dir: &Path, token_port: u16, sink: &Sink) -> RelayProc {
        let port = free_port();
        let ca_file = sink.ca_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let args: Vec<String> = command
            .split_whitespace()
            .map(|a| {
                a.replace("{port}", &port.to_string())
                    .replace("{sink_port}", &sink.port.to_string())
                    .replace("{token_port}", &token_port.to_string())
                    .replace("{token_url}", &format!("http://127.0.0.1:{token_port}/token"))
                    .replace("{ca_file}", &ca_file)
                    .replace("{dir}", &dir.display().to_string())
            })
            .collect();
        let Some((prog, rest)) = args.split_first() else { panic!("MFD_BENCH_PEER is empty") };
        let log_path = dir.join("peer.log");
        let log = std::fs::File::create(&log_path).expect("peer log");
        let child = Command::new(prog)
            .args(rest)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("peer log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start peer {prog}: {e}"));
        RelayProc { child, what: format!("peer: {}", args.join(" ")), port }.listening(&log_path)
    }

    /// Waits until the server accepts connections on its port; panics, pointing at its log,
    /// when it exits or takes longer than a minute.
    fn listening(mut self, log: &Path) -> RelayProc {
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                panic!("{} exited ({status}) before listening; {}:\n{tail}", self.what, log.display());
            }
            assert!(Instant::now() < deadline, "{} is not listening after 60 s; see {}", self.what, log.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        self
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
}

impl Drop for RelayProc {
    fn drop(&mut self) {
        // SIGTERM first, so a profiler wrapping the relay gets to write its report.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn peak_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// Resets the kernel's peak-RSS counter (VmHWM) of a process (Linux: `5` in clear_refs).
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Samples RSS every 5 ms in a thread (in case clear_refs is not allowed).
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut max = 0;
            while !s.load(Ordering::SeqCst) {
                max = max.max(rss_kib(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            max
        });
        RssSampler { stop, handle }
    }

    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or(0)
    }
}

fn human_size(n: usize) -> String {
    if n >= 1024 * 1024 {
        format!("{}MiB", n / 1024 / 1024)
    } else {
        format!("{}KiB", n / 1024)
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
