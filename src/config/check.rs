//! What serde cannot check: names that refer to each other, duplicates, files that must
//! exist, flows a provider cannot do, settings that contradict each other. The values
//! themselves were parsed into their types when the file was read ([`super::types`]).
//! One function per section; each returns its problems with their spans.

use std::collections::HashSet;

use std::net::IpAddr;

use super::types::Found;
use super::{
    folder_key, looks_like_address, After, Config, DestinationKind, Flow, ListenerTls, Oversize, ProviderKind, SendVia,
};
use crate::filenames::Template;

impl Config {
    /// Every cross-reference problem of the file, with spans, in no particular order.
    pub(super) fn check(&self) -> Vec<Found> {
        let mut out = Vec::new();
        out.extend(self.check_relay());
        out.extend(self.check_nothing_to_do());
        out.extend(self.check_admin());
        out.extend(self.check_listeners());
        out.extend(self.check_providers());
        out.extend(self.check_identities());
        out.extend(self.check_devices());
        out.extend(self.check_mailboxes());
        out.extend(self.check_notify());
        out.extend(self.check_destinations());
        out.extend(self.check_oversize());
        out
    }

    /// What works but is probably not what the admin wants: printed by `check` and logged at
    /// start and reload, never refused.
    pub(super) fn advice_found(&self) -> Vec<Found> {
        let mut out = self.advice_unused();
        out.extend(self.advice_destinations());
        let admin = self.admin.listen.get_ref();
        if self.admin.token.is_none() && self.admin.basic_auth_user.is_none() && !admin.ip().is_loopback() {
            // Fine behind a network policy (the Kubernetes manifests), never on an open LAN:
            // whoever reaches it may drop queued mail, sign identities in and send test mail.
            out.push((
                self.admin.listen.span(),
                format!(
                    "admin listener {admin} is reachable beyond this host and asks for no credentials: anyone who \
                     reaches it can drop queued mail, sign identities in and send test mail as any device; set \
                     admin.token (and basic_auth for the status page), or make sure a firewall limits who connects"
                ),
            ));
        }
        for l in self.listeners.iter().map(|l| l.get_ref()).filter(|l| *l.legacy_tls.get_ref()) {
            let addr = l.listen.get_ref();
            let span = l.legacy_tls.span();
            if let Some((cert, _)) = l.tls.files() {
                if let Ok(false) = crate::certs::is_rsa(&self.resolve(cert.get_ref())) {
                    out.push((
                        cert.span(),
                        format!(
                            "listener {addr} has legacy_tls = true but a certificate without an RSA key: devices that \
                             speak only AES128-SHA or TLS 1.0 cannot use it; make an RSA one with `mfd-relay make-cert`"
                        ),
                    ));
                }
            }
            if !l.require_auth_tls {
                out.push((
                    span,
                    format!(
                        "listener {addr} opens TLS to old devices but lets them log in without it \
                         (require_auth_tls = false): set require_auth_tls = true so that no PIN crosses the LAN in clear"
                    ),
                ));
            }
            if !is_private(addr.ip()) {
                out.push((
                    l.listen.span(),
                    format!(
                        "listener {addr} speaks old TLS (legacy_tls = true) beyond private ranges: bind it to the \
                         printers' LAN address, not {}",
                        addr.ip()
                    ),
                ));
            }
        }
        out
    }

    /// A file that starts a relay which can do nothing: no listener for devices and no
    /// mailbox to poll (an empty file, say). A relay for mobile print alone has no listener,
    /// which is only advice ([`Config::advice_unused`]).
    fn check_nothing_to_do(&self) -> Vec<Found> {
        if self.listeners.is_empty() && self.mailboxes.is_empty() {
            return vec![(
                0..0,
                "no [[listener]]: the relay would accept mail from no device (add one, e.g. listen = \"0.0.0.0:2525\")"
                    .into(),
            )];
        }
        Vec::new()
    }

