//! Where each provider's endpoints and mail servers are, and which scopes to ask for.
//! Defaults follow the providers' documentation; every host can be overridden in config.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{Cloud, Config, Flow, HostPort, Provider, ProviderKind, SendVia, UpstreamTls};

/// What an access token is for. An Entra token is for one resource: an identity that reads
/// a mailbox over IMAP and sends through Graph holds one token of each, from the same grant.
/// Google's and generic providers' tokens carry every granted scope: they have only `Mail`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resource {
    /// Exchange Online (SMTP, IMAP) for Microsoft; the one token of a Google or generic identity.
    Mail,
    /// Microsoft Graph.
    Graph,
}

impl Resource {
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Mail => "mail",
            Resource::Graph => "graph",
        }
    }
}

/// Google Drive's scope: scan to folder (`[[destination]] kind = "google_drive"`).
pub const GOOGLE_DRIVE_SCOPE: &str = "https://www.googleapis.com/auth/drive";

/// What an identity's tokens are used for: they decide the resources and scopes it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Uses {
    /// How its mail goes upstream.
    pub send_via: SendVia,
    /// A `[[mailbox]]` reads it over IMAP.
    pub imap: bool,
    /// A `[[destination]]` saves files with it (SharePoint, OneDrive or Google Drive).
    pub files: bool,
}

impl Uses {
    /// Mail only: `send_via`, and IMAP when `imap`.
    pub fn mail(send_via: SendVia, imap: bool) -> Uses {
        Uses { send_via, imap, files: false }
    }

    /// What the configuration uses identity `name` for.
    pub fn of(config: &Config, name: &str) -> Uses {
        Uses {
            send_via: config.identity(name).map(|i| i.send_via()).unwrap_or_default(),
            imap: config.mailboxes.iter().any(|m| m.get_ref().identity.get_ref() == name),
            files: config.destinations.iter().any(|d| d.get_ref().identity.get_ref() == name),
        }
    }
}

/// A mail server address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Server {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
}

/// A provider with every endpoint resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderInfo {
    pub name: String,
    pub kind: ProviderKind,
    pub cloud: Cloud,
    pub client_id: String,
    pub token_url: String,
    pub device_url: Option<String>,
    pub authorize_url: Option<String>,
    pub smtp: Option<Server>,
    pub imap: Option<Server>,
    pub ca_file: Option<PathBuf>,
    pub client_secret: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub service_account_file: Option<PathBuf>,
    pub scopes: Option<Vec<String>>,
    /// Messages per minute per identity; `None` is unlimited.
    pub messages_per_minute: Option<u32>,
    pub max_message_size: Option<u64>,
    /// `max_message_size` is the admin's, not the kind's default: it overrides what the
    /// server advertises.
    pub size_configured: bool,
    /// Microsoft Graph's base URL, without a trailing slash (Microsoft providers).
    pub graph_url: Option<String>,
    /// The Gmail API's base URL, without a trailing slash (Google providers).
    pub gmail_api_url: Option<String>,
    /// Google Drive's base URL, without a trailing slash (Google providers).
    pub drive_api_url: Option<String>,
}

/// The Gmail API's limit on a message (`messages.send`, resumable upload).
pub const GMAIL_API_MAX: u64 = 35 * 1024 * 1024;

/// What the relay may add to a device's message before an API sends it (Received, Bcc).
const API_MARGIN: u64 = 64 * 1024;

/// Microsoft Graph's host in each national cloud, which is also its resource identifier in
/// scopes (the scopes stay these when `graph_url` points elsewhere, as in tests).
fn graph_host(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::Global => "https://graph.microsoft.com",
        Cloud::Usgov => "https://graph.microsoft.us",
        Cloud::UsgovDod => "https://dod-graph.microsoft.us",
        Cloud::China => "https://microsoftgraph.chinacloudapi.cn",
    }
}

/// Login host of a Microsoft cloud.
fn microsoft_login(cloud: Cloud) -> &'static str {
    match cloud {
        Cloud::Global => "login.microsoftonline.com",
        Cloud::Usgov | Cloud::UsgovDod => "login.microsoftonline.us",
        Cloud::China => "login.partner.microsoftonline.cn",
    }
}

/// (SMTP host, IMAP host, resource for scopes) of a Microsoft cloud: Microsoft's "Exchange
/// Online endpoints" per cloud. DoD has hosts of its own, not GCC High's.
fn microsoft_hosts(cloud: Cloud) -> (&'static str, &'static str, &'static str) {
    match cloud {
        Cloud::Global => ("smtp.office365.com", "outlook.office365.com", "https://outlook.office.com"),
        Cloud::Usgov => ("smtp.office365.us", "outlook.office365.us", "https://outlook.office365.us"),
        Cloud::UsgovDod => ("outlook-dod.office365.us", "outlook-dod.office365.us", "https://outlook-dod.office365.us"),
        Cloud::China => ("smtp.partner.outlook.cn", "partner.outlook.cn", "https://partner.outlook.cn"),
    }
}

