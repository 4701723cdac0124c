//! Starts the real `mfd-relay` binary on loopback for integration tests, and drives the
//! real clients (Python's smtplib through tests/clients/smtp_send.py, swaks).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 for a relay, kept for it across restarts.
///
/// Taken below the kernel's ephemeral range (32768 and up on Linux): a port from `bind(0)`
/// could be handed to another test, a fake or Dovecot while a killed relay is down, and the
/// restart would then find its port taken. Each test process walks its own stretch of the
/// range (by pid), and every port is checked free before use.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ =
        NEXT.compare_exchange(0, 10_000 + (std::process::id() % 200) as u16 * 100, Ordering::SeqCst, Ordering::SeqCst);
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        if port >= 32_000 {
            NEXT.store(10_000, Ordering::SeqCst);
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Path of the relay binary built by cargo for this test run.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mfd-relay"))
}

/// A running relay process.
pub struct Relay {
    child: Option<Child>,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub smtp_port: u16,
    pub admin_port: u16,
    /// Extra environment for the process (e.g. LD_PRELOAD for fault injection).
    pub env: Vec<(String, String)>,
}

/// The parts of a test configuration that vary between tests.
pub struct Setup {
    /// TOML for [[provider]], [[identity]], [[device]] and [[mailbox]] sections.
    pub sections: String,
    /// Extra keys for [relay].
    pub relay_extra: String,
    /// Extra keys for the [[listener]].
    pub listener_extra: String,
}

impl Setup {
    pub fn new(sections: impl Into<String>) -> Setup {
        Setup { sections: sections.into(), relay_extra: String::new(), listener_extra: String::new() }
    }
}

impl Relay {
    /// Writes `dir/config.toml` with fresh ports and starts the relay; waits until it listens.
    pub fn start(dir: &Path, setup: &Setup) -> Relay {
        let smtp_port = free_port();
        let admin_port = free_port();
        // A test may set its own in-session timeout in `relay_extra`.
        let in_session =
            if setup.relay_extra.contains("in_session_timeout") { "" } else { "in_session_timeout = \"10s\"\n" };
        let text = format!(
            "[relay]\nhostname = \"relay.test\"\ndata_dir = \"data\"\nretry_first = \"1s\"\nretry_max = \"2s\"\n{in_session}{}\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n[[listener]]\nlisten = \"127.0.0.1:{smtp_port}\"\n{}\n\n{}\n",
            setup.relay_extra, setup.listener_extra, setup.sections
        );
        let config = dir.join("config.toml");
        std::fs::write(&config, text).unwrap();
        let mut r = Relay { child: None, dir: dir.to_path_buf(), config, smtp_port, admin_port, env: Vec::new() };
        r.spawn();
        r
    }