    /// A setup that runs but cannot relay anything, or carries what nothing uses.
    fn advice_unused(&self) -> Vec<Found> {
        let mut out = Vec::new();
        if self.listeners.is_empty() && !self.mailboxes.is_empty() {
            out.push((
                0..0,
                "no [[listener]]: devices cannot send mail through this relay (only mobile print runs)".into(),
            ));
        }
        if !self.listeners.is_empty() && self.devices.is_empty() {
            out.push((
                self.listeners[0].get_ref().listen.span(),
                "no [[device]]: every connection is refused (550 5.7.1 not a configured device); add a [[device]] \
                 with the printer's address or username"
                    .into(),
            ));
        }
        for id in &self.identities {
            let id = id.get_ref();
            let name = id.name.get_ref();
            let used = self.devices.iter().any(|d| d.get_ref().identity.get_ref() == name)
                || self.mailboxes.iter().any(|m| m.get_ref().identity.get_ref() == name);
            if !used {
                out.push((id.name.span(), format!("identity \"{name}\" is used by no [[device]] or [[mailbox]]")));
            }
        }
        out
    }

    /// Devices whose identity has never signed in (`signed_in`: the identities with stored
    /// tokens). App-only identities need no sign-in.
    pub(super) fn sign_in_advice_found(&self, signed_in: &HashSet<String>) -> Vec<Found> {
        let mut out = Vec::new();
        for d in &self.devices {
            let d = d.get_ref();
            let identity = d.identity.get_ref();
            let Some(id) = self.identity(identity) else { continue };
            if matches!(id.flow.get_ref(), Flow::ClientCredentials | Flow::ServiceAccount)
                || signed_in.contains(identity)
            {
                continue;
            }
            out.push((
                d.identity.span(),
                format!(
                    "device \"{}\": identity \"{identity}\" has never signed in, so its mail gets 451 4.7.0 until \
                     someone runs `mfd-relay auth login {identity}`",
                    d.name.get_ref()
                ),
            ));
        }
        out
    }

    fn check_relay(&self) -> Vec<Found> {
        let mut out = Vec::new();
        if self.relay.hostname.trim().is_empty() || self.relay.hostname.contains(char::is_whitespace) {
            out.push((0..0, "relay.hostname must be a host name without spaces".into()));
        }
        if let Some(to) = &self.relay.bounce_to {
            if !looks_like_address(to) {
                out.push((0..0, format!("relay.bounce_to \"{to}\" is not a mail address")));
            }
        }
        out
    }

    fn check_admin(&self) -> Vec<Found> {
        let mut out = Vec::new();
        for h in &self.admin.allowed_hosts {
            let name = h.get_ref();
            if name.is_empty() || name.contains(['/', ':', ' ', '@', '*']) {
                out.push((
                    h.span(),
                    format!("admin.allowed_hosts: \"{name}\" is not a host name (no scheme, port or path)"),
                ));
            }
        }
        match (&self.admin.basic_auth_user, &self.admin.basic_auth_password_hash) {
            (Some(u), Some(h)) => {
                if u.get_ref().is_empty() || u.get_ref().contains(':') {
                    out.push((u.span(), "admin.basic_auth_user must be non-empty and have no ':'".into()));
                }
                if let Err(e) = crate::credentials::check_hash(h.get_ref()) {
                    out.push((
                        h.span(),
                        format!("admin.basic_auth_password_hash is {e}; make one with `mfd-relay hash-pin`"),
                    ));
                }
                if self.admin.token.is_none() {
                    out.push((u.span(), "admin.basic_auth_user needs admin.token too: the mfd-relay commands (queue, auth, reload) use the token".into()));
                }
            }
            (Some(x), None) | (None, Some(x)) => {
                out.push((x.span(), "admin.basic_auth_user and admin.basic_auth_password_hash go together".into()))
            }
            (None, None) => {}
        }
        out
    }

