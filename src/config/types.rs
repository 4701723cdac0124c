//! The typed values of the configuration file, parsed once while the file is deserialized:
//! addresses, networks, address patterns, `host:port`, `after`, durations and sizes. The rest
//! of the relay uses these values and never parses the text again.
//!
//! A value that does not parse is a problem at its own `file:line`. While
//! [`super::Config::parse`] reads a file, such problems are collected ([`collecting`]) and the
//! value gets a stand-in, so that every bad value of the file (and every cross-reference
//! problem of the rest) is reported in one pass; a configuration with any of them is refused,
//! so a stand-in never reaches the relay. Outside that collection a bad value is an ordinary
//! deserialization error.

use std::cell::RefCell;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// A problem: where in the file, and what is wrong.
pub(super) type Found = (Range<usize>, String);

/// Whether a bad value's problem starts with the name of its `[[device]]` or `[[mailbox]]`
/// (the value cannot name it: serde reads the section's keys in the file's order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Named {
    /// The message says what it is about.
    Itself,
    /// The message is about a value of a device or a mailbox.
    BySection,
}

/// A bad value found while deserializing.
pub(super) type Bad = (Range<usize>, String, Named);

thread_local! {
    /// The bad values of the file being read by [`collecting`] on this thread.
    static FOUND: RefCell<Option<Vec<Bad>>> = const { RefCell::new(None) };
}

/// Runs `read` (a deserialization) collecting bad values instead of stopping at the first.
pub(super) fn collecting<T>(read: impl FnOnce() -> T) -> (T, Vec<Bad>) {
    FOUND.with(|f| *f.borrow_mut() = Some(Vec::new()));
    let out = read();
    let found = FOUND.with(|f| f.borrow_mut().take()).unwrap_or_default();
    (out, found)
}

/// A value that did not parse: recorded (and replaced by `stand_in`) while collecting,
/// otherwise the deserialization fails with `message`.
pub(super) fn bad<T, E: serde::de::Error>(
    span: Range<usize>,
    message: String,
    named: Named,
    stand_in: T,
) -> Result<T, E> {
    FOUND.with(|f| match f.borrow_mut().as_mut() {
        Some(found) => {
            found.push((span, message, named));
            Ok(stand_in)
        }
        None => Err(E::custom(message)),
    })
}

/// Reads a string with its span and parses it with `parse`; `stand_in` replaces a bad value
/// while problems are collected.
pub(super) fn text<'de, D: Deserializer<'de>, T>(
    d: D,
    parse: impl FnOnce(&str) -> Result<T, String>,
    named: Named,
    stand_in: T,
) -> Result<Spanned<T>, D::Error> {
    let s = Spanned::<String>::deserialize(d)?;
    let span = s.span();
    match parse(s.get_ref()) {
        Ok(v) => Ok(Spanned::new(span, v)),
        Err(message) => bad(span.clone(), message, named, Spanned::new(span, stand_in)),
    }
}

/// What a listen address reads as until the file's problems are reported.
const NO_ADDRESS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// `[admin] listen`: an `address:port`.
pub(super) fn admin_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Spanned<SocketAddr>, D::Error> {
    text(
        d,
        |s| s.parse().map_err(|_| format!("admin.listen \"{s}\" is not an address:port")),
        Named::Itself,
        NO_ADDRESS,
    )
}

/// `[[listener]] listen`: an `address:port`.
pub(super) fn listener_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Spanned<SocketAddr>, D::Error> {
    text(d, |s| s.parse().map_err(|_| format!("listener \"{s}\" is not an address:port")), Named::Itself, NO_ADDRESS)
}

/// A webhook's address. It usually carries a token in its path or query, so it is shown
/// (Debug, Display, logs, problems) as its scheme and host only.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookUrl(pub url::Url);

impl WebhookUrl {
    /// What may be shown of it: `https://host` (host only, never path or query).
    pub fn shown(&self) -> String {
        format!("{}://{}", self.0.scheme(), self.0.host_str().unwrap_or("?"))
    }

    /// Whether it names this machine (127.0.0.0/8, ::1 or localhost): the only place plain
    /// http is allowed (a test's fake receiver, a local bridge).
    pub fn is_loopback(&self) -> bool {
        match self.0.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => false,
        }
    }
}

impl fmt::Debug for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WebhookUrl({})", self.shown())
    }
}

impl fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown())
    }
}

