//! AUTH PLAIN (RFC 4616) and AUTH LOGIN decoding, and the throttle on failed logins (per
//! address and per username).
//!
//! Decoding is pure; checking the credentials belongs to [`crate::devices`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;

use crate::locks::MutexExt;

/// Credentials a device presented.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

// Never print the PIN, not even in a panic or a debug log.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &"<redacted>").finish()
    }
}

/// Why an AUTH exchange could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid base64")]
    Base64,
    #[error("malformed credentials")]
    Malformed,
    /// RFC 4954 4: the client sent `*`.
    #[error("authentication cancelled")]
    Cancelled,
}

/// The longest base64 line accepted in an AUTH exchange (RFC 4954 4 suggests 12288 octets).
pub const MAX_AUTH_LINE: usize = 12288;

/// Decodes one base64 line of an AUTH exchange; `*` cancels, `=` is empty (RFC 4954 4).
pub fn decode_line(line: &str) -> Result<Vec<u8>, DecodeError> {
    let line = line.trim();
    if line == "*" {
        return Err(DecodeError::Cancelled);
    }
    if line == "=" || line.is_empty() {
        return Ok(Vec::new());
    }
    base64::engine::general_purpose::STANDARD.decode(line).map_err(|_| DecodeError::Base64)
}

/// RFC 4616: `[authzid] NUL authcid NUL passwd`. An authzid other than the authcid is refused
/// (a device may not act as another device).
pub fn decode_plain(raw: &[u8]) -> Result<Credentials, DecodeError> {
    let mut parts = raw.split(|&b| b == 0);
    let (Some(authz), Some(user), Some(pass), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(DecodeError::Malformed);
    };
    let authz = std::str::from_utf8(authz).map_err(|_| DecodeError::Malformed)?;
    let username = String::from_utf8(user.to_vec()).map_err(|_| DecodeError::Malformed)?;
    let password = String::from_utf8(pass.to_vec()).map_err(|_| DecodeError::Malformed)?;
    if username.is_empty() || (!authz.is_empty() && authz != username) {
        return Err(DecodeError::Malformed);
    }
    Ok(Credentials { username, password })
}

/// The username or password line of AUTH LOGIN, as UTF-8.
pub fn decode_login_field(raw: Vec<u8>) -> Result<String, DecodeError> {
    String::from_utf8(raw).map_err(|_| DecodeError::Malformed)
}

/// `334` challenges of AUTH LOGIN: "Username:" and "Password:" in base64.
pub const LOGIN_USERNAME: &str = "VXNlcm5hbWU6";
pub const LOGIN_PASSWORD: &str = "UGFzc3dvcmQ6";

/// How many failed logins a key (an address, a username) may have outstanding, and how fast
/// they are forgiven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleLimits {
    /// Failures a key may have outstanding; one more attempt is refused (454).
    pub burst: u32,
    /// One outstanding failure is forgiven every this long.
    pub forgive_every: Duration,
}

impl ThrottleLimits {
    /// The most failed logins a key can have in `span` with these limits: the burst, plus one
    /// for every `forgive_every` that passes (see [`AuthThrottle`]).
    pub fn max_failures_in(&self, span: Duration) -> u64 {
        let per = self.forgive_every.as_secs().max(1);
        u64::from(self.burst) + span.as_secs() / per
    }
}

/// Throttles logins per source address (per /64 for IPv6, see [`crate::smtp::client_key`]) and
/// per username, at once.
///
/// Each key is a leaky bucket: a failed login adds `forgive_every` of "debt", debt drains in
/// real time, and an attempt is allowed only while the debt plus the attempts still being
/// verified plus this one fit in `burst * forgive_every`. Attempts are **reserved** before
/// the PIN is verified ([`AuthThrottle::begin`]), so parallel attempts cannot all pass the
/// check before the first failure is recorded. A success clears its own username's debt,
/// never the address's nor another username's: a good login for one device cannot wash away
/// failures against another.
///
/// Arithmetic with the relay's limits ([`crate::smtp::AUTH_LIMITS`]: burst 5, one failure
/// forgiven every 15 minutes): in any 24 hours a key can take at most 5 + 86,400 / 900 =
/// 5 + 96 = **101** failed guesses. From one address, or against one username from any
/// number of addresses, that is 101 of the 10,000 four-digit PINs, about **1 % per day**
/// (a month of non-stop guessing covers under a third). A printer with one typo is never
/// refused (one failure of five); a printer that failed five times waits 15 minutes for its
/// next attempt.
pub struct AuthThrottle {
    limits: ThrottleLimits,
    entries: Mutex<HashMap<Key, Bucket>>,
}