    fn check_listeners(&self) -> Vec<Found> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for l in &self.listeners {
            let l = l.get_ref();
            let addr = l.listen.get_ref();
            if !seen.insert(*addr) {
                out.push((l.listen.span(), format!("listener {addr} appears twice")));
            }
            if l.require_auth_tls && l.tls == ListenerTls::None {
                out.push((
                    l.listen.span(),
                    format!(
                        "listener {addr} has require_auth_tls = true but tls = \"none\": no device could ever log in"
                    ),
                ));
            }
            if *l.legacy_tls.get_ref() && l.tls == ListenerTls::None {
                out.push((
                    l.legacy_tls.span(),
                    format!("listener {addr} has legacy_tls = true but tls = \"none\": there is no TLS to open to old devices"),
                ));
            }
            if let Some((cert, key)) = l.tls.files() {
                let (cert_path, key_path) = (self.resolve(cert.get_ref()), self.resolve(key.get_ref()));
                for (f, path) in [(cert, &cert_path), (key, &key_path)] {
                    if !path.is_file() {
                        out.push((f.span(), format!("file {} does not exist", path.display())));
                    }
                }
                if cert_path.is_file() && key_path.is_file() {
                    if let Err(e) = crate::tls::server_acceptor(&cert_path, &key_path) {
                        out.push((cert.span(), e.to_string()));
                    } else if *l.legacy_tls.get_ref() {
                        if let Err(e) = crate::legacy_tls::acceptor(&cert_path, &key_path) {
                            out.push((cert.span(), format!("legacy TLS (OpenSSL): {e}")));
                        }
                    }
                }
            }
        }
        out
    }

    fn check_providers(&self) -> Vec<Found> {
        let mut out = Vec::new();
        let mut names = HashSet::new();
        for pr in &self.providers {
            let pr = pr.get_ref();
            let span = pr.name.span();
            let name = pr.name.get_ref();
            if !names.insert(name.clone()) {
                out.push((span.clone(), format!("provider \"{name}\" is defined twice")));
            }
            let secrets =
                [pr.client_secret.is_some(), pr.client_secret_file.is_some(), pr.client_certificate.is_some()]
                    .iter()
                    .filter(|b| **b)
                    .count();
            if secrets > 1 {
                out.push((
                    span.clone(),
                    format!("provider \"{name}\": give one of client_secret, client_secret_file or client_certificate"),
                ));
            }
            if pr.client_certificate.is_some() != pr.client_key.is_some() {
                out.push((span.clone(), format!("provider \"{name}\": client_certificate and client_key go together")));
            }
            for f in
                [&pr.client_secret_file, &pr.client_certificate, &pr.client_key, &pr.service_account_file, &pr.ca_file]
                    .into_iter()
                    .flatten()
            {
                let path = self.resolve(f.get_ref());
                if !path.is_file() {
                    out.push((f.span(), format!("file {} does not exist", path.display())));
                }
            }
            match pr.kind {
                ProviderKind::Generic => {
                    if pr.token_url.is_none() {
                        out.push((span.clone(), format!("provider \"{name}\" (generic) needs token_url")));
                    }
                    if pr.smtp.is_none() && pr.imap.is_none() {
                        out.push((
                            span.clone(),
                            format!("provider \"{name}\" (generic) needs smtp and/or imap = \"host:port\""),
                        ));
                    }
                }
                ProviderKind::Microsoft => {
                    if pr.tenant.is_none() && pr.token_url.is_none() {
                        out.push((span.clone(), format!("provider \"{name}\" (microsoft) needs tenant (a tenant id, a domain like contoso.onmicrosoft.com, \"organizations\" or \"common\")")));
                    }
                }
                ProviderKind::Google => {}
            }
            // Bearer tokens travel to these URLs: https, or plain http to this machine only.
            for (key, url) in [
                ("graph_url", &pr.graph_url),
                ("gmail_api_url", &pr.gmail_api_url),
                ("drive_api_url", &pr.drive_api_url),
            ] {
                let Some(url) = url else { continue };
                if let Some(why) = api_url_problem(url.get_ref()) {
                    out.push((url.span(), format!("provider \"{name}\": {key} {why}")));
                }
            }
            if let Some(url) = &pr.drive_api_url {
                if pr.kind != ProviderKind::Google {
                    out.push((url.span(), format!("provider \"{name}\": drive_api_url is only for kind = \"google\"")));
                }
            }
        }
        out
    }

    fn check_identities(&self) -> Vec<Found> {
        let mut out = Vec::new();
        let mut names = HashSet::new();
        for id in &self.identities {
            let id = id.get_ref();
            let name = id.name.get_ref();
            if !names.insert(name.clone()) {
                out.push((id.name.span(), format!("identity \"{name}\" is defined twice")));
            }
            if !looks_like_address(id.email.get_ref()) {
                out.push((
                    id.email.span(),
                    format!("identity \"{name}\": \"{}\" is not a mail address", id.email.get_ref()),
                ));
            }
            let Some(pr) = self.provider(id.provider.get_ref()) else {
                out.push((
                    id.provider.span(),
                    format!("identity \"{name}\": provider \"{}\" is not defined", id.provider.get_ref()),
                ));
                continue;
            };
            let has_secret =
                pr.client_secret.is_some() || pr.client_secret_file.is_some() || pr.client_certificate.is_some();
            let flow_span = id.flow.span();
            let problem = match (*id.flow.get_ref(), pr.kind) {
                (Flow::DeviceCode, ProviderKind::Google) => Some(format!("identity \"{name}\": Google's device flow does not grant the Gmail scope; use flow = \"auth_code\" (browser sign-in) or \"service_account\" (Workspace)")),
                (Flow::ServiceAccount, k) if k != ProviderKind::Google && k != ProviderKind::Generic => Some(
                    format!("identity \"{name}\": flow = \"service_account\" is for Google Workspace providers"),
                ),
                (Flow::ServiceAccount, _) if pr.service_account_file.is_none() => Some(format!("identity \"{name}\": flow = \"service_account\" needs service_account_file on provider \"{}\"", pr.name.get_ref())),
                (Flow::ClientCredentials, _) if !has_secret => Some(format!("identity \"{name}\": flow = \"client_credentials\" needs client_secret, client_secret_file or client_certificate on provider \"{}\"", pr.name.get_ref())),
                (Flow::ClientCredentials, ProviderKind::Microsoft)
                    if matches!(pr.tenant.as_deref(), Some("common" | "organizations" | "consumers")) =>
                {
                    Some(format!("identity \"{name}\": app-only sign-in needs a specific tenant on provider \"{}\", not \"{}\"", pr.name.get_ref(), pr.tenant.as_deref().unwrap_or_default()))
                }
                _ => None,
            };
            out.extend(problem.map(|m| (flow_span, m)));
            if let Some(via) = &id.send_via {
                let wrong = match (*via.get_ref(), pr.kind) {
                    (SendVia::Graph, k) if k != ProviderKind::Microsoft => {
                        Some("Microsoft Graph is for kind = \"microsoft\" providers")
                    }
                    (SendVia::GmailApi, k) if k != ProviderKind::Google => {
                        Some("the Gmail API is for kind = \"google\" providers")
                    }
                    _ => None,
                };
                if let Some(why) = wrong {
                    out.push((
                        via.span(),
                        format!(
                            "identity \"{name}\": send_via = \"{}\" does not fit provider \"{}\": {why}",
                            via.get_ref(),
                            pr.name.get_ref()
                        ),
                    ));
                }
            }
        }
        out
    }

    fn check_devices(&self) -> Vec<Found> {
        let mut out = Vec::new();
        let mut names = HashSet::new();
        let mut users = HashSet::new();
        for d in &self.devices {
            let d = d.get_ref();
            let name = d.name.get_ref();
            if !names.insert(name.clone()) {
                out.push((d.name.span(), format!("device \"{name}\" is defined twice")));
            }
            if self.identity(d.identity.get_ref()).is_none() {
                out.push((
                    d.identity.span(),
                    format!("device \"{name}\": identity \"{}\" is not defined", d.identity.get_ref()),
                ));
            }
            if d.addresses.is_empty() && d.username.is_none() {
                out.push((
                    d.name.span(),
                    format!("device \"{name}\" has neither addresses nor username, so nothing can match it"),
                ));
            }
            if let Some(u) = &d.username {
                if !users.insert(u.get_ref().to_ascii_lowercase()) {
                    out.push((u.span(), format!("username \"{}\" is used by two devices", u.get_ref())));
                }
                match &d.pin_hash {
                    None => out.push((
                        u.span(),
                        format!(
                            "device \"{name}\" has a username but no pin_hash (make one with `mfd-relay hash-pin`)"
                        ),
                    )),
                    Some(h) => {
                        if let Err(e) = crate::credentials::check_hash(h.get_ref()) {
                            out.push((
                                h.span(),
                                format!("device \"{name}\": pin_hash is {e}; make one with `mfd-relay hash-pin`"),
                            ));
                        }
                    }
                }
            }
        }
        out
    }

    fn check_mailboxes(&self) -> Vec<Found> {
        let mut out = Vec::new();
        let mut names = HashSet::new();
        let mut folders = HashSet::new();
        for m in &self.mailboxes {
            let m = m.get_ref();
            let name = m.name.get_ref();
            if !names.insert(name.clone()) {
                out.push((m.name.span(), format!("mailbox \"{name}\" is defined twice")));
            }
            match self.identity(m.identity.get_ref()) {
                None => out.push((
                    m.identity.span(),
                    format!("mailbox \"{name}\": identity \"{}\" is not defined", m.identity.get_ref()),
                )),
                Some(id) => {
                    let generic_without_imap = self
                        .provider(id.provider.get_ref())
                        .is_some_and(|pr| pr.kind == ProviderKind::Generic && pr.imap.is_none());
                    if generic_without_imap {
                        out.push((
                            m.identity.span(),
                            format!(
                                "mailbox \"{name}\": provider \"{}\" has no imap = \"host:port\"",
                                id.provider.get_ref()
                            ),
                        ));
                    }
                }
            }
            let folder = folder_key(&m.folder);
            if !folders.insert((m.identity.get_ref().clone(), folder.to_string())) {
                out.push((
                    m.name.span(),
                    format!("mailbox \"{name}\": another mailbox already polls folder \"{}\" of identity \"{}\" (every job would print twice)", m.folder, m.identity.get_ref()),
                ));
            }
            if let After::Move(target) = m.after.get_ref() {
                if folder_key(target) == folder {
                    out.push((
                        m.after.span(),
                        format!(
                            "mailbox \"{name}\": after = \"{}\" moves mail into the folder being polled",
                            m.after.get_ref()
                        ),
                    ));
                }
            }
            if let Some(cmd) = &m.command {
                if cmd.is_empty() || !cmd.iter().any(|a| a.contains("{file}")) {
                    out.push((m.name.span(), format!("mailbox \"{name}\": command should name the file to print with \"{{file}}\" (like [\"lp\", \"-d\", \"floor3\", \"{{file}}\"])")));
                }
            }
        }
        out
    }
}