/// `[notify] webhooks = [{ url = ... }]`: a URL (its problem never repeats it: it is a secret).
pub(super) fn webhook_url<'de, D: Deserializer<'de>>(d: D) -> Result<Spanned<WebhookUrl>, D::Error> {
    let stand_in = WebhookUrl(url::Url::parse("https://invalid.invalid/").expect("a valid URL"));
    text(
        d,
        |s| {
            url::Url::parse(s)
                .map(WebhookUrl)
                .map_err(|e| format!("notify.webhooks: url is not a URL ({e}); it should look like https://host/path"))
        },
        Named::Itself,
        stand_in,
    )
}

/// A server address, `host:port` or `[v6]:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// A name or an IP address (without brackets).
    pub host: String,
    /// Never 0.
    pub port: u16,
}

impl HostPort {
    /// Parses "host:port" or "[v6]:port".
    pub fn parse(s: &str) -> Option<HostPort> {
        let (host, port) = s.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return None;
        }
        Some(HostPort { host: host.to_string(), port })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl<'de> Deserialize<'de> for HostPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let stand_in = HostPort { host: "invalid".into(), port: 1 };
        text(d, |s| HostPort::parse(s).ok_or_else(|| format!("\"{s}\" is not host:port")), Named::Itself, stand_in)
            .map(Spanned::into_inner)
    }
}

/// A device's network: "192.168.10.31/32", "10.0.0.0/8", "fd00::/8" or a bare address (a /32
/// or /128). Host bits must be zero, so that a typo does not widen or move the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net(pub IpNet);

impl Net {
    /// Parses a network or a bare address; the error says what is wrong.
    pub fn parse(s: &str) -> Result<Net, String> {
        let s = s.trim();
        if let Ok(net) = s.parse::<IpNet>() {
            if net.trunc() != net {
                return Err(format!("\"{s}\" has host bits set; did you mean {}?", net.trunc()));
            }
            return Ok(Net(net));
        }
        s.parse::<IpAddr>()
            .map(|ip| Net(IpNet::from(ip)))
            .map_err(|_| format!("\"{s}\" is not an address or CIDR network (like 192.168.10.31/32)"))
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for Net {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let stand_in = Net(IpNet::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
        text(d, Net::parse, Named::BySection, stand_in).map(Spanned::into_inner)
    }
}

/// A recipient (device) or sender (mailbox) pattern: "*", "*@domain" or "user@domain",
/// compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressPattern {
    /// `*`: any address.
    Any,
    /// `*@domain`: any address at that domain (not its subdomains).
    Domain(String),
    /// `user@domain`: that address.
    Address(String),
}

impl AddressPattern {
    /// Parses a pattern (surrounding spaces are ignored).
    pub fn parse(p: &str) -> Option<AddressPattern> {
        let p = p.trim();
        if p == "*" {
            Some(AddressPattern::Any)
        } else if let Some(d) = p.strip_prefix("*@") {
            (!d.is_empty() && !d.contains('@')).then(|| AddressPattern::Domain(d.to_string()))
        } else {
            super::looks_like_address(p).then(|| AddressPattern::Address(p.to_string()))
        }
    }

    /// Whether `addr` matches.
    pub fn matches(&self, addr: &str) -> bool {
        match self {
            AddressPattern::Any => true,
            AddressPattern::Domain(domain) => {
                addr.rsplit_once('@').is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain))
            }
            AddressPattern::Address(a) => a.eq_ignore_ascii_case(addr),
        }
    }
}

impl fmt::Display for AddressPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressPattern::Any => f.write_str("*"),
            AddressPattern::Domain(d) => write!(f, "*@{d}"),
            AddressPattern::Address(a) => f.write_str(a),
        }
    }
}

/// Reads a list of patterns; `what` names them in the problem ("recipient", "sender").
fn patterns<'de, D: Deserializer<'de>>(d: D, what: &str) -> Result<Vec<AddressPattern>, D::Error> {
    Vec::<Spanned<String>>::deserialize(d)?
        .into_iter()
        .map(|s| match AddressPattern::parse(s.get_ref()) {
            Some(p) => Ok(p),
            None => bad(
                s.span(),
                format!("{what} pattern \"{}\" should look like user@domain, *@domain or *", s.get_ref()),
                Named::BySection,
                AddressPattern::Any,
            ),
        })
        .collect()
}

/// `[[device]] recipients`.
pub(super) fn recipient_patterns<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<AddressPattern>>, D::Error> {
    patterns(d, "recipient").map(Some)
}

/// `[[mailbox]] senders`.
pub(super) fn sender_patterns<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<AddressPattern>, D::Error> {
    patterns(d, "sender")
}