/// The configured server (its security by `tls`, else by its port), else the default.
fn server(
    spec: Option<&HostPort>,
    tls: Option<UpstreamTls>,
    default: Option<(&str, u16, UpstreamTls)>,
) -> Option<Server> {
    match spec {
        Some(&HostPort { ref host, port }) => Some(Server {
            host: host.clone(),
            port,
            tls: tls.unwrap_or(if port == 465 || port == 993 { UpstreamTls::Implicit } else { UpstreamTls::Starttls }),
        }),
        None => default.map(|(h, p, t)| Server { host: h.into(), port: p, tls: tls.unwrap_or(t) }),
    }
}

impl ProviderInfo {
    /// Resolves a provider section of a validated configuration.
    pub fn from_config(config: &Config, p: &Provider) -> ProviderInfo {
        let tenant = p.tenant.clone().unwrap_or_else(|| "organizations".into());
        let (token, device, authorize, smtp_default, imap_default) = match p.kind {
            ProviderKind::Microsoft => {
                let base = format!("https://{}/{}/oauth2/v2.0", microsoft_login(p.cloud), tenant);
                let (smtp, imap, _) = microsoft_hosts(p.cloud);
                (
                    Some(format!("{base}/token")),
                    Some(format!("{base}/devicecode")),
                    Some(format!("{base}/authorize")),
                    Some((smtp, 587, UpstreamTls::Starttls)),
                    Some((imap, 993, UpstreamTls::Implicit)),
                )
            }
            ProviderKind::Google => (
                Some("https://oauth2.googleapis.com/token".to_string()),
                Some("https://oauth2.googleapis.com/device/code".to_string()),
                Some("https://accounts.google.com/o/oauth2/v2/auth".to_string()),
                Some(("smtp.gmail.com", 587, UpstreamTls::Starttls)),
                Some(("imap.gmail.com", 993, UpstreamTls::Implicit)),
            ),
            ProviderKind::Generic => (None, None, None, None, None),
        };
        let (messages_per_minute, max_message_size) = match p.kind {
            // Exchange Online: 30 messages a minute per mailbox, 35 MB by default.
            ProviderKind::Microsoft => (Some(30), Some(35 * 1024 * 1024)),
            // Gmail: 25 MB per message.
            ProviderKind::Google => (None, Some(25 * 1024 * 1024)),
            ProviderKind::Generic => (None, None),
        };
        let path = |f: &Option<toml::Spanned<PathBuf>>| f.as_ref().map(|f| config.resolve(f.get_ref()));
        ProviderInfo {
            name: p.name.get_ref().clone(),
            kind: p.kind,
            cloud: p.cloud,
            client_id: p.client_id.clone(),
            token_url: p.token_url.clone().or(token).unwrap_or_default(),
            device_url: p.device_authorization_url.clone().or(device),
            authorize_url: p.authorization_url.clone().or(authorize),
            smtp: server(p.smtp.as_ref().map(|s| s.get_ref()), p.smtp_tls, smtp_default),
            imap: server(p.imap.as_ref().map(|s| s.get_ref()), p.imap_tls, imap_default),
            ca_file: path(&p.ca_file),
            client_secret: p.client_secret.clone(),
            client_secret_file: path(&p.client_secret_file),
            client_certificate: path(&p.client_certificate),
            client_key: path(&p.client_key),
            service_account_file: path(&p.service_account_file),
            scopes: p.scopes.clone(),
            messages_per_minute: p.messages_per_minute.or(messages_per_minute).filter(|n| *n > 0),
            max_message_size: p.max_message_size.map(|s| s.0).or(max_message_size),
            size_configured: p.max_message_size.is_some(),
            graph_url: p
                .graph_url
                .as_ref()
                .map(|u| u.get_ref().clone())
                .or_else(|| (p.kind == ProviderKind::Microsoft).then(|| graph_host(p.cloud).to_string()))
                .map(|u| u.trim_end_matches('/').to_string()),
            gmail_api_url: p
                .gmail_api_url
                .as_ref()
                .map(|u| u.get_ref().clone())
                .or_else(|| (p.kind == ProviderKind::Google).then(|| "https://gmail.googleapis.com".to_string()))
                .map(|u| u.trim_end_matches('/').to_string()),
            drive_api_url: p
                .drive_api_url
                .as_ref()
                .map(|u| u.get_ref().clone())
                .or_else(|| (p.kind == ProviderKind::Google).then(|| "https://www.googleapis.com".to_string()))
                .map(|u| u.trim_end_matches('/').to_string()),
        }
    }