impl Config {
    /// `[[destination]]`: names and addresses once each, an identity whose provider reaches
    /// the kind, the keys of that kind only, and templates that parse.
    fn check_destinations(&self) -> Vec<Found> {
        let mut out = Vec::new();
        let mut names = HashSet::new();
        let mut addresses = HashSet::new();
        for d in &self.destinations {
            let d = d.get_ref();
            let name = d.name.get_ref();
            if !names.insert(name.clone()) {
                out.push((d.name.span(), format!("destination \"{name}\" is defined twice")));
            }
            let address = d.address.get_ref();
            if !looks_like_address(address) {
                out.push((d.address.span(), format!("destination \"{name}\": \"{address}\" is not a mail address")));
            } else if !addresses.insert(address.to_ascii_lowercase()) {
                out.push((
                    d.address.span(),
                    format!("destination \"{name}\": address \"{address}\" is already another destination's"),
                ));
            }
            // Mail to an identity's own address must reach its mailbox (replies, bounces).
            if let Some(id) = self.identities.iter().find(|i| i.get_ref().email.get_ref().eq_ignore_ascii_case(address))
            {
                out.push((
                    d.address.span(),
                    format!(
                        "destination \"{name}\": address \"{address}\" is the mail address of identity \"{}\"; \
                         mail to it would be saved to the folder instead of delivered (use an address of its own, \
                         like scans-{name}@relay.lan)",
                        id.get_ref().name.get_ref()
                    ),
                ));
            }
            let kind = *d.kind.get_ref();
            match self.identity(d.identity.get_ref()) {
                None => out.push((
                    d.identity.span(),
                    format!("destination \"{name}\": identity \"{}\" is not defined", d.identity.get_ref()),
                )),
                Some(id) => {
                    // An undefined provider is the identity's own problem.
                    if let Some(pr) = self.provider(id.provider.get_ref()) {
                        if pr.kind != kind.provider_kind() {
                            out.push((
                                d.kind.span(),
                                format!(
                                    "destination \"{name}\": kind = \"{kind}\" needs a kind = \"{}\" provider, but identity \
                                     \"{}\" uses provider \"{}\" (kind = \"{}\")",
                                    provider_kind_str(kind.provider_kind()),
                                    id.name.get_ref(),
                                    pr.name.get_ref(),
                                    provider_kind_str(pr.kind)
                                ),
                            ));
                        }
                    }
                }
            }
            for (key, value, only) in [
                ("site", &d.site, DestinationKind::Sharepoint),
                ("library", &d.library, DestinationKind::Sharepoint),
                ("user", &d.user, DestinationKind::Onedrive),
                ("folder_id", &d.folder_id, DestinationKind::GoogleDrive),
            ] {
                if let Some(v) = value {
                    if kind != only {
                        out.push((v.span(), format!("destination \"{name}\": {key} is only for kind = \"{only}\"")));
                    }
                }
            }
            match (&d.site, kind) {
                (None, DestinationKind::Sharepoint) => out.push((
                    d.kind.span(),
                    format!(
                        "destination \"{name}\": kind = \"sharepoint\" needs site = \"host:/sites/name\" \
                         (like \"contoso.sharepoint.com:/sites/Finance\")"
                    ),
                )),
                (Some(site), DestinationKind::Sharepoint) if !is_site(site.get_ref()) => out.push((
                    site.span(),
                    format!(
                        "destination \"{name}\": site \"{}\" is not of the form host:/sites/name or host:/teams/name \
                         (like \"contoso.sharepoint.com:/sites/Finance\")",
                        site.get_ref()
                    ),
                )),
                _ => {}
            }
            if let Some(id) = &d.folder_id {
                if kind == DestinationKind::GoogleDrive && !is_drive_id(id.get_ref()) {
                    out.push((
                        id.span(),
                        format!(
                            "destination \"{name}\": folder_id \"{}\" is not a Drive folder id (the last part of the \
                             folder's address, drive.google.com/drive/folders/<id>)",
                            id.get_ref()
                        ),
                    ));
                }
            }
            if let Err(e) = Template::parse_folder(d.folder.get_ref()) {
                out.push((d.folder.span(), format!("destination \"{name}\": folder: {e}")));
            }
            if let Err(e) = Template::parse(d.file_name.get_ref()) {
                out.push((d.file_name.span(), format!("destination \"{name}\": file_name: {e}")));
            }
        }
        out
    }

