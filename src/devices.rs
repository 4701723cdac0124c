//! Who is this device, which identity may it use, what may it send.
//!
//! A device is recognised either by its AUTH username and PIN, or (when it does not log in)
//! by the address it connects from. A device with a username must log in; a device without
//! one is known by its `addresses` alone. A device with both may log in only from those
//! addresses. Anything else is not a device and cannot relay (DESIGN rule 3).
//!
//! PINs are argon2 hashes in the config. An argon2 check costs tens of milliseconds of CPU,
//! and a printer logs in for every scan, so a successful check is remembered in memory,
//! keyed by an HMAC of (username, PIN) under a key made at startup: a repeat login costs
//! microseconds, the PIN itself is never kept, and failures are never cached.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use argon2::{PasswordHash, PasswordVerifier};
use ipnet::IpNet;
use ring::hmac;

use crate::config::{Config, FromPolicy};

/// A device from the configuration, ready for matching.
#[derive(Debug, Clone)]
pub struct Device {
    pub name: String,
    pub identity: String,
    pub nets: Vec<IpNet>,
    pub username: Option<String>,
    pin_hash: Option<String>,
    /// Recipient patterns; `None` allows any recipient.
    pub recipients: Option<Vec<String>>,
    pub from: FromPolicy,
}

impl Device {
    /// Whether the device may send to `rcpt`.
    pub fn allows_recipient(&self, rcpt: &str) -> bool {
        match &self.recipients {
            None => true,
            Some(pats) => pats.iter().any(|p| pattern_matches(p, rcpt)),
        }
    }

    fn connects_from(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

/// Why a login failed. Deliberately coarse towards the client (one 535 for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("unknown username")]
    UnknownUser,
    #[error("wrong PIN")]
    WrongPin,
    #[error("login not allowed from this address")]
    WrongAddress,
}

/// All devices, with the login cache.
pub struct Devices {
    devices: Vec<Arc<Device>>,
    by_user: HashMap<String, usize>,
    cache_key: hmac::Key,
    verified: Mutex<HashSet<[u8; 32]>>,
    /// Bounds argon2 checks running at once: each takes ~19 MiB and a core for tens of ms,
    /// so unbounded they would let a burst of logins (or of wrong PINs) exhaust memory.
    argon2_slots: tokio::sync::Semaphore,
}

/// argon2 checks running at once.
const ARGON2_PARALLEL: usize = 2;

/// A hash no PIN matches, checked for unknown usernames so they cost as much as wrong PINs.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| hash_pin("mfd-relay: no device has this username").unwrap_or_default());

/// Logins remembered at most (each is 32 bytes); the cache is cleared when full.
const MAX_CACHED_LOGINS: usize = 10_000;

impl Devices {
    /// Builds the device table from a validated configuration.
    pub fn from_config(config: &Config) -> Devices {
        let devices: Vec<Arc<Device>> = config
            .devices
            .iter()
            .map(|d| {
                let d = d.get_ref();
                Arc::new(Device {
                    name: d.name.get_ref().clone(),
                    identity: d.identity.get_ref().clone(),
                    nets: d.addresses.iter().filter_map(|a| parse_net(a.get_ref()).ok()).collect(),
                    username: d.username.as_ref().map(|u| u.get_ref().clone()),
                    pin_hash: d.pin_hash.as_ref().map(|h| h.get_ref().clone()),
                    recipients: d.recipients.clone(),
                    from: d.from,
                })
            })
            .collect();
        let by_user = devices
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.username.as_ref().map(|u| (u.to_ascii_lowercase(), i)))
            .collect();
        let rng = ring::rand::SystemRandom::new();
        // Only fails if the OS has no randomness, in which case nothing secure can run.
        let cache_key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("system random source");
        Devices {
            devices,
            by_user,
            cache_key,
            verified: Mutex::new(HashSet::new()),
            argon2_slots: tokio::sync::Semaphore::new(ARGON2_PARALLEL),
        }
    }

    pub fn all(&self) -> &[Arc<Device>] {
        &self.devices
    }

    /// The device a non-authenticating connection from `ip` is: the most specific network
    /// among devices without a username.
    pub fn by_address(&self, ip: IpAddr) -> Option<Arc<Device>> {
        let ip = canonical(ip);
        self.devices
            .iter()
            .filter(|d| d.username.is_none())
            .filter_map(|d| d.nets.iter().filter(|n| n.contains(&ip)).map(|n| n.prefix_len()).max().map(|len| (len, d)))
            .max_by_key(|(len, _)| *len)
            .map(|(_, d)| d.clone())
    }

