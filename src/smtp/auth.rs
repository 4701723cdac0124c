//! AUTH PLAIN (RFC 4616) and AUTH LOGIN decoding, and the per-address throttle on failures.
//!
//! Decoding is pure; checking the credentials belongs to [`crate::devices`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;

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

/// Remembers failed logins per source address and refuses AUTH for a while after too many.
///
/// A printer with a mistyped PIN retries a few times; a brute force tries thousands. After
/// `max_failures` within `window`, AUTH from that address is refused until the window passes,
/// and every failure is answered only after a delay that grows with the count.
pub struct AuthThrottle {
    max_failures: u32,
    window: Duration,
    entries: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Entries kept at most; beyond that, expired ones are swept.
const THROTTLE_SWEEP_AT: usize = 10_000;

impl AuthThrottle {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        AuthThrottle { max_failures, window, entries: Mutex::new(HashMap::new()) }
    }

    /// Whether this address may try AUTH now.
    pub fn allowed(&self, ip: IpAddr, now: Instant) -> bool {
        let map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&ip) {
            Some((count, since)) => *count < self.max_failures || now.duration_since(*since) >= self.window,
            None => true,
        }
    }

    /// Records a failure; returns how long to wait before answering it.
    pub fn failed(&self, ip: IpAddr, now: Instant) -> Duration {
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= THROTTLE_SWEEP_AT {
            let window = self.window;
            map.retain(|_, (_, since)| now.duration_since(*since) < window);
        }
        let e = map.entry(ip).or_insert((0, now));
        if now.duration_since(e.1) >= self.window {
            *e = (0, now);
        }
        e.0 += 1;
        Duration::from_millis(250 * u64::from(e.0.min(8)))
    }

    /// A success clears the address's record.
    pub fn succeeded(&self, ip: IpAddr) {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).remove(&ip);
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

    #[test]
    fn throttle_blocks_after_failures_and_recovers() {
        let t = AuthThrottle::new(3, Duration::from_secs(60));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let other: IpAddr = "192.0.2.2".parse().unwrap();
        let now = Instant::now();
        assert!(t.allowed(ip, now));
        let d1 = t.failed(ip, now);
        let d2 = t.failed(ip, now);
        assert!(d2 > d1);
        assert!(t.allowed(ip, now));
        t.failed(ip, now);
        assert!(!t.allowed(ip, now));
        assert!(t.allowed(other, now));
        assert!(t.allowed(ip, now + Duration::from_secs(61)));
        t.succeeded(ip);
        assert!(t.allowed(ip, now));
    }
}