/// The name under which IMAP knows a folder: INBOX is case-insensitive, every other name is
/// not (RFC 3501 5.1).
pub fn folder_key(folder: &str) -> &str {
    if folder.eq_ignore_ascii_case("INBOX") {
        "INBOX"
    } else {
        folder
    }
}

/// What a mailbox does with a mail upstream once its job is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Delete it (the default).
    Delete,
    /// Mark it seen; only unseen mail is looked at.
    Seen,
    /// Move it to this folder (created when missing).
    Move(String),
}

impl After {
    /// Parses "delete", "seen" or "move:<folder>".
    pub fn parse(s: &str) -> Option<After> {
        match s {
            "delete" => Some(After::Delete),
            "seen" => Some(After::Seen),
            _ => s.strip_prefix("move:").filter(|f| !f.is_empty()).map(|f| After::Move(f.to_string())),
        }
    }
}

impl fmt::Display for After {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            After::Delete => f.write_str("delete"),
            After::Seen => f.write_str("seen"),
            After::Move(folder) => write!(f, "move:{folder}"),
        }
    }
}

impl<'de> Deserialize<'de> for After {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        text(
            d,
            |s| After::parse(s).ok_or_else(|| format!("after = \"{s}\" should be delete, seen or move:<folder>")),
            Named::BySection,
            After::Delete,
        )
        .map(Spanned::into_inner)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        let hp = |h: &str, port| Some(HostPort { host: h.into(), port });
        assert_eq!(HostPort::parse("smtp.office365.com:587"), hp("smtp.office365.com", 587));
        assert_eq!(HostPort::parse("[::1]:25"), hp("::1", 25));
        assert_eq!(HostPort::parse("host"), None);
        assert_eq!(HostPort::parse("host:0"), None);
        assert_eq!(HostPort::parse(":25"), None);
        assert_eq!(HostPort::parse("host:99999"), None);
        assert_eq!(HostPort::parse("[::1]:25").unwrap().to_string(), "[::1]:25");
        assert_eq!(HostPort::parse("a.b:465").unwrap().to_string(), "a.b:465");
    }

    #[test]
    fn nets() {
        assert!(Net::parse("10.0.0.0/8").is_ok());
        assert_eq!(Net::parse("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert!(Net::parse("fd00::/8").is_ok());
        assert!(Net::parse("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(Net::parse("300.0.0.1").is_err());
        assert!(Net::parse("printer").unwrap_err().contains("not an address or CIDR network"));
    }

    #[test]
    fn address_patterns() {
        let p = |s: &str| AddressPattern::parse(s);
        assert_eq!(p("*"), Some(AddressPattern::Any));
        assert_eq!(p(" *@x.y "), Some(AddressPattern::Domain("x.y".into())));
        assert_eq!(p("a@b"), Some(AddressPattern::Address("a@b".into())));
        assert_eq!(p("*@"), None);
        assert_eq!(p("*@a@b"), None);
        assert_eq!(p("bob"), None);
        let domain = p("*@contoso.com").unwrap();
        assert!(domain.matches("Anyone@Contoso.COM"));
        assert!(!domain.matches("x@contoso.com.evil"));
        assert!(p("Boss@Else.Where").unwrap().matches("boss@else.where"));
        assert!(!p("boss@else.where").unwrap().matches("other@else.where"));
        assert!(p("*").unwrap().matches("anything"));
        assert_eq!(p("*@x.y").unwrap().to_string(), "*@x.y");
    }

    #[test]
    fn after_values() {
        assert_eq!(After::parse("delete"), Some(After::Delete));
        assert_eq!(After::parse("seen"), Some(After::Seen));
        assert_eq!(After::parse("move:Printed"), Some(After::Move("Printed".into())));
        assert_eq!(After::parse("move:"), None);
        assert_eq!(After::parse("archive"), None);
        assert_eq!(After::Move("Done".into()).to_string(), "move:Done");
        assert_eq!(folder_key("inbox"), "INBOX");
        assert_eq!(folder_key("Printed"), "Printed");
    }

    /// Outside `Config::parse` (no collection), a bad value is a deserialization error.
    #[test]
    fn bad_values_fail_without_collection() {
        #[derive(Deserialize)]
        struct T {
            #[allow(dead_code)]
            v: HostPort,
        }
        let e = toml::from_str::<T>("v = \"nope\"").err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("is not host:port"), "{e}");
        let (r, found) = collecting(|| toml::from_str::<T>("\nv = \"nope\""));
        assert!(r.is_ok());
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].0.start, 5);
    }
}