    /// `[[identity]] oversize = "link"` and the destination its attachments go to.
    fn check_oversize(&self) -> Vec<Found> {
        let mut out = Vec::new();
        for id in &self.identities {
            let id = id.get_ref();
            let name = id.name.get_ref();
            match (&id.oversize, &id.oversize_destination) {
                (Some(o), None) if *o.get_ref() == Oversize::Link => out.push((
                    o.span(),
                    format!(
                        "identity \"{name}\": oversize = \"link\" needs oversize_destination, the [[destination]] \
                         the attachments go to"
                    ),
                )),
                (o, Some(dest)) if o.as_ref().is_none_or(|o| *o.get_ref() != Oversize::Link) => out.push((
                    dest.span(),
                    format!("identity \"{name}\": oversize_destination is only for oversize = \"link\""),
                )),
                (_, Some(dest)) if self.destination(dest.get_ref()).is_none() => out.push((
                    dest.span(),
                    format!(
                        "identity \"{name}\": oversize_destination \"{}\" is not a defined [[destination]]",
                        dest.get_ref()
                    ),
                )),
                _ => {}
            }
        }
        out
    }

    /// Destinations no device may send to, when every device has a `recipients` list.
    fn advice_destinations(&self) -> Vec<Found> {
        let lists: Option<Vec<_>> = self.devices.iter().map(|d| d.get_ref().recipients.as_ref()).collect();
        let Some(lists) = lists.filter(|l| !l.is_empty()) else { return Vec::new() };
        let used_for_oversize = |name: &str| {
            self.identities
                .iter()
                .any(|i| i.get_ref().oversize_destination.as_ref().is_some_and(|d| d.get_ref() == name))
        };
        self.destinations
            .iter()
            .map(|d| d.get_ref())
            .filter(|d| !lists.iter().any(|l| l.iter().any(|p| p.matches(d.address.get_ref()))))
            .filter(|d| !used_for_oversize(d.name.get_ref()))
            .map(|d| {
                (
                    d.address.span(),
                    format!(
                        "destination \"{}\": no [[device]]'s recipients list admits \"{}\", so no device can scan to it",
                        d.name.get_ref(),
                        d.address.get_ref()
                    ),
                )
            })
            .collect()
    }

