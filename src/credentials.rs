//! Secrets checked against argon2 hashes: device PINs and the admin's basic-auth password.
//!
//! An argon2 check costs ~19 MiB and tens of milliseconds of CPU, and a printer logs in for
//! every scan (a browser sends its password with every request). So a [`Verifier`]:
//! - remembers a success in memory under an HMAC of (who, secret) with a key made at startup:
//!   a repeat costs microseconds, the secret itself is never kept, failures are never kept;
//! - runs checks on the blocking pool, a bounded number at once, so that a burst of logins
//!   (or of wrong secrets) cannot exhaust memory or stall the async workers;
//! - after waiting for a slot, looks again: a check of the same secret may just have succeeded.

use std::collections::HashSet;
use std::sync::Mutex;

use argon2::{PasswordHash, PasswordHasher, PasswordVerifier};
use ring::hmac;

use crate::locks::MutexExt;

/// Successes remembered at most (32 bytes each); the set is emptied when full.
const MAX_REMEMBERED: usize = 10_000;

/// Checks secrets against argon2 hashes, remembering successes.
pub struct Verifier {
    key: hmac::Key,
    remembered: Mutex<HashSet<[u8; 32]>>,
    slots: tokio::sync::Semaphore,
}

impl Verifier {
    /// At most `parallel` argon2 checks run at once.
    pub fn new(parallel: usize) -> Verifier {
        let rng = ring::rand::SystemRandom::new();
        Verifier {
            // Only fails if the OS has no randomness, in which case nothing secure can run.
            key: hmac::Key::generate(hmac::HMAC_SHA256, &rng).expect("system random source"),
            remembered: Mutex::new(HashSet::new()),
            slots: tokio::sync::Semaphore::new(parallel.max(1)),
        }
    }

    fn tag(&self, who: &str, secret: &str) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(who.as_bytes());
        ctx.update(&[0]);
        ctx.update(secret.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// How many successes are remembered (for tests).
    #[cfg(test)]
    pub(crate) fn remembered(&self) -> usize {
        self.remembered.locked().len()
    }

    fn is_remembered(&self, tag: &[u8; 32]) -> bool {
        self.remembered.locked().contains(tag)
    }

    /// Whether `secret` matches `hash`; `who` (a device name, a user) scopes what is remembered.
    pub async fn verify(&self, who: &str, secret: &str, hash: &str) -> bool {
        let tag = self.tag(who, secret);
        if self.is_remembered(&tag) {
            return true;
        }
        let Ok(_slot) = self.slots.acquire().await else { return false };
        if self.is_remembered(&tag) {
            return true;
        }
        if !check_on_blocking_pool(hash, secret).await {
            return false;
        }
        let mut set = self.remembered.locked();
        if set.len() >= MAX_REMEMBERED {
            set.clear();
        }
        set.insert(tag);
        true
    }

    /// Spends the time of a failed check without any hash to check against (an unknown
    /// user), so that timing does not tell which users exist.
    pub async fn spend(&self, secret: &str) {
        static DUMMY: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| hash("mfd-relay: nobody has this secret").unwrap_or_default());
        if let Ok(_slot) = self.slots.acquire().await {
            check_on_blocking_pool(&DUMMY, secret).await;
        }
    }
}

async fn check_on_blocking_pool(hash: &str, secret: &str) -> bool {
    let (hash, secret) = (hash.to_string(), secret.to_string());
    tokio::task::spawn_blocking(move || matches(&hash, &secret)).await.unwrap_or(false)
}

/// Hashes a secret for the configuration (argon2id, default parameters, random salt).
pub fn hash(secret: &str) -> Result<String, String> {
    argon2::Argon2::default().hash_password(secret.as_bytes()).map(|h| h.to_string()).map_err(|e| e.to_string())
}

/// Whether `secret` matches the argon2 `hash` (constant time in the secret, by argon2's design).
pub fn matches(hash: &str, secret: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(h) => argon2::Argon2::default().verify_password(secret.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// Checks that `s` is an argon2 PHC string; the error says what is wrong.
pub fn check_hash(s: &str) -> Result<(), String> {
    let h = PasswordHash::new(s).map_err(|e| format!("not an argon2 hash ({e})"))?;
    if !h.algorithm.as_str().starts_with("argon2") {
        return Err(format!("not an argon2 hash (it is {})", h.algorithm.as_str()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes() {
        let h = hash("1234").unwrap();
        assert!(check_hash(&h).is_ok());
        assert!(matches(&h, "1234"));
        assert!(!matches(&h, "9999"));
        assert!(!matches("garbage", "1234"));
        assert!(check_hash("$2b$10$abc").is_err());
        assert!(check_hash("$5$rounds=5000$abc$def").is_err());
        assert!(check_hash("secret").is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn remembers_successes_only_and_per_who() {
        let v = Verifier::new(2);
        let h = hash("1234").unwrap();
        assert!(!v.verify("a", "9999", &h).await);
        assert!(v.verify("a", "1234", &h).await);
        let t = std::time::Instant::now();
        for _ in 0..100 {
            assert!(v.verify("a", "1234", &h).await);
        }
        assert!(t.elapsed() < std::time::Duration::from_millis(200), "remembered: {:?}", t.elapsed());
        assert!(!v.verify("a", "9999", &h).await, "failures are never remembered");
        // The same secret under another name is checked again (and may fail there).
        let other = hash("5678").unwrap();
        assert!(!v.verify("b", "1234", &other).await);
    }
}