    /// The largest message to accept for this provider: the configured `max_message_size`;
    /// else the SIZE its server advertised in EHLO (RFC 1870; Gmail: 35882577, more than the
    /// 25 MiB default), for Microsoft never above the 35 MiB default, because Exchange Online
    /// advertises its tenant-wide maximum (150 MB) while a mailbox takes 35 MB unless its admin
    /// raised it; else the kind's default.
    pub fn size_limit(&self, advertised: Option<u64>) -> Option<u64> {
        if self.size_configured {
            return self.max_message_size;
        }
        match (advertised, self.kind) {
            (Some(a), ProviderKind::Microsoft) => Some(self.max_message_size.map_or(a, |d| d.min(a))),
            (Some(a), _) => Some(a),
            (None, _) => self.max_message_size,
        }
    }

    /// The largest message (as a device sends it) to accept for an identity that sends through
    /// an HTTP API: the configured `max_message_size`, else the API's own limit.
    /// - Graph takes attachments up to 150 MB, but Exchange still holds the message to the
    ///   mailbox's MaxSendSize (35 MB by default, counted on the encoded message, so a 30 MB
    ///   scan, ~41 MB of MIME, needs it raised): the provider's `max_message_size` says what
    ///   the tenant allows, 35 MiB by default.
    /// - The Gmail API takes at most 35 MiB of raw message.
    ///
    /// What goes out is a little larger than what the device sent (the relay's Received
    /// field, a Bcc for envelope-only recipients), so the Gmail API's limit keeps a margin, and
    /// a configured size never goes above it.
    pub fn api_size_limit(&self, via: SendVia) -> Option<u64> {
        let gmail = GMAIL_API_MAX - API_MARGIN;
        match (via, self.size_configured) {
            (SendVia::GmailApi, true) => self.max_message_size.map(|m| m.min(gmail)),
            (SendVia::GmailApi, false) => Some(gmail),
            (_, true) => self.max_message_size,
            (SendVia::Graph, false) => self.max_message_size,
            (SendVia::Smtp, false) => self.size_limit(None),
        }
    }

    /// What `mfd-relay check --explain` prints for this provider: every endpoint as resolved
    /// (defaults for its kind and cloud, or the overrides), so an admin can compare them with
    /// the tenant's.
    pub fn explain(&self) -> Vec<String> {
        let server = |s: &Option<Server>| match s {
            Some(s) => format!("{}:{} ({})", s.host, s.port, upstream_tls_name(s.tls)),
            None => "none".into(),
        };
        let mut out = vec![
            format!("provider \"{}\" ({:?}, cloud {:?})", self.name, self.kind, self.cloud),
            format!("  token:         {}", self.token_url),
        ];
        if let Some(u) = &self.device_url {
            out.push(format!("  device code:   {u}"));
        }
        if let Some(u) = &self.authorize_url {
            out.push(format!("  authorize:     {u}"));
        }
        out.push(format!("  smtp:          {}", server(&self.smtp)));
        out.push(format!("  imap:          {}", server(&self.imap)));
        if let Some(n) = self.messages_per_minute {
            out.push(format!("  per identity:  {n} messages a minute"));
        }
        if let Some(n) = self.max_message_size {
            out.push(format!("  message size:  {n} bytes at most"));
        }
        out
    }

    /// The scopes an identity with this flow asks for at sign-in when it sends over SMTP
    /// (`imap`: a mailbox uses it too). See [`ProviderInfo::sign_in_scopes`].
    pub fn scopes(&self, flow: Flow, imap: bool) -> Vec<String> {
        self.sign_in_scopes(flow, Uses::mail(SendVia::Smtp, imap))
    }

    /// The resources an identity needs tokens for, its sign-in resource first. Microsoft:
    /// `Mail` (Exchange Online) when it sends over SMTP or a mailbox reads over IMAP, `Graph`
    /// when it sends through Graph or saves to a SharePoint or OneDrive destination. Google
    /// and generic providers: one token, `Mail`.
    pub fn resources(&self, uses: Uses) -> Vec<Resource> {
        if self.kind != ProviderKind::Microsoft {
            return vec![Resource::Mail];
        }
        let mut v = Vec::new();
        if uses.send_via != SendVia::Graph || uses.imap {
            v.push(Resource::Mail);
        }
        if uses.send_via == SendVia::Graph || uses.files {
            v.push(Resource::Graph);
        }
        v
    }