    /// Starts the process again with the same configuration and data (after a kill).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("relay.log")).unwrap();
        let child = Command::new(binary())
            .args(["run", "-c"])
            .arg(&self.config)
            .env("MFD_RELAY_LOG", "info,mfd_relay=debug")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start mfd-relay");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.smtp_port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mfd-relay exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "mfd-relay did not listen within 15 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
        // The admin listener is bound by its own task and may come a moment after SMTP: a test
        // that asks it right away must not find it closed.
        let admin = format!("listen = \"127.0.0.1:{}\"", self.admin_port);
        if std::fs::read_to_string(&self.config).is_ok_and(|c| c.contains(&admin)) {
            while TcpStream::connect(("127.0.0.1", self.admin_port)).is_err() {
                assert!(Instant::now() < deadline, "the admin listener did not listen within 15 s:\n{}", self.log());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Sends a signal by name ("HUP", "TERM").
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([&format!("-{sig}"), &self.pid().to_string()]).status();
    }

    /// Waits up to `timeout` for the process to exit by itself; its exit code (-1 for a
    /// signal), or None when it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.child.as_mut()?;
            if let Some(status) = c.try_wait().ok().flatten() {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(40);
            loop {
                if c.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("mfd-relay did not stop on SIGTERM:\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// GET on the admin listener; returns (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin_port, path)
    }

    /// `/metrics` once it has `line` (a counter can trail what a fake already saw), or after
    /// `within` as it is then.
    pub fn metrics_with(&self, line: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let (_, metrics) = self.admin_get("/metrics");
            if metrics.contains(line) || Instant::now() > deadline {
                return metrics;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `mfd-relay <args> -c config` and returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
        run_cli(&self.config, args, stdin)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs the relay binary with a config file.
pub fn run_cli(config: &Path, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(binary())
        .args(args)
        .arg("-c")
        .arg(config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.as_mut().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// One HTTP/1.1 request on loopback with the given headers (`Host` included by the caller,
/// so that tests can send a foreign one); returns (status, head in lower case, body).
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// A minimal HTTP/1.1 GET on loopback.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// Result of one smtplib run.
#[derive(Debug, serde::Deserialize)]
pub struct SendResult {
    pub ok: bool,
    pub code: Option<u16>,
    pub message: String,
    pub stage: String,
    /// With TLS: the protocol version ("TLSv1" ... "TLSv1.3") and suite the client got.
    #[serde(default)]
    pub tls_version: Option<String>,
    #[serde(default)]
    pub cipher: Option<String>,
}

/// Sends a message with Python's smtplib (tests/clients/smtp_send.py). `args` are the
/// script's options, e.g. `["--auth", "PLAIN", "--user", "floor3", "--password", "1234"]`.
pub fn smtplib_send(port: u16, args: &[&str], body: &Path) -> SendResult {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/smtp_send.py");
    let out = Command::new("python3")
        .arg(script)
        .args(["--port", &port.to_string(), "--body"])
        .arg(body)
        .args(args)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "smtp_send.py printed no result ({e}):\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A raw SMTP client for what real libraries will not do (bare LF, HELO-only devices).
pub struct RawClient {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl RawClient {
    pub fn connect(port: u16) -> RawClient {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut c = RawClient { reader, stream };
        let greeting = c.reply();
        assert!(greeting.starts_with("220"), "{greeting}");
        c
    }

    /// Connects from a chosen loopback source address (127.0.0.2 is a configured device).
    pub fn connect_from(source: &str, port: u16) -> RawClient {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        let src: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
        sock.bind(&src.into()).unwrap();
        let dst: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        sock.connect(&dst.into()).unwrap();
        let stream: TcpStream = sock.into();
        stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut c = RawClient { reader, stream };
        let greeting = c.reply();
        assert!(greeting.starts_with("220"), "{greeting}");
        c
    }

    /// Sends raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads one (possibly multi-line) reply; returns all its lines joined by '\n'.
    pub fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).unwrap() == 0 {
                return if all.is_empty() { "EOF".into() } else { all };
            }
            let done = line.as_bytes().get(3) != Some(&b'-');
            all.push_str(line.trim_end());
            if done {
                return all;
            }
            all.push('\n');
        }
    }

    /// Sends a line (with the given line ending) and reads the reply.
    pub fn cmd(&mut self, line: &str, ending: &str) -> String {
        self.send(format!("{line}{ending}").as_bytes());
        self.reply()
    }
}

/// Writes a file and returns its path.
pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// A relay between a fake provider and a fake upstream, with the usual test devices:
/// - `floor3`: AUTH user "floor3", PIN "1234", identity "scans";
/// - `lobby`: known by address 127.0.0.2 (no AUTH), identity "scans", from = "keep";
/// - `restricted`: AUTH user "restricted", PIN "1234", may only send to *@allowed.test.
pub struct World {
    pub idp: super::fake_oauth::FakeOAuth,
    pub upstream: super::fake_smtp::FakeSmtp,
    pub dir: tempfile::TempDir,
    pub relay: Relay,
    /// The relay's own certificate (relay.pem / relay-key.pem in the config directory),
    /// for listeners with `tls = "starttls"` or `"implicit"`.
    pub relay_cert: super::CertPair,
}

/// Listener keys that turn on STARTTLS with the test certificate.
pub const STARTTLS: &str = "tls = \"starttls\"\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\n";
/// Listener keys for implicit TLS with the test certificate.
pub const IMPLICIT_TLS: &str = "tls = \"implicit\"\ncert = \"relay.pem\"\nkey = \"relay-key.pem\"\n";

/// What a test's configuration may refer to.
pub struct Env<'a> {
    pub idp: &'a super::fake_oauth::FakeOAuth,
    pub dir: &'a Path,
    /// The standard [[provider]] section (named "fake").
    pub provider: &'a str,
    pub ca: &'a Path,
    pub smtp_port: u16,
}

pub const SCANS: &str = "scans@contoso.test";
pub const CLIENT_ID: &str = "relay-app";
pub const CLIENT_SECRET: &str = "app-secret-value";

/// An argon2 hash of "1234", made once per test binary.
pub fn pin_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| mfd_relay::credentials::hash("1234").unwrap())
}

/// The [[provider]] section for the fakes (app-only scope, client secret).
pub fn provider_section(idp: &super::fake_oauth::FakeOAuth, smtp_port: u16, tls: &str, ca: &Path) -> String {
    format!(
        "[[provider]]\nname = \"fake\"\nkind = \"generic\"\nclient_id = \"{CLIENT_ID}\"\nclient_secret = \"{CLIENT_SECRET}\"\n{}scopes = [\"https://outlook.office365.com/.default\"]\nsmtp = \"127.0.0.1:{smtp_port}\"\nsmtp_tls = \"{tls}\"\nca_file = \"{}\"\n",
        endpoints(idp),
        ca.display()
    )
}

/// The fake provider's endpoints as provider keys.
pub fn endpoints(idp: &super::fake_oauth::FakeOAuth) -> String {
    format!(
        "token_url = \"{}\"\ndevice_authorization_url = \"{}\"\nauthorization_url = \"{}\"\n",
        idp.token_url(),
        idp.devicecode_url(),
        idp.authorize_url()
    )
}

/// The standard identities and devices.
pub fn standard_sections() -> String {
    let h = pin_hash();
    format!(
        "[[identity]]\nname = \"scans\"\nprovider = \"fake\"\nemail = \"{SCANS}\"\nflow = \"client_credentials\"\n\n\
         [[device]]\nname = \"floor3\"\nidentity = \"scans\"\nusername = \"floor3\"\npin_hash = \"{h}\"\n\n\
         [[device]]\nname = \"lobby\"\nidentity = \"scans\"\naddresses = [\"127.0.0.2/32\"]\nfrom = \"keep\"\n\n\
         [[device]]\nname = \"restricted\"\nidentity = \"scans\"\nusername = \"restricted\"\npin_hash = \"{h}\"\nrecipients = [\"*@allowed.test\"]\n"
    )
}

impl World {
    /// Fakes plus a relay with the standard devices; `tweak` may change the setup.
    pub async fn start(tweak: impl FnOnce(&mut Setup)) -> World {
        Self::start_with(|w| format!("{}\n{}", w.provider, standard_sections()), tweak).await
    }

    /// Fakes plus a relay whose sections `sections` writes (given the fakes), then `tweak`.
    pub async fn start_with(sections: impl FnOnce(&Env<'_>) -> String, tweak: impl FnOnce(&mut Setup)) -> World {
        Self::start_upstream(|_| {}, sections, tweak).await
    }

    /// [`World::start_with`] with the fake upstream's options changed by `upstream` first
    /// (e.g. `pipelining = false`).
    pub async fn start_upstream(
        upstream: impl FnOnce(&mut super::fake_smtp::SmtpOptions),
        sections: impl FnOnce(&Env<'_>) -> String,
        tweak: impl FnOnce(&mut Setup),
    ) -> World {
        use super::fake_oauth::{ClientApp, FakeOAuth};
        use super::fake_smtp::{FakeSmtp, SmtpOptions, Tls};
        let idp = FakeOAuth::start().await;
        idp.register_client(ClientApp::public(CLIENT_ID).secret(CLIENT_SECRET).app_account(SCANS));
        let mut opts = SmtpOptions::new(Tls::StartTls, idp.token_validator());
        upstream(&mut opts);
        let upstream = FakeSmtp::start(opts).await;
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = upstream.cert().write_pem_files(dir.path(), "upstream");
        let relay_cert = super::CertPair::localhost();
        relay_cert.write_pem_files(dir.path(), "relay");
        let provider = provider_section(&idp, upstream.port(), "starttls", &ca);
        let env = Env { idp: &idp, dir: dir.path(), provider: &provider, ca: &ca, smtp_port: upstream.port() };
        let mut setup = Setup::new(sections(&env));
        tweak(&mut setup);
        let path = dir.path().to_path_buf();
        let relay = tokio::task::spawn_blocking(move || Relay::start(&path, &setup)).await.unwrap();
        World { idp, upstream, dir, relay, relay_cert }
    }

    /// Sends with smtplib from a blocking thread.
    pub async fn send(&self, args: &[&str], body: &[u8]) -> SendResult {
        let port = self.relay.smtp_port;
        let name = format!("body-{}.eml", rand_suffix());
        let path = write_file(self.dir.path(), &name, body);
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            smtplib_send(port, &a, &path)
        })
        .await
        .unwrap()
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// A simple message as a printer sends it.
pub fn scan_message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: \"Floor 3 Scanner\" <scanner@printer.local>\r\nTo: someone@contoso.test\r\nSubject: {subject}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

/// The message as received upstream, without the Received field the relay added on top.
pub fn without_trace(data: &[u8]) -> &[u8] {
    assert!(data.starts_with(b"Received: "), "no Received field on top");
    // The trace field is folded over three lines; it ends at the first line not starting with a tab.
    let mut i = 0;
    loop {
        let end = data[i..].windows(2).position(|w| w == b"\r\n").unwrap() + i + 2;
        if data.get(end) != Some(&b'\t') {
            return &data[end..];
        }
        i = end;
    }
}

/// A running `mfd-relay auth login` (or any CLI command whose output is read as it comes).
pub struct CliProc {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    pub output: Vec<String>,
}

impl CliProc {
    pub fn start(config: &Path, args: &[&str]) -> CliProc {
        let mut child = Command::new(binary())
            .args(args)
            .arg("-c")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out: Box<dyn Read + Send> = Box::new(child.stdout.take().unwrap());
        let err: Box<dyn Read + Send> = Box::new(child.stderr.take().unwrap());
        for stream in [out, err] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        CliProc { child, lines: rx, output: Vec::new() }
    }

    /// Waits for an output line that contains `needle`; returns it.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.output.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => {
                    panic!("no line with {needle:?} within {timeout:?}; output so far:\n{}", self.output.join("\n"))
                }
            }
        }
    }

    /// Waits for the process to exit; returns its exit code and all output.
    pub fn wait(mut self, timeout: Duration) -> (i32, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                while let Ok(l) = self.lines.try_recv() {
                    self.output.push(l);
                }
                return (status.code().unwrap_or(-1), self.output.join("\n"));
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("command did not finish within {timeout:?}; output:\n{}", self.output.join("\n"));
            }
            while let Ok(l) = self.lines.try_recv() {
                self.output.push(l);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for CliProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}
