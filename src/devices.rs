//! Who is this device, which identity may it use, what may it send.
//!
//! A device is recognised either by its AUTH username and PIN, or (when it does not log in)
//! by the address it connects from. A device with a username must log in; a device without
//! one is known by its `addresses` alone. A device with both may log in only from those
//! addresses. Anything else is not a device and cannot relay (ARCHITECTURE.md, "Never an open relay").
//!
//! PINs are argon2 hashes in the config, checked by a [`Verifier`] that remembers successes
//! (a printer logs in for every scan) and bounds the checks running at once.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::{AddressPattern, Config, FromPolicy};
use crate::credentials::Verifier;

/// A device from the configuration, ready for matching.
#[derive(Debug, Clone)]
pub struct Device {
    pub name: String,
    pub identity: String,
    pub nets: Vec<IpNet>,
    pub username: Option<String>,
    pin_hash: Option<String>,
    /// Recipient patterns; `None` allows any recipient.
    pub recipients: Option<Vec<AddressPattern>>,
    pub from: FromPolicy,
}

impl Device {
    /// Whether the device may send to `rcpt`.
    pub fn allows_recipient(&self, rcpt: &str) -> bool {
        match &self.recipients {
            None => true,
            Some(pats) => pats.iter().any(|p| p.matches(rcpt)),
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
    /// The identities in use, each once: an EHLO before AUTH looks at these, not at every
    /// device (thousands of address-mapped printers share a handful of identities).
    identities: Vec<String>,
    pins: Verifier,
}

/// argon2 checks running at once (each takes ~19 MiB and a core for tens of ms).
const ARGON2_PARALLEL: usize = 2;

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
                    nets: d.addresses.iter().map(|a| a.get_ref().0).collect(),
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
        let mut identities: Vec<String> = devices.iter().map(|d| d.identity.clone()).collect();
        identities.sort();
        identities.dedup();
        Devices { devices, by_user, identities, pins: Verifier::new(ARGON2_PARALLEL) }
    }

    /// The identities the devices use, each once.
    pub fn identities(&self) -> &[String] {
        &self.identities
    }

    /// Every device, in file order.
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

    /// After a reload, the current version of a device that logged in as `old` earlier in a
    /// session: the device of the same name, if it still has the same username and PIN hash
    /// and still accepts logins from `ip`. `None` means the login no longer holds (the device
    /// was removed or its credentials changed) and the session must not relay on it.
    pub fn still_logged_in(&self, old: &Device, ip: IpAddr) -> Option<Arc<Device>> {
        let ip = canonical(ip);
        let dev = self.devices.iter().find(|d| d.name == old.name)?;
        let same_user = match (&dev.username, &old.username) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            _ => false,
        };
        let address_ok = dev.nets.is_empty() || dev.connects_from(ip);
        (same_user && dev.pin_hash == old.pin_hash && address_ok).then(|| dev.clone())
    }

    /// The device name of a username, if any (for logs and activity).
    pub fn name_of_user(&self, username: &str) -> Option<&str> {
        self.by_user.get(&username.to_ascii_lowercase()).map(|&i| self.devices[i].name.as_str())
    }

    /// Checks a login. The argon2 work runs on the blocking pool; a success is remembered.
    pub async fn authenticate(&self, username: &str, pin: &str, ip: IpAddr) -> Result<Arc<Device>, AuthError> {
        let ip = canonical(ip);
        let Some(dev) = self.by_user.get(&username.to_ascii_lowercase()).map(|&i| self.devices[i].clone()) else {
            // As slow as a wrong PIN, so that timing does not tell which usernames exist.
            self.pins.spend(pin).await;
            return Err(AuthError::UnknownUser);
        };
        if !dev.nets.is_empty() && !dev.connects_from(ip) {
            self.pins.spend(pin).await;
            return Err(AuthError::WrongAddress);
        }
        let hash = dev.pin_hash.as_deref().ok_or(AuthError::WrongPin)?;
        if !self.pins.verify(&dev.name, pin, hash).await {
            return Err(AuthError::WrongPin);
        }
        Ok(dev)
    }
}

/// IPv4-mapped IPv6 addresses (dual-stack sockets) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn devices(extra: &str) -> Devices {
        let text = format!(
            r#"
[[listener]]
listen = "127.0.0.1:2525"
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
        let valid_pattern = |p: &str| AddressPattern::parse(p).is_some();
        assert!(valid_pattern("*") && valid_pattern("*@x.y") && valid_pattern("a@b"));
        assert!(!valid_pattern("*@") && !valid_pattern("bob"));
    }

    #[test]
    fn nets() {
        let parse_net = crate::config::Net::parse;
        assert!(parse_net("10.0.0.0/8").is_ok());
        assert!(parse_net("10.0.0.1").is_ok());
        assert!(parse_net("fd00::/8").is_ok());
        assert!(parse_net("10.0.0.1/8").unwrap_err().contains("10.0.0.0/8"));
        assert!(parse_net("300.0.0.1").is_err());
        assert!(parse_net("printer").is_err());
    }

    #[test]
    fn a_login_holds_across_a_reload_only_while_the_device_is_unchanged() {
        let dev = |name: &str, user: &str, hash: &str, addrs: &str| {
            format!("[[device]]\nname = \"{name}\"\nidentity = \"i\"\nusername = \"{user}\"\npin_hash = \"{hash}\"\n{addrs}\n")
        };
        let h1 = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGhhc2g";
        let h2 = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$b3RoZXJvdGhlcm90aGVyb3RoZXJvdGhlcm90aGVyb3Q";
        let ip: IpAddr = "10.9.9.9".parse().unwrap();
        let before = devices(&dev("auth", "floor3", h1, ""));
        let old = before.devices.iter().find(|d| d.name == "auth").unwrap().clone();
        // Unchanged, or only its identity/recipients changed: the current version.
        assert!(devices(&dev("auth", "FLOOR3", h1, "")).still_logged_in(&old, ip).is_some());
        // Removed, renamed, new PIN, other username, or no longer from this address: gone.
        assert!(devices("").still_logged_in(&old, ip).is_none());
        assert!(devices(&dev("auth2", "floor3", h1, "")).still_logged_in(&old, ip).is_none());
        assert!(devices(&dev("auth", "floor3", h2, "")).still_logged_in(&old, ip).is_none());
        assert!(devices(&dev("auth", "floor4", h1, "")).still_logged_in(&old, ip).is_none());
        let pinned = dev("auth", "floor3", h1, "addresses = [\"10.1.1.1\"]");
        assert!(devices(&pinned).still_logged_in(&old, ip).is_none());
        assert!(devices(&pinned).still_logged_in(&old, "10.1.1.1".parse().unwrap()).is_some());
    }

    #[tokio::test]
    async fn login_checks_pin_and_address_and_caches_success() {
        let hash = crate::credentials::hash("1234").unwrap();
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