    /// The scopes of one resource's token, as a token request names them (refresh, client
    /// credentials, service account): never more than one resource, since Entra refuses a
    /// token request that spans several (AADSTS28000). A configured `scopes` replaces the
    /// `Mail` resource's.
    pub fn resource_scopes(&self, flow: Flow, resource: Resource, uses: Uses) -> Vec<String> {
        let Uses { send_via, imap, files } = uses;
        let app_only = matches!(flow, Flow::ClientCredentials | Flow::ServiceAccount);
        match (self.kind, resource) {
            (_, Resource::Mail) if self.scopes.is_some() => {
                let mut v = self.scopes.clone().unwrap_or_default();
                // Google's one token also saves the files of its destinations.
                if files && self.kind == ProviderKind::Google && !v.iter().any(|s| s == GOOGLE_DRIVE_SCOPE) {
                    v.push(GOOGLE_DRIVE_SCOPE.into());
                }
                v
            }
            (ProviderKind::Microsoft, Resource::Graph) => {
                let graph = graph_host(self.cloud);
                if app_only {
                    // App-only: Graph's .default; Mail.Send (and Mail.ReadWrite) come from the
                    // app registration, limited to mailboxes by Exchange RBAC for Applications.
                    vec![format!("{graph}/.default")]
                } else {
                    let mut v = Vec::new();
                    if send_via == SendVia::Graph {
                        // Mail.ReadWrite: a scan over Graph's request limit goes through a draft.
                        v.extend([format!("{graph}/Mail.Send"), format!("{graph}/Mail.ReadWrite")]);
                    }
                    if files {
                        // Scan to folder: the signed-in user's own rights on the library or
                        // OneDrive bound what the relay may write.
                        v.extend([format!("{graph}/Files.ReadWrite.All"), format!("{graph}/Sites.ReadWrite.All")]);
                    }
                    v.push("offline_access".into());
                    v
                }
            }
            (ProviderKind::Microsoft, Resource::Mail) => {
                let (_, _, resource) = microsoft_hosts(self.cloud);
                if app_only {
                    // App-only: the .default scope of Exchange Online; the app's rights
                    // (SMTP.SendAsApp, IMAP.AccessAsApp) come from the app registration.
                    let app_resource =
                        if self.cloud == Cloud::Global { "https://outlook.office365.com" } else { resource };
                    vec![format!("{app_resource}/.default")]
                } else {
                    let mut v = Vec::new();
                    if send_via == SendVia::Smtp {
                        v.push(format!("{resource}/SMTP.Send"));
                    }
                    if imap {
                        v.push(format!("{resource}/IMAP.AccessAsUser.All"));
                    }
                    v.push("offline_access".into());
                    v
                }
            }
            // Gmail's full scope is "restricted" (a security review for public apps); an
            // identity that only sends through the Gmail API does with the "sensitive"
            // gmail.send, service accounts with domain-wide delegation too.
            (ProviderKind::Google, _) => {
                let mut v = if send_via == SendVia::GmailApi && !imap {
                    vec!["https://www.googleapis.com/auth/gmail.send".to_string()]
                } else {
                    vec!["https://mail.google.com/".to_string()]
                };
                if files {
                    // Scan to folder on Google Drive (shared drives too).
                    v.push(GOOGLE_DRIVE_SCOPE.into());
                }
                v
            }
            _ => Vec::new(),
        }
    }

    /// The scopes an interactive sign-in asks consent for: every resource's at once (one
    /// consent screen, one refresh token for them all), then, for Microsoft, `offline_access`
    /// and the OpenID scopes: an ID token names who signed in (a delegate of a shared mailbox
    /// signs in as themselves; XOAUTH2 needs that account). The token the sign-in returns is
    /// for the first resource named, the identity's sign-in resource. App-only flows ask for
    /// their first resource's scopes.
    pub fn sign_in_scopes(&self, flow: Flow, uses: Uses) -> Vec<String> {
        let resources = self.resources(uses);
        if matches!(flow, Flow::ClientCredentials | Flow::ServiceAccount) {
            return resources.first().map(|r| self.resource_scopes(flow, *r, uses)).unwrap_or_default();
        }
        let all: Vec<String> = resources.iter().flat_map(|r| self.resource_scopes(flow, *r, uses)).collect();
        let oidc = |s: &str| matches!(s, "offline_access" | "openid" | "profile" | "email");
        let mut v: Vec<String> = all.iter().filter(|s| !oidc(s)).cloned().collect();
        v.extend(all.iter().filter(|s| oidc(s)).cloned());
        if self.kind == ProviderKind::Microsoft && self.scopes.is_none() {
            v.extend(["offline_access", "openid", "profile"].map(String::from));
        }
        let mut seen = std::collections::HashSet::new();
        v.retain(|s| seen.insert(s.clone()));
        v
    }
}

