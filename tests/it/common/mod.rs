//! Shared support for the integration tests: in-process fakes of what the relay
//! cannot reach from a test (the cloud), and small helpers around them.
//!
//! - [`fake_oauth`]: an OAuth 2.0 / OpenID provider modelled on the Microsoft
//!   identity platform v2.0 (and Google's JWT bearer grant), on `127.0.0.1:0`.
//! - [`fake_smtp`]: an upstream SMTP submission server modelled on Office 365
//!   (`smtp.office365.com:587`), demanding `AUTH XOAUTH2`, with failure injection.
//! - [`tls`]: rustls configurations for the fakes and for test clients.
//!
//! The helpers here make certificates ([`CertPair`]), fixed RSA test keys
//! ([`RsaTestKey`]) and JWTs for assertion grants, PKCE pairs, XOAUTH2 strings,
//! and a raw SMTP client ([`SmtpClient`]) that talks the way a printer does.
//!
//! Everything listens on loopback only and every wait is bounded in time.
//!
//! Typical use in a relay test (`use crate::common;` at the top of the test module):
//!
//! ```text
//! let idp = FakeOAuth::start().await;
//! idp.register_client(ClientApp::public("relay-app"));
//! let refresh = idp.issue_refresh_token("scans@contoso.com");   // "already enrolled"
//! let smtp = FakeSmtp::start(SmtpOptions::new(Tls::StartTls, idp.token_validator())).await;
//! let dir = tempfile::tempdir()?;
//! let (ca, _) = smtp.cert().write_pem_files(dir.path(), "upstream");
//! // config: provider kind = "generic", token_url = idp.token_url(),
//! //         smtp = "127.0.0.1:{smtp.port()}", smtp_tls = "starttls", ca_file = ca
//! // ... drive the relay with SmtpClient like a printer ...
//! let got = smtp.wait_for_messages(1, Duration::from_secs(10)).await;
//! assert_eq!(got[0].user.as_deref(), Some("scans@contoso.com"));
//! ```

pub mod fake_drive;
pub mod fake_gdrive;
pub mod fake_gmail;
pub mod fake_graph;
pub mod fake_oauth;
pub mod fake_smtp;
pub mod real;
pub mod relay;
pub mod tls;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::signature::{KeyPair as _, RsaKeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// Small encoding helpers
// ---------------------------------------------------------------------------

/// Base64url without padding (JWT segments, PKCE challenges, `x5t#S256`).
pub fn b64url(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Standard base64 with padding (SMTP AUTH).
pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    STANDARD.encode(bytes)
}

/// SHA-256 digest.
pub fn sha256(bytes: impl AsRef<[u8]>) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes.as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Seconds since the Unix epoch (JWT `iat` / `exp`).
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock before 1970").as_secs()
}

/// `n` random bytes from the system RNG, base64url encoded.
pub fn random_b64url(n: usize) -> String {
    use ring::rand::SecureRandom;
    let mut buf = vec![0u8; n];
    ring::rand::SystemRandom::new().fill(&mut buf).expect("system RNG failed");
    b64url(buf)
}

/// A PKCE pair (RFC 7636 §4.1-4.2): `(code_verifier, S256 code_challenge)`.
pub fn pkce_pair() -> (String, String) {
    let verifier = random_b64url(32); // 43 characters, all unreserved
    let challenge = b64url(sha256(verifier.as_bytes()));
    (verifier, challenge)
}

/// The SASL XOAUTH2 initial client response, base64 encoded:
/// `base64("user=" user "\x01auth=Bearer " token "\x01\x01")`.
pub fn xoauth2_b64(user: &str, token: &str) -> String {
    b64(format!("user={user}\x01auth=Bearer {token}\x01\x01"))
}

// ---------------------------------------------------------------------------
// TLS certificates
// ---------------------------------------------------------------------------

/// A self-signed certificate with its PKCS#8 private key, in PEM and DER.
#[derive(Clone, Debug)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
}

impl CertPair {
    /// A fresh ECDSA P-256 certificate for `localhost`, `127.0.0.1` and `::1`.
    pub fn localhost() -> CertPair {
        Self::self_signed(&["localhost", "127.0.0.1", "::1"])
    }

