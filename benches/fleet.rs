//! A large site's fleet: many identities with tokens, many mobile-print mailboxes in IDLE.
//!
//! `cargo bench --bench fleet` starts the release relay with `MFD_BENCH_IDENTITIES` app-only
//! identities (1,000 by default) and `MFD_BENCH_MAILBOXES` IMAP mailboxes (200 by default, each
//! with its own identity), against a token endpoint that answers after `MFD_BENCH_TOKEN_MS`
//! (100 ms by default, a provider across a WAN) and a fake IMAP server that offers IDLE. It
//! prints:
//! - how long until every identity has its first token, the token requests made, and the
//!   most that were in flight at once (the "thundering herd" figure);
//! - how long until every mailbox sits in IDLE, the IMAP connections open;
//! - the relay's RSS, threads and open files once the fleet is settled, and its CPU time
//!   over `MFD_BENCH_SETTLE_SECONDS` (10 by default) of nothing happening.
//!
//! Nothing here talks to the internet: everything listens on 127.0.0.1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// In-flight and total counts of one kind of request, with the highest in-flight seen.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    max: AtomicUsize,
    total: AtomicUsize,
}

impl Gauge {
    fn enter(&self) {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(n, Ordering::SeqCst);
        self.total.fetch_add(1, Ordering::SeqCst);
    }
    fn leave(&self) {
        self.now.fetch_sub(1, Ordering::SeqCst);
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let identities: usize = env_or("MFD_BENCH_IDENTITIES", 1000);
    let mailboxes: usize = env_or::<usize>("MFD_BENCH_MAILBOXES", 200).min(identities);
    let token_ms: u64 = env_or("MFD_BENCH_TOKEN_MS", 100);
    let settle: u64 = env_or("MFD_BENCH_SETTLE_SECONDS", 10);

    let tokens = Arc::new(Gauge::default());
    let token_port = token_endpoint(tokens.clone(), Duration::from_millis(token_ms)).await;
    let imap = Arc::new(ImapStats::default());
    let imap_port = fake_imap(imap.clone()).await;

    let dir = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    let relay = Relay::start(dir.path(), identities, mailboxes, token_port, imap_port);
    let listening = started.elapsed();

    println!("mfd-relay fleet benchmark: {identities} identities (client credentials), {mailboxes} IDLE mailboxes");
    println!("machine: {} x {}, token endpoint answers after {token_ms} ms", num_cpus(), cpu_model());
    println!("listening after {:.2} s", listening.as_secs_f64());

    let all_tokens = wait_for(Duration::from_secs(600), || tokens.total.load(Ordering::SeqCst) >= identities).await;
    report_wait("every identity has a token", all_tokens, started);
    println!(
        "token requests: {} in all, at most {} in flight at once",
        tokens.total.load(Ordering::SeqCst),
        tokens.max.load(Ordering::SeqCst)
    );
    let all_idle = wait_for(Duration::from_secs(600), || imap.idle.now.load(Ordering::SeqCst) >= mailboxes).await;
    report_wait("every mailbox in IDLE", all_idle, started);
    println!(
        "IMAP: {} connections open ({} in all), {} in IDLE, at most {} logins at once",
        imap.conns.now.load(Ordering::SeqCst),
        imap.conns.total.load(Ordering::SeqCst),
        imap.idle.now.load(Ordering::SeqCst),
        imap.logins.max.load(Ordering::SeqCst)
    );

    let pid = relay.child.id();
    let cpu_before = cpu_ticks(pid);
    let requests_before = tokens.total.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(settle)).await;
    let cpu = (cpu_ticks(pid) - cpu_before) as f64 / clock_ticks() as f64;
    println!(
        "settled: RSS {} MiB (peak {} MiB), {} threads, {} open files; over {settle} s: {:.2} s CPU ({:.1}%), {} token requests",
        status_kib(pid, "VmRSS:") / 1024,
        status_kib(pid, "VmHWM:") / 1024,
        status_kib(pid, "Threads:"),
        std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0),
        cpu,
        100.0 * cpu / settle as f64,
        tokens.total.load(Ordering::SeqCst) - requests_before,
    );
}

fn report_wait(what: &str, reached: bool, started: Instant) {
    if reached {
        println!("{what} after {:.2} s", started.elapsed().as_secs_f64());
    } else {
        println!("{what}: NOT reached after {:.0} s", started.elapsed().as_secs_f64());
    }
}

async fn wait_for(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// A token endpoint that grants any client-credentials request after `delay`; returns its port.
async fn token_endpoint(gauge: Arc<Gauge>, delay: Duration) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind token endpoint");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let gauge = gauge.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let _ = s.read(&mut buf).await;
                gauge.enter();
                tokio::time::sleep(delay).await;
                let body = r#"{"access_token":"fleet-access-token","token_type":"Bearer","expires_in":3600}"#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                gauge.leave();
            });
        }
    });
    port
}

#[derive(Default)]
struct ImapStats {
    conns: Gauge,
    logins: Gauge,
    idle: Gauge,
}

