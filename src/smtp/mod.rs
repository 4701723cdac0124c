//! The device-facing SMTP server (RFC 5321 with the extensions printers use).
//!
//! `listener` accepts connections (TLS, limits, shutdown), `session` runs one conversation as
//! a state machine over the typed commands of `command` and the named replies of `reply`;
//! `auth` decodes AUTH PLAIN/LOGIN, `data` receives a message (decoding, header rewrite, size
//! limit, spool), `connection` frames the bytes. Everything a session needs from the rest of
//! the relay is in [`Context`], as the narrow traits of `ports`, so that the tests here run
//! whole sessions in memory.

pub mod auth;
pub mod command;
pub mod connection;
pub mod data;
pub mod listener;
pub mod ports;
pub mod reply;
pub mod session;
#[cfg(test)]
mod transcripts;

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;

use ports::{Accept, Attempt, Identities, Verify};

/// What sessions share: the relay's state, as of the current configuration. The relay fills
/// it with `devices::Devices`, `queue::Queue`, `delivery::Delivery` and
/// `oauth::tokens::TokenManager`; the tests with fakes.
pub struct Context {
    pub hostname: String,
    /// Who a connection is.
    pub devices: Arc<dyn Verify>,
    /// Makes messages durable.
    pub queue: Arc<dyn Accept>,
    /// The in-session delivery attempt.
    pub delivery: Arc<dyn Attempt>,
    /// What the session must know of identities.
    pub tokens: Arc<dyn Identities>,
    /// The recipients that stand for cloud folders.
    pub folders: Arc<dyn ports::Destinations>,
    pub throttle: Arc<auth::AuthThrottle>,
    pub max_recipients: usize,
    pub activity: Arc<crate::activity::Activity>,
}

impl Context {
    /// The smallest provider limit over every device's identity (for EHLO before AUTH).
    pub fn smallest_provider_limit(&self) -> Option<u64> {
        self.devices.identities().iter().filter_map(|i| self.tokens.size_limit(i)).min()
    }
}

/// Limits on failed logins, per address and per username (the arithmetic is on
/// [`auth::AuthThrottle`]: at most 101 guesses a day per key, about 1 % of 4-digit PINs).
pub const AUTH_LIMITS: auth::ThrottleLimits =
    auth::ThrottleLimits { burst: 5, forgive_every: std::time::Duration::from_secs(15 * 60) };

/// The key under which a client address is counted (connections per address, failed logins):
/// IPv4 as is (IPv4-mapped IPv6 counts as IPv4), IPv6 by its /64, because one host or LAN
/// normally has a whole /64 (RFC 4291 2.5.1, RFC 8981 temporary addresses) and could otherwise
/// take a fresh address for every connection.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_is_counted_per_64() {
        let k = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(k("2001:db8:1:2::1"), k("2001:db8:1:2:ffff:ffff:ffff:ffff"));
        assert_eq!(k("2001:db8:1:2:abcd::9"), "2001:db8:1:2::".parse::<IpAddr>().unwrap());
        assert_ne!(k("2001:db8:1:2::1"), k("2001:db8:1:3::1"));
        assert_eq!(k("192.0.2.7"), "192.0.2.7".parse::<IpAddr>().unwrap());
        assert_ne!(k("192.0.2.7"), k("192.0.2.8"));
        assert_eq!(k("::ffff:192.0.2.7"), k("192.0.2.7"));
    }
}