    /// A fresh ECDSA P-256 certificate for the given DNS names / IP addresses.
    pub fn self_signed(names: &[&str]) -> CertPair {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let ck = rcgen::generate_simple_self_signed(names).expect("rcgen: self-signed cert");
        CertPair {
            cert_pem: ck.cert.pem(),
            key_pem: ck.signing_key.serialize_pem(),
            cert_der: ck.cert.der().to_vec(),
            key_der: ck.signing_key.serialize_der(),
        }
    }

    pub fn cert(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Writes `<dir>/<stem>.pem` (certificate) and `<dir>/<stem>-key.pem`
    /// (private key) and returns `(cert_path, key_path)`. The certificate file
    /// doubles as a CA file for clients that must trust it.
    pub fn write_pem_files(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}-key.pem"));
        std::fs::write(&cert_path, &self.cert_pem).expect("write cert PEM");
        std::fs::write(&key_path, &self.key_pem).expect("write key PEM");
        (cert_path, key_path)
    }
}

// ---------------------------------------------------------------------------
// RSA keys and JWTs (client assertions, Google service accounts)
// ---------------------------------------------------------------------------

/// Fixed 2048-bit RSA keys for tests. ring cannot generate RSA keys and rcgen
/// on ring cannot either, so two keys made once with
/// `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048` live here.
/// They protect nothing.
const TEST_RSA_KEY_A: &str = "-----BEGIN PRIVATE KEY-----
MIIEuwIBADANBgkqhkiG9w0BAQEFAASCBKUwggShAgEAAoIBAQCd7cuGDvyMj6DD
Ubo+a1pvtuoR7yKJ0bYW5gEFdHIR/PeFRhozcL17GlwHXE5U5n5sAFjvaj2FkAD8
Gqebwk0DpcUWJGXMnYpZCRT0FmQAbHcO7LoAxOGa4rcP+AemC+NIEkUUNtLnAhUc
8K0O6GsdBgfUcDn1X8BUKDC6xdyju8pv8R+CrYluRJWcaYC5bk1uVUIdZ1/B9sVN
/1m3O/9PGejzd99yLIwnRaPoEogaIrALsQbv8be5pwE4mW9q53lZX7/UoRAFq8GO
L1R2Az0swChkozg7I71SIZhbp1E9R50eTjIndSF03DYpxLy9EY7qF2au7KAr33sB
HqsSQcq5AgMBAAECgf8dWqsO/+TGkOu7YjV75KL/9hULwFHAds+hnJ6+pNDkXGCl
ekzkbXrKptue1/QMqSBWcroVG2opU9rbARlQ74yLtlmBBBg9MAscVtPONVs2Y51o
Phf/N0O3xkFrIRmgLhV7ZT9HF+mbhoeQxCtmhKIO2FAcQb/ZcTK5HGnyTVSgGhHV
xaxCHoPnQCBDJYu3UOrBVIWtiuFJ+J7VCV4yEMxQKoS/AycqOICd/a7INqgXEydE
QHKW+wKFvr/70zstjszWb1dgIqUVEqGeTCkW2xZZC/IZwG8Md0G6QH7B3ZjzXmX6
Lmul92ImD8BxAH1K0XVrgeB46BVxo25dAmNyjLUCgYEA3cv2DHaBI7Ht0m3pdXKT
9EqsxkslSlmwUSZ6QSVF7r4bN7iXiIFWJslHes8uWMricBt6vcnfqQOLRVmZfeaQ
lvh3r1OBvhY+JLPO6obFXeiERo/UT8dW5ydlEskIiUwrE4Slm031nN1CgP12rAQ0
JonCaya5GqbvQbyXBLhJyb0CgYEAtkh5dmoY/gyBpRMHk9xxnj94XUqDOqEeJIMI
R0sIewam08aXWus9gnwRK6nQVuxExJoxi+gjdHfDSo5YAaP2KVRu8pbEpX/3cpPs
I7TexYMtTRaMXorBxzphqAuGAd52kZogZY1xACmbI+VywK4+PkvkMsl6gWRcDGzA
lDO+rq0CgYAniQ3I1u7aEANWeSUePFhHOXBmwEpbYHVfYb51ElHO5rAvVIYeXP+g
VkyZhYi7Zx7J4PwWDIADvo/6wqfrm0e2wX+EDxyXZ5uYKzz87R0NSj8Z3NV5iwzg
k1Me8BrHbn5XMlPaxSC832vVVljq/KzXGcNAGlzwdUU8sIMy4i60+QKBgEqxogwS
59DagRmKlbVSRMCK06Cu0t1ofjiJ9Q95wKzhCeWH4Ceic58Phd21hSjJQlipspnY
8wZbuQvJDmkFre47qgcAHu6OZHBwCviKuiqHWT3YeoaXJ1ajJrc8mZoUddOuK45R
ijd91RO9hutLuze903G4O9nfrRRuT++q0H01AoGBAI8buRZtCEHWTO4S2kW2rH+T
96rsPi1VabMc4b7CE9557+WObWquUpC969BRGAv/uYQ5eQ61jG7xCC649CjLb0dn
s1y693WpidE5oUt/RRWhriAetIt3tbG0wEsH6nPxm5G/6Z7Tedejk3yJZMeGGUlK
xc9Z+L/MRcUChcqLs816
-----END PRIVATE KEY-----
";

