//! The configuration file: its TOML schema, defaults, and validation.
//!
//! The admin's interface (README.md and config.example.toml) is this file. Parsing happens in
//! two steps. serde turns the text into the structs below, and every value into its type
//! ([`types`]: listen addresses, `host:port`, networks, address patterns, `after`, a
//! listener's TLS with its certificate and key, durations, sizes), so the rest of the relay
//! never parses configuration text again; syntax errors and bad values come back with their
//! line. Then [`Config::problems`] ([`check`], one function per section) checks what a single
//! value cannot: names that refer to each other, duplicates, files that must exist, flows a
//! provider cannot do. Every problem names `file:line`, and all of them are reported at once
//! so the admin fixes the file in one pass.
//!
//! Relative paths are resolved against the directory of the configuration file, so the relay
//! behaves the same whatever directory it was started from.

mod check;
mod types;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use types::{
    folder_key, parse_duration, parse_size, AddressPattern, After, HostPort, Net, Seconds, Size, WebhookUrl,
};

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
    #[serde(default, rename = "destination")]
    pub destinations: Vec<Spanned<Destination>>,
    #[serde(default)]
    pub notify: Notify,
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
    #[serde(deserialize_with = "types::admin_listen")]
    pub listen: Spanned<SocketAddr>,
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
        format!("http://localhost:{}/oauth/callback", self.listen.get_ref().port())
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            listen: Spanned::new(0..0, SocketAddr::from(([127, 0, 0, 1], 9925))),
            token: None,
            ready_when_needs_login: false,
            redirect_uri: None,
            basic_auth_user: None,
            basic_auth_password_hash: None,
            allowed_hosts: Vec::new(),
        }
    }
}

/// `[notify]`: who hears about what needs a person, without Prometheus (README.md,
/// "Notifications"): an e-mail address and/or webhooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Notify {
    /// Mail goes here, sent as the relay's own message through a healthy identity.
    pub email: Option<Spanned<String>>,
    pub webhooks: Vec<Spanned<Webhook>>,
    /// How often conditions are looked at.
    pub check_every: Spanned<Seconds>,
    /// A condition that lasts is announced again this often.
    pub remind_every: Spanned<Seconds>,
}

impl Notify {
    /// Whether anyone is to be told anything.
    pub fn enabled(&self) -> bool {
        self.email.is_some() || !self.webhooks.is_empty()
    }
}

impl Default for Notify {
    fn default() -> Self {
        Notify {
            email: None,
            webhooks: Vec::new(),
            check_every: Spanned::new(0..0, Seconds(Duration::from_secs(60))),
            remind_every: Spanned::new(0..0, Seconds(Duration::from_secs(24 * 3600))),
        }
    }
}

/// One webhook of `[notify]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    #[serde(deserialize_with = "types::webhook_url")]
    pub url: Spanned<WebhookUrl>,
    #[serde(default)]
    pub format: WebhookFormat,
}

/// What a webhook's receiver understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// A plain JSON object (for scripts, n8n, a ticket system).
    #[default]
    Json,
    /// Microsoft Teams (a Workflows "when a webhook request is received" flow): an Adaptive Card.
    Teams,
    /// A Slack incoming webhook: `{"text": ...}`.
    Slack,
}

impl WebhookFormat {
    /// The name in the file, and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookFormat::Json => "json",
            WebhookFormat::Teams => "teams",
            WebhookFormat::Slack => "slack",
        }
    }
}

/// How a device-facing listener speaks TLS, as the listener's settings name it.
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

/// A listener's TLS: the mode with the certificate and key it needs, so that a TLS listener
/// without them cannot be configured. Written in the file as `tls`, `cert` and `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerTls {
    /// Plain SMTP only.
    None,
    /// RFC 3207: plain at first, TLS after the STARTTLS command.
    StartTls { cert: Spanned<PathBuf>, key: Spanned<PathBuf> },
    /// RFC 8314: TLS from the first byte (port 465 style).
    Implicit { cert: Spanned<PathBuf>, key: Spanned<PathBuf> },
}

impl ListenerTls {
    /// The mode alone.
    pub fn mode(&self) -> TlsMode {
        match self {
            ListenerTls::None => TlsMode::None,
            ListenerTls::StartTls { .. } => TlsMode::Starttls,
            ListenerTls::Implicit { .. } => TlsMode::Implicit,
        }
    }

    /// The certificate chain and key files, as written (see [`Config::resolve`]).
    pub fn files(&self) -> Option<(&Spanned<PathBuf>, &Spanned<PathBuf>)> {
        match self {
            ListenerTls::None => None,
            ListenerTls::StartTls { cert, key } | ListenerTls::Implicit { cert, key } => Some((cert, key)),
        }
    }
}

/// `[[listener]]`: where devices connect. Equal when every setting is (spans aside): a
/// listener that differs in any way needs a restart.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawListener")]
pub struct Listener {
    pub listen: Spanned<SocketAddr>,
    pub tls: ListenerTls,
    /// When true a device must AUTH; when false it may also be known by its address.
    pub require_auth: bool,
    /// When true, AUTH is neither offered nor accepted before STARTTLS (RFC 4954 4); off by
    /// default for old devices that log in without TLS.
    pub require_auth_tls: bool,
    /// TLS 1.0/1.1 and the CBC / RSA-key-exchange suites too, through OpenSSL, for printers
    /// older than TLS 1.2 AEAD (README.md, "Old devices and TLS"); only with `tls` set.
    pub legacy_tls: Spanned<bool>,
    pub max_message_size: Size,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// RFC 5321 4.5.3.2.7: a server should wait at least 5 minutes for a command.
    pub command_timeout: Seconds,
}

/// `[[listener]]` as written: `tls`, `cert` and `key` are separate keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    #[serde(deserialize_with = "types::listener_listen")]
    listen: Spanned<SocketAddr>,
    #[serde(default)]
    tls: TlsMode,
    cert: Option<Spanned<PathBuf>>,
    key: Option<Spanned<PathBuf>>,
    #[serde(default)]
    require_auth: bool,
    #[serde(default)]
    require_auth_tls: bool,
    #[serde(default = "not_legacy")]
    legacy_tls: Spanned<bool>,
    #[serde(default = "default_max_message_size")]
    max_message_size: Size,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
    #[serde(default = "default_max_connections_per_address")]
    max_connections_per_address: usize,
    #[serde(default = "default_command_timeout")]
    command_timeout: Seconds,
}

