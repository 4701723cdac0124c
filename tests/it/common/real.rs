//! Real Dovecot (IMAP, LMTP, SASL) and Postfix (submission) on loopback, from Debian's
//! packages, driven through `tests/interop/realservers.py` (see tests/interop/README.md).
//!
//! Dovecot's `passdb oauth2` checks every bearer token against the test's fake provider
//! ([`FakeOAuth::introspect_url`](super::fake_oauth::FakeOAuth::introspect_url)), so the
//! XOAUTH2 logins in these tests are real ones. Each [`RealServers`] lives in its own
//! temporary directory and is stopped (every process of it) when dropped.
//!
//! Interop tests must not pass silently without the servers: when the harness cannot run
//! (not root, packages missing) [`RealServers::start`] panics with what to do, unless
//! `MFD_RELAY_SKIP_INTEROP=1` is set, in which case it returns `None` and the test returns
//! early, saying so on stderr.
//!
//! Also here: [`ImapUser`], an independent IMAP client (async-imap, XOAUTH2 on the plain
//! port) for putting mail into a mailbox (APPEND) and looking at what is left, and
//! [`spawn_relay_until_exit`], which runs the relay with extra environment variables.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt as _;
use tokio::net::TcpStream;

/// Set to `1` to skip interop tests on a machine without root or without Dovecot/Postfix.
pub const SKIP_ENV: &str = "MFD_RELAY_SKIP_INTEROP";
/// The test domain Postfix accepts mail for.
pub const DOMAIN: &str = "example.test";

/// What `realservers.py start` reports (one JSON line).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Info {
    pub imap_port: u16,
    pub imaps_port: Option<u16>,
    pub smtp_port: u16,
    pub ca_cert: Option<PathBuf>,
    pub maildir_root: PathBuf,
    pub dovecot_conf: PathBuf,
    pub postfix_log: PathBuf,
}

/// A running Dovecot + Postfix pair.
pub struct RealServers {
    pub dir: tempfile::TempDir,
    pub info: Info,
    running: bool,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/realservers.py")
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}

fn have(program: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"].iter().any(|d| Path::new(d).join(program).exists())
}

/// Why the harness cannot run here, if it cannot.
fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("the interop harness must run as root (it starts Dovecot and Postfix)".into());
    }
    let missing: Vec<&str> = ["dovecot", "doveadm", "postfix", "python3"].into_iter().filter(|p| !have(p)).collect();
    if !missing.is_empty() {
        return Some(format!("missing {} (run tests/interop/install.sh as root)", missing.join(", ")));
    }
    None
}

/// `true` when the test should return early (skipping is allowed and the harness cannot
/// run); panics when the harness cannot run and skipping is not allowed.
pub fn skip_unless_available(test: &str) -> bool {
    let Some(why) = unavailable() else { return false };
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        eprintln!("SKIPPED {test}: {why} ({SKIP_ENV}=1)");
        return true;
    }
    panic!("{test} needs real Dovecot and Postfix: {why}. Set {SKIP_ENV}=1 to skip interop tests.");
}

