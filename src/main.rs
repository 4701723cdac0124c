//! The `mfd-relay` command: the daemon and the admin's tools (README.md, "Commands").

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};

use mfd_relay::admin::ops::{self, AuthOps, Offline, QueueOps, Request};
use mfd_relay::config::{Config, ConfigError};

#[derive(Parser)]
#[command(
    name = "mfd-relay",
    version,
    about = "SMTP relay for printers and scanners: plain SMTP in, OAuth 2.0 (XOAUTH2) out to Office 365 and Gmail"
)]
struct Cli {
    /// The configuration file.
    #[arg(short, long, global = true, default_value = "config.toml", env = "MFD_RELAY_CONFIG")]
    config: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay.
    Run {
        /// Log lines as text or as JSON objects.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Validate the configuration; print every problem with file:line.
    Check {
        /// Also print each provider's resolved endpoints and each identity's scopes.
        #[arg(long, short = 'v', alias = "verbose")]
        explain: bool,
    },
    /// Read a PIN on standard input and print its argon2 hash for `pin_hash`.
    HashPin,
    /// Make a self-signed certificate and key for a listener (relay.pem, relay-key.pem).
    MakeCert {
        /// Host names (and IP addresses) the certificate is for.
        #[arg(long = "name", default_values = ["mfd-relay.example.lan", "localhost", "127.0.0.1"])]
        names: Vec<String>,
        /// Where to write the files.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// RSA 2048 works with every device, old printers included; ECDSA P-256 only with modern ones.
        #[arg(long, value_enum, default_value = "rsa")]
        key_type: mfd_relay::certs::KeyType,
    },
    /// Sign-in of identities.
    Auth {
        #[command(subcommand)]
        command: AuthCmd,
    },
    /// Re-read the configuration file in the running relay (like SIGHUP).
    Reload,
    /// The delivery queue.
    Queue {
        #[command(subcommand)]
        command: QueueCmd,
    },
    /// Mobile-print mailboxes.
    Mailbox {
        #[command(subcommand)]
        command: MailboxCmd,
    },
    /// Send one test message exactly as a device would, printing each step and the provider's
    /// replies (through the running relay, else on its own).
    Test {
        /// The [[device]] to send as.
        #[arg(long)]
        device: String,
        /// The recipient.
        #[arg(long)]
        to: String,
        /// Attach this many random bytes as a PDF (e.g. 2MB, 512KiB).
        #[arg(long, value_parser = parse_size_arg)]
        size: Option<u64>,
    },
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    mfd_relay::config::parse_size(s)
}

#[derive(Subcommand)]
enum MailboxCmd {
    /// Start a mailbox's folder from now: mail already in it is never printed (relay stopped).
    Reset {
        /// The [[mailbox]] name.
        name: String,
        /// Record the folder's current UIDNEXT; only mail arriving later is printed.
        #[arg(long)]
        from_now: bool,
    },
}

#[derive(Subcommand)]
enum AuthCmd {
    /// Sign an identity in: device code, browser (PKCE), or a first token for app-only.
    Login { identity: String },
    /// Each identity: state, account, access token expiry, last refresh, last error.
    Status,
    /// Forget an identity's stored tokens.
    Logout { identity: String },
    /// Store a refresh token obtained elsewhere (read from a file, or "-" for stdin).
    Import {
        identity: String,
        #[arg(long = "refresh-token-file")]
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum QueueCmd {
    /// Queued messages, oldest first, one page at a time.
    List {
        /// Start after this queue id (the last one of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Messages per page (default 100, at most 1000).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Try a message (or `all`) again now.
    Retry { id: String },
    /// Remove a message without delivering it.
    Drop { id: String },
}

fn main() -> ExitCode {
    // Everything the relay writes (database, spool, print jobs, tokens) is for its own user
    // only, whatever umask the shell or service manager gave it. Certificates written by
    // `make-cert` are made readable where needed by the admin.
    // SAFETY: umask only changes this process's file-creation mask; called before any thread.
    unsafe {
        libc::umask(0o077);
    }
    // Each argon2 PIN check allocates 19 MiB. glibc raises its mmap threshold after such a block
    // is freed, so later ones come from the heap and stay there: 64 printers logging in once
    // left the relay at 270 MiB (BENCHMARKS.md). A fixed 4 MiB threshold gives them back, and
    // keeps the smaller DATA buffers on the heap.
    // SAFETY: mallopt only tunes this process's allocator; called before any thread.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mfd-relay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Check { explain } => check(&cli.config, explain),
        Cmd::HashPin => hash_pin(),
        Cmd::MakeCert { names, dir, key_type } => make_cert(&names, &dir, key_type),
        Cmd::Run { log_format } => {
            let config = load(&cli.config)?;
            init_logs(log_format);
            for advice in config.advice() {
                tracing::warn!("{advice}");
            }
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(run(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Reload => {
            // Check the file here first: the daemon would refuse it for the same reasons.
            let config = match Config::load(&cli.config) {
                Ok(c) => c,
                Err(ConfigError::Invalid(problems)) => {
                    for p in &problems {
                        println!("{p}");
                    }
                    println!("reload refused; the relay keeps running with its previous configuration");
                    return Ok(ExitCode::FAILURE);
                }
                Err(e) => return Err(e.into()),
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(reload(&config))
        }
        Cmd::Queue { command } => {
            let config = load(&cli.config)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(queue(&config, command))
        }
        Cmd::Mailbox { command: MailboxCmd::Reset { name, from_now } } => {
            if !from_now {
                bail!("say what to reset: --from-now (print only mail that arrives from now on)");
            }
            let config = load(&cli.config)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(mailbox_reset(config, &name))
        }
        Cmd::Test { device, to, size } => {
            let config = load(&cli.config)?;
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            rt.block_on(test_send(config, mfd_relay::testsend::TestSend { device, to, size }))
        }
        Cmd::Auth { command } => {
            let config = load(&cli.config)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let result = rt.block_on(auth(&config, command));
            // A reader of pasted URLs may still wait on stdin; do not wait for it.
            rt.shutdown_timeout(std::time::Duration::from_millis(100));
            result
        }
    }
}

/// Loads and validates; on problems, lists them all.
fn load(path: &Path) -> anyhow::Result<Config> {
    match Config::load(path) {
        Ok(c) => Ok(c),
        Err(ConfigError::Invalid(problems)) => {
            for p in &problems {
                eprintln!("{p}");
            }
            bail!("{}: {} problem(s); nothing was started", path.display(), problems.len())
        }
        Err(e) => Err(e.into()),
    }
}

fn check(path: &Path, explain: bool) -> anyhow::Result<ExitCode> {
    match Config::load(path) {
        Ok(c) => {
            println!(
                "{}: ok ({} listener(s), {} provider(s), {} identit(ies), {} device(s), {} mailbox(es))",
                path.display(),
                c.listeners.len(),
                c.providers.len(),
                c.identities.len(),
                c.devices.len(),
                c.mailboxes.len()
            );
            for advice in c.advice() {
                println!("warning: {advice}");
            }
            match signed_in_identities(&c) {
                SignIns::NotNeeded => {}
                SignIns::Known(names) => {
                    for advice in c.sign_in_advice(&names) {
                        println!("warning: {advice}");
                    }
                }
                SignIns::Unknown(why) => {
                    println!("note: whether devices' identities have signed in was not checked: {why}")
                }
            }
            if explain {
                for line in mfd_relay::oauth::provider::explain_config(&c) {
                    println!("{line}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(ConfigError::Invalid(problems)) => {
            for p in &problems {
                println!("{p}");
            }
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            println!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// What `check` knows about sign-ins from the data directory.
enum SignIns {
    /// No device uses an identity that needs a person's sign-in.
    NotNeeded,
    /// The identities that have stored tokens.
    Known(std::collections::HashSet<String>),
    /// The token store could not be read (why).
    Unknown(String),
}

/// Which identities have stored tokens, from the data directory, creating nothing: a data
/// directory without a database means no sign-in yet. The database is opened only when the
/// daemon does not hold it (sled has no read-only mode, and the data directory's lock keeps
/// a second process out), so with the daemon running the answer is unknown.
fn signed_in_identities(config: &Config) -> SignIns {
    use mfd_relay::config::Flow;
    use mfd_relay::store::{Store, StoreError, Tree};
    let delegated = config.devices.iter().any(|d| {
        config
            .identity(d.get_ref().identity.get_ref())
            .is_some_and(|i| matches!(i.flow.get_ref(), Flow::DeviceCode | Flow::AuthCode))
    });
    if !delegated {
        return SignIns::NotNeeded;
    }
    let data_dir = config.data_dir();
    match std::fs::metadata(data_dir.join("db")) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return SignIns::Unknown(format!("{} is not a database", data_dir.join("db").display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return SignIns::Known(Default::default()),
        // Another user's data directory (0700): say so rather than guess.
        Err(e) => return SignIns::Unknown(format!("{}: {e}", data_dir.display())),
    }
    let store = match Store::open(&data_dir, Vec::new()) {
        Ok(s) => s,
        Err(StoreError::Locked { .. }) => {
            return SignIns::Unknown(
                "the relay is running and holds its database (or another mfd-relay command does); \
                 `mfd-relay auth status` shows each identity"
                    .into(),
            )
        }
        Err(e) => return SignIns::Unknown(e.to_string()),
    };
    match store.scan(Tree::Tokens, b"") {
        Ok(records) => {
            SignIns::Known(records.into_iter().map(|(k, _)| String::from_utf8_lossy(&k).into_owned()).collect())
        }
        Err(e) => SignIns::Unknown(e.to_string()),
    }
}

fn hash_pin() -> anyhow::Result<ExitCode> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        eprint!("PIN: ");
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let pin = line.trim_end_matches(['\r', '\n']);
    if pin.is_empty() {
        bail!("no PIN given on standard input");
    }
    let hash = mfd_relay::credentials::hash(pin).map_err(|e| anyhow!(e))?;
    println!("{hash}");
    Ok(ExitCode::SUCCESS)
}

fn make_cert(names: &[String], dir: &Path, key_type: mfd_relay::certs::KeyType) -> anyhow::Result<ExitCode> {
    let cert_path = dir.join("relay.pem");
    let key_path = dir.join("relay-key.pem");
    for p in [&cert_path, &key_path] {
        if p.exists() {
            bail!("{} exists; not overwriting it", p.display());
        }
    }
    let (cert, key) = mfd_relay::certs::self_signed(names, key_type)?;
    std::fs::create_dir_all(dir)?;
    std::fs::write(&cert_path, cert)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    std::io::Write::write_all(&mut opts.open(&key_path)?, key.as_bytes())?;
    let kind = match key_type {
        mfd_relay::certs::KeyType::Rsa => "RSA 2048",
        mfd_relay::certs::KeyType::Ecdsa => "ECDSA P-256",
    };
    println!(
        "wrote {} and {} (self-signed, {kind}, for {})",
        cert_path.display(),
        key_path.display(),
        names.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MFD_RELAY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
        // async-imap traces every line it writes, the XOAUTH2 response (a bearer token)
        // included: never, whatever MFD_RELAY_LOG says (ARCHITECTURE.md, "Secrets never leave in clear").
        .add_directive("async_imap::imap_stream=off".parse().expect("a valid directive"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down: finishing sessions in flight");
        let _ = tx.send(true);
    });
    mfd_relay::relay::run(config, rx).await?;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// How long the CLI waits for an answer of the daemon.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A client of the running daemon's admin listener.
fn client(config: &Config) -> anyhow::Result<ops::Client> {
    Ok(ops::Client::new(config, ADMIN_TIMEOUT)?)
}

/// A queue operation: through the running daemon, else on the data directory directly.
async fn queue_op<R: Request<Ops = QueueOps>>(config: &Config, req: R) -> anyhow::Result<R::Answer> {
    if let Some(answer) = client(config)?.send(&req, false).await? {
        return Ok(answer);
    }
    // The daemon is not running: open the database directly.
    let (ops, _store) = QueueOps::offline(config).await?;
    Ok(req.run(&ops).await?)
}

/// A sign-in operation: through the running daemon, else on the data directory directly.
async fn auth_op<R: Request<Ops = AuthOps>>(config: &Config, req: R) -> anyhow::Result<R::Answer> {
    if let Some(answer) = client(config)?.send(&req, false).await? {
        return Ok(answer);
    }
    let offline = Offline::open(config.clone()).await?;
    Ok(req.run(&offline.auth_ops()).await?)
}

async fn queue(config: &Config, cmd: QueueCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        QueueCmd::List { after, limit } => print_queue(&queue_op(config, ops::QueueList { after, limit }).await?),
        QueueCmd::Retry { id } => {
            let answer = queue_op(config, ops::QueueRetry { which: id }).await?;
            println!("{} message(s) will be retried now", answer.retried)
        }
        QueueCmd::Drop { id } => println!("dropped {}", queue_op(config, ops::QueueDrop { id }).await?.dropped),
    }
    Ok(ExitCode::SUCCESS)
}

fn print_queue(page: &ops::QueuePage) {
    let records = &page.messages;
    if records.is_empty() {
        if page.total == 0 {
            println!("queue is empty");
        } else {
            println!("no queued message on this page ({} queued in all)", page.total);
        }
        return;
    }
    let now = chrono::Utc::now();
    println!(
        "{:<16}  {:>9}  {:>8}  {:<14}  {:<14}  {:>3}  {:>9}  recipients / last error",
        "id", "size", "age", "device", "identity", "try", "next in"
    );
    for r in records {
        let age = (now.timestamp() - r.received).max(0);
        let next = ((r.next_attempt - now.timestamp_millis()) / 1000).max(0);
        println!(
            "{:<16}  {:>9}  {:>8}  {:<14}  {:<14}  {:>3}  {:>9}  {}",
            r.id,
            r.size,
            human_secs(age),
            r.device,
            r.identity,
            r.attempts,
            human_secs(next),
            match &r.destination {
                // A folder job: its one recipient stands for the destination.
                Some(d) => format!("{} (folder \"{d}\")", r.rcpts.join(", ")),
                None => r.rcpts.join(", "),
            }
        );
        if let Some(e) = &r.last_error {
            println!("{:>16}  last error: {e}", "");
        }
    }
    match &page.next_after {
        Some(next) => println!(
            "{} shown of {} queued; next page: mfd-relay queue list --after {next}{}",
            records.len(),
            page.total,
            if page.limit == ops::DEFAULT_PAGE { String::new() } else { format!(" --limit {}", page.limit) }
        ),
        None => println!("{} shown of {} queued", records.len(), page.total),
    }
}

fn human_secs(s: i64) -> String {
    match s {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// `mailbox reset --from-now`: works on the database directly, so the daemon must be stopped
/// (it holds the database's lock, and its poller would race the reset).
async fn mailbox_reset(config: Config, name: &str) -> anyhow::Result<ExitCode> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let offline = match Offline::open(config).await {
        Ok(o) => o,
        Err(e) => bail!("{e}\nstop the relay first (e.g. `systemctl stop mfd-relay`), run this again, then start it"),
    };
    let deps = mfd_relay::imap::Deps {
        store: offline.shared.store.clone(),
        queue: offline.shared.queue.clone(),
        activity: offline.shared.activity.clone(),
        current: offline.current.clone(),
    };
    let (uidvalidity, uidnext) = mfd_relay::imap::reset_from_now(deps, name).await.map_err(|e| anyhow!(e))?;
    offline.shared.store.flush()?;
    println!(
        "mailbox \"{name}\": only mail from now on is printed (UIDVALIDITY {uidvalidity}, first UID {uidnext}); mail already in the folder stays there"
    );
    Ok(ExitCode::SUCCESS)
}

async fn auth(config: &Config, cmd: AuthCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        AuthCmd::Login { identity } => login(config, &identity).await,
        AuthCmd::Logout { identity } => {
            auth_op(config, ops::AuthLogout { identity: identity.clone() }).await?;
            println!("identity \"{identity}\": stored tokens removed");
            Ok(ExitCode::SUCCESS)
        }
        AuthCmd::Import { identity, file } => {
            let token = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin().lock().read_line(&mut s)?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| file.display().to_string())?
            };
            let token = token.trim().to_string();
            if token.is_empty() {
                bail!("no refresh token given");
            }
            let req = ops::AuthImport { identity: identity.clone(), refresh_token: token };
            let account = auth_op(config, req).await?.account;
            println!("identity \"{identity}\": refresh token works; signed in as {account}");
            Ok(ExitCode::SUCCESS)
        }
        AuthCmd::Status => {
            let list = auth_op(config, ops::AuthStatus).await?;
            let now = chrono::Utc::now().timestamp();
            println!(
                "{:<14}  {:<12}  {:<28}  {:<11}  {:>10}  {:>12}  last error",
                "identity", "provider", "account", "state", "expires in", "refreshed"
            );
            for s in list {
                println!(
                    "{:<14}  {:<12}  {:<28}  {:<11}  {:>10}  {:>12}  {}",
                    s.name,
                    s.provider,
                    s.account,
                    s.state,
                    s.expires_at.map(|e| human_secs(e - now)).unwrap_or_else(|| "-".into()),
                    s.last_refresh.map(|t| format!("{} ago", human_secs(now - t))).unwrap_or_else(|| "never".into()),
                    s.last_error.unwrap_or_default()
                );
                // An identity with tokens for several resources (Graph and the mail servers),
                // or whose one token is Graph's: each token on its own line.
                if s.tokens.len() > 1 || s.tokens.iter().any(|t| t.resource != "mail") {
                    for t in &s.tokens {
                        let expiry = match t.expires_at {
                            Some(e) if e > now => format!("expires in {}", human_secs(e - now)),
                            Some(e) => format!("expired {} ago", human_secs(now - e)),
                            None => "none yet".into(),
                        };
                        println!("{:<14}  {} token: {expiry}", "", t.resource);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `auth login`: through the running daemon, or on its own when the daemon is stopped.
async fn login(config: &Config, identity: &str) -> anyhow::Result<ExitCode> {
    use mfd_relay::oauth::login::{LoginStart, LoginStatus};
    let client = client(config)?;
    let begin = ops::AuthLogin { identity: identity.to_string() };
    let online = client.send(&begin, false).await?;
    // Offline: this process plays the daemon's part (store, token manager, callback listener).
    let (start, offline): (LoginStart, Option<Offline>) = match online {
        Some(start) => (start, None),
        None => {
            let offline = Offline::open(config.clone()).await?;
            (begin.run(&offline.auth_ops()).await?, Some(offline))
        }
    };
    let email = config.identity(identity).map(|i| i.email.get_ref().clone()).unwrap_or_default();
    let mut server = None;
    match &start {
        LoginStart::Done { account } => {
            println!("identity \"{identity}\": app-only sign-in works; token issued for {account}");
            return Ok(ExitCode::SUCCESS);
        }
        LoginStart::DeviceCode { verification_uri, user_code, expires_in } => {
            println!("To sign in identity \"{identity}\" ({email}), on any computer or phone:");
            println!("  open   {verification_uri}");
            println!("  enter  {user_code}");
            println!("and sign in as {email}. The code is valid for {} minutes. Waiting...", expires_in / 60);
        }
        LoginStart::AuthCode { url, redirect_uri } => {
            // Offline, this process takes the browser's return: listen before the address is
            // shown, or a quick browser finds nobody there.
            if let Some(offline) = &offline {
                let addr: std::net::SocketAddr = *config.admin.listen.get_ref();
                let tcp = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("listen on {addr} for the browser's return"))?;
                let (tx, rx) = tokio::sync::watch::channel(false);
                server = Some((tokio::spawn(offline.admin().serve(tcp, rx)), tx));
            }
            println!(
                "To sign in identity \"{identity}\" ({email}), open this address in a browser and sign in as {email}:"
            );
            println!();
            println!("{url}");
            println!();
            println!("The browser then returns to {redirect_uri}. If that page does not load (the browser");
            println!("runs on another computer), copy the address it ended on and paste it here:");
            spawn_paste_reader(config.clone(), identity.to_string(), offline.as_ref().map(Offline::auth_ops));
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20 * 60);
    let standing = ops::AuthLoginStatus { identity: identity.to_string() };
    let outcome = loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let status: LoginStatus = match &offline {
            Some(offline) => standing.run(&offline.auth_ops()).await?,
            None => match client.send(&standing, false).await? {
                Some(status) => status,
                None => bail!("the daemon stopped during the sign-in"),
            },
        };
        match status {
            LoginStatus::Pending | LoginStatus::None if std::time::Instant::now() < deadline => continue,
            LoginStatus::Pending | LoginStatus::None => break Err(anyhow!("gave up waiting for the sign-in")),
            LoginStatus::Done { account } => break Ok(account),
            LoginStatus::Failed { error } => break Err(anyhow!(error)),
        }
    };
    if let Some((task, tx)) = server {
        let _ = tx.send(true);
        let _ = task.await;
    }
    match outcome {
        Ok(account) => {
            println!("Signed in as {account}. Tokens are stored encrypted; the relay refreshes them from now on.");
            if !account.eq_ignore_ascii_case(&email) {
                println!(
                    "{account} is not {email}: fine when {email} is a shared mailbox that {account} may Send As \
                     (the relay logs in as {account} and sends from {email}); otherwise sign in again as {email}."
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("Sign-in of \"{identity}\" failed: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Reads a pasted redirect URL from stdin and completes the sign-in with it: in this process
/// (`offline`), else through the daemon.
fn spawn_paste_reader(config: Config, identity: String, offline: Option<AuthOps>) {
    tokio::spawn(async move {
        let line = tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            std::io::stdin().lock().read_line(&mut s).map(|_| s)
        })
        .await;
        let Ok(Ok(line)) = line else { return };
        let url = line.trim().to_string();
        if url.is_empty() {
            return;
        }
        let req = ops::AuthLoginUrl { identity, url };
        let result = match offline {
            Some(ops) => req.run(&ops).await.map(|_| ()).map_err(|e| anyhow!(e)),
            None => match client(&config) {
                Ok(c) => c.send(&req, false).await.map(|_| ()).map_err(|e| anyhow!(e)),
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            eprintln!("{e}");
        }
    });
}

/// `reload`: asks the running daemon to re-read its configuration file.
async fn reload(config: &Config) -> anyhow::Result<ExitCode> {
    let client = ops::Client::new(config, std::time::Duration::from_secs(120))?;
    let report = match client.send(&ops::Reload, true).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            bail!("the relay is not running (nothing answers on {}/api/reload); nothing to reload", client.base())
        }
        Err(ops::ClientError::Refused { status, text }) => bail!("{status} {text}"),
        Err(e) => return Err(e.into()),
    };
    for p in &report.problems {
        println!("{p}");
    }
    for n in &report.needs_restart {
        println!("note: {n} changed; that takes effect at the next restart");
    }
    if report.ok {
        println!("configuration reloaded");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("reload refused; the relay keeps running with its previous configuration");
        Ok(ExitCode::FAILURE)
    }
}

/// How long `mfd-relay test` waits for the running relay's whole answer (a large test
/// message over a slow line takes a while).
const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(900);

/// `mfd-relay test`: through the running daemon (its token state, its pools' limits), else
/// with the configuration and data directory opened here. Exit 0 when the provider accepted
/// the message, 1 otherwise.
async fn test_send(config: Config, req: mfd_relay::testsend::TestSend) -> anyhow::Result<ExitCode> {
    use mfd_relay::testsend::Event;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut result = None;
    let client = ops::Client::new(&config, TEST_TIMEOUT)?;
    let through_daemon = client
        .test_send(&req, |event| match event {
            Event::Step(step) => print_step(&step),
            Event::Result(r) => result = Some(r),
        })
        .await;
    let result = match through_daemon {
        Ok(Some(())) => result.ok_or_else(|| anyhow!("the relay's answer ended before the result"))?,
        Err(ops::ClientError::Refused { text, .. }) => bail!("{text}"),
        Err(e) => return Err(e.into()),
        Ok(None) => {
            println!("(the relay is not running: testing with {} on its own)", config.data_dir().display());
            let offline = Offline::open(config).await?;
            let generation = offline.current.borrow().clone();
            let observer = std::sync::Arc::new(Printer);
            req.run(&ops::TestOps { generation, observer }).await?
        }
    };
    if result.delivered {
        println!("delivered: {}", result.reply);
        return Ok(ExitCode::SUCCESS);
    }
    println!("FAILED: {}", result.reply);
    if let Some(hint) = &result.hint {
        println!("hint: {hint}");
    }
    Ok(ExitCode::FAILURE)
}

/// Prints each step of an offline test as it finishes.
struct Printer;

impl mfd_relay::upstream::Observer for Printer {
    fn step(&self, step: mfd_relay::upstream::Step) {
        print_step(&step);
    }
}

fn print_step(step: &mfd_relay::upstream::Step) {
    use std::io::Write;
    println!("{:<7} {:<4} {:>6} ms  {}", step.name, if step.ok { "ok" } else { "FAIL" }, step.ms, step.detail);
    let _ = std::io::stdout().flush();
}