impl TryFrom<RawListener> for Listener {
    type Error = String;

    fn try_from(l: RawListener) -> Result<Listener, String> {
        let tls = match (l.tls, l.cert, l.key) {
            (TlsMode::None, _, _) => ListenerTls::None,
            (TlsMode::Starttls, Some(cert), Some(key)) => ListenerTls::StartTls { cert, key },
            (TlsMode::Implicit, Some(cert), Some(key)) => ListenerTls::Implicit { cert, key },
            (mode, _, _) => {
                let name = if mode == TlsMode::Starttls { "starttls" } else { "implicit" };
                let message = format!("listener {} has tls = \"{name}\" but no cert and key", l.listen.get_ref());
                types::bad::<_, toml::de::Error>(l.listen.span(), message, types::Named::Itself, ListenerTls::None)
                    .map_err(|e| e.message().to_string())?
            }
        };
        Ok(Listener {
            listen: l.listen,
            tls,
            require_auth: l.require_auth,
            require_auth_tls: l.require_auth_tls,
            legacy_tls: l.legacy_tls,
            max_message_size: l.max_message_size,
            max_connections: l.max_connections,
            max_connections_per_address: l.max_connections_per_address,
            command_timeout: l.command_timeout,
        })
    }
}

fn not_legacy() -> Spanned<bool> {
    Spanned::new(0..0, false)
}

/// The relay's own ceiling on a message. Each device is told less where its identity's path
/// takes less (Exchange by SMTP 35 MiB, Gmail 35882577 bytes); Graph takes attachments up to
/// 150 MB, so the ceiling does not stop a large scan that path can send.
fn default_max_message_size() -> Size {
    Size(150 * 1024 * 1024)
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
    /// The submission server; defaults by kind and cloud.
    pub smtp: Option<Spanned<HostPort>>,
    pub smtp_tls: Option<UpstreamTls>,
    pub imap: Option<Spanned<HostPort>>,
    pub imap_tls: Option<UpstreamTls>,
    /// Extra CA certificates (PEM) to trust for this provider's servers.
    pub ca_file: Option<Spanned<PathBuf>>,
    /// Messages per minute per identity (Exchange Online allows 30).
    pub messages_per_minute: Option<u32>,
    /// Largest message the provider takes (Exchange 35 MiB by default, Gmail 25 MiB).
    pub max_message_size: Option<Size>,
    /// Scopes to request instead of the provider's defaults.
    pub scopes: Option<Vec<String>>,
    /// Microsoft Graph's base URL (identities with `send_via = "graph"`); defaults per cloud.
    pub graph_url: Option<Spanned<String>>,
    /// The Gmail API's base URL (identities with `send_via = "gmail_api"`).
    pub gmail_api_url: Option<Spanned<String>>,
    /// Google Drive's base URL (`[[destination]] kind = "google_drive"`).
    pub drive_api_url: Option<Spanned<String>>,
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
    /// How mail from this identity goes upstream (default: SMTP with XOAUTH2).
    pub send_via: Option<Spanned<SendVia>>,
    /// What happens to a message over the provider's size limit (default: refused, 552).
    pub oversize: Option<Spanned<Oversize>>,
    /// `oversize = "link"`: the `[[destination]]` the attachments of such a message go to.
    pub oversize_destination: Option<Spanned<String>>,
}

/// `[[identity]] oversize`: a message larger than the provider takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Oversize {
    /// Refused before DATA (SIZE) or after it: 552 5.3.4.
    #[default]
    Refuse,
    /// Accepted: its attachments are saved to `oversize_destination` and the mail goes out
    /// with a link to each instead.
    Link,
}

impl Identity {
    /// What happens to a message over the provider's size limit.
    pub fn oversize(&self) -> Oversize {
        self.oversize.as_ref().map(|v| *v.get_ref()).unwrap_or_default()
    }

    /// How mail from this identity goes upstream.
    pub fn send_via(&self) -> SendVia {
        self.send_via.as_ref().map(|v| *v.get_ref()).unwrap_or_default()
    }
}

/// `[[identity]] send_via`: the upstream path of an identity's mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SendVia {
    /// SMTP submission with SASL XOAUTH2.
    #[default]
    Smtp,
    /// Microsoft Graph `sendMail` (and drafts with upload sessions for large scans).
    Graph,
    /// The Gmail API's `messages.send`.
    GmailApi,
}

impl SendVia {
    /// The metric label and the config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SendVia::Smtp => "smtp",
            SendVia::Graph => "graph",
            SendVia::GmailApi => "gmail_api",
        }
    }
}

impl fmt::Display for SendVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
    pub addresses: Vec<Spanned<Net>>,
    pub username: Option<Spanned<String>>,
    pub pin_hash: Option<Spanned<String>>,
    /// Who the device may send to; `None` allows any recipient.
    #[serde(default, deserialize_with = "types::recipient_patterns")]
    pub recipients: Option<Vec<AddressPattern>>,
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
    pub after: Spanned<After>,
    #[serde(default, deserialize_with = "types::sender_patterns")]
    pub senders: Vec<AddressPattern>,
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

/// `[[destination]] kind`: where a destination's files go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationKind {
    /// A SharePoint Online document library (`site`, `library`), through Microsoft Graph.
    Sharepoint,
    /// A user's OneDrive for Business (`user`), through Microsoft Graph.
    Onedrive,
    /// A Google Drive folder (`folder_id`; shared drives too), through the Drive API.
    GoogleDrive,
}

impl DestinationKind {
    /// The config spelling and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationKind::Sharepoint => "sharepoint",
            DestinationKind::Onedrive => "onedrive",
            DestinationKind::GoogleDrive => "google_drive",
        }
    }

    /// The provider kind whose tokens reach it.
    pub fn provider_kind(self) -> ProviderKind {
        match self {
            DestinationKind::Sharepoint | DestinationKind::Onedrive => ProviderKind::Microsoft,
            DestinationKind::GoogleDrive => ProviderKind::Google,
        }
    }
}