const TEST_RSA_KEY_B: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC/r6HlNNOcDEwO
APdX82fanrYWCtX/+KqfpbrIP78HT7XzaVAt3+4gIVSU3nPq7uN0l8y33W0HoDzL
xmYgoekpjhqntLM6sKjP4MJorDUnGUNuWtnoW71dN183BIlDVg0bog+LsVN25jGl
wilJndTZ4GQTO3GCnNp41bj1LT3e8LvCk/FO5ZhRRMdBr1VoVBxJRx9me13ZYHgC
FJRBidQv/3li8SQcvXCToouiFkjRpFT2Ol34n/SZgwH0mXBLg1qApWnVKtCrTNmR
EfWZju1n43sf2M7AMc8bN82/yFUkvyEoVTaCRJyRwIRTaI0aTOO+G3TCfSwuFfLd
kVkE5ekDAgMBAAECggEAMR03Rhs6/QjJk+z7czWSrplr3kn4exWj4jP8n8J1l9H8
tNmPCbIOuXzQxzQYT2HWNdGPSq0ZepK8ARpcoI/bxiH7Am1yXt9U4a6dIWS+Wb5H
YMc2firDYlcFtnsbEH3D7gigIxLUZ+qjXe1Z1trx5sFv4t2gP+8gq0VXlrp41940
xaFXZvIsh+Y618Oo8JdpbEefr7H5gm9kwpkgK2T1fBK3mqPNvuCHQEm6QblliwwU
UqR0tbvIF1LL6d54Ps066JSY6Xo9I36qtecV5DZqOBfYagdijgXUSkylLqnuuw65
5Kys50R9KegHulb/c60eG36Tlm3H/F8w/b7vkE7NgQKBgQDyJaR4Fb8MO/ZnznZ5
Z3WzQiGsIMUN/Qv6ksTM9NnYioNw24bG0b0KWbHK91F2EtC0RiMecxC5GB/L74C8
nFLGxuFKJ4SpMNuMc+3oXgj09a1yWGXQeLQAvKBR7JFfl2Wqk+40HtajTXgTRNTv
AjIQ6E5HxZSq05fZe4BuWWq+KQKBgQDKpvcUmXopI8cTAo0f/myWlfLlrxAO6MGo
s4VmZGRaRhtCvttLz7kzmWwj5GbNET+yRR4WgkJOmzMbug2SL6e1a7epKOfKk8C5
9PzYAaW0aeLZECRhG9KoMXODNt8vh8cnfvVwGEd845v2FQ9h7Ptzsd978Yt4yIP+
WqChQn77SwKBgHlvCzX1oeOexol0btGfYtVM2toZbPkA59r3c55dREpl3Fjinopi
cG0aYiEpOj7+XI+rhL0mc0J/qKJ7L5JmytRItH6dpte6Wr/q+2pGjjNaaWsojZao
kYy1C6lJ+/V2VVPf79tPg9BNb2QqZqad8UGtXmR733xztHkqiFPOn8tRAoGAJete
Gl2pjR8jtfvpOk5aNUcznyTFxXRqIE4PLRyl5nptyWx7DlF9HxmbMZAgaEjM+WeT
fLS9AYZq5spGlc8S+5B/WkjMLoy9KE6eLTEJt5uElgc+N2mEXnJ6YdgXpQYsDsjj
1ijE36qbWU2RhkpYtspWvhNxfJVQlXyRx/rwVccCgYEAtaGC0zNvEI4eWm4JoMGT
tIgh3tGwVJ4vHvX7AEMJtmuSvGcZuam8xdO9VA5FmRBYZRmGWOoNGxc+p0UdNhYI
WyfacBoECC2n5csdDyNJEJ5wj1Z33Pb9SFWBRii9aTGK8R3tJCbdyCCZeEOEYDmN
pOU8siSIMKxPQ/XrLZMzI7k=
-----END PRIVATE KEY-----
";