impl RealServers {
    /// Starts both servers, validating tokens at `introspect_url`. `None` when skipped (see
    /// the module docs). Blocks for about a second: call it from a blocking context.
    pub fn start(test: &str, introspect_url: &str) -> Option<RealServers> {
        if skip_unless_available(test) {
            return None;
        }
        let dir = tempfile::Builder::new().prefix("mfd-imap-").tempdir_in("/tmp").expect("temp dir");
        let out = Command::new("python3")
            .arg(script())
            .args(["start", "--dir"])
            .arg(dir.path())
            .args(["--introspect-url", introspect_url, "--domain", DOMAIN, "--tls"])
            .stdin(Stdio::null())
            .output()
            .expect("run realservers.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let why = format!(
                "realservers.py start failed ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
                eprintln!("SKIPPED {test}: {why} ({SKIP_ENV}=1)");
                return None;
            }
            panic!("{why}\nSet {SKIP_ENV}=1 to skip interop tests.");
        }
        let info: Info = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("realservers.py printed no state ({e}): {stdout}"));
        Some(RealServers { dir, info, running: true })
    }

    /// Runs `doveadm -c <this instance's config> <args>`; panics unless it succeeds.
    pub fn doveadm(&self, args: &[&str]) -> String {
        let out = Command::new("doveadm")
            .arg("-c")
            .arg(&self.info.dovecot_conf)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run doveadm");
        assert!(
            out.status.success(),
            "doveadm {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The Maildir of `user` (Dovecot's `%Lu`).
    pub fn maildir(&self, user: &str) -> PathBuf {
        self.info.maildir_root.join(user.to_lowercase())
    }

    /// The messages in `user`'s INBOX, as files.
    pub fn inbox_files(&self, user: &str) -> Vec<Vec<u8>> {
        let root = self.maildir(user);
        let mut out = Vec::new();
        for sub in ["new", "cur"] {
            if let Ok(entries) = std::fs::read_dir(root.join(sub)) {
                for e in entries.flatten() {
                    if let Ok(data) = std::fs::read(e.path()) {
                        out.push(data);
                    }
                }
            }
        }
        out
    }

    /// Makes Dovecot forget the UIDs of `user`'s INBOX: with its index and UID list gone it
    /// renumbers the messages under a new UIDVALIDITY (what a restored or migrated mailbox
    /// looks like to a client). Nobody may have the mailbox open.
    pub fn forget_uids(&self, user: &str) {
        let root = self.maildir(user);
        for entry in std::fs::read_dir(&root).expect("maildir").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "dovecot-uidlist" || name.starts_with("dovecot.index") {
                std::fs::remove_file(entry.path()).expect("remove Dovecot index file");
            }
        }
    }

    /// Makes Dovecot announce only `capabilities` after login (`imap_capability`), e.g.
    /// without IDLE, MOVE and UIDPLUS, like a minimal IMAP4rev1 server; applies to new
    /// connections.
    pub fn restrict_capabilities(&self, capabilities: &str) {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new().append(true).open(&self.info.dovecot_conf).expect("dovecot.conf");
        write!(f, "\nprotocol imap {{\n  imap_capability = {capabilities}\n}}\n").expect("write dovecot.conf");
        drop(f);
        self.doveadm(&["reload"]);
    }

    /// Stops both servers; every process of the instance is gone afterwards.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let out = Command::new("python3")
            .arg(script())
            .args(["stop", "--dir"])
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run realservers.py stop");
        if !out.status.success() && !std::thread::panicking() {
            panic!(
                "realservers.py stop left processes behind: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for RealServers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts the relay binary on `config` with extra environment variables (they override
/// the default `MFD_RELAY_LOG`), appending its output to `log`. The caller waits or kills.
pub fn spawn_relay(config: &Path, log: &Path, env: &[(&str, &str)]) -> std::process::Child {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("relay log");
    Command::new(super::relay::binary())
        .args(["run", "-c"])
        .arg(config)
        .env("MFD_RELAY_LOG", "info,mfd_relay=debug")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("start mfd-relay")
}

/// Runs the relay binary on `config` with extra environment variables until it exits by
/// itself (at most `timeout`), appending its output to `log`.
pub fn spawn_relay_until_exit(config: &Path, log: &Path, env: &[(&str, &str)], timeout: Duration) -> ExitStatus {
    let mut child = spawn_relay(config, log, env);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for mfd-relay") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mfd-relay did not exit within {timeout:?}:\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// XOAUTH2 for the test's own IMAP client.
struct Bearer(String);

impl async_imap::Authenticator for &Bearer {
    type Response = String;
    fn process(&mut self, _challenge: &[u8]) -> String {
        self.0.clone()
    }
}

/// Bounds every command of the test client.
const IMAP_TIMEOUT: Duration = Duration::from_secs(20);

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = async_imap::error::Result<T>>) -> T {
    match tokio::time::timeout(IMAP_TIMEOUT, f).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("IMAP {what}: {e}"),
        Err(_) => panic!("IMAP {what}: no answer within {IMAP_TIMEOUT:?}"),
    }
}

/// A mail user's own IMAP session (plain port, XOAUTH2), independent of the relay.
pub struct ImapUser {
    session: async_imap::Session<TcpStream>,
}

impl ImapUser {
    pub async fn login(port: u16, user: &str, token: &str) -> ImapUser {
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("connect to Dovecot");
        let mut client = async_imap::Client::new(tcp);
        let greeting = tokio::time::timeout(IMAP_TIMEOUT, client.read_response()).await;
        assert!(matches!(greeting, Ok(Ok(Some(_)))), "no IMAP greeting");
        let auth = Bearer(format!("user={user}\x01auth=Bearer {token}\x01\x01"));
        let session = match tokio::time::timeout(IMAP_TIMEOUT, client.authenticate("XOAUTH2", &auth)).await {
            Ok(Ok(s)) => s,
            Ok(Err((e, _))) => panic!("IMAP login of {user}: {e}"),
            Err(_) => panic!("IMAP login of {user}: no answer"),
        };
        ImapUser { session }
    }

    /// APPENDs a message (RFC 3501 6.3.11), creating the folder if needed.
    pub async fn append(&mut self, folder: &str, raw: &[u8]) {
        if folder != "INBOX" {
            let _ = tokio::time::timeout(IMAP_TIMEOUT, self.session.create(folder)).await;
        }
        bounded("APPEND", self.session.append(folder, None, None, raw)).await;
    }

    /// UIDVALIDITY and UIDs of `folder` (read-only EXAMINE).
    pub async fn uids(&mut self, folder: &str) -> (u32, Vec<u32>) {
        let mb = bounded("EXAMINE", self.session.examine(folder)).await;
        let mut uids: Vec<u32> = bounded("UID SEARCH", self.session.uid_search("ALL")).await.into_iter().collect();
        uids.sort_unstable();
        (mb.uid_validity.unwrap_or(0), uids)
    }

    /// Flags of every message of `folder`, by UID.
    pub async fn flags(&mut self, folder: &str) -> Vec<(u32, Vec<String>)> {
        bounded("EXAMINE", self.session.examine(folder)).await;
        let fetches: Vec<_> = bounded("UID FETCH", async {
            let s = self.session.uid_fetch("1:*", "(UID FLAGS)").await?;
            s.try_collect::<Vec<_>>().await
        })
        .await;
        let mut out: Vec<(u32, Vec<String>)> =
            fetches.iter().filter_map(|f| Some((f.uid?, f.flags().map(|fl| format!("{fl:?}")).collect()))).collect();
        out.sort();
        out
    }

    /// Subjects of every message of `folder`, by UID.
    pub async fn subjects(&mut self, folder: &str) -> Vec<(u32, String)> {
        bounded("EXAMINE", self.session.examine(folder)).await;
        let fetches: Vec<_> = bounded("UID FETCH", async {
            let s = self.session.uid_fetch("1:*", "(UID BODY.PEEK[HEADER])").await?;
            s.try_collect::<Vec<_>>().await
        })
        .await;
        let mut out: Vec<(u32, String)> = fetches
            .iter()
            .filter_map(|f| {
                let head = mail_parser::MessageParser::default().parse_headers(f.header()?)?;
                Some((f.uid?, head.subject().unwrap_or_default().to_string()))
            })
            .collect();
        out.sort();
        out
    }

    /// Deletes the message `uid` of `folder` for good.
    pub async fn delete(&mut self, folder: &str, uid: u32) {
        bounded("SELECT", self.session.select(folder)).await;
        bounded(
            "UID STORE",
            self.session.run_command_and_check_ok(&format!("UID STORE {uid} +FLAGS.SILENT (\\Deleted)")),
        )
        .await;
        bounded("EXPUNGE", self.session.run_command_and_check_ok("EXPUNGE")).await;
    }

    pub async fn logout(mut self) {
        let _ = tokio::time::timeout(IMAP_TIMEOUT, self.session.logout()).await;
    }
}
