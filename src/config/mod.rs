//! The configuration file: its TOML schema, defaults, and validation.
//!
//! The admin's interface (README.md and config.example.toml) is this file. Parsing happens in two steps: serde
//! turns the text into the structs below (syntax and type errors come back with their line),
//! then [`Config::problems`] checks what serde cannot: names that refer to each other, CIDRs,
//! files that must exist, flows a provider cannot do. Every problem names `file:line`, and
//! all of them are reported at once so the admin fixes the file in one pass.
//!
//! Relative paths are resolved against the directory of the configuration file, so the relay
//! behaves the same whatever directory it was started from.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// A configuration problem, located in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub relay: Relay,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Spanned<Listener>>,
    #[serde(default, rename = "provider")]
    pub providers: Vec<Spanned<Provider>>,
    #[serde(default, rename = "identity")]
    pub identities: Vec<Spanned<Identity>>,
    #[serde(default, rename = "device")]
    pub devices: Vec<Spanned<Device>>,
    #[serde(default, rename = "mailbox")]
    pub mailboxes: Vec<Spanned<Mailbox>>,
    /// Where the file was read from (paths in it are relative to its directory).
    #[serde(skip)]
    pub path: PathBuf,
    #[serde(skip)]
    text: String,
}

/// `[relay]`: the daemon as a whole.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Relay {
    /// Our name in the greeting, in EHLO replies and in Received headers.
    pub hostname: String,
    /// The sled database, the spool and (by default) the token key live here.
    pub data_dir: PathBuf,
    /// The key that encrypts stored tokens; created (mode 0600) on first run.
    /// `MFD_RELAY_KEY` (64 hex digits) overrides it.
    pub key_file: Option<PathBuf>,
    /// Recipients per message (RFC 5321 4.5.3.1.8 asks for at least 100).
    pub max_recipients: usize,
    /// How long a device waits after DATA while the relay tries the upstream at once.
    pub in_session_timeout: Seconds,
    /// The first retry of a deferred message; later retries back off exponentially.
    pub retry_first: Seconds,
    /// The longest wait between two retries.
    pub retry_max: Seconds,
    /// A message still undelivered after this long is bounced.
    pub queue_lifetime: Seconds,
    /// Where bounces (DSNs) go; by default to the message's original sender.
    pub bounce_to: Option<String>,
    /// Authenticated connections kept open per identity towards the upstream.
    pub upstream_pool: usize,
    /// How long to wait for the upstream's answer to connecting and to each command
    /// (the body may take ten times as long).
    pub upstream_timeout: Seconds,
}

impl Default for Relay {
    fn default() -> Self {
        Relay {
            hostname: "mfd-relay".into(),
            data_dir: PathBuf::from("./data"),
            key_file: None,
            max_recipients: 100,
            in_session_timeout: Seconds(Duration::from_secs(20)),
            retry_first: Seconds(Duration::from_secs(30)),
            retry_max: Seconds(Duration::from_secs(30 * 60)),
            queue_lifetime: Seconds(Duration::from_secs(5 * 24 * 3600)),
            bounce_to: None,
            upstream_pool: 4,
            upstream_timeout: Seconds(Duration::from_secs(60)),
        }
    }
}

/// `[admin]`: the loopback HTTP listener (metrics, health, OAuth callback, control).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    pub listen: Spanned<String>,
    /// Optional bearer token that every admin request except /healthz must carry.
    pub token: Option<String>,
    /// Whether /readyz stays ready while an identity needs a new sign-in.
    pub ready_when_needs_login: bool,
    /// Where the browser returns after a sign-in (authorization code flow); by default
    /// `http://localhost:<admin port>/oauth/callback`. Register it in the app.
    pub redirect_uri: Option<String>,
    /// User name for HTTP basic auth on the admin listener, for people with a browser
    /// (`/status`); goes with `basic_auth_password_hash`.
    pub basic_auth_user: Option<Spanned<String>>,
    /// argon2 hash of that password, from `mfd-relay hash-pin`.
    pub basic_auth_password_hash: Option<Spanned<String>>,
    /// Host names (no port) the admin listener answers to besides its listen address and
    /// `localhost`, e.g. the name of a reverse proxy; other `Host` headers are refused
    /// (DNS rebinding).
    pub allowed_hosts: Vec<Spanned<String>>,
}

