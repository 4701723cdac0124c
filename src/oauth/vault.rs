//! Encryption of token records at rest: XChaCha20-Poly1305 under a 256-bit key
//! from `key_file` (created with mode 0600 on first run) or the `MFD_RELAY_KEY` environment
//! variable (64 hex digits). Each record is bound to its identity name as associated data, so
//! a record copied onto another identity does not decrypt. A wrong key or a changed byte is an
//! error, never garbage.

use std::path::{Path, PathBuf};

use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

/// Format version of a sealed record (the first byte).
const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;

/// Errors of the vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("key file {path}: {source}")]
    KeyFile { path: PathBuf, source: std::io::Error },
    #[error("key {0} is not 64 hex digits (32 bytes)")]
    BadKey(String),
    #[error("stored token record for \"{0}\" does not decrypt: wrong key (key_file or MFD_RELAY_KEY changed?) or the record was altered")]
    Decrypt(String),
}

/// The token encryption key.
pub struct Vault {
    cipher: XChaCha20Poly1305,
}

impl Vault {
    /// Loads the key from `env_key` (hex) if given, else from `key_file`, creating the file
    /// with a fresh random key (mode 0600) when it does not exist.
    pub fn open(key_file: &Path, env_key: Option<&str>) -> Result<Vault, VaultError> {
        let hex = match env_key {
            Some(k) => k.trim().to_string(),
            None => match std::fs::read_to_string(key_file) {
                Ok(s) => s.trim().to_string(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_key_file(key_file)?,
                Err(source) => return Err(VaultError::KeyFile { path: key_file.into(), source }),
            },
        };
        let what = if env_key.is_some() { "MFD_RELAY_KEY".to_string() } else { key_file.display().to_string() };
        let bytes = decode_hex(&hex).filter(|b| b.len() == 32).ok_or(VaultError::BadKey(what))?;
        let cipher = XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| VaultError::BadKey(String::new()))?;
        Ok(Vault { cipher })
    }

    /// Encrypts `plain` for the record named `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let nonce = XNonce::generate();
        // Encryption with a valid key cannot fail for in-memory buffers.
        let ct = self.cipher.encrypt(&nonce, Payload { msg: plain, aad: name.as_bytes() }).unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_LEN + ct.len());
        out.push(VERSION);
        out.extend_from_slice(nonce.as_slice());
        out.extend_from_slice(&ct);
        out
    }

    /// Decrypts a record sealed for `name`.
    pub fn unseal(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        if sealed.len() < 1 + NONCE_LEN || sealed[0] != VERSION {
            return Err(VaultError::Decrypt(name.into()));
        }
        let nonce = XNonce::try_from(&sealed[1..1 + NONCE_LEN]).map_err(|_| VaultError::Decrypt(name.into()))?;
        self.cipher
            .decrypt(&nonce, Payload { msg: &sealed[1 + NONCE_LEN..], aad: name.as_bytes() })
            .map_err(|_| VaultError::Decrypt(name.into()))
    }
}

fn create_key_file(path: &Path) -> Result<String, VaultError> {
    use std::io::Write;
    let err = |source| VaultError::KeyFile { path: path.into(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut key = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| err(std::io::Error::other("no system randomness")))?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path).map_err(err)?;
    f.write_all(format!("{hex}\n").as_bytes()).and_then(|_| f.sync_all()).map_err(err)?;
    Ok(hex)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_binding_and_tamper() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let v = Vault::open(&path, None).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let sealed = v.seal("scans", b"refresh-token-xyz");
        assert!(!sealed.windows(7).any(|w| w == b"refresh"));
        assert_eq!(v.unseal("scans", &sealed).unwrap(), b"refresh-token-xyz");
        assert!(v.unseal("print", &sealed).is_err(), "bound to the identity");
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(v.unseal("scans", &bad).is_err());
        // The same file gives the same key; another key fails clearly.
        assert_eq!(Vault::open(&path, None).unwrap().unseal("scans", &sealed).unwrap(), b"refresh-token-xyz");
        let other = Vault::open(&path, Some(&"ab".repeat(32))).unwrap();
        assert!(other.unseal("scans", &sealed).unwrap_err().to_string().contains("wrong key"));
        assert!(matches!(Vault::open(&path, Some("xyz")), Err(VaultError::BadKey(_))));
    }
}