/// An RSA key for signing RS256 JWTs in tests: Microsoft certificate
/// credentials (client assertions, RFC 7523 §2.2) and Google service accounts
/// (JWT bearer grant, RFC 7523 §2.1).
pub struct RsaTestKey {
    pem: &'static str,
    pair: RsaKeyPair,
}

/// A self-signed certificate over an [`RsaTestKey`], as an admin would upload
/// to an Entra app registration ("Certificates & secrets").
#[derive(Clone, Debug)]
pub struct RsaCert {
    pub cert_pem: String,
    /// `x5t#S256` header value: base64url(SHA-256(certificate DER)).
    pub x5t_s256: String,
}

impl RsaTestKey {
    /// The first fixed test key.
    pub fn a() -> RsaTestKey {
        Self::from_pem(TEST_RSA_KEY_A)
    }

    /// The second fixed test key (to sign with "the wrong key").
    pub fn b() -> RsaTestKey {
        Self::from_pem(TEST_RSA_KEY_B)
    }

    fn from_pem(pem: &'static str) -> RsaTestKey {
        use rustls_pki_types::pem::PemObject;
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).expect("test key PEM");
        let pair = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).expect("test key PKCS#8");
        RsaTestKey { pem, pair }
    }

    /// The private key as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn private_key_pem(&self) -> &'static str {
        self.pem
    }

    /// The public key as a PKCS#1 `RSAPublicKey` DER, the form that ring's
    /// `RSA_PKCS1_2048_8192_SHA256` verifier takes and that
    /// [`fake_oauth::FakeOAuth`] registers.
    pub fn public_key_der(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    /// RSASSA-PKCS1-v1_5 with SHA-256 over `message`.
    pub fn sign_rs256(&self, message: &[u8]) -> Vec<u8> {
        let mut sig = vec![0u8; self.pair.public().modulus_len()];
        self.pair
            .sign(&ring::signature::RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), message, &mut sig)
            .expect("RSA sign");
        sig
    }

    /// A compact RS256 JWT: `b64url(header) . b64url(claims) . b64url(sig)`.
    /// `header` is used as given (add `"alg": "RS256"` yourself, so that tests
    /// can also make broken headers).
    pub fn jwt(&self, header: &serde_json::Value, claims: &serde_json::Value) -> String {
        let signing_input = format!("{}.{}", b64url(header.to_string()), b64url(claims.to_string()));
        let sig = self.sign_rs256(signing_input.as_bytes());
        format!("{signing_input}.{}", b64url(sig))
    }

    /// A self-signed certificate over this key (CN `cn`), with its `x5t#S256`.
    pub fn self_signed_cert(&self, cn: &str) -> RsaCert {
        let kp =
            rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(self.pem, &rcgen::PKCS_RSA_SHA256).expect("rcgen RSA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("rcgen params");
        params.distinguished_name.push(rcgen::DnType::CommonName, cn.to_string());
        let cert = params.self_signed(&kp).expect("rcgen RSA cert");
        let der = cert.der().to_vec();
        RsaCert { cert_pem: cert.pem(), x5t_s256: b64url(sha256(&der)) }
    }

    /// A Microsoft-style client assertion (certificate credential) for
    /// `client_id`, valid for 10 minutes, addressed to `token_url`.
    pub fn client_assertion(&self, cert: &RsaCert, client_id: &str, token_url: &str) -> String {
        let now = unix_now();
        self.jwt(
            &serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t#S256": cert.x5t_s256}),
            &serde_json::json!({
                "aud": token_url, "iss": client_id, "sub": client_id,
                "jti": random_b64url(16), "nbf": now, "iat": now, "exp": now + 600,
            }),
        )
    }

    /// A Google service-account assertion (JWT bearer grant): `iss` the
    /// service account, `sub` the user to act as, `scope`, `aud` the token URL.
    pub fn service_account_assertion(
        &self,
        service_account: &str,
        subject: &str,
        scope: &str,
        token_url: &str,
    ) -> String {
        let now = unix_now();
        self.jwt(
            &serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": "fake-key-1"}),
            &serde_json::json!({
                "iss": service_account, "sub": subject, "scope": scope,
                "aud": token_url, "iat": now, "exp": now + 3600,
            }),
        )
    }

    /// A Google service-account key file (the JSON an admin downloads),
    /// pointing at `token_url`.
    pub fn service_account_json(&self, service_account: &str, token_url: &str) -> String {
        serde_json::json!({
            "type": "service_account",
            "project_id": "fake-project",
            "private_key_id": "fake-key-1",
            "private_key": self.pem,
            "client_email": service_account,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.invalid/o/oauth2/auth",
            "token_uri": token_url,
        })
        .to_string()
    }
}