impl Admin {
    /// The redirect URI for browser sign-ins.
    pub fn redirect_uri(&self) -> String {
        if let Some(u) = &self.redirect_uri {
            return u.clone();
        }
        let port = self.listen.get_ref().rsplit_once(':').map(|(_, p)| p).unwrap_or("9925");
        format!("http://localhost:{port}/oauth/callback")
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: Spanned::new(0..0, "127.0.0.1:9925".into()),
            token: None,
            ready_when_needs_login: false,
            redirect_uri: None,
            basic_auth_user: None,
            basic_auth_password_hash: None,
            allowed_hosts: Vec::new(),
        }
    }
}

/// How a device-facing listener speaks TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    None,
    /// RFC 3207: plain at first, TLS after the STARTTLS command.
    Starttls,
    /// RFC 8314: TLS from the first byte (port 465 style).
    Implicit,
}

/// `[[listener]]`: where devices connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub listen: Spanned<String>,
    #[serde(default)]
    pub tls: TlsMode,
    pub cert: Option<Spanned<PathBuf>>,
    pub key: Option<Spanned<PathBuf>>,
    /// When true a device must AUTH; when false it may also be known by its address.
    #[serde(default)]
    pub require_auth: bool,
    /// When true, AUTH is neither offered nor accepted before STARTTLS (RFC 4954 4); off by
    /// default for old devices that log in without TLS.
    #[serde(default)]
    pub require_auth_tls: bool,
    #[serde(default = "default_max_message_size")]
    pub max_message_size: Size,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_connections_per_address")]
    pub max_connections_per_address: usize,
    /// RFC 5321 4.5.3.2.7: a server should wait at least 5 minutes for a command.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: Seconds,
}

fn default_max_message_size() -> Size {
    Size(35 * 1024 * 1024)
}
fn default_max_connections() -> usize {
    1000
}
fn default_max_connections_per_address() -> usize {
    100
}
fn default_command_timeout() -> Seconds {
    Seconds(Duration::from_secs(300))
}

/// Which OAuth provider a `[[provider]]` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Microsoft,
    Google,
    Generic,
}

/// Microsoft national clouds: each has its own login and mail hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Cloud {
    #[default]
    Global,
    Usgov,
    UsgovDod,
    China,
}

/// How the relay reaches an upstream server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    /// Plain TCP; only sensible on loopback (tests, a local smarthost).
    None,
    Starttls,
    Implicit,
}

/// `[[provider]]`: one OAuth app registration and where its mail servers are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: Spanned<String>,
    pub kind: ProviderKind,
    pub tenant: Option<String>,
    #[serde(default)]
    pub cloud: Cloud,
    pub client_id: String,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<Spanned<PathBuf>>,
    pub client_certificate: Option<Spanned<PathBuf>>,
    pub client_key: Option<Spanned<PathBuf>>,
    /// Google: the service account's JSON key (domain-wide delegation).
    pub service_account_file: Option<Spanned<PathBuf>>,
    pub token_url: Option<String>,
    pub device_authorization_url: Option<String>,
    pub authorization_url: Option<String>,
    /// "host:port" of the submission server; defaults by kind and cloud.
    pub smtp: Option<Spanned<String>>,
    pub smtp_tls: Option<UpstreamTls>,
    pub imap: Option<Spanned<String>>,
    pub imap_tls: Option<UpstreamTls>,
    /// Extra CA certificates (PEM) to trust for this provider's servers.
    pub ca_file: Option<Spanned<PathBuf>>,
    /// Messages per minute per identity (Exchange Online allows 30).
    pub messages_per_minute: Option<u32>,
    /// Largest message the provider takes (Exchange 35 MiB by default, Gmail 25 MiB).
    pub max_message_size: Option<Size>,
    /// Scopes to request instead of the provider's defaults.
    pub scopes: Option<Vec<String>>,
}