    /// The device name of a username, if any (for logs and activity).
    pub fn name_of_user(&self, username: &str) -> Option<&str> {
        self.by_user.get(&username.to_ascii_lowercase()).map(|&i| self.devices[i].name.as_str())
    }

    /// Checks a login. The argon2 work runs on the blocking pool; a success is cached.
    pub async fn authenticate(&self, username: &str, pin: &str, ip: IpAddr) -> Result<Arc<Device>, AuthError> {
        let ip = canonical(ip);
        let dev = self.by_user.get(&username.to_ascii_lowercase()).map(|&i| self.devices[i].clone());
        let refused = match &dev {
            None => Some(AuthError::UnknownUser),
            Some(d) if !d.nets.is_empty() && !d.connects_from(ip) => Some(AuthError::WrongAddress),
            _ => None,
        };
        if let Some(e) = refused {
            // As slow as a wrong PIN, so that timing does not tell which usernames exist.
            self.verify(DUMMY_HASH.as_str(), pin).await;
            return Err(e);
        }
        let dev = dev.ok_or(AuthError::UnknownUser)?;
        let tag = self.cache_tag(&dev, pin);
        if self.is_verified(&tag) {
            return Ok(dev);
        }
        let hash = dev.pin_hash.clone().ok_or(AuthError::WrongPin)?;
        // Printers of one model often log in together: the first check may have just
        // succeeded for the same PIN while this one waited for an argon2 slot.
        if !self.verify_unless(&hash, pin, || self.is_verified(&tag)).await {
            return Err(AuthError::WrongPin);
        }
        let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED_LOGINS {
            cache.clear();
        }
        cache.insert(tag);
        Ok(dev)
    }

    /// An argon2 check on the blocking pool, at most `ARGON2_PARALLEL` at once.
    async fn verify(&self, hash: &str, pin: &str) -> bool {
        self.verify_unless(hash, pin, || false).await
    }

    /// Like [`Devices::verify`], but true at once if `done()` holds once a slot is free.
    async fn verify_unless(&self, hash: &str, pin: &str, done: impl Fn() -> bool) -> bool {
        let Ok(_slot) = self.argon2_slots.acquire().await else { return false };
        if done() {
            return true;
        }
        let (hash, pin) = (hash.to_string(), pin.to_string());
        tokio::task::spawn_blocking(move || verify_pin(&hash, &pin)).await.unwrap_or(false)
    }

    fn is_verified(&self, tag: &[u8; 32]) -> bool {
        self.verified.lock().unwrap_or_else(|e| e.into_inner()).contains(tag)
    }

    fn cache_tag(&self, dev: &Device, pin: &str) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.cache_key);
        ctx.update(dev.name.as_bytes());
        ctx.update(&[0]);
        ctx.update(pin.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Parses "192.168.10.31/32", "10.0.0.0/8", "fd00::/8" or a bare address (a /32 or /128).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!("\"{s}\" has host bits set; did you mean {}?", net.trunc()));
        }
        return Ok(net);
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("\"{s}\" is not an address or CIDR network (like 192.168.10.31/32)"))
}

/// Checks that a `pin_hash` is an argon2 PHC string.
pub fn check_pin_hash(s: &str) -> Result<(), String> {
    let h = PasswordHash::new(s)
        .map_err(|e| format!("pin_hash is not an argon2 hash ({e}); make one with `mfd-relay hash-pin`"))?;
    if !h.algorithm.as_str().starts_with("argon2") {
        return Err("pin_hash must be an argon2 hash; make one with `mfd-relay hash-pin`".into());
    }
    Ok(())
}