/// An IMAP server (RFC 3501) with IDLE (RFC 2177) and SASL XOAUTH2 for any token, holding an
/// empty INBOX: enough for the relay's poller to log in, select, search and wait.
async fn fake_imap(stats: Arc<ImapStats>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind imap");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let stats = stats.clone();
            tokio::spawn(async move {
                stats.conns.enter();
                let _ = imap_session(s, &stats).await;
                stats.conns.leave();
            });
        }
    });
    port
}

async fn imap_session(s: tokio::net::TcpStream, stats: &ImapStats) -> std::io::Result<()> {
    const CAPS: &str = "IMAP4rev1 IDLE UIDPLUS MOVE AUTH=XOAUTH2";
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    w.write_all(format!("* OK [CAPABILITY {CAPS}] fake IMAP ready\r\n").as_bytes()).await?;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.trim_end().splitn(3, ' ');
        let tag = parts.next().unwrap_or("*").to_string();
        let cmd = parts.next().unwrap_or("").to_ascii_uppercase();
        let rest = parts.next().unwrap_or("").to_ascii_uppercase();
        let reply = match (cmd.as_str(), rest.as_str()) {
            ("CAPABILITY", _) => format!("* CAPABILITY {CAPS}\r\n{tag} OK CAPABILITY completed\r\n"),
            ("AUTHENTICATE", _) => {
                stats.logins.enter();
                if !rest.contains(' ') {
                    // No initial response: ask for it (RFC 4959).
                    w.write_all(b"+ \r\n").await?;
                    line.clear();
                    r.read_line(&mut line).await?;
                }
                stats.logins.leave();
                format!("{tag} OK [CAPABILITY {CAPS}] authenticated\r\n")
            }
            ("SELECT" | "EXAMINE", _) => format!(
                "* 0 EXISTS\r\n* 0 RECENT\r\n* OK [UIDVALIDITY 1] UIDs valid\r\n* OK [UIDNEXT 1] next\r\n\
                 * FLAGS (\\Seen \\Deleted)\r\n{tag} OK [READ-WRITE] SELECT completed\r\n"
            ),
            ("UID", r) if r.starts_with("SEARCH") => format!("* SEARCH\r\n{tag} OK SEARCH completed\r\n"),
            ("IDLE", _) => {
                w.write_all(b"+ idling\r\n").await?;
                stats.idle.enter();
                line.clear();
                let n = r.read_line(&mut line).await;
                stats.idle.leave();
                if n? == 0 {
                    return Ok(());
                }
                format!("{tag} OK IDLE terminated\r\n")
            }
            ("LOGOUT", _) => {
                w.write_all(format!("* BYE logging out\r\n{tag} OK LOGOUT completed\r\n").as_bytes()).await?;
                return Ok(());
            }
            _ => format!("{tag} OK done\r\n"),
        };
        w.write_all(reply.as_bytes()).await?;
    }
}

struct Relay {
    child: Child,
}

impl Relay {
    fn start(dir: &Path, identities: usize, mailboxes: usize, token_port: u16, imap_port: u16) -> Relay {
        let binary = PathBuf::from(env!("CARGO_BIN_EXE_mfd-relay"));
        let port = free_port();
        let admin = free_port();
        let mut config = format!(
            r#"[relay]
hostname = "relay.bench"
data_dir = "data"

[admin]
listen = "127.0.0.1:{admin}"

[[listener]]
listen = "127.0.0.1:{port}"

[[provider]]
name = "fleet"
kind = "generic"
client_id = "bench"
client_secret = "bench"
token_url = "http://127.0.0.1:{token_port}/token"
smtp = "127.0.0.1:9"
smtp_tls = "none"
imap = "127.0.0.1:{imap_port}"
imap_tls = "none"

[[device]]
name = "printer"
identity = "id0"
addresses = ["127.0.0.1"]

"#
        );
        for i in 0..identities {
            config.push_str(&format!(
                "[[identity]]\nname = \"id{i}\"\nprovider = \"fleet\"\nemail = \"print{i}@contoso.test\"\nflow = \"client_credentials\"\n\n"
            ));
        }
        for i in 0..mailboxes {
            config.push_str(&format!(
                "[[mailbox]]\nname = \"mb{i}\"\nidentity = \"id{i}\"\nspool = \"print\"\nsenders = [\"*@contoso.test\"]\n\n"
            ));
        }
        let path = dir.join("config.toml");
        std::fs::write(&path, config).expect("write config");
        let log_path = dir.join("relay.log");
        let log = std::fs::File::create(&log_path).expect("log");
        let mut child = Command::new(&binary)
            .args(["run", "-c"])
            .arg(&path)
            .env("MFD_RELAY_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start relay");
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
                panic!("relay exited ({status}) before listening:\n{tail}");
            }
            assert!(Instant::now() < deadline, "relay not listening after 60 s; see {}", log_path.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Relay { child }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
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

/// User plus system CPU time of a process, in clock ticks (/proc/PID/stat fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces; the fields we want follow its closing parenthesis.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 {
        n as u64
    } else {
        100
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