/// How an identity is signed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    DeviceCode,
    AuthCode,
    ClientCredentials,
    ServiceAccount,
}

impl fmt::Display for Flow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flow::DeviceCode => "device_code",
            Flow::AuthCode => "auth_code",
            Flow::ClientCredentials => "client_credentials",
            Flow::ServiceAccount => "service_account",
        })
    }
}

/// `[[identity]]`: a mailbox the relay sends (and reads) as.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub name: Spanned<String>,
    pub provider: Spanned<String>,
    pub email: Spanned<String>,
    pub flow: Spanned<Flow>,
    /// Overrides the provider's `messages_per_minute` for this mailbox.
    pub messages_per_minute: Option<u32>,
}

/// What the relay does with a device's sender address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FromPolicy {
    /// Envelope sender and header From become the identity's address (Exchange and Gmail
    /// refuse other senders); the original From is kept as Reply-To when there is none.
    #[default]
    Rewrite,
    Keep,
}

/// `[[device]]`: a printer or scanner.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Device {
    pub name: Spanned<String>,
    pub identity: Spanned<String>,
    #[serde(default)]
    pub addresses: Vec<Spanned<String>>,
    pub username: Option<Spanned<String>>,
    pub pin_hash: Option<Spanned<String>>,
    pub recipients: Option<Vec<String>>,
    #[serde(default)]
    pub from: FromPolicy,
}

/// `[[mailbox]]`: a mobile-print mailbox polled over IMAP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mailbox {
    pub name: Spanned<String>,
    pub identity: Spanned<String>,
    #[serde(default = "default_folder")]
    pub folder: String,
    pub spool: PathBuf,
    #[serde(default = "default_after")]
    pub after: Spanned<String>,
    #[serde(default)]
    pub senders: Vec<String>,
    #[serde(default)]
    pub types: Vec<String>,
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Seconds,
    #[serde(default = "default_mailbox_max_size")]
    pub max_size: Size,
    #[serde(default)]
    pub print_body: bool,
    pub command: Option<Vec<String>>,
    #[serde(default = "default_command_run_timeout")]
    pub command_timeout: Seconds,
    #[serde(default)]
    pub reply_refused: bool,
    /// Believe `From` (for `senders` and answers) only when the receiving server vouches for
    /// it: DMARC/compauth pass in its Authentication-Results, or Exchange-internal mail.
    #[serde(default = "default_true")]
    pub require_authenticated_sender: bool,
    /// The authserv-id the receiving server writes in Authentication-Results (RFC 8601 2.5);
    /// when set, the topmost field must carry it.
    #[serde(default)]
    pub authserv_id: Option<String>,
}

fn default_true() -> bool {
    true
}
fn default_folder() -> String {
    "INBOX".into()
}
fn default_after() -> Spanned<String> {
    Spanned::new(0..0, "delete".into())
}
fn default_poll_interval() -> Seconds {
    Seconds(Duration::from_secs(60))
}
fn default_mailbox_max_size() -> Size {
    Size(50 * 1024 * 1024)
}
fn default_command_run_timeout() -> Seconds {
    Seconds(Duration::from_secs(60))
}

/// A duration written as "30s", "5m", "2h", "5d", "500ms" (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_text(d, |n| Seconds(Duration::from_secs(n)), |t| parse_duration(t).map(Seconds))
    }
}

/// Reads a value written either as a bare number or as text with a unit.
fn number_or_text<'de, D: Deserializer<'de>, T>(
    d: D,
    number: impl FnOnce(u64) -> T,
    text: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Num(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Num(n) => Ok(number(n)),
        Raw::Text(t) => text(&t).map_err(serde::de::Error::custom),
    }
}

/// A size written as "35MiB", "25MB", "512KiB" or a bare number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        number_or_text(d, Size, |t| parse_size(t).map(Size))
    }
}