    fn check_notify(&self) -> Vec<Found> {
        let n = &self.notify;
        let mut out = Vec::new();
        if let Some(email) = &n.email {
            if !is_plain_address(email.get_ref()) {
                out.push((
                    email.span(),
                    format!(
                        "notify.email \"{}\" is not a mail address (one address, like it@contoso.com)",
                        email.get_ref()
                    ),
                ));
            } else if self.identities.is_empty() {
                out.push((email.span(), "notify.email needs an [[identity]] to send through".into()));
            }
        }
        for w in &n.webhooks {
            let url = w.get_ref().url.get_ref();
            let span = w.get_ref().url.span();
            match url.0.scheme() {
                "https" => {}
                "http" if url.is_loopback() => {}
                "http" => out.push((
                    span.clone(),
                    format!("notify.webhooks: {} must use https (plain http only to this machine)", url.shown()),
                )),
                other => out.push((span.clone(), format!("notify.webhooks: url scheme \"{other}\" should be https"))),
            }
            if url.0.host_str().is_none_or(str::is_empty) && url.0.scheme().starts_with("http") {
                out.push((span, "notify.webhooks: url has no host".into()));
            }
        }
        let every = n.check_every.get_ref().0;
        if every < std::time::Duration::from_secs(1) || every > std::time::Duration::from_secs(3600) {
            out.push((n.check_every.span(), "notify.check_every should be between 1s and 1h".into()));
        }
        if n.remind_every.get_ref().0 < std::time::Duration::from_secs(3600) {
            out.push((n.remind_every.span(), "notify.remind_every should be at least 1h".into()));
        }
        out
    }
}