/// Hashes a PIN for the configuration (argon2id, default parameters, random salt).
pub fn hash_pin(pin: &str) -> Result<String, String> {
    use argon2::PasswordHasher;
    argon2::Argon2::default().hash_password(pin.as_bytes()).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Verifies a PIN against its argon2 hash (constant time in the PIN, by argon2's design).
pub fn verify_pin(hash: &str, pin: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(h) => argon2::Argon2::default().verify_password(pin.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// Recipient patterns: "*", "*@domain", "user@domain" (case-insensitive).
pub fn valid_pattern(p: &str) -> bool {
    p == "*"
        || p.strip_prefix("*@").is_some_and(|d| !d.is_empty() && !d.contains('@'))
        || crate::config::looks_like_address(p)
}

/// Whether `addr` matches a recipient or sender pattern.
pub fn pattern_matches(pattern: &str, addr: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(domain) = pattern.strip_prefix("*@") {
        return addr.rsplit_once('@').is_some_and(|(_, d)| d.eq_ignore_ascii_case(domain));
    }
    pattern.eq_ignore_ascii_case(addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn devices(extra: &str) -> Devices {
        let text = format!(
            r#"
[[provider]]
name = "p"
kind = "generic"
client_id = "c"
token_url = "http://127.0.0.1:1/t"
smtp = "127.0.0.1:1"
[[identity]]
name = "i"
provider = "p"
email = "s@example.test"
flow = "auth_code"
[[device]]
name = "lan"
identity = "i"
addresses = ["192.168.10.0/24"]
[[device]]
name = "one"
identity = "i"
addresses = ["192.168.10.31"]
recipients = ["*@contoso.com", "boss@else.where"]
{extra}"#
        );
        let c = Config::parse(Path::new("t.toml"), text).unwrap();
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        Devices::from_config(&c)
    }

    #[test]
    fn most_specific_address_wins() {
        let d = devices("");
        assert_eq!(d.by_address("192.168.10.31".parse().unwrap()).unwrap().name, "one");
        assert_eq!(d.by_address("192.168.10.32".parse().unwrap()).unwrap().name, "lan");
        assert_eq!(d.by_address("::ffff:192.168.10.31".parse().unwrap()).unwrap().name, "one");
        assert!(d.by_address("10.0.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn recipient_patterns() {
        let d = devices("");
        let one = d.by_address("192.168.10.31".parse().unwrap()).unwrap();
        assert!(one.allows_recipient("Anyone@Contoso.COM"));
        assert!(one.allows_recipient("boss@else.where"));
        assert!(!one.allows_recipient("other@else.where"));
        assert!(!one.allows_recipient("x@contoso.com.evil"));
        assert!(valid_pattern("*") && valid_pattern("*@x.y") && valid_pattern("a@b"));
        assert!(!valid_pattern("*@") && !valid_pattern("bob"));
    }

    #[test]
    fn nets() {
        assert!(parse_net("10.0.0.0/8").is_ok());
        assert!(parse_net("10.0.0.1").is_ok());
        assert!(parse_net("fd00::/8").is_ok());
        assert!(parse_net("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(parse_net("300.0.0.1").is_err());
        assert!(parse_net("printer").is_err());
    }

    #[tokio::test]
    async fn login_checks_pin_and_address_and_caches_success() {
        let hash = hash_pin("1234").unwrap();
        assert!(check_pin_hash(&hash).is_ok());
        assert!(check_pin_hash("$2b$10$abc").is_err());
        let d = devices(&format!(
            "[[device]]\nname = \"auth\"\nidentity = \"i\"\nusername = \"floor3\"\npin_hash = \"{hash}\"\n[[device]]\nname = \"pinned\"\nidentity = \"i\"\nusername = \"pinned\"\npin_hash = \"{hash}\"\naddresses = [\"10.1.1.1\"]\n"
        ));
        let ip: IpAddr = "10.9.9.9".parse().unwrap();
        assert_eq!(d.authenticate("floor3", "1234", ip).await.unwrap().name, "auth");
        assert_eq!(d.authenticate("FLOOR3", "1234", ip).await.unwrap().name, "auth");
        assert_eq!(d.authenticate("floor3", "9999", ip).await.unwrap_err(), AuthError::WrongPin);
        assert_eq!(d.authenticate("nobody", "1234", ip).await.unwrap_err(), AuthError::UnknownUser);
        assert_eq!(d.authenticate("pinned", "1234", ip).await.unwrap_err(), AuthError::WrongAddress);
        assert!(d.authenticate("pinned", "1234", "10.1.1.1".parse().unwrap()).await.is_ok());
        // A cached success is fast.
        let t = std::time::Instant::now();
        for _ in 0..100 {
            d.authenticate("floor3", "1234", ip).await.unwrap();
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        // A device with a username is not matched by address alone.
        assert!(d.by_address("10.1.1.1".parse().unwrap()).is_none());
        // An unknown username costs an argon2 check like a wrong PIN: timing does not tell
        // which usernames exist.
        let t = std::time::Instant::now();
        assert!(d.authenticate("floor3", "0000", ip).await.is_err());
        let wrong_pin = t.elapsed();
        let t = std::time::Instant::now();
        assert!(d.authenticate("nobody", "0000", ip).await.is_err());
        let unknown = t.elapsed();
        assert!(unknown * 3 > wrong_pin, "unknown user {unknown:?} vs wrong PIN {wrong_pin:?}");
    }
}