impl fmt::Display for DestinationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[destination]] conflict`: a file of that name is already in the folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Conflict {
    /// The new file gets a free name (SharePoint and OneDrive: `name 1.pdf`; Google Drive:
    /// `name (1).pdf`, as each service names copies).
    #[default]
    Rename,
    /// The new file replaces the old one's content.
    Replace,
    /// The file is not saved: the recipient fails permanently.
    Fail,
}

impl Conflict {
    /// The config spelling; Graph's `@microsoft.graph.conflictBehavior` uses the same words.
    pub fn as_str(self) -> &'static str {
        match self {
            Conflict::Rename => "rename",
            Conflict::Replace => "replace",
            Conflict::Fail => "fail",
        }
    }
}

/// `[[destination]]`: a recipient address that stands for a cloud folder (scan to folder).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Destination {
    pub name: Spanned<String>,
    /// The recipient devices send to (any domain; matched before anything goes upstream).
    pub address: Spanned<String>,
    /// The identity whose token uploads.
    pub identity: Spanned<String>,
    pub kind: Spanned<DestinationKind>,
    /// SharePoint: `host:/sites/path` (or `host:/teams/path`).
    pub site: Option<Spanned<String>>,
    /// SharePoint: the document library's name; default the site's default library.
    pub library: Option<Spanned<String>>,
    /// OneDrive: whose (default: the identity's email).
    pub user: Option<Spanned<String>>,
    /// Google Drive: the parent folder's id (default: the identity's My Drive root).
    pub folder_id: Option<Spanned<String>>,
    /// The folder under the library, drive or folder_id, as a template; created when missing.
    #[serde(default = "default_destination_folder")]
    pub folder: Spanned<String>,
    /// Each file's name, as a template (`{name}`: the attachment's own name, made safe).
    #[serde(default = "default_file_name")]
    pub file_name: Spanned<String>,
    #[serde(default)]
    pub conflict: Conflict,
    /// Mail the sender each file's name, size and link (through the identity).
    #[serde(default)]
    pub receipt: bool,
    /// A message without attachments is saved as its text (`.txt`) instead of refused.
    #[serde(default)]
    pub save_body: bool,
}

fn default_destination_folder() -> Spanned<String> {
    Spanned::new(0..0, String::new())
}

fn default_file_name() -> Spanned<String> {
    Spanned::new(0..0, "{yyyy}{MM}{dd}-{HH}{mm}{ss}-{name}".to_string())
}

fn default_true() -> bool {
    true
}
fn default_folder() -> String {
    "INBOX".into()
}
fn default_after() -> Spanned<After> {
    Spanned::new(0..0, After::Delete)
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

/// 1-based line of a byte offset in `text`.
/// A parser's message without the string values it quotes (`invalid type: string "…"`): a
/// value in the wrong place may be a secret (a webhook URL with its token, a client secret),
/// and the message goes to the log, `check`'s output and the reload report. The line number
/// still says where it is.
fn without_quoted_strings(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("string \"") {
        out.push_str(&rest[..i + "string".len()]);
        let after = &rest[i + "string \"".len()..];
        // The value ends at the next unescaped quote; without one, drop the rest.
        let mut end = None;
        let mut escaped = false;
        for (j, ch) in after.char_indices() {
            match ch {
                '\\' if !escaped => escaped = true,
                '"' if !escaped => {
                    end = Some(j);
                    break;
                }
                _ => escaped = false,
            }
        }
        match end {
            Some(j) => rest = &after[j + 1..],
            None => rest = "",
        }
    }
    out.push_str(rest);
    out
}

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

impl Config {
    /// Reads and parses the file into its typed values. Syntax errors come back with their
    /// line; so do values that do not parse (every one of them, with the cross-reference
    /// problems of the rest, so the admin fixes the file in one pass). Does not check
    /// cross-references of a file whose values are good: see [`Config::problems`].
    pub fn parse(path: &Path, text: String) -> Result<Config, ConfigError> {
        match types::collecting(|| toml::from_str::<Config>(&text)) {
            (Ok(mut c), found) => {
                c.path = path.to_path_buf();
                c.text = text;
                if found.is_empty() {
                    return Ok(c);
                }
                // A bad value has a stand-in, which must not be reported a second time (a
                // duplicate listener, say): the value's own problem is the one that counts.
                let bad: std::collections::HashSet<usize> = found.iter().map(|(span, _, _)| span.start).collect();
                let mut all: Vec<types::Found> = found
                    .into_iter()
                    .map(|(span, message, named)| match named {
                        types::Named::Itself => (span, message),
                        types::Named::BySection => {
                            let section = c.section_of(span.start);
                            (span, format!("{section}{message}"))
                        }
                    })
                    .collect();
                all.extend(c.check().into_iter().filter(|(span, _)| !bad.contains(&span.start)));
                Err(ConfigError::Invalid(c.located(all)))
            }
            (Err(e), _) => {
                let line = e.span().map(|s| line_of(&text, s.start)).unwrap_or(1);
                Err(ConfigError::Invalid(vec![Problem {
                    file: path.to_path_buf(),
                    line,
                    message: without_quoted_strings(e.message().trim()),
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

    pub fn destination(&self, name: &str) -> Option<&Destination> {
        self.destinations.iter().map(|d| d.get_ref()).find(|d| d.name.get_ref() == name)
    }

    pub fn identity(&self, name: &str) -> Option<&Identity> {
        self.identities.iter().map(|i| i.get_ref()).find(|i| i.name.get_ref() == name)
    }

    fn problem_at(&self, span: std::ops::Range<usize>, message: String) -> Problem {
        Problem { file: self.path.clone(), line: line_of(&self.text, span.start), message }
    }

    /// Every cross-reference problem in the file, in file order (bad values were refused by
    /// [`Config::parse`]).
    pub fn problems(&self) -> Vec<Problem> {
        self.located(self.check())
    }

    /// Settings that work but are probably not what the admin wants (a legacy-TLS listener
    /// with an ECDSA certificate, say), with their lines: `check` prints them, `run` and
    /// reload log them; none is refused.
    pub fn advice(&self) -> Vec<Problem> {
        self.located(self.advice_found())
    }

    /// Devices whose identity has never signed in, given the identities that have stored
    /// tokens (read from the data directory by `check`): warnings, with the device's line.
    pub fn sign_in_advice(&self, signed_in: &std::collections::HashSet<String>) -> Vec<Problem> {
        self.located(self.sign_in_advice_found(signed_in))
    }

    /// Problems with their lines, in file order.
    fn located(&self, found: Vec<types::Found>) -> Vec<Problem> {
        let mut out: Vec<Problem> = found.into_iter().map(|(span, message)| self.problem_at(span, message)).collect();
        out.sort_by_key(|p| p.line);
        out
    }

    /// The section a bad value at `offset` is in, as the start of its problem (`device "x": `):
    /// the closest `[[device]]` or `[[mailbox]]` header before it (a value of a device's or
    /// a mailbox's type appears in no other section). Other values name their key themselves.
    fn section_of(&self, offset: usize) -> String {
        let devices = self.devices.iter().map(|d| (d.span().start, "device", d.get_ref().name.get_ref()));
        let mailboxes = self.mailboxes.iter().map(|m| (m.span().start, "mailbox", m.get_ref().name.get_ref()));
        let others = self
            .listeners
            .iter()
            .map(|l| l.span().start)
            .chain(self.providers.iter().map(|p| p.span().start))
            .chain(self.identities.iter().map(|i| i.span().start))
            .filter(|&start| start <= offset)
            .max();
        devices
            .chain(mailboxes)
            .filter(|(start, _, _)| *start <= offset && others.is_none_or(|o| o < *start))
            .max_by_key(|(start, _, _)| *start)
            .map(|(_, kind, name)| format!("{kind} \"{name}\": "))
            .unwrap_or_default()
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

    /// A listener for the tests that need a whole relay (GOOD has none, so that tests can add theirs).
    const LISTENER: &str = "\n[[listener]]\nlisten = \"127.0.0.1:2525\"\n";

    #[test]
    fn legacy_tls_needs_tls_and_gets_advice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, kind| {
            let (c, k) = crate::certs::self_signed(&["relay.lan".into()], kind).expect("cert");
            std::fs::write(dir.path().join(format!("{name}.pem")), c).expect("write");
            std::fs::write(dir.path().join(format!("{name}-key.pem")), k).expect("write");
        };
        write("rsa", crate::certs::KeyType::Rsa);
        write("ec", crate::certs::KeyType::Ecdsa);
        let with = |listeners: &str| {
            let text = format!("{GOOD}\n{listeners}");
            Config::parse(&dir.path().join("config.toml"), text).expect("parses")
        };
        let listen = GOOD.lines().count() + 3; // an empty line, [[listener]], then listen
        let at = |line: usize| format!(":{line}:");
        let strings = |v: Vec<Problem>| v.iter().map(|p| p.to_string()).collect::<Vec<_>>();

        // Refused: nothing to relax.
        let c = with("[[listener]]\nlisten = \"192.168.1.5:2525\"\nlegacy_tls = true\n");
        let p = strings(c.problems());
        assert!(
            p.iter().any(|m| m.contains(&at(listen + 1)) && m.contains("legacy_tls = true but tls = \"none\"")),
            "{p:?}"
        );

        // Good: RSA, on the LAN, TLS before AUTH.
        let good = "[[listener]]\nlisten = \"192.168.1.5:2525\"\ntls = \"starttls\"\ncert = \"rsa.pem\"\nkey = \"rsa-key.pem\"\nlegacy_tls = true\nrequire_auth_tls = true\n";
        let c = with(good);
        assert_eq!(strings(c.problems()), Vec::<String>::new());
        assert_eq!(strings(c.advice()), Vec::<String>::new());
        assert!(*c.listeners[0].get_ref().legacy_tls.get_ref());

        // Works, with advice for each of the three.
        let c = with("[[listener]]\nlisten = \"0.0.0.0:465\"\ntls = \"implicit\"\ncert = \"ec.pem\"\nkey = \"ec-key.pem\"\nlegacy_tls = true\n");
        assert_eq!(strings(c.problems()), Vec::<String>::new());
        let a = strings(c.advice());
        assert_eq!(a.len(), 3, "{a:?}");
        assert!(
            a.iter()
                .any(|m| m.contains(&at(listen + 2)) && m.contains("without an RSA key") && m.contains("make-cert")),
            "{a:?}"
        );
        assert!(a.iter().any(|m| m.contains("require_auth_tls = true")), "{a:?}");
        assert!(a.iter().any(|m| m.contains(&at(listen)) && m.contains("beyond private ranges")), "{a:?}");
        // A default listener gets no such advice, whatever its certificate.
        let c = with(
            "[[listener]]\nlisten = \"0.0.0.0:465\"\ntls = \"implicit\"\ncert = \"ec.pem\"\nkey = \"ec-key.pem\"\n",
        );
        assert_eq!(strings(c.advice()), Vec::<String>::new());
    }

    #[test]
    fn good_config_has_no_problems() {
        assert_eq!(problems(&format!("{GOOD}{LISTENER}")), Vec::<String>::new());
    }

    #[test]
    fn references_and_cidrs_are_checked_with_lines() {
        let text = format!(
            "{GOOD}{LISTENER}\n[[device]]\nname = \"d2\"\nidentity = \"nope\"\naddresses = [\"300.1.1.1/32\"]\nusername = \"u\"\n\n[[device]]\nname = \"d2\"\nidentity = \"scans\"\naddresses = [\"10.1.1.1\"]\n"
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
[[listener]]
listen = "127.0.0.1:2525"
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
    fn every_bad_value_is_reported_at_once_with_its_section_and_line() {
        let text = format!(
            "{GOOD}\n[admin]\nlisten = \"localhost\"\n\n[[listener]]\nlisten = \"0.0.0.0:25:25\"\n\n[[listener]]\nlisten = \"0.0.0.0:26\"\ntls = \"implicit\"\n\n[[provider]]\nname = \"q\"\nkind = \"generic\"\nclient_id = \"c\"\ntoken_url = \"http://x/\"\nsmtp = \"mail.test\"\n\n[[device]]\nname = \"d3\"\nidentity = \"nobody\"\naddresses = [\"10.0.0.1/8\"]\nrecipients = [\"bob\"]\n\n[[mailbox]]\nname = \"m\"\nidentity = \"scans\"\nspool = \"s\"\nafter = \"archive\"\nsenders = [\"*@\"]\n"
        );
        let p = problems(&text);
        let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        let has = |needle: &str, message: &str| {
            assert!(
                p.iter().any(|m| m.contains(&format!(":{}:", line_of(needle))) && m.contains(message)),
                "{message} at {needle}: {p:?}"
            )
        };
        has("\"localhost\"", "admin.listen \"localhost\" is not an address:port");
        has("0.0.0.0:25:25", "listener \"0.0.0.0:25:25\" is not an address:port");
        has("0.0.0.0:26", "listener 0.0.0.0:26 has tls = \"implicit\" but no cert and key");
        has("\"mail.test\"", "\"mail.test\" is not host:port");
        has("10.0.0.1/8", "device \"d3\": \"10.0.0.1/8\" has host bits set; did you mean 10.0.0.0/8?");
        has("[\"bob\"]", "device \"d3\": recipient pattern \"bob\" should look like user@domain, *@domain or *");
        has("\"archive\"", "mailbox \"m\": after = \"archive\" should be delete, seen or move:<folder>");
        has("[\"*@\"]", "mailbox \"m\": sender pattern \"*@\" should look like user@domain, *@domain or *");
        // The cross-references of the rest come with them; stand-ins add nothing.
        has("\"nobody\"", "identity \"nobody\" is not defined");
        assert!(p.iter().any(|m| m.contains("mailbox \"m\": provider \"p\" has no imap")), "{p:?}");
        assert_eq!(p.len(), 10, "{p:?}");
    }

    #[test]
    fn values_arrive_typed() {
        let text = format!(
            "{GOOD}\nrecipients = [\"*@Contoso.com\"]\n\n[admin]\nlisten = \"[::1]:9000\"\n\n[[listener]]\nlisten = \"127.0.0.1:2525\"\ntls = \"starttls\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\n[[listener]]\nlisten = \"127.0.0.1:2526\"\ncert = \"c.pem\"\n\n[[mailbox]]\nname = \"m\"\nidentity = \"scans\"\nspool = \"s\"\nafter = \"move:Done\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.admin.listen.get_ref().port(), 9000);
        assert_eq!(c.admin.redirect_uri(), "http://localhost:9000/oauth/callback");
        let l = c.listeners[0].get_ref();
        assert_eq!(l.listen.get_ref().to_string(), "127.0.0.1:2525");
        match &l.tls {
            ListenerTls::StartTls { cert, key } => {
                assert_eq!(
                    (cert.get_ref().as_path(), key.get_ref().as_path()),
                    (Path::new("c.pem"), Path::new("k.pem"))
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(l.tls.mode(), TlsMode::Starttls);
        // A cert without tls is a plain listener, as before.
        assert_eq!(c.listeners[1].get_ref().tls, ListenerTls::None);
        let p = c.providers[0].get_ref();
        assert_eq!(p.smtp.as_ref().unwrap().get_ref(), &HostPort { host: "127.0.0.1".into(), port: 2 });
        let d = c.devices[0].get_ref();
        assert_eq!(d.addresses[1].get_ref().to_string(), "10.0.0.0/8");
        assert_eq!(d.recipients, Some(vec![AddressPattern::Domain("Contoso.com".into())]));
        assert_eq!(c.mailboxes[0].get_ref().after.get_ref(), &After::Move("Done".into()));
    }

    #[test]
    fn the_example_configuration_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(e) = Config::parse(&path, text) {
            panic!("{e}");
        }
    }

    #[test]
    fn the_example_destination_and_oversize_link_pass_check_when_uncommented() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let text = std::fs::read_to_string(&path).expect("example");
        let mut out = String::new();
        let mut in_destination = false;
        let mut uncommented = 0;
        for line in text.lines() {
            in_destination = (in_destination && !line.trim().is_empty()) || line == "# [[destination]]";
            let on =
                in_destination || line.starts_with("# oversize = ") || line.starts_with("# oversize_destination = ");
            match line.strip_prefix("# ").filter(|_| on) {
                Some(rest) => {
                    uncommented += 1;
                    out.push_str(rest);
                }
                None => out.push_str(line),
            }
            out.push('\n');
        }
        assert!(uncommented >= 12, "{uncommented} lines uncommented");
        let c = Config::parse(&path, out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.problems().iter().map(|p| p.to_string()).collect::<Vec<_>>(), Vec::<String>::new());
        let d = c.destination("finance").expect("the example destination");
        assert_eq!(d.folder.get_ref(), "Scans/{device}/{yyyy}-{MM}");
        assert_eq!(c.identity("scans").expect("scans").oversize(), Oversize::Link);
    }

    #[test]
    fn listener_keys_and_modes_keep_their_lines() {
        let p = problems("[[listener]]\nlisten = \"0.0.0.0:2525\"\ncertificate = \"c.pem\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains(":3:") && p[0].contains("certificate"), "{p:?}");
        let p = problems("[[listener]]\nlisten = \"0.0.0.0:2525\"\ntls = \"ssl\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains(":3:") && p[0].contains("ssl"), "{p:?}");
        let p = problems("[[listener]]\nlisten = 2525\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains(":2:"), "{p:?}");
    }

    fn advice(text: &str) -> Vec<String> {
        parse(text).expect("parses").advice().iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn a_string_in_the_wrong_place_is_not_quoted_back() {
        let secret = "https://hooks.slack.com/services/T0/B0/SECRETSECRET";
        let text = format!("{GOOD}\n[notify]\nwebhooks = [\"{secret}\"]\n");
        let p = problems(&text);
        assert!(!p.is_empty());
        assert!(p.iter().all(|m| !m.contains("SECRETSECRET")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("invalid type: string")), "{p:?}");
        assert_eq!(
            without_quoted_strings(r#"invalid type: string "a\"b", expected x"#),
            "invalid type: string, expected x"
        );
        assert_eq!(without_quoted_strings("expected a table"), "expected a table");
    }

    #[test]
    fn an_admin_listener_open_beyond_this_host_without_credentials_is_advised_against() {
        let open = advice(&format!("{GOOD}\n[admin]\nlisten = \"0.0.0.0:9925\"\n"));
        assert!(open.iter().any(|m| m.contains("asks for no credentials") && m.contains("admin.token")), "{open:?}");
        let with_token = advice(&format!("{GOOD}\n[admin]\nlisten = \"0.0.0.0:9925\"\ntoken = \"t\"\n"));
        assert!(!with_token.iter().any(|m| m.contains("asks for no credentials")), "{with_token:?}");
        let loopback = advice(&format!("{GOOD}\n[admin]\nlisten = \"127.0.0.1:9925\"\n"));
        assert!(!loopback.iter().any(|m| m.contains("asks for no credentials")), "{loopback:?}");
    }

    #[test]
    fn send_via_must_fit_the_provider_and_api_urls_must_be_https() {
        let with = |kind: &str, via: &str, extra: &str| {
            problems(&format!(
                "[relay]\nhostname = \"r.test\"\n[[listener]]\nlisten = \"127.0.0.1:2525\"\n\
                 [[provider]]\nname = \"p\"\nkind = \"{kind}\"\ntenant = \"t.test\"\nclient_id = \"c\"\nclient_secret = \"s\"\n{extra}\n\
                 [[identity]]\nname = \"scans\"\nprovider = \"p\"\nemail = \"scans@example.test\"\nflow = \"client_credentials\"\nsend_via = \"{via}\"\n\
                 [[device]]\nname = \"d1\"\nidentity = \"scans\"\naddresses = [\"10.0.0.0/8\"]\n"
            ))
        };
        assert_eq!(with("microsoft", "graph", ""), Vec::<String>::new());
        assert_eq!(with("microsoft", "smtp", ""), Vec::<String>::new());
        let p = with("google", "graph", "");
        assert!(p.iter().any(|m| m.contains("send_via = \"graph\" does not fit provider \"p\"")), "{p:?}");
        let p = with("microsoft", "gmail_api", "");
        assert!(p.iter().any(|m| m.contains("the Gmail API is for kind = \"google\"")), "{p:?}");
        let p = with("microsoft", "carrier_pigeon", "");
        assert!(p.iter().any(|m| m.contains("unknown variant")), "{p:?}");
        assert_eq!(with("microsoft", "graph", "graph_url = \"http://127.0.0.1:8080\""), Vec::<String>::new());
        let p = with("microsoft", "graph", "graph_url = \"http://graph.example.test\"");
        assert!(p.iter().any(|m| m.contains("graph_url must use https")), "{p:?}");
        let p = with("google", "gmail_api", "gmail_api_url = \"not a url\"");
        assert!(p.iter().any(|m| m.contains("gmail_api_url is not a URL")), "{p:?}");
    }

    #[test]
    fn an_empty_file_is_a_problem_not_an_ok() {
        for text in ["", "[relay]\nhostname = \"relay.test\"\n"] {
            let p = problems(text);
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(p[0].starts_with("/nonexistent/config.toml:1: no [[listener]]"), "{p:?}");
        }
        // A relay for mobile print alone needs no listener: only advice.
        let text = format!("{GOOD}\n[[mailbox]]\nname = \"m\"\nidentity = \"scans\"\nspool = \"s\"\n")
            .replace("smtp = \"127.0.0.1:2\"", "imap = \"127.0.0.1:2\"");
        assert_eq!(problems(&text), Vec::<String>::new());
        let a = advice(&text);
        assert!(a.iter().any(|m| m.contains("no [[listener]]: devices cannot send")), "{a:?}");
    }

    #[test]
    fn no_device_and_unused_identities_are_warnings() {
        let good = format!("{GOOD}{LISTENER}");
        assert_eq!(advice(&good), Vec::<String>::new());
        // No device: every connection would be refused.
        let start = GOOD.find("[[device]]").unwrap();
        let text = &format!("{}{LISTENER}", &GOOD[..start]);
        assert_eq!(problems(text), Vec::<String>::new());
        let a = advice(text);
        let line = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        assert!(
            a.iter().any(|m| m.contains(&format!(":{}:", line("127.0.0.1:2525"))) && m.contains("no [[device]]")),
            "{a:?}"
        );
        assert!(
            a.iter().any(|m| m.contains(&format!(":{}:", line("name = \"scans\"")))
                && m.contains("identity \"scans\" is used by no [[device]] or [[mailbox]]")),
            "{a:?}"
        );
        assert_eq!(a.len(), 2, "{a:?}");
        // An identity a mailbox uses is used.
        let text = format!("{good}\n[[identity]]\nname = \"print\"\nprovider = \"p\"\nemail = \"print@example.test\"\nflow = \"client_credentials\"\n");
        let a = advice(&text);
        assert!(a.len() == 1 && a[0].contains("identity \"print\" is used by no"), "{a:?}");
        let text = text.replace("smtp_tls = \"none\"", "smtp_tls = \"none\"\nimap = \"127.0.0.1:3\"")
            + "\n[[mailbox]]\nname = \"m\"\nidentity = \"print\"\nspool = \"s\"\n";
        assert_eq!(advice(&text), Vec::<String>::new());
    }

    #[test]
    fn devices_whose_identity_never_signed_in_are_warnings() {
        let text = GOOD.replace("flow = \"client_credentials\"", "flow = \"device_code\"");
        let c = parse(&text).unwrap();
        let none = std::collections::HashSet::new();
        let a: Vec<String> = c.sign_in_advice(&none).iter().map(|p| p.to_string()).collect();
        let line = text.lines().position(|l| l.contains("identity = \"scans\"")).unwrap() + 1;
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(
            a[0].contains(&format!(":{line}:"))
                && a[0].contains("device \"d1\": identity \"scans\" has never signed in")
                && a[0].contains("mfd-relay auth login scans"),
            "{a:?}"
        );
        let signed: std::collections::HashSet<String> = ["scans".to_string()].into();
        assert!(c.sign_in_advice(&signed).is_empty());
        // App-only identities need nobody's sign-in.
        assert!(parse(GOOD).unwrap().sign_in_advice(&none).is_empty());
    }

    #[test]
    fn notify_parses_and_its_mistakes_have_lines_without_the_secret() {
        let good = format!(
            "{GOOD}{LISTENER}\n[notify]\nemail = \"it@contoso.com\"\ncheck_every = \"1s\"\nwebhooks = [\n  {{ url = \"https://prod.logic.azure.com/workflows/x?sig=TOKEN1\", format = \"teams\" }},\n  {{ url = \"https://hooks.slack.com/services/T/B/TOKEN2\", format = \"slack\" }},\n  {{ url = \"http://127.0.0.1:8080/hook\" }},\n]\n"
        );
        assert_eq!(problems(&good), Vec::<String>::new());
        let c = parse(&good).unwrap();
        assert!(c.notify.enabled());
        assert_eq!(c.notify.check_every.get_ref().0, Duration::from_secs(1));
        assert_eq!(c.notify.remind_every.get_ref().0, Duration::from_secs(86400));
        let formats: Vec<_> = c.notify.webhooks.iter().map(|w| w.get_ref().format).collect();
        assert_eq!(formats, vec![WebhookFormat::Teams, WebhookFormat::Slack, WebhookFormat::Json]);
        assert!(!format!("{:?}", c.notify).contains("TOKEN"), "Debug shows hosts only");
        assert!(!parse(GOOD).unwrap().notify.enabled());

        let bad = format!(
            "{GOOD}{LISTENER}\n[notify]\nemail = \"IT <it@contoso.com>\"\ncheck_every = \"0s\"\nremind_every = \"10m\"\nwebhooks = [\n  {{ url = \"http://hooks.example.com/x?TOKEN3\" }},\n  {{ url = \"ftp://files.example.com/TOKEN4\", format = \"json\" }},\n  {{ url = \"not a url TOKEN5\" }},\n]\n"
        );
        let p = problems(&bad);
        let line_of = |needle: &str| bad.lines().position(|l| l.contains(needle)).unwrap() + 1;
        let has = |needle: &str, message: &str| {
            assert!(
                p.iter().any(|m| m.contains(&format!(":{}:", line_of(needle))) && m.contains(message)),
                "{message} at {needle}: {p:?}"
            )
        };
        has("IT <it@", "notify.email \"IT <it@contoso.com>\" is not a mail address");
        has("\"0s\"", "notify.check_every should be between 1s and 1h");
        has("\"10m\"", "notify.remind_every should be at least 1h");
        has("TOKEN3", "notify.webhooks: http://hooks.example.com must use https");
        has("TOKEN4", "url scheme \"ftp\" should be https");
        has("TOKEN5", "notify.webhooks: url is not a URL");
        assert_eq!(p.len(), 6, "{p:?}");
        assert!(p.iter().all(|m| !m.contains("TOKEN")), "a webhook URL is a secret: {p:?}");

        // A format name that does not exist, with its line.
        let text = format!(
            "{GOOD}{LISTENER}\n[notify]\nwebhooks = [{{ url = \"https://x.test/h\", format = \"discord\" }}]\n"
        );
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains(&format!(":{}:", line_of_text(&text, "discord"))) && p[0].contains("discord"), "{p:?}");
        // Mail needs someone to send it.
        let p = problems(&format!("{LISTENER}\n[notify]\nemail = \"it@contoso.com\"\n"));
        assert!(p.len() == 1 && p[0].contains("notify.email needs an [[identity]]"), "{p:?}");
    }

    fn line_of_text(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    /// A Microsoft and a Google identity for the destination tests, then `rest`.
    fn with_destinations(rest: &str) -> String {
        format!(
            "[relay]\nhostname = \"r.test\"\n[[listener]]\nlisten = \"127.0.0.1:2525\"\n\
             [[provider]]\nname = \"m365\"\nkind = \"microsoft\"\ntenant = \"t.test\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
             [[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
             [[identity]]\nname = \"scans\"\nprovider = \"m365\"\nemail = \"scans@contoso.test\"\nflow = \"client_credentials\"\n\
             [[identity]]\nname = \"gscans\"\nprovider = \"g\"\nemail = \"scans@gmail.test\"\nflow = \"auth_code\"\n\
             [[device]]\nname = \"d1\"\nidentity = \"scans\"\naddresses = [\"10.0.0.0/8\"]\n{rest}"
        )
    }

    /// The one problem of `text` (asserted alone), checked to be on the line of `needle`.
    fn one_problem_at(text: &str, needle: &str) -> String {
        let p = problems(text);
        assert_eq!(p.len(), 1, "{p:?}");
        let at = format!("/nonexistent/config.toml:{}: ", line_of_text(text, needle));
        assert!(p[0].starts_with(&at), "{at}\n{p:?}");
        p[0].clone()
    }

    const SHAREPOINT: &str = "\n[[destination]]\nname = \"finance\"\naddress = \"finance@scan.lan\"\nidentity = \"scans\"\n\
        kind = \"sharepoint\"\nsite = \"contoso.sharepoint.com:/sites/Finance\"\nlibrary = \"Documents\"\n\
        folder = \"Scans/{device}/{yyyy}-{MM}\"\nfile_name = \"{yyyy}{MM}{dd}-{HH}{mm}{ss}-{name}\"\nconflict = \"rename\"\n";

    #[test]
    fn good_destinations_have_no_problems() {
        let text = with_destinations(&format!(
            "{SHAREPOINT}\n[[destination]]\nname = \"me\"\naddress = \"me@scan.lan\"\nidentity = \"scans\"\nkind = \"onedrive\"\nuser = \"alice@contoso.test\"\n\
             \n[[destination]]\nname = \"drive\"\naddress = \"drive@scan.lan\"\nidentity = \"gscans\"\nkind = \"google_drive\"\nfolder_id = \"0AbC-d_9\"\n\
             conflict = \"fail\"\nreceipt = true\nsave_body = true\n\
             \n[[destination]]\nname = \"team\"\naddress = \"team@scan.lan\"\nidentity = \"scans\"\nkind = \"sharepoint\"\nsite = \"contoso.sharepoint.com:/teams/Ops/sub\"\n"
        ));
        assert_eq!(problems(&text), Vec::<String>::new());
        let c = parse(&text).expect("parses");
        let d = c.destination("drive").expect("drive");
        assert_eq!((*d.kind.get_ref(), d.conflict), (DestinationKind::GoogleDrive, Conflict::Fail));
        assert_eq!(d.file_name.get_ref(), "{yyyy}{MM}{dd}-{HH}{mm}{ss}-{name}", "the default");
    }

    #[test]
    fn destination_mistakes_are_caught_with_lines() {
        let sp = |from: &str, to: &str| with_destinations(&SHAREPOINT.replace(from, to));
        // Names and addresses.
        let text = with_destinations(&format!("{SHAREPOINT}{}", SHAREPOINT.replace("finance@", "other@")));
        let p = problems(&text);
        assert!(p.len() == 1 && p[0].contains("destination \"finance\" is defined twice"), "{p:?}");
        let text = with_destinations(&format!(
            "{SHAREPOINT}{}",
            SHAREPOINT.replace("\"finance\"", "\"f2\"").replace("finance@", "FINANCE@")
        ));
        let m = one_problem_at(&text, "FINANCE@scan.lan");
        assert!(m.contains("address \"FINANCE@scan.lan\" is already another destination's"), "{m}");
        let m = one_problem_at(&sp("finance@scan.lan", "finance"), "address = \"finance\"");
        assert!(m.contains("\"finance\" is not a mail address"), "{m}");
        let m = one_problem_at(&sp("finance@scan.lan", "Scans@Contoso.test"), "address = \"Scans@");
        assert!(m.contains("is the mail address of identity \"scans\""), "{m}");
        // The identity and its provider's kind.
        let m = one_problem_at(&sp("identity = \"scans\"\nkind", "identity = \"nobody\"\nkind"), "\"nobody\"");
        assert!(m.contains("destination \"finance\": identity \"nobody\" is not defined"), "{m}");
        let text = sp("identity = \"scans\"\nkind", "identity = \"gscans\"\nkind");
        let m = one_problem_at(&text, "kind = \"sharepoint\"");
        assert!(m.contains("kind = \"sharepoint\" needs a kind = \"microsoft\" provider, but identity \"gscans\" uses provider \"g\" (kind = \"google\")"), "{m}");
        // The keys of each kind.
        let m = one_problem_at(&sp("site = \"contoso.sharepoint.com:/sites/Finance\"\n", ""), "kind = \"sharepoint\"");
        assert!(m.contains("kind = \"sharepoint\" needs site"), "{m}");
        for bad in [
            "contoso.sharepoint.com/sites/Finance",
            "contoso.sharepoint.com:/Finance",
            "https://contoso.sharepoint.com:/sites/x",
            "contoso.sharepoint.com:/sites/",
        ] {
            let m = one_problem_at(&sp("contoso.sharepoint.com:/sites/Finance", bad), "site = ");
            assert!(m.contains("is not of the form host:/sites/name or host:/teams/name"), "{bad}: {m}");
        }
        let p = problems(&sp("kind = \"sharepoint\"", "kind = \"onedrive\""));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].contains("site is only for kind = \"sharepoint\"")
                && p[1].contains("library is only for kind = \"sharepoint\""),
            "{p:?}"
        );
        let m = one_problem_at(&sp("library = \"Documents\"", "user = \"a@contoso.test\""), "user = ");
        assert!(m.contains("user is only for kind = \"onedrive\""), "{m}");
        let m = one_problem_at(&sp("library = \"Documents\"", "folder_id = \"0AbC\""), "folder_id = ");
        assert!(m.contains("folder_id is only for kind = \"google_drive\""), "{m}");
        let drive = "\n[[destination]]\nname = \"drive\"\naddress = \"drive@scan.lan\"\nidentity = \"gscans\"\nkind = \"google_drive\"\nfolder_id = \"https://drive.google.com/drive/folders/0AbC\"\n";
        let m = one_problem_at(&with_destinations(drive), "folder_id = ");
        assert!(m.contains("is not a Drive folder id"), "{m}");
        let m = one_problem_at(&sp("kind = \"sharepoint\"", "kind = \"dropbox\""), "kind = \"dropbox\"");
        assert!(m.contains("unknown variant"), "{m}");
        // Templates.
        let m = one_problem_at(&sp("folder = \"Scans/{device}", "folder = \"Scans/{name}"), "folder = ");
        assert!(
            m.contains("destination \"finance\": folder: {name} is the attachment's own name, for file_name only"),
            "{m}"
        );
        let m = one_problem_at(&sp("{ss}-{name}", "{ss}-{nmae}"), "file_name = ");
        assert!(m.contains("destination \"finance\": file_name: unknown placeholder {nmae}"), "{m}");
        let m = one_problem_at(&sp("{ss}-{name}", "{ss}-{name"), "file_name = ");
        assert!(m.contains("file_name: unclosed {"), "{m}");
    }

    #[test]
    fn oversize_links_need_a_destination_and_drive_urls_a_google_provider() {
        let scans = "flow = \"client_credentials\"\n";
        let with = |extra: &str| with_destinations(SHAREPOINT).replacen(scans, &format!("{scans}{extra}"), 1);
        assert_eq!(problems(&with("oversize = \"link\"\noversize_destination = \"finance\"\n")), Vec::<String>::new());
        assert_eq!(problems(&with("oversize = \"refuse\"\n")), Vec::<String>::new());
        let text = with("oversize = \"link\"\n");
        let m = one_problem_at(&text, "oversize = ");
        assert!(m.contains("identity \"scans\": oversize = \"link\" needs oversize_destination"), "{m}");
        let text = with("oversize = \"link\"\noversize_destination = \"nowhere\"\n");
        let m = one_problem_at(&text, "oversize_destination = ");
        assert!(m.contains("oversize_destination \"nowhere\" is not a defined [[destination]]"), "{m}");
        for extra in
            ["oversize_destination = \"finance\"\n", "oversize = \"refuse\"\noversize_destination = \"finance\"\n"]
        {
            let text = with(extra);
            let m = one_problem_at(&text, "oversize_destination = ");
            assert!(m.contains("oversize_destination is only for oversize = \"link\""), "{m}");
        }
        // drive_api_url: like the other API URLs, and on Google providers only.
        let g = "kind = \"google\"\nclient_id = \"c\"\nclient_secret = \"s\"\n";
        let text = with_destinations("").replace(g, &format!("{g}drive_api_url = \"http://127.0.0.1:9\"\n"));
        assert_eq!(problems(&text), Vec::<String>::new());
        let text = with_destinations("").replace(g, &format!("{g}drive_api_url = \"http://drive.example.test\"\n"));
        let m = one_problem_at(&text, "drive_api_url");
        assert!(m.contains("provider \"g\": drive_api_url must use https"), "{m}");
        let ms = "tenant = \"t.test\"\n";
        let text = with_destinations("").replace(ms, &format!("{ms}drive_api_url = \"https://drive.example.test\"\n"));
        let m = one_problem_at(&text, "drive_api_url");
        assert!(m.contains("provider \"m365\": drive_api_url is only for kind = \"google\""), "{m}");
    }

    #[test]
    fn a_destination_no_device_may_send_to_is_advised_about() {
        let text = with_destinations(SHAREPOINT);
        let limited = text.replace(
            "addresses = [\"10.0.0.0/8\"]\n",
            "addresses = [\"10.0.0.0/8\"]\nrecipients = [\"*@contoso.test\"]\n",
        );
        let a = advice(&limited);
        let at = format!("/nonexistent/config.toml:{}: ", line_of_text(&limited, "address = \"finance@"));
        assert!(
            a.iter().any(|m| m.starts_with(&at)
                && m.contains("destination \"finance\": no [[device]]'s recipients list admits \"finance@scan.lan\"")),
            "{a:?}"
        );
        let admitted = limited.replace("\"*@contoso.test\"", "\"*@contoso.test\", \"*@scan.lan\"");
        assert!(!advice(&admitted).iter().any(|m| m.contains("recipients list admits")), "{:?}", advice(&admitted));
        assert!(
            !advice(&text).iter().any(|m| m.contains("recipients list admits")),
            "a device without a list admits any"
        );
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.data_dir(), PathBuf::from("/nonexistent/./data"));
        assert_eq!(c.resolve(Path::new("/abs")), PathBuf::from("/abs"));
    }
}