// ---------------------------------------------------------------------------
// A raw SMTP client, the way a printer (or a test) talks
// ---------------------------------------------------------------------------

/// How long [`SmtpClient`] waits for a reply before failing with `TimedOut`.
pub const SMTP_CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// One SMTP reply: the code and the text of each line (without the code).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    /// All lines joined by `\n`.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }

    /// The reply as it appeared on the wire (`250-a\r\n250 b`), for messages.
    pub fn wire(&self) -> String {
        let n = self.lines.len();
        self.lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{}{}{}", self.code, if i + 1 < n { '-' } else { ' ' }, l))
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    /// Whether a line (e.g. an EHLO keyword) starts with `prefix`, ignoring case.
    pub fn has_line(&self, prefix: &str) -> bool {
        self.lines.iter().any(|l| l.to_ascii_uppercase().starts_with(&prefix.to_ascii_uppercase()))
    }
}

/// A line-oriented SMTP client over any stream. Every read is bounded by
/// [`SMTP_CLIENT_TIMEOUT`].
pub struct SmtpClient<S> {
    io: BufReader<S>,
}

impl SmtpClient<TcpStream> {
    /// Connects to `127.0.0.1:port` and reads the greeting.
    pub async fn connect(port: u16) -> (SmtpClient<TcpStream>, Reply) {
        let tcp = tokio::time::timeout(SMTP_CLIENT_TIMEOUT, TcpStream::connect(("127.0.0.1", port)))
            .await
            .expect("connect timed out")
            .expect("connect");
        let mut c = SmtpClient::new(tcp);
        let greeting = c.read_reply().await.expect("greeting");
        (c, greeting)
    }

