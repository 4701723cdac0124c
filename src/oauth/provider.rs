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
}

/// The Gmail API's limit on a message (`messages.send`, resumable upload).
pub const GMAIL_API_MAX: u64 = 35 * 1024 * 1024;

/// Microsoft Graph's host in each national cloud.
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
    /// - Graph measures a message as stored, its attachments decoded, and takes up to the
    ///   mailbox's limit (35 MB by default); the device's MIME carries them in base64, 37 %
    ///   larger (4/3, plus a line break every 76 characters): a 30 MB scan arrives as ~41 MB.
    /// - The Gmail API takes at most 35 MiB of raw message.
    pub fn api_size_limit(&self, via: SendVia) -> Option<u64> {
        if self.size_configured {
            return self.max_message_size;
        }
        match via {
            SendVia::Graph => self.max_message_size.map(|m| m / 100 * 137),
            SendVia::GmailApi => Some(GMAIL_API_MAX),
            SendVia::Smtp => self.size_limit(None),
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

    /// The scopes an identity with this flow asks for (`imap`: a mailbox uses it too).
    pub fn scopes(&self, flow: Flow, imap: bool) -> Vec<String> {
        if let Some(s) = &self.scopes {
            return s.clone();
        }
        match self.kind {
            ProviderKind::Microsoft => {
                let (_, _, resource) = microsoft_hosts(self.cloud);
                if flow == Flow::ClientCredentials {
                    // App-only: the .default scope of Exchange Online; the app's rights
                    // (SMTP.SendAsApp, IMAP.AccessAsApp) come from the app registration.
                    let app_resource =
                        if self.cloud == Cloud::Global { "https://outlook.office365.com" } else { resource };
                    vec![format!("{app_resource}/.default")]
                } else {
                    let mut v = vec![format!("{resource}/SMTP.Send")];
                    if imap {
                        v.push(format!("{resource}/IMAP.AccessAsUser.All"));
                    }
                    // openid + profile: an ID token names who signed in (a delegate of a
                    // shared mailbox signs in as themselves; XOAUTH2 needs that account).
                    v.extend(["offline_access", "openid", "profile"].map(String::from));
                    v
                }
            }
            ProviderKind::Google => vec!["https://mail.google.com/".into()],
            ProviderKind::Generic => Vec::new(),
        }
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
            let imap = config.mailboxes.iter().any(|m| m.get_ref().identity.get_ref() == name);
            let flow = *id.flow.get_ref();
            out.push(format!(
                "  identity \"{name}\" ({flow}, {}): scopes {}",
                id.email.get_ref(),
                info.scopes(flow, imap).join(" ")
            ));
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