/// The config spelling of a provider kind.
fn provider_kind_str(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Microsoft => "microsoft",
        ProviderKind::Google => "google",
        ProviderKind::Generic => "generic",
    }
}

/// A SharePoint site as Graph addresses it by path: `host:/sites/name` or `host:/teams/name`
/// (`GET /sites/{hostname}:/{server-relative-path}`), subsites allowed.
fn is_site(s: &str) -> bool {
    let Some((host, path)) = s.split_once(':') else { return false };
    let name = path.strip_prefix("/sites/").or_else(|| path.strip_prefix("/teams/"));
    !host.is_empty()
        && host.contains('.')
        && !host.contains(['/', ' ', '@'])
        && name.is_some_and(|n| {
            !n.is_empty()
                && !n.starts_with('/')
                && !n.ends_with('/')
                && !n.contains("//")
                && !n.contains(['?', '#', ':'])
        })
}

/// A Google Drive file id (letters, digits, `-` and `_`; `root` too).
fn is_drive_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// One plain `local@domain` address: no display name, brackets, list or spaces.
fn is_plain_address(s: &str) -> bool {
    let Some((local, domain)) = s.rsplit_once('@') else { return false };
    !local.is_empty()
        && !domain.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !s.contains(|c: char| c.is_whitespace() || c.is_control() || "<>,;:\"()[]\\".contains(c))
        && !local.contains('@')
        && s.is_ascii()
}

/// Loopback, RFC 1918, link-local, or IPv6 unique-local/link-local: an address only the LAN
/// reaches. The unspecified address (all interfaces) is not.
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback() || (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Why an API base URL is unusable, if it is: it must parse, and be https unless it points
/// at this machine (the tests' fakes).
fn api_url_problem(text: &str) -> Option<String> {
    let url = match url::Url::parse(text) {
        Ok(u) => u,
        Err(e) => return Some(format!("is not a URL: {e}")),
    };
    let loopback = match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => return Some("has no host".into()),
    };
    match url.scheme() {
        "https" => None,
        "http" if loopback => None,
        _ => Some("must use https (plain http only to this machine)".into()),
    }
}