    /// Sends `STARTTLS`, expects 220 and performs the TLS handshake trusting
    /// `config`'s roots for server name `localhost`.
    pub async fn starttls(
        mut self,
        config: Arc<rustls::ClientConfig>,
    ) -> SmtpClient<tokio_rustls::client::TlsStream<TcpStream>> {
        self.cmd_expect("STARTTLS", 220).await;
        let tcp = self.into_inner();
        let tls = tls::connect(tcp, config, "localhost").await.expect("TLS handshake after STARTTLS");
        SmtpClient::new(tls)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> SmtpClient<S> {
    pub fn new(stream: S) -> Self {
        SmtpClient { io: BufReader::new(stream) }
    }

    /// The underlying stream. Panics if the server sent bytes not yet read
    /// (which would be lost, or be injected plaintext before a TLS upgrade).
    pub fn into_inner(self) -> S {
        assert!(
            self.io.buffer().is_empty(),
            "SmtpClient::into_inner with unread data: {:?}",
            String::from_utf8_lossy(self.io.buffer())
        );
        self.io.into_inner()
    }

    /// Writes bytes as they are (no CRLF added).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let w = self.io.get_mut();
        w.write_all(bytes).await?;
        w.flush().await
    }

    /// Writes `line` followed by CRLF.
    pub async fn send_line(&mut self, line: &str) -> std::io::Result<()> {
        self.send_raw(format!("{line}\r\n").as_bytes()).await
    }

    /// Reads one (possibly multi-line) reply. `UnexpectedEof` when the server
    /// closed the connection, `TimedOut` after [`SMTP_CLIENT_TIMEOUT`].
    pub async fn read_reply(&mut self) -> std::io::Result<Reply> {
        use std::io::{Error, ErrorKind};
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(SMTP_CLIENT_TIMEOUT, self.io.read_line(&mut line))
                .await
                .map_err(|_| Error::new(ErrorKind::TimedOut, "no SMTP reply in time"))??;
            if n == 0 {
                return Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("connection closed (reply so far: {lines:?})"),
                ));
            }
            let line = line.trim_end_matches(['\r', '\n']);
            let bad = || Error::new(ErrorKind::InvalidData, format!("bad reply line {line:?}"));
            if line.len() < 3 {
                return Err(bad());
            }
            let code: u16 = line[..3].parse().map_err(|_| bad())?;
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if !more {
                return Ok(Reply { code, lines });
            }
        }
    }

    /// Sends a command line and reads its reply; panics on I/O errors.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.send_line(line).await.unwrap_or_else(|e| panic!("sending {line:?}: {e}"));
        self.read_reply().await.unwrap_or_else(|e| panic!("reply to {line:?}: {e}"))
    }

    /// Like [`cmd`](Self::cmd) and asserts the reply code.
    pub async fn cmd_expect(&mut self, line: &str, code: u16) -> Reply {
        let r = self.cmd(line).await;
        assert_eq!(r.code, code, "reply to {line:?} was {}", r.wire());
        r
    }

    /// `AUTH XOAUTH2 <initial response>` for `user` / `token`.
    pub async fn auth_xoauth2(&mut self, user: &str, token: &str) -> Reply {
        self.cmd(&format!("AUTH XOAUTH2 {}", xoauth2_b64(user, token))).await
    }

    /// MAIL / RCPT... / DATA / body / "." one command at a time; returns the
    /// reply to the end of DATA. `body` must use CRLF and end with CRLF; it is
    /// dot-stuffed here (RFC 5321 §4.5.2).
    pub async fn send_mail(&mut self, from: &str, rcpts: &[&str], body: &[u8]) -> Reply {
        self.cmd_expect(&format!("MAIL FROM:<{from}>"), 250).await;
        for r in rcpts {
            self.cmd_expect(&format!("RCPT TO:<{r}>"), 250).await;
        }
        self.cmd_expect("DATA", 354).await;
        let mut wire = dot_stuff(body);
        wire.extend_from_slice(b".\r\n");
        self.send_raw(&wire).await.expect("send DATA body");
        self.read_reply().await.expect("reply to end of DATA")
    }
}

/// Dot-stuffs a CRLF message (a leading "." on any line becomes "..").
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    out
}

/// `bearer token -> the account it was issued to`, or `None` when the token is unknown,
/// expired or for another resource: what a fake HTTP API (Graph, the Gmail API) asks before
/// it serves a request. Wire it to the fake OAuth provider's tokens.
#[allow(dead_code)] // used by the fakes of Graph and the Gmail API
pub type BearerValidator = std::sync::Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A fake HTTP service's server task (the fake OAuth provider, Graph, the Gmail API): serves
/// `app` on `listener` and stops when the last handle holding it is dropped.
pub struct ServerTask(tokio::task::JoinHandle<()>);

impl ServerTask {
    pub fn serve(listener: tokio::net::TcpListener, app: axum::Router) -> std::sync::Arc<ServerTask> {
        std::sync::Arc::new(ServerTask(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        })))
    }
}

impl Drop for ServerTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}