/// `mfd-relay check --explain`: each provider's resolved endpoints, then each of its
/// identities with the scopes it asks for (a mailbox's identity asks for IMAP too).
pub fn explain_config(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for p in &config.providers {
        let info = ProviderInfo::from_config(config, p.get_ref());
        out.extend(info.explain());
        for id in config.identities.iter().map(|i| i.get_ref()).filter(|i| i.provider.get_ref() == &info.name) {
            let name = id.name.get_ref();
            let uses = Uses::of(config, name);
            let (flow, send_via) = (*id.flow.get_ref(), uses.send_via);
            out.push(format!(
                "  identity \"{name}\" ({flow}, {}): scopes {}",
                id.email.get_ref(),
                info.sign_in_scopes(flow, uses).join(" ")
            ));
            let resources = info.resources(uses);
            if resources.len() > 1 || resources.contains(&Resource::Graph) {
                // One token per resource: Entra issues none for two at once.
                for r in resources {
                    out.push(format!("    {} token: {}", r.as_str(), info.resource_scopes(flow, r, uses).join(" ")));
                }
            }
            if send_via == SendVia::Graph && !matches!(flow, Flow::ClientCredentials | Flow::ServiceAccount) {
                out.push(
                    "    Mail.ReadWrite: a scan larger than Graph's 4 MB request limit is sent through a draft".into(),
                );
            } else if send_via == SendVia::Graph {
                out.push(
                    "    the app needs Mail.Send, and Mail.ReadWrite for scans larger than 4 MB (sent through a draft)"
                        .into(),
                );
            }
        }
    }
    out
}