/// Parses "30s", "5m", "2h", "5d", "500ms", "90" (seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 =
        num.parse().map_err(|_| format!("\"{text}\" is not a duration (like \"30s\", \"5m\", \"2h\", \"5d\")"))?;
    let secs = |mult: u64| Duration::from_secs(n.saturating_mul(mult));
    match unit.trim() {
        "" | "s" => Ok(secs(1)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" | "min" => Ok(secs(60)),
        "h" => Ok(secs(3600)),
        "d" => Ok(secs(86400)),
        other => Err(format!("\"{text}\": unknown unit \"{other}\" (use ms, s, m, h or d)")),
    }
}

/// Parses "35MiB", "25MB", "512KiB", "1GiB", "1000" (bytes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("\"{text}\" is not a size (like \"35MiB\" or \"25MB\")"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "kib" => 1024,
        "mb" | "m" => 1000 * 1000,
        "mib" => 1024 * 1024,
        "gb" | "g" => 1000 * 1000 * 1000,
        "gib" => 1024 * 1024 * 1024,
        _ => return Err(format!("\"{text}\": unknown unit \"{unit}\" (use B, KiB, MiB, GiB, KB, MB or GB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("\"{text}\" is too large"))
}

/// 1-based line of a byte offset in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

impl Config {
    /// Reads and parses the file; returns syntax errors with their line. Does not validate.
    pub fn parse(path: &Path, text: String) -> Result<Config, ConfigError> {
        match toml::from_str::<Config>(&text) {
            Ok(mut c) => {
                c.path = path.to_path_buf();
                c.text = text;
                Ok(c)
            }
            Err(e) => {
                let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(1);
                Err(ConfigError::Invalid(vec![Problem {
                    file: path.to_path_buf(),
                    line,
                    message: e.message().trim().to_string(),
                }]))
            }
        }
    }

    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        let config = Config::parse(path, text)?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// A path from the file, resolved against the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or_else(|| Path::new(".")).join(p)
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.resolve(&self.relay.data_dir)
    }

    pub fn key_file(&self) -> PathBuf {
        match &self.relay.key_file {
            Some(p) => self.resolve(p),
            None => self.data_dir().join("secret.key"),
        }
    }

    pub fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.iter().map(|p| p.get_ref()).find(|p| p.name.get_ref() == name)
    }

    pub fn identity(&self, name: &str) -> Option<&Identity> {
        self.identities.iter().map(|i| i.get_ref()).find(|i| i.name.get_ref() == name)
    }

    fn problem_at(&self, span: std::ops::Range<usize>, message: String) -> Problem {
        Problem { file: self.path.clone(), line: line_of(&self.text, span.start), message }
    }

    /// Every semantic problem in the file, in file order.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut p = |span: std::ops::Range<usize>, msg: String| out.push(self.problem_at(span, msg));

        if self.relay.hostname.trim().is_empty() || self.relay.hostname.contains(char::is_whitespace) {
            p(0..0, "relay.hostname must be a host name without spaces".into());
        }
        if let Some(to) = &self.relay.bounce_to {
            if !looks_like_address(to) {
                p(0..0, format!("relay.bounce_to \"{to}\" is not a mail address"));
            }
        }
        if self.admin.listen.get_ref().parse::<SocketAddr>().is_err() {
            p(
                self.admin.listen.span(),
                format!("admin.listen \"{}\" is not an address:port", self.admin.listen.get_ref()),
            );
        }
        for h in &self.admin.allowed_hosts {
            let name = h.get_ref();
            if name.is_empty() || name.contains(['/', ':', ' ', '@', '*']) {
                p(h.span(), format!("admin.allowed_hosts: \"{name}\" is not a host name (no scheme, port or path)"));
            }
        }

        match (&self.admin.basic_auth_user, &self.admin.basic_auth_password_hash) {
            (Some(u), Some(h)) => {
                if u.get_ref().is_empty() || u.get_ref().contains(':') {
                    p(u.span(), "admin.basic_auth_user must be non-empty and have no ':'".into());
                }
                if let Err(e) = crate::credentials::check_hash(h.get_ref()) {
                    p(h.span(), format!("admin.basic_auth_password_hash is {e}; make one with `mfd-relay hash-pin`"));
                }
                if self.admin.token.is_none() {
                    p(u.span(), "admin.basic_auth_user needs admin.token too: the mfd-relay commands (queue, auth, reload) use the token".into());
                }
            }
            (Some(x), None) | (None, Some(x)) => {
                p(x.span(), "admin.basic_auth_user and admin.basic_auth_password_hash go together".into())
            }
            (None, None) => {}
        }

        let mut seen = HashSet::new();
        for l in &self.listeners {
            let l = l.get_ref();
            match l.listen.get_ref().parse::<SocketAddr>() {
                Err(_) => p(l.listen.span(), format!("listener \"{}\" is not an address:port", l.listen.get_ref())),
                Ok(a) if !seen.insert(a) => p(l.listen.span(), format!("listener {a} appears twice")),
                Ok(_) => {}
            }
            if l.require_auth_tls && l.tls == TlsMode::None {
                p(
                    l.listen.span(),
                    format!(
                        "listener {} has require_auth_tls = true but tls = \"none\": no device could ever log in",
                        l.listen.get_ref()
                    ),
                );
            }
            if l.tls != TlsMode::None {
                match (&l.cert, &l.key) {
                    (Some(cert), Some(key)) => {
                        for f in [cert, key] {
                            if !self.resolve(f.get_ref()).is_file() {
                                p(f.span(), format!("file {} does not exist", self.resolve(f.get_ref()).display()));
                            }
                        }
                        if self.resolve(cert.get_ref()).is_file() && self.resolve(key.get_ref()).is_file() {
                            if let Err(e) =
                                crate::tls::server_acceptor(&self.resolve(cert.get_ref()), &self.resolve(key.get_ref()))
                            {
                                p(cert.span(), e.to_string());
                            }
                        }
                    }
                    _ => p(
                        l.listen.span(),
                        format!(
                            "listener {} has tls = \"{}\" but no cert and key",
                            l.listen.get_ref(),
                            if l.tls == TlsMode::Starttls { "starttls" } else { "implicit" }
                        ),
                    ),
                }
            }
        }

        let mut names = HashSet::new();
        for pr in &self.providers {
            let pr = pr.get_ref();
            let span = pr.name.span();
            let name = pr.name.get_ref();
            if !names.insert(name.clone()) {
                p(span.clone(), format!("provider \"{name}\" is defined twice"));
            }
            let secrets =
                [pr.client_secret.is_some(), pr.client_secret_file.is_some(), pr.client_certificate.is_some()]
                    .iter()
                    .filter(|b| **b)
                    .count();
            if secrets > 1 {
                p(
                    span.clone(),
                    format!("provider \"{name}\": give one of client_secret, client_secret_file or client_certificate"),
                );
            }
            if pr.client_certificate.is_some() != pr.client_key.is_some() {
                p(span.clone(), format!("provider \"{name}\": client_certificate and client_key go together"));
            }
            for f in
                [&pr.client_secret_file, &pr.client_certificate, &pr.client_key, &pr.service_account_file, &pr.ca_file]
                    .into_iter()
                    .flatten()
            {
                let path = self.resolve(f.get_ref());
                if !path.is_file() {
                    p(f.span(), format!("file {} does not exist", path.display()));
                }
            }
            for hp in [&pr.smtp, &pr.imap].into_iter().flatten() {
                if crate::upstream::split_host_port(hp.get_ref()).is_none() {
                    p(hp.span(), format!("\"{}\" is not host:port", hp.get_ref()));
                }
            }
            match pr.kind {
                ProviderKind::Generic => {
                    if pr.token_url.is_none() {
                        p(span.clone(), format!("provider \"{name}\" (generic) needs token_url"));
                    }
                    if pr.smtp.is_none() && pr.imap.is_none() {
                        p(
                            span.clone(),
                            format!("provider \"{name}\" (generic) needs smtp and/or imap = \"host:port\""),
                        );
                    }
                }
                ProviderKind::Microsoft => {
                    if pr.tenant.is_none() && pr.token_url.is_none() {
                        p(span.clone(), format!("provider \"{name}\" (microsoft) needs tenant (a tenant id, a domain like contoso.onmicrosoft.com, \"organizations\" or \"common\")"));
                    }
                }
                ProviderKind::Google => {}
            }
        }

        let mut names = HashSet::new();
        for id in &self.identities {
            let id = id.get_ref();
            let name = id.name.get_ref();
            if !names.insert(name.clone()) {
                p(id.name.span(), format!("identity \"{name}\" is defined twice"));
            }
            if !looks_like_address(id.email.get_ref()) {
                p(id.email.span(), format!("identity \"{name}\": \"{}\" is not a mail address", id.email.get_ref()));
            }
            let Some(pr) = self.provider(id.provider.get_ref()) else {
                p(
                    id.provider.span(),
                    format!("identity \"{name}\": provider \"{}\" is not defined", id.provider.get_ref()),
                );
                continue;
            };
            let has_secret =
                pr.client_secret.is_some() || pr.client_secret_file.is_some() || pr.client_certificate.is_some();
            let flow_span = id.flow.span();
            match (*id.flow.get_ref(), pr.kind) {
                (Flow::DeviceCode, ProviderKind::Google) => p(
                    flow_span.clone(),
                    format!("identity \"{name}\": Google's device flow does not grant the Gmail scope; use flow = \"auth_code\" (browser sign-in) or \"service_account\" (Workspace)"),
                ),
                (Flow::ServiceAccount, k) if k != ProviderKind::Google && k != ProviderKind::Generic => p(
                    flow_span.clone(),
                    format!("identity \"{name}\": flow = \"service_account\" is for Google Workspace providers"),
                ),
                (Flow::ServiceAccount, _) if pr.service_account_file.is_none() => p(
                    flow_span.clone(),
                    format!("identity \"{name}\": flow = \"service_account\" needs service_account_file on provider \"{}\"", pr.name.get_ref()),
                ),
                (Flow::ClientCredentials, _) if !has_secret => p(
                    flow_span.clone(),
                    format!("identity \"{name}\": flow = \"client_credentials\" needs client_secret, client_secret_file or client_certificate on provider \"{}\"", pr.name.get_ref()),
                ),
                (Flow::ClientCredentials, ProviderKind::Microsoft)
                    if matches!(pr.tenant.as_deref(), Some("common" | "organizations" | "consumers")) => p(
                    flow_span.clone(),
                    format!("identity \"{name}\": app-only sign-in needs a specific tenant on provider \"{}\", not \"{}\"", pr.name.get_ref(), pr.tenant.as_deref().unwrap_or_default()),
                ),
                _ => {}
            }
        }

        let mut names = HashSet::new();
        let mut users = HashSet::new();
        for d in &self.devices {
            let d = d.get_ref();
            let name = d.name.get_ref();
            if !names.insert(name.clone()) {
                p(d.name.span(), format!("device \"{name}\" is defined twice"));
            }
            if self.identity(d.identity.get_ref()).is_none() {
                p(
                    d.identity.span(),
                    format!("device \"{name}\": identity \"{}\" is not defined", d.identity.get_ref()),
                );
            }
            for a in &d.addresses {
                if let Err(e) = crate::devices::parse_net(a.get_ref()) {
                    p(a.span(), format!("device \"{name}\": {e}"));
                }
            }
            if d.addresses.is_empty() && d.username.is_none() {
                p(
                    d.name.span(),
                    format!("device \"{name}\" has neither addresses nor username, so nothing can match it"),
                );
            }
            if let Some(u) = &d.username {
                if !users.insert(u.get_ref().to_ascii_lowercase()) {
                    p(u.span(), format!("username \"{}\" is used by two devices", u.get_ref()));
                }
                match &d.pin_hash {
                    None => p(
                        u.span(),
                        format!(
                            "device \"{name}\" has a username but no pin_hash (make one with `mfd-relay hash-pin`)"
                        ),
                    ),
                    Some(h) => {
                        if let Err(e) = crate::credentials::check_hash(h.get_ref()) {
                            p(
                                h.span(),
                                format!("device \"{name}\": pin_hash is {e}; make one with `mfd-relay hash-pin`"),
                            );
                        }
                    }
                }
            }
            for r in d.recipients.iter().flatten() {
                if !crate::devices::valid_pattern(r) {
                    p(
                        d.name.span(),
                        format!(
                            "device \"{name}\": recipient pattern \"{r}\" should look like user@domain, *@domain or *"
                        ),
                    );
                }
            }
        }

        let mut names = HashSet::new();
        let mut folders = HashSet::new();
        for m in &self.mailboxes {
            let m = m.get_ref();
            let name = m.name.get_ref();
            if !names.insert(name.clone()) {
                p(m.name.span(), format!("mailbox \"{name}\" is defined twice"));
            }
            match self.identity(m.identity.get_ref()) {
                None => p(
                    m.identity.span(),
                    format!("mailbox \"{name}\": identity \"{}\" is not defined", m.identity.get_ref()),
                ),
                Some(id) => {
                    let generic_without_imap = self
                        .provider(id.provider.get_ref())
                        .is_some_and(|pr| pr.kind == ProviderKind::Generic && pr.imap.is_none());
                    if generic_without_imap {
                        p(
                            m.identity.span(),
                            format!(
                                "mailbox \"{name}\": provider \"{}\" has no imap = \"host:port\"",
                                id.provider.get_ref()
                            ),
                        );
                    }
                }
            }
            // IMAP names are case-sensitive, except INBOX (RFC 3501 5.1).
            let folder = if m.folder.eq_ignore_ascii_case("INBOX") { "INBOX".to_string() } else { m.folder.clone() };
            if !folders.insert((m.identity.get_ref().clone(), folder.clone())) {
                p(
                    m.name.span(),
                    format!("mailbox \"{name}\": another mailbox already polls folder \"{}\" of identity \"{}\" (every job would print twice)", m.folder, m.identity.get_ref()),
                );
            }
            if let Some(target) = m.after.get_ref().strip_prefix("move:") {
                let target = if target.eq_ignore_ascii_case("INBOX") { "INBOX" } else { target };
                if target == folder {
                    p(
                        m.after.span(),
                        format!(
                            "mailbox \"{name}\": after = \"{}\" moves mail into the folder being polled",
                            m.after.get_ref()
                        ),
                    );
                }
            }
            if let Some(cmd) = &m.command {
                if cmd.is_empty() || !cmd.iter().any(|a| a.contains("{file}")) {
                    p(m.name.span(), format!("mailbox \"{name}\": command should name the file to print with \"{{file}}\" (like [\"lp\", \"-d\", \"floor3\", \"{{file}}\"])"));
                }
            }
            let after = m.after.get_ref();
            if !(after == "delete" || after == "seen" || after.strip_prefix("move:").is_some_and(|f| !f.is_empty())) {
                p(
                    m.after.span(),
                    format!("mailbox \"{name}\": after = \"{after}\" should be delete, seen or move:<folder>"),
                );
            }
        }
        out.sort_by_key(|p| p.line);
        out
    }
}