/// What failures are counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Address(IpAddr),
    User(String),
}

/// One key's state.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// When the outstanding failures will all be forgiven.
    debt_until: Instant,
    /// Attempts reserved and not yet finished.
    pending: u32,
}

/// Entries kept before idle ones are swept.
const THROTTLE_SWEEP_AT: usize = 10_000;
/// Usernames are counted by at most this many bytes (an AUTH line may carry 12 KB).
const MAX_USER_KEY: usize = 256;

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finish {
    Failure,
    Success,
    SoleCredential,
}

/// Why an attempt was not reserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many failed logins; try again later")]
pub struct Throttled;

/// A reserved login attempt. Finish it with [`Attempt::succeeded`] or [`Attempt::failed`];
/// dropped unfinished, it counts as a failure (a client must not escape the count by
/// hanging up while its PIN is checked).
pub struct Attempt {
    throttle: Arc<AuthThrottle>,
    keys: Vec<Key>,
    finished: bool,
}

impl Attempt {
    /// The PIN was right: release the reservation and clear this username's failures.
    pub fn succeeded(mut self, now: Instant) {
        self.finished = true;
        self.throttle.finish(&self.keys, Finish::Success, now);
    }

    /// The credentials were right at a gate with a single credential (the admin listener):
    /// whoever holds it may clear the address's failures too, since no other credential's
    /// failures can be washed away with it.
    pub fn succeeded_sole_credential(mut self, now: Instant) {
        self.finished = true;
        self.throttle.finish(&self.keys, Finish::SoleCredential, now);
    }

    /// The login failed: record it against every key; returns how long to wait before
    /// answering (growing with the failures outstanding).
    pub fn failed(mut self, now: Instant) -> Duration {
        self.finished = true;
        self.throttle.finish(&self.keys, Finish::Failure, now)
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.finished {
            self.throttle.finish(&self.keys, Finish::Failure, Instant::now());
        }
    }
}

impl AuthThrottle {
    pub fn new(limits: ThrottleLimits) -> Self {
        AuthThrottle { limits, entries: Mutex::new(HashMap::new()) }
    }

    fn keys(ip: IpAddr, username: Option<&str>) -> Vec<Key> {
        let mut keys = vec![Key::Address(crate::smtp::client_key(ip))];
        if let Some(u) = username {
            let mut u = u.to_lowercase();
            if u.len() > MAX_USER_KEY {
                let mut end = MAX_USER_KEY;
                while !u.is_char_boundary(end) {
                    end -= 1;
                }
                u.truncate(end);
            }
            keys.push(Key::User(u));
        }
        keys
    }

    /// Whether one more attempt fits a bucket at `now`.
    fn fits(&self, b: &Bucket, now: Instant) -> bool {
        let debt = b.debt_until.saturating_duration_since(now);
        let room = self.limits.forgive_every * self.limits.burst;
        debt + self.limits.forgive_every * (b.pending + 1) <= room
    }

    /// Whether this address may start an AUTH exchange now (a cheap early answer; the
    /// attempt itself is reserved with [`AuthThrottle::begin`]).
    pub fn allowed(&self, ip: IpAddr, now: Instant) -> bool {
        let map = self.entries.locked();
        Self::keys(ip, None).iter().all(|k| map.get(k).is_none_or(|b| self.fits(b, now)))
    }

    /// Reserves a login attempt from `ip` for `username` (None when the credentials could not
    /// even be decoded), before the PIN is verified.
    pub fn begin(self: &Arc<Self>, ip: IpAddr, username: Option<&str>, now: Instant) -> Result<Attempt, Throttled> {
        let keys = Self::keys(ip, username);
        let mut map = self.entries.locked();
        if map.len() >= THROTTLE_SWEEP_AT {
            map.retain(|_, b| b.pending > 0 || b.debt_until > now);
        }
        if !keys.iter().all(|k| map.get(k).is_none_or(|b| self.fits(b, now))) {
            return Err(Throttled);
        }
        for k in &keys {
            map.entry(k.clone()).or_insert(Bucket { debt_until: now, pending: 0 }).pending += 1;
        }
        drop(map);
        Ok(Attempt { throttle: self.clone(), keys, finished: false })
    }