fn upstream_tls_name(tls: UpstreamTls) -> &'static str {
    match tls {
        UpstreamTls::None => "plain",
        UpstreamTls::Starttls => "STARTTLS",
        UpstreamTls::Implicit => "implicit TLS",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn info(provider: &str) -> ProviderInfo {
        let c = Config::parse(Path::new("/etc/mfd/c.toml"), provider.to_string()).unwrap();
        ProviderInfo::from_config(&c, c.providers[0].get_ref())
    }

    #[test]
    fn microsoft_global_defaults() {
        let p = info("[[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"contoso.onmicrosoft.com\"\nclient_id = \"x\"\n");
        assert_eq!(p.token_url, "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token");
        assert_eq!(
            p.device_url.as_deref(),
            Some("https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/devicecode")
        );
        assert_eq!(p.smtp, Some(Server { host: "smtp.office365.com".into(), port: 587, tls: UpstreamTls::Starttls }));
        assert_eq!(
            p.imap,
            Some(Server { host: "outlook.office365.com".into(), port: 993, tls: UpstreamTls::Implicit })
        );
        assert_eq!(p.messages_per_minute, Some(30));
        assert_eq!(
            p.scopes(Flow::DeviceCode, true),
            vec![
                "https://outlook.office.com/SMTP.Send",
                "https://outlook.office.com/IMAP.AccessAsUser.All",
                "offline_access",
                "openid",
                "profile"
            ]
        );
        assert_eq!(p.scopes(Flow::ClientCredentials, false), vec!["https://outlook.office365.com/.default"]);
    }

    #[test]
    fn the_size_limit_is_the_admins_else_the_servers_else_the_default() {
        let ms = info("[[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"t\"\nclient_id = \"x\"\n");
        let mib35 = 35 * 1024 * 1024;
        // Exchange advertises its tenant-wide maximum: it only ever lowers the default.
        assert_eq!(ms.size_limit(Some(157_286_400)), Some(mib35));
        assert_eq!(ms.size_limit(Some(10_000_000)), Some(10_000_000));
        assert_eq!(ms.size_limit(None), Some(mib35));
        // The admin's value wins over both.
        let raised = info("[[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"t\"\nclient_id = \"x\"\nmax_message_size = \"150MB\"\n");
        assert_eq!(raised.size_limit(Some(157_286_400)), Some(150_000_000));
        let g = info("[[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"x\"\nmax_message_size = \"20MB\"\n");
        assert_eq!(g.size_limit(Some(35_882_577)), Some(20_000_000));
        // A generic server: whatever it advertises.
        let t = info("[[provider]]\nname = \"t\"\nkind = \"generic\"\nclient_id = \"x\"\ntoken_url = \"http://127.0.0.1:9/t\"\nsmtp = \"127.0.0.1:2526\"\n");
        assert_eq!((t.size_limit(None), t.size_limit(Some(1000))), (None, Some(1000)));
    }

    #[test]
    fn microsoft_national_clouds_and_overrides() {
        let p = info("[[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"t\"\ncloud = \"usgov-dod\"\nclient_id = \"x\"\nsmtp = \"smtp-dod.example:587\"\n");
        assert!(p.token_url.starts_with("https://login.microsoftonline.us/t/"));
        assert_eq!(p.smtp.as_ref().map(|s| s.host.as_str()), Some("smtp-dod.example"));
        assert_eq!(p.imap.as_ref().map(|s| s.host.as_str()), Some("outlook-dod.office365.us"));
        assert_eq!(p.scopes(Flow::DeviceCode, false)[0], "https://outlook-dod.office365.us/SMTP.Send");
        assert_eq!(p.scopes(Flow::ClientCredentials, false), vec!["https://outlook-dod.office365.us/.default"]);
        // GCC High.
        let p = info(
            "[[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"t\"\ncloud = \"usgov\"\nclient_id = \"x\"\n",
        );
        assert_eq!(p.smtp.as_ref().map(|s| (s.host.as_str(), s.port)), Some(("smtp.office365.us", 587)));
        assert_eq!(p.imap.as_ref().map(|s| (s.host.as_str(), s.port)), Some(("outlook.office365.us", 993)));
        assert_eq!(p.scopes(Flow::AuthCode, true)[1], "https://outlook.office365.us/IMAP.AccessAsUser.All");
        let p = info(
            "[[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"t\"\ncloud = \"china\"\nclient_id = \"x\"\n",
        );
        assert!(p.token_url.starts_with("https://login.partner.microsoftonline.cn/t/"));
        assert_eq!(p.smtp.as_ref().map(|s| (s.host.as_str(), s.port)), Some(("smtp.partner.outlook.cn", 587)));
        assert_eq!(p.imap.as_ref().map(|s| (s.host.as_str(), s.port)), Some(("partner.outlook.cn", 993)));
        assert_eq!(p.scopes(Flow::DeviceCode, false)[0], "https://partner.outlook.cn/SMTP.Send");
        let explained = p.explain().join("\n");
        assert!(explained.contains("smtp:          smtp.partner.outlook.cn:587 (STARTTLS)"), "{explained}");
        assert!(
            explained.contains("token:         https://login.partner.microsoftonline.cn/t/oauth2/v2.0/token"),
            "{explained}"
        );
    }

    const MS: &str = "[[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"t\"\nclient_id = \"x\"\n";

    #[test]
    fn microsoft_resources_and_their_scopes() {
        let p = info(MS);
        // SMTP only: one resource, as before.
        assert_eq!(p.resources(Uses::mail(SendVia::Smtp, false)), vec![Resource::Mail]);
        assert_eq!(p.resources(Uses::mail(SendVia::Smtp, true)), vec![Resource::Mail]);
        // Graph only; Graph and a mailbox: Mail first (the sign-in resource), then Graph.
        assert_eq!(p.resources(Uses::mail(SendVia::Graph, false)), vec![Resource::Graph]);
        assert_eq!(p.resources(Uses::mail(SendVia::Graph, true)), vec![Resource::Mail, Resource::Graph]);
        let (dc, cc) = (Flow::DeviceCode, Flow::ClientCredentials);
        assert_eq!(
            p.resource_scopes(dc, Resource::Graph, Uses::mail(SendVia::Graph, true)),
            vec![
                "https://graph.microsoft.com/Mail.Send",
                "https://graph.microsoft.com/Mail.ReadWrite",
                "offline_access"
            ]
        );
        // The mail servers' token of a Graph sender reads the mailbox and sends nothing.
        assert_eq!(
            p.resource_scopes(dc, Resource::Mail, Uses::mail(SendVia::Graph, true)),
            vec!["https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"]
        );
        // The sign-in asks consent for both resources at once, its first scope names the
        // sign-in resource.
        assert_eq!(
            p.sign_in_scopes(Flow::AuthCode, Uses::mail(SendVia::Graph, true)),
            vec![
                "https://outlook.office.com/IMAP.AccessAsUser.All",
                "https://graph.microsoft.com/Mail.Send",
                "https://graph.microsoft.com/Mail.ReadWrite",
                "offline_access",
                "openid",
                "profile"
            ]
        );
        assert_eq!(p.sign_in_scopes(dc, Uses::mail(SendVia::Graph, false))[0], "https://graph.microsoft.com/Mail.Send");
        // The SMTP sign-in is unchanged.
        assert_eq!(p.sign_in_scopes(dc, Uses::mail(SendVia::Smtp, true)), p.scopes(dc, true));
        // App-only: each resource's .default, asked for separately.
        assert_eq!(
            p.resource_scopes(cc, Resource::Graph, Uses::mail(SendVia::Graph, true)),
            vec!["https://graph.microsoft.com/.default"]
        );
        assert_eq!(
            p.resource_scopes(cc, Resource::Mail, Uses::mail(SendVia::Graph, true)),
            vec!["https://outlook.office365.com/.default"]
        );
        assert_eq!(
            p.sign_in_scopes(cc, Uses::mail(SendVia::Graph, false)),
            vec!["https://graph.microsoft.com/.default"]
        );
    }

    #[test]
    fn graph_scopes_name_each_cloud_s_resource_not_the_graph_url() {
        for (cloud, graph) in [
            ("global", "https://graph.microsoft.com"),
            ("usgov", "https://graph.microsoft.us"),
            ("usgov-dod", "https://dod-graph.microsoft.us"),
            ("china", "https://microsoftgraph.chinacloudapi.cn"),
        ] {
            // graph_url points at a fake: the scopes stay the cloud's.
            let p = info(&format!("{MS}cloud = \"{cloud}\"\ngraph_url = \"http://127.0.0.1:9/\"\n"));
            assert_eq!(p.graph_url.as_deref(), Some("http://127.0.0.1:9"));
            assert_eq!(
                p.resource_scopes(Flow::DeviceCode, Resource::Graph, Uses::mail(SendVia::Graph, false)),
                vec![format!("{graph}/Mail.Send"), format!("{graph}/Mail.ReadWrite"), "offline_access".into()],
                "{cloud}"
            );
            assert_eq!(
                p.resource_scopes(Flow::ClientCredentials, Resource::Graph, Uses::mail(SendVia::Graph, false)),
                vec![format!("{graph}/.default")],
                "{cloud}"
            );
        }
    }

    #[test]
    fn configured_scopes_replace_the_mail_resource_s_only() {
        let p =
            info(&format!("{MS}scopes = [\"https://outlook.office.com/IMAP.AccessAsUser.All\", \"offline_access\"]\n"));
        assert_eq!(
            p.resource_scopes(Flow::DeviceCode, Resource::Mail, Uses::mail(SendVia::Graph, true)),
            vec!["https://outlook.office.com/IMAP.AccessAsUser.All", "offline_access"]
        );
        assert_eq!(
            p.resource_scopes(Flow::DeviceCode, Resource::Graph, Uses::mail(SendVia::Graph, true))[0],
            "https://graph.microsoft.com/Mail.Send"
        );
    }

    #[test]
    fn an_identity_that_saves_files_asks_for_the_drive_scopes_of_its_provider() {
        let files = |send_via| Uses { send_via, imap: false, files: true };
        let m = info(MS);
        // SMTP mail plus SharePoint: a mail token and a Graph token.
        assert_eq!(m.resources(files(SendVia::Smtp)), vec![Resource::Mail, Resource::Graph]);
        assert_eq!(
            m.resource_scopes(Flow::DeviceCode, Resource::Graph, files(SendVia::Smtp)),
            vec![
                "https://graph.microsoft.com/Files.ReadWrite.All",
                "https://graph.microsoft.com/Sites.ReadWrite.All",
                "offline_access"
            ]
        );
        // Graph mail and files share the one Graph token.
        let both = m.resource_scopes(Flow::AuthCode, Resource::Graph, files(SendVia::Graph));
        assert!(
            both.iter().any(|s| s.ends_with("/Mail.Send")) && both.iter().any(|s| s.ends_with("/Files.ReadWrite.All"))
        );
        // App-only: Graph's .default carries what the app was granted (Sites.Selected).
        assert_eq!(
            m.resource_scopes(Flow::ClientCredentials, Resource::Graph, files(SendVia::Smtp)),
            vec!["https://graph.microsoft.com/.default"]
        );
        // Without destinations nothing changes.
        assert_eq!(m.resources(Uses::mail(SendVia::Smtp, false)), vec![Resource::Mail]);
        let g = info("[[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"x\"\n");
        assert_eq!(
            g.sign_in_scopes(Flow::ServiceAccount, files(SendVia::Smtp)),
            vec!["https://mail.google.com/", GOOGLE_DRIVE_SCOPE]
        );
        assert_eq!(
            g.sign_in_scopes(Flow::AuthCode, files(SendVia::GmailApi)),
            vec!["https://www.googleapis.com/auth/gmail.send", GOOGLE_DRIVE_SCOPE]
        );
    }

    #[test]
    fn google_sends_through_the_gmail_api_with_gmail_send_only() {
        let p = info("[[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"x\"\n");
        assert_eq!(p.resources(Uses::mail(SendVia::GmailApi, true)), vec![Resource::Mail]);
        for flow in [Flow::AuthCode, Flow::ServiceAccount] {
            assert_eq!(
                p.sign_in_scopes(flow, Uses::mail(SendVia::GmailApi, false)),
                vec!["https://www.googleapis.com/auth/gmail.send"],
                "{flow}"
            );
            // A mailbox read over IMAP needs the full scope.
            assert_eq!(p.sign_in_scopes(flow, Uses::mail(SendVia::GmailApi, true)), vec!["https://mail.google.com/"]);
            assert_eq!(p.sign_in_scopes(flow, Uses::mail(SendVia::Smtp, false)), vec!["https://mail.google.com/"]);
        }
    }

    #[test]
    fn explain_lists_each_resource_s_token_and_why_mail_read_write() {
        let text = format!(
            "{MS}cloud = \"usgov\"\n\n[[identity]]\nname = \"scans\"\nprovider = \"m\"\nemail = \"s@c.us\"\n\
             flow = \"device_code\"\nsend_via = \"graph\"\n\n[[mailbox]]\nname = \"p\"\nidentity = \"scans\"\nspool = \"s\"\n"
        );
        let c = Config::parse(Path::new("/etc/mfd/c.toml"), text).unwrap();
        let out = explain_config(&c).join("\n");
        for line in [
            "identity \"scans\" (device_code, s@c.us): scopes https://outlook.office365.us/IMAP.AccessAsUser.All \
             https://graph.microsoft.us/Mail.Send https://graph.microsoft.us/Mail.ReadWrite offline_access openid profile",
            "    mail token: https://outlook.office365.us/IMAP.AccessAsUser.All offline_access",
            "    graph token: https://graph.microsoft.us/Mail.Send https://graph.microsoft.us/Mail.ReadWrite offline_access",
            "Mail.ReadWrite: a scan larger than Graph's 4 MB request limit is sent through a draft",
        ] {
            assert!(out.contains(line), "{line}\n{out}");
        }
    }

    #[test]
    fn api_identities_are_told_the_api_s_limit_never_more() {
        let g = info("[[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"x\"\n");
        let gmail = GMAIL_API_MAX - API_MARGIN;
        assert_eq!(g.api_size_limit(SendVia::GmailApi), Some(gmail));
        let big =
            info("[[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"x\"\nmax_message_size = \"50MB\"\n");
        assert_eq!(big.api_size_limit(SendVia::GmailApi), Some(gmail), "a configured size above the API's is capped");
        let small =
            info("[[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"x\"\nmax_message_size = \"10MB\"\n");
        assert_eq!(small.api_size_limit(SendVia::GmailApi), Some(10_000_000));
        let m = info("[[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"t\"\nclient_id = \"x\"\n");
        // Exchange's default MaxSendSize, on the encoded message, whatever the path.
        assert_eq!(m.api_size_limit(SendVia::Graph), Some(35 * 1024 * 1024));
        let raised = info("[[provider]]\nname = \"m\"\nkind = \"microsoft\"\ntenant = \"t\"\nclient_id = \"x\"\nmax_message_size = \"150MB\"\n");
        assert_eq!(raised.api_size_limit(SendVia::Graph), Some(150_000_000));
    }

    #[test]
    fn google_and_generic() {
        let p = info("[[provider]]\nname = \"g\"\nkind = \"google\"\nclient_id = \"x\"\n");
        assert_eq!(p.token_url, "https://oauth2.googleapis.com/token");
        assert_eq!(p.smtp.as_ref().unwrap().host, "smtp.gmail.com");
        assert_eq!(p.scopes(Flow::AuthCode, true), vec!["https://mail.google.com/"]);
        assert_eq!(p.max_message_size, Some(25 * 1024 * 1024));
        // Gmail advertises more than the 25 MiB default: that counts, once seen.
        assert_eq!(p.size_limit(None), Some(25 * 1024 * 1024));
        assert_eq!(p.size_limit(Some(35_882_577)), Some(35_882_577));
        let p = info("[[provider]]\nname = \"t\"\nkind = \"generic\"\nclient_id = \"x\"\ntoken_url = \"http://127.0.0.1:9/token\"\nsmtp = \"127.0.0.1:2526\"\nsmtp_tls = \"none\"\nca_file = \"ca.pem\"\n");
        assert_eq!(p.smtp, Some(Server { host: "127.0.0.1".into(), port: 2526, tls: UpstreamTls::None }));
        assert_eq!(p.ca_file, Some(PathBuf::from("/etc/mfd/ca.pem")));
        assert_eq!(p.messages_per_minute, None);
    }
}