/// A loose check that `s` is `local@domain`; the SMTP parser applies the real syntax.
pub fn looks_like_address(s: &str) -> bool {
    match s.rsplit_once('@') {
        Some((l, d)) => !l.is_empty() && !d.is_empty() && !s.contains(char::is_whitespace),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/nonexistent/config.toml"), text.to_string())
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text) {
            Ok(c) => c.problems().iter().map(|p| p.to_string()).collect(),
            Err(ConfigError::Invalid(v)) => v.iter().map(|p| p.to_string()).collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("5d"), Ok(Duration::from_secs(432000)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("5 weeks").is_err());
        assert!(parse_duration("m").is_err());
        assert_eq!(parse_size("35MiB"), Ok(35 * 1024 * 1024));
        assert_eq!(parse_size("25MB"), Ok(25_000_000));
        assert_eq!(parse_size("512 KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("35 furlongs").is_err());
        assert!(parse_size("99999999999999999999GiB").is_err());
    }

    #[test]
    fn syntax_error_has_line() {
        let p = problems("[relay]\nhostname = \"x\"\nmax_recipients = \"many\"\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].starts_with("/nonexistent/config.toml:3:"), "{p:?}");
    }

    #[test]
    fn unknown_key_has_line() {
        let p = problems("[relay]\nhostname = \"x\"\n\n[[device]]\nname = \"a\"\nidentty = \"b\"\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].contains(":6:") && p[0].contains("identty"), "{p:?}");
    }

    const GOOD: &str = r#"
[relay]
hostname = "relay.test"

[[provider]]
name = "p"
kind = "generic"
client_id = "c"
client_secret = "s"
token_url = "http://127.0.0.1:1/token"
smtp = "127.0.0.1:2"
smtp_tls = "none"

[[identity]]
name = "scans"
provider = "p"
email = "scans@example.test"
flow = "client_credentials"

[[device]]
name = "d1"
identity = "scans"
addresses = ["192.168.10.31/32", "10.0.0.0/8"]
"#;

    #[test]
    fn good_config_has_no_problems() {
        assert_eq!(problems(GOOD), Vec::<String>::new());
    }

    #[test]
    fn references_and_cidrs_are_checked_with_lines() {
        let text = format!(
            "{GOOD}\n[[device]]\nname = \"d2\"\nidentity = \"nope\"\naddresses = [\"300.1.1.1/32\"]\nusername = \"u\"\n\n[[device]]\nname = \"d2\"\nidentity = \"scans\"\naddresses = [\"10.1.1.1\"]\n"
        );
        let p = problems(&text);
        let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        assert!(
            p.iter()
                .any(|m| m.contains(&format!(":{}:", line_of("\"nope\"")))
                    && m.contains("identity \"nope\" is not defined")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.contains(&format!(":{}:", line_of("300.1.1.1"))) && m.contains("300.1.1.1")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.contains("no pin_hash")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("defined twice")), "{p:?}");
        assert_eq!(p.len(), 4, "{p:?}");
    }

    #[test]
    fn google_device_code_is_refused_with_advice() {
        let text = r#"
[[provider]]
name = "g"
kind = "google"
client_id = "c"
[[identity]]
name = "i"
provider = "g"
email = "a@b.c"
flow = "device_code"
"#;
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains(":10:") && p[0].contains("auth_code"), "{p:?}");
    }

    #[test]
    fn mailbox_mistakes_are_caught() {
        let text = format!(
            "{GOOD}\n[[mailbox]]\nname = \"a\"\nidentity = \"scans\"\nspool = \"s\"\nafter = \"move:INBOX\"\ncommand = [\"lp\"]\n\n[[mailbox]]\nname = \"b\"\nidentity = \"scans\"\nfolder = \"inbox\"\nspool = \"s\"\n"
        );
        let p = problems(&text);
        assert!(p.iter().any(|m| m.contains("has no imap")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("moves mail into the folder being polled")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("{file}")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("already polls folder")), "{p:?}");
    }

    #[test]
    fn tls_listener_needs_cert() {
        let p = problems("[[listener]]\nlisten = \"0.0.0.0:2525\"\ntls = \"starttls\"\n");
        assert_eq!(p.len(), 1);
        assert!(p[0].contains(":2:") && p[0].contains("no cert"), "{p:?}");
        let p = problems("[[listener]]\nlisten = \"0.0.0.0:2525\"\ntls = \"starttls\"\ncert = \"nope.pem\"\nkey = \"nope-key.pem\"\n");
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains(":4:") && p[0].contains("does not exist"), "{p:?}");
    }

    #[test]
    fn require_auth_tls_needs_a_tls_listener() {
        let p = problems("[[listener]]\nlisten = \"0.0.0.0:2525\"\nrequire_auth_tls = true\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains(":2:") && p[0].contains("require_auth_tls"), "{p:?}");
        assert!(problems("[[listener]]\nlisten = \"0.0.0.0:2525\"\nrequire_auth_tls = false\n").is_empty());
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.data_dir(), PathBuf::from("/nonexistent/./data"));
        assert_eq!(c.resolve(Path::new("/abs")), PathBuf::from("/abs"));
    }
}