    fn finish(&self, keys: &[Key], how: Finish, now: Instant) -> Duration {
        let failed = how == Finish::Failure;
        let mut map = self.entries.locked();
        let mut outstanding = 0u32;
        for k in keys {
            let b = map.entry(k.clone()).or_insert(Bucket { debt_until: now, pending: 1 });
            b.pending = b.pending.saturating_sub(1);
            if failed {
                b.debt_until = b.debt_until.max(now) + self.limits.forgive_every;
            } else if matches!(k, Key::User(_)) || how == Finish::SoleCredential {
                b.debt_until = now;
            }
            let debt = b.debt_until.saturating_duration_since(now);
            let n = debt.as_secs_f64() / self.limits.forgive_every.as_secs_f64().max(f64::MIN_POSITIVE);
            outstanding = outstanding.max(n.ceil() as u32);
        }
        if failed {
            Duration::from_millis(250 * u64::from(outstanding.min(8)))
        } else {
            Duration::ZERO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_decoding() {
        let c = decode_plain(b"\0floor3\x001234").unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("floor3", "1234"));
        let c = decode_plain(b"floor3\0floor3\x001234").unwrap();
        assert_eq!(c.username, "floor3");
        assert_eq!(decode_plain(b"other\0floor3\x001234"), Err(DecodeError::Malformed));
        assert_eq!(decode_plain(b"\0floor3"), Err(DecodeError::Malformed));
        assert_eq!(decode_plain(b"\0\0pin"), Err(DecodeError::Malformed));
        assert_eq!(decode_plain(b"\0a\0b\0c"), Err(DecodeError::Malformed));
        assert_eq!(decode_plain(b"\0\xff\0b"), Err(DecodeError::Malformed));
    }

    #[test]
    fn line_decoding() {
        assert_eq!(decode_line("AGZsb29yMwAxMjM0").unwrap(), b"\0floor3\x001234");
        assert_eq!(decode_line("*"), Err(DecodeError::Cancelled));
        assert_eq!(decode_line("="), Ok(vec![]));
        assert_eq!(decode_line("!!!notbase64"), Err(DecodeError::Base64));
    }

    #[test]
    fn debug_hides_the_pin() {
        let c = Credentials { username: "u".into(), password: "s3cret".into() };
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    const LIMITS: ThrottleLimits = ThrottleLimits { burst: 5, forgive_every: Duration::from_secs(900) };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parallel_attempts_are_reserved_before_verifying() {
        // 40 attempts start before any finishes (40 argon2 checks in flight): only the burst
        // gets through; the rest are refused at once.
        let t = Arc::new(AuthThrottle::new(LIMITS));
        let now = Instant::now();
        let attempts: Vec<_> = (0..40).map(|_| t.begin(ip("192.0.2.1"), Some("floor3"), now)).collect();
        let reserved = attempts.iter().filter(|a| a.is_ok()).count();
        assert_eq!(reserved, 5);
        for a in attempts.into_iter().flatten() {
            a.failed(now);
        }
        assert!(t.begin(ip("192.0.2.1"), Some("floor3"), now).is_err());
        assert!(!t.allowed(ip("192.0.2.1"), now));
    }

    #[test]
    fn success_clears_only_its_own_username() {
        let t = Arc::new(AuthThrottle::new(LIMITS));
        let now = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..4 {
            t.begin(a, Some("floor3"), now).unwrap().failed(now);
        }
        // A good login for another device from the same address...
        t.begin(a, Some("lobby"), now).unwrap().succeeded(now);
        // ...leaves the address's four failures: one more, and the address is refused.
        t.begin(a, Some("floor3"), now).unwrap().failed(now);
        assert_eq!(t.begin(a, Some("floor3"), now).err(), Some(Throttled));
        assert_eq!(t.begin(a, Some("lobby"), now).err(), Some(Throttled));
        // From elsewhere, floor3 has five failures of its own too.
        assert_eq!(t.begin(ip("192.0.2.9"), Some("FLOOR3"), now).err(), Some(Throttled));
        assert!(t.begin(ip("192.0.2.9"), Some("lobby"), now).is_ok());
    }

    #[test]
    fn a_success_clears_its_username_but_not_the_address() {
        let t = Arc::new(AuthThrottle::new(LIMITS));
        let now = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            t.begin(a, Some("floor3"), now).unwrap().failed(now);
        }
        t.begin(a, Some("floor3"), now).unwrap().succeeded(now);
        // floor3's failures are gone: from a fresh address it has its whole burst again.
        let b = ip("192.0.2.2");
        for _ in 0..5 {
            t.begin(b, Some("floor3"), now).unwrap().failed(now);
        }
        // The first address keeps its three: two more failures (any username) and it is refused.
        for _ in 0..2 {
            t.begin(a, Some("x"), now).unwrap().failed(now);
        }
        assert!(t.begin(a, Some("y"), now).is_err());
    }

    #[test]
    fn failures_per_username_count_across_addresses() {
        let t = Arc::new(AuthThrottle::new(LIMITS));
        let now = Instant::now();
        for i in 1..=5 {
            t.begin(ip(&format!("192.0.2.{i}")), Some("floor3"), now).unwrap().failed(now);
        }
        assert!(t.begin(ip("192.0.2.100"), Some("floor3"), now).is_err());
        assert!(t.begin(ip("192.0.2.100"), Some("other"), now).is_ok());
    }

    #[test]
    fn one_typo_never_locks_a_printer_out_and_failures_are_forgiven() {
        let t = Arc::new(AuthThrottle::new(LIMITS));
        let now = Instant::now();
        let a = ip("192.0.2.1");
        let d = t.begin(a, Some("floor3"), now).unwrap().failed(now);
        assert!(d <= Duration::from_millis(250));
        t.begin(a, Some("floor3"), now).unwrap().succeeded(now);
        // Five failures: refused; one is forgiven every 15 minutes.
        let t = Arc::new(AuthThrottle::new(LIMITS));
        let mut delays = Vec::new();
        for _ in 0..5 {
            delays.push(t.begin(a, Some("floor3"), now).unwrap().failed(now));
        }
        assert!(delays.windows(2).all(|w| w[1] > w[0]), "{delays:?}");
        assert!(t.begin(a, Some("floor3"), now + Duration::from_secs(899)).is_err());
        let later = now + Duration::from_secs(900);
        assert!(t.allowed(a, later));
        t.begin(a, Some("floor3"), later).unwrap().succeeded(later);
    }

    #[test]
    fn an_abandoned_attempt_counts_as_a_failure() {
        // (Drop uses the real clock.)
        let t = Arc::new(AuthThrottle::new(LIMITS));
        for _ in 0..5 {
            drop(t.begin(ip("192.0.2.1"), None, Instant::now()).unwrap());
        }
        assert!(!t.allowed(ip("192.0.2.1"), Instant::now()));
    }

    #[test]
    fn ipv6_addresses_in_one_64_share_a_budget() {
        let t = Arc::new(AuthThrottle::new(LIMITS));
        let now = Instant::now();
        for i in 1..=5 {
            t.begin(ip(&format!("2001:db8:1:2::{i:x}")), None, now).unwrap().failed(now);
        }
        assert!(!t.allowed(ip("2001:db8:1:2:ffff::1"), now));
        assert!(t.allowed(ip("2001:db8:1:3::1"), now));
    }

    /// An attacker guessing non-stop for a day, as fast as the throttle lets them, from one
    /// address against one username, and from 1,000 addresses against one username.
    #[test]
    fn a_four_digit_pin_is_not_guessable_in_a_day() {
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(LIMITS.max_failures_in(day), 101);
        assert_eq!(crate::smtp::AUTH_LIMITS, LIMITS);
        let start = Instant::now();
        for addresses in [1u32, 1000] {
            let t = Arc::new(AuthThrottle::new(LIMITS));
            let mut guesses = 0u64;
            let mut s = 0u64;
            while s < day.as_secs() {
                let now = start + Duration::from_secs(s);
                let from = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + (s as u32 % addresses)));
                if let Ok(a) = t.begin(from, Some("floor3"), now) {
                    a.failed(now);
                    guesses += 1;
                }
                s += 1;
            }
            assert!(guesses <= 101, "{guesses} guesses in a day from {addresses} addresses");
            assert!(guesses * 100 < 10_000 * 2, "under 2% of the PINs");
        }
    }
}
